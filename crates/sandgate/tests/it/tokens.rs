//! Bearer tokens, in both lanes: `POST /auth/token` mints seed 002's HS256 JWT from an API key,
//! the token works on the API and every proxy route and never reaches a sandbox, expires,
//! and dies with its key; an identity provider's RS256/ES256 tokens are accepted with its PEM
//! key or JWKS, with the algorithm pinned and `iss`/`aud` checked.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use hyper::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::common::{
    auth_gateway, eventually, team_key, Client, Lane, TestGateway, ADMIN_KEY as ADMIN,
};

fn keys_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/keys")
}

async fn gateway(
    lane: Lane,
    tweak: impl FnOnce(&mut sandgate::config::Config) + Send + 'static,
) -> TestGateway {
    auth_gateway(lane, tweak).await
}

async fn member_key(gw: &Client, team: &str) -> (String, String) {
    team_key(gw, team, "member").await
}

async fn mint(gw: &Client, key: &str, body: Value) -> Value {
    let r = gw
        .with_key(key)
        .post("/auth/token")
        .json(&body)
        .send()
        .await;
    r.expect(200);
    r.json()
}

fn claims(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

async fn minted_tokens_work_everywhere_and_end_with_their_key(lane: Lane) {
    let gw = gateway(lane, |_| {}).await;
    let (key, key_id) = member_key(&gw, "acme").await;
    let sb = gw.with_key(&key).create_fixture().await;
    let v = mint(&gw, &key, json!({})).await;
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600);
    let token = v["access_token"].as_str().unwrap().to_string();
    let c = claims(&token);
    assert_eq!(
        (c["sub"].as_str(), c["team"].as_str(), c["role"].as_str()),
        (Some(key_id.as_str()), Some("acme"), Some("member"))
    );
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
    let bearer = format!("Bearer {token}");
    gw.get("/sandboxes")
        .header("authorization", &bearer)
        .send()
        .await
        .expect(200);
    let host = format!("{}-{}.localhost", sb.port, sb.id);
    for (path, host) in [
        (format!("/sandbox/{}/echo", sb.id), None),
        ("/echo".to_string(), Some(host.as_str())),
    ] {
        let mut r = gw.get(&path).header("authorization", &bearer);
        if let Some(h) = host {
            r = r.header("host", h);
        }
        let seen = r.send().await.expect(200).json();
        assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    }
    // A token cannot mint a token; a tampered token is refused.
    gw.post("/auth/token")
        .header("authorization", &bearer)
        .send()
        .await
        .expect_error(403, "AUTH_003");
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    gw.get("/sandboxes")
        .header("authorization", &format!("Bearer {forged}"))
        .send()
        .await
        .expect_error(401, "AUTH_001");
    // Short-lived: expires, and says so.
    let short = mint(&gw, &key, json!({"expires_in": 1})).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let details = eventually(Duration::from_secs(5), "the token expires", || async {
        let r = gw
            .get("/sandboxes")
            .header("authorization", &format!("Bearer {short}"))
            .send()
            .await;
        (r.status == StatusCode::UNAUTHORIZED).then(|| r.json()["error"]["details"].clone())
    })
    .await;
    assert_eq!(details, "Token has expired");
    // Revoking the key ends its tokens at once.
    gw.with_key(ADMIN)
        .delete(&format!("/auth/keys/{key_id}"))
        .send()
        .await
        .expect(200);
    gw.get(&format!("/sandbox/{}/", sb.id))
        .header("authorization", &bearer)
        .send()
        .await
        .expect_error(401, "AUTH_001");
    gw.shutdown().await;
}

