//! Instances: one user's authenticated connection to one connector.
//!
//! This module owns what an instance *is* above the store: how its configuration splits into
//! plain keys (stored as JSON) and secret keys (sealed), how a token response becomes stored
//! token columns and a schedule, how an instance is shown (with secrets masked unless the caller
//! holds that instance's Element token), and the create / re-authenticate / import flows.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::app::{App, now_ms};
use crate::catalog::{Connector, RefreshStrategy};
use crate::crypto::{self, Binding};
use crate::http::error::ApiError;
use crate::oauth::{ClientCredentials, OAuthError, TokenSet};
use crate::secret::Secret;
use crate::store::{EncryptedInstanceFields, InstanceRow, TokenUpdate};

pub const ACCESS_TOKEN: &str = "oauth.user.token";
pub const REFRESH_TOKEN: &str = "oauth.user.refresh_token";
pub const REFRESH_TIME: &str = "oauth.user.refresh_time";
pub const REFRESH_INTERVAL: &str = "oauth.user.refresh_interval";
/// The access token's expiry as the service shows it (epoch milliseconds); given at an
/// import, in that or another shape ([`imported_expiry`]).
pub const ACCESS_EXPIRES_AT: &str = "oauth.user.token.expires_at";
/// The access token's remaining life in seconds, given at an import ([`imported_expiry`]).
pub const ACCESS_EXPIRES_IN: &str = "oauth.user.token.expires_in";
pub const REFRESH_URL: &str = "oauth.token.refresh_url";
pub const CALLBACK_URL: &str = "oauth.callback.url";
pub const API_KEY: &str = "oauth.api.key";
/// The scope the instance's authorization asked for, when not the connector's own: its
/// refreshes ask for it again where the connector names a scope on refresh (Microsoft's).
pub const SCOPE: &str = "oauth.scope";
pub const API_SECRET: &str = "oauth.api.secret";
pub const BASE_URL: &str = "base.url";
pub const MASK: &str = "********";
/// The instance configuration keys of its webhook: on when `"true"`, and where it goes.
pub const WEBHOOK_ENABLED: &str = "event.notification.enabled";
pub const WEBHOOK_URL: &str = "event.notification.callback.url";

/// Keys computed from the token columns: never stored in the plain configuration.
const DERIVED_KEYS: &[&str] = &[
    ACCESS_TOKEN,
    REFRESH_TOKEN,
    REFRESH_TIME,
    REFRESH_INTERVAL,
    ACCESS_EXPIRES_AT,
    ACCESS_EXPIRES_IN,
    "oauth.user.refresh_token.expires_at",
];

/// The keys an import may give the imported access token's expiry with ([`imported_expiry`]).
const EXPIRY_KEYS: &[&str] = &[
    ACCESS_EXPIRES_AT,
    ACCESS_EXPIRES_IN,
    REFRESH_TIME,
    REFRESH_INTERVAL,
];

/// Whether a configuration key holds a secret, stored sealed and shown masked: the client
/// secret, and keys that name a secret, a password, a credential or something private, or
/// whose last word is a token or a key (`api.token`, `bot_token`, `x-api-key`, `hmac_key`,
/// `OAuth.User.Token` in another case). Not `oauth.api.key` (the client id, shown: the
/// contract's key), nor a token-response field the service keeps (`oauth.provider.*`, sifted
/// of tokens and secrets already) for its last word alone (Stripe's publishable key). A
/// connector's inputs, kept in the open, may not be named so (`catalog::validate`).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if key == API_KEY {
        return false;
    }
    let last = key.rsplit(['.', '_', '-', ' ']).next().unwrap_or_default();
    let kept_from_token_response = key.starts_with("oauth.provider.");
    key == API_SECRET
        || ["secret", "password", "passwd", "credential", "private"]
            .iter()
            .any(|word| key.contains(word))
        || key.ends_with(".apikey.value")
        || (!kept_from_token_response && (last.ends_with("token") || last.ends_with("key")))
}

/// A configuration as given by a caller: string values (numbers and booleans are accepted and
/// turned into strings, as Cloud Elements does).
/// Configuration keys an instance takes at most.
pub const MAX_CONFIGURATION_KEYS: usize = 1000;
/// Bytes of configuration (keys and values, sealed ones included) a caller may make an instance
/// keep, PATCHes that merge keys in included (one instance of 60 MB made every read and write
/// of it take seconds, and held SQLite's one connection meanwhile). Real ones hold a few kB;
/// at 1 MiB, one organization's 150 instances made each list 151 MB, and ten lists at once
/// took the service to 2 GB.
pub const MAX_CONFIGURATION_BYTES: usize = 64 * 1024;

/// The size [`MAX_CONFIGURATION_BYTES`] bounds.
pub fn configuration_bytes<'a>(
    plain: &serde_json::Map<String, Value>,
    secret: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> usize {
    plain
        .iter()
        .map(|(key, value)| key.len() + value.as_str().map_or(0, str::len))
        .chain(
            secret
                .into_iter()
                .map(|(key, value)| key.len() + value.len()),
        )
        .sum()
}

/// The keys a configuration sets to null, which an update removes: not the tokens (a null one
/// is blank, the contract's way to drop it), the keys a GET shows but the service computes
/// (their times), nor the keys the service keeps (`base.url`, `oauth.token.refresh_url`, the
/// token responses' `oauth.provider.*`).
pub fn configuration_removals(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_object)
        .map(|object| {
            object
                .iter()
                .filter(|(key, value)| {
                    value.is_null()
                        && !DERIVED_KEYS.contains(&key.as_str())
                        && ![BASE_URL, REFRESH_URL].contains(&key.as_str())
                        && !key.starts_with("oauth.provider.")
                })
                .map(|(key, _)| key.clone())
                .collect()
        })
        .unwrap_or_default()
}

pub fn normalize_configuration(
    value: Option<&Value>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    let Some(value) = value else {
        return Ok(out);
    };
    let Some(object) = value.as_object() else {
        if value.is_null() {
            return Ok(out);
        }
        return Err(ApiError::bad_request(
            "`configuration` must be a JSON object",
        ));
    };
    // Each key is stored with the instance and read at every use of it. Counted as stored:
    // not the keys a GET adds that are never stored (the tokens, their times), nor nulls (a
    // configuration read and written back unchanged was refused near the limit).
    let stored = object
        .iter()
        .filter(|(key, value)| !value.is_null() && !DERIVED_KEYS.contains(&key.as_str()))
        .count();
    if stored > MAX_CONFIGURATION_KEYS {
        return Err(ApiError::bad_request(format!(
            "`configuration` has {stored} keys; an instance takes at most {MAX_CONFIGURATION_KEYS}"
        )));
    }
    for (key, value) in object {
        if key.trim().is_empty() {
            return Err(ApiError::bad_request(
                "A configuration key is empty: name each setting",
            ));
        }
        if key.len() > 200 {
            return Err(ApiError::bad_request(
                "A configuration key is longer than 200 characters",
            ));
        }
        let text = match value {
            Value::String(text) => text.clone(),
            // A whole number beyond what a double holds exactly arrives rounded: its digits
            // are lost before they could be stored.
            Value::Number(number)
                if number.is_f64()
                    && number.as_f64().is_some_and(|n| {
                        n.fract() == 0.0 && n.abs() >= 9_007_199_254_740_992.0
                    }) =>
            {
                return Err(ApiError::bad_request(format!(
                    "Configuration key `{key}` is a number too large to keep exactly: give it as a string"
                )));
            }
            Value::Number(number) => number.to_string(),
            Value::Bool(flag) => flag.to_string(),
            // A blank token (the contract's way to drop one); any other null removes its key
            // ([`configuration_removals`]), and is not stored as an empty text.
            Value::Null if key == ACCESS_TOKEN || key == REFRESH_TOKEN => String::new(),
            Value::Null => continue,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "Configuration key `{key}` must be a string, number or boolean"
                )));
            }
        };
        if text.len() > 64 * 1024 {
            return Err(ApiError::bad_request(format!(
                "The value of configuration key `{key}` is too long (64 KB at most)"
            )));
        }
        if key.contains('\0') || text.contains('\0') {
            return Err(ApiError::bad_request(
                "A configuration key or value holds the NUL character",
            ));
        }
        out.insert(key.clone(), text);
    }
    let size: usize = out.iter().map(|(key, value)| key.len() + value.len()).sum();
    if size > MAX_CONFIGURATION_BYTES {
        return Err(ApiError::bad_request(format!(
            "`configuration` holds {size} bytes; an instance takes at most {MAX_CONFIGURATION_BYTES}"
        )));
    }
    Ok(out)
}

