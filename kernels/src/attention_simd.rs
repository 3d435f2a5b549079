//! Vectorised row kernels and the tile matrix product of the attention op.
//!
//! Each row kernel has one portable body; on x86-64 it is also compiled with
//! AVX2+FMA and picked at run time, so the loops vectorise without
//! `-C target-cpu=native`.

use gemm::{gemm, Parallelism};

/// Lanes of the manual accumulators (one AVX register of f32).
const LANES: usize = 8;

/// Defines a row kernel with an AVX2+FMA variant chosen at run time.
macro_rules! row_kernel {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the running CPU supports the features `avx2` was compiled with.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// exp(x) for x <= 88 to about 3e-7 relative error; inputs below -87 (and -inf) give 0.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer n held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: u32 = 0x4B40_0000;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^n from the integer bits, with wrapping integer ops only (they vectorise).
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND_BITS).wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Sums 8-lane partial accumulators.
#[inline(always)]
fn hsum(acc: [f32; LANES]) -> f32 {
    acc.iter().sum()
}

row_kernel! {
    /// Maximum of a row (`-inf` for an empty row).
    fn row_max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &v in chunks.remainder().iter().chain(acc.iter()) {
            m = if v > m { v } else { m };
        }
        m
    }
}

/// `x = exp(x - m)` in place (x <= m); returns the sum of the new values.
pub(crate) fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    exp_sub(x, m);
    sum(x)
}

row_kernel! {
    /// Sum of a row.
    fn sum(x: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                acc[l] += c[l];
            }
        }
        hsum(acc) + chunks.remainder().iter().sum::<f32>()
    }
}

row_kernel! {
    /// `x = exp(x - m)` in place.
    fn exp_sub(x: &mut [f32], m: f32) {
        for v in x.iter_mut() {
            *v = exp_neg(*v - m);
        }
    }
}

row_kernel! {
    /// `x *= a` in place.
    fn scale(x: &mut [f32], a: f32) {
        for v in x.iter_mut() {
            *v *= a;
        }
    }
}

row_kernel! {
    /// Sum of `a[i] * b[i]`.
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0f32; LANES];
        let mut ca = a.chunks_exact(LANES);
        let mut cb = b.chunks_exact(LANES);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..LANES {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s = hsum(acc);
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            s += x * y;
        }
        s
    }
}

row_kernel! {
    /// Softmax backward of one row: `ds = p * (ds - d)`, where `ds` holds dP on entry.
    fn softmax_grad(ds: &mut [f32], p: &[f32], d: f32) {
        for (g, &pv) in ds.iter_mut().zip(p) {
            *g = pv * (*g - d);
        }
    }
}

row_kernel! {
    /// Softmax backward of one row with dropout scales `z`:
    /// `ds = p * (ds * z - d)`, where `ds` holds the gradient of the dropped probabilities.
    fn softmax_grad_dropout(ds: &mut [f32], p: &[f32], z: &[f32], d: f32) {
        for ((g, &pv), &zv) in ds.iter_mut().zip(p).zip(z) {
            *g = pv * (*g * zv - d);
        }
    }
}

row_kernel! {
    /// `out = a * b` element-wise.
    fn mul_into(out: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x * y;
        }
    }
}

/// A strided read-only matrix operand: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    /// Backing storage.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// Row-major matrix with row stride `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    /// Transposed view of a row-major matrix with row stride `rs`.
    pub fn transposed(data: &'a [f32], rs: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: rs,
        }
    }

    /// Panics unless an `r x c` matrix fits in `data` (keeps `matmul` sound).
    fn check(&self, r: usize, c: usize) {
        if r > 0 && c > 0 {
            assert!((r - 1) * self.rs + (c - 1) * self.cs < self.data.len());
        }
    }
}

