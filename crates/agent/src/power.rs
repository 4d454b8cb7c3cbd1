//! Ending the VM after its one request: `sync`, a short grace so the last bytes leave the
//! virtqueues, then `reboot(RB_AUTOBOOT)` (the server boots the kernel with `reboot=t`, a triple
//! fault; `cloude-vmm`'s own default is `reboot=k`; the VMM and QEMU exit on reset). Only ever done as PID 1, whatever the flags say.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};

/// Pause between the end of the response and the reset, so queued bytes reach the host.
pub const GRACE: Duration = Duration::from_millis(100);
/// Reboot this long after a `poweroff_after` run even if its connection never closes.
pub const FALLBACK: Duration = Duration::from_secs(10);

static STARTED: AtomicBool = AtomicBool::new(false);

/// Whether this process may reset the machine at all.
pub fn allowed() -> bool {
    std::process::id() == 1
}

/// Syncs and resets the machine (never returns when it works).
pub async fn power_off(enabled: bool) {
    if !enabled || !allowed() {
        tracing::info!("poweroff_after requested; not powering off (not PID 1 or disabled)");
        return;
    }
    if STARTED.swap(true, Ordering::SeqCst) {
        return;
    }
    nix::unistd::sync();
    tokio::time::sleep(GRACE).await;
    reset_now();
}

/// Syncs and resets right away (fatal errors of PID 1 end here too).
pub fn reset_now() {
    if !allowed() {
        return;
    }
    nix::unistd::sync();
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("cloude-agent: reboot failed: {e}");
}

/// Schedules a power-off in [`FALLBACK`] in case the connection that asked for it stays open.
pub fn arm_fallback(enabled: bool) {
    if !enabled || !allowed() {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(FALLBACK).await;
        tracing::warn!("connection still open; powering off anyway");
        power_off(true).await;
    });
}
