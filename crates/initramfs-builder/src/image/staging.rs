//! A [`Tree`] on disk and back: [`materialize`] writes it into an empty directory (owners,
//! modes, mtimes, hard links, devices), [`read_dir`] reads a directory into a new tree. Used to
//! run build-time commands inside an image's root ([`super::post_build`]).
//!
//! Needs root to keep owners and create device nodes.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use super::tree::{DevKind, Meta, Node, Tree, TreeError};

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("I/O error at {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("cannot create the special file {0}: {1}")]
    Special(PathBuf, nix::Error),
    #[error("{0} has a type an image cannot hold (socket?)")]
    Unsupported(PathBuf),
    #[error("reading the staged root back: {0}")]
    Tree(#[from] TreeError),
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> StagingError + '_ {
    move |e| StagingError::Io(p.to_path_buf(), e)
}

fn path_of(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(std::ffi::OsStr::from_bytes(rel))
}

/// Owner, then permissions (after `chown`, which clears set-id bits), then mtime; never follows a
/// symbolic link.
fn apply_meta(p: &Path, meta: &Meta, symlink: bool) -> Result<(), StagingError> {
    std::os::unix::fs::lchown(p, Some(meta.uid), Some(meta.gid)).map_err(io(p))?;
    if !symlink {
        fs::set_permissions(p, fs::Permissions::from_mode(meta.mode & 0o7777)).map_err(io(p))?;
    }
    let t = TimeSpec::new(i64::try_from(meta.mtime).unwrap_or(i64::MAX), 0);
    nix::sys::stat::utimensat(None, p, &t, &t, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| StagingError::Io(p.to_path_buf(), e.into()))
}

/// Writes `tree` below `root`, which must be an existing empty directory.
pub fn materialize(tree: &Tree, root: &Path) -> Result<(), StagingError> {
    let mut first_name: HashMap<u64, PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, Meta)> = Vec::new();
    tree.walk::<StagingError>(&mut |rel, node| {
        let p = path_of(root, rel);
        match node {
            Node::Dir { meta, .. } => {
                fs::create_dir(&p).map_err(io(&p))?;
                dirs.push((p, *meta));
            }
            Node::File(inode) => {
                if let Some(first) = first_name.get(&inode.id) {
                    fs::hard_link(first, &p).map_err(io(&p))?;
                } else {
                    fs::write(&p, &inode.data).map_err(io(&p))?;
                    apply_meta(&p, &inode.meta, false)?;
                    first_name.insert(inode.id, p);
                }
            }
            Node::Symlink { meta, target } => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &p)
                    .map_err(io(&p))?;
                apply_meta(&p, meta, true)?;
            }
            Node::Device {
                meta,
                kind,
                major,
                minor,
            } => {
                let ty = match kind {
                    DevKind::Char => SFlag::S_IFCHR,
                    DevKind::Block => SFlag::S_IFBLK,
                };
                let dev = nix::sys::stat::makedev(u64::from(*major), u64::from(*minor));
                nix::sys::stat::mknod(&p, ty, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| StagingError::Special(p.clone(), e))?;
                apply_meta(&p, meta, false)?;
            }
            Node::Fifo { meta } => {
                nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o600))
                    .map_err(|e| StagingError::Special(p.clone(), e))?;
                apply_meta(&p, meta, false)?;
            }
        }
        Ok(())
    })?;
    // Children change their directory's mtime: set directories last, deepest first.
    for (p, meta) in dirs.iter().rev() {
        apply_meta(p, meta, false)?;
    }
    if let Node::Dir { meta, .. } = &tree.root {
        apply_meta(root, meta, false)?;
    }
    Ok(())
}

fn meta_of(m: &fs::Metadata) -> Meta {
    Meta {
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: u64::try_from(m.mtime()).unwrap_or(0),
    }
}

