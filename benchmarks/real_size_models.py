"""The paper's models at their real architectures with **random weights**, written in the real hub layouts, for
``make check-real-size`` (:mod:`benchmarks.real_size`).

=========================================  ===================================================  ==========================
folder under ``<root>``                    as the hub repo                                      read by
=========================================  ===================================================  ==========================
``stable-diffusion-xl-base-1.0/``          stabilityai/stable-diffusion-xl-base-1.0: model_index,  ``model.pretrained``
                                           unet, vae, text_encoder(_2), tokenizer(_2), scheduler
``IP-Adapter/``                            h94/IP-Adapter: ``models/image_encoder`` (ViT-H/14)    ``model.ip_adapter.repo``
                                           and ``sdxl_models/ip-adapter-plus_sdxl_vit-h``
``MS-Diffusion/ms_adapter.bin``            doge1516/MS-Diffusion (the released resampler sizes)  ``method.weights.sdxl.repo``
``CLIP-ViT-bigG-14-laion2B-39B-b160k/``    laion's whole CLIP bigG/14 (text and vision towers)   ``method.weights.sdxl.image_encoder``
``evaluators/``                            ``grounding-dino-tiny/`` (SwinT, transformers layout) ``eval.detector``,
                                           and ``sam_vit_h_4b8939.pth``                           ``eval.segmenter``
=========================================  ===================================================  ==========================

CLIP ViT-B/32, DINO ViT-S/16 and DreamSim's ensemble are :func:`benchmarks.evaluate.write_random_scorer_checkpoints`'s
(``<cache>/bench_evaluators``), shared with the evaluation benchmark.

The big models are never materialized: each is built on the ``meta`` device from its config, and its
safetensors file is written one random tensor at a time (:func:`write_random_safetensors`), so writing SDXL
takes the memory of its largest tensor. Weights are stored in bf16 (the loaders cast them to the run's dtype).
Random values: matrices ``N(0, 1/fan_in)``, norms at identity, biases zero, vectors ``N(0, 0.02)``, so that
activations stay finite through the whole network. Nothing here is a quality model.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

SDXL_DIR = "stable-diffusion-xl-base-1.0"
IP_ADAPTER_DIR = "IP-Adapter"
IP_ADAPTER_SUBFOLDER, IP_ADAPTER_WEIGHT = "sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors"
IMAGE_ENCODER_FOLDER = "models/image_encoder"
MS_DIFFUSION_DIR, MS_DIFFUSION_WEIGHT = "MS-Diffusion", "ms_adapter.bin"
BIGG_DIR = "CLIP-ViT-bigG-14-laion2B-39B-b160k"
EVALUATORS_DIR = "evaluators"
GROUNDING_DINO_DIR, SAM_FILE = "grounding-dino-tiny", "sam_vit_h_4b8939.pth"
STORE_DTYPE = torch.bfloat16

# --- the real configs (architecture keys of the hub repos' config files) --------------------------------------

# stabilityai/stable-diffusion-xl-base-1.0
SDXL_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SDXL_TEXT_ENCODER_2 = dict(SDXL_TEXT_ENCODER, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
SDXL_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    use_karras_sigmas=False,
)
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True, "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# h94/IP-Adapter models/image_encoder: OpenCLIP ViT-H/14 vision tower with projection
VIT_H_14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
                image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (a whole CLIPModel)
BIGG_14 = dict(
    projection_dim=1280,
    text_config=dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                     projection_dim=1280),
    vision_config=dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                       patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280),
)
# IP-Adapter Plus SDXL ViT-H: perceiver resampler 1280 wide, 20 heads of 64, 16 queries
IP_PLUS_RESAMPLER = dict(dim=1280, heads=20, tokens=16)


@dataclass(frozen=True)
class Sizes:
    """The architectures written. :data:`REAL` is the paper's; tests write a tiny one through the same code."""

    unet: dict
    vae: dict = field(default_factory=lambda: dict(SDXL_VAE))
    text_encoder: dict = field(default_factory=lambda: dict(SDXL_TEXT_ENCODER))
    text_encoder_2: dict = field(default_factory=lambda: dict(SDXL_TEXT_ENCODER_2))
    image_encoder: dict = field(default_factory=lambda: dict(VIT_H_14))
    bigg: dict = field(default_factory=lambda: json.loads(json.dumps(BIGG_14)))
    ip_resampler: dict = field(default_factory=lambda: dict(IP_PLUS_RESAMPLER))
    ms_resampler: dict | None = None  # None: MS-Diffusion's released sizes (anyms.methods.ms_diffusion.RESAMPLER_DEFAULTS)
    size: int = 1024


