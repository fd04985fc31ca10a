"""The paper's comparison figures from a report's images and metrics.

- ``comparison.png`` (paper Fig. 5): one row per (combination, seed), its prompt above it; the first column
  shows the subjects' references placed in their requested boxes on a canvas of the image's aspect, with a
  legend naming the numbered subjects; then one column per method: the image with the requested boxes (thick
  outline) and the detected ones (translucent fill, thin outline), its scores (means over the image's
  subjects) under it.
- ``ablation.png`` (Fig. 6): the same for ``anyms``, ``wo_crop_merge`` and ``wo_local``.
- ``combinations.png`` (Fig. 9): every combination of the report: its prompt, references and layout.

Which (combination, seed) pairs (``figures`` in conf/report.yaml): ``pairs`` (``["c01:0", ...]``), else a
reproducible sample of ``samples`` pairs (``seed``) that every shown method made, one per combination before
any combination gets a second. Boxes are drawn by torchvision's ``draw_bounding_boxes`` and cells laid out by
``make_grid``; PIL only writes text.
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torchvision.utils import draw_bounding_boxes, make_grid

import runfolder
from runfolder.pictures import colour
from runfolder.references import ReferenceImageError, load_reference

log = logging.getLogger(__name__)

CELL = 256              # side of an image cell (px); a 64 px tiny image is enlarged 4x, nearest
PAD = 6                 # make_grid's padding around every cell
TEXT = 14               # body text size (px)
TITLE = 18
BADGE = 12              # subject numbers in the pictures
REQUESTED_WIDTH = 4     # requested boxes: a thick outline, no fill
DETECTED_WIDTH = 2      # detected boxes: torchvision's translucent fill and a thin outline
CANVAS = (236, 236, 236)  # the layout column's background: light, so references and outlines stand out
PANELS_PER_ROW = 4      # combinations.png
ABLATION = ("anyms", "wo_crop_merge", "wo_local")
DETECTED = ["det_x0", "det_y0", "det_x1", "det_y1"]
BOX_LEGEND = ("Boxes: requested = thick outline; detected by the evaluation's detector = translucent fill + thin "
              "outline; numbers = subjects, named in the first column. Scores: means over the image's subjects; "
              "detected k/n: subjects found.")
Rect = tuple[float, float, float, float]
Segment = tuple[str | None, str]  # (badge colour, text): a coloured badge when a colour is given, else plain text


@dataclass
class Figure:
    """One figure written (``path``) or skipped (``path`` None, ``note`` says why), and what it shows."""

    path: Path | None
    rows: int = 0
    columns: int = 0
    header_height: int = 0
    row_height: int = 0
    pairs: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    note: str = ""

    def summary(self, root: Path) -> dict:
        if self.path is None:
            return {"skipped": self.note}
        return {"file": str(self.path.relative_to(root)), "pairs": self.pairs, "methods": self.methods}


# --- text -----------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's own scalable font: no system font needed


def line_height(size: int = TEXT) -> int:
    return int(size * 1.35)


def text_width(text: str, size: int = TEXT) -> float:
    return font(size).getlength(text)


def wrap(text: str, width: float, size: int = TEXT) -> list[str]:
    """``text`` in lines no wider than ``width`` px: textwrap on a character count, narrowed until every line
    fits (the font is proportional)."""
    chars = max(1, int(width / max(text_width("i", size), 1)))
    while True:
        lines = textwrap.wrap(text, chars, break_long_words=True) or [""]
        if chars == 1 or all(text_width(line, size) <= width for line in lines):
            return lines
        chars = min(chars - 1, max(len(line) for line in lines) - 1)


def badge_size(text: str, size: int = BADGE) -> tuple[int, int]:
    return int(text_width(text, size)) + 6, size + 6


def draw_badge(draw: ImageDraw.ImageDraw, rect: Rect, text: str, fill: str, size: int = BADGE) -> None:
    """White text on the subject's colour, framed in white: readable on any image."""
    draw.rectangle(rect, fill=fill, outline="white")
    draw.text(((rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2), text, fill="white", font=font(size), anchor="mm")


def segment_width(segment: Segment) -> float:
    badge, text = segment
    return badge_size(text)[0] if badge else text_width(text)


def flow(items: Sequence[list[list[Segment]]], width: float) -> list[list[Segment]]:
    """Legend items packed into lines no wider than ``width``; an item is its lines (segments kept together),
    and an item of several lines (a long name, wrapped) gets lines of its own."""
    lines: list[list[Segment]] = [[]]
    used = 0.0
    for item_lines in items:
        if len(item_lines) > 1:
            lines = [*(lines if lines[-1] else lines[:-1]), *item_lines, []]
            used = 0.0
            continue
        item = item_lines[0]
        need = sum(segment_width(s) + 4 for s in item) + 8
        if lines[-1] and used + need > width:
            lines.append([])
            used = 0.0
        lines[-1].extend(item)
        used += need
    return lines if lines[-1] else lines[:-1]


def text_block(lines: Sequence[Sequence[Segment]], width: int, height: int, size: int = TEXT,
               centred: bool = False) -> Image.Image:
    """Lines of segments on white; a badge segment starts a new legend item (a gap before it)."""
    block = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(block)
    step = line_height(size)
    for i, line in enumerate(lines):
        span = sum(segment_width(s) + 4 for s in line)
        x = max((width - span) / 2, 0) if centred else 0.0
        y = i * step
        for k, (badge, text) in enumerate(line):
            if badge:
                x += 8 if k else 0
                w, h = badge_size(text)
                draw_badge(draw, (x, y + 1, x + w, y + 1 + h), text, badge)
                x += w + 4
            else:
                draw.text((x, y), text, fill="black", font=font(size))
                x += text_width(text, size) + 4
    return block


def plain(lines: Sequence[str]) -> list[list[Segment]]:
    return [[(None, line)] for line in lines]


# --- pictures ---------------------------------------------------------------------------------------------

def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def as_image(tensor: torch.Tensor) -> Image.Image:
    return Image.fromarray(tensor.permute(1, 2, 0).contiguous().numpy())


def stack(blocks: Sequence[Image.Image]) -> Image.Image:
    """Blocks of one width, top to bottom."""
    return as_image(torch.cat([as_tensor(b) for b in blocks], dim=1))


def grid(cells: Sequence[torch.Tensor], columns: int) -> Image.Image:
    """``make_grid`` of equal cells, white padding; one cell gets the padding too (make_grid returns it bare)."""
    if len(cells) == 1:
        return ImageOps.expand(as_image(cells[0]), border=PAD, fill="white")
    return as_image(make_grid(list(cells), nrow=columns, padding=PAD, pad_value=255))


def fit_size(width: int, height: int, side: int = CELL) -> tuple[int, int]:
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def in_square(image: Image.Image, background=CANVAS) -> tuple[Image.Image, Rect]:
    """``image`` scaled so its longer side is :data:`CELL` (nearest when enlarging, so a tiny image's pixels
    stay pixels; Lanczos when shrinking), centred on a white square; and where it sits in the square."""
    size = fit_size(*image.size)
    resample = Image.NEAREST if size[0] >= image.width else Image.LANCZOS
    square = Image.new("RGB", (CELL, CELL), "white")
    x, y = (CELL - size[0]) // 2, (CELL - size[1]) // 2
    square.paste(Image.new("RGB", size, background), (x, y))
    square.paste(image.convert("RGB").resize(size, resample), (x, y))
    return square, (x, y, x + size[0], y + size[1])


def to_pixels(box: Sequence[float], area: Rect) -> list[float]:
    """A normalized box in the pixels of ``area`` (where the image sits in its cell)."""
    x, y, x1, y1 = area
    w, h = x1 - x, y1 - y
    return [x + box[0] * w, y + box[1] * h, x + box[2] * w, y + box[3] * h]


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], colours: Sequence[str], width: int,
               fill: bool) -> Image.Image:
    """torchvision's box drawer on a PIL image; boxes with NaN (a subject not detected) are skipped."""
    shown = [i for i, b in enumerate(boxes) if np.all(np.isfinite(b))]
    if not shown:
        return image
    drawn = draw_bounding_boxes(as_tensor(image), torch.tensor([list(boxes[i]) for i in shown], dtype=torch.float),
                                colors=[colours[i] for i in shown], width=width, fill=fill)
    return as_image(drawn)


