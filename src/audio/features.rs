//! The reference's spectrogram features (reference-spec §2.1).
//!
//! Power-mel recipe: n_fft 512, a periodic Hann window of 400 samples placed
//! in the middle of the 512-sample frame, hop 160, centred frames with reflect
//! padding of 256 samples, |X|², 80 HTK-scale triangular filters over
//! 0–8000 Hz without area normalisation, and no logarithm. The features fed
//! to the model are these values z-normalised per mel bin over the whole
//! recording (unbiased standard deviation).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use realfft::{RealFftPlanner, RealToComplex};

/// Sample rate the features are defined at.
pub const SAMPLE_RATE: u32 = 16_000;
/// FFT size.
pub const N_FFT: usize = 512;
/// Analysis window length (zero-padded to [`N_FFT`]).
pub const WIN_LENGTH: usize = 400;
/// Hop between frames, in samples (10 ms).
pub const HOP_LENGTH: usize = 160;
/// Number of mel bins.
pub const N_MELS: usize = 80;

/// Number of one-sided FFT bins.
const N_BINS: usize = N_FFT / 2 + 1;
/// Upper edge of the mel filterbank, in Hz.
const F_MAX: f64 = 8000.0;
/// Floor added before the logarithm of [`FeatureRecipe::LogMel`].
const LOG_FLOOR: f32 = 1e-6;
/// Frames computed by one parallel task.
const FRAMES_PER_TASK: usize = 256;
/// Mel rows transposed by one parallel task.
const ROWS_PER_TASK: usize = 16;

/// Which spectrogram to compute before per-bin normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FeatureRecipe {
    /// The reference's power-mel without a logarithm; needed for reference checkpoints.
    #[default]
    PowerMel,
    /// `ln(power_mel + 1e-6)`: the conventional log-mel, for models trained from scratch.
    LogMel,
}

impl FeatureRecipe {
    /// The name stored in feature caches and checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            FeatureRecipe::PowerMel => "PowerMel",
            FeatureRecipe::LogMel => "LogMel",
        }
    }

    /// The recipe of a stored name.
    pub fn from_name(name: &str) -> Option<Self> {
        [FeatureRecipe::PowerMel, FeatureRecipe::LogMel]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// Number of frames the recipe gives for `num_samples` samples: `floor(n/160) + 1`.
pub fn num_frames(num_samples: usize) -> usize {
    num_samples / HOP_LENGTH + 1
}

/// One triangular mel filter, stored sparsely: weights for bins `start..start+weights.len()`.
#[derive(Debug, Clone)]
struct MelFilter {
    start: usize,
    weights: Vec<f32>,
}

fn hz_to_mel(hz: f64) -> f64 {
    2595.0 * (1.0 + hz / 700.0).log10()
}

fn mel_to_hz(mel: f64) -> f64 {
    700.0 * (10f64.powf(mel / 2595.0) - 1.0)
}

/// The 80 HTK triangles over `N_BINS` FFT bins spaced evenly in 0..=8000 Hz.
fn mel_filterbank() -> Vec<MelFilter> {
    let mel_max = hz_to_mel(F_MAX);
    let mut edges: Vec<f64> = (0..N_MELS + 2)
        .map(|i| mel_to_hz(mel_max * i as f64 / (N_MELS + 1) as f64))
        .collect();
    // Pin the outer edges so rounding cannot leave a sliver of weight at 8 kHz.
    edges[0] = 0.0;
    edges[N_MELS + 1] = F_MAX;
    let bin_hz = |k: usize| F_MAX * k as f64 / (N_BINS - 1) as f64;
    (0..N_MELS)
        .map(|m| {
            let (lo, mid, hi) = (edges[m], edges[m + 1], edges[m + 2]);
            let dense: Vec<f32> = (0..N_BINS)
                .map(|k| {
                    let f = bin_hz(k);
                    let rising = (f - lo) / (mid - lo);
                    let falling = (hi - f) / (hi - mid);
                    rising.min(falling).max(0.0) as f32
                })
                .collect();
            let start = dense.iter().position(|&w| w > 0.0).unwrap_or(0);
            let end = dense
                .iter()
                .rposition(|&w| w > 0.0)
                .map_or(start, |e| e + 1);
            MelFilter {
                start,
                weights: dense[start..end].to_vec(),
            }
        })
        .collect()
}

/// Periodic Hann window of [`WIN_LENGTH`] samples.
fn hann_window() -> Vec<f32> {
    (0..WIN_LENGTH)
        .map(|i| {
            let phase = 2.0 * std::f64::consts::PI * i as f64 / WIN_LENGTH as f64;
            (0.5 - 0.5 * phase.cos()) as f32
        })
        .collect()
}

/// Sample `i` of the signal extended by reflection at both ends (no edge repeat).
fn reflected(samples: &[f32], i: isize) -> f32 {
    let n = samples.len() as isize;
    match n {
        0 => 0.0,
        1 => samples[0],
        _ => {
            let period = 2 * (n - 1);
            let mut j = i.rem_euclid(period);
            if j >= n {
                j = period - j;
            }
            samples[j as usize]
        }
    }
}

/// The plan and tables shared by all frames.
struct Analyzer {
    fft: Arc<dyn RealToComplex<f32>>,
    window: Vec<f32>,
    filters: Vec<MelFilter>,
}

impl Analyzer {
    fn new() -> Self {
        Self {
            fft: RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT),
            window: hann_window(),
            filters: mel_filterbank(),
        }
    }

    /// Writes the mel energies of frames `first..first + out.len()/N_MELS` frame-major into `out`.
    fn frames(&self, samples: &[f32], first: usize, out: &mut [f32]) {
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f32; N_BINS];
        let offset = (N_FFT - WIN_LENGTH) / 2;
        let pad = (N_FFT / 2) as isize;
        for (f, row) in out.chunks_exact_mut(N_MELS).enumerate() {
            // Centre of frame t is sample t*hop; the window starts `offset` into the frame.
            let begin = ((first + f) * HOP_LENGTH + offset) as isize - pad;
            input.fill(0.0);
            let target = &mut input[offset..offset + WIN_LENGTH];
            let inside = begin >= 0 && (begin as usize + WIN_LENGTH) <= samples.len();
            if inside {
                let src = &samples[begin as usize..begin as usize + WIN_LENGTH];
                for ((t, &s), &w) in target.iter_mut().zip(src).zip(&self.window) {
                    *t = s * w;
                }
            } else {
                for (k, (t, &w)) in target.iter_mut().zip(&self.window).enumerate() {
                    *t = reflected(samples, begin + k as isize) * w;
                }
            }
            self.fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .expect("FFT buffers are sized by the plan");
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.re * c.re + c.im * c.im;
            }
            for (r, filter) in row.iter_mut().zip(&self.filters) {
                let bins = &power[filter.start..filter.start + filter.weights.len()];
                *r = bins.iter().zip(&filter.weights).map(|(p, w)| p * w).sum();
            }
        }
    }
}

