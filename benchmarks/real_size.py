"""``make check-real-size``: the paper's models at their real architectures, with random weights, through the
whole generation and evaluation path, before anyone pays for GPU hours.

1. **write** (once, under ``<paths.cache_dir>/real_size``: $ANYMS_CACHE, else ``~/.cache/anyms``): SDXL base 1.0, IP-Adapter Plus
   SDXL with its ViT-H/14 image encoder, MS-Diffusion's ``ms_adapter.bin`` at the released resampler sizes with
   the CLIP ViT-bigG/14 model, GroundingDINO SwinT and SAM ViT-H, in the hub repos' layouts
   (:mod:`benchmarks.real_size_models`); CLIP ViT-B/32, DINOv2 ViT-S/14 and DreamSim's ensemble as
   :mod:`benchmarks.evaluate` writes them;
2. **generate anyms** and 3. **generate ms_diffusion**: ``scripts/generate.py model=sdxl`` pointed at those folders
   (``model.pretrained``, ``model.ip_adapter.repo``, ``method.weights.sdxl.repo``, ``method.weights.sdxl.image_encoder``),
   1024 px, 2 steps, ``benchmark=real_size`` (one combination of two overlapping subjects, one seed): one image
   per method, through the real loading code;
4. **evaluate**: ``scripts/evaluate.py eval=default`` pointed at the random evaluators: every metric;

each stage in a process of its own, its peak memory measured (peak RSS of the process, from ``wait4``; on CUDA
also the peak allocated, reported by the process). bf16 on the CPU (fp32 SDXL + bigG does not fit in 24 GiB),
fp16 on CUDA; the evaluators run as ``eval=default`` runs them (fp32). A failing stage fails the check with the
tail of its output; so do a missing image, a wrong size or dtype in a record, a metric missing or NaN.
Writes ``benchmarks/results/<date>-<device>-real_size.{json,md}`` and prints the table.

    python -m benchmarks.real_size [--device auto] [--dtype auto] [--run-dir DIR] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository's root on the path, as for `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, cache_root, device_name, fmt_bytes, log, resolve_device  # noqa: E402

BENCHMARK = "real_size"  # conf/benchmark/real_size.yaml
METHODS = ("anyms", "ms_diffusion")
STEPS = 2
SIZE = 1024
STAGE_REPORT_ENV = "ANYMS_REAL_SIZE_STAGE_REPORT"
TAIL_CHARS = 4000
IDENTITY_METRICS = ("clip_i", "dino", "dreamsim", "clip_t", "iou")


class CheckFailed(RuntimeError):
    """A stage failed or its output is wrong: the message says which and why."""


# ------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    name: str
    command: list[str]
    seconds: float = 0.0
    peak_rss_bytes: int | None = None
    cuda_peak_bytes: int | None = None
    returncode: int | None = None
    peak_anon_bytes: int | None = None  # sampled: the largest RssAnon seen (memory not backed by a file)
    output_tail: str = ""
    extra: dict = field(default_factory=dict)


def run_stage(stage: Stage, env: dict | None = None, log_dir: Path | None = None) -> Stage:
    """Runs ``stage.command`` in a process of its own (stdout and stderr to a log file), and fills in its seconds,
    peak RSS (``wait4``: that process and the children it waited for), the CUDA peak it reported and its output's
    tail. Raises :class:`CheckFailed` with that tail when it exits non-zero."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="real_size-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, report = log_dir / f"{stage.name}.log", log_dir / f"{stage.name}.report.json"
    report.unlink(missing_ok=True)
    env = {**(env or os.environ), STAGE_REPORT_ENV: str(report)}
    log(f"[{stage.name}] {' '.join(stage.command[1:])}")
    start = time.perf_counter()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(stage.command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = AnonSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.stop()
    stage.peak_anon_bytes = sampler.peak
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    stage.seconds = time.perf_counter() - start
    stage.returncode = proc.returncode
    stage.peak_rss_bytes = int(usage.ru_maxrss) * 1024  # kilobytes on Linux
    if report.exists():
        info = json.loads(report.read_text())
        stage.cuda_peak_bytes = info.get("cuda_peak_bytes")
    text = out_path.read_text(errors="replace")
    stage.output_tail = text[-TAIL_CHARS:]
    log(f"[{stage.name}] exit {stage.returncode}, {stage.seconds:.0f} s, peak RSS {fmt_bytes(stage.peak_rss_bytes)} "
        f"(anonymous {fmt_bytes(stage.peak_anon_bytes)})"
        + (f", CUDA peak {fmt_bytes(stage.cuda_peak_bytes)}" if stage.cuda_peak_bytes is not None else ""))
    if stage.returncode != 0:
        raise CheckFailed(f"stage {stage.name!r} failed (exit {stage.returncode}); log {out_path}; its last lines:\n"
                          + _last_lines(text, 40))
    return stage


class AnonSampler:
    """Samples a process's ``RssAnon`` (resident memory not backed by a file) every ``interval`` seconds. Peak RSS
    also counts the pages of weight files mapped into memory (safetensors loads map them), which the kernel can drop
    and read again; anonymous memory it cannot."""

    def __init__(self, pid: int, interval: float = 0.5):
        import threading

        self.pid, self.interval, self.peak = pid, interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            value = int(line.split()[1]) * 1024
                            self.peak = max(self.peak or 0, value)
            except (OSError, ValueError):
                pass
            self._stop.wait(self.interval)


def _last_lines(text: str, n: int) -> str:
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def child_main(script: str, args: list[str]) -> None:
    """In a stage's process: runs ``script`` as ``__main__`` with ``args``, then writes the CUDA peak allocated
    (null without CUDA) to the file named by :data:`STAGE_REPORT_ENV`, even when the script fails."""
    import atexit
    import runpy

    report = os.environ.get(STAGE_REPORT_ENV)

    def dump() -> None:
        peak = None
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = int(torch.cuda.max_memory_allocated())
        if report:
            Path(report).write_text(json.dumps({"cuda_peak_bytes": peak}))

    atexit.register(dump)
    sys.argv = [script, *args]
    sys.path.insert(0, str(REPO))
    runpy.run_path(script, run_name="__main__")


def _child(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.real_size", "--child", script, *args]


# ------------------------------------------------------------------------------------------- the check


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: fp16 on CUDA; bf16 on the CPU (SDXL and bigG in fp32 do not fit in 24 GiB; bf16 matmuls are
    fast on CPUs with AMX / avx512_bf16)."""
    if dtype == "auto":
        return "fp16" if device.startswith("cuda") else "bf16"
    return dtype


def generate_overrides(folders: dict, run_dir: Path, method: str, dtype: str, device: str, steps: int = STEPS,
                       tiny_size: int | None = None) -> list[str]:
    """``scripts/generate.py`` overrides: ``model=sdxl`` pointed at the written folders."""
    overrides = [
        "model=sdxl", f"model.pretrained={folders['sdxl']}", f"model.ip_adapter.repo={folders['ip_adapter']}",
        f"model.dtype={dtype}", f"model.device={device}", f"method={method}", f"benchmark={BENCHMARK}",
        f"generation.steps={steps}", f"run_dir={run_dir}", "wandb=disabled", "progress=false",
    ]
    if method == "ms_diffusion":  # its weights live in its own config, per base model (conf/method/ms_diffusion.yaml)
        overrides += [f"method.weights.sdxl.repo={folders['ms_diffusion']}",
                      f"method.weights.sdxl.image_encoder={folders['bigg']}"]
    if tiny_size:  # the tests' tiny architectures: their own size and resampler
        overrides += [f"model.size={tiny_size}"]
    return overrides


def evaluate_overrides(folders: dict, scorers: Path, run_dir: Path, device: str, tiny: bool = False) -> list[str]:
    """``scripts/evaluate.py eval=default`` overrides pointing every evaluator at the random checkpoints."""
    ev = folders["evaluators"]
    from benchmarks.real_size_models import GROUNDING_DINO_DIR, SAM_FILE

    overrides = [
        f"run_dir={run_dir}", "eval=default", f"eval.device={device}", f"eval.weights_dir={ev}",
        f"eval.detector.model_id_or_path={ev / GROUNDING_DINO_DIR}", f"eval.segmenter.checkpoint={ev / SAM_FILE}",
        f"eval.scorers.clip.model_name=local-dir:{scorers / 'open_clip'}", "eval.scorers.clip.pretrained=null",
        f"eval.scorers.dino.model={scorers / 'dinov2-small'}", f"eval.scorers.dreamsim.cache_dir={scorers / 'dreamsim'}",
        "wandb=disabled", "progress=false",
    ]
    if tiny:
        overrides += ["eval.segmenter.model_type=tiny", "eval.scorers.dreamsim.dreamsim_type=open_clip_vitb32"]
    return overrides


def check_outputs(run_dir: Path, dtype: str, size: int, methods=METHODS) -> dict:
    """What the stages must have produced: one record and image per method at ``size`` px in ``dtype``, and
    every metric of every subject, none missing or NaN. Returns what was found; raises :class:`CheckFailed`."""
    import math

    import pandas as pd
    from PIL import Image

    import runfolder
    from anyms.methods.loading import resolve_dtype as torch_dtype

    records = runfolder.read_records(run_dir)
    problems, found = [], {"images": {}}
    want_dtype = str(torch_dtype(dtype, __import__("torch").device("cpu")))
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        if len(mine) != 1:
            problems.append(f"{method}: {len(mine)} records, expected 1")
            continue
        r = mine[0]
        with Image.open(run_dir / r["image"]) as im:
            im_size, pixels = im.size, im.convert("L").getextrema()
        found["images"][method] = {"image": r["image"], "size": list(im_size), "dtype": r["dtype"], "device": r["device"],
                                   "seconds": r.get("seconds"), "peak_memory_bytes": r.get("peak_memory_bytes"),
                                   "grey_range": list(pixels)}
        if tuple(im_size) != (size, size) or (r["width"], r["height"]) != (size, size):
            problems.append(f"{method}: image {im_size}, record {r['width']}x{r['height']}; expected {size}x{size}")
        if r["dtype"] not in (want_dtype, want_dtype.removeprefix("torch."), dtype):
            problems.append(f"{method}: record dtype {r['dtype']!r}, expected {want_dtype}")
        if pixels[0] == pixels[1]:
            found.setdefault("warnings", []).append(f"{method}: a constant image (NaN latents decode to black)")
    metrics = pd.read_parquet(run_dir / "metrics.parquet") if (run_dir / "metrics.parquet").exists() else pd.DataFrame()
    expected_rows = sum(len(r["subjects"]) for r in records)
    found["metric_rows"] = len(metrics)
    if len(metrics) != expected_rows:
        problems.append(f"metrics.parquet has {len(metrics)} rows, expected {expected_rows} (images x subjects)")
    for column in IDENTITY_METRICS:
        if column not in metrics:
            problems.append(f"metrics.parquet has no column {column!r}")
        elif any(not math.isfinite(float(v)) for v in metrics[column]):
            problems.append(f"metrics.parquet: {column} is NaN or infinite in some row")
    if len(metrics):
        found["metrics_mean"] = {c: round(float(metrics[c].mean()), 3) for c in IDENTITY_METRICS if c in metrics}
    if problems:
        raise CheckFailed("real-size outputs are wrong:\n  " + "\n  ".join(problems))
    return found


def run_check(device: str = "auto", dtype: str = "auto", run_dir: Path | None = None, root: Path | None = None,
              tiny: bool = False) -> dict:
    """Every stage, then :func:`check_outputs`. ``tiny`` (tests): the same stages and loading code on tiny
    architectures written by the same writers, and the tiny evaluators' sizes; it measures nothing."""
    import platform

    import runfolder

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    root = Path(root or cache_root() / ("real_size_tiny" if tiny else "real_size"))
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="real_size-run-"))
    logs = run_dir / "stage_logs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": _pythonpath()}
    started = time.perf_counter()
    write_args = ["--write", "--root", str(root)] + (["--tiny"] if tiny else [])
    stages = [run_stage(Stage("write", [sys.executable, "-m", "benchmarks.real_size", *write_args]), env, logs)]
    folders = json.loads((root / "folders.json").read_text())
    folders = {k: Path(v) for k, v in folders.items()}
    scorers = Path(folders.pop("scorers"))
    size = TINY_SIZE if tiny else SIZE
    for method in METHODS:
        overrides = generate_overrides(folders, run_dir, method, dtype, device, tiny_size=size if tiny else None)
        if tiny and method == "ms_diffusion":  # its resampler sizes live in its own config
            overrides += TINY_MS_RESAMPLER
        stages.append(run_stage(Stage(f"generate {method}", _child("scripts/generate.py", *overrides)), env, logs))
    stages.append(run_stage(Stage("evaluate", _child("scripts/evaluate.py", *evaluate_overrides(
        folders, scorers, run_dir, device, tiny=tiny))), env, logs))
    found = check_outputs(run_dir, dtype, size)
    import torch

    info = runfolder.provenance()
    return {
        "check": "real_size", "tiny": tiny, "device": device, "device_name": device_name(device), "dtype": dtype,
        "evaluator_dtype": "fp32", "image_size": size, "steps": STEPS, "benchmark": BENCHMARK,
        "total_seconds": round(time.perf_counter() - started, 1), "run_dir": str(run_dir), "weights_root": str(root),
        "stages": [{k: v for k, v in asdict(s).items() if k not in ("output_tail",)} | {"command": " ".join(s.command[3:])}
                   for s in stages],
        "outputs": found, "versions": info["versions"], "git_hash": info["git_hash"], "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "date": datetime.date.today().isoformat(),
        "models": ("tiny architectures (tests): measures nothing" if tiny else
                   "SDXL base 1.0 + IP-Adapter Plus SDXL (ViT-H/14); MS-Diffusion (released resampler, CLIP ViT-bigG/14); "
                   "GroundingDINO SwinT, SAM ViT-H, CLIP ViT-B/32, DINOv2 ViT-S/14, DreamSim ensemble: random weights"),
    }


