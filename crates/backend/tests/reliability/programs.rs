//! Hostile programs in real VMs: each gets the right `status` within its timeout plus a small
//! margin, and the server stays healthy.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::checks::{short, Checks};
use crate::support::Server;

/// Slack on a run's `run_ms` over its timeout (agent handshake, file writes, killing the
/// process tree; software emulation on a shared 2-core machine).
const RUN_MARGIN_MS: u64 = 8000;
/// VMs at once for this phase (the server's `max_concurrent_vms`).
const WORKERS: usize = 3;

type Verify = Box<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

struct Prog {
    name: &'static str,
    body: Value,
    timeout_ms: u64,
    verify: Verify,
}

/// Writes 4 MiB of x86 code (`mov eax, i; inc eax` x 2M; `ret`) into an executable mapping and
/// calls it, 30 times over the same addresses: every pass is new code to the emulator.
const JIT_SPRAY: &str = r#"
import ctypes, mmap
SIZE = 4 << 20
buf = mmap.mmap(-1, SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
fn = ctypes.CFUNCTYPE(ctypes.c_uint32)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
incs = (SIZE - 16) // 2
body = b"\xff\xc0" * incs
buf[5 + 2 * incs] = 0xC3
for i in range(30):
    buf[0:5] = b"\xb8" + i.to_bytes(4, "little")
    buf[5:5 + 2 * incs] = body
    assert fn() == i + incs
print("ok", 30, "passes")
"#;

pub fn exec(s: &Server, body: &Value) -> (u16, Value) {
    let r = s.post("/v1/executions", body);
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| json!({"raw": r.text()}));
    (r.status, v)
}

fn status_is(want: &'static [&'static str]) -> impl Fn(&Value) -> Result<(), String> {
    move |v: &Value| {
        let st = v["status"].as_str().unwrap_or("");
        if want.contains(&st) {
            Ok(())
        } else {
            Err(format!("status {st:?}, want one of {want:?}"))
        }
    }
}

fn prog(
    name: &'static str,
    language: &str,
    code: &str,
    timeout_ms: u64,
    verify: impl Fn(&Value) -> Result<(), String> + Send + Sync + 'static,
) -> Prog {
    Prog {
        name,
        body: json!({"language": language, "code": code, "timeout_ms": timeout_ms}),
        timeout_ms,
        verify: Box::new(verify),
    }
}

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or(""))
        .unwrap_or_default()
}

fn out_len(v: &Value) -> usize {
    v["stdout"].as_str().map_or(0, str::len) + v["stderr"].as_str().map_or(0, str::len)
}

