"""All tiny random evaluator checkpoints in one folder, written once, for ``eval=tiny``.

``conf/eval/tiny.yaml`` points the real evaluator classes (``HFGroundingDino``, ``SamSegmenter``,
``ClipScorer``, ``DinoScorer``, ``DreamSimScorer``) at files under ``root``; this writes those files in
the layouts the real loaders read (see :mod:`eval.tiny_grounding` and :mod:`eval.tiny_models`). The
folder is written to a temporary name and renamed, so a crash never leaves half of it.
"""

from __future__ import annotations

from pathlib import Path

from eval.tiny_grounding import write_tiny_grounding_dino, write_tiny_sam
from eval.tiny_models import write_dreamsim_checkpoints, write_tiny_dino, write_tiny_dinov2, write_tiny_open_clip
from runfolder import write_folder_once

LAYOUT = {  # what conf/eval/tiny.yaml reads, relative to root
    "grounding_dino": "grounding-dino-tiny",
    "sam": "sam_tiny.pth",
    "clip": "open_clip",
    "dino": "dino-vits16",
    "dinov2": "dinov2-small",
    "dreamsim": "dreamsim",
}
DREAMSIM_TYPE = "open_clip_vitb32"  # single backbone: the ensemble's three real-size ViT-B/16 cost minutes here


def write_tiny_evaluators(root: str | Path, seed: int = 0) -> Path:
    root = Path(root)
    if (root / ".complete").exists() and not all((root / rel).exists() for rel in LAYOUT.values()):
        import shutil

        shutil.rmtree(root)  # written by an older version with fewer evaluators: write it again, whole

    def write(tmp: Path) -> None:
        write_tiny_grounding_dino(tmp / LAYOUT["grounding_dino"], seed=seed)
        write_tiny_sam(tmp / LAYOUT["sam"], seed=seed)
        write_tiny_open_clip(tmp / LAYOUT["clip"], seed=seed)
        write_tiny_dino(tmp / LAYOUT["dino"], seed=seed)
        write_tiny_dinov2(tmp / LAYOUT["dinov2"], seed=seed)
        write_dreamsim_checkpoints(tmp / LAYOUT["dreamsim"], DREAMSIM_TYPE, seed=seed)

    return write_folder_once(root, write, "tiny random evaluators written by eval.tiny_evaluators")
