"""Shared fixtures: tiny random SD1.5-like and SDXL-like pipelines (anyms.tiny) and subject images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path | None:
    root = os.environ.get("ANYMS_DATA_ROOT")
    if root and (Path(root) / "dreambench").is_dir():
        return Path(root)
    shared = REPO.parent / "shared"
    return shared if (shared / "dreambench").is_dir() else None


def quiet_wandb(overrides) -> list[str]:
    """W&B off in tests unless a test asks for it (each offline run costs seconds)."""
    return [] if any(o.startswith("wandb=") for o in overrides) else ["wandb=disabled"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from runfolder.clip_vocab import write_clip_tokenizer_files

    return write_clip_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """The tiny generation models in the real hub layout (anyms.tiny.write_tiny_hub), once per session."""
    from anyms.tiny import write_tiny_hub

    return write_tiny_hub(tmp_path_factory.mktemp("cache") / "tiny")


@pytest.fixture(scope="session")
def tiny_eval_root(tmp_path_factory):
    """The tiny evaluators in their real layouts (eval.tiny_evaluators), once per session."""
    from eval.tiny_evaluators import write_tiny_evaluators

    return write_tiny_evaluators(tmp_path_factory.mktemp("cache") / "tiny_eval")


@pytest.fixture
def make_pipeline(tokenizer_dir):
    """``make_pipeline("sd15" | "sdxl")``: a fresh tiny pipeline (no IP-Adapter loaded yet)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from anyms.tiny import tiny_sd15_components, tiny_sdxl_components

    def make(kind: str):
        if kind == "sd15":
            pipe = StableDiffusionPipeline(**tiny_sd15_components(tokenizer_dir))
        else:
            pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(tokenizer_dir))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture(scope="session")
def subject_images():
    """Four RGB images: real DreamBench subjects when the data root has them, else seeded noise."""
    root = data_root()
    images = []
    if root is not None:
        for name in ("dog", "cat", "backpack", "vase"):
            folder = root / "dreambench" / name
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
            images.append(Image.open(files[0]).convert("RGB"))
        return images
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
