//! What goes into the lab machine: a cached base archive (busybox, QEMU with its libraries and
//! firmware, iproute2, the cached kernels) and a small per-run archive (the command, our release
//! binaries, `--copy` paths). The kernel unpacks both from one concatenated initrd.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use cloude_image::lock::FileLock;
use cloude_image::paths;

use super::script;
use super::tree::{Tree, TreeError};

/// Bumped when the layout of the base archive changes in a way its fingerprint cannot see.
const BASE_FORMAT: &str = "lab-base-2";
/// How many cached base archives to keep (each is tens of MB).
const KEEP_BASES: usize = 2;

/// Host programs the base needs, and the Debian package that provides each.
pub const HOST_PROGRAMS: &[(&str, &str)] = &[
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ("/usr/share/qemu/bios-microvm.bin", "qemu-system-data"),
    ("/usr/sbin/ip", "iproute2"),
    ("/usr/bin/setpriv", "util-linux"),
];

/// Firmware files of `/usr/share/qemu` that x86 machines load (microvm needs
/// `bios-microvm.bin`; the others let `-M pc`/`q35` work too).
const QEMU_FIRMWARE: &[&str] = &[
    "bios-microvm.bin",
    "qboot.rom",
    "bios.bin",
    "bios-256k.bin",
    "kvmvapic.bin",
    "linuxboot.bin",
    "linuxboot_dma.bin",
    "multiboot.bin",
    "multiboot_dma.bin",
    "pvh.bin",
    "sgabios.bin",
];
/// QEMU's loadable modules for x86 TCG (Debian builds TCG as a module).
const QEMU_MODULES: &[&str] = &["/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so"];
/// Handy tools added when the host has them (`mkfs.erofs`: the VMM's disk tests make their
/// images in the lab; `cargo xtask test` installs `erofs-utils`).
const OPTIONAL_PROGRAMS: &[&str] = &["/usr/bin/strace", "/usr/bin/mkfs.erofs"];

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("cannot list the busybox applets: {0}")]
    Busybox(String),
    #[error("I/O error at {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |e| RootfsError::Io(p.to_path_buf(), e)
}

/// Host paths from [`HOST_PROGRAMS`] that are missing, with their packages.
pub fn missing_host_programs() -> Vec<(&'static str, &'static str)> {
    HOST_PROGRAMS
        .iter()
        .copied()
        .filter(|(p, _)| !Path::new(p).exists())
        .collect()
}

/// The skeleton: directories, `/init`, `/dev/console`, a few `/etc` files.
fn skeleton(t: &mut Tree) {
    for d in [
        "/proc", "/sys", "/dev", "/run", "/root", "/mnt", "/lab", "/var",
    ] {
        t.add_dir(d, 0o755);
    }
    t.add_dir("/tmp", 0o1777);
    t.add_symlink("/var/run", "/run");
    t.add_chardev("/dev/console", 0o600, 5, 1);
    t.add_bytes("/init", 0o755, script::init_script());
    t.add_bytes("/etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n");
    t.add_bytes("/etc/group", 0o644, "root:x:0:\n");
    t.add_bytes("/etc/hosts", 0o644, "127.0.0.1 localhost\n::1 localhost\n");
    t.add_bytes("/etc/hostname", 0o644, "cloude-lab\n");
}

/// Busybox and a link for each of its applets (placed in the host's real directories).
fn busybox(t: &mut Tree) -> Result<(), RootfsError> {
    let bb = Path::new("/bin/busybox");
    t.add_program(bb)?;
    let out = Command::new(bb)
        .arg("--list-full")
        .output()
        .map_err(|e| RootfsError::Busybox(e.to_string()))?;
    if !out.status.success() {
        return Err(RootfsError::Busybox(
            String::from_utf8_lossy(&out.stderr).into(),
        ));
    }
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = Path::new("/").join(applet.trim());
        let (Some(dir), Some(name)) = (applet.parent(), applet.file_name()) else {
            continue;
        };
        // The applet's directory as the host has it (e.g. /bin -> /usr/bin).
        let dir = t.real_dir(dir).unwrap_or_else(|_| dir.to_path_buf());
        if t.contains(&dir.join(name)) {
            continue; // never replace busybox itself
        }
        t.insert(
            &dir.join(name),
            super::tree::Entry::Symlink {
                target: PathBuf::from("/bin/busybox"),
            },
        );
    }
    Ok(())
}

/// QEMU, its libraries, modules and firmware, at the host's paths (no `-L` needed).
fn qemu(t: &mut Tree) -> Result<(), RootfsError> {
    t.add_program(Path::new("/usr/bin/qemu-system-x86_64"))?;
    for m in QEMU_MODULES {
        if Path::new(m).exists() {
            t.add_program(Path::new(m))?;
        }
    }
    for f in QEMU_FIRMWARE {
        let p = Path::new("/usr/share/qemu").join(f);
        if p.exists() {
            t.add_host(&p, true)?;
        }
    }
    Ok(())
}

