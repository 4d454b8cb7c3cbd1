//! Root filesystems from OCI images: references, manifests, platform selection, verified blobs
//! and layer application.

mod archive;
mod registry;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::tree::{ApplyOptions, Limits, Tree, TreeError};
use crate::progress::Progress;

pub use registry::parse_challenge;

/// Largest manifest, index, image config or docker-archive `manifest.json` accepted; a bigger
/// one is refused from its declared size, or once this many bytes have been read.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest compressed layer accepted (streamed to a file while hashed, never held in memory).
pub const MAX_LAYER_BYTES: u64 = 4 << 30;
/// Most bytes read from a layer after its tar end-of-archive marker (the second zero block and
/// writers' record padding: GNU tar pads to 10 KiB). Whatever follows is never decompressed, so a
/// compression bomb appended to a valid layer costs nothing.
pub const MAX_TRAILING_BYTES: u64 = 1 << 20;
/// Most layers an image may have.
pub const MAX_LAYERS: usize = 256;
/// How many index levels are followed (index → index → manifest).
pub const MAX_INDEX_DEPTH: usize = 3;

/// The registry Docker Hub references (`docker://python:3.11`) resolve to.
pub const DOCKER_HUB: &str = "registry-1.docker.io";

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("bad image reference {0:?}: {1}")]
    BadReference(String, &'static str),
    #[error("--insecure (plain HTTP) is only allowed for loopback registries, not {0}")]
    InsecureNotLoopback(String),
    #[error("network error talking to {url}: {detail}")]
    Network { url: String, detail: String },
    #[error("{url} answered HTTP {status}: {detail}")]
    Http {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{what} not found at {url}")]
    NotFound { what: String, url: String },
    #[error("registry authentication failed at {url}: {detail}")]
    Auth { url: String, detail: String },
    #[error("bad manifest {what}: {detail}")]
    BadManifest { what: String, detail: String },
    #[error("no linux/amd64 image in the index {0} (available: {1})")]
    NoPlatform(String, String),
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("invalid digest {0:?} (only sha256:<64 hex> is supported)")]
    BadDigest(String),
    #[error("{what} is larger than {cap} ({limit} bytes)")]
    TooLarge {
        what: String,
        cap: &'static str,
        limit: u64,
    },
    #[error("{layer} has more than MAX_TRAILING_BYTES ({limit} bytes) of data after its tar end-of-archive marker (the rest was not decompressed)")]
    Trailing { layer: String, limit: u64 },
    #[error("layer {layer}: {source}")]
    Layer {
        layer: String,
        #[source]
        source: TreeError,
    },
    #[error("{what}: {detail}")]
    Archive { what: String, detail: String },
    #[error("I/O error at {0}: {1}")]
    Io(String, io::Error),
}

/// Where an OCI image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    /// `docker://HOST/REPO[:TAG|@DIGEST]`.
    Registry {
        host: String,
        repo: String,
        reference: String,
    },
    /// `oci:DIR[:TAG]`.
    Layout { dir: String, tag: Option<String> },
    /// `docker-archive:FILE`.
    DockerArchive { file: String },
}

/// Parses `docker://...`, `oci:...` or `docker-archive:...`.
pub fn parse_reference(s: &str) -> Result<Reference, OciError> {
    let bad = |why| OciError::BadReference(s.to_string(), why);
    if let Some(rest) = s.strip_prefix("docker://") {
        let (name, reference) = if let Some((n, d)) = rest.split_once('@') {
            (n, d.to_string())
        } else {
            match rest.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => (n, t.to_string()),
                _ => (rest, "latest".to_string()),
            }
        };
        if name.is_empty() || reference.is_empty() {
            return Err(bad("empty name or tag"));
        }
        let (first, path) = name.split_once('/').unwrap_or(("", name));
        let is_host = first.contains('.') || first.contains(':') || first == "localhost";
        let (host, repo) = if is_host {
            (first.to_string(), path.to_string())
        } else if name.contains('/') {
            (DOCKER_HUB.to_string(), name.to_string())
        } else {
            (DOCKER_HUB.to_string(), format!("library/{name}"))
        };
        let host = if host == "docker.io" || host == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            host
        };
        let repo_ok = !repo.is_empty()
            && repo.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !repo_ok {
            return Err(bad(
                "the repository name must be lowercase [a-z0-9._-] components",
            ));
        }
        let ref_ok = reference
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
        if !ref_ok || reference.len() > 128 + 7 {
            return Err(bad("invalid tag or digest"));
        }
        if reference.contains(':') {
            check_digest(&reference)?;
        }
        return Ok(Reference::Registry {
            host,
            repo,
            reference,
        });
    }
    if let Some(rest) = s.strip_prefix("oci:") {
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') && !d.is_empty() => {
                (d.to_string(), Some(t.to_string()))
            }
            _ => (rest.to_string(), None),
        };
        if dir.is_empty() {
            return Err(bad("missing directory"));
        }
        return Ok(Reference::Layout { dir, tag });
    }
    if let Some(file) = s.strip_prefix("docker-archive:") {
        if file.is_empty() {
            return Err(bad("missing file"));
        }
        return Ok(Reference::DockerArchive {
            file: file.to_string(),
        });
    }
    Err(bad("expected docker://, oci: or docker-archive:"))
}

