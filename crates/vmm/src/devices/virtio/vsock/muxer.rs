//! Host side of the hybrid vsock: the Unix listener with its `CONNECT <port>` handshake, the
//! guest-initiated connections to `<uds>_<port>`, and the packets queued for the guest.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use super::conn::{write_some, Conn, State, CONN_BUF_SIZE};
use super::packet::*;

/// Most open connections plus pending handshakes.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most control packets waiting for guest RX buffers (beyond this, resets for unknown
/// connections are dropped).
pub const MAX_CONTROL_PACKETS: usize = 4 * MAX_CONNECTIONS;
/// Hard cap on the control queue. Past [`MAX_CONTROL_PACKETS`] only packets for known
/// connections are queued, and those are coalesced (at most one pending credit update each), so
/// a guest that repeats CREDIT_REQUEST without posting RX buffers cannot grow the queue.
pub const MAX_CONTROL_QUEUE: usize = MAX_CONTROL_PACKETS + 4 * MAX_CONNECTIONS;
/// Most guest data held, over all connections together, for host sockets that do not take it.
/// Each connection may hold [`CONN_BUF_SIZE`], but a guest that opens [`MAX_CONNECTIONS`] to a
/// host listener that does not read would otherwise pin 256 MiB of VMM memory; past this budget
/// the connection whose data does not fit is reset (a legitimate agent uses one or two).
pub const MAX_PENDING_TOTAL: usize = 16 << 20;
/// Longest `CONNECT <port>\n` line accepted from a host client.
pub const MAX_HANDSHAKE_LINE: usize = 32;
/// First local port handed to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// (host port, guest port).
type Key = (u32, u32);

enum Owner {
    Handshake(UnixStream, Vec<u8>),
    Conn(Key),
}

/// The connection multiplexer.
pub struct Muxer {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    fds: HashMap<RawFd, Owner>,
    conns: HashMap<Key, Conn>,
    control: VecDeque<(Key, u16, u32)>,
    /// Connections with a credit update already in `control` (coalescing).
    pending_updates: HashSet<Key>,
    rx_queue: VecDeque<Key>,
    /// Sum of every connection's held guest data (bounded by [`MAX_PENDING_TOTAL`]).
    pending_total: usize,
    next_port: u32,
    added: Vec<RawFd>,
    dead: Vec<UnixStream>,
}

