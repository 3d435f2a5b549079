//! The CTC training loss as the training loop uses it: reductions over the
//! batch, and the reference trainer's scaling of the loss it backpropagates
//! and of the loss it logs (reference-spec §5.4).

use candle_core::{Result, Tensor};
use lcasr_kernels::ctc::ctc_loss;

/// How per-item CTC losses are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// The (B,) per-item negative log-likelihoods.
    None,
    /// Their sum (the reference trainer's choice).
    Sum,
    /// torch's `mean`: each item divided by its target length (at least 1),
    /// then averaged over the batch.
    Mean,
}

/// CTC loss of (B, T, C) logits or log-probabilities against `targets`, with
/// `input_lengths` valid frames per item and class `blank` as the blank.
pub fn ctc(
    logits: &Tensor,
    targets: &[Vec<u32>],
    input_lengths: &[usize],
    blank: u32,
    reduction: Reduction,
    zero_infinity: bool,
) -> Result<Tensor> {
    let nll = ctc_loss(logits, targets, input_lengths, blank, zero_infinity)?;
    match reduction {
        Reduction::None => Ok(nll),
        Reduction::Sum => nll.sum_all(),
        Reduction::Mean => {
            let lens: Vec<f32> = targets.iter().map(|t| t.len().max(1) as f32).collect();
            let lens = Tensor::from_vec(lens, targets.len(), nll.device())?;
            nll.div(&lens)?.mean_all()
        }
    }
}

/// The loss the reference backpropagates for a group of `n_chunks` chunks
/// whose summed CTC is `loss_sum`: `loss_sum / (chunk_size · batch_size) · 100`
/// with the scheduler's nominal chunk length (frames) and batch size, so a
/// short last chunk or a shrunken batch contributes proportionally less.
///
/// With `backwards_every > 1` the reference multiplies by the number of summed
/// chunks, a bug (reference-spec §10.3); this divides by it, which averages
/// the group, unless `compat_multiply` asks for the reference's behaviour.
pub fn backward_loss(
    loss_sum: &Tensor,
    chunk_size: usize,
    batch_size: usize,
    n_chunks: usize,
    compat_multiply: bool,
) -> Result<Tensor> {
    let scale = 100.0 / (chunk_size as f64 * batch_size as f64);
    let n = n_chunks.max(1) as f64;
    let scale = if compat_multiply {
        scale * n
    } else {
        scale / n
    };
    loss_sum.affine(scale, 0.0)
}

/// The loss the reference logs: CTC nats per second of audio,
/// `loss_sum / input_frames · 100` (100 frames per second).
pub fn logged_loss(loss_sum: f64, input_frames: usize) -> f64 {
    if input_frames == 0 {
        0.0
    } else {
        loss_sum / input_frames as f64 * 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits() -> Tensor {
        let v: Vec<f32> = (0..2 * 6 * 4)
            .map(|i| ((i * 37) % 11) as f32 / 5.0)
            .collect();
        Tensor::from_vec(v, (2, 6, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn reductions_agree_with_per_item_losses() {
        let targets = vec![vec![0u32, 1], vec![2u32]];
        let lens = [6, 4];
        let none = ctc(&logits(), &targets, &lens, 3, Reduction::None, false).unwrap();
        let per: Vec<f32> = none.to_vec1().unwrap();
        let sum: f32 = ctc(&logits(), &targets, &lens, 3, Reduction::Sum, false)
            .unwrap()
            .to_scalar()
            .unwrap();
        let mean: f32 = ctc(&logits(), &targets, &lens, 3, Reduction::Mean, false)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((sum - (per[0] + per[1])).abs() < 1e-5);
        assert!((mean - (per[0] / 2.0 + per[1] / 1.0) / 2.0).abs() < 1e-5);
    }

    #[test]
    fn reference_scaling() {
        let s = Tensor::new(512.0f32, &Device::Cpu).unwrap();
        let one: f32 = backward_loss(&s, 512, 4, 1, false)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((one - 25.0).abs() < 1e-5);
        let fixed: f32 = backward_loss(&s, 512, 4, 2, false)
            .unwrap()
            .to_scalar()
            .unwrap();
        let compat: f32 = backward_loss(&s, 512, 4, 2, true)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((fixed - 12.5).abs() < 1e-5 && (compat - 50.0).abs() < 1e-5);
        assert_eq!(logged_loss(300.0, 600), 50.0);
        assert_eq!(logged_loss(1.0, 0), 0.0);
    }
}
