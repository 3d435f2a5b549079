#!/usr/bin/env bash
# Long-form inference, lcasr vs PyTorch: same weights, same synthetic features,
# 2 threads each, one process per row and side (so each peak RSS is its own).
#
#   benches/inference_vs_torch.sh [MODEL:CONTEXT:MINUTES[:ROUNDS] ...]
#
# MODEL is 6l or demo, CONTEXT `full` or a window in seconds; the default rows
# are one hour of each model at full context and at 80 s windows. Each row runs
# ROUNDS times (default LCASR_BENCH_ROUNDS, else 2), ours then PyTorch's, and a
# side that runs past LCASR_BENCH_TIMEOUT seconds (default 900) is stopped.
# TORCH_PY: a python with torch (else benches/.venv is created from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${TORCH_PY:-benches/.venv/bin/python}
if [ ! -x "$py" ]; then
  python3 -m venv benches/.venv
  benches/.venv/bin/pip install --quiet torch
  py=benches/.venv/bin/python
fi
export RAYON_NUM_THREADS=2
rounds=${LCASR_BENCH_ROUNDS:-2}
limit=${LCASR_BENCH_TIMEOUT:-900}
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(6l:full:60 6l:80:60 demo:full:60 demo:80:60)

bin=$(cargo bench --no-run --bench inference_long 2>&1 |
  sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -n 1)
[ -x "$bin" ] || { echo "could not build the inference_long bench" >&2; exit 1; }
out=target/inference-bench
for model in 6l demo; do
  "$bin" export "$model" "$out/$model"
  "$py" benches/inference_torch.py check "$out/$model"
done

side() { # name command...
  local name=$1 rc=0
  shift
  timeout "$limit" "$@" || rc=$?
  if [ "$rc" -eq 124 ]; then
    echo "$name row: ran past ${limit} s, stopped"
  elif [ "$rc" -ne 0 ]; then
    echo "$name row: failed (exit status $rc; 137 is the out-of-memory killer)"
  fi
}

for row in "${rows[@]}"; do
  IFS=: read -r model ctx minutes n <<<"$row"
  for ((i = 1; i <= ${n:-$rounds}; i++)); do
    echo "# $row round $i, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    side lcasr "$bin" run "$model" "$ctx" "$minutes"
    echo "# load average $(cut -d' ' -f1-3 /proc/loadavg)"
    side torch "$py" benches/inference_torch.py run "$out/$model" "$ctx" "$minutes"
  done
done
