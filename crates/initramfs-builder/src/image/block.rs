//! Block-device language roots (`cloude-image build LANG --format block`): the language's root
//! as a read-only EROFS image that every VM of the language opens read-only through virtio-blk
//! (one copy in the host's page cache), plus a tiny initramfs that holds only the agent. The
//! agent mounts the image read-only under a tmpfs overlay and continues from there
//! (`crates/agent/src/init.rs`, [`ROOT_PARAM`]).
//!
//! Why EROFS, uncompressed: measured side by side on the same kernel under QEMU TCG (README,
//! "Block roots vs initramfs"), the cpp root mounted by a busybox init that compiles and runs
//! hello.cpp twice: EROFS uncompressed (144 MiB file) took 1.9–2.6 s for the first compile and
//! left 35.9 MB in the guest's page cache; EROFS lz4hc (74 MiB) 2.7 s and 37.6 MB; SquashFS lz4
//! (71 MiB) 2.8–3.0 s and 41.7 MB; SquashFS zstd (44 MiB) 4.0–4.1 s and 41.7 MB. A compressed
//! root costs guest CPU on every cold read and a bigger guest page cache (decompression buffers);
//! the file is shared by every VM of the language, so disk is the cheap side. The default is
//! therefore [`RootCompression::None`]; `--root-compression lz4hc` halves the file where disk
//! matters more.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::tree::Tree;
use super::{
    cache_key, copy_atomic, file_name_safe, finalize, finalize_root, io_err, prepare,
    record_latest_pair, write_image, write_summary, BuildOptions, Compression, ImageError,
};
use crate::catalog::Language;
use crate::progress::Progress;

/// Kernel command-line parameter naming the root device (`cloude.root=/dev/vda`); the agent
/// reads it from `/proc/cmdline` (a dotted parameter is not passed to init).
pub const ROOT_PARAM: &str = "cloude.root";
/// Kernel command-line parameter naming the root's filesystem (`cloude.rootfstype=erofs`).
pub const ROOT_FSTYPE_PARAM: &str = "cloude.rootfstype";
/// The filesystem of block roots.
pub const ROOT_FSTYPE: &str = "erofs";
/// File name extension of block roots.
pub const ROOT_EXTENSION: &str = "erofs";
/// The Debian package with `mkfs.erofs`.
pub const EROFS_PACKAGE: &str = "erofs-utils";

/// How the EROFS root's file data is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RootCompression {
    /// Plain blocks (the default, see the module docs).
    #[default]
    None,
    /// LZ4 (high compression) clusters, decompressed by the guest.
    Lz4hc,
}

impl RootCompression {
    pub fn name(self) -> &'static str {
        match self {
            RootCompression::None => "none",
            RootCompression::Lz4hc => "lz4hc",
        }
    }
}

impl std::str::FromStr for RootCompression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(RootCompression::None),
            "lz4hc" => Ok(RootCompression::Lz4hc),
            other => Err(format!(
                "unknown root compression {other:?} (none or lz4hc)"
            )),
        }
    }
}

/// A built block image: the read-only root and the agent's boot initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockImage {
    pub root: PathBuf,
    pub boot: PathBuf,
}

/// Builds the block image of `lang` (or reuses the cached one).
pub fn ensure_block_image(
    lang: &Language,
    opts: &BuildOptions,
    root_compression: RootCompression,
    progress: &Progress,
) -> Result<BlockImage, ImageError> {
    let prep = prepare(lang, opts, progress)?;
    let dir = crate::paths::images_dir();
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let boot = ensure_boot_initramfs(&dir, &prep.agent, &prep.agent_sha, progress)?;

    // The root does not hold the agent: its key is the source and the format alone, so a new
    // agent only rebuilds the small boot initramfs.
    let source = format!(
        "{}format block {ROOT_FSTYPE} {}\n",
        prep.source,
        root_compression.name()
    );
    let key = cache_key(&source, prep.post_build, "-", Compression::None);
    let stem = format!("{}-{}", file_name_safe(&lang.name), &key[..16]);
    let out = dir.join(format!("{stem}.{ROOT_EXTENSION}"));
    if !out.is_file() {
        let lock_path = dir.join(format!(".{stem}.lock"));
        let _lock = crate::lock::FileLock::acquire(&lock_path).map_err(io_err(&lock_path))?;
        if !out.is_file() {
            let started = Instant::now();
            let mut tree = prep.tree(opts, progress)?;
            finalize_root(&mut tree).map_err(ImageError::Finalize)?;
            let (entries, bytes) = count(&tree);
            let size = write_erofs(&tree, root_compression, &out, progress)?;
            let summary = super::Summary {
                entries,
                uncompressed_bytes: bytes,
                compressed_bytes: size,
                build_seconds: started.elapsed().as_secs_f64(),
                ..prep.summary("block", root_compression.name())
            };
            write_summary(&dir, &stem, &summary)?;
        }
    }
    if let Some(o) = &opts.output {
        copy_atomic(&out, o)?;
    }
    let image = BlockImage { root: out, boot };
    record_latest_pair(&dir, &lang.name, &image)?;
    Ok(image)
}

