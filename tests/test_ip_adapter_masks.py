"""method=ip_adapter_masks (diffusers' own masked IP-Adapter) against wo_crop_merge (masked_sum, Eq. 7): equal
where every box edge falls on every cross-attention level's token grid, apart by the soft bicubic mask edges
elsewhere; and the generation stage end to end on the tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anyms.core.layout import Layout, Subject
from anyms.generation.generate import load_model, run_generation
from anyms.methods.base import GenerationSettings
from anyms.methods.ip_adapter_masks import ip_adapter_masks

from .test_generate import DATA, make_cfg

needs_data = pytest.mark.skipif(DATA is None, reason="needs ANYMS_DATA_ROOT with dreambench/")
SETTINGS = GenerationSettings(steps=3, guidance_scale=7.5)  # the tiny model's 64 px: grids 4x4 and 2x2
PROMPT = "a dog and a cat on the grass"
ALIGNED = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)]  # every edge on the 2x2 grid, hence on 4x4 too
OFF_GRID = [(0.1, 0.15, 0.6, 0.9), (0.45, 0.3, 0.95, 0.8)]


def layout(images, boxes) -> Layout:
    return Layout([Subject("dog", "dog", images[0], boxes[0]), Subject("cat", "cat", images[1], boxes[1])])


def downsampled_masks(lay: Layout, grid, size=64) -> torch.Tensor:
    """What the stock processor multiplies each subject by at a layer of this grid."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    (masks,) = ip_adapter_masks(lay, size, size)
    return torch.stack([IPAdapterMaskProcessor.downsample(masks[:, j], 1, grid[0] * grid[1], 1)[0, :, 0]
                        for j in range(masks.shape[1])])


@pytest.mark.parametrize("boxes, on_grid", [(ALIGNED, True), (OFF_GRID, False)])
def test_bicubic_masks_are_the_box_masks_exactly_where_boxes_fall_on_the_grids(subject_images, boxes, on_grid):
    lay = layout(subject_images, boxes)
    for grid in [(4, 4), (2, 2)]:
        hard = lay.box_masks(*grid).flatten(1).float()
        gap = (downsampled_masks(lay, grid) - hard).abs().max().item()
        if on_grid:
            assert gap < 1e-6
        else:
            assert gap > 0.05  # soft edges (and overshoot) where a box cuts a token


@pytest.fixture(scope="module")
def methods(tiny_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    return {m: load_model(c.model, c.method) for m in ("ip_adapter_masks", "wo_crop_merge")
            for c in [make_cfg(run, f"method={m}", tiny_root=tiny_root)]}


def test_equals_wo_crop_merge_on_the_grid_and_measures_the_gap_off_it(methods, subject_images):
    gaps = {}
    for name, boxes in [("aligned", ALIGNED), ("off_grid", OFF_GRID)]:
        lay = layout(subject_images, boxes)
        a, b = (np.asarray(methods[m](PROMPT, lay, 0, SETTINGS).image, dtype=int)
                for m in ("ip_adapter_masks", "wo_crop_merge"))
        gaps[name] = np.abs(a - b).max()
    print(f"max pixel difference ip_adapter_masks vs wo_crop_merge: {gaps}")
    assert gaps["aligned"] <= 1  # the same computation up to float rounding (8-bit output)
    assert gaps["off_grid"] > gaps["aligned"]  # the soft edges change the image


def test_attention_maps_are_each_subjects_softmax_times_its_soft_mask(methods, subject_images):
    from anyms.core.attention_maps import AttentionMapSettings

    lay = layout(subject_images, OFF_GRID)
    maps = methods["ip_adapter_masks"](PROMPT, lay, 0, SETTINGS, record=AttentionMapSettings(levels=(4,))).attention_maps
    soft = downsampled_masks(lay, (2, 2)).view(2, 2, 2).numpy()
    np.testing.assert_allclose(maps["image_2x2"], soft, rtol=1e-4, atol=1e-5)  # per-subject softmax sums to 1


@needs_data
def test_generation_stage_end_to_end(tmp_path, tiny_root):
    cfg = make_cfg(tmp_path, "method=ip_adapter_masks", "benchmark=smoke", "generation.steps=2", tiny_root=tiny_root)
    summary = run_generation(cfg)
    assert summary.generated == ["images/ip_adapter_masks/c02/0.png", "images/ip_adapter_masks/c02/1.png"]
    record = json.loads(next((tmp_path / "records").glob("ip_adapter_masks.*.jsonl")).read_text().splitlines()[0])
    assert record["settings"]["method"] == {"name": "ip_adapter_masks", "adapter_scale": 1.0}
    assert record["model"]["ip_adapter"]["weight_name"] == "ip-adapter-plus_sdxl_vit-h.safetensors"
