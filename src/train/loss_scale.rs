//! Dynamic loss scaling for float16 training, with the policy of PyTorch's
//! `GradScaler`: the loss is multiplied by `scale` before backward so that
//! small gradients survive float16, the gradients are divided by it before
//! the optimizer step, a step whose gradients overflowed is skipped and
//! halves the scale, and every `GROWTH_INTERVAL` finite steps in a row double
//! it. The scale is a power of two, so scaling and unscaling are exact.

use serde::{Deserialize, Serialize};

/// The first scale (2^16).
pub const INITIAL_SCALE: f64 = 65536.0;
/// Finite steps in a row before the scale doubles.
pub const GROWTH_INTERVAL: u64 = 2000;
/// The scale never shrinks below this (2^-24, float16's smallest subnormal).
pub const MIN_SCALE: f64 = 5.960_464_477_539_063e-8;

/// The scale and its counter: everything a checkpoint must hold.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// The current factor.
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        Self {
            scale: INITIAL_SCALE,
            good_steps: 0,
        }
    }
}

impl LossScale {
    /// Records one optimizer step whose gradients were `finite` (or not).
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale * 0.5).max(MIN_SCALE);
            self.good_steps = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_a_run_of_good_steps_doubles() {
        let mut s = LossScale::default();
        s.update(false);
        assert_eq!(
            s,
            LossScale {
                scale: 32768.0,
                good_steps: 0
            }
        );
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(true);
        }
        assert_eq!(s.scale, 32768.0);
        s.update(true);
        assert_eq!(
            s,
            LossScale {
                scale: 65536.0,
                good_steps: 0
            }
        );
        // An overflow restarts the count.
        s.update(true);
        s.update(false);
        assert_eq!(
            s,
            LossScale {
                scale: 32768.0,
                good_steps: 0
            }
        );
        let mut tiny = LossScale {
            scale: MIN_SCALE,
            good_steps: 5,
        };
        tiny.update(false);
        assert_eq!(tiny.scale, MIN_SCALE);
    }
}
