//! `GET`, `PUT` and `DELETE /v1/files?path=`: a sandbox's files, read and written by the agent
//! (root in the VM, which is the wall) on behalf of the sandbox user. Bounded: one file at most
//! [`MAX_SANDBOX_FILE_BYTES`], a listing at most [`MAX_LISTING_ENTRIES`] entries.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cloude_protocol::sandbox::{
    validate_sandbox_path, DirEntry, FileOp, FileOpAnswer, Listing, SandboxUser,
    MAX_LISTING_ENTRIES, MAX_SANDBOX_FILE_BYTES,
};
use serde::Deserialize;

use crate::server::{check_unsealed, AgentState, ApiError};

#[derive(Debug, Deserialize)]
pub struct FileQuery {
    path: String,
    /// Owner of what a `PUT` creates.
    #[serde(default)]
    user: SandboxUser,
    /// Octal mode of the file a `PUT` writes (default 644).
    mode: Option<String>,
    /// The largest file a `GET` may answer (at most [`MAX_SANDBOX_FILE_BYTES`]).
    max: Option<u64>,
}

fn checked(q: &FileQuery) -> Result<PathBuf, ApiError> {
    validate_sandbox_path(&q.path).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(PathBuf::from(&q.path))
}

fn io_error(path: &Path, e: std::io::Error) -> ApiError {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            ApiError::NotFound(format!("{}: no such file", path.display()))
        }
        _ => ApiError::BadRequest(format!("{}: {e}", path.display())),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::Internal)?
}

/// A file's bytes, or a directory's listing (JSON).
pub async fn get(
    State(state): State<Arc<AgentState>>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    check_unsealed(&state)?;
    let path = checked(&q)?;
    let max = q
        .max
        .unwrap_or(MAX_SANDBOX_FILE_BYTES)
        .min(MAX_SANDBOX_FILE_BYTES);
    blocking(move || {
        let meta = std::fs::metadata(&path).map_err(|e| io_error(&path, e))?;
        if meta.is_dir() {
            return Ok(Json(list(&path)?).into_response());
        }
        if !meta.is_file() {
            return Err(ApiError::BadRequest(format!(
                "{}: not a regular file or a directory",
                path.display()
            )));
        }
        if meta.len() > max {
            return Err(too_large(&path, meta.len(), max));
        }
        use std::io::Read as _;
        let mut data = Vec::with_capacity(meta.len() as usize);
        std::fs::File::open(&path)
            .and_then(|f| f.take(max + 1).read_to_end(&mut data))
            .map_err(|e| io_error(&path, e))?;
        if data.len() as u64 > max {
            return Err(too_large(&path, data.len() as u64, max));
        }
        Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
    })
    .await
}

fn too_large(path: &Path, n: u64, max: u64) -> ApiError {
    ApiError::Body(
        format!(
            "{} is {n} bytes, more than the {max} a call may read",
            path.display()
        ),
        StatusCode::PAYLOAD_TOO_LARGE,
    )
}

/// What a listing or a stat says of `path`, named `name`.
fn entry(path: &Path, name: String, m: &std::fs::Metadata) -> DirEntry {
    use std::os::unix::fs::MetadataExt as _;
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    };
    DirEntry {
        name,
        kind: kind.into(),
        size: m.len(),
        mode: m.mode() & 0o7777,
        modified_ms: m.mtime().saturating_mul(1000) + m.mtime_nsec() / 1_000_000,
        uid: m.uid(),
        gid: m.gid(),
        target: ft
            .is_symlink()
            .then(|| std::fs::read_link(path).ok())
            .flatten()
            .map(|t| t.display().to_string()),
    }
}

fn stat(path: &Path) -> Result<FileOpAnswer, ApiError> {
    let m = path.symlink_metadata().map_err(|e| io_error(path, e))?;
    let name = path
        .file_name()
        .map_or_else(|| "/".into(), |n| n.to_string_lossy().into_owned());
    Ok(FileOpAnswer {
        path: path.display().to_string(),
        entry: entry(path, name, &m),
        created: false,
    })
}

