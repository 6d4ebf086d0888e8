//! Events: the outbox. An event is written in the same transaction as the change it reports;
//! webhook delivery claims pending events, posts them, and records the outcome.

use sqlx::{Any, Transaction};

use super::{DeliveryOutcome, Engine, EventFilter, EventRow, NewEvent, Store, StoreError};

/// Attempts during which a failing webhook holds back the later ones of its instance (with
/// the retry steps of 1, 2, 4, 8 and 16 s, jittered: about half a minute).
pub const ORDERED_ATTEMPTS: i64 = 5;

const EVENT_COLUMNS: &str = "id, organization_id, instance_id, element_key, event_type, reason, \
     occurred_at, payload, delivery_state, attempts, next_attempt_at, last_error, delivered_at";

/// Inserts an event inside a caller's transaction.
pub(super) async fn insert_event_in(
    transaction: &mut Transaction<'static, Any>,
    event: &NewEvent,
) -> Result<(), StoreError> {
    let query = sqlx::query(
        "INSERT INTO events (id, organization_id, instance_id, element_key, event_type, reason, \
         occurred_at, payload, delivery_state, attempts, next_attempt_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10)",
    );
    bind_event!(query, event)
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

impl Store {
    /// Events waiting for delivery (the outbox backlog), and when the oldest of them happened.
    pub async fn pending_deliveries(&self) -> Result<(i64, Option<i64>), StoreError> {
        let (count, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(occurred_at) FROM events WHERE delivery_state = 'pending'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((count, oldest))
    }

    /// The earliest attempt of a pending delivery that may go out then: one waiting behind an
    /// earlier event of its instance is not counted (its turn comes when that one ends).
    pub async fn next_delivery_time(&self) -> Result<Option<i64>, StoreError> {
        let sql = format!(
            "SELECT MIN(e.next_attempt_at) FROM events e WHERE e.delivery_state = 'pending' AND {}",
            self.first_of_its_instance()
        );
        let next: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?;
        Ok(next)
    }

    /// SQL condition on a pending event `e`: no earlier event of its instance is still pending
    /// within its first [`ORDERED_ATTEMPTS`] attempts (being delivered, or waiting for its
    /// next one; a claim counts the attempt it starts). Webhooks of one instance thus go out
    /// one at a time, in the order their events were written, through a receiver's restart or
    /// a short outage: a receiver does
    /// not see `instance.reauthenticated` before the `instance.invalidated` it follows. An
    /// event that keeps failing (a receiver that refuses one type, a callback URL fixed since)
    /// stops holding the others after those attempts (about half a minute) and goes on being
    /// retried beside them. Events without an instance are not held. The order is `seq` on
    /// PostgreSQL, the rowid on SQLite (migration 0003).
    fn first_of_its_instance(&self) -> String {
        let order = match self.engine {
            Engine::Postgres => "p.seq < e.seq",
            Engine::Sqlite => "p.rowid < e.rowid",
        };
        format!(
            "NOT EXISTS (SELECT 1 FROM events p WHERE p.delivery_state = 'pending' \
             AND p.instance_id = e.instance_id AND {order} AND p.attempts <= {ORDERED_ATTEMPTS})"
        )
    }

    /// Records an event on its own (`Conflict` when the id is taken).
    pub async fn insert_event(&self, event: &NewEvent) -> Result<(), StoreError> {
        let mut transaction = self.begin_write().await?;
        insert_event_in(&mut transaction, event).await?;
        transaction.commit().await?;
        Ok(())
    }

    pub async fn get_event(
        &self,
        organization_id: i64,
        id: &str,
    ) -> Result<Option<EventRow>, StoreError> {
        let sql =
            format!("SELECT {EVENT_COLUMNS} FROM events WHERE organization_id = $1 AND id = $2");
        let row = sqlx::query_as::<_, EventRow>(sqlx::AssertSqlSafe(sql))
            .bind(organization_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    /// An organization's events, newest first, optionally of one instance and/or one type;
    /// `filter.before` (the last event of the previous page) pages on.
    ///
    /// Only the filters given are in the query: a filter written `($n IS NULL OR column = $n)`
    /// cannot use an index, and the walk through the organization's whole history it made
    /// instead (for an instance's events: every refresh's, held on SQLite's one connection)
    /// stalled the commits of refreshed tokens behind it.
    pub async fn list_events(
        &self,
        organization_id: i64,
        filter: &EventFilter,
    ) -> Result<Vec<EventRow>, StoreError> {
        let mut sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE organization_id = $1");
        let mut next = 2;
        let mut placeholder = || {
            next += 1;
            format!("${}", next - 1)
        };
        if filter.instance_id.is_some() {
            sql += &format!(" AND instance_id = {}", placeholder());
        }
        if filter.event_type.is_some() {
            sql += &format!(" AND event_type = {}", placeholder());
        }
        // Events of one millisecond are listed in the order they were written (an
        // invalidation before the recovery that followed it): SQLite's rowid, PostgreSQL's
        // `seq` (see migration 0003). The cursor names an event by its id; one deleted since
        // (the retention purge) lists its millisecond again rather than skip it.
        let written = match self.engine {
            Engine::Postgres => "seq",
            Engine::Sqlite => "rowid",
        };
        if filter.before.is_some() {
            let (at, id) = (placeholder(), placeholder());
            sql += &format!(
                " AND (occurred_at < {at} OR (occurred_at = {at} AND {written} < \
                 COALESCE((SELECT {written} FROM events WHERE organization_id = $1 \
                 AND id = {id}), {})))",
                i64::MAX
            );
        }
        sql += &format!(
            " ORDER BY occurred_at DESC, {written} DESC LIMIT {}",
            placeholder()
        );
        let mut query =
            sqlx::query_as::<_, EventRow>(sqlx::AssertSqlSafe(sql)).bind(organization_id);
        if let Some(instance_id) = filter.instance_id {
            query = query.bind(instance_id);
        }
        if let Some(event_type) = &filter.event_type {
            query = query.bind(event_type.clone());
        }
        if let Some(cursor) = &filter.before {
            query = query.bind(cursor.occurred_at).bind(cursor.id.clone());
        }
        let rows = query.bind(filter.limit).fetch_all(&self.pool).await?;
        Ok(rows)
    }

    /// Claims up to `limit` pending events whose `next_attempt_at` has come: counts the attempt
    /// and moves `next_attempt_at` to `retry_at`, so that a deliverer that dies leaves them to
    /// be retried then, and so that two replicas never deliver the same event at once. Only
    /// the first pending event of each instance is claimed ([`Self::first_of_its_instance`]).
    /// A fair share: at most `per_organization` events of one organization, and none of the
    /// organizations in `skip` (those with that many in flight already), so that one
    /// organization's slow receivers cannot hold every slot.
    pub async fn claim_pending_deliveries(
        &self,
        now: i64,
        limit: i64,
        retry_at: i64,
        per_organization: i64,
        skip: &[i64],
    ) -> Result<Vec<EventRow>, StoreError> {
        let first = self.first_of_its_instance();
        // Organization ids are our own integers: written into the query, not bound.
        let skipped = if skip.is_empty() {
            String::new()
        } else {
            let ids: Vec<String> = skip.iter().map(i64::to_string).collect();
            format!(" AND e.organization_id NOT IN ({})", ids.join(", "))
        };
        // The candidates (locked on PostgreSQL, where locking and ranking cannot share a
        // query level), then at most `per_organization` of each, the earliest first.
        let ranked = "SELECT id FROM (SELECT id, next_attempt_at, ROW_NUMBER() OVER \
                      (PARTITION BY organization_id ORDER BY next_attempt_at, id) AS nth \
                      FROM candidates) ranked WHERE nth <= $4 \
                      ORDER BY next_attempt_at LIMIT $2";
        let sql = match self.engine {
            // A replica that claims meanwhile skips the rows locked here, and still sees them
            // pending: the events behind them wait in both.
            Engine::Postgres => format!(
                "WITH candidates AS (SELECT e.id, e.organization_id, e.next_attempt_at \
                 FROM events e WHERE e.delivery_state = 'pending' AND e.next_attempt_at <= $1 \
                 AND {first}{skipped} ORDER BY e.next_attempt_at LIMIT $2 * 4 \
                 FOR UPDATE OF e SKIP LOCKED), due AS ({ranked}) \
                 UPDATE events SET attempts = attempts + 1, next_attempt_at = $3 \
                 FROM due WHERE events.id = due.id RETURNING {}",
                prefixed("events", EVENT_COLUMNS)
            ),
            Engine::Sqlite => format!(
                "WITH candidates AS (SELECT e.id, e.organization_id, e.next_attempt_at \
                 FROM events e WHERE e.delivery_state = 'pending' AND e.next_attempt_at <= $1 \
                 AND {first}{skipped} ORDER BY e.next_attempt_at LIMIT $2 * 4) \
                 UPDATE events SET attempts = attempts + 1, next_attempt_at = $3 \
                 WHERE id IN ({ranked}) RETURNING {EVENT_COLUMNS}"
            ),
        };
        let rows = sqlx::query_as::<_, EventRow>(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(limit)
            .bind(retry_at)
            .bind(per_organization)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }

    /// Records the outcome of a delivery attempt. `error` is what went wrong (status, transport
    /// failure), never a payload or a secret. `attempt`: the claim's attempt count, so that a
    /// deliverer whose claim ran out (a replica stalled past the lease) does not write over
    /// the outcome of the one that claimed the event after it. False when there is no such
    /// event, or it was claimed again.
    pub async fn mark_delivery(
        &self,
        id: &str,
        outcome: DeliveryOutcome,
        error: Option<&str>,
        attempt: Option<i64>,
    ) -> Result<bool, StoreError> {
        let (state, next_attempt_at, delivered_at) = match outcome {
            DeliveryOutcome::Delivered { at } => ("delivered", None, Some(at)),
            DeliveryOutcome::RetryAt(at) => ("pending", Some(at), None),
            DeliveryOutcome::Failed => ("failed", None, None),
        };
        let result = sqlx::query(
            "UPDATE events SET delivery_state = $1, next_attempt_at = $2, delivered_at = $3, \
             last_error = $4 WHERE id = $5 AND attempts = COALESCE($6, attempts)",
        )
        .bind(state)
        .bind(next_attempt_at)
        .bind(delivered_at)
        .bind(error)
        .bind(id)
        .bind(attempt)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }
}

/// `a, b` → `table.a, table.b`, for `UPDATE … FROM … RETURNING` where names are ambiguous.
pub(super) fn prefixed(table: &str, columns: &str) -> String {
    columns
        .split(',')
        .map(|column| format!("{table}.{}", column.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}
