//! `GET`, `PUT`, `DELETE /sandboxes/{id}/files?path=…`: files in a sandbox's working tree,
//! streamed both ways (an upload is written as its body arrives, a download read as it is
//! sent), confined to the tree by `crate::files`, or reached through the sandbox's exec by
//! `crate::exec_files` where the backend has no host path to it (Kubernetes). Downloads are
//! attachments that a browser never renders on the API's origin.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::exec::acquire;
use super::{audited, ApiPath, AppState, Caller};
use crate::audit::Actor;
use crate::backend::exec::ExecError;
use crate::backend::FilesAt;
use crate::error::Error;
use crate::exec_files::{self, ExecFiles, ExecFilesError};
use crate::files::{Found, Tree};

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/sandboxes/{id}/files",
        get(download).put(upload).delete(remove),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQuery {
    path: Option<String>,
    /// `PUT`: create a directory instead of a file.
    dir: Option<bool>,
    /// `PUT`: octal permission bits (default 0644, 0755 for directories).
    mode: Option<String>,
    /// `PUT`: replace an existing file (default true).
    overwrite: Option<bool>,
    /// `DELETE`: a directory with everything in it.
    recursive: Option<bool>,
}

/// A sandbox's working tree: open on this host, or reached through the sandbox's exec.
enum Reached {
    Tree(Tree),
    Exec(ExecFiles),
}

/// What a failure to run something in sandbox `id` means for the client.
fn exec_error(id: &str, e: ExecError) -> Error {
    match e {
        ExecError::NotRunning => Error::NotRunning {
            id: id.to_string(),
            status: "not running".into(),
        },
        ExecError::Unsupported(what) => Error::ExecUnsupported(what),
        ExecError::NotStarted { message, .. } => Error::UnsupportedOperation(format!(
            "files here are reached through a /bin/sh script in the sandbox, which could not \
             run: {message}"
        )),
        other => Error::internal(other),
    }
}

fn exec_files_error(id: &str, e: ExecFilesError) -> Error {
    match e {
        ExecFilesError::Files(e) => e.into(),
        ExecFilesError::Exec(e) => exec_error(id, e),
    }
}

/// The working tree of sandbox `id` (the sandbox is woken like for a command).
async fn reach(state: &AppState, caller: &Caller, id: &str) -> Result<Reached, Error> {
    let (sb, _in_use, _entry) = acquire(state, caller, id).await?;
    let backend = state.manager.backend();
    match backend.files_at(&sb).await.map_err(|e| exec_error(id, e))? {
        FilesAt::Host(dir) => blocking(move || Tree::open(&dir).map_err(Error::from))
            .await
            .map(Reached::Tree),
        FilesAt::Exec => Ok(Reached::Exec(ExecFiles::new(backend.clone(), sb))),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(Error::internal)?
}

fn path_of(q: &FileQuery) -> String {
    q.path.clone().unwrap_or_default()
}

async fn download(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    super::ApiQuery(q): super::ApiQuery<FileQuery>,
) -> Result<Response, Error> {
    let path = path_of(&q);
    match reach(&state, &caller, &id).await? {
        Reached::Tree(tree) => {
            match blocking(move || tree.read(&path).map_err(Error::from)).await? {
                Found::Dir(listing) => Ok(Json(listing).into_response()),
                Found::File { file, size } => {
                    let stream = tokio_util::io::ReaderStream::with_capacity(
                        tokio::fs::File::from_std(file),
                        64 * 1024,
                    );
                    Ok(attachment(&q, size, Body::from_stream(stream)))
                }
            }
        }
        Reached::Exec(files) => match files
            .read(&path)
            .await
            .map_err(|e| exec_files_error(&id, e))?
        {
            exec_files::Found::Dir(listing) => Ok(Json(listing).into_response()),
            exec_files::Found::File { size, body } => {
                Ok(attachment(&q, size, Body::from_stream(body)))
            }
        },
    }
}

/// A file's bytes as a download.
fn attachment(q: &FileQuery, size: u64, body: Body) -> Response {
    let name = path_of(q)
        .rsplit('/')
        .next()
        .unwrap_or("file")
        .replace(['"', '\\', '\r', '\n'], "_");
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
            (header::CONTENT_SECURITY_POLICY, "sandbox".to_string()),
        ],
        body,
    )
        .into_response()
}

