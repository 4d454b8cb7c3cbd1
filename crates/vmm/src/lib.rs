//! `cloude-vmm`: a small KVM virtual machine monitor that boots one Linux micro-VM per process,
//! with a serial console, i8042 reset, virtio-blk disks on host files, virtio-rng, virtio-vsock
//! (hybrid, over Unix sockets) and virtio-net on a tap device. The guest is untrusted: see
//! `devices::virtio::queue`.

pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod seccomp;
pub mod snapshot;
pub mod stats;
pub mod vstate;

use std::io::Write;
use std::time::Instant;

use clap::Parser;

/// Runs the VMM command line; returns the process exit status.
pub fn main_with_args(started: Instant) -> i32 {
    let cli = config::Cli::parse();
    let cfg = match cli.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cloude-vmm: {e}");
            return 2;
        }
    };
    let outcome = builder::run(&cfg, started);
    let _ = std::io::stdout().flush();
    match outcome {
        Ok(vstate::VmExit::Stopped(_)) => 0,
        Ok(vstate::VmExit::Failed(msg)) => {
            eprintln!("cloude-vmm: {msg}");
            1
        }
        Err(e @ builder::BuildError::Refused(_)) => {
            eprintln!("cloude-vmm: {e}");
            snapshot::REFUSED_EXIT
        }
        Err(e) => {
            eprintln!("cloude-vmm: {e}");
            1
        }
    }
}
