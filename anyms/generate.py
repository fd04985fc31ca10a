"""The generation stage: a Hydra config -> images and records in a run folder (the ``runfolder`` format).

Checks the benchmark (boxes, folders, counts) before any model loads, skips images whose record carries
the same config hash, writes PNGs atomically and one record line per image, splits the work by
``shard=i/k`` and draws a contact sheet per combination.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

import runfolder
from anyms.attention_maps import AttentionMapSettings
from anyms.benchmark import Combination, load_combinations, parse_seeds
from anyms.pipeline import GenerationSettings, ModelLoadError
from runfolder import file_digest
from runfolder.attention_maps import attention_maps_path, save_attention_maps
from runfolder.pictures import contact_sheet

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


def method_pipeline(method_cfg: DictConfig | None) -> str:
    """What the method loads on top of the base model: ``anyms`` (the IP-Adapter) unless the method config
    says ``pipeline: ms_diffusion``."""
    return str(method_cfg.get("pipeline") or "anyms") if method_cfg is not None else "anyms"


def model_identity(model_cfg: DictConfig, method_cfg: DictConfig | None = None) -> dict:
    """What of the model config determines the images: ids and settings, not where a cache lives; of the
    adapters (``ip_adapter``, ``ms_diffusion``) only the one the method uses."""
    unused = "ip_adapter" if method_pipeline(method_cfg) == "ms_diffusion" else "ms_diffusion"
    return runfolder.config_identity(model_cfg, drop=("device", "_target_", "torch_threads", unused))


def image_config_hash(cfg: DictConfig, combo: Combination, seed: int) -> str:
    """Hash of everything that decides one image: model, method, generation settings, the combination's
    definition, the adapter's reference image content, the seed. Not run_dir, hydra.* or shard."""
    return runfolder.config_hash({
        "model": model_identity(cfg.model, cfg.method),
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "combination": combo.definition,
        "references": [file_digest(s.image) for s in combo.layout],
        "seed": int(seed),
    })


def generation_settings(cfg: DictConfig) -> GenerationSettings:
    g = cfg.generation
    return GenerationSettings(
        steps=int(g.steps), guidance_scale=float(g.guidance_scale), negative_prompt=str(g.negative_prompt),
        height=g.height, width=g.width, adapter_scale=float(cfg.method.adapter_scale),
        full_frame_adapter_scale=(None if cfg.method.get("full_frame_adapter_scale") is None
                                  else float(cfg.method.full_frame_adapter_scale)),
    )


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


