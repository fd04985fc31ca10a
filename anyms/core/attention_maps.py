"""Attention maps: where each subject's image tokens act, per layer and step (the paper's Fig. 7).

An opt-in recorder (``record_attention=true``). While one image is generated it wraps every
cross-attention processor of the UNet in a :class:`RecordingProcessor` that first calls the wrapped
processor unchanged (so the image is byte-identical with or without recording) and then, at the chosen
grids and steps, computes from the same inputs, for the conditional branch of classifier-free guidance:

- **image**: per subject j and query, the attention probability the query gives to subject j's tokens,
  summed over those tokens and averaged over heads, in the image attention the method actually computes,
  as the processor itself reports it (:class:`RecordableProcessor`: the recorder asks, it never tests a
  class). AnyMS modes give each subject its own softmax, seen where the mode lets the query see the subject;
  diffusers' stock IP-Adapter gives subject j's share of one softmax (its own softmax times its soft mask
  with ``ip_adapter_masks``); MS-Diffusion subject j's share of its masked softmax, 0 outside every box;
  a processor that does not answer (GLIGEN's text cross-attention) gets a zero image map;
- **text**: per subject, the text stream's probability on the tokens of the subject's phrase inside the
  prompt (found by tokenizing both), summed over those tokens and averaged over heads.

Maps are averaged over the layers of a grid and the recorded steps, kept per grid, and combined on the
finest recorded grid (bilinear, mean over grids). The arrays and their names are the run folder's format
(:mod:`runfolder.attention_maps`); "attention in box" is computed from them by the evaluation wing.
With recording off nothing is wrapped: no cost.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from anyms.core.attention import attention_prelude
from anyms.core.layout import Layout, grid_for, grid_levels

def grid_key(h: int, w: int) -> str:
    """A grid's name in the arrays (``runfolder.attention_maps.grid_key``, restated so that the core needs
    diffusers alone; tests check the arrays with ``runfolder.attention_maps.check_attention_maps``)."""
    return f"{int(h)}x{int(w)}"


DEFAULT_LEVELS = (2, 4)  # the latent's 1/2 and 1/4: SDXL's two cross-attention resolutions


@dataclass(frozen=True)
class AttentionMapSettings:
    """Which cross-attention layers and steps are recorded.

    levels: the grids by their downsampling factor from the latent (1 = the latent's own size, 2 = half,
    4 = a quarter, ...; powers of 2, as SD's UNet levels); steps: denoising step indices (0 = the first),
    ``None`` for every step.
    """

    levels: tuple[int, ...] = DEFAULT_LEVELS
    steps: tuple[int, ...] | None = None

    def __post_init__(self):
        levels = tuple(self.levels)
        if not levels:
            raise ValueError("attention_maps.levels is empty; give downsampling factors such as [2, 4]")
        for f in levels:
            if not isinstance(f, int) or isinstance(f, bool) or f < 1 or f & (f - 1):
                raise ValueError(f"attention_maps.levels: {f!r} is not a power of 2 (1, 2, 4, 8, ...); "
                                 "give the grids as downsampling factors from the latent")
        object.__setattr__(self, "levels", levels)
        if self.steps is not None:
            steps = tuple(self.steps)
            if not steps or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in steps):
                raise ValueError(f"attention_maps.steps must be null (every step) or step indices >= 0, got {self.steps!r}")
            object.__setattr__(self, "steps", steps)

    def check_steps(self, num_steps: int) -> None:
        if self.steps is not None and max(self.steps) >= num_steps:
            raise ValueError(f"attention_maps.steps {list(self.steps)}: generation has {num_steps} steps "
                             f"(indices 0..{num_steps - 1}); drop the larger ones or set attention_maps.steps=null")

    def grids(self, latent_hw: tuple[int, int], cross_attention_grids: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """The recorded grids, finest first: the chosen levels at which the model has cross-attention.
        An error naming the model's levels when none of the chosen ones has any."""
        levels = grid_levels(latent_hw)
        available = set(map(tuple, cross_attention_grids))
        chosen = {levels[int(math.log2(f))] for f in self.levels if int(math.log2(f)) < len(levels)}
        grids = sorted(chosen & available, key=lambda hw: -hw[0] * hw[1])
        if not grids:
            factors = sorted(2**i for i, hw in enumerate(levels) if hw in available)
            raise ValueError(f"attention_maps.levels {list(self.levels)}: this model has cross-attention only at "
                             f"downsampling factors {factors} of its {latent_hw[0]}x{latent_hw[1]} latent; choose among them")
        return grids


def phrase_token_positions(tokenizer, prompt: str, phrase: str) -> list[int]:
    """Positions of the phrase's tokens in the tokenized prompt (special tokens counted, as the text
    encoder sees them): the first place the whole phrase occurs, else every prompt token that is one of the
    phrase's tokens, else none. A phrase cut off with the prompt (:func:`phrase_cut_off`) has none."""
    prompt_ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True).input_ids
    phrase_ids = tokenizer(phrase, add_special_tokens=False).input_ids
    n = len(phrase_ids)
    for start in range(len(prompt_ids) - n + 1):
        if n and prompt_ids[start:start + n] == phrase_ids:
            return list(range(start, start + n))
    if phrase_cut_off(tokenizer, prompt, phrase):
        return []  # its tokens elsewhere in the prompt are other words, not this subject's phrase
    special = set(tokenizer.all_special_ids)
    return [i for i, t in enumerate(prompt_ids) if t in set(phrase_ids) and t not in special]


