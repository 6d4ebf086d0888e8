//! Every quirk class of PROVIDERS.md, end to end: an organization connector (`POST /elements`)
//! pointing at the sandbox's `generic` profile configured for the quirk, an instance made from a
//! real code flow, and proof that the instance keeps working while the grant lives and turns
//! invalid, with the provider's words, when it does not.
//!
//! Each runs on SQLite and on PostgreSQL. Time moves on the sandbox clock, never by sleeping.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{CLIENT_ID, CLIENT_SECRET, Env};
use crate::support::{drop_test_database, test_databases};

/// `PUT /__sandbox/profiles/generic`.
async fn configure(env: &Env, settings: Value) {
    env.sandbox_put("/__sandbox/profiles/generic", settings)
        .await;
}

async fn advance(env: &Env, seconds: u64) {
    env.sandbox_post("/__sandbox/clock", json!({"advanceSeconds": seconds}))
        .await;
}

async fn revoke_user(env: &Env, user: &str) {
    env.sandbox_post(&format!("/__sandbox/users/{user}/revoke"), json!({}))
        .await;
}

/// Merges `patch` into `base`, object by object.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (name, value) in patch {
                merge(base.entry(name.clone()).or_insert(Value::Null), value);
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

/// Registers an organization connector `key` for the generic profile, with `quirks` merged into
/// a plain RFC 6749/7009 definition.
async fn register(env: &Env, key: &str, quirks: Value) {
    let mut connector = json!({
        "key": key,
        "name": format!("Quirk {key}"),
        "baseUrl": "{sandbox}/generic/",
        "oauth": {
            "authorizationUrl": "{sandbox}/generic/authorize",
            "tokenUrl": "{sandbox}/generic/token",
            "revokeUrl": "{sandbox}/generic/revoke",
            "scopes": ["read", "write"],
        },
    });
    merge(&mut connector, &quirks);
    let response = env
        .http
        .post(env.api("/elements"))
        .header("authorization", env.org.platform())
        .json(&connector)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(status.is_success(), "register {key}: {status} {body}");
}

