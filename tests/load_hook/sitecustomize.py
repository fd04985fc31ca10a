"""A model-loading counter for subprocess tests (tests/test_bad_inputs.py): with ``ANYMS_LOAD_LOG=<file>`` and this
folder first on PYTHONPATH, every model load or build of the process appends a line to the file.

Counted: ``from_pretrained`` of diffusers' models and pipelines and of transformers' models, the construction of
any of their models (the tiny random models are built, then saved), ``torch.load``, safetensors' loaders and
open_clip's ``create_model``. Tokenizers are not models and are not counted. The libraries are patched when they are first imported
(an import hook), so a process that never imports them pays nothing.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

LOG = os.environ.get("ANYMS_LOAD_LOG")


def _record(what: str) -> None:
    with open(LOG, "a") as f:
        f.write(what + "\n")


def _wrap_function(owner, name: str, label: str) -> None:
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_load_hook", False):
        return

    def wrapper(*args, **kwargs):
        _record(label)
        return original(*args, **kwargs)

    wrapper._load_hook = True
    setattr(owner, name, wrapper)


def _wrap_classmethod(cls, label: str) -> None:
    original = cls.__dict__.get("from_pretrained")
    if original is None or getattr(original, "_load_hook", False):
        return
    func = original.__func__

    def from_pretrained(klass, *args, **kwargs):
        _record(f"{klass.__name__}.from_pretrained ({label})")
        return func(klass, *args, **kwargs)

    wrapped = classmethod(from_pretrained)
    from_pretrained._load_hook = True
    wrapped._load_hook = True
    cls.from_pretrained = wrapped


def _wrap_init(cls, label: str) -> None:
    """A model class built (its subclasses call this ``__init__``): the tiny random models are built, then saved."""
    original = cls.__init__
    if getattr(original, "_load_hook", False):
        return

    def __init__(self, *args, **kwargs):
        _record(f"{type(self).__name__} built ({label})")
        return original(self, *args, **kwargs)

    __init__._load_hook = True
    cls.__init__ = __init__


def _models(module, label: str) -> None:
    cls = getattr(module, "PreTrainedModel", None) or getattr(module, "ModelMixin")
    _wrap_classmethod(cls, label)
    _wrap_init(cls, label)


PATCHES = {
    "torch": lambda m: _wrap_function(m, "load", "torch.load"),
    "safetensors.torch": lambda m: (_wrap_function(m, "load_file", "safetensors.torch.load_file"),
                                    _wrap_function(m, "load", "safetensors.torch.load")),
    "safetensors": lambda m: _wrap_function(m, "safe_open", "safetensors.safe_open"),
    "transformers.modeling_utils": lambda m: _models(m, "transformers"),
    "diffusers.models.modeling_utils": lambda m: _models(m, "diffusers model"),
    "open_clip.factory": lambda m: _wrap_function(m, "create_model", "open_clip.create_model"),
    "diffusers.pipelines.pipeline_utils": lambda m: _wrap_classmethod(m.DiffusionPipeline, "diffusers pipeline"),
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a module in PATCHES so the patch runs once it is imported."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                original = spec.loader.exec_module

                def exec_module(module, original=original):
                    original(module)
                    PATCHES[name](module)

                spec.loader.exec_module = exec_module
                return spec
        return None


if LOG:
    sys.meta_path.insert(0, _AfterImport())
