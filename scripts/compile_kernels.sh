#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc alone (no torch, no GPU) for sm_90 and sm_80 into a temp dir, and build the
# standalone CUDA tools in scripts/ with their documented lines.
# Exits non-zero on any failure, so CI catches a broken kernel build without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
JOBS="${JOBS:-2}"
command -v "$NVCC" >/dev/null || { echo "compile_kernels: $NVCC not found" >&2; exit 2; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
names=()
for cu in csrc/*.cu; do
  for arch in 90 80; do
    name="$(basename "$cu" .cu)_sm$arch"
    names+=("$name")
    (
      "$NVCC" -c -std=c++17 -O3 -Icsrc -Xcompiler -fPIC -gencode="arch=compute_$arch,code=sm_$arch" -Xptxas -v "$cu" \
        -o "$tmp/$name.o" >"$tmp/$name.log" 2>&1
      echo $? >"$tmp/$name.rc"
    ) &
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
  done
done
wait
status=0
for name in "${names[@]}"; do
  rc="$(cat "$tmp/$name.rc" 2>/dev/null || echo 99)"
  if [[ "$rc" == 0 ]]; then
    spills="$(grep -E 'bytes spill' "$tmp/$name.log" | grep -vc ' 0 bytes spill stores, 0 bytes spill loads' || true)"
    echo "ok   $name (kernels with spills: $spills)"
  else
    echo "FAIL $name (nvcc exit $rc)"; grep -E 'error' "$tmp/$name.log" | head -20; status=1
  fi
done
# link the sm_90 objects together, as the extension does (catches symbols defined in two files)
if (( status == 0 )); then
  if "$NVCC" -shared "$tmp"/*_sm90.o -o "$tmp/libkernels.so" >"$tmp/link.log" 2>&1; then
    echo "ok   link (sm90 objects into one shared library)"
  else
    echo "FAIL link"; grep -E 'multiple definition|undefined|error' "$tmp/link.log" | head -20; status=1
  fi
fi
# the standalone tools (scripts/*.cu) build, and link, with the nvcc lines their headers give
python3 scripts/check_cu_tools.py --jobs "$JOBS" || status=1
# the GEMV block probe build of the timeline (both files with -DDECDEC_GEMV_PROBE, linked)
if "$NVCC" -std=c++17 -O3 -Icsrc -gencode=arch=compute_90,code=sm_90 -DDECDEC_GEMV_PROBE scripts/dec_timeline.cu \
    csrc/ap_gemv.cu -o "$tmp/tl_probe" >"$tmp/tl_probe.log" 2>&1; then
  echo "ok   dec_timeline.cu + ap_gemv.cu with -DDECDEC_GEMV_PROBE (sm90, linked)"
else
  echo "FAIL dec_timeline.cu -DDECDEC_GEMV_PROBE"; grep -E 'error' "$tmp/tl_probe.log" | head -20; status=1
fi
exit $status
