//! Where Cloude keeps its artifacts (kernels, images, build trees).

use std::path::{Path, PathBuf};

/// The artifact directory: `$CLOUDE_HOME`, else `/var/lib/cloude` for root, else
/// `$XDG_DATA_HOME/cloude`, else `~/.local/share/cloude`.
pub fn cloude_home() -> PathBuf {
    home_from(
        std::env::var_os("CLOUDE_HOME"),
        nix::unistd::geteuid().is_root(),
        std::env::var_os("XDG_DATA_HOME"),
        std::env::var_os("HOME"),
    )
}

fn home_from(
    cloude_home: Option<std::ffi::OsString>,
    is_root: bool,
    xdg: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> PathBuf {
    if let Some(h) = cloude_home.filter(|h| !h.is_empty()) {
        return absolute(Path::new(&h));
    }
    if is_root {
        return PathBuf::from("/var/lib/cloude");
    }
    if let Some(x) = xdg.filter(|x| !x.is_empty()) {
        return absolute(&Path::new(&x).join("cloude"));
    }
    let home = home
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/share/cloude")
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Directory of cached kernels.
pub fn kernels_dir() -> PathBuf {
    cloude_home().join("kernels")
}

/// Directory of cached language images.
pub fn images_dir() -> PathBuf {
    cloude_home().join("images")
}

/// Directory of kept build trees (kernel objects, rootfs staging).
pub fn build_dir() -> PathBuf {
    cloude_home().join("build")
}

/// The `cloude-agent` binary to inject as `/init`: `$CLOUDE_AGENT_BIN`, else the one next to the
/// running executable (binaries of one build live in one directory; test binaries live one level
/// deeper, in `deps/`).
pub fn agent_binary() -> Option<PathBuf> {
    sibling_binary("cloude-agent", "CLOUDE_AGENT_BIN")
}

/// Finds a workspace binary `name`: `$env_var` first, then next to the running executable.
pub fn sibling_binary(name: &str, env_var: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_resolution_order() {
        let s = |x: &str| Some(std::ffi::OsString::from(x));
        assert_eq!(
            home_from(s("/x"), true, s("/y"), s("/h")),
            PathBuf::from("/x")
        );
        assert_eq!(
            home_from(None, true, s("/y"), s("/h")),
            PathBuf::from("/var/lib/cloude")
        );
        assert_eq!(
            home_from(None, false, s("/y"), s("/h")),
            PathBuf::from("/y/cloude")
        );
        assert_eq!(
            home_from(None, false, None, s("/h")),
            PathBuf::from("/h/.local/share/cloude")
        );
        assert_eq!(
            home_from(s(""), true, None, None),
            PathBuf::from("/var/lib/cloude")
        );
    }
}
