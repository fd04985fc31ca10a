"""eval.grounding: GroundingDINO detection with phrase attribution by token span, SAM box segmentation, subject
crops. Models are tiny random ones (eval.tiny_grounding) written in the real layouts and loaded back through
the real loading code; their outputs are noise, so the tests check structure and agreement with oracles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.grounding import (
    Detection,
    HFGroundingDino,
    MissingWeightsError,
    SamSegmenter,
    attribute_queries,
    build_caption,
    phrase_token_spans,
    subject_crop,
)
from eval.tiny_grounding import write_tiny_grounding_dino, write_tiny_sam

PHRASES = ["robot toy", "duck toy", "toy car"]


def _dreambench() -> Path | None:
    root = os.environ.get("ANYMS_DATA_ROOT")
    candidates = [Path(root)] if root else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared")
    for candidate in candidates:
        if (candidate / "dreambench").is_dir():
            return candidate / "dreambench"
    return None


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and far faster when the 2 cores are shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Two RGB images: DreamBench photos (512 px) when present, else seeded noise of two shapes."""
    root = _dreambench()
    out = []
    if root is not None:
        for subject in ("dog", "backpack"):
            files = sorted(p for p in (root / subject).glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
            if files:
                out.append(Image.open(files[0]).convert("RGB"))
    if len(out) < 2:
        rng = np.random.default_rng(0)
        out = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((96, 128, 3), (80, 80, 3))]
    return out


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory) -> Path:
    return write_tiny_grounding_dino(tmp_path_factory.mktemp("tiny_grounding_dino"))


@pytest.fixture(scope="module")
def detector(gdino_dir) -> HFGroundingDino:
    return HFGroundingDino(gdino_dir)


@pytest.fixture(scope="module")
def sam_path(tmp_path_factory) -> Path:
    return write_tiny_sam(tmp_path_factory.mktemp("tiny_sam") / "sam_tiny.pth")


@pytest.fixture(scope="module")
def segmenter(sam_path) -> SamSegmenter:
    return SamSegmenter("tiny", checkpoint=sam_path)


# ------------------------------------------------------------------------------------------ GroundingDINO


def test_tiny_grounding_dino_layout_loads_through_from_pretrained(gdino_dir):
    from transformers import AutoProcessor, GroundingDinoForObjectDetection, GroundingDinoProcessor

    assert (gdino_dir / "config.json").is_file() and (gdino_dir / "model.safetensors").is_file()
    processor = AutoProcessor.from_pretrained(gdino_dir)
    model = GroundingDinoForObjectDetection.from_pretrained(gdino_dir)
    assert isinstance(processor, GroundingDinoProcessor)
    assert model.config.decoder_layers >= 2
    tokenizer = processor.tokenizer
    # the ids GroundingDINO hard-codes to split the caption into phrases
    assert tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"]) == [101, 102, 1012, 1029]
    assert tokenizer.unk_token_id not in tokenizer("robot toy . duck toy . toy car .")["input_ids"]


def test_detect_boxes_valid_and_deterministic(detector, images):
    for image in images:
        detections = detector.detect(image, PHRASES, box_threshold=0.0, text_threshold=0.0)
        assert len(detections) == detector.model.config.num_queries  # thresholds 0 keep every query
        for d in detections:
            assert isinstance(d, Detection)
            x0, y0, x1, y1 = d.box
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
            assert 0 <= d.phrase_index < len(PHRASES) and d.phrase == PHRASES[d.phrase_index]
            assert 0.0 <= d.phrase_score <= d.score <= 1.0
        scores = [d.score for d in detections]
        assert scores == sorted(scores, reverse=True)
        assert detector.detect(image, PHRASES, box_threshold=0.0, text_threshold=0.0) == detections
        # the default thresholds (0.35 / 0.25) keep a subset
        default = detector.detect(image, PHRASES)
        assert (detector.box_threshold, detector.text_threshold) == (0.35, 0.25)
        assert all(d.score >= 0.35 and d.phrase_score > 0.25 for d in default)
        assert set(default) <= set(detections)


