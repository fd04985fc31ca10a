"""The paper's comparison figures (eval/figures.py: Fig. 5, 6, 9) and the attention figures' colormap
(eval/attention.py, Fig. 7): grid sizes, which (combination, seed) pairs, labels that never collide, wrapped
prompts, requested and detected boxes told apart, and the report listing what it drew."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eval import figures
from eval.evaluate import EvaluationError
from runfolder.pictures import colour

from . import synthetic_run
from .conftest import data_root

DATA = data_root()
DREAMBENCH = ["dog", "cat", "backpack"]  # one real reference per subject where the images are here


def report_inputs(run_dir, methods, combos=("c01", "c02"), seeds=(0, 1), missing=(), prompt=None):
    """(record, run folder) pairs and their metrics rows, as run_report hands them over: random 64 px images,
    references from DreamBench when present; each subject detected a little right of its box, except the
    last subject of seed 1 (missed). ``missing``: (method, combination, seed) never made."""
    record_runs, rows = [], []
    for method in methods:
        for c in combos:
            for s in seeds:
                if (method, c, s) in missing:
                    continue
                rec = synthetic_run.record(run_dir, method, c, s, n_subjects=2 + (c == "c02"))
                if DATA is not None:
                    for subject, name in zip(rec["subjects"], DREAMBENCH):
                        subject["references"] = [str(sorted((DATA / "dreambench" / name).glob("*.jpg"))[0])]
                if prompt:
                    rec["prompt"] = prompt
                record_runs.append((rec, run_dir))
                for j, subject in enumerate(rec["subjects"]):
                    found = not (s == 1 and j == len(rec["subjects"]) - 1)
                    x0, y0, x1, y1 = subject["box"]
                    det = [min(x0 + 0.05, 1), y0, min(x1 + 0.05, 1), y1] if found else [np.nan] * 4
                    rows.append({"image": rec["image"], "method": method, "combination": c, "seed": s,
                                 "n_subjects": rec["n_subjects"], "subject": subject["name"],
                                 **dict(zip(["req_x0", "req_y0", "req_x1", "req_y1"], subject["box"])),
                                 **dict(zip(figures.DETECTED, det)), "detected": found,
                                 "iou": 80.0 if found else 0.0, "dino": 50.0 + j, "clip_i": 70.0 + j})
    return record_runs, pd.DataFrame(rows)


def layout_rows(path) -> int:
    """Rows of layout cells in a figure: runs of the layout canvas's colour down the first column."""
    column = np.asarray(Image.open(path).convert("RGB"))[:, figures.PAD + 2]
    canvas = np.all(column == figures.CANVAS, axis=1).astype(int)
    edges = np.flatnonzero(np.diff(np.r_[0, canvas, 0]))
    return sum(1 for start, stop in zip(edges[::2], edges[1::2]) if stop - start > figures.CELL // 2)


def test_the_three_figures_have_a_row_per_pair_and_a_column_per_method(tmp_path):
    methods = ["gligen", "wo_local", "anyms"]
    record_runs, metrics = report_inputs(tmp_path, methods)
    drawn = figures.write_figures(record_runs, metrics, tmp_path / "figures", {"samples": 3, "seed": 0})
    expected = {"comparison": (3, 1 + 3), "ablation": (3, 1 + 2)}  # rows: pairs; columns: layout + methods
    for name, (rows, columns) in expected.items():
        figure = drawn[name]
        image = Image.open(figure.path)
        assert (figure.rows, figure.columns) == (rows, columns)
        assert image.width == columns * (figures.CELL + figures.PAD) + figures.PAD
        assert image.height == figure.header_height + rows * figure.row_height
        assert layout_rows(figure.path) == rows
    assert drawn["comparison"].methods == ["anyms", "wo_local", "gligen"]  # the paper's method first
    assert drawn["ablation"].methods == ["anyms", "wo_local"]
    sheet = drawn["combinations"]  # one panel per combination
    assert (sheet.rows, sheet.columns) == (1, 2) and layout_rows(sheet.path) == 1
    assert Image.open(sheet.path).width == 2 * (figures.CELL + figures.PAD) + figures.PAD


def test_a_reference_replaced_between_two_reports_is_drawn_anew(tmp_path):
    record_runs, metrics = report_inputs(tmp_path, ["anyms"], combos=("c01",), seeds=(0,))
    reference = tmp_path / "ref.png"
    for record, _ in record_runs:
        for subject in record["subjects"]:
            subject["references"] = [str(reference)]
    sheets = []
    for colour_now in ("red", "blue"):  # the same path, new content
        Image.new("RGB", (64, 64), colour_now).save(reference)
        drawn = figures.write_figures(record_runs, metrics, tmp_path / colour_now, {"samples": 1})
        sheets.append(np.asarray(Image.open(drawn["combinations"].path).convert("RGB")))
    assert not np.array_equal(sheets[0], sheets[1])
    assert figures.reference_thumbnail.cache_info().currsize == 0  # nothing held after a report


def test_an_ablation_with_one_of_its_methods_is_skipped_with_the_reason(tmp_path):
    record_runs, metrics = report_inputs(tmp_path, ["anyms", "gligen"], combos=("c01",), seeds=(0,))
    drawn = figures.write_figures(record_runs, metrics, tmp_path / "figures", {})
    assert drawn["ablation"].path is None and "present: anyms" in drawn["ablation"].note
    assert not (tmp_path / "figures" / "ablation.png").exists()
    assert drawn["ablation"].summary(tmp_path) == {"skipped": drawn["ablation"].note}


def test_the_pair_sample_is_reproducible_and_spreads_over_combinations_first():
    pairs = {(c, s) for c in ("c01", "c02", "c03") for s in range(3)}
    first = figures.sample_pairs(pairs, 3, seed=0)
    assert first == figures.sample_pairs(pairs, 3, seed=0)
    assert sorted(c for c, _ in first) == ["c01", "c02", "c03"]
    assert len({tuple(figures.sample_pairs(pairs, 3, seed)) for seed in range(10)}) > 1  # the seed matters
    five = figures.sample_pairs(pairs, 5, seed=1)
    assert len(set(five)) == 5 and {c for c, _ in five} == {"c01", "c02", "c03"}
    assert figures.sample_pairs(pairs, 20, seed=0) == sorted(pairs)


def test_the_sample_takes_pairs_every_method_made_and_explicit_pairs_are_followed(tmp_path):
    missing = {("gligen", "c01", 0), ("gligen", "c01", 1)}
    record_runs, metrics = report_inputs(tmp_path, ["anyms", "gligen"], missing=missing)
    drawn = figures.write_figures(record_runs, metrics, tmp_path / "a", {"samples": 4})
    assert drawn["comparison"].pairs == ["c02:0", "c02:1"]  # gligen made no c01
    drawn = figures.write_figures(record_runs, metrics, tmp_path / "b", {"pairs": ["c02:1", "c01:0"]})
    assert drawn["comparison"].pairs == ["c02:1", "c01:0"]  # as given, a missing image shown as such
    assert drawn["comparison"].rows == 2


def test_with_several_run_folders_each_cell_finds_its_rows_under_the_qualified_image_name(tmp_path, monkeypatch):
    a_runs, a_metrics = report_inputs(tmp_path / "a", ["anyms"], combos=("c01",), seeds=(0,))
    b_runs, b_metrics = report_inputs(tmp_path / "b", ["gligen"], combos=("c01",), seeds=(0,))
    metrics = pd.concat([m.assign(image=[str(d / i) for i in m["image"]])  # as run_report names them
                         for m, d in ((a_metrics, tmp_path / "a"), (b_metrics, tmp_path / "b"))])
    scored = []
    score = figures.image_scores
    monkeypatch.setattr(figures, "image_scores", lambda rows: (scored.append(len(rows)), score(rows))[1])
    figures.write_figures(a_runs + b_runs, metrics, tmp_path / "figures", {})
    assert scored and all(n == 2 for n in scored)  # every cell: its image's two subjects


@pytest.mark.parametrize("pairs", [["c01:0", "c09:0"], ["c01"], "c01:x"])
def test_a_pair_not_in_the_report_names_the_setting_and_the_pairs_there(tmp_path, pairs):
    record_runs, metrics = report_inputs(tmp_path, ["anyms"], combos=("c01",), seeds=(0, 1))
    with pytest.raises(EvaluationError, match=r"figures\.pairs: .* available: c01:0, c01:1$"):
        figures.write_figures(record_runs, metrics, tmp_path / "figures", {"pairs": pairs})


def test_seven_overlapping_subjects_get_labels_that_never_intersect():
    rng = np.random.default_rng(0)
    boxes = [(40 + d, 50 + d, 180 + d, 200 + d) for d in rng.integers(0, 12, 7)]  # nearly the same box, 7 times
    size = figures.badge_size("7")
    rects = figures.place_labels(boxes, size, (0, 0, figures.CELL, figures.CELL))
    assert len(rects) == 7
    for a, b in combinations(rects, 2):
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    for x0, y0, x1, y1 in rects:
        assert 0 <= x0 and 0 <= y0 and x1 <= figures.CELL and y1 <= figures.CELL
        assert (x1 - x0, y1 - y0) == size
    assert rects[0][:2] == (boxes[0][0] + 2, boxes[0][1] + 2)  # the first one in its box's corner


def test_a_long_prompt_wraps_within_the_row(tmp_path):
    prompt = ("a corgi wearing pink heart-shaped sunglasses and a red backpack sitting next to a grey tabby cat "
              "with a blue collar on a wooden bench in a snowy park at dusk, with a teapot, a vase and a clock ") * 2
    width = 2 * (figures.CELL + figures.PAD) - figures.PAD
    lines = figures.wrap(prompt, width)
    assert len(lines) > 2 and all(figures.text_width(line) <= width for line in lines)
    assert " ".join(lines).split() == prompt.split()
    record_runs, metrics = report_inputs(tmp_path, ["anyms"], combos=("c01",), seeds=(0,), prompt=prompt)
    figure = figures.write_figures(record_runs, metrics, tmp_path / "figures", {})["comparison"]
    image = np.asarray(Image.open(figure.path).convert("L"))
    assert image.shape[1] == 2 * (figures.CELL + figures.PAD) + figures.PAD  # the prompt did not widen it
    assert (image[:, -figures.PAD:] == 255).all()  # nothing ran past the right margin


def test_requested_boxes_are_outlines_and_detected_boxes_are_filled(tmp_path):
    grey = (128, 128, 128)
    record = {"subjects": [{"name": "dog", "phrase": "dog", "box": [0.1, 0.1, 0.45, 0.9]}]}
    detected = [[0.55, 0.1, 0.9, 0.9]]  # beside the request, so each style is seen alone
    picture = np.asarray(figures.method_picture(Image.new("RGB", (64, 64), grey), record, detected)).astype(int)
    c = np.array(Image.new("RGB", (1, 1), colour(0)).getpixel((0, 0)))
    y = figures.CELL // 2
    req_x0, det_x0 = int(0.1 * figures.CELL), int(0.55 * figures.CELL)
    # requested: a thick line of the subject's colour, the inside untouched
    assert all((picture[y, req_x0 + k] == c).all() for k in range(figures.REQUESTED_WIDTH))
    assert (picture[y, req_x0 + figures.REQUESTED_WIDTH + 5] == grey).all()
    # detected: a thinner line, the inside tinted towards the colour (neither grey nor the colour)
    assert (picture[y, det_x0] == c).all()
    assert not (picture[y, det_x0 + figures.DETECTED_WIDTH] == c).all()
    inside = picture[y, det_x0 + 10]
    assert not (inside == grey).all() and not (inside == c).all()
    assert np.abs(inside - c).sum() < np.abs(np.array(grey) - c).sum()
    # a subject not detected (NaN) draws nothing but its request
    missed = np.asarray(figures.method_picture(Image.new("RGB", (64, 64), grey), record, [[np.nan] * 4]))
    assert (missed[y, det_x0 + 10] == grey).all()


def test_scores_under_a_cell_are_means_over_the_images_subjects(tmp_path):
    _, metrics = report_inputs(tmp_path, ["anyms"], combos=("c02",), seeds=(1,))
    assert figures.image_scores(metrics) == ["mIoU 53.3   detected 2/3", "DINO 51.0   CLIP-I 71.0"]


def test_the_report_draws_the_figures_and_names_them_in_report_json(tmp_path):
    from eval.evaluate import run_evaluation
    from eval.report import run_report

    from .test_evaluate import colour_cfg, write_synthetic_run

    boxes = {"dog": (0.125, 0.25, 0.5, 0.75), "cat": (0.5, 0.125, 0.875, 0.875)}
    write_synthetic_run(tmp_path, {s: [(p, b, b) for p, b in boxes.items()] for s in range(3)})
    run_evaluation(colour_cfg(tmp_path))
    summary = run_report([tmp_path], tmp_path / "report", {"samples": 5, "ap_samples": 1, "seed": 0},
                         figures={"pairs": ["c01:2"]})
    listed = json.loads((tmp_path / "report" / "report.json").read_text())["figures"]
    assert summary["figures"] == listed
    assert listed["comparison"] == {"file": "figures/comparison.png", "pairs": ["c01:2"], "methods": ["synthetic"]}
    assert "skipped" in listed["ablation"]
    for name in ("comparison.png", "combinations.png"):
        assert (tmp_path / "report" / "figures" / name).is_file()


def test_a_bad_pair_stops_the_report_before_it_writes_anything(tmp_path):
    from eval.evaluate import run_evaluation
    from eval.report import run_report

    from .test_evaluate import colour_cfg, write_synthetic_run

    boxes = {"dog": (0.125, 0.25, 0.5, 0.75), "cat": (0.5, 0.125, 0.875, 0.875)}
    write_synthetic_run(tmp_path, {s: [(p, b, b) for p, b in boxes.items()] for s in range(2)})
    run_evaluation(colour_cfg(tmp_path))
    out = tmp_path / "report"
    run_report([tmp_path], out, {"samples": 5, "ap_samples": 1, "seed": 0})
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(EvaluationError, match="figures.pairs: 'c09:0'"):
        run_report([tmp_path], out, {"samples": 7, "ap_samples": 1, "seed": 1}, figures={"pairs": ["c09:0"]})
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def attention_inputs():
    """An image, its record and attention maps of two subjects on one 4x4 grid (the format's arrays)."""
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]
    record = {"method": "anyms", "combination": "c01", "seed": 0, "prompt": "a dog and a cat",
              "subjects": [{"name": n, "phrase": n, "box": b} for n, b in zip(["dog", "cat"], boxes)]}
    heat = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    box = np.zeros((2, 4, 4), bool)
    box[0, :2, :2] = box[1, 2:, 2:] = True
    maps = {"grids": np.array([[4, 4]]), "image_4x4": heat, "text_4x4": heat[::-1], "box_4x4": box, "image": heat,
            "text": heat[::-1], "phrase_found": np.array([True, True]), "steps": np.array([0])}
    return Image.new("RGB", (64, 64), (90, 120, 150)), record, maps


def test_attention_figures_use_a_perceptual_colormap_and_carry_a_colorbar(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from eval import attention

    saved = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), save(fig, *a, **k))[1])
    image, record, maps = attention_inputs()
    attention.image_figure(image, record, maps, tmp_path / "one.png")
    attention.combination_figure([(image, record, maps), (image, {**record, "method": "wo_local"}, maps)],
                                 tmp_path / "methods.png")
    assert len(saved) == 2
    for fig in saved:
        overlays = [im.get_cmap().name for ax in fig.axes for im in ax.images  # maps: 2-D, not the grey photo
                    if im.get_array().ndim == 2 and im.get_cmap().name != "gray"]
        assert overlays and set(overlays) == {"inferno"}
        bars = [ax._colorbar for ax in fig.axes if hasattr(ax, "_colorbar")]
        assert len(bars) == 1 and bars[0].cmap.name == "inferno"
        assert (bars[0].vmin, bars[0].vmax) == (0, 1)
        assert "min-max normalized" in bars[0].ax.get_ylabel()
