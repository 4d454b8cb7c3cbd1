//! The file tree of an initramfs, gathered from host paths before anything is written.
//!
//! Host paths keep their absolute location; symbolic links on the way (like Debian's
//! `/lib -> usr/lib`) are reproduced, so that dynamic libraries and data files are found where the
//! host's programs expect them. The tree can be hashed cheaply (paths, sizes, modification times)
//! to key a cache, and written as a cpio archive.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use cloude_image::image::cpio::Writer as CpioWriter;

/// How many symbolic links one path may traverse before we call it a loop.
const MAX_LINK_DEPTH: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{0} does not exist on this machine")]
    Missing(PathBuf),
    #[error("{0} is not an absolute path")]
    NotAbsolute(PathBuf),
    #[error("too many levels of symbolic links at {0}")]
    LinkLoop(PathBuf),
    #[error("ldd failed on {0}: {1}")]
    Ldd(PathBuf, String),
    #[error("I/O error at {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("cannot write the archive entry {0}: {1}")]
    Cpio(PathBuf, std::io::Error),
}

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> TreeError + '_ {
    move |e| TreeError::Io(p.to_path_buf(), e)
}

/// One entry of the tree, keyed by its absolute path inside the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        perm: u32,
    },
    Symlink {
        target: PathBuf,
    },
    /// A host file, archived as it is when the archive is written.
    HostFile {
        src: PathBuf,
        perm: u32,
        size: u64,
        mtime_ns: i128,
    },
    Bytes {
        perm: u32,
        data: Vec<u8>,
    },
    CharDev {
        perm: u32,
        major: u32,
        minor: u32,
    },
}

/// A set of entries; parents always exist as directories (or links to them).
#[derive(Debug, Default)]
pub struct Tree {
    entries: BTreeMap<PathBuf, Entry>,
}

/// Lexically removes `.` and `..` from an absolute path that contains no symbolic links.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

impl Tree {
    pub fn new() -> Self {
        Tree::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds `path` with `entry`, creating missing parent directories.
    pub fn insert(&mut self, path: &Path, entry: Entry) {
        let path = normalize(path);
        let mut parent = PathBuf::from("/");
        let comps: Vec<_> = path.components().skip(1).collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            parent.push(c);
            if !self.entries.contains_key(&parent) {
                // The host's mode when it has the directory (e.g. /tmp is 1777), else 0755.
                let perm = fs::metadata(&parent)
                    .ok()
                    .filter(|m| m.is_dir())
                    .map_or(0o755, |m| m.permissions().mode() & 0o7777);
                self.entries.insert(parent.clone(), Entry::Dir { perm });
            }
        }
        if path != Path::new("/") {
            self.entries.insert(path, entry);
        }
    }

    /// Whether `path` already has an entry.
    pub fn contains(&self, path: &Path) -> bool {
        self.entries.contains_key(&normalize(path))
    }

    /// A file with the given contents.
    pub fn add_bytes(&mut self, path: &str, perm: u32, data: impl Into<Vec<u8>>) {
        self.insert(
            Path::new(path),
            Entry::Bytes {
                perm,
                data: data.into(),
            },
        );
    }

    /// A symbolic link.
    pub fn add_symlink(&mut self, path: &str, target: &str) {
        self.insert(
            Path::new(path),
            Entry::Symlink {
                target: PathBuf::from(target),
            },
        );
    }

