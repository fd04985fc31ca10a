"""The run folder: the one contract between the generation wing (anyms/) and the evaluation wing (eval/).

Both wings import this package and neither imports the other. The format itself is described once, in
``run_record.schema.json`` beside this file::

    <run_dir>/images/<method>/<combination>/<seed>.png
    <run_dir>/records/<method>.<i>-of-<k>.jsonl      one JSON record per image (one file per shard)
    <run_dir>/plans/<method>.<i>-of-<k>.json         the images each generation shard set out to make
    <run_dir>/images/<method>/<combination>/<seed>.attention.npz   optional attention maps (attention_maps.py)

Here: reading and writing records (validated against the schema, errors naming the file, line and
field), atomic writes, and the provenance every output carries (package versions, git hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("run_record.schema.json")
IMAGES = "images"
RECORDS = "records"
PLANS = "plans"
PACKAGES = ("anyms-bench", "torch", "torchvision", "diffusers", "transformers", "accelerate", "numpy", "pillow",
            "open_clip_torch", "timm", "segment-anything", "dreamsim", "pycocotools", "pandas", "hydra-core")


def register_resolvers() -> None:
    """``${device:}`` in configs: ``cuda`` when torch sees a GPU, else ``cpu``."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("device"):
        def device() -> str:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"

        OmegaConf.register_new_resolver("device", device)


register_resolvers()


class RunFolderError(ValueError):
    """A run folder that does not follow the contract; the message names the file and the field."""


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def validate_record(record: dict, where: str = "record") -> dict:
    """Raises :class:`RunFolderError` naming ``where`` and the first offending field."""
    errors = sorted(_validator().iter_errors(record), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        field = ".".join(str(p) for p in err.path) or "(top level)"
        raise RunFolderError(f"{where}: field {field}: {err.message}")
    return record


def image_path(method: str, combination: str, seed: int) -> str:
    """The image's path relative to the run folder."""
    return f"{IMAGES}/{method}/{combination}/{int(seed)}.png"


def records_file(run_dir: str | os.PathLike, method: str, shard: tuple[int, int]) -> Path:
    i, k = shard
    return Path(run_dir) / RECORDS / f"{method}.{i}-of-{k}.jsonl"


def write_plan(run_dir: str | os.PathLike, method: str, shard: tuple[int, int], images: list[str]) -> Path:
    """Records what a generation shard set out to make, so evaluation can say what is still missing. Plans
    accumulate: the images of every earlier run of this method and shard stay in the plan (a later run with
    fewer seeds or a failed one must not hide what is still missing). Call it with the shard's writer lock held."""
    i, k = shard
    path = Path(run_dir) / PLANS / f"{method}.{i}-of-{k}.json"
    earlier: list[str] = []
    if path.exists():
        try:
            earlier = json.loads(path.read_text()).get("images", [])
        except (OSError, ValueError) as err:
            raise RunFolderError(f"{path}: not a plan ({err}); delete it and run generate again") from None
    return write_json(path, {"method": method, "shard": f"{i}/{k}", "images": sorted(set(earlier) | set(images))})


def planned_images(run_dir: str | os.PathLike) -> set[str]:
    folder = Path(run_dir) / PLANS
    planned: set[str] = set()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        planned.update(json.loads(path.read_text()).get("images", []))
    return planned


def checked_run_dir(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a folder that is or can be made: not a file, not under a file (else :class:`RunFolderError`
    naming it)."""
    return checked_folder(run_dir, "run_dir", "run_dir=runs/NAME")


def checked_folder(folder: str | os.PathLike, field: str, example: str) -> Path:
    """``folder`` as a folder that is or can be made: not a file, not under a file (else :class:`RunFolderError`
    naming ``field`` and, as the fix, ``example``)."""
    path = Path(str(folder))
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"lies under {p}, which is a file"
                raise RunFolderError(f"{field}: {path} {what}; give a folder ({example})")
            break
    return path


def existing_run_dir(run_dir: str | os.PathLike, field: str = "run_dir") -> Path:
    """``run_dir`` as a run folder that exists (a folder with ``records/``), else :class:`RunFolderError` naming
    ``field`` and the fix: for the stages that read one (evaluate, report, study), which must not make it."""
    path = Path(str(run_dir))
    if not path.exists():
        raise RunFolderError(f"{field}: {path} does not exist; give a run folder written by generate or import_images "
                             f"({field}=runs/NAME)")
    if not path.is_dir():
        raise RunFolderError(f"{field}: {path} is a file; give a run folder written by generate or import_images")
    if not (path / RECORDS).is_dir():
        raise RunFolderError(f"{field}: {path} has no {RECORDS}/ folder, so it is not a run folder; run generate (or "
                             "import_images) into it first, or give the run folder they wrote")
    return path


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/k"``: this process does the i-th of k interleaved parts of the work (0 <= i < k)."""
    try:
        i, k = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise RunFolderError(f"shard must look like i/k (e.g. 0/4), got {spec!r}") from None
    if not (k >= 1 and 0 <= i < k):
        raise RunFolderError(f"shard {spec!r}: need 0 <= i < k")
    return i, k


def read_records(run_dir: str | os.PathLike, validate: bool = True) -> list[dict]:
    """Every record of the run folder, the newest per image, in a stable order (method, combination, seed).

    A file's last line that is not JSON is a write cut by a crash (a torn line): it is reported (a warning
    naming the file) and skipped, the file left as it is, so the image it described counts as not made yet
    (the next :func:`append_record` of the file's writer cuts it off). A line that is not JSON anywhere else
    stops, naming file:line and the fix."""
    import logging

    folder = Path(run_dir) / RECORDS
    newest: dict[str, dict] = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        lines = path.read_text().splitlines()
        last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if n != last:
                    raise RunFolderError(
                        f"{where}: not a JSON object ({err.msg}); if a crash cut this record and a later one was "
                        f"appended to it, delete line {n} (its image is then made again by generate) and run again"
                    ) from None
                logging.getLogger(__name__).warning(
                    "%s: line %d is torn, a record cut by a crash (%s); ignoring it: the image it described counts "
                    "as not made yet", path, n, err.msg)
                continue
            if validate:
                validate_record(record, where)
            key = record.get("image")
            if key not in newest or record.get("created", 0) >= newest[key].get("created", 0):
                newest[key] = record
    return sorted(newest.values(), key=lambda r: (r["method"], r["combination"], r["seed"]))


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Appends one validated line; one write call, flushed to disk. A line torn by a crash at the end of the
    file (no newline after it) is cut off first, so the new record is never glued onto it; only the file's
    writer (its shard's lock held) appends, so the fragment is its own."""
    append_records(path, [record])


def append_records(path: str | os.PathLike, records: list[dict]) -> None:
    """:func:`append_record` for several records at once: all validated first, then one write call (an import
    lands its records together)."""
    import logging

    for record in records:
        validate_record(record, str(path))
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
    with open(path, "r+b" if path.exists() else "w+b") as f:
        data_end = f.seek(0, os.SEEK_END)
        if data_end:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                content = f.read()
                keep = content.rfind(b"\n") + 1
                logging.getLogger(__name__).warning("%s: cut off a torn last line of %d bytes (a crash mid-write)",
                                                    path, len(content) - keep)
                f.truncate(keep)
        f.seek(0, os.SEEK_END)
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


TMP_SUFFIX = ".tmp"


def stale_temporary_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files :func:`atomic_write` leaves beside ``path`` when its process is killed mid-write
    (``.<name>.<random>.tmp<suffix>``). Only the writer that owns ``path`` (its lock held) may delete them."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*{TMP_SUFFIX}{path.suffix}")) if path.parent.is_dir() else []


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Calls ``write(tmp_path)`` then renames onto ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@lru_cache(maxsize=1)
def _umask() -> int:
    """The process's umask, read once (reading it means setting it; once, before any writer threads)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(image, path: str | os.PathLike) -> Path:
    """A PNG with no metadata (no paths, no timestamps): the same pixels give the same bytes."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=None))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"))


