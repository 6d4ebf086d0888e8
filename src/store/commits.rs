//! Group commit of refreshed tokens.
//!
//! A refresh ends with a compare-and-swap of the instance's tokens and its
//! `instance.token.refreshed` event. Alone, that is one transaction per refresh: on PostgreSQL
//! the database then spends more on starting statements and flushing commits than on the rows,
//! and on SQLite every commit waits for its own write of the log to disk (see
//! bench/RESULTS.md). Here the commits that wait at the same moment go out together, in one
//! transaction, each row keeping its own compare-and-swap and its own event:
//! - PostgreSQL: one `UPDATE … FROM (VALUES …)` statement, and the events of the rows it
//!   updated; [`CONCURRENT_BATCHES`] batches at a time;
//! - SQLite: the statements one after another in one transaction; one batch at a time (it
//!   writes through one connection), the next gathering what came meanwhile.
//!
//! Nobody waits for a batch to fill: a commit goes at once when a slot is free, and commits
//! queue only while the slots are taken. A caller learns its result only after the transaction
//! committed, so a rotated refresh token is as durable as with a transaction of its own. A
//! batch the database refused is retried commit by commit, so one bad row cannot fail the
//! others.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::events::prefixed;
use super::instances::{INSTANCE_COLUMNS, RefreshedCommit};
use super::{InstanceRow, NewEvent, Store, StoreError, TokenUpdate};

/// The most commits in one statement.
const MAX_BATCH: usize = 32;
/// Batches running at once on PostgreSQL (each on its own pooled connection). SQLite writes
/// through one connection: one batch at a time, and the next gathers what came meanwhile.
const CONCURRENT_BATCHES: usize = 4;
/// Parameters per commit and per event in the statement.
const COMMIT_PARAMETERS: usize = 12;
const EVENT_PARAMETERS: usize = 11;

pub(super) struct PendingCommit {
    pub id: i64,
    pub owner: String,
    pub expected_token_version: i64,
    pub tokens: TokenUpdate,
    pub event: Option<NewEvent>,
    pub reply: oneshot::Sender<Result<Option<InstanceRow>, StoreError>>,
}

impl PendingCommit {
    fn commit(&self) -> RefreshedCommit<'_> {
        RefreshedCommit {
            id: self.id,
            owner: &self.owner,
            expected_token_version: self.expected_token_version,
            tokens: &self.tokens,
            event: self.event.as_ref(),
        }
    }
}

/// The queue in front of the committing task.
#[derive(Clone)]
pub(super) struct CommitQueue {
    sender: mpsc::UnboundedSender<PendingCommit>,
    /// Commits that went out in a statement with others.
    grouped: Arc<AtomicU64>,
}

impl std::fmt::Debug for CommitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitQueue")
    }
}

impl CommitQueue {
    /// Starts the committing task on the current runtime. `store` must have no queue of its
    /// own: the task ends when every store that sends to it is gone.
    pub fn start(store: Store) -> CommitQueue {
        let (sender, mut receiver) = mpsc::unbounded_channel::<PendingCommit>();
        let grouped = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&grouped);
        tokio::spawn(async move {
            let concurrency = match store.engine {
                super::Engine::Postgres => CONCURRENT_BATCHES,
                super::Engine::Sqlite => 1,
            };
            let permits = Arc::new(Semaphore::new(concurrency));
            loop {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    break;
                };
                let Some(first) = receiver.recv().await else {
                    break;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match receiver.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let store = store.clone();
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let grouped = store.commit_batch(batch).await;
                    counter.fetch_add(grouped as u64, Ordering::Relaxed);
                    drop(permit);
                });
            }
        });
        CommitQueue { sender, grouped }
    }

    /// How many commits went out in a statement with others, since the start.
    pub fn grouped(&self) -> u64 {
        self.grouped.load(Ordering::Relaxed)
    }

    /// Queues a commit: false when the task is gone (the caller then commits alone).
    pub fn send(&self, pending: PendingCommit) -> bool {
        self.sender.send(pending).is_ok()
    }
}

/// The smallest of 1, 2, 4, … 32 that holds `n`: statements come in a few shapes (the text
/// depends only on the shape and on whether there are events), each prepared once per
/// connection; the rest of a shape is rows of NULL parameters, which match nothing.
fn shape(n: usize) -> usize {
    n.next_power_of_two().min(MAX_BATCH)
}

/// `total` rows of `(VALUES (…), (…))` parameters, numbered from `$first` on.
fn values_rows(types: &[&str], total: usize, first: usize) -> String {
    let mut rows = Vec::with_capacity(total);
    let mut next = first;
    for _ in 0..total {
        let cells: Vec<String> = types
            .iter()
            .map(|ty| {
                next += 1;
                format!("${}::{ty}", next - 1)
            })
            .collect();
        rows.push(format!("({})", cells.join(", ")));
    }
    rows.join(", ")
}

