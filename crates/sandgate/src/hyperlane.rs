//! The hyper lane: connections served by hyper (HTTP/1.x and h2c; on a TLS listener every
//! connection, h2 or HTTP/1.1 by ALPN), the control API, protocol switches, waking stopped
//! sandboxes, and everything the fast lane hands over. Every request
//! goes through the same policy as in the fast lane ([`crate::policy`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CACHE_CONTROL, CONNECTION, HOST, LOCATION, SET_COOKIE};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::access::X_REQUEST_ID;
use crate::admission::{Ending, Started};
use crate::error::Error;
use crate::gateway::Gateway;
use crate::policy::{self, Decision, Grant, Head};
use crate::proxy::body::GatewayBody;

impl Gateway {
    /// Serves a connection with hyper (HTTP/1.x and h2c, the control API, upgrades), closing
    /// it gracefully once `shutdown` fires, or once it has started no request for
    /// `header_timeout`: the HTTP/1.1 rule (hyper's header read timeout) for HTTP/2 too, so
    /// an h2c connection that idles, or never completes its preface or its first headers, is
    /// closed. A graceful close lets streams in progress finish (GOAWAY).
    pub async fn serve_hyper<I>(
        self: Arc<Self>,
        io: I,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let idle_limit = self.state.config.header_timeout;
        let started = Instant::now();
        // Milliseconds after `started` at which the latest request began.
        let last_request = Arc::new(AtomicU64::new(0));
        let gw = self.clone();
        let seen = last_request.clone();
        let service = hyper::service::service_fn(move |req| {
            seen.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            gw.clone().handle(req, peer)
        });
        let conn = self
            .http
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let idle = tokio::time::sleep(idle_limit);
        tokio::pin!(idle);
        let result = loop {
            tokio::select! {
                r = conn.as_mut() => break r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    break conn.await;
                }
                _ = idle.as_mut() => {
                    let last = Duration::from_millis(last_request.load(Ordering::Relaxed));
                    let idle_since = started + last;
                    if idle_since.elapsed() >= idle_limit {
                        conn.as_mut().graceful_shutdown();
                        break conn.await;
                    }
                    idle.as_mut().reset(idle_since + idle_limit);
                }
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
        let mut started = Started::now(req.method().as_str());
        let (decision, html, client) = {
            let facts = policy::facts(req.method().as_str(), req.headers());
            let client = self.policy.client(peer.ip(), &facts);
            let head = Head {
                method: req.method().as_str(),
                authority: req.uri().authority().map(|a| a.as_str()),
                host: req.headers().get(HOST).and_then(|h| h.to_str().ok()),
                path: req.uri().path(),
                query: req.uri().query(),
                peer: peer.ip(),
                client,
                facts: &facts,
            };
            started.client = client;
            started.identify(
                req.headers()
                    .get(crate::access::X_REQUEST_ID)
                    .map(HeaderValue::as_bytes),
                req.headers().get("traceparent").map(HeaderValue::as_bytes),
                head.authority.or(head.host),
                head.path,
            );
            let (decision, route) = self.policy.check(&head);
            started.route = route;
            (decision, facts.html, client)
        };
        let version = req.version();
        // An error answered while the request's body may be unread ends the connection (as in
        // the fast lane): what is left of it cannot be told from the next request.
        let mut close = !http_body::Body::is_end_stream(req.body());
        let resp = match decision {
            Decision::Proxy(grant) => {
                started.auth = policy::auth_result(&grant.principal);
                started.granted(
                    &grant.target.sandbox.id,
                    grant.target.port,
                    &grant.principal.subject,
                );
                self.forward(req, client, grant, &started).await
            }
            Decision::Api(principal) => self.api(req, principal, peer, &mut started).await,
            Decision::Redirect(location) => {
                self.policy.answered(&started, Ending::status(308));
                let mut r = Response::new(GatewayBody::empty());
                *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers_mut().insert(LOCATION, v);
                }
                Ok(r)
            }
            Decision::Preview { location, cookie } => {
                self.policy.answered(&started, Ending::status(303));
                let mut r = Response::new(GatewayBody::empty());
                *r.status_mut() = StatusCode::SEE_OTHER;
                let h = r.headers_mut();
                if let (Ok(l), Ok(c)) = (
                    HeaderValue::from_str(&location),
                    HeaderValue::from_str(&cookie),
                ) {
                    h.insert(LOCATION, l);
                    h.insert(SET_COOKIE, c);
                }
                h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                Ok(r)
            }
            Decision::Deny(e) => {
                self.policy.refused(&e, client, &started);
                Err(e)
            }
        };
        let mut resp = resp.unwrap_or_else(|e| {
            close |= e.closes_connection();
            error_response(&e, html, version, close)
        });
        // Every response names the request's id (a sandbox's own was dropped).
        if let Ok(id) = HeaderValue::from_str(started.request_id()) {
            resp.headers_mut().insert(X_REQUEST_ID, id);
        }
        Ok(resp)
    }

