//! The block device on real guest memory, a real split ring and a real file: every rule of the
//! module docs driven by a crafted request.

use std::io::Write;
use std::sync::Mutex;

use super::*;
use crate::devices::bus::lock;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::queue::testing::*;
use crate::devices::BusDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 4 << 20;
const SIZE: u16 = 256;
/// Where the tests put the request header, the status byte and the data.
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x9000;
const DATA: u64 = 0x10_0000;
/// What an untouched status byte holds.
const UNTOUCHED: u8 = 0xee;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

/// A disk file, guest memory and an active device on a ring at the `testing` addresses.
struct Rig {
    mem: GuestMemoryMmap,
    file: tempfile::NamedTempFile,
    irq: Arc<Interrupt>,
    dev: Block,
    avail: u16,
}

impl Rig {
    fn new(content: &[u8], read_only: bool) -> Self {
        let mut file = tempfile::NamedTempFile::new().expect("tmp");
        file.write_all(content).expect("write disk");
        file.flush().expect("flush");
        // Read-write even for a read-only device: the device's own refusal is under test, not
        // the descriptor's mode (`config::open_disk` opens read-only disks O_RDONLY).
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file.path())
            .expect("open disk");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("mmap");
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let mut dev =
            Block::new(1, opened, content.len() as u64, read_only, irq.clone()).expect("device");
        let q = RingBuilder::new(&mem, SIZE).queue();
        dev.activate(mem.clone(), vec![q], VIRTIO_F_VERSION_1)
            .expect("activate");
        Self {
            mem,
            file,
            irq,
            dev,
            avail: 0,
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).expect("header");
    }

    /// Writes `descs` (address, length, device-writable) as one chain from descriptor 0.
    fn chain(&self, descs: &[(u64, u32, bool)]) {
        let r = RingBuilder::new(&self.mem, SIZE);
        for (i, (addr, len, write)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if *write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            r.desc(i as u16, *addr, *len, flags, i as u16 + 1);
        }
    }

    fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail % SIZE);
        self.mem
            .write_obj(head, GuestAddress(slot))
            .expect("avail slot");
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail, GuestAddress(AVAIL + 2))
            .expect("avail idx");
    }

    /// The last used element's (id, length), and how many there are.
    fn last_used(&self) -> (u32, u32, u16) {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
        let at = USED + 4 + 8 * u64::from(idx.wrapping_sub(1) % SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("id");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("len");
        (id, len, idx)
    }

    /// Sends the chain `descs` with a request header of `kind` for `sector` in front (when
    /// `header`), serves it; returns (used length, the byte at STATUS).
    fn request(&mut self, descs: &[(u64, u32, bool)]) -> (u32, u8) {
        self.mem
            .write_obj(UNTOUCHED, GuestAddress(STATUS))
            .expect("status");
        self.chain(descs);
        self.publish(0);
        let served = self.dev.process_queue().expect("a well-formed ring");
        assert_eq!(served, 1);
        let (id, len, _) = self.last_used();
        assert_eq!(id, 0);
        (
            len,
            self.mem.read_obj(GuestAddress(STATUS)).expect("status"),
        )
    }

    /// A read of `len` bytes at `sector` into DATA, with a one-byte status descriptor.
    fn read(&mut self, sector: u64, len: u32) -> (u32, u8) {
        self.header(VIRTIO_BLK_T_IN, sector);
        self.request(&[(HDR, 16, false), (DATA, len, true), (STATUS, 1, true)])
    }

    /// A write of `data` at `sector` (from DATA).
    fn write(&mut self, sector: u64, data: &[u8]) -> (u32, u8) {
        self.mem
            .write_slice(data, GuestAddress(DATA))
            .expect("data");
        self.header(VIRTIO_BLK_T_OUT, sector);
        self.request(&[
            (HDR, 16, false),
            (DATA, data.len() as u32, false),
            (STATUS, 1, true),
        ])
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read guest");
        v
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(self.file.path()).expect("read disk")
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn config_space_and_features_describe_the_disk() {
    let ro = Rig::new(&pattern(64 << 10), true);
    let mut cfg = [0u8; CONFIG_LEN];
    ro.dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().expect("8")), 128);
    assert_eq!(
        u32::from_le_bytes(cfg[8..12].try_into().expect("4")),
        SEGMENT_SIZE_MAX
    );
    assert_eq!(
        u32::from_le_bytes(cfg[12..16].try_into().expect("4")),
        MAX_SEGMENTS as u32
    );
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().expect("4")), 512);
    let f = ro.dev.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0, "read-only offered");
    assert_eq!(
        f & (1 << VIRTIO_BLK_F_FLUSH),
        0,
        "no flush on a read-only disk"
    );
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    let rw = Rig::new(&pattern(4096), false);
    let f = rw.dev.features();
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(
        rw.dev.state(),
        DiskState {
            size: 4096,
            read_only: false
        }
    );
    // A partial read at an odd offset, and past the end.
    let mut two = [0u8; 2];
    ro.dev.read_config(1, &mut two);
    assert_eq!(two, [0, 0]);
    ro.dev.read_config(0, &mut two);
    assert_eq!(two, [128, 0]);
    ro.dev.read_config(4096, &mut two);
    assert_eq!(two, [0, 0]);
}

