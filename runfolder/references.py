"""Subject reference images, decoded, checked and normalized once, the same way for generation and evaluation.

Every reference goes through :func:`load_reference`: the whole file is decoded (a truncated JPEG, a text
file named ``.jpg`` or an empty file fails here, naming the file), 16-bit images are scaled to 8 bits
(Pillow's ``convert("RGB")`` would clip them to white), transparency is composited on white (not the black
that dropping the alpha channel gives), and images smaller than :data:`MIN_SIDE` pixels are refused.
Generation checks every reference of a benchmark with :func:`check_references` before any model loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

# The smallest side we accept: image encoders resize to 224 px; below this a "reference" holds no identity.
MIN_SIDE = 32
FIX = "replace the file with a readable RGB image (PNG or JPEG) of at least {n} x {n} pixels"


class ReferenceImageError(ValueError):
    """A reference image that cannot be used; the message names the file and the fix."""


def _to_8bit(im: Image.Image) -> Image.Image:
    """Integer and float single-channel modes (16-bit PNGs open as ``I;16`` or ``I``) scaled to ``L``."""
    a = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
        a = a.astype(np.float64) / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def normalize(im: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB: alpha composited on white, 16-bit scaled down, palettes expanded."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB") if im.mode != "RGB" else im


def load_reference(path: str | os.PathLike) -> Image.Image:
    """The reference at ``path`` as an 8-bit RGB image; :class:`ReferenceImageError` naming the file and
    the fix when it cannot be used."""
    path = Path(path)
    fix = FIX.format(n=MIN_SIDE)
    if not path.is_file():
        raise ReferenceImageError(f"reference image {path}: no such file; {fix}")
    if path.stat().st_size == 0:
        raise ReferenceImageError(f"reference image {path}: the file is empty (0 bytes); {fix}")
    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte: a truncated file fails here, not inside a model
            rgb = normalize(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ReferenceImageError(f"reference image {path}: not a readable image ({err}); {fix}") from None
    if min(rgb.size) < MIN_SIDE:
        raise ReferenceImageError(
            f"reference image {path}: {rgb.width} x {rgb.height} pixels, smaller than {MIN_SIDE} x {MIN_SIDE}; {fix}")
    return rgb


def check_references(paths: Iterable[str | os.PathLike]) -> int:
    """Decodes and checks every distinct path (raises on the first bad one); returns how many were checked."""
    seen = set()
    for p in paths:
        key = os.fspath(p)
        if key not in seen:
            seen.add(key)
            load_reference(key)
    return len(seen)
