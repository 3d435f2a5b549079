#!/usr/bin/env bash
# On a CUDA machine with PyTorch (the workplace's GPU machines: no Rust, no
# network), runs what benches/gpu/build.sh bundled:
#   1. every fused op on the GPU against the same op on the CPU, forward and
#      gradients (kernels/tests/gpu_parity.rs, built with `flash-attn`: also
#      candle-flash-attn's forward, and its speed against our tensor-core
#      kernel at one hour), and the optimizers, gradient
#      norm and finiteness check on the GPU against the CPU
#      (tests/gpu_training.rs);
#   2. the train-step benchmark of the 6-layer d256 model (benches/model_step.rs)
#      on the GPU against PyTorch running the same model on the same GPU
#      (benches/model_torch.py), at the shapes of BENCHMARKS.md;
#   3. one training step of the reference d768 model on one hour of audio
#      (issue #10's memory target), with its peak GPU memory and the memory
#      trace of its backward (LCASR_MEMORY_TRACE=1, docs/gpu.md);
#   4. the demo training job (demo.sh's steps) with `--device cuda:0`, and
#      its evaluation on the GPU in float32 and in bfloat16 (`--dtype`);
#   5. the demo job data-parallel over every GPU of the machine (`--gpus N`,
#      NCCL; one GPU still runs the NCCL path), against part 4's losses.
# Usage: benches/gpu/run.sh [BUNDLE_DIR] (default target/gpu-bundle). Results
# go to $OUT (the device tool's folder) or target/gpu-results. LCASR_GPU_STEPS
# picks the parts (default "1 2 3 4 5"), e.g. LCASR_GPU_STEPS="1 3";
# LCASR_GPU_HOUR_DTYPES the precisions of part 3 (default "f32 bf16"),
# LCASR_GPU_HOUR_RUNS its steps per precision (default 1) and
# LCASR_GPU_HOUR_TIMEOUT the seconds each may take (default 240);
# LCASR_GPU_HOUR_TORCH=1 runs PyTorch's side of it first.
# LCASR_GPU_STEP_DTYPES the precisions of part 2 (default "f32"; "f32 bf16"
# adds autocast on both sides). LCASR_GPU_ATTENTION lists the attention paths
# lcasr runs parts 2 and 3 with (default "tc kernel"): "tc" the tensor-core
# kernels (the default for bf16/f16; f32 steps skip it), "kernel" the fused
# CUDA-core kernel (LCASR_ATTENTION_TC=0), a number N is chunked attention
# through cuBLAS, N query rows at a time (LCASR_ATTENTION_CHUNK=N;
# docs/gpu.md), e.g. LCASR_GPU_ATTENTION="tc kernel 1024".
# Other environment the programs read passes through, e.g.
# LCASR_KERNEL_PROFILE=1: parts 2 and 3 print each step's GPU time per lcasr
# kernel (CUDA events around every launch, which costs a little time).
set -uo pipefail
cd "$(dirname "$0")/../.."
bundle=${1:-target/gpu-bundle}
out=${OUT:-target/gpu-results}
mkdir -p "$out"
exec > >(tee "$out/gpu-run.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

# The bundle's programs are xz-compressed (build.sh); unpack them with Python's
# lzma, which every Python has.
steps=" ${LCASR_GPU_STEPS:-1 2 3 4 5} "
want() { case "$steps" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# Runs "$@" once per attention path of LCASR_GPU_ATTENTION.
each_attention() {
  local path
  for path in ${LCASR_GPU_ATTENTION:-tc kernel}; do
    if [ "$path" = tc ] && [ "${LCASR_BENCH_DTYPE:-f32}" = f32 ]; then
      echo "-- attention: tc skipped (f32 steps run the CUDA-core kernel)"
      continue
    fi
    echo "-- attention: $path"
    case "$path" in
      tc) env -u LCASR_ATTENTION_CHUNK -u LCASR_ATTENTION_TC "$@" ;;
      kernel) env -u LCASR_ATTENTION_CHUNK LCASR_ATTENTION_TC=0 "$@" ;;
      *) env -u LCASR_ATTENTION_TC LCASR_ATTENTION_CHUNK="$path" "$@" ;;
    esac
  done
}

bin=/tmp/lcasr-gpu
mkdir -p "$bin"
for b in gpu_parity gpu_training model_step lcasr; do
  python3 -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$bundle/$b.xz" "$bin/$b"
  chmod +x "$bin/$b"
done

# The CUDA libraries (cuBLAS, cuRAND, NVRTC) of the Python that holds PyTorch.
libs=$(python3 -c 'import glob, os, nvidia
dirs = {os.path.dirname(p) for root in nvidia.__path__
        for p in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))')
