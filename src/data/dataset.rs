//! The training dataset: a prepared manifest whose feature files are read
//! chunk by chunk (memory-mapped), so only the chunk being trained on is
//! materialised, with background prefetch on its own thread.
//!
//! Feature files are our safetensors caches (a 2-D `features` tensor, written
//! by `lcasr prepare`) or the reference's `<episode>.spec.pt` files written by
//! `torch.save` (see [`super::torch_spec`]); the format is told by the file's
//! first bytes, not its name.

use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::chunking::{chunk_batch, Chunk};
use super::manifest::Manifest;
use super::prepare::cache_recipe;
use super::torch_spec::{is_torch_file, read_spec};
use crate::audio::features::{FeatureRecipe, N_MELS};
use crate::text::tokenizer::Tokenizer;

/// One training chunk, ready for the model and the loss.
pub struct TrainChunk {
    /// (B', 80, width) features; frames past an item's valid length are 0.
    pub features: Tensor,
    /// Valid frames per item.
    pub lengths: Vec<usize>,
    /// Target token ids per item.
    pub targets: Vec<Vec<u32>>,
    /// Manifest index of each item's recording.
    pub recordings: Vec<usize>,
    /// First frame of the chunk within its recordings.
    pub start: usize,
}

/// A prepared corpus (see `lcasr prepare`) with its tokenizer.
pub struct Dataset {
    manifest: Manifest,
    frames: Vec<usize>,
    tokenizer: Arc<Tokenizer>,
    recipe: Option<FeatureRecipe>,
}

impl Dataset {
    /// Opens the manifest at `path` (its relative feature paths resolve
    /// against its folder).
    /// Every feature file's header is checked now, so a missing or malformed
    /// file fails before training starts, naming the file.
    pub fn open(path: &Path, tokenizer: Arc<Tokenizer>) -> Result<Self> {
        let manifest = Manifest::load(path)?;
        let mut frames = Vec::with_capacity(manifest.recordings.len());
        // The recipe `prepare` recorded, with the first file that names it.
        let mut recipe: Option<(FeatureRecipe, &Path)> = None;
        for r in &manifest.recordings {
            let file = &r.features;
            let map = map_file(file)?;
            frames.push(features_view(&map, file)?.frames);
            let Some(found) = recorded_recipe(&map) else {
                continue;
            };
            match recipe {
                Some((first, first_file)) if first != found => bail!(
                    "{}: the manifest mixes feature recipes: {} has {} features, {} has {}; \
                     prepare every recording the same way",
                    path.display(),
                    first_file.display(),
                    first.name(),
                    file.display(),
                    found.name()
                ),
                Some(_) => {}
                None => recipe = Some((found, file)),
            }
        }
        Ok(Dataset {
            recipe: recipe.map(|(r, _)| r),
            manifest,
            frames,
            tokenizer,
        })
    }

    /// The feature recipe `prepare` recorded in the caches (`None` when they
    /// do not say, as the reference's `.spec.pt` files).
    pub fn recipe(&self) -> Option<FeatureRecipe> {
        self.recipe
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Frames of each recording, in manifest order.
    pub fn frames(&self) -> &[usize] {
        &self.frames
    }

    /// The chunks of a batch (manifest indices) at `chunk_size` frames.
    pub fn plan(&self, batch: &[usize], chunk_size: usize) -> Result<Vec<Chunk>> {
        let lengths: Vec<usize> = batch.iter().map(|&i| self.frames[i]).collect();
        let words: Vec<_> = batch
            .iter()
            .map(|&i| self.manifest.recordings[i].words.clone())
            .collect();
        chunk_batch(&lengths, &words, chunk_size)
    }

    /// Reads one planned chunk of `batch` from the feature files.
    pub fn load(&self, batch: &[usize], chunk: &Chunk) -> Result<TrainChunk> {
        let b = chunk.items.len();
        let w = chunk.width;
        let mut data = vec![0f32; b * N_MELS * w];
        let mut lengths = Vec::with_capacity(b);
        let mut targets = Vec::with_capacity(b);
        let mut recordings = Vec::with_capacity(b);
        for (slot, item) in chunk.items.iter().enumerate() {
            let index = batch[item.recording];
            let rec = &self.manifest.recordings[index];
            let file = &rec.features;
            let map = map_file(file)?;
            let view = features_view(&map, file)?;
            let out = &mut data[slot * N_MELS * w..(slot + 1) * N_MELS * w];
            let valid = item.valid.min(view.frames.saturating_sub(chunk.start));
            for bin in 0..N_MELS {
                for (t, dst) in (chunk.start..).zip(&mut out[bin * w..bin * w + valid]) {
                    *dst = view.get(bin, t);
                }
            }
            let text = if item.whole_transcript {
                rec.text.clone().unwrap_or_default()
            } else {
                item.words.join(" ")
            };
            targets.push(
                self.tokenizer
                    .encode(&text)
                    .with_context(|| format!("cannot tokenise the transcript of `{}`", rec.id))?,
            );
            lengths.push(item.valid);
            recordings.push(index);
        }
        Ok(TrainChunk {
            features: Tensor::from_vec(data, (b, N_MELS, w), &Device::Cpu)?,
            lengths,
            targets,
            recordings,
            start: chunk.start,
        })
    }

    /// Loads the chunks of `batch` on a background thread, up to `depth`
    /// ahead of the consumer, in order.
    pub fn prefetch(
        self: &Arc<Self>,
        batch: Vec<usize>,
        chunks: Vec<Chunk>,
        depth: usize,
    ) -> Receiver<Result<TrainChunk>> {
        let (tx, rx) = sync_channel(depth.max(1));
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            for chunk in &chunks {
                if tx.send(me.load(&batch, chunk)).is_err() {
                    break; // the consumer stopped
                }
            }
        });
        rx
    }
}

