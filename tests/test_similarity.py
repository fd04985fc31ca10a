"""eval.similarity: CLIP-I, CLIP-T, DINO and DreamSim scorers on random checkpoints written in the real
layouts (eval.tiny_models) and loaded back through the packages' own loading code.

Oracles are computed here independently of the scorers: open_clip's encode_image / encode_text with the
transform open_clip returns; torchmetrics' CLIPScore on the same weights in transformers' CLIP; DINO's CLS
token from the model with the documented preprocessing written out in PIL / numpy; the dreamsim package's
own model(img_a, img_b) distance. The scores of random models mean nothing, only their agreement does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval import tiny_models
from eval.similarity import ClipScorer, DinoScorer, DreamSimScorer, MissingWeightsError

SUBJECTS = [("dog", "00.jpg"), ("dog", "01.jpg"), ("cat", "00.jpg"), ("backpack", "00.jpg")]
PROMPTS = [
    "a photo of a dog",
    "a dog on the beach",
    "a cat sitting on a sofa",
    "a red backpack on a table",
    "a clock on the wall",
    "sks dog in the snow",
    "a photo",
    "an oil painting of a cat",
]


def _dreambench() -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")]
    if os.environ.get("ANYMS_DATA_ROOT"):
        candidates.insert(0, Path(os.environ["ANYMS_DATA_ROOT"]))
    for root in candidates:
        if all((root / "dreambench" / s / f).is_file() for s, f in SUBJECTS):
            return root / "dreambench"
    return None


def _synthetic(seed: int, size: int = 512) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx, yy, (xx + yy) / 2], -1) * rng.uniform(50, 200, 3) + rng.uniform(0, 55, 3)
    noise = rng.normal(0, 20, (size // 16, size // 16, 3)).repeat(16, 0).repeat(16, 1)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Four subject images: DreamBench's (dog, dog, cat, backpack) when present, else synthetic ones."""
    root = _dreambench()
    if root is None:
        return [_synthetic(i) for i in range(len(SUBJECTS))]
    return [Image.open(root / s / f).convert("RGB") for s, f in SUBJECTS]


# ------------------------------------------------------------------------------------------------ CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return tiny_models.write_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip"))


