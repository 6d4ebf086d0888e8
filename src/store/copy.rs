//! `tokenwarden database copy`: every row of one database into another, empty one — SQLite into
//! PostgreSQL when one machine is outgrown (or back, or between servers of one engine).
//!
//! Sealed values are copied as they are: a ciphertext's binding names its table, row and field
//! (see `crypto`), and all three stay the same, so the copy opens with the source's master key
//! and with nothing else. The source is read in one snapshot (SQLite's read transaction,
//! PostgreSQL's repeatable read) and the target written in one transaction, committed only when
//! the source did not change meanwhile: a refresh by a service still running on the source
//! would have rotated a refresh token after it was read, and the copy would hold a dead grant.

use futures_util::TryStreamExt;
use sqlx::Row;

use super::{Engine, Store, StoreError};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Int,
    Text,
    Blob,
}

struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// The order rows are read and written in: events keep the order their webhooks go out in
    /// (SQLite's `rowid`, PostgreSQL's `seq`, which the target gives them again as they come).
    order: &'static str,
}

use Kind::{Blob, Int, Text};

/// Every table, parents before children (foreign keys hold at each statement).
const TABLES: &[Table] = &[
    Table {
        name: "organizations",
        columns: &[
            ("id", Int),
            ("name", Text),
            ("secret_hash", Blob),
            ("webhook_secret_enc", Blob),
            ("created_at", Int),
        ],
        order: "id",
    },
    Table {
        name: "users",
        columns: &[
            ("id", Int),
            ("organization_id", Int),
            ("name", Text),
            ("secret_hash", Blob),
            ("created_at", Int),
        ],
        order: "id",
    },
    Table {
        name: "connectors",
        columns: &[
            ("organization_id", Int),
            ("key", Text),
            ("definition", Text),
            ("created_at", Int),
            ("updated_at", Int),
        ],
        order: "organization_id, key",
    },
    Table {
        name: "oauth_states",
        columns: &[
            ("state_hash", Blob),
            ("organization_id", Int),
            ("element_key", Text),
            ("callback_url", Text),
            ("api_key", Text),
            ("code_verifier_enc", Blob),
            ("scope", Text),
            ("expires_at", Int),
            ("api_secret_enc", Blob),
        ],
        order: "state_hash",
    },
    Table {
        name: "instances",
        columns: &[
            ("id", Int),
            ("organization_id", Int),
            ("element_key", Text),
            ("name", Text),
            ("token_hash", Blob),
            ("token_enc", Blob),
            ("tags", Text),
            ("configuration", Text),
            ("access_token_enc", Blob),
            ("refresh_token_enc", Blob),
            ("token_response_enc", Blob),
            ("client_secret_enc", Blob),
            ("state", Text),
            ("state_reason", Text),
            ("provider_message", Text),
            ("disabled", Int),
            ("token_version", Int),
            ("access_expires_at", Int),
            ("refresh_expires_at", Int),
            ("last_refresh_at", Int),
            ("next_due_at", Int),
            ("refresh_lease_owner", Text),
            ("refresh_lease_until", Int),
            ("refresh_in_flight_since", Int),
            ("failing_since", Int),
            ("failure_count", Int),
            ("backoff_until", Int),
            ("last_failure", Text),
            ("verification", Text),
            ("created_by", Int),
            ("created_at", Int),
            ("updated_at", Int),
            ("revived_reason", Text),
        ],
        order: "id",
    },
    Table {
        name: "used_codes",
        columns: &[
            ("code_hash", Blob),
            ("organization_id", Int),
            ("expires_at", Int),
            ("instance_id", Int),
        ],
        order: "code_hash",
    },
    Table {
        name: "events",
        columns: &[
            ("id", Text),
            ("organization_id", Int),
            ("instance_id", Int),
            ("element_key", Text),
            ("event_type", Text),
            ("reason", Text),
            ("occurred_at", Int),
            ("payload", Text),
            ("delivery_state", Text),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("last_error", Text),
            ("delivered_at", Int),
        ],
        order: "",
    },
    Table {
        name: "audit_logs",
        columns: &[
            ("id", Int),
            ("organization_id", Int),
            ("user_id", Int),
            ("action", Text),
            ("target", Text),
            ("request_id", Text),
            ("detail", Text),
            ("at", Int),
        ],
        order: "id",
    },
    Table {
        name: "key_checks",
        columns: &[("id", Int), ("sealed", Blob), ("created_at", Int)],
        order: "id",
    },
];

