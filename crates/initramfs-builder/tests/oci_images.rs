//! OCI images end to end: crafted layers in an OCI layout, pushed with `skopeo` to a real
//! `docker-registry` on loopback, pulled and flattened by `ensure_image`, and the initramfs parsed
//! back. Also: the same image from `oci:` and `docker-archive:`, hostile layers, corrupted blobs.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cloude_image::catalog::Catalog;
use cloude_image::image::{compress, cpio, ensure_image, BuildOptions};
use cloude_image::progress::Progress;
use sha2::{Digest, Sha256};

/// One `CLOUDE_HOME` for the whole test binary (the variable is process-wide). A static is never
/// dropped, so it is a fixed directory under cargo's test scratch space, emptied at the start of
/// each run, rather than a temporary directory that every run would leave behind.
fn home() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oci-images-home");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("test home");
        std::env::set_var("CLOUDE_HOME", &d);
        d
    })
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
    let blobs: Vec<Blob> = layers
        .iter()
        .map(|l| Blob {
            data: gzip(l),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            diff_id: Some(sha(l)),
        })
        .collect();
    write_layout_blobs(dir, tag, &blobs, 0)
}

/// A layer blob exactly as stored (compressed or not).
struct Blob {
    data: Vec<u8>,
    media_type: &'static str,
    /// The uncompressed digest for the config's `diff_ids` (all layers have one, or none).
    diff_id: Option<String>,
}

/// Writes an OCI image layout of `layers` tagged `tag`; the config gets `config_pad` bytes of
/// padding.
fn write_layout_blobs(
    dir: &Path,
    tag: &str,
    layers: &[Blob],
    config_pad: usize,
) -> BTreeMap<String, PathBuf> {
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
    let diff_ids: Vec<String> = layers.iter().filter_map(|l| l.diff_id.clone()).collect();
    let mut descs = Vec::new();
    for l in layers {
        let (d, n) = put(&l.data);
        descs.push(serde_json::json!({"mediaType": l.media_type, "digest": d, "size": n}));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "padding": " ".repeat(config_pad),
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
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            let p = home().join("agent-standin");
            std::fs::write(&p, b"\x7fELF stand-in agent").expect("agent");
            p
        })
        .clone()
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

impl Registry {
    /// Uploads a blob through the registry API (monolithic upload), bypassing skopeo's checks.
    fn put_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha(data);
        let base = format!("http://127.0.0.1:{}", self.port);
        let resp = ureq::post(&format!("{base}/v2/{repo}/blobs/uploads/"))
            .call()
            .expect("start upload");
        let location = resp
            .header("location")
            .expect("upload location")
            .to_string();
        let url = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        ureq::put(&format!("{url}{sep}digest={digest}"))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(data)
            .expect("upload blob");
        digest
    }

    /// Puts an OCI image manifest of `config` and gzip `layers` as `repo:tag`; returns its
    /// reference.
    fn put_image(&self, repo: &str, tag: &str, config: &[u8], layers: &[Vec<u8>]) -> String {
        let cd = self.put_blob(repo, config);
        let descs: Vec<_> = layers
            .iter()
            .map(|l| {
                let d = self.put_blob(repo, l);
                serde_json::json!({"mediaType": GZIP_LAYER, "digest": d, "size": l.len()})
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd,
                "size": config.len()},
            "layers": descs
        });
        ureq::put(&format!(
            "http://127.0.0.1:{}/v2/{repo}/manifests/{tag}",
            self.port
        ))
        .set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .send_string(&manifest.to_string())
        .expect("put manifest");
        format!("docker://127.0.0.1:{}/{repo}:{tag}", self.port)
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

// ---- Hostile registries and images: each attack driven for real, figures printed ----

