//! CTC log-posteriors of a whole recording at a chosen context length
//! (reference §9): the recording is cut into windows of `window` input
//! frames, each window runs through the model on its own (eval mode, batch 1,
//! no masking), and the windows' posteriors are merged, either averaged over
//! overlapping windows (`averaged_moving_window`, §9.1) or by keeping each
//! window's centre (`buffered`, §9.2). Memory for the model is bounded by the
//! window; only the merged posteriors grow with the recording.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::config::DtypeName;
use crate::decode::window::{
    buffered_windows, window_starts, BufferedMerger, Placement, WindowAverager,
};
use crate::model::{Encoder, ForwardOptions};

/// The reference's overlap between consecutive windows, as a fraction of the
/// window (`int(0.875 · seq_len)`, §9.1).
pub const DEFAULT_OVERLAP: f64 = 0.875;

/// How the windows' posteriors are merged. Serialised and parsed under the
/// reference's mode names, `averaged_moving_window` and `buffered`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum LongformMode {
    /// Average the probabilities of every window covering a frame (§9.1; the
    /// paper's protocol).
    #[default]
    AveragedMovingWindow,
    /// Keep only the centre chunk of each window, whose outputs saw context on
    /// both sides (§9.2).
    Buffered,
}

impl std::str::FromStr for LongformMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "averaged_moving_window" => Ok(Self::AveragedMovingWindow),
            "buffered" => Ok(Self::Buffered),
            other => bail!(
                "unknown long-form mode `{other}`: expected averaged_moving_window or buffered"
            ),
        }
    }
}

/// The context the model sees.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ContextOptions {
    /// Window length in input frames (10 ms each); `None`, or a window at
    /// least as long as the recording, runs the whole recording at once.
    pub window: Option<usize>,
    /// Overlap of consecutive windows as a fraction of the window, in
    /// `[0, 1)`. It is rounded down to whole output frames (a multiple of the
    /// subsampling factor; of twice the factor in buffered mode, so that the
    /// kept centres are whole output frames).
    pub overlap: f64,
    /// How overlapping windows are merged.
    pub mode: LongformMode,
    /// The compute dtype of the forward: float32, or bfloat16 / float16
    /// (mixed precision, as in training; on a GPU, attention on tensor cores,
    /// or candle-flash-attn in a `flash-attn` build).
    pub dtype: DtypeName,
}

impl Default for ContextOptions {
    /// The whole recording at once; windows, when set, overlap by
    /// [`DEFAULT_OVERLAP`] and are averaged.
    fn default() -> Self {
        Self {
            window: None,
            overlap: DEFAULT_OVERLAP,
            mode: LongformMode::default(),
            dtype: DtypeName::Float32,
        }
    }
}

impl ContextOptions {
    /// Averaged moving windows of `window` frames with the reference overlap
    /// (`None`: the whole recording).
    pub fn with_window(window: Option<usize>) -> Self {
        Self {
            window,
            ..Self::default()
        }
    }

    /// The overlap in input frames for windows of `window` frames and a model
    /// that subsamples by `subsampling`.
    pub fn overlap_frames(&self, window: usize, subsampling: usize) -> usize {
        let unit = match self.mode {
            LongformMode::AveragedMovingWindow => subsampling.max(1),
            LongformMode::Buffered => 2 * subsampling.max(1),
        };
        let frames = (self.overlap * window as f64) as usize;
        frames / unit * unit
    }
}

/// `(T', C)` log-posteriors of `features` (`(F, T)`, on any device) at the
/// context of `opts`, on the CPU.
pub fn log_probs(model: &Encoder, features: &Tensor, opts: &ContextOptions) -> Result<Tensor> {
    log_probs_with_progress(model, features, opts, &|_, _| {})
}

/// [`log_probs`], calling `progress(windows_done, windows_total)` after each
/// window.
pub fn log_probs_with_progress(
    model: &Encoder,
    features: &Tensor,
    opts: &ContextOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<Tensor> {
    let (bins, total) = features
        .dims2()
        .context("features must be a (mel bins, frames) matrix")?;
    let feat_in = model.config().feat_in as usize;
    if bins != feat_in {
        bail!("features have {bins} mel bins but the model takes {feat_in}");
    }
    if total == 0 {
        bail!("the recording has no feature frames");
    }
    if !(0.0..1.0).contains(&opts.overlap) {
        bail!(
            "overlap {} must be a fraction in [0, 1) of the window",
            opts.overlap
        );
    }
    if opts.dtype != DtypeName::Float32 && model.device().is_cpu() {
        bail!("half-precision inference needs a GPU: on the CPU the model computes in float32");
    }
    let classes = model.classes();
    let window = match opts.window {
        Some(0) => bail!("the context window must be at least 1 frame"),
        Some(w) if w < total => w,
        _ => {
            let out = run_window(model, features, 0, total, opts)?;
            progress(1, 1);
            let frames = out.len() / classes;
            return Ok(Tensor::from_vec(out, (frames, classes), &Device::Cpu)?);
        }
    };
    let subsampling = model.config().subsampling_factor as usize;
    let overlap = opts.overlap_frames(window, subsampling);
    let merged = match opts.mode {
        LongformMode::AveragedMovingWindow => {
            let windows = window_starts(total, window, overlap)?;
            let mut avg =
                WindowAverager::new(classes, total, window, overlap, Placement::Reference)?;
            for (i, &(start, end)) in windows.iter().enumerate() {
                let lp = run_window(model, features, start, end - start, opts)?;
                avg.add(start, end - start, &lp)?;
                progress(i + 1, windows.len());
            }
            avg.finish()
        }
        LongformMode::Buffered => {
            let windows = buffered_windows(total, window, overlap)?;
            let mut merger = BufferedMerger::new(classes);
            for (i, w) in windows.iter().enumerate() {
                let (start, end) = w.buffer;
                let lp = run_window(model, features, start, end - start, opts)?;
                merger.add(w, &lp)?;
                progress(i + 1, windows.len());
            }
            merger.finish()
        }
    };
    let frames = merged.len() / classes;
    Ok(Tensor::from_vec(merged, (frames, classes), &Device::Cpu)?)
}

/// Row-major `(out frames, classes)` log-posteriors of the input frames
/// `[start, start + len)`, computed in `opts`' dtype.
fn run_window(
    model: &Encoder,
    features: &Tensor,
    start: usize,
    len: usize,
    opts: &ContextOptions,
) -> Result<Vec<f32>> {
    let x = features
        .narrow(1, start, len)?
        .to_device(model.device())?
        .to_dtype(DType::F32)?
        .unsqueeze(0)?
        .contiguous()?;
    let forward = ForwardOptions {
        compute_dtype: opts.dtype.compute_dtype(),
        ..Default::default()
    };
    let out = model.forward(&x, None, &forward)?;
    let lp = out
        .log_probs()?
        .to_dtype(DType::F32)?
        .squeeze(0)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(lp)
}
