"""Loading the generation models from config (``conf/model/*.yaml``, built by Hydra's ``_target_``).

The same code loads the real hub models and the tiny random ones: ``tiny: sdxl`` only makes sure the tiny
models exist, in the real hub layout, under ``tiny_root`` first (anyms.tiny.write_tiny_hub, and
anyms.tiny.write_tiny_ms_diffusion for ``method=ms_diffusion``); the paths then go through ``from_pretrained``,
``load_ip_adapter`` and MS-Diffusion's loader exactly as hub ids would.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from anyms.pipeline import AnyMSPipeline, BasePipeline, ModelLoadError

PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# what a method loads on top of the base model (the method config's ``pipeline``, default anyms)
ADAPTERS = ("anyms", "ms_diffusion")


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


def _how_to_get(what: str, repo: str) -> str:
    if os.path.isdir(repo) or repo.startswith((".", "/")):
        return f"the local folder {repo!r} does not hold it: check model.{what}"
    offline = " (HF_HUB_OFFLINE is set, so only the local cache is searched)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (f"download it on a machine with hub access (`huggingface-cli download {repo}`) into the Hugging Face "
            f"cache, or point model.{what} at a local copy{offline}")


def load_pipeline(
    name: str,
    kind: str,
    pretrained: str,
    ip_adapter: dict,
    size: int,
    device: str = "auto",
    dtype: str = "auto",
    variant: str | None = None,
    tiny: str | None = None,
    tiny_root: str | None = None,
    torch_threads: int | None = None,
    ms_diffusion: dict | None = None,
    pipeline: str = "anyms",
) -> BasePipeline:
    """Loads an SD1.5 or SDXL pipeline and one IP-Adapter, and installs the AnyMS processors; or, with
    ``pipeline="ms_diffusion"`` (set by ``method=ms_diffusion``), MS-Diffusion's weights instead of the IP-Adapter.

    ip_adapter: ``repo`` (hub id or folder), ``subfolder``, ``weight_name``, ``image_encoder_folder``
    (as ``load_ip_adapter`` takes them), ``plus`` (a Plus adapter: 16 tokens from the encoder's hidden states).
    ms_diffusion: ``repo`` (hub id or folder), ``subfolder``, ``weight_name`` of ``ms_adapter.bin``,
    ``image_encoder`` (hub id or folder) and ``image_encoder_subfolder``, ``resampler`` sizes,
    ``num_dummy_tokens``, ``reference_size`` (see :func:`anyms.ms_diffusion.load_ms_diffusion_pipeline`);
    ``None`` for models MS-Diffusion has no weights for.
    torch_threads: CPU threads for torch (None: torch's default). Tiny models run fastest on one: their
    ops are too small to gain from threads, and threads waiting on a busy core cost up to 10x.
    """
    import diffusers

    if kind not in PIPELINES:
        raise ValueError(f"model.kind {kind!r}: use one of {sorted(PIPELINES)}")
    if pipeline not in ADAPTERS:
        raise ValueError(f"method.pipeline {pipeline!r}: use one of {ADAPTERS}")
    if pipeline == "ms_diffusion" and not ms_diffusion:
        raise ModelLoadError(
            f"model {name!r} has no MS-Diffusion weights (model.ms_diffusion is empty): the released checkpoint "
            "(doge1516/MS-Diffusion) is for SDXL; use model=sdxl (or model=tiny for a plumbing check)"
        )
    if tiny:
        from anyms.tiny import write_tiny_hub, write_tiny_ms_diffusion

        write_tiny_hub(tiny_root)
        if pipeline == "ms_diffusion":
            write_tiny_ms_diffusion(tiny_root)
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    cls = getattr(diffusers, PIPELINES[kind])
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd15" else {"add_watermarker": False}
    try:
        pipe = cls.from_pretrained(pretrained, torch_dtype=torch_dtype, variant=variant, **extra)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model {name!r}: cannot load the pipeline {pretrained!r}; {_how_to_get('pretrained', pretrained)}. "
                             f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if pipeline == "ms_diffusion":
        from anyms.ms_diffusion import load_ms_diffusion_pipeline

        pipe.to(dev)
        return load_ms_diffusion_pipeline(pipe, name=name, default_size=size, **ms_diffusion)
    repo = ip_adapter["repo"]
    try:
        pipe.load_ip_adapter(
            repo, subfolder=ip_adapter.get("subfolder"), weight_name=ip_adapter["weight_name"],
            image_encoder_folder=ip_adapter.get("image_encoder_folder", "image_encoder"),
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"model {name!r}: cannot load the IP-Adapter {ip_adapter['weight_name']!r} from {repo!r}; "
            f"{_how_to_get('ip_adapter.repo', repo)}. ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    pipe.to(dev)
    adapter_id = f"{repo}/{ip_adapter.get('subfolder') or ''}/{ip_adapter['weight_name']}"
    return AnyMSPipeline(pipe, adapter_id=adapter_id, default_size=size, plus=bool(ip_adapter.get("plus", False)))


def tiny_root_default() -> str:
    return str(Path(os.environ.get("ANYMS_CACHE", ".cache/anyms")) / "tiny")
