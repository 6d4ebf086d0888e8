//! The connector catalog: what tokenwarden knows about each OAuth 2.0 provider.
//!
//! The built-in connectors are data (`catalog/connectors.toml`, embedded in the binary), loaded
//! and validated once at start. An organization's own connectors (`POST /elements`) are the same
//! [`Connector`] type, stored as JSON. Field names are the same camelCase in the TOML file, in the
//! `POST /elements` body and in `GET /elements` answers, so there is one schema to learn.
//!
//! Every quirk has a default that works for a standards-compliant server (RFC 6749, RFC 7009), so
//! a connector for an unknown provider needs only its URLs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The built-in catalog file, embedded so the binary needs no file next to it.
pub const BUILT_IN_CATALOG: &str = include_str!("../catalog/connectors.toml");

/// One provider definition ("element" in the articles).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Connector {
    /// Unique key, lowercase letters, digits and `-` (e.g. `adobe-esign`).
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{1,62}$", min_length = 2, max_length = 63)]
    pub key: String,
    #[schema(min_length = 1, max_length = 190)]
    pub name: String,
    /// CRM, e-signature, file-storage, accounting, hr, ticketing, chat, calendar-mail, dev-tools,
    /// marketing, e-commerce, productivity, sandbox, other.
    #[serde(default)]
    pub category: Option<String>,
    /// The provider's own OAuth documentation. Required for built-in connectors.
    #[serde(default)]
    pub documentation_url: Option<String>,
    /// Where API calls go: `base.url` of a new instance. May contain `{input}` templates, filled
    /// from the instance configuration (see `inputs`), and `{sandbox}` for the sandbox URL.
    pub base_url: String,
    /// Templated parts a user fills in (a Shopify shop, a Zendesk subdomain, a Microsoft tenant).
    /// The instance configuration key is the input's name.
    #[serde(default)]
    pub inputs: BTreeMap<String, ConnectorInput>,
    pub oauth: OAuthSpec,
    #[serde(default)]
    pub refresh: RefreshSpec,
    #[serde(default)]
    pub rejection: RejectionSpec,
    /// One cheap call that proves a grant works, made after a create or re-authentication.
    #[serde(default)]
    pub verify: Option<VerifySpec>,
    /// How calls through the proxy are made for this connector's instances.
    #[serde(default, skip_serializing_if = "ProxySpec::is_default")]
    pub proxy: ProxySpec,
    /// Facts that could not be confirmed from the provider's documentation, said plainly.
    #[serde(default)]
    pub unconfirmed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectorInput {
    pub description: String,
    #[serde(default)]
    pub default: Option<String>,
    /// A field of the authorization redirect that names the input's value inside a URL of the
    /// connector's `baseUrl` shape (Adobe Acrobat Sign's `api_access_point`,
    /// `https://api.eu1.adobesign.com/`, gives `shard` = `eu1`): taken when the configuration
    /// does not give the input, so the code is exchanged at the account's own host; and from
    /// a token response that has the field, whose word is the provider's last.
    #[serde(default)]
    pub from_redirect: Option<String>,
    /// Other URL shapes that field takes, besides `baseUrl`'s, with the input's placeholder
    /// (Adobe answers `https://api.{shard}.echosign.com/` as often as the adobesign.com form).
    /// Only the placeholder's value is taken from the redirect, never a host of its own.
    #[serde(default)]
    pub redirect_shapes: Vec<String>,
}

/// The value of input `name` in `url`, read against `template` (a URL with `{name}` in it and
/// no other placeholder): `https://api.{shard}.adobesign.com/` and
/// `https://api.eu1.adobesign.com` give `eu1`. `None` when `url` is not of that shape.
pub fn input_in_url(template: &str, name: &str, url: &str) -> Option<String> {
    let placeholder = format!("{{{name}}}");
    let (prefix, suffix) = template.split_once(&placeholder)?;
    if prefix.contains('{') || suffix.contains('{') {
        return None;
    }
    let url = url.trim().to_ascii_lowercase();
    let rest = url.strip_prefix(&prefix.to_ascii_lowercase())?;
    let suffix = suffix.to_ascii_lowercase();
    // With or without the template's trailing slash.
    let value = rest
        .strip_suffix(&suffix)
        .or_else(|| rest.strip_suffix(suffix.trim_end_matches('/')))?;
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    plain.then(|| value.to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OAuthSpec {
    pub authorization_url: String,
    pub token_url: String,
    /// A separate refresh endpoint (Adobe Sign); `None` means the token URL.
    #[serde(default)]
    pub refresh_url: Option<String>,
    #[serde(default)]
    pub revoke_url: Option<String>,
    /// The shape of the revocation request. Default: RFC 7009 when `revokeUrl` is set, else none.
    #[serde(default)]
    pub revocation: Option<RevocationStyle>,
    /// Revoking one token of a grant revokes the others (Adobe Sign, Google, Dropbox, Box): one
    /// revocation suffices. Otherwise both the refresh and the access token are revoked, so a
    /// provider that revokes only the refresh token (HubSpot) leaves nothing alive.
    #[serde(default)]
    pub revocation_cascades: bool,
    /// After a re-authentication, the refresh token it replaced is revoked (Salesforce: a user
    /// holds at most five grants of an app, and a sixth silently ends the oldest, which may be
    /// another instance's). Not where a revocation ends every grant of the user (Google).
    #[serde(default)]
    pub revoke_superseded_grant: bool,
    /// The authorization server's issuer identifier (RFC 8414 `issuer`). With it, a code whose
    /// redirect carries another `iss` (RFC 9207: an authorization response from a server
    /// other than the one the flow began at, a mix-up attack) is refused before it is
    /// exchanged. Without it, `iss` is not checked.
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    /// May contain `{input}` placeholders (Dynamics: `https://{org}.crm.dynamics.com/...`), filled
    /// like the URLs.
    pub scopes: Vec<String>,
    #[serde(default = "default_scope_separator")]
    pub scope_separator: String,
    #[serde(default)]
    pub client_auth: ClientAuth,
    #[serde(default)]
    pub pkce: bool,
    /// Extra parameters on the authorization URL, e.g. those that get a refresh token
    /// (`access_type=offline`, `prompt=consent`, `token_access_type=offline`); not the ones the
    /// service sets (`client_id`, `redirect_uri`, `state`, …), nor `scope` beside `scopes`.
    #[serde(default)]
    pub authorization_params: BTreeMap<String, String>,
    /// Extra parameters on every refresh request (Microsoft's `scope`); not the ones the service
    /// sets (`grant_type`, `refresh_token`, `client_secret`). `"client_id": "{client_id}"` sends
    /// the client's id in the body besides Basic authentication (providers that want both).
    #[serde(default)]
    pub refresh_params: BTreeMap<String, String>,
    /// Extra parameters on the authorization-code exchange (Shopify's `expiring=1`); not the
    /// ones the service sets (`grant_type`, `code`, `redirect_uri`, `code_verifier`,
    /// `client_secret`); `client_id` as for `refreshParams`.
    #[serde(default)]
    pub token_params: BTreeMap<String, String>,
    /// Body encoding of token and refresh requests.
    #[serde(default)]
    pub token_request_format: BodyFormat,
    /// Token-response fields that carry routing data and are kept in the configuration
    /// (`instance_url`, `api_access_point`, `realmId`, …). The whole response is kept anyway
    /// (encrypted); these are the ones shown and used.
    #[serde(default)]
    pub token_response_fields: Vec<String>,
    /// The token-response field (or authorization-redirect parameter) that sets `base.url`.
    #[serde(default)]
    pub base_url_from: Option<String>,
    /// Appended to the `baseUrlFrom` value to make `base.url` (e.g. `api/rest/v6/`).
    #[serde(default)]
    pub base_url_suffix: Option<String>,
    /// Error codes of the token endpoint that mean the grant is gone for good (beyond the RFC's
    /// `invalid_grant` and its known kin), e.g. GitHub's `bad_refresh_token`, Slack's
    /// `invalid_refresh_token`, HubSpot's `BAD_REFRESH_TOKEN`; also `invalid_client` or
    /// `unauthorized_client` for a provider where they mean a dead grant (by default they mean
    /// the app's credentials: the instance stays valid until they are fixed).
    #[serde(default)]
    pub permanent_errors: Vec<String>,
}

fn default_scope_separator() -> String {
    " ".to_string()
}

/// How the client authenticates at the token (and revocation) endpoint. HTTP Basic by default:
/// RFC 6749 §2.3.1 has every server support it, while credentials in the body are optional
/// for a server and not recommended (a server registering each client's method, as Okta or
/// Spring Authorization Server do, refuses the other). The built-in connectors name theirs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    ClientSecretPost,
    #[default]
    ClientSecretBasic,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    #[default]
    Form,
    Json,
}

/// How a provider wants to be told to revoke a token.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RevocationStyle {
    /// RFC 7009: POST form `token=` (+ `token_type_hint`), client authenticated as on the token
    /// endpoint.
    Rfc7009,
    /// POST form `token=` with `client_id` and `client_secret` in the body always (Box, Asana).
    FormWithClientCredentials,
    /// POST with `?token=` in the query string and no body (Salesforce, Adobe Sign as the articles
    /// show them).
    QueryToken,
    /// POST JSON `{"token": …}` with HTTP Basic client auth (QuickBooks).
    JsonBody,
    /// POST with the token itself as `Authorization: Bearer` and no body (Dropbox, Slack).
    Bearer,
    /// `DELETE {revokeUrl}` with Basic client auth and JSON `{"access_token": …}` (GitHub).
    GithubDelete,
    /// `DELETE {revokeUrl}/{refresh_token}` (HubSpot v1).
    DeleteRefreshTokenPath,
    /// The provider has no revocation endpoint: revocation is local only.
    None,
}

