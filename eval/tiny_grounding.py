"""Tiny random GroundingDINO and SAM checkpoints in the real layouts, for tests and CI with no model hub.

=====================================  ==============================================  ==========================================
writer                                 layout                                          load with
=====================================  ==============================================  ==========================================
:func:`write_tiny_grounding_dino`      transformers ``save_pretrained`` folder of      ``HFGroundingDino(folder)``, i.e.
                                       ``GroundingDinoForObjectDetection`` +           ``AutoProcessor.from_pretrained(folder)``,
                                       ``GroundingDinoProcessor`` (the                 ``GroundingDinoForObjectDetection
                                       ``IDEA-Research/grounding-dino-tiny`` layout)   .from_pretrained(folder)``
:func:`write_tiny_sam`                 a SAM state-dict file, like                     ``SamSegmenter("tiny", checkpoint=file)``
                                       ``sam_vit_h_4b8939.pth``
=====================================  ==============================================  ==========================================

GroundingDINO: Swin backbone embed 32 (one block a stage), BERT text encoder hidden 32 (one layer),
``d_model`` 32, 1 encoder and 2 decoder layers (transformers needs ``decoder_layers >= 2``), 30 queries. The
tokenizer is a real ``BertTokenizer`` over a small vocabulary written here, laid out like
``bert-base-uncased``'s where it matters: ``[PAD]`` 0, ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102,
``[MASK]`` 103, ``.`` 1012 and ``?`` 1029, because the model hard-codes those ids (its ``SPECIAL_TOKENS``)
to split the caption into phrases for text self-attention. The words come after (``words``; a word not in
the vocabulary becomes ``[UNK]``, which still has character offsets). In transformers 5 the tokenizer
must be built with ``BertTokenizer(vocab=path)``: ``vocab_file=`` is silently ignored. The image processor
resizes to 128 px (the real one: shortest edge 800, longest 1333), to keep the forward pass in tens of ms.

SAM: segment-anything's own classes (``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``,
``TwoWayTransformer``, ``Sam``) assembled as ``segment_anything.build_sam._build_sam`` does, with small
dims (:data:`TINY_SAM`): image size 128, patch 16, encoder embed 32 / depth 2 / 2 heads, prompt embed 32.
``sam_model_registry`` has only the real sizes (vit_h, vit_l, vit_b, all at 1024 px and prompt dim 256),
so :class:`eval.grounding.SamSegmenter` knows one more model type, ``"tiny"``, built by
:func:`build_sam_tiny` with the same ``builder(checkpoint=path)`` call and state-dict loading as the
registry's builders. ``SamPredictor`` reads the image size from the model, so it works unchanged.

Nothing built here is a quality model: its detections and masks are noise.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Sequence

import torch

# Words of the tests' phrases plus DreamBench's class words.
DEFAULT_WORDS = (
    "a", "the", "and", "of", "red", "blue", "green", "yellow", "white", "black", "small", "big",
    "robot", "duck", "toy", "car", "dog", "cat", "backpack", "bear", "plushie", "berry", "bowl", "can",
    "candle", "clock", "boot", "sunglasses", "teapot", "vase", "sneaker", "glasses", "cartoon",
    "monster", "stuffed", "animal", "poop", "emoji", "shiny", "rc", "colorful", "pink", "grey",
)

# bert-base-uncased's ids that GroundingDINO (transformers' SPECIAL_TOKENS) relies on.
_BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}

TINY_SAM = dict(
    image_size=128,
    patch_size=16,
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    window_size=4,
    prompt_embed_dim=32,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    iou_head_hidden_dim=32,
    mask_in_chans=8,
)


def write_bert_vocab(path: str | Path, words: Sequence[str] = DEFAULT_WORDS) -> Path:
    """A BERT ``vocab.txt``: the special tokens at bert-base-uncased's ids, fillers ``[unusedN]`` between,
    then ``words`` (lower-cased, deduplicated)."""
    path = Path(path)
    vocab = [""] * (max(_BERT_SPECIAL_IDS.values()) + 1)
    for token, index in _BERT_SPECIAL_IDS.items():
        vocab[index] = token
    vocab = [token or f"[unused{i}]" for i, token in enumerate(vocab)]
    seen = set(vocab)
    for word in words:
        word = word.strip().lower()
        if word and word not in seen:
            vocab.append(word)
            seen.add(word)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def write_tiny_grounding_dino(
    folder: str | Path, words: Sequence[str] = DEFAULT_WORDS, seed: int = 0, image_size: int = 128, num_queries: int = 30
) -> Path:
    """Write a tiny random GroundingDINO model + processor to ``folder`` with ``save_pretrained``; return it."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path = write_bert_vocab(folder / "vocab.txt", words)
    tokenizer = BertTokenizer(vocab=str(vocab_path))  # not vocab_file=: ignored in transformers 5
    if tokenizer.convert_tokens_to_ids(".") != _BERT_SPECIAL_IDS["."]:
        raise RuntimeError("the tiny BERT tokenizer did not take the vocabulary file")
    backbone = SwinConfig(
        embed_dim=32,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 4, 8],
        window_size=7,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=num_queries,
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_sam_tiny(checkpoint: str | Path | None = None):
    """A tiny ``segment_anything.modeling.Sam`` (dims :data:`TINY_SAM`), built like the package's
    ``_build_sam`` and, given ``checkpoint``, loading its state dict the same way (strictly)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    d = TINY_SAM
    embedding_size = d["image_size"] // d["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=d["encoder_depth"],
            embed_dim=d["encoder_embed_dim"],
            img_size=d["image_size"],
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=d["encoder_num_heads"],
            patch_size=d["patch_size"],
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(d["encoder_global_attn_indexes"]),
            window_size=d["window_size"],
            out_chans=d["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=d["prompt_embed_dim"],
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(d["image_size"], d["image_size"]),
            mask_in_chans=d["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=d["prompt_embed_dim"],
                mlp_dim=d["decoder_mlp_dim"],
                num_heads=d["decoder_num_heads"],
            ),
            transformer_dim=d["prompt_embed_dim"],
            iou_head_depth=3,
            iou_head_hidden_dim=d["iou_head_hidden_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        with open(checkpoint, "rb") as f:
            state_dict = torch.load(f, map_location="cpu")
        sam.load_state_dict(state_dict)
    return sam


def write_tiny_sam(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SAM's state dict to ``path`` (a ``.pth`` file, the layout of
    ``sam_vit_h_4b8939.pth``); load it with ``SamSegmenter("tiny", checkpoint=path)``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sam = build_sam_tiny()
    torch.save(sam.state_dict(), path)
    return path
