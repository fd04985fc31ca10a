"""The README's library example runs as written: its ```python block, as a program, on the tiny models."""

import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from .conftest import REPO, data_root

DATA = data_root()


def library_example() -> str:
    """The ```python block of the README's section "The method as a library"."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## The method as a library\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) == 1, "one python block expected in the section"
    return blocks[0]


@pytest.mark.skipif(DATA is None, reason="needs the DreamBench images (ANYMS_DATA_ROOT or ../shared)")
def test_the_library_example_makes_an_image_on_the_tiny_models(tmp_path, tiny_root):
    (tmp_path / "example.py").write_text(library_example())
    env = {**os.environ, "ANYMS_SDXL": str(tiny_root / "sdxl"), "ANYMS_IP_ADAPTER": str(tiny_root / "IP-Adapter"),
           "ANYMS_DATA_ROOT": str(DATA), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}  # tiny ops gain nothing from threads
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with Image.open(tmp_path / "anyms.png") as image:
        assert image.size == (64, 64)  # the tiny SDXL's own size, from its config
        assert len(set(image.convert("L").getdata())) > 1  # an image, not a blank
    assert out.stdout.startswith("anyms.png: 64x64 in ")