def test_detect_matches_transformers_forward(detector, images):
    """Oracle: the model called directly. Boxes = transformers' post-processed (xyxy) boxes, clamped; score =
    max sigmoid logit over the phrase tokens; phrase = argmax of the span means."""
    image = images[0]
    caption = "robot toy . duck toy . toy car ."
    inputs = detector.processor(images=image, text=caption, return_tensors="pt")
    with torch.no_grad():
        outputs = detector.model(**inputs)
    post = detector.processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0
    )[0]
    probs = outputs.logits[0].sigmoid()
    spans = [[1, 2], [4, 5], [7, 8]]  # [CLS] robot toy . duck toy . toy car . [SEP]
    expected = {}
    for q in range(probs.shape[0]):
        box = tuple(round(float(v), 5) for v in post["boxes"][q].clamp(0, 1))
        means = [float(probs[q, s].mean()) for s in spans]
        expected[box] = (float(probs[q, [1, 2, 4, 5, 7, 8]].max()), int(np.argmax(means)))
    detections = detector.detect(image, PHRASES, box_threshold=0.0, text_threshold=0.0)
    got = {tuple(round(v, 5) for v in d.box): (d.score, d.phrase_index) for d in detections}
    assert got.keys() == expected.keys()
    for box, (score, phrase_index) in got.items():
        assert score == pytest.approx(expected[box][0], abs=1e-6)
        assert phrase_index == expected[box][1]


def test_per_phrase_nms(gdino_dir, images):
    from torchvision.ops import box_iou

    detections = HFGroundingDino(gdino_dir, nms_iou=0.3).detect(images[0], PHRASES, 0.0, 0.0)
    assert detections
    for k in range(len(PHRASES)):
        boxes = torch.tensor([d.box for d in detections if d.phrase_index == k])
        if len(boxes) > 1:
            iou = box_iou(boxes, boxes).fill_diagonal_(0)
            assert float(iou.max()) <= 0.3 + 1e-6


def test_caption_and_repeated_phrases(detector, images):
    caption, spans, first = build_caption(["Robot  Toy", "dog", "dog"])
    assert caption == "robot toy . dog ."
    assert [caption[s:e] for s, e in spans] == ["robot toy", "dog"] and first == [0, 1]
    with pytest.raises(ValueError):
        build_caption(["a dog. a cat"])
    detections = detector.detect(images[0], ["dog", "cat", "dog"], 0.0, 0.0)
    assert {d.phrase_index for d in detections} <= {0, 1}


# -------------------------------------------------------------------------------------------- attribution


