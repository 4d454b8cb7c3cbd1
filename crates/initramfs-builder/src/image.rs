//! Language images: a root filesystem (Debian packages or an OCI image) plus the agent as
//! `/init`, written as a compressed cpio newc archive and cached by content hash under
//! [`crate::paths::images_dir`].
//!
//! The cache key hashes everything the image is made of: the source (the resolved Debian package
//! closure with versions, or the platform manifest's digest), the catalogue's `post_build`
//! commands (run for Debian images, see [`post_build`]), the agent binary, the compression and
//! [`BUILDER_VERSION`]. Builders of one key are serialised by a lock file; results are
//! published by rename.

pub mod alternatives;
pub mod block;
pub mod compress;
pub mod cpio;
pub mod debian;
pub mod oci;
pub mod post_build;
pub mod staging;
pub mod tree;

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

pub use compress::Compression;
use tree::{DevKind, Meta, Node, Tree, TreeError};

use crate::catalog::Language;
use crate::progress::Progress;

/// Bumped whenever the builder's output for the same inputs changes (trimming, layout, ...).
pub const BUILDER_VERSION: &str = "cloude-image-builder-5";
/// Environment variable overriding the default compression (`gzip`, `lz4`, `zstd`, `none`).
pub const COMPRESSION_ENV: &str = "CLOUDE_IMAGE_COMPRESSION";

/// How a language's root reaches the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One compressed cpio archive, unpacked into guest RAM at every boot.
    #[default]
    Initramfs,
    /// A read-only EROFS image on virtio-blk under a tmpfs overlay, and a boot initramfs with
    /// only the agent ([`block`]).
    Block,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Initramfs => "initramfs",
            Format::Block => "block",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "initramfs" => Ok(Format::Initramfs),
            "block" => Ok(Format::Block),
            other => Err(format!(
                "unknown image format {other:?} (initramfs or block)"
            )),
        }
    }
}

/// How to build an image.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Build from this OCI reference instead of the catalogue's source.
    pub from: Option<String>,
    /// Allow plain HTTP registries (loopback tests).
    pub insecure: bool,
    /// Also copy the result to this path.
    pub output: Option<PathBuf>,
    /// The agent binary to inject (default: [`crate::paths::agent_binary`]).
    pub agent: Option<PathBuf>,
    /// Caps on an OCI image's contents; they can be lowered, never raised above
    /// [`tree::Limits::default`].
    pub limits: tree::Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the agent binary cloude-agent was not found (build it with `cargo build -p cloude-agent`, or set CLOUDE_AGENT_BIN)")]
    AgentMissing,
    #[error("cannot read the agent binary {0}: {1}")]
    AgentRead(PathBuf, std::io::Error),
    #[error("language {0:?} has neither Debian packages nor an image reference")]
    NoSource(String),
    #[error("invalid {COMPRESSION_ENV}: {0}")]
    BadCompression(String),
    #[error("building the {language} image from Debian packages: {source}")]
    Debian {
        language: String,
        #[source]
        source: Box<debian::DebianError>,
    },
    #[error("building the {language} image from {reference}: {source}")]
    Oci {
        language: String,
        reference: String,
        #[source]
        source: Box<oci::OciError>,
    },
    #[error("running the {language} image's post-build commands: {source}")]
    PostBuild {
        language: String,
        #[source]
        source: Box<post_build::PostBuildError>,
    },
    #[error("preparing the image root: {0}")]
    Finalize(#[source] TreeError),
    #[error("mkfs.erofs failed ({0}): {1}")]
    Mkfs(String, String),
    #[error("I/O error at {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |e| ImageError::Io(p.to_path_buf(), e)
}

/// The compression used when none is asked for: `$CLOUDE_IMAGE_COMPRESSION` or
/// [`Compression::DEFAULT`].
pub fn default_compression() -> Result<Compression, ImageError> {
    match std::env::var(COMPRESSION_ENV) {
        Ok(v) if !v.is_empty() => v.parse().map_err(ImageError::BadCompression),
        _ => Ok(Compression::DEFAULT),
    }
}

