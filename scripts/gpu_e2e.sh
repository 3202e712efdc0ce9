#!/usr/bin/env bash
# One batched end-to-end run on the GPU machine (carry .whl: hydra/omegaconf wheels from
# ../shared/tools/gpu-wheels.sh). JIT-builds decdec._C, runs the GPU e2e tests, then the
# end-to-end decode benchmark on a SYNTHETIC Llama-3-8B (compile=cudagraphs). Logs under $OUT.
#   bash scripts/gpu_e2e.sh            # STEPS="build test bench" by default
#   STEPS="build host" bash scripts/gpu_e2e.sh   # host cost of a decode step: cudagraphs vs inductor vs reduce-overhead
#   STEPS="build profile" PROFILE_ARGS="-o attention=sdpa" bash scripts/gpu_e2e.sh   # per-kernel GPU time of a Llama-3-8B ap w3 step
#   STEPS="build ab" AB=DECDEC_QKV_ROPE bash scripts/gpu_e2e.sh   # an A/B knob: AB=0 / AB=1 in alternating processes,
#       AB_PAIRS rounds (2) of bench_e2e.py --settings AB_SETTINGS (ap-w3) --samples 3, tokens/s per run; AB_VALUES
#       ("0 1") the values to alternate, e.g. AB=DECDEC_BMMA AB_VALUES="1 all"; MODEL (llama3) the model
#   PACK=1 ...: pack $OUT into $OUT/results.tgz at the end (the device tool returns at most 8 files)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/decdec_gpu}"
STEPS="${STEPS:-build test bench}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site" DECDEC_CACHE=/tmp/decdec_cache
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
if [[ " $STEPS " == *" build "* ]]; then
  python3 scripts/build_kernels.py > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
fi
if [[ " $STEPS " == *" test "* ]]; then
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest tests/test_gpu_e2e.py -m cuda -q -x -p no:cacheprovider 2>&1 \
    | tee "$OUT/e2e_pytest.log" | tail -15
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
if [[ " $STEPS " == *" host "* ]]; then
  timeout "${HOST_TIMEOUT:-240}" python3 scripts/bench_decode_host.py ${HOST_ARGS:-} 2>&1 | tee "$OUT/decode_host.log" \
    | grep -vE "^\s*$|Warn" | tail -8
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
if [[ " $STEPS " == *" profile "* ]]; then
  timeout "${PROFILE_TIMEOUT:-240}" python3 scripts/profile_e2e.py -o model=${MODEL:-llama3} -o model.source=synthetic \
    -o device=cuda -o compile=${COMPILE:-cudagraphs} -o backend=ap -o precision=w3 -o dec=off --steps 64 --top 12 \
    --out "$OUT/profile" ${PROFILE_ARGS:-} 2>&1 | tee -a "$OUT/profile.log" | grep -vE "^\s*$|Warn" | tail -30
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
if [[ " $STEPS " == *" bench "* ]]; then
  timeout "${BENCH_TIMEOUT:-400}" python3 scripts/bench_e2e.py -o model=${MODEL:-llama3} -o model.source=synthetic \
    -o device=cuda -o compile=${COMPILE:-cudagraphs} --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/e2e_bench.log" \
    | grep -vE "^\s*$" | tail -30
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
if [[ " $STEPS " == *" ab "* ]]; then
  [[ -n "${AB:-}" ]] || { echo "STEPS=ab needs AB=<environment variable to set to 0 and 1>"; exit 2; }
  for i in $(seq 1 "${AB_PAIRS:-2}"); do
    for v in ${AB_VALUES:-0 1}; do
      log="$OUT/ab_${AB}_${v}_${i}.log"
      env "$AB=$v" timeout "${AB_TIMEOUT:-200}" python3 scripts/bench_e2e.py -o model=${MODEL:-llama3} \
        -o model.source=synthetic -o device=cuda -o compile=${COMPILE:-cudagraphs} --settings ${AB_SETTINGS:-ap-w3} \
        --targets --samples 3 --out "$OUT/ab" > "$log" 2>&1 || status=1
      echo "$AB=$v run $i: $(grep -oE "'tokens_per_s': [0-9.]+" "$log" | tr '\n' ' ')"
    done
  done
fi
echo "gpu_e2e status $status"
if [[ "${PACK:-0}" == 1 ]]; then
  tar czf /tmp/gpu_e2e_results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/gpu_e2e_results.tgz "$OUT/results.tgz"
fi
exit $status
