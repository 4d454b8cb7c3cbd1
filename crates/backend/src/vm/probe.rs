//! Chooses the hypervisor driver at start-up.

use std::path::PathBuf;

use cloude_image::kernel::HostKvm;

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
    pub kvm: HostKvm,
    pub vmm: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
}

impl HostFacts {
    pub fn gather() -> Self {
        HostFacts {
            kvm: HostKvm::gather(),
            vmm: cloude_image::paths::sibling_binary("cloude-vmm", "CLOUDE_VMM_BIN"),
            qemu: find_qemu(),
        }
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
    let kvm = facts.kvm.linux_capable();
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
                kind: Kind::Qemu { kvm: kvm.is_some() },
                binary,
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
            (None, _) if !facts.kvm.dev_kvm => qemu("no /dev/kvm on this host".into()),
            (None, _) if facts.kvm.is_pvm() => {
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
            kvm: HostKvm {
                dev_kvm: !modules.is_empty(),
                modules: modules.iter().map(|s| s.to_string()).collect(),
            },
            vmm: vmm.then(|| PathBuf::from("/bin/cloude-vmm")),
            qemu: Some(PathBuf::from("/usr/bin/qemu-system-x86_64")),
        }
    }

    #[test]
    fn pvm_falls_back_to_tcg() {
        let c = choose(HypervisorChoice::Auto, &facts(&["kvm_pvm"], true)).expect("choice");
        assert_eq!(c.driver.kind, Kind::Qemu { kvm: false });
        assert!(c.reason.contains("kvm_pvm"), "{}", c.reason);
    }

    #[test]
    fn real_kvm_prefers_vmm() {
        let c = choose(HypervisorChoice::Auto, &facts(&["kvm_intel"], true)).expect("choice");
        assert_eq!(c.driver.kind, Kind::CloudeVmm);
        let c = choose(HypervisorChoice::Auto, &facts(&["kvm_amd"], false)).expect("choice");
        assert_eq!(c.driver.kind, Kind::Qemu { kvm: true });
        let c = choose(HypervisorChoice::Qemu, &facts(&["kvm_amd"], true)).expect("choice");
        assert_eq!(c.driver.kind, Kind::Qemu { kvm: true });
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
