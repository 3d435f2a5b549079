//! CUDA kernels run on the CPU: `tests/cuda_emu/cuda_emu.h` emulates the
//! part of CUDA the kernels use (threads as fibers, barriers, warp shuffles,
//! `mma.sync` in the PTX ISA's fragment layouts), and a harness per `.cu`
//! file compares its kernels with a double-precision reference. This checks
//! kernels in CI and in sessions without a GPU, before `gpu_parity` runs
//! them on one. Needs `g++` (C++20), as the CI machine has.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles `harness` (in `tests/cuda_emu`) under the emulation, runs it and
/// prints its report; fails if it does not build, if any case is out of
/// tolerance, or if the report has other than `cases` case lines.
fn check(harness: &str, cases: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(harness.replace(".cpp", ""));
    let build = Command::new("g++")
        // CUDA code reads memory through other types (16-byte chunks of
        // 16-bit values): no strict-aliasing assumptions.
        .args(["-std=c++20", "-O2", "-fno-strict-aliasing", "-Wall"])
        .arg("-Wno-unknown-pragmas")
        .arg("-include")
        .arg(dir.join("cuda_emu.h"))
        .arg("-I")
        .arg(dir.join("stub"))
        .arg(dir.join(harness))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run g++ (C++20) to build {harness}: {e}"));
    assert!(
        build.status.success(),
        "g++ failed on {harness}:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    let report = String::from_utf8_lossy(&run.stdout).into_owned();
    print!("{report}");
    assert!(
        run.status.success(),
        "{harness}: {}\n{report}{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(report.contains("all cases within tolerance"), "{report}");
    assert_eq!(
        report.lines().count(),
        cases + 1,
        "{harness}: {cases} cases and a summary expected"
    );
}

/// `cuda/attention_tc.cu` (tensor-core attention, forward and backward) on
/// bf16 and f16 inputs, and `cuda/attention.cu` (the CUDA-core f32 kernels,
/// verified on an H100, so a check of the emulation too): padding, an empty
/// item, windows (with tiles the tensor-core kernels take unmasked), dropout,
/// every head dim the tensor-core kernels are built for.
#[test]
fn attention_on_emulated_gpu() {
    // 6 cases x 3 kernels.
    check("attention.cpp", 18);
}

/// `cuda/ctc.cu` (CTC loss with its log-softmax, forward and backward) with
/// the host's buffers: repeats, empty targets, items without frames,
/// impossible items with and without zero_infinity, a blank other than 0,
/// rows wider than a block, many alpha segments, a 4,500-frame item (the
/// f32 exp/log rounding accumulated over its frames).
#[test]
fn ctc_on_emulated_gpu() {
    // 5 cases.
    check("ctc.cpp", 5);
}

/// `cuda/norm.cu` (LayerNorm, RMSNorm) and `cuda/glu.cu` in f32, bf16 and
/// f16: outputs, input gradients, the weight and bias gradients' per-block
/// partial sums; rows shorter and longer than a block, more rows than the
/// backward's blocks.
#[test]
fn norms_and_glu_on_emulated_gpu() {
    // 3 types x 2 shapes x 3 ops.
    check("norms.cpp", 18);
}

/// `cuda/conv.cu` in f32, bf16 and f16: the depthwise conv1d (a kernel wider
/// than the sequence, partial sums over several rows), the depthwise conv2d
/// k3 s2 and the conv2d k3 s2 with and without SiLU; outputs, input
/// gradients, weight and bias gradients.
#[test]
fn convolutions_on_emulated_gpu() {
    // 3 types x 5 cases.
    check("conv.cpp", 15);
}

/// `cuda/softmax.cu` in f32, bf16 and f16: the forward (large values, -inf
/// entries), the backward from the output, the head's gradient from f32
/// logits; rows shorter and longer than a block, a vocabulary-sized row.
#[test]
fn softmax_on_emulated_gpu() {
    // 3 types x 3 shapes.
    check("softmax.cpp", 9);
}

/// `cuda/renorm.cu` against its contracts (the coefficients come from the
/// CPU kernel's code on the host): the partial sums of x and its squared
/// deviations over the counted rows, the forward, the backward's direct part
/// with the weight and bias partial sums, the gradient through the
/// statistics.
#[test]
fn batch_renorm_on_emulated_gpu() {
    // 2 shapes.
    check("renorm.cpp", 2);
}
