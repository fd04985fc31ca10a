"""One cross-attention layer at SDXL's shapes: AnyMS's attention modes against diffusers' processors.

A real ``diffusers`` ``Attention`` layer with random weights, as SDXL's transformer blocks build it, at the
two levels where SDXL at 1024 px has cross-attention: 64x64 queries (640 channels = 10 heads x 64) and
32x32 (1280 = 20 x 64); CFG batch 2; 77 text tokens of 2048 dims; ``n x 16`` image tokens (IP-Adapter Plus)
for n = 2, 3, 5, 7 subjects laid out as in the anyms11 benchmark. Variants, each the whole processor call
(projections, text and image attention, output projection):

- ``text_only``: diffusers' ``AttnProcessor2_0`` on the text alone (no image term);
- ``stock_joint``: diffusers' ``IPAdapterAttnProcessor2_0``, all subjects' tokens in one softmax (its
  behaviour for several images without masks): **the reference of every ratio**;
- ``stock_masked``: the same processor with ``ip_adapter_masks`` (one box mask per subject at image size,
  as ``IPAdapterMaskProcessor`` gives them), diffusers' way to compute our ``masked_sum``;
- ``anyms_fused`` (the method, as installed by default: the subjects' tokens projected in every call, as
  the stock processor does), ``anyms_crop_merge`` (its literal reference), ``anyms_masked_sum`` and
  ``anyms_sum`` (the ablations): :class:`anyms.core.attention.AnyMSAttnProcessor` on the same layer and weights;
- ``anyms_fused_reuse``: ``fused`` with ``reuse_projected_tokens`` on, called again and again with the same
  image embeddings as over the steps of a generation, so it reuses the projected tokens (steps 2 to 30 of 30).

Times: interleaved rounds after warm-up (see :mod:`benchmarks.common`); memory: the peak RSS increase of
one call, measured in a separate process whose allocator returns freed memory at once.

    python -m benchmarks.attention [--quick] [--rounds N] [--levels 64x64,32x32] [--subjects 2,3,5,7]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass

import torch

from benchmarks.common import (
    EXACT_RSS_ENV,
    REPO,
    device_sync,
    fmt_bytes,
    interleaved,
    log,
    memory_supported,
    peak_increase,
    resolve_device,
)

REFERENCE = "stock_joint"
VARIANTS = ("text_only", "stock_joint", "stock_masked", "anyms_fused", "anyms_fused_reuse", "anyms_crop_merge",
            "anyms_masked_sum", "anyms_sum")
ANYMS_MODES = {"anyms_fused": "fused", "anyms_crop_merge": "crop_merge", "anyms_masked_sum": "masked_sum",
               "anyms_sum": "sum"}
SUBJECT_COUNTS = (2, 3, 5, 7)


@dataclass(frozen=True)
class Shapes:
    """One cross-attention layer's shapes."""

    grid: tuple[int, int]  # query tokens
    heads: int
    head_dim: int
    text_tokens: int = 77
    text_dim: int = 2048  # SDXL's two text encoders, concatenated
    image_tokens: int = 16  # per subject: IP-Adapter Plus's resampler
    image_size: int = 1024  # pixels, for the masks of diffusers' masked path
    batch: int = 2  # classifier-free guidance

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    @property
    def queries(self) -> int:
        return self.grid[0] * self.grid[1]


# SDXL at 1024 px (latent 128x128): cross-attention at 64x64 (down_blocks.1, up_blocks.1) and 32x32
LEVELS = {"64x64": Shapes((64, 64), heads=10, head_dim=64), "32x32": Shapes((32, 32), heads=20, head_dim=64)}
# tiny shapes for --smoke (tests): every code path, in milliseconds
SMOKE_LEVELS = {"8x8": Shapes((8, 8), heads=2, head_dim=8, text_tokens=7, text_dim=16, image_tokens=4, image_size=64)}