/// Accepts only `sha256:` + 64 lowercase hex digits (digests also become file names).
pub fn check_digest(d: &str) -> Result<&str, OciError> {
    match d.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(h)
        }
        _ => Err(OciError::BadDigest(d.to_string())),
    }
}

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Checks `data` against `expected`.
pub fn verify(what: &str, expected: &str, data: &[u8]) -> Result<(), OciError> {
    check_digest(expected)?;
    same_digest(what, expected, digest_of(data))
}

/// `actual` must be `expected`.
fn same_digest(what: &str, expected: &str, actual: String) -> Result<(), OciError> {
    if actual != expected {
        return Err(OciError::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Any {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// An image manifest (config + layers).
#[derive(Clone, Debug)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// What a parsed manifest-or-index document is.
pub enum Doc {
    Index(Vec<Descriptor>),
    Manifest(Manifest),
}

/// Parses a manifest or an index (OCI or Docker v2 schema 2).
pub fn parse_doc(what: &str, bytes: &[u8]) -> Result<Doc, OciError> {
    let bad = |detail: String| OciError::BadManifest {
        what: what.to_string(),
        detail,
    };
    let any: Any = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if any.schema_version == Some(1) {
        return Err(bad("Docker schema 1 manifests are not supported".into()));
    }
    if let Some(m) = any.manifests {
        return Ok(Doc::Index(m));
    }
    match (any.config, any.layers) {
        (Some(config), Some(layers)) => {
            if layers.len() > MAX_LAYERS {
                return Err(bad(format!("more than {MAX_LAYERS} layers")));
            }
            check_digest(&config.digest)?;
            for l in &layers {
                check_digest(&l.digest)?;
            }
            Ok(Doc::Manifest(Manifest { config, layers }))
        }
        _ => Err(bad("neither an image manifest nor an index".into())),
    }
}

/// Picks the linux/amd64 manifest of an index.
pub fn pick_platform<'a>(what: &str, list: &'a [Descriptor]) -> Result<&'a Descriptor, OciError> {
    let found = list.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    let found = found.or_else(|| match list {
        [only] if only.platform.is_none() => Some(only),
        _ => None,
    });
    found.ok_or_else(|| {
        let avail: Vec<String> = list
            .iter()
            .map(|d| match &d.platform {
                Some(p) => format!("{}/{}", p.os, p.architecture),
                None => "unknown".into(),
            })
            .collect();
        OciError::NoPlatform(what.to_string(), avail.join(", "))
    })
}

/// A resolved image: everything needed for the cache key, before layers are fetched.
pub struct Resolved {
    /// Digest of the platform manifest (or of the archive's config for docker-archive).
    pub manifest_digest: String,
    pub manifest: Manifest,
    pub config: ImageConfig,
    source: Source,
}

enum Source {
    Registry(registry::Registry),
    Layout(archive::Layout),
    DockerArchive(archive::DockerArchive),
}

/// Fetches and verifies the manifest and config of `reference`.
pub fn resolve(
    reference: &Reference,
    insecure: bool,
    progress: &Progress,
) -> Result<Resolved, OciError> {
    let bar = progress.spinner("resolving the OCI image manifest");
    let (source, manifest_digest, manifest, config_bytes) = match reference {
        Reference::Registry {
            host,
            repo,
            reference,
        } => {
            let reg = registry::Registry::new(host, repo, insecure)?;
            let (digest, manifest) = reg.resolve(reference)?;
            let config = reg.blob_bytes(&manifest.config, "image config")?;
            (Source::Registry(reg), digest, manifest, config)
        }
        Reference::Layout { dir, tag } => {
            let l = archive::Layout::open(dir)?;
            let (digest, manifest) = l.resolve(tag.as_deref())?;
            let config = l.small_blob(&manifest.config.digest, "image config")?;
            (Source::Layout(l), digest, manifest, config)
        }
        Reference::DockerArchive { file } => {
            let a = archive::DockerArchive::open(file)?;
            let (digest, manifest, config) = a.resolve()?;
            (Source::DockerArchive(a), digest, manifest, config)
        }
    };
    let config: ImageConfig =
        serde_json::from_slice(&config_bytes).map_err(|e| OciError::BadManifest {
            what: format!("config {}", manifest.config.digest),
            detail: e.to_string(),
        })?;
    if (!config.os.is_empty() && config.os != "linux")
        || (!config.architecture.is_empty() && config.architecture != "amd64")
    {
        return Err(OciError::BadManifest {
            what: format!("config {}", manifest.config.digest),
            detail: format!(
                "image is for {}/{}, not linux/amd64",
                config.os, config.architecture
            ),
        });
    }
    if !config.rootfs.diff_ids.is_empty() && config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(OciError::BadManifest {
            what: manifest_digest.clone(),
            detail: "the config's rootfs.diff_ids and the manifest's layers differ in number"
                .into(),
        });
    }
    bar.finish_with_message(format!("image {manifest_digest}"));
    Ok(Resolved {
        manifest_digest,
        manifest,
        config,
        source,
    })
}

/// Reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Decompresses a layer (detected by magic: gzip, zstd or plain tar).
fn decoder<'a, R: Read + 'a>(mut blob: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match blob.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let whole =
        io::BufReader::with_capacity(1 << 16, io::Cursor::new(magic[..n].to_vec()).chain(blob));
    Ok(match magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::stream::read::Decoder::with_buffer(whole)?),
        _ => Box::new(whole),
    })
}

