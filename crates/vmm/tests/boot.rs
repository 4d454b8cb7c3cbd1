//! Linux boot tests: the real guest kernel on a KVM that can run it (the KVM lab).
//!
//! Enabled by `CLOUDE_BOOT_TESTS=1`; the kernel comes from `CLOUDE_KERNEL` (bzImage or vmlinux).
//! Each test builds a tiny initramfs (static busybox + a shell `/init` + the static
//! `vsock-echo` helper) whose behaviour is picked by `cloude_test=MODE` on the kernel command
//! line (the kernel hands unknown `key=value` parameters to init as environment variables).
//! Host files used (keep them `--copy`able into the lab): `CLOUDE_BUSYBOX` (default
//! /bin/busybox); `CLOUDE_VMM` or `CLOUDE_VMM_BIN` (default: the built cloude-vmm if present,
//! else `cloude-vmm` on PATH). `CLOUDE_VSOCK_ECHO` (default: the built
//! `vsock-echo` helper, target/<triple>/debug/vsock-echo — copy it into the lab too). The disk
//! tests make their EROFS image with `mkfs.erofs` (Debian `erofs-utils`; the lab has it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Per-boot limit (nested TCG in the lab is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd tsc=reliable";

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
case "$cloude_test" in
  marker)
    echo CLOUDE-BOOT-MARKER ;;
  cpus)
    echo "GUEST-CPUS=$(grep -c ^processor /proc/cpuinfo)" ;;
  mem)
    echo "GUEST-MEM=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)" ;;
  vsock)
    /bin/vsock-echo listen 1024 &
    sleep 0.2
    /bin/vsock-echo connect 2 1025 READY ;;
  snap)
    /bin/vsock-echo listen 1024 &
    sleep 0.2
    /bin/vsock-echo connect 2 1025 READY
    # Reached after a restore: the transport reset dropped the announce connection.
    echo AFTER-RESET
    i=0
    while true; do i=$((i+1)); echo "TICK-$i"; sleep 1; done ;;
  net-snap)
    ip link set lo up
    nc -ll -p 8080 -e /bin/cat &
    echo NET-READY
    i=0
    while true; do i=$((i+1)); echo "TICK-$i"; sleep 1; done ;;
  vsock-flood)
    /bin/vsock-echo flood 2 1030 256 12 ;;
  blk-ro)
    mkdir -p /mnt
    echo "BLK-RO-FLAG=$(cat /sys/block/vda/ro) SIZE=$(cat /sys/block/vda/size) SERIAL=$(cat /sys/block/vda/serial)"
    mount -t erofs -o ro /dev/vda /mnt && echo BLK-MOUNTED
    echo "BLK-FILE=$(cat /mnt/hello.txt)"
    echo "BLK-BIG=$(md5sum /mnt/big.bin)"
    if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/tmp/dd.err; then
      echo BLK-DD-WROTE
    else
      echo "BLK-DD-REFUSED: $(head -n 1 /tmp/dd.err)"
    fi ;;
  blk-rw)
    echo "BLK-DISKS=$(cat /sys/block/vda/ro)$(cat /sys/block/vdb/ro) $(cat /sys/block/vda/serial) $(cat /sys/block/vdb/serial)"
    yes CLOUDE-BLK-PATTERN | head -c 2097152 > /tmp/pattern
    if dd if=/tmp/pattern of=/dev/vdb bs=1M seek=1 conv=fsync 2>/tmp/dd.err; then
      echo BLK-RW-WROTE
    else
      echo "BLK-RW-FAILED: $(head -n 1 /tmp/dd.err)"
    fi
    sync
    echo "BLK-RW-BACK=$(dd if=/dev/vdb bs=1M skip=1 count=2 iflag=direct 2>/dev/null | md5sum) WANT=$(md5sum < /tmp/pattern)" ;;
  blk-snap)
    mkdir -p /mnt
    mount -t erofs -o ro /dev/vda /mnt && echo BLK-MOUNTED
    i=0
    while true; do
      i=$((i+1))
      # Dropped caches: every tick reads the disk again (through the device, after a restore).
      echo 3 > /proc/sys/vm/drop_caches
      echo "BLK-TICK-$i $(cat /mnt/hello.txt) $(md5sum /mnt/big.bin)"
      sleep 1
    done ;;
  net)
    ip link set lo up
    nc -ll -p 8080 -e /bin/cat &
    echo NET-READY
    i=0
    while [ $i -lt 100 ]; do
      if echo FROM-GUEST | nc -w 2 10.77.0.1 9090; then break; fi
      sleep 0.2; i=$((i+1))
    done
    nc -l -p 8081 ;;
esac
echo CLOUDE-TEST-DONE
reboot -f
"#;

fn enabled() -> Option<PathBuf> {
    if std::env::var("CLOUDE_BOOT_TESTS").ok().as_deref() != Some("1") {
        println!(
            "SKIPPED: Linux boot tests run inside the KVM lab (cargo xtask test runs them there)"
        );
        return None;
    }
    let k = std::env::var_os("CLOUDE_KERNEL").expect("CLOUDE_BOOT_TESTS=1 needs CLOUDE_KERNEL");
    Some(PathBuf::from(k))
}

