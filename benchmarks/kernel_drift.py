"""How far a CPU run's images move when torch picks other kernels: the tolerance of the image pins.

The bytes of a CPU image depend on the kernels oneDNN and ATen choose for the processor (and on the thread
count, which changes how reductions are split). A pin made on one machine therefore cannot be compared byte
for byte on another. This measures, on one machine, the drift that the kernel choices which can be forced
there produce: each setting below runs in its own process (the variables are read once, at start-up) and
generates the pinned images of ``tests/test_method_move_pins.py`` (tiny SDXL-like model, smoke combination
c02, seed 0, default generation settings); every image is compared with the default setting's and with the
stored references (``tests/data/method_pins/``): max and mean absolute difference per pixel channel (0-255).

    python -m benchmarks.kernel_drift                 # every setting; results/<date>-<host>-kernel_drift.{json,md}
    python -m benchmarks.kernel_drift --write-references   # (re)writes the references from the default setting

A setting the processor cannot honour (AVX-512 on an AVX2 machine) falls back to what it has: the results
name the ISA each process dispatched to.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REFERENCES = REPO / "tests" / "data" / "method_pins"
METHODS = ("anyms", "anyms_literal", "ip_adapter_joint", "ms_diffusion", "text_only", "wo_crop_merge", "wo_local")
# The kernel choices that can be forced on one machine (issue 24): environment variables read at start-up, and the
# torch thread count, which the tiny model pins to 1 (model.torch_threads; 2 threads split reductions otherwise).
SETTINGS: dict[str, dict] = {
    "default": {"env": {}},
    "onednn_avx2": {"env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}},
    "onednn_avx512_core": {"env": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}},
    "onednn_sse41": {"env": {"ONEDNN_MAX_CPU_ISA": "SSE41"}},
    "aten_default": {"env": {"ATEN_CPU_CAPABILITY": "default"}},
    "aten_avx2": {"env": {"ATEN_CPU_CAPABILITY": "avx2"}},
    "aten_avx512": {"env": {"ATEN_CPU_CAPABILITY": "avx512"}},
    "threads_2": {"env": {}, "overrides": ["model.torch_threads=2"]},
    "sse41_aten_default_2_threads": {"env": {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"},
                                     "overrides": ["model.torch_threads=2"]},
}
KERNEL_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def generate_pinned_images(out_dir: Path, tiny_root: Path, data_root: Path, overrides=(), methods=METHODS) -> dict:
    """The pinned images into ``out_dir/<method>.png`` with this process's kernels; returns the ISA used."""
    import torch
    from hydra import compose, initialize_config_dir

    import runfolder
    from anyms.generation.generate import run_generation

    out_dir.mkdir(parents=True, exist_ok=True)
    for method in methods:
        run_dir = Path(tempfile.mkdtemp(prefix=f"drift-{method}-"))
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("generate", overrides=[f"run_dir={run_dir}", f"data_root={data_root}", "progress=false",
                                                 "wandb=disabled", "model=tiny", f"method={method}", "benchmark=smoke",
                                                 "benchmark.seeds=[0]", *overrides])
        cfg.model.tiny_root = str(tiny_root)
        run_generation(cfg)
        (record,) = runfolder.read_records(run_dir)
        (out_dir / f"{method}.png").write_bytes((run_dir / record["image"]).read_bytes())
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "sha256": {m: hashlib.sha256((out_dir / f"{m}.png").read_bytes()).hexdigest() for m in methods}}


def pixel_drift(image: Path, reference: Path) -> dict:
    """Max and mean absolute difference of two PNGs' decoded RGB pixels (0-255), and whether the bytes are equal."""
    from PIL import Image

    with Image.open(image) as a, Image.open(reference) as b:
        pa, pb = np.asarray(a.convert("RGB"), dtype=np.int16), np.asarray(b.convert("RGB"), dtype=np.int16)
    if pa.shape != pb.shape:
        raise ValueError(f"{image}: size {pa.shape} vs {pb.shape} of {reference}")
    diff = np.abs(pa - pb)
    return {"max": int(diff.max()), "mean": float(diff.mean()), "identical": image.read_bytes() == reference.read_bytes()}


