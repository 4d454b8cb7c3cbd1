//! `cloude-server`: the HTTP API that runs each request in its own fresh micro-VM.
// Unsafe code only where the tcp transport talks to the kernel directly (`vm::net`'s tap ioctls
// and the hypervisor's fd inheritance in `vm::inherit_fds`; `agent::fill_random`), each block with
// its SAFETY note.
#![deny(unsafe_code)]

pub mod agent;
pub mod api;
pub mod artifacts;
pub mod cli;
pub mod config;
pub mod executor;
pub mod judge0;
pub mod limiter;
pub mod metrics;
pub mod pool;
pub mod sandbox;
pub mod serve;
pub mod snapshots;
pub mod store;
pub mod vm;
