"""``method=ip_adapter_masks``: diffusers' own masked IP-Adapter, an upstream implementation of the
w/o-crop-and-merge idea (paper Eq. 7) with soft masks.

The base model plus ``model.ip_adapter`` (as every IP-Adapter method); diffusers' stock
``IPAdapterAttnProcessor2_0`` runs unchanged, and each subject's box reaches it as a mask through
``cross_attention_kwargs["ip_adapter_masks"]``: the boxes are drawn as binary masks at the image's pixel size
and preprocessed by diffusers' ``IPAdapterMaskProcessor`` (``[1, n, height, width]``, one adapter with one
image per subject). In every cross-attention layer each subject attends on its own softmax, its output is
multiplied by its mask downsampled to the layer's grid (``IPAdapterMaskProcessor.downsample``: bicubic, no
antialiasing) and the subjects are added. Where every box edge falls on every cross-attention level's token grid,
the downsampled masks are the hard box masks and this is ``wo_crop_merge`` (``masked_sum``) up to float
rounding; elsewhere the bicubic masks are soft at the edges (and may overshoot [0, 1]), so they differ there
(``tests/test_ip_adapter_masks.py`` measures both). One adapter scale for all subjects, as diffusers takes it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from anyms.core.layout import Layout
from anyms.methods.ip_adapter import STOCK_JOINT, IPAdapterMethod


def box_mask_images(layout: Layout, height: int, width: int) -> list[Image.Image]:
    """Each subject's box as a binary ``L`` image at the output size (the layout's pixel rule)."""
    masks = layout.box_masks(height, width).numpy()
    return [Image.fromarray((m * 255).astype(np.uint8), "L") for m in masks]


def ip_adapter_masks(layout: Layout, height: int, width: int):
    """``[masks]``, masks ``[1, n, height, width]``: diffusers' preprocessing of the box masks, shaped for one
    IP-Adapter with one image per subject."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    masks = IPAdapterMaskProcessor().preprocess(box_mask_images(layout, height, width), height=height, width=width)
    return [masks.reshape(1, masks.shape[0], masks.shape[2], masks.shape[3])]


class IPAdapterMasks(IPAdapterMethod):
    """diffusers' stock IP-Adapter processors with each subject's box mask (see the module)."""

    def __init__(self, model, name: str = "ip_adapter_masks", **settings):
        settings.pop("attention", None)
        super().__init__(model, name=name, attention=STOCK_JOINT, **settings)

    def pipeline_kwargs(self, layout: Layout, height: int, width: int) -> dict:
        masks = [m.to(self.device) for m in ip_adapter_masks(layout, height, width)]
        return {"cross_attention_kwargs": {"ip_adapter_masks": masks}}

    def __call__(self, prompt, layout, seed, settings, attention=None, record=None):
        return super().__call__(prompt, layout, seed, settings, attention=STOCK_JOINT, record=record)

    @classmethod
    def check(cls, method, model) -> None:
        super().check({**method, "attention": STOCK_JOINT}, model)