#[test]
fn read_returns_the_file_bytes_across_segments() {
    let content = pattern(64 << 10);
    let mut r = Rig::new(&content, true);
    // 1536 bytes from sector 5 into three scattered buffers, the status in the last one.
    r.header(VIRTIO_BLK_T_IN, 5);
    let (len, _) = r.request(&[
        (HDR, 16, false),
        (DATA, 1000, true),
        (DATA + 0x4000, 36, true),
        (STATUS - 500, 501, true),
    ]);
    assert_eq!(len, 1537);
    let mut got = r.guest(DATA, 1000);
    got.extend(r.guest(DATA + 0x4000, 36));
    got.extend(r.guest(STATUS - 500, 500));
    assert!(got == content[5 * 512..5 * 512 + 1536], "read data differs");
    assert_eq!(r.guest(STATUS, 1), [OK]);
    // The last sector of the disk.
    let (len, status) = r.read(127, 512);
    assert_eq!((len, status), (513, OK));
    assert!(r.guest(DATA, 512) == content[127 * 512..]);
    assert_eq!(r.dev.counters().reads, 2);
    r.dev.on_queue_event();
    assert!(!r.irq.failed());
}

#[test]
fn write_on_a_rw_disk_lands_in_the_file_and_flush_syncs() {
    let content = pattern(64 << 10);
    let mut r = Rig::new(&content, false);
    let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    assert_eq!(r.write(3, &data), (1, OK));
    let disk = r.disk();
    assert!(disk[3 * 512..3 * 512 + 1024] == data[..], "written bytes");
    assert!(disk[..3 * 512] == content[..3 * 512], "before untouched");
    assert!(
        disk[3 * 512 + 1024..] == content[3 * 512 + 1024..],
        "after untouched"
    );
    assert_eq!(disk.len(), content.len());
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.request(&[(HDR, 16, false), (STATUS, 1, true)]), (1, OK));
    let c = r.dev.counters();
    assert_eq!((c.writes, c.flushes, c.failed), (1, 1, 0));
    // Header and data in one descriptor (any framing is allowed).
    let mut both = vec![0u8; 16 + 512];
    both[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    both[8..16].copy_from_slice(&100u64.to_le_bytes());
    both[16..].fill(0x77);
    r.mem
        .write_slice(&both, GuestAddress(HDR))
        .expect("request");
    assert_eq!(r.request(&[(HDR, 528, false), (STATUS, 1, true)]), (1, OK));
    assert!(r.disk()[100 * 512..101 * 512].iter().all(|b| *b == 0x77));
}

