//! Snapshot restore as a source of VMs: one snapshot per (language image, kernel, hypervisor,
//! memory, vCPUs, command line, agent protocol) — `vm::snapshot::Identity` — made from a booted
//! template whose agent is ready, cached under `$CLOUDE_HOME/snapshots`, verified once per server,
//! and restored for every request of the language's default VM shape (and for the warm pool).
//!
//! A snapshot that cannot be made or restored never fails a request: the request boots cold,
//! the failure is logged once per snapshot and counted, and an invalid snapshot is removed (the
//! next use makes a new one; a failed build is retried after [`RETRY_AFTER`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloude_image::catalog::Language;
use tokio::sync::OnceCell;

use crate::executor::{ms, Executor};
use crate::vm::snapshot::{self, Identity, Snapshot, SnapshotError};
use crate::vm::{Vm, VmError, VmSpec};

/// How long after a failed snapshot build the next one is tried.
const RETRY_AFTER: Duration = Duration::from_secs(300);

enum Entry {
    Ready(Arc<Snapshot>),
    /// Being loaded or made.
    Busy,
    Failed(Instant),
}

/// The snapshots of one server.
pub struct Snapshots {
    enabled: bool,
    /// Why snapshots are off, when they are (logged and shown in `/healthz`).
    off_reason: Option<String>,
    root: std::path::PathBuf,
    /// By identity key.
    entries: Mutex<HashMap<String, Entry>>,
    hypervisor_sha256: OnceCell<String>,
    /// One snapshot is made at a time (each is a whole boot).
    building: tokio::sync::Mutex<()>,
}

impl Snapshots {
    /// `enabled`: `[snapshot] enabled`; `dir`: `[snapshot] dir` (`None`: under `$CLOUDE_HOME`);
    /// `off_reason`: why they cannot work here even so.
    pub fn new(enabled: bool, dir: Option<std::path::PathBuf>, off_reason: Option<String>) -> Self {
        let root = dir.unwrap_or_else(snapshot::root);
        if enabled && off_reason.is_none() {
            snapshot::sweep_staging(&root);
        }
        Snapshots {
            enabled,
            off_reason,
            root,
            entries: Mutex::new(HashMap::new()),
            hypervisor_sha256: OnceCell::new(),
            building: tokio::sync::Mutex::new(()),
        }
    }

    /// Snapshots off (tests, `[snapshot] enabled = false`).
    pub fn off() -> Self {
        Self::new(false, None, None)
    }

    /// Whether requests are served from snapshots.
    pub fn active(&self) -> bool {
        self.enabled && self.off_reason.is_none()
    }

    /// Why snapshots are not used, if they are not.
    pub fn status(&self) -> Option<String> {
        if !self.enabled {
            return Some("disabled by [snapshot] enabled = false".into());
        }
        self.off_reason.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries
            .lock()
            .expect("snapshot lock is never poisoned")
    }

    /// Snapshots ready in this server (for `/healthz`).
    pub fn ready_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| matches!(e, Entry::Ready(_)))
            .count()
    }
}

