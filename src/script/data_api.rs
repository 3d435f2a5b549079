//! Data in scripts: tokenizers, prepared datasets with a resumable position
//! (epoch, recordings done, the batch in progress and its chunks), chunk
//! streams with background prefetch, and SpecAugment.
//!
//! The batch order of an epoch is a pure function of the run seed, the epoch,
//! the batch size and the recordings already done, and the order in use is
//! saved in checkpoints, so a resumed run trains the same batches and chunks
//! in the same order as an uninterrupted one.
//!
//! In a data-parallel run every rank draws the same batches and plans the
//! same chunks of each, but loads only its own recordings' items of each
//! chunk (`crate::parallel::shard`). A rank with none of a chunk's items gets
//! a stand-in: one silent item as wide as the chunk, whose loss counts
//! nothing, so that every rank runs every chunk's forward and backward (and
//! takes part in their exchanges).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Result;
use rhai::plugin::*;
use rhai::{Array, Dynamic, Map};
use serde::{Deserialize, Serialize};

use super::errors::{script_error, IntoScript, ScriptResult};
use super::model_api::int_array;
use super::run_api::{record_feature_recipe, step_boundary};
use super::session::{self, ChunkShard};
use super::tensor_api::Tensor;
use super::train_api::{TargetShard, Targets};
use crate::audio::features::N_MELS;
use crate::config::SpecAugmentConfig;
use crate::data::batching::{epoch_batches, epoch_seed};
use crate::data::chunking::Chunk as PlannedChunk;
use crate::data::dataset::{Dataset as DataImpl, TrainChunk};
use crate::data::spec_augment::{spec_augment, spec_augment_tensor, SpecAugmentOptions};
use crate::parallel::shard::{shard_chunk, shard_range};
use crate::parallel::Collective;
use crate::text::tokenizer::Tokenizer as TokImpl;

/// A tokenizer in a script.
#[derive(Clone)]
pub struct Tokenizer(pub Arc<TokImpl>);

/// A dataset in a script: a shared handle to the corpus and its position.
#[derive(Clone)]
pub struct Dataset(Arc<Mutex<DataInner>>);

/// The corpus and where the run is in it.
pub struct DataInner {
    /// The prepared corpus.
    pub data: Arc<DataImpl>,
    /// The manifest's path (for messages).
    pub path: PathBuf,
    /// The run's master seed.
    pub seed: u64,
    /// The resumable position.
    pub pos: DataPosition,
}

/// Where a run is in its data; saved in checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// Current epoch (from 0).
    pub epoch: u64,
    /// Recordings finished over the whole run.
    pub recordings_seen: u64,
    /// Manifest indices finished in the current epoch.
    pub seen: BTreeSet<usize>,
    /// The batches still to come in the order in use, and its batch size.
    pub pending: Vec<Vec<usize>>,
    /// Batch size the pending order was made for.
    pub pending_batch_size: usize,
    /// Chunk length and chunks already trained of the first pending batch
    /// (a run stopped inside a batch continues with its next chunk).
    pub chunk_size: usize,
    /// See `chunk_size`.
    pub chunks_done: usize,
}

impl Dataset {
    /// The inner state, locked.
    pub fn lock(&self) -> MutexGuard<'_, DataInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a prepared manifest.
    pub fn open(path: PathBuf, tok: Arc<TokImpl>, seed: u64) -> Result<Self> {
        let data = DataImpl::open(&path, tok)?;
        Ok(Dataset(Arc::new(Mutex::new(DataInner {
            data: Arc::new(data),
            path,
            seed,
            pos: DataPosition::default(),
        }))))
    }
}

impl DataInner {
    /// Recomputes the order of the epoch's unfinished recordings.
    fn reorder(&mut self, batch_size: usize) {
        let recs = &self.data.manifest().recordings;
        let unseen: Vec<usize> = (0..recs.len())
            .filter(|i| !self.pos.seen.contains(i))
            .collect();
        let keyed: Vec<(String, f64)> = unseen
            .iter()
            .map(|&i| (recs[i].id.clone(), recs[i].duration))
            .collect();
        // A different seed for each re-ordering point within the epoch.
        let seed = epoch_seed(self.seed, self.pos.epoch) ^ (self.pos.seen.len() as u64);
        self.pos.pending = epoch_batches(&keyed, seed, batch_size)
            .into_iter()
            .map(|b| b.into_iter().map(|j| unseen[j]).collect())
            .collect();
        self.pos.pending_batch_size = batch_size;
        self.pos.chunks_done = 0;
    }
}

