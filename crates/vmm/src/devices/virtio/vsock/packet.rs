//! Guest-facing vsock packet headers: parsing and validation as pure functions.

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// Largest payload accepted from or sent to the guest in one packet.
pub const MAX_PKT_PAYLOAD: u32 = 64 << 10;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Stream socket type.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// Shutdown flags.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a guest packet is unacceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("the packet is shorter than a vsock header")]
    Truncated,
    #[error("payload length {0} exceeds the cap or the buffer")]
    BadLength(u32),
    #[error("source CID {0} is not the guest's")]
    WrongSource(u64),
    #[error("destination CID {0} is not the host")]
    WrongDestination(u64),
    #[error("socket type {0} is not a stream")]
    NotStream(u16),
    #[error("unknown operation {0}")]
    UnknownOp(u16),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Decodes a header from at least [`HDR_SIZE`] bytes.
    pub fn parse(b: &[u8]) -> Result<Self, PacketError> {
        if b.len() < HDR_SIZE {
            return Err(PacketError::Truncated);
        }
        Ok(Self {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Structural check of a guest TX packet whose chain has `available` payload bytes after the
/// header. A structural error means a broken driver: the device fails.
pub fn check_structure(h: &Header, available: u64) -> Result<(), PacketError> {
    if h.len > MAX_PKT_PAYLOAD || u64::from(h.len) > available {
        return Err(PacketError::BadLength(h.len));
    }
    if h.op != OP_RW && h.len != 0 {
        return Err(PacketError::BadLength(h.len));
    }
    Ok(())
}

/// Addressing check: a failure here is answered with a reset, the device keeps working.
pub fn check_addressing(h: &Header, guest_cid: u64) -> Result<(), PacketError> {
    if h.src_cid != guest_cid {
        return Err(PacketError::WrongSource(h.src_cid));
    }
    if h.dst_cid != HOST_CID {
        return Err(PacketError::WrongDestination(h.dst_cid));
    }
    if h.type_ != TYPE_STREAM {
        return Err(PacketError::NotStream(h.type_));
    }
    if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&h.op) {
        return Err(PacketError::UnknownOp(h.op));
    }
    Ok(())
}

/// Bytes the peer can still take: `buf_alloc - (sent - fwd_cnt)`, clamped at zero (a lying
/// peer can at most stall its own connection).
pub fn peer_credit(buf_alloc: u32, peer_fwd_cnt: u32, sent: u32) -> u32 {
    let in_flight = sent.wrapping_sub(peer_fwd_cnt);
    buf_alloc.saturating_sub(in_flight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1,
            dst_port: 2,
            len,
            type_: TYPE_STREAM,
            op: OP_RW,
            ..Default::default()
        }
    }

    #[test]
    fn round_trip() {
        let h = Header {
            flags: 3,
            buf_alloc: 7,
            fwd_cnt: 9,
            ..rw(5)
        };
        assert_eq!(Header::parse(&h.encode()), Ok(h));
        assert_eq!(Header::parse(&[0u8; 43]), Err(PacketError::Truncated));
    }

    #[test]
    fn bad_headers_are_classified() {
        assert_eq!(check_structure(&rw(10), 9), Err(PacketError::BadLength(10)));
        assert_eq!(
            check_structure(&rw(MAX_PKT_PAYLOAD + 1), u64::MAX),
            Err(PacketError::BadLength(MAX_PKT_PAYLOAD + 1))
        );
        assert_eq!(
            check_structure(
                &Header {
                    op: OP_REQUEST,
                    ..rw(4)
                },
                4
            ),
            Err(PacketError::BadLength(4))
        );
        assert_eq!(check_structure(&rw(10), 10), Ok(()));
        assert_eq!(
            check_addressing(&rw(0), 4),
            Err(PacketError::WrongSource(3))
        );
        assert_eq!(
            check_addressing(
                &Header {
                    dst_cid: 7,
                    ..rw(0)
                },
                3
            ),
            Err(PacketError::WrongDestination(7))
        );
        assert_eq!(
            check_addressing(&Header { type_: 2, ..rw(0) }, 3),
            Err(PacketError::NotStream(2))
        );
        assert_eq!(
            check_addressing(&Header { op: 0, ..rw(0) }, 3),
            Err(PacketError::UnknownOp(0))
        );
        assert_eq!(
            check_addressing(&Header { op: 99, ..rw(0) }, 3),
            Err(PacketError::UnknownOp(99))
        );
        assert_eq!(check_addressing(&rw(0), 3), Ok(()));
    }

    #[test]
    fn credit_math_wraps_and_clamps() {
        assert_eq!(peer_credit(1000, 0, 0), 1000);
        assert_eq!(peer_credit(1000, 100, 600), 500);
        assert_eq!(peer_credit(1000, u32::MAX - 10, 20), 969);
        assert_eq!(peer_credit(1000, 0, 5000), 0);
    }
}
