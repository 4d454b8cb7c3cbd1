//! A CPU budget for the device thread.
//!
//! Every virtio device bounds the chains it handles per wake-up and re-kicks itself for the rest,
//! so that one device cannot starve the others. A hostile guest kernel can still keep the device
//! thread busy at almost no cost to itself: it bumps a ring's `avail.idx` over the same
//! descriptors, and the device re-kicks itself batch after batch. The [`Pacer`] makes that cost
//! bounded: after each round of events it compares the thread's CPU time with the wall time of
//! the current window, and when the thread has used more than [`DEVICE_CPU_SHARE`] of one core
//! it sleeps the difference. A well-behaved guest never reaches the budget (the agent's traffic
//! needs a few per cent); the jail's CPU limit on the whole process stays the backstop.
#![allow(unsafe_code)]

use std::time::Duration;

/// Most of one core the device thread may use, averaged over a [`WINDOW`].
pub const DEVICE_CPU_SHARE: f64 = 0.5;
/// The averaging window; a new one starts when it has passed.
pub const WINDOW: Duration = Duration::from_millis(100);

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which lives across the call.
    unsafe { libc::clock_gettime(id, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of the calling thread.
pub fn thread_cpu() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn now() -> Duration {
    clock(libc::CLOCK_MONOTONIC)
}

/// Duty-cycle limiter for the calling thread (create and use it on the same thread).
pub struct Pacer {
    share: f64,
    wall0: Duration,
    cpu0: Duration,
    /// Total time slept for the budget (for tests and statistics).
    pub throttled: Duration,
}

impl Pacer {
    /// A pacer allowing `share` (0 < share ≤ 1) of one core.
    pub fn new(share: f64) -> Self {
        Self {
            share: share.clamp(0.01, 1.0),
            wall0: now(),
            cpu0: thread_cpu(),
            throttled: Duration::ZERO,
        }
    }

    /// Called after each round of work: sleeps when the thread is over its budget.
    pub fn after_work(&mut self) {
        let (wall, cpu) = (now(), thread_cpu());
        let elapsed = wall.saturating_sub(self.wall0);
        let used = cpu.saturating_sub(self.cpu0);
        // Wall time the used CPU is allowed to take at this share.
        let allowed = used.div_f64(self.share);
        if allowed > elapsed {
            let pause = allowed - elapsed;
            std::thread::sleep(pause);
            self.throttled += pause;
        }
        if elapsed >= WINDOW {
            self.wall0 = now();
            self.cpu0 = thread_cpu();
        }
    }
}

/// The device thread's loop: handles events (waiting up to `timeout_ms` for them, -1 for ever)
/// and keeps to [`DEVICE_CPU_SHARE`] of a core, while `keep_going` says so. Returns the pacer.
pub fn device_loop<T: event_manager::MutEventSubscriber>(
    events: &mut event_manager::EventManager<T>,
    timeout_ms: i32,
    mut keep_going: impl FnMut() -> bool,
) -> Pacer {
    let mut pacer = Pacer::new(DEVICE_CPU_SHARE);
    while keep_going() {
        if let Err(e) = events.run_with_timeout(timeout_ms) {
            eprintln!("cloude-vmm: device event loop error: {e:?}");
        }
        pacer.after_work();
    }
    pacer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_is_held_to_its_share() {
        let start = now();
        let cpu_start = thread_cpu();
        let mut p = Pacer::new(0.3);
        while now() - start < Duration::from_millis(1500) {
            // 2 ms of pure CPU per round, as a device thread flooded with work.
            let t = thread_cpu();
            while thread_cpu() - t < Duration::from_millis(2) {}
            p.after_work();
        }
        let wall = (now() - start).as_secs_f64();
        let cpu = (thread_cpu() - cpu_start).as_secs_f64();
        assert!(cpu / wall < 0.36, "used {:.2} of a core", cpu / wall);
        assert!(
            cpu / wall > 0.2,
            "still works at its share ({:.2})",
            cpu / wall
        );
        assert!(p.throttled > Duration::from_millis(500));
    }

    #[test]
    fn a_light_thread_never_sleeps() {
        let mut p = Pacer::new(DEVICE_CPU_SHARE);
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(2));
            p.after_work();
        }
        assert_eq!(p.throttled, Duration::ZERO);
    }
}
