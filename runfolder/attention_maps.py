"""The attention maps of one image in a run folder: ``images/<method>/<combination>/<seed>.attention.npz``,
named by the image's record (field ``attention_maps``). Written by the generation wing's recorder
(``anyms.core.attention_maps``), read by the evaluation wing (``eval.attention``). Arrays, for n subjects in the
record's order and the recorded grids ``g = "HxW"``, finest first:

- ``subjects``, ``phrases``: ``str[n]``; ``phrase_found``: ``bool[n]`` (the phrase's tokens were found in
  the prompt; if not, its text maps are 0); ``method``: ``str[]``; ``steps``: ``int[k]``, the recorded
  denoising steps (0 = first); ``grids``: ``int[G, 2]``, the recorded grids as (H, W);
- per grid ``g``: ``image_<g>``, ``text_<g>``: ``float32[n, H, W]``, the subject's image-attention weight and
  its phrase's text-attention weight, summed over the subject's (phrase's) tokens, averaged over heads, the
  layers of that grid (``layers_<g>``: ``str[m]``) and the steps; ``box_<g>``: ``bool[n, H, W]``, each
  subject's requested box on that grid (the generator's floor/ceil rule);
- ``image``, ``text``: ``float32[n, H0, W0]``, the per-grid maps brought to the finest grid (bilinear) and
  averaged over grids, for pictures.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from runfolder import RunFolderError

SUFFIX = ".attention.npz"
REQUIRED = ("subjects", "phrases", "phrase_found", "method", "steps", "grids", "image", "text")
PER_GRID = ("image", "text", "box", "layers")


class AttentionMapsError(RunFolderError):
    """An attention-map file that does not follow the format; the message names the file and the array."""


def grid_key(h: int, w: int) -> str:
    return f"{int(h)}x{int(w)}"


def attention_maps_path(image_path: str) -> str:
    """The maps' path next to an image path (both relative to the run folder)."""
    if not image_path.endswith(".png"):
        raise ValueError(f"not an image path: {image_path!r}")
    return re.sub(r"\.png$", SUFFIX, image_path)


def save_attention_maps(arrays: dict, path: str | os.PathLike) -> Path:
    """Checks ``arrays`` against the format and writes them compressed, atomically."""
    from runfolder import atomic_write

    check_attention_maps(arrays, str(path))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def load_attention_maps(path: str | os.PathLike, n_subjects: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of one file, checked (and against the record's subject count when given)."""
    path = Path(path)
    if not path.exists():
        raise AttentionMapsError(f"{path}: attention-map file missing (named by its record's attention_maps)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:  # a truncated or foreign file
        raise AttentionMapsError(f"{path}: not a readable .npz ({err})") from None
    check_attention_maps(arrays, str(path), n_subjects)
    return arrays


def check_attention_maps(arrays: dict, where: str, n_subjects: int | None = None) -> None:
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise AttentionMapsError(f"{where}: missing array(s) {missing}")
    n = len(arrays["subjects"])
    if n_subjects is not None and n != n_subjects:
        raise AttentionMapsError(f"{where}: maps of {n} subjects, but the record has {n_subjects}")
    grids = np.asarray(arrays["grids"])
    if grids.ndim != 2 or grids.shape[1] != 2 or not len(grids):
        raise AttentionMapsError(f"{where}: array grids must be [G, 2] with G >= 1, got shape {grids.shape}")
    for h, w in grids.tolist():
        g = grid_key(h, w)
        for stem in PER_GRID:
            key = f"{stem}_{g}"
            if key not in arrays:
                raise AttentionMapsError(f"{where}: missing array {key}")
            if stem != "layers" and tuple(np.shape(arrays[key])) != (n, h, w):
                raise AttentionMapsError(f"{where}: array {key} has shape {np.shape(arrays[key])}, expected {(n, h, w)}")
    h0, w0 = grids[0].tolist()
    for key in ("image", "text"):
        if tuple(np.shape(arrays[key])) != (n, h0, w0):
            raise AttentionMapsError(f"{where}: array {key} has shape {np.shape(arrays[key])}, expected {(n, h0, w0)}")
        if not np.isfinite(arrays[key]).all():
            raise AttentionMapsError(f"{where}: array {key} has non-finite values")
