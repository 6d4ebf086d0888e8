//! `/instances`: create from a provider's code or from imported tokens, read, re-authenticate in
//! place (`PATCH`/`PUT` with `providerData.code`), merge or replace the configuration, enable and
//! disable, refresh and revoke now, delete.
//!
//! A failed exchange leaves the store as it was: the provider is asked first, and only its
//! success is written, in one statement.

use std::collections::{BTreeMap, HashMap};

use axum::Json as AxumJson;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::caller::Caller;
use super::error::{ApiError, ApiResult};
use super::json::{Json, Path, Query};
use crate::app::{App, SharedApp, now_ms};
use crate::catalog::Connector;
use crate::crypto::{self, Binding, hash_secret};
use crate::events;
use crate::instances::{
    self, API_KEY, BASE_URL, CALLBACK_URL, REFRESH_URL, SplitConfiguration, apply_token_set,
    client_credentials, normalize_configuration, open_secrets, plain_configuration,
    split_configuration,
};
use crate::oauth::TokenSet;
use crate::refresh::RefreshFailure;
use crate::secret::Secret;
use crate::store::{InstanceRow, Reauthentication, TokenUpdate};

/// The body of `POST`/`PATCH`/`PUT /instances…`: a JSON object (an array or a scalar is a 400,
/// not an empty update).
/// No `Debug`: it holds the authorization code and the caller's secrets.
#[derive(Default)]
pub struct InstanceBody {
    element: Option<ElementRef>,
    provider_data: Option<ProviderData>,
    configuration: Option<Value>,
    name: Option<String>,
    tags: Option<Vec<String>>,
    external_authentication: Option<String>,
    /// Shown in an instance; given, it must say what the instance is (enabling and disabling
    /// are `PUT`/`DELETE …/enabled`).
    disabled: Option<bool>,
    /// An `id` the body carries (a read written back): another instance's is refused, as the
    /// caller meant that one.
    id: Option<Value>,
    /// A `token` the body carries: another instance's Element token is refused like its `id`.
    token: Option<Value>,
}

/// The fields of an instance as it is shown, which a body may carry back (a read, edited and
/// written back) and which change nothing: read-only, or set elsewhere; and those of a Cloud
/// Elements instance.
pub(crate) const SHOWN_FIELDS: &[&str] = &[
    "id",
    "token",
    "valid",
    "state",
    "stateReason",
    "providerMessage",
    "createdDate",
    "updatedDate",
    "lastRefreshDate",
    "lastRefreshFailure",
    "refreshFailingSince",
    "refreshTokenExpiresDate",
    "accessTokenExpiresDate",
    "verification",
    "revocation",
    // Cloud Elements' instance model, which its bodies carry (its own create example sends
    // `retrieveObjectsAfterInstantiation`): features of its platform this service has not.
    "retrieveObjectsAfterInstantiation",
    "eventsEnabled",
    "traceLoggingEnabled",
    "cachingEnabled",
    "cacheTimeToLive",
    "maxCacheSize",
    "provisionInteractions",
    "elementId",
    "user",
    "authenticationType",
];

impl<'de> Deserialize<'de> for InstanceBody {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectOnly;
        impl<'de> serde::de::Visitor<'de> for ObjectOnly {
            type Value = InstanceBody;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<InstanceBody, A::Error> {
                let fields =
                    InstanceFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                // A field the body cannot mean (`provider_data`, a `code` beside `providerData`)
                // is refused: ignored, the update answered 200 having done nothing asked.
                if let Some(unknown) = fields
                    .other
                    .keys()
                    .find(|key| !SHOWN_FIELDS.contains(&key.as_str()))
                {
                    return Err(serde::de::Error::custom(format!(
                        "unknown field `{unknown}`: an instance body takes `element`, `providerData`, `configuration`, `name`, `tags` and `externalAuthentication` (and, unchanged, the read-only fields of an instance as shown)"
                    )));
                }
                // Cloud Elements' switches for features of its own platform, asked for: no
                // silent yes.
                let off = |value: &Value| match value {
                    Value::Null => true,
                    Value::Bool(on) => !on,
                    Value::String(text) => text.is_empty() || text.eq_ignore_ascii_case("false"),
                    Value::Number(number) => number.as_f64() == Some(0.0),
                    _ => false,
                };
                if let Some(asked) = ["eventsEnabled", "cachingEnabled", "traceLoggingEnabled"]
                    .into_iter()
                    .find(|key| fields.other.get(*key).is_some_and(|value| !off(value)))
                {
                    let instead = if asked == "eventsEnabled" {
                        " (webhooks of an instance's events: `event.notification.enabled` in the configuration)"
                    } else {
                        ""
                    };
                    return Err(serde::de::Error::custom(format!(
                        "`{asked}` asks for a Cloud Elements feature this service does not have{instead}; send false or leave it out"
                    )));
                }
                if let Some(mode) = &fields.external_authentication
                    && !mode.eq_ignore_ascii_case("initial")
                    && !mode.eq_ignore_ascii_case("none")
                {
                    return Err(serde::de::Error::custom(
                        "`externalAuthentication` is \"initial\" (tokens brought in, in the configuration) or \"none\"",
                    ));
                }
                // The redirect's fields are kept in the configuration, which PostgreSQL reads
                // as `jsonb`: a NUL there would fail every later commit of the instance.
                if fields.provider_data.as_ref().is_some_and(|data| {
                    data.redirect.iter().any(|(key, value)| {
                        key.contains('\0') || value.as_str().is_some_and(|v| v.contains('\0'))
                    })
                }) {
                    return Err(serde::de::Error::custom(
                        "a providerData field holds the NUL character",
                    ));
                }
                Ok(InstanceBody {
                    element: fields.element,
                    provider_data: fields.provider_data,
                    configuration: fields.configuration,
                    name: fields.name,
                    // A tag given twice is one tag.
                    tags: fields.tags.map(|mut tags| {
                        let mut seen = std::collections::HashSet::new();
                        tags.retain(|tag| seen.insert(tag.clone()));
                        tags
                    }),
                    external_authentication: fields.external_authentication,
                    disabled: fields.disabled,
                    id: fields.other.get("id").filter(|id| !id.is_null()).cloned(),
                    token: fields
                        .other
                        .get("token")
                        .filter(|token| !token.is_null())
                        .cloned(),
                })
            }
        }
        deserializer.deserialize_map(ObjectOnly)
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct InstanceFields {
    #[serde(default)]
    element: Option<ElementRef>,
    #[serde(default)]
    provider_data: Option<ProviderData>,
    #[serde(default)]
    configuration: Option<Value>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    /// `"initial"`: bring existing tokens in the configuration instead of a code.
    #[serde(default)]
    external_authentication: Option<String>,
    #[serde(default)]
    disabled: Option<bool>,
    /// Checked against [`SHOWN_FIELDS`].
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = r#"a connector's key: "box" or {"key": "box"}"#)]
enum ElementRef {
    Key { key: String },
    Plain(String),
}

impl ElementRef {
    fn key(&self) -> &str {
        match self {
            ElementRef::Key { key } | ElementRef::Plain(key) => key,
        }
    }
}

/// No `Debug`: it holds the authorization code.
#[derive(Deserialize, Default)]
struct ProviderData {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    /// Other parameters of the provider's redirect (Adobe's `api_access_point`, QuickBooks'
    /// `realmId`, a shop host): routing data, used like token-response fields.
    #[serde(flatten)]
    redirect: Map<String, Value>,
}

impl InstanceBody {
    /// `externalAuthentication: "initial"`.
    fn announces_tokens(&self) -> bool {
        self.external_authentication
            .as_deref()
            .is_some_and(|mode| mode.eq_ignore_ascii_case("initial"))
    }

    /// Whether the configuration has a token key.
    fn gives_token_keys(&self) -> bool {
        self.configuration
            .as_ref()
            .and_then(Value::as_object)
            .is_some_and(|configuration| {
                [instances::ACCESS_TOKEN, instances::REFRESH_TOKEN]
                    .iter()
                    .any(|key| configuration.contains_key(*key))
            })
    }

    /// The redirect's routing parameters (string values only).
    fn redirect_fields(&self) -> Map<String, Value> {
        self.provider_data
            .as_ref()
            .map(|data| {
                data.redirect
                    .iter()
                    .filter(|(_, value)| value.is_string())
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn code(&self) -> Option<Secret> {
        self.provider_data
            .as_ref()
            .and_then(|data| data.code.as_deref())
            .map(str::trim)
            .filter(|code| !code.is_empty())
            .map(Secret::new)
    }

    fn state(&self) -> Option<&str> {
        self.provider_data
            .as_ref()
            .and_then(|data| data.state.as_deref())
            .filter(|state| !state.is_empty())
    }
}

fn validate_tags(tags: &[String]) -> ApiResult<()> {
    if tags.len() > 50
        || tags
            .iter()
            .any(|tag| tag.is_empty() || tag.chars().count() > 100)
    {
        return Err(ApiError::bad_request(
            "`tags` takes at most 50 tags of 1 to 100 characters",
        ));
    }
    if tags.iter().any(|tag| tag.chars().any(char::is_control)) {
        return Err(ApiError::bad_request("A tag holds a control character"));
    }
    Ok(())
}

/// Checked before any provider call: a name the database cannot store must not cost the
/// caller an authorization code already exchanged.
fn validate_name(name: &str) -> ApiResult<()> {
    if name.chars().count() > 200 {
        return Err(ApiError::bad_request(
            "`name` is longer than 200 characters",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("`name` holds a control character"));
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/elements/api-v2/instances",
    operation_id = "instances_create",
    tag = "instances",
    summary = "Create an instance from a provider's code or imported tokens",
    request_body(content = crate::openapi::InstanceWrite, content_type = "application/json", description = "A code to exchange (`providerData.code`, with the `state` of oauth/url for PKCE), or tokens to import (`externalAuthentication: initial` with `oauth.user.token` / `oauth.user.refresh_token` in the configuration)", example = json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": "the code from the callback", "state": "the state from oauth/url"}, "configuration": {"oauth.api.key": "client id", "oauth.api.secret": "client secret", "oauth.callback.url": "https://app.example/callback"}, "name": "Alice's account", "tags": ["qa"]})),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The instance", body = crate::openapi::Instance),
        crate::openapi::PlatformErrors,
        crate::openapi::BodyErrors,
        crate::openapi::ExchangeErrors
    ),
)]
pub async fn create(
    State(app): State<SharedApp>,
    caller: Caller,
    Json(body): Json<InstanceBody>,
) -> ApiResult<(StatusCode, AxumJson<Value>)> {
    // A new instance is the organization's act: an Element token names an existing one only.
    caller.require_organization()?;
    let key = match &body.element {
        Some(element) => element.key().to_string(),
        None => {
            return Err(ApiError::bad_request(
                "`element.key` names the connector of the new instance",
            ));
        }
    };
    let connector = app
        .connector(caller.organization_id, &key)
        .await?
        .ok_or_else(|| ApiError::bad_request(format!("There is no connector `{key}`")))?;
    create_to_the_end(&app, &caller, connector, body).await
}

#[utoipa::path(
    post,
    path = "/elements/api-v2/elements/{key}/instances",
    operation_id = "instances_create_for_element",
    tag = "instances",
    summary = "Create an instance of this connector",
    request_body(content = crate::openapi::InstanceWrite, content_type = "application/json", description = "As for POST /instances, without `element`", example = json!({"providerData": {"code": "the code from the callback"}, "configuration": {"oauth.api.key": "client id", "oauth.api.secret": "client secret", "oauth.callback.url": "https://app.example/callback"}, "name": "Alice's account"})),
    params(("key" = String, Path, description = "the connector key")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The instance", body = crate::openapi::Instance),
        crate::openapi::PlatformErrors,
        crate::openapi::BodyErrors,
        crate::openapi::ExchangeErrors
    ),
)]
pub async fn create_for_element(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(key): Path<String>,
    Json(body): Json<InstanceBody>,
) -> ApiResult<(StatusCode, AxumJson<Value>)> {
    caller.require_organization()?;
    // The catalog's own `Arc` for a built-in connector (the creation tells it by that).
    let connector = app
        .connector(caller.organization_id, &key)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("There is no connector `{key}`")))?;
    if let Some(named) = body.element.as_ref().map(ElementRef::key)
        && named != key
    {
        return Err(ApiError::bad_request(format!(
            "The body's `element` is `{named}`, the path's connector `{key}`: leave `element` out, or POST /instances"
        )));
    }
    create_to_the_end(&app, &caller, connector, body).await
}

/// A creation runs in a task of its own, to its end: once the provider has exchanged the code
/// (single use) its tokens are stored, whether the caller waits or hangs up (cut between the
/// exchange and the insert, the grant lived on at the provider with nobody holding its tokens,
/// and the caller's retry found its code used).
async fn create_to_the_end(
    app: &SharedApp,
    caller: &Caller,
    connector: std::sync::Arc<Connector>,
    body: InstanceBody,
) -> ApiResult<(StatusCode, AxumJson<Value>)> {
    let (task_app, by) = (std::sync::Arc::clone(app), caller.clone());
    crate::refresh::spawn_to_the_end(
        app,
        in_this_request(async move { create_instance(&task_app, &by, &connector, body).await }),
    )
    .await
    .map_err(|error| ApiError::internal(format!("the creation stopped: {error}")))?
}

/// How long an exchanged authorization code is remembered (providers' codes live minutes).
const USED_CODE_MEMORY_MS: i64 = 60 * 60 * 1000;

/// The key under which an exchanged code is remembered (a hash: the code is a secret): the
/// code as the provider's token endpoint knows it, issued to one client. Not per organization:
/// another organization presenting it (copied, or a user's second account) would have the
/// first exchange's tokens revoked by the provider; it is refused instead, and sees nothing
/// of the instance the code made. (An organization's own connector, with another token
/// endpoint, claims a key of its own.)
fn code_key(token_url: &str, client_id: &str, code: &Secret) -> Vec<u8> {
    crypto::hash_secret(&format!(
        "oauth-code\n{token_url}\n{client_id}\n{}",
        code.expose()
    ))
    .to_vec()
}

/// A code exchanged already, refused as the provider would refuse it (`invalid_grant`),
/// without presenting it.
fn code_used_already() -> ApiError {
    ApiError::bad_request("The provider refused the authorization code; get a new code and try again")
        .with_provider_message(
            "invalid_grant: this authorization code was exchanged already, by an earlier request (a retry?); tokenwarden does not present a code twice, since a provider may then revoke the tokens of its first exchange",
        )
}

/// What an exchange or an import produced, before anything is stored.
struct Grant {
    tokens: TokenSet,
    verifier_used: bool,
    /// The scope the authorization asked for, when its state says: `Some(None)` for the
    /// connector's own scopes. `None` when nothing is known (no state, an import).
    scope: Option<Option<String>>,
    /// The redirect URI the code was exchanged with.
    callback: Option<String>,
    /// The key of the code this request claimed and exchanged: where it landed is recorded
    /// under it (with the instance's write, or [`code_spent`]) for a request that repeats the
    /// code.
    claimed: Option<Vec<u8>>,
    /// The client secret the authorization URL's request gave (`apiSecret`), used for the
    /// exchange because the configuration had none (or a re-authentication gave none): the
    /// instance keeps it.
    client_secret: Option<String>,
    /// What a re-authentication's exchange was made with (the connector and the instance's
    /// configuration merged with the update's), to revoke the grant if it is never stored.
    made_with: Option<GrantOrigin>,
}

/// See [`Grant::made_with`].
struct GrantOrigin {
    connector: std::sync::Arc<crate::catalog::Connector>,
    configuration: serde_json::Map<String, Value>,
    secret_configuration: BTreeMap<String, String>,
}

impl Grant {
    /// The secret configuration an instance is stored with: `secret`, and the client secret
    /// the exchange used, which the provider has just accepted.
    fn with_client_secret(&self, secret: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut secret = secret.clone();
        if let Some(client_secret) = &self.client_secret {
            secret.insert(instances::API_SECRET.to_string(), client_secret.clone());
        }
        secret
    }
}

/// What an exchange of a code gave.
enum Exchanged {
    /// The provider's grant, to be stored.
    Grant(Box<Grant>),
    /// The code was exchanged by an earlier request (a client's retry after a timeout, or the
    /// same request sent twice), which stored its grant on this instance; claimed at the time
    /// given (epoch ms).
    Landed { instance_id: i64, claimed_at: i64 },
}

/// How often a request repeating a code looks whether the first one has ended.
const REPEATED_CODE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// A request repeating a code another request claimed: waits for that one to end, for as
/// long as it may take (its exchange, the token's check and its write, each within the
/// provider timeout), and says where the code landed; `None` when its exchange failed and
/// gave the code (with its state) back, so that it may be presented. A code spent without an
/// instance, or whose first request never said (its process ended), is refused as the
/// provider would refuse it; so is one another organization claimed, at once (it neither
/// waits on that organization's exchange nor takes the code over when it fails).
async fn repeated(app: &App, caller: &Caller, code_key: &[u8]) -> ApiResult<Option<Exchanged>> {
    // The longest a request with a code may run: its exchange and the token's check, and for
    // a re-authentication the wait of its last attempt for a hold.
    let patience = 2 * app.config.provider_timeout
        + grant_in_hand_wait(app)
        + std::time::Duration::from_secs(5);
    let patience = i64::try_from(patience.as_millis()).unwrap_or(i64::MAX);
    loop {
        let now = now_ms();
        match app.store.used_code(code_key, now).await? {
            None => return Ok(None),
            Some((_, _, organization_id)) if organization_id != caller.organization_id => {
                return Err(code_used_already());
            }
            Some((expires_at, landed, _)) => {
                let claimed_at = expires_at - USED_CODE_MEMORY_MS;
                match landed {
                    Some(instance_id) if instance_id > 0 => {
                        return Ok(Some(Exchanged::Landed {
                            instance_id,
                            claimed_at,
                        }));
                    }
                    Some(_) => return Err(code_used_already()),
                    None if now > claimed_at.saturating_add(patience) => {
                        return Err(code_used_already());
                    }
                    None => tokio::time::sleep(REPEATED_CODE_POLL).await,
                }
            }
        }
    }
}

/// How long a re-authentication with its grant in hand (the code spent) waits for the
/// instance, held by a refresh or revocation elsewhere (its provider calls and its commit's
/// retries): given up, the grant would be lost and the code refused when sent again.
fn grant_in_hand_wait(app: &App) -> std::time::Duration {
    app.config.provider_timeout * 2
        + crate::refresh::COMMIT_RETRY_FOR
        + std::time::Duration::from_millis(crate::refresh::LEASE_MS as u64)
}

/// Records that the code this request claimed was spent without an instance (`instance_id`
/// 0), for the requests that repeat it; one that landed says so already (written with the
/// instance), and is not changed. A failure to record only makes them wait and refuse it.
async fn code_spent(app: &App, claimed: Option<&[u8]>) {
    if let Some(key) = claimed
        && let Err(error) = app.store.code_landed(key, 0).await
    {
        tracing::warn!(%error, "where an exchanged code landed could not be recorded");
    }
}

impl Grant {
    /// What the authorization said, kept in the configuration the instance is stored with:
    /// the scope asked for, and the redirect URI the code was issued for where the instance
    /// has none (a later re-authentication without a state needs it).
    fn keep_authorization(&self, plain: &mut Map<String, Value>) {
        if let Some(callback) = &self.callback
            && plain
                .get(CALLBACK_URL)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        {
            plain.insert(CALLBACK_URL.into(), Value::String(callback.clone()));
        }
        match &self.scope {
            Some(Some(scope)) => {
                plain.insert(instances::SCOPE.into(), Value::String(scope.clone()));
            }
            Some(None) => {
                plain.remove(instances::SCOPE);
            }
            None => {}
        }
    }
}

/// What the provider's redirect brought back to the caller (`providerData`).
#[derive(Clone, Copy)]
struct Redirect<'a> {
    code: &'a Secret,
    state: Option<&'a str>,
    /// The redirect's routing parameters (Adobe's `api_access_point`, QuickBooks' `realmId`).
    fields: &'a Map<String, Value>,
    /// Whether the client secret given to `oauth/url` with this authorization (`apiSecret`)
    /// serves the exchange before the configuration's: a re-authentication whose request
    /// gives no secret (the user rotated it at the provider and began a new authorization
    /// with the new one; the instance's is the old one).
    kept_secret_first: bool,
}

/// Whether `value`, the redirect's `field` that sets `base.url` (`oauth.baseUrlFrom`), is on
/// the origin (scheme, host, port) of the connector's `baseUrl`, or of one of the shapes an input taken from that
/// field has (`redirectShapes`: Adobe's `api.{shard}.echosign.com`), filled in with
/// `plain`.
fn redirect_base_on_a_known_host(
    app: &App,
    connector: &Connector,
    plain: &Map<String, Value>,
    field: &str,
    value: &Value,
) -> bool {
    // Scheme, host and port.
    let origin = |url: &str| {
        url::Url::parse(url.trim())
            .ok()
            .map(|url| url.origin())
            .filter(url::Origin::is_tuple)
    };
    // And a root the proxy can go under (no user info, query or fragment): another would be
    // stored, and every call answer 409.
    let Some(given) = value
        .as_str()
        .filter(|url| crate::proxy::ProxyBase::parse_named(url.trim(), "`base.url`").is_ok())
        .and_then(origin)
    else {
        return false;
    };
    let shapes = connector
        .inputs
        .values()
        .filter(|input| input.from_redirect.as_deref() == Some(field))
        .flat_map(|input| input.redirect_shapes.iter());
    std::iter::once(&connector.base_url)
        .chain(shapes)
        .filter_map(|template| app.fill(connector, template, plain).ok())
        .any(|known| origin(&known).as_ref() == Some(&given))
}

/// RFC 9207: a redirect's `iss` (given beside the code, `providerData.iss`) must name the
/// connector's authorization server when the connector names its issuer (`oauth.issuer`,
/// its inputs filled in): a code another server issued is not presented to this one's token
/// endpoint. Without an issuer on the connector, or without `iss`, nothing is checked.
fn check_issuer(
    app: &App,
    connector: &Connector,
    plain: &Map<String, Value>,
    fields: &Map<String, Value>,
) -> ApiResult<()> {
    let (Some(expected), Some(given)) = (connector.oauth.issuer.as_deref(), fields.get("iss"))
    else {
        return Ok(());
    };
    let expected = app
        .fill(connector, expected, plain)
        .map_err(|error| ApiError::bad_request(format!("Connector input missing: {error}")))?;
    let matches = given.as_str().is_some_and(|given| given == expected);
    if matches {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "The authorization response's `iss` is not this connector's authorization server ({expected}): the code was not presented (RFC 9207; begin the authorization again)"
    )))
}

