//! Rotary position embedding tables (rotate-half / GPT-NeoX convention).
//!
//! The tables are computed in f32 the way the reference does: the exponent
//! `2i / head_dim` and the power are f32, positions are `p / factor` in f32,
//! and the angle is the f32 product of position and frequency.

/// Inverse frequencies `inv_freq[i] = 1 / base^(2i/head_dim)` for
/// `i < head_dim / 2`, computed in f32.
pub fn inv_freq(base: f64, head_dim: usize) -> Vec<f32> {
    let base = base as f32;
    (0..head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0f32 / base.powf(exponent)
        })
        .collect()
}

/// cos/sin tables, each `(n, head_dim)` row-major with `head_dim = 2 * inv_freq.len()`,
/// for positions `p = 0..n-1` divided by `interpolation_factor`:
/// `angle[p, j] = p / f * inv_freq[j mod head_dim/2]` (the first half duplicated),
/// computed in f32 like the reference.
pub fn rotary_tables(
    inv_freq: &[f32],
    n: usize,
    interpolation_factor: f32,
) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let dh = 2 * half;
    let mut cos = vec![0f32; n * dh];
    let mut sin = vec![0f32; n * dh];
    for p in 0..n {
        let t = p as f32 / interpolation_factor;
        let row = p * dh;
        for (j, &f) in inv_freq.iter().enumerate() {
            let angle = t * f;
            let (s, c) = angle.sin_cos();
            cos[row + j] = c;
            cos[row + j + half] = c;
            sin[row + j] = s;
            sin[row + j + half] = s;
        }
    }
    (cos, sin)
}
