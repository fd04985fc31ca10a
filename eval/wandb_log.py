"""Weights & Biases logging of the evaluation and the report. Offline by default (``mode: offline``): no network
needed; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads later.

Runs are named ``<stage>-<run folder>[-<method>]``, tagged with the stage, benchmark, model(s) and method(s) and
grouped by the run folder (runfolder.wandb_run). What can be compared across runs in the W&B UI:

- the report run's summary: ``table1/<method>/<column>`` and ``table2/<method>/<column>``, the numbers of
  table1.csv / table2.csv (means with ``_lo``/``_hi``, ``n_images``, cost);
- the report run's ``images`` table: one row per image (method, combination, seed, the image with its requested
  and detected boxes as two box groups, the image's metrics), to group by method in the UI;
- the evaluate run's summary: ``subject_mean/<method>/<metric>``, plain means over subjects of metric columns only.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

IMAGE_KEYS = ["method", "combination", "seed", "image"]


def run_labels(records: Iterable[dict]) -> dict:
    """The methods, benchmarks and models of some records, for a W&B run's name and tags: the benchmark the records
    name (or whose id format the combinations follow, for records that do not), the models by name."""
    from eval.published import benchmark_of

    records = list(records)
    methods = sorted({str(r["method"]) for r in records})
    benchmarks = sorted({r["benchmark"] for r in records if isinstance(r.get("benchmark"), str) and r["benchmark"]})
    if not benchmarks:
        found = benchmark_of(r["combination"] for r in records)
        benchmarks = [found] if found else []
    models = sorted({str(r["model"]["name"]) for r in records
                     if isinstance(r.get("model"), dict) and r["model"].get("name")})
    return {"methods": methods, "benchmarks": benchmarks, "models": models}


def table_summary(name: str, table: pd.DataFrame) -> dict:
    """``<name>/<method>/<column>`` for each finite number of a per-method table (NaN: an interval that does not
    exist, a cost not measured, left out rather than shown as a value)."""
    out = {}
    for row in table.to_dict("records"):
        for column, value in row.items():
            if column == "method" or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if np.isfinite(value):
                out[f"{name}/{row['method']}/{column}"] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out


def subject_means(metrics: pd.DataFrame, metric_columns: Sequence[str]) -> dict:
    """``subject_mean/<method>/<metric>``: each metric column's plain mean over a method's subject rows (detected
    and id_swapped as shares); never the columns that say which image, subject or box a row is."""
    columns = [c for c in metric_columns if c in metrics]
    means = metrics[columns].astype(float).groupby(metrics["method"]).mean()
    return {f"subject_mean/{method}/{column}": float(value)
            for method, row in means.iterrows() for column, value in row.items() if np.isfinite(value)}


def image_rows(metrics: pd.DataFrame, metric_columns: Sequence[str]) -> pd.DataFrame:
    """One row per image: its keys, ``n_subjects``, ``n_detected``, and each metric column's mean over the image's
    subjects where it is defined (as the tables average them, eval.report.per_image)."""
    groups = metrics.groupby(IMAGE_KEYS, sort=True)
    out = groups[list(metric_columns)].mean() if metric_columns else groups.size().to_frame()[[]]
    out.insert(0, "n_subjects", groups.size())
    out.insert(1, "n_detected", groups["detected"].sum().astype(int))
    return out.reset_index()


def spread_sample(images: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A reproducible choice of ``n`` rows of ``images`` (columns ``method``, ``combination``), at least one per
    method whatever ``n``: the methods take turns, each turn taking the combination used least so far (ties in a
    seeded random order) and one of its images drawn at random, so the rows cover every method and as many
    combinations as ``n`` allows. All rows when ``n`` covers them; rows keep their order."""
    methods = sorted(images["method"].unique())
    n = max(int(n), len(methods))
    if n >= len(images):
        return images
    rng = np.random.default_rng(seed)
    order = {c: i for i, c in enumerate(rng.permutation(sorted(images["combination"].unique())).tolist())}
    pools: dict[str, dict[str, list]] = {m: {} for m in methods}  # method -> combination -> rows left to draw
    for (method, combination), g in images.groupby(["method", "combination"], sort=True):
        pools[method][combination] = rng.permutation(g.index.to_numpy()).tolist()
    used = dict.fromkeys(order, 0)
    chosen: list = []
    while len(chosen) < n:  # n < len(images): some pool is never empty here
        for method in methods:
            left = [c for c, pool in pools[method].items() if pool]
            if len(chosen) == n or not left:
                continue
            combination = min(left, key=lambda c: (used[c], order[c]))
            chosen.append(pools[method][combination].pop())
            used[combination] += 1
    return images.loc[sorted(chosen)]


