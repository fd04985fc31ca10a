"""MS-Diffusion (Wang et al., arXiv 2406.07209) as a native baseline: its grounding resampler, its
multi-subject masked cross-attention and a loader of its released checkpoint (``ms_adapter.bin``).

Written from the paper and from reading the public code (MS-Diffusion/MS-Diffusion); nothing is copied.
What it computes at inference:

- each reference image goes through a CLIP image encoder (ViT-bigG/14 for the released weights) after a
  resize to 512 x 512 and CLIP preprocessing; the encoder's penultimate hidden states feed a perceiver
  **grounding resampler** whose 16 queries start from the subject's *grounding tokens*: an MLP over
  ``[phrase embedding, Fourier embedding of the box]`` (:func:`fourier_box_embedding`);
- the subjects' tokens are concatenated after 4 learned *dummy* tokens and appended to the text tokens;
- every cross-attention layer computes ``text attention + scale x image attention``
  (:class:`MSDiffusionAttnProcessor`), where an additive mask (0 allowed, -10000 not) lets a query see
  subject j's tokens only inside box j and the dummy tokens only outside every box, so overlapping boxes
  share one softmax, and the image term of queries outside every box is set to zero
  (:func:`ms_image_attention`);
- the unconditional branch of classifier-free guidance gets zero image tokens and no boxes (zero boxes in
  the official code: no query is inside any box, so its image term is zero).

Box edges on a token grid follow :meth:`anyms.core.layout.Layout.box_masks` (floor start, ceil end), the rule
MS-Diffusion's code uses too; a layer's grid comes from :func:`anyms.core.layout.grid_for`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anyms.core.attention import attention_epilogue, attention_prelude
from anyms.core.layout import Layout, Subject, grid_for
from anyms.methods.base import (BasePipeline, GenerationResult, GenerationSettings, ModelLoadError, check_local_paths, frozen,
                                own_weights, peak_memory_bytes, weights_for)
from runfolder.references import load_reference

METHOD = "ms_diffusion"
CHECKPOINT_KEYS = ("image_proj", "ms_adapter", "dummy_image_tokens")
MASK_VALUE = -10000.0  # the official additive mask value
HUB_REPO = "doge1516/MS-Diffusion"
WEIGHT_NAME = "ms_adapter.bin"
IMAGE_ENCODER = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
# the released model's resampler (the official inference script's values)
RESAMPLER_DEFAULTS = dict(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, ff_mult=4, fourier_freqs=8)


# --- grounding tokens ---------------------------------------------------------------------------------

def fourier_box_embedding(boxes: torch.Tensor, num_freqs: int = 8, temperature: float = 100.0) -> torch.Tensor:
    """``[..., 4] -> [..., num_freqs * 2 * 4]``: frequency-major, then sin before cos, then the 4 box
    coordinates ``(x0, y0, x1, y1)``: entry ``8 k + 4 s + c`` is ``(sin, cos)[s](temperature**(k/num_freqs) * box[c])``."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must end in 4 coordinates (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
    freqs = temperature ** (torch.arange(num_freqs, device=boxes.device, dtype=torch.float32) / num_freqs)
    angles = freqs[:, None] * boxes.float()[..., None, :]  # [..., F, 4]
    emb = torch.stack([angles.sin(), angles.cos()], dim=-2)  # [..., F, 2, 4]
    return emb.flatten(-3).to(boxes.dtype if boxes.is_floating_point() else torch.float32)


