//! `tokenwarden keys rotate` while a server holding both keys serves traffic (proxied calls,
//! reads with secrets, refreshes, configuration updates): afterwards everything works with only
//! the new key configured, including organizations' webhook secrets and a pending PKCE state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Env, TEST_MASTER_KEY, start_server};
use crate::instances::{binary, call, revealed};
use crate::support::test_databases;

/// `tokenwarden keys rotate` to `new_key` (the test key as the previous one), off the
/// runtime: the in-process server on it must be able to finish a SQLite transaction the
/// command waits for.
async fn rotate_keys(url: &str, new_key: &str) -> std::process::Output {
    let (url, new_key) = (url.to_string(), new_key.to_string());
    tokio::task::spawn_blocking(move || {
        binary()
            .args(["keys", "rotate", "--database-url", &url])
            .env("TOKENWARDEN_MASTER_KEY", &new_key)
            .env("TOKENWARDEN_PREVIOUS_MASTER_KEYS", TEST_MASTER_KEY)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The service of `env` replaced by one started on `url` with `master` as its key and
/// `previous` as its previous keys (the test key when `None` is given for both), asked to start
/// with keys missing when `ignore_missing` (as the running one would have been).
async fn restart_with(
    env: &mut Env,
    url: &str,
    master: Option<&str>,
    previous: Option<&str>,
    ignore_missing: bool,
) {
    let (master, previous) = (master.map(str::to_string), previous.map(str::to_string));
    let replacement = start_server(url, &env.sandbox.url, |config| {
        if master.is_some() {
            config.master_key = master;
            config.previous_master_keys = previous;
        }
        config.ignore_missing_keys = ignore_missing;
    })
    .await;
    let old = std::mem::replace(&mut env.server, replacement);
    old.shutdown().await;
}

#[tokio::test]
async fn rotation_under_traffic_leaves_everything_readable_with_the_new_key() {
    for (label, url) in test_databases().await {
        let mut env = Env::start(&label, &url).await;
        let (_, new_key) = tokenwarden::crypto::MasterKey::generate();
        let new_key = new_key.expose().to_string();
        let mut instances: Vec<Value> = Vec::new();
        for i in 0..12 {
            let element = if i % 2 == 0 {
                "sandbox-salesforce"
            } else {
                "sandbox-microsoft"
            };
            instances.push(
                env.create_instance(&env.org, element, &format!("rot-{i}"))
                    .await,
            );
        }
        // An event waiting for delivery, signed with its instance's own key (sealed in the
        // event): its receiver is down for now.
        let hooked = env
            .create_instance(&env.org, "sandbox-generic", "rot-webhook")
            .await;
        let hooked_id = hooked["id"].as_i64().unwrap();
        let patched = call(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{hooked_id}")),
            Some(&env.org.platform()),
            Some(
                json!({"configuration": {"event.notification.enabled": "true",
                                       "event.notification.callback.url": "http://127.0.0.1:9/down",
                                       "event.notification.signature.key": "rot-signing-key"}}),
            ),
        )
        .await;
        assert_eq!(patched.status, 200, "[{label}] {}", patched.body);
        let refreshed = call(
            &env,
            Method::POST,
            &env.api(&format!("/instances/{hooked_id}/tokens/refresh")),
            Some(&env.org.platform()),
            None,
        )
        .await;
        assert_eq!(refreshed.status, 200, "[{label}] {}", refreshed.body);
        // A PKCE authorization begun before the rotation, finished after it.
        let pending_callback = env.callback();
        let (pending_code, pending_state) =
            env.authorize(&env.org, "sandbox-generic", "rot-pkce").await;

        // A replica with the new key and the old one, as during a rotation.
        restart_with(&mut env, &url, Some(&new_key), Some(TEST_MASTER_KEY), false).await;
        let env = Arc::new(env);

        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let calls = Arc::new(AtomicU64::new(0));
        let mut traffic = Vec::new();
        for (n, instance) in instances.iter().enumerate() {
            let (env, stop, failures, calls, instance) = (
                Arc::clone(&env),
                Arc::clone(&stop),
                Arc::clone(&failures),
                Arc::clone(&calls),
                instance.clone(),
            );
            traffic.push(tokio::spawn(async move {
                let token = instance["token"].as_str().unwrap().to_string();
                let id = instance["id"].as_i64().unwrap();
                let mut round = 0u64;
                let mut last_patch: Option<String> = None;
                loop {
                    round += 1;
                    let (status, body) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
                    if status != 200 {
                        failures.lock().unwrap().push(format!("proxy {id}: {status} {body}"));
                    }
                    let shown = call(&env, Method::GET, &env.api(&format!("/instances/{id}")), Some(&env.org.with_element(&token)), None).await;
                    if shown.status != 200 {
                        failures.lock().unwrap().push(format!("get {id}: {} {}", shown.status, shown.body));
                    }
                    if round % 3 == (n as u64) % 3 {
                        let refreshed = call(&env, Method::POST, &env.api(&format!("/instances/{id}/tokens/refresh")), Some(&env.org.platform()), None).await;
                        if refreshed.status != 200 {
                            failures.lock().unwrap().push(format!("refresh {id}: {} {}", refreshed.status, refreshed.body));
                        }
                    } else {
                        let patched = call(&env, Method::PATCH, &env.api(&format!("/instances/{id}")), Some(&env.org.platform()),
                                           Some(json!({"configuration": {"signing.secret": format!("s-{id}-{round}")}}))).await;
                        if patched.status != 200 {
                            failures.lock().unwrap().push(format!("patch {id}: {} {}", patched.status, patched.body));
                        }
                        last_patch = Some(format!("s-{id}-{round}"));
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) {
                        // The last value written must survive the rotation.
                        return (id, last_patch);
                    }
                }
            }));
        }
        while calls.load(Ordering::Relaxed) < 20 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let output = rotate_keys(&url, &new_key).await;
        let progress = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "[{label}] keys rotate: {progress}");
        // Not a terminal: the progress bar prints a line per tenth, ending at 100%.
        assert!(
            progress.contains("100% (") && progress.contains("instances re-sealed"),
            "[{label}] progress: {progress}"
        );
        let during = calls.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        let mut last_secrets = Vec::new();
        for task in traffic {
            last_secrets.push(task.await.unwrap());
        }
        let failures = failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "[{label}] traffic failed during the rotation ({during} rounds):\n{}",
            failures.join("\n")
        );
        let Ok(env) = Arc::try_unwrap(env) else {
            panic!("traffic tasks still hold the env")
        };
        let mut env = env;

        // Only the new key from now on.
        restart_with(&mut env, &url, Some(&new_key), None, false).await;
        // The waiting event's signing key opens with the new key alone.
        {
            use base64::Engine as _;
            let app = &env.server.app;
            let pending = app.store.list_pending_event_payloads().await.unwrap();
            assert!(!pending.is_empty(), "[{label}] no event waits for delivery");
            for (id, payload) in pending {
                let payload: Value = serde_json::from_str(&payload).unwrap();
                let sealed = base64::engine::general_purpose::STANDARD
                    .decode(payload["delivery"]["key"].as_str().unwrap())
                    .unwrap();
                let binding = tokenwarden::crypto::Binding {
                    table: "events",
                    row: 0,
                    field: &id,
                };
                assert_eq!(
                    app.keyring.open(&sealed, binding).ok().as_deref(),
                    Some(b"rot-signing-key".as_slice()),
                    "[{label}] event {id}: its signing key was not re-sealed"
                );
            }
        }
        for (instance, (id, last_secret)) in instances.iter().zip(&last_secrets) {
            let shown = revealed(&env, &env.org, instance).await;
            assert_eq!(shown["valid"], true, "[{label}] {shown}");
            assert!(
                shown["configuration"]["oauth.user.token"]
                    .as_str()
                    .is_some_and(|t| t.len() > 8)
            );
            if let Some(last_secret) = last_secret {
                assert_eq!(
                    shown["configuration"]["signing.secret"],
                    last_secret.as_str(),
                    "[{label}] instance {id}: an update made during the rotation was lost"
                );
            }
            let (status, body) = env
                .proxy(
                    &env.org,
                    instance["token"].as_str().unwrap(),
                    Method::GET,
                    "api/me",
                )
                .await;
            assert_eq!(status, 200, "[{label}] {body}");
            let refreshed = call(
                &env,
                Method::POST,
                &env.api(&format!("/instances/{id}/tokens/refresh")),
                Some(&env.org.platform()),
                None,
            )
            .await;
            assert_eq!(refreshed.status, 200, "[{label}] {}", refreshed.body);
        }
        let listed = call(
            &env,
            Method::GET,
            &env.api("/instances"),
            Some(&env.org.platform()),
            None,
        )
        .await;
        assert_eq!(listed.status, 200, "[{label}] {}", listed.body);
        // The organization's webhook secret opens under the new key alone.
        let app = &env.server.app;
        let organization = app
            .store
            .get_organization(env.org.id)
            .await
            .unwrap()
            .unwrap();
        app.keyring
            .open(
                &organization.webhook_secret_enc,
                tokenwarden::crypto::Binding {
                    table: "organizations",
                    row: organization.id,
                    field: "webhook_secret",
                },
            )
            .unwrap_or_else(|e| panic!("[{label}] webhook secret after rotation: {e}"));
        // The PKCE authorization begun before the rotation completes, with the client secret
        // it was given (re-sealed with its verifier).
        let finished = call(&env, Method::POST, &env.api("/instances"), Some(&env.org.platform()),
                            Some(json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": pending_code, "state": pending_state},
                                        "configuration": {"oauth.api.key": crate::harness::CLIENT_ID,
                                                          "oauth.callback.url": pending_callback}}))).await;
        assert_eq!(
            finished.status, 200,
            "[{label}] pending PKCE state after rotation: {}",
            finished.body
        );
        env.stop().await;
    }
}

