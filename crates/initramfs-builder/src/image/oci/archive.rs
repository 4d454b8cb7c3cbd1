//! Local image sources: an OCI image layout directory (`oci:DIR[:TAG]`) and a `docker save`
//! archive (`docker-archive:FILE`).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    check_digest, digest_of, parse_doc, pick_platform, verify, verify_file, Descriptor, Doc,
    Manifest, OciError, MAX_INDEX_DEPTH, MAX_LAYER_BYTES, MAX_MANIFEST_BYTES,
};

/// The annotation naming an image in an OCI layout's index.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |e| OciError::Io(p.display().to_string(), e)
}

/// Opens a regular file of at most `limit` bytes (a device or FIFO posing as a blob is refused:
/// it could be endless).
fn open_limited(p: &Path, what: &str, cap: &'static str, limit: u64) -> Result<File, OciError> {
    let f = File::open(p).map_err(io_err(p))?;
    let m = f.metadata().map_err(io_err(p))?;
    if !m.is_file() {
        return Err(OciError::Archive {
            what: what.to_string(),
            detail: format!("{} is not a regular file", p.display()),
        });
    }
    if m.len() > limit {
        return Err(OciError::TooLarge {
            what: format!("{what} ({} bytes)", m.len()),
            cap,
            limit,
        });
    }
    Ok(f)
}

/// A manifest, index or config file: at most [`MAX_MANIFEST_BYTES`], checked before reading.
fn read_small(p: &Path, what: &str) -> Result<Vec<u8>, OciError> {
    let f = open_limited(p, what, "MAX_MANIFEST_BYTES", MAX_MANIFEST_BYTES)?;
    let mut data = Vec::new();
    f.take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut data)
        .map_err(io_err(p))?;
    Ok(data)
}

