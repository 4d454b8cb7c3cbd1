//! The Judge0-compatible routes through `tower::ServiceExt::oneshot`, on a real SQLite store in
//! a temp directory. No VM boots: the queue is not worked on (no dispatcher), and the one
//! `wait=true` run fails to find its image (an Internal Error, as Judge0 reports a box error).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use cloude_image::catalog::Catalog;
use cloude_image::progress::Progress;
use cloude_server::api::{router, AppState};
use cloude_server::artifacts::Artifacts;
use cloude_server::config::Config;
use cloude_server::executor::{ExecSettings, Executor, ExecutorParts};
use cloude_server::judge0::Judge0;
use cloude_server::limiter::Limiter;
use cloude_server::metrics::Metrics;
use cloude_server::store::Store;
use cloude_server::vm::{Driver, Kind, Runtime};
use serde_json::{json, Value};
use tower::ServiceExt;

struct T {
    state: Arc<AppState>,
    _dir: tempfile::TempDir,
}

async fn setup(extra_config: &str) -> T {
    setup_with(extra_config, true).await
}

async fn setup_with(extra_config: &str, judge0_on: bool) -> T {
    let dir = tempfile::tempdir().expect("tmp");
    // An empty artifact cache: nothing may boot.
    std::env::set_var("CLOUDE_HOME", dir.path());
    let config = Config::parse(&format!(
        "[store]\nurl = \"sqlite:{}\"\n{extra_config}",
        dir.path().join("j0.sqlite3").display()
    ))
    .expect("config");
    let metrics = Arc::new(Metrics::default());
    let l = &config.limits;
    let executor = Arc::new(Executor::new(ExecutorParts {
        driver: Driver {
            kind: Kind::Qemu { kvm: false },
            binary: "/nonexistent/qemu".into(),
            jail: None,
            console_bytes: cloude_server::vm::console::DEFAULT_CONSOLE_BYTES,
        },
        runtime: Runtime::new().expect("runtime dir"),
        artifacts: Arc::new(Artifacts::new(
            Progress::new(true),
            false,
            cloude_server::config::FormatChoice::Initramfs,
        )),
        limiter: Limiter::new(l.max_concurrent_vms, l.max_queue, Duration::from_millis(50)),
        metrics: metrics.clone(),
        settings: ExecSettings {
            vcpus: 1,
            boot_timeout: Duration::from_secs(1),
            output_limit_bytes: 1024,
        },
        pool: cloude_server::pool::Pool::off(),
        snapshots: cloude_server::snapshots::Snapshots::off(),
    }));
    let store = Store::open(&config.store).await.expect("store");
    let j0 = Arc::new(Judge0::new(
        config.judge0.clone(),
        config.store.clone(),
        store,
    ));
    let state = Arc::new(AppState {
        config,
        catalog: Catalog::load_resolved(None).expect("the catalogue, versions from apt"),
        executor,
        metrics,
        hypervisor: "qemu".into(),
        hypervisor_reason: "test".into(),
        judge0: judge0_on.then_some(j0),
        sandboxes: None,
    });
    T { state, _dir: dir }
}

async fn call(
    t: &T,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (StatusCode, Vec<u8>) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(body.map(Body::from).unwrap_or_else(Body::empty))
        .expect("request");
    let resp = router(t.state.clone())
        .oneshot(req)
        .await
        .expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, bytes.to_vec())
}

async fn get(t: &T, uri: &str) -> (StatusCode, Value) {
    let (s, b) = call(t, "GET", uri, &[], None).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

async fn post(t: &T, uri: &str, v: Value) -> (StatusCode, Value) {
    let (s, b) = call(t, "POST", uri, &[], Some(v.to_string().into_bytes())).await;
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|_| panic!("JSON, got {:?}", String::from_utf8_lossy(&b)));
    (s, v)
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn information_routes() {
    let t = setup("").await;
    for path in ["/about", "/about/"] {
        let (s, v) = get(&t, path).await;
        assert_eq!(
            (s, v["version"].as_str()),
            (StatusCode::OK, Some("1.13.1")),
            "{path}"
        );
    }
    let (s, v) = get(&t, "/config_info").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["max_submission_batch_size"], 20);
    assert_eq!(v["enable_network"], false);
    assert_eq!(v["allow_enable_network"], false);
    assert_eq!(v["max_queue_size"], 100);
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(39),
        "all of Judge0's keys"
    );
    let (s, v) = get(&t, "/languages").await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<u64> = v
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|l| l["id"].as_u64())
        .collect();
    for id in [71, 63, 50, 48, 49, 54, 52, 53, 46] {
        assert!(ids.contains(&id), "language {id} in {v}");
    }
    let (s, v) = get(&t, "/languages/71/").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["name"], "Python (3.11.2)");
    assert_eq!(v["source_file"], "main.py");
    assert_eq!(v["is_archived"], false);
    let (_, v) = get(&t, "/languages/54").await;
    assert_eq!(v["name"], "C++ (GCC 12.2.0)");
    assert!(v["compile_cmd"]
        .as_str()
        .is_some_and(|c| c.starts_with("g++")));
    let (s, _) = get(&t, "/languages/9999").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = get(&t, "/statuses").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().map(Vec::len), Some(14));
    assert_eq!(v[2], json!({"id": 3, "description": "Accepted"}));
}