/// One instance whose stored secrets open with no key (here its access token was copied into
/// its refresh token's column, where the binding does not match) does not stop the rotation:
/// it is named and left as it is, the exit status is 2, and the instances after it are
/// re-sealed all the same (the first such row ended the whole rotation).
#[tokio::test]
async fn a_row_no_key_opens_is_named_and_the_rest_rotated() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let mut env = Env::start(&label, &url).await;
    // Rows are re-sealed in id order, and ids are random: the lower of two is damaged, so
    // that the other comes after it.
    let first = env
        .create_instance(&env.org, "sandbox-generic", "one")
        .await;
    let second = env
        .create_instance(&env.org, "sandbox-generic", "two")
        .await;
    let (damaged, after) = if first["id"].as_i64() < second["id"].as_i64() {
        (first, second)
    } else {
        (second, first)
    };
    let damaged_id = damaged["id"].as_i64().unwrap();
    {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query("UPDATE instances SET refresh_token_enc = access_token_enc WHERE id = $1")
            .bind(damaged_id)
            .execute(&mut db)
            .await
            .unwrap();
    }
    let (_, new_key) = tokenwarden::crypto::MasterKey::generate();
    let new_key = new_key.expose().to_string();
    // The service on the new key, the old one among its previous keys, as the rotation asks.
    restart_with(&mut env, &url, Some(&new_key), Some(TEST_MASTER_KEY), false).await;
    let output = rotate_keys(&url, &new_key).await;
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "[{label}] {said}");
    assert!(
        said.contains(&format!("instance {damaged_id}")),
        "[{label}] {said}"
    );
    // The damaged instance deleted, as the command says (kept, it holds values under the old
    // key, and a start without that key is refused).
    let deleted = call(
        &env,
        Method::DELETE,
        &env.api(&format!("/instances/{damaged_id}")),
        Some(&env.org.platform()),
        None,
    )
    .await;
    assert_eq!(deleted.status, 200, "[{label}] {}", deleted.body);
    // The instance after the damaged one (and the organization's secrets) under the new key.
    restart_with(&mut env, &url, Some(&new_key), None, false).await;
    let shown = revealed(&env, &env.org, &after).await;
    assert_eq!(shown["valid"], true, "[{label}] {shown}");
    assert!(
        shown["configuration"]["oauth.user.refresh_token"]
            .as_str()
            .is_some_and(|t| t.len() > 8),
        "[{label}] {shown}"
    );
    env.stop().await;
    crate::support::drop_test_database(&url).await;
}

