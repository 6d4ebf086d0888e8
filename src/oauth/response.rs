//! Tolerant reading of token-endpoint answers, and their classification into [`TokenSet`] or
//! an [`OAuthError`] class.
//!
//! Accepted: JSON or `application/x-www-form-urlencoded` bodies (GitHub answers form unless
//! asked for JSON), a UTF-8 byte-order mark and surrounding whitespace, `expires_in` as a
//! number, a float, a string or absent, a missing `token_type`, `scope` as a string or a list,
//! errors in 2xx answers (GitHub, Slack `ok:false`), and non-RFC error shapes (HubSpot `status`,
//! Zoom `reason`, Microsoft `error_codes`). Extra fields are kept.

use serde_json::{Map, Value};

use super::error::{OAuthError, is_permanent_error_code};
use super::text::{MAX_ECHO_CHARS, cut, describe_unechoed_body, trim_body};
use crate::catalog::OAuthSpec;
use crate::secret::Secret;

/// A parsed token response.
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: Secret,
    /// `None` when the response has none (keep the old one: Salesforce, Spotify, Microsoft…).
    pub refresh_token: Option<Secret>,
    pub token_type: Option<String>,
    /// Seconds; `None` when absent or unreadable (Salesforce sends none).
    pub expires_in: Option<u64>,
    /// `refresh_token_expires_in`, or QuickBooks' `x_refresh_token_expires_in`.
    pub refresh_token_expires_in: Option<u64>,
    /// As granted (a list is joined with spaces).
    pub scope: Option<String>,
    /// The whole response as a JSON object string (form bodies become an object of strings),
    /// for encrypted storage, as elastic.io's updateKeys keeps it.
    pub raw: Secret,
    /// The non-secret fields only: everything but `access_token`, `refresh_token`, `id_token`
    /// and any field whose name contains `token`, `secret`, `password` or `credential`, at any
    /// depth (Slack nests a user token in `authed_user`). For `instance_url`,
    /// `api_access_point`, `realmId`, `hub_id`…
    pub fields: Map<String, Value>,
}

