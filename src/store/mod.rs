//! The store: all SQL of tokenwarden, one [`Store`] over SQLite (one process, the default) and
//! PostgreSQL (several replicas), through `sqlx::Any`.
//!
//! The store sees ciphertexts and hashes only: encryption and hashing happen above it, it never
//! decrypts, and it never logs values (statement logging is off; error messages carry the
//! database's message, which names columns and constraints but not values).
//!
//! # Engines
//! [`Store::connect`] takes `sqlite://path` (created when missing, WAL journal, 5 s busy timeout,
//! foreign keys on) or `postgres://…`, and runs the migrations of that engine
//! (`migrations/sqlite`, `migrations/postgres`, embedded at build time). The SQL is the same for
//! both engines (`$1, $2…` placeholders, `RETURNING`) except where noted: the claim queries use
//! `FOR UPDATE SKIP LOCKED` on PostgreSQL, and SQLite write transactions start with
//! `BEGIN IMMEDIATE` so that they wait for the write lock instead of failing on upgrade.
//!
//! # Schema (both engines; ciphertexts are BLOB on SQLite, BYTEA on PostgreSQL)
//! Ids are BIGINT chosen by the application (random below 2^53; the store never makes ids,
//! except the audit log's autoincrement). Timestamps are epoch milliseconds, flags BIGINT 0/1,
//! JSON is TEXT.
//! - `organizations(id PK, name, secret_hash UNIQUE, webhook_secret_enc, created_at)`
//! - `users(id PK, organization_id → organizations, name, secret_hash UNIQUE, created_at)`
//! - `connectors(organization_id → organizations, key, definition /*JSON*/, created_at,
//!   updated_at, PK(organization_id, key))`
//! - `oauth_states(state_hash PK, organization_id → organizations, element_key, callback_url,
//!   api_key, code_verifier_enc NULL, scope NULL, expires_at, api_secret_enc NULL)`: single
//!   use.
//! - `instances(id PK, organization_id → organizations, element_key, name, token_hash UNIQUE,
//!   token_enc, tags /*JSON array*/, configuration /*JSON object, non-secret keys*/,
//!   access_token_enc, refresh_token_enc, token_response_enc, client_secret_enc,
//!   state 'valid'|'invalid', state_reason, provider_message, disabled, token_version,
//!   access_expires_at, refresh_expires_at, last_refresh_at, next_due_at, refresh_lease_owner,
//!   refresh_lease_until, refresh_in_flight_since, failing_since, failure_count, backoff_until,
//!   last_failure, verification /*JSON*/, created_by, created_at, updated_at)`; indexes on
//!   `(organization_id, created_at)`, a partial index on `next_due_at` over valid, enabled rows
//!   (the scheduler's), and a partial one on `refresh_in_flight_since`.
//! - `events(id PK /*uuid*/, organization_id → organizations, instance_id, element_key,
//!   event_type, reason, occurred_at, payload /*JSON*/, delivery_state
//!   'none'|'pending'|'delivered'|'failed', attempts, next_attempt_at, last_error,
//!   delivered_at)`: the outbox. The column is `event_type`, not `type`, to stay clear of
//!   keywords. Events have no foreign key to instances: they outlive deleted instances.
//! - `audit_logs(id autoincrement PK, organization_id → organizations, user_id, action, target,
//!   request_id, detail, at)`, indexed by `(organization_id, at)`.
//!
//! # Time
//! Everything with a meaning in time (leases, expiry, due dates, backoff) takes `now` from the
//! caller, so the refresh engine can run on an injected clock. Only the `updated_at`
//! bookkeeping columns read the system clock.
//!
//! # Leases and the schedule
//! A refresh lease (`refresh_lease_owner`, `refresh_lease_until`) is taken with one
//! compare-and-set statement; taking one also moves `next_due_at` to at least the lease's end,
//! and a transient failure moves it to at least `backoff_until`. So `MIN(next_due_at)` (served by
//! the index) never points at a row that cannot be claimed yet for long, and a crashed
//! refresher's row comes due again when its lease runs out.

mod rows;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyPool, ConnectOptions, Connection, Transaction};

pub use rows::*;

static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// Which database the store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist (or belongs to another organization), or a referenced row
    /// (organization) does not.
    #[error("not found")]
    NotFound,
    /// A unique constraint refused the write, e.g. a connector key already in use.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A value the database cannot store as text (PostgreSQL refuses the NUL character).
    #[error("invalid text: {0}")]
    InvalidText(String),
    /// Anything else the database said. Never carries a value of an encrypted column.
    #[error("database error: {0}")]
    Database(String),
    /// No connection to the database could be had (refused, timed out, the pool closed):
    /// a passing state, answered 503.
    #[error("the database does not answer: {0}")]
    Unavailable(String),
}

/// The longest round trip of a reading of the database's clock that is believed.
pub const CLOCK_READING_MAX_MS: i64 = 100;

/// The sealed values a pending authorization (`oauth_states`) may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthStateSealed {
    /// The PKCE code verifier.
    Verifier,
    /// The client secret given with the authorization URL's request (`apiSecret`).
    ClientSecret,
}

impl OAuthStateSealed {
    fn name(self) -> &'static str {
        match self {
            OAuthStateSealed::Verifier => "code_verifier_enc",
            OAuthStateSealed::ClientSecret => "api_secret_enc",
        }
    }

    /// The field its seal is bound to: the state's hash (in hex), and for the secret a suffix.
    pub fn binding_field(self, state_hash: &[u8]) -> String {
        match self {
            OAuthStateSealed::Verifier => crate::crypto::hex(state_hash),
            OAuthStateSealed::ClientSecret => {
                format!("{}/api-secret", crate::crypto::hex(state_hash))
            }
        }
    }
}

/// What [`Store::delete_connector`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectorDeletion {
    Deleted,
    NotFound,
    /// Not deleted: this many instances use it.
    InUse(i64),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Database(database_error) if database_error.is_unique_violation() => {
                StoreError::Conflict(database_error.message().to_string())
            }
            sqlx::Error::Database(database_error) if database_error.is_foreign_key_violation() => {
                StoreError::NotFound
            }
            // character_not_in_repertoire, untranslatable_character: a NUL in a text value.
            sqlx::Error::Database(database_error)
                if matches!(database_error.code().as_deref(), Some("22021" | "22P05")) =>
            {
                StoreError::InvalidText(database_error.message().to_string())
            }
            sqlx::Error::Database(database_error) if passing(database_error.as_ref()) => {
                if cannot_write(database_error.as_ref()) {
                    write_failed(database_error.message());
                }
                if sqlite_code(database_error.as_ref()) == Some(SQLITE_READONLY) {
                    SQLITE_REOPEN.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                // A server shutting down or cutting connections (57P01–57P03, class 08): the
                // other pooled connections are likely dead too.
                if database_error
                    .code()
                    .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0"))
                {
                    connections_suspect();
                }
                StoreError::Unavailable(database_error.message().to_string())
            }
            sqlx::Error::Database(database_error) => {
                StoreError::Database(database_error.message().to_string())
            }
            // A connection cut during its opening or use: a TCP proxy in front of the database
            // (HAProxy, cloud-sql-proxy) that accepts and closes at once answers the TLS
            // request with nothing ("unexpected response from SSLRequest"). The database is out
            // of reach, not refusing the data: rotated tokens are kept for it.
            sqlx::Error::Io(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => {
                connections_suspect();
                StoreError::Unavailable(error.to_string())
            }
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                StoreError::Unavailable(error.to_string())
            }
            other => StoreError::Database(other.to_string()),
        }
    }
}

/// Whether PostgreSQL cancelled the statement for its time or a lock (`statement_timeout`:
/// 57014, which any cancelled statement has; `lock_timeout`: 55P03).
pub(super) fn cancelled(error: &dyn sqlx::error::DatabaseError) -> bool {
    matches!(error.code().as_deref(), Some("57014" | "55P03"))
}