/// Builds the image for `lang` (or reuses the cached one) and returns its path.
pub fn ensure_image(
    lang: &Language,
    opts: &BuildOptions,
    progress: &Progress,
) -> Result<PathBuf, ImageError> {
    ensure_image_with(lang, opts, default_compression()?, progress)
}

enum Plan {
    Debian(Vec<debian::Package>),
    Oci(String, Box<oci::Resolved>),
}

/// A summary written next to each image (`<image>.json`).
#[derive(serde::Serialize)]
struct Summary<'a> {
    language: &'a str,
    /// The language's version as installed in this image (Debian: from the closure).
    version: Option<String>,
    format: &'static str,
    source: String,
    packages: Vec<String>,
    manifest_digest: Option<&'a str>,
    post_build: &'a [Vec<String>],
    compression: &'static str,
    agent_sha256: &'a str,
    entries: u64,
    uncompressed_bytes: u64,
    compressed_bytes: u64,
    build_seconds: f64,
}

fn file_name_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What an image is made of, resolved before anything is built: the agent, the source and the
/// build-time commands.
struct Prepared<'a> {
    lang: &'a Language,
    agent: Vec<u8>,
    agent_sha: String,
    reference: Option<String>,
    plan: Plan,
    post_build: &'a [Vec<String>],
    /// One line per package with its version, or the manifest digest (the cache key's source).
    source: String,
}

fn prepare<'a>(
    lang: &'a Language,
    opts: &BuildOptions,
    progress: &Progress,
) -> Result<Prepared<'a>, ImageError> {
    let agent_path = opts
        .agent
        .clone()
        .or_else(crate::paths::agent_binary)
        .ok_or(ImageError::AgentMissing)?;
    let agent = fs::read(&agent_path).map_err(|e| ImageError::AgentRead(agent_path.clone(), e))?;
    let agent_sha = hex::encode(Sha256::digest(&agent));
    // Debug info is of no use in the guest and would slow every boot (unpacking is per byte).
    let agent = stripped(&agent_path).unwrap_or(agent);

    let reference = opts.from.clone().or_else(|| lang.image.clone());
    let plan = match &reference {
        Some(r) => {
            let parsed = oci::parse_reference(r).map_err(oci_err(lang, r))?;
            let resolved =
                oci::resolve(&parsed, opts.insecure, progress).map_err(oci_err(lang, r))?;
            Plan::Oci(r.clone(), Box::new(resolved))
        }
        None if lang.debian_packages.is_empty() => {
            return Err(ImageError::NoSource(lang.name.clone()))
        }
        None => Plan::Debian(
            debian::resolve(&lang.all_debian_packages(), progress).map_err(debian_err(lang))?,
        ),
    };

    // Image programs run on the build host only for apt-verified Debian packages; OCI image
    // contents stay data.
    let post_build: &[Vec<String>] = match &plan {
        Plan::Debian(_) => &lang.post_build,
        Plan::Oci(..) => {
            if !lang.post_build.is_empty() {
                tracing::warn!(
                    language = %lang.name,
                    "post_build commands are not run for OCI images (their programs are not trusted on the build host)"
                );
            }
            &[]
        }
    };
    let source = match &plan {
        Plan::Debian(pkgs) => pkgs
            .iter()
            .map(|p| format!("deb {} {}\n", p.name, p.version))
            .collect(),
        Plan::Oci(_, r) => format!("oci {}\n", r.manifest_digest),
    };
    Ok(Prepared {
        lang,
        agent,
        agent_sha,
        reference,
        plan,
        post_build,
        source,
    })
}

fn debian_err(lang: &Language) -> impl Fn(debian::DebianError) -> ImageError + '_ {
    move |source| ImageError::Debian {
        language: lang.name.clone(),
        source: Box::new(source),
    }
}

fn oci_err<'a>(lang: &'a Language, r: &str) -> impl Fn(oci::OciError) -> ImageError + 'a {
    let r = r.to_string();
    move |source| ImageError::Oci {
        language: lang.name.clone(),
        reference: r.clone(),
        source: Box::new(source),
    }
}

