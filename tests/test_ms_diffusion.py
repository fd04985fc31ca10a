"""MS-Diffusion as a native baseline (anyms/methods/ms_diffusion.py): grounding tokens, the multi-subject masked
cross-attention against an oracle of its rules, the released checkpoint's layout, generation on the tiny
models, and the contrast with AnyMS in overlapping boxes."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import runfolder
from anyms.core.attention import image_attention
from anyms.generation.generate import load_model, run_generation
from anyms.core.layout import Layout, Subject
from anyms.methods.ms_diffusion import (
    CHECKPOINT_KEYS,
    GroundingResampler,
    build_adapter,
    fourier_box_embedding,
    ms_attention_bias,
    ms_image_attention,
    resolve_checkpoint,
    subject_weights,
)
from anyms.methods.base import GenerationSettings, ModelLoadError
from anyms.methods.ms_diffusion import MS_DIFFUSION_RESAMPLER, random_ms_diffusion_state_dict, tiny_bigg_image_encoder, write_tiny_ms_diffusion

from .test_generate import make_cfg, needs_data

TOKENS, DUMMY = 16, 4


def tiny_adapter(pipe, encoder, checkpoint=None):
    return build_adapter(pipe, encoder, checkpoint, resampler=MS_DIFFUSION_RESAMPLER)


def subj(name, box, **kw):
    return Subject(name=name, phrase=name, image=None, box=box, **kw)


def official_masks(boxes, h, w):
    """The official rule written out: rows floor(y0*h) .. ceil(y1*h), columns likewise, end exclusive."""
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for j, (x0, y0, x1, y1) in enumerate(boxes):
        masks[j, math.floor(y0 * h):math.ceil(y1 * h), math.floor(x0 * w):math.ceil(x1 * w)] = True
    return masks


def rules_oracle(q, ks, vs, masks, weights, scale):
    """The image term from the rules, query by query, in float64: a query outside every box gets nothing;
    inside, one softmax over the tokens of exactly the subjects whose boxes cover it (no dummy tokens: they
    are masked wherever a box is), each subject's probabilities times its weight."""
    B, H, L, _ = q.shape
    out = torch.zeros(B, H, L, vs[0].shape[-1], dtype=torch.float64)
    for b in range(B):
        for l in range(L):
            cover = [j for j in range(len(ks)) if masks[b, j, l]]
            if not cover:
                continue
            logits = torch.cat([torch.einsum("hd,htd->ht", q[b, :, l].double(), ks[j][b].double()) for j in cover], -1)
            p = torch.softmax(logits * scale, dim=-1)
            values = torch.cat([weights[j] * vs[j][b].double() for j in cover], dim=1)
            out[b, :, l] = torch.einsum("ht,htd->hd", p, values)
    return out


# --- grounding tokens --------------------------------------------------------------------------------------

def test_fourier_box_embedding_against_a_hand_computation():
    box = (0.1, 0.25, 0.6, 0.9)
    expected = []
    for k in range(8):  # frequency-major ...
        f = 100 ** (k / 8)
        for fn in (math.sin, math.cos):  # ... then sin before cos ...
            for c in box:  # ... then the four coordinates
                expected.append(fn(f * c))
    got = fourier_box_embedding(torch.tensor([box]))[0].double()
    assert got.shape == (64,)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=2e-5)
    # a few entries spelled out, so a transposed layout cannot pass by symmetry
    assert got[0].item() == pytest.approx(math.sin(0.1), abs=1e-6)
    assert got[3].item() == pytest.approx(math.sin(0.9), abs=1e-6)
    assert got[4].item() == pytest.approx(math.cos(0.1), abs=1e-6)
    assert got[9].item() == pytest.approx(math.sin(100 ** (1 / 8) * 0.25), abs=1e-6)
    assert got[63].item() == pytest.approx(math.cos(100 ** (7 / 8) * 0.9), abs=2e-5)


