//! SpecAugment: the worked examples of fixtures README section h replayed with
//! the reference's uniform draws, and properties over seeded random batches.

use std::collections::VecDeque;

use candle_core::{DType, Device, Tensor};
use lcasr::config::SpecAugmentConfig;
use lcasr::data::spec_augment::{
    spec_augment, spec_augment_tensor, spec_augment_with_draws, MaskAxis, SpecAugmentOptions,
    SpecAugmentReport,
};
use lcasr::train::rng::RngStream;

const REFERENCE: SpecAugmentOptions = SpecAugmentOptions {
    time_axis_is_valid_length: false,
};
const FIXED: SpecAugmentOptions = SpecAugmentOptions {
    time_axis_is_valid_length: true,
};

/// The README's input: x[b,f,t] = 1 + (72·b + 12·f + t)/10, shape (2, 6, 12).
fn readme_input() -> (Vec<f32>, usize, usize, usize, Vec<usize>) {
    let (b, f, t) = (2, 6, 12);
    let x = (0..b * f * t)
        .map(|i| {
            let (bb, ff, tt) = (i / (f * t), (i / t) % f, i % t);
            1.0 + (72 * bb + 12 * ff + tt) as f32 / 10.0
        })
        .collect();
    (x, b, f, t, vec![12, 8])
}

/// Runs the core on `draws`, checking that exactly all of them are consumed.
fn replay(
    x: &mut [f32],
    shape: (usize, usize, usize),
    lengths: &[usize],
    cfg: &SpecAugmentConfig,
    opts: SpecAugmentOptions,
    draws: &[f64],
) -> SpecAugmentReport {
    let mut queue: VecDeque<f64> = draws.iter().copied().collect();
    let (b, f, t) = shape;
    let report = spec_augment_with_draws(x, b, f, t, lengths, cfg, opts, || {
        queue
            .pop_front()
            .expect("more draws than the reference made")
    });
    assert!(queue.is_empty(), "fewer draws than the reference made");
    assert_eq!(report.draws, draws.len());
    report
}

/// Per example: (time start, time width, freq start, freq width, frames a
/// frequency mask writes).
type Expected = [(usize, usize, usize, usize, usize)];

/// Asserts that `out` is `input` with exactly the expected masks set to `value`.
fn assert_masked(
    input: &[f32],
    out: &[f32],
    (f_n, t_n): (usize, usize),
    expected: &Expected,
    value: f32,
) {
    for (i, (&a, &o)) in input.iter().zip(out).enumerate() {
        let (b, f, t) = (i / (f_n * t_n), (i / t_n) % f_n, i % t_n);
        let (ts, tw, fs, fw, limit) = expected[b];
        let masked = (ts..ts + tw).contains(&t) || ((fs..fs + fw).contains(&f) && t < limit);
        let want = if masked { value } else { a };
        assert!(
            (o - want).abs() <= 1e-5,
            "[{b},{f},{t}]: got {o}, want {want} (masked {masked})"
        );
    }
}

fn readme_iid_config() -> SpecAugmentConfig {
    SpecAugmentConfig {
        n_time_masks: 1,
        time_mask_param: 5,
        n_freq_masks: 1,
        freq_mask_param: 3,
        iid_masks: true,
        p: 1.0,
        min_p: -1.0,
        zero_masking: true,
    }
}

const IID_DRAWS: [f64; 8] = [
    0.576064, 0.957039, 0.580476, 0.477459, 0.847006, 0.529125, 0.863593, 0.875884,
];

fn readme_shared_config() -> SpecAugmentConfig {
    SpecAugmentConfig {
        n_time_masks: 1,
        time_mask_param: 10,
        n_freq_masks: 0,
        freq_mask_param: 0,
        iid_masks: false,
        p: 0.5,
        min_p: -1.0,
        zero_masking: false,
    }
}

const SHARED_DRAWS: [f64; 2] = [0.669407, 0.756842];

#[test]
fn readme_iid_zero_masking_example_reference_behaviour() {
    let (input, b, f, t, lengths) = readme_input();
    let mut x = input.clone();
    let report = replay(
        &mut x,
        (b, f, t),
        &lengths,
        &readme_iid_config(),
        REFERENCE,
        &IID_DRAWS,
    );
    assert_eq!(report.mask_value, 0.0);
    // Time starts [5, 3], widths [2, 4]; freq starts [2, 3], widths [2, 1];
    // the reference writes frequency masks over the padding too.
    assert_masked(&input, &x, (f, t), &[(5, 2, 2, 2, t), (3, 4, 3, 1, t)], 0.0);
}

#[test]
fn readme_shared_mean_masking_example_reference_behaviour() {
    let (input, b, f, t, lengths) = readme_input();
    let mut x = input.clone();
    let report = replay(
        &mut x,
        (b, f, t),
        &lengths,
        &readme_shared_config(),
        REFERENCE,
        &SHARED_DRAWS,
    );
    assert!(
        (report.mask_value - 7.35).abs() < 1e-5,
        "{}",
        report.mask_value
    );
    // One mask for the batch: start 6, width 4 (it reaches into example 1's padding).
    assert_masked(
        &input,
        &x,
        (f, t),
        &[(6, 4, 0, 0, t), (6, 4, 0, 0, t)],
        report.mask_value,
    );
}

