//! Sandboxes end to end on the QEMU fallback: real jailed VMs kept across calls.
//! State (files, the working directory, a background process) survives between calls; files go
//! in and out; deleting or timing out leaves no VM process; every cap answers with its code.

use cloude_testkit as support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::Server;

/// Kernel build plus the python image when nothing is cached yet.
const FIRST_START: Duration = Duration::from_secs(3600);

fn server(extra: &str) -> Server {
    let config =
        format!("[vm]\nprebuild = [\"python\"]\n[limits]\nmax_concurrent_vms = 4\n{extra}");
    Server::start(&["--hypervisor", "qemu"], Some(&config), FIRST_START)
        .unwrap_or_else(|e| panic!("sandboxes: {e}"))
}

fn create(s: &Server, body: Value) -> (u16, Value) {
    let r = s.post("/v1/sandboxes", &body);
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

fn exec(s: &Server, id: &str, body: Value) -> Value {
    let r = s.post(&format!("/v1/sandboxes/{id}/exec"), &body);
    assert_eq!(r.status, 200, "exec {body}: {}", r.text());
    r.json()
}

fn raw(s: &Server, method: &str, path: &str, body: Option<Vec<u8>>) -> support::Response {
    support::http(s.addr, method, path, body)
}

/// Processes in the jails of this server (children of its jailers).
fn vm_processes(s: &Server) -> usize {
    s.children().len()
}

#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn a_sandbox_keeps_its_state_across_calls() {
    let s = server("");
    let t = Instant::now();
    let (st, sb) = create(
        &s,
        json!({"template": "python", "timeout_s": 120, "metadata": {"owner": "test"}, "env": {"GREETING": "hello"}}),
    );
    assert_eq!(st, 201, "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    eprintln!("sandbox {id} created in {:?}", t.elapsed());
    assert_eq!(sb["state"], "running");
    assert_eq!(sb["template"], "python");
    assert_eq!(sb["metadata"]["owner"], "test");
    assert!(
        sb["expires_at"].as_str().is_some_and(|e| e.ends_with('Z')),
        "{sb}"
    );

    // Files and the working directory persist; the env given at creation applies.
    let v = exec(
        &s,
        &id,
        json!({"cmd": "pwd; whoami; echo $GREETING > greeting.txt; x=41; echo $((x+1)) > answer"}),
    );
    assert_eq!(v["stdout"], "/home/user\nuser\n", "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");
    let v = exec(&s, &id, json!({"cmd": "cat greeting.txt answer"}));
    assert_eq!(v["stdout"], "hello\n42\n", "{v}");
    // A background process lives on after the call that started it.
    let v = exec(
        &s,
        &id,
        json!({"cmd": "nohup sleep 300 >/dev/null 2>&1 & echo $!"}),
    );
    let pid = v["stdout"].as_str().expect("pid").trim().to_string();
    assert!(pid.parse::<u32>().is_ok(), "{v}");
    let t = Instant::now();
    let v = exec(&s, &id, json!({"argv": ["kill", "-0", pid]}));
    assert_eq!(v["exit_code"], 0, "the background process is alive: {v}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // stdin, root, a non-zero exit, a timeout.
    let v = exec(
        &s,
        &id,
        json!({"argv": ["python3", "-c", "import sys; print(sys.stdin.read().upper()); sys.exit(4)"], "stdin": "abc"}),
    );
    assert_eq!(
        (v["stdout"].as_str(), v["exit_code"].as_i64()),
        (Some("ABC\n"), Some(4)),
        "{v}"
    );
    let v = exec(&s, &id, json!({"cmd": "id -u", "user": "root"}));
    assert_eq!(v["stdout"], "0\n", "{v}");
    let v = exec(&s, &id, json!({"cmd": "sleep 30", "timeout_ms": 1000}));
    assert_eq!(v["status"], "timeout", "{v}");
    // The sandbox is still there after a timed-out command.
    let v = exec(&s, &id, json!({"cmd": "cat answer"}));
    assert_eq!(v["stdout"], "42\n", "{v}");

    // Files in and out, binary-safe; a directory lists; delete.
    let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let path = format!("/v1/sandboxes/{id}/files?path=/home/user/dir/sub/blob.bin");
    let r = raw(&s, "PUT", &path, Some(data.clone()));
    assert_eq!(r.status, 204, "{}", r.text());
    let r = raw(&s, "GET", &path, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, data, "the file comes back byte for byte");
    let v = exec(&s, &id, json!({"cmd": "stat -c '%U %s' dir/sub/blob.bin"}));
    assert_eq!(v["stdout"], "user 100000\n", "{v}");
    let r = raw(
        &s,
        "GET",
        &format!("/v1/sandboxes/{id}/files?path=/home/user/dir/sub"),
        None,
    );
    let listing = r.json();
    assert_eq!(listing["entries"][0]["name"], "blob.bin", "{listing}");
    assert_eq!(listing["entries"][0]["size"], 100_000, "{listing}");
    let r = raw(&s, "DELETE", &path, None);
    assert_eq!(r.status, 204);
    let r = raw(&s, "GET", &path, None);
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("no such file"), "{}", r.text());

    // Listed, then deleted: its VM is gone.
    let l = s.get("/v1/sandboxes").json();
    assert!(
        l["sandboxes"]
            .as_array()
            .expect("list")
            .iter()
            .any(|x| x["id"] == id.as_str()),
        "{l}"
    );
    let before = vm_processes(&s);
    assert!(before >= 1, "the sandbox's jailer is a child of the server");
    let r = raw(&s, "DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(r.status, 204);
    let t = Instant::now();
    while vm_processes(&s) >= before && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        vm_processes(&s) < before,
        "the deleted sandbox's VM is gone"
    );
    let r = raw(&s, "GET", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(r.status, 404);
}

#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn sandboxes_time_out_and_every_cap_answers() {
    let s = server("[sandboxes]\nmax_running = 1\nmax_file_bytes = 1000\nmax_timeout_s = 600\n");
    // Bad requests never start a VM.
    for (body, status, word) in [
        (json!({"template": "cobra"}), 422, "template"),
        (json!({"timeout_s": 0}), 422, "timeout_s"),
        (json!({"timeout_s": 601}), 422, "timeout_s"),
        (json!({"nope": 1}), 400, "nope"),
    ] {
        let (st, v) = create(&s, body.clone());
        assert_eq!(st, status, "{body}: {v}");
        assert!(v.to_string().contains(word), "{body}: {v}");
    }
    assert_eq!(
        raw(
            &s,
            "GET",
            "/v1/sandboxes/sbx_000000000000000000000000",
            None
        )
        .status,
        404
    );
    assert_eq!(raw(&s, "GET", "/v1/sandboxes/../etc", None).status, 404);

    let (st, sb) = create(&s, json!({"timeout_s": 3}));
    assert_eq!(st, 201, "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    // One running at most.
    let r = s.post("/v1/sandboxes", &json!({}));
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("max_running"), "{}", r.text());
    assert!(r.header("retry-after").is_some());
    // File caps.
    let r = raw(
        &s,
        "PUT",
        &format!("/v1/sandboxes/{id}/files?path=/tmp/big"),
        Some(vec![b'x'; 1001]),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    let r = raw(
        &s,
        "PUT",
        &format!("/v1/sandboxes/{id}/files?path=relative"),
        Some(vec![b'x']),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    let v = exec(&s, &id, json!({"cmd": "head -c 5000 /dev/zero > /tmp/big"}));
    assert_eq!(v["exit_code"], 0, "{v}");
    let r = raw(
        &s,
        "GET",
        &format!("/v1/sandboxes/{id}/files?path=/tmp/big"),
        None,
    );
    assert_eq!(r.status, 413, "reading a file over the cap: {}", r.text());
    // Exec caps.
    let r = s.post(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"cmd": "true", "argv": ["true"]}),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    let r = s.post(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"cmd": "true", "timeout_ms": 99_999_999}),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    // Idle for its timeout: killed, its VM gone, and a new one may start.
    let t = Instant::now();
    loop {
        let r = raw(&s, "GET", &format!("/v1/sandboxes/{id}"), None);
        if r.status == 404 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "not timed out: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let t = Instant::now();
    while vm_processes(&s) > 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(vm_processes(&s), 0, "the timed-out sandbox's VM is gone");
    let (st, v) = create(&s, json!({}));
    assert_eq!(st, 201, "a slot is free again: {v}");
}

/// `cloude sandbox`: create, exec (its output and exit code become the CLI's), put, get, ls, rm.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn the_cli_drives_a_sandbox() {
    use std::process::Command;
    let s = server("");
    let cloude = support::sibling_bin("cloude").expect("cloude binary");
    let run = |args: &[&str]| {
        let out = Command::new(&cloude)
            .arg("--server")
            .arg(&s.url)
            .arg("sandbox")
            .args(args)
            .output()
            .expect("cloude");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, id, err) = run(&["create", "--template", "python", "--timeout-s", "120"]);
    assert_eq!(code, Some(0), "{err}");
    let id = id.trim().to_string();
    assert!(id.starts_with("sbx_"), "{id}");
    let dir = tempfile::tempdir().expect("tmp");
    let local = dir.path().join("in.txt");
    std::fs::write(&local, "from the host\n").expect("write");
    let (code, _, err) = run(&[
        "put",
        &id,
        local.to_str().expect("path"),
        "/home/user/d/in.txt",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = run(&["exec", &id, "-c", "cat d/in.txt; echo oops >&2; exit 4"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (Some(4), "from the host\n", "oops\n")
    );
    let (code, out, _) = run(&["exec", &id, "--", "python3", "-c", "print(6*7)"]);
    assert_eq!((code, out.as_str()), (Some(0), "42\n"));
    let (code, out, _) = run(&["get", &id, "/home/user/d/in.txt"]);
    assert_eq!((code, out.as_str()), (Some(0), "from the host\n"));
    let (_, out, _) = run(&["ls"]);
    assert!(out.contains(&id), "{out}");
    let (code, out, err) = run(&["pause", &id]);
    assert_eq!(
        (code, out.trim()),
        (Some(0), format!("{id} paused").as_str()),
        "{err}"
    );
    let (code, _, err) = run(&["exec", &id, "-c", "true"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("paused"), "{err}");
    let (code, out, err) = run(&["resume", &id]);
    assert_eq!(
        (code, out.trim()),
        (Some(0), format!("{id} running").as_str()),
        "{err}"
    );
    let (code, out, _) = run(&["get", &id, "/home/user/d/in.txt"]);
    assert_eq!((code, out.as_str()), (Some(0), "from the host\n"));
    let (code, _, err) = run(&["rm", &id]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = run(&["exec", &id, "-c", "true"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("404") || err.contains("no sandbox"), "{err}");
}

/// One request with an optional API key, over a plain socket: (status, body).
fn keyed(s: &Server, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut c = std::net::TcpStream::connect(s.addr).expect("connect");
    let key = key.map_or(String::new(), |k| format!("x-api-key: {k}\r\n"));
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n{key}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn processes_outlive_calls_stream_and_take_input() {
    let s = server("");
    let (st, sb) = create(&s, json!({"timeout_s": 120}));
    assert_eq!(st, 201, "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();

    // Output is read while the process runs, from an offset, and the exit comes last.
    let r = s.post(
        &format!("/v1/sandboxes/{id}/procs"),
        &json!({"cmd": "for i in 1 2 3; do echo line $i; sleep 0.5; done; exit 4", "tag": "ticker"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let pid = r.json()["pid"].as_u64().expect("pid");
    let mut text = String::new();
    let mut since = 0;
    let mut saw_running_output = false;
    let exit = loop {
        let r = raw(
            &s,
            "GET",
            &format!("/v1/sandboxes/{id}/procs/{pid}/output?since={since}&wait_ms=2000"),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        for c in v["chunks"].as_array().expect("chunks") {
            text.push_str(c["text"].as_str().expect("text"));
        }
        since = v["next"].as_u64().expect("next");
        if v["exit"].is_null() && text.contains("line 1") {
            saw_running_output = true;
        }
        if !v["exit"].is_null() {
            break v["exit"].clone();
        }
    };
    assert!(saw_running_output, "output came before the exit");
    assert_eq!(text, "line 1\nline 2\nline 3\n");
    assert_eq!(exit["exit_code"], 4, "{exit}");

    // Standard input, sent later, then closed.
    let r = s.post(
        &format!("/v1/sandboxes/{id}/procs"),
        &json!({"argv": ["sh", "-c", "read a; echo got $a; cat"], "stdin": true}),
    );
    let cat = r.json()["pid"].as_u64().expect("pid");
    let input = |body: Value| {
        let r = s.post(&format!("/v1/sandboxes/{id}/procs/{cat}/input"), &body);
        assert_eq!(r.status, 204, "{body}: {}", r.text());
    };
    input(json!({"type": "stdin", "data": "one\n"}));
    input(json!({"type": "stdin", "data_base64": "dHdvCg=="}));
    input(json!({"type": "close_stdin"}));
    let r = raw(
        &s,
        "GET",
        &format!("/v1/sandboxes/{id}/procs/{cat}/output?since=0&wait_ms=3000"),
        None,
    );
    let mut v = r.json();
    for _ in 0..20 {
        if !v["exit"].is_null() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        v = raw(
            &s,
            "GET",
            &format!("/v1/sandboxes/{id}/procs/{cat}/output?since=0"),
            None,
        )
        .json();
    }
    let all: String = v["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .map(|c| c["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(all, "got one\ntwo\n", "{v}");
    assert_eq!(v["exit"]["exit_code"], 0, "{v}");

    // A background process lives across calls, is listed, and a signal or delete ends it.
    let r = s.post(
        &format!("/v1/sandboxes/{id}/procs"),
        &json!({"cmd": "sleep 300", "tag": "sleeper"}),
    );
    let sleeper = r.json()["pid"].as_u64().expect("pid");
    let ps = exec(&s, &id, json!({"cmd": "ps -eo args"}));
    assert!(
        ps["stdout"].as_str().unwrap_or("").contains("sleep 300"),
        "{ps}"
    );
    let list = raw(&s, "GET", &format!("/v1/sandboxes/{id}/procs"), None).json();
    assert!(
        list["procs"]
            .as_array()
            .expect("procs")
            .iter()
            .any(|p| p["pid"] == sleeper && p["running"] == true && p["tag"] == "sleeper"),
        "{list}"
    );
    let r = s.post(
        &format!("/v1/sandboxes/{id}/procs/{sleeper}/input"),
        &json!({"type": "signal", "signal": "SIGTERM"}),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let v = raw(
        &s,
        "GET",
        &format!("/v1/sandboxes/{id}/procs/{sleeper}/output?wait_ms=3000"),
        None,
    )
    .json();
    assert_eq!(v["exit"]["signal"], "SIGTERM", "{v}");
    let r = raw(
        &s,
        "DELETE",
        &format!("/v1/sandboxes/{id}/procs/{sleeper}"),
        None,
    );
    assert_eq!(r.status, 204);
    let r = raw(
        &s,
        "DELETE",
        &format!("/v1/sandboxes/{id}/procs/{sleeper}"),
        None,
    );
    assert_eq!(r.status, 404, "a forgotten process is not found");
    let r = s.post(
        &format!("/v1/sandboxes/{id}/procs"),
        &json!({"cmd": "true", "timeout_ms": 100_000_000_000u64}),
    );
    assert_eq!(r.status, 422, "a timeout past the cap: {}", r.text());

    // exec/stream: NDJSON lines as the command prints.
    let r = s.post(
        &format!("/v1/sandboxes/{id}/exec/stream"),
        &json!({"cmd": "echo a; echo b >&2; exit 2"}),
    );
    assert_eq!(r.status, 200);
    let lines: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines[0]["type"], "started", "{lines:?}");
    let out: String = lines
        .iter()
        .filter(|l| l["type"] == "output")
        .map(|l| {
            format!(
                "{}:{}",
                l["stream"].as_str().unwrap_or(""),
                l["text"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert!(
        out.contains("stdout:a\n") && out.contains("stderr:b\n"),
        "{out}"
    );
    let last = lines.last().expect("lines");
    assert_eq!(
        (last["type"].as_str(), last["exit_code"].as_i64()),
        (Some("exit"), Some(2)),
        "{last}"
    );

    // A client that leaves a stream takes its command with it.
    {
        use std::io::{BufRead as _, Write as _};
        let mut c = std::net::TcpStream::connect(s.addr).expect("connect");
        let body = r#"{"cmd": "echo go; sleep 77"}"#;
        write!(
            c,
            "POST /v1/sandboxes/{id}/exec/stream HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut rd = std::io::BufReader::new(c.try_clone().expect("clone"));
        let mut line = String::new();
        while !line.contains("go") {
            line.clear();
            assert!(
                rd.read_line(&mut line).expect("read") > 0,
                "the stream ended early"
            );
        }
    }
    let t = Instant::now();
    loop {
        let ps = exec(&s, &id, json!({"cmd": "ps -eo args"}));
        if !ps["stdout"].as_str().unwrap_or("").contains("sleep 77") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the command outlived its client: {ps}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A client that leaves in the middle of a plain exec does not take the sandbox (its one
    // agent connection) down: the next call is served.
    {
        use std::io::Write as _;
        let mut c = std::net::TcpStream::connect(s.addr).expect("connect");
        let body = r#"{"cmd": "sleep 2; echo late > /tmp/late.txt"}"#;
        write!(
            c,
            "POST /v1/sandboxes/{id}/exec HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = exec(&s, &id, json!({"cmd": "cat /tmp/late.txt"}));
    assert_eq!(
        after["stdout"], "late\n",
        "the dropped exec ran to its end: {after}"
    );
    let r = raw(&s, "DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(r.status, 204);
    let t = Instant::now();
    while vm_processes(&s) > 0 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(vm_processes(&s), 0, "no VM left");
}

#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn api_keys_keep_tenants_apart() {
    let s = server("[auth]\nkeys = [\"key-one-aaaaaaaa\", \"key-two-bbbbbbbb\"]\n");
    let (st, body) = keyed(&s, "GET", "/v1/sandboxes", None, "");
    assert_eq!(st, 401, "no key: {body}");
    let (st, body) = keyed(&s, "GET", "/v1/sandboxes", Some("wrong"), "");
    assert_eq!(st, 401, "a wrong key: {body}");
    let (st, body) = keyed(&s, "POST", "/v1/sandboxes", Some("key-one-aaaaaaaa"), "{}");
    assert_eq!(st, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (_, mine) = keyed(&s, "GET", "/v1/sandboxes", Some("key-one-aaaaaaaa"), "");
    assert!(mine.contains(&id), "its own key lists it: {mine}");
    let (_, theirs) = keyed(&s, "GET", "/v1/sandboxes", Some("key-two-bbbbbbbb"), "");
    assert!(!theirs.contains(&id), "another key does not: {theirs}");
    for (method, path, body) in [
        ("GET", format!("/v1/sandboxes/{id}"), ""),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            r#"{"cmd": "true"}"#,
        ),
        (
            "GET",
            format!("/v1/sandboxes/{id}/files?path=/home/user"),
            "",
        ),
        ("GET", format!("/v1/sandboxes/{id}/procs"), ""),
        ("DELETE", format!("/v1/sandboxes/{id}"), ""),
    ] {
        let (st, b) = keyed(&s, method, &path, Some("key-two-bbbbbbbb"), body);
        assert_eq!(st, 404, "{method} {path} with another key: {b}");
    }
    let (st, b) = keyed(
        &s,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some("key-one-aaaaaaaa"),
        r#"{"cmd": "echo mine"}"#,
    );
    assert_eq!(st, 200, "{b}");
    assert!(b.contains("mine"), "{b}");
    let (st, _) = keyed(
        &s,
        "DELETE",
        &format!("/v1/sandboxes/{id}"),
        Some("key-one-aaaaaaaa"),
        "",
    );
    assert_eq!(st, 204);
}

/// `cloude sandbox shell` on a real terminal (`script` gives it one): an interactive bash on a
/// terminal in the sandbox, its files there, what it writes kept for later calls, its exit code
/// ours, and no shell left behind.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn the_cli_opens_a_shell_in_a_sandbox() {
    use std::io::{Read as _, Write as _};
    use std::process::{Command, Stdio};
    let s = server("");
    let (st, sb) = create(&s, json!({"timeout_s": 120}));
    assert_eq!(st, 201, "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    exec(&s, &id, json!({"cmd": "echo kept-$((2+3)) > notes.txt"}));
    let cloude = support::sibling_bin("cloude").expect("cloude binary");
    let cmd = format!("{} --server {} sandbox shell {id}", cloude.display(), s.url);
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("script (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stdout.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    });
    stdin
        .write_all(b"cat notes.txt; tty; echo from-shell > /tmp/shell.txt\n")
        .expect("type");
    std::thread::sleep(Duration::from_secs(3));
    // Our window changes size: the CLI's terminal is set to 33x101 and it gets SIGWINCH, as a
    // terminal emulator would do; the shell's terminal in the guest follows.
    let cli = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.starts_with(&*cloude.to_string_lossy()) && cmd.contains(&id)
        })
        .expect("the cloude process");
    let pty = std::fs::read_link(format!("/proc/{cli}/fd/0")).expect("its terminal");
    let st = Command::new("stty")
        .arg("-F")
        .arg(&pty)
        .args(["rows", "33", "cols", "101"])
        .status()
        .expect("stty");
    assert!(st.success(), "stty -F {}", pty.display());
    let st = Command::new("kill")
        .args(["-WINCH", &cli.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    std::thread::sleep(Duration::from_secs(1));
    // (A CLI that died on the signal shows in the output and the exit code below.)
    let _ = stdin.write_all(b"stty size\n");
    std::thread::sleep(Duration::from_secs(2));
    let _ = stdin.write_all(b"exit 5\n");
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "cloude sandbox shell did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    let out = reader.join().expect("reader");
    assert!(out.contains("$ "), "a prompt: {out:?}");
    assert!(out.contains("kept-5"), "the sandbox's files: {out:?}");
    assert!(out.contains("/dev/pts/"), "a terminal: {out:?}");
    assert!(
        out.contains("33 101"),
        "the guest's terminal took the new size: {out:?}"
    );
    assert_eq!(status.code(), Some(5), "{out:?}");
    let after = exec(&s, &id, json!({"cmd": "cat /tmp/shell.txt; ps -eo args"}));
    let text = after["stdout"].as_str().unwrap_or("");
    assert!(
        text.starts_with("from-shell\n"),
        "what the shell wrote is kept: {after}"
    );
    assert!(!text.contains("bash -il"), "no shell left behind: {after}");
    let r = raw(&s, "DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(r.status, 204);
}

/// A hypervisor killed mid-call (as its cgroup's OOM killer does) ends the sandbox, and the
/// call's answer says the VM stopped and how, not only that the agent's connection closed; no
/// VM process is left.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn a_sandbox_whose_hypervisor_is_killed_says_so() {
    let s = server("");
    let (st, sb) = create(&s, json!({"template": "python", "timeout_s": 120}));
    assert_eq!(st, 201, "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    let addr = s.addr;
    let path = format!("/v1/sandboxes/{id}/exec");
    let call = std::thread::spawn(move || {
        let body = json!({"cmd": "sleep 30", "timeout_ms": 60000});
        support::http(
            addr,
            "POST",
            &path,
            Some(serde_json::to_vec(&body).expect("json")),
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    let qemu = hypervisors(&s);
    assert_eq!(qemu.len(), 1, "one hypervisor: {:?}", s.children());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(qemu[0]).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the hypervisor");
    let r = call.join().expect("call");
    let text = r.text();
    assert_eq!(r.status, 404, "{text}");
    assert!(
        text.contains("its VM stopped") && text.contains("SIGKILL"),
        "the answer names the VM's end: {text}"
    );
    assert_eq!(s.get(&format!("/v1/sandboxes/{id}")).status, 404);
    let t = Instant::now();
    while vm_processes(&s) > 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(vm_processes(&s), 0, "no VM process is left");
}

/// The hypervisors of this server's VMs: the jailers are the server's children, each
/// hypervisor its jailer's child.
fn hypervisors(s: &Server) -> Vec<u32> {
    s.children()
        .into_iter()
        .flat_map(|j| std::iter::once(j).chain(support::children_of(j)))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.starts_with("qemu-system"))
        })
        .collect()
}

/// State letter and `utime + stime` (ticks) of a process, from `/proc/<pid>/stat`.
fn state_and_cpu(pid: u32) -> (char, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect(")") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f[0].chars().next().unwrap_or('?');
    let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    (state, ticks)
}

/// Pause freezes the VM (its hypervisor stopped, no CPU used, calls refused with 409), resume
/// thaws it with its processes and files; a sandbox paused past `max_paused_s` is killed and
/// leaves no VM process.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn a_paused_sandbox_is_frozen_until_resumed() {
    let s = server("[sandboxes]\nmax_paused_s = 4\n");
    let (st, sb) = create(&s, json!({"template": "python", "timeout_s": 120}));
    assert_eq!(st, 201, "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    let start = s.post(
        &format!("/v1/sandboxes/{id}/procs"),
        &json!({"cmd": "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done"}),
    );
    assert!(
        start.status == 200 || start.status == 201,
        "{}",
        start.text()
    );
    std::thread::sleep(Duration::from_secs(1));
    let r = s.post(&format!("/v1/sandboxes/{id}/pause"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "paused", "{}", r.text());
    assert_eq!(
        s.get(&format!("/v1/sandboxes/{id}")).json()["state"],
        "paused"
    );
    let again = s.post(&format!("/v1/sandboxes/{id}/pause"), &json!({}));
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(s.get("/healthz").json()["sandboxes_paused"], 1);
    let m = s.get("/metrics").text();
    assert!(m.contains("cloude_sandboxes{state=\"paused\"} 1"), "{m}");
    assert!(m.contains("phase=\"sandbox_pause\""), "{m}");
    // The hypervisor is stopped and uses no CPU while paused.
    let hv = hypervisors(&s);
    assert_eq!(hv.len(), 1, "{hv:?}");
    let (state, cpu0) = state_and_cpu(hv[0]);
    assert!(state == 'T' || state == 't', "hypervisor state {state}");
    std::thread::sleep(Duration::from_secs(2));
    let (_, cpu1) = state_and_cpu(hv[0]);
    assert_eq!(cpu1, cpu0, "a frozen hypervisor used CPU");
    let refused = s.post(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"cmd": "cat /tmp/n"}),
    );
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert!(refused.text().contains("paused"), "{}", refused.text());
    let r = s.post(&format!("/v1/sandboxes/{id}/resume"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running", "{}", r.text());
    let n1: u64 = exec(&s, &id, json!({"cmd": "cat /tmp/n"}))["stdout"]
        .as_str()
        .unwrap_or("")
        .trim()
        .parse()
        .expect("a count");
    std::thread::sleep(Duration::from_secs(1));
    let n2: u64 = exec(&s, &id, json!({"cmd": "cat /tmp/n"}))["stdout"]
        .as_str()
        .unwrap_or("")
        .trim()
        .parse()
        .expect("a count");
    assert!(n2 > n1, "the background loop runs again ({n1} -> {n2})");
    // Paused past max_paused_s (4 s): killed, nothing left.
    let r = s.post(&format!("/v1/sandboxes/{id}/pause"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let t = Instant::now();
    while s.get(&format!("/v1/sandboxes/{id}")).status == 200 {
        assert!(t.elapsed() < Duration::from_secs(20), "still there");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());
    let t = Instant::now();
    while vm_processes(&s) > 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(vm_processes(&s), 0, "no VM process is left");
}
