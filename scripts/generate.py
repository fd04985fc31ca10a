"""Generate a benchmark's images into a run folder. Hydra app: see conf/generate.yaml.

    python scripts/generate.py model=tiny benchmark=smoke
    python scripts/generate.py -m method=anyms,wo_crop_merge,wo_local model=tiny benchmark=smoke

Exit codes: 2 for bad input (refused before anything loads or is written, Hydra's log folder included: one line
naming the field and the fix), 1 for a failure at run time. The generation modules are imported inside the
functions: a command refused for its overrides does not wait for torch and diffusers.
"""

import logging

import hydra
from omegaconf import DictConfig

from runfolder.entry import check_command, fail, prechecked, refuse

log = logging.getLogger("scripts.generate")
HINTS = {"run_dir": "run_dir=runs/NAME"}


def bad_input_errors() -> tuple:
    """What the check refuses (ModelLoadError: a method without weights for the base model)."""
    from anyms.benchmark import BenchmarkConfigError
    from anyms.methods.base import GenerationConfigError, ModelLoadError
    from runfolder import RunFolderError
    from runfolder.references import ReferenceImageError

    return BenchmarkConfigError, GenerationConfigError, ReferenceImageError, ModelLoadError, RunFolderError


def check(cfg: DictConfig):
    import runfolder

    runfolder.checked_run_dir(cfg.run_dir)  # the checks that need no torch first: a quick answer
    runfolder.parse_shard(cfg.shard)
    from anyms.generation.generate import check_generation

    return check_generation(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    from anyms.generation.generate import run_generation
    from runfolder.console import quiet_libraries, stage_console
    from runfolder.lock import RunFolderLockedError

    quiet_libraries()
    plan = prechecked(cfg)
    try:
        with stage_console():
            summary = run_generation(cfg, plan)
    except bad_input_errors() as err:
        if plan is None:  # checked here, not before Hydra started (a job the check did not compose)
            refuse("generate", err)
        fail("generate", err)  # after the check passed: a model that does not load, a record that cannot be read
    except RunFolderLockedError as err:
        fail("generate", err)
    log.info("%s: %d image(s) generated, %d already there, of %d in this shard (%.1f s)\n  images:  %s\n  records: %s",
             summary.method, len(summary.generated), summary.skipped, summary.planned, summary.seconds,
             summary.run_dir / "images" / summary.method, summary.run_dir / "records")


if __name__ == "__main__":
    check_command("generate", "generate", check, bad_input_errors, hints=HINTS)
    main()
