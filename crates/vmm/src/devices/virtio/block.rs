//! virtio-blk on a host file or block device: positional reads and writes (`pread`/`pwrite`)
//! on the device thread, FLUSH as `fdatasync`. A disk is read-only unless it was given `,rw`:
//! then the file is opened `O_RDONLY`, the device offers `VIRTIO_BLK_F_RO`, and a write or
//! flush is answered `VIRTIO_BLK_S_IOERR` without touching the file.
//!
//! The request parser is ours. rust-vmm's `virtio-blk` crate (`virtio_blk::request::Request`)
//! is not published on crates.io (`cargo info virtio-blk`: not found), so it cannot be a
//! dependency; the wire constants come from `virtio-bindings`, the ring from `virtio-queue`
//! through [`super::queue`], which has already checked every descriptor against guest memory.
//!
//! A request is `struct virtio_blk_req { le32 type; le32 reserved; le64 sector; u8 data[];
//! u8 status; }` spread over the chain in any framing: the header is the first
//! [`HEADER_LEN`] device-readable bytes, the status the last byte of the chain, and the data what
//! lies between (device-readable for OUT, device-writable for IN and GET_ID). Every rule a
//! hostile driver could break has a name here and a test below:
//!
//! - the last descriptor must be device-writable and at least one byte (the status); a chain
//!   without one cannot be answered and is returned unused (used length 0, no I/O);
//! - the header must be [`HEADER_LEN`] bytes; the data must go the right way for the type;
//! - at most [`MAX_SEGMENTS`] data descriptors and [`MAX_REQUEST_BYTES`] data bytes, a multiple
//!   of [`SECTOR_SIZE`]; `sector * 512 + length` must be within the disk (checked arithmetic);
//! - a write or flush to a read-only disk is refused before any I/O;
//! - unknown types are answered `VIRTIO_BLK_S_UNSUPP`, other refusals `VIRTIO_BLK_S_IOERR`;
//! - a malformed ring or chain (found by [`super::queue`]) marks the device as needing reset;
//! - at most [`MAX_CHAINS_PER_EVENT`] requests per notification, then the device re-kicks itself.
//!
//! A conforming driver never meets a cap: [`MAX_SEGMENTS`] segments of at most
//! [`SEGMENT_SIZE_MAX`] bytes (both offered in the configuration space) fit in
//! [`MAX_REQUEST_BYTES`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::DeviceCore;
use super::queue::{self, Chain, ChainError, Desc};
use super::{Interrupt, VirtioDevice, MAX_CHAINS_PER_EVENT, TYPE_BLOCK, VIRTIO_F_VERSION_1};

/// Bytes in a sector (the unit of `sector` and of the capacity).
pub const SECTOR_SIZE: u64 = 512;
/// The block size offered to the guest (`blk_size`). 512 like the sector: the images are
/// EROFS with 4 KiB blocks, which the guest reads in 4 KiB requests either way.
pub const BLOCK_SIZE: u32 = 512;
/// Bytes of the request header: type, reserved, sector.
pub const HEADER_LEN: usize = 16;
/// Most data bytes one request may move.
pub const MAX_REQUEST_BYTES: u32 = 1 << 20;
/// Most data descriptors in one request (offered as `seg_max`; well under the queue size, as
/// indirect descriptors are not offered and header and status need two more).
pub const MAX_SEGMENTS: usize = 128;
/// Largest data segment a driver should make (offered as `size_max`).
pub const SEGMENT_SIZE_MAX: u32 = 8192;
/// Bytes of a GET_ID answer (the serial, zero-padded, not NUL-terminated at full length).
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
const QUEUE_SIZES: [u16; 1] = [256];
/// Bytes of configuration space we fill: capacity, size_max, seg_max, geometry (zero), blk_size.
const CONFIG_LEN: usize = 24;

const _: () = assert!(MAX_SEGMENTS as u64 * SEGMENT_SIZE_MAX as u64 <= MAX_REQUEST_BYTES as u64);
const _: () = assert!((MAX_REQUEST_BYTES as u64).is_multiple_of(SECTOR_SIZE));