def test_grounding_tokens_are_phrase_then_box_through_the_mlp_16_per_subject():
    torch.manual_seed(0)
    res = GroundingResampler(embedding_dim=12, output_dim=10, phrase_dim=6, dim=8, depth=1, dim_head=4, heads=2,
                             num_queries=TOKENS)
    phrase, boxes = torch.randn(2, 6), torch.tensor([[0.1, 0.2, 0.5, 0.7], [0.0, 0.0, 1.0, 1.0]])
    g = res.grounding_input(phrase, boxes)
    assert g.shape == (2, 6 + 64)
    torch.testing.assert_close(g[:, :6], phrase)  # phrase part first
    torch.testing.assert_close(g[:, 6:], fourier_box_embedding(boxes))
    # the MLP (Linear, GELU, Linear) then 16 tokens of width dim, token i = outputs i*dim .. (i+1)*dim, LayerNorm
    lin0, lin2 = res.latent_proj[0], res.latent_proj[2]
    y = F.gelu(g @ lin0.weight.T + lin0.bias) @ lin2.weight.T + lin2.bias
    tokens = torch.stack([y[:, i * 8:(i + 1) * 8] for i in range(TOKENS)], dim=1)
    expected = F.layer_norm(tokens, (8,), res.latent_norm.weight, res.latent_norm.bias)
    torch.testing.assert_close(res.grounding_queries(phrase, boxes), expected)


def test_resampler_against_a_reference_perceiver():
    """The perceiver written out: each layer attends from the latents to [features; latents] (keys and
    values from one projection, keys first), then a feed-forward, both residual; then attention_norm,
    proj_out, norm_out."""
    torch.manual_seed(1)
    heads, dim_head, dim = 2, 4, 8
    res = GroundingResampler(embedding_dim=12, output_dim=10, phrase_dim=6, dim=dim, depth=2, dim_head=dim_head,
                             heads=heads, num_queries=3).double()
    for p in res.parameters():  # LayerNorms off their identity init, so their order matters
        p.data.normal_(0, 0.5)
    feats, phrase, boxes = torch.randn(2, 5, 12).double(), torch.randn(2, 6).double(), torch.rand(2, 4).double()

    lat = res.grounding_queries(phrase, boxes)
    x = feats @ res.proj_in.weight.T + res.proj_in.bias
    for attn, ff in res.layers:
        xn = F.layer_norm(x, (dim,), attn.norm1.weight, attn.norm1.bias)
        ln = F.layer_norm(lat, (dim,), attn.norm2.weight, attn.norm2.bias)
        q = (ln @ attn.to_q.weight.T).view(2, 3, heads, dim_head)
        kv = torch.cat([xn, ln], dim=1) @ attn.to_kv.weight.T
        k, v = kv[..., : heads * dim_head].view(2, 8, heads, dim_head), kv[..., heads * dim_head:].view(2, 8, heads, dim_head)
        w = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim_head), dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 3, heads * dim_head)
        lat = lat + o @ attn.to_out.weight.T
        h = F.layer_norm(lat, (dim,), ff[0].weight, ff[0].bias)
        lat = lat + F.gelu(h @ ff[1].weight.T) @ ff[3].weight.T
    lat = F.layer_norm(lat, (dim,), res.attention_norm.weight, res.attention_norm.bias)
    out = F.layer_norm(lat @ res.proj_out.weight.T + res.proj_out.bias, (10,), res.norm_out.weight, res.norm_out.bias)
    torch.testing.assert_close(res(feats, phrase, boxes), out)


# --- the masked attention ----------------------------------------------------------------------------------

LAYOUT = Layout([subj("a", (0.0, 0.0, 0.5, 0.75)), subj("b", (0.3, 0.25, 0.75, 1.0)), subj("c", (0.6, 0.05, 0.95, 0.4))])


