//! Locating the features inside the reference's feature cache, a
//! `<episode>.spec.pt` written by `torch.save` (spec §2.1 item 6): a tensor of
//! shape (1, 80, T) or (80, T), usually float16.
//!
//! torch's file is a zip archive holding `<archive>/data.pkl` (the pickled
//! tensor, whose storage is referred to by key), `<archive>/data/<key>` (the
//! storage's raw bytes, stored uncompressed) and, in recent versions,
//! `<archive>/byteorder`. [`read_spec`] parses the pickle for the dtype,
//! shape, strides and storage offset and finds where the storage's bytes lie
//! in the file, so a caller holding the file memory-mapped reads any frame in
//! place without decompressing or copying the rest.

use std::io::{Cursor, Read};
use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::DType;
use zip::{CompressionMethod, ZipArchive};

/// The start of every zip archive (torch's format since 1.6).
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// The start of a file written by the legacy (pre-1.6) `torch.save`: pickle
/// protocol 2 followed by torch's magic number as a 10-byte long.
const LEGACY_MAGIC: &[u8] = &[
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// Where the (rows, frames) features of a `.spec.pt` file lie in its bytes.
///
/// Element `(r, t)` is storage element `offset + r * row_stride + t * frame_stride`,
/// and storage element `i` is the `dtype.size_in_bytes()` little-endian bytes
/// at `data.start + i * dtype.size_in_bytes()`; every element of the view is
/// checked to lie inside `data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecLayout {
    /// Element type of the storage: F16, BF16 or F32.
    pub dtype: DType,
    /// Mel bins (the second-to-last dimension).
    pub rows: usize,
    /// Frames (the last dimension).
    pub frames: usize,
    /// Storage elements between consecutive bins.
    pub row_stride: usize,
    /// Storage elements between consecutive frames.
    pub frame_stride: usize,
    /// Storage offset of element (0, 0), in elements.
    pub offset: usize,
    /// Byte range of the tensor's storage within the file.
    pub data: Range<usize>,
}

/// True when `bytes` start like a file written by `torch.save` (the zip
/// format, or the legacy one that [`read_spec`] rejects with advice).
pub fn is_torch_file(bytes: &[u8]) -> bool {
    bytes.starts_with(ZIP_MAGIC) || bytes.starts_with(LEGACY_MAGIC)
}

/// The layout of the features tensor in the bytes of a `.spec.pt` file
/// (`path` only names it in errors). The tensor must have shape (1, R, T) or
/// (R, T), storage type float16, bfloat16 or float32 in little-endian order,
/// and its storage must be stored uncompressed.
pub fn read_spec(bytes: &[u8], path: &Path) -> Result<SpecLayout> {
    let file = path.display();
    if bytes.starts_with(LEGACY_MAGIC) {
        bail!(
            "{file}: written in torch's legacy (pre-1.6) format, which is not supported; \
             re-save it with a current torch (`torch.save(torch.load(f), f)`)"
        );
    }
    let mut zip = ZipArchive::new(Cursor::new(bytes))
        .with_context(|| format!("{file}: not a torch zip file"))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| anyhow!("{file}: no data.pkl inside the zip (not a torch file)"))?;
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    check_byte_order(&mut zip, prefix).with_context(|| format!("{file}: bad byteorder entry"))?;
    let tensor = unpickle_tensor(&mut zip, &pkl, prefix).with_context(|| file.to_string())?;
    let width = tensor.dtype.size_in_bytes();
    let (rows, frames, row_stride, frame_stride) = match (&tensor.shape[..], &tensor.stride[..]) {
        ([1, r, t], [_, rs, ts]) | ([r, t], [rs, ts]) => (*r, *t, *rs, *ts),
        (shape, _) => {
            bail!("{file}: features must have shape (1, 80, T) or (80, T), found {shape:?}")
        }
    };
    let data = tensor
        .storage_len
        .checked_mul(width)
        .ok_or_else(|| anyhow!("declares {} elements", tensor.storage_len))
        .and_then(|len| storage_bytes(&mut zip, &tensor.entry, len, bytes.len()))
        .with_context(|| format!("{file}: storage `{}`", tensor.entry))?;
    let layout = SpecLayout {
        dtype: tensor.dtype,
        rows,
        frames,
        row_stride,
        frame_stride,
        offset: tensor.offset,
        data,
    };
    if let Some(last) = layout.last_element() {
        if last >= tensor.storage_len {
            bail!(
                "{file}: the ({rows}, {frames}) view with strides ({row_stride}, {frame_stride}) \
                 and offset {} reaches element {last} of a storage of {} elements",
                layout.offset,
                tensor.storage_len
            );
        }
    }
    Ok(layout)
}

