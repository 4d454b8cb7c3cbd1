//! The language catalogue (`catalog/default.toml`, embedded; replaceable by a file).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The embedded default catalogue.
pub const DEFAULT_CATALOG: &str = include_str!("../../../catalog/default.toml");
/// Environment variable naming a catalogue file that replaces the default.
pub const CATALOG_ENV: &str = "CLOUDE_CATALOG";

/// One language.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Language {
    pub name: String,
    /// The version clients see and match. For Debian-package languages it is never written in
    /// the catalogue: [`crate::versions::resolve`] derives it from the package installed in the
    /// image ([`Language::version_package`]); OCI-image languages declare it.
    #[serde(default)]
    pub version: String,
    /// The package of the dependency closure whose version is the language's (default: the
    /// first of `debian_packages`; name the real one where that is a metapackage).
    #[serde(default)]
    pub version_package: Option<String>,
    /// Keep only the first N dot-separated parts of the derived version.
    #[serde(default)]
    pub version_parts: Option<usize>,
    /// The runtime's own version command (argv); its output contains the version. Run by the
    /// conformance suite against every image.
    #[serde(default)]
    pub version_command: Vec<String>,
    /// Whether the catalogue's `[base]` userland is added (default: yes).
    #[serde(default = "yes")]
    pub base_userland: bool,
    /// The base packages this language gets (filled from `[base]` by [`Catalog::parse`]).
    #[serde(skip)]
    pub base_packages: Vec<String>,
    /// This language's default run timeout (ms) when a request names none; capped by the
    /// server's maximum.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// This language's default compile timeout (ms), likewise.
    #[serde(default)]
    pub compile_timeout_ms: Option<u64>,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub extensions: Vec<String>,
    /// File name the code is written to (the entry point).
    pub file: String,
    /// Run command (argv); request args are appended.
    pub run: Vec<String>,
    /// Optional compile command (argv).
    #[serde(default)]
    pub compile: Option<Vec<String>>,
    /// Extra environment for compile and run.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Debian 12 packages the image is built from.
    #[serde(default)]
    pub debian_packages: Vec<String>,
    /// OCI image reference the image is built from (instead of Debian packages).
    #[serde(default)]
    pub image: Option<String>,
    /// VM memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Commands (argv each) run at image build time inside the image's root (a chroot, as root,
    /// without network), in order, after unpacking and trimming; for example precompiling
    /// Python's standard library. Part of the image's cache key.
    #[serde(default)]
    pub post_build: Vec<Vec<String>>,
    /// Run programs as root inside the VM instead of the unprivileged sandbox user. For test
    /// images (a guest kernel panic needs root); the VM stays the isolation boundary.
    #[serde(default)]
    pub run_as_root: bool,
    /// Judge0 CE 1.13.1 language ids this entry answers to on the Judge0-compatible API (the
    /// first is the one `GET /languages` lists first); empty: not offered there.
    #[serde(default)]
    pub judge0_ids: Vec<u32>,
    /// The program that runs this language, as Piston's `GET /api/v2/runtimes` names it
    /// (`node` for javascript, `gcc` for c and c++, `mono` for csharp); empty: none is listed.
    #[serde(default)]
    pub runtime: Option<String>,
}

fn default_memory() -> u64 {
    256
}

fn yes() -> bool {
    true
}

impl Language {
    /// Every Debian package the image is built from: the base userland, then the language's.
    pub fn all_debian_packages(&self) -> Vec<String> {
        let mut v = self.base_packages.clone();
        for p in &self.debian_packages {
            if !v.contains(p) {
                v.push(p.clone());
            }
        }
        v
    }

    /// The package whose version is the language's (Debian-package languages only).
    pub fn version_package(&self) -> Option<&str> {
        self.version_package
            .as_deref()
            .or(self.debian_packages.first().map(String::as_str))
    }
}

/// The userland every Debian-package image gets (`[base]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    #[serde(default)]
    pub debian_packages: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    base: Base,
    #[serde(default)]
    language: Vec<Language>,
}

/// A validated catalogue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catalog {
    pub languages: Vec<Language>,
    pub base: Base,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read the catalogue {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("the catalogue is not valid TOML: {0}")]
    Parse(String),
    #[error("language {0:?}: {1}")]
    Invalid(String, String),
    #[error(transparent)]
    Version(#[from] crate::versions::VersionError),
}

impl Catalog {
    /// Parses and validates catalogue text.
    pub fn parse(text: &str) -> Result<Self, CatalogError> {
        let file: CatalogFile =
            toml::from_str(text).map_err(|e| CatalogError::Parse(e.to_string()))?;
        let mut cat = Catalog {
            languages: file.language,
            base: file.base,
        };
        cat.validate()?;
        for l in &mut cat.languages {
            if l.base_userland && !l.debian_packages.is_empty() {
                l.base_packages = cat.base.debian_packages.clone();
            }
        }
        Ok(cat)
    }

    /// The embedded default.
    pub fn default_catalog() -> Self {
        Self::parse(DEFAULT_CATALOG).expect("the embedded catalogue is valid (unit-tested)")
    }

