//! The sandbox's authorization-server state: clients, codes, grants, tokens and counters.
//!
//! This module owns every rule about token life (expiry, rotation, reuse, revocation cascades)
//! and knows nothing of HTTP: handlers in `http` turn its results into each profile's answer
//! shapes. **No map entry guard is ever held while another map is read or an `.await` runs**:
//! records are copied out, checked, and written back with short, single-map critical sections,
//! which keeps the DashMaps free of lock-order deadlocks under benchmark load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dashmap::DashMap;
use rand::RngExt as _;
use serde_json::json;
use sha2::Digest as _;

use crate::clock::{Clock, Millis, plus_seconds};
use crate::faults::Faults;
use crate::profiles::{Profile, ProfileSettings, RevocationMode};

/// How long dead records are kept so that a second revoke can still say "already revoked".
const DEAD_RECORD_RETENTION_SECONDS: u64 = 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PkceMethod {
    S256,
    Plain,
}

#[derive(Debug, Clone)]
pub struct PkceChallenge {
    pub method: PkceMethod,
    pub value: String,
}

/// What the authorize endpoint approved, waiting to be exchanged.
#[derive(Debug, Clone)]
pub struct CodeRequest {
    pub profile: Profile,
    pub user: String,
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: String,
    pub challenge: Option<PkceChallenge>,
}

#[derive(Debug, Clone)]
struct AuthorizationCode {
    request: CodeRequest,
    expires_at: Millis,
    /// `None` until its first exchange; then `Some` of the grant it gave, if any. Kept until
    /// it would have expired, so that a second exchange revokes that grant (RFC 6749 §4.1.2).
    used: Option<Option<u64>>,
}

/// A user's consent to a client at one profile; every token belongs to one.
#[derive(Debug, Clone)]
pub struct Grant {
    pub profile: Profile,
    pub user: String,
    pub client_id: String,
    pub scope: String,
    pub created_at: Millis,
    /// When a revocation takes (or took) effect: later than the revocation itself when the
    /// profile has a `revocationDelaySeconds`.
    pub revoked_at: Option<Millis>,
    /// Made for a public client (RFC 6749 §2.1: no secret, PKCE instead): refreshed with the
    /// client id alone. A confidential client's grant needs its secret.
    pub public: bool,
}

impl Grant {
    pub fn revoked(&self, now: Millis) -> bool {
        self.revoked_at.is_some_and(|at| now >= at)
    }
}

#[derive(Debug, Clone)]
struct AccessTokenRecord {
    grant_id: u64,
    /// The refresh token handed out with this access token (or presented to mint it): revoking
    /// that refresh token at Salesforce also kills this access token.
    parent_refresh_token: Option<String>,
    /// Before this instant the token is refused (`accessTokenActivationDelaySeconds`).
    active_from: Millis,
    expires_at: Millis,
    revoked_at: Option<Millis>,
    /// What it may do: the grant's scope, or the narrower one its refresh asked for (RFC 6749
    /// §6).
    scope: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefreshStatus {
    Active,
    /// Rotated away: it worked once and was replaced.
    Used {
        first_used_at: Millis,
    },
    /// Revoked as of `at` (in the future while a revocation delay runs). `cascades`: the access
    /// tokens minted with it die too (Salesforce); not so for refresh-only revocation.
    Revoked {
        at: Millis,
        cascades: bool,
    },
}

impl RefreshStatus {
    fn revoked(self, now: Millis) -> bool {
        matches!(self, RefreshStatus::Revoked { at, .. } if now >= at)
    }
}

#[derive(Debug, Clone)]
struct RefreshTokenRecord {
    grant_id: u64,
    last_used_at: Millis,
    status: RefreshStatus,
}

/// Tokens minted by a successful grant.
#[derive(Debug, Clone)]
pub struct IssuedTokens {
    pub access_token: String,
    /// The refresh token to put in the answer, if any.
    pub refresh_token: Option<String>,
    pub expires_in: u64,
    /// Seconds the answered refresh token has left, when the profile limits its life.
    pub refresh_token_expires_in: Option<u64>,
    pub scope: String,
    pub user: String,
}

/// Why a grant (code or refresh token) was refused. All but `InvalidScope` are `invalid_grant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantError {
    CodeUnknown,
    /// A code exchanged already, for tokens that are revoked now.
    CodeReused,
    CodeExpired,
    ClientMismatch,
    RedirectUriMismatch,
    PkceVerifierMissing,
    PkceVerifierUnexpected,
    PkceMismatch,
    RefreshTokenUnknown,
    RefreshTokenExpired,
    RefreshTokenRevoked,
    /// A rotated-away refresh token presented again outside the grace.
    RefreshTokenReused,
    InvalidScope,
}

