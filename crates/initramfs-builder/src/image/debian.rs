//! Root filesystems from Debian 12 packages, through the host's apt configuration.
//!
//! 1. `apt-get -s install` against an empty dpkg status resolves the dependency closure with exact
//!    versions (this is also the cache key);
//! 2. `apt-get download` fetches the missing `.deb`s into `$CLOUDE_HOME/debs` (apt verifies them
//!    against the signed indexes);
//! 3. `dpkg-deb --fsys-tarfile` feeds each package's files to [`Tree::apply_tar`] with the
//!    merged-`/usr` rewrite; no maintainer scripts run;
//! 4. documentation, man pages, locales and similar are trimmed.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::alternatives;
use super::tree::{ApplyOptions, Meta, Node, Tree, TreeError};
use crate::progress::Progress;

/// Paths (relative, slash-separated) removed from Debian images, with everything below them.
pub const TRIMMED: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/linda",
    "usr/share/bug",
    "usr/share/doc-base",
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/menu",
    "usr/share/pixmaps",
    "usr/share/applications",
    "usr/share/gdb",
    "usr/share/gcc/python",
    "usr/lib/x86_64-linux-gnu/gconv",
    "var/cache",
    "var/lib/apt",
    "var/lib/dpkg",
    "var/log",
    "etc/cron.daily",
    "etc/logrotate.d",
];

/// Glob patterns (`*` matches within one path component) of large files no program run by
/// Cloude needs: LTO (`-flto`), sanitizer runtimes (`-fsanitize`), gold, dwp and gprofng.
pub const TRIMMED_PATTERNS: &[&str] = &[
    "usr/bin/*lto-dump*",
    "usr/lib/gcc/x86_64-linux-gnu/*/lto1",
    "usr/lib/x86_64-linux-gnu/lib*san.so*",
    "usr/lib/gcc/x86_64-linux-gnu/*/lib*san.a",
    "usr/lib/gcc/x86_64-linux-gnu/*/lib*san_preinit.o",
    "usr/bin/*ld.gold",
    "usr/bin/*dwp",
    "usr/bin/*gprofng*",
    "usr/bin/gp-*",
    "usr/lib/x86_64-linux-gnu/gprofng",
    "usr/lib/x86_64-linux-gnu/libgprofng*",
    // Python: the regression-test package, IDLE, Tk and turtle demos (no Tk library is
    // installed), and test suites shipped inside packages.
    "usr/lib/python3.*/test",
    "usr/lib/python3.*/idlelib",
    "usr/lib/python3.*/tkinter",
    "usr/lib/python3.*/turtledemo",
    "usr/lib/python3.*/*/test",
    "usr/lib/python3.*/*/tests",
    // Node: TypeScript declaration files, never loaded at run time.
    "usr/share/nodejs/@types",
    // dpkg and its helpers (python3-minimal pulls dpkg in): no package database is kept.
    "usr/bin/dpkg*",
    "usr/bin/update-alternatives",
    "usr/share/dpkg",
];

/// Whether `path` matches `pattern` (`*` matches any run of characters other than `/`).
pub fn glob_match(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => {
                let mut i = 0;
                loop {
                    if go(rest, &s[i..]) {
                        return true;
                    }
                    if i == s.len() || s[i] == b'/' {
                        return false;
                    }
                    i += 1;
                }
            }
            Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
}

