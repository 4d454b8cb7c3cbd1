//! Snapshot and restore of a whole VM.
//!
//! # Contract (used by the backend)
//!
//! **Taking a snapshot.** `cloude-vmm <boot args> --snapshot-control PATH [--snapshot-tag TAG]`
//! boots as usual and also listens on the Unix socket `PATH`. A client connects and writes one
//! line `SNAPSHOT <dir>\n` (`dir` exists and is writable; at most [`control::MAX_LINE`] bytes).
//! The VMM then pauses every vCPU (kicked out of `KVM_RUN` by a signal; each completes its
//! pending I/O with `immediate_exit` and saves its own registers), quiesces the device thread
//! (every device's lock is taken and held until exit), writes `<dir>/state` (this module's
//! format) and `<dir>/memory` (guest RAM, regions in guest-physical order; all-zero pages are
//! holes, the length is the guest memory size), fsyncs both, answers `OK\n` and exits 0 without
//! resuming the guest. A failure after a well-formed command (the directory missing or not
//! writable — found before the guest is paused —, KVM refusing to save, a write error) answers
//! `ERR <sentence>\n` and exits 1. A line that is not a well-formed command (garbage, over-long,
//! more than one line, not valid UTF-8, a relative directory) is answered `ERR <sentence>\n` and
//! the connection closed; the VM keeps running and the socket keeps listening. A client that sends nothing is dropped after
//! [`control::READ_TIMEOUT`]. The socket file is removed when the VMM exits.
//!
//! **Restoring.** `cloude-vmm --restore DIR --memory-mib N --vcpus N [--vsock-cid CID
//! --vsock-uds PATH] [--tap-fd FD | --tap NAME] [--disk PATH[,rw]]... [--snapshot-tag TAG]
//! [--snapshot-control PATH]` (no `--kernel`/`--initrd`/`--cmdline`) reads and validates `DIR/state`, maps `DIR/memory`
//! `MAP_PRIVATE` from a read-only descriptor (copy-on-write: clones of one snapshot share its
//! unmodified pages in the host page cache; the file may be read-only and owned by another
//! user), restores every vCPU, the irqchip, the PIT, the devices and the KVM clock, and resumes.
//! The vsock device reports the new CID in its configuration space and sends the guest
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the guest drops its connections and re-reads its CID;
//! listening sockets survive. Connections of the snapshotted process are gone. Until the guest
//! has handled the reset (it refills its event queue), nothing is sent to it, so a `CONNECT`
//! made meanwhile simply waits; one made before the VMM has bound `--vsock-uds` fails to
//! connect (retry it). Disks must be given as when the snapshot was taken: the same number,
//! each of the same size and mode (the state records both); their content must be the same
//! too, which the VMM does not check (the backend ties a snapshot to its image's digest). The
//! guest's page cache of a disk is part of the snapshot's memory.
//!
//! A snapshot that cannot be used (truncated, corrupt, foreign, another format or VMM version,
//! another shape — memory size, vCPU count, device set, disk sizes and modes, memory file size
//! — or another
//! `--snapshot-tag`) is refused before the guest runs: one line
//! `cloude-vmm: snapshot refused: <reason>` on stderr and exit status 3 ([`REFUSED_EXIT`]).
//!
//! # State file format
//!
//! A 24-byte header — [`MAGIC`], the format version ([`FORMAT_VERSION`], u32 LE), the body
//! length (u64 LE, at most [`MAX_STATE_BYTES`]), the body's CRC-32 (u32 LE) — then the body: a
//! JSON [`VmState`]. KVM structures are kept as kvm-bindings serialises them (their raw bytes).
//! Every list in the body is bounded by a named cap, checked before anything is restored.

pub mod control;
pub mod memory;

use std::path::Path;

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};

use crate::devices::legacy::serial::SerialState;
use crate::devices::virtio::block::DiskState;
use crate::devices::virtio::mmio::{MmioState, MAX_QUEUES};
use crate::vstate::vcpu::VcpuState;

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"CLDSNAP\0";
/// Version of the state file layout; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// Header size: magic, version, body length, CRC-32.
pub const HEADER_LEN: usize = 24;
/// Largest state body accepted (a real one is well under 100 KiB per vCPU).
pub const MAX_STATE_BYTES: u64 = cloude_protocol::vmm_wire::SNAPSHOT_STATE_BODY_MAX_BYTES;
/// Longest `--snapshot-tag`.
pub const MAX_TAG_LEN: usize = 256;
/// Most MSRs saved per vCPU.
pub const MAX_MSRS: usize = 1024;
/// Most CPUID entries per vCPU (KVM's own limit).
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// Most virtio devices (one interrupt line each).
pub const MAX_VIRTIO_DEVICES: usize = crate::devices::slots::SlotAllocator::CAPACITY as usize;
/// Bytes the serial receive FIFO may hold.
pub const MAX_SERIAL_FIFO: usize = 64;
/// Most disks.
pub const MAX_DISKS: usize = crate::config::MAX_DISKS;
/// Longest VMM version string.
pub const MAX_VERSION_LEN: usize = 64;
/// Exit status of a refused restore.
pub const REFUSED_EXIT: i32 = 3;
/// This VMM's version, recorded in and required of every snapshot.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The in-kernel interrupt controllers, PIT and clock.
#[derive(Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// Legacy and virtio device state, in the order the devices were created.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DevicesState {
    pub serial: SerialState,
    /// vm-superio's i8042 keeps no state (it only forwards the reset command).
    pub i8042: (),
    pub virtio: Vec<MmioState>,
    /// The virtio-blk disks in guest order (at most [`MAX_DISKS`]); their devices' transport
    /// and queue state are the first entries of `virtio`.
    #[serde(default)]
    pub disks: Vec<DiskState>,
}

