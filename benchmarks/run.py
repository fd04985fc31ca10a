"""Speed and memory of AnyMS next to the stock IP-Adapter, and of the evaluation next to generation.

    python benchmarks/run.py [--sdxl] [--quick] [--smoke] [--out benchmarks/results]

Runs, one after the other (never two measurements at once):

1. :mod:`benchmarks.attention`: one cross-attention layer at SDXL's shapes, every variant, n = 2, 3, 5, 7;
2. :mod:`benchmarks.unet_step`: one SD1.5 UNet step at 512 px, AnyMS against the stock IP-Adapter (with
   ``--sdxl`` also SDXL at 1024 px, about 20 minutes more here);
3. the cost of one SDXL step at 1024 px with AnyMS, for the generation cost per image (the first step of a
   fresh process, one-time costs included, unless ``--sdxl`` measured it already);
4. :mod:`benchmarks.evaluate`: evaluation per image against generation per image, SD1.5 and SDXL.

Writes ``<out>/<date>-<device>.json`` and ``.md`` and prints the targets table. Every model has random
weights: the numbers are costs, never quality. ``--quick`` times fewer rounds; ``--smoke`` runs every code
path on tiny models in about a minute (it measures nothing).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository's root on the path, as for `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import attention, evaluate, unet_step  # noqa: E402
from benchmarks.common import REPO, device_name, load_average, log, machine, resolve_device  # noqa: E402

# (name, limit, which way): the targets of issue 7, on this machine, in one run
ATTENTION_TO_STOCK = 1.05
PER_SUBJECT = 0.02
TO_MASKED = 0.80
STEP_TO_STOCK = 1.05
ACTIVATION_TO_STOCK = 1.05
EVALUATION_TO_GENERATION = 0.10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdxl", action="store_true", help="also the SDXL UNet step, AnyMS against the stock")
    parser.add_argument("--quick", action="store_true", help="fewer rounds everywhere")
    parser.add_argument("--smoke", action="store_true", help="tiny models: checks the code paths, measures nothing")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    results = run(args.sdxl, args.quick, args.smoke, resolve_device(args.device))
    json_path, md_path = write(results, Path(args.out))
    print(targets_markdown(results["targets"]))
    print(f"\nwrote {md_path} and {json_path}")
    return 0


def run(sdxl: bool, quick: bool, smoke: bool, device: str) -> dict:
    import runfolder

    start = time.perf_counter()
    info = machine()
    load = {"start": load_average()}
    log(f"[1/4] attention layer ({'smoke' if smoke else 'SDXL shapes'})")
    attention_rows = attention.run(quick=quick, smoke=smoke, device=device)
    load["after_attention"] = load_average()

    log("[2/4] UNet step")
    step_models = ["tiny"] if smoke else ["sd15"] + (["sdxl"] if sdxl else [])
    step_results = [unet_step.run(m, quick=quick, device=device, subjects=3 if smoke else 5) for m in step_models]
    load["after_unet_step"] = load_average()

    log("[3/4] generation cost per image")
    step_seconds = {r.model: _row(r.rows, "anyms_fused")["median_s"] for r in step_results}
    generation = [{"model": model, "seconds_per_step": s, "source": "unet_step median"} for model, s in step_seconds.items()]
    if not smoke and not sdxl:
        one = unet_step.one_step_seconds("sdxl", subjects=5, device=device, warmup=False)
        step_seconds[one["model"]] = one["seconds"]
        generation.append({"model": one["model"], "seconds_per_step": one["seconds"],
                           "source": "first step of a fresh process (one-time costs included)"})
    load["after_generation"] = load_average()

    log("[4/4] evaluation cost per image")
    measured = evaluate.measure(counts=(2, 3) if smoke else evaluate.SUBJECT_COUNTS, n_full=2 if smoke else 3,
                                device=device, smoke=smoke)
    evaluate_rows = evaluate.rows(measured, step_seconds)
    load["end"] = load_average()

    results = {
        "device": device_name(device),
        "torch_device": device,
        "date": datetime.date.today().isoformat(),
        "versions": runfolder.package_versions(),
        "git_hash": runfolder.git_hash(),
        "machine": {**info, "loadavg": load},
        "mode": "smoke" if smoke else "quick" if quick else "default",
        "elapsed_s": round(time.perf_counter() - start, 1),
        "notes": [
            "every model has random weights at the real architecture: timings and memory only",
            "times: medians of interleaved rounds after warm-up; ratios: medians of paired per-round ratios",
            "loadavg: the 1/5/15-minute load averages at each stage; a loaded machine makes every time noisier",
        ],
        "attention": attention_rows,
        "attention_summary": attention.summary(attention_rows),
        "unet_step": [row for r in step_results for row in r.rows],
        "unet_step_info": [{"model": r.model, "memory_together": r.memory_together, "rounds": r.rounds,
                            "subjects": r.subjects, "note": r.note} for r in step_results],
        "generation": generation,
        "evaluate": evaluate_rows,
        "evaluate_info": {k: v for k, v in measured.items() if k != "seconds_per_image"},
    }
    results["targets"] = targets(results)
    if smoke:  # tiny shapes measure Python overheads, not the method: nothing is judged
        for t in results["targets"]:
            t["met"] = None
    return results


def _row(rows: list[dict], variant: str) -> dict:
    return next(r for r in rows if r["variant"] == variant)


def targets(results: dict) -> list[dict]:
    """Each target of issue 7 with its measured value and whether it is met."""
    out = []

    def add(name, value, limit):
        out.append({"target": name, "value": value, "limit": limit,
                    "met": None if value is None else bool(value <= limit)})

    for s in results["attention_summary"]:
        level = s["level"]
        add(f"attention {level}: fused / stock joint, worst n", s["fused_to_stock_max"], ATTENTION_TO_STOCK)
        add(f"attention {level}: fused cost per added subject", s["per_subject_fused"], PER_SUBJECT)
        add(f"attention {level}: fused / diffusers masked, worst n >= 3", s["fused_to_stock_masked_max_n3"], TO_MASKED)
    for row in results["unet_step"]:
        if row["variant"] == "anyms_fused":
            add(f"UNet step {row['model']}: AnyMS / stock time", row["ratio_to_stock"], STEP_TO_STOCK)
            add(f"UNet step {row['model']}: AnyMS / stock activation memory", row["activation_ratio"], ACTIVATION_TO_STOCK)
    sdxl = [r for r in results["evaluate"] if r["model"].startswith("sdxl")]
    if sdxl:
        add("evaluation / generation per image, SDXL 1024 px, 30 steps, worst n",
            max(r["ratio_to_generation"] for r in sdxl), EVALUATION_TO_GENERATION)
    return out


# ------------------------------------------------------------------------------------------- output


def write(results: dict, out_dir: Path) -> tuple[Path, Path]:
    from runfolder import atomic_write, write_json

    stem = f"{results['date']}-{results['device']}" + ("-smoke" if results["mode"] == "smoke" else "")
    json_path = write_json(out_dir / f"{stem}.json", results)
    md_path = atomic_write(out_dir / f"{stem}.md", lambda tmp: tmp.write_text(markdown(results)))
    return json_path, md_path


def targets_markdown(rows: list[dict]) -> str:
    lines = ["| target | measured | limit | met |", "|---|---|---|---|"]
    for t in rows:
        value = "-" if t["value"] is None else (f"{100 * t['value']:.1f}%" if "per added subject" in t["target"]
                                                  or "evaluation" in t["target"] else f"{t['value']:.3f}")
        limit = f"{100 * t['limit']:.0f}%" if "per added subject" in t["target"] or "evaluation" in t["target"] \
            else f"{t['limit']:.2f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {value} | <= {limit} | {met} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m = results["machine"]
    load = ", ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}/{v[2]:.2f}" for k, v in m["loadavg"].items() if v)
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items()
                         if k in ("python", "torch", "diffusers", "transformers", "segment-anything", "dreamsim"))
    parts = [
        f"# Speed and memory: {results['date']}, {results['device']} ({results['mode']} run)",
        "",
        f"- device: {m['processor']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}"
        + (f", CUDA {m['cuda']}" if m["cuda"] else ""),
        f"- load averages (1/5/15 min) at each stage: {load}",
        f"- versions: {versions}; git {results['git_hash']}",
        f"- elapsed: {results['elapsed_s'] / 60:.1f} min",
        *[f"- {note}" for note in results["notes"]],
        "",
        "## Targets (issue 7)",
        "",
        targets_markdown(results["targets"]),
        "",
        "## One cross-attention layer (SDXL shapes, CFG batch 2, 77 text tokens, 16 image tokens a subject)",
        "",
        "Ratios are to diffusers' stock `IPAdapterAttnProcessor2_0` (all subjects in one softmax); image term = "
        "time minus the text-only processor's; peak memory: peak RSS increase of one call.",
        "",
        attention.markdown(results["attention"]),
        "",
        _attention_summary_markdown(results["attention_summary"]),
        "",
        "## One UNet step",
        "",
        *[unet_step.markdown(_step_result(results, info)) + "\n" for info in results["unet_step_info"]],
        "## Evaluation against generation, per image",
        "",
        _generation_markdown(results["generation"]),
        "",
        evaluate.markdown(results["evaluate"], results["evaluate_info"]),
    ]
    return "\n".join(parts) + "\n"


def _attention_summary_markdown(summary: list[dict]) -> str:
    lines = ["Cost per added subject, `(t(n_max) - t(n_min)) / ((n_max - n_min) t(n_min))` from paired rounds, here "
             "n from 2 to 7 (text-only does not depend on n: its value is the noise of the measurement):", "",
             "| level | fused | fused, tokens reused | stock joint | text only |", "|---|---|---|---|---|"]
    for s in summary:
        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}%"
        lines.append(f"| {s['level']} | {pct(s['per_subject_fused'])} | {pct(s['per_subject_fused_reuse'])} | "
                     f"{pct(s['per_subject_stock'])} | {pct(s['per_subject_text_only'])} |")
    reuse = ", ".join(f"{s['level']} {s['fused_reuse_to_stock_max']:.3f}" for s in summary
                      if s.get("fused_reuse_to_stock_max") is not None)
    if reuse:
        lines += ["", "Fused with `reuse_projected_tokens` (each layer keeps the subjects' projected tokens between "
                  f"steps; off by default, as it holds them in memory) / stock joint, worst n: {reuse}."]
    return "\n".join(lines)


def _step_result(results: dict, info: dict) -> unet_step.StepResult:
    rows = [r for r in results["unet_step"] if r["model"] == info["model"]]
    return unet_step.StepResult(info["model"], rows, info["memory_together"], info["rounds"], info["subjects"], info["note"])


def _generation_markdown(generation: list[dict]) -> str:
    lines = ["| model | UNet step with AnyMS, s | how |", "|---|---|---|"]
    for g in generation:
        lines.append(f"| {g['model']} | {g['seconds_per_step']:.2f} | {g['source']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
