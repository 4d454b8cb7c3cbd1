//! Snapshots of booted, ready VMs on disk, and the checks made before one is restored.
//!
//! Layout: `$CLOUDE_HOME/snapshots/<driver>-<language>-<16 hex of the key>/` holding
//! `meta.json` ([`Meta`]: format, [`Identity`], the size and SHA-256 of every file), `state`
//! (QEMU: its migration stream, guest RAM included; cloude-vmm: its own state file) and, for
//! cloude-vmm, `memory` (guest RAM, sparse, mapped copy-on-write by every clone). A snapshot is
//! written into a staging directory beside the others and published by rename; the key hashes
//! everything the snapshot depends on, so a changed kernel, image, hypervisor, VM shape or agent
//! protocol gives another directory (older ones of the same driver and language are removed
//! when a new one is published).
//!
//! Trust: the files are root-owned and read-only to hypervisors (bound read-only into the jail,
//! or opened by the server). They are fully hashed once per server (`load`); before each restore
//! `Snapshot::still_intact` re-checks inode, size, mode and modification time of every file.

use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of this layout and of [`Meta`].
pub const SNAPSHOT_FORMAT: u32 = 1;
/// Largest `meta.json` read.
const MAX_META_BYTES: u64 = 64 * 1024;
/// Most files one snapshot may list.
const MAX_FILES: usize = 8;
/// Name of the metadata file.
const META: &str = "meta.json";

/// Everything a snapshot depends on; two snapshots with equal identities are interchangeable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `qemu` or `cloude-vmm`.
    pub driver: String,
    /// SHA-256 of the hypervisor binary.
    pub hypervisor_sha256: String,
    /// QEMU's accelerator (`tcg`, `kvm`); `kvm` for cloude-vmm.
    pub accel: String,
    /// SHA-256 of the kernel file the template booted.
    pub kernel_sha256: String,
    /// SHA-256 of the language image.
    pub image_sha256: String,
    /// SHA-256 of the read-only root image (block format): a clone reads the disk its template
    /// had mounted, so it must be the same file.
    pub root_sha256: Option<String>,
    /// SHA-256 of the warm-up run the template made before its seal (`VmSpec::warm_up`).
    pub warm_up_sha256: String,
    pub language: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// The template's kernel command line.
    pub cmdline: String,
    /// The host–agent protocol the agent in the image speaks.
    pub protocol_version: u32,
}

impl Identity {
    /// SHA-256 (hex) of the identity: the cache key.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("an identity always serialises");
        hex_sha256(&json)
    }

    /// The snapshot's directory name.
    pub fn dir_name(&self) -> String {
        format!("{}-{}-{}", self.driver, self.language, &self.key()[..16])
    }

    /// The first field in which `self` (found on disk) differs from `want`, as words.
    fn difference(&self, want: &Identity) -> Option<String> {
        macro_rules! cmp {
            ($($f:ident),*) => {$(
                if self.$f != want.$f {
                    return Some(format!(
                        "it was made for {} {:?}, this VM has {:?}",
                        stringify!($f), self.$f, want.$f
                    ));
                }
            )*};
        }
        cmp!(
            driver,
            hypervisor_sha256,
            accel,
            kernel_sha256,
            image_sha256,
            root_sha256,
            warm_up_sha256,
            language,
            memory_mib,
            vcpus,
            cmdline,
            protocol_version
        );
        None
    }
}

/// One file of a snapshot as recorded at publication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `meta.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub format: u32,
    pub identity: Identity,
    pub files: Vec<FileDigest>,
    pub created_unix: u64,
    /// Milliseconds from the template's spawn to its ready agent (for the logs and benchmarks).
    pub template_boot_ms: u64,
}

