//! The listener: accepts HTTP/1.1 and HTTP/2 (h2c) connections, routes each request to a
//! sandbox (host, `/sandbox/{id}/`, `/{owner}/{name}/`) or to the control API, and drains
//! connections gracefully on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use http::header::{HeaderValue, HOST, LOCATION};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mio::net::TcpListener as MioListener;
use std::net::TcpListener as StdListener;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::api::AppState;
use crate::error::{wants_html, Error};
use crate::fastlane::client::Client;
use crate::fastlane::watch::Watch;
use crate::model::{Mode, Sandbox, Status};
use crate::proxy::body::GatewayBody;
use crate::proxy::Target;
use crate::routes::Entry;
use crate::routing::{self, Route};

/// How long open connections get to finish after shutdown begins.
const DRAIN: Duration = Duration::from_secs(10);

pub struct Gateway {
    pub(crate) state: AppState,
    api: Router,
    http: auto::Builder<TokioExecutor>,
}

pub(crate) enum Decision {
    Proxy(Target),
    Api,
    Redirect(String),
    Fail(Error),
}

impl Gateway {
    pub fn new(state: AppState) -> Gateway {
        let api = crate::api::router(state.clone());
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(state.config.header_timeout);
        Gateway { state, api, http }
    }

    fn decide(&self, req: &Request<Incoming>) -> Decision {
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().host());
        self.decide_parts(host, req.uri().path(), req.uri().query())
    }

    /// Where a request for `host` and `path` goes.
    pub(crate) fn decide_parts(
        &self,
        host: Option<&str>,
        path: &str,
        query: Option<&str>,
    ) -> Decision {
        let routes = &self.state.routes;
        let route = match routing::classify(host, path, &self.state.config.domain) {
            Ok(r) => r,
            Err(e) => return Decision::Fail(e),
        };
        let found = |sb: Option<Arc<Entry>>, id: &str| {
            sb.ok_or_else(|| Error::SandboxNotFound(id.to_string()))
        };
        let dev_port = |sb: &Sandbox| {
            sb.port.ok_or_else(|| Error::PortNotExposed {
                id: sb.id.clone(),
                port: 0,
            })
        };
        let target = match route {
            Route::Api => return Decision::Api,
            Route::Host { id, port } => found(routes.get(id), id).map(|sb| Target {
                sandbox: sb,
                port,
                prefix: None,
            }),
            Route::Id { id, prefix } => found(routes.get(id), id).and_then(|sb| {
                Ok(Target {
                    port: dev_port(&sb)?,
                    sandbox: sb,
                    prefix: prefix_header(prefix),
                })
            }),
            Route::Path {
                owner,
                name,
                prefix,
            } => match routes.get_by_path(owner, name) {
                None => return Decision::Api,
                Some(sb) => dev_port(&sb).map(|port| Target {
                    sandbox: sb,
                    port,
                    prefix: prefix_header(prefix),
                }),
            },
            Route::AddSlash { id_route, path } => {
                if !id_route {
                    let mut segs = path[1..].splitn(2, '/');
                    let (owner, name) = (segs.next().unwrap_or(""), segs.next().unwrap_or(""));
                    if routes.get_by_path(owner, name).is_none() {
                        return Decision::Api;
                    }
                }
                let query = query.map(|q| format!("?{q}")).unwrap_or_default();
                return Decision::Redirect(format!("{path}/{query}"));
            }
        };
        match target {
            Ok(t) => Decision::Proxy(t),
            Err(e) => Decision::Fail(e),
        }
    }

    /// Handles one request; never fails (errors become responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<GatewayBody>, Infallible> {
        let html = wants_html(req.headers());
        let resp = match self.decide(&req) {
            Decision::Proxy(mut target) => {
                let asleep = target.sandbox.status == Status::Stopped
                    && target.sandbox.mode == Mode::Persistent;
                match asleep {
                    true => match self.wake(&target).await {
                        Ok(entry) => {
                            target.sandbox = entry;
                            self.state.proxy.forward(req, peer, target).await
                        }
                        Err(e) => Err(e),
                    },
                    false => self.state.proxy.forward(req, peer, target).await,
                }
            }
            Decision::Api => {
                let resp = self
                    .api
                    .clone()
                    .oneshot(req.map(axum::body::Body::new))
                    .await;
                Ok(match resp {
                    Ok(r) => r.map(|inner| GatewayBody::Api { inner }),
                    Err(never) => match never {},
                })
            }
            Decision::Redirect(location) => {
                let mut r = Response::new(GatewayBody::empty());
                *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers_mut().insert(LOCATION, v);
                }
                Ok(r)
            }
            Decision::Fail(e) => Err(e),
        };
        Ok(resp.unwrap_or_else(|e| e.to_response(html).map(GatewayBody::full)))
    }
}

