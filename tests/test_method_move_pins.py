"""Issue 17 moved every method onto one protocol (anyms/methods/): the images and config hashes of the methods
that existed before the move are pinned here, as the code before the move made them (tiny SDXL-like model,
smoke combination c02, seed 0, the default generation settings, on the CPU with the pinned torch/diffusers)."""

from __future__ import annotations

import pytest
import torch

import runfolder
from anyms.generation.generate import run_generation

from .test_generate import DATA, make_cfg

# method: (config hash, PNG sha256), from the code before issue 17 (git 915f19f)
PINNED = {
    "anyms": ("efdc24b3cc5f0eb3", "9796d8477f8bea614ce9eeb198e59bdd582ff297c9ea35fe73fd56a02a513dcc"),
    "anyms_literal": ("06bd102368214d4b", "9796d8477f8bea614ce9eeb198e59bdd582ff297c9ea35fe73fd56a02a513dcc"),
    "ip_adapter_joint": ("7668478b26e2244f", "8f580b0c752485118ef14f4e0a5557a0844fc76d9906f3a47264e6420879bd41"),
    "ms_diffusion": ("e5331f19b0573dc4", "ec5cd3d7d533d6b95e28ec13b6402266b199389aaceccd2842ca4a9c4a7e2889"),
    "text_only": ("94a68961f3af2704", "cfd629f32a3ae2329ee243ab42427db42520bf9f2d5781d8714eeee578e138a3"),
    "wo_crop_merge": ("2983b216481cf39e", "6e7c7bafb5845fd1f8be2e4b3dd18fea43f03bf22eb83bf0f9539fd93c325498"),
    "wo_local": ("df94b907b249bc4b", "812f7a9a40b1036c80e23dbaaf08dd98ccd920e1a3e9fb9569a6545ecb4518e9"),
}
PINNED_VERSIONS = {"torch": "2.13.0+cpu", "diffusers": "0.42.1", "transformers": "5.23.0"}

needs_pinned = pytest.mark.skipif(
    DATA is None or torch.cuda.is_available() or runfolder.provenance()["versions"].get("torch") != PINNED_VERSIONS["torch"]
    or any(runfolder.provenance()["versions"].get(k) != v for k, v in PINNED_VERSIONS.items()),
    reason=f"pinned on the CPU with {PINNED_VERSIONS} and the shared data root")


@needs_pinned
@pytest.mark.parametrize("method", sorted(PINNED))
def test_images_and_config_hashes_are_those_before_the_move(method, tmp_path, tiny_root):
    run_generation(make_cfg(tmp_path, "model=tiny", f"method={method}", "benchmark=smoke", "benchmark.seeds=[0]",
                            tiny_root=tiny_root))
    (record,) = runfolder.read_records(tmp_path)
    assert (record["config_hash"], record["image_sha256"]) == PINNED[method]