/// Exchanges a code, or says where an earlier request that exchanged it landed (waiting for
/// it while it runs). Two requests never present a code at once, and a code whose exchange
/// gave tokens is never presented again; one whose exchange failed may be (the provider
/// judges it).
async fn exchange(
    app: &App,
    caller: &Caller,
    connector: &Connector,
    plain: &Map<String, Value>,
    secrets: &BTreeMap<String, String>,
    redirect: Redirect<'_>,
) -> ApiResult<Exchanged> {
    // An earlier request's exchange failed and gave the code back while this one waited: it
    // goes again (a few times at most: each turn waited for another request's whole exchange).
    for _ in 0..3 {
        if let Some(exchanged) =
            exchange_once(app, caller, connector, plain, secrets, redirect).await?
        {
            return Ok(exchanged);
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Earlier requests with this code failed at the provider one after another while this one waited: try again",
    ))
}

/// One turn of [`exchange`]: `None` when an earlier request holding the code gave it back.
async fn exchange_once(
    app: &App,
    caller: &Caller,
    connector: &Connector,
    plain: &Map<String, Value>,
    secrets: &BTreeMap<String, String>,
    redirect: Redirect<'_>,
) -> ApiResult<Option<Exchanged>> {
    let credentials = client_credentials(plain, secrets);
    if credentials.client_id.is_empty() {
        return Err(ApiError::bad_request(
            "`configuration.oauth.api.key` (the OAuth client id) is required",
        ));
    }
    check_issuer(app, connector, plain, redirect.fields)?;
    // The code is claimed before its state (or pending PKCE authorization) is taken: of the
    // requests that carry one code at once (the same request sent twice, a retry while the
    // first waits on the provider), one goes on and the others wait for it. Presented twice,
    // a code may have the tokens of its first exchange revoked (RFC 6749 §4.1.2); taken
    // second, a state was gone ("unknown state") or a PKCE code went without its verifier
    // and was burnt at the provider.
    let (endpoints, spec) = app
        .oauth_settings(connector, plain)
        .map_err(|error| ApiError::bad_request(format!("Connector input missing: {error}")))?;
    let code_key = code_key(&endpoints.token_url, &credentials.client_id, redirect.code);
    if !app
        .store
        .claim_code(
            &code_key,
            caller.organization_id,
            now_ms() + USED_CODE_MEMORY_MS,
        )
        .await?
    {
        return repeated(app, caller, &code_key).await;
    }
    let mut spent = false;
    let exchanged = exchange_claimed(
        app,
        caller,
        connector,
        plain,
        // An empty secret given is a public client's: only one left out is looked for (or, by
        // a re-authentication, one its request did not give).
        (
            &credentials,
            redirect.kept_secret_first || !secrets.contains_key(instances::API_SECRET),
            &endpoints,
            &spec,
        ),
        redirect,
        &mut spent,
    )
    .await;
    match exchanged {
        Ok(mut grant) => {
            grant.claimed = Some(code_key);
            Ok(Some(Exchanged::Grant(Box::new(grant))))
        }
        // Not exchanged: unless the provider took the code, it may be presented again, by this
        // caller or a request waiting on it (its state was given back first).
        Err(error) => {
            if spent {
                code_spent(app, Some(&code_key)).await;
            } else {
                let _ = app.store.release_code(&code_key, None).await;
            }
            Err(error)
        }
    }
}

/// The exchange of a code this request claimed: `spent` is set when it failed with the code
/// taken by the provider.
async fn exchange_claimed(
    app: &App,
    caller: &Caller,
    connector: &Connector,
    plain: &Map<String, Value>,
    (credentials, secret_left_out, endpoints, spec): (
        &crate::oauth::ClientCredentials,
        bool,
        &crate::oauth::Endpoints,
        &crate::catalog::OAuthSpec,
    ),
    redirect: Redirect<'_>,
    spent: &mut bool,
) -> ApiResult<Grant> {
    let Redirect {
        code,
        state,
        fields: redirect_fields,
        ..
    } = redirect;
    let stored_callback = plain
        .get(CALLBACK_URL)
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty());
    let mut verifier: Option<Secret> = None;
    let mut taken_state = None;
    // A pending authorization read for the client secret it keeps (a code without its state).
    let mut peeked_state: Option<crate::store::OAuthStateRow> = None;
    if let Some(state) = state {
        // A state is single use: one that was never issued to this organization for this
        // connector, has expired, or was used already is refused (CSRF, replayed codes).
        let state_hash = super::elements::state_key(caller.organization_id, state);
        let unknown = || {
            ApiError::bad_request(format!(
                "`providerData.state` is unknown, expired or already used: get a new authorization URL from GET /elements/{}/oauth/url",
                connector.key
            ))
        };
        let row = match app.store.take_oauth_state(&state_hash, now_ms()).await? {
            Some(row)
                if row.organization_id == caller.organization_id
                    && row.element_key == connector.key =>
            {
                row
            }
            Some(theirs) => {
                // Not this caller's: put it back untouched for its owner.
                let _ = app.store.insert_oauth_state(&theirs).await;
                return Err(unknown());
            }
            None => return Err(unknown()),
        };
        taken_state = Some(row);
    } else if !connector.oauth.pkce && secret_left_out {
        // A code without its state (the articles' body), and no client secret of the
        // request's own: the newest authorization this organization began for the connector,
        // with this client id and redirect URI, that was given a secret gives it (a secret
        // rotated at the provider). Read, not taken: the secret is the app's, not single use,
        // and the state stays for a request that presents it. With none, the configuration's
        // serves, as before.
        peeked_state = app
            .store
            .newest_kept_secret_state(
                caller.organization_id,
                &connector.key,
                &credentials.client_id,
                stored_callback,
                now_ms(),
            )
            .await?;
    } else if connector.oauth.pkce {
        // A PKCE connector's code without its state (the articles' body carries the code
        // alone): the authorization this organization began for the connector, with this
        // client id and redirect URI, when there is exactly one pending. With several, which
        // one the user followed is unknown, and a wrong verifier would spend the code: the
        // state is asked for, the code not presented. With none, the code goes without a
        // verifier (its authorization URL was made elsewhere) and the provider judges it.
        let ask_for_state = |why: &str| {
            ApiError::bad_request(format!(
                "Connector `{}` uses PKCE and {why}: pass the `state` the provider's redirect carried as `providerData.state`",
                connector.key
            ))
        };
        let pending = app
            .store
            .pending_oauth_states(
                caller.organization_id,
                &connector.key,
                &credentials.client_id,
                stored_callback,
                now_ms(),
                2,
            )
            .await?;
        match pending.as_slice() {
            [] => {}
            [only] => {
                taken_state = Some(
                    app.store
                        .take_oauth_state(only, now_ms())
                        .await?
                        .ok_or_else(|| {
                            ask_for_state(
                                "its pending authorization was just used by another request",
                            )
                        })?,
                );
            }
            _ => {
                return Err(ask_for_state(
                    "several of its authorizations are pending for this client and redirect URI",
                ));
            }
        }
    }
    if let Some(row) = &taken_state
        && let Some(sealed) = &row.code_verifier_enc
    {
        let field = crypto::hex(&row.state_hash);
        let opened = app.keyring.open_secret(
            sealed,
            Binding {
                table: "oauth_states",
                row: 0,
                field: &field,
            },
        );
        match opened {
            Ok(opened) => verifier = Some(opened),
            Err(error) => {
                // Not opened here (a key another replica has and this one has not yet): the
                // state stays for a try that can.
                let _ = app.store.insert_oauth_state(row).await;
                return Err(error.into());
            }
        }
    }
    // The client secret given with the authorization URL, for a configuration without one
    // and the same client.
    let mut kept_secret = None;
    if secret_left_out
        && let Some(row) = taken_state.as_ref().or(peeked_state.as_ref())
        && row.api_key == credentials.client_id
        && let Some(sealed) = &row.api_secret_enc
    {
        let field = crate::store::OAuthStateSealed::ClientSecret.binding_field(&row.state_hash);
        match app.keyring.open_secret(
            sealed,
            Binding {
                table: "oauth_states",
                row: 0,
                field: &field,
            },
        ) {
            Ok(opened) => kept_secret = Some(opened),
            Err(error) => {
                if taken_state.is_some() {
                    let _ = app.store.insert_oauth_state(row).await;
                }
                return Err(error.into());
            }
        }
    }
    let with_kept_secret;
    let credentials = match &kept_secret {
        Some(secret) => {
            with_kept_secret = crate::oauth::ClientCredentials {
                client_id: credentials.client_id.clone(),
                client_secret: secret.clone(),
            };
            &with_kept_secret
        }
        None => credentials,
    };
    // A failed exchange leaves the store as it was: the state (and its PKCE verifier) is given
    // back, so that a passing provider failure does not burn the authorization.
    let give_back = |taken: Option<crate::store::OAuthStateRow>| async move {
        if let Some(row) = taken {
            let _ = app.store.insert_oauth_state(&row).await;
        }
    };
    let scope_asked = taken_state.as_ref().map(|row| row.scope.clone());
    // The redirect URI the code was issued for (RFC 6749 §4.1.3): the one its authorization
    // URL was made with, when the state says; else the instance's. (A re-authentication from
    // the dashboard's own callback page, with the instance's stored URI, was refused.)
    let callback = match (&taken_state, stored_callback) {
        (Some(row), _) if !row.callback_url.is_empty() => row.callback_url.clone(),
        (_, Some(stored)) => stored.to_string(),
        _ => {
            give_back(taken_state).await;
            return Err(ApiError::bad_request(
                "`configuration.oauth.callback.url` (the redirect URI the code was issued for) is required",
            ));
        }
    };
    let callback = callback.as_str();
    let exchanged = app
        .oauth
        .exchange_code(
            spec,
            endpoints,
            credentials,
            code,
            callback,
            verifier.as_ref(),
        )
        .await;
    let tokens = match exchanged {
        Ok(tokens) => tokens,
        Err(error) => {
            // Not exchanged: the code may be tried again (after a passing provider failure).
            // Unless the provider took it and answered 2xx, unreadably: presented again, it
            // would be a code used twice.
            *spent = matches!(&error, crate::oauth::OAuthError::Unparseable { status, .. }
                if (200..300).contains(status));
            // The state first: a request waiting on the code takes it as soon as the code is
            // given back.
            give_back(taken_state).await;
            return Err(instances::exchange_error(&error));
        }
    };
    // Routing data the provider put in its redirect counts like token-response fields; the
    // token response wins where both carry a field.
    let mut tokens = tokens;
    for (key, value) in redirect_fields {
        if tokens.fields.contains_key(key) || crate::instances::is_secret_key(key) {
            continue;
        }
        // The redirect came through the user's browser: a `base.url` it names must be on a
        // host the connector's own URLs name, or the user could send the calls made through
        // their instance (and the platform's requests they carry) to a host of their choosing
        // (the service's network). The provider's token response is believed as it is.
        if connector.oauth.base_url_from.as_deref() == Some(key.as_str())
            && !redirect_base_on_a_known_host(app, connector, plain, key, value)
        {
            tracing::warn!(
                connector = %connector.key,
                field = %key,
                "the authorization redirect names an API host none of the connector's URLs names; base.url stays the connector's"
            );
            continue;
        }
        tokens.fields.insert(key.clone(), value.clone());
    }
    Ok(Grant {
        tokens,
        verifier_used: verifier.is_some(),
        scope: scope_asked,
        callback: Some(callback.to_string()),
        claimed: None,
        client_secret: kept_secret.map(|secret| secret.expose().to_string()),
        made_with: None,
    })
}

