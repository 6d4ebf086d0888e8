//! Instances: their metadata, and the token-state primitives of the refresh engine. Each
//! primitive is one statement or one short transaction: no caller holds a connection across a
//! provider call.

use super::events::{insert_event_in, prefixed};
use super::{
    EncryptedInstanceFields, Engine, InstanceRow, NewEvent, Reauthentication, RowVersion, Store,
    StoreError, TokenUpdate, flag,
};

pub(super) const INSTANCE_COLUMNS: &str = "id, organization_id, element_key, name, token_hash, token_enc, \
     tags, configuration, access_token_enc, refresh_token_enc, token_response_enc, \
     client_secret_enc, state, state_reason, provider_message, disabled, token_version, \
     access_expires_at, refresh_expires_at, last_refresh_at, next_due_at, refresh_lease_owner, \
     refresh_lease_until, refresh_in_flight_since, failing_since, failure_count, backoff_until, \
     last_failure, verification, created_by, created_at, updated_at";

/// A commit at the version it refreshed makes an instance invalidated as "refresh interrupted"
/// valid again: the provider has just given tokens for the grant, and that invalidation, at the
/// same version, came from an answer about the refresh token this one retired (another replica
/// took the refresh over once the lease ran out, and presented it). A revocation moves the
/// version, so no commit lands after it. Such a commit writes the reason it undid in
/// `revived_reason` (NULL otherwise), which its answer carries.
///
/// The assignments and compare-and-swap of a commit of refreshed tokens: $1 to $8 the new
/// token fields, $9 the lease owner, $10 the time, $11 the id, $12 the expected token version.
/// $8 is a JSON object of configuration keys merged into the stored configuration (the keys a
/// token response sets), so that other keys changed meanwhile stay: SQLite's `json_patch`,
/// PostgreSQL's `jsonb ||` (the grouped commit in `commits.rs` does the same).
macro_rules! refreshed_set {
    ($merge:literal) => {
        concat!(
            "access_token_enc = $1, \
         refresh_token_enc = COALESCE($2, refresh_token_enc), token_response_enc = $3, \
         access_expires_at = $4, refresh_expires_at = $5, last_refresh_at = $6, \
         next_due_at = $7, configuration = CASE WHEN $8 IS NULL THEN configuration \
         ELSE ",
            $merge,
            " END, token_version = token_version + 1, \
         revived_reason = CASE WHEN state = 'invalid' AND state_reason LIKE 'refresh interrupted%' THEN state_reason ELSE NULL END, \
         state = CASE WHEN state = 'invalid' AND state_reason LIKE 'refresh interrupted%' THEN 'valid' ELSE state END, \
         provider_message = CASE WHEN state = 'invalid' AND state_reason LIKE 'refresh interrupted%' THEN NULL ELSE provider_message END, \
         state_reason = CASE WHEN state = 'invalid' AND state_reason LIKE 'refresh interrupted%' THEN NULL ELSE state_reason END, \
         failing_since = NULL, failure_count = 0, backoff_until = NULL, last_failure = NULL, \
         refresh_lease_until = CASE WHEN refresh_lease_owner = $9 THEN NULL \
         ELSE refresh_lease_until END, \
         refresh_in_flight_since = CASE WHEN refresh_lease_owner = $9 OR refresh_lease_owner IS NULL \
         THEN NULL ELSE refresh_in_flight_since END, \
         refresh_lease_owner = CASE WHEN refresh_lease_owner = $9 THEN NULL \
         ELSE refresh_lease_owner END, \
         updated_at = CASE WHEN $10 > updated_at THEN $10 ELSE updated_at + 1 END WHERE id = $11 AND token_version = $12 \
         AND (state <> 'invalid' OR state_reason LIKE 'refresh interrupted%')"
        )
    };
}
const REFRESHED_SET_SQLITE: &str = refreshed_set!("json_patch(configuration, $8)");
const REFRESHED_SET_POSTGRES: &str = refreshed_set!("(configuration::jsonb || $8::jsonb)::text");

/// What an invalidation writes (see `Store::invalidate`).
struct Invalidation<'a> {
    reason: &'a str,
    provider_message: Option<&'a str>,
    event: Option<&'a NewEvent>,
    expected_version: Option<i64>,
    retire_tokens: bool,
}

/// What an invalidation does with the instance's refresh lease.
#[derive(Clone, Copy)]
enum LeaseOnInvalidation<'a> {
    /// Ended, whoever held it (and the in-flight mark with it).
    Ended,
    /// Left as it is: the caller holds it (a revocation's hold).
    Kept,
    /// Written only when no other process holds it; ended when `owner` does.
    UnlessOthers(&'a str),
}

impl Store {
    fn refreshed_set(&self) -> &'static str {
        match self.engine {
            Engine::Sqlite => REFRESHED_SET_SQLITE,
            Engine::Postgres => REFRESHED_SET_POSTGRES,
        }
    }
}

/// A query that returns instance rows, with its arguments.
type RowQuery<'q> = sqlx::query::QueryAs<'q, sqlx::Any, InstanceRow, sqlx::any::AnyArguments>;

/// One commit of refreshed tokens, as the store's commit paths pass it along: the row, its
/// expected version (the compare-and-swap), the lease `owner`, the tokens and the event.
#[derive(Clone, Copy)]
pub(super) struct RefreshedCommit<'a> {
    pub id: i64,
    pub owner: &'a str,
    pub expected_token_version: i64,
    pub tokens: &'a TokenUpdate,
    pub event: Option<&'a NewEvent>,
}

/// Binds the refreshed set's $1 to $12, in its order.
fn bind_refreshed<'q>(query: RowQuery<'q>, commit: RefreshedCommit<'q>) -> RowQuery<'q> {
    bind_tokens!(query, commit.tokens)
        .bind(commit.owner)
        .bind(crate::app::now_ms())
        .bind(commit.id)
        .bind(commit.expected_token_version)
}

/// A row whose backoff is of the service's own making (transient failures), not one the
/// provider asked for (a 429, a 503's `Retry-After`) nor one for a configuration at fault,
/// except, with `with_configuration`, the app's credentials refused: such a backoff may be
/// cut short.
fn backoff_of_our_making(with_configuration: bool) -> String {
    let misconfigured = crate::refresh::MISCONFIGURED_TEXT;
    let configuration = if with_configuration {
        // Only the app's credentials or the refresh request refused (fixable at the provider,
        // or in the organization's connector): a connector gone or an input missing fails
        // again at once, on our side.
        format!(
            " AND (last_failure NOT LIKE '{misconfigured}%' \
             OR last_failure LIKE '{misconfigured}: {}%' \
             OR last_failure LIKE '{misconfigured}: {}%')",
            // A quote in SQL's literal is doubled ("app's").
            crate::refresh::CLIENT_REFUSED_TEXT.replace('\'', "''"),
            crate::refresh::REQUEST_REFUSED_TEXT.replace('\'', "''")
        )
    } else {
        format!(" AND last_failure NOT LIKE '{misconfigured}%'")
    };
    format!(
        "(last_failure IS NULL OR (last_failure NOT LIKE '{}%' \
         AND last_failure NOT LIKE '{}%'{configuration}))",
        crate::oauth::RATE_LIMITED_TEXT,
        crate::oauth::ASKED_TO_WAIT_TEXT,
    )
}

/// The conditions under which the scheduler may claim a row. `state = 'valid' AND disabled = 0`
/// is spelled as in the partial index `instances_due` so that both engines use it.
const CLAIMABLE: &str = "next_due_at <= $1 AND state = 'valid' AND disabled = 0 \
     AND (refresh_lease_until IS NULL OR refresh_lease_until < $1) \
     AND (backoff_until IS NULL OR backoff_until <= $1)";