impl RevocationStyle {
    /// Whether the endpoint takes refresh tokens: the bearer and GitHub shapes take an access
    /// token only (a refresh token cannot authenticate Slack's or Strava's call, nor name an
    /// authorization at GitHub).
    pub fn takes_refresh_tokens(self) -> bool {
        !matches!(
            self,
            RevocationStyle::Bearer | RevocationStyle::GithubDelete
        )
    }

    /// Whether the endpoint takes access tokens: HubSpot's `DELETE …/{refresh_token}` does not.
    pub fn takes_access_tokens(self) -> bool {
        self != RevocationStyle::DeleteRefreshTokenPath
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RefreshSpec {
    #[serde(default)]
    pub strategy: RefreshStrategy,
    /// `before_expiry`: refresh when the access token is this close to expiry.
    #[serde(default = "default_buffer_seconds")]
    #[schema(maximum = 86_399)]
    pub buffer_seconds: u64,
    /// Refresh an instance not refreshed for this long, so refresh tokens that die of inactivity
    /// stay alive (Adobe Sign: 50 days, as the provider advises for its 60-day idle expiry).
    #[serde(default)]
    pub keep_alive_seconds: Option<u64>,
    /// Whether and how the provider rotates refresh tokens. The engine always keeps whatever
    /// the response carries and keeps the old one when the response has none; a revocation
    /// that needs a fresh access token (`Bearer` endpoints) refreshes for it only under
    /// `none`, as its rotated refresh token is not stored.
    #[serde(default)]
    pub rotation: Rotation,
    /// Refresh tokens die after this many seconds without use (sliding), when known.
    #[serde(default)]
    pub refresh_token_idle_ttl_seconds: Option<u64>,
    /// Refresh tokens die this long after the original authorization, whatever their use.
    #[serde(default)]
    pub refresh_token_absolute_ttl_seconds: Option<u64>,
}

fn default_buffer_seconds() -> u64 {
    300
}

impl Default for RefreshSpec {
    fn default() -> Self {
        RefreshSpec {
            strategy: RefreshStrategy::default(),
            buffer_seconds: default_buffer_seconds(),
            keep_alive_seconds: None,
            rotation: Rotation::default(),
            refresh_token_idle_ttl_seconds: None,
            refresh_token_absolute_ttl_seconds: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefreshStrategy {
    #[default]
    BeforeExpiry,
    #[serde(rename = "on_401")]
    On401,
    EveryRequest,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rotation {
    /// The refresh token stays the same (Google, Adobe Sign, HubSpot, Salesforce by default).
    #[default]
    None,
    /// A per-app setting at the provider (Salesforce).
    Optional,
    /// Each refresh returns a new token and kills the old one (Box, Zendesk, GitHub App, Zoom).
    SingleUse,
    /// Each refresh returns a new token; the old one works for a grace period (Xero, Shopify).
    WithGrace,
    /// A reused old token outside a leeway kills the whole family (Atlassian).
    FamilyRevokedOnReuse,
    /// A new token each refresh, the old one stays valid (Microsoft).
    OldStaysValid,
    /// The refresh response may omit the refresh token (Spotify): keep the old one.
    MayOmit,
}

/// What a rejected access token looks like in an API answer, besides a plain 401.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RejectionSpec {
    /// Statuses that mean the token was rejected (default `[401]`).
    #[serde(default = "default_rejection_statuses")]
    pub statuses: Vec<u16>,
    /// Strings whose presence in a non-2xx body means the token was rejected even with another
    /// status (e.g. `INVALID_SESSION_ID`).
    #[serde(default)]
    pub body_markers: Vec<String>,
    /// Slack-style `200 {"ok": false, "error": X}`: the values of `error` that mean the token was
    /// rejected (`invalid_auth`, `token_expired`, `token_revoked`).
    #[serde(default)]
    pub ok_false_errors: Vec<String>,
}

fn default_rejection_statuses() -> Vec<u16> {
    vec![401]
}

impl Default for RejectionSpec {
    fn default() -> Self {
        RejectionSpec {
            statuses: default_rejection_statuses(),
            body_markers: Vec::new(),
            ok_false_errors: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifySpec {
    #[serde(default = "default_verify_method")]
    pub method: String,
    /// Relative to `base.url`, e.g. `users/me`.
    pub path: String,
}

/// How calls through the proxy are made for a connector's instances.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxySpec {
    /// Seconds the provider may take to begin its answer, and between parts of its body, for
    /// this connector's calls (1 to 86,400): an API of long polls (Salesforce's streaming API
    /// holds one 110 s) or slow reports. Without it, `serve --proxy-timeout` (30 s).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86_400)]
    pub timeout_seconds: Option<u32>,
    /// The request header that carries the access token, for an API that does not take
    /// `Authorization` (Shopify's `X-Shopify-Access-Token`, BigCommerce's `X-Auth-Token`): the
    /// token alone goes in it, and the caller's `Authorization` goes nowhere. Default
    /// `Authorization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_header: Option<String>,
    /// The scheme before the token in `Authorization` (`Bearer` by default; Yandex's `OAuth`).
    /// Not with another `tokenHeader`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_scheme: Option<String>,
}

impl ProxySpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The header that carries the access token on a proxied call, and its value for `token`:
    /// `Authorization: Bearer <token>` unless the connector says otherwise. `None` when the
    /// token cannot be a header value.
    pub fn token_header(
        &self,
        token: &str,
    ) -> Option<(axum::http::HeaderName, axum::http::HeaderValue)> {
        let name = match &self.token_header {
            Some(name) => axum::http::HeaderName::from_bytes(name.as_bytes()).ok()?,
            None => axum::http::header::AUTHORIZATION,
        };
        let value = if name == axum::http::header::AUTHORIZATION {
            format!(
                "{} {token}",
                self.token_scheme.as_deref().unwrap_or("Bearer")
            )
        } else {
            token.to_string()
        };
        let mut value = axum::http::HeaderValue::try_from(value).ok()?;
        value.set_sensitive(true);
        Some((name, value))
    }

    /// Why `tokenHeader`/`tokenScheme` cannot be used, if they cannot.
    fn token_header_problem(&self) -> Option<String> {
        if let Some(name) = &self.token_header {
            let Ok(parsed) = axum::http::HeaderName::from_bytes(name.as_bytes()) else {
                return Some(format!("`proxy.tokenHeader` `{name}` is not a header name"));
            };
            // Headers the proxy sets or drops itself, or that frame the message.
            let theirs = [
                "host",
                "content-length",
                "transfer-encoding",
                "connection",
                "keep-alive",
                "proxy-authorization",
                "proxy-connection",
                "te",
                "trailer",
                "upgrade",
                "cookie",
                // The request's own, which the proxy passes on or adjusts (a token put there
                // would replace them, or be dropped: `accept-encoding` for connectors whose
                // rejections are read in the body), and those providers and CDNs log.
                "accept",
                "accept-encoding",
                "expect",
                "content-type",
                "content-encoding",
                "range",
                "origin",
                "referer",
                "user-agent",
                "forwarded",
                "via",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
                "x-request-id",
            ];
            if theirs.contains(&parsed.as_str()) {
                return Some(format!(
                    "`proxy.tokenHeader` cannot be `{name}`: the proxy sets or drops it itself"
                ));
            }
            if self.token_scheme.is_some() && parsed != axum::http::header::AUTHORIZATION {
                return Some(
                    "`proxy.tokenScheme` goes with `Authorization` only: another `tokenHeader` carries the token alone"
                        .to_string(),
                );
            }
        }
        if let Some(scheme) = &self.token_scheme {
            let token_like = !scheme.is_empty()
                && scheme.len() <= 40
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token_like {
                return Some(format!(
                    "`proxy.tokenScheme` `{scheme}` is not an authentication scheme (one word, as `Bearer`)"
                ));
            }
        }
        None
    }

    /// This connector's proxy timeout, or `server_wide`.
    pub fn timeout(&self, server_wide: std::time::Duration) -> std::time::Duration {
        self.timeout_seconds.map_or(server_wide, |seconds| {
            std::time::Duration::from_secs(u64::from(seconds))
        })
    }
}

fn default_verify_method() -> String {
    "GET".to_string()
}

/// The shape of the catalog file: `[[connector]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    connector: Vec<Connector>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("the catalog file does not parse: {0}")]
    Parse(String),
    #[error("connector `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

/// Parses a catalog file (TOML with `[[connector]]` tables). Does not validate.
pub fn parse_catalog(text: &str) -> Result<Vec<Connector>, CatalogError> {
    toml::from_str::<CatalogFile>(text)
        .map(|file| file.connector)
        .map_err(|error| CatalogError::Parse(error.to_string()))
}

/// The categories a built-in connector may have (`sandbox` only for the `sandbox-*` profiles).
pub const CATEGORIES: &[&str] = &[
    "crm",
    "e-signature",
    "file-storage",
    "accounting",
    "hr",
    "ticketing",
    "chat",
    "calendar-mail",
    "dev-tools",
    "marketing",
    "e-commerce",
    "productivity",
    "other",
];

/// The placeholder for the sandbox provider's URL, usable in every URL of a connector.
pub const SANDBOX_PLACEHOLDER: &str = "sandbox";

/// What `{sandbox}` stands for while validating.
const SANDBOX_SAMPLE: &str = "http://127.0.0.1:4000";

/// A placeholder the engine fills itself, allowed in `revokeUrl` only: the connector's client id
/// (GitHub's `DELETE /applications/{client_id}/token`).
pub const CLIENT_ID_PLACEHOLDER: &str = "client_id";

/// The longest `bufferSeconds` accepted (less than a day).
const MAX_BUFFER_SECONDS: u64 = 86_400;

/// Replaces every `{name}` in `template` with `values[name]`. An unknown placeholder, or an
/// unclosed `{`, is an error naming it.
pub fn fill_template(template: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed `{{` in `{template}`"));
        };
        let name = &after[..end];
        match values.get(name) {
            Some(value) => out.push_str(value),
            None => return Err(format!("unknown placeholder `{{{name}}}` in `{template}`")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// In a scope or a parameter, as [`crate::app::App::oauth_settings`] fills them: a `{name}`
/// made of name characters must be one of the connector's inputs (a typo would go to the
/// provider as it is); other braces are the value's own (an OpenID `claims` JSON) and stay.
fn unknown_input(value: &str, values: &BTreeMap<String, String>) -> Result<(), String> {
    let mut rest = value;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            return Ok(());
        };
        let name = &after[..end];
        let name_like = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if name_like && !values.contains_key(name) {
            return Err(format!("unknown placeholder `{{{name}}}` in `{value}`"));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// The `{name}` placeholders of a template, in order (an unclosed `{` is reported as an error).
fn placeholders(template: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed `{{` in `{template}`"));
        };
        names.push(&after[..end]);
        rest = &after[end + 1..];
    }
    Ok(names)
}

fn valid_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    (2..=63).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Checks one connector. `built_in` adds the rules for the catalog file (documentation URL and
/// category). Messages name the connector's key and the field at fault, for an organization's
/// own `POST /elements` connectors as much as for the built-in file.
pub fn validate(connector: &Connector, built_in: bool) -> Result<(), CatalogError> {
    let key = connector.key.as_str();
    let invalid = |problem: String| CatalogError::Invalid {
        key: key.to_string(),
        problem,
    };

    if !valid_key(key) {
        return Err(invalid(
            "`key` must be 2 to 63 characters of lowercase letters, digits and `-`, starting \
             with a letter or digit"
                .to_string(),
        ));
    }
    if connector.name.trim().is_empty() {
        return Err(invalid("`name` must not be empty".to_string()));
    }
    // An instance's name is the connector's and " instance" unless the caller names it, and
    // an instance's name takes at most 200 characters.
    if connector.name.chars().count() > MAX_NAME_CHARS {
        return Err(invalid(format!(
            "`name` is longer than {MAX_NAME_CHARS} characters"
        )));
    }
    if let Some(field) = control_characters(connector) {
        return Err(invalid(format!(
            "`{field}` holds a control character (descriptions may hold line breaks and tabs)"
        )));
    }

    // Inputs: names usable as placeholders, each with a description.
    for (name, input) in &connector.inputs {
        if !valid_input_name(name) {
            return Err(invalid(format!(
                "input `{name}`: an input name must be letters, digits and `_`, starting with a \
                 letter"
            )));
        }
        if name == SANDBOX_PLACEHOLDER || name == CLIENT_ID_PLACEHOLDER {
            return Err(invalid(format!(
                "input `{name}`: the name is reserved for the placeholder the service fills itself"
            )));
        }
        if input.description.trim().is_empty() {
            return Err(invalid(format!(
                "input `{name}`: `description` must not be empty"
            )));
        }
        // An input fills part of a URL and is kept in the open; a name that reads like a
        // secret's would be sealed and masked, and then not found where the URL is made.
        if crate::instances::is_secret_key(name) {
            return Err(invalid(format!(
                "input `{name}`: the name reads like a secret's (token, key, password…), and an input is a part of a URL kept in the open: name it otherwise"
            )));
        }
    }

    let mut samples: BTreeMap<String, String> = connector
        .inputs
        .iter()
        .map(|(name, input)| {
            let sample = input
                .default
                .clone()
                .filter(|value| !value.is_empty())
                .unwrap_or_else(|| "example".to_string());
            (name.clone(), sample)
        })
        .collect();
    samples.insert(SANDBOX_PLACEHOLDER.to_string(), SANDBOX_SAMPLE.to_string());

    check_url(connector, "baseUrl", &connector.base_url, &samples, false)?;
    // And a base the proxy can go under: no user info, query or fragment.
    let base = fill_template(&connector.base_url, &samples)
        .map_err(|problem| invalid(format!("`baseUrl`: {problem}")))?;
    crate::proxy::ProxyBase::parse_named(&base, "`baseUrl`").map_err(invalid)?;
    let oauth = &connector.oauth;
    check_url(
        connector,
        "oauth.authorizationUrl",
        &oauth.authorization_url,
        &samples,
        false,
    )?;
    check_url(
        connector,
        "oauth.tokenUrl",
        &oauth.token_url,
        &samples,
        false,
    )?;
    if let Some(url) = &oauth.refresh_url {
        check_url(connector, "oauth.refreshUrl", url, &samples, false)?;
    }
    if let Some(url) = &oauth.revoke_url {
        check_url(connector, "oauth.revokeUrl", url, &samples, true)?;
    }
    if let Some(issuer) = &oauth.issuer {
        check_url(connector, "oauth.issuer", issuer, &samples, false)?;
    }
    if let Some(url) = &connector.documentation_url {
        check_url(connector, "documentationUrl", url, &BTreeMap::new(), false)?;
    }
    for scope in &oauth.scopes {
        unknown_input(scope, &samples)
            .map_err(|problem| invalid(format!("`oauth.scopes`: {problem}")))?;
    }
    // The authorization URL's own parameters are the service's (the flow's safety rests on
    // them): one given here was dropped without a word.
    if let Some(name) = oauth
        .authorization_params
        .keys()
        .find(|name| crate::oauth::AUTHORIZATION_RESERVED.contains(&name.as_str()))
    {
        return Err(invalid(format!(
            "`oauth.authorizationParams.{name}`: the service sets `{name}` itself"
        )));
    }
    // Nor the scope, when `oauth.scopes` gives one (the URL carries that one).
    if oauth.authorization_params.contains_key("scope") && !oauth.scopes.is_empty() {
        return Err(invalid(
            "`oauth.authorizationParams.scope`: the scope asked for is `oauth.scopes`; give it there only"
                .to_string(),
        ));
    }
    // The token and refresh requests' own parameters likewise (they were dropped); the
    // client's id may be asked for in the body beside Basic authentication, by its
    // placeholder (the instance's own id goes).
    for (field, params, reserved) in [
        (
            "oauth.tokenParams",
            &oauth.token_params,
            crate::oauth::TOKEN_RESERVED,
        ),
        (
            "oauth.refreshParams",
            &oauth.refresh_params,
            crate::oauth::REFRESH_RESERVED,
        ),
    ] {
        if let Some(name) = params.keys().find(|name| reserved.contains(&name.as_str())) {
            return Err(invalid(format!(
                "`{field}.{name}`: the service sets `{name}` itself"
            )));
        }
        if params
            .get(CLIENT_ID_PLACEHOLDER)
            .is_some_and(|value| value != "{client_id}")
        {
            return Err(invalid(format!(
                "`{field}.client_id`: the client id sent is the instance's (`oauth.api.key`); give `\"{{client_id}}\"` to send it in the body besides the client authentication"
            )));
        }
    }
    for (field, params) in [
        ("oauth.authorizationParams", &oauth.authorization_params),
        ("oauth.tokenParams", &oauth.token_params),
        ("oauth.refreshParams", &oauth.refresh_params),
    ] {
        for (name, value) in params {
            if name == CLIENT_ID_PLACEHOLDER && field != "oauth.authorizationParams" {
                continue;
            }
            unknown_input(value, &samples)
                .map_err(|problem| invalid(format!("`{field}.{name}`: {problem}")))?;
        }
    }
    // Tokens and secrets stay sealed in the whole response: one named here was never shown
    // (nor taken for the API's host).
    if let Some(field) = oauth
        .token_response_fields
        .iter()
        .chain(oauth.base_url_from.iter())
        .find(|field| crate::oauth::is_secret_name(field))
    {
        return Err(invalid(format!(
            "`oauth.tokenResponseFields`/`oauth.baseUrlFrom`: `{field}` may carry a token or a secret, which stay sealed in the token response kept whole, never in the configuration"
        )));
    }
    if let Some(problem) = connector.proxy.token_header_problem() {
        return Err(invalid(problem));
    }
    if let Some(seconds) = connector.proxy.timeout_seconds
        && !(1..=86_400).contains(&seconds)
    {
        return Err(invalid(format!(
            "`proxy.timeoutSeconds` is 1 to 86400 seconds, not {seconds}"
        )));
    }
    if let Some(verify) = &connector.verify {
        let path = fill_template(&verify.path, &samples)
            .map_err(|problem| invalid(format!("`verify.path`: {problem}")))?;
        if path.contains("://") || path.starts_with("//") {
            return Err(invalid(format!(
                "`verify.path` must be relative to `baseUrl`, not an absolute URL (`{}`)",
                verify.path
            )));
        }
        let method = verify.method.to_ascii_uppercase();
        if !["GET", "POST", "HEAD"].contains(&method.as_str()) {
            return Err(invalid(format!(
                "`verify.method` must be GET, POST or HEAD, not `{}`",
                verify.method
            )));
        }
    }

    if built_in {
        match connector.documentation_url.as_deref() {
            Some(url) if !url.trim().is_empty() => {}
            _ => {
                return Err(invalid(
                    "`documentationUrl` is required for a built-in connector".to_string(),
                ));
            }
        }
        match connector.category.as_deref() {
            None => {
                return Err(invalid(format!(
                    "`category` is required for a built-in connector (one of {})",
                    CATEGORIES.join(", ")
                )));
            }
            Some("sandbox") if key.starts_with("sandbox-") => {}
            Some(category) if CATEGORIES.contains(&category) => {}
            Some(category) => {
                return Err(invalid(format!(
                    "`category` `{category}` is not one of {}",
                    CATEGORIES.join(", ")
                )));
            }
        }
    } else if let Some(category) = connector.category.as_deref()
        && !CATEGORIES.contains(&category)
        // An organization's copy of a sandbox connector (pointed at another sandbox).
        && category != "sandbox"
    {
        return Err(invalid(format!(
            "`category` `{category}` is not one of {}",
            CATEGORIES.join(", ")
        )));
    }

    if let (Some(style), None) = (oauth.revocation, &oauth.revoke_url)
        && style != RevocationStyle::None
    {
        return Err(invalid(
            "`oauth.revocation` is set but `oauth.revokeUrl` is not: give the revocation URL, \
             or set `revocation` to `none`"
                .to_string(),
        ));
    }
    if oauth.revocation == Some(RevocationStyle::None) && oauth.revoke_url.is_some() {
        return Err(invalid(
            "`oauth.revocation` is `none` but `oauth.revokeUrl` is set: remove one of them"
                .to_string(),
        ));
    }
    if oauth.scope_separator.is_empty() {
        return Err(invalid(
            "`oauth.scopeSeparator` must not be empty".to_string(),
        ));
    }
    if oauth.scopes.iter().any(|scope| scope.trim().is_empty()) {
        return Err(invalid(
            "`oauth.scopes` must not contain an empty scope".to_string(),
        ));
    }
    if oauth.base_url_suffix.is_some() && oauth.base_url_from.is_none() {
        return Err(invalid(
            "`oauth.baseUrlSuffix` is set without `oauth.baseUrlFrom`".to_string(),
        ));
    }

    let refresh = &connector.refresh;
    if refresh.buffer_seconds >= MAX_BUFFER_SECONDS {
        return Err(invalid(format!(
            "`refresh.bufferSeconds` must be less than a day ({MAX_BUFFER_SECONDS}), not {}",
            refresh.buffer_seconds
        )));
    }
    if refresh.keep_alive_seconds == Some(0) {
        return Err(invalid(
            "`refresh.keepAliveSeconds` must be more than 0".to_string(),
        ));
    }
    match (
        refresh.refresh_token_idle_ttl_seconds,
        refresh.keep_alive_seconds,
    ) {
        (Some(idle), None) => {
            return Err(invalid(format!(
                "`refresh.refreshTokenIdleTtlSeconds` is {idle} but `refresh.keepAliveSeconds` \
                 is not set: refresh tokens would die of inactivity (about 5/6 of the idle TTL \
                 is advised: {})",
                idle / 6 * 5
            )));
        }
        (Some(idle), Some(keep_alive)) if keep_alive >= idle => {
            return Err(invalid(format!(
                "`refresh.keepAliveSeconds` ({keep_alive}) must be smaller than \
                 `refresh.refreshTokenIdleTtlSeconds` ({idle})"
            )));
        }
        (None, Some(_))
            // The contract lets an organization's own connector ask for keep-alive alone (it
            // knows its server); the built-in catalog must say why.
            if built_in
                && refresh.refresh_token_absolute_ttl_seconds.is_none()
                && !connector.unconfirmed.iter().any(|fact| {
                    fact.to_ascii_lowercase().contains("idle")
                        || fact.to_ascii_lowercase().contains("inactiv")
                }) =>
        {
            return Err(invalid(
                "`refresh.keepAliveSeconds` is set without `refresh.refreshTokenIdleTtlSeconds`: \
                 give the idle TTL, or say in `unconfirmed` why keep-alive is needed (an \
                 inactivity expiry that is not documented)"
                    .to_string(),
            ));
        }
        _ => {}
    }
    if let (Some(idle), Some(absolute)) = (
        refresh.refresh_token_idle_ttl_seconds,
        refresh.refresh_token_absolute_ttl_seconds,
    ) && idle > absolute
    {
        return Err(invalid(format!(
            "`refresh.refreshTokenIdleTtlSeconds` ({idle}) is longer than \
             `refresh.refreshTokenAbsoluteTtlSeconds` ({absolute})"
        )));
    }

    let rejection = &connector.rejection;
    if let Some(status) = rejection
        .statuses
        .iter()
        .find(|status| !(400..=599).contains(*status))
    {
        return Err(invalid(format!(
            "`rejection.statuses` must be HTTP error statuses (400 to 599), not {status}"
        )));
    }
    if rejection.body_markers.iter().any(|m| m.is_empty())
        || rejection.ok_false_errors.iter().any(|m| m.is_empty())
    {
        return Err(invalid(
            "`rejection.bodyMarkers` and `rejection.okFalseErrors` must not contain empty strings"
                .to_string(),
        ));
    }
    if connector
        .unconfirmed
        .iter()
        .any(|fact| fact.trim().is_empty())
    {
        return Err(invalid(
            "`unconfirmed` must not contain empty entries".to_string(),
        ));
    }
    Ok(())
}

fn valid_input_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 64
}

/// The longest connector name: its instances are named after it.
const MAX_NAME_CHARS: usize = 190;

/// The first field (a dotted path) of the definition whose text holds a control character:
/// a NUL copied from a URL template into an instance's configuration made every later commit
/// of its tokens fail on PostgreSQL (`jsonb` refuses it), and a line break in a name made every
/// instance named after it refused. Descriptions and notes may hold line breaks and tabs.
fn control_characters(connector: &Connector) -> Option<String> {
    fn walk(value: &serde_json::Value, path: &str) -> Option<String> {
        let free_text = path.ends_with("description") || path.starts_with("unconfirmed");
        let refused = |text: &str| {
            text.chars()
                .any(|c| c.is_control() && !(free_text && matches!(c, '\n' | '\r' | '\t')))
        };
        match value {
            serde_json::Value::String(text) => refused(text).then(|| path.to_string()),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, item)| walk(item, &format!("{path}[{i}]"))),
            serde_json::Value::Object(fields) => fields.iter().find_map(|(name, item)| {
                let inner = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                if name.chars().any(char::is_control) {
                    return Some(inner);
                }
                walk(item, &inner)
            }),
            _ => None,
        }
    }
    walk(&serde_json::to_value(connector).ok()?, "")
}

/// Checks that a URL template uses only declared placeholders and, filled with sample values, is
/// an absolute http(s) URL.
fn check_url(
    connector: &Connector,
    field: &str,
    template: &str,
    samples: &BTreeMap<String, String>,
    allow_client_id: bool,
) -> Result<(), CatalogError> {
    let invalid = |problem: String| CatalogError::Invalid {
        key: connector.key.clone(),
        problem: format!("`{field}`: {problem}"),
    };
    let names = placeholders(template).map_err(invalid)?;
    let mut samples = samples.clone();
    for name in names {
        if name == CLIENT_ID_PLACEHOLDER && allow_client_id {
            samples.insert(name.to_string(), "sample-client-id".to_string());
            continue;
        }
        if !samples.contains_key(name) {
            let declared: Vec<&str> = connector.inputs.keys().map(String::as_str).collect();
            return Err(invalid(format!(
                "placeholder `{{{name}}}` is not declared in `inputs` (declared: {}; `{{sandbox}}` \
                 is always available)",
                if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                }
            )));
        }
    }
    // `{sandbox}` (its sample a URL) stands for a whole URL prefix. A connector's own input
    // never does: at run time it may fill one part of a URL only (no `:` or `/`), so a
    // template that begins with one could never be filled, and is refused here as not an
    // absolute URL.
    let filled = fill_template(template, &samples).map_err(invalid)?;
    let parsed = url::Url::parse(&filled)
        .map_err(|error| invalid(format!("`{template}` is not an absolute URL ({error})")))?;
    crate::egress::check_url(&parsed).map_err(invalid)?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "`{template}` must be an http or https URL, not `{}`",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!("`{template}` has no host")));
    }
    // Credentials in a URL would be sent as Basic authentication whatever `clientAuth` says,
    // and shown wherever the URL is (an instance's `oauth.token.refresh_url`, the audit log).
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            "the URL holds user info; client credentials go in the instance's configuration"
                .to_string(),
        ));
    }
    Ok(())
}