/// What a snapshot records of a disk (a restore must be given a disk of the same shape).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskState {
    /// Size in bytes (a multiple of [`SECTOR_SIZE`]).
    pub size: u64,
    pub read_only: bool,
}

/// The guest's name for disk `index` (0 is `vda`).
pub fn guest_name(index: usize) -> String {
    let letter = b"abcdefghijklmnopqrstuvwxyz"
        .get(index)
        .map_or('?', |b| char::from(*b));
    format!("vd{letter}")
}

/// The serial GET_ID answers for disk `index`.
pub fn serial(index: usize) -> [u8; SERIAL_LEN] {
    let text = format!("cloude-disk-{index}");
    let mut s = [0u8; SERIAL_LEN];
    let n = text.len().min(SERIAL_LEN);
    s[..n].copy_from_slice(&text.as_bytes()[..n]);
    s
}

/// A checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at byte `offset` of the disk into `data`.
    Read {
        offset: u64,
        len: u32,
        data: Vec<Desc>,
    },
    /// Write the `len` readable bytes after the header at byte `offset`.
    Write {
        offset: u64,
        len: u32,
    },
    Flush,
    /// Write the serial into `data`.
    GetId {
        data: Vec<Desc>,
    },
}

/// Why a request is refused without I/O (answered `VIRTIO_BLK_S_IOERR`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the header is {0} bytes, not {HEADER_LEN}")]
    ShortHeader(u64),
    #[error("the buffers of a type {0} request go the wrong way")]
    Direction(u32),
    #[error("{0} data descriptors, more than {MAX_SEGMENTS}")]
    TooManySegments(usize),
    #[error("{0} data bytes, more than {MAX_REQUEST_BYTES}")]
    TooLarge(u64),
    #[error("{0} data bytes is not a whole number of sectors")]
    Unaligned(u64),
    #[error("sector {sector} and {len} bytes reach beyond the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
}

/// What became of one request.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Answered `VIRTIO_BLK_S_IOERR`.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Answered `VIRTIO_BLK_S_UNSUPP`.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// The host file failed: answered `VIRTIO_BLK_S_IOERR`.
    #[error("disk I/O failed: {0}")]
    Io(std::io::Error),
    /// Guest memory could not be accessed: fails the device.
    #[error(transparent)]
    Chain(#[from] ChainError),
}

/// Requests served, by outcome (for tests and debugging).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub get_ids: u64,
    /// Answered `VIRTIO_BLK_S_IOERR`.
    pub failed: u64,
    /// Answered `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: u64,
    /// No status byte to answer in: returned with used length 0.
    pub unanswerable: u64,
}

/// The status byte's address: the last byte of the chain, which must be a device-writable
/// descriptor of at least one byte.
pub fn status_byte(chain: &Chain) -> Option<GuestAddress> {
    let last = chain.writable.last()?;
    if last.len == 0 {
        return None;
    }
    Some(GuestAddress(last.addr + u64::from(last.len) - 1))
}

/// The device-writable buffers without the status byte.
fn writable_data(chain: &Chain) -> Vec<Desc> {
    let mut data = chain.writable.clone();
    if let Some(last) = data.last_mut() {
        last.len = last.len.saturating_sub(1);
        if last.len == 0 {
            data.pop();
        }
    }
    data
}

/// How many of `segs` hold bytes past the first `skip`.
fn segments_after(segs: &[Desc], skip: u64) -> usize {
    let mut at = 0u64;
    let mut n = 0;
    for d in segs {
        let end = at + u64::from(d.len);
        if end > skip && d.len > 0 {
            n += 1;
        }
        at = end;
    }
    n
}

fn check_data(segments: usize, len: u64) -> Result<u32, RequestError> {
    if segments > MAX_SEGMENTS {
        return Err(RequestError::TooManySegments(segments));
    }
    if len > u64::from(MAX_REQUEST_BYTES) {
        return Err(RequestError::TooLarge(len));
    }
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned(len));
    }
    // Within MAX_REQUEST_BYTES, so it fits.
    Ok(len as u32)
}

