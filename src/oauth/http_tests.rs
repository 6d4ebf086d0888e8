//! Request-shape tests: a small axum server on 127.0.0.1:0 imitates a third-party provider,
//! records what it receives, and answers from a script.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::test_support::spec;
use super::*;
use crate::catalog::{BodyFormat, ClientAuth, RevocationStyle};

#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    query: Option<String>,
    headers: HashMap<String, String>,
    body: String,
}

impl Received {
    fn form(&self) -> BTreeMap<String, String> {
        url::form_urlencoded::parse(self.body.as_bytes())
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The decoded `Authorization: Basic` credentials.
    fn basic(&self) -> Option<String> {
        let encoded = self.header("authorization")?.strip_prefix("Basic ")?;
        String::from_utf8(STANDARD.decode(encoded).ok()?).ok()
    }
}

#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

fn reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        headers: vec![("content-type", "application/json".to_string())],
        body: body.to_string(),
        delay: Duration::ZERO,
    }
}

const TOKENS: &str =
    r#"{"access_token":"at-new","refresh_token":"rt-new","token_type":"Bearer","expires_in":3600}"#;

#[derive(Clone, Default)]
struct Provider {
    received: Arc<Mutex<Vec<Received>>>,
    replies: Arc<Mutex<VecDeque<Reply>>>,
}

impl Provider {
    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn only(&self) -> Received {
        let received = self.received();
        assert_eq!(received.len(), 1, "{received:?}");
        received[0].clone()
    }
}

async fn answer(State(provider): State<Provider>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    provider.received.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let next = provider.replies.lock().unwrap().pop_front();
    let next = next.unwrap_or_else(|| reply(200, TOKENS));
    tokio::time::sleep(next.delay).await;
    let mut response = Response::builder().status(next.status);
    for (name, value) in &next.headers {
        response = response.header(*name, value);
    }
    response.body(Body::from(next.body)).unwrap()
}