def _overlaps(a: Rect, b: Rect, margin: float = 1.0) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def place_labels(anchors: Sequence[Rect], size: tuple[float, float], bounds: Rect) -> list[Rect]:
    """Greedy spots for one ``size`` label per anchor box, none overlapping another: the first free one of the
    box's inside corners and the spots just above and below it, else the free spot nearest its top-left corner
    on a raster of ``bounds`` (half a label apart). Labels overlap only when ``bounds`` has no room left."""
    w, h = size
    bx0, by0, bx1, by1 = bounds

    def at(x: float, y: float) -> Rect:  # clamped into the bounds
        x, y = min(max(x, bx0), bx1 - w), min(max(y, by0), by1 - h)
        return x, y, x + w, y + h

    raster = [(x, y) for y in np.arange(by0, by1 - h + 1, h / 2) for x in np.arange(bx0, bx1 - w + 1, w / 2)]
    placed: list[Rect] = []
    for x0, y0, x1, y1 in anchors:
        corners = [(x0 + 2, y0 + 2), (x1 - w - 2, y0 + 2), (x0 + 2, y1 - h - 2), (x1 - w - 2, y1 - h - 2),
                   (x0, y0 - h - 2), (x0, y1 + 2)]
        near = sorted(raster, key=lambda p: (p[0] - x0) ** 2 + (p[1] - y0) ** 2)
        candidates = (at(x, y) for x, y in corners + near)
        placed.append(next((r for r in candidates if not any(_overlaps(r, p) for p in placed)), at(x0, y0)))
    return placed


