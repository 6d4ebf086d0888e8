//! The refresh engine: the one path by which an access token is renewed, whoever asks (a
//! proxied call that was rejected, a token close to expiry, the scheduler, `tokens/refresh`).
//!
//! - **Single flight.** In one process, concurrent refreshes of one instance queue on a
//!   per-instance async mutex; across replicas, the one holding the row's lease
//!   (`refresh_lease_owner/until`, taken by one short `UPDATE … RETURNING`) refreshes and the
//!   others poll the row until its token version moves. Whoever gets its turn first re-reads the
//!   row: if the version already moved, that token is used and nothing is refreshed again.
//! - **Persist before use.** The new token set is committed (compare-and-swap on the token
//!   version, the outbox event in the same transaction) before any caller sees it.
//! - **Failures told apart.** A permanent OAuth error (`invalid_grant` and kin) turns the instance
//!   invalid with the provider's words; anything else (5xx, 429, timeouts, unparseable bodies) is
//!   transient: the instance stays valid and backs off, one attempt per backoff step.
//! - **No lock and no database connection is held across a provider call.**
//! - **Crash safety.** The lease marks the refresh in flight before the provider is called. An
//!   instance whose previous refresh was interrupted retries with what it has; if the provider has
//!   rotated the token away meanwhile, the instance turns invalid with reason
//!   "refresh interrupted", and an event fires.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use dashmap::DashMap;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};

use crate::app::{App, SharedApp, now_ms};
use crate::catalog::Connector;
use crate::events;
use crate::http::error::ApiError;
use crate::instances::{
    BASE_URL, apply_token_set, client_credentials, open_secrets, plain_configuration,
};
use crate::oauth::{OAuthError, TokenHint};
use crate::secret::Secret;
use crate::store::InstanceRow;

/// How long a refresh lease lasts without renewal. The holder renews it every
/// [`LEASE_RENEW_MS`] while its provider call runs (a heartbeat, one short `UPDATE` each), so a
/// live refresh keeps it however slow the provider is, and a dead replica's lease runs out within
/// this time: then another replica (or the restarted one) finishes the refresh.
pub const LEASE_MS: i64 = 10_000;
/// How often the lease holder renews its lease during the provider call.
const LEASE_RENEW_MS: u64 = 3_000;
/// How long the commit of rotated tokens is tried again while the store fails (a database
/// failing over takes tens of seconds; the provider has retired the old refresh token
/// already), its callers waiting. With the provider timeout, within what shutdown waits for a
/// refresh.
pub const COMMIT_RETRY_FOR: Duration = Duration::from_secs(30);
/// How long rotated tokens whose store stays down past [`COMMIT_RETRY_FOR`] are kept in memory,
/// their commit tried again every [`PARKED_RETRY_EVERY`] (see [`RefreshEngine::commit_parked`]):
/// lost, they would end the grant at a strict provider.
pub const ROTATED_TOKENS_KEPT_FOR: Duration = Duration::from_secs(15 * 60);
const PARKED_RETRY_EVERY: Duration = Duration::from_secs(1);

/// Rotated tokens the store did not take (it was down past [`COMMIT_RETRY_FOR`]): the commit
/// as the refresh made it, sealed (no token in the clear), kept until the store takes it.
#[derive(Clone)]
struct ParkedCommit {
    version: i64,
    update: crate::store::TokenUpdate,
    /// `instance.token.refreshed`; none for a new import's first refresh (see [`Purpose`]).
    event: Option<crate::store::NewEvent>,
    recovered: Option<crate::store::NewEvent>,
    parked_at: Instant,
}
/// The first pause between commit attempts, doubling up to [`COMMIT_RETRY_MAX_MS`].
const COMMIT_RETRY_MS: u64 = 125;
const COMMIT_RETRY_MAX_MS: u64 = 2_000;
/// How long an in-memory copy of an instance is trusted before it is re-read (other replicas may
/// have disabled, deleted or refreshed it). While it is trusted, a proxied call makes no query.
/// A copy is never served older than this, re-read or not (its token may not say when it
/// expires, as Salesforce's do not).
const SERVE_STALE_AT_MOST: Duration = Duration::from_secs(60);
const REVALIDATE_AFTER: Duration = Duration::from_secs(5);
/// A copy this old (an instance idle meanwhile: under traffic it is re-read every
/// [`REVALIDATE_AFTER`]) is re-read before it serves: served first, a disable, deletion or
/// re-authentication made through another replica up to a minute before was ignored by the
/// first call. Only a database that does not answer within [`REREAD_WAIT`] lets it serve, up to
/// [`SERVE_STALE_AT_MOST`].
const REREAD_FIRST_AFTER: Duration = Duration::from_secs(10);
const REREAD_WAIT: Duration = Duration::from_secs(2);
/// After a re-read the store did not answer, a copy serves this long (ms) before another is
/// tried: every call would wait [`REREAD_WAIT`] otherwise, for the whole outage.
const STORE_DOWN_PAUSE_MS: i64 = 5_000;
/// The first step of the transient-failure backoff, and the largest.
const BACKOFF_BASE_MS: i64 = 2_000;
const BACKOFF_MAX_MS: i64 = 300_000;
/// The longest a provider's `Retry-After` holds an instance's refreshes back: an hour. While it
/// does, a call whose token has expired answers 503, so a provider that asks for a day (or a
/// date a year ahead) must not take an instance out of service for that long.
pub const RETRY_AFTER_MAX_S: u64 = 3_600;
/// Renews this replica's lease on instance `id` once it is [`LEASE_RENEW_MS`] old, for as long
/// as it is polled (one short UPDATE each time, no connection held in between); never ends.
/// `lease_until`: the end of the lease as taken, so that one taken a while ago (a claim that
/// waited for its turn) is renewed at once rather than [`LEASE_RENEW_MS`] later, when it may
/// have run out and another replica taken it. A failed renewal is tried again within half a
/// second. A lease taken over by another replica is no longer renewed.
async fn lease_heartbeat(app: &App, id: i64, lease_until: Option<i64>) {
    let mut until = lease_until.unwrap_or_else(|| now_ms() + LEASE_MS);
    loop {
        let renew_at = until - LEASE_MS + LEASE_RENEW_MS as i64;
        let wait = renew_at - now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        match app
            .store
            .renew_refresh_lease(id, &app.replica_id, now_ms() + LEASE_MS)
            .await
        {
            Ok(Some(row)) => {
                until = row
                    .refresh_lease_until
                    .unwrap_or_else(|| now_ms() + LEASE_MS);
            }
            Ok(None) => {
                tracing::warn!(
                    instance = id,
                    "the refresh lease was taken over while this replica still worked on the instance"
                );
                std::future::pending::<()>().await;
            }
            Err(error) => {
                tracing::warn!(instance = id, "lease renewal failed: {error}");
                until = now_ms() + 500 + LEASE_MS - LEASE_RENEW_MS as i64;
            }
        }
    }
}

/// How the last failure of an instance whose configuration is at fault begins (the store's
/// recovery does not cut its backoff short: the provider answering others does not fix it).
pub const MISCONFIGURED_TEXT: &str = "the instance cannot be refreshed as it is configured";

/// How a refusal of the app's credentials (`invalid_client`) begins, after
/// [`MISCONFIGURED_TEXT`]: a fix at the provider can end it, unlike a connector gone.
pub const CLIENT_REFUSED_TEXT: &str = "the provider refused the app's credentials";
/// [`RefreshFailure::Misconfigured`]'s detail when the provider refused the refresh request
/// itself (`invalid_request`, …).
pub const REQUEST_REFUSED_TEXT: &str = "the provider refused the refresh request";

/// How long [`RefreshEngine::with_instance_held`] waits for a running refresh: a lease's life
/// and a little more, so a dead replica's lease runs out within it.
pub const HOLD_WAIT: Duration = Duration::from_millis(LEASE_MS as u64 + 5_000);
/// At most this often per connector are backed-off instances made due after a recovery.
const EXPEDITE_EVERY_MS: i64 = 10_000;

/// What the proxy needs of an instance, decrypted, kept in memory.
pub struct CachedInstance {
    pub id: i64,
    pub organization_id: i64,
    pub connector: Arc<Connector>,
    /// `base.url`, parsed once for every call that uses this copy (or why it cannot be used).
    pub proxy_base: Result<crate::proxy::ProxyBase, String>,
    pub access_token: Option<Secret>,
    /// Whether the instance holds a refresh token: without one, only a rejection of the
    /// access token is worth a refresh (which then ends the instance).
    pub has_refresh_token: bool,
    /// The header that carries the access token and its value (`Authorization: Bearer <access
    /// token>` unless the connector says otherwise), built once (none when the token cannot be
    /// a header value).
    pub bearer: Option<(axum::http::HeaderName, axum::http::HeaderValue)>,
    pub token_version: i64,
    pub access_expires_at: Option<i64>,
    pub last_refresh_at: Option<i64>,
    pub valid: bool,
    pub disabled: bool,
    pub state_reason: Option<String>,
    pub provider_message: Option<String>,
    pub backoff_until: Option<i64>,
    pub last_failure: Option<String>,
    /// When this process got this copy's token from the provider (its refresh's commit):
    /// unset for a token read from the store (another replica's refresh, an earlier one).
    pub fetched_at: std::sync::OnceLock<Instant>,
    loaded_at: Instant,
    /// A re-read is under way (one at a time per copy).
    revalidating: AtomicBool,
    /// Until when (ms) the copy serves without a re-read: the store did not answer the last.
    store_down_until: AtomicI64,
    /// Woken when a re-read of this copy ends.
    reread_done: Notify,
    /// When a call last used this copy (ms), for eviction of idle copies.
    last_used: AtomicI64,
    /// The provider refused this copy's access token.
    rejected: AtomicBool,
}

impl CachedInstance {
    /// The store did not answer a re-read of this copy at `wall`: it serves without one for a
    /// while, and the next re-read may start then.
    fn store_unanswered(&self, wall: i64) {
        self.store_down_until
            .store(wall + STORE_DOWN_PAUSE_MS, Ordering::Relaxed);
    }

    /// Whether `before_expiry` wants a refresh before the next call.
    /// Never before half the token's lifetime has passed, as the schedule (`next_due_at`), so
    /// a token that lives less than the buffer does not make every call refresh.
    pub fn expires_soon(&self, now: i64) -> bool {
        match self.access_expires_at {
            Some(expires) => {
                let buffered = expires - (self.connector.refresh.buffer_seconds as i64) * 1000;
                let half_life = self
                    .last_refresh_at
                    .map(|refreshed| refreshed + (expires - refreshed) / 2)
                    .unwrap_or(buffered);
                buffered.max(half_life) <= now
            }
            None => false,
        }
    }

    /// The provider refused this token: calls about to send it refresh (or join the refresh
    /// under way) first.
    pub fn mark_rejected(&self) {
        self.rejected.store(true, Ordering::Relaxed);
    }

    pub fn rejected(&self) -> bool {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Whether the last refresh attempt failed and the next is not due yet.
    pub fn backing_off(&self, now: i64) -> bool {
        self.backoff_until.is_some_and(|until| until > now)
    }

    pub fn expired(&self, now: i64) -> bool {
        self.access_expires_at.is_some_and(|expires| expires <= now)
    }
}

#[derive(Debug)]
pub enum RefreshFailure {
    /// The grant is gone: the instance is invalid until re-authenticated.
    Invalid {
        reason: String,
        provider_message: Option<String>,
        /// The token version the instance was invalidated at (to make follow-up writes
        /// conditional on it).
        version: Option<i64>,
    },
    /// The provider could not refresh now; the instance stays valid.
    Transient {
        message: String,
        provider_message: Option<String>,
        retry_after_ms: Option<i64>,
    },
    Disabled,
    NotFound,
    /// The instance's connector no longer gives it a token endpoint (the connector is gone, or
    /// it was changed so that it needs an input the instance lacks): a refresh cannot be made
    /// until the configuration is fixed. The instance stays valid; the detail names what is
    /// missing and holds no secret.
    Misconfigured(String),
    /// The service's own database does not answer (see `StoreError::Unavailable`): 503.
    StoreUnavailable(String),
    Internal(String),
    /// The first refresh of an instance just created from imported tokens
    /// ([`RefreshEngine::refresh_new_import`]): the provider refuses the refresh token
    /// (`invalid_grant` and kin), and the instance was removed again, with its held-back
    /// `instance.created` and the claim of its tokens: the create answers 400 in the provider's
    /// words, as one that created nothing.
    ImportRefused {
        provider_message: String,
    },
}

impl RefreshFailure {
    /// A store error as a failure: one of a database that does not answer is passing.
    fn from_store(error: crate::store::StoreError) -> Self {
        match error {
            crate::store::StoreError::Unavailable(why) => RefreshFailure::StoreUnavailable(why),
            other => RefreshFailure::Internal(other.to_string()),
        }
    }

