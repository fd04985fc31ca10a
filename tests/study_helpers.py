"""Test helpers for the human study (issue 19): a synthetic run folder (random images, valid records, a
metrics.parquet with controlled values), a study server process, and small HTTP helpers."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

import runfolder

from .conftest import REPO

METHODS = ("anyms", "ms_diffusion", "text_only")
PHRASES = ["dog", "cat", "backpack", "vase"]
BOXES = [[0.05, 0.1, 0.45, 0.9], [0.55, 0.1, 0.95, 0.9], [0.3, 0.3, 0.7, 0.7], [0.1, 0.6, 0.4, 0.95]]
# combination -> number of subjects: three subject counts, so cases spread across them
COMBINATIONS = {"c01": 2, "c02": 2, "c03": 3, "c04": 3, "c05": 4}


def _picture(path: Path, seed: int, size: int, label: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((size, size), Image.NEAREST)
    if label:
        ImageDraw.Draw(image).text((4, 4), label, fill="white")
    runfolder.save_png(image, path)


def write_study_run(run_dir: Path, methods=METHODS, seeds=(0, 1), size: int = 96) -> Path:
    """Images (random blocks) and records of every method x combination x seed, and a metrics.parquet whose
    per-image values are a known function of (method, combination, seed)."""
    run_dir = Path(run_dir)
    refs = run_dir / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(PHRASES):
        _picture(refs / f"{p}.png", 1000 + i, 64, p)
    rows, detections = [], []
    for mi, method in enumerate(methods):
        for ci, (combination, n) in enumerate(COMBINATIONS.items()):
            for seed in seeds:
                rel = runfolder.image_path(method, combination, seed)
                _picture(run_dir / rel, hash((mi, ci, seed)) % 2**31, size)
                subjects = [{"name": PHRASES[j], "phrase": PHRASES[j], "role": "object", "box": BOXES[j],
                             "references": [str(refs / f"{PHRASES[j]}.png")]} for j in range(n)]
                rec = {"image": rel, "combination": combination, "method": method, "seed": seed,
                       "prompt": " and ".join(f"a {p}" for p in PHRASES[:n]) + " in a garden", "n_subjects": n,
                       "width": size, "height": size, "subjects": subjects, "model": {"name": "synthetic"},
                       "config_hash": f"{method}-{combination}-{seed}", "versions": {"torch": "x"},
                       "git_hash": "gen-git-1", "device": "cpu", "dtype": "float32", "seconds": 1.0,
                       "peak_memory_bytes": 2**20, "created": 1.0,
                       "image_sha256": runfolder.file_digest(run_dir / rel)}
                runfolder.append_record(runfolder.records_file(run_dir, method, (0, 1)), rec)
                for j in range(n):
                    # anyms best on every metric, text_only worst; dreamsim reversed (a metric that disagrees)
                    score = {"anyms": 3.0, "ms_diffusion": 2.0, "text_only": 1.0}.get(method, 0.5) + 0.01 * j
                    x0, y0, x1, y1 = BOXES[j]
                    rows.append({"image": rel, "method": method, "combination": combination, "seed": seed,
                                 "subject": PHRASES[j], "phrase": PHRASES[j], "in_layout": True, "iou": score / 4,
                                 "clip_i": 20 * score, "dino": 10 * score, "dreamsim": 100 - 10 * score,
                                 "clip_t": 25 + score, "req_x0": x0, "req_y0": y0, "req_x1": x1, "req_y1": y1,
                                 "width": size, "height": size})
                    # anyms's detection is the box, ms_diffusion's 70% of it (IoU 0.7), text_only's a speck elsewhere
                    det = {"anyms": (x0, y0, x1, y1), "ms_diffusion": (x0, y0, x0 + 0.7 * (x1 - x0), y1)}.get(
                        method, (0.97, 0.0, 1.0, 0.03))
                    detections.append({"image": rel, "method": method, "combination": combination,
                                       "phrase": PHRASES[j], "score": 0.9, "box_score": 0.9, "phrase_score": 0.9,
                                       **dict(zip(("x0", "y0", "x1", "y1"), det))})
    pd.DataFrame(rows).to_parquet(run_dir / "metrics.parquet", index=False)
    pd.DataFrame(detections).to_parquet(run_dir / "detections.parquet", index=False)
    return run_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def study_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_study(*args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), *args], capture_output=True, text=True,
                         cwd=REPO, timeout=timeout, env=study_env())
    if check and out.returncode != 0:
        raise AssertionError(f"study {args[0]} failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}")
    return out


class Server:
    """``scripts/study.py serve`` as a child process (its own process group, so SIGKILL reaches it alone)."""

    def __init__(self, study_dir: Path, port: int | None = None):
        self.study_dir, self.port = Path(study_dir), port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        self.log = open(self.study_dir.parent / f"server-{self.port}-{time.time():.0f}.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "study.py"), "serve",
                                      f"study_dir={self.study_dir}", f"port={self.port}"], cwd=REPO, env=study_env(),
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {Path(self.log.name).read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError("server did not start in 60 s")

    def kill(self) -> None:
        """SIGKILL, no clean-up of any kind."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "log", None):
            self.log.close()


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


def options_of(html: str, criterion: str) -> list[str]:
    """The option ids of a case page for a criterion, in the order shown."""
    return re.findall(rf'name="{criterion}" value="(o[0-9a-f]+)"', html)