const COMMIT_TYPES: [&str; COMMIT_PARAMETERS] = [
    "bigint", "bigint", "text", "bytea", "bytea", "bytea", "bigint", "bigint", "bigint", "bigint",
    "text", "bigint",
];
const EVENT_TYPES: [&str; EVENT_PARAMETERS] = [
    "bigint", "text", "bigint", "bigint", "text", "text", "text", "bigint", "text", "text",
    "bigint",
];

/// The statement for `rows` commits and, when `with_events`, `rows` events (padding included).
fn batch_sql(rows: usize, with_events: bool) -> String {
    let updated = format!(
        "v (id, expected, owner, access_enc, refresh_enc, response_enc, access_exp, \
         refresh_exp, last_refresh, next_due, configuration, now) AS (VALUES {}), \
         updated AS (UPDATE instances AS i SET access_token_enc = v.access_enc, \
         refresh_token_enc = COALESCE(v.refresh_enc, i.refresh_token_enc), \
         token_response_enc = v.response_enc, access_expires_at = v.access_exp, \
         refresh_expires_at = v.refresh_exp, last_refresh_at = v.last_refresh, \
         next_due_at = v.next_due, configuration = CASE WHEN v.configuration IS NULL \
         THEN i.configuration ELSE (i.configuration::jsonb || v.configuration::jsonb)::text END, \
         token_version = i.token_version + 1, \
         revived_reason = CASE WHEN i.state = 'invalid' AND i.state_reason LIKE 'refresh interrupted%' THEN i.state_reason ELSE NULL END, \
         state = CASE WHEN i.state = 'invalid' AND i.state_reason LIKE 'refresh interrupted%' THEN 'valid' ELSE i.state END, \
         state_reason = CASE WHEN i.state = 'invalid' AND i.state_reason LIKE 'refresh interrupted%' THEN NULL ELSE i.state_reason END, \
         provider_message = CASE WHEN i.state = 'invalid' AND i.state_reason LIKE 'refresh interrupted%' THEN NULL ELSE i.provider_message END, \
         failing_since = NULL, failure_count = 0, \
         backoff_until = NULL, last_failure = NULL, \
         refresh_lease_until = CASE WHEN i.refresh_lease_owner = v.owner THEN NULL \
         ELSE i.refresh_lease_until END, \
         refresh_in_flight_since = CASE WHEN i.refresh_lease_owner = v.owner THEN NULL \
         ELSE i.refresh_in_flight_since END, \
         refresh_lease_owner = CASE WHEN i.refresh_lease_owner = v.owner THEN NULL \
         ELSE i.refresh_lease_owner END, \
         updated_at = CASE WHEN v.now > i.updated_at THEN v.now ELSE i.updated_at + 1 END FROM v WHERE i.id = v.id AND i.token_version = v.expected \
         AND (i.state <> 'invalid' OR i.state_reason LIKE 'refresh interrupted%') \
         RETURNING {}, i.revived_reason)",
        values_rows(&COMMIT_TYPES, rows, 1),
        prefixed("i", INSTANCE_COLUMNS),
    );
    if !with_events {
        return format!("WITH {updated} SELECT * FROM updated");
    }
    format!(
        "WITH {updated}, e (for_id, id, organization_id, instance_id, element_key, event_type, \
         reason, occurred_at, payload, delivery_state, next_attempt_at) AS (VALUES {}), \
         logged AS (INSERT INTO events (id, organization_id, instance_id, element_key, \
         event_type, reason, occurred_at, payload, delivery_state, attempts, next_attempt_at) \
         SELECT e.id, e.organization_id, e.instance_id, e.element_key, e.event_type, e.reason, \
         e.occurred_at, e.payload, e.delivery_state, 0, e.next_attempt_at \
         FROM e JOIN updated ON updated.id = e.for_id) \
         SELECT * FROM updated",
        values_rows(&EVENT_TYPES, rows, 1 + rows * COMMIT_PARAMETERS),
    )
}