def _pythonpath() -> str:
    parts = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


# the tests' tiny architectures (anyms.tiny's sizes), written by the same writers
TINY_SIZE = 64
TINY_MS_RESAMPLER = ["method.weights.sdxl.resampler={dim: 64, depth: 4, dim_head: 64, heads: 1, num_queries: 16, "
                     "ff_mult: 4, fourier_freqs: 8}"]


def tiny_sizes():
    from benchmarks.real_size_models import Sizes

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  image_size=32, projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5)
    return Sizes(
        unet=dict(block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=32),
        vae=dict(block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 norm_num_groups=8, layers_per_block=1, sample_size=64),
        text_encoder=text, text_encoder_2=text, image_encoder=vision,
        bigg=dict(projection_dim=32, text_config=text, vision_config=dict(vision, hidden_size=48, intermediate_size=64)),
        ip_resampler=dict(dim=64, heads=1, tokens=16),
        ms_resampler=dict(dim=64, depth=4, dim_head=64, heads=1, num_queries=16, ff_mult=4, fourier_freqs=8),
        size=TINY_SIZE,
    )


def write_models(root: Path, tiny: bool = False) -> dict:
    """The write stage: every folder once, and ``root/folders.json`` naming them for the other stages."""
    from benchmarks.evaluate import write_random_scorer_checkpoints
    from benchmarks.real_size_models import write_real_size_models

    folders = write_real_size_models(root, sizes=tiny_sizes() if tiny else None, tiny_evaluators=tiny, log=log)
    if tiny:
        from eval.tiny_evaluators import write_tiny_evaluators

        scorers = write_tiny_evaluators(root / "tiny_eval")
    else:
        scorers = write_random_scorer_checkpoints(cache_root() / "bench_evaluators")
    folders = {**{k: str(v) for k, v in folders.items()}, "scorers": str(scorers)}
    (root / "folders.json").write_text(json.dumps(folders, indent=2))
    return folders


