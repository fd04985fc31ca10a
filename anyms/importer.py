"""Images made elsewhere (Cones2, MuDI, MS-Diffusion outputs...) as a run folder the evaluator scores.

The source folder holds one image per (combination, seed) under a pattern, by default
``<combination>/<seed>.<ext>``; the benchmark config gives each image its prompt, subjects, boxes and
references, exactly as for generated images. Images are copied as metadata-free PNGs; records say
``model: {"name": "external:<method>"}`` and carry no time or memory (they were not measured here).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

import runfolder
from anyms.benchmark import BenchmarkConfigError, load_combinations, parse_seeds

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class ImportSummary:
    run_dir: Path
    method: str
    imported: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def find_image(source: Path, pattern: str, combination: str, seed: int) -> Path | None:
    stem = pattern.format(combination=combination, seed=seed)
    for candidate in [source / stem] + [source / (stem + s) for s in IMAGE_SUFFIXES]:
        if candidate.is_file():
            return candidate
    return None


def import_images(source: str | Path, method: str, benchmark, data_root, run_dir: str | Path,
                  pattern: str = "{combination}/{seed}", strict: bool = False) -> ImportSummary:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", method):
        raise BenchmarkConfigError(f"method {method!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
    source = Path(source)
    if not source.is_dir():
        raise BenchmarkConfigError(f"source {source}: not a folder of images")
    combos = load_combinations(benchmark, data_root)
    seeds = parse_seeds(benchmark.seeds)
    run_dir = Path(run_dir)
    summary = ImportSummary(run_dir, method)
    records = runfolder.records_file(run_dir, method, (0, 1))
    prov = runfolder.provenance()
    for combo in combos:
        for seed in seeds:
            path = find_image(source, pattern, combo.id, seed)
            label = pattern.format(combination=combo.id, seed=seed)
            if path is None:
                summary.missing.append(label)
                continue
            try:
                image = Image.open(path).convert("RGB")
            except (UnidentifiedImageError, OSError) as err:
                raise BenchmarkConfigError(f"{path}: not a readable image ({err})") from None
            rel = runfolder.image_path(method, combo.id, seed)
            runfolder.save_png(image, run_dir / rel)
            runfolder.append_record(records, {
                "image": rel, "image_sha256": runfolder.file_digest(run_dir / rel), "combination": combo.id, "method": method, "seed": int(seed), "prompt": combo.prompt,
                "n_subjects": len(combo.layout), "width": image.width, "height": image.height,
                "subjects": [{"name": s.name, "phrase": s.phrase, "role": s.role, "box": list(s.box),
                              "scale": s.scale, "references": [str(p) for p in refs]}
                             for s, refs in zip(combo.layout, combo.references)],
                "model": {"name": f"external:{method}", "source": str(source)},
                "config_hash": runfolder.config_hash({"source_image": runfolder.file_digest(path),
                                                      "combination": combo.definition}),
                "versions": prov["versions"], "git_hash": prov["git_hash"], "device": "external",
                "dtype": "external", "seconds": None, "peak_memory_bytes": None, "created": time.time(),
            })
            summary.imported.append(rel)
    if strict and summary.missing:
        raise BenchmarkConfigError(f"source {source}: {len(summary.missing)} image(s) missing, e.g. {summary.missing[:3]}")
    return summary
