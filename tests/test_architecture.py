"""The architecture rules: import-linter's contracts (pyproject.toml, also run by .ci/run before make test), and
that nothing outside a method's module names it: the generation stage, the core, the benchmarks and the tiny
models import only the protocol (anyms.methods.base) and the base model's loader (anyms.methods.loading)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = {"anyms.methods", "anyms.methods.base", "anyms.methods.loading"}


def lint_imports() -> str | None:
    local = Path(sys.executable).with_name("lint-imports")
    return str(local) if local.exists() else shutil.which("lint-imports")


@pytest.mark.skipif(lint_imports() is None, reason="import-linter is not installed (pip install -e '.[dev]')")
def test_import_linter_contracts_hold():
    out = subprocess.run([lint_imports()], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_method_module_is_imported_outside_the_methods():
    methods = {f"anyms.methods.{p.stem}" for p in (REPO / "anyms" / "methods").glob("*.py")} - SHARED
    assert {"anyms.methods.ms_diffusion", "anyms.methods.gligen", "anyms.methods.ip_adapter_masks"} <= methods
    for path in (REPO / "anyms").rglob("*.py"):
        if path.parent.name == "methods":
            continue
        named = imported_modules(path) & methods
        assert not named, f"{path.relative_to(REPO)} imports {sorted(named)}: only conf/method/<name>.yaml names a method"
