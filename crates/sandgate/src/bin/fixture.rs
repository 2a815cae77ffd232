//! `sandgate-fixture`: a small, fast HTTP/WebSocket upstream that plays the "dev server running
//! inside a sandbox" for sandgate's integration tests and benchmark harness. Run it as
//! `PORT=0 sandgate-fixture` (or `--port N [--host H]`); once bound it prints `listening on ADDR`.
//! With `FIXTURE_MODE=raw` it is instead a hand-written HTTP/1.1 server whose `/raw/...` routes
//! misbehave in scripted ways hyper never would (see `raw`), for the proxy's edge cases.

use std::convert::Infallible;
use std::error::Error;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue, IntoHeaderName};
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Size of the chunks `/bytes/{n}` streams.
const CHUNK_SIZE: usize = 64 * 1024;
/// The buffer every `/bytes/{n}` chunk is sliced from.
static CHUNK: [u8; CHUNK_SIZE] = [b'x'; CHUNK_SIZE];
/// The fixed body of `/1k`.
static ONE_K: [u8; 1024] = [b'k'; 1024];

type Resp = Response<FixtureBody>;

/// Response body: a single buffer, `n` bytes of the static chunk, or a streaming body.
///
/// Only the streaming variant is boxed, so the hot benchmark paths allocate nothing for the body.
enum FixtureBody {
    Full(Option<Bytes>),
    Repeat(u64),
    Stream(UnsyncBoxBody<Bytes, Infallible>),
}

impl FixtureBody {
    fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self::Full((!data.is_empty()).then_some(data))
    }
}

impl Body for FixtureBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
            Self::Repeat(0) => Poll::Ready(None),
            Self::Repeat(remaining) => {
                let len = usize::try_from(*remaining).map_or(CHUNK_SIZE, |r| r.min(CHUNK_SIZE));
                *remaining -= len as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..len])))))
            }
            Self::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(data) => data.is_none(),
            Self::Repeat(remaining) => *remaining == 0,
            Self::Stream(body) => body.is_end_stream(),
        }
    }

    /// An exact hint makes hyper send `Content-Length` instead of chunked encoding.
    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Repeat(remaining) => SizeHint::with_exact(*remaining),
            Self::Stream(body) => body.size_hint(),
        }
    }
}

#[tokio::main]
async fn main() {
    if let Err(err) = run().await {
        eprintln!("sandgate-fixture: {err}");
        std::process::exit(1);
    }
}

/// Reads the listen address from `--host`/`--port`, falling back to `$PORT`.
fn parse_addr() -> Result<SocketAddr, Box<dyn Error>> {
    let (mut host, mut port) = ("127.0.0.1".to_owned(), std::env::var("PORT").ok());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("missing value for {arg}"))?;
        match arg.as_str() {
            "--port" => port = Some(value),
            "--host" => host = value,
            _ => return Err(format!("unknown argument {arg:?}").into()),
        }
    }
    let port = port.ok_or("usage: PORT=N sandgate-fixture [--port N] [--host H]")?;
    let port: u16 = port.parse().map_err(|e| format!("port {port:?}: {e}"))?;
    let host: IpAddr = host.parse().map_err(|e| format!("host {host:?}: {e}"))?;
    Ok(SocketAddr::new(host, port))
}

async fn run() -> Result<(), Box<dyn Error>> {
    let listener = TcpListener::bind(parse_addr()?).await?;
    let mut local = listener.local_addr()?;
    println!("listening on {local}");
    std::io::stdout().flush()?;

    if local.ip().is_unspecified() {
        local.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    // `Location` of `/redirect`: an absolute URL pointing back at this server.
    let redirect = HeaderValue::try_from(format!("http://{local}/echo/after-redirect"))?;
    let redirect: &'static HeaderValue = Box::leak(Box::new(redirect));
    if std::env::var("FIXTURE_MODE").as_deref() == Ok("raw") {
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(raw::serve(stream));
        }
    }
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(serve(stream, peer, redirect));
            }
            Err(err) => {
                // Usually EMFILE/ENFILE: back off briefly instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve(stream: TcpStream, peer: SocketAddr, redirect: &'static HeaderValue) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%peer, %err, "set_nodelay failed");
    }
    let service = service_fn(move |req| route(req, redirect));
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(err) = conn.await {
        tracing::debug!(%peer, %err, "connection ended with error");
    }
}