@pytest.fixture(scope="module")
def clip_scorer(tiny_clip):
    return ClipScorer(tiny_clip.model_name, device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def clip_oracle(tiny_clip):
    """The same checkpoint loaded by open_clip directly: (model, transform, tokenizer)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip.model_name)
    return model.eval(), preprocess, open_clip.get_tokenizer(tiny_clip.model_name)


@torch.no_grad()
def _oracle_clip_image(oracle, ims):
    model, preprocess, _ = oracle
    return model.encode_image(torch.stack([preprocess(im) for im in ims]))


@torch.no_grad()
def _oracle_clip_text(oracle, texts):
    model, _, tokenizer = oracle
    return model.encode_text(tokenizer(texts))


def test_clip_t_is_100x_cosine_of_open_clip_encoders(clip_scorer, clip_oracle, images):
    ims = [images[i % len(images)] for i in range(len(PROMPTS))]
    expected = 100 * F.cosine_similarity(_oracle_clip_image(clip_oracle, ims), _oracle_clip_text(clip_oracle, PROMPTS))
    got = clip_scorer.clip_t(ims, PROMPTS)
    assert len(got) == len(PROMPTS)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)


def test_clip_i_is_100x_cosine_of_open_clip_image_encoder(clip_scorer, clip_oracle, images):
    a, b = images, images[1:] + images[:1]
    expected = 100 * F.cosine_similarity(_oracle_clip_image(clip_oracle, a), _oracle_clip_image(clip_oracle, b))
    np.testing.assert_allclose(clip_scorer.clip_i(a, b), expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(clip_scorer.clip_i(images, images), 100.0, atol=1e-4)


def test_clip_features_are_normalized_and_batch_independent(clip_scorer, tiny_clip, images):
    feats = clip_scorer.image_features(images)  # batch_size=3: two batches
    assert feats.shape == (len(images), tiny_models.TINY_CLIP_CFG["embed_dim"])
    np.testing.assert_allclose(feats.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    one_batch = ClipScorer(tiny_clip.model_name, batch_size=64).image_features(images)
    torch.testing.assert_close(feats, one_batch, atol=1e-5, rtol=0)
    text = clip_scorer.text_features(PROMPTS)
    assert text.shape == (len(PROMPTS), feats.shape[1])
    np.testing.assert_allclose(text.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    # grayscale / RGBA inputs are converted to RGB like open_clip's own transform does
    np.testing.assert_allclose(clip_scorer.clip_i([images[0].convert("L")], [images[0].convert("L")]), 100.0, atol=1e-4)


def test_clip_loads_a_named_config_with_a_checkpoint_file(clip_scorer, tiny_clip, images):
    """create_model_and_transforms(name, pretrained=<file>) path: the tiny config registered by name."""
    import open_clip

    open_clip.add_model_config(tiny_clip.config_file)
    by_file = ClipScorer(tiny_clip.config_name, pretrained=tiny_clip.checkpoint)
    np.testing.assert_allclose(by_file.clip_t(images[:2], PROMPTS[:2]), clip_scorer.clip_t(images[:2], PROMPTS[:2]), atol=1e-4)


def test_clip_t_matches_torchmetrics_clipscore(clip_scorer, tiny_clip, images, tmp_path):
    """torchmetrics' CLIPScore on transformers' CLIP holding the same weights (converted) agrees with CLIP-T.

    torchmetrics clamps scores at 0, so only pairs with a positive cosine are compared (the fixed seed gives
    several). Images are resized to 224 px first, so both processors' resize is the identity and the
    comparison isolates the two CLIP implementations. torchmetrics 1.9.0 does not unwrap the output objects
    that transformers 5 returns from get_image_features / get_text_features (Lightning-AI/torchmetrics#3407,
    fixed upstream by #3408 after 1.9.0): the shim below does what that fix does, return `.pooler_output`.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    hf_dir = tiny_models.write_transformers_clip(tiny_clip.folder, tmp_path / "hf_clip")
    hf_model, processor = CLIPModel.from_pretrained(hf_dir).eval(), CLIPProcessor.from_pretrained(hf_dir)

    class Transformers5Shim(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            out = self.model.get_image_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_text_features(self, *args, **kwargs):
            out = self.model.get_text_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    metric = CLIPScore(model_name_or_path=lambda: (Transformers5Shim(hf_model), processor))
    small = [im.resize((224, 224), Image.BICUBIC) for im in images]
    pairs = [(im, p) for im in small for p in PROMPTS]
    ours = clip_scorer.clip_t([im for im, _ in pairs], [p for _, p in pairs])
    positive = [(pair, score) for pair, score in zip(pairs, ours) if score > 0.5]
    assert len(positive) >= 2, "the seed should give some pairs with a positive cosine"
    for (im, prompt), score in positive[:4]:
        metric.reset()
        metric.update(torch.from_numpy(np.array(im)).permute(2, 0, 1), prompt)
        assert float(metric.compute()) == pytest.approx(score, abs=1e-3)


@pytest.mark.slow
def test_default_clip_resolves_the_openai_tag_offline_and_runs_quickgelu(tmp_path, images):
    """ClipScorer() defaults (ViT-B-32, openai) with the weights in a Hugging Face cache (here a real-size
    random ViT-B-32 where hf_hub_download would have put timm/vit_base_patch32_clip_224.openai): the tag's
    preprocessing and QuickGELU are used, as the OpenAI weights need (open_clip 3.x only warns about it)."""
    import open_clip

    cache = tmp_path / "hf"
    snapshot = tiny_models.hf_cache_snapshot(cache, "timm/vit_base_patch32_clip_224.openai")
    ckpt = tiny_models.write_tiny_open_clip(snapshot, real_size=True)
    try:
        scorer = ClipScorer(cache_dir=cache, local_files_only=True)
        assert type(scorer.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=str(ckpt.checkpoint))
        oracle = (model.eval(), preprocess, open_clip.get_tokenizer("ViT-B-32-quickgelu"))
        expected = 100 * F.cosine_similarity(_oracle_clip_image(oracle, images[:2]), _oracle_clip_text(oracle, PROMPTS[:2]))
        np.testing.assert_allclose(scorer.clip_t(images[:2], PROMPTS[:2]), expected.numpy(), atol=1e-4)
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # 600 MB


def test_clip_pairs_must_match(clip_scorer, images):
    with pytest.raises(ValueError, match="same length"):
        clip_scorer.clip_t(images[:2], PROMPTS[:3])
    with pytest.raises(TypeError):
        clip_scorer.image_features(images[0])


# ------------------------------------------------------------------------------------------------ DINO


def _dino_pixels(im: Image.Image) -> torch.Tensor:
    """The documented preprocessing written out: shorter side to 256 bicubic, center crop 224, ImageNet norm."""
    w, h = im.size
    scale = 256 / min(w, h)
    im = im.convert("RGB").resize((256, int(h * scale)) if w <= h else (int(w * scale), 256), Image.BICUBIC)
    w, h = im.size
    left, top = int(round((w - 224) / 2)), int(round((h - 224) / 2))
    x = np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], dtype=np.float32)) / np.array([0.229, 0.224, 0.225], dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    return tiny_models.write_tiny_dino(tmp_path_factory.mktemp("tiny_dino"))


def test_dino_is_100x_cosine_of_cls_tokens(tiny_dino, images):
    from transformers import ViTModel

    scorer = DinoScorer(tiny_dino, device="cpu", batch_size=3)
    a, b = images, images[::-1]
    np.testing.assert_allclose(scorer.similarity(images, images), 100.0, atol=1e-4)
    oracle = ViTModel.from_pretrained(tiny_dino).eval()
    with torch.no_grad():
        cls = lambda ims: oracle(pixel_values=torch.stack([_dino_pixels(im) for im in ims])).last_hidden_state[:, 0]  # noqa: E731
        expected = 100 * F.cosine_similarity(cls(a), cls(b))
    np.testing.assert_allclose(scorer.similarity(a, b), expected.numpy(), atol=1e-3)
    # non-square input: the short side goes to 256, then the center 224 crop
    wide = images[0].resize((400, 300))
    with torch.no_grad():
        expected_wide = 100 * F.cosine_similarity(cls([wide]), cls([images[1]]))
    np.testing.assert_allclose(scorer.similarity([wide], [images[1]]), expected_wide.numpy(), atol=1e-3)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    return tiny_models.write_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2"))


def test_dinov2_loads_strictly_and_equals_dinov2model(tiny_dinov2, tiny_dino, images):
    """The AnyMS paper's DINO is DINOv2 (issue 15, item 6): loaded through Dinov2Model with every key, its
    features are Dinov2Model's own; read by ViTModel (the old path) its LayerScale would be re-initialized."""
    from transformers import Dinov2Model

    scorer = DinoScorer(tiny_dinov2, backend="dinov2", device="cpu")
    assert scorer.backbone == f"DINOv2 {tiny_dinov2}"
    oracle, info = Dinov2Model.from_pretrained(tiny_dinov2, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert all(not torch.allclose(p, torch.ones_like(p)) for n, p in oracle.named_parameters() if "layer_scale" in n)
    with torch.no_grad():
        cls = oracle.eval()(pixel_values=torch.stack([_dino_pixels(im) for im in images])).last_hidden_state[:, 0]
    np.testing.assert_allclose(scorer.features(images).numpy(), F.normalize(cls, dim=-1).numpy(), atol=1e-5)
    # the wrong class for the checkpoint is refused, naming the keys, both ways
    with pytest.raises(ValueError, match=r"does not match ViTModel .*keys.*backend: dinov2"):
        DinoScorer(tiny_dinov2, backend="transformers")
    with pytest.raises(ValueError, match=r"does not match Dinov2Model .*keys.*backend: transformers"):
        DinoScorer(tiny_dino, backend="dinov2")


def _kept_share(transform, aspect: float, resized: int) -> float:
    """The share of a black ``aspect``:1 subject, cut out on white and padded to a square as evaluate does,
    that survives ``transform`` (a PIL image -> [3, S, S] tensor in [0, 1] or a processor's array), which first
    resizes the square to ``resized`` pixels a side."""
    from eval.grounding import subject_crop

    height = 96
    width = round(height * aspect)
    canvas = np.full((300, 500, 3), 255, np.uint8)
    mask = np.zeros(canvas.shape[:2], bool)
    mask[40:40 + height, 20:20 + width] = True
    canvas[mask] = 0
    region = subject_crop(Image.fromarray(canvas), mask)  # padded to a square of side `width`
    pixels = torch.as_tensor(np.asarray(transform(region), dtype=np.float32))
    dark = float((pixels.mean(0) < 0.5).sum())
    return dark / (resized * resized / aspect)  # the subject's whole area after the resize


def test_what_of_a_wide_subject_each_encoder_sees():
    """Issue 24: the square padding keeps a full-width subject whole for CLIP (resize 224, crop 224), but DINO's
    protocol (resize 256, centre crop 224: DreamBooth's DINO and DINOv2's own processor alike) keeps the middle
    224/256 = 87.5% of the square's side. The README says so with these numbers."""
    import open_clip
    from torchvision import transforms as T
    from transformers import BitImageProcessor

    from eval.similarity import dino_transform

    clip = open_clip.image_transform(open_clip.get_model_config("ViT-B-32")["vision_cfg"]["image_size"], is_train=False)
    clip = T.Compose(clip.transforms[:-1])  # up to the tensor, before the normalization
    dino = T.Compose(dino_transform().transforms[:-1])
    # DINOv2-small's preprocessor_config.json: BitImageProcessor, shortest edge 256, centre crop 224, bicubic
    dinov2_processor = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                         resample=3, do_normalize=False, do_rescale=True, do_convert_rgb=True)

    def dinov2(im):
        return dinov2_processor(im, return_tensors="np")["pixel_values"][0]

    for aspect in (2.0, 3.0, 4.0):  # full width, height within the crop
        assert _kept_share(clip, aspect, 224) == pytest.approx(1.0, abs=0.01)
        assert _kept_share(dino, aspect, 256) == pytest.approx(224 / 256, abs=0.01)
        assert _kept_share(dinov2, aspect, 256) == pytest.approx(224 / 256, abs=0.01)
    assert _kept_share(clip, 1.0, 224) == pytest.approx(1.0, abs=0.01)
    assert _kept_share(dino, 1.0, 256) == pytest.approx((224 / 256) ** 2, abs=0.01)  # a subject that fills its square
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    wide, square = _kept_share(dino, 2.0, 256), _kept_share(dino, 1.0, 256)
    assert f"DINO sees {wide:.1%} of a full-width subject" in readme
    assert f"{square:.1%} of one that fills its square" in readme
    assert "the encoders' centre crop keeps a wide subject whole" not in readme  # a382e8e's claim, wrong for DINO


def test_dino_timm_backend(tmp_path, images):
    import timm

    name = tiny_models.write_tiny_dino_timm(tmp_path / "timm_dino")
    scorer = DinoScorer(name, backend="timm")
    np.testing.assert_allclose(scorer.similarity(images, images), 100.0, atol=1e-4)
    oracle = timm.create_model(name, pretrained=True, num_classes=0).eval()  # forward = final-norm CLS token
    with torch.no_grad():
        cls = lambda ims: oracle(torch.stack([_dino_pixels(im) for im in ims]))  # noqa: E731
        expected = 100 * F.cosine_similarity(cls(images[:2]), cls(images[2:]))
    np.testing.assert_allclose(scorer.similarity(images[:2], images[2:]), expected.numpy(), atol=1e-3)


# -------------------------------------------------------------------------------------------- DreamSim


@pytest.fixture(scope="module")
def dreamsim_cache(tmp_path_factory):
    """Random open_clip_vitb32 DreamSim files (a real-size ViT-B/32: the package's loader hard-codes it)."""
    cache = tiny_models.write_dreamsim_checkpoints(tmp_path_factory.mktemp("dreamsim"), "open_clip_vitb32")
    yield cache
    shutil.rmtree(cache, ignore_errors=True)  # 350 MB: not kept among pytest's retained temp folders


def _package_similarity(model, preprocess, a, b) -> list[float]:
    with torch.no_grad():
        return [100 * (1 - float(model(preprocess(x), preprocess(y)))) for x, y in zip(a, b)]


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # the package wraps peft twice
def test_dreamsim_is_100x_one_minus_package_distance(dreamsim_cache, images):
    from dreamsim import dreamsim

    scorer = DreamSimScorer("open_clip_vitb32", cache_dir=dreamsim_cache, device="cpu", batch_size=2)
    a, b = images[:3], [images[1], images[2], images[2]]  # the last pair is an image with itself
    got = scorer.similarity(a, b)  # batches of 2: a batch of one at the end
    model, preprocess = dreamsim(pretrained=True, device="cpu", cache_dir=str(dreamsim_cache), dreamsim_type="open_clip_vitb32")
    np.testing.assert_allclose(got[:2], _package_similarity(model, preprocess, a[:2], b[:2]), atol=1e-3)
    assert got[2] == pytest.approx(100.0, abs=1e-3)
    assert max(got[:2]) < 99.9, "different images should not score as identical"


@pytest.mark.slow
def test_dreamsim_ensemble_runs_offline(tmp_path, images):
    """The default ensemble (DINO + CLIP + OpenCLIP ViT-B/16, real size, random): ~1 GB of files, 30-60 s here.
    DINO's torch.hub load is served from <cache_dir>/checkpoints/ by eval.similarity.dino_hub_redirect."""
    cache = tiny_models.write_dreamsim_checkpoints(tmp_path / "dreamsim_ensemble", "ensemble")
    try:
        hub_dir = torch.hub.get_dir()
        scorer = DreamSimScorer("ensemble", cache_dir=cache)
        assert torch.hub.get_dir() == hub_dir  # dreamsim's set_dir is undone
        got = scorer.similarity([images[0], images[0]], [images[2], images[0]])
        expected = _package_similarity(scorer.model, scorer.preprocess, images[:1], images[2:3])  # package forward
        assert got[0] == pytest.approx(expected[0], abs=1e-3)
        assert got[1] == pytest.approx(100.0, abs=1e-3)
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # ~1 GB


# ----------------------------------------------------------------------------------- missing weights


def _assert_one_clear_error(excinfo, *needles):
    err = excinfo.value
    assert err.__cause__ is None and err.__suppress_context__, "raised from None: no chained hub traceback"
    for needle in needles:
        assert needle in str(err)


def test_missing_clip_weights_give_one_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError) as excinfo:
        ClipScorer(f"local-dir:{tmp_path / 'nowhere'}")
    _assert_one_clear_error(excinfo, "nowhere", "open_clip_config.json")

    with pytest.raises(MissingWeightsError) as excinfo:
        ClipScorer("ViT-B-32", pretrained=str(tmp_path / "missing.bin"))
    _assert_one_clear_error(excinfo, "ViT-B-32", "missing.bin")

    # the default weights, looked up in an empty cache without touching the network
    with pytest.raises(MissingWeightsError) as excinfo:
        ClipScorer("ViT-B-32", pretrained="openai", cache_dir=tmp_path / "hf", local_files_only=True)
    _assert_one_clear_error(excinfo, "ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai")


