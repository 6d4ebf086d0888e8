//! Imports of existing tokens (`externalAuthentication: "initial"`) as a migration makes them,
//! thousands at a time: expiries given with the tokens, a refresh token alone refreshed before
//! the answer, retries answered with the instance the first request created, instances created
//! disabled.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::Env;
use crate::instances::{call, instances_of, revealed};
use crate::refresh::{eventually, stat};
use crate::support::test_databases;

/// A create importing `configuration` (the client's keys added) into a `sandbox-generic`
/// instance.
pub(crate) async fn import(env: &Env, configuration: Value) -> crate::instances::Reply {
    let mut body = env.configuration();
    for (key, value) in configuration.as_object().unwrap() {
        body[key] = value.clone();
    }
    call(
        env,
        Method::POST,
        &env.api("/instances"),
        Some(&env.org.platform()),
        Some(
            json!({"element": {"key": "sandbox-generic"}, "externalAuthentication": "initial",
                    "configuration": body, "name": "imported"}),
        ),
    )
    .await
}

/// The tokens of a new `sandbox-generic` instance of sandbox user `user`, given up by the
/// service (the instance is deleted) so that they can be imported: `(access, refresh)`.
pub(crate) async fn tokens_of_a_new_grant(env: &Env, user: &str) -> (String, String) {
    let source = env.create_instance(&env.org, "sandbox-generic", user).await;
    let shown = revealed(env, &env.org, &source).await;
    let deleted = call(
        env,
        Method::DELETE,
        &env.api(&format!("/instances/{}", source["id"])),
        Some(&env.org.platform()),
        None,
    )
    .await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    let token = |key: &str| shown["configuration"][key].as_str().unwrap().to_string();
    (token("oauth.user.token"), token("oauth.user.refresh_token"))
}

/// A refresh token imported without an access token is refreshed before the create answers:
/// one the provider refuses is a 400 in its words and creates nothing (it was answered
/// `valid: true`, and the instance turned invalid milliseconds later); one the provider cannot
/// refresh just now is created all the same, failing to refresh, and the engine's retry ends
/// it; one that works answers the new tokens. An update importing a refresh token alone
/// refreshes before it answers too, and answers how that went.
#[tokio::test]
async fn a_refresh_token_imported_alone_is_refreshed_before_the_answer() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let before = instances_of(&env, &env.org).await.len();
    let refused = import(
        &env,
        json!({"oauth.user.refresh_token": "garbage-refresh-token"}),
    )
    .await;
    assert_eq!(refused.status, 400, "[{label}] {}", refused.body);
    assert!(
        refused.body["providerMessage"]
            .as_str()
            .is_some_and(|words| words.contains("invalid_grant")),
        "[{label}] {}",
        refused.body
    );
    assert_eq!(
        instances_of(&env, &env.org).await.len(),
        before,
        "[{label}] nothing created"
    );

    // A working refresh token: refreshed before the answer, which shows the new tokens.
    let (_, refresh) = tokens_of_a_new_grant(&env, "alone").await;
    let refreshes = stat(&env, &["token", "refresh_token"]).await;
    let created = import(&env, json!({"oauth.user.refresh_token": refresh})).await;
    assert_eq!(created.status, 200, "[{label}] {}", created.body);
    assert_eq!(created.body["state"], "valid", "[{label}] {}", created.body);
    assert!(
        created.body["lastRefreshDate"].is_string(),
        "[{label}] {}",
        created.body
    );
    assert_eq!(
        stat(&env, &["token", "refresh_token"]).await,
        refreshes + 1,
        "[{label}] one refresh, before the answer"
    );
    let shown = revealed(&env, &env.org, &created.body).await;
    assert!(
        shown["configuration"]["oauth.user.token"].is_string(),
        "[{label}] {shown}"
    );
    let token = created.body["token"].as_str().unwrap();
    let (status, body) = env.proxy(&env.org, token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "[{label}] {body}");

    // The provider failing for now: created, failing to refresh, and refreshed after the
    // backoff by the scheduler.
    let (_, refresh) = tokens_of_a_new_grant(&env, "passing").await;
    env.sandbox_post(
        "/__sandbox/faults",
        json!({"target": "token", "status": 503, "count": 1}),
    )
    .await;
    let failing = import(&env, json!({"oauth.user.refresh_token": refresh})).await;
    assert_eq!(failing.status, 200, "[{label}] {}", failing.body);
    assert_eq!(
        failing.body["state"], "refresh_failing",
        "[{label}] {}",
        failing.body
    );
    assert_eq!(failing.body["valid"], true, "[{label}] {}", failing.body);
    let id = failing.body["id"].clone();
    eventually(
        "the failing import refreshed by the scheduler",
        Duration::from_secs(20),
        || async {
            let (_, now) = env
                .get_json(&env.api(&format!("/instances/{id}")), &env.org.platform())
                .await;
            (now["state"] == "valid").then_some(())
        },
    )
    .await;

    // An update importing a refresh token alone: refreshed before the answer.
    let patched = call(
        &env,
        Method::PATCH,
        &env.api(&format!("/instances/{}", created.body["id"])),
        Some(&env.org.platform()),
        Some(json!({"externalAuthentication": "initial",
                    "configuration": {"oauth.user.refresh_token": "garbage-too"}})),
    )
    .await;
    assert_eq!(patched.status, 200, "[{label}] {}", patched.body);
    assert_eq!(patched.body["valid"], false, "[{label}] {}", patched.body);
    assert!(
        patched.body["providerMessage"]
            .as_str()
            .is_some_and(|words| words.contains("invalid_grant")),
        "[{label}] {}",
        patched.body
    );
    env.stop().await;
    crate::support::drop_test_database(&url).await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn iso8601(ms: i64) -> String {
    tokenwarden::instances::iso8601(ms)
}

