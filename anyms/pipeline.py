"""One entry point from (prompt, layout, seed, settings, method) to an image, on diffusers' own pipelines.

The stock ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` runs the denoising loop (schedulers,
guidance and callbacks stay diffusers'); AnyMS changes only the cross-attention processors and what
reaches them. Methods:

- ``anyms`` and friends: an :data:`anyms.attention.MODES` value (``fused``, ``crop_merge``, ``masked_sum``,
  ``sum``), installed as :class:`~anyms.attention.AnyMSAttnProcessor`;
- ``ip_adapter_joint``: diffusers' stock IP-Adapter processor with every subject's tokens in one softmax;
- ``text_only``: no image term (the ``none`` mode: the text stream of the same processors, exactly plain SD).

MS-Diffusion (``method=ms_diffusion``) has its own weights and processors: :class:`anyms.ms_diffusion.MSDiffusionPipeline`,
a sibling of :class:`AnyMSPipeline` on the same :class:`BasePipeline` (same call, seeds, timing and records).
"""

from __future__ import annotations

import hashlib
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from anyms.attention import MODES, AnyMSState, install, uninstall
from anyms.attention_maps import AttentionMapSettings, AttentionRecorder, phrase_token_positions
from anyms.layout import Layout, grid_levels
from runfolder import file_digest
from runfolder.references import load_reference

STOCK_JOINT = "ip_adapter_joint"
ATTENTION_KINDS = tuple(m for m in MODES if m not in ("joint",)) + (STOCK_JOINT,)


class ModelLoadError(RuntimeError):
    """A model that could not be loaded; the message names it and how to get it."""


@dataclass
class GenerationSettings:
    steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str = "monochrome, lowres, bad anatomy, worst quality, low quality"
    height: int | None = None  # None: the model's default size
    width: int | None = None
    adapter_scale: float = 1.0  # multiplies every subject's scale (set_ip_adapter_scale)
    scales: Sequence[float] | None = None  # per subject; None: each Subject.scale
    # MS-Diffusion only: the scale used instead of adapter_scale when a subject's box is the whole image
    full_frame_adapter_scale: float | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"generation.steps must be >= 1, got {self.steps}")
        for side in ("height", "width"):
            v = getattr(self, side)
            if v is not None and (v < 8 or v % 8):
                raise ValueError(f"generation.{side} must be a multiple of 8 (the VAE's factor), got {v}")


@dataclass
class GenerationResult:
    image: Image.Image
    seconds: float
    peak_memory_bytes: int
    latent_hw: tuple[int, int]
    attention_maps: dict | None = None  # the recorder's arrays (runfolder.attention_maps) when recording


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated since the last reset; CPU: the process's peak RSS (never resets)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def frozen(*modules):
    """Inference only: every parameter with ``requires_grad=False``, so that no call records an autograd graph
    (a cached output holding the graph keeps every activation of the encoder alive: 0.76 GiB per ViT-H/14
    reference in fp16). Non-modules are skipped."""
    for m in modules:
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
            m.eval()
    return modules


class BasePipeline:
    """What every method's pipeline shares: the diffusers pipeline, its device and dtype, its grids, the
    image cache key and the timing of one call. Subclasses implement
    ``__call__(prompt, layout, seed, settings, attention) -> GenerationResult``."""

    def __init__(self, pipe, default_size: int):
        self.pipe = pipe
        self.default_size = default_size
        pipe.set_progress_bar_config(disable=True)
        frozen(*pipe.components.values())

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def cross_attention_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """The token grids the UNet's cross-attention layers run at, finest first."""
        latent = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        levels = grid_levels(latent)
        blocks = self.pipe.unet.config.down_block_types
        with_cross = [levels[i] for i, b in enumerate(blocks) if "CrossAttn" in b]
        with_cross.append(levels[len(blocks) - 1])  # the mid block
        return sorted(set(with_cross), key=lambda hw: -hw[0] * hw[1])

    @staticmethod
    def _image_key(image) -> str:
        if isinstance(image, Image.Image):
            return hashlib.sha256(image.tobytes()).hexdigest() + f"{image.size}{image.mode}"
        return file_digest(image)

    def attention_recorder(self, record: AttentionMapSettings | None, prompt: str, layout: Layout,
                           height: int, width: int, cfg: bool, steps: int) -> AttentionRecorder | None:
        """A recorder of this call's attention maps (``None`` when ``record`` is ``None``: nothing recorded)."""
        if record is None:
            return None
        record.check_steps(steps)
        latent = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        grids = record.grids(latent, self.cross_attention_grids(height, width))
        positions = [phrase_token_positions(self.pipe.tokenizer, prompt, s.phrase) for s in layout]
        return AttentionRecorder(record, layout, grids, latent, positions, cfg)

    def _recording(self, recorder: AttentionRecorder | None, method: str):
        return recorder.attached(self.pipe.unet, method) if recorder is not None else nullcontext()

    def _reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)

    def _elapsed(self, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


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
                uninstall(self.pipe.unet)
                self._stock = True
            return
        if self._stock:
            self.state = install(self.pipe.unet, method)
            self._stock = False
        self.state.mode = method

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
            )
        seconds = self._elapsed(start)
        return GenerationResult(out.images[0], seconds, peak_memory_bytes(self.device), latent_hw,
                                recorder.result() if recorder is not None else None)
