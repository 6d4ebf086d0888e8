//! Three replicas on one PostgreSQL database: the lease makes one refresh for all of them.

use crate::harness::{Env, start_server};
use crate::refresh::{
    assert_all_ok, count, event_types, expire_access_tokens, generic_profile, instance, refreshes,
    stat, storm, strict_rotation,
};
use crate::support::{create_postgres_database, drop_test_database};

/// A database of its own on PostgreSQL; `None` (the test is skipped) when PostgreSQL is
/// unreachable, except under CI, which requires it.
async fn postgres_or_skip() -> Option<String> {
    match create_postgres_database().await {
        Ok(url) => Some(url),
        Err(error) => {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "PostgreSQL is required: {error}"
            );
            eprintln!("warning: PostgreSQL unreachable ({error}); replica test skipped");
            None
        }
    }
}

/// 300 concurrent rejected calls, 100 on each of three replicas, on a provider that kills the
/// grant at any second use of a refresh token: all answer 200 and the provider saw one refresh.
#[tokio::test]
async fn storm_across_three_replicas_makes_one_refresh() {
    let Some(url) = postgres_or_skip().await else {
        return;
    };
    let env = Env::start("postgres", &url).await;
    let second = start_server(&url, &env.sandbox.url, |_| {}).await;
    let third = start_server(&url, &env.sandbox.url, |_| {}).await;
    generic_profile(&env, strict_rotation()).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "replicated")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_i64().unwrap();
    let servers = vec![
        env.server.url.clone(),
        second.url.clone(),
        third.url.clone(),
    ];
    // Every replica has the instance in memory with the first access token.
    let warm = storm(&env, &servers, &token, 3, "api/me").await;
    assert_all_ok("warm-up", &warm);
    expire_access_tokens(&env).await;

    let answers = storm(&env, &servers, &token, 300, "api/me").await;
    assert_all_ok("three replicas", &answers);
    assert_eq!(
        refreshes(&env).await,
        1,
        "exactly one refresh over all replicas"
    );
    assert_eq!(stat(&env, &["tokenErrors"]).await, 0);
    for server in &servers {
        let shown = instance(&env, server, &token).await;
        assert_eq!(shown["valid"], true, "{shown}");
    }
    let events = event_types(&env, &servers[0], id).await;
    assert_eq!(count(&events, "instance.token.refreshed"), 1, "{events:?}");
    // The grant is alive: another round refreshes once more, from any replica.
    expire_access_tokens(&env).await;
    let answers = storm(&env, &servers, &token, 30, "api/me").await;
    assert_all_ok("second round", &answers);
    assert_eq!(refreshes(&env).await, 2);
    second.shutdown().await;
    third.shutdown().await;
    env.stop().await;
    drop_test_database(&url).await;
}

/// An instance disabled through one replica, and idle meanwhile in another's memory, makes no
/// provider call through the other once its copy is ten seconds old: that copy served the first
/// call up to a minute after the disable.
#[tokio::test]
async fn a_disable_through_one_replica_holds_in_the_others_soon() {
    let Some(url) = postgres_or_skip().await else {
        return;
    };
    let env = Env::start("postgres", &url).await;
    let second = start_server(&url, &env.sandbox.url, |_| {}).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "disabled-elsewhere")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    // The first replica holds the instance in memory.
    let warm = storm(
        &env,
        std::slice::from_ref(&env.server.url),
        &token,
        1,
        "api/me",
    )
    .await;
    assert_all_ok("warm-up", &warm);
    let disabled = env
        .http
        .delete(format!("{}/elements/api-v2/instances/enabled", second.url))
        .header("authorization", env.org.with_element(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(disabled.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(10_500)).await;
    let calls_before = stat(&env, &["api", "ok"]).await;
    // A burst: every call of it waits for the one re-read, none is served the old copy.
    let burst = (0..8).map(|_| {
        crate::refresh::proxy_at(
            &env,
            &env.server.url,
            &env.org,
            &token,
            reqwest::Method::GET,
            "api/me",
        )
    });
    for (status, body, _) in futures_util::future::join_all(burst).await {
        assert_eq!(
            status, 409,
            "a disabled instance answered through the other replica: {body}"
        );
    }
    assert_eq!(
        stat(&env, &["api", "ok"]).await,
        calls_before,
        "the provider was called"
    );
    second.shutdown().await;
    env.stop().await;
    drop_test_database(&url).await;
}

/// Two replicas on `url` and an instance of `user`: the second holds the instance's first
/// token in memory, the first has refreshed it since (the row holds a token the second has
/// not seen). Answers the first replica's environment, the second, and the Element token.
async fn stale_copy_on_a_second_replica(
    url: &str,
    user: &str,
) -> (Env, tokenwarden::startup::RunningServer, String) {
    let env = Env::start("postgres", url).await;
    let second = start_server(url, &env.sandbox.url, |_| {}).await;
    let created = env.create_instance(&env.org, "sandbox-generic", user).await;
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_i64().unwrap();
    let warm = storm(&env, std::slice::from_ref(&second.url), &token, 1, "api/me").await;
    assert_all_ok("warm-up", &warm);
    let refreshed = env
        .http
        .post(format!(
            "{}/elements/api-v2/instances/{id}/tokens/refresh",
            env.server.url
        ))
        .header("authorization", env.org.platform())
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 200);
    (env, second, token)
}