/// A webhook waiting to be delivered whose signing key no key opens is named by `keys rotate`
/// like the other rows, with exit status 2: it was skipped in silence, and once the old key
/// was dropped the webhook could never be signed.
#[tokio::test]
async fn a_pending_webhook_no_key_opens_is_named() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "hooked")
        .await;
    let id = created["id"].as_i64().unwrap();
    let patched = call(
        &env,
        Method::PATCH,
        &env.api(&format!("/instances/{id}")),
        Some(&env.org.platform()),
        Some(json!({"configuration": {"event.notification.enabled": "true",
                                      "event.notification.callback.url": "http://127.0.0.1:9/down"}})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    for _ in 0..2 {
        let refreshed = call(
            &env,
            Method::POST,
            &env.api(&format!("/instances/{id}/tokens/refresh")),
            Some(&env.org.platform()),
            None,
        )
        .await;
        assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    }
    env.stop().await;
    // One event's key given the other's: sealed for another event, it opens for neither id.
    let damaged = {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
        let pending: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, payload FROM events WHERE delivery_state = 'pending' ORDER BY id",
        )
        .fetch_all(&mut db)
        .await
        .unwrap();
        assert_eq!(pending.len(), 2, "{pending:?}");
        let other: Value = serde_json::from_str(&pending[1].1).unwrap();
        let mut payload: Value = serde_json::from_str(&pending[0].1).unwrap();
        payload["delivery"]["key"] = other["delivery"]["key"].clone();
        sqlx::query("UPDATE events SET payload = $1 WHERE id = $2")
            .bind(payload.to_string())
            .bind(pending[0].0.clone())
            .execute(&mut db)
            .await
            .unwrap();
        pending[0].0.clone()
    };
    let (_, new_key) = tokenwarden::crypto::MasterKey::generate();
    let output = rotate_keys(&url, new_key.expose()).await;
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{said}");
    assert!(said.contains(&format!("event {damaged}")), "{said}");
    crate::support::drop_test_database(&url).await;
}

