"""Random evaluator checkpoints written in the real layouts, for tests and CI on a machine with no model hub.

Each writer builds a model from a config with a fixed seed, saves it to a folder in the layout that the
real loading code reads (the layout of the real hub repo or cache), and returns what the scorers of
:mod:`eval.similarity` take to load it back through that code:

=================================  ==============================================  =================================
writer                             layout                                          load with
=================================  ==============================================  =================================
:func:`write_tiny_open_clip`       open_clip hub repo: ``open_clip_config.json``   ``ClipScorer("local-dir:<dir>")``
                                   + ``open_clip_model.safetensors``; and a model  or, after
                                   config JSON for ``open_clip.add_model_config``  ``add_model_config``,
                                                                                   ``ClipScorer(name, pretrained=file)``
:func:`write_transformers_clip`    transformers ``CLIPModel`` + ``CLIPProcessor``  ``CLIPModel.from_pretrained(dir)``
                                   folder holding the same weights as an open_clip (e.g. torchmetrics' CLIPScore)
                                   folder (converted), CLIP's real BPE tokenizer
:func:`write_tiny_dino`            transformers ``save_pretrained`` folder         ``DinoScorer(dir)``
                                   (``facebook/dino-vits16`` layout)
:func:`write_tiny_dino_timm`       timm hub layout (``config.json`` +              ``DinoScorer("local-dir:<dir>",
                                   ``model.safetensors``)                          backend="timm")``
:func:`write_dreamsim_checkpoints` dreamsim ``cache_dir`` (see below)              ``DreamSimScorer(type, cache_dir)``
=================================  ==============================================  =================================

CLIP and DINO are tiny by default (``real_size=True`` builds the real ViT-B/32 or ViT-S/16 architecture,
for timing). DreamSim's loaders hard-code ViT-B backbones and load them strictly, so its checkpoints are
**real-size architectures with random weights** (about 350 MB a backbone); a single-backbone type
(``open_clip_vitb32``, ViT-B/32) writes and runs in seconds, the ensemble (three ViT-B/16) in tens of
seconds. Nothing here is a quality model: every number they give is noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from runfolder.clip_vocab import write_clip_tokenizer_files

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CLIP_NAME = "anyms-tiny-clip"

# A tiny CLIP in open_clip's model-config format: real 224 px input, real 77-token context and 49,408-token
# vocabulary (so open_clip's own tokenizer applies), two narrow layers per tower, QuickGELU like OpenAI CLIP.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class OpenClipCheckpoint:
    folder: Path  # open_clip hub layout
    checkpoint: Path  # the state dict file (safetensors)
    config_file: Path  # model config JSON for open_clip.add_model_config
    config_name: str  # the model name that config registers

    @property
    def model_name(self) -> str:
        """The ``local-dir:`` model name that loads the folder."""
        return f"local-dir:{self.folder}"


def write_tiny_open_clip(folder: str | Path, seed: int = 0, real_size: bool = False) -> OpenClipCheckpoint:
    """A random open_clip CLIP (``TINY_CLIP_CFG``, or ViT-B-32-quickgelu with ``real_size``) saved in the
    layout of an open_clip hub repo, plus its model config as ``model_configs/<name>.json``."""
    import open_clip
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    cfg = open_clip.get_model_config("ViT-B-32-quickgelu") if real_size else json.loads(json.dumps(TINY_CLIP_CFG))
    name = "anyms-random-ViT-B-32-quickgelu" if real_size else TINY_CLIP_NAME
    folder = Path(folder)
    (folder / "model_configs").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIP(**cfg)
    with torch.no_grad():  # a trained CLIP's temperature (100), not open_clip's init value
        model.logit_scale.fill_(torch.log(torch.tensor(100.0)))
    checkpoint = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    preprocess = {
        "size": cfg["vision_cfg"]["image_size"],
        "mode": "RGB",
        "mean": list(OPENAI_CLIP_MEAN),
        "std": list(OPENAI_CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
    config_file = folder / "model_configs" / f"{name}.json"
    config_file.write_text(json.dumps(cfg, indent=2))
    return OpenClipCheckpoint(folder, checkpoint, config_file, name)


def hf_cache_snapshot(cache_dir: str | Path, repo_id: str, commit: str = "0" * 40) -> Path:
    """The snapshot folder of ``repo_id`` in a Hugging Face hub cache (``models--org--name/snapshots/<commit>``
    with ``refs/main`` pointing at it), created empty: files written into it are what
    ``hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=True)`` returns, as if downloaded."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# ---------------------------------------------------------------------------------- transformers CLIP