def numbered(image: Image.Image, boxes: Sequence[Sequence[float]], area: Rect) -> Image.Image:
    """Subject numbers (1, 2, ...) in their colours near their boxes, never on top of each other."""
    texts = [str(j + 1) for j in range(len(boxes))]
    size = max((badge_size(t) for t in texts), default=(0, 0))
    draw = ImageDraw.Draw(image)
    for j, rect in enumerate(place_labels(boxes, size, area)):
        draw_badge(draw, rect, texts[j], colour(j))
    return image


@lru_cache(maxsize=None)
def reference_thumbnail(path: str) -> Image.Image | None:
    """The reference (``load_reference``: 16-bit and alpha handled) reduced to a cell; None, logged, when it
    cannot be read here (a report made on another machine than the images). Cached for one
    :func:`write_figures` call (a reference appears in many rows), emptied after it, so a later report of the
    process reads the file again."""
    try:
        reference = load_reference(path)
    except ReferenceImageError as err:
        log.warning("figures: no thumbnail: %s", err)
        return None
    reference.thumbnail((CELL, CELL))
    return reference


def layout_picture(record: dict) -> Image.Image:
    """The subjects' first references, each fitted in its requested box on a canvas of the image's aspect
    (largest box first, so a small box's reference stays on top), the boxes outlined and numbered."""
    blank = Image.new("RGB", fit_size(int(record.get("width") or CELL), int(record.get("height") or CELL)), CANVAS)
    square, area = in_square(blank)
    boxes = [to_pixels(s["box"], area) for s in record["subjects"]]
    for j in sorted(range(len(boxes)), key=lambda j: -(boxes[j][2] - boxes[j][0]) * (boxes[j][3] - boxes[j][1])):
        refs = record["subjects"][j].get("references") or []
        thumb = reference_thumbnail(str(refs[0])) if refs else None
        x0, y0, x1, y1 = boxes[j]
        inner = (int((x1 - x0) * 0.9), int((y1 - y0) * 0.9))  # a margin inside the outline
        if thumb is not None and min(inner) > 0:
            thumb = ImageOps.contain(thumb, inner)
            square.paste(thumb, (int((x0 + x1 - thumb.width) / 2), int((y0 + y1 - thumb.height) / 2)))
    square = draw_boxes(square, boxes, [colour(j) for j in range(len(boxes))], REQUESTED_WIDTH, fill=False)
    return numbered(square, boxes, area)