/// Re-authenticates the instance of Element token `token` with a new code of `user` at
/// `key` (`PATCH /instances`, the articles' way); the answer's status.
async fn reauthenticate(env: &Env, key: &str, user: &str, token: &str) -> u16 {
    let (code, state) = env.authorize(&env.org, key, user).await;
    env.http
        .patch(env.api("/instances"))
        .header("authorization", env.org.with_element(token))
        .json(&json!({"providerData": {"code": code, "state": state}}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// An instance of `key` for sandbox user `user`: (id, element token).
async fn create(env: &Env, key: &str, user: &str) -> (String, String) {
    let instance = env.create_instance(&env.org, key, user).await;
    (
        instance["id"].to_string().trim_matches('"').to_string(),
        instance["token"].as_str().unwrap().to_string(),
    )
}

/// `POST /instances` from a fresh code, answering the status and body whatever they are.
async fn try_create(env: &Env, key: &str, user: &str, configuration: Value) -> (u16, Value) {
    let (code, state) = env.authorize(&env.org, key, user).await;
    let mut config = env.configuration();
    merge(&mut config, &configuration);
    let response = env
        .http
        .post(env.api("/instances"))
        .header("authorization", env.org.platform())
        .json(
            &json!({"element": {"key": key}, "providerData": {"code": code, "state": state},
                      "configuration": config, "name": format!("{user}'s {key}")}),
        )
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The instance as its own Element token sees it (token values unmasked).
async fn instance(env: &Env, element_token: &str) -> Value {
    let (status, listed) = env
        .get_json(&env.api("/instances"), &env.org.with_element(element_token))
        .await;
    assert_eq!(status, 200, "{listed}");
    listed[0].clone()
}

async fn refresh_token_of(env: &Env, element_token: &str) -> String {
    instance(env, element_token).await["configuration"]["oauth.user.refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn access_token_of(env: &Env, element_token: &str) -> String {
    instance(env, element_token).await["configuration"]["oauth.user.token"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `POST /instances/{id}/tokens/refresh`.
async fn refresh(env: &Env, id: &str, element_token: &str) -> (u16, Value) {
    let response = env
        .http
        .post(env.api(&format!("/instances/{id}/tokens/refresh")))
        .header("authorization", env.org.with_element(element_token))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn refresh_ok(env: &Env, id: &str, element_token: &str, case: &str) {
    let (status, body) = refresh(env, id, element_token).await;
    assert_eq!(status, 200, "[{case}] refresh: {body}");
    assert_eq!(body["valid"], true, "[{case}] {body}");
}

async fn me(env: &Env, element_token: &str, path: &str) -> (u16, Value) {
    env.proxy(&env.org, element_token, Method::GET, path).await
}

/// A proxied call answers 200 from the sandbox: the grant works through the service.
async fn works(env: &Env, element_token: &str, case: &str) -> Value {
    let (status, body) = me(env, element_token, "api/me").await;
    assert_eq!(status, 200, "[{case}] proxied api/me: {body}");
    body
}

/// The instance is invalid for good: a proxied call answers 401 "Request failed" with the
/// provider's words, and the instance says `valid: false`.
async fn turns_invalid(env: &Env, element_token: &str, path: &str, words: &str, case: &str) {
    let (status, body) = me(env, element_token, path).await;
    assert_eq!(status, 401, "[{case}] proxied {path}: {body}");
    assert_eq!(body["message"], "Request failed", "[{case}] {body}");
    let provider_message = body["providerMessage"].as_str().unwrap_or_default();
    assert!(
        provider_message.contains(words),
        "[{case}] providerMessage `{provider_message}` lacks `{words}`"
    );
    assert_eq!(
        instance(env, element_token).await["valid"],
        false,
        "[{case}] instance stays valid"
    );
}

/// A refresh through the service fails for good with the provider's words, and the instance
/// is invalid afterwards.
async fn refresh_fails_for_good(env: &Env, id: &str, element_token: &str, words: &str, case: &str) {
    let (status, body) = refresh(env, id, element_token).await;
    // 409, not the proxy's 401: the platform's secrets were not refused.
    assert_eq!(status, 409, "[{case}] refresh: {body}");
    let provider_message = body["providerMessage"].as_str().unwrap_or_default();
    assert!(
        provider_message.contains(words),
        "[{case}] providerMessage `{provider_message}` lacks `{words}`"
    );
    turns_invalid(env, element_token, "api/me", words, case).await;
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut serializer = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        serializer.append_pair(name, value);
    }
    serializer.finish()
}

/// A direct refresh at the sandbox with a token the service holds (a leaked or replayed copy).
async fn sandbox_refresh(env: &Env, refresh_token: &str) -> (u16, Value) {
    let response = env
        .http
        .post(env.sandbox_url("/generic/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ]))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A direct API call at the sandbox with a token the service holds.
async fn sandbox_api_status(env: &Env, access_token: &str) -> u16 {
    env.http
        .get(env.sandbox_url("/generic/api/me"))
        .bearer_auth(access_token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn sandbox_revoke(env: &Env, token: &str) {
    let response = env
        .http
        .post(env.sandbox_url("/generic/revoke"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", token)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// `POST /instances/{id}/tokens/revoke`.
async fn revoke_through_service(env: &Env, id: &str, element_token: &str) -> Value {
    let response = env
        .http
        .post(env.api(&format!("/instances/{id}/tokens/revoke")))
        .header("authorization", env.org.with_element(element_token))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "revoke: {body}");
    body
}

// ----- 1. rotation modes ------------------------------------------------------------------

#[tokio::test]
async fn rotation_modes_keep_instances_working_and_reuse_kills_the_family() {
    for (engine, url) in test_databases().await {
        rotation_modes_keep_instances_working_and_reuse_kills_the_family_on(
            Env::start(&format!("rotation/{engine}"), &url).await,
        )
        .await;
        drop_test_database(&url).await;
    }
}

async fn rotation_modes_keep_instances_working_and_reuse_kills_the_family_on(env: Env) {
    register(&env, "rot", json!({})).await;
    // (case, settings, whether each refresh changes the refresh token)
    let cases = [
        ("none", json!({"rotateRefreshTokens": false}), false),
        ("single use", json!({"rotateRefreshTokens": true}), true),
        (
            "with grace",
            json!({"rotateRefreshTokens": true, "refreshReuseGraceSeconds": 1800}),
            true,
        ),
        (
            "old stays valid",
            json!({"rotateRefreshTokens": false, "oldRefreshTokenStaysValid": true}),
            true,
        ),
        (
            "omitted",
            json!({"oldRefreshTokenStaysValid": false, "omitRefreshTokenOnRefresh": true}),
            false,
        ),
    ];
    for (index, (case, settings, rotates)) in cases.iter().enumerate() {
        configure(&env, settings.clone()).await;
        let user = format!("rot{index}");
        let (id, token) = create(&env, "rot", &user).await;
        let first = refresh_token_of(&env, &token).await;
        refresh_ok(&env, &id, &token, case).await;
        let second = refresh_token_of(&env, &token).await;
        assert_eq!(first != second, *rotates, "[{case}] rotation");
        assert!(!second.is_empty(), "[{case}] the refresh token is kept");
        // A second refresh proves the kept token is the live one.
        refresh_ok(&env, &id, &token, case).await;
        works(&env, &token, case).await;
        if *case == "single use" {
            let (status, body) = sandbox_refresh(&env, &first).await;
            assert_eq!(status, 400, "[{case}] the first token is used up: {body}");
        }
    }

    // Family revoked on reuse: a replayed old token kills the grant the service holds.
    configure(
        &env,
        json!({"rotateRefreshTokens": true, "refreshReuseGraceSeconds": 0, "revokeGrantOnReuse": true, "omitRefreshTokenOnRefresh": false}),
    )
    .await;
    let (id, token) = create(&env, "rot", "family").await;
    let leaked = refresh_token_of(&env, &token).await;
    refresh_ok(&env, &id, &token, "family").await;
    works(&env, &token, "family").await;
    let (status, body) = sandbox_refresh(&env, &leaked).await;
    assert_eq!(status, 400, "replay refused: {body}");
    refresh_fails_for_good(
        &env,
        &id,
        &token,
        "invalid_grant: The refresh token has been revoked.",
        "family",
    )
    .await;
    env.stop().await;
}

// ----- 2. expiry models -------------------------------------------------------------------

#[tokio::test]
async fn expiry_models_idle_absolute_and_both() {
    for (engine, url) in test_databases().await {
        expiry_models_idle_absolute_and_both_on(
            Env::start(&format!("expiry/{engine}"), &url).await,
        )
        .await;
        drop_test_database(&url).await;
    }
}

async fn expiry_models_idle_absolute_and_both_on(env: Env) {
    register(&env, "exp", json!({})).await;

    // No expiry: a year of silence changes nothing.
    let (id, token) = create(&env, "exp", "forever").await;
    advance(&env, 365 * 86_400).await;
    refresh_ok(&env, &id, &token, "none").await;
    works(&env, &token, "none").await;

    // Idle, sliding: each use restarts the window.
    configure(&env, json!({"refreshTokenIdleTtlSeconds": 100})).await;
    let (id, token) = create(&env, "exp", "idle").await;
    for _ in 0..3 {
        advance(&env, 90).await;
        refresh_ok(&env, &id, &token, "idle").await;
    }
    works(&env, &token, "idle").await;
    advance(&env, 101).await;
    refresh_fails_for_good(
        &env,
        &id,
        &token,
        "invalid_grant: The refresh token has expired.",
        "idle",
    )
    .await;

    // Absolute: use does not extend it.
    configure(
        &env,
        json!({"refreshTokenIdleTtlSeconds": 0, "refreshTokenAbsoluteTtlSeconds": 250}),
    )
    .await;
    let (id, token) = create(&env, "exp", "absolute").await;
    advance(&env, 120).await;
    refresh_ok(&env, &id, &token, "absolute").await;
    advance(&env, 120).await;
    refresh_ok(&env, &id, &token, "absolute").await;
    works(&env, &token, "absolute").await;
    advance(&env, 11).await;
    refresh_fails_for_good(&env, &id, &token, "expired", "absolute").await;

    // Both: the absolute cap wins although the token was never idle for long.
    configure(
        &env,
        json!({"refreshTokenIdleTtlSeconds": 100, "refreshTokenAbsoluteTtlSeconds": 250}),
    )
    .await;
    let (id, token) = create(&env, "exp", "both").await;
    for _ in 0..2 {
        advance(&env, 90).await;
        refresh_ok(&env, &id, &token, "both").await;
    }
    advance(&env, 90).await;
    refresh_fails_for_good(&env, &id, &token, "expired", "both").await;
    env.stop().await;
}

// ----- 3. grant-count caps ----------------------------------------------------------------

#[tokio::test]
async fn grant_caps_evict_the_oldest_instance_of_a_user() {
    for (engine, url) in test_databases().await {
        grant_caps_evict_the_oldest_instance_of_a_user_on(
            Env::start(&format!("caps/{engine}"), &url).await,
        )
        .await;
        drop_test_database(&url).await;
    }
}

async fn grant_caps_evict_the_oldest_instance_of_a_user_on(env: Env) {
    register(&env, "cap", json!({})).await;
    configure(&env, json!({"maxGrantsPerUser": 2})).await;
    let (_, oldest) = create(&env, "cap", "carol").await;
    let (_, middle) = create(&env, "cap", "carol").await;
    works(&env, &oldest, "cap 2, before").await;
    let (_, newest) = create(&env, "cap", "carol").await;
    // Another user's grants are not counted.
    let (_, other) = create(&env, "cap", "dave").await;
    works(&env, &middle, "cap 2, middle").await;
    works(&env, &newest, "cap 2, newest").await;
    works(&env, &other, "cap 2, other user").await;
    turns_invalid(&env, &oldest, "api/me", "invalid_token", "cap 2, evicted").await;

    // Zoom's cap of one: re-authorizing an instance in place keeps it working, and the grant
    // of the user's other instance goes.
    configure(&env, json!({"maxGrantsPerUser": 1})).await;
    let (_, first) = create(&env, "cap", "erin").await;
    let (_, second) = create(&env, "cap", "erin").await;
    works(&env, &second, "cap 1, second").await;
    let status = reauthenticate(&env, "cap", "erin", &second).await;
    assert_eq!(status, 200);
    works(&env, &second, "cap 1, re-authorized").await;
    turns_invalid(&env, &first, "api/me", "invalid_token", "cap 1, evicted").await;

    // Salesforce's cap of five, here three: each re-authentication of one instance makes a
    // grant, and the one it replaced counted on until the cap ended the user's oldest, another
    // instance's. A connector that revokes superseded grants keeps the user's other instance.
    register(
        &env,
        "cap-revoking",
        json!({"oauth": {"revokeSupersededGrant": true}}),
    )
    .await;
    configure(&env, json!({"maxGrantsPerUser": 3})).await;
    for (key, kept) in [("cap", false), ("cap-revoking", true)] {
        let user = format!("fay-{key}");
        let (_, other) = create(&env, key, &user).await;
        let (_, reauthenticated) = create(&env, key, &user).await;
        let revoked_before = crate::refresh::stat(&env, &["revoke"]).await;
        for round in 1..=3 {
            let status = reauthenticate(&env, key, &user, &reauthenticated).await;
            assert_eq!(status, 200, "{key}");
            if kept {
                // The revocation runs beside the answer: the next grant waits for it.
                crate::refresh::eventually(
                    "the superseded grant revoked",
                    std::time::Duration::from_secs(10),
                    || async {
                        (crate::refresh::stat(&env, &["revoke"]).await >= revoked_before + round)
                            .then_some(())
                    },
                )
                .await;
            }
        }
        works(&env, &reauthenticated, "re-authenticated three times").await;
        if kept {
            works(
                &env,
                &other,
                "the user's other instance, superseded grants revoked",
            )
            .await;
        } else {
            turns_invalid(
                &env,
                &other,
                "api/me",
                "invalid_token",
                "evicted by the cap",
            )
            .await;
        }
    }
    env.stop().await;
}

/// Re-authenticates the Salesforce instance `token` of sandbox user `user`, then waits until the
/// sandbox has seen `revocations` revocations in all.
async fn reauthenticate_and_see_revoked(env: &Env, user: &str, token: &str, revocations: u64) {
    let status = reauthenticate(env, "sandbox-salesforce", user, token).await;
    assert_eq!(status, 200, "[{}] re-authenticated", env.label);
    crate::refresh::eventually(
        "the superseded grant revoked",
        std::time::Duration::from_secs(10),
        || async { (crate::refresh::stat(env, &["revoke"]).await >= revocations).then_some(()) },
    )
    .await;
}

/// Salesforce's sandbox, as it is: five grants per user and app, the oldest ended by a sixth.
/// An instance re-authenticated six times keeps the user's other instance working: each
/// superseded grant is revoked (again after a 503), and a revoked grant no longer counts.
#[tokio::test]
async fn salesforce_reauthentications_keep_the_users_other_instance() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let (_, other) = create(&env, "sandbox-salesforce", "sally").await;
    let (_, reauthenticated) = create(&env, "sandbox-salesforce", "sally").await;
    let revoked_before = crate::refresh::stat(&env, &["revoke"]).await;
    for round in 1..=6 {
        if round % 3 == 0 {
            // A revocation refused for now is tried again.
            env.sandbox_post(
                "/__sandbox/faults",
                json!({"target": "revoke", "status": 503, "count": 1}),
            )
            .await;
        }
        reauthenticate_and_see_revoked(&env, "sally", &reauthenticated, revoked_before + round)
            .await;
    }
    works(&env, &reauthenticated, "re-authenticated six times").await;
    works(&env, &other, "the user's other instance").await;
    env.stop().await;
    drop_test_database(&url).await;
}

/// A Salesforce re-authentication that loses to a deletion (the instance deleted while its
/// code was exchanged) revokes the grant it made: nothing holds it, and it counted against the
/// user's five. It lived on at the provider (a black-box tester).
#[tokio::test]
async fn a_reauthentication_that_loses_to_a_deletion_revokes_its_grant() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let (id, token) = create(&env, "sandbox-salesforce", "della").await;
    let (code, state) = env.authorize(&env.org, "sandbox-salesforce", "dora").await;
    let revoked_before = crate::refresh::stat(&env, &["revoke"]).await;
    env.sandbox_post(
        "/__sandbox/faults",
        json!({"target": "token", "status": 0, "delayMs": 1_500}),
    )
    .await;
    let reauthenticate = async {
        env.http
            .patch(env.api("/instances"))
            .header("authorization", env.org.with_element(&token))
            .json(&json!({"providerData": {"code": code, "state": state}}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let delete = async {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        env.http
            .delete(env.api(&format!("/instances/{id}")))
            .header("authorization", env.org.platform())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let (reauthenticated, deleted) = tokio::join!(reauthenticate, delete);
    assert_eq!(deleted, 200, "[{label}]");
    assert_eq!(
        reauthenticated, 404,
        "[{label}] the instance was deleted meanwhile"
    );
    crate::refresh::eventually(
        "the grant made for the deleted instance revoked",
        std::time::Duration::from_secs(10),
        || async { (crate::refresh::stat(&env, &["revoke"]).await > revoked_before).then_some(()) },
    )
    .await;
    // dora's grant is gone: a revocation by the user finds none alive.
    let ended = env
        .sandbox_post("/__sandbox/users/dora/revoke", json!({}))
        .await;
    assert_eq!(ended["revokedGrants"], 0, "[{label}] {ended}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// Re-authentications in quick succession: each has the grant superseded before it revoked at
/// once, so that at most one waits out its minute. They all waited, and Salesforce's cap of
/// five ended the user's other instance at the fourth.
#[tokio::test]
async fn quick_reauthentications_leave_one_superseded_grant_waiting() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start_adjusted(&label, &url, |config| {
        config.superseded_grant_revoked_after = std::time::Duration::from_secs(600);
    })
    .await;
    let (_, other) = create(&env, "sandbox-salesforce", "quinn").await;
    let (_, reauthenticated) = create(&env, "sandbox-salesforce", "quinn").await;
    let revoked_before = crate::refresh::stat(&env, &["revoke"]).await;
    for round in 1..=6_u64 {
        // The one before this re-authentication's, revoked at once.
        reauthenticate_and_see_revoked(&env, "quinn", &reauthenticated, revoked_before + round - 1)
            .await;
    }
    works(&env, &other, "the user's other instance").await;
    works(&env, &reauthenticated, "re-authenticated six times").await;
    env.stop().await;
    drop_test_database(&url).await;
}

/// A stop while a superseded grant waits out its delay revokes it then: the waiting task
/// went with the process, and the grant lived on, counted against the user's five.
#[tokio::test]
async fn a_stop_revokes_the_superseded_grants_still_waiting() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start_adjusted(&label, &url, |config| {
        config.superseded_grant_revoked_after = std::time::Duration::from_secs(600);
    })
    .await;
    let (_, token) = create(&env, "sandbox-salesforce", "stella").await;
    let (code, state) = env
        .authorize(&env.org, "sandbox-salesforce", "stella")
        .await;
    let patched = env
        .http
        .patch(env.api("/instances"))
        .header("authorization", env.org.with_element(&token))
        .json(&json!({"providerData": {"code": code, "state": state}}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200, "[{label}]");
    let before = crate::refresh::stat(&env, &["revoke"]).await;
    let Env {
        server, sandbox, ..
    } = env;
    let started = std::time::Instant::now();
    server.shutdown().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "[{label}] the stop waited out the delay"
    );
    let stats: Value = reqwest::get(format!("{}/__sandbox/stats", sandbox.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats["revoke"].as_u64().unwrap(),
        before + 1,
        "[{label}] revoked at the stop: {stats}"
    );
    sandbox.shutdown().await;
    drop_test_database(&url).await;
}

// ----- 4. routing data --------------------------------------------------------------------

#[tokio::test]
async fn routing_data_from_the_token_response_or_the_redirect_sets_the_base_url() {
    for (engine, url) in test_databases().await {
        routing_data_from_the_token_response_or_the_redirect_sets_the_base_url_on(
            Env::start(&format!("routing/{engine}"), &url).await,
        )
        .await;
        drop_test_database(&url).await;
    }
}

async fn routing_data_from_the_token_response_or_the_redirect_sets_the_base_url_on(env: Env) {
    // The connector's own base URL names no tenant: only the routing data makes calls work.
    register(
        &env,
        "sfdc-like",
        json!({"baseUrl": "{sandbox}/generic/tenants/unrouted/",
               "oauth": {"tokenResponseFields": ["instance_url"], "baseUrlFrom": "instance_url"}}),
    )
    .await;
    configure(
        &env,
        json!({"routingField": "instance_url", "routingLocation": "tokenResponse", "routingValue": "baseUrl"}),
    )
    .await;
    let (id, token) = create(&env, "sfdc-like", "frank").await;
    let body = works(&env, &token, "instance_url").await;
    let tenant = body["tenant"].as_str().unwrap().to_string();
    let configuration = instance(&env, &token).await["configuration"].clone();
    assert_eq!(
        configuration["base.url"],
        env.sandbox_url(&format!("/generic/tenants/{tenant}/")),
        "{configuration}"
    );
    assert_eq!(
        configuration["oauth.provider.instance_url"],
        configuration["base.url"]
    );
    refresh_ok(&env, &id, &token, "instance_url").await;
    works(&env, &token, "instance_url after refresh").await;
    // A refresh whose routing value is no URL (a bare tenant id) leaves the working base.url
    // as it was: adopted, it made every call answer 409.
    configure(&env, json!({"routingValue": "tenantId"})).await;
    refresh_ok(&env, &id, &token, "a tenant id for a URL").await;
    let after = instance(&env, &token).await["configuration"].clone();
    assert_eq!(after["base.url"], configuration["base.url"], "{after}");
    works(&env, &token, "after a refresh with a tenant id").await;
    configure(&env, json!({"routingValue": "baseUrl"})).await;

    // Adobe-style access point plus a suffix.
    register(
        &env,
        "adobe-like",
        json!({"baseUrl": "{sandbox}/generic/tenants/unrouted/",
               "oauth": {"tokenResponseFields": ["api_access_point"], "baseUrlFrom": "api_access_point", "baseUrlSuffix": "api/"}}),
    )
    .await;
    configure(&env, json!({"routingField": "api_access_point"})).await;
    let (_, adobe) = create(&env, "adobe-like", "frank").await;
    let (status, body) = me(&env, &adobe, "me").await;
    assert_eq!(status, 200, "api_access_point + suffix: {body}");

    // QuickBooks: realmId comes in the redirect; the user passes it as the connector's input.
    register(
        &env,
        "qbo-like",
        json!({"baseUrl": "{sandbox}/generic/tenants/{realmId}/",
               "inputs": {"realmId": {"description": "the realmId of the authorization redirect"}}}),
    )
    .await;
    configure(
        &env,
        json!({"routingField": "realmId", "routingLocation": "redirect", "routingValue": "tenantId"}),
    )
    .await;
    let (realm, location) = authorize_with_redirect(&env, "qbo-like", "grace").await;
    assert!(
        realm.starts_with("t-"),
        "realmId in the redirect: {location}"
    );
    let (code, state) = (param(&location, "code"), param(&location, "state"));
    let response = env
        .http
        .post(env.api("/instances"))
        .header("authorization", env.org.platform())
        .json(&json!({"element": {"key": "qbo-like"}, "providerData": {"code": code, "state": state},
                      "configuration": merged(env.configuration(), json!({"realmId": realm})), "name": "qbo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let created: Value = response.json().await.unwrap();
    let qbo = created["token"].as_str().unwrap().to_string();
    works(&env, &qbo, "realmId").await;
    // Or the input names the redirect's field as its value (`redirectShapes: ["{realmId}"]`,
    // as the catalog's QuickBooks does): passed back in `providerData`, it fills the input.
    register(
        &env,
        "qbo-from-redirect",
        json!({"baseUrl": "{sandbox}/generic/tenants/{realmId}/",
               "inputs": {"realmId": {"description": "the realmId of the authorization redirect",
                                      "fromRedirect": "realmId", "redirectShapes": ["{realmId}"]}}}),
    )
    .await;
    let (realm, location) = authorize_with_redirect(&env, "qbo-from-redirect", "grace").await;
    let response = env
        .http
        .post(env.api("/instances"))
        .header("authorization", env.org.platform())
        .json(&json!({"element": {"key": "qbo-from-redirect"},
                      "providerData": {"code": param(&location, "code"), "state": param(&location, "state"),
                                       "realmId": realm},
                      "configuration": env.configuration(), "name": "qbo from the redirect"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["configuration"]["realmId"], realm, "{created}");
    works(
        &env,
        created["token"].as_str().unwrap(),
        "realmId from the redirect",
    )
    .await;

    // Routing data in the redirect only (`instance_url` as a redirect parameter): passed back in
    // `providerData` with the code, it sets the base URL like a token-response field.
    register(
        &env,
        "redirect-routed",
        json!({"baseUrl": "{sandbox}/generic/tenants/unrouted/",
               "oauth": {"tokenResponseFields": ["instance_url"], "baseUrlFrom": "instance_url"}}),
    )
    .await;
    configure(
        &env,
        json!({"routingField": "instance_url", "routingLocation": "redirect", "routingValue": "baseUrl"}),
    )
    .await;
    let (_, location) = authorize_with_redirect(&env, "redirect-routed", "frank").await;
    let routed = param(&location, "instance_url");
    assert!(routed.contains("/tenants/t-"), "{location}");
    let response = env
        .http
        .post(env.api("/instances"))
        .header("authorization", env.org.platform())
        .json(&json!({"element": {"key": "redirect-routed"},
                      "providerData": {"code": param(&location, "code"), "state": param(&location, "state"),
                                       "instance_url": routed},
                      "configuration": env.configuration(), "name": "redirect-routed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let created: Value = response.json().await.unwrap();
    assert_eq!(
        created["configuration"]["base.url"],
        routed.as_str(),
        "{created}"
    );
    let redirected = created["token"].as_str().unwrap().to_string();
    works(&env, &redirected, "instance_url from the redirect").await;

    // Where the grant is gone, routed instances turn invalid like any other.
    revoke_user(&env, "frank").await;
    turns_invalid(
        &env,
        &token,
        "api/me",
        "invalid_token",
        "instance_url revoked",
    )
    .await;
    revoke_user(&env, "grace").await;
    turns_invalid(&env, &qbo, "api/me", "invalid_token", "realmId revoked").await;
    env.stop().await;
}

fn merged(mut base: Value, patch: Value) -> Value {
    merge(&mut base, &patch);
    base
}

fn param(url: &url::Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Approval at the sandbox, answering the routing parameter and the whole redirect URL.
async fn authorize_with_redirect(env: &Env, key: &str, user: &str) -> (String, url::Url) {
    let (status, body) = env
        .get_json(
            &format!(
                "{}?apiKey={CLIENT_ID}&apiSecret={CLIENT_SECRET}&callbackUrl={}",
                env.api(&format!("/elements/{key}/oauth/url")),
                url::form_urlencoded::byte_serialize(env.callback().as_bytes()).collect::<String>()
            ),
            &env.org.platform(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let approve = env
        .http
        .get(format!(
            "{}&login_hint={user}",
            body["oauthUrl"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    let location = url::Url::parse(approve.headers()["location"].to_str().unwrap()).unwrap();
    (param(&location, "realmId"), location)
}

// ----- 5. refresh-request variants --------------------------------------------------------

#[tokio::test]
async fn refresh_request_variants_separate_url_scope_and_json_bodies() {
    for (engine, url) in test_databases().await {
        refresh_request_variants_separate_url_scope_and_json_bodies_on(
            Env::start(&format!("refresh-variants/{engine}"), &url).await,
        )
        .await;
        drop_test_database(&url).await;
    }
}

async fn refresh_request_variants_separate_url_scope_and_json_bodies_on(env: Env) {
    // A separate refresh URL: the connector that names it keeps working; one that refreshes
    // at the token URL is refused, which must not invalidate anything.
    configure(&env, json!({"separateRefreshEndpoint": true})).await;
    register(
        &env,
        "own-refresh",
        json!({"oauth": {"refreshUrl": "{sandbox}/generic/refresh"}}),
    )
    .await;
    register(&env, "no-refresh-url", json!({})).await;
    let (id, token) = create(&env, "own-refresh", "hank").await;
    refresh_ok(&env, &id, &token, "refreshUrl").await;
    works(&env, &token, "refreshUrl").await;
    let (id2, token2) = create(&env, "no-refresh-url", "hank").await;
    let (status, body) = refresh(&env, &id2, &token2).await;
    // Not the grant's death, nor a passing failure: the same request is refused again until
    // the connector is fixed, and the answer says what to fix (it was a 503 "try again later").
    assert_eq!(
        status, 409,
        "unsupported_grant_type is not the grant's death: {body}"
    );
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("unsupported_grant_type")
            && message.contains("refused the refresh request"),
        "{body}"
    );
    assert_eq!(instance(&env, &token2).await["valid"], true);
    configure(&env, json!({"separateRefreshEndpoint": false})).await;

    // scope required on refresh.
    configure(&env, json!({"requireScopeOnRefresh": true})).await;
    register(
        &env,
        "scoped",
        json!({"oauth": {"refreshParams": {"scope": "read write"}}}),
    )
    .await;
    let (id, token) = create(&env, "scoped", "ivan").await;
    refresh_ok(&env, &id, &token, "scope on refresh").await;
    let (id2, token2) = create(&env, "no-refresh-url", "ivan").await;
    let (status, body) = refresh(&env, &id2, &token2).await;
    assert_eq!(
        status, 409,
        "invalid_request is not the grant's death: {body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid_request"),
        "{body}"
    );
    assert_eq!(instance(&env, &token2).await["valid"], true);
    configure(&env, json!({"requireScopeOnRefresh": false})).await;
    // Fixed at the provider (or in the connector): a refresh asked for goes through the
    // backoff at once, as after `invalid_client`.
    refresh_ok(&env, &id2, &token2, "after the fix").await;

    // JSON bodies required: a JSON connector works end to end; a form one cannot even
    // exchange its code, and says why.
    configure(&env, json!({"requireJsonBodies": true})).await;
    register(
        &env,
        "json-body",
        json!({"oauth": {"tokenRequestFormat": "json"}}),
    )
    .await;
    let (id, token) = create(&env, "json-body", "judy").await;
    refresh_ok(&env, &id, &token, "json").await;
    works(&env, &token, "json").await;
    let (status, body) = try_create(&env, "no-refresh-url", "judy", json!({})).await;
    assert!(
        (400..500).contains(&status),
        "form body refused: {status} {body}"
    );
    assert!(
        body["providerMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("JSON"),
        "{body}"
    );

    // The grant dies: the JSON connector's instance turns invalid with the provider's words.
    revoke_user(&env, "judy").await;
    refresh_fails_for_good(&env, &id, &token, "invalid_grant", "json revoked").await;
    env.stop().await;
}

// ----- 6. client authentication -----------------------------------------------------------

#[tokio::test]
async fn client_authentication_basic_only_and_body_only() {
    for (engine, url) in test_databases().await {
        client_authentication_basic_only_and_body_only_on(
            Env::start(&format!("client-auth/{engine}"), &url).await,
        )
        .await;
        drop_test_database(&url).await;
    }
}

async fn client_authentication_basic_only_and_body_only_on(env: Env) {
    register(
        &env,
        "basic",
        json!({"oauth": {"clientAuth": "client_secret_basic"}}),
    )
    .await;
    register(
        &env,
        "post",
        json!({"oauth": {"clientAuth": "client_secret_post"}}),
    )
    .await;

    // Named by none: HTTP Basic, which RFC 6749 has every server support.
    register(&env, "unnamed", json!({})).await;

    configure(&env, json!({"clientAuthMethods": ["client_secret_basic"]})).await;
    let (id, token) = create(&env, "basic", "kim").await;
    refresh_ok(&env, &id, &token, "basic only").await;
    works(&env, &token, "basic only").await;
    let (id, token) = create(&env, "unnamed", "kit").await;
    refresh_ok(&env, &id, &token, "basic only, by default").await;
    works(&env, &token, "basic only, by default").await;
    let (status, body) = try_create(&env, "post", "kim", json!({})).await;
    assert!((400..500).contains(&status), "{status} {body}");
    assert!(
        body["providerMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid_client"),
        "{body}"
    );

    configure(&env, json!({"clientAuthMethods": ["client_secret_post"]})).await;
    let (id, token) = create(&env, "post", "lee").await;
    refresh_ok(&env, &id, &token, "body only").await;
    works(&env, &token, "body only").await;

    // A public client (no secret; PKCE instead): the code and the refreshes carry its id
    // alone, whatever the connector's method.
    register(&env, "public", json!({"oauth": {"pkce": true}})).await;
    let (status, body) = try_create(&env, "public", "pia", json!({"oauth.api.secret": ""})).await;
    assert_eq!(status, 200, "{body}");
    let (public_id, public_token) = (
        body["id"].to_string().trim_matches('"').to_string(),
        body["token"].as_str().unwrap().to_string(),
    );
    refresh_ok(&env, &public_id, &public_token, "public client").await;
    works(&env, &public_token, "public client").await;

    // The provider stops accepting the instance's method: the app's credentials are refused
    // (`invalid_client`), not the user's grant. The instance stays valid and says why, and
    // once the app is fixed (the provider takes the method again and the instance's secret is
    // set anew) the same grant refreshes, without a new consent.
    configure(&env, json!({"clientAuthMethods": ["client_secret_basic"]})).await;
    let (status, body) = refresh(&env, &id, &token).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap_or_default().contains(
            "invalid_client: The client authentication method client_secret_post is not allowed"
        ),
        "{body}"
    );
    let shown = instance(&env, &token).await;
    assert_eq!(shown["valid"], true, "{shown}");
    // Fixed at the provider (where a PATCH sees no change): a refresh asked for now goes
    // through the backoff.
    configure(&env, json!({"clientAuthMethods": ["client_secret_post"]})).await;
    refresh_ok(&env, &id, &token, "fixed at the provider, asked for now").await;
    configure(&env, json!({"clientAuthMethods": ["client_secret_basic"]})).await;
    let (status, body) = refresh(&env, &id, &token).await;
    assert_eq!(status, 409, "{body}");
    configure(&env, json!({"clientAuthMethods": ["client_secret_post"]})).await;
    let (status, body) = refresh(&env, &id, &token).await;
    assert_eq!(
        status, 409,
        "inside the backoff, once asked for now in the last 5 s, no attempt, the same words: {body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid_client"),
        "{body}"
    );
    let patched = env
        .http
        .patch(env.api(&format!("/instances/{id}")))
        .header("authorization", env.org.with_element(&token))
        .json(&json!({"configuration": {"oauth.api.secret": "a-new-secret"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    refresh_ok(&env, &id, &token, "credentials fixed").await;
    works(&env, &token, "credentials fixed").await;
    env.stop().await;
}

// ----- 7. non-standard token responses ----------------------------------------------------

#[tokio::test]
async fn non_standard_token_responses_are_read_and_their_errors_understood() {
    for (engine, url) in test_databases().await {
        non_standard_token_responses_are_read_and_their_errors_understood_on(
            Env::start(&format!("token-responses/{engine}"), &url).await,
        )
        .await;
        drop_test_database(&url).await;
    }
}

async fn non_standard_token_responses_are_read_and_their_errors_understood_on(env: Env) {
    register(
        &env,
        "odd",
        json!({"oauth": {"tokenResponseFields": ["hub_id"], "permanentErrors": ["BAD_REFRESH_TOKEN"]}}),
    )
    .await;
    let plain = json!({"tokenResponseFormat": "json", "errorsWithHttp200": false,
                       "invalidGrantStatus": 400, "expiresInAsString": false, "errorShape": "oauth"});
    // (case, settings, words of the refresh failure once the grant is gone)
    let cases = [
        (
            "form-encoded",
            json!({"tokenResponseFormat": "form"}),
            "invalid_grant: The refresh token has been revoked.",
        ),
        (
            "errors with HTTP 200",
            json!({"errorsWithHttp200": true}),
            "invalid_grant",
        ),
        (
            "403 invalid_grant",
            json!({"invalidGrantStatus": 403}),
            "invalid_grant",
        ),
        (
            "string expires_in",
            json!({"expiresInAsString": true}),
            "invalid_grant",
        ),
        (
            "hubspot",
            json!({"errorShape": "hubspot"}),
            "BAD_REFRESH_TOKEN: missing or invalid refresh token",
        ),
        (
            "zoom",
            json!({"errorShape": "zoom"}),
            "invalid_grant: Invalid Token!",
        ),
        (
            "slack",
            json!({"errorShape": "slack"}),
            "invalid_refresh_token",
        ),
        (
            "github",
            json!({"errorShape": "github", "tokenResponseFormat": "form"}),
            "bad_refresh_token: The refresh token passed is incorrect or expired.",
        ),
        (
            "extra fields",
            json!({"refreshTokenIdleTtlSeconds": 8_640_000, "refreshTokenExpiresInField": "x_refresh_token_expires_in",
                   "extraTokenFields": {"hub_id": 4242}}),
            "invalid_grant",
        ),
    ];
    for (index, (case, settings, words)) in cases.iter().enumerate() {
        configure(&env, merged(plain.clone(), settings.clone())).await;
        let user = format!("odd{index}");
        let (id, token) = create(&env, "odd", &user).await;
        refresh_ok(&env, &id, &token, case).await;
        works(&env, &token, case).await;
        let configuration = instance(&env, &token).await["configuration"].clone();
        assert_eq!(
            configuration["oauth.user.refresh_interval"], "3600",
            "[{case}] expires_in read: {configuration}"
        );
        if *case == "extra fields" {
            assert_eq!(
                configuration["oauth.provider.hub_id"], "4242",
                "{configuration}"
            );
        }
        revoke_user(&env, &user).await;
        refresh_fails_for_good(&env, &id, &token, words, case).await;
    }
    env.stop().await;
}

// ----- 8. revocation semantics ------------------------------------------------------------

#[tokio::test]
async fn revocation_semantics_cascade_refresh_only_none_fake_and_delayed() {
    for (engine, url) in test_databases().await {
        revocation_semantics_cascade_refresh_only_none_fake_and_delayed_on(
            Env::start(&format!("revocation/{engine}"), &url).await,
        )
        .await;
        drop_test_database(&url).await;
    }
}

async fn revocation_semantics_cascade_refresh_only_none_fake_and_delayed_on(env: Env) {
    register(&env, "rev", json!({})).await;

    // Cascade (RFC 7009 generic): revoking through the service kills the grant at the provider.
    let (id, token) = create(&env, "rev", "mia").await;
    let access = access_token_of(&env, &token).await;
    let answer = revoke_through_service(&env, &id, &token).await;
    assert_eq!(answer["valid"], false, "{answer}");
    assert_eq!(sandbox_api_status(&env, &access).await, 401);

    // Refresh-only (HubSpot): revoking through the service revokes the access token too, so
    // nothing of the grant works at the provider afterwards.
    configure(&env, json!({"revocationMode": "refreshOnly"})).await;
    let (id, token) = create(&env, "rev", "hub").await;
    let access = access_token_of(&env, &token).await;
    let answer = revoke_through_service(&env, &id, &token).await;
    assert_eq!(answer["revocation"]["revokedAtProvider"], true, "{answer}");
    assert_eq!(
        sandbox_api_status(&env, &access).await,
        401,
        "the access token must not outlive a revocation through the service"
    );

    // Refresh-only, revoked by someone else: the refresh token dies, the access token lives
    // until it expires; the instance works until then and turns invalid after.
    let (_, token) = create(&env, "rev", "ned").await;
    let rt = refresh_token_of(&env, &token).await;
    sandbox_revoke(&env, &rt).await;
    works(&env, &token, "refresh-only, access token alive").await;
    advance(&env, 3601).await;
    turns_invalid(
        &env,
        &token,
        "api/me",
        "invalid_token",
        "refresh-only, access token expired",
    )
    .await;

    // No endpoint (404): the service says it could not revoke at the provider, and still
    // invalidates the instance locally.
    configure(&env, json!({"revocationMode": "none"})).await;
    let (id, token) = create(&env, "rev", "olga").await;
    let answer = revoke_through_service(&env, &id, &token).await;
    assert_eq!(answer["valid"], false, "{answer}");
    assert_eq!(
        answer["revocation"]["revokedAtProvider"], false,
        "a 404 is not a revocation: {answer}"
    );
    assert!(
        answer["revocation"]["providerMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("not_found"),
        "{answer}"
    );
    turns_invalid_locally(&env, &token, "no endpoint").await;

    // Fake success (Zendesk current.json): 200, and the grant lives on at the provider.
    configure(&env, json!({"revocationMode": "fakeSuccess"})).await;
    let (id, token) = create(&env, "rev", "pam").await;
    let access = access_token_of(&env, &token).await;
    let answer = revoke_through_service(&env, &id, &token).await;
    assert_eq!(answer["valid"], false, "{answer}");
    turns_invalid_locally(&env, &token, "fake success").await;
    assert_eq!(
        sandbox_api_status(&env, &access).await,
        200,
        "the provider did not revoke"
    );

    // Delayed revocation (Microsoft): the grant works until the revocation takes effect.
    configure(
        &env,
        json!({"revocationMode": "cascade", "revocationDelaySeconds": 120}),
    )
    .await;
    let (id, token) = create(&env, "rev", "quinn").await;
    revoke_user(&env, "quinn").await;
    refresh_ok(&env, &id, &token, "delay, pending").await;
    works(&env, &token, "delay, pending").await;
    advance(&env, 121).await;
    turns_invalid(&env, &token, "api/me", "invalid_token", "delay, effective").await;
    env.stop().await;
}

/// The instance is invalid in the service (a proxied call is refused with 401 without a call
/// to the provider).
async fn turns_invalid_locally(env: &Env, element_token: &str, case: &str) {
    let (status, body) = me(env, element_token, "api/me").await;
    assert_eq!(status, 401, "[{case}] {body}");
    assert_eq!(
        instance(env, element_token).await["valid"],
        false,
        "[{case}]"
    );
}

// ----- 9. API rejection shapes ------------------------------------------------------------

#[tokio::test]
async fn api_rejection_shapes_trigger_refresh_and_report_the_providers_words() {
    for (engine, url) in test_databases().await {
        api_rejection_shapes_trigger_refresh_and_report_the_providers_words_on(
            Env::start(&format!("api-rejections/{engine}"), &url).await,
        )
        .await;
        drop_test_database(&url).await;
    }
}

async fn api_rejection_shapes_trigger_refresh_and_report_the_providers_words_on(env: Env) {
    // (case, shape, connector rejection spec, words of the rejection)
    let cases = [
        (
            "empty body + WWW-Authenticate",
            "emptyWithWwwAuthenticate",
            json!({}),
            "error - invalid_token, error_description - The access token has been revoked.",
        ),
        (
            "array",
            "array",
            json!({"bodyMarkers": ["INVALID_SESSION_ID"]}),
            "INVALID_SESSION_ID",
        ),
        (
            "200 ok:false",
            "okFalse",
            json!({"okFalseErrors": ["invalid_auth", "token_expired", "token_revoked"]}),
            "token_revoked",
        ),
        ("xml", "xml", json!({}), "AuthenticationFailed"),
    ];
    for (index, (case, shape, rejection, words)) in cases.iter().enumerate() {
        let key = format!("shape{index}");
        register(&env, &key, json!({"rejection": rejection})).await;
        configure(&env, json!({"apiRejectionShape": shape})).await;
        let user = format!("shape{index}");
        let (_, token) = create(&env, &key, &user).await;
        let before = access_token_of(&env, &token).await;
        // The access token expires at the provider: the rejection makes the service refresh and
        // retry, and the caller sees only the success.
        advance(&env, 3601).await;
        works(&env, &token, case).await;
        assert_ne!(
            access_token_of(&env, &token).await,
            before,
            "[{case}] refreshed after the rejection"
        );
        revoke_user(&env, &user).await;
        turns_invalid(&env, &token, "api/me", words, case).await;
    }
    env.stop().await;
}

/// A caller that accepts gzip (Python's requests, browsers) and a provider that compresses its
/// rejections: a rejection told by its body (Slack's 200 `ok:false`) is still seen, since such
/// a connector's answers are asked for plain; one told by its status keeps a readable message.
#[tokio::test]
async fn compressed_rejections_are_still_recognised() {
    let (engine, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&format!("gzip/{engine}"), &url).await;
    let gzip_call = |token: String| {
        let env = &env;
        async move {
            let response = env
                .http
                .get(env.api("/proxy/api/me"))
                .header("authorization", env.org.through(&token))
                .header("accept-encoding", "gzip, deflate")
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let bytes = response.bytes().await.unwrap();
            (status, String::from_utf8_lossy(&bytes).to_string())
        }
    };
    // Told by the body.
    register(
        &env,
        "gzip-ok-false",
        json!({"rejection": {"okFalseErrors": ["invalid_auth", "token_expired", "token_revoked"]}}),
    )
    .await;
    configure(
        &env,
        json!({"apiRejectionShape": "okFalse", "apiGzip": true}),
    )
    .await;
    let (_, token) = create(&env, "gzip-ok-false", "gzip-slack").await;
    let before = access_token_of(&env, &token).await;
    advance(&env, 3601).await;
    let (status, body) = gzip_call(token.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("gzip-slack"),
        "the retried call's answer: {body}"
    );
    assert_ne!(
        access_token_of(&env, &token).await,
        before,
        "the expired token was seen and refreshed"
    );
    // Told by the status: the message says what the status says, not compressed bytes.
    register(&env, "gzip-status", json!({})).await;
    configure(&env, json!({"apiRejectionShape": "array", "apiGzip": true})).await;
    let (_, token) = create(&env, "gzip-status", "gzip-status-user").await;
    revoke_user(&env, "gzip-status-user").await;
    let (status, body) = gzip_call(token.clone()).await;
    assert_eq!(status, 401, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let words = answer["providerMessage"].as_str().unwrap_or_default();
    assert!(!words.is_empty() && !words.contains('\u{fffd}'), "{answer}");
    env.stop().await;
    drop_test_database(&url).await;
}

// ----- 11. timing: new-token activation delay ---------------------------------------------

#[tokio::test]
async fn a_new_access_token_that_is_not_active_yet_does_not_invalidate_the_instance() {
    for (engine, url) in test_databases().await {
        a_new_access_token_that_is_not_active_yet_does_not_invalidate_the_instance_on(
            Env::start(&format!("activation/{engine}"), &url).await,
        )
        .await;
        drop_test_database(&url).await;
    }
}

async fn a_new_access_token_that_is_not_active_yet_does_not_invalidate_the_instance_on(env: Env) {
    register(&env, "slow", json!({})).await;
    configure(&env, json!({"accessTokenActivationDelaySeconds": 5})).await;
    let (_, token) = create(&env, "slow", "rita").await;
    advance(&env, 5).await;
    works(&env, &token, "active").await;
    // The access token expires; the refreshed one is not active yet when the retry goes out.
    advance(&env, 3600).await;
    let (status, body) = me(&env, &token, "api/me").await;
    assert_eq!(status, 401, "not active yet: {body}");
    assert_eq!(
        instance(&env, &token).await["valid"],
        true,
        "a working grant must not be invalidated: {body}"
    );
    advance(&env, 5).await;
    works(&env, &token, "activated").await;
    env.stop().await;
}

/// Microsoft's loop detection (`invalid_grant` with AADSTS50196, sent to a client repeating the
/// same request too often) does not end a good grant: the refresh fails for now, the instance
/// stays valid, and the next refresh works. It was read as any `invalid_grant`, and the
/// instance asked its user to consent again.
#[tokio::test]
async fn microsoft_s_loop_detection_is_no_dead_grant() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-microsoft", "looper")
        .await;
    let id = created["id"].to_string();
    let token = created["token"].as_str().unwrap().to_string();
    env.sandbox_post(
        "/__sandbox/faults",
        json!({"target": "token", "status": 400, "error": "AADSTS50196"}),
    )
    .await;
    let (status, body) = refresh(&env, &id, &token).await;
    assert_ne!(status, 200, "{body}");
    let shown = instance(&env, &token).await;
    assert_eq!(shown["valid"], true, "{shown}");
    assert!(
        shown["lastRefreshFailure"]
            .as_str()
            .is_some_and(|failure| failure.contains("AADSTS50196")),
        "{shown}"
    );
    refresh_ok(&env, &id, &token, "after the loop detection").await;
    works(&env, &token, "after the loop detection").await;
    env.stop().await;
    drop_test_database(&url).await;
}

/// A revocation endpoint that takes the access token as the call's `Bearer` alone (Dropbox,
/// Slack) refuses an expired one (401) and revokes nothing: the service fetches a fresh access
/// token with the refresh token and revokes with it, so the grant ends. It answered "not
/// revoked, not retryable", and a `DELETE ?revoke=true` deleted the instance with its grant
/// alive at the provider.
#[tokio::test]
async fn a_bearer_revocation_with_an_expired_access_token_still_ends_the_grant() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    register(
        &env,
        "dropboxish",
        json!({"oauth": {"revocation": "bearer", "revocationCascades": true}}),
    )
    .await;
    for ending in ["revoke", "delete"] {
        let (id, token) = create(&env, "dropboxish", &format!("dee-{ending}")).await;
        let refresh_token = refresh_token_of(&env, &token).await;
        let access = access_token_of(&env, &token).await;
        // The access token expires at the provider; the grant lives on.
        advance(&env, 3601).await;
        assert_eq!(sandbox_api_status(&env, &access).await, 401);
        let answer = if ending == "revoke" {
            revoke_through_service(&env, &id, &token).await
        } else {
            let response = env
                .http
                .delete(env.api(&format!("/instances/{id}?revoke=true")))
                .header("authorization", env.org.platform())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{ending}");
            response.json().await.unwrap()
        };
        assert_eq!(
            answer["revocation"]["revokedAtProvider"], true,
            "[{ending}] {answer}"
        );
        let (status, body) = sandbox_refresh(&env, &refresh_token).await;
        assert_eq!(status, 400, "[{ending}] the grant lives on: {body}");
        assert_eq!(body["error"], "invalid_grant", "[{ending}] {body}");
    }
    // Where refresh tokens rotate, or the revocation does not end the grant (Slack), no
    // refresh is made for it: its new refresh token would be lost with the grant alive on it.
    register(
        &env,
        "slackish",
        json!({"oauth": {"revocation": "bearer"}, "refresh": {"rotation": "single_use"}}),
    )
    .await;
    let (id, token) = create(&env, "slackish", "sal").await;
    let refresh_token = refresh_token_of(&env, &token).await;
    advance(&env, 3601).await;
    let answer = revoke_through_service(&env, &id, &token).await;
    assert_eq!(answer["revocation"]["revokedAtProvider"], false, "{answer}");
    let (status, body) = sandbox_refresh(&env, &refresh_token).await;
    assert_eq!(status, 200, "the stored refresh token was spent: {body}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// RFC 9207: a connector that names its authorization server's issuer refuses a code whose
/// redirect carries another `iss` (a mix-up: the code came from another server) before the
/// code is presented, and takes one with its own.
#[tokio::test]
async fn a_code_from_another_issuer_is_not_presented() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    register(
        &env,
        "with-issuer",
        json!({"oauth": {"issuer": "{sandbox}/generic"}}),
    )
    .await;
    let issuer = format!("{}/generic", env.sandbox.url.trim_end_matches('/'));
    let create = async |iss: &str| {
        let (code, state) = env.authorize(&env.org, "with-issuer", "iris").await;
        let response = env
            .http
            .post(env.api("/instances"))
            .header("authorization", env.org.platform())
            .json(&json!({"element": {"key": "with-issuer"},
                          "providerData": {"code": code, "state": state, "iss": iss},
                          "configuration": env.configuration(), "name": "iris"}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    };
    let exchanges = |stats: &Value| stats["token"]["authorization_code"].as_u64().unwrap_or(0);
    let before = env
        .get_json(&env.sandbox_url("/__sandbox/stats"), "")
        .await
        .1;
    let (status, body) = create("https://evil.example").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("RFC 9207"),
        "{body}"
    );
    let after = env
        .get_json(&env.sandbox_url("/__sandbox/stats"), "")
        .await
        .1;
    assert_eq!(
        exchanges(&after),
        exchanges(&before),
        "the code was presented"
    );
    let (status, body) = create(&issuer).await;
    assert_eq!(status, 200, "{body}");
    env.stop().await;
    drop_test_database(&url).await;
}
