//! Data pipeline: manifests, datasets, batching, chunking with word timings,
//! SpecAugment and background prefetch.