impl GrantError {
    pub fn concerns_refresh_token(self) -> bool {
        matches!(
            self,
            GrantError::RefreshTokenUnknown
                | GrantError::RefreshTokenExpired
                | GrantError::RefreshTokenRevoked
                | GrantError::RefreshTokenReused
        )
    }

    pub fn description(self) -> &'static str {
        match self {
            GrantError::CodeUnknown => {
                "The authorization code is invalid or was already used. Authorize again."
            }
            GrantError::CodeReused => {
                "The authorization code was already used; the tokens issued for it are revoked."
            }
            GrantError::CodeExpired => "The authorization code has expired. Authorize again.",
            GrantError::ClientMismatch => "The grant was issued to another client.",
            GrantError::RedirectUriMismatch => {
                "redirect_uri does not match the one of the authorization request."
            }
            GrantError::PkceVerifierMissing => {
                "code_verifier is required: the authorization request sent a code_challenge."
            }
            GrantError::PkceVerifierUnexpected => {
                "code_verifier was sent but the authorization request had no code_challenge."
            }
            GrantError::PkceMismatch => "code_verifier does not match the code_challenge.",
            GrantError::RefreshTokenUnknown => "The refresh token is not known.",
            GrantError::RefreshTokenExpired => "The refresh token has expired.",
            GrantError::RefreshTokenRevoked => "The refresh token has been revoked.",
            GrantError::RefreshTokenReused => {
                "The refresh token was already used and has been replaced."
            }
            GrantError::InvalidScope => "The requested scope exceeds the scope of the grant.",
        }
    }
}

/// Why a bearer token was refused by the protected API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessRejection {
    Missing,
    Unknown,
    Expired,
    Revoked,
    /// Minted less than `accessTokenActivationDelaySeconds` ago.
    NotYetActive,
}

impl AccessRejection {
    pub fn description(self) -> &'static str {
        match self {
            AccessRejection::Missing => "No bearer token was sent.",
            AccessRejection::Unknown => "The access token is not known.",
            AccessRejection::Expired => "The access token has expired.",
            AccessRejection::Revoked => "The access token has been revoked.",
            AccessRejection::NotYetActive => "The access token is not active yet.",
        }
    }
}

/// Who an accepted access token speaks for.
#[derive(Debug, Clone)]
pub struct TokenOwner {
    pub user: String,
    pub client_id: String,
    pub scope: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// Not a token this profile issued.
    Unknown,
    /// Known, but already expired or revoked; nothing changed.
    AlreadyDead,
    Revoked,
}

