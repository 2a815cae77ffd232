//! The HTTP/1.1 fast lane over raw sockets: pipelining, chunked bodies forwarded as they came,
//! bodies without a length, interim responses, upstreams that close or answer early, and
//! request framing a smuggler could use (left to hyper, which refuses it).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{eventually, Lane, TestGateway, TestSandbox};

const WAIT: Duration = Duration::from_secs(20);

/// A sandbox running the fixture's raw mode (`FIXTURE_MODE=raw`).
async fn raw_sandbox(gw: &TestGateway) -> TestSandbox {
    gw.create_fixture_with("export FIXTURE_MODE=raw;", json!({}))
        .await
}

/// One HTTP/1.1 response read off a raw connection: status, lower-cased head, decoded body.
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads one response from `buf` + `s`, leaving any bytes after it in `buf`.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> RawResponse {
    tokio::time::timeout(WAIT, async {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            fill(s, buf).await;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        buf.drain(..head_end);
        let status = head[9..12].parse().expect("status code");
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse::<usize>().expect("length"));
        let mut body = Vec::new();
        if let Some(n) = length {
            while buf.len() < n {
                fill(s, buf).await;
            }
            body.extend(buf.drain(..n));
        } else if head.contains("transfer-encoding: chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    fill(s, buf).await;
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&buf[..line_end]).unwrap().trim(),
                    16,
                )
                .expect("chunk size");
                buf.drain(..line_end + 2);
                while buf.len() < size + 2 {
                    fill(s, buf).await;
                }
                body.extend(buf.drain(..size));
                buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        }
        RawResponse { status, head, body }
    })
    .await
    .expect("a complete response in time")
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 8192];
    let n = s.read(&mut chunk).await.expect("read");
    assert!(
        n > 0,
        "connection closed early; so far: {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

/// Whether the gateway closes `s` (end of stream) within `WAIT`.
async fn closed(s: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// `GET path` with `fields` (each ending in CRLF) after `Host: gw`.
fn get(path: &str, fields: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\n{fields}\r\n")
}

/// A new connection to the gateway with `req` already sent on it.
async fn send(addr: SocketAddr, req: &str) -> TcpStream {
    let mut s = connect(addr).await;
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

async fn pipelined_requests_are_answered_in_order(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = raw_sandbox(&gw).await;
    let mut s = connect(gw.addr).await;
    let one = format!(
        "GET {} HTTP/1.1\r\nHost: gw\r\nX-Seq: 1\r\n\r\n",
        sb.path("/raw/echo")
    );
    let two = format!(
        "POST {} HTTP/1.1\r\nHost: gw\r\nX-Seq: 2\r\nContent-Length: 5\r\n\r\nhello",
        sb.path("/raw/echo")
    );
    let three = format!(
        "GET {} HTTP/1.1\r\nHost: gw\r\nX-Seq: 3\r\n\r\n",
        sb.path("/")
    );
    s.write_all(format!("{one}{two}{three}").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r1 = read_response(&mut s, &mut buf).await;
    let r2 = read_response(&mut s, &mut buf).await;
    let r3 = read_response(&mut s, &mut buf).await;
    // Header names compared without case: hyper's lane sends them lowercase.
    let seen1 = String::from_utf8_lossy(&r1.body).to_ascii_lowercase();
    let seen2 = String::from_utf8_lossy(&r2.body).to_ascii_lowercase();
    assert!(seen1.starts_with("get /raw/echo http/1.1\r\n"), "{seen1}");
    assert!(
        seen1.contains("x-seq: 1") && !seen1.contains("content-length"),
        "{seen1}"
    );
    assert!(seen2.starts_with("post /raw/echo http/1.1\r\n"), "{seen2}");
    assert!(
        seen2.contains("x-seq: 2") && seen2.ends_with("\r\n\r\nhello"),
        "{seen2}"
    );
    assert_eq!((r3.status, r3.body.as_slice()), (200, &b"fixture ok"[..]));
}

/// The data of a chunked body (extensions ignored) and the bytes from its last chunk on.
fn dechunk(mut body: &[u8]) -> (Vec<u8>, &[u8]) {
    let mut data = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a size line");
        let line = std::str::from_utf8(&body[..line_end]).expect("ascii size line");
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return (data, body);
        }
        let start = line_end + 2;
        data.extend_from_slice(&body[start..start + size]);
        assert_eq!(&body[start + size..start + size + 2], b"\r\n");
        body = &body[start + size + 2..];
    }
}

async fn chunked_request_bodies_arrive_whole_without_trailers_and_the_connection_stays_usable(
    lane: Lane,
) {
    let gw = TestGateway::on(lane).await;
    let sb = raw_sandbox(&gw).await;
    let mut s = connect(gw.addr).await;
    // Split inside a chunk-size line and inside the data, across writes.
    let body = b"4;ext=1\r\nWiki\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n";
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n",
        sb.path("/raw/echo")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for piece in [&body[..2], &body[2..12], &body[12..]] {
        s.write_all(piece).await.unwrap();
        s.flush().await.unwrap();
    }
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf).await;
    let seen = r.body;
    let split = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let seen_head = String::from_utf8_lossy(&seen[..split]).to_ascii_lowercase();
    assert!(
        seen_head.contains("transfer-encoding: chunked\r\n"),
        "{seen_head}"
    );
    assert!(!seen_head.contains("content-length"), "{seen_head}");
    // The data arrives whole; trailers never reach a sandbox (they could carry gateway
    // credentials), so the body ends with the bare last chunk.
    let (data, rest) = dechunk(&seen[split..]);
    assert_eq!(data, b"Wiki0123456789abcdef");
    assert_eq!(rest, b"0\r\n\r\n", "the body ends with a bare last chunk");
    // The same connection serves the next request.
    let next = format!("GET {} HTTP/1.1\r\nHost: gw\r\n\r\n", sb.path("/"));
    s.write_all(next.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.body, b"fixture ok");
}

async fn a_body_without_length_reaches_the_client_chunked(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = raw_sandbox(&gw).await;
    let mut s = connect(gw.addr).await;
    let mut buf = Vec::new();
    for _ in 0..2 {
        let req = get(&sb.path("/raw/until-close"), "");
        s.write_all(req.as_bytes()).await.unwrap();
        let r = read_response(&mut s, &mut buf).await;
        assert_eq!(r.status, 200);
        assert!(r.head.contains("transfer-encoding: chunked"), "{}", r.head);
        assert_eq!(r.body, b"part1part2");
    }
}

async fn an_upstream_closing_its_kept_connection_costs_the_client_nothing(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = raw_sandbox(&gw).await;
    let mut s = connect(gw.addr).await;
    let mut buf = Vec::new();
    for _ in 0..5 {
        let req = get(&sb.path("/raw/close-after"), "");
        s.write_all(req.as_bytes()).await.unwrap();
        let r = read_response(&mut s, &mut buf).await;
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    }
}

async fn interim_responses_are_passed_over(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = raw_sandbox(&gw).await;
    let mut s = send(gw.addr, &get(&sb.path("/raw/interim"), "")).await;
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
}

async fn an_early_answer_ends_the_upload_and_the_connection(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = raw_sandbox(&gw).await;
    let mut s = connect(gw.addr).await;
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000000\r\n\r\n",
        sb.path("/raw/early")
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(&[b'x'; 64 * 1024]).await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf).await;
    if lane == Lane::Hyper && r.status == 502 {
        // hyper's client reports the failed body write instead of the answer when the
        // sandbox's close reaches it first (a race inside hyper's client, not the policy's):
        // the client still learns at once that the upload is over, and nothing is left open.
        assert!(
            r.head.contains("x-sandgate-error: upstream_error"),
            "{}",
            r.head
        );
    } else {
        assert_eq!((r.status, r.body.as_slice()), (413, &b"nope"[..]));
    }
    assert!(r.head.contains("connection: close"), "{}", r.head);
    assert!(
        closed(&mut s).await,
        "the gateway closes a connection whose body it left unread"
    );
}

