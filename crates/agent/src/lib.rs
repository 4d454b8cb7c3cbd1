//! Cloude guest agent: PID 1 of every micro-VM. It mounts what programs need, announces
//! readiness, serves the host's HTTP API on vsock / TCP / virtio-serial and runs one program
//! at a time as an unprivileged user, in its own session and cgroup, with limits.
// `unsafe` is denied everywhere but in `sys`, which documents each block.
#![deny(unsafe_code)]

pub mod cgroup;
pub mod cli;
pub mod executor;
pub mod files;
pub mod guest;
pub mod init;
pub mod interactive;
pub mod logging;
pub mod output;
pub mod power;
pub mod procs;
pub mod pty;
pub mod reaper;
pub mod serve;
pub mod server;
pub mod transport;
pub mod wake;

pub mod sys;
