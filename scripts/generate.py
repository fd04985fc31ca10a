"""Generate a benchmark's images into a run folder. Hydra app: see conf/generate.yaml.

    python scripts/generate.py model=tiny benchmark=smoke
    python scripts/generate.py -m method=anyms,wo_crop_merge,wo_local model=tiny benchmark=smoke
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

import runfolder

from anyms.benchmark import BenchmarkConfigError
from anyms.generation.generate import GenerationConfigError, run_generation
from anyms.methods.base import ModelLoadError
from runfolder import RunFolderError
from runfolder.console import quiet_libraries, stage_console
from runfolder.lock import RunFolderLockedError
from runfolder.references import ReferenceImageError

log = logging.getLogger("scripts.generate")


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    try:
        with stage_console():
            summary = run_generation(cfg)
    except (BenchmarkConfigError, GenerationConfigError, ReferenceImageError, ModelLoadError, RunFolderError,
            RunFolderLockedError) as err:
        raise SystemExit(f"generate: {err}") from None  # a config or data problem: no stack trace
    log.info("%s: %d image(s) generated, %d already there, of %d in this shard (%.1f s)\n  images:  %s\n  records: %s",
             summary.method, len(summary.generated), summary.skipped, summary.planned, summary.seconds,
             summary.run_dir / "images" / summary.method, summary.run_dir / "records")


if __name__ == "__main__":
    runfolder.check_run_dir_argument(sys.argv, "generate")
    main()