async fn ambiguous_request_framing_never_reaches_the_sandbox(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = raw_sandbox(&gw).await;
    for framing in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Content-Length: 5\r\nContent-Length: 6",
        "Transfer-Encoding: gzip, chunked",
    ] {
        let mut s = connect(gw.addr).await;
        // Were the framing misread, the "body" would smuggle a second request.
        let smuggled = format!("GET {} HTTP/1.1\r\nHost: gw\r\n\r\n", sb.path("/raw/echo"));
        let req = format!(
            "POST {} HTTP/1.1\r\nHost: gw\r\n{framing}\r\n\r\n0\r\n\r\n{smuggled}",
            sb.path("/raw/echo")
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let r = read_response(&mut s, &mut buf).await;
        if lane == Lane::Hyper && framing.contains("Transfer-Encoding: chunked") {
            // hyper's parser follows RFC 9112 §6.3 here instead of refusing: the chunked
            // coding wins, Content-Length is dropped, the body is re-framed for the sandbox
            // and the connection ends after the exchange, so the "body" after the last chunk
            // never becomes a request either.
            assert_eq!(r.status, 200, "{framing:?}");
            let seen = String::from_utf8_lossy(&r.body).to_ascii_lowercase();
            assert_eq!(seen.matches("http/1.1\r\n").count(), 1, "{seen}");
            assert!(!seen.contains("content-length"), "{seen}");
            assert!(closed(&mut s).await, "{framing:?}: the connection ends");
            continue;
        }
        assert_eq!(
            r.status,
            400,
            "{framing:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        // hyper's parser answers what it refuses itself (conflicting lengths) with a bare
        // 400 before any policy sees the request; everything else is the gateway's own.
        let hyper_refused = lane == Lane::Hyper && framing.contains("Content-Length: 6");
        assert!(
            hyper_refused || r.head.contains("x-sandgate-error: bad_request"),
            "{}",
            r.head
        );
        assert!(
            closed(&mut s).await,
            "{framing:?}: the connection ends after the refusal"
        );
    }
}

/// The targets of every request the raw sandbox has read whole so far.
async fn sandbox_log(gw: &TestGateway, sb: &TestSandbox) -> String {
    let mut s = send(gw.addr, &get(&sb.path("/raw/log"), "")).await;
    let r = read_response(&mut s, &mut Vec::new()).await;
    String::from_utf8_lossy(&r.body).into_owned()
}

/// A bare LF in a chunk extension: a sandbox server that ends the size line there would read
/// the body at another offset, and the "data" as a second request on a pooled connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_bare_lf_in_a_chunk_extension_gets_400_and_never_reaches_the_sandbox() {
    let gw = TestGateway::start().await;
    let sb = raw_sandbox(&gw).await;
    let target = sb.path("/raw/echo?bare-lf-extension");
    let smuggled = sb.path("/raw/echo?smuggled");
    let req = format!(
        "POST {target} HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n\
         3;x\nGET {smuggled} HTTP/1.1\r\nHost: gw\r\n\r\n\r\nabc\r\n0\r\n\r\n"
    );
    let mut s = send(gw.addr, &req).await;
    let r = read_response(&mut s, &mut Vec::new()).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.head.contains("x-sandgate-error: bad_request"),
        "{}",
        r.head
    );
    assert!(
        r.head.contains("content-type: application/json"),
        "{}",
        r.head
    );
    assert!(
        closed(&mut s).await,
        "the connection ends after the refusal"
    );
    let log = sandbox_log(&gw, &sb).await;
    assert!(
        !log.contains("bare-lf") && !log.contains("smuggled"),
        "{log}"
    );
}

