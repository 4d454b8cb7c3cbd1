//! Snapshot restore end to end (real server, real QEMU VMs under this host's driver): a snapshot
//! is made at start-up, every request is served by its own clone, clones are distinct machines
//! (random bytes, UUIDs, Python's `random`, boot ids), their clocks are the host's, nothing one
//! request writes is seen by the next, and damaged or mismatched snapshots are refused with a
//! clear log line while the request still succeeds through a cold boot.

use cloude_testkit as support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::Server;

const FIRST_START: Duration = Duration::from_secs(3600);

/// Prints what must differ between two machines, and the guest's clock.
const IDENTITY_PROGRAM: &str = "import os, uuid, random, time, json
print(json.dumps({
  'urandom': os.urandom(16).hex(),
  'uuid': str(uuid.uuid4()),
  'random': random.getrandbits(64),
  'boot_id': open('/proc/sys/kernel/random/boot_id').read().strip(),
  'time': time.time(),
  'hostname': os.uname().nodename,
}))";

fn config(dir: &Path) -> String {
    format!(
        "[vm]\nprebuild = [\"python\"]\n[snapshot]\nenabled = true\ndir = \"{}\"\n",
        dir.display()
    )
}

fn exec(s: &Server, body: Value) -> (u16, Value) {
    let r = s.post("/v1/executions", &body);
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| json!({ "raw": r.text() }));
    (r.status, v)
}

fn source(v: &Value) -> &str {
    v["timings"]["vm_source"].as_str().unwrap_or("?")
}