impl SpecLayout {
    /// The storage index of the view's last element (`None` when empty),
    /// saturated at `usize::MAX`.
    fn last_element(&self) -> Option<usize> {
        if self.rows == 0 || self.frames == 0 {
            return None;
        }
        let last = self.offset as u128
            + (self.rows - 1) as u128 * self.row_stride as u128
            + (self.frames - 1) as u128 * self.frame_stride as u128;
        Some(usize::try_from(last).unwrap_or(usize::MAX))
    }
}

/// What the pickle says about the saved tensor.
struct PickledTensor {
    dtype: DType,
    shape: Vec<usize>,
    stride: Vec<usize>,
    /// Storage offset in elements.
    offset: usize,
    /// Zip entry of the storage.
    entry: String,
    /// Storage length in elements.
    storage_len: usize,
}

/// Refuses archives whose `byteorder` entry (absent in old files, which are
/// little-endian) says anything but `little`.
fn check_byte_order(zip: &mut ZipArchive<Cursor<&[u8]>>, prefix: &str) -> Result<()> {
    let name = format!("{prefix}byteorder");
    if zip.index_for_name(&name).is_none() {
        return Ok(());
    }
    let mut order = String::new();
    zip.by_name(&name)?.read_to_string(&mut order)?;
    if order.trim() != "little" {
        bail!(
            "storages are `{}`-endian; only little-endian is supported",
            order.trim()
        );
    }
    Ok(())
}

/// Reads `data.pkl` and interprets it as a single saved tensor.
fn unpickle_tensor(
    zip: &mut ZipArchive<Cursor<&[u8]>>,
    pkl: &str,
    prefix: &str,
) -> Result<PickledTensor> {
    let mut raw = Vec::new();
    zip.by_name(pkl)?
        .read_to_end(&mut raw)
        .with_context(|| format!("cannot read {pkl}"))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut raw.as_slice())
        .with_context(|| format!("cannot unpickle {pkl}"))?;
    let object = stack.finalize()?;
    let kind = describe(&object);
    let storage_dir = format!("{prefix}data");
    let info = object
        .into_tensor_info(Object::Unicode(String::new()), Path::new(&storage_dir))
        .map_err(|e| anyhow!("unsupported tensor in {pkl}: {e}"))?
        .ok_or_else(|| anyhow!("{pkl} holds {kind}, not a tensor saved with torch.save"))?;
    if !matches!(info.dtype, DType::F16 | DType::BF16 | DType::F32) {
        bail!(
            "features must be float16, bfloat16 or float32, found {:?}",
            info.dtype
        );
    }
    let width = info.dtype.size_in_bytes();
    Ok(PickledTensor {
        dtype: info.dtype,
        shape: info.layout.dims().to_vec(),
        stride: info.layout.stride().to_vec(),
        offset: info.layout.start_offset() / width,
        entry: info.path,
        storage_len: info.storage_size,
    })
}

/// A short name for the kind of a pickled object, for messages.
fn describe(object: &Object) -> String {
    match object {
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => match &**callable {
            Object::Class {
                module_name,
                class_name,
            } => format!("a {module_name}.{class_name} object"),
            _ => "an object".to_string(),
        },
        Object::Dict(_) => "a dict".to_string(),
        Object::List(_) => "a list".to_string(),
        Object::Tuple(_) => "a tuple".to_string(),
        other => format!("{other:?}"),
    }
}

/// The byte range in the file (of `total` bytes) of the uncompressed zip
/// entry `name`, which must hold at least `len` bytes.
fn storage_bytes(
    zip: &mut ZipArchive<Cursor<&[u8]>>,
    name: &str,
    len: usize,
    total: usize,
) -> Result<Range<usize>> {
    let entry = zip.by_name(name).context("missing from the zip")?;
    if entry.compression() != CompressionMethod::Stored {
        bail!(
            "compressed with {:?}; torch stores storages uncompressed",
            entry.compression()
        );
    }
    let size = usize::try_from(entry.size())?;
    if size < len {
        bail!("holds {size} bytes, the pickle declares {len}");
    }
    let start = entry
        .data_start()
        .ok_or_else(|| anyhow!("cannot locate its data"))?;
    let start = usize::try_from(start)?;
    let end = start
        .checked_add(len)
        .filter(|&e| e <= total)
        .ok_or_else(|| anyhow!("its data runs past the end of the file"))?;
    Ok(start..end)
}
