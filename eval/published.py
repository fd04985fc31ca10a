"""Published numbers as reference rows: kept as data (``eval/published.json``) with their source, shown in
reports beside measured rows, marked "published", never mixed into our means.

    rows = published_rows("msbench")          # [{"method": "MS-Diffusion", "clip_i": 0.698, ...}, ...]
    md = published_markdown("msbench")        # "## Published (not measured here)" + a table, or ""
    benchmark_of(records["combination"])      # "msbench" when every combination id is an MS-Bench sample id

Values are stored as printed (``scale``: 1.0 for a 0-1 table); the Markdown shows them on the report's
0-100 scale with the printed value in brackets, and the benchmark's protocol note.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

PUBLISHED_FILE = Path(__file__).with_name("published.json")
REPORT_SCALE = 100.0  # the report shows 100 x cosine
HEADERS = {"clip_i": "CLIP-I", "dino": "DINO", "m_dino": "M-DINO", "clip_t": "CLIP-T", "dreamsim": "DreamSim",
           "iou": "mIoU", "ap50": "AP50", "seconds": "Time (s)", "memory_gb": "Memory (GB)",
           "concept_alignment": "Concept alignment", "text_alignment": "Text alignment",
           "layout_control": "Layout control", "overall_quality": "Overall quality"}
SECTION_TITLE = "Published (not measured here)"

# combination ids of the benchmarks (eval/ knows nothing of anyms/: the formats are restated here, and a
# test checks them against anyms.benchmark.msbench's ids)
_MSBENCH_TYPE = r"(?:living|object|scene|upwearing|midwearing|downwearing|wholewearing)"
BENCHMARK_IDS = {
    "msbench": re.compile(rf"^{_MSBENCH_TYPE}(?:_{_MSBENCH_TYPE})+-[^/+]+(?:\+[^/+]+)+-p\d+$"),
    "anyms11": re.compile(r"^c\d{2}$"),
}


@lru_cache(maxsize=4)
def _load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def load_published(path: str | Path | None = None) -> dict:
    """The whole data file: ``{"benchmarks": {name: {source, scale, metrics, protocol_note, rows}}}``."""
    return _load(str(path or PUBLISHED_FILE))


def benchmark_entry(benchmark: str | None, path: str | Path | None = None, table: str = "table1") -> dict:
    """A benchmark's published table: ``table1`` is the entry named by the benchmark, other tables
    ``<benchmark>:<table>`` (``anyms11:table2``)."""
    if not benchmark:
        return {}
    key = benchmark if table == "table1" else f"{benchmark}:{table}"
    return load_published(path)["benchmarks"].get(key, {})


def published_rows(benchmark: str | None, path: str | Path | None = None, table: str = "table1") -> list[dict]:
    """The published rows of a benchmark's table (empty when none are kept), each marked ``published: True``
    and carrying its source and scale; values as printed."""
    entry = benchmark_entry(benchmark, path, table)
    return [{**row, "published": True, "source": entry.get("source"), "scale": entry.get("scale", 1.0)}
            for row in entry.get("rows", [])]


def benchmark_of(combination_ids: Iterable[str]) -> str | None:
    """The benchmark whose id format every combination id follows, else None."""
    ids = {str(c) for c in combination_ids}
    if not ids:
        return None
    for name, pattern in BENCHMARK_IDS.items():
        if all(pattern.match(c) for c in ids):
            return name
    return None


def published_section(benchmark: str | None, columns: Sequence[str] | None = None,
                      path: str | Path | None = None, table: str = "table1") -> dict:
    """The benchmark's published rows as the report shows them: ``title``, ``intro``, ``header``, ``rows`` (cells
    as text, each method marked "(published)"), ``numeric`` (which columns hold numbers) and ``protocol``. Values
    on the report's 0-100 scale with the printed value in brackets where the paper's scale differs (values it
    prints on that scale already, and time or memory, as printed); ``{}`` when no rows are kept for it."""
    entry = benchmark_entry(benchmark, path, table)
    rows = published_rows(benchmark, path, table)
    if not rows:
        return {}
    metrics = list(columns or entry.get("metrics") or [k for k in HEADERS if k in rows[0]])
    factor = REPORT_SCALE / float(entry.get("scale", 1.0))
    unscaled = set(entry.get("unscaled") or [])
    header = ["Method"] + [HEADERS.get(m, m) for m in metrics] + ["Base model / note"]
    cells_of = []
    for row in rows:
        cells = [f"{row['method']} (published)"]
        for m in metrics:
            v = row.get(m)
            if v is None:
                cells.append("-")
            elif m in unscaled:
                cells.append(f"{v:g}")
            elif factor == 1.0:  # printed on the report's scale: as printed, two decimals
                cells.append(f"{v:.2f}")
            else:
                cells.append(f"{v * factor:.1f} [{v:g}]")
        cells.append(str(row.get("base_model") or row.get("note") or "-"))
        cells_of.append(cells)
    intro = (f"Reference rows from {entry.get('source')}{' <' + entry['url'] + '>' if entry.get('url') else ''}. "
             "Not computed by this harness and never part of the means above"
             + ("; shown x 100 with the printed value in brackets"
                if factor != 1.0 and any(m not in unscaled for m in metrics) else "; as printed") + ".")
    numeric = [False] + [any(r.get(m) is not None for r in rows) for m in metrics] + [False]
    return {"title": SECTION_TITLE, "intro": intro, "header": header, "rows": cells_of, "numeric": numeric,
            "protocol": entry.get("protocol_note", "")}


def published_markdown(benchmark: str | None, columns: Sequence[str] | None = None,
                       path: str | Path | None = None, table: str = "table1") -> str:
    """:func:`published_section` as a Markdown section; "" when no rows are kept for it."""
    section = published_section(benchmark, columns, path, table)
    if not section:
        return ""
    lines = ["| " + " | ".join(section["header"]) + " |", "|" + "|".join("---" for _ in section["header"]) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in section["rows"]]
    return (f"## {section['title']}\n\n{section['intro']}\n\n" + "\n".join(lines) + "\n\n"
            + (f"Protocol: {section['protocol']}\n" if section["protocol"] else ""))
