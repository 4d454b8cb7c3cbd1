//! Host-side rules around every VM's tap (tcp transport), in nftables: whatever root in the
//! guest does, only the VM's own MAC and IPv4 address leave its tap, the host opens only the
//! agent's port, and the guest opens nothing, unless its request may use the network.
//!
//! Per VM, two tables named `cloude_<pid>_<start>_<tap>` (the server's pid and start time, so that
//! a starting server tells its own tables from those of a killed one; see [`Fence::start`]):
//!
//! - `netdev` table, chain `guard` on the tap's ingress (frames the guest sends), policy drop:
//!   a frame whose ether source is not the VM's MAC is dropped; IPv4 is accepted only from the
//!   guest's address, ARP only with the guest's MAC and address as sender; everything else
//!   (IPv6, VLAN tags, other ether types, spoofed sources) hits the policy.
//! - `inet` table:
//!   - `input`: from the tap, only packets of connections the host opened (the replies of
//!     host → guest:8080), the rest goes through `from_guest`;
//!   - `forward`: nothing is forwarded into the tap unless it belongs to a connection the guest
//!     opened (no VM, host or outside peer opens a connection to a VM through the host); what
//!     the guest sends to be forwarded goes through `from_guest`;
//!   - `output`: to the tap, only tcp to the agent's port from the server's own uid (`meta skuid`) and packets of established
//!     connections;
//!   - `from_guest` (a regular chain) holds one `drop`: the VM is offline. A request with
//!     `network: true` (allowed by `[network] allow`) flushes it ([`Rules::opener`]): the
//!     guest may then open connections to the host and through it, still with its own addresses
//!     only, and still unreachable from other VMs.
//!
//! Lifecycle: [`Fence::install`] runs when the tap is made, before the hypervisor starts; the
//! [`Rules`] live in the [`super::net::Tap`]. Dropping them waits (in a thread, bounded) until the
//! tap device is gone, that is until the hypervisor holding it has died too, and then deletes both
//! tables: the tap never carries a frame without its rules. [`Fence::shutdown`] does the same for
//! every VM at the end of serving, and [`Fence::start`] deletes tables left by killed servers.
//!
//! Every change goes through `nft -j -f -` with a JSON document (`libnftables-json(5)`), one
//! atomic batch per change: never a command line built from strings.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Prefix of every table this project makes.
const TABLE_PREFIX: &str = "cloude_";
/// The netdev guard runs before anything else on the tap's ingress.
const GUARD_PRIORITY: i32 = -500;
/// The inet chains run at the filter priority (a drop in any base chain is final).
const FILTER_PRIORITY: i32 = 0;
/// The chain whose single `drop` keeps a VM offline.
const FROM_GUEST: &str = "from_guest";
/// How often a dropped VM's tap is checked for being gone.
const TAP_POLL: Duration = Duration::from_millis(20);
/// How long a tap may outlive its VM's slot (its hypervisor is dying) before its rules are
/// removed anyway (with a warning: a hypervisor that does not die holds the tap).
const TAP_GONE_WITHIN: Duration = Duration::from_secs(60);
/// At shutdown, how long the killed VMs' taps may take to go before all tables are removed.
const SHUTDOWN_TAPS_WITHIN: Duration = Duration::from_secs(5);
/// Where `nft` is looked for besides `$PATH` (a root shell may lack the sbin directories).
const NFT_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("vm.transport = \"tcp\" needs nft (the Debian package nftables) for the host-side rules around each VM's tap, and it was not found; install it, or set [network] host_rules = false to run without them (not for untrusted code)")]
    NoNft,
    #[error("vm.transport = \"tcp\" cannot install the host-side rules around each VM's tap with {0}: {1}; run cloude-server as root (CAP_NET_ADMIN), or set [network] host_rules = false to run without them (not for untrusted code)")]
    Probe(String, String),
    #[error("cannot install the host-side rules for tap {0}: {1}")]
    Install(String, String),
    #[error("cannot open the network for tap {0}: {1}")]
    Open(String, String),
}

