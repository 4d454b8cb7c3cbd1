//! Command line (a contract used by scripts and the backend) and its validation into [`VmConfig`].

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::Parser;

use crate::arch::x86_64::mptable::MAX_VCPUS;

/// Default base kernel command line (`--cmdline` replaces it).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noaux \
i8042.nomux i8042.dumbkbd tsc=reliable nomodule random.trust_cpu=on";
/// Smallest guest memory we accept.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest memory we accept.
pub const MAX_MEMORY_MIB: u64 = 256 * 1024;
/// Most `--disk`s.
pub const MAX_DISKS: usize = 4;

/// Help text after the options: the disk and snapshot contracts.
const AFTER_HELP: &str = "\
Disks:
  --disk PATH[,rw] (repeatable, at most 4) gives the guest a virtio-blk disk on the regular
  file or block device PATH, whose size must be a non-zero multiple of 512 bytes. Disks appear
  in command-line order as /dev/vda, /dev/vdb, ... (they come before every other virtio
  device). A disk is read-only unless `,rw` follows the path: PATH is opened O_RDONLY, the
  guest sees a read-only disk (VIRTIO_BLK_F_RO), and a write or flush it sends anyway fails
  with an I/O error without touching the file. With `,rw` PATH is opened O_RDWR and a guest
  flush is an fdatasync. GET_ID answers `cloude-disk-<index>` (0 for vda). A PATH containing
  `,` (other than the `,rw` suffix), a missing file, one that is not a regular file or block
  device, or one of the wrong size is refused at start (exit status 2).

Snapshots:
  --snapshot-control PATH: the VMM also listens on the Unix socket PATH. One line
  `SNAPSHOT <absolute dir>` pauses every vCPU and the devices, writes <dir>/state and
  <dir>/memory (guest RAM, zero pages as holes), fsyncs both, answers `OK`, and exits 0 without
  resuming the guest; a failure answers `ERR <sentence>` and exits 1. Other input is answered
  `ERR <sentence>` and the VM keeps running. --snapshot-tag TAG is recorded in the state.

  --restore DIR (instead of --kernel/--initrd/--cmdline) resumes the snapshot in DIR with
  --memory-mib and --vcpus as when it was taken and the same devices: as many --disk, each
  of the same size and mode (read-only or ,rw), in the same order, holding what they held when
  the snapshot was taken (the VMM checks sizes and modes, not the bytes). vsock gets the new
  --vsock-cid/--vsock-uds (the guest sees a transport reset: its connections are dropped, its
  listeners stay), net the new tap. DIR/memory is mapped copy-on-write from a read-only fd.
  A snapshot that does not fit (truncated, corrupt, foreign, other format or VMM version,
  other shape, other --snapshot-tag) is refused with `cloude-vmm: snapshot refused: <reason>`
  and exit status 3.";

/// `cloude-vmm`: boots one Linux micro-VM on KVM.
#[derive(Debug, Parser)]
#[command(name = "cloude-vmm", version, about, after_help = AFTER_HELP)]
#[command(group(clap::ArgGroup::new("net").args(["tap", "tap_fd"])))]
pub struct Cli {
    /// Guest kernel: an ELF vmlinux (PVH entry preferred) or a bzImage.
    #[arg(long, required_unless_present = "restore", conflicts_with = "restore")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long, required_unless_present = "restore", conflicts_with = "restore")]
    pub initrd: Option<PathBuf>,
    /// Replaces the default base kernel command line.
    #[arg(long, conflicts_with = "restore")]
    pub cmdline: Option<String>,
    /// Resume the snapshot in this directory (its `state` and `memory`) instead of booting.
    #[arg(long)]
    pub restore: Option<PathBuf>,
    /// Listen on this Unix socket for `SNAPSHOT <dir>` (see below).
    #[arg(long)]
    pub snapshot_control: Option<PathBuf>,
    /// Recorded in a snapshot taken by this VMM; a restore must give the same tag.
    #[arg(long)]
    pub snapshot_tag: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest vsock context id (>= 3).
    #[arg(long, requires = "vsock_uds")]
    pub vsock_cid: Option<u32>,
    /// Host Unix socket for vsock (`CONNECT <port>`); guest connections to port P go to `<path>_P`.
    #[arg(long, requires = "vsock_cid")]
    pub vsock_uds: Option<PathBuf>,
    /// Tap device for virtio-net (created if it does not exist).
    #[arg(long)]
    pub tap: Option<String>,
    /// An open tap file descriptor inherited from the caller, instead of `--tap` (the caller
    /// created and configured it; the tap goes away when both sides have closed it).
    #[arg(long)]
    pub tap_fd: Option<i32>,
    /// Guest MAC address (default: derived from the tap name, or fixed with `--tap-fd`).
    #[arg(long, requires = "net")]
    pub guest_mac: Option<String>,
    /// Guest IPv4 address with prefix, e.g. 10.0.0.2/30 (sets the kernel `ip=`).
    #[arg(long, requires = "net", requires = "host_ip")]
    pub guest_ip: Option<String>,
    /// Host (gateway) IPv4 address on the tap.
    #[arg(long, requires = "guest_ip")]
    pub host_ip: Option<String>,
    /// Do not ask for transparent huge pages on guest RAM (faster VMM start-up where the host
    /// compacts memory synchronously, slower guest boot).
    #[arg(long)]
    pub no_huge_pages: bool,
    /// Run without seccomp filters. For debugging only: the server never passes it.
    #[arg(long)]
    pub no_seccomp: bool,
    /// A virtio-blk disk: `PATH` (read-only) or `PATH,rw` (repeatable, at most 4; the first is
    /// /dev/vda). See below.
    #[arg(long = "disk", value_name = "PATH[,rw]")]
    pub disks: Vec<String>,
    /// Test hook: issue a forbidden system call from the main thread this many ms after the
    /// filters are installed (the seccomp kill test; never passed outside tests).
    #[arg(long, hide = true)]
    pub test_seccomp_violation_after_ms: Option<u64>,
}

