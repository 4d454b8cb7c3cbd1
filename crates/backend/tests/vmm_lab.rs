//! The `cloude-vmm` driver against a real KVM: boots a VM through `Driver::boot`, does the
//! hybrid-vsock handshake and runs a program through the agent. Needs a Linux-capable
//! `/dev/kvm`, so it runs inside the KVM lab:
//!
//! ```sh
//! cargo xtask lab --copy TEST_EXE --copy KERNEL --copy INITRD --copy VMM -- env \
//!   CLOUDE_VMM_LAB_TESTS=1 CLOUDE_KERNEL=KERNEL CLOUDE_INITRD=INITRD CLOUDE_VMM_BIN=VMM TEST_EXE --nocapture
//! ```
//! Elsewhere it prints `SKIPPED` (it cannot run on this host's kvm_pvm).

use std::path::PathBuf;
use std::time::Duration;

use cloude_protocol::{FileSpec, RunRequest, StageStatus, PROTOCOL_VERSION};
use cloude_server::agent::AgentClient;
use cloude_server::vm::{Driver, Kind, Runtime, VmSpec};

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(name).unwrap_or_else(|| panic!("{name} must be set")))
}

#[tokio::test]
async fn cloude_vmm_driver_runs_a_program() {
    if std::env::var_os("CLOUDE_VMM_LAB_TESTS").is_none() {
        eprintln!("SKIPPED: cloude-vmm driver test needs a Linux-capable KVM (run it in the KVM lab with CLOUDE_VMM_LAB_TESTS=1)");
        return;
    }
    let driver = Driver {
        kind: Kind::CloudeVmm,
        binary: env_path("CLOUDE_VMM_BIN"),
        qemu_kvm: false,
    };
    let spec = VmSpec {
        kernel: env_path("CLOUDE_KERNEL"),
        initrd: env_path("CLOUDE_INITRD"),
        memory_mib: 256,
        vcpus: 1,
        boot_timeout: Duration::from_secs(60),
    };
    let rt = Runtime::new().expect("runtime dir");
    let started = std::time::Instant::now();
    let mut vm = driver
        .boot(&spec, rt.slot().expect("slot"))
        .await
        .expect("boot");
    eprintln!(
        "cloude-vmm VM ready in {} ms (cid {})",
        vm.boot.as_millis(),
        vm.cid()
    );
    let mut client = AgentClient::handshake(vm.take_io().expect("agent channel"))
        .await
        .expect("handshake");
    let req = RunRequest {
        protocol_version: PROTOCOL_VERSION,
        files: vec![FileSpec {
            name: "main.sh".into(),
            content: "echo hello from cloude-vmm; read x; echo \"got $x\"".into(),
            encoding: Default::default(),
        }],
        compile: None,
        run: vec!["bash".into(), "main.sh".into()],
        args: vec![],
        stdin: "stdin-line\n".into(),
        env: vec![],
        compile_timeout_ms: 10_000,
        run_timeout_ms: 10_000,
        output_limit_bytes: 1 << 20,
        memory_limit_mib: None,
        pids_limit: None,
        poweroff_after: true,
    };
    let resp = client.run(&req).await.expect("run");
    let run = resp.run.expect("run stage");
    assert_eq!(run.status, StageStatus::Ok, "{run:?}");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout.0),
        "hello from cloude-vmm\ngot stdin-line\n"
    );
    eprintln!("request done in {} ms total", started.elapsed().as_millis());
    vm.shutdown(Duration::from_secs(5)).await;
    drop(rt);
}