fn programs() -> Vec<Prog> {
    let limit_cap = 1024 * 1024 + 64 * 1024;
    let mut v = vec![
        prog("infinite loop", "python", "while True:\n    pass\n", 2000, status_is(&["timeout"])),
        prog("sleep past the timeout", "bash", "echo before\nsleep 100\necho after\n", 2000, |v| {
            status_is(&["timeout"])(v)?;
            (v["stdout"] == "before\n").then_some(()).ok_or("output before the timeout lost".into())
        }),
        prog(
            "fork bomb",
            "python",
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            4000,
            status_is(&["timeout"]),
        ),
        prog(
            "allocating far beyond the VM's memory (default limit)",
            "python",
            "a = []\nwhile True:\n    a.append(b'x' * (32 << 20))\n",
            30000,
            status_is(&["memory_limit"]),
        ),
        // The emulator translates guest code into a cache of host code (TCG). A program that
        // rewrites and runs 4 MiB of code 30 times makes ~0.4 GiB of translations: without a cap
        // on that cache QEMU grew past its cgroup's memory limit and was killed mid-run.
        prog(
            "writing new machine code over and over (the emulator's translation cache)",
            "python",
            JIT_SPRAY,
            60000,
            |v| {
                status_is(&["ok"])(v)?;
                (v["stdout"].as_str().unwrap_or("").starts_with("ok 30 "))
                    .then_some(())
                    .ok_or("the program did not finish its 30 passes".into())
            },
        ),
        prog("printing forever", "bash", "yes", 10000, move |v| {
            status_is(&["output_limit"])(v)?;
            (out_len(v) <= limit_cap).then_some(()).ok_or(format!("{} bytes kept", out_len(v)))
        }),
        prog("printing 1 GiB (yes | head -c 1G)", "bash", "yes | head -c 1G", 20000, move |v| {
            status_is(&["output_limit"])(v)?;
            (out_len(v) <= limit_cap).then_some(()).ok_or(format!("{} bytes kept", out_len(v)))
        }),
        prog(
            "printing 1 GiB in 1 MiB blocks (python)",
            "python",
            "import sys\nb = b'z' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.buffer.write(b)\n",
            20000,
            move |v| {
                status_is(&["output_limit"])(v)?;
                (out_len(v) <= limit_cap).then_some(()).ok_or(format!("{} bytes kept", out_len(v)))
            },
        ),
        prog(
            "binary and invalid UTF-8 output",
            "python",
            "import sys\nsys.stdout.buffer.write(bytes(range(256)) * 4 + b'\\xe2\\x82')\nsys.stdout.flush()\nsys.stderr.buffer.write(b'\\xff\\xfeerr\\x00')\n",
            10000,
            |v| {
                status_is(&["ok"])(v)?;
                let mut want = (0..=255u8).collect::<Vec<u8>>().repeat(4);
                want.extend_from_slice(b"\xe2\x82");
                if b64(&v["stdout_base64"]) != want {
                    return Err("stdout_base64 is not the exact bytes".into());
                }
                if b64(&v["stderr_base64"]) != b"\xff\xfeerr\x00" {
                    return Err("stderr_base64 is not the exact bytes".into());
                }
                Ok(())
            },
        ),
        prog(
            "closing stdout early",
            "bash",
            "exec 1>&-\necho lost 2>/dev/null\nsleep 1\necho still-here >&2\nexit 3\n",
            10000,
            |v| {
                status_is(&["ok"])(v)?;
                (v["exit_code"] == 3 && v["stderr"] == "still-here\n" && v["stdout"] == "")
                    .then_some(())
                    .ok_or("wrong exit code or output".into())
            },
        ),
        prog(
            "closing stdout and stderr, then running on",
            "bash",
            "exec >&- 2>&-\nsleep 2\nexit 4\n",
            10000,
            |v| {
                status_is(&["ok"])(v)?;
                (v["exit_code"] == 4).then_some(()).ok_or("exit code not 4".into())
            },
        ),
        prog(
            "setsid and double-fork children outliving their parent",
            "bash",
            "setsid sleep 300 &\n(sleep 300 &)\n(setsid sh -c 'sleep 300 & exit 0' &)\necho parent-done\n",
            30000,
            |v| {
                status_is(&["ok"])(v)?;
                let run = v["timings"]["run_ms"].as_u64().unwrap_or(u64::MAX);
                if v["stdout"] != "parent-done\n" {
                    return Err("stdout lost".into());
                }
                // The children hold stdout open; the answer must not wait for them.
                (run < 15000).then_some(()).ok_or(format!("held up: run_ms {run}"))
            },
        ),
        prog(
            "python daemon (fork, setsid, fork) outliving its parent",
            "python",
            "import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(300)\n    os._exit(0)\nprint('parent-done')\n",
            30000,
            |v| {
                status_is(&["ok"])(v)?;
                let run = v["timings"]["run_ms"].as_u64().unwrap_or(u64::MAX);
                (v["stdout"] == "parent-done\n" && run < 15000)
                    .then_some(())
                    .ok_or(format!("stdout or held up: run_ms {run}"))
            },
        ),
        prog(
            "filling /tmp and the work dir",
            "bash",
            "head -c 4G /dev/zero > /tmp/fill; echo tmp=$?\nhead -c 4G /dev/zero > ./fill; echo work=$?\n",
            30000,
            |v| match v["status"].as_str() {
                Some("memory_limit") => Ok(()),
                Some("ok") => {
                    let out = v["stdout"].as_str().unwrap_or("");
                    (out.contains("tmp=1") && out.contains("work=1"))
                        .then_some(())
                        .ok_or(format!("writes did not fail: {out:?}"))
                }
                other => Err(format!("status {other:?}")),
            },
        ),
        prog(
            "signalling the agent (kill -9 1, kill -TERM -1)",
            "bash",
            "kill -9 1; echo kill1=$?\nkill -STOP 1; echo stop1=$?\ntrap '' TERM\nkill -TERM -1; echo killall=$?\necho alive\n",
            10000,
            |v| {
                status_is(&["ok"])(v)?;
                let out = v["stdout"].as_str().unwrap_or("");
                (out.contains("kill1=1") && out.contains("stop1=1") && out.contains("alive"))
                    .then_some(())
                    .ok_or(format!("agent signalled? {out:?}"))
            },
        ),
        prog(
            "trying to panic or reboot the guest kernel (unprivileged)",
            "bash",
            "echo c > /proc/sysrq-trigger; echo sysrq=$?\necho b > /proc/sysrq-trigger; reboot -f 2>/dev/null; echo alive\n",
            10000,
            |v| {
                status_is(&["ok"])(v)?;
                let out = v["stdout"].as_str().unwrap_or("");
                (out.contains("sysrq=1") && out.contains("alive"))
                    .then_some(())
                    .ok_or(format!("{out:?}"))
            },
        ),
        prog(
            "kernel interfaces the guest kernel leaves out (io_uring, bpf, userfaultfd, perf, ...)",
            "python",
            GUEST_SURFACE_PROBE,
            20000,
            |v| {
                status_is(&["ok"])(v)?;
                let out = v["stdout"].as_str().unwrap_or("");
                let wrong: Vec<&str> = out
                    .lines()
                    .filter(|l| {
                        let (name, errno) = l.split_once(' ').unwrap_or((l, ""));
                        // ENOSYS: not in the kernel; EACCES: perf events are root-only.
                        let want: &[&str] = if name == "perf_event_open" {
                            &["13", "38"]
                        } else {
                            &["38"]
                        };
                        !want.contains(&errno)
                    })
                    .collect();
                (out.lines().count() == 8 && wrong.is_empty())
                    .then_some(())
                    .ok_or(format!("not refused as expected: {wrong:?} in {out:?}"))
            },
        ),
    ];
    let mut mem = prog(
        "allocating far beyond memory_mib = 64",
        "python",
        "a = []\nwhile True:\n    a.append(b'x' * (8 << 20))\n",
        30000,
        status_is(&["memory_limit"]),
    );
    mem.body["memory_mib"] = json!(64);
    v.push(mem);
    // The test catalogue's root-run image (`bash-root`, see `TEST_CATALOG_EXTRA`): root in the
    // guest can panic its kernel; the request must still get a clear answer, and nothing leak.
    v.push(prog(
        "root-run test image runs as uid 0",
        "bash-root",
        "id -u\n",
        10000,
        |v| {
            status_is(&["ok"])(v)?;
            (v["stdout"] == "0\n")
                .then_some(())
                .ok_or("not root".into())
        },
    ));
    v.push(prog(
        "guest kernel panic (echo c > /proc/sysrq-trigger as root)",
        "bash-root",
        "echo before-panic\necho c > /proc/sysrq-trigger\nsleep 30\necho survived\n",
        20000,
        |v| {
            status_is(&["internal_error"])(v)?;
            let msg = v["message"].as_str().unwrap_or("");
            msg.contains("kernel panicked")
                .then_some(())
                .ok_or(format!("message does not name the panic: {msg:?}"))
        },
    ));
    v
}