async fn route(req: Request<Incoming>, redirect: &HeaderValue) -> Result<Resp, hyper::Error> {
    let path = req.uri().path();
    if path.starts_with("/echo") {
        return echo(req).await;
    }
    if path == "/upload" && matches!(*req.method(), Method::POST | Method::PUT) {
        return upload(req.into_body()).await;
    }
    if path == "/answer-early" {
        // Streams 20 events 100 ms apart at once, without reading the request body.
        return Ok(sse(Some("events=20&interval_ms=100")));
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Ok(not_found());
    }
    if path == "/ws" {
        return Ok(websocket(req));
    }
    Ok(match path {
        "/" => with(text(StatusCode::OK, "fixture ok"), "x-fixture", "1"),
        // Which sandbox (or instance of one) answered.
        "/whoami" => text(
            StatusCode::OK,
            std::env::var("SANDBOX_ID").unwrap_or_default(),
        ),
        // A sandbox that names requests itself (the gateway's id replaces it).
        "/own-request-id" => with(
            text(StatusCode::OK, "ok"),
            "x-request-id",
            "from-the-sandbox",
        ),
        "/1k" => octets(FixtureBody::Full(Some(Bytes::from_static(&ONE_K)))),
        // A health check a test can fail: 500 while a file `sick` is in the working directory.
        "/healthz" => match std::path::Path::new("sick").exists() {
            true => text(StatusCode::INTERNAL_SERVER_ERROR, "sick"),
            false => text(StatusCode::OK, "healthy"),
        },
        "/sse" => sse(req.uri().query()),
        "/sse-hold" => sse_hold(),
        "/page" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            FixtureBody::full(PAGE),
        ),
        "/app.js" => respond(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            FixtureBody::full(APP_JS),
        ),
        "/redirect" => found(redirect.clone()),
        "/redirect-relative" => found(HeaderValue::from_static("/echo/after-redirect")),
        "/set-cookie" => {
            let resp = text(StatusCode::OK, "cookies set");
            let resp = with(resp, header::SET_COOKIE, "a=1; Path=/");
            with(resp, header::SET_COOKIE, "b=2; Path=/")
        }
        _ => parameterized(path).await,
    })
}

/// Routes that carry a number in the path: `/bytes/{n}`, `/delay/{ms}` and `/status/{code}`.
async fn parameterized(path: &str) -> Resp {
    let Some((route, arg)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return not_found();
    };
    let Ok(n) = arg.parse::<u64>() else {
        return not_found();
    };
    match route {
        "bytes" => octets(FixtureBody::Repeat(n)),
        "delay" => {
            tokio::time::sleep(Duration::from_millis(n)).await;
            text(StatusCode::OK, "delayed")
        }
        "status" => match u16::try_from(n).map(StatusCode::from_u16) {
            Ok(Ok(status)) => text(status, format!("status {n}")),
            _ => text(StatusCode::BAD_REQUEST, format!("invalid status code {n}")),
        },
        _ => not_found(),
    }
}

/// Counts the request body frame by frame, never holding more than one frame in memory.
async fn upload(mut body: Incoming) -> Result<Resp, hyper::Error> {
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            bytes += data.len() as u64;
        }
    }
    Ok(json(&serde_json::json!({ "bytes": bytes })))
}

/// Describes the request as JSON; repeated headers are joined with ", ".
async fn echo(req: Request<Incoming>) -> Result<Resp, hyper::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values = parts.headers.get_all(name).iter().map(|v| v.as_bytes());
        let values: Vec<_> = values.map(String::from_utf8_lossy).collect();
        headers.insert(name.to_string(), values.join(", ").into());
    }
    Ok(json(&serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or_default(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    })))
}

