"""Issue 18: the HTML report without a browser. Each subject's region as scored (stored as COCO RLE by evaluate,
cut again by the report exactly as the scorers saw it), one page per image, the worst-case lists' order, stale
pages removed, text escaped, sort values, several run folders, and every link of every page resolving."""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eval.grounding import mask_to_rle, rle_to_mask, subject_crop
from eval.html_report import html_table, prompt_box, write_html_report

from .synthetic_run import record


# --- a report written by hand: records, images and metrics rows chosen by the test ----------------------------

def hand_run(run_dir: Path, images: list[dict], qualify: bool = False) -> tuple[pd.DataFrame, list[tuple[dict, Path]]]:
    """Images (random pixels) and records via synthetic_run.record, and metrics rows with the values of ``images``:
    each ``{"method", "combination", "seed", "iou": [per subject], "detected": [...], "margin": [...],
    "prompt"?}``; every subject gets a region (a mask of its requested box's left half)."""
    rows, record_runs = [], []
    for spec in images:
        n = len(spec["iou"])
        rec = record(run_dir, spec["method"], spec["combination"], spec["seed"], n_subjects=n,
                     image_seed=zlib.crc32(f"{run_dir.name}/{spec['method']}/{spec['combination']}/{spec['seed']}".encode()))
        if "prompt" in spec:
            rec["prompt"] = spec["prompt"]
        record_runs.append((rec, run_dir))
        for i, s in enumerate(rec["subjects"]):
            mask = np.zeros((rec["height"], rec["width"]), dtype=bool)
            x0, y0, x1, y1 = (int(v * 64) for v in s["box"])
            mask[y0:y1, x0:(x0 + x1) // 2] = True
            rows.append({
                "image": str(run_dir / rec["image"]) if qualify else rec["image"], "combination": rec["combination"],
                "method": rec["method"], "seed": rec["seed"], "n_subjects": n, "subject": s["name"], "phrase": s["phrase"],
                "role": s["role"], "width": 64, "height": 64, **dict(zip(("req_x0", "req_y0", "req_x1", "req_y1"), s["box"])),
                "detected": spec["detected"][i], "in_layout": True, "iou": spec["iou"][i],
                "det_score": 0.9 if spec["detected"][i] else 0.0,
                **dict(zip(("det_x0", "det_y0", "det_x1", "det_y1"), s["box"] if spec["detected"][i] else [float("nan")] * 4)),
                "clip_i": 50.0, "id_margin": spec["margin"][i], "id_swapped": spec["margin"][i] < 0,
                "region_source": "detection" if spec["detected"][i] else "requested_box", "region_rle": mask_to_rle(mask),
                "image_sha256": rec["image_sha256"]})
    return pd.DataFrame(rows), record_runs


def table1(metrics: pd.DataFrame):
    means = metrics.groupby("method", as_index=False)["iou"].mean()
    shown = pd.DataFrame({"Method": means["method"], "mIoU": [f"{v:.1f} ± 0.5" for v in means["iou"]]})
    return html_table("table1", "Table 1", shown, {"mIoU": means["iou"]})


IMAGES = [
    {"method": "anyms", "combination": "c01", "seed": 0, "iou": [60.0, 41.0], "detected": [True, True], "margin": [3.0, 1.0]},
    {"method": "anyms", "combination": "c01", "seed": 1, "iou": [10.0, 10.0], "detected": [True, False], "margin": [-5.0, float("nan")],
     "prompt": "a dog </p><script>alert('x')</script> & a cat"},
    {"method": "text_only", "combination": "c01", "seed": 0, "iou": [30.0, 30.0], "detected": [True, True], "margin": [-1.0, 2.0]},
]


def write(out: Path, metrics: pd.DataFrame, record_runs) -> Path:
    return write_html_report(out, [table1(metrics)], metrics, pd.DataFrame(), record_runs, ["Generation models: hand."], tiny=True)


def links(html: str, section: str | None = None) -> list[str]:
    """The distinct page links of ``html`` (or of its element ``id=section``), in order."""
    if section:
        html = html[html.index(f'id="{section}"'):]
        html = html[: html.index("</table>")]
    return list(dict.fromkeys(re.findall(r'href="([^"#]+\.html)"', html)))


def test_a_page_per_image_worst_lists_in_order_and_text_escaped(tmp_path):
    run = tmp_path / "run"
    metrics, record_runs = hand_run(run, IMAGES)
    index = write(run / "report", metrics, record_runs)
    out = run / "report"
    assert index == (out / "index.html").resolve()
    for rec, _ in record_runs:
        assert (out / "images" / rec["method"] / rec["combination"] / f"{rec['seed']}.html").is_file()
    assert {p.name for p in (out / "methods").iterdir()} == {"anyms.html", "text_only.html"}
    html = index.read_text()
    assert "TINY RANDOM MODELS" in html and "Generation models: hand." in html
    # lowest mIoU first: anyms seed 1 (10), text_only (30), anyms seed 0 (50.5)
    assert links(html, "worst-lowest_miou") == ["images/anyms/c01/1.html", "images/text_only/c01/0.html",
                                               "images/anyms/c01/0.html"]
    assert links(html, "worst-missed") == ["images/anyms/c01/1.html"]
    # identity swaps, the largest margin first: -5 (anyms seed 1) before -1 (text_only)
    assert links(html, "worst-swaps") == ["images/anyms/c01/1.html", "images/text_only/c01/0.html"]
    # the sort value is the mean, not the "± x" text
    assert re.search(r'<td class="num" data-value="30\.25">30\.2 ± 0\.5</td>', html)  # anyms: (60 + 41 + 10 + 10) / 4
    page = (out / "images/anyms/c01/1.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; a cat" in page
    assert page.count('class="box requested"') == 2 and page.count('class="box detected"') == 1
    assert "missed: SAM mask prompted by its requested box" in page
    assert links(page, None)[:2] == ["../../../index.html", "../../../methods/anyms.html"]
    assert 'id="prev"' in page and 'id="next"' not in page  # the method's last image


def test_pages_and_regions_of_images_gone_are_removed_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    metrics, record_runs = hand_run(run, IMAGES)
    out = run / "report"
    write(out, metrics, record_runs)
    regions = sorted((out / "regions").rglob("*.png"))
    assert len(regions) == 3 * (2 + 1)  # a crop per subject and a mask overlay per image
    foreign = out / "images" / "notes.png"  # not the report's: stays
    foreign.write_bytes(b"x")
    gone = "images/text_only/c01/0.png"
    write(out, metrics[metrics["image"] != gone].reset_index(drop=True), [rr for rr in record_runs if rr[0]["image"] != gone])
    assert not (out / "images/text_only").exists() and not (out / "methods/text_only.html").exists()
    assert not (out / "regions/text_only").exists()
    assert (out / "images/anyms/c01/0.html").is_file() and foreign.is_file()
    assert sorted((out / "regions").rglob("*.png")) == [p for p in regions if "text_only" not in str(p)]
    assert "text_only" not in (out / "index.html").read_text().split('id="tables"')[1]  # no link, no row
    # an old report's regions without RLE (evaluated before regions were kept): the page says so
    old = metrics.drop(columns=["region_rle", "region_source"])
    write(out, old, record_runs)
    assert not (out / "regions").exists()
    assert "re-run evaluate to see regions" in (out / "images/anyms/c01/0.html").read_text()
    # a subject evaluate scored no crop for (missed_subject=zero or exclude): the page says why
    write(out, metrics.assign(region_rle=None, region_source="none"), record_runs)
    assert "no identity crop was scored" in (out / "images/anyms/c01/0.html").read_text()


def test_two_run_folders_with_the_same_images_get_a_page_each(tmp_path):
    spec = [IMAGES[0]]
    parts = [hand_run(tmp_path / name, spec, qualify=True) for name in ("a", "b")]
    metrics = pd.concat([m for m, _ in parts], ignore_index=True)
    record_runs = [rr for _, rrs in parts for rr in rrs]
    out = tmp_path / "report"
    write(out, metrics, record_runs)
    pages = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.html"))
    assert pages == ["images/anyms/c01/0-a.html", "images/anyms/c01/0-b.html"]
    for page, run in zip(pages, ("a", "b")):
        src = re.search(r'<img class="main" src="([^"]+)"', (out / page).read_text()).group(1)
        assert ((out / page).parent / unquote(src)).resolve() == (tmp_path / run / "images/anyms/c01/0.png").resolve()


# --- the region as scored, with the tiny evaluators -----------------------------------------------------------

def test_stored_region_is_the_sam_mask_and_the_crop_the_scorers_saw(tmp_path, tiny_eval_root, monkeypatch):
    import eval.evaluate as evaluate
    from eval.evaluate import ReferenceCache, load_evaluators, score_image

    from .test_evaluate import eval_cfg

    cfg = eval_cfg(tmp_path, tiny_root=tiny_eval_root)
    metrics = list(cfg.eval.metrics)
    detector, segmenter, scorers = load_evaluators(cfg.eval, metrics)
    returned, crops = [], []

    class Spy:  # what SAM returned, per call
        def segment(self, image, boxes):
            masks = segmenter.segment(image, boxes)
            returned.append(masks)
            return masks

    def spied_crop(*args, **kwargs):  # the crops the identity scorers are given
        crop = subject_crop(*args, **kwargs)
        crops.append(crop)
        return crop

    monkeypatch.setattr(evaluate, "subject_crop", spied_crop)
    refs = ReferenceCache(detector, Spy(), scorers, metrics, float(cfg.eval.box_threshold), float(cfg.eval.text_threshold))
    rec = record(tmp_path, "anyms", "c02", 0, n_subjects=3)
    image = Image.open(tmp_path / rec["image"]).convert("RGB")
    for r in rec["subjects"]:  # the references' crops first (cached), so what follows is the image's own
        refs.embeddings(r["references"], r["phrase"])
    returned.clear()
    crops.clear()
    rows, _ = score_image(rec, image, detector, Spy(), scorers, refs, cfg.eval, metrics)
    assert len(returned) == 1 and len(returned[0]) == 3 == len(crops)  # box_crop: every subject segmented once
    for row, mask, crop in zip(rows, returned[0], crops):
        assert row["region_source"] == ("detection" if row["detected"] else "requested_box")
        stored = rle_to_mask(row["region_rle"])
        assert stored.dtype == bool and np.array_equal(stored, mask)
        again = subject_crop(image, stored, prompt_box(row))
        assert again.size == crop.size and np.array_equal(np.asarray(again), np.asarray(crop))
    assert all(json.loads(r["region_rle"])["size"] == [64, 64] for r in rows)


def test_report_region_pngs_equal_subject_crop_of_the_stored_mask(reported_run):
    from eval.evaluate import read_table

    metrics = read_table(reported_run / "metrics.parquet")
    assert metrics["region_rle"].map(lambda v: isinstance(v, str)).all()
    assert set(metrics["region_source"]) <= {"detection", "requested_box"}
    records = {r["image"]: r for r in __import__("runfolder").read_records(reported_run)}
    out = reported_run / "report"
    checked = 0
    for image_name, rows in metrics.groupby("image"):
        rec = records[image_name]
        page = out / "images" / rec["method"] / rec["combination"] / f"{rec['seed']}.html"
        srcs = re.findall(r'<img class="region-crop" src="([^"]+)"', page.read_text())
        by_name = rows.set_index("subject")
        assert len(srcs) == len(rec["subjects"])
        image = Image.open(reported_run / image_name).convert("RGB")
        for s, src in zip(rec["subjects"], srcs):
            row = by_name.loc[s["name"]].to_dict()
            expected = subject_crop(image, rle_to_mask(row["region_rle"]), prompt_box(row))
            written = Image.open(page.parent / unquote(src))
            assert written.mode == "RGB" and np.array_equal(np.asarray(written), np.asarray(expected))
            checked += 1
    assert checked == len(metrics)


def test_run_report_names_the_index_and_every_link_of_every_page_resolves(reported_run, tmp_path):
    out = reported_run / "report"
    summary = json.loads((out / "report.json").read_text())
    assert summary["index"] == "index.html" and "index.html" in summary["files"]
    records = __import__("runfolder").read_records(reported_run)
    pages = sorted((out / "images").rglob("*.html"))
    assert len(pages) == len(records) == 8
    for page in [out / "index.html", *sorted((out / "methods").glob("*.html")), *pages]:
        html = page.read_text()
        for target in re.findall(r'(?:src|href)="([^"#]+)"', html):
            assert (page.parent / unquote(target)).exists(), f"{page.relative_to(out)}: {target}"
    # re-running the report on a copy rewrites the same pages and regions, and draws no region again
    copy = tmp_path / "run"
    shutil.copytree(reported_run, copy)
    before = {p: p.stat().st_mtime_ns for p in (copy / "report/regions").rglob("*.png")}
    from eval.report import run_report

    run_report([copy], copy / "report", {"samples": 5, "ap_samples": 2, "seed": 0})
    assert {p: p.stat().st_mtime_ns for p in (copy / "report/regions").rglob("*.png")} == before
    assert len(list((copy / "report/images").rglob("*.html"))) == 8


@pytest.mark.parametrize("value, expected", [(1.5, "1.5"), (float("nan"), ""), (None, ""), (3, "3"), (True, "1"), ("x", "x")])
def test_sort_value(value, expected):
    from eval.html_report import sort_value

    assert sort_value(value) == expected


def test_an_image_page_shows_its_attention_figures_or_says_why_not(tmp_path):
    run = tmp_path / "run"
    metrics, record_runs = hand_run(run, IMAGES)
    out = run / "report"
    for name in ("c01-seed0-anyms.png", "c01-seed0-methods.png"):  # as eval.attention names them
        (out / "attention").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (30, 20), "white").save(out / "attention" / name)
    record_runs[1][0]["attention_maps"] = "attention_maps/anyms/c01/1.npz"  # recorded, no figure drawn
    write(out, metrics, record_runs)
    page = (out / "images/anyms/c01/0.html").read_text()
    assert 'src="../../../attention/c01-seed0-anyms.png"' in page and 'src="../../../attention/c01-seed0-methods.png"' in page
    assert "the report drew no figure of this image" in (out / "images/anyms/c01/1.html").read_text()
    index = (out / "index.html").read_text()
    assert index.index("attention/c01-seed0-methods.png") < index.index("attention/c01-seed0-anyms.png")
    del record_runs[1][0]["attention_maps"]
    write(out, metrics, record_runs)
    assert "No attention maps were recorded for this image" in (out / "images/anyms/c01/1.html").read_text()
