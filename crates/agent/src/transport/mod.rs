//! Byte streams the HTTP server runs over: vsock, virtio-serial and TCP.

mod fd_stream;
pub mod serial;
pub mod tcp;
pub mod vsock;

pub use fd_stream::FdStream;