pub(crate) fn binding(instance_id: i64, field: &'static str) -> Binding<'static> {
    Binding {
        table: "instances",
        row: instance_id,
        field,
    }
}

/// The decrypted secrets of an instance. Never serialized as a whole.
pub struct InstanceSecrets {
    pub element_token: Secret,
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    /// Secret configuration keys (`oauth.api.secret`, signature keys, …).
    pub secret_configuration: BTreeMap<String, String>,
}

impl InstanceSecrets {
    pub fn client_secret(&self) -> Secret {
        Secret::new(
            self.secret_configuration
                .get(API_SECRET)
                .cloned()
                .unwrap_or_default(),
        )
    }
}

pub fn open_secrets(app: &App, row: &InstanceRow) -> Result<InstanceSecrets, ApiError> {
    open_secrets_sealed(app, row).map_err(|error| {
        ApiError::conflict(format!(
            "The stored secrets of this instance do not open ({error}): give the service the master key they were sealed under (TOKENWARDEN_PREVIOUS_MASTER_KEYS), or delete the instance and create it again"
        ))
    })
}

fn open_secrets_sealed(
    app: &App,
    row: &InstanceRow,
) -> Result<InstanceSecrets, crate::crypto::CryptoError> {
    let keyring = &app.keyring;
    let element_token = keyring.open_secret(&row.token_enc, binding(row.id, "token"))?;
    let access_token = match &row.access_token_enc {
        Some(sealed) => Some(keyring.open_secret(sealed, binding(row.id, "access_token"))?),
        None => None,
    };
    let refresh_token = match &row.refresh_token_enc {
        Some(sealed) => Some(keyring.open_secret(sealed, binding(row.id, "refresh_token"))?),
        None => None,
    };
    let secret_configuration = match &row.client_secret_enc {
        Some(sealed) => {
            let text = keyring.open_secret(sealed, binding(row.id, "secret_configuration"))?;
            serde_json::from_str(text.expose()).unwrap_or_default()
        }
        None => BTreeMap::new(),
    };
    Ok(InstanceSecrets {
        element_token,
        access_token,
        refresh_token,
        secret_configuration,
    })
}

pub fn seal_secret_configuration(
    app: &App,
    instance_id: i64,
    secrets: &BTreeMap<String, String>,
) -> Option<Vec<u8>> {
    if secrets.is_empty() {
        return None;
    }
    let text = Secret::new(serde_json::to_string(secrets).unwrap_or_default());
    Some(
        app.keyring
            .seal_secret(&text, binding(instance_id, "secret_configuration")),
    )
}

pub fn plain_configuration(row: &InstanceRow) -> Map<String, Value> {
    serde_json::from_str(&row.configuration).unwrap_or_default()
}

/// Splits a caller's configuration into the plain part and the secret part. Token keys are
/// returned apart: they go to the token columns (import) or are ignored (blanking on re-auth).
pub struct SplitConfiguration {
    pub plain: BTreeMap<String, String>,
    pub secret: BTreeMap<String, String>,
    pub access_token: Option<String>,
    pub refresh_token: Option<String>,
    /// The keys that say when the imported access token expires ([`EXPIRY_KEYS`]), as given
    /// (blank ones left out): read by an import ([`imported_expiry`]), never stored.
    pub expiry: BTreeMap<String, String>,
}

pub fn split_configuration(configuration: BTreeMap<String, String>) -> SplitConfiguration {
    let mut split = SplitConfiguration {
        plain: BTreeMap::new(),
        secret: BTreeMap::new(),
        access_token: None,
        refresh_token: None,
        expiry: BTreeMap::new(),
    };
    for (key, value) in configuration {
        if EXPIRY_KEYS.contains(&key.as_str()) {
            if !value.trim().is_empty() {
                split.expiry.insert(key, value);
            }
        } else if key == ACCESS_TOKEN {
            split.access_token = Some(value).filter(|v| !v.is_empty());
        } else if key == REFRESH_TOKEN {
            split.refresh_token = Some(value).filter(|v| !v.is_empty());
        } else if DERIVED_KEYS.contains(&key.as_str()) {
            continue;
        } else if is_secret_key(&key) {
            split.secret.insert(key, value);
        } else {
            split.plain.insert(key, value);
        }
    }
    split
}

/// When an imported access token expires, as the import said ([`imported_expiry`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportedExpiry {
    /// The access token's expiry (epoch ms); `None` when the import did not say.
    pub access_expires_at: Option<i64>,
    /// The last refresh of the imported tokens (epoch ms), when the import gave it with the
    /// token's lifetime (Cloud Elements' `oauth.user.refresh_time` and
    /// `oauth.user.refresh_interval`): kept as the instance's, rather than the import's time.
    pub refreshed_at: Option<i64>,
    /// The key the expiry was read from, to name it in an answer.
    pub from_key: Option<&'static str>,
}

/// The shapes an instant is accepted in, for error messages.
const INSTANT_SHAPES: &str = "epoch milliseconds (as instances show it, e.g. \"1735689600000\"), epoch seconds (a number below 10^11), or an RFC 3339 / ISO 8601 date-time (\"2025-01-01T00:00:00Z\"; UTC when it has no offset)";

/// Reads an instant given at an import: epoch milliseconds (how the service shows
/// `oauth.user.token.expires_at` and `oauth.user.refresh_time`), epoch seconds (a number below
/// 10^11: milliseconds that small would be in March 1973), or an RFC 3339 / ISO 8601
/// date-time. Epoch ms; `None` when it is none of them, or before 1970.
fn parse_instant(text: &str) -> Option<i64> {
    use time::format_description::well_known::{Iso8601, Rfc3339};
    let text = text.trim();
    if let Some(number) = parse_non_negative(text) {
        return Some(if number < 1e11 {
            (number * 1000.0).round() as i64
        } else {
            number.round() as i64
        });
    }
    let at = time::OffsetDateTime::parse(text, &Rfc3339)
        .or_else(|_| time::OffsetDateTime::parse(text, &Iso8601::DEFAULT))
        .or_else(|_| {
            time::PrimitiveDateTime::parse(text, &Iso8601::DEFAULT).map(|at| at.assume_utc())
        })
        .ok()?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000)
        .ok()
        .filter(|ms| *ms >= 0)
}

