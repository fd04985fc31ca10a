"""A study's votes -> Table 3 (each method's share of the votes per criterion, with a bootstrap interval over
participants), inter-rater agreement (Krippendorff's alpha) and metric-human agreement.

- **Share**: votes for the method / all votes of the criterion (a participant picking two images casts two votes),
  the paper's score. Interval: percentile bootstrap over participants (resampled with replacement, all of a
  participant's votes together).
- **Krippendorff's alpha** (``krippendorff`` package, nominal): per criterion, units are (case, method) pairs,
  a participant's value 1 if they picked that image, 0 if they answered the case without picking it, missing if
  they did not answer the case.
- **Metric-human agreement**: per case and criterion, each method's per-image metric (the mean over the image's
  subjects in ``metrics.parquet``; mIoU over the subjects in the layout) against its vote share in that case.
  ``top1``: the metric's best method is one the people preferred first (a method with the most votes; ties count);
  ``tau``: Kendall's tau-b (``scipy.stats.kendalltau``) between the metric and the shares, left out where either is
  constant. CLIP-T vs text alignment, mIoU and AP50 vs layout control, CLIP-I / DINO / DreamSim vs concept
  alignment. AP50 here is the image's own AP (pycocotools over that image's requested boxes and kept detections,
  ``detections.parquet``), since a case compares single images; it is coarse with few boxes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .build import load_study
from .store import VOTES_FILE, all_votes

METRIC_FOR = {"text_alignment": ["clip_t"], "layout_control": ["iou", "ap50"],
              "concept_alignment": ["clip_i", "dino", "dreamsim"]}
NAMES = {"concept_alignment": "Concept alignment", "text_alignment": "Text alignment",
         "layout_control": "Layout control", "overall_quality": "Overall quality",
         "clip_t": "CLIP-T", "iou": "mIoU", "ap50": "AP50 (per image)", "clip_i": "CLIP-I", "dino": "DINO", "dreamsim": "DreamSim"}


def votes_frame(study_dir) -> pd.DataFrame:
    rows = all_votes(study_dir)
    return pd.DataFrame(rows, columns=["participant", "case_id", "criterion", "method", "option", "time", "submission"])


def shares(votes: pd.DataFrame, methods, criteria) -> pd.DataFrame:
    """``[method x criterion]`` share of the votes (0 where a criterion has none)."""
    counts = votes.groupby(["criterion", "method"]).size().unstack(fill_value=0)
    counts = counts.reindex(index=list(criteria), columns=list(methods), fill_value=0)
    totals = counts.sum(axis=1).replace(0, np.nan)
    return counts.div(totals, axis=0).fillna(0.0).T


def table3(votes: pd.DataFrame, methods, criteria, samples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per method: ``<criterion>``, ``<criterion>_lo``, ``<criterion>_hi``, ``<criterion>_votes``."""
    point = shares(votes, methods, criteria)
    counts = votes.groupby(["method", "criterion"]).size().unstack(fill_value=0).reindex(
        index=list(methods), columns=list(criteria), fill_value=0)
    participants = sorted(votes["participant"].unique())
    rng = np.random.default_rng(seed)
    # per participant counts [participant, method, criterion], then resample participants
    cube = np.zeros((len(participants), len(methods), len(criteria)))
    pi = {p: i for i, p in enumerate(participants)}
    mi = {m: i for i, m in enumerate(methods)}
    ci = {c: i for i, c in enumerate(criteria)}
    for p, m, c in zip(votes["participant"], votes["method"], votes["criterion"]):
        if m in mi and c in ci:
            cube[pi[p], mi[m], ci[c]] += 1
    boot = np.full((samples, len(methods), len(criteria)), np.nan)
    if len(participants):
        for b in range(samples):
            draw = cube[rng.integers(0, len(participants), len(participants))].sum(axis=0)
            total = draw.sum(axis=0, keepdims=True)
            boot[b] = np.where(total > 0, draw / np.where(total > 0, total, 1), np.nan)
    rows = []
    for m in methods:
        row = {"method": m}
        for c in criteria:
            row[c] = float(point.loc[m, c])
            vals = boot[:, mi[m], ci[c]]
            vals = vals[~np.isnan(vals)]
            row[f"{c}_lo"], row[f"{c}_hi"] = ((float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5)))
                                              if len(vals) else (np.nan, np.nan))
            row[f"{c}_votes"] = int(counts.loc[m, c])
        rows.append(row)
    out = pd.DataFrame(rows)
    out["participants"] = len(participants)
    return out


