"""What a stage prints: our progress bars, warnings and summaries, not the libraries' loading chatter; the same
summaries in Hydra's log file; layout warnings once per (combination, grid); `make help`; `make evaluate`'s
evaluators and the line that names them."""

import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
from hydra import compose, initialize_config_dir

from eval.evaluate import evaluator_line, warn_tiny_evaluators_on_real_images

from .conftest import REPO, data_root

DATA = data_root()
needs_data = pytest.mark.skipif(DATA is None, reason="needs the DreamBench images (ANYMS_DATA_ROOT or ../shared)")

# what the libraries printed before: loading bars, deprecation notices, INFO lines, Python warnings' source lines
NOISE = ("Loading pipeline components", "Loading weights", "Writing model shards", "FutureWarning", "torch_dtype",
         "should be kept in float32", "LayoutWarning", "owner = layout.owner_map", "[root][INFO]", "Parsing model identifier")
LAYOUT_LINE = re.compile(r"^warning: (c\d\d): subject\(s\) \[.*\] own no token at the (\d+x\d+) grid: ")
# c06 and c08 of anyms11 each leave a subject without a token at a coarse grid of the tiny model's 64 px
COMBINATIONS = "[c06,c08]"


def run_stage(script: str, *overrides: str, cwd) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / script), *overrides], capture_output=True, text=True,
                         cwd=cwd, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def assert_quiet(out: subprocess.CompletedProcess) -> None:
    both = out.stdout + out.stderr
    heard = [n for n in NOISE if n in both]
    assert not heard, f"library noise {heard} in:\n{both[-4000:]}"


def log_file(run_dir, stage: str):
    files = sorted((run_dir / "logs").glob(f"{stage}-*/{stage}.log"))
    assert len(files) == 1, files
    return files[0].read_text()


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory, tiny_root, tiny_eval_root):
    """generate -> evaluate -> report as subprocesses on two combinations x two seeds, progress bars on."""
    run_dir = tmp_path_factory.mktemp("console") / "run"
    common = [f"run_dir={run_dir}", "wandb=disabled"]
    gen = run_stage("generate.py", "benchmark=anyms11", f"benchmark.only={COMBINATIONS}", "benchmark.seeds=[0,1]",
                    "model=tiny", f"model.tiny_root={tiny_root}", f"data_root={DATA}", *common, cwd=run_dir.parent)
    ev = run_stage("evaluate.py", "eval=tiny", f"eval.tiny_root={tiny_eval_root}", *common, cwd=run_dir.parent)
    rep = run_stage("report.py", "bootstrap.samples=20", "bootstrap.ap_samples=20", *common, cwd=run_dir.parent)
    return run_dir, gen, ev, rep