/// What `still_intact` compares.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Facts {
    ino: u64,
    dev: u64,
    size: u64,
    mode: u32,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Facts {
    fn of(path: &Path) -> std::io::Result<Facts> {
        let m = std::fs::metadata(path)?;
        Ok(Facts {
            ino: m.ino(),
            dev: m.dev(),
            size: m.size(),
            mode: m.mode(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// A verified snapshot.
#[derive(Debug)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub meta: Meta,
    facts: Vec<(PathBuf, Facts)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no snapshot at {0}")]
    NotFound(PathBuf),
    #[error("snapshot {0}: {1}")]
    Io(PathBuf, String),
    #[error("snapshot {0} has format {1}, this server reads format {SNAPSHOT_FORMAT}")]
    Format(PathBuf, u32),
    #[error("snapshot {0} does not fit this VM: {1}")]
    Mismatch(PathBuf, String),
    #[error("snapshot {0} is corrupt: {1}")]
    Corrupt(PathBuf, String),
}

impl Snapshot {
    /// A file of the snapshot (`state`, `memory`).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The first 16 hex digits of the key (what cloude-vmm records as the snapshot's tag).
    pub fn tag(&self) -> String {
        self.meta.identity.key()[..16].to_string()
    }

    /// Cheap check before each restore: every file is still the one that was hashed.
    pub fn still_intact(&self) -> Result<(), SnapshotError> {
        for (path, was) in &self.facts {
            let now =
                Facts::of(path).map_err(|e| SnapshotError::Io(self.dir.clone(), e.to_string()))?;
            if &now != was {
                return Err(SnapshotError::Corrupt(
                    self.dir.clone(),
                    format!("{} changed after it was verified", path.display()),
                ));
            }
        }
        Ok(())
    }
}

/// Where snapshots live.
pub fn root() -> PathBuf {
    cloude_image::paths::cloude_home().join("snapshots")
}

/// Loads and fully verifies the snapshot for `want` under `root` (hashes every file: call it off
/// the async workers, once per server and snapshot).
pub fn load(root: &Path, want: &Identity) -> Result<Snapshot, SnapshotError> {
    let dir = root.join(want.dir_name());
    load_dir(&dir, want)
}

fn load_dir(dir: &Path, want: &Identity) -> Result<Snapshot, SnapshotError> {
    let io = |e: std::io::Error| SnapshotError::Io(dir.to_path_buf(), e.to_string());
    let corrupt = |m: String| SnapshotError::Corrupt(dir.to_path_buf(), m);
    let meta_path = dir.join(META);
    let f = match std::fs::File::open(&meta_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::NotFound(dir.to_path_buf()))
        }
        Err(e) => return Err(io(e)),
    };
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_META_BYTES + 1), &mut raw)
        .map_err(io)?;
    if raw.len() as u64 > MAX_META_BYTES {
        return Err(corrupt(format!(
            "{META} is larger than {MAX_META_BYTES} bytes"
        )));
    }
    // The format first, so that another version is named as such rather than as corruption.
    let format = serde_json::from_slice::<serde_json::Value>(&raw)
        .map_err(|e| corrupt(format!("{META}: {e}")))?
        .get("format")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| corrupt(format!("{META} has no format")))?;
    if format != u64::from(SNAPSHOT_FORMAT) {
        return Err(SnapshotError::Format(
            dir.to_path_buf(),
            u32::try_from(format).unwrap_or(u32::MAX),
        ));
    }
    let meta: Meta = serde_json::from_slice(&raw).map_err(|e| corrupt(format!("{META}: {e}")))?;
    if let Some(d) = meta.identity.difference(want) {
        return Err(SnapshotError::Mismatch(dir.to_path_buf(), d));
    }
    if meta.files.is_empty() || meta.files.len() > MAX_FILES {
        return Err(corrupt(format!("{META} lists {} files", meta.files.len())));
    }
    let mut facts = Vec::new();
    for fd in &meta.files {
        if fd.name.is_empty()
            || fd.name.contains('/')
            || fd.name.starts_with('.')
            || fd.name == META
        {
            return Err(corrupt(format!("bad file name {:?}", fd.name)));
        }
        let path = dir.join(&fd.name);
        let before = Facts::of(&path).map_err(|e| corrupt(format!("{}: {e}", fd.name)))?;
        if before.size != fd.bytes {
            return Err(corrupt(format!(
                "{} has {} bytes, {} were recorded (truncated?)",
                fd.name, before.size, fd.bytes
            )));
        }
        let sha = cloude_image::integrity::sha256_file(&path)
            .map_err(|e| corrupt(format!("{}: {e}", fd.name)))?;
        if sha != fd.sha256 {
            return Err(corrupt(format!(
                "{}: SHA-256 differs from the recorded one",
                fd.name
            )));
        }
        let after = Facts::of(&path).map_err(io)?;
        if after != before {
            return Err(corrupt(format!(
                "{} changed while it was verified",
                fd.name
            )));
        }
        facts.push((path, after));
    }
    Ok(Snapshot {
        dir: dir.to_path_buf(),
        meta,
        facts,
    })
}

