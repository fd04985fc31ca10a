"""Weights & Biases logging of the evaluation and the report: the tables, Fig. 4, and sample images with the requested and
detected boxes drawn as W&B box overlays. Offline by default (``mode: offline``): no network needed."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd


def log_report(out_dir: Path, table1: pd.DataFrame, table2: pd.DataFrame, fig4: pd.DataFrame, metrics: pd.DataFrame,
               records: pd.DataFrame, run_dirs: Sequence, cfg: dict, tiny: bool) -> None:
    import wandb
    from PIL import Image

    import runfolder

    run = runfolder.wandb_run(cfg, run_dirs[0], "report", {"runs": [str(d) for d in run_dirs], "tiny_random_models": tiny})
    try:
        run.log({"table1": wandb.Table(dataframe=table1), "fig4_data": wandb.Table(dataframe=fig4)})
        if len(table2):
            run.log({"table2": wandb.Table(dataframe=table2)})
        run.log({"fig4": wandb.Image(str(out_dir / "fig4.png"))})
        figures = sorted((out_dir / "attention").glob("*.png")) if (out_dir / "attention").is_dir() else []
        if figures:  # attention maps (record_attention=true): the across-method figures first
            figures.sort(key=lambda p: (not p.stem.endswith("-methods"), p.name))
            run.log({"attention_maps": [wandb.Image(str(p), caption=p.stem) for p in figures[: int(cfg.get("sample_images", 8))]]})
        samples = []
        for image_rel, g in list(metrics.groupby("image", sort=True))[: int(cfg.get("sample_images", 8))]:
            run_dir = next((Path(str(d)) for d in run_dirs if (Path(str(d)) / image_rel).exists()), None)
            if run_dir is None:
                continue
            boxes = {"requested": {"box_data": [], "class_labels": {}}, "detected": {"box_data": [], "class_labels": {}}}
            for i, r in enumerate(g.itertuples()):
                boxes["requested"]["class_labels"][i] = r.phrase
                boxes["requested"]["box_data"].append({"position": {"minX": r.req_x0, "minY": r.req_y0, "maxX": r.req_x1,
                                                                     "maxY": r.req_y1}, "class_id": i, "box_caption": r.phrase})
                if r.detected:
                    boxes["detected"]["class_labels"][i] = r.phrase
                    boxes["detected"]["box_data"].append({
                        "position": {"minX": r.det_x0, "minY": r.det_y0, "maxX": r.det_x1, "maxY": r.det_y1},
                        "class_id": i, "box_caption": f"{r.phrase} {r.iou:.0f}", "scores": {"iou": float(r.iou)}})
            samples.append(wandb.Image(Image.open(run_dir / image_rel), boxes=boxes, caption=image_rel))
        if samples:
            run.log({"samples": samples})
    finally:
        run.finish()


def log_evaluation(run_dir: Path, metrics: pd.DataFrame, eval_config: dict, cfg: dict) -> None:
    """The evaluation stage's run: its config and the per-subject metrics table."""
    import wandb

    import runfolder

    run = runfolder.wandb_run(cfg, run_dir, "evaluate", eval_config)
    if run is None:
        return
    try:
        run.log({"metrics": wandb.Table(dataframe=metrics.drop(columns=[c for c in metrics if metrics[c].dtype == object
                                                                        and c not in ("image", "method", "combination",
                                                                                      "subject", "phrase", "role")]))})
        means = metrics.select_dtypes("number").groupby(metrics["method"]).mean()
        for method, row in means.iterrows():
            run.summary.update({f"{method}/{k}": float(v) for k, v in row.items()})
    finally:
        run.finish()
