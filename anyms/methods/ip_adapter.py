"""The IP-Adapter methods: AnyMS and its ablations, diffusers' stock joint IP-Adapter, and text only
(``conf/method/{anyms,anyms_literal,wo_crop_merge,wo_local,ip_adapter_joint,text_only}.yaml``).

The base model plus one IP-Adapter (``model.ip_adapter``: the adapter every IP-Adapter method shares, so it
stays with the base model's config); the stock ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` runs
the denoising loop, and only the cross-attention processors and what reaches them change. ``method.attention``:

- an :data:`anyms.core.attention.MODES` value (``fused``, ``crop_merge``, ``masked_sum``, ``sum``), installed as
  :class:`~anyms.core.attention.AnyMSAttnProcessor`;
- ``ip_adapter_joint``: diffusers' stock IP-Adapter processor with every subject's tokens in one softmax;
- ``none`` (``text_only``): no image term (the text stream of the same processors, exactly plain SD).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from anyms.core.attention import MODES, AnyMSState, install, install_stock
from anyms.core.attention_maps import AttentionMapSettings
from anyms.core.layout import Layout
from anyms.methods.base import (BasePipeline, GenerationConfigError, GenerationResult, GenerationSettings, ModelLoadError,
                                check_local_paths, frozen,
                                peak_memory_bytes)
from anyms.methods.loading import check_hub_cache
from runfolder.references import load_reference

STOCK_JOINT = "ip_adapter_joint"
ATTENTION_KINDS = tuple(m for m in MODES if m not in ("joint",)) + (STOCK_JOINT,)


def load_ip_adapter(pipe, model: Mapping) -> str:
    """``pipe.load_ip_adapter`` of ``model.ip_adapter`` (``repo``, ``subfolder``, ``weight_name``,
    ``image_encoder_folder``); returns the adapter's id for the embedding cache."""
    from anyms.methods.loading import how_to_get

    ip_adapter = model.get("ip_adapter")
    if not ip_adapter:
        raise ModelLoadError(f"model {model['name']!r} has no IP-Adapter (model.ip_adapter is empty)")
    repo = ip_adapter["repo"]
    try:
        pipe.load_ip_adapter(
            repo, subfolder=ip_adapter.get("subfolder"), weight_name=ip_adapter["weight_name"],
            image_encoder_folder=ip_adapter.get("image_encoder_folder", "image_encoder"),
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"model {model['name']!r}: cannot load the IP-Adapter {ip_adapter['weight_name']!r} from {repo!r}; "
            f"{how_to_get('model.ip_adapter.repo', repo)}. ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    return f"{repo}/{ip_adapter.get('subfolder') or ''}/{ip_adapter['weight_name']}"


class AnyMSPipeline(BasePipeline):
    """A diffusers SD/SDXL pipeline with one IP-Adapter loaded, and the AnyMS processors on its UNet.

    ``adapter_id`` names the adapter for the embedding cache; ``default_size`` is the model's native size.
    """

    def __init__(self, pipe, adapter_id: str, default_size: int, plus: bool):
        super().__init__(pipe, default_size)
        self.adapter_id = adapter_id
        self.plus = plus
        self.state: AnyMSState = install(pipe.unet, "fused")
        frozen(pipe.unet)  # the processors just installed too
        self._stock = False
        self._embedding_cache: dict[tuple, torch.Tensor] = {}

    # --- subject embeddings: each reference encoded on its own, cached per (file content, adapter) ---

    def subject_embeddings(self, images: Sequence[Any], cfg: bool) -> torch.Tensor:
        """``[2 if cfg else 1, n, ...]``: each subject's embedding (negative first with CFG), as diffusers'
        ``prepare_ip_adapter_image_embeds`` makes it for one image."""
        per_subject = []
        for image in images:
            key = (self._image_key(image), self.adapter_id, cfg)
            if key not in self._embedding_cache:
                pil = image if isinstance(image, Image.Image) else load_reference(image)
                with torch.no_grad():  # the cache must hold values, not the encoder's autograd graph
                    (emb,) = self.pipe.prepare_ip_adapter_image_embeds(
                        ip_adapter_image=[[pil]], ip_adapter_image_embeds=None, device=self.device,
                        num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                    )
                self._embedding_cache[key] = emb.detach()
            per_subject.append(self._embedding_cache[key])
        return torch.cat(per_subject, dim=1)

    # --- methods ---

    def _use(self, method: str) -> None:
        if method not in ATTENTION_KINDS:
            raise ValueError(f"unknown method attention {method!r}; use one of {ATTENTION_KINDS}")
        if method == STOCK_JOINT:
            if not self._stock:
                install_stock(self.pipe.unet)
                self._stock = True
            return
        if self._stock:
            self.state = install(self.pipe.unet, method)
            self._stock = False
        self.state.mode = method

    def pipeline_kwargs(self, layout: Layout, height: int, width: int) -> dict:
        """Extra keyword arguments of the diffusers pipeline's call (a subclass's hook; none here)."""
        return {}

    def __call__(self, prompt: str, layout: Layout, seed: int, settings: GenerationSettings,
                 attention: str = "fused", record: AttentionMapSettings | None = None) -> GenerationResult:
        """One image. ``attention``: an AnyMS mode (``fused``, ``crop_merge``, ``masked_sum``, ``sum``,
        ``none``) or ``ip_adapter_joint``. Initial noise comes from a CPU generator seeded with ``seed``, so
        a seed gives the same image on any device. ``record``: which attention maps to keep
        (``result.attention_maps``); the image is the same with or without."""
        self._use(attention)
        height = settings.height or self.default_size
        width = settings.width or self.default_size
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        cfg = settings.guidance_scale > 1.0
        embeds = self.subject_embeddings([s.image for s in layout], cfg)
        scales = list(layout.scales if settings.scales is None else settings.scales)
        if len(scales) != len(layout):
            raise ValueError(f"generation.scales has {len(scales)} values for {len(layout)} subjects")
        if attention == STOCK_JOINT:
            if len(set(scales)) > 1:
                raise ValueError("ip_adapter_joint takes one scale for all subjects (diffusers' joint softmax)")
            self.pipe.set_ip_adapter_scale(settings.adapter_scale * scales[0])
        else:
            self.pipe.set_ip_adapter_scale(settings.adapter_scale)
            self.state.layout, self.state.latent_hw, self.state.scales = layout, latent_hw, scales
        recorder = self.attention_recorder(record, prompt, layout, height, width, cfg, settings.steps)
        self._reset_peak_memory()
        start = time.perf_counter()
        with self._recording(recorder, attention):
            out = self.pipe(
                prompt=prompt, negative_prompt=settings.negative_prompt, ip_adapter_image_embeds=[embeds],
                num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale, height=height,
                width=width, generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="pil",
                **self.pipeline_kwargs(layout, height, width),
            )
        seconds = self._elapsed(start)
        return GenerationResult(out.images[0], seconds, peak_memory_bytes(self.device), latent_hw,
                                recorder.result() if recorder is not None else None)


class IPAdapterMethod(AnyMSPipeline):
    """A method on the base model plus ``model.ip_adapter``, with ``method.attention`` as its default."""

    def __init__(self, model: Mapping, name: str, attention: str = "fused", **settings):
        from anyms.methods.loading import load_base

        if attention not in ATTENTION_KINDS:
            raise ValueError(f"method.attention {attention!r}: use one of {ATTENTION_KINDS}")
        pipe, device = load_base(model)
        adapter_id = load_ip_adapter(pipe, model)
        pipe.to(device)
        super().__init__(pipe, adapter_id=adapter_id, default_size=int(model["size"]),
                         plus=bool(model["ip_adapter"].get("plus", False)))
        self.name, self.attention = name, attention

    def __call__(self, prompt: str, layout: Layout, seed: int, settings: GenerationSettings,
                 attention: str | None = None, record: AttentionMapSettings | None = None) -> GenerationResult:
        return super().__call__(prompt, layout, seed, settings, attention=attention or self.attention, record=record)

    @classmethod
    def check(cls, method: Mapping, model: Mapping) -> None:
        if method.get("attention", "fused") not in ATTENTION_KINDS:
            raise GenerationConfigError(f"method.attention {method.get('attention')!r}: use one of {ATTENTION_KINDS}")
        if not model.get("tiny"):
            adapter = model.get("ip_adapter") or {}
            check_local_paths({"model.ip_adapter.repo": adapter.get("repo")})
            where = "/".join(str(p) for p in (adapter.get("subfolder"), adapter.get("weight_name")) if p)
            check_hub_cache("model.ip_adapter.repo", adapter.get("repo"), where)
