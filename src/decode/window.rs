//! Long-form evaluation: split a recording's features into windows and merge
//! the windows' CTC posteriors (reference §9.1 `averaged_moving_window` and
//! §9.2 `buffered`).
//!
//! Frames here are input (spectrogram) frames unless named "output" frames
//! (after subsampling). Memory for merging is bounded by the output length
//! times the class count, whatever the number of windows.

/// An invalid windowing request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// The window length is zero.
    #[error("the window length (seq_len) must be at least 1 frame")]
    EmptyWindow,
    /// The overlap leaves no step between windows.
    #[error(
        "overlap {overlap} must be smaller than seq_len {seq_len} (the step is seq_len - overlap)"
    )]
    OverlapTooLarge {
        /// The requested overlap.
        overlap: usize,
        /// The requested window length.
        seq_len: usize,
    },
    /// A window's posteriors do not fit the declared class count.
    #[error("window posteriors hold {len} values, not a multiple of {classes} classes")]
    BadShape {
        /// Number of values given.
        len: usize,
        /// Declared classes.
        classes: usize,
    },
}

/// The effective `(seq_len, overlap)`: a window longer than the recording
/// becomes a single window over all of it, with overlap 0.
fn effective(
    total_frames: usize,
    seq_len: usize,
    overlap: usize,
) -> Result<(usize, usize), WindowError> {
    if seq_len == 0 {
        return Err(WindowError::EmptyWindow);
    }
    if seq_len > total_frames {
        return Ok((total_frames, 0));
    }
    if overlap >= seq_len {
        return Err(WindowError::OverlapTooLarge { overlap, seq_len });
    }
    Ok((seq_len, overlap))
}

/// The `[start, end)` input-frame windows of the averaged moving window
/// (§9.1): starts `0, s, 2s, …` with `s = seq_len − overlap`, each covering
/// `[i, min(i + seq_len, T))`; the first window shorter than its predecessor
/// (the truncated tail) is the last one. If `seq_len > T` there is a single
/// window `[0, T)`. An empty recording has no windows.
pub fn window_starts(
    total_frames: usize,
    seq_len: usize,
    overlap: usize,
) -> Result<Vec<(usize, usize)>, WindowError> {
    let (seq_len, overlap) = effective(total_frames, seq_len, overlap)?;
    let step = seq_len - overlap;
    let mut out = Vec::new();
    let mut previous_len: Option<usize> = None;
    let mut start = 0;
    while start < total_frames {
        let end = (start + seq_len).min(total_frames);
        let len = end - start;
        out.push((start, end));
        if previous_len.is_some_and(|p| len < p) {
            break;
        }
        previous_len = Some(len);
        start += step;
    }
    Ok(out)
}

/// Where [`WindowAverager`] places a window's output frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The reference's rule: a running output position that moves back by
    /// `trunc(overlap / ratio)` before every window but the first, with
    /// `ratio = window input length / window output length` (in f64, as
    /// Python does). Exact for windows whose length is a multiple of the
    /// subsampling factor; the truncated tail window may land early.
    Reference,
    /// Place each window at output frame `start / subsampling` (floor).
    /// Exact for every window when starts are multiples of the factor.
    StartFrame {
        /// The model's subsampling factor (8 for lcasr models).
        subsampling: usize,
    },
}

/// Accumulates overlapping windows' posteriors and averages them in the
/// probability domain (§9.1).
#[derive(Debug, Clone)]
pub struct WindowAverager {
    classes: usize,
    overlap: usize,
    placement: Placement,
    position: usize,
    windows: usize,
    /// Sum of probabilities, `frames x classes`.
    sum: Vec<f32>,
    /// Number of windows that wrote each output frame.
    count: Vec<u32>,
}

impl WindowAverager {
    /// A merger for windows cut from a recording of `total_frames` input
    /// frames with the given `seq_len` and `overlap` (the same arguments as
    /// [`window_starts`], which decide the effective overlap).
    pub fn new(
        classes: usize,
        total_frames: usize,
        seq_len: usize,
        overlap: usize,
        placement: Placement,
    ) -> Result<Self, WindowError> {
        let (_, overlap) = effective(total_frames, seq_len, overlap)?;
        Ok(Self {
            classes,
            overlap,
            placement,
            position: 0,
            windows: 0,
            sum: Vec::new(),
            count: Vec::new(),
        })
    }