fn vmm() -> PathBuf {
    for var in ["CLOUDE_VMM", "CLOUDE_VMM_BIN"] {
        if let Some(p) = std::env::var_os(var) {
            return p.into();
        }
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_cloude-vmm"));
    if built.exists() {
        built
    } else {
        "cloude-vmm".into()
    }
}

fn host_file(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| default.into())
}

fn initramfs(dir: &Path) -> PathBuf {
    let busybox = host_file("CLOUDE_BUSYBOX", "/bin/busybox");
    let echo = host_file("CLOUDE_VSOCK_ECHO", env!("CARGO_BIN_EXE_vsock-echo"));
    // The project's one newc writer (the image builder's).
    let mut c = cloude_image::image::cpio::Writer::new(Vec::new());
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        c.dir(d, 0o755).expect("dir");
    }
    c.bytes("init", 0o755, INIT.as_bytes()).expect("init");
    c.file("bin/busybox", 0o755, &busybox, 0)
        .unwrap_or_else(|e| panic!("{}: {e}", busybox.display()));
    c.file("bin/vsock-echo", 0o755, &echo, 0)
        .unwrap_or_else(|e| panic!("{}: {e}", echo.display()));
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, c.finish(4).expect("finish")).expect("write initramfs");
    path
}

/// A running VMM whose serial lines arrive on a channel.
struct Vm {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Vm {
    fn start(kernel: &Path, mode: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let initrd = initramfs(dir.path());
        let mut cmd = Command::new(vmm());
        cmd.arg("--kernel")
            .arg(kernel)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--cmdline")
            .arg(format!("{BASE_CMDLINE} cloude_test={mode}"))
            .args(extra);
        Self::spawn(cmd, dir, "guest")
    }

    /// Resumes the snapshot in `snap`; serial lines are printed with `name`.
    fn restore(snap: &Path, name: &'static str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(vmm());
        cmd.arg("--restore").arg(snap).args(extra);
        Self::spawn(cmd, dir, name)
    }

    fn spawn(mut cmd: Command, dir: tempfile::TempDir, name: &'static str) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn cloude-vmm");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        let spawned = Instant::now();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if name == "guest" {
                    println!("{name}: {line}");
                } else {
                    println!("{name} +{:.3}s: {line}", spawned.elapsed().as_secs_f64());
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            _dir: dir,
        }
    }

    /// Waits for a serial line containing `needle`; returns that line.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no {needle:?} on serial; last lines: {:?}",
                        self.seen.iter().rev().take(20).collect::<Vec<_>>()
                    );
                }
            }
        }
    }

    /// Waits for the VMM to exit; asserts status 0.
    fn expect_clean_exit(mut self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                assert!(s.success(), "cloude-vmm exited with {s}");
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("cloude-vmm did not exit after the guest finished");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The decimal number right after `key` in a serial line (console lines may carry stray bytes).
fn number_after(line: &str, key: &str) -> u64 {
    let rest = line.split(key).nth(1).unwrap_or("");
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key} in {line:?}"))
}

#[test]
fn marker_on_serial_and_exit_zero() {
    let Some(kernel) = enabled() else { return };
    let mut vm = Vm::start(&kernel, "marker", &[]);
    vm.wait_for("CLOUDE-BOOT-MARKER");
    vm.expect_clean_exit();
}

#[test]
fn guest_sees_all_vcpus() {
    let Some(kernel) = enabled() else { return };
    for n in ["2", "4"] {
        let mut vm = Vm::start(&kernel, "cpus", &["--vcpus", n]);
        let line = vm.wait_for("GUEST-CPUS=");
        assert_eq!(
            number_after(&line, "GUEST-CPUS="),
            n.parse::<u64>().expect("n"),
            "{line:?}"
        );
        vm.expect_clean_exit();
    }
}

#[test]
fn guest_sees_its_memory() {
    let Some(kernel) = enabled() else { return };
    let mut vm = Vm::start(&kernel, "mem", &["--memory-mib", "512"]);
    let line = vm.wait_for("MEM=");
    let kib: u64 = number_after(&line, "GUEST-MEM=");
    // The kernel keeps some memory for itself; MemTotal is a bit below the RAM size.
    assert!(
        (440 * 1024..=512 * 1024).contains(&kib),
        "MemTotal {kib} KiB for 512 MiB"
    );
    vm.expect_clean_exit();
}

