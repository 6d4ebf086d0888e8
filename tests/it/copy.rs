//! `tokenwarden database copy`: a deployment that outgrew one machine moves its SQLite database
//! into PostgreSQL and every connection goes on working there — same ids, same Element tokens,
//! same secrets, the refresh tokens the provider last gave, its events and audit log.

use std::process::Command;

use reqwest::Method;
use serde_json::{Value, json};
use tokenwarden::store::Store;
use tokenwarden::store::copy::{CopyError, copy_database};

use crate::harness::{Env, start_server};
use crate::support::{create_postgres_database, drop_test_database, sqlite_database};

fn tokenwarden(args: Vec<String>, envs: Vec<(&'static str, String)>) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(args)
        .env_remove("TOKENWARDEN_MASTER_KEY")
        .env_remove("TOKENWARDEN_PREVIOUS_MASTER_KEYS")
        .env_remove("TOKENWARDEN_DATABASE_URL")
        .envs(envs)
        .output()
        .expect("the binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn run(args: &[&str], envs: Vec<(&'static str, String)>) -> (bool, String, String) {
    let args = args.iter().map(|arg| arg.to_string()).collect();
    tokio::task::spawn_blocking(move || tokenwarden(args, envs))
        .await
        .unwrap()
}

/// The JSON a GET answers.
async fn read(http: &reqwest::Client, url: &str, authorization: &str) -> Value {
    http.get(url)
        .header("authorization", authorization)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `tokenwarden database copy` from `from` into `to`.
async fn copy(from: &str, to: &str, envs: Vec<(&'static str, String)>) -> (bool, String, String) {
    run(
        &["database", "copy", "--database-url", from, "--to", to],
        envs,
    )
    .await
}

/// PostgreSQL for a test that needs it; `None` (with a warning) where there is none, outside CI.
async fn postgres() -> Option<String> {
    match create_postgres_database().await {
        Ok(url) => Some(url),
        Err(error) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("warning: PostgreSQL unreachable ({error}); the copy test is skipped");
            None
        }
        Err(error) => panic!("PostgreSQL is required under CI=true: {error}"),
    }
}

#[tokio::test]
async fn a_sqlite_deployment_copied_into_postgres_keeps_every_connection() {
    let Some(postgres_url) = postgres().await else {
        return;
    };
    let sqlite_url = sqlite_database();
    // The SQLite deployment as `serve` makes it by default: its master key in a key file.
    let env = Env::start_adjusted("sqlite", &sqlite_url, |config| config.master_key = None).await;
    // Box rotates its refresh tokens: a copy holding any but the last one is a dead grant.
    let instance = env.create_instance(&env.org, "sandbox-box", "dana").await;
    let id = instance["id"].as_i64().unwrap();
    let element_token = instance["token"].as_str().unwrap().to_string();
    let refresh = |env: &Env| {
        env.http
            .post(env.api(&format!("/instances/{id}/tokens/refresh")))
            .header("authorization", env.org.platform())
            .send()
    };
    assert_eq!(refresh(&env).await.unwrap().status(), 200);
    let (status, me) = env
        .proxy(&env.org, &element_token, Method::GET, "api/me")
        .await;
    assert_eq!(status, 200, "{me}");
    let (_, events_before) = env.get_json(&env.api("/events"), &env.org.platform()).await;
    let events_before = events_before["events"].as_array().unwrap().len();
    assert!(events_before > 0);
    let Env {
        server,
        sandbox,
        org,
        http,
        ..
    } = env;
    server.shutdown().await;

    let sqlite_file = sqlite_url.strip_prefix("sqlite://").unwrap().to_string();
    let key_file = format!("{sqlite_file}.key");
    let (ok, stdout, stderr) = copy(&sqlite_url, &postgres_url, vec![]).await;
    assert!(ok, "{stderr}");
    let copied: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(copied["copied"]["organizations"], 1, "{copied}");
    assert_eq!(copied["copied"]["instances"], 1, "{copied}");
    assert_eq!(copied["copied"]["events"], events_before, "{copied}");
    assert!(
        copied["copied"]["audit_logs"].as_u64().unwrap() > 0,
        "{copied}"
    );
    assert!(
        stderr.contains("TOKENWARDEN_MASTER_KEY") && stderr.contains(&key_file),
        "says which key the copy needs: {stderr}"
    );

    // The source is marked: a service started on it again is refused, naming the copy.
    let refused = tokenwarden::app::App::build({
        let mut config = tokenwarden::app::AppConfig::new(&sqlite_url);
        config.background_tasks = false;
        config
    })
    .await
    .err()
    .map(|error| error.to_string());
    assert!(
        refused
            .as_deref()
            .is_some_and(|why| why.contains("was copied to") && why.contains("database reopen")),
        "{refused:?}"
    );

    // Copied once: a second copy is refused (another live copy of the same grants), and so is
    // one into a target that holds rows (the marked source reopened for the test).
    let (ok, _, stderr) = copy(&sqlite_url, &postgres_url, vec![]).await;
    assert!(!ok && stderr.contains("already"), "{stderr}");
    let (ok, _, stderr) = run(
        &["database", "reopen", "--database-url", &sqlite_url],
        vec![],
    )
    .await;
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = copy(&sqlite_url, &postgres_url, vec![]).await;
    assert!(!ok && stderr.contains("not empty"), "{stderr}");
    // Nor into itself.
    let (ok, _, stderr) = copy(&sqlite_url, &sqlite_url, vec![]).await;
    assert!(!ok && stderr.contains("names the source"), "{stderr}");

    // The service on the copy, with the key from the file: the same instance, Element token,
    // secrets and refresh token.
    let key = std::fs::read_to_string(&key_file).unwrap();
    let server = start_server(&postgres_url, &sandbox.url, |config| {
        config.master_key = Some(key.trim().to_string());
    })
    .await;
    let api = |path: &str| format!("{}/elements/api-v2{path}", server.url);
    // The events and the audit log go on where they were (the audit log's ids too: a new
    // entry takes the next one, where it would have collided with a copied one).
    let audit = || async {
        let audit: Value = read(&http, &api("/audit-logs"), &org.platform()).await;
        audit["auditLogs"].as_array().unwrap().clone()
    };
    let audited_before = audit().await;
    assert!(
        audited_before
            .iter()
            .any(|entry| entry["action"] == "instance.created"),
        "{audited_before:?}"
    );
    let renamed = http
        .patch(api(&format!("/instances/{id}")))
        .header("authorization", org.platform())
        .json(&json!({"name": "Dana, moved"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), 200, "{}", renamed.text().await.unwrap());
    let audited = audit().await;
    assert_eq!(audited.len(), audited_before.len() + 1, "{audited:?}");
    assert!(
        audited
            .iter()
            .any(|entry| entry["action"] == "instance.updated"),
        "{audited:?}"
    );
    let (status, me) = {
        let response = http
            .get(api("/proxy/api/me"))
            .header("authorization", org.through(&element_token))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    assert_eq!(status, 200, "{me}");
    // The refresh token copied is the one Box gave last: refreshing works, and keeps working.
    for _ in 0..2 {
        let refreshed = http
            .post(api(&format!("/instances/{id}/tokens/refresh")))
            .header("authorization", org.platform())
            .send()
            .await
            .unwrap();
        assert_eq!(
            refreshed.status(),
            200,
            "{}",
            refreshed.text().await.unwrap()
        );
    }
    let shown: Value = read(&http, &api(&format!("/instances/{id}")), &org.platform()).await;
    assert_eq!(shown["valid"], true, "{shown}");
    let events: Value = read(&http, &api("/events"), &org.platform()).await;
    assert!(
        events["events"].as_array().unwrap().len() > events_before,
        "{events}"
    );
    server.shutdown().await;

    // And back from PostgreSQL into a new SQLite file, with the key given: no key file is made
    // (the copy opens with the key given), and every row comes along.
    let back_url = sqlite_database();
    let (ok, stdout, stderr) = copy(
        &postgres_url,
        &back_url,
        vec![("TOKENWARDEN_MASTER_KEY", key.trim().to_string())],
    )
    .await;
    assert!(ok, "{stderr}");
    let back: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(back["copied"]["instances"], 1, "{back}");
    assert!(
        back["copied"]["events"].as_u64().unwrap() > events_before as u64,
        "{back}"
    );
    assert!(stderr.contains("same TOKENWARDEN_MASTER_KEY"), "{stderr}");

    sandbox.shutdown().await;
    drop_test_database(&postgres_url).await;
    drop_test_database(&sqlite_url).await;
    drop_test_database(&back_url).await;
    let _ = std::fs::remove_file(key_file);
}

enum Arg {
    Int(i64),
    Bytes(Vec<u8>),
}

/// Another process's write, on a connection of its own, run to its end on a thread of its own
/// (the copy may be holding its snapshot meanwhile, inside a synchronous callback).
fn write_elsewhere(url: String, sql: &'static str, args: Vec<Arg>) {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                use sqlx::Connection;
                sqlx::any::install_default_drivers();
                let mut connection = sqlx::AnyConnection::connect(&url).await.unwrap();
                let mut query = sqlx::query(sql);
                for arg in args {
                    query = match arg {
                        Arg::Int(value) => query.bind(value),
                        Arg::Bytes(value) => query.bind(value),
                    };
                }
                query.execute(&mut connection).await.unwrap();
                let _ = connection.close().await;
            })
    })
    .join()
    .unwrap()
}

/// A service still running on the source refreshes while the copy reads: a copy committed then
/// would hold a refresh token the provider has retired. Nothing is written.
#[tokio::test]
async fn a_source_that_changes_while_it_is_copied_is_not_copied() {
    let mut pairs = vec![(sqlite_database(), sqlite_database())];
    if let Some(postgres_url) = postgres().await {
        pairs.push((postgres_url, sqlite_database()));
    }
    for (source_url, target_url) in pairs {
        let source = Store::connect(&source_url).await.unwrap();
        let target = Store::connect(&target_url).await.unwrap();
        let insert_organization = |url: String, id: i64| {
            write_elsewhere(
                url,
                "INSERT INTO organizations (id, name, secret_hash, webhook_secret_enc, created_at) VALUES ($1, 'o', $2, $3, 0)",
                vec![
                    Arg::Int(id),
                    Arg::Bytes(id.to_be_bytes().to_vec()),
                    Arg::Bytes(vec![0u8; 4]),
                ],
            )
        };
        insert_organization(source_url.clone(), 1);
        let mut written = false;
        let result = copy_database(&source, &target, "the target", |table, _| {
            if table == "users" && !written {
                written = true;
                insert_organization(source_url.clone(), 2);
            }
        })
        .await;
        assert!(
            matches!(&result, Err(CopyError::SourceChanged(what)) if what.contains("organizations")),
            "[{source_url}] {result:?}"
        );
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM organizations")
            .fetch_one(&sqlx::AnyPool::connect(&target_url).await.unwrap())
            .await
            .unwrap();
        assert_eq!(held, 0, "nothing written");
        // A refresh under way (its lease held) commits after any comparison: refused too.
        let lease = |until: i64| {
            write_elsewhere(
                source_url.clone(),
                "INSERT INTO instances (id, organization_id, element_key, name, token_hash, token_enc, created_at, updated_at, refresh_lease_until) \
                 VALUES (7, 1, 'sandbox-generic', 'i', $1, $2, 0, 0, $3) \
                 ON CONFLICT (id) DO UPDATE SET refresh_lease_until = $3",
                vec![
                    Arg::Bytes(vec![7u8; 8]),
                    Arg::Bytes(vec![0u8; 40]),
                    Arg::Int(until),
                ],
            )
        };
        lease(tokenwarden::app::now_ms() + 60_000);
        let result = copy_database(&source, &target, "the target", |_, _| {}).await;
        assert!(
            matches!(&result, Err(CopyError::SourceChanged(what)) if what.contains("under way")),
            "[{source_url}] {result:?}"
        );
        lease(0);
        // Once the source is still, the copy is made.
        let copied = copy_database(&source, &target, "the target", |_, _| {})
            .await
            .unwrap();
        assert_eq!(copied.rows("organizations"), 2);
        source.close().await;
        target.close().await;
        drop_test_database(&source_url).await;
        drop_test_database(&target_url).await;
    }
}

/// A service running on the source, even one doing nothing a comparison would see, refuses the
/// copy (it says every 10 s that it runs, and goodbye at its stop); once stopped the copy is
/// made, and the source, marked, starts again only after `database reopen`.
#[tokio::test]
async fn a_source_a_service_runs_on_is_not_copied_and_a_copy_can_be_undone() {
    let source_url = sqlite_database();
    let target_url = sqlite_database();
    let env = Env::start("sqlite", &source_url).await;
    let key = vec![(
        "TOKENWARDEN_MASTER_KEY",
        crate::harness::TEST_MASTER_KEY.to_string(),
    )];
    let store = &env.server.app.store;
    let since = tokenwarden::app::now_ms() - 60_000;
    assert!(
        crate::scheduler::eventually(std::time::Duration::from_secs(5), || async {
            !store.replicas_seen_since(since).await.unwrap().is_empty()
        })
        .await,
        "the running service said so"
    );
    let (ok, _, stderr) = copy(&source_url, &target_url, key.clone()).await;
    assert!(
        !ok && stderr.contains("a service runs on the source"),
        "{stderr}"
    );
    env.stop().await;
    let (ok, _, stderr) = copy(&source_url, &target_url, key.clone()).await;
    assert!(ok, "{stderr}");
    let build = || {
        let mut config = tokenwarden::app::AppConfig::new(&source_url);
        config.master_key = Some(crate::harness::TEST_MASTER_KEY.to_string());
        config.background_tasks = false;
        tokenwarden::app::App::build(config)
    };
    assert!(build().await.is_err(), "the copied source is refused");
    let (ok, stdout, stderr) = run(
        &["database", "reopen", "--database-url", &source_url],
        vec![],
    )
    .await;
    assert!(ok, "{stderr}");
    let reopened: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(reopened["reopened"], true, "{reopened}");
    assert_eq!(reopened["wasCopiedTo"], target_url, "{reopened}");
    assert!(build().await.is_ok(), "reopened, it starts");
    drop_test_database(&source_url).await;
    drop_test_database(&target_url).await;
}

/// A service paused past the copy's wait (a frozen machine, a replica cut off from its
/// database) finds its database copied away when it runs again, and stops: it kept serving and
/// refreshing the grants the copy holds.
#[tokio::test]
async fn a_service_that_finds_its_database_copied_away_stops() {
    let source_url = sqlite_database();
    let target_url = sqlite_database();
    let env = Env::start("sqlite", &source_url).await;
    let store = &env.server.app.store;
    assert!(
        crate::scheduler::eventually(std::time::Duration::from_secs(5), || async {
            !store.replicas_seen_since(0).await.unwrap().is_empty()
        })
        .await
    );
    // Its last word is old, as a paused one's is.
    write_elsewhere(
        source_url.clone(),
        "UPDATE replicas SET seen_at = 0",
        vec![],
    );
    let key = vec![(
        "TOKENWARDEN_MASTER_KEY",
        crate::harness::TEST_MASTER_KEY.to_string(),
    )];
    let (ok, _, stderr) = copy(&source_url, &target_url, key).await;
    assert!(ok, "{stderr}");
    let app = std::sync::Arc::clone(&env.server.app);
    assert!(
        tokio::time::timeout(
            std::time::Duration::from_secs(15),
            app.copied_away.notified()
        )
        .await
        .is_ok(),
        "the service learnt of the copy"
    );
    env.stop().await;
    drop_test_database(&source_url).await;
    drop_test_database(&target_url).await;
}