/// `dst (m x n, row stride dst_rs) = [dst +] lhs (m x k) * rhs (k x n)`, single-threaded.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len());
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    lhs.check(m, k);
    rhs.check(k, n);
    #[cfg(target_arch = "x86_64")]
    if rhs.cs == 1 && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2+FMA, the asserts above keep every access in
        // bounds, and `dst` is borrowed mutably so it cannot alias the operands.
        unsafe {
            avx2::matmul(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                dst_rs,
                accumulate,
                lhs.data.as_ptr(),
                lhs.rs,
                lhs.cs,
                rhs.data.as_ptr(),
                rhs.rs,
            )
        };
        return;
    }
    // SAFETY: the asserts above keep every accessed element inside the slices,
    // and `dst` is borrowed mutably so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Register-blocked AVX2+FMA product for small tiles whose right operand has contiguous rows.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Rows of the register block: 6 x 16 keeps 12 accumulators, two loads of `b` and
    /// one broadcast in flight (15 of the 16 ymm registers).
    const MR: usize = 6;

    /// `c (m x n) [+]= a (m x k) * b (k x n)`; `a` at `a[r * a_rs + p * a_cs]`, `b` at `b[p * b_rs + j]`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available and every addressed element must be in bounds.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn matmul(
        m: usize,
        n: usize,
        k: usize,
        c: *mut f32,
        c_rs: usize,
        acc: bool,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        b_rs: usize,
    ) {
        let args = Args {
            k,
            c_rs,
            acc,
            a_rs,
            a_cs,
            b_rs,
        };
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(MR);
            let (ci, ai) = (c.add(i * c_rs), a.add(i * a_rs));
            let mut j = 0;
            while j + 16 <= n {
                block::<2>(mr, &args, c.add(j).add(i * c_rs), ai, b.add(j));
                j += 16;
            }
            if j + 8 <= n {
                block::<1>(mr, &args, ci.add(j), ai, b.add(j));
                j += 8;
            }
            if j < n {
                masked(mr, n - j, &args, ci.add(j), ai, b.add(j));
            }
            i += MR;
        }
    }

    /// Strides shared by the blocks of one product.
    struct Args {
        k: usize,
        c_rs: usize,
        acc: bool,
        a_rs: usize,
        a_cs: usize,
        b_rs: usize,
    }

    /// Dispatches an `mr x 8*NV` block to the kernel with that many rows.
    #[inline(always)]
    unsafe fn block<const NV: usize>(
        mr: usize,
        s: &Args,
        c: *mut f32,
        a: *const f32,
        b: *const f32,
    ) {
        match mr {
            6 => kernel::<6, NV>(s, c, a, b),
            5 => kernel::<5, NV>(s, c, a, b),
            4 => kernel::<4, NV>(s, c, a, b),
            3 => kernel::<3, NV>(s, c, a, b),
            2 => kernel::<2, NV>(s, c, a, b),
            _ => kernel::<1, NV>(s, c, a, b),
        }
    }

    /// `R x 8*NV` register block (NV is 1 or 2): broadcast a, FMA with rows of b.
    /// Pointers advance with wrapping adds and are read unaligned, so no debug
    /// overflow or alignment checks land in the loop.
    #[inline(always)]
    unsafe fn kernel<const R: usize, const NV: usize>(
        s: &Args,
        c: *mut f32,
        a: *const f32,
        b: *const f32,
    ) {
        let mut t0 = [_mm256_setzero_ps(); R];
        let mut t1 = [_mm256_setzero_ps(); R];
        let mut ap = [a; R];
        for (r, p) in ap.iter_mut().enumerate() {
            *p = a.wrapping_add(r.wrapping_mul(s.a_rs));
        }
        let mut bp = b;
        for _ in 0..s.k {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = if NV == 2 {
                _mm256_loadu_ps(bp.wrapping_add(8))
            } else {
                b0
            };
            for r in 0..R {
                let av = _mm256_set1_ps(ap[r].read_unaligned());
                t0[r] = _mm256_fmadd_ps(av, b0, t0[r]);
                if NV == 2 {
                    t1[r] = _mm256_fmadd_ps(av, b1, t1[r]);
                }
                ap[r] = ap[r].wrapping_add(s.a_cs);
            }
            bp = bp.wrapping_add(s.b_rs);
        }
        let mut cp = c;
        for r in 0..R {
            let mut out0 = t0[r];
            if s.acc {
                out0 = _mm256_add_ps(_mm256_loadu_ps(cp), out0);
            }
            _mm256_storeu_ps(cp, out0);
            if NV == 2 {
                let c1 = cp.wrapping_add(8);
                let mut out1 = t1[r];
                if s.acc {
                    out1 = _mm256_add_ps(_mm256_loadu_ps(c1), out1);
                }
                _mm256_storeu_ps(c1, out1);
            }
            cp = cp.wrapping_add(s.c_rs);
        }
    }

    /// Fewer than 8 trailing columns (head sizes such as 36): one masked 8-lane block.
    #[inline(always)]
    unsafe fn masked(mr: usize, nr: usize, s: &Args, c: *mut f32, a: *const f32, b: *const f32) {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(nr as i32), lanes);
        match mr {
            6 => masked_kernel::<6>(s, c, a, b, mask),
            5 => masked_kernel::<5>(s, c, a, b, mask),
            4 => masked_kernel::<4>(s, c, a, b, mask),
            3 => masked_kernel::<3>(s, c, a, b, mask),
            2 => masked_kernel::<2>(s, c, a, b, mask),
            _ => masked_kernel::<1>(s, c, a, b, mask),
        }
    }

    /// `R x nr` block (nr < 8 lanes enabled in `mask`): masked loads of `b` and masked
    /// loads and stores of `c`, so nothing past the last column is touched.
    #[inline(always)]
    unsafe fn masked_kernel<const R: usize>(
        s: &Args,
        c: *mut f32,
        a: *const f32,
        b: *const f32,
        mask: __m256i,
    ) {
        let mut t = [_mm256_setzero_ps(); R];
        let mut ap = [a; R];
        for (r, p) in ap.iter_mut().enumerate() {
            *p = a.wrapping_add(r.wrapping_mul(s.a_rs));
        }
        let mut bp = b;
        for _ in 0..s.k {
            let bv = _mm256_maskload_ps(bp, mask);
            for r in 0..R {
                let av = _mm256_set1_ps(ap[r].read_unaligned());
                t[r] = _mm256_fmadd_ps(av, bv, t[r]);
                ap[r] = ap[r].wrapping_add(s.a_cs);
            }
            bp = bp.wrapping_add(s.b_rs);
        }
        let mut cp = c;
        for tr in t {
            let out = if s.acc {
                _mm256_add_ps(_mm256_maskload_ps(cp, mask), tr)
            } else {
                tr
            };
            _mm256_maskstore_ps(cp, mask, out);
            cp = cp.wrapping_add(s.c_rs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -90.0f32;
        while x <= 0.0 {
            let e = x.exp();
            let got = exp_neg(x);
            if e > 1e-37 {
                worst = worst.max(((got - e) / e).abs());
            }
            x += 0.001_3;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        let mut row = vec![
            0.0,
            -1.0,
            f32::NEG_INFINITY,
            -0.5,
            -3.0,
            -2.0,
            -0.1,
            -0.2,
            -7.0,
        ];
        let s = exp_sub_sum(&mut row, 0.0);
        let expect: f32 = [0.0f32, -1.0, -0.5, -3.0, -2.0, -0.1, -0.2, -7.0]
            .iter()
            .map(|v| v.exp())
            .sum();
        assert!((s - expect).abs() < 1e-5);
        assert_eq!(row[2], 0.0);
        assert_eq!(row_max(&row), 1.0);
    }

    #[test]
    fn matmul_matches_naive() {
        // Every register-block and edge shape, plain and transposed left operand.
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (m, n, k) in [
            (13, 37, 5),
            (6, 16, 64),
            (64, 128, 32),
            (1, 3, 1),
            (7, 24, 9),
            (64, 36, 64),
            (11, 4, 3),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            for (transposed, acc) in [(false, false), (true, true)] {
                let lhs = if transposed {
                    let mut at = vec![0f32; m * k];
                    for r in 0..m {
                        for p in 0..k {
                            at[p * m + r] = a[r * k + p];
                        }
                    }
                    at
                } else {
                    a.clone()
                };
                let lhs = if transposed {
                    MatRef::transposed(&lhs, m)
                } else {
                    MatRef::rows(&lhs, k)
                };
                let mut c = vec![0.25f32; m * n];
                matmul(m, n, k, &mut c, n, acc, lhs, MatRef::rows(&b, n));
                for r in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|p| a[r * k + p] * b[p * n + j]).sum::<f32>()
                            + if acc { 0.25 } else { 0.0 };
                        assert!((c[r * n + j] - want).abs() < 1e-5, "{m}x{n}x{k} ({r},{j})");
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_strided() {
        // a: 2x3, b: 3x2 given transposed (b^T row-major 2x3)
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let bt = [1.0, 0.0, -1.0, 2.0, 1.0, 0.5];
        let mut c = [1.0f32; 4];
        matmul(
            2,
            2,
            3,
            &mut c,
            2,
            true,
            MatRef::rows(&a, 3),
            MatRef::transposed(&bt, 3),
        );
        assert_eq!(c, [1.0 - 2.0, 1.0 + 5.5, 1.0 - 2.0, 1.0 + 16.0]);
    }
}
