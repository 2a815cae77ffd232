//! The gateway's response body: a streamed upstream body (returning its connection to the pool
//! when it ends), a small gateway-made body, or a control-API body. An enum, not a box, so the
//! proxy path allocates nothing for it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::{Pool, PoolKey, Sender};
use super::request_body::BodyState;
use crate::admission::OwnedAdmission;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Once its response body is fully read from the sandbox, and before hyper writes its last
/// bytes to the client, returns the upstream connection to the pool and finishes the
/// request's admission (its slots and its sandbox's in-use mark are released, so whatever the
/// client does next, on any connection, finds them free). A body dropped early finishes the
/// admission, and does not return the connection.
pub struct Release {
    pool: Arc<Pool>,
    key: PoolKey,
    tx: Option<Sender>,
    admission: Option<OwnedAdmission>,
    /// The request body's progress: its size so far goes to the access log.
    request: Arc<BodyState>,
}

impl Release {
    pub fn new(
        pool: Arc<Pool>,
        key: PoolKey,
        tx: Sender,
        admission: OwnedAdmission,
        request: Arc<BodyState>,
    ) -> Release {
        Release {
            pool,
            key,
            tx: Some(tx),
            admission: Some(admission),
            request,
        }
    }

    /// `n` response body bytes went on to the client.
    fn sent(&mut self, n: usize) {
        if let Some(a) = self.admission.as_mut() {
            a.sent(n as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.pool.checkin(self.key, tx);
        }
        self.end_admission();
    }

    /// Finishes the admission, with the request body's size as it stands.
    fn end_admission(&mut self) {
        if let Some(mut a) = self.admission.take() {
            a.received(self.request.received());
        }
    }
}

impl Drop for Release {
    /// A body dropped early (the client went away) finishes the admission too.
    fn drop(&mut self) {
        self.end_admission();
    }
}

pin_project_lite::pin_project! {
    #[project = Proj]
    pub enum GatewayBody {
        Upstream { #[pin] inner: Incoming, release: Option<Release> },
        Full { data: Option<Bytes> },
        Api { #[pin] inner: axum::body::Body },
    }
}

impl GatewayBody {
    /// Wraps an upstream body; an already-finished one (HEAD, 204, 304, empty) releases at once.
    pub fn upstream(inner: Incoming, mut release: Release) -> GatewayBody {
        if inner.is_end_stream() {
            release.finish();
        }
        GatewayBody::Upstream {
            inner,
            release: Some(release),
        }
    }

    pub fn full(data: impl Into<Bytes>) -> GatewayBody {
        let data: Bytes = data.into();
        GatewayBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    pub fn empty() -> GatewayBody {
        GatewayBody::Full { data: None }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            Proj::Upstream { mut inner, release } => {
                let frame = ready!(inner.as_mut().poll_frame(cx));
                match &frame {
                    None => {
                        if let Some(r) = release.as_mut() {
                            r.finish();
                        }
                    }
                    Some(Err(_)) => {
                        // A broken upstream connection must not go back to the pool.
                        if let Some(r) = release.as_mut() {
                            r.tx = None;
                        }
                    }
                    // hyper stops polling a body whose exact length has been sent, so the
                    // last frame, not a final `None`, may be all this body ever sees.
                    Some(Ok(f)) => {
                        if let (Some(r), Some(data)) = (release.as_mut(), f.data_ref()) {
                            r.sent(data.len());
                        }
                        if inner.is_end_stream() {
                            if let Some(r) = release.as_mut() {
                                r.finish();
                            }
                        }
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Proj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Proj::Api { inner } => inner
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Upstream { inner, .. } => inner.is_end_stream(),
            GatewayBody::Full { data } => data.is_none(),
            GatewayBody::Api { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Upstream { inner, .. } => inner.size_hint(),
            GatewayBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            GatewayBody::Api { inner } => inner.size_hint(),
        }
    }
}
