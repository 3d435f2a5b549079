//! Audio input: decoding (WAV, FLAC, MP3, OGG), resampling to 16 kHz and the
//! reference's power-mel features.

pub mod decode;
pub mod features;
pub mod resample;