fn connect_port(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).expect("connect vsock uds");
    s.write_all(cloude_protocol::vmm_wire::connect_line(port).as_bytes())
        .expect("CONNECT");
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b).expect("OK line");
        line.push(b[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "handshake answer {:?}",
        String::from_utf8_lossy(&line)
    );
    s
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends `data` and reads back the echo on another thread; returns the echoed bytes.
fn echo_through(s: UnixStream, data: Vec<u8>) -> Vec<u8> {
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        w.write_all(&data).expect("send");
        w.shutdown(std::net::Shutdown::Write).expect("half-close");
    });
    let mut r = s;
    let mut got = Vec::new();
    r.read_to_end(&mut got).expect("echo");
    writer.join().expect("writer");
    got
}

#[test]
fn vsock_both_ways_many_connections_and_16_mib() {
    let Some(kernel) = enabled() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let uds = dir.path().join("vsock.sock");
    // Guest-initiated: the guest announces itself on host port 1025.
    let ready = UnixListener::bind(format!("{}_1025", uds.display())).expect("bind _1025");
    let uds_s = uds.to_str().expect("utf8");
    let mut vm = Vm::start(
        &kernel,
        "vsock",
        &["--vsock-cid", "7", "--vsock-uds", uds_s],
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = ready.accept().map(|(s, _)| s);
        let _ = tx.send(r);
    });
    let mut guest_conn = rx
        .recv_timeout(BOOT_TIMEOUT)
        .expect("guest connected to _1025")
        .expect("accept");
    let mut hello = [0u8; 6];
    guest_conn.read_exact(&mut hello).expect("READY");
    assert_eq!(&hello, b"READY\n");

    // Host-initiated, 16 MiB echoed.
    let start = Instant::now();
    let big = pattern(1, 16 << 20);
    let got = echo_through(connect_port(&uds, 1024), big.clone());
    let took = start.elapsed();
    assert_eq!(got.len(), big.len());
    assert!(got == big, "16 MiB echo differs");
    println!(
        "vsock: 16 MiB echoed in {took:?} ({:.1} MiB/s each way)",
        16.0 / took.as_secs_f64()
    );

    // Eight at once.
    let handles: Vec<_> = (0..8u8)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let data = pattern(i + 10, 256 << 10);
                let got = echo_through(connect_port(&uds, 1024), data.clone());
                assert!(got == data, "connection {i} corrupted");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("connection thread");
    }

    // A port nobody listens on is refused (reset): the client sees EOF without OK.
    let mut s = UnixStream::connect(&uds).expect("connect");
    s.write_all(b"CONNECT 4444\n").expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("eof");
    assert!(
        buf.is_empty(),
        "refused connection answered {:?}",
        String::from_utf8_lossy(&buf)
    );

    // Let the guest finish: closing the announce connection ends its client, init reboots.
    guest_conn.write_all(b"BYE\n").expect("bye");
    drop(guest_conn);
    vm.wait_for("CLOUDE-TEST-DONE");
    vm.expect_clean_exit();
    assert!(!uds.exists(), "vsock socket left behind");
}

/// Resident memory of process `pid` outside its guest RAM mapping (the one mapping of at least
/// `guest_kib`), in KiB.
fn rss_outside_guest_kib(pid: u32, guest_kib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut total, mut size) = (0u64, 0u64);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(v)) => size = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) if size < guest_kib => total += v.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    total
}