impl Muxer {
    /// Binds the host listener at `uds` (replacing a stale socket file).
    pub fn new(cid: u64, uds: &Path) -> std::io::Result<Self> {
        match std::fs::remove_file(uds) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(uds)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            cid,
            uds: uds.to_path_buf(),
            listener,
            fds: HashMap::new(),
            conns: HashMap::new(),
            control: VecDeque::new(),
            pending_updates: HashSet::new(),
            rx_queue: VecDeque::new(),
            pending_total: 0,
            next_port: FIRST_HOST_PORT,
            added: Vec::new(),
            dead: Vec::new(),
        })
    }

    /// Moves host port allocation to a window derived from `seed` (a restored VM uses its own
    /// process id, so that its ports differ from those of the snapshotted process).
    pub fn set_port_base(&mut self, seed: u32) {
        // Windows 1 to 2^14-1 of 2^16 ports from FIRST_HOST_PORT (a booted VM uses window 0).
        self.next_port = FIRST_HOST_PORT + ((1 + seed % ((1 << 14) - 1)) << 16);
    }

    /// The listener, for the event loop.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Guest data held for host sockets, over all connections.
    pub fn pending_total(&self) -> usize {
        self.pending_total
    }

    /// Fds to start watching (each with IN|OUT|RDHUP, edge-triggered).
    pub fn take_added(&mut self) -> Vec<RawFd> {
        std::mem::take(&mut self.added)
    }

    /// Closed streams to stop watching before they are dropped.
    pub fn take_dead(&mut self) -> Vec<UnixStream> {
        std::mem::take(&mut self.dead)
    }

    /// True when something waits for a guest RX buffer.
    pub fn has_work(&self) -> bool {
        !self.control.is_empty() || !self.rx_queue.is_empty()
    }

    fn push_control(&mut self, key: Key, op: u16, flags: u32) {
        let known = op != OP_RST && self.conns.contains_key(&key);
        if op == OP_CREDIT_UPDATE && self.pending_updates.contains(&key) {
            // One pending update says it all: the header is filled in when it is sent.
            return;
        }
        if self.control.len() < MAX_CONTROL_PACKETS
            || (known && self.control.len() < MAX_CONTROL_QUEUE)
        {
            if op == OP_CREDIT_UPDATE {
                self.pending_updates.insert(key);
            }
            self.control.push_back((key, op, flags));
        }
    }

    /// The next queued control packet.
    fn pop_control(&mut self) -> Option<(Key, u16, u32)> {
        let next = self.control.pop_front();
        if let Some((key, OP_CREDIT_UPDATE, _)) = next {
            self.pending_updates.remove(&key);
        }
        next
    }

    fn want_rx(&mut self, key: Key) {
        if !self.rx_queue.contains(&key) {
            self.rx_queue.push_back(key);
        }
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.pending_total -= c.pending_len();
            self.fds.remove(&c.stream.as_raw_fd());
            self.dead.push(c.stream);
        }
    }

    fn kill(&mut self, key: Key) {
        self.remove(key);
        self.push_control(key, OP_RST, 0);
    }

    fn header(&mut self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&key) {
            Some(c) => {
                c.fwd_cnt_sent = c.fwd_cnt;
                (CONN_BUF_SIZE, c.fwd_cnt)
            }
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// Handles one packet from the guest (already structurally checked).
    pub fn handle_guest_packet(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if check_addressing(h, self.cid).is_err() {
            if h.op != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            match h.op {
                OP_REQUEST => self.guest_connect(key, h),
                OP_RST => {}
                _ => self.push_control(key, OP_RST, 0),
            }
            return;
        };
        c.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        if c.can_send_to_guest() && c.credit() > 0 {
            self.want_rx(key);
        }
        let c = self.conns.get_mut(&key).expect("looked up above");
        match h.op {
            OP_RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                c.readable = true;
                let line = cloude_protocol::vmm_wire::connected_line(key.0);
                match write_some(&mut c.stream, line.as_bytes()) {
                    Ok(n) if n == line.len() => self.want_rx(key),
                    _ => self.kill(key),
                }
            }
            OP_RW if c.state == State::Established => {
                let before = c.pending_len();
                let sent = c.send_to_host(payload);
                self.pending_total = self.pending_total - before + c.pending_len();
                match sent {
                    Ok(()) if self.pending_total > MAX_PENDING_TOTAL => self.kill(key),
                    Ok(()) if c.wants_credit_update() => {
                        self.push_control(key, OP_CREDIT_UPDATE, 0)
                    }
                    Ok(()) => {}
                    Err(_) => self.kill(key),
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.push_control(key, OP_CREDIT_UPDATE, 0),
            OP_SHUTDOWN => {
                c.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                let before = c.pending_len();
                let flushed = c.flush();
                self.pending_total = self.pending_total - before + c.pending_len();
                match flushed {
                    Ok(_) if c.finished() => self.kill(key),
                    Ok(_) => {}
                    Err(_) => self.kill(key),
                }
            }
            OP_RST => self.remove(key),
            _ => self.kill(key),
        }
    }

    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.fds.len() >= MAX_CONNECTIONS {
            self.push_control(key, OP_RST, 0);
            return;
        }
        let path = format!("{}_{}", self.uds.display(), h.dst_port);
        // Non-blocking from the start: a host listener with a full backlog refuses at once
        // (EAGAIN) instead of blocking the device thread and every vCPU exit behind it.
        let stream = match connect_nonblocking(std::path::Path::new(&path)) {
            Ok(s) => s,
            Err(_) => {
                self.push_control(key, OP_RST, 0);
                return;
            }
        };
        let mut c = Conn::new(stream, State::Established);
        c.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        let fd = c.stream.as_raw_fd();
        self.conns.insert(key, c);
        self.fds.insert(fd, Owner::Conn(key));
        self.added.push(fd);
        self.push_control(key, OP_RESPONSE, 0);
    }

    /// Accepts every pending host client.
    pub fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.fds.len() >= MAX_CONNECTIONS || s.set_nonblocking(true).is_err() {
                        continue; // dropping closes it: the client sees EOF
                    }
                    let fd = s.as_raw_fd();
                    self.fds.insert(fd, Owner::Handshake(s, Vec::new()));
                    self.added.push(fd);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    /// Handles readiness of a connection or handshake fd.
    pub fn on_fd(&mut self, fd: RawFd, ev: EventSet) {
        match self.fds.get_mut(&fd) {
            None => {}
            Some(Owner::Handshake(..)) => self.on_handshake(fd),
            Some(Owner::Conn(key)) => {
                let key = *key;
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if ev.intersects(EventSet::ERROR) {
                    self.kill(key);
                    return;
                }
                if ev.intersects(EventSet::OUT) {
                    let before = c.pending_len();
                    let flushed = c.flush();
                    self.pending_total = self.pending_total - before + c.pending_len();
                    match flushed {
                        Err(_) => return self.kill(key),
                        Ok(_) if c.finished() => return self.kill(key),
                        Ok(_) if c.wants_credit_update() => {
                            self.push_control(key, OP_CREDIT_UPDATE, 0)
                        }
                        Ok(_) => {}
                    }
                }
                let c = self.conns.get_mut(&key).expect("still present");
                if ev.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                    c.readable = true;
                    self.want_rx(key);
                }
            }
        }
    }

    fn on_handshake(&mut self, fd: RawFd) {
        let Some(Owner::Handshake(stream, line)) = self.fds.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let done = loop {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break Some(true),
                Ok(1) if line.len() < MAX_HANDSHAKE_LINE => line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => break Some(false),
            }
        };
        let Some(ok) = done else { return };
        let Some(Owner::Handshake(stream, line)) = self.fds.remove(&fd) else {
            return;
        };
        let port = ok.then(|| parse_connect(&line)).flatten();
        let Some(port) = port else {
            self.dead.push(stream);
            return;
        };
        let local = self.alloc_port();
        let key = (local, port);
        self.conns.insert(key, Conn::new(stream, State::Connecting));
        self.fds.insert(fd, Owner::Conn(key));
        self.push_control(key, OP_REQUEST, 0);
    }

    fn alloc_port(&mut self) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }

    /// The next packet for the guest, with up to `buf.len()` payload bytes read into `buf`.
    pub fn next_packet(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some((key, op, flags)) = self.pop_control() {
            return Some((self.header(key, op, flags, 0), 0));
        }
        while let Some(key) = self.rx_queue.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if !c.can_send_to_guest() {
                continue;
            }
            let credit = c.credit() as usize;
            if credit == 0 {
                if !c.credit_requested {
                    c.credit_requested = true;
                    return Some((self.header(key, OP_CREDIT_REQUEST, 0, 0), 0));
                }
                continue;
            }
            let n = credit.min(buf.len());
            match c.read_for_guest(&mut buf[..n]) {
                Ok(Some(0)) => {
                    c.local_eof = true;
                    return Some((self.header(key, OP_SHUTDOWN, SHUTDOWN_SEND, 0), 0));
                }
                Ok(Some(k)) => {
                    self.rx_queue.push_back(key);
                    return Some((self.header(key, OP_RW, 0, k as u32), k));
                }
                Ok(None) => {}
                Err(_) => self.kill(key),
            }
        }
        self.pop_control()
            .map(|(key, op, flags)| (self.header(key, op, flags, 0), 0))
    }

    /// Drops every connection (device reset).
    pub fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        let fds: Vec<RawFd> = self.fds.keys().copied().collect();
        for fd in fds {
            if let Some(Owner::Handshake(s, _)) = self.fds.remove(&fd) {
                self.dead.push(s);
            }
        }
        self.control.clear();
        self.pending_updates.clear();
        self.rx_queue.clear();
        debug_assert_eq!(self.pending_total, 0);
        self.pending_total = 0;
    }
}