impl Executor {
    /// The identity of `language`'s snapshot at its default VM shape.
    async fn snapshot_identity(&self, language: &Language) -> Result<(Identity, VmSpec), String> {
        let mut spec = self
            .vm_spec(language, language.memory_mib)
            .await
            .map_err(|e| e.to_string())?;
        let warm_up = self.warm_up_request(language);
        let warm_up_sha256 =
            snapshot::hex_sha256(&serde_json::to_vec(&warm_up).map_err(|e| e.to_string())?);
        spec.warm_up = Some(warm_up);
        let binary = self.driver.binary.clone();
        let hyper = self
            .snapshots
            .hypervisor_sha256
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || snapshot::file_sha256(&binary))
                    .await
                    .map_err(|e| e.to_string())?
            })
            .await?
            .clone();
        let recorded = |p: &std::path::Path| {
            cloude_image::integrity::recorded(p)
                .ok_or_else(|| format!("{} has no recorded digest", p.display()))
        };
        let identity = Identity {
            driver: self.driver.kind.name().to_string(),
            hypervisor_sha256: hyper,
            accel: self.driver.kind.accel().into(),
            kernel_sha256: recorded(&spec.kernel)?,
            image_sha256: recorded(&spec.initrd)?,
            root_sha256: spec.root.as_deref().map(recorded).transpose()?,
            warm_up_sha256,
            language: language.name.clone(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            cmdline: self.driver.snapshot_cmdline(&spec),
            protocol_version: cloude_protocol::PROTOCOL_VERSION,
        };
        Ok((identity, spec))
    }

    /// `language`'s snapshot if it is ready (loading it from the cache the first time). When
    /// there is none yet, `make` starts making one in the background.
    async fn ready_snapshot(
        self: &Arc<Self>,
        language: &Language,
        make: bool,
    ) -> Option<(Arc<Snapshot>, VmSpec)> {
        let (identity, spec) = match self.snapshot_identity(language).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(language = language.name, "no snapshot: {e}");
                return None;
            }
        };
        let key = identity.key();
        {
            let mut map = self.snapshots.lock();
            match map.get(&key) {
                Some(Entry::Ready(s)) => return Some((s.clone(), spec)),
                Some(Entry::Busy) => return None,
                Some(Entry::Failed(at)) if at.elapsed() < RETRY_AFTER => return None,
                _ => {}
            }
            map.insert(key.clone(), Entry::Busy);
        }
        // Loading hashes the files: off the async workers.
        let root = self.snapshots.root.clone();
        let id = identity.clone();
        let loaded = tokio::task::spawn_blocking(move || snapshot::load(&root, &id))
            .await
            .unwrap_or_else(|e| Err(SnapshotError::Io(Default::default(), e.to_string())));
        match loaded {
            Ok(s) => {
                let s = Arc::new(s);
                tracing::info!(language = language.name, dir = %s.dir.display(), "snapshot loaded");
                self.snapshots.lock().insert(key, Entry::Ready(s.clone()));
                return Some((s, spec));
            }
            Err(SnapshotError::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(language = language.name, "refusing a cached snapshot: {e}");
                self.metrics.snapshot_refused();
                snapshot::discard(&self.snapshots.root.join(identity.dir_name()));
            }
        }
        if make {
            let exec = self.clone();
            let language = language.clone();
            tokio::spawn(async move {
                exec.make_snapshot(&language, identity, spec).await;
            });
        } else {
            self.snapshots.lock().remove(&key);
        }
        None
    }

    /// Makes `language`'s snapshot now (server start-up; errors are logged). Returns whether one
    /// is ready afterwards.
    pub async fn prepare_snapshot(self: &Arc<Self>, language: &Language) -> bool {
        if !self.snapshots.active() {
            return false;
        }
        if self.ready_snapshot(language, false).await.is_some() {
            return true;
        }
        let Ok((identity, spec)) = self.snapshot_identity(language).await else {
            return false;
        };
        let key = identity.key();
        {
            let mut map = self.snapshots.lock();
            if matches!(map.get(&key), Some(Entry::Busy | Entry::Ready(_))) {
                return matches!(map.get(&key), Some(Entry::Ready(_)));
            }
            map.insert(key.clone(), Entry::Busy);
        }
        self.make_snapshot(language, identity, spec).await;
        matches!(self.snapshots.lock().get(&key), Some(Entry::Ready(_)))
    }

    /// Boots a template and publishes its snapshot (the entry is `Busy` until this ends).
    async fn make_snapshot(&self, language: &Language, identity: Identity, spec: VmSpec) {
        let _one = self.snapshots.building.lock().await;
        let key = identity.key();
        let started = Instant::now();
        let result = async {
            // Servers sharing the cache make each snapshot once: the one holding the lock makes
            // it, the others find it published when they get the lock.
            let root = self.snapshots.root.clone();
            let id = identity.clone();
            let (lock, found) = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
                let lock = cloude_image::lock::FileLock::acquire(
                    &root.join(format!(".{}.lock", id.dir_name())),
                )
                .map_err(|e| format!("cannot lock the snapshot: {e}"))?;
                Ok::<_, String>((lock, snapshot::load(&root, &id).ok()))
            })
            .await
            .map_err(|e| e.to_string())??;
            if let Some(s) = found {
                return Ok(s);
            }
            let _lock = lock;
            let root = self.snapshots.root.clone();
            let staging = tokio::task::spawn_blocking(move || snapshot::staging(&root))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot create a staging directory: {e}"))?;
            let slot = self.new_slot().await.map_err(|e| e.to_string())?;
            let (files, boot) = self
                .driver
                .snapshot(&spec, slot, &key[..16], staging.path())
                .await
                .map_err(|e| e.to_string())?;
            let root = self.snapshots.root.clone();
            let id = identity.clone();
            tokio::task::spawn_blocking(move || {
                snapshot::publish(&root, staging, &id, &files, ms(boot))
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(s) => {
                let bytes: u64 = s.meta.files.iter().map(|f| f.bytes).sum();
                tracing::info!(
                    language = language.name,
                    ms = ms(started.elapsed()),
                    bytes,
                    dir = %s.dir.display(),
                    "snapshot made"
                );
                self.metrics.snapshot_made();
                self.snapshots.lock().insert(key, Entry::Ready(Arc::new(s)));
            }
            Err(e) => {
                tracing::warn!(
                    language = language.name,
                    "cannot make a snapshot ({e}); its requests boot cold, next try in {} s",
                    RETRY_AFTER.as_secs()
                );
                self.metrics.snapshot_failed();
                self.snapshots
                    .lock()
                    .insert(key, Entry::Failed(Instant::now()));
            }
        }
    }

    /// A VM restored from `language`'s snapshot, if snapshots are on and one is ready (else one
    /// is made in the background and `None` returned). A failed restore is logged once per
    /// snapshot, counted, and the snapshot dropped (and removed when it is invalid).
    pub(crate) async fn restore_vm(self: &Arc<Self>, language: &Language) -> Option<Vm> {
        if !self.snapshots.active() {
            return None;
        }
        let (snap, spec) = self.ready_snapshot(language, true).await?;
        let slot = match self.new_slot().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("no slot for a restore: {e}");
                return None;
            }
        };
        let cid = slot.cid;
        match self.driver.restore(&spec, &snap, slot).await {
            Ok(vm) => {
                self.metrics.snapshot_restored();
                self.metrics.observe("restore", vm.boot);
                tracing::info!(cid, pid = vm.pid(), boot_ms = ms(vm.boot), "VM restored");
                Some(vm)
            }
            Err(e) => {
                self.metrics.snapshot_restore_failed();
                let key = snap.meta.identity.key();
                let verdict = verdict(&e);
                // The first failure of this snapshot decides what happens to it (concurrent
                // restores of the same snapshot may fail together: one log line, one removal).
                let first = {
                    let mut map = self.snapshots.lock();
                    let was_ready =
                        matches!(map.get(&key), Some(Entry::Ready(s)) if Arc::ptr_eq(s, &snap));
                    if was_ready && !matches!(verdict, Verdict::Transient) {
                        map.remove(&key);
                    }
                    was_ready
                };
                match verdict {
                    // Kept: the next request restores again.
                    Verdict::Transient => tracing::warn!(
                        cid,
                        language = language.name,
                        "restore from {} failed, booting cold instead: {e}",
                        snap.dir.display()
                    ),
                    _ if first => {
                        tracing::error!(
                            cid,
                            language = language.name,
                            "restore from {} failed, booting cold instead: {e}",
                            snap.dir.display()
                        );
                        // Removed and made again on next use; a snapshot whose files changed is
                        // only verified again (another server may have replaced it).
                        if matches!(verdict, Verdict::Invalid) {
                            snapshot::discard(&snap.dir);
                        }
                    }
                    _ => {}
                }
                None
            }
        }
    }
}

/// What a failed restore says about its snapshot.
enum Verdict {
    /// The files changed since they were verified: verify them again before the next restore.
    Reload,
    /// The hypervisor or the agent could not resume it: remove it.
    Invalid,
    /// Something else (the host busy, out of uids, a timeout): keep it.
    Transient,
}

fn verdict(e: &VmError) -> Verdict {
    match e {
        VmError::Snapshot(_) => Verdict::Reload,
        VmError::ExitedDuringBoot { .. } | VmError::Wake(_) => Verdict::Invalid,
        _ => Verdict::Transient,
    }
}
