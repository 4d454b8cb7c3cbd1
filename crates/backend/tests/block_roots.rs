//! Block-device language roots end to end (real server, real QEMU VMs under this host's driver,
//! real EROFS images built by `cloude-image`): the root is read-only for guest root too (a raw
//! write, and a write after clearing the kernel's read-only flag, both fail and the image file
//! is unchanged), the overlay takes writes that vanish with the VM, many VMs read one image file
//! at once (one inode on the host), the language suite gives the same answers on both formats,
//! an initramfs that cannot fit its VM is refused with its sizes named, and a JDK whose root is
//! most of its VM's memory runs from a block root.

use cloude_testkit as support;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use support::Server;

const FIRST_START: Duration = Duration::from_secs(3600);

/// A root-run Python (the attack needs guest root).
const ROOT_PYTHON: &str = r#"
[[language]]
name = "python-root"
file = "main.py"
run = ["python3", "main.py"]
debian_packages = ["python3"]
memory_mib = 256
run_as_root = true
"#;

/// Python in a VM too small for its initramfs (fits as a block root).
const SMALL_PYTHON: &str = r#"
[[language]]
name = "python-small"
file = "main.py"
run = ["python3", "main.py"]
debian_packages = ["python3"]
memory_mib = 128
"#;

/// Guest root attacks its root device, then writes through the overlay. Prints JSON.
const ATTACK: &str = r#"
import errno, fcntl, json, mmap, os, sys, time
r = {}
r['root_mount'] = open('/proc/mounts').readline().split()[:3]
r['ro_flag'] = open('/sys/block/vda/ro').read().strip()
MARK = '/usr/lib/cloude-overlay-mark'
r['leftover'] = os.path.exists(MARK)
buf = mmap.mmap(-1, 4096)
buf.write(b'\xee' * 4096)
try:
    fd = os.open('/dev/vda', os.O_WRONLY)
    os.write(fd, b'\xee' * 4096)
    os.fsync(fd)
    r['raw_write'] = 'written'
except OSError as e:
    r['raw_write'] = errno.errorcode.get(e.errno, str(e.errno))
# Clear the guest kernel's read-only flag (BLKROSET) and write around its page cache: only the
# device itself can refuse now.
BLKROSET = 0x125d
try:
    fd = os.open('/dev/vda', os.O_RDONLY)
    fcntl.ioctl(fd, BLKROSET, b'\0\0\0\0')
    os.close(fd)
    r['roset'] = open('/sys/block/vda/ro').read().strip()
    fd = os.open('/dev/vda', os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    os.write(fd, buf)
    r['forced_write'] = 'written'
except OSError as e:
    r['forced_write'] = errno.errorcode.get(e.errno, str(e.errno))
with open(MARK, 'w') as f:
    f.write('mine')
r['overlay'] = open(MARK).read()
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
print(json.dumps(r))
"#;

fn exec(s: &Server, body: Value) -> (u16, Value) {
    let r = s.post("/v1/executions", &body);
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| json!({ "raw": r.text() }));
    (r.status, v)
}

fn images_dir() -> PathBuf {
    cloude_image::paths::images_dir()
}

/// The newest block root of `language` in the cache.
fn root_image(language: &str) -> PathBuf {
    cloude_image::image::cached_block_image(language)
        .unwrap_or_else(|| panic!("no block image of {language} in {}", images_dir().display()))
        .root
}

fn sha256(p: &std::path::Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(p).expect("read image");
    sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How many of the process's descriptors are the same file as `target`.
fn open_inodes(pid: u32, target: &std::fs::Metadata) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.flatten()
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .filter(|m| m.dev() == target.dev() && m.ino() == target.ino())
        .count()
}

