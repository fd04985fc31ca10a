"""The AnyMS processor inside tiny SD1.5-like and SDXL-like UNets, against diffusers' own processors."""

import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from safetensors.torch import save_file

from anyms.core.attention import AnyMSAttnProcessor, install, uninstall
from anyms.core.layout import Layout, LayoutWarning, Subject
from anyms.tiny import random_ip_adapter_state_dict

SIZE = 64  # pixels: an 8x8 latent
LATENT = (SIZE // 8, SIZE // 8)


def subj(name, box, scale=1.0, role="object"):
    return Subject(name=name, phrase=name, image=None, box=box, role=role, scale=scale)


def load_adapter(pipe, plus=False, seed=0):
    sd = random_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, plus=plus, seed=seed)
    pipe.load_ip_adapter(sd, subfolder=None, weight_name="tiny.bin")


def embeds_for(pipe, images):
    # diffusers' own encoding, with CFG: [negative; positive] along the batch
    return pipe.prepare_ip_adapter_image_embeds(
        ip_adapter_image=[images], ip_adapter_image_embeds=None, device="cpu", num_images_per_prompt=1,
        do_classifier_free_guidance=True,
    )


def latents(pipe, embeds, **kw):
    out = pipe(
        "a photo of a dog and a cat", ip_adapter_image_embeds=embeds, num_inference_steps=2, height=SIZE,
        width=SIZE, guidance_scale=7.5, output_type="latent", generator=torch.Generator().manual_seed(0), **kw,
    )
    return out.images


def cross_attention_layers(unet):
    return [unet.get_submodule(n[: -len(".processor")]) for n in unet.attn_processors if n.endswith("attn2.processor")]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("plus", [False, True], ids=["base", "plus"])
def test_one_full_frame_subject_equals_the_stock_ip_adapter(make_pipeline, subject_images, kind, plus):
    pipe = make_pipeline(kind)
    load_adapter(pipe, plus=plus)
    pipe.set_ip_adapter_scale(0.6)
    embeds = embeds_for(pipe, subject_images[:1])
    stock = latents(pipe, embeds)
    install(pipe.unet, "fused", Layout([subj("dog", (0, 0, 1, 1))]), LATENT)
    anyms = latents(pipe, embeds)
    torch.testing.assert_close(anyms, stock, rtol=1e-5, atol=1e-5)
    # and the image term is really there: without it the result differs
    pipe.set_ip_adapter_scale(0.0)
    assert not torch.allclose(latents(pipe, embeds), stock, atol=1e-4)


