//! SpecAugment on a padded batch of features (reference-spec §1.9 and §7):
//! time masks, then frequency masks, filled with 0 or with the mean of the
//! batch's valid elements.
//!
//! The reference draws each time mask over the padded chunk length, so masks
//! can land in padding. [`SpecAugmentOptions::time_axis_is_valid_length`] (on
//! by default) draws time masks within each example's valid length instead and
//! keeps frequency masks out of the padding, so padding is never written.

use candle_core::{DType, Tensor};

use crate::config::SpecAugmentConfig;
use crate::train::rng::RngStream;

/// Choices that depart from the reference behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecAugmentOptions {
    /// true: time masks are drawn within each example's valid length (iid
    /// masks) or the batch's shortest valid length (shared masks), and
    /// frequency masks fill only valid frames, so padding is never written.
    /// false: the reference behaviour (time masks over the padded length,
    /// frequency masks over every frame).
    pub time_axis_is_valid_length: bool,
}

impl Default for SpecAugmentOptions {
    fn default() -> Self {
        Self {
            time_axis_is_valid_length: true,
        }
    }
}

/// The axis a mask runs along.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskAxis {
    /// Frames.
    Time,
    /// Frequency bins.
    Freq,
}

/// One mask as applied to one example: indices `start..end` along `axis`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskSpan {
    /// The axis masked.
    pub axis: MaskAxis,
    /// The example (batch index).
    pub example: usize,
    /// First masked index.
    pub start: usize,
    /// One past the last masked index (`end == start` for an empty mask).
    pub end: usize,
}

/// What one call did, for logging and checks.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecAugmentReport {
    /// The value written into masked elements.
    pub mask_value: f32,
    /// Every drawn mask, in draw order (time masks first), one entry per
    /// example; a shared (non-iid) mask appears once per example.
    pub spans: Vec<MaskSpan>,
    /// Uniform numbers consumed.
    pub draws: usize,
    /// Distinct elements overwritten (padding included).
    pub masked_elements: usize,
    /// Distinct valid elements (`t < length`) overwritten.
    pub masked_valid_elements: usize,
    /// Valid elements in the batch.
    pub valid_elements: usize,
}

/// SpecAugment in place on `x`, a row-major `(batch, freq, time)` buffer,
/// drawing from `rng`. `lengths[b]` is the valid frame count of example `b`
/// (values above `time` count as `time`).
///
/// # Panics
/// If `x.len() != batch * freq * time` or `lengths.len() != batch`.
#[allow(clippy::too_many_arguments)]
pub fn spec_augment(
    x: &mut [f32],
    batch: usize,
    freq: usize,
    time: usize,
    lengths: &[usize],
    cfg: &SpecAugmentConfig,
    rng: &mut RngStream,
    opts: SpecAugmentOptions,
) -> SpecAugmentReport {
    spec_augment_with_draws(x, batch, freq, time, lengths, cfg, opts, || rng.uniform())
}

/// [`spec_augment`] on a `(batch, freq, time)` tensor of any float dtype and
/// device; returns a new tensor of the same dtype and device (not tracked by
/// autograd).
pub fn spec_augment_tensor(
    x: &Tensor,
    lengths: &[usize],
    cfg: &SpecAugmentConfig,
    rng: &mut RngStream,
    opts: SpecAugmentOptions,
) -> candle_core::Result<Tensor> {
    let (batch, freq, time) = x.dims3()?;
    if lengths.len() != batch {
        candle_core::bail!(
            "spec_augment: {} lengths for a batch of {batch}",
            lengths.len()
        );
    }
    let mut data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    spec_augment(&mut data, batch, freq, time, lengths, cfg, rng, opts);
    Tensor::from_vec(data, (batch, freq, time), x.device())?.to_dtype(x.dtype())
}

