//! Who calls through the proxy: `User <secret>, Element <token>` checked against short-lived
//! in-memory copies of the store's answers, so a warm call makes no query.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use dashmap::DashMap;

use crate::app::SharedApp;
use sha2::{Digest, Sha256};

use crate::crypto::hash_secret;
use crate::http::auth::parse_authorization;
use crate::http::error::ApiError;

/// How long a checked secret is trusted before it is checked against the store again.
const AUTH_TTL: Duration = Duration::from_secs(5);
/// Whole `Authorization` values remembered at most. Each spelling of the same secrets (spaces,
/// order, case) is a value of its own: a caller varying them made one entry per call, kept for
/// ten idle minutes (millions at a high rate). Past the cap a new value is checked secret by
/// secret, which those maps remember.
const MAX_REMEMBERED_HEADERS: usize = 100_000;

/// Short-lived memory of checked proxy credentials, keyed by the secrets' hashes. A checked
/// secret older than [`AUTH_TTL`] is still accepted while it is checked again in the
/// background (once at a time), so a warm call makes no query; a revoked secret or deleted
/// instance is refused from the call after that check.
///
/// In front of it, `headers` remembers whole `Authorization` values (by hash) that passed,
/// with the time of the oldest check they relied on: while that is within [`AUTH_TTL`], a
/// call costs one hash and one lookup, without parsing the header or hashing each secret.
#[derive(Default)]
pub struct AuthCache {
    headers: DashMap<[u8; 32], (i64, Instant), PrehashedKeys>,
    users: DashMap<Vec<u8>, (i64, Instant)>,
    organizations: DashMap<Vec<u8>, (i64, Instant)>,
    elements: DashMap<Vec<u8>, (i64, i64, Instant)>,
    rechecking: DashMap<Vec<u8>, ()>,
    /// Credential lookups a caller waited for.
    awaited_lookups: std::sync::atomic::AtomicU64,
}

impl AuthCache {
    /// Drops credentials not checked for `idle` (a used entry is re-checked every few seconds,
    /// so only unused ones age out): memory follows the callers, not the tables.
    pub fn evict_idle(&self, idle: Duration) {
        self.headers
            .retain(|_, (_, checked)| checked.elapsed() < idle);
        self.users
            .retain(|_, (_, checked)| checked.elapsed() < idle);
        self.organizations
            .retain(|_, (_, checked)| checked.elapsed() < idle);
        self.elements
            .retain(|_, (_, _, checked)| checked.elapsed() < idle);
    }