def test_missing_dino_weights_give_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "nowhere", tmp_path / "empty"):
        with pytest.raises(MissingWeightsError) as excinfo:
            DinoScorer(where)
        _assert_one_clear_error(excinfo, str(where), "facebook/dino-vits16")
    with pytest.raises(MissingWeightsError) as excinfo:  # a hub id absent from the local cache
        DinoScorer("anyms-tests/no-such-dino", local_files_only=True)
    _assert_one_clear_error(excinfo, "anyms-tests/no-such-dino", "facebook/dino-vits16")
    with pytest.raises(MissingWeightsError) as excinfo:
        DinoScorer(f"local-dir:{tmp_path / 'nowhere'}", backend="timm")
    _assert_one_clear_error(excinfo, "nowhere", "vit_small_patch16_224.dino")


def test_missing_dreamsim_weights_give_one_clear_error(tmp_path, dreamsim_cache):
    with pytest.raises(MissingWeightsError) as excinfo:
        DreamSimScorer("open_clip_vitb32", cache_dir=tmp_path / "empty")
    _assert_one_clear_error(
        excinfo, "open_clip_vitb32", "open_clip_vitb32_pretrain.pth.tar", "dreamsim_open_clip_vitb32_checkpoint.zip"
    )
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir()), "nothing downloaded"
    # the single-backbone files are not the ensemble's; the ensemble also names DINO's torch.hub weights
    with pytest.raises(MissingWeightsError) as excinfo:
        DreamSimScorer("ensemble", cache_dir=dreamsim_cache)
    _assert_one_clear_error(excinfo, "ensemble_lora", "checkpoints/dino_vitbase16_pretrain.pth", "dino_vitbase16_pretrain.pth")
    with pytest.raises(ValueError, match="not supported"):
        DreamSimScorer("dinov2_vitb14", cache_dir=dreamsim_cache)