impl Store {
    /// Inserts a new instance; `Conflict` when its id or token hash is taken, `NotFound` when
    /// its organization does not exist.
    pub async fn insert_instance(
        &self,
        row: &InstanceRow,
        event: Option<&NewEvent>,
    ) -> Result<(), StoreError> {
        self.insert_instance_of(row, event, false, None)
            .await
            .map(drop)
    }

    /// [`Self::insert_instance`]; with `own_connector`, only while the organization's connector
    /// of that key exists (false when it was deleted meanwhile: a creation spends seconds at
    /// the provider between reading the connector and this insert). On PostgreSQL the row is
    /// share-locked until the commit, so a deletion waits for it and then sees the instance.
    /// `code`: the claimed authorization code (its hash) the instance was made from, marked as
    /// landed on it in the same transaction (see [`Self::code_landed`]).
    pub async fn insert_instance_of(
        &self,
        row: &InstanceRow,
        event: Option<&NewEvent>,
        own_connector: bool,
        code: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let mut transaction = self.begin_write().await?;
        if own_connector {
            let lock = match self.engine() {
                Engine::Postgres => " FOR SHARE",
                Engine::Sqlite => "",
            };
            let sql =
                format!("SELECT 1 FROM connectors WHERE organization_id = $1 AND key = $2{lock}");
            let exists = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(row.organization_id)
                .bind(&row.element_key)
                .fetch_optional(&mut *transaction)
                .await?;
            if exists.is_none() {
                return Ok(false);
            }
        }
        let sql = format!(
            "INSERT INTO instances ({INSTANCE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
             $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, \
             $26, $27, $28, $29, $30, $31, $32)"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(row.id)
            .bind(row.organization_id)
            .bind(&row.element_key)
            .bind(&row.name)
            .bind(&row.token_hash)
            .bind(&row.token_enc)
            .bind(&row.tags)
            .bind(&row.configuration)
            .bind(&row.access_token_enc)
            .bind(&row.refresh_token_enc)
            .bind(&row.token_response_enc)
            .bind(&row.client_secret_enc)
            .bind(&row.state)
            .bind(&row.state_reason)
            .bind(&row.provider_message)
            .bind(row.disabled)
            .bind(row.token_version)
            .bind(row.access_expires_at)
            .bind(row.refresh_expires_at)
            .bind(row.last_refresh_at)
            .bind(row.next_due_at)
            .bind(&row.refresh_lease_owner)
            .bind(row.refresh_lease_until)
            .bind(row.refresh_in_flight_since)
            .bind(row.failing_since)
            .bind(row.failure_count)
            .bind(row.backoff_until)
            .bind(&row.last_failure)
            .bind(&row.verification)
            .bind(row.created_by)
            .bind(row.created_at)
            .bind(row.updated_at)
            .execute(&mut *transaction)
            .await?;
        if let Some(event) = event {
            insert_event_in(&mut transaction, event).await?;
        }
        if let Some(code) = code {
            super::code_landed_in(&mut transaction, code, row.id).await?;
        }
        transaction.commit().await?;
        Ok(true)
    }

