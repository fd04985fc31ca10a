"""The paper's tables and figure from a run folder's metrics: Table 1, Table 2, Fig. 4, the overlap table.

Aggregation (DESIGN.md section 3): a subject-level metric is averaged over an image's subjects, then over
the images of each combination, then over combinations (paper Table 1); each mean carries a percentile
bootstrap 95% interval, by default two-level (combinations, then images within each drawn combination;
``bootstrap.resample=within_combinations``: images within fixed combinations), "n/a" where the resampled
level has a single unit. AP@50 is pooled over all images of a method by pycocotools, its interval by the same
resampling (per-image matches computed once). Paired comparisons: sign-flip permutation p-values at the same
unit, never printed as 0, Holm-adjusted over each report's family. Time is the mean seconds per image with
each process's first image left out (warm-up); memory the mean peak CUDA memory per image (n/a on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from eval.layout_metrics import Ap50Matches, ap50, ap_images
from eval.published import benchmark_of, published_markdown

# column in metrics.parquet -> (table header, how many decimals)
IMAGE_METRICS = {
    "iou": ("mIoU", 1), "clip_i": ("CLIP-I", 1), "dreamsim": ("DreamSim", 1), "dino": ("DINO", 1),
    "clip_t": ("CLIP-T", 1), "m_dino": ("M-DINO", 1), "iou_best": ("mIoU (best match)", 1),
    "detected_pct": ("Detected %", 1), "swap_pct": ("Identity swap %", 1), "id_margin": ("Identity margin", 1),
}
TABLE1 = ["ap50", "iou", "clip_i", "dreamsim", "dino", "clip_t", "detected_pct"]
CONFUSION = ["swap_pct", "id_margin"]  # identity confusion (DINO), where images have 2+ subjects
TABLE1_BY_BENCHMARK = {"msbench": TABLE1 + ["m_dino"]}  # MS-Diffusion's protocol adds M-DINO
TABLE2 = ["iou", "clip_i", "clip_t"]
FIG4 = ["ap50", "iou", "clip_i", "dino", "dreamsim", "clip_t", "swap_pct"]


def derived_columns(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per-subject columns the tables average: ``detected_pct`` (100 when the subject was found: the share of
    subjects detected beside the identity scores, so an omission is never hidden) and ``swap_pct`` (100 when the
    subject's region is closer to another subject's references than to its own; defined for detected subjects
    of images with 2+ subjects)."""
    out = metrics.copy()
    if "detected" in out:
        out["detected_pct"] = 100.0 * out["detected"].astype(float)
    if "id_swapped" in out:
        swapped = out["id_swapped"].astype(float)
        out["swap_pct"] = np.where(out["id_margin"].notna(), 100.0 * swapped, np.nan) if "id_margin" in out else 100.0 * swapped
    return out


def protocol_line(eval_configs: Sequence[dict]) -> str:
    """The evaluation protocol's choices that move the numbers, for every table's header."""
    parts = set()
    for cfg in eval_configs:
        e = cfg.get("eval", {})
        dino = e.get("scorers", {}).get("dino", {})
        backbone = {"dinov2": "DINOv2", "transformers": "DINO v1", "timm": "DINO v1 (timm)"}.get(dino.get("backend"),
                                                                                                 dino.get("backend"))
        parts.add(f"DINO backbone {backbone} ({dino.get('model')}); identity region {e.get('identity_region', 'nearest')}; "
                  f"missed subjects {e.get('missed_subject', 'box_crop (unsegmented)')} (M-DINO counts them 0); "
                  f"AP ranked by {e.get('ap_score', 'box')} score; scenes "
                  f"{'out of' if e.get('layout_excludes_scenes') else 'in'} the layout metrics")
    return "Protocol: " + " | ".join(sorted(parts)) + "."
TINY_BANNER = ("**TINY RANDOM MODELS.** These numbers check the harness's plumbing; they say nothing about "
               "the quality of any method.")


RESAMPLE = {  # bootstrap.resample -> what the interval describes (named in every table's header)
    "two_level": "two-level bootstrap: combinations drawn with replacement, then images within each drawn combination",
    "within_combinations": ("images resampled within each combination, the combinations fixed (for when they are the "
                            "whole population of interest)"),
}
NA_REASON = {
    "two_level": "one combination: no interval over combinations",
    "within_combinations": "one image per combination: no interval within combinations",
}


def interval_caption(resample: str) -> str:
    return ("Mean over combinations of per-combination means; ± half its percentile bootstrap 95% interval "
            f"(bootstrap.resample={resample}: {RESAMPLE[resample]}).")


def interval_text(resample: str, samples: int, ap_samples: int) -> str:
    return (f"{interval_caption(resample)[:-2]}; {samples} resamples, AP50 {ap_samples}, each the pooled AP of the "
            "drawn images). A level with a single unit reads n/a: a bootstrap over one unit has no spread.")


def check_resample(resample: str) -> str:
    if resample not in RESAMPLE:
        raise ValueError(f"bootstrap.resample: {resample!r}; one of {sorted(RESAMPLE)}")
    return resample


@dataclass
class Estimate:
    mean: float
    lo: float
    hi: float
    n: int
    note: str = ""  # why there is no interval ("n/a"), when there is none

    def text(self, decimals: int = 1) -> str:
        """``mean ± half-interval``; ``± n/a`` where a level has a single unit; a half-interval that would round
        to 0 gets the decimals it needs, and an interval that is exactly 0 (every resample equal) says so."""
        if not np.isfinite(self.mean):
            return "-"
        if not (np.isfinite(self.lo) and np.isfinite(self.hi)):
            return f"{self.mean:.{decimals}f} ± n/a"
        half = (self.hi - self.lo) / 2
        if half <= 1e-9 * max(1.0, abs(self.mean)):  # every resample equal, up to float rounding
            return f"{self.mean:.{decimals}f} ± 0 (constant)"
        shown = decimals
        while round(half, shown) == 0 and shown < 8:
            shown += 1
        return f"{self.mean:.{decimals}f} ± {half:.{shown}f}"


def _no_interval(groups: Sequence, resample: str) -> bool:
    """Whether the resampled level has a single unit: one combination (two-level), or one image in every
    combination (within combinations)."""
    if resample == "two_level":
        return len(groups) < 2
    return all(len(g) < 2 for g in groups)


