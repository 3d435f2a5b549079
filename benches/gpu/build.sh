#!/usr/bin/env bash
# Builds, on a machine without a GPU, what benches/gpu/run.sh runs on a CUDA
# machine that has neither a Rust toolchain nor a network: the GPU parity test
# of lcasr-kernels, the training-side GPU test (tests/gpu_training.rs) and the
# train-step benchmark, built with `--features cuda` (the parity test with
# `flash-attn`: candle-flash-attn's forward too), and the lcasr CLI, built with
# `--features nccl` (CUDA and `--gpus`), stripped and xz-compressed in
# target/gpu-bundle (about 33 MB: with the repository it fits the device
# tool's 64 MiB; carry that folder).
#
# What the build needs and where it comes from:
# - nvcc, its headers and CCCL (candle-kernels compiles its .cu files to PTX):
#   NVIDIA's PyPI wheels, CUDA 13.0 to match driver 580 of the GPU machines
#   (a newer nvcc writes PTX that driver refuses). CUDA_COMPUTE_CAP=90 (H100,
#   H200) unless set.
# - cuBLAS, cuBLASLt, cuRAND, NVRTC and the CUDA runtime to link against
#   (candle links them dynamically): the same wheels PyTorch cu130 ships, so
#   their sonames match the copies in the GPU machine's PyTorch environment.
# - NCCL to link the CLI against: the nvidia-nccl-cu13 wheel (soname
#   libnccl.so.2, which the GPU machine's PyTorch environment also has).
# - For the `flash-attn` parity binary: CUTLASS's headers (candle-flash-attn's
#   build fetches a pinned CUTLASS commit from GitHub, which this machine cannot
#   reach): the nvidia-cutlass 3.5.0.0 wheel from PyPI carries them, placed
#   where cudaforge keeps its checkout (CUDAFORGE_HOME) under the pinned
#   commit's name (benches/gpu/flash_cutlass.sh). Only the kernels
#   flash_nvcc.sh keeps are compiled (head dims 32 and 128, bf16 and f16; with
#   the stubs about 20 minutes on 2 cores the first time, kept in
#   target/flash-attn-restricted after).
# - libcuda, the driver library, exists only where a driver is installed. The
#   link gets a stub with the soname libcuda.so.1 that defines every driver
#   function cudarc declares; at run time the real driver library is loaded.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TERM_COLOR=never

venv=target/gpu-venv
if [ ! -x "$venv/bin/nvcc-found" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
  touch "$venv/bin/nvcc-found"
fi
if [ ! -e "$venv/bin/nccl-found" ]; then
  "$venv/bin/pip" install --quiet nvidia-nccl-cu13==2.27.7
  touch "$venv/bin/nccl-found"
fi
cuda_root=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
export PATH="$cuda_root/bin:$PATH"
nvcc --version | tail -n 1

# Unversioned names for the linker, and the driver stub.
link=target/gpu-link
mkdir -p "$link"
for lib in cublas cublasLt curand nvrtc cudart; do
  real=$(find "$cuda_root/lib" -maxdepth 1 -name "lib$lib.so.*" | sort | head -n 1)
  [ -n "$real" ] || { echo "error: lib$lib.so.* not found under $cuda_root/lib" >&2; exit 1; }
  ln -sf "$(realpath "$real")" "$link/lib$lib.so"
done
nccl=$("$venv/bin/python" -c 'import glob, os, nvidia
print(sorted(glob.glob(os.path.join(nvidia.__path__[0], "**", "libnccl.so.*"), recursive=True))[0])')
ln -sf "$(realpath "$nccl")" "$link/libnccl.so"
# cudarc's sources: fetched first on a machine whose cargo registry is empty
# (find would fail on the missing directory).
cargo fetch --locked
driver_sys=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-0.19.10/src/driver/sys/mod.rs' | head -n 1)
grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$driver_sys" | sed 's/^pub unsafe fn //' | sort -u |
  awk '{ printf "int %s(void) { return 999; }\n", $1 }' > "$link/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/cuda_stub.c"

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
CUDAFORGE_THREADS=$(nproc)
export CUDAFORGE_THREADS
export CARGO_TARGET_DIR=target/gpu-build
export RUSTFLAGS="-L native=$PWD/$link"
export LIBRARY_PATH="$PWD/$link"

# CUTLASS for candle-flash-attn, under the commit its build.rs pins.
source benches/gpu/flash_cutlass.sh
flash_cutlass_prepare "$venv/bin/pip"

echo "== cargo build --release --features cuda (parity tests, train-step benchmark)"
# The path of executable target $1, from cargo's own report of what it built
# (building a test or bench builds the package's binaries too).
executable() {
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" | tail -n 1
}
# The parity test with candle-flash-attn, restricted to the kernels it checks
# (benches/gpu/flash_nvcc.sh); its objects in a directory of their own.
mkdir -p target/flash-attn-restricted
parity=$(CANDLE_FLASH_ATTN_BUILD_DIR=$PWD/target/flash-attn-restricted \
  NVCC=$PWD/benches/gpu/flash_nvcc.sh \
  cargo test --locked --release --features flash-attn -p lcasr-kernels --test gpu_parity \
  --no-run --message-format=json | executable gpu_parity)
training=$(cargo test --locked --release --features cuda --test gpu_training \
  --no-run --message-format=json | executable gpu_training)
bench=$(cargo build --locked --release --features cuda --bench model_step \
  --message-format=json | executable model_step)
cli=$(cargo build --locked --release --features nccl --bin lcasr \
  --message-format=json | executable lcasr)
for exe in "$parity" "$training" "$bench" "$cli"; do
  [ -x "$exe" ] || { echo "error: cargo reported no executable ($exe)" >&2; exit 1; }
done

bundle=target/gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle"
cp "$parity" "$bundle/gpu_parity"
cp "$training" "$bundle/gpu_training"
cp "$bench" "$bundle/model_step"
cp "$cli" "$bundle/lcasr"
programs=(gpu_parity gpu_training model_step lcasr)
strip "${programs[@]/#/$bundle/}"
xz -T0 -6 "${programs[@]/#/$bundle/}"
cp benches/model_torch.py "$bundle/"
du -sh "$bundle"/*
echo "bundle ready: carry target/gpu-bundle and run benches/gpu/run.sh on the GPU machine"
