//! [`OAuthError`]: every way a call to an authorization server can fail, in the classes the
//! refresh engine acts on.
//!
//! **Only `Provider { permanent: true }` means the grant is gone.** Everything else (a rate
//! limit, a 5xx, a timeout, a body we cannot read, our own configuration) leaves the instance
//! valid, to be retried later.
//!
//! Decisions, for the record:
//! - A 5xx is always [`OAuthError::Unavailable`], even with `invalid_grant` in its body: a
//!   server that says it failed is not a trustworthy witness that the grant is gone, and gateways
//!   in front of authorization servers answer 5xx with bodies of their own. The OAuth error it
//!   carried is kept in the message.
//! - A 429 is always [`OAuthError::RateLimited`], whatever its body.
//! - A 4xx (3xx too) without an OAuth error in its body (an HTML page, an empty body, JSON
//!   without an error field) is [`OAuthError::Unavailable`]: we cannot tell what happened, so it
//!   must not invalidate anything.
//! - A 2xx without an access token and without an error is [`OAuthError::Unparseable`].
//!
//! Messages never contain a token or secret: provider text is limited to the `error` and
//! description fields, cut to 300 characters, and the secrets of the request are redacted from
//! it by the client.

use super::text::{MAX_ECHO_CHARS, cut, reason_phrase, redact};
use crate::secret::Secret;

/// How the text of a rate limit ([`OAuthError::RateLimited`]) begins: the store tells by it the
/// instances whose backoff a provider asked for (see `Store::expedite_backoffs`).
pub const RATE_LIMITED_TEXT: &str = "the provider rate-limited the request";
/// How the recorded text of a failure whose wait the provider set (a 503's `Retry-After`)
/// begins, for the same reason.
pub const ASKED_TO_WAIT_TEXT: &str = "the provider asked to wait";

/// How a transport failure's text begins when no connection was made: the request was not
/// sent, and the provider did nothing.
pub(crate) const CONNECTION_FAILED_TEXT: &str = "the connection failed";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    /// The provider answered with an OAuth error (any status below 500 but 429, including
    /// errors sent with HTTP 200 by GitHub and Slack, Atlassian's 403 `invalid_grant`, HubSpot's
    /// `{"status":"BAD_REFRESH_TOKEN"}`, Zoom's `{"reason":…,"error":…}`).
    #[error("the provider answered HTTP {status} with error {}", error_with_description(.error, .description))]
    Provider {
        status: u16,
        error: String,
        description: Option<String>,
        /// The grant is gone for good: see [`is_permanent_error_code`].
        permanent: bool,
    },
    /// Rate limited (429), with the `Retry-After` seconds when given. Its text begins with
    /// [`RATE_LIMITED_TEXT`].
    #[error("the provider rate-limited the request (HTTP 429){}{}", retry_after_text(.retry_after), colon_message(.message))]
    RateLimited {
        retry_after: Option<u64>,
        message: String,
    },
    /// A 5xx, or another failure status without an OAuth error body.
    #[error("the provider answered HTTP {status}{}", colon_message(.message))]
    Unavailable {
        status: u16,
        message: String,
        /// A 503's `Retry-After` seconds (RFC 9110 §10.2.3: how long it expects to be down).
        retry_after: Option<u64>,
    },
    /// Timeout, connection refused, DNS, TLS…: no answer from the provider.
    #[error("no answer from the provider: {message}")]
    Transport { message: String },
    /// A 2xx whose body is not a token response (no access token), or cannot be read.
    /// `rotated`: a usable refresh token the answer carried all the same (beside an access
    /// token no header can carry, or none): the provider may have retired the one presented
    /// for it, so a refresh keeps it.
    #[error("the provider's answer (HTTP {status}) is not a token response: {message}")]
    Unparseable {
        status: u16,
        message: String,
        rotated: Option<Secret>,
    },
    /// Our side: a bad URL or template, a missing refresh token, an unsupported request.
    #[error("configuration error: {message}")]
    Config { message: String },
}

fn error_with_description(error: &str, description: &Option<String>) -> String {
    match description {
        Some(description) => format!("{error}: {description}"),
        None => error.to_string(),
    }
}

fn retry_after_text(retry_after: &Option<u64>) -> String {
    match retry_after {
        Some(seconds) => format!(", retry after {seconds} s"),
        None => String::new(),
    }
}