/// A hostile guest opens 256 connections to a host port whose listener accepts them and never
/// reads, and keeps writing on each for 12 s (reconnecting when reset). Without a total budget
/// the VMM would hold 256 × 256 KiB = 64 MiB of guest data; with it, its memory outside guest RAM
/// stays under [`FLOOD_RSS_CAP_KIB`] for the whole window, and the VM still powers off cleanly.
#[test]
fn vsock_flood_of_unread_connections_is_bounded() {
    /// 16 MiB budget (`muxer::MAX_PENDING_TOTAL`) + the VMM's own few MiB + slack.
    const FLOOD_RSS_CAP_KIB: u64 = 28 << 10;
    let Some(kernel) = enabled() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let uds = dir.path().join("vsock.sock");
    let sink = UnixListener::bind(format!("{}_1030", uds.display())).expect("bind _1030");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in sink.incoming() {
            match s {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
    });
    let uds_s = uds.to_str().expect("utf8");
    let mut vm = Vm::start(
        &kernel,
        "vsock-flood",
        &[
            "--vsock-cid",
            "9",
            "--vsock-uds",
            uds_s,
            "--memory-mib",
            "256",
        ],
    );
    let pid = vm.child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut peak = 0u64;
        let mut samples = 0u32;
        while std::fs::metadata(format!("/proc/{pid}")).is_ok() {
            let r = rss_outside_guest_kib(pid, 256 << 10);
            peak = peak.max(r);
            samples += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = tx.send((peak, samples));
    });
    let done = vm.wait_for("FLOOD-DONE");
    vm.wait_for("CLOUDE-TEST-DONE");
    vm.expect_clean_exit();
    let (peak, samples) = rx.recv_timeout(Duration::from_secs(10)).expect("sampler");
    println!("vsock flood: {done}; VMM RSS outside guest RAM peaked at {peak} KiB over {samples} samples (cap {FLOOD_RSS_CAP_KIB} KiB)");
    assert!(
        number_after(&done, "sent=") > 16 << 20,
        "the flood ran: {done}"
    );
    assert!(samples > 20, "sampled through the window");
    assert!(peak < FLOOD_RSS_CAP_KIB, "VMM held {peak} KiB");
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// virtio-net: the test thread enters a fresh network namespace (unshare), starts the VMM there
/// (it creates tap0), gives the tap the host address, and talks TCP with the guest both ways.
/// Works with iproute2 or busybox `ip`; nothing touches the host's own network namespace.
#[test]
fn virtio_net_tcp_both_ways_in_a_netns() {
    let Some(kernel) = enabled() else { return };
    std::thread::spawn(move || {
        // SAFETY: unshare only affects this thread's namespaces; the thread ends with the test.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let mut vm = Vm::start(
            &kernel,
            "net",
            &[
                "--tap",
                "tap0",
                "--guest-mac",
                "06:00:0a:4d:00:02",
                "--guest-ip",
                "10.77.0.2/30",
                "--host-ip",
                "10.77.0.1",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        // Wait (quietly) for the VMM to create the tap before configuring it.
        // (/proc/thread-self: this thread's network namespace, which it unshared.)
        while !std::fs::read_to_string("/proc/thread-self/net/dev")
            .unwrap_or_default()
            .contains("tap0:")
        {
            assert!(Instant::now() < deadline, "tap0 never appeared");
            std::thread::sleep(Duration::from_millis(50));
        }
        while !ip(&["addr", "add", "10.77.0.1/30", "dev", "tap0"]) {
            assert!(Instant::now() < deadline, "tap0 never appeared");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            ip(&["link", "set", "tap0", "up"]) && ip(&["link", "set", "lo", "up"]),
            "ip link set"
        );
        let listener = TcpListener::bind("10.77.0.1:9090").expect("bind 9090");
        vm.wait_for("NET-READY");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // One line, then close: busybox nc exits when the peer closes.
            let got = listener.accept().map(|(s, _)| {
                let mut b = String::new();
                let _ = BufReader::new(s).read_line(&mut b);
                b
            });
            let _ = tx.send(got);
        });
        let from_guest = rx
            .recv_timeout(BOOT_TIMEOUT)
            .expect("guest reached the host")
            .expect("read");
        assert_eq!(from_guest, "FROM-GUEST\n");
        let addr = "10.77.0.2:8080".parse().expect("addr");
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(30)).expect("connect guest");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(b"ping over virtio-net\n").expect("send");
        let mut b = [0u8; 21];
        s.read_exact(&mut b).expect("echo");
        assert_eq!(&b, b"ping over virtio-net\n");
        // The guest opens 8081 only after its own client above has exited: retry until then.
        let done = "10.77.0.2:8081".parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match TcpStream::connect_timeout(&done, Duration::from_secs(30)) {
                Ok(s) => break drop(s),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    assert!(Instant::now() < deadline, "guest never listened on 8081");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("connect 8081: {e}"),
            }
        }
        vm.wait_for("CLOUDE-TEST-DONE");
        vm.expect_clean_exit();
    })
    .join()
    .expect("network test thread");
}

/// Connects to guest port 1024 through `uds` and echoes `ping` until that works (the VMM may not
/// have bound `uds` yet, and right after a restore the guest may still be handling the vsock
/// transport reset); returns when the first answer came back.
fn first_echo(uds: &Path, deadline: Instant) {
    let start = Instant::now();
    let mut attempts = 0;
    let mut last = String::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no echo through {} ({last})",
            uds.display()
        );
        attempts += 1;
        let failed = match UnixStream::connect(uds) {
            Err(e) => format!("connect: {e}"),
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                let _ = s.write_all(b"CONNECT 1024\n");
                while b[0] != b'\n' && s.read_exact(&mut b).is_ok() {
                    line.push(b[0]);
                }
                if !line.starts_with(b"OK ") {
                    format!(
                        "no OK after {:?}: {:?}",
                        start.elapsed(),
                        String::from_utf8_lossy(&line)
                    )
                } else {
                    let _ = s.write_all(b"ping\n");
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    let mut got = Vec::new();
                    let _ = s.read_to_end(&mut got);
                    if got == b"ping\n" {
                        if attempts > 1 {
                            println!(
                                "{}: echo on attempt {attempts} after {:?} (before: {last})",
                                uds.display(),
                                start.elapsed()
                            );
                        }
                        return;
                    }
                    format!(
                        "OK but echo {:?} after {:?}",
                        String::from_utf8_lossy(&got),
                        start.elapsed()
                    )
                }
            }
        };
        if failed != last && !last.is_empty() {
            println!("{}: attempt {attempts}: {last}", uds.display());
        }
        last = failed;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `Rss:` and `Pss:` of process `pid` in KiB (from /proc/PID/smaps_rollup).
fn rss_pss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in smaps_rollup"))
    };
    (field("Rss:"), field("Pss:"))
}

