//! Chooses the hypervisor driver at start-up.

use std::path::{Path, PathBuf};

use super::{Driver, Kind};
use crate::config::HypervisorChoice;

/// The chosen driver and why.
#[derive(Clone, Debug)]
pub struct Choice {
    pub driver: Driver,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cloude-vmm was requested but not found next to cloude-server (set CLOUDE_VMM_BIN)")]
    NoVmm,
    #[error("QEMU is needed but {0} was not found (apt-get install qemu-system-x86, or set CLOUDE_QEMU)")]
    NoQemu(String),
}

/// What the host offers, gathered from the file system (pure data, unit-testable).
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    pub dev_kvm: bool,
    /// Loaded KVM vendor modules (`kvm_intel`, `kvm_amd`, `kvm_pvm`).
    pub kvm_modules: Vec<String>,
    pub vmm: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
}

impl HostFacts {
    pub fn gather() -> Self {
        let kvm_modules = ["kvm_intel", "kvm_amd", "kvm_pvm"]
            .iter()
            .filter(|m| Path::new("/sys/module").join(m).exists())
            .map(|m| m.to_string())
            .collect();
        HostFacts {
            dev_kvm: Path::new("/dev/kvm").exists(),
            kvm_modules,
            vmm: cloude_image::paths::sibling_binary("cloude-vmm", "CLOUDE_VMM_BIN"),
            qemu: find_qemu(),
        }
    }

    /// Whether `/dev/kvm` can boot a stock Linux guest (hardware virtualisation, not kvm_pvm).
    fn linux_capable_kvm(&self) -> Option<&str> {
        if !self.dev_kvm || self.kvm_modules.iter().any(|m| m == "kvm_pvm") {
            return None;
        }
        self.kvm_modules
            .iter()
            .find(|m| *m == "kvm_intel" || *m == "kvm_amd")
            .map(String::as_str)
    }
}

fn find_qemu() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CLOUDE_QEMU").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// Picks a driver for `want` on a host described by `facts`.
pub fn choose(want: HypervisorChoice, facts: &HostFacts) -> Result<Choice, ProbeError> {
    let kvm = facts.linux_capable_kvm();
    let qemu = |reason: String| -> Result<Choice, ProbeError> {
        let binary = facts
            .qemu
            .clone()
            .ok_or_else(|| ProbeError::NoQemu("qemu-system-x86_64".into()))?;
        let accel = if kvm.is_some() {
            "KVM"
        } else {
            "TCG software emulation"
        };
        Ok(Choice {
            driver: Driver {
                kind: Kind::Qemu,
                binary,
                qemu_kvm: kvm.is_some(),
                jail: None,
                console_bytes: crate::vm::console::DEFAULT_CONSOLE_BYTES,
            },
            reason: format!("{reason}; QEMU microvm with {accel}"),
        })
    };
    let vmm = |reason: String| -> Result<Choice, ProbeError> {
        let binary = facts.vmm.clone().ok_or(ProbeError::NoVmm)?;
        Ok(Choice {
            driver: Driver {
                kind: Kind::CloudeVmm,
                binary,
                qemu_kvm: false,
                jail: None,
                console_bytes: crate::vm::console::DEFAULT_CONSOLE_BYTES,
            },
            reason,
        })
    };
    match want {
        HypervisorChoice::Qemu => qemu("requested by configuration or --hypervisor".into()),
        HypervisorChoice::CloudeVmm => vmm("requested by configuration or --hypervisor".into()),
        HypervisorChoice::Auto => match (kvm, &facts.vmm) {
            (Some(m), Some(_)) => vmm(format!(
                "/dev/kvm is backed by {m}, which boots Linux guests"
            )),
            (Some(_), None) => qemu("KVM works but cloude-vmm was not found".into()),
            (None, _) if !facts.dev_kvm => qemu("no /dev/kvm on this host".into()),
            (None, _) if facts.kvm_modules.iter().any(|m| m == "kvm_pvm") => {
                qemu("/dev/kvm is kvm_pvm, which cannot boot stock Linux guests".into())
            }
            (None, _) => {
                qemu("/dev/kvm has no hardware virtualisation module (kvm_intel/kvm_amd)".into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(modules: &[&str], vmm: bool) -> HostFacts {
        HostFacts {
            dev_kvm: !modules.is_empty(),
            kvm_modules: modules.iter().map(|s| s.to_string()).collect(),
            vmm: vmm.then(|| PathBuf::from("/bin/cloude-vmm")),
            qemu: Some(PathBuf::from("/usr/bin/qemu-system-x86_64")),
        }
    }

    #[test]
    fn pvm_falls_back_to_tcg() {
        let c = choose(HypervisorChoice::Auto, &facts(&["kvm_pvm"], true)).expect("choice");
        assert_eq!(c.driver.kind, Kind::Qemu);
        assert!(!c.driver.qemu_kvm);
        assert!(c.reason.contains("kvm_pvm"), "{}", c.reason);
    }

    #[test]
    fn real_kvm_prefers_vmm() {
        let c = choose(HypervisorChoice::Auto, &facts(&["kvm_intel"], true)).expect("choice");
        assert_eq!(c.driver.kind, Kind::CloudeVmm);
        let c = choose(HypervisorChoice::Auto, &facts(&["kvm_amd"], false)).expect("choice");
        assert_eq!(c.driver.kind, Kind::Qemu);
        assert!(c.driver.qemu_kvm);
        let c = choose(HypervisorChoice::Qemu, &facts(&["kvm_amd"], true)).expect("choice");
        assert_eq!(c.driver.kind, Kind::Qemu);
    }

    #[test]
    fn no_kvm_and_missing_binaries() {
        let c = choose(HypervisorChoice::Auto, &facts(&[], true)).expect("choice");
        assert!(c.reason.contains("no /dev/kvm"));
        assert!(matches!(
            choose(HypervisorChoice::CloudeVmm, &facts(&[], false)),
            Err(ProbeError::NoVmm)
        ));
    }
}
