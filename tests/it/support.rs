//! Helpers for every integration test: fresh databases on both engines.
//!
//! [`test_databases`] gives a fresh SQLite file and, when PostgreSQL answers on 127.0.0.1:5432
//! (or at `TOKENWARDEN_TEST_PG_URL`, an admin URL), a fresh PostgreSQL database
//! `tw_test_<random>`. Without PostgreSQL the tests run on SQLite alone with a warning, except
//! under `CI=true`, where that is a failure.

#![allow(dead_code)]

use std::path::PathBuf;
use std::str::FromStr;

use sqlx::{ConnectOptions, Connection};
use tokenwarden::store::Store;

/// The admin URLs tried in order, unless `TOKENWARDEN_TEST_PG_URL` names one.
fn postgres_admin_urls() -> Vec<String> {
    match std::env::var("TOKENWARDEN_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => vec![url],
        _ => vec![
            "postgres://postgres@127.0.0.1:5432/postgres".to_string(),
            "postgres://root@127.0.0.1:5432/postgres".to_string(),
        ],
    }
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_string()
}

async fn admin_connection() -> Result<(sqlx::PgConnection, String), String> {
    let mut failures = Vec::new();
    for url in postgres_admin_urls() {
        let options = match sqlx::postgres::PgConnectOptions::from_str(&url) {
            Ok(options) => options.disable_statement_logging(),
            Err(error) => {
                failures.push(format!("{url}: {error}"));
                continue;
            }
        };
        match tokio::time::timeout(
            std::time::Duration::from_secs(5),
            sqlx::PgConnection::connect_with(&options),
        )
        .await
        {
            Ok(Ok(connection)) => return Ok((connection, url)),
            Ok(Err(error)) => failures.push(format!("{url}: {error}")),
            Err(_) => failures.push(format!("{url}: timed out")),
        }
    }
    Err(failures.join("; "))
}

/// Creates `tw_test_<unix seconds>_<random>` and returns its URL. Databases of earlier runs
/// (older than an hour, or named before the time was in the name) are dropped on the way, so a
/// machine that runs the suite every day does not fill up with them.
pub async fn create_postgres_database() -> Result<String, String> {
    let (mut admin, admin_url) = admin_connection().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    drop_stale_databases(&mut admin, now).await;
    let name = format!("tw_test_{now}_{}", random_suffix());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .map_err(|error| format!("CREATE DATABASE {name}: {error}"))?;
    let _ = admin.close().await;
    let mut url = url::Url::parse(&admin_url).map_err(|error| error.to_string())?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

/// Drops `tw_test_` databases of runs that ended long ago (best effort; at most once a minute
/// per process).
async fn drop_stale_databases(admin: &mut sqlx::PgConnection, now: u64) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if now.saturating_sub(LAST.swap(now, std::sync::atomic::Ordering::Relaxed)) < 60 {
        return;
    }
    let Ok(names) = sqlx::query_scalar::<_, String>(
        "SELECT datname FROM pg_database WHERE datname LIKE 'tw\\_test\\_%'",
    )
    .fetch_all(&mut *admin)
    .await
    else {
        return;
    };
    for name in names {
        let created = name
            .strip_prefix("tw_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok())
            .filter(|secs| *secs > 1_000_000_000);
        let stale = created.is_none_or(|secs| now.saturating_sub(secs) > 3600);
        if stale && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut *admin)
            .await;
        }
    }
}

/// A fresh SQLite file in the temporary directory.
pub fn sqlite_database() -> String {
    let path: PathBuf =
        std::env::temp_dir().join(format!("tokenwarden-test-{}.db", random_suffix()));
    format!("sqlite://{}", path.display())
}

/// Fresh databases, one per engine: `("sqlite", url)` and, when PostgreSQL is reachable,
/// `("postgres", url)`.
pub async fn test_databases() -> Vec<(String, String)> {
    let mut databases = vec![("sqlite".to_string(), sqlite_database())];
    match create_postgres_database().await {
        Ok(url) => databases.push(("postgres".to_string(), url)),
        Err(error) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "PostgreSQL is required under CI=true but is unreachable ({error}); start it \
                     with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main \
                     start` or set TOKENWARDEN_TEST_PG_URL"
                );
            }
            eprintln!(
                "warning: PostgreSQL unreachable ({error}); running on SQLite only. Set \
                 TOKENWARDEN_TEST_PG_URL or start PostgreSQL to test both engines."
            );
        }
    }
    databases
}

/// A migrated store on a fresh database, with what it takes to clean up after it.
pub struct TestStore {
    pub label: String,
    pub url: String,
    pub store: Store,
}

impl TestStore {
    /// Closes the store and drops its database (best effort).
    pub async fn cleanup(self) {
        self.store.close().await;
        drop_test_database(&self.url).await;
    }
}

/// Fresh stores, one per engine, migrated.
pub async fn test_stores() -> Vec<TestStore> {
    let mut stores = Vec::new();
    for (label, url) in test_databases().await {
        let store = Store::connect(&url)
            .await
            .unwrap_or_else(|error| panic!("{label}: connect to a fresh database: {error}"));
        stores.push(TestStore { label, url, store });
    }
    stores
}

/// Best-effort removal of a test database made by [`test_databases`]: drops the PostgreSQL
/// database, or deletes the SQLite file and its WAL companions. Errors are ignored.
pub async fn drop_test_database(url: &str) {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
        return;
    }
    let Ok(parsed) = url::Url::parse(url) else {
        return;
    };
    let name = parsed.path().trim_start_matches('/').to_string();
    if !name.starts_with("tw_test_") || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return;
    }
    if let Ok((mut admin, _)) = admin_connection().await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
        let _ = admin.close().await;
    }
}

/// A random application id below 2^53, as the service makes them.
pub fn random_id() -> i64 {
    (uuid::Uuid::new_v4().as_u128() as u64 >> 11) as i64
}
