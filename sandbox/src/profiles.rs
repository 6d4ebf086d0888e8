//! The provider profiles the sandbox imitates, and their run-time settings.
//!
//! A profile fixes the URL layout and the shapes of answers (error bodies, API rejections, token
//! response fields); its [`ProfileSettings`] hold the behaviour that can be changed at run time
//! with `PUT /__sandbox/profiles/{profile}`. Defaults imitate the real provider as described in
//! the shared PROVIDERS.md; where the real behaviour is unconfirmed, the comment says so.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Profile {
    AdobeSign,
    Salesforce,
    Box,
    Microsoft,
    Generic,
}

impl Profile {
    pub const ALL: [Profile; 5] = [
        Profile::AdobeSign,
        Profile::Salesforce,
        Profile::Box,
        Profile::Microsoft,
        Profile::Generic,
    ];

    /// The path segment and public name of the profile.
    pub fn key(self) -> &'static str {
        match self {
            Profile::AdobeSign => "adobe-sign",
            Profile::Salesforce => "salesforce",
            Profile::Box => "box",
            Profile::Microsoft => "microsoft",
            Profile::Generic => "generic",
        }
    }

    pub fn from_key(key: &str) -> Option<Profile> {
        Profile::ALL.into_iter().find(|p| p.key() == key)
    }

    /// Index into per-profile arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Prefix of every token and code minted for this profile, so a token seen in a log tells
    /// which profile issued it.
    pub fn token_prefix(self) -> &'static str {
        match self {
            Profile::AdobeSign => "ads",
            Profile::Salesforce => "sfdc",
            Profile::Box => "box",
            Profile::Microsoft => "msft",
            Profile::Generic => "gen",
        }
    }

    /// Endpoint paths relative to the sandbox root. Microsoft's carry the `common` tenant, which
    /// is what its metadata names; its routes accept any tenant.
    pub fn paths(self) -> ProfilePaths {
        match self {
            Profile::AdobeSign => ProfilePaths {
                authorize: "/adobe-sign/public/oauth/v2",
                token: "/adobe-sign/oauth/v2/token",
                refresh: Some("/adobe-sign/oauth/v2/refresh"),
                revoke: "/adobe-sign/oauth/v2/revoke",
            },
            Profile::Salesforce => ProfilePaths {
                authorize: "/salesforce/services/oauth2/authorize",
                token: "/salesforce/services/oauth2/token",
                refresh: None,
                revoke: "/salesforce/services/oauth2/revoke",
            },
            Profile::Box => ProfilePaths {
                authorize: "/box/api/oauth2/authorize",
                token: "/box/oauth2/token",
                refresh: None,
                revoke: "/box/oauth2/revoke",
            },
            Profile::Microsoft => ProfilePaths {
                authorize: "/microsoft/common/oauth2/v2.0/authorize",
                token: "/microsoft/common/oauth2/v2.0/token",
                refresh: None,
                revoke: "/microsoft/common/oauth2/v2.0/revoke",
            },
            Profile::Generic => ProfilePaths {
                authorize: "/generic/authorize",
                token: "/generic/token",
                refresh: None,
                revoke: "/generic/revoke",
            },
        }
    }
}

pub struct ProfilePaths {
    pub authorize: &'static str,
    pub token: &'static str,
    /// Only for providers that refresh at a separate URL (Adobe Sign).
    pub refresh: Option<&'static str>,
    pub revoke: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenResponseFormat {
    Json,
    /// `application/x-www-form-urlencoded`, as GitHub answers without `Accept: application/json`.
    /// Applies to success and error answers of the token endpoint alike.
    Form,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    ClientSecretPost,
    ClientSecretBasic,
}

/// The body shape of token-endpoint errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorShape {
    /// RFC 6749 §5.2 `{"error": …, "error_description": …}` (Microsoft adds its AADSTS fields).
    Oauth,
    /// HubSpot: `{"status": "BAD_REFRESH_TOKEN", "message": …, "correlationId": …}`.
    Hubspot,
    /// Zoom: `{"reason": "Invalid Token!", "error": "invalid_grant"}`.
    Zoom,
    /// Slack: HTTP 200 `{"ok": false, "error": "invalid_refresh_token"}`.
    Slack,
    /// GitHub: HTTP 200 `{"error": "bad_refresh_token", "error_description": …, "error_uri": …}`.
    Github,
}

