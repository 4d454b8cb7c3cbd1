//! Content digests of cached artifacts (kernels, images): written beside each file when it is
//! published (`<file>.sha256`) and re-checked by the server when it starts using the file, so that
//! a cache modified after the build (by anything that could write it) is refused, not booted.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error("cannot read {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{path} was modified after it was built (sha256 {actual}, recorded {recorded}); remove it and its .sha256 to rebuild")]
    Mismatch {
        path: PathBuf,
        actual: String,
        recorded: String,
    },
}

/// The digest file of `path`.
pub fn digest_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".sha256");
    PathBuf::from(p)
}

/// The hex SHA-256 of the file at `path`.
pub fn sha256_file(path: &Path) -> Result<String, IntegrityError> {
    let io = |e| IntegrityError::Io(path.to_path_buf(), e);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The digest recorded beside `path` (what [`verify`] checks against), if there is one.
pub fn recorded(path: &Path) -> Option<String> {
    std::fs::read_to_string(digest_path(path))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Records the digest of `path` beside it.
pub fn seal(path: &Path) -> Result<String, IntegrityError> {
    seal_as(path, path)
}

/// Records the digest of `file` as the digest of `published` (the path `file` is about to be
/// renamed to), so that a published file never lacks its digest.
pub fn seal_as(file: &Path, published: &Path) -> Result<String, IntegrityError> {
    let d = sha256_file(file)?;
    let dp = digest_path(published);
    std::fs::write(&dp, format!("{d}\n")).map_err(|e| IntegrityError::Io(dp, e))?;
    Ok(d)
}

/// Whether `path` still has its recorded digest. A file published before digests were recorded
/// (no `.sha256` yet) is sealed now: from then on it is checked.
pub fn verify(path: &Path) -> Result<(), IntegrityError> {
    let dp = digest_path(path);
    let recorded = match std::fs::read_to_string(&dp) {
        Ok(s) => s.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "{} has no recorded digest; recording it now",
                path.display()
            );
            seal(path)?;
            return Ok(());
        }
        Err(e) => return Err(IntegrityError::Io(dp, e)),
    };
    let actual = sha256_file(path)?;
    if actual != recorded {
        return Err(IntegrityError::Mismatch {
            path: path.to_path_buf(),
            actual,
            recorded,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_modified_file_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("image.cpio.lz4");
        std::fs::write(&f, b"image bytes").expect("write");
        seal(&f).expect("seal");
        verify(&f).expect("unchanged");
        std::fs::write(&f, b"image bytez").expect("tamper");
        let e = verify(&f).expect_err("tampered");
        assert!(e.to_string().contains("modified after it was built"), "{e}");
        // No digest yet: sealed on first use, then checked.
        let g = d.path().join("vmlinux");
        std::fs::write(&g, b"kernel").expect("write");
        verify(&g).expect("first use");
        assert!(digest_path(&g).is_file());
    }
}
