//! TCP: served when the VM was given an IPv4 address (kernel `ip=` autoconfiguration).

use nix::ifaddrs::getifaddrs;
use nix::net::if_::InterfaceFlags;

/// Whether a non-loopback interface has an IPv4 address.
pub fn has_ipv4_interface() -> bool {
    let Ok(addrs) = getifaddrs() else {
        return false;
    };
    addrs.into_iter().any(|a| {
        !a.flags.contains(InterfaceFlags::IFF_LOOPBACK)
            && a.address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .is_some()
    })
}
