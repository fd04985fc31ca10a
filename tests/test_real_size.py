"""``make check-real-size`` (benchmarks/real_size.py): its writers and stage runner on tiny shapes, the whole
check on tiny architectures, and (slow) the check itself at the real sizes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import REPO, data_root


def test_random_safetensors_load_strictly_with_the_hub_names(tmp_path):
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.real_size_models import _transformers_model

    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_hidden_layers=2)
    _transformers_model("CLIPTextModel", cfg, tmp_path / "te", seed=0)
    with safe_open(tmp_path / "te" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert keys and all(k.startswith("text_model.") for k in keys)  # as the SDXL repo's text_encoder
    model, info = CLIPTextModel.from_pretrained(tmp_path / "te", output_loading_info=True, dtype=torch.bfloat16)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd = model.state_dict()
    norm = [k for k in sd if k.endswith("final_layer_norm.weight")][0]
    assert torch.equal(sd[norm], torch.ones_like(sd[norm]))
    assert torch.equal(sd[norm.replace("weight", "bias")], torch.zeros_like(sd[norm]))
    fc1 = [v for k, v in sd.items() if k.endswith("layers.0.mlp.fc1.weight")][0]
    assert fc1.dtype == torch.bfloat16 and abs(fc1.float().std().item() - 32**-0.5) < 0.03  # N(0, 1/fan_in)
    out = model(torch.tensor([[49406, 320, 49407]])).last_hidden_state
    assert torch.isfinite(out).all()


def test_stage_runner_measures_peak_memory_and_reports_failures(tmp_path):
    from benchmarks.real_size import CheckFailed, Stage, run_stage

    script = tmp_path / "alloc.py"
    script.write_text(textwrap.dedent("""
        import sys
        block = bytearray(300 * 2**20)  # touched: resident
        print("allocated", len(block))
        sys.exit(int(sys.argv[1]))
    """))
    child = [sys.executable, "-m", "benchmarks.real_size", "--child", str(script)]
    ok = run_stage(Stage("ok", child + ["0"]), log_dir=tmp_path)
    assert ok.returncode == 0 and ok.peak_rss_bytes >= 300 * 2**20
    assert json.loads((tmp_path / "ok.report.json").read_text()) == {"cuda_peak_bytes": None}
    with pytest.raises(CheckFailed, match=r"(?s)stage 'bad' failed \(exit 3\).*allocated"):
        run_stage(Stage("bad", child + ["3"]), log_dir=tmp_path)


def test_markdown_names_every_stage():
    from benchmarks.real_size import markdown

    stages = [{"name": n, "seconds": 1.0, "peak_rss_bytes": 2**30, "cuda_peak_bytes": None} for n in ("write", "evaluate")]
    result = {"models": "m", "image_size": 1024, "steps": 2, "device_name": "cpu2", "device": "cpu", "dtype": "bf16",
              "evaluator_dtype": "fp32", "git_hash": "abc", "versions": {}, "total_seconds": 2.0, "stages": stages,
              "outputs": {"warnings": ["anyms: a constant image"]}}
    text = markdown(result)
    assert "| write | 1 | 1.00 GiB | - |" in text and "| evaluate |" in text and "constant image" in text


needs_data = pytest.mark.skipif(data_root() is None, reason="needs the DreamBench images (ANYMS_DATA_ROOT)")


@needs_data
@pytest.mark.slow
def test_check_on_tiny_architectures(tmp_path):
    """The whole check (write, generate both methods through scripts/generate.py, evaluate, the output checks) on
    tiny architectures written by the real-size writers: the plumbing, in about a minute."""
    from benchmarks.real_size import run_check

    result = run_check(device="cpu", dtype="bf16", run_dir=tmp_path / "run", root=tmp_path / "models", tiny=True)
    assert [s["name"] for s in result["stages"]] == ["write", "generate anyms", "generate ms_diffusion", "evaluate"]
    assert all(s["returncode"] == 0 and s["peak_rss_bytes"] > 0 for s in result["stages"])
    images = result["outputs"]["images"]
    assert set(images) == {"anyms", "ms_diffusion"} and all(i["size"] == [64, 64] for i in images.values())
    assert result["outputs"]["metric_rows"] == 4


@needs_data
@pytest.mark.slow
@pytest.mark.real_size
def test_check_real_size(tmp_path):
    """``make check-real-size``: the real architectures at 1024 px through every stage (minutes; see README)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.real_size", "--run-dir", str(tmp_path / "run"), "--out", ""],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| generate anyms |" in proc.stdout and "| evaluate |" in proc.stdout
