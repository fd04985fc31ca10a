"""Grounding of the evaluation (DESIGN.md section 3): detect each subject phrase in a generated image with
GroundingDINO, segment each detection with SAM, and cut out the subject region the identity metrics compare.

Conventions:

- A box is ``(x0, y0, x1, y1)`` normalized to [0, 1] by the image width and height, origin top-left
  (the convention of :mod:`eval.layout_metrics`).
- One detector call per image, with all the image's phrases in one caption ``"phrase_1 . phrase_2 ."``
  (lower-cased, as GroundingDINO expects; :func:`build_caption`). A phrase repeated in one image (two dogs)
  is put in the caption once; its detections carry the index of its first occurrence, and the matching
  of detections to requested boxes (:mod:`eval.layout_metrics`) sorts out which dog is which.

Phrase attribution (:func:`attribute_queries`), shared by both detector backends. For each query of the
model, with ``p = sigmoid(logits)`` over the caption's tokens and each phrase's own token span found from
the tokenizer's character offsets (:func:`phrase_token_spans`):

- ``score`` = max of ``p`` over the tokens of all phrases (the GroundingDINO box score, restricted to phrase
  tokens: [CLS], [SEP] and the ``.`` separators do not count); queries with ``score >= box_threshold``
  are kept;
- ``phrase_score[k]`` = mean of ``p`` over phrase k's span (``span_reduce="mean"``, the default: this is
  GroundingDINO's own COCO evaluation, which scores a category by ``sigmoid(logits) @ positive_map`` with
  the positive map spread uniformly over the category's tokens), or the max over the span
  (``span_reduce="max"``);
- the query goes to the phrase with the highest ``phrase_score`` (ties: the first phrase), and is dropped
  unless that ``phrase_score > text_threshold``.

Decoded label strings are never used: "robot toy", "duck toy" and "toy car" share the word "toy", and the
mean over a span lets the word that tells them apart decide. With the defaults (box 0.35, text 0.25) and
``span_reduce="max"`` the text threshold never bites (the best span's max is the score); with ``"mean"`` it
drops queries that only light up a shared or minor word of a phrase. For AP (DESIGN: detections kept down
to box threshold 0.05) lower ``text_threshold`` along with ``box_threshold``.

NMS: off by default (``nms_iou=None``). GroundingDINO is a DETR-style set predictor trained with one-to-one
matching, and neither its own ``predict`` nor transformers' post-processing applies NMS; duplicates are
the model's behaviour and AP should see them. ``nms_iou=0.8`` (say) applies per-phrase NMS
(``torchvision.ops.batched_nms`` with the phrase index as the class), as Grounded-SAM's demo does
class-agnostically at 0.8.

Backend: :class:`HFGroundingDino`, transformers' ``AutoProcessor`` + ``GroundingDinoForObjectDetection``,
``IDEA-Research/grounding-dino-tiny`` (the SwinT-OGC weights converted by transformers) or a local folder with
the same layout. It is the only backend: the original groundingdino-py package needs transformers < 5 (its BERT
wrapper calls ``BertModel.get_extended_attention_mask``, removed in transformers 5) and loads
``bert-base-uncased`` from the hub when built, so it cannot share this environment; an untested class for it
was removed rather than described as a feature. Detectors are built from config (``_target_``), so another
backend is one ``Detector`` subclass with ``_predict``.

Segmentation: :class:`SamSegmenter` (segment-anything, SAM ViT-H by default), one batched box prompt per
image, ``multimask_output=False``. :func:`subject_crop` gives the masked subject cropped to the mask's
bounding box on white.

A missing weight raises one :class:`~eval.similarity.MissingWeightsError` naming the model and how to get
it. Nothing here imports ``anyms``.
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from eval.similarity import MissingWeightsError

DEFAULT_GROUNDING_DINO = "IDEA-Research/grounding-dino-tiny"
DEFAULT_BOX_THRESHOLD = 0.35  # GroundingDINO's Python API example (Grounded-SAM's demo CLI: 0.3)
DEFAULT_TEXT_THRESHOLD = 0.25
SPAN_REDUCTIONS = ("mean", "max")

SAM_CHECKPOINT_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "default": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One detected phrase. ``box``: normalized ``(x0, y0, x1, y1)``; ``score``: the box score (max sigmoid
    logit over all phrase tokens); ``phrase_index``: index into the phrases passed to ``detect``;
    ``phrase_score``: the attributed phrase's span score (mean or max, see the module docstring)."""

    box: Box
    score: float
    phrase_index: int
    phrase: str
    phrase_score: float | None = None


