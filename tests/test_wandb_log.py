"""W&B runs that can be compared (issue 18): real offline runs of the evaluate and report scripts on a synthetic
run folder (tiny evaluators), read back from what W&B wrote (tests/wandb_offline.py)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import runfolder

from .conftest import REPO
from .synthetic_run import run_evaluate, write_run
from .wandb_offline import runs_of

METHODS = ("anyms", "gligen", "text_only")
COMBINATIONS = ("c01", "c02")  # c02: three subjects
SEEDS = (0, 1)


def report_command(run_dir, *overrides):
    return [sys.executable, str(REPO / "scripts" / "report.py"), f"run_dir={run_dir}", "bootstrap.samples=50",
            "bootstrap.ap_samples=5", *overrides]


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_eval_root):
    """A run folder of 3 methods x 2 combinations x 2 seeds, evaluated and reported with W&B offline (the
    defaults: silent, per-image table), and what both scripts printed."""
    run = tmp_path_factory.mktemp("wandb") / "bench-synthetic"
    for method in METHODS:
        write_run(run, method=method, combinations=COMBINATIONS, seeds=SEEDS)
    evaluated = run_evaluate(run, tiny_eval_root, "wandb=offline")
    # 2 samples for 3 methods: the samples still take every method
    reported = subprocess.run(report_command(run, "wandb.sample_images=2"), capture_output=True, text=True,
                              cwd=REPO, timeout=600)
    assert reported.returncode == 0, reported.stderr[-3000:]
    runs = runs_of(run)
    assert sorted(runs) == ["evaluate", "report"] and all(len(r) == 1 for r in runs.values()), runs
    return {"run": run, "evaluate": runs["evaluate"][0], "report": runs["report"][0],
            "output": {"evaluate": evaluated.stdout + evaluated.stderr, "report": reported.stdout + reported.stderr}}


def test_report_summary_holds_table1_per_method(logged):
    table1 = pd.read_csv(logged["run"] / "report" / "table1.csv")
    summary = logged["report"].summary
    expected = {}
    for row in table1.to_dict("records"):
        for column, value in row.items():
            if column != "method" and isinstance(value, (int, float)) and np.isfinite(value):
                expected[f"table1/{row['method']}/{column}"] = value
    assert any(k.endswith("/iou_lo") for k in expected) and any(k.endswith("/n_images") for k in expected)
    got = {k: v for k, v in summary.items() if k.startswith("table1/") and k.count("/") == 2}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_image_table_has_a_row_per_image_with_requested_and_detected_boxes(logged):
    table = logged["report"].table("images")
    columns, rows = table["json"]["columns"], table["json"]["data"]
    metrics = pd.read_parquet(logged["run"] / "metrics.parquet")
    assert len(rows) == len(METHODS) * len(COMBINATIONS) * len(SEEDS) == metrics["image"].nunique()
    assert {"method", "combination", "seed", "image", "detected", "iou", "clip_i", "dino", "clip_t"} <= set(columns)
    col = {c: i for i, c in enumerate(columns)}
    assert sorted({r[col["method"]] for r in rows}) == list(METHODS)
    for row in rows:
        subjects = metrics[(metrics["method"] == row[col["method"]]) & (metrics["combination"] == row[col["combination"]])
                           & (metrics["seed"] == row[col["seed"]])]
        image = row[col["image"]]
        assert image["_type"] == "image-file" and image["path"] in table["files"]
        assert image["format"] == "jpg"  # a thumbnail (table_image_side), not a copy of the PNG
        requested, detected = image["boxes"]["requested"], image["boxes"]["detected"]
        assert len(requested) == len(subjects) and len(detected) == int(subjects["detected"].sum())
        assert row[col["detected"]] == f"{int(subjects['detected'].sum())}/{len(subjects)}"
        assert sorted(b["position"]["minX"] for b in requested) == pytest.approx(sorted(subjects["req_x0"]))
        classes = read_classes(table["files"][image["classes"]["path"]])
        assert sorted(classes[b["class_id"]] for b in requested) == sorted(subjects["phrase"])
        assert row[col["iou"]] == pytest.approx(subjects["iou"].mean())  # the image's mean over its subjects
        assert row[col["clip_i"]] == pytest.approx(subjects["clip_i"].mean())


def read_classes(path) -> dict:
    return {c["id"]: c["name"] for c in json.loads(Path(path).read_text())["class_set"]}


def test_samples_take_every_method_even_when_fewer_are_asked_for(logged):
    table = logged["report"].table("samples")["json"]
    col = {c: i for i, c in enumerate(table["columns"])}
    methods = [r[col["method"]] for r in table["data"]]
    assert sorted(methods) == list(METHODS)
    assert {r[col["combination"]] for r in table["data"]} == set(COMBINATIONS)


def test_evaluate_summary_holds_metric_means_only(logged):
    summary = {k: v for k, v in logged["evaluate"].summary.items()
               if not k.startswith("_") and not k.startswith("metrics/")}  # metrics/: the logged table's reference
    assert summary and all(k.startswith("subject_mean/") for k in summary), sorted(summary)
    from eval.evaluate import METRIC_COLUMNS

    assert {k.split("/")[2] for k in summary} <= set(METRIC_COLUMNS)
    assert not [k for k in summary if k.split("/")[2] in ("seed", "width", "height", "req_x0", "det_x0", "n_subjects")]
    metrics = pd.read_parquet(logged["run"] / "metrics.parquet")
    for method in METHODS:
        m = metrics[metrics["method"] == method]
        assert summary[f"subject_mean/{method}/iou"] == pytest.approx(m["iou"].mean())
        assert summary[f"subject_mean/{method}/detected"] == pytest.approx(m["detected"].astype(float).mean())


def test_runs_are_named_and_tagged_by_stage_benchmark_model_and_methods(logged):
    evaluate, report = logged["evaluate"], logged["report"]
    assert evaluate.name == "evaluate-bench-synthetic" and report.name == "report-bench-synthetic"
    # the synthetic records name no benchmark: their combination ids (c01, c02) are anyms11's
    for run, stage in ((evaluate, "evaluate"), (report, "report")):
        assert run.tags == [stage, "anyms11", "synthetic", *METHODS] and run.group == "bench-synthetic"


def test_generate_run_is_named_for_its_method_and_logs_sheets_of_any_size_quietly(tmp_path, caplog):
    from anyms.generation.generate import GenerationSummary, log_to_wandb

    from .test_generate import make_cfg

    run = tmp_path / "gen-run"
    records = write_run(run, method="anyms", combinations=("c01",), seeds=(0,))
    sheets = []
    for combination, size in (("c01", (64, 32)), ("c02", (96, 32))):  # sheets differ in size: W&B warned for a list
        sheets.append(runfolder.save_png(Image.new("RGB", size), run / "images" / "anyms" / combination / "sheet.png"))
    summary = GenerationSummary(run, "anyms", planned=1, generated=[records[0]["image"]])
    with caplog.at_level(logging.WARNING):
        log_to_wandb(make_cfg(run, "wandb=offline", "method=anyms", "benchmark=smoke", "model=tiny"), run, "anyms",
                     summary, sheets)
    assert not [r for r in caplog.records if "sizes do not match" in r.getMessage()]
    (generated,) = runs_of(run)["generate"]
    assert generated.name == "generate-gen-run-anyms" and generated.tags == ["generate", "smoke", "tiny", "anyms"]
    assert len(generated.table("contact_sheets")["json"]["data"]) == 2
    assert generated.config["hardware"] == runfolder.hardware("cpu")  # what the model ran on (no GPU here)
    # the tables' staged files (W&B keeps them until `wandb sync`) are in the run folder, not in the home folder
    assert all(str(run / "wandb") in p for p in generated.artifact_files[next(iter(generated.artifact_files))].values())


def test_wandb_prints_nothing_when_silent_and_its_lines_when_asked(logged, tmp_path):
    for stage, output in logged["output"].items():
        assert "wandb:" not in output, (stage, output[-2000:])
    run = tmp_path / "loud"
    shutil.copytree(logged["run"], run)
    loud = subprocess.run(report_command(run, "wandb.silent=false", "wandb.image_table=false"), capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert loud.returncode == 0 and "wandb:" in loud.stdout + loud.stderr
    report = runs_of(run)["report"][-1]
    assert "images" not in {k.split("/")[0] for k in report.summary}  # image_table=false: no per-image table


def test_spread_sample_takes_every_method_and_spreads_combinations_reproducibly():
    from eval.wandb_log import spread_sample

    images = pd.DataFrame([{"method": m, "combination": f"c{c:02d}", "seed": s}
                           for m in ("a", "b", "c") for c in range(1, 12) for s in range(2)])
    first = spread_sample(images, 9, seed=0)
    assert first.equals(spread_sample(images, 9, seed=0))  # the same seed, the same images
    assert sorted(first["method"].value_counts().to_dict().items()) == [("a", 3), ("b", 3), ("c", 3)]
    assert first["combination"].nunique() == 9  # 9 images, 11 combinations: no combination twice
    assert sorted(spread_sample(images, 1, seed=0)["method"]) == ["a", "b", "c"]  # every method whatever n
    assert not spread_sample(images, 9, seed=1).equals(first)
    assert len(spread_sample(images, 1000, seed=0)) == len(images)
    # a method without some combinations still takes its share from those it has
    partial = images[(images["method"] != "c") | (images["combination"] == "c01")]
    sample = spread_sample(partial, 6, seed=0)
    assert sample["method"].value_counts().to_dict() == {"a": 2, "b": 2, "c": 2}


def test_table_thumbnails_shrink_large_images_and_never_enlarge(tmp_path):
    from PIL import Image

    from eval.wandb_log import table_thumbnail

    Image.new("RGB", (1024, 768), "red").save(tmp_path / "big.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "small.png")
    assert table_thumbnail(tmp_path / "big.png", 384).size == (384, 288)
    assert table_thumbnail(tmp_path / "small.png", 384).size == (64, 64)