/// The cached kernels other than the lab's own.
fn kernels(t: &mut Tree) -> Result<(), RootfsError> {
    let dir = paths::kernels_dir();
    let Ok(rd) = fs::read_dir(&dir) else {
        return Ok(());
    };
    let mut names: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
    names.sort();
    for p in names {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.starts_with('.')
            || name.starts_with("lab-")
            || name.ends_with(".tmp")
            || !p.is_dir()
        {
            continue;
        }
        t.add_host(&p, false)?;
    }
    Ok(())
}

/// Gathers the base tree.
pub fn base_tree() -> Result<Tree, RootfsError> {
    let mut t = Tree::new();
    skeleton(&mut t);
    t.add_bytes("/lab/format", 0o644, BASE_FORMAT);
    busybox(&mut t)?;
    // Real programs after the applets, so that they replace busybox's versions. Debian's busybox
    // prefers its own applets over PATH (in its shell and in `env`), so `sh` is dash and `env` is
    // coreutils': `sh -c 'ip ...'` and `env X=1 ip ...` then reach iproute2's `ip`.
    t.add_program(Path::new("/usr/sbin/ip"))?;
    t.add_program(Path::new("/usr/bin/dash"))?;
    t.add_symlink("/usr/bin/sh", "dash");
    t.add_program(Path::new("/usr/bin/env"))?;
    for p in OPTIONAL_PROGRAMS {
        if Path::new(p).exists() {
            t.add_program(Path::new(p))?;
        }
    }
    qemu(&mut t)?;
    kernels(&mut t)?;
    Ok(t)
}

/// Returns the cached base archive for `tree`, writing it first if needed.
pub fn ensure_base(tree: &Tree, verbose: bool) -> Result<PathBuf, RootfsError> {
    let dir = paths::cloude_home().join("lab");
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let path = dir.join(format!("base-{}.cpio", tree.fingerprint()));
    if path.is_file() {
        return Ok(path);
    }
    let lock_path = dir.join(".base.lock");
    let _lock = FileLock::acquire(&lock_path).map_err(io_err(&lock_path))?;
    if path.is_file() {
        return Ok(path);
    }
    let started = std::time::Instant::now();
    eprintln!(
        "lab: writing the base initramfs ({} entries, {} MB) ...",
        tree.len(),
        tree.content_bytes() >> 20
    );
    let tmp = path.with_extension("cpio.tmp");
    let f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut f = tree.write_cpio(f)?;
    f.flush().map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    prune_bases(&dir, &path);
    if verbose {
        eprintln!("lab: base initramfs written in {:.1?}", started.elapsed());
    }
    Ok(path)
}

/// Removes all but the newest [`KEEP_BASES`] base archives (never `keep`).
fn prune_bases(dir: &Path, keep: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut bases: Vec<(std::time::SystemTime, PathBuf)> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            n.starts_with("base-") && n.ends_with(".cpio") && p.as_path() != keep
        })
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    bases.sort();
    let excess = bases.len().saturating_sub(KEEP_BASES - 1);
    for (_, p) in bases.into_iter().take(excess) {
        let _ = fs::remove_file(p);
    }
}

/// What one run adds on top of the base.
pub struct RunSpec<'a> {
    pub command: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
    /// Our release binaries (all in one directory, put first on `PATH`).
    pub binaries: &'a [PathBuf],
    pub bin_dir: &'a Path,
    pub copies: &'a [PathBuf],
}

/// Gathers the per-run tree.
pub fn run_tree(spec: &RunSpec<'_>) -> Result<Tree, RootfsError> {
    let mut t = Tree::new();
    t.add_bytes(
        script::RUN_SCRIPT,
        0o755,
        script::run_script(spec.env, spec.bin_dir, spec.cwd, spec.command),
    );
    for b in spec.binaries {
        t.add_program(b)?;
    }
    for c in spec.copies {
        t.add_host(c, false)?;
    }
    Ok(t)
}

/// Writes `base` followed by the archive of `run` into `out` (one initrd for QEMU).
pub fn write_initrd(base: &Path, run: &Tree, out: &Path) -> Result<u64, RootfsError> {
    let mut f = fs::File::create(out).map_err(io_err(out))?;
    let mut b = fs::File::open(base).map_err(io_err(base))?;
    std::io::copy(&mut b, &mut f).map_err(io_err(out))?;
    let mut f = run.write_cpio(f)?;
    f.flush().map_err(io_err(out))?;
    Ok(fs::metadata(out).map_err(io_err(out))?.len())
}
