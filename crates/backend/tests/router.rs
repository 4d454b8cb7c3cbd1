//! Router tests through `tower::ServiceExt::oneshot`: validation, errors, Piston shapes, metrics.
//! None of these requests reaches a VM (each is rejected or answered before boot).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use cloude_image::catalog::Catalog;
use cloude_image::progress::Progress;
use cloude_server::api::{router, AppState};
use cloude_server::artifacts::Artifacts;
use cloude_server::config::Config;
use cloude_server::executor::{ExecSettings, Executor, ExecutorParts};
use cloude_server::limiter::Limiter;
use cloude_server::metrics::Metrics;
use cloude_server::vm::{Driver, Kind, Runtime};
use serde_json::{json, Value};
use tower::ServiceExt;

/// An empty artifact cache for this test process: nothing here boots a VM, and a request must
/// not find the machine's cached images (`--no-build` serves those).
/// (A static is never dropped: a fixed directory under cargo's test scratch space, emptied at
/// the start of each run, instead of a temporary directory every run would leave behind.)
fn empty_cache() {
    static HOME: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    HOME.get_or_init(|| {
        let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("router-empty-home");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("test home");
        std::env::set_var("CLOUDE_HOME", &d);
        d
    });
}

fn state_with(config: Config) -> Arc<AppState> {
    empty_cache();
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
    Arc::new(AppState {
        config,
        catalog: Catalog::load_resolved(None).expect("the catalogue, versions from apt"),
        executor,
        metrics,
        hypervisor: "qemu".into(),
        hypervisor_reason: "test".into(),
        judge0: None,
        sandboxes: None,
    })
}

fn state() -> Arc<AppState> {
    state_with(Config::embedded())
}

async fn call(
    state: &Arc<AppState>,
    method: &str,
    uri: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map(Body::from).unwrap_or_else(Body::empty))
        .expect("request");
    let resp = router(state.clone())
        .oneshot(req)
        .await
        .expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, headers, bytes.to_vec())
}

async fn post_json(state: &Arc<AppState>, uri: &str, v: Value) -> (StatusCode, Value) {
    let (s, h, b) = call(
        state,
        "POST",
        uri,
        Some(serde_json::to_vec(&v).expect("json")),
    )
    .await;
    assert!(
        h.contains_key("x-request-id"),
        "every response carries a request id"
    );
    let v: Value = serde_json::from_slice(&b)
        .unwrap_or_else(|_| panic!("JSON body, got {:?}", String::from_utf8_lossy(&b)));
    (s, v)
}

