"""The evaluation stage: a run folder's images -> ``metrics.parquet`` (one row per image x subject) and
``detections.parquet`` (one row per detection kept for AP), with the evaluation config beside them.

Per image: one detector call with all the image's phrases; detections at or above ``box_threshold`` are
matched to the requested boxes (best IoU among the subject's phrase: mIoU; one-to-one per phrase:
Hungarian); all detections down to ``ap_box_threshold`` are kept for AP@50. SAM segments the matched
detections (all boxes of an image in one prompt); each subject's crop (mask, cropped to its bounding box,
white background; the requested box crop when undetected) is compared with each of its references,
segmented the same way once and cached, and the scores averaged over references. CLIP-T scores the whole
image against the prompt. Nothing is NaN: an undetected subject has IoU 0 and ``detected=False``. Each row
keeps the subject's region as scored (``region_rle``: SAM's mask as COCO RLE JSON; ``region_source``:
``detection``, ``requested_box``, or ``none`` when no crop was scored), for the HTML report to show.
"""

from __future__ import annotations

import hashlib
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
from eval.grounding import mask_to_rle, pad_to_square, subject_crop
from runfolder.references import ReferenceImageError, load_reference
from eval.layout_metrics import assign_detections, miou_best, miou_hungarian

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.parquet"
DETECTIONS_FILE = "detections.parquet"
EVAL_CONFIG_FILE = "eval_config.json"
STORE_FILE = "evaluation.sqlite"  # the images scored so far (ScoreStore); metrics.parquet is merged from it
KNOWN_METRICS = ("miou", "miou_best", "ap50", "clip_i", "dino", "dreamsim", "clip_t", "m_dino")
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
        eval_cfg, drop=("device", "torch_threads", "bootstrap", "prepare", "tiny_root", "weights_dir"),
        locations=("weights_dir",))


def evaluator_line(eval_cfg: DictConfig) -> str:
    """The evaluate stage's first line: which evaluators score this run (``eval=tiny``'s are random)."""
    name = eval_cfg.get("name")
    if eval_cfg.get("tiny"):
        return f"evaluate: eval={name} (tiny random evaluators: plumbing only)"

    def value(key: str):
        return OmegaConf.select(eval_cfg, key, default=None)

    clip = "/".join(str(v) for v in (value("scorers.clip.model_name"), value("scorers.clip.pretrained")) if v)
    return (f"evaluate: eval={name} (GroundingDINO {value('detector.model_id_or_path')}, SAM {value('segmenter.model_type')}, "
            f"CLIP {clip}, DINO {value('scorers.dino.model')}, DreamSim {value('scorers.dreamsim.dreamsim_type')})")


def warn_tiny_evaluators_on_real_images(eval_cfg: DictConfig, records: Sequence[dict]) -> None:
    """A run of real models scored by random evaluators gives noise: said once, naming the models."""
    if not eval_cfg.get("tiny"):
        return
    real = sorted({str((r.get("model") or {}).get("name", "?")) for r in records if not (r.get("model") or {}).get("tiny")})
    if real:
        log.warning("these images come from %s, not tiny models, but eval=%s scores them with tiny random evaluators: "
                    "the numbers check plumbing only; eval=default scores them with the real evaluators",
                    ", ".join(real), eval_cfg.get("name"))


def check_metrics(names: Sequence[str]) -> list[str]:
    unknown = [m for m in names if m not in KNOWN_METRICS]
    if unknown:
        raise EvaluationError(f"eval.metrics: unknown metric(s) {unknown}; known: {list(KNOWN_METRICS)}")
    return list(names)


class ReferenceCache:
    """Each reference image detected, segmented and embedded once per evaluation run."""

    def __init__(self, detector, segmenter, scorers: dict[str, Any], metrics: Sequence[str], box_threshold, text_threshold):
        self.detector, self.segmenter, self.scorers = detector, segmenter, scorers
        self.metrics = [m for m in metrics if m in IDENTITY]
        self.thresholds = (box_threshold, text_threshold)
        self._embeddings: dict[tuple[str, str], torch.Tensor] = {}

    def crop(self, path: str, phrase: str) -> Image.Image:
        try:  # read as generation read it (runfolder.references): 16-bit scaled, alpha on white
            image = load_reference(path)
        except ReferenceImageError as err:
            raise EvaluationError(str(err)) from None
        dets = self.detector.detect(image, [phrase], *self.thresholds)
        if not dets:  # the whole reference, as DreamBench's references are subject-centred photos
            return pad_to_square(image)
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


