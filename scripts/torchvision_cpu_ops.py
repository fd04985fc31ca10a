"""Make PyPI's CUDA-built torchvision importable beside a CPU-only torch.

PyPI's torchvision wheel is built against CUDA; beside the CPU torch wheel its ``_C`` extension does not
load, and ``import torchvision`` then dies on ``register_fake("torchvision::nms")`` because the op was
never defined. Defining ``torchvision::nms`` and ``torchvision::qnms`` (pure PyTorch) before torchvision
is first imported, and letting ``torchvision.ops.nms`` call them, makes torchvision usable: transforms,
box ops, nms and roi_align (its pure-PyTorch path) work; ``io.decode_jpeg`` and ``deform_conv2d`` do not.

``scripts/setup_env.sh`` copies this file into the virtual environment's site-packages with a ``.pth``
line that imports it, and only when plain ``import torchvision`` fails there. Importing this module costs
nothing: it only installs a meta-path finder that acts on the first ``import torchvision``.
"""

from __future__ import annotations

import importlib.abc
import sys

_LIBRARY = None  # keeps the torch.library registration alive for the whole process


def _nms(dets, scores, iou_threshold: float):
    import torch

    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    x0, y0, x1, y1 = dets.unbind(1)
    areas = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    order = scores.argsort(descending=True)
    keep = []
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool, device=dets.device)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x1[i], x1) - torch.maximum(x0[i], x0)).clamp(min=0)
        h = (torch.minimum(y1[i], y1) - torch.maximum(y0[i], y0)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def _qnms(dets, scores, iou_threshold: float):
    return _nms(dets.dequantize(), scores.dequantize(), iou_threshold)


def define_ops() -> None:
    """Define the two ops torchvision's import needs, unless its own extension already did."""
    global _LIBRARY
    import torch

    if _LIBRARY is not None or torch.version.cuda is not None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - probing whether the op exists
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms, "CompositeExplicitAutograd")
    lib.impl("qnms", _qnms, "CompositeExplicitAutograd")
    _LIBRARY = lib


def _assert_defined() -> None:
    """Stands in for torchvision's ``_assert_has_ops``: the ops we define are there; any other op fails
    at its own call with torch's 'no such op' error."""


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    # torchvision imports ``extension`` (which tries to load _C) before ``_meta_registrations`` (which
    # needs the ops): this is the moment to step in.
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision._meta_registrations":
            sys.meta_path.remove(self)
            extension = sys.modules.get("torchvision.extension")
            if extension is not None and not extension._has_ops():
                define_ops()
                extension._assert_has_ops = _assert_defined
        return None  # let the normal finders import it


def install_hook() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


install_hook()
