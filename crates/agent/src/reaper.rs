//! The one place that calls `wait`. As PID 1 it reaps every zombie (orphans re-parented to it
//! included) and hands the exit status of the children the executor started to whoever
//! registered them. Outside PID 1 it only waits for registered children, so it never steals
//! another part of the process's children.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::sync::oneshot;

use crate::sys::{self, Waited};

/// Upper bound on the time between a child's exit and its collection if a SIGCHLD is missed.
const SAFETY_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("cannot install the SIGCHLD handler")]
    Install(#[source] std::io::Error),
    #[error("cannot start the process")]
    Spawn(#[source] std::io::Error),
}

/// Process-wide child reaper; see [`Reaper::global`].
pub struct Reaper {
    waiting: Mutex<HashMap<i32, oneshot::Sender<Waited>>>,
    reap_all: AtomicBool,
}

static GLOBAL: OnceLock<Result<Reaper, String>> = OnceLock::new();

impl Reaper {
    /// The reaper of this process, started on first use.
    pub fn global() -> Result<&'static Reaper, ReaperError> {
        let r = GLOBAL.get_or_init(|| {
            let pipe = sys::install_sigchld_pipe().map_err(|e| e.to_string())?;
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || reaper_loop(pipe))
                .map_err(|e| e.to_string())?;
            Ok(Reaper {
                waiting: Mutex::new(HashMap::new()),
                reap_all: AtomicBool::new(false),
            })
        });
        r.as_ref()
            .map_err(|e| ReaperError::Install(std::io::Error::other(e.clone())))
    }

    /// Makes the reaper collect every child, registered or not (PID 1 duty).
    pub fn reap_all_children(&self) {
        self.reap_all.store(true, Ordering::Relaxed);
    }

    /// Spawns `cmd` and registers it before the reaper can see its exit.
    pub fn spawn(
        &self,
        cmd: &mut Command,
    ) -> Result<(Child, oneshot::Receiver<Waited>), ReaperError> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn().map_err(ReaperError::Spawn)?;
        let (tx, rx) = oneshot::channel();
        let pid = i32::try_from(child.id()).expect("pids fit in i32");
        waiting.insert(pid, tx);
        Ok((child, rx))
    }

    fn collect(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if self.reap_all.load(Ordering::Relaxed) {
            while let Ok(Some(w)) = sys::wait4_nohang(-1) {
                if let Some(tx) = waiting.remove(&w.pid) {
                    let _ = tx.send(w);
                }
            }
        } else {
            let pids: Vec<i32> = waiting.keys().copied().collect();
            for pid in pids {
                match sys::wait4_nohang(pid) {
                    Ok(Some(w)) => {
                        if let Some(tx) = waiting.remove(&pid) {
                            let _ = tx.send(w);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(pid, "wait4 failed: {e}");
                        waiting.remove(&pid);
                    }
                }
            }
        }
    }
}

fn reaper_loop(pipe: OwnedFd) {
    let mut buf = [0u8; 64];
    loop {
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(SAFETY_POLL).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut fds, timeout);
        while matches!(nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&pipe), &mut buf), Ok(n) if n > 0)
        {
        }
        if let Ok(r) = Reaper::global() {
            r.collect();
        }
    }
}
