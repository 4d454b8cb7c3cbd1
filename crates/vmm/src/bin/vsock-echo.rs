//! Test helper that runs inside the guest of the boot tests (static binary):
//! `vsock-echo listen PORT` echoes every connection on AF_VSOCK PORT until EOF;
//! `vsock-echo connect CID PORT MSG` sends MSG and a newline, then prints all it receives;
//! `vsock-echo flood CID PORT CONNS SECONDS` (a hostile guest) keeps CONNS connections to PORT
//! busy writing as much as the host lets it, reconnecting whenever one is reset, for SECONDS,
//! then prints `FLOOD-DONE sent=BYTES resets=N`.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A connected vsock stream; UnixStream gives us Read/Write/shutdown on any stream socket fd.
fn stream(fd: OwnedFd) -> UnixStream {
    UnixStream::from(fd)
}

fn echo(mut s: UnixStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
}

fn listen(port: u32) -> std::io::Result<()> {
    let fd = vsock_socket()?;
    let addr = sockaddr(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    use std::os::fd::AsRawFd;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    })?;
    // SAFETY: listen on our own socket.
    check(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
    loop {
        // SAFETY: accept without peer address on our listening socket.
        let c = unsafe {
            libc::accept4(
                fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            continue;
        }
        // SAFETY: `c` is a freshly accepted socket we own.
        let s = stream(unsafe { OwnedFd::from_raw_fd(c) });
        std::thread::spawn(move || echo(s));
    }
}

fn open(cid: u32, port: u32) -> std::io::Result<UnixStream> {
    let fd = vsock_socket()?;
    let addr = sockaddr(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    use std::os::fd::AsRawFd;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    })?;
    Ok(stream(fd))
}

fn flood(cid: u32, port: u32, conns: u32, seconds: u32) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let until = Instant::now() + Duration::from_secs(u64::from(seconds));
    let sent = Arc::new(AtomicU64::new(0));
    let resets = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (sent, resets) = (sent.clone(), resets.clone());
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || {
                    let chunk = vec![0x5au8; 64 << 10];
                    while Instant::now() < until {
                        let Ok(mut s) = open(cid, port) else {
                            resets.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        };
                        let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
                        while Instant::now() < until {
                            match s.write(&chunk) {
                                Ok(n) => {
                                    sent.fetch_add(n as u64, Ordering::Relaxed);
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => {
                                    resets.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            }
                        }
                    }
                })
                .expect("thread")
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    println!(
        "FLOOD-DONE sent={} resets={}",
        sent.load(Ordering::Relaxed),
        resets.load(Ordering::Relaxed)
    );
}

fn connect(cid: u32, port: u32, msg: &str) -> std::io::Result<()> {
    let mut s = open(cid, port)?;
    s.write_all(format!("{msg}\n").as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    std::io::stdout().write_all(&out)?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| args.get(i).and_then(|a| a.parse::<u32>().ok());
    let result = match (args.get(1).map(String::as_str), num(2), num(3)) {
        (Some("listen"), Some(port), _) => listen(port),
        (Some("connect"), Some(cid), Some(port)) => {
            connect(cid, port, args.get(4).map_or("", String::as_str))
        }
        (Some("flood"), Some(cid), Some(port)) => {
            flood(cid, port, num(4).unwrap_or(64), num(5).unwrap_or(10));
            Ok(())
        }
        _ => {
            eprintln!("usage: vsock-echo listen PORT | connect CID PORT MSG | flood CID PORT CONNS SECONDS");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("vsock-echo: {e}");
        std::process::exit(1);
    }
}
