//! Each profile's answer shapes: token-endpoint errors and successes, and API rejections.
//!
//! Real providers disagree on these bodies, and the service's error classification depends on
//! them, so they are written out literally per profile. Where a real shape is unconfirmed the
//! sandbox uses the RFC 6749 shape and says so.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::clock::{Millis, rfc3339};
use crate::profiles::{
    ApiRejectionShape, ErrorShape, Profile, ProfileSettings, TokenResponseFormat,
};
use crate::state::{AccessRejection, GrantError, random_string};

/// An RFC 6749 §5.2 error of the token endpoint, before it is shaped for a profile.
#[derive(Debug, Clone)]
pub struct OAuthError {
    pub code: &'static str,
    pub description: String,
    /// The grant failure behind an `invalid_grant`, for profiles whose wording depends on it.
    pub grant_error: Option<GrantError>,
    /// Whether the client sent Basic credentials (a 401 must then carry `WWW-Authenticate`).
    pub basic_auth_used: bool,
}

impl OAuthError {
    pub fn new(code: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError {
            code,
            description: description.into(),
            grant_error: None,
            basic_auth_used: false,
        }
    }

    pub fn from_grant(error: GrantError) -> OAuthError {
        let code = if error == GrantError::InvalidScope {
            "invalid_scope"
        } else {
            "invalid_grant"
        };
        OAuthError {
            code,
            description: error.description().to_string(),
            grant_error: Some(error),
            basic_auth_used: false,
        }
    }
}

/// Renders a token-endpoint error in the profile's shape, honouring `invalidGrantStatus`,
/// `errorsWithHttp200` and `tokenResponseFormat`.
pub fn token_error(
    profile: Profile,
    settings: &ProfileSettings,
    error: &OAuthError,
    now: Millis,
) -> Response {
    let mut status = match error.code {
        "invalid_client" => StatusCode::UNAUTHORIZED,
        "invalid_grant" => {
            StatusCode::from_u16(settings.invalid_grant_status).unwrap_or(StatusCode::BAD_REQUEST)
        }
        _ => StatusCode::BAD_REQUEST,
    };
    if settings.errors_with_http200 {
        status = StatusCode::OK;
    }
    let description = profile_error_description(profile, error);
    let mut body = Map::new();
    body.insert("error".into(), json!(error.code));
    if profile == Profile::Microsoft {
        let code = aadsts_code(error);
        let trace_id = uuid_like();
        let correlation_id = uuid_like();
        let timestamp = rfc3339(now).replace('T', " ");
        body.insert(
            "error_description".into(),
            json!(format!(
                "AADSTS{code}: {description}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}"
            )),
        );
        body.insert("error_codes".into(), json!([code]));
        body.insert("timestamp".into(), json!(timestamp));
        body.insert("trace_id".into(), json!(trace_id));
        body.insert("correlation_id".into(), json!(correlation_id));
    } else {
        body.insert("error_description".into(), json!(description));
    }
    let (status, body) = match settings.error_shape {
        ErrorShape::Oauth => (status, body),
        shape => provider_error_body(shape, status, error),
    };
    let mut response = render_body(status, settings.token_response_format, body);
    if error.code == "invalid_client" && error.basic_auth_used {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"tokenwarden-sandbox\""),
        );
    }
    response
}

/// What went wrong, coarsely, for the providers whose error codes name the failing input.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failing {
    RefreshToken,
    Code,
    Client,
    RedirectUri,
    Other,
}

fn failing(error: &OAuthError) -> Failing {
    match (error.code, error.grant_error) {
        (_, Some(e)) if e.concerns_refresh_token() => Failing::RefreshToken,
        (_, Some(GrantError::RedirectUriMismatch)) => Failing::RedirectUri,
        (_, Some(GrantError::ClientMismatch)) | ("invalid_client", _) => Failing::Client,
        (_, Some(_)) => Failing::Code,
        _ => Failing::Other,
    }
}

