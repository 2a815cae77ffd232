//! `GET`, `PUT`, `DELETE /sandboxes/{id}/files?path=…`: files in a sandbox's working tree,
//! streamed both ways (an upload is written as its body arrives, a download read as it is
//! sent), confined to the tree by `crate::files`. Downloads are attachments that a browser
//! never renders on the API's origin.

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::exec::acquire;
use super::{audited, ApiPath, AppState, Caller};
use crate::audit::Actor;
use crate::backend::exec::ExecError;
use crate::error::Error;
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

/// The working tree of sandbox `id`, open (the sandbox is woken like for a command).
async fn tree(state: &AppState, caller: &Caller, id: &str) -> Result<Tree, Error> {
    let (sb, _in_use, _entry) = acquire(state, caller, id).await?;
    let dir: PathBuf = state
        .manager
        .backend()
        .working_tree(&sb)
        .await
        .map_err(|e| match e {
            ExecError::NotRunning => Error::NotRunning {
                id: id.to_string(),
                status: "not running".into(),
            },
            ExecError::Unsupported(what) => Error::ExecUnsupported(what),
            other => Error::internal(other),
        })?;
    blocking(move || Tree::open(&dir).map_err(Error::from)).await
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
    let tree = tree(&state, &caller, &id).await?;
    let path = path_of(&q);
    let found = blocking(move || tree.read(&path).map_err(Error::from)).await?;
    match found {
        Found::Dir(listing) => Ok(Json(listing).into_response()),
        Found::File { file, size } => {
            let name = path_of(&q)
                .rsplit('/')
                .next()
                .unwrap_or("file")
                .replace(['"', '\\', '\r', '\n'], "_");
            let stream = tokio_util::io::ReaderStream::with_capacity(
                tokio::fs::File::from_std(file),
                64 * 1024,
            );
            Ok((
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
                Body::from_stream(stream),
            )
                .into_response())
        }
    }
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
    let tree = tree(state, caller, id).await?;
    let path = path_of(&q);
    let written = if q.dir.unwrap_or(false) {
        let mode = mode_of(&q, 0o755)?;
        blocking(move || tree.mkdir(&path, mode).map_err(Error::from)).await?
    } else {
        let mode = mode_of(&q, 0o644)?;
        let overwrite = q.overwrite.unwrap_or(true);
        let mut upload =
            blocking(move || tree.upload(&path, mode, overwrite).map_err(Error::from)).await?;
        let mut file = tokio::fs::File::from_std(upload.file());
        let limit = state.config.files_max_upload_bytes;
        let mut written = 0u64;
        let mut frames = body.into_data_stream();
        while let Some(frame) = frames.next().await {
            let bytes =
                frame.map_err(|e| Error::BadRequest(format!("the upload broke off: {e}")))?;
            written += bytes.len() as u64;
            if written > limit {
                return Err(Error::PayloadTooLarge(
                    usize::try_from(limit).unwrap_or(usize::MAX),
                ));
            }
            file.write_all(&bytes).await.map_err(Error::internal)?;
        }
        let file = file.into_std().await;
        blocking(move || upload.commit(file).map_err(Error::from)).await?
    };
    state.routes.touch(id);
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(written)).into_response())
}

async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
    super::ApiQuery(q): super::ApiQuery<FileQuery>,
) -> Result<Json<serde_json::Value>, Error> {
    let done = async {
        let tree = tree(&state, &caller, &id).await?;
        let path = path_of(&q);
        let recursive = q.recursive.unwrap_or(false);
        blocking(move || tree.delete(&path, recursive).map_err(Error::from)).await
    }
    .await;
    audited(&state, &actor, "sandbox.files.delete", Some(&id), done)?;
    Ok(Json(
        serde_json::json!({"path": path_of(&q), "deleted": true}),
    ))
}