/// What the revocation endpoint does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RevocationMode {
    /// The profile's own cascade (see `Sandbox::revoke`).
    Cascade,
    /// A refresh token dies alone: access tokens minted with it live on (HubSpot v1).
    RefreshOnly,
    /// There is no revocation endpoint: 404 (Microsoft, Atlassian, Spotify).
    None,
    /// 200 as if revoked, and nothing changes (Zendesk's `current.json`).
    FakeSuccess,
}

/// The shape of the protected API's answer to a bad access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ApiRejectionShape {
    /// The profile's own shape (generic: RFC 6750 JSON plus `WWW-Authenticate`).
    Profile,
    /// 401, an empty body and `WWW-Authenticate: Bearer …, error="invalid_token"` (Box).
    EmptyWithWwwAuthenticate,
    /// 401 with a JSON array `[{"message": …, "errorCode": "INVALID_SESSION_ID"}]` (Salesforce).
    Array,
    /// HTTP 200 `{"ok": false, "error": "invalid_auth" | "token_expired" | "token_revoked"}` (Slack).
    OkFalse,
    /// 401 with QuickBooks' XML `<IntuitResponse><Fault type="AUTHENTICATION">…` body.
    Xml,
}

/// Where the routing field (`routingField`) is handed to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RoutingLocation {
    /// In the token response (Salesforce `instance_url`, Adobe `api_access_point`).
    TokenResponse,
    /// In the authorization redirect, next to `code` (QuickBooks `realmId`, Shopify `shop`).
    Redirect,
    Both,
}

/// What the routing field holds. Either way it names the user's tenant, whose API lives at
/// `/{profile}/tenants/{tenant}/api/…` and refuses tokens of other tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RoutingValue {
    /// The tenant's API base URL, `http://{sandbox}/{profile}/tenants/{tenant}/`.
    BaseUrl,
    /// The tenant id alone (`t-…`), for clients that template it into their URLs.
    TenantId,
}

/// Behaviour of one profile, changeable at run time. Serialized in camelCase as the answer of
/// `GET/PUT /__sandbox/profiles/{profile}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileSettings {
    pub access_token_ttl_seconds: u64,
    /// 0: refresh tokens never die of inactivity. Each use restarts the window.
    pub refresh_token_idle_ttl_seconds: u64,
    /// 0: no absolute limit. Counted from the grant's creation (the original authorization), so
    /// rotated refresh tokens inherit it, as Spotify and LinkedIn do.
    pub refresh_token_absolute_ttl_seconds: u64,
    pub authorization_code_ttl_seconds: u64,
    /// Each refresh returns a new refresh token and the presented one becomes "used".
    pub rotate_refresh_tokens: bool,
    /// A used refresh token still works this many seconds after its first use. Within the grace
    /// each retry mints a fresh pair (new access token, new refresh token); the successor handed
    /// out at first use stays valid too.
    pub refresh_reuse_grace_seconds: u64,
    /// A used refresh token presented outside the grace kills the whole grant.
    pub revoke_grant_on_reuse: bool,
    /// Each refresh returns a new refresh token, but the presented one stays valid (Microsoft).
    /// Takes precedence over `rotateRefreshTokens`; a patch setting `rotateRefreshTokens: true`
    /// without naming this one turns it off.
    pub old_refresh_token_stays_valid: bool,
    /// Refresh answers carry no `refresh_token` when none was minted (Salesforce, Spotify).
    pub omit_refresh_token_on_refresh: bool,
    /// No refresh token unless the granted scope contains `offline_access` (Microsoft), or at
    /// Salesforce `refresh_token` or `offline_access`.
    pub require_offline_access_scope: bool,
    /// Salesforce sends no `expires_in` at all.
    pub include_expires_in: bool,
    pub expires_in_as_string: bool,
    pub token_response_format: TokenResponseFormat,
    /// Token-endpoint errors answer HTTP 200 (GitHub, Slack style).
    pub errors_with_http200: bool,
    /// HTTP status of `invalid_grant` answers (Atlassian uses 403).
    pub invalid_grant_status: u16,
    pub client_auth_methods: Vec<ClientAuthMethod>,
    /// 0: unlimited. Otherwise a new authorization of a user beyond this many live grants (per
    /// user and client) silently revokes the oldest (Google 100, Salesforce 5, Zoom 1).
    pub max_grants_per_user: u32,
    /// Empty: no routing data. Otherwise the name of the field or redirect parameter that tells
    /// the client where the user's tenant lives (`instance_url`, `realmId`, `shop`).
    pub routing_field: String,
    pub routing_location: RoutingLocation,
    pub routing_value: RoutingValue,
    /// Refreshes go to `/{profile}/refresh` and the token endpoint takes codes only (generic
    /// only; Adobe Sign always works this way).
    pub separate_refresh_endpoint: bool,
    /// A refresh without `scope` is refused with `invalid_request` (older Microsoft docs).
    pub require_scope_on_refresh: bool,
    /// Token (and revocation) requests may have a JSON object body as well as a form.
    pub accept_json_bodies: bool,
    /// Token (and revocation) requests must have a JSON object body (Notion, Atlassian).
    pub require_json_bodies: bool,
    pub error_shape: ErrorShape,
    /// Empty: none. Otherwise the token-response field that reports the refresh token's
    /// remaining life in seconds (`x_refresh_token_expires_in` as QuickBooks,
    /// `refresh_token_expires_in` as LinkedIn). Only sent when the profile has an idle or
    /// absolute refresh-token limit.
    pub refresh_token_expires_in_field: String,
    /// Fields added to every successful token response (`hub_id`, `bot_id`, …).
    pub extra_token_fields: Map<String, Value>,
    pub revocation_mode: RevocationMode,
    /// Revocations (by the endpoint or `/__sandbox/users/{user}/revoke`) take effect this many
    /// seconds later on the sandbox clock (Microsoft's propagation delay).
    pub revocation_delay_seconds: u64,
    /// A revoked grant's access tokens stay valid until they expire: only its refresh tokens
    /// die (Microsoft: access tokens are self-contained JWTs, and revoking a user's sign-in
    /// sessions reaches refresh tokens only). An access token revoked by itself still dies.
    pub revocation_spares_access_tokens: bool,
    /// A new access token is refused for this many seconds after it is minted (LinkedIn).
    pub access_token_activation_delay_seconds: u64,
    pub api_rejection_shape: ApiRejectionShape,
    /// The protected API's rejections come gzip-encoded to a caller that accepts gzip (as
    /// Slack's and most providers' do): what a proxy reads of them must be decoded, or asked
    /// for plain.
    pub api_gzip: bool,
}

