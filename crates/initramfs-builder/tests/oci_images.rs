//! OCI images end to end: crafted layers in an OCI layout, pushed with `skopeo` to a real
//! `docker-registry` on loopback, pulled and flattened by `ensure_image`, and the initramfs parsed
//! back. Also: the same image from `oci:` and `docker-archive:`, hostile layers, corrupted blobs.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cloude_image::catalog::Catalog;
use cloude_image::image::{compress, cpio, ensure_image, BuildOptions};
use cloude_image::progress::Progress;
use sha2::{Digest, Sha256};

/// One `CLOUDE_HOME` for the whole test binary (the variable is process-wide).
fn home() -> &'static Path {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| {
        let d = tempfile::tempdir().expect("tempdir");
        std::env::set_var("CLOUDE_HOME", d.path());
        d
    })
    .path()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A tar layer from (raw path, kind, data or link target); kinds: d f l(symlink) h(hard link).
fn layer(entries: &[(&str, char, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(if *kind == 'd' { 0o755 } else { 0o644 });
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(match kind {
            'd' => tar::EntryType::Directory,
            'f' => tar::EntryType::Regular,
            'l' => tar::EntryType::Symlink,
            'h' => tar::EntryType::Link,
            _ => unreachable!(),
        });
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        let body: &[u8] = if *kind == 'f' { data.as_bytes() } else { b"" };
        if matches!(kind, 'l' | 'h') {
            h.set_link_name(data).expect("link name");
        }
        h.set_size(body.len() as u64);
        h.set_cksum();
        b.append(&h, body).expect("append");
    }
    b.into_inner().expect("tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// Writes an OCI image layout with `layers` (uncompressed tars, stored gzipped) tagged `tag`.
fn write_layout(dir: &Path, tag: &str, layers: &[Vec<u8>]) -> BTreeMap<String, PathBuf> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let mut files = BTreeMap::new();
    let mut put = |data: &[u8]| {
        let d = sha(data);
        let p = blobs.join(d.trim_start_matches("sha256:"));
        std::fs::write(&p, data).expect("blob");
        files.insert(d.clone(), p);
        (d, data.len())
    };
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for l in layers {
        diff_ids.push(sha(l));
        let (d, n) = put(&gzip(l));
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    });
    let (cd, cn) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
        "layers": descs
    });
    let (md, mn) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
            "size": mn, "annotations": {"org.opencontainers.image.ref.name": tag}}]
    });
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    files
}

/// Two layers: the second deletes `etc/gone` by whiteout and replaces `opt/app` opaquely.
fn merge_layers(salt: &str) -> Vec<Vec<u8>> {
    vec![
        layer(&[
            ("etc/", 'd', ""),
            ("etc/keep", 'f', salt),
            ("etc/gone", 'f', "to be deleted"),
            ("opt/", 'd', ""),
            ("opt/app/", 'd', ""),
            ("opt/app/old", 'f', "old"),
            ("opt/app/sub/", 'd', ""),
            ("opt/app/sub/old2", 'f', "old2"),
            ("usr/", 'd', ""),
            ("usr/bin/", 'd', ""),
            ("usr/bin/tool", 'f', "tool"),
            ("usr/bin/hard", 'h', "usr/bin/tool"),
            ("usr/bin/link", 'l', "tool"),
        ]),
        layer(&[
            ("etc/.wh.gone", 'f', ""),
            ("opt/app/.wh..wh..opq", 'f', ""),
            ("opt/app/new", 'f', "new"),
            ("etc/added", 'f', "added"),
        ]),
    ]
}

/// The merged view plus what the builder adds (`init`, `/dev`, mount points, passwd/group).
const EXPECTED: &[&str] = &[
    "dev",
    "dev/console",
    "dev/null",
    "etc",
    "etc/added",
    "etc/group",
    "etc/keep",
    "etc/passwd",
    "init",
    "opt",
    "opt/app",
    "opt/app/new",
    "proc",
    "root",
    "run",
    "sys",
    "tmp",
    "usr",
    "usr/bin",
    "usr/bin/hard",
    "usr/bin/link",
    "usr/bin/tool",
];

fn agent() -> PathBuf {
    let p = home().join("agent-standin");
    std::fs::write(&p, b"\x7fELF stand-in agent").expect("agent");
    p
}

fn build(from: &str, insecure: bool) -> Result<Vec<cpio::Entry>, String> {
    let cat = Catalog::default_catalog();
    let lang = cat.find("bash", None).expect("bash in catalogue");
    let opts = BuildOptions {
        from: Some(from.to_string()),
        insecure,
        output: None,
        agent: Some(agent()),
        limits: Default::default(),
    };
    let path = ensure_image(lang, &opts, &Progress::new(true)).map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(x) = src {
            s.push_str(&format!(": {x}"));
            src = x.source();
        }
        s
    })?;
    let raw = std::fs::read(&path).expect("read image");
    let cpio_bytes = compress::decompress(&raw).expect("decompress");
    Ok(cpio::parse(&cpio_bytes).expect("parse cpio"))
}

fn check_merged(entries: &[cpio::Entry], salt: &str) {
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, EXPECTED);
    let get = |n: &str| entries.iter().find(|e| e.name == n).expect(n);
    assert_eq!(get("etc/keep").data, salt.as_bytes());
    assert_eq!(get("opt/app/new").data, b"new");
    assert_eq!(get("init").data, b"\x7fELF stand-in agent");
    assert!(get("usr/bin/link").is_symlink());
    assert_eq!(get("usr/bin/link").data, b"tool");
    let (hard, tool) = (get("usr/bin/hard"), get("usr/bin/tool"));
    assert_eq!(
        (hard.ino, hard.nlink),
        (tool.ino, 2),
        "hard link shares the inode"
    );
    assert_eq!(hard.data, b"tool", "the first name carries the data");
    assert!(get("dev/console").is_char_device());
}

