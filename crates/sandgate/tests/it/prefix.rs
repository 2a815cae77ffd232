//! Path routes that keep their prefix (`"path_prefix": "keep"`, both lanes): the sandbox
//! receives `/sandbox/{id}/…` and `/{owner}/{name}/…` whole, with `X-Forwarded-Prefix` still
//! set; its own `Location`s under the prefix are left alone and absolute local ones point back
//! through the gateway without a doubled prefix; the host route is unchanged; `PATCH` switches
//! back to stripping.

use std::time::Duration;

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