/// An OCI image layout directory.
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    pub fn open(dir: &str) -> Result<Self, OciError> {
        let dir = PathBuf::from(dir);
        if !dir.join("index.json").is_file() {
            return Err(OciError::Archive {
                what: format!("OCI layout {}", dir.display()),
                detail: "no index.json (not an OCI image layout directory)".into(),
            });
        }
        Ok(Layout { dir })
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        Ok(self
            .dir
            .join("blobs")
            .join("sha256")
            .join(check_digest(digest)?))
    }

    /// Reads and verifies a manifest or config blob (at most [`MAX_MANIFEST_BYTES`]).
    pub fn small_blob(&self, digest: &str, what: &str) -> Result<Vec<u8>, OciError> {
        let p = self.blob_path(digest)?;
        let data = read_small(&p, what)?;
        verify(&format!("{what} ({})", p.display()), digest, &data)?;
        Ok(data)
    }

    /// Opens and verifies (streaming) a layer blob (at most [`MAX_LAYER_BYTES`]), positioned at
    /// its start.
    pub fn layer(&self, digest: &str, what: &str) -> Result<File, OciError> {
        let p = self.blob_path(digest)?;
        let mut f = open_limited(&p, what, "MAX_LAYER_BYTES", MAX_LAYER_BYTES)?;
        verify_file(&format!("{what} ({})", p.display()), digest, &mut f)?;
        Ok(f)
    }

    /// Picks the image named `tag` (or the only one) and resolves it to a linux/amd64 manifest.
    pub fn resolve(&self, tag: Option<&str>) -> Result<(String, Manifest), OciError> {
        let index_path = self.dir.join("index.json");
        let what = format!("OCI layout index {}", index_path.display());
        let bytes = read_small(&index_path, &what)?;
        let Doc::Index(list) = parse_doc(&what, &bytes)? else {
            return Err(OciError::BadManifest {
                what,
                detail: "index.json is not an image index".into(),
            });
        };
        let chosen: Vec<&Descriptor> = match tag {
            Some(t) => list
                .iter()
                .filter(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t))
                .collect(),
            None => list.iter().collect(),
        };
        let mut desc = match chosen.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(OciError::NotFound {
                    what: format!("image tagged {:?}", tag.unwrap_or("")),
                    url: index_path.display().to_string(),
                })
            }
            several => pick_platform(
                &what,
                &several.iter().map(|d| (*d).clone()).collect::<Vec<_>>(),
            )?
            .clone(),
        };
        for _ in 0..MAX_INDEX_DEPTH {
            let w = format!("manifest {}", desc.digest);
            let bytes = self.small_blob(&desc.digest, &w)?;
            match parse_doc(&w, &bytes)? {
                Doc::Manifest(m) => return Ok((desc.digest, m)),
                Doc::Index(list) => desc = pick_platform(&w, &list)?.clone(),
            }
        }
        Err(OciError::BadManifest {
            what,
            detail: format!("indexes nested deeper than {MAX_INDEX_DEPTH}"),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

fn norm(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// The `sha256:` digest a docker-archive member name encodes (`HEX.json`, `blobs/sha256/HEX`).
fn digest_in_name(name: &str) -> Option<String> {
    let base = name.rsplit('/').next()?.trim_end_matches(".json");
    let d = format!("sha256:{base}");
    check_digest(&d).ok()?;
    Some(d)
}

/// Where a member's data lies in the archive file.
#[derive(Clone, Copy, Debug)]
struct Span {
    offset: u64,
    size: u64,
}

/// Regular-file members by normalised name.
type Members = HashMap<String, Span>;
/// Symbolic links of the archive: name → normalised target.
type Links = HashMap<String, String>;

/// A `docker save` archive. Only `manifest.json` and the config are read into memory (each at
/// most [`MAX_MANIFEST_BYTES`]); layers are read from the file where they lie.
pub struct DockerArchive {
    file: PathBuf,
    entry: ArchiveEntry,
    members: Members,
    config: Vec<u8>,
}

impl DockerArchive {
    /// Lists the archive's regular files (where their data lies) and symbolic links, reading no
    /// member's data.
    fn scan(file: &Path) -> Result<(Members, Links), OciError> {
        let what = format!("docker archive {}", file.display());
        let bad = |e: std::io::Error| OciError::Archive {
            what: what.clone(),
            detail: e.to_string(),
        };
        let f = File::open(file).map_err(io_err(file))?;
        let mut a = tar::Archive::new(f);
        let mut files = HashMap::new();
        let mut links = HashMap::new();
        for e in a.entries().map_err(bad)? {
            let e = e.map_err(bad)?;
            let name = norm(&String::from_utf8_lossy(&e.path_bytes()));
            let ty = e.header().entry_type();
            if ty.is_symlink() {
                if let Some(t) = e.link_name_bytes() {
                    let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                    let target = norm(&format!("{dir}/{}", String::from_utf8_lossy(&t)));
                    links.insert(name, target);
                }
                continue;
            }
            if ty.is_file() {
                let span = Span {
                    offset: e.raw_file_position(),
                    size: e.size(),
                };
                files.insert(name, span);
            }
        }
        Ok((files, links))
    }

    /// A member's data, refused past `limit` from its size in the archive.
    fn member(
        &self,
        name: &str,
        cap: &'static str,
        limit: u64,
    ) -> Result<io::Take<File>, OciError> {
        Self::member_of(&self.file, &self.members, name, cap, limit)
    }

    fn member_of(
        file: &Path,
        members: &Members,
        name: &str,
        cap: &'static str,
        limit: u64,
    ) -> Result<io::Take<File>, OciError> {
        let span = members.get(name).ok_or_else(|| OciError::Archive {
            what: format!("docker archive {}", file.display()),
            detail: format!("manifest.json names {name:?}, which the archive does not contain"),
        })?;
        if span.size > limit {
            return Err(OciError::TooLarge {
                what: format!("{name} in {} ({} bytes)", file.display(), span.size),
                cap,
                limit,
            });
        }
        let mut f = File::open(file).map_err(io_err(file))?;
        f.seek(SeekFrom::Start(span.offset)).map_err(io_err(file))?;
        Ok(f.take(span.size))
    }

    pub fn open(file: &str) -> Result<Self, OciError> {
        let file = PathBuf::from(file);
        let what = format!("docker archive {}", file.display());
        let (members, links) = Self::scan(&file)?;
        if !members.contains_key("manifest.json") {
            return Err(OciError::Archive {
                what: what.clone(),
                detail: "no manifest.json (not a `docker save` archive)".into(),
            });
        }
        let read_small = |name: &str| -> Result<Vec<u8>, OciError> {
            let mut data = Vec::new();
            Self::member_of(
                &file,
                &members,
                name,
                "MAX_MANIFEST_BYTES",
                MAX_MANIFEST_BYTES,
            )?
            .read_to_end(&mut data)
            .map_err(io_err(&file))?;
            Ok(data)
        };
        let manifest = read_small("manifest.json")?;
        let entries: Vec<ArchiveEntry> =
            serde_json::from_slice(&manifest).map_err(|e| OciError::BadManifest {
                what: format!("{what}: manifest.json"),
                detail: e.to_string(),
            })?;
        let mut entry = entries
            .into_iter()
            .next()
            .ok_or_else(|| OciError::BadManifest {
                what: format!("{what}: manifest.json"),
                detail: "lists no image".into(),
            })?;
        let resolve = |n: &str| {
            let n = norm(n);
            links.get(&n).cloned().unwrap_or(n)
        };
        entry.config = resolve(&entry.config);
        entry.layers = entry.layers.iter().map(|l| resolve(l)).collect();
        let wanted: HashSet<&String> = std::iter::once(&entry.config)
            .chain(entry.layers.iter())
            .collect();
        for w in wanted {
            if !members.contains_key(w) {
                return Err(OciError::Archive {
                    what: what.clone(),
                    detail: format!(
                        "manifest.json names {w:?}, which the archive does not contain"
                    ),
                });
            }
        }
        let config = read_small(&entry.config)?;
        Ok(DockerArchive {
            file,
            entry,
            members,
            config,
        })
    }

    /// The config's digest (the archive's identity), a synthesized manifest (every layer hashed
    /// by streaming, and checked against the digest its member name encodes, if any), and the
    /// config.
    pub fn resolve(&self) -> Result<(String, Manifest, Vec<u8>), OciError> {
        let config = self.config.clone();
        let digest = digest_of(&config);
        if let Some(expected) = digest_in_name(&self.entry.config) {
            verify(
                &format!("config {} in {}", self.entry.config, self.file.display()),
                &expected,
                &config,
            )?;
        }
        let desc = |digest: String, size: u64| Descriptor {
            media_type: String::new(),
            digest,
            size,
            platform: None,
            annotations: Default::default(),
        };
        let mut layers = Vec::new();
        for l in &self.entry.layers {
            let mut r = self.member(l, "MAX_LAYER_BYTES", MAX_LAYER_BYTES)?;
            let mut hash = Sha256::new();
            let size = io::copy(&mut r, &mut hash).map_err(io_err(&self.file))?;
            let actual = format!("sha256:{}", hex::encode(hash.finalize()));
            if let Some(expected) = digest_in_name(l) {
                if expected != actual {
                    return Err(OciError::DigestMismatch {
                        what: format!("layer {l} in {}", self.file.display()),
                        expected,
                        actual,
                    });
                }
            }
            layers.push(desc(actual, size));
        }
        let manifest = Manifest {
            config: desc(digest.clone(), config.len() as u64),
            layers,
        };
        Ok((digest, manifest, config))
    }

    /// Layer `i`, read from the archive file (verified by [`Self::resolve`]; its uncompressed
    /// digest is checked against the config's diff_ids when applied).
    pub fn layer(&self, i: usize) -> Result<io::Take<File>, OciError> {
        let name = self.entry.layers.get(i).cloned().unwrap_or_default();
        self.member(&name, "MAX_LAYER_BYTES", MAX_LAYER_BYTES)
    }
}
