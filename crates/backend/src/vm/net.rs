//! Per-VM networking for the tcp transport: one tap per VM with its own /30 (host `.1`, guest
//! `.2`), created and configured here with ioctls and handed to the hypervisor as an inherited
//! fd. The tap is not persistent: it disappears when the last fd (ours, the hypervisor's) is
//! closed, so a crashed server or hypervisor leaves no tap behind.
#![allow(unsafe_code)]

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The fd number the hypervisor finds the tap on.
pub const CHILD_TAP_FD: RawFd = 3;
/// Each VM's link is a /30: the host's address and the guest's.
pub const PREFIX_LEN: u8 = 30;

/// Address plan: a subnet cut into /30 blocks, one per VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetPlan {
    base: u32,
    blocks: u32,
}

impl NetPlan {
    /// `subnet` like `10.201.0.0/16`; between /16 and /29 (at least two VMs).
    pub fn parse(subnet: &str) -> Result<Self, String> {
        let bad = || format!("network.subnet {subnet:?} is not an IPv4 subnet like 10.201.0.0/16");
        let (a, p) = subnet.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u32 = p.parse().map_err(|_| bad())?;
        if !(16..=29).contains(&prefix) {
            return Err(format!(
                "network.subnet {subnet:?}: the prefix must be between /16 and /29"
            ));
        }
        let mask = u32::MAX << (32 - prefix);
        let base = u32::from(addr);
        if base & !mask != 0 {
            return Err(format!(
                "network.subnet {subnet:?}: host bits are set (did you mean {}/{prefix}?)",
                Ipv4Addr::from(base & mask)
            ));
        }
        Ok(NetPlan {
            base,
            blocks: 1 << (32 - prefix - 2),
        })
    }

    /// How many VMs can be addressed at once.
    pub fn blocks(&self) -> u32 {
        self.blocks
    }

    /// Host and guest addresses of block `i`.
    pub fn addresses(&self, i: u32) -> (Ipv4Addr, Ipv4Addr) {
        let b = self.base + (i % self.blocks) * 4;
        (Ipv4Addr::from(b + 1), Ipv4Addr::from(b + 2))
    }
}

/// One VM's tap, configured and up.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
    /// Guest MAC (locally administered, from the guest address).
    pub mac: [u8; 6],
    /// The secret the VM's agent asks of every TCP peer (`cloude_protocol::AGENT_TOKEN_PARAM`),
    /// fresh from the kernel's CSPRNG for each VM.
    pub token: String,
    fd: OwnedFd,
    /// The host-side rules around the tap (dropped after `fd`: they are removed once the tap is
    /// gone, see `fence`).
    rules: Option<super::fence::Rules>,
}

impl Tap {
    /// Creates tap `name` with `host`/30 on it and sets it up.
    pub fn create(name: &str, host: Ipv4Addr, guest: Ipv4Addr) -> std::io::Result<Self> {
        let fd = open_tap(name)?;
        configure(name, host, PREFIX_LEN)
            .map_err(|e| ctx(e, &format!("cannot configure tap {name}")))?;
        let g = guest.octets();
        let mut secret = [0u8; cloude_protocol::AGENT_TOKEN_HEX / 2];
        crate::agent::fill_random(&mut secret)?;
        Ok(Tap {
            name: name.to_string(),
            host,
            guest,
            mac: [0x06, 0x00, g[0], g[1], g[2], g[3]],
            token: secret.iter().map(|b| format!("{b:02x}")).collect(),
            fd,
            rules: None,
        })
    }

    /// Installs the host-side rules around this tap (offline until [`Tap::open_network`]).
    pub fn fence(&mut self, fence: &std::sync::Arc<super::fence::Fence>) -> std::io::Result<()> {
        let rules = fence
            .install(&self.name, self.mac, self.guest)
            .map_err(std::io::Error::other)?;
        self.rules = Some(rules);
        Ok(())
    }

    /// The host-side rules, when they are on.
    pub fn rules(&self) -> Option<&super::fence::Rules> {
        self.rules.as_ref()
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// `aa:bb:...` form of the guest MAC.
    pub fn mac_string(&self) -> String {
        super::fence::mac_string(self.mac)
    }

    /// The kernel `ip=` argument for the guest (QEMU's command line; cloude-vmm is given
    /// [`Tap::guest_cidr`] and writes it itself, with the same function).
    pub fn kernel_ip_arg(&self) -> String {
        cloude_tap::kernel_ip_arg(self.guest, PREFIX_LEN, self.host)
    }

    /// The guest's address with its prefix (`10.x.y.z/30`), for `cloude-vmm --guest-ip`.
    pub fn guest_cidr(&self) -> String {
        format!("{}/{PREFIX_LEN}", self.guest)
    }
}

/// Creates (non-persistent) tap `name`; it lives as long as an fd to it is open.
fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    cloude_tap::open(name, false)
}

fn ctx(e: std::io::Error, what: &str) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

use cloude_tap::ifreq;

fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and both are plain data;
    // the kernel reads it back as sockaddr_in because of the family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Sets `addr/prefix` on `name` and brings it up.
fn configure(name: &str, addr: Ipv4Addr, prefix: u8) -> std::io::Result<()> {
    // SAFETY: a plain socket() call; the result is checked before use.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh fd that nothing else owns.
    let sock = unsafe { File::from_raw_fd(s) };
    let ioctl = |req: libc::c_ulong, ifr: &mut libc::ifreq| -> std::io::Result<()> {
        // SAFETY: the SIOC[GS]IF* requests used here read/write one `struct ifreq`, which lives
        // across the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), req, ifr as *mut libc::ifreq) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_addr = sockaddr(addr);
    ioctl(libc::SIOCSIFADDR, &mut ifr)?;
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix))));
    ioctl(libc::SIOCSIFNETMASK, &mut ifr)?;
    let mut ifr = ifreq(name)?;
    ioctl(libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(libc::SIOCSIFFLAGS, &mut ifr)
}

/// Checks at start-up that taps can be made here (root or CAP_NET_ADMIN, `/dev/net/tun`).
pub fn preflight() -> Result<(), String> {
    let name = format!("cldchk{}", std::process::id() % 100_000);
    open_tap(&name).map(drop).map_err(|e| {
        format!("vm.transport = \"tcp\" needs tap devices (root or CAP_NET_ADMIN): {e}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_parses_and_cuts_blocks() {
        let p = NetPlan::parse("10.201.0.0/16").expect("valid");
        assert_eq!(p.blocks(), 16384);
        assert_eq!(
            p.addresses(0),
            (Ipv4Addr::new(10, 201, 0, 1), Ipv4Addr::new(10, 201, 0, 2))
        );
        assert_eq!(
            p.addresses(64),
            (Ipv4Addr::new(10, 201, 1, 1), Ipv4Addr::new(10, 201, 1, 2))
        );
        assert_eq!(p.addresses(16384), p.addresses(0));
        assert!(NetPlan::parse("10.201.0.1/16").is_err());
        assert!(NetPlan::parse("10.201.0.0/30").is_err());
        assert!(NetPlan::parse("10.201.0.0").is_err());
        assert!(NetPlan::parse("nonsense/16").is_err());
    }
}
