"""The evaluation stage: a run folder's images -> ``metrics.parquet`` (one row per image x subject) and
``detections.parquet`` (one row per detection kept for AP), with the evaluation config beside them.

Per image: one detector call with all the image's phrases; detections at or above ``box_threshold`` are
matched to the requested boxes (best IoU among the subject's phrase: mIoU; one-to-one per phrase:
Hungarian); all detections down to ``ap_box_threshold`` are kept for AP@50. SAM segments the matched
detections (all boxes of an image in one prompt); each subject's crop (mask, cropped to its bounding box,
white background; the requested box crop when undetected) is compared with each of its references,
segmented the same way once and cached, and the scores averaged over references. CLIP-T scores the whole
image against the prompt. Nothing is NaN: an undetected subject has IoU 0 and ``detected=False``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

import runfolder
from eval.grounding import subject_crop
from eval.layout_metrics import box_iou, miou_best, miou_hungarian

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.parquet"
DETECTIONS_FILE = "detections.parquet"
EVAL_CONFIG_FILE = "eval_config.json"
KNOWN_METRICS = ("miou", "miou_hungarian", "ap50", "clip_i", "dino", "dreamsim", "clip_t", "m_dino")
# identity metric -> (config key of its scorer, the scorer's method giving L2-normalized embeddings)
IDENTITY = {"clip_i": ("clip", "image_features"), "dino": ("dino", "features"), "dreamsim": ("dreamsim", "embed")}


class EvaluationError(ValueError):
    """A run folder or evaluation config that cannot be scored; the message names the file or field."""


@dataclass
class EvaluationSummary:
    run_dir: Path
    planned: int
    scored: list[str] = field(default_factory=list)
    skipped: int = 0
    seconds_per_image: float = 0.0
    missing: list[str] = field(default_factory=list)  # planned by generation, not recorded yet


def eval_identity(eval_cfg: DictConfig) -> dict:
    """What of the evaluation config decides the numbers (not devices or progress bars)."""
    # where things run or live, and the report's settings, do not change the scores
    return runfolder.config_identity(
        eval_cfg, drop=("device", "torch_threads", "bootstrap", "prepare", "tiny_root", "weights_dir"))


def check_metrics(names: Sequence[str]) -> list[str]:
    unknown = [m for m in names if m not in KNOWN_METRICS]
    if unknown:
        raise EvaluationError(f"eval.metrics: unknown metric(s) {unknown}; known: {list(KNOWN_METRICS)}")
    return list(names)


def open_checked(path: Path) -> Image.Image:
    if not path.exists():
        raise EvaluationError(f"{path}: image named by its record is missing (regenerate it, or remove its record)")
    try:
        with Image.open(path) as im:
            im.verify()
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise EvaluationError(f"{path}: not a readable image ({err}); regenerate it (delete the file and run generate)") from None


class ReferenceCache:
    """Each reference image detected, segmented and embedded once per evaluation run."""

    def __init__(self, detector, segmenter, scorers: dict[str, Any], metrics: Sequence[str], box_threshold, text_threshold):
        self.detector, self.segmenter, self.scorers = detector, segmenter, scorers
        self.metrics = [m for m in metrics if m in IDENTITY]
        self.thresholds = (box_threshold, text_threshold)
        self._embeddings: dict[tuple[str, str], torch.Tensor] = {}

    def crop(self, path: str, phrase: str) -> Image.Image:
        image = open_checked(Path(path))
        dets = self.detector.detect(image, [phrase], *self.thresholds)
        if not dets:  # the whole reference, as DreamBench's references are subject-centred photos
            return image
        best = max(dets, key=lambda d: d.score)
        mask = self.segmenter.segment(image, [best.box])[0]
        return subject_crop(image, mask, best.box)

    def embeddings(self, paths: Sequence[str], phrase: str) -> dict[str, torch.Tensor]:
        """Per identity metric, ``[n_refs, D]`` L2-normalized embeddings of the segmented references."""
        todo = [p for p in paths if (p, phrase) not in self._embeddings]
        if todo:
            crops = [self.crop(p, phrase) for p in todo]
            per_metric = {m: _embed(self.scorers, m, crops) for m in self.metrics}
            for i, p in enumerate(todo):
                self._embeddings[(p, phrase)] = {m: per_metric[m][i] for m in self.metrics}
        return {m: torch.stack([self._embeddings[(p, phrase)][m] for p in paths]) for m in self.metrics}


def _embed(scorers, metric: str, images: list[Image.Image]) -> torch.Tensor:
    key, method = IDENTITY[metric]
    return torch.nn.functional.normalize(getattr(scorers[key], method)(images).float(), dim=-1)


def score_image(record: dict, image: Image.Image, detector, segmenter, scorers, refs: ReferenceCache,
                cfg: DictConfig, metrics: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Rows for metrics.parquet (one per subject) and detections.parquet (every detection kept for AP)."""
    subjects = record["subjects"]
    phrases = list(dict.fromkeys(s["phrase"] for s in subjects))
    kept = detector.detect(image, phrases, float(cfg.ap_box_threshold), float(cfg.text_threshold))
    matched_pool = [d for d in kept if d.score >= float(cfg.box_threshold)]
    req_boxes = [s["box"] for s in subjects]
    req_phrases = [s["phrase"] for s in subjects]
    det_boxes = [d.box for d in matched_pool]
    det_scores = [d.score for d in matched_pool]
    det_phrases = [d.phrase for d in matched_pool]
    ious = miou_best(req_boxes, req_phrases, det_boxes, det_scores, det_phrases)
    ious_h = miou_hungarian(req_boxes, req_phrases, det_boxes, det_scores, det_phrases)

    # the detection each subject is scored on: its phrase's best-IoU detection
    chosen: list[int | None] = []
    iou_matrix = box_iou(np.asarray(req_boxes, dtype=float), np.asarray(det_boxes, dtype=float).reshape(-1, 4))
    for i, phrase in enumerate(req_phrases):
        candidates = [j for j, p in enumerate(det_phrases) if p == phrase and iou_matrix[i, j] > 0]
        chosen.append(max(candidates, key=lambda j: iou_matrix[i, j]) if candidates else None)
    crops = []
    if segmenter is not None:
        unique = list(dict.fromkeys(c for c in chosen if c is not None))  # two subjects may share a detection
        mask_of = dict(zip(unique, segmenter.segment(image, [det_boxes[c] for c in unique]))) if unique else {}
        crops = [subject_crop(image, mask_of[c], det_boxes[c]) if c is not None else subject_crop(image, None, s["box"])
                 for c, s in zip(chosen, subjects)]

    identity: dict[str, list[float]] = {}
    for m in metrics:
        if m not in IDENTITY:
            continue
        gen = _embed(scorers, m, crops)
        identity[m] = [
            float(100.0 * (refs.embeddings(s["references"], s["phrase"])[m] @ gen[i]).mean())
            for i, s in enumerate(subjects)
        ]
    clip_t = None
    if "clip_t" in metrics:
        img_f = scorers["clip"].image_features([image]).float()
        txt_f = scorers["clip"].text_features([record["prompt"]]).float()
        clip_t = float(100.0 * torch.nn.functional.cosine_similarity(img_f, txt_f).item())
    m_dino = None
    if "m_dino" in metrics and "dino" in identity:
        m_dino = float(100.0 * np.prod([min(max(v / 100.0, 0.0), 1.0) for v in identity["dino"]]))

    rows = []
    for i, s in enumerate(subjects):
        c = chosen[i]
        row = {
            "image": record["image"], "combination": record["combination"], "method": record["method"],
            "seed": record["seed"], "n_subjects": record["n_subjects"], "subject": s["name"], "phrase": s["phrase"],
            "role": s["role"], "width": record["width"], "height": record["height"],
            "req_x0": s["box"][0], "req_y0": s["box"][1], "req_x1": s["box"][2], "req_y1": s["box"][3],
            "detected": c is not None, "iou": 100.0 * ious[i], "iou_hungarian": 100.0 * ious_h[i],
            "det_score": float(det_scores[c]) if c is not None else 0.0,
        }
        for k, name in enumerate(("det_x0", "det_y0", "det_x1", "det_y1")):
            row[name] = float(det_boxes[c][k]) if c is not None else float("nan")
        for m, values in identity.items():
            row[m] = values[i]
        if clip_t is not None:
            row["clip_t"] = clip_t
        if m_dino is not None:
            row["m_dino"] = m_dino
        rows.append(row)
    det_rows = [{"image": record["image"], "method": record["method"], "combination": record["combination"],
                 "phrase": d.phrase, "score": float(d.score), "x0": float(d.box[0]), "y0": float(d.box[1]),
                 "x1": float(d.box[2]), "y1": float(d.box[3])} for d in kept]
    return rows, det_rows


