//! Data-parallel training on CPU, ranks as threads (lcasr::parallel): the
//! in-process collective, batch sharding, the bucketed gradient all-reduce,
//! synchronised BatchRenorm, and end-to-end training with 1, 2 and 4 ranks
//! (dropout off, since masks differ with the number of ranks) against the
//! direct single-process run, including stop-and-resume.

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use lcasr::config::{self, Config, LoadOptions};
use lcasr::data::chunking::{Chunk, ChunkItem};
use lcasr::model::Encoder;
use lcasr::parallel::grads::all_reduce_gradients;
use lcasr::parallel::shard::{shard_chunk, shard_range};
use lcasr::parallel::sync_norm::synchronised;
use lcasr::parallel::{
    train_data_parallel, Collective, DataParallelOptions, InProcessGroup, RankLeft,
};
use lcasr::train::optimizer::{collect_params, DecayGroups};
use lcasr_kernels::batch_renorm::{batch_renorm_silu, BatchStats, RenormMode};

/// Runs `f` on every rank of a fresh `n`-rank group, each on its own thread;
/// the results by rank.
fn on_ranks<T: Send>(n: usize, f: impl Fn(Arc<dyn Collective>) -> T + Sync) -> Vec<T> {
    let comms = InProcessGroup::with_ranks(n).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || f(Arc::new(c)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn all_reduce_sums_in_rank_order_and_every_rank_gets_the_same_bits() {
    // Values whose f32 sum depends on the order of the additions.
    let data = |rank: usize| -> Vec<f32> {
        vec![
            [1e8f32, 1.0, -1e8][rank],
            [0.1f32, 0.2, 0.3][rank],
            rank as f32,
        ]
    };
    let results = on_ranks(3, |c| {
        let mut v = data(c.rank());
        c.all_reduce_sum(&mut v).unwrap();
        let mut w = vec![0.1f64 * c.rank() as f64, 1e16, 1.0];
        c.all_reduce_sum_f64(&mut w).unwrap();
        (c.world_size(), v, w)
    });
    let (a, b, c) = (data(0), data(1), data(2));
    let want: Vec<f32> = (0..3).map(|i| (a[i] + b[i]) + c[i]).collect();
    assert_eq!(want[0], 0.0, "the rank-ordered f32 sum loses the 1.0");
    for (world, v, w) in &results {
        assert_eq!(*world, 3);
        assert_eq!(
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(w, &results[0].2);
        assert_eq!(w[1], 3e16);
        assert_eq!(w[0], (0.0 + 0.1) + 0.2);
    }
}

#[test]
fn broadcast_barrier_and_empty_buffers() {
    let results = on_ranks(4, |c| {
        let mut v = vec![c.rank() as f32; 5];
        c.broadcast(&mut v, 2).unwrap();
        c.barrier().unwrap();
        let mut empty: Vec<f32> = Vec::new();
        c.all_reduce_sum(&mut empty).unwrap();
        c.broadcast(&mut empty, 0).unwrap();
        v
    });
    for v in results {
        assert_eq!(v, vec![2.0; 5]);
    }
    // One rank is a group too.
    let one = on_ranks(1, |c| {
        let mut v = vec![-0.0f32, 3.5];
        c.all_reduce_sum(&mut v).unwrap();
        v
    });
    assert_eq!(one[0][0].to_bits(), (-0.0f32).to_bits());
    assert_eq!(one[0][1], 3.5);
}

#[test]
fn disagreeing_calls_fail_on_every_rank() {
    let results = on_ranks(3, |c| {
        let mut v = vec![1.0f32; 2 + usize::from(c.rank() == 1)];
        c.all_reduce_sum(&mut v).map_err(|e| e.to_string())
    });
    for r in results {
        let e = r.unwrap_err();
        assert!(e.contains("rank 1") && e.contains("3 values"), "{e}");
    }
    let results = on_ranks(2, |c| {
        let mut v = vec![1.0f32; 2];
        if c.rank() == 0 {
            c.broadcast(&mut v, 0).map_err(|e| e.to_string())
        } else {
            c.all_reduce_sum(&mut v).map_err(|e| e.to_string())
        }
    });
    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap_err().contains("disagree")));
    // A broadcast from a rank that does not exist.
    let results = on_ranks(2, |c| c.broadcast(&mut [1.0], 5).map_err(|e| e.to_string()));
    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap_err().contains("rank 5")));
}