/// Columns an engine has that are not copied: the target makes them.
fn made_by_the_target(engine: Engine, table: &str, column: &str) -> bool {
    matches!((engine, table, column), (Engine::Postgres, "events", "seq"))
}

fn order_of(engine: Engine, table: &Table) -> &'static str {
    match (engine, table.order) {
        (Engine::Sqlite, "") => "rowid",
        (Engine::Postgres, "") => "seq",
        (_, order) => order,
    }
}

/// How many rows of each table were copied, in the order they were.
#[derive(Debug, Clone, Default)]
pub struct Copied(pub Vec<(String, u64)>);

impl Copied {
    pub fn rows(&self, table: &str) -> u64 {
        self.0
            .iter()
            .find(|(name, _)| name == table)
            .map_or(0, |(_, rows)| *rows)
    }
}

/// Why a copy did not happen (nothing was written).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The target holds rows already.
    #[error(
        "the target database is not empty ({0}): copy into a new, empty database (a service started on it once made rows)"
    )]
    TargetNotEmpty(String),
    /// The source changed while it was read.
    #[error(
        "the source database changed while it was copied ({0}): a service is still running on it. Stop every `serve` on it and copy again; nothing was written"
    )]
    SourceChanged(String),
    /// A service runs on the source.
    #[error(
        "a service runs on the source database (replica {0}): stop every `serve` on it and copy again (one killed rather than stopped is forgotten a minute after its last word); nothing was written"
    )]
    SourceRunning(String),
    /// The schema holds a table this copy does not know.
    #[error("the copy does not know table {table} of the {side} database")]
    UnknownTable { side: &'static str, table: String },
    /// The schema holds a column this copy does not know.
    #[error("the copy does not know column {column} of table {table} in the {side} database")]
    UnknownColumn {
        side: &'static str,
        table: &'static str,
        column: String,
    },
}

impl From<sqlx::Error> for CopyError {
    fn from(error: sqlx::Error) -> Self {
        CopyError::Store(StoreError::from(error))
    }
}

/// The columns a table has in a database.
async fn columns_of(store: &Store, table: &str) -> Result<Vec<String>, StoreError> {
    let sql = match store.engine {
        Engine::Sqlite => "SELECT name FROM pragma_table_info($1) ORDER BY cid",
        Engine::Postgres => {
            "SELECT CAST(column_name AS TEXT) FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position"
        }
    };
    let rows = sqlx::query(sql).bind(table).fetch_all(&store.pool).await?;
    Ok(rows
        .iter()
        .map(|row| row.try_get::<String, _>(0))
        .collect::<Result<_, _>>()?)
}

/// Refuses a schema with columns the copy would leave behind, or without ones it reads.
async fn check_columns(store: &Store, side: &'static str) -> Result<(), CopyError> {
    for table in TABLES {
        let present = columns_of(store, table.name).await?;
        if let Some(column) = present.iter().find(|column| {
            !made_by_the_target(store.engine, table.name, column)
                && !table.columns.iter().any(|(known, _)| known == column)
        }) {
            return Err(CopyError::UnknownColumn {
                side,
                table: table.name,
                column: column.clone(),
            });
        }
        if let Some((column, _)) = table
            .columns
            .iter()
            .find(|(known, _)| !present.iter().any(|column| column == known))
        {
            return Err(CopyError::Store(StoreError::Database(format!(
                "the {side} database has no column {column} in table {}: is its schema from this release?",
                table.name
            ))));
        }
    }
    Ok(())
}

