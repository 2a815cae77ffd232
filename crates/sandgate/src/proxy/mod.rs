//! The reverse proxy: forwards a request to one port of one sandbox over a pooled HTTP/1.1
//! connection, streaming bodies both ways, and splices WebSocket (and other) upgrades.
//!
//! `PROXY_TIMEOUT` bounds connecting and waiting for the response head only; a body or an
//! upgraded connection in progress is never cut by it.

pub mod body;
pub mod headers;
pub mod pool;
pub mod request_body;
pub mod upgrade;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, HOST, LOCATION};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::admission::OwnedAdmission;
use crate::backend::{Backend, Upstream};
use crate::error::Error;
use crate::metrics::{Metrics, Retry};
use crate::model::Sandbox;
use crate::routes::Entry;
use body::{GatewayBody, Release};
use pool::{Pool, PoolKey, Sender};
use request_body::ClientBody;

/// Where a routed request goes.
pub struct Target {
    /// The sandbox (its instance 0): who may reach it, its limits, what errors name.
    pub sandbox: Arc<Entry>,
    /// Which of its instances the balancer chose (see [`crate::balance::instance`]): the one
    /// dialed, whose in-flight count and circuit breaker the request counts against.
    pub instance: usize,
    pub port: u16,
    /// The path prefix that routed it (`/sandbox/{id}` or `/{owner}/{name}`), sent as
    /// `X-Forwarded-Prefix` (built once, as the header value it becomes) and stripped before
    /// forwarding unless the sandbox keeps it ([`Target::stripped_prefix`]); `None` for host
    /// routes.
    pub prefix: Option<HeaderValue>,
    /// The request's `Authorization` field was the gateway's credential: it is not forwarded.
    pub strip_authorization: bool,
}

impl Target {
    /// The instance the request is sent to.
    pub fn dialed(&self) -> &Arc<Entry> {
        crate::balance::instance(&self.sandbox, self.instance)
    }

    /// The prefix the sandbox's app does not see: taken off the path on the way in, and put
    /// back into a local absolute `Location` on the way out. `None` for a host route, or a
    /// sandbox with `path_prefix: keep` (its app writes its own `Location`s under the prefix).
    pub fn stripped_prefix(&self) -> Option<&HeaderValue> {
        self.prefix.as_ref().filter(|_| !self.sandbox.keep_prefix)
    }
}

pub struct Proxy {
    backend: Arc<dyn Backend>,
    pool: Arc<Pool>,
    /// Idle upstream connections of the HTTP/1.1 fast lane (`crate::fastlane`), one pool per
    /// connection worker (`crate::workers`), so a connection is reused by the event loop that
    /// watches it.
    raw_pools: Box<[Pool<tokio::net::TcpStream>]>,
    timeout: Duration,
    body_timeout: Duration,
    retries: u32,
    /// How clients reach the gateway (`http`, or `https` on a TLS listener): the
    /// `X-Forwarded-Proto` a sandbox gets and the scheme of rewritten `Location`s.
    scheme: &'static str,
    /// Where connect times and retries are recorded.
    metrics: Arc<Metrics>,
    /// Fires when the gateway stops serving: upgraded streams end (WebSockets with 1001).
    stopping: tokio_util::sync::CancellationToken,
}

/// Moves a request whose instance refused its connection to another instance of the same
/// sandbox (the request policy's balancer): the new upstream, with `target` and the admission
/// moved to it; `None` if there is no other.
pub type Failover<'a> =
    &'a (dyn Fn(&mut Target, &mut OwnedAdmission) -> Option<Upstream> + Send + Sync);

/// Why a request did not get a response head from the sandbox.
pub(crate) enum SendError {
    /// Nothing listens on the port (after the configured retries).
    Refused,
    /// Connecting failed otherwise.
    Dial(std::io::Error),
    /// The connection broke while the request was under way.
    Protocol(hyper::Error),
}