impl Prepared<'_> {
    /// The language's root: packages or layers, then the post-build commands.
    fn tree(&self, opts: &BuildOptions, progress: &Progress) -> Result<Tree, ImageError> {
        let tree = match &self.plan {
            Plan::Debian(pkgs) => {
                debian::build_tree(pkgs, progress).map_err(debian_err(self.lang))?
            }
            Plan::Oci(r, resolved) => resolved
                .build_tree(opts.limits, progress)
                .map_err(oci_err(self.lang, r))?,
        };
        post_build::run(tree, self.post_build, progress).map_err(|e| ImageError::PostBuild {
            language: self.lang.name.clone(),
            source: Box::new(e),
        })
    }

    /// The version of the language's version package in the closure (see [`crate::versions`]).
    fn version(&self) -> Option<String> {
        match &self.plan {
            Plan::Debian(pkgs) => {
                let want = self.lang.version_package()?;
                let p = pkgs.iter().find(|p| p.name == want)?;
                Some(crate::versions::upstream_version(
                    &p.version,
                    self.lang.version_parts,
                ))
            }
            Plan::Oci(..) => Some(self.lang.version.clone()),
        }
    }

    fn summary(&self, format: &'static str, compression: &'static str) -> Summary<'_> {
        Summary {
            language: &self.lang.name,
            version: self.version(),
            format,
            source: self.reference.clone().unwrap_or_else(|| "debian".into()),
            packages: match &self.plan {
                Plan::Debian(p) => p
                    .iter()
                    .map(|p| format!("{}={}", p.name, p.version))
                    .collect(),
                Plan::Oci(..) => Vec::new(),
            },
            manifest_digest: match &self.plan {
                Plan::Oci(_, r) => Some(&r.manifest_digest),
                Plan::Debian(_) => None,
            },
            post_build: self.post_build,
            compression,
            agent_sha256: &self.agent_sha,
            entries: 0,
            uncompressed_bytes: 0,
            compressed_bytes: 0,
            build_seconds: 0.0,
        }
    }
}

fn write_summary(dir: &Path, stem: &str, summary: &Summary<'_>) -> Result<(), ImageError> {
    let sp = dir.join(format!("{stem}.json"));
    let text = serde_json::to_string_pretty(summary).expect("the summary serialises");
    fs::write(&sp, text).map_err(io_err(&sp))
}

/// [`ensure_image`] with an explicit compression.
pub fn ensure_image_with(
    lang: &Language,
    opts: &BuildOptions,
    compression: Compression,
    progress: &Progress,
) -> Result<PathBuf, ImageError> {
    let prep = prepare(lang, opts, progress)?;
    let key = cache_key(&prep.source, prep.post_build, &prep.agent_sha, compression);
    let dir = crate::paths::images_dir();
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let stem = format!("{}-{}", file_name_safe(&lang.name), &key[..16]);
    let out = dir.join(format!("{stem}.cpio{}", compression.extension()));

    if !out.is_file() {
        let lock_path = dir.join(format!(".{stem}.lock"));
        let _lock = crate::lock::FileLock::acquire(&lock_path).map_err(io_err(&lock_path))?;
        if !out.is_file() {
            let started = Instant::now();
            let mut tree = prep.tree(opts, progress)?;
            finalize(&mut tree, prep.agent.clone()).map_err(ImageError::Finalize)?;
            let bar = progress.spinner(format!(
                "writing {} ({})",
                out.display(),
                compression.name()
            ));
            let (stats, size) = write_image(&tree, compression, &out)?;
            bar.finish_with_message(format!("wrote {} ({} bytes)", out.display(), size));
            let summary = Summary {
                entries: stats.entries,
                uncompressed_bytes: stats.bytes,
                compressed_bytes: size,
                build_seconds: started.elapsed().as_secs_f64(),
                ..prep.summary("initramfs", compression.name())
            };
            write_summary(&dir, &stem, &summary)?;
            if let Err(e) = check_fits(&lang.name, size, stats.bytes, lang.memory_mib) {
                // Built all the same (a server may give the language more memory); a server
                // refuses to boot it as it is.
                tracing::warn!("{e}");
            }
        }
    }
    if let Some(o) = &opts.output {
        copy_atomic(&out, o)?;
    }
    record_latest(&dir, &lang.name, &out)?;
    Ok(out)
}

