//! The OAuth 2.0 client: everything tokenwarden sends to a provider's authorization server, and
//! the tolerant reading of what comes back.
//!
//! - [`authorization_url`], [`new_state`], [`new_pkce`]: the first leg (RFC 6749 §4.1.1, PKCE
//!   RFC 7636 with S256 only).
//! - [`OAuthClient`]: code exchange, refresh and revocation, shaped by the connector's
//!   [`OAuthSpec`](crate::catalog::OAuthSpec) (client authentication, body format, separate
//!   refresh URL, the revocation style of each provider).
//! - [`parse_token_response`]: reads JSON or form-encoded token responses, and classifies every
//!   failure into an [`OAuthError`] class. The refresh engine depends on those classes: only
//!   [`OAuthError::is_permanent`] errors may invalidate an instance; everything else is a passing
//!   failure to retry later.
//! - [`api_rejection`], [`describe_provider_body`]: for the proxy, whether an API answer means
//!   "the access token was rejected", and the provider's words for users.
//!
//! This module never sees users' HTTP requests, never touches the store, and never writes a
//! token, secret or raw provider body into an error, a `Debug` output or a log line.

mod client;
mod error;
mod rejection;
mod response;
mod text;

#[cfg(test)]
mod http_tests;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng as _;
use sha2::{Digest as _, Sha256};

use crate::catalog::OAuthSpec;
use crate::secret::Secret;

pub use client::{
    OAuthClient, REFRESH_RESERVED, RevokeOutcome, TOKEN_RESERVED, TokenHint, error_chain,
    read_capped, transport_message,
};
pub use error::{ASKED_TO_WAIT_TEXT, OAuthError, RATE_LIMITED_TEXT, is_permanent_error_code};
pub use rejection::{api_rejection, describe_provider_body};
pub use response::is_secret_name;
pub use response::{TokenSet, has_control_characters, parse_token_response};
pub(crate) use text::cut as cut_text;
pub(crate) use text::invisible;
pub use text::redact;

/// The `User-Agent` of every request to a provider.
pub const USER_AGENT: &str = concat!("tokenwarden/", env!("CARGO_PKG_VERSION"));

/// Client credentials of the connector's OAuth app, from the instance configuration.
/// An empty `client_secret` means a public client (PKCE): only `client_id` is sent.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: Secret,
}

/// The connector's endpoints with templates already filled (the caller fills `{tenant}` etc.).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub authorization_url: String,
    pub token_url: String,
    /// Equal to `token_url` when the connector has no separate refresh URL.
    pub refresh_url: String,
    pub revoke_url: Option<String>,
}

/// A PKCE pair (RFC 7636, method S256). The verifier is kept by the service until the code
/// exchange; the challenge goes on the authorization URL.
#[derive(Debug, Clone)]
pub struct Pkce {
    pub verifier: Secret,
    pub challenge: String,
}

/// A fresh PKCE pair: the verifier is 32 random bytes, base64url without padding (43 characters
/// of the RFC's unreserved set, 256 bits), as oauth2-rs does.
pub fn new_pkce() -> Pkce {
    let verifier = random_url_safe(32);
    let challenge = pkce_challenge(&verifier);
    Pkce {
        verifier: Secret::new(verifier),
        challenge,
    }
}

/// The S256 challenge of a verifier: `BASE64URL-ENCODE(SHA256(ASCII(code_verifier)))`.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Why `value` is no redirect URI a provider can send a user back to with a code, if it is
/// not: RFC 6749 §3.1.2 has it absolute, without a fragment. A native app's own scheme passes
/// (`com.example.app:/callback`, RFC 8252), as does the out-of-band URN; a URL that is no place
/// to return to does not, nor one with user info (it is shown to whoever reads the instance),
/// nor one that carries the parameters the redirect adds itself (`code`, `state`, `error`,
/// `iss`: the app would read its own in place of the provider's).
pub fn redirect_uri_problem(value: &str) -> Option<&'static str> {
    let parsed = match url::Url::parse(value) {
        Err(_) => return Some("it is not an absolute URL"),
        Ok(parsed) => parsed,
    };
    if parsed.fragment().is_some() {
        return Some("it has a fragment; a redirect URI takes none (RFC 6749 §3.1.2)");
    }
    if (parsed.cannot_be_a_base()
        && !matches!(
            parsed.as_str(),
            "urn:ietf:wg:oauth:2.0:oob" | "urn:ietf:wg:oauth:2.0:oob:auto"
        ))
        || matches!(parsed.scheme(), "javascript" | "data" | "file" | "vbscript")
    {
        return Some("it is not a URL a provider can redirect to");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Some(
            "it has user info (`user:password@`), which would be shown to whoever reads the instance and sent along with every code",
        );
    }
    if parsed.query_pairs().any(|(name, _)| {
        matches!(
            name.as_ref(),
            "code" | "state" | "error" | "error_description" | "error_uri" | "iss"
        )
    }) {
        return Some(
            "its query has a parameter the provider's redirect adds (`code`, `state`, `error`, `iss`): the redirect would carry two",
        );
    }
    None
}

