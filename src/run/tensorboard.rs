//! A TensorBoard event-file writer for scalar summaries.
//!
//! Written by hand because the maintained Rust options are either inactive
//! (tensorboard-rs, which pulls a protobuf 2 with an advisory) or tied to an old
//! prost; scalars need only the TFRecord framing and three protobuf messages.
//!
//! Format: each record is `u64 length | u32 masked-crc32c(length) | payload |
//! u32 masked-crc32c(payload)`, little endian. The payload is an `Event`
//! message: `wall_time` (field 1, double), `step` (2, int64), `file_version`
//! (3, string) or `summary` (5) holding `Summary.Value { tag (1), simple_value
//! (2, float) }`. The first record carries `file_version = "brain.Event:2"`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends scalar events to one `events.out.tfevents.*` file.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if missing).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = wall_time();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now as u64,
            std::process::id()
        ));
        let mut w = EventWriter {
            out: BufWriter::new(File::create(&path)?),
            path,
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, now);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.write_record(&event)?;
        w.out.flush()?;
        Ok(w)
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `value` for `tag` at `step`.
    pub fn scalar(&mut self, tag: &str, step: i64, value: f32) -> std::io::Result<()> {
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        put_key(&mut v, 2, 5);
        v.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &v);
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_key(&mut event, 2, 0);
        put_varint(&mut event, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Pushes buffered records to the file.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn write_record(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let len = (payload.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(payload)?;
        self.out.write_all(&masked_crc(payload).to_le_bytes())
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u64, wire_type: u64) {
    put_varint(buf, (field << 3) | wire_type);
}

fn put_double(buf: &mut Vec<u8>, field: u64, v: f64) {
    put_key(buf, field, 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli), bitwise; event files are small, so no table.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Reads back the scalars of an event file as (tag, step, value), checking
/// every record's CRCs. Used by tests and by `lcasr plot`.
pub fn read_scalars(path: &Path) -> anyhow::Result<Vec<(String, i64, f32)>> {
    let data = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        anyhow::ensure!(
            pos + 12 <= data.len(),
            "truncated record header at byte {pos}"
        );
        let len_bytes = &data[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into()?) as usize;
        let crc = u32::from_le_bytes(data[pos + 8..pos + 12].try_into()?);
        anyhow::ensure!(crc == masked_crc(len_bytes), "bad length CRC at byte {pos}");
        let start = pos + 12;
        anyhow::ensure!(
            start + len + 4 <= data.len(),
            "truncated record at byte {pos}"
        );
        let payload = &data[start..start + len];
        let crc = u32::from_le_bytes(data[start + len..start + len + 4].try_into()?);
        anyhow::ensure!(crc == masked_crc(payload), "bad payload CRC at byte {pos}");
        let mut step = 0i64;
        for (field, value) in fields(payload)? {
            match (field, value) {
                (2, Field::Varint(v)) => step = v as i64,
                (5, Field::Bytes(summary)) => {
                    for (f, v) in fields(summary)? {
                        if let (1, Field::Bytes(value)) = (f, v) {
                            let mut tag = String::new();
                            let mut x = f32::NAN;
                            for (f, v) in fields(value)? {
                                match (f, v) {
                                    (1, Field::Bytes(t)) => tag = String::from_utf8_lossy(t).into(),
                                    (2, Field::Fixed32(b)) => x = f32::from_le_bytes(b),
                                    _ => {}
                                }
                            }
                            out.push((tag, step, x));
                        }
                    }
                }
                _ => {}
            }
        }
        pos = start + len + 4;
    }
    Ok(out)
}

enum Field<'a> {
    Varint(u64),
    Fixed64,
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

fn fields(mut buf: &[u8]) -> anyhow::Result<Vec<(u64, Field<'_>)>> {
    fn varint(buf: &mut &[u8]) -> anyhow::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf
                .split_first()
                .ok_or_else(|| anyhow::anyhow!("bad varint"))?;
            *buf = rest;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        anyhow::bail!("varint too long")
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut buf)?),
            1 => {
                anyhow::ensure!(buf.len() >= 8, "truncated fixed64");
                buf = &buf[8..];
                Field::Fixed64
            }
            2 => {
                let n = varint(&mut buf)? as usize;
                anyhow::ensure!(buf.len() >= n, "truncated bytes field");
                let (bytes, rest) = buf.split_at(n);
                buf = rest;
                Field::Bytes(bytes)
            }
            5 => {
                anyhow::ensure!(buf.len() >= 4, "truncated fixed32");
                let b = [buf[0], buf[1], buf[2], buf[3]];
                buf = &buf[4..];
                Field::Fixed32(b)
            }
            w => anyhow::bail!("unsupported wire type {w}"),
        };
        out.push((key >> 3, field));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn scalars_round_trip() {
        let dir = std::env::temp_dir().join(format!("lcasr-tb-{}", std::process::id()));
        let mut w = EventWriter::create(&dir).unwrap();
        for step in 0..50 {
            w.scalar("loss", step, 10.0 / (step + 1) as f32).unwrap();
            w.scalar("lr", step, step as f32 * 1e-4).unwrap();
        }
        w.flush().unwrap();
        let got = read_scalars(w.path()).unwrap();
        assert_eq!(got.len(), 100);
        assert_eq!(got[0], ("loss".to_string(), 0, 10.0));
        assert_eq!(got[99], ("lr".to_string(), 49, 49.0 * 1e-4));
        // A flipped byte is caught by the CRC.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0xff;
        std::fs::write(w.path(), &bytes).unwrap();
        assert!(read_scalars(w.path()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// TensorBoard itself reads the file back (when `LCASR_TENSORBOARD_PYTHON`
    /// names a Python with the `tensorboard` package; skipped otherwise).
    #[test]
    fn tensorboard_reads_our_events() {
        let Some(python) = std::env::var_os("LCASR_TENSORBOARD_PYTHON") else {
            eprintln!("LCASR_TENSORBOARD_PYTHON not set; skipping the TensorBoard check");
            return;
        };
        let dir = std::env::temp_dir().join(format!("lcasr-tb-py-{}", std::process::id()));
        let mut w = EventWriter::create(&dir).unwrap();
        for step in 0..20 {
            w.scalar("train/loss", step, 3.5 - step as f32 * 0.125)
                .unwrap();
        }
        w.flush().unwrap();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/scripts/tensorboard_read.py"
        );
        let out = std::process::Command::new(python)
            .arg(script)
            .arg(w.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20);
        for (step, line) in lines.iter().enumerate() {
            let parts: Vec<&str> = line.split(' ').collect();
            assert_eq!(parts[..2], ["train/loss", &step.to_string()]);
            let value: f64 = parts[2].parse().unwrap();
            assert_eq!(value as f32, 3.5 - step as f32 * 0.125, "{line}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