fn idp_token(alg: Algorithm, key_file: &str, kid: Option<&str>, claims: Value) -> String {
    let pem = std::fs::read(keys_dir().join(key_file)).unwrap();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn identity_provider_tokens_are_checked(lane: Lane) {
    for (alg, private, config) in [
        (Algorithm::RS256, "idp-rsa.key", "pem-rsa"),
        (Algorithm::ES256, "idp-ec.key", "pem-ec"),
        (Algorithm::RS256, "idp-rsa.key", "jwks"),
    ] {
        let gw = gateway(lane, move |c| {
            match config {
                "pem-rsa" => c.jwt.public_key = Some(keys_dir().join("idp-rsa.pub")),
                "pem-ec" => c.jwt.public_key = Some(keys_dir().join("idp-ec.pub")),
                _ => c.jwt.jwks = Some(keys_dir().join("idp-jwks.json")),
            }
            c.jwt.issuer = Some("https://idp.example".into());
            c.jwt.audience = Some("sandgate".into());
            c.jwt.team_claim = "org".into();
        })
        .await;
        member_key(&gw, "acme").await;
        let good = json!({"sub": "alice@example", "org": "acme", "role": "member",
            "iss": "https://idp.example", "aud": "sandgate", "exp": now() + 600});
        let kid = (config == "jwks").then_some("test-rsa");
        let send = |t: String| {
            gw.get("/sandboxes")
                .header("authorization", &format!("Bearer {t}"))
                .send()
        };
        send(idp_token(alg, private, kid, good.clone()))
            .await
            .expect(200);
        // A sandbox created with it belongs to its team.
        let t = idp_token(alg, private, kid, good.clone());
        let r = gw
            .post("/sandboxes")
            .header("authorization", &format!("Bearer {t}"))
            .json(&json!({"runtime": "shell"}))
            .send()
            .await;
        r.expect(201);
        assert_eq!(r.json()["team"], "acme");
        for (what, patch) in [
            ("wrong issuer", json!({"iss": "https://evil.example"})),
            ("wrong audience", json!({"aud": "other"})),
            ("expired", json!({"exp": now() - 10})),
            ("unknown team", json!({"org": "nobody"})),
            ("owner role", json!({"role": "owner"})),
        ] {
            let mut c = good.clone();
            for (k, v) in patch.as_object().unwrap() {
                c[k] = v.clone();
            }
            send(idp_token(alg, private, kid, c))
                .await
                .expect_error(401, "AUTH_001");
            let _ = what;
        }
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        send(idp_token(alg, private, kid, no_exp))
            .await
            .expect_error(401, "AUTH_001");
        // Algorithm pinned: an HS256 token signed with the public key's bytes (the classic
        // confusion attack) is not accepted as the provider's.
        let public = std::fs::read(keys_dir().join("idp-rsa.pub")).unwrap();
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(&public),
        )
        .unwrap();
        send(confused).await.expect_error(401, "AUTH_001");
        gw.shutdown().await;
    }
}

async fn api_key_only_gateways_mint_nothing(lane: Lane) {
    let gw = gateway(lane, |c| {
        c.auth_provider = sandgate::config::AuthProvider::ApiKey
    })
    .await;
    gw.with_key(ADMIN)
        .post("/auth/token")
        .send()
        .await
        .expect_error(404, "not_found");
    let health = gw.get("/health/auth").send().await.expect(200).json();
    assert_eq!(health["providers"], json!(["api_key"]));
    gw.shutdown().await;
}

/// Serves `doc` at any path over HTTPS with `certs`' server certificate.
async fn serve_jwks(certs: &crate::common::tls::CertDir, doc: Vec<u8>) -> std::net::SocketAddr {
    let acceptor = sandgate::tls::Tls::load(&certs.files)
        .expect("test certificate")
        .acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let doc = bytes::Bytes::from(doc);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, doc) = (acceptor.clone(), doc.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_req| {
                    let doc = doc.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(doc),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// A JWKS URL over HTTPS (a provider behind a private CA, `--jwt-jwks-ca`): fetched at start,
/// its keys verify the provider's tokens.
async fn a_jwks_url_is_fetched_over_https(lane: Lane) {
    let certs = crate::common::tls::CertDir::new();
    let doc = std::fs::read(keys_dir().join("idp-jwks.json")).unwrap();
    let addr = serve_jwks(&certs, doc).await;
    let ca = certs.ca_path();
    let url = format!("https://localhost:{}/.well-known/jwks.json", addr.port());
    let gw = gateway(lane, move |c| {
        c.jwt.jwks = Some(PathBuf::from(url));
        c.jwt.jwks_ca = Some(ca);
        c.jwt.team_claim = "org".into();
    })
    .await;
    member_key(&gw, "acme").await;
    let claims = json!({"sub": "bob", "org": "acme", "role": "viewer", "exp": now() + 600});
    let t = idp_token(Algorithm::RS256, "idp-rsa.key", Some("test-rsa"), claims);
    gw.get("/sandboxes")
        .header("authorization", &format!("Bearer {t}"))
        .send()
        .await
        .expect(200);
    let providers = gw.get("/health/auth").send().await.expect(200).json()["providers"].clone();
    assert_eq!(providers, json!(["api_key", "jwt", "identity_provider"]));
    gw.shutdown().await;
}

both_lanes!(
    a_jwks_url_is_fetched_over_https,
    minted_tokens_work_everywhere_and_end_with_their_key,
    identity_provider_tokens_are_checked,
    api_key_only_gateways_mint_nothing,
);
