"""Issue 5: sweeps as Hydra experiments, shards through submitit's local launcher, paired comparisons,
and `make benchmark` end to end."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from eval.report import combination_mean_bootstrap, paired_comparison

from .conftest import REPO, data_root

DATA = data_root()
needs_data = pytest.mark.skipif(DATA is None, reason="needs the DreamBench images")


def generate(*args, cwd, timeout=900):
    cmd = [sys.executable, str(REPO / "scripts/generate.py"), *args, f"data_root={DATA}", "wandb=disabled",
           "progress=false"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def metrics_frame(pairs):
    rows = []
    for combo, seed, method, value in pairs:
        rows.append({"image": f"images/{method}/{combo}/{seed}.png", "method": method, "combination": combo,
                     "seed": seed, "n_subjects": 2, "iou": value})
    return pd.DataFrame(rows)


def test_combination_mean_is_the_mean_of_per_combination_means():
    df = pd.DataFrame({"combination": ["a"] * 4 + ["b"], "v": [0, 0, 0, 4, 10]})
    est = combination_mean_bootstrap(df, "v", samples=500, seed=0)
    assert est.mean == pytest.approx((1 + 10) / 2)  # not the image mean 2.8
    assert est.lo <= est.mean <= est.hi and est.n == 5


def test_paired_comparison_finds_a_constant_shift_and_no_shift():
    rng = np.random.default_rng(0)
    base = [(c, s, rng.normal(50, 10)) for c in ("c01", "c02") for s in range(20)]
    shifted = metrics_frame([(c, s, "anyms", v) for c, s, v in base] + [(c, s, "other", v + 5) for c, s, v in base])
    row = paired_comparison(shifted, "anyms", "other", "iou", samples=500, seed=0)
    assert row["difference"] == pytest.approx(5) and row["lo"] == pytest.approx(5) and row["hi"] == pytest.approx(5)
    # two combinations are two units: the exact sign-flip test cannot go below 2 x 1/4 (issue 16)
    assert row["p_value"] == pytest.approx(0.5) and row["pairs"] == 40
    row = paired_comparison(shifted, "anyms", "other", "iou", samples=500, seed=0, resample="within_combinations")
    assert row["p_extreme"] == 0 and row["p_value"] == pytest.approx(2 / 501)  # 40 pairs: below 1/B, never 0
    noise = metrics_frame([(c, s, "anyms", v) for c, s, v in base]
                          + [(c, s, "other", v + rng.normal(0, 1) * (1 if s % 2 else -1)) for c, s, v in base])
    row = paired_comparison(noise, "anyms", "other", "iou", samples=500, seed=0, resample="within_combinations")
    assert row["lo"] < 0 < row["hi"] and row["p_value"] > 0.05
    # only (combination, seed) pairs both methods made count
    partial = metrics_frame([("c01", 0, "anyms", 1.0), ("c01", 1, "anyms", 2.0), ("c01", 1, "other", 5.0)])
    assert paired_comparison(partial, "anyms", "other", "iou", 10, 0)["pairs"] == 1


@needs_data
def test_two_experiments_sweep_with_multirun(tmp_path, tiny_root):
    common = ["model=tiny", f"model.tiny_root={tiny_root}", "benchmark.only=[c05]", "benchmark.seeds=[0]"]
    out = generate("-m", "+experiment=table2", f"run_dir={tmp_path / 't2'}", *common, cwd=tmp_path)
    for method in ("anyms", "wo_crop_merge", "wo_local"):
        assert f"{method}: 1 image(s) generated" in out
        assert (tmp_path / "t2" / "images" / method / "c05" / "0.png").exists()
    out = generate("-m", "+experiment=scale", "method.adapter_scale=0.4,1.0",
                   f"run_dir={tmp_path}/scale${{method.adapter_scale}}", *common, cwd=tmp_path)
    a, b = (tmp_path / f"scale{s}" / "images/anyms/c05/0.png" for s in ("0.4", "1.0"))
    assert a.exists() and b.exists() and a.read_bytes() != b.read_bytes()


@needs_data
def test_two_submitit_shards_equal_one_process_image_for_image_and_table_for_table(tmp_path, tiny_root, tiny_eval_root):
    from eval.evaluate import run_evaluation
    from eval.report import run_report

    from .test_evaluate import eval_cfg

    common = ["model=tiny", f"model.tiny_root={tiny_root}", "benchmark=smoke", "benchmark.only=[c01,c02]",
              "contact_sheets=false"]
    generate("-m", "hydra/launcher=local", "shard=0/2,1/2", f"run_dir={tmp_path / 'sharded'}", *common, cwd=tmp_path)
    generate(f"run_dir={tmp_path / 'single'}", *common, cwd=tmp_path)
    images = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*.png"))
    assert len(images) == 4
    for rel in images:
        assert (tmp_path / "sharded" / rel).read_bytes() == (tmp_path / "single" / rel).read_bytes(), rel
    assert sorted(p.name for p in (tmp_path / "sharded" / "records").iterdir()) == ["anyms.0-of-2.jsonl", "anyms.1-of-2.jsonl"]
    tables = []
    for run in ("sharded", "single"):
        run_evaluation(eval_cfg(tmp_path / run, tiny_root=tiny_eval_root))
        run_report([tmp_path / run], tmp_path / run / "report", {"samples": 50, "ap_samples": 3, "seed": 0})
        tables.append(pd.read_csv(tmp_path / run / "report" / "table1.csv"))
    measured = [c for c in tables[0].columns if not c.startswith(("time_s", "memory_gib"))]  # timing differs
    pd.testing.assert_frame_equal(tables[0][measured], tables[1][measured])


@needs_data
@pytest.mark.slow
def test_make_benchmark_tiny_profile_end_to_end(tmp_path):
    run = tmp_path / "anyms11-tiny"
    out = subprocess.run(["make", "-s", "benchmark", "PROFILE=tiny", f"B_RUN={run}", f"ANYMS_DATA_ROOT={DATA}",
                          "ARGS=wandb=disabled progress=false"], cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    table1 = pd.read_csv(run / "report" / "table1.csv")
    assert sorted(table1["method"]) == sorted(["anyms", "anyms_literal", "wo_crop_merge", "wo_local",
                                               "ip_adapter_joint", "text_only", "ms_diffusion", "ip_adapter_masks",
                                               "gligen"])
    assert (table1["n_images"] == 22).all()  # 11 combinations x 2 seeds
    table2 = pd.read_csv(run / "report" / "table2.csv")
    assert (table2["n_images"] == 14).all()  # the 7 combinations with 3+ subjects
    assert "TINY RANDOM MODELS" in (run / "report" / "table1.md").read_text()
    assert (run / "report" / "fig4.png").stat().st_size > 10_000
    # issue 18's acceptance: it ends by printing Table 1, then the page to open
    lines = out.stdout.strip().splitlines()
    index = run / "report" / "index.html"
    assert lines[-1] == f"report page: {index.resolve()}" and index.is_file()
    table1_md = (run / "report" / "table1.md").read_text().strip().splitlines()
    assert lines[-1 - len(table1_md):-1] == table1_md
    for figure in ("comparison", "ablation", "combinations"):
        assert (run / "report" / "figures" / f"{figure}.png").is_file()
    assert len(list((run / "report" / "images").rglob("*.html"))) == 9 * 22  # a page per image


@needs_data
@pytest.mark.parametrize("overlap", [False, True])
def test_subject_count_layouts_are_reproducible_valid_and_as_requested(overlap, tmp_path):
    from anyms.benchmark import load_combinations
    from anyms.benchmark.random_layouts import combinations

    from .test_generate import make_cfg

    first = combinations(DATA, sizes=(2, 5, 7), per_size=2, seed=3, overlap=overlap)
    assert first == combinations(DATA, sizes=(2, 5, 7), per_size=2, seed=3, overlap=overlap)
    assert first != combinations(DATA, sizes=(2, 5, 7), per_size=2, seed=4, overlap=overlap)
    # adding a size changes none of the others
    assert {k: v for k, v in combinations(DATA, sizes=(2, 3, 5, 7), per_size=2, seed=3, overlap=overlap).items()
            if not k.startswith("n3")} == first
    for cid, c in first.items():
        n = int(cid[1])
        phrases = [s["phrase"] for s in c["subjects"]]
        assert len(c["boxes"]) == n and len(set(phrases)) == n
        assert all(p in c["prompt"] for p in phrases)
        boxes = c["boxes"]  # left to right, one per slot
        assert all(a[0] < b[0] and a[2] < b[2] for a, b in zip(boxes, boxes[1:]))  # no box inside another
        neighbours_overlap = [a[2] > b[0] for a, b in zip(boxes, boxes[1:])]
        assert all(neighbours_overlap) if overlap else not any(neighbours_overlap)
    cfg = make_cfg(tmp_path, "benchmark=subjects", f"benchmark.generator.overlap={overlap}")
    combos = load_combinations(cfg.benchmark, DATA)  # validated like literal combinations
    assert [len(c.layout) for c in combos] == [n for n in (2, 3, 4, 5, 6, 7) for _ in range(3)]