/// This server's nftables access: the `nft` binary and the names of its tables.
pub struct Fence {
    nft: PathBuf,
    /// `cloude_<pid>_<start>_`: this server's tables start with it.
    own_prefix: String,
    /// Taps whose rules are installed (removed once their tables are deleted).
    live: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Fence {
    /// Finds `nft`, proves that it can install and remove a table here, and deletes the tables
    /// of servers that are gone (their `<pid>_<start>` no longer names a live process: the pid is
    /// dead or reused). Assumes servers that share a network namespace share a pid namespace.
    pub fn start() -> Result<Arc<Fence>, FenceError> {
        let nft = find_nft().ok_or(FenceError::NoNft)?;
        let (pid, start) = process_identity(std::process::id()).ok_or_else(|| {
            FenceError::Probe(
                nft.display().to_string(),
                "cannot read /proc/self/stat".into(),
            )
        })?;
        let fence = Arc::new(Fence {
            nft,
            own_prefix: format!("{TABLE_PREFIX}{pid}_{start}_"),
            live: Mutex::new(HashSet::new()),
        });
        let probe = format!("{}probe", fence.own_prefix);
        let doc = vec![
            json!({"add": {"table": {"family": "inet", "name": probe}}}),
            json!({"delete": {"table": {"family": "inet", "name": probe}}}),
        ];
        fence
            .apply(&doc)
            .map_err(|e| FenceError::Probe(fence.nft.display().to_string(), e))?;
        let swept = fence.sweep(|owner| !owner_alive(owner));
        if swept > 0 {
            tracing::info!("host rules: removed {swept} table(s) left by servers that are gone");
        }
        Ok(fence)
    }

    /// One line for the logs and `/healthz`.
    pub fn describe(&self) -> String {
        format!(
            "nftables via {}, tables {}*",
            self.nft.display(),
            self.own_prefix
        )
    }

    /// Installs the rules for one VM's tap (`tap` with guest `mac`/`guest`), offline.
    pub fn install(
        self: &Arc<Self>,
        tap: &str,
        mac: [u8; 6],
        guest: Ipv4Addr,
    ) -> Result<Rules, FenceError> {
        let table = format!("{}{tap}", self.own_prefix);
        let doc = ruleset(&table, tap, &mac_string(mac), guest);
        self.apply(&doc)
            .map_err(|e| FenceError::Install(tap.to_string(), e))?;
        self.live
            .lock()
            .expect("fence lock is never poisoned")
            .insert(tap.to_string());
        Ok(Rules {
            fence: self.clone(),
            table,
            tap: tap.to_string(),
        })
    }

    /// The end of serving (the VMs were killed): waits, bounded, for their taps to go, then
    /// deletes every table of this server.
    pub fn shutdown(&self) {
        let t = Instant::now();
        while t.elapsed() < SHUTDOWN_TAPS_WITHIN {
            let taps: Vec<String> = self
                .live
                .lock()
                .expect("fence lock is never poisoned")
                .iter()
                .cloned()
                .collect();
            if taps.iter().all(|t| !tap_exists(t)) {
                break;
            }
            std::thread::sleep(TAP_POLL);
        }
        let own = self.own_prefix.clone();
        let n = self.sweep(|owner| format!("{TABLE_PREFIX}{owner}_") == own);
        self.live
            .lock()
            .expect("fence lock is never poisoned")
            .clear();
        if n > 0 {
            tracing::info!("host rules: removed {n} table(s) at shutdown");
        }
    }

    /// Deletes every project table whose owner (`<pid>_<start>`) `stale` says so; returns how
    /// many were deleted.
    fn sweep(&self, stale: impl Fn(&str) -> bool) -> usize {
        let Ok(tables) = self.list_tables() else {
            return 0;
        };
        let doomed: Vec<Value> = tables
            .iter()
            .filter(|(_, name)| table_owner(name).is_some_and(&stale))
            .map(|(family, name)| json!({"delete": {"table": {"family": family, "name": name}}}))
            .collect();
        let mut n = 0;
        // One by one: a table another server removes meanwhile fails only its own delete.
        for d in doomed {
            match self.apply(std::slice::from_ref(&d)) {
                Ok(()) => n += 1,
                Err(e) => tracing::debug!("host rules: cannot delete {d}: {e}"),
            }
        }
        n
    }

    /// `(family, name)` of every table in this network namespace.
    fn list_tables(&self) -> Result<Vec<(String, String)>, String> {
        let out = Command::new(&self.nft)
            .args(["-j", "list", "tables"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.nft.display()))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        Ok(v["nftables"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|o| {
                        let t = o.get("table")?;
                        Some((
                            t["family"].as_str()?.to_string(),
                            t["name"].as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Runs one batch of commands (atomic: all or nothing).
    fn apply(&self, commands: &[Value]) -> Result<(), String> {
        let doc =
            serde_json::to_vec(&json!({ "nftables": commands })).map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.nft)
            .args(["-j", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.nft.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&doc)
                .map_err(|e| format!("cannot write to nft: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("").trim();
        Err(format!(
            "nft failed ({}){}",
            out.status,
            if first.is_empty() {
                String::new()
            } else {
                format!(": {first}")
            }
        ))
    }

    fn is_live(&self, tap: &str) -> bool {
        self.live
            .lock()
            .expect("fence lock is never poisoned")
            .contains(tap)
    }

    fn forget(&self, tap: &str) {
        self.live
            .lock()
            .expect("fence lock is never poisoned")
            .remove(tap);
    }
}

/// One VM's installed rules; dropping them removes them once the tap is gone.
pub struct Rules {
    fence: Arc<Fence>,
    table: String,
    tap: String,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rules({})", self.table)
    }
}

impl Rules {
    /// Lets the guest open connections (a request with `network: true`): flushes the
    /// `from_guest` chain's `drop`; the anti-spoofing guard and the closed way in stay. The
    /// closure runs `nft` (tens of ms): run it off the async workers (`spawn_blocking`).
    pub fn opener(&self) -> impl FnOnce() -> Result<(), FenceError> + Send + 'static {
        let fence = self.fence.clone();
        let (table, tap) = (self.table.clone(), self.tap.clone());
        move || {
            let flush =
                json!({"flush": {"chain": {"family": "inet", "table": table, "name": FROM_GUEST}}});
            fence.apply(&[flush]).map_err(|e| FenceError::Open(tap, e))
        }
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        let fence = self.fence.clone();
        let table = std::mem::take(&mut self.table);
        let tap = std::mem::take(&mut self.tap);
        let remove = move || {
            let t = Instant::now();
            while tap_exists(&tap) {
                if t.elapsed() > TAP_GONE_WITHIN {
                    tracing::warn!(
                        "host rules: tap {tap} still exists {} s after its VM ended; removing its rules anyway",
                        TAP_GONE_WITHIN.as_secs()
                    );
                    break;
                }
                std::thread::sleep(TAP_POLL);
            }
            if !fence.is_live(&tap) {
                // The shutdown sweep removed every table already.
                return;
            }
            let doc = [
                json!({"delete": {"table": {"family": "netdev", "name": table}}}),
                json!({"delete": {"table": {"family": "inet", "name": table}}}),
            ];
            if let Err(e) = fence.apply(&doc) {
                tracing::error!("host rules: cannot remove the tables {table}: {e}");
            }
            fence.forget(&tap);
        };
        if std::thread::Builder::new()
            .name("fence-remove".into())
            .spawn(remove)
            .is_err()
        {
            tracing::error!(
                "host rules: cannot start the removal thread; left for the shutdown sweep"
            );
        }
    }
}

/// The two tables of one VM, as one batch of `add` commands.
fn ruleset(table: &str, tap: &str, mac: &str, guest: Ipv4Addr) -> Vec<Value> {
    let guest = guest.to_string();
    let port = cloude_protocol::AGENT_TCP_PORT;
    let server_uid = nix::unistd::geteuid().as_raw();
    let is =
        |left: Value, right: Value| json!({"match": {"op": "==", "left": left, "right": right}});
    let payload =
        |proto: &str, field: &str| json!({"payload": {"protocol": proto, "field": field}});
    let meta = |key: &str| json!({"meta": {"key": key}});
    let established = json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}});
    let accept = json!({"accept": null});
    let drop = json!({"drop": null});
    let jump = json!({"jump": {"target": FROM_GUEST}});
    let from_tap = is(meta("iifname"), json!(tap));
    let to_tap = is(meta("oifname"), json!(tap));
    let rule = |family: &str, chain: &str, expr: Vec<Value>| json!({"add": {"rule": {"family": family, "table": table, "chain": chain, "expr": expr}}});
    let base = |family: &str, name: &str, hook: &str, prio: i32, policy: &str| {
        let mut c = json!({"family": family, "table": table, "name": name, "type": "filter",
                           "hook": hook, "prio": prio, "policy": policy});
        if family == "netdev" {
            c["dev"] = json!(tap);
        }
        json!({"add": {"chain": c}})
    };
    vec![
        json!({"add": {"table": {"family": "netdev", "name": table}}}),
        base("netdev", "guard", "ingress", GUARD_PRIORITY, "drop"),
        rule(
            "netdev",
            "guard",
            vec![
                json!({"match": {"op": "!=", "left": payload("ether", "saddr"), "right": mac}}),
                drop.clone(),
            ],
        ),
        rule(
            "netdev",
            "guard",
            vec![
                is(meta("protocol"), json!("ip")),
                is(payload("ip", "saddr"), json!(guest)),
                accept.clone(),
            ],
        ),
        rule(
            "netdev",
            "guard",
            vec![
                is(meta("protocol"), json!("arp")),
                is(payload("arp", "saddr ether"), json!(mac)),
                is(payload("arp", "saddr ip"), json!(guest)),
                accept.clone(),
            ],
        ),
        json!({"add": {"table": {"family": "inet", "name": table}}}),
        json!({"add": {"chain": {"family": "inet", "table": table, "name": FROM_GUEST}}}),
        rule("inet", FROM_GUEST, vec![drop.clone()]),
        base("inet", "input", "input", FILTER_PRIORITY, "accept"),
        rule(
            "inet",
            "input",
            vec![from_tap.clone(), established.clone(), accept.clone()],
        ),
        rule("inet", "input", vec![from_tap.clone(), jump.clone()]),
        base("inet", "forward", "forward", FILTER_PRIORITY, "accept"),
        rule(
            "inet",
            "forward",
            vec![to_tap.clone(), established.clone(), accept.clone()],
        ),
        rule("inet", "forward", vec![to_tap.clone(), drop.clone()]),
        rule("inet", "forward", vec![from_tap, jump]),
        base("inet", "output", "output", FILTER_PRIORITY, "accept"),
        rule(
            "inet",
            "output",
            vec![
                to_tap.clone(),
                is(meta("l4proto"), json!("tcp")),
                is(payload("tcp", "dport"), json!(port)),
                // Only the server's own uid opens connections to agents: not a hypervisor's
                // (an escaped one), not any other local user.
                is(meta("skuid"), json!(server_uid)),
                accept.clone(),
            ],
        ),
        rule("inet", "output", vec![to_tap.clone(), established, accept]),
        rule("inet", "output", vec![to_tap, drop]),
    ]
}

/// `aa:bb:...` form of a MAC.
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The owner part (`<pid>_<start>`) of one of the project's table names.
fn table_owner(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(TABLE_PREFIX)?;
    let mut it = rest.splitn(3, '_');
    let pid = it.next()?;
    let start = it.next()?;
    it.next()?;
    if pid.is_empty()
        || start.is_empty()
        || !(pid.bytes().chain(start.bytes())).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some(&rest[..pid.len() + 1 + start.len()])
}

/// Whether `<pid>_<start>` names a process alive now (same pid, same start time).
fn owner_alive(owner: &str) -> bool {
    let Some((pid, start)) = owner.split_once('_') else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    process_identity(pid) == Some((pid, start))
}

/// A process's pid and start time (clock ticks since boot, `/proc/PID/stat` field 22).
fn process_identity(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses): state is field 3,
    // start time field 22.
    let rest = stat.rsplit_once(')')?.1;
    let start = rest.split_whitespace().nth(19)?.parse().ok()?;
    Some((pid, start))
}

/// Whether network device `name` exists in this network namespace.
fn tap_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that lives across the call; if_nametoindex
    // only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

fn find_nft() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CLOUDE_NFT_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(NFT_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join("nft"))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_parsed_from_table_names() {
        assert_eq!(table_owner("cloude_123_456_cld7"), Some("123_456"));
        assert_eq!(table_owner("cloude_123_456_probe"), Some("123_456"));
        assert_eq!(table_owner("cloude_123_cld7"), None);
        assert_eq!(table_owner("cloude_x1_456_cld7"), None);
        assert_eq!(table_owner("filter"), None);
        let (pid, start) = process_identity(std::process::id()).expect("own stat");
        assert!(owner_alive(&format!("{pid}_{start}")));
        assert!(!owner_alive(&format!("{pid}_{}", start + 1)));
    }

    #[test]
    fn ruleset_guards_the_tap() {
        let doc = ruleset(
            "cloude_1_2_cld3",
            "cld3",
            "06:00:0a:c9:00:02",
            Ipv4Addr::new(10, 201, 0, 2),
        );
        let text = serde_json::to_string(&doc).expect("json");
        assert!(text.contains("\"dev\":\"cld3\""));
        assert!(text.contains("\"policy\":\"drop\""));
        assert!(text.contains("\"right\":8080"));
        assert!(
            text.contains("\"skuid\""),
            "only the server's uid reaches agents"
        );
        assert!(text.contains("10.201.0.2"));
        assert_eq!(mac_string([6, 0, 10, 201, 0, 2]), "06:00:0a:c9:00:02");
    }
}
