//! `GET /sandboxes/{id}/pty` on every backend: a real shell on a terminal over a WebSocket
//! (binary frames both ways), resized in-band, interrupted with SIGINT as Ctrl-C would, and
//! a session that survives its socket: a reconnect with `since` gets exactly what it missed,
//! a second socket takes the session over (the first is closed with 4001), and the shell's
//! end is reported.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::common::eventually;
use crate::exec::{gateway, Kind};

type Ws = WebSocketStream<TcpStream>;

/// Reads frames until the binary output received since the call contains `want`; returns the
/// bytes received and the text frames seen.
pub(crate) async fn until(ws: &mut Ws, want: &str) -> (Vec<u8>, Vec<Value>) {
    let mut out = Vec::new();
    let mut texts = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no {want:?} within 20 s; got {:?}",
                    String::from_utf8_lossy(&out)
                )
            })
            .expect("the socket stays open")
            .expect("a frame");
        match msg {
            Message::Binary(b) => out.extend_from_slice(&b),
            Message::Text(t) => texts.push(serde_json::from_str(t.as_str()).unwrap()),
            _ => {}
        }
        if String::from_utf8_lossy(&out).contains(want) {
            return (out, texts);
        }
    }
}

pub(crate) async fn text(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a frame within 20 s")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

pub(crate) async fn keys(ws: &mut Ws, s: &str) {
    ws.send(Message::Binary(s.as_bytes().to_vec().into()))
        .await
        .unwrap();
}

async fn terminal_sessions(kind: Kind) {
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let v = gw.create(&json!({"runtime": "shell"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let mut ws = gw
        .websocket(&format!("/sandboxes/{id}/pty?cols=80&rows=24"), None)
        .await;
    let hello = text(&mut ws).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["offset"], 0, "{hello}");
    let session = hello["session"].as_str().unwrap().to_string();
    let mut received = 0u64;
    // The answer, not the typed line (which shows `$((6*7))`).
    keys(&mut ws, "echo sg-$((6*7))\n").await;
    received += until(&mut ws, "sg-42").await.0.len() as u64;
    ws.send(Message::text(
        json!({"type": "resize", "cols": 100, "rows": 30}).to_string(),
    ))
    .await
    .unwrap();
    keys(&mut ws, "stty size\n").await;
    received += until(&mut ws, "30 100").await.0.len() as u64;
    // Ctrl-C, in-band, interrupts the program in the foreground.
    keys(&mut ws, "sleep 37\n").await;
    let tag = format!("SANDGATE_EXEC={session}");
    eventually(Duration::from_secs(10), "sleep runs", || {
        let n = crate::exec::processes_with(&tag)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.starts_with("sleep\x0037"))
            })
            .count();
        async move { (n > 0).then_some(()) }
    })
    .await;
    ws.send(Message::text(
        json!({"type": "signal", "signal": "SIGINT"}).to_string(),
    ))
    .await
    .unwrap();
    keys(&mut ws, "echo after-$((1+1))\n").await;
    received += until(&mut ws, "after-2").await.0.len() as u64;
    // Everything is counted: the output that arrives while nobody looks too.
    keys(&mut ws, "echo gap-$((2+3))\n").await;
    received += until(&mut ws, "gap-5").await.0.len() as u64;
    ws.close(None).await.unwrap();
    let v = gw.sandbox(&id).await;
    assert_eq!(
        v["connections"]["pty"], 1,
        "a detached session lives on: {v}"
    );
    // Back with what was received: nothing old again, and the session goes on.
    let mut ws2 = gw
        .websocket(
            &format!("/sandboxes/{id}/pty?session={session}&since={received}"),
            None,
        )
        .await;
    let hello = text(&mut ws2).await;
    assert_eq!(hello["offset"], received, "{hello}");
    keys(&mut ws2, "echo again-$((3+4))\n").await;
    let (fresh, _) = until(&mut ws2, "again-7").await;
    assert!(
        !String::from_utf8_lossy(&fresh).contains("sg-42"),
        "replayed old output: {:?}",
        String::from_utf8_lossy(&fresh)
    );
    // A third socket from the start takes the session over and replays it all.
    let mut ws3 = gw
        .websocket(
            &format!("/sandboxes/{id}/pty?session={session}&since=0"),
            None,
        )
        .await;
    let (all, _) = until(&mut ws3, "again-7").await;
    assert!(String::from_utf8_lossy(&all).contains("sg-42"));
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws2.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("the first socket was not closed with a reason: {other:?}"),
        }
    };
    assert_eq!(u16::from(closed.code), 4001, "{closed:?}");
    // The shell's end is reported, and the session then holds nothing.
    keys(&mut ws3, "exit 3\n").await;
    let end = loop {
        let t = text(&mut ws3).await;
        if t["type"] == "exit" {
            break t;
        }
    };
    assert_eq!(end["exit_code"], 3, "{end}");
    eventually(
        Duration::from_secs(10),
        "the session is no longer counted",
        || async { (gw.sandbox(&id).await["connections"]["pty"] == 0).then_some(()) },
    )
    .await;
    // An unknown session is not found; a plain GET is no handshake.
    gw.get(&format!("/sandboxes/{id}/pty?session=pt-nope"))
        .websocket_handshake()
        .send()
        .await
        .expect_error(404, "exec_not_found");
    gw.get(&format!("/sandboxes/{id}/pty"))
        .send()
        .await
        .expect_error(400, "bad_request");
    gw.delete_sandbox(&id).await;
}

