"""Fetch the benchmark datasets into the data root (never committed to this repository).

    python scripts/fetch_data.py                 # every dataset into $ANYMS_DATA_ROOT or data/
    python scripts/fetch_data.py --dataset msbench --data-root /big/disk/data

DreamBench: the subject images of google/dreambooth (its `dataset/` folder: 30 subjects), cloned with git
and copied to <data_root>/dreambench/<subject>/, with the dataset's own license and references files.

MS-Bench: MS-Diffusion's public repository (MS-Diffusion/MS-Diffusion, MIT): its `msbench/` folder
(<data type>/<subject>.<ext>) copied to <data_root>/msbench/, with LICENSE and README.md, and the
benchmark's definitions (subject class words, combination types, boxes, prompt templates) read from
`msdiffusion/dataset/prompts/msbench.py` without running it and written as <data_root>/msbench/msbench.json.
Subjects of the definitions without an image are listed (the public copy is known to lack living/cat1).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# MS-Bench in MS-Diffusion's repository (its README: "We provide the proposed MS-Bench in ./msbench. The prompt
# template is in ./msdiffusion/dataset/prompts/msbench.py"); paths as of commit 62c64eb, not fetched here.
MSBENCH_REPO = "https://github.com/MS-Diffusion/MS-Diffusion.git"
MSBENCH_IMAGES = "msbench"
MSBENCH_DEFINITIONS = "msdiffusion/dataset/prompts/msbench.py"
MSBENCH_KEYS = ("data_class_dict", "two_subject_combinations", "three_subject_combinations",
                "subject_combination_boxes", "subject_combination_prompts")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def literal_assignments(source: str) -> dict:
    """The module's top-level ``name = <literal>`` assignments, where a literal may use names assigned
    before it (``{"living_living": normal_prompts_two_subjects}``); nothing is executed."""
    names: dict = {}

    def value(node):
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise ValueError(f"line {node.lineno}: {node.id} is not assigned before it is used")
            return names[node.id]
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(value(e) for e in node.elts)
        if isinstance(node, ast.Dict):
            return {value(k): value(v) for k, v in zip(node.keys, node.values)}
        return ast.literal_eval(node)  # constants, negative numbers

    for stmt in ast.parse(source).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                names[stmt.targets[0].id] = value(stmt.value)
            except ValueError:
                continue  # not a literal: not part of the definitions
    return names


def msbench_definitions(repo: Path, staging: Path) -> None:
    """Writes msbench.json from the repository's prompt-template module and names the subjects without an image."""
    source = repo / MSBENCH_DEFINITIONS
    if not source.is_file():
        sys.exit(f"msbench: the repository has no {MSBENCH_DEFINITIONS}; has its layout changed?")
    found = literal_assignments(source.read_text())
    missing = [k for k in MSBENCH_KEYS if k not in found]
    if missing:
        sys.exit(f"msbench: {MSBENCH_DEFINITIONS} defines no {missing}; has its layout changed?")
    (staging / "msbench.json").write_text(json.dumps({k: found[k] for k in MSBENCH_KEYS}, indent=1) + "\n")
    present = {p.stem for p in staging.glob("*/*") if p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES}
    absent = [s for s in found["data_class_dict"] if s not in present]
    print(f"msbench: {len(present)} subjects with images" + (f"; no image for {absent} (their samples are left out)" if absent else ""))


DATASETS = {
    "dreambench": {"repo": "https://github.com/google/dreambooth.git", "folder": "dataset"},
    "msbench": {"repo": MSBENCH_REPO, "folder": MSBENCH_IMAGES, "post": msbench_definitions, "folders": "data types"},
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
        if spec.get("post"):
            spec["post"](Path(tmp) / "repo", staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # the folder appears whole or not at all
    subjects = sorted(p.name for p in target.iterdir() if p.is_dir())
    print(f"{name}: {len(subjects)} {spec.get('folders', 'subjects')} in {target}")
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
