//! The sandbox's HTTP surface: the router and helpers shared by the endpoint modules.
//!
//! One module per kind of endpoint: [`authorize`], [`token`], [`revoke`], [`api`] (the
//! protected API), [`metadata`] (RFC 8414 documents) and [`admin`] (`/__sandbox/…` controls).
//! [`shapes`] holds each profile's error and rejection bodies. Handlers never panic on input:
//! every request-derived value is parsed into a `Result` and bad input answers 4xx.

// Handlers return early with a ready `Response` as the error; boxing it would only add noise.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod api;
pub mod authorize;
pub mod metadata;
pub mod revoke;
pub mod shapes;
pub mod token;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use base64::Engine as _;
use serde_json::json;

use crate::faults::FaultTarget;
use crate::profiles::Profile;
use crate::state::{Sandbox, Stats};

pub type AppState = Arc<Sandbox>;

/// Builds the full router over `sandbox`.
pub fn router(sandbox: AppState) -> Router {
    let mut app = Router::new().merge(admin::routes());
    for profile in Profile::ALL {
        app = app.merge(profile_routes(profile));
    }
    app.fallback(|| async { not_found() }).with_state(sandbox)
}

/// The answer for paths the sandbox does not serve (or, by a setting, does not serve now).
pub fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        json!({"error": "not_found", "message": "No sandbox endpoint at this path. See GET /{profile}/.well-known/oauth-authorization-server for a profile's endpoints."}),
    )
}

/// The OAuth endpoints, metadata and protected API of one profile. Handlers are closures that
/// capture the profile, so every URL layout stays literal and visible here.
fn profile_routes(profile: Profile) -> Router<AppState> {
    let key = profile.key();
    let paths = profile.paths();
    // Microsoft's OAuth URLs carry a tenant; any tenant string is accepted.
    let oauth_path = |path: &str| path.replacen("/microsoft/common/", "/microsoft/{tenant}/", 1);

    let mut routes = Router::new()
        .route(
            &format!("/{key}/.well-known/oauth-authorization-server"),
            get(
                move |state: State<AppState>, headers: HeaderMap| async move {
                    metadata::document(state, profile, headers)
                },
            ),
        )
        .route(
            &oauth_path(paths.authorize),
            get(move |state: State<AppState>, request: Request| {
                authorize::show(state, profile, request)
            })
            .post(
                move |state: State<AppState>, headers: HeaderMap, body: Bytes| {
                    authorize::decide(state, profile, headers, body)
                },
            ),
        )
        .route(
            &oauth_path(paths.token),
            post(
                move |state: State<AppState>, headers: HeaderMap, body: Bytes| {
                    let grants = if profile == Profile::AdobeSign {
                        token::AllowedGrants::AuthorizationCodeOnly
                    } else {
                        token::AllowedGrants::Both
                    };
                    token::token(state, profile, grants, headers, body)
                },
            ),
        )
        .route(
            &oauth_path(paths.revoke),
            post(move |state: State<AppState>, request: Request| async move {
                revoke::revoke(state, profile, request).await
            }),
        )
        .route(
            &format!("/{key}/api/me"),
            get(move |state: State<AppState>, headers: HeaderMap| api::me(state, profile, headers)),
        )
        .route(
            &format!("/{key}/api/echo"),
            any(move |state: State<AppState>, request: Request| api::echo(state, profile, request)),
        )
        .route(
            &format!("/{key}/api/echo/{{*rest}}"),
            any(move |state: State<AppState>, request: Request| api::echo(state, profile, request)),
        );
    if profile == Profile::Generic {
        // The generic profile refreshes here only while `separateRefreshEndpoint` is on.
        routes = routes
            .route(
                "/generic/refresh",
                post(
                    move |state: State<AppState>, headers: HeaderMap, body: Bytes| async move {
                        if !state.settings(profile).separate_refresh_endpoint {
                            return not_found();
                        }
                        refresh_token_only(state, profile, headers, body).await
                    },
                ),
            )
            .route(
                "/generic/tenants/{tenant}/api/me",
                get(
                    move |state: State<AppState>,
                          Path(tenant): Path<String>,
                          headers: HeaderMap| {
                        api::tenant_me(state, profile, tenant, headers)
                    },
                ),
            )
            .route(
                "/generic/tenants/{tenant}/api/echo",
                any(
                    move |state: State<AppState>, Path(tenant): Path<String>, request: Request| {
                        api::tenant_echo(state, profile, tenant, request)
                    },
                ),
            )
            .route(
                "/generic/tenants/{tenant}/api/echo/{*rest}",
                any(
                    move |state: State<AppState>,
                          Path((tenant, _rest)): Path<(String, String)>,
                          request: Request| {
                        api::tenant_echo(state, profile, tenant, request)
                    },
                ),
            );
    }
    // A separate refresh endpoint (Adobe's) takes refresh tokens only.
    let refresh_only = move || {
        post(
            move |state: State<AppState>, headers: HeaderMap, body: Bytes| {
                refresh_token_only(state, profile, headers, body)
            },
        )
    };
    if let Some(refresh) = paths.refresh {
        routes = routes.route(refresh, refresh_only());
    }
    if profile == Profile::AdobeSign {
        // The paths the articles use (`/oauth/revoke?token=`, `/oauth/refresh`), beside the
        // v2 ones the metadata names.
        routes = routes
            .route(
                "/adobe-sign/oauth/revoke",
                post(move |state: State<AppState>, request: Request| async move {
                    revoke::revoke(state, profile, request).await
                }),
            )
            .route("/adobe-sign/oauth/refresh", refresh_only());
    }
    routes.merge(api::provider_routes(profile))
}