impl Proxy {
    pub fn new(
        backend: Arc<dyn Backend>,
        timeout: Duration,
        body_timeout: Duration,
        retries: u32,
        workers: usize,
    ) -> Proxy {
        Proxy {
            backend,
            pool: Arc::new(Pool::new(256, Duration::from_secs(60))),
            raw_pools: (0..workers.max(1))
                .map(|_| Pool::new(256, Duration::from_secs(60)))
                .collect(),
            timeout,
            body_timeout,
            retries,
            scheme: "http",
            metrics: Arc::new(Metrics::new(1, false)),
            stopping: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Ends upgraded streams when `stopping` fires.
    pub fn with_stopping(mut self, stopping: tokio_util::sync::CancellationToken) -> Proxy {
        self.stopping = stopping;
        self
    }

    /// Records connect times and retries into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Proxy {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sets the scheme clients use (`https` on a TLS listener; `http` is the default).
    pub fn with_scheme(mut self, scheme: &'static str) -> Proxy {
        self.scheme = scheme;
        self
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The current worker's fast-lane pool.
    pub fn raw_pool(&self) -> &Pool<tokio::net::TcpStream> {
        let i = crate::event_loop::current();
        &self.raw_pools[i.min(self.raw_pools.len() - 1)]
    }

    /// Every worker's fast-lane pool (for the periodic sweep).
    pub fn raw_pools(&self) -> &[Pool<tokio::net::TcpStream>] {
        &self.raw_pools
    }

    /// Open upstream connections waiting for a request.
    pub fn idle_upstreams(&self) -> usize {
        self.pool.idle_count() + self.raw_pools.iter().map(Pool::idle_count).sum::<usize>()
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// `PROXY_TIMEOUT`: how long connecting and waiting for a response head may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long a request body may stall before it is cut.
    pub fn body_timeout(&self) -> Duration {
        self.body_timeout
    }

    /// Forwards `req` from `client` (the address the request policy resolved) to the granted
    /// target over `upstream`, holding `admission` until the response (or upgraded stream)
    /// ends; a refused connection to one instance of a sandbox with replicas goes to another
    /// by `failover`. Errors are the gateway's own and are rendered by the caller; the
    /// admission finishes with them.
    #[allow(clippy::too_many_arguments)]
    pub async fn forward(
        &self,
        req: Request<Incoming>,
        client: IpAddr,
        target: Target,
        upstream: Upstream,
        upgrade: bool,
        admission: OwnedAdmission,
        failover: Failover<'_>,
    ) -> Result<Response<GatewayBody>, Error> {
        let mut held = Some(admission);
        let result = self
            .forward_admitted(req, client, target, upstream, upgrade, &mut held, failover)
            .await;
        if let (Err(e), Some(admission)) = (&result, held.take()) {
            admission.failed(e);
        }
        result
    }

    /// `forward`, taking the admission from `held` where it goes on with the response.
    #[allow(clippy::too_many_arguments)]
    async fn forward_admitted(
        &self,
        mut req: Request<Incoming>,
        client: IpAddr,
        mut target: Target,
        upstream: Upstream,
        upgrade: bool,
        held: &mut Option<OwnedAdmission>,
        failover: Failover<'_>,
    ) -> Result<Response<GatewayBody>, Error> {
        let mut key = pool_key(target.dialed(), upstream);
        let client_version = req.version();
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let public_host = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| req.headers().get(HOST).cloned());
        let protocol = upgrade
            .then(|| req.headers().get(http::header::UPGRADE).cloned())
            .flatten();
        let (parts, body) = req.into_parts();
        let (body, body_state) = ClientBody::new(body, self.body_timeout);
        let forwarded = headers::Forwarded {
            client_ip: client,
            proto: self.scheme,
            host: public_host.as_ref(),
            prefix: target.prefix.as_ref(),
            upstream_port: upstream.port(),
            strip_authorization: target.strip_authorization,
            request_id: held.as_ref().map_or("", |a| a.started().request_id()),
        };
        let up_req = upstream_request(&parts, body, &target, &forwarded, protocol.as_ref())?;

        let timeout = self.timeout;
        let sent = tokio::time::timeout(
            timeout,
            self.send(&mut key, up_req, &mut target, held, failover),
        )
        .await;
        let sb = &target.sandbox;
        let (resp, tx) = match sent {
            Ok(Ok((resp, tx, connect))) => {
                if let (Some(d), Some(a)) = (connect, held.as_mut()) {
                    a.connected(d);
                }
                (resp, tx)
            }
            Ok(Err(e)) => {
                if let Some(a) = held.as_mut() {
                    a.received(body_state.received());
                }
                return Err(body_state
                    .client_error(self.body_timeout)
                    .unwrap_or_else(|| upstream_error(sb, target.port, e)));
            }
            Err(_) => {
                if let Some(a) = held.as_mut() {
                    a.received(body_state.received());
                }
                return Err(body_state.client_error(self.body_timeout).unwrap_or(
                    Error::UpstreamTimeout {
                        id: sb.id.clone(),
                        port: target.port,
                        timeout,
                    },
                ));
            }
        };

        let (mut parts, body) = resp.into_parts();
        parts.version = client_version;
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            if let (Some(client_upgrade), Some(mut admission)) = (client_upgrade, held.take()) {
                let upstream_upgrade =
                    hyper::upgrade::on(Response::from_parts(parts.clone(), body));
                admission.upgraded();
                let websocket = protocol
                    .as_ref()
                    .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
                tokio::spawn(upgrade::splice(
                    client_upgrade,
                    upstream_upgrade,
                    target.sandbox.clone(),
                    admission,
                    websocket,
                    self.stopping.clone(),
                ));
                headers::strip_response_hop_by_hop(&mut parts.headers, true);
                return Ok(Response::from_parts(parts, GatewayBody::empty()));
            }
            return Err(Error::UpstreamProtocol {
                id: sb.id.clone(),
                reason: "switched protocols without an upgrade request".into(),
            });
        }
        headers::strip_response_hop_by_hop(&mut parts.headers, false);
        if let Some(loc) = parts.headers.get(LOCATION) {
            let origin = public_origin(self.scheme, public_host.as_ref());
            let ports = [target.port, key.upstream.port()];
            let prefix = target
                .stripped_prefix()
                .and_then(|p| p.to_str().ok())
                .unwrap_or("");
            if let Some(new) = headers::rewrite_location(loc, &ports, &origin, prefix) {
                parts.headers.insert(LOCATION, new);
            }
        }
        if !body_state.done() && client_version <= Version::HTTP_11 {
            // The sandbox answered before reading the whole request: what is left of the body
            // will not be read, so the connection cannot carry another request.
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let Some(mut admission) = held.take() else {
            return Err(Error::internal("a request's admission was taken twice"));
        };
        admission.respond(parts.status.as_u16());
        let release = Release::new(self.pool.clone(), key, tx, admission, body_state);
        Ok(Response::from_parts(
            parts,
            GatewayBody::upstream(body, release),
        ))
    }

    /// Sends on a pooled connection, or a new one; retries only what provably was not sent.
    /// A new connection an instance refuses goes to another instance by `failover` (then
    /// `key`, `target` and the admission in `held` name that one).
    async fn send(
        &self,
        key: &mut PoolKey,
        mut req: Request<ClientBody>,
        target: &mut Target,
        held: &mut Option<OwnedAdmission>,
        failover: Failover<'_>,
    ) -> Result<(Response<Incoming>, Sender, Option<Duration>), SendError> {
        if let Some(mut tx) = self.pool.checkout(key) {
            if tx.ready().await.is_ok() {
                // A kept connection the sandbox let go of just now fails the request: one
                // that is harmless to repeat goes again on a fresh connection.
                let has_body = !http_body::Body::is_end_stream(req.body());
                let again = may_resend(is_idempotent(req.method().as_str()), has_body)
                    .then(|| copy_bodiless(&req));
                match tx.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, tx, None)),
                    Err(mut e) => match (e.take_message(), again) {
                        (None, Some(r)) => {
                            self.metrics.retried(Retry::Resend);
                            req = r;
                        }
                        // Never written: the pooled connection had died; use a fresh one.
                        (Some(r), _) => req = r,
                        (None, None) => return Err(SendError::Protocol(e.into_error())),
                    },
                }
            }
        }
        let others = !target.sandbox.instances().is_empty();
        loop {
            let first = key.upstream;
            let fields = req.headers_mut();
            let (stream, took) = self
                .dial_instance(first, others, || {
                    self.move_on(key, &mut *fields, target, held, failover)
                })
                .await?;
            let mut tx = self.handshake(stream).await?;
            // An instance of a sandbox with others that drops a fresh connection before
            // answering (a server dying with connections in its backlog): a request that is
            // harmless to repeat goes to another instance.
            let has_body = !http_body::Body::is_end_stream(req.body());
            let again = (others && may_resend(is_idempotent(req.method().as_str()), has_body))
                .then(|| copy_bodiless(&req));
            match tx.send_request(req).await {
                Ok(resp) => return Ok((resp, tx, Some(took))),
                Err(e) => {
                    let Some(mut r) = again else {
                        return Err(SendError::Protocol(e));
                    };
                    if self
                        .move_on(key, r.headers_mut(), target, held, failover)
                        .is_none()
                    {
                        return Err(SendError::Protocol(e));
                    }
                    req = r;
                }
            }
        }
    }