impl ProfileSettings {
    pub fn defaults(profile: Profile) -> ProfileSettings {
        let base = ProfileSettings {
            access_token_ttl_seconds: 3600,
            refresh_token_idle_ttl_seconds: 0,
            refresh_token_absolute_ttl_seconds: 0,
            authorization_code_ttl_seconds: 600,
            rotate_refresh_tokens: false,
            refresh_reuse_grace_seconds: 0,
            revoke_grant_on_reuse: false,
            old_refresh_token_stays_valid: false,
            omit_refresh_token_on_refresh: false,
            require_offline_access_scope: false,
            include_expires_in: true,
            expires_in_as_string: false,
            token_response_format: TokenResponseFormat::Json,
            errors_with_http200: false,
            invalid_grant_status: 400,
            client_auth_methods: vec![
                ClientAuthMethod::ClientSecretPost,
                ClientAuthMethod::ClientSecretBasic,
            ],
            max_grants_per_user: 0,
            routing_field: String::new(),
            routing_location: RoutingLocation::TokenResponse,
            routing_value: RoutingValue::BaseUrl,
            separate_refresh_endpoint: false,
            require_scope_on_refresh: false,
            accept_json_bodies: false,
            require_json_bodies: false,
            error_shape: ErrorShape::Oauth,
            refresh_token_expires_in_field: String::new(),
            extra_token_fields: Map::new(),
            revocation_mode: RevocationMode::Cascade,
            revocation_delay_seconds: 0,
            revocation_spares_access_tokens: false,
            access_token_activation_delay_seconds: 0,
            api_rejection_shape: ApiRejectionShape::Profile,
            api_gzip: false,
        };
        const SIXTY_DAYS: u64 = 60 * 86_400;
        match profile {
            Profile::AdobeSign => ProfileSettings {
                refresh_token_idle_ttl_seconds: SIXTY_DAYS,
                // Adobe Sign, Salesforce and Box take the client's credentials in the body
                // only: a connector set to Basic fails here as it would there.
                client_auth_methods: vec![ClientAuthMethod::ClientSecretPost],
                authorization_code_ttl_seconds: 300,
                // Not rotated; that the refresh answer carries no refresh_token is unconfirmed.
                omit_refresh_token_on_refresh: true,
                ..base
            },
            Profile::Salesforce => ProfileSettings {
                // The org's session timeout; Salesforce never says it in the token answer.
                access_token_ttl_seconds: 7200,
                include_expires_in: false,
                omit_refresh_token_on_refresh: true,
                // A refresh token only for the `refresh_token` (or `offline_access`) scope.
                require_offline_access_scope: true,
                max_grants_per_user: 5,
                client_auth_methods: vec![ClientAuthMethod::ClientSecretPost],
                ..base
            },
            Profile::Box => ProfileSettings {
                refresh_token_idle_ttl_seconds: SIXTY_DAYS,
                // Box's authorization codes expire after 30 seconds (developer.box.com, "Token
                // & URL expiration"): a client slow to exchange them fails there.
                authorization_code_ttl_seconds: 30,
                rotate_refresh_tokens: true,
                client_auth_methods: vec![ClientAuthMethod::ClientSecretPost],
                ..base
            },
            Profile::Microsoft => ProfileSettings {
                // Real access tokens live a random 60-90 minutes; a fixed hour is predictable.
                refresh_token_idle_ttl_seconds: 90 * 86_400,
                old_refresh_token_stays_valid: true,
                require_offline_access_scope: true,
                // Revoking sign-in sessions kills refresh tokens; issued access tokens live on.
                // (The real revocation also takes a few minutes: `revocationDelaySeconds`.)
                revocation_spares_access_tokens: true,
                ..base
            },
            Profile::Generic => base,
        }
    }

