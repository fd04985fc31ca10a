"""What a paper-scale generation run needs (issue 13, items 1-3, 10, 11): no autograd anywhere, no host-to-device
copy per layer, MS-Diffusion's official scales, the import and fetch entry points as documented."""

import json
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import runfolder
from anyms.benchmark import BenchmarkConfigError, load_combinations
from anyms.generation.generate import generation_settings, load_model, run_generation
from anyms.core.layout import Layout
from anyms.methods.ms_diffusion import subject_weights

from .conftest import REPO
from .test_generate import DATA, make_cfg, needs_data


def distinct_images(n: int, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


class SavedTensors:
    """Counts the bytes autograd saves for backward while active: what a cached output would keep alive."""

    def __init__(self):
        self.bytes = 0

    def pack(self, t):
        self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


@needs_data
@pytest.mark.parametrize("method", ["anyms", "ms_diffusion"])
def test_no_model_and_no_cached_embedding_records_an_autograd_graph(method, tmp_path, tiny_root):
    cfg = make_cfg(tmp_path, "model=tiny", f"method={method}", tiny_root=tiny_root)
    pipeline = load_model(cfg.model, cfg.method)
    modules = [m for m in pipeline.pipe.components.values() if isinstance(m, torch.nn.Module)]
    if method == "ms_diffusion":
        modules += [pipeline.adapter, pipeline.image_encoder]
    trainable = [n for m in modules for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == []  # before: every weight required grad
    images = distinct_images(12)
    with SavedTensors() as saved:
        if method == "anyms":
            embeds = [pipeline.subject_embeddings([im], cfg=True) for im in images]
        else:
            embeds = [pipeline.image_features([im]) for im in images]
    assert all(e.grad_fn is None and not e.requires_grad for e in embeds)
    # nothing saved for a backward that never comes, whatever the number of references (before: ~the encoder's
    # activations per reference, 0.76 GiB for ViT-H/14 in fp16)
    assert saved.bytes == 0
    cached = pipeline._embedding_cache if method == "anyms" else pipeline._feature_cache
    assert len(cached) == 12 and all(v.grad_fn is None for v in cached.values())


@needs_data
def test_ms_diffusion_builds_its_masks_once_per_grid_not_per_layer_and_step(tmp_path, tiny_root):
    cfg = make_cfg(tmp_path, "model=tiny", "method=ms_diffusion", "generation.steps=3", tiny_root=tiny_root)
    pipeline = load_model(cfg.model, cfg.method)
    (combo,) = load_combinations(cfg.benchmark, DATA)
    settings = generation_settings(cfg)
    reference = np.asarray(pipeline(combo.prompt, combo.layout, 0, settings).image)
    layout = Layout(list(combo.layout.subjects))  # a fresh layout: nothing cached yet
    grids = pipeline.cross_attention_grids(64, 64)
    with mock.patch.object(Layout, "box_masks", autospec=True, side_effect=Layout.box_masks) as masks, \
            mock.patch("torch.as_tensor", side_effect=torch.as_tensor) as as_tensor:
        image = np.asarray(pipeline(combo.prompt, layout, 0, settings).image)
    # before: once per cross-attention layer per step per CFG call (here 3 steps x every layer) and a host ->
    # device copy of the masks, the CFG rows and the weights each time
    assert masks.call_count <= len(grids)
    assert as_tensor.call_count <= len(grids)
    assert np.array_equal(image, reference)  # the same image as with a warm cache


def test_ms_diffusion_default_scale_is_the_official_one_for_every_subject(tmp_path):
    cfg = make_cfg(tmp_path, "model=tiny", "method=ms_diffusion")
    settings = generation_settings(cfg)
    assert cfg.method.full_frame_adapter_scale is None and settings.adapter_scale == 0.6
    from anyms.core.layout import Subject

    scene = Layout([Subject(name="a", image="x", box=(0.2, 0.2, 0.5, 0.9), phrase="dog"),
                    Subject(name="b", image="y", box=(0, 0, 1, 1), phrase="beach", role="background")])
    assert subject_weights(scene, settings) == pytest.approx([0.6, 0.6])  # before: 0.4 for both
    opt_in = generation_settings(make_cfg(tmp_path, "model=tiny", "method=ms_diffusion",
                                          "method.full_frame_adapter_scale=0.4"))
    assert subject_weights(scene, opt_in) == pytest.approx([0.4, 0.4])


# --- importing images made elsewhere ------------------------------------------------------------------------

def import_cmd(source, run_dir, *extra):
    return [sys.executable, str(REPO / "scripts/import_images.py"), f"source={source}", "method=mudi",
            "benchmark=smoke", f"run_dir={run_dir}", f"data_root={DATA}", *extra]


@needs_data
def test_the_readme_import_command_runs(tmp_path):
    source = tmp_path / "mudi"
    for seed in (0, 1):
        (source / "c02").mkdir(parents=True, exist_ok=True)
        distinct_images(1, 96)[0].save(source / "c02" / f"{seed}.jpg")
    out = subprocess.run(import_cmd(source, tmp_path / "run"), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]  # before: "Could not override 'method'"
    assert "import mudi: 2 image(s)" in out.stdout
    records = runfolder.read_records(tmp_path / "run")
    assert [r["image"] for r in records] == ["images/mudi/c02/0.png", "images/mudi/c02/1.png"]
    assert records[0]["image_sha256"] == runfolder.file_digest(tmp_path / "run" / records[0]["image"])
    again = subprocess.run(import_cmd(source, tmp_path / "run"), capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert again.returncode == 0  # the same source again: allowed


@needs_data
def test_importing_under_a_generated_methods_name_is_refused(tmp_path, tiny_root):
    from anyms.generation.importer import import_images

    run_dir = tmp_path / "run"
    run_generation(make_cfg(run_dir, "model=tiny", "benchmark=smoke", tiny_root=tiny_root))
    before = {p: p.read_bytes() for p in (run_dir / "images" / "anyms").rglob("*.png")}
    source = tmp_path / "other"
    (source / "c02").mkdir(parents=True)
    distinct_images(1)[0].save(source / "c02" / "0.png")
    bench = make_cfg(run_dir, "benchmark=smoke").benchmark
    with pytest.raises(BenchmarkConfigError, match=r"method 'anyms': .* already holds 2 image\(s\) of 'anyms' .*overwrite=true"):
        import_images(source, "anyms", bench, DATA, run_dir)
    assert {p: p.read_bytes() for p in before} == before  # untouched
    summary = import_images(source, "anyms", bench, DATA, run_dir, overwrite=True)
    assert summary.imported == ["images/anyms/c02/0.png"]


# --- fetching the data --------------------------------------------------------------------------------------

def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(cwd), "PATH": "/usr/bin:/bin"})


def test_fetch_data_offline_says_what_failed_and_how_to_place_it(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import fetch_data
    finally:
        sys.path.remove(str(REPO / "scripts"))
    spec = {**fetch_data.DATASETS["dreambench"], "repo": str(tmp_path / "unreachable.git")}
    with mock.patch.dict(fetch_data.DATASETS, {"dreambench": spec}):
        with pytest.raises(fetch_data.FetchError, match=r"could not fetch .*unreachable.git at commit 4f887af7970a .*"
                                                          r"To place it by hand: .*--from-clone"):
            fetch_data.fetch("dreambench", tmp_path / "data")
    assert not (tmp_path / "data" / "dreambench").exists()
    # the script itself: one line, no CalledProcessError traceback
    out = subprocess.run([sys.executable, str(REPO / "scripts/fetch_data.py"), "--data-root", str(tmp_path / "d"),
                          "--dataset", "dreambench", "--from-clone", str(tmp_path / "no-clone")],
                         capture_output=True, text=True, timeout=120)
    # a clone that is not there is bad input: refused before anything is fetched or written (issue 32)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.startswith("fetch_data: --from-clone:")
    assert not (tmp_path / "d").exists()

    # a clone made elsewhere: copied, and the commit recorded
    repo = tmp_path / "clone"
    (repo / "dataset" / "dog").mkdir(parents=True)
    distinct_images(1)[0].save(repo / "dataset" / "dog" / "00.jpg")
    git("init", "-q", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "-qm", "x", cwd=repo)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    target = fetch_data.fetch("dreambench", tmp_path / "data", from_clone=repo)
    source = json.loads((target / "SOURCE.json").read_text())
    assert source["commit"] == head and source["pinned_commit"] == fetch_data.DATASETS["dreambench"]["commit"]
    assert (target / "dog" / "00.jpg").exists()