#[test]
fn a_rank_that_leaves_fails_the_others_instead_of_hanging() {
    let results = on_ranks(3, |c| {
        if c.rank() == 1 {
            return None; // drops its communicator without taking part
        }
        let mut v = vec![1.0f32];
        let e = c.all_reduce_sum(&mut v).unwrap_err();
        Some(e.downcast::<RankLeft>().unwrap().rank)
    });
    assert_eq!(results, vec![Some(1), None, Some(1)]);
    assert!(InProcessGroup::with_ranks(0).is_err());
}

#[test]
fn shards_are_contiguous_balanced_and_cover_the_batch() {
    for len in 0..12 {
        for world in 1..7 {
            let shards: Vec<_> = (0..world).map(|r| shard_range(len, world, r)).collect();
            assert_eq!(shards[0].start, 0);
            assert_eq!(shards[world - 1].end, len);
            for pair in shards.windows(2) {
                assert_eq!(pair[0].end, pair[1].start, "contiguous");
                assert!(
                    pair[0].len() >= pair[1].len(),
                    "earlier ranks take the extra"
                );
            }
            let (min, max) = (shards[world - 1].len(), shards[0].len());
            assert!(max - min <= 1, "len {len} world {world}: {shards:?}");
            if world > len {
                assert!(shards[len..].iter().all(|s| s.is_empty()));
            }
        }
    }
    assert_eq!(shard_range(5, 2, 0), 0..3);
    assert_eq!(shard_range(5, 2, 1), 3..5);
    assert_eq!(shard_range(2, 4, 3), 2..2);
}

#[test]
fn a_shard_of_a_chunk_keeps_the_window_and_only_its_items() {
    let item = |recording, valid| ChunkItem {
        recording,
        valid,
        words: vec![format!("w{recording}")],
        whole_transcript: false,
    };
    let chunk = Chunk {
        start: 300,
        width: 100,
        items: vec![item(0, 100), item(2, 40), item(3, 7)],
    };
    let parts: Vec<Chunk> = (0..3)
        .map(|r| shard_chunk(&chunk, &shard_range(4, 3, r)))
        .collect();
    assert!(parts.iter().all(|p| p.start == 300 && p.width == 100));
    assert_eq!(parts[0].items, vec![item(0, 100)]); // recordings 0 and 1
    assert_eq!(parts[1].items, vec![item(2, 40)]); // recording 2
    assert_eq!(parts[2].items, vec![item(3, 7)]); // recording 3
    let empty = shard_chunk(&chunk, &(1..2));
    assert!(empty.items.is_empty() && empty.width == 100);
}

