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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Connector {
    /// Unique key, lowercase letters, digits and `-` (e.g. `adobe-esign`).
    pub key: String,
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
    /// Facts that could not be confirmed from the provider's documentation, said plainly.
    #[serde(default)]
    pub unconfirmed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectorInput {
    pub description: String,
    #[serde(default)]
    pub default: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default = "default_scope_separator")]
    pub scope_separator: String,
    #[serde(default)]
    pub client_auth: ClientAuth,
    #[serde(default)]
    pub pkce: bool,
    /// Extra parameters on the authorization URL, e.g. those that get a refresh token
    /// (`access_type=offline`, `prompt=consent`, `token_access_type=offline`).
    #[serde(default)]
    pub authorization_params: BTreeMap<String, String>,
    /// Extra parameters on every refresh request (Microsoft's `scope`).
    #[serde(default)]
    pub refresh_params: BTreeMap<String, String>,
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
    /// `invalid_grant`, `unauthorized_client`, `invalid_client`), e.g. GitHub's
    /// `bad_refresh_token`, Slack's `invalid_refresh_token`, HubSpot's `BAD_REFRESH_TOKEN`.
    #[serde(default)]
    pub permanent_errors: Vec<String>,
}

fn default_scope_separator() -> String {
    " ".to_string()
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    ClientSecretPost,
    ClientSecretBasic,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    #[default]
    Form,
    Json,
}

/// How a provider wants to be told to revoke a token.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RefreshSpec {
    #[serde(default)]
    pub strategy: RefreshStrategy,
    /// `before_expiry`: refresh when the access token is this close to expiry.
    #[serde(default = "default_buffer_seconds")]
    pub buffer_seconds: u64,
    /// Refresh an instance not refreshed for this long, so refresh tokens that die of inactivity
    /// stay alive (Adobe Sign: 50 days, as the provider advises for its 60-day idle expiry).
    #[serde(default)]
    pub keep_alive_seconds: Option<u64>,
    /// Whether and how the provider rotates refresh tokens (informative; the engine always keeps
    /// whatever the response carries and keeps the old one when the response has none).
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RefreshStrategy {
    #[default]
    BeforeExpiry,
    #[serde(rename = "on_401")]
    On401,
    EveryRequest,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifySpec {
    #[serde(default = "default_verify_method")]
    pub method: String,
    /// Relative to `base.url`, e.g. `users/me`.
    pub path: String,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_catalog_parses() {
        let connectors = parse_catalog(BUILT_IN_CATALOG).expect("catalog parses");
        assert!(connectors.iter().any(|c| c.key == "sandbox-adobe-sign"));
        let adobe = connectors.iter().find(|c| c.key == "sandbox-adobe-sign").unwrap();
        assert_eq!(adobe.refresh.keep_alive_seconds, Some(4_320_000));
        assert_eq!(adobe.oauth.base_url_from.as_deref(), Some("api_access_point"));
    }
}