fn snapshot_dirs(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("qemu-python-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits up to `within` for /healthz to report `n` snapshots ready.
fn wait_ready(s: &Server, n: u64, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if s.get("/healthz").json()["snapshots_ready"].as_u64() == Some(n) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn metric(s: &Server, event: &str) -> u64 {
    let text = s.get("/metrics").text();
    let needle = format!("cloude_snapshot_events_total{{event=\"{event}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {event} metric in {text}"))
}

#[test]
fn clones_are_distinct_fresh_machines() {
    let dir = tempfile::tempdir().expect("snapshot dir");
    let server = Server::start(
        &["--hypervisor", "qemu"],
        Some(&config(dir.path())),
        FIRST_START,
    )
    .unwrap_or_else(|e| panic!("snapshot: {e}"));
    assert_eq!(server.get("/healthz").json()["snapshots"], true);
    assert!(
        wait_ready(&server, 1, Duration::from_secs(5)),
        "made at start-up"
    );
    assert_eq!(snapshot_dirs(dir.path()).len(), 1);

    // Eight clones of one snapshot at once (four run at a time: max_concurrent_vms).
    let answers: Vec<(u16, Value, f64)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                sc.spawn(|| {
                    let (st, v) = exec(
                        &server,
                        json!({"language": "python", "code": IDENTITY_PROGRAM}),
                    );
                    let host_now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .expect("clock")
                        .as_secs_f64();
                    (st, v, host_now)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut seen: [HashSet<String>; 4] = Default::default();
    for (st, v, host_after) in &answers {
        assert_eq!(*st, 200, "{v}");
        assert_eq!(v["status"], "ok", "{v}");
        assert_eq!(
            source(v),
            "snapshot",
            "every request is served by a clone: {v}"
        );
        let out: Value = serde_json::from_str(v["stdout"].as_str().unwrap_or("")).expect("json");
        for (i, k) in ["urandom", "uuid", "random", "boot_id"].iter().enumerate() {
            assert!(
                seen[i].insert(out[k].to_string()),
                "two clones share their {k}: {out}"
            );
        }
        assert_eq!(out["hostname"], "cloude");
        // The program ran within the request: its clock reading lies between the request's start
        // and its answer on the host's clock, give or take 1 s.
        let guest = out["time"].as_f64().expect("time");
        let total = v["timings"]["total_ms"].as_f64().unwrap_or(0.0) / 1000.0;
        assert!(
            guest <= host_after + 1.0 && guest >= host_after - total - 1.0,
            "the guest clock is off: guest {guest}, host {host_after} (request took {total} s)"
        );
        eprintln!(
            "snapshot: clone boot_ms {} total_ms {}",
            v["timings"]["boot_ms"], v["timings"]["total_ms"]
        );
    }

    // A file one request writes is not there for the next one.
    let write = "open('/tmp/left-behind', 'w').write('x'); open('/dev/shm/left-behind', 'w').write('x'); print('written')";
    let (_, v) = exec(&server, json!({"language": "python", "code": write}));
    assert_eq!(v["stdout"], "written\n", "{v}");
    let check =
        "import os; print(os.path.exists('/tmp/left-behind'), os.path.exists('/work/left-behind'))";
    let (_, v) = exec(&server, json!({"language": "python", "code": check}));
    assert_eq!(v["stdout"], "False False\n", "{v}");
    assert_eq!(source(&v), "snapshot");

    // A request that needs more memory than the snapshot's VM boots cold.
    let (_, v) = exec(
        &server,
        json!({"language": "python", "code": "print(1)", "memory_mib": 300}),
    );
    assert_eq!(v["stdout"], "1\n", "{v}");
    assert_eq!(source(&v), "cold", "{v}");

    assert!(metric(&server, "restored") >= 10);
    assert_eq!(metric(&server, "restore_failed"), 0);
    let status = server.stop(Duration::from_secs(30));
    assert!(matches!(&status, Ok(s) if s.success()), "{status:?}");
}

#[test]
fn damaged_and_mismatched_snapshots_are_refused_and_requests_boot_cold() {
    let dir = tempfile::tempdir().expect("snapshot dir");
    let cfg = config(dir.path());
    let hello = json!({"language": "python", "code": "print('hello')"});
    let server = Server::start(&["--hypervisor", "qemu"], Some(&cfg), FIRST_START)
        .unwrap_or_else(|e| panic!("snapshot: {e}"));
    let (_, v) = exec(&server, hello.clone());
    assert_eq!(source(&v), "snapshot", "{v}");

    // 1. Damaged while the server uses it (one byte flipped in place): the next restore sees
    //    the change, the request boots cold; the snapshot is verified again, refused and made anew.
    let snap = snapshot_dirs(dir.path()).pop().expect("a snapshot");
    let state = snap.join("state");
    flip_byte(&state, 4096 * 100);
    let (st, v) = exec(&server, hello.clone());
    assert_eq!((st, v["stdout"].as_str()), (200, Some("hello\n")), "{v}");
    assert_eq!(source(&v), "cold", "{v}");
    let (_, v) = exec(&server, hello.clone());
    assert_eq!(v["stdout"], "hello\n", "{v}");
    assert_eq!(source(&v), "cold", "the damaged snapshot is refused: {v}");
    assert_eq!(metric(&server, "refused"), 1);
    assert!(
        wait_ready(&server, 1, Duration::from_secs(120)),
        "a new snapshot is made"
    );
    let (_, v) = exec(&server, hello.clone());
    assert_eq!(source(&v), "snapshot", "{v}");
    let status = server.stop(Duration::from_secs(30));
    assert!(matches!(&status, Ok(s) if s.success()), "{status:?}");

    // 2. Truncated, and 3. made for another VM shape (meta.json edited), found by a starting
    //    server: refused when loaded, the request boots cold, a new snapshot replaces it.
    type Damage = (&'static str, fn(&Path));
    let damages: [Damage; 2] = [
        ("truncated", |snap| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(snap.join("state"))
                .expect("open");
            let len = f.metadata().expect("meta").len();
            f.set_len(len / 2).expect("truncate");
        }),
        ("mismatched", |snap| {
            let p = snap.join("meta.json");
            let m = std::fs::read_to_string(&p).expect("meta");
            assert!(m.contains("\"memory_mib\": 256"), "{m}");
            std::fs::write(&p, m.replace("\"memory_mib\": 256", "\"memory_mib\": 1024"))
                .expect("write");
        }),
    ];
    for (what, damage) in damages {
        let snap = snapshot_dirs(dir.path()).pop().expect("a snapshot");
        damage(&snap);
        let server = Server::start(&["--hypervisor", "qemu", "--lazy"], Some(&cfg), FIRST_START)
            .unwrap_or_else(|e| panic!("snapshot: {e}"));
        let (st, v) = exec(&server, hello.clone());
        assert_eq!(
            (st, v["stdout"].as_str()),
            (200, Some("hello\n")),
            "{what}: {v}"
        );
        assert_eq!(source(&v), "cold", "{what}: {v}");
        assert_eq!(metric(&server, "refused"), 1, "{what}");
        assert!(
            wait_ready(&server, 1, Duration::from_secs(120)),
            "{what}: a new snapshot is made"
        );
        let (_, v) = exec(&server, hello.clone());
        assert_eq!(source(&v), "snapshot", "{what}: {v}");
        let status = server.stop(Duration::from_secs(30));
        assert!(matches!(&status, Ok(s) if s.success()), "{status:?}");
        assert_eq!(
            snapshot_dirs(dir.path()).len(),
            1,
            "{what}: the refused one is gone"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".staging-"))
        .collect();
    assert!(leftovers.is_empty(), "staging left: {leftovers:?}");
}

#[test]
fn snapshots_can_be_turned_off() {
    let dir = tempfile::tempdir().expect("snapshot dir");
    let cfg = format!(
        "{}enabled = false\n",
        config(dir.path()).replace("enabled = true\n", "")
    );
    let server = Server::start(&["--hypervisor", "qemu"], Some(&cfg), FIRST_START)
        .unwrap_or_else(|e| panic!("snapshot: {e}"));
    let h = server.get("/healthz").json();
    assert_eq!(h["snapshots"], false, "{h}");
    assert!(
        h["snapshots_detail"]
            .as_str()
            .unwrap_or("")
            .contains("enabled = false"),
        "{h}"
    );
    let (_, v) = exec(&server, json!({"language": "python", "code": "print(2)"}));
    assert_eq!(v["stdout"], "2\n", "{v}");
    assert_eq!(source(&v), "cold", "{v}");
    assert!(snapshot_dirs(dir.path()).is_empty());
}

/// Inverts one byte of `path` in place (as root, through the read-only mode).
fn flip_byte(path: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.read_exact(&mut b).expect("read");
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.write_all(&[!b[0]]).expect("write");
}