const MIB: u64 = 1 << 20;
const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// What one run of the `cloude-image` binary did.
struct Run {
    /// Its error message (`None` when the build succeeded).
    err: Option<String>,
    secs: f64,
    /// Peak resident set of the builder process: the last `VmHWM` of `/proc/PID/status` seen
    /// (sampled every 5 ms; the high-water mark only grows, so this misses at most the last few
    /// milliseconds). `ru_maxrss` would not do: it keeps what the forked child mapped of the test
    /// process before `exec`.
    peak_rss_mib: f64,
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `cloude-image build bash --from REFERENCE --insecure` as a child (so that its peak RSS
/// is its own) with a `CLOUDE_HOME` of its own (removed afterwards: its blobs and image can be
/// hundreds of MiB), killing it after `timeout`.
fn run_builder(reference: &str, extra: &[&str], timeout: Duration) -> Run {
    let own_home = tempfile::tempdir().expect("CLOUDE_HOME");
    let mut stderr = tempfile::tempfile().expect("stderr file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloude-image"))
        .args([
            "--quiet",
            "build",
            "bash",
            "--insecure",
            "--from",
            reference,
        ])
        .arg("--agent")
        .arg(agent())
        .args(extra)
        .env("CLOUDE_HOME", own_home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.try_clone().expect("dup"))
        .spawn()
        .expect("spawn cloude-image");
    let started = Instant::now();
    let mut hwm_kib = 0;
    let status = loop {
        if let Some(k) = vm_hwm_kib(child.id()) {
            hwm_kib = hwm_kib.max(k);
        }
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cloude-image still ran after {timeout:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let secs = started.elapsed().as_secs_f64();
    let mut text = String::new();
    stderr.rewind().expect("rewind");
    stderr.read_to_string(&mut text).expect("stderr");
    Run {
        err: (!status.success()).then_some(text),
        secs,
        peak_rss_mib: hwm_kib as f64 / 1024.0,
    }
}

/// Writes `blobs` as a one-image layout and pushes it as `repo:v1`.
fn push_blobs(reg: &Registry, repo: &str, blobs: &[Blob], config_pad: usize) -> String {
    let dir = tempfile::tempdir().expect("layout dir");
    write_layout_blobs(dir.path(), "v1", blobs, config_pad);
    reg.push(dir.path(), "v1", repo)
}

/// `total` bytes of zeros as concatenated gzip members (one 64 MiB member, repeated): about a
/// thousandth of `total`.
fn gzip_zeros(total: u64) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&vec![0u8; (64 * MIB) as usize]).expect("gzip");
    let member = e.finish().expect("gzip");
    member.repeat((total / (64 * MIB)) as usize)
}

/// `total` bytes of zeros as concatenated zstd frames.
fn zstd_zeros(total: u64) -> Vec<u8> {
    let frame = zstd::encode_all(&vec![0u8; (64 * MIB) as usize][..], 3).expect("zstd");
    frame.repeat((total / (64 * MIB)) as usize)
}

/// Pseudo-random, incompressible bytes (xorshift).
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A tar entry header of any type, mode, owner and size (raw name, for hostile entries).
fn header(path: &str, ty: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(ty);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_cksum();
    h
}

fn report(test: &str, what: &str, run: &Run) {
    eprintln!(
        "FIGURES {test}: {what}: {} in {:.2} s, peak RSS {:.1} MiB",
        if run.err.is_some() {
            "refused"
        } else {
            "built"
        },
        run.secs,
        run.peak_rss_mib
    );
}

#[test]
fn registry_whiteout_flood_hits_the_entry_cap() {
    home();
    let Some(reg) = Registry::start() else { return };
    const WHITEOUTS: usize = 300_000;
    const CAP: &str = "200000";
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..WHITEOUTS {
        let h = header(&format!("d/.wh.f{i:07}"), tar::EntryType::Regular, 0o644, 0);
        b.append(&h, std::io::empty()).expect("append");
    }
    let tar = b.into_inner().expect("tar");
    let blob = Blob {
        data: gzip(&tar),
        media_type: GZIP_LAYER,
        diff_id: Some(sha(&tar)),
    };
    let reference = push_blobs(&reg, "cloude/whiteouts", &[blob], 0);
    let run = run_builder(
        &reference,
        &["--max-entries", CAP],
        Duration::from_secs(120),
    );
    report(
        "registry_whiteout_flood_hits_the_entry_cap",
        &format!("{WHITEOUTS} whiteouts, --max-entries {CAP}"),
        &run,
    );
    let err = run.err.expect("the whiteout flood must be refused");
    assert!(
        err.contains("MAX_ENTRIES (200000 entries)") && err.contains("d/.wh.f0200000"),
        "{err}"
    );
    assert!(run.secs < 20.0, "took {:.1} s", run.secs);
}

#[test]
fn registry_bomb_after_the_tar_end_is_never_decompressed() {
    home();
    let Some(reg) = Registry::start() else { return };
    const BOMB: u64 = 10 << 30;
    let small = layer(&[("hello", 'f', "world")]);
    let gz = [gzip(&small), gzip_zeros(BOMB)].concat();
    let zs = [
        zstd::encode_all(&small[..], 3).expect("zstd"),
        zstd_zeros(BOMB),
    ]
    .concat();
    for (name, data, media_type) in [("gzip", gz, GZIP_LAYER), ("zstd", zs, ZSTD_LAYER)] {
        let size = data.len();
        let blob = Blob {
            data,
            media_type,
            diff_id: None,
        };
        let reference = push_blobs(&reg, &format!("cloude/trailing-{name}"), &[blob], 0);
        let run = run_builder(&reference, &[], Duration::from_secs(120));
        report(
            "registry_bomb_after_the_tar_end_is_never_decompressed",
            &format!(
                "{name}: 1 small tar + 10 GiB of zeros after its end ({:.1} MiB blob)",
                size as f64 / MIB as f64
            ),
            &run,
        );
        let err = run.err.expect("trailing bomb refused");
        assert!(
            err.contains("MAX_TRAILING_BYTES (1048576 bytes)") && err.contains("layer 1/1"),
            "{err}"
        );
        assert!(run.secs < 10.0, "{name}: took {:.1} s", run.secs);
        assert!(
            run.peak_rss_mib < 96.0,
            "{name}: {:.1} MiB",
            run.peak_rss_mib
        );
    }
}

#[test]
fn registry_layer_content_bombs_fail_at_their_caps() {
    home();
    let Some(reg) = Registry::start() else { return };
    let test = "registry_layer_content_bombs_fail_at_their_caps";

    // 1. One file declaring 10 GiB of zeros (really followed by them): refused from its header
    //    under the production caps, nothing decompressed.
    let huge = 10u64 << 30;
    let h = header("zeros", tar::EntryType::Regular, 0o644, huge);
    let data = [gzip(h.as_bytes()), gzip_zeros(huge), gzip(&[0u8; 1024])].concat();
    let blob = Blob {
        data,
        media_type: GZIP_LAYER,
        diff_id: None,
    };
    let reference = push_blobs(&reg, "cloude/hugefile", &[blob], 0);
    let run = run_builder(&reference, &[], Duration::from_secs(120));
    report(test, "one 10 GiB file of zeros, default caps", &run);
    let err = run.err.expect("huge file refused");
    assert!(
        err.contains("MAX_TOTAL_BYTES (8589934592 bytes of file data)")
            && err.contains("\"zeros\""),
        "{err}"
    );
    assert!(
        run.secs < 10.0 && run.peak_rss_mib < 96.0,
        "{:.1} s",
        run.secs
    );

    // 2. 600 files of 1 MiB of zeros against a 256 MiB stream cap: read up to the cap, no further.
    let mut b = tar::Builder::new(Vec::new());
    let mib = vec![0u8; MIB as usize];
    for i in 0..600 {
        let h = header(&format!("z{i:04}"), tar::EntryType::Regular, 0o644, MIB);
        b.append(&h, &mib[..]).expect("append");
    }
    let tar = b.into_inner().expect("tar");
    let blob = Blob {
        data: gzip(&tar),
        media_type: GZIP_LAYER,
        diff_id: Some(sha(&tar)),
    };
    drop(tar);
    let reference = push_blobs(&reg, "cloude/manyzeros", &[blob], 0);
    let cap = (256 * MIB).to_string();
    let run = run_builder(
        &reference,
        &["--max-uncompressed-bytes", &cap],
        Duration::from_secs(120),
    );
    report(
        test,
        "600 x 1 MiB of zeros, --max-uncompressed-bytes 256 MiB",
        &run,
    );
    let err = run.err.expect("stream cap");
    assert!(
        err.contains("MAX_STREAM_BYTES (268435456 bytes of uncompressed layers)"),
        "{err}"
    );
    assert!(run.secs < 20.0, "took {:.1} s", run.secs);
    assert!(
        run.peak_rss_mib < 256.0 + 128.0,
        "{:.1} MiB",
        run.peak_rss_mib
    );

    // 3. 300,000 empty files (150 MiB of headers) against a 64 MiB stream cap.
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..300_000 {
        let h = header(&format!("e/{i:07}"), tar::EntryType::Regular, 0o644, 0);
        b.append(&h, std::io::empty()).expect("append");
    }
    let tar = b.into_inner().expect("tar");
    let blob = Blob {
        data: gzip(&tar),
        media_type: GZIP_LAYER,
        diff_id: Some(sha(&tar)),
    };
    let reference = push_blobs(&reg, "cloude/tinyfiles", &[blob], 0);
    let cap = (64 * MIB).to_string();
    let run = run_builder(
        &reference,
        &["--max-uncompressed-bytes", &cap],
        Duration::from_secs(120),
    );
    report(
        test,
        "300,000 empty files, --max-uncompressed-bytes 64 MiB",
        &run,
    );
    let err = run.err.expect("stream cap");
    assert!(err.contains("MAX_STREAM_BYTES (67108864"), "{err}");
    assert!(
        run.secs < 20.0 && run.peak_rss_mib < 160.0,
        "{:.1} s",
        run.secs
    );
}

#[test]
fn registry_big_blobs_are_streamed_not_held_in_memory() {
    home();
    let Some(reg) = Registry::start() else { return };
    let test = "registry_big_blobs_are_streamed_not_held_in_memory";
    const BIG: usize = 320 << 20;
    // 1. A 320 MiB incompressible file: the tree holds it (images are built in memory), the
    //    blob must not be held beside it (that alone would be another 320 MiB).
    let mut b = tar::Builder::new(Vec::new());
    let h = header("big.bin", tar::EntryType::Regular, 0o644, BIG as u64);
    b.append(&h, &noise(BIG)[..]).expect("append");
    let tar = b.into_inner().expect("tar");
    let blob = Blob {
        diff_id: Some(sha(&tar)),
        data: tar,
        media_type: TAR_LAYER,
    };
    let reference = push_blobs(&reg, "cloude/bigfile", &[blob], 0);
    let run = run_builder(&reference, &[], Duration::from_secs(300));
    report(test, "a 320 MiB blob holding one 320 MiB file", &run);
    assert!(run.err.is_none(), "{:?}", run.err);
    assert!(
        run.peak_rss_mib < 320.0 + 160.0,
        "peak RSS {:.1} MiB: the blob was held in memory",
        run.peak_rss_mib
    );

    // 2. A 320 MiB blob whose bulk the builder skips (a pax global header's body): it must be
    //    built in far less memory than the blob's size.
    let mut b = tar::Builder::new(Vec::new());
    let h = header(
        "pax_global_header",
        tar::EntryType::XGlobalHeader,
        0o644,
        BIG as u64,
    );
    b.append(&h, &noise(BIG)[..]).expect("append");
    let h = header("small", tar::EntryType::Regular, 0o644, 5);
    b.append(&h, &b"small"[..]).expect("append");
    let tar = b.into_inner().expect("tar");
    let blob = Blob {
        diff_id: Some(sha(&tar)),
        data: tar,
        media_type: TAR_LAYER,
    };
    let reference = push_blobs(&reg, "cloude/bigskip", &[blob], 0);
    let run = run_builder(&reference, &[], Duration::from_secs(300));
    report(test, "a 320 MiB blob of mostly skipped bytes", &run);
    assert!(run.err.is_none(), "{:?}", run.err);
    assert!(
        run.peak_rss_mib < 96.0,
        "peak RSS {:.1} MiB",
        run.peak_rss_mib
    );
}

/// A loopback HTTP server answering every request with `headers` and then an endless body of
/// spaces; counts the bytes it managed to send.
fn endless_server(headers: &'static str) -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&sent);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
            let mut req = [0u8; 4096];
            let _ = std::io::Read::read(&mut conn, &mut req);
            if conn.write_all(headers.as_bytes()).is_err() {
                continue;
            }
            let chunk = vec![b' '; 1 << 16];
            // Never more than 1 GiB, should the client not stop.
            for _ in 0..(1 << 14) {
                if conn.write_all(&chunk).is_err() {
                    break;
                }
                counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    (port, sent)
}

#[test]
fn oversized_manifests_and_configs_are_refused_unread() {
    home();
    let test = "oversized_manifests_and_configs_are_refused_unread";
    // 1. A registry streaming an endless manifest (no Content-Length), then one declaring 5 GiB.
    for (name, headers) in [
        (
            "endless manifest body",
            "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n",
        ),
        (
            "manifest with Content-Length 5 GiB",
            "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 5368709120\r\nConnection: close\r\n\r\n",
        ),
    ] {
        let (port, sent) = endless_server(headers);
        let started = Instant::now();
        let err = build(&format!("docker://127.0.0.1:{port}/cloude/endless:v1"), true)
            .expect_err(name);
        let secs = started.elapsed().as_secs_f64();
        let sent_mib = sent.load(std::sync::atomic::Ordering::SeqCst) as f64 / MIB as f64;
        eprintln!("FIGURES {test}: {name}: refused in {secs:.2} s, {sent_mib:.1} MiB sent by the server");
        assert!(err.contains("MAX_MANIFEST_BYTES (4194304 bytes)"), "{err}");
        assert!(secs < 5.0, "{name}: {secs:.1} s");
        assert!(sent_mib < 64.0, "{name}: the client read on ({sent_mib:.1} MiB)");
    }

    // 2. A 5 MiB image config from a real registry (put through its API: skopeo itself refuses
    //    such a config): refused from its descriptor, unread.
    if let Some(reg) = Registry::start() {
        let l = layer(&[("a", 'f', "a")]);
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha(&l)]},
            "padding": " ".repeat((5 * MIB) as usize),
        });
        let reference = reg.put_image(
            "cloude/bigconfig",
            "v1",
            config.to_string().as_bytes(),
            &[gzip(&l)],
        );
        let started = Instant::now();
        let err = build(&reference, true).expect_err("5 MiB config");
        let secs = started.elapsed().as_secs_f64();
        eprintln!("FIGURES {test}: 5 MiB image config from the registry: refused in {secs:.2} s");
        assert!(
            err.contains("image config") && err.contains("MAX_MANIFEST_BYTES (4194304 bytes)"),
            "{err}"
        );
        assert!(secs < 5.0, "{secs:.1} s");
    }

    // 3. A docker-archive whose manifest.json is 64 MiB: refused from its tar header, unread.
    let dir = tempfile::tempdir().expect("dir");
    let archive = dir.path().join("big-manifest.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&archive).expect("archive"));
    let size = 64 * MIB;
    let h = header("manifest.json", tar::EntryType::Regular, 0o644, size);
    b.append(&h, std::io::repeat(b' ').take(size))
        .expect("append");
    b.finish().expect("finish");
    let started = Instant::now();
    let err = build(&format!("docker-archive:{}", archive.display()), false).expect_err("archive");
    let secs = started.elapsed().as_secs_f64();
    eprintln!("FIGURES {test}: docker-archive with a 64 MiB manifest.json: refused in {secs:.2} s");
    assert!(
        err.contains("manifest.json") && err.contains("MAX_MANIFEST_BYTES (4194304 bytes)"),
        "{err}"
    );
    assert!(secs < 5.0, "{secs:.1} s");
}