#[test]
fn write_or_flush_on_a_read_only_disk_is_an_ioerr_and_the_file_is_unchanged() {
    let content = pattern(64 << 10);
    let mut r = Rig::new(&content, true);
    let before = std::fs::metadata(r.file.path())
        .expect("meta")
        .modified()
        .ok();
    assert_eq!(r.write(0, &[0xffu8; 4096]), (1, IOERR));
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        r.request(&[(HDR, 16, false), (STATUS, 1, true)]),
        (1, IOERR)
    );
    assert!(r.disk() == content, "the read-only disk changed");
    let after = std::fs::metadata(r.file.path())
        .expect("meta")
        .modified()
        .ok();
    assert_eq!(before, after);
    let c = r.dev.counters();
    assert_eq!((c.writes, c.flushes, c.failed), (0, 0, 2));
    // The device still serves reads.
    assert_eq!(r.read(0, 512), (513, OK));
}

#[test]
fn out_of_range_and_overflowing_sectors_are_ioerr() {
    let content = pattern(64 << 10);
    let mut r = Rig::new(&content, false);
    let sectors = 128u64;
    for (sector, len) in [
        (sectors, 512),
        (sectors - 1, 1024),
        (u64::MAX / 512 + 1, 512), // sector * 512 overflows
        (u64::MAX / 512, 512),     // offset + length overflows
        (u64::MAX, 512),
    ] {
        r.mem
            .write_slice(&[0xabu8; 1024], GuestAddress(DATA))
            .expect("fill");
        assert_eq!(r.read(sector, len), (1, IOERR), "read at sector {sector}");
        assert!(
            r.guest(DATA, 1024).iter().all(|b| *b == 0xab),
            "nothing was read into guest memory"
        );
        assert_eq!(
            r.write(sector, &vec![1u8; len as usize]),
            (1, IOERR),
            "write at {sector}"
        );
    }
    assert!(r.disk() == content);
    assert_eq!(
        check_range(u64::MAX / 512, 512, u64::MAX),
        Err(RequestError::OutOfRange {
            sector: u64::MAX / 512,
            len: 512
        })
    );
    assert_eq!(check_range(127, 512, sectors * 512), Ok(127 * 512));
}

#[test]
fn lengths_that_are_not_whole_sectors_are_ioerr() {
    let content = pattern(64 << 10);
    let mut r = Rig::new(&content, false);
    assert_eq!(r.read(0, 513), (1, IOERR));
    assert_eq!(r.read(0, 100), (1, IOERR));
    assert_eq!(r.write(0, &[9u8; 100]), (1, IOERR));
    assert_eq!(r.write(1, &[9u8; 1023]), (1, IOERR));
    assert!(r.disk() == content);
    assert_eq!(r.dev.counters().failed, 4);
}

#[test]
fn requests_over_the_byte_cap_are_ioerr_and_the_cap_itself_is_served() {
    let content = pattern(2 << 20);
    let mut r = Rig::new(&content, false);
    // Exactly MAX_REQUEST_BYTES in two descriptors: served.
    let half = MAX_REQUEST_BYTES / 2;
    r.header(VIRTIO_BLK_T_IN, 8);
    let (len, status) = r.request(&[
        (HDR, 16, false),
        (DATA, half, true),
        (DATA + u64::from(half), half, true),
        (STATUS, 1, true),
    ]);
    assert_eq!((len, status), (MAX_REQUEST_BYTES + 1, OK));
    assert!(r.guest(DATA, MAX_REQUEST_BYTES as usize) == content[8 * 512..8 * 512 + (1 << 20)]);
    // One sector more (the descriptors may overlap: a hostile driver's choice).
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        r.header(kind, 0);
        let w = kind == VIRTIO_BLK_T_IN;
        let (len, status) = r.request(&[
            (HDR, 16, false),
            (DATA, MAX_REQUEST_BYTES, w),
            (DATA, 512, w),
            (STATUS, 1, true),
        ]);
        assert_eq!((len, status), (1, IOERR), "type {kind}");
    }
    assert!(r.disk() == content);
    assert!(matches!(
        check_data(2, u64::from(MAX_REQUEST_BYTES) + 512),
        Err(RequestError::TooLarge(_))
    ));
}

