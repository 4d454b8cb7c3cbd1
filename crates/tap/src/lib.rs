//! Linux tap devices: `/dev/net/tun` and its `TUNSETIFF` ioctl, the `struct ifreq` that names
//! an interface, and the guest kernel's `ip=` argument for a tap-backed guest — the one
//! definition, used by `cloude-vmm` (a tap given by name or fd) and by `cloude-server` (one tap
//! per VM for the tcp transport).
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

// `TUNSETIFF` is `_IOW('T', 202, int)` although it reads and writes a `struct ifreq`.
nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);

/// A zeroed `struct ifreq` naming interface `name` (1 to 15 bytes).
pub fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must be 1-15 bytes"),
        ));
    }
    // SAFETY: `ifreq` is a C struct of integers and unions of them; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(ifr)
}

/// Opens tap `name` (creating it, not persistent: it lives while an fd to it is open), without
/// packet information, close-on-exec, and non-blocking when asked.
pub fn open(name: &str, nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = libc::O_CLOEXEC;
    if nonblocking {
        flags |= libc::O_NONBLOCK;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/net/tun: {e}")))?;
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
    // SAFETY: TUNSETIFF reads and writes the `struct ifreq` that lives across the call; the fd
    // is the tun control device.
    unsafe { tunsetiff(file.as_raw_fd(), &ifr) }.map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot create tap {name}: {e}"),
        )
    })?;
    Ok(OwnedFd::from(file))
}

/// The kernel `ip=` argument that gives a guest the static address `addr/prefix` on `eth0`
/// with `host` as its gateway (no autoconfiguration): the one spelling, used by `cloude-vmm`
/// (`--guest-ip`/`--host-ip`) and by the server for QEMU.
pub fn kernel_ip_arg(addr: Ipv4Addr, prefix: u8, host: Ipv4Addr) -> String {
    let mask = match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    };
    format!("ip={addr}::{host}:{}::eth0:off", Ipv4Addr::from(mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(ifreq("cld7").is_ok());
        for bad in ["", "a-name-far-too-long", "a\0b"] {
            assert!(ifreq(bad).is_err(), "{bad:?}");
        }
        let r = ifreq("eth0").expect("ifreq");
        assert_eq!(
            r.ifr_name[..5],
            [b'e', b't', b'h', b'0', 0].map(|b| b as libc::c_char)
        );
    }

    #[test]
    fn request_code_is_the_kernels() {
        // <linux/if_tun.h>: #define TUNSETIFF _IOW('T', 202, int)
        assert_eq!(
            nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()) as u64,
            0x4004_54ca
        );
    }

    #[test]
    fn a_tap_is_made_and_gone_with_its_fd() {
        if !std::path::Path::new("/dev/net/tun").exists() || !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs /dev/net/tun and root");
            return;
        }
        let name = format!("cldt{}", std::process::id() % 100_000);
        let fd = open(&name, true).expect("tap");
        let sys = std::path::PathBuf::from("/sys/class/net").join(&name);
        assert!(
            sys.exists(),
            "{} exists while the fd is open",
            sys.display()
        );
        drop(fd);
        assert!(!sys.exists(), "not persistent");
    }

    #[test]
    fn ip_arg_spells_the_mask() {
        let (g, h) = (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(
            kernel_ip_arg(g, 30, h),
            "ip=10.0.0.2::10.0.0.1:255.255.255.252::eth0:off"
        );
        assert_eq!(
            kernel_ip_arg(g, 24, h),
            "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off"
        );
        assert_eq!(
            kernel_ip_arg(g, 0, h),
            "ip=10.0.0.2::10.0.0.1:0.0.0.0::eth0:off"
        );
    }
}
