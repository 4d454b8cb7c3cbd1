//! The cpio "newc" format (what the kernel unpacks as an initramfs): a writer for a [`Tree`]
//! and a reader (for tests and inspection).
//!
//! Hard links follow the kernel's reading of the format: every name of an inode carries the same
//! `ino` and `nlink`; the first one carries the data, the others are empty.

use std::collections::HashMap;
use std::io::{self, Write};

use super::tree::{DevKind, Node, Tree};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &[u8] = b"TRAILER!!!";
const HEADER_LEN: usize = 110;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;
const S_IFIFO: u32 = 0o010_000;
/// Mask of the file-type bits of a mode.
pub const S_IFMT: u32 = 0o170_000;

/// Most entries [`parse`] accepts.
pub const MAX_PARSE_ENTRIES: usize = 4_000_000;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cpio archive truncated at offset {0}")]
    Truncated(usize),
    #[error("bad cpio header at offset {0}")]
    BadHeader(usize),
    #[error("cpio archive has more than MAX_PARSE_ENTRIES entries")]
    TooMany,
    #[error("cpio entry {name:?}: {why}")]
    Entry { name: String, why: &'static str },
}

/// What a written archive contains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
}

/// One entry's header fields (the name is given separately).
#[derive(Clone, Copy, Debug, Default)]
pub struct Header {
    /// Inode number; `None`: the writer's next one.
    pub ino: Option<u32>,
    /// File type and permission bits (`S_IFREG | 0o755`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u64,
    /// Device major and minor (device nodes).
    pub rdev: (u32, u32),
}

/// The one cpio newc writer of the project (images, the KVM lab's initramfs, the bench, the VMM
/// tests): streams entries, each header and data padded to 4 bytes, then the trailer.
pub struct Writer<W: Write> {
    w: W,
    pos: u64,
    next_ino: u32,
}

fn too_large(name: &[u8]) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is larger than 4 GiB, which cpio newc cannot hold",
            String::from_utf8_lossy(name)
        ),
    )
}

/// `/a/b` and `a/b` are stored as `a/b`; the root as `.`.
fn stored_name(name: &str) -> &[u8] {
    match name.trim_start_matches('/') {
        "" => b".",
        n => n.as_bytes(),
    }
}

impl<W: Write> Writer<W> {
    pub fn new(w: W) -> Self {
        Writer {
            w,
            pos: 0,
            next_ino: 1,
        }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, to: u64) -> io::Result<()> {
        let n = ((to - self.pos % to) % to) as usize;
        self.put(&vec![0u8; n])
    }