IDENTITY_REGIONS = ("anywhere", "in_box")
MISSED_POLICIES = ("box_crop", "zero", "exclude")
AP_SCORES = ("phrase", "box")


def spans_whole_image(box, tol: float = 1e-6) -> bool:
    return box[0] <= tol and box[1] <= tol and box[2] >= 1 - tol and box[3] >= 1 - tol


def check_protocol(cfg: DictConfig) -> None:
    """The protocol values, each a config value recorded in eval_config.json and named in the tables."""
    checks = {"identity_region": IDENTITY_REGIONS, "missed_subject": MISSED_POLICIES, "ap_score": AP_SCORES}
    for key, allowed in checks.items():
        if cfg.get(key) not in allowed:
            raise EvaluationError(f"eval.{key}: {cfg.get(key)!r} is not one of {list(allowed)}")


PROTOCOL_BENCHMARKS = {"msbench": ("msbench",)}  # protocol -> the benchmarks (name prefixes) it is for


def check_benchmark_protocol(cfg: DictConfig, records: Sequence[dict]) -> None:
    """MS-Bench runs are scored with MS-Diffusion's protocol (eval=msbench: DINO v1) and every other run with
    the AnyMS paper's (eval=default: DINOv2); ``eval.protocol=any`` scores whatever is there."""
    protocol = str(cfg.get("protocol", "any"))
    if protocol == "any":
        return
    names = sorted({str(r.get("benchmark")) for r in records if r.get("benchmark")})
    is_msbench = [n for n in names if n.startswith(PROTOCOL_BENCHMARKS["msbench"])]
    wrong = is_msbench if protocol != "msbench" else [n for n in names if n not in is_msbench]
    if wrong:
        want = "eval=msbench (eval=tiny_msbench on the tiny evaluators)" if protocol != "msbench" else "eval=default"
        raise EvaluationError(
            f"eval.protocol: records of benchmark {wrong[0]} are scored with another protocol than "
            f"eval={cfg.get('name')} ({protocol}): use {want}, or eval.protocol=any to score them with this config")


# The columns of score_image's rows that are scores; the others say which image, subject and boxes (W&B summaries
# average these only).
METRIC_COLUMNS = ("iou", "iou_best", "clip_i", "dino", "dreamsim", "clip_t", "m_dino", "detected", "id_margin",
                  "id_swapped")


