"""``method=gligen``: GLIGEN with reference images grounded in boxes (Li et al., CVPR 2023), as diffusers runs it
natively: ``StableDiffusionGLIGENTextImagePipeline`` with the ``anhnct/Gligen_Text_Image`` weights (diffusers
format). The layout-guided, image-grounded baseline.

Its base model is not the run's: GLIGEN text-image is a whole SD1.4-based pipeline (UNet with gated
text-image self-attention, CLIP image encoder and ``CLIPImageProjection``), loaded in place of the base model;
its weights per base model are in ``conf/method/gligen.yaml`` (``weights.<model name>``), and its records name
that pipeline as their model (``sd14_gligen``, 512 px), so the tables say so. Each subject gives its phrase, its
reference image (the one the adapter methods see) and its box (``gligen_phrases``, ``gligen_images``,
``gligen_boxes``); ``scheduled_sampling_beta`` is passed as ``gligen_scheduled_sampling_beta`` (diffusers'
default 0.3), which diffusers' text-image pipeline (0.42) computes but does not apply: it grounds every step.
Each step calls the UNet twice (with and without grounding; guidance mixes the two), and GLIGEN has no image
cross-attention of its own (grounding enters through the gated self-attention), so attention maps are refused
with a message rather than recorded wrongly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import torch
from PIL import Image

from anyms.core.attention_maps import AttentionMapSettings
from anyms.core.layout import Layout
from anyms.methods.base import (BasePipeline, GenerationResult, GenerationSettings, ModelLoadError, check_local_paths,
                                own_weights, peak_memory_bytes, weights_for)
from runfolder.references import load_reference

METHOD = "gligen"
HUB_REPO = "anhnct/Gligen_Text_Image"
TINY_DIR = "Gligen_Text_Image"


class GLIGEN(BasePipeline):
    """GLIGEN text-image from ``method.weights.<model name>`` (``name``, ``repo``, ``size``)."""

    WEIGHTS = "GLIGEN text-image"

    def __init__(self, model: Mapping, name: str = METHOD, weights: Mapping | None = None,
                 scheduled_sampling_beta: float = 0.3, **settings):
        from diffusers import StableDiffusionGLIGENTextImagePipeline

        from anyms.methods.loading import how_to_get, prepare_runtime

        entry = own_weights(type(self), name, weights, model, write_tiny)
        device, dtype = prepare_runtime(model)
        repo, field = str(entry["repo"]), f"method.weights.{model['name']}.repo"
        try:
            pipe = StableDiffusionGLIGENTextImagePipeline.from_pretrained(
                repo, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"method {name!r}: cannot load GLIGEN text-image {repo!r}; "
                                 f"{how_to_get(field, repo)}. "
                                 f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
        pipe.to(device)
        super().__init__(pipe, default_size=int(entry["size"]))
        self.name, self.beta = name, float(scheduled_sampling_beta)

    @classmethod
    def check(cls, method: Mapping, model: Mapping) -> None:
        entry = weights_for(method, model, cls.WEIGHTS)
        if not model.get("tiny"):
            check_local_paths({f"method.weights.{model['name']}.repo": entry.get("repo")})

    @classmethod
    def text_encoders(cls, method: Mapping, model: Mapping) -> list[tuple[str, str, str]]:
        """GLIGEN's own pipeline encodes the prompt (it replaces the base model)."""
        entry = weights_for(method, model, cls.WEIGHTS)
        return [(f"method.weights.{model['name']}.repo", str(entry["repo"]), "tokenizer")]

    @classmethod
    def identity(cls, method: Mapping, model_ids: Mapping) -> tuple[dict, dict]:
        """GLIGEN's own pipeline as the model (it replaces the base model), with the run's device, dtype and
        threads; the method's settings without the weight table."""
        entry = dict((method.get("weights") or {}).get(model_ids["name"]) or {})
        model = {"name": entry.get("name", METHOD), "kind": "sd14_gligen", "pretrained": entry.get("repo"),
                 "size": entry.get("size"), "tiny": METHOD if model_ids.get("tiny") else None, "base_model": model_ids["name"]}
        model.update({k: model_ids[k] for k in ("device_type", "dtype", "torch_threads") if k in model_ids})
        return model, {k: v for k, v in method.items() if k not in ("_target_", "weights")}

    def __call__(self, prompt: str, layout: Layout, seed: int, settings: GenerationSettings,
                 attention: str | None = None, record: AttentionMapSettings | None = None) -> GenerationResult:
        """One image; the initial noise from a CPU generator seeded with ``seed``, as for every method."""
        height = settings.height or self.default_size
        width = settings.width or self.default_size
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        if record is not None:
            raise ValueError("method gligen records no attention maps: it has no image cross-attention (grounding "
                             "enters through gated self-attention) and calls the UNet twice per step; set record_attention=false")
        images = [s.image.convert("RGB") if isinstance(s.image, Image.Image) else load_reference(s.image) for s in layout]
        self._reset_peak_memory()
        start = time.perf_counter()
        with torch.no_grad():
            out = self.pipe(
                prompt=prompt, negative_prompt=settings.negative_prompt, num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale, height=height, width=width,
                gligen_phrases=[s.phrase for s in layout], gligen_images=images,
                gligen_boxes=[[float(c) for c in s.box] for s in layout], gligen_scheduled_sampling_beta=self.beta,
                generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="pil",
            )
        seconds = self._elapsed(start)
        return GenerationResult(out.images[0], seconds, peak_memory_bytes(self.device), latent_hw)


