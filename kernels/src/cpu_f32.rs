//! Shared plumbing for the fused f32 CPU kernels: dtype checks, raw slice access
//! to candle storage, AVX2/FMA multiversioning and vectorisable math helpers.

use std::mem::MaybeUninit;

use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Fails unless `t` holds f32 values; `op` and `what` name the op and the argument.
pub(crate) fn check_f32(t: &Tensor, op: &str, what: &str) -> Result<()> {
    if t.dtype() != DType::F32 {
        bail!("{op}: {what} must be f32, got {:?}", t.dtype());
    }
    Ok(())
}

/// The contiguous f32 values described by a CPU storage and its layout.
pub(crate) fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: expected a contiguous input"),
    }
}

/// The contiguous f32 values of the three inputs of a `CustomOp3`'s `cpu_fwd`.
pub(crate) fn cpu_slices3<'a>(
    op: &str,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> Result<(&'a [f32], &'a [f32], &'a [f32])> {
    Ok((
        cpu_slice(s1, l1, op)?,
        cpu_slice(s2, l2, op)?,
        cpu_slice(s3, l3, op)?,
    ))
}

/// A vector of `len` values written in parallel, chunk by chunk of `chunk` values,
/// by `f(offset of the chunk, chunk)`; never zero-filled first. `f` must write every
/// element of its chunk.
pub(crate) fn par_uninit(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let chunk = chunk.max(1);
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| f(i * chunk, c));
    // SAFETY: the chunks cover `0..len` and `f` writes every element of its chunk.
    unsafe { out.set_len(len) };
    out
}

/// Sums per-task partial vectors (each `len` long) into one, in task order.
pub(crate) fn add_partials(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    parts.into_iter().fold(vec![0.0; len], |mut acc, p| {
        acc.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        acc
    })
}

/// Runs `f` on the f32 values of `t` (made contiguous first; CPU only).
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(cpu_slice(s, layout, op)?),
        _ => bail!("{op}: only the CPU backend is implemented"),
    }
}

/// Copies the f32 values of `t` into a vector (made contiguous first).
pub(crate) fn to_vec_f32(t: &Tensor, op: &str) -> Result<Vec<f32>> {
    with_f32(t, op, |s| Ok(s.to_vec()))
}

/// Defines a function whose body is compiled twice, once for the baseline target and
/// once with AVX2+FMA enabled, and picks the fast copy at run time when the CPU has it.
/// Loops in the body should be written over contiguous slices so they auto-vectorise.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// A strided matrix operand for [`matmul`]: base pointer, row stride, column stride.
pub(crate) type Mat = (*const f32, usize, usize);

/// dst (m x n, row stride `dst_rs`, unit column stride) = [dst +] lhs (m x k) @ rhs (k x n),
/// on all rayon threads.
///
/// # Safety
/// Every pointer must be valid for the extents its strides describe.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) {
    let threads = rayon::current_num_threads();
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        },
    );
}

/// Lanes used by the manual reductions (a multiple of every SIMD width we target).
pub(crate) const LANES: usize = 8;

/// Sum of a slice with `LANES` independent accumulators, so that it vectorises.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Dot product of two equally long slices, vectorisable.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// e^x in f32, branch-free so that loops calling it vectorise (relative error ~2e-7).
/// NaN propagates; inputs are clamped to the finite range of f32.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x > 88.37 { 88.37 } else { x };
    let x = if x < -87.33 { -87.33 } else { x };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let k = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(k.wrapping_add(127) << 23);
    e * scale
}

/// The logistic function 1 / (1 + e^-x), vectorisable.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = (exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert!(sigmoid(-200.0) >= 0.0 && sigmoid(-200.0) < 1e-37);
        assert_eq!(sigmoid(200.0), 1.0);
    }

    #[test]
    fn sums_match_naive() {
        let v: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let w: Vec<f32> = (0..37).map(|i| (i % 5) as f32).collect();
        let naive: f32 = v.iter().sum();
        assert!((sum(&v) - naive).abs() < 1e-4);
        let nd: f32 = v.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!((dot(&v, &w) - nd).abs() < 1e-4);
    }
}
