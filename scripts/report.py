"""The paper's tables and figure from evaluated run folders. Hydra app: see conf/report.yaml.

    python scripts/report.py run_dir=runs/smoke-tiny
    python scripts/report.py run_dir=runs/anyms11-sdxl 'run_dirs=[runs/anyms11-sdxl,runs/mudi-import]'
    python scripts/report.py run_dir=runs/scale 'run_dirs=[runs/x-scale0.4,runs/x-scale1.0]' split=true
"""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import runfolder
from eval.evaluate import EvaluationError
from eval.report import run_report
from runfolder.console import quiet_libraries, stage_console

log = logging.getLogger("scripts.report")


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    run_dirs = list(cfg.run_dirs) if cfg.run_dirs else [cfg.run_dir]
    try:
        with stage_console():
            summary = run_report(run_dirs, cfg.out_dir, OmegaConf.to_container(cfg.bootstrap),
                                 OmegaConf.to_container(cfg.wandb), OmegaConf.to_container(cfg.figures),
                                 split=bool(cfg.get("split", False)))
    except (EvaluationError, runfolder.RunFolderError) as err:
        raise SystemExit(f"report: {err}") from None
    out_dir = Path(cfg.out_dir)
    log.info(f"report: {', '.join(summary['files'])}\n  in {out_dir}"
             + ("\n  TINY RANDOM MODELS: these numbers check plumbing, not quality" if summary["tiny"] else ""))
    log.info("\n" + (out_dir / "table1.md").read_text().strip())  # Table 1 last, then where to open the whole report
    index = out_dir / summary.get("index", "index.html")
    if index.is_file():  # absolute: the line is for pasting into a browser
        log.info(f"report page: {index.resolve()}")


if __name__ == "__main__":
    main()