class _PerceiverAttention(nn.Module):
    """The resampler's cross-attention: queries from the latents, keys and values from the image features
    and the latents together (submodule names as in the checkpoint: norm1, norm2, to_q, to_kv, to_out)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        b, n, _ = latents.shape

        def heads(t):  # [b, len, H*d] -> [b, H, len, d]
            return t.view(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        q = heads(self.to_q(latents))
        k, v = (heads(t) for t in self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1))
        logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.dim_head)
        out = logits.softmax(dim=-1).to(v.dtype) @ v  # softmax in fp32, as the official code does
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class GroundingResampler(nn.Module):
    """MS-Diffusion's grounding resampler: a perceiver resampler over the image encoder's penultimate hidden
    states whose ``num_queries`` queries are initialised from the subject's grounding tokens.

    Parameter names are those of the checkpoint's ``image_proj`` part. ``grounding_latents`` (the learned
    queries used when grounding is dropped in training) is loaded but not used at inference.
    """

    def __init__(self, embedding_dim: int, output_dim: int, phrase_dim: int, dim: int = 1280, depth: int = 4,
                 dim_head: int = 64, heads: int = 20, num_queries: int = 16, ff_mult: int = 4, fourier_freqs: int = 8):
        super().__init__()
        self.dim, self.num_queries, self.fourier_freqs = dim, num_queries, fourier_freqs
        self.phrase_dim = phrase_dim
        grounding_dim = phrase_dim + fourier_freqs * 2 * 4
        self.grounding_latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.latent_proj = nn.Sequential(nn.Linear(grounding_dim, 2 * grounding_dim), nn.GELU(),
                                         nn.Linear(2 * grounding_dim, dim * num_queries))
        self.latent_norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([_PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.attention_norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def grounding_input(self, phrase_embeds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``[N, phrase_dim + 32]``: the phrase embedding first, then the box's Fourier embedding."""
        if phrase_embeds.shape[-1] != self.phrase_dim:
            raise ValueError(f"phrase embeddings are {phrase_embeds.shape[-1]} wide, the resampler takes {self.phrase_dim}")
        fourier = fourier_box_embedding(boxes.float(), self.fourier_freqs).to(phrase_embeds.dtype)
        return torch.cat([phrase_embeds, fourier], dim=-1)

    def grounding_queries(self, phrase_embeds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``[N, num_queries, dim]``: the resampler's initial queries for each subject."""
        g = self.latent_proj(self.grounding_input(phrase_embeds, boxes))
        return self.latent_norm(g.view(-1, self.num_queries, self.dim))

    def forward(self, image_features: torch.Tensor, phrase_embeds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """image_features ``[N, S, embedding_dim]``, phrase_embeds ``[N, phrase_dim]``, boxes ``[N, 4]``
        (one row per subject) -> ``[N, num_queries, output_dim]``."""
        latents = self.grounding_queries(phrase_embeds, boxes)
        x = self.proj_in(image_features)
        for attend, feed_forward in self.layers:
            latents = latents + attend(x, latents)
            latents = latents + feed_forward(latents)
        return self.norm_out(self.proj_out(self.attention_norm(latents)))


# --- the multi-subject cross-attention -----------------------------------------------------------------

def ms_attention_bias(box_masks: torch.Tensor, num_tokens: int, num_dummy_tokens: int,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive image-attention mask and the queries it leaves an image term.

    box_masks: ``Bool[B, n, L]`` (per batch row; a row without boxes is all False).
    Returns ``bias [B, L, num_dummy + n * num_tokens]`` (0 where a query may look, -10000 elsewhere: dummy
    tokens only outside every box, subject j's tokens only inside box j) and ``inside Bool[B, L]``.
    """
    if box_masks.ndim != 3:
        raise ValueError(f"box_masks must be [B, n, L], got shape {tuple(box_masks.shape)}")
    inside = box_masks.any(dim=1)  # [B, L]
    subject = box_masks.transpose(1, 2).repeat_interleave(num_tokens, dim=-1)  # [B, L, n*tokens]
    dummy = (~inside)[..., None].expand(-1, -1, num_dummy_tokens)
    allowed = torch.cat([dummy, subject], dim=-1)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=box_masks.device).masked_fill(~allowed, MASK_VALUE)
    return bias, inside


def ms_attention_inputs(box_masks: torch.Tensor, num_tokens: int, num_dummy_tokens: int,
                        weights: Sequence[float] | torch.Tensor | None, dtype: torch.dtype, device) -> tuple:
    """What :func:`ms_image_attention` derives from the layout and the weights, on ``device``: ``(bias, inside,
    token_weights)`` (``token_weights`` ``None`` without weights). The processor builds these once per call,
    grid and device (:meth:`MSDiffusionAttnProcessor._image_term`), not per layer and step: each would be a
    blocking host-to-device copy on a GPU."""
    n = box_masks.shape[1]
    bias, inside = ms_attention_bias(box_masks.to(device), num_tokens, num_dummy_tokens, dtype)
    token_w = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=dtype).to(device)
        if w.shape != (n,):
            raise ValueError(f"got {tuple(w.shape)} weights for {n} subjects")
        token_w = torch.cat([w.new_ones(num_dummy_tokens), w.repeat_interleave(num_tokens)])
    return bias, inside, token_w


def ms_image_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, box_masks: torch.Tensor, num_tokens: int,
                       num_dummy_tokens: int = 4, weights: Sequence[float] | torch.Tensor | None = None,
                       softmax_scale: float | None = None, prepared: tuple | None = None) -> torch.Tensor:
    """MS-Diffusion's image term for one layer.

    q: ``[B, H, L, D]``; k, v: ``[B, H, num_dummy + n * num_tokens, D]`` (dummy tokens first, then the
    subjects in order); box_masks: ``Bool[B, n, L]`` or ``[n, L]``; weights: per subject, multiplies its
    tokens' attention probabilities (the scale times the subject's scale; ``None``: 1); prepared: the
    :func:`ms_attention_inputs` of these masks and weights, when the caller keeps them.
    Returns ``[B, H, L, D_v]``: one softmax over the allowed tokens, zero for queries outside every box.
    """
    if box_masks.ndim == 2:
        box_masks = box_masks[None].expand(q.shape[0], -1, -1)
    B, n, L = box_masks.shape
    if L != q.shape[2]:
        raise ValueError(f"box masks cover {L} queries but q has {q.shape[2]}")
    if k.shape[2] != num_dummy_tokens + n * num_tokens:
        raise ValueError(f"got {k.shape[2]} image tokens; {n} subjects x {num_tokens} + {num_dummy_tokens} dummy "
                         f"= {num_dummy_tokens + n * num_tokens} expected")
    if prepared is None:
        prepared = ms_attention_inputs(box_masks, num_tokens, num_dummy_tokens, weights, q.dtype, q.device)
    bias, inside, token_w = prepared
    if token_w is not None:
        # scaling a token's value is scaling its probability (official: probabilities x subject scales)
        v = v * token_w[:, None].to(v.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None], scale=softmax_scale)
    return out * inside[:, None, :, None].to(out.dtype)


@dataclass
class MSDiffusionState:
    """What one generation call tells the MS-Diffusion processors of one UNet (set by the pipeline).

    grounded: per batch row, whether the row has the layout (the conditional branch) or none (the
    unconditional branch of classifier-free guidance: zero boxes, so no image term);
    weights: per subject, the scale times the subject's scale.
    """

    layout: Layout | None = None
    latent_hw: tuple[int, int] | None = None
    grounded: Sequence[bool] | None = None
    weights: Sequence[float] | None = None
    num_tokens: int = 16
    num_dummy_tokens: int = 4

    @property
    def num_image_tokens(self) -> int:
        if self.layout is None:
            raise RuntimeError("MS-Diffusion processor has no layout: set state.layout (the pipeline does this per call)")
        return self.num_dummy_tokens + len(self.layout) * self.num_tokens


class MSDiffusionAttnProcessor(nn.Module):
    """MS-Diffusion's multi-subject cross-attention for one layer: ``text + image``, where the image term is
    :func:`ms_image_attention` through this layer's ``to_k_ip`` / ``to_v_ip`` (no bias, as in the checkpoint).

    ``encoder_hidden_states`` is the text tokens followed by the image tokens (dummy, then the subjects'),
    as the MS-Diffusion pipeline builds its prompt embeddings.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, state: MSDiffusionState):
        super().__init__()
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        object.__setattr__(self, "state", state)  # shared by every layer, not a submodule

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        state = self.state
        if encoder_hidden_states is None or isinstance(encoder_hidden_states, tuple):
            raise ValueError("the MS-Diffusion processor takes text tokens followed by image tokens as one tensor")
        n_image = state.num_image_tokens
        if encoder_hidden_states.shape[1] <= n_image:
            raise ValueError(f"encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens; expected the text "
                             f"tokens followed by {n_image} image tokens")
        text, image = encoder_hidden_states[:, :-n_image], encoder_hidden_states[:, -n_image:]
        p = attention_prelude(attn, hidden_states, text, attention_mask, temb)
        out = F.scaled_dot_product_attention(p.query, p.key, p.value, attn_mask=p.attention_mask, scale=attn.scale)
        out = out + self._image_term(p.query, p.heads(self.to_k_ip(image), attn.heads),
                                     p.heads(self.to_v_ip(image), attn.heads), p.spatial_hw, attn.scale)
        return attention_epilogue(attn, out, p)

    # --- what the attention-map recorder asks (anyms.core.attention_maps.RecordableProcessor) ---

    def split_encoder_states(self, encoder_hidden_states):
        """The text tokens, then this call's image tokens (dummy and the subjects')."""
        n_image = self.state.num_image_tokens
        return encoder_hidden_states[:, :-n_image], encoder_hidden_states[:, -n_image:]

    def subject_attention_weights(self, attn, query, image_input, layout: Layout, grid, rows, split_heads) -> torch.Tensor:
        """``[n, B, H, L]``: subject j's share of the masked softmax over the dummy and all subjects' tokens,
        0 for queries outside every box (where MS-Diffusion zeroes the image term)."""
        state, n = self.state, len(layout)
        keys = split_heads(self.to_k_ip(image_input))[rows].float()
        grounded = list(state.grounded) if state.grounded is not None else [True] * image_input.shape[0]
        grounded_rows = torch.tensor(grounded, dtype=torch.bool, device=query.device)[rows]
        masks = layout.box_masks(*grid).flatten(1).to(query.device)[None] & grounded_rows[:, None, None]
        bias, inside = ms_attention_bias(masks, state.num_tokens, state.num_dummy_tokens)
        probs = (query @ keys.transpose(-1, -2) * attn.scale + bias[:, None]).softmax(-1)
        probs = probs * inside[:, None, :, None]
        subjects = probs[..., state.num_dummy_tokens:].unflatten(-1, (n, state.num_tokens)).sum(-1)  # [B, H, L, n]
        return subjects.permute(3, 0, 1, 2)

    def _image_term(self, query, k_ip, v_ip, spatial_hw, softmax_scale):
        state = self.state
        B, L = query.shape[0], query.shape[2]
        grounded = list(state.grounded) if state.grounded is not None else [True] * B
        if len(grounded) != B:
            raise ValueError(f"state.grounded has {len(grounded)} rows but the batch has {B}")
        if spatial_hw is not None:
            h, w = spatial_hw
        elif state.latent_hw is None:
            raise RuntimeError("MS-Diffusion processor has no latent size: set state.latent_hw (the pipeline does this)")
        else:
            h, w = grid_for(L, state.latent_hw)
        weights = None if state.weights is None else tuple(float(x) for x in state.weights)
        key = ("ms_diffusion_inputs", h, w, query.device, query.dtype, tuple(grounded), weights,
               state.num_tokens, state.num_dummy_tokens)

        def build():  # once per call, grid and device: no host-to-device copy per layer and step
            with torch.inference_mode(False):  # cached beyond this call's mode, like anyms.core.attention's groups
                masks = state.layout.box_masks(h, w).flatten(1)  # [n, L], the layout's grid rule
                rows = torch.tensor(grounded, dtype=torch.bool)
                box_masks = masks[None] & rows[:, None, None]  # [B, n, L]: no boxes in the unconditional rows
                return box_masks.to(query.device), ms_attention_inputs(
                    box_masks, state.num_tokens, state.num_dummy_tokens, weights, query.dtype, query.device)

        box_masks, prepared = state.layout.cached(key, build)
        return ms_image_attention(query, k_ip, v_ip, box_masks, state.num_tokens, state.num_dummy_tokens,
                                  softmax_scale=softmax_scale, prepared=prepared)


def adapter_layers(unet) -> list[tuple[int, str]]:
    """``(index, processor name)`` of every cross-attention layer, the index being the processor's position in
    ``unet.attn_processors`` (the official checkpoint numbers its ``ms_adapter`` keys this way: 1, 3, 5, ...)."""
    return [(i, name) for i, name in enumerate(unet.attn_processors) if not name.endswith("attn1.processor")]


def install(unet, state: MSDiffusionState) -> nn.ModuleDict:
    """Puts an :class:`MSDiffusionAttnProcessor` (fresh projections) on every cross-attention layer; other
    layers keep theirs. Returns the processors keyed by their checkpoint index (``"1"``, ``"3"``, ...)."""
    processors, layers = dict(unet.attn_processors), nn.ModuleDict()
    for index, name in adapter_layers(unet):
        attn = unet.get_submodule(name[: -len(".processor")])
        proc = MSDiffusionAttnProcessor(attn.to_k.out_features, attn.to_k.in_features, state)
        processors[name] = proc
        layers[str(index)] = proc
    if not len(layers):
        raise ValueError("the UNet has no cross-attention layers")
    unet.set_attn_processor(processors)
    return layers


class MSDiffusionAdapter(nn.Module):
    """Everything MS-Diffusion adds to the base model: the resampler (``image_proj``), the per-layer
    ``to_k_ip`` / ``to_v_ip`` (``layers``, installed in the UNet) and the dummy image tokens."""

    def __init__(self, unet, resampler: GroundingResampler, num_dummy_tokens: int = 4):
        super().__init__()
        self.state = MSDiffusionState(num_tokens=resampler.num_queries, num_dummy_tokens=num_dummy_tokens)
        self.image_proj = resampler
        self.layers = install(unet, self.state)
        self.dummy_image_tokens = nn.Parameter(torch.randn(1, num_dummy_tokens, unet.config.cross_attention_dim))

    def checkpoint(self) -> dict:
        """The adapter in the official ``ms_adapter.bin`` layout."""
        return {"image_proj": self.image_proj.state_dict(), "ms_adapter": self.layers.state_dict(),
                "dummy_image_tokens": self.dummy_image_tokens.detach().clone()}

    def load_checkpoint(self, checkpoint: Mapping, where: str = "ms_adapter.bin") -> None:
        """Loads the official layout strictly: every part and key present, none unknown, every shape equal."""
        if not isinstance(checkpoint, Mapping):
            raise ModelLoadError(f"{where}: not a state dict (got {type(checkpoint).__name__})")
        missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
        unknown = sorted(set(checkpoint) - set(CHECKPOINT_KEYS))
        if missing or unknown:
            raise ModelLoadError(f"{where}: expected the parts {list(CHECKPOINT_KEYS)}; missing {missing}, unknown {unknown}")
        dummy = checkpoint["dummy_image_tokens"]
        parts = [("image_proj", self.image_proj, checkpoint["image_proj"]), ("ms_adapter", self.layers, checkpoint["ms_adapter"]),
                 ("dummy_image_tokens", None, {"dummy_image_tokens": dummy})]
        for part, module, sd in parts:
            own = module.state_dict() if module is not None else {"dummy_image_tokens": self.dummy_image_tokens}
            missing = sorted(set(own) - set(sd))
            unknown = sorted(set(sd) - set(own))
            shapes = [f"{k}: file {tuple(sd[k].shape)}, model {tuple(own[k].shape)}"
                      for k in sorted(set(own) & set(sd)) if tuple(sd[k].shape) != tuple(own[k].shape)]
            if missing or unknown or shapes:
                raise ModelLoadError(
                    f"{where}: part {part!r} does not match the model (resampler or UNet config?): "
                    f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, unknown keys "
                    f"{unknown[:8]}{'...' if len(unknown) > 8 else ''}, shape mismatches {shapes[:8]}"
                )
        with torch.no_grad():
            self.image_proj.load_state_dict(checkpoint["image_proj"], strict=True)
            self.layers.load_state_dict(checkpoint["ms_adapter"], strict=True)
            self.dummy_image_tokens.copy_(dummy)


# --- loading ---------------------------------------------------------------------------------------------

def resolve_checkpoint(repo: str, weight_name: str = WEIGHT_NAME, subfolder: str | None = None, name: str = "?") -> Path:
    """The checkpoint file from a local folder (or file) or a hub id (``hf_hub_download``, which respects the
    cache and ``HF_HUB_OFFLINE``); a missing one raises :class:`ModelLoadError` naming it and how to get it."""
    from anyms.methods.loading import how_to_get

    rel = f"{subfolder}/{weight_name}" if subfolder else weight_name
    local = Path(repo)
    if local.is_file():
        return local
    if local.is_dir() or str(repo).startswith((".", "/")):
        path = local / rel
        if path.is_file():
            return path
        raise ModelLoadError(f"model {name!r}: no MS-Diffusion checkpoint {rel!r} in {repo!r}; "
                             f"{how_to_get(f'method.weights.{name}.repo', repo)} (the official one is {HUB_REPO}/{WEIGHT_NAME})")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, weight_name, subfolder=subfolder))
    except Exception as err:  # offline, not cached, no such repo or file: one message, no hub stack trace
        raise ModelLoadError(
            f"model {name!r}: cannot get the MS-Diffusion checkpoint {rel!r} of {repo!r}; "
            f"{how_to_get(f'method.weights.{name}.repo', repo).replace(f'download {repo}', f'download {repo} {rel}')}. "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` of ``ms_adapter.bin`` (tensors only: ``weights_only``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"{path}: not a readable MS-Diffusion checkpoint ({type(err).__name__}: {err})") from None


def load_image_encoder(repo: str, subfolder: str | None = None, torch_dtype: torch.dtype = torch.float32, name: str = "?"):
    """``CLIPVisionModelWithProjection.from_pretrained`` (the released weights use CLIP ViT-bigG/14, whose
    hub repo holds the whole CLIP model: its vision tower is taken)."""
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    from anyms.methods.loading import how_to_get

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text tower's weights are expected to be left out: no report of them
    try:
        encoder, info = CLIPVisionModelWithProjection.from_pretrained(
            repo, subfolder=subfolder or "", dtype=torch_dtype, output_loading_info=True)
    except (OSError, ValueError) as err:
        how = how_to_get(f"method.weights.{name}.image_encoder", repo)  # only the files from_pretrained reads, not the whole repo
        how = how.replace(f"download {repo}", f"download {repo} config.json model.safetensors")
        raise ModelLoadError(f"model {name!r}: cannot load MS-Diffusion's image encoder {repo!r}; {how}. "
                             f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or []) + [str(m) for m in info.get("mismatched_keys") or []]
    if missing:
        raise ModelLoadError(f"model {name!r}: MS-Diffusion's image encoder {repo!r} lacks weights of its vision "
                             f"tower (they would be random): {missing[:8]}")
    return encoder


def image_processor_for(image_encoder):
    """CLIP preprocessing at the encoder's input size: at 224 (ViT-bigG/14) exactly the default
    ``CLIPImageProcessor()`` of the official inference script (bicubic shortest side, centre crop, CLIP mean/std)."""
    from transformers import CLIPImageProcessor

    s = int(image_encoder.config.image_size)
    return CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


def build_adapter(pipe, image_encoder, checkpoint: Mapping | None = None, resampler: Mapping | None = None,
                  num_dummy_tokens: int = 4, where: str = "ms_adapter.bin") -> MSDiffusionAdapter:
    """The adapter for ``pipe``'s UNet (processors installed) with the resampler's sizes from ``resampler``
    (default: the released model's) and the encoders; ``checkpoint`` (the official layout) loaded strictly."""
    text_cfg = pipe.text_encoder.config
    if text_cfg.hidden_size != text_cfg.projection_dim:
        raise ModelLoadError(
            f"MS-Diffusion's phrase embedding is the first text encoder's pooled output ({text_cfg.hidden_size} wide) "
            f"and its resampler takes projection_dim = {text_cfg.projection_dim}: they must be equal"
        )
    cfg = {**RESAMPLER_DEFAULTS, **dict(resampler or {})}
    unknown = set(cfg) - set(RESAMPLER_DEFAULTS)
    if unknown:
        raise ValueError(f"ms_diffusion.resampler: unknown field(s) {sorted(unknown)}; known {sorted(RESAMPLER_DEFAULTS)}")
    unet = pipe.unet
    res = GroundingResampler(embedding_dim=image_encoder.config.hidden_size, output_dim=unet.config.cross_attention_dim,
                             phrase_dim=text_cfg.projection_dim, **{k: int(v) for k, v in cfg.items()})
    adapter = MSDiffusionAdapter(unet, res, num_dummy_tokens=num_dummy_tokens)
    if checkpoint is not None:
        adapter.load_checkpoint(checkpoint, where)
    return adapter.to(device=unet.device, dtype=unet.dtype)


def load_ms_diffusion_pipeline(pipe, name: str, default_size: int, repo: str = HUB_REPO, weight_name: str = WEIGHT_NAME,
                               subfolder: str | None = None, image_encoder: str = IMAGE_ENCODER,
                               image_encoder_subfolder: str | None = None, resampler: Mapping | None = None,
                               num_dummy_tokens: int = 4, reference_size: int = 512, cls=None) -> "MSDiffusionPipeline":
    """``pipe`` (a loaded SD/SDXL pipeline, no IP-Adapter) plus MS-Diffusion from the method config's ``weights.<model>``."""
    cls = cls or MSDiffusionPipeline
    path = resolve_checkpoint(repo, weight_name, subfolder, name)
    checkpoint = read_checkpoint(path)
    encoder = load_image_encoder(image_encoder, image_encoder_subfolder, pipe.unet.dtype, name)
    adapter = build_adapter(pipe, encoder, checkpoint, resampler, num_dummy_tokens, where=f"model {name!r}: {path}")
    adapter_id = f"{repo}/{subfolder or ''}/{weight_name}+{image_encoder}"
    return cls(pipe, adapter, encoder.to(pipe.unet.device), adapter_id, default_size, reference_size)


# --- the pipeline --------------------------------------------------------------------------------------------

def spans_whole_image(subject: Subject, tol: float = 1e-6) -> bool:
    """A subject whose box is the whole image (a scene or background): MS-Diffusion's authors advise the
    lower scale (0.4) when one is present."""
    x0, y0, x1, y1 = subject.box
    return x0 <= tol and y0 <= tol and x1 >= 1 - tol and y1 >= 1 - tol


def subject_weights(layout: Layout, settings: GenerationSettings) -> list[float]:
    """Per subject: the scale (``adapter_scale``, or ``full_frame_adapter_scale`` when a subject spans the
    whole image) times the subject's own scale (``generation.scales`` or ``Subject.scale``, default 1: then
    this is the official ``scale``; with scale 1 and per-subject values, the official ``subject_scales``)."""
    scales = list(layout.scales if settings.scales is None else settings.scales)
    if len(scales) != len(layout):
        raise ValueError(f"generation.scales has {len(scales)} values for {len(layout)} subjects")
    base = settings.adapter_scale
    if settings.full_frame_adapter_scale is not None and any(spans_whole_image(s) for s in layout):
        base = settings.full_frame_adapter_scale
    return [float(base) * float(s) for s in scales]


class MSDiffusionPipeline(BasePipeline):
    """A diffusers SD/SDXL pipeline with MS-Diffusion: same call, seeds and records as
    :class:`anyms.methods.base.AnyMSPipeline`, ``attention="ms_diffusion"``."""

    def __init__(self, pipe, adapter: MSDiffusionAdapter, image_encoder, adapter_id: str, default_size: int,
                 reference_size: int = 512):
        super().__init__(pipe, default_size)
        frozen(adapter, image_encoder)
        self.adapter = adapter
        self.state = adapter.state
        self.image_encoder = image_encoder
        self.image_processor = image_processor_for(image_encoder)
        self.adapter_id = adapter_id
        self.reference_size = int(reference_size)
        self._feature_cache: dict[tuple, torch.Tensor] = {}

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.pipe, "text_encoder_2", None) is not None

    # --- inputs ---

    def image_features(self, images: Sequence[Any]) -> torch.Tensor:
        """``[n, S, E]``: the encoder's penultimate hidden states of each reference, resized to
        ``reference_size`` square first (as the official script does), cached per image content."""
        from PIL import Image

        out = []
        for image in images:
            key = (self._image_key(image), self.adapter_id, self.reference_size)
            if key not in self._feature_cache:
                pil = image.convert("RGB") if isinstance(image, Image.Image) else load_reference(image)
                pil = pil.resize((self.reference_size, self.reference_size))
                pixels = self.image_processor(images=pil, return_tensors="pt").pixel_values
                with torch.no_grad():
                    hidden = self.image_encoder(pixels.to(self.device, self.image_encoder.dtype),
                                                output_hidden_states=True).hidden_states[-2]
                self._feature_cache[key] = hidden
            out.append(self._feature_cache[key])
        return torch.cat(out, dim=0)

    def phrase_embeddings(self, phrases: Sequence[str]) -> torch.Tensor:
        """``[n, P]``: the first text encoder's pooled output for each phrase (padded to the tokenizer's length)."""
        tok = self.pipe.tokenizer
        ids = tok(list(phrases), max_length=tok.model_max_length, padding="max_length", truncation=True,
                  return_tensors="pt").input_ids
        return self.pipe.text_encoder(ids.to(self.device)).pooler_output

    def image_tokens(self, layout: Layout, features: torch.Tensor) -> torch.Tensor:
        """``[1, num_dummy + n * num_queries, cross_dim]``: the dummy tokens, then each subject's tokens."""
        boxes = torch.tensor([s.box for s in layout], dtype=torch.float32, device=self.device)
        phrases = self.phrase_embeddings([s.phrase for s in layout]).to(self.dtype)
        tokens = self.adapter.image_proj(features.to(self.dtype), phrases, boxes)  # [n, Q, D]
        return torch.cat([self.adapter.dummy_image_tokens, tokens.reshape(1, -1, tokens.shape[-1])], dim=1)

    def prompt_embeddings(self, prompt: str, negative_prompt: str, cfg: bool) -> dict:
        """The prompt embeddings as the pipeline itself would encode them."""
        if self.is_sdxl:
            pe, npe, ppe, nppe = self.pipe.encode_prompt(prompt, device=self.device, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=cfg, negative_prompt=negative_prompt)
            return dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                        negative_pooled_prompt_embeds=nppe)
        pe, npe = self.pipe.encode_prompt(prompt, self.device, 1, cfg, negative_prompt=negative_prompt)
        return dict(prompt_embeds=pe, negative_prompt_embeds=npe)

    # --- one image ---

    def __call__(self, prompt: str, layout: Layout, seed: int, settings: GenerationSettings,
                 attention: str | None = None, record=None) -> GenerationResult:
        """One image; the initial noise comes from a CPU generator seeded with ``seed``, as for every method."""
        attention = attention or METHOD
        if attention != METHOD:
            raise ValueError(f"the MS-Diffusion pipeline runs attention={METHOD!r} only, got {attention!r}")
        height = settings.height or self.default_size
        width = settings.width or self.default_size
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        cfg = settings.guidance_scale > 1.0
        features = self.image_features([s.image for s in layout])  # cached, outside the timing (as AnyMS's)
        weights = subject_weights(layout, settings)
        self._reset_peak_memory()
        start = time.perf_counter()
        with torch.no_grad():
            tokens = self.image_tokens(layout, features)
            embeds = self.prompt_embeddings(prompt, settings.negative_prompt, cfg)
        embeds["prompt_embeds"] = torch.cat([embeds["prompt_embeds"], tokens.to(embeds["prompt_embeds"].dtype)], dim=1)
        if cfg:  # the unconditional branch: zero image tokens (dummy included) and no boxes
            neg = embeds["negative_prompt_embeds"]
            embeds["negative_prompt_embeds"] = torch.cat([neg, torch.zeros_like(tokens).to(neg.dtype)], dim=1)
        else:
            embeds.pop("negative_prompt_embeds", None)
            embeds.pop("negative_pooled_prompt_embeds", None)
        s = self.state
        s.layout, s.latent_hw, s.weights, s.grounded = layout, latent_hw, weights, ([False, True] if cfg else [True])
        recorder = self.attention_recorder(record, prompt, layout, height, width, cfg, settings.steps)
        try:
            with self._recording(recorder, METHOD):
                out = self.pipe(**embeds, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                                height=height, width=width, generator=torch.Generator("cpu").manual_seed(int(seed)),
                                output_type="pil")
        finally:
            s.layout = s.latent_hw = s.weights = s.grounded = None
        seconds = self._elapsed(start)
        return GenerationResult(out.images[0], seconds, peak_memory_bytes(self.device), latent_hw,
                                recorder.result() if recorder is not None else None)


# --- the method (conf/method/ms_diffusion.yaml) ---------------------------------------------------------------

class MSDiffusion(MSDiffusionPipeline):
    """``method=ms_diffusion``: the base model (no IP-Adapter) plus MS-Diffusion's checkpoint and image encoder from
    ``method.weights.<model name>`` (``repo``, ``subfolder``, ``weight_name``, ``image_encoder``,
    ``image_encoder_subfolder``, ``resampler`` sizes, ``num_dummy_tokens``, ``reference_size``). The released
    weights are for SDXL only; the tiny models get random ones in the released layout (:func:`write_tiny`)."""

    WEIGHTS = "MS-Diffusion"

    def __init__(self, model: Mapping, name: str = METHOD, weights: Mapping | None = None, **settings):
        from anyms.methods.loading import load_base

        entry = own_weights(type(self), name, weights, model, write_tiny)
        pipe, device = load_base(model)
        pipe.to(device)
        load_ms_diffusion_pipeline(pipe, name=model["name"], default_size=int(model["size"]), cls=self._init, **entry)

    def _init(self, *args) -> "MSDiffusion":
        MSDiffusionPipeline.__init__(self, *args)
        return self

    @classmethod
    def check(cls, method: Mapping, model: Mapping) -> None:
        entry = weights_for(method, model, cls.WEIGHTS)
        if not model.get("tiny"):
            check_local_paths({f"method.weights.{model['name']}.{k}": entry.get(k) for k in ("repo", "image_encoder")})

    @classmethod
    def identity(cls, method: Mapping, model_ids: Mapping) -> tuple[dict, dict]:
        """The base model without the IP-Adapter it does not load, with MS-Diffusion's weights for it (as
        ``ms_diffusion``); the method's settings without the weight table: the shape of its identity before issue 17."""
        model = {k: v for k, v in model_ids.items() if k != "ip_adapter"}
        model["ms_diffusion"] = (method.get("weights") or {}).get(model_ids["name"])
        # "pipeline" and "attention" were keys of its config before issue 17: kept, so that existing run folders
        # keep their config hashes (the images are byte-identical) and are not made again
        settings = {"pipeline": METHOD, "attention": METHOD}
        settings.update((k, v) for k, v in method.items() if k not in ("_target_", "weights"))
        return model, settings


# --- tiny random weights in the released checkpoint's layout (model=tiny, model=tiny_sd15) -----------------

# the tiny resampler (conf/model/tiny.yaml and tiny_sd15.yaml give the same sizes to the loader)
MS_DIFFUSION_RESAMPLER = dict(dim=64, depth=4, dim_head=64, heads=1, num_queries=16, ff_mult=4, fourier_freqs=8)
BIGG_DIR, MS_DIFFUSION_DIR = "CLIP-ViT-bigG-14", "MS-Diffusion"
MS_DIFFUSION_FILES = {"sdxl": "ms_adapter.bin", "sd15": "sd15/ms_adapter.bin"}  # as doge1516/MS-Diffusion; sd15: ours


def tiny_bigg_clip(seed: int = 0):
    """A tiny ``CLIPModel`` standing in for laion/CLIP-ViT-bigG-14-laion2B-39B-b160k, which is a whole CLIP
    model (text and vision towers): MS-Diffusion loads its vision tower with projection. The vision tower is
    48 wide, so the resampler's input width differs from the ViT-H-like encoder's and from its own."""
    from transformers import CLIPConfig, CLIPModel

    from anyms.tiny import IMAGE_ENCODER_SIZE, _text_config

    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(
        text_config=_text_config().to_dict(), projection_dim=32,
        vision_config=dict(hidden_size=48, projection_dim=32, intermediate_size=64, num_attention_heads=4,
                           num_hidden_layers=2, image_size=IMAGE_ENCODER_SIZE, patch_size=8),
    ))


def tiny_bigg_image_encoder(seed: int = 0):
    """The vision tower of :func:`tiny_bigg_clip` as a ``CLIPVisionModelWithProjection`` (what the loader makes of it)."""
    from transformers import CLIPVisionModelWithProjection

    clip = tiny_bigg_clip(seed)
    encoder = CLIPVisionModelWithProjection(clip.config.vision_config)
    encoder.load_state_dict({k: v for k, v in clip.state_dict().items()
                             if k.startswith(("vision_model.", "visual_projection."))}, strict=True)
    return encoder


def random_ms_diffusion_state_dict(unet, text_encoder, image_encoder, seed: int = 0, resampler: dict | None = None,
                                   num_dummy_tokens: int = 4) -> dict:
    """Random MS-Diffusion weights in the layout of the released ``ms_adapter.bin``:
    ``{"image_proj": <resampler>, "ms_adapter": {"1.to_k_ip.weight", "1.to_v_ip.weight", "3....": ...},
    "dummy_image_tokens": [1, 4, cross_attention_dim]}``. ``text_encoder`` and ``image_encoder`` may be models
    or their configs (only sizes are read); the UNet's global RNG state is left alone."""
    text_cfg, image_cfg = getattr(text_encoder, "config", text_encoder), getattr(image_encoder, "config", image_encoder)
    sizes = {**RESAMPLER_DEFAULTS, **(MS_DIFFUSION_RESAMPLER if resampler is None else resampler)}
    cross_dim = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = GroundingResampler(embedding_dim=image_cfg.hidden_size, output_dim=cross_dim,
                                  phrase_dim=text_cfg.projection_dim, **sizes)
    g = torch.Generator().manual_seed(seed + 1)
    layers = {}
    for index, name in adapter_layers(unet):
        attn = unet.get_submodule(name[: -len(".processor")])
        inner, ca_dim = attn.to_k.out_features, attn.to_k.in_features
        layers[f"{index}.to_k_ip.weight"] = torch.randn(inner, ca_dim, generator=g) * ca_dim**-0.5
        layers[f"{index}.to_v_ip.weight"] = torch.randn(inner, ca_dim, generator=g) * ca_dim**-0.5
    return {"image_proj": {k: v.detach().clone() for k, v in proj.state_dict().items()}, "ms_adapter": layers,
            "dummy_image_tokens": torch.randn(1, num_dummy_tokens, cross_dim, generator=g)}


def write_tiny(root: str | Path, seed: int = 0) -> Path:
    """Writes, once each and beside the tiny hub (:func:`write_tiny_hub`, written first if missing, never
    changed): ``root/CLIP-ViT-bigG-14`` (a tiny bigG-like CLIP model, as laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)
    and ``root/MS-Diffusion`` (as doge1516/MS-Diffusion: ``ms_adapter.bin`` for the tiny SDXL-like model, and
    ``sd15/ms_adapter.bin`` for the tiny SD1.5-like one, which has no released counterpart). Returns ``root``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPConfig, CLIPTextConfig

    from anyms.tiny import write_tiny_hub
    from runfolder import write_folder_once

    root = Path(write_tiny_hub(root, seed))
    write_folder_once(root / BIGG_DIR, lambda tmp: tiny_bigg_clip(seed + 5).save_pretrained(tmp),
                      "tiny random bigG-like CLIP model written by anyms.tiny.write_tiny_ms_diffusion")

    def write(tmp: Path) -> None:
        image_cfg = CLIPConfig.from_pretrained(root / BIGG_DIR).vision_config
        for i, (kind, rel) in enumerate(MS_DIFFUSION_FILES.items()):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / kind / "unet"))
            text_cfg = CLIPTextConfig.from_pretrained(root / kind / "text_encoder")
            sd = random_ms_diffusion_state_dict(unet, text_cfg, image_cfg, seed=seed + 10 * (i + 1))
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            torch.save(sd, tmp / rel)

    write_folder_once(root / MS_DIFFUSION_DIR, write,
                      "tiny random MS-Diffusion weights written by anyms.tiny.write_tiny_ms_diffusion")
    return root


write_tiny_ms_diffusion = write_tiny  # its name in anyms.tiny before issue 17