#[test]
fn set_id_bits_and_device_nodes_never_reach_the_image() {
    home();
    let Some(reg) = Registry::start() else { return };
    use tar::EntryType as T;
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, ty: T, mode: u32, data: &[u8], dev: Option<(u32, u32)>| {
        let mut h = header(path, ty, mode, data.len() as u64);
        if let Some((ma, mi)) = dev {
            h.set_device_major(ma).expect("major");
            h.set_device_minor(mi).expect("minor");
        }
        if ty == T::Link {
            h.set_link_name("bin/rootshell").expect("link");
        }
        h.set_cksum();
        b.append(&h, data).expect("append");
    };
    add("bin/", T::Directory, 0o755, b"", None);
    add(
        "bin/rootshell",
        T::Regular,
        0o4755,
        b"\x7fELF setuid root",
        None,
    );
    add(
        "bin/groupshell",
        T::Regular,
        0o2755,
        b"\x7fELF setgid",
        None,
    );
    add("bin/both", T::Regular, 0o6711, b"\x7fELF both", None);
    add("bin/hardlinked", T::Link, 0o4755, b"", None);
    add("dev/", T::Directory, 0o755, b"", None);
    add("dev/mem", T::Char, 0o666, b"", Some((1, 1)));
    add("dev/sda", T::Block, 0o666, b"", Some((8, 0)));
    // A device posing as the console: it must not survive as it is.
    add("dev/console", T::Char, 0o666, b"", Some((1, 1)));
    add("run/", T::Directory, 0o755, b"", None);
    add("run/pipe", T::Fifo, 0o644, b"", None);
    add("shared/", T::Directory, 0o2775, b"", None);
    let tar = b.into_inner().expect("tar");
    let blob = Blob {
        data: gzip(&tar),
        media_type: GZIP_LAYER,
        diff_id: Some(sha(&tar)),
    };
    let reference = push_blobs(&reg, "cloude/setid", &[blob], 0);
    let entries = build(&reference, true).expect("build");
    let get = |n: &str| {
        entries
            .iter()
            .find(|e| e.name == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    for e in &entries {
        let kind = e.mode & cpio::S_IFMT;
        if kind == 0o020_000 || kind == 0o060_000 {
            let ours = (e.name == "dev/console" && e.rdev == (5, 1))
                || (e.name == "dev/null" && e.rdev == (1, 3));
            assert!(
                ours,
                "device node {} {:?} reached the image",
                e.name, e.rdev
            );
        }
        if kind != 0o040_000 {
            assert_eq!(
                e.mode & 0o6000,
                0,
                "{} keeps set-id bits ({:o})",
                e.name,
                e.mode
            );
        }
    }
    assert!(entries
        .iter()
        .all(|e| e.name != "dev/mem" && e.name != "dev/sda"));
    assert_eq!(get("bin/rootshell").mode & 0o7777, 0o755);
    assert_eq!(get("bin/groupshell").mode & 0o7777, 0o755);
    assert_eq!(get("bin/both").mode & 0o7777, 0o711);
    let (a, b) = (get("bin/rootshell"), get("bin/hardlinked"));
    assert_eq!(
        (a.ino, a.nlink),
        (b.ino, 2),
        "the hard link survives, bits cleared"
    );
    assert_eq!(
        get("dev/console").rdev,
        (5, 1),
        "the builder's console, not the image's"
    );
    assert_eq!(
        get("run/pipe").mode & cpio::S_IFMT,
        0o010_000,
        "FIFOs are kept"
    );
    assert_eq!(
        get("shared").mode & 0o7777,
        0o2775,
        "set-gid directories are kept"
    );
    eprintln!(
        "FIGURES set_id_bits_and_device_nodes_never_reach_the_image: 3 device nodes removed, 3 set-id files cleared"
    );
}