/// Raw power-mel spectrogram of 16 kHz samples.
///
/// Returns the values laid out as (80, T) row-major (mel bin major, like the
/// reference's (1, 80, T) tensor) and T = `floor(n/160) + 1`. Frames are
/// computed in parallel with rayon.
pub fn mel_spectrogram(samples: &[f32]) -> (Vec<f32>, usize) {
    let frames = num_frames(samples.len());
    let analyzer = Analyzer::new();
    let mut frame_major = vec![0f32; frames * N_MELS];
    frame_major
        .par_chunks_mut(FRAMES_PER_TASK * N_MELS)
        .enumerate()
        .for_each(|(task, out)| analyzer.frames(samples, task * FRAMES_PER_TASK, out));
    // Transpose to bin-major, a group of rows at a time so that each source
    // cache line is read once per group rather than once per row.
    let mut bin_major = vec![0f32; frames * N_MELS];
    bin_major
        .par_chunks_mut(frames * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(group, rows)| {
            let first = group * ROWS_PER_TASK;
            let count = rows.len() / frames;
            for (t, src) in frame_major.chunks_exact(N_MELS).enumerate() {
                for (r, &v) in src[first..first + count].iter().enumerate() {
                    rows[r * frames + t] = v;
                }
            }
        });
    (bin_major, frames)
}

/// Normalises each mel bin (row of `frames` values) to zero mean and unit
/// unbiased (N−1) standard deviation over time, in place.
///
/// A row whose standard deviation is zero or undefined (a single frame) is
/// only centred, instead of becoming NaN or infinite.
pub fn normalize_per_bin(mel: &mut [f32], frames: usize) {
    if frames == 0 {
        return;
    }
    mel.par_chunks_mut(frames).for_each(|row| {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let std = var.sqrt();
        let scale = if std.is_finite() && std > 0.0 {
            1.0 / std
        } else {
            1.0
        };
        for v in row.iter_mut() {
            *v = ((*v as f64 - mean) * scale) as f32;
        }
    });
}

/// The model input for 16 kHz samples under `recipe`: the spectrogram
/// normalised per bin, as a (1, 80, T) f32 tensor on the CPU.
pub fn features_with(samples: &[f32], recipe: FeatureRecipe) -> candle_core::Result<Tensor> {
    let (mut mel, frames) = mel_spectrogram(samples);
    if recipe == FeatureRecipe::LogMel {
        mel.par_iter_mut().for_each(|v| *v = (*v + LOG_FLOOR).ln());
    }
    normalize_per_bin(&mut mel, frames);
    Tensor::from_vec(mel, (1, N_MELS, frames), &Device::Cpu)
}

/// The reference's model input for 16 kHz samples: normalised power-mel, (1, 80, T).
pub fn features(samples: &[f32]) -> candle_core::Result<Tensor> {
    features_with(samples, FeatureRecipe::PowerMel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filterbank_edges_match_the_spec() {
        let fb = mel_filterbank();
        assert_eq!(fb[0].start, 1);
        assert_eq!(fb[0].weights.len(), 1);
        assert!((fb[0].weights[0] - 0.5999).abs() < 1e-3);
        assert_eq!(fb[79].start, 240);
        assert_eq!(fb[79].start + fb[79].weights.len() - 1, 255);
    }

    #[test]
    fn reflection_has_no_edge_repeat() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let got: Vec<f32> = (-3..7).map(|i| reflected(&x, i)).collect();
        assert_eq!(got, [4.0, 3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0]);
    }

    #[test]
    fn frame_count_and_empty_input() {
        assert_eq!(num_frames(32000), 201);
        let (mel, frames) = mel_spectrogram(&[]);
        assert_eq!(frames, 1);
        assert!(mel.iter().all(|&v| v == 0.0));
    }
}