def real_sizes() -> Sizes:
    from benchmarks.unet_step import SDXL_UNET

    return Sizes(unet=dict(SDXL_UNET))


# --- writing random weights one tensor at a time ---------------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def _norm_owners(model: torch.nn.Module) -> set[str]:
    """Names of the modules whose weight is a scale (LayerNorm, GroupNorm and the like): set to 1, not random."""
    return {name for name, m in model.named_modules()
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(m).__name__.lower()}


def random_value(name: str, like: torch.Tensor, norms: set[str], generator: torch.Generator,
                 dtype: torch.dtype = STORE_DTYPE) -> torch.Tensor:
    """A random value for the parameter ``name`` shaped like ``like`` (see the module docstring); a tensor that
    is not on ``meta`` (a buffer with its value) is kept, floats cast to ``dtype``."""
    if like.device.type != "meta":
        return like.detach().to(dtype) if like.is_floating_point() else like.detach()
    owner, _, kind = name.rpartition(".")
    shape = tuple(like.shape)
    if owner in norms and kind == "weight":
        return torch.ones(shape, dtype=dtype)
    if kind == "bias" or owner in norms:
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 0:  # CLIP's logit scale: a trained CLIP's log(100)
        return torch.full(shape, math.log(100.0), dtype=dtype)
    std = (math.prod(shape[1:]) ** -0.5) if len(shape) >= 2 else 0.02
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std).to(dtype)


def write_random_safetensors(path: str | Path, model: torch.nn.Module, seed: int = 0,
                             dtype: torch.dtype = STORE_DTYPE, key_prefix: str = "") -> Path:
    """``model.state_dict()`` (parameters on ``meta``) written as a safetensors file of random values, one tensor
    at a time: the header first (every name, dtype, shape and offset), then each tensor's bytes. ``key_prefix``
    goes before every name in the file (the hub files' names where the library's differ)."""
    path = Path(path)
    state = model.state_dict(keep_vars=True)
    norms = _norm_owners(model)
    header, offset = {}, 0
    for name, t in state.items():
        out = dtype if t.is_floating_point() else t.dtype
        nbytes = t.numel() * torch.empty((), dtype=out).element_size()
        header[key_prefix + name] = {"dtype": _ST_DTYPES[out], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in state.items():
            value = random_value(name, t, norms, generator, dtype).contiguous()
            if value.numel():
                f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
    return path


def _empty(build):
    """``build()`` with parameters on ``meta`` (buffers real): shapes and names only, no memory."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


# --- the generation models ----------------------------------------------------------------------------------

# the hub files name CLIPTextModel's weights "text_model.*"; transformers 5's module has no such level (it maps
# the names when loading), so they are written as the hub files have them
HUB_KEY_PREFIX = {"CLIPTextModel": "text_model."}


def _transformers_model(cls_name: str, config, folder: Path, seed: int) -> None:
    import transformers

    config.architectures = [cls_name]
    config.save_pretrained(folder)
    model = _empty(lambda: getattr(transformers, cls_name)(config))
    write_random_safetensors(folder / "model.safetensors", model, seed, key_prefix=HUB_KEY_PREFIX.get(cls_name, ""))


def _diffusers_model(cls_name: str, config: dict, folder: Path, seed: int):
    import diffusers

    cls = getattr(diffusers, cls_name)
    model = _empty(lambda: cls.from_config(config))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    write_random_safetensors(folder / "diffusion_pytorch_model.safetensors", model, seed)
    return model


def write_sdxl(folder: Path, sizes: Sizes, seed: int = 0) -> None:
    """The SDXL base 1.0 pipeline folder: every component's config and random weights, CLIP's real tokenizer
    (tokenizer_2 pads with ``!``, as SDXL's does)."""
    import tempfile

    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTokenizer

    from runfolder.clip_vocab import write_clip_tokenizer_files

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(SDXL_MODEL_INDEX, indent=2))
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(folder / "scheduler")
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp)
        CLIPTokenizer.from_pretrained(tmp, model_max_length=77).save_pretrained(folder / "tokenizer")
        CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token="!").save_pretrained(folder / "tokenizer_2")
    _transformers_model("CLIPTextModel", CLIPTextConfig(**sizes.text_encoder), folder / "text_encoder", seed + 1)
    _transformers_model("CLIPTextModelWithProjection", CLIPTextConfig(**sizes.text_encoder_2), folder / "text_encoder_2",
                        seed + 2)
    _diffusers_model("AutoencoderKL", sizes.vae, folder / "vae", seed + 3)
    _diffusers_model("UNet2DConditionModel", sizes.unet, folder / "unet", seed + 4)