/// A plain non-negative decimal number (digits, at most one point), below 10^15: what a
/// time or a lifetime is given as.
fn parse_non_negative(text: &str) -> Option<f64> {
    let plain = !text.is_empty()
        && text.chars().all(|c| c.is_ascii_digit() || c == '.')
        && text.chars().filter(|c| *c == '.').count() <= 1
        && text.chars().any(|c| c.is_ascii_digit());
    let number: f64 = text.parse().ok().filter(|_| plain)?;
    (number.is_finite() && number < 1e15).then_some(number)
}

/// The expiry of an imported access token, from the keys an import gives it with: `oauth.user.
/// token.expires_at` (an instant, see [`parse_instant`]), else `oauth.user.token.expires_in`
/// (seconds from `now`), else Cloud Elements' pair `oauth.user.refresh_time` (the last
/// refresh, an instant) + `oauth.user.refresh_interval` (the token's lifetime in seconds),
/// whose refresh time is kept as the instance's last refresh. Either of the pair alone says
/// nothing of the expiry and is left out, as before. Every key given must read (a value that
/// does not is a 400 naming it and the shapes taken, before anything is written), so that a
/// typo is not taken for "no expiry".
pub fn imported_expiry(
    keys: &BTreeMap<String, String>,
    now: i64,
) -> Result<ImportedExpiry, ApiError> {
    let instant = |key: &'static str| -> Result<Option<i64>, ApiError> {
        keys.get(key)
            .map(|text| {
                parse_instant(text).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "`{key}` is not a time this service reads: give {INSTANT_SHAPES}; nothing was written"
                    ))
                })
            })
            .transpose()
    };
    let seconds = |key: &'static str, what: &str| -> Result<Option<i64>, ApiError> {
        keys.get(key)
            .map(|text| {
                parse_non_negative(text.trim())
                    .map(|seconds| (seconds * 1000.0).round() as i64)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "`{key}` is {what} in seconds: a number, 0 or more (\"3600\"); nothing was written"
                        ))
                    })
            })
            .transpose()
    };
    let expires_at = instant(ACCESS_EXPIRES_AT)?;
    let expires_in = seconds(ACCESS_EXPIRES_IN, "the access token's remaining life")?;
    let refresh_time = instant(REFRESH_TIME)?;
    let interval = seconds(
        REFRESH_INTERVAL,
        "the access token's lifetime from `oauth.user.refresh_time`",
    )?;
    // The last refresh cannot be ahead of now (another system's clock): it is now at most.
    let pair = refresh_time
        .zip(interval)
        .map(|(refreshed, life)| (refreshed.min(now), refreshed.saturating_add(life)));
    let (access_expires_at, from_key) = match (expires_at, expires_in, pair) {
        (Some(at), _, _) => (Some(at), Some(ACCESS_EXPIRES_AT)),
        (None, Some(life), _) => (Some(now.saturating_add(life)), Some(ACCESS_EXPIRES_IN)),
        (None, None, Some((_, at))) => (Some(at), Some(REFRESH_INTERVAL)),
        (None, None, None) => (None, None),
    };
    Ok(ImportedExpiry {
        access_expires_at,
        refreshed_at: pair.map(|(refreshed, _)| refreshed),
        from_key,
    })
}

/// The shortest time between two scheduled refreshes of one instance. A buffer larger than the
/// token's whole lifetime (or a provider answering `expires_in: 0`) would otherwise make an
/// instance due again the moment it was refreshed, and the scheduler would refresh it in a loop.
pub const MIN_SCHEDULED_INTERVAL_MS: i64 = 1_000;

/// When the scheduler should next refresh an instance, from its connector's refresh settings;
/// `None` when it never needs to (no refresh token, or nothing that expires).
///
/// The earliest of:
/// - `before_expiry`: the access token's expiry minus `bufferSeconds`, but not before half of
///   the token's lifetime has passed (a buffer longer than the lifetime then refreshes at
///   half-life instead of right away);
/// - `keepAliveSeconds`: the last refresh plus that, so refresh tokens that die of inactivity
///   (Adobe Sign: 60 idle days) are used in time — whatever the strategy;
/// - a refresh token's own announced expiry (`refresh_token_expires_in`,
///   `x_refresh_token_expires_in`): a tenth of its remaining life ahead, at most a day ahead.
///
/// Never earlier than [`MIN_SCHEDULED_INTERVAL_MS`] after the last refresh.
pub fn next_due_at(
    connector: &Connector,
    has_refresh_token: bool,
    access_expires_at: Option<i64>,
    refresh_expires_at: Option<i64>,
    last_refresh_at: i64,
) -> Option<i64> {
    if !has_refresh_token {
        return None;
    }
    let refresh = &connector.refresh;
    let mut due: Vec<i64> = Vec::new();
    if refresh.strategy == RefreshStrategy::BeforeExpiry
        && let Some(expires) = access_expires_at
    {
        let half_life = last_refresh_at + (expires - last_refresh_at).max(0) / 2;
        due.push((expires - (refresh.buffer_seconds as i64) * 1000).max(half_life));
    }
    if let Some(keep_alive) = refresh.keep_alive_seconds {
        due.push(after_seconds(last_refresh_at, keep_alive));
    }
    // An expiry at or before the last refresh would leave no margin (a refresh every
    // `MIN_SCHEDULED_INTERVAL_MS`): it says nothing of when to refresh.
    if let Some(refresh_expires) = refresh_expires_at.filter(|at| *at > last_refresh_at) {
        let lifetime = (refresh_expires - last_refresh_at).max(0);
        let margin = (lifetime / 10).min(86_400_000);
        due.push(refresh_expires - margin);
    }
    due.into_iter()
        .min()
        .map(|at| at.max(last_refresh_at + MIN_SCHEDULED_INTERVAL_MS))
}

/// `at_ms` plus `seconds`, saturating: a provider's `expires_in` of 1e17 or an organization
/// connector's huge `keepAliveSeconds` must mean "far ahead", not overflow (a panic in debug
/// builds, a time in the past — a refresh every second — in release builds).
fn after_seconds(at_ms: i64, seconds: u64) -> i64 {
    at_ms.saturating_add(
        i64::try_from(seconds)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000),
    )
}

/// What a token response means for the stored columns and the configuration.
pub struct AppliedTokens {
    pub update: TokenUpdate,
    pub configuration: Map<String, Value>,
    pub configuration_changed: bool,
    /// Only the keys the token response set to new values, as a JSON object (`None` when there
    /// are none): what a refresh merges into the stored configuration, so that a change made
    /// to other keys while it was at the provider stays.
    pub configuration_patch: Option<String>,
}

/// The refresh token an instance held before a token response, with the expiry known of it
/// and when it was last used: kept when the response brings none.
#[derive(Clone, Copy)]
pub struct KeptRefreshToken<'a> {
    pub token: &'a Secret,
    pub expires_at: Option<i64>,
    pub last_refresh_at: Option<i64>,
}

/// The expiry of a refresh token kept by a refresh whose answer said nothing of it (Adobe
/// Sign's shape). Most such tokens die of inactivity: the life known of it counts again from
/// this use (kept as a fixed time, it drew the keep-alive ever closer, and once passed left
/// nothing on the schedule while the token lived on). Where the connector says its refresh
/// tokens die at a fixed time whatever their use, the time stays, until it has passed.
fn kept_expiry(connector: &Connector, kept: KeptRefreshToken<'_>, now: i64) -> Option<i64> {
    let at = kept.expires_at?;
    if connector
        .refresh
        .refresh_token_absolute_ttl_seconds
        .is_none()
        && let Some(last) = kept.last_refresh_at
        && at > last
    {
        return Some(now.saturating_add(at - last));
    }
    Some(at).filter(|at| *at > now)
}

