"""The speed and memory benchmarks (benchmarks/) run their code paths on tiny shapes. Speed is never
asserted here: only that every variant runs, computes what it claims, and lands in the results' format."""

import json

import pytest
import torch

from benchmarks import attention, evaluate, run, unet_step
from benchmarks.common import Timings, interleaved

SPEC_ATTENTION_KEYS = {"level", "n", "variant", "median_ms", "spread_ms", "ratio_to_stock"}
SPEC_STEP_KEYS = {"model", "variant", "median_s", "ratio_to_stock", "activation_bytes", "activation_ratio"}
SPEC_EVALUATE_KEYS = {"model", "seconds_per_image", "ratio_to_generation"}


def test_interleaved_rounds_rotate_and_ratios_are_paired():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    interleaved(calls, rounds=3, warmup=1)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    paired = Timings({"x": [2.0, 4.0, 8.0], "ref": [1.0, 2.0, 4.0]})
    assert paired.ratio("x", "ref") == 2.0 and paired.median("x") == 4.0 and paired.spread("x") == 3.0


def test_attention_benchmark_smoke():
    rows = attention.run(smoke=True, memory=False)
    assert {(r["n"], r["variant"]) for r in rows} == {(n, v) for n in (2, 3) for v in attention.VARIANTS}
    assert all(SPEC_ATTENTION_KEYS <= r.keys() and r["median_ms"] > 0 for r in rows)
    assert all(r["ratio_to_stock"] == 1.0 for r in rows if r["variant"] == attention.REFERENCE)
    (summary,) = attention.summary(rows)
    assert summary["level"] == "8x8" and summary["per_subject_fused"] is not None


def test_attention_benchmark_variants_compute_what_they_claim():
    layer = attention.Layer(attention.SMOKE_LEVELS["8x8"])
    with torch.inference_mode():
        out = {name: call() for name, call in layer.calls(3).items()}
    torch.testing.assert_close(out["anyms_fused"], out["anyms_crop_merge"])
    assert not torch.allclose(out["anyms_fused"], out["stock_joint"])
    assert not torch.allclose(out["anyms_fused"], out["text_only"])


def test_reused_projected_tokens_never_change_the_result():
    """With ``reuse_projected_tokens`` AnyMS reuses the subjects' projected tokens between calls with equal
    image embeddings (the steps of a generation): the result is always that of tokens projected afresh, and
    by default nothing is kept (memory as the stock processor's)."""
    from anyms.core.attention import AnyMSAttnProcessor, AnyMSState

    layer = attention.Layer(attention.SMOKE_LEVELS["8x8"])
    layout = attention.layout_for(3)

    def fresh():
        return AnyMSAttnProcessor(layer.stock, AnyMSState(layout=layout, latent_hw=(16, 16)))

    def call(proc, image):
        with torch.inference_mode():
            return proc(layer.attn, layer.hidden, encoder_hidden_states=(layer.text, [image]))

    image = layer.image_embeds(3)
    default = fresh()
    call(default, image)
    assert default._projected_tokens is None  # the default keeps nothing between calls
    proc = AnyMSAttnProcessor(layer.stock, AnyMSState(layout=layout, latent_hw=(16, 16), reuse_projected_tokens=True))
    first = call(proc, image)
    torch.testing.assert_close(first, call(default, image), rtol=0, atol=0)
    kept = proc._projected_tokens
    assert kept is not None
    torch.testing.assert_close(call(proc, image.clone()), first, rtol=0, atol=0)  # equal values: reused
    assert proc._projected_tokens is kept
    other = image + 1  # new embeddings: projected anew
    torch.testing.assert_close(call(proc, other), call(fresh(), other), rtol=0, atol=0)
    with torch.no_grad():  # weights changed in place: projected anew
        layer.stock.to_k_ip[0].weight.mul_(2)
    torch.testing.assert_close(call(proc, other), call(fresh(), other), rtol=0, atol=0)
    with torch.enable_grad():  # autograd recording: nothing kept
        proc(layer.attn, layer.hidden, encoder_hidden_states=(layer.text, [other]))
    assert proc._projected_tokens is None


def test_attention_memory_smoke():
    peaks = attention.memory_level(attention.SMOKE_LEVELS["8x8"], [2], "cpu")
    assert set(peaks[2]) == set(attention.VARIANTS) and all(v >= 0 for v in peaks[2].values())


def test_unet_step_workers_in_this_process():
    """What the worker processes run, here on the tiny UNet: the timing loop swapping processors, and the
    activation memory of one variant."""
    timing = unet_step.time_worker("tiny", list(unet_step.VARIANTS), 2, "cpu", rounds=2, warmup=True)
    assert all(len(timing["seconds"][v]) == 2 and v in timing["warmup_s"] for v in unet_step.VARIANTS)
    assert timing["finite"]
    memory = unet_step.memory_worker("tiny", "anyms_fused", 2, "cpu")
    assert memory["activation_bytes"] >= 0 and memory["loaded_bytes"] > 0