/// Byte offset of `sector`, if `len` bytes from there lie within a disk of `disk_size` bytes.
fn check_range(sector: u64, len: u64, disk_size: u64) -> Result<u64, RequestError> {
    sector
        .checked_mul(SECTOR_SIZE)
        .filter(|offset| offset.checked_add(len).is_some_and(|end| end <= disk_size))
        .ok_or(RequestError::OutOfRange { sector, len })
}

/// Reads and checks the request in `chain` (whose status byte the caller has found) against a
/// disk of `disk_size` bytes.
pub fn parse(mem: &GuestMemoryMmap, chain: &Chain, disk_size: u64) -> Result<Request, BlockError> {
    let readable = chain.readable_len();
    if readable < HEADER_LEN as u64 {
        return Err(RequestError::ShortHeader(readable).into());
    }
    let mut hdr = [0u8; HEADER_LEN];
    queue::gather(mem, &chain.readable, 0, &mut hdr)?;
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(s);
    // Data bytes each way: readable after the header, writable before the status byte.
    let out_len = readable - HEADER_LEN as u64;
    let in_len = chain.writable_len().saturating_sub(1);
    match kind {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return Err(RequestError::Direction(kind).into());
            }
            let data = writable_data(chain);
            let len = check_data(data.len(), in_len)?;
            let offset = check_range(sector, in_len, disk_size)?;
            Ok(Request::Read { offset, len, data })
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return Err(RequestError::Direction(kind).into());
            }
            let segments = segments_after(&chain.readable, HEADER_LEN as u64);
            let len = check_data(segments, out_len)?;
            let offset = check_range(sector, out_len, disk_size)?;
            Ok(Request::Write { offset, len })
        }
        VIRTIO_BLK_T_FLUSH => {
            if out_len != 0 || in_len != 0 {
                return Err(RequestError::Direction(kind).into());
            }
            Ok(Request::Flush)
        }
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 {
                return Err(RequestError::Direction(kind).into());
            }
            let data = writable_data(chain);
            if data.len() > MAX_SEGMENTS {
                return Err(RequestError::TooManySegments(data.len()).into());
            }
            Ok(Request::GetId { data })
        }
        other => Err(BlockError::Unsupported(other)),
    }
}

/// The disk behind the device: its file and the request buffer.
struct Disk {
    name: String,
    file: File,
    size: u64,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
    /// One request's data on its way between guest memory and the file.
    buf: Vec<u8>,
    counters: Counters,
    io_error_logged: bool,
}

impl Disk {
    /// Carries out the request in `chain`; returns the data bytes written to guest memory.
    fn execute(&mut self, mem: &GuestMemoryMmap, chain: &Chain) -> Result<u32, BlockError> {
        match parse(mem, chain, self.size)? {
            Request::Read { offset, len, data } => {
                let buf = &mut self.buf[..len as usize];
                self.file
                    .read_exact_at(buf, offset)
                    .map_err(BlockError::Io)?;
                queue::scatter(mem, &data, 0, buf)?;
                self.counters.reads += 1;
                Ok(len)
            }
            Request::Write { offset, len } => {
                if self.read_only {
                    return Err(RequestError::ReadOnly.into());
                }
                let buf = &mut self.buf[..len as usize];
                queue::gather(mem, &chain.readable, HEADER_LEN as u64, buf)?;
                self.file
                    .write_all_at(buf, offset)
                    .map_err(BlockError::Io)?;
                self.counters.writes += 1;
                Ok(0)
            }
            Request::Flush => {
                if self.read_only {
                    return Err(RequestError::ReadOnly.into());
                }
                self.file.sync_data().map_err(BlockError::Io)?;
                self.counters.flushes += 1;
                Ok(0)
            }
            Request::GetId { data } => {
                let n = queue::scatter(mem, &data, 0, &self.serial)?;
                self.counters.get_ids += 1;
                Ok(n as u32)
            }
        }
    }