/// Tokens brought in with `externalAuthentication: "initial"`.
fn imported_tokens(split: &SplitConfiguration) -> ApiResult<TokenSet> {
    // Whitespace around a pasted token is no part of it (a provider's answer is read so too).
    let trimmed = |token: &Option<String>| {
        token
            .as_deref()
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(str::to_string)
    };
    let access = trimmed(&split.access_token);
    let refresh = trimmed(&split.refresh_token);
    if access.is_none() && refresh.is_none() {
        return Err(ApiError::bad_request(
            "`externalAuthentication: \"initial\"` needs `oauth.user.token` and/or `oauth.user.refresh_token` in the configuration",
        ));
    }
    for (key, token) in [
        ("oauth.user.token", &access),
        ("oauth.user.refresh_token", &refresh),
    ] {
        // A configuration read without the Element token shows the mask: brought in, it was
        // stored as the token.
        if token.as_deref() == Some(instances::MASK) {
            return Err(ApiError::bad_request(format!(
                "`{key}` is the mask `{}`: give the token itself (read the instance with its Element token to see it)",
                instances::MASK
            )));
        }
        // C1 controls too (U+0080–U+009F: a paste from a document, never a token).
        if token.as_deref().is_some_and(|token| {
            crate::oauth::has_control_characters(token)
                || token.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c))
        }) {
            return Err(ApiError::bad_request(format!(
                "`{key}` holds a control character (a line break copied with it?): no provider issues such a token, and no HTTP header can carry it"
            )));
        }
    }
    Ok(TokenSet {
        access_token: Secret::new(access.unwrap_or_default()),
        refresh_token: refresh.map(Secret::new),
        token_type: Some("Bearer".into()),
        expires_in: None,
        refresh_token_expires_in: None,
        scope: None,
        raw: Secret::new("{}"),
        fields: Map::new(),
    })
}

/// Inputs the authorization redirect names ([`crate::catalog::ConnectorInput::from_redirect`]),
/// into `plain` where the caller gave none: the code is then exchanged at the account's own
/// host (Adobe Acrobat Sign's shard), and the instance keeps the value.
fn inputs_from_redirect(
    app: &App,
    connector: &Connector,
    redirect: &Map<String, Value>,
    plain: &mut BTreeMap<String, String>,
) {
    for (name, value) in instances::inputs_named_by(app, connector, redirect) {
        plain.entry(name).or_insert(value);
    }
}

fn starting_configuration(
    app: &App,
    connector: &Connector,
    plain: BTreeMap<String, String>,
) -> ApiResult<Map<String, Value>> {
    let mut configuration: Map<String, Value> = plain
        .into_iter()
        .map(|(key, value)| (key, Value::String(value)))
        .collect();
    check_base_url(app, &configuration)?;
    check_webhook_url(app, &configuration)?;
    check_webhook_enabled(&configuration)?;
    check_callback_url(&configuration)?;
    if !configuration.contains_key(BASE_URL) {
        let base = app
            .fill(connector, &connector.base_url, &configuration)
            .map_err(|error| ApiError::bad_request(format!("Connector input missing: {error}")))?;
        configuration.insert(BASE_URL.into(), Value::String(base));
    }
    let endpoints = app
        .endpoints(connector, &configuration)
        .map_err(|error| ApiError::bad_request(format!("Connector input missing: {error}")))?;
    configuration.insert(REFRESH_URL.into(), Value::String(endpoints.refresh_url));
    Ok(configuration)
}

async fn create_instance(
    app: &SharedApp,
    caller: &Caller,
    connector: &Connector,
    body: InstanceBody,
) -> ApiResult<(StatusCode, AxumJson<Value>)> {
    let configuration = normalize_configuration(body.configuration.as_ref())?;
    let tags = body.tags.clone().unwrap_or_default();
    validate_tags(&tags)?;
    let name = body
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| format!("{} instance", connector.name));
    validate_name(&name)?;
    let mut split = split_configuration(configuration);
    // A masked value in a create stands for nothing to keep: it is left out (the client
    // secret kept with the authorization may then serve), never sent or stored as a value.
    // Another key masked stands for a value nobody gave: refused, as in an update. So does
    // the client secret of an import (no authorization kept one).
    let code_given = body.code().is_some();
    if let Some((key, _)) = split.secret.iter().find(|(key, value)| {
        *value == instances::MASK && (key.as_str() != instances::API_SECRET || !code_given)
    }) {
        return Err(ApiError::bad_request(format!(
            "`{key}` is the mask `{}`, but a new instance has no value for it: give the value itself",
            instances::MASK
        )));
    }
    split.secret.retain(|_, value| value != instances::MASK);
    let mut given = split.plain.clone();
    inputs_from_redirect(app, connector, &body.redirect_fields(), &mut given);
    let plain = starting_configuration(app, connector, given)?;
    // With a code, the code's tokens are the instance's, not imported ones.
    let external = body.code().is_none() && body.announces_tokens();
    let mut expiry = instances::ImportedExpiry::default();
    let grant = match (body.code(), external) {
        (Some(code), _) => {
            let exchanged = exchange(
                app,
                caller,
                connector,
                &plain,
                &split.secret,
                Redirect {
                    code: &code,
                    state: body.state(),
                    fields: &body.redirect_fields(),
                    kept_secret_first: false,
                },
            )
            .await?;
            match exchanged {
                Exchanged::Grant(grant) => *grant,
                Exchanged::Landed {
                    instance_id,
                    claimed_at,
                } => {
                    return created_before(app, caller, connector, instance_id, claimed_at).await;
                }
            }
        }
        (None, true) => {
            let tokens = imported_tokens(&split)?;
            if tokens.refresh_token.is_some() {
                require_client_id(&plain)?;
            }
            // The expiry says when the imported access token stops working: without one
            // there is nothing to expire.
            if !tokens.access_token.is_empty() {
                expiry = instances::imported_expiry(&split.expiry, now_ms())?;
            }
            Grant {
                tokens,
                verifier_used: false,
                scope: None,
                callback: None,
                claimed: None,
                client_secret: None,
                made_with: None,
            }
        }
        (None, false) => {
            return Err(ApiError::bad_request(
                "Give `providerData.code` (the provider's authorization code), or `externalAuthentication: \"initial\"` with existing tokens",
            ));
        }
    };
    let mut grant = grant;
    if external {
        let key = import_key(caller.organization_id, &connector.key, &grant.tokens);
        match claim_import(app, caller, connector, &key).await? {
            ImportClaim::Ours => grant.claimed = Some(key),
            ImportClaim::Created(answer) => return Ok(answer),
        }
    }
    let claimed = grant.claimed.clone();
    let secret = grant.with_client_secret(&split.secret);
    let created = store_created(
        app,
        caller,
        connector,
        Created {
            name,
            tags,
            plain,
            secret: &secret,
            external,
            expiry,
            disabled: body.disabled == Some(true),
        },
        grant,
    )
    .await;
    // A request repeating the code is answered with this instance (marked with it), or
    // refused when none was stored. An import's tokens are given back: a repeat brings them in
    // itself (and the provider judges a refresh token this one may have used).
    if created.is_err() {
        if external {
            if let Some(key) = claimed.as_deref() {
                // Only a claim no insert marked: an instance stored before the failure (its
                // refresh's store write failed) answers the client's retry.
                let _ = app.store.release_code(key, None).await;
            }
        } else {
            code_spent(app, claimed.as_deref()).await;
        }
    }
    created
}

/// The key under which a create's imported tokens are remembered for an hour, like an
/// exchanged code (a hash: the token is a secret): the refresh token, or the access token when
/// none came, imported into a connector of one organization. A client's retry after a timeout
/// (or the same request sent twice) is answered with the instance the first one created,
/// rather than a second instance on the same grant, one of which a rotating provider ends at
/// the other's first refresh.
fn import_key(organization_id: i64, connector_key: &str, tokens: &TokenSet) -> Vec<u8> {
    let (kind, token) = match &tokens.refresh_token {
        Some(refresh_token) => ("refresh", refresh_token.expose()),
        None => ("access", tokens.access_token.expose()),
    };
    crypto::hash_secret(&format!(
        "imported-token\n{organization_id}\n{connector_key}\n{kind}\n{token}"
    ))
    .to_vec()
}

/// What [`claim_import`] found.
enum ImportClaim {
    /// This request imports the tokens (the claim is its own).
    Ours,
    /// An earlier create imported them within the hour: its instance, as a create answers it.
    Created((StatusCode, AxumJson<Value>)),
}

/// Claims a create's imported tokens ([`import_key`]) in the table of exchanged codes. An
/// earlier create that claimed them and stored its instance answers the repeat with it; one
/// still running is waited for (as long as its provider calls and its write may take); one
/// that failed gave them back, and this one imports them. An instance deleted since no longer
/// holds them.
async fn claim_import(
    app: &App,
    caller: &Caller,
    connector: &Connector,
    key: &[u8],
) -> ApiResult<ImportClaim> {
    let patience = i64::try_from(import_patience(app).as_millis()).unwrap_or(i64::MAX);
    loop {
        let now = now_ms();
        if app
            .store
            .claim_code(key, caller.organization_id, now + USED_CODE_MEMORY_MS)
            .await?
        {
            return Ok(ImportClaim::Ours);
        }
        let Some((expires_at, landed, _)) = app.store.used_code(key, now).await? else {
            // Given back meanwhile, or its hour passed: claimed again.
            app.store.release_expired_code(key, now).await?;
            continue;
        };
        let claimed_at = expires_at - USED_CODE_MEMORY_MS;
        let waited_too_long = now > claimed_at.saturating_add(patience);
        // Given back only as it was seen here: another repeat may have given it back and
        // claimed it anew meanwhile, and that claim is not this one's to give back.
        match landed {
            Some(instance_id) if instance_id > 0 => {
                match app
                    .store
                    .get_instance(caller.organization_id, instance_id)
                    .await?
                {
                    // Its create is still refreshing it (the lease its insert took): the
                    // provider may yet refuse the tokens, and the instance be removed. Answered
                    // once that is known, not with an instance that may never exist.
                    Some(row)
                        if row.element_key == connector.key
                            && row.refresh_lease_until.is_some_and(|until| until > now)
                            && !waited_too_long =>
                    {
                        tokio::time::sleep(REPEATED_CODE_POLL).await;
                    }
                    Some(row) if row.element_key == connector.key => {
                        let view = instances::view(app, &row, Some(&connector.name), false)?;
                        return Ok(ImportClaim::Created((StatusCode::OK, AxumJson(view))));
                    }
                    // Deleted since: the tokens are free to be imported again.
                    _ => {
                        app.store.release_code(key, Some(instance_id)).await?;
                    }
                }
            }
            // Marked spent: not by an import, which gives its tokens back when it fails.
            Some(spent) => {
                app.store.release_code(key, Some(spent)).await?;
            }
            None if waited_too_long => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "An earlier request importing these tokens has not ended: try again in a moment (it is answered with the instance it created)",
                ));
            }
            None => tokio::time::sleep(REPEATED_CODE_POLL).await,
        }
    }
}

/// How long a create of imported tokens may take from its claim or its insert to its answer
/// (the provider's calls, a verification, the writes): a repeat of it waits that long for
/// its answer, and the `instance.created` of an import refreshed before the answer is held
/// back from delivery that long at most (see [`store_created`]).
fn import_patience(app: &App) -> std::time::Duration {
    2 * app.config.provider_timeout + std::time::Duration::from_secs(10)
}

/// A create repeating a code that an earlier request exchanged: the instance that request
/// created with it, as a create answers it. A code that went to re-authenticate an instance
/// (created before the code was claimed), or whose instance was deleted since, is refused.
async fn created_before(
    app: &App,
    caller: &Caller,
    connector: &Connector,
    instance_id: i64,
    claimed_at: i64,
) -> ApiResult<(StatusCode, AxumJson<Value>)> {
    match app
        .store
        .get_instance(caller.organization_id, instance_id)
        .await?
    {
        Some(row) if row.element_key == connector.key && row.created_at >= claimed_at => {
            let view = instances::view(app, &row, Some(&connector.name), false)?;
            Ok((StatusCode::OK, AxumJson(view)))
        }
        _ => Err(code_used_already()),
    }
}

/// What a create stores besides the grant.
struct Created<'a> {
    name: String,
    tags: Vec<String>,
    plain: Map<String, Value>,
    secret: &'a BTreeMap<String, String>,
    /// Tokens brought in (`externalAuthentication`) rather than exchanged.
    external: bool,
    /// The imported access token's expiry, when the import gave it.
    expiry: instances::ImportedExpiry,
    /// Created disabled (`"disabled": true`: a connection disabled where it was migrated
    /// from): no verification call and no refresh, as a disabled instance makes no provider
    /// calls.
    disabled: bool,
}

async fn store_created(
    app: &SharedApp,
    caller: &Caller,
    connector: &Connector,
    created: Created<'_>,
    grant: Grant,
) -> ApiResult<(StatusCode, AxumJson<Value>)> {
    let Created {
        name,
        tags,
        mut plain,
        secret,
        external,
        expiry,
        disabled,
    } = created;
    let _ = grant.verifier_used;
    grant.keep_authorization(&mut plain);
    // Imported tokens whose access token the provider rejects: refused, nothing created, when
    // no refresh token came with them. Those with a refresh token and no working access token
    // (none given, or one rejected) are refreshed before the answer, which tells how that went:
    // they were answered `valid: true`, and the instance turned invalid a moment later.
    let mut verified_first = None;
    let mut refresh_first = external
        && !disabled
        && grant.tokens.refresh_token.is_some()
        && grant.tokens.access_token.is_empty();
    // An imported access token past the expiry given with it is expired: refreshed at once,
    // or refused like one the provider rejects, with nothing to replace it.
    let expired =
        external && expired_import(&expiry, grant.tokens.refresh_token.is_some(), "was created")?;
    if disabled {
        // Stored as brought in: enabled, it is refreshed or verified as any instance is.
    } else if expired {
        refresh_first = true;
    } else if external && !grant.tokens.access_token.is_empty() {
        let verified =
            instances::verification(app, connector, &plain, &grant.tokens.access_token).await;
        if let Some(words) = verified.as_ref().and_then(|v| v.rejection.clone()) {
            imported_rejection(grant.tokens.refresh_token.is_some(), "was created", words)?;
            refresh_first = true;
        }
        verified_first = Some(verified);
    }
    let id = crypto::new_id();
    let now = now_ms();
    let element_token = crypto::new_platform_secret();
    let applied = apply_token_set(app, connector, id, &grant.tokens, None, &plain, now);
    plain = applied.configuration;
    let mut row = InstanceRow::new(
        id,
        caller.organization_id,
        connector.key.clone(),
        name,
        hash_secret(element_token.expose()),
        app.keyring.seal_secret(
            &element_token,
            Binding {
                table: "instances",
                row: id,
                field: "token",
            },
        ),
        now,
    );
    row.tags = serde_json::to_string(&tags).unwrap_or_else(|_| "[]".into());
    row.configuration = Value::Object(plain.clone()).to_string();
    row.client_secret_enc = instances::seal_secret_configuration(app, id, secret);
    let mut update = applied.update;
    // The expiry an import gave schedules the imported access token as a token response's
    // would (`before_expiry` refreshes it in time).
    if external {
        with_imported_expiry(connector, &mut update, &expiry, now);
    }
    row.access_token_enc = if grant.tokens.access_token.is_empty() {
        None
    } else {
        update.access_token_enc
    };
    row.refresh_token_enc = update.refresh_token_enc;
    row.token_response_enc = update.token_response_enc;
    row.access_expires_at = update.access_expires_at;
    row.refresh_expires_at = update.refresh_expires_at;
    row.last_refresh_at = update.last_refresh_at;
    row.next_due_at = update.next_due_at;
    if external && refresh_import_at_once(connector, &grant.tokens) {
        row.next_due_at = Some(now);
    }
    row.created_by = Some(caller.user_id);
    row.disabled = i64::from(disabled);
    if !refresh_first && !grant.tokens.access_token.is_empty() && !disabled {
        let verified = match verified_first.take() {
            Some(verified) => verified,
            None => {
                instances::verification(app, connector, &plain, &grant.tokens.access_token).await
            }
        };
        row.verification = verified.map(|verified| verified.outcome.to_string());
    }
    // One event, `instance.created`, whose reason says it was created disabled (no
    // `instance.disabled`: nothing was enabled before).
    let mut event = events::new_event(
        app,
        &row,
        events::CREATED,
        disabled.then_some("created disabled"),
    );
    // Imported tokens to refresh before the answer: the row is stored first, as brought in,
    // and refreshed on it by the refresh engine, so that a refresh token the provider rotates
    // is stored the moment it is given (a refresh made before the insert lost it, and the
    // grant with it, when the process died or the insert failed: the verification call and
    // the write came after it). The insert takes the refresh's lease for this replica and
    // marks the refresh in flight: no scheduler or other replica refreshes the row meanwhile,
    // a repeat of the import waits for the outcome ([`claim_import`]), and after a crash the
    // recovery refreshes it when the lease runs out. Its `instance.created` is held back from
    // delivery until the outcome is known (held, it holds back the instance's later events
    // too): a refusal removes the row with its events, and no webhook tells of an instance
    // the create answered 400 for. A crash leaves the hold to end by itself.
    let mut held_until = None;
    if refresh_first {
        let lease_until = now + crate::refresh::LEASE_MS;
        row.refresh_lease_owner = Some(app.replica_id.clone());
        row.refresh_lease_until = Some(lease_until);
        row.refresh_in_flight_since = Some(now);
        row.next_due_at = Some(lease_until);
        if event.next_attempt_at.is_some() {
            let until =
                now + i64::try_from(import_patience(app).as_millis()).unwrap_or(i64::MAX / 2);
            event.next_attempt_at = Some(until);
            held_until = Some(until);
        }
    }
    // Created when stored, not when the create began (a verification call may have taken
    // seconds since): a list read in pages, in creation order, would otherwise have passed
    // the place where it lands.
    let stored_at = now_ms();
    row.created_at = row.created_at.max(stored_at);
    row.updated_at = row.updated_at.max(stored_at);
    // Read before the insert: nothing in this process has touched the new row since.
    let epoch = app.refresh.epoch();
    // A built-in needs no row (a connector of the organization that shadowed it may have been
    // deleted since); the organization's own must still exist.
    let own_connector = !app.is_catalog_connector(connector);
    if !app
        .store
        .insert_instance_of(&row, Some(&event), own_connector, grant.claimed.as_deref())
        .await?
    {
        return Err(ApiError::conflict(format!(
            "Connector `{}` was deleted while the instance was being created",
            connector.key
        )));
    }
    if refresh_first {
        let version = row.token_version;
        row = match app
            .refresh
            .refresh_new_import(app, row.clone(), epoch)
            .await
        {
            // Refreshed; or failing for now (5xx, 429, a timeout, the network; the app's
            // credentials or the request refused: the grant may be good), kept as the
            // engine leaves such an instance, valid and backing off, and retried by the
            // scheduler; or changed meanwhile by someone else: as it is now.
            Ok(_)
            | Err(
                RefreshFailure::Transient { .. }
                | RefreshFailure::Misconfigured(_)
                | RefreshFailure::Invalid { .. },
            ) => reload(app, &row).await?,
            // The provider refuses the refresh token: the row was removed, nothing was
            // created (400 in the provider's words). Or the store failed after the insert:
            // the instance exists (rotated tokens are kept for the store), and the client's
            // retry is answered with it.
            Err(failure) => return Err(failure.into_api_error()),
        };
        // The instance stays: its `instance.created` goes out now (its hold ends by itself
        // otherwise, a little later).
        if let Some(until) = held_until
            && let Err(error) = app
                .store
                .release_held_event(&event.id, until, now_ms())
                .await
        {
            tracing::warn!(
                instance = row.id,
                "releasing the held `instance.created`: {error}"
            );
        }
        // The verification of the tokens the instance holds now: the new access token, after
        // it was stored (the imported one was rejected, expired or absent); the imported
        // one's verdict when the refresh failed.
        let verified = match verified_first {
            Some(verified) if row.token_version == version => verified,
            _ => match open_secrets(app, &row)?.access_token {
                Some(token) if !token.is_empty() => {
                    instances::verification(app, connector, &plain_configuration(&row), &token)
                        .await
                }
                _ => None,
            },
        };
        // Only what the answer shows beside the stored tokens: a store failing now does not
        // fail the create (its tokens are stored).
        if let Some(verified) = verified {
            let outcome = verified.outcome.to_string();
            match app
                .store
                .record_verification(row.id, row.token_version, &outcome)
                .await
            {
                Ok(true) => row.verification = Some(outcome),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(instance = row.id, "recording the verification: {error}");
                }
            }
        }
    }
    crate::audit::record(
        app,
        caller,
        "instance.created",
        Some(&id.to_string()),
        Some(&connector.key),
    )
    .await;
    app.refresh.notify_schedule_changed();
    // The request cannot carry the new instance's Element token: token values and client
    // secrets are masked here like everywhere else (GET it with the Element token to see them).
    let view = instances::view(app, &row, Some(&connector.name), false)?;
    Ok((StatusCode::OK, AxumJson(view)))
}