/// What a body turned out to be.
pub(crate) enum ParsedBody {
    Object(Map<String, Value>),
    /// Valid JSON, but an array or a scalar.
    NotAnObject(&'static str),
    Empty,
    Unreadable,
}

/// Reads a body as a JSON object or a form, tolerating a BOM and whitespace.
pub(crate) fn parse_body(content_type: Option<&str>, body: &[u8]) -> ParsedBody {
    let trimmed = trim_body(body);
    if trimmed.is_empty() {
        return ParsedBody::Empty;
    }
    let content_type = content_type.unwrap_or("").to_ascii_lowercase();
    if trimmed.starts_with(b"{") || trimmed.starts_with(b"[") || content_type.contains("json") {
        // A body in another encoding than UTF-8 (Latin-1 from an in-house server's localised
        // description) is read with its odd characters replaced, so that its error is seen.
        let read = serde_json::from_slice::<Value>(trimmed).or_else(|error| {
            match std::str::from_utf8(trimmed) {
                Ok(_) => Err(error),
                Err(_) => serde_json::from_str::<Value>(&String::from_utf8_lossy(trimmed)),
            }
        });
        return match read {
            Ok(Value::Object(object)) => ParsedBody::Object(object),
            Ok(Value::Array(_)) => ParsedBody::NotAnObject("a JSON array"),
            Ok(_) => ParsedBody::NotAnObject("a JSON scalar"),
            Err(_) => ParsedBody::Unreadable,
        };
    }
    if content_type.contains("x-www-form-urlencoded") || looks_like_form(trimmed) {
        let object: Map<String, Value> = url::form_urlencoded::parse(trimmed)
            .filter(|(name, _)| !name.is_empty())
            .map(|(name, value)| (name.into_owned(), Value::String(value.into_owned())))
            .collect();
        if !object.is_empty() {
            return ParsedBody::Object(object);
        }
    }
    ParsedBody::Unreadable
}

/// A form body has `name=value` pairs and no spaces or markup (spaces are encoded as `+`).
fn looks_like_form(body: &[u8]) -> bool {
    body.contains(&b'=')
        && !body.starts_with(b"<")
        && body
            .iter()
            .all(|b| b.is_ascii_graphic() && *b != b'<' && *b != b'>' && *b != b'"')
}

/// Parses a token endpoint's answer: a [`TokenSet`], or the [`OAuthError`] class of the
/// failure (see the module [`error`](super::error) for the rules). `Retry-After` is not seen
/// here: the client adds it to `RateLimited`.
pub fn parse_token_response(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    spec: &OAuthSpec,
) -> Result<TokenSet, OAuthError> {
    let parsed = parse_body(content_type, body);
    if (200..300).contains(&status)
        && let ParsedBody::Object(object) = &parsed
        && object.get("ok") != Some(&Value::Bool(false))
    {
        // A body in another encoding than UTF-8 is read with its odd characters replaced:
        // fine in a name, but a token holding one would work nowhere (nor one whose form
        // encoding decoded to no character).
        if let Some(key) = ["access_token", "refresh_token"].into_iter().find(|key| {
            object
                .get(*key)
                .and_then(Value::as_str)
                .is_some_and(|token| token.contains(char::REPLACEMENT_CHARACTER))
        }) {
            return Err(OAuthError::Unparseable {
                status,
                message: format!("the {key} holds bytes that are not UTF-8 text"),
                rotated: rotated_refresh_token(object),
            });
        }
        if let Some(access_token) = usable_access_token(object) {
            return Ok(token_set(object.clone(), access_token));
        }
        if let Some(unwrapped) = unwrapped(object) {
            let access_token = usable_access_token(&unwrapped).unwrap_or_default();
            return Ok(token_set(unwrapped, access_token));
        }
        // No usable access token, and no error: a refresh token it carries is kept all the
        // same (see `OAuthError::Unparseable`).
        if object.get("error").is_none()
            && let OAuthError::Unparseable {
                status, message, ..
            } = classify_failure(status, content_type, body, &parsed, &spec.permanent_errors)
        {
            return Err(OAuthError::Unparseable {
                status,
                message,
                rotated: rotated_refresh_token(object),
            });
        }
    }
    Err(classify_failure(
        status,
        content_type,
        body,
        &parsed,
        &spec.permanent_errors,
    ))
}

/// The `access_token` of a response object, when it is one a header can carry.
fn usable_access_token(object: &Map<String, Value>) -> Option<String> {
    match object.get("access_token") {
        Some(Value::String(token))
            if !token.trim().is_empty()
                && !has_control_characters(token.trim())
                && !token.contains(char::REPLACEMENT_CHARACTER) =>
        {
            Some(token.trim().to_string())
        }
        _ => None,
    }
}

/// The refresh token of a 2xx answer whose access token is unusable, when it is one that can
/// be presented again (text without control characters or undecodable bytes).
fn rotated_refresh_token(object: &Map<String, Value>) -> Option<Secret> {
    match object.get("refresh_token") {
        Some(Value::String(token))
            if !token.trim().is_empty()
                && !has_control_characters(token.trim())
                && !token.contains(char::REPLACEMENT_CHARACTER) =>
        {
            Some(Secret::new(token.trim()))
        }
        _ => None,
    }
}

/// Fields some providers wrap their token response in, when it has none at its top:
/// Withings' `body` (`{"status": 0, "body": {"access_token": …}}`) and Slack's `authed_user`
/// (an install that asked for user scopes only).
const TOKEN_ENVELOPES: &[&str] = &["body", "authed_user"];

/// A response whose tokens sit in one of [`TOKEN_ENVELOPES`], read as one object: the
/// envelope's fields over the top level's (Withings' `status`, Slack's `team`), the envelope
/// itself left out. `None` when no envelope holds a usable access token, or more than one.
fn unwrapped(object: &Map<String, Value>) -> Option<Map<String, Value>> {
    let mut found = TOKEN_ENVELOPES
        .iter()
        .filter_map(|name| match object.get(*name) {
            Some(Value::Object(inner)) if usable_access_token(inner).is_some() => {
                Some((*name, inner))
            }
            _ => None,
        });
    let (name, inner) = found.next()?;
    if found.next().is_some() {
        return None;
    }
    // Withings says a failure with a non-zero `status` (in an HTTP 200).
    if object
        .get("status")
        .and_then(Value::as_i64)
        .is_some_and(|status| status != 0)
    {
        return None;
    }
    let mut merged: Map<String, Value> = object
        .iter()
        .filter(|(key, _)| key.as_str() != name)
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    for (key, value) in inner {
        merged.insert(key.clone(), value.clone());
    }
    Some(merged)
}

/// Whether a token holds a character no HTTP header can carry (a control character other than
/// a tab): as `Authorization: Bearer …` it could never be sent, so the instance would answer
/// every call with an error and never learn that its token was unusable (RFC 6750's token is
/// printable ASCII).
pub fn has_control_characters(token: &str) -> bool {
    token.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

/// The error class of an answer that is not a success: by status first (429, 5xx), then by the
/// OAuth error found in the body.
pub(crate) fn classify_failure(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    parsed: &ParsedBody,
    connector_permanent_errors: &[String],
) -> OAuthError {
    let found = match parsed {
        ParsedBody::Object(object) => find_oauth_error(object, connector_permanent_errors),
        _ => None,
    };
    let found_text = found
        .as_ref()
        .map(|f| match &f.description {
            Some(description) => format!("{}: {description}", f.error),
            None => f.error.clone(),
        })
        .unwrap_or_default();

    if status == 429 {
        return OAuthError::RateLimited {
            retry_after: None,
            message: cut(&found_text, MAX_ECHO_CHARS),
        };
    }
    if status >= 500 {
        let note = if found_text.is_empty() {
            describe_unechoed_body(content_type, body)
        } else {
            found_text
        };
        return OAuthError::unavailable(status, note);
    }
    if let Some(found) = found {
        return OAuthError::Provider {
            status,
            permanent: found.permanent,
            error: found.error,
            description: found.description,
        };
    }
    if (200..300).contains(&status) {
        let message = match parsed {
            ParsedBody::Object(object)
                if object
                    .get("access_token")
                    .and_then(Value::as_str)
                    .is_some_and(|token| has_control_characters(token.trim())) =>
            {
                "the access_token holds a control character, which no HTTP header can carry"
                    .to_string()
            }
            ParsedBody::Object(_) => "no access_token in the response".to_string(),
            ParsedBody::NotAnObject(kind) => format!("the body is {kind}"),
            ParsedBody::Empty => "the body is empty".to_string(),
            ParsedBody::Unreadable => format!(
                "{} that is neither JSON nor a form",
                describe_unechoed_body(content_type, body)
            ),
        };
        return OAuthError::Unparseable {
            status,
            message,
            rotated: None,
        };
    }
    let note = if (300..400).contains(&status) {
        "a redirect, which is not followed on OAuth endpoints: check the endpoint URL".to_string()
    } else {
        format!(
            "{} without an OAuth error",
            describe_unechoed_body(content_type, body)
        )
    };
    OAuthError::unavailable(status, note)
}

pub(crate) struct FoundError {
    pub(crate) error: String,
    pub(crate) description: Option<String>,
    pub(crate) permanent: bool,
}

/// Finds an OAuth error in a body: `error` (a string, or Graph-style `{code, message}`), else
/// HubSpot's `status` code, else `errorCode` or `code`. When several codes are present, a
/// permanent one wins (HubSpot may send `"error":"invalid_request"` next to
/// `"status":"BAD_REFRESH_TOKEN"`).
pub(crate) fn find_oauth_error(
    object: &Map<String, Value>,
    connector_permanent_errors: &[String],
) -> Option<FoundError> {
    let mut codes: Vec<String> = Vec::new();
    let mut description = None;
    match object.get("error") {
        Some(Value::String(code)) => codes.push(code.clone()),
        Some(Value::Object(inner)) => {
            if let Some(code) = inner
                .get("code")
                .or_else(|| inner.get(".tag"))
                .and_then(scalar_text)
            {
                codes.push(code);
            }
            description = inner.get("message").and_then(scalar_text);
        }
        _ => {}
    }
    // A list of errors (Fitbit's `errorType`; Strava's `code` for a `resource`, given as
    // `RefreshToken:invalid` so that a connector can tell which thing was refused). Its
    // message describes it when the top level has no description.
    let mut listed_message = None;
    let listed = match object.get("errors") {
        Some(Value::Array(errors)) => errors.first().and_then(Value::as_object),
        _ => None,
    };
    if let Some(first) = listed {
        if let Some(code) = first
            .get("errorType")
            .or_else(|| first.get("error"))
            .and_then(scalar_text)
        {
            codes.push(code);
        }
        if let Some(code) = first.get("code").and_then(scalar_text) {
            match first.get("resource").and_then(scalar_text) {
                Some(resource) => codes.push(format!("{resource}:{code}")),
                None => codes.push(code),
            }
        }
        listed_message = first.get("message").and_then(scalar_text);
    }
    if let Some(Value::String(status)) = object.get("status")
        && !status.trim().is_empty()
        && !status.trim().bytes().all(|b| b.is_ascii_digit())
        && !["success", "ok", "error", "failure", "failed"]
            .iter()
            .any(|generic| generic.eq_ignore_ascii_case(status.trim()))
        && !object.contains_key("access_token")
    {
        codes.push(status.clone());
    }
    for name in ["errorCode", "error_code", "code"] {
        if let Some(Value::String(code)) = object.get(name) {
            codes.push(code.clone());
        }
    }
    if codes.is_empty() && object.get("ok") == Some(&Value::Bool(false)) {
        codes.push("ok_false".to_string());
    }
    let codes: Vec<String> = codes
        .into_iter()
        .map(|code| cut(&code, 100))
        .filter(|code| !code.is_empty())
        .collect();
    let chosen = codes
        .iter()
        .find(|code| is_permanent_error_code(code, connector_permanent_errors))
        .or_else(|| codes.first())?
        .clone();

    let description = description.or_else(|| {
        [
            "error_description",
            "message",
            "reason",
            "error_message",
            "errorMessage",
            "detail",
        ]
        .iter()
        .find_map(|name| object.get(*name).and_then(scalar_text))
        .filter(|found| !found.trim().is_empty())
        .or(listed_message)
    });
    let mut description = description.filter(|d| !d.trim().is_empty());
    if let Some(Value::String(subtype)) = object.get("error_subtype") {
        let note = format!("error_subtype {subtype}");
        description = Some(match description {
            Some(d) => format!("{d} ({note})"),
            None => note,
        });
    }
    // A connector's `"code: description"` entry names a code that means a dead grant only
    // with those words (X's invalid_request "Value passed for the token was invalid").
    let described = description
        .as_deref()
        .map(|description| format!("{chosen}: {description}").to_lowercase());
    let described_permanent = |entry: &String| {
        entry.contains(": ")
            && described
                .as_deref()
                .is_some_and(|text| text.starts_with(entry.trim().to_lowercase().as_str()))
    };
    let described_passing = described.as_deref().is_some_and(|text| {
        crate::oauth::error::NOT_PERMANENT_DESCRIBED
            .iter()
            .any(|entry| text.starts_with(entry))
    });
    Some(FoundError {
        permanent: !described_passing
            && (is_permanent_error_code(&chosen, connector_permanent_errors)
                || connector_permanent_errors.iter().any(described_permanent)),
        error: chosen,
        description: description.map(|d| cut(&d, MAX_ECHO_CHARS)),
    })
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn token_set(object: Map<String, Value>, access_token: String) -> TokenSet {
    let refresh_token = match object.get("refresh_token") {
        Some(Value::String(token)) if !token.trim().is_empty() => {
            Some(Secret::new(token.trim().to_string()))
        }
        _ => None,
    };
    let token_type = object
        .get("token_type")
        .and_then(scalar_text)
        .filter(|t| !t.is_empty());
    let expires_in = object
        .get("expires_in")
        .and_then(seconds)
        .or_else(|| object.get("expires").and_then(seconds));
    let refresh_token_expires_in = object
        .get("refresh_token_expires_in")
        .and_then(seconds)
        .or_else(|| object.get("x_refresh_token_expires_in").and_then(seconds));
    let scope = match object.get("scope") {
        Some(Value::String(scope)) => Some(scope.clone()),
        Some(Value::Array(scopes)) => Some(
            scopes
                .iter()
                .filter_map(scalar_text)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    };
    let fields = non_secret_fields(&object);
    let raw = Secret::new(Value::Object(object).to_string());
    TokenSet {
        access_token: Secret::new(access_token),
        refresh_token,
        token_type,
        expires_in,
        refresh_token_expires_in,
        scope,
        raw,
        fields,
    }
}

/// A number of seconds from a number (floats are cut down), or a string holding one. Zero is
/// no lifetime at all: providers send `expires_in: 0` for a token that does not expire
/// (Mailchimp), and read as "expired now" it made every call refresh first. Nor is a life
/// longer than [`LONGEST_LIFE_SECONDS`]: `i64::MAX` seconds made expiry dates no calendar can
/// show (the instance showed them as empty strings) and a refresh interval of 292 billion
/// years.
fn seconds(value: &Value) -> Option<u64> {
    let number = match value {
        Value::Number(number) => number.as_f64()?,
        Value::String(text) => text.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (number.is_finite() && number >= 1.0 && number <= LONGEST_LIFE_SECONDS as f64)
        .then_some(number as u64)
}

/// A hundred years: a token said to live longer does not expire, for any purpose.
const LONGEST_LIFE_SECONDS: u64 = 100 * 365 * 86_400;

/// Whether a token-response field name may carry a secret (such fields are kept sealed in the
/// whole response only, never in the instance's configuration).
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    // Lifetimes of tokens are no secrets (QuickBooks' `x_refresh_token_expires_in`).
    if lower.ends_with("_expires_in") || lower.ends_with("_expires_at") {
        return false;
    }
    ["token", "secret", "password", "credential"]
        .iter()
        .any(|word| lower.contains(word))
}

/// The fields kept in the instance's configuration. PostgreSQL's `jsonb` refuses the NUL
/// character, so a provider's stray one is taken out (a name holding one is left out): kept,
/// it would fail every commit of the instance's tokens, after the provider rotated them.
fn non_secret_fields(object: &Map<String, Value>) -> Map<String, Value> {
    object
        .iter()
        .filter(|(name, _)| !is_secret_name(name) && !name.contains('\0'))
        .map(|(name, value)| (name.clone(), without_secrets(value)))
        .collect()
}

fn without_secrets(value: &Value) -> Value {
    match value {
        Value::Object(object) => Value::Object(non_secret_fields(object)),
        Value::Array(items) => Value::Array(items.iter().map(without_secrets).collect()),
        Value::String(text) if text.contains('\0') => Value::String(text.replace('\0', "")),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::test_support::spec;
    use super::*;

    fn parse(status: u16, ct: Option<&str>, body: &str) -> Result<TokenSet, OAuthError> {
        parse_token_response(status, ct, body.as_bytes(), &spec())
    }

    const JSON: Option<&str> = Some("application/json");

    fn provider(error: OAuthError) -> (u16, String, Option<String>, bool) {
        match error {
            OAuthError::Provider {
                status,
                error,
                description,
                permanent,
            } => (status, error, description, permanent),
            other => panic!("expected a provider error, got {other:?}"),
        }
    }

    #[test]
    fn errors_listed_in_an_array_are_read() {
        // Fitbit: the refresh token is dead.
        let (status, error, description, permanent) = provider(
            parse(
                400,
                JSON,
                r#"{"errors":[{"errorType":"invalid_grant","message":"Refresh token invalid: abc. Visit https://dev.fitbit.com/docs/oauth2 for more information on the Fitbit Web API authorization process."}],"success":false}"#,
            )
            .unwrap_err(),
        );
        assert_eq!(
            (status, error.as_str(), permanent),
            (400, "invalid_grant", true)
        );
        assert!(description.unwrap().starts_with("Refresh token invalid"));
        // Strava: the thing refused is named; the connector says which one is the grant.
        let strava = |body: &str| {
            let mut spec = spec();
            spec.permanent_errors = vec!["RefreshToken:invalid".to_string()];
            parse_token_response(400, JSON, body.as_bytes(), &spec).unwrap_err()
        };
        let (_, error, _, permanent) = provider(strava(
            r#"{"message":"Bad Request","errors":[{"resource":"RefreshToken","field":"refresh_token","code":"invalid"}]}"#,
        ));
        assert_eq!((error.as_str(), permanent), ("RefreshToken:invalid", true));
        let refused = strava(
            r#"{"message":"Bad Request","errors":[{"resource":"Application","field":"client_id","code":"invalid"}]}"#,
        );
        assert!(
            refused.is_client_rejected() && !refused.is_permanent(),
            "{refused:?}"
        );
    }

    #[test]
    fn tokens_in_an_envelope_are_read() {
        // Withings.
        let tokens = parse(
            200,
            JSON,
            r#"{"status":0,"body":{"userid":"363","access_token":"a","refresh_token":"r","expires_in":10800,"scope":"user.info","token_type":"Bearer"}}"#,
        )
        .unwrap();
        assert_eq!(tokens.access_token.expose(), "a");
        assert_eq!(tokens.refresh_token.unwrap().expose(), "r");
        assert_eq!(tokens.expires_in, Some(10_800));
        assert_eq!(tokens.fields["userid"], "363");
        assert_eq!(tokens.fields["status"], 0);
        assert!(!tokens.fields.contains_key("body"));
        // Withings' failure: a non-zero status, in a 200.
        assert!(parse(200, JSON, r#"{"status":601,"body":{"access_token":"a"}}"#).is_err());
        // Slack, an install with user scopes only.
        let tokens = parse(
            200,
            JSON,
            r#"{"ok":true,"app_id":"A1","authed_user":{"id":"U1","scope":"users:read","access_token":"xoxp-1","token_type":"user","refresh_token":"xoxe-1","expires_in":43200},"team":{"id":"T1"}}"#,
        )
        .unwrap();
        assert_eq!(tokens.access_token.expose(), "xoxp-1");
        assert_eq!(tokens.refresh_token.unwrap().expose(), "xoxe-1");
        assert_eq!(tokens.fields["team"], json!({"id": "T1"}));
        // A token at the top wins (Slack's bot token beside the user's).
        let tokens = parse(
            200,
            JSON,
            r#"{"ok":true,"access_token":"xoxb-1","authed_user":{"access_token":"xoxp-1"}}"#,
        )
        .unwrap();
        assert_eq!(tokens.access_token.expose(), "xoxb-1");
        // Two envelopes with a token: which one is meant is unknown.
        assert!(
            parse(
                200,
                JSON,
                r#"{"body":{"access_token":"a"},"authed_user":{"access_token":"b"}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn an_error_in_latin_1_is_read() {
        let body = b"{\"error\":\"invalid_grant\",\"error_description\":\"jeton p\xe9rim\xe9\"}";
        let error = parse_token_response(400, JSON, body, &spec()).unwrap_err();
        assert!(error.is_permanent(), "{error:?}");
        // Tokens are not: replaced characters would make one that works nowhere. Other fields
        // may be (a name).
        let body = b"{\"access_token\":\"a\xe9b\"}";
        assert!(parse_token_response(200, JSON, body, &spec()).is_err());
        let body = b"{\"access_token\":\"ab\",\"refresh_token\":\"r\xe9\"}";
        assert!(parse_token_response(200, JSON, body, &spec()).is_err());
        let body = b"{\"access_token\":\"ab\",\"name\":\"Jos\xe9\"}";
        let tokens = parse_token_response(200, JSON, body, &spec()).unwrap();
        assert_eq!(tokens.access_token.expose(), "ab");
    }

    #[test]
    fn a_code_means_a_dead_grant_with_the_words_a_connector_names() {
        let mut spec = spec();
        spec.permanent_errors =
            vec!["invalid_request: Value passed for the token was invalid".to_string()];
        let parse =
            |body: &str| parse_token_response(400, JSON, body.as_bytes(), &spec).unwrap_err();
        let dead = parse(
            r#"{"error":"invalid_request","error_description":"Value passed for the token was invalid."}"#,
        );
        assert!(dead.is_permanent(), "{dead:?}");
        let asked = parse(
            r#"{"error":"invalid_request","error_description":"Missing required parameter [refresh_token]."}"#,
        );
        assert!(
            !asked.is_permanent() && asked.is_request_rejected(),
            "{asked:?}"
        );
    }

    #[test]
    fn a_nul_in_a_field_is_taken_out() {
        let tokens = parse(
            200,
            JSON,
            r#"{"access_token":"at","realmId":"12\u00003","x\u0000y":1,"nested":{"a":["b\u0000"]}}"#,
        )
        .unwrap();
        assert_eq!(tokens.fields["realmId"], "123");
        assert!(!tokens.fields.contains_key("x\0y"));
        assert_eq!(tokens.fields["nested"], json!({"a": ["b"]}));
    }

    #[test]
    fn lifetimes_past_a_hundred_years_are_no_expiry() {
        let tokens = parse(
            200,
            JSON,
            r#"{"access_token":"a","expires_in":9223372036854775807,"refresh_token_expires_in":"1e19"}"#,
        )
        .unwrap();
        assert_eq!(
            (tokens.expires_in, tokens.refresh_token_expires_in),
            (None, None)
        );
        let tokens = parse(200, JSON, r#"{"access_token":"a","expires_in":3153600000}"#).unwrap();
        assert_eq!(tokens.expires_in, Some(3_153_600_000));
    }

    #[test]
    fn an_access_token_no_header_can_carry_is_no_success() {
        let error = parse(200, JSON, r#"{"access_token":"a\nb","refresh_token":"r"}"#).unwrap_err();
        assert!(
            matches!(&error, OAuthError::Unparseable { message, .. } if message.contains("control character")),
            "{error:?}"
        );
        // A tab is allowed in a header value; the ends are trimmed.
        assert!(parse(200, JSON, r#"{"access_token":" a\tb\n"}"#).is_ok());
    }

    #[test]
    fn a_refresh_token_beside_an_unusable_access_token_is_kept() {
        for body in [
            r#"{"access_token":"a\u0001b","refresh_token":" r2 "}"#,
            r#"{"access_token":"","refresh_token":"r2"}"#,
            r#"{"access_token":null,"refresh_token":"r2"}"#,
            r#"{"access_token":42,"refresh_token":"r2"}"#,
            r#"{"refresh_token":"r2","expires_in":3600}"#,
        ] {
            match parse(200, JSON, body).unwrap_err() {
                OAuthError::Unparseable {
                    rotated: Some(rotated),
                    ..
                } => assert_eq!(rotated.expose(), "r2", "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        // One that could not be presented again is not kept; nor is anything of an error.
        for body in [
            r#"{"access_token":"","refresh_token":"r\u0002"}"#,
            r#"{"access_token":"","refresh_token":""}"#,
            r#"{"access_token":"","refresh_token":7}"#,
        ] {
            assert!(
                matches!(
                    parse(200, JSON, body).unwrap_err(),
                    OAuthError::Unparseable { rotated: None, .. }
                ),
                "{body}"
            );
        }
        assert!(!matches!(
            parse(
                200,
                JSON,
                r#"{"error":"invalid_grant","refresh_token":"r2"}"#
            )
            .unwrap_err(),
            OAuthError::Unparseable { .. }
        ));
    }

    #[test]
    fn standard_response() {
        let tokens = parse(
            200,
            JSON,
            r#"{"access_token":"at-1","refresh_token":"rt-1","token_type":"Bearer","expires_in":3600,"scope":"a b","id_token":"jwt","extra":{"k":1}}"#,
        )
        .unwrap();
        assert_eq!(tokens.access_token.expose(), "at-1");
        assert_eq!(tokens.refresh_token.as_ref().unwrap().expose(), "rt-1");
        assert_eq!(tokens.token_type.as_deref(), Some("Bearer"));
        assert_eq!(tokens.expires_in, Some(3600));
        assert_eq!(tokens.scope.as_deref(), Some("a b"));
        assert_eq!(
            Value::Object(tokens.fields.clone()),
            json!({"expires_in":3600,"scope":"a b","extra":{"k":1}})
        );
        let raw: Value = serde_json::from_str(tokens.raw.expose()).unwrap();
        assert_eq!(raw["id_token"], "jwt");
        let debug = format!("{tokens:?}");
        assert!(!debug.contains("at-1") && !debug.contains("rt-1") && !debug.contains("jwt"));
    }

    #[test]
    fn zero_lifetimes_are_no_lifetime_and_lifetimes_are_kept() {
        for zero in ["0", "\"0\"", "0.4"] {
            let tokens = parse(
                200,
                JSON,
                &format!(
                    r#"{{"access_token":"at","expires_in":{zero},"refresh_token_expires_in":0}}"#
                ),
            )
            .unwrap();
            assert_eq!(tokens.expires_in, None, "{zero}");
            assert_eq!(tokens.refresh_token_expires_in, None, "{zero}");
        }
        let tokens = parse(
            200,
            JSON,
            r#"{"access_token":"at","refresh_token":"rt","expires_in":3600,"x_refresh_token_expires_in":8726400,"x_refresh_token_hard_expires_in":157680000}"#,
        )
        .unwrap();
        assert_eq!(tokens.fields["x_refresh_token_expires_in"], 8726400);
        assert_eq!(tokens.fields["x_refresh_token_hard_expires_in"], 157680000);
        assert!(!tokens.fields.contains_key("refresh_token"));
    }

    #[test]
    fn salesforce_without_expires_in_keeps_instance_url() {
        let tokens = parse(
            200,
            JSON,
            r#"{"access_token":"00D!AQ","signature":"sig=","scope":"refresh_token api","instance_url":"https://na1.salesforce.com","id":"https://login.salesforce.com/id/00D/005","token_type":"Bearer","issued_at":"1278448384422"}"#,
        )
        .unwrap();
        assert_eq!(tokens.expires_in, None);
        assert!(tokens.refresh_token.is_none());
        assert_eq!(tokens.fields["instance_url"], "https://na1.salesforce.com");
        assert_eq!(tokens.fields["issued_at"], "1278448384422");
        assert!(!tokens.fields.contains_key("token_type"));
    }

    #[test]
    fn github_form_encoded_success_and_error() {
        let tokens = parse(
            200,
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            "access_token=ghu_abc&expires_in=28800&refresh_token=ghr_def&refresh_token_expires_in=15811200&scope=&token_type=bearer",
        )
        .unwrap();
        assert_eq!(tokens.access_token.expose(), "ghu_abc");
        assert_eq!(tokens.refresh_token.unwrap().expose(), "ghr_def");
        assert_eq!(tokens.expires_in, Some(28800));
        assert_eq!(tokens.refresh_token_expires_in, Some(15_811_200));
        assert_eq!(
            serde_json::from_str::<Value>(tokens.raw.expose()).unwrap()["expires_in"],
            "28800"
        );
        // Without a content type, a form body is still recognised.
        assert!(parse(200, None, "access_token=x&token_type=bearer").is_ok());

        let (status, error, description, permanent) = provider(
            parse(
                200,
                JSON,
                r#"{"error":"bad_refresh_token","error_description":"The refresh token passed is incorrect or expired.","error_uri":"https://docs.github.com"}"#,
            )
            .unwrap_err(),
        );
        assert_eq!(
            (status, error.as_str(), permanent),
            (200, "bad_refresh_token", true)
        );
        assert_eq!(
            description.as_deref(),
            Some("The refresh token passed is incorrect or expired.")
        );
        let error = parse(
            200,
            Some("application/x-www-form-urlencoded"),
            "error=bad_refresh_token&error_description=The+refresh+token+passed+is+incorrect+or+expired.",
        )
        .unwrap_err();
        assert!(error.is_permanent());
        assert_eq!(
            error.provider_message(),
            "bad_refresh_token: The refresh token passed is incorrect or expired."
        );
    }

    #[test]
    fn slack_ok_false_with_200() {
        let error =
            parse(200, JSON, r#"{"ok":false,"error":"invalid_refresh_token"}"#).unwrap_err();
        assert!(error.is_permanent());
        assert_eq!(error.provider_message(), "invalid_refresh_token");
        let error = parse(200, JSON, r#"{"ok":false,"error":"ratelimited"}"#).unwrap_err();
        assert!(matches!(
            error,
            OAuthError::Provider {
                permanent: false,
                ..
            }
        ));
        // A Slack success, with the user token nested: kept in raw, not in fields.
        let tokens = parse(
            200,
            JSON,
            r#"{"ok":true,"access_token":"xoxe.xoxb-1","refresh_token":"xoxe-1-r","expires_in":43200,"team":{"id":"T1"},"authed_user":{"id":"U1","access_token":"xoxp-u","scope":"chat:write"}}"#,
        )
        .unwrap();
        assert_eq!(
            Value::Object(tokens.fields),
            json!({"ok":true,"expires_in":43200,"team":{"id":"T1"},"authed_user":{"id":"U1","scope":"chat:write"}})
        );
        assert!(tokens.raw.expose().contains("xoxp-u"));
    }

    #[test]
    fn atlassian_403_invalid_grant_is_permanent() {
        let (status, error, _, permanent) = provider(
            parse(
                403,
                JSON,
                r#"{"error":"invalid_grant","error_description":"Unknown or invalid refresh token."}"#,
            )
            .unwrap_err(),
        );
        assert_eq!(
            (status, error.as_str(), permanent),
            (403, "invalid_grant", true)
        );
    }

    #[test]
    fn salesforce_and_box_and_dropbox_invalid_grant() {
        for body in [
            r#"{"error":"invalid_grant","error_description":"expired access/refresh token"}"#,
            r#"{"error":"invalid_grant","error_description":"authentication failure"}"#,
            r#"{"error":"invalid_grant","error_description":"Refresh token has expired"}"#,
            r#"{"error":"invalid_grant"}"#,
        ] {
            assert!(parse(400, JSON, body).unwrap_err().is_permanent(), "{body}");
        }
        assert_eq!(
            parse(
                400,
                JSON,
                r#"{"error":"invalid_grant","error_description":"expired access/refresh token"}"#
            )
            .unwrap_err()
            .provider_message(),
            "invalid_grant: expired access/refresh token"
        );
    }

    #[test]
    fn hubspot_bad_refresh_token() {
        let (status, error, description, permanent) = provider(
            parse(
                400,
                JSON,
                r#"{"status":"BAD_REFRESH_TOKEN","message":"missing or invalid refresh token","correlationId":"c-1"}"#,
            )
            .unwrap_err(),
        );
        assert_eq!(
            (status, error.as_str(), permanent),
            (400, "BAD_REFRESH_TOKEN", true)
        );
        assert_eq!(
            description.as_deref(),
            Some("missing or invalid refresh token")
        );
        // With the `"error":"invalid_request"` some public code reports next to it.
        let (_, error, _, permanent) = provider(
            parse(
                400,
                JSON,
                r#"{"status":"BAD_REFRESH_TOKEN","message":"missing or invalid refresh token","error":"invalid_request"}"#,
            )
            .unwrap_err(),
        );
        assert_eq!((error.as_str(), permanent), ("BAD_REFRESH_TOKEN", true));
        // A numeric `status` is not an error code.
        let error = parse(400, JSON, r#"{"status":"400","message":"bad"}"#).unwrap_err();
        assert!(
            matches!(error, OAuthError::Unavailable { status: 400, .. }),
            "{error:?}"
        );
        // HubSpot's success carries extras.
        let tokens = parse(
            200,
            JSON,
            r#"{"token_type":"bearer","refresh_token":"r","access_token":"a","expires_in":1800,"hub_id":42,"user_id":7,"scopes":["crm.objects.contacts.read"],"token_use":"x"}"#,
        )
        .unwrap();
        assert_eq!(tokens.fields["hub_id"], 42);
        assert!(!tokens.fields.contains_key("token_use"));
    }

    #[test]
    fn microsoft_aadsts() {
        let body = r#"{"error":"invalid_grant","error_description":"AADSTS700082: The refresh token has expired due to inactivity. The token was issued on 2024-01-01 and was inactive for 90.00:00:00.\r\nTrace ID: t\r\nCorrelation ID: c\r\nTimestamp: 2024-04-01 00:00:00Z","error_codes":[700082],"timestamp":"2024-04-01 00:00:00Z","trace_id":"t","correlation_id":"c"}"#;
        let error = parse(400, JSON, body).unwrap_err();
        assert!(error.is_permanent());
        assert!(
            error.provider_message().starts_with(
                "invalid_grant: AADSTS700082: The refresh token has expired due to inactivity."
            ),
            "{}",
            error.provider_message()
        );
        assert!(!error.provider_message().contains('\n'));
        let error = parse(
            400,
            JSON,
            r#"{"error":"interaction_required","error_description":"AADSTS50076"}"#,
        )
        .unwrap_err();
        assert!(error.is_permanent());
    }

    #[test]
    fn zoom_reason() {
        let (status, error, description, permanent) = provider(
            parse(
                401,
                JSON,
                r#"{"reason":"Invalid Token!","error":"invalid_grant"}"#,
            )
            .unwrap_err(),
        );
        assert_eq!(
            (status, error.as_str(), permanent),
            (401, "invalid_grant", true)
        );
        assert_eq!(description.as_deref(), Some("Invalid Token!"));
        let error = parse(
            400,
            JSON,
            r#"{"reason":"Invalid Token!","error":"invalid_request"}"#,
        )
        .unwrap_err();
        assert!(!error.is_permanent());
        assert!(matches!(error, OAuthError::Provider { .. }));
        // The catalog's Zoom entry: that `invalid_request` with those words only.
        let mut zoom = spec();
        zoom.permanent_errors = vec!["invalid_request: Invalid Token".into()];
        let read =
            |body: &str| parse_token_response(400, JSON, body.as_bytes(), &zoom).unwrap_err();
        assert!(read(r#"{"reason":"Invalid Token!","error":"invalid_request"}"#).is_permanent());
        assert!(
            !read(r#"{"reason":"Missing parameter","error":"invalid_request"}"#).is_permanent()
        );
    }

    #[test]
    fn google_error_subtype_is_shown() {
        let error = parse(
            400,
            JSON,
            r#"{"error":"invalid_grant","error_description":"reauth related error (invalid_rapt)","error_subtype":"invalid_rapt"}"#,
        )
        .unwrap_err();
        assert!(error.is_permanent());
        assert_eq!(
            error.provider_message(),
            "invalid_grant: reauth related error (invalid_rapt) (error_subtype invalid_rapt)"
        );
    }

    #[test]
    fn connector_permanent_errors_are_used() {
        let mut spec = spec();
        spec.permanent_errors = vec!["app_uninstalled".into()];
        let error = parse_token_response(
            200,
            JSON,
            br#"{"ok":false,"error":"app_uninstalled"}"#,
            &spec,
        )
        .unwrap_err();
        assert!(error.is_permanent());
    }

    #[test]
    fn expires_in_shapes() {
        let with = |value: &str| {
            parse(
                200,
                JSON,
                &format!(r#"{{"access_token":"a","expires_in":{value}}}"#),
            )
            .unwrap()
            .expires_in
        };
        assert_eq!(with("3600"), Some(3600));
        assert_eq!(with("\"3600\""), Some(3600));
        assert_eq!(with("\" 3599 \""), Some(3599));
        assert_eq!(with("3599.7"), Some(3599));
        assert_eq!(with("\"3600.0\""), Some(3600));
        assert_eq!(with("1e3"), Some(1000));
        assert_eq!(with("null"), None);
        assert_eq!(with("-5"), None);
        assert_eq!(with("\"soon\""), None);
        assert_eq!(with("{}"), None);
        assert_eq!(
            parse(200, JSON, r#"{"access_token":"a"}"#)
                .unwrap()
                .expires_in,
            None
        );
    }

    #[test]
    fn quickbooks_x_refresh_token_expires_in() {
        let tokens = parse(
            200,
            JSON,
            r#"{"token_type":"bearer","expires_in":3600,"refresh_token":"AB1","x_refresh_token_expires_in":8726400,"access_token":"eyJ"}"#,
        )
        .unwrap();
        assert_eq!(tokens.refresh_token_expires_in, Some(8_726_400));
        let tokens = parse(
            200,
            JSON,
            r#"{"access_token":"a","refresh_token_expires_in":"31536000","x_refresh_token_expires_in":5}"#,
        )
        .unwrap();
        assert_eq!(tokens.refresh_token_expires_in, Some(31_536_000));
    }

    #[test]
    fn bom_whitespace_and_missing_token_type() {
        let tokens = parse(
            200,
            Some("text/plain"),
            "\u{feff}\n  {\"access_token\":\"a\",\"scope\":[\"x\",\"y\"]}  \n",
        )
        .unwrap();
        assert_eq!(tokens.token_type, None);
        assert_eq!(tokens.scope.as_deref(), Some("x y"));
    }

    #[test]
    fn html_502_is_unavailable_and_not_echoed() {
        let error = parse(
            502,
            Some("text/html"),
            "<html><head><title>502 Bad Gateway</title></head><body>secret-ish</body></html>",
        )
        .unwrap_err();
        assert!(
            matches!(error, OAuthError::Unavailable { status: 502, .. }),
            "{error:?}"
        );
        assert!(!error.is_permanent());
        assert!(!error.provider_message().contains("secret-ish"));
        assert_eq!(
            error.provider_message(),
            "the provider answered HTTP 502: Bad Gateway, an HTML page of 79 bytes"
        );
    }

    #[test]
    fn five_hundred_with_invalid_grant_is_not_permanent() {
        let error = parse(
            503,
            JSON,
            r#"{"error":"invalid_grant","error_description":"x"}"#,
        )
        .unwrap_err();
        assert!(matches!(error, OAuthError::Unavailable { status: 503, .. }));
        assert!(!error.is_permanent());
        assert!(error.provider_message().contains("invalid_grant: x"));
        let error = parse(500, JSON, r#"{"error":"server_error"}"#).unwrap_err();
        assert!(matches!(error, OAuthError::Unavailable { status: 500, .. }));
    }

    #[test]
    fn rate_limited_and_non_permanent_codes() {
        let error = parse(429, JSON, r#"{"error":"invalid_grant"}"#).unwrap_err();
        assert!(matches!(
            error,
            OAuthError::RateLimited {
                retry_after: None,
                ..
            }
        ));
        assert!(!error.is_permanent());
        for code in [
            "invalid_request",
            "temporarily_unavailable",
            "server_error",
            "slow_down",
        ] {
            let error = parse(400, JSON, &format!(r#"{{"error":"{code}"}}"#)).unwrap_err();
            assert!(
                matches!(
                    error,
                    OAuthError::Provider {
                        permanent: false,
                        ..
                    }
                ),
                "{code}"
            );
        }
    }

    #[test]
    fn four_hundred_without_oauth_error_is_not_permanent() {
        for (ct, body) in [
            (Some("text/html"), "<html><body>Bad Request</body></html>"),
            (Some("text/plain"), "Bad Request"),
            (None, ""),
            (JSON, r#"{"message_only":"x"}"#),
            (JSON, "{not json"),
        ] {
            let error = parse(400, ct, body).unwrap_err();
            assert!(
                matches!(error, OAuthError::Unavailable { status: 400, .. }),
                "{body}: {error:?}"
            );
            assert!(!error.is_permanent());
        }
        let error = parse(302, None, "").unwrap_err();
        assert!(matches!(error, OAuthError::Unavailable { status: 302, .. }));
    }

    #[test]
    fn unparseable_success_bodies() {
        for body in [
            "",
            "   ",
            "[]",
            r#"[{"access_token":"a"}]"#,
            "\"a\"",
            "42",
            r#"{"token_type":"bearer"}"#,
            r#"{"access_token":""}"#,
            r#"{"access_token":42}"#,
            r#"{"access_token":"leaked-maybe""#,
            "<xml><access_token>x</access_token></xml>",
        ] {
            let error = parse(200, JSON, body).unwrap_err();
            assert!(
                matches!(error, OAuthError::Unparseable { status: 200, .. }),
                "{body}: {error:?}"
            );
            assert!(!error.is_permanent());
            assert!(!error.provider_message().contains("leaked-maybe"));
        }
    }
}
