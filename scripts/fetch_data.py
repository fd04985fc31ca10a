"""Fetch the benchmark datasets into the data root (never committed to this repository).

    python scripts/fetch_data.py                 # DreamBench into $ANYMS_DATA_ROOT or data/
    python scripts/fetch_data.py --data-root /big/disk/data

DreamBench: the subject images of google/dreambooth (its `dataset/` folder: 30 subjects), cloned with git
and copied to <data_root>/dreambench/<subject>/, with the dataset's own license and references files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DATASETS = {
    "dreambench": {"repo": "https://github.com/google/dreambooth.git", "folder": "dataset"},
}


def fetch(name: str, data_root: Path, force: bool = False) -> Path:
    spec = DATASETS[name]
    target = data_root / name
    if target.is_dir() and any(target.iterdir()) and not force:
        print(f"{name}: already in {target} (use --force to fetch again)")
        return target
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{name}: cloning {spec['repo']} ...")
        subprocess.run(["git", "clone", "--depth", "1", spec["repo"], tmp + "/repo"], check=True)
        source = Path(tmp) / "repo" / spec["folder"]
        if not source.is_dir():
            sys.exit(f"{name}: the repository has no {spec['folder']}/ folder; has its layout changed?")
        staging = data_root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        for extra in ("LICENSE", "README.md"):
            if (Path(tmp) / "repo" / extra).exists():
                shutil.copy(Path(tmp) / "repo" / extra, staging / extra)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # the folder appears whole or not at all
    subjects = sorted(p.name for p in target.iterdir() if p.is_dir())
    print(f"{name}: {len(subjects)} subjects in {target}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("ANYMS_DATA_ROOT") or "data")
    parser.add_argument("--dataset", choices=sorted(DATASETS), action="append")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    root = Path(args.data_root)
    root.mkdir(parents=True, exist_ok=True)
    for name in args.dataset or sorted(DATASETS):
        fetch(name, root, args.force)


if __name__ == "__main__":
    main()