fn colon_message(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// Error codes that mean the grant is gone for good, whatever the connector says, compared
/// without regard to case.
///
/// - RFC 6749 §5.2: `invalid_grant` (the refresh token or code is invalid, expired, revoked).
/// - Provider kin: GitHub `bad_refresh_token`, Slack `invalid_refresh_token` and
///   `token_revoked`, HubSpot `BAD_REFRESH_TOKEN` (case-insensitively the same), and the common
///   `invalid_refresh_token`/`expired_refresh_token` spellings.
/// - OpenID Connect / Microsoft: `interaction_required`, `consent_required`, `login_required`:
///   only the user, in a browser, can make the grant work again.
///
/// Not permanent: `invalid_request`, `invalid_scope`, `unsupported_grant_type` (our request or
/// the connector is wrong, not the grant), `temporarily_unavailable`, `server_error`,
/// `slow_down`, and `expired_token` (in RFC 8628 it is about a device code; a provider that uses
/// it for refresh tokens can list it in `permanentErrors`). Nor are the app's own errors,
/// [`CLIENT_ERRORS`]: the user's grant was not refused.
const PERMANENT_ERRORS: &[&str] = &[
    "invalid_grant",
    "bad_refresh_token",
    "invalid_refresh_token",
    "expired_refresh_token",
    "token_revoked",
    "interaction_required",
    "consent_required",
    "login_required",
];

/// Errors with a permanent code that do not mean the grant is gone, as `"code: description"`
/// prefixes compared without regard to case: Microsoft Entra's AADSTS50196 (`invalid_grant`,
/// "The server terminated an operation because it encountered a client request loop"), sent to
/// a client repeating the same request too often in a few minutes; the refresh token is good,
/// and the refresh is tried again after the backoff like any passing failure.
pub const NOT_PERMANENT_DESCRIBED: &[&str] = &["invalid_grant: aadsts50196"];

/// Token-endpoint errors about the app, not the user's grant (RFC 6749 §5.2):
/// `invalid_client` (its credentials are wrong: a client secret expired or rotated, as Entra's
/// do every two years at most) and `unauthorized_client` (the client may not use the grant: a
/// client id changed, a grant type withdrawn). Every instance of the app gets them at once,
/// and fixing `oauth.api.key` / `oauth.api.secret` makes the same grants work again: the
/// instances stay valid and back off, and no user has to consent again. A connector that
/// knows them to mean a dead grant lists them in `permanentErrors`.
///
/// Providers' own names for the same: Salesforce's and Slack's `invalid_client_id`, Slack's
/// `bad_client_secret`, HubSpot's `BAD_CLIENT_ID` / `BAD_CLIENT_SECRET`, GitHub's
/// `incorrect_client_credentials`, Strava's `Application:invalid`.
pub const CLIENT_ERRORS: &[&str] = &[
    "invalid_client",
    "unauthorized_client",
    "invalid_client_id",
    "bad_client_secret",
    "bad_client_id",
    "incorrect_client_credentials",
    "Application:invalid",
];

/// Token-endpoint errors that say the provider cannot answer just now (RFC 6749 §5.2's
/// `temporarily_unavailable` and `server_error`, RFC 8628's `slow_down`, Slack's
/// `ratelimited`), whatever the status they come with: tried again later, the same request
/// may succeed.
pub const PASSING_ERRORS: &[&str] = &[
    "temporarily_unavailable",
    "server_error",
    "slow_down",
    "ratelimited",
    "rate_limited",
];

/// Of [`PASSING_ERRORS`], those that say the caller is asking too often.
pub const RATE_LIMIT_ERRORS: &[&str] = &["slow_down", "ratelimited", "rate_limited"];

/// Token-endpoint errors about the request itself (RFC 6749 §5.2): `invalid_request` (a
/// parameter missing or wrong: a scope the provider wants on every refresh), `invalid_scope`,
/// `unsupported_grant_type`. Sent again as it is, the same request is refused again: the
/// connector's settings or the instance's configuration must change, not the grant. The
/// instances stay valid and back off, and the organization is told what to fix.
pub const REQUEST_ERRORS: &[&str] = &["invalid_request", "invalid_scope", "unsupported_grant_type"];

/// Whether a token-endpoint error code means the grant is gone for good: the built-in list
/// (see [`PERMANENT_ERRORS`]) plus the connector's `permanentErrors`, compared without regard
/// to case.
pub fn is_permanent_error_code(code: &str, connector_permanent_errors: &[String]) -> bool {
    let code = code.trim();
    !code.is_empty()
        && (PERMANENT_ERRORS
            .iter()
            .any(|known| known.eq_ignore_ascii_case(code))
            || connector_permanent_errors
                .iter()
                .any(|known| known.trim().eq_ignore_ascii_case(code)))
}

impl OAuthError {
    pub(crate) fn config(message: impl Into<String>) -> Self {
        OAuthError::Config {
            message: message.into(),
        }
    }

    /// Whether the grant is gone for good (the instance must be re-authorized). Only a
    /// provider's OAuth error with a permanent code is.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            OAuthError::Provider {
                permanent: true,
                ..
            }
        )
    }

    /// Whether the provider refused the app rather than the grant ([`CLIENT_ERRORS`]), unless
    /// the connector counts the code as permanent.
    pub fn is_client_rejected(&self) -> bool {
        matches!(
            self,
            OAuthError::Provider {
                error,
                permanent: false,
                ..
            } if CLIENT_ERRORS.iter().any(|known| known.eq_ignore_ascii_case(error.trim()))
        )
    }

    /// Whether the provider refused the request rather than the grant ([`REQUEST_ERRORS`]),
    /// unless the connector counts the code as permanent.
    pub fn is_request_rejected(&self) -> bool {
        matches!(
            self,
            OAuthError::Provider {
                error,
                permanent: false,
                ..
            } if REQUEST_ERRORS.iter().any(|known| known.eq_ignore_ascii_case(error.trim()))
        )
    }

    /// Whether the provider said, with an error code in its answer, that it cannot answer just
    /// now ([`PASSING_ERRORS`]).
    pub fn is_passing(&self) -> bool {
        matches!(
            self,
            OAuthError::Provider {
                error,
                permanent: false,
                ..
            } if PASSING_ERRORS.iter().any(|known| known.eq_ignore_ascii_case(error.trim()))
        )
    }

    /// Whether the provider said, with an error code in its answer, that it is rate limiting
    /// ([`RATE_LIMIT_ERRORS`]).
    pub fn is_rate_limit_code(&self) -> bool {
        matches!(
            self,
            OAuthError::Provider {
                error,
                permanent: false,
                ..
            } if RATE_LIMIT_ERRORS.iter().any(|known| known.eq_ignore_ascii_case(error.trim()))
        )
    }

    /// Whether retrying later may succeed (rate limit, provider down, no answer).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            OAuthError::RateLimited { .. }
                | OAuthError::Unavailable { .. }
                | OAuthError::Transport { .. }
                | OAuthError::Unparseable { .. }
        ) || matches!(
            self,
            OAuthError::Provider {
                permanent: false,
                ..
            }
        )
    }

    /// Whether the provider may have acted on the request while its answer was lost: a timeout
    /// or a connection cut once it was sent, or a 2xx that was not read as tokens. A refresh
    /// of a provider that rotates refresh tokens may then have retired the one presented.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            OAuthError::Transport { message } => !message.starts_with(CONNECTION_FAILED_TEXT),
            OAuthError::Unparseable { status, .. } => (200..300).contains(status),
            _ => false,
        }
    }

    /// The seconds the provider asked us to wait, when it said (a 429's or a 503's
    /// `Retry-After`).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            OAuthError::RateLimited { retry_after, .. }
            | OAuthError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The provider's words for users (`providerMessage`), e.g.
    /// `invalid_grant: expired access/refresh token`. Never contains a token or secret; at most
    /// about 300 characters.
    pub fn provider_message(&self) -> String {
        let message = match self {
            OAuthError::Provider {
                error, description, ..
            } => error_with_description(error, description),
            OAuthError::RateLimited { .. }
            | OAuthError::Unavailable { .. }
            | OAuthError::Transport { .. }
            | OAuthError::Unparseable { .. }
            | OAuthError::Config { .. } => self.to_string(),
        };
        cut(&message, MAX_ECHO_CHARS)
    }

    /// Removes the given secrets (what we sent: code, refresh token, client secret, verifier)
    /// from any provider text in the error, for providers that echo the token they reject.
    pub(crate) fn redacted(self, secrets: &[&str]) -> Self {
        match self {
            OAuthError::Provider {
                status,
                error,
                description,
                permanent,
            } => OAuthError::Provider {
                status,
                error: redact(&error, secrets),
                description: description.map(|d| redact(&d, secrets)),
                permanent,
            },
            OAuthError::RateLimited {
                retry_after,
                message,
            } => OAuthError::RateLimited {
                retry_after,
                message: redact(&message, secrets),
            },
            OAuthError::Unavailable {
                status,
                message,
                retry_after,
            } => OAuthError::Unavailable {
                status,
                message: redact(&message, secrets),
                retry_after,
            },
            OAuthError::Transport { message } => OAuthError::Transport {
                message: redact(&message, secrets),
            },
            OAuthError::Unparseable {
                status,
                message,
                rotated,
            } => OAuthError::Unparseable {
                status,
                message: redact(&message, secrets),
                rotated,
            },
            OAuthError::Config { message } => OAuthError::Config {
                message: redact(&message, secrets),
            },
        }
    }

    /// An `Unavailable` for a status, with the reason phrase and a note.
    pub(crate) fn unavailable(status: u16, note: impl AsRef<str>) -> Self {
        let reason = reason_phrase(status);
        let note = note.as_ref();
        let message = match (reason.is_empty(), note.is_empty()) {
            (true, true) => String::new(),
            (false, true) => reason.to_string(),
            (true, false) => note.to_string(),
            (false, false) => format!("{reason}, {note}"),
        };
        OAuthError::Unavailable {
            status,
            message: cut(&message, MAX_ECHO_CHARS),
            retry_after: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_says_so_first() {
        let limited = OAuthError::RateLimited {
            retry_after: Some(60),
            message: "slow down".into(),
        };
        assert!(limited.to_string().starts_with(RATE_LIMITED_TEXT));
        assert!(limited.provider_message().starts_with(RATE_LIMITED_TEXT));
    }

    #[test]
    fn permanent_codes() {
        let connector = vec!["account_suspended".to_string()];
        for code in [
            "invalid_grant",
            "INVALID_GRANT",
            "bad_refresh_token",
            "BAD_REFRESH_TOKEN",
            "invalid_refresh_token",
            "token_revoked",
            "interaction_required",
            "consent_required",
            "account_suspended",
        ] {
            assert!(is_permanent_error_code(code, &connector), "{code}");
        }
        // The app's credentials, not the grant; unless the connector says otherwise.
        for code in CLIENT_ERRORS {
            assert!(!is_permanent_error_code(code, &connector), "{code}");
            assert!(is_permanent_error_code(code, &[code.to_string()]), "{code}");
            let refused = OAuthError::Provider {
                status: 401,
                error: code.to_string(),
                description: None,
                permanent: false,
            };
            assert!(refused.is_client_rejected() && refused.is_transient());
            assert!(!refused.is_request_rejected());
        }
        // The request, not the grant nor the app.
        for code in REQUEST_ERRORS {
            assert!(!is_permanent_error_code(code, &connector), "{code}");
            let refused = OAuthError::Provider {
                status: 400,
                error: code.to_ascii_uppercase(),
                description: None,
                permanent: false,
            };
            assert!(refused.is_request_rejected() && !refused.is_client_rejected());
        }
        for code in [
            "invalid_request",
            "temporarily_unavailable",
            "server_error",
            "slow_down",
            "invalid_scope",
            "expired_token",
            "",
            "grant",
        ] {
            assert!(!is_permanent_error_code(code, &connector), "{code}");
        }
    }

    #[test]
    fn classes() {
        let permanent = OAuthError::Provider {
            status: 400,
            error: "invalid_grant".into(),
            description: Some("expired access/refresh token".into()),
            permanent: true,
        };
        assert!(permanent.is_permanent());
        assert!(!permanent.is_transient());
        assert_eq!(
            permanent.provider_message(),
            "invalid_grant: expired access/refresh token"
        );
        let limited = OAuthError::RateLimited {
            retry_after: Some(7),
            message: String::new(),
        };
        assert!(!limited.is_permanent());
        assert!(limited.is_transient());
        assert_eq!(limited.retry_after(), Some(7));
        assert_eq!(
            limited.provider_message(),
            "the provider rate-limited the request (HTTP 429), retry after 7 s"
        );
        let config = OAuthError::config("no refresh token");
        assert!(!config.is_permanent() && !config.is_transient());
        assert_eq!(
            OAuthError::unavailable(503, "").to_string(),
            "the provider answered HTTP 503: Service Unavailable"
        );
    }

    #[test]
    fn redaction_covers_every_text() {
        let error = OAuthError::Provider {
            status: 400,
            error: "invalid_grant".into(),
            description: Some("refresh token rt-secret-123 is expired".into()),
            permanent: true,
        }
        .redacted(&["rt-secret-123"]);
        assert_eq!(
            error.provider_message(),
            "invalid_grant: refresh token [redacted] is expired"
        );
        assert!(!format!("{error:?}").contains("rt-secret-123"));
    }
}
