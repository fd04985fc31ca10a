"""CLIP's real BPE tokenizer files, rebuilt offline from the vocabulary open_clip ships.

Shared by both wings' tiny models (anyms.tiny: the text encoders' tokenizer; eval.tiny_models: the
transformers CLIP used as torchmetrics' oracle), which must not import each other.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable unicode map (the GPT-2 BPE convention)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Writes CLIP's real 49,408-token BPE tokenizer (vocab.json, merges.txt) rebuilt from the vocabulary
    file open_clip ships, so ``CLIPTokenizer.from_pretrained(folder)`` works offline with CLIP's ids."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is needed for CLIP's BPE vocabulary: pip install open_clip_torch")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder
