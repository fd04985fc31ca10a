"""MS-Bench (MS-Diffusion, arXiv 2406.07209) as combinations the generation stage runs.

MS-Bench's definitions (``<data_root>/msbench/msbench.json``, written by ``scripts/fetch_data.py`` from
MS-Diffusion's ``msdiffusion/dataset/prompts/msbench.py``): ``data_class_dict`` (subject -> class word),
13 combination types of 2 or 3 data types, one fixed box per position of each type and the prompt
templates of each type. Its images: ``<data_root>/msbench/<data type>/<subject>.<ext>`` (or a folder).

Enumeration, in a deterministic order:
- combination types in the definitions' order (the two-subject types, then the three-subject ones);
- subjects of a data type in ``data_class_dict`` order; for a data type repeated in a combination type
  (living_living, object_object_object, ...) unordered pairs / triples without repetition
  (``itertools.combinations``), distinct data types crossed (``itertools.product``);
- every prompt template of the type, formatted with the subjects' class words.

Each (subject combination, template) is one *sample*, and one harness combination with the id
``<type>-<subject>+<subject>[+<subject>]-p<template index>`` (e.g. ``living_object-cat+backpack-p0``):
stable whatever other subjects are present, and usable as a folder name. The full 40-subject list gives
MS-Diffusion's published 1148 combinations and 4488 samples; the public copy (no ``living/cat1``) gives
1036 and 4036 (:func:`counts`).

Roles for AnyMS's priority rule come from the data types: wearables (up/mid/down/wholewearing) are
``attribute``, scenes ``background``, living and object ``object``. MS-Bench's living + midwearing boxes
are identical and its living + wholewearing boxes nested, so the wearable (attribute) owns every token of
the living subject's box: :func:`no_token_report` lists those samples and subjects.

    python -m anyms.benchmark.msbench [--data-root ../shared]     # counts and the no-token report
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from anyms.benchmark import IMAGE_SUFFIXES, BenchmarkConfigError, resolve_data_root
from anyms.core.layout import Layout, LayoutWarning, Subject

log = logging.getLogger(__name__)

DATASET = "msbench"  # the folder under the data root
DEFINITIONS_FILE = "msbench.json"
DEFINITION_KEYS = ("data_class_dict", "two_subject_combinations", "three_subject_combinations",
                   "subject_combination_boxes", "subject_combination_prompts")
PUBLISHED_COMBINATIONS = 1148  # MS-Diffusion paper and README: 1148 combinations, 4488 evaluation samples
PUBLISHED_SAMPLES = 4488

DATA_TYPES = ("living", "object", "scene", "upwearing", "midwearing", "downwearing", "wholewearing")
ROLES = {"living": "object", "object": "object", "scene": "background", "upwearing": "attribute",
         "midwearing": "attribute", "downwearing": "attribute", "wholewearing": "attribute"}
# The data type of each of the 40 subjects: the folders of MS-Diffusion's msbench/<type>/ (cat1, absent
# from the public copy, is a living subject). Used where a subject's image is not on disk; a subject found
# on disk in another type's folder is an error.
SUBJECT_TYPES = {
    **dict.fromkeys(["cat", "cat2", "dog", "dog2", "dog5", "dog6", "dog7", "dog8", "cat1", "dog1"], "living"),
    **dict.fromkeys(["backpack", "clock", "colorful_sneaker", "duck_toy", "grey_sloth_plushie", "teapot",
                     "wolf_plushie", "lantern", "flower", "teddybear"], "object"),
    **dict.fromkeys(["forest", "mountain", "barn", "waterfall"], "scene"),
    **dict.fromkeys(["cap", "cap1", "hat", "hat1", "hat2"], "upwearing"),
    **dict.fromkeys(["coat", "jacket", "t-shirt", "shirt", "shirt1", "sweater"], "midwearing"),
    **dict.fromkeys(["shorts1", "trousers", "jeans"], "downwearing"),
    **dict.fromkeys(["dress", "dress1"], "wholewearing"),
}
# SDXL's cross-attention grids at 1024 px (latent 128x128; its first level has no cross-attention)
SDXL_1024_GRIDS = ((64, 64), (32, 32))


@dataclass(frozen=True)
class Sample:
    """One MS-Bench sample: a subject combination of a combination type with one of its prompt templates."""

    id: str
    combination_type: str
    subjects: tuple[str, ...]
    data_types: tuple[str, ...]
    phrases: tuple[str, ...]  # class words
    boxes: tuple[tuple[float, float, float, float], ...]
    template_index: int
    prompt: str

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(ROLES[t] for t in self.data_types)

    @property
    def combination_key(self) -> tuple[str, tuple[str, ...]]:
        """The subject combination this sample belongs to (samples = combinations x templates)."""
        return self.combination_type, self.subjects

    def layout(self, images: Sequence | None = None) -> Layout:
        images = images or [None] * len(self.subjects)
        return Layout(Subject(name, phrase, image, box, role=role)
                      for name, phrase, image, box, role in zip(self.subjects, self.phrases, images, self.boxes, self.roles))


def sample_id(combination_type: str, subjects: Sequence[str], template_index: int) -> str:
    return f"{combination_type}-{'+'.join(subjects)}-p{template_index}"


# --- definitions and subjects -------------------------------------------------------------------------

def load_definitions(data_root: str | os.PathLike | None = None) -> dict:
    """``<data_root>/msbench/msbench.json``, checked for the keys and shapes used here."""
    path = resolve_data_root(data_root) / DATASET / DEFINITIONS_FILE
    if not path.is_file():
        raise BenchmarkConfigError(
            f"benchmark msbench: {path} does not exist; fetch MS-Bench with `python scripts/fetch_data.py "
            "--dataset msbench` or set data_root=... (or ANYMS_DATA_ROOT) to the folder that holds msbench/")
    try:
        definitions = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BenchmarkConfigError(f"benchmark msbench: {path} is not valid JSON: {err}") from None
    check_definitions(definitions, str(path))
    return definitions


def check_definitions(d: Mapping, where: str = "msbench definitions") -> None:
    missing = [k for k in DEFINITION_KEYS if k not in d]
    if missing:
        raise BenchmarkConfigError(f"{where}: missing key(s) {missing}")
    for ctype in combination_types(d):
        parts = ctype.split("_")
        bad = [p for p in parts if p not in DATA_TYPES]
        if bad:
            raise BenchmarkConfigError(f"{where}: combination type {ctype!r} has unknown data type(s) {bad}")
        boxes = d["subject_combination_boxes"].get(ctype)
        if not boxes or len(boxes) != len(parts) or any(len(b) != 4 for b in boxes):
            raise BenchmarkConfigError(f"{where}: subject_combination_boxes[{ctype!r}] must hold {len(parts)} boxes of 4 numbers")
        templates = d["subject_combination_prompts"].get(ctype)
        if not templates:
            raise BenchmarkConfigError(f"{where}: subject_combination_prompts[{ctype!r}] is missing or empty")
        for t in templates:
            try:
                t.format(*["x"] * len(parts))
            except (IndexError, KeyError, AttributeError):
                raise BenchmarkConfigError(f"{where}: template {t!r} of {ctype!r} does not take {len(parts)} class words") from None


def combination_types(definitions: Mapping) -> list[str]:
    return list(definitions["two_subject_combinations"]) + list(definitions["three_subject_combinations"])


def find_image(root: Path, data_type: str, subject: str) -> Path | None:
    """``msbench/<type>/<subject>/`` (a folder) or the ``msbench/<type>/<subject>.<ext>`` file, else None."""
    folder = root / DATASET / data_type
    if (folder / subject).is_dir():
        return folder / subject
    for suffix in sorted(IMAGE_SUFFIXES):
        for candidate in (folder / f"{subject}{suffix}", folder / f"{subject}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def subject_types(definitions: Mapping, data_root: str | os.PathLike | None = None) -> dict[str, str]:
    """Subject -> data type, in ``data_class_dict`` order: from the image's folder when it is on disk,
    else from :data:`SUBJECT_TYPES` (the full list; needs no data)."""
    root = resolve_data_root(data_root) if data_root is not None else None
    out = {}
    for subject in definitions["data_class_dict"]:
        found = [t for t in DATA_TYPES if root is not None and find_image(root, t, subject) is not None]
        known = SUBJECT_TYPES.get(subject)
        if len(found) > 1 or (found and known and found[0] != known):
            raise BenchmarkConfigError(
                f"benchmark msbench: subject {subject!r} found under {found} (expected {known or 'one type folder'})")
        if not found and known is None:
            raise BenchmarkConfigError(
                f"benchmark msbench: subject {subject!r} of data_class_dict has no image under "
                f"{root / DATASET if root else 'the data root'}/<type>/ and no known data type")
        out[subject] = found[0] if found else known
    return out


def by_type(types: Mapping[str, str], subjects: Iterable[str] | None = None) -> dict[str, list[str]]:
    keep = set(types if subjects is None else subjects)
    out: dict[str, list[str]] = {t: [] for t in DATA_TYPES}
    for subject, t in types.items():
        if subject in keep:
            out[t].append(subject)
    return out


def available_subjects(definitions: Mapping, data_root: str | os.PathLike | None) -> dict[str, Path]:
    """Subject -> its image file or folder, for the subjects present under ``<data_root>/msbench/``."""
    root = resolve_data_root(data_root)
    types = subject_types(definitions, root)
    return {s: p for s, t in types.items() if (p := find_image(root, t, s)) is not None}


# --- enumeration ----------------------------------------------------------------------------------------

def subject_tuples(ctype: str, subjects_by_type: Mapping[str, Sequence[str]]) -> list[tuple[str, ...]]:
    """The subject combinations of a combination type: unordered within a repeated data type, crossed
    between data types, in positional order."""
    parts = ctype.split("_")
    groups = list(dict.fromkeys(parts))  # distinct data types, first-appearance order
    choices = [list(itertools.combinations(subjects_by_type.get(t, []), parts.count(t))) for t in groups]
    out = []
    for pick in itertools.product(*choices):
        chosen = {t: list(p) for t, p in zip(groups, pick)}
        out.append(tuple(chosen[t].pop(0) for t in parts))
    return out


def samples(definitions: Mapping, subjects_by_type: Mapping[str, Sequence[str]],
            types: Sequence[str] | None = None) -> list[Sample]:
    """Every sample of the given combination types (default all), in the module's deterministic order."""
    classes = definitions["data_class_dict"]
    known = combination_types(definitions)
    selected = known if types is None else list(types)
    unknown = [t for t in selected if t not in known]
    if unknown:
        raise BenchmarkConfigError(f"benchmark msbench: unknown combination type(s) {unknown}; known: {known}")
    out = []
    for ctype in selected:
        parts = ctype.split("_")
        boxes = tuple(tuple(float(c) for c in b) for b in definitions["subject_combination_boxes"][ctype])
        templates = definitions["subject_combination_prompts"][ctype]
        for subjects in subject_tuples(ctype, subjects_by_type):
            phrases = tuple(classes[s] for s in subjects)
            for k, template in enumerate(templates):
                out.append(Sample(sample_id(ctype, subjects, k), ctype, subjects, tuple(parts), phrases, boxes, k,
                                  template.format(*phrases)))
    return out


