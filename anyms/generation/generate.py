"""The generation stage: a Hydra config -> images and records in a run folder (the ``runfolder`` format).

Checks the benchmark (boxes, folders, counts) before any model loads, skips images whose record carries
the same config hash, writes PNGs atomically and one record line per image, splits the work by
``shard=i/k`` and draws a contact sheet per combination.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

import runfolder
from anyms.core.attention_maps import AttentionMapSettings
from anyms.benchmark import Combination, load_combinations, parse_seeds
from anyms.core.layout import LayoutWarning
from anyms.methods.base import GenerationConfigError, GenerationSettings, ModelLoadError, check_local_paths
from anyms.methods.loading import check_hub_cache, resolve_device
from runfolder import file_digest
from runfolder.attention_maps import attention_maps_path, save_attention_maps
from runfolder.lock import writer_lock
from runfolder.pictures import contact_sheet
from runfolder.references import check_references, load_reference

log = logging.getLogger(__name__)
SHEET_NAME = "contact_sheet.png"
SHEET_MAX_IMAGES = 8


@dataclass
class GenerationSummary:
    run_dir: Path
    method: str
    planned: int
    generated: list[str] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0


def runtime_identity(model_cfg: DictConfig) -> dict:
    """What of the machine decides the bytes, resolved: the device type, the dtype (``auto`` is fp16 on CUDA
    and fp32 elsewhere, so it is hashed as what it becomes) and, on the CPU, the number of torch threads
    (CPU kernels split reductions by thread: 1 vs 2 threads change pixels)."""
    import torch

    from anyms.methods.loading import resolve_device, resolve_dtype

    try:
        device = resolve_device(str(model_cfg.get("device") or "auto"))
    except RuntimeError as err:
        raise GenerationConfigError(f"model.device: {model_cfg.get('device')!r} is not a device ({err}); use auto, cpu or cuda") from None
    try:
        dtype = resolve_dtype(str(model_cfg.get("dtype") or "auto"), device)
    except ValueError as err:
        raise GenerationConfigError(str(err)) from None
    out = {"device_type": device.type, "dtype": str(dtype).replace("torch.", "")}
    if device.type == "cpu":
        threads = model_cfg.get("torch_threads")
        out["torch_threads"] = int(threads) if threads else int(torch.get_num_threads())
    return out


def method_class(method_cfg: DictConfig):
    """The class ``method._target_`` names (:mod:`anyms.methods.base` describes what it answers)."""
    from hydra.utils import get_class

    target = method_cfg.get("_target_") if method_cfg is not None else None
    if not target:
        raise GenerationConfigError(f"method {method_cfg.get('name') if method_cfg is not None else None!r}: no _target_; a "
                                    "method config names its class (conf/method/<name>.yaml, see anyms/methods/base.py)")
    try:
        return get_class(str(target))
    except Exception as err:  # noqa: BLE001 - Hydra wraps import errors in several types
        raise GenerationConfigError(f"method._target_: cannot import {target}: {err}") from None


def _hashable(node: DictConfig, model_cfg: DictConfig | None) -> dict:
    """A config node as plain data for hashing, resolved against the run's config with a tiny model's
    ``tiny_root`` and the ``paths`` group replaced by placeholders first (tiny models are fully determined by the
    code that writes them, wherever they live; a method's weight table may point into ``${model.tiny_root}``)."""
    root = node._get_root()
    raw = OmegaConf.to_container(root, resolve=False) if root is not node else {}
    raw.pop("hydra", None)
    if model_cfg is not None:
        raw["model"] = OmegaConf.to_container(model_cfg, resolve=False)
    raw["_node_"] = OmegaConf.to_container(node, resolve=False)
    if (raw.get("model") or {}).get("tiny"):
        raw["model"]["tiny_root"] = "<tiny_root>"
    if "paths" in raw:  # where caches and weights live decides no image
        raw["paths"] = runfolder.path_placeholders(node)
    return OmegaConf.to_container(OmegaConf.create(raw)["_node_"], resolve=True)


def base_model_identity(model_cfg: DictConfig) -> dict:
    """What of the base model config determines the images: ids and settings, not where a cache lives; device
    type, dtype and threads as they resolve on this machine (:func:`runtime_identity`)."""
    identity = runfolder.config_identity(model_cfg, drop=("device", "_target_", "torch_threads"))
    identity.update(runtime_identity(model_cfg))
    return identity


def identities(model_cfg: DictConfig, method_cfg: DictConfig | None) -> tuple[dict, dict | None]:
    """``(model_ids, method_ids)``: what decides the images, as the method says (its ``identity``: it drops what
    it does not load, adds its own weights, or names its own base model)."""
    model_ids = base_model_identity(model_cfg)
    if method_cfg is None:
        return model_ids, None
    return method_class(method_cfg).identity(_hashable(method_cfg, model_cfg), model_ids)


def model_identity(model_cfg: DictConfig, method_cfg: DictConfig | None = None) -> dict:
    """The model part of :func:`identities`."""
    return identities(model_cfg, method_cfg)[0]


# generation settings that are hashed (and written to records) only when they differ from their default, so that
# adding them changed no existing config hash
UNHASHED_DEFAULTS = {"truncate_prompt": False}


def generation_identity(generation_cfg: DictConfig) -> dict:
    """The generation settings as hashed and recorded: those of :data:`UNHASHED_DEFAULTS` left out at their default."""
    plain = OmegaConf.to_container(generation_cfg, resolve=True)
    for key, default in UNHASHED_DEFAULTS.items():
        if key in plain and plain[key] == default:
            del plain[key]
    return plain


def image_config_hash(cfg: DictConfig, combo: Combination, seed: int, model_ids: dict | None = None,
                      method_ids: dict | None = None) -> str:
    """Hash of everything that decides one image: model (resolved dtype, device type, threads) and method as
    the method says (:func:`identities`), generation settings, the combination's definition, the adapter's
    reference image content, the seed. Not run_dir, hydra.* or shard."""
    if model_ids is None or method_ids is None:
        model_ids, method_ids = identities(cfg.model, cfg.method)
    return runfolder.config_hash({
        "model": model_ids,
        "method": method_ids,
        "generation": generation_identity(cfg.generation),
        "combination": combo.definition,
        "references": [file_digest(s.image) for s in combo.layout],
        "seed": int(seed),
    })


def _number(cfg: DictConfig, key: str, kind, where: str, optional: bool = False):
    value = cfg.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or value is None:
        raise GenerationConfigError(f"{where}.{key}: expected {kind.__name__ if kind is not float else 'a number'}, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise GenerationConfigError(f"{where}.{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise GenerationConfigError(f"{where}.{key}: expected an integer, got {value!r}")
    return number


def generation_settings(cfg: DictConfig) -> GenerationSettings:
    """The generation and method settings, each checked with a message naming its field."""
    g, m = cfg.generation, cfg.method
    steps = _number(g, "steps", int, "generation")
    if steps < 1:
        raise GenerationConfigError(f"generation.steps: must be >= 1, got {steps}")
    guidance = _number(g, "guidance_scale", float, "generation")
    sides = {}
    for side in ("height", "width"):
        v = _number(g, side, int, "generation", optional=True)
        if v is not None and (v < 64 or v % 8):
            raise GenerationConfigError(f"generation.{side}: must be a multiple of 8 (the VAE's factor) and at least "
                                        f"64, got {v}; or null for the model's size")
        sides[side] = v
    negative = g.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise GenerationConfigError(f"generation.negative_prompt: expected a string, got {negative!r}")
    truncate = g.get("truncate_prompt", False)
    if not isinstance(truncate, bool):
        raise GenerationConfigError(f"generation.truncate_prompt: expected true or false, got {truncate!r}")
    scale = _number(m, "adapter_scale", float, "method", optional=True)  # methods without an adapter: none
    scale = 1.0 if scale is None else scale
    full = _number(m, "full_frame_adapter_scale", float, "method", optional=True)
    return GenerationSettings(steps=steps, guidance_scale=guidance, negative_prompt=str(negative or ""),
                              adapter_scale=scale, full_frame_adapter_scale=full, **sides)


def check_model_paths(model_cfg: DictConfig, method_cfg: DictConfig | None) -> None:
    """Local paths must exist (hub ids are left to the loader, which names how to get them): the base model's
    here, as a pipeline folder, the method's weights by the method's own ``check`` (which also refuses a base
    model it has no weights for). Tiny models are written by the loader itself under ``model.tiny_root``, so
    their folders may not exist yet; a tiny ``model.pretrained`` elsewhere must. Offline (``HF_HUB_OFFLINE``),
    hub ids must be in the local cache."""
    pretrained = model_cfg.get("pretrained")
    if model_cfg.get("tiny"):
        root = model_cfg.get("tiny_root")
        if root is not None and Path(str(root)).exists() and not Path(str(root)).is_dir():
            raise GenerationConfigError(f"model.tiny_root: {root} is a file; give a folder for the tiny models "
                                        "(paths.cache_dir=FOLDER)")
        inside = root is not None and Path(str(root)).resolve() in Path(str(pretrained)).resolve().parents
        if pretrained is not None and not inside and not Path(str(pretrained)).exists():
            raise GenerationConfigError(f"model.pretrained: {pretrained} does not exist, and the tiny models are written "
                                        f"under model.tiny_root ({root}); point it there, e.g. model.pretrained=${{model.tiny_root}}/sdxl")
    else:
        check_local_paths({"model.pretrained": pretrained})
        check_pipeline_folder("model.pretrained", pretrained)
        check_hub_cache("model.pretrained", pretrained, "model_index.json")
    if method_cfg is not None:
        method_class(method_cfg).check(OmegaConf.to_container(method_cfg, resolve=True),
                                       OmegaConf.to_container(model_cfg, resolve=True))


def check_pipeline_folder(field: str, value) -> None:
    """A local ``model.pretrained`` is a diffusers pipeline folder: a folder with model_index.json."""
    if value is None:
        return
    path = Path(str(value)).expanduser()
    if path.exists() and not path.is_dir():
        raise GenerationConfigError(f"{field}: {value} is a file; point it at the pipeline's folder (the one that "
                                    "holds model_index.json)")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise GenerationConfigError(f"{field}: {value} has no model_index.json, so it is not a diffusers pipeline "
                                    "folder; point it at the folder save_pretrained wrote (or a hub id)")


def attention_map_settings(cfg: DictConfig) -> AttentionMapSettings | None:
    """What ``record_attention`` / ``attention_maps`` ask to record (``None``: recording off). Recording
    does not change the images, so it stays out of the config hash."""
    if not cfg.get("record_attention"):
        return None
    maps = cfg.get("attention_maps") or {}
    levels, steps = maps.get("levels", None), maps.get("steps", None)
    record = AttentionMapSettings(
        levels=tuple(levels) if levels is not None else AttentionMapSettings.levels,
        steps=tuple(steps) if steps is not None else None,
    )
    record.check_steps(int(cfg.generation.steps))
    return record


def load_model(model_cfg: DictConfig, method_cfg: DictConfig):
    """The method, built by ``hydra.utils.instantiate`` of its config with the base model's (resolved) config as
    ``model``; our own load errors unwrapped from Hydra's."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    method_class(method_cfg)  # a clear message for a missing or wrong _target_
    try:
        return instantiate(method_cfg, model=OmegaConf.to_container(model_cfg, resolve=True), _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, (ModelLoadError, GenerationConfigError)):
            raise err.__cause__ from None
        raise


@dataclass
class GenerationPlan:
    """A generation command as checked by :func:`check_generation`: everything it needs before a model loads."""
    run_dir: Path
    method: str
    shard: tuple[int, int]
    work: list
    seeds: list[int]
    settings: GenerationSettings
    record: AttentionMapSettings | None
    ids: tuple[dict, dict | None]
    warnings: list[str] = field(default_factory=list)  # logged when the command runs (the words a prompt loses)


def check_generation(cfg: DictConfig) -> GenerationPlan:
    """Everything that can be wrong with the config or the data, before a model loads or a file is written
    (issue 32: ``scripts/generate.py`` runs it before Hydra makes its log folder): the benchmark, seeds, shard,
    settings, the run folder's kind, the model's and method's paths, every reference image of the shard and every
    prompt against the text encoders' token limits. Raises one of the stage's config errors, naming the field."""
    from anyms.generation.prompts import check_prompts, text_encoder_tokenizers

    combos = load_combinations(cfg.benchmark, cfg.data_root)
    seeds = parse_seeds(cfg.benchmark.seeds)
    shard = runfolder.parse_shard(cfg.shard)
    settings = generation_settings(cfg)
    record = attention_map_settings(cfg)
    method = str(cfg.method.name)
    try:
        run_dir = runfolder.checked_run_dir(cfg.run_dir)
    except runfolder.RunFolderError as err:
        raise GenerationConfigError(str(err)) from None
    check_model_paths(cfg.model, cfg.method)  # and the method's weights for this base model
    model_ids, method_ids = identities(cfg.model, cfg.method)
    work = [(c, s) for c in combos for s in seeds]
    work = work[shard[0] :: shard[1]]
    shard_combos = list({c.id: c for c, _ in work}.values())
    # every reference of the shard's combinations (the adapter's and the evaluator's), decoded and checked once
    check_references(p for c in shard_combos for refs in c.references for p in refs)
    model, method_plain = (OmegaConf.to_container(x, resolve=True) for x in (cfg.model, cfg.method))
    encoders = text_encoder_tokenizers(method_class(cfg.method), method_plain, model)
    warned = check_prompts(shard_combos, encoders, str(model.get("name")), str(cfg.benchmark.get("name", "?")),
                           truncate=bool(cfg.generation.get("truncate_prompt", False)))
    return GenerationPlan(run_dir, method, shard, work, seeds, settings, record, (model_ids, method_ids), warned)


def run_generation(cfg: DictConfig, plan: GenerationPlan | None = None) -> GenerationSummary:
    # everything that can be wrong with the config or the data fails here, before a model loads or a file is
    # written (plan: the check's result when the entry point has already run it)
    plan = plan if plan is not None else check_generation(cfg)
    for line in plan.warnings:
        log.warning(line)
    # one writer per (run folder, method, shard): a second one stops here, naming the first
    with writer_lock(plan.run_dir, "generate", f"{plan.method}.{plan.shard[0]}-of-{plan.shard[1]}"):
        return _generate(cfg, plan.run_dir, plan.method, plan.shard, plan.work, plan.seeds, plan.settings, plan.record,
                         plan.ids)


def _generate(cfg, run_dir: Path, method: str, shard, work, seeds, settings, record, model_ids) -> GenerationSummary:
    summary = GenerationSummary(run_dir, method, planned=len(work))
    removed = remove_stale_temporary_files(run_dir, method, shard, work)
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted run of %s (shard %d/%d)",
                    removed, method, *shard)
    done = {r["image"]: r for r in runfolder.read_records(run_dir) if r["method"] == method}

    def finished(rel: str, h: str) -> bool:
        r = done.get(rel)
        if cfg.overwrite or r is None or r["config_hash"] != h or not (run_dir / rel).exists():
            return False
        # recording asks for the maps too: an image made without them is made again (the same bytes)
        return record is None or ("attention_maps" in r and (run_dir / r["attention_maps"]).exists())

    todo = []
    for combo, seed in work:
        rel = runfolder.image_path(method, combo.id, seed)
        h = image_config_hash(cfg, combo, seed, *model_ids)
        if finished(rel, h):
            summary.skipped += 1
        else:
            todo.append((combo, seed, rel, h))
    # the model loads before the plan is written: a model that cannot load leaves the plan as it was
    pipeline = load_model(cfg.model, cfg.method) if todo else None
    runfolder.write_plan(run_dir, method, shard, [runfolder.image_path(method, c.id, s) for c, s in work])
    if not todo:
        log.info("nothing to generate: %d image(s) already in %s", summary.skipped, run_dir)
    else:
        _generate_images(cfg, pipeline, run_dir, method, shard, todo, settings, record, model_ids, summary)
    sheets = []
    if cfg.contact_sheets:  # also the sheets an interrupted run never drew
        with writer_lock(run_dir, "sheets", method, wait=True):  # shards of a method share the sheets
            sheets = [write_contact_sheet(run_dir, method, c, seeds)
                      for c in {c.id: c for c, _ in work}.values() if contact_sheet_stale(run_dir, method, c, seeds)]
    if summary.generated:
        log_to_wandb(cfg, run_dir, method, summary, [s for s in sheets if s is not None])
    return summary


def _generate_images(cfg, pipeline, run_dir: Path, method: str, shard, todo, settings, record, ids, summary) -> None:
    model_ids, method_ids = ids
    records = runfolder.records_file(run_dir, method, shard)
    prov = runfolder.provenance(pipeline.device)  # the hardware that runs this model, never hashed
    start = time.perf_counter()
    bar = tqdm(todo, desc=f"generate {method}", unit="img", disable=not cfg.progress)
    with LayoutWarningLog() as layout_warnings:
        for n, (combo, seed, rel, h) in enumerate(bar):
            bar.set_postfix_str(f"{combo.id} seed {seed}")
            layout_warnings.combination = combo.id
            result = pipeline(combo.prompt, combo.layout, seed, settings, record=record)
            runfolder.save_png(result.image, run_dir / rel)
            maps = {"image_sha256": file_digest(run_dir / rel)}
            if result.attention_maps is not None:
                maps["attention_maps"] = attention_maps_path(rel)
                save_attention_maps(result.attention_maps, run_dir / maps["attention_maps"])
            grids = pipeline.cross_attention_grids(result.image.height, result.image.width)
            runfolder.append_record(records, {**maps,
                "image": rel, "combination": combo.id, "method": method, "seed": int(seed), "prompt": combo.prompt,
                "benchmark": str(cfg.benchmark.name), "n_subjects": len(combo.layout), "width": result.image.width, "height": result.image.height,
                "subjects": [
                    {"name": s.name, "phrase": s.phrase, "role": s.role, "box": list(s.box), "scale": s.scale,
                     "references": [str(p) for p in refs]}
                    for s, refs in zip(combo.layout, combo.references)
                ],
                "model": model_ids, "config_hash": h, "versions": prov["versions"], "git_hash": prov["git_hash"],
                # what decides the images besides the model: the report splits or refuses rows that differ here
                "settings": {"method": method_ids,
                             "generation": generation_identity(cfg.generation)},
                "device": str(pipeline.device), "hardware": prov["hardware"], "dtype": str(pipeline.dtype).replace("torch.", ""),
                "seconds": result.seconds, "peak_memory_bytes": result.peak_memory_bytes, "first_in_process": n == 0,
                "overlap_shares": {f"{h}x{w}": combo.layout.overlap_share(h, w) for h, w in {grids[0], grids[-1]}},
                "created": time.time(),
            })
            summary.generated.append(rel)
    summary.seconds = time.perf_counter() - start


class LayoutWarningLog:
    """Inside: the method core's :class:`~anyms.core.layout.LayoutWarning` (a subject left without a token at a
    grid) logged as a warning naming the combination, once per (combination, grid) in this run (the core warns
    once per layout and grid, but a multirun's next job would be silenced by Python's once-per-place rule), and
    not printed as a Python warning; other warnings pass through as they would. Set ``combination`` before each
    image."""

    def __init__(self):
        self.combination: str | None = None
        self._seen: set[tuple[str | None, str]] = set()
        self._catch = warnings.catch_warnings()

    def __enter__(self) -> "LayoutWarningLog":
        self._catch.__enter__()  # restores the filters and warnings.showwarning on exit
        warnings.simplefilter("always", LayoutWarning)  # each one reaches show(); _seen is the once-rule
        shown_elsewhere = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, LayoutWarning):
                return shown_elsewhere(message, category, filename, lineno, file, line)
            key = (self.combination, str(message))
            if key not in self._seen:
                self._seen.add(key)
                log.warning("%s: %s", self.combination, message)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc) -> None:
        self._catch.__exit__(*exc)


def remove_stale_temporary_files(run_dir: Path, method: str, shard, work) -> int:
    """Deletes what a killed run of this (method, shard) left half-written: temporary PNGs, attention maps and
    plan files. Only this shard's paths: other shards of the method may be writing theirs right now."""
    targets = [run_dir / runfolder.PLANS / f"{method}.{shard[0]}-of-{shard[1]}.json"]
    for combo, seed in work:
        rel = runfolder.image_path(method, combo.id, seed)
        targets += [run_dir / rel, run_dir / attention_maps_path(rel)]
    stale = [t for target in targets for t in runfolder.stale_temporary_files(target)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def log_to_wandb(cfg: DictConfig, run_dir: Path, method: str, summary: GenerationSummary, sheets: list[Path]) -> None:
    """The generation stage's W&B run (``generate-<run folder>-<method>``, tagged with the benchmark, model and
    method): the resolved config, versions, this job's records, contact sheets."""
    if not cfg.get("wandb") or not cfg.wandb.enabled:
        return
    import wandb

    config = OmegaConf.to_container(cfg, resolve=True)
    device = resolve_device(str(cfg.model.get("device") or "auto"))  # as the model resolves it: the hardware it ran on
    run = runfolder.wandb_run(config["wandb"], run_dir, "generate", {**config, **runfolder.provenance(device)},
                              methods=[method], benchmarks=[cfg.benchmark.name], models=[cfg.model.name])
    try:
        done = set(summary.generated)
        rows = [{k: r[k] for k in ("image", "combination", "method", "seed", "prompt", "n_subjects", "config_hash",
                                   "device", "dtype", "seconds", "peak_memory_bytes")}
                for r in runfolder.read_records(run_dir) if r["image"] in done]
        if rows:
            import pandas as pd

            run.log({"records": wandb.Table(dataframe=pd.DataFrame(rows))})
        n = int(cfg.wandb.get("sample_images", 8))
        if sheets:  # a table, not an image list: sheets differ in size, which W&B warns about on the terminal
            run.log({"contact_sheets": wandb.Table(columns=["method", "combination", "sheet"], data=[
                [method, p.parent.name, wandb.Image(str(p), caption=f"{method} / {p.parent.name}")] for p in sheets[:n]])})
        run.summary.update({"generated": len(summary.generated), "skipped": summary.skipped, "seconds": summary.seconds})
    finally:
        run.finish()


def sheet_path(run_dir: Path, method: str, combo: Combination) -> Path:
    return run_dir / runfolder.IMAGES / method / combo.id / SHEET_NAME


def contact_sheet_stale(run_dir: Path, method: str, combo: Combination, seeds) -> bool:
    """A sheet to (re)draw: missing while images exist, or older than one of its images."""
    images = [run_dir / runfolder.image_path(method, combo.id, s) for s in seeds]
    newest = max((p.stat().st_mtime_ns for p in images if p.exists()), default=None)
    if newest is None:
        return False
    sheet = sheet_path(run_dir, method, combo)
    return not sheet.exists() or sheet.stat().st_mtime_ns < newest


def write_contact_sheet(run_dir: Path, method: str, combo: Combination, seeds) -> Path | None:
    """Up to :data:`SHEET_MAX_IMAGES` seeds of a combination side by side, requested boxes drawn."""
    present = [s for s in seeds if (run_dir / runfolder.image_path(method, combo.id, s)).exists()][:SHEET_MAX_IMAGES]
    if not present:
        return None
    for stale in runfolder.stale_temporary_files(sheet_path(run_dir, method, combo)):  # the sheets lock is held
        stale.unlink(missing_ok=True)
    images = [Image.open(run_dir / runfolder.image_path(method, combo.id, s)) for s in present]
    sheet = contact_sheet(
        images, [f"seed {s}" for s in present], [s.box for s in combo.layout],
        [s.phrase for s in combo.layout], [load_reference(s.image) for s in combo.layout],
        title=f"{method} / {combo.id}: {combo.prompt}",
    )
    return runfolder.save_png(sheet, sheet_path(run_dir, method, combo))
