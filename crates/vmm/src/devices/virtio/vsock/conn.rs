//! One vsock stream connection: the host-side Unix stream plus credit accounting both ways.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use super::packet::{peer_credit, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Receive buffer we advertise to the guest per connection; guest data that the host side has
/// not taken yet is held in memory up to this much, and a guest that sends more is reset.
pub const CONN_BUF_SIZE: u32 = 256 << 10;
/// Send a credit update once this many forwarded bytes have not been reported to the guest.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 2;

/// Connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// Errors that reset the connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("the guest overran its credit")]
    CreditOverrun,
    #[error("host socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// A connection.
pub struct Conn {
    pub stream: UnixStream,
    pub state: State,
    /// Guest data waiting for the host socket to accept it (bounded by [`CONN_BUF_SIZE`]).
    pending: Vec<u8>,
    /// Guest bytes delivered to the host socket.
    pub fwd_cnt: u32,
    /// `fwd_cnt` last told to the guest.
    pub fwd_cnt_sent: u32,
    /// Peer (guest) receive buffer and its forwarded count.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub rx_cnt: u32,
    /// The host socket may have data (edge-triggered epoll said so and we have not drained it).
    pub readable: bool,
    /// Shutdown flags the guest sent.
    pub peer_shutdown: u32,
    /// The host side reached EOF (we told the guest with SHUTDOWN).
    pub local_eof: bool,
    /// We asked the guest for credit and are waiting.
    pub credit_requested: bool,
}

impl Conn {
    /// Wraps a non-blocking stream.
    pub fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            pending: Vec::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            readable: false,
            peer_shutdown: 0,
            local_eof: false,
            credit_requested: false,
        }
    }

    /// Records the guest's credit fields from any packet it sent.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
        if self.credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Bytes we may send to the guest now.
    pub fn credit(&self) -> u32 {
        peer_credit(self.peer_buf_alloc, self.peer_fwd_cnt, self.rx_cnt)
    }

    /// Guest data for the host socket: written now if possible, else held.
    pub fn send_to_host(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.pending.len() + data.len() > CONN_BUF_SIZE as usize {
            return Err(ConnError::CreditOverrun);
        }
        if self.pending.is_empty() {
            let n = write_some(&mut self.stream, data)?;
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
            self.pending.extend_from_slice(&data[n..]);
        } else {
            self.pending.extend_from_slice(data);
        }
        Ok(())
    }

    /// Writes held data; true when nothing is left.
    pub fn flush(&mut self) -> Result<bool, ConnError> {
        if !self.pending.is_empty() {
            let n = write_some(&mut self.stream, &self.pending)?;
            self.pending.drain(..n);
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        }
        let empty = self.pending.is_empty();
        if empty && self.peer_shutdown & SHUTDOWN_SEND != 0 {
            // The guest will send nothing more: pass the half-close on.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(empty)
    }

    /// Guest bytes held for the host socket.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// True when the guest should hear about freed buffer space.
    pub fn wants_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// True once both sides are done and all guest data reached the host.
    pub fn finished(&self) -> bool {
        self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && self.pending.is_empty()
    }

    /// True when host data may flow to the guest now.
    pub fn can_send_to_guest(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.local_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Reads host data for the guest. `Ok(None)`: would block. `Ok(Some(0))`: EOF.
    pub fn read_for_guest(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ConnError> {
        loop {
            match self.stream.read(buf) {
                Ok(n) => {
                    self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(None);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Non-blocking write of as much as the socket takes.
pub fn write_some(stream: &mut UnixStream, data: &[u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        (Conn::new(a, State::Established), b)
    }

    #[test]
    fn overrun_is_refused_and_flush_counts() {
        let (mut c, mut peer) = pair();
        c.send_to_host(b"hello").expect("send");
        assert_eq!(c.fwd_cnt, 5);
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hello");
        // Fill the socket so data is held, then overrun the advertised buffer.
        let big = vec![1u8; CONN_BUF_SIZE as usize];
        c.send_to_host(&big).expect("within credit");
        assert!(matches!(
            c.send_to_host(&big),
            Err(ConnError::CreditOverrun)
        ));
        assert!(c.wants_credit_update());
    }

    #[test]
    fn credit_and_eof() {
        let (mut c, peer) = pair();
        c.update_peer_credit(100, 0);
        assert_eq!(c.credit(), 100);
        drop(peer);
        let mut buf = [0u8; 8];
        assert_eq!(c.read_for_guest(&mut buf).expect("eof"), Some(0));
    }
}