/// With `[judge0] enabled = false` (no store), its routes are not there.
#[tokio::test]
async fn disabled_means_not_found() {
    let t = setup_with("", false).await;
    for path in ["/about", "/languages", "/submissions/batch?tokens=x"] {
        let (s, _) = get(&t, path).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
    let (s, _) = post(
        &t,
        "/submissions",
        json!({"source_code": "x", "language_id": 71}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn api_key_when_configured() {
    let t = setup("[judge0]\nauth_tokens = [\"k1\", \"k2\"]\n").await;
    let (s, b) = call(&t, "GET", "/about", &[], None).await;
    assert_eq!((s, b.len()), (StatusCode::UNAUTHORIZED, 0));
    let (s, _) = call(&t, "GET", "/about", &[("X-Auth-Token", "nope")], None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call(&t, "GET", "/about", &[("X-Auth-Token", "k2")], None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&t, "GET", "/statuses?X-Auth-Token=k1", &[], None).await;
    assert_eq!(s, StatusCode::OK);
    // The other APIs are not behind Judge0's key.
    let (s, _) = call(&t, "GET", "/v1/languages", &[], None).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn submissions_queue_and_show() {
    let t = setup("").await;
    let (s, v) = post(
        &t,
        "/submissions/?base64_encoded=true",
        json!({"source_code": b64(b"print(input())"), "language_id": 71, "stdin": b64(b"hi"),
               "expected_output": b64(b"hi")}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let token = v["token"].as_str().expect("token").to_string();
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(1),
        "only the token: {v}"
    );
    let (s, v) = get(&t, &format!("/submissions/{token}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], json!({"id": 1, "description": "In Queue"}));
    assert_eq!(v["token"], token.as_str());
    assert!(v["stdout"].is_null() && v["time"].is_null());
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(8),
        "the default fields"
    );
    let (_, v) = get(
        &t,
        &format!(
            "/submissions/{token}?fields=stdin,language_id,cpu_time_limit,created_at,language"
        ),
    )
    .await;
    assert_eq!(v["stdin"], "hi");
    assert_eq!(v["language_id"], 71);
    assert_eq!(v["cpu_time_limit"], "5.0");
    assert_eq!(v["language"]["name"], "Python (3.11.2)");
    assert!(v["created_at"].as_str().is_some_and(|c| c.ends_with('Z')));
    let (_, v) = get(
        &t,
        &format!("/submissions/{token}?fields=stdin&base64_encoded=true"),
    )
    .await;
    assert_eq!(v["stdin"], "aGk=\n");
    let (_, v) = get(&t, &format!("/submissions/{token}?fields=*")).await;
    assert_eq!(v.as_object().map(|o| o.len()), Some(35));
    let (s, v) = get(&t, &format!("/submissions/{token}?fields=stdout,nope")).await;
    assert_eq!(
        (s, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid fields: [nope]"})
        )
    );
    let (s, _) = get(&t, "/submissions/00000000-0000-4000-8000-000000000000").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = get(&t, "/submissions/..%2F..%2Fetc").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = call(&t, "DELETE", &format!("/submissions/{token}"), &[], None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&b).contains("delete not allowed"));
}

#[tokio::test]
async fn validation_in_judge0_shape() {
    let t = setup("").await;
    let (s, v) = post(&t, "/submissions", json!({"language_id": 71})).await;
    assert_eq!(
        (s, v),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"source_code": ["can't be blank"]})
        )
    );
    let (s, v) = post(
        &t,
        "/submissions",
        json!({"source_code": "x", "language_id": 71, "cpu_time_limit": 100, "enable_network": true}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        v["cpu_time_limit"],
        json!(["must be less than or equal to 15.0"])
    );
    assert_eq!(
        v["enable_network"],
        json!(["enabling network is not allowed"])
    );
    let (s, b) = call(&t, "POST", "/submissions", &[], Some(b"{oops".to_vec())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&b).contains("\"error\""));
    // Over the body cap: 413 in Judge0's error shape.
    let big = vec![b' '; 16 * 1024 * 1024 + 10];
    let (s, b) = call(&t, "POST", "/submissions", &[], Some(big)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&b).contains("\"error\""));
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (n, d) in entries {
        w.start_file(*n, opts).expect("start");
        w.write_all(d).expect("write");
    }
    w.finish().expect("finish").into_inner()
}

#[tokio::test]
async fn additional_files_are_checked() {
    let t = setup("").await;
    let ok = zip_of(&[("data/input.txt", b"42")]);
    let (s, _) = post(
        &t,
        "/submissions",
        json!({"source_code": "x", "language_id": 71, "additional_files": b64(&ok)}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    for (zip, want) in [
        (zip_of(&[("../escape", b"x")]), "unsafe path"),
        (zip_of(&[("z", &vec![0u8; 1 << 20])]), "zip bomb"),
        (b"not a zip".to_vec(), "not a valid zip"),
    ] {
        let (s, v) = post(
            &t,
            "/submissions",
            json!({"source_code": "x", "language_id": 71, "additional_files": b64(&zip)}),
        )
        .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(
            v["additional_files"][0]
                .as_str()
                .is_some_and(|m| m.contains(want)),
            "{v}"
        );
    }
    let names: Vec<String> = (0..33).map(|i| format!("f{i}")).collect();
    let many: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    let (s, v) = post(
        &t,
        "/submissions",
        json!({"source_code": "x", "language_id": 71, "additional_files": b64(&zip_of(&many))}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(v.to_string().contains("too many files"), "{v}");
}

#[tokio::test]
async fn batches() {
    let t = setup("[judge0]\nmax_submission_batch_size = 3\nmax_queue_size = 4\n").await;
    let (s, v) = post(
        &t,
        "/submissions/batch",
        json!({"submissions": [
            {"source_code": "print(1)", "language_id": 71},
            {"source_code": "x", "language_id": 12345},
        ]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let token = v[0]["token"].as_str().expect("token").to_string();
    assert_eq!(
        v[1],
        json!({"language_id": ["language with id 12345 doesn't exist"]})
    );
    let (s, v) = post(
        &t,
        "/submissions/batch",
        json!({"submissions": [{"language_id": 71}]}),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::UNPROCESSABLE_ENTITY,
        "no valid submission: {v}"
    );
    let four: Vec<Value> = (0..4)
        .map(|_| json!({"source_code": "x", "language_id": 46}))
        .collect();
    let (s, v) = post(&t, "/submissions/batch", json!({ "submissions": four })).await;
    assert_eq!(
        (s, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"error": "number of submissions in a batch should be less than or equal to 3"})
        )
    );
    let (s, _) = post(&t, "/submissions/batch", json!({"submissions": []})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let unknown = "00000000-0000-4000-8000-000000000000";
    let (s, v) = get(
        &t,
        &format!("/submissions/batch?tokens={token},{unknown}&fields=token,status_id"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v,
        json!({"submissions": [{"token": token, "status_id": 1}, null]})
    );
    let (s, _) = get(&t, &format!("/submissions/batch?tokens={token},a,b,c")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Queue: 1 queued + 3 more = 4 (the cap); one more is refused with 503.
    let three: Vec<Value> = (0..3)
        .map(|_| json!({"source_code": "x", "language_id": 46}))
        .collect();
    let (s, _) = post(&t, "/submissions/batch", json!({ "submissions": three })).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = post(
        &t,
        "/submissions",
        json!({"source_code": "x", "language_id": 46}),
    )
    .await;
    assert_eq!(
        (s, v),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "queue is full"})
        )
    );
}

/// `wait=true` goes through the executor; with no image available it ends as Internal Error
/// and is stored like any other submission.
#[tokio::test]
async fn wait_true_records_the_result() {
    let t = setup("").await;
    let (s, v) = post(
        &t,
        "/submissions?wait=true&fields=token,status,message,finished_at",
        json!({"source_code": "print(1)", "language_id": 71}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["status"]["id"], 13, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(v["finished_at"].is_string());
    let token = v["token"].as_str().expect("token");
    let (_, again) = get(&t, &format!("/submissions/{token}?fields=status_id")).await;
    assert_eq!(again, json!({"status_id": 13}));
    let t = setup("[judge0]\nenable_wait_result = false\n").await;
    let (s, v) = post(
        &t,
        "/submissions?wait=true",
        json!({"source_code": "print(1)", "language_id": 71}),
    )
    .await;
    assert_eq!(
        (s, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"error": "wait not allowed"})
        )
    );
}
