"""Attention maps (paper Fig. 7): the recorder against a direct einsum computation from the processors'
inputs, "attention in box", byte-identical images with recording on, and the stage end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anyms.core.attention_maps import AttentionMapSettings, phrase_token_positions
from anyms.generation.generate import load_model
from anyms.core.layout import Layout, Subject, grid_for
from anyms.methods.base import GenerationSettings
from eval.attention import in_box_share
from runfolder.attention_maps import AttentionMapsError, check_attention_maps, grid_key

from .test_generate import DATA, make_cfg

SETTINGS = GenerationSettings(steps=2, guidance_scale=7.5, height=128, width=128)
PROMPT = "a dog wearing pink sunglasses in the snow"


def two_subjects(images) -> Layout:
    """Overlapping boxes (the sunglasses on the dog) and tokens outside every box."""
    return Layout([Subject("dog", "dog", images[0], (0.10, 0.20, 0.70, 0.95)),
                   Subject("glasses", "sunglasses", images[2], (0.25, 0.25, 0.60, 0.45), role="attribute")])


@pytest.fixture(scope="module")
def pipelines(tiny_root, tmp_path_factory):
    """The tiny SDXL-like model with its IP-Adapter, and with MS-Diffusion, loaded by the real loaders."""
    run = tmp_path_factory.mktemp("run")
    cfg = make_cfg(run, tiny_root=tiny_root)
    ms = make_cfg(run, "method=ms_diffusion", tiny_root=tiny_root)
    return {"anyms": load_model(cfg.model, cfg.method), "ms_diffusion": load_model(ms.model, ms.method)}


def capture_cross_attention_inputs(unet):
    """Forward pre-hooks on every cross-attention layer: what each call received, in call order."""
    calls, handles = [], []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            def hook(mod, args, kwargs, name=name):
                calls.append((name, mod, args[0].detach().clone(), kwargs["encoder_hidden_states"]))
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


def oracle_maps(calls, layout, latent_hw, grids, positions, attention):
    """Per grid, the maps written out from the definitions with einsum and softmax: conditional row only
    (diffusers puts it second under CFG), heads averaged, then layers and steps averaged."""
    sums, counts = {}, {}
    owner = {g: layout.owner_map(*g).flatten() for g in grids}
    for _, attn, hidden, enc in calls:
        g = grid_for(hidden.shape[1], latent_hw)
        if g not in grids:
            continue
        text, (embeds,) = enc
        H = attn.heads
        proc = attn.processor  # the call is over: the original processor is back
        with torch.no_grad():
            q = attn.to_q(hidden)[1:].unflatten(-1, (H, -1))  # [1, L, H, D]
            k = attn.to_k(text)[1:].unflatten(-1, (H, -1))
            p_text = torch.einsum("blhd,bthd->bhlt", q, k).mul(attn.scale).softmax(-1)[0]  # [H, L, 77]
            text_map = torch.stack([p_text[..., pos].sum(-1).mean(0) for pos in positions])  # [n, L]
            k_ip = proc.to_k_ip[0](embeds[1:]).unflatten(-1, (H, -1))[0]  # [n, T, H, D]
            logits = torch.einsum("lhd,nthd->nhlt", q[0], k_ip) * attn.scale  # [n, H, L, T]
            if attention == "ip_adapter_joint":  # one softmax over every subject's tokens
                n, _, L, T = logits.shape
                joint = logits.permute(1, 2, 0, 3).reshape(H, L, n * T).softmax(-1).reshape(H, L, n, T)
                image_map = joint.sum(-1).mean(0).T
            else:  # a softmax per subject, seen where the mode lets the query see it
                image_map = logits.softmax(-1).sum(-1).mean(1)
                if attention == "fused":
                    image_map = image_map * torch.stack([owner[g] == j for j in range(len(layout))])
        s = sums.setdefault(g, [0, 0])
        s[0], s[1] = s[0] + image_map, s[1] + text_map
        counts[g] = counts.get(g, 0) + 1
    return {g: (s[0] / counts[g], s[1] / counts[g]) for g, s in sums.items()}


@pytest.mark.parametrize("attention", ["fused", "sum", "ip_adapter_joint"])
def test_recorder_equals_a_direct_computation_from_the_processors_inputs(attention, pipelines, subject_images):
    pipe = pipelines["anyms"]
    layout = two_subjects(subject_images)
    calls, handles = capture_cross_attention_inputs(pipe.pipe.unet)
    try:
        result = pipe(PROMPT, layout, 0, SETTINGS, attention=attention, record=AttentionMapSettings())
    finally:
        for h in handles:
            h.remove()
    maps = result.attention_maps
    check_attention_maps(maps, "recorded", n_subjects=2)
    grids = [tuple(g) for g in maps["grids"].tolist()]
    assert grids == [(8, 8), (4, 4)]  # the tiny SDXL at 128 px: 1/2 and 1/4 of its 16x16 latent
    assert maps["steps"].tolist() == [0, 1] and str(maps["method"]) == attention
    positions = [phrase_token_positions(pipe.pipe.tokenizer, PROMPT, s.phrase) for s in layout]
    assert [len(p) for p in positions] == [1, 1] and positions[0] < positions[1]
    expected = oracle_maps(calls, layout, result.latent_hw, grids, positions, attention)
    assert set(expected) == set(grids)
    for g in grids:
        image, text = expected[g]
        key = grid_key(*g)
        torch.testing.assert_close(torch.from_numpy(maps[f"image_{key}"]).flatten(1), image.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(maps[f"text_{key}"]).flatten(1), text.float(), atol=1e-6, rtol=1e-4)
        if attention == "fused":  # exactly zero outside each subject's owned tokens, by construction
            owner = layout.owner_map(*g).numpy()
            for j in range(2):
                assert (maps[f"image_{key}"][j][owner != j] == 0).all()
                assert (maps[f"image_{key}"][j][owner == j] > 0.999).all()


def test_attention_in_box_is_100_for_the_full_method_and_below_for_wo_local(pipelines, subject_images):
    pipe, layout = pipelines["anyms"], two_subjects(subject_images)
    shares = {}
    for attention in ("fused", "sum", "masked_sum", "ip_adapter_joint", "none"):
        maps = pipe(PROMPT, layout, 0, SETTINGS, attention=attention, record=AttentionMapSettings()).attention_maps
        shares[attention] = in_box_share(maps, "image")
    np.testing.assert_array_equal(shares["fused"], [100.0, 100.0])
    np.testing.assert_array_equal(shares["masked_sum"], [100.0, 100.0])
    assert (shares["sum"] < 100).all() and (shares["ip_adapter_joint"] < 100).all()
    # without layout every query sees each subject fully: the share is the box's share of the grid's tokens
    boxes = {g: layout.box_masks(*g).flatten(1).float().mean(1).numpy() * 100 for g in [(8, 8), (4, 4)]}
    np.testing.assert_allclose(shares["sum"], (boxes[(8, 8)] + boxes[(4, 4)]) / 2, rtol=1e-4)
    assert np.isnan(shares["none"]).all()  # text_only: no image term, so no share


def test_ms_diffusion_maps_live_inside_the_boxes_and_share_one_softmax(pipelines, subject_images):
    layout = two_subjects(subject_images)
    maps = pipelines["ms_diffusion"](PROMPT, layout, 0, SETTINGS, record=AttentionMapSettings()).attention_maps
    for h, w in maps["grids"].tolist():
        key = grid_key(h, w)
        image, inside = maps[f"image_{key}"], layout.box_masks(h, w).any(0).numpy()
        assert (image[:, ~inside] == 0).all()  # MS-Diffusion zeroes the image term outside every box
        total = image.sum(0)
        assert (total[inside] <= 1 + 1e-5).all() and (total[inside] > 0).all()  # subjects' share of one softmax
    np.testing.assert_allclose(in_box_share(maps, "image"), [100.0, 100.0])


@pytest.mark.parametrize("kind,attention", [("anyms", "fused"), ("anyms", "ip_adapter_joint"), ("anyms", "sum"),
                                            ("ms_diffusion", "ms_diffusion")])
def test_recording_leaves_the_image_byte_identical(kind, attention, pipelines, subject_images):
    pipe, layout = pipelines[kind], two_subjects(subject_images)
    plain = pipe(PROMPT, layout, 3, SETTINGS, attention=attention)
    recorded = pipe(PROMPT, layout, 3, SETTINGS, attention=attention, record=AttentionMapSettings(steps=(1,)))
    assert plain.attention_maps is None and recorded.attention_maps["steps"].tolist() == [1]
    assert np.array_equal(np.asarray(plain.image), np.asarray(recorded.image))
    after = pipe(PROMPT, layout, 3, SETTINGS, attention=attention)  # the processors are back as they were
    assert np.array_equal(np.asarray(plain.image), np.asarray(after.image))


def test_attention_map_settings_and_files_give_clear_errors():
    with pytest.raises(ValueError, match="attention_maps.levels: 3 is not a power of 2"):
        AttentionMapSettings(levels=(3,))
    with pytest.raises(ValueError, match="attention_maps.steps"):
        AttentionMapSettings(steps=(-1,))
    with pytest.raises(ValueError, match="generation has 2 steps"):
        AttentionMapSettings(steps=(5,)).check_steps(2)
    with pytest.raises(ValueError, match=r"cross-attention only at downsampling factors \[2, 4\]"):
        AttentionMapSettings(levels=(1,)).grids((16, 16), [(8, 8), (4, 4)])
    good = {"subjects": np.array(["a"]), "phrases": np.array(["a"]), "phrase_found": np.array([True]),
            "method": np.array("fused"), "steps": np.array([0]), "grids": np.array([[2, 2]]),
            "image": np.zeros((1, 2, 2)), "text": np.zeros((1, 2, 2)), "image_2x2": np.zeros((1, 2, 2)),
            "text_2x2": np.zeros((1, 2, 2)), "box_2x2": np.ones((1, 2, 2), bool), "layers_2x2": np.array(["l"])}
    check_attention_maps(good, "ok", n_subjects=1)
    with pytest.raises(AttentionMapsError, match="bad.npz: missing array box_2x2"):
        check_attention_maps({k: v for k, v in good.items() if k != "box_2x2"}, "bad.npz")
    with pytest.raises(AttentionMapsError, match="maps of 1 subjects, but the record has 2"):
        check_attention_maps(good, "bad.npz", n_subjects=2)


@pytest.mark.skipif(DATA is None, reason="needs the DreamBench images")
def test_generate_with_record_attention_then_evaluate_and_report_draw_the_maps(tmp_path, tiny_root, tiny_eval_root):
    import pandas as pd

    import runfolder
    from anyms.generation.generate import run_generation
    from eval.evaluate import run_evaluation
    from eval.report import run_report

    from .test_evaluate import eval_cfg

    run = tmp_path / "run"
    common = ["benchmark=smoke", "benchmark.seeds=[0]", "generation.steps=2"]
    run_generation(make_cfg(run, "method=anyms", *common, tiny_root=tiny_root))  # first without maps
    png = (run / "images/anyms/c02/0.png").read_bytes()
    for method in ("anyms", "wo_local"):
        summary = run_generation(make_cfg(run, f"method={method}", *common, "record_attention=true", tiny_root=tiny_root))
        assert summary.generated == [f"images/{method}/c02/0.png"]  # the image lacked maps: made again
    assert (run / "images/anyms/c02/0.png").read_bytes() == png  # ... with the same bytes
    umask = runfolder._umask()
    for written in ("images/anyms/c02/0.png", "images/anyms/c02/0.attention.npz"):  # not mkstemp's 0600
        assert (run / written).stat().st_mode & 0o777 == 0o666 & ~umask, written
    again = run_generation(make_cfg(run, "method=anyms", *common, "record_attention=true", tiny_root=tiny_root))
    assert again.skipped == 1 and not again.generated
    records = runfolder.read_records(run)
    assert [r["attention_maps"] for r in records] == ["images/anyms/c02/0.attention.npz",
                                                      "images/wo_local/c02/0.attention.npz"]
    run_evaluation(eval_cfg(run, tiny_root=tiny_eval_root))
    summary = run_report([run], run / "report", {"samples": 20, "ap_samples": 2, "seed": 0},
                         {"enabled": True, "mode": "offline", "project": "anyms-bench-test"}, figures={"attention": 1})
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # the report's run, with the figures
    table = pd.read_csv(run / "report" / "attention.csv").set_index("method")
    assert table.loc["anyms", "attn_in_box_image"] == 100.0 and table.loc["wo_local", "attn_in_box_image"] < 100
    assert "Image attn in box (%)" in (run / "report" / "table1.md").read_text()
    assert summary["attention_figures"] == ["c02-seed0-anyms.png", "c02-seed0-methods.png", "c02-seed0-wo_local.png"]
    # a broken maps file is named, not a stack trace from numpy
    (run / "images/anyms/c02/0.attention.npz").write_bytes(b"not a zip")
    with pytest.raises(runfolder.RunFolderError, match=r"0\.attention\.npz: not a readable \.npz"):
        run_report([run], run / "report2", {"samples": 5, "ap_samples": 1, "seed": 0})


def test_the_recorder_asks_each_processor_and_never_its_class(pipelines, subject_images):
    """Any processor that answers ``split_encoder_states`` and ``subject_attention_weights`` is recorded by what it
    answers (here a constant), whatever its class; one that does not answer gets a zero image map."""

    class Answers:  # not a diffusers or AnyMS class: delegates the call, answers the recorder
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        def split_encoder_states(self, encoder_hidden_states):
            return self.inner.split_encoder_states(encoder_hidden_states)

        def subject_attention_weights(self, attn, query, image_input, layout, grid, rows, split_heads):
            return query.new_full((len(layout), *query.shape[:3]), 0.25)

    class Silent(Answers):  # answers nothing
        split_encoder_states = subject_attention_weights = None

    pipe = pipelines["anyms"]
    unet = pipe.pipe.unet
    original = dict(unet.attn_processors)
    layout = two_subjects(subject_images)
    try:
        for wrapper, expected in [(Answers, 0.25), (Silent, 0.0)]:
            unet.set_attn_processor({k: wrapper(p) if k.endswith("attn2.processor") else p for k, p in original.items()})
            maps = pipe(PROMPT, layout, 0, SETTINGS, attention="fused", record=AttentionMapSettings()).attention_maps
            np.testing.assert_allclose(maps["image"], expected, atol=1e-6)
            assert maps["text"].any()
    finally:
        unet.set_attn_processor(original)
