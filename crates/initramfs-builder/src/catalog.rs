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
    pub version: String,
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
}

fn default_memory() -> u64 {
    256
}

#[derive(Debug, Deserialize, Serialize)]
struct CatalogFile {
    #[serde(default)]
    language: Vec<Language>,
}

/// A validated catalogue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catalog {
    pub languages: Vec<Language>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read the catalogue {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("the catalogue is not valid TOML: {0}")]
    Parse(String),
    #[error("language {0:?}: {1}")]
    Invalid(String, String),
}

impl Catalog {
    /// Parses and validates catalogue text.
    pub fn parse(text: &str) -> Result<Self, CatalogError> {
        let file: CatalogFile =
            toml::from_str(text).map_err(|e| CatalogError::Parse(e.to_string()))?;
        let cat = Catalog {
            languages: file.language,
        };
        cat.validate()?;
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

    fn validate(&self) -> Result<(), CatalogError> {
        let mut names = std::collections::HashSet::new();
        let mut judge0_ids = std::collections::HashSet::new();
        for l in &self.languages {
            let bad = |why: &str| Err(CatalogError::Invalid(l.name.clone(), why.to_string()));
            if l.name.is_empty() || l.version.is_empty() {
                return bad("name and version must not be empty");
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
            for key in std::iter::once(&l.name).chain(&l.aliases) {
                if !names.insert((key.to_ascii_lowercase(), l.version.clone())) {
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
        let base = "[[language]]\nname=\"x\"\nversion=\"1\"\nfile=\"main.x\"\nrun=[\"x\"]\n";
        assert!(Catalog::parse(&format!("{base}debian_packages=[\"x\"]\n")).is_ok());
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