/// The connector's inputs that `fields` (an authorization redirect's, a token response's)
/// name ([`crate::catalog::ConnectorInput::from_redirect`]), read inside a URL of the
/// connector's `baseUrl` shape or one of the input's `redirectShapes`: only the placeholder's
/// value is taken, never a host of its own.
pub fn inputs_named_by(
    app: &App,
    connector: &Connector,
    fields: &Map<String, Value>,
) -> Vec<(String, String)> {
    let mut named = Vec::new();
    // Most connectors have none: nothing to build on every token response.
    if !connector
        .inputs
        .values()
        .any(|input| input.from_redirect.is_some())
    {
        return named;
    }
    let sandbox = app.config.sandbox_url.trim_end_matches('/');
    let template = connector.base_url.replace("{sandbox}", sandbox);
    for (name, input) in &connector.inputs {
        let Some(url) = input
            .from_redirect
            .as_ref()
            .and_then(|field| fields.get(field))
            .and_then(Value::as_str)
        else {
            continue;
        };
        let shapes = input
            .redirect_shapes
            .iter()
            .map(|shape| shape.replace("{sandbox}", sandbox));
        if let Some(value) = std::iter::once(template.clone())
            .chain(shapes)
            .find_map(|shape| crate::catalog::input_in_url(&shape, name, url))
        {
            named.push((name.clone(), value));
        }
    }
    named
}

/// Turns a token response into the token columns of `instance_id`: the new refresh token, or
/// the old one kept when the response has none; the whole response sealed; routing fields into
/// the configuration (and `base.url` when the connector says which field sets it).
pub fn apply_token_set(
    app: &App,
    connector: &Connector,
    instance_id: i64,
    tokens: &TokenSet,
    previous: Option<KeptRefreshToken<'_>>,
    configuration: &Map<String, Value>,
    now: i64,
) -> AppliedTokens {
    let keyring = &app.keyring;
    let refresh_token = tokens
        .refresh_token
        .as_ref()
        .or(previous.as_ref().map(|kept| kept.token));
    let access_expires_at = tokens.expires_in.map(|seconds| after_seconds(now, seconds));
    let refresh_expires_at = match (tokens.refresh_token_expires_in, &tokens.refresh_token) {
        (Some(seconds), _) => Some(after_seconds(now, seconds)),
        // The answer kept the refresh token and said nothing of its life: what was known of it
        // still holds, so its keep-alive stays on the schedule.
        (None, None) => previous.and_then(|kept| kept_expiry(connector, kept, now)),
        (None, Some(_)) => None,
    };
    let mut new_configuration = configuration.clone();
    for field in &connector.oauth.token_response_fields {
        if let Some(value) = tokens.fields.get(field) {
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            new_configuration.insert(format!("oauth.provider.{field}"), Value::String(text));
        }
    }
    // Inputs the token response names: Adobe's `api_access_point` is "the base URI to be used
    // for subsequent calls (/oauth/v2/refresh and /oauth/v2/revoke)". An account off the
    // default shard, created from a code alone, refreshed and revoked at the default's host.
    // Only values the URLs take (checked like any input, and where no provider lives refused),
    // and only changes: a value read back lower-cased equals the one given.
    let changes: Vec<(String, String)> = inputs_named_by(app, connector, &tokens.fields)
        .into_iter()
        .filter(|(name, value)| {
            !new_configuration
                .get(name)
                .and_then(Value::as_str)
                .is_some_and(|stored| stored.eq_ignore_ascii_case(value))
        })
        .collect();
    if !changes.is_empty() {
        let mut named = new_configuration.clone();
        for (name, value) in changes {
            named.insert(name, Value::String(value));
        }
        if let Ok(endpoints) = app.endpoints(connector, &named) {
            // The refresh URL shown follows them.
            named.insert(REFRESH_URL.into(), Value::String(endpoints.refresh_url));
            new_configuration = named;
        }
    }
    if let Some(field) = &connector.oauth.base_url_from
        && let Some(Value::String(value)) = tokens.fields.get(field)
    {
        // A root the proxy's paths go under, ending in `/` like every other `base.url`
        // (Salesforce's `instance_url` comes without it).
        let mut base = value.clone();
        if !base.ends_with('/') {
            base.push('/');
        }
        if let Some(suffix) = &connector.oauth.base_url_suffix {
            base.push_str(suffix.trim_start_matches('/'));
            if !base.ends_with('/') {
                base.push('/');
            }
        }
        // Only a root the proxy can go under: a provider's odd value (a tenant id where a URL
        // was expected, a metadata address) would otherwise replace a working `base.url` at
        // a refresh and make every call answer 409. The instance keeps the one it has.
        match crate::proxy::ProxyBase::parse_named(&base, "`base.url`") {
            Ok(_) => {
                // As the proxy reads it (host lower-cased, a default port dropped, `\` read
                // as `/`): another tool reading the stored text must not find another host.
                let base = url::Url::parse(&base).map_or(base, String::from);
                new_configuration.insert(BASE_URL.to_string(), Value::String(base));
            }
            Err(why) => tracing::warn!(
                connector = %connector.key,
                field = %field,
                "the provider's routing value is not a URL calls can go to; base.url is kept: {why}"
            ),
        }
    }
    let configuration_changed = &new_configuration != configuration;
    let patch: Map<String, Value> = new_configuration
        .iter()
        .filter(|(key, value)| configuration.get(*key) != Some(*value))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let update = TokenUpdate {
        access_token_enc: Some(
            keyring.seal_secret(&tokens.access_token, binding(instance_id, "access_token")),
        ),
        refresh_token_enc: refresh_token
            .map(|token| keyring.seal_secret(token, binding(instance_id, "refresh_token"))),
        token_response_enc: Some(
            keyring.seal_secret(&tokens.raw, binding(instance_id, "token_response")),
        ),
        access_expires_at,
        refresh_expires_at,
        last_refresh_at: Some(now),
        next_due_at: next_due_at(
            connector,
            refresh_token.is_some(),
            access_expires_at,
            refresh_expires_at,
            now,
        ),
        configuration_json: configuration_changed
            .then(|| Value::Object(new_configuration.clone()).to_string()),
    };
    AppliedTokens {
        update,
        configuration: new_configuration,
        configuration_changed,
        configuration_patch: (!patch.is_empty()).then(|| Value::Object(patch).to_string()),
    }
}

/// Client credentials from an instance's configuration.
pub fn client_credentials(
    plain: &Map<String, Value>,
    secrets: &BTreeMap<String, String>,
) -> ClientCredentials {
    ClientCredentials {
        client_id: plain
            .get(API_KEY)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        client_secret: Secret::new(secrets.get(API_SECRET).cloned().unwrap_or_default()),
    }
}

