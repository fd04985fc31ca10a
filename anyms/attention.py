"""AnyMS cross-attention: the image term of Eq. 3-8 as a pure function, and a diffusers processor.

Global decoupling (Eq. 3): ``Z = Z_text + Z_image``; the text stream uses the layer's own ``to_k/to_v``,
the image stream the IP-Adapter's ``to_k_ip/to_v_ip``. Local decoupling (Eq. 4-6, crop-and-merge): the
queries a subject owns attend to that subject's tokens only; queries outside every box get no image term.

Modes of :func:`image_attention`:

- ``crop_merge``: literal Eq. 5-6: crop each subject's owned queries, attend, write back (the reference);
- ``fused``: the same result from one attention call with a per-query key mask (the default);
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

from anyms.layout import Layout, grid_for

MODES = ("fused", "crop_merge", "masked_sum", "sum", "joint", "none")
LAYOUT_MODES = ("fused", "crop_merge", "masked_sum")


def _check_inputs(q, ks, vs, layout, grid, mode, scales) -> list[float]:
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {MODES}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, H, L, D], got shape {tuple(q.shape)}")
    if len(ks) != len(vs):
        raise ValueError(f"got {len(ks)} key tensors and {len(vs)} value tensors; need one of each per subject")
    if len(ks) != len(layout):
        raise ValueError(f"got keys for {len(ks)} subjects but the layout has {len(layout)} ({layout.names})")
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
    scales = _check_inputs(q, ks, vs, layout, grid, mode, scales)
    B, H, L, _ = q.shape
    dv = vs[0].shape[-1]
    out = q.new_zeros(B, H, L, dv)
    if mode == "none":
        return out

    def attend(query, key, value, mask=None):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=softmax_scale)

    if mode == "sum":
        for j in range(len(ks)):
            out = out + scales[j] * attend(q, ks[j], vs[j])
        return out
    if mode == "joint":
        keys = torch.cat(list(ks), dim=2)
        values = torch.cat([s * v for s, v in zip(scales, vs)], dim=2)
        return attend(q, keys, values)

    h, w = grid
    if mode == "masked_sum":
        masks = layout.box_masks(h, w).flatten(1).to(device=q.device, dtype=q.dtype)  # [n, L]
        for j in range(len(ks)):
            out = out + (scales[j] * masks[j])[:, None] * attend(q, ks[j], vs[j])
        return out

    owner = layout.owner_map(h, w).flatten().to(q.device)  # [L], -1 outside every box
    if mode == "crop_merge":
        for j in range(len(ks)):
            idx = (owner == j).nonzero(as_tuple=True)[0]
            if idx.numel():
                out[:, :, idx] = scales[j] * attend(q[:, :, idx], ks[j], vs[j])
        return out

    # fused: each query sees only the tokens of the subject that owns it, in one call
    token_owner = torch.cat([torch.full((k.shape[2],), j, device=q.device) for j, k in enumerate(ks)])
    allowed = owner[:, None] == token_owner[None, :]  # [L, sum T_j]
    boxed = owner >= 0
    allowed[~boxed] = True  # rows with no key would give NaN; they are zeroed below
    query_scale = torch.tensor(scales, device=q.device, dtype=q.dtype)[owner.clamp(min=0)] * boxed
    keys, values = torch.cat(list(ks), dim=2), torch.cat(list(vs), dim=2)
    return attend(q, keys, values, allowed) * query_scale[:, None]


@dataclass
class AnyMSState:
    """What one generation call tells the processors of one UNet: set by the pipeline before each call.

    Each :func:`install` makes its own, so two pipelines never share a layout.
    """

    layout: Layout | None = None
    latent_hw: tuple[int, int] | None = None
    mode: str = "fused"
    scales: Sequence[float] | None = None  # None: each Subject.scale


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
        residual = hidden_states
        ip_hidden_states = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        spatial_hw = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            spatial_hw = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        # global decoupling: the text stream ...
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        # ... plus the image stream, each on its own softmax
        if ip_hidden_states is not None and self.state.mode != "none":
            out = out + self._image_term(attn, query, ip_hidden_states, spatial_hw)

        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _image_term(self, attn, query, ip_hidden_states, spatial_hw):
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
        head_dim = query.shape[-1]
        # [B, n, T, H*D] -> n tensors [B, H, T, D]
        k_ip = self.to_k_ip[0](embeds).view(B, n, T, attn.heads, head_dim).permute(1, 0, 3, 2, 4)
        v_ip = self.to_v_ip[0](embeds).view(B, n, T, attn.heads, head_dim).permute(1, 0, 3, 2, 4)
        if spatial_hw is not None:
            grid = spatial_hw
        elif state.latent_hw is None:
            raise RuntimeError("AnyMS processor has no latent size: set state.latent_hw (the pipeline does this)")
        else:
            grid = grid_for(query.shape[2], state.latent_hw)
        scales = list(state.layout.scales if state.scales is None else state.scales)
        scales = [self.adapter_scale * s for s in scales]
        return image_attention(
            query, list(k_ip), list(v_ip), state.layout, grid, state.mode, scales, softmax_scale=attn.scale
        )


def install(unet, mode: str = "fused", layout: Layout | None = None,
            latent_hw: tuple[int, int] | None = None) -> AnyMSState:
    """Puts AnyMS processors on every cross-attention layer that has an IP-Adapter processor; other
    layers (self-attention) keep theirs. Returns the state the pipeline sets before each call."""
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {MODES}")
    state = AnyMSState(layout=layout, latent_hw=latent_hw, mode=mode)
    processors, swapped = {}, 0
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, AnyMSAttnProcessor):
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
        name: (proc.stock if isinstance(proc, AnyMSAttnProcessor) else proc)
        for name, proc in unet.attn_processors.items()
    }
    unet.set_attn_processor(processors)