#[test]
fn too_many_segments_are_ioerr() {
    let content = pattern(1 << 20);
    let mut r = Rig::new(&content, false);
    let chain = |n: usize, write: bool| {
        let mut d = vec![(HDR, 16, false)];
        d.extend((0..n).map(|i| (DATA + 512 * i as u64, 512u32, write)));
        d.push((STATUS, 1, true));
        d
    };
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.request(&chain(MAX_SEGMENTS, true)),
        (MAX_SEGMENTS as u32 * 512 + 1, OK)
    );
    assert_eq!(r.request(&chain(MAX_SEGMENTS + 1, true)), (1, IOERR));
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(r.request(&chain(MAX_SEGMENTS + 1, false)), (1, IOERR));
    assert!(r.disk() == content);
    r.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(r.request(&chain(MAX_SEGMENTS + 1, true)), (1, IOERR));
    // Zero-length descriptors do not count as segments of a write.
    r.header(VIRTIO_BLK_T_OUT, 0);
    let mut d = vec![(HDR, 16, false)];
    d.extend((0..200).map(|_| (DATA, 0u32, false)));
    d.push((DATA, 512, false));
    d.push((STATUS, 1, true));
    assert_eq!(r.request(&d), (1, OK));
}

#[test]
fn a_chain_without_a_writable_status_byte_is_returned_unused() {
    let content = pattern(64 << 10);
    let mut r = Rig::new(&content, false);
    // A write whose "status" descriptor is device-readable: nothing to answer in.
    r.mem
        .write_slice(&[0x11u8; 512], GuestAddress(DATA))
        .expect("data");
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.request(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, false)]),
        (0, UNTOUCHED)
    );
    // Only a header.
    assert_eq!(r.request(&[(HDR, 16, false)]), (0, UNTOUCHED));
    // A zero-length status descriptor.
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.request(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 0, true)]),
        (0, UNTOUCHED)
    );
    assert!(r.disk() == content, "an unanswerable write did no I/O");
    let c = r.dev.counters();
    assert_eq!((c.unanswerable, c.writes, c.reads), (3, 0, 0));
    // The device keeps serving.
    assert_eq!(r.read(1, 512), (513, OK));
    r.dev.on_queue_event();
    assert!(!r.irq.failed());
}

#[test]
fn a_read_only_status_after_writable_data_fails_the_device() {
    let content = pattern(64 << 10);
    let mut r = Rig::new(&content, true);
    r.mem
        .write_slice(&[0xabu8; 512], GuestAddress(DATA))
        .expect("fill");
    r.header(VIRTIO_BLK_T_IN, 0);
    r.chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)]);
    r.publish(0);
    r.dev.on_queue_event();
    assert!(r.irq.failed(), "needs reset");
    assert!(!r.dev.is_active());
    assert!(r.guest(DATA, 512).iter().all(|b| *b == 0xab), "no data");
    // Descriptors outside guest memory fail it the same way, never the VMM.
    let mut r = Rig::new(&content, true);
    r.header(VIRTIO_BLK_T_IN, 0);
    r.chain(&[
        (HDR, 16, false),
        (MEM as u64 - 256, 512, true),
        (STATUS, 1, true),
    ]);
    r.publish(0);
    assert!(matches!(
        r.dev.process_queue(),
        Err(ChainError::OutOfMemory { .. })
    ));
}