/// An OAuth failure during a code exchange, as the caller sees it, always a 4xx (the
/// contract's promise; nothing was created either way): the provider's refusal is a 400 with
/// its words; a provider that failed, not because of the code, a 424 (Failed Dependency), with
/// a 503's `Retry-After`; a rate limit a 429 with its `Retry-After`.
pub fn exchange_error(error: &OAuthError) -> ApiError {
    use axum::http::StatusCode;
    let (status, message) = match error {
        // The provider took the code and answered, but not with tokens this service can read:
        // not the caller's fault, and the code is spent.
        OAuthError::Unparseable { status, .. } if (200..300).contains(status) => (
            StatusCode::FAILED_DEPENDENCY,
            "The provider's answer to the code exchange could not be read (no access token in it); get a new code once the connector is fixed",
        ),
        // `invalid_client`, `unauthorized_client`: the app's credentials or rights, not the
        // code, which the provider did not take (RFC 6749 §5.2 checks the client first).
        error @ OAuthError::Provider { .. } if error.is_client_rejected() => (
            StatusCode::BAD_REQUEST,
            "The provider refused the client's credentials, not the code: check oauth.api.key and oauth.api.secret, how the connector sends them (`oauth.clientAuth`: `client_secret_basic`, the default of an organization's connector, or `client_secret_post`, in the body, which most providers take) and that the app may use the authorization code grant, then present the code again",
        ),
        // The provider said it cannot answer now (with a 400, or Slack's 200 `ratelimited`):
        // the code was not taken.
        error @ OAuthError::Provider { .. } if error.is_rate_limit_code() => (
            StatusCode::TOO_MANY_REQUESTS,
            "The provider is rate limiting the token endpoint; present the code again shortly",
        ),
        error @ OAuthError::Provider { .. } if error.is_passing() => (
            StatusCode::FAILED_DEPENDENCY,
            "The provider's token endpoint failed for now; present the code again shortly",
        ),
        OAuthError::Provider { .. } | OAuthError::Unparseable { .. } => (
            StatusCode::BAD_REQUEST,
            "The provider refused the authorization code; get a new code and try again",
        ),
        OAuthError::RateLimited { .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            "The provider is rate limiting the token endpoint; try again later",
        ),
        OAuthError::Unavailable { .. } | OAuthError::Transport { .. } => (
            StatusCode::FAILED_DEPENDENCY,
            "The provider's token endpoint could not be reached or failed; try again later",
        ),
        OAuthError::Config { message } => {
            return ApiError::bad_request(format!(
                "The connector's OAuth settings are not usable: {message}"
            ));
        }
    };
    let mut api = ApiError::new(status, message).with_provider_message(error.provider_message());
    // The wait a 429 or a 503 announced (a maintenance window), an hour at most.
    api.retry_after = error
        .retry_after()
        .map(|seconds| seconds.min(crate::refresh::RETRY_AFTER_MAX_S));
    api
}

/// The instance as the API shows it. Secrets are masked unless `reveal` (the request carries
/// this instance's Element token).
pub fn view(
    app: &App,
    row: &InstanceRow,
    connector_name: Option<&str>,
    reveal: bool,
) -> Result<Value, ApiError> {
    let secrets = open_secrets(app, row)?;
    // A key stored in the open under older rules that now names a secret is masked too.
    let mut configuration = if reveal {
        plain_configuration(row)
    } else {
        masked_configuration(row)
    };
    let shown = |secret: Option<&Secret>| -> Value {
        match secret {
            Some(secret) if reveal => Value::String(secret.expose().to_string()),
            Some(_) => Value::String(MASK.to_string()),
            None => Value::Null,
        }
    };
    configuration.insert(ACCESS_TOKEN.into(), shown(secrets.access_token.as_ref()));
    configuration.insert(REFRESH_TOKEN.into(), shown(secrets.refresh_token.as_ref()));
    for (key, value) in &secrets.secret_configuration {
        let shown = if reveal {
            value.clone()
        } else {
            MASK.to_string()
        };
        configuration.insert(key.clone(), Value::String(shown));
    }
    configuration.insert(
        REFRESH_TIME.into(),
        row.last_refresh_at
            .map(|ms| Value::String(ms.to_string()))
            .unwrap_or(Value::Null),
    );
    // The access token's lifetime, from the stored times rather than stored itself: a value
    // that changes on every refresh (Microsoft's 60–90 minutes) would otherwise rewrite the
    // configuration each time, racing a caller's update of it.
    if let (Some(expires), Some(refreshed)) = (row.access_expires_at, row.last_refresh_at) {
        configuration.insert(
            REFRESH_INTERVAL.into(),
            Value::String(((expires - refreshed) / 1000).max(0).to_string()),
        );
    }
    // Every key of the contract is present, null when there is no value.
    for key in [
        REFRESH_URL,
        CALLBACK_URL,
        API_KEY,
        API_SECRET,
        BASE_URL,
        REFRESH_INTERVAL,
    ] {
        configuration.entry(key.to_string()).or_insert(Value::Null);
    }
    configuration.insert(
        "oauth.user.token.expires_at".into(),
        row.access_expires_at
            .map(|ms| Value::String(ms.to_string()))
            .unwrap_or(Value::Null),
    );
    let state = if row.is_disabled() {
        "disabled"
    } else if !row.is_valid() {
        "needs_reauthentication"
    } else if row.failing_since.is_some() {
        "refresh_failing"
    } else {
        "valid"
    };
    Ok(json!({
        "id": row.id,
        "name": row.name,
        "token": secrets.element_token.expose(),
        "element": {"key": row.element_key, "name": connector_name.unwrap_or(&row.element_key)},
        "valid": row.is_valid(),
        "disabled": row.is_disabled(),
        "state": state,
        "stateReason": state_reason(row, state, secrets.refresh_token.is_some()),
        "providerMessage": row.provider_message,
        // A failing streak of a valid instance: one whose grant is gone is not failing to
        // refresh any more (`stateReason` says why it stopped).
        "refreshFailingSince": row.failing_since.filter(|_| row.is_valid()).map(iso8601),
        "lastRefreshFailure": row.last_failure,
        "tags": row.tag_list(),
        "createdDate": iso8601(row.created_at),
        "updatedDate": iso8601(row.updated_at),
        "lastRefreshDate": row.last_refresh_at.map(iso8601),
        "accessTokenExpiresDate": row.access_expires_at.map(iso8601),
        "refreshTokenExpiresDate": row.refresh_expires_at.map(iso8601),
        "verification": row.verification.as_deref().and_then(|text| serde_json::from_str::<Value>(text).ok()),
        "configuration": configuration,
    }))
}

/// Why the instance is in its state: the stored reason, or, for a valid instance whose
/// access token expires with no refresh token to replace it (the provider gave none: an
/// OpenID server that drops `offline_access` without `prompt=consent`, Google without
/// `access_type=offline`, an import of an access token alone), the warning that it stops
/// working then. It was told only when it happened, an hour after the create that could have.
fn state_reason(row: &InstanceRow, state: &str, has_refresh_token: bool) -> Option<String> {
    if row.state_reason.is_some() || state != "valid" || has_refresh_token {
        return row.state_reason.clone();
    }
    row.access_expires_at.map(|expires_at| {
        let when = if expires_at <= crate::app::now_ms() {
            "stopped working when its access token expired"
        } else {
            "stops working when its access token expires"
        };
        format!(
            "No refresh token (the provider gave none, or an import brought none): the instance {when} ({}); ask for offline access (the connector's refresh-token scope, `prompt=consent`) and re-authenticate the instance",
            iso8601(expires_at)
        )
    })
}

