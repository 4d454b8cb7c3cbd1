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

/// 32-bit code that counts for ever: the counter lives in guest memory at 0x5000 (so the
/// memory file is tested), is printed on COM1 as 8 hex digits and a newline from a register
/// (so the registers are tested), with a short delay loop between numbers.
fn counting_guest() -> Vec<u8> {
    const DELAY: u32 = 0x4000;
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    let top = c.len();
    c.extend([0x8b, 0x1d, 0x00, 0x50, 0x00, 0x00]); // mov ebx, [0x5000]
    c.push(0x43); // inc ebx
    c.extend([0x89, 0x1d, 0x00, 0x50, 0x00, 0x00]); // mov [0x5000], ebx
    c.extend([0x89, 0xde]); // mov esi, ebx
    c.extend([0xb9, 8, 0, 0, 0]); // mov ecx, 8
    let digit = c.len();
    c.extend([0xc1, 0xc6, 0x04]); // rol esi, 4
    c.extend([0x89, 0xf0]); // mov eax, esi
    c.extend([0x83, 0xe0, 0x0f]); // and eax, 15
    c.extend([0x3c, 0x0a]); // cmp al, 10
    c.extend([0x72, 0x02]); // jb +2
    c.extend([0x04, 0x27]); // add al, 'a' - 10 - '0'
    c.extend([0x04, 0x30]); // add al, '0'
    c.push(0xee); // out dx, al
    c.push(0x49); // dec ecx
    let rel = digit as i64 - (c.len() as i64 + 2);
    c.extend([0x75, rel as i8 as u8]); // jnz digit
    c.extend([0xb0, 0x0a, 0xee]); // mov al, '\n'; out dx, al
    c.push(0xb9); // mov ecx, DELAY
    c.extend(DELAY.to_le_bytes());
    c.extend([0x49, 0x75, 0xfd]); // dec ecx; jnz -3
    let rel = top as i64 - (c.len() as i64 + 2);
    c.extend([0xeb, rel as i8 as u8]); // jmp top
    c
}