def _open_clip_to_transformers_state(sd: dict, cfg: dict) -> dict:
    """open_clip CLIP (ViT vision tower, built-in text tower) state dict -> transformers CLIPModel's."""
    out = {"logit_scale": sd["logit_scale"]}
    towers = {
        "vision_model": ("visual.transformer.resblocks", cfg["vision_cfg"]["layers"]),
        "text_model": ("transformer.resblocks", cfg["text_cfg"]["layers"]),
    }
    for hf, (oc, layers) in towers.items():
        for i in range(layers):
            src, dst = f"{oc}.{i}", f"{hf}.encoder.layers.{i}"
            for p in ("weight", "bias"):
                q, k, v = sd[f"{src}.attn.in_proj_{p}"].chunk(3)
                out[f"{dst}.self_attn.q_proj.{p}"], out[f"{dst}.self_attn.k_proj.{p}"] = q, k
                out[f"{dst}.self_attn.v_proj.{p}"] = v
                out[f"{dst}.self_attn.out_proj.{p}"] = sd[f"{src}.attn.out_proj.{p}"]
                out[f"{dst}.layer_norm1.{p}"] = sd[f"{src}.ln_1.{p}"]
                out[f"{dst}.layer_norm2.{p}"] = sd[f"{src}.ln_2.{p}"]
                out[f"{dst}.mlp.fc1.{p}"] = sd[f"{src}.mlp.c_fc.{p}"]
                out[f"{dst}.mlp.fc2.{p}"] = sd[f"{src}.mlp.c_proj.{p}"]
    for p in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{p}"] = sd[f"visual.ln_pre.{p}"]
        out[f"vision_model.post_layernorm.{p}"] = sd[f"visual.ln_post.{p}"]
        out[f"text_model.final_layer_norm.{p}"] = sd[f"ln_final.{p}"]
    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    out["visual_projection.weight"] = sd["visual.proj"].T
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out["text_projection.weight"] = sd["text_projection"].T
    return {k: v.contiguous() for k, v in out.items()}


def write_transformers_clip(open_clip_folder: str | Path, folder: str | Path) -> Path:
    """The CLIP of an open_clip folder (as :func:`write_tiny_open_clip` writes) converted to a transformers
    ``CLIPModel`` + ``CLIPProcessor`` folder (``from_pretrained`` layout, like ``openai/clip-vit-base-patch32``),
    with CLIP's real tokenizer and OpenAI CLIP's image processor. Same weights, independent implementation."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    open_clip_folder, folder = Path(open_clip_folder), Path(folder)
    meta = json.loads((open_clip_folder / "open_clip_config.json").read_text())
    cfg = meta["model_cfg"]
    if not cfg.get("quick_gelu"):
        raise ValueError("transformers' CLIP config is written for QuickGELU models only")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    mlp = lambda tower: int(tower["width"] * tower.get("mlp_ratio", 4.0))  # noqa: E731
    config = CLIPConfig(
        projection_dim=cfg["embed_dim"],
        text_config=dict(
            vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=mlp(t),
            num_hidden_layers=t["layers"], num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=cfg["embed_dim"],
        ),
        vision_config=dict(
            hidden_size=v["width"], intermediate_size=mlp(v), num_hidden_layers=v["layers"],
            num_attention_heads=v["width"] // v.get("head_width", 64), image_size=v["image_size"],
            patch_size=v["patch_size"], hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=cfg["embed_dim"],
        ),
    )
    model = CLIPModel(config)
    state = _open_clip_to_transformers_state(load_file(str(open_clip_folder / "open_clip_model.safetensors")), cfg)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(folder)
    write_clip_tokenizer_files(folder / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "_tokenizer_src"), model_max_length=t["context_length"])
    size = v["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,  # PIL bicubic
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ DINO

# transformers' ViTConfig of facebook/dino-vits16 (ViT-S/16) and a tiny one with the same input geometry
DINO_VITS16_CFG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6)
TINY_DINO_CFG = dict(DINO_VITS16_CFG, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def write_tiny_dino(folder: str | Path, seed: int = 0, real_size: bool = False) -> Path:
    """A random DINO-like ViT (transformers ``ViTModel``, no pooler) saved with ``save_pretrained``, in the
    layout of ``facebook/dino-vits16`` (config.json, model weights, preprocessor_config.json)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = Path(folder)
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(**(DINO_VITS16_CFG if real_size else TINY_DINO_CFG)), add_pooling_layer=False)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}, resample=3).save_pretrained(folder)
    return folder


# transformers' Dinov2Config of facebook/dinov2-small (ViT-S/14, LayerScale) and a tiny one of the same geometry
DINOV2_SMALL_CFG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=518,
                        patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6)