/// Calls each system call the guest kernel is built without (`kernel/guest.config`, attack
/// surface) and prints `name errno` (0 if the call worked).
const GUEST_SURFACE_PROBE: &str = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(512)
def errno(nr, *args):
    ctypes.set_errno(0)
    return 0 if libc.syscall(nr, *args) >= 0 else ctypes.get_errno()
pid = os.getpid()
for name, nr, args in [
    ("io_uring_setup", 425, (1, buf)),
    ("bpf", 321, (0, buf, 64)),
    ("userfaultfd", 323, (0,)),
    ("perf_event_open", 298, (buf, 0, -1, -1, 0)),
    ("modify_ldt", 154, (0, buf, 16)),
    ("kcmp", 312, (pid, pid, 0, 0, 0)),
    ("ioperm", 173, (0x3f8, 8, 1)),
    ("kexec_load", 246, (0, 0, 0, 0)),
]:
    print(name, errno(nr, *args))
"#;

/// Appended to the default catalogue for the reliability server: a root-run bash image.
pub const TEST_CATALOG_EXTRA: &str = r#"
[[language]]
name = "bash-root"
file = "main.sh"
run = ["bash", "main.sh"]
debian_packages = ["bash", "coreutils"]
memory_mib = 256
run_as_root = true
"#;

