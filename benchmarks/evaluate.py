"""Evaluation cost per generated image against generation cost per image, on the same device.

The evaluators are the real classes of ``eval/`` with the real architectures and **random weights** (none
is downloaded): GroundingDINO SwinT (transformers' ``GroundingDinoForObjectDetection`` with the config of
``IDEA-Research/grounding-dino-tiny``, image processor at 800/1333 px), SAM ViT-H, CLIP ViT-B/32, DINO
ViT-S/16 and DreamSim's ensemble (three ViT-B/16). CLIP, DINO and DreamSim are written once as random
checkpoints under ``<paths.cache_dir>/bench_evaluators`` ($ANYMS_CACHE, else ``~/.cache/anyms``) and loaded by the scorers'
own loading code; GroundingDINO and SAM are built in memory and put into the real detector and segmenter
classes (only their file loading is skipped).

One image is scored once (every part costs seconds to minutes here: one run, no repeats) with
:func:`eval.evaluate.score_image`, the evaluation stage's own per-image function, every metric: one detector
call with all phrases, SAM with all boxes in one prompt, the identity metrics on each subject's crop against
reference embeddings computed beforehand (once per subject per run, as the stage caches them, so not part of
the per-image cost; here the references are used whole, as the stage does where nothing is detected), CLIP-T.
With random weights GroundingDINO detects noise, so the detector runs its full forward pass and attribution
and then reports the requested boxes: SAM, the crops and the identity metrics then do the work a real
detection causes.

How the cost grows with n subjects: an added subject adds its crop through the three identity models
(timed on the image's crops); the detector's caption grows by a few tokens against ~20k image tokens and
SAM's decoder takes milliseconds a box, both left in the constant part. So ``seconds_per_image(n)`` is the
full score at ``n_full`` subjects plus ``(n - n_full)`` times the identity cost of one crop. The image is
1024 px; GroundingDINO and SAM resize to their own input sizes, so the cost is the same at 512 px.

Generation per image = the number of denoising steps (30, the paper's setting) times one UNet step with
CFG and AnyMS (:mod:`benchmarks.unet_step`), leaving out the VAE decode and the text and image encoders: a
lower bound of generation, so the ratio is an upper bound.

    python -m benchmarks.evaluate [--subjects 2,3,5,7] [--step-seconds sdxl-1024px=75]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO, cache_root, log, resolve_device
from eval.grounding import Detection, Detector, HFGroundingDino, SamSegmenter

STEPS = 30  # the paper's denoising steps
IMAGE_SIZE = 1024
SUBJECT_COUNTS = (2, 3, 5, 7)
RANDOM_NOTE = "real-size architectures with random weights (fine for timing)"


# ------------------------------------------------------------------------------------------- evaluators


def real_size_evaluators(device: str, words) -> tuple:
    """(detector, segmenter, scorers) at the real sizes with random weights."""
    from eval.similarity import ClipScorer, DinoScorer, DreamSimScorer

    root = write_random_scorer_checkpoints(cache_root() / "bench_evaluators")
    log("  building GroundingDINO SwinT and SAM ViT-H (random weights)")
    detector = RandomGroundingDino(device, words)
    segmenter = RandomSam("vit_h", device)
    scorers = {
        "clip": ClipScorer(f"local-dir:{root / 'open_clip'}", pretrained=None, device=device),
        "dino": DinoScorer(str(root / "dinov2-small"), backend="dinov2", device=device),  # eval=default's DINO
        "dreamsim": DreamSimScorer("ensemble", cache_dir=root / "dreamsim", device=device),
    }
    return detector, segmenter, scorers


def write_random_scorer_checkpoints(root: Path) -> Path:
    """Random CLIP ViT-B/32, DINOv2 ViT-S/14 (eval=default), DINO ViT-S/16 (eval=msbench) and DreamSim ensemble
    checkpoints in the layouts the scorers read, written once (about 2 GB; tens of seconds the first time)."""
    import shutil

    from eval.tiny_models import write_dreamsim_checkpoints, write_tiny_dino, write_tiny_dinov2, write_tiny_open_clip
    from runfolder import write_folder_once

    parts = ("open_clip", "dinov2-small", "dino-vits16", "dreamsim")
    if (root / ".complete").exists() and not all((root / p).exists() for p in parts):
        shutil.rmtree(root)  # written by an older version with fewer checkpoints

    def write(tmp: Path) -> None:
        log(f"  writing random real-size CLIP, DINOv2, DINO and DreamSim checkpoints to {root} (once)")
        write_tiny_open_clip(tmp / "open_clip", real_size=True)
        write_tiny_dinov2(tmp / "dinov2-small", real_size=True)
        write_tiny_dino(tmp / "dino-vits16", real_size=True)
        write_dreamsim_checkpoints(tmp / "dreamsim", "ensemble")

    return write_folder_once(root, write, "random real-size evaluator checkpoints for benchmarks/evaluate.py")


class RandomGroundingDino(HFGroundingDino):
    """:class:`eval.grounding.HFGroundingDino` (its processor call, forward pass and phrase attribution) on
    a model built from the ``grounding-dino-tiny`` config with random weights instead of loaded; the
    tokenizer is a BERT tokenizer over the benchmark's words (token ids never change the cost)."""

    def __init__(self, device: str, words):
        from transformers import (
            BertTokenizer,
            GroundingDinoConfig,
            GroundingDinoForObjectDetection,
            GroundingDinoImageProcessor,
            GroundingDinoProcessor,
        )

        from eval.tiny_grounding import DEFAULT_WORDS, write_bert_vocab

        Detector.__init__(self)  # thresholds; HFGroundingDino.__init__ would load from files
        self.model_id_or_path = "random grounding-dino-tiny"
        self.device = torch.device(device)
        with tempfile.TemporaryDirectory() as tmp:
            vocab = write_bert_vocab(Path(tmp) / "vocab.txt", tuple(DEFAULT_WORDS) + tuple(words))
            tokenizer = BertTokenizer(vocab=str(vocab))
        self.processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer)
        torch.manual_seed(0)
        self.model = GroundingDinoForObjectDetection(GroundingDinoConfig()).to(self.device).eval()