impl Store {
    /// Commits `batch` in one statement and answers each commit; see the module. Answers how
    /// many went out together.
    async fn commit_batch(&self, batch: Vec<PendingCommit>) -> usize {
        // One row per instance in a statement: a second commit of the same instance (not made
        // by the refresh engine, which refreshes an instance once at a time) goes alone, after
        // the batch, in the order they came.
        let mut seen = HashSet::with_capacity(batch.len());
        let (batch, later): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|pending| seen.insert(pending.id));
        let grouped = if batch.len() == 1 {
            let pending = batch.into_iter().next().expect("one commit");
            self.commit_alone(pending).await;
            0
        } else if self.engine == super::Engine::Sqlite {
            self.commit_together_sqlite(batch).await
        } else {
            self.commit_together(batch).await
        };
        for pending in later {
            self.commit_alone(pending).await;
        }
        grouped
    }

    async fn commit_together(&self, batch: Vec<PendingCommit>) -> usize {
        let rows = shape(batch.len());
        let with_events = batch.iter().any(|p| p.event.is_some());
        let sql = batch_sql(rows, with_events);
        let mut query = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql));
        let now = crate::app::now_ms();
        for pending in &batch {
            query = query
                .bind(Some(pending.id))
                .bind(Some(pending.expected_token_version))
                .bind(Some(pending.owner.as_str()));
            query = bind_tokens!(query, &pending.tokens).bind(Some(now));
        }
        for _ in batch.len()..rows {
            query = query
                .bind(None::<i64>)
                .bind(None::<i64>)
                .bind(None::<&str>)
                .bind(None::<&[u8]>)
                .bind(None::<&[u8]>)
                .bind(None::<&[u8]>)
                .bind(None::<i64>)
                .bind(None::<i64>)
                .bind(None::<i64>)
                .bind(None::<i64>)
                .bind(None::<&str>)
                .bind(None::<i64>);
        }
        if with_events {
            let mut bound = 0;
            for pending in &batch {
                if let Some(event) = &pending.event {
                    bound += 1;
                    query = bind_event!(query.bind(Some(pending.id)), event);
                }
            }
            for _ in bound..rows {
                query = query
                    .bind(None::<i64>)
                    .bind(None::<&str>)
                    .bind(None::<i64>)
                    .bind(None::<i64>)
                    .bind(None::<&str>)
                    .bind(None::<&str>)
                    .bind(None::<&str>)
                    .bind(None::<i64>)
                    .bind(None::<&str>)
                    .bind(None::<&str>)
                    .bind(None::<i64>);
            }
        }
        match query.fetch_all(&self.pool).await {
            Ok(committed) => {
                let grouped = batch.len();
                let mut committed: std::collections::HashMap<i64, InstanceRow> =
                    committed.into_iter().map(|row| (row.id, row)).collect();
                for pending in batch {
                    let _ = pending.reply.send(Ok(committed.remove(&pending.id)));
                }
                grouped
            }
            // The database refused the statement (a constraint, say): it rolled back whole, and
            // each commit is tried alone, at once, so only the bad one fails. Not a database in
            // a passing state (full, read-only, out of connections): as one that does not
            // answer, below, rather than as many attempts at once.
            // So is a statement cancelled for its time or a lock (`statement_timeout`,
            // `lock_timeout`): a batch may take longer, or meet a locked row, where one commit
            // alone does not.
            Err(sqlx::Error::Database(refused))
                if !super::passing(refused.as_ref()) || super::cancelled(refused.as_ref()) =>
            {
                tracing::warn!(
                    commits = batch.len(),
                    "a batch of token commits was refused ({}); committing each alone",
                    refused.message()
                );
                futures_util::future::join_all(
                    batch.into_iter().map(|pending| self.commit_alone(pending)),
                )
                .await;
                0
            }
            // No answer (the pool, the connection): every commit of the batch fails as one
            // alone would, without a retry that could wait as long again for each of them.
            // (As the error it is: a store that does not answer is told apart, and the
            // refresh keeps its rotated tokens for it.)
            Err(error) => {
                let error = StoreError::from(error);
                for pending in batch {
                    let _ = pending.reply.send(Err(error.clone()));
                }
                0
            }
        }
    }

    async fn commit_together_sqlite(&self, batch: Vec<PendingCommit>) -> usize {
        let rows: Vec<_> = batch.iter().map(PendingCommit::commit).collect();
        match self.commit_refreshed_batch_sqlite(&rows).await {
            Ok(committed) => {
                let grouped = batch.len();
                for (pending, row) in batch.into_iter().zip(committed) {
                    let _ = pending.reply.send(Ok(row));
                }
                grouped
            }
            Err(error) => {
                // Rolled back whole: each commit alone, so only a bad one fails.
                tracing::warn!(
                    commits = batch.len(),
                    "a batch of token commits failed ({error}); committing each alone"
                );
                for pending in batch {
                    self.commit_alone(pending).await;
                }
                0
            }
        }
    }

    async fn commit_alone(&self, pending: PendingCommit) {
        let result = self.commit_refreshed_alone(pending.commit()).await;
        let _ = pending.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_powers_of_two_up_to_the_batch_limit() {
        assert_eq!([1, 2, 3, 4, 5, 17, 32].map(shape), [1, 2, 4, 4, 8, 32, 32]);
    }

    #[test]
    fn parameters_are_numbered_across_commits_and_events() {
        let sql = batch_sql(4, true);
        // 4 commit rows x 12 parameters, then 4 event rows x 11, from $49 to $92.
        assert!(sql.contains("$48::bigint)"), "{sql}");
        assert!(sql.contains("($49::bigint, $50::text"), "{sql}");
        assert!(sql.contains("$92::bigint)"), "{sql}");
        assert!(!sql.contains("$93"), "{sql}");
        assert!(
            !sql.contains("NULL::"),
            "padding is bound, so the text depends on the shape only"
        );
        assert!(!batch_sql(4, false).contains("INSERT INTO events"));
    }
}
