"""The layout as data: subjects, their boxes, and which subject owns each token of an attention grid.

Conventions (DESIGN.md section 2):
- a box is normalized ``(x0, y0, x1, y1)`` in [0, 1], origin top-left;
- at a grid of ``h x w`` tokens a box covers rows ``floor(y0*h) .. ceil(y1*h)`` and columns
  ``floor(x0*w) .. ceil(x1*w)``, end exclusive, so no box vanishes at a coarse level;
- tokens are in row-major order, as diffusers flattens ``[B, C, H, W]`` to ``[B, H*W, C]``;
- where boxes overlap one subject owns the token: higher rank wins (explicit ``priority``, else the
  role's rank), ties go to the smaller box (areas compared exactly), then to the earlier subject.

Nothing here touches the file system: ``Subject.image`` is carried along for the pipeline.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterable, Sequence

import torch

ROLE_RANK = {"attribute": 2, "object": 1, "background": 0}


class LayoutError(ValueError):
    """A layout that cannot be used; the message names the subject and the field."""


class LayoutWarning(UserWarning):
    """A layout that runs but loses something (a subject that owns no token at some grid)."""


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars, 0-d tensors
        except (TypeError, ValueError):
            raise LayoutError(f"{what} must be a number, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise LayoutError(f"{what} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class Subject:
    """One subject to place: its reference image, its box and how it ranks where boxes overlap.

    name: unique id within the layout; phrase: what a detector is asked to find ("dog");
    image: a path or anything the pipeline can open (never opened here);
    box: normalized (x0, y0, x1, y1); role: attribute | object | background;
    priority: an integer rank that overrides the role's; scale: multiplies this subject's image term.
    """

    name: str
    phrase: str
    image: Any
    box: tuple[float, float, float, float]
    role: str = "object"
    priority: int | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise LayoutError(f"subject name must be a non-empty string, got {self.name!r}")
        who = f"subject {self.name!r}"
        if not isinstance(self.phrase, str) or not self.phrase.strip():
            raise LayoutError(f"{who}: phrase must be a non-empty string, got {self.phrase!r}")
        try:
            coords = tuple(self.box)
        except TypeError:
            raise LayoutError(f"{who}: box must be 4 numbers (x0, y0, x1, y1), got {self.box!r}") from None
        if len(coords) != 4:
            raise LayoutError(f"{who}: box must be 4 numbers (x0, y0, x1, y1), got {len(coords)}: {self.box!r}")
        x0, y0, x1, y1 = (_finite_number(c, f"{who}: box[{i}]") for i, c in enumerate(coords))
        for label, c in (("x0", x0), ("y0", y0), ("x1", x1), ("y1", y1)):
            if not 0.0 <= c <= 1.0:
                raise LayoutError(
                    f"{who}: box {label}={c} is outside [0, 1]; boxes are normalized (x0, y0, x1, y1), "
                    "divide pixel coordinates by the image width and height"
                )
        if x1 <= x0:
            raise LayoutError(f"{who}: box needs x1 > x0, got x0={x0}, x1={x1}")
        if y1 <= y0:
            raise LayoutError(f"{who}: box needs y1 > y0, got y0={y0}, y1={y1}")
        object.__setattr__(self, "box", (x0, y0, x1, y1))
        if self.role not in ROLE_RANK:
            raise LayoutError(f"{who}: unknown role {self.role!r}; use one of {sorted(ROLE_RANK)}")
        if self.priority is not None and (isinstance(self.priority, bool) or not isinstance(self.priority, int)):
            raise LayoutError(f"{who}: priority must be an integer or None, got {self.priority!r}")
        object.__setattr__(self, "scale", _finite_number(self.scale, f"{who}: scale"))

    @property
    def rank(self) -> int:
        return self.priority if self.priority is not None else ROLE_RANK[self.role]

    @property
    def area(self) -> Fraction:
        """The box's normalized area, exact: the priority rule compares areas, and in floating point two equal
        areas can differ by an ulp ((0.4 - 0.1) * 0.3 vs 0.3 * 0.3). Each coordinate is taken as the shortest
        decimal that reads back as it (``repr``), i.e. the number the user wrote, so equal boxes tie exactly."""
        x0, y0, x1, y1 = (Fraction(repr(c)) for c in self.box)
        return (x1 - x0) * (y1 - y0)

    def token_slices(self, h: int, w: int) -> tuple[slice, slice]:
        """Rows and columns of an ``h x w`` grid this box covers: floor start, ceil end (exclusive).

        Products are snapped to integers within 1e-9 first, so 0.7 * 10 = 7.000000000000001 ends at 7.
        Since y1 > y0, every box covers at least one row and one column at every grid.
        """
        x0, y0, x1, y1 = self.box

        def span(a: float, b: float, n: int) -> slice:
            lo, hi = _snap(a * n), _snap(b * n)
            return slice(math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1))

        return span(y0, y1, h), span(x0, x1, w)


def _snap(x: float) -> float:
    r = round(x)
    return float(r) if abs(x - r) < 1e-9 else x


@dataclass(frozen=True)
class Layout:
    """An ordered, validated set of subjects. Masks and owner maps are cached per grid size."""

    subjects: tuple[Subject, ...]
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __init__(self, subjects: Iterable[Subject]):
        subjects = tuple(subjects)
        if not subjects:
            raise LayoutError("layout is empty: give at least one subject")
        for i, s in enumerate(subjects):
            if not isinstance(s, Subject):
                raise LayoutError(f"layout entry {i} must be a Subject, got {type(s).__name__}")
        seen: set[str] = set()
        for s in subjects:
            if s.name in seen:
                raise LayoutError(f"subject name {s.name!r} appears twice; names must be unique in a layout")
            seen.add(s.name)
        object.__setattr__(self, "subjects", subjects)
        object.__setattr__(self, "_cache", {})

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self):
        return iter(self.subjects)

    def __getitem__(self, i: int) -> Subject:
        return self.subjects[i]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.subjects]

    @property
    def scales(self) -> list[float]:
        return [s.scale for s in self.subjects]

    def priority_order(self) -> list[int]:
        """Subject indices from the lowest to the highest priority (the last one painted wins)."""
        keyed = [(s.rank, -s.area, -i) for i, s in enumerate(self.subjects)]
        return sorted(range(len(self.subjects)), key=lambda i: keyed[i])

    def cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per ``key`` for this layout and kept with it: for data derived from the
        layout that every attention layer of a call needs again (e.g. the queries grouped by owner, per grid size and device).
        The result is shared, so callers must not modify it."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def box_masks(self, h: int, w: int) -> torch.Tensor:
        """``BoolTensor[n, h, w]``: token (r, c) is True for each subject whose box covers it."""
        key = ("masks", h, w)
        if key not in self._cache:
            _check_grid(h, w)
            masks = torch.zeros(len(self.subjects), h, w, dtype=torch.bool)
            for j, s in enumerate(self.subjects):
                rows, cols = s.token_slices(h, w)
                masks[j, rows, cols] = True
            self._cache[key] = masks
        return self._cache[key].clone()

    def owner_map(self, h: int, w: int) -> torch.Tensor:
        """``LongTensor[h, w]``: the index of the subject that owns each token, -1 where no box covers it.

        Warns (once per grid) about subjects that own no token, naming them and the grid.
        """
        key = ("owner", h, w)
        if key not in self._cache:
            masks = self.box_masks(h, w)
            owner = torch.full((h, w), -1, dtype=torch.long)
            for j in self.priority_order():  # lowest first, so the highest priority is painted last
                owner[masks[j]] = j
            owned = torch.bincount(owner[owner >= 0].flatten(), minlength=len(self.subjects))
            lost = [self.subjects[j].name for j in range(len(self.subjects)) if owned[j] == 0]
            if lost:
                warnings.warn(
                    f"subject(s) {lost} own no token at the {h}x{w} grid: their boxes are covered by "
                    "subjects of higher priority, so they get no image attention there",
                    LayoutWarning,
                    stacklevel=2,
                )
            self._cache[key] = owner
        return self._cache[key].clone()

    def overlap_share(self, h: int, w: int) -> float:
        """Fraction of boxed tokens covered by two or more boxes at an ``h x w`` grid."""
        counts = self.box_masks(h, w).sum(0)
        boxed = int((counts > 0).sum())
        return float((counts > 1).sum()) / boxed if boxed else 0.0

    @classmethod
    def from_dicts(cls, subjects: Sequence[dict]) -> "Layout":
        """Builds a layout from plain mappings (configs, JSON records)."""
        out = []
        for i, d in enumerate(subjects):
            d = dict(d)
            unknown = set(d) - {"name", "phrase", "image", "box", "role", "priority", "scale"}
            if unknown:
                raise LayoutError(f"subject {d.get('name', i)!r}: unknown field(s) {sorted(unknown)}")
            missing = {"name", "phrase", "box"} - set(d)
            if missing:
                raise LayoutError(f"subject {d.get('name', i)!r}: missing field(s) {sorted(missing)}")
            d.setdefault("image", None)
            out.append(Subject(**d))
        return cls(out)


def _check_grid(h: int, w: int) -> None:
    if not (isinstance(h, int) and isinstance(w, int)) or h < 1 or w < 1:
        raise LayoutError(f"grid must be two positive integers (h, w), got ({h!r}, {w!r})")


def grid_levels(latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The token grids of SD/SDXL's UNet levels for a latent of ``(h, w)``: each level halves with ceil
    (a stride-2 conv with padding 1), down to 1x1."""
    h, w = latent_hw
    _check_grid(h, w)
    levels = [(h, w)]
    while (h, w) != (1, 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        levels.append((h, w))
    return levels


def grid_for(query_len: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` token grid of an attention layer whose query has ``query_len`` tokens.

    ``latent_hw`` is the latent's size (image size / 8 for SD and SDXL). The grid is the UNet level whose
    ``h * w`` equals the query length; the areas of successive levels strictly decrease, so at most one fits.
    """
    for h, w in grid_levels(tuple(latent_hw)):
        if h * w == query_len:
            return h, w
    raise LayoutError(
        f"no UNet level of a {latent_hw[0]}x{latent_hw[1]} latent has {query_len} tokens "
        f"(levels: {', '.join(f'{h}x{w}' for h, w in grid_levels(tuple(latent_hw)))}); "
        "is the latent size the image size divided by the VAE's scale factor?"
    )