def _tokenizer(gdino_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(gdino_dir).tokenizer


def test_phrase_token_spans_from_offsets(gdino_dir):
    tokenizer = _tokenizer(gdino_dir)
    caption, char_spans, _ = build_caption(PHRASES)
    spans, input_ids = phrase_token_spans(tokenizer, caption, char_spans, max_text_len=256)
    assert spans == [[1, 2], [4, 5], [7, 8]]
    tokens = tokenizer.convert_ids_to_tokens(input_ids)
    assert [[tokens[t] for t in s] for s in spans] == [["robot", "toy"], ["duck", "toy"], ["toy", "car"]]
    with pytest.raises(ValueError, match="longer than"):
        phrase_token_spans(tokenizer, caption, char_spans, max_text_len=6)


def test_attribution_by_token_span(gdino_dir):
    tokenizer = _tokenizer(gdino_dir)
    caption, char_spans, _ = build_caption(PHRASES)
    spans, input_ids = phrase_token_spans(tokenizer, caption, char_spans)
    # token positions: 0 [CLS] | 1 robot 2 toy | 3 . | 4 duck 5 toy | 6 . | 7 toy 8 car | 9 . | 10 [SEP]
    probs = torch.full((7, len(input_ids)), 0.01)
    probs[0, [1, 2, 4, 5, 7, 8]] = torch.tensor([0.05, 0.90, 0.80, 0.90, 0.05, 0.90])  # "toy" everywhere: duck toy
    probs[1, [1, 2, 4, 5, 7, 8]] = torch.tensor([0.10, 0.95, 0.05, 0.95, 0.95, 0.90])  # toy car
    probs[2, [1, 2, 4, 5, 7, 8]] = torch.tensor([0.85, 0.90, 0.05, 0.90, 0.05, 0.90])  # robot toy
    probs[3, [1, 2, 4, 5, 7, 8]] = torch.tensor([0.05, 0.40, 0.05, 0.40, 0.05, 0.40])  # only "toy": span means 0.225
    probs[4, [1, 2, 4, 5, 7, 8]] = torch.tensor([0.30, 0.20, 0.10, 0.10, 0.10, 0.10])  # score 0.30 < box threshold
    probs[5, [0, 3, 6, 9, 10]] = 0.99  # only [CLS], '.', [SEP] light up: not a phrase token, dropped
    probs[6, [1, 2, 4, 5, 7, 8]] = torch.tensor([0.70, 0.30, 0.60, 0.65, 0.05, 0.05])  # mean: duck toy; max: robot toy
    logits = torch.logit(probs)
    logits = torch.cat([logits, torch.full((7, 245), float("-inf"))], dim=1)  # padding to max_text_len, as the model

    kept = attribute_queries(logits, spans, box_threshold=0.35, text_threshold=0.25, span_reduce="mean")
    by_query = {q: (k, score, phrase_score) for q, k, score, phrase_score in kept}
    assert sorted(by_query) == [0, 1, 2, 6]  # 3 (text threshold), 4 (box threshold), 5 (special tokens) dropped
    assert {q: k for q, (k, _, _) in by_query.items()} == {0: 1, 1: 2, 2: 0, 6: 1}
    assert by_query[0][1] == pytest.approx(0.90) and by_query[0][2] == pytest.approx(0.85)
    assert by_query[1][1] == pytest.approx(0.95) and by_query[1][2] == pytest.approx(0.925)

    # the same query 3 is kept once the text threshold is under its best span mean
    assert 3 in {q for q, *_ in attribute_queries(logits, spans, 0.35, 0.2, "mean")}
    # span max instead of mean: query 6 goes to "robot toy" (0.70 > 0.65), and the shared "toy" (0.90 in every
    # span) ties query 0 across the three phrases, so it falls to the first: why the mean is the default. With
    # the max the text threshold (0.25) never bites above the box threshold (0.35): query 3 is kept
    by_max = {q: k for q, k, *_ in attribute_queries(logits, spans, 0.35, 0.25, "max")}
    assert by_max == {0: 0, 1: 0, 2: 0, 3: 0, 6: 0}
    with pytest.raises(ValueError):
        attribute_queries(logits, spans, span_reduce="median")


# -------------------------------------------------------------------------------------------------- SAM


def test_tiny_sam_loads_its_checkpoint(segmenter, sam_path):
    state = torch.load(sam_path, map_location="cpu")
    model_state = segmenter.predictor.model.state_dict()
    assert state.keys() == model_state.keys()
    assert all(torch.equal(state[k], model_state[k]) for k in state)


def test_sam_batched_boxes_equal_single_box_calls(segmenter, images):
    boxes = np.array([[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.95], [0.0, 0.5, 0.4, 1.0]], dtype=np.float32)
    for image in images:
        width, height = image.size
        masks = segmenter.segment(image, boxes)
        assert masks.shape == (3, height, width) and masks.dtype == bool
        assert 0 < masks.sum() < masks.size  # the random model still gives non-trivial masks
        predictor = segmenter.predictor
        predictor.set_image(np.asarray(image))
        for i, box in enumerate(boxes):
            single, _, _ = predictor.predict(box=box * [width, height, width, height], multimask_output=False)
            assert single.shape == (1, height, width)
            mismatch = np.mean(single[0] != masks[i])
            assert mismatch <= 1e-4, mismatch  # equal up to a float tie on the 0 threshold
    assert segmenter.segment(images[0], np.zeros((0, 4))).shape == (0, images[0].size[1], images[0].size[0])


# ---------------------------------------------------------------------------------------------- crops


def test_subject_crop_mask_and_box():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 250, (48, 64, 3), dtype=np.uint8)  # no pure white inside
    image = Image.fromarray(pixels)
    yy, xx = np.mgrid[:48, :64]
    mask = ((xx - 30) / 12.0) ** 2 + ((yy - 20) / 9.0) ** 2 <= 1.0  # ellipse: x 18..42, y 11..29
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = subject_crop(image, mask, box=(0.0, 0.0, 1.0, 1.0), square=False)
    assert crop.size == (cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)
    got = np.asarray(crop)
    sub_mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    sub_pixels = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    assert (got[~sub_mask] == 255).all()
    assert (got[sub_mask] == sub_pixels[sub_mask]).all()
    # an empty mask falls back on the box crop
    empty = subject_crop(image, np.zeros((48, 64), dtype=bool), box=(0.25, 0.5, 0.75, 1.0), square=False)
    assert empty.size == (32, 24)
    assert (np.asarray(empty) == pixels[24:48, 16:48]).all()
    with pytest.raises(ValueError):
        subject_crop(image, np.ones((10, 10), dtype=bool))