def per_image(metrics: pd.DataFrame, column: str) -> pd.DataFrame:
    """One value per image: the mean over the image's subjects where the metric is defined (per-image metrics
    repeat on each row); an image where it is defined for no subject (a scene-only layout, excluded missed
    subjects, no detected subject for the swap rate) is left out."""
    keys = ["method", "combination", "seed", "image", "n_subjects"]
    return metrics.groupby(keys, as_index=False)[column].mean().dropna(subset=[column])


def resampled_means(groups: Sequence[np.ndarray], samples: int, rng: np.random.Generator,
                    resample: str = "two_level") -> np.ndarray:
    """``samples`` bootstrap replicates of the mean over combinations of per-combination means.

    ``two_level``: each replicate draws as many combinations as there are, with replacement, and within each
    drawn combination (each draw afresh) as many of its images as it has, with replacement.
    ``within_combinations``: every combination once, its images drawn with replacement."""
    k = len(groups)
    if resample == "within_combinations":
        boot = np.zeros(samples)
        for g in groups:
            boot += g[rng.integers(0, len(g), size=(samples, len(g)))].mean(axis=1)
        return boot / k
    drawn = rng.integers(0, k, size=(samples, k))
    means = np.empty((samples, k))
    for c, g in enumerate(groups):
        slots = drawn == c
        count = int(slots.sum())
        if count:
            means[slots] = g[rng.integers(0, len(g), size=(count, len(g)))].mean(axis=1)
    return means.mean(axis=1)


def combination_mean_bootstrap(values: pd.DataFrame, column: str, samples: int, seed: int,
                               resample: str = "two_level") -> Estimate:
    """Mean over combinations of the per-combination mean, with a percentile bootstrap 95% interval
    (:func:`resampled_means`); no interval (NaN, ``note`` says why) where the resampled level has one unit."""
    groups = [g[column].to_numpy(dtype=float) for _, g in values.groupby("combination")]
    groups = [g for g in groups if len(g)]
    if not groups:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(np.mean([g.mean() for g in groups]))
    n = int(sum(len(g) for g in groups))
    if _no_interval(groups, check_resample(resample)) or not samples:
        return Estimate(mean, float("nan"), float("nan"), n, NA_REASON[resample])
    boot = resampled_means(groups, samples, np.random.default_rng(seed), resample)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Estimate(mean, float(lo), float(hi), n)


def resampled_image_sets(groups: Sequence[np.ndarray], samples: int, rng: np.random.Generator,
                         resample: str = "two_level") -> list[np.ndarray]:
    """The images of each bootstrap replicate (indices, repeats allowed), drawn as :func:`resampled_means`
    draws them: combinations then images within each drawn one (``two_level``), or images within each
    combination (``within_combinations``)."""
    k = len(groups)
    out = []
    for _ in range(samples):
        combos = rng.integers(0, k, size=k) if resample == "two_level" else range(k)
        out.append(np.concatenate([groups[c][rng.integers(0, len(groups[c]), size=len(groups[c]))] for c in combos]))
    return out


def ap50_bootstrap(metrics: pd.DataFrame, detections: pd.DataFrame, samples: int, seed: int,
                   resample: str = "two_level") -> Estimate:
    """AP@50 pooled over the images (pycocotools), with a percentile bootstrap 95% interval drawing images
    as the means do (:func:`resampled_image_sets`). Each image's matches are computed once
    (:class:`eval.layout_metrics.Ap50Matches`, equal to pycocotools on any resample), so 1,000 resamples
    cost about what one pycocotools run does per resample of 10 images."""
    images = metrics.drop_duplicates("image")[["image", "combination"]]
    if images.empty:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    by_image = ap_images(metrics, detections, images["image"].tolist())
    names = list(by_image)
    mean = ap50(list(by_image.values()))
    position = {name: i for i, name in enumerate(names)}
    groups = [np.array([position[i] for i in g["image"]]) for _, g in images.groupby("combination")]
    if _no_interval(groups, check_resample(resample)) or not samples:
        return Estimate(float(mean), float("nan"), float("nan"), len(images), NA_REASON[resample])
    matches = Ap50Matches(list(by_image.values()))
    boot = [matches.ap50(drawn) for drawn in resampled_image_sets(groups, samples, np.random.default_rng(seed), resample)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Estimate(float(mean), float(lo), float(hi), len(images))


def time_memory(records: pd.DataFrame) -> dict[str, dict]:
    """Per method: mean seconds per image without each process's first image, mean peak memory (GiB)."""
    out = {}
    for method, g in records.groupby("method"):
        first = g["first_in_process"] if "first_in_process" in g else pd.Series(False, index=g.index)
        warm = g[~first.fillna(False).astype(bool)]
        warm = warm if len(warm) else g  # a single image: nothing else to average
        if "attention_maps" in warm:  # the recorder's work is in those images' time: leave them out if others exist
            plain = warm[warm["attention_maps"].isna()]
            warm = plain if len(plain) else warm
        seconds = pd.to_numeric(warm["seconds"], errors="coerce").dropna()
        # on the CPU the record holds the process's peak RSS, which never resets: it would depend on what ran
        # before in the process, so memory is only given for images made on CUDA (peak allocated per image)
        on_cuda = g["device"].astype(str).str.startswith("cuda")
        memory = pd.to_numeric(g["peak_memory_bytes"], errors="coerce").dropna() if on_cuda.all() else pd.Series(dtype=float)
        out[method] = {
            "time_s": float(seconds.mean()) if len(seconds) else float("nan"),
            "memory_gib": float(memory.mean() / 2**30) if len(memory) else float("nan"),
            "device": ",".join(sorted(g["device"].astype(str).unique())),
        }
    return out


def method_table(metrics: pd.DataFrame, detections: pd.DataFrame, records: pd.DataFrame, columns: Sequence[str],
                 samples: int, ap_samples: int, seed: int, with_cost: bool, resample: str = "two_level") -> pd.DataFrame:
    """One row per method: ``<metric>``, ``<metric>_lo``, ``<metric>_hi`` for each column (``_lo``/``_hi`` NaN
    where the resampled level has a single unit), and ``n_images``; no metrics: no rows, the same columns."""
    rows = []
    cost = time_memory(records) if with_cost else {}
    for method, m in metrics.groupby("method", sort=True):
        row = {"method": method, "n_images": int(m["image"].nunique())}
        for col in columns:
            if col == "ap50":
                est = ap50_bootstrap(m, detections[detections["method"] == method] if len(detections) else detections,
                                     ap_samples, seed, resample)
            elif col in m:
                est = combination_mean_bootstrap(per_image(m, col), col, samples, seed, resample)
            else:
                continue
            row.update({col: est.mean, f"{col}_lo": est.lo, f"{col}_hi": est.hi})
        if with_cost and method in cost:
            row.update(cost[method])
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["method", "n_images"] + [f"{c}{s}" for c in columns for s in ("", "_lo", "_hi")])
    return pd.DataFrame(rows)