/// The expiry of an imported access token is taken in the shapes a migration has it in —
/// `oauth.user.token.expires_at` as the service shows it (epoch ms) or in epoch seconds or
/// RFC 3339, `oauth.user.token.expires_in`, Cloud Elements' `oauth.user.refresh_time` +
/// `oauth.user.refresh_interval` (whose refresh time is kept) — and schedules the token like a
/// token response's expiry: `before_expiry` refreshes it in time. One that does not read is a
/// 400 naming the key; one past means expired: refreshed at once, or refused without a refresh
/// token. It was dropped silently, and the token served until a call was rejected.
#[tokio::test]
async fn an_imported_access_tokens_expiry_is_kept_and_scheduled() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let expires = (now_ms() / 1000 + 3_600) * 1000;
    let shapes = [
        json!({"oauth.user.token.expires_at": expires.to_string()}),
        json!({"oauth.user.token.expires_at": expires / 1000}),
        json!({"oauth.user.token.expires_at": iso8601(expires)}),
        json!({"oauth.user.token.expires_at": "2099-01-01T00:00:00+01:00"}),
        json!({"oauth.user.refresh_time": (expires - 3_600_000).to_string(), "oauth.user.refresh_interval": "7200"}),
    ];
    let wanted = [
        iso8601(expires),
        iso8601(expires),
        iso8601(expires),
        "2098-12-31T23:00:00.000Z".to_string(),
        iso8601(expires + 3_600_000),
    ];
    // Each import brings a grant of its own: the same tokens imported again are answered
    // with the instance they made.
    for (shape, wanted) in shapes.iter().zip(wanted) {
        let (access, _) = tokens_of_a_new_grant(&env, "shape").await;
        let mut configuration = shape.clone();
        configuration["oauth.user.token"] = json!(access);
        let created = import(&env, configuration).await;
        assert_eq!(created.status, 200, "[{label}] {shape}: {}", created.body);
        assert_eq!(
            created.body["accessTokenExpiresDate"], wanted,
            "[{label}] {shape}: {}",
            created.body
        );
    }
    // The Cloud Elements pair keeps its refresh time.
    let (access, _) = tokens_of_a_new_grant(&env, "paired").await;
    let mut configuration = shapes[4].clone();
    configuration["oauth.user.token"] = json!(access);
    let paired = import(&env, configuration).await;
    assert_eq!(
        paired.body["lastRefreshDate"],
        iso8601(expires - 3_600_000),
        "[{label}] {}",
        paired.body
    );
    assert_eq!(
        paired.body["configuration"]["oauth.user.refresh_interval"], "7200",
        "[{label}] {}",
        paired.body
    );
    // Seconds from now.
    let (access, _) = tokens_of_a_new_grant(&env, "seconds").await;
    let before = now_ms();
    let created = import(
        &env,
        json!({"oauth.user.token": access, "oauth.user.token.expires_in": 600}),
    )
    .await;
    assert_eq!(created.status, 200, "[{label}] {}", created.body);
    let shown: i64 = created.body["configuration"]["oauth.user.token.expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (before + 600_000..=now_ms() + 600_000).contains(&shown),
        "[{label}] {}",
        created.body
    );
    // An access token alone, expiring: valid, and told that it stops working then (the
    // provider gave no refresh token to replace it).
    assert_eq!(created.body["state"], "valid", "[{label}] {}", created.body);
    assert!(
        created.body["stateReason"]
            .as_str()
            .is_some_and(|reason| reason.starts_with("No refresh token")),
        "[{label}] {}",
        created.body
    );

    // Values that do not read: a 400 naming the key, nothing created.
    let count = instances_of(&env, &env.org).await.len();
    for (key, value) in [
        ("oauth.user.token.expires_at", json!("tomorrow")),
        ("oauth.user.token.expires_at", json!(-5)),
        ("oauth.user.token.expires_in", json!("-60")),
        ("oauth.user.refresh_interval", json!("an hour")),
    ] {
        let refused = import(
            &env,
            json!({"oauth.user.token": access, "oauth.user.refresh_time": now_ms(), key: value}),
        )
        .await;
        assert_eq!(refused.status, 400, "[{label}] {key}: {}", refused.body);
        assert!(
            refused.body["message"]
                .as_str()
                .is_some_and(|message| message.contains(key)),
            "[{label}] {}",
            refused.body
        );
    }
    assert_eq!(instances_of(&env, &env.org).await.len(), count, "[{label}]");

    // Past: without a refresh token, refused like a rejected access token; with one,
    // refreshed before the answer.
    let (access, refresh) = tokens_of_a_new_grant(&env, "past").await;
    let past = (now_ms() - 60_000).to_string();
    let refused = import(
        &env,
        json!({"oauth.user.token": access, "oauth.user.token.expires_at": past}),
    )
    .await;
    assert_eq!(refused.status, 400, "[{label}] {}", refused.body);
    let refreshes = stat(&env, &["token", "refresh_token"]).await;
    let renewed = import(
        &env,
        json!({"oauth.user.token": access, "oauth.user.refresh_token": refresh,
               "oauth.user.token.expires_at": past}),
    )
    .await;
    assert_eq!(renewed.status, 200, "[{label}] {}", renewed.body);
    assert_eq!(
        stat(&env, &["token", "refresh_token"]).await,
        refreshes + 1,
        "[{label}] refreshed before the answer"
    );
    let shown = revealed(&env, &env.org, &renewed.body).await;
    assert_ne!(
        shown["configuration"]["oauth.user.token"], access,
        "[{label}]"
    );

    // A near expiry is refreshed in time by the scheduler (`before_expiry`, never before half
    // the token's life), as a token response's would be.
    let (access, refresh) = tokens_of_a_new_grant(&env, "soon").await;
    let soon = import(
        &env,
        json!({"oauth.user.token": access, "oauth.user.refresh_token": refresh,
               "oauth.user.token.expires_at": (now_ms() + 4_000).to_string()}),
    )
    .await;
    assert_eq!(soon.status, 200, "[{label}] {}", soon.body);
    eventually(
        "the imported token refreshed before its expiry",
        Duration::from_secs(10),
        || async {
            let shown = revealed(&env, &env.org, &soon.body).await;
            (shown["configuration"]["oauth.user.token"] != access.as_str()).then_some(())
        },
    )
    .await;

    // An update importing a token with its expiry, and one whose expiry does not read.
    let (another, _) = tokens_of_a_new_grant(&env, "patched").await;
    let patched = call(
        &env,
        Method::PATCH,
        &env.api(&format!("/instances/{}", paired.body["id"])),
        Some(&env.org.platform()),
        Some(json!({"externalAuthentication": "initial",
                    "configuration": {"oauth.user.token": another,
                                      "oauth.user.token.expires_at": iso8601(expires + 60_000)}})),
    )
    .await;
    assert_eq!(patched.status, 200, "[{label}] {}", patched.body);
    assert_eq!(
        patched.body["accessTokenExpiresDate"],
        iso8601(expires + 60_000),
        "[{label}] {}",
        patched.body
    );
    let refused = call(
        &env,
        Method::PATCH,
        &env.api(&format!("/instances/{}", paired.body["id"])),
        Some(&env.org.platform()),
        Some(json!({"externalAuthentication": "initial",
                    "configuration": {"oauth.user.token": "a-third-token",
                                      "oauth.user.token.expires_in": "soon"}})),
    )
    .await;
    assert_eq!(refused.status, 400, "[{label}] {}", refused.body);
    env.stop().await;
    crate::support::drop_test_database(&url).await;
}

