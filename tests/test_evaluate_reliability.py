"""Evaluation and report at paper scale (issue 14): streaming and resumable after SIGKILL, keyed by image
content, torn record lines, only what exists in the tables, no silent pooling, provenance, memory on the
CPU, one evaluator per run folder, a missing evaluation config."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pandas as pd
import pytest

import runfolder
from eval.evaluate import EvaluationError, run_evaluation
from eval.report import run_report
from runfolder.lock import RunFolderLockedError, writer_lock

from .conftest import REPO
from .synthetic_run import evaluate_command, random_png, record, rewrite_record, run_evaluate, write_run
from .test_evaluate import colour_cfg, eval_cfg

BOOT = {"samples": 5, "ap_samples": 1, "seed": 0}


def scored_line(stdout: str) -> tuple[int, int]:
    m = re.search(r"evaluate: (\d+) image\(s\) scored, (\d+) already scored", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


# --- 1. streaming and resumable ---------------------------------------------------------------------


def test_sigkill_mid_evaluation_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_eval_root):
    run = tmp_path / "run"
    write_run(run, combinations=("c01", "c02", "c03", "c04"), seeds=(0, 1, 2, 3))  # 16 images
    total = 16
    reference = tmp_path / "reference"
    shutil.copytree(run, reference)
    run_evaluation(eval_cfg(reference, tiny_root=tiny_eval_root))  # uninterrupted, in this process

    # kill the real script once its progress bar shows k images finished, k drawn at random
    k = random.Random(os.getpid()).randint(2, total - 3)
    proc = subprocess.Popen(evaluate_command(run, tiny_eval_root, "progress=true"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=False)
    seen, done, deadline = b"", 0, time.monotonic() + 240
    os.set_blocking(proc.stderr.fileno(), False)
    while proc.poll() is None and time.monotonic() < deadline:
        chunk = proc.stderr.read() or b""
        seen += chunk
        counts = re.findall(rb"\|\s*(\d+)/" + str(total).encode() + rb"\b", seen)
        done = int(counts[-1]) if counts else 0
        if done >= k:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"evaluate ended before the kill (saw {done} of {total}):\n{seen[-2000:].decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    again = run_evaluate(run, tiny_eval_root)
    rescored, skipped = scored_line(again.stdout)
    assert rescored + skipped == total
    # every image finished before the kill was kept; at most the one in flight is scored twice
    assert rescored <= total - done, (rescored, done)
    m, ref = (pd.read_parquet(d / "metrics.parquet") for d in (run, reference))
    pd.testing.assert_frame_equal(m.drop(columns=["eval_git_hash"]), ref.drop(columns=["eval_git_hash"]))
    d, dref = (pd.read_parquet(x / "detections.parquet") for x in (run, reference))
    pd.testing.assert_frame_equal(d, dref)


def test_images_are_decoded_one_at_a_time(tmp_path, monkeypatch):
    """Memory flat in the number of images: when an image is scored, no other run image is held decoded."""
    import gc

    from PIL import Image

    import eval.evaluate as ev

    write_run(tmp_path, combinations=("c01", "c02", "c03"), seeds=(0, 1, 2))  # 9 images
    alive = []
    real_score = ev.score_image

    def score(record, image, *args, **kwargs):
        alive.append(sum(isinstance(o, Image.Image) and o.size == (64, 64) for o in gc.get_objects()))
        return real_score(record, image, *args, **kwargs)

    monkeypatch.setattr(ev, "score_image", score)
    summary = run_evaluation(colour_cfg(tmp_path))
    assert len(summary.scored) == 9
    assert max(alive) <= 2, alive  # the image being scored (and its RGB conversion), never the run's images


# --- 2. keyed by content --------------------------------------------------------------------------


def test_a_regenerated_image_is_scored_again_and_only_it(tmp_path):
    write_run(tmp_path, seeds=(0, 1))
    assert len(run_evaluation(colour_cfg(tmp_path)).scored) == 4
    before = pd.read_parquet(tmp_path / "metrics.parquet")
    # generate with overwrite=true after a code change: same path, same config hash, new bytes, new record
    rel = "images/anyms/c01/1.png"
    digest = random_png(tmp_path / rel, 64, seed=777)
    rewrite_record(tmp_path, "anyms", rel, image_sha256=digest)
    # and an unchanged image regenerated to the same bytes: a new record, nothing to score again
    rewrite_record(tmp_path, "anyms", "images/anyms/c01/0.png")
    second = run_evaluation(colour_cfg(tmp_path))
    assert second.scored == [rel] and second.skipped == 3
    after = pd.read_parquet(tmp_path / "metrics.parquet")
    assert set(after.loc[after["image"] == rel, "image_sha256"]) == {digest}
    assert len(after) == len(before)


def test_a_file_replaced_behind_its_record_is_scored_again(tmp_path, caplog):
    write_run(tmp_path, seeds=(0,))
    run_evaluation(colour_cfg(tmp_path))
    rel = "images/anyms/c02/0.png"
    digest = random_png(tmp_path / rel, 64, seed=4242)  # the record still names the old digest
    with caplog.at_level(logging.WARNING):
        second = run_evaluation(colour_cfg(tmp_path))
    assert second.scored == [rel]
    assert rel in caplog.text and "image_sha256" in caplog.text
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert set(m.loc[m["image"] == rel, "image_sha256"]) == {digest}


# --- 3. torn records line -------------------------------------------------------------------------


def test_a_torn_final_records_line_is_reported_and_skipped(tmp_path, caplog):
    write_run(tmp_path, seeds=(0, 1))
    path = runfolder.records_file(tmp_path, "anyms", (0, 1))
    good = path.read_text()
    torn = json.dumps(record(tmp_path, "anyms", "c03", 0))[:57]  # a crash cut the last write
    path.write_text(good + torn)
    with caplog.at_level(logging.WARNING, logger="runfolder"):
        records = runfolder.read_records(tmp_path)
    assert len(records) == 4
    assert str(path) in caplog.text and "torn" in caplog.text
    assert path.read_text() == good + torn  # the good lines are left as they are
    assert len(run_evaluation(colour_cfg(tmp_path)).scored) == 4

    # a corrupt line elsewhere stops, naming file:line and the fix
    lines = good.splitlines()
    path.write_text("\n".join([lines[0], lines[1][:40], *lines[2:]]) + "\n")
    with pytest.raises(runfolder.RunFolderError, match=rf"{re.escape(str(path))}:2: not a JSON object .*delete"):
        runfolder.read_records(tmp_path)


def test_a_run_resumed_after_a_torn_line_goes_on(tmp_path, caplog):
    """The crash cut a record; the resumed run's writer cuts the fragment off before it appends (the writer owns
    its shard's file), so the file holds whole lines again and never blocks a reader."""
    write_run(tmp_path, seeds=(0,))
    path = runfolder.records_file(tmp_path, "anyms", (0, 1))
    again = record(tmp_path, "anyms", "c03", 0)
    whole = path.read_bytes()
    with open(path, "a") as f:
        f.write(json.dumps(again, sort_keys=True)[:80])  # the crash
    assert len(runfolder.read_records(tmp_path)) == 2
    with caplog.at_level(logging.WARNING, logger="runfolder"):
        runfolder.append_record(path, again)  # the resumed generate
    assert "cut off a torn last line of 80 bytes" in caplog.text
    assert path.read_bytes().startswith(whole) and path.read_text().count("\n") == len(whole.splitlines()) + 1
    assert [r["image"] for r in runfolder.read_records(tmp_path)][-1] == "images/anyms/c03/0.png"
    runfolder.append_record(path, record(tmp_path, "anyms", "c04", 0))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runfolder"):
        assert len(runfolder.read_records(tmp_path)) == 4
    assert "torn" not in caplog.text
    assert len(run_evaluation(colour_cfg(tmp_path)).scored) == 4