/// Makes `dir` and its missing parents, each handed to `uid`:`gid`; whether it made `dir`.
fn make_dirs(dir: &Path, uid: u32, gid: u32) -> Result<bool, ApiError> {
    let mut missing = Vec::new();
    let mut p = dir;
    while p.symlink_metadata().is_err() {
        missing.push(p.to_path_buf());
        p = p.parent().unwrap_or(Path::new("/"));
    }
    for d in missing.iter().rev() {
        std::fs::create_dir(d).map_err(|e| io_error(d, e))?;
        let _ = std::os::unix::fs::chown(d, Some(uid), Some(gid));
    }
    if !dir.is_dir() {
        return Err(ApiError::Conflict(format!(
            "{}: exists and is not a directory",
            dir.display()
        )));
    }
    Ok(!missing.is_empty())
}

/// `POST /v1/files/op`: stat, make a directory, move.
pub async fn op(
    State(state): State<Arc<AgentState>>,
    Json(op): Json<FileOp>,
) -> Result<Json<FileOpAnswer>, ApiError> {
    check_unsealed(&state)?;
    op.validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let ids = state.executor.program_ids();
    blocking(move || match op {
        FileOp::Stat { path } => stat(Path::new(&path)),
        FileOp::MakeDir { path, user } => {
            let (uid, gid) = match user {
                SandboxUser::Root => (0, 0),
                SandboxUser::User => ids,
            };
            let created = make_dirs(Path::new(&path), uid, gid)?;
            let mut a = stat(Path::new(&path))?;
            a.created = created;
            Ok(a)
        }
        FileOp::Move { from, to } => {
            std::fs::rename(&from, &to).map_err(|e| io_error(Path::new(&from), e))?;
            stat(Path::new(&to))
        }
    })
    .await
    .map(Json)
}

fn list(dir: &Path) -> Result<Listing, ApiError> {
    let mut entries = Vec::new();
    let mut truncated = false;
    for e in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let Ok(e) = e else { continue };
        if entries.len() >= MAX_LISTING_ENTRIES {
            truncated = true;
            break;
        }
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        entries.push(entry(
            &e.path(),
            e.file_name().to_string_lossy().into_owned(),
            &m,
        ));
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Listing {
        path: dir.display().to_string(),
        entries,
        truncated,
    })
}

/// Writes the body to the file (replacing it), making missing parent directories; what it
/// makes belongs to `user`.
pub async fn put(
    State(state): State<Arc<AgentState>>,
    Query(q): Query<FileQuery>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    check_unsealed(&state)?;
    let path = checked(&q)?;
    let mode = match &q.mode {
        None => 0o644,
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| ApiError::BadRequest(format!("mode {m:?} is not an octal mode")))?,
    };
    let (uid, gid) = match q.user {
        SandboxUser::Root => (0, 0),
        SandboxUser::User => state.executor.program_ids(),
    };
    blocking(move || {
        use std::os::unix::fs::PermissionsExt as _;
        let parent = path
            .parent()
            .ok_or_else(|| ApiError::BadRequest("cannot write /".into()))?;
        make_dirs(parent, uid, gid)?;
        std::fs::write(&path, &body).map_err(|e| io_error(&path, e))?;
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(|e| io_error(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_error(&path, e))?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// Removes a file, or a directory with everything in it.
pub async fn delete(
    State(state): State<Arc<AgentState>>,
    Query(q): Query<FileQuery>,
) -> Result<StatusCode, ApiError> {
    check_unsealed(&state)?;
    let path = checked(&q)?;
    if path == Path::new("/") {
        return Err(ApiError::BadRequest("refusing to delete /".into()));
    }
    blocking(move || {
        let meta = path.symlink_metadata().map_err(|e| io_error(&path, e))?;
        if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .map_err(|e| io_error(&path, e))?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}