#[test]
fn short_headers_and_wrong_directions_are_ioerr() {
    let content = pattern(64 << 10);
    let mut r = Rig::new(&content, false);
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.request(&[(HDR, 15, false), (DATA, 512, true), (STATUS, 1, true)]),
        (1, IOERR)
    );
    // A read with readable data, a write with writable data, a flush with data.
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.request(&[(HDR, 16 + 512, false), (STATUS, 1, true)]),
        (1, IOERR)
    );
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.request(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]),
        (1, IOERR)
    );
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        r.request(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]),
        (1, IOERR)
    );
    assert!(r.disk() == content);
    assert_eq!(r.dev.counters().failed, 4);
}

#[test]
fn get_id_answers_the_serial() {
    let mut r = Rig::new(&pattern(4096), true);
    r.mem
        .write_slice(&[0xffu8; 32], GuestAddress(DATA))
        .expect("fill");
    r.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        r.request(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]),
        (21, OK)
    );
    let mut want = b"cloude-disk-1".to_vec();
    want.resize(SERIAL_LEN, 0);
    assert_eq!(r.guest(DATA, 20), want);
    assert_eq!(r.guest(DATA + 20, 1), [0xff], "nothing past the buffer");
    // A shorter buffer gets what fits.
    r.mem
        .write_slice(&[0xffu8; 32], GuestAddress(DATA))
        .expect("fill");
    assert_eq!(
        r.request(&[(HDR, 16, false), (DATA, 8, true), (STATUS, 1, true)]),
        (9, OK)
    );
    assert_eq!(r.guest(DATA, 9), b"cloude-d\xff");
    assert_eq!(r.dev.counters().get_ids, 2);
    assert_eq!(&serial(0)[..14], b"cloude-disk-0\0");
    assert_eq!(guest_name(0), "vda");
    assert_eq!(guest_name(3), "vdd");
}

#[test]
fn unsupported_types_are_unsupp() {
    let content = pattern(64 << 10);
    let mut r = Rig::new(&content, false);
    for kind in [
        virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD,
        virtio_bindings::virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES,
        virtio_bindings::virtio_blk::VIRTIO_BLK_T_SCSI_CMD,
        0xdead,
        u32::MAX,
    ] {
        r.header(kind, 0);
        assert_eq!(
            r.request(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]),
            (1, UNSUPP),
            "type {kind}"
        );
    }
    assert!(r.disk() == content);
    assert_eq!(r.dev.counters().unsupported, 5);
}

#[test]
fn at_most_max_chains_per_event_then_a_rekick() {
    let mut r = Rig::new(&pattern(64 << 10), true);
    r.header(VIRTIO_BLK_T_IN, 0);
    r.chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    // A hostile driver publishes the same chain over and over.
    for _ in 0..SIZE {
        r.publish(0);
    }
    let _ = r.dev.queue_events()[0].read();
    assert_eq!(r.dev.process_queue().expect("ok"), MAX_CHAINS_PER_EVENT);
    assert_eq!(r.dev.queue_events()[0].read().expect("re-kicked"), 1);
    for _ in 0..5 {
        r.publish(0);
    }
    assert_eq!(r.dev.process_queue().expect("ok"), 5);
    assert!(r.dev.queue_events()[0].read().is_err(), "no kick when done");
    assert_eq!(r.last_used().2, SIZE + 5);
    assert_eq!(r.dev.counters().reads, u64::from(SIZE) + 5);
}

