//! Runs `cloude-vmm` on this machine's own /dev/kvm with tiny purpose-built PVH guests (a few
//! instructions each; kvm_pvm emulates ring-0 code slowly), plus set-up error cases.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_cloude-vmm");
const LOAD_ADDR: u64 = 0x10_0000;
/// Hard limit per VMM run: the tiny guests need milliseconds.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn kvm_usable() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        return true;
    }
    println!("SKIPPED: /dev/kvm is missing or not accessible");
    false
}

/// An ELF64 image with one PT_LOAD of `code` at 1 MiB and a Xen PVH entry note pointing at it.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1;
    let put16 =
        |f: &mut Vec<u8>, at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 0x3e); // x86_64
    put32(&mut f, 20, 1);
    put64(&mut f, 24, LOAD_ADDR);
    put64(&mut f, 32, 64); // e_phoff
    put16(&mut f, 52, 64); // e_ehsize
    put16(&mut f, 54, 56); // e_phentsize
    put16(&mut f, 56, 2); // e_phnum
                          // PT_LOAD
    let p = 64;
    put32(&mut f, p, 1);
    put32(&mut f, p + 4, 5);
    put64(&mut f, p + 8, 0x1000);
    put64(&mut f, p + 16, LOAD_ADDR);
    put64(&mut f, p + 24, LOAD_ADDR);
    put64(&mut f, p + 32, code.len() as u64);
    put64(&mut f, p + 40, code.len() as u64);
    put64(&mut f, p + 48, 0x1000);
    // PT_NOTE
    let p = 64 + 56;
    put32(&mut f, p, 4);
    put64(&mut f, p + 8, 0x200);
    put64(&mut f, p + 32, 20);
    put64(&mut f, p + 40, 20);
    put64(&mut f, p + 48, 4);
    put32(&mut f, 0x200, 4); // namesz
    put32(&mut f, 0x204, 4); // descsz
    put32(&mut f, 0x208, 18); // XEN_ELFNOTE_PHYS32_ENTRY
    f[0x20c..0x210].copy_from_slice(b"Xen\0");
    put32(&mut f, 0x210, LOAD_ADDR as u32);
    f.extend_from_slice(code);
    f
}

/// 32-bit code: print `text` on COM1, then reset through the i8042.
fn print_and_reset(text: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    c.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    c
}

struct Guest {
    dir: tempfile::TempDir,
}

impl Guest {
    fn new(kernel: &[u8]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("kernel"), kernel).expect("kernel");
        std::fs::write(dir.path().join("initrd"), vec![0u8; 4096]).expect("initrd");
        Self { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn run(&self, extra: &[&str]) -> (Output, Duration) {
        run_vmm(&self.path("kernel"), &self.path("initrd"), extra)
    }
}

fn run_vmm(kernel: &Path, initrd: &Path, extra: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new(VMM)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cloude-vmm");
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "cloude-vmm hung; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (child.wait_with_output().expect("output"), start.elapsed())
}

#[test]
fn serial_output_and_i8042_reset_exit_zero() {
    if !kvm_usable() {
        return;
    }
    let g = Guest::new(&pvh_elf(&print_and_reset(b"HELLO-CLOUDE\n")));
    for vcpus in ["1", "2"] {
        let (out, took) = g.run(&["--vcpus", vcpus, "--memory-mib", "64"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "HELLO-CLOUDE\n",
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "status {:?}, stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("tiny guest with {vcpus} vCPU(s): {took:?}");
    }
}

#[test]
fn stats_report_first_kvm_run() {
    if !kvm_usable() {
        return;
    }
    let g = Guest::new(&pvh_elf(&print_and_reset(b"x")));
    let start = Instant::now();
    let out = Command::new(VMM)
        .args([
            "--kernel",
            g.path("kernel").to_str().expect("utf8"),
            "--initrd",
            g.path("initrd").to_str().expect("utf8"),
        ])
        .args(["--memory-mib", "128"])
        .env("CLOUDE_VMM_STATS", "1")
        .output()
        .expect("run");
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("first KVM_RUN after"), "{err}");
    eprintln!("{err} (total {:?})", start.elapsed());
}

#[test]
fn triple_fault_ends_cleanly() {
    if !kvm_usable() {
        return;
    }
    // ud2 with an empty IDT: #UD -> #GP/#DF -> triple fault. An emulating KVM may instead give up;
    // either way the VMM must end quickly with status 0 or one clear sentence.
    let g = Guest::new(&pvh_elf(&[0x0f, 0x0b]));
    let (out, _) = g.run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        assert!(err.is_empty(), "{err}");
    } else {
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("cannot run") || err.contains("could not enter"),
            "{err}"
        );
    }
}

#[test]
fn setup_errors_are_one_sentence() {
    let g = Guest::new(b"this is not a kernel at all, just some bytes to fail on");
    let (out, _) = run_vmm(Path::new("/nonexistent/vmlinux"), &g.path("initrd"), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");

    if !kvm_usable() {
        return;
    }
    let mut f = std::fs::File::create(g.path("kernel")).expect("kernel");
    f.write_all(&[0x42; 8192]).expect("write");
    let (out, _) = g.run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("kernel"), "{err}");

    let (out, _) = g.run(&["--vcpus", "0"]);
    assert!(!out.status.success());
}

/// Every device set up (vsock socket bound, tap created in a private network namespace, rng),
/// then a clean exit that removes the vsock socket.
#[test]
fn all_devices_set_up_and_clean_up() {
    if !kvm_usable() {
        return;
    }
    let ns = format!("cloude-vmm-t{}", std::process::id());
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !ip(&["netns", "add", &ns]) {
        println!("SKIPPED: cannot create a network namespace (need root and iproute2)");
        return;
    }
    let g = Guest::new(&pvh_elf(&print_and_reset(b"DEV\n")));
    let uds = g.path("v.sock");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, VMM])
        .arg("--kernel")
        .arg(g.path("kernel"))
        .arg("--initrd")
        .arg(g.path("initrd"))
        .args(["--vsock-cid", "3", "--vsock-uds"])
        .arg(&uds)
        .args([
            "--tap",
            "vmtap0",
            "--guest-ip",
            "10.9.0.2/30",
            "--host-ip",
            "10.9.0.1",
        ])
        .output()
        .expect("run");
    ip(&["netns", "del", &ns]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "DEV\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!uds.exists(), "vsock socket left behind");
}
