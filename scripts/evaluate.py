"""Score a run folder's images: metrics.parquet (one row per image x subject) + detections.parquet.
Hydra app: see conf/evaluate.yaml.

    python scripts/evaluate.py run_dir=runs/smoke-tiny eval=tiny
    python scripts/evaluate.py run_dir=runs/anyms11-sdxl            # real evaluators (eval=default, the config's default)

Exit codes: 2 for bad input (refused before an evaluator loads or anything is written, Hydra's log folder
included: one line naming the field and the fix), 1 for a failure at run time.
"""

import logging

import hydra
from omegaconf import DictConfig

from runfolder.entry import check_command, fail, prechecked, refuse

log = logging.getLogger("scripts.evaluate")
HINTS = {"run_dir": "run_dir=runs/NAME (the run folder to score, as generate or import_images wrote it)"}


def bad_input_errors() -> tuple:
    import runfolder
    from eval.evaluate import EvaluationError

    return EvaluationError, runfolder.RunFolderError


def check(cfg: DictConfig):
    import runfolder

    runfolder.existing_run_dir(cfg.run_dir)  # before importing torch: a quick answer
    from eval.evaluate import check_evaluation

    return check_evaluation(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    import runfolder  # (also registers the ${device:} resolver)
    from eval.evaluate import evaluator_line, run_evaluation
    from eval.similarity import MissingWeightsError
    from runfolder.console import quiet_libraries, stage_console
    from runfolder.lock import RunFolderLockedError

    quiet_libraries()
    log.info(evaluator_line(cfg.eval))  # first: which evaluators score (the tiny ones are random)
    metrics = prechecked(cfg)
    checked = metrics is not None
    try:
        with stage_console():
            summary = run_evaluation(cfg, metrics)
    except bad_input_errors() as err:
        (fail if checked else refuse)("evaluate", err)  # after the check passed: something changed while running
    except (MissingWeightsError, runfolder.RunFolderError, RunFolderLockedError) as err:
        fail("evaluate", err)
    log.info(
        f"evaluate: {len(summary.scored)} image(s) scored, {summary.skipped} already scored, of {summary.planned}"
        + (f" ({summary.seconds_per_image:.2f} s/image)" if summary.scored else "")
        + f"\n  metrics: {summary.run_dir / 'metrics.parquet'}"
        + (f"\n  {len(summary.missing)} planned image(s) not generated yet, e.g. {summary.missing[:3]}" if summary.missing else "")
    )


if __name__ == "__main__":
    check_command("evaluate", "evaluate", check, bad_input_errors, hints=HINTS)
    main()