/// Validation errors (one sentence each).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--memory-mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, got {0}")]
    Memory(u64),
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error("--vsock-cid must be at least 3 and below 2^32-1, got {0}")]
    Cid(u32),
    #[error("--guest-mac {0:?} is not a MAC address like 06:00:0a:00:00:02")]
    Mac(String),
    #[error("--guest-ip {0:?} is not an IPv4 address with a prefix like 10.0.0.2/30")]
    GuestIp(String),
    #[error("--tap-fd {0} is not an open tap device: {1}")]
    TapFd(i32, String),
    #[error("--host-ip {0:?} is not an IPv4 address")]
    HostIp(String),
    #[error("--tap name {0:?} must be 1 to 15 characters without '/' or whitespace")]
    Tap(String),
    #[error(
        "--snapshot-tag must be 1 to {} printable ASCII characters",
        crate::snapshot::MAX_TAG_LEN
    )]
    Tag,
    #[error("the {what} {path} does not exist or cannot be read: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--disk is given {0} times, at most {MAX_DISKS} disks are supported")]
    Disks(usize),
    #[error("--disk {0:?} is not PATH or PATH,rw (a disk path may not contain ',')")]
    DiskSpec(String),
    #[error("the disk {path} {reason}")]
    Disk { path: PathBuf, reason: String },
}

/// Where the tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// Opened (created if needed) by name.
    Name(String),
    /// Inherited open file descriptor.
    Fd(i32),
}

/// Network settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: TapSource,
    pub mac: [u8; 6],
    /// Guest address, prefix length and host address.
    pub ip: Option<(Ipv4Addr, u8, Ipv4Addr)>,
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Size in bytes when validated (the VMM refuses to start if it changes before the open).
    pub size: u64,
}

/// Parses one `--disk` value: `PATH` or `PATH,rw`.
pub fn parse_disk(spec: &str) -> Result<(PathBuf, bool), ConfigError> {
    let (path, read_only) = match spec.strip_suffix(",rw") {
        Some(p) => (p, false),
        None => (spec, true),
    };
    if path.is_empty() || path.contains(',') {
        return Err(ConfigError::DiskSpec(spec.to_string()));
    }
    Ok((PathBuf::from(path), read_only))
}

/// Opens a disk (`O_RDONLY`, or `O_RDWR` when not `read_only`; close-on-exec) and checks it: a
/// regular file or block device whose size is a non-zero multiple of 512. Returns it and its
/// size.
pub fn open_disk(
    path: &std::path::Path,
    read_only: bool,
) -> Result<(std::fs::File, u64), ConfigError> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let refuse = |reason: String| ConfigError::Disk {
        path: path.to_path_buf(),
        reason,
    };
    let mode = if read_only { "read-only" } else { "read-write" };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| refuse(format!("cannot be opened {mode}: {e}")))?;
    let kind = file
        .metadata()
        .map_err(|e| refuse(format!("cannot be examined: {e}")))?
        .file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(refuse("is not a regular file or a block device".into()));
    }
    // The end offset: the size of a regular file and of a block device alike.
    let size = file
        .seek(std::io::SeekFrom::End(0))
        .map_err(|e| refuse(format!("has no size: {e}")))?;
    let sector = crate::devices::virtio::block::SECTOR_SIZE;
    if size == 0 {
        return Err(refuse("is empty".into()));
    }
    if !size.is_multiple_of(sector) {
        return Err(refuse(format!(
            "is {size} bytes, not a multiple of {sector}"
        )));
    }
    Ok((file, size))
}

