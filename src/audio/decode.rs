//! Decoding audio files to mono f32 samples in [-1, 1].
//!
//! WAV goes through hound (8/16/24/32-bit integer PCM scaled by
//! `1/2^(bits-1)`, and 32-bit float); FLAC, MP3 and Ogg Vorbis go through
//! symphonia. Like the reference, the default keeps channel 0 only.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use symphonia::core::audio::sample::Sample;
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

use super::features::SAMPLE_RATE;
use super::resample::{resample, Resampler};

/// A decoded mono signal.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    /// Mono samples, nominally in [-1, 1].
    pub samples: Vec<f32>,
    /// Samples per second.
    pub sample_rate: u32,
}

/// How a multichannel file becomes mono.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelMode {
    /// Keep channel 0 (the left channel), as the reference does.
    #[default]
    First,
    /// Average all channels.
    Mix,
}

/// Options for [`load_audio`] and [`load_16k`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// How channels are reduced to mono.
    pub channel: ChannelMode,
    /// The resampler [`load_16k`] uses when the file is not at 16 kHz.
    pub resampler: Resampler,
}

/// Why an audio file could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// The file does not exist.
    #[error("audio file not found: {}", path.display())]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// The file exists but cannot be read.
    #[error("cannot read audio file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The container or codec is not one we decode.
    #[error("unsupported audio format in {}: {detail} (supported: WAV, FLAC, MP3, Ogg Vorbis)", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What was not supported.
        detail: String,
    },
    /// The file is damaged or ends early.
    #[error("corrupt or truncated audio file {}: {detail}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The file holds no samples.
    #[error("audio file {} is empty (no samples)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// Reduces interleaved frames to mono, appending to `out`.
fn push_mono(interleaved: &[f32], channels: usize, mode: ChannelMode, out: &mut Vec<f32>) {
    let channels = channels.max(1);
    match mode {
        ChannelMode::First => out.extend(interleaved.iter().step_by(channels)),
        ChannelMode::Mix => out.extend(
            interleaved
                .chunks_exact(channels)
                .map(|frame| frame.iter().sum::<f32>() / channels as f32),
        ),
    }
}

/// Decodes an audio file to mono samples at its own sample rate.
pub fn load_audio(path: &Path, opts: &LoadOptions) -> Result<Audio, AudioError> {
    let owned = || path.to_path_buf();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => AudioError::NotFound { path: owned() },
        _ => AudioError::Io {
            path: owned(),
            source: e,
        },
    })?;
    if meta.len() == 0 {
        return Err(AudioError::Empty { path: owned() });
    }
    let is_wav = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("wav") || e.eq_ignore_ascii_case("wave"));
    let audio = if is_wav {
        load_wav(path, opts.channel)?
    } else {
        load_with_symphonia(path, opts.channel)?
    };
    if audio.samples.is_empty() {
        return Err(AudioError::Empty { path: owned() });
    }
    Ok(audio)
}

/// Decodes an audio file to mono samples at 16 kHz (resampled with `opts.resampler`).
pub fn load_16k(path: &Path, opts: &LoadOptions) -> Result<Vec<f32>, AudioError> {
    let audio = load_audio(path, opts)?;
    Ok(resample(
        &audio.samples,
        audio.sample_rate,
        SAMPLE_RATE,
        opts.resampler,
    ))
}

fn hound_error(path: &Path, e: hound::Error) -> AudioError {
    let path = path.to_path_buf();
    match e {
        // hound reports a short read as `Other` ("Failed to read enough bytes").
        hound::Error::IoError(source)
            if matches!(source.kind(), ErrorKind::UnexpectedEof | ErrorKind::Other) =>
        {
            AudioError::Corrupt {
                path,
                detail: format!("the file ends early ({source})"),
            }
        }
        hound::Error::IoError(source) => AudioError::Io { path, source },
        hound::Error::Unsupported => AudioError::Unsupported {
            path,
            detail: "WAV encoding not supported".into(),
        },
        other => AudioError::Corrupt {
            path,
            detail: other.to_string(),
        },
    }
}

