"""The evaluation protocol, each paper's metric as that paper defines it (issue 15): synthetic cases whose
answer the test computes itself, through the evaluation's own scoring function and report."""

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

import runfolder
from eval.evaluate import ReferenceCache, load_evaluators, run_evaluation, score_image
from eval.report import run_report

from .protocol_stubs import BoxSegmenter, FixedDetector
from .test_evaluate import eval_cfg

W = H = 128


def det(phrase, box, score, phrase_score=None):
    return {"phrase": phrase, "box": list(box), "score": score, "phrase_score": score if phrase_score is None else phrase_score}


def reference_pngs(tmp_path, n, size=64):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        p = tmp_path / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def make_record(subjects, prompt="a test"):
    return {"image": "images/m/c01/0.png", "combination": "c01", "method": "m", "seed": 0, "prompt": prompt,
            "n_subjects": len(subjects), "width": W, "height": H, "subjects": subjects}


@pytest.fixture(scope="module")
def scorers(tiny_eval_root):
    cfg = eval_cfg("unused", tiny_root=tiny_eval_root)
    _, _, scorers = load_evaluators(cfg.eval, ["clip_i", "dino", "clip_t", "m_dino"])
    return scorers


def score(record, image, answers, scorers, tiny_eval_root, *overrides, metrics=("clip_i", "dino", "m_dino")):
    cfg = eval_cfg("unused", *overrides, tiny_root=tiny_eval_root).eval
    detector, segmenter = FixedDetector(answers), BoxSegmenter()
    refs = ReferenceCache(detector, segmenter, scorers, list(metrics), cfg.box_threshold, cfg.text_threshold)
    return score_image(record, image, detector, segmenter, scorers, refs, cfg, list(metrics))


# --- 1, 2: AP ---------------------------------------------------------------------------------------------

def synthetic_ap_run(tmp_path, detections):
    """One image with one requested dog at DOG; ``detections`` for it; the record and image on disk."""
    image = Image.new("RGB", (W, H), (128, 128, 128))
    rel = runfolder.image_path("m", "c01", 0)
    runfolder.save_png(image, tmp_path / rel)
    (ref,) = reference_pngs(tmp_path, 1)
    runfolder.append_record(runfolder.records_file(tmp_path, "m", (0, 1)), {
        **make_record([{"name": "dog", "phrase": "dog", "role": "object", "box": list(DOG), "references": [str(ref)]}]),
        "model": {"name": "synthetic"}, "config_hash": "h", "versions": {}, "git_hash": "g", "device": "cpu",
        "dtype": "none", "seconds": None, "peak_memory_bytes": None, "created": 1.0})
    return {f"{W}x{H}": detections}


DOG = (0.1, 0.1, 0.6, 0.6)
ELSEWHERE = (0.65, 0.65, 0.95, 0.95)


def ap_of(tmp_path, answers, *overrides):
    cfg = eval_cfg(tmp_path, "eval.metrics=[miou,ap50]", "eval.prepare=null", *overrides)
    cfg.eval.detector = OmegaConf.create({"_target_": "tests.protocol_stubs.FixedDetector", "answers": answers})
    run_evaluation(cfg)
    run_report([tmp_path], tmp_path / "report", {"samples": 10, "ap_samples": 2, "seed": 0})
    return float(pd.read_csv(tmp_path / "report" / "table1.csv").loc[0, "ap50"])


def test_a_true_positive_at_0_20_is_kept_for_ap(tmp_path):
    # the only detection: at the requested box, scores 0.20 (under text_threshold 0.25, over ap_box_threshold 0.05)
    answers = synthetic_ap_run(tmp_path, [det("dog", DOG, 0.20)])
    assert ap_of(tmp_path, answers) == pytest.approx(100.0)  # before: the detection was dropped, AP 0
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert not m["detected"].any()  # and it stays out of layout and identity (under the box threshold)


@pytest.mark.parametrize("ap_score,expected", [("phrase", 100.0), ("box", 50.0)])
def test_ap_ranks_detections_by_the_phrase_mean_as_groundingdino_does(tmp_path, ap_score, expected):
    # a false positive with the higher box score but the lower phrase score, and a true positive the other way
    answers = synthetic_ap_run(tmp_path, [det("dog", ELSEWHERE, 0.9, 0.3), det("dog", DOG, 0.5, 0.8)])
    # ranked by phrase: TP first, precision 1 at recall 1 -> 100; by box: FP first, precision 1/2 at recall 1 ->
    # COCO's interpolated precision is 1/2 at every recall level -> 50
    assert ap_of(tmp_path, answers, f"eval.ap_score={ap_score}") == pytest.approx(expected)


