"""Loading the base model (``conf/model/*.yaml``) that every method builds on, and the helpers the methods share.

The same code loads the real hub models and the tiny random ones: ``tiny: sdxl`` only makes sure the tiny
models exist, in the real hub layout, under ``tiny_root`` first (:func:`anyms.tiny.write_tiny_hub`); the paths
then go through ``from_pretrained`` exactly as hub ids would. What a method adds on top (the IP-Adapter, its own
checkpoint) it loads itself (see :mod:`anyms.methods.base`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from anyms.methods.base import GenerationConfigError, ModelLoadError

PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, fp32 elsewhere (fp16 matmuls on CPU are slow or unsupported)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    except KeyError:
        raise ValueError(f"model.dtype {dtype!r} is not one of auto, fp16, bf16, fp32") from None


def how_to_get(what: str, repo: str) -> str:
    """The end of a load error: how to get ``repo``, named by its config field ``what``."""
    if os.path.isdir(repo) or repo.startswith((".", "/")):
        return f"the local folder {repo!r} does not hold it: check {what}"
    offline = " (HF_HUB_OFFLINE is set, so only the local cache is searched)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (f"download it on a machine with hub access (`huggingface-cli download {repo}`) into the Hugging Face "
            f"cache, or point {what} at a local copy{offline}")


_how_to_get = how_to_get  # the name before issue 17


def prepare_runtime(model: Mapping) -> tuple[torch.device, torch.dtype]:
    """The base model's device and dtype as they resolve here; sets torch's CPU threads (``torch_threads``;
    tiny models run fastest on one: their ops are too small to gain from threads)."""
    if model.get("torch_threads"):
        torch.set_num_threads(int(model["torch_threads"]))
    dev = resolve_device(str(model.get("device") or "auto"))
    return dev, resolve_dtype(str(model.get("dtype") or "auto"), dev)


def load_base(model: Mapping) -> tuple:
    """``(pipe, device)``: the base diffusers pipeline (SD1.5 or SDXL) of a model config, nothing added (the
    method moves it to ``device`` after adding its weights, as diffusers loads adapters on the CPU copy).

    model: the resolved ``conf/model/*.yaml`` (``name``, ``kind``, ``pretrained``, ``variant``, ``device``,
    ``dtype``, ``tiny``, ``tiny_root``, ``torch_threads``).
    """
    import diffusers

    name, kind, pretrained = model["name"], model["kind"], model["pretrained"]
    if kind not in PIPELINES:
        raise ValueError(f"model.kind {kind!r}: use one of {sorted(PIPELINES)}")
    if model.get("tiny"):
        from anyms.tiny import write_tiny_hub

        write_tiny_hub(model["tiny_root"])
    dev, torch_dtype = prepare_runtime(model)
    cls = getattr(diffusers, PIPELINES[kind])
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd15" else {"add_watermarker": False}
    try:
        pipe = cls.from_pretrained(pretrained, torch_dtype=torch_dtype, variant=model.get("variant"), **extra)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model {name!r}: cannot load the pipeline {pretrained!r}; {how_to_get('model.pretrained', pretrained)}. "
                             f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return pipe, dev


def check_hub_cache(field: str, repo, filename: str) -> None:
    """Offline (``HF_HUB_OFFLINE``), a hub id must have ``filename`` in the local cache: else one error naming the
    field and how to get it, before anything is written (the loader would fail only after the plan was)."""
    import os

    from huggingface_hub import constants, try_to_load_from_cache

    if repo is None or Path(str(repo)).expanduser().exists() or not constants.HF_HUB_OFFLINE:
        return
    try:
        found = try_to_load_from_cache(str(repo), filename)
    except ValueError:  # not a valid repo id: check_local_paths already refused it as a path
        found = None
    if not isinstance(found, str) or not os.path.exists(found):
        raise GenerationConfigError(f"{field}: {repo} is not in the Hugging Face cache ({filename} missing) and "
                                    f"HF_HUB_OFFLINE is set; {how_to_get(field, str(repo))}")
