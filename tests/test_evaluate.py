"""The evaluation and report stages: geometry with a known-answer detector, the whole stage on a tiny
generated run, resuming, and bad inputs."""

import re

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

import runfolder
from eval.evaluate import EvaluationError, run_evaluation
from eval.report import run_report

from .conftest import REPO, data_root, quiet_wandb

CONF = REPO / "conf"
COLOURS = {"dog": (255, 0, 0), "cat": (0, 0, 255)}
DATA = data_root()


def eval_cfg(run_dir, *overrides, tiny_root=None, protocol="tiny"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"run_dir={run_dir}", f"eval={protocol}", "progress=false", *quiet_wandb(overrides),
                                              *overrides])
    if tiny_root is not None:
        cfg.eval.tiny_root = str(tiny_root)
    return cfg


def colour_cfg(run_dir):
    cfg = eval_cfg(run_dir, "eval.metrics=[miou,miou_best,ap50]", "eval.prepare=null")
    cfg.eval.detector = OmegaConf.create({"_target_": "tests.colour_detector.ColourDetector", "colours": COLOURS})
    return cfg


def write_synthetic_run(run_dir, shapes, size=(96, 64), references=None):
    """One image per entry of ``shapes``: {seed: [(phrase, requested box, drawn box or None)]}."""
    w, h = size
    refs = references or [str(REPO / "README.md")]
    for seed, items in shapes.items():
        image = Image.new("RGB", size, (200, 200, 200))
        draw = ImageDraw.Draw(image)
        for phrase, _, drawn in items:
            if drawn is not None:
                x0, y0, x1, y1 = drawn
                draw.rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], fill=COLOURS[phrase])
        rel = runfolder.image_path("synthetic", "c01", seed)
        runfolder.save_png(image, run_dir / rel)
        runfolder.append_record(runfolder.records_file(run_dir, "synthetic", (0, 1)), {
            "image": rel, "combination": "c01", "method": "synthetic", "seed": seed, "prompt": "a dog and a cat",
            "n_subjects": len(items), "width": w, "height": h,
            "subjects": [{"name": f"{p}{i}", "phrase": p, "role": "object", "box": list(b), "references": refs}
                         for i, (p, b, _) in enumerate(items)],
            "model": {"name": "synthetic"}, "config_hash": f"h{seed}", "versions": {}, "git_hash": "none",
            "device": "cpu", "dtype": "none", "seconds": None, "peak_memory_bytes": None, "created": 1.0,
        })


def test_shapes_drawn_at_the_requested_boxes_give_miou_100_and_ap50_100(tmp_path):
    boxes = {"dog": (0.125, 0.25, 0.5, 0.75), "cat": (0.5, 0.125, 0.875, 0.875)}
    write_synthetic_run(tmp_path, {s: [(p, b, b) for p, b in boxes.items()] for s in range(3)})
    run_evaluation(colour_cfg(tmp_path))
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert len(m) == 6 and m["detected"].all()
    assert np.allclose(m["iou"], 100) and np.allclose(m["iou_best"], 100)
    summary = run_report([tmp_path], tmp_path / "report", {"samples": 50, "ap_samples": 5, "seed": 0})
    table1 = pd.read_csv(tmp_path / "report" / "table1.csv")
    assert table1.loc[0, "ap50"] == pytest.approx(100.0) and table1.loc[0, "iou"] == pytest.approx(100.0)
    assert "fig4.png" in summary["files"]


def test_shifted_shapes_give_the_iou_computed_by_hand(tmp_path):
    # dog drawn shifted right by half its width: IoU = (0.5 * A) / (1.5 * A) = 1/3; cat missing: 0
    dog = (0.125, 0.25, 0.5, 0.75)
    shifted = (0.3125, 0.25, 0.6875, 0.75)
    write_synthetic_run(tmp_path, {0: [("dog", dog, shifted), ("cat", (0.5, 0.1, 0.9, 0.9), None)]})
    run_evaluation(colour_cfg(tmp_path))
    m = pd.read_parquet(tmp_path / "metrics.parquet").set_index("phrase")
    assert m.loc["dog", "iou"] == pytest.approx(100 / 3, abs=1e-6)
    assert m.loc["cat", "iou"] == 0 and not m.loc["cat", "detected"]
    # AP: the one detection (score 1) is a false positive at IoU 0.5 for dog, cat has no detection -> 0
    run_report([tmp_path], tmp_path / "report", {"samples": 10, "ap_samples": 2, "seed": 0})
    assert pd.read_csv(tmp_path / "report" / "table1.csv").loc[0, "ap50"] == pytest.approx(0.0)


