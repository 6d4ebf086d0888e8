//! The refresh engine as users meet it: storms of rejected calls, each strategy, every failure
//! class of the token endpoint, rotation persisted across a restart. Every assertion is on what
//! the provider saw (sandbox stats) and on the instance's JSON and events.

use std::future::Future;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Env, Org, loopback, start_server};
use crate::support::{
    create_postgres_database, drop_test_database, sqlite_database, test_databases,
};

// ----- helpers shared by the proxy, replica and crash tests ---------------------------------

/// The instance as its own Element token shows it (tokens revealed).
pub(crate) async fn instance(env: &Env, server_url: &str, token: &str) -> Value {
    let (status, body) = env
        .get_json(
            &format!("{server_url}/elements/api-v2/instances"),
            &env.org.with_element(token),
        )
        .await;
    assert_eq!(status, 200, "[{}] instance: {body}", env.label);
    body[0].clone()
}

/// The types of an instance's events, oldest first.
pub(crate) async fn event_types(env: &Env, server_url: &str, id: i64) -> Vec<String> {
    let (status, body) = env
        .get_json(
            &format!("{server_url}/elements/api-v2/events?instanceId={id}&limit=200"),
            &env.org.platform(),
        )
        .await;
    assert_eq!(status, 200, "[{}] events: {body}", env.label);
    let mut types: Vec<String> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["type"].as_str().unwrap().to_string())
        .collect();
    types.reverse();
    types
}

pub(crate) fn count(events: &[String], kind: &str) -> usize {
    events.iter().filter(|e| e.as_str() == kind).count()
}

/// One number of `GET /__sandbox/stats`, by path.
pub(crate) async fn stat(env: &Env, path: &[&str]) -> u64 {
    let stats = env.sandbox_stats().await;
    let mut value = &stats;
    for key in path {
        value = &value[*key];
    }
    value
        .as_u64()
        .unwrap_or_else(|| panic!("stats {path:?}: {stats}"))
}

pub(crate) async fn refreshes(env: &Env) -> u64 {
    stat(env, &["token", "refresh_token"]).await
}

pub(crate) async fn api_calls(env: &Env) -> u64 {
    stat(env, &["api", "ok"]).await + stat(env, &["api", "unauthorized"]).await
}

/// A proxied call to any replica.
pub(crate) async fn proxy_at(
    env: &Env,
    server_url: &str,
    org: &Org,
    token: &str,
    method: Method,
    path: &str,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let response = env
        .http
        .request(method, format!("{server_url}/elements/api-v2/proxy/{path}"))
        .header("authorization", org.through(token))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        headers,
    )
}

/// The generic profile's behaviour.
pub(crate) async fn generic_profile(env: &Env, settings: Value) {
    env.sandbox_put("/__sandbox/profiles/generic", settings)
        .await;
}

/// A strict rotating provider: any second use of a refresh token kills the grant.
pub(crate) fn strict_rotation() -> Value {
    json!({"rotateRefreshTokens": true, "refreshReuseGraceSeconds": 0, "revokeGrantOnReuse": true})
}

/// Registers an organization connector on the sandbox's generic profile ("a stranger's
/// standards-compliant server"), with the given extra fields (`refresh`, `baseUrl`…).
pub(crate) async fn register_connector(env: &Env, key: &str, extra: Value) {
    let sandbox = env.sandbox.url.trim_end_matches('/');
    let mut body = json!({
        "key": key, "name": format!("Test {key}"),
        "baseUrl": format!("{sandbox}/generic/"),
        "oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"),
                  "tokenUrl": format!("{sandbox}/generic/token"),
                  "revokeUrl": format!("{sandbox}/generic/revoke"),
                  "clientAuth": "client_secret_post", "pkce": false}
    });
    for (name, value) in extra.as_object().unwrap() {
        body[name] = value.clone();
    }
    let response = env
        .http
        .post(env.api("/elements"))
        .header("authorization", env.org.platform())
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "register {key}: {status} {text}");
}

/// Polls `check` until it answers `Some`, at most `limit`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Moves the sandbox's clock past every access token's life.
pub(crate) async fn expire_access_tokens(env: &Env) {
    env.sandbox_post("/__sandbox/clock", json!({"advanceSeconds": 10_000}))
        .await;
}

async fn fault(env: &Env, body: Value) {
    env.sandbox_post("/__sandbox/faults", body).await;
}

/// Holds the next call to the token endpoints for `delay_ms`; what it answers is for
/// [`at_the_provider`].
async fn hold_next_token_call(env: &Env, delay_ms: u64) -> u64 {
    let before = stat(env, &["faultsInjected"]).await;
    fault(
        env,
        json!({"target": "token", "status": 0, "delayMs": delay_ms, "count": 1}),
    )
    .await;
    before
}

/// Waits until the call [`hold_next_token_call`] holds has reached the provider.
async fn at_the_provider(env: &Env, held: u64) {
    eventually(
        "the refresh at the provider",
        Duration::from_secs(10),
        || async { (stat(env, &["faultsInjected"]).await > held).then_some(()) },
    )
    .await;
}

async fn clear_faults(env: &Env) {
    let response = env
        .http
        .delete(env.sandbox_url("/__sandbox/faults"))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
}

/// `n` concurrent proxied calls of `path`, spread over the given replicas; their statuses.
pub(crate) async fn storm(
    env: &Env,
    servers: &[String],
    token: &str,
    n: usize,
    path: &str,
) -> Vec<(u16, Value)> {
    let calls = (0..n).map(|i| {
        let server = servers[i % servers.len()].clone();
        async move {
            let (status, body, _) =
                proxy_at(env, &server, &env.org, token, Method::GET, path).await;
            (status, body)
        }
    });
    futures_util::future::join_all(calls).await
}

pub(crate) fn assert_all_ok(label: &str, answers: &[(u16, Value)]) {
    let failed: Vec<&(u16, Value)> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "[{label}] {} of {} calls failed, e.g. {:?}",
        failed.len(),
        answers.len(),
        failed.first()
    );
}

// ----- 1. the storm on one replica --------------------------------------------------------

/// 300 concurrent calls whose token the provider rejects, on a provider that kills the grant
/// at any second use of a refresh token: one refresh, 300 answers 200.
#[tokio::test]
async fn storm_of_rejected_calls_makes_one_refresh_on_sqlite() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    generic_profile(&env, strict_rotation()).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "storm")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_i64().unwrap();
    let server = env.server.url.clone();
    let (status, _, _) = proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 200);
    let before = instance(&env, &server, &token).await;
    expire_access_tokens(&env).await;

    let answers = storm(&env, std::slice::from_ref(&server), &token, 300, "api/me").await;
    assert_all_ok("sqlite storm", &answers);
    assert_eq!(refreshes(&env).await, 1, "exactly one refresh");
    assert_eq!(stat(&env, &["tokenErrors"]).await, 0);
    let after = instance(&env, &server, &token).await;
    assert_eq!(after["valid"], true, "{after}");
    assert_ne!(
        after["configuration"]["oauth.user.refresh_token"],
        before["configuration"]["oauth.user.refresh_token"],
        "the rotated refresh token is stored"
    );
    let events = event_types(&env, &server, id).await;
    assert_eq!(count(&events, "instance.token.refreshed"), 1, "{events:?}");
    // The grant is alive at the provider: the next expiry refreshes again.
    expire_access_tokens(&env).await;
    let (status, body, _) = proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(refreshes(&env).await, 2);
    env.stop().await;
    drop_test_database(&url).await;
}

/// A service on the SQLite database `url`, with a sandbox of its own, whose scheduler and other
/// background work are off: only calls refresh.
async fn env_without_background(url: &str) -> Env {
    let sandbox = tokenwarden_sandbox::spawn(loopback(), Default::default())
        .await
        .unwrap();
    Env::start_with_sandbox("sqlite", url, sandbox, |config| {
        config.background_tasks = false;
    })
    .await
}

// ----- 3. strategies ----------------------------------------------------------------------