    pub fn into_api_error(self) -> ApiError {
        match self {
            RefreshFailure::Invalid {
                reason,
                provider_message,
                ..
            } => ApiError::new(StatusCode::UNAUTHORIZED, "Request failed")
                .with_provider_message(provider_message.unwrap_or(reason)),
            RefreshFailure::Transient {
                message,
                provider_message,
                retry_after_ms,
            } => {
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "The provider could not refresh the token just now ({message}); the instance stays valid, try again later"
                    ),
                );
                error.provider_message = provider_message;
                error.retry_after = retry_after_ms.map(|ms| ((ms + 999) / 1000).max(1) as u64);
                error
            }
            RefreshFailure::Disabled => ApiError::new(
                StatusCode::CONFLICT,
                "The instance is disabled: it makes no provider calls until enabled",
            ),
            RefreshFailure::NotFound => ApiError::not_found("There is no such instance"),
            RefreshFailure::StoreUnavailable(why) => {
                ApiError::from(crate::store::StoreError::Unavailable(why))
            }
            RefreshFailure::Misconfigured(detail) => ApiError::conflict(format!(
                "The instance cannot be refreshed as it is configured ({detail}); the instance stays valid: fix its configuration with PATCH or re-create it"
            )),
            RefreshFailure::Internal(detail) => ApiError::internal(detail),
            RefreshFailure::ImportRefused { provider_message } => ApiError::bad_request(
                "The provider refuses the imported refresh token: nothing was created; re-authenticate the user and import the new tokens, or create the instance from a code",
            )
            .with_provider_message(provider_message),
        }
    }
}

/// What a refresh is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// An instance that exists for its callers: its refresh writes `instance.token.refreshed`,
    /// and a refusal invalidates it (`instance.invalidated`).
    Instance,
    /// The refresh a create of imported tokens makes before it answers, on the row its insert
    /// wrote (lease held, `instance.created` held back from delivery): the caller has been
    /// told of no instance yet. Refreshed, the create's `instance.created` stands for the new
    /// tokens (no `instance.token.refreshed`); refused, the row is removed
    /// ([`RefreshFailure::ImportRefused`]), so that no webhook ever tells of an instance the
    /// create answered 400 for.
    NewImport,
}

/// Whether a freshly read instance goes into the in-memory copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Always,
    IfPresent,
}

#[derive(Default)]
pub struct RefreshEngine {
    flights: DashMap<i64, Arc<Mutex<()>>>,
    cache: DashMap<i64, Arc<CachedInstance>, crate::proxy::PrehashedKeys>,
    schedule_changed: Notify,
    /// Instance reads a caller waited for (`get` missing its copy, refresh turns): the hot
    /// path's database work, which stays flat while cached tokens are fresh.
    awaited_reads: AtomicU64,
    /// Moves whenever this process starts a refresh that is not the scheduler's, or drops a
    /// copy after a change: a scheduler claim taken before it may be stale (see [`Claimed`]).
    epoch: AtomicU64,
    /// When backed-off instances were last made due, per connector (and organization, for an
    /// organization's own connector).
    expedited: DashMap<(Option<i64>, String), i64>,
    /// Work under way that shutdown waits for ([`spawn_to_the_end`]): refreshes and revocations.
    running: AtomicUsize,
    done: Notify,
    /// When a refresh asked for now last went through an instance's backoff, per instance.
    forced: DashMap<i64, Instant>,
    /// Tokens the provider's API rejected right after a refresh made for an earlier rejection,
    /// per instance: the token's version and when (see [`FRESH_REJECTION_HOLDS`]).
    fresh_rejections: DashMap<i64, (i64, Instant)>,
    /// Rotated tokens waiting for the store, per instance (see [`ParkedCommit`]).
    parked: DashMap<i64, ParkedCommit>,
    /// Rotated tokens whose write the store refused at least once and is being tried again
    /// while their callers wait ([`retry_while_store_fails`]): not parked yet, and as lost
    /// with a restart.
    retrying: AtomicUsize,
    /// The app this engine serves, for the tasks that store parked commits.
    app: std::sync::OnceLock<std::sync::Weak<App>>,
    /// Revocations of superseded grants waiting out their delay ([`revoke_superseded_grant`]),
    /// and the stop that has them sent at once.
    superseded_pending: AtomicUsize,
    superseded_done: Notify,
    /// Per instance, the wait of its latest superseded grant: a newer re-authentication has
    /// the older grant revoked at once (rapid re-authentications kept several alive for their
    /// minute, and Salesforce's cap ended the user's other instance).
    superseded_waits: DashMap<i64, Arc<Notify>>,
    stopping: std::sync::atomic::AtomicBool,
    stop: Notify,
    /// When this process last found the database not answering (ms; 0: never), and when it
    /// first found it answering after that. See [`OUTAGE_TAKEOVER_GRACE_MS`].
    store_unavailable_at: std::sync::atomic::AtomicI64,
    store_back_at: std::sync::atomic::AtomicI64,
}

/// While the database does not answer, and this long after this process finds it answering
/// again, refreshes another replica began (in flight, their lease run out) are left
/// unfinished, on PostgreSQL, for as long as that replica may hold their tokens (its commit's
/// retries and `rotated_tokens_kept_for`: a database failing again and again does not leave
/// them for ever). After an outage
/// longer than a lease, the replica whose refresh was cut holds the rotated tokens in memory
/// and stores them within seconds of the database's return ([`ParkedCommit`]); a replica that
/// took the refresh over meanwhile presented the retired refresh token, and a strict provider
/// ended the grant (a tester's 45 s outage lost 12 instances of 40). A replica that crashed
/// holds nothing, and its refreshes are finished after the grace. Only a replica that found
/// the database not answering leaves them: one that made no call to it during a short outage
/// (idle, or started after it) takes them over at once.
pub const OUTAGE_TAKEOVER_GRACE_MS: i64 = 30_000;

/// How long the API's rejections of a token that a refresh has just replaced pass through
/// without another refresh. A brand-new token rejected too is not an expired one: the API
/// refuses the user (a licence or permission withdrawn, an account locked, a wrong base URL),
/// and a refresh per call would only load the token endpoint (its rate limit), rotate
/// refresh tokens for nothing and hold every call for a round trip. After this, a rejection
/// refreshes again (a grant revoked meanwhile is found then).
pub const FRESH_REJECTION_HOLDS: Duration = Duration::from_secs(60);

/// A refresh asked for now goes through an instance's backoff at most this often: a client
/// retrying `…/tokens/refresh` on every 503 would otherwise send each retry to a failing
/// provider.
const FORCE_AT_MOST_EVERY: Duration = Duration::from_secs(5);

/// Runs `work` as a task of its own that shutdown waits for (up to a bound, see
/// [`RefreshEngine::wait_until_done`]): a refresh between the provider's answer and its commit,
/// or a revocation before the instance is marked, must not be cut by a caller hanging up nor
/// by a rolling restart (a rotated refresh token would be lost).
pub fn spawn_to_the_end<F>(
    app: &crate::app::SharedApp,
    work: F,
) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    app.refresh.running.fetch_add(1, Ordering::AcqRel);
    let guard = RunningGuard(Arc::clone(app));
    tokio::spawn(async move {
        let _guard = guard;
        work.await
    })
}

struct RunningGuard(crate::app::SharedApp);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if self.0.refresh.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.refresh.done.notify_waiters();
        }
    }
}

/// A row the scheduler claimed (its lease held by this replica), and the engine's epoch read
/// before the claim. While the lease is young and the epoch has not moved, nothing in this
/// process has refreshed or changed the instance since, and no other replica may (the lease
/// is ours): the claimed row is current and the refresh starts without another write.
pub struct Claimed {
    pub row: InstanceRow,
    pub epoch: u64,
}

