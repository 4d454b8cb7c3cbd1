//! Builds what `api/playground` embeds, into `OUT_DIR`:
//! - `app.js`: the page's script (`web/src`) with CodeMirror 6, installed by `npm ci` from
//!   `web/package-lock.json` and bundled by esbuild (one of the locked packages);
//! - `examples.json`: one example program per language, the catalogue's conformance programs
//!   (`catalog/tests/<language>/`) with the input and arguments the conformance suite gives them.
//!
//! Both the installed packages and the bundle are cached by content hash under
//! `$CLOUDE_WEB_CACHE` (default `$XDG_CACHE_HOME/cloude/web`, else `~/.cache/cloude/web`), so a
//! rebuild that changes no input runs no npm; a missing cache only costs an `npm ci`.
//! `CLOUDE_PLAYGROUND_BUNDLE=off` builds without node and npm: the page then says it was left out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest as _;

/// esbuild's arguments: part of the bundle's cache key.
const ESBUILD_ARGS: &[&str] = &[
    "--bundle",
    "--minify",
    "--format=iife",
    "--target=es2020",
    "--legal-comments=eof",
];

/// The conformance suite's defaults (`xtask/src/languages.rs`), which `expect.toml` may change.
const EXAMPLE_STDIN: &str = "21\n";
const EXAMPLE_ARGS: [&str; 2] = ["alpha", "beta gamma"];

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let web = manifest.join("web");
    let tests = manifest.join("../../catalog/tests");
    for p in ["web/src", "web/package.json", "web/package-lock.json"] {
        println!("cargo::rerun-if-changed={p}");
    }
    println!("cargo::rerun-if-changed=../../catalog/tests");
    println!("cargo::rerun-if-env-changed=CLOUDE_PLAYGROUND_BUNDLE");
    println!("cargo::rerun-if-env-changed=CLOUDE_WEB_CACHE");
    write_examples(&tests, &out.join("examples.json"));
    let bundle = out.join("app.js");
    if std::env::var("CLOUDE_PLAYGROUND_BUNDLE").as_deref() == Ok("off") {
        println!("cargo::warning=CLOUDE_PLAYGROUND_BUNDLE=off: the page at / is built without its editor");
        std::fs::write(&bundle, OFF_SCRIPT).expect("write app.js");
        return;
    }
    if let Err(e) = build_bundle(&web, &bundle) {
        panic!(
            "building the playground's script failed: {e}\n(it needs node and npm and the npm \
             registry, or a cached bundle; CLOUDE_PLAYGROUND_BUNDLE=off builds the server without it)"
        );
    }
}

const OFF_SCRIPT: &str = "document.getElementById('status').textContent = \
    'This server was built without its playground (CLOUDE_PLAYGROUND_BUNDLE=off).';\n";

fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("CLOUDE_WEB_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("cloude").join("web")
}

fn hex(d: &[u8]) -> String {
    d.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

fn build_bundle(web: &Path, bundle: &Path) -> Result<(), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let lock = read(&web.join("package-lock.json"))?;
    let package = read(&web.join("package.json"))?;
    let mut h = sha2::Sha256::new();
    h.update(&package);
    h.update(b"\0");
    h.update(&lock);
    let npm_key = hex(&h.finalize());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(web.join("src"))
        .map_err(|e| format!("web/src: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    sources.sort();
    let mut h = sha2::Sha256::new();
    h.update(npm_key.as_bytes());
    h.update(ESBUILD_ARGS.join(" ").as_bytes());
    for s in &sources {
        h.update(s.file_name().unwrap_or_default().as_encoded_bytes());
        h.update(b"\0");
        h.update(read(s)?);
        h.update(b"\0");
    }
    let bundle_key = hex(&h.finalize());
    let root = cache_root();
    let cached = root.join(format!("bundle-{bundle_key}.js"));
    if let Ok(b) = std::fs::read(&cached) {
        return std::fs::write(bundle, b).map_err(|e| format!("{}: {e}", bundle.display()));
    }
    let modules = root.join(format!("npm-{npm_key}"));
    if !modules.join("node_modules/.bin/esbuild").exists() {
        // Install into a directory of our own, then rename: two builds at once never see half.
        let tmp = root.join(format!("npm-{npm_key}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::write(tmp.join("package.json"), &package).map_err(|e| e.to_string())?;
        std::fs::write(tmp.join("package-lock.json"), &lock).map_err(|e| e.to_string())?;
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefer-offline"])
            .current_dir(&tmp))?;
        if std::fs::rename(&tmp, &modules).is_err() {
            // Another build got there first.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    // esbuild resolves packages from the source's directory upwards: the sources go next to
    // the installed packages, in a directory of this build's own.
    let work = modules.join(format!("src-{bundle_key}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    for s in &sources {
        std::fs::copy(s, work.join(s.file_name().unwrap_or_default()))
            .map_err(|e| format!("{}: {e}", s.display()))?;
    }
    let tmp_out = root.join(format!("bundle-{bundle_key}.tmp-{}", std::process::id()));
    let result = run(Command::new(modules.join("node_modules/.bin/esbuild"))
        .arg(work.join("app.js"))
        .args(ESBUILD_ARGS)
        .arg(format!("--outfile={}", tmp_out.display()))
        .arg("--log-level=warning"));
    let _ = std::fs::remove_dir_all(&work);
    result?;
    std::fs::copy(&tmp_out, bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
    let _ = std::fs::rename(&tmp_out, &cached);
    Ok(())
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{:?} failed ({}): {}",
        cmd.get_program(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// `{language: {file, code, stdin, args}}` from `catalog/tests`.
fn write_examples(tests: &Path, to: &Path) {
    let mut all = BTreeMap::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(tests)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    dirs.sort();
    for dir in dirs.into_iter().filter(|d| d.is_dir()) {
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        let entry = files.into_iter().find(|f| {
            let n = f.file_name().unwrap_or_default().to_string_lossy();
            !n.starts_with("compile_error.") && n != "expect.toml"
        });
        let Some(entry) = entry else { continue };
        let Ok(code) = std::fs::read_to_string(&entry) else {
            continue;
        };
        let mut args: Vec<String> = EXAMPLE_ARGS.iter().map(|a| a.to_string()).collect();
        if let Ok(t) = std::fs::read_to_string(dir.join("expect.toml")) {
            let v: toml::Table = t
                .parse()
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join("expect.toml").display()));
            if let Some(a) = v.get("args").and_then(|a| a.as_array()) {
                args = a
                    .iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect();
            }
        }
        all.insert(
            name,
            serde_json::json!({
                "file": entry.file_name().unwrap_or_default().to_string_lossy(),
                "code": code,
                "stdin": EXAMPLE_STDIN,
                "args": args,
            }),
        );
    }
    std::fs::write(to, serde_json::to_vec(&all).expect("json")).expect("write examples.json");
}
