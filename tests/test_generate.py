"""The generation stage end to end on the tiny models: configs, methods, provenance, resuming, errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import runfolder
from anyms.benchmark import BenchmarkConfigError, load_combinations
from anyms.generation.generate import GenerationConfigError, run_generation
from anyms.methods.base import ModelLoadError

from .conftest import REPO, data_root, quiet_wandb

CONF = REPO / "conf"
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("model", "method", "benchmark", "generation")}
METHODS = GROUPS["method"]
DATA = data_root()
needs_data = pytest.mark.skipif(DATA is None, reason="needs the DreamBench images (ANYMS_DATA_ROOT or ../shared)")


def make_cfg(run_dir, *overrides, tiny_root=None, data=DATA):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("generate", overrides=[f"run_dir={run_dir}", f"data_root={data}", "progress=false", *quiet_wandb(overrides),
                                              *overrides])
    if tiny_root is not None and cfg.model.get("tiny"):
        cfg.model.tiny_root = str(tiny_root)
    return cfg


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_config_composes_and_resolves(group, tmp_path):
    assert GROUPS[group], f"conf/{group} is empty"
    for option in GROUPS[group]:
        cfg = make_cfg(tmp_path, f"{group}={option}")
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        if group == "benchmark" and DATA is not None:
            combos = load_combinations(cfg.benchmark, DATA)
            assert combos and all(len(c.layout) == len(c.references) for c in combos)


def test_benchmark_has_the_papers_eleven_combinations_and_ablation_subset(tmp_path):
    cfg = make_cfg(tmp_path, "benchmark=anyms11")
    combos = cfg.benchmark.combinations
    assert sorted(combos) == [f"c{i:02d}" for i in range(1, 12)]
    assert [len(combos[c].subjects) for c in sorted(combos)] == [2, 2, 2, 2, 3, 3, 3, 4, 4, 5, 5]
    ablation = make_cfg(tmp_path, "benchmark=anyms11_ablation").benchmark.only
    assert list(ablation) == [c for c in sorted(combos) if len(combos[c].subjects) >= 3]
    smoke = make_cfg(tmp_path, "benchmark=smoke").benchmark
    assert len(smoke.only) == 1 and len(smoke.seeds) == 2


@needs_data
@pytest.mark.parametrize("model", ["tiny", "tiny_sd15"])
def test_every_method_generates_with_provenance(model, tmp_path, tiny_root):
    for method in METHODS:
        summary = run_generation(make_cfg(tmp_path, f"model={model}", f"method={method}", "benchmark=smoke",
                                          "benchmark.seeds=[0]", tiny_root=tiny_root))
        assert summary.generated == [f"images/{method}/c02/0.png"]
    records = runfolder.read_records(tmp_path)  # validated against the schema
    assert [r["method"] for r in records] == sorted(METHODS)
    for r in records:
        image = Image.open(tmp_path / r["image"])
        assert image.size == (r["width"], r["height"]) == (64, 64)
        assert r["n_subjects"] == 2 and r["subjects"][1]["role"] == "attribute"
        assert r["versions"]["diffusers"] and r["git_hash"] and r["seconds"] > 0 and r["peak_memory_bytes"] > 0
        assert (tmp_path / "images" / r["method"] / "c02" / "contact_sheet.png").exists()
        # the finest and coarsest cross-attention grids: SDXL has none at its first level, SD1.5 does
        # (a method may run its own model: the record names it)
        assert set(r["overlap_shares"]) == ({"4x4", "2x2"} if r["model"]["kind"] == "sdxl" else {"8x8", "4x4"})
    pixels = {r["method"]: np.asarray(Image.open(tmp_path / r["image"]), dtype=int) for r in records}
    # the literal crop-and-merge and the fused call are the same method: at most rounding apart
    assert np.abs(pixels["anyms"] - pixels["anyms_literal"]).max() <= 1
    # the methods do differ where they should
    assert np.abs(pixels["anyms"] - pixels["text_only"]).max() > 5
    assert np.abs(pixels["anyms"] - pixels["wo_local"]).max() > 5


@needs_data
def test_text_only_is_plain_diffusers_without_an_adapter(tmp_path, tiny_root):
    from diffusers import StableDiffusionXLPipeline

    cfg = make_cfg(tmp_path, "model=tiny", "method=text_only", "benchmark=smoke", "benchmark.seeds=[3]", tiny_root=tiny_root)
    run_generation(cfg)
    ours = np.asarray(Image.open(tmp_path / "images/text_only/c02/3.png"), dtype=int)
    torch.set_num_threads(1)
    plain = StableDiffusionXLPipeline.from_pretrained(str(tiny_root / "sdxl"), add_watermarker=False)
    g = cfg.generation
    image = plain(cfg.benchmark.combinations.c02.prompt, negative_prompt=g.negative_prompt, num_inference_steps=g.steps,
                  guidance_scale=g.guidance_scale, height=64, width=64, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(ours - np.asarray(image, dtype=int)).max() <= 1


@needs_data
def test_same_seed_and_config_give_the_same_bytes_in_any_folder(tmp_path, tiny_root):
    for run in ("a", "b"):
        run_generation(make_cfg(tmp_path / run, "benchmark=smoke", "benchmark.seeds=[5]", tiny_root=tiny_root))
    a, b = (tmp_path / run / "images/anyms/c02/5.png" for run in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    ha, hb = (runfolder.read_records(tmp_path / run)[0]["config_hash"] for run in ("a", "b"))
    assert ha == hb


@needs_data
def test_resuming_writes_only_the_missing_images(tmp_path, tiny_root):
    cfg = make_cfg(tmp_path, "benchmark=smoke", tiny_root=tiny_root)
    first = run_generation(cfg)
    assert len(first.generated) == 2
    first_hashes = {r["config_hash"] for r in runfolder.read_records(tmp_path)}
    kept = tmp_path / "images/anyms/c02/0.png"
    stamp = kept.stat().st_mtime_ns
    (tmp_path / "images/anyms/c02/1.png").unlink()
    second = run_generation(cfg)
    assert second.generated == ["images/anyms/c02/1.png"] and second.skipped == 1
    assert kept.stat().st_mtime_ns == stamp
    assert run_generation(cfg).generated == []
    # a changed setting changes the config hash: everything is regenerated
    changed = make_cfg(tmp_path, "benchmark=smoke", "generation.steps=3", tiny_root=tiny_root)
    assert len(run_generation(changed).generated) == 2
    assert not {r["config_hash"] for r in runfolder.read_records(tmp_path)} & first_hashes


@needs_data
def test_shards_split_the_work_without_overlap(tmp_path, tiny_root):
    done = []
    for i in range(2):
        cfg = make_cfg(tmp_path, "benchmark=smoke", "benchmark.only=[c01,c02]", f"shard={i}/2",
                       "contact_sheets=false", tiny_root=tiny_root)
        done.append(set(run_generation(cfg).generated))
    assert not done[0] & done[1]
    assert len(done[0] | done[1]) == 4
    files = sorted(p.name for p in (tmp_path / "records").iterdir())
    assert files == ["anyms.0-of-2.jsonl", "anyms.1-of-2.jsonl"]


def one_combination_benchmark(combination):
    return {"name": "bad", "seeds": [0], "only": None, "dataset": "dreambench", "combinations": {"cx": combination}}


@needs_data
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["boxes"].__setitem__(0, [0.1, 0.1, 1.2, 0.9]), r"combination cx, subjects\[0\].*x1=1.2 is outside \[0, 1\]"),
        (lambda c: c["subjects"][1].__setitem__("image", "dreambench/no_such_subject"), r"combination cx, subjects\[1\].image: .*no_such_subject does not exist"),
        (lambda c: c["boxes"].pop(), r"combination cx: 2 subjects but 1 boxes"),
        (lambda c: c["subjects"][0].__setitem__("role", "hat"), r"combination cx, subjects\[0\].*unknown role 'hat'"),
        (lambda c: c["subjects"][0].__setitem__("colour", "red"), r"combination cx, subjects\[0\]: unknown field\(s\) \['colour'\]"),
    ],
)
def test_bad_combinations_fail_before_any_model_loads(tmp_path, change, message):
    combination = {"prompt": "a dog and a cat",
                   "subjects": [{"name": "dog", "image": "dreambench/dog", "phrase": "dog"},
                                {"name": "cat", "image": "dreambench/cat", "phrase": "cat"}],
                   "boxes": [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]}
    change(combination)
    cfg = make_cfg(tmp_path, "model=sdxl", "model.pretrained=/nonexistent/model")  # loading it would fail otherwise
    cfg.benchmark = OmegaConf.create(one_combination_benchmark(combination))
    with pytest.raises(BenchmarkConfigError, match=message):
        run_generation(cfg)
    assert not (tmp_path / "images").exists()


def test_missing_data_root_names_the_fix(tmp_path):
    cfg = make_cfg(tmp_path, "benchmark=smoke", data=tmp_path / "nothing")
    with pytest.raises(BenchmarkConfigError, match=r"does not exist \(data_root=.*nothing\); fetch the data with `make data`"):
        run_generation(cfg)


@needs_data
@needs_data
def test_a_missing_model_gives_one_clear_error(tmp_path):
    from anyms.tiny import clip_tokenizer

    cfg = make_cfg(tmp_path / "run", "model=sd15", "model.pretrained=/nonexistent/sd15", "benchmark=smoke")
    with pytest.raises(GenerationConfigError, match=r"model.pretrained: /nonexistent/sd15 does not exist"):
        run_generation(cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = make_cfg(tmp_path / "run", "model=sd15", f"model.pretrained={empty}", "benchmark=smoke")
    with pytest.raises(GenerationConfigError, match=rf"model.pretrained: {empty} has no model_index.json"):
        run_generation(cfg)  # refused before anything is written (issue 32)
    broken = tmp_path / "broken"  # a pipeline folder that does not load: refused by the loader
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", '
                                             '"unet": ["diffusers", "UNet2DConditionModel"]}')
    clip_tokenizer(broken / "tokenizer").save_pretrained(broken / "tokenizer")  # the check reads it before any load
    cfg = make_cfg(tmp_path / "run", "model=sd15", f"model.pretrained={broken}", "benchmark=smoke")
    with pytest.raises(ModelLoadError, match=rf"model 'sd15': cannot load the pipeline '{broken}'.*check model.pretrained"):
        run_generation(cfg)
    assert not (tmp_path / "run" / "plans").exists()  # the model loads before the plan is written


@needs_data
def test_hydra_multirun_over_two_methods(tmp_path, tiny_root):
    cmd = [sys.executable, str(REPO / "scripts/generate.py"), "-m", "method=anyms,wo_local", "model=tiny",
           "benchmark=smoke", "benchmark.seeds=[0]", f"run_dir={tmp_path}", f"data_root={DATA}",
           f"model.tiny_root={tiny_root}", "progress=false"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "images/anyms/c02/0.png").exists() and (tmp_path / "images/wo_local/c02/0.png").exists()
    assert "anyms: 1 image(s) generated" in out.stdout and "wo_local: 1 image(s) generated" in out.stdout
