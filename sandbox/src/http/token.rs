//! The token endpoint (and Adobe Sign's separate refresh endpoint): client authentication,
//! the `authorization_code` and `refresh_token` grants, and each profile's success body.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::shapes::{OAuthError, render_body, token_error};
use super::{
    AppState, Injected, base_url, basic_credentials, injected_fault_or_late_answer,
    parse_request_params,
};
use crate::faults::FaultTarget;
use crate::profiles::{ClientAuthMethod, Profile, ProfileSettings};
use crate::profiles::{RoutingLocation, RoutingValue};
use crate::state::{IssuedTokens, Sandbox, Stats, random_string};

/// Which grant types an endpoint takes: Adobe Sign splits them over two URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowedGrants {
    Both,
    AuthorizationCodeOnly,
    RefreshTokenOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrantKind {
    AuthorizationCode,
    RefreshToken,
}

pub async fn token(
    State(sandbox): State<AppState>,
    profile: Profile,
    allowed: AllowedGrants,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let late = match injected_fault_or_late_answer(&sandbox, FaultTarget::Token).await {
        Injected::Answer(fault) => {
            Stats::bump(&sandbox.stats.token_errors);
            return fault;
        }
        Injected::Late(delay) => Some(delay),
        Injected::Nothing => None,
    };
    let answer = answer(&sandbox, profile, allowed, &headers, &body);
    // Handled: the client may hang up while the answer is held, the work is done.
    if let Some(delay) = late {
        tokio::time::sleep(delay).await;
    }
    answer
}

fn answer(
    sandbox: &AppState,
    profile: Profile,
    allowed: AllowedGrants,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let settings = sandbox.settings(profile);
    // The generic profile's token endpoint gives up refreshes while a separate one is on.
    let allowed = if profile == Profile::Generic
        && allowed == AllowedGrants::Both
        && settings.separate_refresh_endpoint
    {
        AllowedGrants::AuthorizationCodeOnly
    } else {
        allowed
    };
    match handle(sandbox, profile, allowed, &settings, headers, body) {
        Ok((kind, issued)) => {
            Stats::bump(match kind {
                GrantKind::AuthorizationCode => &sandbox.stats.token_authorization_code,
                GrantKind::RefreshToken => &sandbox.stats.token_refresh_token,
            });
            let base = base_url(sandbox, headers);
            let body = success_body(profile, &settings, &issued, &base, sandbox.clock.now_ms());
            render_body(StatusCode::OK, settings.token_response_format, body)
        }
        Err(error) => {
            Stats::bump(&sandbox.stats.token_errors);
            token_error(profile, &settings, &error, sandbox.clock.now_ms())
        }
    }
}

