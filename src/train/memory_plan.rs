//! `lcasr memory`: the predicted peak memory of a config's training, stage by
//! stage of its sequence schedule, so a user learns before a run whether the
//! longest stage fits the machine.

use anyhow::{Context, Result};
use candle_core::Device;

use super::optimizer::OptimizerConfig;
use super::sequence_schedule::{SequenceSchedule, SequenceScheduleConfig};
use crate::config::Config;
use crate::model::memory::{encoder_frames, format_bytes, training_peak, PeakEstimate, StepShape};
use crate::model::Encoder;

/// One stage of the sequence schedule and its predicted peak.
#[derive(Clone, Debug, PartialEq)]
pub struct StagePlan {
    /// Chunk length in input frames.
    pub frames: u64,
    /// Recordings per chunk.
    pub batch: u64,
    /// The prediction.
    pub estimate: PeakEstimate,
}

/// The (chunk length, batch size) stages `cfg` trains through: the initial
/// ones, then every change of its `sequence_scheduler`.
pub fn stages(cfg: &Config) -> Result<Vec<(u64, u64)>> {
    let size = cfg.audio_chunking.size;
    let batch = cfg.training.batch_size;
    let mut out = vec![(size, batch)];
    let Some(sc) = &cfg.sequence_scheduler else {
        return Ok(out);
    };
    if sc.increase_every <= 0 {
        return Ok(out);
    }
    let sched_cfg = SequenceScheduleConfig {
        increase_every: sc.increase_every,
        stop_after: sc.stop_after.unwrap_or(u64::MAX),
        start_after: sc.start_after,
        max_sequence_length: sc.max_sequence_length,
        increase_by_multiplier: sc.increase_by_multiplier,
        batch_size_multiplier: sc.batch_size_multiplier,
        interpolate_rotary: false,
    };
    let mut sched = SequenceSchedule::new(sched_cfg, size, batch, 1.0)?;
    let every = sc.increase_every as u64;
    // Enough whole periods to pass `start_after`, then one increase per period
    // until the cap; a `stop_after` that ends growth early ends it here too.
    let periods = sc.start_after / every + 64;
    for _ in 0..periods {
        if sched.step(every) {
            out.push((sched.sequence_length(), sched.batch_size()));
        }
        if sched.sequence_length() >= sc.max_sequence_length {
            break;
        }
    }
    Ok(out)
}

/// The predicted peak of every stage of `cfg`, for a CTC head of `classes`
/// outputs and activations of `activation_bytes` each.
pub fn plan(cfg: &Config, classes: usize, activation_bytes: usize) -> Result<Vec<StagePlan>> {
    // Only the parameter count is needed; building the model is the one way
    // that never disagrees with it.
    let enc = Encoder::init(
        &cfg.model,
        classes.saturating_sub(1).max(1),
        0,
        &Device::Cpu,
    )
    .context("building the model to count its parameters")?;
    let args = serde_json::to_value(&cfg.optimizer.args)?;
    let name = serde_json::to_value(cfg.optimizer.name)?;
    let opt = OptimizerConfig::from_args(name.as_str().unwrap_or_default(), &args)?.build();
    Ok(stages(cfg)?
        .into_iter()
        .map(|(frames, batch)| StagePlan {
            frames,
            batch,
            estimate: training_peak(
                &cfg.model,
                &StepShape {
                    batch: batch as usize,
                    frames: frames as usize,
                    classes,
                    parameters: enc.num_parameters(),
                    optimizer_buffers: opt.state_buffers(),
                    activation_bytes,
                },
            ),
        })
        .collect())
}

/// The plan as a table, one stage per row; with `budget` (bytes) each row
/// says whether it fits.
pub fn render(cfg: &Config, plans: &[StagePlan], budget: Option<u64>) -> String {
    let mut s = format!(
        "{:>5} {:>9} {:>6} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "stage", "frames", "batch", "enc.fr", "weights*", "activ.", "backward", "io", "peak"
    );
    if budget.is_some() {
        s.push_str("  fits");
    }
    s.push('\n');
    for (i, p) in plans.iter().enumerate() {
        let e = &p.estimate;
        s.push_str(&format!(
            "{:>5} {:>9} {:>6} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
            i + 1,
            p.frames,
            p.batch,
            encoder_frames(&cfg.model, p.frames as usize),
            format_bytes(e.parameters + e.gradients + e.optimizer),
            format_bytes(e.activations),
            format_bytes(e.backward),
            format_bytes(e.io),
            format_bytes(e.total()),
        ));
        if let Some(b) = budget {
            s.push_str(if e.total() <= b { "  yes" } else { "  NO" });
        }
        s.push('\n');
    }
    s.push_str("* weights: parameters, their gradients and the optimizer state\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SequenceSchedulerConfig;

    fn config() -> Config {
        let text = include_str!("../../configs/demo.yaml");
        crate::config::load_str(text, "configs/demo.yaml", &Default::default())
            .expect("demo config parses")
            .config
    }

    #[test]
    fn stages_follow_the_scheduler_to_its_cap() {
        let mut cfg = config();
        cfg.audio_chunking.size = 1024;
        cfg.training.batch_size = 8;
        cfg.sequence_scheduler = Some(SequenceSchedulerConfig {
            increase_every: 100,
            stop_after: None,
            start_after: 250,
            max_sequence_length: 6000,
            increase_by_multiplier: 2.0,
            batch_size_multiplier: 0.5,
            interpolate_rotary: false,
            cur_position: 0,
            steps_since_last_increase: 0,
        });
        assert_eq!(
            stages(&cfg).unwrap(),
            vec![(1024, 8), (2048, 4), (4096, 2), (6000, 1)]
        );
        cfg.sequence_scheduler = None;
        assert_eq!(stages(&cfg).unwrap(), vec![(1024, 8)]);
    }
}