def load_model(model_cfg: DictConfig, method_cfg: DictConfig | None = None):
    """``hydra.utils.instantiate`` of the model config, with our own load errors unwrapped from Hydra's.
    A method with its own weights (``pipeline: ms_diffusion``) has them loaded instead of the IP-Adapter."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    extra = {"pipeline": method_pipeline(method_cfg)} if method_pipeline(method_cfg) != "anyms" else {}
    try:
        return instantiate(model_cfg, _convert_="all", **extra)
    except InstantiationException as err:
        if isinstance(err.__cause__, ModelLoadError):
            raise err.__cause__ from None
        raise


def run_generation(cfg: DictConfig) -> GenerationSummary:
    # everything that can be wrong with the config fails here, before a model loads
    combos = load_combinations(cfg.benchmark, cfg.data_root)
    seeds = parse_seeds(cfg.benchmark.seeds)
    shard = runfolder.parse_shard(cfg.shard)
    settings = generation_settings(cfg)
    record = attention_map_settings(cfg)
    method = str(cfg.method.name)
    run_dir = Path(cfg.run_dir)

    work = [(c, s) for c in combos for s in seeds]
    work = work[shard[0] :: shard[1]]
    summary = GenerationSummary(run_dir, method, planned=len(work))
    runfolder.write_plan(run_dir, method, shard, [runfolder.image_path(method, c.id, s) for c, s in work])
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
        h = image_config_hash(cfg, combo, seed)
        if finished(rel, h):
            summary.skipped += 1
        else:
            todo.append((combo, seed, rel, h))
    if not todo:
        log.info("nothing to generate: %d image(s) already in %s", summary.skipped, run_dir)
        return summary

    pipeline = load_model(cfg.model, cfg.method)
    records = runfolder.records_file(run_dir, method, shard)
    prov = runfolder.provenance()
    model_ids = model_identity(cfg.model, cfg.method)
    start = time.perf_counter()
    touched: dict[str, Combination] = {}
    bar = tqdm(todo, desc=f"generate {method}", unit="img", disable=not cfg.progress)
    for n, (combo, seed, rel, h) in enumerate(bar):
        bar.set_postfix_str(f"{combo.id} seed {seed}")
        result = pipeline(combo.prompt, combo.layout, seed, settings, attention=str(cfg.method.attention),
                          record=record)
        runfolder.save_png(result.image, run_dir / rel)
        maps = {"image_sha256": file_digest(run_dir / rel)}
        if result.attention_maps is not None:
            maps["attention_maps"] = attention_maps_path(rel)
            save_attention_maps(result.attention_maps, run_dir / maps["attention_maps"])
        grids = pipeline.cross_attention_grids(result.image.height, result.image.width)
        runfolder.append_record(records, {**maps,
            "image": rel, "combination": combo.id, "method": method, "seed": int(seed), "prompt": combo.prompt,
            "n_subjects": len(combo.layout), "width": result.image.width, "height": result.image.height,
            "subjects": [
                {"name": s.name, "phrase": s.phrase, "role": s.role, "box": list(s.box), "scale": s.scale,
                 "references": [str(p) for p in refs]}
                for s, refs in zip(combo.layout, combo.references)
            ],
            "model": model_ids, "config_hash": h, "versions": prov["versions"], "git_hash": prov["git_hash"],
            "device": str(pipeline.device), "dtype": str(pipeline.dtype).replace("torch.", ""),
            "seconds": result.seconds, "peak_memory_bytes": result.peak_memory_bytes, "first_in_process": n == 0,
            "overlap_shares": {f"{h}x{w}": combo.layout.overlap_share(h, w) for h, w in {grids[0], grids[-1]}},
            "created": time.time(),
        })
        summary.generated.append(rel)
        touched[combo.id] = combo
    summary.seconds = time.perf_counter() - start
    sheets = [write_contact_sheet(run_dir, method, c, seeds) for c in touched.values()] if cfg.contact_sheets else []
    log_to_wandb(cfg, run_dir, method, summary, [s for s in sheets if s is not None])
    return summary


def log_to_wandb(cfg: DictConfig, run_dir: Path, method: str, summary: GenerationSummary, sheets: list[Path]) -> None:
    """The generation stage's W&B run: the resolved config, versions, this job's records, contact sheets."""
    if not cfg.get("wandb") or not cfg.wandb.enabled:
        return
    import wandb

    config = OmegaConf.to_container(cfg, resolve=True)
    run = runfolder.wandb_run(config["wandb"], run_dir, "generate", {**config, **runfolder.provenance()})
    try:
        done = set(summary.generated)
        rows = [{k: r[k] for k in ("image", "combination", "method", "seed", "prompt", "n_subjects", "config_hash",
                                   "device", "dtype", "seconds", "peak_memory_bytes")}
                for r in runfolder.read_records(run_dir) if r["image"] in done]
        if rows:
            import pandas as pd

            run.log({"records": wandb.Table(dataframe=pd.DataFrame(rows))})
        n = int(cfg.wandb.get("sample_images", 8))
        if sheets:
            run.log({"contact_sheets": [wandb.Image(str(p), caption=f"{method} / {p.parent.name}") for p in sheets[:n]]})
        run.summary.update({"generated": len(summary.generated), "skipped": summary.skipped, "seconds": summary.seconds})
    finally:
        run.finish()


def write_contact_sheet(run_dir: Path, method: str, combo: Combination, seeds) -> Path | None:
    """Up to :data:`SHEET_MAX_IMAGES` seeds of a combination side by side, requested boxes drawn."""
    present = [s for s in seeds if (run_dir / runfolder.image_path(method, combo.id, s)).exists()][:SHEET_MAX_IMAGES]
    if not present:
        return None
    images = [Image.open(run_dir / runfolder.image_path(method, combo.id, s)) for s in present]
    sheet = contact_sheet(
        images, [f"seed {s}" for s in present], [s.box for s in combo.layout],
        [s.phrase for s in combo.layout], [Image.open(s.image) for s in combo.layout],
        title=f"{method} / {combo.id}: {combo.prompt}",
    )
    return runfolder.save_png(sheet, run_dir / runfolder.IMAGES / method / combo.id / SHEET_NAME)