/// A token-endpoint error in a non-OAuth provider shape (`errorShape`). Slack and GitHub
/// answer every error with HTTP 200.
fn provider_error_body(
    shape: ErrorShape,
    status: StatusCode,
    error: &OAuthError,
) -> (StatusCode, Map<String, Value>) {
    let what = failing(error);
    let mut body = Map::new();
    match shape {
        ErrorShape::Oauth => {
            body.insert("error".into(), json!(error.code));
            body.insert("error_description".into(), json!(error.description));
            (status, body)
        }
        ErrorShape::Hubspot => {
            let (code, message) = match what {
                Failing::RefreshToken => ("BAD_REFRESH_TOKEN", "missing or invalid refresh token"),
                Failing::Code => ("BAD_AUTH_CODE", "missing or unknown auth code"),
                Failing::Client => ("BAD_CLIENT_ID", "missing or invalid client id or secret"),
                Failing::RedirectUri => ("BAD_REDIRECT_URI", "redirect_uri does not match"),
                Failing::Other => ("BAD_REQUEST", error.description.as_str()),
            };
            body.insert("status".into(), json!(code));
            body.insert("message".into(), json!(message));
            body.insert("correlationId".into(), json!(uuid_like()));
            (status, body)
        }
        ErrorShape::Zoom => {
            let reason = match what {
                Failing::RefreshToken => "Invalid Token!".to_string(),
                Failing::Code => "Invalid authorization code".to_string(),
                Failing::Client => "Invalid client_id or client_secret".to_string(),
                Failing::RedirectUri => "Redirect URI mismatch.".to_string(),
                Failing::Other => error.description.clone(),
            };
            body.insert("reason".into(), json!(reason));
            body.insert("error".into(), json!(error.code));
            (status, body)
        }
        ErrorShape::Slack => {
            let code = match what {
                Failing::RefreshToken => "invalid_refresh_token",
                Failing::Code => "invalid_code",
                Failing::Client => "invalid_client_id",
                Failing::RedirectUri => "bad_redirect_uri",
                Failing::Other => error.code,
            };
            body.insert("ok".into(), json!(false));
            body.insert("error".into(), json!(code));
            (StatusCode::OK, body)
        }
        ErrorShape::Github => {
            let (code, description) = match what {
                Failing::RefreshToken => (
                    "bad_refresh_token",
                    "The refresh token passed is incorrect or expired.".to_string(),
                ),
                Failing::Code => (
                    "bad_verification_code",
                    "The code passed is incorrect or expired.".to_string(),
                ),
                Failing::Client => (
                    "incorrect_client_credentials",
                    "The client_id and/or client_secret passed are incorrect.".to_string(),
                ),
                Failing::RedirectUri => (
                    "redirect_uri_mismatch",
                    "The redirect_uri MUST match the registered callback URL for this application."
                        .to_string(),
                ),
                Failing::Other => (error.code, error.description.clone()),
            };
            body.insert("error".into(), json!(code));
            body.insert("error_description".into(), json!(description));
            body.insert(
                "error_uri".into(),
                json!("https://docs.github.com/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors"),
            );
            (StatusCode::OK, body)
        }
    }
}

fn profile_error_description(profile: Profile, error: &OAuthError) -> String {
    let grant_error = error.grant_error;
    match profile {
        Profile::Salesforce => match (error.code, grant_error) {
            (_, Some(e)) if e.concerns_refresh_token() => "expired access/refresh token".into(),
            (_, Some(GrantError::CodeExpired)) => "expired authorization code".into(),
            ("invalid_grant", _) => "invalid authorization code".into(),
            ("invalid_client", _) => "invalid client credentials".into(),
            ("unsupported_grant_type", _) => "grant type not supported".into(),
            _ => error.description.clone(),
        },
        Profile::Box => match (error.code, grant_error) {
            (_, Some(e)) if e.concerns_refresh_token() => "Refresh token has expired".into(),
            ("invalid_grant", _) => "Auth code doesn't exist or is invalid for the client".into(),
            ("invalid_client", _) => "The client credentials are invalid".into(),
            _ => error.description.clone(),
        },
        Profile::Microsoft => match grant_error {
            Some(GrantError::RefreshTokenExpired) => {
                "The refresh token has expired due to inactivity. The token was issued on a date \
                 beyond the refresh token idle lifetime of the sandbox profile."
                    .into()
            }
            Some(GrantError::RefreshTokenRevoked | GrantError::RefreshTokenReused) => {
                "The provided grant has expired due to it being revoked, a fresh auth token is \
                 needed. The user might have changed or reset their password."
                    .into()
            }
            _ => error.description.clone(),
        },
        // Adobe Sign's refresh-failure body is unconfirmed: RFC 6749 shape and plain wording.
        Profile::AdobeSign | Profile::Generic => error.description.clone(),
    }
}

/// The AADSTS number Microsoft would put in front of the message.
fn aadsts_code(error: &OAuthError) -> u32 {
    match (error.code, error.grant_error) {
        (_, Some(GrantError::RefreshTokenExpired)) => 700082,
        (_, Some(GrantError::RefreshTokenRevoked | GrantError::RefreshTokenReused)) => 50173,
        (_, Some(GrantError::RefreshTokenUnknown)) => 9002313,
        (_, Some(GrantError::CodeExpired | GrantError::CodeUnknown | GrantError::CodeReused)) => {
            70008
        }
        (
            _,
            Some(
                GrantError::PkceMismatch
                | GrantError::PkceVerifierMissing
                | GrantError::PkceVerifierUnexpected,
            ),
        ) => 50148,
        (_, Some(GrantError::RedirectUriMismatch)) => 50011,
        (_, Some(GrantError::InvalidScope)) => 70011,
        (_, Some(GrantError::ClientMismatch)) => 70000,
        ("invalid_client", _) => 7000215,
        ("unsupported_grant_type", _) => 70003,
        _ => 900144,
    }
}

