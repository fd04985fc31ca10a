"""The report as static HTML pages that open from disk (``file://``, no server, no framework): issue 18.

``report/index.html``: the header lines (models, protocol, provenance; the TINY RANDOM MODELS banner), the
tables with sortable columns (a few lines of vanilla JS, ``assets/sort.js``, sorting on each cell's
``data-value``: the mean, not the "± x" text), every PNG figure in the report folder at render time, a gallery
link per method and the worst cases (lowest mIoU images, missed subjects, identity swaps).
``methods/<method>.html``: a method's images as lazy thumbnails, grouped by combination.
``images/<method>/<combination>/<seed>.html``: one image with its requested and detected boxes over it, each
subject's region as scored (``regions/``: the crop :func:`eval.grounding.subject_crop` cut from the SAM mask
stored in ``region_rle``), the references, every metric per subject, the prompt, the settings and the
attention figures. Images and references are linked by relative path, never copied.

Pages, region PNGs and assets are written atomically; pages and regions left from an earlier report whose
images are no longer in it are removed (only ``.html`` under ``images/`` and ``methods/``, only ``.png``
under ``regions/``: nothing else there is touched, even were the report folder the run folder itself).
Nothing here imports ``anyms`` (or ``eval.report``, which calls it: no import cycle).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np
import pandas as pd
from PIL import Image

import runfolder
from eval.grounding import rle_to_mask, subject_crop
from eval.published import benchmark_of, published_section
from runfolder.pictures import colour

TEMPLATES = Path(__file__).with_name("templates")
ASSETS = ("report.css", "sort.js")  # copied from TEMPLATES into <out>/assets/
WORST = 25  # rows per worst-case list on the index
TABLE_ORDER = ("table1", "table2", "comparisons", "attention")
GALLERY_SCORES = {"iou": "mIoU", "clip_i": "CLIP-I", "dino": "DINO", "dreamsim": "DreamSim", "clip_t": "CLIP-T"}
BOX_COLUMNS = {"requested": ("req_x0", "req_y0", "req_x1", "req_y1"), "detected": ("det_x0", "det_y0", "det_x1", "det_y1")}
REGION_SOURCES = {"detection": "SAM mask prompted by its detection",
                  "requested_box": "missed: SAM mask prompted by its requested box"}
NOT_SCORED = ("no region: no identity crop was scored (a missed subject under missed_subject=zero or exclude, or "
              "no identity metric asked for)")
NO_REGION = "no region stored (rows evaluated before regions were kept: re-run evaluate to see regions)"
MASK_ALPHA = 110  # of 255: the mask overlay tints the image without hiding it


@dataclass
class HtmlTable:
    """A table as shown: its headers, and per row each cell's text and what it sorts on."""

    name: str
    caption: str
    headers: list[str]
    rows: list[list[tuple[str, str, bool]]]  # (text, data-value, whether it is a number: right-aligned)
    note: str = ""

    @property
    def numeric(self) -> list[bool]:
        """Per column, whether its cells are numbers (their header is right-aligned with them)."""
        return [any(r[c][2] for r in self.rows) for c in range(len(self.headers))]  # n/a cells align with them too


