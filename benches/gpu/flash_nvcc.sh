#!/usr/bin/env bash
# nvcc for a *restricted* build of candle-flash-attn (set as NVCC; cudaforge,
# its build tool, honours that variable). The crate compiles 53 CUDA files,
# each for every head dim, dtype and causal flag: about 2.5 hours on two
# cores and some 500 MB of objects, which neither this machine's time nor the
# device tool's 64 MiB bundle allows. This wrapper compiles the files named
# in LCASR_FLASH_KEEP (default: the non-causal forward at head dims 32 and
# 128 in bf16 and f16, the models this project benchmarks) for real and every
# other kernel file as a stub that defines the same entry point and stops the
# process with a message naming the file left out (LCASR_FLASH_KEEP=none:
# every kernel file a stub, for a type check). flash_api.cu, which
# dispatches to them all, is compiled for real. No wrapper in the full
# build: `cargo build --features flash-attn` compiles every file.
#
# Use a build directory (CANDLE_FLASH_ATTN_BUILD_DIR) of its own: cudaforge's
# cache does not know that these objects are stubs.
set -euo pipefail
keep=${LCASR_FLASH_KEEP:-"flash_fwd_hdim32_bf16_sm80.cu flash_fwd_hdim32_fp16_sm80.cu flash_fwd_hdim128_bf16_sm80.cu flash_fwd_hdim128_fp16_sm80.cu"}
real_nvcc=${LCASR_REAL_NVCC:-nvcc}

args=("$@")
last=$((${#args[@]} - 1))
src=${args[$last]:-}
name=$(basename -- "$src")
case "$name" in
  flash_fwd_*.cu) ;;
  *) exec "$real_nvcc" "$@" ;;
esac
for k in $keep; do
  [ "$name" = "$k" ] && exec "$real_nvcc" "$@"
done

# A stub: the file's own specialisation, its body replaced by an abort.
stubs=${TMPDIR:-/tmp}/lcasr-flash-stubs
mkdir -p "$stubs"
stub="$stubs/$name"
grep -q '^void run_mha_fwd' "$src" || { echo "flash_nvcc.sh: no entry point in $src" >&2; exit 1; }
{
  echo '#include <cstdio>'
  echo '#include <cstdlib>'
  echo '#include <cutlass/numeric_types.h>'
  echo '#include "flash.h"'
  echo 'template<>'
  grep '^void run_mha_fwd' "$src" | sed 's/{[[:space:]]*$//'
  echo '{'
  echo '    (void)params; (void)stream;'
  echo "    std::fprintf(stderr, \"lcasr: flash-attention kernel $name is not in this restricted build (benches/gpu/flash_nvcc.sh)\\n\");"
  echo '    std::abort();'
  echo '}'
} > "$stub.$$.tmp"
# Written aside and renamed: parallel nvcc calls (and builds) may share the file.
mv "$stub.$$.tmp" "$stub"
args[$last]=$stub
exec "$real_nvcc" "${args[@]}" "-I$(dirname -- "$src")"