def score_image(record: dict, image: Image.Image, detector, segmenter, scorers, refs: ReferenceCache,
                cfg: DictConfig, metrics: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Rows for metrics.parquet (one per subject) and detections.parquet (every detection kept for AP).

    Detections: one call down to ``ap_box_threshold`` on both rules (box score and phrase score), all kept for AP
    and ranked there by ``ap_score`` (``phrase``: the phrase's mean token probability, GroundingDINO's COCO
    evaluation; ``box``: the max token probability); those at ``box_threshold`` / ``text_threshold`` are the
    pool for layout and identity. mIoU (``iou``) matches requested boxes and detections one-to-one within a
    phrase (``iou_best``: any detection per box). Identity regions: within a phrase, subjects and detections
    one-to-one, preferring overlap with the box (``identity_region``); a subject left without one is missed and
    scored by ``missed_subject``; M-DINO counts a missed subject as 0 whatever the policy."""
    subjects = record["subjects"]
    phrases = list(dict.fromkeys(s["phrase"] for s in subjects))
    ap_threshold = float(cfg.ap_box_threshold)
    kept = detector.detect(image, phrases, ap_threshold, min(ap_threshold, float(cfg.text_threshold)))
    text_threshold = float(cfg.text_threshold)
    matched_pool = [d for d in kept if d.score >= float(cfg.box_threshold)
                    and (d.phrase_score if d.phrase_score is not None else d.score) > text_threshold]
    req_boxes = [s["box"] for s in subjects]
    req_phrases = [s["phrase"] for s in subjects]
    det_boxes = [d.box for d in matched_pool]
    det_scores = [d.score for d in matched_pool]
    det_phrases = [d.phrase for d in matched_pool]
    in_layout = [not (cfg.get("layout_excludes_scenes", True) and s["role"] == "background"
                      and spans_whole_image(s["box"])) for s in subjects]
    ious_best = miou_best(req_boxes, req_phrases, det_boxes, det_scores, det_phrases)
    ious = miou_hungarian(req_boxes, req_phrases, det_boxes, det_scores, det_phrases)
    chosen = assign_detections(req_boxes, req_phrases, det_boxes, det_scores, det_phrases,
                               str(cfg.get("identity_region", "anywhere")))
    missed_policy = str(cfg.get("missed_subject", "box_crop"))

    crops: list[Image.Image | None] = []
    masks: dict[int, np.ndarray] = {}  # subject index -> the SAM mask its crop was cut with
    if segmenter is not None:
        # one SAM prompt: each subject's detection, or its requested box when missed (box_crop policy)
        prompts = [det_boxes[c] if c is not None else s["box"] for c, s in zip(chosen, subjects)]
        wanted = [i for i, c in enumerate(chosen) if c is not None or missed_policy == "box_crop"]
        masks = dict(zip(wanted, segmenter.segment(image, [prompts[i] for i in wanted]))) if wanted else {}
        crops = [subject_crop(image, masks[i], prompts[i]) if i in masks else None for i in range(len(subjects))]

    identity: dict[str, list[float]] = {}
    confusion: list[tuple[float, bool]] | None = None
    scored = [i for i, c in enumerate(crops) if c is not None]
    for m in metrics:
        if m not in IDENTITY:
            continue
        gen = _embed(scorers, m, [crops[i] for i in scored]) if scored else None
        values = [0.0 if missed_policy == "zero" else float("nan")] * len(subjects)
        ref = [refs.embeddings(s["references"], s["phrase"])[m] for s in subjects]
        for k, i in enumerate(scored):
            values[i] = float(100.0 * (ref[i] @ gen[k]).mean())
        identity[m] = values
        if m == "dino" and len(subjects) > 1 and scored:
            # identity confusion: each detected subject's region against every subject's references
            confusion = [(float("nan"), False)] * len(subjects)
            for k, i in enumerate(scored):
                if chosen[i] is None:
                    continue
                sims = [float(100.0 * (ref[j] @ gen[k]).mean()) for j in range(len(subjects))]
                best_other = max(v for j, v in enumerate(sims) if j != i)
                confusion[i] = (sims[i] - best_other, best_other > sims[i])
    clip_t = None
    if "clip_t" in metrics:
        img_f = scorers["clip"].image_features([image]).float()
        txt_f = scorers["clip"].text_features([record["prompt"]]).float()
        clip_t = float(100.0 * torch.nn.functional.cosine_similarity(img_f, txt_f).item())
    m_dino = None
    if "m_dino" in metrics and "dino" in identity:
        # MS-Diffusion: "to indicate whether each subject has been recreated": a missed subject makes it 0
        per_subject = [0.0 if c is None else min(max(v / 100.0, 0.0), 1.0) for c, v in zip(chosen, identity["dino"])]
        m_dino = float(100.0 * np.prod(per_subject))

    rows = []
    for i, s in enumerate(subjects):
        c = chosen[i]
        row = {
            "image": record["image"], "combination": record["combination"], "method": record["method"],
            "seed": record["seed"], "n_subjects": record["n_subjects"], "subject": s["name"], "phrase": s["phrase"],
            "role": s["role"], "width": record["width"], "height": record["height"],
            "req_x0": s["box"][0], "req_y0": s["box"][1], "req_x1": s["box"][2], "req_y1": s["box"][3],
            "detected": c is not None, "in_layout": in_layout[i],
            "iou": 100.0 * ious[i] if in_layout[i] else float("nan"),
            "iou_best": 100.0 * ious_best[i] if in_layout[i] else float("nan"),
            "det_score": float(det_scores[c]) if c is not None else 0.0,
            # the region the identity scorers saw (an output, not a setting: it leaves eval_hash alone): SAM's mask
            # as COCO RLE, prompted by the detection or, for a missed subject (box_crop), by the requested box
            "region_source": ("detection" if c is not None else "requested_box") if i in masks else "none",
            "region_rle": mask_to_rle(masks[i]) if i in masks else None,
        }
        for k, name in enumerate(("det_x0", "det_y0", "det_x1", "det_y1")):
            row[name] = float(det_boxes[c][k]) if c is not None else float("nan")
        for m, values in identity.items():
            row[m] = values[i]
        if confusion is not None:
            row["id_margin"], row["id_swapped"] = confusion[i]
        if clip_t is not None:
            row["clip_t"] = clip_t
        if m_dino is not None:
            row["m_dino"] = m_dino
        rows.append(row)
    rank_by_phrase = str(cfg.get("ap_score", "phrase")) == "phrase"
    det_rows = [{"image": record["image"], "method": record["method"], "combination": record["combination"],
                 "phrase": d.phrase, "box_score": float(d.score),
                 "phrase_score": float(d.phrase_score if d.phrase_score is not None else d.score),
                 "score": float(d.phrase_score if rank_by_phrase and d.phrase_score is not None else d.score),
                 "x0": float(d.box[0]), "y0": float(d.box[1]), "x1": float(d.box[2]), "y1": float(d.box[3])}
                for d in kept]
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


class ScoreStore:
    """The images scored so far, one row each, committed as soon as the image is scored.

    SQLite (the standard library's ``sqlite3``) rather than parquet parts: one file, and each image's metric
    and detection rows go in with one transaction that is on disk when ``commit`` returns (journal, fsync;
    ``synchronous=FULL``), so a SIGKILL loses at most the image in flight and never leaves half an image,
    without hundreds of small files or a rename protocol. The rows themselves are stored as JSON lists (their
    columns depend on the metrics asked for); ``metrics.parquet`` and ``detections.parquet`` are merged from
    here at the end of a run. A row is keyed by what decides its numbers: the image's path, the sha256 of its
    bytes as scored, the evaluation config's hash and the hash of the record fields scoring reads."""

    def __init__(self, path: Path):
        import sqlite3

        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None)  # explicit transactions below
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS scored (image TEXT NOT NULL, image_sha256 TEXT NOT NULL, "
                "eval_hash TEXT NOT NULL, record_key TEXT NOT NULL, git_hash TEXT, created REAL, metrics TEXT NOT NULL, "
                "detections TEXT NOT NULL, PRIMARY KEY (image, image_sha256, eval_hash, record_key))")
        except sqlite3.DatabaseError as err:
            raise EvaluationError(f"{path}: cannot be read ({err}); move it away to re-evaluate from scratch") from None

    def done(self, eval_hash: str) -> set[tuple[str, str, str]]:
        rows = self.db.execute("SELECT image, image_sha256, record_key FROM scored WHERE eval_hash = ?", (eval_hash,))
        return set(rows)

    def add(self, key: tuple[str, str, str], eval_hash: str, rows: list[dict], dets: list[dict], git_hash: str) -> None:
        import json
        import time

        image, sha, record_key = key
        with self.db:  # one transaction: both lists or neither
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR REPLACE INTO scored VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (image, sha, eval_hash, record_key, git_hash, time.time(), json.dumps(rows), json.dumps(dets)))

    def rows(self, keys: Sequence[tuple[str, str, str]], eval_hash: str) -> tuple[list[dict], list[dict]]:
        """The metric and detection rows of ``keys``, in their order, one key at a time (memory: the rows only)."""
        import json

        metrics, dets = [], []
        for image, sha, record_key in keys:
            hit = self.db.execute("SELECT metrics, detections FROM scored WHERE image = ? AND image_sha256 = ? AND "
                                  "eval_hash = ? AND record_key = ?", (image, sha, eval_hash, record_key)).fetchone()
            if hit is not None:
                metrics += json.loads(hit[0])
                dets += json.loads(hit[1])
        return metrics, dets

    def prune(self, current: set[tuple[str, str, str]]) -> int:
        """Forgets rows of images that are gone or changed (any evaluation config); returns how many."""
        stale = [k for k in self.db.execute("SELECT DISTINCT image, image_sha256, record_key FROM scored")
                 if tuple(k) not in current]
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("DELETE FROM scored WHERE image = ? AND image_sha256 = ? AND record_key = ?", stale)
        return len(stale)

    def close(self) -> None:
        self.db.close()