    /// `path` if given, else `$CLOUDE_CATALOG` if set, else the embedded default.
    pub fn load(path: Option<&Path>) -> Result<Self, CatalogError> {
        let env = std::env::var_os(CATALOG_ENV)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        match path.map(Path::to_path_buf).or(env) {
            Some(p) => {
                let text = std::fs::read_to_string(&p).map_err(|e| CatalogError::Read(p, e))?;
                Self::parse(&text)
            }
            None => Ok(Self::default_catalog()),
        }
    }

    /// [`Catalog::load`], then every Debian-package language's version from apt
    /// ([`crate::versions::resolve`]).
    pub fn load_resolved(path: Option<&Path>) -> Result<Self, CatalogError> {
        let mut c = Self::load(path)?;
        crate::versions::resolve(&mut c)?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), CatalogError> {
        let mut names = std::collections::HashSet::new();
        let mut judge0_ids = std::collections::HashSet::new();
        for l in &self.languages {
            let bad = |why: &str| Err(CatalogError::Invalid(l.name.clone(), why.to_string()));
            if l.name.is_empty() {
                return bad("name must not be empty");
            }
            match (l.image.is_some(), l.version.is_empty()) {
                (true, true) => return bad("an OCI-image language must declare its version"),
                (false, false) => {
                    return bad(
                        "version comes from the installed package, not the catalogue: remove it \
                         (version_package names the package if the first is a metapackage)",
                    )
                }
                _ => {}
            }
            if l.image.is_some() && (l.version_package.is_some() || l.version_parts.is_some()) {
                return bad("version_package and version_parts are for Debian-package languages");
            }
            if l.version_parts == Some(0) {
                return bad("version_parts must be at least 1");
            }
            if matches!(&l.version_command.first(), Some(c) if c.is_empty()) {
                return bad("version_command must not start with an empty word");
            }
            if l.timeout_ms == Some(0) || l.compile_timeout_ms == Some(0) {
                return bad("timeouts must be at least 1 ms");
            }
            if l.run.is_empty() {
                return bad("run must not be empty");
            }
            if matches!(&l.compile, Some(c) if c.is_empty()) {
                return bad("compile must not be empty when present");
            }
            if l.post_build.iter().any(|c| c.is_empty() || c[0].is_empty()) {
                return bad("post_build commands must not be empty");
            }
            if cloude_protocol::validate_file_name(&l.file).is_err() {
                return bad("file must be a plain relative file name");
            }
            match (l.debian_packages.is_empty(), &l.image) {
                (true, None) => return bad("needs debian_packages or image"),
                (false, Some(_)) => return bad("has both debian_packages and image"),
                _ => {}
            }
            if !(64..=16384).contains(&l.memory_mib) {
                return bad("memory_mib must be between 64 and 16384");
            }
            for id in &l.judge0_ids {
                if !judge0_ids.insert(*id) {
                    return bad(&format!("judge0 id {id} is used twice"));
                }
            }
            // Two entries may share a name only as two versions: declared ones (OCI) or two
            // version packages.
            let version_key = if l.version.is_empty() {
                l.version_package().unwrap_or_default().to_string()
            } else {
                l.version.clone()
            };
            for key in std::iter::once(&l.name).chain(&l.aliases) {
                if !names.insert((key.to_ascii_lowercase(), version_key.clone())) {
                    return bad(&format!("name or alias {key:?} is used twice"));
                }
            }
        }
        Ok(())
    }

    /// Finds a language by name or alias (case-insensitive). `version` may be `None`, `"*"`,
    /// an exact version, or a prefix of dot-separated components (`"3"`, `"3.11"`); the newest
    /// match wins.
    pub fn find(&self, name: &str, version: Option<&str>) -> Option<&Language> {
        let name = name.to_ascii_lowercase();
        self.languages
            .iter()
            .filter(|l| {
                l.name.eq_ignore_ascii_case(&name)
                    || l.aliases.iter().any(|a| a.eq_ignore_ascii_case(&name))
            })
            .filter(|l| version_matches(&l.version, version))
            .max_by(|a, b| compare_versions(&a.version, &b.version))
    }

    /// The language a Judge0 language id names (see [`Language::judge0_ids`]).
    pub fn by_judge0_id(&self, id: u32) -> Option<&Language> {
        self.languages.iter().find(|l| l.judge0_ids.contains(&id))
    }

    /// Finds a language by a file extension (without the dot).
    pub fn by_extension(&self, ext: &str) -> Option<&Language> {
        self.languages
            .iter()
            .find(|l| l.extensions.iter().any(|e| e.eq_ignore_ascii_case(ext)))
    }
}

/// Whether `have` satisfies the requested `want` (see [`Catalog::find`]).
pub fn version_matches(have: &str, want: Option<&str>) -> bool {
    let Some(want) = want.map(str::trim).filter(|w| !w.is_empty() && *w != "*") else {
        return true;
    };
    let want = want.trim_end_matches(".x").trim_end_matches(".*");
    have == want || have.starts_with(&format!("{want}."))
}

fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<u64> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parts(a).cmp(&parts(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name and alias Piston lists (its packages' metadata, `catalog/piston-names.toml`)
    /// that names a language served here resolves to it; the ones not served say why.
    #[test]
    fn pistons_names_resolve() {
        #[derive(serde::Deserialize)]
        struct Names {
            served: std::collections::BTreeMap<String, String>,
            not_served: std::collections::BTreeMap<String, String>,
        }
        let names: Names = toml::from_str(include_str!("../../../catalog/piston-names.toml"))
            .expect("piston-names.toml");
        let c = Catalog::default_catalog();
        for (piston, ours) in &names.served {
            let found = c.find(piston, None).map(|l| l.name.as_str());
            assert_eq!(found, Some(ours.as_str()), "Piston's {piston:?}");
        }
        for (piston, why) in &names.not_served {
            assert!(!why.trim().is_empty(), "{piston}: say why it is not served");
            assert!(
                !names.served.contains_key(piston),
                "{piston} is both served and not"
            );
        }
    }

    #[test]
    fn default_catalogue_is_valid_and_complete() {
        let c = Catalog::default_catalog();
        for lang in ["python", "javascript", "bash", "c", "cpp"] {
            assert!(c.find(lang, None).is_some(), "{lang}");
        }
        assert_eq!(c.find("PY", None).map(|l| l.name.as_str()), Some("python"));
        assert_eq!(c.by_extension("cpp").map(|l| l.name.as_str()), Some("cpp"));
    }

    #[test]
    fn the_base_userland_is_added_unless_refused() {
        let text = "[base]\ndebian_packages=[\"coreutils\", \"dash\"]\n\
                    [[language]]\nname=\"a\"\nfile=\"a\"\nrun=[\"a\"]\ndebian_packages=[\"a\", \"dash\"]\n\
                    [[language]]\nname=\"b\"\nfile=\"b\"\nrun=[\"b\"]\ndebian_packages=[\"b\"]\nbase_userland=false\n";
        let c = Catalog::parse(text).expect("valid");
        assert_eq!(
            c.languages[0].all_debian_packages(),
            ["coreutils", "dash", "a"]
        );
        assert_eq!(c.languages[1].all_debian_packages(), ["b"]);
        assert_eq!(c.languages[0].version_package(), Some("a"));
        let d = Catalog::default_catalog();
        for l in &d.languages {
            // beef (brainfuck) and dash print no version at all; every other runtime can say
            // its own.
            assert!(
                !l.version_command.is_empty() || ["brainfuck", "dash"].contains(&l.name.as_str()),
                "{}: version_command",
                l.name
            );
            assert!(
                l.all_debian_packages().iter().any(|p| p == "util-linux"),
                "{}",
                l.name
            );
        }
    }

    #[test]
    fn versions() {
        assert!(version_matches("3.11.2", None));
        assert!(version_matches("3.11.2", Some("*")));
        assert!(version_matches("3.11.2", Some("3")));
        assert!(version_matches("3.11.2", Some("3.11")));
        assert!(version_matches("3.11.2", Some("3.11.x")));
        assert!(version_matches("3.11.2", Some("3.11.2")));
        assert!(!version_matches("3.11.2", Some("3.1")));
        assert!(!version_matches("3.11.2", Some("2")));
        let c = Catalog::default_catalog();
        assert!(c.find("python", Some("2.7")).is_none());
    }

    #[test]
    fn invalid_entries_rejected() {
        let base = "[[language]]\nname=\"x\"\nfile=\"main.x\"\nrun=[\"x\"]\n";
        assert!(Catalog::parse(&format!("{base}debian_packages=[\"x\"]\n")).is_ok());
        // A Debian language's version is the package's; an OCI language declares its own.
        assert!(
            Catalog::parse(&format!("{base}debian_packages=[\"x\"]\nversion=\"1\"\n")).is_err()
        );
        assert!(Catalog::parse(&format!("{base}image=\"docker://a/b:c\"\n")).is_err());
        assert!(
            Catalog::parse(&format!("{base}image=\"docker://a/b:c\"\nversion=\"1\"\n")).is_ok()
        );
        assert!(
            Catalog::parse(&format!("{base}debian_packages=[\"x\"]\nversion_parts=0\n")).is_err()
        );
        assert!(Catalog::parse(base).is_err(), "no source");
        assert!(Catalog::parse(&format!(
            "{base}debian_packages=[\"x\"]\nimage=\"docker://a/b:c\"\n"
        ))
        .is_err());
        assert!(Catalog::parse(&base.replace("main.x", "../x")).is_err());
        assert!(Catalog::parse("[[language]]\nname=1").is_err());
        assert!(Catalog::parse(&format!("{base}debian_packages=[\"x\"]\nbogus=1\n")).is_err());
        let pb = format!("{base}debian_packages=[\"x\"]\npost_build=[[\"x\", \"-y\"]]\n");
        assert_eq!(
            Catalog::parse(&pb).expect("post_build").languages[0].post_build,
            vec![vec!["x".to_string(), "-y".to_string()]]
        );
        assert!(Catalog::parse(&pb.replace("[\"x\", \"-y\"]", "[]")).is_err());
    }
}
