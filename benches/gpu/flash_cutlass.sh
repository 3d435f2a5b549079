# Sourced by benches/gpu/build.sh and .ci/cuda-check: CUTLASS's headers for
# candle-flash-attn without GitHub. Its build (cudaforge) clones a pinned
# CUTLASS commit into $CUDAFORGE_HOME/git/checkouts/cutlass-<16 hex>/ unless
# that directory has include/ and `git rev-parse HEAD` there prints the pinned
# hash. PyPI's nvidia-cutlass 3.5.0.0 wheel carries the same headers (most
# likely the pinned commit's release, CUTLASS 3.5); this lays them out there.
# Needs: $1 a pip to install the wheel with; the cargo registry fetched.
# Exports CUDAFORGE_HOME (target/cudaforge).
flash_cutlass_prepare() {
  local pip=$1 wheel=target/cutlass-wheel build_rs pin checkout
  if [ ! -d "$wheel/cutlass_library/source/include/cutlass" ]; then
    "$pip" install --quiet --no-deps --target "$wheel" nvidia-cutlass==3.5.0.0
  fi
  build_rs=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" \
    -path '*candle-flash-attn-0.11.1/build.rs' | head -n 1)
  pin=$(sed -n 's/^const CUTLASS_COMMIT: &str = "\([0-9a-f]\{40\}\)";$/\1/p' "$build_rs")
  if [ -z "$pin" ]; then
    echo "error: no CUTLASS_COMMIT in candle-flash-attn's build.rs ($build_rs)" >&2
    return 1
  fi
  export CUDAFORGE_HOME=$PWD/target/cudaforge
  checkout=$CUDAFORGE_HOME/git/checkouts/cutlass-${pin:0:16}
  if [ "$(git -C "$checkout" rev-parse HEAD 2>/dev/null)" != "$pin" ]; then
    rm -rf "$checkout"
    mkdir -p "$checkout/tools/util"
    cp -r "$wheel/cutlass_library/source/include" "$checkout/include"
    cp -r "$wheel/cutlass_library/source/tools/util/include" "$checkout/tools/util/include"
    git -C "$checkout" init --quiet
    echo "$pin" > "$checkout/.git/HEAD"
  fi
}