# ------------------------------------------------------------------------------------------- results


def markdown(result: dict) -> str:
    cuda = any(s["cuda_peak_bytes"] is not None for s in result["stages"])
    lines = [f"Real-size check ({result['models']}), {result['image_size']} px, {result['steps']} steps, one image per "
             f"method, on {result['device_name']} ({result['device']}, generation {result['dtype']}, evaluators "
             f"{result['evaluator_dtype']}); git {result['git_hash']}, torch {result['versions'].get('torch', '?')}, "
             f"diffusers {result['versions'].get('diffusers', '?')}. Total {result['total_seconds']:.0f} s.", "",
             "| stage | seconds | peak RSS | peak anonymous RSS |" + (" CUDA peak allocated |" if cuda else ""),
             "|---|---|---|---|" + ("---|" if cuda else "")]
    for s in result["stages"]:
        lines.append(f"| {s['name']} | {s['seconds']:.0f} | {fmt_bytes(s['peak_rss_bytes'])} | "
                     f"{fmt_bytes(s.get('peak_anon_bytes'))} |"
                     + (f" {fmt_bytes(s['cuda_peak_bytes'])} |" if cuda else ""))
    for w in result["outputs"].get("warnings", []):
        lines.append(f"\nWarning: {w}")
    return "\n".join(lines)


def write_results(result: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{result['date']}-{result['device_name']}-real_size"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result) + "\n")
    return json_path, md_path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        child_main(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="generation dtype: auto (fp16 on CUDA, bf16 on CPU), bf16, fp16, fp32")
    parser.add_argument("--run-dir", help="the run folder (default: a new temporary folder)")
    parser.add_argument("--root", help="where the random models are written (default: <paths.cache_dir>/real_size)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder; '' writes none")
    parser.add_argument("--tiny", action="store_true", help="tiny architectures through the same stages (tests)")
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write:
        write_models(Path(args.root), tiny=args.tiny)
        return 0
    try:
        result = run_check(args.device, args.dtype, Path(args.run_dir) if args.run_dir else None,
                           Path(args.root) if args.root else None, tiny=args.tiny)
    except CheckFailed as err:
        print(f"check-real-size: FAILED\n{err}", file=sys.stderr)
        return 1
    print(markdown(result))
    if args.out:
        json_path, md_path = write_results(result, Path(args.out))
        print(f"\nwrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