#[utoipa::path(
    get,
    path = "/elements/api-v2/instances",
    operation_id = "instances_list",
    tag = "instances",
    summary = "The organization's instances (or the Element token's one); `?tags[]=`, pages with `?limit=`",
    params(
        ("tags[]" = Option<String>, Query, description = "only instances with this tag; repeated, instances with any of the tags given (ignored with an Element token: its instance alone)"),
        ("limit" = Option<i64>, Query, description = "a page of at most this many instances, 1 to 1000, oldest first; a `Link: <…>; rel=\"next\"` header names the next page while one follows (without `limit` and `after`, the whole list)"),
        ("after" = Option<String>, Query, description = "the cursor in the previous page's `Link` (a page of 100 when given without `limit`)"),
    ),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The instances", body = [crate::openapi::Instance],
         headers(("Link" = String, description = "`<the next page's path and query>; rel=\"next\"`, on a page that has a next one"))),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn list(
    State(app): State<SharedApp>,
    caller: Caller,
    uri: axum::extract::OriginalUri,
    RawQuery(query): RawQuery,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let query = query.unwrap_or_default();
    // Read before the Element token's answer too: a malformed page asked for is refused for
    // every caller, not taken by some.
    let page = ListPage::read(&query)?;
    if let Some(row) = &caller.element {
        // That instance alone, as a one-element array (the contract), whatever the filter.
        let name = connector_name(&app, row).await;
        return Ok(AxumJson(vec![instances::view_or_damaged(
            &app,
            row,
            name.as_deref(),
            true,
        )])
        .into_response());
    }
    caller.require_organization()?;
    let parameters = url::form_urlencoded::parse(query.as_bytes());
    // Another spelling of the filter (`tags[0]`, `tags[][]`) is refused, not ignored: the
    // caller would take the whole list for the filtered one.
    if let Some((odd, _)) = parameters
        .clone()
        .find(|(key, _)| key.starts_with("tags") && key != "tags[]" && key != "tags")
    {
        return Err(ApiError::bad_request(format!(
            "`{odd}` is no filter: repeat `tags[]=…` for each tag"
        )));
    }
    let tags: Vec<String> = parameters
        .filter(|(key, _)| key == "tags[]" || key == "tags")
        .map(|(_, value)| value.into_owned())
        .collect();
    let (rows, next) = match page {
        None => (
            app.store
                .list_instances(caller.organization_id, &tags)
                .await?,
            None,
        ),
        Some(page) => list_page(&app, caller.organization_id, &tags, page).await?,
    };
    // Each connector's name read once (a query per instance held SQLite's one connection
    // for as many queries as the organization has instances).
    let mut names: HashMap<String, Option<String>> = HashMap::new();
    for row in &rows {
        if !names.contains_key(&row.element_key) {
            let name = connector_name(&app, row).await;
            names.insert(row.element_key.clone(), name);
        }
    }
    // The views (secrets opened, the JSON written) are work for the processor, a millisecond
    // or more per hundred instances: made off the threads that serve calls, where a few
    // clients paging through thousands of instances held every other organization's proxied
    // calls for seconds.
    let shown = {
        let app = std::sync::Arc::clone(&app);
        tokio::task::spawn_blocking(move || {
            let mut unreadable = 0usize;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let name = names.get(&row.element_key).cloned().flatten();
                // One instance whose stored secrets do not open (damaged, or sealed under a
                // key this process lacks) must not hide the organization's other instances.
                match instances::view(&app, row, name.as_deref(), false) {
                    Ok(view) => out.push(view),
                    Err(_) => {
                        unreadable += 1;
                        out.push(instances::damaged_view(row, name.as_deref()));
                    }
                }
            }
            // One line a list, not one an instance (a lost key left hundreds).
            if unreadable > 0 {
                tracing::warn!(
                    unreadable,
                    "instances listed whose stored secrets do not open (altered, or sealed under a master key this process does not have): they show `state: unreadable`"
                );
            }
            serde_json::to_vec(&out)
        })
        .await
        .map_err(|error| ApiError::internal(format!("the list stopped: {error}")))?
        .map_err(ApiError::internal)?
    };
    let mut response = (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        shown,
    )
        .into_response();
    if let (Some(page), Some(next)) = (page, next) {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query.append_pair("limit", &page.limit.to_string());
        query.append_pair("after", &ListPage::cursor(next));
        for tag in &tags {
            query.append_pair("tags[]", tag);
        }
        let link = format!("<{}?{}>; rel=\"next\"", uri.0.path(), query.finish());
        if let Ok(value) = axum::http::HeaderValue::from_str(&link) {
            response
                .headers_mut()
                .insert(axum::http::header::LINK, value);
        }
    }
    Ok(response)
}

/// A page of `GET /instances` asked for with `limit` and `after`.
#[derive(Clone, Copy)]
struct ListPage {
    limit: usize,
    /// The creation time and id of the previous page's last instance.
    after: Option<(i64, i64)>,
}

impl ListPage {
    const DEFAULT_LIMIT: usize = 100;
    const MAX_LIMIT: usize = 1000;

    /// `None` for the whole list (neither `limit` nor `after` given).
    fn read(query: &str) -> ApiResult<Option<Self>> {
        let mut limit = None;
        let mut after = None;
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            // Given twice, one would be taken and the other silently dropped.
            if (key == "limit" && limit.is_some()) || (key == "after" && after.is_some()) {
                return Err(ApiError::bad_request(format!("`{key}` is given twice")));
            }
            match key.as_ref() {
                "limit" => {
                    limit = Some(
                        value
                            .parse::<usize>()
                            .ok()
                            .filter(|limit| (1..=Self::MAX_LIMIT).contains(limit))
                            .ok_or_else(|| {
                                ApiError::bad_request(format!(
                                    "`limit` is a page size from 1 to {}, not {value:?}",
                                    Self::MAX_LIMIT
                                ))
                            })?,
                    );
                }
                "after" => {
                    after = Some(Self::parse_cursor(&value).ok_or_else(|| {
                        ApiError::bad_request(
                            "`after` is the cursor given in the previous page's `Link` header, unchanged",
                        )
                    })?);
                }
                _ => {}
            }
        }
        if limit.is_none() && after.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            limit: limit.unwrap_or(Self::DEFAULT_LIMIT),
            after,
        }))
    }

    fn cursor((created_at, id): (i64, i64)) -> String {
        format!("{created_at}.{id}")
    }

    fn parse_cursor(text: &str) -> Option<(i64, i64)> {
        let (created_at, id) = text.split_once('.')?;
        Some((created_at.parse().ok()?, id.parse().ok()?))
    }
}

/// A page of the organization's instances (with any of `tags`), and the cursor of its last
/// instance when more follow. Read in batches, so that a page of a rare tag does not hold the
/// whole table at once.
async fn list_page(
    app: &App,
    organization_id: i64,
    tags: &[String],
    page: ListPage,
) -> ApiResult<(Vec<InstanceRow>, Option<(i64, i64)>)> {
    let batch = if tags.is_empty() {
        page.limit + 1
    } else {
        (page.limit + 1).max(500)
    };
    let mut out = Vec::with_capacity(page.limit.min(batch));
    let mut after = page.after;
    loop {
        let rows = app
            .store
            .list_instances_after(organization_id, after, batch as i64)
            .await?;
        let last_batch = rows.len() < batch;
        for row in rows {
            after = Some((row.created_at, row.id));
            if !tags.is_empty() && !row.tag_list().iter().any(|tag| tags.contains(tag)) {
                continue;
            }
            if out.len() == page.limit {
                // One more follows: the page ends at its last instance.
                let next = out
                    .last()
                    .map(|last: &InstanceRow| (last.created_at, last.id));
                return Ok((out, next));
            }
            out.push(row);
        }
        if last_batch {
            return Ok((out, None));
        }
    }
}

async fn connector_name(app: &App, row: &InstanceRow) -> Option<String> {
    app.connector(row.organization_id, &row.element_key)
        .await
        .ok()
        .flatten()
        .map(|c| c.name.clone())
}

/// The instance `id` of the caller's organization, or 404 exactly as for an id that does not
/// exist.
async fn load(app: &App, caller: &Caller, id: &str) -> ApiResult<InstanceRow> {
    let not_found = || ApiError::not_found(format!("There is no instance {id}"));
    let id: i64 = id.parse().map_err(|_| not_found())?;
    app.store
        .get_instance(caller.organization_id, id)
        .await?
        .ok_or_else(not_found)
}

async fn load_for_call(app: &App, caller: &Caller, id: &str) -> ApiResult<InstanceRow> {
    let row = load(app, caller, id).await?;
    if !caller.has_organization_secret && !caller.holds_element_of(row.id) {
        return Err(ApiError::not_found(format!("There is no instance {id}")));
    }
    Ok(row)
}

#[utoipa::path(
    get,
    path = "/elements/api-v2/instances/{id}",
    operation_id = "instances_get_one",
    tag = "instances",
    summary = "One instance",
    params(("id" = i64, Path, description = "the instance id")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The instance", body = crate::openapi::Instance),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn get_one(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<AxumJson<Value>> {
    let row = load_for_call(&app, &caller, &id).await?;
    respond(&app, &caller, row).await
}

#[utoipa::path(
    patch,
    path = "/elements/api-v2/instances/{id}",
    operation_id = "instances_patch",
    tag = "instances",
    summary = "Re-authenticate (`providerData.code`) or merge name, tags, configuration",
    request_body(content = crate::openapi::InstanceWrite, content_type = "application/json", description = "Merged: name, tags, configuration; with `providerData.code`, a re-authentication", example = json!({"name": "renamed", "tags": ["prod"], "configuration": {"event.notification.enabled": "true", "event.notification.callback.url": "https://app.example/hooks"}})),
    params(("id" = i64, Path, description = "the instance id")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The instance", body = crate::openapi::Instance),
        crate::openapi::PlatformErrors,
        crate::openapi::BodyErrors,
        crate::openapi::ExchangeErrors
    ),
)]
pub async fn patch(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<InstanceBody>,
) -> ApiResult<AxumJson<Value>> {
    let row = load_for_call(&app, &caller, &id).await?;
    update(&app, &caller, row, body, UpdateMode::Merge).await
}

#[utoipa::path(
    patch,
    path = "/elements/api-v2/instances",
    operation_id = "instances_patch_by_token",
    tag = "instances",
    summary = "Re-authenticate or update the instance named by the Element token",
    request_body(content = crate::openapi::InstanceWrite, content_type = "application/json", description = "Merged: name, tags, configuration; with `providerData.code`, a re-authentication", example = json!({"name": "renamed", "tags": ["prod"], "configuration": {"event.notification.enabled": "true", "event.notification.callback.url": "https://app.example/hooks"}})),
    security(("element" = [])),
    responses(
        (status = 200, description = "The instance", body = crate::openapi::Instance),
        crate::openapi::PlatformErrors,
        crate::openapi::BodyErrors,
        crate::openapi::ExchangeErrors
    ),
)]
pub async fn patch_by_token(
    State(app): State<SharedApp>,
    caller: Caller,
    Json(body): Json<InstanceBody>,
) -> ApiResult<AxumJson<Value>> {
    let row = caller.require_element()?.clone();
    update(&app, &caller, row, body, UpdateMode::Merge).await
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PutQuery {
    #[serde(default, deserialize_with = "crate::http::json::flag")]
    re_authenticate: Option<bool>,
}

#[utoipa::path(
    put,
    path = "/elements/api-v2/instances/{id}",
    operation_id = "instances_put",
    tag = "instances",
    summary = "Replace the configuration; `?reAuthenticate=true` with a code re-authenticates",
    request_body(content = crate::openapi::InstanceWrite, content_type = "application/json", description = "The whole configuration (replaced: the keys the service computes, `base.url`, `oauth.token.refresh_url` and `oauth.provider.*`, stay, and the client id and secret, `oauth.callback.url` and the scope unless given), name and tags; with `providerData.code` and `?reAuthenticate=true`, a re-authentication", example = json!({"name": "Alice's account", "tags": ["qa"], "configuration": {"oauth.api.key": "client id", "oauth.api.secret": "client secret", "oauth.callback.url": "https://app.example/callback"}})),
    params(("id" = i64, Path, description = "the instance id"), ("reAuthenticate" = Option<bool>, Query, description = "with `providerData.code`: re-authenticate")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The instance", body = crate::openapi::Instance),
        crate::openapi::PlatformErrors,
        crate::openapi::BodyErrors,
        crate::openapi::ExchangeErrors
    ),
)]
pub async fn put(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<PutQuery>,
    Json(body): Json<InstanceBody>,
) -> ApiResult<AxumJson<Value>> {
    let row = load_for_call(&app, &caller, &id).await?;
    let mode = UpdateMode::Replace {
        reauthenticate: query.re_authenticate.unwrap_or(false),
    };
    update(&app, &caller, row, body, mode).await
}