fn mode_of(q: &FileQuery, default: u32) -> Result<u32, Error> {
    match &q.mode {
        None => Ok(default),
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| Error::Validation(format!("mode {m:?} is not octal permission bits"))),
    }
}

async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
    super::ApiQuery(q): super::ApiQuery<FileQuery>,
    body: Body,
) -> Result<Response, Error> {
    let done = upload_to(&state, &caller, &id, q, body).await;
    audited(&state, &actor, "sandbox.files.write", Some(&id), done)
}

async fn upload_to(
    state: &AppState,
    caller: &Caller,
    id: &str,
    q: FileQuery,
    body: Body,
) -> Result<Response, Error> {
    let reached = reach(state, caller, id).await?;
    let path = path_of(&q);
    let limit = state.config.files_max_upload_bytes;
    let dir = q.dir.unwrap_or(false);
    let mode = mode_of(&q, if dir { 0o755 } else { 0o644 })?;
    let overwrite = q.overwrite.unwrap_or(true);
    let ex = |e| exec_files_error(id, e);
    let written = match reached {
        Reached::Tree(tree) if dir => {
            blocking(move || tree.mkdir(&path, mode).map_err(Error::from)).await?
        }
        Reached::Tree(tree) => {
            let mut upload =
                blocking(move || tree.upload(&path, mode, overwrite).map_err(Error::from)).await?;
            let mut file = tokio::fs::File::from_std(upload.file());
            pump(body, limit, &mut file).await?;
            let file = file.into_std().await;
            blocking(move || upload.commit(file).map_err(Error::from)).await?
        }
        Reached::Exec(files) if dir => files.mkdir(&path, mode).await.map_err(ex)?,
        Reached::Exec(files) => {
            let mut upload = files.upload(&path, mode, overwrite).await.map_err(ex)?;
            pump(body, limit, upload.sink()).await?;
            upload.commit().await.map_err(ex)?
        }
    };
    state.routes.touch(id);
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(written)).into_response())
}

/// Writes the request body to `sink` as it arrives, refusing more than `limit` bytes.
async fn pump(
    body: Body,
    limit: u64,
    sink: &mut (impl AsyncWrite + Unpin + ?Sized),
) -> Result<(), Error> {
    let mut written = 0u64;
    let mut frames = body.into_data_stream();
    while let Some(frame) = frames.next().await {
        let bytes = frame.map_err(|e| Error::BadRequest(format!("the upload broke off: {e}")))?;
        written += bytes.len() as u64;
        if written > limit {
            return Err(Error::PayloadTooLarge(
                usize::try_from(limit).unwrap_or(usize::MAX),
            ));
        }
        sink.write_all(&bytes).await.map_err(Error::internal)?;
    }
    Ok(())
}

async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
    super::ApiQuery(q): super::ApiQuery<FileQuery>,
) -> Result<Json<serde_json::Value>, Error> {
    let done = async {
        let path = path_of(&q);
        let recursive = q.recursive.unwrap_or(false);
        match reach(&state, &caller, &id).await? {
            Reached::Tree(tree) => {
                blocking(move || tree.delete(&path, recursive).map_err(Error::from)).await
            }
            Reached::Exec(files) => files
                .delete(&path, recursive)
                .await
                .map_err(|e| exec_files_error(&id, e)),
        }
    }
    .await;
    audited(&state, &actor, "sandbox.files.delete", Some(&id), done)?;
    Ok(Json(
        serde_json::json!({"path": path_of(&q), "deleted": true}),
    ))
}
