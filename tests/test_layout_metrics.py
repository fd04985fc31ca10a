"""Tests of eval/layout_metrics.py against oracles that do not share its code:
torchvision's box_iou, hand-worked values, brute force over permutations, and pycocotools
run on COCO json files written by hand."""

import itertools
import json

import numpy as np
import pytest
import torch
import torchvision
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eval.layout_metrics import (
    ap50,
    box_iou,
    mean_iou,
    miou_best,
    miou_hungarian,
    normalize_boxes,
    per_image_ap50,
    to_pixel_xywh,
)

MIOU_FUNCTIONS = [miou_best, miou_hungarian]


def random_boxes(rng, n, min_size=0.05, max_size=0.6):
    """n random normalized xyxy boxes, large enough to overlap often."""
    size = rng.uniform(min_size, max_size, size=(n, 2))
    corner = rng.uniform(0, 1 - size)
    return np.concatenate([corner, corner + size], axis=1)


# --- box_iou ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_box_iou_matches_torchvision(seed):
    rng = np.random.default_rng(seed)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    expected = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ours = box_iou(a, b)
    assert ours.shape == (7, 5)
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)
    # torch input gives the same matrix
    np.testing.assert_allclose(box_iou(torch.from_numpy(a), torch.from_numpy(b)), expected, atol=1e-12)


def test_box_iou_empty_and_degenerate():
    assert box_iou(np.zeros((0, 4)), random_boxes(np.random.default_rng(0), 3)).shape == (0, 3)
    # two zero-area boxes: union 0, IoU defined as 0 rather than NaN
    assert box_iou([[0.5, 0.5, 0.5, 0.5]], [[0.5, 0.5, 0.5, 0.5]])[0, 0] == 0.0


# --- pixel <-> normalized --------------------------------------------------------------------


def test_normalize_boxes_by_hand():
    # 640 x 480 image; the second box reaches past the border and is clipped
    out = normalize_boxes([[64, 48, 320, 240], [600, 400, 700, 500]], width=640, height=480)
    np.testing.assert_allclose(out, [[0.1, 0.1, 0.5, 0.5], [600 / 640, 400 / 480, 1.0, 1.0]])


def test_to_pixel_xywh_by_hand():
    out = to_pixel_xywh([[0.1, 0.2, 0.5, 0.8]], width=200, height=100)
    np.testing.assert_allclose(out, [[20, 20, 80, 60]])


# --- mIoU: hand cases ------------------------------------------------------------------------

BOX = [0.1, 0.1, 0.3, 0.3]  # 0.2 x 0.2


@pytest.mark.parametrize("miou", MIOU_FUNCTIONS)
def test_miou_exact_match_is_one(miou):
    assert miou([BOX], ["dog"], [BOX], [0.9], ["dog"]) == pytest.approx([1.0])


@pytest.mark.parametrize("miou", MIOU_FUNCTIONS)
def test_miou_shift_by_half_width_is_one_third(miou):
    # shifted right by 0.1 = half the width: intersection 0.1 x 0.2 = 0.02,
    # union 0.04 + 0.04 - 0.02 = 0.06, IoU = 1/3
    shifted = [0.2, 0.1, 0.4, 0.3]
    assert miou([BOX], ["dog"], [shifted], [0.9], ["dog"]) == pytest.approx([1 / 3])


@pytest.mark.parametrize("miou", MIOU_FUNCTIONS)
def test_miou_wrong_phrase_is_zero(miou):
    assert miou([BOX], ["dog"], [BOX], [0.9], ["cat"]) == [0.0]


@pytest.mark.parametrize("miou", MIOU_FUNCTIONS)
def test_miou_no_detection_is_zero(miou):
    assert miou([BOX], ["dog"], np.zeros((0, 4)), [], []) == [0.0]


@pytest.mark.parametrize("miou", MIOU_FUNCTIONS)
def test_miou_picks_the_best_detection(miou):
    shifted = [0.2, 0.1, 0.4, 0.3]  # IoU 1/3
    inside = [0.1, 0.1, 0.3, 0.25]  # 0.2 x 0.15 inside BOX: IoU 0.03 / 0.04 = 3/4
    assert miou([BOX], ["dog"], [shifted, inside], [0.9, 0.5], ["dog", "dog"]) == pytest.approx([0.75])


@pytest.mark.parametrize("miou", MIOU_FUNCTIONS)
def test_miou_min_score_ignores_weak_detections(miou):
    assert miou([BOX], ["dog"], [BOX], [0.2], ["dog"], min_score=0.35) == [0.0]
    assert miou([BOX], ["dog"], [BOX], [0.5], ["dog"], min_score=0.35) == pytest.approx([1.0])