#[test]
fn an_inactive_or_reset_device_does_nothing() {
    let mut r = Rig::new(&pattern(4096), false);
    r.dev.reset();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    r.publish(0);
    assert_eq!(r.dev.process_queue().expect("ok"), 0);
    assert_eq!(r.dev.queue_states(), None);
    assert!(r.disk() == pattern(4096));
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let f = tempfile::tempfile().expect("tmp");
    assert!(Block::new(0, f, 1000, true, irq.clone()).is_err());
    let f = tempfile::tempfile().expect("tmp");
    assert!(Block::new(0, f, 0, true, irq).is_err());
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// A transport over a block device on `path`, driven to DRIVER_OK like a driver would.
fn transport(
    path: &std::path::Path,
    size: u64,
    mem: &GuestMemoryMmap,
) -> (MmioTransport, Arc<Mutex<Block>>) {
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let f = File::open(path).expect("open");
    let blk = Arc::new(Mutex::new(
        Block::new(0, f, size, true, irq.clone()).expect("block"),
    ));
    (MmioTransport::new(blk.clone(), irq, mem.clone()), blk)
}

/// The device's queue state survives a transport save and restore: the restored device serves
/// the next request from the saved ring position and reports the same disk.
#[test]
fn snapshot_save_and_restore_round_trip() {
    let content = pattern(64 << 10);
    let mut file = tempfile::NamedTempFile::new().expect("tmp");
    file.write_all(&content).expect("write");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("mmap");
    let (mut t, blk) = transport(file.path(), content.len() as u64, &mem);
    wr(&mut t, 0x24, 1);
    wr(&mut t, 0x20, 1); // VERSION_1
    wr(&mut t, 0x70, 0xb);
    wr(&mut t, 0x38, u32::from(SIZE));
    wr(&mut t, 0x80, DESC as u32);
    wr(&mut t, 0x90, AVAIL as u32);
    wr(&mut t, 0xa0, USED as u32);
    wr(&mut t, 0x44, 1);
    wr(&mut t, 0x70, 0xf);
    assert!(lock(&blk).is_active());

    let r = RingBuilder::new(&mem, SIZE);
    let mut h = [0u8; HEADER_LEN];
    h[8..16].copy_from_slice(&3u64.to_le_bytes()); // IN, sector 3
    mem.write_slice(&h, GuestAddress(HDR)).expect("hdr");
    r.desc(0, HDR, 16, F_NEXT, 1);
    r.desc(1, DATA, 512, F_WRITE | F_NEXT, 2);
    r.desc(2, STATUS, 1, F_WRITE, 0);
    let publish = |n: u16| {
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(n - 1)))
            .expect("slot");
        mem.write_obj(n, GuestAddress(AVAIL + 2)).expect("idx");
    };
    publish(1);
    assert_eq!(lock(&blk).process_queue().expect("serve"), 1);
    let saved = t.save();
    assert!(saved.activated && saved.device_active);
    assert_eq!(saved.device_type, TYPE_BLOCK);
    assert_eq!(saved.queues[0].next_avail, 1);
    assert_eq!(saved.features_acked, VIRTIO_F_VERSION_1);
    let json = serde_json::to_string(&saved).expect("serialise");
    let back: crate::devices::virtio::mmio::MmioState =
        serde_json::from_str(&json).expect("deserialise");
    let state = lock(&blk).state();
    let st: DiskState =
        serde_json::from_str(&serde_json::to_string(&state).expect("json")).expect("back");
    assert_eq!(st, state);

    // A fresh device on the same image, restored.
    let (mut t2, blk2) = transport(file.path(), content.len() as u64, &mem);
    t2.restore(&back).expect("restore");
    assert!(lock(&blk2).is_active());
    assert_eq!(t2.save(), saved);
    assert_eq!(lock(&blk2).state(), st);
    // The next request, at sector 9, is served from the saved position.
    h[8..16].copy_from_slice(&9u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).expect("hdr");
    publish(2);
    assert_eq!(lock(&blk2).process_queue().expect("serve"), 1);
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).expect("idx");
    assert_eq!(used_idx, 2);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).expect("data");
    assert!(got == content[9 * 512..10 * 512]);
    assert_eq!(lock(&blk2).counters().reads, 1);
    // A state saved for another device type does not restore into a block device.
    let mut other = saved;
    other.device_type = super::super::TYPE_RNG;
    let (mut t3, _) = transport(file.path(), content.len() as u64, &mem);
    assert!(t3.restore(&other).is_err());
}