#[utoipa::path(
    put,
    path = "/elements/api-v2/instances",
    operation_id = "instances_put_by_token",
    tag = "instances",
    summary = "Replace the configuration of the instance named by the Element token",
    request_body(content = crate::openapi::InstanceWrite, content_type = "application/json", description = "The whole configuration (replaced: the keys the service computes, `base.url`, `oauth.token.refresh_url` and `oauth.provider.*`, stay, and the client id and secret, `oauth.callback.url` and the scope unless given), name and tags; with `providerData.code` and `?reAuthenticate=true`, a re-authentication", example = json!({"name": "Alice's account", "tags": ["qa"], "configuration": {"oauth.api.key": "client id", "oauth.api.secret": "client secret", "oauth.callback.url": "https://app.example/callback"}})),
    params(("reAuthenticate" = Option<bool>, Query, description = "with `providerData.code`: re-authenticate")),
    security(("element" = [])),
    responses(
        (status = 200, description = "The instance", body = crate::openapi::Instance),
        crate::openapi::PlatformErrors,
        crate::openapi::BodyErrors,
        crate::openapi::ExchangeErrors
    ),
)]
pub async fn put_by_token(
    State(app): State<SharedApp>,
    caller: Caller,
    Query(query): Query<PutQuery>,
    Json(body): Json<InstanceBody>,
) -> ApiResult<AxumJson<Value>> {
    let row = caller.require_element()?.clone();
    let mode = UpdateMode::Replace {
        reauthenticate: query.re_authenticate.unwrap_or(false),
    };
    update(&app, &caller, row, body, mode).await
}

#[derive(Debug, Clone, Copy)]
enum UpdateMode {
    /// `PATCH`: name, tags and configuration keys given are merged; a code re-authenticates.
    Merge,
    /// `PUT`: the configuration is replaced whole; a code re-authenticates only with
    /// `?reAuthenticate=true`.
    Replace { reauthenticate: bool },
}

/// How many times an update is computed again from a fresh read when a refresh committed
/// between its read and its write.
const UPDATE_ATTEMPTS: usize = 3;

/// An update runs in a task of its own, to its end, as a creation does: a re-authentication's
/// exchanged code must be stored, and a token import's hold ended, whether the caller waits or
/// hangs up.
async fn update(
    app: &SharedApp,
    caller: &Caller,
    row: InstanceRow,
    body: InstanceBody,
    mode: UpdateMode,
) -> ApiResult<AxumJson<Value>> {
    // A PUT's code re-authenticates only with `?reAuthenticate=true` (the contract): one sent
    // without it is refused, not dropped, since the caller would take the 200 for a
    // re-authentication while the instance stayed as it was.
    if matches!(
        mode,
        UpdateMode::Replace {
            reauthenticate: false
        }
    ) && body.code().is_some()
    {
        return Err(ApiError::bad_request(
            "A PUT with `providerData.code` re-authenticates only with `?reAuthenticate=true` (or send it with PATCH); nothing was changed",
        ));
    }
    // An empty code is refused rather than taken for no code: the caller would take the 200
    // for a re-authentication.
    if body
        .provider_data
        .as_ref()
        .and_then(|data| data.code.as_deref())
        .is_some_and(|code| code.trim().is_empty())
    {
        return Err(ApiError::bad_request(
            "`providerData.code` is empty: give the code the provider's redirect carried",
        ));
    }
    // What would change nothing is refused, not answered 200 as if done: `providerData` whose
    // code is misspelled, tokens announced and not given, a state set elsewhere.
    if body.provider_data.is_some() && body.code().is_none() {
        return Err(ApiError::bad_request(
            "`providerData` without `code` changes nothing: a re-authentication needs `providerData.code`, the code the provider's redirect carried; nothing was changed",
        ));
    }
    if body.code().is_none() && body.announces_tokens() && !body.gives_token_keys() {
        return Err(ApiError::bad_request(
            "`externalAuthentication: \"initial\"` needs `oauth.user.token` and/or `oauth.user.refresh_token` in the configuration; nothing was changed",
        ));
    }
    if let Some(given) = &body.id
        && given.as_i64() != Some(row.id)
        && given.as_str().and_then(|id| id.parse::<i64>().ok()) != Some(row.id)
    {
        return Err(ApiError::bad_request(format!(
            "The body's `id` is not {}, the instance updated: nothing was changed",
            row.id
        )));
    }
    // Another instance's Element token: a read of that instance written back to this one.
    if let Some(given) = &body.token
        && given.as_str() != Some(open_secrets(app, &row)?.element_token.expose())
    {
        return Err(ApiError::bad_request(
            "The body's `token` is not the Element token of the instance updated (it is another instance's, or none): nothing was changed",
        ));
    }
    if let Some(key) = body.element.as_ref().map(ElementRef::key)
        && key != row.element_key
    {
        return Err(ApiError::bad_request(format!(
            "The instance is of connector `{}`: an update cannot make it one of `{key}`; nothing was changed",
            row.element_key
        )));
    }
    if let Some(disabled) = body.disabled
        && disabled != row.is_disabled()
    {
        return Err(ApiError::bad_request(format!(
            "The instance is {}: enable or disable it with PUT or DELETE /instances/{}/enabled, not with `disabled`; nothing was changed",
            if row.is_disabled() {
                "disabled"
            } else {
                "enabled"
            },
            row.id
        )));
    }
    let (task_app, by) = (std::sync::Arc::clone(app), caller.clone());
    crate::refresh::spawn_to_the_end(
        app,
        in_this_request(async move { update_now(&task_app, &by, row, body, mode).await }),
    )
    .await
    .map_err(|error| ApiError::internal(format!("the update stopped: {error}")))?
}

async fn update_now(
    app: &SharedApp,
    caller: &Caller,
    row: InstanceRow,
    body: InstanceBody,
    mode: UpdateMode,
) -> ApiResult<AxumJson<Value>> {
    let mut spent = None;
    let updated = update_turns(app, caller, row, body, mode, &mut spent).await;
    // A code exchanged for a re-authentication that was not stored: a request repeating it
    // is refused at once, not after waiting for this one.
    if updated.is_err() {
        code_spent(app, spent.as_deref()).await;
    }
    updated
}

/// [`update_now`]'s attempts; `spent`: the code a re-authentication claimed and exchanged.
async fn update_turns(
    app: &SharedApp,
    caller: &Caller,
    row: InstanceRow,
    body: InstanceBody,
    mode: UpdateMode,
    spent: &mut Option<Vec<u8>>,
) -> ApiResult<AxumJson<Value>> {
    // The tokens the caller saw are those of the first read: a token given back equal to them
    // is "as shown" on every attempt (a refresh between two attempts must not turn it into an
    // import of the token that refresh retired).
    let seen = open_secrets(app, &row)?;
    // Tokens brought in: the instance is held from before anything is written (no refresh of
    // it runs meanwhile, in any replica), so the import cannot fail after the rest was stored.
    if imports_tokens(&body, mode) {
        let (body, seen) = (&body, &seen);
        let mut refresh_after = false;
        let answer = app
            .refresh
            .with_instance_held(app, row.id, async |held| {
                let attempt = Attempt {
                    seen,
                    exchanged: &mut None,
                    spent: &mut None,
                    held: true,
                    refresh_after: &mut refresh_after,
                };
                update_once(app, caller, held, body, mode, attempt)
                    .await?
                    .ok_or_else(|| {
                        ApiError::conflict(
                            "The instance was re-authenticated while it was updated; send the update again",
                        )
                    })
            })
            .await?;
        if !refresh_after {
            return Ok(answer);
        }
        // The imported access token was rejected (a refresh token may replace it), or only a
        // refresh token was imported: refreshed once the hold has ended, before the answer,
        // which tells how it went (it said valid, and the instance turned invalid a moment
        // later).
        let _ = app.refresh.refresh_now(app, row.id).await;
        let stored = reload(app, &row).await?;
        return respond(app, caller, stored).await;
    }
    // A re-authentication's exchange (the code is single use) and verification, kept for the
    // next attempt when the row moved on before it was written.
    let mut exchanged = None;
    let id = row.id;
    let updated =
        reauthenticate_or_merge(app, caller, row, &body, mode, &seen, &mut exchanged, spent).await;
    // A grant exchanged and never stored (the instance deleted meanwhile, or held too long):
    // nothing holds it. Revoked where the provider caps a user's grants, as a superseded one
    // is (a sixth Salesforce grant ends the user's oldest, another instance's).
    if updated.is_err()
        && let Some((grant, _)) = exchanged.take()
        && let Some(origin) = grant.made_with
        && let Some(refresh_token) = grant.tokens.refresh_token
    {
        crate::refresh::revoke_unstored_grant(
            app,
            origin.connector,
            id,
            origin.configuration,
            origin.secret_configuration,
            refresh_token,
        );
    }
    updated
}

/// [`update_turns`] of a re-authentication or a merge: a few attempts, then one under the
/// instance's hold.
#[allow(clippy::too_many_arguments)]
async fn reauthenticate_or_merge(
    app: &SharedApp,
    caller: &Caller,
    mut row: InstanceRow,
    body: &InstanceBody,
    mode: UpdateMode,
    seen: &instances::InstanceSecrets,
    exchanged: &mut Option<(Grant, Option<String>)>,
    spent: &mut Option<Vec<u8>>,
) -> ApiResult<AxumJson<Value>> {
    for _ in 0..UPDATE_ATTEMPTS {
        let (organization_id, id) = (row.organization_id, row.id);
        if let Some(answer) = update_once(
            app,
            caller,
            row,
            body,
            mode,
            Attempt {
                seen,
                exchanged: &mut *exchanged,
                spent: &mut *spent,
                held: false,
                refresh_after: &mut false,
            },
        )
        .await?
        {
            return Ok(answer);
        }
        row = app
            .store
            .get_instance(organization_id, id)
            .await?
            .ok_or_else(|| ApiError::not_found("The instance was deleted meanwhile"))?;
    }
    let conflict = || {
        ApiError::conflict(
            "The instance kept changing while it was updated (other updates, refreshes or a revocation); send the update again",
        )
    };
    // The row kept moving (concurrent updates of the instance, refreshes, or a revocation or
    // refresh holding it: a re-authentication waits for those to end rather than write under
    // them). The last attempt holds the instance, so that its read and its write are not
    // separated by another update of this process or a refresh of any; a code spent already
    // (its grant in hand) is not presented again.
    let wait = if exchanged.is_some() {
        grant_in_hand_wait(app)
    } else {
        crate::refresh::HOLD_WAIT
    };
    app.refresh
        .with_instance_held_within(app, row.id, wait, async |held| {
            // (No import here: an import takes the hold from the start, above.)
            let attempt = Attempt {
                seen,
                exchanged,
                spent,
                held: true,
                refresh_after: &mut false,
            };
            update_once(app, caller, held, body, mode, attempt)
                .await?
                .ok_or_else(conflict)
        })
        .await
}

/// Whether an update re-authenticates with a code: `PATCH` with one, `PUT` with one and
/// `?reAuthenticate=true`.
fn reauthenticates(body: &InstanceBody, mode: UpdateMode) -> bool {
    match mode {
        UpdateMode::Merge => body.code().is_some(),
        UpdateMode::Replace { reauthenticate } => reauthenticate,
    }
}

/// Whether an update brings tokens in (`externalAuthentication: "initial"`, a token key in
/// the configuration, no re-authentication).
fn imports_tokens(body: &InstanceBody, mode: UpdateMode) -> bool {
    !reauthenticates(body, mode) && body.announces_tokens() && body.gives_token_keys()
}

/// What one attempt of an update carries from the ones before it.
struct Attempt<'a> {
    /// The tokens as the caller saw them (the first read).
    seen: &'a instances::InstanceSecrets,
    /// A re-authentication's exchanged grant and verification, once the code is spent.
    exchanged: &'a mut Option<(Grant, Option<String>)>,
    /// The code it claimed and exchanged.
    spent: &'a mut Option<Vec<u8>>,
    /// Whether the instance is held against refreshes (its lease is the hold's).
    held: bool,
    /// Set when imported tokens are to be refreshed once the hold ends (their access token
    /// rejected).
    refresh_after: &'a mut bool,
}