every_backend!(terminal_sessions);

/// The terminal page in headless Chromium: the credential from the URL fragment (then gone
/// from the address bar), typed keys reach the shell, the shell's answer shows, and a reload
/// re-attaches to the same session and replays its output.
#[tokio::test(flavor = "multi_thread")]
async fn the_terminal_page_in_a_real_browser() {
    use crate::common::browser::{available, Browser};
    if !available() {
        return;
    }
    let gw = crate::common::auth_gateway(crate::common::Lane::Fast, |_| {}).await;
    let (key, _) = crate::common::team_key(&gw, "term", "member").await;
    let member = gw.with_key(&key);
    let v = member.create(&json!({"runtime": "shell"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    // The page itself needs no credential.
    let page = gw.get(&format!("/ui/sandboxes/{id}/terminal")).send().await;
    page.expect(200);
    assert!(page
        .header("content-security-policy")
        .contains("frame-ancestors 'none'"));
    gw.get("/ui/assets/xterm.js").send().await.expect(200);
    // Without a credential, no terminal.
    gw.get(&format!("/sandboxes/{id}/pty"))
        .websocket_handshake()
        .send()
        .await
        .expect_error(401, "AUTH_002");
    let mut browser = Browser::start().await;
    let url = format!(
        "http://127.0.0.1:{}/ui/sandboxes/{id}/terminal#token={key}",
        gw.addr.port()
    );
    let tab = browser.open(&url).await;
    let status = "document.getElementById('status').textContent";
    // What the terminal shows, read from its buffer (a headless tab need not paint).
    let rows = "(() => { const t = window.sandgateTerminal; if (!t) return ''; \
                const b = t.buffer.active; let s = ''; \
                for (let i = 0; i < b.length; i++) s += b.getLine(i).translateToString(true) + '\\n'; \
                return s; })()";
    browser.wait_for(&tab, status, |s| s == "connected").await;
    let href = browser.eval(&tab, "location.href").await;
    assert!(!href.as_str().unwrap().contains("token"), "{href}");
    browser
        .eval(
            &tab,
            "document.querySelector('.xterm-helper-textarea').focus()",
        )
        .await;
    browser.type_text(&tab, "echo sg-$((6*7))\r").await;
    browser.wait_for(&tab, rows, |t| t.contains("sg-42")).await;
    // A reload comes back to the same session, whose output is replayed.
    browser
        .eval(&tab, "setTimeout(() => location.reload(), 0); true")
        .await;
    browser
        .wait_for(
            &tab,
            "document.readyState + ':' + (document.getElementById('status') || {}).textContent",
            |s| s == "complete:connected",
        )
        .await;
    browser.wait_for(&tab, rows, |t| t.contains("sg-42")).await;
    let v = member.sandbox(&id).await;
    assert_eq!(v["connections"]["pty"], 1, "one session, re-attached: {v}");
    member.delete_sandbox(&id).await;
}