@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (3, 3)])
def test_masked_attention_against_the_rules_oracle(grid):
    h, w = grid
    masks = LAYOUT.box_masks(h, w)
    assert torch.equal(masks, official_masks([s.box for s in LAYOUT], h, w))  # the shared grid rule is the official one
    counts = masks.sum(0)
    if grid != (3, 3):  # the layout has every case at the finer grids
        assert (counts == 0).any() and (counts == 1).any() and (counts >= 2).any()
    g = torch.Generator().manual_seed(sum(grid))
    B, H, D, n = 2, 3, 8, len(LAYOUT)
    q = torch.randn(B, H, h * w, D, generator=g)
    ks = [torch.randn(B, H, TOKENS, D, generator=g) for _ in range(n)]
    vs = [torch.randn(B, H, TOKENS, D, generator=g) for _ in range(n)]
    dummy_k, dummy_v = torch.randn(B, H, DUMMY, D, generator=g), torch.randn(B, H, DUMMY, D, generator=g)
    box_masks = torch.stack([torch.zeros_like(masks), masks]).flatten(2)  # row 0: the unconditional branch, no boxes
    weights = [0.6, 0.9, 0.3]
    ours = ms_image_attention(q, torch.cat([dummy_k, *ks], 2), torch.cat([dummy_v, *vs], 2), box_masks, TOKENS, DUMMY,
                              weights, softmax_scale=D**-0.5)
    expected = rules_oracle(q, ks, vs, box_masks, weights, D**-0.5)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    assert not ours[0].any()  # no boxes, no image term
    outside = (box_masks[1].sum(0) == 0)
    assert not ours[1][:, outside].any()  # outside every box: exactly zero


def test_processor_in_a_tiny_sdxl_unet_against_the_oracle(make_pipeline):
    """Every cross-attention layer: text attention over the text tokens plus the oracle's image term over the
    image tokens (split off the end of the encoder states), at a non-square latent; the unconditional row
    gets the text term alone."""
    pipe = make_pipeline("sdxl")
    encoder = tiny_bigg_image_encoder()
    adapter = tiny_adapter(pipe, encoder, random_ms_diffusion_state_dict(pipe.unet, pipe.text_encoder, encoder))
    state = adapter.state
    latent = (8, 10)
    state.layout, state.latent_hw, state.grounded, state.weights = LAYOUT, latent, [False, True], [0.6, 0.9, 0.3]
    grids = {32: (4, 5), 64: (2, 3)}  # the tiny SDXL's cross-attention levels by width
    g = torch.Generator().manual_seed(0)
    layers = [pipe.unet.get_submodule(n[: -len(".processor")])
              for n in pipe.unet.attn_processors if n.endswith("attn2.processor")]
    assert layers and all(a.processor is adapter.layers[k] for a, k in zip(layers, adapter.layers.keys()))
    for attn in layers:
        width, cross = attn.to_q.in_features, attn.to_k.in_features
        h, w = grids[width]
        hidden = torch.randn(2, h * w, width, generator=g)
        text = torch.randn(2, 77, cross, generator=g)
        image = torch.randn(2, DUMMY + TOKENS * len(LAYOUT), cross, generator=g)
        with torch.no_grad():
            ours = attn.processor(attn, hidden, encoder_hidden_states=torch.cat([text, image], 1))
            H = attn.heads
            split = lambda t: t.view(2, t.shape[1], H, -1).transpose(1, 2)  # noqa: E731
            q = split(attn.to_q(hidden))
            text_term = F.scaled_dot_product_attention(q, split(attn.to_k(text)), split(attn.to_v(text)))
            k_ip, v_ip = split(attn.processor.to_k_ip(image)), split(attn.processor.to_v_ip(image))
            ks = [k_ip[:, :, DUMMY + j * TOKENS: DUMMY + (j + 1) * TOKENS] for j in range(len(LAYOUT))]
            vs = [v_ip[:, :, DUMMY + j * TOKENS: DUMMY + (j + 1) * TOKENS] for j in range(len(LAYOUT))]
            masks = official_masks([s.box for s in LAYOUT], h, w).flatten(1)
            box_masks = torch.stack([torch.zeros_like(masks), masks])
            image_term = rules_oracle(q, ks, vs, box_masks, state.weights, attn.scale).float()
            merged = (text_term + image_term).transpose(1, 2).reshape(2, h * w, -1)
            expected = attn.to_out[1](attn.to_out[0](merged))
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_dummy_tokens_change_nothing_at_inference():
    """Why: the mask lets the dummy tokens be seen only by queries outside every box, and exactly those
    queries' image term is set to zero; boxed queries give them weight exp(-10000) = 0."""
    h, w = 8, 8
    masks = LAYOUT.box_masks(h, w).flatten(1)[None]  # [1, n, L]
    bias, inside = ms_attention_bias(masks, TOKENS, DUMMY)
    dummy_allowed = bias[0, :, :DUMMY] == 0
    assert torch.equal(dummy_allowed, ~inside[0][:, None].expand(-1, DUMMY))  # only background queries see them
    assert (bias[0, ~inside[0], DUMMY:] == -10000).all()  # and background queries see nothing else

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, h * w, 8, generator=g)
    k, v = torch.randn(1, 2, DUMMY + 3 * TOKENS, 8, generator=g), torch.randn(1, 2, DUMMY + 3 * TOKENS, 8, generator=g)
    out = ms_image_attention(q, k, v, masks, TOKENS, DUMMY)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :DUMMY] = 50 * torch.randn(1, 2, DUMMY, 8, generator=g)
    v2[:, :, :DUMMY] = 50 * torch.randn(1, 2, DUMMY, 8, generator=g)
    assert torch.equal(ms_image_attention(q, k2, v2, masks, TOKENS, DUMMY), out)
    # without the zeroing the background would carry the dummy tokens' values: that is all they do
    background = F.scaled_dot_product_attention(q, k2, v2, attn_mask=bias[:, None])[:, :, ~inside[0]]
    assert background.abs().max() > 1 and not out[:, :, ~inside[0]].any()


