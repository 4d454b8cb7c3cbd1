//! A VM restored from a snapshot becomes a new machine before it runs anything: fresh entropy
//! from the host mixed into the kernel's pool and the CRNG reseeded (clones of one snapshot
//! would otherwise hand out the same random bytes), the clock set to the host's, the hostname
//! re-applied. The host sends this as `POST /v1/wake` (`cloude_protocol::WakeRequest`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloude_protocol::{WakeRequest, WakeResponse};
use nix::time::{clock_settime, ClockId};

/// Why a wake failed (each leaves the VM refusing runs).
#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    #[error("cannot reseed the kernel's random number generator: {0}")]
    Reseed(std::io::Error),
    #[error("cannot set the clock: {0}")]
    Clock(nix::Error),
    #[error("cannot set the hostname: {0}")]
    Hostname(nix::Error),
}

/// Applies a validated wake request. Only PID 1 owns the machine: an agent run on a host (tests,
/// `cloude-agent serve`) touches neither its RNG nor its clock and answers `reseeded: false`.
pub fn apply(req: &WakeRequest) -> Result<WakeResponse, WakeError> {
    if std::process::id() != 1 {
        return Ok(WakeResponse {
            reseeded: false,
            clock_skew_ms: 0,
        });
    }
    crate::sys::add_entropy_and_reseed(&req.entropy.0).map_err(WakeError::Reseed)?;
    let host = Duration::from_nanos(req.unix_time_ns);
    let guest = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let skew_ms = i64::try_from(guest.as_millis()).unwrap_or(i64::MAX)
        - i64::try_from(host.as_millis()).unwrap_or(i64::MAX);
    let ts = nix::sys::time::TimeSpec::from_duration(host);
    clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(WakeError::Clock)?;
    nix::unistd::sethostname(&req.hostname).map_err(WakeError::Hostname)?;
    Ok(WakeResponse {
        reseeded: true,
        clock_skew_ms: skew_ms,
    })
}