/// A VMM whose stdout is collected by a thread.
struct Running {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Running {
    fn spawn(args: &[&std::ffi::OsStr]) -> Self {
        use std::io::Read;
        let mut child = Command::new(VMM)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cloude-vmm");
        let mut stdout = child.stdout.take().expect("stdout");
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        });
        Self { child, out }
    }

    fn lines(&self) -> usize {
        self.out
            .lock()
            .expect("lock")
            .iter()
            .filter(|b| **b == b'\n')
            .count()
    }

    /// Waits for `n` complete lines; false if the VMM exited first or time ran out.
    fn wait_lines(&mut self, n: usize) -> bool {
        let start = Instant::now();
        while self.lines() < n {
            if start.elapsed() > RUN_TIMEOUT || self.child.try_wait().expect("wait").is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(start.elapsed() < RUN_TIMEOUT, "cloude-vmm did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn output(&self) -> Vec<u8> {
        // Let the reader thread drain the pipe.
        std::thread::sleep(Duration::from_millis(50));
        self.out.lock().expect("lock").clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn snapshot_command(ctl: &Path, line: &[u8]) -> String {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(ctl).expect("connect control socket");
    s.write_all(line).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    answer
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// Exit status and the one stderr line of a restore that must be refused.
fn refused(snap: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(VMM);
    cmd.arg("--restore").arg(snap);
    if !extra.contains(&"--memory-mib") {
        cmd.args(["--memory-mib", "64"]);
    }
    let out = cmd.args(extra).output().expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Snapshot a counting guest, restore it in a new process: the count goes on from where it
/// was, with no number lost or repeated. Then every kind of broken snapshot is refused with
/// exit status 3 and one sentence.
#[test]
fn snapshot_and_restore_continue_counting() {
    if !kvm_usable() {
        return;
    }
    let g = Guest::new(&pvh_elf(&counting_guest()));
    let ctl = g.path("ctl.sock");
    let snap = g.path("snap");
    std::fs::create_dir(&snap).expect("snapshot dir");
    let (k, i) = (g.path("kernel"), g.path("initrd"));
    let mut vm = Running::spawn(&[
        os("--kernel"),
        k.as_os_str(),
        os("--initrd"),
        i.as_os_str(),
        os("--memory-mib"),
        os("64"),
        os("--snapshot-control"),
        ctl.as_os_str(),
        os("--snapshot-tag"),
        os("tiny"),
    ]);
    assert!(
        vm.wait_lines(20),
        "the guest did not count: {}",
        vm.stderr()
    );
    // Garbage is refused and the VM keeps running.
    let a = snapshot_command(&ctl, b"HELLO\n");
    assert!(a.starts_with("ERR "), "{a:?}");
    let before = vm.lines();
    assert!(vm.wait_lines(before + 5), "the guest stopped after garbage");
    let started = Instant::now();
    let answer = snapshot_command(
        &ctl,
        cloude_protocol::vmm_wire::snapshot_line(&snap).as_bytes(),
    );
    let took = started.elapsed();
    if answer.starts_with("ERR KVM could not save") {
        println!("SKIPPED: this host's KVM cannot save vCPU/VM state ({answer:?})");
        return;
    }
    assert_eq!(answer, "OK\n", "stderr: {}", vm.stderr());
    let status = vm.wait_exit();
    assert!(status.success(), "{status:?}: {}", vm.stderr());
    let first = vm.output();
    assert!(!ctl.exists(), "control socket left behind");
    let mem = std::fs::metadata(snap.join("memory")).expect("memory file");
    assert_eq!(mem.len(), 64 << 20);
    {
        use std::os::unix::fs::MetadataExt;
        eprintln!(
            "tiny snapshot in {took:?}: memory file {} bytes long, {} bytes allocated",
            mem.len(),
            mem.blocks() * 512
        );
        assert!(mem.blocks() * 512 < 8 << 20, "memory file is not sparse");
    }

    // The clone is snapshotted in turn (its memory is now a private file mapping), and that
    // snapshot restored again.
    let ctl2 = g.path("ctl2.sock");
    let snap2 = g.path("snap2");
    std::fs::create_dir(&snap2).expect("snapshot dir");
    let started = Instant::now();
    let mut clone = Running::spawn(&[
        os("--restore"),
        snap.as_os_str(),
        os("--memory-mib"),
        os("64"),
        os("--snapshot-tag"),
        os("tiny"),
        os("--snapshot-control"),
        ctl2.as_os_str(),
    ]);
    if !clone.wait_lines(10) {
        let err = clone.stderr();
        if err.contains("KVM refused the saved") {
            println!("SKIPPED: this host's KVM cannot restore vCPU/VM state ({err})");
            return;
        }
        panic!("the restored guest did not count: {err}");
    }
    eprintln!("tiny restore to 10 lines: {:?}", started.elapsed());
    let answer = snapshot_command(
        &ctl2,
        cloude_protocol::vmm_wire::snapshot_line(&snap2).as_bytes(),
    );
    assert_eq!(answer, "OK\n", "stderr: {}", clone.stderr());
    assert!(clone.wait_exit().success());
    let second = clone.output();
    let mut grandchild = Running::spawn(&[
        os("--restore"),
        snap2.as_os_str(),
        os("--memory-mib"),
        os("64"),
        os("--snapshot-tag"),
        os("tiny"),
    ]);
    assert!(grandchild.wait_lines(10), "{}", grandchild.stderr());
    let _ = grandchild.child.kill();
    let third = grandchild.output();
    let all = [first.clone(), second.clone(), third].concat();
    let text = String::from_utf8_lossy(&all);
    let numbers: Vec<u64> = text
        .lines()
        .map(|l| u64::from_str_radix(l, 16).unwrap_or_else(|_| panic!("bad line {l:?}")))
        .collect();
    for w in numbers.windows(2) {
        assert_eq!(w[1], w[0] + 1, "count jumped: {:?}", &numbers);
    }
    let at_snapshot = String::from_utf8_lossy(&first).lines().count();
    let at_second = at_snapshot + String::from_utf8_lossy(&second).lines().count();
    assert!(
        numbers.len() > at_second + 5,
        "counted on after the second restore"
    );
    eprintln!(
        "count: 1..{at_snapshot} before the snapshot, about {at_second} at the clone's snapshot, on to {} after restoring that",
        numbers.last().copied().unwrap_or(0)
    );

    // Refusals (before the guest runs; exit status 3, one sentence).
    let broken = |name: &str, f: &dyn Fn(&Path)| -> PathBuf {
        let d = g.path(name);
        std::fs::create_dir(&d).expect("dir");
        for file in ["state", "memory"] {
            std::fs::copy(snap.join(file), d.join(file)).expect("copy");
        }
        f(&d);
        d
    };
    let check = |dir: &Path, extra: &[&str], want: &str| {
        let (code, err) = refused(dir, extra);
        assert_eq!(code, Some(3), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("cloude-vmm: snapshot refused: "), "{err}");
        assert!(err.contains(want), "{err:?} lacks {want:?}");
    };
    let tag = ["--snapshot-tag", "tiny"];
    let corrupt = broken("corrupt", &|d| {
        let mut b = std::fs::read(d.join("state")).expect("read");
        let n = b.len();
        b[n / 2] ^= 0x55;
        std::fs::write(d.join("state"), b).expect("write");
    });
    check(&corrupt, &tag, "checksum");
    let truncated = broken("truncated", &|d| {
        let b = std::fs::read(d.join("state")).expect("read");
        std::fs::write(d.join("state"), &b[..b.len() - 100]).expect("write");
    });
    check(&truncated, &tag, "truncated");
    let foreign = broken("foreign", &|d| {
        std::fs::write(d.join("state"), b"\x7fELF not a snapshot").expect("write");
    });
    check(&foreign, &tag, "not a cloude-vmm snapshot");
    let short_mem = broken("short-memory", &|d| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("memory"))
            .expect("open");
        f.set_len(32 << 20).expect("truncate");
    });
    check(&short_mem, &tag, "memory file");
    check(&snap, &["--snapshot-tag", "other"], "tag");
    check(&snap, &[], "tag");
    check(&snap, &["--snapshot-tag", "tiny", "--vcpus", "2"], "vCPUs");
    let (code, err) = refused(&snap, &["--snapshot-tag", "tiny", "--memory-mib", "128"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("memory"), "{err}");
}

/// Refusals that need no KVM: a missing or foreign snapshot.
#[test]
fn foreign_or_missing_snapshot_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let (code, err) = refused(dir.path(), &[]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.starts_with("cloude-vmm: snapshot refused: cannot read"),
        "{err}"
    );
    std::fs::write(dir.path().join("state"), vec![0u8; 100]).expect("state");
    std::fs::write(dir.path().join("memory"), b"").expect("memory");
    let (code, err) = refused(dir.path(), &[]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("bad magic"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A snapshot into a directory that does not exist fails before the guest is paused: `ERR` with
/// the reason, exit status 1, no socket left behind.
#[test]
fn snapshot_into_a_missing_directory_fails_cleanly() {
    if !kvm_usable() {
        return;
    }
    let g = Guest::new(&pvh_elf(&counting_guest()));
    let ctl = g.path("ctl.sock");
    let (k, i) = (g.path("kernel"), g.path("initrd"));
    let mut vm = Running::spawn(&[
        os("--kernel"),
        k.as_os_str(),
        os("--initrd"),
        i.as_os_str(),
        os("--memory-mib"),
        os("64"),
        os("--snapshot-control"),
        ctl.as_os_str(),
    ]);
    assert!(vm.wait_lines(3), "the guest did not count: {}", vm.stderr());
    let answer = snapshot_command(&ctl, b"SNAPSHOT /nonexistent/snapshot/dir\n");
    assert!(
        answer.starts_with("ERR cannot create /nonexistent/snapshot/dir/state"),
        "{answer:?}"
    );
    assert_eq!(answer.lines().count(), 1);
    let status = vm.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", vm.stderr());
    assert!(!ctl.exists(), "control socket left behind");
}

/// Two vCPUs (the second never started by the guest: its INIT state is saved and restored too).
#[test]
fn two_vcpus_are_snapshotted_and_restored() {
    if !kvm_usable() {
        return;
    }
    let g = Guest::new(&pvh_elf(&counting_guest()));
    let ctl = g.path("ctl.sock");
    let snap = g.path("snap");
    std::fs::create_dir(&snap).expect("snapshot dir");
    let (k, i) = (g.path("kernel"), g.path("initrd"));
    let mut vm = Running::spawn(&[
        os("--kernel"),
        k.as_os_str(),
        os("--initrd"),
        i.as_os_str(),
        os("--memory-mib"),
        os("64"),
        os("--vcpus"),
        os("2"),
        os("--snapshot-control"),
        ctl.as_os_str(),
    ]);
    assert!(vm.wait_lines(5), "the guest did not count: {}", vm.stderr());
    let answer = snapshot_command(
        &ctl,
        cloude_protocol::vmm_wire::snapshot_line(&snap).as_bytes(),
    );
    if answer.starts_with("ERR KVM could not save") {
        println!("SKIPPED: this host's KVM cannot save vCPU/VM state ({answer:?})");
        return;
    }
    assert_eq!(answer, "OK\n", "stderr: {}", vm.stderr());
    assert!(vm.wait_exit().success());
    let first = vm.output();
    let mut clone = Running::spawn(&[
        os("--restore"),
        snap.as_os_str(),
        os("--memory-mib"),
        os("64"),
        os("--vcpus"),
        os("2"),
    ]);
    // Complete lines only: the snapshot may fall in the middle of one, which the clone finishes.
    let before = first.iter().filter(|b| **b == b'\n').count();
    assert!(clone.wait_lines(5), "{}", clone.stderr());
    let _ = clone.child.kill();
    let second = clone.output();
    let all = [first.clone(), second.clone()].concat();
    let numbers: Vec<u64> = String::from_utf8_lossy(&all)
        .lines()
        .map(|l| u64::from_str_radix(l, 16).unwrap_or_else(|_| panic!("bad line {l:?}")))
        .collect();
    let shown = || {
        format!(
            "before the snapshot {:?}, after the restore {:?}",
            String::from_utf8_lossy(&first),
            String::from_utf8_lossy(&second)
        )
    };
    for w in numbers.windows(2) {
        assert_eq!(w[1], w[0] + 1, "count jumped: {}", shown());
    }
    assert!(numbers.len() >= before + 5, "{}", shown());
}