def test_in_overlaps_ms_diffusion_mixes_subjects_where_anyms_gives_the_token_to_one():
    layout = Layout([subj("dog", (0.0, 0.0, 0.75, 1.0)), subj("glasses", (0.25, 0.25, 0.5, 0.5), role="attribute")])
    h = w = 8
    masks = layout.box_masks(h, w).flatten(1)
    overlap, dog_only = masks.all(0), masks[0] & ~masks[1]
    assert overlap.any() and dog_only.any()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, h * w, 8, generator=g)
    ks = [torch.randn(1, 2, TOKENS, 8, generator=g) for _ in range(2)]
    vs = [torch.randn(1, 2, TOKENS, 8, generator=g) for _ in range(2)]
    dummy = torch.randn(1, 2, DUMMY, 8, generator=g)
    msd = ms_image_attention(q, torch.cat([dummy, *ks], 2), torch.cat([dummy, *vs], 2), masks, TOKENS, DUMMY)
    anyms = image_attention(q, ks, vs, layout, (h, w), mode="fused", scales=[1.0, 1.0])
    own = [F.scaled_dot_product_attention(q, k, v) for k, v in zip(ks, vs)]  # each subject's own softmax

    # where one box covers a token the two methods agree: that subject's own attention
    torch.testing.assert_close(msd[:, :, dog_only], anyms[:, :, dog_only])
    torch.testing.assert_close(msd[:, :, dog_only], own[0][:, :, dog_only])
    # in the overlap AnyMS gives the token to one subject (the attribute: the glasses) ...
    torch.testing.assert_close(anyms[:, :, overlap], own[1][:, :, overlap])
    # ... and MS-Diffusion takes one softmax over both: a mix of the two weighted by their softmax mass
    mass = [torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) for k in ks]
    alpha = torch.sigmoid(mass[0] - mass[1])[..., None]  # the dog's share
    mix = alpha * own[0] + (1 - alpha) * own[1]
    torch.testing.assert_close(msd[:, :, overlap], mix[:, :, overlap], rtol=1e-5, atol=1e-6)
    share = alpha[:, :, overlap]
    assert ((share > 0.02) & (share < 0.98)).float().mean() > 0.5  # a real mix, not a winner
    assert (msd[:, :, overlap] - anyms[:, :, overlap]).abs().max() > 0.1


