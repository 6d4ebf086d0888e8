//! The scheduler end to end, over real time with short TTLs and no traffic: keep-alive keeps an
//! idle-expiring refresh token alive, ahead-of-expiry refreshes happen by themselves, and two
//! replicas on one PostgreSQL share due work without ever presenting a refresh token twice.
//! (The scheduler's decisions are tested on an injected clock in `background::plan`; the
//! schedule formula in `instances::schedule_tests`.)

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Env, Org, start_server};
use crate::support::{drop_test_database, test_databases};

/// Registers an organization connector on the sandbox's generic profile with these refresh
/// settings.
pub async fn register_generic_connector(env: &Env, org: &Org, key: &str, refresh: Value) {
    let sandbox = &env.sandbox.url;
    let response = env
        .http
        .post(env.api("/elements"))
        .header("authorization", org.platform())
        .json(&json!({
            "key": key, "name": format!("Generic {key}"),
            "baseUrl": format!("{sandbox}/generic/"),
            "oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"),
                      "tokenUrl": format!("{sandbox}/generic/token"),
                      "revokeUrl": format!("{sandbox}/generic/revoke"),
                      "scopes": ["api", "offline_access"]},
            "refresh": refresh,
        }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(
        status.is_success(),
        "[{}] register {key}: {status} {body}",
        env.label
    );
}

pub async fn refresh_count(env: &Env) -> u64 {
    env.sandbox_stats().await["token"]["refresh_token"]
        .as_u64()
        .unwrap()
}

