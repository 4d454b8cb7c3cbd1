//! Boots the project's guest kernel for real under QEMU microvm (software emulation) with a tiny
//! busybox initramfs and checks the marker its /init prints. This proves the kernel config
//! independently of our own VMM.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloude_image::kernel::{ensure_kernel, Flavor};
use cloude_image::progress::Progress;

const BUSYBOX: &str = "/bin/busybox";
const MARKER: &str = "CLOUDE-KERNEL-BOOT-OK";

fn tiny_initramfs(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::create_dir_all(root.join("proc")).expect("mkdir");
    std::fs::create_dir_all(root.join("dev")).expect("mkdir");
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox echo \"{MARKER} cpus=$(/bin/busybox nproc) $(/bin/busybox uname -r)\"\n\
         /bin/busybox grep -qw cgroup2 /proc/filesystems && /bin/busybox echo has-cgroup2\n\
         /bin/busybox grep -qw overlay /proc/filesystems && /bin/busybox echo has-overlay\n\
         /bin/busybox reboot -f\n"
    );
    std::fs::write(root.join("init"), init).expect("write init");
    Command::new("chmod")
        .arg("755")
        .arg(root.join("init"))
        .status()
        .expect("chmod");
    let out = dir.join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet > \"$0\"")
        .arg(&out)
        .current_dir(&root)
        .status()
        .expect("run cpio");
    assert!(status.success(), "cpio failed");
    out
}

#[test]
fn guest_kernel_boots_under_qemu_microvm() {
    for tool in [BUSYBOX, "/usr/bin/qemu-system-x86_64", "/usr/bin/cpio"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: install busybox-static, qemu-system-x86 and cpio (cargo xtask test does)"
        );
    }
    let kernel = ensure_kernel(Flavor::Guest, &Progress::new(false)).expect("guest kernel builds");
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = tiny_initramfs(dir.path());
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "2",
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel.bzimage)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 reboot=t panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        String::from_utf8_lossy(&s).to_string()
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().expect("reader");
    let elapsed = started.elapsed();
    assert!(
        status.is_some(),
        "QEMU did not exit within 120 s; console:\n{out}"
    );
    assert!(out.contains(MARKER), "marker missing; console:\n{out}");
    assert!(
        out.contains("cpus=2"),
        "guest did not see 2 CPUs; console:\n{out}"
    );
    assert!(
        out.contains("has-cgroup2"),
        "no cgroup2 in the guest kernel; console:\n{out}"
    );
    assert!(
        out.contains("has-overlay"),
        "no overlayfs in the guest kernel; console:\n{out}"
    );
    eprintln!("guest kernel booted to its marker and rebooted in {elapsed:?}");
}