/// One attempt of [`update`]: `None` when a refresh committed since `row` was read (its
/// configuration keys would be undone by a configuration computed from `row`), and nothing
/// was written.
async fn update_once(
    app: &SharedApp,
    caller: &Caller,
    row: InstanceRow,
    body: &InstanceBody,
    mode: UpdateMode,
    attempt: Attempt<'_>,
) -> ApiResult<Option<AxumJson<Value>>> {
    let Attempt {
        seen,
        exchanged,
        spent,
        held,
        refresh_after,
    } = attempt;
    let connector = app
        .connector(row.organization_id, &row.element_key)
        .await?
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "The connector `{}` of this instance no longer exists",
                row.element_key
            ))
        })?;
    if let Some(tags) = &body.tags {
        validate_tags(tags)?;
    }
    if let Some(name) = &body.name {
        // An instance always has a name (a create without one gets the connector's).
        if name.trim().is_empty() {
            return Err(ApiError::bad_request("`name` cannot be blank"));
        }
        validate_name(name)?;
    }
    let given = normalize_configuration(body.configuration.as_ref())?;
    // Keys set to null go ("null removes a key"); they were stored as empty texts, and a
    // secret's then showed masked, as if one were set.
    let removals = instances::configuration_removals(body.configuration.as_ref());
    let mut split = split_configuration(given);
    // A client secret this request gives (a masked one stands for the instance's).
    let secret_given = split
        .secret
        .get(instances::API_SECRET)
        .is_some_and(|value| value != instances::MASK);
    let secrets = open_secrets(app, &row)?;
    // Tokens are brought in only when the body says so, as at a create. A configuration read
    // and written back carries the tokens of its read, which a refresh may have retired since
    // (the provider rotated them): imported, they would kill the grant at its next use.
    // (`update` holds the instance exactly when this is true.)
    if !imports_tokens(body, mode) {
        split.access_token = None;
        split.refresh_token = None;
    }
    // A configuration read, edited and written back carries the tokens as they were shown:
    // masked, or (to the holder of the Element token) as they are. Neither is an import: the
    // instance keeps its tokens, and a masked value never becomes one.
    let as_shown = |given: &Option<String>, stored: &Option<Secret>| {
        given.as_deref().map(str::trim).is_some_and(|value| {
            value == instances::MASK || stored.as_ref().is_some_and(|s| s.expose() == value)
        })
    };
    let given_back = |given: &Option<String>, stored: &Option<Secret>, first: &Option<Secret>| {
        as_shown(given, stored) || as_shown(given, first)
    };
    if given_back(
        &split.access_token,
        &secrets.access_token,
        &seen.access_token,
    ) {
        split.access_token = None;
    }
    // An import replaces the grant's tokens: the stored refresh token stays only when the
    // body gives it back as it was shown (masked, or as it is). Imported with an access token
    // alone (another user's, maybe), the instance kept the old grant's refresh token, and its
    // next refresh made it the old user's connection again.
    let refresh_given_back = given_back(
        &split.refresh_token,
        &secrets.refresh_token,
        &seen.refresh_token,
    );
    if refresh_given_back {
        split.refresh_token = None;
    }
    let old_plain = plain_configuration(&row);
    let (mut plain, mut secret) = match mode {
        UpdateMode::Merge => (old_plain.clone(), secrets.secret_configuration.clone()),
        UpdateMode::Replace { .. } => {
            // Keys the service computes are kept; the caller's keys replace the rest.
            let kept: Map<String, Value> = old_plain
                .iter()
                .filter(|(key, _)| {
                    [BASE_URL, REFRESH_URL].contains(&key.as_str())
                        || key.starts_with("oauth.provider.")
                })
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            (kept, BTreeMap::new())
        }
    };
    if reauthenticates(body, mode) {
        // The new redirect names the account's host again (it may have moved).
        inputs_from_redirect(app, &connector, &body.redirect_fields(), &mut split.plain);
    }
    // Given means changed: a configuration written back as read carries the stored one.
    // (A trailing slash more or less is the same root.)
    let base_given = split.plain.get(BASE_URL).is_some_and(|given| {
        old_plain
            .get(BASE_URL)
            .and_then(Value::as_str)
            .map(|stored| stored.trim_end_matches('/'))
            != Some(given.trim_end_matches('/'))
    });
    if !base_given && old_plain.contains_key(BASE_URL) {
        // The stored one stays, as written.
        split.plain.remove(BASE_URL);
    }
    // A connector whose API host the token responses name (Salesforce's `instance_url`,
    // Adobe's `api_access_point`): each one sets `base.url` again, so one given here would be
    // shown, and undone by the next refresh. Refused once the instance has such a host (an
    // import, before any refresh, has only the one given).
    if base_given
        && let Some(field) = &connector.oauth.base_url_from
        && old_plain.contains_key(&format!("oauth.provider.{field}"))
    {
        return Err(ApiError::bad_request(format!(
            "`base.url` of a `{}` instance is the provider's `{field}`, set again by each token response: it cannot be changed here; nothing was changed",
            connector.key
        )));
    }
    // (Removed is given: the client id a refresh token needs is checked below.)
    let client_id_given =
        split.plain.contains_key(API_KEY) || removals.iter().any(|key| key == API_KEY);
    // Given means changed, as for `base.url`.
    let changed = |key: &str| {
        split
            .plain
            .get(key)
            .is_some_and(|given| old_plain.get(key).and_then(Value::as_str) != Some(given.as_str()))
    };
    let webhook_given = changed(instances::WEBHOOK_URL);
    let callback_given = changed(CALLBACK_URL);
    let enabled_given = changed(instances::WEBHOOK_ENABLED);
    for (key, value) in split.plain {
        plain.insert(key, Value::String(value));
    }
    // Before `base.url` follows the inputs: an input removed is one it no longer has.
    for key in &removals {
        plain.remove(key);
    }
    // A `base.url` the connector's inputs made follows them when they change (Dynamics'
    // `{org}`); one set otherwise (by the caller, or by a token response: Salesforce's
    // `instance_url`) stays.
    if !base_given
        && let (Ok(old_default), Some(stored)) = (
            app.fill(&connector, &connector.base_url, &old_plain),
            old_plain.get(BASE_URL).and_then(Value::as_str),
        )
        && stored == old_default
        && let Ok(new_default) = app.fill(&connector, &connector.base_url, &plain)
    {
        plain.insert(BASE_URL.to_string(), Value::String(new_default));
    }
    for (key, value) in split.secret {
        // Stored in the open under older rules: sealed from now on.
        plain.remove(&key);
        if value == instances::MASK {
            // A masked value sent back unchanged means "keep it", in a replacement too.
            if let Some(kept) = secrets.secret_configuration.get(&key).cloned().or_else(|| {
                old_plain
                    .get(&key)
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }) {
                secret.insert(key, kept);
            } else {
                // The mask stands for a stored value; with none stored it stands for nothing,
                // and storing it would make the mask the secret.
                return Err(ApiError::bad_request(format!(
                    "`{key}` is the mask `{}`, but the instance has no value for it: give the value itself",
                    instances::MASK
                )));
            }
            continue;
        }
        secret.insert(key, value);
    }
    if matches!(mode, UpdateMode::Replace { .. }) {
        // A replaced configuration still needs the client credentials it had, and the scope
        // its authorization asked for, unless given.
        for key in [API_KEY, CALLBACK_URL, instances::SCOPE] {
            if !plain.contains_key(key)
                && let Some(value) = old_plain.get(key)
            {
                plain.insert(key.to_string(), value.clone());
            }
        }
        if !secret.contains_key(instances::API_SECRET)
            && let Some(value) = secrets.secret_configuration.get(instances::API_SECRET)
        {
            secret.insert(instances::API_SECRET.to_string(), value.clone());
        }
    }
    // And after a replacement kept what it keeps unless given.
    for key in &removals {
        plain.remove(key);
        secret.remove(key);
    }
    // The limit holds for what the instance keeps, sealed keys included, not only for one
    // request's keys (PATCHes merge); an update that adds none is not refused for it.
    let kept = plain.len() + secret.len();
    if kept > instances::MAX_CONFIGURATION_KEYS
        && kept > old_plain.len() + secrets.secret_configuration.len()
    {
        return Err(ApiError::bad_request(format!(
            "The instance would keep {kept} configuration keys; it takes at most {}",
            instances::MAX_CONFIGURATION_KEYS
        )));
    }
    let size = instances::configuration_bytes(&plain, &secret);
    if size > instances::MAX_CONFIGURATION_BYTES
        && size > instances::configuration_bytes(&old_plain, &secrets.secret_configuration)
    {
        return Err(ApiError::bad_request(format!(
            "The instance would keep {size} bytes of configuration; it takes at most {}",
            instances::MAX_CONFIGURATION_BYTES
        )));
    }
    // What this update changes is checked; a value stored before (under older rules) stays
    // and does not block other changes.
    if base_given {
        check_base_url(app, &plain)?;
    }
    if webhook_given {
        check_webhook_url(app, &plain)?;
    }
    if callback_given {
        check_callback_url(&plain)?;
    }
    if enabled_given {
        check_webhook_enabled(&plain)?;
    }
    if split.refresh_token.is_some() || (client_id_given && row.refresh_token_enc.is_some()) {
        require_client_id(&plain)?;
    }
    // The client secret the grant was made with, removed or blanked while the grant stays
    // (no new code, no tokens imported): the next refresh would fail as `invalid_client`, and
    // every scheduled one after it. (A public client's grant is made without one.)
    let had_secret = secrets
        .secret_configuration
        .get(instances::API_SECRET)
        .is_some_and(|value| !value.is_empty());
    let keeps_secret = secret
        .get(instances::API_SECRET)
        .is_some_and(|value| !value.is_empty());
    if had_secret
        && !keeps_secret
        && row.refresh_token_enc.is_some()
        && !reauthenticates(body, mode)
        && split.refresh_token.is_none()
    {
        return Err(ApiError::bad_request(format!(
            "`{}` cannot be removed while the instance's grant, made with it, stays: its refresh token needs it; give another secret, or re-authenticate the instance; nothing was changed",
            instances::API_SECRET
        )));
    }
    // Inputs that fill the connector's URLs are checked now, not at the next refresh; the
    // refresh URL shown follows them.
    let endpoints = app
        .endpoints(&connector, &plain)
        .map_err(|error| ApiError::bad_request(format!("Connector input: {error}")))?;
    plain.insert(
        REFRESH_URL.to_string(),
        Value::String(endpoints.refresh_url),
    );
    let name = body.name.clone().unwrap_or_else(|| row.name.clone());
    let tags = body.tags.clone().unwrap_or_else(|| row.tag_list());
    let reauthenticate = reauthenticates(body, mode);
    if reauthenticate {
        let code = body
            .code()
            .ok_or_else(|| ApiError::bad_request("Re-authentication needs `providerData.code`"))?;
        let (grant, verified) = match exchanged.take() {
            Some((grant, verification)) => (grant, Some(verification)),
            None => {
                let exchanged = exchange(
                    app,
                    caller,
                    &connector,
                    &plain,
                    &secret,
                    Redirect {
                        code: &code,
                        state: body.state(),
                        fields: &body.redirect_fields(),
                        kept_secret_first: !secret_given,
                    },
                )
                .await?;
                match exchanged {
                    Exchanged::Grant(mut grant) => {
                        spent.clone_from(&grant.claimed);
                        grant.made_with = Some(GrantOrigin {
                            connector: std::sync::Arc::clone(&connector),
                            configuration: plain.clone(),
                            secret_configuration: grant.with_client_secret(&secret),
                        });
                        (*grant, None)
                    }
                    // The same re-authentication, repeated (a retry after a timeout): it
                    // landed, and the instance is answered as it is now.
                    Exchanged::Landed { instance_id, .. } if instance_id == row.id => {
                        let now = app
                            .store
                            .get_instance(row.organization_id, row.id)
                            .await?
                            .ok_or_else(|| {
                                ApiError::not_found("The instance was deleted meanwhile")
                            })?;
                        return respond(app, caller, now).await.map(Some);
                    }
                    Exchanged::Landed { .. } => return Err(code_used_already()),
                }
            }
        };
        // What the audit entry says changed besides the grant (names, never values).
        let changes = update_changes(
            (&row.name, &name),
            (&row.tag_list(), &tags),
            (&old_plain, &plain),
            (&secrets.secret_configuration, &secret),
            false,
        );
        grant.keep_authorization(&mut plain);
        let now = now_ms();
        let applied = apply_token_set(app, &connector, row.id, &grant.tokens, None, &plain, now);
        let mut update: TokenUpdate = applied.update;
        update.configuration_json = Some(Value::Object(applied.configuration.clone()).to_string());
        let verification = match verified {
            Some(verification) => verification,
            // A disabled instance makes no provider calls: the code's exchange is the
            // re-authentication itself, the verification call is not.
            None if row.is_disabled() => None,
            None => {
                instances::verify(
                    app,
                    &connector,
                    &applied.configuration,
                    &grant.tokens.access_token,
                )
                .await
            }
        };
        let event = events::new_event(app, &row, events::REAUTHENTICATED, None);
        let written = app
            .store
            .reauthenticate(
                row.organization_id,
                row.id,
                &Reauthentication {
                    tokens: update,
                    client_secret_enc: Some(instances::seal_secret_configuration(
                        app,
                        row.id,
                        &grant.with_client_secret(&secret),
                    )),
                    verification: verification.clone(),
                    // Under a hold (`held`), its lease stays until the hold ends.
                    lease_held_by: held.then(|| app.replica_id.clone()),
                    // A request repeating the code is answered with this instance.
                    landed_code: grant.claimed.clone(),
                    // With the tokens, in one statement: a second write after it could fail
                    // with the re-authentication done (its code spent), and would put back a
                    // configuration a refresh committed in between.
                    name: Some(name),
                    tags_json: Some(serde_json::to_string(&tags).unwrap_or_else(|_| "[]".into())),
                    // Only over the row as read: the configuration written was merged from it,
                    // and a PATCH or a refresh that wrote since (the exchange takes seconds)
                    // would be undone. Then the caller reads it again and merges anew, with
                    // this exchange's tokens.
                    expected_updated_at: Some(row.updated_at),
                },
                Some(&event),
            )
            .await?;
        let Some(stored) = written else {
            *exchanged = Some((grant, verification));
            return Ok(None);
        };
        app.refresh.forget(row.id);
        app.refresh.notify_schedule_changed();
        // The grant replaced, where the provider caps a user's grants (Salesforce).
        if connector.oauth.revoke_superseded_grant
            && let Some(old) = &secrets.refresh_token
            && grant
                .tokens
                .refresh_token
                .as_ref()
                .is_some_and(|new| new.expose() != old.expose())
        {
            crate::refresh::revoke_superseded_grant(
                app,
                std::sync::Arc::clone(&connector),
                row.id,
                old_plain.clone(),
                secrets.secret_configuration.clone(),
                old.clone(),
            );
        }
        crate::audit::record(
            app,
            caller,
            "instance.reauthenticated",
            Some(&row.id.to_string()),
            Some(&changes),
        )
        .await;
        return respond(app, caller, stored).await.map(Some);
    }
    // No code: merge (or replace) name, tags and configuration. Tokens given in the
    // configuration with `externalAuthentication: "initial"` are imported as they are.
    // Changed client credentials or token endpoint end a backoff (the fix of an
    // `invalid_client` is tried at once).
    let retry_now = plain.get(API_KEY) != old_plain.get(API_KEY)
        || plain.get(REFRESH_URL) != old_plain.get(REFRESH_URL)
        // The scope a refresh asks for (a provider refused the refresh request without it).
        || plain.get(instances::SCOPE) != old_plain.get(instances::SCOPE)
        || secret.get(instances::API_SECRET)
            != secrets.secret_configuration.get(instances::API_SECRET);
    // Tokens brought in are checked before anything is written: a refusal after the write
    // answered 400 for an update that had half happened.
    let imported = if split.access_token.is_some() || split.refresh_token.is_some() {
        Some(imported_tokens(&SplitConfiguration {
            plain: BTreeMap::new(),
            secret: BTreeMap::new(),
            access_token: split.access_token.clone(),
            refresh_token: split.refresh_token.clone(),
            expiry: BTreeMap::new(),
        })?)
    } else {
        None
    };
    // An imported access token is checked as a created instance's is; one the provider
    // rejects is refused when no refresh token can replace it, or replaced at once.
    // The instance is held meanwhile (no refresh, revocation or disable of it goes on): a
    // verification that does not answer soon gives no verdict rather than hold it longer.
    // The expiry given with an imported access token; values the instance shows for its own
    // tokens (a configuration read and written back with a new token) say nothing of the new
    // one, and are left out.
    let expiry = match &imported {
        Some(tokens) if !tokens.access_token.is_empty() => {
            let shown_interval = row
                .access_expires_at
                .zip(row.last_refresh_at)
                .map(|(expires, refreshed)| ((expires - refreshed) / 1000).max(0));
            let mut given = split.expiry.clone();
            for (key, shown) in [
                (instances::ACCESS_EXPIRES_AT, row.access_expires_at),
                (instances::REFRESH_TIME, row.last_refresh_at),
                (instances::REFRESH_INTERVAL, shown_interval),
            ] {
                if shown.is_some_and(|shown| {
                    given.get(key).map(|value| value.trim()) == Some(shown.to_string().as_str())
                }) {
                    given.remove(key);
                }
            }
            instances::imported_expiry(&given, now_ms())?
        }
        _ => instances::ImportedExpiry::default(),
    };
    // The refresh token the instance has after the import: the one it brings, or the stored
    // one given back as shown.
    let keeps_refresh_token = refresh_given_back && secrets.refresh_token.is_some();
    // A PATCH merges: an access token imported alone into an instance that has a refresh
    // token says nothing of it, and is refused rather than guessed at (kept, it may be another
    // user's grant's; dropped, a caller pushing a token refreshed elsewhere loses it). A
    // replacement (`PUT`) has what it gives.
    let names_refresh_token = body
        .configuration
        .as_ref()
        .and_then(Value::as_object)
        .is_some_and(|configuration| configuration.contains_key(instances::REFRESH_TOKEN));
    if matches!(mode, UpdateMode::Merge)
        && imported
            .as_ref()
            .is_some_and(|tokens| tokens.refresh_token.is_none())
        && secrets.refresh_token.is_some()
        && !names_refresh_token
    {
        return Err(ApiError::bad_request(
            "An import replaces the grant's tokens, and this one brings an access token alone: give `oauth.user.refresh_token` too, the new grant's, the stored one back as shown (`********`) to keep it, or \"\" for none; nothing was changed",
        ));
    }
    let expired = match &imported {
        Some(tokens) => expired_import(
            &expiry,
            tokens.refresh_token.is_some() || keeps_refresh_token,
            "was changed",
        )?,
        None => false,
    };
    if expired {
        *refresh_after = true;
    }
    let mut imported_rejected = false;
    // (A disabled instance makes no provider calls: not this one either.)
    if let Some(tokens) = &imported
        && !expired
        && !tokens.access_token.is_empty()
        && !row.is_disabled()
        && let Ok(Some(verified)) = tokio::time::timeout(
            IMPORT_VERIFICATION_WAIT,
            instances::verification(app, &connector, &plain, &tokens.access_token),
        )
        .await
        && let Some(words) = verified.rejection
    {
        let refresh_token = tokens.refresh_token.is_some() || keeps_refresh_token;
        imported_rejection(refresh_token, "was changed", words)?;
        imported_rejected = true;
        *refresh_after = true;
    }
    // A refresh token imported without an access token is refreshed before the answer too,
    // which tells how that went (as a create's does): it said valid, and the instance turned
    // invalid a moment later when the provider refused the token.
    if imported
        .as_ref()
        .is_some_and(|tokens| tokens.access_token.is_empty() && tokens.refresh_token.is_some())
    {
        *refresh_after = true;
    }
    // What the audit entry says changed: names of keys, never their values.
    let changes = update_changes(
        (&row.name, &name),
        (&row.tag_list(), &tags),
        (&old_plain, &plain),
        (&secrets.secret_configuration, &secret),
        imported.is_some(),
    );
    let configuration_json = Value::Object(plain).to_string();
    let written = app
        .store
        .update_instance_metadata(
            row.organization_id,
            row.id,
            &name,
            &serde_json::to_string(&tags).unwrap_or_else(|_| "[]".into()),
            &configuration_json,
            Some(instances::seal_secret_configuration(app, row.id, &secret)),
            Some(crate::store::RowVersion::of(&row)),
            retry_now,
        )
        .await?;
    let Some(written) = written else {
        return Ok(None);
    };
    if let Some(imported) = imported {
        // The caller ([`update`]) holds the instance like a revocation does: no refresh of it
        // is at the provider meanwhile (its rotated token would be lost under the import, or
        // the kept refresh token be one it retired), here or in another replica. `written` is
        // the row as just stored.
        let held = written;
        let now = now_ms();
        let configuration = plain_configuration(&held);
        let held_secrets = open_secrets(app, &held)?;
        let keep = held_secrets
            .refresh_token
            .as_ref()
            .filter(|_| keeps_refresh_token);
        let applied = apply_token_set(
            app,
            &connector,
            held.id,
            &imported,
            keep.map(|token| instances::KeptRefreshToken {
                token,
                expires_at: held.refresh_expires_at,
                last_refresh_at: held.last_refresh_at,
            }),
            &configuration,
            now,
        );
        let mut update = applied.update;
        if imported.access_token.is_empty() {
            update.access_token_enc = None;
        }
        if imported.refresh_token.is_none() {
            // The refresh token kept was not used now: its clocks run on, and the schedule
            // (its keep-alive, its expiry) follows them.
            update.last_refresh_at = held.last_refresh_at;
            update.refresh_expires_at = held.refresh_expires_at;
            update.next_due_at = instances::next_due_at(
                &connector,
                keep.is_some(),
                update.access_expires_at,
                held.refresh_expires_at,
                held.last_refresh_at.unwrap_or(now),
            );
        }
        if !imported.access_token.is_empty() {
            with_imported_expiry(&connector, &mut update, &expiry, now);
        }
        if refresh_import_at_once(&connector, &imported) || imported_rejected || expired {
            update.next_due_at = Some(now);
        }
        let event = events::new_event(app, &held, events::REAUTHENTICATED, Some("tokens imported"));
        let imported_row = app
            .store
            .reauthenticate(
                held.organization_id,
                held.id,
                &Reauthentication {
                    tokens: update,
                    client_secret_enc: None,
                    verification: None,
                    // Cleared here, the lease could be claimed by this replica's scheduler at
                    // once and then cleared by the hold's end, the claimed refresh running
                    // unleased beside another replica's.
                    lease_held_by: Some(app.replica_id.clone()),
                    landed_code: None,
                    name: None,
                    tags_json: None,
                    expected_updated_at: None,
                },
                Some(&event),
            )
            .await?;
        if imported_row.is_none() {
            // The hold's lease went to a refresh elsewhere (its renewals failed): the tokens
            // are not written under that refresh, which would retire them.
            return Err(ApiError::conflict(
                "A refresh elsewhere took the instance while its tokens were imported: the rest of the update was saved, the tokens were not; send the update again",
            ));
        }
        // The scheduler sleeps until its next due instance: an import due now wakes it.
        app.refresh.notify_schedule_changed();
    } else if retry_now {
        // A backoff ended: the refresh is due now.
        app.refresh.notify_schedule_changed();
    }
    app.refresh.forget(row.id);
    crate::audit::record(
        app,
        caller,
        "instance.updated",
        Some(&row.id.to_string()),
        Some(&changes),
    )
    .await;
    let stored = reload(app, &row).await?;
    respond(app, caller, stored).await.map(Some)
}