/// Everything a restore needs besides guest memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub vmm_version: String,
    pub tag: Option<String>,
    pub mem_size: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: KvmVmState,
    pub devices: DevicesState,
}

/// Why a snapshot cannot be used (the `<reason>` of `snapshot refused: <reason>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    #[error("the state file is truncated ({0} bytes, expected {1})")]
    Truncated(u64, u64),
    #[error("the state file has {0} bytes after its end")]
    Trailing(u64),
    #[error("the state file is not a cloude-vmm snapshot (bad magic)")]
    Magic,
    #[error("the state file has format version {0}, this VMM reads version {FORMAT_VERSION}")]
    FormatVersion(u32),
    #[error("the state body is {0} bytes, more than the {MAX_STATE_BYTES} allowed")]
    TooLarge(u64),
    #[error("the state file is corrupt (checksum mismatch)")]
    Checksum,
    #[error("the state file is corrupt: {0}")]
    Decode(String),
    #[error("the snapshot was taken by cloude-vmm {0}, this is {VMM_VERSION}")]
    VmmVersion(String),
    #[error("the snapshot has {0} {1}, more than the {2} allowed")]
    Cap(usize, &'static str, usize),
    #[error("the snapshot has {have} MiB of memory, --memory-mib is {want}")]
    MemorySize { have: u64, want: u64 },
    #[error("the snapshot has {have} vCPUs, --vcpus is {want}")]
    Vcpus { have: usize, want: usize },
    #[error("the snapshot's devices are [{have}], this VM's are [{want}]")]
    Devices { have: String, want: String },
    #[error("the snapshot's disks are [{have}], this VM's are [{want}]")]
    Disks { have: String, want: String },
    #[error("the memory file is {have} bytes, the snapshot needs {want}")]
    MemoryFile { have: u64, want: u64 },
    #[error("the snapshot's tag is {have}, --snapshot-tag is {want}")]
    Tag { have: String, want: String },
    #[error("{0}")]
    Invalid(String),
}

/// What the restoring VMM expects of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub mem_size: u64,
    pub vcpus: usize,
    /// virtio device types in creation order.
    pub devices: Vec<u32>,
    /// The disks' sizes and modes in guest order.
    pub disks: Vec<DiskState>,
    pub tag: Option<String>,
}

/// Serialises `state` into a state file image.
pub fn encode(state: &VmState) -> Result<Vec<u8>, String> {
    let body = serde_json::to_vec(state).map_err(|e| e.to_string())?;
    if body.len() as u64 > MAX_STATE_BYTES {
        return Err(format!(
            "the state is {} bytes, more than {MAX_STATE_BYTES}",
            body.len()
        ));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses and checks a state file image (framing, checksum, versions and caps; not the shape).
pub fn decode(bytes: &[u8]) -> Result<VmState, Refusal> {
    let len = bytes.len() as u64;
    if bytes.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(bytes) {
            Refusal::Truncated(len, HEADER_LEN as u64)
        } else {
            Refusal::Magic
        });
    }
    if bytes[..8] != MAGIC {
        return Err(Refusal::Magic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(Refusal::Truncated(len, HEADER_LEN as u64));
    }
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(Refusal::FormatVersion(version));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&bytes[12..20]);
    let body_len = u64::from_le_bytes(l);
    if body_len > MAX_STATE_BYTES {
        return Err(Refusal::TooLarge(body_len));
    }
    let want = HEADER_LEN as u64 + body_len;
    if len < want {
        return Err(Refusal::Truncated(len, want));
    }
    if len > want {
        return Err(Refusal::Trailing(len - want));
    }
    let body = &bytes[HEADER_LEN..];
    if crc32fast::hash(body) != u32_at(20) {
        return Err(Refusal::Checksum);
    }
    let state: VmState =
        serde_json::from_slice(body).map_err(|e| Refusal::Decode(e.to_string()))?;
    check_caps(&state)?;
    if state.vmm_version != VMM_VERSION {
        return Err(Refusal::VmmVersion(state.vmm_version.clone()));
    }
    Ok(state)
}