def phrase_cut_off(tokenizer, prompt: str, phrase: str) -> bool:
    """Whether the whole phrase occurs in the prompt's tokens only past the text encoder's limit
    (``tokenizer.model_max_length``, BOS and EOS included), so truncation cuts it off."""
    full = tokenizer(prompt, truncation=False, verbose=False).input_ids
    phrase_ids = tokenizer(phrase, add_special_tokens=False).input_ids
    n, kept = len(phrase_ids), tokenizer.model_max_length - 1  # the last kept position is EOS
    starts = [i for i in range(len(full) - n + 1) if n and full[i:i + n] == phrase_ids]
    return bool(starts) and starts[0] + n > kept


class AttentionRecorder:
    """Accumulates the maps of one image. Made by the pipeline for each call (see :meth:`attached`)."""

    def __init__(self, settings: AttentionMapSettings, layout: Layout, grids: Sequence[tuple[int, int]],
                 latent_hw: tuple[int, int], phrase_positions: Sequence[Sequence[int]], cfg: bool,
                 cut_off: Sequence[bool] | None = None):
        self.settings, self.layout, self.latent_hw = settings, layout, tuple(latent_hw)
        self.grids = [tuple(g) for g in grids]
        self.phrase_positions = [list(p) for p in phrase_positions]
        self.cfg = cfg
        self.step = -1  # the UNet's forward pre-hook counts the steps
        self.method = ""
        self._sums: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._layers: dict[tuple[int, int], set[str]] = {g: set() for g in self.grids}
        self._calls: dict[tuple[int, int], int] = {g: 0 for g in self.grids}
        self._steps: set[int] = set()
        for j, (s, pos) in enumerate(zip(layout, self.phrase_positions)):
            if not pos and cut_off is not None and cut_off[j]:
                warnings.warn(f"attention maps: the phrase {s.phrase!r} of subject {s.name!r} lies past the text "
                              "encoder's token limit and was cut off with the prompt (generation.truncate_prompt=true); "
                              "its text map is zero", stacklevel=2)
            elif not pos:
                warnings.warn(f"attention maps: the phrase {s.phrase!r} of subject {s.name!r} is not in the prompt's "
                              "tokens; its text map is zero", stacklevel=2)

    def wants(self, grid: tuple[int, int]) -> bool:
        steps = self.settings.steps
        return tuple(grid) in self._calls and (steps is None or self.step in steps)

    def cond_rows(self, batch: int) -> slice:
        """The conditional rows of the batch: diffusers puts the negative half first under CFG."""
        return slice(batch // 2, batch) if self.cfg else slice(0, batch)

    def add(self, layer: str, grid: tuple[int, int], image: torch.Tensor, text: torch.Tensor) -> None:
        """``image``, ``text``: ``[n, L]`` maps of one layer call, already averaged over heads and rows."""
        grid = tuple(grid)
        sums = self._sums.setdefault(grid, {"image": torch.zeros_like(image, dtype=torch.float64),
                                            "text": torch.zeros_like(text, dtype=torch.float64)})
        sums["image"] += image.double()
        sums["text"] += text.double()
        self._calls[grid] += 1
        self._layers[grid].add(layer)
        self._steps.add(self.step)

    def _next_step(self, module, args):
        self.step += 1

    @contextmanager
    def attached(self, unet, method: str) -> Iterator["AttentionRecorder"]:
        """Wraps every cross-attention processor of ``unet`` for the duration of one generation call, counts
        the UNet's calls as steps, and puts the original processors back afterwards."""
        self.method = method
        original = dict(unet.attn_processors)
        wrapped = {name: (RecordingProcessor(p, self, name[: -len(".processor")]) if name.endswith("attn2.processor") else p)
                   for name, p in original.items()}
        unet.set_attn_processor(wrapped)
        handle = unet.register_forward_pre_hook(self._next_step)
        try:
            yield self
        finally:
            handle.remove()
            unet.set_attn_processor(dict(original))

    def result(self) -> dict[str, np.ndarray]:
        """The arrays of :mod:`runfolder.attention_maps`: per recorded grid the mean maps and the box masks,
        and both combined on the finest grid."""
        missing = [grid_key(*g) for g in self.grids if not self._calls[g]]
        if missing:
            raise RuntimeError(f"attention maps: no cross-attention call was recorded at grid(s) {missing}")
        out: dict[str, np.ndarray] = {
            "subjects": np.array(self.layout.names),
            "phrases": np.array([s.phrase for s in self.layout]),
            "grids": np.array(self.grids, dtype=np.int64),
            "steps": np.array(sorted(self._steps), dtype=np.int64),
            "method": np.array(self.method),
            "phrase_found": np.array([bool(p) for p in self.phrase_positions]),
        }
        fine = self.grids[0]
        combined = {"image": [], "text": []}
        for g in self.grids:
            h, w = g
            key = grid_key(h, w)
            out[f"layers_{key}"] = np.array(sorted(self._layers[g]))
            out[f"box_{key}"] = self.layout.box_masks(h, w).numpy()
            for stream in ("image", "text"):
                mean = (self._sums[g][stream] / self._calls[g]).float().view(-1, h, w)
                out[f"{stream}_{key}"] = mean.numpy()
                up = mean if g == fine else F.interpolate(mean[None], size=fine, mode="bilinear", align_corners=False)[0]
                combined[stream].append(up)
        for stream, maps in combined.items():
            out[stream] = torch.stack(maps).mean(0).numpy()
        return out


class RecordingProcessor(torch.nn.Module):
    """Calls the wrapped cross-attention processor unchanged, then records its maps (see the module)."""

    def __init__(self, inner, recorder: AttentionRecorder, layer: str):
        super().__init__()
        if isinstance(inner, torch.nn.Module):
            self.inner = inner
        else:
            object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "recorder", recorder)
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_adapter_masks=None):
        extra = {} if ip_adapter_masks is None else {"ip_adapter_masks": ip_adapter_masks}
        out = self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, temb=temb, **extra)
        with torch.no_grad():
            self._record(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return out

    def _record(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb) -> None:
        rec = self.recorder
        grid = (tuple(hidden_states.shape[-2:]) if hidden_states.ndim == 4
                else grid_for(hidden_states.shape[1], rec.latent_hw))
        if not rec.wants(grid):
            return
        text, image_input = split_encoder_states(self.inner, encoder_hidden_states)
        p = attention_prelude(attn, hidden_states, text, attention_mask, temb)  # as the processors prepare it
        heads = attn.heads

        def split_heads(t):  # [B, len, H*D] -> [B, H, len, D]
            return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)

        rows = rec.cond_rows(p.batch_size)
        query = p.query[rows].float()
        logits = query @ p.key[rows].float().transpose(-1, -2) * attn.scale
        if p.attention_mask is not None:
            logits = logits + p.attention_mask[rows].float()
        text_probs = logits.softmax(-1)  # [B, H, L, text tokens]
        text_map = torch.stack([text_probs[..., pos].sum(-1) if pos else text_probs.new_zeros(text_probs.shape[:-1])
                                for pos in rec.phrase_positions])  # [n, B, H, L]
        image_map = subject_image_weights(self.inner, attn, query, image_input, rec.layout, grid, rows, split_heads)
        rec.add(self.layer, grid, image_map.mean(dim=(1, 2)), text_map.mean(dim=(1, 2)))


