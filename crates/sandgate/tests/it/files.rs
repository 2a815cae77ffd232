//! `GET`/`PUT`/`DELETE /sandboxes/{id}/files` on every backend (shared-host and isolated
//! processes, Docker): uploads and downloads shared with the sandbox's own commands, listings,
//! directories, deletes, and hostile paths and planted symlinks that never reach outside the
//! working tree (a canary outside it is checked after each); a 1 GiB upload and download in
//! flat memory.

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};

use crate::common::{send_request, Client, RepeatBody, SpawnedGateway, TestGateway};
use crate::exec::{gateway, Kind};
use crate::streaming::{assert_bounded_memory, GIB};

async fn run(gw: &Client, id: &str, command: &str) -> Value {
    let r = gw
        .post(&format!("/sandboxes/{id}/exec"))
        .json(&json!({"command": command}))
        .send()
        .await;
    r.expect(200);
    let v = r.json();
    assert_eq!(v["exit_code"], 0, "{command}: {v}");
    v
}

fn put(gw: &Client, id: &str, query: &str, body: &'static str) -> crate::common::Req {
    gw.req(Method::PUT, &format!("/sandboxes/{id}/files?{query}"))
        .header("content-type", "application/octet-stream")
        .body(body)
}

async fn files_in_the_working_tree(kind: Kind) {
    let Some((gw, _left)) = gateway(kind).await else {
        return;
    };
    let v = gw.create(&json!({"runtime": "shell"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let files = format!("/sandboxes/{id}/files");
    // Up, and read back by a command and by a download.
    let r = put(&gw, &id, "path=index.html", "<h1>hi</h1>").send().await;
    r.expect(201);
    assert_eq!(
        r.json(),
        json!({"path": "index.html", "size": 11, "mode": "0644"})
    );
    assert_eq!(
        run(&gw, &id, "cat index.html").await["stdout"],
        "<h1>hi</h1>"
    );
    let r = gw.get(&format!("{files}?path=index.html")).send().await;
    r.expect(200);
    assert_eq!(r.text(), "<h1>hi</h1>");
    assert_eq!(r.header("content-type"), "application/octet-stream");
    assert_eq!(
        r.header("content-disposition"),
        "attachment; filename=\"index.html\""
    );
    assert_eq!(r.header("x-content-type-options"), "nosniff");
    // Replaced (200), or refused when it must be new.
    put(&gw, &id, "path=index.html", "v2")
        .send()
        .await
        .expect(200);
    put(&gw, &id, "path=index.html&overwrite=false", "v3")
        .send()
        .await
        .expect_error(412, "already_exists");
    // Parents are created; a directory lists with sizes and modes.
    put(&gw, &id, "path=a/b/c.sh&mode=755", "echo made")
        .send()
        .await
        .expect(201);
    assert_eq!(run(&gw, &id, "./a/b/c.sh").await["stdout"], "made\n");
    put(&gw, &id, "path=a/empty&dir=true", "")
        .send()
        .await
        .expect(201);
    let v = gw
        .get(&format!("{files}?path=a"))
        .send()
        .await
        .expect(200)
        .json();
    assert_eq!(v["path"], "a");
    let names: Vec<_> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b", "empty"], "{v}");
    assert_eq!(v["entries"][0]["type"], "dir");
    let v = gw.get(&format!("{files}?path=a/b")).send().await.json();
    assert_eq!(
        (
            v["entries"][0]["name"].clone(),
            v["entries"][0]["size"].clone(),
            v["entries"][0]["mode"].clone()
        ),
        (json!("c.sh"), json!(9), json!("0755")),
        "{v}"
    );
    let root = gw.get(&files).send().await.expect(200).json();
    assert_eq!(root["entries"].as_array().unwrap().len(), 2, "{root}");
    // Hostile paths are refused before anything is touched.
    for bad in [
        "../x",
        "/etc/passwd",
        "a/../../x",
        "%2e%2e/x",
        "a%00b",
        "a//b",
    ] {
        gw.get(&format!("{files}?path={bad}"))
            .send()
            .await
            .expect_error(400, "invalid_path");
        gw.req(Method::PUT, &format!("{files}?path={bad}"))
            .header("content-type", "application/octet-stream")
            .body("x")
            .send()
            .await
            .expect_error(400, "invalid_path");
    }
    // Planted links lead nowhere outside; a write at a link replaces the link.
    // The canary sits just outside the working tree (its parent), linked by absolute path; a
    // jailed sandbox cannot write its root, so there it sits in its /tmp.
    let canary = if kind == Kind::Isolated {
        "/tmp/sg-canary"
    } else {
        "../sg-canary"
    };
    run(
        &gw,
        &id,
        &format!(
            "c=$(cd $(dirname {canary}) && pwd)/sg-canary && echo canary > $c && ln -s / escape \
             && ln -s escape chain && ln -s $c pw && ln -s a/b inside"
        ),
    )
    .await;
    for outside in ["escape/etc/passwd", "chain/etc", "pw", "escape"] {
        gw.get(&format!("{files}?path={outside}"))
            .send()
            .await
            .expect_error(403, "path_outside_sandbox");
    }
    let r = gw.get(&format!("{files}?path=inside/c.sh")).send().await;
    assert_eq!(r.text(), "echo made");
    put(&gw, &id, "path=pw", "evil").send().await.expect(200);
    assert_eq!(
        run(&gw, &id, &format!("cat {canary}")).await["stdout"],
        "canary\n"
    );
    assert_eq!(run(&gw, &id, "cat pw").await["stdout"], "evil");
    // Deletes: a link itself, a file, a directory only when asked to take its contents.
    gw.delete(&format!("{files}?path=escape"))
        .send()
        .await
        .expect(200);
    run(&gw, &id, "test -d /etc").await;
    gw.delete(&format!("{files}?path=a"))
        .send()
        .await
        .expect_error(409, "conflict");
    gw.delete(&format!("{files}?path=a&recursive=true"))
        .send()
        .await
        .expect(200);
    gw.get(&format!("{files}?path=a/b/c.sh"))
        .send()
        .await
        .expect_error(404, "file_not_found");
    gw.delete(&format!("{files}?path="))
        .send()
        .await
        .expect_error(400, "invalid_path");
    run(&gw, &id, &format!("rm -f {canary}")).await;
    gw.delete_sandbox(&id).await;
}

every_backend!(files_in_the_working_tree);

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_over_the_limit_is_refused_and_leaves_nothing() {
    let gw = TestGateway::builder()
        .config(|c| c.files_max_upload_bytes = 1000)
        .start()
        .await;
    let v = gw.create(&json!({"runtime": "shell"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    gw.req(Method::PUT, &format!("/sandboxes/{id}/files?path=big"))
        .header("content-type", "application/octet-stream")
        .body(vec![b'x'; 5000])
        .send()
        .await
        .expect_error(413, "payload_too_large");
    let v = gw
        .get(&format!("/sandboxes/{id}/files"))
        .send()
        .await
        .expect(200)
        .json();
    assert_eq!(v["entries"], json!([]), "{v}");
    // JSON is not how files are sent, nor is a missing media type.
    gw.req(Method::PUT, &format!("/sandboxes/{id}/files?path=x"))
        .body("x")
        .send()
        .await
        .expect_error(415, "unsupported_media_type");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gib_goes_up_and_down_in_flat_memory() {
    let gw = SpawnedGateway::start(2, &[]).await;
    let v = gw.create(&json!({"runtime": "shell"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let path = format!("/sandboxes/{id}/files?path=big.bin");
    // Warm up before the baseline.
    gw.req(Method::PUT, &path)
        .header("content-type", "application/octet-stream")
        .body(vec![b'w'; 1 << 20])
        .send()
        .await
        .expect(201);
    let addr = gw.addr;
    let up = path.clone();
    assert_bounded_memory(&gw, "1 GiB file upload", async move {
        let req = Request::builder()
            .method(Method::PUT)
            .uri(up.as_str())
            .header("host", addr.to_string())
            .header("content-type", "application/octet-stream")
            .body(RepeatBody::new(GIB))
            .unwrap();
        let resp = send_request(addr, None, req).await.expect("upload");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["size"], GIB, "{v}");
    })
    .await;
    assert_bounded_memory(&gw, "1 GiB file download", async {
        let resp = gw.get(&path).send_streaming().await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-length"], GIB.to_string().as_str());
        let mut body = resp.into_body();
        let mut received = 0u64;
        while let Some(frame) = tokio::time::timeout(Duration::from_secs(60), body.frame())
            .await
            .expect("a frame within 60 s")
        {
            if let Some(data) = frame.expect("frame").data_ref() {
                received += data.len() as u64;
            }
        }
        assert_eq!(received, GIB);
    })
    .await;
    gw.delete_sandbox(&id).await;
}