TINY_DINOV2_CFG = dict(DINOV2_SMALL_CFG, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def write_tiny_dinov2(folder: str | Path, seed: int = 0, real_size: bool = False) -> Path:
    """A random DINOv2-like ViT (transformers ``Dinov2Model``, LayerScale weights drawn away from their init so
    that a loader dropping them would show) in the layout of ``facebook/dinov2-small``."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**(DINOV2_SMALL_CFG if real_size else TINY_DINOV2_CFG)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.uniform_(0.1, 2.0)
    model.save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                      do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def write_tiny_dino_timm(folder: str | Path, seed: int = 0) -> str:
    """A tiny random timm ``vit_small_patch16_224`` (DINO's architecture, narrower and shallower) saved in
    timm's hub layout; returns the ``local-dir:`` name that ``timm.create_model`` loads."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    args = dict(embed_dim=32, depth=2, num_heads=2)
    model = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0, **args)
    save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    return f"local-dir:{Path(folder)}"


# -------------------------------------------------------------------------------------------- DreamSim

# dreamsim's LoRA settings (the package's training config): rank 16, alpha 0.5, dropout 0.3, on qkv
DREAMSIM_LORA = dict(r=16, lora_alpha=0.5, lora_dropout=0.3, bias="none", target_modules=["qkv"])


def _random_state(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights for every parameter of module (LayerNorms at identity), from a seeded generator."""
    state = {}
    norms = {name for name, m in module.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    for name, p in module.named_parameters():
        owner, _, kind = name.rpartition(".")
        if owner in norms:
            state[name] = torch.ones(p.shape) if kind == "weight" else torch.zeros(p.shape)
        else:
            state[name] = torch.randn(p.shape, generator=generator) * 0.02
    return state


def _vit_base_state(patch_size: int, generator: torch.Generator, clip_like: bool) -> dict[str, torch.Tensor]:
    from accelerate import init_empty_weights
    from dreamsim.feature_extraction.vision_transformer import vit_base

    with init_empty_weights(include_buffers=False):  # parameters on "meta": only names and shapes are needed
        net = vit_base(patch_size=patch_size, num_classes=0)
        if clip_like:  # dreamsim's CLIP-as-DINO loaders put CLIP's ln_pre where DINO has pos_drop
            net.pos_drop = torch.nn.LayerNorm(net.embed_dim)
    return _random_state(net, generator)


def write_dreamsim_checkpoints(cache_dir: str | Path, dreamsim_type: str = "open_clip_vitb32", seed: int = 0) -> Path:
    """Random DreamSim checkpoints in the ``cache_dir`` layout the package reads (the contents of its release
    zip for that type, plus torch.hub's DINO weights for DINO backbones):

    - ``{clip,open_clip}_vitb{16,32}_pretrain.pth.tar``: ``{"state_dict": ViT-B weights in dreamsim's
      CLIP-as-DINO naming + "proj" [768, 512]}``
    - ``dino_vitb16_pretrain.pth``: ``{"student": {"module.head.*"}}``, DINO's projection head (the only part
      dreamsim reads from it)
    - ``checkpoints/dino_vitbase16_pretrain.pth``: the DINO ViT-B/16 backbone state dict that DINO's hubconf
      downloads (read through :func:`eval.similarity.dino_hub_redirect`)
    - ``<tag>lora/``: a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``), saved by
      peft itself from the package's ``PerceptualModel`` built on the files above, with random nonzero
      LoRA weights; ``<tag>`` is ``ensemble_`` or ``<backbone>_single_``.

    Real-size ViT-B backbones (the package's loaders hard-code them), random weights.
    """
    from accelerate import init_empty_weights
    from dreamsim.config import dreamsim_args
    from dreamsim.feature_extraction.vision_transformer import DINOHead
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    from eval.similarity import DINO_HUB_CHECKPOINT, DREAMSIM_FILES, dino_hub_redirect

    if dreamsim_type not in DREAMSIM_FILES:
        raise ValueError(f"dreamsim_type must be one of {sorted(DREAMSIM_FILES)}, got {dreamsim_type!r}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    model_cfg = dreamsim_args["model_config"][dreamsim_type]
    for backbone in model_cfg["model_type"].split(","):
        patch = int(backbone[-2:])
        if backbone.startswith(("clip_", "open_clip_")):
            state = _vit_base_state(patch, gen, clip_like=True)
            state["proj"] = torch.randn(768, 512, generator=gen) * 768**-0.5
            torch.save({"state_dict": state}, cache_dir / f"{backbone}_pretrain.pth.tar")
        elif backbone == "dino_vitb16":
            with init_empty_weights(include_buffers=False):
                head = DINOHead(768, 2048)
            head_state = _random_state(head.mlp, gen)
            student = {f"module.head.mlp.{k}": v for k, v in head_state.items()}
            student["module.head.last_layer.weight"] = torch.randn(2048, 256, generator=gen) * 0.02
            torch.save({"student": student}, cache_dir / "dino_vitb16_pretrain.pth")
            (cache_dir / DINO_HUB_CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
            torch.save(_vit_base_state(16, gen, clip_like=False), cache_dir / DINO_HUB_CHECKPOINT)
        else:
            raise ValueError(f"no random checkpoint writer for dreamsim backbone {backbone!r}")

    with dino_hub_redirect(cache_dir):
        base = PerceptualModel(**model_cfg, device="cpu", load_dir=str(cache_dir), normalize_embeds=True)
    lora = get_peft_model(base, LoraConfig(**DREAMSIM_LORA))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    tag = "ensemble_" if dreamsim_type == "ensemble" else f"{dreamsim_type}_single_"
    lora.save_pretrained(str(cache_dir / f"{tag}lora"))
    return cache_dir