/// The start-up key check reads the newest and the oldest organizations' secrets, each once,
/// on both engines.
#[tokio::test]
async fn the_key_check_samples_both_ends_of_the_organizations() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let mut made = vec![env.org.id];
        for n in 0..19 {
            let created =
                tokenwarden::orgs::create_organization(&env.server.app, &format!("org {n}"))
                    .await
                    .unwrap();
            made.push(created.organization_id);
        }
        let sample = env
            .server
            .app
            .store
            .organization_secrets_sample(8)
            .await
            .unwrap();
        let ids: Vec<i64> = sample.iter().map(|(id, _)| *id).collect();
        let mut distinct = ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!((ids.len(), distinct.len()), (16, 16), "[{label}] {ids:?}");
        // The first, made before the others (at start): among the oldest.
        assert!(ids.contains(&made[0]), "[{label}] {ids:?}");
        env.stop().await;
        crate::support::drop_test_database(&url).await;
    }
}

/// A rotation killed half-way (the lower ids re-sealed, the rest not, the organizations last):
/// a start with either key alone is refused and names the unfinished rotation, where one with
/// the new key alone blamed the key ("opens none of this database's secrets") and one with the
/// old key alone started healthy and answered 500 for every re-sealed instance. Both keys
/// start; so does a lost key, when asked to.
#[tokio::test]
async fn a_rotation_stopped_half_way_is_named_at_the_start() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let mut ids = Vec::new();
        for n in 0..4 {
            let made = env
                .create_instance(&env.org, "sandbox-generic", &format!("half-{n}"))
                .await;
            ids.push(made["id"].as_i64().unwrap());
        }
        ids.sort_unstable();
        let Env {
            server, sandbox, ..
        } = env;
        server.shutdown().await;
        let old = tokenwarden::crypto::Keyring::new(
            tokenwarden::crypto::MasterKey::from_base64(TEST_MASTER_KEY).unwrap(),
            vec![],
        );
        let (new_key, new_text) = tokenwarden::crypto::MasterKey::generate();
        let new = tokenwarden::crypto::Keyring::new(new_key, vec![]);
        {
            use sqlx::Connection;
            sqlx::any::install_default_drivers();
            let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
            // The lowest id re-sealed under the new key, as `keys rotate` would have.
            let binding = tokenwarden::crypto::Binding {
                table: "instances",
                row: ids[0],
                field: "token",
            };
            let sealed: Vec<u8> =
                sqlx::query_scalar("SELECT token_enc FROM instances WHERE id = $1")
                    .bind(ids[0])
                    .fetch_one(&mut db)
                    .await
                    .unwrap();
            let token = old.open(&sealed, binding).unwrap();
            sqlx::query("UPDATE instances SET token_enc = $1 WHERE id = $2")
                .bind(new.seal(&token, binding))
                .bind(ids[0])
                .execute(&mut db)
                .await
                .unwrap();
            let _ = db.close().await;
        }
        let new_text = new_text.expose().to_string();
        let start = |key: &str, previous: Option<&str>, ignore: bool| {
            let mut config = tokenwarden::app::AppConfig::new(&url);
            config.master_key = Some(key.to_string());
            config.previous_master_keys = previous.map(str::to_string);
            config.ignore_missing_keys = ignore;
            config.background_tasks = false;
            tokenwarden::app::App::build(config)
        };
        for (key, name) in [
            (new_text.as_str(), "the new key"),
            (TEST_MASTER_KEY, "the old key"),
        ] {
            let refused = start(key, None, false).await.err().map(|e| e.to_string());
            assert!(
                refused
                    .as_deref()
                    .is_some_and(|why| why.contains("has not finished")
                        && why.contains("TOKENWARDEN_PREVIOUS_MASTER_KEYS")),
                "[{label}] {name} alone: {refused:?}"
            );
        }
        assert!(
            start(&new_text, Some(TEST_MASTER_KEY), false).await.is_ok(),
            "[{label}] both keys"
        );
        assert!(
            start(TEST_MASTER_KEY, None, true).await.is_ok(),
            "[{label}] asked to ignore"
        );
        // Stopped later: the instances re-sealed, the organizations and the key check (last)
        // not. The new key alone named the check "another replica's key", and asked to ignore
        // the old key, it still refused: nothing could run on the new key, not even the
        // rotation that would end it.
        {
            use sqlx::Connection;
            let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
            // (The organizations' webhook secrets stay under the old key, which is lost: the
            // rotation told so makes them new ones, as an organization cannot be deleted.)
            for (table, column, field) in [("instances", "token_enc", "token")] {
                let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id, {column} FROM {table}"
                )))
                .fetch_all(&mut db)
                .await
                .unwrap();
                for (id, sealed) in rows {
                    let binding = tokenwarden::crypto::Binding {
                        table,
                        row: id,
                        field,
                    };
                    let Ok(plain) = old.open(&sealed, binding) else {
                        continue;
                    };
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE {table} SET {column} = $1 WHERE id = $2"
                    )))
                    .bind(new.seal(&plain, binding))
                    .bind(id)
                    .execute(&mut db)
                    .await
                    .unwrap();
                }
            }
            let _ = db.close().await;
        }
        let refused = start(&new_text, None, false)
            .await
            .err()
            .map(|e| e.to_string());
        assert!(
            refused
                .as_deref()
                .is_some_and(|why| why.contains("has not finished")),
            "[{label}] the new key alone, the check not re-sealed: {refused:?}"
        );
        assert!(
            start(&new_text, None, true).await.is_ok(),
            "[{label}] the old key lost: asked to ignore it"
        );
        // The rotation run with the old key lost seals the check anew: the new key alone starts.
        let output = {
            let (url, new_text) = (url.clone(), new_text.clone());
            tokio::task::spawn_blocking(move || {
                binary()
                    .args([
                        "keys",
                        "rotate",
                        "--ignore-missing-keys",
                        "--database-url",
                        &url,
                    ])
                    .env("TOKENWARDEN_MASTER_KEY", &new_text)
                    .env_remove("TOKENWARDEN_PREVIOUS_MASTER_KEYS")
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        };
        assert!(
            matches!(output.status.code(), Some(0 | 2)),
            "[{label}] {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            start(&new_text, None, false).await.is_ok(),
            "[{label}] the check under the new key"
        );
        sandbox.shutdown().await;
        crate::support::drop_test_database(&url).await;
    }
}