/// What a running service changes, read from the source: compared before and after the copy.
async fn fingerprint<'c, E>(executor: E) -> Result<Vec<i64>, StoreError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    let row = sqlx::query(
        "SELECT \
           (SELECT COUNT(*) FROM organizations), \
           (SELECT COUNT(*) FROM users), \
           (SELECT COUNT(*) FROM connectors), \
           (SELECT COALESCE(MAX(updated_at), 0) FROM connectors), \
           (SELECT COUNT(*) FROM instances), \
           (SELECT CAST(COALESCE(SUM(token_version), 0) AS BIGINT) FROM instances), \
           (SELECT CAST(COALESCE(SUM(updated_at - created_at), 0) AS BIGINT) FROM instances), \
           (SELECT CAST(COALESCE(SUM(COALESCE(refresh_lease_until, 0) % 1000000007), 0) AS BIGINT) FROM instances), \
           (SELECT COUNT(refresh_in_flight_since) FROM instances), \
           (SELECT COUNT(*) FROM events), \
           (SELECT COUNT(*) FROM events WHERE delivery_state = 'pending'), \
           (SELECT CAST(COALESCE(SUM(attempts), 0) AS BIGINT) FROM events), \
           (SELECT COUNT(*) FROM audit_logs), \
           (SELECT COUNT(*) FROM oauth_states), \
           (SELECT COUNT(*) FROM used_codes)",
    )
    .fetch_one(executor)
    .await?;
    (0..FINGERPRINT_NAMES.len())
        .map(|index| row.try_get::<i64, _>(index).map_err(StoreError::from))
        .collect()
}

const FINGERPRINT_NAMES: [&str; 15] = [
    "organizations",
    "users",
    "connectors",
    "connectors changed",
    "instances",
    "tokens",
    "instances changed",
    "refresh leases",
    "refreshes under way",
    "events",
    "webhooks pending",
    "webhook attempts",
    "audit log",
    "pending authorizations",
    "used codes",
];

enum Value {
    Int(Option<i64>),
    Text(Option<String>),
    Blob(Option<Vec<u8>>),
}

/// Bind parameters per statement: far below SQLite's 32,766 and PostgreSQL's 65,535.
const PARAMETERS_PER_STATEMENT: usize = 4_000;

async fn insert_batch(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    table: &Table,
    batch: &mut Vec<Vec<Value>>,
) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
    let mut sql = format!(
        "INSERT INTO {} ({}) VALUES ",
        table.name,
        columns.join(", ")
    );
    let mut parameter = 0;
    for (index, _) in batch.iter().enumerate() {
        if index > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns.len() {
            if column > 0 {
                sql.push_str(", ");
            }
            parameter += 1;
            sql.push_str(&format!("${parameter}"));
        }
        sql.push(')');
    }
    // Names from `TABLES` only; values are bound.
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for row in batch.drain(..) {
        for value in row {
            query = match value {
                Value::Int(value) => query.bind(value),
                Value::Text(value) => query.bind(value),
                Value::Blob(value) => query.bind(value),
            };
        }
    }
    query.execute(&mut **transaction).await?;
    Ok(())
}

/// How recently a replica must have said it runs for the copy to wait for its stop: it says so
/// every 10 s (the recovery task's round), and goodbye when it stops.
pub const REPLICA_SEEN_WITHIN_MS: i64 = 60_000;

/// Refuses a source a service runs on (an idle one changes nothing a comparison would see).
async fn check_no_replica_runs(source: &Store) -> Result<(), CopyError> {
    let now = crate::app::now_ms();
    let running = source
        .replicas_seen_since(now - REPLICA_SEEN_WITHIN_MS)
        .await?;
    if running.is_empty() {
        return Ok(());
    }
    let named: Vec<String> = running
        .iter()
        .map(|(id, seen)| format!("{id} ({} s ago)", (now - seen).max(0) / 1000))
        .collect();
    Err(CopyError::SourceRunning(named.join(", ")))
}