/// A create importing the same tokens again within the hour (a client's retry after a
/// timeout, or the same request sent twice at once) is answered with the instance the first
/// one created, as it is now, rather than a second instance on the same grant (with rotating
/// refresh tokens, one of the two died at the other's first refresh). Keyed on the refresh
/// token, else the access token, per organization and connector; an instance deleted since no
/// longer holds its tokens.
#[tokio::test]
async fn an_import_repeated_is_answered_with_the_instance_it_created() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let (access, refresh) = tokens_of_a_new_grant(&env, "retried").await;
        let tokens = json!({"oauth.user.token": access, "oauth.user.refresh_token": refresh});
        let count = instances_of(&env, &env.org).await.len();
        let first = import(&env, tokens.clone()).await;
        assert_eq!(first.status, 200, "[{label}] {}", first.body);
        let again = import(&env, tokens.clone()).await;
        assert_eq!(again.status, 200, "[{label}] {}", again.body);
        assert_eq!(again.body["id"], first.body["id"], "[{label}]");
        assert_eq!(again.body["token"], first.body["token"], "[{label}]");
        // The refresh token alone names the grant: a retry that drops the access token too.
        let refresh_only = import(&env, json!({"oauth.user.refresh_token": refresh})).await;
        assert_eq!(refresh_only.body["id"], first.body["id"], "[{label}]");
        assert_eq!(
            instances_of(&env, &env.org).await.len(),
            count + 1,
            "[{label}] one instance"
        );

        // Sent twice at once: one instance.
        let (access, refresh) = tokens_of_a_new_grant(&env, "twice").await;
        let tokens = json!({"oauth.user.token": access, "oauth.user.refresh_token": refresh});
        let (one, two) = tokio::join!(import(&env, tokens.clone()), import(&env, tokens.clone()));
        assert_eq!(one.status, 200, "[{label}] {}", one.body);
        assert_eq!(two.status, 200, "[{label}] {}", two.body);
        assert_eq!(one.body["id"], two.body["id"], "[{label}]");

        // An access token alone.
        let (access, _) = tokens_of_a_new_grant(&env, "access-only").await;
        let one = import(&env, json!({"oauth.user.token": access})).await;
        let two = import(&env, json!({"oauth.user.token": access})).await;
        assert_eq!(one.status, 200, "[{label}] {}", one.body);
        assert_eq!(one.body["id"], two.body["id"], "[{label}]");

        // Deleted, the instance no longer holds its tokens: imported anew.
        let deleted = call(
            &env,
            Method::DELETE,
            &env.api(&format!("/instances/{}", one.body["id"])),
            Some(&env.org.platform()),
            None,
        )
        .await;
        assert_eq!(deleted.status, 200, "[{label}] {}", deleted.body);
        let anew = import(&env, json!({"oauth.user.token": access})).await;
        assert_eq!(anew.status, 200, "[{label}] {}", anew.body);
        assert_ne!(anew.body["id"], one.body["id"], "[{label}]");

        // Another organization's import of the same tokens is its own.
        let other = env.new_org("other").await;
        let mut configuration = env.configuration();
        configuration["oauth.user.token"] = json!(access);
        let theirs = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&other.platform()),
            Some(
                json!({"element": {"key": "sandbox-generic"}, "externalAuthentication": "initial",
                        "configuration": configuration}),
            ),
        )
        .await;
        assert_eq!(theirs.status, 200, "[{label}] {}", theirs.body);
        assert_ne!(theirs.body["id"], anew.body["id"], "[{label}]");

        // A refused import gives its tokens back: sent again, it is judged again.
        for _ in 0..2 {
            let refused = import(&env, json!({"oauth.user.refresh_token": "garbage"})).await;
            assert_eq!(refused.status, 400, "[{label}] {}", refused.body);
        }
        env.stop().await;
        crate::support::drop_test_database(&url).await;
    }
}

