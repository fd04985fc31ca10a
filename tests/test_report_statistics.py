"""Issue 16: the report's statistics. Two-level bootstrap (combinations, then images) against a direct
computation, n/a where a level has a single unit, sign-flip p-values never printed as 0, Holm's
correction by hand, the resampled AP@50 equal to pycocotools, and the tables written by pandas."""

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

import runfolder
from eval.evaluate import run_evaluation
from eval.layout_metrics import Ap50Matches, ap50
from eval.report import (Estimate, combination_mean_bootstrap, comparison_display, comparison_table, format_p, holm,
                         paired_comparison, resampled_means, run_report)

from .test_evaluate import COLOURS, colour_cfg


def frame(values: dict) -> pd.DataFrame:
    """{combination: [image values]} -> the per-image frame the bootstrap takes."""
    return pd.DataFrame([{"combination": c, "v": v} for c, vs in values.items() for v in vs])


def pairs_frame(diffs: dict) -> pd.DataFrame:
    """{combination: [other - anyms per seed]} -> metrics rows of two methods on the same (combination, seed)."""
    rows = []
    for combo, ds in diffs.items():
        for seed, d in enumerate(ds):
            for method, v in (("anyms", 50.0), ("other", 50.0 + d)):
                rows.append({"image": f"images/{method}/{combo}/{seed}.png", "method": method, "combination": combo,
                             "seed": seed, "n_subjects": 2, "iou": v})
    return pd.DataFrame(rows)


# --- 1. the resampling unit ---------------------------------------------------------------------------

def test_two_level_bootstrap_spread_equals_the_direct_computation():
    # K combinations of n images: a replicate is the mean of K iid draws Y = (a random combination's images,
    # resampled), so Var* = (Var_c(m_c) + mean_c(s_c^2 / n)) / K with plug-in (ddof 0) variances.
    values = {"c1": [1.0, 2.0, 6.0], "c2": [10.0, 10.5, 11.0], "c3": [3.0, 3.0, 9.0], "c4": [20.0, 21.0, 25.0]}
    groups = [np.array(v) for v in values.values()]
    k, n = len(groups), 3
    means = np.array([g.mean() for g in groups])
    direct = (means.var() + np.mean([g.var() / n for g in groups])) / k
    boot = resampled_means(groups, 40000, np.random.default_rng(0), "two_level")
    assert boot.mean() == pytest.approx(means.mean(), abs=0.1)
    assert boot.var() == pytest.approx(direct, rel=0.03)
    # the old, within-combination unit: combinations fixed, Var* = mean_c(s_c^2 / n) / K
    within = resampled_means(groups, 40000, np.random.default_rng(0), "within_combinations")
    assert within.var() == pytest.approx(np.mean([g.var() / n for g in groups]) / k, rel=0.03)
    assert within.var() < boot.var() / 10  # seed noise only: far narrower than over combinations
    est = combination_mean_bootstrap(frame(values), "v", 4000, 0)
    assert est.mean == pytest.approx(means.mean())
    assert est.lo == pytest.approx(np.percentile(boot, 2.5), abs=0.5)
    assert est.hi == pytest.approx(np.percentile(boot, 97.5), abs=0.5)


def test_one_image_per_combination_gives_scipys_interval_over_combinations_and_na_within():
    from scipy import stats

    rng = np.random.default_rng(3)
    values = {f"c{i:02d}": [float(v)] for i, v in enumerate(rng.normal(90, 4, size=13))}  # MS-Bench small: 1 image each
    est = combination_mean_bootstrap(frame(values), "v", 20000, 0)
    flat = np.array([v[0] for v in values.values()])
    ci = stats.bootstrap((flat,), np.mean, n_resamples=20000, method="percentile", rng=np.random.default_rng(1)).confidence_interval
    assert est.hi - est.lo > 1.0  # not 0: the combinations vary
    assert est.lo == pytest.approx(ci.low, abs=0.15) and est.hi == pytest.approx(ci.high, abs=0.15)
    assert "± 0.0" not in est.text() and "n/a" not in est.text()
    within = combination_mean_bootstrap(frame(values), "v", 1000, 0, resample="within_combinations")
    assert np.isnan(within.lo) and within.text() == f"{flat.mean():.1f} ± n/a" and "one image per combination" in within.note
    # one combination: no interval over combinations, whatever the number of images
    single = combination_mean_bootstrap(frame({"c1": [1.0, 2.0, 3.0]}), "v", 1000, 0)
    assert single.text() == "2.0 ± n/a" and "one combination" in single.note


def test_interval_text_never_prints_plus_minus_zero_point_zero():
    assert Estimate(97.9, 97.88, 97.92, 5).text(1) == "97.9 ± 0.02"  # more decimals, not "± 0.0"
    assert Estimate(97.9, 97.9, 97.9 + 1e-13, 5).text(1) == "97.9 ± 0 (constant)"
    assert Estimate(97.9, float("nan"), float("nan"), 5).text(1) == "97.9 ± n/a"
    with pytest.raises(ValueError, match="bootstrap.resample"):
        combination_mean_bootstrap(frame({"a": [1.0], "b": [2.0]}), "v", 10, 0, resample="images")


