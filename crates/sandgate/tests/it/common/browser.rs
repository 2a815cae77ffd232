//! A real headless Chromium (Debian's `chromium`, which CI installs), driven over the Chrome
//! DevTools Protocol on a WebSocket: open a page, evaluate JavaScript in it. Each browser has
//! a profile of its own (a temporary directory), so cookies never leak between tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub struct Browser {
    child: Child,
    cdp: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// Whether Chromium is installed; under CI (which installs it) its absence is a failure.
pub fn available() -> bool {
    let found = Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found || std::env::var_os("CI").is_none(),
        "chromium is not installed (.ci/run installs it)"
    );
    if !found {
        eprintln!("chromium is not installed; skipping the browser part");
    }
    found
}

impl Browser {
    pub async fn start() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("chromium")
            .process_group(0)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().expect("stderr");
        let endpoint = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let found = lines.by_ref().map_while(Result::ok).find_map(|l| {
                l.split_once("DevTools listening on ")
                    .map(|(_, url)| url.trim().to_string())
            });
            // Keep draining so chromium never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            found
        });
        let endpoint = tokio::time::timeout(Duration::from_secs(30), endpoint)
            .await
            .expect("chromium prints its DevTools endpoint within 30 s")
            .expect("reader")
            .expect("a DevTools endpoint line");
        let (cdp, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .expect("connect to DevTools");
        Browser {
            child,
            cdp,
            next_id: 0,
            _profile: profile,
        }
    }

    /// Sends one DevTools command (to a page's `session`, or the browser) and returns its result.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.cdp
            .send(Message::text(msg.to_string()))
            .await
            .expect("send to DevTools");
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.cdp.next())
                .await
                .unwrap_or_else(|_| panic!("no DevTools answer to {method} within 30 s"))
                .expect("DevTools connection open")
                .expect("DevTools frame");
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Opens `url` in a new tab; returns the tab's session.
    pub async fn open(&mut self, url: &str) -> String {
        let target = self
            .call(None, "Target.createTarget", json!({"url": url}))
            .await;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string()
    }

    /// Evaluates `expr` in the tab (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, session: &str, expr: &str) -> Value {
        let r = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Types `text` into the focused element, as a keyboard would (`\r` presses Enter).
    pub async fn type_text(&mut self, session: &str, text: &str) {
        for (i, line) in text.split('\r').enumerate() {
            if i > 0 {
                for kind in ["keyDown", "keyUp"] {
                    let mut key = json!({"type": kind, "key": "Enter", "code": "Enter",
                                         "windowsVirtualKeyCode": 13});
                    if kind == "keyDown" {
                        key["text"] = json!("\r");
                    }
                    self.call(Some(session), "Input.dispatchKeyEvent", key)
                        .await;
                }
            }
            if !line.is_empty() {
                self.call(Some(session), "Input.insertText", json!({"text": line}))
                    .await;
            }
        }
    }

    /// Polls `expr` in the tab until it is a string satisfying `done` (bounded).
    pub async fn wait_for(
        &mut self,
        session: &str,
        expr: &str,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.eval(session, expr).await;
            let text = v.as_str().unwrap_or("").to_string();
            if done(&text) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{expr} never satisfied the test; last value {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    /// Ends the browser and every process it started (its own process group).
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}
