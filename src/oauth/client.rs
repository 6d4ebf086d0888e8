//! [`OAuthClient`]: the requests tokenwarden sends to authorization servers (code exchange,
//! refresh, revocation), shaped by the connector's quirks.
//!
//! **Redirects are never followed on these endpoints** (a token endpoint that redirects could
//! send our client secret and the user's refresh token anywhere: oauth2-rs warns of this SSRF):
//! build the shared client with [`OAuthClient::build_http_client`], or give `new` one with
//! `redirect::Policy::none()`. Every request also carries its own timeout, whatever the client's.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::Method;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER,
};
use serde_json::{Map, Value};

use super::error::OAuthError;
use super::response::{ParsedBody, TokenSet, classify_failure, parse_body, parse_token_response};
use super::text::{MAX_ECHO_CHARS, cut};
use super::{ClientCredentials, Endpoints, USER_AGENT};
use crate::catalog::{BodyFormat, ClientAuth, OAuthSpec, RevocationStyle};
use crate::secret::Secret;

/// The default time limit of one request to an authorization server, answer included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Token responses larger than this are not read further (they are a few hundred bytes).
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Which token is being revoked (RFC 7009 `token_type_hint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenHint {
    AccessToken,
    RefreshToken,
}

impl TokenHint {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenHint::AccessToken => "access_token",
            TokenHint::RefreshToken => "refresh_token",
        }
    }
}

/// The result of a revocation that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// The provider accepted the revocation (any 2xx).
    Revoked,
    /// The provider said the token was already invalid (`invalid_token`, Slack's `invalid_auth`,
    /// `token_revoked`, `token_expired`), as Salesforce does with a 400: the token is dead
    /// either way.
    AlreadyInvalid { error: String },
    /// The connector has no revocation endpoint: revocation is local only.
    NoEndpoint,
}

/// Error codes of a revocation endpoint that mean the token was already dead.
const ALREADY_INVALID: &[&str] = &[
    "invalid_token",
    "invalid_auth",
    "token_revoked",
    "token_expired",
    // Adobe Acrobat Sign's `{"code":"EXPIRED_TOKEN"}`: a refresh token dead of inactivity.
    "expired_token",
];

/// The OAuth 2.0 client: one shared `reqwest::Client` (connection pool), cheap to clone.
#[derive(Debug, Clone)]
pub struct OAuthClient {
    http: reqwest::Client,
    timeout: Duration,
    /// The ranges refused as destinations: a URL only filled here (the client id in a
    /// revocation URL) is checked against them too.
    egress: std::sync::Arc<crate::egress::Policy>,
}

/// How the request authenticates.
enum Auth<'a> {
    None,
    Basic { client_id: &'a str, secret: &'a str },
    Bearer(&'a str),
}

enum Body {
    None,
    /// A POST without a body still says `Content-Length: 0` (some servers want it).
    Empty,
    Form(String),
    Json(String),
}

/// A provider's answer, read.
struct Answer {
    status: u16,
    content_type: Option<String>,
    retry_after: Option<u64>,
    body: Vec<u8>,
    truncated: bool,
}

impl OAuthClient {
    /// Uses the given client for every request. It must not follow redirects: see
    /// [`OAuthClient::build_http_client`].
    pub fn new(http: reqwest::Client) -> Self {
        OAuthClient {
            http,
            timeout: DEFAULT_TIMEOUT,
            egress: std::sync::Arc::default(),
        }
    }

    /// The operator's egress policy (default: the metadata addresses alone are refused).
    pub fn with_egress(mut self, egress: std::sync::Arc<crate::egress::Policy>) -> Self {
        self.egress = egress;
        self
    }

    /// The time limit of each request, answer included (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A client fit for authorization servers: no redirects, connect timeout 10 s, overall
    /// timeout 30 s, tokenwarden's `User-Agent`. The rustls crypto provider must be installed.
    pub fn build_http_client() -> Result<reqwest::Client, OAuthError> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .timeout(DEFAULT_TIMEOUT)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|error| {
                OAuthError::config(format!(
                    "cannot build the HTTP client: {}",
                    error_chain(&error)
                ))
            })
    }

    /// Exchanges an authorization code (RFC 6749 §4.1.3, with the PKCE verifier when given).
    pub async fn exchange_code(
        &self,
        spec: &OAuthSpec,
        endpoints: &Endpoints,
        creds: &ClientCredentials,
        code: &Secret,
        redirect_uri: &str,
        code_verifier: Option<&Secret>,
    ) -> Result<TokenSet, OAuthError> {
        if code.expose().trim().is_empty() {
            return Err(OAuthError::config("the authorization code is empty"));
        }
        let mut params = vec![
            ("grant_type", "authorization_code"),
            ("code", code.expose()),
        ];
        // RFC 6749 §4.1.3: required when the authorization request had one, which it always
        // has here; an empty one is left out rather than sent empty.
        if !redirect_uri.is_empty() {
            params.push(("redirect_uri", redirect_uri));
        }
        if let Some(verifier) = code_verifier {
            params.push(("code_verifier", verifier.expose()));
        }
        for (name, value) in &spec.token_params {
            // The connector adds parameters (Basecamp's `type`, Withings' `action`); it cannot
            // replace the grant, the code or the credentials (the catalog's check refuses
            // them). `client_id` asks for the client's id in the body beside Basic.
            if name == "client_id" {
                // A definition stored before the check may hold another value: not sent, as
                // then.
                if value == "{client_id}" {
                    params.push(("client_id", &creds.client_id));
                }
            } else if !TOKEN_RESERVED.contains(&name.as_str()) {
                params.push((name, value));
            }
        }
        let mut secrets = vec![code.expose(), creds.client_secret.expose()];
        if let Some(verifier) = code_verifier {
            secrets.push(verifier.expose());
        }
        self.token_request(spec, "token", &endpoints.token_url, creds, params, &secrets)
            .await
    }

    /// Refreshes (RFC 6749 §6) at the connector's refresh URL, with its `refreshParams`.
    pub async fn refresh(
        &self,
        spec: &OAuthSpec,
        endpoints: &Endpoints,
        creds: &ClientCredentials,
        refresh_token: &Secret,
    ) -> Result<TokenSet, OAuthError> {
        if refresh_token.expose().trim().is_empty() {
            return Err(OAuthError::config(
                "the instance has no refresh token: it must be re-authorized",
            ));
        }
        let mut params = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ];
        for (name, value) in &spec.refresh_params {
            // As for the code's exchange.
            if name == "client_id" {
                if value == "{client_id}" {
                    params.push(("client_id", &creds.client_id));
                }
            } else if !REFRESH_RESERVED.contains(&name.as_str()) {
                params.push((name, value));
            }
        }
        let secrets = [refresh_token.expose(), creds.client_secret.expose()];
        self.token_request(
            spec,
            "refresh",
            &endpoints.refresh_url,
            creds,
            params,
            &secrets,
        )
        .await
    }

    /// Revokes a token in the connector's [`RevocationStyle`] (RFC 7009 when the connector has a
    /// `revokeUrl` and no style).
    pub async fn revoke(
        &self,
        spec: &OAuthSpec,
        endpoints: &Endpoints,
        creds: &ClientCredentials,
        token: &Secret,
        hint: TokenHint,
    ) -> Result<RevokeOutcome, OAuthError> {
        let (style, revoke_url) = match (spec.revocation, endpoints.revoke_url.as_deref()) {
            (Some(RevocationStyle::None), _) | (None, None) => {
                return Ok(RevokeOutcome::NoEndpoint);
            }
            (None, Some(url)) => (RevocationStyle::Rfc7009, url),
            (Some(style), Some(url)) => (style, url),
            (Some(style), None) => {
                return Err(OAuthError::config(format!(
                    "the connector declares the revocation style {style:?} but no revokeUrl"
                )));
            }
        };
        let token_value = token.expose();
        if token_value.trim().is_empty() {
            return Err(OAuthError::config("there is no token to revoke"));
        }
        let client_id_in_path: String =
            url::form_urlencoded::byte_serialize(creds.client_id.as_bytes()).collect();
        let mut url = parse_endpoint(
            "revocation",
            &revoke_url.replace("{client_id}", &client_id_in_path),
        )?;
        // The client id filled in last: the URL it makes is checked like every other endpoint.
        self.egress.check_url(&url).map_err(OAuthError::config)?;
        let secret = creds.client_secret.expose();

        let (method, auth, body) = match style {
            RevocationStyle::Rfc7009 => {
                let mut params = vec![("token", token_value), ("token_type_hint", hint.as_str())];
                let auth = client_auth(spec.client_auth, creds, &mut params);
                (Method::POST, auth, Body::Form(form(&params)))
            }
            RevocationStyle::FormWithClientCredentials => {
                let mut params = vec![
                    ("token", token_value),
                    ("client_id", creds.client_id.as_str()),
                ];
                if !secret.is_empty() {
                    params.push(("client_secret", secret));
                }
                (Method::POST, Auth::None, Body::Form(form(&params)))
            }
            RevocationStyle::QueryToken => {
                url.query_pairs_mut().append_pair("token", token_value);
                (Method::POST, Auth::None, Body::Empty)
            }
            RevocationStyle::JsonBody => {
                let mut params = vec![("token", token_value)];
                let auth = client_auth(ClientAuth::ClientSecretBasic, creds, &mut params);
                (Method::POST, auth, Body::Json(json(&params)))
            }
            RevocationStyle::Bearer => (Method::POST, Auth::Bearer(token_value), Body::Empty),
            RevocationStyle::GithubDelete => {
                let mut params = vec![("access_token", token_value)];
                let auth = client_auth(ClientAuth::ClientSecretBasic, creds, &mut params);
                (Method::DELETE, auth, Body::Json(json(&params)))
            }
            RevocationStyle::DeleteRefreshTokenPath => {
                if hint != TokenHint::RefreshToken {
                    return Err(OAuthError::config(
                        "this connector can revoke refresh tokens only (DELETE …/{refresh_token})",
                    ));
                }
                url.path_segments_mut()
                    .map_err(|()| OAuthError::config("the revocation URL cannot take a path"))?
                    .pop_if_empty()
                    .push(token_value);
                (Method::DELETE, Auth::None, Body::None)
            }
            RevocationStyle::None => return Ok(RevokeOutcome::NoEndpoint),
        };

        let basic = basic_credentials(&creds.client_id, secret);
        let secrets = [token_value, secret, &basic];
        let answer = self
            .send(method, url, auth, body)
            .await
            .map_err(|error| error.redacted(&secrets))?;
        let parsed = parse_body(answer.content_type.as_deref(), &answer.body);
        let slack_style_failure = matches!(&parsed, ParsedBody::Object(object)
            if object.get("ok") == Some(&Value::Bool(false)));
        if (200..300).contains(&answer.status) && !slack_style_failure {
            return Ok(RevokeOutcome::Revoked);
        }
        let error = classify_failure(
            answer.status,
            answer.content_type.as_deref(),
            &answer.body,
            &parsed,
            &spec.permanent_errors,
        );
        if let OAuthError::Provider { error, .. } = &error
            && ALREADY_INVALID
                .iter()
                .any(|code| code.eq_ignore_ascii_case(error))
        {
            return Ok(RevokeOutcome::AlreadyInvalid {
                error: error.clone(),
            });
        }
        Err(with_retry_after(error, answer.retry_after).redacted(&secrets))
    }

    async fn token_request(
        &self,
        spec: &OAuthSpec,
        endpoint_name: &str,
        endpoint: &str,
        creds: &ClientCredentials,
        mut params: Vec<(&str, &str)>,
        secrets: &[&str],
    ) -> Result<TokenSet, OAuthError> {
        let url = parse_endpoint(endpoint_name, endpoint)?;
        let basic = basic_credentials(&creds.client_id, creds.client_secret.expose());
        let secrets: Vec<&str> = secrets.iter().copied().chain([basic.as_str()]).collect();
        let secrets = secrets.as_slice();
        let auth = client_auth(spec.client_auth, creds, &mut params);
        let body = match spec.token_request_format {
            BodyFormat::Form => Body::Form(form(&params)),
            BodyFormat::Json => Body::Json(json(&params)),
        };
        let answer = self
            .send(Method::POST, url, auth, body)
            .await
            .map_err(|error| error.redacted(secrets))?;
        if answer.truncated && (200..300).contains(&answer.status) {
            return Err(OAuthError::Unparseable {
                status: answer.status,
                message: format!("the body is larger than {MAX_BODY_BYTES} bytes"),
                rotated: None,
            });
        }
        parse_token_response(
            answer.status,
            answer.content_type.as_deref(),
            &answer.body,
            spec,
        )
        .map_err(|error| with_retry_after(error, answer.retry_after).redacted(secrets))
    }

    async fn send(
        &self,
        method: Method,
        url: url::Url,
        auth: Auth<'_>,
        body: Body,
    ) -> Result<Answer, OAuthError> {
        // Only the host is logged: a revocation URL may carry the token in its query.
        let host = url.host_str().unwrap_or("").to_string();
        let started = Instant::now();
        let mut request = self
            .http
            .request(method.clone(), url)
            .timeout(self.timeout)
            .header(ACCEPT, "application/json")
            // Without it any coding may come (RFC 9110 §12.5.3), and this client decodes none.
            .header(reqwest::header::ACCEPT_ENCODING, "identity")
            .header(reqwest::header::USER_AGENT, USER_AGENT);
        match auth {
            Auth::None => {}
            Auth::Basic { client_id, secret } => {
                request = request.header(AUTHORIZATION, basic_auth(client_id, secret)?);
            }
            Auth::Bearer(token) => {
                let mut value =
                    HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                        OAuthError::config("the token has characters not allowed in a header")
                    })?;
                value.set_sensitive(true);
                request = request.header(AUTHORIZATION, value);
            }
        }
        request = match body {
            Body::None => request,
            Body::Empty => request.header(CONTENT_LENGTH, "0").body(""),
            Body::Form(text) => request
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(text),
            Body::Json(text) => request.header(CONTENT_TYPE, "application/json").body(text),
        };

        let mut response = request.send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        let header_text = |name| {
            response
                .headers()
                .get(name)
                .and_then(|value: &HeaderValue| value.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header_text(CONTENT_TYPE);
        let retry_after = header_text(RETRY_AFTER).and_then(|value| {
            parse_retry_after(&value, header_text(axum::http::header::DATE).as_deref())
        });
        let (body, truncated) = read_capped(&mut response, MAX_BODY_BYTES)
            .await
            .map_err(transport_error)?;
        tracing::debug!(
            %method,
            host,
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "authorization server answered"
        );
        Ok(Answer {
            status,
            content_type,
            retry_after,
            body,
            truncated,
        })
    }
}

/// Parses an endpoint URL; unfilled `{templates}` and non-HTTP schemes are configuration errors.
pub(crate) fn parse_endpoint(name: &str, text: &str) -> Result<url::Url, OAuthError> {
    if text.contains('{') || text.contains('}') {
        return Err(OAuthError::config(format!(
            "the {name} URL has an unfilled template ({{…}}): fill the connector's inputs"
        )));
    }
    let url = url::Url::parse(text.trim()).map_err(|error| {
        OAuthError::config(format!("the {name} URL is not a valid URL: {error}"))
    })?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(OAuthError::config(format!(
            "the {name} URL must be an http or https URL with a host"
        )));
    }
    Ok(url)
}

/// Parameters of a code's exchange the service sets itself: a connector's `tokenParams` may
/// not name them (`client_id` it may, as `{client_id}`: the client's id in the body too).
pub const TOKEN_RESERVED: &[&str] = &[
    "grant_type",
    "code",
    "redirect_uri",
    "code_verifier",
    "client_secret",
];

/// Parameters of a refresh the service sets itself (see [`TOKEN_RESERVED`]).
pub const REFRESH_RESERVED: &[&str] = &["grant_type", "refresh_token", "client_secret"];

/// Places the client's credentials per the connector: `client_secret_basic` in the
/// `Authorization` header, `client_secret_post` in the body (with `client_id`). A public client
/// (empty secret) sends only `client_id` in the body.
fn client_auth<'a>(
    method: ClientAuth,
    creds: &'a ClientCredentials,
    params: &mut Vec<(&'a str, &'a str)>,
) -> Auth<'a> {
    let secret = creds.client_secret.expose();
    // Once, should the connector's parameters have asked for it already.
    let id_in_body = |params: &mut Vec<(&'a str, &'a str)>| {
        if !params.iter().any(|(name, _)| *name == "client_id") {
            params.push(("client_id", &creds.client_id));
        }
    };
    if secret.is_empty() {
        id_in_body(params);
        return Auth::None;
    }
    match method {
        ClientAuth::ClientSecretBasic => Auth::Basic {
            client_id: &creds.client_id,
            secret,
        },
        ClientAuth::ClientSecretPost => {
            id_in_body(params);
            params.push(("client_secret", secret));
            Auth::None
        }
    }
}

/// An answer's body up to `limit` bytes, and whether there was more (not read: whoever answers
/// may send without end).
pub async fn read_capped(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// RFC 6749 §2.3.1: the client id and secret are form-urlencoded, then joined with `:` and
/// base64-encoded.
fn basic_auth(client_id: &str, secret: &str) -> Result<HeaderValue, OAuthError> {
    let mut value =
        HeaderValue::from_str(&format!("Basic {}", basic_credentials(client_id, secret)))
            .map_err(|_| OAuthError::config("the client credentials cannot be put in a header"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The base64 part of `Authorization: Basic`: also a secret, should a provider echo it.
/// Percent-encoded but for RFC 3986's unreserved characters and `*` (which form encoding
/// leaves too): what a form decoder reads back as given, as §2.3.1 asks, and what a server
/// that decodes nothing (many do not) still takes for the usual secrets (Microsoft's carry
/// `~`, which form encoding writes `%7E`).
fn basic_credentials(client_id: &str, secret: &str) -> String {
    const ENCODED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'*')
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    // A space as the form encoding writes it.
    let encode = |text: &str| {
        percent_encoding::utf8_percent_encode(text, ENCODED)
            .to_string()
            .replace("%20", "+")
    };
    STANDARD.encode(format!("{}:{}", encode(client_id), encode(secret)))
}

fn form(params: &[(&str, &str)]) -> String {
    let mut serializer = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in params {
        serializer.append_pair(name, value);
    }
    serializer.finish()
}

fn json(params: &[(&str, &str)]) -> String {
    let object: Map<String, Value> = params
        .iter()
        .map(|(name, value)| (name.to_string(), Value::String(value.to_string())))
        .collect();
    Value::Object(object).to_string()
}

fn with_retry_after(error: OAuthError, header: Option<u64>) -> OAuthError {
    match error {
        OAuthError::RateLimited {
            retry_after,
            message,
        } => OAuthError::RateLimited {
            retry_after: retry_after.or(header),
            message,
        },
        // A maintenance window announced with its length: waited out, not polled.
        OAuthError::Unavailable {
            status: 503,
            message,
            retry_after,
        } => OAuthError::Unavailable {
            status: 503,
            message,
            retry_after: retry_after.or(header),
        },
        other => other,
    }
}

/// `Retry-After` as seconds: a number of seconds, or an HTTP date. A date is counted from the
/// answer's own `Date` (`sent`: both on the provider's clock, RFC 9110 §10.2.3), or else from
/// [`crate::app::now_ms`]: a provider an hour ahead of this machine asking for a minute held
/// the instance back an hour, and one behind was asked again at once.
pub(crate) fn parse_retry_after(value: &str, sent: Option<&str>) -> Option<u64> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(seconds);
    }
    let http_date = |text: &str| {
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc2822)
            .ok()
    };
    let date = http_date(value)?;
    let from = sent.and_then(http_date).map_or_else(
        || crate::app::now_ms().div_euclid(1000),
        |sent| sent.unix_timestamp(),
    );
    Some((date.unix_timestamp() - from).max(0) as u64)
}

/// A transport failure in words, without the URL (a URL may hold a token). The proxy and the
/// event deliverer use it for their own calls.
pub fn transport_message(error: &reqwest::Error) -> String {
    match transport_error_ref(error) {
        OAuthError::Transport { message } => message,
        other => other.provider_message(),
    }
}

fn transport_error_ref(error: &reqwest::Error) -> OAuthError {
    let error = reqwest_error_without_url(error);
    transport_error_inner(&error)
}

fn reqwest_error_without_url(error: &reqwest::Error) -> String {
    let mut text = error_chain(error);
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "[url]");
    }
    // reqwest's own words before the cause say nothing the reader needs (and `[url]` puzzles):
    // "error sending request for url ([url]): … Connection refused" says "could not connect".
    for noise in [
        "error sending request for url ([url]): ",
        "error sending request: ",
    ] {
        if let Some(cause) = text.strip_prefix(noise) {
            text = format!("the request could not be sent: {cause}");
            break;
        }
    }
    text
}

fn transport_error_inner(description: &str) -> OAuthError {
    OAuthError::Transport {
        message: cut(description, MAX_ECHO_CHARS),
    }
}

/// A transport failure, described without the URL (a revocation URL may hold the token).
fn transport_error(error: reqwest::Error) -> OAuthError {
    let error = error.without_url();
    // A connection that timed out is one that failed: the request was never sent (its
    // outcome is known, see `OAuthError::outcome_unknown`).
    let kind = if error.is_connect() {
        super::error::CONNECTION_FAILED_TEXT
    } else if error.is_timeout() {
        "the request timed out"
    } else if error.is_body() || error.is_decode() {
        "reading the answer failed"
    } else {
        "the request failed"
    };
    OAuthError::Transport {
        message: cut(&format!("{kind}: {}", error_chain(&error)), MAX_ECHO_CHARS),
    }
}

/// An error and its sources, each said once.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        source = inner.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed connection reads as one, without reqwest's "error sending request for url
    /// ([url])" in front (webhook failures and the command line showed it).
    #[tokio::test]
    async fn a_refused_connection_is_said_plainly() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", closed.local_addr().unwrap());
        drop(closed);
        crate::app::install_crypto_provider();
        let error = reqwest::Client::new().get(&url).send().await.unwrap_err();
        let said = transport_message(&error);
        assert!(
            said.starts_with("the request could not be sent: "),
            "{said}"
        );
        assert!(
            !said.contains("error sending request") && !said.contains("[url]"),
            "{said}"
        );
    }

    #[test]
    fn basic_auth_form_encodes_before_base64() {
        let value = basic_auth("id with space", "s3cr:t/é").unwrap();
        assert!(value.is_sensitive());
        let encoded = value.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = String::from_utf8(STANDARD.decode(encoded).unwrap()).unwrap();
        assert_eq!(decoded, "id+with+space:s3cr%3At%2F%C3%A9");
        // RFC 3986's unreserved characters stay as they are: decoded or not, the same secret
        // (Microsoft's carry `~`).
        let value = basic_auth("a-b.c_d", "x8Q~y.z-_*").unwrap();
        let encoded = value.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = String::from_utf8(STANDARD.decode(encoded).unwrap()).unwrap();
        assert_eq!(decoded, "a-b.c_d:x8Q~y.z-_*");
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after(" 120 ", None), Some(120));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", None),
            Some(0)
        );
        let later = time::OffsetDateTime::now_utc() + time::Duration::seconds(90);
        let text = later
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap();
        let seconds = parse_retry_after(&text, None).unwrap();
        assert!((85..=90).contains(&seconds), "{seconds} from {text}");
        assert_eq!(parse_retry_after("soon", None), None);
        // A date counts from the answer's own `Date`, whatever this machine's clock says.
        assert_eq!(
            parse_retry_after(
                "Wed, 21 Oct 2015 07:29:00 GMT",
                Some("Wed, 21 Oct 2015 07:28:00 GMT")
            ),
            Some(60)
        );
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(parse_endpoint("token", "https://a.test/{tenant}/token").is_err());
        assert!(parse_endpoint("token", "ftp://a.test/token").is_err());
        assert!(parse_endpoint("token", "/token").is_err());
        assert!(parse_endpoint("token", " https://a.test/token ").is_ok());
    }
}