# Realistic layouts (anyms11's combinations; 7 = c11 plus two more), with attributes inside objects, so
# there are overlaps for the priority rule and tokens outside every box.
_C11 = [("dog", (0.04, 0.22, 0.56, 0.96), "object"), ("sunglasses", (0.14, 0.28, 0.44, 0.44), "attribute"),
        ("backpack", (0.36, 0.45, 0.62, 0.82), "attribute"), ("poop emoji toy", (0.64, 0.62, 0.80, 0.92), "object"),
        ("red cartoon", (0.80, 0.20, 1.00, 0.92), "object")]
LAYOUT_BOXES = {
    2: [("dog", (0.15, 0.15, 0.85, 0.98), "object"), ("sunglasses", (0.30, 0.22, 0.70, 0.42), "attribute")],  # c02
    3: [_C11[0], _C11[1], ("backpack", (0.60, 0.35, 0.96, 0.92), "object")],  # c07
    5: _C11,  # c11
    7: _C11 + [("ball", (0.58, 0.04, 0.78, 0.30), "object"), ("hat", (0.82, 0.14, 0.98, 0.32), "attribute")],
}


def layout_for(n: int):
    """The benchmark layout of ``n`` subjects (one of :data:`LAYOUT_BOXES`, or the first ``n`` of the 7)."""
    from anyms.core.layout import Layout, Subject

    boxes = LAYOUT_BOXES.get(n) or LAYOUT_BOXES[7][:n]
    if len(boxes) != n:
        raise ValueError(f"no benchmark layout with {n} subjects (at most {len(LAYOUT_BOXES[7])})")
    return Layout([Subject(f"s{i}_{phrase.replace(' ', '_')}", phrase, None, box, role)
                   for i, (phrase, box, role) in enumerate(boxes)])


def box_masks_at_image_size(layout, size: int) -> torch.Tensor:
    """``[1, n, size, size]`` 0/1 masks, one per subject's box: what diffusers' ``ip_adapter_masks`` takes."""
    masks = torch.zeros(1, len(layout), size, size)
    for j, subject in enumerate(layout):
        x0, y0, x1, y1 = (round(c * size) for c in subject.box)
        masks[0, j, y0:y1, x0:x1] = 1.0
    return masks