def test_scale_rule_and_subject_scales():
    s = GenerationSettings(adapter_scale=0.6, full_frame_adapter_scale=0.4)
    objects = Layout([subj("a", (0, 0, 0.5, 1)), subj("b", (0.5, 0, 1, 1), scale=2.0)])
    assert subject_weights(objects, s) == pytest.approx([0.6, 1.2])
    scene = Layout([subj("a", (0.2, 0.2, 0.5, 0.9)), subj("beach", (0, 0, 1, 1), role="background")])
    assert subject_weights(scene, s) == pytest.approx([0.4, 0.4])
    assert subject_weights(scene, GenerationSettings(adapter_scale=0.6)) == pytest.approx([0.6, 0.6])


# --- the checkpoint format -----------------------------------------------------------------------------------

def official_image_proj_keys(depth: int) -> set[str]:
    """The released resampler's parameter names (MS-Diffusion's Resampler in grounding mode)."""
    keys = {"grounding_latents", "latent_proj.0.weight", "latent_proj.0.bias", "latent_proj.2.weight",
            "latent_proj.2.bias", "latent_norm.weight", "latent_norm.bias", "proj_in.weight", "proj_in.bias",
            "attention_norm.weight", "attention_norm.bias", "proj_out.weight", "proj_out.bias", "norm_out.weight",
            "norm_out.bias"}
    for i in range(depth):
        keys |= {f"layers.{i}.0.{k}" for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                               "to_q.weight", "to_kv.weight", "to_out.weight")}
        keys |= {f"layers.{i}.1.{k}" for k in ("0.weight", "0.bias", "1.weight", "3.weight")}
    return keys


def test_released_sizes_build_with_the_official_shapes():
    """The released model's resampler (dim 1280, 20 heads of 64, depth 4, 16 queries) on bigG (1664 wide),
    SDXL (cross-attention 2048) and CLIP-L phrases (768): shapes only, on the meta device."""
    with torch.device("meta"):
        res = GroundingResampler(embedding_dim=1664, output_dim=2048, phrase_dim=768)
    shapes = {k: tuple(v.shape) for k, v in res.state_dict().items()}
    assert set(shapes) == official_image_proj_keys(4)
    assert shapes["latent_proj.0.weight"] == (2 * 832, 832)  # 768 + 8 freqs x sin/cos x 4 coordinates
    assert shapes["latent_proj.2.weight"] == (1280 * 16, 2 * 832)
    assert shapes["proj_in.weight"] == (1280, 1664) and shapes["proj_out.weight"] == (2048, 1280)
    assert shapes["layers.0.0.to_q.weight"] == (1280, 1280) and shapes["layers.0.0.to_kv.weight"] == (2560, 1280)
    assert shapes["layers.0.1.1.weight"] == (5120, 1280) and shapes["grounding_latents"] == (1, 16, 1280)


def test_tiny_checkpoint_has_the_released_layout(tiny_root):
    from diffusers import UNet2DConditionModel

    root = write_tiny_ms_diffusion(tiny_root)
    sd = torch.load(root / "MS-Diffusion" / "ms_adapter.bin", weights_only=True)
    assert set(sd) == set(CHECKPOINT_KEYS)
    assert set(sd["image_proj"]) == official_image_proj_keys(4)
    unet = UNet2DConditionModel.from_pretrained(root / "sdxl", subfolder="unet")
    names = list(unet.attn_processors)
    cross = [i for i, n in enumerate(names) if n.endswith("attn2.processor")]
    assert cross == list(range(1, 2 * len(cross), 2))  # 1, 3, 5, ...: every processor counted, as released
    assert set(sd["ms_adapter"]) == {f"{i}.to_{kv}_ip.weight" for i in cross for kv in "kv"}
    assert sd["dummy_image_tokens"].shape == (1, DUMMY, unet.config.cross_attention_dim)
    assert (root / "MS-Diffusion" / "sd15" / "ms_adapter.bin").is_file()
    # the image encoder's folder is a whole CLIP model, as laion/CLIP-ViT-bigG-14-laion2B-39B-b160k is
    assert json.loads((root / "CLIP-ViT-bigG-14" / "config.json").read_text())["model_type"] == "clip"
    # the tiny hub beside it is untouched: its marker is still the one write_tiny_hub wrote
    assert (root / ".complete").read_text().startswith("tiny random models written by anyms.tiny.write_tiny_hub")