impl RefreshEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// The instances whose rotated tokens wait for the store (see [`ParkedCommit`]).
    pub fn kept_instances(&self) -> Vec<i64> {
        self.parked.iter().map(|entry| *entry.key()).collect()
    }

    /// Rotated tokens held in memory for the store: parked, or still tried while their
    /// callers wait (a restart loses both).
    pub fn kept_count(&self) -> usize {
        self.parked.len() + self.retrying.load(Ordering::Relaxed)
    }

    /// Called once the app is built (see [`ParkedCommit`]).
    pub fn know_app(&self, app: &SharedApp) {
        let _ = self.app.set(Arc::downgrade(app));
    }

    /// Revokes `refresh_token`, to which a refresh of instance `id` rotated after the instance
    /// was revoked (the refresh outlived its lease), at once, in a task of its own.
    fn revoke_orphaned_grant(
        &self,
        connector: Arc<Connector>,
        id: i64,
        configuration: serde_json::Map<String, Value>,
        secret_configuration: std::collections::BTreeMap<String, String>,
        refresh_token: Secret,
    ) {
        let Some(app) = self.app.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let origin = GrantOrigin {
            connector,
            configuration,
            secret_configuration,
        };
        spawn_grant_revocation(
            app,
            id,
            origin,
            refresh_token,
            "the grant a refresh rotated to as the instance was revoked",
        );
    }

    /// Keeps rotated tokens the store did not take, and tries their commit again every
    /// [`PARKED_RETRY_EVERY`] for [`AppConfig::rotated_tokens_kept_for`](crate::app::AppConfig).
    fn park(&self, id: i64, parked: ParkedCommit) {
        self.parked.insert(id, parked);
        let Some(weak) = self.app.get().cloned() else {
            return;
        };
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PARKED_RETRY_EVERY).await;
                let Some(app) = weak.upgrade() else { return };
                // In the instance's flight, as a refresh would commit them: not beside one.
                let committed = app
                    .refresh
                    .in_flight(id, app.refresh.commit_parked(&app, id))
                    .await;
                match committed {
                    Ok(_) => return,
                    // Not a store that is down: it would refuse them again.
                    Err(failure) if !matches!(failure, RefreshFailure::StoreUnavailable(_)) => {
                        app.refresh.parked.remove(&id);
                        tracing::error!(
                            instance = id,
                            "rotated tokens kept for the store were refused by it and are dropped; the provider may have retired the stored refresh token: {failure:?}"
                        );
                        return;
                    }
                    Err(failure) => {
                        let Some(parked_at) = app.refresh.parked.get(&id).map(|p| p.parked_at)
                        else {
                            return;
                        };
                        if parked_at.elapsed() >= app.config.rotated_tokens_kept_for {
                            app.refresh.parked.remove(&id);
                            tracing::error!(
                                instance = id,
                                "rotated tokens kept for {} s were never taken by the store and are dropped; the provider may have retired the stored refresh token: {failure:?}",
                                parked_at.elapsed().as_secs()
                            );
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Stores the rotated tokens kept for instance `id` (see [`ParkedCommit`]), if any: the
    /// row as it is then (`None` when none were kept). Nothing refreshes or holds an instance
    /// before its kept tokens are stored: the stored refresh token is the one the provider
    /// retired. A row that moved on meanwhile (revoked, re-authenticated) keeps what it has.
    async fn commit_parked(
        &self,
        app: &App,
        id: i64,
    ) -> Result<Option<InstanceRow>, RefreshFailure> {
        let Some(parked) = self.parked.get(&id).map(|p| p.clone()) else {
            return Ok(None);
        };
        let committed = app
            .store
            .commit_refreshed_tokens_returning(
                id,
                &app.replica_id,
                parked.version,
                &parked.update,
                parked.event.as_ref(),
                parked.recovered.as_ref(),
            )
            .await
            .map_err(RefreshFailure::from_store)?;
        self.parked.remove(&id);
        self.forget(id);
        let row = match committed {
            Some(row) if row.revived_reason.is_some() => {
                tracing::info!(
                    instance = id,
                    "rotated tokens kept while the store was down are stored, and made the instance valid again"
                );
                match self
                    .settle_revival(app, &row, parked.recovered.is_some())
                    .await
                {
                    Revival::Stands => row,
                    // Read again: invalid once more, or moved on.
                    Revival::Refused(_) | Revival::MovedOn => app
                        .store
                        .get_instance_by_id(id)
                        .await
                        .map_err(RefreshFailure::from_store)?
                        .ok_or(RefreshFailure::NotFound)?,
                }
            }
            Some(row) => {
                tracing::info!(
                    instance = id,
                    "rotated tokens kept while the store was down are stored"
                );
                row
            }
            None => {
                tracing::warn!(
                    instance = id,
                    "rotated tokens kept while the store was down were not stored: the instance moved on meanwhile"
                );
                app.store
                    .get_instance_by_id(id)
                    .await
                    .map_err(RefreshFailure::from_store)?
                    .ok_or(RefreshFailure::NotFound)?
            }
        };
        Ok(Some(row))
    }

    /// The API rejected version `version` of instance `id`'s token, which a refresh made for
    /// a rejection had just given: see [`FRESH_REJECTION_HOLDS`].
    pub fn fresh_token_rejected(&self, id: i64, version: i64) {
        let now = Instant::now();
        if self.fresh_rejections.len() > 10_000 {
            self.fresh_rejections
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < FRESH_REJECTION_HOLDS);
        }
        self.fresh_rejections.insert(id, (version, now));
    }

    /// Whether a rejection of version `version` of instance `id`'s token passes through
    /// without a refresh (see [`FRESH_REJECTION_HOLDS`]). One map lookup: rejections only.
    pub fn holds_rejections(&self, id: i64, version: i64, now: Instant) -> bool {
        self.fresh_rejections.get(&id).is_some_and(|held| {
            let (held_version, at) = *held;
            held_version == version && now.saturating_duration_since(at) < FRESH_REJECTION_HOLDS
        })
    }

    /// Whether a refresh asked for now may go through instance `id`'s backoff (see
    /// [`FORCE_AT_MOST_EVERY`]); counts it when it may.
    pub fn may_force(&self, id: i64) -> bool {
        let now = Instant::now();
        if self.forced.len() > 10_000 {
            self.forced
                .retain(|_, at| now.saturating_duration_since(*at) < FORCE_AT_MOST_EVERY);
        }
        let mut allowed = false;
        self.forced
            .entry(id)
            .and_modify(|at| {
                if now.saturating_duration_since(*at) >= FORCE_AT_MOST_EVERY {
                    *at = now;
                    allowed = true;
                }
            })
            .or_insert_with(|| {
                allowed = true;
                now
            });
        allowed
    }

    /// Waits until no work started by [`spawn_to_the_end`] runs, for at most `limit`; false
    /// when some still runs then.
    pub async fn wait_until_done(&self, limit: Duration) -> bool {
        until_zero(&self.running, &self.done, limit).await
    }

    /// Waits, at most `limit`, until no rotated tokens are kept for the store (their retries
    /// run meanwhile); whether none are.
    pub async fn wait_for_kept(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.kept_count() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }

    /// A stop begins: the revocations of superseded grants still waiting are sent at once.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_waiters();
    }

    /// Waits, at most `limit`, for the revocations of superseded grants under way; whether
    /// none is left.
    pub async fn wait_for_superseded(&self, limit: Duration) -> bool {
        until_zero(&self.superseded_pending, &self.superseded_done, limit).await
    }

    /// Drops the in-memory copy (after a change made through the API).
    pub fn forget(&self, id: i64) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.cache.remove(&id);
    }

    /// Notes that the database did not answer (a passing failure of the store) just now.
    pub fn note_store_unavailable(&self) {
        self.store_unavailable_at.store(now_ms(), Ordering::Relaxed);
    }

    /// Notes `error` when it is the database not answering.
    pub fn note_store_error(&self, error: &crate::store::StoreError) {
        if matches!(error, crate::store::StoreError::Unavailable(_)) {
            self.note_store_unavailable();
        }
    }

    /// Notes that the database answered just now: the first answer after it did not starts
    /// the grace of [`OUTAGE_TAKEOVER_GRACE_MS`].
    pub fn note_store_answered(&self) {
        let down = self.store_unavailable_at.load(Ordering::Relaxed);
        if down > self.store_back_at.load(Ordering::Relaxed) {
            self.store_back_at
                .store(now_ms().max(down + 1), Ordering::Relaxed);
        }
    }

    /// Whether the database is down, or came back less than [`OUTAGE_TAKEOVER_GRACE_MS`] ago,
    /// as this process found it; how long the grace has yet to run when it is.
    pub fn store_outage_grace(&self, now: i64) -> Option<i64> {
        let down = self.store_unavailable_at.load(Ordering::Relaxed);
        if down == 0 {
            return None;
        }
        let back = self.store_back_at.load(Ordering::Relaxed);
        if back <= down {
            return Some(OUTAGE_TAKEOVER_GRACE_MS);
        }
        let left = OUTAGE_TAKEOVER_GRACE_MS - now.saturating_sub(back);
        (left > 0).then_some(left)
    }

    /// See [`Claimed`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn notify_schedule_changed(&self) {
        self.schedule_changed.notify_one();
    }

    pub async fn schedule_changed(&self) {
        self.schedule_changed.notified().await;
    }

    /// How many instance reads callers have waited for since start (see `awaited_reads`).
    pub fn awaited_reads(&self) -> u64 {
        self.awaited_reads.load(Ordering::Relaxed)
    }

    /// The instance as the proxy needs it: from memory, else from the store. A copy older than
    /// [`REVALIDATE_AFTER`] is still served while its access token has not expired, and re-read
    /// in the background (one re-read at a time), so under steady traffic the hot path makes
    /// no query while the token is fresh; a change made on another replica (disabled, deleted,
    /// re-authenticated) shows from the call after that re-read. A copy idle for
    /// [`REREAD_FIRST_AFTER`] is re-read before it serves (one awaited query for a call after
    /// ten idle seconds), unless the store does not answer within [`REREAD_WAIT`]: then the
    /// copy serves, without another try for [`STORE_DOWN_PAUSE_MS`], up to
    /// [`SERVE_STALE_AT_MOST`]. A rejected token always re-reads the row first
    /// (see [`RefreshEngine::refresh`]). `now` is the call's start, `wall` the same in
    /// milliseconds since the epoch (one clock reading each serves the whole call).
    pub async fn get(
        &self,
        app: &crate::app::SharedApp,
        id: i64,
        now: Instant,
        wall: i64,
    ) -> Result<Arc<CachedInstance>, RefreshFailure> {
        if let Some(cached) = self.cache.get(&id).map(|c| Arc::clone(&c)) {
            cached.last_used.store(wall, Ordering::Relaxed);
            let age = now.saturating_duration_since(cached.loaded_at);
            if age < REVALIDATE_AFTER {
                return Ok(cached);
            }
            if !cached.expired(wall) && age < SERVE_STALE_AT_MOST {
                // The store did not answer a moment ago: the copy serves without waiting.
                if cached.store_down_until.load(Ordering::Relaxed) > wall {
                    return Ok(cached);
                }
                // One re-read at a time per copy, in a task of its own: a caller that goes
                // away does not leave it half done.
                if age < REREAD_FIRST_AFTER {
                    // In steady use: served, the re-read meanwhile.
                    if !cached.revalidating.swap(true, Ordering::AcqRel) {
                        self.spawn_reread(app, &cached, id);
                    }
                    return Ok(cached);
                }
                // Idle: every call waits for the re-read (a disable or deletion made through
                // another replica holds from this call on), for as long as the store takes
                // to answer at most. Registered before the re-read can end, so that its end
                // is not missed.
                self.awaited_reads.fetch_add(1, Ordering::Relaxed);
                {
                    let reread = cached.reread_done.notified();
                    let mut reread = std::pin::pin!(reread);
                    reread.as_mut().enable();
                    if !cached.revalidating.swap(true, Ordering::AcqRel) {
                        self.spawn_reread(app, &cached, id);
                    }
                    if cached.revalidating.load(Ordering::Acquire) {
                        let _ =
                            tokio::time::timeout(REREAD_WAIT + Duration::from_millis(100), reread)
                                .await;
                    }
                }
                match self.cache.get(&id).map(|c| Arc::clone(&c)) {
                    // Replaced by the re-read.
                    Some(copy) if !Arc::ptr_eq(&copy, &cached) => return Ok(copy),
                    // Kept: the store did not answer (or is still at it).
                    Some(copy)
                        if copy.store_down_until.load(Ordering::Relaxed) > now_ms()
                            || copy.revalidating.load(Ordering::Acquire) =>
                    {
                        return Ok(copy);
                    }
                    // Dropped (the instance is gone, or the copy could not be renewed): read
                    // now, which says why.
                    _ => {}
                }
            }
        }
        self.load(app, id).await
    }

    /// Re-reads instance `id` for its copy `copy` in a task of its own (`revalidating` is set):
    /// replaces the copy, keeps it while the store does not answer (see
    /// [`CachedInstance::store_unanswered`]), or drops it; then wakes the calls waiting.
    fn spawn_reread(&self, app: &crate::app::SharedApp, copy: &Arc<CachedInstance>, id: i64) {
        // `self` is `app.refresh`: the task reaches it through the app.
        let app = Arc::clone(app);
        let copy = Arc::clone(copy);
        tokio::spawn(async move {
            let read = tokio::time::timeout(REREAD_WAIT, async {
                match app.store.get_instance_by_id(id).await {
                    Ok(Some(row)) => app
                        .refresh
                        .remember(&app, &row, Keep::IfPresent)
                        .await
                        .map(drop),
                    Ok(None) => Err(RefreshFailure::NotFound),
                    Err(error) => Err(RefreshFailure::from_store(error)),
                }
            })
            .await;
            match read {
                Ok(Ok(())) => {}
                Ok(Err(RefreshFailure::StoreUnavailable(why))) => {
                    tracing::debug!(
                        instance = id,
                        "re-reading the instance: {why}; the copy serves"
                    );
                    copy.store_unanswered(now_ms());
                }
                Err(_) => {
                    tracing::debug!(
                        instance = id,
                        "re-reading the instance: no answer; the copy serves"
                    );
                    copy.store_unanswered(now_ms());
                }
                Ok(Err(failure)) => {
                    // The next call reads the row itself.
                    tracing::debug!(instance = id, "re-reading the instance: {failure:?}");
                    app.refresh.forget(id);
                }
            }
            copy.revalidating.store(false, Ordering::Release);
            copy.reread_done.notify_waiters();
        });
    }

    /// The instance read from the store now.
    pub async fn load(&self, app: &App, id: i64) -> Result<Arc<CachedInstance>, RefreshFailure> {
        self.awaited_reads.fetch_add(1, Ordering::Relaxed);
        let row = app
            .store
            .get_instance_by_id(id)
            .await
            .map_err(RefreshFailure::from_store)?
            .ok_or(RefreshFailure::NotFound)?;
        self.remember(app, &row, Keep::Always).await
    }

    async fn remember(
        &self,
        app: &App,
        row: &InstanceRow,
        keep: Keep,
    ) -> Result<Arc<CachedInstance>, RefreshFailure> {
        self.remember_fetched(app, row, keep, None).await
    }

    /// [`Self::remember`], `fetched` when this process got the row's token from the provider
    /// just now (see [`CachedInstance::fetched_at`]); a copy of the same version read later
    /// keeps it.
    async fn remember_fetched(
        &self,
        app: &App,
        row: &InstanceRow,
        keep: Keep,
        fetched: Option<Instant>,
    ) -> Result<Arc<CachedInstance>, RefreshFailure> {
        let connector = app
            .connector(row.organization_id, &row.element_key)
            .await
            .map_err(RefreshFailure::from_store)?
            .ok_or_else(|| {
                RefreshFailure::Misconfigured(format!("connector {} is gone", row.element_key))
            })?;
        let present = self.cache.get(&row.id).map(|c| Arc::clone(&c));
        if let Some(newer) = &present
            && newer.token_version > row.token_version
        {
            // A slow re-read must not put back a token that a refresh already replaced.
            newer.revalidating.store(false, Ordering::Release);
            return Ok(Arc::clone(newer));
        }
        let fetched_at = std::sync::OnceLock::new();
        if let Some(at) = fetched.or_else(|| {
            present
                .as_ref()
                .filter(|copy| copy.token_version == row.token_version)
                .and_then(|copy| copy.fetched_at.get().copied())
        }) {
            let _ = fetched_at.set(at);
        }
        // A scheduled refresh of an instance no call uses keeps no copy (below), and its
        // caller only reads the outcome: the copy it gets is the row's state without the
        // decrypted token or the parsed base, which are not worth making for nobody.
        let unkept = matches!(keep, Keep::IfPresent) && !self.cache.contains_key(&row.id);
        let (access_token, proxy_base) = if unkept {
            (None, Err("a copy that no call uses".to_string()))
        } else {
            let secrets =
                open_secrets(app, row).map_err(|e| RefreshFailure::Misconfigured(e.message))?;
            let configuration = plain_configuration(row);
            let base_url = configuration
                .get(BASE_URL)
                .and_then(Value::as_str)
                .unwrap_or_default();
            // The operator's refused ranges, for a base named by an IP literal (a name is
            // judged by what it resolves to, as the call connects).
            let base = crate::proxy::ProxyBase::parse(base_url).and_then(|base| {
                app.config
                    .egress
                    .check_text(base_url)
                    .map_err(|why| format!("The instance's `base.url`: {why}"))
                    .map(|()| base)
            });
            (secrets.access_token, base)
        };
        let bearer = access_token
            .as_ref()
            .and_then(|token| connector.proxy.token_header(token.expose()));
        let cached = Arc::new(CachedInstance {
            id: row.id,
            organization_id: row.organization_id,
            connector,
            proxy_base,
            bearer,
            access_token,
            has_refresh_token: row
                .refresh_token_enc
                .as_ref()
                .is_some_and(|token| !token.is_empty()),
            token_version: row.token_version,
            access_expires_at: row.access_expires_at,
            last_refresh_at: row.last_refresh_at,
            valid: row.is_valid(),
            disabled: row.is_disabled(),
            state_reason: row.state_reason.clone(),
            provider_message: row.provider_message.clone(),
            backoff_until: row.backoff_until,
            last_failure: row.last_failure.clone(),
            loaded_at: Instant::now(),
            revalidating: AtomicBool::new(false),
            store_down_until: AtomicI64::new(0),
            reread_done: Notify::new(),
            last_used: AtomicI64::new(now_ms()),
            rejected: AtomicBool::new(false),
            fetched_at,
        });
        // Only instances that calls use are kept in memory: a scheduled refresh of an instance
        // nobody calls updates a copy that exists, and adds none, so memory follows the calls,
        // not the table.
        match keep {
            Keep::Always => {
                self.cache.insert(row.id, Arc::clone(&cached));
            }
            Keep::IfPresent => {
                // An unkept copy never replaces one a call loaded meanwhile; that one is
                // dropped instead, so the next call reads the refreshed row.
                if let Some(mut entry) = self.cache.get_mut(&row.id) {
                    if unkept {
                        drop(entry);
                        self.cache.remove(&row.id);
                    } else {
                        *entry = Arc::clone(&cached);
                    }
                }
            }
        }
        Ok(cached)
    }

    /// Drops copies no call has used for `idle`; answers how many went.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let cutoff = now_ms() - idle.as_millis() as i64;
        let before = self.cache.len();
        self.cache
            .retain(|_, cached| cached.last_used.load(Ordering::Relaxed) >= cutoff);
        before - self.cache.len()
    }

    pub fn cached_instances(&self) -> usize {
        self.cache.len()
    }

    /// `POST /instances/{id}/tokens/refresh`: a refresh whatever the token's age.
    pub async fn refresh_now(
        &self,
        app: &SharedApp,
        id: i64,
    ) -> Result<Arc<CachedInstance>, RefreshFailure> {
        let version = self.load(app, id).await?.token_version;
        self.refresh(app, id, Some(version), None).await
    }

    /// Refreshes instance `id` unless its token version already moved past `observed` (someone
    /// else refreshed meanwhile: that token is returned). `claimed` is a row whose lease this
    /// replica already holds (the scheduler's claim).
    ///
    /// The work runs in a task of its own: a caller that goes away (a client that hangs up, a
    /// request timeout) does not cancel a refresh between the provider's answer and the commit,
    /// which would lose a rotated refresh token.
    pub async fn refresh(
        &self,
        app: &SharedApp,
        id: i64,
        observed: Option<i64>,
        claimed: Option<Claimed>,
    ) -> Result<Arc<CachedInstance>, RefreshFailure> {
        self.refresh_for(app, id, observed, claimed, Purpose::Instance)
            .await
    }

    /// The first refresh of an instance a create of imported tokens has just inserted, made
    /// before the create answers: `inserted` is the row as inserted, its lease taken for this
    /// replica and the refresh marked in flight; `epoch` the engine's [`Self::epoch`] read
    /// before the insert. Made like any refresh (the flight, the lease, rotated tokens
    /// committed at once and kept in memory if the store refuses them), so that a refresh
    /// token the provider rotates is stored before anything else happens, whatever happens to
    /// the request. A refusal removes the instance ([`RefreshFailure::ImportRefused`], see
    /// [`Purpose::NewImport`]).
    pub async fn refresh_new_import(
        &self,
        app: &SharedApp,
        inserted: InstanceRow,
        epoch: u64,
    ) -> Result<Arc<CachedInstance>, RefreshFailure> {
        let (id, version) = (inserted.id, inserted.token_version);
        let claimed = Claimed {
            row: inserted,
            epoch,
        };
        self.refresh_for(app, id, Some(version), Some(claimed), Purpose::NewImport)
            .await
    }

    async fn refresh_for(
        &self,
        app: &SharedApp,
        id: i64,
        observed: Option<i64>,
        claimed: Option<Claimed>,
        purpose: Purpose,
    ) -> Result<Arc<CachedInstance>, RefreshFailure> {
        let owned = Arc::clone(app);
        let task = spawn_to_the_end(app, async move {
            owned
                .refresh
                .refresh_here(&owned, id, observed, claimed, purpose)
                .await
        });
        let result = task.await.unwrap_or_else(|error| {
            Err(RefreshFailure::Internal(format!("refresh task: {error}")))
        });
        if matches!(result, Err(RefreshFailure::StoreUnavailable(_))) {
            self.note_store_unavailable();
        }
        result
    }

    async fn refresh_here(
        &self,
        app: &App,
        id: i64,
        observed: Option<i64>,
        claimed: Option<Claimed>,
        purpose: Purpose,
    ) -> Result<Arc<CachedInstance>, RefreshFailure> {
        self.in_flight(
            id,
            self.refresh_in_turn(app, id, observed, claimed, purpose),
        )
        .await
    }

    /// Runs `work` in instance `id`'s flight of this process: after the refreshes, holds and
    /// kept commits of it that came first, before those that come after.
    async fn in_flight<T>(&self, id: i64, work: impl Future<Output = T>) -> T {
        match self.in_flight_by(id, None, work).await {
            Some(result) => result,
            None => unreachable!("a turn without a deadline always comes"),
        }
    }

    /// [`Self::in_flight`], unless its turn has not come by `deadline`: `None` then, and
    /// `work` is not run.
    async fn in_flight_by<T>(
        &self,
        id: i64,
        deadline: Option<tokio::time::Instant>,
        work: impl Future<Output = T>,
    ) -> Option<T> {
        let flight = Arc::clone(&self.flights.entry(id).or_default());
        let result = {
            let turn = match deadline {
                None => Some(flight.lock().await),
                Some(deadline) => tokio::time::timeout_at(deadline, flight.lock()).await.ok(),
            };
            match turn {
                Some(_turn) => Some(work.await),
                None => None,
            }
        };
        drop(flight);
        // The map keeps a mutex only while someone uses it.
        self.flights
            .remove_if(&id, |_, mutex| Arc::strong_count(mutex) == 1);
        result
    }

    /// Runs `work` on instance `id` held against refreshes: this process's flight for it and
    /// the row's lease are taken first, so no refresh of it runs anywhere meanwhile, and `work`
    /// gets the row as the last refresh committed it. A revocation that read the row while a
    /// refresh was at the provider revoked the refresh token that refresh was retiring, and
    /// the new one lived on. Waits up to [`HOLD_WAIT`] for a refresh that is running.
    pub async fn with_instance_held<T, F, Fut>(
        &self,
        app: &App,
        id: i64,
        work: F,
    ) -> Result<T, ApiError>
    where
        F: FnOnce(InstanceRow) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        self.with_instance_held_within(app, id, HOLD_WAIT, work)
            .await
    }

    /// [`Self::with_instance_held`], waiting up to `wait` for the instance.
    pub async fn with_instance_held_within<T, F, Fut>(
        &self,
        app: &App,
        id: i64,
        wait: Duration,
        work: F,
    ) -> Result<T, ApiError>
    where
        F: FnOnce(InstanceRow) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        // The wait counts from now: a refresh of this process that hangs at its provider holds
        // the instance's flight for up to the provider timeout, longer than the wait.
        let deadline = Instant::now() + wait;
        let held = self.in_flight_by(id, Some(deadline.into()), async {
            // Rotated tokens kept for the store go in first: a revocation or re-authentication
            // would work on the retired refresh token.
            self.commit_parked(app, id)
                .await
                .map_err(RefreshFailure::into_api_error)?;
            // `held_at`: marks of a refresh in flight from before it stay when the hold ends.
            let (leased, held_at) = loop {
                let now = now_ms();
                if let Some(row) = app
                    .store
                    .try_acquire_refresh_lease(id, &app.replica_id, now, now + LEASE_MS, false)
                    .await?
                {
                    break (row, now);
                }
                let Some(row) = app.store.get_instance_by_id(id).await? else {
                    return Err(ApiError::not_found("The instance was deleted meanwhile"));
                };
                // This replica's scheduler claimed the row and waits (its rate limit's delay,
                // then this flight, which we hold): take its claim over, as a refresh does,
                // rather than wait for the lease to run out. No refresh of this process runs
                // on it: they all hold this flight. The claim, when its turn comes, finds the
                // row moved on or its lease gone, and refreshes nothing.
                if let Some(taken) = take_over_own_claim(app, &row, now).await? {
                    // The claim's own mark (made as it was claimed, never a refresh: this
                    // flight is held) goes with the hold; an older one stays.
                    let claimed_at = row
                        .refresh_lease_until
                        .map_or(now, |until| until - LEASE_MS);
                    break (taken, claimed_at.min(now));
                }
                if Instant::now() > deadline {
                    return Err(still_refreshing());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            // A claim this process's scheduler made before is not fresh any more.
            self.epoch.fetch_add(1, Ordering::AcqRel);
            let leased_until = leased.refresh_lease_until;
            // The lease is renewed while `work` runs (two provider calls may take longer than
            // a lease), so no other replica takes the instance meanwhile.
            let done = tokio::select! {
                done = work(leased) => done,
                () = lease_heartbeat(app, id, leased_until) => unreachable!("the heartbeat never ends"),
            };
            let _ = app.store.release_hold(id, &app.replica_id, held_at).await;
            done
        })
        .await;
        held.unwrap_or_else(|| Err(still_refreshing()))
    }

    async fn refresh_in_turn(
        &self,
        app: &App,
        id: i64,
        observed: Option<i64>,
        claimed: Option<Claimed>,
        purpose: Purpose,
    ) -> Result<Arc<CachedInstance>, RefreshFailure> {
        if claimed.is_none() {
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
        let moved_past = |version: i64| observed.is_some_and(|seen| version > seen);
        // A scheduled refresh (a claimed row) keeps no new copy in memory.
        let keep = if claimed.is_some() {
            Keep::IfPresent
        } else {
            Keep::Always
        };
        if let Some(cached) = self.cache.get(&id).map(|c| Arc::clone(&c))
            && moved_past(cached.token_version)
            && cached.valid
        {
            return Ok(cached);
        }
        let store_error = RefreshFailure::from_store;
        // Rotated tokens a refresh here could not store yet (the store was down) are that
        // refresh: stored first, or nothing refreshes (the stored refresh token is retired).
        if let Some(row) = self.commit_parked(app, id).await? {
            if claimed.is_some() {
                let _ = app.store.release_refresh_lease(id, &app.replica_id).await;
            }
            return self.remember(app, &row, keep).await;
        }
        // The scheduler's claim: make sure the lease is still ours (it may have waited for a
        // permit past the lease's end, and another replica may have taken over).
        let claimed = match claimed {
            Some(Claimed { row, epoch }) => {
                // A claim keeps the start of a flight that never finished (see the store).
                let claimed_at = row.refresh_lease_until.unwrap_or(i64::MAX) - LEASE_MS;
                let interrupted = row.refresh_in_flight_since.is_some_and(|t| t < claimed_at);
                // An interrupted claim is read again first: the refresh it found in flight may
                // be this process's own, whose lease ran out while it was at the provider (its
                // renewals failed) and which has committed since, while it held the flight.
                if !interrupted && now_ms() < claimed_at + LEASE_MS / 2 && self.epoch() == epoch {
                    Some((row, interrupted))
                } else {
                    self.awaited_reads.fetch_add(1, Ordering::Relaxed);
                    app.store
                        .renew_refresh_lease(id, &app.replica_id, now_ms() + LEASE_MS)
                        .await
                        .map_err(store_error)?
                        .map(|row| (row, interrupted))
                }
            }
            None => None,
        };
        let (leased, interrupted) = match claimed {
            Some(claimed) => claimed,
            None => {
                // Waiting for another replica: as long as its provider call may take, plus a
                // lease that runs out if that replica died.
                let deadline = Instant::now()
                    + app.config.provider_timeout
                    + Duration::from_millis(2 * LEASE_MS as u64);
                let mut pause = Duration::from_millis(20);
                loop {
                    self.awaited_reads.fetch_add(1, Ordering::Relaxed);
                    let row = app
                        .store
                        .get_instance_by_id(id)
                        .await
                        .map_err(store_error)?
                        .ok_or(RefreshFailure::NotFound)?;
                    if moved_past(row.token_version) && row.is_valid() {
                        return self.remember(app, &row, keep).await;
                    }
                    if let Err(failure) = check_usable(&row, now_ms()) {
                        self.forget(id);
                        return Err(failure);
                    }
                    let now = now_ms();
                    if let Some(leased) = app
                        .store
                        .try_acquire_refresh_lease(id, &app.replica_id, now, now + LEASE_MS, true)
                        .await
                        .map_err(store_error)?
                    {
                        // The store keeps the start of a flight that never finished.
                        let interrupted = leased.refresh_in_flight_since.is_some_and(|t| t < now);
                        break (leased, interrupted);
                    }
                    // Our own scheduler claimed the row and waits for this instance's turn,
                    // which we hold: take its claim over rather than wait for ourselves. When
                    // it gets its turn, the version has moved and it refreshes nothing.
                    let claimed_at = row.refresh_lease_until.unwrap_or(i64::MAX) - LEASE_MS;
                    let interrupted = row.refresh_in_flight_since.is_some_and(|t| t < claimed_at);
                    if let Some(leased) = take_over_own_claim(app, &row, now)
                        .await
                        .map_err(store_error)?
                    {
                        break (leased, interrupted);
                    }
                    // Another replica is refreshing: wait for its result, bounded.
                    if Instant::now() > deadline {
                        return Err(RefreshFailure::Transient {
                            message: "another replica's refresh did not finish in time".into(),
                            provider_message: None,
                            retry_after_ms: Some(1_000),
                        });
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
            }
        };
        if moved_past(leased.token_version) && leased.is_valid() {
            let _ = app.store.release_refresh_lease(id, &app.replica_id).await;
            return self.remember(app, &leased, keep).await;
        }
        if let Err(failure) = check_usable(&leased, now_ms()) {
            let _ = app.store.release_refresh_lease(id, &app.replica_id).await;
            self.forget(id);
            return Err(failure);
        }
        // Just after the database did not answer, another replica's cut refresh may have its
        // rotated tokens in memory, stored within seconds: presenting the retired refresh token
        // now would end the grant at a strict provider (see [`OUTAGE_TAKEOVER_GRACE_MS`]).
        let now = now_ms();
        // (The lease was just taken: the database answers.)
        self.note_store_answered();
        // Only while the replica that began it may still hold its tokens (it keeps them for
        // its commit's retries, then for `rotated_tokens_kept_for`), and only where replicas
        // share the database (on SQLite one process is the only one).
        let holder_may_keep = i64::try_from(
            (app.config.commit_retry_for + app.config.rotated_tokens_kept_for).as_millis(),
        )
        .unwrap_or(i64::MAX);
        if interrupted
            && app.store.engine() == crate::store::Engine::Postgres
            && !self.parked.contains_key(&id)
            && leased
                .refresh_in_flight_since
                .is_some_and(|since| now.saturating_sub(since) < holder_may_keep)
            && let Some(left) = self.store_outage_grace(now)
        {
            let wait = left.clamp(1_000, OUTAGE_TAKEOVER_GRACE_MS);
            let _ = app
                .store
                .leave_interrupted_refresh(id, &app.replica_id, now + wait)
                .await;
            tracing::info!(
                instance = id,
                "an interrupted refresh is left for {wait} ms: the database did not answer a moment ago, and the replica that began it may store its rotated tokens"
            );
            return Err(RefreshFailure::Transient {
                message: "the database did not answer a moment ago: this instance's interrupted refresh waits for the replica that began it".into(),
                provider_message: None,
                retry_after_ms: Some(wait),
            });
        }
        if interrupted {
            tracing::warn!(
                instance = id,
                "a previous refresh of this instance was interrupted; retrying with the stored refresh token"
            );
        }
        // The lease is renewed from here to the commit's end (the connector's lookup, the
        // provider call, the commit and its retries), counted from when it was taken.
        let outcome = tokio::select! {
            outcome = self.call_provider(app, &leased, interrupted, purpose) => outcome,
            () = lease_heartbeat(app, id, leased.refresh_lease_until) => unreachable!("the heartbeat never ends"),
        };
        match outcome {
            Ok((row, committed)) => {
                self.remember_fetched(app, &row, keep, committed.then(Instant::now))
                    .await
            }
            Err(
                failure @ (RefreshFailure::Internal(_)
                | RefreshFailure::StoreUnavailable(_)
                | RefreshFailure::Misconfigured(_)),
            ) => {
                // Our own side's fault after the lease was taken (a store error, a connector gone
                // or missing an input, a key dropped too early): back off like a transient
                // failure, in the same growing steps and with the same announcement, which also
                // gives the lease back, so neither the scheduler nor recovery retries it in a
                // tight loop, and `instance.refresh_failing` tells the organization. A
                // configuration at fault is named in the instance's last failure (the detail
                // holds no secret); a store error only in the log.
                let message = match &failure {
                    RefreshFailure::Misconfigured(detail) => {
                        tracing::warn!(instance = id, "refresh impossible as configured: {detail}");
                        format!("{MISCONFIGURED_TEXT}: {detail}")
                    }
                    failure => {
                        tracing::error!(instance = id, "refresh failed on our side: {failure:?}");
                        "the service could not complete the refresh (see its log)".to_string()
                    }
                };
                // An earlier attempt's lost answer is still said.
                let message = marked_if_outcome_unknown(message, &leased, false);
                let message = message.as_str();
                let now = now_ms();
                let event = self.failing_event(app, &leased, now, message).await;
                // A configuration at fault is the one read with the lease: one a PATCH has
                // changed since (the fix) is not backed off for it.
                let recorded = app
                    .store
                    .record_transient_failure(
                        id,
                        &app.replica_id,
                        now,
                        message,
                        now + backoff_step(leased.failure_count).max(BACKOFF_BASE_MS * 5),
                        event.as_ref(),
                        Some(leased.token_version),
                        matches!(failure, RefreshFailure::Misconfigured(_))
                            .then_some(leased.updated_at),
                    )
                    .await;
                if matches!(recorded, Ok(true)) {
                    self.notify_schedule_changed();
                } else {
                    let _ = app.store.release_refresh_lease(id, &app.replica_id).await;
                }
                self.forget(id);
                Err(failure)
            }
            Err(failure @ RefreshFailure::Transient { .. }) => {
                // Keep a copy that knows the backoff: calls inside it neither reload the row nor
                // try to refresh again while the old token still works.
                if self.cache.contains_key(&id) {
                    let _ = self.load(app, id).await;
                }
                Err(failure)
            }
            Err(failure) => {
                self.forget(id);
                Err(failure)
            }
        }
    }

    /// A failing instance refreshed: its provider answers again, so the other instances of
    /// the connector that back off after the same outage are made due now (at most once per
    /// connector every [`EXPEDITE_EVERY_MS`]; the scheduler's rate limit spreads them).
    async fn expedite_backoffs(&self, app: &App, row: &InstanceRow, now: i64) {
        let organization = app.connector_owner(row.organization_id, &row.element_key);
        let scope = (organization, row.element_key.clone());
        let mut first = false;
        self.expedited
            .entry(scope)
            .and_modify(|last| {
                if now - *last >= EXPEDITE_EVERY_MS {
                    *last = now;
                    first = true;
                }
            })
            .or_insert_with(|| {
                first = true;
                now
            });
        if !first {
            return;
        }
        match app
            .store
            .expedite_backoffs(organization, &row.element_key, now, BACKOFF_MAX_MS)
            .await
        {
            Ok(0) => {}
            Ok(moved) => {
                tracing::info!(
                    connector = %row.element_key,
                    instances = moved,
                    "the provider answers again: instances backing off are due now"
                );
                self.notify_schedule_changed();
            }
            Err(error) => tracing::warn!("expediting backed-off instances: {error}"),
        }
    }

    /// The provider call and its commit. The lease is held; no connection is. With the row,
    /// whether this call's tokens were committed (not another's found in their place).
    async fn call_provider(
        &self,
        app: &App,
        row: &InstanceRow,
        interrupted: bool,
        purpose: Purpose,
    ) -> Result<(InstanceRow, bool), RefreshFailure> {
        let store_error = RefreshFailure::from_store;
        let connector = app
            .connector(row.organization_id, &row.element_key)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                RefreshFailure::Misconfigured(format!("connector {} is gone", row.element_key))
            })?;
        let secrets =
            open_secrets(app, row).map_err(|e| RefreshFailure::Misconfigured(e.message))?;
        let configuration = plain_configuration(row);
        let Some(refresh_token) = secrets.refresh_token.as_ref() else {
            let reason = "no refresh token: the provider gave none; re-authenticate the instance"
                .to_string();
            let message = row.provider_message.clone();
            if !self
                .invalidate(app, row, &reason, message.as_deref())
                .await?
            {
                return self.moved_on(app, row).await.map(|row| (row, false));
            }
            return Err(RefreshFailure::Invalid {
                reason,
                provider_message: message,
                version: Some(row.token_version),
            });
        };
        let (endpoints, spec) = app
            .oauth_settings(&connector, &configuration)
            .map_err(RefreshFailure::Misconfigured)?;
        let credentials = client_credentials(&configuration, &secrets.secret_configuration);
        // The request goes out only under a lease with time left: one read a while ago (a claim
        // that waited, a slow lookup) is renewed first, and a lease another replica took
        // meanwhile is theirs to refresh (both would present the same refresh token).
        if row
            .refresh_lease_until
            .is_none_or(|until| until - now_ms() < LEASE_MS / 2)
            && app
                .store
                .renew_refresh_lease(row.id, &app.replica_id, now_ms() + LEASE_MS)
                .await
                .map_err(store_error)?
                .is_none()
        {
            tracing::warn!(
                instance = row.id,
                "the refresh lease was taken over before the provider was asked; leaving the refresh to its holder"
            );
            // Not a refresh: a revocation or a re-authentication that ended the lease is
            // answered as it left the instance; another replica's refresh at the next call.
            let now_row = app
                .store
                .get_instance_by_id(row.id)
                .await
                .map_err(store_error)?
                .ok_or(RefreshFailure::NotFound)?;
            if now_row.token_version != row.token_version || !now_row.is_valid() {
                return self.moved_on(app, row).await.map(|row| (row, false));
            }
            self.forget(row.id);
            return Err(RefreshFailure::Transient {
                message: "another replica took this refresh over".into(),
                provider_message: None,
                retry_after_ms: Some(1_000),
            });
        }
        let started = Instant::now();
        let result = app
            .oauth
            .refresh(&spec, &endpoints, &credentials, refresh_token)
            .await;
        let outcome_label = match &result {
            Ok(_) => "ok",
            Err(error) if error.is_permanent() => "invalid",
            Err(_) => "transient",
        };
        // Built-in connectors by key; an organization's own under one label: `/metrics` is
        // read without credentials, and organizations name their connectors as they like
        // (without bound on the number of series, too).
        let connector_label = if app.is_built_in(row.organization_id, &connector.key) {
            connector.key.clone()
        } else {
            "organization".to_string()
        };
        metrics::counter!("tokenwarden_refresh_attempts_total", "connector" => connector_label, "outcome" => outcome_label).increment(1);
        metrics::histogram!("tokenwarden_refresh_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(mut tokens) => {
                let now = now_ms();
                // The lives the provider gave count from when the request went out: the whole
                // seconds its answer took are already gone (counted from the answer, a token
                // was taken for fresh up to a provider timeout after it expired). The refresh
                // itself, and the floor between two, date from the answer.
                let taken = started.elapsed().as_secs();
                tokens.expires_in = tokens.expires_in.map(|life| life.saturating_sub(taken));
                tokens.refresh_token_expires_in = tokens
                    .refresh_token_expires_in
                    .map(|life| life.saturating_sub(taken));
                let applied = apply_token_set(
                    app,
                    &connector,
                    row.id,
                    &tokens,
                    Some(crate::instances::KeptRefreshToken {
                        token: refresh_token,
                        expires_at: row.refresh_expires_at,
                        last_refresh_at: row.last_refresh_at,
                    }),
                    &configuration,
                    now,
                );
                // The configuration read with the lease may have changed while the provider
                // answered (a PATCH of other keys): the commit merges in only the keys the
                // token response set.
                let mut update = applied.update;
                update.configuration_json = applied.configuration_patch;
                // A new import's `instance.created`, written with its insert, tells of these
                // tokens: its caller never saw the imported ones in use.
                let event = (purpose == Purpose::Instance)
                    .then(|| events::new_event(app, row, events::REFRESHED, None));
                // Ending a run of transient failures that `instance.refresh_failing` announced:
                // `instance.recovered`, in the same transaction (the store writes it only if
                // the row was still failing). A run too short to be announced ends quietly: a
                // receiver would hear of a recovery from a failure it never heard of.
                let recovered = match row.failing_since {
                    Some(since) if self.failing_announced(app, row, since, true).await => {
                        Some(events::new_event(app, row, events::RECOVERED, None))
                    }
                    _ => None,
                };
                // The provider has rotated the grant already: a failing store (a dropped
                // connection, a pool timeout) is tried again before the new tokens are given
                // up, and the heartbeat keeps the lease meanwhile (another replica taking it
                // over would present the retired refresh token). The version check makes a
                // retry safe: it commits, or finds the row moved on (by a commit whose answer
                // was lost, ours).
                let commit = async {
                    let first = Instant::now();
                    let tried =
                        retry_while_store_fails(app, row.id, "committing refreshed tokens", || {
                            app.store.commit_refreshed_tokens_returning(
                                row.id,
                                &app.replica_id,
                                row.token_version,
                                &update,
                                event.as_ref(),
                                recovered.as_ref(),
                            )
                        })
                        .await;
                    match tried {
                        // The store is down (a database failing over for longer): the tokens
                        // are kept and stored when it answers, before anything refreshes the
                        // instance here.
                        Err(error @ crate::store::StoreError::Unavailable(_)) => {
                            tracing::error!(
                                instance = row.id,
                                "the rotated tokens could not be stored for {} s; they are kept, and stored as soon as the store answers: {error}",
                                first.elapsed().as_secs()
                            );
                            self.park(
                                row.id,
                                ParkedCommit {
                                    version: row.token_version,
                                    update: update.clone(),
                                    event: event.clone(),
                                    recovered: recovered.clone(),
                                    parked_at: Instant::now(),
                                },
                            );
                            Err(error)
                        }
                        Err(error) => {
                            tracing::error!(
                                instance = row.id,
                                "the rotated tokens could not be stored for {} s; the provider may have retired the stored refresh token: {error}",
                                first.elapsed().as_secs()
                            );
                            Err(error)
                        }
                        done => done,
                    }
                };
                let committed = commit.await.map_err(store_error)?;
                let was_committed = committed.is_some();
                let stored = match committed {
                    Some(stored) => stored,
                    None => app
                        .store
                        .get_instance_by_id(row.id)
                        .await
                        .map_err(store_error)?
                        .ok_or(RefreshFailure::NotFound)?,
                };
                if !was_committed {
                    // Our lease ran out and someone else committed: theirs is the token now.
                    // Or the instance was ended meanwhile (revoked, invalidated other than by
                    // an interrupted refresh): these tokens are not stored, and the caller
                    // hears how it was left.
                    let _ = app
                        .store
                        .release_refresh_lease(row.id, &app.replica_id)
                        .await;
                    tracing::warn!(
                        instance = row.id,
                        "a refresh finished after its lease expired; keeping what the instance holds now"
                    );
                    if !stored.is_valid() {
                        self.forget(row.id);
                        // Revoked meanwhile (this refresh outlived its lease, and the
                        // revocation presented the refresh token it was retiring): the grant
                        // lives on in the token the provider rotated to, which nothing holds.
                        // Revoked too, or the user's revocation would have left it alive.
                        if stored.state_reason.as_deref() == Some("revoked")
                            && let Some(rotated) = tokens.refresh_token.as_ref()
                            && rotated.expose() != refresh_token.expose()
                        {
                            self.revoke_orphaned_grant(
                                Arc::clone(&connector),
                                row.id,
                                configuration.clone(),
                                secrets.secret_configuration.clone(),
                                rotated.clone(),
                            );
                        }
                        return Err(RefreshFailure::Invalid {
                            reason: stored
                                .state_reason
                                .clone()
                                .unwrap_or_else(|| "invalid".into()),
                            provider_message: stored
                                .provider_message
                                .clone()
                                .or_else(|| stored.state_reason.clone()),
                            version: Some(stored.token_version),
                        });
                    }
                }
                // A commit that made an instance valid again (see `settle_revival`).
                if was_committed && stored.revived_reason.is_some() {
                    match self.settle_revival(app, &stored, recovered.is_some()).await {
                        Revival::Stands => {}
                        Revival::Refused(failure) => return Err(failure),
                        Revival::MovedOn => {
                            return self.moved_on(app, row).await.map(|row| (row, false));
                        }
                    }
                }
                // Debug: at thousands of refreshes a second, one line each drowned the rest.
                tracing::debug!(instance = row.id, connector = %connector.key, version = stored.token_version, "token refreshed");
                if was_committed && row.failing_since.is_some() {
                    self.expedite_backoffs(app, row, now).await;
                }
                Ok((stored, was_committed))
            }
            // The app's credentials refused, not the grant: like a configuration at fault, the
            // instance stays valid and backs off (see `refresh`), and the organization hears
            // of it; fixed credentials make the grant work again at the next attempt.
            // The refresh request itself refused (a parameter the provider wants): sent again
            // as it is, it is refused again; the configuration at fault is named.
            Err(error) if misconfigured_detail(&error).is_some() => Err(
                RefreshFailure::Misconfigured(misconfigured_detail(&error).unwrap_or_default()),
            ),
            Err(error) if error.is_permanent() && purpose == Purpose::NewImport => {
                let provider_message = error.provider_message();
                tracing::info!(instance = row.id, connector = %connector.key, reason = %provider_message, "the provider refuses an imported refresh token: the new instance is removed");
                let removed = match app
                    .store
                    .remove_refused_import(row.id, &app.replica_id, row.token_version)
                    .await
                {
                    Ok(removed) => removed,
                    Err(failure) => {
                        // Not removed (the database refused the write): invalidated instead,
                        // as any refused grant is, so that a repeat of the create is never
                        // answered with it as valid; the create answers the store's failure.
                        let _ = self
                            .invalidate(app, row, &provider_message, Some(&provider_message))
                            .await;
                        return Err(store_error(failure));
                    }
                };
                if !removed {
                    // Taken over or changed meanwhile (its lease ran out): as it is now.
                    return self.moved_on(app, row).await.map(|row| (row, false));
                }
                self.forget(row.id);
                Err(RefreshFailure::ImportRefused { provider_message })
            }
            Err(error) if error.is_permanent() => {
                let provider_message = error.provider_message();
                let reason = if interrupted || outcome_was_unknown(row) {
                    format!(
                        "refresh interrupted: the provider no longer accepts the refresh token ({provider_message})"
                    )
                } else {
                    provider_message.clone()
                };
                tracing::warn!(instance = row.id, connector = %connector.key, reason = %reason, "the grant is gone: instance invalidated");
                if !self
                    .invalidate(app, row, &reason, Some(&provider_message))
                    .await?
                {
                    // The grant moved on while we asked (re-authenticated, or refreshed by
                    // another replica): the answer was about a token that is not the instance's
                    // any more.
                    return self.moved_on(app, row).await.map(|row| (row, false));
                }
                Err(RefreshFailure::Invalid {
                    reason,
                    provider_message: Some(provider_message),
                    version: Some(row.token_version),
                })
            }
            Err(error) => {
                let now = now_ms();
                let (message, wait) = passing_failure(&error, row.failure_count);
                let wait = if error.retry_after().is_some() {
                    wait
                } else {
                    attempt_at_announcement(
                        now,
                        row.failing_since.unwrap_or(now),
                        app.config.refresh_failing_after.as_millis() as i64,
                        wait,
                    )
                };
                // An answer without a usable access token that carried a new refresh token:
                // stored before anything else, or the next refresh would present the one the
                // provider may have retired for it (a grant lost at a rotating provider).
                let mut version = row.token_version;
                let mut outcome_unknown = error.outcome_unknown();
                if let OAuthError::Unparseable {
                    rotated: Some(rotated),
                    ..
                } = &error
                    && rotated.expose() != refresh_token.expose()
                {
                    let sealed = app
                        .keyring
                        .seal_secret(rotated, crate::instances::binding(row.id, "refresh_token"));
                    let stored = retry_while_store_fails(
                        app,
                        row.id,
                        "storing a rotated refresh token",
                        || {
                            app.store.store_rotated_refresh_token(
                                row.id,
                                row.token_version,
                                &sealed,
                            )
                        },
                    )
                    .await;
                    match stored {
                        Ok(true) => {
                            version += 1;
                            outcome_unknown = false;
                            self.forget(row.id);
                        }
                        Ok(false) => {
                            // Revoked meanwhile, under a lease this refresh outlived: the
                            // grant lives on in the token it was given (as in a commit's).
                            let now_row = app.store.get_instance_by_id(row.id).await;
                            if let Ok(Some(now_row)) = &now_row
                                && !now_row.is_valid()
                                && now_row.state_reason.as_deref() == Some("revoked")
                            {
                                self.revoke_orphaned_grant(
                                    Arc::clone(&connector),
                                    row.id,
                                    configuration.clone(),
                                    secrets.secret_configuration.clone(),
                                    rotated.clone(),
                                );
                            } else {
                                tracing::warn!(
                                    instance = row.id,
                                    "the refresh token of an answer without a usable access token was not stored: the instance moved on meanwhile"
                                );
                            }
                        }
                        Err(failure) => tracing::error!(
                            instance = row.id,
                            "the refresh token of an answer without a usable access token could not be stored; the provider may have retired the stored one: {failure}"
                        ),
                    }
                }
                // Kept through the run of failures: the next `invalid_grant` may be of this
                // refresh's making.
                let message = marked_if_outcome_unknown(message, row, outcome_unknown);
                let event = self.failing_event(app, row, now, &message).await;
                let recorded = app
                    .store
                    .record_transient_failure(
                        row.id,
                        &app.replica_id,
                        now,
                        &message,
                        now + wait,
                        event.as_ref(),
                        Some(version),
                        None,
                    )
                    .await
                    .map_err(store_error)?;
                if !recorded {
                    return self.moved_on(app, row).await.map(|row| (row, false));
                }
                // Due at the backoff's end, whatever the strategy: the scheduler wakes for it
                // rather than at its longest sleep.
                self.notify_schedule_changed();
                tracing::warn!(instance = row.id, connector = %connector.key, "refresh failed for now ({message}); retrying in {} ms", wait);
                Err(RefreshFailure::Transient {
                    message: "the provider's token endpoint failed".into(),
                    provider_message: Some(message),
                    retry_after_ms: Some(wait),
                })
            }
        }
    }

    /// `instance.refresh_failing` once per run of failures, when the run has lasted the
    /// configured threshold (a single blip is not news).
    async fn failing_event(
        &self,
        app: &App,
        row: &InstanceRow,
        now: i64,
        message: &str,
    ) -> Option<crate::store::NewEvent> {
        let threshold = app.config.refresh_failing_after.as_millis() as i64;
        let since = row.failing_since.unwrap_or(now);
        let announce = events::refresh_failing_due(Some(since), now, false, threshold)
            && !self.failing_announced(app, row, since, false).await;
        announce.then(|| events::new_event(app, row, events::REFRESH_FAILING, Some(message)))
    }

    /// Whether `instance.refresh_failing` was already fired for the run of failures that
    /// began at `since`; `unknown` when the store does not say.
    async fn failing_announced(
        &self,
        app: &App,
        row: &InstanceRow,
        since: i64,
        unknown: bool,
    ) -> bool {
        let filter = crate::store::EventFilter {
            instance_id: Some(row.id),
            event_type: Some(events::REFRESH_FAILING.to_string()),
            before: None,
            limit: 1,
        };
        match app.store.list_events(row.organization_id, &filter).await {
            Ok(found) => found
                .first()
                .is_some_and(|event| event.occurred_at >= since),
            Err(_) => unknown,
        }
    }

    async fn invalidate(
        &self,
        app: &App,
        row: &InstanceRow,
        reason: &str,
        provider_message: Option<&str>,
    ) -> Result<bool, RefreshFailure> {
        let event = events::new_event(app, row, events::INVALIDATED, Some(reason));
        // Not while another process holds the instance: a lease that ran out under this
        // refresh (a pause, a stalled database) may have been taken by a replica whose refresh
        // got the grant's next token, and the refusal of the one presented here is about a
        // token that replica retired. Its work decides.
        let written = app
            .store
            .mark_invalid_unleased(
                row.id,
                &app.replica_id,
                reason,
                provider_message,
                Some(&event),
                row.token_version,
            )
            .await
            .map_err(RefreshFailure::from_store)?;
        if !written {
            return Ok(false);
        }
        crate::audit::record_automatic(
            app,
            row.organization_id,
            "instance.invalidated",
            Some(&row.id.to_string()),
            Some(reason),
        )
        .await;
        self.forget(row.id);
        Ok(true)
    }

    /// The instance's token version moved on while the provider answered about the old one:
    /// give our lease back and answer the instance as it is now.
    /// After a commit that made an instance valid again (`stored.revived_reason`: another
    /// replica took this refresh over once its lease ran out, presented the refresh token it
    /// had just used, and invalidated the instance on the provider's refusal). A provider that
    /// ends the whole grant when a retired refresh token is presented (reuse detection, RFC
    /// 9700 §4.14.2) has ended these tokens too: the connector's verification call says so,
    /// and the instance is invalid again, with an event after the commit's, rather than valid
    /// on dead tokens. Otherwise the revival is announced (`recovery_announced`: the commit
    /// wrote `instance.recovered` already).
    async fn settle_revival(
        &self,
        app: &App,
        stored: &InstanceRow,
        recovery_announced: bool,
    ) -> Revival {
        let Some(undone) = &stored.revived_reason else {
            return Revival::Stands;
        };
        let connector = app
            .connector(stored.organization_id, &stored.element_key)
            .await
            .ok()
            .flatten();
        if let Some(connector) = connector
            && let Some(refused) = revived_tokens_refused(app, &connector, stored).await
        {
            // Not "refresh interrupted": no commit may make it valid on such tokens again.
            let reason = format!(
                "the provider ended the grant when the retired refresh token was presented ({undone}), and refuses the tokens of the refresh that completed late too ({refused})"
            );
            tracing::warn!(
                instance = stored.id,
                "a refresh completed after another replica invalidated the instance for it, and the provider refuses its tokens: invalid again"
            );
            let event = events::new_event(app, stored, events::INVALIDATED, Some(&reason));
            // Not under another process's lease (a revocation's hold, a refresh taken up
            // meanwhile): it decides.
            match app
                .store
                .mark_invalid_unleased(
                    stored.id,
                    &app.replica_id,
                    &reason,
                    Some(&refused),
                    Some(&event),
                    stored.token_version,
                )
                .await
            {
                Ok(true) => {
                    self.forget(stored.id);
                    return Revival::Refused(RefreshFailure::Invalid {
                        reason,
                        provider_message: Some(refused),
                        version: Some(stored.token_version),
                    });
                }
                // Re-authenticated, refreshed or held meanwhile: as it is now.
                Ok(false) => return Revival::MovedOn,
                // The next call finds the tokens refused and ends the grant then.
                Err(error) => {
                    tracing::warn!(instance = stored.id, "invalidating the revival: {error}");
                    return Revival::Stands;
                }
            }
        }
        if !recovery_announced {
            // Whoever heard of the invalidation hears of this: an event of its own (not in the
            // commit's transaction; lost only if the process dies between the two).
            tracing::warn!(
                instance = stored.id,
                "a refresh completed after another replica invalidated the instance for it: valid again"
            );
            let reason = format!(
                "valid again: a refresh interrupted on one replica completed after all, and undid the invalidation ({undone})"
            );
            let event = events::new_event(app, stored, events::RECOVERED, Some(&reason));
            if let Err(error) = app.store.insert_event(&event).await {
                tracing::warn!(instance = stored.id, "recording the revival: {error}");
            }
        }
        Revival::Stands
    }

    async fn moved_on(&self, app: &App, row: &InstanceRow) -> Result<InstanceRow, RefreshFailure> {
        let _ = app
            .store
            .release_refresh_lease(row.id, &app.replica_id)
            .await;
        self.forget(row.id);
        let now = app
            .store
            .get_instance_by_id(row.id)
            .await
            .map_err(RefreshFailure::from_store)?
            .ok_or(RefreshFailure::NotFound)?;
        check_usable(&now, now_ms())?;
        Ok(now)
    }
}

