"""Import another method's images as a run folder. Hydra app: see conf/import.yaml.

    python scripts/import_images.py source=/data/mudi_outputs method=mudi benchmark=anyms11
    python scripts/evaluate.py run_dir=runs/anyms11-mudi
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

import runfolder

from anyms.benchmark import BenchmarkConfigError
from anyms.generation.importer import import_images
from runfolder.console import quiet_libraries, stage_console

log = logging.getLogger("scripts.import_images")


@hydra.main(version_base="1.3", config_path="../conf", config_name="import")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    try:
        with stage_console():
            summary = import_images(cfg.source, cfg.import_method, cfg.benchmark, cfg.data_root, cfg.run_dir,
                                    cfg.pattern, cfg.strict, overwrite=bool(cfg.overwrite))
    except BenchmarkConfigError as err:
        raise SystemExit(f"import: {err}") from None
    log.info(f"import {summary.method}: {len(summary.imported)} image(s) into {summary.run_dir}"
             + (f"; {len(summary.missing)} missing, e.g. {summary.missing[:3]}" if summary.missing else ""))


def method_argument(argv: list[str]) -> list[str]:
    """``method=NAME`` -> ``import_method=NAME``: Hydra reads ``method=`` as a choice in the config group
    conf/method/ (the generated methods) and fails, so the documented spelling is renamed before Hydra sees it."""
    return [("import_method=" + a.split("=", 1)[1]) if a.startswith(("method=", "+method=")) else a for a in argv]


if __name__ == "__main__":
    runfolder.check_run_dir_argument(sys.argv, "import")
    sys.argv = method_argument(sys.argv)
    main()