def method_picture(image: Image.Image, record: dict, detected: Sequence[Sequence[float]]) -> Image.Image:
    """The generated image with the detected boxes (fill, thin outline) under the requested ones (thick
    outline), numbered."""
    square, area = in_square(image)
    colours = [colour(j) for j in range(len(record["subjects"]))]
    square = draw_boxes(square, [to_pixels(b, area) for b in detected], colours, DETECTED_WIDTH, fill=True)
    requested = [to_pixels(s["box"], area) for s in record["subjects"]]
    square = draw_boxes(square, requested, colours, REQUESTED_WIDTH, fill=False)
    return numbered(square, requested, area)


def placeholder(text: str) -> Image.Image:
    square = Image.new("RGB", (CELL, CELL), CANVAS)
    ImageDraw.Draw(square).text((CELL / 2, CELL / 2), text, fill="black", font=font(TEXT), anchor="mm")
    return square


def subject_legend(record: dict) -> list[list[Segment]]:
    """Numbered subject names (and the phrase where it differs), packed to the cell's width; a name too long
    for a line wraps, indented past its number."""
    items = []
    for j, s in enumerate(record["subjects"]):
        name = s["name"] if s["phrase"] == s["name"] else f"{s['name']} '{s['phrase']}'"
        indent = badge_size(str(j + 1))[0] + 4
        first, *rest = wrap(name, CELL - indent - 4)
        items.append([[(colour(j), str(j + 1)), (None, first)], *([(None, " " * 4 + line)] for line in rest)])
    return flow(items, CELL)


def cell(picture: Image.Image, caption: Sequence[Sequence[Segment]], caption_height: int) -> torch.Tensor:
    return as_tensor(stack([picture, text_block(caption, CELL, caption_height)]))


# --- scores and pairs -------------------------------------------------------------------------------------

def image_scores(rows: pd.DataFrame) -> list[str]:
    """The caption under a method cell: mIoU, detected k/n, DINO and CLIP-I (means over the image's subjects
    where defined; '-' where none is)."""
    def mean(column: str) -> str:
        values = pd.to_numeric(rows[column], errors="coerce").dropna() if column in rows else pd.Series(dtype=float)
        return f"{values.mean():.1f}" if len(values) else "-"

    if rows.empty:
        return ["not scored"]
    identity = [f"{name} {mean(col)}" for col, name in (("dino", "DINO"), ("clip_i", "CLIP-I")) if col in rows]
    return [f"mIoU {mean('iou')}   detected {int(rows['detected'].astype(bool).sum())}/{len(rows)}",
            "   ".join(identity)]


def detected_boxes(rows: pd.DataFrame, subjects: Sequence[dict]) -> list[list[float]]:
    """Each subject's detected box (NaN when missed), matched by subject name in the rows' order."""
    queue: dict[str, list[list[float]]] = {}
    for _, r in rows.iterrows():
        queue.setdefault(r["subject"], []).append([float(r[c]) for c in DETECTED])
    return [queue[s["name"]].pop(0) if queue.get(s["name"]) else [float("nan")] * 4 for s in subjects]


def pair_name(pair: tuple[str, int]) -> str:
    return f"{pair[0]}:{pair[1]}"