/// A connection disabled in the system it is migrated from is created disabled
/// (`"disabled": true`, refused before): stored disabled, with no verification call and no
/// refresh (a refresh token imported alone waits for the enable), and one `instance.created`
/// event that says so.
#[tokio::test]
async fn an_import_can_be_created_disabled() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let (access, _) = tokens_of_a_new_grant(&env, "disabled-access").await;
    let (_, refresh) = tokens_of_a_new_grant(&env, "disabled-refresh").await;
    let before = env.sandbox_stats().await;
    let create =
        async |configuration: Value| {
            let mut body = env.configuration();
            for (key, value) in configuration.as_object().unwrap() {
                body[key] = value.clone();
            }
            let url = env.api("/instances");
            call(
            &env,
            Method::POST,
            &url,
            Some(&env.org.platform()),
            Some(json!({"element": {"key": "sandbox-generic"}, "externalAuthentication": "initial",
                        "configuration": body, "disabled": true})),
        )
        .await
        };
    let with_access = create(json!({"oauth.user.token": access})).await;
    assert_eq!(with_access.status, 200, "[{label}] {}", with_access.body);
    assert_eq!(with_access.body["disabled"], true, "[{label}]");
    assert_eq!(with_access.body["state"], "disabled", "[{label}]");
    assert_eq!(with_access.body["verification"], Value::Null, "[{label}]");
    let with_refresh = create(json!({"oauth.user.refresh_token": refresh})).await;
    assert_eq!(with_refresh.status, 200, "[{label}] {}", with_refresh.body);
    assert_eq!(with_refresh.body["disabled"], true, "[{label}]");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = env.sandbox_stats().await;
    assert_eq!(
        after["api"], before["api"],
        "[{label}] no verification call"
    );
    assert_eq!(
        after["token"]["refresh_token"], before["token"]["refresh_token"],
        "[{label}] no refresh"
    );
    let id = with_refresh.body["id"].clone();
    let (_, events) = env
        .get_json(
            &env.api(&format!("/events?instanceId={id}")),
            &env.org.platform(),
        )
        .await;
    let types: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|event| event["type"].as_str())
        .collect();
    assert_eq!(types, ["instance.created"], "[{label}] {events}");
    assert_eq!(
        events["events"][0]["reason"], "created disabled",
        "[{label}] {events}"
    );
    // Enabled, its refresh token is refreshed at once.
    let enabled = call(
        &env,
        Method::PUT,
        &env.api("/instances/enabled"),
        Some(
            &env.org
                .with_element(with_refresh.body["token"].as_str().unwrap()),
        ),
        None,
    )
    .await;
    assert_eq!(enabled.status, 200, "[{label}] {}", enabled.body);
    eventually(
        "the enabled import refreshed",
        Duration::from_secs(10),
        || async {
            (stat(&env, &["token", "refresh_token"]).await
                > before["token"]["refresh_token"].as_u64().unwrap())
            .then_some(())
        },
    )
    .await;
    env.stop().await;
    crate::support::drop_test_database(&url).await;
}