/// The row's lease renewed for us when this replica's scheduler holds it (a claim waiting for the
/// instance's flight, which the caller holds): taken over rather than waited for. `None` when
/// the lease is another replica's, or went meanwhile.
async fn take_over_own_claim(
    app: &App,
    row: &InstanceRow,
    now: i64,
) -> Result<Option<InstanceRow>, crate::store::StoreError> {
    if row.refresh_lease_owner.as_deref() != Some(app.replica_id.as_str()) {
        return Ok(None);
    }
    let taken = app
        .store
        .renew_refresh_lease(row.id, &app.replica_id, now + LEASE_MS)
        .await?;
    if taken.is_some() {
        // The claim may have read the epoch after the flight taking it over began: moved
        // now, it reads the row again when its turn comes (the lease it holds is gone, and a
        // backoff may have been set) instead of refreshing with the row as it claimed it.
        app.refresh.epoch.fetch_add(1, Ordering::AcqRel);
    }
    Ok(taken)
}

fn check_usable(row: &InstanceRow, now: i64) -> Result<(), RefreshFailure> {
    if !row.is_valid() {
        return Err(RefreshFailure::Invalid {
            reason: row.state_reason.clone().unwrap_or_else(|| "invalid".into()),
            provider_message: row
                .provider_message
                .clone()
                .or_else(|| row.state_reason.clone()),
            version: Some(row.token_version),
        });
    }
    if row.is_disabled() {
        return Err(RefreshFailure::Disabled);
    }
    if let Some(until) = row.backoff_until
        && until > now
    {
        // A configuration at fault says so again (409), not "try again later".
        if let Some(detail) = row
            .last_failure
            .as_deref()
            .and_then(|failure| failure.strip_prefix(MISCONFIGURED_TEXT))
        {
            return Err(RefreshFailure::Misconfigured(
                detail.trim_start_matches(": ").to_string(),
            ));
        }
        return Err(RefreshFailure::Transient {
            message: "the last refresh attempt failed; waiting before the next".into(),
            provider_message: row.last_failure.clone(),
            retry_after_ms: Some(until - now),
        });
    }
    Ok(())
}

