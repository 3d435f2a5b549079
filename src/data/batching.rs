//! Epoch order: length-homogeneous batches in a seeded random order.
//!
//! The rule follows the reference trainer with its bugs fixed (spec §5.2,
//! §10.14): recordings are sorted by duration with a *stable* sort (ties by
//! id), cut into groups of about [`SORT_GROUP`], shuffled within each group,
//! cut into batches, and the order of the full batches is shuffled; the final
//! short batch always comes last, so no batch boundary is ever shifted.
//!
//! Unlike the reference, the group size is rounded down to a multiple of the
//! batch size (at least one batch), so no batch straddles two groups: every
//! batch draws from one stretch of at most `max(SORT_GROUP, batch_size)`
//! neighbouring durations.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Nominal size of the duration-sorted groups shuffled internally (rounded
/// down to a multiple of the batch size).
pub const SORT_GROUP: usize = 2000;

/// Batches of indices into `recs` (each `(id, duration in seconds)`) for one
/// epoch, deterministic for a seed. Every recording appears exactly once; all
/// batches have `batch_size` items except possibly the last one. A
/// `batch_size` of 0 is treated as 1.
pub fn epoch_batches(recs: &[(String, f64)], seed: u64, batch_size: usize) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..recs.len()).collect();
    order.sort_by(|&a, &b| {
        recs[a]
            .1
            .total_cmp(&recs[b].1)
            .then_with(|| recs[a].0.cmp(&recs[b].0))
    });
    let group = (SORT_GROUP / batch_size).max(1) * batch_size;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for group in order.chunks_mut(group) {
        shuffle(group, &mut rng);
    }
    let mut batches: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    let short = match batches.last() {
        Some(last) if last.len() < batch_size => batches.pop(),
        _ => None,
    };
    shuffle(&mut batches, &mut rng);
    batches.extend(short);
    batches
}

/// Fisher–Yates shuffle driven by `rng`.
fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i + 1);
        items.swap(i, j);
    }
}

/// A uniform integer in `0..n` (`n > 0`), by rejection so it has no bias.
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    let n = n as u64;
    let zone = u64::MAX - (u64::MAX % n);
    loop {
        let x = rng.next_u64();
        if x < zone {
            return (x % n) as usize;
        }
    }
}

/// The seed of an epoch's order, derived from the run seed (SplitMix64 of
/// both), so every epoch has its own order and a resumed run recomputes it.
pub fn epoch_seed(run_seed: u64, epoch: u64) -> u64 {
    let mut z = run_seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Position in the data stream, saved in checkpoints so a resumed run
/// continues inside an epoch: the next batch to train is
/// `epoch_batches(..)[batch_index]` of epoch `epoch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochCursor {
    /// Current epoch, from 0.
    pub epoch: u64,
    /// Index of the next batch within the epoch.
    pub batch_index: usize,
}

impl EpochCursor {
    /// Marks one batch done; moves to the next epoch after the last of
    /// `batches_in_epoch` batches.
    pub fn advance(&mut self, batches_in_epoch: usize) {
        self.batch_index += 1;
        if self.batch_index >= batches_in_epoch {
            self.epoch += 1;
            self.batch_index = 0;
        }
    }

    /// The batches of the current epoch not yet trained.
    pub fn remaining<'a>(&self, batches: &'a [Vec<usize>]) -> &'a [Vec<usize>] {
        &batches[self.batch_index.min(batches.len())..]
    }
}
