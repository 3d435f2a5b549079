#!/usr/bin/env bash
# CTC loss forward+backward, lcasr-kernels vs torch.ctc_loss, same machine,
# same shapes (B 8, T 2048, C 4096, 400 labels), 2 threads each.
# Needs a PyTorch from PyPI: set TORCH_PY to its python, or this creates
# benches/.venv with `pip install torch`.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${TORCH_PY:-benches/.venv/bin/python}
if [ ! -x "$py" ]; then
  python3 -m venv benches/.venv
  benches/.venv/bin/pip install --quiet torch
  py=benches/.venv/bin/python
fi
export RAYON_NUM_THREADS=2
"$py" benches/ctc_torch.py
cargo test -q -p lcasr-kernels --test ctc -- --ignored --nocapture ctc_loss_benchmark 2>&1 \
  | grep -v "^running\|^test result\|^$"