/// What a refresh refused for the app's credentials (`invalid_client`) or for the request
/// itself (`invalid_request`, `invalid_scope`, …) says is at fault; `None` for any other
/// failure. The grant is not: fixed, the configuration makes it work again.
pub(crate) fn misconfigured_detail(error: &OAuthError) -> Option<String> {
    if error.is_client_rejected() {
        Some(format!(
            "{CLIENT_REFUSED_TEXT} ({}); fix `oauth.api.key` and `oauth.api.secret`",
            error.provider_message()
        ))
    } else if error.is_request_rejected() {
        Some(format!(
            "{REQUEST_REFUSED_TEXT} ({}); the connector's refresh parameters (`oauth.refreshParams`) or the provider's settings need a fix",
            error.provider_message()
        ))
    } else {
        None
    }
}

/// A passing failure of a refresh (`error`, after `failure_count` failures in a row): the text
/// the instance keeps (`lastRefreshFailure`) and the wait before the next attempt, the
/// provider's `Retry-After` when longer (up to [`RETRY_AFTER_MAX_S`]).
fn passing_failure(error: &OAuthError, failure_count: i64) -> (String, i64) {
    let retry_after_ms = error
        .retry_after()
        .map(|seconds| seconds.min(RETRY_AFTER_MAX_S) as i64 * 1000);
    let wait = backoff_step(failure_count).max(retry_after_ms.unwrap_or(0));
    // A wait the provider asked for says so first: a recovery elsewhere does not cut it short
    // (`Store::expedite_backoffs`).
    let message = match (error, retry_after_ms) {
        (OAuthError::Unavailable { .. }, Some(ms)) => format!(
            "{} {} s: {}",
            crate::oauth::ASKED_TO_WAIT_TEXT,
            ms / 1000,
            error.provider_message()
        ),
        _ => error.provider_message(),
    };
    (message, wait)
}