    /// One instance of one organization: another organization's id is simply not found.
    pub async fn get_instance(
        &self,
        organization_id: i64,
        id: i64,
    ) -> Result<Option<InstanceRow>, StoreError> {
        let sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1 AND organization_id = $2"
        );
        let row = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(organization_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    /// One instance whatever its organization, for background work only.
    pub async fn get_instance_by_id(&self, id: i64) -> Result<Option<InstanceRow>, StoreError> {
        let sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1");
        let row = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    /// The instance an Element token names, by the token's hash.
    pub async fn find_instance_by_token_hash(
        &self,
        token_hash: &[u8],
    ) -> Result<Option<InstanceRow>, StoreError> {
        let sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE token_hash = $1");
        let row = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    /// An organization's instances, oldest first. With tags, only the instances that have ANY
    /// of them (as Cloud Elements' `tags[]` filter does). The tag filter runs here, not in SQL,
    /// because the two engines' JSON functions differ; an organization's instances are few
    /// enough for that.
    pub async fn list_instances(
        &self,
        organization_id: i64,
        tags: &[String],
    ) -> Result<Vec<InstanceRow>, StoreError> {
        let sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE organization_id = $1 \
             ORDER BY created_at, id"
        );
        let rows = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(organization_id)
            .fetch_all(&self.pool)
            .await?;
        if tags.is_empty() {
            return Ok(rows);
        }
        Ok(rows
            .into_iter()
            .filter(|row| row.tag_list().iter().any(|tag| tags.contains(tag)))
            .collect())
    }

    /// Up to `limit` of the organization's instances created after `after` (its creation time
    /// and id: the order of [`Store::list_instances`]), in that order; a page of a list.
    pub async fn list_instances_after(
        &self,
        organization_id: i64,
        after: Option<(i64, i64)>,
        limit: i64,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        let (created_at, id) = after.unwrap_or((i64::MIN, i64::MIN));
        let sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE organization_id = $1 \
             AND (created_at > $2 OR (created_at = $2 AND id > $3)) \
             ORDER BY created_at, id LIMIT $4"
        );
        Ok(sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(organization_id)
            .bind(created_at)
            .bind(id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Replaces name, tags (JSON array) and configuration (JSON object); `client_secret_enc`:
    /// `None` keeps it, `Some(None)` removes it, `Some(Some(..))` sets it. With `expected`,
    /// only while the row is still as read: a refresh that committed since may have set
    /// configuration keys (`base.url`) that a configuration computed from that read would undo,
    /// and another update may have set keys this one would put back (two PATCHes merging into
    /// the same read lost one's change). Every write of an instance moves `updated_at`
    /// forward, by a millisecond at least, so that it tells them apart. Returns the updated row, or `None`
    /// when the instance is not this organization's (or it moved on).
    #[allow(clippy::too_many_arguments)]
    pub async fn update_instance_metadata(
        &self,
        organization_id: i64,
        id: i64,
        name: &str,
        tags_json: &str,
        configuration_json: &str,
        client_secret_enc: Option<Option<Vec<u8>>>,
        expected: Option<RowVersion>,
        retry_now: bool,
    ) -> Result<Option<InstanceRow>, StoreError> {
        let (replace_secret, secret) = match client_secret_enc {
            None => (0_i64, None),
            Some(secret) => (1_i64, secret),
        };
        // `retry_now`: what the refresh needs changed (the app's credentials, its endpoints),
        // so a backoff from failures under the old values ends and the refresh is due at once.
        // (SET expressions read the row as it was.)
        let sql = format!(
            "UPDATE instances SET name = $1, tags = $2, configuration = $3, \
             client_secret_enc = CASE WHEN $4 = 1 THEN $5 ELSE client_secret_enc END, \
             next_due_at = CASE WHEN $11 = 1 AND backoff_until IS NOT NULL \
             AND next_due_at IS NOT NULL THEN $6 ELSE next_due_at END, \
             backoff_until = CASE WHEN $11 = 1 THEN NULL ELSE backoff_until END, \
             updated_at = CASE WHEN $6 > updated_at THEN $6 ELSE updated_at + 1 END \
             WHERE id = $7 AND organization_id = $8 \
             AND token_version = COALESCE($9, token_version) \
             AND updated_at = COALESCE($10, updated_at) RETURNING {INSTANCE_COLUMNS}"
        );
        let row = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .bind(tags_json)
            .bind(configuration_json)
            .bind(replace_secret)
            .bind(secret)
            .bind(crate::app::now_ms())
            .bind(id)
            .bind(organization_id)
            .bind(expected.map(|row| row.token_version))
            .bind(expected.map(|row| row.updated_at))
            .bind(i64::from(retry_now))
            .fetch_all(&self.pool)
            .await?;
        Ok(only_row(row))
    }

    /// Deletes an instance (and records `event`, e.g. `instance.deleted`, in the same
    /// transaction). False when it is not this organization's.
    pub async fn delete_instance(
        &self,
        organization_id: i64,
        id: i64,
        event: Option<&NewEvent>,
    ) -> Result<bool, StoreError> {
        let mut transaction = self.begin_write().await?;
        let result = sqlx::query("DELETE FROM instances WHERE id = $1 AND organization_id = $2")
            .bind(id)
            .bind(organization_id)
            .execute(&mut *transaction)
            .await?;
        let deleted = commit_with_event(transaction, result.rows_affected() == 1, event).await?;
        if deleted {
            self.forget_freed_pages().await;
        }
        Ok(deleted)
    }

    /// SQLite: writes the log's pages into the file and empties the log, so that the pages a
    /// deletion replaced (their zeros are in the file: `secure_delete`) are not left in
    /// `-wal` until SQLite reuses its space. Best effort: a reader of the file (a backup under
    /// way) keeps the log, and the next deletion tries again. Nothing on PostgreSQL (a deleted
    /// row stays in its table's file until `VACUUM` reuses it).
    async fn forget_freed_pages(&self) {
        if self.engine() != Engine::Sqlite {
            return;
        }
        let Ok(mut connection) = self.pool.acquire().await else {
            return;
        };
        // Without waiting for readers: a reader that stays (a backup under way, Litestream)
        // would hold the checkpoint, and with it SQLite's one connection, for the whole busy
        // timeout at every deletion.
        let checkpoint = async {
            sqlx::query("PRAGMA busy_timeout = 0")
                .execute(&mut *connection)
                .await?;
            let done: Result<(i64, i64, i64), sqlx::Error> =
                sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                    .fetch_one(&mut *connection)
                    .await;
            sqlx::query(super::SQLITE_BUSY_TIMEOUT)
                .execute(&mut *connection)
                .await?;
            done
        };
        match checkpoint.await {
            Ok((0, _, _)) => {}
            Ok(_) => tracing::debug!(
                "SQLite's log is read by another process: it is emptied at a later deletion"
            ),
            Err(error) => {
                tracing::debug!("checkpointing SQLite's log after a deletion: {error}");
                // Not given back with another busy timeout than the pool's.
                connection.close_on_drop();
            }
        }
    }

    /// Removes an instance created from imported tokens whose first refresh the provider
    /// refused (`invalid_grant`: the create answers 400, nothing was created), with what its
    /// insert wrote beside it: its events (its `instance.created`, held back from delivery
    /// until the refresh's outcome is known) and the claim of its tokens (`used_codes`
    /// marked with it), so that the same tokens may be imported again. Only while `owner`
    /// holds its lease (the refresh's) at `expected_version`: a row another process took over
    /// or changed meanwhile stays. One transaction: a crash leaves all of it or none. False
    /// when nothing was removed.
    pub async fn remove_refused_import(
        &self,
        id: i64,
        owner: &str,
        expected_version: i64,
    ) -> Result<bool, StoreError> {
        let mut transaction = self.begin_write().await?;
        let removed = sqlx::query(
            "DELETE FROM instances WHERE id = $1 AND token_version = $2 \
             AND refresh_lease_owner = $3",
        )
        .bind(id)
        .bind(expected_version)
        .bind(owner)
        .execute(&mut *transaction)
        .await?;
        if removed.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM events WHERE instance_id = $1")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        sqlx::query("DELETE FROM used_codes WHERE instance_id = $1")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        self.forget_freed_pages().await;
        Ok(true)
    }

    /// Lets event `id`, held back from delivery until `held_until` (see
    /// `http::instances::store_created`), go out from `now`. False when it was not held (any
    /// more): delivered, or its hold ended by itself.
    pub async fn release_held_event(
        &self,
        id: &str,
        held_until: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE events SET next_attempt_at = $3 WHERE id = $1 \
             AND delivery_state = 'pending' AND attempts = 0 AND next_attempt_at = $2",
        )
        .bind(id)
        .bind(held_until)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Records the outcome of the verification call made with the tokens of `expected_version`
    /// (a later version's tokens were not verified by it). False when nothing was written.
    pub async fn record_verification(
        &self,
        id: i64,
        expected_version: i64,
        verification: &str,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE instances SET verification = $1 WHERE id = $2 AND token_version = $3",
        )
        .bind(verification)
        .bind(id)
        .bind(expected_version)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Disables or enables an instance. False when it is not this organization's, or was so
    /// already (then no event is written).
    pub async fn set_disabled(
        &self,
        organization_id: i64,
        id: i64,
        disabled: bool,
        event: Option<&NewEvent>,
    ) -> Result<bool, StoreError> {
        let mut transaction = self.begin_write().await?;
        let result = sqlx::query(
            "UPDATE instances SET disabled = $1, updated_at = CASE WHEN $2 > updated_at THEN $2 ELSE updated_at + 1 END \
             WHERE id = $3 AND organization_id = $4 AND disabled <> $1",
        )
        .bind(flag(disabled))
        .bind(crate::app::now_ms())
        .bind(id)
        .bind(organization_id)
        .execute(&mut *transaction)
        .await?;
        commit_with_event(transaction, result.rows_affected() == 1, event).await
    }

    /// How many instances are in each state (`valid`, `invalid`, `disabled`, `refresh_failing`),
    /// for the metrics gauges.
    pub async fn count_instances_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT CASE WHEN disabled = 1 THEN 'disabled' WHEN state = 'invalid' THEN 'invalid' \
             WHEN failing_since IS NOT NULL THEN 'refresh_failing' ELSE 'valid' END AS s, \
             COUNT(*) AS n FROM instances GROUP BY s",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    // ----- token state --------------------------------------------------------------------

    /// Takes the refresh lease of one instance if it is free (never taken, or expired at `now`)
    /// and returns the row as it is now; `None` when someone else holds it or there is no such
    /// instance. Moves `next_due_at` to at least `lease_until` (see the module docs).
    /// `refresh_in_flight_since` keeps an earlier value when a previous flight never finished
    /// (its owner died): a returned value below `now` tells the taker that a refresh was
    /// interrupted, so the provider may already have rotated the refresh token away.
    /// `refreshing`: the lease is taken for a refresh, which is marked in flight from `now`; a
    /// hold (a revocation, a deletion, an import) presents no refresh token and marks nothing
    /// (crash recovery would refresh an instance it left marked, and end one without a refresh
    /// token).
    pub async fn try_acquire_refresh_lease(
        &self,
        id: i64,
        owner: &str,
        now: i64,
        lease_until: i64,
        refreshing: bool,
    ) -> Result<Option<InstanceRow>, StoreError> {
        let sql = format!(
            "UPDATE instances SET refresh_lease_owner = $1, refresh_lease_until = $2, \
             refresh_in_flight_since = CASE WHEN $5 = 1 THEN COALESCE(refresh_in_flight_since, $3) \
             ELSE refresh_in_flight_since END, \
             next_due_at = CASE WHEN next_due_at IS NOT NULL AND next_due_at < $2 THEN $2 \
             ELSE next_due_at END \
             WHERE id = $4 AND (refresh_lease_until IS NULL OR refresh_lease_until < $3) \
             RETURNING {INSTANCE_COLUMNS}"
        );
        let row = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(id)
            .bind(i64::from(refreshing))
            .fetch_all(&self.pool)
            .await
            .map(only_row)?;
        Ok(row)
    }

    /// Extends the lease to `lease_until` if `owner` still holds it (even expired, as long as
    /// nobody took it over), and returns the row; `None` when someone else took it. The
    /// refresher's heartbeat: a lease stays short, so a dead replica's lease runs out soon.
    pub async fn renew_refresh_lease(
        &self,
        id: i64,
        owner: &str,
        lease_until: i64,
    ) -> Result<Option<InstanceRow>, StoreError> {
        // The lease's end moves on every renewal, even within one millisecond: a claim given
        // back by the scheduler names the end it claimed, and must not clear a lease that a
        // flight of the same replica took over meanwhile (see `release_claim`).
        let sql = format!(
            "UPDATE instances SET refresh_lease_until = CASE WHEN refresh_lease_until IS NOT NULL \
             AND refresh_lease_until >= $1 THEN refresh_lease_until + 1 ELSE $1 END, \
             next_due_at = CASE WHEN next_due_at IS NOT NULL AND next_due_at < $1 THEN $1 \
             ELSE next_due_at END \
             WHERE id = $2 AND refresh_lease_owner = $3 RETURNING {INSTANCE_COLUMNS}"
        );
        let row = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(lease_until)
            .bind(id)
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        Ok(only_row(row))
    }

    /// Gives back the lease of a hold taken at `held_at`, if `owner` still holds it: a mark
    /// of a refresh in flight from before it stays (an interrupted refresh, which the hold did
    /// not finish: the next taker must know the provider may have rotated the refresh token
    /// away; a change of the tokens under the hold clears it itself). True when it did.
    pub async fn release_hold(
        &self,
        id: i64,
        owner: &str,
        held_at: i64,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE instances SET refresh_lease_owner = NULL, refresh_lease_until = NULL, \
             refresh_in_flight_since = CASE WHEN refresh_in_flight_since < $3 \
             THEN refresh_in_flight_since ELSE NULL END \
             WHERE id = $1 AND refresh_lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .bind(held_at)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Clears the in-flight mark of an instance nobody holds at `now` (crash recovery, for an
    /// instance with nothing to finish).
    pub async fn forget_interrupted(&self, id: i64, now: i64) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE instances SET refresh_in_flight_since = NULL \
             WHERE id = $1 AND (refresh_lease_until IS NULL OR refresh_lease_until < $2)",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Gives back `owner`'s lease of an instance whose interrupted refresh it leaves for now,
    /// keeping the mark of the refresh in flight (the refresh is still to finish, by the
    /// replica that holds its rotated tokens or by recovery), due again at `due_at`.
    pub async fn leave_interrupted_refresh(
        &self,
        id: i64,
        owner: &str,
        due_at: i64,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE instances SET refresh_lease_owner = NULL, refresh_lease_until = NULL, \
             next_due_at = $3 WHERE id = $1 AND refresh_lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .bind(due_at)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Gives the lease back, if `owner` still holds it. True when it did.
    pub async fn release_refresh_lease(&self, id: i64, owner: &str) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE instances SET refresh_lease_owner = NULL, refresh_lease_until = NULL, \
             refresh_in_flight_since = NULL WHERE id = $1 AND refresh_lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Persists refreshed tokens if the row is still at `expected_token_version` (compare and
    /// swap): bumps the version, clears the failure fields, and clears the lease if `owner`
    /// holds it. `tokens.refresh_token_enc: None` keeps the stored refresh token (the provider
    /// did not rotate it). `event` is written in the same transaction. False when the version
    /// moved on (someone else refreshed first) or the instance is gone.
    pub async fn commit_refreshed_tokens(
        &self,
        id: i64,
        owner: &str,
        expected_token_version: i64,
        tokens: &TokenUpdate,
        event: Option<&NewEvent>,
    ) -> Result<bool, StoreError> {
        self.commit_refreshed_tokens_recovering(
            id,
            owner,
            expected_token_version,
            tokens,
            event,
            None,
        )
        .await
    }

    /// [`Store::commit_refreshed_tokens`], and `recovered` (the `instance.recovered` event) in
    /// the same transaction when the row was failing (`failing_since` set) at the commit: the
    /// end of a failure streak is recorded exactly once, by whoever clears it.
    pub async fn commit_refreshed_tokens_recovering(
        &self,
        id: i64,
        owner: &str,
        expected_token_version: i64,
        tokens: &TokenUpdate,
        event: Option<&NewEvent>,
        recovered: Option<&NewEvent>,
    ) -> Result<bool, StoreError> {
        Ok(self
            .commit_refreshed_tokens_returning(
                id,
                owner,
                expected_token_version,
                tokens,
                event,
                recovered,
            )
            .await?
            .is_some())
    }

    /// [`Store::commit_refreshed_tokens_recovering`] answering the committed row (`None` when
    /// nothing was written), so the refresh needs no read after its write.
    pub async fn commit_refreshed_tokens_returning(
        &self,
        id: i64,
        owner: &str,
        expected_token_version: i64,
        tokens: &TokenUpdate,
        event: Option<&NewEvent>,
        recovered: Option<&NewEvent>,
    ) -> Result<Option<InstanceRow>, StoreError> {
        let commit = RefreshedCommit {
            id,
            owner,
            expected_token_version,
            tokens,
            event,
        };
        if recovered.is_none() {
            // The usual refresh: grouped with the commits waiting beside it (see the `commits`
            // module), or alone.
            if let Some(queue) = &self.commits {
                let (reply, answer) = tokio::sync::oneshot::channel();
                let pending = super::commits::PendingCommit {
                    id,
                    owner: owner.to_string(),
                    expected_token_version,
                    tokens: tokens.clone(),
                    event: event.cloned(),
                    reply,
                };
                if queue.send(pending) {
                    return answer.await.unwrap_or_else(|_| {
                        Err(StoreError::Database(
                            "the commit was dropped before an answer".to_string(),
                        ))
                    });
                }
            }
            return self.commit_refreshed_alone(commit).await;
        }
        self.commit_refreshed_in_transaction(commit, recovered)
            .await
    }

    /// One commit of refreshed tokens, not grouped: one statement on PostgreSQL, one
    /// transaction on SQLite.
    pub(super) async fn commit_refreshed_alone(
        &self,
        commit: RefreshedCommit<'_>,
    ) -> Result<Option<InstanceRow>, StoreError> {
        match self.engine {
            Engine::Postgres => self.commit_refreshed_single(commit).await,
            Engine::Sqlite => self.commit_refreshed_in_transaction(commit, None).await,
        }
    }

    /// A commit of refreshed tokens in a transaction of its own, with `recovered` when the row
    /// was failing.
    async fn commit_refreshed_in_transaction(
        &self,
        commit: RefreshedCommit<'_>,
        recovered: Option<&NewEvent>,
    ) -> Result<Option<InstanceRow>, StoreError> {
        let set = self.refreshed_set();
        let mut transaction = self.begin_write().await?;
        let was_failing = match recovered {
            None => false,
            Some(_) => {
                let lock = match self.engine {
                    Engine::Postgres => " FOR UPDATE",
                    Engine::Sqlite => "",
                };
                let failing: Option<Option<i64>> = sqlx::query_scalar(sqlx::AssertSqlSafe(
                    format!(
                        "SELECT failing_since FROM instances WHERE id = $1 AND token_version = $2{lock}"
                    ),
                ))
                .bind(commit.id)
                .bind(commit.expected_token_version)
                .fetch_optional(&mut *transaction)
                .await?;
                matches!(failing, Some(Some(_)))
            }
        };
        let sql =
            format!("UPDATE instances SET {set} RETURNING {INSTANCE_COLUMNS}, revived_reason");
        let query = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql));
        let committed = bind_refreshed(query, commit)
            .fetch_optional(&mut *transaction)
            .await?;
        let Some(committed) = committed else {
            return Ok(None);
        };
        if let Some(event) = commit.event {
            insert_event_in(&mut transaction, event).await?;
        }
        if was_failing && let Some(recovered) = recovered {
            insert_event_in(&mut transaction, recovered).await?;
        }
        transaction.commit().await?;
        Ok(Some(committed))
    }

    /// SQLite's grouped commit: the commits one after another in one transaction (one write of
    /// the log to disk for all of them), each with its own compare-and-swap and event.
    pub(super) async fn commit_refreshed_batch_sqlite(
        &self,
        batch: &[RefreshedCommit<'_>],
    ) -> Result<Vec<Option<InstanceRow>>, StoreError> {
        let mut transaction = self.begin_write().await?;
        let sql = format!(
            "UPDATE instances SET {} RETURNING {INSTANCE_COLUMNS}, revived_reason",
            self.refreshed_set()
        );
        let mut committed = Vec::with_capacity(batch.len());
        for &commit in batch {
            let query = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql.as_str()));
            let row = bind_refreshed(query, commit)
                .fetch_optional(&mut *transaction)
                .await?;
            if row.is_some()
                && let Some(event) = commit.event
            {
                insert_event_in(&mut transaction, event).await?;
            }
            committed.push(row);
        }
        transaction.commit().await?;
        Ok(committed)
    }

    /// A commit of refreshed tokens on PostgreSQL as one statement: the compare-and-swap and
    /// its event in one implicit transaction, one round trip (BEGIN, UPDATE, INSERT and COMMIT
    /// apart cost the database more than the rows; see bench/RESULTS.md).
    pub(super) async fn commit_refreshed_single(
        &self,
        commit: RefreshedCommit<'_>,
    ) -> Result<Option<InstanceRow>, StoreError> {
        let set = self.refreshed_set();
        let sql = match commit.event {
            Some(_) => format!(
                "WITH updated AS (UPDATE instances SET {set} RETURNING {INSTANCE_COLUMNS}, revived_reason), \
                 logged AS (INSERT INTO events (id, organization_id, instance_id, \
                 element_key, event_type, reason, occurred_at, payload, delivery_state, \
                 attempts, next_attempt_at) SELECT $13::text, $14::bigint, $15::bigint, \
                 $16::text, $17::text, $18::text, $19::bigint, $20::text, $21::text, 0, \
                 $22::bigint FROM updated) SELECT * FROM updated"
            ),
            None => {
                format!("UPDATE instances SET {set} RETURNING {INSTANCE_COLUMNS}, revived_reason")
            }
        };
        let query = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql));
        let mut query = bind_refreshed(query, commit);
        if let Some(event) = commit.event {
            query = bind_event!(query, event);
        }
        Ok(only_row(query.fetch_all(&self.pool).await?))
    }

    /// The grant is gone: state `invalid` with the reason and the provider's words, lease and
    /// schedule cleared; `event` (e.g. `instance.invalidated`) in the same transaction. With
    /// `expected_version`, only if the token version is still that one: a grant that moved on
    /// meanwhile (re-authenticated, or refreshed by another replica) is not invalidated by an
    /// answer about the old one. False when nothing was written.
    pub async fn mark_invalid(
        &self,
        id: i64,
        reason: &str,
        provider_message: Option<&str>,
        event: Option<&NewEvent>,
        expected_version: Option<i64>,
        retire_tokens: bool,
    ) -> Result<bool, StoreError> {
        let change = Invalidation {
            reason,
            provider_message,
            event,
            expected_version,
            retire_tokens,
        };
        self.invalidate(id, change, LeaseOnInvalidation::Ended)
            .await
    }

    /// [`Store::mark_invalid`] at `expected_version` unless another process holds the
    /// instance's lease now (a hold, a refresh): their work decides, and this returns false.
    /// A lease of `owner`'s is ended.
    pub async fn mark_invalid_unleased(
        &self,
        id: i64,
        owner: &str,
        reason: &str,
        provider_message: Option<&str>,
        event: Option<&NewEvent>,
        expected_version: i64,
    ) -> Result<bool, StoreError> {
        let change = Invalidation {
            reason,
            provider_message,
            event,
            expected_version: Some(expected_version),
            retire_tokens: false,
        };
        self.invalidate(id, change, LeaseOnInvalidation::UnlessOthers(owner))
            .await
    }

    /// [`Store::mark_invalid`] by the holder of the instance (a revocation): the lease, which
    /// is the hold's, stays until the hold ends, so that no re-authentication, import or other
    /// hold writes while the provider is asked.
    pub async fn mark_invalid_held(
        &self,
        id: i64,
        reason: &str,
        provider_message: Option<&str>,
        event: Option<&NewEvent>,
        expected_version: i64,
        retire_tokens: bool,
    ) -> Result<bool, StoreError> {
        let change = Invalidation {
            reason,
            provider_message,
            event,
            expected_version: Some(expected_version),
            retire_tokens,
        };
        self.invalidate(id, change, LeaseOnInvalidation::Kept).await
    }

    /// The one statement of the `mark_invalid*` functions: the instance invalid with its
    /// reason, no refresh due, at `expected_version` (any when `None`), its version moved when
    /// `retire_tokens` (a revocation: a refresh in flight cannot commit tokens of the revoked
    /// grant afterwards and make it valid again), its lease as `lease` says; the event in the
    /// same transaction.
    async fn invalidate(
        &self,
        id: i64,
        change: Invalidation<'_>,
        lease: LeaseOnInvalidation<'_>,
    ) -> Result<bool, StoreError> {
        let (lease_set, lease_condition) = match lease {
            LeaseOnInvalidation::Ended => (
                "refresh_lease_owner = NULL, refresh_lease_until = NULL, \
                 refresh_in_flight_since = NULL,",
                "",
            ),
            LeaseOnInvalidation::Kept => ("", ""),
            LeaseOnInvalidation::UnlessOthers(_) => (
                "refresh_lease_until = CASE WHEN refresh_lease_owner = $7 THEN NULL ELSE refresh_lease_until END, \
                 refresh_in_flight_since = CASE WHEN refresh_lease_owner = $7 THEN NULL ELSE refresh_in_flight_since END, \
                 refresh_lease_owner = CASE WHEN refresh_lease_owner = $7 THEN NULL ELSE refresh_lease_owner END,",
                " AND (refresh_lease_owner IS NULL OR refresh_lease_owner = $7 \
                 OR refresh_lease_until IS NULL OR refresh_lease_until < $3)",
            ),
        };
        let sql = format!(
            "UPDATE instances SET state = 'invalid', state_reason = $1, provider_message = $2, \
             {lease_set} next_due_at = NULL, \
             updated_at = CASE WHEN $3 > updated_at THEN $3 ELSE updated_at + 1 END, \
             token_version = token_version + $6 \
             WHERE id = $4 AND token_version = COALESCE($5, token_version){lease_condition}"
        );
        let mut transaction = self.begin_write().await?;
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(change.reason)
            .bind(change.provider_message)
            .bind(crate::app::now_ms())
            .bind(id)
            .bind(change.expected_version)
            .bind(i64::from(change.retire_tokens));
        if let LeaseOnInvalidation::UnlessOthers(owner) = lease {
            query = query.bind(owner);
        }
        let result = query.execute(&mut *transaction).await?;
        commit_with_event(transaction, result.rows_affected() == 1, change.event).await
    }

    /// A passing failure: the instance stays valid. Starts `failing_since` if not set, counts
    /// the failure, keeps `message`, sets `backoff_until` (and moves a scheduled `next_due_at`
    /// to at least it; an instance the scheduler had no refresh for, an `on_401` one whose
    /// refresh on a call failed, comes due then, so that the scheduler tries again until the
    /// refresh ends either way rather than the instance staying failing until its next call),
    /// and releases the lease if `owner` holds it. False when there is no such
    /// instance, or (with `expected_version`) when its token version moved on meanwhile, or
    /// (with `expected_updated_at`) when it was written since (a failure of the configuration
    /// as it was read, which a PATCH has changed since).
    #[allow(clippy::too_many_arguments)]
    pub async fn record_transient_failure(
        &self,
        id: i64,
        owner: &str,
        now: i64,
        message: &str,
        backoff_until: i64,
        event: Option<&NewEvent>,
        expected_version: Option<i64>,
        expected_updated_at: Option<i64>,
    ) -> Result<bool, StoreError> {
        let mut transaction = self.begin_write().await?;
        let result = sqlx::query(
            "UPDATE instances SET failing_since = COALESCE(failing_since, $1), \
             failure_count = failure_count + 1, last_failure = $2, backoff_until = $3, \
             next_due_at = CASE WHEN next_due_at IS NULL AND (state <> 'valid' OR disabled <> 0) \
             THEN NULL WHEN next_due_at IS NULL OR refresh_lease_owner = $4 THEN $3 \
             WHEN next_due_at < $3 THEN $3 ELSE next_due_at END, \
             refresh_lease_until = CASE WHEN refresh_lease_owner = $4 THEN NULL \
             ELSE refresh_lease_until END, \
             refresh_in_flight_since = CASE WHEN refresh_lease_owner = $4 THEN NULL \
             ELSE refresh_in_flight_since END, \
             refresh_lease_owner = CASE WHEN refresh_lease_owner = $4 THEN NULL \
             ELSE refresh_lease_owner END, \
             updated_at = CASE WHEN $5 > updated_at THEN $5 ELSE updated_at + 1 END WHERE id = $6 AND token_version = COALESCE($7, token_version) \
             AND updated_at = COALESCE($8, updated_at)",
        )
        .bind(now)
        .bind(message)
        .bind(backoff_until)
        .bind(owner)
        .bind(crate::app::now_ms())
        .bind(id)
        .bind(expected_version)
        .bind(expected_updated_at)
        .execute(&mut *transaction)
        .await?;
        commit_with_event(transaction, result.rows_affected() == 1, event).await
    }

    /// Stores the refresh token a refresh's unusable answer carried (see
    /// `OAuthError::Unparseable`): the provider may have retired the one presented for it.
    /// Its token version moves on, and its refresh is no longer in flight (its outcome is
    /// known); the rest stays, for the refresh that follows. At `expected_version`, like a
    /// refresh's commit, whoever holds the lease now (a replica that took the refresh over
    /// presents the retired token, and its invalidation at the old version is not written),
    /// on an instance a refresh may still commit to. False when nothing was written.
    pub async fn store_rotated_refresh_token(
        &self,
        id: i64,
        expected_version: i64,
        refresh_token_enc: &[u8],
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE instances SET refresh_token_enc = $1, token_version = token_version + 1, \
             refresh_in_flight_since = NULL, \
             updated_at = CASE WHEN $2 > updated_at THEN $2 ELSE updated_at + 1 END \
             WHERE id = $3 AND token_version = $4 \
             AND (state <> 'invalid' OR state_reason LIKE 'refresh interrupted%')",
        )
        .bind(refresh_token_enc)
        .bind(crate::app::now_ms())
        .bind(id)
        .bind(expected_version)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// The provider answers again: instances of the same connector (of `organization_id`, for
    /// an organization's own connector) waiting out a transient-failure backoff that ends
    /// within `horizon` become due now, instead of each waiting for its own next step. Reads
    /// the due index (`instances_due`), so only the rows due within the horizon are looked at.
    /// A wait the provider asked for (a 429's or a 503's `Retry-After`) stays: one call that
    /// got through does not lift a rate limit; so does one for a configuration at fault (an
    /// app's refused credentials), which others' recovery does not fix. Answers how many rows
    /// moved.
    pub async fn expedite_backoffs(
        &self,
        organization_id: Option<i64>,
        element_key: &str,
        now: i64,
        horizon: i64,
    ) -> Result<u64, StoreError> {
        let scope = match organization_id {
            Some(_) => " AND organization_id = $5",
            None => "",
        };
        let sql = format!(
            "UPDATE instances SET backoff_until = NULL, next_due_at = $1, updated_at = CASE WHEN $2 > updated_at THEN $2 ELSE updated_at + 1 END \
             WHERE state = 'valid' AND disabled = 0 AND next_due_at IS NOT NULL \
             AND next_due_at > $1 AND next_due_at <= $3 AND failing_since IS NOT NULL \
             AND refresh_lease_owner IS NULL AND element_key = $4{scope} \
             AND {}",
            backoff_of_our_making(false),
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(crate::app::now_ms())
            .bind(now + horizon)
            .bind(element_key);
        if let Some(organization_id) = organization_id {
            query = query.bind(organization_id);
        }
        Ok(query.execute(&self.pool).await?.rows_affected())
    }

    /// Ends an instance's backoff from transient failures or from a configuration at fault
    /// (`invalid_client`: the fix may have been made at the provider), for a refresh asked for
    /// now (`POST …/tokens/refresh`): not one the provider asked for (a 429 or a 503's
    /// `Retry-After`). False when there was none to end.
    pub async fn end_transient_backoff(&self, id: i64) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE instances SET backoff_until = NULL WHERE id = $1 AND backoff_until IS NOT NULL \
             AND {}",
            backoff_of_our_making(true),
        );
        let result = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Re-authentication: new tokens written as given, state `valid`, reasons, failures and
    /// lease cleared, version bumped; not while another holds the lease (with
    /// `lease_held_by`, the writer's own hold may), so that a revocation or refresh under way ends
    /// first and the re-authentication comes after it, not under it; id, Element token, name and tags stay. `event` (e.g.
    /// `instance.reauthenticated`) in the same transaction. Returns the new row, `None` when
    /// the instance is not this organization's.
    pub async fn reauthenticate(
        &self,
        organization_id: i64,
        id: i64,
        update: &Reauthentication,
        event: Option<&NewEvent>,
    ) -> Result<Option<InstanceRow>, StoreError> {
        let tokens = &update.tokens;
        let (replace_secret, secret) = match &update.client_secret_enc {
            None => (0_i64, None),
            Some(secret) => (1_i64, secret.clone()),
        };
        let mut transaction = self.begin_write().await?;
        let sql = format!(
            "UPDATE instances SET access_token_enc = $1, refresh_token_enc = $2, \
             token_response_enc = $3, access_expires_at = $4, refresh_expires_at = $5, \
             last_refresh_at = $6, next_due_at = $7, configuration = COALESCE($8, configuration), \
             client_secret_enc = CASE WHEN $9 = 1 THEN $10 ELSE client_secret_enc END, \
             verification = COALESCE($11, verification), \
             state = 'valid', state_reason = NULL, provider_message = NULL, \
             token_version = token_version + 1, \
             failing_since = NULL, failure_count = 0, backoff_until = NULL, last_failure = NULL, \
             refresh_lease_owner = CASE WHEN $15 = 1 THEN refresh_lease_owner ELSE NULL END, \
             refresh_lease_until = CASE WHEN $15 = 1 THEN refresh_lease_until ELSE NULL END, \
             refresh_in_flight_since = NULL, \
             updated_at = CASE WHEN $12 > updated_at THEN $12 ELSE updated_at + 1 END, \
             name = COALESCE($16, name), tags = COALESCE($17, tags) \
             WHERE id = $13 AND organization_id = $14 \
             AND updated_at = COALESCE($18, updated_at) \
             AND (refresh_lease_owner = $19 OR refresh_lease_owner IS NULL \
             OR refresh_lease_until < $12) \
             RETURNING {INSTANCE_COLUMNS}"
        );
        let row = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(&tokens.access_token_enc)
            .bind(&tokens.refresh_token_enc)
            .bind(&tokens.token_response_enc)
            .bind(tokens.access_expires_at)
            .bind(tokens.refresh_expires_at)
            .bind(tokens.last_refresh_at)
            .bind(tokens.next_due_at)
            .bind(&tokens.configuration_json)
            .bind(replace_secret)
            .bind(secret)
            .bind(&update.verification)
            .bind(crate::app::now_ms())
            .bind(id)
            .bind(organization_id)
            .bind(i64::from(update.lease_held_by.is_some()))
            .bind(&update.name)
            .bind(&update.tags_json)
            .bind(update.expected_updated_at)
            .bind(update.lease_held_by.as_deref().unwrap_or(""))
            .fetch_optional(&mut *transaction)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        if let Some(event) = event {
            insert_event_in(&mut transaction, event).await?;
        }
        if let Some(code) = &update.landed_code {
            super::code_landed_in(&mut transaction, code, id).await?;
        }
        transaction.commit().await?;
        Ok(Some(row))
    }

    /// Replaces the tokens as given (an import of existing tokens, or blanking them), bumping
    /// the version; state and failures are left as they are. Returns the new row, `None` when
    /// the instance is not this organization's.
    pub async fn replace_tokens(
        &self,
        organization_id: i64,
        id: i64,
        tokens: &TokenUpdate,
    ) -> Result<Option<InstanceRow>, StoreError> {
        let sql = format!(
            "UPDATE instances SET access_token_enc = $1, refresh_token_enc = $2, \
             token_response_enc = $3, access_expires_at = $4, refresh_expires_at = $5, \
             last_refresh_at = $6, next_due_at = $7, configuration = COALESCE($8, configuration), \
             token_version = token_version + 1, updated_at = CASE WHEN $9 > updated_at THEN $9 ELSE updated_at + 1 END \
             WHERE id = $10 AND organization_id = $11 RETURNING {INSTANCE_COLUMNS}"
        );
        let row = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(&tokens.access_token_enc)
            .bind(&tokens.refresh_token_enc)
            .bind(&tokens.token_response_enc)
            .bind(tokens.access_expires_at)
            .bind(tokens.refresh_expires_at)
            .bind(tokens.last_refresh_at)
            .bind(tokens.next_due_at)
            .bind(&tokens.configuration_json)
            .bind(crate::app::now_ms())
            .bind(id)
            .bind(organization_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(only_row(row))
    }

    /// Claims up to `limit` due instances for `owner`: valid, enabled, `next_due_at <= now`,
    /// lease free, backoff over. Each claimed row gets the lease until `lease_until` (and
    /// `next_due_at` moves there, so a crashed claimer's rows come due again). Concurrent
    /// claimers, in this process or other replicas, never get the same row: PostgreSQL locks
    /// the candidates with `FOR UPDATE SKIP LOCKED`; SQLite runs one writer at a time.
    pub async fn claim_due_instances(
        &self,
        now: i64,
        limit: i64,
        owner: &str,
        lease_until: i64,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        Ok(self
            .claim_due(now, limit, owner, lease_until)
            .await?
            .into_iter()
            .map(|(row, _)| row)
            .collect())
    }

    /// [`Store::claim_due_instances`], answering with each row the due time it had before the
    /// claim moved it to the lease end (the scheduler's lag is measured from it). Earliest due
    /// first. Both engines read the candidates from the partial index `instances_due` (see the
    /// query-plan test), so the cost grows with the due rows, not with the table.
    pub async fn claim_due(
        &self,
        now: i64,
        limit: i64,
        owner: &str,
        lease_until: i64,
    ) -> Result<Vec<(InstanceRow, i64)>, StoreError> {
        use sqlx::{FromRow, Row};
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let set = "refresh_lease_owner = $3, refresh_lease_until = $4, \
                   refresh_in_flight_since = COALESCE(refresh_in_flight_since, $1), \
                   next_due_at = $4";
        match self.engine {
            Engine::Postgres => {
                let sql = format!(
                    "WITH due AS (SELECT id, next_due_at AS claimed_due_at FROM instances \
                     WHERE {CLAIMABLE} ORDER BY next_due_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
                     UPDATE instances SET {set} FROM due WHERE instances.id = due.id \
                     RETURNING {}, due.claimed_due_at",
                    prefixed("instances", INSTANCE_COLUMNS)
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(now)
                    .bind(limit)
                    .bind(owner)
                    .bind(lease_until)
                    .fetch_all(&self.pool)
                    .await?;
                let mut claimed = Vec::with_capacity(rows.len());
                for row in rows {
                    let due: i64 = row.try_get("claimed_due_at")?;
                    claimed.push((InstanceRow::from_row(&row)?, due));
                }
                claimed.sort_by_key(|(_, due)| *due);
                Ok(claimed)
            }
            Engine::Sqlite => {
                // SQLite's RETURNING shows the new values only: read the due times first, in
                // the same write transaction (BEGIN IMMEDIATE: no other writer in between).
                let mut transaction = self.begin_write().await?;
                let candidates: Vec<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id, next_due_at FROM instances WHERE {CLAIMABLE} \
                     ORDER BY next_due_at LIMIT $2"
                )))
                .bind(now)
                .bind(limit)
                .fetch_all(&mut *transaction)
                .await?;
                let mut claimed = Vec::with_capacity(candidates.len());
                let sql = format!(
                    "UPDATE instances SET {set} WHERE id = $2 RETURNING {INSTANCE_COLUMNS}"
                );
                for (id, due) in candidates {
                    let row = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql.clone()))
                        .bind(now)
                        .bind(id)
                        .bind(owner)
                        .bind(lease_until)
                        .fetch_one(&mut *transaction)
                        .await?;
                    claimed.push((row, due));
                }
                transaction.commit().await?;
                Ok(claimed)
            }
        }
    }

