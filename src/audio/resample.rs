//! Sample-rate conversion of whole mono signals.
//!
//! [`Resampler::Reference`] reproduces the reference's resampler (a band-limited
//! interpolator with a Hann-windowed sinc kernel, 6 zero crossings, cut-off at
//! 0.99 of the lower Nyquist frequency, applied as a polyphase filter bank for
//! the gcd-reduced rate ratio), so features match reference checkpoints.
//! [`Resampler::Fast`] uses rubato's FFT resampler.

use rayon::prelude::*;
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler as _};

/// Zero crossings of the sinc on each side of the kernel centre.
const ZERO_CROSSINGS: f64 = 6.0;
/// Cut-off as a fraction of the lower of the two Nyquist frequencies.
const ROLLOFF: f64 = 0.99;
/// Output samples computed by one parallel task.
const OUTPUTS_PER_TASK: usize = 16_384;
/// Input chunk size of the rubato FFT resampler.
const FFT_CHUNK: usize = 1024;

/// Which resampling algorithm to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resampler {
    /// The reference's windowed-sinc resampler (needed for reference checkpoints).
    #[default]
    Reference,
    /// rubato's FFT resampler: faster, with a cleaner stopband, not sample-identical.
    Fast,
}

/// Resamples `x` from `from` Hz to `to` Hz.
///
/// Returns the input unchanged when the rates are equal or either is zero.
/// The reference kind gives `ceil(len·to/from)` samples (with the ratio
/// reduced by the gcd first).
pub fn resample(x: &[f32], from: u32, to: u32, kind: Resampler) -> Vec<f32> {
    if from == to || from == 0 || to == 0 || x.is_empty() {
        return x.to_vec();
    }
    match kind {
        Resampler::Reference => PolyphaseSinc::new(from, to).apply(x),
        Resampler::Fast => fft_resample(x, from, to),
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One output phase of the filter bank: taps applied to input samples
/// starting at `block·orig + offset` (indices relative to the unpadded input).
struct Phase {
    offset: isize,
    taps: Vec<f32>,
}

/// The windowed-sinc filter bank for a reduced ratio `orig → new`.
struct PolyphaseSinc {
    orig: usize,
    new: usize,
    phases: Vec<Phase>,
}

impl PolyphaseSinc {
    fn new(from: u32, to: u32) -> Self {
        let g = gcd(from as u64, to as u64);
        let orig = (from as u64 / g) as usize;
        let new = (to as u64 / g) as usize;
        // Cut-off in units of the reduced rates.
        let cutoff = orig.min(new) as f64 * ROLLOFF;
        // Half-width of the kernel in input samples, rounded up.
        let width = (ZERO_CROSSINGS * orig as f64 / cutoff).ceil() as isize;
        let scale = cutoff / orig as f64;
        let phases = (0..new)
            .map(|i| {
                // Input sample k (relative to block start) sits at time k/orig;
                // output phase i sits at time i/new. The kernel is a function of
                // the distance between them, measured in cut-off periods.
                let mut first = None;
                let mut taps = Vec::new();
                for k in -width..width + orig as isize {
                    let x = (k as f64 / orig as f64 - i as f64 / new as f64) * cutoff;
                    if x.abs() >= ZERO_CROSSINGS {
                        // Outside the window the kernel is (numerically) zero.
                        if first.is_some() {
                            break;
                        }
                        continue;
                    }
                    first.get_or_insert(k);
                    let window = (x * std::f64::consts::PI / (2.0 * ZERO_CROSSINGS))
                        .cos()
                        .powi(2);
                    let arg = x * std::f64::consts::PI;
                    let sinc = if arg == 0.0 { 1.0 } else { arg.sin() / arg };
                    taps.push((sinc * window * scale) as f32);
                }
                Phase {
                    offset: first.unwrap_or(0),
                    taps,
                }
            })
            .collect();
        Self { orig, new, phases }
    }

    /// Output length for `n` input samples: `ceil(n·new/orig)`.
    fn output_len(&self, n: usize) -> usize {
        (n as u128 * self.new as u128).div_ceil(self.orig as u128) as usize
    }

    /// Output sample `j` of the resampled signal (zero outside the input).
    fn sample(&self, x: &[f32], j: usize) -> f32 {
        let block = (j / self.new) * self.orig;
        let phase = &self.phases[j % self.new];
        let start = block as isize + phase.offset;
        let end = start + phase.taps.len() as isize;
        if start >= 0 && end as usize <= x.len() {
            let src = &x[start as usize..end as usize];
            return src.iter().zip(&phase.taps).map(|(a, b)| a * b).sum();
        }
        let mut acc = 0f32;
        for (t, &w) in phase.taps.iter().enumerate() {
            let k = start + t as isize;
            if k >= 0 && (k as usize) < x.len() {
                acc += x[k as usize] * w;
            }
        }
        acc
    }

    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; self.output_len(x.len())];
        out.par_chunks_mut(OUTPUTS_PER_TASK)
            .enumerate()
            .for_each(|(task, chunk)| {
                let first = task * OUTPUTS_PER_TASK;
                for (o, v) in chunk.iter_mut().enumerate() {
                    *v = self.sample(x, first + o);
                }
            });
        out
    }
}

/// rubato's synchronous FFT resampler over the whole signal (delay trimmed).
///
/// Rate pairs rubato rejects fall back to the reference algorithm.
fn fft_resample(x: &[f32], from: u32, to: u32) -> Vec<f32> {
    let fallback = || PolyphaseSinc::new(from, to).apply(x);
    let Ok(mut resampler) =
        Fft::<f32>::new(from as usize, to as usize, FFT_CHUNK, 1, FixedSync::Both)
    else {
        return fallback();
    };
    let Ok(input) = InterleavedSlice::new(x, 1, x.len()) else {
        return fallback();
    };
    match resampler.process_all(&input, x.len(), None) {
        Ok(out) => out.take_data(),
        Err(_) => fallback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_length_is_ceil_of_ratio() {
        let r = PolyphaseSinc::new(44_100, 16_000);
        assert_eq!((r.orig, r.new), (441, 160));
        assert_eq!(r.output_len(88_200), 32_000);
        assert_eq!(r.output_len(1), 1);
        assert_eq!(r.output_len(442), 161);
    }

    #[test]
    fn dc_gain_is_close_to_one() {
        let x = vec![1.0f32; 4800];
        let y = resample(&x, 48_000, 16_000, Resampler::Reference);
        assert_eq!(y.len(), 1600);
        for v in &y[100..1500] {
            assert!((v - 1.0).abs() < 2e-2, "{v}");
        }
    }
}