# --- 4. only what exists --------------------------------------------------------------------------


def test_a_removed_method_disappears_from_the_tables(tmp_path):
    write_run(tmp_path, method="anyms", seeds=(0,))
    write_run(tmp_path, method="wo_local", seeds=(0,))
    run_evaluation(colour_cfg(tmp_path))
    run_report([tmp_path], tmp_path / "report", BOOT)
    assert sorted(pd.read_csv(tmp_path / "report" / "table1.csv")["method"]) == ["anyms", "wo_local"]
    for sub in ("images/wo_local",):
        shutil.rmtree(tmp_path / sub)
    for pattern in ("records/wo_local.*", "plans/wo_local.*"):
        for p in tmp_path.glob(pattern):
            p.unlink()
    run_report([tmp_path], tmp_path / "report", BOOT)
    assert list(pd.read_csv(tmp_path / "report" / "table1.csv")["method"]) == ["anyms"]
    assert "wo_local" not in (tmp_path / "report" / "table1.md").read_text().split("Paired")[0]


def test_the_report_refuses_metrics_of_an_image_changed_since_scoring(tmp_path):
    write_run(tmp_path, seeds=(0,))
    run_evaluation(colour_cfg(tmp_path))
    rel = "images/anyms/c01/0.png"
    digest = random_png(tmp_path / rel, 64, seed=99)
    rewrite_record(tmp_path, "anyms", rel, image_sha256=digest)
    with pytest.raises(EvaluationError, match=rf"{rel}.*changed since it was scored.*run evaluate"):
        run_report([tmp_path], tmp_path / "report", BOOT)


# --- 5. no silent pooling ---------------------------------------------------------------------------


def settings(adapter_scale=1.0, steps=30):
    return {"method": {"name": "anyms", "adapter_scale": adapter_scale, "attention": "fused"},
            "generation": {"steps": steps, "guidance_scale": 7.5}}


