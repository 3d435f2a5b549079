//! Which part of a global batch each rank trains on.
//!
//! A batch of recordings is split into contiguous runs of its positions, one
//! per rank, the first `len % world` ranks taking one more; with more ranks
//! than recordings the last ranks get none. The chunk windows are planned on
//! the whole batch (so every rank steps through the same chunks in the same
//! order) and each rank loads only its own recordings' items of each chunk.

use std::ops::Range;

use crate::data::chunking::Chunk;

/// The positions within a batch of `len` recordings that `rank` of `world`
/// ranks trains on (`world > 0`, `rank < world`).
pub fn shard_range(len: usize, world: usize, rank: usize) -> Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = rank * base + rank.min(extra);
    let size = base + usize::from(rank < extra);
    start..start + size
}

/// The part of a chunk of the whole batch that belongs to the recordings at
/// `positions` of the batch: the same window, with only their items (none
/// when the rank has no active recording in this chunk). Item indices still
/// refer to the whole batch, so `Dataset::load` takes the whole batch.
pub fn shard_chunk(chunk: &Chunk, positions: &Range<usize>) -> Chunk {
    Chunk {
        start: chunk.start,
        width: chunk.width,
        items: chunk
            .items
            .iter()
            .filter(|item| positions.contains(&item.recording))
            .cloned()
            .collect(),
    }
}
