"""Bad input to the generation stage: each gets one message naming the field or file and the fix, before any
model loads and before anything is written (issue 13, items 5 and 6)."""

import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import anyms.generation.generate
from anyms.benchmark import BenchmarkConfigError
from anyms.generation.generate import GenerationConfigError, run_generation
from runfolder.references import MIN_SIDE, ReferenceImageError, load_reference

from .conftest import REPO
from .test_generate import DATA, make_cfg, needs_data

BOX = [[0.1, 0.1, 0.5, 0.9], [0.5, 0.1, 0.9, 0.9]]


def photo(seed: int, size=64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def data(tmp_path):
    """A data root with two subjects: ``a`` (two references) and ``b`` (one)."""
    root = tmp_path / "data"
    for name, n in (("a", 2), ("b", 1)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            photo(10 * len(name) + i).save(root / name / f"{i}.jpg", quality=95)
    return root


def cfg_for(tmp_path, data, *overrides, run_dir=None):
    cfg = make_cfg(run_dir or tmp_path / "run", *overrides, data=data)
    cfg.benchmark = OmegaConf.create({"name": "t", "seeds": [0], "only": None, "combinations": {"c1": {
        "prompt": "a dog and a cat", "boxes": BOX,
        "subjects": [{"name": "a", "image": "a", "phrase": "dog"}, {"name": "b", "image": "b", "phrase": "cat"}]}}})
    if "benchmark.seeds=-1" in overrides:
        cfg.benchmark.seeds = -1
    return cfg


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded: every error below must come first."""
    def load(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(anyms.generation.generate, "load_model", load)


def truncated(path):
    photo(1).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_REFERENCES = {
    "truncated jpeg": ("a/0.jpg", truncated, "a/0.jpg: not a readable image"),
    "text named .jpg": ("a/0.jpg", lambda p: p.write_text("not an image"), "a/0.jpg: not a readable image"),
    "0-byte file": ("a/0.jpg", lambda p: p.write_bytes(b""), "a/0.jpg: the file is empty"),
    # the second reference is never seen by the adapter; before, it passed generation and failed in evaluate
    "corrupt second reference": ("a/1.jpg", truncated, "a/1.jpg: not a readable image"),
    "1x1 image": ("b/0.jpg", lambda p: Image.new("RGB", (1, 1)).save(p), f"1 x 1 pixels, smaller than {MIN_SIDE}"),
}


@pytest.mark.parametrize("case", sorted(BAD_REFERENCES))
def test_bad_reference_images_fail_before_any_model_loads(case, tmp_path, data, no_model):
    rel, corrupt, message = BAD_REFERENCES[case]
    corrupt(data / rel)
    cfg = cfg_for(tmp_path, data, "model=tiny")
    with pytest.raises(ReferenceImageError, match=message) as err:
        run_generation(cfg)
    assert "replace the file" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # no plan, no lock, no records: nothing written


CONFIG_ERRORS = [
    (["benchmark.seeds=-1"], BenchmarkConfigError, "benchmark.seeds: seeds must be non-negative"),
    (["generation.steps=0"], GenerationConfigError, "generation.steps: must be >= 1, got 0"),
    (["generation.height=100"], GenerationConfigError, "generation.height: must be a multiple of 8"),
    (["generation.guidance_scale=abc"], GenerationConfigError, "generation.guidance_scale: expected a number, got 'abc'"),
    (["generation.steps=2.5"], GenerationConfigError, "generation.steps: expected an integer"),
    (["method.adapter_scale=high"], GenerationConfigError, "method.adapter_scale: expected a number"),
    (["model=sd15", "model.pretrained=/nowhere/sd15"], GenerationConfigError, "model.pretrained: /nowhere/sd15 does not exist"),
    (["model=sdxl", "model.ip_adapter.repo=./no/such/folder"], GenerationConfigError, "model.ip_adapter.repo: ./no/such/folder"),
    (["model=sdxl", "method=ms_diffusion", "method.weights.sdxl.image_encoder=/nowhere/bigG"], GenerationConfigError,
     "method.weights.sdxl.image_encoder: /nowhere/bigG"),
    (["model=tiny", "model.dtype=fp8"], GenerationConfigError, "model.dtype 'fp8' is not one of"),
]


@pytest.mark.parametrize("overrides,error,message", CONFIG_ERRORS, ids=[" ".join(c[0]) for c in CONFIG_ERRORS])
def test_bad_settings_fail_before_any_model_loads(overrides, error, message, tmp_path, data, no_model):
    with pytest.raises(error, match=message):
        run_generation(cfg_for(tmp_path, data, *overrides))
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_is_a_file_or_under_one(tmp_path, data, no_model):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GenerationConfigError, match=r"run_dir: .*file is a file"):
        run_generation(cfg_for(tmp_path, data, run_dir=blocker))
    with pytest.raises(GenerationConfigError, match=r"run_dir: .*file/run lies under .*file, which is a file"):
        run_generation(cfg_for(tmp_path, data, run_dir=blocker / "run"))


@needs_data
@pytest.mark.parametrize("override,message", [
    ("benchmark.seeds=-1", "generate: benchmark.seeds: seeds must be non-negative integers, got -1"),
    ("generation.guidance_scale=abc", "generate: generation.guidance_scale: expected a number, got 'abc'"),
])
def test_the_script_prints_one_line_and_writes_nothing(override, message, tmp_path):
    cmd = [sys.executable, str(REPO / "scripts/generate.py"), "model=tiny", "benchmark=smoke", override,
           f"run_dir={tmp_path / 'run'}", f"data_root={DATA}", "wandb=disabled", "progress=false"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr  # 2: bad input (issue 32)
    assert out.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / "run").exists()  # not even Hydra's log folder (issue 32)


# --- normalization: the same for generation and evaluation -------------------------------------------------

def test_sixteen_bit_and_transparent_references_are_normalized(tmp_path):
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (48, 40), dtype=np.uint16)
    Image.fromarray(eight * 257).save(tmp_path / "g16.png")  # 16-bit grayscale: Pillow opens it as I;16
    old = np.asarray(Image.open(tmp_path / "g16.png").convert("RGB"))  # the old way: clipped, almost all white
    assert (old == 255).mean() > 0.95
    got = np.asarray(load_reference(tmp_path / "g16.png"))
    assert got.shape == (48, 40, 3) and (got == eight[..., None]).all()

    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:20, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = np.asarray(load_reference(tmp_path / "a.png"))
    assert (got[:20] == [200, 0, 0]).all() and (got[20:] == 255).all()  # on white, not black


def test_generation_sees_a_16_bit_reference_as_its_8_bit_image(tmp_path, tiny_root):
    from anyms.methods.ip_adapter import IPAdapterMethod

    eight = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "rgb8.png")
    gray = eight[..., 0].astype(np.uint16)
    Image.fromarray(gray * 257).save(tmp_path / "g16.png")
    Image.fromarray(gray.astype(np.uint8)).convert("RGB").save(tmp_path / "g8.png")
    pipe = IPAdapterMethod(name="anyms", model=dict(name="tiny", kind="sdxl", pretrained=str(tiny_root / "sdxl"), size=64,
                         ip_adapter={"repo": str(tiny_root / "IP-Adapter"), "subfolder": "sdxl_models",
                                     "weight_name": "ip-adapter-plus_sdxl_vit-h.safetensors",
                                     "image_encoder_folder": "models/image_encoder", "plus": True}))
    e16 = pipe.subject_embeddings([str(tmp_path / "g16.png")], cfg=True)
    e8 = pipe.subject_embeddings([str(tmp_path / "g8.png")], cfg=True)
    assert torch_equal(e16, e8)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


@pytest.mark.parametrize("under", [False, True])
def test_the_script_refuses_a_run_dir_that_is_a_file_before_hydra_writes_its_logs(under, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    run_dir = blocker / "run" if under else blocker
    for script in ("generate.py", "import_images.py"):
        # import's required keys given (each command's check names the first thing missing: issue 32)
        given = [f"source={tmp_path}", "method=mudi"] if script == "import_images.py" else []
        cmd = [sys.executable, str(REPO / "scripts" / script), *given, f"run_dir={run_dir}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]  # 2: bad input (issue 32)
        stage = "generate" if script == "generate.py" else "import"
        assert out.stderr.strip().splitlines()[-1].startswith(f"{stage}: run_dir: {run_dir} ")
    assert blocker.read_text() == "x"