def test_a_wide_crop_is_padded_to_a_square_and_the_encoder_sees_all_of_it():
    """Sunglasses-like 4:1 crop: resize-then-centre-crop preprocessing (CLIP, DINO, DreamSim) of the raw crop
    keeps a quarter of its width; padded on white it keeps all of it (issue 15, item 7)."""
    from torchvision import transforms as T

    pixels = np.zeros((100, 400, 3), np.uint8)
    pixels[:, :, 0] = np.linspace(0, 249, 400, dtype=np.uint8)[None]  # a horizontal ramp: the columns are tellable
    image = Image.fromarray(pixels)
    mask = np.ones((100, 400), bool)
    crop = subject_crop(image, mask, square=True)
    assert crop.size == (400, 400)
    got = np.asarray(crop)
    assert (got[:150] == 255).all() and (got[250:] == 255).all() and (got[150:250] == pixels).all()
    preprocess = T.Compose([T.Resize(224), T.CenterCrop(224)])  # the encoders' resize + centre crop
    seen_raw = np.asarray(preprocess(subject_crop(image, mask, square=False)))[..., 0]
    seen_pad = np.asarray(preprocess(crop))[..., 0]
    ramp = seen_pad[112]  # the middle row of the padded view holds the whole ramp
    assert ramp.min() <= 5 and ramp.max() >= 240  # both ends of the ramp: the full width
    assert seen_raw.min() > 80 and seen_raw.max() < 170  # the raw crop shows only its middle quarter


def test_crop_of_segmented_detection(detector, segmenter, images):
    image = images[0]
    detections = detector.detect(image, PHRASES, 0.0, 0.0)[:2]
    masks = segmenter.segment(image, [d.box for d in detections])
    for d, mask in zip(detections, masks):
        crop = subject_crop(image, mask, d.box)
        assert crop.mode == "RGB" and crop.size[0] >= 1 and crop.size[1] >= 1


# ------------------------------------------------------------------------------------------ missing weights


def test_missing_sam_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        SamSegmenter("vit_h", checkpoint=tmp_path / "sam_vit_h_4b8939.pth")
    message = str(info.value)
    assert "vit_h" in message and "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(ValueError, match="unknown SAM model type"):
        SamSegmenter("vit_xxl", checkpoint=tmp_path / "x.pth")


def test_missing_grounding_dino_is_one_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="GroundingDINO") as info:
        HFGroundingDino(tmp_path / "no_such_folder")
    assert "IDEA-Research/grounding-dino-tiny" in str(info.value)
    with pytest.raises(MissingWeightsError, match="GroundingDINO"):  # a hub id that is not in the cache
        HFGroundingDino("IDEA-Research/no-such-grounding-dino", local_files_only=True)


def test_box_conversion_clamps_to_the_image():
    from eval.grounding import cxcywh_to_xyxy

    boxes = cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.05, 0.9, 0.3, 0.4]]))
    assert torch.allclose(boxes, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.7, 0.2, 1.0]]))