/// A batch of recordings (manifest indices).
#[derive(Clone)]
pub struct Batch(pub Arc<Vec<usize>>);

/// The chunks of a batch, iterated with `for chunk in chunks { .. }`; loading
/// runs on a background thread, two chunks ahead.
#[derive(Clone)]
pub struct Chunks {
    data: Dataset,
    batch: Arc<Vec<usize>>,
    plan: Arc<Vec<PlannedChunk>>,
    skip: usize,
    /// (rank, ranks) of a data-parallel run.
    group: Option<(usize, usize)>,
}

/// One training chunk.
#[derive(Clone)]
pub struct Chunk {
    chunk: Arc<TrainChunk>,
    index: usize,
    count: usize,
    /// Valid frames of the whole chunk (over every rank).
    frames: usize,
    /// This rank's part of a data-parallel chunk.
    shard: Option<TargetShard>,
}

/// One planned chunk as this rank trains it.
struct Part {
    /// The items this rank loads (all of them in a single process).
    planned: PlannedChunk,
    /// Valid frames of the whole chunk.
    frames: usize,
    /// The whole chunk and this rank's items of it, in a data-parallel run.
    shard: Option<ChunkShard>,
}

impl Part {
    /// `chunk` of a batch of `batch_len` recordings as rank `group.0` of
    /// `group.1` trains it.
    fn of(chunk: &PlannedChunk, group: Option<(usize, usize)>, batch_len: usize) -> Part {
        let frames = chunk.items.iter().map(|i| i.valid).sum();
        let Some((rank, world)) = group else {
            return Part {
                planned: chunk.clone(),
                frames,
                shard: None,
            };
        };
        let positions = shard_range(batch_len, world, rank);
        let mine = chunk
            .items
            .iter()
            .enumerate()
            .filter(|(_, item)| positions.contains(&item.recording))
            .map(|(k, _)| k)
            .collect();
        Part {
            planned: shard_chunk(chunk, &positions),
            frames,
            shard: Some(ChunkShard {
                lengths: chunk.items.iter().map(|i| i.valid).collect(),
                mine,
            }),
        }
    }

    /// True for a data-parallel rank without items in this chunk.
    fn is_stand_in(&self) -> bool {
        self.shard.as_ref().is_some_and(|s| s.mine.is_empty())
    }
}

/// The stand-in of a chunk `width` frames wide: one silent item, all of it
/// valid, without targets.
fn stand_in(width: usize) -> Result<TrainChunk> {
    Ok(TrainChunk {
        features: candle_core::Tensor::zeros(
            (1, N_MELS, width),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?,
        lengths: vec![width],
        targets: vec![Vec::new()],
        recordings: Vec::new(),
        start: 0,
    })
}

/// The iterator behind `for chunk in chunks`.
pub struct ChunkIter {
    data: Dataset,
    rx: Receiver<Result<TrainChunk>>,
    parts: std::vec::IntoIter<Part>,
    next: usize,
    count: usize,
    in_group: bool,
}

impl IntoIterator for Chunks {
    type Item = ScriptResult<Chunk>;
    type IntoIter = ChunkIter;

    fn into_iter(self) -> ChunkIter {
        let data = Arc::clone(&self.data.lock().data);
        let parts: Vec<Part> = self.plan[self.skip.min(self.plan.len())..]
            .iter()
            .map(|c| Part::of(c, self.group, self.batch.len()))
            .collect();
        let loads: Vec<PlannedChunk> = parts
            .iter()
            .filter(|p| !p.is_stand_in())
            .map(|p| p.planned.clone())
            .collect();
        let rx = data.prefetch(self.batch.to_vec(), loads, 2);
        ChunkIter {
            data: self.data,
            rx,
            parts: parts.into_iter(),
            next: self.skip,
            count: self.plan.len(),
            in_group: self.group.is_some(),
        }
    }
}

impl Iterator for ChunkIter {
    type Item = ScriptResult<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.count {
            if self.in_group {
                if let Err(e) = session::enter_chunk(None) {
                    return Some(Err(e));
                }
            }
            return None;
        }
        if let Err(e) = step_boundary() {
            return Some(Err(e));
        }
        let index = self.next;
        self.next += 1;
        let part = self.parts.next()?;
        let loaded = if part.is_stand_in() {
            stand_in(part.planned.width).script()
        } else {
            match self.rx.recv() {
                Ok(r) => r.script(),
                Err(_) => Err(script_error("the chunk loader stopped unexpectedly")),
            }
        };
        let shard = part.shard.as_ref().map(|s| TargetShard {
            global_items: s.lengths.len(),
            stand_in: s.mine.is_empty(),
        });
        if self.in_group {
            if let Err(e) = session::enter_chunk(part.shard) {
                return Some(Err(e));
            }
        }
        Some(loaded.map(|chunk| {
            // Counted as trained once handed out: checkpoints are taken at
            // step boundaries, after the chunk was used.
            self.data.lock().pos.chunks_done = index + 1;
            Chunk {
                chunk: Arc::new(chunk),
                index,
                count: self.count,
                frames: part.frames,
                shard,
            }
        }))
    }
}