/// Copies every row of `source` into `target`, which must be empty; both are at this release's
/// schema (opened with [`Store::connect`]). No service may be running on the source. Once the
/// copy is committed, the source is marked as copied to `target_name` (a service started on it
/// again is refused). `progress` hears of each table as it is done.
pub async fn copy_database(
    source: &Store,
    target: &Store,
    target_name: &str,
    mut progress: impl FnMut(&str, u64),
) -> Result<Copied, CopyError> {
    check_columns(source, "source").await?;
    check_columns(target, "target").await?;
    check_tables(source, "source").await?;
    check_no_replica_runs(source).await?;

    let mut write = target.begin_write().await?;
    let mut filled = Vec::new();
    for table in TABLES {
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {}",
            table.name
        )))
        .fetch_one(&mut *write)
        .await?;
        if rows > 0 {
            filled.push(format!("{rows} rows in {}", table.name));
        }
    }
    if !filled.is_empty() {
        return Err(CopyError::TargetNotEmpty(filled.join(", ")));
    }

    let mut read = source.pool.begin().await.map_err(StoreError::from)?;
    if source.engine == Engine::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *read)
            .await?;
    }
    // The snapshot begins at its first read (SQLite's too).
    let before = fingerprint(&mut *read).await?;

    let mut copied = Copied::default();
    for table in TABLES {
        let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
        let select = format!(
            "SELECT {} FROM {} ORDER BY {}",
            columns.join(", "),
            table.name,
            order_of(source.engine, table)
        );
        let per_batch = (PARAMETERS_PER_STATEMENT / columns.len()).max(1);
        let mut batch: Vec<Vec<Value>> = Vec::with_capacity(per_batch);
        let mut count = 0u64;
        {
            let mut rows = sqlx::query(sqlx::AssertSqlSafe(select)).fetch(&mut *read);
            while let Some(row) = rows.try_next().await? {
                let mut values = Vec::with_capacity(columns.len());
                for (index, (_, kind)) in table.columns.iter().enumerate() {
                    values.push(match kind {
                        Int => Value::Int(row.try_get(index)?),
                        Text => Value::Text(row.try_get(index)?),
                        Blob => Value::Blob(row.try_get(index)?),
                    });
                }
                batch.push(values);
                count += 1;
                if batch.len() == per_batch {
                    insert_batch(&mut write, table, &mut batch).await?;
                }
            }
        }
        insert_batch(&mut write, table, &mut batch).await?;
        progress(table.name, count);
        copied.0.push((table.name.to_string(), count));
    }
    // The snapshot ends; what the source holds now is compared with what was copied.
    read.rollback().await?;
    let after = fingerprint(&source.pool).await?;
    // A refresh leased and still at the provider commits after any comparison: the copy would
    // hold the refresh token it retires. A lease outlives its holder by seconds at most.
    let leased: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM instances WHERE refresh_lease_until > $1")
            .bind(crate::app::now_ms())
            .fetch_one(&source.pool)
            .await?;
    if leased > 0 {
        write.rollback().await?;
        return Err(CopyError::SourceChanged(format!(
            "{leased} refresh(es) under way; a lease of a stopped service ends within seconds"
        )));
    }
    if before != after {
        let changed: Vec<&str> = FINGERPRINT_NAMES
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (before, after))| before != after)
            .map(|(name, _)| *name)
            .collect();
        write.rollback().await?;
        return Err(CopyError::SourceChanged(changed.join(", ")));
    }

    if target.engine == Engine::Postgres {
        // The audit log's ids were given; its sequence goes on after them.
        sqlx::query(
            "SELECT setval(pg_get_serial_sequence('audit_logs', 'id'), COALESCE(MAX(id), 0) + 1, false) FROM audit_logs",
        )
        .execute(&mut *write)
        .await?;
    }
    for (table, rows) in &copied.0 {
        let held: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&mut *write)
                .await?;
        if u64::try_from(held).ok() != Some(*rows) {
            write.rollback().await?;
            return Err(CopyError::Store(StoreError::Database(format!(
                "the target holds {held} rows in {table} where {rows} were copied; nothing was written"
            ))));
        }
    }
    // The mark first, then the last look for running services: a service says it runs before
    // it looks for the mark (`App::build`), so one starting now is either seen here or refused
    // there. A copy that fails takes its mark away.
    source
        .mark_copied_to(target_name, crate::app::now_ms())
        .await?;
    let committed = match check_no_replica_runs(source).await {
        Err(running) => {
            let _ = write.rollback().await;
            Err(running)
        }
        Ok(()) => write.commit().await.map_err(CopyError::from),
    };
    if let Err(error) = committed {
        let _ = source.unmark_copied().await;
        return Err(error);
    }
    Ok(copied)
}

/// Tables of the schema that are not copied: the migrations' own, a source's running replicas
/// and the mark of its own copies.
const NOT_COPIED: &[&str] = &["_sqlx_migrations", "replicas", "copied_to"];

/// Refuses a schema with a table the copy would leave behind.
async fn check_tables(store: &Store, side: &'static str) -> Result<(), CopyError> {
    let sql = match store.engine {
        Engine::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        }
        Engine::Postgres => {
            "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        }
    };
    let names: Vec<String> = sqlx::query_scalar(sql).fetch_all(&store.pool).await?;
    match names.into_iter().find(|name| {
        !NOT_COPIED.contains(&name.as_str()) && !TABLES.iter().any(|table| table.name == name)
    }) {
        Some(table) => Err(CopyError::UnknownTable { side, table }),
        None => Ok(()),
    }
}