/// Parses the built-in catalog, validates every entry and refuses duplicate keys.
pub fn load_built_in() -> Result<Vec<Connector>, CatalogError> {
    load_catalog(BUILT_IN_CATALOG)
}

/// Parses a catalog file, validates every entry as built-in and refuses duplicate keys.
pub fn load_catalog(text: &str) -> Result<Vec<Connector>, CatalogError> {
    let connectors = parse_catalog(text)?;
    let mut seen = std::collections::BTreeSet::new();
    for connector in &connectors {
        validate(connector, true)?;
        if !seen.insert(connector.key.as_str()) {
            return Err(CatalogError::Invalid {
                key: connector.key.clone(),
                problem: "the key appears more than once in the catalog".to_string(),
            });
        }
    }
    Ok(connectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_catalog_parses() {
        let connectors = parse_catalog(BUILT_IN_CATALOG).expect("catalog parses");
        assert!(connectors.iter().any(|c| c.key == "sandbox-adobe-sign"));
        let adobe = connectors
            .iter()
            .find(|c| c.key == "sandbox-adobe-sign")
            .unwrap();
        assert_eq!(adobe.refresh.keep_alive_seconds, Some(4_320_000));
        assert_eq!(
            adobe.oauth.base_url_from.as_deref(),
            Some("api_access_point")
        );
    }

    #[test]
    fn built_in_catalog_validates_with_at_least_100_providers() {
        let connectors = load_built_in().unwrap_or_else(|error| panic!("{error}"));
        let real: Vec<&Connector> = connectors
            .iter()
            .filter(|c| !c.key.starts_with("sandbox-"))
            .collect();
        assert!(real.len() >= 100, "only {} real connectors", real.len());
        for category in CATEGORIES {
            assert!(
                real.iter()
                    .any(|c| c.category.as_deref() == Some(*category)),
                "no connector in category {category}"
            );
        }
        for connector in &real {
            assert!(
                connector.verify.is_some()
                    || connector
                        .unconfirmed
                        .iter()
                        .any(|fact| fact.contains("verify")),
                "{} has no verify call and does not say why",
                connector.key
            );
            assert!(
                !connector.base_url.contains("{sandbox}"),
                "{} points at the sandbox",
                connector.key
            );
        }
    }

    #[test]
    fn sandbox_entries_stay_first() {
        let connectors = load_built_in().unwrap();
        let keys: Vec<&str> = connectors.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            &keys[..5],
            &[
                "sandbox-adobe-sign",
                "sandbox-salesforce",
                "sandbox-box",
                "sandbox-microsoft",
                "sandbox-generic"
            ]
        );
    }

    #[test]
    fn fill_template_replaces_and_names_unknown_placeholders() {
        let mut values = BTreeMap::new();
        values.insert("shop".to_string(), "acme".to_string());
        assert_eq!(
            fill_template("https://{shop}.myshopify.com/admin/", &values).unwrap(),
            "https://acme.myshopify.com/admin/"
        );
        assert_eq!(
            fill_template("no placeholders", &values).unwrap(),
            "no placeholders"
        );
        let error = fill_template("https://{tenant}.example.com/{shop}", &values).unwrap_err();
        assert!(error.contains("{tenant}"), "{error}");
        let error = fill_template("https://{shop.example.com", &values).unwrap_err();
        assert!(error.contains("unclosed"), "{error}");
    }

    fn good() -> Connector {
        parse_catalog(
            r#"
[[connector]]
key = "acme"
name = "Acme"
category = "crm"
documentationUrl = "https://docs.acme.test/oauth"
baseUrl = "https://{subdomain}.acme.test/api/"
inputs.subdomain = { description = "Your Acme subdomain" }
oauth.authorizationUrl = "https://{subdomain}.acme.test/oauth/authorize"
oauth.tokenUrl = "https://{subdomain}.acme.test/oauth/token"
oauth.revokeUrl = "https://{subdomain}.acme.test/oauth/revoke"
oauth.scopes = ["read", "offline_access"]
refresh.keepAliveSeconds = 4320000
refresh.refreshTokenIdleTtlSeconds = 5184000
verify.path = "me"
"#,
        )
        .unwrap()
        .remove(0)
    }

    fn refused(connector: &Connector, built_in: bool, words: &[&str]) {
        let error = validate(connector, built_in).expect_err("should be refused");
        let message = error.to_string();
        assert!(
            message.contains(&format!("`{}`", connector.key)),
            "{message}"
        );
        for word in words {
            assert!(message.contains(word), "`{message}` lacks `{word}`");
        }
    }

    /// The token and refresh requests' own parameters, and a second scope, are refused where
    /// they were dropped; the client's id may be asked for in the body by its placeholder.
    #[test]
    fn a_request_s_own_parameters_are_the_service_s() {
        let mut c = good();
        c.oauth.token_params.insert("code".into(), "x".into());
        refused(&c, false, &["`oauth.tokenParams.code`", "itself"]);
        let mut c = good();
        c.oauth
            .refresh_params
            .insert("refresh_token".into(), "x".into());
        refused(&c, false, &["`oauth.refreshParams.refresh_token`"]);
        let mut c = good();
        c.oauth
            .refresh_params
            .insert("client_id".into(), "cid".into());
        refused(
            &c,
            false,
            &["`oauth.refreshParams.client_id`", "{client_id}"],
        );
        let mut c = good();
        c.oauth
            .refresh_params
            .insert("client_id".into(), "{client_id}".into());
        c.oauth
            .token_params
            .insert("client_id".into(), "{client_id}".into());
        validate(&c, false).unwrap();
        let mut c = good();
        assert!(!c.oauth.scopes.is_empty());
        c.oauth
            .authorization_params
            .insert("scope".into(), "other".into());
        refused(
            &c,
            false,
            &["`oauth.authorizationParams.scope`", "oauth.scopes"],
        );
        c.oauth.scopes.clear();
        validate(&c, false).unwrap();
        // A token is not shown, so not listed as shown.
        let mut c = good();
        c.oauth.token_response_fields = vec!["scope".into(), "id_token".into()];
        refused(&c, false, &["`oauth.tokenResponseFields`", "`id_token`"]);
        let mut c = good();
        c.oauth.base_url_from = Some("access_token".into());
        refused(&c, false, &["`oauth.baseUrlFrom`", "`access_token`"]);
    }

    #[test]
    fn a_good_connector_passes_both_ways() {
        validate(&good(), true).unwrap();
        let mut own = good();
        own.category = None;
        own.documentation_url = None;
        validate(&own, false).unwrap();
    }

    #[test]
    fn control_characters_long_names_and_unusable_bases_are_refused() {
        let mut c = good();
        c.base_url = "https://api.acme.test/v1\u{0}x/".to_string();
        refused(&c, false, &["`baseUrl`", "control character"]);
        let mut c = good();
        c.oauth.scopes.push("read\u{0}".to_string());
        refused(&c, false, &["`oauth.scopes[2]`"]);
        let mut c = good();
        c.name = "Acme\nCRM".to_string();
        refused(&c, false, &["`name`"]);
        let mut c = good();
        c.name = "a".repeat(191);
        refused(&c, false, &["`name`", "190"]);
        c.name = "a".repeat(190);
        validate(&c, false).unwrap();
        for base in [
            "https://api.acme.test/v1?x=1",
            "https://api.acme.test/v1#top",
            "https://user:pass@api.acme.test/v1/",
        ] {
            let mut c = good();
            c.base_url = base.to_string();
            refused(&c, false, &["`baseUrl`"]);
        }
        // Nor OAuth URLs with credentials in them (sent as Basic whatever `clientAuth` says,
        // and shown in every instance's `oauth.token.refresh_url`), nor authorization
        // parameters the service sets itself (they were dropped without a word).
        let mut c = good();
        c.oauth.token_url = "https://id:secret@login.acme.test/token".to_string();
        refused(&c, false, &["`oauth.tokenUrl`", "user info"]);
        let mut c = good();
        c.oauth.revoke_url = Some("https://id@login.acme.test/revoke".to_string());
        refused(&c, false, &["`oauth.revokeUrl`", "user info"]);
        // An issuer that is no URL, or names an input not declared, would refuse every code
        // whose redirect carries `iss`.
        let mut c = good();
        c.oauth.issuer = Some("https://{tenantt}.acme.test".to_string());
        refused(&c, false, &["`oauth.issuer`", "tenantt"]);
        let mut c = good();
        c.oauth.issuer = Some("acme".to_string());
        refused(&c, false, &["`oauth.issuer`"]);
        for name in ["redirect_uri", "client_id", "state"] {
            let mut c = good();
            c.oauth
                .authorization_params
                .insert(name.to_string(), "x".to_string());
            refused(&c, false, &["`oauth.authorizationParams", name]);
        }
        // Descriptions may run over lines.
        let mut c = good();
        for input in c.inputs.values_mut() {
            input.description = "The tenant.\nSee the admin page.".to_string();
        }
        validate(&c, false).unwrap();
    }

    #[test]
    fn bad_keys_are_refused() {
        for key in [
            "",
            "a",
            "Acme",
            "-acme",
            "acme_crm",
            "acme crm",
            &"a".repeat(64),
        ] {
            let mut c = good();
            c.key = key.to_string();
            let message = validate(&c, false).unwrap_err().to_string();
            assert!(message.contains("`key`"), "{message}");
        }
        let mut c = good();
        c.key = "0acme-2".to_string();
        validate(&c, false).unwrap();
    }

    #[test]
    fn braces_in_scopes_and_parameters_are_placeholders_only_when_named() {
        // An OpenID `claims` parameter is JSON: its braces go to the provider as they are.
        let mut c = good();
        c.oauth
            .authorization_params
            .insert("claims".into(), r#"{"id_token":{"acr":null}}"#.into());
        c.oauth.scopes.push("{unclosed".into());
        validate(&c, false).unwrap();
        // A name in braces that is no input is a typo, refused.
        let mut c = good();
        c.oauth
            .scopes
            .push("https://{orgg}.example.com/.default".into());
        refused(&c, false, &["oauth.scopes", "{orgg}"]);
    }

    #[test]
    fn an_input_is_read_from_a_url_of_the_base_shape() {
        let template = "https://api.{shard}.adobesign.com/";
        for url in [
            "https://api.eu1.adobesign.com/",
            "https://api.eu1.adobesign.com",
            "HTTPS://API.EU1.adobesign.com/",
        ] {
            assert_eq!(
                input_in_url(template, "shard", url).as_deref(),
                Some("eu1"),
                "{url}"
            );
        }
        // A placeholder that is a whole path segment.
        for url in ["http://h:1/eu1/", "http://h:1/eu1"] {
            let found = input_in_url("http://h:1/{shard}/", "shard", url);
            assert_eq!(found.as_deref(), Some("eu1"), "{url}");
        }
        // Adobe's own redirect names the echosign.com host: the built-in connector reads it.
        let adobe = load_built_in()
            .unwrap()
            .into_iter()
            .find(|c| c.key == "adobe-esign")
            .unwrap()
            .inputs["shard"]
            .redirect_shapes
            .clone();
        assert!(
            adobe.iter().any(
                |shape| input_in_url(shape, "shard", "https://api.eu1.echosign.com/").as_deref()
                    == Some("eu1")
            ),
            "{adobe:?}"
        );
        for url in [
            "https://api.eu1.adobesign.com.evil.test/",
            "https://evil.test/api.eu1.adobesign.com/",
            "https://api.a/b.adobesign.com/",
            "https://api..adobesign.com/",
            "https://secure.echosign.com/",
        ] {
            assert_eq!(input_in_url(template, "shard", url), None, "{url}");
        }
    }

    #[test]
    fn revocation_styles_say_which_tokens_they_take() {
        use RevocationStyle::*;
        for style in [Bearer, GithubDelete] {
            assert!(!style.takes_refresh_tokens() && style.takes_access_tokens());
        }
        assert!(!DeleteRefreshTokenPath.takes_access_tokens());
        assert!(DeleteRefreshTokenPath.takes_refresh_tokens());
        assert!(Rfc7009.takes_refresh_tokens() && Rfc7009.takes_access_tokens());
    }

    #[test]
    fn empty_name_is_refused() {
        let mut c = good();
        c.name = "  ".to_string();
        refused(&c, false, &["`name`"]);
    }

    #[test]
    fn urls_must_be_absolute_http() {
        let mut c = good();
        c.oauth.token_url = "/oauth/token".to_string();
        refused(&c, false, &["oauth.tokenUrl", "absolute"]);
        let mut c = good();
        c.oauth.authorization_url = "ftp://acme.test/authorize".to_string();
        refused(&c, false, &["oauth.authorizationUrl", "http"]);
        let mut c = good();
        c.base_url = "acme.test/api".to_string();
        refused(&c, false, &["baseUrl"]);
        let mut c = good();
        c.oauth.refresh_url = Some("not a url".to_string());
        refused(&c, false, &["oauth.refreshUrl"]);
        let mut c = good();
        c.documentation_url = Some("docs".to_string());
        refused(&c, true, &["documentationUrl"]);
    }

    #[test]
    fn undeclared_placeholders_are_refused() {
        let mut c = good();
        c.oauth.token_url = "https://{region}.acme.test/oauth/token".to_string();
        refused(&c, false, &["oauth.tokenUrl", "{region}", "inputs"]);
        let mut c = good();
        c.verify = Some(VerifySpec {
            method: "GET".to_string(),
            path: "users/{user}".to_string(),
        });
        refused(&c, false, &["verify.path", "{user}"]);
        let mut c = good();
        c.oauth
            .authorization_params
            .insert("audience".to_string(), "{aud}".to_string());
        refused(&c, false, &["authorizationParams", "{aud}"]);
        // `{sandbox}` is always there; `{client_id}` only in the revocation URL.
        let mut c = good();
        c.base_url = "{sandbox}/acme/".to_string();
        validate(&c, false).unwrap();
        let mut c = good();
        c.oauth.revoke_url = Some("https://api.acme.test/apps/{client_id}/token".to_string());
        validate(&c, false).unwrap();
        c.base_url = "https://api.acme.test/apps/{client_id}/".to_string();
        refused(&c, false, &["baseUrl", "{client_id}"]);
    }

    #[test]
    fn a_template_cannot_begin_with_an_input() {
        let mut c = good();
        c.base_url = "{subdomain}/api/".to_string();
        refused(&c, false, &["baseUrl", "absolute URL"]);
    }

    #[test]
    fn inputs_need_a_description_and_a_plain_name() {
        let mut c = good();
        c.inputs.get_mut("subdomain").unwrap().description = String::new();
        refused(&c, false, &["subdomain", "description"]);
        let mut c = good();
        c.inputs.insert(
            "sandbox".to_string(),
            ConnectorInput {
                description: "x".to_string(),
                default: None,
                from_redirect: None,
                redirect_shapes: Vec::new(),
            },
        );
        refused(&c, false, &["sandbox", "reserved"]);
    }

    #[test]
    fn built_in_entries_need_documentation_and_category() {
        let mut c = good();
        c.documentation_url = None;
        refused(&c, true, &["documentationUrl"]);
        let mut c = good();
        c.category = None;
        refused(&c, true, &["category"]);
        let mut c = good();
        c.category = Some("finance".to_string());
        refused(&c, true, &["finance"]);
        refused(&c, false, &["finance"]);
        let mut c = good();
        c.category = Some("sandbox".to_string());
        refused(&c, true, &["sandbox"]);
        c.key = "sandbox-acme".to_string();
        validate(&c, true).unwrap();
    }

    #[test]
    fn revocation_style_needs_a_url() {
        let mut c = good();
        c.oauth.revoke_url = None;
        c.oauth.revocation = Some(RevocationStyle::Bearer);
        refused(&c, false, &["oauth.revocation", "revokeUrl"]);
        c.oauth.revocation = Some(RevocationStyle::None);
        validate(&c, false).unwrap();
        c.oauth.revoke_url = Some("https://acme.test/revoke".to_string());
        refused(&c, false, &["none"]);
        // A URL without a style means RFC 7009.
        let mut c = good();
        c.oauth.revocation = None;
        validate(&c, false).unwrap();
    }

    #[test]
    fn keep_alive_must_fit_the_expiry_facts() {
        let mut c = good();
        c.refresh.keep_alive_seconds = None;
        refused(
            &c,
            false,
            &["refreshTokenIdleTtlSeconds", "keepAliveSeconds"],
        );
        let mut c = good();
        c.refresh.keep_alive_seconds = Some(5_184_000);
        refused(&c, false, &["keepAliveSeconds", "smaller"]);
        let mut c = good();
        c.refresh.refresh_token_idle_ttl_seconds = None;
        refused(&c, true, &["keepAliveSeconds", "unconfirmed"]);
        // An organization's own connector may ask for keep-alive alone, as the contract shows.
        validate(&c, false).unwrap();
        c.unconfirmed
            .push("refresh tokens are reported to expire after some inactivity".to_string());
        validate(&c, true).unwrap();
        let mut c = good();
        c.refresh.refresh_token_idle_ttl_seconds = None;
        c.refresh.refresh_token_absolute_ttl_seconds = Some(31_536_000);
        validate(&c, false).unwrap();
        let mut c = good();
        c.refresh.refresh_token_absolute_ttl_seconds = Some(86_400);
        refused(&c, false, &["refreshTokenAbsoluteTtlSeconds"]);
    }

    #[test]
    fn buffer_must_be_less_than_a_day() {
        let mut c = good();
        c.refresh.buffer_seconds = 86_400;
        refused(&c, false, &["bufferSeconds"]);
        c.refresh.buffer_seconds = 86_399;
        validate(&c, false).unwrap();
    }

    #[test]
    fn scope_separator_must_not_be_empty() {
        let mut c = good();
        c.oauth.scope_separator = String::new();
        refused(&c, false, &["scopeSeparator"]);
        let mut c = good();
        c.oauth.scopes.push(String::new());
        refused(&c, false, &["oauth.scopes"]);
    }

    #[test]
    fn rejection_statuses_must_be_errors() {
        for status in [200, 302, 399, 600] {
            let mut c = good();
            c.rejection.statuses = vec![401, status];
            refused(&c, false, &["rejection.statuses", &status.to_string()]);
        }
        let mut c = good();
        c.rejection.statuses = vec![400, 401, 403, 599];
        validate(&c, false).unwrap();
    }

    #[test]
    fn verify_path_must_be_relative() {
        let mut c = good();
        c.verify = Some(VerifySpec {
            method: "GET".to_string(),
            path: "https://evil.test/me".to_string(),
        });
        refused(&c, false, &["verify.path"]);
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let text = format!(
            "{}\n{}",
            BUILT_IN_CATALOG,
            BUILT_IN_CATALOG
                .split("\n[[connector]]\n")
                .nth(1)
                .map(|entry| format!("[[connector]]\n{entry}"))
                .unwrap()
        );
        let message = load_catalog(&text).unwrap_err().to_string();
        assert!(message.contains("sandbox-adobe-sign"), "{message}");
        assert!(message.contains("more than once"), "{message}");
    }

    #[test]
    fn parse_errors_are_reported() {
        assert!(matches!(
            load_catalog("[[connector]]\nkey = 1"),
            Err(CatalogError::Parse(_))
        ));
    }
}