/// Most packages one image may pull in.
pub const MAX_PACKAGES: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    #[error("Debian package {0:?} not found in the host's apt sources (is the name right? has `apt-get update` run?)")]
    MissingPackage(String),
    #[error("apt cannot resolve the packages {packages}: {detail}")]
    Resolve { packages: String, detail: String },
    #[error("`{cmd}` could not be started: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {detail}")]
    Failed {
        cmd: String,
        status: String,
        detail: String,
    },
    #[error("downloading Debian packages failed (network or mirror problem?): {0}")]
    Download(String),
    #[error("apt downloaded no file for {0} into {1}")]
    NotDownloaded(String, PathBuf),
    #[error("package {package}: {source}")]
    Layer {
        package: String,
        #[source]
        source: TreeError,
    },
    #[error("the dependency closure has more than MAX_PACKAGES packages")]
    TooMany,
    #[error("I/O error at {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// One package of the closure.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn apt_sim(packages: &[String]) -> Result<std::process::Output, DebianError> {
    let mut c = Command::new("apt-get");
    c.args([
        "-s",
        "-q",
        "-o",
        "Dir::State::status=/dev/null",
        "-o",
        "APT::Install-Recommends=false",
        "-o",
        "APT::Install-Suggests=false",
        "-o",
        "Debug::NoLocking=true",
        "install",
        "--",
    ])
    .args(packages)
    .env("LC_ALL", "C")
    .stdin(Stdio::null());
    c.output().map_err(|source| DebianError::Spawn {
        cmd: "apt-get -s install".into(),
        source,
    })
}