#[test]
fn readme_draws_with_valid_length_fix() {
    // Same draws, time axis = valid length. Example 1 (length 8): value
    // 0.957039·5 → width 4, start trunc(0.477459·(8 − 4.785)) = 1; frequency
    // masks stop at frame 8.
    let (input, b, f, t, lengths) = readme_input();
    let mut x = input.clone();
    replay(
        &mut x,
        (b, f, t),
        &lengths,
        &readme_iid_config(),
        FIXED,
        &IID_DRAWS,
    );
    assert_masked(
        &input,
        &x,
        (f, t),
        &[(5, 2, 2, 2, 12), (1, 4, 3, 1, 8)],
        0.0,
    );

    // Shared mask over the shortest length 8: M = min(10, int(8·0.5)) = 4,
    // width trunc(0.669407·4) = 2, start trunc(0.756842·(8 − 2.677628)) = 4.
    let mut x = input.clone();
    let report = replay(
        &mut x,
        (b, f, t),
        &lengths,
        &readme_shared_config(),
        FIXED,
        &SHARED_DRAWS,
    );
    assert_masked(
        &input,
        &x,
        (f, t),
        &[(4, 2, 0, 0, 12), (4, 2, 0, 0, 8)],
        report.mask_value,
    );
}

/// A random batch and configuration drawn from `gen`.
struct Case {
    x: Vec<f32>,
    batch: usize,
    freq: usize,
    time: usize,
    lengths: Vec<usize>,
    cfg: SpecAugmentConfig,
}

fn random_case(gen: &mut RngStream) -> Case {
    let (batch, freq, time) = (1 + gen.below(4), 1 + gen.below(10), 1 + gen.below(40));
    let lengths = (0..batch).map(|_| gen.below(time + 1)).collect();
    let use_min_p = gen.below(4) == 0;
    let cfg = SpecAugmentConfig {
        n_time_masks: gen.below(4) as u64,
        time_mask_param: if use_min_p {
            -1
        } else {
            gen.below(25) as i64 - 1
        },
        n_freq_masks: gen.below(4) as u64,
        freq_mask_param: gen.below(9) as i64,
        iid_masks: gen.below(2) == 0,
        p: [0.2, 0.5, 0.8, 1.0][gen.below(4)],
        min_p: if use_min_p { 0.4 } else { -1.0 },
        zero_masking: gen.below(2) == 0,
    };
    let x = gen.normal_vec(batch * freq * time, 1.5, 1.0);
    Case {
        x,
        batch,
        freq,
        time,
        lengths,
        cfg,
    }
}

/// Width bound M for an axis of `len` under `cfg` (the spec's rule).
fn bound(width: i64, len: usize, p: f64) -> i64 {
    if p == 1.0 {
        width
    } else {
        width.min((len as f64 * p) as i64)
    }
}

fn check_properties(case: &Case, out: &[f32], report: &SpecAugmentReport) {
    let (freq, time, cfg) = (case.freq, case.time, &case.cfg);
    // The mask value.
    if cfg.zero_masking {
        assert_eq!(report.mask_value, 0.0);
    } else {
        let (mut sum, mut n) = (0.0f64, 0usize);
        for (i, &v) in case.x.iter().enumerate() {
            if i % time < case.lengths[i / (freq * time)] {
                sum += v as f64;
                n += 1;
            }
        }
        let mean = if n == 0 { 0.0 } else { sum / n as f64 };
        assert!((report.mask_value as f64 - mean).abs() < 1e-5);
    }
    // Every span stays inside the valid region and within its width bounds.
    let time_width = if cfg.min_p != -1.0 && cfg.n_time_masks > 0 {
        (time as f64 * cfg.min_p) as i64 / cfg.n_time_masks as i64
    } else {
        cfg.time_mask_param
    };
    let shortest = *case.lengths.iter().min().unwrap();
    for s in &report.spans {
        let (len, width) = match s.axis {
            MaskAxis::Time if cfg.iid_masks => (case.lengths[s.example], time_width),
            MaskAxis::Time => (shortest, time_width),
            MaskAxis::Freq => (freq, cfg.freq_mask_param),
        };
        let w = (s.end - s.start) as i64;
        assert!(s.start <= s.end && s.end <= len, "{s:?} beyond {len}");
        assert!(w < bound(width, len, cfg.p) || w == 0, "{s:?} too wide");
        if cfg.p < 1.0 {
            assert!(w <= (len as f64 * cfg.p) as i64, "{s:?} above the p cap");
        }
    }
    // Exactly the spans' elements (valid frames only) carry the mask value.
    let mut masked = 0;
    for (i, (&a, &o)) in case.x.iter().zip(out).enumerate() {
        let (b, f, t) = (i / (freq * time), (i / time) % freq, i % time);
        let hit = t < case.lengths[b]
            && report.spans.iter().any(|s| {
                s.example == b
                    && match s.axis {
                        MaskAxis::Time => (s.start..s.end).contains(&t),
                        MaskAxis::Freq => (s.start..s.end).contains(&f),
                    }
            });
        if hit {
            masked += 1;
            assert_eq!(o, report.mask_value);
        } else {
            assert_eq!(o, a, "[{b},{f},{t}] changed outside the masks");
        }
    }
    assert_eq!(report.masked_valid_elements, masked);
    assert_eq!(report.masked_elements, masked);
    assert_eq!(
        report.valid_elements,
        case.lengths.iter().sum::<usize>() * freq
    );
}

