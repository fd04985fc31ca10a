"""Issue 24: every record and the eval provenance name the hardware that ran them (never hashed), and a report
whose images come from more than one kind of hardware says so above Table 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import runfolder
from anyms.generation.generate import run_generation

from .conftest import REPO
from .synthetic_run import write_run
from .test_generate import DATA, make_cfg

needs_data = pytest.mark.skipif(DATA is None, reason="needs the DreamBench images (ANYMS_DATA_ROOT or ../shared)")

H100 = {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda": "12.8", "cudnn": 91002,
        "label": "NVIDIA H100 80GB HBM3 (sm_90, CUDA 12.8, cuDNN 91002)"}


def test_cpu_hardware_names_the_isa_torch_dispatches_to():
    hw = runfolder.hardware("cpu")
    assert hw["kind"] == "cpu" and hw["name"] and hw["threads"] == torch.get_num_threads()
    assert hw["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert hw["label"] == f"{hw['name']} ({hw['cpu_capability']})" or "ONEDNN_MAX_CPU_ISA" in os.environ
    assert runfolder.provenance()["hardware"]["kind"] == "cpu"


def test_forced_kernels_show_in_the_label():
    """ATEN_CPU_CAPABILITY=default and a oneDNN cap change the bytes (benchmarks/kernel_drift.py): the label says so."""
    code = "import json, runfolder; print(json.dumps(runfolder.hardware('cpu')))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(REPO)}
    hw = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout.strip().splitlines()[-1])
    assert hw["cpu_capability"] == "DEFAULT" and hw["onednn_max_cpu_isa"] == "AVX2"
    assert hw["label"].endswith("(DEFAULT, oneDNN <= AVX2)")


def test_gpu_hardware_names_compute_capability_cuda_and_cudnn(monkeypatch):
    """No GPU here: torch.cuda's getters answer as an H100 would, so that the CUDA branch runs."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: H100["name"])
    monkeypatch.setattr(torch.version, "cuda", H100["cuda"])
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: H100["cudnn"])
    assert runfolder.hardware("cuda") == H100
    assert runfolder.hardware(torch.device("cuda", 0)) == H100


@needs_data
def test_records_carry_the_hardware_and_a_resume_elsewhere_regenerates_nothing(tmp_path, tiny_root, monkeypatch):
    cfg = make_cfg(tmp_path, "model=tiny", "method=anyms", "benchmark=smoke", tiny_root=tiny_root)
    assert len(run_generation(cfg).generated) == 2
    records = runfolder.read_records(tmp_path)  # validated against the schema, hardware included
    assert all(r["hardware"] == runfolder.hardware("cpu") for r in records)
    hashes = {r["config_hash"] for r in records}
    # the same run resumed on a GPU node: nothing is regenerated, the config hash does not see the hardware
    monkeypatch.setattr(runfolder, "hardware", lambda device="cpu": H100)
    assert run_generation(make_cfg(tmp_path, "model=tiny", "method=anyms", "benchmark=smoke",
                                  tiny_root=tiny_root)).generated == []
    assert {r["config_hash"] for r in runfolder.read_records(tmp_path)} == hashes


def test_report_says_when_images_come_from_two_kinds_of_hardware(tmp_path, tiny_eval_root):
    from eval.evaluate import run_evaluation
    from eval.report import run_report

    from .test_evaluate import eval_cfg

    cpu = runfolder.hardware("cpu")
    write_run(tmp_path, "anyms", hardware=cpu)
    write_run(tmp_path, "text_only", hardware=cpu)
    run_evaluation(eval_cfg(tmp_path, tiny_root=tiny_eval_root))
    assert json.loads((tmp_path / "eval_config.json").read_text())["hardware"]["kind"] == "cpu"
    bootstrap = {"samples": 20, "ap_samples": 5, "seed": 0}
    run_report([tmp_path], tmp_path / "one", bootstrap)
    table1 = (tmp_path / "one" / "table1.md").read_text()
    assert "Mixed hardware" not in table1 and f"hardware {cpu['label']}." in table1
    assert list(json.loads((tmp_path / "one" / "report.json").read_text())["hardware_kinds"]) == [cpu["label"]]

    # text_only's images made again on an H100 node (same bytes here, so the metrics stand)
    for rec in [r for r in runfolder.read_records(tmp_path) if r["method"] == "text_only"]:
        runfolder.append_record(runfolder.records_file(tmp_path, "text_only", (0, 1)),
                                {**rec, "hardware": H100, "created": rec["created"] + 1})
    run_evaluation(eval_cfg(tmp_path, tiny_root=tiny_eval_root))
    run_report([tmp_path], tmp_path / "two", bootstrap)
    table1 = (tmp_path / "two" / "table1.md").read_text()
    note = table1.index("**Mixed hardware.**")
    assert note < table1.index("\n|")  # above the table
    assert f"{cpu['label']}: 4 image(s) of anyms" in table1 and f"{H100['label']}: 4 image(s) of text_only" in table1
    kinds = json.loads((tmp_path / "two" / "report.json").read_text())["hardware_kinds"]
    assert kinds == {cpu["label"]: {"methods": ["anyms"], "images": 4}, H100["label"]: {"methods": ["text_only"], "images": 4}}
    assert "Mixed hardware." in (tmp_path / "two" / "index.html").read_text()
