"""The method protocol: what every method (``anyms/methods/<name>.py`` + ``conf/method/<name>.yaml``) answers.

A method is one module and one config. The config builds it with Hydra's ``_target_`` from the base model's
config: the generation stage calls ``instantiate(cfg.method, model=<resolved cfg.model>)``, so the class's
constructor gets the method's own keys plus ``model``; it loads the base (:func:`anyms.methods.loading.load_base`)
and whatever it needs on top (an IP-Adapter, its own checkpoint; its weight locations live in its config, per
base model: :func:`weights_for`). Nothing outside the method's module names it. The class answers:

- ``check(method, model)`` (classmethod, before anything loads): raise :class:`ModelLoadError` /
  ``ValueError`` naming the field when it cannot run on this base model (no weights for it, a local path that
  does not exist);
- ``identity(method, model)`` (classmethod, before anything loads): ``(model_ids, method_ids)``, what decides
  its images, hashed into every image's config hash and written to its records (the base model's identity
  is given; a method drops what it does not use, adds its weights, or names another base: GLIGEN);
- ``__call__(prompt, layout, seed, settings, record=None) -> GenerationResult``: one image; the initial noise
  from a CPU generator seeded with ``seed``; ``record`` (:class:`~anyms.core.attention_maps.AttentionMapSettings`)
  asks for attention maps, which must not change the image;
- ``generate(prompt, layout, seeds, settings, record=None)``: a batch of seeds (default: one call per seed);
- ``device``, ``dtype``, ``cross_attention_grids(height, width)`` (the token grids of its cross-attention).

Attention maps: the recorder (:mod:`anyms.core.attention_maps`) wraps every cross-attention processor and
asks it, never testing its class: a processor that records defines ``split_encoder_states(encoder_hidden_states)``
and ``subject_attention_weights(attn, query, image_input, layout, grid, rows, split_heads)`` (see
:class:`anyms.core.attention_maps.RecordableProcessor`). :class:`BasePipeline` below gives the shared parts.
"""

from __future__ import annotations

import hashlib
import re
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from anyms.core.attention_maps import AttentionMapSettings, AttentionRecorder, phrase_cut_off, phrase_token_positions
from anyms.core.layout import Layout, grid_levels
from runfolder import file_digest


class GenerationConfigError(ValueError):
    """A generation setting that cannot run; the one-line message names the field and the fix. Raised before
    any model loads."""


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
        cut_off = [phrase_cut_off(self.pipe.tokenizer, prompt, s.phrase) for s in layout]
        return AttentionRecorder(record, layout, grids, latent, positions, cfg, cut_off=cut_off)

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



    # --- the protocol's defaults (see the module) ---

    @classmethod
    def check(cls, method: Mapping, model: Mapping) -> None:
        """Before anything loads: raise naming the field when the method cannot run on this base model."""

    @classmethod
    def text_encoders(cls, method: Mapping, model: Mapping) -> list[tuple[str, str, str]]:
        """Before anything loads: the tokenizers of the text encoders the prompt goes through, as ``(config
        field, repo id or folder, subfolder)``, for checking prompts against their token limits; by default
        the base model's (SDXL has two)."""
        subfolders = ("tokenizer", "tokenizer_2") if model.get("kind") == "sdxl" else ("tokenizer",)
        return [("model.pretrained", str(model["pretrained"]), sub) for sub in subfolders]

    @classmethod
    def identity(cls, method: Mapping, model_ids: Mapping) -> tuple[dict, dict]:
        """``(model_ids, method_ids)``: what decides the images; by default the base model's identity and the
        method's config without ``_target_``."""
        return dict(model_ids), {k: v for k, v in method.items() if k != "_target_"}

    def generate(self, prompt: str, layout: Layout, seeds: Sequence[int], settings: "GenerationSettings",
                 record: AttentionMapSettings | None = None) -> list[GenerationResult]:
        """A batch of seeds, one image each (the same images as one call per seed)."""
        return [self(prompt, layout, seed, settings, record=record) for seed in seeds]


def weights_for(method: Mapping, model: Mapping, what: str) -> dict:
    """A method's weight locations for this base model: ``method.weights[<model.name>]``, with one message naming
    the base models it has weights for when this one is not among them."""
    table = method.get("weights") or {}
    entry = table.get(model["name"])
    if not entry:
        have = ", ".join(f"model={k}" for k, v in table.items() if v) or "none"
        raise ModelLoadError(f"method {method['name']!r} has no {what} weights for model {model['name']!r} "
                             f"(method.weights.{model['name']} is empty); it has weights for: {have}")
    return dict(entry)


def own_weights(cls, name: str, weights: Mapping | None, model: Mapping, write_tiny) -> dict:
    """What every method with weights of its own does first: its ``check`` (before anything loads), this base
    model's entry of its weight table, and its tiny random weights written when the base model is a tiny one."""
    method = {"name": name, "weights": weights}
    cls.check(method, model)
    entry = weights_for(method, model, cls.WEIGHTS)
    if model.get("tiny"):
        write_tiny(model["tiny_root"])
    return entry


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_local_paths(fields: Mapping[str, Any]) -> None:
    """Every value that is a local path (not a hub id ``owner/name``) must exist; ``fields`` maps the config
    field's name to its value (None: not set)."""
    for key, value in fields.items():
        if value is None:
            continue
        value = str(value)
        local = value.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(value)
        if local and not Path(value).expanduser().exists():
            raise GenerationConfigError(
                f"{key}: {value} does not exist; point it at the local folder that holds the weights, or give "
                "a hub id (owner/name)")