/// An instance whose stored secrets do not open (here one altered in the database; a key lost
/// the same) is answered as the list shows it, not with a 500: a GET shows `state: unreadable`,
/// a disable and an enable are made and answered 200 (they were made and answered 500), and
/// what needs its tokens (a refresh, a PATCH) is refused with a 409 that says why and what to
/// do, before anything changes; a revocation invalidates it and answers a 409 (it answered 502
/// "send it again", which could never succeed).
#[tokio::test]
async fn an_unreadable_instance_is_answered_not_failed() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let damaged = env
        .create_instance(&env.org, "sandbox-generic", "altered")
        .await;
    let id = damaged["id"].as_i64().unwrap();
    {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query("UPDATE instances SET refresh_token_enc = access_token_enc WHERE id = $1")
            .bind(id)
            .execute(&mut db)
            .await
            .unwrap();
    }
    env.server.app.refresh.forget(id);
    let platform = env.org.platform();
    let path = |rest: &str| env.api(&format!("/instances/{id}{rest}"));
    let shown = call(&env, Method::GET, &path(""), Some(&platform), None).await;
    assert_eq!(shown.status, 200, "{}", shown.body);
    assert_eq!(shown.body["state"], "unreadable", "{}", shown.body);
    for (method, disabled) in [(Method::DELETE, true), (Method::PUT, false)] {
        let answer = call(&env, method, &path("/enabled"), Some(&platform), None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body["disabled"], disabled, "{}", answer.body);
        assert_eq!(answer.body["state"], "unreadable", "{}", answer.body);
    }
    for (method, rest, body) in [
        (Method::POST, "/tokens/refresh", None),
        (Method::PATCH, "", Some(json!({"name": "renamed"}))),
    ] {
        let answer = call(&env, method, &path(rest), Some(&platform), body).await;
        assert_eq!(answer.status, 409, "{rest}: {}", answer.body);
        assert!(
            answer.body["message"]
                .as_str()
                .is_some_and(|m| m.contains("do not open") && m.contains("delete the instance")),
            "{rest}: {}",
            answer.body
        );
    }
    // Nothing changed: still valid, never invalidated.
    let shown = call(&env, Method::GET, &path(""), Some(&platform), None).await;
    assert_eq!(shown.body["valid"], true, "{}", shown.body);
    let (_, events) = env
        .get_json(
            &env.api(&format!(
                "/events?instanceId={id}&type=instance.invalidated"
            )),
            &platform,
        )
        .await;
    assert_eq!(events["events"].as_array().unwrap().len(), 0, "{events}");
    // A revocation invalidates it all the same (the contract: no replica uses the grant
    // again), and says with a 409, which sending it again will not change, that the provider
    // was not asked.
    let revoked = call(
        &env,
        Method::POST,
        &path("/tokens/revoke"),
        Some(&platform),
        None,
    )
    .await;
    assert_eq!(revoked.status, 409, "{}", revoked.body);
    assert!(
        revoked.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("do not open")),
        "{}",
        revoked.body
    );
    let shown = call(&env, Method::GET, &path(""), Some(&platform), None).await;
    assert_eq!(shown.body["valid"], false, "{}", shown.body);
    let deleted = call(&env, Method::DELETE, &path(""), Some(&platform), None).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    env.stop().await;
    crate::support::drop_test_database(&url).await;
}