/// A replica whose copy of the instance is older than the token another replica stored, both
/// tokens dead by the time of the call: the API's rejection makes this replica take the newer
/// token from the store, and when that is rejected too, refresh for itself and try once more
/// (the stored token was another's, not one this call got): 200, not the provider's 401.
#[tokio::test]
async fn a_stale_copy_whose_stored_token_is_dead_too_refreshes_for_itself() {
    let Some(url) = postgres_or_skip().await else {
        return;
    };
    let (env, second, token) = stale_copy_on_a_second_replica(&url, "stale-copy").await;
    expire_access_tokens(&env).await;
    let before = refreshes(&env).await;
    let answers = storm(&env, std::slice::from_ref(&second.url), &token, 1, "api/me").await;
    assert_all_ok("stale copy, stored token dead too", &answers);
    assert_eq!(refreshes(&env).await, before + 1);
    second.shutdown().await;
    env.stop().await;
    drop_test_database(&url).await;
}

/// The same, the grant revoked at the provider meanwhile: the refresh of this replica's own
/// finds it gone, and the call answers as the contract has it, 401 "Request failed" in the
/// API's words, the instance invalid on every replica.
#[tokio::test]
async fn a_stale_copy_whose_grant_is_gone_answers_in_the_apis_words() {
    let Some(url) = postgres_or_skip().await else {
        return;
    };
    let (env, second, token) = stale_copy_on_a_second_replica(&url, "gone-meanwhile").await;
    env.sandbox_post(
        "/__sandbox/users/gone-meanwhile/revoke",
        serde_json::json!({}),
    )
    .await;
    let (status, body, _) = crate::refresh::proxy_at(
        &env,
        &second.url,
        &env.org,
        &token,
        reqwest::Method::GET,
        "api/me",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["message"], "Request failed", "{body}");
    let words = body["providerMessage"].as_str().unwrap_or_default();
    assert!(
        !words.is_empty() && !words.contains("invalid_grant"),
        "the API's words: {body}"
    );
    let shown = instance(&env, &env.server.url, &token).await;
    assert_eq!(shown["valid"], false, "{shown}");
    second.shutdown().await;
    env.stop().await;
    drop_test_database(&url).await;
}

/// `serve --database-pool-size` bounds the connections a replica opens to PostgreSQL: replicas
/// times 16 took most of a default server's 100.
#[tokio::test]
async fn a_replica_opens_at_most_its_pool_size() {
    let Ok(url) = crate::support::create_postgres_database().await else {
        panic!("PostgreSQL is needed for this test (.ci/run starts it)");
    };
    let env = Env::start_adjusted("postgres", &url, |config| config.database_pool_size = 2).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "pooled")
        .await;
    let id = created["id"].as_i64().unwrap();
    let (url_of_one, platform) = (env.api(&format!("/instances/{id}")), env.org.platform());
    let calls = (0..40).map(|_| env.get_json(&url_of_one, &platform));
    for (status, body) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200, "{body}");
    }
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let (_, database) = url.rsplit_once('/').unwrap();
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(open <= 2, "{open} connections open");
    env.stop().await;
    crate::support::drop_test_database(&url).await;
}
