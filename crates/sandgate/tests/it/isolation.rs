//! Isolated process sandboxes (`isolation = netns`, the `auto` default on a privileged host):
//! each sandbox has its own network and PID namespaces, binds its own 127.0.0.1:3000, and the
//! proxy dials inside it. Without the privilege these tests print `SKIPPED` and pass.

use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use sandgate::config::Isolation;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{
    eventually, sandbox_processes, wait_processes_gone, wait_sandbox_processes_gone, TestGateway,
    READY_TIMEOUT,
};

fn netns_or_skip() -> bool {
    let ok = sandgate::backend::process::isolation_available();
    if !ok {
        eprintln!("SKIPPED: no network-namespace privilege (root, CAP_SYS_ADMIN, unshare, ip)");
    }
    ok
}

async fn isolated_gateway() -> TestGateway {
    TestGateway::builder()
        .isolation(Isolation::Netns)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn isolated_sandboxes_share_a_port_and_are_reachable_by_every_route() {
    if !netns_or_skip() {
        return;
    }
    let gw = isolated_gateway().await;
    let health = gw.get("/health").send().await.expect(200).json();
    assert_eq!(health["isolation"], "netns", "{health}");
    let a = gw.create_fixture().await;
    let b = gw.create_fixture().await;
    // Both listen on 127.0.0.1:3000 at the same time: each in a namespace of its own.
    for sb in [&a, &b] {
        assert_eq!(sb.port, 3000, "{}", sb.view);
        assert!(sb.view["allocated_port"].is_null(), "{}", sb.view);
        let host = format!("3000-{}.localhost:{}", sb.id, gw.addr.port());
        let v = gw
            .get("/echo/by-host")
            .header("host", &host)
            .send()
            .await
            .expect(200)
            .json();
        assert_eq!(v["headers"]["host"], "localhost:3000", "{v}");
        let r = gw.get(&format!("/sandbox/{}/", sb.id)).send().await;
        r.expect(200);
        assert_eq!(r.text(), "fixture ok");
    }
    // A WebSocket through a namespace dial.
    let mut ws = gw.websocket(&a.path("/ws"), None).await;
    ws.send(Message::text("inside")).await.expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo within 5 s")
        .expect("a message")
        .expect("no error");
    assert_eq!(echoed, Message::text("inside"));
    drop(ws);
    let ready = gw.get("/health/sandboxes").send().await.expect(200).json();
    assert_eq!(ready["ready"], 2, "{ready}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn isolated_sandboxes_advertise_their_proxy_urls() {
    if !netns_or_skip() {
        return;
    }
    let gw = isolated_gateway().await;
    let sb = gw.create_fixture().await;
    let v = &sb.view;
    // The sandbox is proxied (the route above answers), so the object must say so.
    assert_eq!(v["proxy_enabled"], true, "{v}");
    assert_eq!(
        v["dev_server_url"],
        json!(gw.url(&format!("/sandbox/{}/", sb.id))),
        "{v}"
    );
    assert_eq!(
        v["host_url"],
        json!(format!(
            "http://3000-{}.localhost:{}/",
            sb.id,
            gw.addr.port()
        )),
        "{v}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn isolated_host_route_never_reaches_the_hosts_own_services() {
    if !netns_or_skip() {
        return;
    }
    let gw = isolated_gateway().await;
    let sb = gw.create_fixture().await;
    // A service on the gateway host's loopback.
    let host_service = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = host_service.local_addr().unwrap().port();
    let host = format!("{port}-{}.localhost:{}", sb.id, gw.addr.port());
    let r = gw.get("/").header("host", &host).send().await;
    let message = r.expect_error(502, "upstream_unreachable");
    assert!(message.contains(&port.to_string()), "{message}");
    assert!(
        host_service.accept().now_or_never().is_none(),
        "the proxy connected to the host's service through a sandbox route"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn isolated_delete_leaves_no_process_behind() {
    if !netns_or_skip() {
        return;
    }
    let gw = isolated_gateway().await;
    let sb = gw.create_fixture_with("sleep 1000 &", json!({})).await;
    // unshare, the namespace's init, the fixture and the sleep.
    let procs = eventually(READY_TIMEOUT, "the sandbox's processes run", || async {
        let p = sandbox_processes(&sb.id);
        (p.len() >= 4).then_some(p)
    })
    .await;
    gw.delete_sandbox(&sb.id).await;
    wait_processes_gone(
        procs,
        Duration::from_secs(5),
        "a process of the deleted sandbox",
    )
    .await;
    wait_sandbox_processes_gone(&sb.id, Duration::from_secs(5)).await;
    gw.shutdown().await;
}