/// `?events=N&interval_ms=M`: N events (default 3), M ms apart (default 100).
fn sse(query: Option<&str>) -> Resp {
    let events = query_param(query, "events").unwrap_or(3);
    let interval = Duration::from_millis(query_param(query, "interval_ms").unwrap_or(100));
    let events = stream::iter(0..events).then(move |i| async move {
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        Ok(Frame::data(format!("data: event-{i}\n\n").into()))
    });
    event_stream(StreamBody::new(events).boxed_unsync())
}

/// One event right away, then silence until the client goes away.
fn sse_hold() -> Resp {
    let first = Frame::data(Bytes::from_static(b"data: first\n\n"));
    let events = stream::iter([Ok(first)]).chain(stream::pending());
    event_stream(StreamBody::new(events).boxed_unsync())
}

fn event_stream(body: UnsyncBoxBody<Bytes, Infallible>) -> Resp {
    let body = FixtureBody::Stream(body);
    let resp = respond(StatusCode::OK, "text/event-stream", body);
    with(resp, header::CACHE_CONTROL, "no-cache")
}

fn query_param(query: Option<&str>, name: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse().ok())
}

/// Accepts a WebSocket upgrade and echoes messages on a task of its own.
fn websocket(mut req: Request<Incoming>) -> Resp {
    let headers = req.headers();
    let is_upgrade = has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket");
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| is_upgrade);
    let accept = key.map(|key| HeaderValue::try_from(derive_accept_key(key.as_bytes())));
    let Some(Ok(accept)) = accept else {
        return text(StatusCode::BAD_REQUEST, "expected a websocket upgrade");
    };

    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => return tracing::debug!(%err, "websocket upgrade failed"),
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if let Err(err) = echo_ws(ws).await {
            tracing::debug!(%err, "websocket ended with error");
        }
    });

    let mut resp = Response::new(FixtureBody::Full(None));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    let resp = with(resp, header::CONNECTION, "Upgrade");
    with(resp, header::UPGRADE, "websocket")
}

/// Whether a comma-separated header such as `Connection` contains `token` (case-insensitively).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    let values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    values
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

/// Echoes Text and Binary messages. tungstenite itself queues the Pong for a Ping and the reply
/// to a Close, and flushes them on the next read; after a Close the stream simply ends.
async fn echo_ws(mut ws: WebSocketStream<TokioIo<Upgraded>>) -> Result<(), WsError> {
    use futures_util::SinkExt;
    while let Some(msg) = ws.next().await {
        if let msg @ (Message::Text(_) | Message::Binary(_)) = msg? {
            ws.send(msg).await?;
        }
    }
    Ok(())
}

fn found(location: HeaderValue) -> Resp {
    let mut resp = text(StatusCode::FOUND, "redirecting");
    resp.headers_mut().insert(header::LOCATION, location);
    resp
}

/// A page as a browser loads an app: an asset by a relative URL, which then reaches `echo` with
/// `fetch` and `ws` with a WebSocket (relative to the page, so it works behind any route
/// prefix), and writes what happened into `#out` (a browser test reads it).
const PAGE: &str = "<!doctype html><html><head><title>fixture page</title></head><body>\
<div id=\"out\">loading</div><script src=\"app.js\"></script></body></html>";

const APP_JS: &str = r#"(async () => {
  const out = document.getElementById("out");
  try {
    const seen = await (await fetch(new URL("echo/from-page", location.href))).json();
    const ws = new WebSocket(new URL("ws", location.href).href.replace(/^http/, "ws"));
    ws.onopen = () => ws.send("hello from the page");
    ws.onmessage = (e) => {
      out.textContent = "ws ok: " + e.data + "; fetch saw cookie: " + (seen.headers.cookie || "none");
    };
    ws.onerror = () => { out.textContent = "ws failed"; };
  } catch (e) {
    out.textContent = "failed: " + e;
  }
})();
"#;

fn json(value: &serde_json::Value) -> Resp {
    let body = FixtureBody::full(value.to_string());
    respond(StatusCode::OK, "application/json", body)
}

fn octets(body: FixtureBody) -> Resp {
    respond(StatusCode::OK, "application/octet-stream", body)
}

