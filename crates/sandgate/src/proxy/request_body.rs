//! A client's request body on its way to a sandbox (hyper lane): streamed as it comes, cut
//! when it stalls longer than the body timeout, and watched so that the proxy can tell a
//! client's fault (a malformed or stalled body: 400 or 408) from the sandbox's (502), and
//! whether the body was read to its end before the response (else the connection closes).
//! Trailer fields are dropped.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::error::Error;

const DONE: u8 = 1;
const BROKEN: u8 = 2;
const STALLED: u8 = 4;

/// What became of a request body, readable while hyper's client still holds it.
#[derive(Debug, Default)]
pub struct BodyState(AtomicU8, AtomicU64);

impl BodyState {
    fn set(&self, flag: u8) {
        self.0.fetch_or(flag, Ordering::Relaxed);
    }

    /// Data bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.1.load(Ordering::Relaxed)
    }

    /// The whole body was read from the client.
    pub fn done(&self) -> bool {
        self.0.load(Ordering::Relaxed) & DONE != 0
    }

    /// The client's fault if the body failed: the error to answer with.
    pub fn client_error(&self, timeout: Duration) -> Option<Error> {
        let flags = self.0.load(Ordering::Relaxed);
        if flags & STALLED != 0 {
            Some(Error::BodyTimeout(timeout))
        } else if flags & BROKEN != 0 {
            Some(Error::BadFraming(
                "the request body is malformed or was cut short",
            ))
        } else {
            None
        }
    }
}

pin_project_lite::pin_project! {
    pub struct ClientBody {
        // `None`: an empty body (a request sent again).
        #[pin]
        inner: Option<Incoming>,
        timeout: Duration,
        // Boxed: most requests have no body and never need one.
        stall: Option<Pin<Box<Sleep>>>,
        state: Arc<BodyState>,
    }
}

impl ClientBody {
    pub fn new(inner: Incoming, timeout: Duration) -> (ClientBody, Arc<BodyState>) {
        let state = Arc::new(BodyState::default());
        if inner.is_end_stream() {
            state.set(DONE);
        }
        let body = ClientBody {
            inner: Some(inner),
            timeout,
            stall: None,
            state: state.clone(),
        };
        (body, state)
    }

    /// An empty body, for a body-less request sent again on a fresh connection.
    pub fn empty(&self) -> ClientBody {
        ClientBody {
            inner: None,
            timeout: self.timeout,
            stall: None,
            state: self.state.clone(),
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let Some(mut inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(None);
        };
        match inner.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                this.state.set(DONE);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                // Trailers never reach a sandbox (they could carry gateway credentials), in
                // either lane; they end the body.
                this.state.set(DONE);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.state.1.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                // hyper stops polling a body whose exact length has been sent, so the last
                // frame, not a final `None`, may be all this body ever sees.
                if inner.is_end_stream() {
                    this.state.set(DONE);
                }
                if let Some(stall) = this.stall.as_mut() {
                    stall.as_mut().reset(Instant::now() + *this.timeout);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.set(BROKEN);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                let timeout = *this.timeout;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.state.set(STALLED);
                        Poll::Ready(Some(Err(Error::BodyTimeout(timeout).into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
