//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `fuzz/` (nightly, AddressSanitizer) and
//! runs each one for a bounded time, one at a time, then prints executions per target.
//!
//! Each run starts from `fuzz/seeds/<target>` and replays `fuzz/regressions/<target>` (inputs that
//! once crashed it) before mutating; what it learns goes to `fuzz/corpus/<target>` (ignored by
//! git), a crashing input to `fuzz/artifacts/<target>/`, libFuzzer's output to
//! `$CLOUDE_HOME/build/fuzz-target/xtask-logs/<target>.log` (see [`fuzz_target_dir`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::deps;

/// Toolchain the sanitizer builds need (`-Zsanitizer`).
const NIGHTLY: &str = "nightly";
/// libFuzzer's per-input time limit (s): a slower input counts as a hang, i.e. a crash.
/// Generous because the machine's cores are shared.
const INPUT_TIMEOUT_S: u64 = 20;
/// libFuzzer's memory limit (MiB): more is an out-of-memory crash.
const RSS_LIMIT_MB: u64 = 2048;

#[derive(clap::Args, Debug, Clone)]
pub struct FuzzArgs {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Build the targets but do not run them.
    #[arg(long)]
    pub build_only: bool,
    /// Targets to run (default: all of them, from `cargo fuzz list`).
    pub targets: Vec<String>,
}

impl FuzzArgs {
    /// Every target for `seconds` each (the CI smoke phase of `cargo xtask test`).
    pub fn smoke(seconds: u64) -> Self {
        FuzzArgs {
            seconds,
            build_only: false,
            targets: Vec::new(),
        }
    }
}

/// One target's run, for the table.
struct Outcome {
    target: String,
    executions: Option<u64>,
    seconds: f64,
    peak_rss_mb: Option<u64>,
    crash: Option<String>,
}

pub fn run(args: FuzzArgs) -> anyhow::Result<i32> {
    ensure_tools()?;
    let dir = fuzz_dir();
    let all = list_targets()?;
    let targets = if args.targets.is_empty() {
        all.clone()
    } else {
        for t in &args.targets {
            if !all.contains(t) {
                bail!("no fuzz target {t:?} (targets: {})", all.join(", "));
            }
        }
        args.targets.clone()
    };

    let t = Instant::now();
    let mut build = fuzz_cmd("build");
    // `cargo fuzz build` takes at most one target; without one it builds them all.
    if let [one] = targets.as_slice() {
        build.arg(one);
    }
    deps::run(&mut build).context("building the fuzz targets")?;
    eprintln!("xtask fuzz: built in {:.0} s", t.elapsed().as_secs_f64());
    if args.build_only {
        return Ok(0);
    }

    let logs = fuzz_target_dir().join("xtask-logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut outcomes = Vec::new();
    for target in &targets {
        outcomes.push(run_one(&dir, &logs, target, args.seconds)?);
    }
    print_table(&outcomes);
    let crashed: Vec<_> = outcomes.iter().filter(|o| o.crash.is_some()).collect();
    for o in &crashed {
        eprintln!(
            "xtask fuzz: {} FAILED: {}",
            o.target,
            o.crash.as_deref().unwrap_or_default()
        );
    }
    Ok(i32::from(!crashed.is_empty()))
}

fn fuzz_dir() -> PathBuf {
    deps::root().join("fuzz")
}

/// `cargo +nightly fuzz SUB --fuzz-dir fuzz`, through the rustup proxy (not `$CARGO`, which is
/// the stable toolchain's cargo when xtask runs under `cargo run`).
/// Where the sanitizer builds go: `$CARGO_TARGET_DIR` if set, else a cache directory beside the
/// other build caches (`$CLOUDE_HOME/build/fuzz-target`), so that a fresh clone on the same
/// machine does not redo a cold sanitizer build of every dependency; cargo decides freshness.
fn fuzz_target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| cloude_image::paths::build_dir().join("fuzz-target"))
}