/// Counters for `GET /__sandbox/stats`.
#[derive(Debug, Default)]
pub struct Stats {
    pub authorize: AtomicU64,
    pub token_authorization_code: AtomicU64,
    pub token_refresh_token: AtomicU64,
    pub token_errors: AtomicU64,
    pub revoke: AtomicU64,
    pub revoke_errors: AtomicU64,
    pub api_ok: AtomicU64,
    pub api_unauthorized: AtomicU64,
    pub faults_injected: AtomicU64,
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "authorize": get(&self.authorize),
            "token": {
                "authorization_code": get(&self.token_authorization_code),
                "refresh_token": get(&self.token_refresh_token),
            },
            "tokenErrors": get(&self.token_errors),
            "revoke": get(&self.revoke),
            "revokeErrors": get(&self.revoke_errors),
            "api": { "ok": get(&self.api_ok), "unauthorized": get(&self.api_unauthorized) },
            "faultsInjected": get(&self.faults_injected),
        })
    }

    fn reset(&self) {
        for counter in [
            &self.authorize,
            &self.token_authorization_code,
            &self.token_refresh_token,
            &self.token_errors,
            &self.revoke,
            &self.revoke_errors,
            &self.api_ok,
            &self.api_unauthorized,
            &self.faults_injected,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// The whole sandbox, shared by every handler behind an `Arc`.
#[derive(Debug)]
pub struct Sandbox {
    /// `--client ID:SECRET`: when set, the only client accepted.
    fixed_client: Option<(String, String)>,
    /// Base URL for metadata and routing fields; `None` means "from the Host header".
    pub public_url: Option<String>,
    pub clock: Clock,
    pub stats: Stats,
    pub faults: Faults,
    settings: [RwLock<Arc<ProfileSettings>>; 5],
    codes: DashMap<String, AuthorizationCode>,
    grants: DashMap<u64, Grant>,
    access_tokens: DashMap<String, AccessTokenRecord>,
    refresh_tokens: DashMap<String, RefreshTokenRecord>,
    next_grant_id: AtomicU64,
}

impl Sandbox {
    pub fn new(fixed_client: Option<(String, String)>, public_url: Option<String>) -> Sandbox {
        Sandbox {
            fixed_client,
            public_url: public_url.map(|u| u.trim_end_matches('/').to_string()),
            clock: Clock::default(),
            stats: Stats::default(),
            faults: Faults::default(),
            settings: Profile::ALL.map(|p| RwLock::new(Arc::new(ProfileSettings::defaults(p)))),
            codes: DashMap::new(),
            grants: DashMap::new(),
            access_tokens: DashMap::new(),
            refresh_tokens: DashMap::new(),
            next_grant_id: AtomicU64::new(1),
        }
    }

    pub fn settings(&self, profile: Profile) -> Arc<ProfileSettings> {
        self.settings[profile.index()]
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces a profile's settings with the result of `change`, or leaves them alone if it
    /// fails. Answers the settings now in force.
    pub fn update_settings(
        &self,
        profile: Profile,
        change: impl FnOnce(&mut ProfileSettings) -> Result<(), String>,
    ) -> Result<Arc<ProfileSettings>, String> {
        let mut slot = self.settings[profile.index()]
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = (**slot).clone();
        change(&mut next)?;
        *slot = Arc::new(next);
        Ok(slot.clone())
    }

    /// Statistics, faults and the profiles' settings back to a fresh start; with `grants`,
    /// every issued code, grant and token forgotten too, and the clock back to real time (kept
    /// otherwise: the times the grants hold, a revocation, a use, an expiry, are on it, and
    /// turned back they would come alive again).
    pub fn reset(&self, grants: bool) {
        if grants {
            self.codes.clear();
            self.grants.clear();
            self.access_tokens.clear();
            self.refresh_tokens.clear();
            self.clock.reset();
        }
        self.stats.reset();
        self.faults.clear();
        for profile in Profile::ALL {
            let _ = self.update_settings(profile, |s| {
                *s = ProfileSettings::defaults(profile);
                Ok(())
            });
        }
    }

    /// Whether the client may use the sandbox: any id and secret without `--client` (the
    /// contract's rule: several apps, or one app whose secret was rotated, share one sandbox),
    /// only that pair with it. Codes and tokens stay bound to the client id they were issued to.
    pub fn authenticate_client(&self, client_id: &str, client_secret: &str) -> bool {
        match &self.fixed_client {
            Some((id, secret)) => id == client_id && secret == client_secret,
            None => true,
        }
    }

    /// Whether an unused code was asked for with a PKCE challenge (`None`: unknown or used).
    pub fn code_has_challenge(&self, code: &str) -> Option<bool> {
        let stored = self.codes.get(code)?;
        stored
            .used
            .is_none()
            .then(|| stored.request.challenge.is_some())
    }

    /// Whether a refresh token's grant was made for a public client (`None`: unknown token).
    pub fn refresh_token_public(&self, refresh_token: &str) -> Option<bool> {
        let grant_id = self.refresh_tokens.get(refresh_token)?.grant_id;
        Some(self.grants.get(&grant_id)?.public)
    }

    /// Whether the sandbox was started for one client (`--client`).
    pub fn has_fixed_client(&self) -> bool {
        self.fixed_client.is_some()
    }

    /// The client an access or refresh token of `profile` was issued to, if the token is known.
    pub fn token_client(&self, profile: Profile, token: &str) -> Option<String> {
        let grant_id = match self.access_tokens.get(token) {
            Some(record) => record.grant_id,
            None => self.refresh_tokens.get(token)?.grant_id,
        };
        let grant = self.grants.get(&grant_id)?;
        (grant.profile == profile).then(|| grant.client_id.clone())
    }

    /// Whether the authorize endpoint may accept this client id (only `--client` restricts it).
    pub fn client_id_allowed(&self, client_id: &str) -> bool {
        match &self.fixed_client {
            Some((id, _)) => id == client_id,
            None => true,
        }
    }

    // ----- authorization codes ------------------------------------------------------------

    pub fn issue_code(&self, request: CodeRequest) -> String {
        let now = self.clock.now_ms();
        let ttl = self
            .settings(request.profile)
            .authorization_code_ttl_seconds;
        let code = random_token(request.profile, "code");
        self.codes.insert(
            code.clone(),
            AuthorizationCode {
                request,
                expires_at: plus_seconds(now, ttl),
                used: None,
            },
        );
        Stats::bump(&self.stats.authorize);
        code
    }

    /// Redeems a code. The code is consumed by the first attempt whatever its outcome, so a
    /// code can never be tried twice; tried again after it gave tokens, it revokes their grant
    /// (RFC 6749 §4.1.2: a code presented twice may have been stolen).
    pub fn exchange_code(
        &self,
        profile: Profile,
        client_id: &str,
        code: &str,
        redirect_uri: &str,
        code_verifier: Option<&str>,
        public: bool,
    ) -> Result<IssuedTokens, GrantError> {
        let now = self.clock.now_ms();
        // The code's entry stays locked to the end: an exchange of it at the same moment waits,
        // then finds the grant this one made (and revokes it). Only maps other than `codes` are
        // locked meanwhile, and no path locks `codes` after them.
        let Some(mut stored) = self.codes.get_mut(code) else {
            return Err(GrantError::CodeUnknown);
        };
        if stored.request.profile != profile {
            return Err(GrantError::CodeUnknown);
        }
        match stored.used {
            None => {}
            Some(None) => return Err(GrantError::CodeUnknown),
            Some(Some(grant_id)) => {
                drop(stored);
                self.revoke_grant(grant_id, now);
                return Err(GrantError::CodeReused);
            }
        }
        stored.used = Some(None);
        let (request, expires_at) = (stored.request.clone(), stored.expires_at);
        if now >= expires_at {
            return Err(GrantError::CodeExpired);
        }
        if request.client_id != client_id {
            return Err(GrantError::ClientMismatch);
        }
        if request.redirect_uri != redirect_uri {
            return Err(GrantError::RedirectUriMismatch);
        }
        match (&request.challenge, code_verifier) {
            (None, None) => {}
            (None, Some(_)) => return Err(GrantError::PkceVerifierUnexpected),
            (Some(_), None) => return Err(GrantError::PkceVerifierMissing),
            (Some(challenge), Some(verifier)) => {
                if !crate::http::authorize::pkce_text(verifier) {
                    return Err(GrantError::PkceMismatch);
                }
                let computed = match challenge.method {
                    PkceMethod::S256 => URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier)),
                    PkceMethod::Plain => verifier.to_string(),
                };
                if computed != challenge.value {
                    return Err(GrantError::PkceMismatch);
                }
            }
        }

        let settings = self.settings(profile);
        let grant_id = self.next_grant_id.fetch_add(1, Ordering::Relaxed);
        stored.used = Some(Some(grant_id));
        self.grants.insert(
            grant_id,
            Grant {
                profile,
                user: request.user.clone(),
                client_id: request.client_id.clone(),
                scope: request.scope.clone(),
                created_at: now,
                revoked_at: None,
                public,
            },
        );
        if settings.max_grants_per_user > 0 {
            self.evict_oldest_grants(
                profile,
                &request.user,
                &request.client_id,
                settings.max_grants_per_user,
                now,
            );
        }
        let wants_refresh_token = !settings.require_offline_access_scope
            || has_scope(&request.scope, "offline_access")
            || (profile == Profile::Salesforce && has_scope(&request.scope, "refresh_token"));
        let refresh_token =
            wants_refresh_token.then(|| self.insert_refresh_token(profile, grant_id, now));
        let access_token = self.insert_access_token(
            profile,
            grant_id,
            refresh_token.clone(),
            now,
            &settings,
            &request.scope,
        );
        let refresh_token_expires_in = refresh_token
            .as_ref()
            .and_then(|_| refresh_token_remaining_seconds(&settings, now, now));
        Ok(IssuedTokens {
            access_token,
            refresh_token,
            expires_in: settings.access_token_ttl_seconds,
            refresh_token_expires_in,
            scope: request.scope,
            user: request.user,
        })
    }

    // ----- refresh ------------------------------------------------------------------------

    pub fn refresh(
        &self,
        profile: Profile,
        client_id: &str,
        refresh_token: &str,
        requested_scope: Option<&str>,
    ) -> Result<IssuedTokens, GrantError> {
        let now = self.clock.now_ms();
        let settings = self.settings(profile);
        let Some(record) = self.refresh_tokens.get(refresh_token).map(|r| r.clone()) else {
            return Err(GrantError::RefreshTokenUnknown);
        };
        let Some(grant) = self.grants.get(&record.grant_id).map(|g| g.clone()) else {
            return Err(GrantError::RefreshTokenUnknown);
        };
        if grant.profile != profile {
            return Err(GrantError::RefreshTokenUnknown);
        }
        if grant.client_id != client_id {
            return Err(GrantError::ClientMismatch);
        }
        if grant.revoked(now) || record.status.revoked(now) {
            return Err(GrantError::RefreshTokenRevoked);
        }
        // A used token presented again outside the grace is a reuse before it is anything else:
        // past its idle life, it was answered "expired" and the grant (with the thief's newer
        // tokens) lived on, though `revokeGrantOnReuse` was asked for.
        if let RefreshStatus::Used { first_used_at } = record.status
            && !(settings.refresh_reuse_grace_seconds > 0
                && now <= plus_seconds(first_used_at, settings.refresh_reuse_grace_seconds))
        {
            if settings.revoke_grant_on_reuse {
                self.revoke_grant(record.grant_id, now);
            }
            return Err(GrantError::RefreshTokenReused);
        }
        if refresh_token_expired(&record, &grant, &settings, now) {
            return Err(GrantError::RefreshTokenExpired);
        }
        // A revocation of the whole grant that has not taken effect yet: its tokens work, and
        // refresh tokens do not rotate (as the token's own pending revocation below).
        let revocation_pending = grant.revoked_at.is_some_and(|at| at > now);
        let scope = match requested_scope.map(str::trim).filter(|s| !s.is_empty()) {
            // Microsoft's scope on refresh selects a resource rather than narrowing the grant.
            Some(requested) if profile == Profile::Microsoft => requested.to_string(),
            Some(requested) => {
                if !requested
                    .split_whitespace()
                    .all(|s| has_scope(&grant.scope, s))
                {
                    return Err(GrantError::InvalidScope);
                }
                requested.to_string()
            }
            None => grant.scope.clone(),
        };

        // The state transition happens under the entry's guard so two concurrent refreshes of a
        // single-use token cannot both succeed.
        enum Next {
            KeepSame,
            MintNew,
        }
        let next = {
            let Some(mut entry) = self.refresh_tokens.get_mut(refresh_token) else {
                return Err(GrantError::RefreshTokenUnknown);
            };
            match entry.status {
                RefreshStatus::Revoked { at, .. } if now >= at => {
                    return Err(GrantError::RefreshTokenRevoked);
                }
                // A revocation that has not taken effect yet: the token works, unrotated.
                RefreshStatus::Revoked { .. } => {
                    entry.last_used_at = now;
                    Next::KeepSame
                }
                RefreshStatus::Used { first_used_at } => {
                    let grace_ends =
                        plus_seconds(first_used_at, settings.refresh_reuse_grace_seconds);
                    if settings.refresh_reuse_grace_seconds > 0 && now <= grace_ends {
                        entry.last_used_at = now;
                        Next::MintNew
                    } else {
                        drop(entry);
                        if settings.revoke_grant_on_reuse {
                            self.revoke_grant(record.grant_id, now);
                        }
                        return Err(GrantError::RefreshTokenReused);
                    }
                }
                RefreshStatus::Active => {
                    entry.last_used_at = now;
                    if revocation_pending {
                        Next::KeepSame
                    } else if settings.old_refresh_token_stays_valid {
                        Next::MintNew
                    } else if settings.rotate_refresh_tokens {
                        entry.status = RefreshStatus::Used { first_used_at: now };
                        Next::MintNew
                    } else {
                        Next::KeepSame
                    }
                }
            }
        };

        let (parent, answer_refresh_token) = match next {
            Next::MintNew => {
                let fresh = self.insert_refresh_token(profile, record.grant_id, now);
                (fresh.clone(), Some(fresh))
            }
            Next::KeepSame => {
                let same = refresh_token.to_string();
                let answer = (!settings.omit_refresh_token_on_refresh).then(|| same.clone());
                (same, answer)
            }
        };
        let access_token = self.insert_access_token(
            profile,
            record.grant_id,
            Some(parent),
            now,
            &settings,
            &scope,
        );
        let refresh_token_expires_in = answer_refresh_token
            .as_ref()
            .and_then(|_| refresh_token_remaining_seconds(&settings, grant.created_at, now));
        Ok(IssuedTokens {
            access_token,
            refresh_token: answer_refresh_token,
            expires_in: settings.access_token_ttl_seconds,
            refresh_token_expires_in,
            scope,
            user: grant.user,
        })
    }

    // ----- protected API ------------------------------------------------------------------

    pub fn check_access_token(
        &self,
        profile: Profile,
        token: &str,
    ) -> Result<TokenOwner, AccessRejection> {
        let now = self.clock.now_ms();
        let Some(record) = self.access_tokens.get(token).map(|r| r.clone()) else {
            return Err(AccessRejection::Unknown);
        };
        let Some(grant) = self.grants.get(&record.grant_id).map(|g| g.clone()) else {
            return Err(AccessRejection::Unknown);
        };
        if grant.profile != profile {
            return Err(AccessRejection::Unknown);
        }
        // Where revocation spares access tokens (Microsoft), only the token's own revocation
        // ends it before it expires.
        let cascaded = !self.settings(profile).revocation_spares_access_tokens
            && (grant.revoked(now) || self.parent_revoked(&record, now));
        if record.revoked_at.is_some_and(|at| now >= at) || cascaded {
            return Err(AccessRejection::Revoked);
        }
        if now >= record.expires_at {
            return Err(AccessRejection::Expired);
        }
        if now < record.active_from {
            return Err(AccessRejection::NotYetActive);
        }
        Ok(TokenOwner {
            user: grant.user,
            client_id: grant.client_id,
            scope: record.scope,
        })
    }

    fn parent_revoked(&self, record: &AccessTokenRecord, now: Millis) -> bool {
        record.parent_refresh_token.as_deref().is_some_and(|rt| {
            self.refresh_tokens.get(rt).is_some_and(
                |r| matches!(r.status, RefreshStatus::Revoked { at, cascades: true } if now >= at),
            )
        })
    }

    // ----- revocation ---------------------------------------------------------------------

    /// Revokes `token` with the cascade of `profile`:
    /// - Adobe Sign and Box: either token kills the whole grant (Adobe documents both
    ///   directions; for Box the cascade is unconfirmed and the sandbox chooses the strict one).
    /// - Salesforce: an access token alone; a refresh token, the access tokens minted with it,
    ///   and its grant's place under the user's cap.
    /// - generic and Microsoft (RFC 7009): an access token alone; a refresh token kills the grant.
    ///
    /// With `revocationMode: refreshOnly` every profile revokes the presented token alone
    /// (HubSpot: access tokens minted with a revoked refresh token live on). The modes `none` and
    /// `fakeSuccess` never get here: the endpoint answers without revoking. With a
    /// `revocationDelaySeconds` the revocation takes effect that much later.
    pub fn revoke(&self, profile: Profile, token: &str) -> RevokeOutcome {
        self.revoke_as(profile, token, false)
    }

    /// [`Self::revoke`] of a token that authenticated the revocation call by itself (its
    /// `Bearer`): an access token ends its grant too, as Dropbox's `token/revoke` ends the
    /// refresh token and every access token minted from it.
    pub fn revoke_bearer(&self, profile: Profile, token: &str) -> RevokeOutcome {
        self.revoke_as(profile, token, true)
    }

    fn revoke_as(&self, profile: Profile, token: &str, bearer: bool) -> RevokeOutcome {
        let now = self.clock.now_ms();
        let settings = self.settings(profile);
        let effective_at = plus_seconds(now, settings.revocation_delay_seconds);
        let refresh_only = settings.revocation_mode == RevocationMode::RefreshOnly;
        if let Some(record) = self.access_tokens.get(token).map(|r| r.clone()) {
            let Some(grant) = self.grants.get(&record.grant_id).map(|g| g.clone()) else {
                return RevokeOutcome::Unknown;
            };
            if grant.profile != profile {
                return RevokeOutcome::Unknown;
            }
            // Where revocation spares access tokens (Microsoft), one outlives its grant until it
            // is revoked itself.
            let cascaded = !settings.revocation_spares_access_tokens
                && (grant.revoked(now) || self.parent_revoked(&record, now));
            if record.revoked_at.is_some_and(|at| now >= at) || cascaded || now >= record.expires_at
            {
                return RevokeOutcome::AlreadyDead;
            }
            if !refresh_only && (bearer || matches!(profile, Profile::AdobeSign | Profile::Box)) {
                self.revoke_grant(record.grant_id, effective_at);
            }
            // Itself too: where revocation spares access tokens, the grant's end alone would
            // leave this one working.
            if let Some(mut entry) = self.access_tokens.get_mut(token) {
                entry.revoked_at = Some(earliest(entry.revoked_at, effective_at));
            }
            return RevokeOutcome::Revoked;
        }
        if let Some(record) = self.refresh_tokens.get(token).map(|r| r.clone()) {
            let Some(grant) = self.grants.get(&record.grant_id).map(|g| g.clone()) else {
                return RevokeOutcome::Unknown;
            };
            if grant.profile != profile {
                return RevokeOutcome::Unknown;
            }
            let used_outside_grace = matches!(record.status, RefreshStatus::Used { first_used_at }
                if now > plus_seconds(first_used_at, settings.refresh_reuse_grace_seconds));
            if grant.revoked(now)
                || record.status.revoked(now)
                || used_outside_grace
                || refresh_token_expired(&record, &grant, &settings, now)
            {
                return RevokeOutcome::AlreadyDead;
            }
            if refresh_only || profile == Profile::Salesforce {
                if let Some(mut entry) = self.refresh_tokens.get_mut(token) {
                    let at = match entry.status {
                        RefreshStatus::Revoked { at, .. } => earliest(Some(at), effective_at),
                        _ => effective_at,
                    };
                    entry.status = RefreshStatus::Revoked {
                        at,
                        cascades: !refresh_only,
                    };
                }
                // At Salesforce a grant is its refresh token: revoked, it no longer counts
                // against the user's five (the cap counted it on, and a re-authentication that
                // revoked the grant it replaced still evicted the user's other instance).
                if profile == Profile::Salesforce && !refresh_only {
                    self.revoke_grant(record.grant_id, effective_at);
                }
            } else {
                self.revoke_grant(record.grant_id, effective_at);
            }
            return RevokeOutcome::Revoked;
        }
        RevokeOutcome::Unknown
    }

    /// Revokes a grant as of `at`; an earlier pending revocation keeps its time.
    fn revoke_grant(&self, grant_id: u64, at: Millis) {
        if let Some(mut grant) = self.grants.get_mut(&grant_id) {
            grant.revoked_at = Some(earliest(grant.revoked_at, at));
        }
    }

    /// Keeps at most `cap` live grants of `user` for `client_id` at `profile`: the oldest go,
    /// silently, as Google, Salesforce and Zoom evict them.
    fn evict_oldest_grants(
        &self,
        profile: Profile,
        user: &str,
        client_id: &str,
        cap: u32,
        now: Millis,
    ) {
        let mut live: Vec<u64> = self
            .grants
            .iter()
            .filter(|g| {
                g.profile == profile
                    && g.user == user
                    && g.client_id == client_id
                    && !g.revoked(now)
            })
            .map(|g| *g.key())
            .collect();
        live.sort_unstable();
        let excess = live.len().saturating_sub(cap as usize);
        for grant_id in live.into_iter().take(excess) {
            self.revoke_grant(grant_id, now);
        }
    }

    /// The user revokes the app at the provider: every grant of `user`, in every profile, each
    /// after its profile's `revocationDelaySeconds`.
    pub fn revoke_user(&self, user: &str) -> usize {
        let now = self.clock.now_ms();
        let delays: Vec<u64> = Profile::ALL
            .iter()
            .map(|p| self.settings(*p).revocation_delay_seconds)
            .collect();
        let mut revoked = 0;
        for mut grant in self.grants.iter_mut() {
            if grant.user == user && grant.revoked_at.is_none() {
                let delay = delays[grant.profile.index()];
                grant.revoked_at = Some(plus_seconds(now, delay));
                revoked += 1;
            }
        }
        revoked
    }

    /// The tenant a grant's user belongs to, for routing data: stable per user name.
    pub fn tenant_of(user: &str) -> String {
        let digest = sha2::Sha256::digest(user.as_bytes());
        let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        format!("t-{hex}")
    }

    /// Drops records that are dead for longer than a day of sandbox time, so a long benchmark
    /// does not grow memory without bound. Grants are kept: they are few and tokens name them.
    pub fn purge(&self) {
        let now = self.clock.now_ms();
        let retention = DEAD_RECORD_RETENTION_SECONDS;
        self.codes
            .retain(|_, c| now < plus_seconds(c.expires_at, retention));
        self.access_tokens
            .retain(|_, t| now < plus_seconds(t.expires_at, retention));
        // A used refresh token is remembered while its grant can still be refreshed (it is not
        // revoked, and one of its refresh tokens is alive): presented again it must still be
        // known as reused (and kill the grant where the profile says so), not be "unknown"
        // because the clock was moved on. Otherwise a week after its first use.
        let grants: std::collections::HashMap<u64, Grant> = self
            .grants
            .iter()
            .filter(|grant| !grant.revoked(now))
            .map(|grant| (*grant.key(), grant.clone()))
            .collect();
        let settings = Profile::ALL.map(|profile| self.settings(profile));
        let refreshable: std::collections::HashSet<u64> = self
            .refresh_tokens
            .iter()
            .filter(|record| record.status == RefreshStatus::Active)
            .filter_map(|record| {
                let grant = grants.get(&record.grant_id)?;
                let settings = &settings[grant.profile.index()];
                (!refresh_token_expired(&record, grant, settings, now)).then_some(record.grant_id)
            })
            .collect();
        let week = retention.saturating_mul(7);
        let remembered = |grant_id: u64, first_used_at: Millis| -> bool {
            refreshable.contains(&grant_id) || now < plus_seconds(first_used_at, week)
        };
        self.refresh_tokens.retain(|_, t| match t.status {
            RefreshStatus::Active => true,
            RefreshStatus::Used { first_used_at } => remembered(t.grant_id, first_used_at),
            RefreshStatus::Revoked { at, .. } => now < plus_seconds(at, retention),
        });
    }

    // ----- minting ------------------------------------------------------------------------

    fn insert_refresh_token(&self, profile: Profile, grant_id: u64, now: Millis) -> String {
        let token = random_token(profile, "rt");
        self.refresh_tokens.insert(
            token.clone(),
            RefreshTokenRecord {
                grant_id,
                last_used_at: now,
                status: RefreshStatus::Active,
            },
        );
        token
    }

    fn insert_access_token(
        &self,
        profile: Profile,
        grant_id: u64,
        parent_refresh_token: Option<String>,
        now: Millis,
        settings: &ProfileSettings,
        scope: &str,
    ) -> String {
        let token = random_token(profile, "at");
        self.access_tokens.insert(
            token.clone(),
            AccessTokenRecord {
                grant_id,
                parent_refresh_token,
                active_from: plus_seconds(now, settings.access_token_activation_delay_seconds),
                expires_at: plus_seconds(now, settings.access_token_ttl_seconds),
                revoked_at: None,
                scope: scope.to_string(),
            },
        );
        token
    }
}

fn refresh_token_expired(
    record: &RefreshTokenRecord,
    grant: &Grant,
    settings: &ProfileSettings,
    now: Millis,
) -> bool {
    let idle = settings.refresh_token_idle_ttl_seconds;
    let absolute = settings.refresh_token_absolute_ttl_seconds;
    (idle > 0 && now >= plus_seconds(record.last_used_at, idle))
        || (absolute > 0 && now >= plus_seconds(grant.created_at, absolute))
}

/// The earlier of a pending instant and a new one.
fn earliest(current: Option<Millis>, new: Millis) -> Millis {
    current.map_or(new, |current| current.min(new))
}

/// Seconds a refresh token used (or minted) at `now` has left under the profile's limits:
/// the idle window restarts now; the absolute one counts from the grant's creation. `None`
/// when neither limit is set.
fn refresh_token_remaining_seconds(
    settings: &ProfileSettings,
    grant_created_at: Millis,
    now: Millis,
) -> Option<u64> {
    let idle = (settings.refresh_token_idle_ttl_seconds > 0)
        .then_some(settings.refresh_token_idle_ttl_seconds);
    let absolute = (settings.refresh_token_absolute_ttl_seconds > 0).then(|| {
        let ends = plus_seconds(
            grant_created_at,
            settings.refresh_token_absolute_ttl_seconds,
        );
        u64::try_from(ends.saturating_sub(now) / 1000).unwrap_or(0)
    });
    match (idle, absolute) {
        (Some(idle), Some(absolute)) => Some(idle.min(absolute)),
        (one, other) => one.or(other),
    }
}

/// Whether a space-separated scope string contains `wanted`.
pub fn has_scope(scope: &str, wanted: &str) -> bool {
    scope.split_whitespace().any(|s| s == wanted)
}

/// `{prefix}_{kind}_{192 random bits, base64url}`: opaque, unguessable, and telling which
/// profile minted it.
pub fn random_token(profile: Profile, kind: &str) -> String {
    format!("{}_{kind}_{}", profile.token_prefix(), random_string(24))
}

/// `len` random bytes, base64url without padding.
pub fn random_string(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    rand::rng().fill(&mut bytes[..]);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A used refresh token presented again weeks after its first use, while it and its grant
    /// could still be refreshed (a 60-day idle limit; the grant refreshed every 9 days), is still
    /// known as reused and kills the grant: the purger had forgotten it after a week ("not
    /// known") and the grant survived.
    #[test]
    fn the_purge_keeps_used_tokens_while_their_grant_can_be_refreshed() {
        let sandbox = Sandbox::new(None, None);
        sandbox
            .update_settings(Profile::Generic, |settings| {
                settings.rotate_refresh_tokens = true;
                settings.revoke_grant_on_reuse = true;
                settings.refresh_token_idle_ttl_seconds = 60 * 86_400;
                Ok(())
            })
            .unwrap();
        let code = sandbox.issue_code(CodeRequest {
            profile: Profile::Generic,
            user: "alice".into(),
            client_id: "app".into(),
            redirect_uri: "https://app.test/cb".into(),
            scope: "read".into(),
            challenge: None,
        });
        let first = sandbox
            .exchange_code(
                Profile::Generic,
                "app",
                &code,
                "https://app.test/cb",
                None,
                false,
            )
            .unwrap();
        let used = first.refresh_token.unwrap();
        let mut latest = used.clone();
        for _ in 0..3 {
            latest = sandbox
                .refresh(Profile::Generic, "app", &latest, None)
                .unwrap()
                .refresh_token
                .unwrap();
            sandbox.clock.advance_seconds(9 * 86_400);
            sandbox.purge();
        }
        assert_eq!(
            sandbox.refresh(Profile::Generic, "app", &used, None).err(),
            Some(GrantError::RefreshTokenReused)
        );
        assert_eq!(
            sandbox
                .refresh(Profile::Generic, "app", &latest, None)
                .err(),
            Some(GrantError::RefreshTokenRevoked),
            "the reuse killed the grant"
        );
    }
}
