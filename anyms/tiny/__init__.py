"""Tiny random Stable Diffusion models (SD1.5-like and SDXL-like) and IP-Adapters, for running the real
code paths on a CPU with no model hub.

Each model is built from a config with a fixed seed, and :func:`write_tiny_hub` saves it in the same
layout as the real hub repositories (a diffusers pipeline folder; an ``h94/IP-Adapter``-like folder with
``models/image_encoder`` and the adapters in the original ``{"image_proj", "ip_adapter"}`` format), so
that loading goes through exactly the code that loads the real weights. A method with weights of its own writes
its tiny random ones beside these, without touching them, from its own module (``write_tiny`` in
``anyms/methods/<name>.py``). Nothing here is a quality model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from runfolder.clip_vocab import write_clip_tokenizer_files

TOKENIZER_MAX_LENGTH = 77
IMAGE_ENCODER_SIZE = 32  # pixels the tiny CLIP vision encoder sees


def clip_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=TOKENIZER_MAX_LENGTH)


def _text_config(**overrides):
    from transformers import CLIPTextConfig

    cfg = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=32, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407,
    )
    cfg.update(overrides)
    return CLIPTextConfig(**cfg)


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # four blocks, as the real VAE, so the latent is the image size / 8
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, layers_per_block=1, sample_size=64,
    )


def tiny_image_encoder(seed: int = 0):
    """A tiny ``CLIPVisionModelWithProjection`` and its ``CLIPImageProcessor``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=IMAGE_ENCODER_SIZE, patch_size=8,
    ))
    processor = CLIPImageProcessor(
        crop_size={"height": IMAGE_ENCODER_SIZE, "width": IMAGE_ENCODER_SIZE},
        size={"shortest_edge": IMAGE_ENCODER_SIZE},
    )
    return encoder, processor


def tiny_sd15_components(tokenizer_dir: str | Path, seed: int = 0) -> dict:
    """SD1.5-like: cross-attention at both UNet levels, 32-wide text encoder, latent = image / 8."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_config())
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        steps_offset=1, set_alpha_to_one=False,
    )
    image_encoder, feature_extractor = tiny_image_encoder(seed + 2)
    return dict(
        unet=unet, vae=_vae(seed + 3), text_encoder=text_encoder, tokenizer=clip_tokenizer(tokenizer_dir),
        scheduler=scheduler, safety_checker=None, feature_extractor=feature_extractor,
        image_encoder=image_encoder, requires_safety_checker=False,
    )


def tiny_sdxl_components(tokenizer_dir: str | Path, seed: int = 0) -> dict:
    """SDXL-like: no cross-attention at the first level, cross-attention at the next two and the mid
    block, two text encoders (32 + 32 = 64 wide), text_time conditioning, latent = image / 8."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config())
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    image_encoder, feature_extractor = tiny_image_encoder(seed + 3)
    tokenizer = clip_tokenizer(tokenizer_dir)
    return dict(
        unet=unet, vae=_vae(seed + 4), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler, feature_extractor=feature_extractor,
        image_encoder=image_encoder, force_zeros_for_empty_prompt=True,
    )


def cross_attention_shapes(unet) -> list[tuple[int, int]]:
    """``(inner_dim, cross_attention_dim)`` of each cross-attention layer, in the order diffusers numbers
    IP-Adapter layers (``unet.attn_processors`` order, ids 1, 3, 5, ...)."""
    shapes = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        shapes.append((attn.to_k.out_features, attn.to_k.in_features))
    return shapes