/// What the tests of an import cut by a `kill -9` start from: a SQLite database with an
/// organization, a sandbox whose generic profile has `profile`, and the body importing the
/// refresh token of a new grant there (the in-process server that set the scene has stopped).
struct ImportScene {
    url: String,
    sandbox: tokenwarden_sandbox::RunningSandbox,
    sandbox_url: String,
    http: reqwest::Client,
    org: crate::harness::Org,
    body: Value,
    refresh: String,
}

async fn import_scene(name: &str, profile: Value) -> ImportScene {
    let url = crate::support::sqlite_database();
    let sandbox = tokenwarden_sandbox::spawn(crate::harness::loopback(), Default::default())
        .await
        .unwrap();
    let sandbox_url = sandbox.url.clone();
    let env = Env::start_with_sandbox(name, &url, sandbox, |_| {}).await;
    crate::refresh::generic_profile(&env, profile).await;
    let (_, refresh) = tokens_of_a_new_grant(&env, name).await;
    let mut configuration = env.configuration();
    configuration["oauth.user.refresh_token"] = json!(refresh);
    let body = json!({"element": {"key": "sandbox-generic"}, "externalAuthentication": "initial",
                      "configuration": configuration, "name": "imported"});
    let Env {
        server,
        sandbox,
        http,
        org,
        ..
    } = env;
    server.shutdown().await;
    ImportScene {
        url,
        sandbox,
        sandbox_url,
        http,
        org,
        body,
        refresh,
    }
}

/// Queues `fault` at the sandbox, then sends the import `body` to the service at `server_url`
/// in a task of its own.
async fn import_after_fault(
    http: &reqwest::Client,
    sandbox_url: &str,
    server_url: &str,
    org: &crate::harness::Org,
    body: &Value,
    fault: Value,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let queued = http
        .post(format!("{sandbox_url}/__sandbox/faults"))
        .json(&fault)
        .send()
        .await
        .unwrap();
    assert!(queued.status().is_success());
    let request = http
        .post(format!("{server_url}/elements/api-v2/instances"))
        .header("authorization", org.platform())
        .json(body);
    tokio::spawn(async move { request.send().await })
}