    /// A character device node.
    pub fn add_chardev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.insert(Path::new(path), Entry::CharDev { perm, major, minor });
    }

    /// An empty directory.
    pub fn add_dir(&mut self, path: &str, perm: u32) {
        self.insert(Path::new(path), Entry::Dir { perm });
    }

    /// Resolves the symbolic links of host path `p` (adding each link to the tree) and returns
    /// the real path. Does not add the final object itself.
    fn resolve(&mut self, p: &Path, depth: usize) -> Result<PathBuf, TreeError> {
        if depth > MAX_LINK_DEPTH {
            return Err(TreeError::LinkLoop(p.to_path_buf()));
        }
        if !p.is_absolute() {
            return Err(TreeError::NotAbsolute(p.to_path_buf()));
        }
        let mut cur = PathBuf::from("/");
        for c in p.components() {
            match c {
                Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
                Component::ParentDir => {
                    cur.pop();
                    continue;
                }
                Component::Normal(n) => {
                    let next = cur.join(n);
                    let meta = fs::symlink_metadata(&next)
                        .map_err(|_| TreeError::Missing(next.clone()))?;
                    if meta.file_type().is_symlink() {
                        let target = fs::read_link(&next).map_err(io_err(&next))?;
                        // The host's link wins over anything added before (e.g. an applet).
                        self.insert(
                            &next,
                            Entry::Symlink {
                                target: target.clone(),
                            },
                        );
                        cur = self.resolve(&cur.join(target), depth + 1)?;
                    } else {
                        cur = next;
                    }
                }
            }
        }
        Ok(cur)
    }

    /// The real path of host directory `dir`, with the links on the way added to the tree.
    pub fn real_dir(&mut self, dir: &Path) -> Result<PathBuf, TreeError> {
        self.resolve(dir, 0)
    }

    /// Adds host path `p` (file or directory, recursively) at the same absolute path.
    /// Symbolic links on the way are reproduced. Inside directories, symbolic links are kept as
    /// they are; with `follow_links`, their targets are added too.
    pub fn add_host(&mut self, p: &Path, follow_links: bool) -> Result<(), TreeError> {
        let real = self.resolve(p, 0)?;
        self.add_real(&real, follow_links)
    }

    fn add_real(&mut self, real: &Path, follow_links: bool) -> Result<(), TreeError> {
        let meta =
            fs::symlink_metadata(real).map_err(|_| TreeError::Missing(real.to_path_buf()))?;
        let perm = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            self.insert(real, Entry::Dir { perm });
            let mut children: Vec<_> = fs::read_dir(real)
                .map_err(io_err(real))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect();
            children.sort();
            for child in children {
                let cm = fs::symlink_metadata(&child).map_err(io_err(&child))?;
                if cm.file_type().is_symlink() {
                    let target = fs::read_link(&child).map_err(io_err(&child))?;
                    self.insert(
                        &child,
                        Entry::Symlink {
                            target: target.clone(),
                        },
                    );
                    if follow_links {
                        let abs = real.join(&target);
                        if abs.exists() && !self.entries.contains_key(&normalize(&abs)) {
                            self.add_host(&abs, true)?;
                        }
                    }
                } else {
                    self.add_real(&child, follow_links)?;
                }
            }
        } else if ft.is_file() {
            self.insert(
                real,
                Entry::HostFile {
                    src: real.to_path_buf(),
                    perm,
                    size: meta.len(),
                    mtime_ns: i128::from(meta.mtime()) * 1_000_000_000
                        + i128::from(meta.mtime_nsec()),
                },
            );
        } else {
            eprintln!(
                "lab: skipping {} (not a file, directory or link)",
                real.display()
            );
        }
        Ok(())
    }

    /// Adds an executable and the shared libraries `ldd` lists for it (nothing more for a static
    /// one).
    pub fn add_program(&mut self, p: &Path) -> Result<(), TreeError> {
        self.add_host(p, false)?;
        for lib in shared_libraries(p)? {
            self.add_host(&lib, false)?;
        }
        Ok(())
    }

    /// A hash of everything that determines the archive's bytes (host files by path, size,
    /// modification time and mode).
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for (path, e) in &self.entries {
            h.update(path.as_os_str().as_encoded_bytes());
            h.update(b"\0");
            match e {
                Entry::Dir { perm } => h.update(format!("d{perm:o}")),
                Entry::Symlink { target } => {
                    h.update(b"l");
                    h.update(target.as_os_str().as_encoded_bytes());
                }
                Entry::HostFile {
                    src,
                    perm,
                    size,
                    mtime_ns,
                } => {
                    h.update(format!("f{perm:o} {size} {mtime_ns} "));
                    h.update(src.as_os_str().as_encoded_bytes());
                }
                Entry::Bytes { perm, data } => {
                    h.update(format!("b{perm:o} {} ", data.len()));
                    h.update(data);
                }
                Entry::CharDev { perm, major, minor } => {
                    h.update(format!("c{perm:o} {major}:{minor}"));
                }
            }
            h.update(b"\n");
        }
        hex::encode(&h.finalize()[..8])
    }

    /// Total size of the file contents.
    pub fn content_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match e {
                Entry::HostFile { size, .. } => *size,
                Entry::Bytes { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// Writes the tree as one cpio archive.
    pub fn write_cpio<W: std::io::Write>(&self, out: W) -> Result<W, TreeError> {
        let mut w = CpioWriter::new(std::io::BufWriter::with_capacity(1 << 20, out));
        for (path, e) in &self.entries {
            let name = path.to_string_lossy();
            let r = match e {
                Entry::Dir { perm } => w.dir(&name, *perm),
                Entry::Symlink { target } => w.symlink(&name, &target.to_string_lossy()),
                Entry::HostFile {
                    src,
                    perm,
                    mtime_ns,
                    ..
                } => w.file(
                    &name,
                    *perm,
                    src,
                    u64::try_from(mtime_ns / 1_000_000_000).unwrap_or(0),
                ),
                Entry::Bytes { perm, data } => w.bytes(&name, *perm, data),
                Entry::CharDev { perm, major, minor } => w.chardev(&name, *perm, *major, *minor),
            };
            r.map_err(|e| TreeError::Cpio(path.clone(), e))?;
        }
        // Padded to 512 bytes: several archives are concatenated into one initrd.
        w.finish(512)
            .and_then(|b| b.into_inner().map_err(|e| e.into_error()))
            .map_err(|e| TreeError::Cpio(PathBuf::from("TRAILER"), e))
    }
}

/// The shared libraries (including the dynamic loader) of a host executable, as `ldd` lists
/// them; empty for static executables.
pub fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>, TreeError> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .map_err(|e| TreeError::Ldd(exe.to_path_buf(), e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Static executables: "not a dynamic executable" (exit status 1).
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(TreeError::Ldd(exe.to_path_buf(), err.trim().to_string()));
    }
    Ok(parse_ldd(&text))
}

/// Paths in `ldd` output: `name => /path (addr)` and `/path (addr)` lines.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.split_once("=>").map_or(l, |(_, r)| r.trim());
            let path = rest.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n\tlibmissing.so => not found\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn parents_created_and_links_reproduced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        fs::create_dir_all(root.join("real/sub")).expect("mkdir");
        fs::write(root.join("real/sub/f"), b"x").expect("write");
        std::os::unix::fs::symlink("real", root.join("link")).expect("symlink");
        let mut t = Tree::new();
        t.add_host(&root.join("link/sub/f"), false).expect("add");
        assert_eq!(
            t.entries.get(&root.join("link")),
            Some(&Entry::Symlink {
                target: PathBuf::from("real")
            })
        );
        assert!(matches!(
            t.entries.get(&root.join("real/sub")),
            Some(Entry::Dir { .. })
        ));
        assert!(matches!(
            t.entries.get(&root.join("real/sub/f")),
            Some(Entry::HostFile { size: 1, .. })
        ));
        assert!(!t.entries.contains_key(Path::new("/")));
        let before = t.fingerprint();
        t.add_bytes("/init", 0o755, "#!/bin/sh\n");
        assert_ne!(before, t.fingerprint());
    }

    #[test]
    fn missing_path_reported() {
        let mut t = Tree::new();
        let err = t
            .add_host(Path::new("/nonexistent-lab-path/x"), false)
            .expect_err("missing");
        assert!(matches!(err, TreeError::Missing(_)));
    }

    #[test]
    fn static_and_dynamic_programs() {
        let libs = shared_libraries(Path::new("/bin/sh")).expect("ldd /bin/sh");
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc")),
            "{libs:?}"
        );
    }
}