/// Applies one verified layer blob, checking the uncompressed digest when `diff_id` is known.
/// Reads the tar up to its end-of-archive marker and at most [`MAX_TRAILING_BYTES`] after it.
pub fn apply_layer<R: Read>(
    tree: &mut Tree,
    name: &str,
    blob: R,
    diff_id: Option<&str>,
) -> Result<(), OciError> {
    let io_err = |e: io::Error| OciError::Archive {
        what: name.to_string(),
        detail: e.to_string(),
    };
    let mut r = HashingReader {
        inner: decoder(blob).map_err(io_err)?,
        hash: Sha256::new(),
    };
    let opts = ApplyOptions {
        whiteouts: true,
        merged_usr: false,
    };
    tree.apply_tar(&mut r, opts)
        .map_err(|source| OciError::Layer {
            layer: name.to_string(),
            source,
        })?;
    // Hash the tar's end padding too, as diff_ids cover the whole stream, but stop soon after.
    let trailing =
        io::copy(&mut (&mut r).take(MAX_TRAILING_BYTES + 1), &mut io::sink()).map_err(io_err)?;
    if trailing > MAX_TRAILING_BYTES {
        return Err(OciError::Trailing {
            layer: name.to_string(),
            limit: MAX_TRAILING_BYTES,
        });
    }
    if let Some(expected) = diff_id {
        let actual = format!("sha256:{}", hex::encode(r.hash.finalize()));
        if actual != expected {
            return Err(OciError::DigestMismatch {
                what: format!("uncompressed {name} (config diff_id)"),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    Ok(())
}

/// Streams `file` through SHA-256 (from its start) and rewinds it; fails on a mismatch.
fn verify_file(what: &str, expected: &str, file: &mut File) -> Result<(), OciError> {
    check_digest(expected)?;
    let io_err = |e: io::Error| OciError::Io(what.to_string(), e);
    file.rewind().map_err(io_err)?;
    let mut hash = Sha256::new();
    io::copy(file, &mut hash).map_err(io_err)?;
    file.rewind().map_err(io_err)?;
    same_digest(
        what,
        expected,
        format!("sha256:{}", hex::encode(hash.finalize())),
    )
}

impl Resolved {
    /// Fetches (verifying) and applies every layer in order, under `limits` (never looser than
    /// the production [`Limits`]).
    pub fn build_tree(&self, limits: Limits, progress: &Progress) -> Result<Tree, OciError> {
        let mut tree = Tree::with_limits(limits);
        let n = self.manifest.layers.len();
        for (i, layer) in self.manifest.layers.iter().enumerate() {
            let what = format!("layer {}/{n} {}", i + 1, layer.digest);
            if layer.media_type.contains("nondistributable") || layer.media_type.contains("foreign")
            {
                return Err(OciError::BadManifest {
                    what: what.clone(),
                    detail: format!("non-distributable layer type {}", layer.media_type),
                });
            }
            let diff_id = self.config.rootfs.diff_ids.get(i).map(String::as_str);
            let blob: Box<dyn Read> = match &self.source {
                Source::Registry(r) => Box::new(r.blob_file(layer, &what, Some(progress))?),
                Source::Layout(l) => Box::new(l.layer(&layer.digest, &what)?),
                Source::DockerArchive(a) => Box::new(a.layer(i)?),
            };
            let bar = progress.spinner(format!("applying {what}"));
            apply_layer(&mut tree, &what, blob, diff_id)?;
            bar.finish_with_message(format!("applied {what}"));
        }
        Ok(tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = |s: &str| parse_reference(s).expect(s);
        assert_eq!(
            r("docker://127.0.0.1:5000/a/b:v1"),
            Reference::Registry {
                host: "127.0.0.1:5000".into(),
                repo: "a/b".into(),
                reference: "v1".into()
            }
        );
        assert_eq!(
            r("docker://python"),
            Reference::Registry {
                host: DOCKER_HUB.into(),
                repo: "library/python".into(),
                reference: "latest".into()
            }
        );
        assert_eq!(
            r("docker://ghcr.io/o/r@sha256:0000000000000000000000000000000000000000000000000000000000000000"),
            Reference::Registry {
                host: "ghcr.io".into(),
                repo: "o/r".into(),
                reference: "sha256:0000000000000000000000000000000000000000000000000000000000000000".into()
            }
        );
        assert_eq!(
            r("oci:/tmp/x:t"),
            Reference::Layout {
                dir: "/tmp/x".into(),
                tag: Some("t".into())
            }
        );
        assert_eq!(
            r("oci:/tmp/x"),
            Reference::Layout {
                dir: "/tmp/x".into(),
                tag: None
            }
        );
        assert_eq!(
            r("docker-archive:/a.tar"),
            Reference::DockerArchive {
                file: "/a.tar".into()
            }
        );
        for bad in [
            "http://x/y",
            "docker://",
            "docker://Host.io/UPPER:t",
            "docker://x/y@sha256:zz",
            "oci:",
            "docker://a/../b",
        ] {
            assert!(parse_reference(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests_checked() {
        assert!(check_digest("sha256:../../etc/passwd").is_err());
        let d = digest_of(b"x");
        assert!(verify("x", &d, b"x").is_ok());
        let e = verify("blob x", &d, b"y").expect_err("mismatch");
        assert!(e.to_string().contains("digest mismatch for blob x"), "{e}");
    }

    #[test]
    fn index_picks_amd64() {
        let idx = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"m","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1,"platform":{"architecture":"arm64","os":"linux"}},
            {"mediaType":"m","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":1,"platform":{"architecture":"amd64","os":"linux"}}]}"#;
        let Ok(Doc::Index(list)) = parse_doc("idx", idx) else {
            panic!("index")
        };
        assert!(pick_platform("idx", &list)
            .expect("amd64")
            .digest
            .starts_with("sha256:2222"));
        let e = pick_platform("idx", &list[..1]).expect_err("no amd64");
        assert!(e.to_string().contains("linux/arm64"), "{e}");
        assert!(parse_doc("m", b"{\"schemaVersion\":1}").is_err());
        assert!(parse_doc("m", b"not json").is_err());
    }
}