@pytest.mark.parametrize("miou", MIOU_FUNCTIONS)
def test_miou_accepts_torch(miou):
    out = miou(torch.tensor([BOX]), ["dog"], torch.tensor([[0.2, 0.1, 0.4, 0.3]]), torch.tensor([0.9]), ["dog"])
    assert out == pytest.approx([1 / 3]) and all(type(v) is float for v in out)


@pytest.mark.parametrize("miou", MIOU_FUNCTIONS)
def test_miou_refuses_pixel_boxes(miou):
    with pytest.raises(ValueError, match="normalized"):
        miou([BOX], ["dog"], [[10, 10, 30, 30]], [0.9], ["dog"])


def test_mean_iou():
    assert mean_iou([1.0, 0.0, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_iou([])


# --- mIoU: repeated classes ------------------------------------------------------------------


def test_two_dogs_one_detection_best_vs_hungarian():
    left_dog = [0.0, 0.0, 0.5, 0.5]
    right_dog = [0.3, 0.0, 0.8, 0.5]
    one_detection = [0.2, 0.0, 0.6, 0.5]  # overlaps both requested dogs
    args = ([left_dog, right_dog], ["dog", "dog"], [one_detection], [0.9], ["dog"])
    best = miou_best(*args)
    hungarian = miou_hungarian(*args)
    # by hand: left  ∩ = 0.3 x 0.5 = 0.15, ∪ = 0.25 + 0.20 - 0.15 = 0.30 -> 1/2
    #          right ∩ = 0.3 x 0.5 = 0.15, ∪ = 0.25 + 0.20 - 0.15 = 0.30 -> 1/2
    assert best == pytest.approx([0.5, 0.5])
    assert sorted(hungarian) == pytest.approx([0.0, 0.5])


def test_hungarian_is_per_phrase():
    # a cat detection on the second dog's box must not be used for it
    out = miou_hungarian([BOX, BOX], ["dog", "dog"], [BOX, BOX], [0.9, 0.9], ["dog", "cat"])
    assert sorted(out) == pytest.approx([0.0, 1.0])


def brute_force_total_iou(requested, detections):
    """Best total IoU over one-to-one matchings: pad to a square matrix and try every permutation."""
    if len(detections) == 0:
        return 0.0
    ious = torchvision.ops.box_iou(torch.as_tensor(requested), torch.as_tensor(detections)).numpy()
    k = max(ious.shape)
    padded = np.zeros((k, k))
    padded[: ious.shape[0], : ious.shape[1]] = ious
    return max(sum(padded[i, perm[i]] for i in range(k)) for perm in itertools.permutations(range(k)))


@pytest.mark.parametrize("seed", range(30))
def test_hungarian_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_requested, n_detections = rng.integers(1, 4), rng.integers(0, 5)
    requested, detections = random_boxes(rng, n_requested), random_boxes(rng, n_detections)
    scores = rng.uniform(0.4, 1.0, n_detections)
    args = (requested, ["dog"] * n_requested, detections, scores, ["dog"] * n_detections)
    hungarian = miou_hungarian(*args)
    assert len(hungarian) == n_requested
    assert sum(hungarian) == pytest.approx(brute_force_total_iou(requested, detections), abs=1e-12)
    # a one-to-one match can never beat each box's own best detection
    assert all(h <= b + 1e-12 for h, b in zip(hungarian, miou_best(*args)))


# --- AP@50 -----------------------------------------------------------------------------------


def image(requested, detections, width=100, height=100):
    return {"requested": requested, "detections": detections, "width": width, "height": height}


DOG_A = [0.1, 0.1, 0.4, 0.4]
DOG_B = [0.6, 0.6, 0.9, 0.9]
FAR_AWAY = [0.6, 0.0, 0.9, 0.3]  # overlaps neither dog


def test_ap50_perfect_detections_is_100():
    perfect = image([(DOG_A, "dog"), (DOG_B, "cat")], [(DOG_A, 0.9, "dog"), (DOG_B, 0.8, "cat")])
    assert ap50([perfect, perfect]) == pytest.approx(100.0)
    assert per_image_ap50(perfect) == pytest.approx(100.0)


def test_ap50_one_hit_one_false_positive_one_miss_by_hand():
    # 2 ground-truth dogs. Detections by score: 0.9 TP, 0.8 FP; DOG_B is missed.
    # (recall, precision) after each: (0.5, 1.0), (0.5, 0.5). The interpolated precision
    # (max precision at recall >= r) is 1 for r in 0, 0.01, ..., 0.50 (51 points) and 0 for the
    # 50 points above 0.5, since recall 1 is never reached: AP = 51 / 101.
    case = image([(DOG_A, "dog"), (DOG_B, "dog")], [(DOG_A, 0.9, "dog"), (FAR_AWAY, 0.8, "dog")])
    assert per_image_ap50(case) == pytest.approx(100 * 51 / 101)


def test_ap50_interpolation_by_hand():
    # Detections by score: 0.9 FP, 0.8 TP, 0.7 TP. (recall, precision): (0, 0), (0.5, 1/2), (1, 2/3).
    # Max precision at recall >= r is 2/3 for every r in 0..1: AP = 2/3.
    case = image(
        [(DOG_A, "dog"), (DOG_B, "dog")],
        [(FAR_AWAY, 0.9, "dog"), (DOG_A, 0.8, "dog"), (DOG_B, 0.7, "dog")],
    )
    assert per_image_ap50(case) == pytest.approx(100 * 2 / 3)


def test_ap50_averages_over_phrases_and_phrase_matters():
    # cat found (AP 100); the dog's only detection says "cat" on a spot with no cat,
    # so the dog category has AP 0 and the cat gains a false positive ranked below its hit.
    case = image([(DOG_A, "cat"), (DOG_B, "dog")], [(DOG_A, 0.9, "cat"), (DOG_B, 0.8, "cat")])
    assert per_image_ap50(case) == pytest.approx(50.0)


def test_ap50_no_detections_is_zero():
    assert per_image_ap50(image([(DOG_A, "dog")], [])) == 0.0
    # a detection of a phrase never requested is no detection of a requested one
    assert per_image_ap50(image([(DOG_A, "dog")], [(DOG_A, 0.9, "unicorn")])) == 0.0


def test_ap50_without_ground_truth_raises():
    with pytest.raises(ValueError, match="ground truth"):
        ap50([image([], [(DOG_A, 0.9, "dog")])])
    with pytest.raises(ValueError, match="ground truth"):
        ap50([])


def test_ap50_refuses_pixel_boxes():
    with pytest.raises(ValueError, match="normalized"):
        per_image_ap50(image([([10, 10, 40, 40], "dog")], [([10, 10, 40, 40], 0.9, "dog")]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap50_matches_pycocotools_on_hand_written_json(tmp_path, seed):
    """Random case built in pixel xywh, written as COCO json files, evaluated by pycocotools alone."""
    rng = np.random.default_rng(seed)
    phrases = ["cat", "dog", "red teapot"]
    gt_json = {"images": [], "annotations": [], "categories": [{"id": 1 + i, "name": p} for i, p in enumerate(phrases)]}
    results_json, images = [], []
    for image_id in range(1, 5):
        width, height = int(rng.integers(200, 800)), int(rng.integers(200, 800))
        gt_json["images"].append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.png"})
        requested, detections = [], []
        for _ in range(rng.integers(1, 4)):
            cat = int(rng.integers(len(phrases)))
            w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            gt_json["annotations"].append({
                "id": len(gt_json["annotations"]) + 1, "image_id": image_id, "category_id": cat + 1,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })
            requested.append(([x / width, y / height, (x + w) / width, (y + h) / height], phrases[cat]))
            # one jittered detection per object (a hit or a miss depending on the jitter),
            # sometimes with the wrong phrase, plus a random false positive
            for jitter_scale, cat_det in ((rng.uniform(0, 0.5), cat), (None, int(rng.integers(len(phrases))))):
                if jitter_scale is None:
                    dw, dh = rng.uniform(0.05, 0.4) * width, rng.uniform(0.05, 0.4) * height
                    dx, dy = rng.uniform(0, width - dw), rng.uniform(0, height - dh)
                else:
                    dx = float(np.clip(x + rng.normal(0, jitter_scale) * w, 0, width - w))
                    dy = float(np.clip(y + rng.normal(0, jitter_scale) * h, 0, height - h))
                    dw, dh = w, h
                if rng.uniform() < 0.2:
                    cat_det = int(rng.integers(len(phrases)))
                score = float(rng.uniform(0.05, 1.0))
                results_json.append({"image_id": image_id, "category_id": cat_det + 1, "bbox": [dx, dy, dw, dh], "score": score})
                detections.append(([dx / width, dy / height, (dx + dw) / width, (dy + dh) / height], score, phrases[cat_det]))
        images.append(image(requested, detections, width, height))

    gt_path, results_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt_json))
    results_path.write_text(json.dumps(results_json))
    coco_gt = COCO(str(gt_path))
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(results_path)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    expected = evaluator.stats[1] * 100

    assert 0 < expected < 100, "the random case should be neither trivial nor hopeless"
    assert ap50(images) == pytest.approx(expected, abs=1e-9)


def test_ap50_is_silent(capsys):
    # pycocotools prints progress on every call; the harness's output must stay clean
    per_image_ap50(image([(DOG_A, "dog")], [(DOG_A, 0.9, "dog")]))
    assert capsys.readouterr().out == ""