class RandomSam(SamSegmenter):
    """:class:`eval.grounding.SamSegmenter` (``SamPredictor`` with box prompts) on segment-anything's own
    ``sam_model_registry[model_type]`` built without a checkpoint (random weights)."""

    def __init__(self, model_type: str, device: str):
        from segment_anything import SamPredictor, sam_model_registry

        torch.manual_seed(0)
        self.model_type, self.checkpoint, self.device = model_type, None, torch.device(device)
        self.predictor = SamPredictor(sam_model_registry[model_type](checkpoint=None).to(self.device).eval())


def tiny_evaluators(words) -> tuple:
    """(detector, segmenter, scorers) of ``eval=tiny`` (conf/eval/tiny.yaml), for ``--smoke``."""
    from omegaconf import OmegaConf

    from eval.evaluate import KNOWN_METRICS, load_evaluators

    default = OmegaConf.load(REPO / "conf" / "eval" / "default.yaml")
    tiny = OmegaConf.load(REPO / "conf" / "eval" / "tiny.yaml")
    tiny.pop("defaults")
    cfg = OmegaConf.merge(default, tiny)
    cfg.tiny_root = str(cache_root() / "tiny_eval")
    return load_evaluators(cfg, list(KNOWN_METRICS))  # sets torch's threads to the config's (1)


class RequestedBoxes:
    """A detector that runs ``detector.detect`` in full (the measured cost) and then reports ``boxes``, the
    requested boxes of the image being scored, one per phrase (random weights would detect noise)."""

    def __init__(self, detector):
        self.detector = detector
        self.boxes: dict[str, tuple] = {}

    def detect(self, image, phrases, box_threshold=None, text_threshold=None):
        self.detector.detect(image, phrases, box_threshold, text_threshold)
        return [Detection(box=tuple(self.boxes[p]), score=0.9, phrase_index=i, phrase=p, phrase_score=0.9)
                for i, p in enumerate(phrases) if p in self.boxes]


# ------------------------------------------------------------------------------------------- one image


