//! TLS (`--tls-cert`/`--tls-key`): real TLS clients (tokio-rustls, and curl where installed)
//! against a gateway serving a certificate from a test CA. HTTP/1.1 and h2 by ALPN, the API
//! and the proxy (HTTP, h2, WebSocket) over TLS with the fast lane configured on, certificate
//! reload without dropping open connections (a broken reload keeps the old certificate), and
//! bad certificate files refused at startup.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::{Request, StatusCode, Version};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::common::tls::{self, handshake_facts, CertDir, Sender};
use crate::common::{eventually, Reply, SpawnedGateway, TestGateway, REQUEST_TIMEOUT};

/// `GET {url}` as a request for a TLS client (absolute form, as h2 needs).
fn get(url: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(url)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// Sends on an open connection and reads the whole response, bounded.
async fn exchange(tx: &mut Sender<Full<Bytes>>, req: Request<Full<Bytes>>) -> Reply {
    let done = async { Reply::read(tx.send(req).await?).await };
    tokio::time::timeout(REQUEST_TIMEOUT, done)
        .await
        .expect("a response within the bound")
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The certificate a fresh handshake with `addr` presents.
async fn presented(addr: std::net::SocketAddr, certs: &CertDir) -> Option<Vec<u8>> {
    let stream = tls::connect(addr, &certs.connector(&[b"http/1.1"]))
        .await
        .ok()?;
    Some(handshake_facts(&stream).0)
}

/// Overwrites the certificate files with a new certificate for `cn` and waits (bounded) until
/// a new handshake with `addr` presents it.
async fn replace_and_wait(addr: std::net::SocketAddr, certs: &CertDir, cn: &str) -> tls::Leaf {
    let leaf = certs.ca.issue(cn);
    certs.install(&leaf);
    eventually(
        Duration::from_secs(15),
        &format!("a new handshake presents the certificate of {cn:?}"),
        || async { (presented(addr, certs).await? == leaf.der).then_some(()) },
    )
    .await;
    leaf
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_over_tls_gets_health_and_plain_http_is_told_to_use_https() {
    let certs = CertDir::new();
    let gw = TestGateway::builder().tls(&certs).start().await;
    let stream = tls::connect(gw.addr, &certs.connector(&[b"http/1.1"]))
        .await
        .unwrap();
    let (leaf, alpn) = handshake_facts(&stream);
    assert_eq!(leaf, certs.leaf.der, "the configured certificate");
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let mut tx = Sender::handshake(stream).await.unwrap();
    let r = exchange(&mut tx, get(&gw.url("/health"))).await;
    r.expect(200);
    assert_eq!(r.json()["status"], "ok");
    // A second request on the same connection.
    exchange(&mut tx, get(&gw.url("/health"))).await.expect(200);

    // No ALPN at all is HTTP/1.1 too (the harness's own client, through the API).
    let stream = tls::connect(gw.addr, &certs.connector(&[])).await.unwrap();
    assert_eq!(handshake_facts(&stream).1, None);
    let mut tx = Sender::handshake(stream).await.unwrap();
    exchange(&mut tx, get(&gw.url("/health"))).await.expect(200);

    // The listener speaks TLS only: a plaintext request is told so, in plain HTTP.
    let mut plain = gw.client.clone();
    plain.tls = None;
    let r = plain.get("/health").send().await;
    let message = r.expect_error(400, "bad_request");
    assert!(message.contains("HTTPS only"), "{message}");
    assert_eq!(r.header("connection"), "close");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn alpn_negotiates_h2_and_h2_requests_work() {
    let certs = CertDir::new();
    let gw = TestGateway::builder().tls(&certs).start().await;
    let stream = tls::connect(gw.addr, &certs.connector(&[b"h2", b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(handshake_facts(&stream).1.as_deref(), Some(&b"h2"[..]));
    let mut tx = Sender::handshake(stream).await.unwrap();
    assert!(matches!(tx, Sender::H2(_)));
    // Two streams at once on the one connection.
    let (a, b) = {
        let Sender::H2(h2) = &mut tx else {
            unreachable!()
        };
        let (mut one, mut two) = (h2.clone(), h2.clone());
        let (a, b) = tokio::join!(
            one.send_request(get(&gw.url("/health"))),
            two.send_request(get(&gw.url("/sandboxes")))
        );
        (a.unwrap(), b.unwrap())
    };
    assert_eq!(a.version(), Version::HTTP_2);
    let (a, b) = (Reply::read(a).await.unwrap(), Reply::read(b).await.unwrap());
    a.expect(200);
    b.expect(200);
    assert_eq!(b.json()["count"], 0);
    gw.shutdown().await;
}

/// The configuration's fast lane is on, yet every TLS request takes hyper's lane: the API and
/// the proxy work over TLS, with `X-Forwarded-Proto: https`, https `dev_server_url`s and
/// `Location`s, over HTTP/1.1, h2 and a WebSocket.
#[tokio::test(flavor = "multi_thread")]
async fn sandboxes_are_proxied_over_tls_with_the_fast_lane_configured_on() {
    let certs = CertDir::new();
    let gw = TestGateway::builder()
        .tls(&certs)
        .lane(crate::common::Lane::Fast)
        .start()
        .await;
    assert!(gw.config.fast_lane);
    // The harness's client speaks HTTP/1.1 over TLS: create and readiness go through TLS.
    let sb = gw.create_fixture().await;
    let url = sb.view["dev_server_url"].as_str().unwrap_or_default();
    assert!(
        url.starts_with(&format!("https://127.0.0.1:{}/", gw.addr.port())),
        "{url}"
    );

    let r = gw
        .post(&sb.path("/echo/tls?x=1"))
        .header("x-custom", "over-tls")
        .body("tls body")
        .send()
        .await;
    r.expect(200);
    let v = r.json();
    assert_eq!(v["path"], "/echo/tls");
    assert_eq!(v["body"], "tls body");
    assert_eq!(v["headers"]["x-forwarded-proto"], "https", "{v}");
    assert_eq!(v["headers"]["x-custom"], "over-tls", "{v}");

    let r = gw.get(&sb.path("/redirect")).send().await;
    r.expect(302);
    assert_eq!(
        r.header("location"),
        gw.url(&sb.path("/echo/after-redirect"))
    );
    assert!(r.header("location").starts_with("https://"));

    // h2 through the proxy: a larger body, streamed.
    let stream = tls::connect(gw.addr, &certs.connector(&[b"h2"]))
        .await
        .unwrap();
    let mut tx = Sender::handshake(stream).await.unwrap();
    let r = exchange(&mut tx, get(&gw.url(&sb.path("/bytes/300000")))).await;
    r.expect(200);
    assert_eq!(r.body.len(), 300_000);
    let r = exchange(&mut tx, get(&gw.url(&sb.path("/echo/h2")))).await;
    assert_eq!(r.json()["headers"]["x-forwarded-proto"], "https");

    // A WebSocket over TLS (wss), spliced by hyper's lane.
    let stream = tls::connect(gw.addr, &certs.connector(&[b"http/1.1"]))
        .await
        .unwrap();
    let req = format!("wss://{}{}", gw.addr, sb.path("/ws"))
        .into_client_request()
        .unwrap();
    let (mut ws, resp) = tokio::time::timeout(
        REQUEST_TIMEOUT,
        tokio_tungstenite::client_async(req, stream),
    )
    .await
    .expect("websocket handshake within the bound")
    .expect("websocket handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for msg in [
        Message::text("hello over wss"),
        Message::binary(vec![7u8; 70_000]),
    ] {
        ws.send(msg.clone()).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match ws.next().await {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return m,
                    Some(Ok(_)) => continue,
                    other => panic!("websocket ended before the echo: {other:?}"),
                }
            }
        })
        .await
        .expect("echo within 5 s");
        assert_eq!(echoed, msg);
    }
    ws.close(None).await.unwrap();
    gw.shutdown().await;
}

/// New handshakes present a replaced certificate once the gateway has seen the files change;
/// connections opened before go on with theirs. A broken replacement keeps the certificate in
/// use (and says so in the log).
#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_certificate_is_used_by_new_handshakes_and_open_connections_go_on() {
    let certs = CertDir::new();
    let (cert, key) = (
        certs.files.cert.display().to_string(),
        certs.files.key.display().to_string(),
    );
    let gw = SpawnedGateway::start_tls(
        4,
        &["--tls-cert", &cert, "--tls-key", &key],
        certs.connector(&[b"http/1.1"]),
    )
    .await;
    let addr = gw.addr;
    let old_h1 = tls::connect(addr, &certs.connector(&[b"http/1.1"]))
        .await
        .unwrap();
    let old_h2 = tls::connect(addr, &certs.connector(&[b"h2"]))
        .await
        .unwrap();
    assert_eq!(handshake_facts(&old_h1).0, certs.leaf.der);
    let mut h1 = Sender::handshake(old_h1).await.unwrap();
    let mut h2 = Sender::handshake(old_h2).await.unwrap();
    exchange(&mut h1, get(&gw.url("/health"))).await.expect(200);
    exchange(&mut h2, get(&gw.url("/health"))).await.expect(200);

    let second = replace_and_wait(addr, &certs, "sandgate test server 2").await;
    // The connections opened before the swap still work, each for another request.
    exchange(&mut h1, get(&gw.url("/health"))).await.expect(200);
    exchange(&mut h2, get(&gw.url("/sandboxes")))
        .await
        .expect(200);

    // Half a replacement: the certificate file is garbage (a PEM block with no end). The
    // watcher reports it (a failure only this write can cause: an install may briefly pair a
    // new certificate with the old key, never bad PEM) and new handshakes keep getting the
    // second certificate.
    std::fs::write(&certs.files.cert, "-----BEGIN CERTIFICATE-----\nnope\n").unwrap();
    eventually(
        Duration::from_secs(15),
        "the gateway logs the failed reload",
        || async {
            let log = gw.log();
            let line = log
                .lines()
                .find(|l| l.contains("cert.pem: not valid PEM"))?;
            assert!(line.contains("reload failed"), "{line}");
            Some(())
        },
    )
    .await;
    assert_eq!(presented(addr, &certs).await, Some(second.der.clone()));
    gw.get("/health").send().await.expect(200);

    replace_and_wait(addr, &certs, "sandgate test server 3").await;
    exchange(&mut h1, get(&gw.url("/health"))).await.expect(200);
    assert!(
        gw.log().contains("TLS certificate reloaded"),
        "{}",
        gw.log()
    );
}

/// Bad certificate settings stop the gateway before it listens, with status 64 and a message
/// naming the setting or file and what is wrong with it.
#[test]
fn startup_refuses_bad_certificate_files_with_a_clear_message() {
    let certs = CertDir::new();
    let dir = certs.path();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let other = certs.ca.issue("another server");
    let other_key = dir.join("other-key.pem");
    std::fs::write(&other_key, &other.key_pem).unwrap();
    let (cert, key) = (&certs.files.cert, &certs.files.key);
    let missing = dir.join("missing.pem");
    let s = |p: &std::path::Path| p.display().to_string();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["--tls-cert".into(), s(cert)],
            vec!["--tls-key", "is not"],
        ),
        (
            vec!["--tls-key".into(), s(key)],
            vec!["--tls-cert", "is not"],
        ),
        (
            vec!["--tls-cert".into(), s(&garbage), "--tls-key".into(), s(key)],
            vec!["garbage.pem", "no certificate"],
        ),
        (
            vec![
                "--tls-cert".into(),
                s(cert),
                "--tls-key".into(),
                s(&garbage),
            ],
            vec!["garbage.pem", "no private key"],
        ),
        (
            vec![
                "--tls-cert".into(),
                s(cert),
                "--tls-key".into(),
                s(&other_key),
            ],
            vec!["other-key.pem", "does not match", "cert.pem"],
        ),
        (
            vec!["--tls-cert".into(), s(&missing), "--tls-key".into(), s(key)],
            vec!["cannot read TLS certificate file", "missing.pem"],
        ),
    ];
    let data_dir = tempfile::tempdir().unwrap();
    for (args, needles) in cases {
        for check in [true, false] {
            let mut cmd = crate::cli::sandgate();
            cmd.args(["serve", "--port", "0", "--data-dir"])
                .arg(data_dir.path())
                .args(&args);
            if check {
                cmd.arg("--check-config");
            }
            let out = cmd.output().unwrap();
            let (stdout, stderr) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            assert_eq!(out.status.code(), Some(64), "{args:?}: {stdout} {stderr}");
            assert!(!stdout.contains("listening on"), "{args:?}: {stdout}");
            for needle in &needles {
                assert!(
                    stderr.contains(needle),
                    "{args:?} lacks {needle:?}: {stderr}"
                );
            }
        }
    }
    // The same settings from the environment and the configuration file.
    let file = dir.join("sandgate.toml");
    std::fs::write(
        &file,
        format!("tls_cert = {:?}\ntls_key = {:?}\n", s(cert), s(key)),
    )
    .unwrap();
    let out = crate::cli::sandgate()
        .args(["serve", "--check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("cert.pem") && stdout.contains("key.pem"),
        "{stdout}"
    );
    let out = crate::cli::sandgate()
        .args(["serve", "--check-config"])
        .env("SANDGATE_TLS_CERT", cert)
        .env("SANDGATE_TLS_KEY", &garbage)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no private key"));
}

/// curl (OpenSSL), where installed (CI installs it): HTTP/1.1 and h2 by ALPN, verifying the
/// gateway's certificate against the test CA, with the real binary and `--fast-lane on`.
#[tokio::test(flavor = "multi_thread")]
async fn curl_reaches_the_gateway_over_tls() {
    let Ok(which) = std::process::Command::new("curl").arg("--version").output() else {
        // CI installs curl (.ci/run): there its absence is a failure, not a skip.
        assert!(std::env::var_os("CI").is_none(), "curl is not installed");
        eprintln!("curl is not installed; skipping");
        return;
    };
    let version = String::from_utf8_lossy(&which.stdout);
    let certs = CertDir::new();
    let (cert, key) = (
        certs.files.cert.display().to_string(),
        certs.files.key.display().to_string(),
    );
    let gw = SpawnedGateway::start_tls(
        4,
        &["--fast-lane", "on", "--tls-cert", &cert, "--tls-key", &key],
        certs.connector(&[b"http/1.1"]),
    )
    .await;
    let port = gw.addr.port();
    let mut protocols = vec![("--http1.1", "1.1")];
    if version.contains("HTTP2") {
        protocols.push(("--http2", "2"));
    }
    for (flag, expected) in protocols {
        let out = tokio::process::Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "20", flag])
            .arg("--cacert")
            .arg(certs.ca_path())
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args(["--write-out", "\n%{http_code} %{http_version}"])
            .arg(format!("https://localhost:{port}/health"))
            .output()
            .await
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {flag}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, status) = stdout.rsplit_once('\n').unwrap();
        assert_eq!(status, format!("200 {expected}"), "curl {flag}: {stdout}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["status"], json!("ok"));
    }
    // Without the test CA (the system's only) curl refuses: the certificate is really checked.
    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--max-time", "20"])
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(format!("https://localhost:{port}/health"))
        .output()
        .await
        .expect("run curl");
    assert!(!out.status.success(), "curl trusted an unknown CA");
}