fn not_found() -> Resp {
    text(StatusCode::NOT_FOUND, "not found")
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    respond(status, "text/plain; charset=utf-8", FixtureBody::full(body))
}

fn respond(status: StatusCode, content_type: &'static str, body: FixtureBody) -> Resp {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    with(resp, header::CONTENT_TYPE, content_type)
}

/// Appends a static header value; calling it twice with one name yields a repeated header.
fn with(mut resp: Resp, name: impl IntoHeaderName, value: &'static str) -> Resp {
    resp.headers_mut()
        .append(name, HeaderValue::from_static(value));
    resp
}

/// The raw mode: one request after another on each connection, answered by path:
///
/// - `/` → `200 fixture ok` (readiness);
/// - `/raw/echo` → `200`, the body being the exact bytes of the request received (head and
///   body, chunked framing included);
/// - `/raw/until-close` → `200` with no length: `part1`, then `part2`, then the connection
///   closes;
/// - `/raw/close-after` → `200 ok` with a length, then the connection closes without saying
///   so (an upstream's keep-alive timeout);
/// - `/raw/interim` → `103 Early Hints`, then `200 ok`;
/// - `/raw/early` → `413` at once, before reading the body, then close;
/// - `/raw/bad-chunks` → a chunked `200` whose first chunk-size line ends in a bare LF, after
///   which a lenient reader would find the body's end and a forged second response;
/// - `/raw/log` → `200`, the targets of every request this server has read whole so far (on
///   any connection), one per line.
mod raw {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// What `/raw/log` reports.
    static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

    fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|i| i + from)
    }

    async fn more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    fn ok(body: &[u8]) -> Vec<u8> {
        let mut r =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        r.extend_from_slice(body);
        r
    }

    pub async fn serve(mut s: TcpStream) {
        let mut buf = Vec::new();
        loop {
            let head_end = loop {
                if let Some(i) = find(&buf, b"\r\n\r\n", 0) {
                    break i + 4;
                }
                if !more(&mut s, &mut buf).await {
                    return;
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let path = head.split(' ').nth(1).unwrap_or("/").to_string();
            if path == "/raw/early" {
                let _ = s
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\nconnection: close\r\n\r\nnope")
                    .await;
                return;
            }
            let body_end = if head.contains("transfer-encoding: chunked") {
                // The last chunk (`0`), any trailer fields, then an empty line.
                loop {
                    let last = if buf[head_end..].starts_with(b"0\r\n") {
                        Some(head_end)
                    } else {
                        find(&buf, b"\r\n0\r\n", head_end).map(|i| i + 2)
                    };
                    if let Some(end) = last.and_then(|l| find(&buf, b"\r\n\r\n", l + 1)) {
                        break end + 4;
                    }
                    if !more(&mut s, &mut buf).await {
                        return;
                    }
                }
            } else {
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    if !more(&mut s, &mut buf).await {
                        return;
                    }
                }
                head_end + len
            };
            let request: Vec<u8> = buf.drain(..body_end).collect();
            let log = {
                let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
                log.push(path.clone());
                log.join("\n")
            };
            let (reply, close) = match path.as_str() {
                "/" => (ok(b"fixture ok"), false),
                "/raw/echo" => (ok(&request), false),
                "/raw/until-close" => {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart1")
                        .await;
                    let _ = s.flush().await;
                    (b"part2".to_vec(), true)
                }
                "/raw/close-after" => (ok(b"ok"), true),
                "/raw/log" => (ok(log.as_bytes()), false),
                "/raw/bad-chunks" => (
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x\nabc\r\n0\r\n\r\n\
                      HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged\r\n0\r\n\r\n"
                        .to_vec(),
                    false,
                ),
                "/raw/interim" => {
                    let mut r =
                        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
                            .to_vec();
                    r.extend_from_slice(&ok(b"ok"));
                    (r, false)
                }
                _ => (
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(),
                    false,
                ),
            };
            if s.write_all(&reply).await.is_err() || close {
                return;
            }
        }
    }
}