@pytest.mark.parametrize("kind, step", [("sd15", 0.25), ("sdxl", 0.5)])
def test_masked_sum_equals_diffusers_masked_ip_adapter(make_pipeline, subject_images, kind, step):
    """Eq. 7 is what diffusers computes with ``ip_adapter_masks``. Box edges sit on the coarsest
    cross-attention grid (4x4 for the SD1.5-like model, 2x2 for the SDXL-like one) and the masks are given
    at image size, so diffusers' bicubic downsampling (8x and more) stays exactly 0/1 at every level."""
    pipe = make_pipeline(kind)
    load_adapter(pipe)
    subjects = [subj("left", (0, 0, 2 * step, 1), 0.8), subj("right", (1 - 2 * step, 0, 1, 1), 0.5),
                subj("bottom", (0, 1 - step, 1, 1), 1.2)]
    embeds = embeds_for(pipe, subject_images[:3])
    masks = torch.zeros(1, 3, SIZE, SIZE)
    for j, s in enumerate(subjects):
        x0, y0, x1, y1 = (round(c * SIZE) for c in s.box)
        masks[0, j, y0:y1, x0:x1] = 1
    pipe.set_ip_adapter_scale([[s.scale for s in subjects]])
    stock_masked = latents(pipe, embeds, cross_attention_kwargs={"ip_adapter_masks": [masks]})
    pipe.set_ip_adapter_scale(1.0)
    assert not torch.allclose(stock_masked, latents(pipe, embeds), atol=1e-4)  # the masks matter here

    install(pipe.unet, "masked_sum", Layout(subjects), LATENT)
    ours = latents(pipe, embeds)
    torch.testing.assert_close(ours, stock_masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_joint_mode_equals_diffusers_default_multi_image(make_pipeline, subject_images, kind):
    pipe = make_pipeline(kind)
    load_adapter(pipe)
    embeds = embeds_for(pipe, subject_images[:2])
    stock = latents(pipe, embeds)
    install(pipe.unet, "joint", Layout([subj("a", (0, 0, 0.5, 1)), subj("b", (0.5, 0, 1, 1))]), LATENT)
    torch.testing.assert_close(latents(pipe, embeds), stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("plus", [False, True], ids=["base", "plus"])
def test_queries_outside_all_boxes_get_exactly_the_text_only_output(make_pipeline, kind, plus):
    pipe = make_pipeline(kind)
    load_adapter(pipe, plus=plus)
    layout = Layout([subj("a", (0, 0, 0.5, 0.5)), subj("b", (0.25, 0.25, 0.5, 1.0))])
    install(pipe.unet, "fused", layout, LATENT)
    g = torch.Generator().manual_seed(0)
    n_tokens = pipe.unet.encoder_hid_proj.image_projection_layers[0].num_image_text_embeds if not plus else 16
    outside = ~layout.box_masks(*LATENT).any(0).flatten()
    layers = cross_attention_layers(pipe.unet)
    assert layers and all(isinstance(a.processor, AnyMSAttnProcessor) for a in layers)
    for attn in layers:
        width, cross = attn.to_q.in_features, attn.to_k.in_features
        hidden = torch.randn(2, LATENT[0] * LATENT[1], width, generator=g)
        text = torch.randn(2, 77, cross, generator=g)
        image = torch.randn(2, 2, n_tokens, cross, generator=g)
        with torch.no_grad():
            ours = attn.processor(attn, hidden, encoder_hidden_states=(text, [image]))
            text_only = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=text)
        torch.testing.assert_close(ours[:, outside], text_only[:, outside], rtol=0, atol=1e-6)
        assert not torch.allclose(ours[:, ~outside], text_only[:, ~outside], atol=1e-4)


def test_self_attention_layers_are_untouched_and_uninstall_restores_the_stock(make_pipeline):
    pipe = make_pipeline("sdxl")
    load_adapter(pipe)
    before = dict(pipe.unet.attn_processors)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    install(pipe.unet, "fused", Layout([subj("a", (0, 0, 1, 1))]), LATENT)
    after = pipe.unet.attn_processors
    for name, proc in after.items():
        if name.endswith("attn1.processor"):
            assert proc is before[name]
        else:
            assert isinstance(proc, AnyMSAttnProcessor) and proc.to_k_ip is before[name].to_k_ip
    state = pipe.unet.state_dict()
    assert state.keys() == weights.keys()  # same parameters under the same names
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    uninstall(pipe.unet)
    assert all(pipe.unet.attn_processors[n] is p for n, p in before.items())
    # diffusers' own unloading works with AnyMS installed too
    install(pipe.unet, "fused", Layout([subj("a", (0, 0, 1, 1))]), LATENT)
    pipe.unload_ip_adapter()
    assert not any(isinstance(p, IPAdapterAttnProcessor2_0) for p in pipe.unet.attn_processors.values())


def test_two_pipelines_keep_their_own_layouts(make_pipeline, subject_images):
    a, b = make_pipeline("sd15"), make_pipeline("sd15")
    load_adapter(a)
    load_adapter(b)
    state_a = install(a.unet, "fused", Layout([subj("x", (0, 0, 0.5, 1))]), LATENT)
    state_b = install(b.unet, "fused", Layout([subj("y", (0.5, 0, 1, 1))]), LATENT)
    assert state_a is not state_b and state_a.layout.names == ["x"] and state_b.layout.names == ["y"]
    embeds = embeds_for(a, subject_images[:1])
    assert not torch.allclose(latents(a, embeds), latents(b, embeds), atol=1e-4)


def test_load_through_a_hub_layout_folder(make_pipeline, tmp_path, subject_images):
    """The real loading path: an h94/IP-Adapter-like folder with models/image_encoder and a
    safetensors adapter, read by diffusers' load_ip_adapter."""
    pipe = make_pipeline("sd15")
    encoder = pipe.image_encoder
    sd = random_ip_adapter_state_dict(pipe.unet, encoder, plus=True)
    flat = {f"{part}.{k}": v.contiguous() for part, d in sd.items() for k, v in d.items()}
    (tmp_path / "models").mkdir()
    save_file(flat, tmp_path / "models" / "ip-adapter-plus_sd15.safetensors")
    encoder.save_pretrained(tmp_path / "models" / "image_encoder")
    pipe.image_encoder = None
    pipe.register_modules(image_encoder=None)
    pipe.load_ip_adapter(str(tmp_path), subfolder="models", weight_name="ip-adapter-plus_sd15.safetensors")
    assert pipe.image_encoder is not None
    install(pipe.unet, "fused", Layout([subj("a", (0, 0, 0.5, 1)), subj("b", (0.5, 0, 1, 1))]), LATENT)
    out = latents(pipe, embeds_for(pipe, subject_images[:2]))
    assert torch.isfinite(out).all()


def test_mismatched_subject_count_and_missing_state_are_clear_errors(make_pipeline, subject_images):
    pipe = make_pipeline("sd15")
    load_adapter(pipe)
    embeds = embeds_for(pipe, subject_images[:3])
    state = install(pipe.unet, "fused", Layout([subj("a", (0, 0, 0.5, 1)), subj("b", (0.5, 0, 1, 1))]), LATENT)
    with pytest.raises(ValueError, match=r"image embeddings of 3 subjects but the layout has 2 \(\['a', 'b'\]\)"):
        latents(pipe, embeds)
    state.layout = None
    with pytest.raises(RuntimeError, match="no layout"):
        latents(pipe, embeds_for(pipe, subject_images[:2]))
    with pytest.raises(ValueError, match="load an IP-Adapter first"):
        install(make_pipeline("sd15").unet)


def test_non_square_latent(make_pipeline, subject_images):
    pipe = make_pipeline("sdxl")
    load_adapter(pipe)
    layout = Layout([subj("a", (0, 0, 0.4, 1)), subj("b", (0.3, 0.2, 1, 0.9))])
    install(pipe.unet, "fused", layout, (SIZE // 8, 80 // 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayoutWarning)
        out = pipe("a dog", ip_adapter_image=[subject_images[:2]], num_inference_steps=2, height=SIZE, width=80,
                   output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert out.shape[-2:] == (8, 10) and torch.isfinite(out).all()
