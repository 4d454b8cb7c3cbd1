//! TCP: served when the VM was given an IPv4 address (kernel `ip=` autoconfiguration).

use std::net::Ipv4Addr;

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

/// The IPv4 default gateway from the text of `/proc/net/route` (addresses there are hex in
/// network byte order read as a little-endian word).
pub fn default_gateway(route_table: &str) -> Option<Ipv4Addr> {
    route_table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[1] != "00000000" {
            return None;
        }
        let g = u32::from_str_radix(f[2], 16).ok().filter(|g| *g != 0)?;
        Some(Ipv4Addr::from(g.to_le_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_from_route_table() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t00000000\t0100C90A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                 eth0\t0000C90A\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0\n";
        assert_eq!(default_gateway(t), Some(Ipv4Addr::new(10, 201, 0, 1)));
        let no_default = "Iface\tDestination\tGateway\n\
                          eth0\t0000C90A\t00000000\t0001\n";
        assert_eq!(default_gateway(no_default), None);
        assert_eq!(default_gateway(""), None);
    }
}
