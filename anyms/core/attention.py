"""AnyMS cross-attention: the image term of Eq. 3-8 as a pure function, and a diffusers processor.

Global decoupling (Eq. 3): ``Z = Z_text + Z_image``; the text stream uses the layer's own ``to_k/to_v``,
the image stream the IP-Adapter's ``to_k_ip/to_v_ip``. Local decoupling (Eq. 4-6, crop-and-merge): the
queries a subject owns attend to that subject's tokens only; queries outside every box get no image term.

Modes of :func:`image_attention`:

- ``crop_merge``: literal Eq. 5-6: crop each subject's owned queries, attend, write back (the reference);
- ``fused`` (the default): the same result at less than the stock IP-Adapter's cost: the queries grouped by
  owner with one gather, one attention call per subject on a contiguous slice, one scatter back (see
  :func:`grouped_attention`);
- ``masked_sum``: Eq. 7 (ablation w/o crop-and-merge): each subject attends with all queries, its output
  is multiplied by its hard box mask, and overlaps add;
- ``sum``: Eq. 8 (ablation w/o local decoupling): one softmax per subject, summed, no layout;
- ``joint``: one softmax over all subjects' tokens, no layout (diffusers' default for several images);
- ``none``: no image term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

from anyms.core.layout import Layout, grid_for

MODES = ("fused", "crop_merge", "masked_sum", "sum", "joint", "none")
LAYOUT_MODES = ("fused", "crop_merge", "masked_sum")
ALL_TOKEN_MODES = ("fused", "masked_sum", "joint")  # computed from all subjects' tokens as one tensor


def _check_inputs(q, n_subjects, layout, grid, mode, scales) -> list[float]:
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {MODES}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, H, L, D], got shape {tuple(q.shape)}")
    if n_subjects != len(layout):
        raise ValueError(f"got keys for {n_subjects} subjects but the layout has {len(layout)} ({layout.names})")
    h, w = grid
    if h * w != q.shape[2]:
        raise ValueError(f"grid {h}x{w} has {h * w} tokens but q has {q.shape[2]} queries")
    scales = list(layout.scales if scales is None else scales)
    if len(scales) != len(layout):
        raise ValueError(f"got {len(scales)} scales for {len(layout)} subjects")
    return [float(s) for s in scales]


def image_attention(
    q: torch.Tensor,
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    layout: Layout,
    grid: tuple[int, int],
    mode: str = "fused",
    scales: Sequence[float] | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """The image term of AnyMS cross-attention.

    q: ``[B, H, L, D]`` queries, tokens row-major over ``grid = (h, w)``, ``h * w == L``;
    ks, vs: one ``[B, H, T_j, D]`` per subject, in the layout's order;
    scales: multiplies subject j's output (``None``: each ``Subject.scale``);
    softmax_scale: the logits' factor (``None``: ``1 / sqrt(D)``, as the attention layer's default).
    Returns ``[B, H, L, D_v]``.
    """
    if len(ks) != len(vs):
        raise ValueError(f"got {len(ks)} key tensors and {len(vs)} value tensors; need one of each per subject")
    scales = _check_inputs(q, len(ks), layout, grid, mode, scales)
    if mode in ALL_TOKEN_MODES:
        tokens = [k.shape[2] for k in ks]
        keys, values = torch.cat(list(ks), dim=2), torch.cat(list(vs), dim=2)
        return attend_all_tokens(q, keys, values, tokens, layout, grid, mode, scales, softmax_scale)

    B, H, L, _ = q.shape
    out = q.new_zeros(B, H, L, vs[0].shape[-1])
    if mode == "none":
        return out

    def attend(query, key, value):
        return F.scaled_dot_product_attention(query, key, value, scale=softmax_scale)

    if mode == "sum":
        for j in range(len(ks)):
            out = out + scales[j] * attend(q, ks[j], vs[j])
        return out

    # crop_merge, the literal Eq. 5-6 and the reference that fused is tested against
    owner = layout.owner_map(*grid).flatten().to(q.device)  # [L], -1 outside every box
    for j in range(len(ks)):
        idx = (owner == j).nonzero(as_tuple=True)[0]
        if idx.numel():
            out[:, :, idx] = scales[j] * attend(q[:, :, idx], ks[j], vs[j])
    return out


def attend_all_tokens(q, keys, values, tokens, layout, grid, mode, scales, softmax_scale=None, out=None):
    """The image term of the modes that take all subjects' tokens as one tensor (:data:`ALL_TOKEN_MODES`):
    ``keys`` / ``values`` ``[B, H, sum T_j, D]`` in layout order, ``tokens[j] = T_j``, as the processor
    projects them. With ``out``, the term is added into ``out`` (in place when no graph is recorded) and
    ``out`` is returned."""
    if mode == "fused":  # each query, its owner's tokens
        return grouped_attention(q, keys, values, owner_groups(layout, grid, q.device), tokens, scales,
                                 softmax_scale, out)
    if mode == "masked_sum":  # each query, the tokens of every subject whose box covers it, summed (Eq. 7)
        return grouped_attention(q, keys, values, box_groups(layout, grid, q.device), tokens, scales,
                                 softmax_scale, out)
    if any(s != 1.0 for s in scales):  # joint
        per_token = [s for s, t in zip(scales, tokens) for _ in range(t)]
        values = values * torch.tensor(per_token, dtype=values.dtype, device=values.device)[:, None]
    image = F.scaled_dot_product_attention(q, keys, values, scale=softmax_scale)
    return image if out is None else _accumulate(out, image)


def grouped_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    groups: QueryGroups,
    tokens: Sequence[int],
    scales: Sequence[float],
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each group of queries attends to its subject's tokens only: one gather puts each subject's queries
    side by side, then per subject one attention call on its contiguous slice (with a slice of ``keys`` /
    ``values``, no copy) whose result is scatter-added back in place (a query in several groups gets their
    sum; a query in none, nothing). The ``fused`` mode (Eq. 5-6) with :func:`owner_groups`, ``masked_sum``
    (Eq. 7) with :func:`box_groups`.

    Why not one attention call over all ``sum T_j`` tokens with a per-query key mask (the first fused
    form): that costs every query every subject's tokens, so it grows with n, and the masked kernel is
    slower than the plain one. Measured on CPU (``benchmarks/attention.py``) the grouped form costs less
    than the stock IP-Adapter's joint softmax and hardly grows with n. The Python loop is over subjects,
    not tokens: two calls per subject, no tensor built per subject.

    keys, values: ``[B, H, sum T_j, D]`` in layout order, ``tokens[j] = T_j``; scales: one per subject.
    Returns ``[B, H, L, D_v]``: the image term, or ``out`` with the image term added (in place when no
    graph is recorded) when ``out`` is given.
    """
    if out is None:
        out = q.new_zeros(*q.shape[:3], values.shape[-1])
    grad = torch.is_grad_enabled()  # autograd may have saved out (the text attention's output): add to a copy
    # Gather and scatter in the [B, L, H, D] view: where q comes from the processor's projection (diffusers'
    # layout) a query is one contiguous row of H*D numbers there, so queries move as whole rows.
    q_rows = q.transpose(1, 2).index_select(1, groups.order)  # [B, sum of group sizes, H, D], group by group
    out_rows = out.transpose(1, 2).clone() if grad else out.transpose(1, 2)
    key_start = 0
    for (start, end), t, scale in zip(groups.spans, tokens, scales):
        keys_j, values_j = keys[:, :, key_start:key_start + t], values[:, :, key_start:key_start + t]
        key_start += t
        if end == start:
            continue
        part = F.scaled_dot_product_attention(q_rows[:, start:end].transpose(1, 2), keys_j, values_j,
                                              scale=softmax_scale)
        if scale != 1.0:
            # on the output, not on the values, so that one full-frame subject gives exactly the stock
            # IP-Adapter's arithmetic (scale * attention)
            part = part * scale if grad else part.mul_(scale)
        out_rows.index_add_(1, groups.order[start:end], part.transpose(1, 2))
    return out_rows.transpose(1, 2)


