"""Peak memory of the evaluation stage against the number of images: flat, or growing with the run?

A run folder of N random 1024 px PNGs with valid records (2 or 3 subjects each, a few reference images) is
written directly, without generating, and ``scripts/evaluate.py`` scores it with the tiny evaluators
(``eval=tiny``) in a process of its own, started with glibc set to map every allocation of 64 KiB or more on
its own and unmap it when freed (``MALLOC_MMAP_THRESHOLD_``, :data:`benchmarks.common.EXACT_RSS_ENV`), so
that RSS follows what is alive (with glibc's default a freed 3 MiB image may stay in the heap, and the peak
says more about fragmentation than about what the stage holds). The peak RSS of that process is read from
the kernel (``wait4``'s ``ru_maxrss``). The tiny evaluators keep the models small, so what is left is what
the stage holds per image: an evaluation that decodes every image before scoring grows by about 3 MiB an
image at 1024 px (plus PIL's own copies); a streaming one stays flat.

    python -m benchmarks.evaluate_memory [--images 20,300] [--size 1024] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import EXACT_RSS_ENV, REPO, load_average, log, machine

IMAGE_COUNTS = (20, 300)
TARGET_RATIO = 1.2  # peak RSS at the larger count over the smaller one
PHRASES = ["dog", "cat", "backpack"]
BOXES = [[0.05, 0.1, 0.45, 0.9], [0.55, 0.1, 0.95, 0.9], [0.3, 0.3, 0.7, 0.7]]


def _png(path: Path, size: int, seed: int) -> None:
    """Random pixels, drawn at a quarter of the size and scaled up (quick to write; 3 MiB a decoded image)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    small.resize((size, size), Image.NEAREST).save(path, format="PNG", compress_level=1)


def write_run(run_dir: Path, n_images: int, size: int = 1024) -> Path:
    """``n_images`` images of method ``bench`` (combinations of 2 and 3 subjects, seeds 0, 1, ...) and their records."""
    import runfolder

    refs = []
    for i, phrase in enumerate(PHRASES):
        ref = run_dir / "refs" / f"{phrase}.png"
        _png(ref, 256, 10_000 + i)
        refs.append(str(ref))
    records = runfolder.records_file(run_dir, "bench", (0, 1))
    lines = []
    for k in range(n_images):
        combo, seed, n = f"c{k % 10:02d}", k // 10, 2 + (k % 2)
        rel = runfolder.image_path("bench", combo, seed)
        _png(run_dir / rel, size, k)
        record = {
            "image": rel, "combination": combo, "method": "bench", "seed": seed,
            "prompt": " and ".join(f"a {p}" for p in PHRASES[:n]), "n_subjects": n, "width": size, "height": size,
            "subjects": [{"name": PHRASES[i], "phrase": PHRASES[i], "role": "object", "box": BOXES[i],
                          "references": [refs[i]]} for i in range(n)],
            "model": {"name": "synthetic"}, "config_hash": f"bench-{k}", "versions": {}, "git_hash": "none",
            "device": "cpu", "dtype": "float32", "seconds": None, "peak_memory_bytes": None, "created": 1.0,
            "image_sha256": runfolder.file_digest(run_dir / rel),
        }
        runfolder.validate_record(record, "benchmark record")
        lines.append(json.dumps(record, sort_keys=True) + "\n")
    records.parent.mkdir(parents=True, exist_ok=True)
    records.write_text("".join(lines))
    return run_dir


def peak_rss_of_evaluate(run_dir: Path, tiny_root: Path, repo: Path = REPO) -> dict:
    """Runs ``scripts/evaluate.py`` of ``repo`` on ``run_dir`` (eval=tiny) in a process of its own with
    :data:`EXACT_RSS_ENV`; its peak RSS (bytes) and wall time."""
    env = {**os.environ, **EXACT_RSS_ENV, "PYTHONPATH": str(repo)}
    cmd = [sys.executable, str(repo / "scripts" / "evaluate.py"), f"run_dir={run_dir}", "eval=tiny",
           f"eval.tiny_root={tiny_root}", "progress=false", "wandb=disabled", f"hydra.run.dir={run_dir}/logs/bench"]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"evaluate failed ({proc.returncode}):\n{text[-3000:]}")
    # the summary line (the first "evaluate:" line names the evaluators)
    summary = next((line for line in text.splitlines() if line.startswith("evaluate:") and "scored" in line), "")
    return {"peak_rss_bytes": int(usage.ru_maxrss) * 1024, "seconds": time.perf_counter() - start, "summary": summary}


def measure(counts=IMAGE_COUNTS, size: int = 1024, workdir: Path | None = None, repo: Path = REPO) -> dict:
    from benchmarks.common import cache_root
    from eval.tiny_evaluators import write_tiny_evaluators

    tiny_root = write_tiny_evaluators(cache_root() / "tiny_eval")
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for n in counts:
            run_dir = Path(tmp) / f"run{n}"
            log(f"  writing {n} random {size} px images and their records")
            write_run(run_dir, n, size)
            log(f"  evaluating {n} images (eval=tiny, {EXACT_RSS_ENV})")
            r = peak_rss_of_evaluate(run_dir, tiny_root, repo)
            log(f"  {n} images: peak RSS {r['peak_rss_bytes'] / 2**30:.3f} GiB in {r['seconds']:.0f} s ({r['summary']})")
            rows.append({"images": n, "image_size": size, **r})
            shutil.rmtree(run_dir)
    ratio = rows[-1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"]
    return {"rows": rows, "ratio": ratio, "target_ratio": TARGET_RATIO, "meets_target": ratio < TARGET_RATIO,
            "evaluators": "eval=tiny (tiny random models)", "env": EXACT_RSS_ENV}


def markdown(result: dict) -> str:
    lines = [f"Evaluation peak RSS against the number of images ({result['evaluators']}; random "
             f"{result['rows'][0]['image_size']} px PNGs; each run in a fresh process with "
             f"`MALLOC_MMAP_THRESHOLD_={result['env']['MALLOC_MMAP_THRESHOLD_']}`; peak from `wait4`).", "",
             "| images | peak RSS (GiB) | wall (s) |", "|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['images']} | {r['peak_rss_bytes'] / 2**30:.3f} | {r['seconds']:.0f} |")
    lines += ["", f"Ratio {result['rows'][-1]['images']} / {result['rows'][0]['images']} images: "
              f"**{result['ratio']:.3f}** (target < {result['target_ratio']}: "
              f"{'met' if result['meets_target'] else 'NOT met'})."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=",".join(map(str, IMAGE_COUNTS)))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose scripts/evaluate.py is measured")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--label", default="", help="added to the results file name")
    args = parser.parse_args(argv)
    import runfolder

    load = {"start": load_average()}
    result = measure([int(n) for n in args.images.split(",")], args.size, repo=Path(args.repo))
    load["end"] = load_average()
    result.update({"machine": machine(), "load_average": load, "measured_repo": args.repo,
                   **runfolder.provenance()})
    md = markdown(result)
    print(md)
    out = Path(args.out)
    stem = f"{datetime.date.today().isoformat()}-cpu{os.cpu_count()}-evaluate_memory{args.label}"
    runfolder.write_json(out / f"{stem}.json", result)
    runfolder.atomic_write(out / f"{stem}.md", lambda p: p.write_text(
        f"# Evaluation memory against the number of images\n\n{md}\n\nscripts/evaluate.py of {args.repo}; benchmark at git "
        f"{result['git_hash']}; load average {load}\n"))
    print(f"\nwrote {out / stem}.md and .json")


if __name__ == "__main__":
    main()