/// A replica that reads instances sealed under a master key it was not given (left out of a
/// rotation, started with the new key alone too early) says so in `/healthz` (`degraded`, with
/// the key to give), where it answered `ok` while every such instance answered 409.
#[tokio::test]
async fn a_replica_missing_a_key_says_so_in_its_health() {
    let url = crate::support::sqlite_database();
    let mut env = Env::start("sqlite", &url).await;
    let healthz = |env: &Env| {
        let url = format!("{}/healthz", env.server.url);
        let http = env.http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    // A replica on the new key (the old one among its previous keys) seals an instance.
    let (_, new_key) = tokenwarden::crypto::MasterKey::generate();
    let new_key = new_key.expose().to_string();
    restart_with(&mut env, &url, Some(&new_key), Some(TEST_MASTER_KEY), false).await;
    let instance = env
        .create_instance(&env.org, "sandbox-generic", "sealed-new")
        .await;
    let id = instance["id"].as_i64().unwrap();
    assert_eq!(healthz(&env).await["status"], "ok");
    // A replica forgotten in the rotation: the old key alone (started anyway, as a replica
    // already running when the rotation began would be; the start check names the key).
    restart_with(&mut env, &url, None, None, true).await;
    assert_eq!(healthz(&env).await["status"], "ok", "nothing read yet");
    let shown = call(
        &env,
        Method::GET,
        &env.api(&format!("/instances/{id}")),
        Some(&env.org.platform()),
        None,
    )
    .await;
    assert_eq!(shown.body["state"], "unreadable", "{}", shown.body);
    let health = healthz(&env).await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("TOKENWARDEN_PREVIOUS_MASTER_KEYS")),
        "{health}"
    );
    env.stop().await;
    crate::support::drop_test_database(&url).await;
}

