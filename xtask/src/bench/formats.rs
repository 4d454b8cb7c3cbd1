//! Block roots against initramfs images, side by side in one run on the server's driver: for
//! python, javascript and cpp, the image's size and build time (from the builder's summaries),
//! boot to ready and hello end to end over cold boots (snapshots off, so every request boots),
//! and the PSS of a VM running a 5-second sleep.

use std::path::Path;

use serde_json::{json, Value};

use super::e2e;
use super::stats::{percentile, r1};

struct Case {
    language: &'static str,
    hello: &'static str,
    expect: &'static str,
    sleep: &'static str,
}

const CASES: &[Case] = &[
    Case {
        language: "python",
        hello: "print('hello')",
        expect: "hello\n",
        sleep: "import time; time.sleep(5)",
    },
    Case {
        language: "javascript",
        hello: "console.log('hello')",
        expect: "hello\n",
        sleep: "setTimeout(() => {}, 5000)",
    },
    Case {
        language: "cpp",
        hello: "#include <iostream>\nint main(){std::cout << \"hello\" << std::endl;}",
        expect: "hello\n",
        sleep: "#include <unistd.h>\nint main(){sleep(5);}",
    },
];

/// Seconds of the memory program's sleep.
const SLEEP_SECS: u64 = 5;
/// VMs running the sleep at once.
const MEMORY_VMS: usize = 2;

/// Size and build time of the cached images of `language` in `format`, from the summaries the
/// builder writes beside them.
fn image_facts(language: &str, format: &str) -> Value {
    let (files, summary): (Vec<std::path::PathBuf>, Option<std::path::PathBuf>) = match format {
        "block" => match cloude_image::image::cached_block_image(language) {
            Some(b) => {
                let s = b.root.with_extension("json");
                (vec![b.root, b.boot], Some(s))
            }
            None => (vec![], None),
        },
        _ => match cloude_image::image::cached_image(language) {
            Some(p) => {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let stem = name.split(".cpio").next().unwrap_or(name).to_string();
                let s = p.with_file_name(format!("{stem}.json"));
                (vec![p], Some(s))
            }
            None => (vec![], None),
        },
    };
    let bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let summary: Value = summary
        .and_then(|s| std::fs::read_to_string(s).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    json!({
        "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "image_mib": r1(bytes as f64 / (1 << 20) as f64),
        "build_seconds": summary["build_seconds"].as_f64().map(r1),
        "unpacked_mib": summary["uncompressed_bytes"].as_f64().map(|b| r1(b / (1 << 20) as f64)),
    })
}

fn ratio(a: &Value, b: &Value) -> Value {
    match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!((a / b * 1000.0).round() / 1000.0),
        _ => Value::Null,
    }
}

/// One language in one format: a server of its own (cold boots), `requests` hellos, the
/// memory run.
fn one(server_bin: &Path, case: &Case, format: &str, requests: usize) -> anyhow::Result<Value> {
    let config = format!(
        "[images]\nformat = \"{format}\"\n[snapshot]\nenabled = false\n[vm]\nprebuild = [\"{}\"]\n",
        case.language
    );
    let server = e2e::start_server_with(server_bin, MEMORY_VMS, &config)?;
    let body = json!({"language": case.language, "code": case.hello, "timeout_ms": 60000,
                      "compile_timeout_ms": 60000})
    .to_string();
    let (mut total, mut boot) = (Vec::new(), Vec::new());
    for i in 0..requests {
        let (ms, b, _) = e2e::timed(server.addr, &body, case.expect)
            .map_err(|e| anyhow::anyhow!("{} {format} request {i}: {e}", case.language))?;
        total.push(ms);
        boot.extend(b);
    }
    let memory = e2e::memory_of(&server, MEMORY_VMS, SLEEP_SECS, case.language, case.sleep)
        .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    drop(server);
    let p = |s: &[f64], q| percentile(s, q).map(r1);
    Ok(json!({
        "image": image_facts(case.language, format),
        "boot_to_ready_p50_ms": p(&boot, 50.0), "boot_to_ready_p90_ms": p(&boot, 90.0),
        "e2e_hello_p50_ms": p(&total, 50.0), "e2e_hello_p90_ms": p(&total, 90.0),
        "pss_per_vm_mib": memory["pss_per_vm_mib"], "memory": memory,
        "boot_samples": boot, "e2e_samples": total,
    }))
}

/// Every case in both formats, with block/initramfs ratios.
pub fn measure(server_bin: &Path, requests: usize) -> Value {
    let mut out = serde_json::Map::new();
    for case in CASES {
        let mut per = serde_json::Map::new();
        for format in ["initramfs", "block"] {
            let v = one(server_bin, case, format, requests)
                .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
            per.insert(format.to_string(), v);
        }
        let (i, b) = (&per["initramfs"], &per["block"]);
        let ratios = json!({
            "image_size": ratio(&b["image"]["image_mib"], &i["image"]["image_mib"]),
            "boot_to_ready": ratio(&b["boot_to_ready_p50_ms"], &i["boot_to_ready_p50_ms"]),
            "e2e_hello": ratio(&b["e2e_hello_p50_ms"], &i["e2e_hello_p50_ms"]),
            "pss": ratio(&b["pss_per_vm_mib"], &i["pss_per_vm_mib"]),
        });
        per.insert("block_vs_initramfs".into(), ratios);
        out.insert(case.language.to_string(), Value::Object(per));
    }
    Value::Object(out)
}

/// Markdown rows of [`measure`]'s results.
pub fn table(r: &Value) -> String {
    let f = |v: &Value| match v {
        Value::Null => "—".to_string(),
        other => other.to_string(),
    };
    let mut s = String::from(
        "| language | format | image MiB | build s | boot to ready p50 ms | hello e2e p50 ms | PSS per VM (5 s sleep) MiB |\n|---|---|---|---|---|---|---|\n",
    );
    let Some(map) = r.as_object() else {
        return s;
    };
    for (lang, per) in map {
        for format in ["initramfs", "block"] {
            let v = &per[format];
            if v.get("error").is_some() {
                s.push_str(&format!(
                    "| {lang} | {format} | error: {} |||||\n",
                    f(&v["error"])
                ));
                continue;
            }
            s.push_str(&format!(
                "| {lang} | {format} | {} | {} | {} | {} | {} |\n",
                f(&v["image"]["image_mib"]),
                f(&v["image"]["build_seconds"]),
                f(&v["boot_to_ready_p50_ms"]),
                f(&v["e2e_hello_p50_ms"]),
                f(&v["pss_per_vm_mib"]),
            ));
        }
        let q = &per["block_vs_initramfs"];
        s.push_str(&format!(
            "| {lang} | block ÷ initramfs | {} | | {} | {} | {} |\n",
            f(&q["image_size"]),
            f(&q["boot_to_ready"]),
            f(&q["e2e_hello"]),
            f(&q["pss"]),
        ));
    }
    s
}
