"""Score a run folder's images: metrics.parquet (one row per image x subject) + detections.parquet.
Hydra app: see conf/evaluate.yaml.

    python scripts/evaluate.py run_dir=runs/smoke-tiny eval=tiny
    python scripts/evaluate.py run_dir=runs/anyms11-sdxl            # real evaluators (eval=default)
"""

import hydra
from omegaconf import DictConfig

import runfolder  # noqa: F401  (registers the ${device:} resolver)
from eval.evaluate import EvaluationError, run_evaluation
from eval.similarity import MissingWeightsError
from runfolder.lock import RunFolderLockedError


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        summary = run_evaluation(cfg)
    except (EvaluationError, MissingWeightsError, runfolder.RunFolderError, RunFolderLockedError) as err:
        raise SystemExit(f"evaluate: {err}") from None
    print(
        f"evaluate: {len(summary.scored)} image(s) scored, {summary.skipped} already scored, of {summary.planned}"
        + (f" ({summary.seconds_per_image:.2f} s/image)" if summary.scored else "")
        + f"\n  metrics: {summary.run_dir / 'metrics.parquet'}"
        + (f"\n  {len(summary.missing)} planned image(s) not generated yet, e.g. {summary.missing[:3]}" if summary.missing else "")
    )


if __name__ == "__main__":
    main()