def random_ip_adapter_state_dict(unet, image_encoder, plus: bool, seed: int = 0, plus_tokens: int = 16) -> dict:
    """Random IP-Adapter weights in the original (tencent-ailab) format that ``load_ip_adapter`` reads:
    ``{"image_proj": ..., "ip_adapter": {"1.to_k_ip.weight", "1.to_v_ip.weight", "3...."}}``.

    base: ``proj`` (CLIP image embedding -> 4 tokens) and ``norm``; plus: the perceiver resampler over the
    encoder's penultimate hidden states (heads of 64, as the loader infers), ``plus_tokens`` queries.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    cross_dim = unet.config.cross_attention_dim
    if plus:
        dim, heads, depth, ff = 64, 1, 4, 4  # diffusers builds depth 4 whatever the file holds
        embed_dim = image_encoder.config.hidden_size
        proj = {"latents": rand(1, plus_tokens, dim, std=dim**-0.5), "proj_in.weight": rand(dim, embed_dim),
                "proj_in.bias": torch.zeros(dim), "proj_out.weight": rand(cross_dim, dim),
                "proj_out.bias": torch.zeros(cross_dim), "norm_out.weight": torch.ones(cross_dim),
                "norm_out.bias": torch.zeros(cross_dim)}
        for i in range(depth):
            p = f"layers.{i}."
            proj.update({
                p + "0.norm1.weight": torch.ones(dim), p + "0.norm1.bias": torch.zeros(dim),
                p + "0.norm2.weight": torch.ones(dim), p + "0.norm2.bias": torch.zeros(dim),
                p + "0.to_q.weight": rand(heads * 64, dim), p + "0.to_kv.weight": rand(2 * heads * 64, dim),
                p + "0.to_out.weight": rand(dim, heads * 64),
                p + "1.0.weight": torch.ones(dim), p + "1.0.bias": torch.zeros(dim),
                p + "1.1.weight": rand(dim * ff, dim), p + "1.3.weight": rand(dim, dim * ff),
            })
    else:
        embed_dim = image_encoder.config.projection_dim
        proj = {"proj.weight": rand(4 * cross_dim, embed_dim), "proj.bias": torch.zeros(4 * cross_dim),
                "norm.weight": torch.ones(cross_dim), "norm.bias": torch.zeros(cross_dim)}
    layers = {}
    for i, (inner, ca_dim) in enumerate(cross_attention_shapes(unet)):
        layers[f"{2 * i + 1}.to_k_ip.weight"] = rand(inner, ca_dim, std=ca_dim**-0.5)
        layers[f"{2 * i + 1}.to_v_ip.weight"] = rand(inner, ca_dim, std=ca_dim**-0.5)
    return {"image_proj": proj, "ip_adapter": layers}


# --- the tiny models in the real hub layout -------------------------------------------------------------

IP_ADAPTER_FILES = {  # as in h94/IP-Adapter: (subfolder, file) -> (pipeline kind, plus?)
    ("models", "ip-adapter_sd15.safetensors"): ("sd15", False),
    ("models", "ip-adapter-plus_sd15.safetensors"): ("sd15", True),
    ("sdxl_models", "ip-adapter_sdxl_vit-h.safetensors"): ("sdxl", False),
    ("sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors"): ("sdxl", True),
}


def _flatten_ip_adapter(state_dict: dict) -> dict:
    # the .safetensors form of an IP-Adapter: "image_proj.<key>" and "ip_adapter.<key>"
    return {f"{part}.{k}": v.contiguous() for part, d in state_dict.items() for k, v in d.items()}


def write_tiny_hub(root: str | Path, seed: int = 0) -> Path:
    """Writes, once, ``root/sd15`` and ``root/sdxl`` (diffusers pipeline folders, as the hub repos
    stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0) and ``root/IP-Adapter`` (as h94/IP-Adapter:
    ``models/image_encoder`` and the adapters of :data:`IP_ADAPTER_FILES`). Written to a temporary folder
    and renamed, so a crash never leaves a half-written hub; a complete one is left alone."""
    import shutil

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from runfolder import write_folder_once

    def write(tmp: Path) -> None:
        tok_dir = tmp / "_tokenizer"
        pipes = {
            "sd15": StableDiffusionPipeline(**tiny_sd15_components(tok_dir, seed)),
            "sdxl": StableDiffusionXLPipeline(**tiny_sdxl_components(tok_dir, seed)),
        }
        encoder = pipes["sd15"].image_encoder
        encoder.save_pretrained(tmp / "IP-Adapter" / "models" / "image_encoder")
        for (sub, name), (kind, plus) in IP_ADAPTER_FILES.items():
            sd = random_ip_adapter_state_dict(pipes[kind].unet, encoder, plus=plus, seed=seed + len(name))
            (tmp / "IP-Adapter" / sub).mkdir(parents=True, exist_ok=True)
            save_file(_flatten_ip_adapter(sd), tmp / "IP-Adapter" / sub / name)
        for kind, pipe in pipes.items():
            # like the hub repos: no image encoder in the pipeline (the IP-Adapter repo brings it)
            pipe.register_modules(image_encoder=None, feature_extractor=None)
            pipe.save_pretrained(tmp / kind)
        shutil.rmtree(tok_dir)

    return write_folder_once(root, write, "tiny random models written by anyms.tiny.write_tiny_hub")
