"""The paper's tables and figure from evaluated run folders. Hydra app: see conf/report.yaml.

    python scripts/report.py run_dir=runs/smoke-tiny
    python scripts/report.py run_dir=runs/anyms11-sdxl 'run_dirs=[runs/anyms11-sdxl,runs/mudi-import]'
    python scripts/report.py run_dir=runs/scale 'run_dirs=[runs/x-scale0.4,runs/x-scale1.0]' split=true

Exit codes: 2 for bad input (refused before anything is written, Hydra's log folder under out_dir included: one
line naming the field and the fix), 1 for a failure at run time.
"""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from runfolder.entry import BadInput, check_command, fail, prechecked, refuse

log = logging.getLogger("scripts.report")


def bad_input_errors() -> tuple:
    import runfolder
    from eval.evaluate import EvaluationError

    return EvaluationError, runfolder.RunFolderError


def run_dirs_of(cfg: DictConfig) -> list:
    """run_dirs when given, else [run_dir] (:class:`BadInput` naming the field when neither is)."""
    if cfg.run_dirs is not None:
        if not isinstance(cfg.run_dirs, ListConfig) or not cfg.run_dirs:
            raise BadInput(f"run_dirs: expected a list of run folders, got {cfg.run_dirs!r}; give 'run_dirs=[runs/A,runs/B]'")
        return list(cfg.run_dirs)
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise BadInput("run_dir: required, and not given; give run_dir=runs/NAME (or 'run_dirs=[runs/A,runs/B]' "
                       "with out_dir=FOLDER)")
    return [cfg.run_dir]


def out_dir_of(cfg: DictConfig) -> str:
    from omegaconf.errors import InterpolationToMissingValueError

    try:
        return str(cfg.out_dir)
    except InterpolationToMissingValueError:  # ${run_dir}/report without a run_dir
        raise BadInput("out_dir: required with run_dirs=[...] and no run_dir; give out_dir=FOLDER") from None


def check(cfg: DictConfig):
    run_dirs, out_dir = run_dirs_of(cfg), out_dir_of(cfg)
    import runfolder

    for d in run_dirs:  # before importing pandas: a quick answer
        runfolder.existing_run_dir(d, "run_dirs" if cfg.run_dirs is not None else "run_dir")
    runfolder.checked_folder(out_dir, "out_dir", "out_dir=FOLDER")
    from eval.report import check_report

    return check_report(run_dirs, out_dir, OmegaConf.to_container(cfg.bootstrap),
                        OmegaConf.to_container(cfg.figures), split=bool(cfg.get("split", False)))


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    from eval.report import run_report
    from runfolder.console import quiet_libraries, stage_console

    quiet_libraries()
    checked = prechecked(cfg)
    try:
        with stage_console():
            summary = run_report(run_dirs_of(cfg), out_dir_of(cfg), OmegaConf.to_container(cfg.bootstrap),
                                 OmegaConf.to_container(cfg.wandb), OmegaConf.to_container(cfg.figures),
                                 split=bool(cfg.get("split", False)), checked=checked)
    except (BadInput, *bad_input_errors()) as err:
        (fail if checked is not None else refuse)("report", err)  # after the check passed: changed while running
    out_dir = Path(cfg.out_dir)
    log.info(f"report: {', '.join(summary['files'])}\n  in {out_dir}"
             + ("\n  TINY RANDOM MODELS: these numbers check plumbing, not quality" if summary["tiny"] else ""))
    log.info("\n" + (out_dir / "table1.md").read_text().strip())  # Table 1 last, then where to open the whole report
    index = out_dir / summary.get("index", "index.html")
    if index.is_file():  # absolute: the line is for pasting into a browser
        log.info(f"report page: {index.resolve()}")


if __name__ == "__main__":
    check_command("report", "report", check, bad_input_errors, allow_missing=("run_dir",))
    main()
