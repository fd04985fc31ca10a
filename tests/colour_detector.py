"""A detector with a known answer: each phrase is a flat colour, its box the bounding box of the pixels
of that colour. Plugged into the evaluation through the same interface as GroundingDINO."""

from __future__ import annotations

import numpy as np

from eval.grounding import Detection, Detector


class ColourDetector(Detector):
    def __init__(self, colours: dict, tolerance: int = 10):
        super().__init__(box_threshold=0.35, text_threshold=0.25)
        self.colours = {k: np.asarray(v) for k, v in dict(colours).items()}
        self.tolerance = tolerance

    def _predict(self, image, caption):  # not used: detect is answered from the pixels directly
        raise NotImplementedError

    def detect(self, image, phrases, box_threshold=None, text_threshold=None):
        pixels = np.asarray(image.convert("RGB")).astype(int)
        h, w = pixels.shape[:2]
        out = []
        for i, phrase in enumerate(phrases):
            if phrase not in self.colours:
                continue
            hit = (np.abs(pixels - self.colours[phrase]).max(axis=-1) <= self.tolerance)
            if not hit.any():
                continue
            rows, cols = np.nonzero(hit)
            box = (cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h)
            out.append(Detection(box=box, score=1.0, phrase_index=i, phrase=phrase))
        return out
