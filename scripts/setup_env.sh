#!/usr/bin/env bash
# Makes the project's virtual environment (.venv by default) on a fresh machine, or updates it.
# Order matters: torch goes in first and stays pinned by constraints.txt for every later pip call.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -c constraints.txt torch
"${PIP[@]}" install -c constraints.txt -e ".[dev]"

# PyPI's torchvision is a CUDA build: beside a CPU torch it imports only with the ops defined first.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -f "$SITE/_anyms_torchvision_cpu_ops.pth" ] || ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  cp scripts/torchvision_cpu_ops.py "$SITE/_anyms_torchvision_cpu_ops.py"
  echo "import _anyms_torchvision_cpu_ops" > "$SITE/_anyms_torchvision_cpu_ops.pth"
  echo "setup: torchvision CPU-ops hook in place (CPU torch beside PyPI's CUDA torchvision)"
fi
"$VENV/bin/python" -c "import torch, torchvision, diffusers, transformers; print(f'setup: torch {torch.__version__} (cuda {torch.version.cuda}), torchvision {torchvision.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}')"