@pytest.mark.parametrize("break_it, message", [
    (lambda sd: sd["image_proj"].pop("latent_norm.weight"), r"part 'image_proj'.*missing keys \['latent_norm.weight'\]"),
    (lambda sd: sd["ms_adapter"].__setitem__("2.to_k_ip.weight", torch.zeros(1)),  # 2: a self-attention layer
     r"part 'ms_adapter'.*unknown keys \['2.to_k_ip.weight'\]"),
    (lambda sd: sd.__setitem__("dummy_image_tokens", torch.zeros(1, 5, 64)),
     r"dummy_image_tokens: file \(1, 5, 64\), model \(1, 4, 64\)"),
    (lambda sd: sd["image_proj"].__setitem__("proj_in.weight", torch.zeros(64, 32)),  # a ViT-H-like encoder's width
     r"proj_in.weight: file \(64, 32\), model \(64, 48\)"),
    (lambda sd: sd.pop("ms_adapter"), r"missing \['ms_adapter'\]"),
    (lambda sd: sd.__setitem__("ip_adapter", {}), r"unknown \['ip_adapter'\]"),
], ids=["missing-key", "unknown-key", "dummy-shape", "encoder-width", "missing-part", "unknown-part"])
def test_strict_loading_names_what_does_not_match(make_pipeline, break_it, message):
    pipe = make_pipeline("sdxl")
    encoder = tiny_bigg_image_encoder()
    sd = random_ms_diffusion_state_dict(pipe.unet, pipe.text_encoder, encoder)
    tiny_adapter(pipe, encoder, sd)  # intact: loads
    break_it(sd)
    with pytest.raises(ModelLoadError, match=message):
        tiny_adapter(make_pipeline("sdxl"), encoder, sd)


def test_phrase_width_must_equal_the_projection_size(make_pipeline):
    pipe = make_pipeline("sdxl")
    pipe.text_encoder.config.projection_dim = 48
    with pytest.raises(ModelLoadError, match=r"pooled output \(32 wide\).*projection_dim = 48"):
        tiny_adapter(pipe, tiny_bigg_image_encoder())


def test_missing_checkpoint_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError,
                       match=r"model 'sdxl': no MS-Diffusion checkpoint 'ms_adapter.bin' in .*check method.weights.sdxl.repo"):
        resolve_checkpoint(str(tmp_path), name="sdxl")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"model 'sdxl': cannot get the MS-Diffusion checkpoint 'ms_adapter.bin' of "
                                             r"'doge1516/MS-Diffusion'.*"
                                             r"huggingface-cli download doge1516/MS-Diffusion ms_adapter.bin"):
        resolve_checkpoint("doge1516/MS-Diffusion", name="sdxl")


def test_image_encoder_without_its_vision_weights_is_refused(tiny_root, tmp_path):
    from safetensors.torch import load_file, save_file

    from anyms.methods.ms_diffusion import load_image_encoder

    root = write_tiny_ms_diffusion(tiny_root)
    encoder = load_image_encoder(str(root / "CLIP-ViT-bigG-14"), name="tiny")
    assert encoder.config.hidden_size == 48
    broken = tmp_path / "bigG"
    shutil.copytree(root / "CLIP-ViT-bigG-14", broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "visual_projection.weight"}, broken / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"lacks weights of its vision tower.*visual_projection.weight"):
        load_image_encoder(str(broken), name="tiny")
    with pytest.raises(ModelLoadError,
                       match=r"cannot load MS-Diffusion's image encoder .*check method.weights.tiny.image_encoder"):
        load_image_encoder(str(tmp_path / "nothing"), name="tiny")


# --- generation ----------------------------------------------------------------------------------------------