    /// Number of classes per frame.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Add one window: its input frames `[start, start + input_len)` and its
    /// log-posteriors `log_probs` (`out_frames x classes`, row-major). Windows
    /// must be added in order.
    pub fn add(
        &mut self,
        start: usize,
        input_len: usize,
        log_probs: &[f32],
    ) -> Result<(), WindowError> {
        if self.classes == 0 || !log_probs.len().is_multiple_of(self.classes) {
            return Err(WindowError::BadShape {
                len: log_probs.len(),
                classes: self.classes,
            });
        }
        let out_frames = log_probs.len() / self.classes;
        let offset = match self.placement {
            Placement::Reference => {
                if self.windows > 0 && out_frames > 0 {
                    let ratio = input_len as f64 / out_frames as f64;
                    let back = (self.overlap as f64 / ratio) as usize;
                    self.position = self.position.saturating_sub(back);
                }
                let at = self.position;
                self.position += out_frames;
                at
            }
            Placement::StartFrame { subsampling } => start / subsampling.max(1),
        };
        self.windows += 1;
        let end = offset + out_frames;
        if self.count.len() < end {
            self.count.resize(end, 0);
            self.sum.resize(end * self.classes, 0.0);
        }
        for (dst, &lp) in self.sum[offset * self.classes..end * self.classes]
            .iter_mut()
            .zip(log_probs)
        {
            *dst += lp.exp();
        }
        for c in &mut self.count[offset..end] {
            *c += 1;
        }
        Ok(())
    }

    /// Log of the averaged probabilities, `frames x classes`; output frames
    /// no window wrote are dropped.
    pub fn finish(self) -> Vec<f32> {
        let classes = self.classes;
        let mut out = Vec::with_capacity(self.sum.len());
        for (f, &n) in self.count.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let inv = n as f32;
            out.extend(
                self.sum[f * classes..(f + 1) * classes]
                    .iter()
                    .map(|&s| (s / inv).ln()),
            );
        }
        out
    }
}

/// One window of the buffered mode: the model sees `buffer` and only the
/// output frames of the centre `chunk` are kept (both `[start, end)` input frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferedWindow {
    /// Input frames fed to the model.
    pub buffer: (usize, usize),
    /// Input frames whose outputs are kept.
    pub chunk: (usize, usize),
}

impl BufferedWindow {
    /// The kept output frames `[⌊(c − b)/r⌋, ⌊(c_end − b)/r⌋)` for a buffer
    /// whose model output has `out_frames` frames (`r = buffer len / out_frames`).
    pub fn keep_range(&self, out_frames: usize) -> (usize, usize) {
        if out_frames == 0 {
            return (0, 0);
        }
        let ratio = (self.buffer.1 - self.buffer.0) as f64 / out_frames as f64;
        let lo = ((self.chunk.0 - self.buffer.0) as f64 / ratio) as usize;
        let hi = ((self.chunk.1 - self.buffer.0) as f64 / ratio) as usize;
        (lo.min(out_frames), hi.min(out_frames))
    }
}

/// The windows of the buffered mode (§9.2): chunks of `seq_len − overlap`
/// frames, each with `overlap / 2` frames of context either side, clamped to
/// `[0, seq_len)` at the start and `[T − seq_len, T)` at the end.
pub fn buffered_windows(
    total_frames: usize,
    seq_len: usize,
    overlap: usize,
) -> Result<Vec<BufferedWindow>, WindowError> {
    let (seq_len, overlap) = effective(total_frames, seq_len, overlap)?;
    let chunk = seq_len - overlap;
    let half = overlap / 2;
    let mut out = Vec::new();
    let (mut c0, mut c1) = (0usize, chunk);
    while c0 < total_frames {
        let buffer = if c0 < half {
            (0, seq_len)
        } else if c1 + half > total_frames {
            (total_frames - seq_len, total_frames)
        } else {
            (c0 - half, c1 + half)
        };
        out.push(BufferedWindow {
            buffer,
            chunk: (c0, c1),
        });
        c0 += chunk;
        c1 = (c1 + chunk).min(total_frames);
    }
    Ok(out)
}

/// Concatenates the kept centre frames of buffered windows (§9.2).
#[derive(Debug, Clone)]
pub struct BufferedMerger {
    classes: usize,
    out: Vec<f32>,
}

impl BufferedMerger {
    /// An empty merger for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            out: Vec::new(),
        }
    }

    /// Append the kept frames of `window`'s log-posteriors
    /// (`out_frames x classes`). Windows must be added in order.
    pub fn add(&mut self, window: &BufferedWindow, log_probs: &[f32]) -> Result<(), WindowError> {
        if self.classes == 0 || !log_probs.len().is_multiple_of(self.classes) {
            return Err(WindowError::BadShape {
                len: log_probs.len(),
                classes: self.classes,
            });
        }
        let (lo, hi) = window.keep_range(log_probs.len() / self.classes);
        self.out
            .extend_from_slice(&log_probs[lo * self.classes..hi.max(lo) * self.classes]);
        Ok(())
    }

    /// The merged log-posteriors, `frames x classes`.
    pub fn finish(self) -> Vec<f32> {
        self.out
    }
}