# --- 2. paired comparisons ----------------------------------------------------------------------------

def test_a_p_value_with_every_resample_on_one_side_prints_below_one_over_b():
    rng = np.random.default_rng(0)
    diffs = {f"c{i:02d}": list(rng.uniform(1, 3, size=2)) for i in range(20)}  # every combination better
    row = paired_comparison(pairs_frame(diffs), "anyms", "other", "iou", samples=1000, seed=0)
    assert row["p_extreme"] == 0 and row["p_resamples"] == 1000 and not row["p_exact"]
    assert row["p_value"] == pytest.approx(2 / 1001)  # scipy's conservative estimate, never 0
    assert format_p(row["p_value"], 1000, row["p_extreme"]) == "< 0.001"
    shown = comparison_display(comparison_table(pairs_frame(diffs), "anyms", ["iou"], 1000, 0))
    assert list(shown["p"]) == ["< 0.001"] and "0.000" not in shown.to_string()


def test_two_pairs_cannot_give_a_small_p_value():
    # the review's case: 2 pairs read p = 0.000. Two combinations, both better: the exact sign-flip
    # distribution has 4 points, one as far out in each tail -> p = 2 x 1/4 = 0.5
    row = paired_comparison(pairs_frame({"c01": [2.0], "c02": [3.0]}), "anyms", "other", "iou", 1000, 0)
    assert row["p_exact"] and row["p_value"] == pytest.approx(0.5) and row["p_extreme"] == 1  # 2 x 1/4
    # within combinations the pairs are the unit: the same 2 pairs, the same exact answer
    row = paired_comparison(pairs_frame({"c01": [2.0], "c02": [3.0]}), "anyms", "other", "iou", 1000, 0,
                            resample="within_combinations")
    assert row["p_value"] == pytest.approx(0.5)
    # one combination under two_level: no test and no interval over combinations
    row = paired_comparison(pairs_frame({"c01": [2.0, 3.0, 4.0]}), "anyms", "other", "iou", 1000, 0)
    assert np.isnan(row["p_value"]) and np.isnan(row["lo"]) and format_p(row["p_value"], 1000) == "n/a"


def test_two_level_test_uses_combinations_not_seeds_as_the_unit():
    # three combinations with opposite effects and many seeds each: the seeds make the within-combination
    # test confident, the combinations do not
    diffs = {"c01": [5.0 + 0.1 * s for s in range(30)], "c02": [4.0 + 0.1 * s for s in range(30)],
             "c03": [-6.0 + 0.1 * s for s in range(30)]}
    two = paired_comparison(pairs_frame(diffs), "anyms", "other", "iou", 1000, 0)
    within = paired_comparison(pairs_frame(diffs), "anyms", "other", "iou", 1000, 0, resample="within_combinations")
    assert two["p_value"] >= 0.25 and two["lo"] < 0 < two["hi"]  # 3 combinations: exact, 8 sign flips
    assert within["p_value"] < 0.01 and within["lo"] > 0


def test_holm_on_a_hand_case():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (non-decreasing)
    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.01, float("nan"), 0.02])  # NaN (n/a) is not in the family: m = 2
    assert out[0] == pytest.approx(0.02) and np.isnan(out[1]) and out[2] == pytest.approx(0.02)
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:
        return
    assert holm(p) == pytest.approx(multipletests(p, method="holm")[1])


def test_the_comparison_table_adjusts_the_whole_family():
    rng = np.random.default_rng(1)
    rows = []
    for method in ("anyms", "a", "b"):
        for c in range(6):
            for seed in range(2):
                rows.append({"image": f"images/{method}/c{c}/{seed}.png", "method": method, "combination": f"c{c}",
                             "seed": seed, "n_subjects": 2, "iou": rng.normal(50, 5), "clip_i": rng.normal(80, 5)})
    table = comparison_table(pd.DataFrame(rows), "anyms", ["iou", "clip_i"], 500, 0)
    assert len(table) == 4 and table["p_holm"].to_numpy() == pytest.approx(holm(table["p_value"]))
    assert (table["p_holm"] >= table["p_value"]).all()
    shown = comparison_display(table)
    assert list(shown.columns[3:5]) == ["p", "p (Holm)"]


# --- 3. AP@50 resampled from per-image matches ---------------------------------------------------------

