#!/bin/sh
# Trains the demo model on the bundled corpus (data/demo) from scratch:
# builds lcasr, prepares the features and a tokenizer, trains with
# scripts/train.rhai (configs/demo.yaml), prints the held-out WER and draws
# the training curves into runs/demo/plots/. Extra arguments go to
# `lcasr train` (e.g. `training.max_epochs=2` for a quick look).
set -eu
cd "$(dirname "$0")"
cargo build --release
lcasr=target/release/lcasr
$lcasr prepare data/demo/train --out runs/demo-data/train
$lcasr prepare data/demo/heldout --out runs/demo-data/heldout
$lcasr tokenizer train data/demo/train/transcripts.txt --vocab-size 64 --out runs/demo-data/tokenizer.json
$lcasr train configs/demo.yaml --force "$@"
$lcasr plot runs/demo
