"""A human study (issue 19). Hydra app, see conf/study.yaml; the first argument is the command.

    python scripts/study.py build run_dir=runs/anyms11-tiny                  # -> runs/anyms11-tiny/study/
    python scripts/study.py build 'run_dirs=[runs/a,runs/b]' study_dir=studies/s1 n_cases=9 'methods=[anyms,ms_diffusion]'
    python scripts/study.py serve study_dir=runs/anyms11-tiny/study          # http://127.0.0.1:8000/
    python scripts/study.py export study_dir=runs/anyms11-tiny/study         # -> votes.csv
    python scripts/study.py report study_dir=runs/anyms11-tiny/study         # -> report/table3.*, agreement.*

Exit codes: 2 for bad input (refused before anything is written: one line naming the field and the fix), 1 for a
failure at run time.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from runfolder.entry import check_command, fail

COMMANDS = ("build", "serve", "export", "report")
log = logging.getLogger("scripts.study")
HINTS = {"command": "the command as the first argument: python scripts/study.py build|serve|export|report ..."}


def check(cfg: DictConfig) -> None:
    from eval.study.build import check_study

    check_study(OmegaConf.to_container(cfg, resolve=True))


def bad_input_errors() -> tuple:
    from eval.study.build import StudyError

    return (StudyError,)


@hydra.main(version_base="1.3", config_path="../conf", config_name="study")
def main(cfg: DictConfig) -> None:
    from eval.study.build import StudyError
    from eval.study.store import StoreError

    import runfolder
    from runfolder.console import quiet_libraries

    quiet_libraries()
    try:
        if cfg.command == "build":
            from eval.study.build import build_study

            run_dirs = list(cfg.run_dirs) if cfg.run_dirs else ([cfg.run_dir] if cfg.run_dir else [])
            study = build_study(run_dirs, cfg.study_dir, int(cfg.n_cases),
                                list(cfg.methods) if cfg.methods else None, int(cfg.seed), str(cfg.name),
                                bool(cfg.overwrite))
            counts = sorted({c["n_subjects"] for c in study["cases"]})
            log.info(f"study: {study['n_cases']} cases ({', '.join(map(str, counts))} subjects), methods "
                     f"{', '.join(study['methods'])}\n  in {cfg.study_dir}\n  serve it: python scripts/study.py serve "
                     f"study_dir={cfg.study_dir}")
        elif cfg.command == "serve":
            from eval.study.app import serve

            serve(cfg.study_dir, str(cfg.host), int(cfg.port))
        elif cfg.command == "export":
            from eval.study.store import export_csv

            n = export_csv(cfg.study_dir, cfg.export_csv, bool(cfg.include_superseded))
            log.info(f"study: {n} votes -> {cfg.export_csv}")
        elif cfg.command == "report":
            from eval.study.analysis import write_study_report

            files = write_study_report(cfg.study_dir, cfg.out_dir, int(cfg.bootstrap.samples), int(cfg.bootstrap.seed))
            log.info(f"study report: {', '.join(files)}\n  in {cfg.out_dir}")
    except (StudyError, StoreError, runfolder.RunFolderError) as err:
        fail(f"study {cfg.command}", err)  # the check ran before Hydra started: this failed while running


if __name__ == "__main__":
    # `study.py build k=v ...`: the first argument is the command
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        sys.argv[1] = f"command={sys.argv[1]}"
    check_command("study", "study", check, bad_input_errors, hints=HINTS)
    main()