#[test]
fn gradients_are_summed_in_buckets_across_parameter_boundaries() {
    let shapes: [&[usize]; 3] = [&[2, 3], &[5], &[4]];
    // Rank r's gradient of parameter p, element i: (r + 1) * (10 p + i);
    // parameter 2 has a gradient only on rank 1; rank 2 does not contribute.
    let results = on_ranks(3, |c| {
        let r = c.rank();
        let vars: Vec<Var> = shapes
            .iter()
            .map(|s| Var::zeros(*s, candle_core::DType::F32, &Device::Cpu).unwrap())
            .collect();
        let params = collect_params(
            vars.iter()
                .enumerate()
                .map(|(i, v)| (format!("p{i}"), v.clone())),
            DecayGroups::Conventional,
        );
        let mut grads = GradStore::default();
        for (p, v) in vars.iter().enumerate() {
            if p == 2 && r != 1 {
                continue;
            }
            let n = v.elem_count();
            let g: Vec<f32> = (0..n)
                .map(|i| (r + 1) as f32 * (10 * p + i) as f32)
                .collect();
            grads.insert(
                v.as_tensor(),
                Tensor::from_vec(g, v.shape(), &Device::Cpu).unwrap(),
            );
        }
        all_reduce_gradients(&params, &mut grads, c.as_ref(), r != 2, 4).unwrap();
        vars.iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .map(common::to_f32_vec)
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
    });
    for (p, s) in shapes.iter().enumerate() {
        let n: usize = s.iter().product();
        // Ranks 0 and 1 contribute factors 1 and 2 (only rank 1 for p2).
        let factor = if p == 2 { 2.0 } else { 3.0 };
        let want: Vec<f32> = (0..n).map(|i| factor * (10 * p + i) as f32).collect();
        for got in &results {
            assert_eq!(got[p], want, "parameter {p}");
        }
    }
    // Nobody contributing a parameter removes it everywhere.
    let results = on_ranks(2, |c| {
        let v = Var::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let params = collect_params([("p".to_string(), v.clone())], DecayGroups::Conventional);
        let mut grads = GradStore::default();
        grads.insert(
            v.as_tensor(),
            Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        all_reduce_gradients(&params, &mut grads, c.as_ref(), false, 8).unwrap();
        grads.get(v.as_tensor()).is_none()
    });
    assert_eq!(results, vec![true, true]);
}

/// Deterministic pseudo-random values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// What one BatchRenorm pass gives.
struct RenormPass {
    stats: BatchStats,
    dx: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

/// The BatchRenorm op on `items` of a (B, T, C) batch with `lengths`, and
/// the gradients of sum(y * g).
fn renorm_pass(
    x: &[f32],
    g: &[f32],
    items: std::ops::Range<usize>,
    dims: (usize, usize, usize),
    lengths: &[usize],
) -> RenormPass {
    let (_, t, c) = dims;
    let b = items.len();
    let rows = items.start * t * c..items.end * t * c;
    let dev = &Device::Cpu;
    let xv =
        Var::from_tensor(&Tensor::from_slice(&x[rows.clone()], (b, t, c), dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::from_vec(noise(c, 5), c, dev).unwrap()).unwrap();
    let bias = Var::from_tensor(&Tensor::from_vec(noise(c, 6), c, dev).unwrap()).unwrap();
    let gt = Tensor::from_slice(&g[rows], (b, t, c), dev).unwrap();
    let running_mean = noise(c, 7).iter().map(|v| v * 0.1).collect::<Vec<_>>();
    let running_std = noise(c, 8)
        .iter()
        .map(|v| 1.0 + 0.2 * v)
        .collect::<Vec<_>>();
    let (y, stats) = batch_renorm_silu(
        xv.as_tensor(),
        w.as_tensor(),
        bias.as_tensor(),
        RenormMode::Train {
            running_mean: &running_mean,
            running_std: &running_std,
            rmax: 1.5,
            dmax: 0.5,
            eps: 1e-3,
            lengths: Some(&lengths[items]),
        },
    )
    .unwrap();
    let grads = (y * gt).unwrap().sum_all().unwrap().backward().unwrap();
    let get = |v: &Var| common::to_f32_vec(grads.get(v.as_tensor()).unwrap());
    RenormPass {
        stats: stats.unwrap(),
        dx: get(&xv),
        dw: get(&w),
        db: get(&bias),
    }
}

/// Asserts that `got` equals `want` within `rel` of the largest magnitude of `want`.
fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = common::max_abs_diff(got, want);
    assert!(
        diff <= rel * scale,
        "{what}: max difference {diff} vs scale {scale}"
    );
}

#[test]
fn synchronised_batch_renorm_over_two_ranks_equals_the_whole_batch() {
    let dims @ (b, t, c) = (4, 7, 6);
    let lengths = [7, 3, 5, 6];
    let x: Vec<f32> = noise(b * t * c, 1).iter().map(|v| 2.0 * v + 0.3).collect();
    let g = noise(b * t * c, 2);
    let whole = renorm_pass(&x, &g, 0..b, dims, &lengths);
    // Without a reducer installed the op is the plain one (same bits twice).
    let again = renorm_pass(&x, &g, 0..b, dims, &lengths);
    assert!(again.stats == whole.stats && again.dx == whole.dx && again.dw == whole.dw);

    let ranks = on_ranks(2, |comm| {
        let items = if comm.rank() == 0 { 0..1 } else { 1..b };
        synchronised(&comm, true, || renorm_pass(&x, &g, items, dims, &lengths))
    });
    for (r, pass) in ranks.iter().enumerate() {
        let what = format!("rank {r}");
        assert_close(&pass.stats.mean, &whole.stats.mean, 1e-5, &what);
        assert_close(&pass.stats.std, &whole.stats.std, 1e-5, &what);
        assert_eq!(
            pass.stats, ranks[0].stats,
            "every rank has the same statistics"
        );
    }
    let dx_split: Vec<f32> = ranks.iter().flat_map(|r| r.dx.clone()).collect();
    assert_close(&dx_split, &whole.dx, 1e-5, "dx");
    let dw: Vec<f32> = (0..c).map(|i| ranks[0].dw[i] + ranks[1].dw[i]).collect();
    let db: Vec<f32> = (0..c).map(|i| ranks[0].db[i] + ranks[1].db[i]).collect();
    assert_close(&dw, &whole.dw, 1e-5, "dweight");
    assert_close(&db, &whole.db, 1e-5, "dbias");
    // A rank's own statistics differ from the batch's: the test would notice
    // an unsynchronised op.
    let alone = renorm_pass(&x, &g, 1..b, dims, &lengths);
    assert!(common::max_abs_diff(&alone.stats.mean, &whole.stats.mean) > 1e-3);
}

#[test]
fn a_rank_that_does_not_contribute_leaves_the_statistics_to_the_others() {
    let dims @ (b, t, c) = (2, 5, 3);
    let lengths = [5, 4];
    let x = noise(b * t * c, 11);
    let g = noise(b * t * c, 12);
    let whole = renorm_pass(&x, &g, 0..b, dims, &lengths);
    let ranks = on_ranks(2, |comm| {
        // Rank 1 runs a stand-in pass on the same items but adds nothing.
        synchronised(&comm, comm.rank() == 0, || {
            renorm_pass(&x, &g, 0..b, dims, &lengths)
        })
    });
    assert_close(&ranks[0].stats.mean, &whole.stats.mean, 1e-6, "mean");
    assert_close(&ranks[1].stats.std, &whole.stats.std, 1e-6, "std");
    assert_close(&ranks[0].dx, &whole.dx, 1e-6, "dx of the contributing rank");
}

/// The tiny experiment with dropout off, `batch_size` recordings per batch,
/// `epochs` epochs and any `extra` overrides.
fn tiny_config(dir: &Path, batch_size: u64, epochs: u64, extra: &[&str]) -> Config {
    let path = common::tiny_experiment(dir, epochs);
    let batch = format!("training.batch_size={batch_size}");
    let mut overrides = vec![
        "model.dropout_ff=0",
        "model.dropout_attn=0",
        "model.dropout_conv=0",
        &batch,
    ];
    overrides.extend_from_slice(extra);
    let opts = LoadOptions {
        strict: false,
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
    };
    config::load_file(&path, &opts).unwrap().config
}

/// Parameter name → flattened values.
fn weights(model: &Encoder) -> Vec<(String, Vec<f32>)> {
    model
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), common::to_f32_vec(v.as_tensor())))
        .collect()
}