/// Runs one program and checks its status, its own verification and its timing.
fn run_one(server: &Server, p: &Prog) -> Result<String, String> {
    let t = Instant::now();
    let (st, v) = exec(server, &p.body);
    let wall = t.elapsed();
    if st != 200 {
        return Err(format!("HTTP {st}: {}", short(&v)));
    }
    (p.verify)(&v).map_err(|e| format!("{e}: {}", short(&v)))?;
    let run = v["timings"]["run_ms"].as_u64().unwrap_or(u64::MAX);
    if run > p.timeout_ms + RUN_MARGIN_MS {
        return Err(format!(
            "run_ms {run} > timeout {} + {RUN_MARGIN_MS}",
            p.timeout_ms
        ));
    }
    Ok(format!(
        "{}: {} in {} ms wall (run {run} ms, timeout {} ms)",
        p.name,
        v["status"],
        wall.as_millis(),
        p.timeout_ms
    ))
}

/// Every hostile program, `WORKERS` at a time, then the cross-VM data check.
pub fn run(server: &Server, c: &mut Checks) {
    run_these(server, c, programs());
}

/// The hostile programs named in `names` (a bounded subset), then the cross-VM data check.
#[allow(dead_code)] // used by the tcp reliability test, not by the full suite
pub fn run_named(server: &Server, c: &mut Checks, names: &[&str]) {
    let chosen: Vec<Prog> = programs()
        .into_iter()
        .filter(|p| names.contains(&p.name))
        .collect();
    assert_eq!(
        chosen.len(),
        names.len(),
        "every named hostile program exists"
    );
    run_these(server, c, chosen);
}

fn run_these(server: &Server, c: &mut Checks, progs: Vec<Prog>) {
    let progs = Arc::new(progs);
    let next = Arc::new(Mutex::new(0usize));
    let results = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            let (progs, next, results) = (progs.clone(), next.clone(), results.clone());
            s.spawn(move || loop {
                let i = {
                    let mut n = next.lock().expect("lock");
                    *n += 1;
                    *n - 1
                };
                let Some(p) = progs.get(i) else { return };
                let r = run_one(server, p);
                results.lock().expect("lock").push((p.name, r));
            });
        }
    });
    let results = std::mem::take(&mut *results.lock().expect("lock"));
    for (name, r) in results {
        c.hostile_programs += 1;
        if let Ok(line) = &r {
            c.note(line.clone());
        }
        c.check(
            &format!("hostile program: {name}"),
            r.is_ok(),
            r.err().unwrap_or_default(),
        );
        let h = server.get("/healthz");
        if h.status != 200 {
            c.check("healthy after hostile programs", false, h.text());
        }
    }
    cross_vm_data(server, c);
}

/// One VM writes a unique token to /tmp, /dev/shm and its work dir; the next VM searches for it.
fn cross_vm_data(server: &Server, c: &mut Checks) {
    let nonce = format!(
        "{:x}{:x}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ 0x5eed
    );
    // The token is assembled at run time, so the search never matches the program's own text.
    let build = format!("T=sec; T=\"${{T}}ret-{nonce}-tok\"");
    let write = format!(
        "{build}\necho \"$T\" > /tmp/secret\necho \"$T\" > /dev/shm/secret\necho \"$T\" > ./secret\nls ./secret /tmp/secret >/dev/null && echo written\n"
    );
    let (st, v) = exec(server, &json!({"language": "bash", "code": write}));
    c.hostile_programs += 1;
    c.check(
        "hostile program: writing a secret for the next VM",
        st == 200 && v["stdout"] == "written\n",
        short(&v),
    );
    let search = format!(
        "{build}\ngrep -rsl -- \"$T\" /tmp /dev/shm /work /var/tmp /root /home /run 2>/dev/null\nls -a /tmp /dev/shm\necho searched\n"
    );
    let (st, v) = exec(server, &json!({"language": "bash", "code": search}));
    c.hostile_programs += 1;
    let out = v["stdout"].as_str().unwrap_or("");
    c.check(
        "hostile program: reading another VM's data finds nothing",
        st == 200 && out.contains("searched") && !out.contains("secret"),
        short(&v),
    );
}