/// `serve` killed (SIGKILL) after the provider rotated an imported refresh token, while the
/// create makes its verification call with the new access token: the rotated tokens were
/// stored before that call, so after a restart the instance exists and works, refreshes again
/// (a strict provider would refuse the imported refresh token, used once already), and the
/// client's retry of the import is answered with it. The refresh was made before the insert,
/// and the rotated refresh token died with the process: no instance, and a grant nobody could
/// use any more, in this service or in the one migrated from.
#[tokio::test]
async fn an_import_killed_after_its_refresh_keeps_the_rotated_token() {
    use crate::crash::{call as proxy_call, spawn_serve, stats};
    use crate::refresh::strict_rotation;
    let ImportScene {
        url,
        sandbox,
        sandbox_url,
        http,
        org,
        body,
        refresh,
    } = import_scene("killed", strict_rotation()).await;

    let mut first = spawn_serve(&url, &sandbox_url, &http).await;
    let refreshes = stats(&http, &sandbox_url).await["token"]["refresh_token"]
        .as_u64()
        .unwrap();
    // The verification call that follows the refresh is held at the provider.
    let create = import_after_fault(
        &http,
        &sandbox_url,
        &first.url,
        &org,
        &body,
        json!({"target": "api", "status": 0, "delayMs": 20_000, "count": 1}),
    )
    .await;
    eventually(
        "the refresh made and the verification call held",
        Duration::from_secs(20),
        || async {
            let now = stats(&http, &sandbox_url).await;
            (now["token"]["refresh_token"].as_u64() == Some(refreshes + 1)
                && now["faultsInjected"].as_u64() == Some(1))
            .then_some(())
        },
    )
    .await;
    first.process.start_kill().unwrap(); // SIGKILL
    first.process.wait().await.unwrap();
    let _ = create.await;

    let second = spawn_serve(&url, &sandbox_url, &http).await;
    let listed: Value = http
        .get(format!("{}/elements/api-v2/instances", second.url))
        .header("authorization", org.platform())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "the instance and its rotated tokens were stored before the process died: {listed}"
    );
    // The client's retry: answered with that instance, not imported again.
    let retried = http
        .post(format!("{}/elements/api-v2/instances", second.url))
        .header("authorization", org.platform())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    let retried: Value = retried.json().await.unwrap();
    assert_eq!(retried["id"], listed[0]["id"], "{retried}");
    let token = retried["token"].as_str().unwrap().to_string();
    let (status, answer) = proxy_call(&http, &second.url, &org, &token).await;
    assert_eq!(status, 200, "the new access token works: {answer}");
    // The stored refresh token is the rotated one: refreshed again, the provider takes it.
    let refreshed = http
        .post(format!(
            "{}/elements/api-v2/instances/{}/tokens/refresh",
            second.url, retried["id"]
        ))
        .header("authorization", org.platform())
        .send()
        .await
        .unwrap();
    let status = refreshed.status();
    let refreshed: Value = refreshed.json().await.unwrap();
    assert_eq!(status, 200, "{refreshed}");
    let shown: Value = http
        .get(format!("{}/elements/api-v2/instances", second.url))
        .header("authorization", org.with_element(&token))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown[0]["valid"], true, "{shown}");
    assert_ne!(
        shown[0]["configuration"]["oauth.user.refresh_token"], refresh,
        "{shown}"
    );
    assert_eq!(
        stats(&http, &sandbox_url).await["token"]["refresh_token"].as_u64(),
        Some(refreshes + 2),
        "the import's refresh and this one"
    );
    drop(second);
    sandbox.shutdown().await;
    crate::support::drop_test_database(&url).await;
}

/// An import whose refresh token the provider refuses (`invalid_grant`) creates nothing, now
/// that the instance is stored before its refresh: a 400 in the provider's words, no instance
/// listed, no event listed, none delivered to the webhook the import named (no
/// `instance.created`, no `instance.invalidated` of an instance the caller was told does not
/// exist), no `instance.created` in the audit log; a repeat sent while the provider is asked
/// is answered 400 too, not with the instance about to be removed; and the same tokens,
/// imported again, are judged by the provider again.
#[tokio::test]
async fn a_refused_import_leaves_no_instance_no_event_and_can_be_imported_again() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let (hook, received) = crate::events::receiver(0).await;
        let before = instances_of(&env, &env.org).await.len();
        let tokens = json!({"oauth.user.refresh_token": "refused-refresh-token",
                            "event.notification.enabled": "true",
                            "event.notification.callback.url": hook});
        let refusals = stat(&env, &["tokenErrors"]).await;
        // A slow token endpoint: the repeat comes while the provider is asked.
        env.sandbox_post(
            "/__sandbox/faults",
            json!({"target": "token", "status": 0, "delayMs": 1_500, "count": 1}),
        )
        .await;
        let (first, repeat) = tokio::join!(import(&env, tokens.clone()), async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            import(&env, tokens.clone()).await
        });
        for refused in [&first, &repeat] {
            assert_eq!(refused.status, 400, "[{label}] {}", refused.body);
            assert!(
                refused.body["providerMessage"]
                    .as_str()
                    .is_some_and(|words| words.contains("invalid_grant")),
                "[{label}] {}",
                refused.body
            );
        }
        assert_eq!(
            instances_of(&env, &env.org).await.len(),
            before,
            "[{label}] nothing created"
        );
        // What a receiver would have got by now (deliveries are offered every 200 ms).
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let (_, events) = env.get_json(&env.api("/events"), &env.org.platform()).await;
        assert_eq!(events["events"], json!([]), "[{label}] {events}");
        assert!(
            received.lock().unwrap().is_empty(),
            "[{label}] no webhook for an instance that does not exist"
        );
        let (_, audit) = env
            .get_json(&env.api("/audit-logs"), &env.org.platform())
            .await;
        assert!(
            !audit["auditLogs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|entry| entry["action"] == "instance.created"),
            "[{label}] {audit}"
        );
        // Given back: imported again, judged by the provider again.
        let judged = stat(&env, &["tokenErrors"]).await;
        assert!(judged > refusals, "[{label}] the provider refused it");
        let again = import(&env, tokens.clone()).await;
        assert_eq!(again.status, 400, "[{label}] {}", again.body);
        assert_eq!(
            stat(&env, &["tokenErrors"]).await,
            judged + 1,
            "[{label}] presented again"
        );
        env.stop().await;
        crate::support::drop_test_database(&url).await;
    }
}