class Layer:
    """A real cross-attention layer with random weights, its stock IP-Adapter processor and inputs."""

    def __init__(self, shapes: Shapes, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
        from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

        torch.manual_seed(seed)
        self.shapes = shapes
        # as SDXL's BasicTransformerBlock builds attn2
        self.attn = Attention(query_dim=shapes.channels, cross_attention_dim=shapes.text_dim, heads=shapes.heads,
                              dim_head=shapes.head_dim, bias=False, out_bias=True)
        self.stock = IPAdapterAttnProcessor2_0(shapes.channels, shapes.text_dim, num_tokens=(shapes.image_tokens,))
        self.attn.to(device, dtype).eval()
        self.stock.to(device, dtype).eval()
        g = torch.Generator().manual_seed(seed + 1)
        self.hidden = torch.randn(shapes.batch, shapes.queries, shapes.channels, generator=g).to(device, dtype)
        self.text = torch.randn(shapes.batch, shapes.text_tokens, shapes.text_dim, generator=g).to(device, dtype)
        self._generator = g
        self.device, self.dtype = device, dtype

    def image_embeds(self, n: int) -> torch.Tensor:
        s = self.shapes
        g = torch.Generator().manual_seed(100 + n)
        return torch.randn(s.batch, n, s.image_tokens, s.text_dim, generator=g).to(self.device, self.dtype)

    def calls(self, n: int, variants=VARIANTS) -> dict:
        """One zero-argument callable per variant, for ``n`` subjects."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        from anyms.core.attention import AnyMSAttnProcessor, AnyMSState

        attn, hidden, text = self.attn, self.hidden, self.text
        layout = layout_for(n)
        image = self.image_embeds(n)
        masks = box_masks_at_image_size(layout, self.shapes.image_size).to(self.device, self.dtype)
        latent = (self.shapes.grid[0] * 2, self.shapes.grid[1] * 2)  # the layer sits one level below the latent
        text_only = AttnProcessor2_0()
        anyms = {name: AnyMSAttnProcessor(self.stock, AnyMSState(layout=layout, latent_hw=latent, mode=mode))
                 for name, mode in ANYMS_MODES.items()}
        reuse = AnyMSAttnProcessor(self.stock, AnyMSState(layout=layout, latent_hw=latent, mode="fused",
                                                          reuse_projected_tokens=True))

        every = {
            "text_only": lambda: text_only(attn, hidden, encoder_hidden_states=text),
            "stock_joint": lambda: self.stock(attn, hidden, encoder_hidden_states=(text, [image])),
            "stock_masked": lambda: self.stock(attn, hidden, encoder_hidden_states=(text, [image]),
                                               ip_adapter_masks=[masks]),
            **{name: (lambda p=proc: p(attn, hidden, encoder_hidden_states=(text, [image])))
               for name, proc in anyms.items()},
            "anyms_fused_reuse": lambda: reuse(attn, hidden, encoder_hidden_states=(text, [image])),
        }
        return {name: every[name] for name in variants}


def time_level(shapes: Shapes, counts, rounds: int, warmup: int, device: str, variants=VARIANTS) -> list[dict]:
    """Every (n, variant) of one level interleaved in the same rounds, so that both the ratios to the stock
    processor and the growth from n to n' are paired comparisons."""
    layer = Layer(shapes, device)
    calls = {(n, v): call for n in counts for v, call in layer.calls(n, variants).items()}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coarse grids hide small subjects: LayoutWarning, on purpose
        timings = interleaved(calls, rounds, warmup, sync=device_sync(device))
    rows = []
    for n in counts:
        text_ms = timings.median((n, "text_only")) * 1e3 if "text_only" in variants else None
        for v in variants:
            median_ms = timings.median((n, v)) * 1e3
            rows.append({
                "n": n, "variant": v, "median_ms": round(median_ms, 3),
                "spread_ms": round(timings.spread((n, v)) * 1e3, 3),
                "ratio_to_stock": round(timings.ratio((n, v), (n, REFERENCE)), 4) if REFERENCE in variants else None,
                "image_term_ms": round(median_ms - text_ms, 3) if text_ms is not None else None,
                "ratio_to_stock_masked": (round(timings.ratio((n, v), (n, "stock_masked")), 4)
                                          if "stock_masked" in variants else None),
                # paired growth from the fewest subjects: t(n) / t(n_min), median over rounds
                "ratio_to_fewest": round(timings.ratio((n, v), (counts[0], v)), 4),
            })
        log(f"  attention {shapes.grid[0]}x{shapes.grid[1]} n={n}: " + ", ".join(
            f"{r['variant']} {r['median_ms']:.1f} ms ({r['ratio_to_stock']:.3f})" for r in rows[-len(variants):]))
    return rows


def memory_level(shapes: Shapes, counts, device: str, variants=VARIANTS) -> dict[int, dict[str, int]]:
    """Peak memory increase of one call per variant (after one warm-up call), in this process."""
    layer = Layer(shapes, device)
    out = {}
    for n in counts:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calls = layer.calls(n, variants)
            out[n] = {}
            for name, call in calls.items():
                call()
                out[n][name] = peak_increase(call, device)
    return out


def measure_memory(levels: dict[str, Shapes], counts, device: str, smoke: bool) -> dict | None:
    """:func:`memory_level` of every level in a fresh process whose allocator unmaps freed memory at once
    (on the CPU: see :data:`benchmarks.common.EXACT_RSS_ENV`); ``None`` where RSS cannot be read."""
    if not device.startswith("cuda") and not memory_supported():
        return None
    import os

    cmd = [sys.executable, "-m", "benchmarks.attention", "--memory-worker", "--device", device,
           "--levels", ",".join(levels), "--subjects", ",".join(map(str, counts))] + (["--smoke"] if smoke else [])
    env = {**os.environ, **EXACT_RSS_ENV}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"attention memory worker failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {level: {int(n): v for n, v in per_n.items()} for level, per_n in result.items()}


def run(quick: bool = False, smoke: bool = False, rounds: int | None = None, levels=None, counts=None,
        device: str = "auto", memory: bool = True) -> list[dict]:
    """Rows ``{level, n, variant, median_ms, spread_ms, ratio_to_stock, image_term_ms, peak_bytes}``."""
    device = resolve_device(device)
    table = SMOKE_LEVELS if smoke else LEVELS
    levels = list(levels or table)
    counts = list(counts or ((2, 3) if smoke else SUBJECT_COUNTS))
    rounds = rounds or (2 if smoke else 5 if quick else 9)
    warmup = 1
    rows = []
    for level in levels:
        for row in time_level(table[level], counts, rounds, warmup, device):
            rows.append({"level": level, **row})
    peaks = measure_memory({k: table[k] for k in levels}, counts, device, smoke) if memory else None
    for row in rows:
        row["peak_bytes"] = peaks[row["level"]][row["n"]][row["variant"]] if peaks else None
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per level, what the targets are about: the worst ratio of fused to the stock joint processor, fused
    against diffusers' masked path (n >= 3), and the cost per added subject ``(t(n_max) - t(n_min)) /
    ((n_max - n_min) t(n_min))`` from paired ratios, for fused, the stock processor and the text-only one
    (which does not depend on n: its value is the measurement's noise)."""
    out = []
    for level in dict.fromkeys(r["level"] for r in rows):
        at = {(r["n"], r["variant"]): r for r in rows if r["level"] == level}
        counts = sorted({n for n, _ in at})
        lo, hi = counts[0], counts[-1]

        def per_subject(variant):
            if (hi, variant) not in at or hi == lo:
                return None
            return round((at[(hi, variant)]["ratio_to_fewest"] - 1) / (hi - lo), 4)

        fused = [at[(n, "anyms_fused")] for n in counts if (n, "anyms_fused") in at]
        reuse = [at[(n, "anyms_fused_reuse")]["ratio_to_stock"] for n in counts if (n, "anyms_fused_reuse") in at]
        out.append({
            "level": level,
            "fused_to_stock_max": max((r["ratio_to_stock"] for r in fused if r["ratio_to_stock"] is not None), default=None),
            "fused_to_stock_masked_max_n3": max((r["ratio_to_stock_masked"] for r in fused
                                                  if r["n"] >= 3 and r["ratio_to_stock_masked"] is not None), default=None),
            "fused_reuse_to_stock_max": max(reuse, default=None),
            "per_subject_fused": per_subject("anyms_fused"),
            "per_subject_fused_reuse": per_subject("anyms_fused_reuse"),
            "per_subject_stock": per_subject("stock_joint"),
            "per_subject_text_only": per_subject("text_only"),
        })
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| level | n | variant | median ms | spread ms (IQR) | / stock joint | image term ms | peak memory |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio_to_stock"] is None else f"{r['ratio_to_stock']:.3f}"
        image = "-" if r.get("image_term_ms") is None else f"{r['image_term_ms']:.1f}"
        lines.append(f"| {r['level']} | {r['n']} | {r['variant']} | {r['median_ms']:.1f} | {r['spread_ms']:.1f} | "
                     f"{ratio} | {image} | {fmt_bytes(r.get('peak_bytes'))} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (5 instead of 9)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds: checks the code paths")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--levels", help="comma-separated, e.g. 64x64,32x32")
    parser.add_argument("--subjects", help="comma-separated subject counts, e.g. 2,3,5,7")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    levels = args.levels.split(",") if args.levels else None
    counts = [int(n) for n in args.subjects.split(",")] if args.subjects else None
    if args.memory_worker:
        table = SMOKE_LEVELS if args.smoke else LEVELS
        result = {level: memory_level(table[level], counts, resolve_device(args.device)) for level in levels}
        print(json.dumps(result))
        return
    rows = run(args.quick, args.smoke, args.rounds, levels, counts, args.device, memory=not args.no_memory)
    print(markdown(rows))


if __name__ == "__main__":
    main()
