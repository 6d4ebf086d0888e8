//! Revocation endpoints, one answer style per profile.
//!
//! - Adobe Sign: `token` in the form body or the query string; 200 with an empty body; errors
//!   are 400 `{"code": "INVALID_REQUEST" | "EXPIRED_TOKEN" | "INVALID_TOKEN", "message": …}`.
//! - Salesforce: `token` in the body or query; 200; errors 400 `unsupported_token_type` (no
//!   token) or `invalid_token` (unknown, expired or already revoked).
//! - Box: form `client_id`, `client_secret`, `token`; client credentials are required; an empty
//!   200 for any token, known or not.
//! - generic and Microsoft: RFC 7009: 200 even for unknown tokens, `token_type_hint` accepted
//!   and ignored (the sandbox looks the token up in both tables). Microsoft has no revocation
//!   endpoint at all; the sandbox's is a stand-in so tests can kill a Microsoft grant.
//!
//! The cascade (which other tokens die) lives in `Sandbox::revoke`.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{
    AppState, bearer_token, injected_fault, json_response, parse_pairs, parse_request_params,
};
use crate::faults::FaultTarget;
use crate::profiles::{Profile, RevocationMode};
use crate::state::{RevokeOutcome, Stats};

/// Revoke bodies are tiny; anything larger is refused rather than buffered.
const MAX_BODY_BYTES: usize = 64 * 1024;

pub async fn revoke(
    State(sandbox): State<AppState>,
    profile: Profile,
    request: Request,
) -> Response {
    if let Some(fault) = injected_fault(&sandbox, FaultTarget::Revoke).await {
        Stats::bump(&sandbox.stats.revoke_errors);
        return fault;
    }
    let response = answer(&sandbox, profile, request).await;
    Stats::bump(if response.status() == StatusCode::OK {
        &sandbox.stats.revoke
    } else {
        &sandbox.stats.revoke_errors
    });
    response
}

async fn answer(sandbox: &crate::state::Sandbox, profile: Profile, request: Request) -> Response {
    let settings = sandbox.settings(profile);
    if settings.revocation_mode == RevocationMode::None {
        return super::not_found();
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The body is too large or unreadable.",
            );
        }
    };
    // Query parameters first; the form body wins where both name the same parameter.
    let mut params = match parse_pairs(parts.uri.query().unwrap_or("").as_bytes()) {
        Ok(params) => params,
        Err(e) => return bad_input(profile, &e.0),
    };
    match parse_request_params(&parts.headers, &body, &settings) {
        Ok(form) => params.extend(form),
        Err(e) => return bad_input(profile, &e.0),
    }
    // Dropbox and Slack revoke the token that authenticates the call.
    let bearer = bearer_token(&parts.headers);
    let token = params
        .get("token")
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .or(bearer);
    let fake_success = settings.revocation_mode == RevocationMode::FakeSuccess;

    match profile {
        Profile::AdobeSign => {
            let Some(token) = token else {
                return adobe_error("INVALID_REQUEST", "Empty or missing token");
            };
            if fake_success {
                return StatusCode::OK.into_response();
            }
            match sandbox.revoke(profile, token) {
                RevokeOutcome::Revoked => StatusCode::OK.into_response(),
                RevokeOutcome::AlreadyDead => {
                    adobe_error("EXPIRED_TOKEN", "The token is expired or already revoked")
                }
                RevokeOutcome::Unknown => adobe_error(
                    "INVALID_TOKEN",
                    "This is not a valid OAuth access or refresh token",
                ),
            }
        }
        Profile::Salesforce => {
            let Some(token) = token else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "unsupported_token_type",
                    "this token type is not supported",
                );
            };
            if fake_success {
                return StatusCode::OK.into_response();
            }
            match sandbox.revoke(profile, token) {
                RevokeOutcome::Revoked => StatusCode::OK.into_response(),
                RevokeOutcome::AlreadyDead | RevokeOutcome::Unknown => {
                    oauth_error(StatusCode::BAD_REQUEST, "invalid_token", "invalid token")
                }
            }
        }
        Profile::Box | Profile::Microsoft | Profile::Generic => {
            // Box requires the client's credentials, and so does a sandbox started for one
            // client (`--client`); otherwise they are checked when sent (RFC 7009 §2.1).
            let sends_credentials = params.get("client_secret").is_some_and(|s| !s.is_empty())
                || (parts
                    .headers
                    .contains_key(axum::http::header::AUTHORIZATION)
                    && bearer.is_none());
            // A token sent as `Authorization: Bearer` alone authenticates the call itself
            // (Dropbox, Slack).
            let bearer_only = bearer.is_some() && !params.contains_key("token");
            let public = super::token::public_client(sandbox, profile, &parts.headers, &params);
            let client = if let (Some(id), false) = (public, sends_credentials) {
                // A public client names itself: its tokens are checked against that name.
                Some(id.to_string())
            } else if profile == Profile::Box
                || sends_credentials
                || (sandbox.has_fixed_client() && !bearer_only)
            {
                match super::token::authenticate(sandbox, &settings, &parts.headers, &params) {
                    Ok(client) => Some(client),
                    Err(error) => {
                        let status = if error.code == "invalid_client" {
                            StatusCode::UNAUTHORIZED
                        } else {
                            StatusCode::BAD_REQUEST
                        };
                        let mut response = oauth_error(status, error.code, &error.description);
                        // RFC 6749 §5.2 (RFC 7009 §2.2.1): a client that tried Basic learns the
                        // scheme the endpoint takes.
                        if error.code == "invalid_client" && error.basic_auth_used {
                            response.headers_mut().insert(
                                axum::http::header::WWW_AUTHENTICATE,
                                axum::http::HeaderValue::from_static(
                                    "Basic realm=\"tokenwarden-sandbox\"",
                                ),
                            );
                        }
                        return response;
                    }
                }
            } else {
                None
            };
            let Some(token) = token else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "The parameter 'token' is missing.",
                );
            };
            // A token that authenticates the call must be a live access token, as any API call's
            // (Dropbox answers an expired one 401 `expired_access_token`, and revokes nothing).
            // (A provider faking success answers 200 whatever it is given.)
            if bearer_only
                && !fake_success
                && let Err(rejection) = sandbox.check_access_token(profile, token)
            {
                return super::shapes::api_rejection(
                    profile,
                    settings.api_rejection_shape,
                    rejection,
                    sandbox.clock.now_ms(),
                );
            }
            // RFC 7009 §2.1: the token must have been issued to the client revoking it.
            if let Some(client) = &client
                && sandbox
                    .token_client(profile, token)
                    .is_some_and(|owner| owner != *client)
            {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "unauthorized_client",
                    "The token was not issued to this client.",
                );
            }
            // RFC 7009 §2.2: unknown and already-dead tokens answer 200 too. A token that
            // authenticated the call alone ends its grant (Dropbox: the refresh token and every
            // access token minted from it).
            if !fake_success {
                let _ = if bearer_only {
                    sandbox.revoke_bearer(profile, token)
                } else {
                    sandbox.revoke(profile, token)
                };
            }
            StatusCode::OK.into_response()
        }
    }
}

fn bad_input(profile: Profile, message: &str) -> Response {
    if profile == Profile::AdobeSign {
        adobe_error("INVALID_REQUEST", message)
    } else {
        oauth_error(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

fn adobe_error(code: &str, message: &str) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        json!({"code": code, "message": message}),
    )
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        json!({"error": error, "error_description": description}),
    )
}