    /// Serves the request in `chain`; returns the used length (data written + status byte).
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: &Chain) -> Result<u32, ChainError> {
        let Some(status_at) = status_byte(chain) else {
            self.counters.unanswerable += 1;
            return Ok(0);
        };
        let (status, written) = match self.execute(mem, chain) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(BlockError::Unsupported(_)) => {
                self.counters.unsupported += 1;
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
            Err(BlockError::Request(_)) => {
                self.counters.failed += 1;
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(BlockError::Io(e)) => {
                if !self.io_error_logged {
                    self.io_error_logged = true;
                    eprintln!(
                        "cloude-vmm: virtio-blk {}: {e} (answered as an I/O error; further \
                         ones are not logged)",
                        self.name
                    );
                }
                self.counters.failed += 1;
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(BlockError::Chain(e)) => return Err(e),
        };
        mem.write_obj(status as u8, status_at)
            .map_err(|_| ChainError::OutOfMemory {
                addr: status_at.0,
                len: 1,
            })?;
        Ok(written + 1)
    }
}

/// The block device.
pub struct Block {
    disk: Disk,
    config: [u8; CONFIG_LEN],
    core: DeviceCore,
}

impl Block {
    /// Disk `index` (0 is `vda`) on `file` of `size` bytes, opened read-only when `read_only`.
    pub fn new(
        index: usize,
        file: File,
        size: u64,
        read_only: bool,
        irq: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a disk of {size} bytes is not a whole number of sectors"),
            ));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes());
        config[8..12].copy_from_slice(&SEGMENT_SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&(MAX_SEGMENTS as u32).to_le_bytes());
        config[20..24].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        Ok(Self {
            disk: Disk {
                name: guest_name(index),
                file,
                size,
                read_only,
                serial: serial(index),
                buf: vec![0u8; MAX_REQUEST_BYTES as usize],
                counters: Counters::default(),
                io_error_logged: false,
            },
            config,
            core: DeviceCore::new(irq, QUEUE_SIZES.len())?,
        })
    }

    /// The shape a snapshot records.
    pub fn state(&self) -> DiskState {
        DiskState {
            size: self.disk.size,
            read_only: self.disk.read_only,
        }
    }

    /// Requests served so far.
    pub fn counters(&self) -> Counters {
        self.disk.counters
    }

    /// True after activation (and until a reset or a failure).
    pub fn is_active(&self) -> bool {
        self.core.is_active()
    }

    /// Serves up to [`MAX_CHAINS_PER_EVENT`] pending requests (re-kicking itself when more may
    /// wait); returns how many were completed. An error means the ring or a chain is malformed.
    pub fn process_queue(&mut self) -> Result<usize, ChainError> {
        let Some(a) = self.core.active_mut() else {
            return Ok(0);
        };
        let (mem, q) = (&a.mem, &mut a.queues[0]);
        let mut served = 0;
        while served < MAX_CHAINS_PER_EVENT {
            let Some(chain) = queue::pop(q, mem)? else {
                break;
            };
            let used = self.disk.serve(mem, &chain)?;
            queue::add_used(q, mem, chain.head, used)?;
            served += 1;
        }
        self.core.rekick_if_capped(0, served);
        Ok(served)
    }

    /// Handles a queue notification: serves, then interrupts the guest, or fails the device.
    pub fn on_queue_event(&mut self) {
        self.core.take_kick(0);
        let served = self.process_queue();
        let device = format!("virtio-blk {}", self.disk.name);
        self.core.complete(&device, served);
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn features(&self) -> u64 {
        let mode = if self.disk.read_only {
            VIRTIO_BLK_F_RO
        } else {
            VIRTIO_BLK_F_FLUSH
        };
        [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            mode,
        ]
        .iter()
        .fold(VIRTIO_F_VERSION_1, |f, bit| f | (1u64 << bit))
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn core(&self) -> &DeviceCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }
}

mod event_handler;

#[cfg(test)]
mod tests;
