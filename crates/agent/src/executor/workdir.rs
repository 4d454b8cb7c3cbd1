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

/// Most entries (files, directories, links) a compiled work directory may hold to be copied
/// for each test case.
pub const MAX_COPY_ENTRIES: usize = 20_000;
/// Most bytes of files a compiled work directory may hold to be copied for each test case.
pub const MAX_COPY_BYTES: u64 = 512 << 20;

/// A work directory removed on drop.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    /// Where [`WorkDir::freeze`] keeps the compiled state that every test case starts from.
    pristine: Option<PathBuf>,
    uid: u32,
    gid: u32,
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
        let wd = WorkDir {
            path,
            pristine: None,
            uid,
            gid,
        };
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

    /// Keeps the directory as it is now (after the compile stage) aside, so that each test
    /// case can start from a fresh copy of it at the same path ([`WorkDir::fresh_copy`]).
    pub fn freeze(&mut self) -> Result<(), WorkDirError> {
        let mut name = self.path.clone().into_os_string();
        name.push(".compiled");
        let pristine = PathBuf::from(name);
        fs::rename(&self.path, &pristine).map_err(|e| WorkDirError::Io(self.path.clone(), e))?;
        self.pristine = Some(pristine);
        Ok(())
    }

    /// Replaces the work directory with a fresh copy of the frozen one. Only what the program's
    /// user owns is copied (the copy runs as root: a hard link the program made to a file it
    /// cannot read must not become a readable copy); sockets, FIFOs and devices are left out.
    pub fn fresh_copy(&self) -> Result<(), WorkDirError> {
        let Some(pristine) = &self.pristine else {
            return Ok(());
        };
        self.clear();
        let mut budget = CopyBudget {
            entries: MAX_COPY_ENTRIES,
            bytes: MAX_COPY_BYTES,
        };
        copy_dir(pristine, &self.path, self.uid, self.gid, &mut budget).inspect_err(|_| {
            self.clear();
        })
    }

    /// Removes the work directory (the frozen copy stays).
    pub fn clear(&self) {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove work directory {}: {e}", self.path.display()),
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        for p in std::iter::once(&self.path).chain(self.pristine.as_ref()) {
            match fs::remove_dir_all(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot remove work directory {}: {e}", p.display()),
            }
        }
    }
}

struct CopyBudget {
    entries: usize,
    bytes: u64,
}

impl CopyBudget {
    fn take(&mut self, bytes: u64, at: &Path) -> Result<(), WorkDirError> {
        if self.entries == 0 || self.bytes < bytes {
            return Err(WorkDirError::Io(
                at.to_path_buf(),
                std::io::Error::other(format!(
                    "the compiled work directory is too large to copy for each test case \
                     (at most {MAX_COPY_ENTRIES} entries and {MAX_COPY_BYTES} bytes)"
                )),
            ));
        }
        self.entries -= 1;
        self.bytes -= bytes;
        Ok(())
    }
}

/// The owner check of [`WorkDir::fresh_copy`]: root's own runs may copy anything.
fn owned(meta: &fs::Metadata, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    uid == 0 || meta.uid() == uid
}

fn copy_dir(
    from: &Path,
    to: &Path,
    uid: u32,
    gid: u32,
    budget: &mut CopyBudget,
) -> Result<(), WorkDirError> {
    use std::os::unix::fs::PermissionsExt as _;
    let io = |p: &Path, e| WorkDirError::Io(p.to_path_buf(), e);
    let meta = fs::symlink_metadata(from).map_err(|e| io(from, e))?;
    fs::DirBuilder::new()
        .mode(meta.permissions().mode() & 0o7777 | 0o700)
        .create(to)
        .map_err(|e| io(to, e))?;
    chown(to, uid, gid).map_err(|e| io(to, e))?;
    for entry in fs::read_dir(from).map_err(|e| io(from, e))? {
        let entry = entry.map_err(|e| io(from, e))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = fs::symlink_metadata(&src).map_err(|e| io(&src, e))?;
        let kind = meta.file_type();
        if !owned(&meta, uid) {
            tracing::debug!("{} is not the program's: not copied", src.display());
            continue;
        }
        if kind.is_dir() {
            budget.take(0, &src)?;
            copy_dir(&src, &dst, uid, gid, budget)?;
        } else if kind.is_symlink() {
            budget.take(0, &src)?;
            let target = fs::read_link(&src).map_err(|e| io(&src, e))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(|e| io(&dst, e))?;
            lchown(&dst, uid, gid).map_err(|e| io(&dst, e))?;
        } else if kind.is_file() {
            let mut input = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&src)
                .map_err(|e| io(&src, e))?;
            // The descriptor's own facts, not the path's: the file checked is the file read.
            let opened = input.metadata().map_err(|e| io(&src, e))?;
            if !opened.is_file() || !owned(&opened, uid) {
                continue;
            }
            budget.take(opened.len(), &src)?;
            let mut output = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(opened.permissions().mode() & 0o777)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&dst)
                .map_err(|e| io(&dst, e))?;
            // At most what was counted, even if the file grew meanwhile.
            std::io::copy(
                &mut std::io::Read::take(&mut input, opened.len()),
                &mut output,
            )
            .map_err(|e| io(&dst, e))?;
            chown(&dst, uid, gid).map_err(|e| io(&dst, e))?;
        }
    }
    Ok(())
}

