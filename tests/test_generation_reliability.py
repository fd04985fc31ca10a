"""Generation the way it fails: processes killed with SIGKILL, two writers at once, runs that change their
settings, interrupted writes (issue 13, items 4, 7, 8, 9). Real `scripts/generate.py` processes on the tiny models."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runfolder
from anyms.generation.generate import image_config_hash, model_identity, run_generation
from anyms.benchmark import load_combinations
from runfolder.lock import writer_lock

from .conftest import REPO
from .test_generate import DATA, make_cfg, needs_data

pytestmark = needs_data
# two combinations x three seeds: a kill can land between combinations, before the sheets, mid-image
ARGS = ["model=tiny", "benchmark=smoke", "benchmark.only=[c01,c02]", "benchmark.seeds=[0,1,2]", "progress=false",
        "wandb=disabled"]


def command(run_dir: Path, tiny_root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts/generate.py"), *ARGS, f"run_dir={run_dir}", f"data_root={DATA}",
            f"model.tiny_root={tiny_root}", *extra]


def pngs(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "images").rglob("[0-9]*.png"))}


def leftovers(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if ".tmp" in p.name]


def record_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((run_dir / "records").glob("*.jsonl")) for line in f.read_text().splitlines()
            if line.strip()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_root):
    """The same work, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    out = subprocess.run(command(run_dir, tiny_root), capture_output=True, text=True, timeout=600, cwd=run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_the_same_bytes(tmp_path, tiny_root, reference_run):
    rng = random.Random(int(os.environ.get("ANYMS_KILL_SEED", "13")))
    run_dir = tmp_path / "killed"
    kills = 0
    for _ in range(3):
        n_before = len(pngs(run_dir)) if run_dir.exists() else 0
        if n_before >= 6:
            break
        proc = subprocess.Popen(command(run_dir, tiny_root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
        target = rng.randint(n_before + 1, 6)  # kill after this many images exist, plus a random fraction of one
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if run_dir.exists() and len(pngs(run_dir)) >= target:
                time.sleep(rng.uniform(0.0, 0.6))
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 1
    # a write cut mid-file, as a kill inside save_png leaves it (the moment is too short to hit by timing alone)
    combo = run_dir / "images" / "anyms" / "c02"
    combo.mkdir(parents=True, exist_ok=True)
    (combo / ".2.png.k1ll3d.tmp.png").write_bytes(b"\x89PNG half")
    (run_dir / "plans" / ".anyms.0-of-1.json.x.tmp.json").write_text("{")

    out = subprocess.run(command(run_dir, tiny_root), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert pngs(run_dir) == pngs(reference_run)  # byte-identical to the uninterrupted run
    assert leftovers(run_dir) == []
    for c in ("c01", "c02"):  # every contact sheet, newer than every image of its combination
        sheet = run_dir / "images" / "anyms" / c / "contact_sheet.png"
        assert sheet.exists(), f"no contact sheet for {c}"
        assert all(sheet.stat().st_mtime_ns >= p.stat().st_mtime_ns for p in sheet.parent.glob("[0-9]*.png"))
    images = [r["image"] for r in runfolder.read_records(run_dir)]
    assert sorted(images) == sorted(pngs(reference_run))


def test_a_second_writer_stops_naming_the_first(tmp_path, tiny_root):
    run_dir = tmp_path / "run"
    with writer_lock(run_dir, "generate", "anyms.0-of-1"):
        out = subprocess.run(command(run_dir, tiny_root), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"generate of anyms.0-of-1 in {run_dir} is already running: pid {os.getpid()}" in out.stderr
    assert not (run_dir / "records").exists() and not (run_dir / "plans").exists()
    # another shard of the same method is another writer: not blocked
    with writer_lock(run_dir, "generate", "anyms.0-of-1"):
        out = subprocess.run(command(run_dir, tiny_root, "shard=1/2"), capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]


def test_two_writers_started_together_write_each_image_once(tmp_path, tiny_root):
    run_dir = tmp_path / "run"
    procs = [subprocess.Popen(command(run_dir, tiny_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    lines = record_lines(run_dir)
    assert len(lines) == len({r["image"] for r in lines}) == 6  # before: every record twice
    if codes == [0, 1]:  # they overlapped: the second stopped at once
        assert any("is already running: pid" in err for _, err in outs)
    else:  # the second started after the first had finished: it had nothing left to do
        assert codes == [0, 0] and any("0 image(s) generated, 6 already there" in out for out, _ in outs)


def test_plans_accumulate_and_a_failed_validation_writes_nothing(tmp_path, tiny_root):
    run_dir = tmp_path / "run"
    plan = run_dir / "plans" / "anyms.0-of-1.json"
    run_generation(make_cfg(run_dir, "model=tiny", "benchmark=smoke", "benchmark.seeds=[0,1]", tiny_root=tiny_root))
    run_generation(make_cfg(run_dir, "model=tiny", "benchmark=smoke", "benchmark.seeds=[2]", tiny_root=tiny_root))
    expected = [f"images/anyms/c02/{s}.png" for s in (0, 1, 2)]
    assert json.loads(plan.read_text())["images"] == expected  # before: only seed 2's
    before = plan.read_bytes()
    with pytest.raises(Exception, match="generation.steps"):
        run_generation(make_cfg(run_dir, "model=tiny", "benchmark=smoke", "benchmark.seeds=[5]", "generation.steps=0",
                                tiny_root=tiny_root))
    assert plan.read_bytes() == before


def test_the_hash_sees_threads_resolved_dtype_and_device(tmp_path, monkeypatch):
    import torch

    import anyms.methods.loading

    def hash_of(*overrides):
        cfg = make_cfg(tmp_path, "model=tiny", "benchmark=smoke", *overrides)
        combo = load_combinations(cfg.benchmark, DATA)[0]
        return image_config_hash(cfg, combo, 0)

    assert hash_of("model.torch_threads=1") != hash_of("model.torch_threads=2")  # 6 of 22 PNGs differ
    assert hash_of("model.dtype=auto") == hash_of("model.dtype=fp32")  # auto is fp32 on the CPU: the same bytes
    cpu_auto = hash_of("model.dtype=auto")
    monkeypatch.setattr(anyms.methods.loading, "resolve_device", lambda device="auto": torch.device("cuda"))
    assert hash_of("model.dtype=auto") != cpu_auto  # fp16 on CUDA
    cfg = make_cfg(tmp_path, "model=tiny", "model.dtype=auto")
    assert model_identity(cfg.model, cfg.method)["dtype"] == "float16"
    assert model_identity(cfg.model, cfg.method)["device_type"] == "cuda"


def test_a_resumed_run_with_other_threads_does_not_mix(tmp_path, tiny_root):
    run_dir = tmp_path / "run"
    first = run_generation(make_cfg(run_dir, "model=tiny", "benchmark=smoke", "model.torch_threads=1", tiny_root=tiny_root))
    again = run_generation(make_cfg(run_dir, "model=tiny", "benchmark=smoke", "model.torch_threads=2", tiny_root=tiny_root))
    assert len(first.generated) == 2 and again.skipped == 0 and len(again.generated) == 2
    assert {r["model"]["torch_threads"] for r in runfolder.read_records(run_dir)} == {2}
