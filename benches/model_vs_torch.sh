#!/usr/bin/env bash
# One training step and long-input inference of the 6L d256 8x32 encoder (4096
# classes): lcasr vs PyTorch, same machine, same shapes, 2 threads each.
# Shapes: LCASR_BENCH_B, LCASR_BENCH_T, LCASR_BENCH_RUNS, LCASR_BENCH_INFER_T.
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
"$py" benches/model_torch.py
cargo bench -q --bench model_step
