"""method=gligen: diffusers' GLIGEN text-image pipeline on a tiny random GLIGEN written in the layout of
anhnct/Gligen_Text_Image and loaded by the real loader; its records name its own SD1.4-based model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anyms.core.attention_maps import AttentionMapSettings
from anyms.core.layout import Layout, Subject
from anyms.generation.generate import check_model_paths, identities, load_model, run_generation
from anyms.methods.base import GenerationSettings, ModelLoadError
from anyms.methods.gligen import write_tiny

from .test_generate import DATA, make_cfg

needs_data = pytest.mark.skipif(DATA is None, reason="needs ANYMS_DATA_ROOT with dreambench/")
SETTINGS = GenerationSettings(steps=4, guidance_scale=7.5)
PROMPT = "a dog and a cat on the grass"


def layout(images, boxes=((0.05, 0.1, 0.5, 0.9), (0.55, 0.4, 0.95, 0.95))) -> Layout:
    return Layout([Subject("dog", "dog", images[0], boxes[0]), Subject("cat", "cat", images[1], boxes[1])])


def test_tiny_gligen_is_in_the_released_layout(tiny_root):
    import torch
    from diffusers import UNet2DConditionModel

    folder = write_tiny(tiny_root)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionGLIGENTextImagePipeline"
    assert {"image_encoder", "image_project", "processor", "unet", "text_encoder", "tokenizer", "vae"} <= set(index)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert unet.config.attention_type == "gated-text-image"
    assert any("fuser" in name for name, _ in unet.named_modules())  # the gated self-attention
    assert isinstance(unet.position_net.linears_image[0], torch.nn.Linear)  # text-image grounding tokens
    assert (tiny_root / "sdxl" / "model_index.json").exists()  # the tiny hub beside it is untouched


@pytest.fixture(scope="module")
def gligen(tiny_root, tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("run"), "method=gligen", tiny_root=tiny_root)
    return load_model(cfg.model, cfg.method)


def pixels(result):
    return np.asarray(result.image, dtype=int)


def test_boxes_and_references_ground_the_image(gligen, subject_images):
    import dataclasses

    base = pixels(gligen(PROMPT, layout(subject_images), 0, SETTINGS))
    assert (pixels(gligen(PROMPT, layout(subject_images), 0, SETTINGS)) == base).all()  # a seed, an image
    moved = layout(subject_images, ((0.5, 0.1, 0.95, 0.9), (0.05, 0.4, 0.45, 0.95)))
    assert np.abs(pixels(gligen(PROMPT, moved, 0, SETTINGS)) - base).max() > 0
    swapped = Layout([dataclasses.replace(s, image=subject_images[3 - j]) for j, s in enumerate(layout(subject_images))])
    assert np.abs(pixels(gligen(PROMPT, swapped, 0, SETTINGS)) - base).max() > 0


def test_attention_maps_are_refused_with_a_message(gligen, subject_images):
    with pytest.raises(ValueError, match="gligen records no attention maps.*record_attention=false"):
        gligen(PROMPT, layout(subject_images), 0, SETTINGS, record=AttentionMapSettings())


def test_its_records_name_its_own_model_and_a_base_without_weights_is_refused(tmp_path):
    model, method = identities(make_cfg(tmp_path, "method=gligen", "model=sdxl").model,
                               make_cfg(tmp_path, "method=gligen", "model=sdxl").method)
    assert model["name"] == "sd14_gligen" and model["pretrained"] == "anhnct/Gligen_Text_Image" and model["size"] == 512
    assert model["base_model"] == "sdxl" and "ip_adapter" not in model and method == {"name": "gligen", "scheduled_sampling_beta": 0.3}
    cfg = make_cfg(tmp_path, "method=gligen", "model=sdxl", "~method.weights.sdxl")
    with pytest.raises(ModelLoadError, match=r"method 'gligen' has no GLIGEN text-image weights for model 'sdxl'.*model=sd15"):
        check_model_paths(cfg.model, cfg.method)


@needs_data
def test_generation_stage_end_to_end(tmp_path, tiny_root):
    cfg = make_cfg(tmp_path, "method=gligen", "benchmark=smoke", "generation.steps=2", tiny_root=tiny_root)
    assert run_generation(cfg).generated == ["images/gligen/c02/0.png", "images/gligen/c02/1.png"]
    record = json.loads(next((tmp_path / "records").glob("gligen.*.jsonl")).read_text().splitlines()[0])
    assert record["model"]["kind"] == "sd14_gligen" and record["model"]["tiny"] == "gligen"
    assert record["width"] == record["height"] == 64
    assert run_generation(cfg).skipped == 2  # the config hash is stable