/// Why a caller's own `state` cannot go through a redirect and come back as it was, if it
/// cannot: RFC 6749 (Appendix A.5) has it printable ASCII (`VSCHAR`); a control character or a
/// character beyond ASCII came back changed by a browser or a form, and the code's exchange
/// never found its state.
pub fn state_problem(state: &str) -> Option<&'static str> {
    (!state.bytes().all(|b| (0x20..=0x7e).contains(&b))).then_some(
        "it holds a character other than printable ASCII (RFC 6749's VSCHAR): a browser or a provider would not give it back as it is",
    )
}

/// A fresh `state` value: 32 random bytes (256 bits), base64url without padding.
pub fn new_state() -> String {
    random_url_safe(32)
}

fn random_url_safe(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    // ThreadRng is a CSPRNG seeded from the operating system.
    rand::rng().fill_bytes(&mut buffer);
    URL_SAFE_NO_PAD.encode(&buffer)
}

/// The parameters this module sets itself on the authorization URL. The connector's
/// `authorizationParams` and the URL's own query may not override them: `state`,
/// `redirect_uri` and the PKCE challenge are what make the flow safe.
pub const AUTHORIZATION_RESERVED: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
];

/// Scopes that ask for a refresh token rather than for access: Microsoft's, Xero's and
/// Atlassian's `offline_access`, Salesforce's `refresh_token`, Ory's `offline`, X's
/// `offline.access`.
const OFFLINE_SCOPES: &[&str] = &[
    "offline_access",
    "offline",
    "offline.access",
    "refresh_token",
];

/// The scope a caller asked for (`oauth/url`'s `scope`), with the connector's scopes that ask
/// for a refresh token added when it left them out: without them the provider gives no refresh
/// token, and the instance dies with its first access token (a `scope=Mail.Read` at
/// Microsoft). What the scope grants access to stays the caller's choice.
pub fn with_offline_scopes(asked: &str, spec: &OAuthSpec) -> String {
    let asked = asked.trim();
    let separator = if spec.scope_separator.is_empty() {
        " "
    } else {
        spec.scope_separator.as_str()
    };
    let given: Vec<&str> = asked
        .split(|c: char| c.is_whitespace() || separator.contains(c))
        .filter(|part| !part.is_empty())
        .collect();
    let missing: Vec<&str> = spec
        .scopes
        .iter()
        .map(String::as_str)
        .filter(|scope| {
            OFFLINE_SCOPES
                .iter()
                .any(|offline| offline.eq_ignore_ascii_case(scope))
        })
        .filter(|scope| !given.iter().any(|part| part.eq_ignore_ascii_case(scope)))
        .collect();
    if missing.is_empty() || given.is_empty() {
        return asked.to_string();
    }
    // Joined as the caller joined its own (spaces where the connector says commas, say).
    let joiner = if !asked.contains(separator) && asked.contains(char::is_whitespace) {
        " "
    } else {
        separator
    };
    std::iter::once(asked)
        .chain(missing)
        .collect::<Vec<_>>()
        .join(joiner)
}