def krippendorff_alpha(votes: pd.DataFrame, study: dict) -> pd.DataFrame:
    import krippendorff

    participants = sorted(votes["participant"].unique())
    units = [(c["id"], o["method"]) for c in study["cases"] for o in c["options"]]
    rows = []
    for criterion in study["criteria"]:
        v = votes[votes["criterion"] == criterion]
        answered = set(zip(v["participant"], v["case_id"]))
        picked = set(zip(v["participant"], v["case_id"], v["method"]))
        data = np.full((len(participants), len(units)), np.nan)
        for i, p in enumerate(participants):
            for j, (case_id, m) in enumerate(units):
                if (p, case_id) in answered:
                    data[i, j] = 1.0 if (p, case_id, m) in picked else 0.0
        pairable = int(((~np.isnan(data)).sum(axis=0) >= 2).sum())
        alpha = np.nan
        if len(participants) >= 2 and pairable and len(np.unique(data[~np.isnan(data)])) > 1:
            alpha = float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))
        rows.append({"criterion": criterion, "alpha": alpha, "raters": len(participants), "units": pairable})
    return pd.DataFrame(rows)


def _image_ap50(run_dir: str, layout_rows: pd.DataFrame, image: str, cache: dict) -> float:
    """The image's own AP50 from its run folder's detections.parquet; NaN where the run has none or the
    metrics lack the requested boxes."""
    from eval.layout_metrics import ap50, ap_images

    if run_dir not in cache:
        path = Path(run_dir) / "detections.parquet"
        cache[run_dir] = pd.read_parquet(path) if path.is_file() else None
    detections = cache[run_dir]
    need = {"req_x0", "req_y0", "req_x1", "req_y1", "phrase", "width", "height"}
    if detections is None or not len(layout_rows) or not need <= set(layout_rows.columns):
        return np.nan
    by_image = ap_images(layout_rows, detections, [image])
    return float(ap50([by_image[image]])) if image in by_image else np.nan


def image_metrics(study: dict) -> pd.DataFrame:
    """Per study option (case, method): the image's mean of each metric over its subjects (mIoU over the subjects
    in the layout), from the source run folders' ``metrics.parquet``; empty when none is evaluated."""
    parts, detections = {}, {}
    rows = []
    for case in study["cases"]:
        for o in case["options"]:
            d = o["run_dir"]
            if d not in parts:
                path = Path(d) / "metrics.parquet"
                parts[d] = pd.read_parquet(path) if path.is_file() else None
            m = parts[d]
            if m is None:
                continue
            sel = m[m["image"] == o["image"]]
            if not len(sel):
                continue
            row = {"case_id": case["id"], "method": o["method"]}
            for col in ("clip_t", "clip_i", "dino", "dreamsim"):
                if col in sel:
                    row[col] = float(pd.to_numeric(sel[col], errors="coerce").mean())
            lay = sel[sel["in_layout"].astype(bool)] if "in_layout" in sel else sel
            if "iou" in sel:
                row["iou"] = float(pd.to_numeric(lay["iou"], errors="coerce").mean()) if len(lay) else np.nan
            row["ap50"] = _image_ap50(d, lay, o["image"], detections)
            rows.append(row)
    return pd.DataFrame(rows)