/// [`view`], or [`damaged_view`] for an instance whose stored secrets do not open.
pub fn view_or_damaged(
    app: &App,
    row: &InstanceRow,
    connector_name: Option<&str>,
    reveal: bool,
) -> Value {
    view(app, row, connector_name, reveal).unwrap_or_else(|_| {
        // Said, once a minute at most: a replica missing a key answers every such read so.
        static LAST_SAID: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(i64::MIN);
        if crate::telemetry::at_most_every(&LAST_SAID, crate::app::system_now_ms(), 60_000) {
            tracing::warn!(
                instance_id = row.id,
                "an instance was read whose stored secrets do not open (altered, or sealed under a master key this process does not have): it shows `state: unreadable`"
            );
        }
        damaged_view(row, connector_name)
    })
}

/// An instance whose stored secrets do not open (a damaged row, or one sealed under a key this
/// process does not have), as a list shows it: no secrets, and a message saying so.
pub fn damaged_view(row: &InstanceRow, connector_name: Option<&str>) -> Value {
    tracing::debug!(
        instance_id = row.id,
        "the stored secrets of an instance do not open: altered, copied from another row, or sealed under a master key this process does not have"
    );
    json!({
        "id": row.id,
        "name": row.name,
        "token": Value::Null,
        "element": {"key": row.element_key, "name": connector_name.unwrap_or(&row.element_key)},
        "valid": row.is_valid(),
        "disabled": row.is_disabled(),
        "state": "unreadable",
        "stateReason": "The stored secrets of this instance do not open (altered, or sealed under a master key the service does not have)",
        "tags": row.tag_list(),
        "createdDate": iso8601(row.created_at),
        "updatedDate": iso8601(row.updated_at),
        "configuration": masked_configuration(row),
    })
}

/// The configuration stored in the open, with keys that name secrets (stored in the open under
/// older rules) masked.
fn masked_configuration(row: &InstanceRow) -> Map<String, Value> {
    let mut configuration = plain_configuration(row);
    for (key, value) in configuration.iter_mut() {
        if value.is_string() && is_secret_key(key) {
            *value = Value::String(MASK.to_string());
        }
    }
    configuration
}

pub fn iso8601(ms: i64) -> String {
    // Always three fractional digits (RFC 3339 allows any number; `time`'s own form drops
    // trailing zeros): `…28.9Z` beside `…28.902Z` sorted wrong as text.
    const FORMAT: &[time::format_description::FormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|at| at.format(FORMAT).ok())
        .unwrap_or_default()
}

/// Makes the connector's verification call with a fresh access token, and records the outcome
/// as JSON. It never fails the create: a grant for the wrong account is shown, not refused.
pub async fn verify(
    app: &App,
    connector: &Connector,
    configuration: &Map<String, Value>,
    access_token: &Secret,
) -> Option<String> {
    verification(app, connector, configuration, access_token)
        .await
        .map(|verified| verified.outcome.to_string())
}

/// A verification call's outcome.
pub struct Verification {
    /// As recorded on the instance.
    pub outcome: Value,
    /// The provider's words when it rejected the token, read as the proxy reads an API's
    /// answer (the connector's rejection statuses, body markers, Slack's `ok: false`).
    pub rejection: Option<String>,
}

/// [`verify`], with whether the provider rejected the token; `None` without a verification
/// call.
pub async fn verification(
    app: &App,
    connector: &Connector,
    configuration: &Map<String, Value>,
    access_token: &Secret,
) -> Option<Verification> {
    let spec = connector.verify.as_ref()?;
    let base_url = configuration
        .get(BASE_URL)
        .and_then(Value::as_str)
        .unwrap_or_default();
    let not_made = |why: String| Verification {
        outcome: json!({"ok": false, "path": spec.path, "message": format!("the verification call was not made: {why}")}),
        rejection: None,
    };
    // The path may name the connector's inputs (QuickBooks' `{realmId}`).
    let path = match app.fill(connector, &spec.path, configuration) {
        Ok(path) => path,
        Err(why) => return Some(not_made(why.to_string())),
    };
    let url = join_url(base_url, &path);
    if let Err(why) = url::Url::parse(&url)
        .map_err(|error| error.to_string())
        .and_then(|parsed| app.config.egress.check_url(&parsed))
    {
        return Some(not_made(why));
    }
    // Validated case-insensitively (`get` is GET): sent as the standard method, not a custom one.
    let method = reqwest::Method::from_bytes(spec.method.to_ascii_uppercase().as_bytes())
        .unwrap_or(reqwest::Method::GET);
    // The token as the proxy carries it (`proxy.tokenHeader`).
    let Some((header, value)) = connector.proxy.token_header(access_token.expose()) else {
        return Some(not_made(
            "the access token holds characters no HTTP header can carry".to_string(),
        ));
    };
    let started = now_ms();
    let outcome = app
        .http
        .request(method, &url)
        .header(header, value)
        .header("accept", "application/json")
        .send()
        .await;
    let verified = match outcome {
        Ok(response) => {
            let status = response.status().as_u16();
            let www = response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let success = (200..300).contains(&status);
            // A success needs no body, unless the connector reads rejections in one (Slack's
            // `ok: false`); a refusal's words are in its first bytes. Read no more: whoever
            // answers may send without end.
            let body = if success && connector.rejection.ok_false_errors.is_empty() {
                Vec::new()
            } else {
                let mut response = response;
                crate::oauth::read_capped(&mut response, VERIFY_BODY_BYTES)
                    .await
                    .map(|(body, _)| body)
                    .unwrap_or_default()
            };
            // (A 401 is a rejection whatever the connector lists: RFC 6750's answer to a
            // token refused.)
            let rejection =
                crate::oauth::api_rejection(&connector.rejection, status, www.as_deref(), &body)
                    .or_else(|| {
                        (status == 401).then(|| {
                            crate::oauth::describe_provider_body(status, www.as_deref(), &body)
                        })
                    })
                    .map(|words| crate::oauth::redact(&words, &[access_token.expose()]));
            let outcome = if success && rejection.is_none() {
                json!({"ok": true, "status": status, "path": spec.path, "checkedAt": iso8601(started)})
            } else {
                json!({"ok": false, "status": status, "path": spec.path, "checkedAt": iso8601(started),
                       "providerMessage": rejection.clone().unwrap_or_else(|| crate::oauth::redact(
                           &crate::oauth::describe_provider_body(status, www.as_deref(), &body),
                           &[access_token.expose()]))})
            };
            Verification { outcome, rejection }
        }
        Err(error) => Verification {
            outcome: json!({"ok": false, "path": spec.path, "checkedAt": iso8601(started),
                   "message": format!("the verification call failed: {}", crate::oauth::transport_message(&error))}),
            rejection: None,
        },
    };
    Some(verified)
}

/// How much of a refused verification call's answer is read for the provider's words.
const VERIFY_BODY_BYTES: usize = 64 * 1024;