    /// Applies a partial update; validation happens before anything changes.
    pub fn apply(&mut self, patch: ProfileSettingsPatch) -> Result<(), String> {
        for (name, value) in [
            ("accessTokenTtlSeconds", patch.access_token_ttl_seconds),
            (
                "refreshTokenIdleTtlSeconds",
                patch.refresh_token_idle_ttl_seconds,
            ),
            (
                "refreshTokenAbsoluteTtlSeconds",
                patch.refresh_token_absolute_ttl_seconds,
            ),
            (
                "authorizationCodeTtlSeconds",
                patch.authorization_code_ttl_seconds,
            ),
            (
                "refreshReuseGraceSeconds",
                patch.refresh_reuse_grace_seconds,
            ),
            ("revocationDelaySeconds", patch.revocation_delay_seconds),
            (
                "accessTokenActivationDelaySeconds",
                patch.access_token_activation_delay_seconds,
            ),
        ] {
            if value.is_some_and(|seconds| seconds > MAX_SECONDS) {
                return Err(format!(
                    "{name} must be at most {MAX_SECONDS} (a hundred years)"
                ));
            }
        }
        // Names the sandbox writes itself cannot be taken by a routing or lifetime field.
        for (name, field) in [
            ("routingField", &patch.routing_field),
            (
                "refreshTokenExpiresInField",
                &patch.refresh_token_expires_in_field,
            ),
        ] {
            if let Some(field) = field
                && (RESERVED_TOKEN_FIELDS.contains(&field.as_str())
                    || matches!(field.as_str(), "code" | "state" | "error_uri"))
            {
                return Err(format!(
                    "{name} may not be '{field}': the sandbox writes that field itself"
                ));
            }
        }
        if let Some(status) = patch.invalid_grant_status
            && !(200..=599).contains(&status)
        {
            return Err(format!(
                "invalidGrantStatus must be an HTTP status between 200 and 599, got {status}"
            ));
        }
        if let Some(methods) = &patch.client_auth_methods
            && methods.is_empty()
        {
            return Err("clientAuthMethods must name at least one method".to_string());
        }
        if let Some(field) = &patch.routing_field
            && !field.is_empty()
            && !valid_field_name(field)
        {
            return Err(format!(
                "routingField must be 1 to 64 letters, digits, `_`, `-` or `.`, got '{field}'"
            ));
        }
        if let Some(field) = &patch.refresh_token_expires_in_field
            && !field.is_empty()
            && !valid_field_name(field)
        {
            return Err(format!(
                "refreshTokenExpiresInField must be 1 to 64 letters, digits, `_`, `-` or `.`, got '{field}'"
            ));
        }
        if let Some(extra) = &patch.extra_token_fields
            && let Some(name) = extra.keys().find(|name| {
                RESERVED_TOKEN_FIELDS.contains(&name.as_str()) || !valid_field_name(name)
            })
        {
            return Err(format!(
                "extraTokenFields may not set '{name}': the sandbox writes the OAuth fields itself, and names are 1 to 64 letters, digits, `_`, `-` or `.`"
            ));
        }
        // Asking for strict rotation ends a profile's keeping of old refresh tokens
        // (Microsoft's), unless the same patch keeps it: else the rotation asked for would
        // silently not happen.
        if patch.rotate_refresh_tokens == Some(true)
            && patch.old_refresh_token_stays_valid.is_none()
        {
            self.old_refresh_token_stays_valid = false;
        }
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = patch.$field { self.$field = v; } )* };
        }
        set!(
            access_token_ttl_seconds,
            refresh_token_idle_ttl_seconds,
            refresh_token_absolute_ttl_seconds,
            authorization_code_ttl_seconds,
            rotate_refresh_tokens,
            refresh_reuse_grace_seconds,
            revoke_grant_on_reuse,
            old_refresh_token_stays_valid,
            omit_refresh_token_on_refresh,
            require_offline_access_scope,
            include_expires_in,
            expires_in_as_string,
            token_response_format,
            errors_with_http200,
            invalid_grant_status,
            client_auth_methods,
            max_grants_per_user,
            routing_field,
            routing_location,
            routing_value,
            separate_refresh_endpoint,
            require_scope_on_refresh,
            accept_json_bodies,
            require_json_bodies,
            error_shape,
            refresh_token_expires_in_field,
            extra_token_fields,
            revocation_mode,
            revocation_delay_seconds,
            revocation_spares_access_tokens,
            access_token_activation_delay_seconds,
            api_rejection_shape,
            api_gzip
        );
        Ok(())
    }
}