/// Whether a database error is a passing state of the database, not of the data: PostgreSQL's
/// connection exceptions (class 08), insufficient resources (class 53: a full disk, memory, too
/// many connections), a server shutting down or starting (57P01–57P03), an I/O error (58030), a
/// database not accepting connections (55000: `ALLOW_CONNECTIONS false`, maintenance), a
/// read-only transaction (25006: a standby after a failover), a serialization failure or a
/// deadlock (40001, 40P01), a statement cancelled (57014: the role's `statement_timeout`
/// when a table is locked by maintenance, or a statement that always runs too long) or a lock
/// not had within `lock_timeout` (55P03); SQLite busy or locked past its busy timeout (5, 6), read-only (8),
/// an I/O error (10), a damaged file (11, 26) or a full disk (13). The rotated tokens of a refresh are kept then, and
/// stored once the database takes them.
pub(super) fn passing(error: &dyn sqlx::error::DatabaseError) -> bool {
    const POSTGRES: &[&str] = &[
        "57P01", "57P02", "57P03", "58030", "55000", "25006", "40001", "40P01", "57014", "55P03",
    ];
    error.code().is_some_and(|code| {
        if code.len() == 5 {
            // A SQLSTATE (PostgreSQL's are 5 characters; its `42501` is no SQLite BUSY).
            code.starts_with("08") || code.starts_with("53") || POSTGRES.contains(&code.as_ref())
        } else {
            // SQLite's extended codes carry the primary one in their low byte (BUSY_SNAPSHOT
            // is 517), in at most 4 digits.
            code.parse::<u32>()
                .is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 8 | 10 | 11 | 13 | 26))
        }
    })
}

/// A SQLite file found damaged at the start (`problem`, SQLite's words), with how to restore:
/// such a file (a backup copied over one whose leftover `-wal` SQLite replayed onto it)
/// started healthy, and its refreshes and event reads failed.
pub fn damaged_sqlite(url: &str, problem: &str) -> StoreError {
    StoreError::Database(format!(
        "the SQLite file {} is damaged ({problem}): restore it from a backup with the service \
         stopped (`sqlite3 FILE \".restore BACKUP\"`, or copy the backup over it after deleting \
         FILE-wal and FILE-shm, which SQLite would replay onto the copy)",
        display_url(url)
    ))
}

/// SQLite's primary result code of a database error (its extended codes carry it in their low
/// byte); `None` for PostgreSQL's SQLSTATEs.
fn sqlite_code(error: &dyn sqlx::error::DatabaseError) -> Option<u32> {
    error
        .code()
        .filter(|code| code.len() < 5)
        .and_then(|code| code.parse::<u32>().ok())
        .map(|n| n & 0xff)
}

const SQLITE_READONLY: u32 = 8;

/// Set when SQLite refused a write as read-only: its connection is closed when next given
/// back, and the next one opens the file again. SQLite opens a file it cannot write
/// read-only (one made immutable or read-only for a moment, a mount remounted), and such a
/// connection never writes again, though the file can be written once more: every write
/// failed until a restart, which lost the rotated tokens kept meanwhile.
static SQLITE_REOPEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a database error says it cannot write at all: a full disk, a read-only file or
/// database, an I/O error, a damaged file (SQLite 13, 8, 10, 11 `database disk image is
/// malformed`, 26 not a database: a restore over a leftover log; PostgreSQL 53100, 25006,
/// 58030). Busy and locked pass by themselves; these wait for an operator, who finds them in
/// `/healthz`, and rotated tokens are kept for the database meanwhile.
fn cannot_write(error: &dyn sqlx::error::DatabaseError) -> bool {
    error.code().is_some_and(|code| match code.len() {
        5 => matches!(code.as_ref(), "53100" | "25006" | "58030"),
        _ => code
            .parse::<u32>()
            .is_ok_and(|n| matches!(n & 0xff, 8 | 10 | 11 | 13 | 26)),
    })
}

/// The last write the database refused as [`cannot_write`]: when (ms) and what it said.
static LAST_WRITE_FAILURE: std::sync::Mutex<Option<(i64, String)>> = std::sync::Mutex::new(None);

fn write_failed(message: &str) {
    let now = crate::app::system_now_ms();
    // Said in the log once in 10 s: a full disk fails every write, and each answer is a 503.
    static LAST_SAID: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(i64::MIN);
    if crate::telemetry::at_most_every(&LAST_SAID, now, 10_000) {
        tracing::error!("the database cannot write: {message}");
    }
    if let Ok(mut last) = LAST_WRITE_FAILURE.lock() {
        *last = Some((now, message.to_string()));
    }
}

/// The last write the database could not make, when it was within `within_ms`: (how long ago
/// in ms, what the database said). `/healthz` reports it: a write probe that needs no new
/// space passes on a full disk.
pub fn recent_write_failure(within_ms: i64) -> Option<(i64, String)> {
    let now = crate::app::system_now_ms();
    LAST_WRITE_FAILURE
        .lock()
        .ok()?
        .as_ref()
        .filter(|(at, _)| now - at <= within_ms)
        .map(|(at, message)| (now - at, message.clone()))
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        StoreError::Database(format!("migration failed: {error}"))
    }
}

/// A database URL as it may be shown (see [`crate::secret::url_without_credentials`]).
pub fn display_url(url: &str) -> String {
    crate::secret::url_without_credentials(url).unwrap_or_else(|| "the database URL".to_string())
}

/// `url` with `application_name=name` added, unless it names one already.
fn with_application_name(url: &str, name: Option<&str>) -> String {
    let Some(name) = name else {
        return url.to_string();
    };
    if url.contains("application_name=") {
        return url.to_string();
    }
    let name: String = url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}application_name={name}")
}

/// A pooled connection idle this long is pinged before it is given out.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// Until when (ms) every pooled connection is pinged before it is given out: a connection
/// just failed as dead (the server cut it, or shut down), and the pool's others, idle for less
/// than [`IDLE_BEFORE_PING`] under load, would each fail a call in turn.
static PING_ALL_UNTIL: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// How long after a dead connection every pooled one is pinged.
const PING_ALL_FOR_MS: i64 = 5_000;

fn connections_suspect() {
    PING_ALL_UNTIL.fetch_max(
        crate::app::system_now_ms() + PING_ALL_FOR_MS,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Whether a pooled connection idle for `idle_for` is pinged before it is given out.
fn ping_before_use(idle_for: Duration) -> bool {
    idle_for >= IDLE_BEFORE_PING
        || PING_ALL_UNTIL.load(std::sync::atomic::Ordering::Relaxed) > crate::app::system_now_ms()
}

/// How long a SQLite statement waits for another process's lock (a backup, a shell).
const SQLITE_BUSY_TIMEOUT_MS: u64 = 5_000;
/// The same, as the statement that sets it again.
pub(crate) const SQLITE_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 5000";

/// How long that ping may take before the connection is taken for dead.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Options of [`Store::connect_with`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// PostgreSQL's `application_name` of the connections, unless the URL names one: which
    /// replica holds which connection, in `pg_stat_activity`.
    pub application_name: Option<String>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            application_name: None,
        }
    }
}

/// The database. Cheap to clone: it wraps a connection pool.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    engine: Engine,
    /// The group commit of refreshed tokens (see `commits`).
    commits: Option<commits::CommitQueue>,
}

fn flag(value: bool) -> i64 {
    i64::from(value)
}

const CODE_LANDED: &str =
    "UPDATE used_codes SET instance_id = $2 WHERE code_hash = $1 AND instance_id IS NULL";

