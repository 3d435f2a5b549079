//! Helpers shared by the fused-op tests: a seeded generator, gradient collection
//! through `(out * random).sum_all().backward()`, and relative comparisons.
#![allow(dead_code)]

use candle_core::{Device, Result, Tensor, Var};

/// SplitMix64: a tiny seeded generator (candle's CPU RNG cannot be seeded).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    /// A tensor of uniform values in [lo, hi).
    pub fn tensor(&mut self, dims: &[usize], lo: f32, hi: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.uniform(lo, hi)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// A trainable variable of uniform values in [lo, hi).
    pub fn var(&mut self, dims: &[usize], lo: f32, hi: f32) -> Var {
        Var::from_tensor(&self.tensor(dims, lo, hi)).unwrap()
    }
}

/// Gradients of `(out * probe).sum_all()` with respect to `vars`.
pub fn grads(out: &Tensor, probe: &Tensor, vars: &[&Var]) -> Result<Vec<Tensor>> {
    let g = (out * probe)?.sum_all()?.backward()?;
    Ok(vars
        .iter()
        .map(|v| {
            g.get(v.as_tensor())
                .cloned()
                .unwrap_or_else(|| panic!("no gradient for a variable"))
        })
        .collect())
}

/// Asserts max |a - b| <= tol * max(max |b|, 1e-3), printing `what` on failure.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape mismatch");
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        a.iter().all(|v| v.is_finite()),
        "{what}: non-finite values in the fused result"
    );
    assert!(
        diff <= tol * scale,
        "{what}: max abs diff {diff} exceeds {tol} * {scale}"
    );
}

/// Checks the fused and composed versions of an op on the same variables:
/// the outputs and the gradients of every variable must agree.
pub fn check_op(
    what: &str,
    rng: &mut Rng,
    vars: &[&Var],
    fused: impl Fn() -> Result<Tensor>,
    composed: impl Fn() -> Result<Tensor>,
    tol: f32,
) {
    let yf = fused().unwrap();
    let yc = composed().unwrap();
    assert_close(&format!("{what} forward"), &yf, &yc, tol);
    let probe = rng.tensor(yf.dims(), -1.0, 1.0);
    let gf = grads(&yf, &probe, vars).unwrap();
    let gc = grads(&yc, &probe, vars).unwrap();
    for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
        assert_close(&format!("{what} grad of input {i}"), a, b, tol);
    }
}