@needs_data
def test_round_trip_generates_through_the_real_loader(tmp_path, tiny_root):
    cfg = make_cfg(tmp_path, "method=ms_diffusion", "model=tiny", "benchmark=smoke", tiny_root=tiny_root)
    summary = run_generation(cfg)
    assert summary.generated == ["images/ms_diffusion/c02/0.png", "images/ms_diffusion/c02/1.png"]
    records = runfolder.read_records(tmp_path)
    assert [r["seed"] for r in records] == [0, 1] and {r["method"] for r in records} == {"ms_diffusion"}
    model = records[0]["model"]
    assert model["ms_diffusion"]["weight_name"] == "ms_adapter.bin" and "ip_adapter" not in model
    assert (tmp_path / "images/ms_diffusion/c02/contact_sheet.png").exists()
    assert run_generation(cfg).generated == []  # resumes like every method

    # what was loaded is what the file holds, key for key
    pipeline = load_model(cfg.model, cfg.method)
    on_disk = torch.load(tiny_root / "MS-Diffusion" / "ms_adapter.bin", weights_only=True)
    loaded = pipeline.adapter.checkpoint()
    for part in ("image_proj", "ms_adapter"):
        assert loaded[part].keys() == on_disk[part].keys()
        assert all(torch.equal(loaded[part][k], on_disk[part][k]) for k in on_disk[part])
    assert torch.equal(loaded["dummy_image_tokens"], on_disk["dummy_image_tokens"])


@needs_data
def test_dummy_tokens_change_nothing_in_a_generated_image(tmp_path, tiny_root):
    from anyms.generation.generate import generation_settings
    from anyms.benchmark import load_combinations

    cfg = make_cfg(tmp_path, "method=ms_diffusion", "model=tiny", "benchmark=smoke", "generation.steps=4", tiny_root=tiny_root)
    pipeline = load_model(cfg.model, cfg.method)
    (combo,) = load_combinations(cfg.benchmark, cfg.data_root)
    settings = generation_settings(cfg)
    before = np.asarray(pipeline(combo.prompt, combo.layout, 0, settings).image)
    with torch.no_grad():
        pipeline.adapter.dummy_image_tokens.mul_(-30).add_(5)
    after = np.asarray(pipeline(combo.prompt, combo.layout, 0, settings).image)
    assert np.array_equal(before, after)
    # while the subjects' tokens do matter
    with torch.no_grad():
        bias = pipeline.adapter.image_proj.norm_out.bias
        bias.add_(torch.linspace(-2, 2, bias.numel()))
    assert not np.array_equal(before, np.asarray(pipeline(combo.prompt, combo.layout, 0, settings).image))


@needs_data
def test_zero_scale_is_exactly_the_text_only_image(tmp_path, tiny_root):
    """The text stream sees the text tokens only (the image tokens are split off the end), with the
    pipeline's own prompt encoding: at scale 0 MS-Diffusion is the text-only image."""
    common = ("model=tiny", "benchmark=smoke", "benchmark.seeds=[3]")
    run_generation(make_cfg(tmp_path, "method=ms_diffusion", "method.adapter_scale=0", *common, tiny_root=tiny_root))
    run_generation(make_cfg(tmp_path, "method=text_only", *common, tiny_root=tiny_root))
    run_generation(make_cfg(tmp_path / "full", "method=ms_diffusion", *common, tiny_root=tiny_root))
    zero, text, full = (np.asarray(Image.open(p / "c02/3.png"), dtype=int) for p in
                        (tmp_path / "images/ms_diffusion", tmp_path / "images/text_only", tmp_path / "full/images/ms_diffusion"))
    assert np.abs(zero - text).max() <= 1
    assert np.abs(full - text).max() > 5


@needs_data
def test_sd15_has_no_ms_diffusion_weights(tmp_path):
    cfg = make_cfg(tmp_path, "method=ms_diffusion", "model=sd15", "benchmark=smoke")
    with pytest.raises(ModelLoadError, match=r"method 'ms_diffusion' has no MS-Diffusion weights for model 'sd15'.*model=sdxl"):
        run_generation(cfg)