/// An update's audit detail: what it changed, by name (`name`, `tags`, the configuration keys
/// added, changed or removed, sealed ones included, and `tokens imported`), never a value.
fn update_changes(
    name: (&String, &String),
    tags: (&Vec<String>, &Vec<String>),
    plain: (
        &serde_json::Map<String, Value>,
        &serde_json::Map<String, Value>,
    ),
    secret: (&BTreeMap<String, String>, &BTreeMap<String, String>),
    tokens_imported: bool,
) -> String {
    let mut changed = Vec::new();
    if name.0 != name.1 {
        changed.push("name".to_string());
    }
    if tags.0 != tags.1 {
        changed.push("tags".to_string());
    }
    // A key's value wherever it is kept: one moved from the open to sealed is not changed.
    let value =
        |plain: &serde_json::Map<String, Value>, secret: &BTreeMap<String, String>, key: &str| {
            plain
                .get(key)
                .map(|value| {
                    value
                        .as_str()
                        .map_or_else(|| value.to_string(), str::to_string)
                })
                .or_else(|| secret.get(key).cloned())
        };
    let mut keys: Vec<&String> = plain
        .0
        .keys()
        .chain(plain.1.keys())
        .chain(secret.0.keys())
        .chain(secret.1.keys())
        .filter(|key| value(plain.0, secret.0, key) != value(plain.1, secret.1, key))
        .collect();
    keys.sort();
    keys.dedup();
    if !keys.is_empty() {
        const SHOWN: usize = 20;
        let mut names: Vec<String> = keys
            .iter()
            .take(SHOWN)
            .map(|key| key.chars().take(100).collect())
            .collect();
        if keys.len() > SHOWN {
            names.push(format!("and {} more", keys.len() - SHOWN));
        }
        changed.push(format!("configuration ({})", names.join(", ")));
    }
    if tokens_imported {
        changed.push("tokens imported".to_string());
    }
    if changed.is_empty() {
        "changed: nothing".to_string()
    } else {
        format!("changed: {}", changed.join(", "))
    }
}

/// The instance as the caller sees it; one whose stored secrets do not open as the list shows
/// it (`state: unreadable`), not a 500: a change made to it (disabled, enabled) was answered as
/// failed.
async fn respond(app: &App, caller: &Caller, row: InstanceRow) -> ApiResult<AxumJson<Value>> {
    let name = connector_name(app, &row).await;
    Ok(AxumJson(instances::view_or_damaged(
        app,
        &row,
        name.as_deref(),
        caller.holds_element_of(row.id),
    )))
}

#[derive(Debug, Deserialize, Default)]
pub struct DeleteQuery {
    #[serde(default, deserialize_with = "crate::http::json::flag")]
    revoke: Option<bool>,
}

#[utoipa::path(
    delete,
    path = "/elements/api-v2/instances/{id}",
    operation_id = "instances_delete",
    tag = "instances",
    summary = "Delete; `?revoke=true` revokes at the provider first",
    params(("id" = i64, Path, description = "the instance id"), ("revoke" = Option<bool>, Query, description = "revoke the tokens at the provider first")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "Deleted", body = crate::openapi::Deleted),
        (status = 409, description = "With `?revoke=true`: the provider refused the app's credentials, or the revocation could not be sent; the instance is kept", body = crate::openapi::ErrorBody),
        (status = 502, description = "With `?revoke=true`: the provider did not confirm the revocation; the instance is kept", body = crate::openapi::ErrorBody),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn delete(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<DeleteQuery>,
) -> ApiResult<AxumJson<Value>> {
    delete_named(app, caller, id, query.revoke.unwrap_or(false)).await
}