#[test]
fn block_roots_are_read_only_shared_and_overlaid() {
    let (_cat, cat_path) = support::test_catalog(ROOT_PYTHON);
    let config = "[vm]\nprebuild = [\"python-root\"]\n[images]\nformat = \"block\"\n\
                  [snapshot]\nenabled = false\n[limits]\nmax_concurrent_vms = 4\n";
    let server = Server::start(
        &["--hypervisor", "qemu", "--catalog", &cat_path],
        Some(config),
        FIRST_START,
    )
    .unwrap_or_else(|e| panic!("block roots: {e}"));
    let langs = server.get("/v1/languages").json();
    let entry = langs["languages"]
        .as_array()
        .and_then(|a| a.iter().find(|l| l["name"] == "python-root"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(entry["image_format"], "block", "{langs}");

    let image = root_image("python-root");
    let before = sha256(&image);
    let image_meta = std::fs::metadata(&image).expect("image metadata");
    assert_eq!(
        image_meta.mode() & 0o222,
        0,
        "the root image is read-only on the host too"
    );

    // Four VMs at once on the one image; while they run, every hypervisor has the same file
    // open (one inode: one copy in the host's page cache).
    let (answers, sharing): (Vec<(u16, Value)>, Vec<usize>) = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                sc.spawn(|| {
                    exec(
                        &server,
                        json!({"language": "python-root", "code": ATTACK, "args": ["4"],
                               "timeout_ms": 60000}),
                    )
                })
            })
            .collect();
        let mut sharing = Vec::new();
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(120) {
            let hv: Vec<u32> = server
                .children()
                .into_iter()
                .flat_map(|p| {
                    let mut v = vec![p];
                    v.extend(support::children_of(p));
                    v
                })
                .collect();
            let counts: Vec<usize> = hv
                .iter()
                .map(|p| open_inodes(*p, &image_meta))
                .filter(|n| *n > 0)
                .collect();
            if counts.len() > sharing.len() {
                sharing = counts;
            }
            if sharing.len() >= 4 || handles.iter().all(|h| h.is_finished()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let answers = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        (answers, sharing)
    });
    assert!(
        sharing.len() >= 2,
        "several hypervisors had the one image file open at once: {sharing:?}"
    );
    for (st, v) in &answers {
        assert_eq!(*st, 200, "{v}");
        assert_eq!(v["status"], "ok", "{v}");
        let r: Value = serde_json::from_str(v["stdout"].as_str().unwrap_or(""))
            .unwrap_or_else(|e| panic!("the attack printed no JSON ({e}): {v}"));
        assert_eq!(r["root_mount"], json!(["overlay", "/", "overlay"]), "{r}");
        assert_eq!(r["ro_flag"], "1", "the guest sees a read-only disk: {r}");
        assert_ne!(r["raw_write"], "written", "{r}");
        // BLKROSET only clears the partition's flag: the disk's (from the device's RO
        // feature) stays, so the guest kernel refuses the write before the device sees it.
        assert!(r["roset"].is_string(), "BLKROSET was tried: {r}");
        assert_ne!(
            r["forced_write"], "written",
            "the device itself refuses writes: {r}"
        );
        assert_eq!(r["overlay"], "mine", "the overlay takes writes: {r}");
        assert_eq!(r["leftover"], false, "a fresh overlay per VM: {r}");
    }
    // One more VM after them: nothing of theirs is left.
    let (st, v) = exec(&server, json!({"language": "python-root", "code": ATTACK}));
    assert_eq!(st, 200, "{v}");
    let r: Value = serde_json::from_str(v["stdout"].as_str().unwrap_or("")).expect("json");
    assert_eq!(r["leftover"], false, "{r}");
    assert_eq!(sha256(&image), before, "the image file is unchanged");
    drop(server);
}

const HELLO: &[(&str, &str, &str)] = &[
    ("python", "import sys; print('hello', sys.argv[1:])", "hello ['a']\n"),
    (
        "javascript",
        "console.log('hello', process.argv.slice(2))",
        "hello [ 'a' ]\n",
    ),
    ("bash", "echo hello \"$@\"; wc -c <<< abc", "hello a\n4\n"),
    (
        "c",
        "#include <stdio.h>\nint main(int c, char **v){printf(\"hello %s\\n\", v[1]);}",
        "hello a\n",
    ),
    (
        "cpp",
        "#include <iostream>\nint main(int c, char **v){std::cout << \"hello \" << v[1] << std::endl;}",
        "hello a\n",
    ),
];