fn latest_pointer(dir: &Path, language: &str) -> PathBuf {
    dir.join(format!(".{}.latest", file_name_safe(language)))
}

/// Remembers `image` as the newest image of `language` (for [`cached_image`]).
fn record_latest(dir: &Path, language: &str, image: &Path) -> Result<(), ImageError> {
    let Some(name) = image.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    let ptr = latest_pointer(dir, language);
    let tmp = ptr.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, name).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &ptr).map_err(io_err(&ptr))
}

fn latest_block_pointer(dir: &Path, language: &str) -> PathBuf {
    dir.join(format!(".{}.block.latest", file_name_safe(language)))
}

/// Remembers `image` as the newest block image of `language` (for [`cached_block_image`]): the
/// root's file name, then the boot initramfs's.
fn record_latest_pair(
    dir: &Path,
    language: &str,
    image: &block::BlockImage,
) -> Result<(), ImageError> {
    let name = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .unwrap_or_default()
    };
    let ptr = latest_block_pointer(dir, language);
    let tmp = ptr.with_extension(format!("tmp{}", std::process::id()));
    let text = format!("{}\n{}\n", name(&image.root), name(&image.boot));
    fs::write(&tmp, text).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &ptr).map_err(io_err(&ptr))
}

/// A plain file name in the cache directory, existing.
fn cached_file(dir: &Path, name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    let p = dir.join(name);
    p.is_file().then_some(p)
}

/// The newest block image built for `language`, without resolving its sources.
pub fn cached_block_image(language: &str) -> Option<block::BlockImage> {
    let dir = crate::paths::images_dir();
    let text = fs::read_to_string(latest_block_pointer(&dir, language)).ok()?;
    let mut lines = text.lines();
    let root = cached_file(&dir, lines.next()?.trim())?;
    let boot = cached_file(&dir, lines.next()?.trim())?;
    Some(block::BlockImage { root, boot })
}

/// Memory a guest needs besides its initramfs while it boots (kernel, page tables, the agent,
/// the program's first pages), MiB: measured boots of the smallest image need ~60.
pub const BOOT_HEADROOM_MIB: u64 = 96;

/// Refuses an initramfs that cannot fit `memory_mib` while the kernel unpacks it (the compressed
/// archive and the unpacked files are both in guest RAM until unpacking ends).
pub fn check_fits(
    language: &str,
    compressed: u64,
    unpacked: u64,
    memory_mib: u64,
) -> Result<(), String> {
    let need = (compressed + unpacked).div_ceil(1 << 20) + BOOT_HEADROOM_MIB;
    if need > memory_mib {
        return Err(format!(
            "the {language} initramfs ({} MiB compressed, {} MiB unpacked) cannot fit its VM's \
             {memory_mib} MiB of memory while it boots (~{need} MiB needed); use \
             [images] format = \"block\" (or \"auto\"), or raise the language's memory_mib",
            compressed >> 20,
            unpacked >> 20
        ));
    }
    Ok(())
}

/// The unpacked size of a cached initramfs, from the summary written beside it
/// (`<stem>.json` next to `<stem>.cpio<ext>`); `None` when there is none.
pub fn unpacked_bytes(image: &Path) -> Option<u64> {
    let name = image.file_name()?.to_str()?;
    let stem = &name[..name.find(".cpio")?];
    let text = fs::read_to_string(image.with_file_name(format!("{stem}.json"))).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("uncompressed_bytes")?.as_u64()
}

/// The newest image built for `language`, without resolving its sources (no network, no apt):
/// what a server that must not build serves.
pub fn cached_image(language: &str) -> Option<PathBuf> {
    let dir = crate::paths::images_dir();
    let name = fs::read_to_string(latest_pointer(&dir, language)).ok()?;
    cached_file(&dir, name.trim())
}