/// SpecAugment of this rank's part of a data-parallel chunk exactly as the
/// whole chunk would be augmented: the masks of every item of the chunk are
/// drawn (so every rank's random stream stays where a single process's
/// would be), on a stand-in of the chunk whose other ranks' items hold the
/// mean of their valid values (so the mask value, the chunk's valid mean
/// unless masks are zeros, is the whole chunk's); this rank's rows are
/// returned. A stand-in chunk's features come back unchanged.
fn spec_augment_shard(
    x: &candle_core::Tensor,
    shard: &ChunkShard,
    cfg: &SpecAugmentConfig,
    comm: &dyn Collective,
) -> ScriptResult<Tensor> {
    let (b, freq, time) = x.dims3().script()?;
    let mine: Vec<f32> = x
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .script()?;
    let rows = if shard.mine.is_empty() { 0 } else { b };
    let (mut sum, mut count) = (0.0f64, 0.0f64);
    for (j, &k) in shard.mine.iter().enumerate().take(rows) {
        let len = shard.lengths[k].min(time);
        for f in 0..freq {
            let row = (j * freq + f) * time;
            sum += mine[row..row + len].iter().map(|&v| v as f64).sum::<f64>();
        }
        count += (freq * len) as f64;
    }
    let mut totals = [sum, count];
    if !cfg.zero_masking {
        comm.all_reduce_sum_f64(&mut totals)
            .map_err(|e| script_error(format!("spec_augment(): {e:#}")))?;
    }
    let others = totals[1] - count;
    let fill = if others > 0.0 {
        ((totals[0] - sum) / others) as f32
    } else {
        0.0
    };
    let global = shard.lengths.len();
    let mut data = vec![0f32; global * freq * time];
    for (k, &len) in shard.lengths.iter().enumerate() {
        let out = &mut data[k * freq * time..(k + 1) * freq * time];
        match shard.mine.iter().position(|&m| m == k) {
            Some(j) => out.copy_from_slice(&mine[j * freq * time..(j + 1) * freq * time]),
            None => {
                for f in 0..freq {
                    out[f * time..f * time + len.min(time)].fill(fill);
                }
            }
        }
    }
    session::with(|s| {
        s.since_step = true;
        let rng = s.rng.stream("spec_augment");
        spec_augment(
            &mut data,
            global,
            freq,
            time,
            &shard.lengths,
            cfg,
            rng,
            SpecAugmentOptions::default(),
        );
        Ok(())
    })?;
    if rows == 0 {
        return Ok(Tensor(x.clone()));
    }
    let picked: Vec<f32> = shard
        .mine
        .iter()
        .flat_map(|&k| data[k * freq * time..(k + 1) * freq * time].iter().copied())
        .collect();
    candle_core::Tensor::from_vec(picked, (b, freq, time), x.device())
        .and_then(|t| t.to_dtype(x.dtype()))
        .script()
        .map(Tensor)
}

/// The current data-parallel chunk when `x` with `lengths` is this rank's
/// part of it (its features as handed out), with the group.
fn shard_of(
    x: &candle_core::Tensor,
    lengths: &[usize],
) -> ScriptResult<Option<(ChunkShard, Arc<dyn Collective>)>> {
    let Some(comm) = session::comm() else {
        return Ok(None);
    };
    let shard = session::with(|s| Ok(s.rank.as_ref().and_then(|r| r.chunk.clone())))?;
    let Some(shard) = shard else {
        return Ok(None);
    };
    let rows = x.dims().first().copied().unwrap_or(0);
    let fits = if shard.mine.is_empty() {
        rows == 1 && lengths.len() == 1
    } else {
        rows == shard.mine.len()
            && lengths.len() == rows
            && shard
                .mine
                .iter()
                .zip(lengths)
                .all(|(&k, &l)| shard.lengths[k] == l)
    };
    Ok(fits.then_some((shard, comm)))
}

