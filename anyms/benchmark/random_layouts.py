"""Layouts of 2 to 7 subjects drawn reproducibly from the DreamBench pool: the scaling study beyond the
paper (``conf/benchmark/subjects.yaml``, ``+experiment=subjects``).

A benchmark generator (see ``anyms.benchmark``): returns the same mapping a literal ``combinations:``
holds. Subjects come from ``<data_root>/dreambench`` with their class words from the dataset's own
``prompts_and_classes.txt``; a few generic classes ("toy", "stuffed animal") get the more specific
detection phrase our 11 combinations use, and no layout repeats a phrase (a detector could not tell two
"toy"s apart). Boxes: the width is cut into one slot per subject at random, each box sits in its slot
(``overlap: false``, boxes never share area) or reaches into its neighbours' slots (``overlap: true``).
"""

from __future__ import annotations

import random
from pathlib import Path

# the phrases anyms11.yaml uses, where DreamBench's class word is too generic for a detector
SPECIFIC_PHRASES = {
    "bear_plushie": "teddy bear", "grey_sloth_plushie": "sloth plushie", "wolf_plushie": "wolf plushie",
    "duck_toy": "duck toy", "monster_toy": "monster toy", "poop_emoji": "poop emoji toy", "rc_car": "toy car",
    "red_cartoon": "red cartoon character", "robot_toy": "robot toy", "pink_sunglasses": "sunglasses",
}


def dreambench_phrases(data_root: Path) -> dict[str, str]:
    """Subject folder -> detection phrase, from the dataset's class list (refined by SPECIFIC_PHRASES)."""
    listing = Path(data_root) / "dreambench" / "prompts_and_classes.txt"
    phrases = {}
    if listing.exists():
        for line in listing.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0] and parts[0] != "subject_name" and (listing.parent / parts[0]).is_dir():
                phrases[parts[0]] = SPECIFIC_PHRASES.get(parts[0], parts[1])
    else:  # a copy without the class list: the folder names, as words
        folder = Path(data_root) / "dreambench"
        for sub in sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
            phrases[sub] = SPECIFIC_PHRASES.get(sub, sub.rstrip("0123456789").replace("_", " "))
    return phrases


def _boxes(rng: random.Random, n: int, overlap: bool) -> list[list[float]]:
    cuts = sorted(rng.uniform(0.0, 1.0) for _ in range(n - 1))
    edges = [0.0, *cuts, 1.0]
    # keep every slot at least 1/(2n) wide, so no box is a sliver
    widths = [max(b - a, 0.5 / n) for a, b in zip(edges, edges[1:])]
    total = sum(widths)
    edges = [0.0]
    for w in widths:
        edges.append(edges[-1] + w / total)
    boxes = []
    for i in range(n):
        left, right = edges[i], edges[i + 1]
        pad = 0.08 * (right - left)
        x0, x1 = left + pad * rng.random(), right - pad * rng.random()
        if overlap:  # reach a quarter of the way into each neighbour's slot (never past it: no nesting)
            if i > 0:
                x0 = max(0.0, x0 - 0.25 * (left - edges[i - 1]))
            if i < n - 1:
                x1 = min(1.0, x1 + 0.25 * (edges[i + 2] - right))
        y0 = rng.uniform(0.05, 0.45)
        y1 = rng.uniform(max(y0 + 0.3, 0.6), 0.98)
        boxes.append([round(x0, 3), round(y0, 3), round(x1, 3), round(y1, 3)])
    return boxes


def _prompt(phrases: list[str]) -> str:
    items = [p if p.endswith("glasses") else f"a {p}" for p in phrases]  # "sunglasses", not "a sunglasses"
    return f"a photo of {', '.join(items[:-1])} and {items[-1]}"


def combinations(data_root, sizes=(2, 3, 4, 5, 6, 7), per_size: int = 3, seed: int = 0,
                 overlap: bool = False) -> dict[str, dict]:
    """``per_size`` layouts for each subject count in ``sizes``; the same arguments give the same layouts."""
    phrases = dreambench_phrases(Path(data_root))
    pool = sorted(phrases)
    out = {}
    for n in sizes:
        rng = random.Random(f"{seed}-{n}")  # each size its own stream: adding a size changes no other
        distinct = len(set(phrases.values()))
        if n > distinct:
            raise ValueError(f"subjects: {n} subjects need {n} distinct phrases, the pool has {distinct}")
        for i in range(per_size):
            chosen, used = [], set()
            for name in rng.sample(pool, len(pool)):
                if phrases[name] not in used:
                    chosen.append(name)
                    used.add(phrases[name])
                if len(chosen) == n:
                    break
            out[f"n{n}-{i:02d}{'o' if overlap else ''}"] = {
                "prompt": _prompt([phrases[c] for c in chosen]),
                "subjects": [{"name": c, "image": f"dreambench/{c}", "phrase": phrases[c]} for c in chosen],
                "boxes": _boxes(rng, n, overlap),
            }
    return out