/// Each strategy on a stranger's server (the generic profile as an organization connector).
/// The scheduler is off so that only the proxy refreshes.
#[tokio::test]
async fn each_strategy_refreshes_when_it_should() {
    let url = sqlite_database();
    let env = env_without_background(&url).await;
    let server = env.server.url.clone();

    // before_expiry: a token issued for 8 s with a 60 s buffer is "within the buffer" at once,
    // and refreshed ahead of the call once half its lifetime has passed (never sooner, or a
    // token shorter than the buffer would make every call refresh). 4 s leave a loaded machine
    // time to create the instance and make the first call.
    generic_profile(&env, json!({"accessTokenTtlSeconds": 8})).await;
    register_connector(
        &env,
        "t-before",
        json!({"refresh": {"strategy": "before_expiry", "bufferSeconds": 60}}),
    )
    .await;
    let before = env.create_instance(&env.org, "t-before", "bea").await;
    let token = before["token"].as_str().unwrap();
    let start = refreshes(&env).await;
    let unauthorized = stat(&env, &["api", "unauthorized"]).await;
    let (status, body, _) = proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        refreshes(&env).await,
        start,
        "not before half the token's lifetime"
    );
    tokio::time::sleep(Duration::from_millis(4_100)).await;
    let (status, body, _) = proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(refreshes(&env).await, start + 1, "before_expiry refreshed");
    assert_eq!(
        stat(&env, &["api", "unauthorized"]).await,
        unauthorized,
        "before_expiry refreshed without a rejection"
    );

    // on_401: a token "within the buffer" (30 s left, 60 s buffer) is used as it is until the
    // provider rejects it.
    generic_profile(&env, json!({"accessTokenTtlSeconds": 30})).await;
    register_connector(
        &env,
        "t-on401",
        json!({"refresh": {"strategy": "on_401", "bufferSeconds": 60}}),
    )
    .await;
    let on401 = env.create_instance(&env.org, "t-on401", "oscar").await;
    let token = on401["token"].as_str().unwrap();
    let start = refreshes(&env).await;
    for _ in 0..3 {
        let (status, body, _) =
            proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        refreshes(&env).await,
        start,
        "on_401: no rejection, no refresh"
    );
    expire_access_tokens(&env).await;
    let (status, body, _) = proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        refreshes(&env).await,
        start + 1,
        "on_401: one refresh on the 401"
    );

    // every_request: one refresh per call.
    register_connector(
        &env,
        "t-every",
        json!({"refresh": {"strategy": "every_request"}}),
    )
    .await;
    let every = env.create_instance(&env.org, "t-every", "eve").await;
    let token = every["token"].as_str().unwrap();
    let start = refreshes(&env).await;
    for _ in 0..4 {
        let (status, body, _) =
            proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        refreshes(&env).await,
        start + 4,
        "every_request: one per call"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

// ----- 4. failure classes -----------------------------------------------------------------

/// The token endpoint answers 503 for a while: calls answer 503 with a clear message, the
/// instance stays valid and shows the failing run, at most one attempt per backoff step
/// however many calls arrive, and it recovers when the provider does.
#[tokio::test]
async fn token_endpoint_outage_is_transient_and_single_flight() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let server = env.server.url.clone();
    let created = env
        .create_instance(&env.org, "sandbox-generic", "outage")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_i64().unwrap();
    expire_access_tokens(&env).await;
    fault(
        &env,
        json!({"target": "token", "status": 503, "count": 1000}),
    )
    .await;

    let started = Instant::now();
    let answers = storm(&env, std::slice::from_ref(&server), &token, 100, "api/me").await;
    let elapsed = started.elapsed();
    for (status, body) in &answers {
        assert_eq!(*status, 503, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("stays valid"),
            "{body}"
        );
        assert!(
            body["providerMessage"].as_str().unwrap().contains("503"),
            "{body}"
        );
    }
    // The first backoff step is at least 1 s: one attempt per started second at most.
    let attempts = stat(&env, &["tokenErrors"]).await;
    assert!(
        attempts >= 1 && attempts <= 1 + elapsed.as_secs(),
        "{attempts} token attempts for 100 calls in {elapsed:?}"
    );
    let failing = instance(&env, &server, &token).await;
    assert_eq!(failing["valid"], true, "{failing}");
    assert!(failing["refreshFailingSince"].is_string(), "{failing}");
    assert_eq!(failing["state"], "refresh_failing");

    // A second burst inside the backoff makes no attempt at all.
    let attempts = stat(&env, &["tokenErrors"]).await;
    let answers = storm(&env, std::slice::from_ref(&server), &token, 20, "api/me").await;
    assert!(answers.iter().all(|(s, _)| *s == 503));
    let after = stat(&env, &["tokenErrors"]).await;
    assert!(after <= attempts + 1, "{attempts} → {after}");

    clear_faults(&env).await;
    let (status, body) = eventually("recovery", Duration::from_secs(20), || async {
        let (status, body, _) =
            proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
        (status == 200).then_some((status, body))
    })
    .await;
    assert_eq!(status, 200, "{body}");
    let recovered = instance(&env, &server, &token).await;
    assert_eq!(recovered["valid"], true);
    assert!(recovered["refreshFailingSince"].is_null(), "{recovered}");
    let events = event_types(&env, &server, id).await;
    assert_eq!(count(&events, "instance.refresh_failing"), 1, "{events:?}");
    assert_eq!(count(&events, "instance.recovered"), 1, "{events:?}");
    assert_eq!(count(&events, "instance.invalidated"), 0, "{events:?}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// A run of failures too short to be announced (`instance.refresh_failing` waits 5 minutes)
/// ends quietly: no `instance.recovered` for a failure no receiver heard of.
#[tokio::test]
async fn a_failure_too_short_to_be_announced_ends_without_a_recovery_event() {
    let url = sqlite_database();
    // The default wait before a failing run is announced (the tests' is none).
    let env = Env::start_adjusted("sqlite", &url, |config| {
        config.refresh_failing_after =
            Duration::from_millis(tokenwarden::events::REFRESH_FAILING_AFTER_MS as u64);
    })
    .await;
    let server = env.server.url.clone();
    let created = env
        .create_instance(&env.org, "sandbox-generic", "blip")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_i64().unwrap();
    expire_access_tokens(&env).await;
    fault(&env, json!({"target": "token", "status": 503, "count": 1})).await;
    let (status, body, _) = proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 503, "{body}");
    let refreshed = env
        .http
        .post(env.api(&format!("/instances/{id}/tokens/refresh")))
        .header("authorization", env.org.platform())
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 200);
    let events = event_types(&env, &server, id).await;
    assert_eq!(count(&events, "instance.refresh_failing"), 0, "{events:?}");
    assert_eq!(count(&events, "instance.recovered"), 0, "{events:?}");
    assert_eq!(count(&events, "instance.token.refreshed"), 1, "{events:?}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// An `on_401` connector (no scheduled refreshes) whose refresh on a call failed for now is
/// tried again by the scheduler after its backoff: it stayed `refresh_failing` until a caller
/// happened to call again, its `instance.refresh_failing` never came, and a grant that had
/// died meanwhile was not found out.
#[tokio::test]
async fn a_refresh_failed_on_a_call_is_tried_again_without_one() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let server = env.server.url.clone();
        let created = env
            .create_instance(&env.org, "sandbox-salesforce", "ulla")
            .await;
        let token = created["token"].as_str().unwrap().to_string();
        expire_access_tokens(&env).await;
        fault(&env, json!({"target": "token", "status": 503, "count": 1})).await;
        let before = refreshes(&env).await;
        let (status, body, _) =
            proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 503, "[{label}] {body}");
        assert_eq!(
            instance(&env, &server, &token).await["state"],
            "refresh_failing",
            "[{label}]"
        );
        // No call comes; the scheduler refreshes it once its backoff (a few seconds) ends.
        let shown = eventually(
            "the refresh tried again",
            Duration::from_secs(30),
            || async {
                let shown = instance(&env, &server, &token).await;
                (shown["state"] == "valid").then_some(shown)
            },
        )
        .await;
        assert!(shown["refreshFailingSince"].is_null(), "[{label}] {shown}");
        assert_eq!(refreshes(&env).await, before + 1, "[{label}]");
        let (status, body, _) =
            proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "[{label}] {body}");
        // Refreshed, the instance is not due again: an on_401 one refreshes on a rejection.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(refreshes(&env).await, before + 1, "[{label}]");
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// An API that rejects even the token a refresh has just given (a user's licence withdrawn,
/// an account locked): the first rejection refreshes and retries once, as always; the calls
/// that follow get the API's 401 as it is, without a refresh each (one per call loaded the
/// token endpoint and rotated refresh tokens for nothing); the instance stays valid, and its
/// token serves again as soon as the API takes it.
#[tokio::test]
async fn an_api_that_rejects_fresh_tokens_costs_one_refresh_not_one_per_call() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let server = env.server.url.clone();
    let created = env
        .create_instance(&env.org, "sandbox-generic", "locked-out")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    let before = refreshes(&env).await;
    fault(&env, json!({"target": "api", "status": 401, "count": 100})).await;
    for call in 0..6 {
        let (status, body, _) =
            proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 401, "call {call}: {body}");
    }
    assert_eq!(
        refreshes(&env).await,
        before + 1,
        "one refresh for six rejections"
    );
    let kept = instance(&env, &server, &token).await;
    assert_eq!(kept["valid"], true, "{kept}");
    clear_faults(&env).await;
    let (status, body, _) = proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(refreshes(&env).await, before + 1);

    // A connector that refreshes before every call: the token the call has just been given,
    // rejected, is not refreshed a second time (each call cost two refreshes and two calls).
    register_connector(
        &env,
        "t-every-locked",
        json!({"refresh": {"strategy": "every_request"}}),
    )
    .await;
    let every = env
        .create_instance(&env.org, "t-every-locked", "locked-out-too")
        .await;
    let token = every["token"].as_str().unwrap();
    let before = refreshes(&env).await;
    fault(&env, json!({"target": "api", "status": 401, "count": 100})).await;
    for call in 0..3 {
        let (status, body, _) =
            proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
        assert_eq!(status, 401, "call {call}: {body}");
    }
    assert_eq!(
        refreshes(&env).await,
        before + 3,
        "every_request: one refresh per call, rejected or not"
    );
    let kept = instance(&env, &server, token).await;
    assert_eq!(kept["valid"], true, "{kept}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// Our own database stops answering just as the provider rejects a token: the refresh that
/// follows cannot take its lease, and the call answers 503 with a `Retry-After` (the service's
/// passing state, as for every other call then), not 500; the instance is left as it was.
#[tokio::test]
async fn a_refresh_while_the_database_does_not_answer_is_503() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let server = env.server.url.clone();
    let created = env
        .create_instance(&env.org, "sandbox-generic", "store-down")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    // A first call: the caller's credentials and the instance are in memory now.
    let (status, body, _) = proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "{body}");
    expire_access_tokens(&env).await;
    env.server.app.store.close().await;
    let (status, body, headers) =
        proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 503, "{body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert!(
        body["message"].as_str().unwrap().contains("database"),
        "{body}"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A provider that asks to come back in a year (a 429 with `Retry-After: 31536000`) holds the
/// instance's refreshes back for an hour at most: calls on an expired token answer 503 while it
/// lasts, so a longer wait would take the instance out of service.
#[tokio::test]
async fn a_retry_after_far_ahead_holds_refreshes_back_an_hour_at_most() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let server = env.server.url.clone();
    let limited = env
        .create_instance(&env.org, "sandbox-generic", "a-year-later")
        .await;
    expire_access_tokens(&env).await;
    fault(
        &env,
        json!({"target": "token", "status": 429, "count": 1, "retryAfter": 31_536_000}),
    )
    .await;
    let token = limited["token"].as_str().unwrap();
    let (status, body, headers) =
        proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
    assert_eq!(status, 503, "{body}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (3_000..=3_600).contains(&retry_after),
        "the provider's year became {retry_after} s"
    );
    assert_eq!(instance(&env, &server, token).await["valid"], true);
    env.stop().await;
    drop_test_database(&url).await;
}

/// 429 with Retry-After, and a token endpoint slower than the provider timeout: both
/// transient, the instance valid, the caller told when to come back.
#[tokio::test]
async fn rate_limits_and_timeouts_are_transient() {
    let url = sqlite_database();
    let sandbox = tokenwarden_sandbox::spawn(loopback(), Default::default())
        .await
        .unwrap();
    let env = Env::start_with_sandbox("sqlite", &url, sandbox, |config| {
        config.provider_timeout = Duration::from_millis(1_500);
    })
    .await;
    let server = env.server.url.clone();
    let limited = env
        .create_instance(&env.org, "sandbox-generic", "ratelimited")
        .await;
    let slow = env
        .create_instance(&env.org, "sandbox-generic", "slowpoke")
        .await;
    let maintained = env
        .create_instance(&env.org, "sandbox-generic", "maintained")
        .await;
    expire_access_tokens(&env).await;

    fault(&env, json!({"target": "token", "status": 429, "count": 1})).await;
    let token = limited["token"].as_str().unwrap();
    let (status, body, headers) =
        proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["providerMessage"].as_str().unwrap().contains("429"),
        "{body}"
    );
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1, "Retry-After honoured: {retry_after}");
    let errors = stat(&env, &["tokenErrors"]).await;
    let (status, _, _) = proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
    assert_eq!(status, 503, "inside the Retry-After: no attempt");
    assert_eq!(stat(&env, &["tokenErrors"]).await, errors);
    assert_eq!(instance(&env, &server, token).await["valid"], true);
    let (status, body) = eventually("429 recovery", Duration::from_secs(20), || async {
        let (status, body, _) =
            proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
        (status == 200).then_some((status, body))
    })
    .await;
    assert_eq!(status, 200, "{body}");

    // A 503 that says how long it lasts (`Retry-After`: a maintenance window) is waited out,
    // not polled every few seconds.
    fault(
        &env,
        json!({"target": "token", "status": 503, "count": 1, "retryAfter": 40}),
    )
    .await;
    let token = maintained["token"].as_str().unwrap();
    let (status, body, headers) =
        proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
    assert_eq!(status, 503, "{body}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        retry_after >= 39,
        "the 503's Retry-After honoured: {retry_after}"
    );
    assert_eq!(instance(&env, &server, token).await["valid"], true);

    fault(
        &env,
        json!({"target": "token", "status": 0, "delayMs": 60_000, "count": 1}),
    )
    .await;
    let token = slow["token"].as_str().unwrap();
    let started = Instant::now();
    let (status, body, _) = proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the provider timeout (1.5 s) cut the call, not the provider's 60 s"
    );
    assert!(
        body["providerMessage"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("time"),
        "{body}"
    );
    let shown = instance(&env, &server, token).await;
    assert_eq!(shown["valid"], true, "{shown}");
    assert!(shown["refreshFailingSince"].is_string(), "{shown}");
    let (status, body) = eventually("timeout recovery", Duration::from_secs(20), || async {
        let (status, body, _) =
            proxy_at(&env, &server, &env.org, token, Method::GET, "api/me").await;
        (status == 200).then_some((status, body))
    })
    .await;
    assert_eq!(status, 200, "{body}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// The user revokes the app at the provider: the instance turns invalid with the provider's
/// words and an event, calls answer 401 at once without calling the provider, and a new code
/// brings it back.
#[tokio::test]
async fn revoked_grant_invalidates_until_reauthentication() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let server = env.server.url.clone();
    let created = env
        .create_instance(&env.org, "sandbox-generic", "revoker")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_i64().unwrap();
    let (status, _, _) = proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 200);
    env.sandbox_post("/__sandbox/users/revoker/revoke", json!({}))
        .await;

    let (status, body, _) = proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["message"], "Request failed");
    assert!(body["requestId"].is_string(), "{body}");
    assert!(body["providerMessage"].is_string(), "{body}");
    let shown = instance(&env, &server, &token).await;
    assert_eq!(shown["valid"], false, "{shown}");
    assert!(
        shown["stateReason"]
            .as_str()
            .unwrap()
            .contains("invalid_grant"),
        "the provider's words: {shown}"
    );
    let events = event_types(&env, &server, id).await;
    assert_eq!(count(&events, "instance.invalidated"), 1, "{events:?}");

    let (api, tokens) = (api_calls(&env).await, stat(&env, &["tokenErrors"]).await);
    let refreshed = refreshes(&env).await;
    for _ in 0..5 {
        let (status, again, _) =
            proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 401, "{again}");
        assert_eq!(again["message"], "Request failed");
        assert_eq!(again["providerMessage"], body["providerMessage"]);
    }
    assert_eq!(
        api_calls(&env).await,
        api,
        "no API call for an invalid instance"
    );
    assert_eq!(stat(&env, &["tokenErrors"]).await, tokens, "no token call");
    assert_eq!(refreshes(&env).await, refreshed);

    let (code, state) = env.authorize(&env.org, "sandbox-generic", "revoker").await;
    let patched = env
        .http
        .patch(env.api(&format!("/instances/{id}")))
        .header("authorization", env.org.platform())
        .json(&json!({"providerData": {"code": code, "state": state}}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let (status, body, _) = proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(instance(&env, &server, &token).await["valid"], true);
    // And it refreshes again like any other.
    expire_access_tokens(&env).await;
    let (status, body, _) = proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "{body}");
    env.stop().await;
    drop_test_database(&url).await;
}