/// Trailers never reach the sandbox: a gateway credential in one would otherwise get past the
/// header rules. The body ends with the lane's own last chunk.
#[tokio::test(flavor = "multi_thread")]
async fn a_trailer_never_reaches_the_sandbox() {
    let gw = TestGateway::start().await;
    let sb = raw_sandbox(&gw).await;
    let mut s = connect(gw.addr).await;
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nTrailer: x-api-key\r\n\r\n\
         5\r\nhello\r\n0\r\nx-api-key: gateway-secret\r\nx-other: 1\r\n\r\n",
        sb.path("/raw/echo")
    );
    // The trailer section arrives in pieces.
    let (a, b) = req.split_at(req.len() - 20);
    s.write_all(a.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf).await;
    let seen = String::from_utf8_lossy(&r.body).to_string();
    assert_eq!(r.status, 200);
    assert!(!seen.contains("gateway-secret"), "{seen}");
    assert!(!seen.to_ascii_lowercase().contains("trailer"), "{seen}");
    assert!(seen.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{seen}");
    // The connection and the body's framing stay in step.
    s.write_all(get(&sb.path("/"), "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.body, b"fixture ok");
}

/// A sandbox whose chunked response has a bare LF in a size line cannot make the client read
/// a forged second response after what a lenient parser would take for the body's end: the
/// client's response is cut instead.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_chunked_response_cannot_forge_a_second_response() {
    let gw = TestGateway::start().await;
    let sb = raw_sandbox(&gw).await;
    let mut s = connect(gw.addr).await;
    // A second request pipelined: the forged response would pose as its answer.
    let req = format!(
        "{}{}",
        get(&sb.path("/raw/bad-chunks"), ""),
        get(&sb.path("/"), "")
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read_all = async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read_all)
        .await
        .expect("the gateway closes the connection");
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains("forged"), "{text}");
    assert!(text.matches("HTTP/1.1 ").count() <= 1, "{text}");
    // The sandbox's connection was not reused: the next request gets a clean answer.
    let mut s = send(gw.addr, &get(&sb.path("/"), "")).await;
    assert_eq!(
        read_response(&mut s, &mut Vec::new()).await.body,
        b"fixture ok"
    );
}