def _accumulate(out: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``out + image``, in place when no graph is recorded (autograd may have saved ``out`` for backward)."""
    return out + image if torch.is_grad_enabled() else out.add_(image)


@dataclass(frozen=True, eq=False)
class QueryGroups:
    """The queries of a grid in one group per subject, for :func:`grouped_attention`.

    order: query indices, group 0's first (row-major within a group), then group 1's, ...;
    spans: per subject, the ``(start, end)`` of its group in ``order``.
    """

    order: torch.Tensor
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def from_members(cls, members: Sequence[torch.Tensor], device) -> "QueryGroups":
        """From one bool ``[L]`` mask per subject (its group's queries). Built outside inference mode even
        when called inside it: the groups are cached with the layout, and an inference tensor could not be
        used later by a call that autograd records."""
        with torch.inference_mode(False):
            indices = [m.nonzero(as_tuple=True)[0] for m in members]
            ends = torch.tensor([len(i) for i in indices]).cumsum(0).tolist()
            spans = tuple((end - len(i), end) for i, end in zip(indices, ends))
            return cls(torch.cat(indices).to(device), spans)


def owner_groups(layout: Layout, grid: tuple[int, int], device) -> QueryGroups:
    """Each query in the group of the subject that owns it (none outside every box): the ``fused`` mode.
    Built once per grid and device and kept with the layout, shared by every layer and step of a call."""
    def build() -> QueryGroups:
        owner = layout.owner_map(*grid).flatten()  # [L], -1 outside every box
        return QueryGroups.from_members([owner == j for j in range(len(layout))], device)

    return layout.cached(("owner_groups", *grid, torch.device(device)), build)


def box_groups(layout: Layout, grid: tuple[int, int], device) -> QueryGroups:
    """Each query in the group of every subject whose box covers it: the ``masked_sum`` mode. Cached like
    :func:`owner_groups`."""
    def build() -> QueryGroups:
        return QueryGroups.from_members(list(layout.box_masks(*grid).flatten(1)), device)

    return layout.cached(("box_groups", *grid, torch.device(device)), build)


@dataclass
class Prelude:
    """A cross-attention call's inputs as every processor here prepares them (:func:`attention_prelude`)."""

    residual: torch.Tensor
    input_ndim: int
    spatial_hw: tuple[int, int] | None
    shape4d: tuple[int, int, int, int] | None
    batch_size: int
    head_dim: int
    query: torch.Tensor  # [B, H, L, D]
    key: torch.Tensor  # [B, H, S, D], from the text tokens
    value: torch.Tensor
    attention_mask: torch.Tensor | None  # [B, H, L or 1, S] or None

    def heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        """``[B, len, H*D] -> [B, H, len, D]``."""
        return t.view(self.batch_size, -1, heads, self.head_dim).transpose(1, 2)


def attention_prelude(attn: Attention, hidden_states: torch.Tensor, text: torch.Tensor | None,
                      attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> Prelude:
    """diffusers' attention prelude, once for every processor: spatial norm, a 4-D input flattened to tokens,
    the attention mask prepared per head, group norm, the query, the text (normed when the layer says so)
    projected to keys and values, all split into heads. ``text`` None: self-attention."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    spatial_hw = shape4d = None
    if input_ndim == 4:
        shape4d = tuple(hidden_states.shape)
        batch_size, channel, height, width = shape4d
        spatial_hw = (height, width)
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = hidden_states.shape if text is None else text.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if text is None:
        text = hidden_states
    elif attn.norm_cross:
        text = attn.norm_encoder_hidden_states(text)
    key, value = attn.to_k(text), attn.to_v(text)
    head_dim = key.shape[-1] // attn.heads

    def heads(t):
        return t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

    return Prelude(residual, input_ndim, spatial_hw, shape4d, batch_size, head_dim, heads(query), heads(key),
                   heads(value), attention_mask)


def attention_epilogue(attn: Attention, out: torch.Tensor, p: Prelude) -> torch.Tensor:
    """``out [B, H, L, D]`` back to the layer's output: heads merged, ``to_out``, the 4-D shape, the residual."""
    hidden_states = out.transpose(1, 2).reshape(p.batch_size, -1, attn.heads * p.head_dim).to(p.query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if p.input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*p.shape4d)
    if attn.residual_connection:
        hidden_states = hidden_states + p.residual
    return hidden_states / attn.rescale_output_factor


def split_ip_adapter_states(encoder_hidden_states):
    """``(text, image input)`` as diffusers' IP-Adapter processors receive them: ``(text, [embeddings])``."""
    if isinstance(encoder_hidden_states, tuple):
        text, images = encoder_hidden_states
        return text, images
    return encoder_hidden_states, None


def ip_adapter_logits(to_k_ip, attn, query, image_input, rows, split_heads) -> tuple[torch.Tensor, int]:
    """``([B, H, L, n*T] logits of the queries on every subject's image tokens, T)`` through one adapter."""
    embeds = image_input[0]
    if embeds.ndim == 3:
        embeds = embeds[:, None]
    T = embeds.shape[2]
    keys = split_heads(to_k_ip(embeds.flatten(1, 2)))[rows].float()  # [B, H, n*T, D]
    return query @ keys.transpose(-1, -2) * attn.scale, T


@dataclass
class AnyMSState:
    """What one generation call tells the processors of one UNet: set by the pipeline before each call.

    Each :func:`install` makes its own, so two pipelines never share a layout.
    """

    layout: Layout | None = None
    latent_hw: tuple[int, int] | None = None
    mode: str = "fused"
    scales: Sequence[float] | None = None  # None: each Subject.scale
    # keep each layer's projected subject tokens between the steps of a call (see AnyMSAttnProcessor._project):
    # a little faster, but it holds n x T keys and values per layer (16-18 MiB for 5 subjects on SD1.5), so
    # off by default: memory as the stock IP-Adapter's
    reuse_projected_tokens: bool = False


class AnyMSAttnProcessor(IPAdapterAttnProcessor2_0):
    """Eq. 3 for one cross-attention layer: text attention plus :func:`image_attention` through the
    IP-Adapter's projections, taken over from the stock processor (the same modules, so the same
    parameters and state-dict keys).

    A subclass of diffusers' processor so that diffusers' own adapter tools keep working on it:
    ``pipe.set_ip_adapter_scale(s)`` sets the adapter scale (it multiplies every subject's scale) and
    ``pipe.unload_ip_adapter()`` removes it with the adapter.
    """

    def __init__(self, stock: IPAdapterAttnProcessor2_0, state: AnyMSState):
        torch.nn.Module.__init__(self)  # no new projections: the stock processor's are used
        if len(stock.to_k_ip) != 1:
            raise ValueError(
                f"AnyMS uses one IP-Adapter, {len(stock.to_k_ip)} are loaded; unload the others "
                "(pipe.unload_ip_adapter()) and load one"
            )
        self.hidden_size, self.cross_attention_dim = stock.hidden_size, stock.cross_attention_dim
        self.num_tokens, self.scale = stock.num_tokens, stock.scale
        self.to_k_ip, self.to_v_ip = stock.to_k_ip, stock.to_v_ip
        self.state = state
        object.__setattr__(self, "stock", stock)  # kept for uninstall, not registered as a submodule
        self._projected_tokens: tuple | None = None  # see _project

    @property
    def adapter_scale(self) -> float:
        scale = self.scale[0]
        if isinstance(scale, (list, tuple)):
            raise ValueError(
                "the IP-Adapter has per-image scales (set_ip_adapter_scale with a list); AnyMS takes "
                "per-subject scales from Subject.scale: set one adapter scale"
            )
        return float(scale)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ip_hidden_states = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        p = attention_prelude(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        # global decoupling: the text stream ...
        out = F.scaled_dot_product_attention(p.query, p.key, p.value, attn_mask=p.attention_mask, scale=attn.scale)
        # ... plus the image stream, each on its own softmax, added into the text stream's output
        if ip_hidden_states is not None and self.state.mode != "none":
            out = self._add_image_term(out, attn, p.query, ip_hidden_states, p.spatial_hw)
        return attention_epilogue(attn, out, p)

    # --- what the attention-map recorder asks (anyms.core.attention_maps.RecordableProcessor) ---

    def split_encoder_states(self, encoder_hidden_states):
        return split_ip_adapter_states(encoder_hidden_states)

    def subject_attention_weights(self, attn, query, image_input, layout: Layout, grid, rows, split_heads) -> torch.Tensor:
        """``[n, B, H, L]``: each subject has its own softmax (sum 1 over its tokens), seen where the mode lets
        the query see the subject (owned tokens for ``fused``/``crop_merge``, the box for ``masked_sum``,
        everywhere for ``sum``); ``joint``: the subject's share of one softmax; ``none``: 0."""
        n, (B, H, L, _) = len(layout), query.shape
        mode = self.state.mode
        if image_input is None or mode == "none":
            return query.new_zeros(n, B, H, L)
        logits, T = ip_adapter_logits(self.to_k_ip[0], attn, query, image_input, rows, split_heads)
        if mode == "joint":
            return logits.softmax(-1).unflatten(-1, (n, T)).sum(-1).permute(3, 0, 1, 2)
        per_subject = logits.unflatten(-1, (n, T)).softmax(-1).sum(-1).permute(3, 0, 1, 2)  # [n, B, H, L], ~1
        if mode in ("fused", "crop_merge"):
            owner = layout.owner_map(*grid).flatten().to(query.device)
            sees = torch.stack([owner == j for j in range(n)])
        elif mode == "masked_sum":
            sees = layout.box_masks(*grid).flatten(1).to(query.device)
        else:  # sum: every query sees every subject
            sees = torch.ones(n, L, dtype=torch.bool, device=query.device)
        return per_subject * sees[:, None, None, :]

    def _add_image_term(self, out, attn, query, ip_hidden_states, spatial_hw):
        state = self.state
        if state.layout is None:
            raise RuntimeError("AnyMS processor has no layout: set state.layout (the pipeline does this per call)")
        if len(ip_hidden_states) != 1:
            raise ValueError(f"AnyMS uses one IP-Adapter, got image embeddings for {len(ip_hidden_states)}")
        embeds = ip_hidden_states[0]
        if embeds.ndim == 3:  # [B, T, dim]: one image
            embeds = embeds[:, None]
        B, n, T, _ = embeds.shape
        if n != len(state.layout):
            raise ValueError(
                f"got image embeddings of {n} subjects but the layout has {len(state.layout)} "
                f"({state.layout.names}); encode one reference image per subject, in layout order"
            )
        keys, values = self._project(embeds, attn.heads, query.shape[-1])
        grid = self._grid(query.shape[2], spatial_hw)
        scales = list(state.layout.scales if state.scales is None else state.scales)
        scales = [self.adapter_scale * s for s in scales]
        if state.mode in ALL_TOKEN_MODES:  # the hot path: all subjects' tokens as projected, added in place
            scales = _check_inputs(query, n, state.layout, grid, state.mode, scales)
            return attend_all_tokens(query, keys, values, [T] * n, state.layout, grid, state.mode, scales,
                                     attn.scale, out=out)
        image = image_attention(query, keys.split(T, dim=2), values.split(T, dim=2), state.layout, grid,
                                state.mode, scales, softmax_scale=attn.scale)
        return _accumulate(out, image)

    def _project(self, embeds: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every subject's tokens through the adapter's key and value projections, one matmul each, as
        ``[B, H, n*T, D]`` (subject j: tokens ``j*T .. (j+1)*T``).

        With ``state.reuse_projected_tokens``: they depend on the image embeddings only, which stay the same
        over the denoising steps of a call (the UNet recomputes them every step, to the same values), so the
        last ones are kept and reused while the embeddings are equal (by value) and the weights unchanged:
        n subjects cost n projections per call, not per step. Never while autograd records."""
        reuse = self.state.reuse_projected_tokens and not torch.is_grad_enabled()
        weights = _identity(self.to_k_ip[0].weight, self.to_v_ip[0].weight) if reuse else None
        kept = self._projected_tokens
        if reuse and kept is not None and kept[1] == weights and _equal(kept[0], embeds):
            return kept[2], kept[3]
        keys = self._heads(self.to_k_ip[0](embeds), heads, head_dim)
        values = self._heads(self.to_v_ip[0](embeds), heads, head_dim)
        self._projected_tokens = (embeds, weights, keys, values) if reuse and weights is not None else None
        return keys, values

    @staticmethod
    def _heads(projected: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """``[B, n, T, H*D]`` -> ``[B, H, n*T, D]`` (a view)."""
        B, n, T, _ = projected.shape
        return projected.view(B, n * T, heads, head_dim).transpose(1, 2)

    def _grid(self, query_len: int, spatial_hw: tuple[int, int] | None) -> tuple[int, int]:
        if spatial_hw is not None:
            return spatial_hw
        if self.state.latent_hw is None:
            raise RuntimeError("AnyMS processor has no latent size: set state.latent_hw (the pipeline does this)")
        return grid_for(query_len, self.state.latent_hw)


class StockIPAdapterProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' own ``IPAdapterAttnProcessor2_0``, computing exactly what it computes (its ``__call__``, on
    the stock processor's modules), that also answers the attention-map recorder: without masks every
    subject's tokens share one softmax; with ``cross_attention_kwargs["ip_adapter_masks"]`` each subject has
    its own softmax times its mask, downsampled to the layer's grid by diffusers' ``IPAdapterMaskProcessor``."""

    def __init__(self, stock: IPAdapterAttnProcessor2_0):
        torch.nn.Module.__init__(self)
        self.hidden_size, self.cross_attention_dim = stock.hidden_size, stock.cross_attention_dim
        self.num_tokens, self.scale = stock.num_tokens, stock.scale
        self.to_k_ip, self.to_v_ip = stock.to_k_ip, stock.to_v_ip
        object.__setattr__(self, "stock", stock)  # kept for uninstall, not registered as a submodule
        self._masks = None  # the masks of the current call, for the recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale: float = 1.0, ip_adapter_masks=None):
        self._masks = ip_adapter_masks
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale=scale,
                                ip_adapter_masks=ip_adapter_masks)

    def split_encoder_states(self, encoder_hidden_states):
        return split_ip_adapter_states(encoder_hidden_states)

    def subject_attention_weights(self, attn, query, image_input, layout: Layout, grid, rows, split_heads) -> torch.Tensor:
        n, (B, H, L, _) = len(layout), query.shape
        if image_input is None:
            return query.new_zeros(n, B, H, L)
        logits, T = ip_adapter_logits(self.to_k_ip[0], attn, query, image_input, rows, split_heads)
        if self._masks is None:  # one joint softmax: each subject's share of it
            return logits.softmax(-1).unflatten(-1, (n, T)).sum(-1).permute(3, 0, 1, 2)
        from diffusers.image_processor import IPAdapterMaskProcessor

        masks = self._masks[0]  # [1, n, h, w]: one adapter
        per_subject = logits.unflatten(-1, (n, T)).softmax(-1).sum(-1).permute(3, 0, 1, 2)  # [n, B, H, L]
        seen = torch.stack([IPAdapterMaskProcessor.downsample(masks[:, j], 1, L, 1)[0, :, 0] for j in range(n)])
        return per_subject * seen.to(per_subject)[:, None, None, :]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same values (not just the same tensor object: a caller may refill a buffer in place)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def _identity(*weights: torch.Tensor) -> tuple | None:
    """What changes when a weight is replaced or modified in place: its storage and version counter;
    ``None`` for weights that keep no version counter (made under inference mode): never reuse then."""
    try:
        return tuple((w.data_ptr(), w._version) for w in weights)
    except RuntimeError:
        return None


def install(unet, mode: str = "fused", layout: Layout | None = None,
            latent_hw: tuple[int, int] | None = None, reuse_projected_tokens: bool = False) -> AnyMSState:
    """Puts AnyMS processors on every cross-attention layer that has an IP-Adapter processor; other
    layers (self-attention) keep theirs. Returns the state the pipeline sets before each call."""
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {MODES}")
    state = AnyMSState(layout=layout, latent_hw=latent_hw, mode=mode, reuse_projected_tokens=reuse_projected_tokens)
    processors, swapped = {}, 0
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, (AnyMSAttnProcessor, StockIPAdapterProcessor)):
            proc = proc.stock
        if isinstance(proc, IPAdapterAttnProcessor):
            raise ValueError(
                f"{name} has the torch<2 IPAdapterAttnProcessor; AnyMS needs IPAdapterAttnProcessor2_0 (torch>=2)"
            )
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc = AnyMSAttnProcessor(proc, state)
            swapped += 1
        processors[name] = proc
    if not swapped:
        raise ValueError("the UNet has no IP-Adapter processors: load an IP-Adapter first (pipe.load_ip_adapter)")
    unet.set_attn_processor(processors)
    return state


def uninstall(unet) -> None:
    """Puts back the stock IP-Adapter processors (with the same, never copied, adapter weights)."""
    processors = {
        name: (proc.stock if isinstance(proc, (AnyMSAttnProcessor, StockIPAdapterProcessor)) else proc)
        for name, proc in unet.attn_processors.items()
    }
    unet.set_attn_processor(processors)


def install_stock(unet) -> int:
    """diffusers' own IP-Adapter processors (:class:`StockIPAdapterProcessor`) on every layer that has one;
    returns how many."""
    processors, swapped = {}, 0
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, (AnyMSAttnProcessor, StockIPAdapterProcessor)):
            proc = proc.stock
        if isinstance(proc, IPAdapterAttnProcessor2_0) and not isinstance(proc, StockIPAdapterProcessor):
            proc = StockIPAdapterProcessor(proc)
            swapped += 1
        processors[name] = proc
    unet.set_attn_processor(processors)
    return swapped
