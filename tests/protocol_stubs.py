"""A detector and a segmenter with known answers, for protocol tests: the detector returns the detections it
is given for an image of a given size (scores and phrase scores chosen by the test) and applies the real
threshold rule; the segmenter's mask of a box is the box itself."""

from __future__ import annotations

import numpy as np

from eval.grounding import Detection, Detector, box_to_pixels


class FixedDetector(Detector):
    def __init__(self, answers: dict):
        super().__init__(box_threshold=0.35, text_threshold=0.25)
        # "WxH" -> [{"phrase", "box", "score", "phrase_score"}]; any other size: the whole image, first phrase
        self.answers = {k: [dict(d) for d in v] for k, v in dict(answers).items()}

    def _predict(self, image, caption):  # not used: detect answers from the table
        raise NotImplementedError

    def detect(self, image, phrases, box_threshold=None, text_threshold=None):
        box_threshold = self.box_threshold if box_threshold is None else box_threshold
        text_threshold = self.text_threshold if text_threshold is None else text_threshold
        key = f"{image.width}x{image.height}"
        given = self.answers.get(key, [{"phrase": phrases[0], "box": (0, 0, 1, 1), "score": 1.0, "phrase_score": 1.0}])
        out = []
        for d in given:
            if d["phrase"] in phrases and d["score"] >= box_threshold and d["phrase_score"] > text_threshold:
                out.append(Detection(tuple(d["box"]), float(d["score"]), list(phrases).index(d["phrase"]), d["phrase"],
                                     float(d["phrase_score"])))
        return sorted(out, key=lambda d: -d.score)


class BoxSegmenter:
    def segment(self, image, boxes):
        masks = np.zeros((len(boxes), image.height, image.width), dtype=bool)
        for k, box in enumerate(boxes):
            left, top, right, bottom = box_to_pixels(box, image.width, image.height)
            masks[k, top:bottom, left:right] = True
        return masks
