//! For the proxy: whether a provider's API answer means "the access token was rejected", and
//! the provider's words for users, formatted as the platform's articles show them:
//! `code - INVALID_ACCESS_TOKEN, message - Access token provided is invalid or has expired`.

use serde_json::{Map, Value};

use super::response::{ParsedBody, parse_body};
use super::text::{MAX_ECHO_CHARS, cut, html_title, looks_like_html, reason_phrase, trim_body};
use crate::catalog::RejectionSpec;

/// Whether an API answer means "the access token was rejected" per the connector's
/// [`RejectionSpec`]: a status in `statuses`; or a non-2xx body containing one of
/// `bodyMarkers`; or a 2xx JSON `{"ok": false, "error": X}` with X in `okFalseErrors`.
/// Returns the provider's message for users (see [`describe_provider_body`]).
pub fn api_rejection(
    spec: &RejectionSpec,
    status: u16,
    www_authenticate: Option<&str>,
    body: &[u8],
) -> Option<String> {
    let success = (200..300).contains(&status);
    let rejected = spec.statuses.contains(&status)
        || (!success
            && spec
                .body_markers
                .iter()
                .filter(|marker| !marker.is_empty())
                .any(|marker| contains(body, marker.as_bytes())))
        || (success && !spec.ok_false_errors.is_empty() && slack_rejection(spec, body));
    rejected.then(|| describe_provider_body(status, www_authenticate, body))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn slack_rejection(spec: &RejectionSpec, body: &[u8]) -> bool {
    let ParsedBody::Object(object) = parse_body(Some("application/json"), body) else {
        return false;
    };
    object.get("ok") == Some(&Value::Bool(false))
        && matches!(object.get("error"), Some(Value::String(error))
            if spec.ok_false_errors.iter().any(|known| known == error))
}

/// Fields shown from an error object, in this order, as `name - value`.
const SHOWN_FIELDS: &[&str] = &[
    "code",
    "errorCode",
    "error_code",
    "error",
    "error_summary",
    "status",
    "Status",
    "title",
    "Title",
    "message",
    "Message",
    "error_description",
    "errorMessage",
    "error_message",
    "detail",
    "Detail",
    "reason",
    "category",
    "serviceErrorCode",
    "errors",
];

/// The provider's error for users, from any error answer:
/// - JSON objects show their well-known fields as `name - value, …` (Adobe `code`/`message`,
///   HubSpot `status`/`message`/`category`, Slack `error`); a nested `error` object (Microsoft
///   Graph, Google, Spotify), `fault.error[0]` (QuickBooks), `errors[0]` (Asana) or the first
///   element of an array (Salesforce) is described instead;
/// - an empty body shows the `WWW-Authenticate` header's `error` and `error_description` (Box);
/// - an HTML page shows its title; any other body a short excerpt;
/// - nothing at all: the status and its reason phrase.
///
/// At most about 300 characters.
pub fn describe_provider_body(status: u16, www_authenticate: Option<&str>, body: &[u8]) -> String {
    let trimmed = trim_body(body);
    let described = match parse_body(Some("application/json"), trimmed) {
        ParsedBody::Object(object) => describe_object(&object, 0),
        ParsedBody::NotAnObject(_) => match serde_json::from_slice::<Value>(trimmed) {
            Ok(Value::Array(items)) => items.first().and_then(|item| describe_value(item, 0)),
            _ => None,
        },
        ParsedBody::Empty => None,
        ParsedBody::Unreadable => None,
    };
    let described = described
        .or_else(|| www_authenticate.and_then(describe_www_authenticate))
        .or_else(|| {
            if trimmed.is_empty() {
                None
            } else if looks_like_html(trimmed) {
                html_title(trimmed)
            } else {
                Some(cut(&String::from_utf8_lossy(trimmed), MAX_ECHO_CHARS))
            }
        })
        .filter(|text| !text.is_empty());
    match described {
        Some(text) => cut(&text, MAX_ECHO_CHARS),
        None => format!("HTTP {status} {}", reason_phrase(status))
            .trim()
            .to_string(),
    }
}

fn describe_value(value: &Value, depth: usize) -> Option<String> {
    match value {
        Value::Object(object) => describe_object(object, depth),
        Value::String(text) if !text.trim().is_empty() => Some(cut(text, MAX_ECHO_CHARS)),
        _ => None,
    }
}

fn describe_object(object: &Map<String, Value>, depth: usize) -> Option<String> {
    if depth > 3 {
        return None;
    }
    // Wrappers whose content is the error.
    if let Some(Value::Object(inner)) = object.get("error")
        && let Some(text) = describe_object(inner, depth + 1)
    {
        return Some(match object.get("error_summary").and_then(scalar) {
            // Dropbox: the summary says more than the `.tag` object.
            Some(summary) => format!("error_summary - {summary}"),
            None => text,
        });
    }
    if let Some(Value::Object(fault)) = object.get("fault")
        && let Some(Value::Array(errors)) = fault.get("error")
        && let Some(text) = errors
            .first()
            .and_then(|first| describe_value(first, depth + 1))
    {
        return Some(text);
    }
    let mut parts: Vec<String> = SHOWN_FIELDS
        .iter()
        .filter_map(|name| Some(format!("{name} - {}", scalar(object.get(*name)?)?)))
        .collect();
    if parts.is_empty()
        && let Some(Value::Array(errors)) = object.get("errors")
        && let Some(text) = errors
            .first()
            .and_then(|first| describe_value(first, depth + 1))
    {
        return Some(text);
    }
    if parts.is_empty() {
        // Dropbox-style `.tag` objects.
        if let Some(tag) = object.get(".tag").and_then(scalar) {
            parts.push(format!("error - {tag}"));
        }
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if !text.trim().is_empty() => Some(cut(text, MAX_ECHO_CHARS)),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// `Bearer realm="Service", error="invalid_token", error_description="…"` →
/// `error - invalid_token, error_description - …`.
fn describe_www_authenticate(header: &str) -> Option<String> {
    let parts: Vec<String> = ["error", "error_description"]
        .iter()
        .filter_map(|name| {
            auth_param(header, name)
                .map(|value| format!("{name} - {}", cut(&value, MAX_ECHO_CHARS)))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// The value of an auth-param (RFC 9110 §11.2), quoted or not.
fn auth_param(header: &str, name: &str) -> Option<String> {
    let bytes = header.as_bytes();
    let mut search_from = 0;
    while let Some(found) = header[search_from..].find(name) {
        let start = search_from + found;
        search_from = start + name.len();
        let before_ok = start == 0 || matches!(bytes[start - 1], b' ' | b',' | b'\t');
        let rest = header[start + name.len()..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let value = rest[1..].trim_start();
        if let Some(quoted) = value.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.extend(chars.next()),
                    '"' => return Some(out),
                    other => out.push(other),
                }
            }
            return Some(out);
        }
        let end = value.find([',', ' ']).unwrap_or(value.len());
        return Some(value[..end].to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facebook_errors_other_than_a_dead_token_are_not_rejections() {
        let catalog = crate::catalog::load_built_in().unwrap();
        let facebook = catalog.iter().find(|c| c.key == "facebook").unwrap();
        let bad_field = br#"{"error":{"message":"(#100) Tried accessing nonexisting field","type":"OAuthException","code":100}}"#;
        let limited = br#"{"error":{"message":"(#4) Application request limit reached","type":"OAuthException","is_transient":true,"code":4}}"#;
        let dead = br#"{"error":{"message":"Error validating access token: Session has expired","type":"OAuthException","code":190,"error_subcode":463}}"#;
        assert_eq!(
            api_rejection(&facebook.rejection, 400, None, bad_field),
            None
        );
        assert_eq!(api_rejection(&facebook.rejection, 403, None, limited), None);
        assert!(api_rejection(&facebook.rejection, 400, None, dead).is_some());
    }

    fn spec(markers: &[&str], ok_false: &[&str]) -> RejectionSpec {
        RejectionSpec {
            statuses: vec![401],
            body_markers: markers.iter().map(|m| m.to_string()).collect(),
            ok_false_errors: ok_false.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn adobe_exact_contract_format() {
        let body = br#"{"code":"INVALID_ACCESS_TOKEN","message":"Access token provided is invalid or has expired"}"#;
        assert_eq!(
            api_rejection(&spec(&["INVALID_ACCESS_TOKEN"], &[]), 401, None, body).as_deref(),
            Some(
                "code - INVALID_ACCESS_TOKEN, message - Access token provided is invalid or has expired"
            )
        );
        // The marker also catches another status.
        assert!(api_rejection(&spec(&["INVALID_ACCESS_TOKEN"], &[]), 400, None, body).is_some());
        assert!(api_rejection(&spec(&[], &[]), 400, None, body).is_none());
    }

    #[test]
    fn salesforce_array() {
        let body =
            br#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#;
        assert_eq!(
            api_rejection(&spec(&["INVALID_SESSION_ID"], &[]), 401, None, body).as_deref(),
            Some("errorCode - INVALID_SESSION_ID, message - Session expired or invalid")
        );
        // A marker in a 2xx body is data, not a rejection.
        assert!(api_rejection(&spec(&["INVALID_SESSION_ID"], &[]), 200, None, body).is_none());
    }

    #[test]
    fn box_empty_body_with_www_authenticate() {
        let header = r#"Bearer realm="Service", error="invalid_token", error_description="The access token provided is invalid.""#;
        assert_eq!(
            api_rejection(&spec(&[], &[]), 401, Some(header), b"").as_deref(),
            Some(
                "error - invalid_token, error_description - The access token provided is invalid."
            )
        );
        assert_eq!(
            describe_provider_body(401, Some("Bearer error=invalid_token"), b""),
            "error - invalid_token"
        );
        assert_eq!(
            describe_provider_body(401, None, b""),
            "HTTP 401 Unauthorized"
        );
    }

    #[test]
    fn graph_google_spotify_nested_error() {
        let graph = br#"{"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or is not yet valid.","innerError":{"date":"2024-01-01"}}}"#;
        assert_eq!(
            api_rejection(&spec(&[], &[]), 401, None, graph).as_deref(),
            Some(
                "code - InvalidAuthenticationToken, message - Access token has expired or is not yet valid."
            )
        );
        let google = br#"{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}"#;
        assert_eq!(
            describe_provider_body(401, None, google),
            "code - 401, status - UNAUTHENTICATED, message - Request had invalid authentication credentials."
        );
        let spotify = br#"{"error":{"status":401,"message":"The access token expired"}}"#;
        assert_eq!(
            describe_provider_body(401, None, spotify),
            "status - 401, message - The access token expired"
        );
    }

    #[test]
    fn slack_ok_false_with_200() {
        let spec = spec(&[], &["invalid_auth", "token_expired", "token_revoked"]);
        assert_eq!(
            api_rejection(&spec, 200, None, br#"{"ok":false,"error":"token_expired"}"#).as_deref(),
            Some("error - token_expired")
        );
        assert!(
            api_rejection(
                &spec,
                200,
                None,
                br#"{"ok":false,"error":"channel_not_found"}"#
            )
            .is_none()
        );
        assert!(api_rejection(&spec, 200, None, br#"{"ok":true}"#).is_none());
        assert!(api_rejection(&spec, 200, None, b"not json").is_none());
    }

    #[test]
    fn other_shapes() {
        let cases: &[(&[u8], &str)] = &[
            (
                br#"{"status":"error","message":"The OAuth token used to make this call expired 5 second(s) ago.","category":"EXPIRED_AUTHENTICATION","correlationId":"x"}"#,
                "status - error, message - The OAuth token used to make this call expired 5 second(s) ago., category - EXPIRED_AUTHENTICATION",
            ),
            (
                br#"{"fault":{"error":[{"message":"message=AuthenticationFailed; errorCode=003200; statusCode=401","detail":"Token expired: AB","code":"3200"}],"type":"AUTHENTICATION"}}"#,
                "code - 3200, message - message=AuthenticationFailed; errorCode=003200; statusCode=401, detail - Token expired: AB",
            ),
            (
                br#"{"error_summary":"expired_access_token/","error":{".tag":"expired_access_token"}}"#,
                "error_summary - expired_access_token/",
            ),
            (br#"{"errors":[{"message":"Not Authorized"}]}"#, "message - Not Authorized"),
            (
                br#"{"errors":"[API] Invalid API key or access token (unrecognized login or wrong password)"}"#,
                "errors - [API] Invalid API key or access token (unrecognized login or wrong password)",
            ),
            (br#"{"code":124,"message":"Access token is expired."}"#, "code - 124, message - Access token is expired."),
            (
                br#"{"Type":null,"Title":"Unauthorized","Status":401,"Detail":"TokenExpired: token expired at 01/01/2024"}"#,
                "Status - 401, Title - Unauthorized, Detail - TokenExpired: token expired at 01/01/2024",
            ),
            (br#"{"message":"Bad credentials","documentation_url":"https://docs.github.com"}"#, "message - Bad credentials"),
            (
                br#"{"serviceErrorCode":65601,"code":"REVOKED_ACCESS_TOKEN","status":401,"message":"The token used in the request has been revoked by the user"}"#,
                "code - REVOKED_ACCESS_TOKEN, status - 401, message - The token used in the request has been revoked by the user, serviceErrorCode - 65601",
            ),
            (br#"{"errorCode":"USER_AUTHENTICATION_FAILED","message":"Invalid access token"}"#, "errorCode - USER_AUTHENTICATION_FAILED, message - Invalid access token"),
            (b"<html><head><title>401 Authorization Required</title></head></html>", "401 Authorization Required"),
            (b"  plain\n text  ", "plain text"),
            (br#"{"unknown":"shape"}"#, "{\"unknown\":\"shape\"}"),
        ];
        for (body, expected) in cases {
            assert_eq!(describe_provider_body(401, None, body), *expected);
        }
    }

    #[test]
    fn excerpts_are_short() {
        let long = "x".repeat(5000);
        assert!(
            describe_provider_body(500, None, long.as_bytes())
                .chars()
                .count()
                <= 301
        );
        let long_json = format!(r#"{{"code":"A","message":"{long}"}}"#);
        assert!(
            describe_provider_body(401, None, long_json.as_bytes())
                .chars()
                .count()
                <= 301
        );
    }

    #[test]
    fn status_list_is_the_spec() {
        let mut spec = spec(&[], &[]);
        assert!(api_rejection(&spec, 403, None, b"{}").is_none());
        spec.statuses.push(403);
        assert_eq!(
            api_rejection(&spec, 403, None, b"").as_deref(),
            Some("HTTP 403 Forbidden")
        );
    }
}
