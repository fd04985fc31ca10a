"""Generate a benchmark's images into a run folder. Hydra app: see conf/generate.yaml.

    python scripts/generate.py model=tiny benchmark=smoke
    python scripts/generate.py -m method=anyms,wo_crop_merge,wo_local model=tiny benchmark=smoke
"""

import sys

import hydra
from omegaconf import DictConfig

import runfolder

from anyms.benchmark import BenchmarkConfigError
from anyms.generation.generate import GenerationConfigError, run_generation
from anyms.methods.base import ModelLoadError
from runfolder import RunFolderError
from runfolder.lock import RunFolderLockedError
from runfolder.references import ReferenceImageError


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        summary = run_generation(cfg)
    except (BenchmarkConfigError, GenerationConfigError, ReferenceImageError, ModelLoadError, RunFolderError,
            RunFolderLockedError) as err:
        raise SystemExit(f"generate: {err}") from None  # a config or data problem: no stack trace
    print(
        f"{summary.method}: {len(summary.generated)} image(s) generated, {summary.skipped} already there, "
        f"of {summary.planned} in this shard ({summary.seconds:.1f} s)\n"
        f"  images:  {summary.run_dir / 'images' / summary.method}\n"
        f"  records: {summary.run_dir / 'records'}"
    )


if __name__ == "__main__":
    runfolder.check_run_dir_argument(sys.argv, "generate")
    main()
