"""Layout metrics: how well the generated subjects sit in their requested boxes (DESIGN.md section 3).

Conventions shared by every function here:

- A box is ``(x0, y0, x1, y1)`` normalized to [0, 1] by the image width and height, origin top-left.
  Detectors give pixels: pass their boxes through :func:`normalize_boxes` first.
- Box arrays may be numpy arrays, torch tensors or nested lists, shaped ``[N, 4]`` (``N`` may be 0).
- Scalars come out as plain Python floats.

Pure functions over arrays: no model, no file, and nothing from ``anyms/``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

# Slack for "inside [0, 1]": normalized boxes come out of float divisions.
_NORMALIZED_TOLERANCE = 1e-6


def _as_box_array(boxes: Any) -> np.ndarray:
    """``boxes`` (numpy, torch or lists) as a float64 array ``[N, 4]``."""
    if hasattr(boxes, "detach"):  # torch tensor, without importing torch here
        boxes = boxes.detach().cpu().numpy()
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4] (x0, y0, x1, y1), got {array.shape}")
    return array


def _stack_boxes(boxes: Sequence[Any]) -> np.ndarray:
    """A list of single boxes (each numpy, torch or a tuple) as ``[N, 4]``."""
    rows = [box.detach().cpu().numpy() if hasattr(box, "detach") else box for box in boxes]
    return _as_box_array(rows)


def _as_score_array(scores: Any) -> np.ndarray:
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().numpy()
    return np.asarray(scores, dtype=np.float64).reshape(-1)


def _check_normalized(boxes: np.ndarray, what: str) -> None:
    """Refuse boxes outside [0, 1] or with x1 < x0 / y1 < y0.

    Why: pixel boxes mixed with normalized ones would not fail anywhere else, they would
    just silently score IoU 0.
    """
    if boxes.size == 0:
        return
    low, high = -_NORMALIZED_TOLERANCE, 1 + _NORMALIZED_TOLERANCE
    if boxes.min() < low or boxes.max() > high:
        raise ValueError(
            f"{what} must be normalized to [0, 1] (use normalize_boxes for pixel boxes); "
            f"got values in [{boxes.min():g}, {boxes.max():g}]"
        )
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise ValueError(f"{what} must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")


def normalize_boxes(boxes_px: Any, width: float, height: float) -> np.ndarray:
    """Pixel ``(x0, y0, x1, y1)`` boxes -> normalized ``[N, 4]`` boxes.

    x is divided by ``width``, y by ``height``; the result is clipped to [0, 1] because
    detectors may return boxes reaching slightly past the image border.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image width and height must be positive, got {width} x {height}")
    boxes = _as_box_array(boxes_px)
    scale = np.array([width, height, width, height], dtype=np.float64)
    return np.clip(boxes / scale, 0.0, 1.0)


def to_pixel_xywh(boxes: Any, width: float, height: float) -> np.ndarray:
    """Normalized ``(x0, y0, x1, y1)`` boxes -> pixel ``(x, y, w, h)`` boxes ``[N, 4]`` (COCO's format)."""
    boxes = _as_box_array(boxes)
    scale = np.array([width, height, width, height], dtype=np.float64)
    x0, y0, x1, y1 = (boxes * scale).T
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)