/// Whether the gradient of this parameter is zero up to rounding: the
/// depthwise convolution's bias feeds the BatchRenorm directly, whose batch
/// mean removes any per-channel shift. MADGRAD normalises the gradient, so
/// such a parameter wanders by rounding noise that differs with the
/// summation order: N ranks and one rank cannot agree on it.
fn has_no_true_gradient(name: &str) -> bool {
    name.ends_with("depthwise_conv.bias")
}

/// The largest difference between two models' parameters, relative to the
/// largest magnitude of each parameter, over the parameters with a gradient.
fn max_relative_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    a.iter()
        .zip(b)
        .filter(|((name, _), _)| !has_no_true_gradient(name))
        .map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            let scale = vb.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            common::max_abs_diff(va, vb) / scale
        })
        .fold(0.0, f32::max)
}

/// Parameter-wise tolerance of an N-rank run against one rank. The runs
/// differ in the order of floating-point sums (each rank sums its own items'
/// gradients and BatchRenorm statistics before the ranks' totals are added),
/// about 1e-7 relative per step; after 18 MADGRAD steps the largest
/// difference measured is 1.4e-4 (a norm bias), and 2e-3 leaves room for
/// other SIMD widths while still catching a missing synchronisation (one
/// rank's own BatchRenorm statistics differ from the batch's by 1e-1).
const PARALLEL_TOLERANCE: f32 = 2e-3;

