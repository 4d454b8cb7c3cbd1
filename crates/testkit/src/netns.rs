//! A network namespace for tests that run `cloude-server` with the tcp transport: a veth pair
//! from the test's namespace to it, deleted with everything in it on drop.

use std::process::Command;

pub fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace with a veth pair to it; deleted (with everything in it) on drop.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    /// The server's address inside the namespace.
    pub inner_ip: String,
    /// The test side's address (outside the namespace) of the veth pair.
    pub outer_ip: String,
}

impl Netns {
    pub fn create() -> Result<Netns, String> {
        // Unique per test process and per call: tests of one binary run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = (std::process::id().wrapping_mul(8).wrapping_add(n)) % 60_000;
        let name = format!("cloude-tcp-{id}");
        let host_if = format!("ctcp{id}h");
        let peer_if = format!("ctcp{id}n");
        // A /30 out of 10.250/16 chosen by pid, away from the VMs' 10.201/16.
        let (a, b) = ((id / 64) % 256, (id % 64) * 4);
        let host_ip = format!("10.250.{a}.{}", b + 1);
        let inner_ip = format!("10.250.{a}.{}", b + 2);
        let _ = sh(&["ip", "netns", "del", &name]);
        let _ = sh(&["ip", "link", "del", &host_if]);
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns {
            name,
            host_if,
            inner_ip,
            outer_ip: host_ip.clone(),
        };
        let n = ns.name.as_str();
        sh(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
            "netns",
            n,
        ])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &ns.host_if,
        ])?;
        sh(&["ip", "link", "set", &ns.host_if, "up"])?;
        sh(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{}/30", ns.inner_ip),
            "dev",
            &peer_if,
        ])?;
        sh(&["ip", "-n", n, "link", "set", &peer_if, "up"])?;
        sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Names of the `cld*` taps in the namespace.
    pub fn taps(&self) -> Vec<String> {
        sh(&["ip", "-n", &self.name, "-o", "link"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("cld"))
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
        let _ = sh(&["ip", "link", "del", &self.host_if]);
    }
}

pub fn skip_reason() -> Option<String> {
    // SAFETY-free check: the effective uid from /proc (no libc needed in tests).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().nth(1))
        .unwrap_or("");
    if euid != "0" {
        return Some(format!(
            "needs root for taps and network namespaces (euid {euid})"
        ));
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    if sh(&["ip", "-V"]).is_err() {
        return Some("no `ip` command (iproute2)".into());
    }
    None
}
