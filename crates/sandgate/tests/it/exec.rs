//! `POST /sandboxes/{id}/exec` on every backend: processes shared-host and isolated, and
//! Docker (each test runs on all three; the isolated one prints `SKIPPED` without the
//! privilege, the Docker one without an engine, except under `CI=true`): true exit codes and
//! signals, timeouts that kill the whole command (checked in `/proc`), output caps with head
//! and tail, binary output, stdin, start failures told apart from failed commands, the
//! sandbox's namespaces, a disconnect that kills, waking, the idle reaper, and who may run.

use std::time::{Duration, Instant};

use sandgate::config::Isolation;
use serde_json::{json, Value};

use crate::common::{auth_gateway, eventually, team_key, Client, Lane, TestGateway, ADMIN_KEY};
use crate::docker::{docker_gateway, engine_with_images, gateway_id_of, Leftovers};

/// Where a test's sandboxes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SharedHost,
    Isolated,
    Docker,
}

/// Instantiates each `async fn name(kind: Kind)` as `name::shared_host`, `name::isolated`
/// and `name::docker`.
macro_rules! every_backend {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::Kind;
                #[tokio::test(flavor = "multi_thread")]
                async fn shared_host() {
                    super::$name(Kind::SharedHost).await
                }
                #[tokio::test(flavor = "multi_thread")]
                async fn isolated() {
                    super::$name(Kind::Isolated).await
                }
                #[tokio::test(flavor = "multi_thread")]
                async fn docker() {
                    super::$name(Kind::Docker).await
                }
            }
        )*
    };
}

/// A gateway whose `shell` sandboxes run as `kind` says, and what removes its containers
/// if the test fails; `None` (after saying so) when this machine cannot run `kind`.
pub(crate) async fn gateway(kind: Kind) -> Option<(TestGateway, Leftovers)> {
    let builder = match kind {
        Kind::SharedHost => TestGateway::builder().isolation(Isolation::None),
        Kind::Isolated => {
            if !crate::common::jail_or_skip() {
                return None;
            }
            TestGateway::builder().isolation(Isolation::Sandbox)
        }
        Kind::Docker => {
            engine_with_images().await?;
            docker_gateway(Isolation::Auto)
        }
    };
    let gw = builder
        .config(|c| c.exec_kill_grace = Duration::from_millis(500))
        .start()
        .await;
    let left = Leftovers::default();
    if kind == Kind::Docker {
        left.gateway(&gateway_id_of(gw.data_dir()));
    }
    Some((gw, left))
}

/// A sandbox with no dev server: an environment for commands.
async fn shell(gw: &Client) -> String {
    let v = gw.create(&json!({"runtime": "shell"})).await;
    v["id"].as_str().expect("id").to_string()
}

/// Runs `body` in `id`, expecting 200.
async fn exec(gw: &Client, id: &str, body: Value) -> Value {
    let r = gw
        .post(&format!("/sandboxes/{id}/exec"))
        .json(&body)
        .send()
        .await;
    r.expect(200);
    r.json()
}

/// Processes whose environment holds `entry` (e.g. `SANDGATE_EXEC=ex-…`) as a whole entry.
pub(crate) fn processes_with(entry: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|b| *b == 0).any(|x| x == entry.as_bytes()) {
                found.push(pid);
            }
        }
    }
    found
}

fn exec_tag(v: &Value) -> String {
    format!("SANDGATE_EXEC={}", v["exec_id"].as_str().expect("exec_id"))
}

async fn exit_codes_signals_and_output(kind: Kind) {
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let id = shell(&gw).await;
    let v = exec(
        &gw,
        &id,
        json!({"command": "echo out; echo err >&2; exit 3"}),
    )
    .await;
    assert_eq!(v["status"], "exited", "{v}");
    assert_eq!(v["exit_code"], 3, "{v}");
    assert_eq!(v["signal"], Value::Null, "{v}");
    assert_eq!(v["timed_out"], false, "{v}");
    assert_eq!(v["stdout"], "out\n", "{v}");
    assert_eq!(v["stderr"], "err\n", "{v}");
    assert_eq!(v["encoding"], "utf-8", "{v}");
    assert_eq!(v["stdout_truncated"], false, "{v}");
    assert_eq!(v["sandbox_id"], id.as_str(), "{v}");
    assert!(v["exec_id"].as_str().unwrap().starts_with("ex-"), "{v}");
    assert!(v["duration_ms"].is_u64(), "{v}");
    // A signal death is not an exit code, except on Docker, whose engine reports it as
    // 128 + n (a signal the gateway sent itself is reported as one: see the timeout test).
    let v = exec(&gw, &id, json!({"command": "kill -9 $$"})).await;
    if kind == Kind::Docker {
        assert_eq!(v["status"], "exited", "{v}");
        assert_eq!(v["exit_code"], 137, "{v}");
    } else {
        assert_eq!(v["status"], "signaled", "{v}");
        assert_eq!(v["signal"], 9, "{v}");
        assert_eq!(v["exit_code"], Value::Null, "{v}");
    }
    // argv runs without a shell: `$HOME` stays literal.
    let v = exec(&gw, &id, json!({"argv": ["echo", "$HOME", "a b"]})).await;
    assert_eq!(v["stdout"], "$HOME a b\n", "{v}");
    // Environment, working directory (relative to the working tree), stdin.
    exec(&gw, &id, json!({"command": "mkdir -p sub/dir"})).await;
    let v = exec(
        &gw,
        &id,
        json!({"command": "pwd; echo $FOO; echo $SANDBOX_ID; cat", "cwd": "sub/dir",
               "env": {"FOO": "bar"}, "stdin": "from stdin"}),
    )
    .await;
    let out = v["stdout"].as_str().unwrap();
    let lines: Vec<_> = out.lines().collect();
    // Containers and jailed sandboxes see their tree at /sandbox; shared-host commands see
    // the host path.
    let tree = if kind == Kind::SharedHost {
        "/work/sub/dir"
    } else {
        "/sandbox/sub/dir"
    };
    assert!(lines[0].ends_with(tree), "{v}");
    assert_eq!(&lines[1..], ["bar", id.as_str(), "from stdin"], "{v}");
    let v = exec(
        &gw,
        &id,
        json!({"argv": ["cat"], "stdin_base64": "AAEC/w=="}),
    )
    .await;
    assert_eq!(v["encoding"], "base64", "{v}");
    assert_eq!(v["stdout"], "AAEC/w==", "{v}");
    // The gateway's own environment never reaches a command.
    let v = exec(&gw, &id, json!({"command": "env"})).await;
    let env = v["stdout"].as_str().unwrap();
    assert!(!env.contains("CARGO"), "{env}");
    gw.delete_sandbox(&id).await;
}

