//! The guest kernel and language images, built (or found in the cache) once and shared.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cloude_image::catalog::Language;
use cloude_image::image::block::RootCompression;
use cloude_image::image::{BuildOptions, Format};
use cloude_image::kernel::{Flavor, Kernel};
use cloude_image::progress::Progress;
use tokio::sync::OnceCell;

use crate::config::FormatChoice;

#[derive(Debug, thiserror::Error, Clone)]
pub enum ArtifactError {
    #[error("the guest kernel is not available: {0}")]
    Kernel(String),
    #[error("the image for {0} is not available: {1}")]
    Image(String, String),
}

/// Kernel and images, each built at most once at a time; failures are retried on next use.
pub struct Artifacts {
    progress: Progress,
    /// When false, only already-cached artifacts are used (nothing is built).
    build: bool,
    kernel: OnceCell<Kernel>,
    images: Mutex<HashMap<String, Arc<OnceCell<LangImage>>>>,
    format: FormatChoice,
}

impl Artifacts {
    pub fn new(progress: Progress, build: bool, format: FormatChoice) -> Self {
        Artifacts {
            progress,
            build,
            format,
            kernel: OnceCell::new(),
            images: Mutex::new(HashMap::new()),
        }
    }

    pub async fn kernel(&self) -> Result<Kernel, ArtifactError> {
        let progress = self.progress.clone();
        let build = self.build;
        self.kernel
            .get_or_try_init(|| async move {
                if !build {
                    let k = cloude_image::kernel::cached_kernel(Flavor::Guest)
                        .map_err(|e| ArtifactError::Kernel(e.to_string()))?
                        .ok_or_else(|| {
                            ArtifactError::Kernel(
                                "it is not built yet and building is disabled".into(),
                            )
                        })?;
                    let k2 = k.clone();
                    tokio::task::spawn_blocking(move || {
                        verify(&k2.bzimage)?;
                        verify(&k2.vmlinux)
                    })
                    .await
                    .map_err(|e| ArtifactError::Kernel(e.to_string()))?
                    .map_err(ArtifactError::Kernel)?;
                    return Ok(k);
                }
                tokio::task::spawn_blocking(move || {
                    let k = cloude_image::kernel::ensure_kernel(Flavor::Guest, &progress)
                        .map_err(|e| e.to_string())?;
                    verify(&k.bzimage)?;
                    verify(&k.vmlinux)?;
                    Ok::<_, String>(k)
                })
                .await
                .map_err(|e| ArtifactError::Kernel(e.to_string()))?
                .map_err(ArtifactError::Kernel)
            })
            .await
            .cloned()
    }

    /// The format `lang`'s VMs boot with under this server's `[images] format`.
    pub fn format_for(&self, lang: &Language) -> Format {
        match self.format {
            FormatChoice::Initramfs => Format::Initramfs,
            FormatChoice::Block => Format::Block,
            FormatChoice::Auto => auto_format(lang),
        }
    }

    /// The image of `lang` in its format (built, or found in the cache), digests verified; an
    /// initramfs that cannot fit the language's VM memory is refused.
    pub async fn image(&self, lang: &Language) -> Result<LangImage, ArtifactError> {
        let format = self.format_for(lang);
        let key = format!("{}-{}-{}", lang.name, lang.version, format.name());
        let cell = {
            let mut map = self.images.lock().expect("images lock is never poisoned");
            map.entry(key).or_default().clone()
        };
        let progress = self.progress.clone();
        let l = lang.clone();
        let build = self.build;
        let name = l.name.clone();
        cell.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || find_or_build(&l, format, build, &progress))
                .await
                .map_err(|e| ArtifactError::Image(name.clone(), e.to_string()))?
                .map_err(|e| ArtifactError::Image(name, e))
        })
        .await
        .cloned()
    }
}

/// A language's image as VMs boot it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LangImage {
    pub format: Format,
    /// The initramfs: the whole root (initramfs format) or only the agent (block).
    pub initrd: PathBuf,
    /// The read-only root filesystem image (block format).
    pub root: Option<PathBuf>,
}

/// What `[images] format = "auto"` picks for `lang`: block everywhere. Measured side by side
/// (README, "Block roots"; `cargo xtask bench`): block roots boot faster and cost less guest
/// memory than initramfs images for every measured language, the small ones included, and only
/// block roots fit runtimes larger than the VM's memory.
pub fn auto_format(_lang: &Language) -> Format {
    Format::Block
}

fn find_or_build(
    l: &Language,
    format: Format,
    build: bool,
    progress: &Progress,
) -> Result<LangImage, String> {
    let image = match (format, build) {
        (Format::Initramfs, false) => {
            let p = cloude_image::image::cached_image(&l.name).ok_or_else(|| {
                format!(
                    "no image is cached and building is disabled (build it with `cloude-image build {}`)",
                    l.name
                )
            })?;
            LangImage {
                format,
                initrd: p,
                root: None,
            }
        }
        (Format::Initramfs, true) => LangImage {
            format,
            initrd: cloude_image::image::ensure_image(l, &BuildOptions::default(), progress)
                .map_err(|e| e.to_string())?,
            root: None,
        },
        (Format::Block, false) => {
            let b = cloude_image::image::cached_block_image(&l.name).ok_or_else(|| {
                format!(
                    "no block image is cached and building is disabled (build it with `cloude-image build {} --format block`)",
                    l.name
                )
            })?;
            LangImage {
                format,
                initrd: b.boot,
                root: Some(b.root),
            }
        }
        (Format::Block, true) => {
            let b = cloude_image::image::block::ensure_block_image(
                l,
                &BuildOptions::default(),
                RootCompression::default(),
                progress,
            )
            .map_err(|e| e.to_string())?;
            LangImage {
                format,
                initrd: b.boot,
                root: Some(b.root),
            }
        }
    };
    verify(&image.initrd)?;
    if let Some(r) = &image.root {
        verify(r)?;
    }
    if format == Format::Initramfs {
        let compressed = std::fs::metadata(&image.initrd)
            .map_err(|e| format!("{}: {e}", image.initrd.display()))?
            .len();
        if let Some(unpacked) = cloude_image::image::unpacked_bytes(&image.initrd) {
            cloude_image::image::check_fits(&l.name, compressed, unpacked, l.memory_mib)?;
        }
    }
    tracing::info!(
        language = %l.name,
        format = format.name(),
        initrd = %image.initrd.display(),
        root = %image.root.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
        "image ready"
    );
    Ok(image)
}

/// Re-checks a cached artifact's recorded digest (once per server and artifact: the results
/// are kept in the cells above).
fn verify(path: &std::path::Path) -> Result<(), String> {
    cloude_image::integrity::verify(path).map_err(|e| e.to_string())
}
