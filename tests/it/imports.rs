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