impl Gateway {
    /// Starts a stopped persistent sandbox for the request that reached it, and waits (bounded
    /// by `wake_timeout`) for its port to accept connections.
    async fn wake(&self, target: &Target) -> Result<Arc<Entry>, Error> {
        let id = &target.sandbox.id;
        tracing::info!(sandbox = %id, "waking on request");
        self.state.manager.start(id).await?;
        let entry = self
            .state
            .routes
            .get(id)
            .ok_or_else(|| Error::SandboxNotFound(id.clone()))?;
        let Some(upstream) = self.state.manager.backend().upstream(&entry, target.port) else {
            return Ok(entry); // the proxy reports the unexposed port
        };
        let deadline = tokio::time::Instant::now() + self.state.config.wake_timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            if upstream.dial().await.is_ok() {
                return Ok(entry);
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(Error::Starting(id.clone()));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

/// A route prefix as the `X-Forwarded-Prefix` value it becomes. Prefixes are built from
/// validated ids and labels (`/`, `a-z`, `0-9`, `-`), which are always valid header values.
fn prefix_header(prefix: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(prefix).ok()
}

/// Serves `listener` until `shutdown` fires, then drains open connections (bounded). Every
/// connection starts in the HTTP/1.1 fast lane (`crate::fastlane`), which hands it to hyper
/// for anything else. Connections are accepted without registering them with the event loop:
/// `fastlane::client::Client` does that only if one has to wait. Fails only if the listening
/// socket cannot be registered with the event loop.
pub async fn serve(
    listener: StdListener,
    gateway: Arc<Gateway>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let nodelay_inherited = nodelay_for_accepted(&listener);
    let listener = watch_listener(listener)?;
    // A token of this loop's own: each connection clones and drops it (a mutex on the
    // token's node), which then never contends with another loop's connections.
    let shutdown = shutdown.child_token();
    let watch = Arc::new(Watch::default());
    tokio::spawn({
        let (watch, shutdown) = (watch.clone(), shutdown.clone());
        async move { watch.run(shutdown).await }
    });
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = accept(&listener) => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let stream = std::net::TcpStream::from(stream);
        if !nodelay_inherited {
            let _ = stream.set_nodelay(true);
        }
        // Boxed: the connection's state (about 2.4 KiB) then sits in one place, and the task
        // holds a pointer, where tokio would otherwise copy the whole of it each time it moves
        // the task's future (spawning it, finishing it: ~2k instructions per connection).
        let client = Client::new(stream, watch.clone());
        if gateway.state.config.fast_lane {
            tracker.spawn(Box::pin(crate::fastlane::serve(
                gateway.clone(),
                client,
                peer,
                shutdown.clone(),
            )));
        } else {
            let prefixed = crate::fastlane::prefixed::Prefixed::new(bytes::Bytes::new(), client);
            tracker.spawn(
                gateway
                    .clone()
                    .serve_hyper(prefixed, peer, shutdown.clone()),
            );
        }
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
        tracing::warn!("connections still open after {DRAIN:?}; closing them");
    }
    Ok(())
}

/// The listening socket, non-blocking and registered with the event loop for readability.
/// tokio's safe way to watch a socket without taking over what it accepts is deprecated in
/// favour of an `unsafe` one (tokio#8587: the safe one cannot check that the descriptor stays
/// the same); the crate otherwise denies `unsafe` code.
#[allow(unsafe_code)]
fn watch_listener(listener: StdListener) -> std::io::Result<AsyncFd<MioListener>> {
    listener.set_nonblocking(true)?;
    let listener = MioListener::from_std(listener);
    // SAFETY: the `AsyncFd` owns the listener, whose descriptor stays open and the same for
    // as long as the `AsyncFd` lives (it is never taken out of it or forgotten).
    unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// Accepts one connection: non-blocking, close-on-exec, not registered with the event loop.
async fn accept(
    listener: &AsyncFd<MioListener>,
) -> std::io::Result<(mio::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) {
            return accepted;
        }
    }
}

/// Sets `TCP_NODELAY` on the listening socket, which Linux copies to every connection it
/// accepts: one system call per connection fewer than setting it on each. False where that
/// does not hold, and each connection is set instead.
fn nodelay_for_accepted(listener: &StdListener) -> bool {
    cfg!(target_os = "linux") && socket2::SockRef::from(listener).set_nodelay(true).is_ok()
}

impl Gateway {
    /// Serves a connection with hyper (HTTP/1.x and h2c, the control API, upgrades), closing
    /// it gracefully once `shutdown` fires.
    pub(crate) async fn serve_hyper<I>(
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel behaviour `serve` relies on: a connection accepted from a listening socket
    /// with `TCP_NODELAY` has it too (Nagle would hold back a streamed response's small writes).
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let inherited = nodelay_for_accepted(&listener);
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        assert_eq!(inherited, cfg!(target_os = "linux"));
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (accepted, _) = accepted.unwrap();
        assert!(
            !client.unwrap().nodelay().unwrap(),
            "the client side is untouched"
        );
        assert_eq!(accepted.nodelay().unwrap(), inherited);
    }
}