class RecordableProcessor(Protocol):
    """What a cross-attention processor answers to be recorded (the recorder never tests a class; a processor
    without these methods is recorded with its text stream only and a zero image map)."""

    def split_encoder_states(self, encoder_hidden_states) -> tuple:
        """``(text tokens, image input)`` from what the processor receives as ``encoder_hidden_states``."""

    def subject_attention_weights(self, attn, query, image_input, layout: Layout, grid, rows, split_heads) -> torch.Tensor:
        """``[n, B, H, L]``: per subject, the probability each query (``query [B, H, L, D]`` in fp32, the batch rows
        ``rows`` only) gives the subject's tokens in the image attention this processor computes."""


def split_encoder_states(processor, encoder_hidden_states):
    """``(text tokens, image input)`` as the processor receives them, asked of the processor."""
    split = getattr(processor, "split_encoder_states", None)
    if split is not None:
        return split(encoder_hidden_states)
    if isinstance(encoder_hidden_states, tuple):
        return encoder_hidden_states[0], None
    return encoder_hidden_states, None


def subject_image_weights(processor, attn, query, image_input, layout: Layout, grid, rows, split_heads) -> torch.Tensor:
    """``[n, B, H, L]``: per subject, the probability each query gives its tokens in the image attention
    ``processor`` computes (see the module's docstring), for the batch rows ``rows``; asked of the processor."""
    weights = getattr(processor, "subject_attention_weights", None)
    if image_input is None or weights is None:
        B, H, L, _ = query.shape
        return query.new_zeros(len(layout), B, H, L)
    return weights(attn, query, image_input, layout, grid, rows, split_heads)