def image_file(image: str, run_dirs: Sequence) -> Path | None:
    """The file of a metrics row's image: relative to its run folder, or (several run folders) named with it."""
    for candidate in [Path(str(d)) / image for d in run_dirs] + [Path(image)]:
        if candidate.is_file():
            return candidate
    return None


def box_overlays(subjects: pd.DataFrame) -> dict:
    """W&B box groups ``requested`` (every subject's box) and ``detected`` (the detection matched to each found
    subject), in relative coordinates as the metrics hold them; class labels are the subjects' phrases."""
    labels = {i: str(r.phrase) for i, r in enumerate(subjects.itertuples())}
    requested, detected = [], []
    for i, r in enumerate(subjects.itertuples()):
        requested.append({"position": {"minX": float(r.req_x0), "minY": float(r.req_y0), "maxX": float(r.req_x1),
                                       "maxY": float(r.req_y1)}, "class_id": i, "box_caption": str(r.phrase)})
        if r.detected:
            box = {"position": {"minX": float(r.det_x0), "minY": float(r.det_y0), "maxX": float(r.det_x1),
                                "maxY": float(r.det_y1)}, "class_id": i, "box_caption": str(r.phrase)}
            if np.isfinite(r.iou):  # a full-frame scene subject has no IoU
                box.update(box_caption=f"{r.phrase} IoU {r.iou:.0f}", scores={"iou": float(r.iou)})
            detected.append(box)
    return {"requested": {"box_data": requested, "class_labels": labels},
            "detected": {"box_data": detected, "class_labels": labels}}