def test_two_dogs_and_one_detection_separate_best_and_hungarian(tmp_path):
    left, right = (0.0, 0.25, 0.5, 0.75), (0.5, 0.25, 1.0, 0.75)
    middle = (0.25, 0.25, 0.75, 0.75)  # overlaps both requested dogs by a third
    write_synthetic_run(tmp_path, {0: [("dog", left, middle), ("dog", right, None)]})
    run_evaluation(colour_cfg(tmp_path))
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert np.allclose(m["iou_best"], 100 / 3)  # both boxes claim the one detection
    assert sorted(np.round(m["iou"], 6)) == [0.0, round(100 / 3, 6)]  # one-to-one: one dog is missed


def test_bad_inputs_are_named_and_nothing_written_is_lost(tmp_path):
    boxes = {"dog": (0.125, 0.25, 0.5, 0.75)}
    write_synthetic_run(tmp_path, {s: [(p, b, b) for p, b in boxes.items()] for s in range(2)})
    run_evaluation(colour_cfg(tmp_path))
    before = (tmp_path / "metrics.parquet").read_bytes()

    with pytest.raises(EvaluationError, match=r"eval.metrics: unknown metric\(s\) \['fid'\]"):
        cfg = colour_cfg(tmp_path)
        cfg.eval.metrics = ["miou", "fid"]
        run_evaluation(cfg)

    write_synthetic_run(tmp_path, {2: [("dog", boxes["dog"], boxes["dog"])]})
    (tmp_path / "images/synthetic/c01/2.png").write_bytes(b"not a png")
    with pytest.raises(EvaluationError, match=r"images/synthetic/c01/2.png: not a readable image"):
        run_evaluation(colour_cfg(tmp_path))
    (tmp_path / "images/synthetic/c01/2.png").unlink()
    with pytest.raises(EvaluationError, match=r"images/synthetic/c01/2.png: image named by its record is missing"):
        run_evaluation(colour_cfg(tmp_path))

    bad = tmp_path / "records" / "synthetic.0-of-1.jsonl"
    lines = bad.read_text().splitlines()
    record = __import__("json").loads(lines[0])
    del record["subjects"][0]["box"]
    bad.write_text("\n".join([__import__("json").dumps(record)] + lines[1:]) + "\n")
    with pytest.raises(runfolder.RunFolderError, match=r"synthetic.0-of-1.jsonl:1: field subjects.0: 'box' is a required property"):
        run_evaluation(colour_cfg(tmp_path))
    assert (tmp_path / "metrics.parquet").read_bytes() == before


def test_report_refuses_runs_evaluated_differently(tmp_path):
    boxes = {"dog": (0.125, 0.25, 0.5, 0.75)}
    for name, threshold in (("a", 0.35), ("b", 0.3)):
        write_synthetic_run(tmp_path / name, {0: [("dog", boxes["dog"], boxes["dog"])]})
        cfg = colour_cfg(tmp_path / name)
        cfg.eval.box_threshold = threshold
        run_evaluation(cfg)
    with pytest.raises(EvaluationError, match=r"evaluated with another config.*eval.box_threshold \(0.35 vs 0.3\)"):
        run_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report", {"samples": 5, "ap_samples": 1, "seed": 0})