#[test]
fn the_language_suite_answers_the_same_on_both_formats() {
    let mut seen = Vec::new();
    for format in ["initramfs", "block"] {
        let config = format!(
            "[vm]\nprebuild = [\"python\", \"javascript\", \"bash\", \"c\", \"cpp\"]\n\
             [images]\nformat = \"{format}\"\n[snapshot]\nenabled = false\n\
             [limits]\nmax_concurrent_vms = 2\n"
        );
        let server = Server::start(&["--hypervisor", "qemu"], Some(&config), FIRST_START)
            .unwrap_or_else(|e| panic!("{format}: {e}"));
        let outputs: Vec<(String, u16, Value)> = std::thread::scope(|sc| {
            let hs: Vec<_> = HELLO
                .iter()
                .map(|(lang, code, _)| {
                    let server = &server;
                    sc.spawn(move || {
                        let (st, v) = exec(
                            server,
                            json!({"language": lang, "code": code, "args": ["a"],
                                   "timeout_ms": 60000, "compile_timeout_ms": 60000}),
                        );
                        (lang.to_string(), st, v)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        for ((lang, st, v), (_, _, want)) in outputs.iter().zip(HELLO) {
            assert_eq!(*st, 200, "{format} {lang}: {v}");
            assert_eq!(v["stdout"], *want, "{format} {lang}: {v}");
            assert_eq!(v["status"], "ok", "{format} {lang}: {v}");
            seen.push((format, lang.clone()));
        }
        let langs = server.get("/v1/languages").json();
        for l in langs["languages"].as_array().expect("languages") {
            assert_eq!(l["image_format"], format, "{l}");
        }
        drop(server);
    }
    assert_eq!(seen.len(), 2 * HELLO.len());
}

#[test]
fn an_initramfs_too_big_for_its_vm_is_refused_and_block_serves_it() {
    let (_cat, cat_path) = support::test_catalog(SMALL_PYTHON);
    for (format, ok) in [("initramfs", false), ("block", true)] {
        let config = format!(
            "[vm]\nprebuild = [\"python-small\"]\n[images]\nformat = \"{format}\"\n\
             [snapshot]\nenabled = false\n"
        );
        let server = Server::start(
            &["--hypervisor", "qemu", "--catalog", &cat_path],
            Some(&config),
            FIRST_START,
        )
        .unwrap_or_else(|e| panic!("{format}: {e}"));
        let (st, v) = exec(
            &server,
            json!({"language": "python-small", "code": "print(6 * 7)"}),
        );
        if ok {
            assert_eq!(st, 200, "{format}: {v}");
            assert_eq!(v["stdout"], "42\n", "{format}: {v}");
        } else {
            let msg = v["message"].as_str().unwrap_or("");
            assert_eq!(st, 503, "{format}: {v}");
            assert!(
                msg.contains("cannot fit its VM's 128 MiB")
                    && msg.contains("MiB compressed")
                    && msg.contains("MiB unpacked"),
                "{format}: {v}"
            );
            assert!(
                server.children().is_empty(),
                "no VM was started for a refused image"
            );
        }
        drop(server);
    }
}

/// The JDK (a 325 MB root) in its 512 MiB VM: only a block root fits, and `javac` and `java`
/// run from it. Built on the first request (java is not in the default `prebuild`).
#[test]
fn a_jdk_larger_than_its_vm_runs_from_a_block_root() {
    let config = "[vm]\nprebuild = [\"java\"]\n[snapshot]\nenabled = false\n";
    let server = Server::start(&["--hypervisor", "qemu"], Some(config), FIRST_START)
        .unwrap_or_else(|e| panic!("java: {e}"));
    let code = "public class Main { public static void main(String[] a) { \
                System.out.println(\"hello \" + a[0] + \" \" + Runtime.version().feature()); } }";
    let (st, v) = exec(
        &server,
        json!({"language": "java", "code": code, "args": ["jdk"],
               "timeout_ms": 60000, "compile_timeout_ms": 60000}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["stdout"], "hello jdk 17\n", "{v}");
    assert_eq!(v["status"], "ok", "{v}");
    let root = root_image("java");
    let root_mib = std::fs::metadata(&root).expect("java root").len() >> 20;
    assert!(
        root_mib > 256,
        "the JDK's root ({root_mib} MiB) is most of its VM's 512 MiB"
    );
    drop(server);
}
