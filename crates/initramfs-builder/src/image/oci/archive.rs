//! Local image sources: an OCI image layout directory (`oci:DIR[:TAG]`) and a `docker save`
//! archive (`docker-archive:FILE`).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    check_digest, digest_of, parse_doc, pick_platform, verify, Descriptor, Doc, Manifest, OciError,
    MAX_INDEX_DEPTH, MAX_LAYER_BYTES, MAX_MANIFEST_BYTES,
};

/// The annotation naming an image in an OCI layout's index.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |e| OciError::Io(p.display().to_string(), e)
}

fn read_limited(p: &Path, what: &str, limit: u64) -> Result<Vec<u8>, OciError> {
    let len = fs::metadata(p).map_err(io_err(p))?.len();
    if len > limit {
        return Err(OciError::TooLarge {
            what: what.to_string(),
            limit,
        });
    }
    fs::read(p).map_err(io_err(p))
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

    /// Reads and verifies a blob.
    pub fn blob(&self, digest: &str, what: &str, limit: u64) -> Result<Vec<u8>, OciError> {
        let hexd = check_digest(digest)?;
        let p = self.dir.join("blobs").join("sha256").join(hexd);
        let data = read_limited(&p, what, limit)?;
        verify(&format!("{what} ({})", p.display()), digest, &data)?;
        Ok(data)
    }

    /// Picks the image named `tag` (or the only one) and resolves it to a linux/amd64 manifest.
    pub fn resolve(&self, tag: Option<&str>) -> Result<(String, Manifest), OciError> {
        let index_path = self.dir.join("index.json");
        let what = format!("OCI layout index {}", index_path.display());
        let bytes = read_limited(&index_path, &what, MAX_MANIFEST_BYTES)?;
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
            let bytes = self.blob(&desc.digest, &w, MAX_MANIFEST_BYTES)?;
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

/// Archive members by normalised name.
type Members = HashMap<String, Vec<u8>>;
/// Symbolic links of the archive: name → normalised target.
type Links = HashMap<String, String>;

/// A `docker save` archive, loaded into memory.
pub struct DockerArchive {
    file: PathBuf,
    entry: ArchiveEntry,
    files: RefCell<HashMap<String, Vec<u8>>>,
}

impl DockerArchive {
    fn scan(file: &Path, want: &dyn Fn(&str) -> bool) -> Result<(Members, Links), OciError> {
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
            let mut e = e.map_err(bad)?;
            let name = norm(&String::from_utf8_lossy(&e.path_bytes()));
            if e.header().entry_type().is_symlink() {
                if let Some(t) = e.link_name_bytes() {
                    let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                    let target = norm(&format!("{dir}/{}", String::from_utf8_lossy(&t)));
                    links.insert(name, target);
                }
                continue;
            }
            if e.header().entry_type().is_file() && want(&name) {
                if e.size() > MAX_LAYER_BYTES {
                    return Err(OciError::TooLarge {
                        what: name,
                        limit: MAX_LAYER_BYTES,
                    });
                }
                let mut data = Vec::new();
                e.read_to_end(&mut data).map_err(bad)?;
                files.insert(name, data);
            }
        }
        Ok((files, links))
    }

    pub fn open(file: &str) -> Result<Self, OciError> {
        let file = PathBuf::from(file);
        let what = format!("docker archive {}", file.display());
        let (mut first, links) = Self::scan(&file, &|n| n == "manifest.json")?;
        let manifest = first
            .remove("manifest.json")
            .ok_or_else(|| OciError::Archive {
                what: what.clone(),
                detail: "no manifest.json (not a `docker save` archive)".into(),
            })?;
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
        let wanted: HashSet<String> = std::iter::once(entry.config.clone())
            .chain(entry.layers.iter().cloned())
            .collect();
        let (files, _) = Self::scan(&file, &|n| wanted.contains(n))?;
        for w in &wanted {
            if !files.contains_key(w) {
                return Err(OciError::Archive {
                    what: what.clone(),
                    detail: format!(
                        "manifest.json names {w:?}, which the archive does not contain"
                    ),
                });
            }
        }
        Ok(DockerArchive {
            file,
            entry,
            files: RefCell::new(files),
        })
    }

    /// The config's digest (the archive's identity), a synthesized manifest, and the config.
    pub fn resolve(&self) -> Result<(String, Manifest, Vec<u8>), OciError> {
        let files = self.files.borrow();
        let config = files.get(&self.entry.config).cloned().unwrap_or_default();
        let digest = digest_of(&config);
        if let Some(expected) = digest_in_name(&self.entry.config) {
            verify(
                &format!("config {} in {}", self.entry.config, self.file.display()),
                &expected,
                &config,
            )?;
        }
        let desc = |digest: String, size: usize| Descriptor {
            media_type: String::new(),
            digest,
            size: size as u64,
            platform: None,
            annotations: Default::default(),
        };
        let layers = self
            .entry
            .layers
            .iter()
            .map(|l| {
                let data = files.get(l).map(Vec::as_slice).unwrap_or_default();
                desc(digest_of(data), data.len())
            })
            .collect();
        let manifest = Manifest {
            config: desc(digest.clone(), config.len()),
            layers,
        };
        Ok((digest, manifest, config))
    }

    /// Layer `i` (verified against the digest its member name encodes, if any; its uncompressed
    /// digest is checked against the config's diff_ids when applied).
    pub fn layer(&self, i: usize, _digest: &str) -> Result<Vec<u8>, OciError> {
        let name = self.entry.layers.get(i).cloned().unwrap_or_default();
        let data = self
            .files
            .borrow_mut()
            .remove(&name)
            .ok_or_else(|| OciError::Archive {
                what: format!("docker archive {}", self.file.display()),
                detail: format!("layer {name:?} missing"),
            })?;
        if let Some(expected) = digest_in_name(&name) {
            verify(
                &format!("layer {name} in {}", self.file.display()),
                &expected,
                &data,
            )?;
        }
        Ok(data)
    }
}
