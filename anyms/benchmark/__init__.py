"""Benchmark configs (``conf/benchmark/*.yaml``) as validated combinations, checked before any model loads.

A combination: a prompt, subjects (name, reference image folder or file under the data root, detection
phrase, role, optional priority and scale) and one box per subject. A subject's reference images are the
image files of its folder in sorted order (or the single file): the first is the one the adapter sees,
all of them are references for the identity metrics.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from anyms.core.layout import Layout, LayoutError, Subject

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SUBJECT_FIELDS = {"name", "image", "phrase", "role", "priority", "scale"}


class BenchmarkConfigError(ValueError):
    """A benchmark config that cannot run; the message names the benchmark, combination and field."""


@dataclass(frozen=True)
class Combination:
    id: str
    prompt: str
    layout: Layout  # Subject.image is the reference the adapter sees
    references: tuple[tuple[Path, ...], ...]  # per subject, all its reference images
    definition: dict  # the combination's config, as plain data (hashed into each image's config hash)


def parse_seeds(spec: Any, where: str = "benchmark.seeds") -> list[int]:
    """A list of integers, a single integer, or ``"a-b"`` (inclusive)."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 0:
            raise BenchmarkConfigError(f"{where}: seeds must be non-negative integers, got {spec}")
        return [spec]
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", spec)
        if not m or int(m.group(1)) > int(m.group(2)):
            raise BenchmarkConfigError(f"{where}: {spec!r} is not 'a-b' with a <= b (e.g. 0-99)")
        return list(range(int(m.group(1)), int(m.group(2)) + 1))
    try:
        if isinstance(spec, (bool, float)) or any(isinstance(s, (bool, float)) for s in spec):
            raise TypeError
        seeds = [int(s) for s in spec]
    except (TypeError, ValueError):
        raise BenchmarkConfigError(f"{where}: give a list of integers or 'a-b', got {spec!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise BenchmarkConfigError(f"{where}: seeds must be distinct non-negative integers, got {seeds}")
    return seeds


def reference_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    return Path(data_root or os.environ.get("ANYMS_DATA_ROOT") or "data")


def load_combinations(benchmark: Mapping, data_root: str | os.PathLike | None) -> list[Combination]:
    """Validates every selected combination and finds its reference images. Raises
    :class:`BenchmarkConfigError` naming the benchmark, the combination and the field."""
    name = benchmark.get("name", "?")
    root = resolve_data_root(data_root)
    combos = benchmark.get("combinations") or {}
    generated = benchmark.get("generator") is not None
    if generated:  # combinations made by code (e.g. anyms.benchmark.msbench.combinations), validated as literal ones
        combos = _generated_combinations(name, benchmark, root)
    if not combos:
        raise BenchmarkConfigError(f"benchmark {name}: no combinations")
    only = benchmark.get("only")
    if only is not None:
        unknown = [c for c in only if c not in combos]
        if unknown:
            known = sorted(combos) if not generated else f"{len(combos)} ids such as {list(combos)[:3]}"
            raise BenchmarkConfigError(f"benchmark {name}: only names unknown combination(s) {unknown}; known: {known}")
        selected = list(only)
    else:
        selected = list(combos) if generated else sorted(combos)  # a generator's order is its own
    return [_combination(name, cid, _plain(combos[cid]), root) for cid in selected]


def _generated_combinations(name: str, benchmark: Mapping, root: Path) -> Mapping:
    """The hook for benchmarks made by code: ``generator: {_target_: module.function, **kwargs}`` is called
    as ``function(data_root=root, **kwargs)`` and returns the mapping a literal ``combinations:`` holds."""
    import importlib

    if benchmark.get("combinations"):
        raise BenchmarkConfigError(f"benchmark {name}: give either combinations or generator, not both")
    spec = _plain(benchmark["generator"])
    target = spec.get("_target_") if isinstance(spec, Mapping) else None
    if not isinstance(target, str) or "." not in target:
        raise BenchmarkConfigError(f"benchmark {name}, generator._target_: give a function as module.name, got {target!r}")
    module, _, attr = target.rpartition(".")
    try:
        function = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise BenchmarkConfigError(f"benchmark {name}, generator._target_: cannot import {target}: {err}") from None
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    combos = function(data_root=root, **kwargs)
    if not isinstance(combos, Mapping):
        raise BenchmarkConfigError(f"benchmark {name}: generator {target} returned {type(combos).__name__}, not a mapping")
    return combos


def _plain(obj):
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    return obj


def _combination(bench: str, cid: str, spec: Mapping, root: Path) -> Combination:
    where = f"benchmark {bench}, combination {cid}"
    if not isinstance(spec, Mapping):
        raise BenchmarkConfigError(f"{where}: must be a mapping with prompt, subjects and boxes")
    unknown = set(spec) - {"prompt", "subjects", "boxes"}
    if unknown:
        raise BenchmarkConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    prompt = spec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BenchmarkConfigError(f"{where}, prompt: must be a non-empty string")
    subjects, boxes = spec.get("subjects") or [], spec.get("boxes") or []
    if not subjects:
        raise BenchmarkConfigError(f"{where}, subjects: at least one subject is needed")
    if len(subjects) != len(boxes):
        raise BenchmarkConfigError(
            f"{where}: {len(subjects)} subjects but {len(boxes)} boxes; give one box per subject, in the same order"
        )
    built, refs = [], []
    for i, (s, box) in enumerate(zip(subjects, boxes)):
        field = f"{where}, subjects[{i}]"
        if not isinstance(s, Mapping):
            raise BenchmarkConfigError(f"{field}: must be a mapping (name, image, phrase, role)")
        bad = set(s) - SUBJECT_FIELDS
        if bad:
            raise BenchmarkConfigError(f"{field}: unknown field(s) {sorted(bad)}; known: {sorted(SUBJECT_FIELDS)}")
        if not s.get("image"):
            raise BenchmarkConfigError(f"{field}.image: missing (a folder or file under the data root)")
        image_path = root / s["image"]
        if not image_path.exists():
            raise BenchmarkConfigError(
                f"{field}.image: {image_path} does not exist (data_root={root}); fetch the data with "
                "`make data` or set data_root=... (or ANYMS_DATA_ROOT) to the folder that holds it"
            )
        images = reference_images(image_path)
        if not images:
            raise BenchmarkConfigError(f"{field}.image: {image_path} holds no image file ({sorted(IMAGE_SUFFIXES)})")
        kwargs = {k: v for k, v in s.items() if k in {"name", "phrase", "role", "priority", "scale"}}
        kwargs.setdefault("name", Path(s["image"]).stem)
        try:
            built.append(Subject(image=str(images[0]), box=tuple(box) if isinstance(box, Sequence) else box, **kwargs))
        except (LayoutError, TypeError) as err:
            raise BenchmarkConfigError(f"{field} (box: boxes[{i}]): {err}") from None
        refs.append(tuple(images))
    try:
        layout = Layout(built)
    except LayoutError as err:
        raise BenchmarkConfigError(f"{where}: {err}") from None
    return Combination(cid, prompt, layout, tuple(refs), dict(spec))
