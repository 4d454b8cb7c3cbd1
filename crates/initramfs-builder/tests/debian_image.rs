//! Builds the bash image from real Debian 12 packages (through the host's apt configuration)
//! and checks its contents; runs bash from it in a chroot.
//!
//! Needs root (apt-get download as root, chroot) and apt; without network or apt sources it
//! fails with the builder's message (it does not pass silently).

use std::path::PathBuf;
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

#[test]
fn bash_image_from_debian_packages() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: needs root (apt-get download, chroot)");
        return;
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        println!("SKIPPED: apt-get is not installed (not a Debian host)");
        return;
    }
    let Some(agent) = stand_in_agent() else {
        println!(
            "SKIPPED: needs /bin/busybox as the stand-in agent (apt-get install busybox-static)"
        );
        return;
    };
    // A private CLOUDE_HOME sharing the host's .deb cache (downloads are slow, builds are not).
    let shared_debs = cloude_image::paths::cloude_home().join("debs");
    let home = tempfile::tempdir().expect("home");
    std::fs::create_dir_all(&shared_debs).expect("debs dir");
    std::os::unix::fs::symlink(&shared_debs, home.path().join("debs")).expect("link debs");
    std::env::set_var("CLOUDE_HOME", home.path());

    let cat = Catalog::default_catalog();
    let lang = cat.find("bash", None).expect("bash");
    let out = home.path().join("copy.cpio.lz4");
    let opts = BuildOptions {
        agent: Some(agent.clone()),
        output: Some(out.clone()),
        ..Default::default()
    };
    let path = match ensure_image(lang, &opts, &Progress::new(true)) {
        Ok(p) => p,
        Err(e) => panic!(
            "building the bash image failed (network/apt problem?): {e}: {:?}",
            std::error::Error::source(&e).map(ToString::to_string)
        ),
    };
    assert!(
        path.starts_with(home.path().join("images")),
        "{}",
        path.display()
    );
    assert_eq!(
        std::fs::read(&out).expect("copy"),
        std::fs::read(&path).expect("image")
    );
    // A second call reuses the cached image.
    let again = ensure_image(lang, &opts, &Progress::new(true)).expect("cached");
    assert_eq!(again, path);

    let raw = std::fs::read(&path).expect("read");
    let entries = cpio::parse(&compress::decompress(&raw).expect("decompress")).expect("parse");
    let get = |n: &str| entries.iter().find(|e| e.name == n);
    // The agent, stripped of symbols when `strip` is available.
    let init = get("init").expect("init");
    assert!(init.data.starts_with(b"\x7fELF") && init.mode & 0o777 == 0o755);
    assert!(init.data.len() <= std::fs::read(&agent).expect("agent").len());
    let bash = get("usr/bin/bash").expect("usr/bin/bash");
    assert!(bash.is_file() && bash.mode & 0o111 != 0);
    let bin = get("bin").expect("bin");
    assert!(bin.is_symlink() && bin.data == b"usr/bin");
    assert!(get("usr/bin/ls").is_some(), "coreutils");
    assert!(get("usr/lib/x86_64-linux-gnu/libc.so.6").is_some());
    assert!(get("dev/console").is_some_and(|e| e.is_char_device()));
    for trimmed in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
        "var/lib/dpkg",
    ] {
        assert!(
            entries.iter().all(|e| !e.name.starts_with(trimmed)),
            "{trimmed} trimmed"
        );
    }
    assert!(
        raw.len() < 24 << 20,
        "bash image is small ({} bytes)",
        raw.len()
    );

    // The image works: unpack it with the host's cpio and run bash in a chroot.
    if Command::new("cpio").arg("--version").output().is_err() {
        println!("SKIPPED (partly): no cpio tool to unpack the image for the chroot check");
        return;
    }
    let root = home.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let cpio_file = home.path().join("image.cpio");
    std::fs::write(&cpio_file, compress::decompress(&raw).expect("decompress"))
        .expect("write cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("cpio -id --quiet < {}", cpio_file.display()))
        .current_dir(&root)
        .status()
        .expect("cpio");
    assert!(st.success());
    let out = Command::new("chroot")
        .arg(&root)
        .args(["/bin/bash", "-c", "echo $((6*7)) $(ls /usr/bin/bash)"])
        .output()
        .expect("chroot");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42 /usr/bin/bash",
        "{:?}",
        out
    );
}