def test_images_made_with_different_settings_are_split_or_refused(tmp_path):
    run = tmp_path / "run"
    path = runfolder.records_file(run, "anyms", (0, 1))
    for seed, steps in ((0, 4), (1, 30)):
        for combo in ("c01", "c02"):
            runfolder.append_record(path, record(run, "anyms", combo, seed, settings=settings(steps=steps)))
    run_evaluation(colour_cfg(run))
    with pytest.raises(EvaluationError, match=r"anyms.*generation\.steps \(4 vs 30\).*split=true"):
        run_report([run], run / "report", BOOT)
    run_report([run], run / "report", BOOT, split=True)
    table = pd.read_csv(run / "report" / "table1.csv")
    assert sorted(table["method"]) == ["anyms [steps=30]", "anyms [steps=4]"]
    assert set(table["n_images"]) == {2}


def test_two_run_folders_of_one_method_are_two_rows(tmp_path):
    for scale in (0.4, 1.0):
        write_run(tmp_path / f"scale{scale}", seeds=(0,), settings=settings(adapter_scale=scale))
        run_evaluation(colour_cfg(tmp_path / f"scale{scale}"))
    dirs = [tmp_path / "scale0.4", tmp_path / "scale1.0"]
    with pytest.raises(EvaluationError, match=r"method\.adapter_scale \(0\.4 vs 1\.0\)"):
        run_report(dirs, tmp_path / "report", BOOT)
    run_report(dirs, tmp_path / "report", BOOT, split=True)
    table = pd.read_csv(tmp_path / "report" / "table1.csv")
    assert sorted(table["method"]) == ["anyms [adapter_scale=0.4]", "anyms [adapter_scale=1.0]"]
    assert set(table["n_images"]) == {2}  # each folder's own images, not pooled by path

    # records without settings (older runs): the folders cannot be told apart, so the run folder is the field
    for d in ("a", "b"):
        write_run(tmp_path / d, seeds=(0,))
        run_evaluation(colour_cfg(tmp_path / d))
    with pytest.raises(EvaluationError, match=r"run folder"):
        run_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report2", BOOT)
    run_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report2", BOOT, split=True)
    assert sorted(pd.read_csv(tmp_path / "report2" / "table1.csv")["method"]) == ["anyms [run=a]", "anyms [run=b]"]


# --- 6. provenance, 7. memory ------------------------------------------------------------------------


def test_the_report_stamps_what_made_the_images_and_metrics_and_memory_is_na_on_cpu(tmp_path):
    path = runfolder.records_file(tmp_path, "anyms", (0, 1))
    runfolder.append_record(path, record(tmp_path, "anyms", "c01", 0, git_hash="gen-git-1"))
    runfolder.append_record(path, record(tmp_path, "anyms", "c01", 1, git_hash="gen-git-2"))
    for seed, device in ((0, "cuda:0"), (1, "cuda:1")):  # two shards on two GPUs: one configuration
        runfolder.append_record(runfolder.records_file(tmp_path, "gpu", (0, 1)),
                                record(tmp_path, "gpu", "c01", seed, device=device, peak_memory_bytes=3 * 2**30))
    run_evaluation(colour_cfg(tmp_path))
    summary = run_report([tmp_path], tmp_path / "report", BOOT)
    md = (tmp_path / "report" / "table1.md").read_text()
    assert "gen-git-1" in md and "gen-git-2" in md
    assert f"report git {runfolder.git_hash()}" in md and f"metrics git {runfolder.git_hash()}" in md
    assert summary["provenance"]["images_git"] == ["gen-git-1", "gen-git-2"]
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "n/a" in rows["anyms"] and "3.00" in rows["gpu"]
    assert "n/a on the CPU" in md
    table = pd.read_csv(tmp_path / "report" / "table1.csv").set_index("method")
    assert pd.isna(table.loc["anyms", "memory_gib"]) and table.loc["gpu", "memory_gib"] == pytest.approx(3.0)


# --- 8. one evaluator at a time, 9. no evaluation config ------------------------------------------------


def test_a_second_evaluation_of_a_run_folder_is_refused_naming_the_first(tmp_path, tiny_eval_root):
    write_run(tmp_path, seeds=(0,))
    with writer_lock(tmp_path, "evaluate", "metrics"):
        with pytest.raises(RunFolderLockedError, match=r"evaluate of metrics .* already running: pid"):
            run_evaluation(colour_cfg(tmp_path))
        out = run_evaluate(tmp_path, tiny_eval_root, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("evaluate: evaluate of metrics")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "metrics.parquet").exists()


def test_the_report_without_an_evaluation_config_says_what_is_missing(tmp_path):
    write_run(tmp_path, seeds=(0,))
    run_evaluation(colour_cfg(tmp_path))
    (tmp_path / "eval_config.json").unlink()
    with pytest.raises(EvaluationError, match=r"eval_config.json: missing.*run evaluate"):
        run_report([tmp_path], tmp_path / "report", BOOT)