def box_iou(a: Any, b: Any) -> np.ndarray:
    """Pairwise IoU matrix ``[N, M]`` of xyxy boxes ``a`` ``[N, 4]`` and ``b`` ``[M, 4]``.

    IoU(p, q) = area(p ∩ q) / area(p ∪ q), with area(p ∪ q) = area(p) + area(q) - area(p ∩ q).
    Defined as 0 when the union is empty (two degenerate boxes), where torchvision gives NaN.
    """
    a, b = _as_box_array(a), _as_box_array(b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter_w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    inter_h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    intersection = inter_w * inter_h
    union = area_a[:, None] + area_b[None, :] - intersection
    safe_union = np.where(union > 0, union, 1.0)
    return np.where(union > 0, intersection / safe_union, 0.0)


def _layout_inputs(requested_boxes, requested_phrases, det_boxes, det_scores, det_phrases, min_score):
    """Validated arrays; detections scoring below ``min_score`` dropped."""
    requested = _as_box_array(requested_boxes)
    detections = _as_box_array(det_boxes)
    scores = _as_score_array(det_scores)
    requested_phrases, det_phrases = list(requested_phrases), list(det_phrases)
    if len(requested_phrases) != len(requested):
        raise ValueError(f"{len(requested)} requested boxes but {len(requested_phrases)} requested phrases")
    if not len(detections) == len(scores) == len(det_phrases):
        raise ValueError(
            f"detections disagree in length: {len(detections)} boxes, {len(scores)} scores, {len(det_phrases)} phrases"
        )
    _check_normalized(requested, "requested boxes")
    _check_normalized(detections, "detection boxes")
    kept = scores >= min_score
    det_phrases = [phrase for phrase, keep in zip(det_phrases, kept) if keep]
    return requested, requested_phrases, detections[kept], det_phrases


def miou_best(
    requested_boxes: Any,
    requested_phrases: Sequence[str],
    det_boxes: Any,
    det_scores: Any,
    det_phrases: Sequence[str],
    *,
    min_score: float = 0.0,
) -> list[float]:
    """Per requested box, the best IoU among detections of the same phrase; 0.0 if there is none.

    COCO-MIG's definition: ``iou_i = max{IoU(r_i, d_j) : phrase(d_j) == phrase(r_i)}`` (0 over an
    empty set). Several requested boxes may claim the same detection; see :func:`miou_hungarian`.
    Scores only serve ``min_score``: detections scoring below it are ignored (so one detection list,
    kept down to the AP threshold, can also serve mIoU at the box threshold).
    Returns one IoU per requested box, in order; :func:`mean_iou` averages them.
    """
    requested, requested_phrases, detections, det_phrases = _layout_inputs(
        requested_boxes, requested_phrases, det_boxes, det_scores, det_phrases, min_score
    )
    ious = box_iou(requested, detections)
    same_phrase = np.array(
        [[req == det for det in det_phrases] for req in requested_phrases], dtype=bool
    ).reshape(ious.shape)
    best = np.where(same_phrase, ious, 0.0).max(axis=1, initial=0.0)
    return [float(value) for value in best]


def miou_hungarian(
    requested_boxes: Any,
    requested_phrases: Sequence[str],
    det_boxes: Any,
    det_scores: Any,
    det_phrases: Sequence[str],
    *,
    min_score: float = 0.0,
) -> list[float]:
    """Per requested box, its IoU under a one-to-one matching with the detections of its phrase.

    For each phrase separately, the requested boxes and the detections of that phrase are matched
    one-to-one so as to maximize the total IoU (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment(..., maximize=True)``); a requested box left without a
    detection gets 0.0. Unlike :func:`miou_best`, two requested dogs cannot both claim one detected
    dog. ``min_score`` as in :func:`miou_best`. Returns one IoU per requested box, in order.
    """
    requested, requested_phrases, detections, det_phrases = _layout_inputs(
        requested_boxes, requested_phrases, det_boxes, det_scores, det_phrases, min_score
    )
    per_box = np.zeros(len(requested))
    for phrase in set(requested_phrases):
        req_idx = np.array([i for i, p in enumerate(requested_phrases) if p == phrase])
        det_idx = np.array([j for j, p in enumerate(det_phrases) if p == phrase], dtype=int)
        if len(det_idx) == 0:
            continue
        ious = box_iou(requested[req_idx], detections[det_idx])
        rows, cols = linear_sum_assignment(ious, maximize=True)
        per_box[req_idx[rows]] = ious[rows, cols]
    return [float(value) for value in per_box]


def assign_detections(
    requested_boxes: Any,
    requested_phrases: Sequence[str],
    det_boxes: Any,
    det_scores: Any,
    det_phrases: Sequence[str],
    region: str = "anywhere",
) -> list[int | None]:
    """Per requested box, the index of the detection its subject is scored on, or ``None`` (missed).

    Within each phrase, subjects and detections are matched one-to-one (Hungarian,
    ``scipy.optimize.linear_sum_assignment``), so two subjects never share a detection. The matching prefers
    overlap with the requested box, then the detection score (weight ``IoU + 1e-3 * score``). ``region``:
    ``"anywhere"`` (the AnyMS paper's reading: the phrase's detection wherever it is) or ``"in_box"`` (only
    detections overlapping the requested box).
    """
    if region not in ("anywhere", "in_box"):
        raise ValueError(f"identity_region must be 'anywhere' or 'in_box', got {region!r}")
    requested, requested_phrases, detections, det_phrases = _layout_inputs(
        requested_boxes, requested_phrases, det_boxes, det_scores, det_phrases, -np.inf
    )
    scores = _as_score_array(det_scores)
    out: list[int | None] = [None] * len(requested)
    for phrase in dict.fromkeys(requested_phrases):
        req_idx = np.array([i for i, p in enumerate(requested_phrases) if p == phrase])
        det_idx = np.array([j for j, p in enumerate(det_phrases) if p == phrase], dtype=int)
        if len(det_idx) == 0:
            continue
        ious = box_iou(requested[req_idx], detections[det_idx])
        weight = ious + 1e-3 * scores[det_idx][None, :]
        if region == "in_box":
            weight = np.where(ious > 0, weight, -1.0)
        rows, cols = linear_sum_assignment(weight, maximize=True)
        for r, c in zip(rows, cols):
            if weight[r, c] >= 0:
                out[int(req_idx[r])] = int(det_idx[c])
    return out


def mean_iou(per_box_ious: Sequence[float]) -> float:
    """Mean of per-box IoUs (mIoU). Raises ValueError on an empty list rather than returning NaN."""
    if len(per_box_ious) == 0:
        raise ValueError("mean_iou of no boxes: there is no requested box to score")
    return float(np.mean(per_box_ious))


def _coco_gt_and_results(images: Sequence[dict]) -> tuple[dict, list[dict]]:
    """The in-memory COCO ground-truth dataset and results list for :func:`ap50`."""
    phrases = sorted({phrase for image in images for _, phrase in image["requested"]})
    # COCO ids start at 1: COCOeval stores the matched gt id in its match table and reads 0 as
    # "unmatched", so an annotation with id 0 could never be a true positive.
    category_id = {phrase: i + 1 for i, phrase in enumerate(phrases)}
    coco_images, annotations, results = [], [], []
    for image_id, image in enumerate(images, start=1):
        width, height = image["width"], image["height"]
        coco_images.append({"id": image_id, "width": width, "height": height})

        requested = image["requested"]
        requested_boxes = _stack_boxes([box for box, _ in requested])
        _check_normalized(requested_boxes, "requested boxes")
        for (_, phrase), xywh in zip(requested, to_pixel_xywh(requested_boxes, width, height)):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_id[phrase],
                "bbox": [float(v) for v in xywh],
                "area": float(xywh[2] * xywh[3]),  # pixels: COCO's area ranges are in pixels
                "iscrowd": 0,
            })

        detections = image["detections"]
        det_boxes = _stack_boxes([box for box, _, _ in detections])
        _check_normalized(det_boxes, "detection boxes")
        for (_, score, phrase), xywh in zip(detections, to_pixel_xywh(det_boxes, width, height)):
            # A phrase requested nowhere has no ground truth: COCOeval would leave its category
            # out of the mean anyway (precision -1), so it is dropped here.
            if phrase not in category_id:
                continue
            results.append({
                "image_id": image_id,
                "category_id": category_id[phrase],
                "bbox": [float(v) for v in xywh],
                "score": float(score),
            })
    gt_dataset = {
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": category_id[p], "name": p} for p in phrases],
    }
    return gt_dataset, results