// ----- 5. rotation persisted before use ---------------------------------------------------

/// After a rotating refresh, a restarted server refreshes with the rotated token (so it was
/// stored before the new access token was used), on both engines.
#[tokio::test]
async fn rotated_refresh_token_survives_a_restart() {
    let mut databases = vec![("sqlite".to_string(), sqlite_database())];
    if let Ok(url) = create_postgres_database().await {
        databases.push(("postgres".to_string(), url));
    }
    for (label, url) in databases {
        let mut env = Env::start(&label, &url).await;
        generic_profile(&env, strict_rotation()).await;
        let created = env
            .create_instance(&env.org, "sandbox-generic", "rotor")
            .await;
        let token = created["token"].as_str().unwrap().to_string();
        expire_access_tokens(&env).await;
        let (status, body) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "[{label}] {body}");
        assert_eq!(refreshes(&env).await, 1);

        let sandbox_url = env.sandbox.url.clone();
        let old = std::mem::replace(
            &mut env.server,
            start_server(&url, &sandbox_url, |_| {}).await,
        );
        old.shutdown().await;
        expire_access_tokens(&env).await;
        let (status, body) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "[{label}] after restart: {body}");
        assert_eq!(refreshes(&env).await, 2, "[{label}]");
        assert_eq!(stat(&env, &["tokenErrors"]).await, 0, "[{label}] no reuse");
        let server = env.server.url.clone();
        assert_eq!(instance(&env, &server, &token).await["valid"], true);
        env.stop().await;
        drop_test_database(&url).await;
    }
}

// ----- the hot path -----------------------------------------------------------------------

