#!/usr/bin/env bash
# Sets up ./.venv for decdec: CPU torch 2.13.0 (unless a torch is already there, e.g. a CUDA
# build on a GPU machine), then `pip install -e .[dev]`, which also builds the CUDA kernels
# when nvcc and a CUDA torch are present. Safe to re-run; quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import setuptools, wheel" 2>/dev/null; then
  "${PIP[@]}" install setuptools wheel
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # an unpinned torch pulls a multi-GB CUDA build; the CPU wheel is enough without a GPU
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install torch
  else
    "${PIP[@]}" install torch==2.13.0
  fi
fi
# --no-build-isolation: setup.py must see the venv's torch to decide whether to build kernels
if ! "${PIP[@]}" install --no-build-isolation -e '.[dev]' > .venv/install.log 2>&1; then
  grep -v "^WARNING: Location" .venv/install.log >&2
  exit 1
fi
.venv/bin/python -c "import decdec.ops" || { echo "decdec failed to install" >&2; exit 1; }
