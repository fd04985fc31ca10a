"""A human study from run folders: N cases, each a prompt, its subjects' references, the layout drawn and one
image per chosen method, copied into a study folder that the web app serves and nothing else.

    <study_dir>/study.json                   cases, criteria, options (opaque ids -> method), sources, settings
    <study_dir>/files/<case>/<option>.png    the methods' images (the run folder's pixels, no metadata)
    <study_dir>/files/<case>/ref<j>.png      subject j's reference, as generation reads it
    <study_dir>/files/<case>/layout.png      the requested boxes drawn and labelled on white
    <study_dir>/votes.sqlite                 written by the web app (eval/study/store.py)

Cases are (combination, seed) pairs for which every chosen method has an image; they are drawn reproducibly
(``seed``) and spread across subject counts: round robin over the counts, a random case from each in turn.
Method names stay in ``study.json`` on the server; the participant sees options ``o<hex>``, drawn per case.
Reads run folders through ``runfolder`` only (never ``anyms/``).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Sequence

from PIL import Image

import runfolder
from runfolder.pictures import draw_boxes
from runfolder.references import load_reference

STUDY_FILE = "study.json"
FILES = "files"
CRITERIA = ("concept_alignment", "text_alignment", "layout_control", "overall_quality")
CRITERION_QUESTIONS = {
    "concept_alignment": "Which image(s) show the reference subjects most faithfully?",
    "text_alignment": "Which image(s) match the text prompt best?",
    "layout_control": "Which image(s) put each subject in its box best?",
    "overall_quality": "Which image(s) are best overall?",
}
MAX_PICKS = 2
FORMAT = 1


class StudyError(ValueError):
    """A study that cannot be built or read; the message names the field or file and the fix."""


def _candidates(run_dirs: Sequence[str | os.PathLike], methods: Sequence[str] | None) -> tuple[list[str], dict]:
    """Methods and ``{(combination, seed): {method: (run_dir, record)}}`` over every run folder."""
    found: dict[tuple[str, int], dict[str, tuple[Path, dict]]] = {}
    origin: dict[str, Path] = {}
    for d in run_dirs:
        d = Path(str(d))
        if not (d / runfolder.RECORDS).is_dir():
            raise StudyError(f"run_dir {d}: no records/ folder (not a run folder); give one written by generate")
        for rec in runfolder.read_records(d):
            m = rec["method"]
            if origin.setdefault(m, d) != d:
                raise StudyError(f"method {m!r} is in two run folders ({origin[m]} and {d}); "
                                 "a study names each method once: give methods=[...] or one of the folders")
            if (d / rec["image"]).is_file():
                found.setdefault((rec["combination"], int(rec["seed"])), {})[m] = (d, rec)
    available = sorted(origin)
    chosen = list(methods) if methods else available
    missing = [m for m in chosen if m not in origin]
    if missing:
        raise StudyError(f"methods {missing} are in none of the run folders (they hold {available})")
    if len(chosen) < 2:
        raise StudyError(f"a study compares at least 2 methods, got {chosen}")
    cases = {k: v for k, v in found.items() if all(m in v for m in chosen)}
    return chosen, cases


COMMANDS = ("build", "serve", "export", "report")


def _folder_to_write(field: str, value) -> Path:
    """A folder that is or can be made: not a file, not under one."""
    path = Path(str(value))
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"lies under {p}, which is a file"
                raise StudyError(f"{field}: {path} {what}; give a folder ({field}=FOLDER)")
            break
    return path


def _integer(field: str, value, least: int, most: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least or (most is not None and value > most):
        bound = f"from {least} to {most}" if most is not None else f">= {least}"
        raise StudyError(f"{field}: expected an integer {bound}, got {value!r}")
    return value


def check_study(cfg: dict) -> None:
    """A ``scripts/study.py`` command's settings (``conf/study.yaml`` resolved, as a dict) checked before anything is
    written (issue 32); :class:`StudyError` naming the field and the fix."""
    command = cfg.get("command")
    if command not in COMMANDS:
        raise StudyError(f"command: must be one of {', '.join(COMMANDS)}, got {command!r}; it is the first argument "
                         "(python scripts/study.py build run_dir=...)")
    run_dirs = list(cfg.get("run_dirs") or ([cfg["run_dir"]] if cfg.get("run_dir") else []))
    if command == "build" and not run_dirs:
        raise StudyError("run_dir: build needs run_dir=runs/NAME or run_dirs=[runs/A,runs/B]")
    if str(cfg.get("study_dir")).startswith("None/"):
        raise StudyError("study_dir: required, and not given; give study_dir=FOLDER (or run_dir=..., whose study/ "
                         "folder is the default)")
    study_dir = Path(str(cfg["study_dir"]))
    if command == "build":
        for d in run_dirs:
            try:
                runfolder.existing_run_dir(d, "run_dirs" if cfg.get("run_dirs") else "run_dir")
            except runfolder.RunFolderError as err:
                raise StudyError(str(err)) from None
        n_cases = _integer("n_cases", cfg.get("n_cases"), 1)
        _integer("seed", cfg.get("seed"), 0)
        _folder_to_write("study_dir", study_dir)
        if (study_dir / STUDY_FILE).exists() and not cfg.get("overwrite"):
            raise StudyError(f"study_dir: {study_dir} holds a study already; give another study_dir or overwrite=true "
                             "(its votes.sqlite is kept only if the cases stay the same)")
        chosen, cases = _candidates(run_dirs, cfg.get("methods"))
        if len(cases) < n_cases:
            raise StudyError(f"n_cases: {n_cases}, but only {len(cases)} (combination, seed) pairs have an image of "
                             f"every method {chosen}; lower n_cases or generate more")
        return
    if study_dir.exists() and not study_dir.is_dir():
        raise StudyError(f"study_dir: {study_dir} is a file; give the folder a study was built into")
    load_study(study_dir)
    if command == "serve":
        _integer("port", cfg.get("port"), 0, 65535)
    elif command == "export":
        target = Path(str(cfg.get("export_csv")))
        if target.is_dir():
            raise StudyError(f"export_csv: {target} is a folder; give a file name (export_csv=votes.csv)")
        _folder_to_write("export_csv", target.parent)
    else:
        _folder_to_write("out_dir", cfg.get("out_dir"))
        _integer("bootstrap.samples", (cfg.get("bootstrap") or {}).get("samples"), 1)


def draw_cases(cases: dict, n_cases: int, seed: int) -> list[tuple[str, int]]:
    """``n_cases`` keys of ``cases``, round robin over subject counts (ascending), a random one from each."""
    by_count: dict[int, list] = {}
    for key in sorted(cases):
        rec = next(iter(cases[key].values()))[1]
        by_count.setdefault(int(rec.get("n_subjects", len(rec["subjects"]))), []).append(key)
    rng = random.Random(seed)
    for keys in by_count.values():
        rng.shuffle(keys)
    drawn: list[tuple[str, int]] = []
    while len(drawn) < n_cases and any(by_count.values()):
        for count in sorted(by_count):
            if by_count[count] and len(drawn) < n_cases:
                drawn.append(by_count[count].pop())
    return drawn


def build_study(run_dirs: Sequence[str | os.PathLike], study_dir: str | os.PathLike, n_cases: int = 9,
                methods: Sequence[str] | None = None, seed: int = 0, name: str = "study",
                overwrite: bool = False) -> dict:
    """Writes the study folder and returns its ``study.json`` content."""
    if int(n_cases) < 1:
        raise StudyError(f"n_cases must be >= 1, got {n_cases}")
    study_dir = Path(str(study_dir))
    if (study_dir / STUDY_FILE).exists() and not overwrite:
        raise StudyError(f"{study_dir} holds a study already; give another study_dir or overwrite=true "
                         "(its votes.sqlite is kept only if the cases stay the same)")
    chosen, cases = _candidates(run_dirs, methods)
    if len(cases) < n_cases:
        raise StudyError(f"n_cases={n_cases} but only {len(cases)} (combination, seed) pairs have an image of every "
                         f"method {chosen}; lower n_cases or generate more")
    keys = draw_cases(cases, int(n_cases), int(seed))
    rng = random.Random(f"options-{seed}")
    staging = study_dir.with_name(study_dir.name + ".building")
    if staging.exists():
        shutil.rmtree(staging)
    out_cases = []
    for i, key in enumerate(keys, start=1):
        case_id = f"case{i:02d}"
        folder = staging / FILES / case_id
        folder.mkdir(parents=True)
        first = cases[key][chosen[0]][1]
        options = []
        used: set[str] = set()
        for m in chosen:
            d, rec = cases[key][m]
            option = f"o{rng.getrandbits(32):08x}"
            while option in used:
                option = f"o{rng.getrandbits(32):08x}"
            used.add(option)
            # pixels only: a PNG made elsewhere may carry text chunks naming its method, which must not reach
            # the participant
            with Image.open(d / rec["image"]) as im:
                runfolder.save_png(im.convert("RGB"), folder / f"{option}.png")
            options.append({"id": option, "method": m, "run_dir": str(d), "image": rec["image"],
                            "source_sha256": runfolder.file_digest(d / rec["image"]),
                            "model": (rec.get("model") or {}).get("name"),
                            "image_sha256": runfolder.file_digest(folder / f"{option}.png")})
        subjects = []
        for j, s in enumerate(first["subjects"]):
            ref = load_reference(s["references"][0])
            ref.thumbnail((256, 256))
            runfolder.save_png(ref, folder / f"ref{j}.png")
            subjects.append({"phrase": s["phrase"], "box": s["box"], "reference": f"ref{j}.png"})
        w, h = int(first.get("width", 512)), int(first.get("height", 512))
        canvas = Image.new("RGB", (180, max(1, round(180 * h / w))), "white")  # shown at its own size
        runfolder.save_png(draw_boxes(canvas, [s["box"] for s in first["subjects"]],
                                      [s["phrase"] for s in first["subjects"]]), folder / "layout.png")
        out_cases.append({"id": case_id, "combination": key[0], "seed": key[1], "prompt": first["prompt"],
                          "n_subjects": len(subjects), "subjects": subjects, "layout": "layout.png",
                          "options": options})
    study = {"format": FORMAT, "name": name, "methods": chosen, "criteria": list(CRITERIA),
             "questions": CRITERION_QUESTIONS, "max_picks": MAX_PICKS, "n_cases": len(out_cases), "seed": int(seed),
             "run_dirs": [str(d) for d in run_dirs], "cases": out_cases,
             "study_id": hashlib.sha256(repr((name, seed, [(c["id"], c["combination"], c["seed"],
                                                          [o["id"] for o in c["options"]]) for c in out_cases])
                                             ).encode()).hexdigest()[:16],
             **runfolder.provenance()}
    runfolder.write_json(staging / STUDY_FILE, study)
    study_dir.mkdir(parents=True, exist_ok=True)
    # swap files/ and study.json in; votes.sqlite stays (the store refuses it if the study id changed)
    if (study_dir / FILES).exists():
        shutil.rmtree(study_dir / FILES)
    os.replace(staging / FILES, study_dir / FILES)
    os.replace(staging / STUDY_FILE, study_dir / STUDY_FILE)
    shutil.rmtree(staging)
    return study


def load_study(study_dir: str | os.PathLike) -> dict:
    import json

    path = Path(str(study_dir)) / STUDY_FILE
    if not path.is_file():
        raise StudyError(f"{path}: no study here; build one with `python scripts/study.py build run_dir=...`")
    study = json.loads(path.read_text())
    if study.get("format") != FORMAT:
        raise StudyError(f"{path}: study format {study.get('format')} is not {FORMAT}; build it again")
    return study