/// [`spec_augment`] with the uniform `[0, 1)` numbers taken from `draw`, in
/// the reference order: per mask, all widths (`value = U·M`) then all starts
/// (`min_value = U·(axis_len − value)`), one of each per example for iid
/// masks or one of each for the batch otherwise; no draws for a skipped mask.
///
/// # Panics
/// If `x.len() != batch * freq * time` or `lengths.len() != batch`.
#[allow(clippy::too_many_arguments)]
pub fn spec_augment_with_draws(
    x: &mut [f32],
    batch: usize,
    freq: usize,
    time: usize,
    lengths: &[usize],
    cfg: &SpecAugmentConfig,
    opts: SpecAugmentOptions,
    mut draw: impl FnMut() -> f64,
) -> SpecAugmentReport {
    assert_eq!(x.len(), batch * freq * time, "spec_augment: buffer size");
    assert_eq!(lengths.len(), batch, "spec_augment: lengths per example");
    let lengths: Vec<usize> = lengths.iter().map(|&l| l.min(time)).collect();
    let mask_value = if cfg.zero_masking {
        0.0
    } else {
        valid_mean(x, freq, time, &lengths)
    };
    let fix = opts.time_axis_is_valid_length;
    let mut drawer = Drawer {
        draw: &mut draw,
        draws: 0,
        iid: cfg.iid_masks,
        p: cfg.p,
    };

    let mut spans = Vec::new();
    let time_axis: Vec<usize> = if fix {
        lengths.clone()
    } else {
        vec![time; batch]
    };
    let time_width = time_mask_width(cfg, time);
    for _ in 0..cfg.n_time_masks {
        drawer.mask(MaskAxis::Time, &time_axis, time_width, &mut spans);
    }
    let freq_axis = vec![freq; batch];
    for _ in 0..cfg.n_freq_masks {
        drawer.mask(MaskAxis::Freq, &freq_axis, cfg.freq_mask_param, &mut spans);
    }
    let draws = drawer.draws;

    // Frames a frequency mask may write in each example.
    let freq_limit: Vec<usize> = if fix {
        lengths.clone()
    } else {
        vec![time; batch]
    };
    let mut time_hit = vec![false; batch * time];
    let mut freq_hit = vec![false; batch * freq];
    for s in &spans {
        let b = s.example;
        match s.axis {
            MaskAxis::Time => {
                time_hit[b * time + s.start..b * time + s.end].fill(true);
                for f in 0..freq {
                    let row = (b * freq + f) * time;
                    x[row + s.start..row + s.end].fill(mask_value);
                }
            }
            MaskAxis::Freq => {
                freq_hit[b * freq + s.start..b * freq + s.end].fill(true);
                for f in s.start..s.end {
                    let row = (b * freq + f) * time;
                    x[row..row + freq_limit[b]].fill(mask_value);
                }
            }
        }
    }

    let (mut masked_elements, mut masked_valid_elements) = (0, 0);
    for b in 0..batch {
        let hits = &time_hit[b * time..(b + 1) * time];
        let count = |n: usize| hits[..n].iter().filter(|&&h| h).count();
        let n_freq = freq_hit[b * freq..(b + 1) * freq]
            .iter()
            .filter(|&&h| h)
            .count();
        let n_time_valid = count(lengths[b]);
        let n_time_limit = count(freq_limit[b]);
        masked_elements += count(time) * freq + n_freq * (freq_limit[b] - n_time_limit);
        masked_valid_elements += n_time_valid * freq + n_freq * (lengths[b] - n_time_valid);
    }
    SpecAugmentReport {
        mask_value,
        spans,
        draws,
        masked_elements,
        masked_valid_elements,
        valid_elements: lengths.iter().sum::<usize>() * freq,
    }
}

/// The time-mask width parameter W: `time_mask_param`, or
/// `int(int(T·min_p) / n_time_masks)` when `min_p` is set (T: padded length).
fn time_mask_width(cfg: &SpecAugmentConfig, time: usize) -> i64 {
    if cfg.min_p != -1.0 && cfg.n_time_masks > 0 {
        (time as f64 * cfg.min_p) as i64 / cfg.n_time_masks as i64
    } else {
        cfg.time_mask_param
    }
}

/// Mean of the elements with `t < lengths[b]` over the whole batch (0 when
/// there are none).
fn valid_mean(x: &[f32], freq: usize, time: usize, lengths: &[usize]) -> f32 {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (b, &len) in lengths.iter().enumerate() {
        for f in 0..freq {
            let row = (b * freq + f) * time;
            sum += x[row..row + len].iter().map(|&v| v as f64).sum::<f64>();
        }
        count += freq * len;
    }
    if count == 0 {
        0.0
    } else {
        (sum / count as f64) as f32
    }
}

/// Draws mask positions from a stream of uniform numbers.
struct Drawer<'a, F: FnMut() -> f64> {
    draw: &'a mut F,
    draws: usize,
    iid: bool,
    p: f64,
}

impl<F: FnMut() -> f64> Drawer<'_, F> {
    fn uniform(&mut self) -> f64 {
        self.draws += 1;
        (self.draw)()
    }

    /// Largest width bound M for an axis of `len`: W, capped at `int(len·p)`
    /// unless p is 1.
    fn bound(&self, width: i64, len: usize) -> i64 {
        if self.p == 1.0 {
            width
        } else {
            width.min((len as f64 * self.p) as i64)
        }
    }

    /// One mask along `axis` (per-example axis lengths `lens`), appended to
    /// `spans`; nothing is drawn when the bound M is below 1.
    fn mask(&mut self, axis: MaskAxis, lens: &[usize], width: i64, spans: &mut Vec<MaskSpan>) {
        if self.iid {
            let bounds: Vec<i64> = lens.iter().map(|&n| self.bound(width, n)).collect();
            if bounds.iter().all(|&m| m < 1) {
                return;
            }
            let values: Vec<f64> = bounds
                .iter()
                .map(|&m| self.uniform() * m.max(0) as f64)
                .collect();
            for (example, (&n, &value)) in lens.iter().zip(&values).enumerate() {
                let min_value = self.uniform() * (n as f64 - value);
                let (start, end) = span(value, min_value, n);
                spans.push(MaskSpan {
                    axis,
                    example,
                    start,
                    end,
                });
            }
        } else {
            let n = lens.iter().copied().min().unwrap_or(0);
            let m = self.bound(width, n);
            if m < 1 {
                return;
            }
            let value = self.uniform() * m as f64;
            let min_value = self.uniform() * (n as f64 - value);
            let (start, end) = span(value, min_value, n);
            spans.extend((0..lens.len()).map(|example| MaskSpan {
                axis,
                example,
                start,
                end,
            }));
        }
    }
}

/// The index range `[trunc(min_value), trunc(min_value) + trunc(value))`,
/// clipped to `0..len`.
fn span(value: f64, min_value: f64, len: usize) -> (usize, usize) {
    let start = min_value as i64;
    let end = start + value as i64;
    let len = len as i64;
    let start = start.clamp(0, len);
    (start as usize, end.clamp(start, len) as usize)
}