/// The organization's connector deleted while an import's refresh is at the provider: the
/// instance was stored before the refresh, so the deletion finds it (409, as for any connector
/// with instances) and the import's rotated tokens are kept. The refresh was made before the
/// insert, which then found the connector gone: the create answered 409 and the rotated
/// refresh token was lost, the grant with it (the provider had retired the imported one).
#[tokio::test]
async fn an_import_outlives_its_connector_deleted_during_its_refresh() {
    use crate::refresh::{generic_profile, register_connector, strict_rotation};
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        generic_profile(&env, strict_rotation()).await;
        register_connector(&env, "migrated", json!({})).await;
        // Tokens of the same provider and client as the connector's.
        let (_, refresh) = tokens_of_a_new_grant(&env, "outlives").await;
        let mut configuration = env.configuration();
        configuration["oauth.user.refresh_token"] = json!(refresh);
        env.sandbox_post(
            "/__sandbox/faults",
            json!({"target": "token", "status": 0, "delayMs": 2_000, "count": 1}),
        )
        .await;
        let faults = stat(&env, &["faultsInjected"]).await;
        let (url_of_creates, platform) = (env.api("/instances"), env.org.platform());
        let (created, deleted) = tokio::join!(
            call(
                &env,
                Method::POST,
                &url_of_creates,
                Some(&platform),
                Some(
                    json!({"element": {"key": "migrated"}, "externalAuthentication": "initial",
                            "configuration": configuration, "name": "imported"}),
                ),
            ),
            async {
                eventually(
                    "the import's refresh at the provider",
                    Duration::from_secs(10),
                    || async { (stat(&env, &["faultsInjected"]).await > faults).then_some(()) },
                )
                .await;
                call(
                    &env,
                    Method::DELETE,
                    &env.api("/elements/migrated"),
                    Some(&env.org.platform()),
                    None,
                )
                .await
            }
        );
        assert_eq!(created.status, 200, "[{label}] {}", created.body);
        assert_eq!(created.body["valid"], true, "[{label}] {}", created.body);
        assert_eq!(deleted.status, 409, "[{label}] {}", deleted.body);
        let shown = revealed(&env, &env.org, &created.body).await;
        assert_ne!(
            shown["configuration"]["oauth.user.refresh_token"], refresh,
            "[{label}] the rotated refresh token stored"
        );
        let token = created.body["token"].as_str().unwrap();
        let (status, body) = env.proxy(&env.org, token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "[{label}] {body}");
        env.stop().await;
        crate::support::drop_test_database(&url).await;
    }
}