# ------------------------------------------------------------------------------------ caption and spans


def _normalize_phrase(phrase: str) -> str:
    text = " ".join(str(phrase).lower().split())
    if not text:
        raise ValueError(f"empty phrase {phrase!r}")
    if "." in text:
        raise ValueError(f"phrase {phrase!r} contains '.', the caption's phrase separator")
    return text


def build_caption(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]], list[int]]:
    """The caption ``"p1 . p2 . p3 ."`` of the distinct lower-cased phrases, each distinct phrase's character
    span ``[start, end)`` in it, and for each distinct phrase the index of its first occurrence in
    ``phrases``."""
    if isinstance(phrases, str):
        raise TypeError("phrases must be a list of strings, not one string")
    texts: list[str] = []
    first_index: list[int] = []
    for i, phrase in enumerate(phrases):
        text = _normalize_phrase(phrase)
        if text not in texts:
            texts.append(text)
            first_index.append(i)
    if not texts:
        raise ValueError("no phrases to detect")
    caption, spans = "", []
    for text in texts:
        spans.append((len(caption), len(caption) + len(text)))
        caption += text + " . "
    return caption.rstrip(), spans, first_index


def phrase_token_spans(
    tokenizer: Any, caption: str, char_spans: Sequence[tuple[int, int]], max_text_len: int | None = None
) -> tuple[list[list[int]], list[int]]:
    """Each phrase's token positions in the tokenized ``caption`` (special tokens included, as the model sees
    it), from the tokenizer's character offsets: a token belongs to a phrase when its character range lies
    inside the phrase's. Returns ``(spans, input_ids)``. Raises if a phrase gets no token or a token past
    ``max_text_len`` (the caption is too long for the model)."""
    try:
        encoding = tokenizer(caption, return_offsets_mapping=True)
        offsets = [tuple(o) for o in encoding["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        return _phrase_token_spans_by_ids(tokenizer, caption, char_spans, max_text_len)
    input_ids = list(encoding["input_ids"])
    spans: list[list[int]] = []
    for start, end in char_spans:
        span = [t for t, (s, e) in enumerate(offsets) if e > s and s >= start and e <= end]
        spans.append(span)
    _check_spans(spans, caption, char_spans, max_text_len)
    return spans, input_ids


def _phrase_token_spans_by_ids(tokenizer, caption, char_spans, max_text_len):
    """Fallback for a tokenizer without offsets (a slow tokenizer): tokenize each phrase alone and find its
    ids in order in the caption's ids (BERT splits on whitespace and punctuation, so they are the same)."""
    input_ids = list(tokenizer(caption)["input_ids"])
    spans, cursor = [], 0
    for start, end in char_spans:
        ids = list(tokenizer(caption[start:end], add_special_tokens=False)["input_ids"])
        found = None
        for pos in range(cursor, len(input_ids) - len(ids) + 1):
            if ids and input_ids[pos : pos + len(ids)] == ids:
                found = pos
                break
        span = [] if found is None else list(range(found, found + len(ids)))
        cursor = span[-1] + 1 if span else cursor
        spans.append(span)
    _check_spans(spans, caption, char_spans, max_text_len)
    return spans, input_ids


def _check_spans(spans, caption, char_spans, max_text_len):
    for span, (start, end) in zip(spans, char_spans):
        if not span:
            raise ValueError(f"phrase {caption[start:end]!r} has no token in caption {caption!r}")
        if max_text_len is not None and span[-1] >= max_text_len:
            raise ValueError(
                f"caption {caption!r} is longer than the model's {max_text_len} text tokens; "
                f"phrase {caption[start:end]!r} would be cut off"
            )


# ----------------------------------------------------------------------------------------- attribution


def attribute_queries(
    logits: torch.Tensor,
    token_spans: Sequence[Sequence[int]],
    box_threshold: float = DEFAULT_BOX_THRESHOLD,
    text_threshold: float = DEFAULT_TEXT_THRESHOLD,
    span_reduce: str = "mean",
) -> list[tuple[int, int, float, float]]:
    """Attribute queries to phrases by their logits over each phrase's own token span.

    ``logits``: raw (pre-sigmoid) text logits ``[num_queries, num_tokens]`` (positions outside the text may
    be ``-inf``); ``token_spans[k]``: the token positions of phrase k. Returns, for each kept query, ``(query
    index, phrase index, score, phrase score)`` in query order; the rule is in the module docstring.
    """
    if span_reduce not in SPAN_REDUCTIONS:
        raise ValueError(f"span_reduce must be one of {SPAN_REDUCTIONS}, got {span_reduce!r}")
    if not token_spans or any(len(s) == 0 for s in token_spans):
        raise ValueError("every phrase needs a non-empty token span")
    probs = torch.as_tensor(logits).detach().float().cpu().sigmoid()
    if probs.ndim != 2:
        raise ValueError(f"logits must be [num_queries, num_tokens], got {tuple(probs.shape)}")
    per_phrase = []
    for span in token_spans:
        span_probs = probs[:, list(span)]
        per_phrase.append(span_probs.mean(dim=1) if span_reduce == "mean" else span_probs.amax(dim=1))
    phrase_scores = torch.stack(per_phrase, dim=1)  # [Q, P]
    all_tokens = sorted({t for span in token_spans for t in span})
    scores = probs[:, all_tokens].amax(dim=1)  # [Q]
    best_score, best_phrase = phrase_scores.max(dim=1)  # ties -> first phrase
    keep = (scores >= box_threshold) & (best_score > text_threshold)
    return [
        (int(q), int(best_phrase[q]), float(scores[q]), float(best_score[q]))
        for q in torch.nonzero(keep).flatten().tolist()
    ]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Normalized ``(cx, cy, w, h)`` -> normalized ``(x0, y0, x1, y1)`` clamped to [0, 1]."""
    boxes = torch.as_tensor(boxes).float()
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    return xyxy.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------- detectors


class Detector(abc.ABC):
    """Open-vocabulary detector: ``detect(image, phrases, box_threshold, text_threshold)`` -> detections,
    best score first. Subclasses implement :meth:`_predict` (one forward pass on one caption); the caption,
    token spans, attribution, box conversion and NMS are shared here."""

    def __init__(
        self,
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
        span_reduce: str = "mean",
        nms_iou: float | None = None,
    ):
        if span_reduce not in SPAN_REDUCTIONS:
            raise ValueError(f"span_reduce must be one of {SPAN_REDUCTIONS}, got {span_reduce!r}")
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.span_reduce = span_reduce
        self.nms_iou = nms_iou

    @abc.abstractmethod
    def _predict(self, image: Image.Image, caption: str) -> tuple[torch.Tensor, torch.Tensor, Any, int]:
        """One forward pass: ``(logits [Q, T] raw, pred_boxes [Q, 4] normalized cxcywh, tokenizer,
        max_text_len)`` where ``T`` covers at least the caption's tokens."""

    def detect(
        self,
        image: Image.Image,
        phrases: Sequence[str],
        box_threshold: float | None = None,
        text_threshold: float | None = None,
    ) -> list[Detection]:
        box_threshold = self.box_threshold if box_threshold is None else float(box_threshold)
        text_threshold = self.text_threshold if text_threshold is None else float(text_threshold)
        caption, char_spans, first_index = build_caption(phrases)
        logits, pred_boxes, tokenizer, max_text_len = self._predict(image.convert("RGB"), caption)
        spans, _ = phrase_token_spans(tokenizer, caption, char_spans, max_text_len)
        kept = attribute_queries(logits, spans, box_threshold, text_threshold, self.span_reduce)
        if not kept:
            return []
        boxes = cxcywh_to_xyxy(pred_boxes[[q for q, *_ in kept]].detach().float().cpu())
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # drop boxes clamped to nothing
        detections = [
            Detection(
                box=tuple(float(v) for v in box),
                score=score,
                phrase_index=first_index[k],
                phrase=str(phrases[first_index[k]]),
                phrase_score=phrase_score,
            )
            for (q, k, score, phrase_score), box, ok in zip(kept, boxes, valid.tolist())
            if ok
        ]
        if self.nms_iou is not None and detections:
            detections = _per_phrase_nms(detections, float(self.nms_iou))
        return sorted(detections, key=lambda d: -d.score)


def _per_phrase_nms(detections: list[Detection], iou: float) -> list[Detection]:
    from torchvision.ops import batched_nms

    boxes = torch.tensor([d.box for d in detections], dtype=torch.float32)
    scores = torch.tensor([d.score for d in detections], dtype=torch.float32)
    classes = torch.tensor([d.phrase_index for d in detections])
    keep = batched_nms(boxes, scores, classes, iou)
    return [detections[i] for i in keep.tolist()]


class HFGroundingDino(Detector):
    """GroundingDINO through transformers: ``AutoProcessor`` + ``GroundingDinoForObjectDetection``, loaded with
    ``from_pretrained(model_id_or_path)`` (a hub id, or a local folder in the hub repo's layout).

    ``local_files_only=True`` resolves a hub id from the local Hugging Face cache only: with no network and
    no cached copy it fails at once instead of after the hub client's retries (minutes).
    """

    def __init__(
        self,
        model_id_or_path: str | os.PathLike = DEFAULT_GROUNDING_DINO,
        device: str = "cpu",
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
        span_reduce: str = "mean",
        nms_iou: float | None = None,
        local_files_only: bool = False,
    ):
        super().__init__(box_threshold, text_threshold, span_reduce, nms_iou)
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        source = str(model_id_or_path)
        self.model_id_or_path = source
        self.device = torch.device(device)
        local = Path(source).expanduser()
        how = (
            f"download it on a machine with network (`hf download {DEFAULT_GROUNDING_DINO} --local-dir <folder>`) "
            "and point the config at the folder"
        )
        if not local.exists() and (isinstance(model_id_or_path, os.PathLike) or _is_path_like(source)):
            raise MissingWeightsError(f"GroundingDINO weights not found: no folder {source}; {how}") from None
        try:
            self.processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
            self.model = GroundingDinoForObjectDetection.from_pretrained(source, local_files_only=local_files_only)
        except OSError as err:
            raise MissingWeightsError(
                f"GroundingDINO ({source}) could not be loaded ({type(err).__name__}: {str(err).splitlines()[0]}); {how}"
            ) from None
        self.model.to(self.device).eval()

    def _predict(self, image, caption):
        inputs = self.processor(images=image, text=caption, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        num_tokens = inputs["input_ids"].shape[1]
        logits = outputs.logits[0, :, :num_tokens]
        return logits, outputs.pred_boxes[0], self.processor.tokenizer, self.model.config.max_text_len


def _is_path_like(name: str) -> bool:
    """A string that can only be a local path, not a hub id ``owner/name``."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


# ------------------------------------------------------------------------------------------------- SAM


def _sam_builder(model_type: str) -> Callable[..., Any]:
    """segment-anything's ``sam_model_registry`` entry, plus ``"tiny"``: :func:`eval.tiny_grounding.build_sam_tiny`
    (a small architecture of the same classes, for tests; the package's registry has only real sizes)."""
    from segment_anything import sam_model_registry

    if model_type in sam_model_registry:
        return sam_model_registry[model_type]
    if model_type == "tiny":
        from eval.tiny_grounding import build_sam_tiny

        return build_sam_tiny
    raise ValueError(f"unknown SAM model type {model_type!r}; one of {sorted(sam_model_registry)} or 'tiny'")


class SamSegmenter:
    """SAM through segment-anything's ``sam_model_registry[model_type](checkpoint=...)`` and ``SamPredictor``.

    ``segment(image, boxes)`` prompts with all boxes of the image in one batch (``predict_torch`` on
    ``transform.apply_boxes_torch`` boxes, ``multimask_output=False``) and returns a bool array
    ``[N, H, W]`` at the image's size. ``model_type="tiny"`` builds the test architecture of
    :mod:`eval.tiny_grounding`.
    """

    def __init__(
        self, model_type: str = "vit_h", checkpoint: str | os.PathLike = "sam_vit_h_4b8939.pth", device: str = "cpu"
    ):
        builder = _sam_builder(model_type)
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            url = SAM_CHECKPOINT_URLS.get(model_type)
            how = f"get it from {url}" if url else "write it with eval.tiny_grounding.write_tiny_sam"
            raise MissingWeightsError(
                f"SAM {model_type} checkpoint not found at {path}; {how} and point the config at the file"
            ) from None
        from segment_anything import SamPredictor

        self.model_type = model_type
        self.checkpoint = str(path)
        self.device = torch.device(device)
        sam = builder(checkpoint=str(path))
        sam.to(self.device).eval()
        self.predictor = SamPredictor(sam)

    def segment(self, image: Image.Image, boxes: Any) -> np.ndarray:
        """Masks ``[N, H, W]`` (bool) of the normalized ``(x0, y0, x1, y1)`` ``boxes`` (``[N, 4]``) in ``image``."""
        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        if boxes.shape[0] == 0:
            return np.zeros((0, height, width), dtype=bool)
        pixel_boxes = boxes * torch.tensor([width, height, width, height], dtype=torch.float32)
        self.predictor.set_image(rgb)
        prompt = self.predictor.transform.apply_boxes_torch(pixel_boxes, (height, width)).to(self.device)
        with torch.inference_mode():
            masks, _, _ = self.predictor.predict_torch(
                point_coords=None, point_labels=None, boxes=prompt, multimask_output=False
            )
        return masks[:, 0].cpu().numpy().astype(bool)


# --------------------------------------------------------------------------------------------- crops


def box_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A normalized box as the pixel rectangle ``(left, top, right, bottom)`` covering it (at least 1 px)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    left = min(max(int(math.floor(x0 * width)), 0), width - 1)
    top = min(max(int(math.floor(y0 * height)), 0), height - 1)
    right = max(min(int(math.ceil(x1 * width)), width), left + 1)
    bottom = max(min(int(math.ceil(y1 * height)), height), top + 1)
    return left, top, right, bottom


def pad_to_square(image: Image.Image, fill: int = 255) -> Image.Image:
    """``image`` centred on a white square of its longer side. The encoders resize the shorter side and crop the
    centre: a tight 4:1 crop (sunglasses) would show them 22% of its width; padded, they see all of it."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), (fill, fill, fill))
    square.paste(image.convert("RGB"), ((side - width) // 2, (side - height) // 2))
    return square


def subject_crop(image: Image.Image, mask: np.ndarray | None, box: Sequence[float] | None = None,
                 square: bool = True) -> Image.Image:
    """The subject region the identity metrics compare: the pixels under ``mask`` (bool ``[H, W]``) on white,
    cropped to the mask's bounding box and, with ``square`` (default), padded to a square on white
    (:func:`pad_to_square`). With an empty (or no) mask: the crop of the normalized ``box`` as it is (DESIGN:
    an undetected subject is compared as its requested box crop), padded likewise."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    finish = pad_to_square if square else (lambda im: im)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (height, width):
            raise ValueError(f"mask shape {mask.shape} does not match the image (H, W) = {(height, width)}")
    if mask is None or not mask.any():
        if box is None:
            raise ValueError("empty mask and no box to fall back on")
        return finish(rgb.crop(box_to_pixels(box, width, height)))
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pixels = np.asarray(rgb)[top:bottom, left:right].copy()
    pixels[~mask[top:bottom, left:right]] = 255
    return finish(Image.fromarray(pixels))


def mask_to_rle(mask: np.ndarray) -> str:
    """A bool ``[H, W]`` mask as COCO RLE (``pycocotools.mask.encode``) in JSON: ``{"size": [H, W], "counts": ...}``
    (compressed counts as text), a few hundred bytes where the mask is a few megabytes."""
    from pycocotools import mask as mask_utils
    import json

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return json.dumps({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})


def rle_to_mask(text: str) -> np.ndarray:
    """The bool ``[H, W]`` mask of :func:`mask_to_rle`'s JSON."""
    from pycocotools import mask as mask_utils
    import json

    rle = json.loads(text)
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)
