#!/usr/bin/env bash
# compute-sanitizer memcheck + racecheck over small DEC / fused / GEMV calls (GPU machine).
# Fails if the sanitizer reports an error or a result is wrong.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
status=0
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 3 --target-processes all "$PY" scripts/sanitize_dec.py
  rc=$?
  echo "== $tool exit $rc"
  [[ $rc == 0 ]] || status=1
done
exit $status