fn ids(data: &DataImpl, indices: &[usize]) -> Array {
    indices
        .iter()
        .map(|&i| Dynamic::from(data.manifest().recordings[i].id.clone()))
        .collect()
}

/// The transcript of recording `i`: its words, or its text.
fn transcript(data: &DataImpl, i: usize) -> String {
    let rec = &data.manifest().recordings[i];
    match &rec.words {
        Some(ws) => ws
            .iter()
            .map(|w| w.word.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        None => rec.text.clone().unwrap_or_default(),
    }
}

/// Data functions.
#[export_module]
pub mod data_module {
    use super::*;

    /// Loads a tokenizer: a SentencePiece `.model` or an lcasr/HF `.json`.
    #[rhai_fn(return_raw)]
    pub fn tokenizer(path: &str) -> Result<Tokenizer, Box<EvalAltResult>> {
        let p = session::resolve_path(path)?;
        let tok = TokImpl::from_file(&p).script()?;
        Ok(Tokenizer(Arc::new(tok)))
    }

    /// Number of pieces (the model has one more class: the blank).
    #[rhai_fn(get = "vocab_size", pure)]
    pub fn vocab_size(t: &mut Tokenizer) -> i64 {
        t.0.vocab_size() as i64
    }

    /// Token ids of a text.
    #[rhai_fn(pure, return_raw)]
    pub fn encode(t: &mut Tokenizer, text: &str) -> Result<Array, Box<EvalAltResult>> {
        let ids = t.0.encode(text).script()?;
        Ok(ids.iter().map(|&v| Dynamic::from_int(v as i64)).collect())
    }

    /// The text of token ids (blanks and unknown ids are skipped).
    #[rhai_fn(pure, return_raw)]
    pub fn decode(t: &mut Tokenizer, ids: Array) -> Result<String, Box<EvalAltResult>> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|v| {
                v.as_int()
                    .map(|i| i as u32)
                    .map_err(|_| script_error("decode() takes an array of ints"))
            })
            .collect::<ScriptResult<_>>()?;
        Ok(t.0.decode(&ids))
    }

    /// Opens a prepared manifest (see `lcasr prepare`) with a tokenizer. Every
    /// feature file is checked now, so a missing one fails before training.
    #[rhai_fn(return_raw)]
    pub fn dataset(path: &str, tok: Tokenizer) -> Result<Dataset, Box<EvalAltResult>> {
        let p = session::resolve_path(path)?;
        let seed = session::with(|s| Ok(s.rng.master_seed()))?;
        let data = Dataset::open(p, tok.0, seed).script()?;
        if let Some(recipe) = data.lock().data.recipe() {
            record_feature_recipe(recipe, path)?;
        }
        Ok(data)
    }

    /// Number of recordings.
    #[rhai_fn(name = "len", pure)]
    pub fn data_len(d: &mut Dataset) -> i64 {
        d.lock().data.manifest().recordings.len() as i64
    }

    /// Total audio in hours.
    #[rhai_fn(get = "hours", pure)]
    pub fn hours(d: &mut Dataset) -> f64 {
        d.lock()
            .data
            .manifest()
            .recordings
            .iter()
            .map(|r| r.duration)
            .sum::<f64>()
            / 3600.0
    }

    /// The current epoch (from 0).
    #[rhai_fn(get = "epoch", pure)]
    pub fn epoch(d: &mut Dataset) -> i64 {
        d.lock().pos.epoch as i64
    }

    /// Recordings finished over the whole run.
    #[rhai_fn(get = "recordings_seen", pure)]
    pub fn recordings_seen(d: &mut Dataset) -> i64 {
        d.lock().pos.recordings_seen as i64
    }

    /// The next batch of this epoch at `batch_size` (the batch in progress
    /// when the run was stopped inside one), or `()` when the epoch is done.
    /// Batches are length-homogeneous and come in a seeded random order.
    #[rhai_fn(return_raw)]
    pub fn next_batch(d: &mut Dataset, batch_size: i64) -> Result<Dynamic, Box<EvalAltResult>> {
        if batch_size < 1 {
            return Err(script_error(format!(
                "next_batch(): batch_size must be >= 1, got {batch_size}"
            )));
        }
        step_boundary()?;
        let mut inner = d.lock();
        let bs = batch_size as usize;
        let total = inner.data.manifest().recordings.len();
        if inner.pos.seen.len() >= total {
            return Ok(Dynamic::UNIT);
        }
        let in_progress = inner.pos.chunks_done > 0;
        if inner.pos.pending.is_empty() || (inner.pos.pending_batch_size != bs && !in_progress) {
            inner.reorder(bs);
        }
        Ok(Dynamic::from(Batch(Arc::new(inner.pos.pending[0].clone()))))
    }

    /// Marks `batch` (the one `next_batch` returned) as done.
    #[rhai_fn(return_raw)]
    pub fn finish(d: &mut Dataset, batch: Batch) -> Result<(), Box<EvalAltResult>> {
        let mut inner = d.lock();
        if inner.pos.pending.first() != Some(&*batch.0) {
            return Err(script_error(
                "finish(): this is not the batch in progress (call next_batch first)",
            ));
        }
        inner.pos.pending.remove(0);
        inner.pos.seen.extend(batch.0.iter().copied());
        inner.pos.recordings_seen += batch.0.len() as u64;
        inner.pos.chunks_done = 0;
        Ok(())
    }

    /// Starts the next epoch: every recording becomes eligible again.
    pub fn next_epoch(d: &mut Dataset) {
        let mut inner = d.lock();
        inner.pos.epoch += 1;
        inner.pos.seen.clear();
        inner.pos.pending.clear();
        inner.pos.chunks_done = 0;
    }

    /// The chunks of `batch` at `chunk_size` frames: each word goes to the
    /// chunk holding its midpoint; chunks without text are skipped. Inside a
    /// batch that a stopped run was training, the chunks it already trained are skipped.
    /// In a data-parallel run each chunk holds this rank's recordings' items
    /// (a stand-in when it has none: one silent item whose loss counts nothing).
    #[rhai_fn(return_raw)]
    pub fn chunks(
        d: &mut Dataset,
        batch: Batch,
        chunk_size: i64,
    ) -> Result<Chunks, Box<EvalAltResult>> {
        if chunk_size < 1 {
            return Err(script_error(format!(
                "chunks(): chunk_size must be >= 1, got {chunk_size}"
            )));
        }
        let cs = chunk_size as usize;
        let group = session::comm().map(|c| (c.rank(), c.world_size()));
        let mut inner = d.lock();
        let plan = inner.data.plan(&batch.0, cs).script()?;
        let current = inner.pos.pending.first() == Some(&*batch.0);
        let skip = if current && inner.pos.chunk_size == cs {
            inner.pos.chunks_done
        } else {
            0
        };
        if current {
            inner.pos.chunk_size = cs;
            inner.pos.chunks_done = skip;
        }
        drop(inner);
        Ok(Chunks {
            data: d.clone(),
            batch: batch.0,
            plan: Arc::new(plan),
            skip,
            group,
        })
    }

    /// The whole of recording `i` (manifest order) as one chunk, for evaluation.
    #[rhai_fn(pure, return_raw)]
    pub fn recording(d: &mut Dataset, i: i64) -> Result<Chunk, Box<EvalAltResult>> {
        let data = Arc::clone(&d.lock().data);
        let n = data.frames().len();
        if i < 0 || i as usize >= n {
            return Err(script_error(format!(
                "recording({i}): the dataset has {n} recordings"
            )));
        }
        let i = i as usize;
        let frames = data.frames()[i].max(1);
        let plan = data.plan(&[i], frames).script()?;
        let planned = match plan.into_iter().next() {
            Some(c) => c,
            None => PlannedChunk {
                start: 0,
                width: frames,
                items: vec![crate::data::chunking::ChunkItem {
                    recording: 0,
                    valid: data.frames()[i],
                    words: Vec::new(),
                    whole_transcript: false,
                }],
            },
        };
        let chunk = data.load(&[i], &planned).script()?;
        Ok(Chunk {
            frames: chunk.lengths.iter().sum(),
            chunk: Arc::new(chunk),
            index: 0,
            count: 1,
            shard: None,
        })
    }

    /// The id of recording `i` (manifest order).
    #[rhai_fn(pure, return_raw)]
    pub fn id(d: &mut Dataset, i: i64) -> Result<String, Box<EvalAltResult>> {
        let inner = d.lock();
        let recs = &inner.data.manifest().recordings;
        usize::try_from(i)
            .ok()
            .and_then(|i| recs.get(i))
            .map(|r| r.id.clone())
            .ok_or_else(|| {
                script_error(format!(
                    "id({i}): the dataset has {} recordings",
                    recs.len()
                ))
            })
    }

    /// The transcript of recording `i`.
    #[rhai_fn(pure, return_raw)]
    pub fn transcript(d: &mut Dataset, i: i64) -> Result<String, Box<EvalAltResult>> {
        let inner = d.lock();
        if i < 0 || i as usize >= inner.data.frames().len() {
            return Err(script_error(format!("transcript({i}): out of range")));
        }
        Ok(super::transcript(&inner.data, i as usize))
    }

    /// Number of recordings in the batch.
    #[rhai_fn(name = "len", pure)]
    pub fn batch_len(b: &mut Batch) -> i64 {
        b.0.len() as i64
    }

    /// Number of chunks (including any already trained before a resume).
    #[rhai_fn(name = "len", pure)]
    pub fn chunks_len(c: &mut Chunks) -> i64 {
        c.plan.len() as i64
    }

    /// (B', 80, width) features of the chunk.
    #[rhai_fn(get = "features", pure)]
    pub fn features(c: &mut Chunk) -> Tensor {
        Tensor(c.chunk.features.clone())
    }

    /// Valid frames per item.
    #[rhai_fn(get = "lengths", pure)]
    pub fn lengths(c: &mut Chunk) -> Array {
        int_array(&c.chunk.lengths)
    }

    /// Target token ids per item.
    #[rhai_fn(get = "targets", pure)]
    pub fn targets(c: &mut Chunk) -> Targets {
        Targets(Arc::new(c.chunk.targets.clone()), c.shard)
    }

    /// Valid input frames in the chunk (all items; in a data-parallel run,
    /// those of every rank: what the whole chunk's loss is divided by).
    #[rhai_fn(get = "frames", pure)]
    pub fn frames(c: &mut Chunk) -> i64 {
        c.frames as i64
    }

    /// Position of the chunk in its batch (from 0).
    #[rhai_fn(get = "index", pure)]
    pub fn index(c: &mut Chunk) -> i64 {
        c.index as i64
    }

    /// True for the batch's last chunk.
    #[rhai_fn(get = "is_last", pure)]
    pub fn is_last(c: &mut Chunk) -> bool {
        c.index + 1 == c.count
    }

    /// Number of items (in a data-parallel run, this rank's; 0 for a stand-in).
    #[rhai_fn(get = "size", pure)]
    pub fn size(c: &mut Chunk) -> i64 {
        if c.shard.is_some_and(|s| s.stand_in) {
            0
        } else {
            c.chunk.lengths.len() as i64
        }
    }

    /// Prints as `Chunk(3 of 5: 4 x 1024 frames)`.
    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn chunk_to_string(c: &mut Chunk) -> String {
        let (b, _, w) = c.chunk.features.dims3().unwrap_or((0, 0, 0));
        format!("Chunk({} of {}: {b} x {w} frames)", c.index + 1, c.count)
    }

    /// SpecAugment on (B, F, T) features from the `spec_augment` config map,
    /// with random numbers from the run's seeded `spec_augment` stream; masks
    /// never touch padding. In a data-parallel run, a chunk's features (as
    /// handed out) get the masks a single process would give their items.
    #[rhai_fn(name = "spec_augment", return_raw)]
    pub fn spec_augment_fn(
        x: Tensor,
        lengths: Array,
        cfg: Map,
    ) -> Result<Tensor, Box<EvalAltResult>> {
        let cfg: SpecAugmentConfig = rhai::serde::from_dynamic(&Dynamic::from_map(cfg))
            .map_err(|e| script_error(format!("spec_augment(): bad config map: {e}")))?;
        let lengths = super::super::model_api::lengths_from(&lengths)?;
        if let Some((shard, comm)) = shard_of(&x.0, &lengths)? {
            return spec_augment_shard(&x.0, &shard, &cfg, comm.as_ref());
        }
        session::with(|s| {
            s.since_step = true;
            let rng = s.rng.stream("spec_augment");
            spec_augment_tensor(&x.0, &lengths, &cfg, rng, SpecAugmentOptions::default())
                .script()
                .map(Tensor)
        })
    }

    /// The manifest indices of the batch's recordings.
    #[rhai_fn(get = "indices", pure)]
    pub fn batch_indices(b: &mut Batch) -> Array {
        int_array(&b.0)
    }

    /// The ids of the dataset's recordings in `batch`.
    #[rhai_fn(pure)]
    pub fn recording_ids(d: &mut Dataset, b: Batch) -> Array {
        ids(&d.lock().data, &b.0)
    }
}