/// Tolerance of the logged losses (measured: under 4e-6 relative).
const LOSS_TOLERANCE: f64 = 1e-4;

#[test]
fn one_two_and_four_ranks_train_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    // 4 recordings in batches of 3 and 1 over 2 epochs: uneven shards, ranks
    // with one item shorter than the chunk and ranks with no item at all.
    let cfg = tiny_config(dir.path(), 3, 2, &[]);
    let direct = lcasr::train::direct::train(&cfg).unwrap();
    let want = weights(&direct.model);
    let plan = lcasr::train::direct::DirectPlan::from_config(&cfg).unwrap();
    let init = weights(&plan.init_model().unwrap());
    assert!(init.iter().any(|(n, _)| has_no_true_gradient(n)));
    let one = train_data_parallel(&cfg, &DataParallelOptions::new(1)).unwrap();
    assert_eq!(one.steps, direct.steps);
    assert!(one.steps >= 8, "{} steps", one.steps);
    assert_eq!(one.losses, direct.losses, "one rank is the direct run");
    assert!(
        weights(&one.models[0]) == want,
        "one rank gives the direct run's bits"
    );
    for world in [2, 4] {
        let run = train_data_parallel(&cfg, &DataParallelOptions::new(world)).unwrap();
        assert_eq!(run.models.len(), world);
        assert_eq!(run.steps, direct.steps);
        let got = weights(&run.models[0]);
        for (r, m) in run.models.iter().enumerate().skip(1) {
            assert!(weights(m) == got, "rank {r} of {world} differs from rank 0");
            assert_eq!(m.renorm_states(), run.models[0].renorm_states());
        }
        let diff = max_relative_diff(&got, &want);
        assert!(
            diff < PARALLEL_TOLERANCE,
            "{world} ranks: relative difference {diff}"
        );
        // The parameters without a true gradient move by noise only: less
        // than one learning rate (3e-3) away from the initial values.
        for ((name, v), (_, v0)) in got.iter().zip(&init) {
            if has_no_true_gradient(name) {
                let moved = common::max_abs_diff(v, v0);
                assert!(moved < 3e-3, "{world} ranks: {name} moved {moved}");
            }
        }
        for (a, b) in run.losses.iter().zip(&direct.losses) {
            assert!(
                (a - b).abs() <= LOSS_TOLERANCE * b.abs(),
                "{world} ranks: loss {a} vs {b}"
            );
        }
        let states = run.models[0].renorm_states();
        for ((name, s), (_, t)) in states.iter().zip(direct.model.renorm_states()) {
            assert_eq!(s.num_batches_tracked, t.num_batches_tracked, "{name}");
            // The batch means carry the depthwise bias, whose noise bounds
            // their difference; the deviations do not.
            let mean_diff = common::max_abs_diff(&s.mean, &t.mean);
            assert!(
                mean_diff < 3e-3,
                "{name}: running means differ by {mean_diff}"
            );
            assert_close(&s.std, &t.std, PARALLEL_TOLERANCE, name);
        }
    }
}