/// `serve` killed (SIGKILL) while an import's refresh is at the provider: the instance was
/// stored before the refresh, marked in flight under its lease, so after a restart it exists,
/// the recovery refreshes it once that lease has run out (not left as imported, nor stuck), and
/// the client's retry of the import is answered with it. The refresh was made before the
/// insert: nothing was left, and the retry waited for a request that had died.
#[tokio::test]
async fn an_import_killed_during_its_refresh_is_refreshed_after_the_restart() {
    use crate::crash::{call as proxy_call, spawn_serve, stats};
    // No rotation: whether or not the provider finished the lost request, the stored refresh
    // token works.
    let ImportScene {
        url,
        sandbox,
        sandbox_url,
        http,
        org,
        body,
        ..
    } = import_scene("killed-early", json!({"rotateRefreshTokens": false})).await;

    let mut first = spawn_serve(&url, &sandbox_url, &http).await;
    let create = import_after_fault(
        &http,
        &sandbox_url,
        &first.url,
        &org,
        &body,
        json!({"target": "token", "status": 0, "delayMs": 3_000, "count": 1}),
    )
    .await;
    eventually(
        "the import's refresh at the provider",
        Duration::from_secs(20),
        || async {
            (stats(&http, &sandbox_url).await["faultsInjected"].as_u64() == Some(1)).then_some(())
        },
    )
    .await;
    first.process.start_kill().unwrap(); // SIGKILL
    first.process.wait().await.unwrap();
    let _ = create.await;

    let second = spawn_serve(&url, &sandbox_url, &http).await;
    let listed = async || -> Value {
        http.get(format!("{}/elements/api-v2/instances", second.url))
            .header("authorization", org.platform())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    };
    let shown = listed().await;
    assert_eq!(
        shown.as_array().map(Vec::len),
        Some(1),
        "the instance was stored before its refresh: {shown}"
    );
    // Imported without an access token: the refresh it lacks is finished by the recovery
    // once the lease of the dead process has run out (10 s).
    let refreshed = eventually(
        "the interrupted refresh finished by the recovery",
        Duration::from_secs(40),
        || async {
            let shown = listed().await;
            shown[0]["configuration"]["oauth.user.token"]
                .is_string()
                .then_some(shown)
        },
    )
    .await;
    assert_eq!(refreshed[0]["valid"], true, "{refreshed}");
    let retried = http
        .post(format!("{}/elements/api-v2/instances", second.url))
        .header("authorization", org.platform())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    let retried: Value = retried.json().await.unwrap();
    assert_eq!(retried["id"], shown[0]["id"], "{retried}");
    let token = retried["token"].as_str().unwrap().to_string();
    let (status, answer) = proxy_call(&http, &second.url, &org, &token).await;
    assert_eq!(status, 200, "{answer}");
    drop(second);
    sandbox.shutdown().await;
    crate::support::drop_test_database(&url).await;
}

/// An import replaces the grant's tokens: an access token imported by `PATCH` with the refresh
/// token blanked leaves the instance without its old refresh token, which belonged to the grant
/// it replaces (another user's, maybe); given back as shown (masked), the stored refresh token
/// stays; not named at all, the import is refused (a merge says nothing of it). The old
/// refresh token was kept, and the next refresh made the instance the old user's connection
/// again.
#[tokio::test]
async fn an_imported_access_token_does_not_keep_the_old_grant_s_refresh_token() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "alice")
        .await;
    let id = created["id"].clone();
    let alice_refresh =
        revealed(&env, &env.org, &created).await["configuration"]["oauth.user.refresh_token"]
            .clone();
    // Given back as shown, with a new access token of the same grant: the refresh token stays.
    let (same_user_access, _) = tokens_of_a_new_grant(&env, "alice").await;
    let patched = call(
        &env,
        Method::PATCH,
        &env.api(&format!("/instances/{id}")),
        Some(&env.org.platform()),
        Some(json!({"externalAuthentication": "initial",
                    "configuration": {"oauth.user.token": same_user_access,
                                      "oauth.user.refresh_token": "********"}})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    let shown = revealed(&env, &env.org, &created).await;
    assert_eq!(
        shown["configuration"]["oauth.user.refresh_token"], alice_refresh,
        "{shown}"
    );
    // Bob's access token alone: refused, a PATCH saying nothing of the refresh token; with it
    // blanked, alice's refresh token goes with her grant.
    let (bob_access, _) = tokens_of_a_new_grant(&env, "bob").await;
    let patch = async |configuration: Value| {
        call(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{id}")),
            Some(&env.org.platform()),
            Some(json!({"externalAuthentication": "initial", "configuration": configuration})),
        )
        .await
    };
    let refused =
        patch(json!({"oauth.user.token": bob_access, "oauth.user.token.expires_in": "1800"})).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(
        revealed(&env, &env.org, &created).await["configuration"]["oauth.user.refresh_token"],
        alice_refresh,
        "a refused import changed the instance"
    );
    let patched = patch(json!({"oauth.user.token": bob_access,
                               "oauth.user.refresh_token": "",
                               "oauth.user.token.expires_in": "1800"}))
    .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    let shown = revealed(&env, &env.org, &created).await;
    assert!(
        shown["configuration"]["oauth.user.refresh_token"].is_null(),
        "the old grant's refresh token was kept: {shown}"
    );
    assert!(
        shown["stateReason"]
            .as_str()
            .is_some_and(|reason| reason.starts_with("No refresh token")),
        "{shown}"
    );
    env.stop().await;
    crate::support::drop_test_database(&url).await;
}
