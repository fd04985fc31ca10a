"""Where caches and weights live (conf/paths): one absolute default from any working directory, overridable,
and never part of a hash: moving the cache neither regenerates an image nor rescores one."""

import re

import pytest
from hydra import compose, initialize_config_dir

import runfolder
from eval.evaluate import eval_identity, run_evaluation

from .conftest import REPO, data_root

CONF = REPO / "conf"
DATA = data_root()


def composed(config: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=["run_dir=unused", *overrides])


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A HOME of the test's own, and neither path variable set."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ANYMS_CACHE", raising=False)
    monkeypatch.delenv("ANYMS_WEIGHTS", raising=False)
    return tmp_path / "home"


def locations(*overrides: str) -> dict:
    gen, ev, ev_default = (composed("generate", "model=tiny", *overrides), composed("evaluate", "eval=tiny", *overrides),
                           composed("evaluate", "eval=default", *overrides))
    return {"model": gen.model.tiny_root, "ms_diffusion": composed("generate", "method=ms_diffusion", *overrides).method.weights.tiny.repo,
            "eval": ev.eval.tiny_root, "sam": ev_default.eval.segmenter.checkpoint,
            "dreamsim": ev_default.eval.scorers.dreamsim.cache_dir}


def test_the_cache_is_the_same_from_any_working_directory(home, tmp_path, monkeypatch):
    cache = home / ".cache" / "anyms"
    expected = {"model": f"{cache}/tiny", "ms_diffusion": f"{cache}/tiny/MS-Diffusion", "eval": f"{cache}/tiny_eval",
                "sam": f"{cache}/weights/sam_vit_h_4b8939.pth", "dreamsim": f"{cache}/weights/dreamsim"}
    for cwd in (REPO, tmp_path):
        monkeypatch.chdir(cwd)
        assert locations() == expected
    from benchmarks.common import cache_root

    assert cache_root() == cache  # the benchmarks read the same rule


def test_environment_and_command_line_move_the_caches(home, monkeypatch):
    monkeypatch.setenv("ANYMS_CACHE", "/scratch/c")
    monkeypatch.setenv("ANYMS_WEIGHTS", "/w")
    assert locations() == {"model": "/scratch/c/tiny", "ms_diffusion": "/scratch/c/tiny/MS-Diffusion",
                           "eval": "/scratch/c/tiny_eval", "sam": "/w/sam_vit_h_4b8939.pth", "dreamsim": "/w/dreamsim"}
    moved = locations("paths.cache_dir=/x", "paths.weights_dir=/y")
    assert moved["model"] == "/x/tiny" and moved["eval"] == "/x/tiny_eval" and moved["sam"] == "/y/sam_vit_h_4b8939.pth"


def test_no_config_names_a_cache_relative_to_the_working_directory():
    texts = {p.relative_to(CONF): p.read_text() for p in CONF.rglob("*.yaml")}
    assert not [p for p, t in texts.items() if ".cache/anyms" in t and str(p) != "paths/default.yaml"]
    assert not [p for p, t in texts.items() if re.search(r"oc\.env:ANYMS_(CACHE|WEIGHTS)", t) and str(p) != "paths/default.yaml"]


def test_evaluation_hashes_ignore_where_weights_and_caches_live():
    for protocol in ("default", "msbench", "tiny", "tiny_msbench"):
        hashes = {runfolder.config_hash(eval_identity(composed("evaluate", f"eval={protocol}", *o).eval))
                  for o in ([], ["paths.cache_dir=/a"], ["paths.weights_dir=/b"], ["eval.weights_dir=/c"])}
        assert len(hashes) == 1, protocol


def symlinked_cache(tmp_path, name: str, target):
    """Another cache folder whose ``name`` entry is the session's (a move of the cache, without a copy)."""
    other = tmp_path / f"other-cache-{name}"
    other.mkdir()
    (other / name).symlink_to(target, target_is_directory=True)
    return other


@pytest.mark.skipif(DATA is None, reason="needs the DreamBench images")
def test_moving_the_cache_neither_regenerates_nor_rescores(tmp_path, tiny_root, tiny_eval_root):
    from anyms.generation.generate import run_generation

    from .test_evaluate import eval_cfg
    from .test_generate import make_cfg

    run = tmp_path / "run"
    common = ("model=tiny", "benchmark=smoke", "benchmark.seeds=[0]", "contact_sheets=false")
    first = run_generation(make_cfg(run, *common, f"paths.cache_dir={tiny_root.parent}"))
    moved = symlinked_cache(tmp_path, "tiny", tiny_root)
    again = run_generation(make_cfg(run, *common, f"paths.cache_dir={moved}"))
    assert first.generated and not again.generated and again.skipped == first.planned

    scored = run_evaluation(eval_cfg(run, f"paths.cache_dir={tiny_eval_root.parent}"))
    moved_eval = symlinked_cache(tmp_path, "tiny_eval", tiny_eval_root)
    rescored = run_evaluation(eval_cfg(run, f"paths.cache_dir={moved_eval}"))
    assert scored.scored and not rescored.scored and rescored.skipped == scored.planned
