#!/usr/bin/env bash
# Syntax-check csrc/bindings.cpp (the extension's C++ side: op registrations, argument checks) without a GPU or a CUDA
# build of torch: g++ -fsyntax-only against the installed torch's headers, the CUDA toolkit's runtime headers and
# scripts/cuda_stubs/ (declarations of the CUDA library headers that the CPU wheel of torch lacks). So a binding that
# does not compile fails CI instead of a GPU session's first build. Skips, exit 0, without g++, torch or cuda_runtime.h.
#   bash scripts/check_bindings.sh            # PYTHON=.venv/bin/python by default
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
command -v g++ >/dev/null || { echo "check_bindings: no g++, skipped"; exit 0; }
torch_inc="$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))' \
  2>/dev/null)" || { echo "check_bindings: no torch for $PY, skipped"; exit 0; }
py_inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
cuda_inc=""
nvcc_dir="$(dirname "$(command -v nvcc 2>/dev/null || echo /none/nvcc)")"
for d in "${CUDA_HOME:-}/include" /usr/local/cuda/include "$nvcc_dir/../include"; do
  if [[ -f "$d/cuda_runtime.h" ]]; then cuda_inc="$d"; break; fi
done
[[ -n "$cuda_inc" ]] || { echo "check_bindings: no cuda_runtime.h (CUDA toolkit), skipped"; exit 0; }
# shellcheck disable=SC2086
if g++ -fsyntax-only -w -std=c++17 $torch_inc -I"$py_inc" -I"$cuda_inc" -Iscripts/cuda_stubs -Icsrc \
    -DTORCH_EXTENSION_NAME=_C csrc/bindings.cpp; then
  echo "ok   bindings.cpp (g++ -fsyntax-only against torch $("$PY" -c 'import torch; print(torch.__version__)'))"
else
  echo "FAIL bindings.cpp"; exit 1
fi
