//! `cloude-server`: the HTTP API that runs each request in its own fresh micro-VM.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod artifacts;
pub mod cli;
pub mod config;
pub mod executor;
pub mod limiter;
pub mod metrics;
pub mod serve;
pub mod vm;
