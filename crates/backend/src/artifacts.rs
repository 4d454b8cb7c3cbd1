//! The guest kernel and language images, built (or found in the cache) once and shared.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cloude_image::catalog::Language;
use cloude_image::image::BuildOptions;
use cloude_image::kernel::{Flavor, Kernel};
use cloude_image::progress::Progress;
use tokio::sync::OnceCell;

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
    images: Mutex<HashMap<String, Arc<OnceCell<PathBuf>>>>,
}

impl Artifacts {
    pub fn new(progress: Progress, build: bool) -> Self {
        Artifacts {
            progress,
            build,
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

    pub async fn image(&self, lang: &Language) -> Result<PathBuf, ArtifactError> {
        let key = format!("{}-{}", lang.name, lang.version);
        let cell = {
            let mut map = self.images.lock().expect("images lock is never poisoned");
            map.entry(key).or_default().clone()
        };
        let progress = self.progress.clone();
        let l = lang.clone();
        let build = self.build;
        cell.get_or_try_init(|| async move {
            if !build {
                // Serve what is cached: the newest image built for the language.
                let Some(p) = cloude_image::image::cached_image(&l.name) else {
                    return Err(ArtifactError::Image(
                        l.name.clone(),
                        format!(
                            "no image is cached and building is disabled (build it with `cloude-image build {}`)",
                            l.name
                        ),
                    ));
                };
                let name = l.name.clone();
                return tokio::task::spawn_blocking(move || verify(&p).map(|()| p))
                    .await
                    .map_err(|e| ArtifactError::Image(name.clone(), e.to_string()))?
                    .map_err(|e| ArtifactError::Image(name, e));
            }
            let name = l.name.clone();
            tokio::task::spawn_blocking(move || {
                let p = cloude_image::image::ensure_image(&l, &BuildOptions::default(), &progress)
                    .map_err(|e| e.to_string())?;
                verify(&p)?;
                Ok::<_, String>(p)
            })
            .await
            .map_err(|e| ArtifactError::Image(name.clone(), e.to_string()))?
            .map_err(|e| ArtifactError::Image(name, e))
        })
        .await
        .cloned()
    }
}

/// Re-checks a cached artifact's recorded digest (once per server and artifact: the results
/// are kept in the cells above).
fn verify(path: &std::path::Path) -> Result<(), String> {
    cloude_image::integrity::verify(path).map_err(|e| e.to_string())
}