/// `keys rotate` run while a replica still seals under the old key (after the first round of
/// restarts only, or with a replica forgotten) is refused, naming the replica: it ran "100 %",
/// and that replica's refreshes sealed the instances in use under the old key again.
#[tokio::test]
async fn a_rotation_waits_for_every_replica_to_seal_under_the_new_key() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        env.create_instance(&env.org, "sandbox-generic", "round-one")
            .await;
        let (_, new_key) = tokenwarden::crypto::MasterKey::generate();
        let new_key = new_key.expose().to_string();
        let refused = rotate_keys(&url, &new_key).await;
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "[{label}] {said}");
        assert!(
            said.contains(&env.server.app.replica_id) && said.contains("second round"),
            "[{label}] {said}"
        );
        // Asked to anyway.
        let (url_, key_) = (url.clone(), new_key.clone());
        let forced = tokio::task::spawn_blocking(move || {
            binary()
                .args(["keys", "rotate", "--force", "--database-url", &url_])
                .env("TOKENWARDEN_MASTER_KEY", &key_)
                .env("TOKENWARDEN_PREVIOUS_MASTER_KEYS", TEST_MASTER_KEY)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            forced.status.success(),
            "[{label}] {}",
            String::from_utf8_lossy(&forced.stderr)
        );
        env.stop().await;
        crate::support::drop_test_database(&url).await;
    }
}