    /// Gives back a claim the scheduler did not act on (shutdown, or the connector's rate limit
    /// is exhausted): lease cleared, due again at `due_at`. Only rows whose
    /// lease `owner` still holds as claimed (its end still `lease_until`: a flight of the same
    /// replica that took the claim over renewed it) and whose token version is still
    /// `token_version` are touched, so a refresh under way or committed meanwhile keeps its
    /// lease and schedule. The in-flight mark the claim made (at `claimed_at`) goes; an
    /// earlier one stays (an interrupted refresh: the next taker must know that the provider
    /// may have rotated the refresh token away). True when it released.
    pub async fn release_claim(
        &self,
        id: i64,
        owner: &str,
        lease_until: i64,
        token_version: i64,
        claimed_at: i64,
        due_at: i64,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE instances SET refresh_lease_owner = NULL, refresh_lease_until = NULL, \
             refresh_in_flight_since = CASE WHEN refresh_in_flight_since < $6 \
             THEN refresh_in_flight_since ELSE NULL END, next_due_at = $1 \
             WHERE id = $2 AND refresh_lease_owner = $3 AND refresh_lease_until = $4 \
             AND token_version = $5",
        )
        .bind(due_at)
        .bind(id)
        .bind(owner)
        .bind(lease_until)
        .bind(token_version)
        .bind(claimed_at)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// The earliest `next_due_at` of valid, enabled instances (from the index), for the
    /// scheduler's sleep. It may lie in the past while another refresher's lease runs or a
    /// backoff is pending: the scheduler bounds its sleep from below, so it never spins on it.
    pub async fn next_due_time(&self) -> Result<Option<i64>, StoreError> {
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(next_due_at) FROM instances \
             WHERE state = 'valid' AND disabled = 0 AND next_due_at IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(next)
    }

