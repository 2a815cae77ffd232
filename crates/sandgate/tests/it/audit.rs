//! The audit log: control actions and refused credentials are recorded with team, subject,
//! client address, target and result; admins read their team's records, the owner every
//! record; records survive a restart.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{auth_gateway, eventually, team_key, Client, Lane, SpawnedGateway, ADMIN_KEY};

/// Polls `GET /audit?{query}` (as `gw`'s key) until `want` records are there.
async fn records(gw: &Client, query: &str, want: usize) -> Vec<Value> {
    eventually(
        Duration::from_secs(10),
        &format!("{want} audit records for {query}"),
        || async {
            let v = gw
                .get(&format!("/audit?{query}"))
                .send()
                .await
                .expect(200)
                .json();
            let items = v["records"].as_array().unwrap().clone();
            (items.len() >= want).then_some(items)
        },
    )
    .await
}

async fn control_actions_and_refusals_are_recorded(lane: Lane) {
    let gw = auth_gateway(lane, |_| {}).await;
    let (admin, _) = team_key(&gw, "acme", "admin").await;
    let (member, member_id) = team_key(&gw, "acme", "member").await;
    let gm = gw.with_key(&member);
    let sb = gm.create(&json!({"runtime": "shell"})).await;
    let id = sb["id"].as_str().unwrap();
    gm.post(&format!("/sandboxes/{id}/stop"))
        .send()
        .await
        .expect(200);
    gm.delete(&format!("/sandboxes/{id}"))
        .send()
        .await
        .expect(200);
    gm.delete(&format!("/sandboxes/{id}"))
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    gm.post("/auth/token").send().await.expect(200);
    gw.get(&format!("/sandbox/{id}/"))
        .header("x-api-key", "sgk_wrong")
        .send()
        .await
        .expect_error(401, "AUTH_001");

    let ga = gw.with_key(&admin);
    let mine = records(&ga, &format!("sandbox={id}"), 4).await;
    let actions: Vec<(&str, &str)> = mine
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("sandbox.create", "ok"),
            ("sandbox.stop", "ok"),
            ("sandbox.delete", "ok"),
            ("sandbox.delete", "sandbox_not_found")
        ]
    );
    for r in &mine {
        assert_eq!(
            (
                r["team"].as_str(),
                r["subject"].as_str(),
                r["client"].as_str()
            ),
            (Some("acme"), Some(member_id.as_str()), Some("127.0.0.1")),
            "{r}"
        );
        assert!(r["time"].is_string());
    }
    let minted = records(&ga, "action=token.mint", 1).await;
    assert_eq!(minted[0]["target"], member_id.as_str());
    // Key creation by the owner is in the acme admin's view only if done as acme: the owner
    // sees everything, including refused credentials (which belong to no team).
    let all = records(&gw.with_key(ADMIN_KEY), "action=auth.failure", 1).await;
    assert_eq!(all[0]["result"], "AUTH_001");
    assert_eq!(all[0]["client"], "127.0.0.1");
    assert!(all[0]["team"].is_null());
    let keys = records(&gw.with_key(ADMIN_KEY), "action=key.create", 2).await;
    assert!(keys
        .iter()
        .all(|r| r["result"] == "ok" && r["target"].is_string()));
    assert!(
        ga.get("/audit?action=auth.failure")
            .send()
            .await
            .expect(200)
            .json()["count"]
            == 0
    );
    // Filters and bad input.
    let later = ga
        .get("/audit?since=2999-01-01T00:00:00Z")
        .send()
        .await
        .expect(200)
        .json();
    assert_eq!(later["count"], 0);
    ga.get("/audit?since=yesterday")
        .send()
        .await
        .expect_error(422, "validation_failed");
    ga.get("/audit?limit=0")
        .send()
        .await
        .expect_error(422, "validation_failed");
    ga.get("/audit?bogus=1")
        .send()
        .await
        .expect_error(400, "bad_request");
    gm.get("/audit").send().await.expect_error(403, "AUTH_003");
    gw.shutdown().await;
}

both_lanes!(control_actions_and_refusals_are_recorded);

/// Records are in the store: a restart keeps them, including one written just before a
/// clean shutdown.
#[tokio::test(flavor = "multi_thread")]
async fn audit_records_survive_a_restart() {
    let mut gw = SpawnedGateway::start(4, &["--auth-enabled", "true"]).await;
    let key = std::fs::read_to_string(gw.data_dir().join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    gw.with_key(&key)
        .post("/teams")
        .json(&json!({"name": "kept"}))
        .send()
        .await
        .expect(201);
    gw.terminate().await;
    gw.restart().await;
    let r = records(&gw.with_key(&key), "action=team.create", 1).await;
    assert_eq!(r[0]["target"], "kept");
    let log = std::fs::read_to_string(gw.data_dir().join("gateway.log")).unwrap();
    assert!(
        log.contains("team.create"),
        "a structured audit line: {log}"
    );
}