def ap50(images: Sequence[dict]) -> float:
    """AP at IoU 0.5 (x 100) over ``images``, through pycocotools' COCOeval (bbox).

    ``images`` is a list of dicts ``{"requested": [(box, phrase)], "detections": [(box, score, phrase)],
    "width": W, "height": H}`` with normalized boxes. The requested boxes are the ground truth, each
    of category ``phrase`` (category ids from the sorted set of requested phrases); the detections are
    the results with their scores. Boxes are converted to pixel xywh with each image's W and H.

    The value is ``COCOeval.stats[1] * 100``: IoU 0.5, area 'all', maxDets 100, i.e. the mean over
    categories of the 101-point interpolated precision over recall 0, 0.01, ..., 1. As in COCO, at most
    the 100 highest-scoring detections per image and category count.

    Edge cases. COCOeval reports -1 for a category without ground truth and leaves it out of the mean;
    stats[1] is -1 when no category has any. Here:
    - no requested box in any image: ValueError (AP is undefined, and -1 would pollute a mean);
    - detections of a phrase that is never requested: dropped (COCOeval would ignore them);
    - ground truth but no detection: 0.0 (nothing recalled; pycocotools' loadRes cannot take an
      empty result list, so this is answered without it).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dataset, results = _coco_gt_and_results(images)
    if not gt_dataset["annotations"]:
        raise ValueError("ap50 needs ground truth: no image has a requested box, so AP is undefined")
    if not results:
        return 0.0

    # pycocotools prints progress on every step; keep the harness's output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.maxDets = [1, 10, 100]  # stats[1] is read at maxDets[2]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap = float(evaluator.stats[1])
    if ap < 0:  # cannot happen with ground truth present; guard against a silent -100
        raise RuntimeError(f"COCOeval returned stats[1] = {ap} despite ground truth")
    return ap * 100.0


def per_image_ap50(image: dict) -> float:
    """:func:`ap50` of a single image (same dict format, same conventions)."""
    return ap50([image])


# --- AP@50 for resampled image sets ---------------------------------------------------------------------
#
# pycocotools matches detections to ground truth per (image, category), independently of every other image;
# only its accumulation pools images. So the matches are computed once per image (with pycocotools' own IoU
# and its greedy rule), and a resample (a list of image positions, repeats allowed) only re-runs the
# accumulation: COCOeval.accumulate's arithmetic, in its order, for IoU 0.5, area 'all', 100 detections.

_COCO_MAX_DETS = 100
_COCO_REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


class Ap50Matches:
    """Per image, its detections' category, score and whether each matched a requested box at IoU 0.5,
    exactly as pycocotools' ``COCOeval.evaluateImg`` decides it; :meth:`ap50` of any multiset of the images
    then equals :func:`ap50` of that list of image dicts (tested), without a pycocotools run."""

    def __init__(self, images: Sequence[dict]):
        from pycocotools import mask as mask_utils

        gt_dataset, results = _coco_gt_and_results(images)
        n = len(images)
        gts: dict[tuple[int, int], list] = {}
        for ann in gt_dataset["annotations"]:
            gts.setdefault((ann["image_id"], ann["category_id"]), []).append(ann["bbox"])
        dts: dict[tuple[int, int], list] = {}
        for res in results:
            dts.setdefault((res["image_id"], res["category_id"]), []).append((res["bbox"], res["score"]))
        self.gt_categories = [np.zeros(0, dtype=np.int64) for _ in range(n)]
        for (image_id, cat), boxes in gts.items():
            self.gt_categories[image_id - 1] = np.concatenate(
                [self.gt_categories[image_id - 1], np.full(len(boxes), cat, dtype=np.int64)])
        per_image: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(n)]
        for (image_id, cat), dets in dts.items():
            scores = np.array([s for _, s in dets], dtype=np.float64)
            order = np.argsort(-scores, kind="mergesort")[:_COCO_MAX_DETS]
            boxes = [dets[i][0] for i in order]
            gt = gts.get((image_id, cat), [])
            matched = np.zeros(len(order), dtype=bool)
            if gt:
                ious = np.asarray(mask_utils.iou(boxes, gt, [0] * len(gt)), dtype=np.float64).reshape(len(order), len(gt))
                taken = np.zeros(len(gt), dtype=bool)
                for d in range(len(order)):  # evaluateImg's greedy rule: best IoU >= 0.5 among free gts, ties to the later
                    best, m = min(0.5, 1 - 1e-10), -1
                    for g in range(len(gt)):
                        if taken[g] or ious[d, g] < best:
                            continue
                        best, m = ious[d, g], g
                    if m >= 0:
                        taken[m], matched[d] = True, True
            per_image[image_id - 1].append((np.full(len(order), cat, dtype=np.int64), scores[order], matched))
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=bool))
        self.det_categories, self.det_scores, self.det_matched = [], [], []
        for parts in per_image:
            cats, scores, matched = (np.concatenate(x) for x in zip(*parts)) if parts else empty
            self.det_categories.append(cats)
            self.det_scores.append(scores)
            self.det_matched.append(matched)

    def __len__(self) -> int:
        return len(self.gt_categories)

    def ap50(self, indices: Sequence[int] | None = None) -> float:
        """AP@50 (x 100) of the images at ``indices`` (positions in the list given, repeats allowed, order
        kept as pycocotools would see it); all images when ``None``."""
        indices = range(len(self)) if indices is None else indices
        gt = np.concatenate([self.gt_categories[i] for i in indices]) if len(indices) else np.zeros(0, dtype=np.int64)
        if not len(gt):
            raise ValueError("ap50 needs ground truth: no image has a requested box, so AP is undefined")
        cats = np.concatenate([self.det_categories[i] for i in indices])
        if not len(cats):
            return 0.0
        scores = np.concatenate([self.det_scores[i] for i in indices])
        matched = np.concatenate([self.det_matched[i] for i in indices])
        present, npig = np.unique(gt, return_counts=True)  # categories: those requested in these images
        keep = np.isin(cats, present)
        cats, scores, matched = cats[keep], scores[keep], matched[keep]
        order = np.lexsort((-scores, cats))  # stable: ties keep image order, as accumulate's mergesort
        cats, matched = cats[order], matched[order]
        starts = np.searchsorted(cats, present, side="left")
        ends = np.searchsorted(cats, present, side="right")
        precision = np.zeros((len(_COCO_REC_THRS), len(present)))
        for k in range(len(present)):
            m = matched[starts[k]:ends[k]]
            if not len(m):
                continue
            tp = np.cumsum(m).astype(float)
            fp = np.cumsum(~m).astype(float)
            rc = tp / npig[k]
            pr = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[::-1])[::-1]
            inds = np.searchsorted(rc, _COCO_REC_THRS, side="left")
            inside = inds < len(m)
            precision[inside, k] = pr[inds[inside]]
        return float(np.mean(precision.ravel())) * 100.0


def ap_images(metrics, detections, images: Sequence[str]) -> dict[str, dict]:
    """Per image, the input of :func:`ap50` from the evaluation's tables (``metrics.parquet`` and
    ``detections.parquet`` as DataFrames): requested boxes (scenes left out) and all detections kept."""
    req = metrics[metrics["image"].isin(images)]
    dets = detections[detections["image"].isin(images)] if len(detections) else detections
    by_image_dets = {k: g for k, g in dets.groupby("image")} if len(dets) else {}
    out = {}
    for image, g in req.groupby("image", sort=True):
        d = by_image_dets.get(image)
        in_layout = g[g["in_layout"].astype(bool)] if "in_layout" in g else g  # scenes are no layout ground truth
        out[image] = {
            "requested": [((r.req_x0, r.req_y0, r.req_x1, r.req_y1), r.phrase) for r in in_layout.itertuples()],
            "detections": [] if d is None else [((r.x0, r.y0, r.x1, r.y1), r.score, r.phrase) for r in d.itertuples()],
            "width": int(g["width"].iloc[0]), "height": int(g["height"].iloc[0]),
        }
    return out