/// `wait`, or less so that an attempt comes as the run of failures that began at `since`
/// reaches `announce_after` (`instance.refresh_failing` is fired by an attempt): a backoff step
/// that jumped past that moment left an outage a few minutes longer than it unannounced, and
/// its recovery too, when a recovery elsewhere made the instance due first. A wait the
/// provider asked for is not shortened (the caller does not ask).
fn attempt_at_announcement(now: i64, since: i64, announce_after: i64, wait: i64) -> i64 {
    let announce_at = since.saturating_add(announce_after);
    if now < announce_at && announce_at < now.saturating_add(wait) {
        announce_at - now
    } else {
        wait
    }
}

/// The wait before the next attempt after `failure_count` failures in a row: exponential from
/// [`BACKOFF_BASE_MS`] up to [`BACKOFF_MAX_MS`], a random point in the step's upper half.
fn backoff_step(failure_count: i64) -> i64 {
    let step = BACKOFF_BASE_MS
        .saturating_mul(1 << failure_count.clamp(0, 16))
        .min(BACKOFF_MAX_MS);
    let jitter =
        (u64::from_le_bytes(crate::crypto::random_bytes::<8>()) % (step as u64 / 2 + 1)) as i64;
    step / 2 + jitter
}

/// The end of a passing failure's text when the provider may have acted on a refresh whose
/// answer was lost ([`OAuthError::outcome_unknown`]), kept on the failures that follow it until
/// a refresh succeeds.
pub const OUTCOME_UNKNOWN_TEXT: &str =
    " (the provider may have acted on an earlier attempt, whose answer was lost)";