def full_samples(definitions: Mapping) -> list[Sample]:
    """All samples of the full subject list (the 40 subjects of ``data_class_dict``), no data needed."""
    return samples(definitions, by_type(subject_types(definitions)))


def first_per_type(sample_list: Iterable[Sample], n: int = 1) -> list[Sample]:
    """The first ``n`` samples of each combination type, in the given order (``msbench_small``: n = 1)."""
    taken: dict[str, int] = {}
    out = []
    for s in sample_list:
        if taken.get(s.combination_type, 0) < n:
            taken[s.combination_type] = taken.get(s.combination_type, 0) + 1
            out.append(s)
    return out


def counts(sample_list: Sequence[Sample]) -> dict:
    """Combinations (distinct subject combinations) and samples, in total and per combination type."""
    per_type: dict[str, dict] = {}
    for s in sample_list:
        entry = per_type.setdefault(s.combination_type, {"combinations": set(), "samples": 0})
        entry["combinations"].add(s.subjects)
        entry["samples"] += 1
    per_type = {t: {"combinations": len(e["combinations"]), "samples": e["samples"]} for t, e in per_type.items()}
    return {"combinations": sum(e["combinations"] for e in per_type.values()),
            "samples": sum(e["samples"] for e in per_type.values()), "per_type": per_type}


