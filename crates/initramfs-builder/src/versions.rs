//! Language versions from the packages an image is built from, never written by hand.
//!
//! A Debian-package language's version is the upstream part of its version package's Debian
//! version ([`upstream_version`]): the package apt installs into the image. [`resolve`] asks apt
//! once for every language's candidate (what `apt-get -s install` puts in the closure, and so in
//! the image and its cache key); the build summary records the version found in the closure
//! itself. [`probe`] runs the runtime's own version command inside a built block root, which is
//! how the conformance suite proves the two agree.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::catalog::Catalog;

/// Longest a version command may run in [`probe`].
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(120);
/// Most bytes of a version command's output kept.
pub const MAX_PROBE_OUTPUT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("`apt-cache policy` could not run (is this a Debian host?): {0}")]
    Apt(String),
    #[error(
        "language {language:?}: its version package {package:?} is not in the host's apt sources"
    )]
    Missing { language: String, package: String },
    #[error("{0}")]
    Probe(String),
}

/// `1:25.2.3+dfsg-1+deb12u4` → `25.2.3`: no epoch, no Debian revision, nothing from the first
/// `+` or `~`, no trailing `.dfsg`/`.ds` repack marker; then at most `parts` dot-separated parts.
pub fn upstream_version(debian: &str, parts: Option<usize>) -> String {
    let v = debian.split_once(':').map_or(debian, |(_, v)| v);
    let v = v.rsplit_once('-').map_or(v, |(u, _)| u);
    let v = v.split(['+', '~']).next().unwrap_or(v);
    let v = [".dfsg", ".ds"]
        .iter()
        .find_map(|m| v.find(m).map(|i| &v[..i]))
        .unwrap_or(v);
    match parts {
        Some(n) => v.split('.').take(n).collect::<Vec<_>>().join("."),
        None => v.to_string(),
    }
}

/// Parses `apt-cache policy` output into package → candidate version.
pub fn parse_policy(out: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            current = Some(line.trim_end_matches(':').to_string());
        } else if let (Some(p), Some(c)) = (&current, line.trim().strip_prefix("Candidate: ")) {
            if c != "(none)" {
                map.insert(p.clone(), c.trim().to_string());
            }
        }
    }
    map
}

fn policy(packages: &[&str]) -> Result<BTreeMap<String, String>, VersionError> {
    let out = Command::new("apt-cache")
        .args(["-q", "-o", "Dir::State::status=/dev/null", "policy", "--"])
        .args(packages)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| VersionError::Apt(e.to_string()))?;
    if !out.status.success() {
        return Err(VersionError::Apt(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(parse_policy(&String::from_utf8_lossy(&out.stdout)))
}

/// Fills in the version of every Debian-package language of `catalog` (one `apt-cache` run;
/// one `apt-get update` first if a package is unknown and we are root, as the builder does).
pub fn resolve(catalog: &mut Catalog) -> Result<(), VersionError> {
    let wanted: Vec<String> = catalog
        .languages
        .iter()
        .filter(|l| l.image.is_none())
        .filter_map(|l| l.version_package().map(str::to_string))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let mut found = policy(&names)?;
    if names.iter().any(|n| !found.contains_key(*n)) && nix::unistd::geteuid().is_root() {
        let _ = Command::new("apt-get")
            .args(["-q", "update"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        found = policy(&names)?;
    }
    for l in catalog.languages.iter_mut().filter(|l| l.image.is_none()) {
        let Some(p) = l.version_package().map(str::to_string) else {
            continue;
        };
        let v = found.get(&p).ok_or_else(|| VersionError::Missing {
            language: l.name.clone(),
            package: p.clone(),
        })?;
        l.version = upstream_version(v, l.version_parts);
    }
    Ok(())
}

/// Runs `argv` inside the block root `image` (mounted read-only, in the post-build sandbox:
/// new namespaces, no network) and returns its stdout and stderr together. Needs root.
pub fn probe(image: &Path, argv: &[String]) -> Result<String, VersionError> {
    let err = |what: &str, e: &dyn std::fmt::Display| VersionError::Probe(format!("{what}: {e}"));
    if argv.is_empty() {
        return Err(VersionError::Probe("no version command".into()));
    }
    let dir = tempfile::Builder::new()
        .prefix("cloude-probe-")
        .tempdir()
        .map_err(|e| err("temporary directory", &e))?;
    let mount = Command::new("mount")
        .args(["-t", "erofs", "-o", "ro,loop"])
        .arg(image)
        .arg(dir.path())
        .output()
        .map_err(|e| err("mount", &e))?;
    if !mount.status.success() {
        return Err(VersionError::Probe(format!(
            "mounting {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&mount.stderr).trim()
        )));
    }
    let result = run_probe(dir.path(), argv);
    let _ = Command::new("umount").arg(dir.path()).status();
    result
}

fn run_probe(root: &Path, argv: &[String]) -> Result<String, VersionError> {
    use crate::image::post_build::{run_logged, RunError};
    let log = tempfile::NamedTempFile::new()
        .map_err(|e| VersionError::Probe(format!("temporary file: {e}")))?;
    // The root is read-only: HOME on the sandbox's tmpfs, for runtimes that write caches there.
    match run_logged(root, argv, "/tmp", log.path(), PROBE_TIMEOUT) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(VersionError::Probe(format!(
                "`{}` ran longer than {} s",
                argv.join(" "),
                PROBE_TIMEOUT.as_secs()
            )))
        }
        Err(RunError::Spawn(e)) => {
            return Err(VersionError::Probe(format!(
                "cannot start the sandbox: {e}"
            )))
        }
        Err(RunError::Io(e)) => return Err(VersionError::Probe(e.to_string())),
    }
    let mut bytes = std::fs::read(log.path()).map_err(|e| VersionError::Probe(e.to_string()))?;
    bytes.truncate(MAX_PROBE_OUTPUT);
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_versions() {
        for (deb, parts, want) in [
            ("18.20.4+dfsg-1~deb12u3", None, "18.20.4"),
            ("3.11.2-1+b1", None, "3.11.2"),
            ("4:12.2.0-3", None, "12.2.0"),
            ("1:25.2.3+dfsg-1+deb12u4", None, "25.2.3"),
            ("1.14.0.dfsg-2", None, "1.14.0"),
            ("4.2.2.20221110-2", Some(3), "4.2.2"),
            ("17.0.21.1+2-1~deb12u1", None, "17.0.21.1"),
            ("8.6.13", None, "8.6.13"),
            ("2:1.19~1", None, "1.19"),
            ("1.3.31+ds1-1", None, "1.3.31"),
        ] {
            assert_eq!(upstream_version(deb, parts), want, "{deb}");
        }
    }

    #[test]
    fn policy_output() {
        let out = "nodejs:\n  Installed: (none)\n  Candidate: 18.20.4+dfsg-1~deb12u3\n  Version table:\n     18.20.4+dfsg-1~deb12u3 500\nnosuch:\n  Installed: (none)\n  Candidate: (none)\n";
        let m = parse_policy(out);
        assert_eq!(
            m.get("nodejs").map(String::as_str),
            Some("18.20.4+dfsg-1~deb12u3")
        );
        assert!(!m.contains_key("nosuch"));
    }
}
