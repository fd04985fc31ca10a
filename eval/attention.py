"""Attention maps in the report: "attention in box" per subject, its table, and the figures (paper Fig. 7).

Reads the maps the generator saved beside the images (``runfolder.attention_maps`` describes them); knows
nothing of how they were computed.

**Attention in box** of a subject, for one stream (image or text): on each recorded grid, the share of
the subject's attention mass (its map summed over the grid) that falls on the tokens of its own requested
box (the box as the generator put it on that grid), x 100; then the mean over the recorded grids. Undefined
(NaN, left out of means and counted) where the subject has no mass at all, e.g. the image stream of
``text_only``, or a subject that owns no token under AnyMS's priority rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from runfolder.attention_maps import grid_key, load_attention_maps

STREAMS = ("image", "text")
COLUMNS = {"attn_in_box_image": "image attention in box (%)", "attn_in_box_text": "text attention in box (%)"}
# perceptually uniform and monotonic in lightness (jet's bands read as structure that is not there)
CMAP = "inferno"
COLORBAR_LABEL = "attention, min-max normalized per map (0-1)"


def in_box_share(maps: dict, stream: str) -> np.ndarray:
    """``float[n]``: per subject, the stream's attention in box (see the module), NaN where it has no mass."""
    shares = []
    for h, w in np.asarray(maps["grids"]).tolist():
        g = grid_key(h, w)
        m = np.asarray(maps[f"{stream}_{g}"], dtype=np.float64)
        box = np.asarray(maps[f"box_{g}"], dtype=bool)
        total = m.sum(axis=(1, 2))
        inside = (m * box).sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            shares.append(np.where(total > 0, 100.0 * inside / total, np.nan))
    return np.mean(np.stack(shares), axis=0) if len(shares) else np.array([])


def attention_rows(record_runs: Sequence[tuple[dict, object]]) -> pd.DataFrame:
    """One row per (image, subject) of every record with attention maps: the in-box shares of both streams.
    ``record_runs``: (record, its run folder) pairs."""
    rows = []
    for r, run_dir in record_runs:
        if not r.get("attention_maps"):
            continue
        maps = load_attention_maps(Path(run_dir) / r["attention_maps"], n_subjects=len(r["subjects"]))
        shares = {s: in_box_share(maps, s) for s in STREAMS}
        for j, subject in enumerate(r["subjects"]):
            rows.append({"method": r["method"], "combination": r["combination"], "seed": r["seed"],
                         "image": r["image"], "n_subjects": r["n_subjects"], "subject": subject["name"],
                         "attn_in_box_image": float(shares["image"][j]), "attn_in_box_text": float(shares["text"][j])})
    return pd.DataFrame(rows, columns=["method", "combination", "seed", "image", "n_subjects", "subject",
                                       *COLUMNS])


# --- figures ----------------------------------------------------------------------------------------------

def _heat(ax, image, heat: np.ndarray, box, title: str):
    """The image in grey with the map over it, min-max normalized on its own (as the paper's Fig. 7; a
    constant map shows flat), one cell per token of the finest recorded grid, and the requested box. Returns
    the map's artist, for the colorbar."""
    from matplotlib.patches import Rectangle

    w, h = image.size
    ax.imshow(np.asarray(image.convert("L")), cmap="gray", extent=(0, w, h, 0))
    lo, hi = float(heat.min()), float(heat.max())
    shown = (heat - lo) / (hi - lo) if hi > lo else np.full_like(heat, 1.0 if hi > 0 else 0.0)
    shown_map = ax.imshow(shown, cmap=CMAP, alpha=0.6, vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="nearest")
    x0, y0, x1, y1 = box
    ax.add_patch(Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h, fill=False, edgecolor="white", lw=1.5))
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()
    return shown_map


def _colorbar(fig, axes, artist) -> None:
    """One colorbar for the figure's maps (every map is normalized the same way), opaque: the overlay's alpha
    would make it read lighter than the colours it names."""
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(norm=artist.norm, cmap=artist.get_cmap()), ax=axes, shrink=0.6, pad=0.02)
    bar.set_label(COLORBAR_LABEL, fontsize=7)
    bar.ax.tick_params(labelsize=6)


def _share_text(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.0f}% in box"


