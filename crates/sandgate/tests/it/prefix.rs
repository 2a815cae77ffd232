//! Path routes that keep their prefix (`"path_prefix": "keep"`, both lanes): the sandbox
//! receives `/sandbox/{id}/…` and `/{owner}/{name}/…` whole, with `X-Forwarded-Prefix` still
//! set; its own `Location`s under the prefix are left alone and absolute local ones point back
//! through the gateway without a doubled prefix; the host route is unchanged; `PATCH` switches
//! back to stripping.

use std::time::Duration;

use sandgate::config::Isolation;
use serde_json::json;

use crate::common::{eventually, Lane, TestGateway};

/// A server that answers `path=<path> prefix=<X-Forwarded-Prefix>`, and redirects `…/go` to
/// `…/next` (root-relative) and `…/abs` to an absolute local URL of the same path.
const ECHO: &str = r#"import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path.endswith('/go'):
            self.send_response(302); self.send_header('location', self.path[:-3] + '/next')
            self.send_header('content-length', '0'); self.end_headers(); return
        if self.path.endswith('/abs'):
            self.send_response(302)
            self.send_header('location', 'http://localhost:%s%s' % (os.environ['PORT'], self.path[:-4] + '/there'))
            self.send_header('content-length', '0'); self.end_headers(); return
        body = ('path=%s prefix=%s' % (self.path, self.headers.get('x-forwarded-prefix'))).encode()
        self.send_response(200); self.send_header('content-length', str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()
"#;

async fn path_routes_can_keep_their_prefix(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let v = gw
        .create(&json!({"runtime": "shell", "dev_server": true, "owner": "kp", "name": "app",
                        "path_prefix": "keep", "command": format!("exec python3 -c \"{}\"", ECHO.replace('"', "\\\""))}))
        .await;
    assert_eq!(v["path_prefix"], "keep", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let port = v["port"].as_u64().unwrap();
    let by_id = format!("/sandbox/{id}");
    eventually(Duration::from_secs(15), "the server answers", || async {
        let r = gw.get(&format!("{by_id}/ready")).try_send().await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    let r = gw.get(&format!("{by_id}/assets/x.js?v=1")).send().await;
    assert_eq!(
        r.text(),
        format!("path={by_id}/assets/x.js?v=1 prefix={by_id}")
    );
    let r = gw.get("/kp/app/y").send().await;
    assert_eq!(r.text(), "path=/kp/app/y prefix=/kp/app");
    // Its own redirect under the prefix stays as it is; an absolute local one comes back
    // through the gateway, the prefix not doubled.
    let r = gw.get(&format!("{by_id}/go")).send().await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), format!("{by_id}/next"));
    let r = gw.get(&format!("{by_id}/abs")).send().await;
    assert_eq!(r.status, 302);
    let loc = r.header("location").to_string();
    assert!(loc.ends_with(&format!("{by_id}/there")), "{loc}");
    assert!(!loc.contains(&format!("{by_id}{by_id}")), "{loc}");
    assert!(loc.starts_with(&format!("http://{}", gw.addr)), "{loc}");
    // The host route is as it always was.
    let r = gw
        .get("/z")
        .header("host", &format!("{port}-{id}.localhost:{}", gw.addr.port()))
        .send()
        .await;
    assert_eq!(r.text(), "path=/z prefix=None");
    // Back to stripping.
    let v = gw
        .req(hyper::Method::PATCH, &format!("/sandboxes/{id}"))
        .json(&json!({"path_prefix": "strip"}))
        .send()
        .await;
    v.expect(200);
    assert_eq!(v.json()["path_prefix"], "strip");
    let r = gw.get(&format!("{by_id}/q")).send().await;
    assert_eq!(r.text(), format!("path=/q prefix={by_id}"));
    gw.post("/sandboxes")
        .json(&json!({"runtime": "shell", "path_prefix": "sideways"}))
        .send()
        .await
        .expect_error(400, "bad_request");
    gw.delete_sandbox(&id).await;
}

both_lanes!(path_routes_can_keep_their_prefix);

/// Vite from the npm registry (`tests/vite`, installed by `.ci/run`), or `None` after saying
/// so; under CI its absence is a failure.
fn vite() -> Option<String> {
    let js = format!(
        "{}/tests/vite/node_modules/vite/bin/vite.js",
        env!("CARGO_MANIFEST_DIR")
    );
    let found = std::path::Path::new(&js).exists();
    assert!(
        found || std::env::var_os("CI").is_none(),
        "vite is not installed (.ci/run runs npm ci in crates/sandgate/tests/vite)"
    );
    if !found {
        eprintln!("SKIPPED: vite is not installed (npm ci in crates/sandgate/tests/vite)");
    }
    found.then_some(js)
}

const MAIN_JS: &str =
    "document.getElementById('out').textContent = 'VERSION'; if (import.meta.hot) import.meta.hot.accept();";

/// A real Vite dev server started with `--base` set to its path route (by id, and by
/// owner/name) loads in headless Chromium through that route with `path_prefix: keep`, and
/// a change to a module reaches the page over the proxied HMR WebSocket without a reload:
/// on the shared host, and in a jailed sandbox (which sees Vite read-only, writes its cache
/// in its own tree, and watches its files through its bind mount).
async fn vite_app_under_its_path_route_gets_hot_updates(isolation: Isolation) {
    use crate::common::browser::{available, Browser};
    let Some(vite) = vite() else {
        return;
    };
    if !available() {
        return;
    }
    let vite_dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vite"));
    let gw = TestGateway::builder()
        .isolation(isolation)
        .config(move |c| c.sandbox_ro_paths.push(vite_dir))
        .start()
        .await;
    let mut browser = Browser::start().await;
    for (base, extra) in [
        ("/sandbox/$SANDBOX_ID/", json!({})),
        ("/kp/vite/", json!({"owner": "kp", "name": "vite"})),
    ] {
        let mut body = json!({
            "runtime": "shell", "dev_server": true, "path_prefix": "keep",
            "command": format!("exec node {vite} --base {base} --port $PORT --host 127.0.0.1 --strictPort --clearScreen false"),
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let v = gw.create(&body).await;
        let id = v["id"].as_str().unwrap().to_string();
        let base = base.replace("$SANDBOX_ID", &id);
        let files = format!("/sandboxes/{id}/files");
        for (path, text) in [
            (
                "index.html",
                "<!doctype html><div id=\"out\"></div><script type=\"module\" src=\"./main.js\"></script>".to_string(),
            ),
            ("main.js", MAIN_JS.replace("VERSION", "v1")),
        ] {
            gw.req(hyper::Method::PUT, &format!("{files}?path={path}"))
                .header("content-type", "application/octet-stream")
                .body(text)
                .send()
                .await
                .expect(201);
        }
        eventually(
            Duration::from_secs(30),
            "vite answers through the path route",
            || async {
                let r = gw.get(&base).try_send().await.ok()?;
                (r.status == 200 && r.text().contains("main.js")).then_some(())
            },
        )
        .await;
        let tab = browser
            .open(&format!("http://127.0.0.1:{}{base}", gw.addr.port()))
            .await;
        let out = "(document.getElementById('out') || {}).textContent || ''";
        browser.wait_for(&tab, out, |t| t == "v1").await;
        browser.eval(&tab, "window.sandgateMarker = 42").await;
        // Written in place (not renamed), as an editor would.
        let cmd = format!(
            "printf '%s' \"{}\" > main.js",
            MAIN_JS.replace("VERSION", "v2")
        );
        gw.post(&format!("/sandboxes/{id}/exec"))
            .json(&json!({"command": cmd}))
            .send()
            .await
            .expect(200);
        browser.wait_for(&tab, out, |t| t == "v2").await;
        let marker = browser.eval(&tab, "window.sandgateMarker").await;
        assert_eq!(
            marker,
            json!(42),
            "{base}: the page reloaded instead of a hot update"
        );
        gw.delete_sandbox(&id).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vite_app_under_its_path_route_gets_hot_updates() {
    vite_app_under_its_path_route_gets_hot_updates(Isolation::None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vite_app_in_a_jailed_sandbox_gets_hot_updates() {
    if crate::common::jail_or_skip() {
        vite_app_under_its_path_route_gets_hot_updates(Isolation::Sandbox).await;
    }
}
