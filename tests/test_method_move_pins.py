"""Issue 17 moved every method onto one protocol (anyms/methods/): the methods that existed before the move must
make the images and config hashes they made before it (tiny SDXL-like model, smoke combination c02, seed 0, the
default generation settings, on the CPU with the pinned torch/diffusers/transformers).

Config hashes are pure functions of the config: pinned exactly. Images are not compared byte for byte (issue 24):
their bytes depend on the kernels oneDNN and ATen pick for the processor, so a pin made on one machine fails on
another. They are compared as decoded pixels with the references in ``tests/data/method_pins/`` (made by the code
before the move, git 915f19f; its README), within a tolerance measured by ``benchmarks/kernel_drift.py``.
``tests/test_machine_independence.py`` runs this file again under other forced kernels."""

from __future__ import annotations

import json
import os

import pytest
import torch

import runfolder
from anyms.generation.generate import run_generation
from benchmarks.kernel_drift import REFERENCES, pixel_drift

from .test_generate import DATA, make_cfg

# method: config hash, from the code before issue 17 (git 915f19f)
PINNED_HASHES = {
    "anyms": "efdc24b3cc5f0eb3",
    "anyms_literal": "06bd102368214d4b",
    "ip_adapter_joint": "7668478b26e2244f",
    "ms_diffusion": "e5331f19b0573dc4",
    "text_only": "94a68961f3af2704",
    "wo_crop_merge": "2983b216481cf39e",
    "wo_local": "df94b907b249bc4b",
}
PINNED_VERSIONS = {"torch": "2.13.0+cpu", "diffusers": "0.42.1", "transformers": "5.23.0"}
# Pixel tolerance (per channel, 0-255) against the references. Measured (benchmarks/results/*-kernel_drift.md): of
# the kernel choices that can be forced on one AMD EPYC (AVX2) machine (ONEDNN_MAX_CPU_ISA=AVX2 | AVX512_CORE | SSE41,
# ATEN_CPU_CAPABILITY=default | avx2, 1 vs 2 torch threads, and SSE41 + default + 2 threads together), only oneDNN's
# SSE4.1 kernels move these images: by at most 1, mean 0.0002 (anyms, anyms_literal, wo_local, text_only); the rest
# are byte-identical here. An AVX-512 machine failed the old byte pins of 3 methods. The tolerance leaves 8x that
# max for processors not seen here and stays far below what a changed method moves: the two closest methods
# (wo_crop_merge vs wo_local, which differ only in the box masks) are 41 / 6.97 apart (test_tolerance_tells_methods_apart).
MAX_ABS_DIFF = 8
MEAN_ABS_DIFF = 0.5
DRIFT_LOG = "ANYMS_PIN_DRIFT_LOG"  # a file: each comparison appended as one JSON line (test_machine_independence)

needs_pinned = pytest.mark.skipif(
    DATA is None or torch.cuda.is_available()
    or any(runfolder.provenance()["versions"].get(k) != v for k, v in PINNED_VERSIONS.items()),
    reason=f"pinned on the CPU with {PINNED_VERSIONS} and the shared data root")


@needs_pinned
@pytest.mark.parametrize("method", sorted(PINNED_HASHES))
def test_images_and_config_hashes_are_those_before_the_move(method, tmp_path, tiny_root):
    run_generation(make_cfg(tmp_path, "model=tiny", f"method={method}", "benchmark=smoke", "benchmark.seeds=[0]",
                            tiny_root=tiny_root))
    (record,) = runfolder.read_records(tmp_path)
    assert record["config_hash"] == PINNED_HASHES[method]
    drift = pixel_drift(tmp_path / record["image"], REFERENCES / f"{method}.png")
    if os.environ.get(DRIFT_LOG):
        with open(os.environ[DRIFT_LOG], "a") as log:
            log.write(json.dumps({"method": method, **drift, "hardware": record["hardware"]}) + "\n")
    assert drift["max"] <= MAX_ABS_DIFF and drift["mean"] <= MEAN_ABS_DIFF, (
        f"{method}: pixels moved by max {drift['max']} / mean {drift['mean']:.4f} from the image before the move "
        f"(tolerance {MAX_ABS_DIFF} / {MEAN_ABS_DIFF}) on {record['hardware']['label']}")


def test_tolerance_tells_methods_apart():
    """The tolerance would catch a refactor that turned one method into its nearest neighbour."""
    names = sorted(PINNED_HASHES)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if {a, b} == {"anyms", "anyms_literal"}:  # the same method, two implementations
                continue
            drift = pixel_drift(REFERENCES / f"{a}.png", REFERENCES / f"{b}.png")
            assert drift["max"] > MAX_ABS_DIFF and drift["mean"] > MEAN_ABS_DIFF, (a, b, drift)
