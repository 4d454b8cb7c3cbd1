//! Builds the python image from real Debian 12 packages and checks that its `post_build` step
//! precompiled the standard library: the `.pyc` files exist, are unchecked-hash pycs of their
//! sources, and Python loads them instead of compiling (run in a chroot of the unpacked image).
//!
//! Needs root (apt-get download, chroot, the post-build sandbox) and apt; without network or apt
//! sources it fails with the builder's message (it does not pass silently).

use std::path::{Path, PathBuf};
use std::process::Command;

use cloude_image::catalog::Catalog;
use cloude_image::image::{compress, cpio, ensure_image, BuildOptions};
use cloude_image::progress::Progress;

fn stand_in_agent() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn chroot_python(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new("chroot")
        .arg(root)
        .arg("/usr/bin/python3")
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        // As in the guest, where the program's user cannot write the stdlib's directories.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("chroot python3")
}

#[test]
fn python_image_has_valid_precompiled_stdlib() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: needs root (apt-get download, chroot, post-build sandbox)");
        return;
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        println!("SKIPPED: apt-get is not installed (not a Debian host)");
        return;
    }
    if Command::new("cpio").arg("--version").output().is_err() {
        println!("SKIPPED: no cpio tool to unpack the image for the chroot check");
        return;
    }
    let Some(agent) = stand_in_agent() else {
        println!(
            "SKIPPED: needs /bin/busybox as the stand-in agent (apt-get install busybox-static)"
        );
        return;
    };
    let shared_debs = cloude_image::paths::cloude_home().join("debs");
    let home = tempfile::tempdir().expect("home");
    std::fs::create_dir_all(&shared_debs).expect("debs dir");
    std::os::unix::fs::symlink(&shared_debs, home.path().join("debs")).expect("link debs");
    std::env::set_var("CLOUDE_HOME", home.path());

    let cat = Catalog::default_catalog();
    let lang = cat.find("python", None).expect("python");
    assert!(
        !lang.post_build.is_empty(),
        "the catalogue precompiles python"
    );
    let opts = BuildOptions {
        agent: Some(agent),
        ..Default::default()
    };
    let path = ensure_image(lang, &opts, &Progress::new(true))
        .unwrap_or_else(|e| panic!("building the python image failed: {e:?}"));
    // `<stem>.cpio.lz4` → `<stem>.json`
    let summary =
        std::fs::read_to_string(path.with_extension("").with_extension("json")).expect("summary");
    assert!(summary.contains("compileall"), "{summary}");

    let raw = compress::decompress(&std::fs::read(&path).expect("image")).expect("decompress");
    let entries = cpio::parse(&raw).expect("parse");
    let has = |n: &str| entries.iter().any(|e| e.name == n);
    let pycs = entries
        .iter()
        .filter(|e| e.name.ends_with(".cpython-311.pyc"))
        .count();
    assert!(pycs > 400, "only {pycs} pyc files");
    assert!(has(
        "usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc"
    ));
    assert!(has("usr/lib/python3.11/__pycache__/os.cpython-311.pyc"));
    for trimmed in [
        "usr/lib/python3.11/test/",
        "usr/lib/python3.11/idlelib/",
        "usr/bin/dpkg",
    ] {
        assert!(
            entries.iter().all(|e| !e.name.starts_with(trimmed)),
            "{trimmed} trimmed"
        );
    }
    assert!(has("usr/lib/python3.11/json/__init__.py"), "sources kept");

    let root = home.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let cpio_file = home.path().join("image.cpio");
    std::fs::write(&cpio_file, &raw).expect("write cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("cpio -idm --quiet < {}", cpio_file.display()))
        .current_dir(&root)
        .status()
        .expect("cpio");
    assert!(st.success());

    // Every pyc of these modules is an unchecked-hash pyc (flags 0b01) of its current source.
    let check = r#"
import importlib.util, sys
import json, re, collections, email.message, argparse, dataclasses
bad = []
n = 0
for name, m in list(sys.modules.items()):
    f = getattr(m, "__file__", None)
    if not f or not f.startswith("/usr/lib/python3.11/") or not f.endswith(".py"):
        continue
    pyc = importlib.util.cache_from_source(f)
    try:
        data = open(pyc, "rb").read()
    except OSError:
        bad.append("missing " + pyc)
        continue
    n += 1
    src = open(f, "rb").read()
    if data[:4] != importlib.util.MAGIC_NUMBER:
        bad.append("magic " + pyc)
    elif int.from_bytes(data[4:8], "little") != 1:
        bad.append("flags " + pyc)
    elif data[8:16] != importlib.util.source_hash(src):
        bad.append("hash " + pyc)
print(n, bad)
"#;
    let out = chroot_python(&root, &["-c", check]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let (n, bad) = stdout.trim().split_once(' ').expect("n bad");
    assert!(n.parse::<u32>().expect("count") >= 20, "{stdout}");
    assert_eq!(bad, "[]", "{stdout}");

    // And Python loads them: with -v, no stdlib module is compiled from its source.
    let out = chroot_python(&root, &["-v", "-c", "import json, re, email.message"]);
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    let from_pyc = log
        .lines()
        .filter(|l| {
            l.starts_with("# code object from '/usr/lib/python3.11/") && l.ends_with(".pyc'")
        })
        .count();
    let compiled: Vec<&str> = log
        .lines()
        // Compiled from source: `code object from PATH.py` (a pyc path is quoted).
        .filter(|l| l.starts_with("# code object from /usr/lib/python3.11/"))
        .collect();
    assert!(from_pyc >= 20, "{from_pyc} modules from pycs:\n{log}");
    assert!(compiled.is_empty(), "compiled from source: {compiled:?}");
}
