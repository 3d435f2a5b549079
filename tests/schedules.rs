//! LR and sequence-length schedules against every trace in `schedules.json`,
//! plus state save/restore and the steps-only decay option.

mod common;

use lcasr::train::lr_schedule::{CosineWarmup, DecayUnit};
use lcasr::train::sequence_schedule::{SequenceSchedule, SequenceScheduleConfig};
use serde_json::Value;

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-15 + 1e-12 * want.abs()
}

#[test]
fn cosine_with_warmup_fixture() {
    let spec = &common::load_json("schedules.json")["lr_cosine_with_warmup"];
    let (peak, final_lr) = (f(&spec["peak"]), f(&spec["final"]));
    let warmup = u(&spec["warmup_steps"]);
    let cos = &spec["cosine"];
    let (p0, r) = (u(&cos["P0"]), u(&cos["R"]));
    let mut s = CosineWarmup::new(peak, final_lr, warmup, r, DecayUnit::Recordings).unwrap();
    let mut t = 0;
    for point in spec["warmup"].as_array().unwrap() {
        while t < u(&point["t"]) {
            s.after_optimizer_step();
            t += 1;
        }
        assert!(
            close(s.lr(), f(&point["lr"])),
            "t {t}: {} vs {}",
            s.lr(),
            point["lr"]
        );
    }
    assert!(s.in_warmup());
    s.start_batch(p0);
    assert!(!s.in_warmup());
    let after_switch = f(&spec["lr_right_after_set_cosine_schedule"]);
    assert!(close(s.lr(), after_switch));
    for point in cos["points"].as_array().unwrap() {
        s.end_batch(u(&point["P"]));
        assert!(
            close(s.lr(), f(&point["lr"])),
            "P {}: {} vs {}",
            point["P"],
            s.lr(),
            point["lr"]
        );
    }
}

#[test]
fn train_loop_trace_fixture() {
    let spec = &common::load_json("schedules.json")["lr_train_loop_trace"];
    let cfg = &spec["config"];
    let n = u(&cfg["n_recordings"]);
    let batch = u(&cfg["batch_size"]);
    let chunks = u(&cfg["chunks_per_batch"]);
    let mut s = CosineWarmup::new(
        f(&cfg["peak"]),
        0.0,
        u(&cfg["warmup_steps"]),
        n,
        DecayUnit::Recordings,
    )
    .unwrap();
    let steps = spec["steps"].as_array().unwrap();
    let mut done = 0;
    let mut i = 0;
    let mut batch_idx = 0;
    while done < n {
        done += batch.min(n - done);
        s.start_batch(done);
        for chunk in 0..chunks {
            let want = &steps[i];
            assert_eq!((u(&want["batch"]), u(&want["chunk"])), (batch_idx, chunk));
            assert_eq!(u(&want["recordings_done"]), done);
            assert!(
                close(s.lr(), f(&want["lr"])),
                "step {i}: {} vs {}",
                s.lr(),
                want["lr"]
            );
            s.after_optimizer_step();
            i += 1;
        }
        s.end_batch(done);
        batch_idx += 1;
    }
    assert_eq!(i, steps.len());
}

#[test]
fn lr_state_round_trip_continues_identically() {
    let run = |resume_at: Option<usize>| {
        let mut s = CosineWarmup::new(2e-3, 0.0, 7, 60, DecayUnit::Recordings).unwrap();
        let mut lrs = Vec::new();
        for b in 0..15u64 {
            if Some(b as usize) == resume_at {
                let text = serde_json::to_string(&s.state()).unwrap();
                s = CosineWarmup::new(2e-3, 0.0, 7, 60, DecayUnit::Recordings).unwrap();
                s.load_state(serde_json::from_str(&text).unwrap()).unwrap();
            }
            s.start_batch(4 * (b + 1));
            for _ in 0..3 {
                lrs.push(s.lr());
                s.after_optimizer_step();
            }
            s.end_batch(4 * (b + 1));
        }
        lrs
    };
    let straight = run(None);
    for at in [1, 2, 3, 9] {
        assert_eq!(run(Some(at)), straight);
    }
}

#[test]
fn decay_in_steps_option() {
    let (peak, warmup, total) = (1e-3, 4u64, 20u64);
    let mut s = CosineWarmup::new(peak, 1e-5, warmup, total, DecayUnit::Steps).unwrap();
    let mut lrs = vec![s.lr()];
    for _ in 0..30 {
        s.start_batch(0);
        s.after_optimizer_step();
        s.end_batch(0);
        lrs.push(s.lr());
    }
    assert_eq!(lrs[0], 0.0);
    assert!(close(lrs[2], peak * 0.5));
    assert!(close(lrs[warmup as usize], peak), "peak right after warmup");
    assert!(
        lrs[warmup as usize..].windows(2).all(|w| w[1] <= w[0]),
        "monotone decay"
    );
    assert!(close(lrs[total as usize + 1], 1e-5), "final LR at R + 1");
    assert!(close(lrs[30], 1e-5), "stays at the final LR");
}