    /// Moves a request whose instance failed it (nothing answered) to another instance of its
    /// sandbox by `failover`: `key`, the `Host` field in `fields`, `target` and the admission
    /// in `held` follow; the new upstream, or `None` if there is no other.
    fn move_on(
        &self,
        key: &mut PoolKey,
        fields: &mut http::HeaderMap,
        target: &mut Target,
        held: &mut Option<OwnedAdmission>,
        failover: Failover<'_>,
    ) -> Option<Upstream> {
        let upstream = failover(target, held.as_mut()?)?;
        *key = pool_key(target.dialed(), upstream);
        headers::set_upstream_host(fields, upstream.port());
        Some(upstream)
    }

    /// An HTTP/1.1 connection over a dialed stream (see `dial`).
    async fn handshake(&self, stream: tokio::net::TcpStream) -> Result<Sender, SendError> {
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Protocol)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }

    /// Connects to a sandbox port, retrying refused connections briefly (a port may be
    /// opening just now); with the time it took (recorded in the metrics too), which the
    /// request's access-log line names.
    pub(crate) async fn dial(
        &self,
        upstream: Upstream,
    ) -> Result<(tokio::net::TcpStream, Duration), SendError> {
        self.dial_with(upstream, self.retries).await
    }

    /// Dials `upstream`, an instance of a sandbox; when it refuses and the sandbox has
    /// `others`, `next` moves the request to another instance (the policy's failover; the
    /// caller's state follows it), which is dialed at once instead of waiting for the first
    /// one's port to open. With no other left, the last is dialed with `MAX_RETRIES` as a
    /// sandbox of one instance is. Both lanes connect through this.
    pub(crate) async fn dial_instance(
        &self,
        mut upstream: Upstream,
        others: bool,
        mut next: impl FnMut() -> Option<Upstream>,
    ) -> Result<(tokio::net::TcpStream, Duration), SendError> {
        if others {
            loop {
                match self.dial_with(upstream, 0).await {
                    Err(SendError::Refused) => match next() {
                        Some(u) => upstream = u,
                        None => break,
                    },
                    other => return other,
                }
            }
        }
        self.dial(upstream).await
    }

    /// `dial`, with at most `retries` extra attempts on a refusal.
    async fn dial_with(
        &self,
        upstream: Upstream,
        retries: u32,
    ) -> Result<(tokio::net::TcpStream, Duration), SendError> {
        let mut attempt = 0;
        let began = std::time::Instant::now();
        let stream = loop {
            match upstream.dial().await {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    if attempt >= retries {
                        return Err(SendError::Refused);
                    }
                    attempt += 1;
                    self.metrics.retried(Retry::Connect);
                    tokio::time::sleep(Duration::from_millis(25 << attempt.min(5))).await;
                }
                Err(e) => return Err(SendError::Dial(e)),
            }
        };
        let took = began.elapsed();
        self.metrics.connected(took);
        Ok((stream, took))
    }
}