# --- the benchmark config hook ------------------------------------------------------------------------

def combinations(data_root: str | os.PathLike | None = None, missing: str = "skip", types: Sequence[str] | None = None,
                 per_type: int | None = None) -> dict[str, dict]:
    """The benchmark config's ``generator``: ``{sample id: {prompt, subjects, boxes}}`` in enumeration order,
    the format of ``conf/benchmark/anyms11.yaml``'s ``combinations`` (validated by
    :func:`anyms.benchmark.load_combinations`).

    missing: ``skip`` drops the samples of subjects whose image is not under ``<data_root>/msbench/``
    (the public copy lacks ``living/cat1``) and logs them with the resulting counts; ``error`` keeps them,
    so the loader stops naming the missing image. types: a subset of combination types; per_type: at most
    this many samples of each type (the first ones).
    """
    if missing not in ("skip", "error"):
        raise BenchmarkConfigError(f"benchmark msbench, generator.missing: {missing!r} is not 'skip' or 'error'")
    root = resolve_data_root(data_root)
    definitions = load_definitions(root)
    types_of = subject_types(definitions, root)
    images = available_subjects(definitions, root)
    absent = [s for s in types_of if s not in images]
    keep = list(types_of) if missing == "error" else list(images)
    chosen = samples(definitions, by_type(types_of, keep), types)
    if absent and missing == "skip":
        c = counts(chosen)
        log.warning("msbench: no image for %s under %s; their samples are left out, leaving %d combinations, %d samples "
                    "(the full list gives %d / %d)", absent, root / DATASET, c["combinations"], c["samples"],
                    PUBLISHED_COMBINATIONS, PUBLISHED_SAMPLES)
    if per_type is not None:
        chosen = first_per_type(chosen, per_type)
    out = {}
    for s in chosen:
        subjects = []
        for name, t, phrase, role in zip(s.subjects, s.data_types, s.phrases, s.roles):
            image = images.get(name)
            rel = image.relative_to(root) if image is not None else Path(DATASET) / t / name
            subjects.append({"name": name, "image": rel.as_posix(), "phrase": phrase, "role": role})
        out[s.id] = {"prompt": s.prompt, "subjects": subjects, "boxes": [list(b) for b in s.boxes]}
    return out


