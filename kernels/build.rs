//! With the `cuda` feature, compiles the CUDA kernels in `cuda/*.cu` to PTX in
//! `OUT_DIR` (loaded at run time by `src/cuda.rs`); without it, does nothing.
//! `nvcc` comes from `NVCC` or the `PATH`; the PTX targets compute capability
//! `CUDA_COMPUTE_CAP` (default 80), which newer GPUs compile on load.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")
        .expect("kernels/cuda exists")
        .map(|e| e.expect("readable kernels/cuda").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        compile(&nvcc, &cap, src, &out);
    }
}

fn compile(nvcc: &str, cap: &str, src: &Path, out: &Path) {
    let stem = src.file_stem().expect("a .cu file name");
    let ptx = out.join(stem).with_extension("ptx");
    let status = Command::new(nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{nvcc}` (set NVCC or PATH): {e}"));
    if !status.success() {
        panic!("`{nvcc}` failed on {}", src.display());
    }
}