def metric_agreement(votes: pd.DataFrame, study: dict, metrics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per case rows, summary rows per criterion and metric)."""
    from scipy.stats import kendalltau

    per_case = []
    if len(metrics):
        for case in study["cases"]:
            methods = [o["method"] for o in case["options"]]
            for criterion, cols in METRIC_FOR.items():
                v = votes[(votes["case_id"] == case["id"]) & (votes["criterion"] == criterion)]
                if not len(v):
                    continue
                counts = v.groupby("method").size().reindex(methods, fill_value=0)
                share = counts / counts.sum()
                preferred = set(share[share == share.max()].index)
                mc = metrics[metrics["case_id"] == case["id"]].set_index("method").reindex(methods)
                for col in cols:
                    if col not in mc or mc[col].isna().any():
                        continue
                    values = mc[col].astype(float)
                    best = set(values[values == values.max()].index)
                    tau = np.nan
                    if values.nunique() > 1 and share.nunique() > 1:
                        tau = float(kendalltau(values.to_numpy(), share.to_numpy()).statistic)
                    per_case.append({"case_id": case["id"], "combination": case["combination"], "seed": case["seed"],
                                     "criterion": criterion, "metric": col, "top1": bool(best & preferred),
                                     "tau": tau, "metric_best": ",".join(sorted(best)),
                                     "people_best": ",".join(sorted(preferred))})
    per_case = pd.DataFrame(per_case, columns=["case_id", "combination", "seed", "criterion", "metric", "top1",
                                               "tau", "metric_best", "people_best"])
    summary = []
    for (criterion, metric), g in per_case.groupby(["criterion", "metric"], sort=False):
        taus = g["tau"].dropna()
        summary.append({"criterion": criterion, "metric": metric, "cases": len(g), "top1_agreement": g["top1"].mean(),
                        "mean_tau": taus.mean() if len(taus) else np.nan, "tau_cases": len(taus)})
    return per_case, pd.DataFrame(summary, columns=["criterion", "metric", "cases", "top1_agreement", "mean_tau",
                                                    "tau_cases"])


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _f(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else fmt.format(x)


def write_study_report(study_dir: str | os.PathLike, out_dir: str | os.PathLike, samples: int = 1000, seed: int = 0,
                       tiny_banner: str = "") -> list[str]:
    """Writes table3.{md,csv,tex}, agreement.{md,csv} (and agreement_cases.csv) into ``out_dir``; returns the names.
    The published Table 3 is a separate section of table3.md, never in the csv or tex."""
    import runfolder
    from eval.published import published_markdown

    from .build import StudyError
    from .store import stored_study_id

    study = load_study(study_dir)
    bound = stored_study_id(study_dir)
    if bound not in (None, study["study_id"]):
        raise StudyError(f"{Path(str(study_dir)) / VOTES_FILE} holds the votes of another build of this study "
                         f"({bound}, the study is now {study['study_id']}): its votes name other cases or images")
    votes = votes_frame(study_dir)
    out = Path(str(out_dir))
    methods, criteria = study["methods"], study["criteria"]
    t3 = table3(votes, methods, criteria, samples, seed)
    alpha = krippendorff_alpha(votes, study) if len(votes) else pd.DataFrame(columns=["criterion", "alpha", "raters", "units"])
    per_case, summary = metric_agreement(votes, study, image_metrics(study))
    n_participants = int(votes["participant"].nunique()) if len(votes) else 0
    models = sorted({str(o.get("model") or "?") for c in study["cases"] for o in c["options"]})
    header = (f"{tiny_banner}Study `{study['name']}` ({study['study_id']}): {study['n_cases']} cases, "
              f"{n_participants} participants, {len(votes)} votes; each participant picks one or two images per "
              "case and criterion; share = the method's votes / all votes of the criterion; 95% bootstrap interval "
              f"over participants ({samples} resamples). Images made by: {', '.join(models)}.")
    shown = pd.DataFrame({"Method": t3["method"], **{NAMES[c]: [f"{_f(r[c])} [{_f(r[c + '_lo'])}, {_f(r[c + '_hi'])}]"
                                                                 for _, r in t3.iterrows()] for c in criteria}})
    alpha_md = _md(pd.DataFrame({"Criterion": [NAMES[c] for c in alpha["criterion"]],
                                 "Krippendorff's alpha": [_f(a, "{:.3f}") for a in alpha["alpha"]],
                                 "raters": alpha["raters"], "units": alpha["units"]})) if len(alpha) else "(no votes)"
    published = published_markdown("anyms11", table="table3")
    md = (f"# Table 3: user study (ours)\n\n{header}\n\n{_md(shown)}\n\n## Inter-rater agreement\n\nKrippendorff's "
          "alpha (nominal) per criterion; units are (case, method) pairs, 1 = picked, 0 = not picked.\n\n"
          f"{alpha_md}\n\n" + (published if published else ""))
    written = []
    runfolder.atomic_write(out / "table3.md", lambda p: p.write_text(md))
    runfolder.atomic_write(out / "table3.csv", lambda p: t3.to_csv(p, index=False))
    cols = "l" + "c" * len(criteria)
    tex_rows = "\n".join(f"{r['method'].replace('_', chr(92) + '_')} & " + " & ".join(f"{r[c]:.2f}" for c in criteria)
                         + r" \\" for _, r in t3.iterrows())
    tex = (f"% {header}\n\\begin{{table}}[t]\\centering\n\\begin{{tabular}}{{{cols}}}\n\\toprule\nMethod & "
           + " & ".join(NAMES[c] for c in criteria) + r" \\" + "\n\\midrule\n" + tex_rows
           + f"\n\\bottomrule\n\\end{{tabular}}\n\\caption{{User study: share of votes ({n_participants} participants, "
           f"{study['n_cases']} cases).}}\n\\end{{table}}\n")
    runfolder.atomic_write(out / "table3.tex", lambda p: p.write_text(tex))
    written += ["table3.md", "table3.csv", "table3.tex"]
    runfolder.atomic_write(out / "agreement.csv", lambda p: summary.to_csv(p, index=False))
    runfolder.atomic_write(out / "agreement_cases.csv", lambda p: per_case.to_csv(p, index=False))
    agree_shown = pd.DataFrame({"Criterion": [NAMES[c] for c in summary["criterion"]],
                                "Metric": [NAMES[m] for m in summary["metric"]], "cases": summary["cases"],
                                "top-1 agreement": [_f(x) for x in summary["top1_agreement"]],
                                "mean Kendall tau": [_f(x) for x in summary["mean_tau"]],
                                "cases with tau": summary["tau_cases"]})
    agreement_md = (f"# Metric-human agreement\n\n{header}\n\nPer case and criterion: top-1 agreement = share of cases "
                    "where the metric's best method is one the people preferred first (most votes; ties count); "
                    "Kendall's tau-b between the metric and the vote shares over the case's methods (left out where "
                    "either is constant), averaged over cases. AP50 is each image's own AP (its requested boxes and "
                    "kept detections), coarse with few boxes.\n\n" + (_md(agree_shown) if len(summary) else
                                   "(no metrics.parquet in the study's run folders, or no votes)") +
                    f"\n\n## Inter-rater agreement\n\n{alpha_md}\n")
    runfolder.atomic_write(out / "agreement.md", lambda p: p.write_text(agreement_md))
    written += ["agreement.md", "agreement.csv", "agreement_cases.csv"]
    return written


def study_dirs_with_votes(run_dirs) -> list[Path]:
    """The studies (``<run_dir>/study*/``) of the run folders that hold votes: the report hook's input."""
    found = []
    for d in run_dirs:
        for s in sorted(Path(str(d)).glob("study*")):
            if (s / "study.json").is_file() and (s / VOTES_FILE).is_file() and all_votes(s):
                found.append(s)
    return found


def report_hook(run_dirs, out_dir, bootstrap: dict | None = None, tiny_banner: str = "") -> list[str]:
    """Called by ``eval.report.run_report``: for every study with votes in the run folders, Table 3 and the
    agreement tables into ``out_dir`` (one study) or ``out_dir/<study folder>/`` (several). Returns the names."""
    studies = study_dirs_with_votes(run_dirs)
    bootstrap = dict(bootstrap or {})
    written = []
    for s in studies:
        target = Path(str(out_dir)) if len(studies) == 1 else Path(str(out_dir)) / s.name
        files = write_study_report(s, target, int(bootstrap.get("samples", 1000)), int(bootstrap.get("seed", 0)),
                                   tiny_banner + ("\n\n" if tiny_banner else ""))
        written += files if len(studies) == 1 else [f"{s.name}/{f}" for f in files]
    return written