fn handle(
    sandbox: &Sandbox,
    profile: Profile,
    allowed: AllowedGrants,
    settings: &ProfileSettings,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(GrantKind, IssuedTokens), OAuthError> {
    let form = parse_request_params(headers, body, settings)
        .map_err(|e| OAuthError::new("invalid_request", e.0))?;
    // A public client (RFC 6749 §2.1, §3.2.1): its id and no secret at all, at the generic
    // profile of a sandbox not started for one (confidential) client. It must use PKCE, and
    // its grants are refreshed the same way; a confidential client's never without its secret.
    let public = public_client(sandbox, profile, headers, &form).is_some();
    let client_id = if public {
        form.get("client_id").cloned().unwrap_or_default()
    } else {
        authenticate(sandbox, settings, headers, &form)?
    };
    let param = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let required = |name: &str| {
        param(name).ok_or_else(|| {
            OAuthError::new(
                "invalid_request",
                format!("The parameter '{name}' is missing."),
            )
        })
    };

    let grant_type = required("grant_type")?;
    let kind = match grant_type {
        "authorization_code" => GrantKind::AuthorizationCode,
        "refresh_token" => GrantKind::RefreshToken,
        other => {
            return Err(OAuthError::new(
                "unsupported_grant_type",
                format!(
                    "The grant type '{other}' is not supported; use authorization_code or refresh_token."
                ),
            ));
        }
    };
    match (allowed, kind) {
        (AllowedGrants::AuthorizationCodeOnly, GrantKind::RefreshToken) => {
            return Err(OAuthError::new(
                "unsupported_grant_type",
                "This endpoint only exchanges authorization codes; refresh at the refresh_endpoint of the metadata.",
            ));
        }
        (AllowedGrants::RefreshTokenOnly, GrantKind::AuthorizationCode) => {
            return Err(OAuthError::new(
                "unsupported_grant_type",
                "This endpoint only refreshes; exchange codes at the token_endpoint of the metadata.",
            ));
        }
        _ => {}
    }

    let without_secret = |what: &str| {
        OAuthError::new(
            "invalid_client",
            format!("Client authentication is required: {what}."),
        )
    };
    let issued = match kind {
        GrantKind::AuthorizationCode => {
            let code = required("code")?;
            if public && sandbox.code_has_challenge(code) == Some(false) {
                return Err(without_secret(
                    "a client without a secret must use PKCE (RFC 7636)",
                ));
            }
            sandbox.exchange_code(
                profile,
                &client_id,
                code,
                required("redirect_uri")?,
                param("code_verifier"),
                public,
            )
        }
        GrantKind::RefreshToken => {
            let refresh_token = required("refresh_token")?;
            if settings.require_scope_on_refresh && param("scope").is_none() {
                return Err(OAuthError::new(
                    "invalid_request",
                    "The parameter 'scope' is required on refresh at this server.",
                ));
            }
            if public && sandbox.refresh_token_public(refresh_token) == Some(false) {
                return Err(without_secret(
                    "this grant was made for a confidential client",
                ));
            }
            sandbox.refresh(profile, &client_id, refresh_token, param("scope"))
        }
    }
    .map_err(OAuthError::from_grant)?;
    Ok((kind, issued))
}

/// Whether a profile takes public clients: the generic one, unless the sandbox runs for one
/// (confidential) client.
pub fn public_clients_allowed(sandbox: &Sandbox, profile: Profile) -> bool {
    profile == Profile::Generic && !sandbox.has_fixed_client()
}

/// The id of a public client making this request (RFC 6749 §2.1, §3.2.1): its `client_id`
/// and no secret at all (an empty one counts as none), where public clients are taken.
pub(super) fn public_client<'a>(
    sandbox: &Sandbox,
    profile: Profile,
    headers: &HeaderMap,
    form: &'a std::collections::HashMap<String, String>,
) -> Option<&'a str> {
    let public = public_clients_allowed(sandbox, profile)
        && !headers.contains_key(axum::http::header::AUTHORIZATION)
        && form.get("client_secret").is_none_or(String::is_empty);
    form.get("client_id")
        .map(String::as_str)
        .filter(|id| public && !id.is_empty())
}

/// Authenticates the client by `client_secret_basic` or `client_secret_post` (never both at
/// once, RFC 6749 §2.3) and answers its id.
pub(super) fn authenticate(
    sandbox: &Sandbox,
    settings: &ProfileSettings,
    headers: &HeaderMap,
    form: &std::collections::HashMap<String, String>,
) -> Result<String, OAuthError> {
    let invalid_client = |basic: bool, description: &str| {
        let mut error = OAuthError::new("invalid_client", description);
        error.basic_auth_used = basic;
        error
    };
    let basic = basic_credentials(headers)
        .map_err(|_| invalid_client(true, "The Authorization: Basic header is malformed."))?;
    let form_id = form.get("client_id").filter(|v| !v.is_empty());
    let form_secret = form.get("client_secret").filter(|v| !v.is_empty());
    let (method, id, secret) = match (basic, form_secret) {
        (Some(_), Some(_)) => {
            return Err(OAuthError::new(
                "invalid_request",
                "Send client credentials either in the Authorization header or in the body, not both.",
            ));
        }
        (Some((id, secret)), None) => {
            if form_id.is_some_and(|f| *f != id) {
                return Err(invalid_client(
                    true,
                    "client_id in the body differs from the one in the Authorization header.",
                ));
            }
            (ClientAuthMethod::ClientSecretBasic, id, secret)
        }
        (None, Some(secret)) => {
            let Some(id) = form_id else {
                return Err(invalid_client(false, "client_id is missing."));
            };
            (
                ClientAuthMethod::ClientSecretPost,
                id.clone(),
                secret.clone(),
            )
        }
        (None, None) => {
            return Err(invalid_client(
                false,
                "Client authentication is required: send client_id and client_secret in the body or an Authorization: Basic header.",
            ));
        }
    };
    let basic_used = method == ClientAuthMethod::ClientSecretBasic;
    if !settings.client_auth_methods.contains(&method) {
        let name = match method {
            ClientAuthMethod::ClientSecretBasic => "client_secret_basic",
            ClientAuthMethod::ClientSecretPost => "client_secret_post",
        };
        return Err(invalid_client(
            basic_used,
            &format!("The client authentication method {name} is not allowed at this profile."),
        ));
    }
    if !sandbox.authenticate_client(&id, &secret) {
        return Err(invalid_client(
            basic_used,
            "The client id or secret is wrong.",
        ));
    }
    Ok(id)
}