def _meta_unet(sizes: Sizes):
    from diffusers import UNet2DConditionModel

    return _empty(lambda: UNet2DConditionModel.from_config(sizes.unet))


def write_ip_adapter(folder: Path, sizes: Sizes, seed: int = 0) -> None:
    """h94/IP-Adapter's ``models/image_encoder`` (ViT-H/14) and ``sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors``
    (the original ``image_proj`` + ``ip_adapter`` format, flattened as the released .safetensors)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig

    from anyms.tiny import _flatten_ip_adapter
    from benchmarks.unet_step import ModelSpec, ip_adapter_plus_state_dict

    _transformers_model("CLIPVisionModelWithProjection", CLIPVisionConfig(**sizes.image_encoder),
                        folder / IMAGE_ENCODER_FOLDER, seed + 5)
    unet = _meta_unet(sizes)
    r = sizes.ip_resampler
    spec = ModelSpec("real_size", sizes.unet, sizes.size, image_embed_dim=sizes.image_encoder["hidden_size"],
                     image_embed_tokens=0, resampler_dim=r["dim"], resampler_heads=r["heads"], sdxl=True)
    state = ip_adapter_plus_state_dict(unet, spec, tokens=r["tokens"], seed=seed + 6)
    flat = {k: v.to(STORE_DTYPE) for k, v in _flatten_ip_adapter(state).items()}
    (folder / IP_ADAPTER_SUBFOLDER).mkdir(parents=True, exist_ok=True)
    save_file(flat, str(folder / IP_ADAPTER_SUBFOLDER / IP_ADAPTER_WEIGHT))


def write_bigg(folder: Path, sizes: Sizes, seed: int = 0) -> None:
    """laion's CLIP ViT-bigG/14 repo: the whole ``CLIPModel`` (MS-Diffusion's loader takes its vision tower)."""
    from transformers import CLIPConfig

    _transformers_model("CLIPModel", CLIPConfig(**sizes.bigg), folder, seed + 7)


def write_ms_diffusion(folder: Path, sizes: Sizes, seed: int = 0) -> None:
    """doge1516/MS-Diffusion's ``ms_adapter.bin`` at the released resampler sizes, for this UNet, the SDXL first
    text encoder (phrase embeddings) and the bigG vision tower."""
    from transformers import CLIPConfig, CLIPTextConfig

    from anyms.methods.ms_diffusion import RESAMPLER_DEFAULTS
    from anyms.methods.ms_diffusion import random_ms_diffusion_state_dict

    unet = _meta_unet(sizes)
    vision = CLIPConfig(**sizes.bigg).vision_config
    state = random_ms_diffusion_state_dict(unet, CLIPTextConfig(**sizes.text_encoder), vision, seed=seed + 8,
                                           resampler=sizes.ms_resampler or dict(RESAMPLER_DEFAULTS))
    cast = {part: ({k: v.to(STORE_DTYPE) for k, v in value.items()} if isinstance(value, dict) else value.to(STORE_DTYPE))
            for part, value in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(cast, folder / MS_DIFFUSION_WEIGHT)


# --- the evaluators ------------------------------------------------------------------------------------------

def write_grounding_dino(folder: Path, words, seed: int = 0, tiny: bool = False) -> None:
    """``IDEA-Research/grounding-dino-tiny``'s architecture (transformers' default ``GroundingDinoConfig``: Swin-T,
    BERT-base text encoder) with random weights and its processor (800/1333 px), saved with ``save_pretrained``;
    the tokenizer is a BERT tokenizer over ``words`` at bert-base-uncased's special ids. ``tiny``: the tests' tiny one."""
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    from eval.tiny_grounding import DEFAULT_WORDS, write_bert_vocab, write_tiny_grounding_dino

    words = tuple(DEFAULT_WORDS) + tuple(words)
    if tiny:
        write_tiny_grounding_dino(folder, words, seed=seed)
        return
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab=str(write_bert_vocab(folder / "vocab.txt", words)))
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(GroundingDinoConfig()).eval()
    model.save_pretrained(folder)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)


def write_sam(path: Path, seed: int = 0, tiny: bool = False) -> None:
    """``sam_vit_h_4b8939.pth``: segment-anything's ViT-H state dict (fp32, as released), random."""
    if tiny:
        from eval.tiny_grounding import write_tiny_sam

        write_tiny_sam(path, seed=seed)
        return
    from segment_anything import sam_model_registry

    model = _empty(lambda: sam_model_registry["vit_h"](checkpoint=None))
    norms, generator = _norm_owners(model), torch.Generator().manual_seed(seed)
    state = {k: random_value(k, v, norms, generator, torch.float32) for k, v in model.state_dict(keep_vars=True).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


# --- all of it, once --------------------------------------------------------------------------------------

def write_real_size_models(root: str | Path, words=(), sizes: Sizes | None = None, seed: int = 0,
                           tiny_evaluators: bool = False, log=print) -> dict[str, Path]:
    """Writes each folder once (a ``.complete`` marker; a crash leaves nothing half-written) and returns their
    paths: ``sdxl``, ``ip_adapter``, ``ms_diffusion``, ``bigg``, ``evaluators``."""
    import time

    from runfolder import write_folder_once

    root = Path(root)
    sizes = sizes or real_sizes()
    parts = {
        "sdxl": (SDXL_DIR, lambda tmp: write_sdxl(tmp, sizes, seed)),
        "ip_adapter": (IP_ADAPTER_DIR, lambda tmp: write_ip_adapter(tmp, sizes, seed)),
        "bigg": (BIGG_DIR, lambda tmp: write_bigg(tmp, sizes, seed)),
        "ms_diffusion": (MS_DIFFUSION_DIR, lambda tmp: write_ms_diffusion(tmp, sizes, seed)),
        "evaluators": (EVALUATORS_DIR, lambda tmp: (write_grounding_dino(tmp / GROUNDING_DINO_DIR, words, seed, tiny_evaluators),
                                                    write_sam(tmp / SAM_FILE, seed, tiny_evaluators))),
    }
    out = {}
    for key, (name, write) in parts.items():
        if not (root / name / ".complete").exists():
            start = time.perf_counter()
            log(f"  writing {name} (random weights, once) ...")
            write_folder_once(root / name, write, f"random real-size weights written by benchmarks.real_size_models ({key})")
            log(f"  wrote {name} in {time.perf_counter() - start:.0f} s")
        out[key] = root / name
    return out