    pub fn awaited_lookups(&self) -> u64 {
        self.awaited_lookups
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_lookup(&self) {
        self.awaited_lookups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Checks a user secret and an Element token again in the background.
fn recheck_in_background(app: &SharedApp, user_hash: Vec<u8>, element_hash: Vec<u8>) {
    let key = [user_hash.as_slice(), element_hash.as_slice()].concat();
    if app.auth_cache.rechecking.insert(key.clone(), ()).is_some() {
        return;
    }
    let app = Arc::clone(app);
    tokio::spawn(async move {
        let cache = &app.auth_cache;
        match app.store.find_user_by_secret_hash(&user_hash).await {
            Ok(Some(user)) => {
                cache
                    .users
                    .insert(user_hash, (user.organization_id, Instant::now()));
            }
            Ok(None) => {
                cache.users.remove(&user_hash);
            }
            Err(error) => tracing::warn!("re-checking a user secret: {error}"),
        }
        match app.store.find_instance_by_token_hash(&element_hash).await {
            Ok(Some(row)) => {
                cache
                    .elements
                    .insert(element_hash, (row.id, row.organization_id, Instant::now()));
            }
            Ok(None) => {
                cache.elements.remove(&element_hash);
            }
            Err(error) => tracing::warn!("re-checking an Element token: {error}"),
        }
        cache.rechecking.remove(&key);
    });
}

/// Who is calling: `User <secret>, Element <token>`; answers the instance id. `now` is the
/// call's start.
pub(super) async fn authenticate(
    app: &SharedApp,
    headers: &HeaderMap,
    now: Instant,
) -> Result<i64, ApiError> {
    let mut given = headers.get_all(axum::http::header::AUTHORIZATION).iter();
    let header = given.next().ok_or_else(|| {
        ApiError::unauthorized(
            "Calls through an instance need `Authorization: User <user secret>, Element <instance token>`",
            )
        })?;
    if given.next().is_some() {
        return Err(ApiError::bad_request(
            crate::http::caller::TWO_AUTHORIZATION_HEADERS,
        ));
    }
    let key: [u8; 32] = Sha256::new()
        .chain_update(b"tokenwarden proxy credentials\0")
        .chain_update(header.as_bytes())
        .finalize()
        .into();
    let cache = &app.auth_cache;
    if let Some((id, checked)) = cache.headers.get(&key).map(|entry| *entry)
        && now.saturating_duration_since(checked) < AUTH_TTL
    {
        return Ok(id);
    }
    let header = header
        .to_str()
        .map_err(|_| ApiError::unauthorized("Bad Authorization header: it is not visible ASCII"))?;
    match check_secrets(app, header).await {
        Ok((id, checked)) => {
            if cache.headers.len() < MAX_REMEMBERED_HEADERS {
                cache.headers.insert(key, (id, checked));
            }
            Ok(id)
        }
        Err(error) => {
            cache.headers.remove(&key);
            Err(error)
        }
    }
}

/// The secrets of an `Authorization` value checked one by one (from memory while trusted):
/// the instance id, and when the oldest check it relied on was made.
async fn check_secrets(app: &SharedApp, header: &str) -> Result<(i64, Instant), ApiError> {
    let credentials = parse_authorization(header)
        .map_err(|error| ApiError::unauthorized(format!("Bad Authorization header: {error}")))?;
    let (Some(user), Some(element)) = (credentials.user, credentials.element) else {
        return Err(ApiError::unauthorized(
            "Calls through an instance need `Authorization: User <user secret>, Element <instance token>`",
        ));
    };
    let user_hash = hash_secret(user.expose());
    let element_hash = hash_secret(element.expose());
    let cache = &app.auth_cache;
    // The `Organization` part is optional here, but a wrong one is refused, not ignored.
    let now = Instant::now();
    let (organization_check, organization_checked) = match credentials.organization {
        Some(secret) => {
            let (id, checked) = organization_of(app, &hash_secret(secret.expose())).await?;
            (Some(id), checked)
        }
        None => (None, now),
    };
    let cached_user = cache.users.get(&user_hash).map(|entry| *entry);
    let cached_element = cache.elements.get(&element_hash).map(|entry| *entry);
    if let (Some((organization_id, user_checked)), Some((id, instance_organization, checked))) =
        (cached_user, cached_element)
    {
        if user_checked.elapsed() >= AUTH_TTL || checked.elapsed() >= AUTH_TTL {
            recheck_in_background(app, user_hash, element_hash);
        }
        if instance_organization != organization_id {
            return Err(ApiError::unauthorized("The Element token is not valid"));
        }
        if organization_check.is_some_and(|org| org != organization_id) {
            return Err(ApiError::unauthorized(
                "The organization secret is not valid for this user",
            ));
        }
        return Ok((id, user_checked.min(checked).min(organization_checked)));
    }
    cache.count_lookup();
    let mut oldest = organization_checked;
    let organization_id = match cached_user {
        Some((organization_id, checked)) if checked.elapsed() < AUTH_TTL => {
            oldest = oldest.min(checked);
            organization_id
        }
        _ => {
            let user = app
                .store
                .find_user_by_secret_hash(&user_hash)
                .await?
                .ok_or_else(|| ApiError::unauthorized("The user secret is not valid"))?;
            cache
                .users
                .insert(user_hash, (user.organization_id, Instant::now()));
            user.organization_id
        }
    };
    let (instance_id, instance_organization) = match cached_element {
        Some((id, organization, checked)) if checked.elapsed() < AUTH_TTL => {
            oldest = oldest.min(checked);
            (id, organization)
        }
        _ => {
            let row = app
                .store
                .find_instance_by_token_hash(&element_hash)
                .await?
                .ok_or_else(|| ApiError::unauthorized("The Element token is not valid"))?;
            cache
                .elements
                .insert(element_hash, (row.id, row.organization_id, Instant::now()));
            (row.id, row.organization_id)
        }
    };
    if instance_organization != organization_id {
        return Err(ApiError::unauthorized("The Element token is not valid"));
    }
    if organization_check.is_some_and(|org| org != organization_id) {
        return Err(ApiError::unauthorized(
            "The organization secret is not valid for this user",
        ));
    }
    Ok((instance_id, oldest))
}

/// The organization of an organization secret (by its hash), from memory while trusted.
async fn organization_of(app: &SharedApp, hash: &[u8]) -> Result<(i64, Instant), ApiError> {
    if let Some((id, checked)) = app.auth_cache.organizations.get(hash).map(|e| *e)
        && checked.elapsed() < AUTH_TTL
    {
        return Ok((id, checked));
    }
    let organization = app
        .store
        .find_organization_by_secret_hash(hash)
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized("The organization secret is not valid for this user")
        })?;
    let now = Instant::now();
    app.auth_cache
        .organizations
        .insert(hash.to_vec(), (organization.id, now));
    Ok((organization.id, now))
}

/// A hasher for keys that are already uniform (SHA-256 outputs, random ids): it folds them
/// without SipHash's rounds, which were a measurable share of a proxied call. Only keys that
/// passed a check are ever inserted, so a caller cannot choose colliding ones.
#[derive(Clone, Copy, Default)]
pub struct PrehashedKeys;

impl std::hash::BuildHasher for PrehashedKeys {
    type Hasher = FoldHasher;
    fn build_hasher(&self) -> FoldHasher {
        FoldHasher(0)
    }
}

#[derive(Default)]
pub struct FoldHasher(u64);

impl std::hash::Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_i64(&mut self, word: i64) {
        self.write_u64(word as u64);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
}