# --- 3, 5: one-to-one identity, missed subjects, M-DINO ---------------------------------------------------

def test_three_dogs_and_two_detections_leave_one_missed_and_m_dino_zero(tmp_path, scorers, tiny_eval_root):
    refs = reference_pngs(tmp_path, 3)
    boxes = [(0.0, 0.3, 0.3, 0.7), (0.35, 0.3, 0.65, 0.7), (0.7, 0.3, 1.0, 0.7)]
    subjects = [{"name": f"dog{i}", "phrase": "dog", "role": "object", "box": list(b), "references": [str(r)]}
                for i, (b, r) in enumerate(zip(boxes, refs))]
    image = Image.new("RGB", (W, H), (90, 120, 150))
    answers = {f"{W}x{H}": [det("dog", boxes[0], 0.9), det("dog", boxes[1], 0.8)]}  # the third dog is absent
    rows, _ = score(make_record(subjects), image, answers, scorers, tiny_eval_root)
    assert [r["detected"] for r in rows] == [True, True, False]  # before: all three "detected"
    assert all(r["m_dino"] == 0.0 for r in rows)  # a missed subject sinks M-DINO
    # box_crop (default): the missed dog is scored on SAM's region of its requested box, a real number
    assert np.isfinite(rows[2]["dino"])
    rows_zero, _ = score(make_record(subjects), image, answers, scorers, tiny_eval_root, "eval.missed_subject=zero")
    assert rows_zero[2]["dino"] == 0.0 and rows_zero[2]["clip_i"] == 0.0
    rows_ex, _ = score(make_record(subjects), image, answers, scorers, tiny_eval_root, "eval.missed_subject=exclude")
    assert np.isnan(rows_ex[2]["dino"]) and rows_ex[0]["dino"] == pytest.approx(rows[0]["dino"], abs=1e-4)
    assert all(r["m_dino"] == 0.0 for r in rows_zero + rows_ex)


# --- 4: where identity is measured -------------------------------------------------------------------------

def test_a_subject_drawn_outside_its_box_is_found_anywhere_but_not_in_box(tmp_path, scorers, tiny_eval_root):
    (ref,) = reference_pngs(tmp_path, 1)
    subjects = [{"name": "dog", "phrase": "dog", "role": "object", "box": list(DOG), "references": [str(ref)]}]
    answers = {f"{W}x{H}": [det("dog", ELSEWHERE, 0.9)]}
    image = Image.new("RGB", (W, H), (90, 120, 150))
    anywhere, _ = score(make_record(subjects), image, answers, scorers, tiny_eval_root)
    in_box, _ = score(make_record(subjects), image, answers, scorers, tiny_eval_root, "eval.identity_region=in_box")
    assert anywhere[0]["detected"] and tuple(anywhere[0][k] for k in ("det_x0", "det_y0", "det_x1", "det_y1")) == ELSEWHERE
    assert not in_box[0]["detected"]
    assert anywhere[0]["iou"] == 0.0 == in_box[0]["iou"]  # layout stays box-based either way


# --- 11: identity confusion ---------------------------------------------------------------------------------

def test_two_swapped_subjects_give_a_swap_rate_of_100(tmp_path, scorers, tiny_eval_root):
    """Each subject's region holds the other subject's reference, pixel for pixel: each is closer to the other's
    references (cosine 1) than to its own."""
    ref_a, ref_b = reference_pngs(tmp_path, 2)
    left, right = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)
    image = Image.new("RGB", (W, H), (255, 255, 255))
    image.paste(Image.open(ref_b), (0, 0))  # B drawn in A's box
    image.paste(Image.open(ref_a), (64, 64))  # A drawn in B's box
    subjects = [{"name": "a", "phrase": "dog", "role": "object", "box": list(left), "references": [str(ref_a)]},
                {"name": "b", "phrase": "cat", "role": "object", "box": list(right), "references": [str(ref_b)]}]
    answers = {f"{W}x{H}": [det("dog", left, 0.9), det("cat", right, 0.9)]}
    rows, _ = score(make_record(subjects), image, answers, scorers, tiny_eval_root)
    assert [r["id_swapped"] for r in rows] == [True, True]
    assert all(r["id_margin"] < 0 for r in rows)
    # drawn in their own boxes: no swap, positive margins
    image.paste(Image.open(ref_a), (0, 0))
    image.paste(Image.open(ref_b), (64, 64))
    rows, _ = score(make_record(subjects), image, answers, scorers, tiny_eval_root)
    assert [r["id_swapped"] for r in rows] == [False, False] and all(r["id_margin"] > 0 for r in rows)
    assert rows[0]["dino"] == pytest.approx(100.0, abs=1e-3)
