//! Replays every saved input through its harness with plain `cargo test` (stable toolchain, no
//! sanitizer): `regressions/<target>/*` are inputs that once crashed a target (each must now
//! pass), `seeds/<target>/*` are the starting corpora. `cargo xtask fuzz` runs the fuzzers.

use std::path::{Path, PathBuf};

fn inputs(dir: &str) -> Vec<(String, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut out = Vec::new();
    if !root.is_dir() {
        return out; // no regression has been found yet
    }
    for target in std::fs::read_dir(&root).expect("a readable directory") {
        let target = target.expect("readable directory");
        let name = target.file_name().to_string_lossy().into_owned();
        assert!(
            cloude_fuzz::TARGETS.contains(&name.as_str()),
            "{dir}/{name} is not a fuzz target"
        );
        for f in std::fs::read_dir(target.path()).expect("a target directory") {
            out.push((name.clone(), f.expect("readable entry").path()));
        }
    }
    out.sort();
    out
}

fn replay(dir: &str) -> usize {
    let all = inputs(dir);
    for (target, path) in &all {
        let data = std::fs::read(path).expect("readable input");
        eprintln!("{target} <- {}", path.display());
        assert!(cloude_fuzz::run_target(target, &data), "{target}");
    }
    all.len()
}

#[test]
fn regressions_no_longer_crash() {
    let n = replay("regressions");
    eprintln!("{n} regression inputs replayed");
}

#[test]
fn seeds_pass() {
    assert!(replay("seeds") >= 10, "the seed corpora are missing");
}

/// The API harnesses are not vacuous: valid seeds are accepted, hostile ones refused.
#[test]
fn api_seeds_reach_both_outcomes() {
    let r = &cloude_fuzz::api::rules()[0];
    let seed = |t: &str, n: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("seeds")
                .join(t)
                .join(n),
        )
        .expect("seed")
    };
    let v1 = |n| {
        cloude_server::api::v1::decode_execution(&seed("api_request", n), &r.catalog, &r.config)
    };
    assert!(v1("code").is_ok());
    assert!(v1("files").is_ok());
    assert_eq!(v1("bad").expect_err("hostile").status.as_u16(), 400);
    let p = |n| {
        cloude_server::api::piston::decode_piston(&seed("piston_request", n), &r.catalog, &r.config)
    };
    assert!(p("basic").is_ok(), "{:?}", p("basic").err());
    assert!(p("full").is_ok(), "{:?}", p("full").err());
    assert!(p("bad").is_err());
    let j = |n, base64| {
        cloude_server::api::judge0::decode_judge0(
            &seed("judge0_request", n),
            base64,
            &r.catalog,
            &r.config,
        )
    };
    assert!(j("basic", false).is_ok(), "{:?}", j("basic", false).err());
    assert!(j("full", true).is_ok(), "{:?}", j("full", true).err());
    assert!(j("bad", false).expect_err("hostile").0.len() >= 4);
    let caps = cloude_server::judge0::files::Caps {
        max_entries: 4,
        max_members: 16,
        max_file_bytes: 4096,
        max_total_bytes: 8192,
        max_ratio: 100,
    };
    let files = cloude_server::judge0::files::unpack(&seed("judge0_zip", "dirs"), &caps)
        .expect("the zip seed unpacks");
    assert_eq!(files.len(), 2);
}

/// The OCI harness is not vacuous: the two-layer seed flattens to the expected tree.
#[test]
fn oci_seed_flattens() {
    let data = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/oci_layers/two"))
        .expect("seed");
    let (opts, first, second) = cloude_fuzz::oci::split(&data);
    let mut t = cloude_image::image::tree::Tree::new();
    t.apply_tar(first, opts).expect("layer 1");
    t.apply_tar(second.expect("two layers"), opts)
        .expect("layer 2");
    assert!(t.lookup("etc/keep").is_some());
    assert!(t.lookup("etc/gone").is_none(), "whiteout applied");
    assert!(t.lookup("opt/old").is_none(), "opaque directory applied");
    assert!(t.lookup("opt/new").is_some());
    cloude_fuzz::oci::check_tree(&t);
}