/// The whole (80, T) f32 features of one cached file (our safetensors cache
/// or a reference `.spec.pt`), for evaluation, with the recipe `prepare`
/// recorded in it (see [`recorded_recipe`]).
pub fn read_whole_features(path: &Path) -> Result<(Tensor, Option<FeatureRecipe>)> {
    let map = map_file(path)?;
    let view = features_view(&map, path)?;
    let data: Vec<f32> = (0..view.rows)
        .flat_map(|r| (0..view.frames).map(move |t| (r, t)))
        .map(|(r, t)| view.get(r, t))
        .collect();
    let features = Tensor::from_vec(data, (view.rows, view.frames), &Device::Cpu)?;
    Ok((features, recorded_recipe(&map)))
}

/// The recipe `prepare` recorded in a feature file's metadata; `None` for
/// caches written by other tools and for torch files (the reference's
/// `.spec.pt` files do not say).
fn recorded_recipe(bytes: &[u8]) -> Option<FeatureRecipe> {
    (!is_torch_file(bytes))
        .then(|| cache_recipe(bytes))
        .flatten()
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open features {}", path.display()))?;
    // SAFETY: the feature cache is written once by `prepare` (atomically, by
    // rename) and only read afterwards; a concurrent writer would replace the
    // file rather than modify the mapped one.
    unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))
}

/// Element access over the stored features, whatever their float type.
enum Values<'a> {
    F16(&'a [u8]),
    BF16(&'a [u8]),
    F32(&'a [u8]),
}

impl Values<'_> {
    fn get(&self, i: usize) -> f32 {
        match self {
            Values::F16(b) => f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
            Values::BF16(b) => bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
            Values::F32(b) => {
                f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
            }
        }
    }
}

/// The (rows, frames) features of a mapped file, read in place: element
/// `(r, t)` is value `offset + r * row_stride + t * frame_stride`.
struct FeatureView<'a> {
    rows: usize,
    frames: usize,
    row_stride: usize,
    frame_stride: usize,
    offset: usize,
    values: Values<'a>,
}

impl FeatureView<'_> {
    fn get(&self, row: usize, frame: usize) -> f32 {
        self.values
            .get(self.offset + row * self.row_stride + frame * self.frame_stride)
    }
}

/// The (80, T) features of a mapped safetensors cache or torch `.spec.pt`
/// file, whose header was checked.
fn features_view<'a>(map: &'a Mmap, path: &Path) -> Result<FeatureView<'a>> {
    let view = if is_torch_file(map) {
        torch_view(map, path)?
    } else {
        safetensors_view(map, path)?
    };
    if view.rows != N_MELS {
        bail!(
            "{}: features have {} rows, expected {N_MELS}",
            path.display(),
            view.rows
        );
    }
    Ok(view)
}

/// The features of a torch `.spec.pt` file, strides and offset as stored.
fn torch_view<'a>(map: &'a Mmap, path: &Path) -> Result<FeatureView<'a>> {
    let layout = read_spec(map, path)?;
    let bytes = &map[layout.data.clone()];
    let values = match layout.dtype {
        DType::F16 => Values::F16(bytes),
        DType::BF16 => Values::BF16(bytes),
        DType::F32 => Values::F32(bytes),
        other => bail!(
            "{}: features must be f16, bf16 or f32, found {other:?}",
            path.display()
        ),
    };
    Ok(FeatureView {
        rows: layout.rows,
        frames: layout.frames,
        row_stride: layout.row_stride,
        frame_stride: layout.frame_stride,
        offset: layout.offset,
        values,
    })
}

/// The 2-D `features` tensor of one of our safetensors caches (row-major).
fn safetensors_view<'a>(map: &'a Mmap, path: &Path) -> Result<FeatureView<'a>> {
    let st = SafeTensors::deserialize(map).with_context(|| {
        format!(
            "{}: neither a safetensors file nor a torch file",
            path.display()
        )
    })?;
    let view = st
        .tensor("features")
        .map_err(|_| anyhow!("{}: no `features` tensor", path.display()))?;
    let shape = view.shape().to_vec();
    let [rows, frames] = shape[..] else {
        bail!(
            "{}: features must be 2-D (80, T), found {shape:?}",
            path.display()
        );
    };
    let values = match view.dtype() {
        Dtype::F16 => Values::F16(view.data()),
        Dtype::BF16 => Values::BF16(view.data()),
        Dtype::F32 => Values::F32(view.data()),
        other => bail!(
            "{}: features must be f16, bf16 or f32, found {other:?}",
            path.display()
        ),
    };
    Ok(FeatureView {
        rows,
        frames,
        row_stride: frames,
        frame_stride: 1,
        offset: 0,
        values,
    })
}