def write_folder_once(root: str | os.PathLike, write, note: str) -> Path:
    """Writes a folder with ``write(tmp_folder)`` into a temporary sibling, then renames it onto ``root``
    with a ``.complete`` marker: a crash never leaves half of it, and a complete one is left alone."""
    import shutil

    root = Path(root)
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        write(tmp)
        (tmp / ".complete").write_text(note + "\n")
        if root.exists():  # an incomplete earlier attempt
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def config_identity(cfg, drop: tuple[str, ...] = (), locations: tuple[str, ...] = ()) -> dict:
    """A config as plain data, for hashing what decides a result: ``drop`` keys (devices, caches) removed,
    and a tiny config's ``tiny_root`` replaced by a placeholder before resolving, since tiny models are fully
    determined by the code that writes them, wherever they live; so are the ``locations`` keys (folders that
    files are read from, e.g. ``weights_dir``) and ``${paths.*}`` (conf/paths: where caches and weights live,
    :func:`path_placeholders`): moving a cache or a weights folder changes no hash."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=False)
    if raw.get("tiny"):
        raw["tiny_root"] = "<tiny_root>"
    for key in locations:
        if key in raw:
            raw[key] = f"<{key}>"
    scope = {"_node_": raw}  # resolved under a root whose only other key is the placeholder `paths`
    paths = path_placeholders(cfg)
    if paths:
        scope["paths"] = paths
    plain = OmegaConf.to_container(OmegaConf.create(scope), resolve=True)["_node_"]
    for key in drop:
        plain.pop(key, None)
    return plain


def path_placeholders(cfg) -> dict:
    """``{"cache_dir": "<paths.cache_dir>", ...}``: one placeholder per key of the ``paths`` group of the config
    ``cfg`` belongs to (none when its root has no ``paths``)."""
    root = cfg._get_root()
    paths = root.get("paths") if "paths" in root else None
    return {key: f"<paths.{key}>" for key in paths} if paths is not None else {}


WANDB_TAG_MAX = 64  # W&B refuses longer tags
_WANDB_DATA_DIRS_SET_HERE: list[str] = []


def stage_wandb_files_in(folder: Path) -> None:
    """W&B copies the files of every logged table (the report's images too) into ``$WANDB_DATA_DIR`` until they are
    uploaded (offline: until ``wandb sync``), by default ~/.local/share/wandb, where they pile up unseen: here the
    run folder's ``wandb/`` instead, unless the user set WANDB_DATA_DIR (only its staging reads it)."""
    current = os.environ.get("WANDB_DATA_DIR")
    if current is None or current in _WANDB_DATA_DIRS_SET_HERE:
        os.environ["WANDB_DATA_DIR"] = str(folder)
        _WANDB_DATA_DIRS_SET_HERE.append(str(folder))


def wandb_run(wandb_cfg, run_dir: str | os.PathLike, stage: str, config: dict | None = None, *,
              methods=(), benchmarks=(), models=()):
    """A W&B run for one stage of a run folder (``None`` when ``wandb_cfg.enabled`` is false), grouped by
    the run folder, written under ``<run_dir>/wandb``. Offline unless the config says ``mode: online``.

    Named ``<stage>-<run folder>[-<method>]`` (the method when the run is about one) and tagged
    ``[stage, benchmark(s), model(s), method(s)]``, so runs can be found and compared across run folders.
    ``wandb_cfg.silent`` (default true): no W&B banners or "Find logs at" lines on the terminal."""
    if not wandb_cfg or not wandb_cfg.get("enabled"):
        return None
    import wandb

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = run_dir.resolve().name
    stage_wandb_files_in(run_dir.resolve() / "wandb")
    methods = [str(m) for m in methods]
    name = f"{stage}-{folder}" + (f"-{methods[0]}" if len(methods) == 1 else "")
    tags = [str(t)[:WANDB_TAG_MAX] for t in (stage, *benchmarks, *models, *methods) if t is not None and str(t)]
    # silent=false passes no setting at all, so WANDB_SILENT and the user's wandb settings still apply
    settings = wandb.Settings(silent=True) if wandb_cfg.get("silent", True) else None
    return wandb.init(
        project=wandb_cfg.get("project", "anyms-bench"), mode=wandb_cfg.get("mode", "offline"), dir=str(run_dir),
        group=wandb_cfg.get("group") or folder, job_type=stage, name=name, tags=list(dict.fromkeys(tags)),
        config=config or {}, reinit="finish_previous", settings=settings,
    )


def flatten(obj: Any, prefix: str = "") -> dict:
    """Nested dicts as one level, keys joined by dots (``{"model": {"dtype": x}}`` -> ``{"model.dtype": x}``):
    how the report names a record's settings."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), first 16 hex digits."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


@lru_cache(maxsize=1)
def git_hash() -> str:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: Any = "cpu") -> dict:
    """What made an output: package versions, git hash, the hardware that ran it on ``device``, the time."""
    return {"versions": package_versions(), "git_hash": git_hash(), "hardware": hardware(device), "created": time.time()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device: Any = "cpu") -> dict:
    """What executes work on ``device`` ("cpu", "cuda", "cuda:1", a ``torch.device``).

    The bytes of an image depend on it: on the CPU, on the kernels torch dispatches to (the ISA, a oneDNN cap
    set by ``ONEDNN_MAX_CPU_ISA``, the thread count); on a GPU, on its architecture and the CUDA and cuDNN
    versions. Recorded beside the config, never hashed with it: resuming on another node must not regenerate a
    finished run. ``label`` names the kind of hardware; the report compares labels.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        out = {"kind": "cuda", "name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
               "cuda": torch.version.cuda, "cudnn": cudnn}
        out["label"] = f"{out['name']} (sm_{major}{minor}, CUDA {out['cuda']}, cuDNN {cudnn})"
        return out
    if device.type == "cpu":
        out = {"kind": "cpu", "name": _cpu_name(), "machine": platform.machine(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
        isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
        if isa_cap:
            out["onednn_max_cpu_isa"] = isa_cap
        out["label"] = f"{out['name']} ({out['cpu_capability']}" + (f", oneDNN <= {isa_cap}" if isa_cap else "") + ")"
        return out
    return {"kind": device.type, "name": device.type, "machine": platform.machine(),
            "label": f"{device.type} ({platform.machine()})"}


def hardware_label(record: dict) -> str:
    """The kind of hardware a record or provenance names; records from before it was recorded say so."""
    hw = record.get("hardware")
    if not isinstance(hw, dict):
        return "not recorded"
    return str(hw.get("label") or hw.get("name") or hw.get("kind") or "not recorded")