def test_unet_step_variants_swap_processors():
    from anyms.core.attention import AnyMSAttnProcessor

    spec = unet_step.MODELS["tiny"]
    unet = unet_step.build_unet(spec, "cpu", torch.float32)
    inputs = unet_step.step_inputs(unet, spec, 3, "cpu", torch.float32)
    outs = {}
    for variant in unet_step.VARIANTS + ("stock_joint",):
        unet_step.use_variant(unet, variant, spec, 3)
        anyms = any(isinstance(p, AnyMSAttnProcessor) for p in unet.attn_processors.values())
        assert anyms == variant.startswith("anyms_")
        with torch.inference_mode():
            outs.setdefault(variant, []).append(unet(**inputs).sample)
    assert all(torch.isfinite(o).all() for v in outs.values() for o in v)
    torch.testing.assert_close(outs["stock_joint"][0], outs["stock_joint"][1])  # swapping back restores the stock
    assert not torch.allclose(outs["anyms_fused"][0], outs["stock_joint"][0])  # the layout changes the image term


@pytest.mark.slow
def test_unet_step_runs_in_worker_processes():
    result = unet_step.run("tiny", subjects=2)
    assert {r["variant"] for r in result.rows} == set(unet_step.VARIANTS)
    assert all(SPEC_STEP_KEYS <= r.keys() and r["finite"] for r in result.rows)


def test_evaluate_benchmark_smoke(tiny_eval_root, monkeypatch):
    monkeypatch.setenv("ANYMS_CACHE", str(tiny_eval_root.parent))  # the session's tiny evaluators
    measured = evaluate.measure(counts=(2, 3), n_full=2, smoke=True)
    assert set(measured["seconds_per_image"]) == {2, 3} and all(v > 0 for v in measured["seconds_per_image"].values())
    rows = evaluate.rows(measured, {"sdxl-1024px": 2.0})
    assert all(SPEC_EVALUATE_KEYS <= r.keys() for r in rows)
    assert rows[0]["ratio_to_generation"] == pytest.approx(rows[0]["seconds_per_image"] / 60, rel=1e-2)


def test_targets_are_judged_against_their_limits():
    results = {
        "attention_summary": [{"level": "64x64", "fused_to_stock_max": 1.04, "per_subject_fused": 0.03,
                               "fused_to_stock_masked_max_n3": 0.7}],
        "unet_step": [{"model": "sd15-512px", "variant": "anyms_fused", "ratio_to_stock": 1.01, "activation_ratio": 1.2}],
        "evaluate": [{"model": "sdxl-1024px", "ratio_to_generation": 0.04}, {"model": "sd15-512px", "ratio_to_generation": 0.5}],
    }
    met = {t["target"]: t["met"] for t in run.targets(results)}
    assert met == {
        "attention 64x64: fused / stock joint, worst n": True,
        "attention 64x64: fused cost per added subject": False,
        "attention 64x64: fused / diffusers masked, worst n >= 3": True,
        "UNet step sd15-512px: AnyMS / stock time": True,
        "UNet step sd15-512px: AnyMS / stock activation memory": False,
        "evaluation / generation per image, SDXL 1024 px, 30 steps, worst n": True,
    }


@pytest.mark.slow
def test_runner_smoke_writes_the_results_files(tiny_eval_root, monkeypatch, tmp_path):
    monkeypatch.setenv("ANYMS_CACHE", str(tiny_eval_root.parent))
    assert run.main(["--smoke", "--out", str(tmp_path)]) == 0
    (json_file,) = tmp_path.glob("*-smoke.json")
    results = json.loads(json_file.read_text())
    assert {"device", "versions", "git_hash", "attention", "unet_step", "evaluate", "targets"} <= results.keys()
    assert all(SPEC_ATTENTION_KEYS <= r.keys() for r in results["attention"])
    assert all(SPEC_STEP_KEYS <= r.keys() for r in results["unet_step"])
    assert all(SPEC_EVALUATE_KEYS <= r.keys() for r in results["evaluate"])
    assert "## Targets (issue 7)" in json_file.with_suffix(".md").read_text()


def test_evaluate_memory_benchmark_smoke(tiny_eval_root, monkeypatch, tmp_path):
    from benchmarks import evaluate_memory

    monkeypatch.setenv("ANYMS_CACHE", str(tiny_eval_root.parent))  # the session's tiny evaluators
    result = evaluate_memory.measure(counts=(2,), size=64, workdir=tmp_path)  # one evaluate process: the code path
    (row,) = result["rows"]
    assert row["images"] == 2 and row["peak_rss_bytes"] > 2**20 and "2 image(s) scored, 0 already" in row["summary"]
    assert result["ratio"] == 1.0 and "| 2 |" in evaluate_memory.markdown(result)