/// Boots a 2-vCPU guest with an echo listener on vsock port 1024, snapshots it through the control
/// socket, and restores two clones at once from the same snapshot with their own CIDs and
/// sockets: each answers over vsock after the transport reset and keeps running (its timer
/// ticks), and the clones share the snapshot's unmodified memory (PSS well below RSS). Prints
/// boot-to-first-answer and restore-to-first-answer.
#[test]
fn snapshot_restores_two_clones_that_answer_over_vsock() {
    let Some(kernel) = enabled() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let path = |n: &str| dir.path().join(n);
    let (uds, ctl, snap) = (path("a.sock"), path("ctl.sock"), path("snap"));
    std::fs::create_dir(&snap).expect("snapshot dir");
    let ready = UnixListener::bind(format!("{}_1025", uds.display())).expect("bind _1025");
    let s = |p: &PathBuf| p.to_str().expect("utf8").to_string();
    let common = [
        "--memory-mib",
        "256",
        "--vcpus",
        "2",
        "--snapshot-tag",
        "lab-snap",
    ];
    let booted = Instant::now();
    let (uds_s, ctl_s) = (s(&uds), s(&ctl));
    let mut args = vec![
        "--vsock-cid",
        "7",
        "--vsock-uds",
        &uds_s,
        "--snapshot-control",
        &ctl_s,
    ];
    args.extend_from_slice(&common);
    let vm = Vm::start(&kernel, "snap", &args);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(ready.accept().map(|(s, _)| s));
    });
    let mut announce = rx
        .recv_timeout(BOOT_TIMEOUT)
        .expect("guest connected to _1025")
        .expect("accept");
    let mut hello = [0u8; 6];
    announce.read_exact(&mut hello).expect("READY");
    first_echo(&uds, booted + BOOT_TIMEOUT);
    let boot_to_answer = booted.elapsed();

    let started = Instant::now();
    let mut c = UnixStream::connect(&ctl).expect("control socket");
    c.write_all(cloude_protocol::vmm_wire::snapshot_line(&snap).as_bytes())
        .expect("command");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("answer");
    assert_eq!(answer, "OK\n");
    let snapshot_took = started.elapsed();
    vm.expect_clean_exit();
    drop(announce);
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(snap.join("memory")).expect("memory");
        let st = std::fs::metadata(snap.join("state")).expect("state");
        println!(
            "snapshot: {snapshot_took:?}; state {} bytes; memory {} MiB long, {} MiB allocated",
            st.len(),
            m.len() >> 20,
            (m.blocks() * 512) >> 20
        );
        assert_eq!(m.len(), 256 << 20);
    }

    // Two clones at once, each with its own CID and socket.
    let restored = Instant::now();
    let clone = |name: &'static str, cid: &str, sock: &PathBuf| {
        let sock = s(sock);
        let mut a = vec!["--vsock-cid", cid, "--vsock-uds", &sock];
        a.extend_from_slice(&common);
        Vm::restore(&snap, name, &a)
    };
    let (ub, uc) = (path("b.sock"), path("c.sock"));
    let mut b = clone("clone-b", "8", &ub);
    let mut cl = clone("clone-c", "9", &uc);
    let waits: Vec<_> = [ub.clone(), uc.clone()]
        .into_iter()
        .map(|u| {
            std::thread::spawn(move || {
                first_echo(&u, restored + BOOT_TIMEOUT);
                restored.elapsed()
            })
        })
        .collect();
    let answers: Vec<Duration> = waits
        .into_iter()
        .map(|h| h.join().expect("echo thread"))
        .collect();
    println!(
        "boot to first answer {boot_to_answer:?}; restore (two clones at once) to first answer {:?} and {:?}",
        answers[0], answers[1]
    );
    // Each clone keeps running (its timer ticks) and carries real traffic.
    for (vm, u) in [(&mut b, &ub), (&mut cl, &uc)] {
        vm.wait_for("AFTER-RESET");
        vm.wait_for("TICK-2");
        let data = pattern(3, 1 << 20);
        let got = echo_through(connect_port(u, 1024), data.clone());
        assert!(got == data, "1 MiB echo through {} differs", u.display());
    }
    for (name, vm) in [("clone-b", &b), ("clone-c", &cl)] {
        let (rss, pss) = rss_pss_kib(vm.child.id());
        println!("{name}: RSS {rss} KiB, PSS {pss} KiB");
        assert!(
            pss * 10 < rss * 8,
            "{name} does not share the snapshot's memory: RSS {rss} KiB, PSS {pss} KiB"
        );
    }
    // A corrupt copy is refused before anything runs.
    let bad = path("bad");
    std::fs::create_dir(&bad).expect("dir");
    let mut st = std::fs::read(snap.join("state")).expect("state");
    let n = st.len();
    st[n - 10] ^= 1;
    std::fs::write(bad.join("state"), st).expect("write");
    std::fs::copy(snap.join("memory"), bad.join("memory")).expect("copy");
    let out = Command::new(vmm())
        .arg("--restore")
        .arg(&bad)
        .args(["--vsock-cid", "10", "--vsock-uds"])
        .arg(path("d.sock"))
        .args(common)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.starts_with("cloude-vmm: snapshot refused: "), "{err}");
}