#[tokio::test]
async fn v1_validation_names_the_field() {
    let st = state();
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (json!({"code": "x"}), StatusCode::BAD_REQUEST, "language"),
        (
            json!({"language": 5, "code": "x"}),
            StatusCode::BAD_REQUEST,
            "language",
        ),
        (
            json!({"language": "python", "code": "x", "timeout_ms": -1}),
            StatusCode::BAD_REQUEST,
            "timeout_ms",
        ),
        (
            json!({"language": "python", "code": "x", "timeout_ms": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "timeout_ms",
        ),
        (
            json!({"language": "python", "code": "x", "timeout_ms": 99999999u64}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "timeout_ms",
        ),
        (
            json!({"language": "python", "code": "x", "memory_mib": 1_000_000}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "memory_mib",
        ),
        (
            json!({"language": "no-such-language", "code": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "language",
        ),
        (
            json!({"language": "python", "version": "2.7", "code": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "version",
        ),
        (
            json!({"language": "python"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "code",
        ),
        (
            json!({"language": "python", "code": "x", "files": []}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "files",
        ),
        (
            json!({"language": "python", "files": [{"name": "../x.py", "content": "1"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "files[0].name",
        ),
        (
            json!({"language": "python", "files": [{"name": "/etc/x", "content": "1"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "files[0].name",
        ),
        (
            json!({"language": "python", "files": [{"name": "a.py", "content": "1"}, {"name": "a.py", "content": "2"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "files[1].name",
        ),
        (
            json!({"language": "python", "files": [{"name": "a.py"}]}),
            StatusCode::BAD_REQUEST,
            "files[0].content",
        ),
        (
            json!({"language": "python", "files": [{"name": "a.py", "content": "!!", "encoding": "base64"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "files[0].content",
        ),
        (
            json!({"language": "python", "code": "x", "args": ["a\u{0}b"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "args[0]",
        ),
        (
            json!({"language": "python", "code": "x", "network": true}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "network",
        ),
        (
            json!({"language": "python", "code": "x", "bogus": 1}),
            StatusCode::BAD_REQUEST,
            "bogus",
        ),
        (
            json!({"language": "python", "code": "x".repeat(1_048_577)}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "code",
        ),
        (
            json!({"language": "python", "code": "x", "stdin": "y".repeat(1_048_577)}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "stdin",
        ),
        (
            json!({"language": "python", "code": "x", "cpu_limit_ms": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "cpu_limit_ms",
        ),
        (
            json!({"language": "python", "code": "x", "cpu_limit_ms": 99999999u64}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "cpu_limit_ms",
        ),
        (
            json!({"language": "python", "code": "x", "tests": []}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "tests",
        ),
        (
            json!({"language": "python", "code": "x", "tests": vec![json!({"stdin": "1"}); cloude_protocol::MAX_TEST_CASES + 1]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "tests",
        ),
        (
            json!({"language": "python", "code": "x", "stdin": "1", "tests": [{"stdin": "2"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "stdin",
        ),
        (
            json!({"language": "python", "code": "x", "tests": [{"input": "2"}]}),
            StatusCode::BAD_REQUEST,
            "input",
        ),
        (
            json!({"language": "python", "code": "x", "tests": vec![json!({"stdin": "y".repeat(300_000)}); 4]}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "tests",
        ),
        (
            json!({"language": "python", "code": "x", "tests": vec![json!({"expected_output": "y".repeat(300_000)}); 4]}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "tests",
        ),
    ];
    for (body, want, field) in cases {
        let (status, v) = post_json(&st, "/v1/executions", body.clone()).await;
        assert_eq!(status, want, "{body:.200}: {v}");
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(!msg.is_empty(), "{v}");
        let got_field = v["field"].as_str().unwrap_or_default();
        assert!(
            got_field == field || msg.contains(field),
            "expected field {field:?} for {:.120}, got {v}",
            body.to_string()
        );
    }
    // Test cases are not streamed: refused before any VM is asked for.
    let (status, v) = post_json(
        &st,
        "/v1/executions/stream",
        json!({"language": "python", "code": "x", "tests": [{"stdin": "1"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["field"], "tests", "{v}");
}

#[tokio::test]
async fn malformed_and_oversized_bodies() {
    let st = state();
    let (s, _, b) = call(&st, "POST", "/v1/executions", Some(b"{not json".to_vec())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&b).expect("json error");
    assert_eq!(v["error"], "bad_request");
    let huge = vec![b' '; st.body_limit() + 10];
    let (s, _, b) = call(&st, "POST", "/v1/executions", Some(huge)).await;
    assert_eq!(
        s,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (s, _, b) = call(&st, "POST", "/v1/executions", Some(vec![0xff, 0xfe])).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (s, _, b) = call(&st, "GET", "/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(serde_json::from_slice::<Value>(&b).is_ok());
}

#[tokio::test]
async fn piston_errors_use_pistons_messages() {
    let st = state();
    let cases = vec![
        (json!({}), "language is required as a string"),
        (
            json!({"language": "python"}),
            "version is required as a string",
        ),
        (
            json!({"language": "python", "version": "3"}),
            "files is required as an array",
        ),
        (
            json!({"language": "python", "version": "3", "files": [{}]}),
            "files[0].content is required as a string",
        ),
        (
            json!({"language": "python", "version": "9.9", "files": [{"content": "x"}]}),
            "python-9.9 runtime is unknown",
        ),
        (
            json!({"language": "python", "version": "*", "files": [{"content": "eA==", "encoding": "base64"}]}),
            "files must include at least one utf8 encoded file",
        ),
        (
            json!({"language": "python", "version": "*", "files": [{"content": "x"}], "run_timeout": "5"}),
            "If specified, run_timeout must be a number",
        ),
        (
            json!({"language": "python", "version": "*", "files": [{"content": "x"}], "run_timeout": 10_000_000}),
            "run_timeout cannot exceed the configured limit of 60000",
        ),
        (
            json!({"language": "python", "version": "*", "files": [{"content": "x"}], "run_timeout": -5}),
            "run_timeout must be non-negative",
        ),
    ];
    for (body, msg) in cases {
        let (s, v) = post_json(&st, "/api/v2/execute", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v, json!({ "message": msg }), "{body}");
    }
    let (s, _, b) = call(&st, "POST", "/api/v2/execute", Some(b"nope".to_vec())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&b).expect("json");
    assert!(
        v["message"].is_string() && v.as_object().map(|o| o.len()) == Some(1),
        "{v}"
    );
}

#[tokio::test]
async fn runtimes_and_languages() {
    let st = state();
    // Every route also answers with a trailing slash (as Piston's and Judge0's servers do).
    for path in [
        "/api/v2/runtimes/",
        "/v1/languages/",
        "/healthz/",
        "/metrics/",
    ] {
        let (s, _, _) = call(&st, "GET", path, None).await;
        assert_eq!(s, StatusCode::OK, "{path}");
    }
    let (s, _, _) = call(&st, "GET", "/v1/executions/", None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let (s, _, _) = call(&st, "GET", "/api/v2/runtimes//", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, b) = call(&st, "GET", "/api/v2/runtimes", None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).expect("json");
    let arr = v.as_array().expect("array");
    let py = arr
        .iter()
        .find(|r| r["language"] == "python")
        .expect("python runtime");
    assert!(py["version"].is_string());
    assert!(py["aliases"]
        .as_array()
        .expect("aliases")
        .iter()
        .any(|a| a == "py"));
    let (s, _, b) = call(&st, "GET", "/v1/languages", None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).expect("json");
    let names: Vec<&str> = v["languages"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    for want in ["python", "javascript", "bash", "c", "cpp"] {
        assert!(names.contains(&want), "{names:?}");
    }
    let c = v["languages"]
        .as_array()
        .expect("array")
        .iter()
        .find(|l| l["name"] == "c")
        .expect("c");
    assert_eq!(c["compiled"], true);
}

#[tokio::test]
async fn health_metrics_and_request_ids() {
    let st = state();
    let req = Request::get("/healthz")
        .header("x-request-id", "abc-123")
        .body(Body::empty())
        .expect("req");
    let resp = router(st.clone()).oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["x-request-id"],
        "abc-123",
        "a sane client id is echoed"
    );
    let req = Request::get("/healthz")
        .header("x-request-id", "bad id!")
        .body(Body::empty())
        .expect("req");
    let resp = router(st.clone()).oneshot(req).await.expect("infallible");
    assert_ne!(resp.headers()["x-request-id"], "bad id!");
    let (_, _, b) = call(&st, "GET", "/metrics", None).await;
    let text = String::from_utf8(b).expect("utf8");
    assert!(text.contains("cloude_vms_running 0"), "{text}");
    assert!(text.contains("cloude_queue_length 0"), "{text}");
    assert!(
        text.contains("cloude_http_responses_total{code=\"200\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn missing_artifacts_give_503_not_500() {
    // The test state never builds artifacts (and the image is never cached for it): a valid
    // request is refused with 503 + Retry-After, never a 500.
    let st = state();
    let body =
        serde_json::to_vec(&json!({"language": "python", "code": "print(1)"})).expect("json");
    let (s, h, b) = call(&st, "POST", "/v1/executions", Some(body)).await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert!(h.contains_key("retry-after"));
    let v: Value = serde_json::from_slice(&b).expect("json");
    assert_eq!(v["error"], "unavailable");
}

#[tokio::test]
async fn saturation_gives_429_with_retry_after() {
    let cfg = Config::parse("[limits]\nmax_concurrent_vms = 1\nmax_queue = 0\n").expect("config");
    let st = state_with(cfg);
    let _held = st.executor.admit().await.expect("the only slot");
    let body = json!({"language": "python", "code": "print(1)"});
    let (s, v) = post_json(&st, "/v1/executions", body.clone()).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    let (s, _, _) = call(
        &st,
        "POST",
        "/v1/executions",
        Some(serde_json::to_vec(&body).expect("json")),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    let (_, h, _) = call(
        &st,
        "POST",
        "/api/v2/execute",
        Some(
            serde_json::to_vec(
                &json!({"language":"python","version":"*","files":[{"content":"1"}]}),
            )
            .expect("json"),
        ),
    )
    .await;
    assert!(h.contains_key("retry-after"));
    st.executor.close();
    let (s, v) = post_json(&st, "/v1/executions", body).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "shutting_down");
}
