//! Initramfs compression: the formats the guest kernel unpacks (`CONFIG_RD_GZIP/LZ4/ZSTD`).
//!
//! LZ4 uses the *legacy* frame format (`lz4 -l`), the only one the kernel's `unlz4` reads:
//! magic `0x184C2102`, then blocks of at most 8 MiB, each prefixed by its compressed length.

use std::io::{self, Read, Write};
use std::str::FromStr;

/// Magic number of the LZ4 legacy format (little-endian on disk).
pub const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Uncompressed size of one LZ4 legacy block (fixed by the format).
pub const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// zstd level: a good ratio at a tolerable build time; decompression speed barely depends on it.
pub const ZSTD_LEVEL: i32 = 15;
/// Most bytes [`decompress`] produces (guards tests and tools against bombs).
pub const MAX_DECOMPRESSED: u64 = 8 << 30;

/// How an image is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    Gzip,
    Lz4,
    Zstd,
    /// Plain cpio (the kernel reads it too; useful for debugging).
    None,
}

impl Compression {
    /// The measured fastest to boot (see the crate README: boot-to-init under QEMU TCG).
    pub const DEFAULT: Compression = Compression::Lz4;

    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }

    /// File name extension after `.cpio`.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Gzip => ".gz",
            Compression::Lz4 => ".lz4",
            Compression::Zstd => ".zst",
            Compression::None => "",
        }
    }

    /// Wraps `w` in a compressing writer; call [`Finish::finish`] at the end.
    pub fn writer<'a, W: Write + 'a>(self, w: W) -> io::Result<Box<dyn Finish + 'a>> {
        Ok(match self {
            Compression::Gzip => Box::new(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::new(9),
            )),
            Compression::Lz4 => Box::new(Lz4LegacyWriter::new(w)?),
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(w, ZSTD_LEVEL)?;
                e.include_checksum(true)?;
                Box::new(e)
            }
            Compression::None => Box::new(Plain(w)),
        })
    }
}

impl Default for Compression {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gzip" | "gz" => Ok(Compression::Gzip),
            "lz4" => Ok(Compression::Lz4),
            "zstd" | "zst" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            _ => Err(format!("unknown compression {s:?} (gzip, lz4, zstd, none)")),
        }
    }
}

/// A writer that must be finished to write its trailer.
pub trait Finish: Write {
    fn finish(self: Box<Self>) -> io::Result<()>;
}

impl<W: Write> Finish for flate2::write::GzEncoder<W> {
    fn finish(self: Box<Self>) -> io::Result<()> {
        let mut w = (*self).finish()?;
        w.flush()
    }
}

impl<W: Write> Finish for zstd::stream::write::Encoder<'_, W> {
    fn finish(self: Box<Self>) -> io::Result<()> {
        let mut w = (*self).finish()?;
        w.flush()
    }
}

struct Plain<W: Write>(W);

impl<W: Write> Write for Plain<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> Finish for Plain<W> {
    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.0.flush()
    }
}

/// LZ4 legacy-format writer.
pub struct Lz4LegacyWriter<W: Write> {
    w: W,
    buf: Vec<u8>,
}

impl<W: Write> Lz4LegacyWriter<W> {
    pub fn new(mut w: W) -> io::Result<Self> {
        w.write_all(&LZ4_LEGACY_MAGIC.to_le_bytes())?;
        Ok(Lz4LegacyWriter {
            w,
            buf: Vec::with_capacity(LZ4_LEGACY_BLOCK),
        })
    }

    fn block(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let c = lz4_flex::block::compress(&self.buf);
        let len = u32::try_from(c.len()).expect("an 8 MiB block compresses to less than 4 GiB");
        self.w.write_all(&len.to_le_bytes())?;
        self.w.write_all(&c)?;
        self.buf.clear();
        Ok(())
    }
}

impl<W: Write> Write for Lz4LegacyWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(LZ4_LEGACY_BLOCK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == LZ4_LEGACY_BLOCK {
            self.block()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

impl<W: Write> Finish for Lz4LegacyWriter<W> {
    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.block()?;
        self.w.flush()
    }
}

/// Decompresses any of the supported formats (detected by magic), for inspection and tests.
pub fn decompress(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    match data {
        [0x1f, 0x8b, ..] => {
            flate2::read::MultiGzDecoder::new(data)
                .take(MAX_DECOMPRESSED)
                .read_to_end(&mut out)?;
        }
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            zstd::stream::read::Decoder::new(data)?
                .take(MAX_DECOMPRESSED)
                .read_to_end(&mut out)?;
        }
        [0x02, 0x21, 0x4c, 0x18, rest @ ..] => {
            let mut rest = rest;
            while rest.len() >= 4 {
                let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let block = rest
                    .get(4..4 + len)
                    .ok_or_else(|| bad("truncated lz4 block"))?;
                let d = lz4_flex::block::decompress(block, LZ4_LEGACY_BLOCK)
                    .map_err(|e| bad(&format!("bad lz4 block: {e}")))?;
                out.extend_from_slice(&d);
                if out.len() as u64 > MAX_DECOMPRESSED {
                    return Err(bad("decompressed data too large"));
                }
                rest = &rest[4 + len..];
            }
        }
        _ => out.extend_from_slice(data),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_formats_round_trip() {
        // Larger than one lz4 block, compressible but not trivially.
        let data: Vec<u8> = (0..(LZ4_LEGACY_BLOCK + 12345) as u32)
            .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
            .collect();
        for c in [
            Compression::Gzip,
            Compression::Lz4,
            Compression::Zstd,
            Compression::None,
        ] {
            let mut out = Vec::new();
            let mut w = c.writer(&mut out).expect("writer");
            w.write_all(&data).expect("write");
            w.finish().expect("finish");
            if c != Compression::None {
                assert!(out.len() < data.len(), "{c:?} compresses");
            }
            assert!(decompress(&out).expect("decompress") == data, "{c:?}");
            assert_eq!(c.name().parse::<Compression>(), Ok(c));
        }
    }

    #[test]
    fn lz4_is_the_legacy_format() {
        let mut out = Vec::new();
        let mut w = Compression::Lz4.writer(&mut out).expect("writer");
        w.write_all(b"hello").expect("write");
        w.finish().expect("finish");
        assert_eq!(&out[..4], &[0x02, 0x21, 0x4c, 0x18]);
        // Readable by the reference tool when it is installed.
        if let Ok(mut child) = std::process::Command::new("lz4")
            .args(["-d", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(&out)
                .expect("feed lz4");
            let o = child.wait_with_output().expect("lz4");
            assert!(o.status.success());
            assert_eq!(o.stdout, b"hello");
        } else {
            println!("SKIPPED: lz4 tool not installed, cross-check skipped");
        }
    }
}
