"""Score a run folder's images: metrics.parquet (one row per image x subject) + detections.parquet.
Hydra app: see conf/evaluate.yaml.

    python scripts/evaluate.py run_dir=runs/smoke-tiny eval=tiny
    python scripts/evaluate.py run_dir=runs/anyms11-sdxl            # real evaluators (eval=default, the config's default)
"""

import logging

import hydra
from omegaconf import DictConfig

import runfolder  # (also registers the ${device:} resolver)
from eval.evaluate import EvaluationError, evaluator_line, run_evaluation
from eval.similarity import MissingWeightsError
from runfolder.console import quiet_libraries, stage_console
from runfolder.lock import RunFolderLockedError

log = logging.getLogger("scripts.evaluate")


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    log.info(evaluator_line(cfg.eval))  # first: which evaluators score (the tiny ones are random)
    try:
        with stage_console():
            summary = run_evaluation(cfg)
    except (EvaluationError, MissingWeightsError, runfolder.RunFolderError, RunFolderLockedError) as err:
        raise SystemExit(f"evaluate: {err}") from None
    log.info(
        f"evaluate: {len(summary.scored)} image(s) scored, {summary.skipped} already scored, of {summary.planned}"
        + (f" ({summary.seconds_per_image:.2f} s/image)" if summary.scored else "")
        + f"\n  metrics: {summary.run_dir / 'metrics.parquet'}"
        + (f"\n  {len(summary.missing)} planned image(s) not generated yet, e.g. {summary.missing[:3]}" if summary.missing else "")
    )


if __name__ == "__main__":
    main()