fn seq_config(cfg: &Value) -> SequenceScheduleConfig {
    SequenceScheduleConfig {
        increase_every: cfg["increase_every"].as_i64().unwrap(),
        stop_after: u(&cfg["stop_after"]),
        start_after: u(&cfg["start_after"]),
        max_sequence_length: u(&cfg["max_sequence_length"]),
        increase_by_multiplier: f(&cfg["increase_by_multiplier"]),
        batch_size_multiplier: f(&cfg["batch_size_multiplier"]),
        interpolate_rotary: false,
    }
}

fn new_seq(cfg: &Value) -> SequenceSchedule {
    SequenceSchedule::new(
        seq_config(cfg),
        u(&cfg["initial_sequence_length"]),
        u(&cfg["initial_batch_size"]),
        1.0,
    )
    .unwrap()
}

fn check_full_run(name: &str) {
    let spec = &common::load_json("schedules.json")[name];
    let cfg = &spec["config"];
    let total = u(&cfg["total_recordings"]);
    let mut s = new_seq(cfg);
    let mut increases = Vec::new();
    let (mut done, mut calls) = (0u64, 0u64);
    while done < total {
        let k = s.batch_size().min(total - done);
        let updated = s.step(k);
        done += k;
        if updated {
            increases.push((calls, done, s.sequence_length(), s.batch_size()));
        }
        calls += 1;
    }
    let want: Vec<(u64, u64, u64, u64)> = spec["increases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                u(&v["call"]),
                u(&v["recordings_done"]),
                u(&v["sequence_length"]),
                u(&v["batch_size"]),
            )
        })
        .collect();
    assert_eq!(increases, want, "{name}");
    assert_eq!(calls, u(&spec["num_calls"]), "{name}");
    let fin = &spec["final"];
    let st = s.state();
    assert_eq!(
        (
            st.sequence_length,
            st.batch_size,
            st.cur_position,
            st.steps_since_last_increase
        ),
        (
            u(&fin["sequence_length"]),
            u(&fin["batch_size"]),
            u(&fin["cur_position"]),
            u(&fin["steps_since_last_increase"])
        ),
        "{name}"
    );
}

#[test]
fn sequence_schedule_seed_example() {
    check_full_run("sequence_scheduler_seed_example");
}

#[test]
fn sequence_schedule_other() {
    check_full_run("sequence_scheduler_other");
}

#[test]
fn sequence_schedule_irregular_calls() {
    let spec = &common::load_json("schedules.json")["sequence_scheduler_irregular_calls"];
    let mut s = new_seq(&spec["config"]);
    for (i, call) in spec["calls"].as_array().unwrap().iter().enumerate() {
        // Every call also goes through a save/restore of the state.
        let text = serde_json::to_string(&s.state()).unwrap();
        s.load_state(serde_json::from_str(&text).unwrap()).unwrap();
        let updated = s.step(u(&call["steps"]));
        let st = s.state();
        let got = (
            updated,
            st.sequence_length,
            st.batch_size,
            st.cur_position,
            st.steps_since_last_increase,
        );
        let want = (
            call["updated"].as_bool().unwrap(),
            u(&call["sequence_length"]),
            u(&call["batch_size"]),
            u(&call["cur_position"]),
            u(&call["steps_since_last_increase"]),
        );
        assert_eq!(got, want, "call {i}");
    }
}

#[test]
fn disabled_sequence_schedule_never_moves() {
    let cfg = SequenceScheduleConfig {
        increase_every: -1,
        stop_after: 0,
        start_after: 0,
        max_sequence_length: 1 << 20,
        increase_by_multiplier: 2.0,
        batch_size_multiplier: 0.5,
        interpolate_rotary: true,
    };
    let mut s = SequenceSchedule::new(cfg, 512, 8, 1.0).unwrap();
    for _ in 0..100 {
        assert!(!s.step(1000));
    }
    assert_eq!(
        (s.sequence_length(), s.batch_size(), s.state().cur_position),
        (512, 8, 0)
    );
}

#[test]
fn rotary_factor_follows_increases_when_asked() {
    let cfg = SequenceScheduleConfig {
        increase_every: 10,
        stop_after: 1000,
        start_after: 0,
        max_sequence_length: 4096,
        increase_by_multiplier: 2.0,
        batch_size_multiplier: 0.5,
        interpolate_rotary: true,
    };
    let mut s = SequenceSchedule::new(cfg, 1024, 4, 1.0).unwrap();
    assert!(s.step(10));
    assert_eq!((s.sequence_length(), s.batch_size()), (2048, 2));
    assert_eq!(s.rotary_interpolation_factor(), 2.0);
}