fn load_wav(path: &Path, mode: ChannelMode) -> Result<Audio, AudioError> {
    let reader = hound::WavReader::open(path).map_err(|e| hound_error(path, e))?;
    let spec = reader.spec();
    let channels = spec.channels as usize;
    let mut interleaved = Vec::with_capacity(reader.len() as usize);
    match spec.sample_format {
        hound::SampleFormat::Float => {
            for s in reader.into_samples::<f32>() {
                interleaved.push(s.map_err(|e| hound_error(path, e))?);
            }
        }
        hound::SampleFormat::Int => {
            let scale = 1.0 / 2f64.powi(spec.bits_per_sample as i32 - 1);
            for s in reader.into_samples::<i32>() {
                let v = s.map_err(|e| hound_error(path, e))?;
                interleaved.push((v as f64 * scale) as f32);
            }
        }
    }
    if interleaved.len() % channels.max(1) != 0 {
        return Err(AudioError::Corrupt {
            path: path.to_path_buf(),
            detail: "the last frame is incomplete".into(),
        });
    }
    let mut samples = Vec::with_capacity(interleaved.len() / channels.max(1));
    push_mono(&interleaved, channels, mode, &mut samples);
    Ok(Audio {
        samples,
        sample_rate: spec.sample_rate,
    })
}

fn symphonia_error(path: &Path, e: SymphoniaError) -> AudioError {
    let path = path.to_path_buf();
    match e {
        SymphoniaError::Unsupported(detail) => AudioError::Unsupported {
            path,
            detail: detail.to_string(),
        },
        SymphoniaError::IoError(source) if source.kind() != ErrorKind::UnexpectedEof => {
            AudioError::Io { path, source }
        }
        other => AudioError::Corrupt {
            path,
            detail: other.to_string(),
        },
    }
}

fn load_with_symphonia(path: &Path, mode: ChannelMode) -> Result<Audio, AudioError> {
    let file = File::open(path).map_err(|source| AudioError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let stream = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let mut format = symphonia::default::get_probe()
        .probe(
            &hint,
            stream,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| match e {
            // A probe that finds nothing it knows means the format is unsupported.
            SymphoniaError::Unsupported(_) | SymphoniaError::IoError(_) => {
                AudioError::Unsupported {
                    path: path.to_path_buf(),
                    detail: format!("no known container ({e})"),
                }
            }
            other => symphonia_error(path, other),
        })?;
    let unsupported = |detail: &str| AudioError::Unsupported {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    };
    let track = format
        .default_track(TrackType::Audio)
        .ok_or_else(|| unsupported("no audio track"))?;
    let track_id = track.id;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| unsupported("no audio codec parameters"))?
        .clone();
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(|e| symphonia_error(path, e))?;

    let mut sample_rate = params.sample_rate;
    let mut samples = Vec::new();
    let mut interleaved: Vec<f32> = Vec::new();
    let (mut skipped, mut last_problem) = (0usize, "");
    loop {
        let packet = match format.next_packet() {
            Ok(Some(packet)) => packet,
            Ok(None) => break,
            Err(SymphoniaError::IoError(e)) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(symphonia_error(path, e)),
        };
        if packet.track_id != track_id {
            continue;
        }
        let buffer = match decoder.decode(&packet) {
            Ok(buffer) => buffer,
            // A damaged packet is skipped, as players do; the rest still decodes.
            Err(SymphoniaError::DecodeError(detail)) => {
                skipped += 1;
                last_problem = detail;
                continue;
            }
            Err(e) => return Err(symphonia_error(path, e)),
        };
        let spec = buffer.spec();
        sample_rate.get_or_insert(spec.rate());
        let channels = spec.channels().count();
        interleaved.resize(buffer.samples_interleaved(), f32::MID);
        buffer.copy_to_slice_interleaved(&mut interleaved);
        push_mono(&interleaved, channels, mode, &mut samples);
    }
    if skipped > 0 {
        if samples.is_empty() {
            return Err(AudioError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("no packet could be decoded ({last_problem})"),
            });
        }
        tracing::warn!(
            "{}: skipped {skipped} undecodable packets ({last_problem})",
            path.display()
        );
    }
    let sample_rate = sample_rate.ok_or_else(|| unsupported("unknown sample rate"))?;
    Ok(Audio {
        samples,
        sample_rate,
    })
}
