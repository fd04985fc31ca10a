"""Weights & Biases logging of a report: the tables, Fig. 4, and sample images with the requested and
detected boxes drawn as W&B box overlays. Offline by default (``mode: offline``): no network needed."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd


def log_report(out_dir: Path, table1: pd.DataFrame, table2: pd.DataFrame, fig4: pd.DataFrame, metrics: pd.DataFrame,
               records: pd.DataFrame, run_dirs: Sequence, cfg: dict, tiny: bool) -> None:
    import wandb
    from PIL import Image

    run = wandb.init(
        project=cfg.get("project", "anyms-bench"), mode=cfg.get("mode", "offline"), dir=str(out_dir),
        group=cfg.get("group") or Path(str(run_dirs[0])).name, job_type="report", reinit="finish_previous",
        config={"runs": [str(d) for d in run_dirs], "tiny_random_models": tiny},
        tags=["tiny-random-models"] if tiny else [],
    )
    try:
        run.log({"table1": wandb.Table(dataframe=table1), "fig4_data": wandb.Table(dataframe=fig4)})
        if len(table2):
            run.log({"table2": wandb.Table(dataframe=table2)})
        run.log({"fig4": wandb.Image(str(out_dir / "fig4.png"))})
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