/// While the cached token is fresh, proxied calls make no database query the caller waits
/// for, even past the cache's revalidation age.
#[tokio::test]
async fn warm_calls_make_no_awaited_database_query() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "warm")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    let (status, _) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 200);
    let app = &env.server.app;
    let reads = app.refresh.awaited_reads();
    let lookups = app.auth_cache.awaited_lookups();
    // Rounds 4.2 s apart, across the revalidation age (5 s) and the age at which an idle copy
    // is re-read before it serves (10 s): under steady traffic neither awaits a read.
    for round in 0..4 {
        for _ in 0..20 {
            let (status, _) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
            assert_eq!(status, 200);
        }
        if round < 3 {
            tokio::time::sleep(Duration::from_millis(4_200)).await;
        }
    }
    assert_eq!(
        app.refresh.awaited_reads(),
        reads,
        "instance reads on the hot path"
    );
    assert_eq!(
        app.auth_cache.awaited_lookups(),
        lookups,
        "credential lookups on the hot path"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A configuration change made while a refresh is at the provider stays: the refresh commits
/// only the keys its token response sets (Salesforce's `issued_at`, which changes at every
/// refresh), not the whole configuration it read before the call.
#[tokio::test]
async fn a_configuration_change_during_a_refresh_stays() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let created = env
            .create_instance(&env.org, "sandbox-salesforce", "patched-meanwhile")
            .await;
        let token = created["token"].as_str().unwrap().to_string();
        let id = created["id"].as_i64().unwrap();
        let before = crate::instances::revealed(&env, &env.org, &created).await;
        expire_access_tokens(&env).await;
        let held = hold_next_token_call(&env, 2_000).await;
        let call = proxy_at(
            &env,
            &env.server.url,
            &env.org,
            &token,
            Method::GET,
            "api/me",
        );
        let patch = async {
            at_the_provider(&env, held).await;
            crate::instances::call(
                &env,
                Method::PATCH,
                &env.api(&format!("/instances/{id}")),
                Some(&env.org.platform()),
                Some(json!({"configuration": {"custom.setting": "kept"}})),
            )
            .await
        };
        let ((status, body, _), patched) = tokio::join!(call, patch);
        assert_eq!(status, 200, "[{label}] {body}");
        assert_eq!(patched.status, 200, "[{label}] {}", patched.body);
        assert_eq!(refreshes(&env).await, 1, "[{label}]");
        let after = crate::instances::revealed(&env, &env.org, &created).await;
        assert_eq!(
            after["configuration"]["custom.setting"], "kept",
            "[{label}] the refresh's commit undid the PATCH: {after}"
        );
        assert_ne!(
            after["configuration"]["oauth.provider.issued_at"],
            before["configuration"]["oauth.provider.issued_at"],
            "[{label}] the refresh's own keys were merged in"
        );
        assert_eq!(
            after["configuration"]["base.url"], before["configuration"]["base.url"],
            "[{label}]"
        );
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// A revocation while a refresh is between the provider's answer and its commit (held here by
/// a row lock on PostgreSQL) waits for the refresh, then revokes the refresh token the refresh
/// stored: the one it read before revoked the token the provider had just retired, and the new
/// one lived on at the provider while the instance showed as revoked.
#[tokio::test]
async fn a_revocation_during_a_refresh_revokes_the_new_token() {
    let Some((label, url)) = test_databases()
        .await
        .into_iter()
        .find(|(label, _)| label == "postgres")
    else {
        return; // PostgreSQL only: SQLite's one connection serializes the two anyway.
    };
    let env = Env::start(&label, &url).await;
    generic_profile(
        &env,
        json!({"rotateRefreshTokens": true, "refreshReuseGraceSeconds": 0, "revokeGrantOnReuse": false}),
    )
    .await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "revoked-meanwhile")
        .await;
    let id = created["id"].as_i64().unwrap();
    let held = hold_next_token_call(&env, 2_000).await;
    let refreshed_before = refreshes(&env).await;
    let platform = env.org.platform();
    let refresh_path = env.api(&format!("/instances/{id}/tokens/refresh"));
    let revoke_path = env.api(&format!("/instances/{id}/tokens/revoke"));
    let refresh = crate::instances::call(&env, Method::POST, &refresh_path, Some(&platform), None);
    let revoke = async {
        at_the_provider(&env, held).await;
        // The refresh's commit waits on this row lock once the provider has answered.
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut other = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut other).await.unwrap();
        sqlx::query("SELECT id FROM instances WHERE id = $1 FOR UPDATE")
            .bind(id)
            .execute(&mut other)
            .await
            .unwrap();
        eventually("the provider's answer", Duration::from_secs(10), || async {
            (refreshes(&env).await > refreshed_before).then_some(())
        })
        .await;
        let revoking =
            crate::instances::call(&env, Method::POST, &revoke_path, Some(&platform), None);
        let unlock = async {
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
        };
        tokio::join!(revoking, unlock).0
    };
    let (refreshed, revoked) = tokio::join!(refresh, revoke);
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    assert_eq!(revoked.body["valid"], false, "{}", revoked.body);
    // The refresh token the instance holds now is dead at the provider.
    let shown = crate::instances::revealed(&env, &env.org, &created).await;
    let refresh_token = shown["configuration"]["oauth.user.refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    let form = form
        .append_pair("grant_type", "refresh_token")
        .append_pair("refresh_token", &refresh_token)
        .append_pair("client_id", crate::harness::CLIENT_ID)
        .append_pair("client_secret", crate::harness::CLIENT_SECRET)
        .finish();
    let answer = env
        .http
        .post(env.sandbox_url("/generic/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer.status().as_u16(),
        400,
        "the refresh token stored after the revocation still works at the provider"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// `POST …/tokens/refresh` asks the provider now, even while the instance backs off from a
/// transient failure (it answered 503 "waiting before the next" without asking); a wait the
/// provider asked for (a 429) still holds it back.
#[tokio::test]
async fn a_refresh_asked_for_now_does_not_wait_out_a_backoff() {
    let url = sqlite_database();
    let env = Env::start("refresh now", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "impatient")
        .await;
    let id = created["id"].as_i64().unwrap();
    let platform = env.org.platform();
    let path = env.api(&format!("/instances/{id}/tokens/refresh"));
    fault(&env, json!({"target": "token", "status": 503, "count": 1})).await;
    let failed = crate::instances::call(&env, Method::POST, &path, Some(&platform), None).await;
    assert_eq!(failed.status, 503, "{}", failed.body);
    let before = refreshes(&env).await;
    let now = crate::instances::call(&env, Method::POST, &path, Some(&platform), None).await;
    assert_eq!(now.status, 200, "{}", now.body);
    assert_eq!(refreshes(&env).await, before + 1, "the provider was asked");
    // Once in a few seconds: a client retrying on every 503 does not reach a failing provider
    // with each retry.
    fault(&env, json!({"target": "token", "status": 503, "count": 5})).await;
    let failed = crate::instances::call(&env, Method::POST, &path, Some(&platform), None).await;
    assert_eq!(failed.status, 503, "{}", failed.body);
    let asked = stat(&env, &["faultsInjected"]).await;
    let held = crate::instances::call(&env, Method::POST, &path, Some(&platform), None).await;
    assert_eq!(held.status, 503, "{}", held.body);
    assert_eq!(
        stat(&env, &["faultsInjected"]).await,
        asked,
        "the provider was asked again at once"
    );
    clear_faults(&env).await;
    tokio::time::sleep(Duration::from_millis(5_100)).await;
    let later = crate::instances::call(&env, Method::POST, &path, Some(&platform), None).await;
    assert_eq!(later.status, 200, "{}", later.body);
    // A 429's wait is the provider's: still waited out.
    fault(
        &env,
        json!({"target": "token", "status": 429, "count": 1, "retryAfter": 60}),
    )
    .await;
    let limited = crate::instances::call(&env, Method::POST, &path, Some(&platform), None).await;
    assert_eq!(limited.status, 503, "{}", limited.body);
    let asked = stat(&env, &["token", "refresh_token"]).await;
    let again = crate::instances::call(&env, Method::POST, &path, Some(&platform), None).await;
    assert_ne!(again.status, 200, "{}", again.body);
    assert_eq!(
        stat(&env, &["token", "refresh_token"]).await,
        asked,
        "the provider was not asked again"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A refresh whose instance another replica invalidated as "refresh interrupted" meanwhile (it
/// took the refresh over when the lease ran out and presented the refresh token this one had
/// just used) commits after all: the instance is valid again, and says so with an event of
/// its own. Before, `instance.invalidated` was the last word a webhook heard of it.
#[tokio::test]
async fn a_late_commit_that_revives_an_instance_announces_it() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let created = env
            .create_instance(&env.org, "sandbox-generic", "revived")
            .await;
        let id = created["id"].as_i64().unwrap();
        let store = tokenwarden::store::Store::connect(&url).await.unwrap();
        // Held long enough for the invalidation to land meanwhile on a loaded machine.
        let held = hold_next_token_call(&env, 4_000).await;
        let platform = env.org.platform();
        let refresh_path = env.api(&format!("/instances/{id}/tokens/refresh"));
        let refresh =
            crate::instances::call(&env, Method::POST, &refresh_path, Some(&platform), None);
        let interrupt = async {
            at_the_provider(&env, held).await;
            let row = store.get_instance_by_id(id).await.unwrap().unwrap();
            assert!(
                store
                    .mark_invalid(
                        id,
                        "refresh interrupted: the provider no longer accepts the refresh token (invalid_grant: used)",
                        None,
                        None,
                        Some(row.token_version),
                        false,
                    )
                    .await
                    .unwrap()
            );
        };
        let (refreshed, ()) = tokio::join!(refresh, interrupt);
        assert_eq!(refreshed.status, 200, "[{label}] {}", refreshed.body);
        let shown = instance(&env, &env.server.url, created["token"].as_str().unwrap()).await;
        assert_eq!(shown["valid"], true, "[{label}] {shown}");
        let events_path = env.api(&format!("/events?instanceId={id}"));
        let revival = eventually("the revival's event", Duration::from_secs(5), || async {
            let (_, body) = env.get_json(&events_path, &platform).await;
            body["events"]
                .as_array()
                .and_then(|events| events.iter().find(|e| e["type"] == "instance.recovered"))
                .cloned()
        })
        .await;
        let reason = revival["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("valid again") && reason.contains("invalid_grant: used"),
            "[{label}] {revival}"
        );
        store.close().await;
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// The same late commit against a provider that ended the whole grant when the retired refresh
/// token was presented (reuse detection): the tokens the late refresh brought are dead too, so
/// the instance is not made valid on them. It was: `valid: true` and `instance.recovered` on
/// revoked tokens, until the next call found out (a black-box tester, with a replica paused
/// past its lease). The connector's verification call tells.
#[tokio::test]
async fn a_late_commit_of_tokens_the_provider_ended_does_not_revive() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let created = env
            .create_instance(&env.org, "sandbox-generic", "unrevived")
            .await;
        let id = created["id"].as_i64().unwrap();
        let store = tokenwarden::store::Store::connect(&url).await.unwrap();
        let held = hold_next_token_call(&env, 4_000).await;
        // What the provider answers the tokens of the late refresh: refused.
        fault(&env, json!({"target": "api", "status": 401, "count": 1})).await;
        let platform = env.org.platform();
        let refresh_path = env.api(&format!("/instances/{id}/tokens/refresh"));
        let refresh =
            crate::instances::call(&env, Method::POST, &refresh_path, Some(&platform), None);
        let interrupt = async {
            at_the_provider(&env, held).await;
            let row = store.get_instance_by_id(id).await.unwrap().unwrap();
            assert!(
                store
                    .mark_invalid(
                        id,
                        "refresh interrupted: the provider no longer accepts the refresh token (invalid_grant: used)",
                        None,
                        None,
                        Some(row.token_version),
                        false,
                    )
                    .await
                    .unwrap()
            );
        };
        let (refreshed, ()) = tokio::join!(refresh, interrupt);
        assert_eq!(refreshed.status, 409, "[{label}] {}", refreshed.body);
        let (_, shown) = env
            .get_json(&env.api(&format!("/instances/{id}")), &platform)
            .await;
        assert_eq!(shown["valid"], false, "[{label}] {shown}");
        assert!(
            shown["stateReason"]
                .as_str()
                .unwrap_or_default()
                .contains("refuses the tokens"),
            "[{label}] {shown}"
        );
        let (_, body) = env
            .get_json(&env.api(&format!("/events?instanceId={id}")), &platform)
            .await;
        let events = body["events"].as_array().unwrap();
        assert!(
            !events.iter().any(|e| e["type"] == "instance.recovered"),
            "[{label}] {body}"
        );
        // Newest first: the last word is the invalidation.
        assert_eq!(
            events[0]["type"], "instance.invalidated",
            "[{label}] {body}"
        );
        store.close().await;
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// A strict rotating provider's refresh while `disturb` (given the held token call) makes the
/// store fail once the refresh is at the provider: the call still answers 200, the next call
/// needs no refresh, and no refresh token went to the provider twice.
async fn rotated_tokens_outlast<F, Fut>(env: &Env, disturb: F)
where
    F: FnOnce(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    generic_profile(env, strict_rotation()).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "disturbed")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    expire_access_tokens(env).await;
    let held = hold_next_token_call(env, 1_000).await;
    let call = proxy_at(
        env,
        &env.server.url,
        &env.org,
        &token,
        Method::GET,
        "api/me",
    );
    let ((status, body, _), ()) = tokio::join!(call, disturb(held));
    assert_eq!(status, 200, "the call waited for the commit: {body}");
    let (status, body, _) = proxy_at(
        env,
        &env.server.url,
        &env.org,
        &token,
        Method::GET,
        "api/me",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(refreshes(env).await, 1, "no second refresh");
    assert_eq!(stat(env, &["tokenErrors"]).await, 0, "no reuse");
}

/// A store that fails the commit of rotated tokens for a while (here SQLite's file locked by
/// another writer for longer than a commit's two busy timeouts, batch and alone) does not lose
/// them: the commit is tried again, so the strict provider's grant lives on and the next call
/// works without another refresh. Without the retry the call failed, and the next refresh
/// presented the retired refresh token, which killed the grant.
#[tokio::test]
async fn a_failing_commit_of_rotated_tokens_is_tried_again() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    rotated_tokens_outlast(&env, |held| {
        let (env, url) = (&env, &url);
        async move {
            // Once the refresh is at the provider (its lease taken), another writer holds the
            // file.
            at_the_provider(env, held).await;
            use sqlx::Connection;
            sqlx::any::install_default_drivers();
            let mut other = sqlx::AnyConnection::connect(url).await.unwrap();
            sqlx::query("BEGIN EXCLUSIVE")
                .execute(&mut other)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(11_500)).await;
            sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
        }
    })
    .await;
    env.stop().await;
    drop_test_database(&url).await;
}

/// A connector changed under its instance (a new release's definition, an operator's edit) so
/// that its token endpoint needs an input the instance lacks: a refresh cannot be made, which
/// is the configuration's fault, not the provider's and not the grant's. "Refresh now" answers
/// 409 naming the input (it answered 500), the instance stays valid, the organization hears
/// `instance.refresh_failing`, and calls keep serving with the token the instance has.
#[tokio::test]
async fn a_connector_that_no_longer_fits_its_instance_answers_409() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    register_connector(&env, "changed", json!({"refresh": {"strategy": "on_401"}})).await;
    let created = env.create_instance(&env.org, "changed", "moved").await;
    let (id, token) = (
        created["id"].as_i64().unwrap(),
        created["token"].as_str().unwrap().to_string(),
    );
    let store = &env.server.app.store;
    let stored = store
        .get_connector(env.org.id, "changed")
        .await
        .unwrap()
        .unwrap();
    let mut definition: Value = serde_json::from_str(&stored.definition).unwrap();
    let token_url = definition["oauth"]["tokenUrl"]
        .as_str()
        .unwrap()
        .to_string();
    definition["oauth"]["tokenUrl"] = json!(format!("{token_url}?tenant={{tenant}}"));
    definition["inputs"] = json!({"tenant": {"description": "the tenant"}});
    assert!(
        store
            .update_connector(env.org.id, "changed", &definition.to_string(), 0)
            .await
            .unwrap()
    );

    let refreshed = crate::instances::call(
        &env,
        Method::POST,
        &env.api(&format!("/instances/{id}/tokens/refresh")),
        Some(&env.org.platform()),
        None,
    )
    .await;
    assert_eq!(refreshed.status, 409, "{}", refreshed.body);
    let message = refreshed.body["message"].as_str().unwrap();
    assert!(message.contains("{tenant}"), "{message}");
    assert_eq!(refreshes(&env).await, 0);
    let now = instance(&env, &env.server.url, &token).await;
    assert_eq!(now["valid"], true, "{now}");
    assert!(
        now["lastRefreshFailure"]
            .as_str()
            .unwrap()
            .contains("{tenant}"),
        "{now}"
    );
    let events = event_types(&env, &env.server.url, id).await;
    assert_eq!(count(&events, "instance.refresh_failing"), 1, "{events:?}");
    assert_eq!(count(&events, "instance.invalidated"), 0, "{events:?}");
    let (status, body, _) = proxy_at(
        &env,
        &env.server.url,
        &env.org,
        &token,
        Method::GET,
        "api/me",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// PostgreSQL unreachable for longer than a few retries (a failover: here every connection to
/// the test's database is cut, again and again, for 8 s) while rotated tokens wait for their
/// commit: the commit is tried again until the database is back, so the strict provider's grant
/// lives on. It was given up after four tries over about 4 s, and the next refresh presented
/// the retired refresh token.
#[tokio::test]
async fn rotated_tokens_wait_for_a_database_failing_over() {
    let Ok(url) = create_postgres_database().await else {
        panic!("PostgreSQL is needed for this test (.ci/run starts it)");
    };
    let env = Env::start("postgres", &url).await;
    rotated_tokens_outlast(&env, |held| {
        let (env, url) = (&env, &url);
        async move {
            at_the_provider(env, held).await;
            use sqlx::Connection;
            let database = url.rsplit('/').next().unwrap().to_string();
            let mut admin = sqlx::PgConnection::connect(url).await.unwrap();
            let until = Instant::now() + Duration::from_secs(8);
            let mut cut = 0;
            while Instant::now() < until {
                cut += sqlx::query_scalar::<_, bool>(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(&database)
                .fetch_all(&mut admin)
                .await
                .unwrap()
                .len();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(cut > 0, "no connection was cut");
        }
    })
    .await;
    env.stop().await;
    drop_test_database(&url).await;
}

/// A connection to the PostgreSQL server of test database `url`, outside that database.
async fn admin_connection(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    let (server, _) = url.rsplit_once('/').unwrap();
    sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap()
}

/// The `application_name` of a test's own connections that [`outage_begins`] spares.
const SPARED: &str = "tw-test-spared";

fn allow_connections(url: &str, yes: bool) -> String {
    let (_, database) = url.rsplit_once('/').unwrap();
    format!("ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS {yes}")
}

/// Test database `url` takes no new connection, and those it had are cut, except the open
/// ones named [`SPARED`]: a test plays another replica through them during the outage.
async fn outage_begins(admin: &mut sqlx::PgConnection, url: &str) {
    let (_, database) = url.rsplit_once('/').unwrap();
    sqlx::query(sqlx::AssertSqlSafe(allow_connections(url, false)))
        .execute(&mut *admin)
        .await
        .unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name <> $2",
    )
    .bind(database)
    .bind(SPARED)
    .execute(&mut *admin)
    .await
    .unwrap();
}

async fn outage_ends(admin: &mut sqlx::PgConnection, url: &str) {
    sqlx::query(sqlx::AssertSqlSafe(allow_connections(url, true)))
        .execute(&mut *admin)
        .await
        .unwrap();
}

/// Test database `url` takes no connection for `lasting`, and those it had are cut.
async fn database_outage(admin: &mut sqlx::PgConnection, url: &str, lasting: Duration) {
    outage_begins(admin, url).await;
    tokio::time::sleep(lasting).await;
    outage_ends(admin, url).await;
}

/// A connection to test database `url` itself.
async fn admin_of(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url).await.unwrap()
}

/// Waits (up to `limit`) until a proxied call through the instance of Element token `token`
/// answers 200: the tokens kept through an outage were stored, and serve.
async fn kept_tokens_serve(env: &Env, token: &str, limit: Duration) {
    eventually("the kept tokens to serve", limit, || async {
        let (status, _, _) =
            proxy_at(env, &env.server.url, &env.org, token, Method::GET, "api/me").await;
        (status == 200).then_some(())
    })
    .await;
}

/// A test database on PostgreSQL, a service whose commit of rotated tokens is tried for 2 s
/// while its caller waits and kept for a minute after, its generic profile rotating strictly
/// when `strict`, and an instance named `name` there: (url, env, the instance).
async fn kept_tokens_env(strict: bool, name: &str) -> (String, Env, Value) {
    kept_tokens_env_reached(strict, name, Duration::from_secs(2), |url| url.to_string()).await
}

/// [`kept_tokens_env`], the commit tried for `commit_retry_for`, the service reaching the test
/// database at the URL `reached` makes of its own (through a proxy).
async fn kept_tokens_env_reached(
    strict: bool,
    name: &str,
    commit_retry_for: Duration,
    reached: impl FnOnce(&str) -> String,
) -> (String, Env, Value) {
    let Ok(url) = create_postgres_database().await else {
        panic!("PostgreSQL is needed for this test (.ci/run starts it)");
    };
    let env = Env::start_adjusted("postgres", &reached(&url), |config| {
        config.commit_retry_for = commit_retry_for;
        config.rotated_tokens_kept_for = Duration::from_secs(60);
    })
    .await;
    if strict {
        generic_profile(&env, strict_rotation()).await;
    }
    let created = env.create_instance(&env.org, "sandbox-generic", name).await;
    (url, env, created)
}

/// PostgreSQL unreachable for longer than the commit of rotated tokens is tried while its caller
/// waits (here 2 s; by default 30 s): the caller is answered 503, the tokens are kept, and
/// their commit goes on being tried until the database is back, so the strict provider's grant
/// lives on and the next call works without another refresh. They were given up, and the next
/// refresh presented the retired refresh token.
#[tokio::test]
async fn rotated_tokens_outlive_the_callers_wait_for_the_database() {
    let (url, env, created) = kept_tokens_env(true, "outlived").await;
    let token = created["token"].as_str().unwrap().to_string();
    expire_access_tokens(&env).await;
    // Connected before the call: the outage must begin while the provider holds its answer,
    // on a loaded machine too.
    let mut admin = admin_connection(&url).await;
    let held = hold_next_token_call(&env, 2_000).await;
    let healthz = format!("{}/healthz", env.server.url);
    // The call, then the health check while the outage lasts.
    let call = async {
        let answer = proxy_at(
            &env,
            &env.server.url,
            &env.org,
            &token,
            Method::GET,
            "api/me",
        )
        .await;
        (answer, env.get_json(&healthz, "").await)
    };
    // The database takes no connection for 10 s, and those it had are cut: past the commit's
    // 2 s of tries, the pause before its last one, and the health check after the answer.
    let outage = async {
        at_the_provider(&env, held).await;
        database_outage(&mut admin, &url, Duration::from_secs(10)).await;
    };
    let (((status, body, _), (health_status, health)), ()) = tokio::join!(call, outage);
    assert_eq!(
        status, 503,
        "the caller did not wait for the database: {body}"
    );
    // The health check says the tokens are kept: a restart now would lose them.
    assert_eq!(health_status, 503, "{health}");
    assert_eq!(health["status"], "unavailable", "{health}");
    assert_eq!(health["keptTokens"], 1, "{health}");
    // The database is back: the kept tokens are stored, and they serve.
    kept_tokens_serve(&env, &token, Duration::from_secs(20)).await;
    assert_eq!(refreshes(&env).await, 1, "no second refresh");
    assert_eq!(stat(&env, &["tokenErrors"]).await, 0, "no reuse");
    let (health_status, health) = env.get_json(&healthz, "").await;
    assert_eq!(health_status, 200, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["keptTokens"], 0, "{health}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// A TCP proxy in front of PostgreSQL at `target` (HAProxy, cloud-sql-proxy) that, while
/// `cut` is set, takes each connection and closes it at once, and has cut the ones it carried.
async fn cutting_proxy(
    target: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::net::SocketAddr {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let carried: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            std::sync::Arc::default();
        let watcher = (std::sync::Arc::clone(&cut), std::sync::Arc::clone(&carried));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if watcher.0.load(Ordering::SeqCst) {
                    for task in watcher.1.lock().unwrap().drain(..) {
                        task.abort();
                    }
                }
            }
        });
        while let Ok((mut inbound, _)) = listener.accept().await {
            if cut.load(Ordering::SeqCst) {
                drop(inbound);
                continue;
            }
            let task = tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
            carried.lock().unwrap().push(task.abort_handle());
        }
    });
    address
}

/// The same through a proxy that takes connections and closes them (the database's TLS request
/// answered by nothing): that was taken for the database refusing the tokens, and they were
/// dropped (the strict provider's grant then died).
#[tokio::test]
async fn rotated_tokens_are_kept_through_a_proxy_that_closes_connections() {
    use std::sync::atomic::Ordering;
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let target: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = cutting_proxy(target, std::sync::Arc::clone(&cut)).await;
    let (url, env, created) =
        kept_tokens_env_reached(true, "proxied", Duration::from_secs(6), |url| {
            let proxied = url.replacen("127.0.0.1:5432", &proxy.to_string(), 1);
            assert_ne!(
                proxied, url,
                "the test database is not on 127.0.0.1:5432: {url}"
            );
            proxied
        })
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    expire_access_tokens(&env).await;
    let held = hold_next_token_call(&env, 2_000).await;
    let call = proxy_at(
        &env,
        &env.server.url,
        &env.org,
        &token,
        Method::GET,
        "api/me",
    );
    let healthz = format!("{}/healthz", env.server.url);
    let outage = async {
        at_the_provider(&env, held).await;
        cut.store(true, Ordering::SeqCst);
        // The provider answers 2 s into the outage; its tokens' write is then tried for 6 s
        // while the caller waits: a restart now would lose them, and the health says so.
        tokio::time::sleep(Duration::from_millis(4_500)).await;
        let (_, health) = env.get_json(&healthz, "").await;
        tokio::time::sleep(Duration::from_millis(7_500)).await;
        cut.store(false, Ordering::SeqCst);
        health
    };
    let ((status, body, _), health) = tokio::join!(call, outage);
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        health["keptTokens"], 1,
        "while their write is tried: {health}"
    );
    kept_tokens_serve(&env, &token, Duration::from_secs(20)).await;
    assert_eq!(refreshes(&env).await, 1, "no second refresh");
    assert_eq!(stat(&env, &["tokenErrors"]).await, 0, "no reuse");
    env.stop().await;
    drop_test_database(&url).await;
}

/// A stop (SIGTERM) while rotated tokens are kept for a database that is down waits for the
/// database to take them: they were dropped at once, and the strict provider's grant died at
/// the next refresh, which presented the refresh token it had retired.
#[tokio::test]
async fn a_stop_waits_for_the_database_to_take_kept_tokens() {
    let (url, env, created) = kept_tokens_env(true, "kept at the stop").await;
    let token = created["token"].as_str().unwrap().to_string();
    expire_access_tokens(&env).await;
    let mut admin = admin_connection(&url).await;
    let held = hold_next_token_call(&env, 2_000).await;
    let call = proxy_at(
        &env,
        &env.server.url,
        &env.org,
        &token,
        Method::GET,
        "api/me",
    );
    let outage = async {
        at_the_provider(&env, held).await;
        outage_begins(&mut admin, &url).await;
    };
    let ((status, body, _), ()) = tokio::join!(call, outage);
    assert_eq!(status, 503, "the tokens were not kept: {body}");
    assert_eq!(env.server.app.refresh.kept_instances().len(), 1);
    let Env {
        label,
        database_url,
        sandbox,
        server,
        http,
        org,
    } = env;
    let stopping = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !stopping.is_finished(),
        "the stop did not wait for the kept tokens"
    );
    outage_ends(&mut admin, &url).await;
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the stop ends once the tokens are stored")
        .unwrap();
    // Another process: the stored refresh token is the one the provider issued last.
    let server = start_server(&url, &sandbox.url, |_| {}).await;
    let env = Env {
        label,
        database_url,
        sandbox,
        server,
        http,
        org,
    };
    expire_access_tokens(&env).await;
    let (status, body, _) = proxy_at(
        &env,
        &env.server.url,
        &env.org,
        &token,
        Method::GET,
        "api/me",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(refreshes(&env).await, 2);
    assert_eq!(stat(&env, &["tokenErrors"]).await, 0, "no reuse");
    env.stop().await;
    drop_test_database(&url).await;
}

/// The late commit of `a_late_commit_of_tokens_the_provider_ended_does_not_revive`, made by
/// the tokens kept while PostgreSQL was unreachable rather than by the refresh itself: once
/// stored, they too are checked by the connector's verification call, and the instance that
/// another replica invalidated meanwhile is not made valid on tokens the provider refuses.
#[tokio::test]
async fn kept_tokens_the_provider_ended_do_not_revive_once_stored() {
    let (url, env, created) = kept_tokens_env(false, "kept, unrevived").await;
    let id = created["id"].as_i64().unwrap();
    let token = created["token"].as_str().unwrap().to_string();
    expire_access_tokens(&env).await;
    // Connected before the call, and spared by the outage: only the outage's beginning must
    // come while the provider holds its answer; the other replica's invalidation comes during
    // the outage, before the kept tokens can be stored.
    let store = tokenwarden::store::Store::connect(&format!("{url}?application_name={SPARED}"))
        .await
        .unwrap();
    let row = store.get_instance_by_id(id).await.unwrap().unwrap();
    let mut admin = admin_connection(&url).await;
    let held = hold_next_token_call(&env, 2_500).await;
    let call = proxy_at(
        &env,
        &env.server.url,
        &env.org,
        &token,
        Method::GET,
        "api/me",
    );
    // While the provider answers, the database takes no connection for 10 s; during it, another
    // replica invalidates the instance ("refresh interrupted"), and the provider will refuse
    // the new tokens.
    let outage_then_interrupt = async {
        at_the_provider(&env, held).await;
        outage_begins(&mut admin, &url).await;
        let started = tokio::time::Instant::now();
        assert!(
            store
                .mark_invalid(
                    id,
                    "refresh interrupted: the provider no longer accepts the refresh token (invalid_grant: used)",
                    None,
                    None,
                    Some(row.token_version),
                    false,
                )
                .await
                .unwrap()
        );
        store.close().await;
        fault(&env, json!({"target": "api", "status": 401, "count": 1})).await;
        // Past the commit's 2 s of tries and the pause before its last one: a try made
        // once the database is back stored the tokens, and the caller was answered 401.
        tokio::time::sleep_until(started + Duration::from_secs(10)).await;
        outage_ends(&mut admin, &url).await;
    };
    let ((status, body, _), ()) = tokio::join!(call, outage_then_interrupt);
    assert_eq!(status, 503, "the tokens were not kept: {body}");
    // The database is back: the kept tokens are stored, refused, and the instance is invalid
    // again, the invalidation its last word.
    let platform = env.org.platform();
    let shown = eventually(
        "the kept tokens to be stored and refused",
        Duration::from_secs(20),
        || async {
            let (status, shown) = env
                .get_json(&env.api(&format!("/instances/{id}")), &platform)
                .await;
            (status == 200
                && shown["stateReason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("refuses the tokens")))
            .then_some(shown)
        },
    )
    .await;
    assert_eq!(shown["valid"], false, "{shown}");
    assert_eq!(
        stat(&env, &["api", "unauthorized"]).await,
        1,
        "verified once"
    );
    let (_, body) = env
        .get_json(&env.api(&format!("/events?instanceId={id}")), &platform)
        .await;
    let events = body["events"].as_array().unwrap();
    assert_eq!(events[0]["type"], "instance.invalidated", "{body}");
    let (status, body, _) = proxy_at(
        &env,
        &env.server.url,
        &env.org,
        &token,
        Method::GET,
        "api/me",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// A refresh that timed out at a provider that rotates refresh tokens: the provider may have
/// retired the stored refresh token meanwhile, so its refusal of that token next reads as the
/// interruption's doing, "refresh interrupted", with the refusal's words; it read as the
/// provider's words alone, as if the user had revoked the app. A passing failure in between
/// does not lose it.
#[tokio::test]
async fn a_refusal_after_a_refresh_timed_out_reads_as_interrupted() {
    let url = sqlite_database();
    let env = Env::start_adjusted("sqlite", &url, |config| {
        config.provider_timeout = Duration::from_secs(1);
    })
    .await;
    generic_profile(&env, strict_rotation()).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "timed out")
        .await;
    let id = created["id"].as_i64().unwrap();
    let token = created["token"].as_str().unwrap().to_string();
    let platform = env.org.platform();
    let path = env.api(&format!("/instances/{id}/tokens/refresh"));
    // Answered after the timeout: the provider rotates, nobody reads it. Then a 503 for the
    // next attempt (the scheduler's, or one asked for), queued now: the scheduler's retry may
    // come before anything here could queue it.
    fault(
        &env,
        json!({"target": "token", "status": 0, "delayMs": 1_800, "count": 1, "answerLate": true}),
    )
    .await;
    fault(&env, json!({"target": "token", "status": 503, "count": 1})).await;
    let failed = crate::instances::call(&env, Method::POST, &path, Some(&platform), None).await;
    assert_eq!(failed.status, 503, "{}", failed.body);
    eventually(
        "the provider to rotate",
        Duration::from_secs(10),
        || async { (refreshes(&env).await == 1).then_some(()) },
    )
    .await;
    let shown = instance(&env, &env.server.url, &token).await;
    assert_eq!(shown["valid"], true, "{shown}");
    assert!(
        shown["lastRefreshFailure"]
            .as_str()
            .unwrap_or_default()
            .ends_with(tokenwarden::refresh::OUTCOME_UNKNOWN_TEXT),
        "{shown}"
    );
    // Then the retired refresh token is refused.
    let refused = eventually("the refusal", Duration::from_secs(20), || async {
        let answer = crate::instances::call(&env, Method::POST, &path, Some(&platform), None).await;
        (answer.status == 409
            && answer.body["message"]
                .as_str()
                .is_some_and(|message| message.contains("re-authentication")))
        .then_some(answer.body)
    })
    .await;
    assert_eq!(stat(&env, &["faultsInjected"]).await, 2, "the 503 was met");
    let shown = instance(&env, &env.server.url, &token).await;
    assert_eq!(shown["valid"], false, "{shown}");
    let reason = shown["stateReason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("refresh interrupted") && reason.contains("invalid_grant"),
        "{shown} {refused}"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A caller that hangs up while its code is being exchanged does not cancel the creation: the
/// provider issues tokens for a single-use code, and they are stored (the creation was cut,
/// the grant lived on at the provider with nobody holding its tokens, and a retry found the
/// code used).
#[tokio::test]
async fn a_caller_hanging_up_does_not_cancel_a_creation() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let (code, state) = env
        .authorize(&env.org, "sandbox-generic", "impatient")
        .await;
    fault(
        &env,
        json!({"target": "token", "status": 0, "delayMs": 1_500, "count": 1}),
    )
    .await;
    let impatient = env
        .http
        .post(env.api("/instances"))
        .header("authorization", env.org.platform())
        .json(&json!({"element": {"key": "sandbox-generic"},
                      "providerData": {"code": code, "state": state},
                      "configuration": env.configuration(), "name": "impatient"}))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(impatient.is_err(), "the caller gave up");
    let listed = eventually("the creation to end", Duration::from_secs(15), || async {
        let (status, body) = env
            .get_json(&env.api("/instances"), &env.org.platform())
            .await;
        assert_eq!(status, 200, "{body}");
        (body.as_array().unwrap().len() == 1).then_some(body)
    })
    .await;
    assert_eq!(listed[0]["name"], "impatient", "{listed}");
    assert_eq!(listed[0]["valid"], true, "{listed}");
    assert_eq!(stat(&env, &["token", "authorization_code"]).await, 1);
    env.stop().await;
    drop_test_database(&url).await;
}

/// A caller that hangs up while the refresh is at the provider does not cancel it: the rotated
/// token is committed anyway, so the strict provider's grant lives on and the next call works
/// without another refresh.
#[tokio::test]
async fn a_caller_hanging_up_does_not_cancel_the_refresh() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        generic_profile(&env, strict_rotation()).await;
        let created = env
            .create_instance(&env.org, "sandbox-generic", "hangup")
            .await;
        let token = created["token"].as_str().unwrap().to_string();
        expire_access_tokens(&env).await;
        fault(
            &env,
            json!({"target": "token", "status": 0, "delayMs": 1_500, "count": 1}),
        )
        .await;
        let impatient = env
            .http
            .get(env.api("/proxy/api/me"))
            .header("authorization", env.org.through(&token))
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        assert!(impatient.is_err(), "[{label}] the caller gave up");
        eventually("the refresh to commit", Duration::from_secs(15), || async {
            let shown = instance(&env, &env.server.url, &token).await;
            (refreshes(&env).await == 1 && shown["lastRefreshDate"] != created["lastRefreshDate"])
                .then_some(())
        })
        .await;
        let (status, body, _) = proxy_at(
            &env,
            &env.server.url,
            &env.org,
            &token,
            Method::GET,
            "api/me",
        )
        .await;
        assert_eq!(status, 200, "[{label}] {body}");
        assert_eq!(refreshes(&env).await, 1, "[{label}] no second refresh");
        assert_eq!(stat(&env, &["tokenErrors"]).await, 0, "[{label}] no reuse");
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// A PATCH that lands while a re-authentication is at the provider (its exchange takes
/// seconds) stays: the re-authentication wrote a configuration merged from the row it read
/// before, and put back what the PATCH had changed. It now writes only over the row as read,
/// and otherwise merges again with the tokens it got.
#[tokio::test]
async fn a_patch_during_a_reauthentication_stays() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "rhea")
        .await;
    let instance = format!("/instances/{}", created["id"]);
    let before = crate::instances::revealed(&env, &env.org, &created).await["configuration"]
        ["oauth.user.token"]
        .clone();
    let (code, state) = env.authorize(&env.org, "sandbox-generic", "rhea").await;
    let held = hold_next_token_call(&env, 2_000).await;
    let reauthenticate = env
        .http
        .patch(env.api(&instance))
        .header("authorization", env.org.platform())
        .json(&json!({"providerData": {"code": code, "state": state}}))
        .send();
    let reauthenticating = tokio::spawn(reauthenticate);
    at_the_provider(&env, held).await;
    let patched = env
        .http
        .patch(env.api(&instance))
        .header("authorization", env.org.platform())
        .json(&json!({"configuration": {"custom.setting": "set meanwhile"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let reauthenticated = reauthenticating.await.unwrap().unwrap();
    assert_eq!(reauthenticated.status(), 200);
    let shown: Value = reauthenticated.json().await.unwrap();
    assert_eq!(
        shown["configuration"]["custom.setting"], "set meanwhile",
        "{shown}"
    );
    assert_ne!(
        crate::instances::revealed(&env, &env.org, &created).await["configuration"]["oauth.user.token"],
        before,
        "the re-authentication's token is the instance's"
    );
    env.stop().await;
}

/// A refresh that takes over its own scheduler's claim tells the claim so: the claim read the
/// engine's epoch after that refresh had begun, and, finding it unchanged, went to the
/// provider with its row as claimed, without the lease the refresh had given back and
/// through the backoff the refresh's transient failure had just set: the same refresh token
/// twice, the second unleased, while another replica could present it too.
#[tokio::test]
async fn a_claim_taken_over_by_a_refresh_is_read_again() {
    use tokenwarden::refresh::{Claimed, LEASE_MS};
    let url = sqlite_database();
    let env = env_without_background(&url).await;
    let app = env.server.app.clone();
    let created = env
        .create_instance(&env.org, "sandbox-generic", "claimed")
        .await;
    let id = created["id"].as_i64().unwrap();
    let version = app
        .store
        .get_instance_by_id(id)
        .await
        .unwrap()
        .unwrap()
        .token_version;
    // Another replica refreshes: the call's refresh waits for its lease.
    let now = tokenwarden::app::now_ms();
    app.store
        .try_acquire_refresh_lease(id, "other", now, now + LEASE_MS, true)
        .await
        .unwrap()
        .expect("the lease");
    let waiting = {
        let app = app.clone();
        tokio::spawn(async move { app.refresh.refresh(&app, id, Some(version), None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Our scheduler's claim, after the refresh began: it reads the epoch, then the lease
    // passes to this replica in one write.
    let epoch = app.refresh.epoch();
    fault(&env, json!({"target": "token", "status": 503, "count": 1})).await;
    let claimed_until = tokenwarden::app::now_ms() + LEASE_MS;
    {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut connection = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query(
            "UPDATE instances SET refresh_lease_owner = $1, refresh_lease_until = $2, \
             refresh_in_flight_since = NULL WHERE id = $3",
        )
        .bind(app.replica_id.clone())
        .bind(claimed_until)
        .bind(id)
        .execute(&mut connection)
        .await
        .unwrap();
    }
    let row = app.store.get_instance_by_id(id).await.unwrap().unwrap();
    // The waiting refresh takes the claim over and meets the provider's 503.
    let first = waiting.await.unwrap();
    assert!(first.is_err(), "the 503 is a failure");
    assert_eq!(
        stat(&env, &["faultsInjected"]).await,
        1,
        "the refresh met the 503"
    );
    assert_eq!(refreshes(&env).await, 0);
    // Then the claim's turn: the backoff holds, and the provider sees nothing more.
    let second = app
        .refresh
        .refresh(&app, id, Some(version), Some(Claimed { row, epoch }))
        .await;
    assert!(second.is_err(), "the backoff holds the claim back");
    assert_eq!(
        refreshes(&env).await,
        0,
        "no second presentation of the refresh token"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A refresh whose answer keeps the refresh token and says nothing of its life (Adobe Sign's
/// shape) keeps what the exchange said of it, counted again from this use (such tokens die of
/// inactivity): the keep-alive before it dies stays on the schedule. The expiry was dropped, and an `on_401` instance without calls had
/// nothing scheduled until its refresh token died.
#[tokio::test]
async fn a_kept_refresh_token_keeps_its_known_expiry() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    generic_profile(
        &env,
        json!({"refreshTokenIdleTtlSeconds": 864_000, "omitRefreshTokenOnRefresh": true,
               "refreshTokenExpiresInField": "refresh_token_expires_in"}),
    )
    .await;
    register_connector(&env, "t-kept", json!({"refresh": {"strategy": "on_401"}})).await;
    let created = env.create_instance(&env.org, "t-kept", "keeper").await;
    let id = created["id"].as_i64().unwrap();
    let token = created["token"].as_str().unwrap();
    let row = |env: &Env| {
        let app = env.server.app.clone();
        async move { app.store.get_instance_by_id(id).await.unwrap().unwrap() }
    };
    let announced = row(&env)
        .await
        .refresh_expires_at
        .expect("the exchange said when it dies");
    assert!(
        row(&env).await.next_due_at.is_some(),
        "a keep-alive before it"
    );

    let refreshed = crate::instances::call(
        &env,
        Method::POST,
        &env.api(&format!("/instances/{id}/tokens/refresh")),
        Some(&env.org.platform()),
        None,
    )
    .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    assert_eq!(refreshes(&env).await, 1);
    let after = row(&env).await;
    // The token dies of inactivity: its life counts again from this use.
    let kept = after.refresh_expires_at.expect("an expiry still known");
    assert!(kept >= announced, "{kept} < {announced}");
    assert!(
        after.next_due_at.is_some(),
        "the keep-alive stays scheduled"
    );
    let view = instance(&env, &env.server.url, token).await;
    assert!(view["refreshTokenExpiresDate"].is_string(), "{view}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// A token's life counts from when the refresh went out, not from the provider's slow answer:
/// counted from the answer, a token could be taken for fresh up to a provider timeout after
/// it expired.
#[tokio::test]
async fn a_slow_answer_does_not_lengthen_the_tokens_life() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "slowpoke")
        .await;
    let id = created["id"].as_i64().unwrap();
    fault(
        &env,
        json!({"target": "token", "status": 0, "delayMs": 2_000, "count": 1}),
    )
    .await;
    let before = tokenwarden::app::now_ms();
    let refreshed = crate::instances::call(
        &env,
        Method::POST,
        &env.api(&format!("/instances/{id}/tokens/refresh")),
        Some(&env.org.platform()),
        None,
    )
    .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    assert!(
        tokenwarden::app::now_ms() >= before + 2_000,
        "the answer was held"
    );
    let row = env
        .server
        .app
        .store
        .get_instance_by_id(id)
        .await
        .unwrap()
        .unwrap();
    // The sandbox's access tokens live an hour; the request went out within a second.
    let expires = row.access_expires_at.unwrap();
    assert!(
        expires < before + 3_600_000 + 1_000,
        "expires {} ms after an hour from the call",
        expires - before - 3_600_000
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// An instance whose refreshes were failing and whose grant then ended shows no failing streak:
/// `refreshFailingSince` stayed beside `needs_reauthentication`.
#[tokio::test]
async fn an_ended_grant_shows_no_failing_streak() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let server = env.server.url.clone();
    let created = env
        .create_instance(&env.org, "sandbox-generic", "streak")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_i64().unwrap();
    fault(&env, json!({"target": "token", "status": 503, "count": 1})).await;
    let refreshed = env
        .http
        .post(env.api(&format!("/instances/{id}/tokens/refresh")))
        .header("authorization", env.org.platform())
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 503);
    let failing = instance(&env, &server, &token).await;
    assert!(failing["refreshFailingSince"].is_string(), "{failing}");
    let revoked = env
        .http
        .post(env.api(&format!("/instances/{id}/tokens/revoke")))
        .header("authorization", env.org.platform())
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let ended = instance(&env, &server, &token).await;
    assert_eq!(ended["state"], "needs_reauthentication", "{ended}");
    assert!(ended["refreshFailingSince"].is_null(), "{ended}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// A database outage longer than a refresh's lease, while one replica's refresh holds rotated
/// tokens it could not store: another replica asked to refresh the instance as the database
/// comes back leaves that cut refresh to the replica holding its tokens (503), which stores
/// them, and the strict provider's grant lives on. It took the refresh over at once with the
/// retired refresh token, and the provider ended the grant (a tester lost 12 instances of 40 to
/// a 45 s outage).
#[tokio::test]
async fn after_an_outage_a_cut_refresh_is_left_to_the_replica_holding_its_tokens() {
    let (url, env, created) = kept_tokens_env(true, "cut").await;
    let id = created["id"].as_i64().unwrap();
    let token = created["token"].as_str().unwrap().to_string();
    let second = start_server(&url, &env.sandbox.url, |_| {}).await;
    expire_access_tokens(&env).await;
    let mut admin = admin_connection(&url).await;
    let held = hold_next_token_call(&env, 2_000).await;
    let refresh_on_second = || async {
        let response = env
            .http
            .post(format!(
                "{}/elements/api-v2/instances/{id}/tokens/refresh",
                second.url
            ))
            .header("authorization", env.org.platform())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    };
    let call = proxy_at(
        &env,
        &env.server.url,
        &env.org,
        &token,
        Method::GET,
        "api/me",
    );
    let outage = async {
        at_the_provider(&env, held).await;
        // Past the refresh's 10 s lease: both replicas find the database not answering.
        database_outage(&mut admin, &url, Duration::from_secs(14)).await;
        // At once, the other replica is asked to refresh the instance.
        refresh_on_second().await
    };
    let ((status, body, _), (second_status, second_body)) = tokio::join!(call, outage);
    assert_eq!(status, 503, "the tokens were not kept: {body}");
    assert_ne!(second_status, 200, "{second_body}");
    assert_ne!(second_status, 409, "the grant was ended: {second_body}");
    kept_tokens_serve(&env, &token, Duration::from_secs(30)).await;
    // Stored by the replica that held them, the refresh is over: not left marked in flight
    // (recovery would refresh it again, and a later refusal read as "interrupted").
    let in_flight: Option<i64> =
        sqlx::query_scalar("SELECT refresh_in_flight_since FROM instances WHERE id = $1")
            .bind(id)
            .fetch_one(&mut admin_of(&url).await)
            .await
            .unwrap();
    assert_eq!(in_flight, None, "still marked in flight");
    assert_eq!(
        stat(&env, &["tokenErrors"]).await,
        0,
        "a retired refresh token was presented"
    );
    second.shutdown().await;
    env.stop().await;
    drop_test_database(&url).await;
}

/// A statement the database cancels for the role's `statement_timeout` (a table locked by
/// maintenance) is the database not answering just now: 503, as for a lost connection. It was
/// a 500 "internal error", while `/healthz` said ok.
#[tokio::test]
async fn a_statement_timeout_is_a_passing_state_of_the_database() {
    let Ok(url) = create_postgres_database().await else {
        panic!("PostgreSQL is needed for this test (.ci/run starts it)");
    };
    let mut admin = admin_connection(&url).await;
    let (_, database) = url.rsplit_once('/').unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{database}\" SET statement_timeout = '500ms'"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let env = Env::start("postgres", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "timed-out")
        .await;
    let id = created["id"].as_i64().unwrap();
    use sqlx::Connection;
    let mut locker = admin_of(&url).await;
    let mut transaction = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE instances IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *transaction)
        .await
        .unwrap();
    let (status, body) = env
        .get_json(&env.api(&format!("/instances/{id}")), &env.org.platform())
        .await;
    assert_eq!(status, 503, "{body}");
    transaction.rollback().await.unwrap();
    let (status, body) = env
        .get_json(&env.api(&format!("/instances/{id}")), &env.org.platform())
        .await;
    assert_eq!(status, 200, "{body}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// The instance `created` still works: no retired refresh token was presented since the
/// sandbox counted `refused_before` refusals, and a call through it answers 200.
async fn grant_lives(env: &Env, created: &Value, refused_before: u64) {
    assert_eq!(
        stat(env, &["tokenErrors"]).await,
        refused_before,
        "the retired refresh token was presented again"
    );
    let token = created["token"].as_str().unwrap();
    let (status, body, _) =
        proxy_at(env, &env.server.url, &env.org, token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "{body}");
}

/// Hands instance `id`'s refresh lease to `owner` until `until`, as another replica's claim
/// or hold of it would (the lease of the refresh under way having run out).
async fn lease_to(url: &str, id: i64, owner: &str, until: i64) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut connection = sqlx::AnyConnection::connect(url).await.unwrap();
    sqlx::query(
        "UPDATE instances SET refresh_lease_owner = $1, refresh_lease_until = $2 WHERE id = $3",
    )
    .bind(owner)
    .bind(until)
    .bind(id)
    .execute(&mut connection)
    .await
    .unwrap();
}

/// A refresh whose lease ran out while it was at the provider (a paused process, a stalled
/// database), and which another replica took over meanwhile, does not invalidate the instance
/// on the provider's refusal: the token it presented may be the one the other replica's
/// refresh has just rotated away, and that refresh decides. It invalidated the instance, and
/// the other's commit of the grant's next tokens was then refused: a working grant dropped
/// (a read-only review).
#[tokio::test]
async fn a_refusal_after_the_lease_was_taken_over_is_left_to_the_taker() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let created = env
            .create_instance(&env.org, "sandbox-generic", "overtaken")
            .await;
        let id = created["id"].as_i64().unwrap();
        let store = tokenwarden::store::Store::connect(&url).await.unwrap();
        let held = hold_next_token_call(&env, 3_000).await;
        let platform = env.org.platform();
        let refresh_path = env.api(&format!("/instances/{id}/tokens/refresh"));
        let refresh =
            crate::instances::call(&env, Method::POST, &refresh_path, Some(&platform), None);
        let take_over = async {
            at_the_provider(&env, held).await;
            // The provider refuses the refresh token once the hold ends...
            env.sandbox_post("/__sandbox/users/overtaken/revoke", json!({}))
                .await;
            // ...and another replica holds the instance, its own refresh under way.
            lease_to(
                &url,
                id,
                "another-replica",
                tokenwarden::app::now_ms() + 30_000,
            )
            .await;
        };
        let (refreshed, ()) = tokio::join!(refresh, take_over);
        assert!(refreshed.status < 500, "[{label}] {}", refreshed.body);
        let row = store.get_instance_by_id(id).await.unwrap().unwrap();
        assert!(
            row.is_valid(),
            "[{label}] invalidated under another's lease: {row:?}"
        );
        assert_eq!(
            row.refresh_lease_owner.as_deref(),
            Some("another-replica"),
            "[{label}] the taker's lease stays"
        );
        let events = event_types(&env, &env.server.url, id).await;
        assert_eq!(
            count(&events, "instance.invalidated"),
            0,
            "[{label}] {events:?}"
        );
        store.close().await;
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// A refresh that outlived its lease and lost to a revocation (which took the lease over and
/// revoked the refresh token this refresh was retiring) revokes the token the provider rotated
/// to: it was dropped, a grant alive at the provider that no instance held, after the user had
/// been told it was revoked (a read-only review).
#[tokio::test]
async fn a_refresh_that_loses_to_a_revocation_revokes_what_it_got() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        generic_profile(
            &env,
            json!({"rotateRefreshTokens": true, "refreshReuseGraceSeconds": 0, "revokeGrantOnReuse": false}),
        )
        .await;
        let created = env
            .create_instance(&env.org, "sandbox-generic", "orphaned")
            .await;
        let id = created["id"].as_i64().unwrap();
        let store = tokenwarden::store::Store::connect(&url).await.unwrap();
        let revoked_before = stat(&env, &["revoke"]).await;
        let held = hold_next_token_call(&env, 3_000).await;
        let platform = env.org.platform();
        let refresh_path = env.api(&format!("/instances/{id}/tokens/refresh"));
        let refresh =
            crate::instances::call(&env, Method::POST, &refresh_path, Some(&platform), None);
        let revocation = async {
            at_the_provider(&env, held).await;
            // A revocation on another replica, under its hold: the instance invalid, its
            // tokens' version moved on.
            lease_to(
                &url,
                id,
                "revoking-replica",
                tokenwarden::app::now_ms() + 30_000,
            )
            .await;
            let row = store.get_instance_by_id(id).await.unwrap().unwrap();
            assert!(
                store
                    .mark_invalid_held(
                        id,
                        "revoked",
                        Some("revoked"),
                        None,
                        row.token_version,
                        true
                    )
                    .await
                    .unwrap()
            );
        };
        let (refreshed, ()) = tokio::join!(refresh, revocation);
        assert!(refreshed.status < 500, "[{label}] {}", refreshed.body);
        eventually(
            "the rotated refresh token revoked",
            Duration::from_secs(10),
            || async { (stat(&env, &["revoke"]).await > revoked_before).then_some(()) },
        )
        .await;
        let row = store.get_instance_by_id(id).await.unwrap().unwrap();
        assert!(!row.is_valid(), "[{label}] {row:?}");
        store.close().await;
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// A call whose refresh finds the instance invalidated by a revocation still at the provider
/// (another replica's hold) leaves that hold and the revocation's words alone. It ended the
/// hold, so that a re-authentication could be written while the provider was still asked to
/// revoke (and the deletion that followed took the new grant with it), and put the API's
/// rejection in place of the revocation's outcome (a read-only review).
#[tokio::test]
async fn a_call_finding_a_revocation_under_way_leaves_its_hold() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let server = env.server.url.clone();
        let created = env
            .create_instance(&env.org, "sandbox-generic", "held-off")
            .await;
        let token = created["token"].as_str().unwrap().to_string();
        let id = created["id"].as_i64().unwrap();
        let (status, _, _) = proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200);
        let store = tokenwarden::store::Store::connect(&url).await.unwrap();
        lease_to(
            &url,
            id,
            "revoking-replica",
            tokenwarden::app::now_ms() + 30_000,
        )
        .await;
        let row = store.get_instance_by_id(id).await.unwrap().unwrap();
        assert!(
            store
                .mark_invalid_held(
                    id,
                    "revoked",
                    Some("Revocation under way"),
                    None,
                    row.token_version,
                    true
                )
                .await
                .unwrap()
        );
        env.sandbox_post("/__sandbox/users/held-off/revoke", json!({}))
            .await;
        let (status, body, _) =
            proxy_at(&env, &server, &env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 401, "[{label}] {body}");
        let row = store.get_instance_by_id(id).await.unwrap().unwrap();
        assert_eq!(
            row.refresh_lease_owner.as_deref(),
            Some("revoking-replica"),
            "[{label}] the revocation's hold stays: {row:?}"
        );
        assert_eq!(
            row.provider_message.as_deref(),
            Some("Revocation under way"),
            "[{label}]"
        );
        store.close().await;
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// A scheduled refresh whose lease ran out while it was at the provider (its renewals failed),
/// and which this replica's scheduler claimed again meanwhile, is refreshed once: the second
/// claim, finding the first one's refresh marked in flight, reads the row again when its turn
/// comes rather than presenting the refresh token the first one retired (a read-only review:
/// with reuse detection, the grant ended).
#[tokio::test]
async fn a_claim_of_this_replicas_own_refresh_in_flight_is_read_again() {
    use tokenwarden::refresh::{Claimed, LEASE_MS};
    let url = sqlite_database();
    let env = env_without_background(&url).await;
    generic_profile(&env, strict_rotation()).await;
    let app = env.server.app.clone();
    let created = env
        .create_instance(&env.org, "sandbox-generic", "claimed-twice")
        .await;
    let id = created["id"].as_i64().unwrap();
    // A scheduled refresh keeps a copy only where there is one: none here (an instance not
    // called lately), so nothing in memory tells the second claim of the first one's commit.
    app.refresh.forget(id);
    let claim = |at: i64| {
        let url = url.clone();
        let owner = app.replica_id.clone();
        async move {
            use sqlx::Connection;
            sqlx::any::install_default_drivers();
            let mut connection = sqlx::AnyConnection::connect(&url).await.unwrap();
            // As `claim_due` writes a claim: an earlier flight's mark is kept.
            sqlx::query(
                "UPDATE instances SET refresh_lease_owner = $1, refresh_lease_until = $2, \
                 refresh_in_flight_since = COALESCE(refresh_in_flight_since, $3) WHERE id = $4",
            )
            .bind(owner)
            .bind(at + LEASE_MS)
            .bind(at)
            .bind(id)
            .execute(&mut connection)
            .await
            .unwrap();
        }
    };
    let (before, refused_before) = (refreshes(&env).await, stat(&env, &["tokenErrors"]).await);
    claim(tokenwarden::app::now_ms() - 1).await;
    let first_row = app.store.get_instance_by_id(id).await.unwrap().unwrap();
    let version = first_row.token_version;
    let held = hold_next_token_call(&env, 2_000).await;
    let first = {
        let (app, claimed) = (
            app.clone(),
            Claimed {
                row: first_row,
                epoch: app.refresh.epoch(),
            },
        );
        tokio::spawn(async move {
            app.refresh
                .refresh(&app, id, Some(version), Some(claimed))
                .await
        })
    };
    at_the_provider(&env, held).await;
    // The first claim's lease has run out (say), and the scheduler claims the row again.
    tokio::time::sleep(Duration::from_millis(10)).await;
    claim(tokenwarden::app::now_ms()).await;
    let second_row = app.store.get_instance_by_id(id).await.unwrap().unwrap();
    let second_claim = Claimed {
        row: second_row,
        epoch: app.refresh.epoch(),
    };
    let second = {
        let app = app.clone();
        tokio::spawn(async move {
            app.refresh
                .refresh(&app, id, Some(version), Some(second_claim))
                .await
        })
    };
    assert!(first.await.unwrap().is_ok(), "the first claim refreshes");
    let _ = second.await.unwrap();
    assert_eq!(refreshes(&env).await, before + 1, "one refresh");
    grant_lives(&env, &created, refused_before).await;
    env.stop().await;
    drop_test_database(&url).await;
}

/// A refresh answered with a new refresh token beside an access token no header can carry
/// (here a control character, put in by a relay in front of the sandbox) keeps the new
/// refresh token: the provider has retired the one presented. It was thrown away with the
/// answer, the next refresh presented the retired token, and a strict provider ended the grant
/// (a black-box tester; the README promised it kept).
#[tokio::test]
async fn a_rotated_refresh_token_beside_an_unusable_access_token_is_kept() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    generic_profile(&env, strict_rotation()).await;
    let mangle = Arc::new(AtomicBool::new(false));
    let sandbox = env.sandbox.url.trim_end_matches('/').to_string();
    let relay = {
        let (mangle, sandbox_token) = (Arc::clone(&mangle), format!("{sandbox}/generic/token"));
        axum::Router::new().route(
            "/token",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let (mangle, sandbox_token) = (Arc::clone(&mangle), sandbox_token.clone());
                async move {
                    let mut forwarded = reqwest::Client::new().post(&sandbox_token).body(body);
                    for name in ["content-type", "authorization", "accept"] {
                        if let Some(value) = headers.get(name) {
                            forwarded = forwarded.header(name, value.as_bytes());
                        }
                    }
                    let answer = forwarded.send().await.unwrap();
                    let status = answer.status().as_u16();
                    let mut tokens: Value = answer.json().await.unwrap();
                    if mangle.swap(false, Ordering::SeqCst) {
                        tokens["access_token"] = json!("bad\u{1}value");
                        // Answered late: the test hands the lease to another replica meanwhile.
                        tokio::time::sleep(Duration::from_millis(1_500)).await;
                    }
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        axum::Json(tokens),
                    )
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("http://{}/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, relay).await.unwrap() });
    let registered = env
        .http
        .post(env.api("/elements"))
        .header("authorization", env.org.platform())
        .json(&json!({
            "key": "mangled", "name": "Behind a relay",
            "baseUrl": format!("{sandbox}/generic/"),
            "oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"),
                      "tokenUrl": relay_url,
                      "scopes": ["api", "offline_access"]},
        }))
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());
    let created = env.create_instance(&env.org, "mangled", "mangled").await;
    let id = created["id"].as_i64().unwrap();
    let platform = env.org.platform();
    let refresh_path = env.api(&format!("/instances/{id}/tokens/refresh"));
    mangle.store(true, Ordering::SeqCst);
    // The refresh's lease runs out while the answer is late, and another replica takes it (for
    // a moment): the token is stored all the same, as a refresh's commit would be.
    let refresh = crate::instances::call(&env, Method::POST, &refresh_path, Some(&platform), None);
    let take_over = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        lease_to(
            &url,
            id,
            "another-replica",
            tokenwarden::app::now_ms() + 2_500,
        )
        .await;
    };
    let (unusable, ()) = tokio::join!(refresh, take_over);
    assert_eq!(unusable.status, 503, "{}", unusable.body);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let refused_before = stat(&env, &["tokenErrors"]).await;
    // The provider answers properly again: the next refresh presents the token it rotated to.
    let refreshed =
        crate::instances::call(&env, Method::POST, &refresh_path, Some(&platform), None).await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    assert_eq!(refreshed.body["valid"], true, "{}", refreshed.body);
    grant_lives(&env, &created, refused_before).await;
    env.stop().await;
    drop_test_database(&url).await;
}