/// A directory to write a new snapshot into (beside the published ones, so that publishing is a
/// rename); removed on drop unless published.
pub fn staging(root: &Path) -> std::io::Result<tempfile::TempDir> {
    std::fs::create_dir_all(root)?;
    tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(root)
}

/// Seals the files the driver wrote into `staging` (`files`, by name), writes `meta.json` and
/// publishes the directory for `identity`, replacing older snapshots of the same driver and
/// language. Returns the verified snapshot.
pub fn publish(
    root: &Path,
    staging: tempfile::TempDir,
    identity: &Identity,
    files: &[&str],
    template_boot_ms: u64,
) -> Result<Snapshot, SnapshotError> {
    let sdir = staging.path().to_path_buf();
    let io = |e: std::io::Error| SnapshotError::Io(sdir.clone(), e.to_string());
    let mut digests = Vec::new();
    for name in files {
        let path = sdir.join(name);
        // Root-owned, read-only for everyone else: hypervisors (other uids) may read, not write.
        // Through a descriptor of a regular file, never following a link.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(io)?;
        let m = f.metadata().map_err(io)?;
        if !m.file_type().is_file() {
            return Err(SnapshotError::Io(
                path,
                "not a regular file; refusing to publish it".into(),
            ));
        }
        super::hostile::seal(&f).map_err(io)?;
        let bytes = m.len();
        let sha256 = cloude_image::integrity::sha256_file(&path)
            .map_err(|e| SnapshotError::Io(sdir.clone(), e.to_string()))?;
        digests.push(FileDigest {
            name: (*name).to_string(),
            bytes,
            sha256,
        });
    }
    let meta = Meta {
        format: SNAPSHOT_FORMAT,
        identity: identity.clone(),
        files: digests,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        template_boot_ms,
    };
    let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
    std::fs::write(sdir.join(META), json).map_err(io)?;
    std::fs::set_permissions(&sdir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(io)?;
    let target = root.join(identity.dir_name());
    // Same key: an equal snapshot made concurrently (or an invalid one) is replaced.
    let _ = std::fs::remove_dir_all(&target);
    let staged = staging.keep();
    if let Err(e) = std::fs::rename(&staged, &target) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(SnapshotError::Io(target, e.to_string()));
    }
    remove_older(root, identity);
    load_dir(&target, identity)
}

/// Removes the snapshots of `identity`'s driver and language made for other identities.
fn remove_older(root: &Path, identity: &Identity) {
    let keep = identity.dir_name();
    let prefix = format!("{}-{}-", identity.driver, identity.language);
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rest = name.strip_prefix(&prefix);
        // `<prefix><16 hex>` only: "python" must not remove "python-x" snapshots of "python".
        let ours = rest.is_some_and(|r| r.len() == 16 && r.bytes().all(|b| b.is_ascii_hexdigit()));
        if ours && name != keep {
            tracing::info!("removing the outdated snapshot {name}");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Removes an invalid snapshot (the next use makes a new one).
pub fn discard(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove the snapshot {}: {e}", dir.display());
        }
    }
}

/// Removes staging directories left by a server that died while making a snapshot.
pub fn sweep_staging(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(600));
        if e.file_name().to_string_lossy().starts_with(".staging-") && old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