/// A random id in the 8-4-4-4-12 hex layout of Microsoft's trace ids.
pub fn uuid_like() -> String {
    let hex: String = random_string(24)
        .bytes()
        .map(|b| char::from(b"0123456789abcdef"[usize::from(b % 16)]))
        .take(32)
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Renders a flat token-endpoint body as JSON or form-urlencoded.
pub fn render_body(
    status: StatusCode,
    format: TokenResponseFormat,
    body: Map<String, Value>,
) -> Response {
    let mut response = match format {
        TokenResponseFormat::Json => (status, axum::Json(Value::Object(body))).into_response(),
        TokenResponseFormat::Form => {
            let mut serializer = url::form_urlencoded::Serializer::new(String::new());
            for (name, value) in &body {
                let text = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                serializer.append_pair(name, &text);
            }
            (
                status,
                [(header::CONTENT_TYPE, "application/x-www-form-urlencoded")],
                serializer.finish(),
            )
                .into_response()
        }
    };
    not_cached(&mut response);
    response
}

/// RFC 6749 §5.1: token answers carry `Cache-Control: no-store` and `Pragma: no-cache`.
pub fn not_cached(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// The answer of the protected API to a missing, unknown, expired or revoked token, in the
/// `apiRejectionShape` of the profile's settings, or the profile's own shape.
pub fn api_rejection(
    profile: Profile,
    shape: ApiRejectionShape,
    rejection: AccessRejection,
    now: Millis,
) -> Response {
    let unauthorized = StatusCode::UNAUTHORIZED;
    match shape {
        ApiRejectionShape::Profile => {}
        ApiRejectionShape::EmptyWithWwwAuthenticate => {
            let challenge = if rejection == AccessRejection::Missing {
                "Bearer realm=\"Service\"".to_string()
            } else {
                format!(
                    "Bearer realm=\"Service\", error=\"invalid_token\", error_description=\"{}\"",
                    rejection.description()
                )
            };
            let mut response = unauthorized.into_response();
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
            return response;
        }
        ApiRejectionShape::Array => {
            return (
                unauthorized,
                axum::Json(json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])),
            )
                .into_response();
        }
        ApiRejectionShape::OkFalse => {
            let error = match rejection {
                AccessRejection::Missing => "not_authed",
                AccessRejection::Unknown | AccessRejection::NotYetActive => "invalid_auth",
                AccessRejection::Expired => "token_expired",
                AccessRejection::Revoked => "token_revoked",
            };
            return (
                StatusCode::OK,
                axum::Json(json!({"ok": false, "error": error})),
            )
                .into_response();
        }
        ApiRejectionShape::Xml => {
            let detail = match rejection {
                AccessRejection::Expired => format!("Token expired: {}", rfc3339(now)),
                other => other.description().to_string(),
            };
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\
                 <IntuitResponse time=\"{}\"><Fault type=\"AUTHENTICATION\"><Error code=\"3200\">\
                 <Message>message=AuthenticationFailed; errorCode=003200; statusCode=401</Message>\
                 <Detail>{}</Detail></Error></Fault></IntuitResponse>",
                rfc3339(now),
                super::html_escape(&detail)
            );
            return (
                unauthorized,
                [(header::CONTENT_TYPE, "application/xml")],
                body,
            )
                .into_response();
        }
    }
    match profile {
        Profile::AdobeSign => {
            let body = if rejection == AccessRejection::Missing {
                json!({"code": "NO_ACCESS_TOKEN_HEADER", "message": "Access token header not set"})
            } else {
                json!({"code": "INVALID_ACCESS_TOKEN", "message": "Access token provided is invalid or has expired"})
            };
            (unauthorized, axum::Json(body)).into_response()
        }
        Profile::Salesforce => (
            unauthorized,
            axum::Json(json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])),
        )
            .into_response(),
        Profile::Box => {
            let challenge = if rejection == AccessRejection::Missing {
                "Bearer realm=\"Service\""
            } else {
                "Bearer realm=\"Service\", error=\"invalid_token\", error_description=\"The access token provided is invalid.\""
            };
            (
                unauthorized,
                [(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge))],
            )
                .into_response()
        }
        Profile::Microsoft => {
            let message = match rejection {
                AccessRejection::Missing => "Access token is empty.",
                AccessRejection::Unknown => "CompactToken parsing failed with error code: 80049217",
                AccessRejection::Expired
                | AccessRejection::Revoked
                | AccessRejection::NotYetActive => {
                    "Access token has expired or is not yet valid."
                }
            };
            let date = rfc3339(now);
            let request_id = uuid_like();
            (
                unauthorized,
                axum::Json(json!({"error": {
                    "code": "InvalidAuthenticationToken",
                    "message": message,
                    "innerError": {"date": date, "request-id": request_id, "client-request-id": request_id},
                }})),
            )
                .into_response()
        }
        Profile::Generic => {
            let description = rejection.description();
            let challenge = if rejection == AccessRejection::Missing {
                "Bearer realm=\"tokenwarden-sandbox\"".to_string()
            } else {
                format!("Bearer realm=\"tokenwarden-sandbox\", error=\"invalid_token\", error_description=\"{description}\"")
            };
            let mut response = (
                unauthorized,
                axum::Json(json!({"error": "invalid_token", "error_description": description})),
            )
                .into_response();
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
            }
            response
        }
    }
}