/// Starts an imitation provider; returns its base URL (`http://127.0.0.1:port`).
async fn start(replies: Vec<Reply>) -> (String, Provider) {
    let provider = Provider::default();
    provider.replies.lock().unwrap().extend(replies);
    let app = Router::new().fallback(answer).with_state(provider.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{address}"), provider)
}

fn client() -> OAuthClient {
    let _ = rustls::crypto::ring::default_provider().install_default();
    OAuthClient::new(OAuthClient::build_http_client().unwrap())
}

fn endpoints(base: &str) -> Endpoints {
    Endpoints {
        authorization_url: format!("{base}/authorize"),
        token_url: format!("{base}/token"),
        refresh_url: format!("{base}/token"),
        revoke_url: Some(format!("{base}/revoke")),
    }
}

fn creds() -> ClientCredentials {
    ClientCredentials {
        client_id: "client 1".to_string(),
        client_secret: Secret::new("s3cret:/&"),
    }
}

fn assert_common_headers(received: &Received) {
    assert_eq!(received.header("accept"), Some("application/json"));
    // No compressed answer, which a client that names no coding would have to take
    // (RFC 9110 §12.5.3): a gzipped token response was unreadable, and its code spent.
    assert_eq!(received.header("accept-encoding"), Some("identity"));
    assert!(
        received
            .header("user-agent")
            .is_some_and(|ua| ua.starts_with("tokenwarden/")),
        "{received:?}"
    );
}

#[tokio::test]
async fn exchange_code_with_client_secret_post_and_pkce() {
    let (base, provider) = start(vec![]).await;
    let mut spec = spec();
    spec.client_auth = ClientAuth::ClientSecretPost;
    let tokens = client()
        .exchange_code(
            &spec,
            &endpoints(&base),
            &creds(),
            &Secret::new("the-code"),
            "https://app.test/cb",
            Some(&Secret::new("the-verifier")),
        )
        .await
        .unwrap();
    assert_eq!(tokens.access_token.expose(), "at-new");
    assert_eq!(tokens.refresh_token.unwrap().expose(), "rt-new");

    let received = provider.only();
    assert_eq!(
        (received.method.as_str(), received.path.as_str()),
        ("POST", "/token")
    );
    assert_common_headers(&received);
    assert_eq!(
        received.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(received.header("authorization"), None);
    let form = received.form();
    let expected: BTreeMap<String, String> = [
        ("grant_type", "authorization_code"),
        ("code", "the-code"),
        ("redirect_uri", "https://app.test/cb"),
        ("code_verifier", "the-verifier"),
        ("client_id", "client 1"),
        ("client_secret", "s3cret:/&"),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    assert_eq!(form, expected);
}

#[tokio::test]
async fn exchange_code_adds_the_connectors_token_params() {
    let (base, provider) = start(vec![]).await;
    let mut spec = spec();
    spec.token_params.insert("type".into(), "web_server".into());
    spec.token_params.insert("code".into(), "evil".into());
    client()
        .exchange_code(
            &spec,
            &endpoints(&base),
            &creds(),
            &Secret::new("the-code"),
            "https://app.test/cb",
            None,
        )
        .await
        .unwrap();
    let form = provider.only().form();
    assert_eq!(form["type"], "web_server");
    assert_eq!(
        form["code"], "the-code",
        "a parameter cannot replace the code"
    );
}

#[tokio::test]
async fn exchange_code_with_client_secret_basic() {
    let (base, provider) = start(vec![]).await;
    let mut spec = spec();
    spec.client_auth = ClientAuth::ClientSecretBasic;
    client()
        .exchange_code(
            &spec,
            &endpoints(&base),
            &creds(),
            &Secret::new("c"),
            "https://app.test/cb",
            None,
        )
        .await
        .unwrap();
    let received = provider.only();
    // RFC 6749 §2.3.1: form-urlencoded before base64.
    assert_eq!(
        received.basic().as_deref(),
        Some("client+1:s3cret%3A%2F%26")
    );
    let form = received.form();
    assert!(!form.contains_key("client_secret") && !form.contains_key("client_id"));
    assert!(!form.contains_key("code_verifier"));
    assert_eq!(form["grant_type"], "authorization_code");
}

/// A provider that wants Basic authentication and the client's id in the body too (the
/// connector's `refreshParams.client_id`, `{client_id}`): both go, the id once.
#[tokio::test]
async fn basic_authentication_with_the_client_id_in_the_body_too() {
    for client_auth in [ClientAuth::ClientSecretBasic, ClientAuth::ClientSecretPost] {
        let (base, provider) = start(vec![]).await;
        let mut spec = spec();
        spec.client_auth = client_auth;
        spec.refresh_params
            .insert("client_id".into(), "{client_id}".into());
        client()
            .refresh(&spec, &endpoints(&base), &creds(), &Secret::new("rt"))
            .await
            .unwrap();
        let received = provider.only();
        assert_eq!(
            received.basic().is_some(),
            client_auth == ClientAuth::ClientSecretBasic
        );
        assert_eq!(received.form()["client_id"], "client 1");
        assert_eq!(
            received.body.matches("client_id=").count(),
            1,
            "{client_auth:?}"
        );
    }
    // A definition stored before the check, with another value: nothing more goes, as then.
    let (base, provider) = start(vec![]).await;
    let mut spec = spec();
    spec.client_auth = ClientAuth::ClientSecretBasic;
    spec.refresh_params.insert("client_id".into(), "cid".into());
    client()
        .refresh(&spec, &endpoints(&base), &creds(), &Secret::new("rt"))
        .await
        .unwrap();
    assert!(!provider.only().form().contains_key("client_id"));
}

#[tokio::test]
async fn public_client_sends_only_its_id() {
    let (base, provider) = start(vec![]).await;
    let mut spec = spec();
    spec.client_auth = ClientAuth::ClientSecretBasic;
    let creds = ClientCredentials {
        client_id: "public".into(),
        client_secret: Secret::new(""),
    };
    client()
        .refresh(&spec, &endpoints(&base), &creds, &Secret::new("rt"))
        .await
        .unwrap();
    let received = provider.only();
    assert_eq!(received.header("authorization"), None);
    let form = received.form();
    assert_eq!(form["client_id"], "public");
    assert!(!form.contains_key("client_secret"));
}

#[tokio::test]
async fn refresh_posts_json_to_the_refresh_url_with_refresh_params() {
    let (base, provider) = start(vec![reply(
        200,
        r#"{"access_token":"at-2","expires_in":"3600","api_access_point":"https://api.na1.test/"}"#,
    )])
    .await;
    let mut spec = spec();
    spec.client_auth = ClientAuth::ClientSecretPost;
    spec.token_request_format = BodyFormat::Json;
    spec.refresh_params
        .insert("scope".into(), "offline_access User.Read".into());
    spec.refresh_params
        .insert("grant_type".into(), "evil".into());
    let mut endpoints = endpoints(&base);
    endpoints.refresh_url = format!("{base}/oauth/v2/refresh");
    let tokens = client()
        .refresh(&spec, &endpoints, &creds(), &Secret::new("rt-old"))
        .await
        .unwrap();
    assert!(tokens.refresh_token.is_none());
    assert_eq!(tokens.expires_in, Some(3600));
    assert_eq!(tokens.fields["api_access_point"], "https://api.na1.test/");

    let received = provider.only();
    assert_eq!(received.path, "/oauth/v2/refresh");
    assert_eq!(received.header("content-type"), Some("application/json"));
    assert_common_headers(&received);
    assert_eq!(
        received.json(),
        json!({
            "grant_type": "refresh_token",
            "refresh_token": "rt-old",
            "scope": "offline_access User.Read",
            "client_id": "client 1",
            "client_secret": "s3cret:/&",
        })
    );
}

#[tokio::test]
async fn refresh_without_token_is_a_config_error_and_sends_nothing() {
    let (base, provider) = start(vec![]).await;
    let error = client()
        .refresh(&spec(), &endpoints(&base), &creds(), &Secret::new(""))
        .await
        .unwrap_err();
    assert!(matches!(error, OAuthError::Config { .. }));
    assert!(provider.received().is_empty());
}

async fn revoke_with(
    style: Option<RevocationStyle>,
    client_auth: ClientAuth,
    revoke_path: &str,
    hint: TokenHint,
    replies: Vec<Reply>,
) -> (Result<RevokeOutcome, OAuthError>, Provider) {
    let (base, provider) = start(replies).await;
    let mut spec = spec();
    spec.revocation = style;
    spec.client_auth = client_auth;
    let mut endpoints = endpoints(&base);
    endpoints.revoke_url = Some(format!("{base}{revoke_path}"));
    let outcome = client()
        .revoke(&spec, &endpoints, &creds(), &Secret::new("tok/en 1"), hint)
        .await;
    (outcome, provider)
}

#[tokio::test]
async fn revoke_rfc7009_with_post_and_basic_auth() {
    for (style, auth) in [
        (None, ClientAuth::ClientSecretPost),
        (Some(RevocationStyle::Rfc7009), ClientAuth::ClientSecretPost),
        (
            Some(RevocationStyle::Rfc7009),
            ClientAuth::ClientSecretBasic,
        ),
    ] {
        let (outcome, provider) = revoke_with(
            style,
            auth,
            "/revoke",
            TokenHint::RefreshToken,
            vec![reply(200, "")],
        )
        .await;
        assert_eq!(outcome.unwrap(), RevokeOutcome::Revoked);
        let received = provider.only();
        assert_eq!(
            (received.method.as_str(), received.path.as_str()),
            ("POST", "/revoke")
        );
        assert_common_headers(&received);
        assert_eq!(
            received.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        let form = received.form();
        assert_eq!(form["token"], "tok/en 1");
        assert_eq!(form["token_type_hint"], "refresh_token");
        match auth {
            ClientAuth::ClientSecretPost => {
                assert_eq!(form["client_id"], "client 1");
                assert_eq!(form["client_secret"], "s3cret:/&");
                assert_eq!(received.header("authorization"), None);
            }
            ClientAuth::ClientSecretBasic => {
                assert!(!form.contains_key("client_secret"));
                assert_eq!(
                    received.basic().as_deref(),
                    Some("client+1:s3cret%3A%2F%26")
                );
            }
        }
    }
}

#[tokio::test]
async fn revoke_form_with_client_credentials() {
    let (outcome, provider) = revoke_with(
        Some(RevocationStyle::FormWithClientCredentials),
        ClientAuth::ClientSecretBasic,
        "/revoke",
        TokenHint::AccessToken,
        vec![reply(200, "")],
    )
    .await;
    assert_eq!(outcome.unwrap(), RevokeOutcome::Revoked);
    let received = provider.only();
    assert_eq!(received.method, "POST");
    assert_eq!(received.header("authorization"), None);
    let form = received.form();
    assert_eq!(form["token"], "tok/en 1");
    assert_eq!(form["client_id"], "client 1");
    assert_eq!(form["client_secret"], "s3cret:/&");
}

#[tokio::test]
async fn revoke_query_token() {
    let (outcome, provider) = revoke_with(
        Some(RevocationStyle::QueryToken),
        ClientAuth::ClientSecretPost,
        "/services/oauth2/revoke?x=1",
        TokenHint::RefreshToken,
        vec![reply(200, "")],
    )
    .await;
    assert_eq!(outcome.unwrap(), RevokeOutcome::Revoked);
    let received = provider.only();
    assert_eq!(
        (received.method.as_str(), received.path.as_str()),
        ("POST", "/services/oauth2/revoke")
    );
    assert_eq!(received.query.as_deref(), Some("x=1&token=tok%2Fen+1"));
    assert_eq!(received.body, "");
    assert_eq!(received.header("content-length"), Some("0"));
    assert_eq!(received.header("authorization"), None);
}

#[tokio::test]
async fn revoke_json_body_with_basic() {
    let (outcome, provider) = revoke_with(
        Some(RevocationStyle::JsonBody),
        ClientAuth::ClientSecretPost,
        "/v2/oauth2/tokens/revoke",
        TokenHint::RefreshToken,
        vec![reply(200, "")],
    )
    .await;
    assert_eq!(outcome.unwrap(), RevokeOutcome::Revoked);
    let received = provider.only();
    assert_eq!(received.method, "POST");
    assert_eq!(received.header("content-type"), Some("application/json"));
    assert_eq!(received.json(), json!({"token": "tok/en 1"}));
    assert_eq!(
        received.basic().as_deref(),
        Some("client+1:s3cret%3A%2F%26")
    );
}

#[tokio::test]
async fn revoke_bearer() {
    let (outcome, provider) = revoke_with(
        Some(RevocationStyle::Bearer),
        ClientAuth::ClientSecretPost,
        "/2/auth/token/revoke",
        TokenHint::AccessToken,
        vec![reply(200, "null")],
    )
    .await;
    assert_eq!(outcome.unwrap(), RevokeOutcome::Revoked);
    let received = provider.only();
    assert_eq!(received.method, "POST");
    assert_eq!(received.header("authorization"), Some("Bearer tok/en 1"));
    assert_eq!(received.body, "");
    assert_eq!(received.header("content-type"), None);
}

#[tokio::test]
async fn revoke_github_delete() {
    let (outcome, provider) = revoke_with(
        Some(RevocationStyle::GithubDelete),
        ClientAuth::ClientSecretPost,
        "/applications/{client_id}/token",
        TokenHint::AccessToken,
        vec![reply(204, "")],
    )
    .await;
    assert_eq!(outcome.unwrap(), RevokeOutcome::Revoked);
    let received = provider.only();
    assert_eq!(received.method, "DELETE");
    assert_eq!(received.path, "/applications/client+1/token");
    assert_eq!(received.json(), json!({"access_token": "tok/en 1"}));
    assert_eq!(
        received.basic().as_deref(),
        Some("client+1:s3cret%3A%2F%26")
    );
}

#[tokio::test]
async fn revoke_delete_refresh_token_path() {
    let (outcome, provider) = revoke_with(
        Some(RevocationStyle::DeleteRefreshTokenPath),
        ClientAuth::ClientSecretPost,
        "/oauth/v1/refresh-tokens/",
        TokenHint::RefreshToken,
        vec![reply(204, "")],
    )
    .await;
    assert_eq!(outcome.unwrap(), RevokeOutcome::Revoked);
    let received = provider.only();
    assert_eq!(received.method, "DELETE");
    assert_eq!(received.path, "/oauth/v1/refresh-tokens/tok%2Fen%201");
    assert_eq!(received.body, "");

    let (outcome, provider) = revoke_with(
        Some(RevocationStyle::DeleteRefreshTokenPath),
        ClientAuth::ClientSecretPost,
        "/oauth/v1/refresh-tokens",
        TokenHint::AccessToken,
        vec![],
    )
    .await;
    assert!(matches!(outcome, Err(OAuthError::Config { .. })));
    assert!(provider.received().is_empty());
}

#[tokio::test]
async fn revoke_without_endpoint() {
    let (base, provider) = start(vec![]).await;
    let mut spec = spec();
    let mut endpoints = endpoints(&base);
    endpoints.revoke_url = None;
    let outcome = client()
        .revoke(
            &spec,
            &endpoints,
            &creds(),
            &Secret::new("t"),
            TokenHint::AccessToken,
        )
        .await;
    assert_eq!(outcome.unwrap(), RevokeOutcome::NoEndpoint);
    spec.revocation = Some(RevocationStyle::None);
    endpoints.revoke_url = Some(format!("{base}/revoke"));
    let outcome = client()
        .revoke(
            &spec,
            &endpoints,
            &creds(),
            &Secret::new("t"),
            TokenHint::AccessToken,
        )
        .await;
    assert_eq!(outcome.unwrap(), RevokeOutcome::NoEndpoint);
    assert!(provider.received().is_empty());
}

#[tokio::test]
async fn revoke_of_a_dead_token_and_revoke_failures() {
    let (outcome, _) = revoke_with(
        None,
        ClientAuth::ClientSecretPost,
        "/revoke",
        TokenHint::RefreshToken,
        vec![reply(
            400,
            r#"{"error":"invalid_token","error_description":"bad"}"#,
        )],
    )
    .await;
    assert_eq!(
        outcome.unwrap(),
        RevokeOutcome::AlreadyInvalid {
            error: "invalid_token".into()
        }
    );
    let (outcome, _) = revoke_with(
        Some(RevocationStyle::Bearer),
        ClientAuth::ClientSecretPost,
        "/api/auth.revoke",
        TokenHint::AccessToken,
        vec![reply(200, r#"{"ok":false,"error":"invalid_auth"}"#)],
    )
    .await;
    assert!(matches!(outcome, Ok(RevokeOutcome::AlreadyInvalid { .. })));
    let (outcome, _) = revoke_with(
        None,
        ClientAuth::ClientSecretPost,
        "/revoke",
        TokenHint::RefreshToken,
        vec![reply(400, r#"{"error":"unsupported_token_type"}"#)],
    )
    .await;
    assert!(matches!(
        outcome,
        Err(OAuthError::Provider { status: 400, .. })
    ));
    let (outcome, _) = revoke_with(
        None,
        ClientAuth::ClientSecretPost,
        "/revoke",
        TokenHint::RefreshToken,
        vec![reply(503, "")],
    )
    .await;
    assert!(matches!(
        outcome,
        Err(OAuthError::Unavailable { status: 503, .. })
    ));
}

async fn refresh_against(replies: Vec<Reply>) -> OAuthError {
    refresh_within(Duration::from_secs(30), replies).await
}

/// A refresh with `timeout` for the whole request: short only where the timeout is the point
/// (a loaded machine must not turn the other cases' answers into timeouts).
async fn refresh_within(timeout: Duration, replies: Vec<Reply>) -> OAuthError {
    let (base, _) = start(replies).await;
    client()
        .with_timeout(timeout)
        .refresh(
            &spec(),
            &endpoints(&base),
            &creds(),
            &Secret::new("rt-secret-value"),
        )
        .await
        .unwrap_err()
}

#[tokio::test]
async fn refresh_failure_classes() {
    let error = refresh_against(vec![Reply {
        headers: vec![("content-type", "text/html".into())],
        ..reply(503, "<html><title>down</title></html>")
    }])
    .await;
    assert!(
        matches!(error, OAuthError::Unavailable { status: 503, .. }),
        "{error:?}"
    );
    assert!(!error.is_permanent());

    let error = refresh_against(vec![Reply {
        headers: vec![("retry-after", "30".into())],
        ..reply(429, r#"{"error":"rate_limited"}"#)
    }])
    .await;
    assert_eq!(error.retry_after(), Some(30));
    assert!(matches!(error, OAuthError::RateLimited { .. }));

    let error = refresh_against(vec![reply(
        200,
        r#"{"error":"bad_refresh_token","error_description":"The refresh token passed is incorrect or expired."}"#,
    )])
    .await;
    assert!(error.is_permanent());

    let error = refresh_against(vec![reply(403, r#"{"error":"invalid_grant"}"#)]).await;
    assert!(error.is_permanent());

    let error = refresh_against(vec![Reply {
        headers: vec![("content-type", "application/x-www-form-urlencoded".into())],
        ..reply(200, "error=bad_refresh_token&error_description=expired")
    }])
    .await;
    assert!(error.is_permanent());
}

#[tokio::test]
async fn echoed_secrets_are_redacted() {
    let error = refresh_against(vec![reply(
        400,
        r#"{"error":"invalid_grant","error_description":"refresh token rt-secret-value is unknown; client secret s3cret:/& rejected; you sent client_secret=s3cret%3A%2F%26"}"#,
    )])
    .await;
    let shown = format!("{error} {error:?} {}", error.provider_message());
    assert!(!shown.contains("rt-secret-value"), "{shown}");
    assert!(!shown.contains("s3cret:/&"), "{shown}");
    assert!(!shown.contains("s3cret%3A%2F%26"), "{shown}");
    assert!(error.is_permanent());
}

#[tokio::test]
async fn timeout_is_transport() {
    let error = refresh_within(
        Duration::from_secs(1),
        vec![Reply {
            delay: Duration::from_secs(30),
            ..reply(200, TOKENS)
        }],
    )
    .await;
    match &error {
        OAuthError::Transport { message } => assert!(message.contains("timed out"), "{message}"),
        other => panic!("expected Transport, got {other:?}"),
    }
    assert!(!error.is_permanent());
    assert!(error.outcome_unknown(), "sent: the provider may have acted");
}

#[tokio::test]
async fn connection_refused_is_transport_and_hides_the_url() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let base = format!("http://{address}");
    let error = client()
        .refresh(&spec(), &endpoints(&base), &creds(), &Secret::new("rt"))
        .await
        .unwrap_err();
    assert!(matches!(error, OAuthError::Transport { .. }), "{error:?}");
    assert!(!error.outcome_unknown(), "never sent: {error:?}");

    // A query-token revocation puts the token in the URL: it must not reach the message.
    let mut spec = spec();
    spec.revocation = Some(RevocationStyle::QueryToken);
    let error = client()
        .revoke(
            &spec,
            &endpoints(&base),
            &creds(),
            &Secret::new("very-secret-token"),
            TokenHint::AccessToken,
        )
        .await
        .unwrap_err();
    assert!(matches!(error, OAuthError::Transport { .. }));
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains("very-secret-token"), "{shown}");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let (base, provider) = start(vec![Reply {
        headers: vec![("location", "http://127.0.0.1:1/elsewhere".into())],
        ..reply(307, "")
    }])
    .await;
    let error = client()
        .refresh(&spec(), &endpoints(&base), &creds(), &Secret::new("rt"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, OAuthError::Unavailable { status: 307, .. }),
        "{error:?}"
    );
    assert_eq!(provider.received().len(), 1);
}

#[tokio::test]
async fn unfilled_template_is_config() {
    let (base, provider) = start(vec![]).await;
    let mut endpoints = endpoints(&base);
    endpoints.token_url = format!("{base}/{{tenant}}/token");
    let error = client()
        .exchange_code(
            &spec(),
            &endpoints,
            &creds(),
            &Secret::new("c"),
            "https://cb",
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(error, OAuthError::Config { .. }));
    assert!(provider.received().is_empty());
}