/// The pool key of `upstream` of instance `sb`.
pub fn pool_key(sb: &Entry, upstream: Upstream) -> PoolKey {
    PoolKey {
        upstream,
        generation: sb.generation,
        epoch: sb.created_at.timestamp_millis(),
    }
}

/// Whether a request that failed on a reused upstream connection (which the sandbox may have
/// closed just as it was sent) may go again on a fresh one: only if repeating it is harmless
/// and it carried no body. Both lanes follow this rule.
pub fn may_resend(idempotent: bool, has_body: bool) -> bool {
    idempotent && !has_body
}

/// Methods that may be repeated without changing the outcome (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// The same request, with an empty body (for a body-less request sent again).
fn copy_bodiless(req: &Request<ClientBody>) -> Request<ClientBody> {
    let mut copy = Request::new(req.body().empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// The gateway's error for a request the sandbox did not answer.
pub(crate) fn upstream_error(sb: &Sandbox, port: u16, e: SendError) -> Error {
    let id = sb.id.clone();
    match e {
        SendError::Refused => Error::UpstreamUnreachable {
            id,
            port,
            reason: "connection refused".into(),
        },
        SendError::Dial(e) => Error::UpstreamUnreachable {
            id,
            port,
            reason: e.to_string(),
        },
        SendError::Protocol(e) => Error::UpstreamProtocol {
            id,
            reason: e.to_string(),
        },
    }
}

/// Builds the request the sandbox receives: origin-form URI without the route prefix (and
/// without the gateway's credential parameter), HTTP/1.1, header fields by the one table in
/// `headers`, `X-Forwarded-*` set.
fn upstream_request(
    parts: &http::request::Parts,
    body: ClientBody,
    target: &Target,
    forwarded: &headers::Forwarded<'_>,
    protocol: Option<&HeaderValue>,
) -> Result<Request<ClientBody>, Error> {
    let pq = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let prefix_len = target.stripped_prefix().map_or(0, HeaderValue::len);
    let rest = &pq[prefix_len.min(pq.len())..];
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let stripped = query.and_then(headers::query_without_credentials);
    let query = stripped.as_deref().or(query);
    let mut uri = String::with_capacity(rest.len() + 1);
    if !path.starts_with('/') {
        uri.push('/');
    }
    uri.push_str(path);
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        uri.push('?');
        uri.push_str(q);
    }
    let uri = Uri::from(
        PathAndQuery::from_maybe_shared(Bytes::from(uri))
            .map_err(|e| Error::BadRequest(format!("bad request path: {e}")))?,
    );
    let fields = headers::upstream_request_headers(&parts.headers, forwarded, protocol);
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = fields;
    Ok(req)
}

fn public_origin(scheme: &str, host: Option<&HeaderValue>) -> String {
    match host.and_then(|h| h.to_str().ok()) {
        Some(h) => format!("{scheme}://{h}"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a request that is harmless to repeat and carried no body goes again on a fresh
    /// connection: a body may have been (partly) consumed, and a non-idempotent method may
    /// have had its effect.
    #[test]
    fn only_idempotent_bodiless_requests_may_be_resent() {
        for method in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(method), "{method}");
            assert!(may_resend(is_idempotent(method), false), "{method}");
            assert!(
                !may_resend(is_idempotent(method), true),
                "{method} with a body"
            );
        }
        for method in ["POST", "PATCH", "CONNECT", "get", "PROPFIND"] {
            assert!(!is_idempotent(method), "{method}");
            assert!(!may_resend(is_idempotent(method), false), "{method}");
            assert!(
                !may_resend(is_idempotent(method), true),
                "{method} with a body"
            );
        }
    }
}
