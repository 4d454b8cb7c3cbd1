//! The `CLOUDE_*` environment variables: the one list. Each is named here with who reads it and
//! what it means; `cargo xtask test` sets the test ones, the programs read the others. A test
//! below scans the workspace's sources and fails when a `CLOUDE_*` name appears that is not in
//! [`ALL`], or when a name in [`ALL`] is no longer used anywhere.

/// Who reads a variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// A program of the product (server, CLI, image builder, VMM, agent).
    Program,
    /// A test, set by `cargo xtask test` (or by hand to run one test).
    Test,
    /// `cargo xtask` itself (the KVM lab, the bench).
    Xtask,
}

/// One variable.
#[derive(Clone, Copy, Debug)]
pub struct Var {
    pub name: &'static str,
    pub reader: Reader,
    pub meaning: &'static str,
}

macro_rules! vars {
    ($($(#[$doc:meta])* $id:ident = $name:literal, $reader:ident, $meaning:literal;)*) => {
        $(
            #[doc = $meaning]
            $(#[$doc])*
            pub const $id: &str = $name;
        )*
        /// Every variable, in the order of this file.
        pub const ALL: &[Var] = &[$(Var { name: $name, reader: Reader::$reader, meaning: $meaning }),*];
    };
}

vars! {
    HOME = "CLOUDE_HOME", Program,
        "Where kernels, images, packages and the store live (default /var/lib/cloude).";
    PLAYGROUND_BUNDLE = "CLOUDE_PLAYGROUND_BUNDLE", Program,
        "`off`: build cloude-server without node and npm; the page at / then says its editor was left out (crates/backend/build.rs).";
    WEB_CACHE = "CLOUDE_WEB_CACHE", Program,
        "Where build.rs caches the playground's npm packages and bundle by content hash (default ~/.cache/cloude/web).";
    RUNTIME_DIR = "CLOUDE_RUNTIME_DIR", Program,
        "The server's per-VM runtime directory (sockets, jails); tests give each server its own.";
    SERVER = "CLOUDE_SERVER", Program,
        "The server URL the CLI and the API client use (default http://127.0.0.1:8787).";
    CATALOG = "CLOUDE_CATALOG", Program,
        "The language catalogue file (default catalog/default.toml of the source tree).";
    LOG = "CLOUDE_LOG", Program,
        "The server's log filter (tracing syntax, e.g. `info,cloude_server=debug`).";
    QEMU = "CLOUDE_QEMU", Program,
        "The qemu-system-x86_64 the QEMU driver runs (default: from PATH).";
    VMM_BIN = "CLOUDE_VMM_BIN", Program,
        "The cloude-vmm binary the server's cloude-vmm driver and the VMM tests run.";
    JAIL_BIN = "CLOUDE_JAIL_BIN", Program,
        "The cloude-jail binary that wraps every hypervisor (default: beside cloude-server).";
    NFT_BIN = "CLOUDE_NFT_BIN", Program,
        "The nft binary the server's network fence runs (default: from PATH).";
    AGENT_BIN = "CLOUDE_AGENT_BIN", Program,
        "The static cloude-agent the image builder puts into images (default: the built one).";
    IMAGE_COMPRESSION = "CLOUDE_IMAGE_COMPRESSION", Program,
        "Initramfs compression when none is asked for: gzip, lz4, zstd or none (default lz4).";
    VMM_STATS = "CLOUDE_VMM_STATS", Program,
        "=1: cloude-vmm prints its start-up measurements (read by the bench and kvm_tiny).";
    NO_POWEROFF = "CLOUDE_NO_POWEROFF", Program,
        "On the guest kernel command line: the agent as PID 1 does not power off when it ends.";
    TEST_SECCOMP_VIOLATION_MS = "CLOUDE_TEST_SECCOMP_VIOLATION_MS", Program,
        "Test hook read by the server: cloude-vmm makes a forbidden system call after N ms.";
    PISTON_SRC = "CLOUDE_PISTON_SRC", Test,
        "A checkout or git directory of engineer-man/piston: its own CLI is run unchanged against the server (crates/backend/tests/interactive.rs; unset: SKIPPED, the CLI is not on npm).";
    BOOT_TESTS = "CLOUDE_BOOT_TESTS", Test,
        "=1: run the VMM's Linux boot tests (crates/vmm/tests/boot.rs; in the KVM lab).";
    VMM_LAB_TESTS = "CLOUDE_VMM_LAB_TESTS", Test,
        "=1: run the server's cloude-vmm driver tests (crates/backend/tests/vmm_lab.rs; in the lab).";
    KERNEL = "CLOUDE_KERNEL", Test,
        "The guest kernel (bzImage or vmlinux) the boot and driver tests use.";
    INITRD = "CLOUDE_INITRD", Test,
        "A small initramfs (busybox + agent) for the driver tests.";
    PYTHON_INITRD = "CLOUDE_PYTHON_INITRD", Test,
        "The python initramfs image for the driver and snapshot tests.";
    BOOT_INITRD = "CLOUDE_BOOT_INITRD", Test,
        "The shared boot initramfs (agent only) for block-root tests.";
    PYTHON_ROOT = "CLOUDE_PYTHON_ROOT", Test,
        "The python EROFS root image for block-root tests.";
    VMM = "CLOUDE_VMM", Test,
        "Alias of CLOUDE_VMM_BIN in the VMM boot tests.";
    BUSYBOX = "CLOUDE_BUSYBOX", Test,
        "The static busybox the VMM boot tests put into their initramfs (default /bin/busybox).";
    VSOCK_ECHO = "CLOUDE_VSOCK_ECHO", Test,
        "The vsock-echo guest helper of the VMM boot tests (default: the built one).";
    WRITE_STATE_SEED = "CLOUDE_WRITE_STATE_SEED", Test,
        "Set to a path: the snapshot tests write a valid state file there (a fuzz seed).";
    WRITE_BLK_SEED = "CLOUDE_WRITE_BLK_SEED", Test,
        "Set to a directory: the block-device tests write fuzz seeds there.";
    LAB = "CLOUDE_LAB", Xtask,
        "=1 inside the KVM lab VM (set by `cargo xtask lab`); not forwarded into it from outside.";
    LAB_KERNEL = "CLOUDE_LAB_KERNEL", Xtask,
        "The kernel the KVM lab VM boots (default: the host's).";
    LAB_APPEND = "CLOUDE_LAB_APPEND", Xtask,
        "Extra kernel command-line arguments for the KVM lab VM.";
    LAB_TSC_KHZ = "CLOUDE_LAB_TSC_KHZ", Xtask,
        "The TSC frequency the KVM lab VM is given (default: measured).";
}

/// The variable called `name`, if it is in the list.
pub fn find(name: &str) -> Option<&'static Var> {
    ALL.iter().find(|v| v.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            if p.is_dir() {
                if !matches!(name.as_ref(), "target" | ".git" | "corpus" | "artifacts") {
                    sources(&p, out);
                }
            } else if [".rs", ".sh", ".md", ".toml"]
                .iter()
                .any(|x| name.ends_with(x))
                || name == "run"
            {
                out.push(p);
            }
        }
    }

    /// `CLOUDE_` followed by upper-case letters, digits and underscores, not ending in `_`.
    fn names_in(text: &str) -> Vec<String> {
        let mut found = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("CLOUDE_") {
            let before = rest[..at].chars().next_back();
            let tail = &rest[at..];
            let len = tail
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            let name = tail[..len].trim_end_matches('_');
            if name.len() > "CLOUDE_".len()
                && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                found.push(name.to_string());
            }
            rest = &tail[len.max(1)..];
        }
        found
    }

    #[test]
    fn the_list_is_complete_and_every_entry_is_used() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut files = Vec::new();
        for d in [
            "crates", "xtask", "fuzz", ".ci", "docs", "kernel", "catalog",
        ] {
            sources(&root.join(d), &mut files);
        }
        files.extend(["README.md", "QUICKSTART.md"].map(|f| root.join(f)));
        let this = Path::new(file!()).file_name().map(|n| n.to_os_string());
        let mut used = BTreeSet::new();
        for f in &files {
            if f.file_name().map(|n| n.to_os_string()) == this {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(f) else {
                continue;
            };
            for n in names_in(&text) {
                assert!(
                    find(&n).is_some(),
                    "{n} (in {}) is not in crates/testkit/src/vars.rs",
                    f.display()
                );
                used.insert(n);
            }
        }
        assert!(used.len() > 20, "the scan found only {used:?}: wrong root?");
        for v in ALL {
            assert!(
                used.contains(v.name),
                "{} is listed but used nowhere",
                v.name
            );
        }
        let unique: BTreeSet<_> = ALL.iter().map(|v| v.name).collect();
        assert_eq!(unique.len(), ALL.len(), "a name is listed twice");
    }

    #[test]
    fn names_are_found_whole() {
        assert_eq!(
            names_in("a CLOUDE_HOME=/x $CLOUDE_VMM_BIN, XCLOUDE_NOT CLOUDE_ CLOUDE_*"),
            ["CLOUDE_HOME", "CLOUDE_VMM_BIN"]
        );
    }
}