/// [`Store::code_landed`] inside the transaction that stores the code's grant.
pub(crate) async fn code_landed_in(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    code_hash: &[u8],
    instance_id: i64,
) -> Result<(), StoreError> {
    sqlx::query(CODE_LANDED)
        .bind(code_hash)
        .bind(instance_id)
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

/// Whether a SQLite URL keeps its database in memory (`sqlite::memory:`, `mode=memory`): it
/// lives as long as the process, and has no file.
pub fn sqlite_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// The file a SQLite URL names, as SQLite opens it (percent-decoded; a `file:` URI's path,
/// RFC 8089: `file:/p`, `file:///p`, `file://localhost/p`); `None` in memory or not SQLite.
pub fn sqlite_file(url: &str) -> Option<String> {
    if !url.starts_with("sqlite:") || sqlite_in_memory(url) {
        return None;
    }
    let named = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .map(|options| options.get_filename().to_string_lossy().into_owned())
        .ok()
        .or_else(|| crate::crypto::sqlite_path(url))?;
    let file = match named.strip_prefix("file:") {
        Some(rest) => {
            let rest = rest.split(['?', '#']).next().unwrap_or(rest);
            match rest.strip_prefix("//") {
                Some(authority_and_path) => authority_and_path
                    .strip_prefix("localhost")
                    .unwrap_or(authority_and_path)
                    .to_string(),
                None => rest.to_string(),
            }
        }
        None => named,
    };
    Some(file).filter(|file| !file.is_empty())
}

impl Store {
    /// Refuses, before anything else is read or made, a database URL that names no database
    /// this service can use: another scheme (a bare file name, `mysql://`), or `sqlite://`
    /// without a path (SQLite would keep everything in memory and lose it at exit).
    pub fn check_url(url: &str) -> Result<(), StoreError> {
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            return Ok(());
        }
        let Some(path) = crate::crypto::sqlite_path(url) else {
            return Err(StoreError::Database(
                "unsupported database URL: use sqlite://path or postgres://…".to_string(),
            ));
        };
        if path.trim().is_empty() && !sqlite_in_memory(url) {
            return Err(StoreError::Database(
                "the database URL names no file: use sqlite://path/to/file.db".to_string(),
            ));
        }
        Ok(())
    }

    /// Opens the database at `url` and brings its schema up to date.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Store::connect_with(url, StoreOptions::default()).await
    }

    pub async fn connect_with(url: &str, options: StoreOptions) -> Result<Store, StoreError> {
        let store = Store::open_with(url, options).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects without bringing the schema up to date (see [`Store::migrate`]): what a start
    /// checks before it changes anything (the master key) is checked on the database as it is.
    pub async fn open_with(url: &str, options: StoreOptions) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let (engine, url) = if url.starts_with("sqlite:") {
            (Engine::Sqlite, Store::prepare_sqlite(url).await?)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            (
                Engine::Postgres,
                with_application_name(url, options.application_name.as_deref()),
            )
        } else {
            return Err(StoreError::Database(
                "unsupported database URL: use sqlite://path or postgres://…".to_string(),
            ));
        };
        let connect_options = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
        // SQLite takes one writer at a time; more connections only make writers wait in its
        // busy handler, which sleeps in steps of milliseconds. One connection queues them
        // here instead, without sleeping (statements take tens of microseconds).
        let max_connections = match engine {
            Engine::Sqlite => 1,
            Engine::Postgres => options.max_connections,
        };
        // The first connection is made on its own: the pool's error for one that cannot be
        // made is "pool timed out", after its whole wait, where the connection's own names the
        // cause (connection refused, and where). A database that is starting (refusing
        // connections, or saying so) is waited for, as the pool would, within its wait.
        {
            use sqlx::Connection;
            let deadline = tokio::time::Instant::now() + options.acquire_timeout;
            let mut pause = Duration::from_millis(100);
            loop {
                let tried = tokio::time::timeout_at(
                    deadline,
                    sqlx::AnyConnection::connect_with(&connect_options),
                )
                .await;
                let error = match tried {
                    Ok(Ok(connection)) => {
                        let _ = connection.close().await;
                        break;
                    }
                    Ok(Err(error)) => StoreError::from(error),
                    Err(_) => StoreError::Unavailable("no answer".to_string()),
                };
                let passing = matches!(error, StoreError::Unavailable(_));
                if !passing || tokio::time::Instant::now() + pause >= deadline {
                    let within = if passing {
                        format!(" (tried for about {} s)", options.acquire_timeout.as_secs())
                    } else {
                        String::new()
                    };
                    return Err(StoreError::Database(format!(
                        "could not connect to {}{within}: {error}",
                        display_url(&url)
                    )));
                }
                tracing::info!("waiting for the database at {}: {error}", display_url(&url));
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
        // SQLite: what a deletion frees is overwritten with zeros, not left in the file's free
        // pages (a deleted instance's configuration is plain text; its secrets are sealed).
        let zero_freed_pages = engine == Engine::Sqlite;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if zero_freed_pages {
                        sqlx::query("PRAGMA secure_delete = ON")
                            .execute(&mut *connection)
                            .await?;
                    }
                    Ok(())
                })
            })
            .acquire_timeout(options.acquire_timeout)
            // No ping before each use: it doubled the round trips of every query (a broken
            // connection fails its query instead, and the pool drops it).
            .test_before_acquire(false)
            // But one idle for a while is pinged first: a database restarted, failed over or
            // its connections cut (`pg_terminate_backend`, an idle timeout of a pooler or a
            // firewall) left every pooled connection dead, and each one's first query failed,
            // a 503 per connection of the pool. The pool gives out the connection idle longest,
            // so below about one query a second per pooled connection most queries pay the
            // round trip, where it costs nothing that counts; under load none does, until a
            // connection fails as dead: then every one is, for a few seconds. A ping
            // that does not come back (a network dropping packets) is a dead connection too:
            // it is closed, and another is opened, within the acquire's wait.
            .before_acquire(|connection, metadata| {
                Box::pin(async move {
                    use sqlx::Connection;
                    if ping_before_use(metadata.idle_for) {
                        tokio::time::timeout(PING_TIMEOUT, connection.ping())
                            .await
                            .map_err(|_| {
                                sqlx::Error::Io(std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    "the connection did not answer a ping",
                                ))
                            })??;
                    }
                    Ok(true)
                })
            })
            // A connection still in a transaction once its rollback ran is not given out again:
            // SQLite ends a transaction by itself on some errors (a full disk), the rollback
            // then fails, and sqlx would refuse every later `BEGIN` on it ("non-zero
            // transaction depth"): with SQLite's one connection, every write until a restart.
            .after_release(|connection, _| {
                Box::pin(async move {
                    use sqlx::Connection;
                    if SQLITE_REOPEN.swap(false, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(
                            "SQLite refused a write as read-only: its connection is opened again"
                        );
                        return Ok(false);
                    }
                    if !connection.is_in_transaction() {
                        return Ok(true);
                    }
                    // The rollback a dropped transaction queued runs before the ping.
                    connection.ping().await?;
                    if connection.is_in_transaction() {
                        tracing::warn!(
                            "a database connection is left in a transaction its rollback could not end; it is closed"
                        );
                        return Ok(false);
                    }
                    Ok(true)
                })
            })
            .connect_with(connect_options)
            .await?;
        let mut store = Store {
            pool,
            engine,
            commits: None,
        };
        store.commits = Some(commits::CommitQueue::start(store.clone()));
        Ok(store)
    }

    /// Applies the migrations not applied yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.engine {
            Engine::Sqlite => &SQLITE_MIGRATOR,
            Engine::Postgres => &POSTGRES_MIGRATOR,
        };
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// SQLite: what `PRAGMA quick_check` finds wrong with the file (`None` when it is sound, and
    /// on PostgreSQL). It reads every page: a second or so for a file of a few hundred MB.
    pub async fn sqlite_damage(&self) -> Result<Option<String>, StoreError> {
        if self.engine != Engine::Sqlite {
            return Ok(None);
        }
        let found: Result<Vec<(String,)>, sqlx::Error> = sqlx::query_as("PRAGMA quick_check(5)")
            .fetch_all(&self.pool)
            .await;
        Ok(match found {
            Ok(rows) if rows.len() == 1 && rows[0].0 == "ok" => None,
            Ok(rows) => Some(
                rows.into_iter()
                    .map(|(line,)| line)
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            // The check itself cannot run: "file is not a database", "malformed".
            Err(sqlx::Error::Database(error))
                if matches!(sqlite_code(error.as_ref()), Some(11 | 26)) =>
            {
                Some(error.message().to_string())
            }
            Err(error) => return Err(error.into()),
        })
    }

    /// Whether the schema has been made (a new database has no tables yet).
    pub async fn has_schema(&self) -> Result<bool, StoreError> {
        let sql = match self.engine {
            Engine::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'organizations'"
            }
            Engine::Postgres => {
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_name = 'organizations' AND table_schema = current_schema()"
            }
        };
        let (found,): (i64,) = sqlx::query_as(sql).fetch_one(&self.pool).await?;
        Ok(found > 0)
    }

    /// Creates the SQLite file when missing and switches it to WAL (a property of the file,
    /// so one connection is enough), and returns the URL the pool should use.
    async fn prepare_sqlite(url: &str) -> Result<String, StoreError> {
        // A new SQLite database file is readable by its owner only (its tokens are sealed, but
        // names, configuration and audit lines are not for every local user); SQLite gives its
        // journal files the database file's mode. The file is named as SQLite will open it
        // (see `sqlite_file`); in-memory and read-only databases are left alone.
        #[cfg(unix)]
        if !url.contains("mode=ro")
            && let Some(path) = sqlite_file(url)
        {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
        }
        let url = if url.contains("mode=") {
            url.to_string()
        } else if url.contains('?') {
            format!("{url}&mode=rwc")
        } else {
            format!("{url}?mode=rwc")
        };
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS))
            .foreign_keys(true)
            .disable_statement_logging();
        let connection = match sqlx::SqliteConnection::connect_with(&options).await {
            Err(sqlx::Error::Database(error))
                if matches!(sqlite_code(error.as_ref()), Some(11 | 26)) =>
            {
                return Err(damaged_sqlite(&url, error.message()));
            }
            other => other?,
        };
        connection.close().await?;
        Ok(url)
    }

    pub fn engine_name(&self) -> &'static str {
        match self.engine() {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgresql",
        }
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The pool, for health checks. All SQL belongs in this module.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Refreshed-token commits that went out grouped with others (see `commits`).
    pub fn grouped_commits(&self) -> u64 {
        self.commits
            .as_ref()
            .map_or(0, commits::CommitQueue::grouped)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// [`Store::close`], waiting at most `within` for connections still in use to come back
    /// (a stop must not hang on one): with SQLite, the last connection's close writes the log
    /// into the file and removes `-wal` and `-shm`.
    pub async fn close_within(&self, within: Duration) {
        if tokio::time::timeout(within, self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!(
                "the database's connections were not all given back within {} s of the stop",
                within.as_secs()
            );
        }
    }

    /// `SELECT 1`: the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Whether the database takes a write: a row rewritten as it is (the first key check, which
    /// every start makes). A SQLite file on a full disk answered reads, and `/healthz` said ok
    /// while every change and every refresh's commit failed.
    pub async fn write_check(&self) -> Result<(), StoreError> {
        sqlx::query("UPDATE key_checks SET created_at = created_at WHERE id = 1")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A write transaction. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`), so a
    /// transaction that reads before it writes waits on the busy timeout instead of failing.
    async fn begin_write(&self) -> Result<Transaction<'static, Any>, StoreError> {
        let transaction = match self.engine {
            Engine::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Engine::Postgres => self.pool.begin().await?,
        };
        Ok(transaction)
    }

    // ----- organizations and users -------------------------------------------------------

    /// Creates an organization and its first user in one transaction.
    pub async fn create_organization(&self, new: &NewOrganization) -> Result<(), StoreError> {
        let mut transaction = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO organizations (id, name, secret_hash, webhook_secret_enc, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(new.id)
        .bind(&new.name)
        .bind(&new.secret_hash)
        .bind(&new.webhook_secret_enc)
        .bind(new.created_at)
        .execute(&mut *transaction)
        .await?;
        insert_user(&mut transaction, new.id, &new.first_user, new.created_at).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Adds a user to an existing organization (`NotFound` when it does not exist).
    pub async fn create_user(
        &self,
        organization_id: i64,
        user: &NewUser,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut transaction = self.begin_write().await?;
        insert_user(&mut transaction, organization_id, user, now).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// An organization's users, oldest first.
    pub async fn list_users(&self, organization_id: i64) -> Result<Vec<UserRow>, StoreError> {
        let rows = sqlx::query_as::<_, UserRow>(
            "SELECT id, organization_id, name, created_at FROM users \
             WHERE organization_id = $1 ORDER BY created_at, id",
        )
        .bind(organization_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Gives user `user_id` of the organization a new secret (its hash): the old one stops
    /// working at once. False when there is no such user.
    pub async fn replace_user_secret(
        &self,
        organization_id: i64,
        user_id: i64,
        secret_hash: &[u8],
    ) -> Result<bool, StoreError> {
        let result =
            sqlx::query("UPDATE users SET secret_hash = $1 WHERE id = $2 AND organization_id = $3")
                .bind(secret_hash)
                .bind(user_id)
                .bind(organization_id)
                .execute(&self.pool)
                .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Deletes user `user_id` of the organization: its secret stops working at once; the audit
    /// log keeps its entries (they name the user's id). False when there is no such user.
    pub async fn delete_user(
        &self,
        organization_id: i64,
        user_id: i64,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM users WHERE id = $1 AND organization_id = $2")
            .bind(user_id)
            .bind(organization_id)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Gives the organization a new secret (its hash): the old one stops working at once.
    /// False when there is no such organization.
    pub async fn replace_organization_secret(
        &self,
        organization_id: i64,
        secret_hash: &[u8],
    ) -> Result<bool, StoreError> {
        let result = sqlx::query("UPDATE organizations SET secret_hash = $1 WHERE id = $2")
            .bind(secret_hash)
            .bind(organization_id)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    pub async fn find_user_by_secret_hash(
        &self,
        secret_hash: &[u8],
    ) -> Result<Option<UserRow>, StoreError> {
        let row = sqlx::query_as::<_, UserRow>(
            "SELECT id, organization_id, name, created_at FROM users WHERE secret_hash = $1",
        )
        .bind(secret_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    pub async fn find_organization_by_secret_hash(
        &self,
        secret_hash: &[u8],
    ) -> Result<Option<OrganizationRow>, StoreError> {
        let row = sqlx::query_as::<_, OrganizationRow>(
            "SELECT id, name, webhook_secret_enc, created_at FROM organizations \
             WHERE secret_hash = $1",
        )
        .bind(secret_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    pub async fn get_organization(&self, id: i64) -> Result<Option<OrganizationRow>, StoreError> {
        let row = sqlx::query_as::<_, OrganizationRow>(
            "SELECT id, name, webhook_secret_enc, created_at FROM organizations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// The webhook secrets of the `each` newest and the `each` oldest organizations, for the
    /// check at start that the master key opens this database's secrets.
    pub async fn organization_secrets_sample(
        &self,
        each: i64,
    ) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        self.both_ends(
            "SELECT id, webhook_secret_enc FROM organizations ORDER BY created_at {order}, id {order} LIMIT $1",
            each,
        )
        .await
    }

    /// The sealed Element tokens of the instances of the lowest and the highest ids, `each` of
    /// both: (id, sealed value). A rotation of the master key goes through instances by id, so an
    /// interrupted one leaves the two ends under different keys.
    pub async fn instance_secrets_sample(
        &self,
        each: i64,
    ) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        self.both_ends(
            "SELECT id, token_enc FROM instances ORDER BY id {order} LIMIT $1",
            each,
        )
        .await
    }

    /// The rows of `sql` (its `{order}` made `DESC`, then `ASC`), each id once.
    async fn both_ends(&self, sql: &str, each: i64) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        let mut rows: Vec<(i64, Vec<u8>)> = Vec::new();
        for order in ["DESC", "ASC"] {
            let sql = sql.replace("{order}", order);
            let found: Vec<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(each)
                .fetch_all(&self.pool)
                .await?;
            for row in found {
                if !rows.iter().any(|(id, _)| *id == row.0) {
                    rows.push(row);
                }
            }
        }
        Ok(rows)
    }

    /// This replica is running, at `now` (see the `replicas` table).
    pub async fn replica_seen(
        &self,
        replica: &str,
        now: i64,
        sealing_key: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replicas (id, seen_at, sealing_key) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at, \
             sealing_key = excluded.sealing_key",
        )
        .bind(replica)
        .bind(now)
        .bind(sealing_key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The replicas seen since `since` that seal under another key than `key` (its id), or
    /// say nothing of theirs (an older release): (id, when last seen, their key).
    pub async fn replicas_sealing_otherwise(
        &self,
        since: i64,
        key: &str,
    ) -> Result<Vec<(String, i64, Option<String>)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, seen_at, sealing_key FROM replicas WHERE seen_at >= $1 \
             AND (sealing_key IS NULL OR sealing_key <> $2) ORDER BY seen_at DESC",
        )
        .bind(since)
        .bind(key)
        .fetch_all(&self.pool)
        .await?)
    }

    /// This replica stopped.
    pub async fn replica_gone(&self, replica: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(replica)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets replicas not seen since `before` (killed rather than stopped: a row each).
    pub async fn forget_replicas_before(&self, before: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM replicas WHERE seen_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The replicas seen since `since`: (id, when last seen), the latest first.
    pub async fn replicas_seen_since(&self, since: i64) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, seen_at FROM replicas WHERE seen_at >= $1 ORDER BY seen_at DESC",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Where this database was copied to, and when, by `tokenwarden database copy`.
    pub async fn copied_to(&self) -> Result<Option<(String, i64)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT target, at FROM copied_to WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Marks this database as copied to `target` (shown without credentials) at `at`.
    pub async fn mark_copied_to(&self, target: &str, at: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO copied_to (id, target, at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET target = excluded.target, at = excluded.at",
        )
        .bind(target)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes the mark of a copy away; whether there was one.
    pub async fn unmark_copied(&self) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM copied_to WHERE id = 1")
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The key checks (`key_checks`): (id, sealed value).
    pub async fn key_checks(&self) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT id, sealed FROM key_checks ORDER BY id")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Adds a key check (a value sealed under the starting process's master key), unless one
    /// of that id exists: of processes starting at once, the database keeps the first.
    pub async fn insert_key_check(&self, id: i64, sealed: &[u8]) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO key_checks (id, sealed, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(sealed)
        .bind(crate::app::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replaces a key check's sealed value (a key rotation). False when there is no such row.
    pub async fn reseal_key_check(&self, id: i64, sealed: &[u8]) -> Result<bool, StoreError> {
        let result = sqlx::query("UPDATE key_checks SET sealed = $1 WHERE id = $2")
            .bind(sealed)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Every organization, for re-encrypting their webhook secrets under a new key.
    pub async fn list_organizations(&self) -> Result<Vec<OrganizationRow>, StoreError> {
        let rows = sqlx::query_as::<_, OrganizationRow>(
            "SELECT id, name, webhook_secret_enc, created_at FROM organizations ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Replaces an organization's webhook secret ciphertext (key rotation). False when the
    /// organization does not exist.
    pub async fn update_organization_webhook_secret(
        &self,
        id: i64,
        webhook_secret_enc: &[u8],
    ) -> Result<bool, StoreError> {
        let result = sqlx::query("UPDATE organizations SET webhook_secret_enc = $1 WHERE id = $2")
            .bind(webhook_secret_enc)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Key rotation: replaces an organization's webhook secret ciphertext only if it is still
    /// `old` (a concurrent change wins; read again and retry).
    pub async fn reseal_organization_webhook_secret(
        &self,
        id: i64,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE organizations SET webhook_secret_enc = $1 WHERE id = $2 AND webhook_secret_enc = $3",
        )
        .bind(new)
        .bind(id)
        .bind(old)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    // ----- connectors ---------------------------------------------------------------------

    /// Registers an organization's own connector; `Conflict` when the key is taken.
    pub async fn insert_connector(
        &self,
        organization_id: i64,
        key: &str,
        definition_json: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO connectors (organization_id, key, definition, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(organization_id)
        .bind(key)
        .bind(definition_json)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replaces a connector's definition. False when it does not exist.
    pub async fn update_connector(
        &self,
        organization_id: i64,
        key: &str,
        definition_json: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE connectors SET definition = $1, updated_at = $2 \
             WHERE organization_id = $3 AND key = $4",
        )
        .bind(definition_json)
        .bind(now)
        .bind(organization_id)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    pub async fn list_connectors(
        &self,
        organization_id: i64,
    ) -> Result<Vec<ConnectorRow>, StoreError> {
        let rows = sqlx::query_as::<_, ConnectorRow>(
            "SELECT organization_id, key, definition, created_at, updated_at FROM connectors \
             WHERE organization_id = $1 ORDER BY key",
        )
        .bind(organization_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub async fn get_connector(
        &self,
        organization_id: i64,
        key: &str,
    ) -> Result<Option<ConnectorRow>, StoreError> {
        let row = sqlx::query_as::<_, ConnectorRow>(
            "SELECT organization_id, key, definition, created_at, updated_at FROM connectors \
             WHERE organization_id = $1 AND key = $2",
        )
        .bind(organization_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// How far the database's clock is ahead of `local` (a clock of this machine's: its wall
    /// clock, or its monotonic one), in milliseconds:
    /// on one connection (waiting for one is not timed), the quickest of three readings,
    /// counted from the middle of its round trip. `None` on SQLite, whose clock is the
    /// machine's, and when no reading came back within [`CLOCK_READING_MAX_MS`] (a busy
    /// database: the earlier offset is the better one).
    pub async fn clock_offset_ms(
        &self,
        local: impl Fn() -> i64,
    ) -> Result<Option<i64>, StoreError> {
        if self.engine() != Engine::Postgres {
            return Ok(None);
        }
        let mut connection = self.pool.acquire().await?;
        sqlx::query("SELECT 1").execute(&mut *connection).await?;
        let mut best: Option<(i64, i64)> = None;
        for _ in 0..3 {
            let before = local();
            let (database,): (i64,) =
                sqlx::query_as("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
                    .fetch_one(&mut *connection)
                    .await?;
            let after = local();
            let round_trip = after - before;
            if best.is_none_or(|(quickest, _)| round_trip < quickest) {
                best = Some((round_trip, database - before - round_trip / 2));
            }
        }
        Ok(best
            .filter(|(round_trip, _)| *round_trip <= CLOCK_READING_MAX_MS)
            .map(|(_, offset)| offset))
    }

    /// Every organization's own connector keys, as (organization id, key).
    pub async fn connector_keys(&self) -> Result<Vec<(i64, String)>, StoreError> {
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT organization_id, key FROM connectors")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }

    /// Deletes an organization's connector unless instances of it exist, in one transaction:
    /// the connector row is locked first (PostgreSQL; SQLite's write transaction serializes),
    /// so an instance whose creation checked the connector is counted here.
    pub async fn delete_connector(
        &self,
        organization_id: i64,
        key: &str,
    ) -> Result<ConnectorDeletion, StoreError> {
        let mut transaction = self.begin_write().await?;
        let lock = match self.engine() {
            Engine::Postgres => " FOR UPDATE",
            Engine::Sqlite => "",
        };
        let found = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT 1 FROM connectors WHERE organization_id = $1 AND key = $2{lock}"
        )))
        .bind(organization_id)
        .bind(key)
        .fetch_optional(&mut *transaction)
        .await?;
        if found.is_none() {
            return Ok(ConnectorDeletion::NotFound);
        }
        let (instances,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM instances WHERE organization_id = $1 AND element_key = $2",
        )
        .bind(organization_id)
        .bind(key)
        .fetch_one(&mut *transaction)
        .await?;
        if instances > 0 {
            return Ok(ConnectorDeletion::InUse(instances));
        }
        sqlx::query("DELETE FROM connectors WHERE organization_id = $1 AND key = $2")
            .bind(organization_id)
            .bind(key)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(ConnectorDeletion::Deleted)
    }

    // ----- OAuth states -------------------------------------------------------------------

    /// `Conflict` when the state is already in use.
    pub async fn insert_oauth_state(&self, row: &OAuthStateRow) -> Result<(), StoreError> {
        self.write_oauth_state(row, "").await?;
        Ok(())
    }

    /// Keeps a state a caller chose again (a page reloaded, an integration that passes a fixed
    /// state): its earlier authorization for the same connector is replaced by this one (the
    /// newest URL is the one the user follows; an older one's PKCE verifier goes). False when
    /// the state is held for another connector.
    pub async fn replace_oauth_state(&self, row: &OAuthStateRow) -> Result<bool, StoreError> {
        self.write_oauth_state(
            row,
            " ON CONFLICT (state_hash) DO UPDATE SET callback_url = excluded.callback_url, \
             api_key = excluded.api_key, code_verifier_enc = excluded.code_verifier_enc, \
             scope = excluded.scope, expires_at = excluded.expires_at, \
             api_secret_enc = excluded.api_secret_enc \
             WHERE oauth_states.organization_id = excluded.organization_id \
             AND oauth_states.element_key = excluded.element_key",
        )
        .await
    }

    /// Inserts a state row, `on_conflict` deciding what a taken state does; true when a row
    /// was written.
    async fn write_oauth_state(
        &self,
        row: &OAuthStateRow,
        on_conflict: &'static str,
    ) -> Result<bool, StoreError> {
        let sql = format!(
            "INSERT INTO oauth_states (state_hash, organization_id, element_key, callback_url, \
             api_key, code_verifier_enc, scope, expires_at, api_secret_enc) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9){on_conflict}"
        );
        let result = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&row.state_hash)
            .bind(row.organization_id)
            .bind(&row.element_key)
            .bind(&row.callback_url)
            .bind(&row.api_key)
            .bind(&row.code_verifier_enc)
            .bind(&row.scope)
            .bind(row.expires_at)
            .bind(&row.api_secret_enc)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// The newest pending authorization an organization began for a connector with client id
    /// `api_key` (for `callback_url` when given, or made without one) that keeps a client
    /// secret, left in place: the secret is the app's, not single use, and the newest is the
    /// one a rotation gave last.
    pub async fn newest_kept_secret_state(
        &self,
        organization_id: i64,
        element_key: &str,
        api_key: &str,
        callback_url: Option<&str>,
        now: i64,
    ) -> Result<Option<OAuthStateRow>, StoreError> {
        let for_callback = if callback_url.is_some() {
            " AND (callback_url = $5 OR callback_url = '')"
        } else {
            ""
        };
        let sql = format!(
            "SELECT state_hash, organization_id, element_key, callback_url, api_key, \
             code_verifier_enc, scope, expires_at, api_secret_enc FROM oauth_states \
             WHERE organization_id = $1 AND element_key = $2 AND api_key = $3 \
             AND expires_at > $4 AND api_secret_enc IS NOT NULL{for_callback} \
             ORDER BY expires_at DESC, state_hash LIMIT 1"
        );
        let mut query = sqlx::query_as::<_, OAuthStateRow>(sqlx::AssertSqlSafe(sql))
            .bind(organization_id)
            .bind(element_key)
            .bind(api_key)
            .bind(now);
        if let Some(callback_url) = callback_url {
            query = query.bind(callback_url);
        }
        Ok(query.fetch_optional(&self.pool).await?)
    }

    /// Takes a state once: deletes and returns it if it exists and has not expired. Of two
    /// concurrent takers exactly one gets it.
    pub async fn take_oauth_state(
        &self,
        state_hash: &[u8],
        now: i64,
    ) -> Result<Option<OAuthStateRow>, StoreError> {
        let row = sqlx::query_as::<_, OAuthStateRow>(
            "DELETE FROM oauth_states WHERE state_hash = $1 AND expires_at > $2 \
             RETURNING state_hash, organization_id, element_key, callback_url, api_key, \
             code_verifier_enc, scope, expires_at, api_secret_enc",
        )
        .bind(state_hash)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(instances::only_row(row))
    }

    /// How many authorizations an organization has pending (begun, not expired), counting to
    /// `limit` at most.
    pub async fn count_pending_oauth_states(
        &self,
        organization_id: i64,
        now: i64,
        limit: i64,
    ) -> Result<i64, StoreError> {
        let (count,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM (SELECT 1 FROM oauth_states WHERE organization_id = $1 \
             AND expires_at > $2 LIMIT $3) AS pending",
        )
        .bind(organization_id)
        .bind(now)
        .bind(limit)
        .fetch_one(&self.pool)
        .await?;
        Ok(count)
    }

    /// The pending authorizations with a PKCE verifier that an organization began for a
    /// connector with client id `api_key` (for `callback_url` when given, or made without
    /// one), by state hash, at most `limit`: for a code that comes back without its `state`.
    pub async fn pending_oauth_states(
        &self,
        organization_id: i64,
        element_key: &str,
        api_key: &str,
        callback_url: Option<&str>,
        now: i64,
        limit: i64,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let for_callback = if callback_url.is_some() {
            " AND (callback_url = $6 OR callback_url = '')"
        } else {
            ""
        };
        let sql = format!(
            "SELECT state_hash FROM oauth_states WHERE organization_id = $1 AND element_key = $2 \
             AND api_key = $3 AND expires_at > $4 AND code_verifier_enc IS NOT NULL{for_callback} \
             ORDER BY state_hash LIMIT $5"
        );
        let mut query = sqlx::query_as::<_, (Vec<u8>,)>(sqlx::AssertSqlSafe(sql))
            .bind(organization_id)
            .bind(element_key)
            .bind(api_key)
            .bind(now)
            .bind(limit);
        if let Some(callback_url) = callback_url {
            query = query.bind(callback_url);
        }
        let rows = query.fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(|(hash,)| hash).collect())
    }

    /// Key rotation: every pending state's sealed value of `column` (its PKCE verifier, or its
    /// client secret), with the state's hash.
    pub async fn list_oauth_state_sealed(
        &self,
        column: OAuthStateSealed,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let column = column.name();
        let sql = format!(
            "SELECT state_hash, {column} FROM oauth_states \
             WHERE {column} IS NOT NULL ORDER BY state_hash"
        );
        let rows: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }

    /// Key rotation: replaces a state's sealed value of `column` only if it is still `old`.
    pub async fn reseal_oauth_state(
        &self,
        column: OAuthStateSealed,
        state_hash: &[u8],
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let column = column.name();
        let sql = format!(
            "UPDATE oauth_states SET {column} = $1 WHERE state_hash = $2 AND {column} = $3"
        );
        let result = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(new)
            .bind(state_hash)
            .bind(old)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Key rotation: the events still waiting to be delivered, with their payloads (which hold
    /// the sealed signing key).
    pub async fn list_pending_event_payloads(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, payload FROM events WHERE delivery_state = 'pending' ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Key rotation: replaces an event's payload only if it is still `old`.
    pub async fn reseal_event_payload(
        &self,
        id: &str,
        old: &str,
        new: &str,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query("UPDATE events SET payload = $1 WHERE id = $2 AND payload = $3")
            .bind(new)
            .bind(id)
            .bind(old)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Deletes expired states; returns how many.
    pub async fn purge_expired_oauth_states(&self, now: i64) -> Result<u64, StoreError> {
        let result = sqlx::query("DELETE FROM oauth_states WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM used_codes WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected())
    }

    /// Records an authorization code (its hash) as exchanged until `expires_at`; false when it
    /// was already (by another request, or one that is still running).
    pub async fn claim_code(
        &self,
        code_hash: &[u8],
        organization_id: i64,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "INSERT INTO used_codes (code_hash, organization_id, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (code_hash) DO NOTHING",
        )
        .bind(code_hash)
        .bind(organization_id)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// A code recorded by [`Self::claim_code`] and still remembered at `now`: `(expires_at,
    /// instance_id, organization_id)`, the instance as [`Self::code_landed`] recorded it
    /// (`None` while the exchange runs), and the organization that claimed it.
    pub async fn used_code(
        &self,
        code_hash: &[u8],
        now: i64,
    ) -> Result<Option<(i64, Option<i64>, i64)>, StoreError> {
        let row = sqlx::query_as(
            "SELECT expires_at, instance_id, organization_id FROM used_codes \
             WHERE code_hash = $1 AND expires_at > $2",
        )
        .bind(code_hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// Records where a claimed code's exchange landed, once: the instance it created or
    /// re-authenticated (written with it, [`code_landed_in`]), or 0 when it was spent without
    /// one.
    pub async fn code_landed(&self, code_hash: &[u8], instance_id: i64) -> Result<(), StoreError> {
        sqlx::query(CODE_LANDED)
            .bind(code_hash)
            .bind(instance_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets a code recorded by [`Self::claim_code`] whose hour has passed (the recovery
    /// task purges them once a minute): a new claim of it goes through meanwhile.
    pub async fn release_expired_code(&self, code_hash: &[u8], now: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM used_codes WHERE code_hash = $1 AND expires_at <= $2")
            .bind(code_hash)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets a code recorded by [`Self::claim_code`]: its exchange failed, and it may be
    /// tried again. Only while it is as the caller saw it: `landed` the instance it was marked
    /// with ([`Self::code_landed`]; 0 when spent without one), `None` for a claim not marked
    /// yet (the caller's own, whose exchange or import failed). Unconditional, two repeats of
    /// an import whose instance was deleted both gave the claim back, the second giving back
    /// the claim the first had taken anew meanwhile, and both created an instance on the same
    /// grant; and a failed import gave back a claim its own insert had marked. True when it
    /// was forgotten.
    pub async fn release_code(
        &self,
        code_hash: &[u8],
        landed: Option<i64>,
    ) -> Result<bool, StoreError> {
        // -1: no instance id (they are positive, 0 is "spent without one").
        let result = sqlx::query(
            "DELETE FROM used_codes WHERE code_hash = $1 \
             AND COALESCE(instance_id, -1) = COALESCE($2, -1)",
        )
        .bind(code_hash)
        .bind(landed)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Deletes up to `limit` events that occurred before `before` and are not waiting to be
    /// delivered (the outbox keeps those until they are delivered or given up); returns how many.
    pub async fn purge_old_events(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        let result = sqlx::query(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE occurred_at < $1 \
             AND delivery_state <> 'pending' ORDER BY occurred_at LIMIT $2)",
        )
        .bind(before)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    // ----- audit log ----------------------------------------------------------------------

    /// Deletes up to `limit` of the oldest audit entries when they were made before `before`;
    /// returns how many. Only the `limit` lowest ids are looked at (ids follow time, but for
    /// replicas' clocks a few ms apart), so a purge with nothing to delete reads one batch, not
    /// the table; an entry behind a later one goes at the next purge.
    pub async fn purge_old_audit(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        let result = sqlx::query(
            "DELETE FROM audit_logs WHERE id IN (SELECT id FROM (SELECT id, at FROM audit_logs \
             ORDER BY id LIMIT $2) oldest WHERE at < $1)",
        )
        .bind(before)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// Appends to the audit log; returns the entry's id.
    pub async fn insert_audit(&self, entry: &NewAudit) -> Result<i64, StoreError> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO audit_logs (organization_id, user_id, action, target, request_id, \
             detail, at) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(entry.organization_id)
        .bind(entry.user_id)
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(&entry.request_id)
        .bind(&entry.detail)
        .bind(entry.at)
        .fetch_all(&self.pool)
        .await
        .map(instances::only_row)?
        .ok_or(StoreError::NotFound)?;
        Ok(id)
    }

    /// An organization's audit log, newest first; `before_id` pages on.
    pub async fn list_audit(
        &self,
        organization_id: i64,
        limit: i64,
        before_id: Option<i64>,
    ) -> Result<Vec<AuditRow>, StoreError> {
        // The cursor only when given (`$n IS NULL OR …` cannot use the index), and the order
        // the index `audit_logs_organization_id` keeps.
        const COLUMNS: &str = "SELECT a.id, a.organization_id, a.user_id, u.name AS user_name, \
             a.action, a.target, a.request_id, a.detail, a.at FROM audit_logs a \
             LEFT JOIN users u ON u.id = a.user_id AND u.organization_id = a.organization_id \
             WHERE a.organization_id = $1";
        let query = match before_id {
            Some(before_id) => sqlx::query_as::<_, AuditRow>(sqlx::AssertSqlSafe(format!(
                "{COLUMNS} AND a.id < $2 ORDER BY a.id DESC LIMIT $3"
            )))
            .bind(organization_id)
            .bind(before_id),
            None => sqlx::query_as::<_, AuditRow>(sqlx::AssertSqlSafe(format!(
                "{COLUMNS} ORDER BY a.id DESC LIMIT $2"
            )))
            .bind(organization_id),
        };
        let rows = query.bind(limit).fetch_all(&self.pool).await?;
        Ok(rows)
    }
}

async fn insert_user(
    transaction: &mut Transaction<'static, Any>,
    organization_id: i64,
    user: &NewUser,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO users (id, organization_id, name, secret_hash, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(user.id)
    .bind(organization_id)
    .bind(&user.name)
    .bind(&user.secret_hash)
    .bind(now)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Binds an event's columns `id, organization_id, instance_id, element_key, event_type, reason,
/// occurred_at, payload, delivery_state, next_attempt_at`, in that order, to a query or a
/// query-as (they share no trait). Values go as options, so a batch's padding rows can bind
/// NULLs of the same types.
macro_rules! bind_event {
    ($query:expr, $event:expr) => {{
        let event: &NewEvent = $event;
        $query
            .bind(Some(event.id.as_str()))
            .bind(Some(event.organization_id))
            .bind(event.instance_id)
            .bind(event.element_key.as_deref())
            .bind(Some(event.event_type.as_str()))
            .bind(event.reason.as_deref())
            .bind(Some(event.occurred_at))
            .bind(Some(event.payload.as_str()))
            .bind(Some(event.delivery_state.as_str()))
            .bind(event.next_attempt_at)
    }};
}

/// Binds refreshed tokens' columns `access_token_enc, refresh_token_enc, token_response_enc,
/// access_expires_at, refresh_expires_at, last_refresh_at, next_due_at, configuration`, in that
/// order.
macro_rules! bind_tokens {
    ($query:expr, $tokens:expr) => {{
        let tokens: &TokenUpdate = $tokens;
        $query
            .bind(tokens.access_token_enc.as_deref())
            .bind(tokens.refresh_token_enc.as_deref())
            .bind(tokens.token_response_enc.as_deref())
            .bind(tokens.access_expires_at)
            .bind(tokens.refresh_expires_at)
            .bind(tokens.last_refresh_at)
            .bind(tokens.next_due_at)
            .bind(tokens.configuration_json.as_deref())
    }};
}

mod commits;
pub mod copy;
mod events;
pub use events::ORDERED_ATTEMPTS;
mod instances;

#[cfg(test)]
mod tests {
    use super::*;

    /// A write a full disk refuses is remembered for `/healthz` (which said ok: its probe
    /// rewrites a row in place, which a full database may still take).
    #[tokio::test]
    async fn a_write_the_disk_refuses_is_remembered() {
        let path = std::env::temp_dir().join(format!("tw-full-{}.db", crate::crypto::new_id()));
        let url = format!("sqlite://{}", path.display());
        let store = Store::connect(&url).await.unwrap();
        // The database may grow no more: SQLite answers SQLITE_FULL, as on a full disk.
        sqlx::query("PRAGMA max_page_count = 1")
            .execute(&store.pool)
            .await
            .unwrap();
        let mut refused = None;
        for n in 0..200 {
            let written = sqlx::query(
                "INSERT INTO organizations (id, name, secret_hash, webhook_secret_enc, created_at) \
                 VALUES ($1, $2, $3, $3, 0)",
            )
            .bind(n)
            .bind("x".repeat(4000))
            .bind(vec![n as u8; 32 + (n as usize)])
            .execute(&store.pool)
            .await;
            if let Err(error) = written {
                refused = Some(StoreError::from(error));
                break;
            }
        }
        assert!(
            matches!(refused, Some(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        let (_, said) = recent_write_failure(60_000).expect("remembered");
        assert!(said.contains("full"), "{said}");
        store.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    /// A database that does not answer is a passing state: 503 with a `Retry-After`, not 500.
    #[test]
    fn a_database_that_does_not_answer_is_503() {
        for error in [sqlx::Error::PoolTimedOut, sqlx::Error::PoolClosed] {
            let error = StoreError::from(error);
            assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
            let answer = crate::http::error::ApiError::from(error);
            assert_eq!(answer.status.as_u16(), 503);
            assert_eq!(answer.retry_after, Some(5));
        }
        assert!(matches!(
            StoreError::from(sqlx::Error::RowNotFound),
            StoreError::NotFound
        ));
    }

    /// sqlx refuses to start on a database where an applied migration's file has changed since
    /// (its checksum is kept in `_sqlx_migrations`), even a comment of it: a migration, once
    /// released, is never edited. A new one goes in a new file, and its checksum here.
    #[test]
    fn released_migrations_never_change() {
        let expected: [(&Migrator, &[(i64, &str)]); 2] = [
            (
                &SQLITE_MIGRATOR,
                &[
                    (
                        1,
                        "4a0e5a2d133d46897cb7065518a39942a62380f19052ca51a7e441a7265b83bad7caf7b1eaf2ba15aa9ff388d3ec76f5",
                    ),
                    (
                        2,
                        "ec0b23d6a5cd2fb036df6bba6eb419ae258c42bebf3cd4cd3a5355cabde5de249ee8139cc1cbfc96187f1b7e8dac580f",
                    ),
                    (
                        3,
                        "59d9c57de6c84fa754808b1be0afd1028b89de4a6ac106e9c97e8486eb0ae8dc0c8f634f574693bd50769028009f414a",
                    ),
                    (
                        4,
                        "7603ae43d92b32e1e26e078eb67f42b033f3499acf7c550eeddf02dd566989bda78b633181acd68e7711d094014b2fe2",
                    ),
                    (
                        5,
                        "5cd075ae4bb7c2e295d4e010b21b339fbad9e849993ec2f162eca535a9b749b44ab80b5ab93fe0080e5bbf89187dbedd",
                    ),
                    (
                        6,
                        "c3c684b57aa7fa15c14a7b7050773d5e3d21062bf5cd4662a6d13d70b0add77810852f14f9fa8c04cf49a780d989d2c8",
                    ),
                    (
                        7,
                        "ff33aa65dee339258045ab29a8c35ea4117c65ebbb191f1534b4f4e84ec2aa60dac89db434a9933d5c9f4ae6c17b8118",
                    ),
                    (
                        8,
                        "a6b2efa58aab3d5e6f46978280cd9221de62983e5a9c16af6bcab8bef59e63a4ab4a8b0c760f521cc91d67a39b8a8ca3",
                    ),
                    (
                        9,
                        "54680009fc86dce28e696f4c4c285319642db840156c5002ecaef7f1f4b034dba6be26f9204cd105a320c6fec39fbaf1",
                    ),
                    (
                        10,
                        "b9d5ca351a0ac919997769f39aa0c9c7561c188072ec6270bc7e406bc43ad79bb1de747ed785106b506214fca2a94d5a",
                    ),
                    (
                        11,
                        "2ac95292b4bb10bcbfc1c5e8746b0d6097c11f0ec89ebfd78b20f6ee25625318b8817c1e96775ab62c657e5f7e4ed68c",
                    ),
                ],
            ),
            (
                &POSTGRES_MIGRATOR,
                &[
                    (
                        1,
                        "d8b8331f50b45f52cd36d887f3806c9a2ada45bb2bfe3980c27270177941167cfffc13cccbc9c92f00283c3c74511d63",
                    ),
                    (
                        2,
                        "ec0b23d6a5cd2fb036df6bba6eb419ae258c42bebf3cd4cd3a5355cabde5de249ee8139cc1cbfc96187f1b7e8dac580f",
                    ),
                    (
                        3,
                        "6fbf7ee36d0e9e59e218e07e00d066f062e2dfd41ac2014b00ec88fd344e33da1124c5c6f0e2b603f79619286745ee21",
                    ),
                    (
                        4,
                        "7603ae43d92b32e1e26e078eb67f42b033f3499acf7c550eeddf02dd566989bda78b633181acd68e7711d094014b2fe2",
                    ),
                    (
                        5,
                        "5b67db794298b572f3f4162f1926bf10341fe61ad41d27ef861048ef1ac1acbdf8e84a904525e24dc4c022b8c954df07",
                    ),
                    (
                        6,
                        "c3c684b57aa7fa15c14a7b7050773d5e3d21062bf5cd4662a6d13d70b0add77810852f14f9fa8c04cf49a780d989d2c8",
                    ),
                    (
                        7,
                        "ff33aa65dee339258045ab29a8c35ea4117c65ebbb191f1534b4f4e84ec2aa60dac89db434a9933d5c9f4ae6c17b8118",
                    ),
                    (
                        8,
                        "ece8047907ad65071a91568cee6b2ef3c6d577ed34600ff00f9bc58c99b42f300f511f2d38f84d688857e02c88b19128",
                    ),
                    (
                        9,
                        "0d11b3571c9ad28e74a5eb58144c9657350dcd6173df28f06b9165cd5cdeea78a7e7fda6cf03d4021150499b34317a08",
                    ),
                    (
                        10,
                        "b9d5ca351a0ac919997769f39aa0c9c7561c188072ec6270bc7e406bc43ad79bb1de747ed785106b506214fca2a94d5a",
                    ),
                    (
                        11,
                        "2ac95292b4bb10bcbfc1c5e8746b0d6097c11f0ec89ebfd78b20f6ee25625318b8817c1e96775ab62c657e5f7e4ed68c",
                    ),
                ],
            ),
        ];
        for (migrator, released) in expected {
            let found: Vec<(i64, String)> = migrator
                .iter()
                .map(|migration| (migration.version, crate::crypto::hex(&migration.checksum)))
                .collect();
            for (version, checksum) in released {
                assert!(
                    found.contains(&(*version, checksum.to_string())),
                    "migration {version} changed or is gone: {found:?}"
                );
            }
            assert_eq!(
                found.len(),
                released.len(),
                "a new migration: add its checksum here"
            );
        }
    }
}
