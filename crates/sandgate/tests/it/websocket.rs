//! WebSocket through the proxy: echo both ways (text and binary) on the path and host routes,
//! and an idle connection outlives `PROXY_TIMEOUT`.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::common::{Lane, TestGateway};

/// Sends `msg` and expects the same message back, within a bound.
async fn round_trip(ws: &mut WebSocketStream<TcpStream>, msg: Message) {
    ws.send(msg.clone()).await.expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return m,
                Some(Ok(_)) => continue, // ping/pong
                Some(Err(e)) => panic!("websocket error: {e}"),
                None => panic!("websocket closed before the echo"),
            }
        }
    })
    .await
    .expect("echo within 5 s");
    assert_eq!(echoed, msg);
}

async fn echo_text_and_binary(ws: &mut WebSocketStream<TcpStream>) {
    round_trip(ws, Message::text("hello through sandgate")).await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    round_trip(ws, Message::binary(binary)).await;
    round_trip(ws, Message::text("")).await;
}

async fn websocket_echo_through_the_path_route(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    let mut ws = gw.websocket(&sb.path("/ws"), None).await;
    echo_text_and_binary(&mut ws).await;
    ws.close(None).await.expect("close");
    gw.shutdown().await;
}

async fn websocket_echo_through_the_host_route(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    let host = format!(
        "{}-{}.localhost:{}",
        sb.allocated_port,
        sb.id,
        gw.addr.port()
    );
    let mut ws = gw.websocket("/ws", Some(&host)).await;
    echo_text_and_binary(&mut ws).await;
    ws.close(None).await.expect("close");
    gw.shutdown().await;
}

async fn idle_websocket_outlives_the_proxy_timeout(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| c.proxy_timeout = Duration::from_secs(1))
        .start()
        .await;
    let sb = gw.create_fixture().await;
    let mut ws = gw.websocket(&sb.path("/ws"), None).await;
    round_trip(&mut ws, Message::text("before idling")).await;
    // Being idle for longer than PROXY_TIMEOUT is the behaviour under test; there is no
    // condition to poll for, so this one wait is a plain sleep.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    round_trip(&mut ws, Message::text("after idling")).await;
    round_trip(&mut ws, Message::binary(vec![1, 2, 3])).await;
    ws.close(None).await.expect("close");
    gw.shutdown().await;
}

both_lanes!(
    websocket_echo_through_the_path_route,
    websocket_echo_through_the_host_route,
    idle_websocket_outlives_the_proxy_timeout,
);