#[utoipa::path(
    delete,
    path = "/elements/api-v2/instances",
    operation_id = "instances_delete_by_token",
    tag = "instances",
    summary = "Delete the instance named by the Element token; `?revoke=true` revokes at the provider first",
    params(("revoke" = Option<bool>, Query, description = "revoke the tokens at the provider first")),
    security(("element" = [])),
    responses(
        (status = 200, description = "Deleted", body = crate::openapi::Deleted),
        (status = 409, description = "With `?revoke=true`: the provider refused the app's credentials, or the revocation could not be sent; the instance is kept", body = crate::openapi::ErrorBody),
        (status = 502, description = "With `?revoke=true`: the provider did not confirm the revocation; the instance is kept", body = crate::openapi::ErrorBody),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn delete_by_token(
    State(app): State<SharedApp>,
    caller: Caller,
    Query(query): Query<DeleteQuery>,
) -> ApiResult<AxumJson<Value>> {
    let id = caller.require_element()?.id.to_string();
    delete_named(app, caller, id, query.revoke.unwrap_or(false)).await
}

async fn delete_named(
    app: SharedApp,
    caller: Caller,
    id: String,
    revoke: bool,
) -> ApiResult<AxumJson<Value>> {
    let row = load_for_call(&app, &caller, &id).await?;
    // No refresh runs meanwhile: the tokens revoked are the ones the instance holds, and no
    // refresh commits onto a row being deleted. A task of its own, like a refresh: a caller
    // hanging up must not cut it between the revocation and the delete.
    let task_app = std::sync::Arc::clone(&app);
    let by = caller.for_the_record();
    let instance_id = row.id;
    let revocation = crate::refresh::spawn_to_the_end(&app, in_this_request(async move {
        let app = task_app;
        let revocation = app
            .refresh
            .with_instance_held(&app, instance_id, async |held| {
                let mut revocation = Value::Null;
                if revoke {
                    // Invalid first, as a revocation is (no event: the deletion's is the one
                    // that counts): a process dying while the provider revokes leaves the
                    // instance invalid, not valid on revoked tokens. The hold keeps its lease.
                    if !app
                        .store
                        .mark_invalid_held(
                            held.id,
                            "revoked",
                            Some(DELETION_UNDER_WAY),
                            None,
                            held.token_version,
                            true,
                        )
                        .await?
                    {
                        return Err(ApiError::conflict(
                            "The instance changed while it was deleted (a refresh completed): send the DELETE again",
                        ));
                    }
                    // The instance is kept, invalid, with the reason: once deleted, its tokens
                    // could never be revoked again.
                    // An instance that was valid says so as a revocation would: the event
                    // (the deletion's own never came) and the audit entry. It had turned
                    // invalid with neither.
                    let kept = async |why: String| {
                        let reason = format!("Deleted with a revocation through tokenwarden, {why}");
                        let event = held
                            .is_valid()
                            .then(|| events::new_event(&app, &held, events::INVALIDATED, Some("revoked")));
                        let _ = app
                            .store
                            .mark_invalid_held(
                                held.id,
                                "revoked",
                                Some(&reason),
                                event.as_ref(),
                                held.token_version + 1,
                                false,
                            )
                            .await;
                        crate::audit::record(
                            &app,
                            &by,
                            "instance.revoked",
                            Some(&held.id.to_string()),
                            Some(&reason),
                        )
                        .await;
                    };
                    revocation = match crate::refresh::revoke_at_provider(&app, &held).await {
                        Ok(revocation) => revocation,
                        // Not sent (our side failed: the database, a key, the connector): the
                        // reason says so rather than "under way".
                        Err(error) => {
                            // Our side failing may pass; a connector gone or missing an input
                            // will not, and the instance is deleted without the revocation.
                            let why = if error.status.is_client_error() {
                                format!(
                                    "which cannot be sent ({}): kept; DELETE without `?revoke=true` deletes it",
                                    error.message
                                )
                            } else {
                                format!(
                                    "which could not be sent ({}; request {}): kept so that the DELETE can be sent again",
                                    error.message,
                                    crate::http::error::current_request_id()
                                )
                            };
                            kept(why).await;
                            return Err(error);
                        }
                    };
                    // The provider could not answer (down, timing out, rate limiting), or refused
                    // the app's credentials: the grant may live on, and the instance is kept
                    // (sent again, the DELETE helps at once, or once the credentials are fixed).
                    // A refusal that will not change (tokens dead already, a token the provider
                    // cannot revoke) deletes.
                    let kept_because = if revocation["retryable"] == true {
                        Some((
                            StatusCode::BAD_GATEWAY,
                            "which the provider did not confirm",
                            "kept so that the DELETE can be sent again",
                            "The provider did not confirm the revocation: the instance is kept so that it can be tried again (DELETE without `?revoke=true` deletes it at once)",
                        ))
                    } else if revocation["clientRejected"] == true {
                        Some((
                            StatusCode::CONFLICT,
                            "which the provider refused for the app's credentials",
                            "kept; fix `oauth.api.key` and `oauth.api.secret` and send the DELETE again, or DELETE without `?revoke=true`",
                            "The provider refused the app's credentials, so the grant was not revoked: the instance is kept; fix `oauth.api.key` and `oauth.api.secret` and send the DELETE again, or DELETE without `?revoke=true` to delete it at once",
                        ))
                    } else {
                        None
                    };
                    if let Some((status, what, then, answer)) = kept_because
                        && let Some(message) = revocation["providerMessage"].as_str()
                    {
                        kept(format!("{what} ({message}): {then}")).await;
                        return Err(ApiError::new(status, answer)
                            .with_provider_message(message.to_string()));
                    }
                }
                // Whether the grant lives on, said with the deletion: once the instance is
                // gone, nothing can revoke it any more.
                let grant = deleted_grant(revoke, &revocation, &held);
                let event = events::new_event(&app, &held, events::DELETED, Some(&grant));
                if !app
                    .store
                    .delete_instance(held.organization_id, held.id, Some(&event))
                    .await?
                {
                    return Err(ApiError::not_found(format!("There is no instance {id}")));
                }
                Ok((revocation, grant))
            })
            .await?;
        let (revocation, grant) = revocation;
        app.refresh.forget(instance_id);
        let target = instance_id.to_string();
        crate::audit::record(&app, &by, "instance.deleted", Some(&target), Some(&grant)).await;
        Ok::<_, ApiError>(revocation)
    }))
    .await
    .map_err(|error| ApiError::internal(format!("the deletion stopped: {error}")))??;
    Ok(AxumJson(
        serde_json::json!({"id": row.id, "deleted": true, "revocation": revocation}),
    ))
}

/// The reason a revocation the provider confirmed leaves on the instance.
const REVOKED_CONFIRMED: &str = "The grant was revoked through tokenwarden";

/// What a deletion did with the instance's grant, for its event and audit entry (`held`: the
/// instance as the deletion found it).
fn deleted_grant(revoke: bool, revocation: &Value, held: &InstanceRow) -> String {
    if !revoke
        && held.state_reason.as_deref() == Some("revoked")
        && held.provider_message.as_deref() == Some(REVOKED_CONFIRMED)
    {
        return "the grant had been revoked at the provider before (a revocation through tokenwarden)".into();
    }
    if !revoke {
        return "the grant was not revoked at the provider (deleted without `?revoke=true`)".into();
    }
    if revocation["revokedAtProvider"] == true {
        return "the grant was revoked at the provider".into();
    }
    match revocation["providerMessage"]
        .as_str()
        .or(revocation["message"].as_str())
    {
        Some(why) => format!(
            "the grant was not revoked at the provider: {}",
            crate::oauth::cut_text(why, 300)
        ),
        None => "the grant was not revoked at the provider".into(),
    }
}

async fn set_enabled(
    app: &SharedApp,
    caller: &Caller,
    row: InstanceRow,
    enabled: bool,
) -> ApiResult<AxumJson<Value>> {
    let event_type = if enabled {
        events::ENABLED
    } else {
        events::DISABLED
    };
    // Enabling an enabled instance (or disabling a disabled one) changes nothing, and tells no
    // one: no event, no webhook, no audit entry. The event is dated as it is written.
    async fn write(
        app: &App,
        row: &InstanceRow,
        event_type: &str,
        enabled: bool,
    ) -> Result<bool, crate::store::StoreError> {
        let event = events::new_event(app, row, event_type, None);
        app.store
            .set_disabled(row.organization_id, row.id, !enabled, Some(&event))
            .await
    }
    let changed = if enabled {
        write(app, &row, event_type, true).await?
    } else {
        // Written under the instance's hold: a refresh under way (another replica's scheduler
        // may have claimed the instance a moment ago, and trusts its claim for a few seconds)
        // ends first, so none runs after the 200 (the contract: a disabled instance makes no
        // provider calls and no refreshes), and its `instance.token.refreshed` or
        // `instance.invalidated` comes before `instance.disabled`, as it happened. Written
        // first, the disable's event came before the refresh's. A refresh that hangs at its
        // provider past the hold's wait does not keep the disable from being written.
        // A task of its own, like a deletion: a caller hanging up while it waits must not cut
        // it between taking the hold and writing.
        let (task_app, task_row) = (std::sync::Arc::clone(app), row.clone());
        crate::refresh::spawn_to_the_end(
            app,
            in_this_request(async move {
                let (app, row) = (task_app, task_row);
                let held = app
                    .refresh
                    .with_instance_held(&app, row.id, async |_| {
                        Ok(write(&app, &row, event_type, false).await?)
                    })
                    .await;
                match held {
                    Ok(changed) => Ok(changed),
                    Err(error) if error.status == StatusCode::SERVICE_UNAVAILABLE => {
                        Ok(write(&app, &row, event_type, false).await?)
                    }
                    Err(error) => Err(error),
                }
            }),
        )
        .await
        .map_err(|error| ApiError::internal(format!("the disable stopped: {error}")))??
    };
    app.refresh.forget(row.id);
    if changed {
        app.refresh.notify_schedule_changed();
        crate::audit::record(app, caller, event_type, Some(&row.id.to_string()), None).await;
    }
    let stored = reload(app, &row).await?;
    respond(app, caller, stored).await
}

#[utoipa::path(
    put,
    path = "/elements/api-v2/instances/enabled",
    operation_id = "instances_enable",
    tag = "instances",
    summary = "Enable the instance named by the Element token",
    security(("element" = [])),
    responses(
        (status = 200, description = "The instance", body = crate::openapi::Instance),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn enable(State(app): State<SharedApp>, caller: Caller) -> ApiResult<AxumJson<Value>> {
    let row = caller.require_element()?.clone();
    set_enabled(&app, &caller, row, true).await
}

#[utoipa::path(
    delete,
    path = "/elements/api-v2/instances/enabled",
    operation_id = "instances_disable",
    tag = "instances",
    summary = "Disable the instance named by the Element token",
    security(("element" = [])),
    responses(
        (status = 200, description = "The instance", body = crate::openapi::Instance),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn disable(State(app): State<SharedApp>, caller: Caller) -> ApiResult<AxumJson<Value>> {
    let row = caller.require_element()?.clone();
    set_enabled(&app, &caller, row, false).await
}

#[utoipa::path(
    put,
    path = "/elements/api-v2/instances/{id}/enabled",
    operation_id = "instances_enable_by_id",
    tag = "instances",
    summary = "Enable",
    params(("id" = i64, Path, description = "the instance id")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The instance", body = crate::openapi::Instance),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn enable_by_id(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<AxumJson<Value>> {
    let row = load_for_call(&app, &caller, &id).await?;
    set_enabled(&app, &caller, row, true).await
}

#[utoipa::path(
    delete,
    path = "/elements/api-v2/instances/{id}/enabled",
    operation_id = "instances_disable_by_id",
    tag = "instances",
    summary = "Disable: no provider calls, no refreshes",
    params(("id" = i64, Path, description = "the instance id")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The instance", body = crate::openapi::Instance),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn disable_by_id(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<AxumJson<Value>> {
    let row = load_for_call(&app, &caller, &id).await?;
    set_enabled(&app, &caller, row, false).await
}

#[utoipa::path(
    post,
    path = "/elements/api-v2/instances/{id}/tokens/refresh",
    operation_id = "instances_refresh_now",
    tag = "instances",
    summary = "Refresh the access token now",
    params(("id" = i64, Path, description = "the instance id")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "Refreshed: the instance", body = crate::openapi::Instance),
        (status = 409, description = "The instance is disabled, or its grant is gone (`providerMessage` has the provider's words): it needs re-authentication", body = crate::openapi::ErrorBody),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn refresh_now(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<AxumJson<Value>> {
    let row = load_for_call(&app, &caller, &id).await?;
    if row.is_disabled() {
        return Err(ApiError::conflict(
            "The instance is disabled: enable it first",
        ));
    }
    // Without a refresh token there is nothing to refresh with: the instance stays as it is
    // (its access token may well work; a refresh attempt would only end it).
    if row.is_valid()
        && row.access_token_enc.is_some()
        && open_secrets(&app, &row)?.refresh_token.is_none()
    {
        return Err(ApiError::conflict(
            "The provider gave this instance no refresh token, so it cannot be refreshed; re-authenticate it for new tokens",
        ));
    }
    // "Now" means now: a backoff from earlier transient failures does not hold an explicit
    // refresh back (it answered 503 "waiting before the next" without asking the provider),
    // once in a few seconds per instance; nor does one after the provider refused the app's
    // credentials (they may have been fixed at the provider, where a PATCH sees no change).
    // A wait the provider asked for still does.
    if row
        .backoff_until
        .is_some_and(|until| until > crate::app::now_ms())
        && app.refresh.may_force(row.id)
        && app.store.end_transient_backoff(row.id).await?
    {
        app.refresh.forget(row.id);
    }
    app.refresh
        .refresh_now(&app, row.id)
        .await
        .map_err(|failure| {
            let mut error = failure.into_api_error();
            // The proxy's 401 (the contract's, for a runtime's call) would read here as the
            // platform secrets refused: the grant is gone, and the instance needs its user.
            if error.status == StatusCode::UNAUTHORIZED {
                error.status = StatusCode::CONFLICT;
                error.message = "The provider no longer accepts this instance's grant: it needs re-authentication (PATCH with a new code)".into();
            }
            error
        })?;
    crate::audit::record(
        &app,
        &caller,
        "instance.token.refreshed",
        Some(&row.id.to_string()),
        None,
    )
    .await;
    let stored = reload(&app, &row).await?;
    respond(&app, &caller, stored).await
}

#[utoipa::path(
    post,
    path = "/elements/api-v2/instances/{id}/tokens/revoke",
    operation_id = "instances_revoke",
    tag = "instances",
    summary = "Revoke at the provider; the instance turns invalid",
    params(("id" = i64, Path, description = "the instance id")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "Revoked at the provider: the instance, invalid, with `revocation`", body = crate::openapi::Instance),
        (status = 409, description = "Not revoked: the provider refused the app's credentials, the revocation could not be sent, or the instance kept changing (the instance is invalid all the same)", body = crate::openapi::ErrorBody),
        (status = 502, description = "The provider did not confirm the revocation; try again (the instance is invalid all the same)", body = crate::openapi::ErrorBody),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn revoke(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<AxumJson<Value>> {
    let row = load_for_call(&app, &caller, &id).await?;
    // No refresh runs meanwhile: the tokens revoked are the ones the instance holds. A task of
    // its own, like a refresh: a caller hanging up must not cut it between the revocation and
    // the invalidation.
    let task_app = std::sync::Arc::clone(&app);
    let by = caller.for_the_record();
    let id = row.id;
    let revocation = crate::refresh::spawn_to_the_end(
        &app,
        in_this_request(async move {
            let app = task_app;
            let revocation = app
                .refresh
                .with_instance_held(&app, id, async |held| {
                    // Invalid first, then the provider: a process that dies while the provider
                    // revokes leaves the instance invalid, not valid on revoked tokens. At the
                    // version held, retiring its tokens (no refresh in flight commits after).
                    // The lease stays the hold's: nothing else writes while the provider is
                    // asked. A refresh that outlived its lease may still commit under the
                    // hold: the tokens revoked are then the ones it stored, read again.
                    let mut held = held;
                    let mut invalidated = false;
                    for _ in 0..3 {
                        // An instance invalid already (a revocation sent again, confirmed or
                        // not, or a grant that had ended) announces no second invalidation:
                        // each event has an id of its own, and receivers took every one for a
                        // new loss of the connection.
                        let again = !held.is_valid();
                        let event = (!again).then(|| {
                            events::new_event(&app, &held, events::INVALIDATED, Some("revoked"))
                        });
                        if app
                            .store
                            .mark_invalid_held(
                                held.id,
                                "revoked",
                                Some(REVOCATION_UNDER_WAY),
                                event.as_ref(),
                                held.token_version,
                                true,
                            )
                            .await?
                        {
                            invalidated = true;
                            break;
                        }
                        held = reload(&app, &held).await?;
                    }
                    // The contract's order holds for the answer: invalid whatever the provider
                    // said. A revocation that could not be sent says why, and whether trying
                    // again may help (our side failing: the database, a key). Tokens the
                    // instance no longer holds (a refresh committed under the hold) are not
                    // revoked: the revocation is to be sent again.
                    let mut revocation = if !invalidated {
                        serde_json::json!({
                            "revokedAtProvider": false,
                            "retryable": true,
                            "message": "The instance kept changing while it was revoked (refreshes completed): nothing was revoked; revoke it again",
                        })
                    } else {
                        match crate::refresh::revoke_at_provider(&app, &held).await {
                            Ok(revocation) => revocation,
                            Err(error) => serde_json::json!({
                                "revokedAtProvider": false,
                                "sent": false,
                                "retryable": error.status.is_server_error(),
                                "message": format!("The revocation could not be sent: {}", error.message),
                            }),
                        }
                    };
                    // The reason says what the provider confirmed.
                    let message = if revocation["revokedAtProvider"] == true {
                        REVOKED_CONFIRMED.to_string()
                    } else {
                        format!(
                            "Revoked through tokenwarden; the provider did not confirm it: {}",
                            revocation["providerMessage"]
                                .as_str()
                                .or(revocation["message"].as_str())
                                .unwrap_or("no answer")
                        )
                    };
                    if invalidated {
                        app.store
                            .mark_invalid_held(
                                held.id,
                                "revoked",
                                Some(&message),
                                None,
                                held.token_version + 1,
                                false,
                            )
                            .await?;
                    }
                    revocation["instanceInvalidated"] = Value::Bool(invalidated);
                    // The instance as the revocation left it, read before the hold ends: a
                    // re-authentication waiting for it writes next.
                    Ok((revocation, reload(&app, &held).await?))
                })
                .await?;
            app.refresh.forget(id);
            crate::audit::record(&app, &by, "instance.revoked", Some(&id.to_string()), None).await;
            Ok::<_, ApiError>(revocation)
        }),
    )
    .await
    .map_err(|error| ApiError::internal(format!("the revocation stopped: {error}")))??;
    let (revocation, stored) = revocation;
    // Invalid whatever the provider said (the contract's order), but a grant that may live on
    // at the provider is not answered 200: a script checking the status took it as revoked.
    if revocation["revokedAtProvider"] != true
        && let Some(refusal) = unconfirmed_revocation(&revocation)
    {
        return Err(refusal);
    }
    let name = connector_name(&app, &stored).await;
    let mut view = instances::view_or_damaged(
        &app,
        &stored,
        name.as_deref(),
        caller.holds_element_of(row.id),
    );
    if let Some(object) = view.as_object_mut() {
        object.insert("revocation".into(), revocation);
    }
    Ok(AxumJson(view))
}

/// The answer to a revocation the provider did not confirm and that sending it again may
/// confirm: 409 when nothing was revoked (the instance kept changing), the revocation could
/// not be sent (the connector gone) or the provider refused the app's credentials (each to be
/// fixed first), 502 when the provider could not answer or our side failed. `None` when
/// trying again cannot help (tokens dead already, no revocation endpoint): the answer is the
/// instance, with what the provider said.
fn unconfirmed_revocation(revocation: &Value) -> Option<ApiError> {
    let said = revocation["providerMessage"]
        .as_str()
        .or(revocation["message"].as_str())
        .unwrap_or("no answer");
    // In the order `DELETE ?revoke=true` reads them.
    let refusal = if revocation["instanceInvalidated"] == false {
        ApiError::conflict(said.to_string())
    } else if revocation["retryable"] != true && revocation["sent"] == false {
        // Not sent, and sending it again will not help until the cause is fixed (the
        // connector gone, an input missing).
        ApiError::conflict(format!(
            "{said}: the instance is invalid, and its grant lives on at the provider"
        ))
    } else if revocation["retryable"] != true && revocation["clientRejected"] == true {
        ApiError::conflict(
            "The provider refused the app's credentials, so the grant was not revoked: the instance is invalid; fix `oauth.api.key` and `oauth.api.secret` and send the revocation again",
        )
    } else if revocation["retryable"] == true {
        let unconfirmed = "The provider did not confirm the revocation, and the grant may live on there: the instance is invalid; send the revocation again";
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            match revocation["message"].as_str() {
                // Not sent: our side failed.
                Some(why) => format!("{unconfirmed} ({why})"),
                None => unconfirmed.to_string(),
            },
        )
    } else {
        return None;
    };
    Some(match revocation["providerMessage"].as_str() {
        Some(message) => refusal.with_provider_message(message.to_string()),
        None => refusal,
    })
}

/// An instance's reason while a DELETE's revocation is at the provider.
const DELETION_UNDER_WAY: &str =
    "Deleted with a revocation through tokenwarden; the revocation at the provider was under way";

/// An instance's reason while its revocation is at the provider: what stays if the process
/// dies before the provider answers.
const REVOCATION_UNDER_WAY: &str =
    "Revoked through tokenwarden; the revocation at the provider was under way";

/// `work` keeps this request's id (for the audit log and errors) when it runs as a task of its
/// own.
fn in_this_request<F: Future>(work: F) -> impl Future<Output = F::Output> {
    use tracing::Instrument;
    let request_id = axum::http::HeaderValue::from_str(&crate::http::error::current_request_id())
        .unwrap_or_else(|_| axum::http::HeaderValue::from_static("0"));
    // The request's span too, so that what the task logs names the request.
    crate::http::error::REQUEST_ID.scope(request_id, work.instrument(tracing::Span::current()))
}

/// Whether an imported access token is past the expiry given with it (`expiry`): expired, it
/// is refreshed at once when a refresh token can replace it (true), and refused otherwise,
/// like one the provider rejects, with nothing written (`nothing` says what).
fn expired_import(
    expiry: &instances::ImportedExpiry,
    has_refresh_token: bool,
    nothing: &str,
) -> ApiResult<bool> {
    let Some(at) = expiry.access_expires_at.filter(|at| *at <= now_ms()) else {
        return Ok(false);
    };
    if has_refresh_token {
        return Ok(true);
    }
    Err(ApiError::bad_request(format!(
        "The imported access token expired at {} (`{}`), and there is no refresh token to replace it: nothing {nothing}",
        instances::iso8601(at),
        expiry.from_key.unwrap_or(instances::ACCESS_EXPIRES_AT)
    )))
}

/// Puts the expiry an import gave (`expiry`) into the token columns `update` holds for the
/// imported tokens, and the schedule that follows from it: the same as a token response's
/// `expires_in` (and, for Cloud Elements' refresh time, the last refresh it gave).
fn with_imported_expiry(
    connector: &Connector,
    update: &mut TokenUpdate,
    expiry: &instances::ImportedExpiry,
    now: i64,
) {
    if expiry.access_expires_at.is_none() {
        return;
    }
    update.access_expires_at = expiry.access_expires_at;
    if let Some(refreshed) = expiry.refreshed_at {
        update.last_refresh_at = Some(refreshed);
    }
    update.next_due_at = instances::next_due_at(
        connector,
        update.refresh_token_enc.is_some(),
        update.access_expires_at,
        update.refresh_expires_at,
        update.last_refresh_at.unwrap_or(now),
    );
}

/// How long an update importing tokens, which holds the instance, waits for the verification
/// of the imported access token.
const IMPORT_VERIFICATION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// An imported access token the provider's verification call rejected (`words`): refused,
/// with nothing written (`nothing` says what), when no refresh token can replace it; when one
/// can, the caller refreshes at once. A create or import of tokens the provider refuses was
/// answered `valid: true`, and its first call 401.
fn imported_rejection(has_refresh_token: bool, nothing: &str, words: String) -> ApiResult<()> {
    if has_refresh_token {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "The provider rejects the imported access token, and there is no refresh token to replace it: nothing {nothing}"
    ))
    .with_provider_message(words))
}

/// Whether imported tokens are refreshed as soon as the scheduler looks: a refresh token
/// without an access token (nothing to call with otherwise), or one that dies unused (a
/// connector with a keep-alive: Adobe Sign's 60 days, Box's), whose inactivity clock then
/// starts here, since when it was last used elsewhere is unknown. Otherwise the tokens serve
/// as they were brought in, until their expiry or a rejection: an import does not rotate them
/// behind the caller's back (nor retire the copy another system may still hold).
fn refresh_import_at_once(connector: &Connector, imported: &crate::oauth::TokenSet) -> bool {
    imported.refresh_token.is_some()
        && (imported.access_token.is_empty() || connector.refresh.keep_alive_seconds.is_some())
}

/// The instance as stored now (after a change made by this request).
async fn reload(app: &App, row: &InstanceRow) -> ApiResult<InstanceRow> {
    app.store
        .get_instance(row.organization_id, row.id)
        .await?
        .ok_or_else(|| ApiError::not_found("The instance was deleted meanwhile"))
}

/// An instance with a refresh token needs the client id to refresh it: without one, the
/// provider's `invalid_client` would end the instance at its first refresh, moments after the
/// 200 that created or changed it.
fn require_client_id(plain: &Map<String, Value>) -> ApiResult<()> {
    let given = plain
        .get(API_KEY)
        .and_then(Value::as_str)
        .is_some_and(|id| !id.trim().is_empty());
    if given {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "`configuration.oauth.api.key` (the OAuth client id) is required to refresh the instance's tokens",
        ))
    }
}

/// `event.notification.enabled`: `"true"` or `"false"` (any case), or blank (off). Another
/// value (`"yes"`) was stored, and read as false: the webhooks asked for never went.
fn check_webhook_enabled(configuration: &Map<String, Value>) -> ApiResult<()> {
    // As the deliverer reads it: a padded `" true"` is no true.
    match configuration
        .get(instances::WEBHOOK_ENABLED)
        .and_then(Value::as_str)
    {
        Some(value)
            if !value.is_empty()
                && !value.eq_ignore_ascii_case("true")
                && !value.eq_ignore_ascii_case("false") =>
        {
            Err(ApiError::bad_request(format!(
                "`{}` is \"true\" or \"false\", not {value:?}",
                instances::WEBHOOK_ENABLED
            )))
        }
        _ => Ok(()),
    }
}

/// `oauth.callback.url`, when given: a redirect URI (see
/// [`crate::oauth::redirect_uri_problem`]); it is sent with the code's exchange.
fn check_callback_url(configuration: &Map<String, Value>) -> ApiResult<()> {
    match configuration.get(CALLBACK_URL).and_then(Value::as_str) {
        Some(given) if !given.trim().is_empty() => {
            match crate::oauth::redirect_uri_problem(given) {
                Some(why) => Err(ApiError::bad_request(format!(
                    "`{CALLBACK_URL}` is no redirect URI: {why}"
                ))),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// A webhook URL given by a caller: an absolute http(s) URL with a host, not where no receiver
/// lives (see `egress`); empty means none. Accepted otherwise, it failed only at delivery,
/// shown in an event's `lastError`, and a scheme no delivery can use was retried for a day,
/// holding the instance's later webhooks behind it.
fn check_webhook_url(app: &App, configuration: &Map<String, Value>) -> ApiResult<()> {
    let Some(given) = configuration
        .get(instances::WEBHOOK_URL)
        .and_then(Value::as_str)
    else {
        return Ok(());
    };
    if given.trim().is_empty() {
        return Ok(());
    }
    let refused = |why: String| {
        ApiError::bad_request(format!(
            "`{}` is not a URL webhooks can go to: {why}",
            instances::WEBHOOK_URL
        ))
    };
    let url = url::Url::parse(given.trim()).map_err(|error| refused(error.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(refused("an http or https URL with a host is needed".into()));
    }
    // The configuration is shown to whoever reads the instance: a password in the URL would be
    // too. The receiver knows the sender by the signature.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refused(
            "user info (`user:password@`) is not kept in a URL anyone reading the instance sees; a receiver checks `X-Tokenwarden-Signature`, signed with `event.notification.signature.key`".into(),
        ));
    }
    app.config.egress.check_url(&url).map_err(refused)
}

/// A `base.url` given by a caller: one the proxy can go under (an absolute http(s) URL without
/// user info, query or fragment, and not where no provider lives or the operator refuses, see
/// `egress`). Accepted otherwise, it made every proxied call of the instance fail (409), and
/// user info in it was shown in plain text.
fn check_base_url(app: &App, configuration: &Map<String, Value>) -> ApiResult<()> {
    let Some(base) = configuration.get(BASE_URL).and_then(Value::as_str) else {
        return Ok(());
    };
    crate::proxy::ProxyBase::parse_named(base, "`base.url`").map_err(ApiError::bad_request)?;
    app.config
        .egress
        .check_text(base)
        .map_err(|why| ApiError::bad_request(format!("`base.url`: {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wrong `element` says what it takes, not the name of a Rust type.
    #[test]
    fn a_wrong_element_says_what_it_takes() {
        let said = serde_json::from_str::<ElementRef>(r#"{"id": 5}"#)
            .unwrap_err()
            .to_string();
        assert!(
            said.contains(r#"a connector's key: "box" or {"key": "box"}"#),
            "{said}"
        );
        assert!(!said.contains("ElementRef"), "{said}");
    }
}
