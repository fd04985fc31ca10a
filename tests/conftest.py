"""Shared fixtures: tiny random SD1.5-like and SDXL-like pipelines (anyms.tiny) and subject images."""

from __future__ import annotations

import os
import shutil
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


# Headless Chromium (Debian's chromium + chromium-driver) for the browser tests. CI (.ci/run) installs it and sets
# ANYMS_REQUIRE_BROWSER=1: there a missing browser fails instead of skipping.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_REQUIRED = bool(os.environ.get("ANYMS_REQUIRE_BROWSER"))
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not BROWSER_REQUIRED,
    reason="headless Chromium is not installed (apt-get install -y chromium chromium-driver; .ci/run installs it)")


@pytest.fixture
def browser():
    """A headless Chromium driven by Selenium (tests using it are marked ``needs_browser``)."""
    assert CHROMIUM and CHROMEDRIVER, "ANYMS_REQUIRE_BROWSER is set but chromium or chromedriver is not on PATH"
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=960,900",
                "--disable-extensions", "--no-first-run", "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(5)  # elements of a page still loading after a navigation
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def reported_run(tmp_path_factory, tiny_eval_root):
    """A synthetic run folder evaluated with the tiny evaluators and reported, HTML included
    (synthetic_run.write_reported_run), once per session: copy it before changing it."""
    from .synthetic_run import write_reported_run

    return write_reported_run(tmp_path_factory.mktemp("reported") / "run", tiny_eval_root)