/// How the guest starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// A fresh boot of a kernel and initramfs.
    Kernel { kernel: PathBuf, initrd: PathBuf },
    /// Resume the snapshot in this directory.
    Restore(PathBuf),
}

/// Validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub boot: Boot,
    /// Kernel command line (fresh boots only).
    pub cmdline: String,
    /// The snapshot control socket.
    pub snapshot_control: Option<PathBuf>,
    /// Recorded in snapshots / required of restored ones.
    pub snapshot_tag: Option<String>,
    pub mem_size: u64,
    pub vcpus: u8,
    pub vsock: Option<(u32, PathBuf)>,
    pub net: Option<NetConfig>,
    /// virtio-blk disks in guest order (vda first).
    pub disks: Vec<DiskConfig>,
    /// Transparent huge pages for guest RAM.
    pub huge_pages: bool,
    /// Per-thread seccomp filters (on unless `--no-seccomp`).
    pub seccomp: bool,
    /// See [`Cli::test_seccomp_violation_after_ms`].
    pub test_seccomp_violation_after_ms: Option<u64>,
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// A locally administered unicast MAC derived from the tap name.
fn default_mac(tap: &str) -> [u8; 6] {
    let h = tap.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let b = h.to_be_bytes();
    [0x06, 0x00, b[0], b[1], b[2], b[3]]
}

impl Cli {
    /// Validates the flags.
    pub fn validate(self) -> Result<VmConfig, ConfigError> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        let boot = match (self.restore, self.kernel, self.initrd) {
            (Some(dir), _, _) => Boot::Restore(dir),
            (None, Some(kernel), Some(initrd)) => {
                for (what, path) in [("kernel", &kernel), ("initrd", &initrd)] {
                    std::fs::File::open(path).map_err(|e| ConfigError::File {
                        what,
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                }
                Boot::Kernel { kernel, initrd }
            }
            // clap requires both unless --restore is given.
            (None, k, _) => {
                return Err(ConfigError::File {
                    what: if k.is_none() { "kernel" } else { "initrd" },
                    path: PathBuf::new(),
                    reason: "not given".into(),
                })
            }
        };
        if let Some(t) = &self.snapshot_tag {
            if t.is_empty()
                || t.len() > crate::snapshot::MAX_TAG_LEN
                || !t.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ConfigError::Tag);
            }
        }
        let vsock = match (self.vsock_cid, self.vsock_uds) {
            (Some(cid), Some(uds)) if cid >= 3 && cid != u32::MAX => Some((cid, uds)),
            (Some(cid), Some(_)) => return Err(ConfigError::Cid(cid)),
            _ => None,
        };
        let tap = match (self.tap, self.tap_fd) {
            (Some(tap), _) => {
                if tap.is_empty()
                    || tap.len() > 15
                    || tap.contains('/')
                    || tap.contains(char::is_whitespace)
                {
                    return Err(ConfigError::Tap(tap));
                }
                Some(TapSource::Name(tap))
            }
            (None, Some(fd)) => {
                check_tap_fd(fd)?;
                Some(TapSource::Fd(fd))
            }
            (None, None) => None,
        };
        let net = match tap {
            None => None,
            Some(tap) => {
                let mac = match (&self.guest_mac, &tap) {
                    (Some(m), _) => parse_mac(m).ok_or_else(|| ConfigError::Mac(m.clone()))?,
                    (None, TapSource::Name(name)) => default_mac(name),
                    (None, TapSource::Fd(_)) => default_mac(""),
                };
                let ip = match (&self.guest_ip, &self.host_ip) {
                    (Some(g), Some(h)) => {
                        let bad = || ConfigError::GuestIp(g.clone());
                        let (a, p) = g.split_once('/').ok_or_else(bad)?;
                        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
                        let prefix: u8 = p.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
                        let host: Ipv4Addr =
                            h.parse().map_err(|_| ConfigError::HostIp(h.clone()))?;
                        Some((addr, prefix, host))
                    }
                    _ => None,
                };
                Some(NetConfig { tap, mac, ip })
            }
        };
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::Disks(self.disks.len()));
        }
        let mut disks = Vec::with_capacity(self.disks.len());
        for spec in &self.disks {
            let (path, read_only) = parse_disk(spec)?;
            let (_, size) = open_disk(&path, read_only)?;
            disks.push(DiskConfig {
                path,
                read_only,
                size,
            });
        }
        Ok(VmConfig {
            boot,
            snapshot_control: self.snapshot_control,
            snapshot_tag: self.snapshot_tag,
            cmdline: self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            mem_size: self.memory_mib << 20,
            vcpus: self.vcpus,
            vsock,
            net,
            disks,
            huge_pages: !self.no_huge_pages,
            seccomp: !self.no_seccomp,
            test_seccomp_violation_after_ms: self.test_seccomp_violation_after_ms,
        })
    }
}

