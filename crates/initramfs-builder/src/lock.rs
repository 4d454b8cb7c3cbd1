//! An exclusive advisory lock on a file, released on drop (serialises concurrent builders).

use std::fs::{File, OpenOptions};
use std::path::Path;

/// Holds an exclusive `flock` until dropped.
pub struct FileLock {
    _lock: nix::fcntl::Flock<File>,
}

impl FileLock {
    /// Blocks until the lock on `path` (created if missing) is ours.
    pub fn acquire(path: &Path) -> std::io::Result<Self> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))?;
        Ok(FileLock { _lock: lock })
    }
}
