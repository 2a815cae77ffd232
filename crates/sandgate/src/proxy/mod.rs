//! The reverse proxy: forwards a request to one port of one sandbox over a pooled HTTP/1.1
//! connection, streaming bodies both ways, and splices WebSocket (and other) upgrades.
//!
//! `PROXY_TIMEOUT` bounds connecting and waiting for the response head only; a body or an
//! upgraded connection in progress is never cut by it.

pub mod body;
pub mod headers;
pub mod limit;
pub mod pool;
pub mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST, LOCATION};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::backend::{Backend, Upstream};
use crate::error::Error;
use crate::model::{Sandbox, Status};
use crate::routes::Entry;
use body::{GatewayBody, Release};
use limit::{Limit, OwnedPermit, Permit};
use pool::{Pool, PoolKey, Sender};

/// Where a routed request goes.
pub struct Target {
    pub sandbox: Arc<Entry>,
    pub port: u16,
    /// The path prefix that routed it (`/sandbox/{id}` or `/{owner}/{name}`), stripped before
    /// forwarding and sent as `X-Forwarded-Prefix` (built once, as the header value it becomes);
    /// `None` for host routes.
    pub prefix: Option<HeaderValue>,
}

pub struct Proxy {
    backend: Arc<dyn Backend>,
    pool: Arc<Pool>,
    /// Idle upstream connections of the HTTP/1.1 fast lane (`crate::fastlane`), one pool per
    /// connection worker (`crate::workers`), so a connection is reused by the event loop that
    /// watches it.
    raw_pools: Box<[Pool<tokio::net::TcpStream>]>,
    limit: Arc<Limit>,
    timeout: Duration,
    retries: u32,
}

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
        max_in_flight: usize,
        timeout: Duration,
        retries: u32,
        workers: usize,
    ) -> Proxy {
        Proxy {
            backend,
            pool: Arc::new(Pool::new(256, Duration::from_secs(60))),
            raw_pools: (0..workers.max(1))
                .map(|_| Pool::new(256, Duration::from_secs(60)))
                .collect(),
            limit: Arc::new(Limit::new(max_in_flight)),
            timeout,
            retries,
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The current worker's fast-lane pool.
    pub fn raw_pool(&self) -> &Pool<tokio::net::TcpStream> {
        let i = crate::workers::current();
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

    /// A slot for one more proxied request, or `Overloaded` at `MAX_CONCURRENT_REQUESTS`,
    /// that can travel with a response body.
    pub fn permit(&self) -> Result<OwnedPermit, Error> {
        Limit::try_take(self.limit.clone()).ok_or(Error::Overloaded)
    }

    /// A slot for a request answered within the caller's scope.
    pub fn scoped_permit(&self) -> Result<Permit<&Limit>, Error> {
        Limit::try_take(&*self.limit).ok_or(Error::Overloaded)
    }

    /// Proxied requests in flight (responses still streaming included).
    pub fn in_flight(&self) -> usize {
        self.limit.in_flight()
    }

    pub fn max_in_flight(&self) -> usize {
        self.limit.max()
    }

    /// Forwards `req` to `target`. Errors are the gateway's own and are rendered by the caller.
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        target: Target,
    ) -> Result<Response<GatewayBody>, Error> {
        let permit = self.permit()?;
        let sb = &target.sandbox;
        let in_use = sb.in_use();
        if sb.status != Status::Running {
            return Err(Error::NotRunning {
                id: sb.id.clone(),
                status: sb.status.to_string(),
            });
        }
        let upstream =
            self.backend
                .upstream(sb, target.port)
                .ok_or_else(|| Error::PortNotExposed {
                    id: sb.id.clone(),
                    port: target.port,
                })?;
        let key = PoolKey {
            upstream,
            generation: sb.generation,
            epoch: sb.created_at.timestamp_millis(),
        };

        let upgrade = headers::is_upgrade(req.headers());
        let client_version = req.version();
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let public_host = req.headers().get(HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let up_req = self.upstream_request(
            req,
            client,
            &target,
            upstream,
            public_host.as_ref(),
            upgrade,
        )?;

        let timeout = self.timeout;
        let (resp, tx) = match tokio::time::timeout(timeout, self.send(key, up_req)).await {
            Ok(sent) => sent.map_err(|e| upstream_error(sb, target.port, e))?,
            Err(_) => {
                return Err(Error::UpstreamTimeout {
                    id: sb.id.clone(),
                    port: target.port,
                    timeout,
                })
            }
        };

        let (mut parts, body) = resp.into_parts();
        parts.version = client_version;
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade =
                    hyper::upgrade::on(Response::from_parts(parts.clone(), body));
                tokio::spawn(upgrade::splice(
                    client_upgrade,
                    upstream_upgrade,
                    target.sandbox.clone(),
                ));
                // The permit covers requests, not long-lived upgraded connections.
                drop(permit);
                headers::strip_hop_by_hop(&mut parts.headers, true);
                return Ok(Response::from_parts(parts, GatewayBody::empty()));
            }
        }
        headers::strip_hop_by_hop(&mut parts.headers, false);
        if let Some(loc) = parts.headers.get(LOCATION) {
            let origin = public_origin(public_host.as_ref());
            let ports = [target.port, upstream.port()];
            let prefix = target
                .prefix
                .as_ref()
                .and_then(|p| p.to_str().ok())
                .unwrap_or("");
            if let Some(new) = headers::rewrite_location(loc, &ports, &origin, prefix) {
                parts.headers.insert(LOCATION, new);
            }
        }
        let release = Release::new(self.pool.clone(), key, tx, Some(permit), Some(in_use));
        Ok(Response::from_parts(
            parts,
            GatewayBody::upstream(body, release),
        ))
    }

    /// Builds the request the sandbox receives: origin-form URI without the route prefix,
    /// HTTP/1.1, no hop-by-hop fields, no gateway credentials, `X-Forwarded-*` set.
    fn upstream_request(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
        target: &Target,
        upstream: Upstream,
        public_host: Option<&HeaderValue>,
        upgrade: bool,
    ) -> Result<Request<Incoming>, Error> {
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let pq = match &target.prefix {
            None => pq,
            Some(prefix) => {
                let prefix = prefix.as_bytes();
                let rest = &pq.as_str()[prefix.len().min(pq.as_str().len())..];
                let rest = if rest.starts_with('/') {
                    rest.to_string()
                } else {
                    format!("/{rest}")
                };
                PathAndQuery::from_maybe_shared(Bytes::from(rest))
                    .map_err(|e| Error::BadRequest(format!("bad request path: {e}")))?
            }
        };
        parts.uri = Uri::from(pq);
        parts.version = Version::HTTP_11;
        let h = &mut parts.headers;
        headers::strip_hop_by_hop(h, upgrade);
        headers::strip_gateway_credentials(h);
        headers::set_forwarded(h, client.ip(), "http", public_host, target.prefix.as_ref());
        let mut buf = itoa::Buffer::new();
        let port = buf.format(upstream.port());
        let mut host = Vec::with_capacity(10 + port.len());
        host.extend_from_slice(b"localhost:");
        host.extend_from_slice(port.as_bytes());
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(host)) {
            h.insert(HOST, v);
        }
        Ok(Request::from_parts(parts, body))
    }

    /// Sends on a pooled connection, or a new one; retries only what provably was not sent.
    async fn send(
        &self,
        key: PoolKey,
        mut req: Request<Incoming>,
    ) -> Result<(Response<Incoming>, Sender), SendError> {
        if let Some(mut tx) = self.pool.checkout(&key) {
            if tx.ready().await.is_ok() {
                match tx.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, tx)),
                    Err(mut e) => match e.take_message() {
                        // Never written: the pooled connection had died; use a fresh one.
                        Some(r) => req = r,
                        None => return Err(SendError::Protocol(e.into_error())),
                    },
                }
            }
        }
        let mut tx = self.connect(key.upstream).await?;
        let resp = tx.send_request(req).await.map_err(SendError::Protocol)?;
        Ok((resp, tx))
    }

    /// Opens an upstream HTTP/1.1 connection (see `dial`).
    async fn connect(&self, upstream: Upstream) -> Result<Sender, SendError> {
        let stream = self.dial(upstream).await?;
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
    /// opening just now).
    pub(crate) async fn dial(
        &self,
        upstream: Upstream,
    ) -> Result<tokio::net::TcpStream, SendError> {
        let mut attempt = 0;
        let stream = loop {
            match upstream.dial().await {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    if attempt >= self.retries {
                        return Err(SendError::Refused);
                    }
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(25 << attempt.min(5))).await;
                }
                Err(e) => return Err(SendError::Dial(e)),
            }
        };
        Ok(stream)
    }
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

fn public_origin(host: Option<&HeaderValue>) -> String {
    match host.and_then(|h| h.to_str().ok()) {
        Some(h) => format!("http://{h}"),
        None => String::new(),
    }
}
