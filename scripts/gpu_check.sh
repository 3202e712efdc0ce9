#!/usr/bin/env bash
# One batched run on the GPU machine: JIT-build decdec._C, run the `cuda` tests, the
# compute-sanitizer check and the kernel benchmark; logs go to $OUT (default /tmp/decdec_gpu).
#   STEPS="build test sanitize bench" BENCH_ARGS="--quick" bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/decdec_gpu}"
STEPS="${STEPS:-build test sanitize bench}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
if [[ " $STEPS " == *" build "* ]]; then
  python3 scripts/build_kernels.py 2>&1 | tee "$OUT/build.log" | tail -3 || status=1
  python3 -c "import torch, decdec._C" || { echo "BUILD FAILED"; tail -50 "$OUT/build.log"; exit 1; }
fi
if [[ " $STEPS " == *" build "* ]]; then  # a TORCH_CHECK must surface as a Python error, not a crash
  python3 -c "
import torch, decdec.ops
decdec.ops.load_cuda_kernels()
try:
    torch.ops.decdec.ap_gemv(torch.zeros(1, 64, device='cuda', dtype=torch.half), torch.zeros(3, 8, 3, dtype=torch.int32, device='cuda'), torch.zeros(8, 8, device='cuda', dtype=torch.half))
except RuntimeError as e:
    print('error path ok:', str(e).splitlines()[0])
" || status=1
fi
if [[ " $STEPS " == *" test "* ]]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests/test_cuda_kernels.py -m cuda -q -x --noconftest \
    -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -25
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
if [[ " $STEPS " == *" sanitize "* ]]; then
  timeout 240 bash scripts/sanitize_dec.sh > "$OUT/sanitizer.log" 2>&1
  rc=$?; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|== |err" "$OUT/sanitizer.log" | tail -12
  [[ $rc == 0 ]] || status=1
fi
if [[ " $STEPS " == *" sanitize "* ]]; then  # the selection against its previous version (same channels)
  nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc scripts/select_ab.cu -o /tmp/decdec_select_ab \
    && timeout 120 /tmp/decdec_select_ab > "$OUT/select_ab.log" 2>&1
  rc=$?; tail -2 "$OUT/select_ab.log"
  [[ $rc == 0 ]] || status=1
fi
if [[ " $STEPS " == *" bench "* ]]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 scripts/bench_kernels.py --out-dir "$OUT" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench.log" | grep -vE "^\s*$" | tail -60
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
echo "gpu_check status $status"
exit $status