pub(crate) fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file (hypervisor binaries), as hex.
pub fn file_sha256(path: &Path) -> Result<String, String> {
    cloude_image::integrity::sha256_file(path).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            driver: "qemu".into(),
            hypervisor_sha256: "h".into(),
            accel: "tcg".into(),
            kernel_sha256: "k".into(),
            image_sha256: "i".into(),
            root_sha256: None,
            warm_up_sha256: "w".into(),
            language: "python".into(),
            memory_mib: 256,
            vcpus: 1,
            cmdline: "console=ttyS0".into(),
            protocol_version: 1,
        }
    }

    fn make(root: &Path, id: &Identity) -> Snapshot {
        let st = staging(root).expect("staging");
        std::fs::write(st.path().join("state"), vec![5u8; 10_000]).expect("write");
        publish(root, st, id, &["state"], 1234).expect("publish")
    }

    #[test]
    fn published_snapshots_load_and_every_kind_of_damage_is_refused() {
        let root = tempfile::tempdir().expect("tmp");
        let id = identity();
        let snap = make(root.path(), &id);
        assert!(snap.dir.ends_with(id.dir_name()));
        snap.still_intact().expect("intact");
        let again = load(root.path(), &id).expect("load");
        assert_eq!(again.meta.template_boot_ms, 1234);

        // Another identity has its own key, so it is simply not there.
        let other = Identity {
            memory_mib: 512,
            ..id.clone()
        };
        assert!(matches!(
            load(root.path(), &other),
            Err(SnapshotError::NotFound(_))
        ));

        // A meta.json claiming another shape is a mismatch, named by field.
        let meta_path = snap.dir.join(META);
        let good_meta = std::fs::read_to_string(&meta_path).expect("meta");
        std::fs::write(
            &meta_path,
            good_meta.replace("\"memory_mib\": 256", "\"memory_mib\": 512"),
        )
        .expect("write");
        let e = load(root.path(), &id).expect_err("mismatch").to_string();
        assert!(e.contains("memory_mib 512"), "{e}");
        std::fs::write(
            &meta_path,
            good_meta.replace("\"format\": 1", "\"format\": 99"),
        )
        .expect("write");
        assert!(matches!(
            load(root.path(), &id),
            Err(SnapshotError::Format(_, 99))
        ));
        std::fs::write(&meta_path, "{not json").expect("write");
        assert!(matches!(
            load(root.path(), &id),
            Err(SnapshotError::Corrupt(..))
        ));
        std::fs::write(&meta_path, vec![b' '; 70_000]).expect("write");
        assert!(matches!(
            load(root.path(), &id),
            Err(SnapshotError::Corrupt(..))
        ));
        std::fs::write(&meta_path, &good_meta).expect("write");
        load(root.path(), &id).expect("restored meta loads");

        // Truncated and flipped state files.
        let state = snap.dir.join("state");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&state)
            .expect("open");
        f.set_len(9_000).expect("truncate");
        let e = load(root.path(), &id).expect_err("truncated").to_string();
        assert!(e.contains("truncated"), "{e}");
        assert!(snap.still_intact().is_err(), "the cheap check sees it too");
        f.set_len(10_000).expect("extend");
        let e = load(root.path(), &id).expect_err("zeroed tail").to_string();
        assert!(e.contains("SHA-256"), "{e}");
        // A missing file.
        std::fs::remove_file(&state).expect("rm");
        assert!(matches!(
            load(root.path(), &id),
            Err(SnapshotError::Corrupt(..))
        ));
    }

    #[test]
    fn publishing_replaces_older_snapshots_of_the_language_only() {
        let root = tempfile::tempdir().expect("tmp");
        let old = identity();
        let old_snap = make(root.path(), &old);
        let px = Identity {
            language: "python-x".into(),
            ..old.clone()
        };
        let px_snap = make(root.path(), &px);
        let new = Identity {
            image_sha256: "i2".into(),
            ..old.clone()
        };
        let new_snap = make(root.path(), &new);
        assert!(!old_snap.dir.exists(), "the outdated snapshot is gone");
        assert!(px_snap.dir.exists(), "another language's snapshot stays");
        assert!(new_snap.dir.exists());
        let mode = std::fs::metadata(new_snap.file("state"))
            .expect("meta")
            .mode();
        assert_eq!(mode & 0o777, 0o444, "read-only to hypervisors");
    }
}