#[test]
fn random_cases_keep_masks_in_valid_frames_and_within_bounds() {
    let mut gen = RngStream::derive(20, "spec-augment-cases");
    let mut total_masked = 0;
    for seed in 0..300 {
        let case = random_case(&mut gen);
        let mut out = case.x.clone();
        let mut rng = RngStream::derive(seed, "specaugment");
        let report = spec_augment(
            &mut out,
            case.batch,
            case.freq,
            case.time,
            &case.lengths,
            &case.cfg,
            &mut rng,
            SpecAugmentOptions::default(),
        );
        check_properties(&case, &out, &report);
        total_masked += report.masked_elements;
    }
    assert!(total_masked > 1000, "the cases barely mask anything");
}

fn busy_case() -> Case {
    let (batch, freq, time) = (4, 8, 60);
    Case {
        x: RngStream::derive(3, "x").normal_vec(batch * freq * time, 0.0, 1.0),
        batch,
        freq,
        time,
        lengths: vec![60, 45, 30, 52],
        cfg: SpecAugmentConfig {
            n_time_masks: 2,
            time_mask_param: 20,
            n_freq_masks: 2,
            freq_mask_param: 4,
            iid_masks: true,
            p: 1.0,
            min_p: -1.0,
            zero_masking: false,
        },
    }
}

fn run(case: &Case, cfg: &SpecAugmentConfig, seed: u64) -> (Vec<f32>, SpecAugmentReport) {
    let mut out = case.x.clone();
    let mut rng = RngStream::derive(seed, "specaugment");
    let report = spec_augment(
        &mut out,
        case.batch,
        case.freq,
        case.time,
        &case.lengths,
        cfg,
        &mut rng,
        SpecAugmentOptions::default(),
    );
    (out, report)
}

#[test]
fn zero_p_or_no_masks_leave_the_input_unchanged() {
    let case = busy_case();
    let no_masks = SpecAugmentConfig {
        n_time_masks: 0,
        n_freq_masks: 0,
        ..case.cfg.clone()
    };
    let zero_p = SpecAugmentConfig {
        p: 0.0,
        ..case.cfg.clone()
    };
    for cfg in [no_masks, zero_p] {
        let (out, report) = run(&case, &cfg, 5);
        assert_eq!(out, case.x);
        assert_eq!(report.draws, 0);
        assert_eq!(report.masked_elements, 0);
    }
}

#[test]
fn seeds_decide_the_masks() {
    let case = busy_case();
    let (a, ra) = run(&case, &case.cfg, 11);
    let (b, rb) = run(&case, &case.cfg, 11);
    let (c, _) = run(&case, &case.cfg, 12);
    assert_eq!(a, b);
    assert_eq!(ra, rb);
    assert_ne!(a, c);
    assert_ne!(a, case.x);
    // Two iid masks on each axis draw 2·B numbers each.
    assert_eq!(ra.draws, 4 * 2 * case.batch);
    check_properties(&case, &a, &ra);
}

#[test]
fn tensor_wrapper_matches_the_buffer_version() -> candle_core::Result<()> {
    let case = busy_case();
    let (want, _) = run(&case, &case.cfg, 7);
    let x = Tensor::from_vec(
        case.x.clone(),
        (case.batch, case.freq, case.time),
        &Device::Cpu,
    )?;
    let mut rng = RngStream::derive(7, "specaugment");
    let out = spec_augment_tensor(
        &x,
        &case.lengths,
        &case.cfg,
        &mut rng,
        SpecAugmentOptions::default(),
    )?;
    assert_eq!(out.dims(), x.dims());
    assert_eq!(out.flatten_all()?.to_vec1::<f32>()?, want);
    // Other dtypes come back in their own dtype; a wrong lengths count is an error.
    let half = x.to_dtype(DType::BF16)?;
    let out = spec_augment_tensor(&half, &case.lengths, &case.cfg, &mut rng, FIXED)?;
    assert_eq!(out.dtype(), DType::BF16);
    assert!(spec_augment_tensor(&x, &case.lengths[..2], &case.cfg, &mut rng, FIXED).is_err());
    Ok(())
}