# --- subjects that own no token under AnyMS's priority rule ------------------------------------------

@dataclass(frozen=True)
class NoToken:
    sample: str
    combination_type: str
    grid: tuple[int, int]
    subjects: tuple[str, ...]  # the subjects that own no token at this grid
    warning: str  # the LayoutWarning's message


def no_token_report(sample_list: Iterable[Sample], grids: Sequence[tuple[int, int]] = SDXL_1024_GRIDS) -> list[NoToken]:
    """Per sample and grid, the subjects that own no token (their box covered by subjects of higher
    priority): the LayoutWarnings of ``Layout.owner_map``, collected instead of printed."""
    out = []
    for s in sample_list:
        layout = s.layout()
        for h, w in grids:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", LayoutWarning)
                owner = layout.owner_map(h, w)
            lost = tuple(layout[j].name for j in range(len(layout)) if not bool((owner == j).any()))
            messages = [str(c.message) for c in caught if issubclass(c.category, LayoutWarning)]
            if lost:
                out.append(NoToken(s.id, s.combination_type, (h, w), lost, " ".join(messages)))
    return out


def summary(data_root: str | os.PathLike | None = None, grids: Sequence[tuple[int, int]] = SDXL_1024_GRIDS) -> str:
    """Counts of the full list and of the data root's copy against the published ones, and the no-token
    report, as text."""
    root = resolve_data_root(data_root)
    definitions = load_definitions(root)
    full = full_samples(definitions)
    images = available_subjects(definitions, root)
    present = samples(definitions, by_type(subject_types(definitions, root), images))
    cf, cp = counts(full), counts(present)
    absent = [s for s in definitions["data_class_dict"] if s not in images]
    lines = [
        f"MS-Bench definitions: {root / DATASET / DEFINITIONS_FILE}",
        f"published:                         {PUBLISHED_COMBINATIONS} combinations, {PUBLISHED_SAMPLES} samples",
        f"full list ({len(definitions['data_class_dict'])} subjects):           "
        f"{cf['combinations']} combinations, {cf['samples']} samples",
        f"this copy ({len(images)} subjects; missing {absent or 'none'}): {cp['combinations']} combinations, {cp['samples']} samples",
        "", f"{'combination type':34s} {'full':>12s} {'this copy':>12s}   (combinations / samples)",
    ]
    for t in combination_types(definitions):
        a, b = cf["per_type"].get(t, {}), cp["per_type"].get(t, {})
        lines.append(f"{t:34s} {a.get('combinations', 0):5d} / {a.get('samples', 0):4d} "
                     f"{b.get('combinations', 0):5d} / {b.get('samples', 0):4d}")
    report = no_token_report(present, grids)
    ids = sorted({r.sample for r in report})
    lines += ["", f"subjects owning no token under AnyMS's priority rule (grids {', '.join(f'{h}x{w}' for h, w in grids)}): "
              f"{len(ids)} of {len(present)} samples of this copy"]
    by_ctype: dict[str, list[NoToken]] = {}
    for r in report:
        by_ctype.setdefault(r.combination_type, []).append(r)
    for t, rows in by_ctype.items():
        lost = sorted({s for r in rows for s in r.subjects})
        lines.append(f"  {t}: {len({r.sample for r in rows})} samples; subjects without a token: {', '.join(lost)}")
        lines.append(f"    e.g. {rows[0].sample} at {rows[0].grid[0]}x{rows[0].grid[1]}: {rows[0].warning}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="MS-Bench counts and the samples whose subjects own no token.")
    parser.add_argument("--data-root", default=None, help="default: $ANYMS_DATA_ROOT, else data/")
    parser.add_argument("--list", action="store_true", help="also list every no-token sample and its subjects")
    args = parser.parse_args(argv)
    try:
        print(summary(args.data_root))
        if args.list:
            root = resolve_data_root(args.data_root)
            definitions = load_definitions(root)
            present = samples(definitions, by_type(subject_types(definitions, root), available_subjects(definitions, root)))
            for r in no_token_report(present):
                print(f"{r.sample}\t{r.grid[0]}x{r.grid[1]}\t{','.join(r.subjects)}")
    except BenchmarkConfigError as err:
        raise SystemExit(f"msbench: {err}") from None


if __name__ == "__main__":
    main()