/// `base` + `/` + `path`, with exactly one slash between them.
pub fn join_url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Re-seals every instance and organization secret, and every pending PKCE verifier, not
/// under the current key, in batches, while the service runs. A row written concurrently (a
/// refresh, a re-authentication, a configuration update) is read again and retried, so that
/// when this returns every value present at its start is under the current key and no
/// concurrent write was overwritten. A row whose values open with none of the keys (altered, or
/// sealed under a key no longer given) is left as it is and named in the answer: the rest is
/// re-sealed all the same (one damaged row stopped the whole rotation).
pub async fn reseal_all(app: &App, progress: &mut dyn FnMut(u64)) -> Result<Resealed, ApiError> {
    const ATTEMPTS: usize = 100;
    let keyring = &app.keyring;
    let mut changed = 0u64;
    let mut unreadable = Vec::new();
    let mut after_id = 0i64;
    loop {
        let batch = app.store.list_encrypted_batch(after_id, 200).await?;
        let Some(last) = batch.last() else {
            break;
        };
        after_id = last.id;
        let seen = batch.len() as u64;
        for fields in batch {
            let id = fields.id;
            let mut current = fields;
            let mut attempt = 0;
            // `None`: everything already under the current key.
            loop {
                let resealed = match reseal_instance_fields(app, &current) {
                    Ok(Some(resealed)) => resealed,
                    Ok(None) => break,
                    Err(_) => {
                        tracing::error!(
                            instance_id = id,
                            "key rotation: the instance's stored secrets open with none of the keys; left as they are"
                        );
                        unreadable.push(format!("instance {id}"));
                        break;
                    }
                };
                if app
                    .store
                    .reseal_encrypted_fields(&current, &resealed)
                    .await?
                {
                    changed += 1;
                    break;
                }
                attempt += 1;
                if attempt >= ATTEMPTS {
                    return Err(ApiError::internal(format!(
                        "instance {id} changed {ATTEMPTS} times while being re-encrypted; run `tokenwarden keys rotate` again"
                    )));
                }
                match app.store.get_encrypted_fields(id).await? {
                    Some(row) => current = row,
                    None => break, // Deleted meanwhile.
                }
            }
        }
        progress(seen);
    }
    for organization in app.store.list_organizations().await? {
        let mut sealed = organization.webhook_secret_enc.clone();
        for attempt in 0..ATTEMPTS {
            if keyring.is_current(&sealed) {
                break;
            }
            let binding = Binding {
                table: "organizations",
                row: organization.id,
                field: "webhook_secret",
            };
            let resealed = match keyring.open(&sealed, binding) {
                Ok(plain) => keyring.seal(&plain, binding),
                // Its key lost (the rotation was told so): a new secret, which the
                // organization's webhook receivers take from `GET /events/webhook-secret`. An
                // organization cannot be deleted, and its lost secret kept every start refused.
                Err(_)
                    if app.config.ignore_missing_keys
                        && keyring.missing_key_of(&sealed).is_some() =>
                {
                    tracing::warn!(
                        organization = organization.id,
                        "the organization's webhook secret was sealed under a lost key: a new one was made; its receivers must take it from GET /events/webhook-secret"
                    );
                    keyring.seal_secret(&crypto::new_platform_secret(), binding)
                }
                Err(_) => {
                    unreadable.push(format!("organization {}", organization.id));
                    break;
                }
            };
            if app
                .store
                .reseal_organization_webhook_secret(organization.id, &sealed, &resealed)
                .await?
            {
                changed += 1;
                break;
            }
            match app.store.get_organization(organization.id).await? {
                Some(row) => sealed = row.webhook_secret_enc,
                None => break,
            }
            if attempt + 1 == ATTEMPTS {
                return Err(ApiError::internal(format!(
                    "organization {} changed {ATTEMPTS} times while being re-encrypted",
                    organization.id
                )));
            }
        }
    }
    for column in [
        crate::store::OAuthStateSealed::Verifier,
        crate::store::OAuthStateSealed::ClientSecret,
    ] {
        changed += reseal_oauth_states(app, keyring, column).await?;
    }
    changed += reseal_pending_events(app, &mut unreadable).await?;
    // The key check: under the current key, so that the old one can go. (This process's keys
    // open it, as its start checked, unless it was told a key is lost: the check holds no
    // secret, and is sealed anew under the key that stays.)
    for (id, sealed) in app.store.key_checks().await? {
        let binding = crate::app::key_check_binding(id);
        if keyring.is_current(&sealed) {
            continue;
        }
        let plain = match keyring.open(&sealed, binding) {
            Ok(plain) => plain,
            Err(_)
                if app.config.ignore_missing_keys && keyring.missing_key_of(&sealed).is_some() =>
            {
                crate::app::KEY_CHECK_TEXT.to_vec()
            }
            Err(_) => continue,
        };
        if app
            .store
            .reseal_key_check(id, &keyring.seal(&plain, binding))
            .await?
        {
            changed += 1;
        }
    }
    Ok(Resealed {
        changed,
        unreadable,
    })
}

/// Key rotation of the pending authorizations' sealed `column`; how many were resealed.
async fn reseal_oauth_states(
    app: &App,
    keyring: &crypto::Keyring,
    column: crate::store::OAuthStateSealed,
) -> Result<u64, ApiError> {
    let mut changed = 0;
    for (state_hash, sealed) in app.store.list_oauth_state_sealed(column).await? {
        if keyring.is_current(&sealed) {
            continue;
        }
        let field = column.binding_field(&state_hash);
        let binding = Binding {
            table: "oauth_states",
            row: 0,
            field: &field,
        };
        let Ok(plain) = keyring.open(&sealed, binding) else {
            // A state sealed by an older version (bound differently): it expires on its own.
            continue;
        };
        let resealed = keyring.seal(&plain, binding);
        // Taken meanwhile (used or expired): nothing to do.
        if app
            .store
            .reseal_oauth_state(column, &state_hash, &sealed, &resealed)
            .await?
        {
            changed += 1;
        }
    }
    Ok(changed)
}

/// What a key rotation did.
pub struct Resealed {
    /// Rows re-sealed under the current key.
    pub changed: u64,
    /// Rows left as they were because no key opens them (`instance 42`, `organization 7`,
    /// `event 0c2f…`).
    pub unreadable: Vec<String>,
}

/// The signing keys of events still waiting to be delivered, re-sealed under the current key:
/// once the old key is dropped they could not be opened, and the deliveries would fail.
async fn reseal_pending_events(app: &App, unreadable: &mut Vec<String>) -> Result<u64, ApiError> {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    let keyring = &app.keyring;
    let mut changed = 0;
    for (id, payload) in app.store.list_pending_event_payloads().await? {
        let Ok(mut parsed) = serde_json::from_str::<Value>(&payload) else {
            continue;
        };
        let Some(sealed) = parsed
            .pointer("/delivery/key")
            .and_then(Value::as_str)
            .and_then(|text| STANDARD.decode(text).ok())
        else {
            continue;
        };
        if keyring.is_current(&sealed) {
            continue;
        }
        let binding = Binding {
            table: "events",
            row: 0,
            field: &id,
        };
        let Ok(plain) = keyring.open(&sealed, binding) else {
            // Named like the other rows no key opens: once the key it needs is dropped, the
            // webhook can never be signed.
            unreadable.push(format!("event {id}"));
            continue;
        };
        parsed["delivery"]["key"] = Value::String(STANDARD.encode(keyring.seal(&plain, binding)));
        // Delivered or retried meanwhile (the payload does not change then, the state does):
        // a payload that changed is left as it is.
        if app
            .store
            .reseal_event_payload(&id, &payload, &parsed.to_string())
            .await?
        {
            changed += 1;
        }
    }
    Ok(changed)
}