def parse_pairs(values, available: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """``figures.pairs`` ("combination:seed" each) checked against the report's pairs."""
    from eval.evaluate import EvaluationError

    listing = ", ".join(pair_name(p) for p in sorted(available))
    pairs = []
    for value in [values] if isinstance(values, str) else list(values):
        combination, _, seed = str(value).rpartition(":")
        if not combination or not seed.lstrip("-").isdigit() or (combination, int(seed)) not in available:
            raise EvaluationError(f"figures.pairs: {value!r} is not a (combination, seed) of this report, written "
                                  f"'combination:seed'; available: {listing}")
        pairs.append((combination, int(seed)))
    return pairs


def sample_pairs(pairs: set[tuple[str, int]], n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` of ``pairs``, reproducibly (``numpy.random.default_rng(seed)``): combinations in a random order,
    each's seeds in a random order, taken one per combination per round, so distinct combinations come first."""
    rng = np.random.default_rng(seed)
    by_combination: dict[str, list[tuple[str, int]]] = {}
    for pair in sorted(pairs):
        by_combination.setdefault(pair[0], []).append(pair)
    combinations = sorted(by_combination)
    queues = [by_combination[combinations[i]] for i in rng.permutation(len(combinations))]
    queues = [[q[i] for i in rng.permutation(len(q))] for q in queues]
    rounds = [q[depth] for depth in range(max(map(len, queues), default=0)) for q in queues if depth < len(q)]
    return sorted(rounds[: max(n, 0)])


def choose_pairs(made: dict[str, set[tuple[str, int]]], methods: Sequence[str], cfg: dict) -> list[tuple[str, int]]:
    """``cfg["pairs"]`` when given (any pair of the report), else a sample of the pairs every one of
    ``methods`` made (of those any made, where they share none)."""
    everything = set().union(*made.values())
    if cfg.get("pairs") is not None:
        return parse_pairs(cfg["pairs"], everything)
    shared = set.intersection(*(made[m] for m in methods)) or set().union(*(made[m] for m in methods))
    return sample_pairs(shared, int(cfg.get("samples", 4)), int(cfg.get("seed", 0)))


def check_pairs(record_runs: Sequence[tuple[dict, object]], figures_cfg: dict | None) -> None:
    """``figures.pairs`` checked before the report writes anything, so a typo leaves the last report whole."""
    cfg = dict(figures_cfg or {})
    if cfg.get("pairs") is not None:
        parse_pairs(cfg["pairs"], {(r["combination"], int(r["seed"])) for r, _ in record_runs})


def method_order(methods) -> list[str]:
    """anyms first (the paper's method), then the ablations, then the others alphabetically."""
    rank = {m: i for i, m in enumerate(ABLATION)}
    return sorted(set(methods), key=lambda m: (rank.get(m.split(" [")[0], len(rank)), m))


# --- figures ----------------------------------------------------------------------------------------------

def header(title: str, width: int, columns: Sequence[str] = ()) -> Image.Image:
    """The title and box legend, wrapped to the figure's width, then a header over each column."""
    inner = width - 2 * PAD
    titles = wrap(title, inner, TITLE)
    legend = wrap(BOX_LEGEND, inner) if columns else []
    heads = [wrap(c, CELL) for c in columns]
    top = text_block(plain(titles), inner, len(titles) * line_height(TITLE) + 8, TITLE)
    parts = [top, text_block(plain(legend), inner, len(legend) * line_height() + 6)] if legend else [top]
    if columns:
        tall = max(map(len, heads)) * line_height()
        row = grid([as_tensor(text_block(plain(h), CELL, tall, centred=True)) for h in heads], len(heads))
        parts.append(row.crop((PAD, PAD, row.width - PAD, row.height)))  # the grid's own outer padding, trimmed
    return ImageOps.expand(stack(parts), border=(PAD, PAD, PAD, 0), fill="white")


def comparison_grid(record_runs, metrics: pd.DataFrame, methods: Sequence[str], pairs: Sequence[tuple[str, int]],
                    title: str, path: Path) -> Figure:
    """Rows: ``pairs``; columns: the layout, then ``methods``; written to ``path``."""
    by_key = {(r["method"], r["combination"], r["seed"]): (r, Path(d)) for r, d in reversed(list(record_runs))}
    any_method = {(r["combination"], r["seed"]): r for r, _ in reversed(list(record_runs))}  # a pair none shown made
    metric_images = set(metrics["image"])
    rows_of = dict(tuple(metrics.groupby("image", sort=False)))
    columns = len(methods) + 1
    width = columns * (CELL + PAD) + PAD
    row_entries = []
    for combination, seed in pairs:
        made = [by_key.get((m, combination, seed)) for m in methods]
        first = next((e[0] for e in made if e), any_method[(combination, seed)])
        cells = [(layout_picture(first), subject_legend(first))]
        for entry in made:
            if entry is None:
                cells.append((placeholder("no image"), plain(["-"])))
                continue
            record, run_dir = entry
            key = record["image"] if record["image"] in metric_images else str(run_dir / record["image"])
            rows = rows_of.get(key, metrics.iloc[:0])
            with Image.open(run_dir / record["image"]) as image:
                picture = method_picture(image, record, detected_boxes(rows, record["subjects"]))
            cells.append((picture, plain(image_scores(rows))))
        prompt = wrap(f"{combination}, seed {seed}: {first['prompt']}", width - 2 * PAD)
        row_entries.append((prompt, cells))
    caption_height = max(len(c) for _, cells in row_entries for _, c in cells) * line_height() + 4
    prompt_height = max(len(p) for p, _ in row_entries) * line_height() + 2
    blocks = []
    for prompt, cells in row_entries:
        strip = ImageOps.expand(text_block(plain(prompt), width - 2 * PAD, prompt_height), border=(PAD, PAD, PAD, 0),
                                fill="white")
        blocks.append(stack([strip, grid([cell(p, c, caption_height) for p, c in cells], columns)]))
    top = header(title, width, ["references and layout", *methods])
    runfolder.save_png(stack([top, *blocks]), path)
    return Figure(path, rows=len(pairs), columns=columns, header_height=top.height, row_height=blocks[0].height,
                  pairs=[pair_name(p) for p in pairs], methods=list(methods))


def combination_sheet(record_runs, title: str, path: Path) -> Figure:
    """One panel per combination: its id and prompt, its references in their boxes, the numbered subjects."""
    firsts: dict[str, dict] = {}
    for record, _ in record_runs:
        firsts.setdefault(record["combination"], record)
    combos = sorted(firsts)
    prompts = [wrap(f"{c}: {firsts[c]['prompt']}", CELL) for c in combos]
    legends = [subject_legend(firsts[c]) for c in combos]
    prompt_height = max(map(len, prompts)) * line_height() + 2
    legend_height = max(map(len, legends)) * line_height() + 4
    panels = [as_tensor(stack([text_block(plain(p), CELL, prompt_height), layout_picture(firsts[c]),
                               text_block(legend, CELL, legend_height)]))
              for c, p, legend in zip(combos, prompts, legends)]
    columns = min(PANELS_PER_ROW, len(panels))
    sheet = grid(panels, columns)
    sheet = sheet.crop((0, PAD, sheet.width, sheet.height))  # the header ends in a gap already
    top = header(title, sheet.width)
    runfolder.save_png(stack([top, sheet]), path)
    return Figure(path, rows=-(-len(panels) // columns), columns=columns, header_height=top.height,
                  row_height=panels[0].shape[1] + PAD)


def write_figures(record_runs: Sequence[tuple[dict, object]], metrics: pd.DataFrame, out_dir,
                  figures_cfg: dict | None = None, title_prefix: str = "") -> dict[str, Figure]:
    """comparison.png, ablation.png (when 2+ of its methods are in the report) and combinations.png in
    ``out_dir``. ``record_runs``: (record, its run folder) pairs as ``run_report`` builds them (``method`` the
    report's row label); ``metrics``: the report's metrics (image names as ``run_report`` keys them)."""
    try:
        return _write_figures(record_runs, metrics, Path(out_dir), dict(figures_cfg or {}), title_prefix)
    finally:
        reference_thumbnail.cache_clear()


def _write_figures(record_runs, metrics: pd.DataFrame, out_dir: Path, cfg: dict, title_prefix: str) -> dict[str, Figure]:
    if not record_runs:
        return {}
    made: dict[str, set[tuple[str, int]]] = {}
    for record, _ in record_runs:
        made.setdefault(record["method"], set()).add((record["combination"], int(record["seed"])))
    methods = method_order(made)
    written = {}
    pairs = choose_pairs(made, methods, cfg)
    written["comparison"] = comparison_grid(
        record_runs, metrics, methods, pairs,
        f"{title_prefix}Comparison (paper Fig. 5): {len(pairs)} (combination, seed) pairs x {len(methods)} methods",
        out_dir / "comparison.png")
    ablation = [m for m in methods if m.split(" [")[0] in ABLATION]
    if len(ablation) >= 2:
        pairs = choose_pairs(made, ablation, cfg)
        written["ablation"] = comparison_grid(
            record_runs, metrics, ablation, pairs,
            f"{title_prefix}Ablation (paper Fig. 6): {', '.join(ablation)}", out_dir / "ablation.png")
    else:
        note = f"fewer than 2 of {', '.join(ABLATION)} in the report (present: {', '.join(ablation) or 'none'})"
        log.info("figures: ablation.png skipped: %s", note)
        written["ablation"] = Figure(None, note=note)
    written["combinations"] = combination_sheet(
        record_runs, f"{title_prefix}Benchmark combinations (paper Fig. 9): prompt, references in their requested "
                     "boxes, numbered subjects", out_dir / "combinations.png")
    return written