/// `--header-timeout` (`SANDGATE_HEADER_TIMEOUT`) bounds a slow request head and an idle
/// kept-alive connection, in the fast lane and on connections hyper serves (the control API).
/// The default (30 s) is longer than `closed`'s patience, so this fails unless the setting
/// is applied.
async fn slow_heads_and_idle_connections_end_after_the_header_timeout(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| c.header_timeout = Duration::from_millis(500))
        .start()
        .await;
    let sb = raw_sandbox(&gw).await;

    // A head that never completes.
    let mut slow = connect(gw.addr).await;
    let partial = format!("GET {} HTTP/1.1\r\nHost: gw\r\n", sb.path("/"));
    slow.write_all(partial.as_bytes()).await.unwrap();
    assert!(closed(&mut slow).await, "a slow head is cut off");

    // A kept-alive connection idle after a proxied request.
    let mut idle = connect(gw.addr).await;
    let req = format!("GET {} HTTP/1.1\r\nHost: gw\r\n\r\n", sb.path("/"));
    idle.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut idle, &mut buf).await.status, 200);
    assert!(
        closed(&mut idle).await,
        "an idle proxy connection is closed"
    );

    // The same after a control-API request, which hyper serves.
    let mut api = connect(gw.addr).await;
    api.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut api, &mut buf).await.status, 200);
    assert!(closed(&mut api).await, "an idle API connection is closed");
    gw.shutdown().await;
}

async fn a_connection_close_request_gets_its_whole_response_then_a_clean_end_of_stream(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    for _ in 0..3 {
        let mut s = send(gw.addr, &get(&sb.path("/1k"), "Connection: close\r\n")).await;
        let mut buf = Vec::new();
        let r = read_response(&mut s, &mut buf).await;
        assert_eq!((r.status, r.body.len()), (200, 1024));
        assert!(r.head.contains("connection: close"), "{}", r.head);
        assert!(buf.is_empty(), "nothing after the response: {buf:?}");
        let end = tokio::time::timeout(WAIT, s.read(&mut [0u8; 64])).await;
        assert!(
            matches!(end, Ok(Ok(0))),
            "a FIN, not a reset or more bytes: {end:?}"
        );
    }
}

/// A new connection's first request is read before the connection joins the event loop, at
/// most 4 KiB of it; a head larger than that is read on by the event loop and arrives whole.
async fn a_first_request_head_larger_than_the_first_read_arrives_whole(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    let big = "b".repeat(9000);
    let fields = format!("X-Big: {big}\r\nConnection: close\r\n");
    let mut s = send(gw.addr, &get(&sb.path("/echo"), &fields)).await;
    let r = read_response(&mut s, &mut Vec::new()).await;
    assert_eq!(r.status, 200);
    let echoed: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(echoed["headers"]["x-big"], big.as_str());
}

/// A client that leaves while the sandbox is still thinking is noticed (the connection was
/// not yet watched by the event loop, so it is registered after a short grace): its permit
/// comes back long before the sandbox would have answered.
async fn a_client_that_leaves_before_the_answer_releases_its_permit(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    let in_flight = || async {
        let v = gw.get("/health/proxy").send().await.expect(200).json();
        v["in_flight"].as_u64()
    };
    let req = get(&sb.path("/delay/600000"), "Connection: close\r\n");
    let s = send(gw.addr, &req).await;
    eventually(WAIT, "the request is in flight", || async {
        (in_flight().await == Some(1)).then_some(())
    })
    .await;
    drop(s);
    eventually(WAIT, "the permit is released", || async {
        (in_flight().await == Some(0)).then_some(())
    })
    .await;
    gw.shutdown().await;
}

both_lanes!(
    pipelined_requests_are_answered_in_order,
    chunked_request_bodies_arrive_whole_without_trailers_and_the_connection_stays_usable,
    a_body_without_length_reaches_the_client_chunked,
    an_upstream_closing_its_kept_connection_costs_the_client_nothing,
    interim_responses_are_passed_over,
    an_early_answer_ends_the_upload_and_the_connection,
    ambiguous_request_framing_never_reaches_the_sandbox,
    slow_heads_and_idle_connections_end_after_the_header_timeout,
    a_connection_close_request_gets_its_whole_response_then_a_clean_end_of_stream,
    a_first_request_head_larger_than_the_first_read_arrives_whole,
    a_client_that_leaves_before_the_answer_releases_its_permit,
);