def image_figure(image, record: dict, maps: dict, path, banner: str = "") -> None:
    """One row per subject: the image with the subject's requested box, its image-attention map, its
    phrase's text-attention map, each with its attention in box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from runfolder.pictures import colour

    subjects = record["subjects"]
    shares = {s: in_box_share(maps, s) for s in STREAMS}
    fig, axes = plt.subplots(len(subjects), 3, figsize=(7.2, 2.3 * len(subjects)), squeeze=False,
                             layout="constrained")  # leaves room for the colorbar
    w, h = image.size
    for j, s in enumerate(subjects):
        ax = axes[j, 0]
        ax.imshow(np.asarray(image.convert("RGB")), extent=(0, w, h, 0))
        x0, y0, x1, y1 = s["box"]
        ax.add_patch(Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h, fill=False, edgecolor=colour(j), lw=2))
        ax.set_title(f"{s['name']} ({s['phrase']})", fontsize=7)
        ax.set_axis_off()
        artist = _heat(axes[j, 1], image, maps["image"][j], s["box"], f"image attention: {_share_text(shares['image'][j])}")
        found = bool(maps["phrase_found"][j])
        _heat(axes[j, 2], image, maps["text"][j], s["box"],
              f"text '{s['phrase']}': {_share_text(shares['text'][j])}" if found else "phrase not in prompt")
    _colorbar(fig, axes, artist)
    grids = ", ".join(grid_key(*g) for g in np.asarray(maps["grids"]).tolist())
    fig.suptitle(f"{banner}{record['method']} / {record['combination']} / seed {record['seed']}\n"
                 f"grids {grids}, {len(maps['steps'])} step(s)", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def combination_figure(entries: Sequence[tuple[object, dict, dict]], path, banner: str = "") -> None:
    """One combination and seed side by side across methods: a column per method (``entries``: (image,
    record, maps) each), the image on top, then each subject's image-attention map, then its phrase's
    text-attention map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects = entries[0][1]["subjects"]
    n = len(subjects)
    fig, axes = plt.subplots(1 + 2 * n, len(entries), figsize=(1.9 * len(entries) + 0.8, 1.9 * (1 + 2 * n)),
                             squeeze=False, layout="constrained")  # leaves room for the colorbar
    for c, (image, record, maps) in enumerate(entries):
        shares = {s: in_box_share(maps, s) for s in STREAMS}
        w, h = image.size
        axes[0, c].imshow(np.asarray(image.convert("RGB")), extent=(0, w, h, 0))
        axes[0, c].set_title(record["method"], fontsize=7)
        axes[0, c].set_axis_off()
        for j, s in enumerate(subjects):
            artist = _heat(axes[1 + j, c], image, maps["image"][j], s["box"],
                           f"{s['name']} image: {_share_text(shares['image'][j])}")
            _heat(axes[1 + n + j, c], image, maps["text"][j], s["box"],
                  f"'{s['phrase']}' text: {_share_text(shares['text'][j])}")
    _colorbar(fig, axes, artist)
    r = entries[0][1]
    fig.suptitle(f"{banner}{r['combination']} / seed {r['seed']}: {r['prompt']}", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_attention_figures(record_runs: Sequence[tuple[dict, object]], out_dir, limit: int,
                            banner: str = "") -> list[Path]:
    """For up to ``limit`` (combination, seed) pairs with maps (the first seed of each combination first):
    one figure per method's image and one across methods. ``record_runs``: (record, its run folder) pairs.
    Returns the files written."""
    from PIL import Image

    import runfolder

    with_maps = [(r, d) for r, d in record_runs if r.get("attention_maps")]
    pairs: dict[tuple, list[tuple[dict, object]]] = {}
    for r, d in sorted(with_maps, key=lambda rd: (rd[0]["seed"], rd[0]["combination"], rd[0]["method"])):
        pairs.setdefault((r["combination"], r["seed"]), []).append((r, d))
    out_dir = Path(out_dir)
    written = []
    for (combo, seed), group in list(pairs.items())[: max(int(limit), 0)]:
        entries = []
        for r, d in group:
            run_dir = Path(d)
            image = Image.open(run_dir / r["image"])
            maps = load_attention_maps(run_dir / r["attention_maps"], n_subjects=len(r["subjects"]))
            entries.append((image, r, maps))
            path = out_dir / f"{combo}-seed{seed}-{r['method']}.png"
            written.append(runfolder.atomic_write(path, lambda p, e=(image, r, maps): image_figure(*e, p, banner)))
        if len(entries) > 1:
            path = out_dir / f"{combo}-seed{seed}-methods.png"
            written.append(runfolder.atomic_write(path, lambda p: combination_figure(entries, p, banner)))
    return written