/// Connects to the Unix socket at `path` with a socket that is non-blocking before `connect`.
#[allow(unsafe_code)]
pub fn connect_nonblocking(path: &std::path::Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain socket(2) call; the fd is owned by the UnixStream below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// Parses `CONNECT <port>` (without the newline); the words live in the protocol crate.
pub use cloude_protocol::vmm_wire::parse_connect;

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    const CID: u64 = 3;

    fn guest(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Default::default()
        }
    }

    fn drain(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        while let Some((h, n)) = m.next_packet(&mut buf) {
            out.push((h, buf[..n].to_vec()));
        }
        out
    }

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 1024\r"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    }

    #[test]
    fn host_initiated_handshake_and_data() {
        let dir = tempfile::tempdir().expect("dir");
        let uds = dir.path().join("v.sock");
        let mut m = Muxer::new(CID, &uds).expect("muxer");
        let mut client = UnixStream::connect(&uds).expect("connect");
        client.write_all(b"CONNECT 1024\nhello").expect("write");
        m.accept();
        let fd = *m.fds.keys().next().expect("handshake");
        m.on_fd(fd, EventSet::IN);
        let pkts = drain(&mut m);
        assert_eq!(pkts.len(), 1);
        let req = pkts[0].0;
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 1024, CID));
        // Guest accepts.
        m.handle_guest_packet(&guest(OP_RESPONSE, 1024, req.src_port), &[]);
        let mut ok = [0u8; 14];
        client.read_exact(&mut ok).expect("OK line");
        assert_eq!(&ok, format!("OK {}\n", req.src_port).as_bytes());
        let pkts = drain(&mut m);
        assert_eq!(pkts[0].0.op, OP_RW);
        assert_eq!(pkts[0].1, b"hello");
        // Guest data reaches the client.
        let rw = Header {
            len: 3,
            ..guest(OP_RW, 1024, req.src_port)
        };
        m.handle_guest_packet(&rw, b"abc");
        let mut got = [0u8; 3];
        client.read_exact(&mut got).expect("data");
        assert_eq!(&got, b"abc");
        // Client closes: guest hears SHUTDOWN, then resets.
        drop(client);
        m.on_fd(fd, EventSet::IN | EventSet::READ_HANG_UP);
        let pkts = drain(&mut m);
        assert_eq!(pkts.last().expect("shutdown").0.op, OP_SHUTDOWN);
        m.handle_guest_packet(&guest(OP_RST, 1024, req.src_port), &[]);
        assert_eq!(m.connections(), 0);
        assert_eq!(m.take_dead().len(), 1);
    }

    #[test]
    fn guest_initiated_connect_refused_and_accepted() {
        let dir = tempfile::tempdir().expect("dir");
        let uds = dir.path().join("v.sock");
        let mut m = Muxer::new(CID, &uds).expect("muxer");
        m.handle_guest_packet(&guest(OP_REQUEST, 5000, 1025), &[]);
        assert_eq!(drain(&mut m)[0].0.op, OP_RST, "nobody listens at _1025");
        let l = UnixListener::bind(format!("{}_1025", uds.display())).expect("bind");
        m.handle_guest_packet(&guest(OP_REQUEST, 5001, 1025), &[]);
        let pkts = drain(&mut m);
        assert_eq!(pkts[0].0.op, OP_RESPONSE);
        assert_eq!(pkts[0].0.buf_alloc, CONN_BUF_SIZE);
        let (mut s, _) = l.accept().expect("accepted");
        m.handle_guest_packet(
            &Header {
                len: 2,
                ..guest(OP_RW, 5001, 1025)
            },
            b"hi",
        );
        let mut b = [0u8; 2];
        s.read_exact(&mut b).expect("read");
        assert_eq!(&b, b"hi");
        // Guest closes both ways: host gets EOF and the guest gets a reset.
        m.handle_guest_packet(
            &Header {
                flags: 3,
                ..guest(OP_SHUTDOWN, 5001, 1025)
            },
            &[],
        );
        assert_eq!(drain(&mut m)[0].0.op, OP_RST);
        assert_eq!(s.read(&mut b).expect("eof"), 0);
    }

    #[test]
    fn hostile_packets_get_resets_not_state() {
        let dir = tempfile::tempdir().expect("dir");
        let mut m = Muxer::new(CID, &dir.path().join("v.sock")).expect("muxer");
        m.handle_guest_packet(
            &Header {
                src_cid: 99,
                ..guest(OP_RW, 1, 2)
            },
            &[],
        );
        m.handle_guest_packet(
            &Header {
                type_: 2,
                ..guest(OP_REQUEST, 1, 2)
            },
            &[],
        );
        m.handle_guest_packet(&guest(OP_RW, 1, 2), &[]);
        m.handle_guest_packet(&guest(OP_RST, 1, 2), &[]);
        let pkts = drain(&mut m);
        assert_eq!(pkts.len(), 3);
        assert!(pkts.iter().all(|(h, _)| h.op == OP_RST));
        assert_eq!(m.connections(), 0);
        for i in 0..(MAX_CONTROL_PACKETS as u32 + 10) {
            m.handle_guest_packet(&guest(OP_RW, i, 2), &[]);
        }
        assert!(m.control.len() <= MAX_CONTROL_PACKETS);
    }

    /// The attack from the review: on an established connection, the guest repeats
    /// CREDIT_REQUEST and never posts RX buffers (nothing is drained). The queue stays at one
    /// pending update, not one per request.
    #[test]
    fn repeated_credit_requests_are_coalesced() {
        let dir = tempfile::tempdir().expect("dir");
        let uds = dir.path().join("v.sock");
        let mut m = Muxer::new(CID, &uds).expect("muxer");
        let _l = UnixListener::bind(format!("{}_1025", uds.display())).expect("bind");
        m.handle_guest_packet(&guest(OP_REQUEST, 5001, 1025), &[]);
        assert_eq!(drain(&mut m)[0].0.op, OP_RESPONSE);
        for _ in 0..200_000 {
            m.handle_guest_packet(&guest(OP_CREDIT_REQUEST, 5001, 1025), &[]);
        }
        assert_eq!(m.control.len(), 1, "coalesced into one pending update");
        let pkts = drain(&mut m);
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.op, OP_CREDIT_UPDATE);
        // After it was sent, a new request gets a new update.
        m.handle_guest_packet(&guest(OP_CREDIT_REQUEST, 5001, 1025), &[]);
        assert_eq!(drain(&mut m).len(), 1);
        // Other control packets of known connections are bounded too.
        for _ in 0..(2 * MAX_CONTROL_QUEUE) {
            m.push_control((1025, 5001), OP_RESPONSE, 0);
        }
        assert!(m.control.len() <= MAX_CONTROL_QUEUE);
    }

    /// The attack from the review: the guest opens many connections to a host listener that
    /// never reads and fills each one's buffer. The total held stays within the budget; the
    /// connections past it are reset, and closing them frees their share.
    #[test]
    #[allow(unsafe_code)]
    fn held_guest_data_is_bounded_over_all_connections() {
        let dir = tempfile::tempdir().expect("dir");
        let uds = dir.path().join("v.sock");
        let mut m = Muxer::new(CID, &uds).expect("muxer");
        let l = UnixListener::bind(format!("{}_1025", uds.display())).expect("bind");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        // SAFETY: a large backlog on our own listening socket so that every connect succeeds.
        let r = unsafe { libc::listen(fd, 4096) };
        assert_eq!(r, 0);
        let conns = 200u32;
        let chunk = vec![0x5au8; MAX_PKT_PAYLOAD as usize];
        let mut peak = 0;
        for port in 0..conns {
            m.handle_guest_packet(&guest(OP_REQUEST, 5000 + port, 1025), &[]);
        }
        drain(&mut m);
        assert_eq!(m.connections(), conns as usize);
        // Up to each connection's whole advertised buffer (what its credit allows).
        for _ in 0..(CONN_BUF_SIZE / MAX_PKT_PAYLOAD) + 4 {
            for port in 0..conns {
                let h = Header {
                    len: MAX_PKT_PAYLOAD,
                    ..guest(OP_RW, 5000 + port, 1025)
                };
                m.handle_guest_packet(&h, &chunk);
                peak = peak.max(m.pending_total());
            }
        }
        assert!(peak <= MAX_PENDING_TOTAL, "held {peak} bytes");
        assert!(
            peak > MAX_PENDING_TOTAL / 2,
            "the attack did fill buffers ({peak})"
        );
        let resets = drain(&mut m).iter().filter(|(h, _)| h.op == OP_RST).count();
        assert!(resets > 0, "connections past the budget are reset");
        assert!(m.connections() < conns as usize);
        m.reset();
        assert_eq!(m.pending_total(), 0);
    }

    /// A host listener whose backlog is full (nobody accepts) is refused at once, not waited on.
    #[test]
    #[allow(unsafe_code)]
    fn connect_to_a_full_backlog_does_not_block() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().expect("dir");
        let uds = dir.path().join("v.sock");
        let mut m = Muxer::new(CID, &uds).expect("muxer");
        let l = UnixListener::bind(format!("{}_1025", uds.display())).expect("bind");
        // SAFETY: shrinking the backlog of our own listening socket.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let mut fill = Vec::new();
        while let Ok(s) = connect_nonblocking(&PathBuf::from(format!("{}_1025", uds.display()))) {
            fill.push(s);
            assert!(fill.len() < 1000, "the backlog never filled");
        }
        let t = std::time::Instant::now();
        m.handle_guest_packet(&guest(OP_REQUEST, 5001, 1025), &[]);
        assert!(
            t.elapsed() < std::time::Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(drain(&mut m)[0].0.op, OP_RST);
    }

    #[test]
    fn bad_handshake_is_closed() {
        let dir = tempfile::tempdir().expect("dir");
        let uds = dir.path().join("v.sock");
        let mut m = Muxer::new(CID, &uds).expect("muxer");
        let mut c = UnixStream::connect(&uds).expect("connect");
        c.write_all(&[b'A'; 100]).expect("write");
        c.write_all(b"\n").expect("write");
        m.accept();
        let fd = *m.fds.keys().next().expect("handshake");
        m.on_fd(fd, EventSet::IN);
        assert!(m.fds.is_empty());
        assert!(!m.has_work());
    }
}
