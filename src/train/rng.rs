//! Seeded randomness for a run: one independent ChaCha8 stream per purpose
//! ("init", "shuffle", "specaugment", "dropout", ...), derived from the master
//! seed and the tag, each with a saveable position so that a resumed run draws
//! exactly the numbers the uninterrupted run would have drawn.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// All random streams of a run.
#[derive(Clone, Debug)]
pub struct RunRng {
    master_seed: u64,
    streams: BTreeMap<String, RngStream>,
}

/// Saved positions of every stream used so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRngState {
    /// The run's master seed.
    pub master_seed: u64,
    /// Tag → position in 32-bit words, as a decimal string (it can exceed 64 bits).
    pub positions: BTreeMap<String, String>,
}

impl RunRng {
    /// The streams of a run with this master seed.
    pub fn new(master_seed: u64) -> Self {
        Self {
            master_seed,
            streams: BTreeMap::new(),
        }
    }

    /// The master seed.
    pub fn master_seed(&self) -> u64 {
        self.master_seed
    }

    /// The stream for `tag`, created at its start on first use.
    pub fn stream(&mut self, tag: &str) -> &mut RngStream {
        let seed = self.master_seed;
        self.streams
            .entry(tag.to_string())
            .or_insert_with(|| RngStream::derive(seed, tag))
    }

    /// Positions of every stream, for a checkpoint.
    pub fn state(&self) -> RunRngState {
        RunRngState {
            master_seed: self.master_seed,
            positions: self
                .streams
                .iter()
                .map(|(tag, s)| (tag.clone(), s.rng.get_word_pos().to_string()))
                .collect(),
        }
    }

    /// The streams as saved by [`RunRng::state`].
    pub fn from_state(state: &RunRngState) -> Result<Self> {
        let mut rng = Self::new(state.master_seed);
        for (tag, pos) in &state.positions {
            let pos: u128 = pos
                .parse()
                .map_err(|_| anyhow!("RNG state: bad position `{pos}` for stream `{tag}`"))?;
            rng.stream(tag).rng.set_word_pos(pos);
        }
        Ok(rng)
    }
}

/// One deterministic random stream.
#[derive(Clone, Debug)]
pub struct RngStream {
    rng: ChaCha8Rng,
}

impl RngStream {
    /// The stream of `tag` under `master_seed`: ChaCha8 keyed by SHA-256(seed, tag).
    pub fn derive(master_seed: u64, tag: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"lcasr-rng-v1");
        h.update(master_seed.to_le_bytes());
        h.update(tag.as_bytes());
        let key: [u8; 32] = h.finalize().into();
        Self {
            rng: ChaCha8Rng::from_seed(key),
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// A uniform f64 in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// `n` values uniform in [lo, hi).
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (lo as f64 + (hi as f64 - lo as f64) * self.uniform()) as f32)
            .collect()
    }

    /// `n` normal values with this mean and standard deviation (Box–Muller).
    pub fn normal_vec(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let u1 = 1.0 - self.uniform(); // (0, 1]
            let u2 = self.uniform();
            let r = (-2.0 * u1.ln()).sqrt();
            let theta = 2.0 * std::f64::consts::PI * u2;
            for z in [r * theta.cos(), r * theta.sin()] {
                if out.len() < n {
                    out.push((mean as f64 + std as f64 * z) as f32);
                }
            }
        }
        out
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(rng: &mut RunRng) -> (u64, Vec<f32>, Vec<f32>, Vec<usize>) {
        (
            rng.stream("shuffle").next_u64(),
            rng.stream("init").normal_vec(7, 0.0, 1.0),
            rng.stream("specaugment").uniform_vec(5, -1.0, 2.0),
            rng.stream("shuffle").permutation(10),
        )
    }

    #[test]
    fn restored_streams_continue_identically() {
        let mut straight = RunRng::new(1234);
        draw(&mut straight);
        let saved = serde_json::to_string(&straight.state()).unwrap();
        let next = draw(&mut straight);
        let state: RunRngState = serde_json::from_str(&saved).unwrap();
        let mut resumed = RunRng::from_state(&state).unwrap();
        assert_eq!(draw(&mut resumed), next);
    }

    #[test]
    fn streams_depend_on_tag_and_seed_only() {
        let mut a = RunRng::new(7);
        let mut b = RunRng::new(7);
        // Using another stream first does not shift this one.
        b.stream("dropout").next_u64();
        assert_eq!(a.stream("init").next_u64(), b.stream("init").next_u64());
        assert_ne!(a.stream("init").next_u64(), a.stream("shuffle").next_u64());
        assert_ne!(
            RunRng::new(8).stream("init").next_u64(),
            RunRng::new(7).stream("init").next_u64()
        );
    }

    #[test]
    fn helpers_have_the_right_distributions() {
        let mut rng = RunRng::new(99);
        let s = rng.stream("test");
        let n = 20_000;
        let v = s.normal_vec(n, 1.0, 2.0);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05);
        let uv = s.uniform_vec(n, -3.0, 5.0);
        assert!(uv.iter().all(|&x| (-3.0..5.0).contains(&x)));
        let mut p = s.permutation(1000);
        assert_ne!(p, (0..1000).collect::<Vec<_>>());
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<_>>());
    }
}