/// Removes every entry directly in `dir` that belongs to `uid` (what a program left in a shared
/// scratch directory), without following links. Called only once the program's processes are
/// gone, so nothing races the removal.
pub fn remove_owned_entries(dir: &Path, uid: u32) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.uid() != uid {
            continue;
        }
        let r = if meta.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(e) = r {
            tracing::warn!("cannot remove {} between test cases: {e}", path.display());
        }
    }
}

fn lchown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
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
    fn frozen_directory_gives_each_case_a_fresh_copy() {
        let root = tempfile::tempdir().expect("tempdir");
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let files = [
            file("main.sh", "echo", Encoding::Utf8),
            file("lib/x.txt", "x", Encoding::Utf8),
        ];
        let pristine;
        {
            let mut wd = WorkDir::create(root.path(), "job", &files, uid, gid).expect("create");
            std::os::unix::fs::symlink("/etc/hostname", wd.path().join("link")).expect("link");
            wd.freeze().expect("freeze");
            pristine = root.path().join("job.compiled");
            assert!(pristine.is_dir() && !wd.path().exists());
            for _ in 0..2 {
                wd.fresh_copy().expect("copy");
                let p = wd.path();
                assert_eq!(fs::read(p.join("lib/x.txt")).expect("read"), b"x");
                assert_eq!(
                    fs::read_link(p.join("link")).expect("link"),
                    Path::new("/etc/hostname")
                );
                // What a case writes is gone for the next one.
                assert!(!p.join("scratch").exists());
                fs::write(p.join("scratch"), "dirty").expect("write");
                fs::write(p.join("lib/x.txt"), "changed").expect("write");
            }
            assert_eq!(fs::read(pristine.join("lib/x.txt")).expect("read"), b"x");
        }
        assert!(!pristine.exists() && !root.path().join("job").exists());
    }

    #[test]
    fn scratch_entries_of_the_user_only_are_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let me = nix::unistd::geteuid().as_raw();
        fs::write(root.path().join("mine"), "x").expect("write");
        fs::create_dir_all(root.path().join("dir/deep")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", root.path().join("link")).expect("link");
        remove_owned_entries(root.path(), me + 1);
        assert_eq!(
            fs::read_dir(root.path()).expect("ls").count(),
            3,
            "not theirs"
        );
        remove_owned_entries(root.path(), me);
        assert_eq!(fs::read_dir(root.path()).expect("ls").count(), 0);
        assert!(
            Path::new("/etc").is_dir(),
            "links are removed, not followed"
        );
    }

    #[test]
    fn copies_are_bounded() {
        let root = tempfile::tempdir().expect("tempdir");
        let src = root.path().join("src");
        fs::create_dir(&src).expect("mkdir");
        for i in 0..5 {
            fs::write(src.join(format!("f{i}")), "0123456789").expect("write");
        }
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let mut few = CopyBudget {
            entries: 3,
            bytes: u64::MAX,
        };
        let e = copy_dir(&src, &root.path().join("a"), uid, gid, &mut few).expect_err("entries");
        let why = std::error::Error::source(&e).map(|s| s.to_string());
        assert!(
            why.as_deref().is_some_and(|w| w.contains("too large")),
            "{e}: {why:?}"
        );
        let mut small = CopyBudget {
            entries: 100,
            bytes: 25,
        };
        assert!(copy_dir(&src, &root.path().join("b"), uid, gid, &mut small).is_err());
        let mut enough = CopyBudget {
            entries: 5,
            bytes: 50,
        };
        copy_dir(&src, &root.path().join("c"), uid, gid, &mut enough).expect("fits");
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