/// A token endpoint that takes refresh tokens only (Adobe's separate refresh endpoint).
async fn refresh_token_only(
    state: State<AppState>,
    profile: Profile,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    token::token(
        state,
        profile,
        token::AllowedGrants::RefreshTokenOnly,
        headers,
        body,
    )
    .await
}

/// The base URL the sandbox names itself by, without a trailing slash.
pub fn base_url(sandbox: &Sandbox, headers: &HeaderMap) -> String {
    if let Some(url) = &sandbox.public_url {
        return url.clone();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or("127.0.0.1:4000");
    format!("http://{host}")
}

pub fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// Why a form body was refused.
#[derive(Debug)]
pub struct FormError(pub String);

/// Parses an `application/x-www-form-urlencoded` body. A missing Content-Type is tolerated (an
/// empty body is common on revoke calls); another media type, or a parameter given twice
/// (RFC 6749 §3.2), is refused.
pub fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, String>, FormError> {
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let media_type = content_type
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if media_type != "application/x-www-form-urlencoded" {
            return Err(FormError(format!(
                "The body must be application/x-www-form-urlencoded, not '{media_type}'."
            )));
        }
    }
    parse_pairs(body)
}

/// Parses the parameters of a token or revocation request: a form (see [`parse_form`]), or a
/// JSON object when the profile accepts or requires JSON bodies (`acceptJsonBodies`,
/// `requireJsonBodies`). JSON numbers and booleans become their text; nested values are refused.
pub fn parse_request_params(
    headers: &HeaderMap,
    body: &[u8],
    settings: &crate::profiles::ProfileSettings,
) -> Result<HashMap<String, String>, FormError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    let is_json = media_type
        .as_deref()
        .is_some_and(|m| m == "application/json" || m.ends_with("+json"));
    let json_allowed = settings.accept_json_bodies || settings.require_json_bodies;
    if !is_json {
        if settings.require_json_bodies && !body.is_empty() {
            return Err(FormError(
                "This server takes JSON request bodies: send Content-Type: application/json with a JSON object."
                    .to_string(),
            ));
        }
        return parse_form(headers, body);
    }
    // No body at all says nothing in any type: the parameters are in the query (the
    // Salesforce article's revocation sends `Content-Type: application/json` with none).
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(HashMap::new());
    }
    if !json_allowed {
        return Err(FormError(
            "The body must be application/x-www-form-urlencoded, not 'application/json'."
                .to_string(),
        ));
    }
    let object = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(object)) => object,
        Ok(_) => return Err(FormError("The JSON body must be an object.".to_string())),
        Err(e) => return Err(FormError(format!("The JSON body is invalid: {e}"))),
    };
    let mut params = HashMap::new();
    for (name, value) in object {
        let text = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Null => continue,
            _ => {
                return Err(FormError(format!(
                    "The parameter '{name}' must be a string, not a JSON array or object."
                )));
            }
        };
        params.insert(name, text);
    }
    Ok(params)
}

