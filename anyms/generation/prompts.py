"""Prompts against the token limits of the chosen model's text encoders (issue 32), before any model loads.

A CLIP text encoder sees 77 tokens, BOS and EOS included; the pipeline cuts a longer prompt there, silently (and
CLIP's own warning is hidden by the quiet terminal). A subject phrase past the limit loses its text
conditioning: that is an error naming the combination, the phrase and the limit, unless
``generation.truncate_prompt=true`` allows it (then a warning). A prompt over the limit whose phrases all fit
gets one warning naming the words cut off.

Only the tokenizers are read here (a vocabulary and merge rules from the model's ``tokenizer*/`` folders, or the
hub's cache), not any weights: the "nothing loads before the checks" rule is about models, and a tokenizer is
what the checks need. A tiny model not written yet uses CLIP's tokenizer, which its loader will write.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from anyms.methods.base import GenerationConfigError

log = logging.getLogger(__name__)


@dataclass
class TextEncoderTokenizer:
    field: str       # the config field naming where it comes from (model.pretrained, method.weights.<m>.repo)
    repo: str        # hub id or local folder
    subfolder: str   # tokenizer, tokenizer_2
    tokenizer: Any

    @property
    def limit(self) -> int:
        return int(self.tokenizer.model_max_length)


def _tokenizer_class(folder: Path | None):
    """The class the tokenizer's own ``tokenizer_config.json`` names (CLIP for every model here)."""
    import transformers

    name = "CLIPTokenizer"
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        try:
            name = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class") or name
        except (OSError, ValueError):
            pass
    cls = getattr(transformers, name, None) or getattr(transformers, name.removesuffix("Fast"), None)
    return cls or transformers.CLIPTokenizer


def load_tokenizer(field: str, repo: str, subfolder: str, tiny: bool) -> TextEncoderTokenizer:
    """One text encoder's tokenizer; :class:`GenerationConfigError` naming the field when it cannot be read."""
    from anyms.methods.loading import how_to_get

    local = Path(repo).expanduser()
    folder = local / subfolder
    if tiny and not folder.is_dir():
        # the tiny models are written by their loader, with CLIP's tokenizer (anyms.tiny.clip_tokenizer)
        from anyms.tiny import clip_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            return TextEncoderTokenizer(field, repo, subfolder, clip_tokenizer(tmp))
    if local.exists() and not folder.is_dir():
        raise GenerationConfigError(f"{field}: {repo} has no {subfolder}/ folder (the text encoder's tokenizer); "
                                    "point it at a diffusers pipeline folder (one with model_index.json)")
    cls = _tokenizer_class(folder if folder.is_dir() else None)
    try:
        tokenizer = cls.from_pretrained(str(local) if local.exists() else repo, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise GenerationConfigError(
            f"{field}: cannot read the tokenizer {subfolder}/ of {repo}: {how_to_get(field, repo)} "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    return TextEncoderTokenizer(field, repo, subfolder, tokenizer)


def text_encoder_tokenizers(method_cls, method: dict, model: dict) -> list[TextEncoderTokenizer]:
    """The tokenizers of every text encoder the method's prompt goes through."""
    tiny = bool(model.get("tiny"))
    return [load_tokenizer(field, repo, sub, tiny) for field, repo, sub in method_cls.text_encoders(method, model)]


def _find(ids: Sequence[int], part: Sequence[int]) -> int | None:
    n = len(part)
    return next((i for i in range(len(ids) - n + 1) if n and list(ids[i:i + n]) == list(part)), None)


def check_prompts(combos, encoders: Sequence[TextEncoderTokenizer], model_name: str, benchmark: str,
                  truncate: bool) -> list[str]:
    """Each combination's prompt against each text encoder's limit. Raises :class:`GenerationConfigError` for a
    subject phrase past the limit (unless ``truncate``); returns the warnings to log: per combination, one per
    phrase cut off (with ``truncate``) and one naming the words cut off, each naming the encoders alike."""
    warnings_out: list[str] = []
    for combo in combos:
        phrases: dict[tuple[str, int, int], list[TextEncoderTokenizer]] = {}  # (phrase, limit, length) -> encoders
        cut: dict[tuple[int, str], list[TextEncoderTokenizer]] = {}  # (limit, words cut off) -> encoders
        for enc in encoders:
            tok, limit = enc.tokenizer, enc.limit
            ids = tok(combo.prompt, truncation=False, verbose=False).input_ids
            if len(ids) <= limit:
                continue
            kept = limit - 1  # positions 0 .. limit-2 keep their tokens; EOS takes the last place
            for s in combo.layout:
                phrase_ids = tok(s.phrase, add_special_tokens=False).input_ids
                start = _find(ids, phrase_ids)
                if start is not None and start + len(phrase_ids) > kept:
                    phrases.setdefault((s.phrase, limit, len(ids)), []).append(enc)
            words = tok.decode(ids[kept:-1]).strip()  # the content tokens past the limit (the last id is EOS)
            cut.setdefault((limit, words), []).append(enc)
        for (phrase, limit, length), encs in phrases.items():
            message = (f"benchmark {benchmark}, combination {combo.id}: the subject phrase {phrase!r} lies past the "
                       f"{limit}-token limit (BOS/EOS included) of model {model_name}'s text encoder ({_names(encs)}; "
                       f"the prompt has {length} tokens), so it gets no text conditioning")
            if not truncate:
                raise GenerationConfigError(
                    f"{message}; shorten benchmark.combinations.{combo.id}.prompt to {limit} tokens, or set "
                    "generation.truncate_prompt=true to generate it cut off")
            warnings_out.append(message + " (generation.truncate_prompt=true)")
        for (limit, words), encs in cut.items():
            warnings_out.append(f"benchmark {benchmark}, combination {combo.id}: the prompt is longer than the {limit} "
                                f"tokens of model {model_name}'s text encoder ({', '.join(e.subfolder for e in encs)}); "
                                f"cut off: {words!r}")
    return warnings_out


def _names(encs: Sequence[TextEncoderTokenizer]) -> str:
    """``tokenizer, tokenizer_2 of model.pretrained=<repo>``: the encoders, grouped by where they come from."""
    by_source: dict[tuple[str, str], list[str]] = {}
    for e in encs:
        by_source.setdefault((e.field, e.repo), []).append(e.subfolder)
    return "; ".join(f"{', '.join(subs)} of {field}={repo}" for (field, repo), subs in by_source.items())