def table_thumbnail(path: Path, side: int):
    """The image scaled down to ``side`` px on its longer edge (never up): the table is for browsing 7,700 images
    side by side, and full PNGs would copy ~12 GB per report run. The boxes are relative, so they still fit."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        return image


def images_table(images: pd.DataFrame, metrics: pd.DataFrame, records: pd.DataFrame, metric_columns: Sequence[str],
                 run_dirs: Sequence, thumbnail_side: int | None = None):
    """A ``wandb.Table`` of ``images`` (rows of :func:`image_rows`): method, combination, seed, the image with its
    box overlays, prompt, detected ``k/n``, and the image's metrics. With ``thumbnail_side`` each image is a JPEG
    thumbnail of at most that many px (:func:`table_thumbnail`), else the PNG as it is (a path, not re-encoded). An image whose file is gone is
    left out."""
    import wandb

    prompts = dict(zip(records["image"], records["prompt"])) if "prompt" in records else {}
    subjects = {image: g for image, g in metrics.groupby("image", sort=False)}
    columns = ["method", "combination", "seed", "image", "prompt", "detected", "n_detected", "n_subjects",
               *metric_columns]
    rows = []
    for r in images.itertuples(index=False):
        path = image_file(r.image, run_dirs)
        if path is None:
            continue
        data, kind = (str(path), None) if thumbnail_side is None else (table_thumbnail(path, thumbnail_side), "jpg")
        picture = wandb.Image(data, boxes=box_overlays(subjects[r.image]), file_type=kind,
                              caption=f"{r.method} / {r.combination} / seed {r.seed}")
        values = [getattr(r, c) for c in metric_columns]
        rows.append([r.method, r.combination, int(r.seed), picture, prompts.get(r.image, ""),
                     f"{r.n_detected}/{r.n_subjects}", int(r.n_detected), int(r.n_subjects),
                     *[float(v) if np.isfinite(v) else None for v in values]])
    return wandb.Table(columns=columns, data=rows)


def log_report(out_dir: Path, table1: pd.DataFrame, table2: pd.DataFrame, fig4: pd.DataFrame, metrics: pd.DataFrame,
               records: pd.DataFrame, run_dirs: Sequence, cfg: dict, tiny: bool,
               table1_columns: Sequence[str] = ()) -> None:
    """The report stage's run: Tables 1 and 2 (as tables and, per method, in the summary), Fig. 4, the attention
    figures, the per-image table (``image_table``, at most ``max_table_images`` rows) and ``sample_images``
    samples spread over methods and combinations (``sample_seed``). ``metrics``: the per-subject rows with the
    report's derived columns; ``table1_columns``: Table 1's metrics, those defined per image go in the tables."""
    import wandb

    import runfolder

    run = runfolder.wandb_run(cfg, run_dirs[0], "report", {"runs": [str(d) for d in run_dirs], "tiny_random_models": tiny},
                              **run_labels(records.to_dict("records")))
    if run is None:
        return
    try:
        run.log({"table1": wandb.Table(dataframe=table1), "fig4_data": wandb.Table(dataframe=fig4)})
        run.summary.update(table_summary("table1", table1))
        if len(table2):
            run.log({"table2": wandb.Table(dataframe=table2)})
            run.summary.update(table_summary("table2", table2))
        run.log({"fig4": wandb.Image(str(out_dir / "fig4.png"))})
        figures = sorted((out_dir / "attention").glob("*.png")) if (out_dir / "attention").is_dir() else []
        if figures:  # attention maps (record_attention=true): the across-method figures first; a table, as sizes differ
            figures.sort(key=lambda p: (not p.stem.endswith("-methods"), p.name))
            run.log({"attention_maps": wandb.Table(columns=["figure", "image"], data=[
                [p.stem, wandb.Image(str(p), caption=p.stem)] for p in figures[: int(cfg.get("sample_images", 8))]])})
        per_image = [c for c in table1_columns if c in metrics]  # ap50 is not defined per image
        images = image_rows(metrics, per_image)
        seed = int(cfg.get("sample_seed", 0))
        if cfg.get("image_table", True):
            cap = cfg.get("max_table_images")
            shown = images if cap is None else spread_sample(images, int(cap), seed)
            run.log({"images": images_table(shown, metrics, records, per_image, run_dirs,
                                            cfg.get("table_image_side", 384))})
        samples = spread_sample(images, int(cfg.get("sample_images", 8)), seed)
        run.log({"samples": images_table(samples, metrics, records, per_image, run_dirs)})
    finally:
        run.finish()


def log_evaluation(run_dir: Path, metrics: pd.DataFrame, eval_config: dict, cfg: dict, records: Sequence[dict],
                   metric_columns: Sequence[str]) -> None:
    """The evaluation stage's run: its config, the per-subject metrics table, and per method the means of the
    ``metric_columns`` (eval.evaluate.METRIC_COLUMNS) in the summary."""
    import wandb

    import runfolder

    run = runfolder.wandb_run(cfg, run_dir, "evaluate", eval_config, **run_labels(records))
    if run is None:
        return
    try:
        run.log({"metrics": wandb.Table(dataframe=metrics.drop(columns=[c for c in metrics if metrics[c].dtype == object
                                                                        and c not in ("image", "method", "combination",
                                                                                      "subject", "phrase", "role")]))})
        run.summary.update(subject_means(metrics, metric_columns))
    finally:
        run.finish()
