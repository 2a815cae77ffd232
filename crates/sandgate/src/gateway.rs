//! What both proxy lanes serve connections with: the request policy, the proxy, the control
//! API's router, hyper's connection settings and, on a TLS listener, the TLS acceptor. Built
//! once per gateway and borrowed by every connection on every event loop.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

use crate::api::AppState;
use crate::policy::Policy;

/// Largest request head either lane accepts; a larger one is answered 431 (hyper's lane
/// judges what the fast lane hands over).
pub const MAX_HEAD: usize = 64 * 1024;

pub struct Gateway {
    pub state: AppState,
    pub policy: Policy,
    pub(crate) api: Router,
    pub(crate) http: auto::Builder<TokioExecutor>,
    /// `Some` on a TLS listener: every connection is a TLS handshake first, then hyper's lane
    /// (`crate::server`). Its certificate reloads behind it (`crate::tls`).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Gateway {
    pub fn new(state: AppState) -> Gateway {
        let api = crate::api::router(state.clone());
        let policy = Policy::new(
            state.auth.clone(),
            state.audit.clone(),
            state.routes.clone(),
            state.manager.clone(),
            state.limits.clone(),
            state.rates.clone(),
            &state.config,
        );
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(state.config.header_timeout)
            .max_buf_size(MAX_HEAD);
        http.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(state.config.header_timeout))
            .keep_alive_timeout(state.config.header_timeout);
        Gateway {
            state,
            policy,
            api,
            http,
            tls: None,
        }
    }
}