# --- tiny random GLIGEN text-image in the layout of anhnct/Gligen_Text_Image (model=tiny, model=tiny_sd15) ----

def tiny_gligen_components(tokenizer_dir: str | Path, seed: int = 0) -> dict:
    """An SD1.4-like tiny pipeline whose UNet has GLIGEN's gated text-image self-attention (and its
    ``position_net``), a CLIP image encoder and ``CLIPImageProjection``, all 32 wide (GLIGEN needs the text
    width, the image embedding's projection and the UNet's cross-attention width equal)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion import CLIPImageProjection
    from transformers import CLIPProcessor, CLIPTextModel

    from anyms.tiny import _text_config, clip_tokenizer, tiny_image_encoder
    from anyms.tiny import _vae as tiny_vae

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, attention_type="gated-text-image",
    )
    with torch.no_grad():  # GLIGEN's gates start closed (tanh(0) = 0): open them, or the boxes would do nothing
        for name, p in unet.named_parameters():
            if name.endswith(("fuser.alpha_attn", "fuser.alpha_dense")):
                p.fill_(1.0)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_config())
    image_encoder, image_processor = tiny_image_encoder(seed + 2)
    torch.manual_seed(seed + 3)
    image_project = CLIPImageProjection(hidden_size=32)
    tokenizer = clip_tokenizer(tokenizer_dir)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    return dict(vae=tiny_vae(seed + 4), text_encoder=text_encoder, tokenizer=tokenizer,
                processor=CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer), image_encoder=image_encoder,
                image_project=image_project, unet=unet, scheduler=scheduler, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def write_tiny(root: str | Path, seed: int = 0) -> Path:
    """Writes once ``root/Gligen_Text_Image`` (``save_pretrained``, as anhnct/Gligen_Text_Image) beside the tiny hub,
    without touching it. Returns the folder."""
    import shutil

    from diffusers import StableDiffusionGLIGENTextImagePipeline

    from runfolder import write_folder_once

    def write(tmp: Path) -> None:
        tok = tmp / "_tokenizer"
        pipe = StableDiffusionGLIGENTextImagePipeline(**tiny_gligen_components(tok, seed))
        pipe.save_pretrained(tmp)
        shutil.rmtree(tok)

    return write_folder_once(Path(root) / TINY_DIR, write, "tiny random GLIGEN text-image written by anyms.methods.gligen.write_tiny")