    /// Instances whose refresh started before `older_than` and never finished (crash
    /// recovery: their lease may still be running, their refresh token may have rotated).
    pub async fn instances_with_refresh_in_flight(
        &self,
        older_than: i64,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        let sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances \
             WHERE refresh_in_flight_since IS NOT NULL AND refresh_in_flight_since < $1 \
             ORDER BY refresh_in_flight_since"
        );
        let rows = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(older_than)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }

    /// Up to `limit` refreshes that were interrupted: in flight, and whose lease has run out at
    /// `now` (a crashed replica's). Valid and enabled ones only; from the `instances_in_flight`
    /// partial index. A refresh running under a live lease is not interrupted and not listed.
    pub async fn interrupted_refreshes(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        let sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances \
             WHERE refresh_in_flight_since IS NOT NULL AND refresh_in_flight_since < $1 \
             AND (refresh_lease_until IS NULL OR refresh_lease_until < $1) \
             AND state = 'valid' AND disabled = 0 \
             ORDER BY refresh_in_flight_since LIMIT $2"
        );
        let rows = sqlx::query_as::<_, InstanceRow>(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }

    /// The query plan of the scheduler's due query, one line per plan row, so that a test can
    /// check that it reads the partial index `instances_due` rather than the table.
    pub async fn explain_due_query(&self, now: i64, limit: i64) -> Result<String, StoreError> {
        use sqlx::Row;
        let select =
            format!("SELECT id FROM instances WHERE {CLAIMABLE} ORDER BY next_due_at LIMIT $2");
        let sql = match self.engine {
            Engine::Postgres => format!("EXPLAIN {select}"),
            Engine::Sqlite => format!("EXPLAIN QUERY PLAN {select}"),
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut lines = Vec::new();
        for row in rows {
            let line: String = match self.engine {
                Engine::Postgres => row.try_get(0)?,
                Engine::Sqlite => row.try_get("detail")?,
            };
            lines.push(line);
        }
        Ok(lines.join("\n"))
    }

    // ----- key rotation -------------------------------------------------------------------

    /// The encrypted columns of up to `limit` instances with ids above `after_id`, in id order.
    pub async fn list_encrypted_batch(
        &self,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<EncryptedInstanceFields>, StoreError> {
        let rows = sqlx::query_as::<_, EncryptedInstanceFields>(
            "SELECT id, organization_id, token_version, token_enc, access_token_enc, \
             refresh_token_enc, token_response_enc, client_secret_enc FROM instances \
             WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The encrypted columns of one instance (key rotation re-reads a row that changed).
    pub async fn get_encrypted_fields(
        &self,
        id: i64,
    ) -> Result<Option<EncryptedInstanceFields>, StoreError> {
        let row = sqlx::query_as::<_, EncryptedInstanceFields>(
            "SELECT id, organization_id, token_version, token_enc, access_token_enc, \
             refresh_token_enc, token_response_enc, client_secret_enc FROM instances WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// Key rotation: writes `new`'s re-encrypted columns only if every encrypted column still
    /// holds exactly `old`'s bytes (and the version is unchanged). Unlike
    /// [`Self::update_encrypted_fields`], this also loses to writes that do not move the token
    /// version, such as a configuration update re-sealing the client secret, so that no
    /// concurrent write is ever overwritten by an older value. False: read again and retry.
    pub async fn reseal_encrypted_fields(
        &self,
        old: &EncryptedInstanceFields,
        new: &EncryptedInstanceFields,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE instances SET token_enc = $1, access_token_enc = $2, refresh_token_enc = $3, \
             token_response_enc = $4, client_secret_enc = $5 \
             WHERE id = $6 AND token_version = $7 AND token_enc = $8 \
             AND (access_token_enc = $9 OR (access_token_enc IS NULL AND $9 IS NULL)) \
             AND (refresh_token_enc = $10 OR (refresh_token_enc IS NULL AND $10 IS NULL)) \
             AND (token_response_enc = $11 OR (token_response_enc IS NULL AND $11 IS NULL)) \
             AND (client_secret_enc = $12 OR (client_secret_enc IS NULL AND $12 IS NULL))",
        )
        .bind(&new.token_enc)
        .bind(&new.access_token_enc)
        .bind(&new.refresh_token_enc)
        .bind(&new.token_response_enc)
        .bind(&new.client_secret_enc)
        .bind(old.id)
        .bind(old.token_version)
        .bind(&old.token_enc)
        .bind(&old.access_token_enc)
        .bind(&old.refresh_token_enc)
        .bind(&old.token_response_enc)
        .bind(&old.client_secret_enc)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Writes re-encrypted columns back if the row is still at `fields.token_version` (a
    /// refresh committed in between makes this false: read the row again and retry). The
    /// version does not change: the plain values are the same.
    pub async fn update_encrypted_fields(
        &self,
        fields: &EncryptedInstanceFields,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE instances SET token_enc = $1, access_token_enc = $2, refresh_token_enc = $3, \
             token_response_enc = $4, client_secret_enc = $5 \
             WHERE id = $6 AND token_version = $7",
        )
        .bind(&fields.token_enc)
        .bind(&fields.access_token_enc)
        .bind(&fields.refresh_token_enc)
        .bind(&fields.token_response_enc)
        .bind(&fields.client_secret_enc)
        .bind(fields.id)
        .bind(fields.token_version)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }
}

/// The one row of a write's `RETURNING`, read with `fetch_all`: a write outside a transaction
/// is read to its end, where SQLite commits it and says when it could not (a full disk);
/// `fetch_optional` stops at the first row and drops that error, and the caller took a change
/// that was never stored for made.
pub(super) fn only_row<T>(rows: Vec<T>) -> Option<T> {
    rows.into_iter().next()
}

/// Ends a one-row state change: when it touched its row, writes `event` (the outbox) in the
/// same transaction and commits; otherwise the transaction is dropped (rolled back). True when
/// the row was touched.
async fn commit_with_event(
    mut transaction: sqlx::Transaction<'static, sqlx::Any>,
    touched: bool,
    event: Option<&NewEvent>,
) -> Result<bool, StoreError> {
    if !touched {
        return Ok(false);
    }
    if let Some(event) = event {
        insert_event_in(&mut transaction, event).await?;
    }
    transaction.commit().await?;
    Ok(true)
}