def random_image(rng) -> dict:
    phrases = ["dog", "cat", "toy car", "hat"]  # "hat" is detected but never requested
    requested = []
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.uniform(0, 0.6, 2)
        w, h = rng.uniform(0.1, 0.4, 2)
        requested.append(((x0, y0, x0 + w, y0 + h), str(rng.choice(phrases[:3]))))
    detections = []
    for _ in range(rng.integers(0, 8)):
        if rng.random() < 0.6:
            box, phrase = requested[rng.integers(len(requested))]
            b = np.clip(np.array(box) + rng.normal(0, 0.03, 4), 0, 1)
            box = (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
        else:
            x0, y0 = rng.uniform(0, 0.6, 2)
            box, phrase = (x0, y0, x0 + 0.2, y0 + 0.2), str(rng.choice(phrases))
        score = float(rng.choice([0.3, 0.5, 0.9])) if rng.random() < 0.5 else float(rng.uniform(0.05, 1))  # ties
        detections.append((box, score, phrase))
    return {"requested": requested, "detections": detections, "width": 96, "height": 64}


def test_resampled_ap50_equals_pycocotools_on_every_resample():
    rng = np.random.default_rng(1)
    images = [random_image(rng) for _ in range(25)]
    # one image with more than 100 detections of a phrase: COCO keeps the 100 best
    many = {"requested": [((0.1, 0.1, 0.5, 0.5), "dog")], "width": 64, "height": 64,
            "detections": [((0.1, 0.1, 0.5 - 0.001 * i, 0.5), float(rng.uniform(0.05, 1)), "dog") for i in range(130)]}
    images.append(many)
    matches = Ap50Matches(images)
    assert matches.ap50() == ap50(images)
    for _ in range(60):
        drawn = rng.integers(0, len(images), size=rng.integers(1, 30))
        assert matches.ap50(drawn) == ap50([images[i] for i in drawn])  # exactly, not approximately
    no_detections = [{"requested": images[0]["requested"], "detections": [], "width": 96, "height": 64}]
    assert Ap50Matches(no_detections).ap50() == ap50(no_detections) == 0.0


# --- 5. the report's tables, end to end on a synthetic run ---------------------------------------------

def write_run(run_dir, combos: dict, size=(96, 64)):
    """One image per (combination, seed): a red dog drawn at ``shift`` from its requested box."""
    w, h = size
    box = (0.125, 0.25, 0.5, 0.75)
    for combo, shifts in combos.items():
        for seed, shift in enumerate(shifts):
            image = Image.new("RGB", size, (200, 200, 200))
            x0, y0, x1, y1 = box
            ImageDraw.Draw(image).rectangle([(x0 + shift) * w, y0 * h, (x1 + shift) * w - 1, y1 * h - 1],
                                            fill=COLOURS["dog"])
            rel = runfolder.image_path("synthetic", combo, seed)
            runfolder.save_png(image, run_dir / rel)
            runfolder.append_record(runfolder.records_file(run_dir, "synthetic", (0, 1)), {
                "image": rel, "combination": combo, "method": "synthetic", "seed": seed, "prompt": "a dog",
                "n_subjects": 1, "width": w, "height": h,
                "subjects": [{"name": "dog0", "phrase": "dog", "role": "object", "box": list(box),
                              "references": [str(run_dir / rel)]}],
                "model": {"name": "synthetic"}, "config_hash": f"h{combo}{seed}", "versions": {}, "git_hash": "none",
                "device": "cpu", "dtype": "none", "seconds": None, "peak_memory_bytes": None, "created": 1.0,
            })


def test_one_image_per_combination_report_has_intervals_and_na_with_its_reason(tmp_path):
    write_run(tmp_path, {f"c{i:02d}": [0.03 * i] for i in range(6)})  # MS-Bench's shape: one image per combination
    run_evaluation(colour_cfg(tmp_path))
    run_report([tmp_path], tmp_path / "two", {"samples": 300, "ap_samples": 300, "seed": 0})
    md = (tmp_path / "two" / "table1.md").read_text()
    row = next(line for line in md.splitlines() if re.match(r"\|\s*synthetic\s*\|", line))
    # (memory reads n/a on the CPU, a column of its own; no interval is n/a)
    assert "bootstrap.resample=two_level" in md and "± 0.0" not in row and "± n/a" not in row
    assert re.search(r"\d ± 0\.[1-9]|\d ± [1-9]", row), row  # AP50 and mIoU carry a real interval
    tex = (tmp_path / "two" / "table1.tex").read_text()
    assert "\\toprule" in tex and "$\\pm$" in tex and "two\\_level" in tex
    run_report([tmp_path], tmp_path / "within", {"samples": 300, "ap_samples": 300, "seed": 0,
                                                 "resample": "within_combinations"})
    md = (tmp_path / "within" / "table1.md").read_text()
    row = next(line for line in md.splitlines() if re.match(r"\|\s*synthetic\s*\|", line))
    assert "bootstrap.resample=within_combinations" in md and "± n/a" in row and "± 0.0" not in row
    assert "n/a: one image per combination: no interval within combinations" in md
    assert "one image per combination" in (tmp_path / "within" / "table1.tex").read_text()
    # Table 2 is empty (one subject): a CSV with its header, not a 1-byte file
    assert pd.read_csv(tmp_path / "two" / "table2.csv").columns.tolist()[:3] == ["method", "n_images", "iou"]