async fn start_failures_are_told_apart_from_failed_commands(kind: Kind) {
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let id = shell(&gw).await;
    let v = exec(&gw, &id, json!({"argv": ["sandgate-no-such-program"]})).await;
    assert_eq!(v["status"], "not_started", "{v}");
    assert_eq!(v["exit_code"], Value::Null, "{v}");
    assert_eq!(v["start_error"]["kind"], "not_found", "{v}");
    let v = exec(&gw, &id, json!({"argv": ["true"], "cwd": "missing"})).await;
    assert_eq!(v["status"], "not_started", "{v}");
    assert_eq!(v["start_error"]["kind"], "bad_cwd", "{v}");
    // Through the shell, a missing program is the shell's true exit status.
    let v = exec(&gw, &id, json!({"command": "sandgate-no-such-program"})).await;
    assert_eq!(v["status"], "exited", "{v}");
    assert_eq!(v["exit_code"], 127, "{v}");
    assert_eq!(v["start_error"], Value::Null, "{v}");
    // Bad requests are refused before anything runs.
    let path = format!("/sandboxes/{id}/exec");
    for (body, status, code) in [
        (json!({}), 422, "validation_failed"),
        (
            json!({"command": "true", "argv": ["true"]}),
            422,
            "validation_failed",
        ),
        (json!({"command": " "}), 422, "validation_failed"),
        (json!({"argv": []}), 422, "validation_failed"),
        (
            json!({"command": "true", "timeout_ms": 0}),
            422,
            "validation_failed",
        ),
        (
            json!({"command": "true", "timeout_ms": 3_600_001}),
            422,
            "validation_failed",
        ),
        (
            json!({"command": "true", "env": {"A=B": "x"}}),
            422,
            "validation_failed",
        ),
        (
            json!({"command": "true", "stdin_base64": "%%"}),
            422,
            "validation_failed",
        ),
        (
            json!({"command": "true", "shell": true}),
            400,
            "bad_request",
        ),
    ] {
        gw.post(&path)
            .json(&body)
            .send()
            .await
            .expect_error(status, code);
    }
    gw.delete_sandbox(&id).await;
    gw.post(&path)
        .json(&json!({"command": "true"}))
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
}