fn cap(n: usize, what: &'static str, max: usize) -> Result<(), Refusal> {
    if n > max {
        Err(Refusal::Cap(n, what, max))
    } else {
        Ok(())
    }
}

/// Checks every length against its cap.
fn check_caps(s: &VmState) -> Result<(), Refusal> {
    cap(s.vmm_version.len(), "bytes of VMM version", MAX_VERSION_LEN)?;
    if let Some(t) = &s.tag {
        cap(t.len(), "bytes of tag", MAX_TAG_LEN)?;
    }
    let max_vcpus = usize::from(crate::arch::x86_64::mptable::MAX_VCPUS);
    cap(s.vcpus.len(), "vCPUs", max_vcpus)?;
    for v in &s.vcpus {
        cap(v.msrs.len(), "MSRs in a vCPU", MAX_MSRS)?;
        cap(v.cpuid.len(), "CPUID entries in a vCPU", MAX_CPUID_ENTRIES)?;
    }
    cap(
        s.devices.serial.in_buffer.len(),
        "bytes in the serial FIFO",
        MAX_SERIAL_FIFO,
    )?;
    cap(s.devices.virtio.len(), "virtio devices", MAX_VIRTIO_DEVICES)?;
    cap(s.devices.disks.len(), "disks", MAX_DISKS)?;
    for d in &s.devices.virtio {
        cap(d.queues.len(), "queues in a virtio device", MAX_QUEUES)?;
    }
    Ok(())
}

/// Checks that `state` fits the VM this process was asked to build.
pub fn check_shape(state: &VmState, want: &Expect, memory_file_len: u64) -> Result<(), Refusal> {
    if state.tag != want.tag {
        let show = |t: &Option<String>| match t {
            Some(t) => format!("{t:?}"),
            None => "not set".to_string(),
        };
        return Err(Refusal::Tag {
            have: show(&state.tag),
            want: show(&want.tag),
        });
    }
    if state.mem_size != want.mem_size {
        return Err(Refusal::MemorySize {
            have: state.mem_size >> 20,
            want: want.mem_size >> 20,
        });
    }
    if state.vcpus.len() != want.vcpus {
        return Err(Refusal::Vcpus {
            have: state.vcpus.len(),
            want: want.vcpus,
        });
    }
    let have: Vec<u32> = state.devices.virtio.iter().map(|d| d.device_type).collect();
    if have != want.devices {
        return Err(Refusal::Devices {
            have: device_names(&have),
            want: device_names(&want.devices),
        });
    }
    if state.devices.disks != want.disks {
        return Err(Refusal::Disks {
            have: disk_names(&state.devices.disks),
            want: disk_names(&want.disks),
        });
    }
    if memory_file_len != state.mem_size {
        return Err(Refusal::MemoryFile {
            have: memory_file_len,
            want: state.mem_size,
        });
    }
    Ok(())
}

fn disk_names(disks: &[DiskState]) -> String {
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            format!(
                "{} {} bytes {}",
                crate::devices::virtio::block::guest_name(i),
                d.size,
                if d.read_only { "read-only" } else { "rw" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn device_names(types: &[u32]) -> String {
    use crate::devices::virtio::{TYPE_BLOCK, TYPE_NET, TYPE_RNG, TYPE_VSOCK};
    types
        .iter()
        .map(|t| match *t {
            TYPE_BLOCK => "block".to_string(),
            TYPE_RNG => "rng".to_string(),
            TYPE_VSOCK => "vsock".to_string(),
            TYPE_NET => "net".to_string(),
            other => format!("type {other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads `dir/state` (at most [`MAX_STATE_BYTES`] + header) and decodes it.
pub fn read_state(dir: &Path) -> Result<VmState, Refusal> {
    use std::io::Read;
    let path = dir.join("state");
    let f = std::fs::File::open(&path)
        .map_err(|e| Refusal::Read(path.display().to_string(), e.to_string()))?;
    let mut bytes = Vec::new();
    f.take(MAX_STATE_BYTES + HEADER_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Refusal::Read(path.display().to_string(), e.to_string()))?;
    decode(&bytes)
}

/// Fuzzing entry point: the state decoder and shape check must never panic.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(s) = decode(data) {
        let want = Expect {
            mem_size: s.mem_size,
            vcpus: s.vcpus.len(),
            devices: s.devices.virtio.iter().map(|d| d.device_type).collect(),
            disks: s.devices.disks.clone(),
            tag: s.tag.clone(),
        };
        let _ = check_shape(&s, &want, s.mem_size);
        let _ = encode(&s);
    }
}

#[cfg(test)]
pub(crate) mod tests;
