//! A minimal writer of uncompressed cpio "newc" archives (the Linux initramfs format).
//!
//! Only what the lab needs: directories, regular files (copied from the host or given as bytes)
//! and symbolic links, all owned by root, one link each. Archives end with the `TRAILER!!!`
//! entry and are padded to 512 bytes so that several can be concatenated into one initrd.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

/// Largest file a newc header can describe (its size field has 32 bits).
const MAX_FILE_SIZE: u64 = u32::MAX as u64;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("{0} is larger than 4 GiB, which the cpio format cannot hold")]
    TooLarge(String),
    #[error("{0} changed size while it was being archived")]
    Changed(String),
    #[error("cannot write the archive")]
    Io(#[from] io::Error),
}

/// Streams entries into a newc archive.
pub struct CpioWriter<W: Write> {
    out: BufWriter<W>,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out: BufWriter::with_capacity(1 << 20, out),
            written: 0,
            next_ino: 1,
        }
    }

    /// A directory at `name` (absolute or relative; stored relative to `/`).
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.header(name, S_IFDIR | (perm & 0o7777), 2, 0, 0)?;
        Ok(())
    }

    /// A symbolic link at `name` pointing to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        let data = target.as_bytes();
        self.header(name, S_IFLNK | 0o777, 1, data.len() as u32, 0)?;
        self.data(data)
    }

    /// A character device node.
    pub fn chardev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.header_full(name, S_IFCHR | (perm & 0o7777), 1, 0, 0, (major, minor))
    }

    /// A regular file with the given contents.
    pub fn bytes(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let len = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(name.to_string()))?;
        self.header(name, S_IFREG | (perm & 0o7777), 1, len, 0)?;
        self.data(data)
    }

    /// A regular file copied from `src` on the host.
    pub fn file(&mut self, name: &str, perm: u32, src: &Path, mtime: u32) -> Result<(), CpioError> {
        let mut f = File::open(src)?;
        let size = f.metadata()?.len();
        if size > MAX_FILE_SIZE {
            return Err(CpioError::TooLarge(src.display().to_string()));
        }
        self.header(name, S_IFREG | (perm & 0o7777), 1, size as u32, mtime)?;
        let copied = io::copy(&mut (&mut f).take(size), &mut self.out)?;
        if copied != size {
            return Err(CpioError::Changed(src.display().to_string()));
        }
        self.written += copied;
        self.pad(4)
    }

    /// Writes the trailer, pads to 512 bytes and returns the inner writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header("TRAILER!!!", 0, 1, 0, 0)?;
        self.pad(512)?;
        self.out
            .into_inner()
            .map_err(|e| CpioError::Io(e.into_error()))
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u32,
        mtime: u32,
    ) -> Result<(), CpioError> {
        self.header_full(name, mode, nlink, size, mtime, (0, 0))
    }

    fn header_full(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u32,
        mtime: u32,
        rdev: (u32, u32),
    ) -> Result<(), CpioError> {
        let name = name.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            mtime,
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut h = String::with_capacity(110 + name.len() + 4);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        h.push_str(name);
        h.push('\0');
        self.data(h.as_bytes())
    }

    fn data(&mut self, data: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad(4)
    }

    fn pad(&mut self, to: u64) -> Result<(), CpioError> {
        let rem = self.written % to;
        if rem != 0 {
            let n = (to - rem) as usize;
            self.out.write_all(&vec![0u8; n])?;
            self.written += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin", 0o755).expect("dir");
        w.bytes("/bin/hello", 0o755, b"hi\n").expect("file");
        w.symlink("/sh", "bin/hello").expect("link");
        let out = w.finish().expect("finish");
        assert_eq!(out.len() % 512, 0);
        assert!(out.starts_with(b"070701"));
        // Every header starts on a 4-byte boundary.
        let text = String::from_utf8_lossy(&out);
        for (pos, _) in text.match_indices("070701") {
            assert_eq!(pos % 4, 0, "header at {pos}");
        }
        assert!(text.contains("bin/hello\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // Mode of the file entry: regular, 0755.
        let at = text.find("bin/hello\0").expect("name") - 110;
        assert_eq!(&text[at + 14..at + 22], "000081ed");
        assert_eq!(&text[at + 54..at + 62], "00000003");
    }

    #[test]
    fn host_file_copied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"abcde").expect("write");
        let mut w = CpioWriter::new(Vec::new());
        w.file("/f", 0o644, &p, 7).expect("file");
        let out = w.finish().expect("finish");
        let text = String::from_utf8_lossy(&out);
        let at = text.find("f\0").expect("name");
        assert_eq!(&text[at + 2..at + 7], "abcde");
    }
}