def by_subject_count(metrics: pd.DataFrame, detections: pd.DataFrame, columns: Sequence[str], samples: int,
                     ap_samples: int, seed: int, resample: str = "two_level") -> pd.DataFrame:
    """Fig. 4's data: each metric per (method, number of subjects)."""
    rows = []
    for (method, n), m in metrics.groupby(["method", "n_subjects"], sort=True):
        row = {"method": method, "n_subjects": int(n)}
        for col in columns:
            if col == "ap50":
                d = detections[detections["method"] == method] if len(detections) else detections
                est = ap50_bootstrap(m, d, ap_samples, seed, resample)
            elif col in m:
                est = combination_mean_bootstrap(per_image(m, col), col, samples, seed, resample)
            else:
                continue
            row.update({col: est.mean, f"{col}_lo": est.lo, f"{col}_hi": est.hi})
        rows.append(row)
    return pd.DataFrame(rows)


MEMORY_NOTE = ("Memory: peak CUDA memory allocated per image (GiB); n/a on the CPU, where the records hold the "
               "process's peak RSS, which never resets (a number that would depend on which method ran first).\n\n")
HEADERS = {"ap50": ("AP50", 1), **IMAGE_METRICS, "time_s": ("Time (s/img)", 2), "memory_gib": ("Memory (GiB)", 2),
           "attn_in_box_image": ("Image attn in box (%)", 1), "attn_in_box_text": ("Text attn in box (%)", 1)}
ATTENTION_COLUMNS = ["attn_in_box_image", "attn_in_box_text"]


def attention_table(rows: pd.DataFrame, samples: int, seed: int, resample: str = "two_level") -> pd.DataFrame:
    """Per method: each attention-in-box column's mean (over combinations of per-combination means of the
    per-image means over the subjects where it is defined) with its bootstrap interval, and the counts."""
    out = []
    for method, m in rows.groupby("method", sort=True):
        row = {"method": method, "n_images": int(m["image"].nunique())}
        for col in ATTENTION_COLUMNS:
            defined = m.dropna(subset=[col])
            est = combination_mean_bootstrap(per_image(defined, col), col, samples, seed, resample)
            row.update({col: est.mean, f"{col}_lo": est.lo, f"{col}_hi": est.hi, f"{col}_undefined": int(len(m) - len(defined))})
        out.append(row)
    return pd.DataFrame(out)