/// Builds the authorization URL: `response_type=code`, `client_id`, `redirect_uri`, `scope`
/// (the connector's scopes joined by its separator, or the caller's override; omitted when
/// empty), `state`, `code_challenge` and `code_challenge_method=S256` when a challenge is given,
/// then the connector's `authorizationParams`. The authorization URL's own query parameters are
/// kept, except those this function sets.
pub fn authorization_url(
    spec: &OAuthSpec,
    endpoints: &Endpoints,
    client_id: &str,
    redirect_uri: &str,
    state: &str,
    scope_override: Option<&str>,
    pkce_challenge: Option<&str>,
) -> Result<url::Url, OAuthError> {
    if client_id.is_empty() {
        return Err(OAuthError::config("the client id (oauth.api.key) is empty"));
    }
    if state.is_empty() {
        return Err(OAuthError::config("the state parameter is empty"));
    }
    if redirect_uri.is_empty() {
        return Err(OAuthError::config(
            "the redirect URI (oauth.callback.url) is empty",
        ));
    }
    let mut url = client::parse_endpoint("authorization", &endpoints.authorization_url)?;

    let scope = match scope_override {
        Some(scope) => scope.trim().to_string(),
        None => spec
            .scopes
            .iter()
            .map(|scope| scope.as_str())
            .filter(|scope| !scope.is_empty())
            .collect::<Vec<_>>()
            .join(&spec.scope_separator),
    };

    let mut ours: Vec<(&str, &str)> = vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
    ];
    if !scope.is_empty() {
        ours.push(("scope", &scope));
    }
    ours.push(("state", state));
    if let Some(challenge) = pkce_challenge {
        ours.push(("code_challenge", challenge));
        ours.push(("code_challenge_method", "S256"));
    }

    let is_ours = |name: &str| {
        AUTHORIZATION_RESERVED.contains(&name) || ours.iter().any(|(ours, _)| *ours == name)
    };
    let existing: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(name, _)| !is_ours(name))
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();

    {
        let mut query = url.query_pairs_mut();
        query.clear();
        for (name, value) in &existing {
            query.append_pair(name, value);
        }
        for (name, value) in &ours {
            query.append_pair(name, value);
        }
        for (name, value) in &spec.authorization_params {
            if !is_ours(name) && !existing.iter().any(|(existing, _)| existing == name) {
                query.append_pair(name, value);
            }
        }
    }
    if url.query() == Some("") {
        url.set_query(None);
    }
    Ok(url)
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::catalog::OAuthSpec;

    /// A standards-compliant connector spec, for tests to adjust.
    pub fn spec() -> OAuthSpec {
        serde_json::from_value(serde_json::json!({
            "authorizationUrl": "https://auth.example.test/authorize",
            "tokenUrl": "https://auth.example.test/token",
        }))
        .expect("minimal spec parses")
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_asked_scope_keeps_the_connectors_offline_scopes() {
        let spec = |scopes: &[&str], separator: &str| crate::catalog::OAuthSpec {
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            scope_separator: separator.to_string(),
            ..super::test_support::spec()
        };
        let microsoft = spec(&["offline_access", "User.Read"], " ");
        assert_eq!(
            super::with_offline_scopes("Mail.Read", &microsoft),
            "Mail.Read offline_access"
        );
        assert_eq!(
            super::with_offline_scopes("OFFLINE_ACCESS Mail.Read", &microsoft),
            "OFFLINE_ACCESS Mail.Read"
        );
        let salesforce = spec(&["api", "refresh_token"], " ");
        assert_eq!(
            super::with_offline_scopes("api", &salesforce),
            "api refresh_token"
        );
        let commas = spec(&["read", "offline"], ",");
        assert_eq!(
            super::with_offline_scopes("write", &commas),
            "write,offline"
        );
        assert_eq!(super::with_offline_scopes("a b", &commas), "a b offline");
        assert_eq!(super::with_offline_scopes(",", &commas), ",");
        // A connector without one: the caller's scope as it is.
        let plain = spec(&["read"], " ");
        assert_eq!(super::with_offline_scopes(" write ", &plain), "write");
    }
    use std::collections::HashMap;

    use super::test_support::spec;
    use super::*;

    fn endpoints(authorization_url: &str) -> Endpoints {
        Endpoints {
            authorization_url: authorization_url.to_string(),
            token_url: "https://auth.example.test/token".to_string(),
            refresh_url: "https://auth.example.test/token".to_string(),
            revoke_url: None,
        }
    }

    fn query(url: &url::Url) -> Vec<(String, String)> {
        url.query_pairs()
            .map(|(name, value)| (name.into_owned(), value.into_owned()))
            .collect()
    }

    #[test]
    fn pkce_matches_rfc_7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn new_pkce_is_well_formed_and_fresh() {
        let first = new_pkce();
        let second = new_pkce();
        let verifier = first.verifier.expose();
        assert!((43..=128).contains(&verifier.len()));
        assert!(
            verifier
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
        );
        assert_eq!(first.challenge, pkce_challenge(verifier));
        assert_ne!(first.verifier, second.verifier);
        assert!(!format!("{first:?}").contains(verifier));
    }

    #[test]
    fn state_is_long_url_safe_and_fresh() {
        let state = new_state();
        assert!(state.len() >= 22, "128 bits need 22 base64 characters");
        assert!(
            state
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_ne!(state, new_state());
    }

    #[test]
    fn authorization_url_has_every_parameter() {
        let mut spec = spec();
        spec.scopes = vec!["offline_access".into(), "User.Read".into()];
        spec.authorization_params
            .insert("prompt".into(), "consent".into());
        let url = authorization_url(
            &spec,
            &endpoints("https://auth.example.test/authorize"),
            "my client",
            "https://app.example.test/cb?x=1",
            "st4te",
            None,
            Some("chal"),
        )
        .unwrap();
        assert_eq!(url.host_str(), Some("auth.example.test"));
        assert_eq!(url.path(), "/authorize");
        assert_eq!(
            query(&url),
            vec![
                ("response_type".into(), "code".into()),
                ("client_id".into(), "my client".into()),
                (
                    "redirect_uri".into(),
                    "https://app.example.test/cb?x=1".into()
                ),
                ("scope".into(), "offline_access User.Read".into()),
                ("state".into(), "st4te".into()),
                ("code_challenge".into(), "chal".into()),
                ("code_challenge_method".into(), "S256".into()),
                ("prompt".into(), "consent".into()),
            ]
        );
        // Spaces are encoded, and the redirect URI's own query stays inside its value.
        assert!(url.as_str().contains("client_id=my+client"));
        assert!(
            url.as_str()
                .contains("redirect_uri=https%3A%2F%2Fapp.example.test%2Fcb%3Fx%3D1")
        );
    }

    #[test]
    fn authorization_url_keeps_existing_query_and_uses_separator_and_override() {
        let mut spec = spec();
        spec.scopes = vec!["a".into(), "b".into()];
        spec.scope_separator = ",".into();
        spec.authorization_params
            .insert("state".into(), "evil".into());
        spec.authorization_params
            .insert("access_type".into(), "offline".into());
        let ep = endpoints("https://auth.example.test/authorize?audience=api.x&state=old");
        let url = authorization_url(&spec, &ep, "id", "https://cb", "s", None, None).unwrap();
        let pairs: HashMap<_, _> = query(&url).into_iter().collect();
        assert_eq!(pairs["audience"], "api.x");
        assert_eq!(pairs["scope"], "a,b");
        assert_eq!(pairs["state"], "s");
        assert_eq!(pairs["access_type"], "offline");
        assert!(!pairs.contains_key("code_challenge"));
        assert_eq!(query(&url).iter().filter(|(n, _)| n == "state").count(), 1);

        let url =
            authorization_url(&spec, &ep, "id", "https://cb", "s", Some("x y"), None).unwrap();
        let pairs: HashMap<_, _> = query(&url).into_iter().collect();
        assert_eq!(pairs["scope"], "x y");

        spec.scopes.clear();
        let url = authorization_url(&spec, &ep, "id", "https://cb", "s", None, None).unwrap();
        assert!(!query(&url).iter().any(|(n, _)| n == "scope"));
    }

    #[test]
    fn authorization_url_rejects_bad_input() {
        let spec = spec();
        let bad = authorization_url(
            &spec,
            &endpoints("not a url"),
            "id",
            "https://cb",
            "s",
            None,
            None,
        );
        assert!(matches!(bad, Err(OAuthError::Config { .. })));
        let bad = authorization_url(
            &spec,
            &endpoints("https://auth.example.test/{tenant}/authorize"),
            "id",
            "https://cb",
            "s",
            None,
            None,
        );
        assert!(matches!(bad, Err(OAuthError::Config { .. })), "{bad:?}");
        let empty_state = authorization_url(
            &spec,
            &endpoints("https://auth.example.test/a"),
            "id",
            "https://cb",
            "",
            None,
            None,
        );
        assert!(matches!(empty_state, Err(OAuthError::Config { .. })));
    }
}