def _random_image(size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _record(n: int, references: list[str]) -> dict:
    from benchmarks.attention import LAYOUT_BOXES

    subjects = [{"name": f"s{i}", "phrase": phrase, "box": list(box), "role": role, "references": [references[i]]}
                for i, (phrase, box, role) in enumerate(LAYOUT_BOXES[n])]
    return {"image": f"bench/{n}.png", "combination": f"bench{n}", "method": "anyms", "seed": 0, "n_subjects": n,
            "width": IMAGE_SIZE, "height": IMAGE_SIZE, "prompt": "a photo of " + " and ".join(s["phrase"] for s in subjects),
            "subjects": subjects}


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(counts=SUBJECT_COUNTS, n_full: int = 3, device: str = "auto", smoke: bool = False) -> dict:
    """Seconds per image for each n (see the module docstring) and its parts."""
    threads = torch.get_num_threads()  # the tiny evaluators' config sets 1
    try:
        return _measure(counts, n_full, resolve_device(device), smoke)
    finally:
        torch.set_num_threads(threads)


def _measure(counts, n_full: int, device: str, smoke: bool) -> dict:
    from omegaconf import OmegaConf

    from benchmarks.attention import LAYOUT_BOXES
    from eval.evaluate import KNOWN_METRICS, _embed, score_image
    from eval.grounding import subject_crop

    counts = sorted(set(counts) | {n_full})
    words = sorted({w for n in counts for phrase, _, _ in LAYOUT_BOXES[n] for w in phrase.split()})
    metrics = list(KNOWN_METRICS)
    cfg = OmegaConf.load(REPO / "conf" / "eval" / "default.yaml")
    thresholds = OmegaConf.create({k: cfg[k] for k in ("box_threshold", "text_threshold", "ap_box_threshold")})
    t_build, (detector, segmenter, scorers) = _timed(lambda: tiny_evaluators(words) if smoke
                                                     else real_size_evaluators(device, words))
    log(f"  evaluators ready in {t_build:.0f} s")
    detector = RequestedBoxes(detector)
    size = 128 if smoke else IMAGE_SIZE
    image = _random_image(size, 0)
    record = _record(n_full, [f"reference {i}" for i in range(n_full)])
    detector.boxes = {s["phrase"]: s["box"] for s in record["subjects"]}
    refs = ReferencesAsGiven(scorers, metrics, {f"reference {i}": _random_image(size // 2, i + 1) for i in range(n_full)})
    # once per subject per run, not per image (and the identity models' warm-up)
    t_refs, _ = _timed(lambda: [refs.embeddings(s["references"], s["phrase"]) for s in record["subjects"]])
    log(f"  reference embeddings of {n_full} subjects: {t_refs:.1f} s (once per subject per run)")
    t_full, _ = _timed(lambda: score_image(record, image, detector, segmenter, scorers, refs, thresholds, metrics))
    log(f"  one image, {n_full} subjects, every metric: {t_full:.1f} s")
    # what an added subject adds: its crop through the three identity models (SAM's decoder, milliseconds a
    # box, and the detector's few more caption tokens are left in the constant part)
    crops = [subject_crop(image, None, s["box"]) for s in record["subjects"]]
    t_crops, _ = _timed(lambda: [_embed(scorers, m, crops) for m in ("clip_i", "dino", "dreamsim")])
    per_subject = t_crops / n_full
    per_image = {n: t_full + (n - n_full) * per_subject for n in counts}
    log("  " + ", ".join(f"n={n}: {per_image[n]:.1f} s" for n in counts) + f" per image ({per_subject:.1f} s a subject)")
    return {"seconds_per_image": per_image, "n_full": n_full, "full_seconds": t_full, "reference_seconds": t_refs,
            "seconds_per_subject": per_subject, "build_seconds": t_build, "image_size": size,
            "models": "the tiny evaluators of eval=tiny" if smoke else
            "GroundingDINO SwinT (grounding-dino-tiny config), SAM ViT-H, CLIP ViT-B/32, DINOv2 ViT-S/14, DreamSim ensemble",
            "note": "tiny random models: checks the code paths, measures nothing" if smoke else RANDOM_NOTE}


class ReferencesAsGiven:
    """:class:`eval.evaluate.ReferenceCache` for references given as images and used whole (as the cache
    does with a reference where nothing is detected): each embedded once per subject, like the real cache."""

    def __init__(self, scorers, metrics, images: dict):
        from eval.evaluate import ReferenceCache

        self._cache = ReferenceCache(None, None, scorers, metrics, None, None)
        self._cache.crop = lambda path, phrase: images[path]

    def embeddings(self, paths, phrase):
        return self._cache.embeddings(paths, phrase)


def rows(measured: dict, generation_seconds_per_step: dict[str, float], steps: int = STEPS) -> list[dict]:
    """``{model, n, seconds_per_image, generation_seconds_per_image, ratio_to_generation}`` for each
    generation model (``{"sdxl-1024px": seconds per UNet step, ...}``) and n."""
    out = []
    for model, step_s in generation_seconds_per_step.items():
        generation = steps * step_s
        for n, seconds in measured["seconds_per_image"].items():
            out.append({"model": model, "n": n, "seconds_per_image": round(seconds, 3),
                        "generation_seconds_per_image": round(generation, 2),
                        "ratio_to_generation": round(seconds / generation, 5)})
    return out


def markdown(result_rows: list[dict], measured: dict) -> str:
    lines = [f"Evaluation per image ({measured['models']}; {measured['note']}) against generation per image "
             f"({STEPS} UNet steps with CFG and AnyMS, VAE and encoders left out: a lower bound).", "",
             "| generation model | n | evaluation s / image | generation s / image | evaluation / generation |",
             "|---|---|---|---|---|"]
    for r in result_rows:
        lines.append(f"| {r['model']} | {r['n']} | {r['seconds_per_image']:.1f} | {r['generation_seconds_per_image']:.0f} | "
                     f"{100 * r['ratio_to_generation']:.1f}% |")
    lines += ["", f"Reference embeddings (once per subject per run, not per image): {measured['reference_seconds']:.1f} s "
              f"for {measured['n_full']} subjects."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", default=",".join(map(str, SUBJECT_COUNTS)))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="the tiny evaluators: checks the code paths")
    parser.add_argument("--step-seconds", action="append", default=[], metavar="MODEL=SECONDS",
                        help="generation: seconds per UNet step, e.g. sdxl-1024px=75 (repeatable)")
    args = parser.parse_args(argv)
    measured = measure([int(n) for n in args.subjects.split(",")], device=args.device, smoke=args.smoke)
    steps = dict(s.split("=") for s in args.step_seconds) or {"(no generation given)": 1.0}
    print(markdown(rows(measured, {k: float(v) for k, v in steps.items()}), measured))


if __name__ == "__main__":
    main()
