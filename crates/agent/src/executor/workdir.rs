//! The per-request work directory: created fresh, filled with the request's files, owned by
//! the unprivileged user, removed afterwards.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use cloude_protocol::{validate_file_name, FileSpec, ProtocolError};

#[derive(Debug, thiserror::Error)]
pub enum WorkDirError {
    #[error(transparent)]
    Invalid(#[from] ProtocolError),
    #[error("cannot prepare the work directory {0}")]
    Io(PathBuf, #[source] std::io::Error),
}

/// A work directory removed on drop.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Creates `root/name` (mode 0700, owned by `uid:gid`) and writes `files` into it.
    pub fn create(
        root: &Path,
        name: &str,
        files: &[FileSpec],
        uid: u32,
        gid: u32,
    ) -> Result<Self, WorkDirError> {
        // Validate and decode everything before touching the file system.
        let mut decoded = Vec::with_capacity(files.len());
        for f in files {
            validate_file_name(&f.name)?;
            decoded.push((f.name.as_str(), f.bytes()?));
        }
        let path = root.join(name);
        let io = |p: &Path, e| WorkDirError::Io(p.to_path_buf(), e);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| io(&path, e))?;
        let wd = WorkDir { path };
        chown(&wd.path, uid, gid).map_err(|e| io(&wd.path, e))?;
        for (name, bytes) in decoded {
            let target = wd.path.join(name);
            // Create parent directories one by one so that each is owned by the user.
            let mut dir = wd.path.clone();
            if let Some(parent) = Path::new(name).parent() {
                for part in parent.components() {
                    dir.push(part);
                    match fs::DirBuilder::new().mode(0o755).create(&dir) {
                        Ok(()) => chown(&dir, uid, gid).map_err(|e| io(&dir, e))?,
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {
                        }
                        Err(e) => return Err(io(&dir, e)),
                    }
                }
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o755)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)
                .map_err(|e| io(&target, e))?;
            f.write_all(&bytes).map_err(|e| io(&target, e))?;
            chown(&target, uid, gid).map_err(|e| io(&target, e))?;
        }
        Ok(wd)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!("cannot remove work directory {}: {e}", self.path.display());
        }
    }
}

/// `chown` that is a no-op when we are not root (host tests as a normal user).
fn chown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloude_protocol::Encoding;

    fn file(name: &str, content: &str, encoding: Encoding) -> FileSpec {
        FileSpec {
            name: name.into(),
            content: content.into(),
            encoding,
        }
    }

    #[test]
    fn writes_nested_and_binary_files_then_cleans_up() {
        let root = tempfile::tempdir().expect("tempdir");
        let files = [
            file("a.txt", "hello", Encoding::Utf8),
            file("src/deep/b.bin", "AP8=", Encoding::Base64),
            file("src/c.txt", "c", Encoding::Utf8),
        ];
        let path;
        {
            let wd = WorkDir::create(root.path(), "job", &files, 1000, 1000).expect("create");
            path = wd.path().to_path_buf();
            assert_eq!(fs::read(path.join("a.txt")).expect("read"), b"hello");
            assert_eq!(
                fs::read(path.join("src/deep/b.bin")).expect("read"),
                [0u8, 255]
            );
        }
        assert!(!path.exists(), "removed on drop");
    }

    #[test]
    fn rejects_bad_names_before_writing() {
        let root = tempfile::tempdir().expect("tempdir");
        for bad in ["../escape", "/abs", "a//b", "x\u{1}y"] {
            let err = WorkDir::create(root.path(), "job", &[file(bad, "x", Encoding::Utf8)], 0, 0)
                .expect_err(bad);
            assert!(matches!(err, WorkDirError::Invalid(_)), "{bad}: {err}");
        }
        assert!(!root.path().join("job").exists());
        assert!(!root
            .path()
            .parent()
            .expect("parent")
            .join("escape")
            .exists());
    }
}