def run_setting(name: str, out: Path, tiny_root: Path, data_root: Path, methods=METHODS) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}
    env.update(SETTINGS[name]["env"])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "benchmarks.kernel_drift", "--worker", str(out / name), "--tiny-root", str(tiny_root),
           "--data-root", str(data_root), *(f"--override={o}" for o in SETTINGS[name].get("overrides", [])),
           "--methods", *methods]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:  # e.g. ATEN_CPU_CAPABILITY=avx512 on an AVX2 processor dies of an illegal instruction
        if done.returncode < 0:
            why = f"killed by {signal.Signals(-done.returncode).name}" + (
                " (an instruction this processor lacks)" if done.returncode == -signal.SIGILL else "")
        else:
            why = f"exit {done.returncode}: " + (done.stderr.strip().splitlines() or ["no output"])[-1][-300:]
        return {**SETTINGS[name], "seconds": seconds, "error": why}
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return {**info, **SETTINGS[name], "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--write-references", action="store_true", help="write tests/data/method_pins/ from 'default'")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tiny-root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.worker:  # one setting, in its own process
        print(json.dumps(generate_pinned_images(args.worker, args.tiny_root, args.data_root, args.override, args.methods)))
        return 0

    import runfolder
    from anyms.tiny import write_tiny_hub
    from benchmarks.common import device_name

    data_root = args.data_root or Path(os.environ.get("ANYMS_DATA_ROOT") or REPO.parent / "shared")
    if not (data_root / "dreambench").is_dir():
        p.error(f"--data-root {data_root}: no dreambench/ folder (the pinned images use DreamBench subjects)")
    settings = ["default"] + [s for s in args.settings if s != "default"]
    methods = list(args.methods)
    if args.write_references and methods != list(METHODS):
        p.error("--write-references writes every method's reference: leave --methods out")
    with tempfile.TemporaryDirectory(prefix="kernel-drift-") as tmp:
        tmp = Path(tmp)
        tiny_root = write_tiny_hub(tmp / "tiny")
        runs = {}
        for name in settings:
            runs[name] = run_setting(name, tmp / "images", tiny_root, data_root, methods)
            print(f"{name}: {runs[name].get('cpu_capability') or runs[name]['error']}, {runs[name]['seconds']} s",
                  file=sys.stderr)
        if "error" in runs["default"]:
            raise SystemExit(f"the default setting failed: {runs['default']['error']}")
        ran = [name for name in settings if "error" not in runs[name]]
        if args.write_references:
            REFERENCES.mkdir(parents=True, exist_ok=True)
            for m in METHODS:
                (REFERENCES / f"{m}.png").write_bytes((tmp / "images" / "default" / f"{m}.png").read_bytes())
        table = {name: {m: {"vs_default": pixel_drift(tmp / "images" / name / f"{m}.png", tmp / "images" / "default" / f"{m}.png"),
                            **({"vs_reference": pixel_drift(tmp / "images" / name / f"{m}.png", REFERENCES / f"{m}.png")}
                               if (REFERENCES / f"{m}.png").exists() else {})}
                        for m in methods} for name in ran}
        # how far apart the methods themselves are (a refactor that changes a method must exceed the tolerance)
        between = {f"{a} vs {b}": pixel_drift(tmp / "images" / "default" / f"{a}.png", tmp / "images" / "default" / f"{b}.png")
                   for a, b in (("anyms", "wo_crop_merge"), ("anyms", "wo_local"), ("wo_crop_merge", "wo_local"),
                                ("anyms", "ip_adapter_joint"), ("anyms", "text_only")) if a in methods and b in methods}
    result = {"hardware": runfolder.hardware("cpu"), "methods": methods, "settings": runs, "drift": table,
              "between_methods": between,
              **runfolder.provenance()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{time.strftime('%Y-%m-%d')}-{device_name('cpu')}-{result['hardware']['cpu_capability']}-kernel_drift"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


def _setting_text(setting: dict) -> str:
    return ", ".join([f"{k}={v}" for k, v in setting["env"].items()] + list(setting.get("overrides", []))) or "none"


def markdown(result: dict) -> str:
    hw = result["hardware"]
    lines = [f"Kernel drift of the pinned images (tiny random SDXL-like model, c02 seed 0, 64 px) on {hw['name']} "
             f"({hw['cpu_capability']}), torch {result['versions'].get('torch')}, git {result['git_hash']}.",
             "Max / mean absolute difference per pixel channel (0-255) against the default setting's image"
             " (and against tests/data/method_pins/ where present).", "",
             "| setting | ISA | " + " | ".join(result["methods"]) + " |", "|---|---|" + "---|" * len(result["methods"])]
    for name, per in result["drift"].items():
        cells = []
        for m in result["methods"]:
            d = per[m]["vs_default"]
            cell = "=" if d["identical"] else f"{d['max']} / {d['mean']:.4f}"
            if "vs_reference" in per[m]:
                r = per[m]["vs_reference"]
                cell += " (ref " + ("=" if r["identical"] else f"{r['max']} / {r['mean']:.4f}") + ")"
            cells.append(cell)
        env = _setting_text(result["settings"][name])
        lines.append(f"| {name} ({env}) | {result['settings'][name]['cpu_capability']} | " + " | ".join(cells) + " |")
    for name, run in result["settings"].items():
        if "error" in run:
            env = _setting_text(run)
            lines.append(f"| {name} ({env}) | cannot run here: {run['error']} |" + " |" * len(result["methods"]))
    lines += ["", "Between methods (default setting), max / mean:", ""]
    lines += [f"- {k}: {v['max']} / {v['mean']:.3f}" for k, v in result["between_methods"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