@pytest.mark.skipif(DATA is None, reason="needs the DreamBench images")
def test_the_whole_stage_on_a_tiny_generated_run(tmp_path, tiny_root, tiny_eval_root):
    from anyms.generation.generate import run_generation

    from .test_generate import make_cfg

    tiny_gen, tiny_eval = tiny_root, tiny_eval_root
    run = tmp_path / "run"
    for method in ("anyms", "wo_local"):
        run_generation(make_cfg(run, f"method={method}", "benchmark=smoke", "benchmark.only=[c02,c05]",
                                "benchmark.seeds=[0]", f"wandb={'offline' if method == 'anyms' else 'disabled'}",
                                tiny_root=tiny_gen))
    first = run_evaluation(eval_cfg(run, tiny_root=tiny_eval))
    assert len(first.scored) == 4
    m = pd.read_parquet(run / "metrics.parquet")
    assert len(m) == 2 * (2 + 3)  # methods x subjects of c02 and c05
    metric_columns = ["iou", "iou_best", "clip_i", "dino", "dreamsim", "clip_t", "m_dino"]
    assert not m[metric_columns].isna().any().any()
    # resuming: a new image is the only one scored, old rows kept as they were
    run_generation(make_cfg(run, "benchmark=smoke", "benchmark.only=[c02,c05]", "benchmark.seeds=[0,1]",
                            tiny_root=tiny_gen))
    second = run_evaluation(eval_cfg(run, tiny_root=tiny_eval))
    assert sorted(second.scored) == ["images/anyms/c02/1.png", "images/anyms/c05/1.png"]
    m2 = pd.read_parquet(run / "metrics.parquet")
    assert len(m2) == len(m) + 5
    pd.testing.assert_frame_equal(m2[m2["seed"] == 0].reset_index(drop=True), m.reset_index(drop=True),
                                  check_like=True)
    summary = run_report([run], run / "report", {"samples": 20, "ap_samples": 2, "seed": 0},
                         {"enabled": True, "mode": "offline", "project": "anyms-bench-test"})
    assert summary["tiny"]
    for name in ("table1.md", "table1.csv", "table1.tex", "table2.md", "table2.csv", "table2.tex", "fig4.png", "overlap.md"):
        assert (run / "report" / name).exists(), name
    table1 = (run / "report" / "table1.md").read_text()
    assert "TINY RANDOM MODELS" in table1 and re.search(r"\| anyms +\|", table1) and re.search(r"\| wo_local +\|", table1)
    # issue 15: the protocol named in the header, omissions and identity swaps beside identity, the paper's rows
    assert "Protocol: DINO backbone DINOv2" in table1 and "identity region anywhere" in table1
    assert "missed subjects box_crop" in table1 and "AP ranked by phrase score" in table1
    assert "Detected %" in table1 and "Identity swap %" in table1 and "Identity margin" in table1
    assert "| AnyMS (published) |" in table1
    assert "| w/o crop and merge (published) |" in (run / "report" / "table2.md").read_text()
    assert "AnyMS" not in list(pd.read_csv(run / "report" / "table1.csv")["method"])  # never in our numbers
    table2 = pd.read_csv(run / "report" / "table2.csv")
    assert sorted(table2["method"]) == ["anyms", "wo_local"]  # c05 has 3 subjects
    # one offline W&B run per stage, all in the run folder
    runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # generate (anyms) and report; evaluate ran with wandb disabled


@pytest.mark.skipif(DATA is None, reason="needs the DreamBench images")
def test_images_made_elsewhere_become_a_run_folder_the_evaluator_scores(tmp_path):
    from anyms.generation.importer import import_images

    from .test_generate import make_cfg

    source = tmp_path / "mudi_outputs"
    for combo, seed in (("c01", 0), ("c01", 1), ("c02", 0)):
        (source / combo).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (80, 48), (10 * seed, 100, 50)).save(source / combo / f"{seed}.jpg")
    bench = make_cfg(tmp_path, "benchmark=anyms11", "benchmark.only=[c01,c02]", "benchmark.seeds=[0,1]").benchmark
    summary = import_images(source, "mudi", bench, DATA, tmp_path / "run")
    assert sorted(summary.imported) == ["images/mudi/c01/0.png", "images/mudi/c01/1.png", "images/mudi/c02/0.png"]
    assert summary.missing == ["c02/1"]
    records = runfolder.read_records(tmp_path / "run")
    assert records[0]["model"]["name"] == "external:mudi" and records[0]["seconds"] is None
    assert records[0]["subjects"][0]["references"][0].endswith(".jpg")
    cfg = colour_cfg(tmp_path / "run")
    run_evaluation(cfg)
    assert len(pd.read_parquet(tmp_path / "run" / "metrics.parquet")) == 2 + 2 + 2