/// Entries and file bytes of a tree (hard-linked data once).
fn count(tree: &Tree) -> (u64, u64) {
    let (mut entries, mut bytes) = (0u64, 0u64);
    let mut seen = std::collections::HashSet::new();
    let _ = tree.walk::<std::convert::Infallible>(&mut |_, node| {
        entries += 1;
        if let super::tree::Node::File(inode) = node {
            if seen.insert(inode.id) {
                bytes += inode.data.len() as u64;
            }
        }
        Ok(())
    });
    (entries, bytes)
}

/// The initramfs of block images: the agent as `/init` and the directories and device nodes it
/// needs before it mounts the root. One per agent, shared by every language.
fn ensure_boot_initramfs(
    dir: &Path,
    agent: &[u8],
    agent_sha: &str,
    progress: &Progress,
) -> Result<PathBuf, ImageError> {
    let compression = Compression::DEFAULT;
    let key = cache_key("boot\n", &[], agent_sha, compression);
    let stem = format!("boot-{}", &key[..16]);
    let out = dir.join(format!("{stem}.cpio{}", compression.extension()));
    if out.is_file() {
        return Ok(out);
    }
    let lock_path = dir.join(format!(".{stem}.lock"));
    let _lock = crate::lock::FileLock::acquire(&lock_path).map_err(io_err(&lock_path))?;
    if !out.is_file() {
        let bar = progress.spinner(format!("writing {}", out.display()));
        let mut tree = Tree::new();
        finalize(&mut tree, agent.to_vec()).map_err(ImageError::Finalize)?;
        let (_, size) = write_image(&tree, compression, &out)?;
        bar.finish_with_message(format!("wrote {} ({size} bytes)", out.display()));
    }
    Ok(out)
}

/// `mkfs.erofs` on `tree` staged on disk; publishes `out` (sealed) by rename. Returns its size.
fn write_erofs(
    tree: &Tree,
    compression: RootCompression,
    out: &Path,
    progress: &Progress,
) -> Result<u64, ImageError> {
    let mkfs = ensure_mkfs(progress)?;
    let dir = out.parent().unwrap_or(Path::new("."));
    let build = crate::paths::build_dir();
    fs::create_dir_all(&build).map_err(io_err(&build))?;
    let staging = tempfile::Builder::new()
        .prefix("root-")
        .tempdir_in(&build)
        .map_err(io_err(&build))?;
    let root = staging.path().join("root");
    fs::create_dir(&root).map_err(io_err(&root))?;
    let bar = progress.spinner(format!("staging the root in {}", root.display()));
    super::staging::materialize(tree, &root)
        .map_err(|e| ImageError::Io(root.clone(), std::io::Error::other(e.to_string())))?;
    bar.finish_with_message("staged the root".to_string());

    let tmp = tempfile::Builder::new()
        .prefix(".erofs-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    let bar = progress.spinner(format!(
        "writing {} (EROFS, {})",
        out.display(),
        compression.name()
    ));
    let mut cmd = Command::new(&mkfs);
    // No xattrs (the guest kernel has none for EROFS); owners, modes and mtimes as staged.
    cmd.args(["--quiet", "-x", "-1"]);
    if compression == RootCompression::Lz4hc {
        cmd.arg("-zlz4hc");
    }
    let status = cmd
        .arg(tmp.path())
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| ImageError::Io(mkfs.clone(), e))?;
    if !status.status.success() {
        return Err(ImageError::Mkfs(
            status.status.to_string(),
            String::from_utf8_lossy(&status.stderr).trim().to_string(),
        ));
    }
    drop(staging);
    let f = tmp.as_file();
    f.sync_all().map_err(io_err(out))?;
    let size = f.metadata().map_err(io_err(out))?.len();
    let mut perm = f.metadata().map_err(io_err(out))?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o444);
    fs::set_permissions(tmp.path(), perm).map_err(io_err(out))?;
    crate::integrity::seal_as(tmp.path(), out)
        .map_err(|e| ImageError::Io(out.to_path_buf(), std::io::Error::other(e.to_string())))?;
    tmp.persist(out)
        .map_err(|e| ImageError::Io(out.to_path_buf(), e.error))?;
    bar.finish_with_message(format!("wrote {} ({size} bytes)", out.display()));
    Ok(size)
}

/// `mkfs.erofs`, installed with apt when missing (root only).
fn ensure_mkfs(progress: &Progress) -> Result<PathBuf, ImageError> {
    let find = || {
        [
            "/usr/bin/mkfs.erofs",
            "/usr/sbin/mkfs.erofs",
            "/sbin/mkfs.erofs",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    crate::kernel::apt_install(&[EROFS_PACKAGE], progress)
        .map_err(|e| ImageError::Mkfs("not installed".into(), e.to_string()))?;
    find().ok_or_else(|| {
        ImageError::Mkfs(
            "not installed".into(),
            format!("{EROFS_PACKAGE} is installed but mkfs.erofs is not on the usual paths"),
        )
    })
}