export LD_LIBRARY_PATH="$libs:/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
if ldd "$bin/gpu_parity" | grep "not found"; then
  echo "error: libraries above are missing" >&2
  exit 1
fi
# The CLI also needs NCCL (libnccl.so.2, from PyTorch's nvidia-nccl wheel).
if ldd "$bin/lcasr" | grep "not found"; then
  echo "warning: the lcasr CLI misses the libraries above: parts 4 and 5 will fail" >&2
fi

parity=0
if want 1; then
  echo "== 1. fused ops on the GPU against the CPU"
  timeout 180 "$bin/gpu_parity" --test-threads 1
  parity=$?
  timeout 60 "$bin/gpu_training" --test-threads 1 || parity=1
fi

if want 2; then
  echo "== 2. training step on the GPU: lcasr vs PyTorch"
  for dtype in ${LCASR_GPU_STEP_DTYPES:-f32}; do
    for shape in "8 4096" "2 16384" "2 2048"; do
      set -- $shape
      (
        export LCASR_BENCH_DEVICE=cuda:0 LCASR_BENCH_RUNS=5 LCASR_BENCH_B=$1 LCASR_BENCH_T=$2
        [ "$dtype" = f32 ] || export LCASR_BENCH_DTYPE=$dtype
        timeout 90 python3 "$bundle/model_torch.py"
        LCASR_BENCH_PHASES=1 each_attention timeout 90 "$bin/model_step"
      )
    done
  done
fi

if want 3; then
  echo "== 3. one hour of audio: 360,000 frames, the reference d768 model, every block checkpointed"
  echo "(lcasr memory predicts 30.4 GiB for this step in bf16, 58.7 GiB in f32; docs/gpu.md)"
  echo "(measured on an H100 in bf16, 2026-11-27: 32.9 GiB; 7.0 s per step with tensor-core attention,"
  echo " 56 s with the CUDA-core kernel; PyTorch 2.4 s once warm, 30.5 GiB)"
  for dtype in ${LCASR_GPU_HOUR_DTYPES:-f32 bf16}; do
    (
      # In a subshell: the settings stay out of part 4.
      export LCASR_BENCH_DEVICE=cuda:0 LCASR_BENCH_MODEL=reference LCASR_BENCH_CKPT=1 \
        LCASR_BENCH_DTYPE=$dtype LCASR_BENCH_B=1 LCASR_BENCH_T=360000 \
        LCASR_BENCH_RUNS=${LCASR_GPU_HOUR_RUNS:-1} LCASR_BENCH_PHASES=1 LCASR_MEMORY_TRACE=1
      if [ -n "${LCASR_GPU_HOUR_TORCH:-}" ]; then
        timeout "${LCASR_GPU_HOUR_TIMEOUT:-240}" python3 "$bundle/model_torch.py"
      fi
      each_attention timeout "${LCASR_GPU_HOUR_TIMEOUT:-240}" "$bin/model_step"
    )
  done
fi

lcasr="$bin/lcasr"
# demo.sh's data steps (features, tokenizer), once for parts 4 and 5.
prepare_demo() {
  [ -e runs/demo-data/tokenizer.json ] && return 0
  timeout 120 sh -c "set -e
    $lcasr prepare data/demo/train --out runs/demo-data/train
    $lcasr prepare data/demo/heldout --out runs/demo-data/heldout
    $lcasr tokenizer train data/demo/train/transcripts.txt --vocab-size 64 --out runs/demo-data/tokenizer.json"
}

if want 4; then
  echo "== 4. the demo training job on the GPU: demo.sh's steps, lcasr train --device cuda:0, 3 epochs"
  prepare_demo &&
    timeout 240 "$lcasr" train configs/demo.yaml --force --device cuda:0 training.max_epochs=3
  echo "demo training exit status: $?"
  # Inference in f32 and in bf16 (`--dtype`, mixed precision as in training)
  # on the held-out set: the WERs should be close.
  for dtype in float32 bfloat16; do
    timeout 120 "$lcasr" eval runs/demo runs/demo-data/heldout/manifest.json --device cuda:0 \
      --dtype "$dtype" --context full,2s --out "runs/demo/eval-gpu-$dtype"
    echo "demo eval --dtype $dtype exit status: $?"
  done
fi

if want 5; then
  gpus=$(nvidia-smi -L | wc -l)
  echo "== 5. the demo job data-parallel over $gpus GPU(s): lcasr train --gpus $gpus (NCCL), 3 epochs"
  echo "(with one GPU the losses should equal part 4's; with more, up to summation order)"
  prepare_demo &&
    timeout 240 "$lcasr" train configs/demo.yaml --force --gpus "$gpus" --run-dir runs/demo-gpus \
      training.max_epochs=3
  echo "data-parallel demo exit status: $?"
fi
echo "parity test exit status: $parity"
exit "$parity"
