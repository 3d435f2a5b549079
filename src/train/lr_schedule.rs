//! The reference learning-rate schedule: linear warmup over optimizer steps,
//! then cosine decay to the final LR (reference-spec §5.5, §6.5).
//!
//! In the reference units the decay runs over recordings: it starts at the
//! first batch boundary after warmup (`P0` = recordings done then) and the LR is
//! updated after every batch, ending at `R` = pairs × epochs. With
//! [`DecayUnit::Steps`] the decay instead follows the optimizer step count, right
//! after warmup, and updates after every step.

use std::f64::consts::PI;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// What the cosine phase counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayUnit {
    /// Recordings seen (the reference; changes only at batch boundaries).
    #[default]
    Recordings,
    /// Optimizer steps (warmup and decay in one unit).
    Steps,
}

/// The schedule's mutable counters: everything a checkpoint must hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrScheduleState {
    /// Optimizer steps counted during warmup (keeps counting within the batch
    /// in which warmup ends, as the reference does).
    pub t: u64,
    /// Still in warmup; re-evaluated at batch starts (every step in steps mode).
    pub in_warmup: bool,
    /// Position where the cosine phase started.
    pub p0: u64,
    /// The LR the next optimizer step uses (saved as an exact decimal string).
    #[serde(with = "super::exact_f64")]
    pub lr: f64,
    /// `recordings_done` of the last `start_batch` call: a second call for
    /// the same batch (a run resumed inside it) changes nothing.
    #[serde(default)]
    pub batch_started_at: u64,
}

/// Cosine decay with linear warmup; see the module documentation.
#[derive(Clone, Debug, PartialEq)]
pub struct CosineWarmup {
    peak: f64,
    final_lr: f64,
    warmup_steps: u64,
    total: u64,
    unit: DecayUnit,
    state: LrScheduleState,
}

impl CosineWarmup {
    /// A schedule at its start (t = 0, so the first optimizer step runs at LR 0
    /// unless `warmup_steps` is 0). `total` is `R`: recordings (pairs × epochs)
    /// or, in steps mode, optimizer steps.
    pub fn new(
        peak: f64,
        final_lr: f64,
        warmup_steps: u64,
        total: u64,
        unit: DecayUnit,
    ) -> Result<Self> {
        if !(peak.is_finite() && final_lr.is_finite()) || peak < 0.0 || final_lr < 0.0 {
            bail!("LR schedule: peak ({peak}) and final ({final_lr}) must be finite and >= 0")
        }
        let mut s = Self {
            peak,
            final_lr,
            warmup_steps,
            total,
            unit,
            state: LrScheduleState {
                t: 0,
                in_warmup: true,
                p0: 0,
                lr: 0.0,
                batch_started_at: 0,
            },
        };
        s.state.lr = s.warmup_lr(0);
        Ok(s)
    }

    /// The LR the next optimizer step uses.
    pub fn lr(&self) -> f64 {
        self.state.lr
    }

    /// Whether the schedule is still in warmup.
    pub fn in_warmup(&self) -> bool {
        self.state.in_warmup
    }

    /// The peak LR.
    pub fn peak(&self) -> f64 {
        self.peak
    }

    /// Call at the start of a batch, with `recordings_done` already including it.
    /// Ends the warmup once `t >= warmup_steps`; the LR stays until the next update.
    /// Calling it again for the same batch (a run resumed inside the batch)
    /// changes nothing.
    pub fn start_batch(&mut self, recordings_done: u64) {
        if recordings_done == self.state.batch_started_at {
            return;
        }
        self.state.batch_started_at = recordings_done;
        if self.unit == DecayUnit::Recordings && self.state.in_warmup {
            self.state.in_warmup = self.state.t < self.warmup_steps;
            if !self.state.in_warmup {
                self.state.p0 = recordings_done;
            }
        }
    }

    /// Call after every optimizer step.
    pub fn after_optimizer_step(&mut self) {
        match self.unit {
            DecayUnit::Recordings => {
                if self.state.in_warmup {
                    self.state.t += 1;
                    self.state.lr = self.warmup_lr(self.state.t);
                }
            }
            DecayUnit::Steps => {
                self.state.t += 1;
                if self.state.t < self.warmup_steps {
                    self.state.lr = self.warmup_lr(self.state.t);
                } else {
                    if self.state.in_warmup {
                        self.state.in_warmup = false;
                        self.state.p0 = self.warmup_steps;
                    }
                    self.state.lr = self.cosine_lr(self.state.t);
                }
            }
        }
    }

    /// Call after every batch with the recordings done so far (updates the LR in
    /// the cosine phase of the recordings mode).
    pub fn end_batch(&mut self, recordings_done: u64) {
        if self.unit == DecayUnit::Recordings && !self.state.in_warmup {
            self.state.lr = self.cosine_lr(recordings_done);
        }
    }

    /// `peak · min(1, t / warmup_steps)`.
    pub fn warmup_lr(&self, t: u64) -> f64 {
        if self.warmup_steps == 0 {
            self.peak
        } else {
            self.peak * (t as f64 / self.warmup_steps as f64).min(1.0)
        }
    }

    /// `final + ½(peak − final)(1 + cos(π·(P − P0)/(R − P0 + 1)))`, with the
    /// progress clamped to [0, 1] so the LR never rises again past `R + 1`.
    pub fn cosine_lr(&self, position: u64) -> f64 {
        let p0 = self.state.p0 as f64;
        let span = self.total as f64 - p0 + 1.0;
        if span <= 0.0 {
            return self.final_lr;
        }
        let done = (position as f64 - p0).clamp(0.0, span);
        self.final_lr + 0.5 * (self.peak - self.final_lr) * (1.0 + (PI * done / span).cos())
    }

    /// The counters to save in a checkpoint.
    pub fn state(&self) -> LrScheduleState {
        self.state.clone()
    }

    /// Restores counters saved by [`CosineWarmup::state`].
    pub fn load_state(&mut self, state: LrScheduleState) -> Result<()> {
        if !state.lr.is_finite() {
            bail!("LR schedule state holds a non-finite LR {}", state.lr)
        }
        self.state = state;
        Ok(())
    }
}
