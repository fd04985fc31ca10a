"""Test helper: a run folder of random images and valid records written directly (no generation), with
real PNG references, for evaluation tests that need the tiny evaluators (``eval=tiny``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import runfolder

from .conftest import REPO

BOXES = [[0.05, 0.1, 0.45, 0.9], [0.55, 0.1, 0.95, 0.9], [0.3, 0.3, 0.7, 0.7]]
PHRASES = ["dog", "cat", "backpack"]


def random_png(path: Path, size: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    runfolder.save_png(image, path)
    return runfolder.file_digest(path)


def record(run_dir: Path, method: str, combination: str, seed: int, n_subjects: int = 2, size: int = 64,
           settings: dict | None = None, device: str = "cpu", image_seed: int | None = None, **extra) -> dict:
    """Writes the image (random pixels) and returns its record (not yet appended)."""
    run_dir = Path(run_dir)
    refs = run_dir / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    subjects = []
    for i in range(n_subjects):
        ref = refs / f"{PHRASES[i]}.png"
        if not ref.exists():
            random_png(ref, 32, 1000 + i)
        subjects.append({"name": PHRASES[i], "phrase": PHRASES[i], "role": "object", "box": BOXES[i],
                         "references": [str(ref)]})
    rel = runfolder.image_path(method, combination, seed)
    digest = random_png(run_dir / rel, size, image_seed if image_seed is not None else hash((method, combination, seed)) % 2**32)
    rec = {
        "image": rel, "combination": combination, "method": method, "seed": seed,
        "prompt": " and ".join(f"a {p}" for p in PHRASES[:n_subjects]), "n_subjects": n_subjects,
        "width": size, "height": size, "subjects": subjects, "model": {"name": "synthetic"},
        "config_hash": f"{method}-{combination}-{seed}", "versions": {"torch": "x"}, "git_hash": "gen-git-1",
        "device": device, "dtype": "float32", "seconds": 1.0, "peak_memory_bytes": 2**30, "created": 1.0,
        "image_sha256": digest,
    }
    if settings is not None:
        rec["settings"] = settings
    rec.update(extra)
    return rec


def write_run(run_dir: Path, method: str = "anyms", combinations=("c01", "c02"), seeds=(0, 1), size: int = 64,
              settings: dict | None = None, **extra) -> list[dict]:
    """Images and records of ``method`` for every (combination, seed); the records file and plan."""
    run_dir = Path(run_dir)
    records = []
    for c in combinations:
        for s in seeds:
            rec = record(run_dir, method, c, s, n_subjects=2 + (c == "c02"), size=size, settings=settings, **extra)
            runfolder.append_record(runfolder.records_file(run_dir, method, (0, 1)), rec)
            records.append(rec)
    runfolder.write_plan(run_dir, method, (0, 1), [r["image"] for r in records])
    return records


def evaluate_command(run_dir: Path, tiny_eval_root: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "evaluate.py"), f"run_dir={run_dir}", "eval=tiny",
            f"eval.tiny_root={tiny_eval_root}", "progress=false", "wandb=disabled", *overrides]


def run_evaluate(run_dir: Path, tiny_eval_root: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(evaluate_command(run_dir, tiny_eval_root, *overrides), capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"evaluate failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}")
    return out


def rewrite_record(run_dir: Path, method: str, image: str, **changes) -> None:
    """Appends a newer record for ``image`` with ``changes`` (the newest record of an image stands)."""
    old = next(r for r in runfolder.read_records(run_dir) if r["image"] == image)
    new = {**old, **changes, "created": old["created"] + 1}
    runfolder.append_record(runfolder.records_file(run_dir, method, (0, 1)), new)


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_reported_run(run_dir: Path, tiny_eval_root: Path, methods=("anyms", "text_only")) -> Path:
    """A run folder of random images for ``methods`` (2 combinations x 2 seeds each), evaluated with the tiny
    evaluators and reported (tables, figures, HTML) into ``run_dir/report``, in this process."""
    from eval.evaluate import run_evaluation
    from eval.report import run_report

    from .test_evaluate import eval_cfg

    for method in methods:
        write_run(run_dir, method)
    run_evaluation(eval_cfg(run_dir, tiny_root=tiny_eval_root))
    run_report([run_dir], run_dir / "report", {"samples": 20, "ap_samples": 5, "seed": 0})
    return Path(run_dir)