def sort_value(value: Any) -> str:
    """A cell's ``data-value``: numbers in full (``repr``), missing values empty (they sort last), text as is."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        return repr(float(value)) if isinstance(value, (float, np.floating)) else str(int(value))
    return str(value)


def is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def html_table(name: str, caption: str, shown: pd.DataFrame, values: Mapping[str, Sequence] | None = None,
               note: str = "") -> HtmlTable:
    """``shown``: the cells as printed (the Markdown table's); ``values``: for some of its columns, what they
    sort on (the means behind "mean ± half-interval"); other columns sort on their text (numbers numerically)."""
    values = dict(values or {})
    columns = list(shown.columns)
    for col in values:
        if len(shown) and col not in columns:  # a header renamed on one side only: say so, never sort on text
            raise ValueError(f"{name}: sort values for {col!r}, not a column of the table ({columns})")
    rows = []
    for i in range(len(shown)):
        row = []
        for col in columns:
            text = shown[col].iloc[i]
            text = "" if text is None or (isinstance(text, float) and not math.isfinite(text)) else str(text)
            value = sort_value(list(values[col])[i]) if col in values else text
            row.append((text, value, is_number(value)))
        rows.append(row)
    return HtmlTable(name, caption, columns, rows, note.replace("**", "").strip())  # the Markdown emphasis of a note


# --- small helpers --------------------------------------------------------------------------------------------

def slug(text: str) -> str:
    """A file-name-safe form of a method label or combination id (``anyms [steps=30]`` -> ``anyms_steps_30``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_.") or "_"


def href(target: Path, page_dir: Path) -> str:
    """A link from a page in ``page_dir`` to ``target``: relative, URL-quoted; a ``file://`` URI where no
    relative path exists (another drive on Windows)."""
    try:
        return quote(os.path.relpath(target, page_dir).replace(os.sep, "/"), safe="/")
    except ValueError:
        return Path(target).resolve().as_uri()


def finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def truthy(value: Any) -> bool:
    """A bool column read back from parquet: True, or 1.0 where NaN made the column float."""
    return bool(value) if isinstance(value, (bool, np.bool_)) else finite(value) and value == 1


def number(value: Any, decimals: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{decimals}f}"
    return str(value)


def cell(value: Any) -> str:
    """A metrics.parquet value as shown on an image page: floats to 4 significant places, NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "True" if value else "False"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.6g}"
    return str(value)


def published_blocks(section: dict) -> list[dict]:
    """A published section (:func:`eval.published.published_section`) as the page's blocks: heading, intro,
    table, protocol note. Its text stays text (escaped by the template)."""
    if not section:
        return []
    blocks = [{"kind": "heading", "text": section["title"]}, {"kind": "paragraph", "text": section["intro"]},
              {"kind": "table", "headers": section["header"], "rows": section["rows"], "numeric": section["numeric"]}]
    if section["protocol"]:
        blocks.append({"kind": "paragraph", "text": f"Protocol: {section['protocol']}"})
    return blocks


@lru_cache(maxsize=1)
def environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["number"] = number
    env.filters["cell"] = cell
    return env


def render(template: str, path: Path, written: set[Path], **context) -> None:
    text = environment().get_template(template).render(**context)
    runfolder.atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    written.add(path)


# --- the images of the report ---------------------------------------------------------------------------------

@dataclass
class ImagePage:
    """One image of the tables: its record, run folder, metrics rows (in the record's subject order) and pages."""

    key: str  # the image's name in the metrics (qualified by run folder when the report has several)
    record: dict
    run_dir: Path
    rows: list[dict]  # one per record subject (None-filled where the metrics have no row for it)
    page: Path = Path()
    detections: list[dict] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.record["method"]

    @property
    def image_file(self) -> Path:
        return self.run_dir / self.record["image"]

    def mean(self, column: str) -> float:
        values = [float(r[column]) for r in self.rows if finite(r.get(column))]
        return float(np.mean(values)) if values else float("nan")

    @property
    def detected(self) -> int:
        return sum(truthy(r.get("detected")) for r in self.rows)


def subject_rows(record: dict, rows: list[dict]) -> list[dict]:
    """The metrics rows in the record's subject order (metrics.parquet sorts them by name): matched by name,
    and by requested box where a name repeats."""
    left = list(rows)
    out = []
    for s in record["subjects"]:
        same = [r for r in left if r.get("subject") == s["name"]]
        exact = [r for r in same if [r.get(c) for c in BOX_COLUMNS["requested"]] == list(s["box"])]
        hit = (exact or same or [None])[0]
        if hit is not None:
            left.remove(hit)
        out.append(hit or {"subject": s["name"], "phrase": s["phrase"]})
    return out


def image_pages(metrics: pd.DataFrame, detections: pd.DataFrame, record_runs: Sequence[tuple[dict, Any]],
                out: Path) -> list[ImagePage]:
    """One page per image of the tables, sorted by method, combination, seed; page paths unique (an image's
    run folder is added to its file name where two run folders give the same method, combination and seed)."""
    by_image = {k: g.to_dict("records") for k, g in metrics.groupby("image", sort=False)}
    dets = {k: g.to_dict("records") for k, g in detections.groupby("image", sort=False)} if len(detections) else {}
    pages = []
    for record, run_dir in record_runs:
        run_dir = Path(str(run_dir))
        qualified = str(run_dir / record["image"])  # as eval.report.run_report names images of several folders
        key = qualified if qualified in by_image else record["image"]
        if key not in by_image:
            continue  # not in the tables
        pages.append(ImagePage(key, record, run_dir.resolve(), subject_rows(record, by_image[key]),
                               detections=dets.get(key, [])))
    pages.sort(key=lambda p: (p.method, str(p.record["combination"]), int(p.record["seed"]), str(p.run_dir)))
    stems: dict[tuple, list[ImagePage]] = {}
    for p in pages:
        stems.setdefault((slug(p.method), slug(p.record["combination"]), str(p.record["seed"])), []).append(p)
    for (method, combination, seed), group in stems.items():
        names = [slug(p.run_dir.name) for p in group]
        for k, p in enumerate(group):
            stem = seed if len(group) == 1 else f"{seed}-{names[k]}" if len(set(names)) == len(names) else f"{seed}-{names[k]}-{k + 1}"
            p.page = out / "images" / method / combination / f"{stem}.html"
    return pages


def prompt_box(row: dict) -> list[float] | None:
    """The box SAM was prompted with for a subject's region (its detection, or its requested box when missed)."""
    columns = BOX_COLUMNS["detected" if row.get("region_source") == "detection" else "requested"]
    box = [row.get(c) for c in columns]
    return [float(v) for v in box] if all(finite(v) for v in box) else None


def write_regions(page: ImagePage, out: Path) -> tuple[list[Path | None], Path | None]:
    """Per subject the crop exactly as the identity scorers saw it (``subject_crop`` of the stored mask and
    prompt box), and one overlay of every subject's mask in its colour; None where no region is stored.
    Names carry a digest of what decides the pixels, so an unchanged image's regions are not drawn again."""
    stored = [(i, r) for i, r in enumerate(page.rows) if isinstance(r.get("region_rle"), str) and prompt_box(r)]
    crops: list[Path | None] = [None] * len(page.rows)
    if not stored:
        return crops, None
    digest = hashlib.sha256(json.dumps([str(page.rows[0].get("image_sha256")), [
        (i, r["region_rle"], prompt_box(r)) for i, r in stored]]).encode()).hexdigest()[:12]
    folder = out / "regions" / page.page.relative_to(out / "images").parent
    stem = f"{page.page.stem}.{digest}"
    mask_path = folder / f"{stem}.mask.png"
    for i, _ in stored:
        crops[i] = folder / f"{stem}.s{i}.png"
    if all(p.exists() for p in crops + [mask_path] if p is not None):
        return crops, mask_path
    with Image.open(page.image_file) as im:
        image = im.convert("RGB")  # as evaluation decoded it
    # the overlay as a palette PNG (index i + 1: subject i's colour, index 0 transparent): an RGBA one of a
    # 1024-pixel image takes ten times as long to encode
    overlay = np.zeros((image.height, image.width), dtype=np.uint8)
    palette = [0, 0, 0]
    for i, r in stored:
        mask = rle_to_mask(r["region_rle"])
        crop = subject_crop(image, mask, prompt_box(r))
        # lossless at compress level 1: the same pixels, written 5x faster than at the default 6
        runfolder.atomic_write(crops[i], lambda p, c=crop: c.save(p, format="PNG", compress_level=1))
        overlay[mask] = i + 1
    for i in range(max(i for i, _ in stored) + 1):
        palette += [int(colour(i)[k:k + 2], 16) for k in (1, 3, 5)]
    picture = Image.fromarray(overlay, "P")
    picture.putpalette(palette)
    alpha = bytes([0] + [MASK_ALPHA] * (len(palette) // 3 - 1))
    runfolder.atomic_write(mask_path, lambda p: picture.save(p, format="PNG", transparency=alpha))
    return crops, mask_path


# --- the worst cases ----------------------------------------------------------------------------------------

def worst_cases(pages: Sequence[ImagePage], limit: int = WORST) -> dict[str, dict]:
    """The index's lists, each ``{"title", "note", "columns", "rows": [(page, [cells])], "total"}``: images by
    lowest mIoU (mean over the image's subjects in the layout metrics), missed subjects (``detected`` False),
    and identity swaps (``id_swapped``: a subject's region closer to another subject's references), the
    largest margin first."""
    lists: dict[str, dict] = {}
    scored = [(p, p.mean("iou")) for p in pages]
    scored = [(p, v) for p, v in scored if math.isfinite(v)]
    scored.sort(key=lambda pv: (pv[1], pv[0].method, str(pv[0].record["combination"]), int(pv[0].record["seed"])))
    lists["lowest_miou"] = {
        "title": "Lowest mIoU", "note": "Images by the mean IoU of their subjects' requested and detected boxes, lowest first.",
        "columns": ["mIoU", "detected"], "total": len(scored),
        "rows": [(p, [number(v), f"{p.detected}/{len(p.rows)}"]) for p, v in scored[:limit]]}
    missed = [(p, i, r) for p in pages for i, r in enumerate(p.rows) if "detected" in r and not truthy(r["detected"])]
    lists["missed"] = {
        "title": "Missed subjects", "note": "Subjects the detector did not find (detected = False).",
        "columns": ["subject", "phrase"], "total": len(missed),
        "rows": [(p, [r.get("subject"), r.get("phrase")]) for p, _, r in missed[:limit]]}
    if any("id_swapped" in r for p in pages for r in p.rows):
        swaps = [(p, r) for p in pages for r in p.rows if truthy(r.get("id_swapped"))]
        swaps.sort(key=lambda pr: (pr[1].get("id_margin", 0.0), pr[0].method, str(pr[0].record["combination"])))
        lists["swaps"] = {
            "title": "Identity swaps", "columns": ["subject", "margin"], "total": len(swaps),
            "note": "Subjects whose region is closer (DINO) to another subject's references than to their own, "
                    "the largest margin first (identity margin: own minus best other, most negative first).",
            "rows": [(p, [r.get("subject"), number(r.get("id_margin"), 2)]) for p, r in swaps[:limit]]}
    return lists


# --- the report folder's figures and files --------------------------------------------------------------------

def figures_in(out: Path) -> dict[str, list[Path]]:
    """The PNG figures in the report folder now (fig4.png and any other at the top, ``figures/``, ``attention/``),
    whoever wrote them."""
    found = {"report": sorted(out.glob("*.png")),
             "figures": sorted((out / "figures").rglob("*.png")) if (out / "figures").is_dir() else [],
             "attention": sorted((out / "attention").glob("*.png")) if (out / "attention").is_dir() else []}
    found["attention"].sort(key=lambda p: (not p.stem.endswith("-methods"), p.name))  # across methods first
    return found


def remove_stale(out: Path, written: set[Path]) -> int:
    """Removes pages and regions of an earlier report not written by this one; returns how many."""
    removed = 0
    for folder, suffix in (("images", ".html"), ("methods", ".html"), ("regions", ".png")):
        root = out / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob(f"*{suffix}")):
            if path.is_file() and path not in written:
                path.unlink()
                removed += 1
        for d in [*sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), root]:
            if not any(d.iterdir()):
                d.rmdir()
    return removed


# --- the pages ------------------------------------------------------------------------------------------------

def boxes_of(page: ImagePage) -> list[dict]:
    """The overlay: per subject its requested box and, when found, its detection (CSS percentages)."""
    out = []
    for i, (s, r) in enumerate(zip(page.record["subjects"], page.rows)):
        for kind in ("requested", "detected"):
            box = s["box"] if kind == "requested" else [r.get(c) for c in BOX_COLUMNS["detected"]]
            if kind == "detected" and not (truthy(r.get("detected")) and all(finite(v) for v in box)):
                continue
            x0, y0, x1, y1 = (100.0 * float(v) for v in box)
            label = s["name"] if kind == "requested" else f"{s['name']} {float(r.get('det_score', float('nan'))):.2f}"
            out.append({"kind": kind, "colour": colour(i), "label": label, "left": x0, "top": y0,
                        "width": x1 - x0, "height": y1 - y0})
    return out


def ap_boxes_of(page: ImagePage) -> list[dict]:
    """Every detection kept for AP (down to the AP threshold), grey, with its phrase and score."""
    out = []
    for d in page.detections:
        x0, y0, x1, y1 = (100.0 * float(d[c]) for c in ("x0", "y0", "x1", "y1"))
        out.append({"left": x0, "top": y0, "width": x1 - x0, "height": y1 - y0,
                    "label": f"{d.get('phrase')} {float(d.get('score', float('nan'))):.2f}"})
    return out


def gallery_scores(page: ImagePage) -> list[tuple[str, str]]:
    scores = [(name, number(page.mean(col))) for col, name in GALLERY_SCORES.items()
              if any(col in r for r in page.rows)]
    return scores + [("detected", f"{page.detected}/{len(page.rows)}")]


def metric_table(page: ImagePage) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Every column of the image's metrics rows, one column per subject; a value the same for every subject
    (the image's own: clip_t, hashes) once across them. The region's RLE is shown as its picture above."""
    columns: list[str] = []
    for r in page.rows:
        columns += [c for c in r if c not in columns]
    rows = []
    for c in columns:
        values = ["(pictured above)" if c == "region_rle" and isinstance(r.get(c), str) else cell(r.get(c)) for r in page.rows]
        rows.append((c, values[:1] if len(page.rows) > 1 and len(set(values)) == 1 else values))
    return [s["name"] for s in page.record["subjects"]], rows


def attention_of(page: ImagePage, out: Path) -> dict:
    """The report's attention figures of this image (eval.attention names them by combination, seed, method)."""
    r = page.record
    names = [f"{r['combination']}-seed{r['seed']}-{r['method']}.png", f"{r['combination']}-seed{r['seed']}-methods.png"]
    figures = [out / "attention" / n for n in names if (out / "attention" / n).is_file()]
    if figures:
        return {"figures": figures, "note": ""}
    if r.get("attention_maps"):
        return {"figures": [], "note": f"Maps recorded ({r['attention_maps']}), but the report drew no figure of this "
                                       "image (figures.attention limits how many (combination, seed) pairs it draws)."}
    return {"figures": [], "note": "No attention maps were recorded for this image (generate with record_attention=true)."}


def write_html_report(out_dir, tables: Sequence[HtmlTable], metrics: pd.DataFrame, detections: pd.DataFrame,
                      record_runs: Sequence[tuple[dict, Any]], header_lines: Sequence[str], tiny: bool,
                      worst: int = WORST) -> Path:
    """Writes index.html, methods/*.html, images/**.html, regions/**.png and assets/ into ``out_dir`` (see the
    module) and returns index.html's path. ``tables``: :func:`html_table` of each written table; ``metrics``,
    ``detections``: the report's rows (method labels as in the tables; images qualified by run folder when
    there are several); ``record_runs``: (record, its run folder) of the images in the tables."""
    out = Path(out_dir).resolve()
    written: set[Path] = set()
    for name in ASSETS:
        text = (TEMPLATES / name).read_text(encoding="utf-8")
        runfolder.atomic_write(out / "assets" / name, lambda p, t=text: p.write_text(t, encoding="utf-8"))
    pages = image_pages(metrics, detections, record_runs, out)
    methods: dict[str, list[ImagePage]] = {}
    for p in pages:
        methods.setdefault(p.method, []).append(p)
    gallery = {m: out / "methods" / f"{slug(m)}.html" for m in methods}
    common = {"tiny": tiny}

    # the region PNGs in threads: PIL decodes and encodes outside the GIL (at paper scale, 7,700 images)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        regions = dict(zip((p.page for p in pages), pool.map(lambda p: write_regions(p, out), pages)))
    for method, group in methods.items():
        for k, page in enumerate(group):
            page_dir = page.page.parent
            crops, mask = regions[page.page]
            written.update(p for p in (*crops, mask) if p is not None)
            subjects = []
            for i, (s, r) in enumerate(zip(page.record["subjects"], page.rows)):
                source = r.get("region_source") if isinstance(r.get("region_source"), str) else None
                subjects.append({
                    "name": s["name"], "phrase": s["phrase"], "role": s.get("role"), "colour": colour(i),
                    "region": href(crops[i], page_dir) if crops[i] else None,
                    "region_note": REGION_SOURCES.get(source, source) if crops[i] else NOT_SCORED if source == "none" else NO_REGION,
                    "references": [{"src": href(Path(ref).resolve(), page_dir), "name": Path(ref).name}
                                   for ref in s.get("references", [])],
                    "detected": r.get("detected")})
            headers, table = metric_table(page)
            attention = attention_of(page, out)
            settings = runfolder.flatten({"settings": page.record.get("settings") or {}, "model": page.record.get("model") or {}})
            rest = {k2: v for k2, v in runfolder.flatten({k3: v3 for k3, v3 in page.record.items()
                                                 if k3 not in ("subjects", "settings", "model", "prompt")}).items()}
            render("image.html.j2", page.page, written, **common, root=href(out, page_dir) + "/",
                   page=page, record=page.record, image_src=href(page.image_file, page_dir),
                   mask_src=href(mask, page_dir) if mask else None, boxes=boxes_of(page), ap_boxes=ap_boxes_of(page),
                   subjects=subjects, metric_headers=headers, metric_rows=table, settings=settings, record_fields=rest,
                   attention=[href(f, page_dir) for f in attention["figures"]], attention_note=attention["note"],
                   gallery=href(gallery[method], page_dir), index=href(out / "index.html", page_dir),
                   prev=href(group[k - 1].page, page_dir) if k > 0 else None,
                   next=href(group[k + 1].page, page_dir) if k + 1 < len(group) else None,
                   position=f"{k + 1} of {len(group)}", scores=gallery_scores(page))
        combos: dict[str, list[dict]] = {}
        for page in group:
            combos.setdefault(str(page.record["combination"]), []).append({
                "href": href(page.page, gallery[method].parent), "src": href(page.image_file, gallery[method].parent),
                "seed": page.record["seed"], "scores": gallery_scores(page), "prompt": page.record.get("prompt", ""),
                "missed": page.detected < len(page.rows)})
        render("method.html.j2", gallery[method], written, **common, root="../", method=method, combinations=combos,
               count=len(group), index="../index.html")

    benchmark = benchmark_of(metrics["combination"]) if len(metrics) else None
    shown_tables = sorted(tables, key=lambda t: (TABLE_ORDER.index(t.name) if t.name in TABLE_ORDER else len(TABLE_ORDER), t.name))
    published = {t.name: published_blocks(published_section(benchmark, table=t.name)) for t in shown_tables
                 if t.name in ("table1", "table2")}
    worst_lists = worst_cases(pages, worst)
    for lst in worst_lists.values():
        lst["rows"] = [({"href": href(p.page, out), "src": href(p.image_file, out), "method": p.method,
                         "combination": p.record["combination"], "seed": p.record["seed"]}, cells)
                       for p, cells in lst["rows"]]
    figures = {k: [href(f, out) for f in v] for k, v in figures_in(out).items()}
    downloads = sorted({p.name for p in out.iterdir() if p.is_file() and p.suffix in (".md", ".csv", ".tex", ".json")}
                       | {"report.json"})
    index = out / "index.html"
    render("index.html.j2", index, written, **common, root="", header_lines=list(header_lines), tables=shown_tables,
           published=published, figures=figures, worst=worst_lists, downloads=downloads,
           methods=[{"name": m, "href": href(gallery[m], out), "count": len(g),
                     "missed": sum(len(p.rows) - p.detected for p in g)} for m, g in methods.items()])
    remove_stale(out, written)
    return index
