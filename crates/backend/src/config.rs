//! Server configuration: plain data (TOML), validated at the edge.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The embedded default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub limits: Limits,
    pub network: Network,
    pub vm: VmConfig,
    pub pool: PoolConfig,
    pub jail: JailConfig,
    pub snapshot: SnapshotConfig,
    pub images: ImagesConfig,
    /// VMs that live across calls (`sandbox.rs`, `api/sandboxes/`).
    pub sandboxes: SandboxConfig,
    /// The MCP face (`api/mcp`).
    pub mcp: McpConfig,
    /// API keys of the sandbox faces (`api/e2b`).
    pub auth: AuthConfig,
    /// The page at `/` (`api/playground`).
    pub playground: crate::api::playground::PlaygroundConfig,
    /// The Judge0-compatible API (`judge0`, `api/judge0.rs`).
    pub judge0: crate::judge0::Judge0Config,
    /// Where Judge0 submissions are kept (`store`).
    pub store: crate::store::StoreConfig,
}

/// `[auth]`: API keys. Empty: no key is asked for (every client sees every sandbox).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Each key is a tenant of its own: it sees only the sandboxes it made.
    pub keys: Vec<String>,
}

/// The tenant `given` names among `keys`: `key-` and the first 16 hex digits of the key's
/// SHA-256 (the key itself is never kept with what it made or logged); `None` if it is not one
/// of them. Every key is compared, each in constant time.
pub fn key_tenant(keys: &[String], given: &str) -> Option<String> {
    use sha2::Digest as _;
    let mut hit = false;
    for k in keys {
        let (a, b) = (k.as_bytes(), given.as_bytes());
        let same =
            a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        hit |= same;
    }
    if !hit {
        return None;
    }
    let d = sha2::Sha256::digest(given.as_bytes());
    Some(format!(
        "key-{}",
        d.iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// The MCP face (`api/mcp`, `/mcp`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// `Host` headers `/mcp` accepts besides loopback ones (`localhost`, `127.0.0.1`, `::1`):
    /// a browser on a malicious page must not reach it through DNS rebinding.
    pub allowed_hosts: Vec<String>,
}

/// The jail around every hypervisor process (`vm::jail`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// Off only for debugging: the server then warns at start and `/healthz` says `"jail": false`.
    pub enabled: bool,
    /// First and last uid (also used as gid) handed to jailed hypervisors, one per running VM.
    pub uid_range: [u32; 2],
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Booted VMs kept ready for each pooled language (0: off).
    pub size: usize,
    /// Languages kept warm (names; `"*"` for all).
    pub languages: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_code_bytes: usize,
    pub max_stdin_bytes: usize,
    pub max_files: usize,
    pub max_args: usize,
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
    pub default_compile_timeout_ms: u64,
    pub max_compile_timeout_ms: u64,
    pub max_memory_mib: u64,
    pub output_limit_bytes: u64,
    pub max_concurrent_vms: usize,
    pub max_queue: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub queue_timeout_ms: u64,
    pub boot_timeout_ms: u64,
    pub shutdown_grace_ms: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub allow: bool,
    /// tcp transport: the subnet cut into one /30 per VM (host `.1`, guest `.2`).
    pub subnet: String,
    /// tcp transport: host-side nftables rules around every tap (`vm::fence`). Off only for
    /// debugging: the server then warns at start and `/healthz` says `"host_rules": false`.
    pub host_rules: bool,
}

impl Network {
    pub fn plan(&self) -> Result<crate::vm::net::NetPlan, String> {
        crate::vm::net::NetPlan::parse(&self.subnet)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorChoice {
    Auto,
    CloudeVmm,
    Qemu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Vsock,
    Tcp,
}

impl Transport {
    /// The configuration's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Vsock => "vsock",
            Transport::Tcp => "tcp",
        }
    }
}

/// `[sandboxes]`: VMs kept across calls.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    pub enabled: bool,
    /// Sandboxes running at once (each also holds one of `max_concurrent_vms`).
    pub max_running: usize,
    /// Idle time before a sandbox is killed when its creation names none, seconds.
    pub default_timeout_s: u64,
    /// Longest idle timeout a sandbox may ask for, seconds.
    pub max_timeout_s: u64,
    /// Largest file read or written in one call, bytes.
    pub max_file_bytes: u64,
    /// Longest a sandbox stays paused (its VM frozen, its memory kept) before it is killed,
    /// seconds.
    pub max_paused_s: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Serve requests from snapshot restores (`crate::snapshots`).
    pub enabled: bool,
    /// Where snapshots are kept (empty: `$CLOUDE_HOME/snapshots`).
    pub dir: String,
}