/// The instance's encrypted columns re-sealed under the current key, or `None` when they all
/// are already.
fn reseal_instance_fields(
    app: &App,
    fields: &EncryptedInstanceFields,
) -> Result<Option<EncryptedInstanceFields>, ApiError> {
    let keyring = &app.keyring;
    let all_current = keyring.is_current(&fields.token_enc)
        && [
            &fields.access_token_enc,
            &fields.refresh_token_enc,
            &fields.token_response_enc,
            &fields.client_secret_enc,
        ]
        .iter()
        .all(|value| value.as_ref().is_none_or(|v| keyring.is_current(v)));
    if all_current {
        return Ok(None);
    }
    let reseal = |value: &[u8], field: &'static str| -> Result<Vec<u8>, ApiError> {
        let plain = keyring.open(value, binding(fields.id, field))?;
        Ok(keyring.seal(&plain, binding(fields.id, field)))
    };
    let reseal_opt =
        |value: &Option<Vec<u8>>, field: &'static str| -> Result<Option<Vec<u8>>, ApiError> {
            value.as_deref().map(|v| reseal(v, field)).transpose()
        };
    Ok(Some(EncryptedInstanceFields {
        id: fields.id,
        organization_id: fields.organization_id,
        token_version: fields.token_version,
        token_enc: reseal(&fields.token_enc, "token")?,
        access_token_enc: reseal_opt(&fields.access_token_enc, "access_token")?,
        refresh_token_enc: reseal_opt(&fields.refresh_token_enc, "refresh_token")?,
        token_response_enc: reseal_opt(&fields.token_response_enc, "token_response")?,
        client_secret_enc: reseal_opt(&fields.client_secret_enc, "secret_configuration")?,
    }))
}

#[cfg(test)]
mod schedule_tests {
    //! The schedule formula on an injected clock: `last_refresh_at` is "now".
    use super::*;
    use crate::catalog::{RefreshSpec, RefreshStrategy};

    const NOW: i64 = 1_700_000_000_000;

    fn connector(refresh: RefreshSpec) -> Connector {
        let mut connector = crate::catalog::load_built_in()
            .unwrap()
            .into_iter()
            .find(|c| c.key == "sandbox-generic")
            .unwrap();
        connector.refresh = refresh;
        connector
    }

    fn spec(strategy: RefreshStrategy, buffer: u64, keep_alive: Option<u64>) -> RefreshSpec {
        RefreshSpec {
            strategy,
            buffer_seconds: buffer,
            keep_alive_seconds: keep_alive,
            ..RefreshSpec::default()
        }
    }

    #[test]
    fn before_expiry_is_expiry_minus_buffer() {
        let c = connector(spec(RefreshStrategy::BeforeExpiry, 300, None));
        assert_eq!(
            next_due_at(&c, true, Some(NOW + 3_600_000), None, NOW),
            Some(NOW + 3_300_000)
        );
    }

    #[test]
    fn nothing_is_due_without_a_refresh_token_or_an_expiry() {
        let c = connector(spec(RefreshStrategy::BeforeExpiry, 300, None));
        assert_eq!(
            next_due_at(&c, false, Some(NOW + 3_600_000), None, NOW),
            None
        );
        assert_eq!(next_due_at(&c, true, None, None, NOW), None);
        let on_401 = connector(spec(RefreshStrategy::On401, 300, None));
        assert_eq!(
            next_due_at(&on_401, true, Some(NOW + 3_600_000), None, NOW),
            None
        );
    }

    #[test]
    fn keep_alive_applies_whatever_the_strategy() {
        let c = connector(spec(RefreshStrategy::On401, 300, Some(50 * 86_400)));
        assert_eq!(
            next_due_at(&c, true, Some(NOW + 3_600_000), None, NOW),
            Some(NOW + 50 * 86_400_000)
        );
        // With before_expiry too, the earlier one wins.
        let c = connector(spec(RefreshStrategy::BeforeExpiry, 2, Some(2)));
        assert_eq!(
            next_due_at(&c, true, Some(NOW + 60_000), None, NOW),
            Some(NOW + 2_000)
        );
    }

    #[test]
    fn a_refresh_tokens_own_expiry_is_anticipated() {
        let c = connector(spec(RefreshStrategy::On401, 300, None));
        // 100 days of life: a day ahead (a tenth would be 10 days; capped at one).
        let expires = NOW + 100 * 86_400_000;
        assert_eq!(
            next_due_at(&c, true, None, Some(expires), NOW),
            Some(expires - 86_400_000)
        );
        // 100 s of life: a tenth ahead.
        assert_eq!(
            next_due_at(&c, true, None, Some(NOW + 100_000), NOW),
            Some(NOW + 90_000)
        );
    }

    #[test]
    fn a_buffer_longer_than_the_lifetime_never_makes_a_refresh_loop() {
        let c = connector(spec(RefreshStrategy::BeforeExpiry, 300, None));
        // A 60 s token with a 300 s buffer: at half-life, not at once.
        assert_eq!(
            next_due_at(&c, true, Some(NOW + 60_000), None, NOW),
            Some(NOW + 30_000)
        );
        // Already expired (expires_in 0): at least the minimum interval ahead.
        assert_eq!(
            next_due_at(&c, true, Some(NOW), None, NOW),
            Some(NOW + MIN_SCHEDULED_INTERVAL_MS)
        );
    }
}

#[cfg(test)]
mod tests {

    /// Times always carry three fractional digits, so that they sort as text.
    #[test]
    fn times_have_three_fractional_digits() {
        assert_eq!(iso8601(1_700_000_000_900), "2023-11-14T22:13:20.900Z");
        assert_eq!(iso8601(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
        assert_eq!(iso8601(1_700_000_000_902), "2023-11-14T22:13:20.902Z");
    }

    /// A code exchange the provider refuses for the client's credentials (`invalid_client`)
    /// names them, not the code: the code was not taken, and presenting it again with the
    /// right secret works.
    #[test]
    fn an_exchange_refused_for_the_client_names_its_credentials() {
        let refused = |error: &str| {
            exchange_error(&OAuthError::Provider {
                status: 401,
                error: error.to_string(),
                description: Some("client authentication failed".into()),
                permanent: false,
            })
        };
        for code in ["invalid_client", "unauthorized_client", "BAD_CLIENT_SECRET"] {
            let answer = refused(code);
            assert_eq!(answer.status.as_u16(), 400);
            assert!(
                answer.message.contains("oauth.api.secret"),
                "{}",
                answer.message
            );
            assert!(!answer.message.contains("new code"), "{}", answer.message);
        }
        let answer = refused("invalid_grant");
        assert!(
            answer.message.contains("get a new code"),
            "{}",
            answer.message
        );
        // A provider failing for now, with a 400 or Slack's 200: the code was not taken.
        for (code, status) in [("temporarily_unavailable", 424), ("ratelimited", 429)] {
            let answer = refused(code);
            assert_eq!(answer.status.as_u16(), status);
            assert!(answer.message.contains("again"), "{}", answer.message);
            assert!(!answer.message.contains("new code"), "{}", answer.message);
        }
    }
    use super::*;

    #[test]
    fn secret_keys_are_told_by_their_names() {
        for key in [
            "oauth.api.secret",
            "webhook.secret",
            "db.password",
            "api.token",
            "bot_token",
            "x-api-key",
            "apikey",
            "service.apikey.value",
            "OAuth.User.Token",
            "private.key",
            "access_key",
            "hmac_key",
            "signing_key",
            "privatekey",
            "private_key_pem",
            "oauth.provider.client_secret",
            "credentials",
            "event.notification.signature.key",
            "slack.accessToken",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in [
            API_KEY,
            BASE_URL,
            CALLBACK_URL,
            REFRESH_URL,
            REFRESH_TIME,
            REFRESH_INTERVAL,
            SCOPE,
            "oauth.user.token.expires_at",
            WEBHOOK_ENABLED,
            WEBHOOK_URL,
            "shard",
            "tenant",
            "oauth.provider.stripe_publishable_key",
            "oauth.provider.api_access_point",
        ] {
            assert!(!is_secret_key(key), "{key}");
        }
    }
}