/// A passing failure's `message` ending with [`OUTCOME_UNKNOWN_TEXT`] when this attempt's
/// outcome is unknown (`now`) or an earlier one's in the instance's run of failures was: said
/// at the end, since the store reads the beginnings of failures.
fn marked_if_outcome_unknown(message: String, row: &InstanceRow, now: bool) -> String {
    if now || outcome_was_unknown(row) {
        format!("{message}{OUTCOME_UNKNOWN_TEXT}")
    } else {
        message
    }
}

/// Whether the instance's run of failures holds a refresh whose outcome is unknown: a provider
/// that rotates refresh tokens may have retired the stored one then, and its refusal now is
/// the interruption's doing rather than the user's.
fn outcome_was_unknown(row: &InstanceRow) -> bool {
    row.last_failure
        .as_deref()
        .is_some_and(|failure| failure.ends_with(OUTCOME_UNKNOWN_TEXT))
}

/// Revokes `refresh_token`, the grant a re-authentication of instance `id` superseded, when
/// the connector asks for it ([`crate::catalog::OAuthSpec::revoke_superseded_grant`]), in a
/// task of its own, [`AppConfig::superseded_grant_revoked_after`](crate::app::AppConfig)
/// later: the re-authentication is answered meanwhile, and a failure is logged only (the old
/// grant lives on, as it did before).
pub fn revoke_superseded_grant(
    app: &SharedApp,
    connector: Arc<Connector>,
    id: i64,
    configuration: serde_json::Map<String, Value>,
    secret_configuration: std::collections::BTreeMap<String, String>,
    refresh_token: Secret,
) {
    if !connector.oauth.revoke_superseded_grant {
        return;
    }
    let app = Arc::clone(app);
    let pending = GrantRevocationPending::new(&app);
    tokio::spawn(async move {
        let superseded = Arc::new(Notify::new());
        if let Some(older) = app
            .refresh
            .superseded_waits
            .insert(id, Arc::clone(&superseded))
        {
            // (A permit, kept if that task is not waiting yet.)
            older.notify_one();
        }
        // The delay, cut short by a stop (sent then, not lost with the process) or by a newer
        // re-authentication.
        let engine = &app.refresh;
        tokio::select! {
            () = tokio::time::sleep(app.config.superseded_grant_revoked_after) => {}
            () = until_set(&engine.stopping, &engine.stop) => {}
            () = superseded.notified() => {}
        }
        app.refresh
            .superseded_waits
            .remove_if(&id, |_, latest| Arc::ptr_eq(latest, &superseded));
        revoke_grant_now(
            &app,
            &connector,
            id,
            &configuration,
            &secret_configuration,
            &refresh_token,
            "the grant a re-authentication superseded",
        )
        .await;
        drop(pending);
    });
}

/// Revokes `refresh_token`, of a grant a re-authentication of instance `id` exchanged and never
/// stored (the instance deleted meanwhile), when the connector revokes superseded grants: at
/// once, in a task of its own, and without cutting short the wait of a superseded grant's
/// revocation (calls under way may still use that one).
pub fn revoke_unstored_grant(
    app: &SharedApp,
    connector: Arc<Connector>,
    id: i64,
    configuration: serde_json::Map<String, Value>,
    secret_configuration: std::collections::BTreeMap<String, String>,
    refresh_token: Secret,
) {
    if connector.oauth.revoke_superseded_grant {
        let origin = GrantOrigin {
            connector,
            configuration,
            secret_configuration,
        };
        spawn_grant_revocation(
            Arc::clone(app),
            id,
            origin,
            refresh_token,
            "the grant a re-authentication exchanged and could not store",
        );
    }
}

/// What a grant no instance holds was made with, to revoke it.
struct GrantOrigin {
    connector: Arc<Connector>,
    configuration: serde_json::Map<String, Value>,
    secret_configuration: std::collections::BTreeMap<String, String>,
}

/// Revokes `refresh_token` (`what` it is, for the log) at once, in a task of its own that a
/// stop waits for.
fn spawn_grant_revocation(
    app: SharedApp,
    id: i64,
    origin: GrantOrigin,
    refresh_token: Secret,
    what: &'static str,
) {
    let pending = GrantRevocationPending::new(&app);
    tokio::spawn(async move {
        revoke_grant_now(
            &app,
            &origin.connector,
            id,
            &origin.configuration,
            &origin.secret_configuration,
            &refresh_token,
            what,
        )
        .await;
        drop(pending);
    });
}

/// A revocation of a grant no instance holds any more (superseded, or orphaned), counted
/// down however its task ends: a stop waits for the count.
struct GrantRevocationPending(SharedApp);

impl GrantRevocationPending {
    fn new(app: &SharedApp) -> Self {
        app.refresh
            .superseded_pending
            .fetch_add(1, Ordering::AcqRel);
        GrantRevocationPending(Arc::clone(app))
    }
}

impl Drop for GrantRevocationPending {
    fn drop(&mut self) {
        self.0
            .refresh
            .superseded_pending
            .fetch_sub(1, Ordering::AcqRel);
        self.0.refresh.superseded_done.notify_waiters();
    }
}