/// How language roots reach the guest (`[images]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesConfig {
    pub format: FormatChoice,
}

/// `[images] format`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FormatChoice {
    /// Per language, by measurement (`crate::artifacts::auto_format`).
    Auto,
    Initramfs,
    Block,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub hypervisor: HypervisorChoice,
    pub transport: Transport,
    pub vcpus: u32,
    pub prebuild: Vec<String>,
    /// Guest console kept per VM, bytes: `console.log` holds the newest output (`vm::console`).
    pub console_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("the configuration is not valid: {0}")]
    Parse(String),
    #[error("the configuration is not valid: {0}")]
    Invalid(String),
}

impl Config {
    /// The embedded default.
    pub fn embedded() -> Self {
        Self::parse(DEFAULT_CONFIG).expect("the embedded configuration is valid (unit-tested)")
    }

    /// Parses `text` as overrides on top of the embedded default, then validates.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut base: toml::Table =
            toml::from_str(DEFAULT_CONFIG).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let over: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        merge(&mut base, over);
        let mut cfg: Config = toml::Value::Table(base)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        cfg.judge0 = cfg.judge0.clone().clamped(&cfg.limits);
        Ok(cfg)
    }

    /// `path` if given, else the embedded default.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| ConfigError::Read(p.into(), e))?;
                Self::parse(&text)
            }
            None => Ok(Self::embedded()),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if l.max_concurrent_vms == 0 {
            return bad("limits.max_concurrent_vms must be at least 1");
        }
        let s = &self.sandboxes;
        if s.max_timeout_s == 0 || s.default_timeout_s == 0 || s.default_timeout_s > s.max_timeout_s
        {
            return bad("sandboxes: timeouts must be at least 1 s and default_timeout_s at most max_timeout_s");
        }
        if s.max_file_bytes == 0
            || s.max_file_bytes > cloude_protocol::sandbox::MAX_SANDBOX_FILE_BYTES
        {
            return bad("sandboxes.max_file_bytes must be between 1 and the agent's 64 MiB");
        }
        if s.max_paused_s == 0 {
            return bad("sandboxes.max_paused_s must be at least 1");
        }
        if l.max_connections_per_ip == 0 {
            return bad("limits.max_connections_per_ip must be at least 1");
        }
        if l.max_connections == 0 {
            return bad("limits.max_connections must be at least 1");
        }
        if l.default_timeout_ms == 0 || l.default_timeout_ms > l.max_timeout_ms {
            return bad("limits.default_timeout_ms must be between 1 and limits.max_timeout_ms");
        }
        if l.default_compile_timeout_ms == 0
            || l.default_compile_timeout_ms > l.max_compile_timeout_ms
        {
            return bad("limits.default_compile_timeout_ms must be between 1 and limits.max_compile_timeout_ms");
        }
        let cap = cloude_protocol::MAX_TIMEOUT_MS;
        if l.max_timeout_ms > cap || l.max_compile_timeout_ms > cap {
            return bad("timeout ceilings must not exceed the agent's 15 minutes");
        }
        if l.max_code_bytes > cloude_protocol::MAX_FILES_BYTES
            || l.max_stdin_bytes > cloude_protocol::MAX_STDIN_BYTES
        {
            return bad("code and stdin limits must not exceed the agent's (16 MiB)");
        }
        if l.max_files > cloude_protocol::MAX_FILES {
            return bad("limits.max_files must not exceed the agent's limit");
        }
        if l.output_limit_bytes == 0
            || l.output_limit_bytes > cloude_protocol::MAX_OUTPUT_LIMIT_BYTES
        {
            return bad("limits.output_limit_bytes must be between 1 and 64 MiB");
        }
        if !(1..=64).contains(&self.vm.vcpus) {
            return bad("vm.vcpus must be between 1 and 64");
        }
        if self.network.allow && self.vm.transport != Transport::Tcp {
            return bad("network.allow needs vm.transport = \"tcp\"");
        }
        if self.pool.size > 16 {
            return bad("pool.size must be at most 16");
        }
        if let Err(e) = self.network.plan() {
            return Err(ConfigError::Invalid(e));
        }
        let [first, last] = self.jail.uid_range;
        if first == 0 || last < first {
            return bad("jail.uid_range must be [first, last] with 0 < first <= last");
        }
        // Every running and pooled VM needs a uid, and a dying VM keeps its own a little longer.
        if u64::from(last - first) + 1
            < 2 * (l.max_concurrent_vms as u64 + 16 * self.pool.size as u64)
        {
            return bad("jail.uid_range is too small for limits.max_concurrent_vms and the pool");
        }
        if self.vm.console_bytes < crate::vm::console::MIN_CONSOLE_BYTES {
            return bad("vm.console_bytes must be at least 64 KiB");
        }
        self.judge0.validate().map_err(ConfigError::Invalid)?;
        self.playground.validate().map_err(ConfigError::Invalid)?;
        self.store.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_is_valid() {
        let c = Config::embedded();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8787");
        assert_eq!(c.vm.transport, Transport::Vsock);
        assert!(!c.network.allow);
    }

    #[test]
    fn overrides_merge_and_validate() {
        let c = Config::parse("[limits]\nmax_concurrent_vms = 2\n").expect("valid");
        assert_eq!(c.limits.max_concurrent_vms, 2);
        assert_eq!(c.limits.max_queue, Config::embedded().limits.max_queue);
        assert!(Config::parse("[limits]\nmax_concurrent_vms = 0\n").is_err());
        assert!(Config::parse("[limits]\nbogus = 1\n").is_err());
        assert!(Config::parse("[network]\nallow = true\n").is_err());
        let tcp = Config::parse("[vm]\ntransport = \"tcp\"\n[network]\nallow = true\n")
            .expect("tcp with network");
        assert_eq!(tcp.network.plan().expect("plan").blocks(), 16384);
        assert!(Config::parse("[network]\nsubnet = \"10.0.0.1/16\"\n").is_err());
        assert!(Config::parse("[pool]\nsize = 17\n").is_err());
        let e = Config::parse("[vm]\nconsole_bytes = 1024\n").expect_err("ring too small");
        assert!(e.to_string().contains("vm.console_bytes"), "{e}");
        // The old key is refused by name.
        let e = Config::parse("[jail]\nconsole_limit_bytes = 1048576\n").expect_err("old key");
        assert!(e.to_string().contains("console_limit_bytes"), "{e}");
        assert_eq!(
            Config::parse("[pool]\nsize = 2\n")
                .expect("pool")
                .pool
                .languages,
            vec!["python".to_string()]
        );
        assert!(Config::parse("[vm]\nhypervisor = \"qemu\"\n").is_ok());
        assert!(Config::parse("[vm]\nhypervisor = \"xen\"\n").is_err());
        assert!(c_default_jail_on());
        assert!(Config::parse("[jail]\nuid_range = [0, 100000]\n").is_err());
        assert!(Config::parse("[jail]\nuid_range = [5000, 4000]\n").is_err());
        assert!(Config::parse("[jail]\nuid_range = [5000, 5003]\n").is_err());
        assert!(Config::parse("[jail]\nenabled = false\n").is_ok());
        assert!(Config::embedded().network.host_rules);
        assert!(Config::parse("[network]\nhost_rules = false\n").is_ok());
        // Sandbox and connection caps are refused with the key named.
        for (bad, key) in [
            ("[sandboxes]\nmax_timeout_s = 0\n", "sandboxes"),
            (
                "[sandboxes]\ndefault_timeout_s = 900\nmax_timeout_s = 600\n",
                "sandboxes",
            ),
            (
                "[sandboxes]\nmax_file_bytes = 0\n",
                "sandboxes.max_file_bytes",
            ),
            (
                "[sandboxes]\nmax_file_bytes = 1000000000\n",
                "sandboxes.max_file_bytes",
            ),
            (
                "[limits]\nmax_connections_per_ip = 0\n",
                "max_connections_per_ip",
            ),
        ] {
            let e = Config::parse(bad).expect_err(bad);
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
    }

    fn c_default_jail_on() -> bool {
        let c = Config::embedded();
        c.jail.enabled && c.jail.uid_range[0] > 0
    }
}