def read_image_bytes(path: Path) -> bytes:
    if not path.exists():
        raise EvaluationError(f"{path}: image named by its record is missing (regenerate it, or remove its record)")
    return path.read_bytes()


def decode_image(path: Path, data: bytes, verify_only: bool = False) -> Image.Image | None:
    """The image of ``data`` (the bytes of ``path``) in RGB; ``verify_only``: check it is readable, decode nothing."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        if verify_only:
            return None
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise EvaluationError(f"{path}: not a readable image ({err}); regenerate it (delete the file and run generate)") from None


def record_key(record: dict, reference_digest) -> str:
    """Hash of what scoring reads from a record besides the image: the request (prompt, subjects, boxes), the
    content of the references, and the fields copied into the rows."""
    fields = ("image", "combination", "method", "seed", "prompt", "n_subjects", "width", "height", "model",
              "config_hash", "subjects")
    return runfolder.config_hash({
        **{k: record.get(k) for k in fields},
        "reference_sha256": [[reference_digest(p) for p in s["references"]] for s in record["subjects"]],
    })


def check_evaluator_paths(eval_cfg: DictConfig, metrics: Sequence[str]) -> None:
    """The evaluators' local files by kind, before any loads: SAM's checkpoint a file that exists (when a metric
    needs SAM), a local GroundingDINO a folder that exists. Hub ids are left to the loaders, which name how to get
    them; the tiny evaluators are written by ``eval.prepare`` when they load."""
    if eval_cfg.get("tiny"):
        return
    checkpoint = OmegaConf.select(eval_cfg, "segmenter.checkpoint", default=None)
    if checkpoint is not None and any(m in IDENTITY or m == "m_dino" for m in metrics):
        path = Path(str(checkpoint))
        if path.is_dir():
            raise EvaluationError(f"eval.segmenter.checkpoint: {path} is a folder; point it at SAM's .pth file")
        if not path.exists():
            raise EvaluationError(
                f"eval.segmenter.checkpoint: {path} does not exist; download {path.name} from "
                "https://dl.fbaipublicfiles.com/segment_anything/ into eval.weights_dir (paths.weights_dir=FOLDER or "
                "ANYMS_WEIGHTS), or point eval.segmenter.checkpoint at it")
    detector = OmegaConf.select(eval_cfg, "detector.model_id_or_path", default=None)
    if detector is not None and str(detector).startswith(("/", ".", "~")):
        path = Path(str(detector)).expanduser()
        if not path.is_dir():
            raise EvaluationError(f"eval.detector.model_id_or_path: {detector} is not a folder; point it at GroundingDINO's "
                                  "folder (save_pretrained's), or give the hub id IDEA-Research/grounding-dino-tiny")


def check_evaluation(cfg: DictConfig) -> list[str]:
    """Everything that can be wrong with the config or the run folder, before an evaluator loads or a file is
    written (issue 32: ``scripts/evaluate.py`` runs it before Hydra makes its log folder): the metrics and
    protocol values, the evaluators' local files, the run folder (it exists: evaluate never makes one), its records,
    every image readable, every reference readable and large enough (when an identity metric compares with them).
    Returns the metrics to compute; raises :class:`EvaluationError` or :class:`~runfolder.RunFolderError` naming the
    field or file."""
    from runfolder.references import check_references

    metrics = check_metrics(list(cfg.eval.metrics))
    check_protocol(cfg.eval)
    if "m_dino" in metrics and "dino" not in metrics:
        metrics.append("dino")
    check_evaluator_paths(cfg.eval, metrics)
    run_dir = runfolder.existing_run_dir(cfg.run_dir)
    records = runfolder.read_records(run_dir)  # validated against the schema: names file, line and field
    if not records:
        raise EvaluationError(f"run_dir: {run_dir} has no records in {run_dir / runfolder.RECORDS}; run generate (or "
                              "import_images) first")
    check_benchmark_protocol(cfg.eval, records)
    for r in records:
        path = run_dir / r["image"]
        decode_image(path, read_image_bytes(path), verify_only=True)
    # the references the identity metrics compare with (no other metric reads them): checked here, not after the
    # evaluators have loaded
    if any(m in IDENTITY for m in metrics):
        try:
            check_references(p for r in records for s in r["subjects"] for p in s["references"])
        except ReferenceImageError as err:
            raise EvaluationError(str(err)) from None
    return metrics


def run_evaluation(cfg: DictConfig, metrics: list[str] | None = None) -> EvaluationSummary:
    """Scores the run folder's images not scored yet (by content, see :class:`ScoreStore`), one at a time:
    each is read, hashed, decoded, scored, committed and released before the next; then merges
    ``metrics.parquet`` and ``detections.parquet`` for the images the records name now. One evaluation per
    run folder at a time (``locks/evaluate.metrics.lock``)."""
    from runfolder.lock import writer_lock

    # before the lock: a refused command leaves the run folder as it was (metrics: the check's result when the entry
    # point has already run it)
    metrics = list(metrics) if metrics is not None else check_evaluation(cfg)
    run_dir = Path(cfg.run_dir)
    with writer_lock(run_dir, "evaluate", "metrics"):
        return _run_evaluation(cfg, run_dir, metrics)


def _run_evaluation(cfg: DictConfig, run_dir: Path, metrics: list[str]) -> EvaluationSummary:
    import time
    from functools import lru_cache

    records = runfolder.read_records(run_dir)  # validated against the schema: names file, line and field
    missing = sorted(runfolder.planned_images(run_dir) - {r["image"] for r in records})
    if missing:  # shards still running or failed: score what is there, say what is not
        log.warning("%d planned image(s) have no record yet (unfinished generation shards?), e.g. %s; "
                    "scoring the %d that are there", len(missing), missing[:3], len(records))
    if not records:
        raise EvaluationError(f"{run_dir}: no records in {run_dir / runfolder.RECORDS}; run generate (or import) first")
    check_benchmark_protocol(cfg.eval, records)
    warn_tiny_evaluators_on_real_images(cfg.eval, records)
    eval_hash = runfolder.config_hash(eval_identity(cfg.eval))

    @lru_cache(maxsize=None)
    def reference_digest(path: str) -> str | None:
        return runfolder.file_digest(path) if Path(path).is_file() else None  # a missing one fails when scored

    # every image readable before models load, and its content digest (the bytes hashed and checked, not kept)
    keys: dict[str, tuple[str, str, str]] = {}
    for r in records:
        path = run_dir / r["image"]
        data = read_image_bytes(path)
        decode_image(path, data, verify_only=True)
        sha = hashlib.sha256(data).hexdigest()
        del data
        if r.get("image_sha256") and r["image_sha256"] != sha:
            log.warning("%s: its bytes are not those its record names (image_sha256 %s..., file %s...): replaced "
                        "after generation? Scoring the file as it is", path, r["image_sha256"][:12], sha[:12])
        keys[r["image"]] = (r["image"], sha, record_key(r, reference_digest))

    store = ScoreStore(run_dir / STORE_FILE)
    try:
        done = store.done(eval_hash)
        todo = [r for r in records if keys[r["image"]] not in done]
        summary = EvaluationSummary(run_dir, planned=len(records), skipped=len(records) - len(todo), missing=missing)
        if todo:
            detector, segmenter, scorers = load_evaluators(cfg.eval, metrics)
            refs = ReferenceCache(detector, segmenter, scorers, metrics, float(cfg.eval.box_threshold),
                                  float(cfg.eval.text_threshold))
            git = runfolder.git_hash()
            start = time.perf_counter()
            for record in tqdm(todo, desc="evaluate", unit="img", disable=not cfg.progress):
                path = run_dir / record["image"]
                data = read_image_bytes(path)
                sha = hashlib.sha256(data).hexdigest()  # the bytes scored: a file replaced since is caught next run
                image = decode_image(path, data)
                del data
                r_rows, r_dets = score_image(record, image, detector, segmenter, scorers, refs, cfg.eval, metrics)
                del image
                for row in r_rows:
                    row.update({"config_hash": record["config_hash"], "eval_hash": eval_hash,
                                "model": (record["model"] or {}).get("name", "?"), "image_sha256": sha,
                                "record_key": keys[record["image"]][2], "eval_git_hash": git})
                keys[record["image"]] = (record["image"], sha, keys[record["image"]][2])
                store.add(keys[record["image"]], eval_hash, r_rows, r_dets, git)
                summary.scored.append(record["image"])
            summary.seconds_per_image = (time.perf_counter() - start) / len(todo)

        # merge: the rows of the images the records name now, with the content they have now
        current = [keys[r["image"]] for r in records]
        rows, det_rows = store.rows(current, eval_hash)
        store.prune(set(current))
    finally:
        store.close()
    table = pd.DataFrame(rows).sort_values(["method", "combination", "seed", "subject"]).reset_index(drop=True)
    dets = pd.DataFrame(det_rows, columns=["image", "method", "combination", "phrase", "score", "box_score",
                                           "phrase_score", "x0", "y0", "x1", "y1"])
    runfolder.atomic_write(run_dir / DETECTIONS_FILE, lambda tmp: dets.to_parquet(tmp, index=False))
    runfolder.atomic_write(run_dir / METRICS_FILE, lambda tmp: table.to_parquet(tmp, index=False))
    # provenance: the hardware that ran the evaluators here, beside (never in) the eval hash
    eval_config = {"eval": OmegaConf.to_container(cfg.eval, resolve=True), "eval_hash": eval_hash,
                   **runfolder.provenance(cfg.eval.get("device") or "cpu")}
    runfolder.write_json(run_dir / EVAL_CONFIG_FILE, eval_config)
    if summary.scored and cfg.get("wandb") and cfg.wandb.enabled:
        from eval.wandb_log import log_evaluation

        log_evaluation(run_dir, table, eval_config, OmegaConf.to_container(cfg.wandb), records, METRIC_COLUMNS)
    return summary
