//! Language images: rootfs (Debian packages or OCI) + the agent as `/init`, as a compressed cpio.
//!
//! Placeholder with the final signature so that dependants compile; the builder lands next.

use std::path::PathBuf;

use crate::catalog::Language;
use crate::progress::Progress;

/// How to build an image.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Build from this OCI reference instead of the catalogue's source.
    pub from: Option<String>,
    /// Allow plain HTTP registries (loopback tests).
    pub insecure: bool,
    /// Also copy the result to this path.
    pub output: Option<PathBuf>,
    /// The agent binary to inject (default: [`crate::paths::agent_binary`]).
    pub agent: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image builder is not available yet")]
    NotYet,
}

/// Builds the image for `lang` (or reuses the cached one) and returns its path.
pub fn ensure_image(
    _lang: &Language,
    _opts: &BuildOptions,
    _progress: &Progress,
) -> Result<PathBuf, ImageError> {
    Err(ImageError::NotYet)
}
