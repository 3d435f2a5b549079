//! Sequence-length warmup (reference-spec §5.6): every `increase_every`
//! recordings the chunk length is multiplied and the batch size shrunk, until
//! `max_sequence_length`, with `start_after` / `stop_after` bounds.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The `sequence_scheduler` config section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequenceScheduleConfig {
    /// Recordings between increases; -1 (or any value <= 0) disables the schedule.
    pub increase_every: i64,
    /// Position after which no new increase period starts.
    pub stop_after: u64,
    /// Before this position nothing happens and the counters do not move.
    pub start_after: u64,
    /// Cap on the chunk length, in frames.
    pub max_sequence_length: u64,
    /// Factor applied to the chunk length on an increase.
    pub increase_by_multiplier: f64,
    /// Factor applied to the batch size on an increase (floored at 1).
    pub batch_size_multiplier: f64,
    /// Multiply the rotary interpolation factor by `increase_by_multiplier` on an increase.
    #[serde(default)]
    pub interpolate_rotary: bool,
}

/// The schedule's counters and current values: everything a checkpoint must hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequenceScheduleState {
    /// Recordings seen (`cur_position`).
    pub cur_position: u64,
    /// Recordings since the last increase (`steps_since_last_increase`).
    pub steps_since_last_increase: u64,
    /// Current chunk length in frames.
    pub sequence_length: u64,
    /// Current batch size.
    pub batch_size: u64,
    /// Current rotary interpolation factor (saved as an exact decimal string).
    #[serde(with = "super::exact_f64")]
    pub rotary_interpolation_factor: f64,
}

/// The sequence-length warmup manager.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceSchedule {
    cfg: SequenceScheduleConfig,
    state: SequenceScheduleState,
}

impl SequenceSchedule {
    /// Starts at `sequence_length` (= `audio_chunking.size`) and `batch_size`
    /// (= `training.batch_size`), position 0.
    pub fn new(
        cfg: SequenceScheduleConfig,
        sequence_length: u64,
        batch_size: u64,
        rotary_interpolation_factor: f64,
    ) -> Result<Self> {
        if cfg.increase_every > 0 {
            if !(cfg.increase_by_multiplier.is_finite() && cfg.increase_by_multiplier > 0.0) {
                bail!(
                    "sequence_scheduler.increase_by_multiplier must be > 0, got {}",
                    cfg.increase_by_multiplier
                )
            }
            if !(cfg.batch_size_multiplier.is_finite() && cfg.batch_size_multiplier > 0.0) {
                bail!(
                    "sequence_scheduler.batch_size_multiplier must be > 0, got {}",
                    cfg.batch_size_multiplier
                )
            }
        }
        Ok(Self {
            cfg,
            state: SequenceScheduleState {
                cur_position: 0,
                steps_since_last_increase: 0,
                sequence_length,
                batch_size,
                rotary_interpolation_factor,
            },
        })
    }

    /// Current chunk length in frames.
    pub fn sequence_length(&self) -> u64 {
        self.state.sequence_length
    }

    /// Current batch size.
    pub fn batch_size(&self) -> u64 {
        self.state.batch_size
    }

    /// Current rotary interpolation factor.
    pub fn rotary_interpolation_factor(&self) -> f64 {
        self.state.rotary_interpolation_factor
    }

    /// Advances by one batch of `recordings`; returns true when the chunk length
    /// and batch size changed (the caller then rebuilds its data loader).
    pub fn step(&mut self, recordings: u64) -> bool {
        let cfg = &self.cfg;
        if cfg.increase_every <= 0 {
            return false;
        }
        let every = cfg.increase_every as f64;
        let st = &mut self.state;
        st.cur_position += recordings;
        if st.cur_position < cfg.start_after {
            return false;
        }
        let past_stop = st.cur_position >= cfg.stop_after;
        if past_stop && (st.steps_since_last_increase as f64) < every / 2.0 {
            return false;
        }
        let scaled = scale(st.sequence_length, cfg.increase_by_multiplier);
        let next = if scaled > cfg.max_sequence_length {
            if st.sequence_length == cfg.max_sequence_length {
                return false;
            }
            cfg.max_sequence_length
        } else {
            if past_stop {
                self.increase(scaled);
                return true;
            }
            scaled
        };
        let st = &mut self.state;
        st.steps_since_last_increase += recordings;
        if st.steps_since_last_increase as f64 >= every {
            self.increase(next);
            return true;
        }
        false
    }

    fn increase(&mut self, sequence_length: u64) {
        let st = &mut self.state;
        st.sequence_length = sequence_length;
        st.batch_size = scale(st.batch_size, self.cfg.batch_size_multiplier);
        st.steps_since_last_increase = 0;
        if self.cfg.interpolate_rotary {
            st.rotary_interpolation_factor *= self.cfg.increase_by_multiplier;
        }
    }

    /// The counters to save in a checkpoint.
    pub fn state(&self) -> SequenceScheduleState {
        self.state.clone()
    }

    /// Restores counters saved by [`SequenceSchedule::state`].
    pub fn load_state(&mut self, state: SequenceScheduleState) -> Result<()> {
        if state.sequence_length == 0 || state.batch_size == 0 {
            bail!("sequence schedule state has a zero length or batch size: {state:?}")
        }
        self.state = state;
        Ok(())
    }
}

/// `max(1, int(value · factor))`.
fn scale(value: u64, factor: f64) -> u64 {
    ((value as f64 * factor) as u64).max(1)
}
