//! Every gateway-made error, mapped to an HTTP status, a stable code and seed 002's body
//! `{"error":{"code","message","details"}}` in one place. Responses carry `x-sandgate-error`
//! so they are never confused with a sandbox app's own errors; browsers get a small HTML page.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Response, StatusCode};

/// Header naming the error code on every response the gateway itself produced.
pub const ERROR_HEADER: &str = "x-sandgate-error";

/// What a 401 tells a client to do.
const HOW_TO_AUTHENTICATE: &str = "send an API key as X-API-Key: <key> or Authorization: Bearer <key> \
     (a token from POST /auth/token works as a Bearer credential too); in a browser, open a preview URL \
     from POST /sandboxes/{id}/preview-tokens";

/// Errors a client can act on. Internal details are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no sandbox {0:?}")]
    SandboxNotFound(String),
    #[error("sandbox {id} is not running (status: {status})")]
    NotRunning { id: String, status: String },
    #[error("sandbox {id} does not expose port {port}")]
    PortNotExposed { id: String, port: u16 },
    #[error("nothing is listening on port {port} in sandbox {id}: {reason}")]
    UpstreamUnreachable {
        id: String,
        port: u16,
        reason: String,
    },
    #[error("sandbox {id} did not answer on port {port} within {timeout:?}")]
    UpstreamTimeout {
        id: String,
        port: u16,
        timeout: Duration,
    },
    #[error("the connection to sandbox {id} failed: {reason}")]
    UpstreamProtocol { id: String, reason: String },
    #[error("malformed sandbox id {0:?}")]
    InvalidId(String),
    #[error("invalid port {0:?}: must be a number from 1 to 65535")]
    InvalidPort(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Validation(String),
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("a request body here must be Content-Type: application/json, got {0}")]
    UnsupportedMediaType(String),
    #[error("requests from origin {0:?} may not change anything here")]
    ForbiddenOrigin(String),
    #[error("the control API does not answer to host {0:?}")]
    ForbiddenHost(String),
    #[error("{0}")]
    Conflict(String),
    #[error("sandbox {0} is starting; retry shortly")]
    Starting(String),
    #[error("sandbox {0} is running but its server is not ready (its health checks fail); retry shortly")]
    NotReady(String),
    #[error("sandbox {id}'s port {port} failed repeatedly; its circuit is open: retry in {retry_after} s")]
    CircuitOpen {
        id: String,
        port: u16,
        retry_after: u64,
    },
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    #[error("too many requests in flight from this client address; retry shortly")]
    ClientOverloaded,
    #[error("bad request framing: {0}")]
    BadFraming(&'static str),
    #[error("the request head is larger than the limit of {0} bytes or has more than 100 fields")]
    HeadTooLarge(usize),
    #[error("the request body stalled for longer than {0:?}")]
    BodyTimeout(Duration),
    #[error("no free port left in the sandbox port range {0}")]
    PortsExhausted(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    StartFailed(String),
    #[error("authentication required")]
    Unauthenticated,
    #[error("invalid authentication credential")]
    BadCredential(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("requests from this address are not allowed")]
    AddressNotAllowed,
    /// Over a rate limit or a connection cap (`crate::rates`): `limit` requests (at once, or
    /// per `window` seconds), and when to try again.
    #[error("{what}; retry in {retry_after} s")]
    RateLimited {
        what: &'static str,
        limit: u32,
        window: Option<u64>,
        retry_after: u64,
    },
    #[error("no API key {0:?}")]
    KeyNotFound(String),
    #[error("no team {0:?}")]
    TeamNotFound(String),
    #[error("no exec {0:?} in this sandbox (finished background commands are kept 15 minutes)")]
    ExecNotFound(String),
    #[error("{0}")]
    ExecLimit(String),
    #[error("{0}")]
    InvalidPath(String),
    #[error("{0}")]
    PathOutside(String),
    #[error("{0}")]
    FileNotFound(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    UnsupportedOperation(String),
    #[error("{0}")]
    UnsupportedLanguage(String),
    #[error("the {0} backend cannot run commands in sandboxes")]
    ExecUnsupported(&'static str),
    /// Any other operation the sandbox's backend cannot do (`crate::backend`'s `Unsupported`).
    #[error("the {backend} backend cannot {operation}")]
    BackendUnsupported {
        backend: &'static str,
        operation: &'static str,
    },
    #[error("internal error")]
    Internal(String),
}

impl Error {
    pub fn internal(e: impl std::fmt::Display) -> Error {
        Error::Internal(e.to_string())
    }

    /// Status and stable machine-readable code: the single mapping for the whole gateway.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use Error::*;
        match self {
            SandboxNotFound(_) => (StatusCode::NOT_FOUND, "sandbox_not_found"),
            NotRunning { .. } => (StatusCode::CONFLICT, "sandbox_not_running"),
            PortNotExposed { .. } => (StatusCode::BAD_REQUEST, "port_not_exposed"),
            UpstreamUnreachable { .. } => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            UpstreamTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            UpstreamProtocol { .. } => (StatusCode::BAD_GATEWAY, "upstream_error"),
            InvalidId(_) => (StatusCode::BAD_REQUEST, "invalid_sandbox_id"),
            InvalidPort(_) => (StatusCode::BAD_REQUEST, "invalid_port"),
            BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ForbiddenOrigin(_) => (StatusCode::FORBIDDEN, "forbidden_origin"),
            ForbiddenHost(_) => (StatusCode::MISDIRECTED_REQUEST, "forbidden_host"),
            Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Starting(_) => (StatusCode::SERVICE_UNAVAILABLE, "sandbox_starting"),
            NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "sandbox_not_ready"),
            CircuitOpen { .. } => (StatusCode::SERVICE_UNAVAILABLE, "circuit_open"),
            Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ClientOverloaded => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            BadFraming(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            HeadTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_fields_too_large",
            ),
            BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            PortsExhausted(_) => (StatusCode::SERVICE_UNAVAILABLE, "ports_exhausted"),
            RouteNotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            StartFailed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "start_failed"),
            Unauthenticated => (StatusCode::UNAUTHORIZED, "AUTH_002"),
            BadCredential(_) => (StatusCode::UNAUTHORIZED, "AUTH_001"),
            Forbidden(_) => (StatusCode::FORBIDDEN, "AUTH_003"),
            AddressNotAllowed => (StatusCode::FORBIDDEN, "AUTH_004"),
            RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            KeyNotFound(_) => (StatusCode::NOT_FOUND, "key_not_found"),
            TeamNotFound(_) => (StatusCode::NOT_FOUND, "team_not_found"),
            ExecNotFound(_) => (StatusCode::NOT_FOUND, "exec_not_found"),
            ExecLimit(_) => (StatusCode::TOO_MANY_REQUESTS, "exec_limit"),
            InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            PathOutside(_) => (StatusCode::FORBIDDEN, "path_outside_sandbox"),
            FileNotFound(_) => (StatusCode::NOT_FOUND, "file_not_found"),
            PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, "already_exists"),
            UnsupportedOperation(_) => (StatusCode::BAD_REQUEST, "unsupported_operation"),
            UnsupportedLanguage(_) => (StatusCode::BAD_REQUEST, "unsupported_language"),
            ExecUnsupported(_) => (StatusCode::NOT_IMPLEMENTED, "exec_unsupported"),
            BackendUnsupported { .. } => (StatusCode::NOT_IMPLEMENTED, "backend_unsupported"),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    fn details(&self) -> Option<String> {
        match self {
            Error::NotRunning { status, .. } => Some(format!("status: {status}")),
            Error::UpstreamUnreachable { .. } => Some(
                "is the dev server started and listening on its port? (a browser retries \
                 every 2 s while it starts)"
                    .into(),
            ),
            Error::ForbiddenHost(_) => {
                Some("use the gateway's address, or add the name to SANDGATE_ALLOWED_HOSTS".into())
            }
            Error::Unauthenticated => Some(HOW_TO_AUTHENTICATE.into()),
            Error::BadCredential(why) => Some((*why).into()),
            Error::AddressNotAllowed => {
                Some("the gateway's allowed_ips (or your team's) do not include it".into())
            }
            Error::RateLimited {
                limit,
                window: Some(w),
                ..
            } => Some(format!("at most {limit} in {w} s")),
            Error::RateLimited { limit, .. } => Some(format!("at most {limit} at once")),
            _ => None,
        }
    }

    /// What the error says about the sandbox's side, for metrics and the access log.
    pub fn upstream_error(&self) -> Option<crate::metrics::UpstreamError> {
        use crate::metrics::UpstreamError as U;
        match self {
            Error::UpstreamUnreachable { reason, .. } if reason == "connection refused" => {
                Some(U::Refused)
            }
            Error::UpstreamUnreachable { .. } => Some(U::Unreachable),
            Error::UpstreamTimeout { .. } => Some(U::Timeout),
            Error::UpstreamProtocol { .. } => Some(U::Protocol),
            _ => None,
        }
    }

    /// The access log's error flag, after Envoy's response flags: `UF` the sandbox's port
    /// could not be reached, `UT` it did not answer in time, `UPE` it broke HTTP, `UH` the
    /// sandbox is not running or not ready, `NR` no such sandbox or route, `UAEX` refused by
    /// authentication, `RL` rate limited, `UO` over the concurrency cap, `DPE` the client
    /// broke HTTP, `DT` its body stalled; `-` for any other error.
    pub fn flag(&self) -> &'static str {
        use Error::*;
        match self {
            UpstreamUnreachable { .. } => "UF",
            UpstreamTimeout { .. } => "UT",
            UpstreamProtocol { .. } => "UPE",
            NotRunning { .. } | Starting(_) | NotReady(_) | StartFailed(_) => "UH",
            CircuitOpen { .. } => "UH",
            SandboxNotFound(_) | RouteNotFound(_) | PortNotExposed { .. } => "NR",
            Unauthenticated | BadCredential(_) | Forbidden(_) | AddressNotAllowed => "UAEX",
            RateLimited { .. } | ClientOverloaded => "RL",
            Overloaded => "UO",
            BadFraming(_) | HeadTooLarge(_) => "DPE",
            BodyTimeout(_) => "DT",
            _ => "-",
        }
    }

    /// What the error says about the request's credential, for metrics.
    pub fn auth_result(&self) -> crate::metrics::AuthResult {
        use crate::metrics::AuthResult as A;
        match self {
            Error::Unauthenticated => A::Missing,
            Error::BadCredential(_) => A::Invalid,
            Error::Forbidden(_) | Error::AddressNotAllowed => A::Forbidden,
            _ => A::None,
        }
    }

    /// The `WWW-Authenticate` challenge of a 401 (RFC 9110 §11.6.1, RFC 6750 §3).
    fn challenge(&self) -> Option<&'static str> {
        match self {
            Error::Unauthenticated => Some("Bearer realm=\"sandgate\""),
            Error::BadCredential(_) => Some("Bearer realm=\"sandgate\", error=\"invalid_token\""),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Error::Overloaded | Error::ClientOverloaded => Some(1),
            Error::Starting(_) | Error::NotReady(_) => Some(2),
            Error::CircuitOpen { retry_after, .. } => Some(*retry_after),
            Error::PortsExhausted(_) => Some(30),
            Error::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Whether the connection must end after this error: the request's framing, or the rest of
    /// its body, cannot be trusted.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Error::BadFraming(_) | Error::BodyTimeout(_) | Error::HeadTooLarge(_)
        )
    }

    /// Renders the error as a response; `html` selects the browser page over JSON.
    pub fn to_response(&self, html: bool) -> Response<Bytes> {
        let (status, code) = self.status_and_code();
        if let Error::Internal(detail) = self {
            tracing::error!(%detail, "internal error");
        }
        let message = self.to_string();
        let details = self.details();
        let (body, ctype) = if html {
            // A browser waiting for a dev server that is still starting keeps retrying.
            let refresh = match self {
                Error::UpstreamUnreachable { .. } => Some(2),
                _ => self.retry_after(),
            };
            (
                html_page(status, &message, details.as_deref(), refresh),
                "text/html; charset=utf-8",
            )
        } else {
            let v = serde_json::json!({
                "error": {"code": code, "message": message, "details": details}
            });
            (v.to_string(), "application/json")
        };
        let mut resp = Response::new(Bytes::from(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
        h.insert(ERROR_HEADER, HeaderValue::from_static(code));
        if let Some(secs) = self.retry_after() {
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(c) = self.challenge() {
            h.insert(WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        if let Error::RateLimited {
            limit,
            window,
            retry_after,
            ..
        } = self
        {
            rate_limit_fields(h, *limit, *window, *retry_after);
        }
        resp
    }
}

/// The fields of draft-ietf-httpapi-ratelimit-headers-06 (the last revision with separate
/// `RateLimit-Limit`, `-Remaining` and `-Reset` fields; -07 merged them into `RateLimit`) on a
/// 429: the requests the policy allows at once, none left, the seconds until the next one is
/// (the same as `Retry-After`), and the policy (`{limit};w={seconds}`) when it is a rate.
fn rate_limit_fields(h: &mut HeaderMap, limit: u32, window: Option<u64>, reset: u64) {
    h.insert("ratelimit-limit", HeaderValue::from(limit));
    h.insert("ratelimit-remaining", HeaderValue::from_static("0"));
    h.insert("ratelimit-reset", HeaderValue::from(reset));
    if let Some(w) = window {
        let mut policy = String::with_capacity(24);
        policy.push_str(itoa::Buffer::new().format(limit));
        policy.push_str(";w=");
        policy.push_str(itoa::Buffer::new().format(w));
        if let Ok(v) = HeaderValue::from_str(&policy) {
            h.insert("ratelimit-policy", v);
        }
    }
}

/// Whether a client prefers an HTML page (a browser) over JSON.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

fn html_page(
    status: StatusCode,
    message: &str,
    details: Option<&str>,
    refresh: Option<u64>,
) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">{refresh}<title>{code} {reason}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:4em auto;color:#222}}\
         small{{color:#666}}</style></head><body><h1>{code} {reason}</h1><p>{msg}</p>{det}\
         <p><small>sandgate</small></p></body></html>",
        refresh = refresh
            .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">"))
            .unwrap_or_default(),
        code = status.as_u16(),
        reason = status.canonical_reason().unwrap_or(""),
        msg = esc(message),
        det = details
            .map(|d| format!("<p>{}</p>", esc(d)))
            .unwrap_or_default(),
    )
}

impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        self.to_response(false).map(axum::body::Body::from)
    }
}

impl From<crate::store::StoreError> for Error {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::PortsExhausted(range) => Error::PortsExhausted(range),
            crate::store::StoreError::TeamExists(team) => {
                Error::Conflict(format!("team {team:?} already exists"))
            }
            crate::store::StoreError::NameTaken(path) => {
                Error::Conflict(format!("a sandbox named {path:?} already exists"))
            }
            other => Error::internal(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_body_has_the_seed_shape_and_header() {
        let resp = Error::NotRunning {
            id: "sb-x".into(),
            status: "stopped".into(),
        }
        .to_response(false);
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert_eq!(resp.headers()[ERROR_HEADER], "sandbox_not_running");
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(v["error"]["code"], "sandbox_not_running");
        assert!(v["error"]["message"].as_str().unwrap().contains("stopped"));
        assert_eq!(v["error"]["details"], "status: stopped");
    }

    #[test]
    fn rate_limited_carries_retry_after_and_the_ratelimit_fields() {
        let resp = Error::RateLimited {
            what: "too many requests with this credential",
            limit: 10,
            window: Some(2),
            retry_after: 1,
        }
        .to_response(false);
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = resp.headers();
        assert_eq!(h[ERROR_HEADER], "rate_limited");
        assert_eq!(h[RETRY_AFTER], "1");
        assert_eq!(h["ratelimit-limit"], "10");
        assert_eq!(h["ratelimit-remaining"], "0");
        assert_eq!(h["ratelimit-reset"], "1");
        assert_eq!(h["ratelimit-policy"], "10;w=2");
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(v["error"]["code"], "rate_limited");
        assert_eq!(v["error"]["details"], "at most 10 in 2 s");
        let resp = Error::AddressNotAllowed.to_response(false);
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()[ERROR_HEADER], "AUTH_004");
    }

    #[test]
    fn what_a_backend_cannot_do_is_a_501() {
        let resp = Error::BackendUnsupported {
            backend: "example",
            operation: "stream logs",
        }
        .to_response(false);
        assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED);
        assert_eq!(resp.headers()[ERROR_HEADER], "backend_unsupported");
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(v["error"]["code"], "backend_unsupported");
        assert_eq!(
            v["error"]["message"],
            "the example backend cannot stream logs"
        );
        let resp = Error::ExecUnsupported("example").to_response(false);
        assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED);
        assert_eq!(resp.headers()[ERROR_HEADER], "exec_unsupported");
    }

    #[test]
    fn overload_says_when_to_retry_and_html_is_escaped() {
        let resp = Error::Overloaded.to_response(true);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
        let resp = Error::SandboxNotFound("<script>".into()).to_response(true);
        let body = std::str::from_utf8(resp.body()).unwrap();
        assert!(body.contains("&lt;script&gt;") && !body.contains("<script>"));
    }
}