fn fuzz_cmd(sub: &str) -> Command {
    let mut c = Command::new("cargo");
    c.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env("CARGO_TARGET_DIR", fuzz_target_dir())
        .current_dir(deps::root())
        .arg(format!("+{NIGHTLY}"))
        .args(["fuzz", sub, "--fuzz-dir"])
        .arg(fuzz_dir());
    c
}

/// Installs the nightly toolchain and cargo-fuzz when they are missing.
fn ensure_tools() -> anyhow::Result<()> {
    let has_nightly = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_nightly {
        eprintln!("xtask fuzz: installing the {NIGHTLY} toolchain");
        deps::run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let has_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_fuzz {
        eprintln!("xtask fuzz: installing cargo-fuzz");
        deps::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

fn list_targets() -> anyhow::Result<Vec<String>> {
    let out = fuzz_cmd("list")
        .output()
        .context("running cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

fn run_one(dir: &Path, logs: &Path, target: &str, seconds: u64) -> anyhow::Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let artifacts = dir.join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts)
        .with_context(|| format!("creating {}", artifacts.display()))?;
    // The binary `cargo fuzz build` made (release + debug assertions, ASan), run directly so
    // that a change elsewhere in the tree cannot trigger a rebuild inside the timed run.
    let mut cmd = Command::new(
        fuzz_target_dir()
            .join("x86_64-unknown-linux-gnu/release")
            .join(target),
    );
    cmd.arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus);
    for extra in ["seeds", "regressions"] {
        let d = dir.join(extra).join(target);
        if d.is_dir() {
            cmd.arg(d);
        }
    }
    // One process, one worker (no `-jobs`): the machine's cores are shared.
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg("-print_final_stats=1");
    if let Some(dict) = dictionary(dir, target) {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    eprintln!("xtask fuzz: {target} for {seconds} s");
    let t = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("running fuzz target {target}"))?;
    let elapsed = t.elapsed().as_secs_f64();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log = logs.join(format!("{target}.log"));
    std::fs::write(&log, &text).with_context(|| format!("writing {}", log.display()))?;
    let crash = if out.status.success() {
        None
    } else {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        eprintln!("{}", tail.join("\n"));
        Some(format!(
            "{} (see {}; the input is under fuzz/artifacts/{target}/)",
            out.status,
            log.display()
        ))
    };
    Ok(Outcome {
        target: target.to_string(),
        executions: stat(&text, "stat::number_of_executed_units:"),
        seconds: elapsed,
        peak_rss_mb: stat(&text, "stat::peak_rss_mb:"),
        crash,
    })
}

/// The libFuzzer dictionary for a target's input format, if there is one.
fn dictionary(dir: &Path, target: &str) -> Option<PathBuf> {
    let name = match target {
        "api_request" | "piston_request" | "agent_protocol" | "judge0_request" => "json",
        "oci_layers" => "tar",
        "cpio_reader" => "cpio",
        _ => return None,
    };
    let p = dir.join("dicts").join(format!("{name}.dict"));
    p.is_file().then_some(p)
}

/// The value of a `-print_final_stats` line (`stat::NAME: VALUE`).
fn stat(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "{:<22} {:>12} {:>8} {:>9} {:>8}  result",
        "target", "executions", "seconds", "exec/s", "rss MiB"
    );
    let dash = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for o in outcomes {
        let rate = o
            .executions
            .map_or("-".to_string(), |e| format!("{:.0}", e as f64 / o.seconds));
        println!(
            "{:<22} {:>12} {:>8.0} {:>9} {:>8}  {}",
            o.target,
            dash(o.executions),
            o.seconds,
            rate,
            dash(o.peak_rss_mb),
            if o.crash.is_some() { "CRASH" } else { "ok" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_final_stats() {
        let text = "#1234 DONE cov: 1\nstat::number_of_executed_units: 98765\n\
                    stat::average_exec_per_sec:     823\nstat::peak_rss_mb: 61\n";
        assert_eq!(stat(text, "stat::number_of_executed_units:"), Some(98765));
        assert_eq!(stat(text, "stat::peak_rss_mb:"), Some(61));
        assert_eq!(stat("crashed early", "stat::peak_rss_mb:"), None);
    }
}