/// The body of `PUT /__sandbox/profiles/{profile}`: every field optional; unknown fields are
/// refused so that a typo does not silently change nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfileSettingsPatch {
    pub access_token_ttl_seconds: Option<u64>,
    pub refresh_token_idle_ttl_seconds: Option<u64>,
    pub refresh_token_absolute_ttl_seconds: Option<u64>,
    pub authorization_code_ttl_seconds: Option<u64>,
    pub rotate_refresh_tokens: Option<bool>,
    pub refresh_reuse_grace_seconds: Option<u64>,
    pub revoke_grant_on_reuse: Option<bool>,
    pub old_refresh_token_stays_valid: Option<bool>,
    pub omit_refresh_token_on_refresh: Option<bool>,
    pub require_offline_access_scope: Option<bool>,
    pub include_expires_in: Option<bool>,
    pub expires_in_as_string: Option<bool>,
    pub token_response_format: Option<TokenResponseFormat>,
    pub errors_with_http200: Option<bool>,
    pub invalid_grant_status: Option<u16>,
    pub client_auth_methods: Option<Vec<ClientAuthMethod>>,
    pub max_grants_per_user: Option<u32>,
    pub routing_field: Option<String>,
    pub routing_location: Option<RoutingLocation>,
    pub routing_value: Option<RoutingValue>,
    pub separate_refresh_endpoint: Option<bool>,
    pub require_scope_on_refresh: Option<bool>,
    pub accept_json_bodies: Option<bool>,
    pub require_json_bodies: Option<bool>,
    pub error_shape: Option<ErrorShape>,
    pub refresh_token_expires_in_field: Option<String>,
    pub extra_token_fields: Option<Map<String, Value>>,
    pub revocation_mode: Option<RevocationMode>,
    pub revocation_delay_seconds: Option<u64>,
    pub revocation_spares_access_tokens: Option<bool>,
    pub access_token_activation_delay_seconds: Option<u64>,
    pub api_rejection_shape: Option<ApiRejectionShape>,
    pub api_gzip: Option<bool>,
}

/// The longest time any setting or clock advance may name: a hundred years (more overflowed
/// the sandbox's millisecond clock, and JSON readers' numbers).
pub const MAX_SECONDS: u64 = 100 * 365 * 86_400;

/// Token-response fields the sandbox writes itself; `extraTokenFields` may not replace them.
const RESERVED_TOKEN_FIELDS: &[&str] = &[
    "access_token",
    "refresh_token",
    "token_type",
    "expires_in",
    "scope",
    "error",
    "error_description",
    "ok",
];

/// A field or parameter name the sandbox will put in a body or a redirect.
fn valid_field_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for profile in Profile::ALL {
            assert_eq!(Profile::from_key(profile.key()), Some(profile));
            assert_eq!(Profile::ALL[profile.index()], profile);
        }
        assert_eq!(Profile::from_key("github"), None);
    }

    #[test]
    fn patch_validates_before_changing() {
        let mut settings = ProfileSettings::defaults(Profile::Generic);
        let patch: ProfileSettingsPatch =
            serde_json::from_str(r#"{"accessTokenTtlSeconds": 5, "invalidGrantStatus": 99}"#)
                .expect("valid JSON");
        assert!(settings.apply(patch).is_err());
        assert_eq!(settings.access_token_ttl_seconds, 3600);
    }
}
