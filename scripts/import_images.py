"""Import another method's images as a run folder. Hydra app: see conf/import.yaml.

    python scripts/import_images.py source=/data/mudi_outputs method=mudi benchmark=anyms11
    python scripts/evaluate.py run_dir=runs/anyms11-mudi

Exit codes: 2 for bad input (refused before anything is written, Hydra's log folder included: one line naming the
field and the fix; every source image is read first, so an import lands all its images or none), 1 for a failure
at run time.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from runfolder.entry import check_command, fail, prechecked, refuse

log = logging.getLogger("scripts.import_images")
HINTS = {"source": "source=FOLDER (the images to import, laid out as pattern says)",
         "import_method": "method=NAME (the name its rows get in the tables)"}


def bad_input_errors() -> tuple:
    from anyms.benchmark import BenchmarkConfigError
    from runfolder.references import ReferenceImageError

    return BenchmarkConfigError, ReferenceImageError


def arguments(cfg: DictConfig) -> tuple:
    return (cfg.source, cfg.import_method, cfg.benchmark, cfg.data_root, cfg.run_dir, cfg.pattern, bool(cfg.strict),
            bool(cfg.overwrite))


def check(cfg: DictConfig):
    import runfolder

    runfolder.checked_run_dir(cfg.run_dir)  # before importing torch: a quick answer
    from anyms.generation.importer import check_import

    return check_import(*arguments(cfg))


@hydra.main(version_base="1.3", config_path="../conf", config_name="import")
def main(cfg: DictConfig) -> None:
    from anyms.generation.importer import import_images
    from runfolder.console import quiet_libraries, stage_console
    from runfolder.lock import RunFolderLockedError

    quiet_libraries()
    plan = prechecked(cfg)
    try:
        with stage_console():
            summary = import_images(*arguments(cfg), plan=plan)
    except bad_input_errors() as err:
        (fail if plan is not None else refuse)("import", err)  # after the check passed: changed while running
    except RunFolderLockedError as err:
        fail("import", err)
    log.info(f"import {summary.method}: {len(summary.imported)} image(s) into {summary.run_dir}"
             + (f"; {len(summary.missing)} missing, e.g. {summary.missing[:3]}" if summary.missing else ""))


def method_argument(argv: list[str]) -> list[str]:
    """``method=NAME`` -> ``import_method=NAME``: Hydra reads ``method=`` as a choice in the config group
    conf/method/ (the generated methods) and fails, so the documented spelling is renamed before Hydra sees it."""
    return [("import_method=" + a.split("=", 1)[1]) if a.startswith(("method=", "+method=")) else a for a in argv]


if __name__ == "__main__":
    sys.argv = method_argument(sys.argv)
    check_command("import", "import", check, bad_input_errors, hints=HINTS)
    main()