def load_evaluators(cfg: DictConfig, metrics: Sequence[str]) -> tuple[Any, Any, dict]:
    from hydra.utils import instantiate

    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    if cfg.get("prepare"):
        instantiate(cfg.prepare)
    detector = instantiate(cfg.detector)
    # SAM only serves the identity metrics' crops
    segmenter = instantiate(cfg.segmenter) if any(m in IDENTITY or m == "m_dino" for m in metrics) else None
    needed = {IDENTITY[m][0] for m in metrics if m in IDENTITY} | ({"clip"} if "clip_t" in metrics else set())
    if "m_dino" in metrics:
        needed.add("dino")
    scorers = {key: instantiate(cfg.scorers[key]) for key in sorted(needed)}
    return detector, segmenter, scorers


def read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame()
    try:
        return pd.read_parquet(path)
    except Exception as err:  # a damaged file: say which, never overwrite it silently
        raise EvaluationError(f"{path}: cannot be read ({err}); move it away to re-evaluate from scratch") from None


def run_evaluation(cfg: DictConfig) -> EvaluationSummary:
    run_dir = Path(cfg.run_dir)
    metrics = check_metrics(list(cfg.eval.metrics))
    if "m_dino" in metrics and "dino" not in metrics:
        metrics.append("dino")
    records = runfolder.read_records(run_dir)  # validated against the schema: names file, line and field
    missing = sorted(runfolder.planned_images(run_dir) - {r["image"] for r in records})
    if missing:  # shards still running or failed: score what is there, say what is not
        log.warning("%d planned image(s) have no record yet (unfinished generation shards?), e.g. %s; "
                    "scoring the %d that are there", len(missing), missing[:3], len(records))
    if not records:
        raise EvaluationError(f"{run_dir}: no records in {run_dir / runfolder.RECORDS}; run generate (or import) first")
    eval_hash = runfolder.config_hash(eval_identity(cfg.eval))
    old_metrics = read_table(run_dir / METRICS_FILE)
    old_dets = read_table(run_dir / DETECTIONS_FILE)
    if len(old_metrics):
        current = old_metrics["eval_hash"] == eval_hash
        done = set(old_metrics.loc[current, "image"] + "@" + old_metrics.loc[current, "config_hash"])
    else:
        done = set()
    todo = [r for r in records if f"{r['image']}@{r['config_hash']}" not in done]
    summary = EvaluationSummary(run_dir, planned=len(records), skipped=len(records) - len(todo), missing=missing)
    if not todo:
        return summary
    images = {r["image"]: open_checked(run_dir / r["image"]) for r in todo}  # every image readable before models load

    detector, segmenter, scorers = load_evaluators(cfg.eval, metrics)
    refs = ReferenceCache(detector, segmenter, scorers, metrics, float(cfg.eval.box_threshold), float(cfg.eval.text_threshold))
    rows, det_rows = [], []
    import time

    start = time.perf_counter()
    for record in tqdm(todo, desc="evaluate", unit="img", disable=not cfg.progress):
        r_rows, r_dets = score_image(record, images[record["image"]], detector, segmenter, scorers, refs, cfg.eval, metrics)
        for row in r_rows:
            row.update({"config_hash": record["config_hash"], "eval_hash": eval_hash,
                        "model": (record["model"] or {}).get("name", "?")})
        rows += r_rows
        det_rows += r_dets
        summary.scored.append(record["image"])
    summary.seconds_per_image = (time.perf_counter() - start) / len(todo)

    new = pd.DataFrame(rows)
    scored = set(new["image"])
    keep_old = old_metrics[~old_metrics["image"].isin(scored)] if len(old_metrics) else old_metrics
    table = pd.concat([keep_old, new], ignore_index=True).sort_values(["method", "combination", "seed", "subject"])
    dets = pd.DataFrame(det_rows, columns=["image", "method", "combination", "phrase", "score", "x0", "y0", "x1", "y1"])
    keep_dets = old_dets[~old_dets["image"].isin(scored)] if len(old_dets) else old_dets
    dets = pd.concat([keep_dets, dets], ignore_index=True)
    # detections first: metrics.parquet is what marks an image as done
    runfolder.atomic_write(run_dir / DETECTIONS_FILE, lambda tmp: dets.to_parquet(tmp, index=False))
    runfolder.atomic_write(run_dir / METRICS_FILE, lambda tmp: table.reset_index(drop=True).to_parquet(tmp, index=False))
    eval_config = {"eval": OmegaConf.to_container(cfg.eval, resolve=True), "eval_hash": eval_hash, **runfolder.provenance()}
    runfolder.write_json(run_dir / EVAL_CONFIG_FILE, eval_config)
    if cfg.get("wandb") and cfg.wandb.enabled:
        from eval.wandb_log import log_evaluation

        log_evaluation(run_dir, table, eval_config, OmegaConf.to_container(cfg.wandb))
    return summary
