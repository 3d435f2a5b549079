//! Counter-based dropout mask for the attention probabilities.
//!
//! Whether entry (b, h, i, j) is kept depends only on (seed, b, h, i, j), so
//! the backward pass regenerates exactly the forward mask without storing it.

/// SplitMix64 finaliser.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A 32-bit bijective mixer ("lowbias32").
#[inline(always)]
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// Dropout parameters resolved for the kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dropout {
    /// The mask's seed.
    pub(crate) seed: u64,
    /// An entry is kept iff its hash is `>= threshold`.
    pub(crate) threshold: u32,
    /// Value of a kept entry of the scale mask: `1 / (1 - p)`.
    pub(crate) keep_scale: f32,
}

impl Dropout {
    /// Dropout with probability `p` in `[0, 1)` and the given seed.
    pub fn new(p: f32, seed: u64) -> Self {
        let threshold = (f64::from(p) * 4_294_967_296.0)
            .round()
            .min(u32::MAX as f64) as u32;
        Self {
            seed,
            threshold,
            keep_scale: 1.0 / (1.0 - p),
        }
    }

    /// Key of one attention row; combined with the column index by [`Dropout::fill_row`].
    pub fn row_key(&self, b: usize, h: usize, i: usize) -> u32 {
        let mut k = mix64(self.seed);
        k = mix64(k ^ b as u64);
        k = mix64(k ^ h as u64);
        k = mix64(k ^ i as u64);
        (k ^ (k >> 32)) as u32
    }

    /// Whether column `j` of the row with key `row_key` is kept.
    #[inline(always)]
    fn keep(&self, row_key: u32, j: usize) -> bool {
        mix32(row_key ^ (j as u32).wrapping_mul(0x9E37_79B9)) >= self.threshold
    }

    /// `z[c] = 1/(1-p)` if column `j0 + c` is kept, else 0.
    pub fn fill_row(&self, z: &mut [f32], row_key: u32, j0: usize) {
        for (c, v) in z.iter_mut().enumerate() {
            *v = if self.keep(row_key, j0.wrapping_add(c)) {
                self.keep_scale
            } else {
                0.0
            };
        }
    }
}

/// Whether the attention dropout with probability `p` and `seed` keeps the
/// probability of query `i` on key `j` in batch item `b`, head `h`
/// (exposed so tests can rebuild the mask).
#[doc(hidden)]
pub fn dropout_keep(p: f32, seed: u64, b: usize, h: usize, i: usize, j: usize) -> bool {
    let d = Dropout::new(p, seed);
    d.keep(d.row_key(b, h, i), j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rate_matches_p() {
        let d = Dropout::new(0.3, 7);
        let mut z = vec![0f32; 1000];
        let mut kept = 0usize;
        for i in 0..200 {
            d.fill_row(&mut z, d.row_key(1, 2, i), 5);
            kept += z.iter().filter(|&&v| v > 0.0).count();
            assert!(z.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
        }
        let rate = kept as f64 / 200_000.0;
        assert!((rate - 0.7).abs() < 0.005, "keep rate {rate}");
        d.fill_row(&mut z, d.row_key(1, 2, 3), 0);
        for (j, &v) in z.iter().enumerate().take(50) {
            assert_eq!(dropout_keep(0.3, 7, 1, 2, 3, j), v > 0.0);
        }
    }
}
