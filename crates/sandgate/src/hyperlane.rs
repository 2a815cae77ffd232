//! The hyper lane: connections served by hyper (HTTP/1.x and h2c), the control API, protocol
//! switches, waking stopped sandboxes, and everything the fast lane hands over. Every request
//! goes through the same policy as in the fast lane ([`crate::policy`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONNECTION, HOST, LOCATION};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::error::Error;
use crate::gateway::Gateway;
use crate::policy::{self, Decision, Grant, Head};
use crate::proxy::body::GatewayBody;

impl Gateway {
    /// Serves a connection with hyper (HTTP/1.x and h2c, the control API, upgrades), closing
    /// it gracefully once `shutdown` fires.
    pub async fn serve_hyper<I>(
        self: Arc<Self>,
        io: I,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let gw = self.clone();
        let service = hyper::service::service_fn(move |req| gw.clone().handle(req, peer));
        let conn = self
            .http
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }

    /// Handles one request; never fails (errors become responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<GatewayBody>, Infallible> {
        let (decision, html) = {
            let facts = policy::facts(req.method().as_str(), req.headers());
            let head = Head {
                method: req.method().as_str(),
                authority: req.uri().authority().map(|a| a.as_str()),
                host: req.headers().get(HOST).and_then(|h| h.to_str().ok()),
                path: req.uri().path(),
                query: req.uri().query(),
                peer: peer.ip(),
                facts: &facts,
            };
            (self.policy.check(&head), facts.html)
        };
        let version = req.version();
        let resp = match decision {
            Decision::Proxy(grant) => self.forward(req, peer, grant).await,
            Decision::Api => {
                let resp = self
                    .api
                    .clone()
                    .oneshot(req.map(axum::body::Body::new))
                    .await;
                self.policy.answered();
                Ok(match resp {
                    Ok(r) => r.map(|inner| GatewayBody::Api { inner }),
                    Err(never) => match never {},
                })
            }
            Decision::Redirect(location) => {
                self.policy.answered();
                let mut r = Response::new(GatewayBody::empty());
                *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers_mut().insert(LOCATION, v);
                }
                Ok(r)
            }
            Decision::Deny(e) => {
                self.policy.answered();
                Err(e)
            }
        };
        Ok(resp.unwrap_or_else(|e| error_response(&e, html, version)))
    }

    /// Wakes the sandbox if it sleeps, admits the request and forwards it.
    async fn forward(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        grant: Grant,
    ) -> Result<Response<GatewayBody>, Error> {
        let admitted = async {
            let grant = match grant.needs_wake() {
                true => self.policy.wake(grant).await?,
                false => grant,
            };
            let admission = self.policy.admit_owned(&grant.target, peer.ip())?;
            Ok((grant, admission))
        };
        let (grant, admission) = match admitted.await {
            Ok(a) => a,
            Err(e) => {
                self.policy.answered();
                return Err(e);
            }
        };
        let Some(upstream) = grant.upstream else {
            return Err(Error::internal("a woken sandbox has no upstream"));
        };
        self.state
            .proxy
            .forward(req, peer, grant.target, upstream, grant.upgrade, admission)
            .await
    }
}

/// A gateway-made error as the response; one whose request cannot be trusted further closes
/// the connection (HTTP/1.x).
fn error_response(e: &Error, html: bool, version: Version) -> Response<GatewayBody> {
    let mut resp = e.to_response(html).map(GatewayBody::full);
    if e.closes_connection() && version <= Version::HTTP_11 {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
