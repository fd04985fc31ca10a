"""The generation wing of anyms-bench (it never imports ``eval``; both use ``runfolder``).

- ``anyms.core``: the paper's method itself, importable with diffusers alone (layout, attention processors, the
  attention-map recorder);
- ``anyms.methods``: one module per method or baseline, each answering the protocol in ``anyms/methods/base.py``;
- ``anyms.generation``: the stage from a Hydra config to images and records in a run folder;
- ``anyms.benchmark``: the benchmark definitions (anyms11 and friends from ``conf/benchmark``, MS-Bench, random layouts);
- ``anyms.tiny``: tiny random base models in the real hub layout, for tests and ``PROFILE=tiny``.

Import rules (checked by import-linter, ``make lint-imports``): generation > methods | benchmark > tiny > core.
"""