/// Polls `condition` every 200 ms until it holds or `limit` passes; answers whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn keep_alive_scenario(label: String, url: String) {
    let env = Env::start(&label, &url).await;
    // Refresh tokens die after 4 idle seconds; access tokens live an hour, so nothing but the
    // keep-alive refreshes them.
    env.sandbox_put(
        "/__sandbox/profiles/generic",
        json!({"accessTokenTtlSeconds": 3600, "refreshTokenIdleTtlSeconds": 4}),
    )
    .await;
    register_generic_connector(
        &env,
        &env.org,
        "kept",
        json!({"strategy": "before_expiry", "bufferSeconds": 60, "keepAliveSeconds": 2,
               "refreshTokenIdleTtlSeconds": 4}),
    )
    .await;
    // A control without keep-alive: its refresh token must die, or the test proves nothing.
    register_generic_connector(&env, &env.org, "unkept", json!({"strategy": "on_401"})).await;
    let kept = env.create_instance(&env.org, "kept", "kate").await;
    let unkept = env.create_instance(&env.org, "unkept", "ursula").await;
    let before = refresh_count(&env).await;

    tokio::time::sleep(Duration::from_secs(8)).await;

    let refreshes = refresh_count(&env).await - before;
    assert!(
        (2..=8).contains(&refreshes),
        "[{label}] about one keep-alive refresh per 2 s, not {refreshes}"
    );
    // The kept instance still refreshes (its refresh token is alive) and calls work.
    let kept_id = kept["id"].as_i64().unwrap();
    let refreshed = env
        .http
        .post(env.api(&format!("/instances/{kept_id}/tokens/refresh")))
        .header("authorization", env.org.platform())
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 200, "[{label}] kept instance refreshes");
    let (status, body) = env
        .proxy(
            &env.org,
            kept["token"].as_str().unwrap(),
            Method::GET,
            "api/me",
        )
        .await;
    assert_eq!(status, 200, "[{label}] {body}");
    // The control's refresh token died of inactivity.
    let unkept_id = unkept["id"].as_i64().unwrap();
    let refreshed = env
        .http
        .post(env.api(&format!("/instances/{unkept_id}/tokens/refresh")))
        .header("authorization", env.org.platform())
        .send()
        .await
        .unwrap();
    assert_eq!(
        refreshed.status(),
        409,
        "[{label}] the control's idle refresh token is dead"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

#[tokio::test]
async fn keep_alive_keeps_an_idle_expiring_refresh_token_alive() {
    let scenarios = test_databases()
        .await
        .into_iter()
        .map(|(label, url)| keep_alive_scenario(label, url));
    futures_util::future::join_all(scenarios).await;
}

async fn ahead_of_expiry_scenario(label: String, url: String) {
    let env = Env::start(&label, &url).await;
    env.sandbox_put(
        "/__sandbox/profiles/generic",
        json!({"accessTokenTtlSeconds": 3}),
    )
    .await;
    register_generic_connector(
        &env,
        &env.org,
        "short",
        json!({"strategy": "before_expiry", "bufferSeconds": 1}),
    )
    .await;
    let instance = env.create_instance(&env.org, "short", "sam").await;
    let element = instance["token"].as_str().unwrap().to_string();
    let first_access = access_token(&env, &element).await;
    let before = refresh_count(&env).await;
    // Due 2 s after each refresh (expiry 3 s minus 1 s): two refreshes within ~4 s, no traffic.
    assert!(
        eventually(Duration::from_secs(15), || async {
            refresh_count(&env).await >= before + 2
        })
        .await,
        "[{label}] refreshes ahead of expiry happened by themselves"
    );
    assert_ne!(access_token(&env, &element).await, first_access);
    let id = instance["id"].as_i64().unwrap();
    let (_, events) = env
        .get_json(
            &env.api(&format!(
                "/events?instanceId={id}&type=instance.token.refreshed"
            )),
            &env.org.platform(),
        )
        .await;
    assert!(
        events["events"].as_array().unwrap().len() >= 2,
        "[{label}] {events}"
    );
    let (status, body) = env.proxy(&env.org, &element, Method::GET, "api/me").await;
    assert_eq!(status, 200, "[{label}] {body}");
    // Disabled instances are skipped: no refresh while disabled.
    let disabled = env
        .http
        .delete(env.api(&format!("/instances/{id}/enabled")))
        .header("authorization", env.org.platform())
        .send()
        .await
        .unwrap();
    assert_eq!(disabled.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await; // A refresh in flight may finish.
    let at_disable = refresh_count(&env).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        refresh_count(&env).await,
        at_disable,
        "[{label}] a disabled instance is not refreshed"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

async fn access_token(env: &Env, element: &str) -> String {
    let (_, listed) = env
        .get_json(&env.api("/instances"), &env.org.with_element(element))
        .await;
    listed[0]["configuration"]["oauth.user.token"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn ahead_of_expiry_refreshes_happen_without_traffic() {
    let scenarios = test_databases()
        .await
        .into_iter()
        .map(|(label, url)| ahead_of_expiry_scenario(label, url));
    futures_util::future::join_all(scenarios).await;
}

#[tokio::test]
async fn two_replicas_share_due_work_without_refreshing_anything_twice() {
    let Some((label, url)) = test_databases()
        .await
        .into_iter()
        .find(|(label, _)| label == "postgres")
    else {
        eprintln!("warning: PostgreSQL unreachable; the two-replica test needs it");
        return;
    };
    let env = Env::start(&label, &url).await;
    // A strict rotating provider: presenting a used refresh token again kills the grant.
    env.sandbox_put(
        "/__sandbox/profiles/generic",
        json!({"accessTokenTtlSeconds": 4, "rotateRefreshTokens": true,
               "refreshReuseGraceSeconds": 0, "revokeGrantOnReuse": true}),
    )
    .await;
    register_generic_connector(
        &env,
        &env.org,
        "strict",
        json!({"strategy": "before_expiry", "bufferSeconds": 2}),
    )
    .await;
    let second = start_server(&url, &env.sandbox.url, |_| {}).await;
    const INSTANCES: usize = 24;
    let mut elements = Vec::new();
    for n in 0..INSTANCES {
        let instance = env
            .create_instance(&env.org, "strict", &format!("user{n}"))
            .await;
        elements.push(instance["id"].as_i64().unwrap());
    }
    // Each instance comes due every 2 s: about three rounds, all due at nearly the same time.
    tokio::time::sleep(Duration::from_secs(7)).await;
    second.shutdown().await;
    let Env {
        server,
        sandbox,
        http,
        org,
        ..
    } = env;
    let app = std::sync::Arc::clone(&server.app);
    server.shutdown().await; // In-flight refreshes finish and commit.

    let stats: Value = http
        .get(format!("{}/__sandbox/stats", sandbox.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let refreshes = stats["token"]["refresh_token"].as_u64().unwrap();
    assert_eq!(
        stats["tokenErrors"], 0,
        "no refresh token presented twice: {stats}"
    );
    assert!(
        refreshes >= 2 * INSTANCES as u64,
        "every instance was refreshed about three times: {refreshes}"
    );
    let mut committed = 0;
    let mut before = None;
    loop {
        let page = app
            .store
            .list_events(
                org.id,
                &tokenwarden::store::EventFilter {
                    instance_id: None,
                    event_type: Some("instance.token.refreshed".into()),
                    before: before.clone(),
                    limit: 500,
                },
            )
            .await
            .unwrap();
        committed += page.len() as u64;
        match page.last() {
            Some(last) => {
                before = Some(tokenwarden::store::EventCursor {
                    occurred_at: last.occurred_at,
                    id: last.id.clone(),
                })
            }
            None => break,
        }
    }
    assert_eq!(
        committed, refreshes,
        "one committed refresh (and event) per refresh the provider saw"
    );
    let instances = app.store.list_instances(org.id, &[]).await.unwrap();
    assert_eq!(instances.len(), INSTANCES);
    assert!(
        instances.iter().all(|row| row.is_valid()),
        "all still valid"
    );
    // And every grant is alive: a fresh replica (no scheduler) refreshes each instance with
    // its last refresh token.
    let checker = start_server(&url, &sandbox.url, |config| config.background_tasks = false).await;
    for id in &elements {
        let response = http
            .post(format!(
                "{}/elements/api-v2/instances/{id}/tokens/refresh",
                checker.url
            ))
            .header("authorization", org.platform())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    checker.shutdown().await;
    sandbox.shutdown().await;
    drop(app);
    drop_test_database(&url).await;
}

/// The due query at 100,000 instances: both engines read the partial index `instances_due`
/// (rows that can never be due — invalid, disabled, unscheduled — are not in it), and claiming
/// a batch stays fast. Most rows are scheduled in the future, as in production.
#[tokio::test]
async fn the_due_query_reads_the_partial_index_and_is_fast_at_100k_rows() {
    use tokenwarden::store::{NewOrganization, NewUser, Store};
    const ROWS: i64 = 100_000;
    const NOW: i64 = 1_700_000_000_000;
    for (label, url) in test_databases().await {
        let store = Store::connect(&url).await.unwrap();
        let org = crate::support::random_id();
        store
            .create_organization(&NewOrganization {
                id: org,
                name: "bulk".into(),
                secret_hash: format!("org-{org}").into_bytes(),
                webhook_secret_enc: b"x".to_vec(),
                created_at: NOW,
                first_user: NewUser {
                    id: crate::support::random_id(),
                    name: "u".into(),
                    secret_hash: format!("user-{org}").into_bytes(),
                },
            })
            .await
            .unwrap();
        // Every 2,000th row is due; every 7th is invalid and every 11th disabled, with a due
        // time in the past that must not count; the rest are due in the future.
        let (series, hash) = if label == "postgres" {
            (
                format!("SELECT n FROM generate_series(1, {ROWS}) AS n"),
                "decode(lpad(to_hex(n), 16, '0'), 'hex')",
            )
        } else {
            (
                format!(
                    "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s \
                     WHERE n < {ROWS}) SELECT n FROM s"
                ),
                "CAST(printf('%016x', n) AS BLOB)",
            )
        };
        let insert = format!(
            "INSERT INTO instances (id, organization_id, element_key, name, token_hash, \
             token_enc, state, disabled, next_due_at, created_at, updated_at) \
             SELECT n, {org}, 'sandbox-generic', 'bulk', {hash}, {hash}, \
             CASE WHEN n % 7 = 0 THEN 'invalid' ELSE 'valid' END, \
             CASE WHEN n % 11 = 0 THEN 1 ELSE 0 END, \
             CASE WHEN n % 2000 = 0 OR n % 7 = 0 OR n % 11 = 0 THEN {NOW} - n \
             ELSE {NOW} + n * 1000 END, {NOW}, {NOW} FROM ({series}) AS numbers"
        );
        let mut connection = {
            use sqlx::Connection;
            sqlx::any::install_default_drivers();
            sqlx::AnyConnection::connect(&url).await.unwrap()
        };
        sqlx::query(sqlx::AssertSqlSafe(insert))
            .execute(&mut connection)
            .await
            .unwrap();
        sqlx::query("ANALYZE")
            .execute(&mut connection)
            .await
            .unwrap();
        drop(connection);

        let plan = store.explain_due_query(NOW, 64).await.unwrap();
        assert!(
            plan.contains("instances_due"),
            "[{label}] the due query uses the partial index:\n{plan}"
        );
        let started = Instant::now();
        let claimed = store
            .claim_due(NOW, 64, "bench", NOW + 45_000)
            .await
            .unwrap();
        let claim_time = started.elapsed();
        // n % 2000 == 0 and neither invalid nor disabled.
        let expected = (1..=ROWS)
            .filter(|n| n % 2000 == 0 && n % 7 != 0 && n % 11 != 0)
            .count();
        assert_eq!(claimed.len(), expected, "[{label}]");
        assert!(
            claimed.windows(2).all(|w| w[0].1 <= w[1].1),
            "[{label}] earliest due first"
        );
        let started = Instant::now();
        let next = store.next_due_time().await.unwrap();
        let next_time = started.elapsed();
        assert_eq!(next, Some(NOW + 1_000), "[{label}] the next due row");
        // The plan above is the guarantee; the times only catch a disaster (the speed itself
        // is measured by `bench/run scale`): a pause of the loaded machine must not fail it.
        assert!(
            claim_time < Duration::from_secs(10) && next_time < Duration::from_secs(10),
            "[{label}] claim {claim_time:?}, next due {next_time:?} at {ROWS} rows"
        );
        store.close().await;
        drop_test_database(&url).await;
    }
}

/// An instance this replica's scheduler has claimed and holds back for the connector's rate
/// limit is deleted at once: the DELETE takes the claim over, as a refresh does. It waited
/// for the claim's lease to run out (10 s), the scheduler's task being stuck behind the
/// DELETE's own hold.
#[tokio::test]
async fn a_delete_does_not_wait_for_its_own_schedulers_claim() {
    let url = crate::support::sqlite_database();
    let sandbox = tokenwarden_sandbox::spawn(crate::harness::loopback(), Default::default())
        .await
        .unwrap();
    // One refresh every 2 s per connector: the second of two due instances waits 2 s.
    let env = Env::start_with_sandbox("sqlite", &url, sandbox, |config| {
        config.refresh_rate_per_connector = 0.5;
    })
    .await;
    register_generic_connector(
        &env,
        &env.org,
        "limited",
        json!({"strategy": "before_expiry", "bufferSeconds": 60}),
    )
    .await;
    let first = env.create_instance(&env.org, "limited", "first").await;
    let second = env.create_instance(&env.org, "limited", "second").await;
    let (first, second) = (
        first["id"].as_i64().unwrap(),
        second["id"].as_i64().unwrap(),
    );
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
    for (id, due) in [(first, 1_i64), (second, 2)] {
        sqlx::query("UPDATE instances SET next_due_at = $1 WHERE id = $2")
            .bind(due)
            .bind(id)
            .execute(&mut db)
            .await
            .unwrap();
    }
    env.server.app.refresh.notify_schedule_changed();
    // Both are claimed together; the second then waits for its turn under the rate limit.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let owner: Option<String> =
            sqlx::query_scalar("SELECT refresh_lease_owner FROM instances WHERE id = $1")
                .bind(second)
                .fetch_one(&mut db)
                .await
                .unwrap();
        if owner.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the scheduler never claimed the second instance"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let deleted = env
        .http
        .delete(env.api(&format!("/instances/{second}")))
        .header("authorization", env.org.platform())
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(deleted.status(), 200, "{}", deleted.text().await.unwrap());
    assert!(took < Duration::from_secs(3), "the DELETE waited {took:?}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// An organization's token server: the sandbox's token endpoint behind a relay that can hang
/// or answer late, counting the requests it holds.
#[derive(Clone, Default)]
struct Relay {
    hang: std::sync::Arc<std::sync::atomic::AtomicBool>,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most_waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

struct Waiting(Relay);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Relay {
    /// The refreshes held at the relay now, and the most since the last call.
    fn most_since(&self) -> usize {
        use std::sync::atomic::Ordering;
        self.most_waiting
            .swap(self.waiting.load(Ordering::SeqCst), Ordering::SeqCst)
    }
}

/// Starts a [`Relay`] to the sandbox's generic token endpoint, registers connector `key` of
/// `env`'s organization with it as token URL, and creates `instances` instances of it and two
/// of a healthy connector beside it; the relay starts holding nothing.
async fn organization_behind_a_relay(env: &Env, key: &str, instances: usize) -> Relay {
    use std::sync::atomic::Ordering;
    let relay = Relay::default();
    let sandbox_token = format!("{}/generic/token", env.sandbox.url.trim_end_matches('/'));
    let app = {
        let relay = relay.clone();
        axum::Router::new().route(
            "/token",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let (relay, sandbox_token) = (relay.clone(), sandbox_token.clone());
                async move {
                    let delay = relay.delay_ms.load(Ordering::SeqCst);
                    if relay.hang.load(Ordering::SeqCst) || delay > 0 {
                        let now = relay.waiting.fetch_add(1, Ordering::SeqCst) + 1;
                        relay.most_waiting.fetch_max(now, Ordering::SeqCst);
                        let _waiting = Waiting(relay.clone());
                        if relay.hang.load(Ordering::SeqCst) {
                            std::future::pending::<()>().await;
                        }
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    let mut forwarded = reqwest::Client::new().post(&sandbox_token).body(body);
                    for name in ["content-type", "authorization", "accept"] {
                        if let Some(value) = headers.get(name) {
                            forwarded = forwarded.header(name, value.as_bytes());
                        }
                    }
                    let answer = forwarded.send().await.unwrap();
                    let status = answer.status().as_u16();
                    let text = answer.text().await.unwrap();
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        [("content-type", "application/json")],
                        text,
                    )
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("http://{}/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let sandbox = env.sandbox.url.trim_end_matches('/').to_string();
    let refresh = json!({"strategy": "before_expiry", "bufferSeconds": 1});
    let response = env
        .http
        .post(env.api("/elements"))
        .header("authorization", env.org.platform())
        .json(&json!({
            "key": key, "name": "Behind a relay",
            "baseUrl": format!("{sandbox}/generic/"),
            "oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"),
                      "tokenUrl": relay_url,
                      "scopes": ["api", "offline_access"]},
            "refresh": refresh,
        }))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
    register_generic_connector(env, &env.org, "healthy", refresh).await;
    for n in 0..instances {
        env.create_instance(&env.org, key, &format!("h{n}")).await;
    }
    for n in 0..2 {
        env.create_instance(&env.org, "healthy", &format!("ok{n}"))
            .await;
    }
    relay
}

/// An organization's token endpoint that stops answering (each refresh hangs for the whole
/// provider timeout, then is due again within its backoff) runs at most its share of the
/// scheduler's slots (1 of 8 here): it held every slot, and every other connector's refreshes
/// waited behind its backlog. The other connector's instances go on being refreshed.
#[tokio::test]
async fn a_token_endpoint_that_hangs_does_not_take_every_scheduler_slot() {
    use std::sync::atomic::Ordering;
    let url = crate::support::sqlite_database();
    let env = Env::start_adjusted("sqlite", &url, |config| {
        config.refresh_concurrency = 8;
        config.provider_timeout = Duration::from_secs(2);
    })
    .await;
    env.sandbox_put(
        "/__sandbox/profiles/generic",
        json!({"accessTokenTtlSeconds": 3}),
    )
    .await;
    let relay = organization_behind_a_relay(&env, "hangs", 24).await;
    relay.hang.store(true, Ordering::SeqCst);

    // The first refreshes find the server hanging (nothing known against it yet, so up to
    // every slot: they start within the 2 s before the first of them times out), and have all
    // timed out 4 s after the first came; from then on it runs its share.
    assert!(
        eventually(Duration::from_secs(15), || async {
            relay.most_waiting.load(Ordering::SeqCst) > 0
        })
        .await,
        "no refresh reached the hanging server"
    );
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    relay.most_since();
    let before = refresh_count(&env).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let most = relay.most_since();
    assert!(
        most <= 1,
        "{most} refreshes of the hanging server at once, of 8 slots"
    );
    assert!(most >= 1, "the hanging server was not tried again");
    // The healthy connector's two instances, due every 2 s, were refreshed meanwhile.
    let healthy = refresh_count(&env).await - before;
    assert!(
        healthy >= 4,
        "{healthy} refreshes of the healthy connector in 6 s"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A token endpoint that answers, but in 3 s (an overloaded provider), runs at most half the
/// scheduler's slots (4 of 8 here) once a refresh of it has taken that long: it held every
/// slot while its organization's backlog lasted (20 minutes for 5,000 instances due at once),
/// and other organizations' tokens expired before their refresh. The healthy connector's
/// instances go on being refreshed.
#[tokio::test]
async fn a_token_endpoint_that_answers_slowly_runs_half_the_scheduler_slots() {
    use std::sync::atomic::Ordering;
    let url = crate::support::sqlite_database();
    let env = Env::start_adjusted("sqlite", &url, |config| {
        config.refresh_concurrency = 8;
    })
    .await;
    env.sandbox_put(
        "/__sandbox/profiles/generic",
        json!({"accessTokenTtlSeconds": 3}),
    )
    .await;
    let relay = organization_behind_a_relay(&env, "slow", 24).await;
    relay.delay_ms.store(3_000, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(15), || async {
            relay.most_waiting.load(Ordering::SeqCst) > 0
        })
        .await,
        "no refresh reached the slow server"
    );
    // The first round may take every slot; it has ended 3 s on.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    relay.most_since();
    let before = refresh_count(&env).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let most = relay.most_since();
    assert!(
        (1..=4).contains(&most),
        "{most} refreshes of the slow server at once, of 8 slots"
    );
    let healthy = refresh_count(&env).await - before;
    assert!(
        healthy >= 4,
        "{healthy} refreshes of the healthy connector in 7 s"
    );
    env.stop().await;
    drop_test_database(&url).await;
}