/// The profile's token response body.
fn success_body(
    profile: Profile,
    settings: &ProfileSettings,
    issued: &IssuedTokens,
    base: &str,
    now: i64,
) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("access_token".into(), json!(issued.access_token));
    let token_type = if profile == Profile::Box {
        "bearer"
    } else {
        "Bearer"
    };
    body.insert("token_type".into(), json!(token_type));
    if settings.include_expires_in {
        let expires_in = if settings.expires_in_as_string {
            json!(issued.expires_in.to_string())
        } else {
            json!(issued.expires_in)
        };
        body.insert("expires_in".into(), expires_in);
    }
    if let Some(refresh_token) = &issued.refresh_token {
        body.insert("refresh_token".into(), json!(refresh_token));
    }
    match profile {
        Profile::AdobeSign => {
            let access_point = format!("{base}/adobe-sign/");
            body.insert("api_access_point".into(), json!(access_point));
            body.insert("web_access_point".into(), json!(access_point));
        }
        Profile::Salesforce => {
            let instance_url = format!("{base}/salesforce");
            let id = format!(
                "{instance_url}/id/{}/{}",
                salesforce_org_id(),
                salesforce_user_id(&issued.user)
            );
            let issued_at = now.to_string();
            // A real signature is an HMAC over id + issued_at with the client secret; callers
            // never verify it against the sandbox, so random bytes keep it opaque.
            body.insert(
                "signature".into(),
                json!(random_string(32).replace(['-', '_'], "A")),
            );
            body.insert("scope".into(), json!(issued.scope));
            body.insert("instance_url".into(), json!(instance_url));
            body.insert("id".into(), json!(id));
            body.insert("issued_at".into(), json!(issued_at));
        }
        Profile::Box => {
            body.insert("restricted_to".into(), json!([]));
        }
        Profile::Microsoft => {
            // offline_access is never echoed back by Microsoft.
            let scope: Vec<&str> = issued
                .scope
                .split_whitespace()
                .filter(|s| *s != "offline_access")
                .collect();
            body.insert("scope".into(), json!(scope.join(" ")));
            if let Some(expires_in) = body.get("expires_in").cloned() {
                body.insert("ext_expires_in".into(), expires_in);
            }
        }
        Profile::Generic => {
            if !issued.scope.is_empty() {
                body.insert("scope".into(), json!(issued.scope));
            }
        }
    }
    if !settings.refresh_token_expires_in_field.is_empty()
        && let Some(seconds) = issued.refresh_token_expires_in
    {
        let value = if settings.expires_in_as_string {
            json!(seconds.to_string())
        } else {
            json!(seconds)
        };
        body.insert(settings.refresh_token_expires_in_field.clone(), value);
    }
    if settings.routing_location != RoutingLocation::Redirect
        && let Some((field, value)) = routing_pair(profile, settings, &issued.user, base)
    {
        body.insert(field, json!(value));
    }
    for (name, value) in &settings.extra_token_fields {
        body.insert(name.clone(), value.clone());
    }
    body
}

/// The routing field and its value for `user`, when the profile hands out routing data.
pub fn routing_pair(
    profile: Profile,
    settings: &ProfileSettings,
    user: &str,
    base: &str,
) -> Option<(String, String)> {
    if settings.routing_field.is_empty() {
        return None;
    }
    let tenant = Sandbox::tenant_of(user);
    let value = match settings.routing_value {
        RoutingValue::BaseUrl => format!("{base}/{}/tenants/{tenant}/", profile.key()),
        RoutingValue::TenantId => tenant,
    };
    Some((settings.routing_field.clone(), value))
}

/// The sandbox's one Salesforce org.
pub fn salesforce_org_id() -> &'static str {
    "00D000000SANDBOXAA"
}

/// A stable 18-character Salesforce-style user id derived from the user name.
pub fn salesforce_user_id(user: &str) -> String {
    format!("005{}", &stable_hex(user)[..15]).to_uppercase()
}

/// Hex of SHA-256(`text`): stable ids for users across runs.
pub fn stable_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