#[test]
fn group_norm_ranks_train_the_same_model() {
    // GroupNorm takes its statistics per item and a rank holds whole items,
    // so it needs no synchronisation: two ranks train the one-rank model.
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path(), 3, 1, &["model.conv_norm=group_norm"]);
    let direct = lcasr::train::direct::train(&cfg).unwrap();
    let run = train_data_parallel(&cfg, &DataParallelOptions::new(2)).unwrap();
    assert_eq!(run.steps, direct.steps);
    let diff = max_relative_diff(&weights(&run.models[0]), &weights(&direct.model));
    assert!(diff < PARALLEL_TOLERANCE, "relative difference {diff}");
    assert!(weights(&run.models[1]) == weights(&run.models[0]));
}

#[test]
fn stopping_and_resuming_every_rank_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path(), 3, 2, &[]);
    assert!(train_data_parallel(&cfg, &DataParallelOptions::new(0)).is_err());
    let world = 2;
    let whole = train_data_parallel(&cfg, &DataParallelOptions::new(world)).unwrap();
    assert_eq!(whole.batches, 4);
    let ckpt = dir.path().join("dp-checkpoint");
    let mut opts = DataParallelOptions::new(world);
    opts.checkpoint_dir = Some(ckpt.clone());
    opts.resume = true;
    opts.max_batches = Some(1);
    let first = train_data_parallel(&cfg, &opts).unwrap();
    assert_eq!(first.batches, 1);
    assert!(
        ckpt.join("state.json").exists(),
        "rank 0 saved a checkpoint"
    );
    // The second part crosses the epoch boundary and finishes the run.
    opts.max_batches = Some(2);
    let second = train_data_parallel(&cfg, &opts).unwrap();
    assert_eq!(second.batches, 2);
    opts.max_batches = None;
    let last = train_data_parallel(&cfg, &opts).unwrap();
    assert_eq!(last.batches, 1);
    assert_eq!(last.steps, whole.steps);
    let losses: Vec<f64> = [first.losses, second.losses, last.losses].concat();
    assert_eq!(losses, whole.losses);
    let want = weights(&whole.models[0]);
    for (r, m) in last.models.iter().enumerate() {
        assert!(
            weights(m) == want,
            "rank {r} differs from the uninterrupted run"
        );
        assert_eq!(m.renorm_states(), whole.models[0].renorm_states());
    }
    // The finished run's checkpoint holds nothing more to train.
    let done = train_data_parallel(&cfg, &opts).unwrap();
    assert_eq!((done.batches, done.steps), (0, whole.steps));
}

#[test]
fn activation_checkpointing_keeps_the_ranks_bit_identical_to_the_plain_path() {
    // The recomputation of a checkpointed block runs BatchRenorm again inside
    // backward; it must take part in the exchanges like the first pass did.
    let dir = tempfile::tempdir().unwrap();
    let plain = tiny_config(dir.path(), 3, 1, &[]);
    let other = tempfile::tempdir().unwrap();
    let checkpointed = tiny_config(other.path(), 3, 1, &["model.checkpoint_every_n_layers=1"]);
    assert_eq!(checkpointed.model.checkpoint_every_n_layers, 1);
    let a = train_data_parallel(&plain, &DataParallelOptions::new(2)).unwrap();
    let b = train_data_parallel(&checkpointed, &DataParallelOptions::new(2)).unwrap();
    assert_eq!(a.losses, b.losses);
    assert!(weights(&a.models[1]) == weights(&b.models[1]));
}