async fn timeouts_kill_the_whole_command(kind: Kind) {
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let id = shell(&gw).await;
    let started = Instant::now();
    // The shell ignores SIGTERM, and so do its children: only the SIGKILL after the grace
    // ends them. A child in a session of its own escapes the process group, not the tag.
    let v = exec(
        &gw,
        &id,
        json!({"command": "echo begun; trap '' TERM; setsid sleep 60 & sleep 60; echo never",
               "timeout_ms": 300}),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(v["status"], "timed_out", "{v}");
    assert_eq!(v["timed_out"], true, "{v}");
    assert_eq!(v["exit_code"], Value::Null, "{v}");
    assert_eq!(v["signal"], 9, "{v}");
    assert_eq!(v["stdout"], "begun\n", "{v}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let tag = exec_tag(&v);
    eventually(
        Duration::from_secs(5),
        "no process of the exec is left",
        || {
            let left = processes_with(&tag);
            async move { left.is_empty().then_some(()) }
        },
    )
    .await;
    gw.delete_sandbox(&id).await;
}

async fn big_and_binary_output(kind: Kind) {
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let id = shell(&gw).await;
    let ten_mib = 10 * 1024 * 1024;
    let cmd = format!("head -c {ten_mib} /dev/zero | tr '\\0' a; printf 'the end'");
    // Over the default 1 MiB cap: head, marker, tail.
    let v = exec(&gw, &id, json!({"command": cmd})).await;
    assert_eq!(v["stdout_truncated"], true);
    assert_eq!(v["stdout_bytes"], ten_mib + 7);
    let out = v["stdout"].as_str().unwrap();
    let marker = format!(
        "\n[sandgate: {} bytes omitted]\n",
        ten_mib + 7 - 1024 * 1024
    );
    assert_eq!(out.len(), 1024 * 1024 + marker.len());
    assert!(out.starts_with(&"a".repeat(512 * 1024)));
    assert!(out.contains(&marker));
    assert!(out.ends_with("aaaathe end"));
    // Under a 16 MiB cap: every byte.
    let v = exec(
        &gw,
        &id,
        json!({"command": cmd, "max_output_bytes": 16 * 1024 * 1024}),
    )
    .await;
    assert_eq!(v["stdout_truncated"], false);
    let out = v["stdout"].as_str().unwrap();
    assert_eq!(out.len(), ten_mib + 7);
    assert!(out.bytes().take(ten_mib).all(|b| b == b'a'));
    // Bytes that are not UTF-8 come back base64, on both streams.
    let v = exec(
        &gw,
        &id,
        json!({"command": "printf '\\377\\376'; echo text >&2"}),
    )
    .await;
    assert_eq!(v["encoding"], "base64", "{v}");
    assert_eq!(v["stdout"], "//4=", "{v}");
    assert_eq!(v["stderr"], "dGV4dAo=", "{v}");
    let v = exec(&gw, &id, json!({"command": "head -c 4096 /dev/urandom"})).await;
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["stdout"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw.len(), 4096, "{}", v["encoding"]);
    gw.delete_sandbox(&id).await;
}

/// Fetches the sandbox's own server on `$PORT` from inside it.
const FETCH: &str = "import os, urllib.request; \
    print(urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ['PORT']).read().decode())";

async fn commands_run_inside_the_sandbox(kind: Kind) {
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let sb = if kind == Kind::Docker {
        // The test image has no fixture on the host's path: busybox httpd is the server.
        let v = gw
            .create(&json!({"runtime": "shell", "dev_server": true,
                "command": "mkdir -p www && echo fixture ok > www/index.html && exec httpd -f -p $PORT -h www"}))
            .await;
        v["id"].as_str().unwrap().to_string()
    } else {
        gw.create_fixture().await.id
    };
    // The sandbox's own server, on the port it was given, is reachable from a command.
    let fetch = if kind == Kind::Docker {
        json!({"command": "for i in $(seq 1 100); do wget -qO- http://127.0.0.1:$PORT/ && exit; sleep 0.1; done; exit 1"})
    } else {
        json!({"argv": ["python3", "-c", FETCH]})
    };
    let v = exec(&gw, &sb, fetch).await;
    assert_eq!(v["stdout"], "fixture ok\n", "{v}");
    let v = exec(
        &gw,
        &sb,
        json!({"command": "readlink /proc/self/ns/net; readlink /proc/self/ns/pid; echo $$"}),
    )
    .await;
    let out = v["stdout"].as_str().unwrap().to_string();
    let lines: Vec<_> = out.lines().collect();
    let own = |ns: &str| {
        std::fs::read_link(format!("/proc/self/ns/{ns}"))
            .unwrap()
            .display()
            .to_string()
    };
    let pid: i32 = lines[2].parse().unwrap();
    if kind != Kind::SharedHost {
        assert_ne!(lines[0], own("net"), "{out}");
        assert_ne!(lines[1], own("pid"), "{out}");
        // A small pid: the sandbox's PID namespace, where its init is 1.
        assert!(pid < 100, "{out}");
    } else {
        assert_eq!(lines[0], own("net"), "{out}");
    }
    gw.delete_sandbox(&sb).await;
}

async fn a_client_that_goes_away_kills_its_command(kind: Kind) {
    use tokio::io::AsyncWriteExt;
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let id = shell(&gw).await;
    let mark = format!("SG_TEST_MARK=gone-{id}");
    let body =
        json!({"command": "sleep 30", "env": {"SG_TEST_MARK": mark.split('=').nth(1).unwrap()}})
            .to_string();
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /sandboxes/{id}/exec HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    eventually(Duration::from_secs(10), "the command runs", || {
        let n = processes_with(&mark).len();
        async move { (n > 0).then_some(()) }
    })
    .await;
    drop(conn);
    eventually(
        Duration::from_secs(5),
        "the command dies with its client",
        || {
            let n = processes_with(&mark).len();
            async move { (n == 0).then_some(()) }
        },
    )
    .await;
    gw.delete_sandbox(&id).await;
}

/// Reads events (NDJSON lines) from `body` until `until` returns true for one; each with the
/// time it arrived.
async fn read_events(
    body: &mut hyper::body::Incoming,
    buf: &mut Vec<u8>,
    mut until: impl FnMut(&Value) -> bool,
) -> Vec<(Value, Instant)> {
    use http_body_util::BodyExt;
    let mut events = Vec::new();
    loop {
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let v: Value = serde_json::from_slice(&line).expect("an NDJSON line");
            let done = until(&v);
            events.push((v, Instant::now()));
            if done {
                return events;
            }
        }
        let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .expect("an event within 20 s")
            .expect("the stream goes on")
            .expect("a body frame");
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
}

async fn output_streams_as_it_is_written(kind: Kind) {
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let id = shell(&gw).await;
    let path = format!("/sandboxes/{id}/exec");
    let resp = gw
        .post(&path)
        .header("accept", "application/x-ndjson")
        .json(&json!({"command": "echo first; sleep 1.5; printf 'second\\377' >&2; exit 4"}))
        .send_streaming()
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let events = read_events(&mut body, &mut buf, |v| v["type"] == "exit").await;
    let kinds: Vec<_> = events
        .iter()
        .map(|(v, _)| v["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["start", "stdout", "stderr", "exit"], "{events:?}");
    let (start, first, second, exit) = (&events[0], &events[1], &events[2], &events[3]);
    assert!(start.0["exec_id"].as_str().unwrap().starts_with("ex-"));
    assert_eq!(first.0["data"], "first\n");
    assert_eq!(first.0["encoding"], "utf-8");
    assert_eq!(first.0["offset"], 0);
    // The first line arrived as it was written, not with the rest at the end.
    assert!(
        second.1.duration_since(first.1) > Duration::from_secs(1),
        "{events:?}"
    );
    assert_eq!(second.0["encoding"], "base64", "{events:?}");
    assert_eq!(exit.0["status"], "exited");
    assert_eq!(exit.0["exit_code"], 4);
    assert_eq!(exit.0["stdout_bytes"], 6);
    assert_eq!(exit.0["stderr_bytes"], 7);
    assert!(exit.0.get("stdout").is_none(), "{}", exit.0);
    // Server-sent events carry the same objects, framed.
    let r = gw
        .post(&path)
        .header("accept", "text/event-stream")
        .json(&json!({"command": "echo hi"}))
        .send()
        .await;
    r.expect(200);
    assert_eq!(r.header("content-type"), "text/event-stream");
    let text = r.text();
    assert!(text.starts_with("id: 1\nevent: start\ndata: {"), "{text}");
    assert!(
        text.contains("event: stdout\ndata: {\"type\":\"stdout\",\"data\":\"hi\\n\""),
        "{text}"
    );
    assert!(text.contains("event: exit\n"), "{text}");
    // A client that leaves a stream kills its command.
    let mark = format!("SG_TEST_MARK=stream-{id}");
    let resp = gw
        .post(&path)
        .header("accept", "application/x-ndjson")
        .json(&json!({"command": "echo up; sleep 30",
                      "env": {"SG_TEST_MARK": mark.split('=').nth(1).unwrap()}}))
        .send_streaming()
        .await;
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    read_events(&mut body, &mut buf, |v| v["type"] == "stdout").await;
    // Polled: the shell is exec'ing `sleep` at about this moment, and a process's environment
    // cannot be read while it changes image.
    eventually(Duration::from_secs(5), "the streamed command runs", || {
        let n = processes_with(&mark).len();
        async move { (n > 0).then_some(()) }
    })
    .await;
    drop(body);
    eventually(
        Duration::from_secs(5),
        "the streamed command dies with its client",
        || {
            let n = processes_with(&mark).len();
            async move { (n == 0).then_some(()) }
        },
    )
    .await;
    gw.delete_sandbox(&id).await;
}

async fn background_commands(kind: Kind) {
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let id = shell(&gw).await;
    let base = format!("/sandboxes/{id}/exec");
    // A command fed through its open stdin, followed live.
    let r = gw
        .post(&base)
        .json(&json!({"command": "echo begin; cat; echo end", "background": true, "stdin_open": true}))
        .send()
        .await;
    r.expect(202);
    let v = r.json();
    let exec_id = v["exec_id"].as_str().unwrap().to_string();
    assert_eq!(v["status"], "running", "{v}");
    let at = format!("{base}/{exec_id}");
    assert_eq!(r.header("location"), at);
    let resp = gw
        .get(&format!("{at}/logs?follow=true"))
        .send_streaming()
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let first = read_events(&mut body, &mut buf, |v| v["type"] == "stdout").await;
    assert_eq!(first[0].0["data"], "begin\n", "{first:?}");
    gw.post(&format!("{at}/stdin"))
        .header("content-type", "application/octet-stream")
        .body("hello\n")
        .send()
        .await
        .expect(204);
    gw.post(&format!("{at}/stdin?eof=true"))
        .header("content-type", "application/octet-stream")
        .send()
        .await
        .expect(204);
    let rest = read_events(&mut body, &mut buf, |v| v["type"] == "exit").await;
    let out: String = rest
        .iter()
        .filter(|(v, _)| v["type"] == "stdout")
        .map(|(v, _)| v["data"].as_str().unwrap())
        .collect();
    assert_eq!(out, "hello\nend\n", "{rest:?}");
    let exit = &rest.last().unwrap().0;
    assert_eq!(
        (exit["status"].clone(), exit["exit_code"].clone()),
        (json!("exited"), json!(0)),
        "{exit}"
    );
    let v = gw.get(&at).send().await.expect(200).json();
    assert_eq!(v["stdout"], "begin\nhello\nend\n", "{v}");
    assert_eq!(v["status"], "exited", "{v}");
    // A replay from an offset, without following.
    let r = gw.get(&format!("{at}/logs?stdout_offset=6")).send().await;
    let lines: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["data"], "hello\nend\n", "{lines:?}");
    assert_eq!(lines[0]["offset"], 6, "{lines:?}");
    assert_eq!(lines.last().unwrap()["type"], "exit", "{lines:?}");
    let list = gw.get(&base).send().await.expect(200).json();
    assert_eq!(list["count"], 1, "{list}");
    assert!(list["execs"][0].get("stdout").is_none(), "{list}");
    // Writing to a command without an open stdin is a conflict.
    let v = gw
        .post(&base)
        .json(&json!({"command": "sleep 0.2", "background": true}))
        .send()
        .await
        .json();
    let short = format!("{base}/{}", v["exec_id"].as_str().unwrap());
    gw.post(&format!("{short}/stdin"))
        .header("content-type", "application/octet-stream")
        .body("x")
        .send()
        .await
        .expect_error(409, "conflict");
    // What the cap dropped is reported to a follower, never skipped silently.
    let v = gw
        .post(&base)
        .json(&json!({"command": "printf 0123456789abcdefghij", "background": true, "max_output_bytes": 10}))
        .send()
        .await
        .json();
    let capped = format!("{base}/{}", v["exec_id"].as_str().unwrap());
    let r = gw.get(&format!("{capped}/logs?follow=true")).send().await;
    let lines: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<_> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["stdout", "truncated", "stdout", "exit"],
        "{lines:?}"
    );
    assert_eq!(lines[0]["data"], "01234");
    assert_eq!(lines[1]["omitted_bytes"], 10);
    assert_eq!(
        (lines[2]["data"].clone(), lines[2]["offset"].clone()),
        (json!("fghij"), json!(15))
    );
    // A signal goes to the command; DELETE kills one that ignores SIGTERM.
    let v = gw
        .post(&base)
        .json(&json!({"command": "trap 'echo got INT; exit 7' INT; echo ready; while true; do sleep 0.1; done", "background": true}))
        .send()
        .await
        .json();
    let trapped = format!("{base}/{}", v["exec_id"].as_str().unwrap());
    eventually(Duration::from_secs(10), "the trap is set", || async {
        let v = gw.get(&trapped).send().await.json();
        (v["stdout"] == "ready\n").then_some(())
    })
    .await;
    gw.post(&format!("{trapped}/signal"))
        .json(&json!({"signal": "SIGINT"}))
        .send()
        .await
        .expect(200);
    let v = eventually(
        Duration::from_secs(10),
        "the trapped command exits",
        || async {
            let v = gw.get(&trapped).send().await.json();
            (v["status"] != "running").then_some(v)
        },
    )
    .await;
    assert_eq!(
        (v["exit_code"].clone(), v["stdout"].clone()),
        (json!(7), json!("ready\ngot INT\n")),
        "{v}"
    );
    let v = gw
        .post(&base)
        .json(&json!({"command": "trap '' TERM; sleep 60", "background": true}))
        .send()
        .await
        .json();
    let stubborn = format!("{base}/{}", v["exec_id"].as_str().unwrap());
    let tag = exec_tag(&v);
    let v = gw.delete(&stubborn).send().await.expect(200).json();
    assert_eq!(v["status"], "killed", "{v}");
    assert!(processes_with(&tag).is_empty());
    // A finished one is forgotten by DELETE; another sandbox's exec id is not found.
    gw.delete(&stubborn).send().await.expect(204);
    gw.get(&stubborn)
        .send()
        .await
        .expect_error(404, "exec_not_found");
    let other = shell(&gw).await;
    gw.get(&format!("/sandboxes/{other}/exec/{exec_id}"))
        .send()
        .await
        .expect_error(404, "exec_not_found");
    gw.delete_sandbox(&id).await;
    gw.delete_sandbox(&other).await;
}

async fn stopping_a_sandbox_ends_its_commands(kind: Kind) {
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let v = gw
        .create(&json!({"runtime": "shell", "mode": "persistent"}))
        .await;
    let id = v["id"].as_str().unwrap().to_string();
    let v = gw
        .post(&format!("/sandboxes/{id}/exec"))
        .json(&json!({"command": "setsid sleep 60 & sleep 60", "background": true}))
        .send()
        .await
        .json();
    let tag = exec_tag(&v);
    eventually(Duration::from_secs(10), "both sleeps run", || {
        let n = processes_with(&tag).len();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    gw.post(&format!("/sandboxes/{id}/stop"))
        .send()
        .await
        .expect(200);
    eventually(
        Duration::from_secs(10),
        "the commands end with the sandbox",
        || {
            let n = processes_with(&tag).len();
            async move { (n == 0).then_some(()) }
        },
    )
    .await;
    gw.delete_sandbox(&id).await;
}

async fn orphans_leave_no_zombie(kind: Kind) {
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let id = shell(&gw).await;
    let mark = format!("SG_TEST_MARK=zombie-{id}");
    let v = exec(
        &gw,
        &id,
        json!({"command": "(SG_TEST_MARK=$M sleep 0.3 &); (true &); exit 0",
               "env": {"M": mark.split('=').nth(1).unwrap()}}),
    )
    .await;
    assert_eq!(v["exit_code"], 0, "{v}");
    eventually(Duration::from_secs(10), "the orphan has ended", || {
        let n = processes_with(&mark).len();
        async move { (n == 0).then_some(()) }
    })
    .await;
    // Whoever adopted the orphans inside the sandbox (its PID 1, the container's init) reaped
    // them.
    eventually(Duration::from_secs(5), "no zombie in the sandbox", || {
        let sandbox = crate::common::sandbox_processes(&id);
        let zombies: Vec<i32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&p| {
                matches!(state_and_parent(p), Some(('Z', parent)) if sandbox.contains(&parent))
            })
            .collect();
        async move { zombies.is_empty().then_some(()) }
    })
    .await;
    gw.delete_sandbox(&id).await;
}

every_backend!(
    orphans_leave_no_zombie,
    stopping_a_sandbox_ends_its_commands,
    background_commands,
    output_streams_as_it_is_written,
    exit_codes_signals_and_output,
    start_failures_are_told_apart_from_failed_commands,
    timeouts_kill_the_whole_command,
    big_and_binary_output,
    commands_run_inside_the_sandbox,
    a_client_that_goes_away_kills_its_command,
);

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_persistent_sandbox_is_woken_and_a_running_exec_keeps_it_awake() {
    let gw = TestGateway::builder()
        .config(|c| c.idle_timeout = Some(Duration::from_secs(1)))
        .start()
        .await;
    let v = gw
        .create(&json!({"runtime": "shell", "mode": "persistent"}))
        .await;
    let id = v["id"].as_str().unwrap().to_string();
    gw.post(&format!("/sandboxes/{id}/stop"))
        .send()
        .await
        .expect(200);
    assert_eq!(gw.sandbox(&id).await["status"], "stopped");
    // A command wakes it, and keeps it from being reaped while it runs (3 s > idle 1 s).
    let v = exec(&gw, &id, json!({"command": "sleep 3; echo done"})).await;
    assert_eq!(v["stdout"], "done\n", "{v}");
    assert_eq!(gw.sandbox(&id).await["status"], "running");
    // Then, idle, it is stopped (the list does not count as use; inspecting would).
    eventually(
        Duration::from_secs(30),
        "the idle sandbox is stopped",
        || async {
            let list = gw.list().await;
            let sb = list.iter().find(|s| s["id"] == id.as_str()).unwrap();
            (sb["status"] == "stopped").then_some(())
        },
    )
    .await;
    // An ephemeral sandbox that is not running is a conflict, not a wake.
    let v = gw.create(&json!({"runtime": "shell"})).await;
    let eph = v["id"].as_str().unwrap().to_string();
    gw.post(&format!("/sandboxes/{eph}/stop"))
        .send()
        .await
        .expect(200);
    gw.post(&format!("/sandboxes/{eph}/exec"))
        .json(&json!({"command": "true"}))
        .send()
        .await
        .expect_error(409, "sandbox_not_running");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_members_of_the_team_may_run_commands() {
    let gw = auth_gateway(Lane::Hyper, |_| {}).await;
    let (member, _) = team_key(&gw, "exec-a", "member").await;
    let (viewer, _) = team_key(&gw, "exec-a", "viewer").await;
    let (other, _) = team_key(&gw, "exec-b", "member").await;
    let id = shell(&gw.with_key(&member)).await;
    let path = format!("/sandboxes/{id}/exec");
    let body = json!({"command": "echo hi"});
    let v = exec(&gw.with_key(&member), &id, body.clone()).await;
    assert_eq!(v["stdout"], "hi\n");
    // The owner sees every team.
    exec(&gw.with_key(ADMIN_KEY), &id, body.clone()).await;
    gw.with_key(&viewer)
        .post(&path)
        .json(&body)
        .send()
        .await
        .expect_error(403, "AUTH_003");
    gw.with_key(&other)
        .post(&path)
        .json(&body)
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    gw.post(&path)
        .json(&body)
        .send()
        .await
        .expect_error(401, "AUTH_002");
    // The run is in the audit log, with its command.
    let log = gw
        .with_key(ADMIN_KEY)
        .get("/audit?action=sandbox.exec")
        .send()
        .await
        .expect(200)
        .json();
    let text = log.to_string();
    assert!(text.contains("command=echo hi"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_002_run_code_passes_the_code_on_stdin() {
    let gw = TestGateway::start().await;
    let id = shell(&gw).await;
    let run = |language: &str, code: &str| {
        let body = json!({"sandbox_id": id, "operation": "run_code",
                          "payload": {"code": code, "language": language}});
        gw.post("/api/v1/sandbox/execute").json(&body).send()
    };
    // The program reads its code from stdin: argv holds only the interpreter's `-`.
    let r = run("python", "import sys\nprint('hello', sys.argv)").await;
    r.expect(200);
    let v = r.json();
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["stdout"], "hello ['-']\n", "{v}");
    for key in [
        "sandbox_id",
        "operation",
        "language",
        "stdout",
        "stderr",
        "exit_code",
        "timed_out",
        "duration_ms",
    ] {
        assert!(v.get(key).is_some(), "{key} missing from {v}");
    }
    assert_eq!(v["sandbox_id"], id.as_str());
    assert_eq!(v["operation"], "run_code");
    assert_eq!(v["language"], "python");
    let v = run("javascript", "console.log(6 * 7)").await.json();
    assert_eq!(v["stdout"], "42\n", "{v}");
    let v = run("node", "process.exit(5)").await.json();
    assert_eq!(
        (v["success"].clone(), v["exit_code"].clone()),
        (json!(false), json!(5))
    );
    let v = run("bash", "echo $((6 * 7)) >&2; exit 3").await.json();
    assert_eq!(v["stderr"], "42\n", "{v}");
    assert_eq!(v["exit_code"], 3, "{v}");
    assert_eq!(v["success"], false, "{v}");
    // What is not supported says what is.
    let message = run("cobol", "DISPLAY 'HI'")
        .await
        .expect_error(400, "unsupported_language");
    assert!(
        message.contains("python") && message.contains("node"),
        "{message}"
    );
    let r = gw
        .post("/api/v1/sandbox/execute")
        .json(&json!({"sandbox_id": id, "operation": "read_file", "payload": {}}))
        .send()
        .await;
    let message = r.expect_error(400, "unsupported_operation");
    assert!(message.contains("run_code"), "{message}");
    gw.post("/api/v1/sandbox/execute")
        .json(&json!({"operation": "run_code", "payload": {"code": "", "language": "bash"}}))
        .send()
        .await
        .expect_error(422, "validation_failed");
    gw.post("/api/v1/sandbox/execute")
        .json(&json!({"sandbox_id": id, "operation": "run_code", "payload": {"code": 1}}))
        .send()
        .await
        .expect_error(400, "bad_request");
    gw.delete_sandbox(&id).await;
}

/// Seed 003's `POST /{owner}/{name}/execute`: answered by the gateway for a sandbox without a
/// dev server, proxied to one that has its own.
async fn seed_003_execute(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let v = gw
        .create(&json!({"runtime": "shell", "owner": "alice", "name": "box"}))
        .await;
    let id = v["id"].as_str().unwrap().to_string();
    let r = gw
        .post("/alice/box/execute")
        .json(&json!({"command": "echo hi; echo err >&2; exit 2"}))
        .send()
        .await;
    r.expect(200);
    assert_eq!(
        r.json(),
        json!({"stdout": "hi\n", "stderr": "err\n", "exit_code": 2})
    );
    let v = gw
        .post("/alice/box/execute")
        .json(&json!({"command": "sleep 5", "timeout_ms": 100}))
        .send()
        .await
        .json();
    assert_eq!(v["exit_code"], Value::Null, "{v}");
    assert!(v["stderr"].as_str().unwrap().contains("time limit"), "{v}");
    // Only that path and method: the rest still has no server to go to.
    gw.get("/alice/box/execute")
        .send()
        .await
        .expect_error(400, "port_not_exposed");
    gw.post("/alice/nobox/execute")
        .json(&json!({"command": "true"}))
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    // A sandbox with its own server answers `/execute` itself (the fixture: 404, its own).
    let web = gw
        .create_fixture_with("", json!({"owner": "alice", "name": "web"}))
        .await;
    let r = gw
        .post("/alice/web/execute")
        .json(&json!({"command": "true"}))
        .send()
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.headers.get("x-sandgate-error").is_none(), "{}", r.text());
    gw.delete_sandbox(&id).await;
    gw.delete_sandbox(&web.id).await;
}

both_lanes!(seed_003_execute);

/// Seed 004's client, in Python with the `websockets` library (Debian's `python3-websockets`
/// for `/usr/bin/python3`): exact keys, `fromisoformat` timestamps, generated ids,
/// concurrent commands answered in completion order, error frames on a socket that stays
/// open. Exits non-zero with the reason on any mismatch.
const SEED_004_CLIENT: &str = r#"
import asyncio, datetime, json, sys
import websockets

KEYS = {"request_id", "command", "success", "output", "error", "returncode", "timestamp"}

async def ask(ws, message):
    await ws.send(message if isinstance(message, str) else json.dumps(message))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 20))
    assert set(reply) == KEYS, reply
    datetime.datetime.fromisoformat(reply["timestamp"])
    return reply

async def main(url):
    async with websockets.connect(url) as ws:
        r = await ask(ws, {"command": "echo hi; echo err >&2", "request_id": "a"})
        assert (r["request_id"], r["command"], r["output"], r["error"]) == ("a", "echo hi; echo err >&2", "hi\n", "err\n"), r
        assert r["success"] is True and r["returncode"] == 0, r
        r = await ask(ws, {"command": "exit 3"})
        assert r["request_id"] and r["returncode"] == 3 and r["success"] is False, r
        r = await ask(ws, {"command": "kill -9 $$"})
        assert r["returncode"] == -9 and r["success"] is False, r
        # Bad messages: an error frame each, and the socket stays open.
        r = await ask(ws, "not json")
        assert r["success"] is False and r["returncode"] is None and "invalid message" in r["error"], r
        r = await ask(ws, {"request_id": "m"})
        assert r["request_id"] == "m" and r["returncode"] is None and "command" in r["error"], r
        # Five at once, answered as they finish.
        for i, delay in enumerate(["0.8", "0.6", "0.4", "0.2", "0"]):
            await ws.send(json.dumps({"command": f"sleep {delay}; echo {i}", "request_id": f"s{i}"}))
        order = []
        for _ in range(5):
            r = json.loads(await asyncio.wait_for(ws.recv(), 20))
            assert r["output"] == r["request_id"][1:] + "\n", r
            order.append(r["request_id"])
        assert order == ["s4", "s3", "s2", "s1", "s0"], order
        r = await ask(ws, {"command": "echo still open"})
        assert r["output"] == "still open\n", r
    print("seed 004 client: ok")

asyncio.run(main(sys.argv[1]))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn seed_004_command_socket() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let gw = TestGateway::start().await;
    let id = shell(&gw).await;
    let url = format!("ws://{}/ws/{id}", gw.addr);
    let out = tokio::process::Command::new("/usr/bin/python3")
        .args(["-c", SEED_004_CLIENT, &url])
        .output()
        .await
        .expect("/usr/bin/python3 runs (CI installs python3-websockets)");
    assert!(
        out.status.success(),
        "the Python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // While a socket is open the sandbox says so; closing it kills its running command and
    // leaves the sandbox running.
    let mut ws = gw.websocket(&format!("/ws/{id}"), None).await;
    let mark = format!("SG_TEST_MARK=ws-{id}");
    ws.send(Message::text(
        json!({"command": format!("{mark} sleep 30"), "request_id": "long"}).to_string(),
    ))
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "the command runs", || {
        let n = processes_with(&mark).len();
        async move { (n > 0).then_some(()) }
    })
    .await;
    let v = gw.sandbox(&id).await;
    assert_eq!(
        v["connections"],
        json!({"exec": 1, "ws": 1, "pty": 0}),
        "{v}"
    );
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    eventually(
        Duration::from_secs(5),
        "the socket's command dies with it",
        || {
            let n = processes_with(&mark).len();
            async move { (n == 0).then_some(()) }
        },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "the socket is no longer counted",
        || async {
            let v = gw.sandbox(&id).await;
            (v["connections"] == json!({"exec": 0, "ws": 0, "pty": 0})).then_some(())
        },
    )
    .await;
    assert_eq!(gw.sandbox(&id).await["status"], "running");
    // Not a WebSocket handshake: a clear error. A page of another site may not open one.
    gw.get(&format!("/ws/{id}"))
        .send()
        .await
        .expect_error(400, "bad_request");
    gw.get(&format!("/ws/{id}"))
        .websocket_handshake()
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect_error(403, "forbidden_origin");
    gw.delete_sandbox(&id).await;
}

/// The state letter and parent of `pid` (`/proc/<pid>/stat` fields 3 and 4).
fn state_and_parent(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// `sandgate serve` (the binary) is its commands' subreaper: an orphan of a shared-host
/// command is handed to the gateway, which reaps it when it ends (no zombie), while the exit
/// codes of its own children, many at once, stay true.
#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_reaps_orphans_and_never_steals_an_exit_code() {
    use crate::common::SpawnedGateway;
    let gw = SpawnedGateway::start(2, &[]).await;
    let id = shell(&gw).await;
    let mark = format!("SG_TEST_MARK=orphan-{id}");
    let v = exec(
        &gw,
        &id,
        json!({"command": "(SG_TEST_MARK=$M sleep 1 &); exit 0",
               "env": {"M": mark.split('=').nth(1).unwrap()}}),
    )
    .await;
    assert_eq!(v["exit_code"], 0, "{v}");
    let orphan = eventually(Duration::from_secs(5), "the orphan is found", || {
        let found = processes_with(&mark).first().copied();
        async move { found }
    })
    .await;
    let (_, parent) = state_and_parent(orphan).expect("the orphan runs");
    assert_eq!(parent, gw.pid(), "the orphan was handed to the gateway");
    let gateway = gw.pid();
    eventually(
        Duration::from_secs(10),
        "the orphan ends and is reaped",
        || {
            let running = !processes_with(&mark).is_empty();
            let zombie = matches!(state_and_parent(orphan), Some(('Z', p)) if p == gateway);
            async move { (!running && !zombie).then_some(()) }
        },
    )
    .await;
    // Many commands at once, each orphaning a process, each with its own exit code.
    let runs = (0..12).map(|i| {
        let gw = gw.client.clone();
        let id = id.clone();
        async move {
            let v = exec(
                &gw,
                &id,
                json!({"command": format!("(sleep 0.05 &); (true &); exit {}", 10 + i)}),
            )
            .await;
            (i, v)
        }
    });
    for (i, v) in futures_util::future::join_all(runs).await {
        assert_eq!(v["exit_code"], 10 + i, "{v}");
    }
    gw.delete_sandbox(&id).await;
}

/// Containers outlive a gateway that shuts down cleanly (the next one re-adopts them); the
/// commands it was running in them do not.
#[tokio::test(flavor = "multi_thread")]
async fn a_clean_shutdown_ends_background_commands_in_surviving_containers() {
    let Some((gw, _left)) = gateway(Kind::Docker).await else {
        return;
    };
    let id = shell(&gw).await;
    let v = gw
        .post(&format!("/sandboxes/{id}/exec"))
        .json(&json!({"command": "sleep 60", "background": true}))
        .send()
        .await
        .json();
    let tag = exec_tag(&v);
    eventually(Duration::from_secs(10), "the command runs", || {
        let n = processes_with(&tag).len();
        async move { (n > 0).then_some(()) }
    })
    .await;
    gw.shutdown().await;
    assert!(
        processes_with(&tag).is_empty(),
        "the command outlived the gateway"
    );
}

/// What the gateway gives a sandbox is the gateway's: a create may not set it (422, naming
/// the variable), and every path it hands over is absolute, even for a relative data
/// directory.
#[tokio::test(flavor = "multi_thread")]
async fn the_gateways_variables_are_refused_and_its_paths_absolute() {
    let gw = TestGateway::start().await;
    for key in ["PORT", "HOME", "SANDBOX_ID", "HOST", "SANDGATE_EXEC"] {
        let msg = gw
            .post("/sandboxes")
            .json(&json!({"runtime": "shell", "env": {key: "x"}}))
            .send()
            .await
            .expect_error(422, "validation_failed");
        assert!(msg.contains(key), "{msg}");
    }
    let id = shell(&gw).await;
    gw.post(&format!("/sandboxes/{id}/exec"))
        .json(&json!({"command": "true", "env": {"SANDGATE_EXEC": "x"}}))
        .send()
        .await
        .expect_error(422, "validation_failed");
    let v = exec(&gw, &id, json!({"command": "echo $HOME; pwd"})).await;
    for line in v["stdout"].as_str().unwrap().lines() {
        assert!(line.starts_with('/'), "{v}");
    }
    let config = sandgate::config::Config::for_data_dir("relative-dir");
    assert!(config.data_dir.is_absolute(), "{:?}", config.data_dir);
}