    fn header(&mut self, name: &[u8], h: &Header, size: u64) -> io::Result<u32> {
        let size = u32::try_from(size).map_err(|_| too_large(name))?;
        let ino = h.ino.unwrap_or_else(|| {
            let i = self.next_ino;
            self.next_ino = self.next_ino.wrapping_add(1);
            i
        });
        let mtime = u32::try_from(h.mtime).unwrap_or(u32::MAX);
        let fields = [
            ino,
            h.mode,
            h.uid,
            h.gid,
            h.nlink,
            mtime,
            size,
            0,
            0,
            h.rdev.0,
            h.rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut b = Vec::with_capacity(HEADER_LEN);
        b.extend_from_slice(MAGIC);
        for f in fields {
            b.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.put(&b)?;
        self.put(name)?;
        self.put(&[0])?;
        self.pad_to(4)?;
        Ok(ino)
    }

    /// One entry with its data in memory; returns the inode number used.
    pub fn entry(&mut self, name: &[u8], h: &Header, data: &[u8]) -> io::Result<u32> {
        let ino = self.header(name, h, data.len() as u64)?;
        self.put(data)?;
        self.pad_to(4)?;
        Ok(ino)
    }

    /// One entry whose `size` data bytes are read from `data` (streamed, not held).
    pub fn entry_from<R: io::Read>(
        &mut self,
        name: &[u8],
        h: &Header,
        data: R,
        size: u64,
    ) -> io::Result<u32> {
        let ino = self.header(name, h, size)?;
        let copied = io::copy(&mut data.take(size), &mut self.w)?;
        self.pos += copied;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} changed size while it was being archived",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        self.pad_to(4)?;
        Ok(ino)
    }

    /// A root-owned directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        let h = Header {
            mode: S_IFDIR | (perm & 0o7777),
            nlink: 2,
            ..Header::default()
        };
        self.entry(stored_name(name), &h, &[]).map(drop)
    }

    /// A root-owned regular file with the given contents.
    pub fn bytes(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let h = Header {
            mode: S_IFREG | (perm & 0o7777),
            nlink: 1,
            ..Header::default()
        };
        self.entry(stored_name(name), &h, data).map(drop)
    }

    /// A root-owned regular file copied (streamed) from `src` on the host.
    pub fn file(
        &mut self,
        name: &str,
        perm: u32,
        src: &std::path::Path,
        mtime: u64,
    ) -> io::Result<()> {
        let mut f = std::fs::File::open(src)?;
        let size = f.metadata()?.len();
        let h = Header {
            mode: S_IFREG | (perm & 0o7777),
            nlink: 1,
            mtime,
            ..Header::default()
        };
        self.entry_from(stored_name(name), &h, &mut f, size)
            .map(drop)
    }

    /// A symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        let h = Header {
            mode: S_IFLNK | 0o777,
            nlink: 1,
            ..Header::default()
        };
        self.entry(stored_name(name), &h, target.as_bytes())
            .map(drop)
    }

    /// A root-owned character device node.
    pub fn chardev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let h = Header {
            mode: S_IFCHR | (perm & 0o7777),
            nlink: 1,
            rdev: (major, minor),
            ..Header::default()
        };
        self.entry(stored_name(name), &h, &[]).map(drop)
    }

    /// Writes the trailer, pads the archive to a multiple of `align` bytes (512 lets archives be
    /// concatenated into one initrd; 4 is the format's own) and returns the inner writer.
    pub fn finish(mut self, align: u64) -> io::Result<W> {
        let h = Header {
            ino: Some(0),
            nlink: 1,
            ..Header::default()
        };
        self.entry(TRAILER, &h, &[])?;
        self.pad_to(align.max(4))?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// Writes `tree` as a cpio newc archive (without the root directory itself), then the trailer.
pub fn write_tree<W: Write>(tree: &Tree, w: W) -> io::Result<Stats> {
    let links = tree.link_counts();
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut out = Writer::new(w);
    let mut stats = Stats::default();
    tree.walk::<io::Error>(&mut |path, node| {
        stats.entries += 1;
        let h = |mode: u32, meta: &super::tree::Meta, nlink: u32| Header {
            ino: None,
            mode,
            uid: meta.uid,
            gid: meta.gid,
            nlink,
            mtime: meta.mtime,
            rdev: (0, 0),
        };
        match node {
            Node::Dir { meta, .. } => out.entry(path, &h(S_IFDIR | meta.mode, meta, 2), &[]),
            Node::File(i) => {
                let nlink = links.get(&i.id).copied().unwrap_or(1);
                let mut hdr = h(S_IFREG | i.meta.mode, &i.meta, nlink);
                // Hard links: every name carries the inode; the first one carries the data.
                let data: &[u8] = match seen.get(&i.id) {
                    Some(first) => {
                        hdr.ino = Some(*first);
                        &[]
                    }
                    None => &i.data,
                };
                stats.bytes += data.len() as u64;
                let ino = out.entry(path, &hdr, data)?;
                seen.entry(i.id).or_insert(ino);
                Ok(ino)
            }
            Node::Symlink { meta, target } => out.entry(path, &h(S_IFLNK | 0o777, meta, 1), target),
            Node::Device {
                meta,
                kind,
                major,
                minor,
            } => {
                let t = match kind {
                    DevKind::Char => S_IFCHR,
                    DevKind::Block => S_IFBLK,
                };
                let mut hdr = h(t | meta.mode, meta, 1);
                hdr.rdev = (*major, *minor);
                out.entry(path, &hdr, &[])
            }
            Node::Fifo { meta } => out.entry(path, &h(S_IFIFO | meta.mode, meta, 1), &[]),
        }
        .map(drop)
    })?;
    out.finish(4)?;
    Ok(stats)
}

/// One entry read back from an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

impl Entry {
    /// The file-type bits of the mode.
    pub fn kind(&self) -> u32 {
        self.mode & S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.kind() == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.kind() == S_IFLNK
    }
    pub fn is_char_device(&self) -> bool {
        self.kind() == S_IFCHR
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Parses a whole (uncompressed) newc archive up to its trailer.
pub fn parse(buf: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let h = buf
            .get(pos..pos + HEADER_LEN)
            .ok_or(CpioError::Truncated(pos))?;
        if &h[..6] != MAGIC {
            return Err(CpioError::BadHeader(pos));
        }
        let mut f = [0u32; 13];
        for (i, v) in f.iter_mut().enumerate() {
            let s = std::str::from_utf8(&h[6 + i * 8..14 + i * 8])
                .map_err(|_| CpioError::BadHeader(pos))?;
            *v = u32::from_str_radix(s, 16).map_err(|_| CpioError::BadHeader(pos))?;
        }
        let namesize = f[11] as usize;
        let name_start = pos + HEADER_LEN;
        let name_bytes = buf
            .get(name_start..name_start + namesize)
            .ok_or(CpioError::Truncated(name_start))?;
        let name = String::from_utf8_lossy(name_bytes.strip_suffix(&[0]).unwrap_or(name_bytes))
            .into_owned();
        let data_start = align4(name_start + namesize);
        let size = f[6] as usize;
        let data = buf
            .get(data_start..data_start + size)
            .ok_or(CpioError::Truncated(data_start))?
            .to_vec();
        pos = align4(data_start + size);
        if name.as_bytes() == TRAILER {
            return Ok(out);
        }
        if out.len() >= MAX_PARSE_ENTRIES {
            return Err(CpioError::TooMany);
        }
        out.push(Entry {
            name,
            ino: f[0],
            mode: f[1],
            uid: f[2],
            gid: f[3],
            nlink: f[4],
            mtime: f[5],
            rdev: (f[9], f[10]),
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::tree::{Meta, Tree};
    use super::*;

    #[test]
    fn streamed_entries_are_aligned_and_terminated() {
        let mut w = Writer::new(Vec::new());
        w.dir("/bin", 0o755).expect("dir");
        w.bytes("/bin/hello", 0o755, b"hi\n").expect("file");
        w.symlink("/sh", "bin/hello").expect("link");
        let out = w.finish(512).expect("finish");
        assert_eq!(out.len() % 512, 0);
        let entries = parse(&out).expect("parse back");
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/hello", "sh"]);
        assert!(entries[1].is_file() && entries[1].mode & 0o7777 == 0o755);
        assert_eq!(entries[1].data, b"hi\n");
        assert!(entries[2].is_symlink());
    }

    #[test]
    fn host_files_are_streamed_and_size_changes_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"abcde").expect("write");
        let mut w = Writer::new(Vec::new());
        w.file("/f", 0o644, &p, 7).expect("file");
        let out = w.finish(4).expect("finish");
        let e = parse(&out).expect("parse");
        assert_eq!(
            (e[0].name.as_str(), e[0].data.as_slice()),
            ("f", &b"abcde"[..])
        );
        let mut w = Writer::new(Vec::new());
        let lying = Header {
            mode: 0o100_644,
            nlink: 1,
            ..Header::default()
        };
        assert!(w.entry_from(b"g", &lying, &b"abc"[..], 10).is_err());
    }

    #[test]
    fn round_trip() {
        let mut t = Tree::new();
        t.insert_file(
            "usr/bin/tool",
            Meta {
                mode: 0o4755,
                uid: 3,
                gid: 4,
                mtime: 9,
            },
            b"12345".to_vec(),
        )
        .expect("file");
        t.insert_file("e", Meta::root(0o600), Vec::new())
            .expect("empty");
        let comps = super::super::tree::components(b"dev/console").expect("path");
        t.insert(
            &comps,
            Node::Device {
                meta: Meta::root(0o600),
                kind: DevKind::Char,
                major: 5,
                minor: 1,
            },
            "dev/console",
        )
        .expect("dev");
        t.insert(
            &[b"lnk".to_vec()],
            Node::Symlink {
                meta: Meta::root(0o777),
                target: b"usr/bin/tool".to_vec(),
            },
            "lnk",
        )
        .expect("link");
        let mut buf = Vec::new();
        let stats = write_tree(&t, &mut buf).expect("write");
        assert_eq!(buf.len() % 4, 0);
        assert_eq!(stats.entries, 7);
        let e = parse(&buf).expect("parse");
        let names: Vec<&str> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "e",
                "lnk",
                "usr",
                "usr/bin",
                "usr/bin/tool"
            ]
        );
        let tool = &e[6];
        assert!(tool.is_file());
        assert_eq!(
            (tool.mode & 0o7777, tool.uid, tool.gid, tool.data.as_slice()),
            (0o4755, 3, 4, &b"12345"[..])
        );
        assert!(e[1].is_char_device());
        assert_eq!(e[1].rdev, (5, 1));
        assert!(e[3].is_symlink());
        assert_eq!(e[3].data, b"usr/bin/tool");
        assert!(e[0].is_dir());
        assert!(e[2].data.is_empty());
    }

    #[test]
    fn hard_links_carry_data_once() {
        let mut t = Tree::new();
        let l = super::super::tree::tests::layer(&[("a", 'f', "data"), ("b", 'h', "a")]);
        t.apply_tar(&l[..], Default::default()).expect("apply");
        let mut buf = Vec::new();
        write_tree(&t, &mut buf).expect("write");
        let e = parse(&buf).expect("parse");
        assert_eq!(
            (e[0].ino, e[0].nlink, e[0].data.as_slice()),
            (e[1].ino, 2, &b"data"[..])
        );
        assert!(e[1].data.is_empty());
    }

    #[test]
    fn truncated_and_garbage_input_fail() {
        let mut buf = Vec::new();
        write_tree(&Tree::new(), &mut buf).expect("write");
        assert!(parse(&buf).expect("empty archive").is_empty());
        assert!(matches!(parse(&buf[..50]), Err(CpioError::Truncated(0))));
        assert!(matches!(parse(b"garbagegarbagegarbagegarbagegarbagegarbagegarbagegarbagegarbagegarbagegarbagegarbagegarbagegarbagegarbagegarbage"), Err(CpioError::BadHeader(0))));
    }
}