/// The hex cache key of an image: [`BUILDER_VERSION`], the resolved source's description, the
/// post-build commands, the agent's digest and the compression.
pub fn cache_key(
    source: &str,
    post_build: &[Vec<String>],
    agent_sha: &str,
    compression: Compression,
) -> String {
    let mut h = Sha256::new();
    h.update(BUILDER_VERSION);
    h.update([0]);
    h.update(source);
    if !post_build.is_empty() {
        let json = serde_json::to_string(post_build).expect("argv lists serialise");
        h.update(format!("post_build {json}\n"));
    }
    h.update(format!(
        "agent {agent_sha}\ncompression {}\n",
        compression.name()
    ));
    hex::encode(h.finalize())
}

/// `strip --strip-all` of `path` when the tool is available (else `None`: the binary is used as is).
fn stripped(path: &Path) -> Option<Vec<u8>> {
    let tmp = tempfile::NamedTempFile::new().ok()?;
    let st = std::process::Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(tmp.path())
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    if !st.success() {
        tracing::warn!(agent = %path.display(), "strip failed; injecting the agent unstripped");
        return None;
    }
    fs::read(tmp.path()).ok().filter(|d| !d.is_empty())
}

/// Strips the image's device nodes and set-id bits ([`Tree::sanitize`], with a warning saying
/// how many), then adds the agent as `/init` and the directories and device nodes the guest
/// needs at boot.
pub fn finalize(tree: &mut Tree, agent: Vec<u8>) -> Result<(), TreeError> {
    finalize_root(tree)?;
    tree.insert_file("init", Meta::root(0o755), agent)?;
    Ok(())
}

/// [`finalize`] without the agent: what a block root holds (its agent lives in the boot
/// initramfs).
pub fn finalize_root(tree: &mut Tree) -> Result<(), TreeError> {
    let s = tree.sanitize();
    if s.devices > 0 {
        tracing::warn!(
            removed = s.devices,
            examples = %s.device_examples.join(", "),
            "removed the image's device nodes (an image may not give user code a device)"
        );
    }
    if s.setid > 0 {
        tracing::warn!(
            cleared = s.setid,
            examples = %s.setid_examples.join(", "),
            "cleared setuid/setgid bits of image files (user code may not gain privileges through an image file)"
        );
    }
    let dir = |tree: &mut Tree, path: &str, mode: u32| -> Result<(), TreeError> {
        if tree.lookup(path).is_none() {
            let comps = tree::components(path.as_bytes())?;
            tree.insert(
                &comps,
                Node::Dir {
                    meta: Meta::root(mode),
                    children: Default::default(),
                },
                path,
            )?;
        }
        Ok(())
    };
    for (p, m) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("run", 0o755),
        ("root", 0o700),
        ("etc", 0o755),
    ] {
        dir(tree, p, m)?;
    }
    // The kernel opens /dev/console for init's standard streams before anything is mounted.
    for (p, mode, major, minor) in [("dev/console", 0o600, 5, 1), ("dev/null", 0o666, 1, 3)] {
        if tree.lookup(p).is_none() {
            let comps = tree::components(p.as_bytes())?;
            let meta = Meta::root(mode);
            tree.insert(
                &comps,
                Node::Device {
                    meta,
                    kind: DevKind::Char,
                    major,
                    minor,
                },
                p,
            )?;
        }
    }
    for (p, text) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ] {
        if tree.lookup(p).is_none() {
            tree.insert_file(p, Meta::root(0o644), text.as_bytes().to_vec())?;
        }
    }
    Ok(())
}

/// Writes the compressed cpio beside `out` and renames it into place. Returns the cpio stats and
/// the compressed size.
fn write_image(
    tree: &Tree,
    compression: Compression,
    out: &Path,
) -> Result<(cpio::Stats, u64), ImageError> {
    let dir = out.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    let stats = {
        let buffered = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        let mut w = compression.writer(buffered).map_err(io_err(out))?;
        let stats = cpio::write_tree(tree, &mut w).map_err(io_err(out))?;
        w.finish().map_err(io_err(out))?;
        stats
    };
    tmp.as_file().sync_all().map_err(io_err(out))?;
    let size = tmp.as_file().metadata().map_err(io_err(out))?.len();
    let mut perm = tmp.as_file().metadata().map_err(io_err(out))?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    fs::set_permissions(tmp.path(), perm).map_err(io_err(out))?;
    // The digest first: a published image always has one (the server checks it before use).
    crate::integrity::seal_as(tmp.path(), out)
        .map_err(|e| ImageError::Io(out.to_path_buf(), std::io::Error::other(e.to_string())))?;
    tmp.persist(out)
        .map_err(|e| ImageError::Io(out.to_path_buf(), e.error))?;
    Ok((stats, size))
}