/// Parses `Inst NAME (VERSION ...` lines of `apt-get -s`.
pub fn parse_simulation(out: &str) -> Vec<Package> {
    let mut v: Vec<Package> = out
        .lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|l| {
            let (name, rest) = l.split_once(' ')?;
            let version = rest.strip_prefix('(')?.split_whitespace().next()?;
            Some(Package {
                name: name.split(':').next().unwrap_or(name).to_string(),
                version: version.to_string(),
            })
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Resolves `packages` and their dependencies (no recommends) to exact versions.
pub fn resolve(packages: &[String], progress: &Progress) -> Result<Vec<Package>, DebianError> {
    let bar = progress.spinner(format!("resolving Debian packages {}", packages.join(" ")));
    let mut out = apt_sim(packages)?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() && stderr.contains("Unable to locate package") && is_root() {
        // Maybe the host's package lists are missing or stale: refresh them once.
        bar.set_message("refreshing the host's apt package lists (apt-get update)");
        run_apt(
            Command::new("apt-get").args(["-q", "update"]),
            "apt-get update",
        )
        .map_err(|e| DebianError::Download(e.to_string()))?;
        out = apt_sim(packages)?;
    }
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        bar.abandon_with_message("cannot resolve the Debian packages");
        if let Some(l) = stderr
            .lines()
            .find(|l| l.contains("Unable to locate package"))
        {
            let name = l.rsplit(' ').next().unwrap_or(l).to_string();
            return Err(DebianError::MissingPackage(name));
        }
        return Err(DebianError::Resolve {
            packages: packages.join(" "),
            detail: tail(&format!("{stdout}\n{stderr}"), 8),
        });
    }
    let v = parse_simulation(&stdout);
    if v.len() > MAX_PACKAGES {
        return Err(DebianError::TooMany);
    }
    bar.finish_with_message(format!("{} Debian packages resolved", v.len()));
    Ok(v)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn run_apt(cmd: &mut Command, what: &str) -> Result<(), DebianError> {
    let out = cmd
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DebianError::Spawn {
            cmd: what.into(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(DebianError::Failed {
        cmd: what.into(),
        status: out.status.to_string(),
        detail: tail(
            &format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            8,
        ),
    })
}

/// The directory of cached `.deb` files.
pub fn debs_dir() -> PathBuf {
    crate::paths::cloude_home().join("debs")
}

/// The file name prefix apt gives a downloaded package (`name_version_`, epoch `:` → `%3a`).
fn deb_prefix(p: &Package) -> String {
    format!("{}_{}_", p.name, p.version.replace(':', "%3a"))
}

fn find_deb(dir: &Path, p: &Package) -> Option<PathBuf> {
    let prefix = deb_prefix(p);
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

/// Makes sure every package of `closure` is in the cache; returns the `.deb` paths in order.
pub fn download(closure: &[Package], progress: &Progress) -> Result<Vec<PathBuf>, DebianError> {
    let dir = debs_dir();
    fs::create_dir_all(&dir).map_err(|e| DebianError::Io(dir.clone(), e))?;
    let missing: Vec<&Package> = closure
        .iter()
        .filter(|p| find_deb(&dir, p).is_none())
        .collect();
    if !missing.is_empty() {
        let bar = progress.spinner(format!("downloading {} Debian packages", missing.len()));
        let tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempdir_in(&dir)
            .map_err(|e| DebianError::Io(dir.clone(), e))?;
        let mut cmd = Command::new("apt-get");
        cmd.current_dir(tmp.path())
            .args(["-q", "-o", "APT::Sandbox::User=root", "download", "--"])
            .args(missing.iter().map(|p| format!("{}={}", p.name, p.version)));
        if let Err(e) = run_apt(&mut cmd, "apt-get download") {
            bar.abandon_with_message("download failed");
            return Err(DebianError::Download(e.to_string()));
        }
        for p in &missing {
            let f = find_deb(tmp.path(), p).ok_or_else(|| {
                DebianError::NotDownloaded(format!("{}={}", p.name, p.version), tmp.path().into())
            })?;
            let to = dir.join(f.file_name().expect("a found file has a name"));
            fs::rename(&f, &to).map_err(|e| DebianError::Io(to.clone(), e))?;
        }
        bar.finish_with_message(format!("downloaded {} Debian packages", missing.len()));
    }
    closure
        .iter()
        .map(|p| {
            find_deb(&dir, p).ok_or_else(|| {
                DebianError::NotDownloaded(format!("{}={}", p.name, p.version), dir.clone())
            })
        })
        .collect()
}

/// The package's `postinst` script, if it has one (at most
/// [`alternatives::MAX_SCRIPT_BYTES`] are read).
pub fn postinst(deb: &Path) -> Result<Option<String>, DebianError> {
    let out = Command::new("dpkg-deb")
        .arg("--info")
        .arg(deb)
        .arg("postinst")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DebianError::Spawn {
            cmd: format!("dpkg-deb --info {} postinst", deb.display()),
            source,
        })?;
    // dpkg-deb exits non-zero when the package has no such control file.
    if !out.status.success() || out.stdout.len() > alternatives::MAX_SCRIPT_BYTES {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Unpacks one `.deb` (its data archive) into `tree`.
pub fn extract(deb: &Path, package: &str, tree: &mut Tree) -> Result<(), DebianError> {
    let cmd = format!("dpkg-deb --fsys-tarfile {}", deb.display());
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| DebianError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let opts = ApplyOptions {
        whiteouts: false,
        merged_usr: true,
    };
    let applied = tree.apply_tar(stdout, opts);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().map_err(|source| DebianError::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    if !status.success() {
        return Err(DebianError::Failed {
            cmd,
            status: status.to_string(),
            detail: tail(&err, 5),
        });
    }
    applied.map_err(|source| DebianError::Layer {
        package: package.to_string(),
        source,
    })
}

/// The merged-`/usr` symlinks (`/bin` → `usr/bin`, ...) for the directories that exist.
pub fn add_usr_links(tree: &mut Tree) -> Result<(), TreeError> {
    for d in ["bin", "sbin", "lib", "lib64"] {
        let under = format!("usr/{d}");
        if matches!(tree.lookup(&under), Some(Node::Dir { .. })) {
            tree.insert(
                &[d.as_bytes().to_vec()],
                Node::Symlink {
                    meta: Meta::root(0o777),
                    target: under.into_bytes(),
                },
                d,
            )?;
        }
    }
    Ok(())
}

/// Removes documentation, locales and package-manager state; returns how many subtrees went.
pub fn trim(tree: &mut Tree) -> u64 {
    tree.prune(&|p| TRIMMED.contains(&p) || TRIMMED_PATTERNS.iter().any(|g| glob_match(g, p)))
}

/// Builds the Debian root filesystem for a resolved closure.
pub fn build_tree(closure: &[Package], progress: &Progress) -> Result<Tree, DebianError> {
    let debs = download(closure, progress)?;
    let bar = progress.bar(debs.len() as u64, "unpacking Debian packages");
    let mut tree = Tree::new();
    for (p, deb) in closure.iter().zip(&debs) {
        bar.set_message(format!("unpacking {}", p.name));
        extract(deb, &p.name, &mut tree)?;
        bar.inc(1);
    }
    trim(&mut tree);
    // What the maintainer scripts (never run) would have made.
    let mut alts = Vec::new();
    for deb in &debs {
        if let Some(script) = postinst(deb)? {
            alts.extend(alternatives::parse_postinst(&script));
        }
    }
    let generated = |what: &str| {
        let what = what.to_string();
        move |source| DebianError::Layer {
            package: what.clone(),
            source,
        }
    };
    let links = alternatives::apply(&mut tree, &alts).map_err(generated("(alternatives links)"))?;
    alternatives::ca_bundle(&mut tree).map_err(generated("(CA bundle)"))?;
    alternatives::timezone(&mut tree).map_err(generated("(time zone)"))?;
    tracing::debug!(links, "alternatives links created");
    add_usr_links(&mut tree).map_err(|source| DebianError::Layer {
        package: "(merged /usr links)".into(),
        source,
    })?;
    bar.finish_with_message(format!("unpacked {} Debian packages", debs.len()));
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulation_output_parsed() {
        let out = "NOTE: x\nInst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []\n\
                   Conf libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64])\n\
                   Inst libattr1 (1:2.5.1-4 Debian:12.15/oldstable [amd64])\n";
        assert_eq!(
            parse_simulation(out),
            vec![
                Package {
                    name: "libattr1".into(),
                    version: "1:2.5.1-4".into()
                },
                Package {
                    name: "libc6".into(),
                    version: "2.36-9+deb12u14".into()
                },
            ]
        );
        let p = Package {
            name: "libattr1".into(),
            version: "1:2.5.1-4".into(),
        };
        assert_eq!(deb_prefix(&p), "libattr1_1%3a2.5.1-4_");
    }

    #[test]
    fn globs() {
        assert!(glob_match(
            "usr/bin/*lto-dump*",
            "usr/bin/x86_64-linux-gnu-lto-dump-12"
        ));
        assert!(glob_match(
            "usr/lib/gcc/x86_64-linux-gnu/*/lto1",
            "usr/lib/gcc/x86_64-linux-gnu/12/lto1"
        ));
        assert!(!glob_match(
            "usr/lib/gcc/x86_64-linux-gnu/*/lto1",
            "usr/lib/gcc/x86_64-linux-gnu/12/x/lto1"
        ));
        assert!(glob_match(
            "usr/lib/x86_64-linux-gnu/lib*san.so*",
            "usr/lib/x86_64-linux-gnu/libasan.so.8"
        ));
        assert!(!glob_match("usr/bin/gp-*", "usr/bin/gcc"));
        assert!(!glob_match("a*", "a/b"));
    }

    #[test]
    fn trimming_and_usr_links() {
        let mut t = Tree::new();
        for f in [
            "usr/share/doc/bash/README",
            "usr/share/man/man1/bash.1.gz",
            "usr/bin/bash",
            "usr/share/perl/x",
        ] {
            t.insert_file(f, Meta::root(0o644), b"x".to_vec())
                .expect("insert");
        }
        assert_eq!(trim(&mut t), 2);
        add_usr_links(&mut t).expect("links");
        assert!(t.lookup("usr/share/doc").is_none());
        assert!(t.lookup("usr/share/perl/x").is_some());
        assert!(
            matches!(t.lookup("bin"), Some(Node::Symlink { target, .. }) if target == b"usr/bin")
        );
        assert!(t.lookup("lib").is_none(), "no usr/lib, no /lib link");
    }
}