/// Parses form-encoded pairs (a body or a query string), refusing repeated parameters.
pub fn parse_pairs(input: &[u8]) -> Result<HashMap<String, String>, FormError> {
    let mut params = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(input) {
        if params
            .insert(name.to_string(), value.into_owned())
            .is_some()
        {
            return Err(FormError(format!("The parameter '{name}' is repeated.")));
        }
    }
    Ok(params)
}

/// An `Authorization: Basic` header that cannot be decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct MalformedBasicHeader;

/// Client credentials from `Authorization: Basic` (RFC 6749 §2.3.1: id and secret are each
/// form-urlencoded before base64). `Ok(None)` when no Basic header was sent.
pub fn basic_credentials(
    headers: &HeaderMap,
) -> Result<Option<(String, String)>, MalformedBasicHeader> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| MalformedBasicHeader)?;
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| MalformedBasicHeader)?;
    let decoded = String::from_utf8(decoded).map_err(|_| MalformedBasicHeader)?;
    let (id, secret) = decoded.split_once(':').ok_or(MalformedBasicHeader)?;
    Ok(Some((form_decode(id), form_decode(secret))))
}

/// Decodes one form-urlencoded component (`+` is a space).
fn form_decode(component: &str) -> String {
    let pair = format!("v={component}");
    url::form_urlencoded::parse(pair.as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// The bearer token of a request, if it sent one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Applies the next queued fault for `target`, if any: sleeps its delay (with no lock held),
/// then answers the failure when it has a status. `None` means "go on serving".
pub async fn injected_fault(sandbox: &Sandbox, target: FaultTarget) -> Option<Response> {
    match injected_fault_or_late_answer(sandbox, target).await {
        Injected::Answer(response) => Some(response),
        Injected::Late(delay) => {
            tokio::time::sleep(delay).await;
            None
        }
        Injected::Nothing => None,
    }
}

/// What a fault makes of a request.
pub enum Injected {
    /// Served as usual.
    Nothing,
    /// Answered with this failure.
    Answer(Response),
    /// Served, and its answer held this long ([`crate::faults::Fault::answer_late`]).
    Late(Duration),
}

/// [`injected_fault`], for handlers that can answer late: a late answer is theirs to hold.
pub async fn injected_fault_or_late_answer(sandbox: &Sandbox, target: FaultTarget) -> Injected {
    let Some(fault) = sandbox.faults.take(target) else {
        return Injected::Nothing;
    };
    Stats::bump(&sandbox.stats.faults_injected);
    if fault.answer_late {
        return Injected::Late(Duration::from_millis(fault.delay_ms));
    }
    if fault.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
    }
    if fault.status == 0 {
        return Injected::Nothing;
    }
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let error = if status == StatusCode::TOO_MANY_REQUESTS {
        "rate_limited"
    } else {
        "temporarily_unavailable"
    };
    let body = match fault.error {
        Some(imitated) => imitated.body(),
        None => {
            json!({"error": error, "error_description": format!("Injected fault: HTTP {}.", fault.status)})
        }
    };
    let mut response = json_response(status, body);
    if let Some(seconds) = fault.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    // An injected failure of the token endpoint is a token answer like the others.
    if target == FaultTarget::Token {
        shapes::not_cached(&mut response);
    }
    Injected::Answer(response)
}

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_decoded() {
        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode("my%20id:s%3Acret+x");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).expect("ascii"),
        );
        assert_eq!(
            basic_credentials(&headers),
            Ok(Some(("my id".to_string(), "s:cret x".to_string())))
        );
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(basic_credentials(&headers), Err(MalformedBasicHeader));
    }

    #[test]
    fn repeated_parameters_are_refused() {
        assert!(parse_pairs(b"a=1&a=2").is_err());
        assert_eq!(
            parse_pairs(b"a=1&b=x+y")
                .expect("valid")
                .get("b")
                .map(String::as_str),
            Some("x y")
        );
    }
}