    /// Hands a request to the control API, acting as `principal`, once its rate-limit token
    /// is taken; finished with the status and route template the router answered with.
    async fn api(
        &self,
        mut req: Request<Incoming>,
        principal: Option<crate::auth::Principal>,
        peer: SocketAddr,
        started: &mut Started,
    ) -> Result<Response<GatewayBody>, Error> {
        if let Some(p) = principal {
            started.auth = policy::auth_result(&p);
            started.who.subject = Some(p.subject.clone());
            if let Err(e) = self.policy.admit_api(&p) {
                self.policy.answered(started, Ending::error(&e));
                return Err(e);
            }
            req.extensions_mut().insert(p);
        }
        req.extensions_mut()
            .insert(crate::api::ClientAddr(peer.ip()));
        let resp = self
            .api
            .clone()
            .oneshot(req.map(axum::body::Body::new))
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let template = resp
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map(|m| m.as_str());
        self.policy
            .answered_api(started, resp.status().as_u16(), template);
        Ok(resp.map(|inner| GatewayBody::Api { inner }))
    }

    /// Admits the request from `client`, wakes the sandbox if it sleeps, and forwards it.
    async fn forward(
        &self,
        req: Request<Incoming>,
        client: IpAddr,
        grant: Grant,
        started: &Started,
    ) -> Result<Response<GatewayBody>, Error> {
        // Admitted first, so a request over a limit starts nothing; the in-use mark it holds
        // is the sandbox's through the wake (a restart keeps its activity).
        let admission =
            match self
                .policy
                .admit_owned(&grant.target, &grant.principal, client, started)
            {
                Ok(a) => a,
                Err(e) => {
                    self.policy.answered(started, Ending::error(&e));
                    return Err(e);
                }
            };
        let waited = match grant.unready {
            false => Ok(grant),
            true => self.policy.await_ready(grant).await,
        };
        let grant = match waited {
            Ok(g) => g,
            Err(e) => {
                admission.answered(&e);
                return Err(e);
            }
        };
        let grant = match grant.needs_wake() {
            false => grant,
            true => match self.policy.wake(grant).await {
                Ok(g) => g,
                Err(e) => {
                    admission.answered(&e);
                    return Err(e);
                }
            },
        };
        let Some(upstream) = grant.upstream else {
            let e = Error::internal("a woken sandbox has no upstream");
            admission.failed(&e);
            return Err(e);
        };
        let failover = |target: &mut crate::proxy::Target,
                        admission: &mut crate::admission::OwnedAdmission| {
            self.policy.failover_owned(target, client, admission)
        };
        self.state
            .proxy
            .forward(
                req,
                client,
                grant.target,
                upstream,
                grant.upgrade,
                admission,
                &failover,
            )
            .await
    }
}

/// A gateway-made error as the response, closing the connection (HTTP/1.x) if `close`.
fn error_response(e: &Error, html: bool, version: Version, close: bool) -> Response<GatewayBody> {
    let mut resp = e.to_response(html).map(GatewayBody::full);
    if close && version <= Version::HTTP_11 {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