/// `write` (`what` it does, for the log), tried again while the store fails, for as long as
/// [`AppConfig::commit_retry_for`](crate::app::AppConfig) allows, in growing pauses: rotated
/// tokens the provider has given are stored through a database failover. A value the
/// database refuses is refused again: not retried. The last answer.
async fn retry_while_store_fails<T, F, Fut>(
    app: &App,
    id: i64,
    what: &str,
    mut write: F,
) -> Result<T, crate::store::StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, crate::store::StoreError>>,
{
    /// Counts a write tried again in [`RefreshEngine::kept_count`] until it ends (or its
    /// future is dropped).
    struct Retrying<'a>(&'a AtomicUsize);
    impl Drop for Retrying<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let first = Instant::now();
    let mut attempt: u32 = 0;
    let mut counted = None;
    loop {
        match write().await {
            Err(error)
                if first.elapsed() < app.config.commit_retry_for
                    && !matches!(error, crate::store::StoreError::InvalidText(_)) =>
            {
                if counted.is_none() {
                    app.refresh.retrying.fetch_add(1, Ordering::Relaxed);
                    counted = Some(Retrying(&app.refresh.retrying));
                }
                attempt += 1;
                if attempt.is_power_of_two() || attempt.is_multiple_of(60) {
                    tracing::warn!(
                        instance = id,
                        attempt,
                        "{what} failed, trying again: {error}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(
                    (COMMIT_RETRY_MS << attempt.min(5)).min(COMMIT_RETRY_MAX_MS),
                ))
                .await;
            }
            done => return done,
        }
    }
}

/// A hold's answer when a refresh of the instance outlasted its wait.
fn still_refreshing() -> ApiError {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "A refresh of this instance is still running (its provider is slow to answer): try again in a few seconds",
    );
    error.retry_after = Some(5);
    error
}

/// Waits until `count` is 0, woken by `changed`, at most `limit`; whether it is.
async fn until_zero(count: &AtomicUsize, changed: &Notify, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let notified = changed.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if count.load(Ordering::Acquire) == 0 {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return count.load(Ordering::Acquire) == 0;
        }
    }
}

/// Waits until `flag` is set, woken by `set`.
async fn until_set(flag: &std::sync::atomic::AtomicBool, set: &Notify) {
    loop {
        let notified = set.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if flag.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

/// Revokes the grant of `refresh_token`, which no instance holds any more (`what` it is, for
/// the log): a failure that may pass is tried again over about half a minute; a failure is
/// logged only.
async fn revoke_grant_now(
    app: &App,
    connector: &Connector,
    id: i64,
    configuration: &serde_json::Map<String, Value>,
    secret_configuration: &std::collections::BTreeMap<String, String>,
    refresh_token: &Secret,
    what: &str,
) {
    let (endpoints, spec) = match app.oauth_settings(connector, configuration) {
        Ok(settings) => settings,
        Err(error) => {
            tracing::warn!(instance = id, "{what} was not revoked: {error}");
            return;
        }
    };
    let credentials = client_credentials(configuration, secret_configuration);
    // A failure that may pass is tried again, four times over about half a minute.
    for attempt in 0..5 {
        match app
            .oauth
            .revoke(
                &spec,
                &endpoints,
                &credentials,
                refresh_token,
                TokenHint::RefreshToken,
            )
            .await
        {
            Ok(crate::oauth::RevokeOutcome::Revoked) => {
                tracing::info!(instance = id, "revoked {what}");
                return;
            }
            Ok(_) => {
                tracing::info!(instance = id, "{what} was over already");
                return;
            }
            Err(error) if attempt < 4 && revocation_may_pass(&error) => {
                tokio::time::sleep(Duration::from_secs(2 << attempt)).await;
            }
            Err(error) => {
                tracing::warn!(
                    instance = id,
                    "{what} was not revoked: {}",
                    error.provider_message()
                );
                return;
            }
        }
    }
}

/// Whether a revocation's failure may pass: no answer, a 5xx or a 429, or said with an error
/// code (`temporarily_unavailable`, a rate limit's).
fn revocation_may_pass(error: &OAuthError) -> bool {
    matches!(
        error,
        OAuthError::RateLimited { .. } | OAuthError::Transport { .. }
    ) || matches!(error, OAuthError::Unavailable { status, .. } if *status >= 500)
        || error.is_passing()
        || error.is_rate_limit_code()
}

/// Revokes an instance's grant at the provider, in the connector's shape. The refresh token is
/// revoked first (it ends the grant at most providers), then the access token. Answers what
/// happened; the caller invalidates the instance in any case. The grant counts as revoked when
/// its refresh token was (or there is none), or when the connector's revocations cascade: an
/// access token revoked alone ends that token, and the refresh token lives on (RFC 7009).
pub async fn revoke_at_provider(app: &App, row: &InstanceRow) -> Result<Value, ApiError> {
    let connector = app
        .connector(row.organization_id, &row.element_key)
        .await?
        .ok_or_else(|| ApiError::conflict("The connector of this instance no longer exists"))?;
    let secrets = open_secrets(app, row)?;
    let configuration = plain_configuration(row);
    let (endpoints, spec) = app
        .oauth_settings(&connector, &configuration)
        .map_err(|error| ApiError::bad_request(format!("Connector input missing: {error}")))?;
    if endpoints.revoke_url.is_none()
        || connector.oauth.revocation == Some(crate::catalog::RevocationStyle::None)
    {
        return Ok(
            json!({"revokedAtProvider": false, "message": "The provider has no revocation endpoint: the instance was invalidated here only"}),
        );
    }
    let credentials = client_credentials(&configuration, &secrets.secret_configuration);
    // Each token the connector's revocation shape takes (a refresh token all the same when
    // there is no access token to present).
    let style = connector.oauth.revocation;
    let mut attempts = Vec::new();
    if let Some(token) = &secrets.refresh_token
        && (style.is_none_or(|s| s.takes_refresh_tokens()) || secrets.access_token.is_none())
    {
        attempts.push((token, TokenHint::RefreshToken));
    }
    if let Some(token) = &secrets.access_token
        && style.is_none_or(|s| s.takes_access_tokens())
    {
        attempts.push((token, TokenHint::AccessToken));
    }
    // Both tokens are revoked: providers that revoke only the refresh token (HubSpot) leave
    // the access token alive otherwise. Once one revocation succeeded, the other one failing is
    // expected at providers that cascade (Adobe answers EXPIRED_TOKEN) and is not reported.
    let cascades = connector.oauth.revocation_cascades;
    let mut revoked = false;
    let mut refusals = Refusals::default();
    // The access token refused as dead already, or as not one to revoke (a 4xx that will not
    // change), by an endpoint that takes it as the call's `Bearer` (see below).
    let mut access_refused = false;
    for (token, hint) in attempts {
        if revoked && cascades {
            break;
        }
        match app
            .oauth
            .revoke(&spec, &endpoints, &credentials, token, hint)
            .await
        {
            // A refresh token revoked (or found dead) ends the grant; an access token only
            // when it is the grant's one token, or when the provider cascades and it was
            // revoked now (one found dead already ended nothing).
            Ok(outcome) => {
                let ends_grant = hint == TokenHint::RefreshToken
                    || secrets.refresh_token.is_none()
                    || (cascades && matches!(outcome, crate::oauth::RevokeOutcome::Revoked));
                // The access token alone, with the refresh token not revoked before it: the
                // grant lives on, and the answer says so (after the refresh token's revocation
                // there is nothing to tell).
                if hint == TokenHint::AccessToken
                    && matches!(outcome, crate::oauth::RevokeOutcome::AlreadyInvalid { .. })
                {
                    access_refused = true;
                }
                if !ends_grant && !revoked {
                    refusals.messages.push(match outcome {
                        crate::oauth::RevokeOutcome::AlreadyInvalid { .. } => {
                            "the access token was dead already, the refresh token was not revoked"
                                .into()
                        }
                        _ => "the access token was revoked, the refresh token was not".into(),
                    });
                }
                revoked |= ends_grant;
            }
            Err(_) if revoked => {}
            Err(error) => {
                // (What may pass and what will not: see `Refusals`.)
                access_refused |= hint == TokenHint::AccessToken
                    && !revocation_may_pass(&error)
                    && !error.is_client_rejected();
                refusals.add(&error, error.provider_message());
            }
        }
    }
    // An endpoint that takes the access token alone as the call's `Bearer` and ends the whole
    // grant with it (Dropbox's) refuses one that has expired, while the refresh token, and the
    // grant, live on: a fresh access token is fetched with the refresh token and presented
    // instead. Only where refresh tokens do not rotate: the refresh then changes nothing
    // stored, and a revocation that fails again leaves the instance as it was (a rotating
    // provider's new refresh token would be lost with the grant alive on it).
    if !revoked
        && !refusals.retryable
        && !refusals.client_rejected
        && access_refused
        && cascades
        && connector.refresh.rotation == crate::catalog::Rotation::None
        && style.is_some_and(|s| !s.takes_refresh_tokens())
        && let Some(refresh_token) = &secrets.refresh_token
    {
        match app
            .oauth
            .refresh(&spec, &endpoints, &credentials, refresh_token)
            .await
        {
            Ok(fresh) => match app
                .oauth
                .revoke(
                    &spec,
                    &endpoints,
                    &credentials,
                    &fresh.access_token,
                    TokenHint::AccessToken,
                )
                .await
            {
                // The grant ends with it (`cascades`).
                Ok(_) => {
                    revoked = true;
                    refusals.messages.clear();
                }
                Err(error) => refusals.add(&error, error.provider_message()),
            },
            // The refresh token is refused: the grant has ended already.
            Err(error) if error.is_permanent() => {
                revoked = true;
                refusals.messages = vec![format!(
                    "the grant had ended already (the refresh token is refused: {})",
                    error.provider_message()
                )];
            }
            Err(error) => refusals.add(
                &error,
                format!(
                    "a fresh access token to revoke with could not be fetched ({})",
                    error.provider_message()
                ),
            ),
        }
    }
    Ok(json!({
        "revokedAtProvider": revoked,
        "retryable": !revoked && refusals.retryable,
        "clientRejected": !revoked && refusals.client_rejected,
        "providerMessage": if refusals.messages.is_empty() { Value::Null } else { Value::String(refusals.messages.join("; ")) },
    }))
}

/// What the calls of a revocation the provider did not confirm add up to.
#[derive(Default)]
struct Refusals {
    /// No answer, a 5xx or a 429, or said with an error code (`temporarily_unavailable`, a rate
    /// limit's): the provider may revoke on a later try. Another refusal (a 4xx: the token is
    /// dead already, or cannot be revoked) will not change.
    retryable: bool,
    /// The app's credentials refused (`invalid_client`): once they are fixed, not before.
    client_rejected: bool,
    /// What the answer says, each once (both tokens refused alike, a 503 page, are told once).
    messages: Vec<String>,
}

impl Refusals {
    fn add(&mut self, error: &crate::oauth::OAuthError, message: String) {
        self.retryable |= revocation_may_pass(error);
        self.client_rejected |= error.is_client_rejected();
        if !self.messages.contains(&message) {
            self.messages.push(message);
        }
    }
}

/// How a revival ended (see [`RefreshEngine::settle_revival`]).
enum Revival {
    /// Valid on the committed tokens.
    Stands,
    /// Invalid again: the provider refuses the committed tokens.
    Refused(RefreshFailure),
    /// The instance moved on (re-authenticated, refreshed) before it could be invalidated.
    MovedOn,
}

/// The provider's words when it refuses the tokens a revival committed (the connector's
/// verification call answered a token rejection); `None` when it accepts them, or cannot tell
/// (no verification call, a passing failure): the revival then stands.
async fn revived_tokens_refused(
    app: &App,
    connector: &Connector,
    stored: &InstanceRow,
) -> Option<String> {
    // An access token that expired meanwhile (kept through a long outage) is refused for
    // that alone, which says nothing of the grant: the revival stands, and the next refresh
    // tells (a tester's instances were invalidated on working refresh tokens).
    if stored.access_expires_at.is_some_and(|at| at <= now_ms()) {
        return None;
    }
    let access_token = open_secrets(app, stored).ok()?.access_token?;
    let configuration = plain_configuration(stored);
    let verified =
        crate::instances::verification(app, connector, &configuration, &access_token).await?;
    verified.rejection
}

#[cfg(test)]
mod tests {
    use super::attempt_at_announcement;

    #[test]
    fn an_attempt_comes_when_a_run_of_failures_is_announced() {
        // The step would jump past the moment: it is cut to it.
        assert_eq!(attempt_at_announcement(1_000, 0, 300_000, 400_000), 299_000);
        // Before it, or past it already: the step as it is.
        assert_eq!(attempt_at_announcement(1_000, 0, 300_000, 60_000), 60_000);
        assert_eq!(
            attempt_at_announcement(310_000, 0, 300_000, 240_000),
            240_000
        );
        // Ending exactly at it: as it is.
        assert_eq!(
            attempt_at_announcement(60_000, 0, 300_000, 240_000),
            240_000
        );
    }
}