/// Brings up `tap` in this thread's network namespace as 10.78.0.1/30 once the VMM created it.
fn configure_tap(tap: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap_or_default()
        .contains(&format!("{tap}:"))
    {
        assert!(Instant::now() < deadline, "{tap} never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    while !ip(&["addr", "add", "10.78.0.1/30", "dev", tap]) {
        assert!(Instant::now() < deadline, "cannot address {tap}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ip(&["link", "set", tap, "up"]), "ip link set {tap} up");
}

/// One line echoed by the guest's `nc -e cat` on 10.78.0.2:8080, retried until it works.
fn tcp_echo(deadline: Instant) {
    let addr = "10.78.0.2:8080".parse().expect("addr");
    loop {
        assert!(Instant::now() < deadline, "no TCP echo from the guest");
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut b = [0u8; 12];
            if s.write_all(b"over the tap").is_ok() && s.read_exact(&mut b).is_ok() {
                assert_eq!(&b, b"over the tap");
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// virtio-net across a snapshot: a guest serving TCP on its tap is snapshotted and restored on
/// a new tap (same name, new device, in a private network namespace); TCP works again.
#[test]
fn snapshot_restore_with_virtio_net_on_a_new_tap() {
    let Some(kernel) = enabled() else { return };
    std::thread::spawn(move || {
        // SAFETY: unshare only affects this thread's namespaces; the thread ends with the test.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
        assert!(ip(&["link", "set", "lo", "up"]), "lo up");
        let dir = tempfile::tempdir().expect("dir");
        let (ctl, snap) = (dir.path().join("ctl.sock"), dir.path().join("snap"));
        std::fs::create_dir(&snap).expect("snapshot dir");
        let net = [
            "--tap",
            "tap0",
            "--guest-mac",
            "06:00:0a:4e:00:02",
            "--memory-mib",
            "256",
        ];
        let ctl_s = ctl.to_str().expect("utf8");
        let mut args = vec![
            "--guest-ip",
            "10.78.0.2/30",
            "--host-ip",
            "10.78.0.1",
            "--snapshot-control",
            ctl_s,
        ];
        args.extend_from_slice(&net);
        let mut vm = Vm::start(&kernel, "net-snap", &args);
        configure_tap("tap0");
        vm.wait_for("NET-READY");
        tcp_echo(Instant::now() + BOOT_TIMEOUT);
        let mut c = UnixStream::connect(&ctl).expect("control socket");
        c.write_all(cloude_protocol::vmm_wire::snapshot_line(&snap).as_bytes())
            .expect("command");
        let mut answer = String::new();
        c.read_to_string(&mut answer).expect("answer");
        assert_eq!(answer, "OK\n");
        vm.expect_clean_exit();
        let restored = Instant::now();
        let mut clone = Vm::restore(&snap, "net-clone", &net);
        configure_tap("tap0");
        tcp_echo(restored + BOOT_TIMEOUT);
        println!(
            "net clone: TCP echo {:?} after the restore",
            restored.elapsed()
        );
        clone.wait_for("TICK-");
    })
    .join()
    .expect("network test thread");
}

/// Text of `hello.txt` in the test image.
const HELLO: &str = "hello from a read-only erofs disk";
/// Bytes of `big.bin` in the test image (several maximum-size requests).
const BIG_LEN: usize = 3 << 20;

/// `md5sum` of `path` as busybox prints it (the hash only).
fn md5_hex(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().expect("md5sum");
    assert!(out.status.success(), "md5sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a hash")
        .to_string()
}

/// An EROFS image in `dir` holding `hello.txt` ([`HELLO`]) and `big.bin` ([`BIG_LEN`] bytes of
/// a pattern); returns the image and the MD5 of `big.bin`.
fn erofs_image(dir: &Path) -> (PathBuf, String) {
    erofs_image_named(dir, "root", 5)
}

/// [`erofs_image`] with `big.bin` made from `seed`, in `dir/<name>.erofs` (all timestamps 0,
/// so images of different seeds have the same layout and size).
fn erofs_image_named(dir: &Path, name: &str, seed: u8) -> (PathBuf, String) {
    let src = dir.join(name);
    std::fs::create_dir(&src).expect("src dir");
    std::fs::write(src.join("hello.txt"), HELLO).expect("hello");
    std::fs::write(src.join("big.bin"), pattern(seed, BIG_LEN)).expect("big");
    let img = dir.join(format!("{name}.erofs"));
    let out = Command::new("mkfs.erofs")
        .arg("-T0")
        .arg(&img)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("mkfs.erofs (Debian erofs-utils) is needed: {e}"));
    assert!(
        out.status.success(),
        "mkfs.erofs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let len = std::fs::metadata(&img).expect("image").len();
    assert!(len > 0 && len.is_multiple_of(512), "image of {len} bytes");
    let big = md5_hex(&src.join("big.bin"));
    (img, big)
}

fn path_arg(p: &Path) -> String {
    p.to_str().expect("utf8 path").to_string()
}

/// A read-only EROFS disk: the guest sees /dev/vda read-only with the image's size and the
/// device's serial, mounts it, reads both files (3 MiB through maximum-size requests), and
/// cannot write to the raw device; the image is unchanged afterwards.
#[test]
fn blk_read_only_erofs_disk() {
    let Some(kernel) = enabled() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let (img, big_md5) = erofs_image(dir.path());
    let before = std::fs::read(&img).expect("image");
    let started = Instant::now();
    let mut vm = Vm::start(&kernel, "blk-ro", &["--disk", &path_arg(&img)]);
    let flags = vm.wait_for("BLK-RO-FLAG=");
    assert!(flags.contains("BLK-RO-FLAG=1 "), "{flags}");
    assert_eq!(
        number_after(&flags, "SIZE="),
        before.len() as u64 / 512,
        "{flags}"
    );
    assert!(flags.contains("SERIAL=cloude-disk-0"), "{flags}");
    vm.wait_for("BLK-MOUNTED");
    let file = vm.wait_for("BLK-FILE=");
    assert!(file.ends_with(&format!("BLK-FILE={HELLO}")), "{file}");
    let big = vm.wait_for("BLK-BIG=");
    assert!(big.contains(&big_md5), "{big} (want {big_md5})");
    let dd = vm.wait_for("BLK-DD-");
    assert!(dd.contains("BLK-DD-REFUSED"), "the guest wrote: {dd}");
    vm.wait_for("CLOUDE-TEST-DONE");
    vm.expect_clean_exit();
    println!(
        "blk read-only: boot to done in {:?}; {dd}",
        started.elapsed()
    );
    assert!(
        std::fs::read(&img).expect("image") == before,
        "the image changed"
    );
}

/// A `,rw` raw disk after a read-only one: vda is read-only, vdb read-write; the guest writes
/// 2 MiB with dd at 1 MiB, syncs, reads it back with O_DIRECT (1 MiB requests), and the host
/// finds exactly that pattern in the file, zeros around it, and the read-only disk unchanged.
#[test]
fn blk_rw_disk_written_by_the_guest() {
    let Some(kernel) = enabled() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let (img, _) = erofs_image(dir.path());
    let ro_before = std::fs::read(&img).expect("image");
    let raw = dir.path().join("raw.img");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(4 << 20))
        .expect("raw disk");
    let rw = format!("{},rw", path_arg(&raw));
    let started = Instant::now();
    let mut vm = Vm::start(
        &kernel,
        "blk-rw",
        &["--disk", &path_arg(&img), "--disk", &rw],
    );
    let disks = vm.wait_for("BLK-DISKS=");
    assert!(
        disks.contains("BLK-DISKS=10 cloude-disk-0 cloude-disk-1"),
        "vda read-only, vdb read-write, in command-line order: {disks}"
    );
    let wrote = vm.wait_for("BLK-RW-");
    assert!(wrote.contains("BLK-RW-WROTE"), "{wrote}");
    let back = vm.wait_for("BLK-RW-BACK=");
    let hashes: Vec<&str> = back
        .split(['=', ' '])
        .filter(|w| w.len() == 32 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    assert_eq!(hashes.len(), 2, "{back}");
    assert_eq!(
        hashes[0], hashes[1],
        "the guest read back what it wrote: {back}"
    );
    vm.wait_for("CLOUDE-TEST-DONE");
    vm.expect_clean_exit();
    let took = started.elapsed();
    let disk = std::fs::read(&raw).expect("raw");
    assert_eq!(disk.len(), 4 << 20, "the disk kept its size");
    let line = b"CLOUDE-BLK-PATTERN\n";
    let want: Vec<u8> = line.iter().copied().cycle().take(2 << 20).collect();
    assert!(
        disk[1 << 20..3 << 20] == want[..],
        "the host file holds the guest's pattern"
    );
    assert!(disk[..1 << 20].iter().all(|b| *b == 0), "before untouched");
    assert!(disk[3 << 20..].iter().all(|b| *b == 0), "after untouched");
    assert!(std::fs::read(&img).expect("image") == ro_before);
    println!("blk rw: 2 MiB written, synced and read back; boot to done in {took:?}");
}

/// Four VMs booted at once on the same read-only image all read it.
#[test]
fn blk_four_vms_share_one_read_only_image() {
    let Some(kernel) = enabled() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let (img, big_md5) = erofs_image(dir.path());
    let before = std::fs::read(&img).expect("image");
    let started = Instant::now();
    let arg = path_arg(&img);
    let mut vms: Vec<Vm> = (0..4)
        .map(|_| Vm::start(&kernel, "blk-ro", &["--disk", &arg]))
        .collect();
    for (i, vm) in vms.iter_mut().enumerate() {
        let file = vm.wait_for("BLK-FILE=");
        assert!(
            file.ends_with(&format!("BLK-FILE={HELLO}")),
            "vm {i}: {file}"
        );
        let big = vm.wait_for("BLK-BIG=");
        assert!(big.contains(&big_md5), "vm {i}: {big}");
        vm.wait_for("CLOUDE-TEST-DONE");
    }
    let read = started.elapsed();
    for vm in vms {
        vm.expect_clean_exit();
    }
    println!("blk: four VMs at once read the same image, all done in {read:?}");
    assert!(std::fs::read(&img).expect("image") == before);
}

/// A guest with a mounted read-only disk is snapshotted and restored: the clone keeps reading
/// the disk (caches dropped before every read, so the reads reach the restored device). That
/// they do is shown by a second clone restored on an image of the same size whose `big.bin`
/// differs (outside the contract, on purpose): it reports the new file's hash. A restore
/// without the disk, with it read-write, or with a disk of another size is refused.
#[test]
fn blk_snapshot_restore_keeps_reading_the_disk() {
    let Some(kernel) = enabled() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let (img, big_md5) = erofs_image(dir.path());
    let (ctl, snap) = (dir.path().join("ctl.sock"), dir.path().join("snap"));
    std::fs::create_dir(&snap).expect("snapshot dir");
    let disk = path_arg(&img);
    let args = vec!["--disk", &disk, "--memory-mib", "256"];
    let ctl_s = path_arg(&ctl);
    let mut boot_args = args.clone();
    boot_args.extend_from_slice(&["--snapshot-control", &ctl_s]);
    let mut vm = Vm::start(&kernel, "blk-snap", &boot_args);
    vm.wait_for("BLK-MOUNTED");
    let tick = vm.wait_for("BLK-TICK-2 ");
    assert!(tick.contains(HELLO) && tick.contains(&big_md5), "{tick}");
    let mut c = UnixStream::connect(&ctl).expect("control socket");
    c.write_all(cloude_protocol::vmm_wire::snapshot_line(&snap).as_bytes())
        .expect("command");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("answer");
    assert_eq!(answer, "OK\n");
    let last = vm
        .seen
        .iter()
        .filter(|l| l.contains("BLK-TICK-"))
        .map(|l| number_after(l, "BLK-TICK-"))
        .max()
        .unwrap_or(0);
    vm.expect_clean_exit();

    let restored = Instant::now();
    let mut clone = Vm::restore(&snap, "blk-clone", &args);
    let next = loop {
        let l = clone.wait_for("BLK-TICK-");
        if number_after(&l, "BLK-TICK-") > last {
            break l;
        }
    };
    let first_read = restored.elapsed();
    assert!(
        next.contains(HELLO) && next.contains(&big_md5),
        "the clone read the disk: {next}"
    );
    let again = clone.wait_for(&format!(
        "BLK-TICK-{} ",
        number_after(&next, "BLK-TICK-") + 1
    ));
    assert!(again.contains(HELLO) && again.contains(&big_md5), "{again}");
    println!("blk snapshot: the clone read the disk {first_read:?} after the restore ({next})");
    drop(clone);

    let (swapped, swapped_md5) = erofs_image_named(dir.path(), "swapped", 9);
    assert_ne!(swapped_md5, big_md5);
    assert_eq!(
        std::fs::metadata(&swapped).expect("image").len(),
        std::fs::metadata(&img).expect("image").len(),
        "same layout"
    );
    let swapped_s = path_arg(&swapped);
    let mut probe = Vm::restore(
        &snap,
        "blk-probe",
        &["--disk", &swapped_s, "--memory-mib", "256"],
    );
    let seen = loop {
        let l = probe.wait_for("BLK-TICK-");
        if number_after(&l, "BLK-TICK-") > last {
            break l;
        }
    };
    assert!(
        seen.contains(&swapped_md5),
        "the restored guest read the new file through the device: {seen}"
    );
    drop(probe);

    // Refusals: no disk, the disk read-write, a disk of another size.
    let other = dir.path().join("other.img");
    std::fs::File::create(&other)
        .and_then(|f| f.set_len(std::fs::metadata(&img).expect("image").len() + 4096))
        .expect("other disk");
    let rw = format!("{disk},rw");
    let other_s = path_arg(&other);
    for (disks, want) in [
        (vec![], "devices are [block, rng]"),
        (vec!["--disk", rw.as_str()], "disks are ["),
        (vec!["--disk", other_s.as_str()], "disks are ["),
    ] {
        let out = Command::new(vmm())
            .arg("--restore")
            .arg(&snap)
            .args(&disks)
            .args(["--memory-mib", "256"])
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{disks:?}: {err}");
        assert!(
            err.starts_with("cloude-vmm: snapshot refused: ") && err.contains(want),
            "{disks:?}: {err}"
        );
    }
}
