//! The front door, in both lanes: malformed and oversized request heads are refused and the
//! connection closed; h2c connections that idle or never finish their preface are closed
//! after the header timeout, while a stream in progress keeps flowing.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Lane, TestGateway};

const WAIT: Duration = Duration::from_secs(20);

/// Everything the gateway sends until it closes the connection (bounded by `WAIT`); `None`
/// if it is still open then.
async fn until_closed(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&buf).into_owned()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return None,
        }
    }
}

async fn malformed_and_oversized_heads_are_refused(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    let path = sb.path("/");
    let many_fields: String = (0..101).map(|i| format!("x-f{i}: v\r\n")).collect();
    let huge_field = format!("x-big: {}\r\n", "a".repeat(70 * 1024));
    let cases = [
        (
            format!("GET {path} HTTP/1.1\r\nHost: gw\r\nBad Name: v\r\n\r\n"),
            400,
        ),
        (
            format!("GET {path} HTTP/1.1\r\nHost: gw\r\nx: a\x01b\r\n\r\n"),
            400,
        ),
        (format!("G\x01T {path} HTTP/1.1\r\nHost: gw\r\n\r\n"), 400),
        (
            format!("GET {path} HTTP/1.1\r\nHost: gw\r\n{many_fields}\r\n"),
            431,
        ),
        (
            format!("GET {path} HTTP/1.1\r\nHost: gw\r\n{huge_field}\r\n"),
            431,
        ),
    ];
    for (req, status) in cases {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let resp = until_closed(&mut s)
            .await
            .unwrap_or_else(|| panic!("the connection stays open after {:.60?}", req));
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status}")),
            "{:.60?}: {resp}",
            req
        );
        // hyper's lane answers what its parser refuses with hyper's own bare response; the
        // fast lane reads every connection's first head and answers in the gateway's shape.
        if lane == Lane::Fast {
            assert!(resp.contains("x-sandgate-error: "), "{resp}");
            assert!(resp.contains("{\"error\":"), "{resp}");
        }
    }
    gw.shutdown().await;
}

async fn h2c_connections_that_idle_or_stall_are_closed(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| c.header_timeout = Duration::from_millis(500))
        .start()
        .await;
    let sb = gw.create_fixture().await;

    // A preface that never completes.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n").await.unwrap();
    let t = Instant::now();
    assert!(
        until_closed(&mut s).await.is_some(),
        "a stalled preface is cut"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A complete preface and SETTINGS, then no request.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    assert!(
        until_closed(&mut s).await.is_some(),
        "an idle h2c connection is closed"
    );

    // A connection that served a request, then idles: closed; a stream still streaming when
    // the connection goes idle keeps flowing until it ends.
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = |path: &str| {
        Request::builder()
            .uri(gw.url(&sb.path(path)))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let resp = tx.send_request(req("/")).await.unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "fixture ok"
    );
    // Ten events 200 ms apart: the stream outlives the 500 ms idle limit.
    let resp = tx
        .send_request(req("/sse?events=10&interval_ms=200"))
        .await
        .unwrap();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("the stream ends in time")
        .expect("the stream is not cut")
        .to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body).matches("data: ").count(),
        10,
        "{body:?}"
    );
    let ended = tokio::time::timeout(WAIT, conn).await;
    assert!(
        ended.is_ok(),
        "the idle connection is closed by the gateway"
    );
    gw.shutdown().await;
}

both_lanes!(
    malformed_and_oversized_heads_are_refused,
    h2c_connections_that_idle_or_stall_are_closed,
);