/// Reads the directory `root` (not following symbolic links, not crossing into other
/// filesystems' mount points, which the caller must have removed) into a new tree.
pub fn read_dir(root: &Path) -> Result<Tree, StagingError> {
    let mut tree = Tree::new();
    let rm = fs::symlink_metadata(root).map_err(io(root))?;
    tree.insert(
        &[],
        Node::Dir {
            meta: meta_of(&rm),
            children: Default::default(),
        },
        "/",
    )?;
    let mut inodes: HashMap<(u64, u64), Arc<super::tree::Inode>> = HashMap::new();
    let mut stack: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
    while let Some(comps) = stack.pop() {
        let dir = path_of(root, &comps.join(&b'/'));
        let mut entries: Vec<fs::DirEntry> = fs::read_dir(&dir)
            .map_err(io(&dir))?
            .collect::<Result<_, _>>()
            .map_err(io(&dir))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let m = fs::symlink_metadata(&p).map_err(io(&p))?;
            let mut c = comps.clone();
            c.push(e.file_name().as_bytes().to_vec());
            let name = String::from_utf8_lossy(&c.join(&b'/')).into_owned();
            let meta = meta_of(&m);
            let ft = m.file_type();
            let node = if ft.is_dir() {
                stack.push(c.clone());
                tree.count(0, &name)?;
                Node::Dir {
                    meta,
                    children: Default::default(),
                }
            } else if ft.is_file() {
                let key = (m.dev(), m.ino());
                match inodes.get(&key) {
                    Some(inode) if m.nlink() > 1 => Node::File(Arc::clone(inode)),
                    _ => {
                        let data = fs::read(&p).map_err(io(&p))?;
                        let node = tree.file_node(meta, data, &name)?;
                        if let Node::File(inode) = &node {
                            inodes.insert(key, Arc::clone(inode));
                        }
                        node
                    }
                }
            } else if ft.is_symlink() {
                tree.count(0, &name)?;
                let target = fs::read_link(&p).map_err(io(&p))?;
                Node::Symlink {
                    meta,
                    target: target.as_os_str().as_bytes().to_vec(),
                }
            } else if ft.is_char_device() || ft.is_block_device() {
                tree.count(0, &name)?;
                let rdev = m.rdev();
                Node::Device {
                    meta,
                    kind: if ft.is_char_device() {
                        DevKind::Char
                    } else {
                        DevKind::Block
                    },
                    major: u32::try_from(nix::sys::stat::major(rdev)).unwrap_or(u32::MAX),
                    minor: u32::try_from(nix::sys::stat::minor(rdev)).unwrap_or(u32::MAX),
                }
            } else if ft.is_fifo() {
                tree.count(0, &name)?;
                Node::Fifo { meta }
            } else {
                return Err(StagingError::Unsupported(p));
            };
            tree.insert(&c, node, &name)?;
        }
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::cpio;

    fn archive(t: &Tree) -> Vec<cpio::Entry> {
        let mut buf = Vec::new();
        cpio::write_tree(t, &mut buf).expect("write");
        cpio::parse(&buf).expect("parse")
    }

    #[test]
    fn round_trip_keeps_everything() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: needs root (owners, device nodes)");
            return;
        }
        let layer = crate::image::tree::tests::layer(&[
            ("usr/", 'd', ""),
            ("usr/bin/", 'd', ""),
            ("usr/bin/a", 'f', "data"),
            ("usr/bin/b", 'h', "usr/bin/a"),
            ("usr/bin/s", 'l', "a"),
            ("etc/", 'd', ""),
            ("etc/x", 'f', "xx"),
        ]);
        let mut t = Tree::new();
        t.apply_tar(&layer[..], Default::default()).expect("layer");
        t.insert(
            &[b"dev".to_vec(), b"null".to_vec()],
            Node::Device {
                meta: Meta::root(0o666),
                kind: DevKind::Char,
                major: 1,
                minor: 3,
            },
            "dev/null",
        )
        .expect("dev");
        t.insert(
            &[b"fifo".to_vec()],
            Node::Fifo {
                meta: Meta {
                    mode: 0o4640,
                    uid: 3,
                    gid: 4,
                    mtime: 12345,
                },
            },
            "fifo",
        )
        .expect("fifo");
        let dir = tempfile::tempdir().expect("tmp");
        materialize(&t, dir.path()).expect("materialize");
        let back = read_dir(dir.path()).expect("read back");
        let (a, b) = (archive(&t), archive(&back));
        let key = |e: &cpio::Entry| {
            (
                e.name.clone(),
                e.mode,
                e.uid,
                e.gid,
                e.mtime,
                e.data.clone(),
                e.rdev,
                e.nlink,
            )
        };
        assert_eq!(
            a.iter().map(key).collect::<Vec<_>>(),
            b.iter().map(key).collect::<Vec<_>>()
        );
        assert_eq!(
            fs::symlink_metadata(dir.path().join("usr/bin/b"))
                .expect("b")
                .nlink(),
            2
        );
    }
}