@needs_data
def test_generate_prints_no_library_noise_and_each_layout_warning_once(staged_run):
    run_dir, gen, _, _ = staged_run
    assert_quiet(gen)
    warned = Counter(m.groups() for m in map(LAYOUT_LINE.match, gen.stdout.splitlines()) if m)
    assert warned and set(warned.values()) == {1}, gen.stdout  # two seeds, several layers: still once
    records = [json.loads(line) for f in (run_dir / "records").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert {c for c, _ in warned} == {"c06", "c08"} == {r["combination"] for r in records}
    grids = {g for r in records for g in r["overlap_shares"]}  # the finest and coarsest cross-attention grid
    assert {g for _, g in warned} <= grids
    # our lines as they are: no time or logger in front; the summary last
    lines = gen.stdout.strip().splitlines()
    assert lines[-3].startswith("anyms: 4 image(s) generated, 0 already there, of 4")
    assert lines[-2].startswith("  images:  ") and lines[-1].startswith("  records: ")


@needs_data
def test_each_stage_logs_its_summary_to_hydras_log_file(staged_run):
    run_dir, gen, ev, rep = staged_run
    generate_log = log_file(run_dir, "generate")
    assert "[scripts.generate][INFO] - anyms: 4 image(s) generated" in generate_log
    assert "[anyms.generation.generate][WARNING] - c08: subject(s)" in generate_log
    evaluate_log = log_file(run_dir, "evaluate")
    assert "[scripts.evaluate][INFO] - evaluate: eval=tiny (tiny random evaluators: plumbing only)" in evaluate_log
    assert "evaluate: 4 image(s) scored" in evaluate_log
    report_logs = list((run_dir / "report" / "logs").glob("*/report.log"))
    assert len(report_logs) == 1 and "[scripts.report][INFO] - report: " in report_logs[0].read_text()


@needs_data
def test_evaluate_names_its_evaluators_first_and_report_ends_with_table1_then_the_page(staged_run):
    run_dir, _, ev, rep = staged_run
    assert_quiet(ev)
    assert_quiet(rep)
    assert ev.stdout.splitlines()[0] == "evaluate: eval=tiny (tiny random evaluators: plumbing only)"
    assert "not tiny models" not in ev.stdout  # tiny images, tiny evaluators: nothing to warn about
    lines = rep.stdout.strip().splitlines()
    assert lines[-1] == f"report page: {(run_dir / 'report' / 'index.html').resolve()}"
    table1 = (run_dir / "report" / "table1.md").read_text().strip().splitlines()
    assert lines[-1 - len(table1):-1] == table1  # just before the page: Table 1, whole


def test_quiet_libraries_switches_off_already_imported_libraries(monkeypatch):
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    from runfolder.console import LIBRARY_ENVIRONMENT, quiet_libraries

    for key in LIBRARY_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")  # a user's own choice is kept
    diffusers_logging.enable_progress_bar()
    transformers_logging.enable_progress_bar()
    try:
        quiet_libraries()
        assert not diffusers_logging.is_progress_bar_enabled() and not transformers_logging.is_progress_bar_enabled()
        assert diffusers_logging.get_verbosity() == logging.ERROR
        assert transformers_logging.get_verbosity() == logging.ERROR
        assert os.environ["DIFFUSERS_VERBOSITY"] == "info" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
        diffusers_logging.set_verbosity_warning()
        transformers_logging.set_verbosity_warning()


def eval_config(name: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=["run_dir=unused", f"eval={name}"]).eval


def test_the_evaluate_stages_first_line_names_the_evaluators():
    assert evaluator_line(eval_config("tiny")) == "evaluate: eval=tiny (tiny random evaluators: plumbing only)"
    assert evaluator_line(eval_config("tiny_msbench")) == "evaluate: eval=tiny_msbench (tiny random evaluators: plumbing only)"
    assert evaluator_line(eval_config("default")) == (
        "evaluate: eval=default (GroundingDINO IDEA-Research/grounding-dino-tiny, SAM vit_h, CLIP ViT-B-32/openai, "
        "DINO facebook/dinov2-small, DreamSim ensemble)")
    assert "DINO facebook/dino-vits16" in evaluator_line(eval_config("msbench"))


def test_tiny_evaluators_on_real_models_images_are_warned_about(caplog):
    tiny_image = {"model": {"name": "tiny", "tiny": "sdxl"}}
    real_image = {"model": {"name": "sdxl", "tiny": None}}
    imported = {"model": {"name": "external:mudi", "source": "/data/mudi"}}
    with caplog.at_level(logging.WARNING, logger="eval.evaluate"):
        warn_tiny_evaluators_on_real_images(eval_config("tiny"), [tiny_image])
        warn_tiny_evaluators_on_real_images(eval_config("default"), [real_image])
        assert not caplog.records
        warn_tiny_evaluators_on_real_images(eval_config("tiny"), [tiny_image, real_image, imported, real_image])
    assert len(caplog.records) == 1
    assert "external:mudi, sdxl, not tiny models, but eval=tiny" in caplog.records[0].getMessage()


def make(*args: str) -> str:
    out = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_evaluate_uses_the_tiny_evaluators_unless_told_otherwise():
    def evaluate_command(*args) -> list[str]:
        lines = [line.split() for line in make("-n", "evaluate", *args).splitlines() if "scripts/evaluate.py" in line]
        assert len(lines) == 1, lines
        return lines[0][1:]

    assert evaluate_command("run_dir=x") == ["scripts/evaluate.py", "run_dir=x", "eval=tiny"]  # before: eval=default
    assert evaluate_command() == ["scripts/evaluate.py", "run_dir=runs/smoke-tiny", "eval=tiny"]
    assert evaluate_command("run_dir=x", "eval=default") == ["scripts/evaluate.py", "run_dir=x", "eval=default"]


def test_make_help_lists_every_verb_once_without_the_venv():
    text = make("help", "VENV=/nonexistent/venv")
    phony = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith(".PHONY:"))
    verbs = phony.split(":", 1)[1].split()
    listed = [line.split()[1] for line in text.splitlines()]
    assert sorted(listed) == sorted(verbs)
    assert all(len(line.split(None, 2)) == 3 for line in text.splitlines())  # make VERB description