/// Checks that `fd` is open and is a tun/tap device (TUNGETIFF answers only on those).
fn check_tap_fd(fd: i32) -> Result<(), ConfigError> {
    const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    if fd < 0 {
        return Err(ConfigError::TapFd(fd, "negative".into()));
    }
    let mut ifreq = [0u8; 40];
    // SAFETY: TUNGETIFF writes at most a `struct ifreq` (40 bytes) into the live buffer; on any
    // other kind of fd the kernel fails the call without writing.
    let r = unsafe { libc::ioctl(fd, TUNGETIFF, ifreq.as_mut_ptr()) };
    if r < 0 {
        return Err(ConfigError::TapFd(
            fd,
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(())
}

/// The kernel `ip=` argument for a static guest address (the tap crate's one spelling).
pub use cloude_tap::kernel_ip_arg as ip_arg;

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<VmConfig, ConfigError> {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        let p = f.path().to_str().expect("utf8").to_string();
        let mut v = vec!["cloude-vmm", "--kernel", &p, "--initrd", &p];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).expect("parse").validate()
    }

    #[test]
    fn defaults_and_limits() {
        let c = cli(&[]).expect("valid");
        assert_eq!(c.mem_size, 256 << 20);
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert!(matches!(cli(&["--vcpus", "0"]), Err(ConfigError::Vcpus(0))));
        assert!(matches!(
            cli(&["--memory-mib", "1"]),
            Err(ConfigError::Memory(1))
        ));
        assert!(matches!(
            cli(&["--vsock-cid", "2", "--vsock-uds", "/x"]),
            Err(ConfigError::Cid(2))
        ));
    }

    #[test]
    fn network_flags() {
        let c = cli(&[
            "--tap",
            "tap0",
            "--guest-mac",
            "06:00:0a:00:00:02",
            "--guest-ip",
            "10.0.0.2/30",
            "--host-ip",
            "10.0.0.1",
        ])
        .expect("valid");
        let n = c.net.expect("net");
        assert_eq!(n.mac, [6, 0, 10, 0, 0, 2]);
        let (a, p, h) = n.ip.expect("ip");
        assert_eq!(
            ip_arg(a, p, h),
            "ip=10.0.0.2::10.0.0.1:255.255.255.252::eth0:off"
        );
        assert!(matches!(
            cli(&["--tap", "t", "--guest-mac", "zz"]),
            Err(ConfigError::Mac(_))
        ));
        assert!(matches!(
            cli(&[
                "--tap",
                "t",
                "--guest-ip",
                "10.0.0.2/40",
                "--host-ip",
                "10.0.0.1"
            ]),
            Err(ConfigError::GuestIp(_))
        ));
    }

    #[test]
    fn tap_fd_must_be_a_tap() {
        assert!(matches!(
            cli(&["--tap-fd", "0"]),
            Err(ConfigError::TapFd(0, _))
        ));
        assert!(matches!(
            cli(&["--tap-fd=-5"]),
            Err(ConfigError::TapFd(-5, _))
        ));
        let f = tempfile::NamedTempFile::new().expect("tmp");
        let p = f.path().to_str().expect("utf8").to_string();
        let both = Cli::try_parse_from([
            "cloude-vmm",
            "--kernel",
            &p,
            "--initrd",
            &p,
            "--tap",
            "t",
            "--tap-fd",
            "3",
        ]);
        assert!(both.is_err(), "--tap and --tap-fd exclude each other");
    }

    #[test]
    fn restore_needs_no_kernel_and_excludes_it() {
        let c = Cli::try_parse_from(["cloude-vmm", "--restore", "/snap", "--snapshot-tag", "t1"])
            .expect("parse")
            .validate()
            .expect("valid");
        assert_eq!(c.boot, Boot::Restore("/snap".into()));
        assert_eq!(c.snapshot_tag.as_deref(), Some("t1"));
        assert!(Cli::try_parse_from(["cloude-vmm", "--restore", "/s", "--kernel", "/k"]).is_err());
        assert!(Cli::try_parse_from(["cloude-vmm", "--memory-mib", "64"]).is_err());
        assert!(matches!(
            cli(&["--snapshot-tag", "a b"]),
            Err(ConfigError::Tag)
        ));
        let long = "x".repeat(crate::snapshot::MAX_TAG_LEN + 1);
        assert!(matches!(
            cli(&["--snapshot-tag", &long]),
            Err(ConfigError::Tag)
        ));
    }

    fn disk_file(len: usize) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        f.as_file().set_len(len as u64).expect("size");
        f
    }

    #[test]
    fn disks_in_order_read_only_by_default() {
        let (a, b) = (disk_file(4096), disk_file(1 << 20));
        let (pa, pb) = (
            a.path().to_str().expect("utf8"),
            b.path().to_str().expect("utf8"),
        );
        let rw = format!("{pb},rw");
        let c = cli(&["--disk", pa, "--disk", &rw]).expect("valid");
        assert_eq!(
            c.disks,
            vec![
                DiskConfig {
                    path: pa.into(),
                    read_only: true,
                    size: 4096
                },
                DiskConfig {
                    path: pb.into(),
                    read_only: false,
                    size: 1 << 20
                },
            ]
        );
        assert!(cli(&[]).expect("valid").disks.is_empty());
        // O_RDONLY by default, O_RDWR with `,rw`.
        let (f, size) = open_disk(a.path(), true).expect("open");
        assert_eq!(size, 4096);
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL only reads the flags of an fd this test owns.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
        let (f, _) = open_disk(b.path(), false).expect("open");
        // SAFETY: as above.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDWR);
        assert!(AFTER_HELP.contains(&format!("at most {MAX_DISKS}")));
    }

    #[test]
    fn bad_disks_are_refused_with_one_sentence() {
        let f = disk_file(4096);
        let p = f.path().to_str().expect("utf8").to_string();
        let five: Vec<&str> = (0..MAX_DISKS + 1).flat_map(|_| ["--disk", &p]).collect();
        assert!(matches!(cli(&five), Err(ConfigError::Disks(5))));
        let four: Vec<&str> = (0..MAX_DISKS).flat_map(|_| ["--disk", &p]).collect();
        assert_eq!(cli(&four).expect("four disks").disks.len(), MAX_DISKS);
        for spec in [
            format!("{p},ro"),
            format!("{p},rw,rw"),
            format!("a,{p}"),
            ",rw".to_string(),
            String::new(),
        ] {
            let e = cli(&["--disk", &spec]).expect_err(&spec);
            assert!(matches!(e, ConfigError::DiskSpec(_)), "{spec}: {e}");
        }
        let (empty, odd) = (disk_file(0), disk_file(1000));
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing.img");
        let cases: [(&std::path::Path, &str); 5] = [
            (&missing, "cannot be opened read-only: No such file"),
            (dir.path(), "is not a regular file or a block device"),
            (
                std::path::Path::new("/dev/null"),
                "is not a regular file or a block device",
            ),
            (empty.path(), "is empty"),
            (odd.path(), "is 1000 bytes, not a multiple of 512"),
        ];
        for (path, want) in cases {
            let e = cli(&["--disk", path.to_str().expect("utf8")]).expect_err("refused");
            let msg = e.to_string();
            assert!(matches!(e, ConfigError::Disk { .. }), "{msg}");
            assert!(msg.contains(want), "{msg}");
            assert!(msg.contains(path.to_str().expect("utf8")), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        let rw = format!("{},rw", missing.display());
        let e = cli(&["--disk", &rw]).expect_err("missing");
        assert!(e.to_string().contains("cannot be opened read-write"), "{e}");
        // Exit status 2 is main's for every ConfigError; a restore validates disks too.
        let f2 = disk_file(512);
        let r = Cli::try_parse_from([
            "cloude-vmm",
            "--restore",
            "/snap",
            "--disk",
            f2.path().to_str().expect("utf8"),
        ])
        .expect("parse")
        .validate()
        .expect("valid");
        assert_eq!(r.disks.len(), 1);
    }

    #[test]
    fn missing_file_is_named() {
        let e = Cli::try_parse_from([
            "cloude-vmm",
            "--kernel",
            "/nonexistent/k",
            "--initrd",
            "/nonexistent/i",
        ])
        .expect("parse")
        .validate()
        .expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/k"), "{e}");
    }
}