def display_table(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Mean ± half-interval strings, headers as in the paper."""
    out = pd.DataFrame({"Method": table["method"]})
    for col in columns:
        if col not in table:
            continue
        header, decimals = HEADERS[col]
        if f"{col}_lo" in table:
            out[header] = [Estimate(r[col], r[f"{col}_lo"], r[f"{col}_hi"], 0).text(decimals) for _, r in table.iterrows()]
        else:
            missing = "n/a" if col == "memory_gib" else "-"
            out[header] = [f"{v:.{decimals}f}" if np.isfinite(v) else missing for v in table[col]]
    out["Images"] = table["n_images"] if "n_images" in table else None
    return out


def markdown(df: pd.DataFrame) -> str:
    """A pipe table (pandas' ``to_markdown``); cells are written as they are, not re-parsed as numbers."""
    return df.to_markdown(index=False, disable_numparse=True, missingval="")


_LATEX_SPECIALS = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                   "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}


def _latex_signs(text: str) -> str:
    """The signs OT1 text fonts lack, as maths (after escaping)."""
    return text.replace("±", "$\\pm$").replace("<", "$<$").replace(">", "$>$")


def latex(df: pd.DataFrame, caption: str) -> str:
    """A booktabs table through ``Styler.to_latex``: cells and headers escaped by pandas (``escape="latex"``),
    the caption by the same rules."""
    def cell(v):
        return "" if v is None else _latex_signs(v) if isinstance(v, str) else v

    styler = df.style.hide(axis="index").format(cell, escape="latex").format_index(escape="latex", axis=1)
    caption = _latex_signs("".join(_LATEX_SPECIALS.get(ch, ch) for ch in caption))
    return styler.to_latex(caption=caption, hrules=True, position="t", position_float="centering",
                           column_format="l" + "r" * (len(df.columns) - 1), environment="table")


def plot_fig4(data: pd.DataFrame, columns: Sequence[str], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [c for c in columns if c in data]
    ncols = min(3, max(len(present), 1))
    nrows = -(-max(len(present), 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.set_visible(False)
    for ax, col in zip(axes.flat, present):
        for method, g in data.groupby("method", sort=True):
            g = g.sort_values("n_subjects")
            err = np.vstack([g[col] - g[f"{col}_lo"], g[f"{col}_hi"] - g[col]]).clip(min=0)
            ax.errorbar(g["n_subjects"], g[col], yerr=err, marker="o", capsize=3, label=method)
        ax.set_title(HEADERS[col][0])
        ax.set_xlabel("subjects")
        ax.set_xticks(sorted(data["n_subjects"].unique()))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the report stage ---------------------------------------------------------------------------------

def _read_run(run_dir) -> tuple[pd.DataFrame, pd.DataFrame, list[dict], dict, dict]:
    """A run folder's metrics, detections, records and evaluation config, restricted to what exists: the
    metrics of images whose records name them, whose files are there and have the content that was scored.
    Metrics of images gone (a method's images and records removed) are left out; an image changed since it
    was scored stops the report (run evaluate). Also a few counts for the tables' headers."""
    import json
    from functools import lru_cache
    from pathlib import Path

    import runfolder
    from eval.evaluate import DETECTIONS_FILE, EVAL_CONFIG_FILE, METRICS_FILE, EvaluationError, read_table, record_key

    run_dir = Path(run_dir)
    metrics = read_table(run_dir / METRICS_FILE)
    if metrics.empty:
        raise EvaluationError(f"{run_dir / METRICS_FILE}: missing or empty; run evaluate on {run_dir} first")
    config_path = run_dir / EVAL_CONFIG_FILE
    if not config_path.exists():
        raise EvaluationError(f"{config_path}: missing (evaluate writes it beside {METRICS_FILE}, naming the evaluation "
                              f"config the numbers come from); run evaluate on {run_dir}")
    eval_config = json.loads(config_path.read_text())
    if "image_sha256" not in metrics or "record_key" not in metrics:
        raise EvaluationError(f"{run_dir / METRICS_FILE}: written before metrics were keyed by image content (no "
                              f"image_sha256 column); run evaluate on {run_dir} again")
    detections = read_table(run_dir / DETECTIONS_FILE)
    records = {r["image"]: r for r in runfolder.read_records(run_dir)}
    scored = metrics.drop_duplicates("image").set_index("image")
    reference_digest = lru_cache(maxsize=None)(lambda p: runfolder.file_digest(p) if Path(p).is_file() else None)
    gone, changed = [], []
    for image, row in scored.iterrows():
        record, path = records.get(image), run_dir / image
        if record is None or not path.is_file():
            gone.append(image)
        elif (runfolder.file_digest(path) != row["image_sha256"]
              or record_key(record, reference_digest) != row.get("record_key")):
            changed.append(image)
    if changed:
        raise EvaluationError(f"{run_dir / changed[0]}: image changed since it was scored (its file or its record is "
                              f"newer than {METRICS_FILE}; {len(changed)} image(s) in all); run evaluate on {run_dir} "
                              "first")
    metrics = metrics[~metrics["image"].isin(gone)].reset_index(drop=True)
    if len(detections):
        detections = detections[detections["image"].isin(set(metrics["image"]))].reset_index(drop=True)
    in_tables = set(metrics["image"])
    notes = {"gone": len(gone), "unscored": sorted(set(records) - in_tables)}
    return metrics, detections, [r for i, r in records.items() if i in in_tables], eval_config, notes


def settings_of(record: dict, run_name: str) -> dict:
    """What decides a method's images apart from the combination and seed, flattened (``model.pretrained``,
    ``method.adapter_scale``, ``generation.steps``, ``device``, ``dtype``). Records without ``settings`` (written
    before it existed, or imported) cannot say how they were made, so their run folder stands in for it."""
    import runfolder

    flat = {f"model.{k}": v for k, v in runfolder.flatten(record.get("model") or {}).items()}
    if isinstance(record.get("settings"), dict):
        flat.update(runfolder.flatten(record["settings"]))
    else:
        flat["run"] = run_name
    # the device's type: shards on cuda:0 and cuda:1 make one configuration
    flat.update({"device": str(record.get("device")).split(":")[0], "dtype": record.get("dtype")})
    return flat


def setting_labels(record_runs: Sequence[tuple[dict, str]], split: bool) -> list[str]:
    """The table row of each (record, run folder name): its method, or with ``split`` and where the method's
    images were made with different settings, ``method [field=value, ...]`` naming the fields that differ.
    Without ``split`` such a method is refused, naming the fields."""
    import json

    from eval.evaluate import EvaluationError

    flat = [settings_of(r, name) for r, name in record_runs]
    labels = [r["method"] for r, _ in record_runs]
    by_method: dict[str, list[int]] = {}
    for i, (r, _) in enumerate(record_runs):
        by_method.setdefault(r["method"], []).append(i)
    for method, idx in sorted(by_method.items()):
        keys = sorted({k for i in idx for k in flat[i]})
        differing = [k for k in keys if len({json.dumps(flat[i].get(k), sort_keys=True, default=str) for i in idx}) > 1]
        if not differing:
            continue
        def values(k):  # numbers in numeric order
            vs = {flat[i].get(k) for i in idx if not isinstance(flat[i].get(k), (list, dict))}
            vs |= {str(flat[i].get(k)) for i in idx if isinstance(flat[i].get(k), (list, dict))}
            numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
            return [str(v) for v in sorted(vs, key=lambda v: (0, v, "") if numeric(v) else (1, 0, str(v)))]
        if not split:
            fields = ", ".join(f"{'run folder' if k == 'run' else k} ({' vs '.join(values(k))})" for k in differing)
            raise EvaluationError(
                f"method {method}: its images were made with different settings, {fields}: one row would pool them; "
                "pass split=true to show one row per setting (named by the differing fields), or report them apart")
        short = {k: k.rsplit(".", 1)[-1] for k in differing}
        if len(set(short.values())) < len(short):  # two fields with the same last name: name them in full
            short = {k: k for k in differing}
        for i in idx:
            labels[i] = f"{method} [" + ", ".join(f"{short[k]}={flat[i].get(k)}" for k in differing) + "]"
    return labels


def _provenance(records: pd.DataFrame, metrics: pd.DataFrame) -> dict:
    """What produced the images (their records' git hashes and versions) and the metrics (the git hashes
    stored with each scored image), every distinct value, and the report's own."""
    import runfolder

    def distinct(values) -> list[str]:
        return sorted({str(v) for v in values if v is not None and v == v})

    versions = records["versions"] if "versions" in records else pd.Series(dtype=object)
    return {
        "images_git": distinct(records.get("git_hash", [])),
        "images_torch": distinct(v.get("torch") for v in versions if isinstance(v, dict)),
        "images_diffusers": distinct(v.get("diffusers") for v in versions if isinstance(v, dict)),
        "metrics_git": distinct(metrics.get("eval_git_hash", [])),
        "report_git": runfolder.git_hash(),
    }


def hardware_kinds(records: pd.DataFrame) -> dict[str, dict]:
    """Each kind of hardware that made the records' images (runfolder.hardware_label): its methods and image count."""
    import runfolder

    kinds: dict[str, dict] = {}
    hardware = records["hardware"] if "hardware" in records else pd.Series([None] * len(records), index=records.index)
    for method, hw in zip(records["method"], hardware):
        kind = kinds.setdefault(runfolder.hardware_label({"hardware": hw}), {"methods": set(), "images": 0})
        kind["methods"].add(str(method))
        kind["images"] += 1
    return {label: {"methods": sorted(k["methods"]), "images": k["images"]} for label, k in sorted(kinds.items())}


def mixed_hardware_note(kinds: dict[str, dict]) -> str:
    """A warning paragraph for a table whose images come from more than one kind of hardware, else ''."""
    if len(kinds) < 2:
        return ""
    parts = "; ".join(f"{label}: {k['images']} image(s) of {', '.join(k['methods'])}" for label, k in kinds.items())
    return (f"**Mixed hardware.** The images behind these numbers come from {len(kinds)} kinds of hardware ({parts}). "
            "The same config gives the same bytes only on the same hardware and software stack; across kinds the images "
            "differ within a tolerance (README, \"Same config, same bytes\"), so compare methods made on one kind.\n\n")


def _differing_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differing_fields(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key} ({va!r} vs {vb!r})")
    return out


def models_header(records: pd.DataFrame, eval_configs: Sequence[dict]) -> tuple[str, bool]:
    """A line naming the models behind the numbers, and whether any of them is a tiny random model."""
    def adapter(m: dict) -> str:  # the adapter the images used: an IP-Adapter, or MS-Diffusion's own weights
        if m.get("ip_adapter"):
            return f"IP-Adapter {m['ip_adapter'].get('weight_name')}"
        if m.get("ms_diffusion"):
            return f"MS-Diffusion {m['ms_diffusion'].get('repo')}"
        return "no adapter"

    gen = sorted({f"{m.get('name')} ({m.get('pretrained')}; {adapter(m)})"
                  if isinstance(m, dict) and m.get("pretrained") else str((m or {}).get("name"))
                  for m in records.get("model", pd.Series(dtype=object))})
    tiny = any(isinstance(m, dict) and m.get("tiny") for m in records.get("model", []))
    ev = []
    for cfg in eval_configs:
        e = cfg.get("eval", {})
        tiny = tiny or bool(e.get("tiny"))
        ev.append(f"{e.get('name')}: detector {e.get('detector', {}).get('model_id_or_path')}, "
                  f"SAM {e.get('segmenter', {}).get('model_type')}, CLIP {e.get('scorers', {}).get('clip', {}).get('model_name')}, "
                  f"DINO {e.get('scorers', {}).get('dino', {}).get('model')}, "
                  f"DreamSim {e.get('scorers', {}).get('dreamsim', {}).get('dreamsim_type')}; "
                  f"box/text thresholds {e.get('box_threshold')}/{e.get('text_threshold')}")
    return f"Generation models: {'; '.join(gen)}. Evaluation: {' | '.join(sorted(set(ev)))}.", tiny


def write_attention_report(out, rows: pd.DataFrame, table: pd.DataFrame, header_banner: str, stamp: str) -> pd.DataFrame:
    """attention.md / attention.csv (per method) and attention_subjects.csv (per image and subject); returns
    attention.md's table."""
    import runfolder

    shown = display_table(table, ATTENTION_COLUMNS)
    for col in ATTENTION_COLUMNS:
        shown[f"undefined ({col.rsplit('_', 1)[1]})"] = table[f"{col}_undefined"].to_numpy()
    md = (f"# Attention in box\n\n{header_banner}{stamp}\n\nPer subject and stream, the share of its attention mass "
          "on the tokens of its own requested box, on each recorded grid, averaged over grids (eval/attention.py). "
          "Image stream: the weight each query gives the subject's image tokens in the method's own image attention "
          "(100 by construction for AnyMS, whose subjects act only on tokens they own); text stream: the weight on "
          "the subject's phrase tokens. Undefined where a subject has no attention mass (no image term, or no token "
          f"owned): counted, left out of the means. Figures: attention/.\n\n{markdown(shown)}\n")
    runfolder.atomic_write(out / "attention.md", lambda p: p.write_text(md))
    runfolder.atomic_write(out / "attention.csv", lambda p: table.to_csv(p, index=False))
    runfolder.atomic_write(out / "attention_subjects.csv", lambda p: rows.to_csv(p, index=False))
    return shown


@dataclass
class ReportInputs:
    """What :func:`check_report` read and checked: the report's input, before anything is written."""
    runs: list
    metrics: pd.DataFrame
    detections: pd.DataFrame
    records: pd.DataFrame
    record_runs: list


def check_out_dir(out_dir) -> None:
    """``out_dir`` is a folder or can be made: not a file, not under one."""
    import runfolder
    from eval.evaluate import EvaluationError

    try:
        runfolder.checked_folder(out_dir, "out_dir", "out_dir=FOLDER")
    except runfolder.RunFolderError as err:
        raise EvaluationError(str(err)) from None


def check_report(run_dirs: Sequence, out_dir, bootstrap: dict, figures: dict | None = None,
                 split: bool = False) -> ReportInputs:
    """Everything that can be wrong with a report's input, before anything is written (issue 32:
    ``scripts/report.py`` runs it before Hydra makes its log folder under ``out_dir``): every run folder
    evaluated and unchanged since, the same evaluation config, one configuration per method (or ``split``), the
    figures' pairs, the bootstrap settings, and ``out_dir`` a folder. Raises :class:`EvaluationError` or
    :class:`~runfolder.RunFolderError` naming the field or file."""
    from pathlib import Path

    import runfolder
    from eval.evaluate import EvaluationError

    if not run_dirs:
        raise EvaluationError("run_dir: no run folder given; give run_dir=runs/NAME or run_dirs=[runs/A,runs/B]")
    for d in run_dirs:
        runfolder.existing_run_dir(d, "run_dirs" if len(run_dirs) > 1 else "run_dir")
    check_out_dir(out_dir)
    for key in ("samples", "ap_samples", "seed"):
        value = bootstrap.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "seed" else 1):
            raise EvaluationError(f"bootstrap.{key}: expected an integer >= {0 if key == 'seed' else 1}, got {value!r}")
    try:
        check_resample(bootstrap.get("resample", "two_level"))
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    figures = dict(figures or {})

    runs = [_read_run(d) for d in run_dirs]
    hashes = {r[3].get("eval_hash") for r in runs}
    if len(hashes) > 1:  # numbers side by side must come from the same evaluation
        first = runs[0][3].get("eval", {})
        for r, d in zip(runs[1:], run_dirs[1:]):
            diff = _differing_fields(first, r[3].get("eval", {}))
            if diff:
                raise EvaluationError(
                    f"{d} was evaluated with another config than {run_dirs[0]}: eval.{', eval.'.join(diff)}; "
                    "re-evaluate one of them with the other's eval config"
                )
    # one row per method and configuration; with several run folders an image is named by its folder too
    names = [Path(str(d)).name for d in run_dirs]
    names = names if len(set(names)) == len(names) else [str(d) for d in run_dirs]
    labels = iter(setting_labels([(rec, name) for r, name in zip(runs, names) for rec in r[2]], split))
    qualify = len(run_dirs) > 1
    metric_parts, detection_parts, record_dicts, record_runs = [], [], [], []
    for (m, det, recs, _, _), d in zip(runs, run_dirs):
        label_of = {rec["image"]: next(labels) for rec in recs}
        key = (lambda image, d=d: str(Path(str(d)) / image)) if qualify else (lambda image: image)
        m = m.assign(method=m["image"].map(label_of), image=m["image"].map(key))
        if len(det):
            det = det.assign(method=det["image"].map(label_of), image=det["image"].map(key))
        metric_parts.append(m)
        detection_parts.append(det)
        for rec in recs:
            record_dicts.append({**rec, "method": label_of[rec["image"]], "image": key(rec["image"])})
            record_runs.append(({**rec, "method": label_of[rec["image"]]}, d))  # (record, its run folder)
    from eval.figures import check_pairs
    check_pairs(record_runs, figures)  # before anything is written
    metrics = pd.concat(metric_parts, ignore_index=True)
    detections = pd.concat(detection_parts, ignore_index=True)
    records = pd.DataFrame(record_dicts)
    return ReportInputs(runs, metrics, detections, records, record_runs)


def run_report(run_dirs: Sequence, out_dir, bootstrap: dict, wandb_cfg: dict | None = None,
               figures: dict | None = None, split: bool = False, checked: ReportInputs | None = None) -> dict:
    """Writes table1/table2 (md, csv, tex), fig4.png, overlap.{md,csv}, the HTML report (index.html, methods/,
    images/, regions/, assets/: eval/html_report.py) and report.json into ``out_dir``; with attention maps in
    the runs also attention.{md,csv} and attention/ figures (``figures["attention"]`` (combination, seed)
    pairs, default 4). A row is one method under one configuration: a method whose
    images were made with different settings (or in run folders that cannot say theirs) is refused naming
    the fields, or with ``split`` shown as one row per setting, ``method [field=value]``. ``checked``: what
    :func:`check_report` returned for these arguments (it runs here otherwise)."""
    from pathlib import Path

    import runfolder
    from eval.attention import attention_rows, write_attention_figures
    from eval.html_report import html_table, write_html_report

    figures = dict(figures or {})
    checked = checked if checked is not None else check_report(run_dirs, out_dir, bootstrap, figures, split)
    runs, metrics, detections, records, record_runs = (checked.runs, checked.metrics, checked.detections,
                                                       checked.records, checked.record_runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, tiny = models_header(records, [r[3] for r in runs])
    samples, ap_samples, seed = int(bootstrap["samples"]), int(bootstrap["ap_samples"]), int(bootstrap["seed"])
    resample = check_resample(bootstrap.get("resample", "two_level"))
    interval = interval_text(resample, samples, ap_samples)
    devices = ",".join(sorted(records["device"].astype(str).unique()))
    dtypes = ",".join(sorted(records["dtype"].astype(str).unique()))
    prov = _provenance(records, metrics)
    kinds = hardware_kinds(records)
    hardware_note = mixed_hardware_note(kinds)
    unscored = sum(len(r[4]["unscored"]) for r in runs)
    stamp_lines = [header, protocol_line([r[3] for r in runs]),
                   f"Device {devices}, dtype {dtypes}, hardware {' | '.join(kinds) or 'not recorded'}.",
                   f"Provenance: images git {', '.join(prov['images_git'])} "
                   f"(torch {', '.join(prov['images_torch']) or '?'}, diffusers {', '.join(prov['images_diffusers']) or '?'}); "
                   f"metrics git {', '.join(prov['metrics_git'])}; report git {prov['report_git']}.", interval]
    if unscored:
        stamp_lines.append(f"{unscored} recorded image(s) not scored yet are not in the tables (run evaluate).")
    stamp = " ".join(stamp_lines)
    written = {}
    html_tables = []  # each table as the HTML report shows it (eval/html_report.py)

    def write_table(name: str, table: pd.DataFrame, columns: Sequence[str], caption: str, note: str = "") -> None:
        shown = display_table(table, columns) if len(table) else pd.DataFrame()
        banner = (TINY_BANNER + "\n\n") if tiny else ""
        if shown.astype(str).apply(lambda c: c.str.contains("n/a", regex=False)).any().any():
            note = f"{note}n/a: {NA_REASON[resample]} (a bootstrap over a single unit has no spread to show).\n\n"
        md = f"# {caption}\n\n{banner}{stamp}\n\n{note}{markdown(shown) if len(shown) else '(no rows)'}\n"
        runfolder.atomic_write(out / f"{name}.md", lambda p: p.write_text(md))
        runfolder.atomic_write(out / f"{name}.csv", lambda p: table.to_csv(p, index=False))
        tex_caption = (f"{caption}. {interval_caption(resample)}" + (f" n/a: {NA_REASON[resample]}." if "n/a:" in note else "")
                       + (" TINY RANDOM MODELS: not a quality result." if tiny else ""))
        runfolder.atomic_write(out / f"{name}.tex", lambda p: p.write_text(
            f"% {stamp}\n" + (latex(shown, tex_caption) if len(shown) else f"% {note or 'no rows'}\n")))
        written[name] = md
        html_tables.append(html_table(name, caption, shown, {HEADERS[c][0]: table[c] for c in columns if c in table}, note))

    benchmark = benchmark_of(metrics["combination"])  # from the combination ids: per-benchmark columns, published rows
    metrics = derived_columns(metrics)
    table1_columns = list(TABLE1_BY_BENCHMARK.get(benchmark, TABLE1))
    if "id_swapped" in metrics and metrics["n_subjects"].max() > 1:
        table1_columns += CONFUSION
    table1 = method_table(metrics, detections, records, table1_columns, samples, ap_samples, seed, with_cost=True,
                          resample=resample)
    # attention in box, from the attention maps of the images that have them (record_attention=true)
    attention = attention_rows(record_runs)
    attention_columns = []
    if len(attention):
        attn = attention_table(attention, samples, seed, resample)
        table1 = table1.merge(attn.drop(columns=["n_images"]), on="method", how="left")
        attention_columns = ATTENTION_COLUMNS
        shown = write_attention_report(out, attention, attn, header_banner=(TINY_BANNER + "\n\n") if tiny else "", stamp=stamp)
        html_tables.append(html_table("attention", "Attention in box", shown, {HEADERS[c][0]: attn[c] for c in ATTENTION_COLUMNS}))
        write_attention_figures(record_runs, out / "attention", int(figures.get("attention", 4)),
                                "TINY RANDOM MODELS - " if tiny else "")
    scenes = int((~metrics["in_layout"].astype(bool)).sum()) if "in_layout" in metrics else 0
    scene_note = (f"{scenes} full-frame scene subject(s) (of {len(metrics)}) are left out of mIoU and AP50: a box that "
                  "is the whole image says nothing about layout.\n\n") if scenes else ""
    write_table("table1", table1, table1_columns + attention_columns + ["time_s", "memory_gib"],
                "Table 1: layout, identity and text metrics per method", hardware_note + MEMORY_NOTE + scene_note)
    # published reference rows (eval/published.py): a separate section of table1.md, never in the means or the csv
    published = published_markdown(benchmark)
    if published:
        written["table1"] += "\n" + published
        runfolder.atomic_write(out / "table1.md", lambda p: p.write_text(written["table1"]))
    ablation = metrics[metrics["n_subjects"] >= 3]
    table2 = method_table(ablation, detections, records, TABLE2, samples, ap_samples, seed, with_cost=False,
                          resample=resample)  # no rows: a CSV with its header
    note = mixed_hardware_note(hardware_kinds(records[records["n_subjects"] >= 3])) if len(ablation) else (
        "This run has no combination with 3 or more subjects, so Table 2 is empty.\n\n")
    write_table("table2", table2, TABLE2, "Table 2: ablation over the combinations with 3 or more subjects", note)
    published = published_markdown(benchmark, table="table2")
    if published:
        written["table2"] += "\n" + published
        runfolder.atomic_write(out / "table2.md", lambda p: p.write_text(written["table2"]))

    fig4 = by_subject_count(metrics, detections, FIG4, samples, ap_samples, seed, resample)
    runfolder.atomic_write(out / "fig4.csv", lambda p: fig4.to_csv(p, index=False))
    title = ("TINY RANDOM MODELS - " if tiny else "") + "metrics against the number of subjects"
    runfolder.atomic_write(out / "fig4.png", lambda p: plot_fig4(fig4, FIG4, p, title))

    reference = bootstrap.get("reference", "anyms")
    if reference in set(metrics["method"]):
        comparisons = comparison_table(metrics, reference, [c for c in TABLE1 if c != "ap50"], samples, seed, resample)
        runfolder.atomic_write(out / "comparisons.csv", lambda p: comparisons.to_csv(p, index=False))
        runfolder.atomic_write(out / "comparisons.md", lambda p: p.write_text(
            f"# Paired comparison with {reference}\n\n{(TINY_BANNER + chr(10) * 2) if tiny else ''}"
            f"{comparison_header(reference, resample, samples)}\n\n"
            f"{markdown(comparison_display(comparisons)) if len(comparisons) else '(no other method shares images with ' + reference + ')'}\n"))
        html_tables.append(html_table("comparisons", f"Paired comparison with {reference}", comparison_display(comparisons),
                                      {"difference [95% CI]": comparisons["difference"], "p": comparisons["p_value"],
                                       "p (Holm)": comparisons["p_holm"]}, comparison_header(reference, resample, samples)))

    overlap = overlap_table(records)
    runfolder.atomic_write(out / "overlap.csv", lambda p: overlap.to_csv(p, index=False))
    runfolder.atomic_write(out / "overlap.md", lambda p: p.write_text(
        "# Overlap share per combination\n\nFraction of boxed tokens covered by two or more boxes, at the model's "
        "finest and coarsest cross-attention grids: where it is 0 the full method and the w/o-crop-and-merge "
        f"ablation compute the same image.\n\n{markdown(overlap)}\n"))
    # issue 19: Table 3 and metric-human agreement when a study in the run folders has votes (eval/study/)
    from eval.study.analysis import report_hook
    report_hook(run_dirs, out, bootstrap, TINY_BANNER if tiny else "")

    # issue 18: the paper's comparison figures (eval/figures.py), named in report.json
    from eval.figures import write_figures
    drawn = write_figures(record_runs, metrics, out / "figures", figures, "TINY RANDOM MODELS - " if tiny else "")
    # last: its index lists the figures and files written above; pages per image link the run folders' images
    write_html_report(out, html_tables, metrics, detections, record_runs, stamp_lines, tiny)
    summary = {"runs": [str(d) for d in run_dirs], "tiny": tiny, "index": "index.html", "header": header, "bootstrap": dict(bootstrap),
               "split": bool(split), "provenance": prov, "hardware_kinds": kinds, "unscored_images": unscored, **runfolder.provenance(), "files": sorted({p.name for p in out.iterdir() if p.is_file()} | {"report.json"}),
               "folders": sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "logs")}
    summary["figures"] = {name: figure.summary(out) for name, figure in drawn.items()}
    if (out / "attention").is_dir():
        summary["attention_figures"] = sorted(p.name for p in (out / "attention").glob("*.png"))
    runfolder.write_json(out / "report.json", summary)
    if wandb_cfg and wandb_cfg.get("enabled"):
        from eval.wandb_log import log_report

        log_report(out, table1, table2, fig4, metrics, records, run_dirs, wandb_cfg, tiny, table1_columns)
    return summary


def overlap_table(records: pd.DataFrame) -> pd.DataFrame:
    if "overlap_shares" not in records:
        return pd.DataFrame(columns=["combination", "n_subjects"])
    rows = []
    for combo, g in records.groupby("combination", sort=True):
        shares = next((s for s in g["overlap_shares"] if isinstance(s, dict)), {})
        row = {"combination": combo, "n_subjects": int(g["n_subjects"].iloc[0])}
        row.update({f"overlap {grid}": round(v, 3) for grid, v in shares.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def sign_flip_test(values: np.ndarray, weights: np.ndarray, samples: int, seed: int) -> dict:
    """Two-sided paired test of ``sum(weights * values) == 0``: ``scipy.stats.permutation_test`` flipping the
    sign of each value independently (exact when 2**n <= ``samples``, else ``samples`` random flips and
    scipy's (count + 1) / (samples + 1), never 0). ``extreme``: how many null draws were at least as far out
    as the observed value in its nearer tail (0: the p-value is below the test's resolution, 1 / samples)."""
    from scipy import stats

    values, weights = np.asarray(values, float), np.asarray(weights, float)
    exact = 2.0 ** len(values) <= samples
    res = stats.permutation_test((values,), lambda d, axis=-1: np.sum(d * weights, axis=axis),
                                 permutation_type="samples", vectorized=True, n_resamples=samples,
                                 alternative="two-sided", rng=np.random.default_rng(seed))
    observed, null = float(res.statistic), np.asarray(res.null_distribution)
    gamma = abs(observed) * np.finfo(float).eps * 100  # scipy's own tolerance for ties
    extreme = int(min((null <= observed + gamma).sum(), (null >= observed - gamma).sum()))
    return {"p_value": float(res.pvalue), "p_extreme": extreme, "p_resamples": int(len(null)), "p_exact": bool(exact)}


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values of one family (NaN entries are not in the family, and stay NaN):
    sorted ascending, p_(i) x (m - i + 1), made non-decreasing, capped at 1."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def format_p(p: float, resamples: int, extreme: int | None = None) -> str:
    """A p-value as printed: ``< 1/B`` when no one of the B resamples was as extreme (never ``0``), else
    with as many decimals as B resolves (at least 3); ``n/a`` when undefined."""
    if p is None or not np.isfinite(p):
        return "n/a"
    resamples = max(int(resamples), 1)
    decimals = max(3, int(np.ceil(np.log10(resamples))))
    if extreme == 0 or p < 1 / resamples:
        return f"< {1 / resamples:.2g}"
    return f"{p:.{decimals}f}"


def paired_comparison(metrics: pd.DataFrame, reference: str, other: str, column: str, samples: int,
                      seed: int, resample: str = "two_level") -> dict | None:
    """``other - reference`` on the images both methods made for the same (combination, seed): the mean over
    combinations of the per-combination mean difference, its percentile bootstrap 95% interval drawn as
    :func:`combination_mean_bootstrap` draws (``resample``), and a two-sided p-value from
    :func:`sign_flip_test` at the same unit: the sign of each combination's mean difference (``two_level``;
    H0: the combinations' differences are symmetric about 0) or of each pair (``within_combinations``).
    No interval and no p-value (NaN) where the unit is single. ``None`` when the two methods share no
    (combination, seed)."""
    if column not in metrics:
        return None
    values = per_image(metrics[metrics["method"].isin([reference, other])], column)
    wide = values.pivot_table(index=["combination", "seed"], columns="method", values=column)
    if reference not in wide or other not in wide:
        return None
    diff = (wide[other] - wide[reference]).dropna().rename("diff").reset_index()
    if diff.empty:
        return None
    est = combination_mean_bootstrap(diff, "diff", samples, seed, resample)
    groups = [g["diff"].to_numpy(float) for _, g in diff.groupby("combination")]
    if resample == "two_level":
        units = np.array([g.mean() for g in groups])
        weights = np.full(len(units), 1 / len(units))
    else:
        units = np.concatenate(groups)
        weights = np.concatenate([np.full(len(g), 1 / (len(g) * len(groups))) for g in groups])
    test = (sign_flip_test(units, weights, samples, seed) if len(units) > 1 and samples
            else {"p_value": float("nan"), "p_extreme": None, "p_resamples": samples, "p_exact": False})
    return {"reference": reference, "method": other, "metric": column, "difference": est.mean, "lo": est.lo,
            "hi": est.hi, **test, "pairs": len(diff), "combinations": len(groups)}


def comparison_table(metrics: pd.DataFrame, reference: str, columns: Sequence[str], samples: int, seed: int,
                     resample: str = "two_level") -> pd.DataFrame:
    """Every other method minus ``reference`` on every column; ``p_holm``: Holm's adjustment over the whole
    table (methods x metrics: one family per report)."""
    rows = []
    for other in sorted(set(metrics["method"]) - {reference}):
        for col in columns:
            row = paired_comparison(metrics, reference, other, col, samples, seed, resample)
            if row is not None:
                rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["reference", "method", "metric", "difference", "lo", "hi", "p_value", "p_holm",
                                     "p_extreme", "p_resamples", "p_exact", "pairs", "combinations"])
    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc("p_value") + 1, "p_holm", holm(table["p_value"]))
    return table


def comparison_header(reference: str, resample: str, samples: int) -> str:
    unit = ("each combination's mean difference (H0: they are symmetric about 0; the combinations are the unit, as "
            "in the two-level interval)" if resample == "two_level" else
            "each (combination, seed) pair's difference (the combinations fixed)")
    return (f"Each method minus {reference} on the images both made for the same (combination, seed): mean over "
            f"combinations of the mean difference, with its percentile bootstrap 95% interval (bootstrap.resample="
            f"{resample}: {RESAMPLE[resample]}; {samples} resamples). p: two-sided sign-flip permutation test "
            f"(scipy.stats.permutation_test) flipping the sign of {unit}; exact when 2^n <= {samples}, else "
            f"{samples} random flips; '< {1 / max(samples, 1):.2g}' where none of them was as extreme, never 0. "
            "p (Holm): Holm-Bonferroni adjusted over this table's family (every method x metric). n/a: a single "
            f"unit ({NA_REASON[resample]}).")


def comparison_display(comparisons: pd.DataFrame) -> pd.DataFrame:
    """comparisons.md's columns: the difference with its interval, raw and Holm-adjusted p side by side."""
    def diff(d, lo, hi) -> str:
        return f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" if np.isfinite(lo) else f"{d:+.2f} [n/a]"

    return pd.DataFrame({
        "method": comparisons["method"], "metric": comparisons["metric"],
        "difference [95% CI]": [diff(*v) for v in zip(comparisons["difference"], comparisons["lo"], comparisons["hi"])],
        "p": [format_p(p, n, e) for p, n, e in zip(comparisons["p_value"], comparisons["p_resamples"], comparisons["p_extreme"])],
        "p (Holm)": [format_p(p, n) for p, n in zip(comparisons["p_holm"], comparisons["p_resamples"])],
        "pairs": comparisons["pairs"], "combinations": comparisons["combinations"],
    })
