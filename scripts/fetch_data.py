"""Fetch the benchmark datasets into the data root (never committed to this repository).

    python scripts/fetch_data.py                 # every dataset into $ANYMS_DATA_ROOT or data/
    python scripts/fetch_data.py --dataset msbench --data-root /big/disk/data

Each repository is fetched at a pinned commit (DATASETS below), recorded in <data_root>/<name>/SOURCE.json;
offline, ``--from-clone PATH`` copies from a clone made elsewhere.

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
# template is in ./msdiffusion/dataset/prompts/msbench.py").
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


# Each dataset at a pinned commit (the newest of its repository when pinned, 2026-12-03), so that two users
# of this harness score against the same images; the commit is written to <data_root>/<name>/SOURCE.json.
DATASETS = {
    "dreambench": {"repo": "https://github.com/google/dreambooth.git", "commit": "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0",
                   "folder": "dataset"},
    "msbench": {"repo": MSBENCH_REPO, "commit": "74eb2d6d96669a8be9e786410de445ea41c187c0", "folder": MSBENCH_IMAGES,
                "post": msbench_definitions, "folders": "data types"},
}
SOURCE_FILE = "SOURCE.json"


class FetchError(RuntimeError):
    """A dataset that could not be fetched; the message says what failed and how to place the data by hand."""


def by_hand(name: str, spec: dict, target: Path) -> str:
    return (f"To place it by hand: on a machine with access run `git clone {spec['repo']} repo && git -C repo checkout "
            f"{spec['commit']}`, then `python scripts/fetch_data.py --dataset {name} --from-clone repo "
            f"--data-root {target.parent}` (or copy repo/{spec['folder']}/ to {target}/)")


def clone_pinned(name: str, spec: dict, dest: Path, target: Path) -> None:
    """The repository at its pinned commit (only that commit's objects are fetched)."""
    steps = [["git", "init", "-q", str(dest)],
             ["git", "-C", str(dest), "fetch", "-q", "--depth", "1", spec["repo"], spec["commit"]],
             ["git", "-C", str(dest), "checkout", "-q", "FETCH_HEAD"]]
    for cmd in steps:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise FetchError(f"{name}: `{' '.join(cmd[:3])}` failed ({err}). {by_hand(name, spec, target)}") from None
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["no message"])[-1]
            raise FetchError(f"{name}: could not fetch {spec['repo']} at commit {spec['commit'][:12]} (git: {last}). "
                             f"Is the network reachable? {by_hand(name, spec, target)}")


def head_commit(repo: Path) -> str | None:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def fetch(name: str, data_root: Path, force: bool = False, from_clone: Path | None = None) -> Path:
    """Fetches ``name`` into ``data_root/name`` at its pinned commit (or copies it from a local clone)."""
    spec = DATASETS[name]
    target = data_root / name
    if target.is_dir() and any(target.iterdir()) and not force:
        print(f"{name}: already in {target} (use --force to fetch again)")
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if from_clone is not None:
            repo = Path(from_clone)
            if not (repo / spec["folder"]).is_dir():
                raise FetchError(f"{name}: {repo} has no {spec['folder']}/ folder; give a clone of {spec['repo']}")
            commit = head_commit(repo)
            if commit != spec["commit"]:
                print(f"{name}: warning: {repo} is at commit {commit}, not the pinned {spec['commit']}; "
                      "the commit used is recorded in SOURCE.json")
        else:
            print(f"{name}: fetching {spec['repo']} at commit {spec['commit'][:12]} ...")
            repo = Path(tmp) / "repo"
            clone_pinned(name, spec, repo, target)
            commit = spec["commit"]
        source = repo / spec["folder"]
        if not source.is_dir():
            raise FetchError(f"{name}: the repository has no {spec['folder']}/ folder at {commit}")
        staging = data_root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        for extra in ("LICENSE", "README.md"):
            if (repo / extra).exists():
                shutil.copy(repo / extra, staging / extra)
        if spec.get("post"):
            spec["post"](repo, staging)
        (staging / SOURCE_FILE).write_text(json.dumps(
            {"repository": spec["repo"], "commit": commit, "pinned_commit": spec["commit"], "folder": spec["folder"]},
            indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # the folder appears whole or not at all
    subjects = sorted(p.name for p in target.iterdir() if p.is_dir())
    print(f"{name}: {len(subjects)} {spec.get('folders', 'subjects')} in {target} (commit {commit[:12] if commit else '?'})")
    return target


def check_arguments(args) -> None:
    """Bad arguments end the process before anything is fetched or written: one line naming the flag and the fix,
    exit code 2 (issue 32)."""
    from runfolder.entry import refuse

    if args.from_clone is not None:
        if len(args.dataset or []) != 1:
            refuse("fetch_data", "--from-clone: needs exactly one --dataset (the dataset the clone holds)")
        if not args.from_clone.is_dir():
            refuse("fetch_data", f"--from-clone: {args.from_clone} is not a folder; give a clone of the dataset's repository")
    root = Path(args.data_root)
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == root else f"lies under {p}, which is a file"
                refuse("fetch_data", f"--data-root: {root} {what}; give a folder (--data-root FOLDER)")
            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("ANYMS_DATA_ROOT") or "data")
    parser.add_argument("--dataset", choices=sorted(DATASETS), action="append")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--from-clone", type=Path, help="a local clone of the dataset's repository (with one --dataset)")
    args = parser.parse_args()
    check_arguments(args)
    root = Path(args.data_root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.dataset or sorted(DATASETS):
            fetch(name, root, args.force, args.from_clone)
    except FetchError as err:
        sys.exit(f"fetch_data: {err}")


if __name__ == "__main__":
    main()