/// A `docker-registry` child on 127.0.0.1, killed on drop.
struct Registry {
    child: Child,
    port: u16,
    storage: tempfile::TempDir,
    _config: tempfile::NamedTempFile,
}

impl Registry {
    fn start() -> Option<Registry> {
        if !have("docker-registry") || !have("skopeo") {
            println!("SKIPPED: docker-registry and skopeo are needed (apt-get install docker-registry skopeo)");
            return None;
        }
        let storage = tempfile::tempdir().expect("storage");
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let mut config = tempfile::NamedTempFile::new().expect("config");
        write!(
            config,
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            storage.path().display()
        )
        .expect("write config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(config.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn docker-registry");
        let r = Registry {
            child,
            port,
            storage,
            _config: config,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(r)
    }

    fn push(&self, layout: &Path, tag: &str, repo: &str) -> String {
        let dest = format!("docker://127.0.0.1:{}/{repo}:{tag}", self.port);
        let out = Command::new("skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
            ])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(&dest)
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dest
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn registry_pull_gives_exactly_the_merged_view() {
    home();
    let Some(reg) = Registry::start() else { return };
    let dir = tempfile::tempdir().expect("layout dir");
    write_layout(dir.path(), "v1", &merge_layers("registry"));
    let reference = reg.push(dir.path(), "v1", "cloude/merge");
    let entries = build(&reference, true).expect("build from registry");
    check_merged(&entries, "registry");

    // Without --insecure the client insists on HTTPS, and says where it failed.
    let err = build(&reference, false).expect_err("https to a plain-HTTP registry");
    assert!(
        err.contains("network error") && err.contains(&format!("127.0.0.1:{}", reg.port)),
        "{err}"
    );
    // A missing tag is reported as such.
    let err = build(&reference.replace(":v1", ":nope"), true).expect_err("missing tag");
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn corrupted_registry_blob_fails_the_digest_check() {
    home();
    let Some(reg) = Registry::start() else { return };
    let dir = tempfile::tempdir().expect("layout dir");
    let layers = vec![layer(&[("data", 'f', "corrupt me please")])];
    write_layout(dir.path(), "v1", &layers);
    let reference = reg.push(dir.path(), "v1", "cloude/corrupt");
    // Flip bytes of the layer blob in the registry's storage (its `data` file).
    let layer_digest = sha(&gzip(&layers[0]));
    let hexd = layer_digest.trim_start_matches("sha256:");
    let data = reg
        .storage
        .path()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hexd[..2])
        .join(hexd)
        .join("data");
    let mut bytes = std::fs::read(&data).expect("stored blob");
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&data, bytes).expect("corrupt");
    let err = build(&reference, true).expect_err("corrupted blob");
    assert!(
        err.contains("digest mismatch") && err.contains(&layer_digest),
        "{err}"
    );
}

#[test]
fn oci_layout_and_docker_archive_give_the_merged_view() {
    home();
    let dir = tempfile::tempdir().expect("layout dir");
    write_layout(dir.path(), "v1", &merge_layers("layout"));
    let entries = build(&format!("oci:{}:v1", dir.path().display()), false).expect("oci layout");
    check_merged(&entries, "layout");
    let err = build(&format!("oci:{}:other", dir.path().display()), false).expect_err("wrong tag");
    assert!(err.contains("not found"), "{err}");

    if !have("skopeo") {
        println!("SKIPPED: docker-archive part needs skopeo");
        return;
    }
    let archive = dir.path().join("image.tar");
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet"])
        .arg(format!("oci:{}:v1", dir.path().display()))
        .arg(format!(
            "docker-archive:{}:cloude/merge:v1",
            archive.display()
        ))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries = build(&format!("docker-archive:{}", archive.display()), false).expect("archive");
    check_merged(&entries, "layout");
}

#[test]
fn hostile_layers_are_rejected_naming_the_entry() {
    home();
    for (entries, needle) in [
        (vec![("../escape", 'f', "x")], "../escape"),
        (vec![("/etc/abs", 'f', "x")], "/etc/abs"),
        (
            vec![("evil", 'l', "/"), ("evil/etc/shadow", 'f', "x")],
            "evil/etc/shadow",
        ),
        (vec![("up", 'l', "../../.."), ("up/x", 'f', "x")], "up/x"),
    ] {
        let dir = tempfile::tempdir().expect("layout dir");
        write_layout(dir.path(), "v1", &[layer(&entries)]);
        let err = build(&format!("oci:{}:v1", dir.path().display()), false).expect_err(needle);
        assert!(err.contains(needle) && err.contains("layer 1/1"), "{err}");
    }
}

#[test]
fn corrupted_layout_blob_fails_the_digest_check() {
    home();
    let dir = tempfile::tempdir().expect("layout dir");
    let files = write_layout(
        dir.path(),
        "v1",
        &[layer(&[("a", 'f', "layout corruption")])],
    );
    // Corrupt the layer blob (the only gzip one).
    let (digest, path) = files
        .iter()
        .find(|(_, p)| std::fs::read(p).is_ok_and(|b| b.starts_with(&[0x1f, 0x8b])))
        .expect("layer blob");
    let mut b = std::fs::read(path).expect("read");
    b.push(0);
    std::fs::write(path, b).expect("write");
    let err = build(&format!("oci:{}:v1", dir.path().display()), false).expect_err("corrupt");
    assert!(
        err.contains("digest mismatch") && err.contains(digest.as_str()),
        "{err}"
    );
}