fn copy_atomic(from: &Path, to: &Path) -> Result<(), ImageError> {
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    let mut src = fs::File::open(from).map_err(io_err(from))?;
    std::io::copy(&mut src, tmp.as_file_mut()).map_err(io_err(to))?;
    tmp.as_file_mut().flush().map_err(io_err(to))?;
    let mut perm = tmp.as_file().metadata().map_err(io_err(to))?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    fs::set_permissions(tmp.path(), perm).map_err(io_err(to))?;
    tmp.persist(to)
        .map_err(|e| ImageError::Io(to.to_path_buf(), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finalize_adds_init_and_boot_essentials_but_keeps_files() {
        let mut t = Tree::new();
        t.insert_file("etc/passwd", Meta::root(0o644), b"mine".to_vec())
            .expect("passwd");
        t.insert_file("init", Meta::root(0o644), b"old init".to_vec())
            .expect("init");
        finalize(&mut t, b"AGENT".to_vec()).expect("finalize");
        let mut buf = Vec::new();
        cpio::write_tree(&t, &mut buf).expect("write");
        let e = cpio::parse(&buf).expect("parse");
        let get = |n: &str| {
            e.iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(get("init").data, b"AGENT");
        assert_eq!(get("init").mode & 0o7777, 0o755);
        assert_eq!(get("etc/passwd").data, b"mine");
        assert!(get("dev").is_dir());
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("tmp").mode & 0o7777, 0o1777);
        assert!(e.iter().any(|e| e.name == "etc/group"));
    }

    #[test]
    fn cache_key_covers_post_build_commands() {
        let c = Compression::DEFAULT;
        let argv = |a: &[&str]| vec![a.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
        let none = cache_key("deb x 1\n", &[], "aa", c);
        let one = cache_key(
            "deb x 1\n",
            &argv(&["python3", "-m", "compileall"]),
            "aa",
            c,
        );
        let other = cache_key(
            "deb x 1\n",
            &argv(&["python3", "-m", "compileall", "-q"]),
            "aa",
            c,
        );
        // Argument boundaries count: ["a b"] is not ["a", "b"].
        let joined = cache_key("deb x 1\n", &argv(&["python3 -m", "compileall"]), "aa", c);
        assert_eq!(none, cache_key("deb x 1\n", &[], "aa", c));
        assert_ne!(none, one);
        assert_ne!(one, other);
        assert_ne!(one, joined);
        assert_ne!(none, cache_key("deb x 2\n", &[], "aa", c));
        assert_ne!(none, cache_key("deb x 1\n", &[], "ab", c));
    }

    #[test]
    fn an_initramfs_that_cannot_fit_its_vm_is_refused_naming_sizes() {
        // The rust image seen in the field: 257 MB compressed in a 768 MiB VM.
        let e =
            check_fits("rust", 257 << 20, 900 << 20, 768).expect_err("the rust image does not fit");
        assert!(e.contains("257 MiB compressed"), "{e}");
        assert!(e.contains("900 MiB unpacked"), "{e}");
        assert!(e.contains("768 MiB"), "{e}");
        assert!(e.contains("block"), "{e}");
        // Python: 30 MB compressed, 120 MB unpacked, 256 MiB VM.
        assert!(check_fits("python", 30 << 20, 120 << 20, 256).is_ok());
    }

    #[test]
    fn file_names_are_sanitised() {
        assert_eq!(file_name_safe("c++/x"), "c___x");
        assert_eq!(file_name_safe("python"), "python");
    }
}
