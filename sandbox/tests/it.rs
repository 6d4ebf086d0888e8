//! Integration tests of the sandbox provider over real HTTP, one sandbox per test on port 0.
//!
//! Time-based behaviour is driven by the sandbox clock (`/__sandbox/clock`), never by sleeps,
//! except for the fault-delay test, which measures a real 300 ms hold.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use serde_json::{Value, json};
use tokenwarden_sandbox::{RunningSandbox, SandboxConfig, spawn};

const REDIRECT: &str = "http://localhost:8080/oauth/callback";

/// A profile's OAuth paths, as the service's catalog names them.
#[derive(Clone, Copy)]
struct P {
    key: &'static str,
    authorize: &'static str,
    token: &'static str,
    refresh: &'static str,
    revoke: &'static str,
    api: &'static str,
    scope: &'static str,
}

const ADOBE: P = P {
    key: "adobe-sign",
    authorize: "/adobe-sign/public/oauth/v2",
    token: "/adobe-sign/oauth/v2/token",
    refresh: "/adobe-sign/oauth/v2/refresh",
    revoke: "/adobe-sign/oauth/v2/revoke",
    api: "/adobe-sign/api/rest/v6/users/me",
    scope: "user_login:self agreement_read:account",
};
const SALESFORCE: P = P {
    key: "salesforce",
    authorize: "/salesforce/services/oauth2/authorize",
    token: "/salesforce/services/oauth2/token",
    refresh: "/salesforce/services/oauth2/token",
    revoke: "/salesforce/services/oauth2/revoke",
    api: "/salesforce/services/data/v59.0/chatter/users/me",
    scope: "api refresh_token",
};
const BOX: P = P {
    key: "box",
    authorize: "/box/api/oauth2/authorize",
    token: "/box/oauth2/token",
    refresh: "/box/oauth2/token",
    revoke: "/box/oauth2/revoke",
    api: "/box/2.0/users/me",
    scope: "",
};
const MICROSOFT: P = P {
    key: "microsoft",
    authorize: "/microsoft/common/oauth2/v2.0/authorize",
    token: "/microsoft/common/oauth2/v2.0/token",
    refresh: "/microsoft/common/oauth2/v2.0/token",
    revoke: "/microsoft/common/oauth2/v2.0/revoke",
    api: "/microsoft/v1.0/me",
    scope: "offline_access User.Read",
};
const GENERIC: P = P {
    key: "generic",
    authorize: "/generic/authorize",
    token: "/generic/token",
    refresh: "/generic/token",
    revoke: "/generic/revoke",
    api: "/generic/api/me",
    scope: "read write",
};
const ALL: [P; 5] = [ADOBE, SALESFORCE, BOX, MICROSOFT, GENERIC];

struct Ctx {
    sandbox: RunningSandbox,
    http: reqwest::Client,
}

/// Tokens from a completed code flow.
struct Tokens {
    at: String,
    rt: Option<String>,
    body: Value,
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    let enc = |s: &str| form(&[("x", s)]).trim_start_matches("x=").to_string();
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

async fn start() -> Ctx {
    start_with(SandboxConfig::default()).await
}

async fn start_with(config: SandboxConfig) -> Ctx {
    // reqwest is built without a TLS provider of its own; plain HTTP still needs one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sandbox = spawn("127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("sandbox binds");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    Ctx { sandbox, http }
}

impl Ctx {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.sandbox.url, path)
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.expect("GET")
    }

    async fn json(&self, method: reqwest::Method, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .request(method, self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn admin(&self, path: &str, body: Value) -> Value {
        let (status, v) = self.json(reqwest::Method::POST, path, body).await;
        assert_eq!(status, StatusCode::OK, "{path}: {v}");
        v
    }

    async fn settings(&self, p: P, body: Value) -> Value {
        let (status, v) = self
            .json(
                reqwest::Method::PUT,
                &format!("/__sandbox/profiles/{}", p.key),
                body,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    async fn advance(&self, seconds: u64) {
        self.admin("/__sandbox/clock", json!({"advanceSeconds": seconds}))
            .await;
    }

    /// GET authorize with `login_hint`, answering the redirect's query pairs.
    async fn authorize(
        &self,
        p: P,
        client_id: &str,
        extra: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let mut pairs = vec![
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", REDIRECT),
            ("state", "st-123 /+"),
            ("scope", p.scope),
            ("login_hint", "alice"),
        ];
        // Extra pairs replace the defaults: the sandbox refuses repeated parameters.
        pairs.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        pairs.extend_from_slice(extra);
        let r = self.get(&format!("{}?{}", p.authorize, form(&pairs))).await;
        assert_eq!(r.status(), StatusCode::FOUND, "{}", p.key);
        let location = r.headers()[LOCATION].to_str().expect("ascii").to_string();
        assert!(location.starts_with(REDIRECT), "{location}");
        url::Url::parse(&location)
            .expect("url")
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    async fn code(&self, p: P, client_id: &str, extra: &[(&str, &str)]) -> String {
        let pairs = self.authorize(p, client_id, extra).await;
        pairs
            .iter()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.clone())
            .expect("code in redirect")
    }

    async fn post_form(
        &self,
        path: &str,
        pairs: &[(&str, &str)],
        auth: Option<String>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(self.url(path))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form(pairs));
        if let Some(auth) = auth {
            req = req.header(AUTHORIZATION, auth);
        }
        req.send().await.expect("POST")
    }

    async fn token(&self, path: &str, pairs: &[(&str, &str)]) -> (StatusCode, Value) {
        let r = self.post_form(path, pairs, None).await;
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn exchange(&self, p: P, code: &str) -> (StatusCode, Value) {
        self.token(
            p.token,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
        )
        .await
    }

    async fn login(&self, p: P) -> Tokens {
        let code = self.code(p, "app", &[]).await;
        let (status, body) = self.exchange(p, &code).await;
        assert_eq!(status, StatusCode::OK, "{}: {body}", p.key);
        Tokens {
            at: body["access_token"]
                .as_str()
                .expect("access_token")
                .to_string(),
            rt: body["refresh_token"].as_str().map(str::to_string),
            body,
        }
    }

    async fn refresh(&self, p: P, rt: &str) -> (StatusCode, Value) {
        self.token(
            p.refresh,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", rt),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
        )
        .await
    }

    async fn api(&self, path: &str, at: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(at)
            .send()
            .await
            .expect("API")
    }

    async fn api_status(&self, path: &str, at: &str) -> StatusCode {
        self.api(path, at).await.status()
    }

    async fn stats(&self) -> Value {
        self.get("/__sandbox/stats")
            .await
            .json()
            .await
            .expect("stats")
    }
}

#[tokio::test]
async fn code_flow_works_on_every_profile_with_both_client_auth_methods() {
    let ctx = start().await;
    for p in ALL {
        // client_secret_post
        let pairs = ctx.authorize(p, "app", &[]).await;
        assert!(
            pairs.contains(&("state".to_string(), "st-123 /+".to_string())),
            "{}",
            p.key
        );
        let tokens = ctx.login(p).await;
        assert!(tokens.at.len() >= 32, "{}", tokens.at);
        let me = ctx.api(&format!("/{}/api/me", p.key), &tokens.at).await;
        assert_eq!(me.status(), StatusCode::OK);
        let me: Value = me.json().await.expect("json");
        assert_eq!(me["user"], "alice");
        assert_eq!(me["profile"], p.key);
        assert_eq!(me["clientId"], "app");
        assert_eq!(me["scope"], p.scope);
        assert_eq!(
            ctx.api_status(p.api, &tokens.at).await,
            StatusCode::OK,
            "{}",
            p.key
        );

        // client_secret_basic, with characters that need form-encoding; refused by the
        // providers that take credentials in the body only.
        let code = ctx.code(p, "basic app", &[]).await;
        let r = ctx
            .post_form(
                p.token,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", REDIRECT),
                ],
                Some(basic("basic app", "p@ss:word")),
            )
            .await;
        if BODY_ONLY.contains(&p.key) {
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{}", p.key);
            let body: Value = r.json().await.expect("json");
            assert_eq!(body["error"], "invalid_client", "{}", p.key);
            continue;
        }
        assert_eq!(r.status(), StatusCode::OK, "{}", p.key);
        let body: Value = r.json().await.expect("json");
        assert!(body["access_token"].is_string());
    }
}

/// Profiles whose providers take client credentials in the body only (PROVIDERS.md).
const BODY_ONLY: [&str; 3] = ["adobe-sign", "salesforce", "box"];

#[tokio::test]
async fn token_and_api_shapes_imitate_each_provider() {
    let ctx = start().await;
    let base = ctx.sandbox.url.clone();

    let pairs = ctx.authorize(ADOBE, "app", &[]).await;
    let access_point = format!("{base}/adobe-sign/");
    assert!(pairs.contains(&("api_access_point".into(), access_point.clone())));
    assert!(pairs.contains(&("web_access_point".into(), access_point.clone())));
    let adobe = ctx.login(ADOBE).await;
    assert_eq!(adobe.body["api_access_point"], access_point);
    assert_eq!(adobe.body["web_access_point"], access_point);
    assert_eq!(adobe.body["expires_in"], 3600);
    let me: Value = ctx
        .api(ADOBE.api, &adobe.at)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(me["email"], "alice@example.com");

    let sf = ctx.login(SALESFORCE).await;
    assert!(sf.body.get("expires_in").is_none());
    assert_eq!(sf.body["instance_url"], format!("{base}/salesforce"));
    assert_eq!(sf.body["token_type"], "Bearer");
    let id = sf.body["id"].as_str().expect("id");
    assert!(id.starts_with(&format!("{base}/salesforce/id/00D")), "{id}");
    assert!(id.rsplit('/').next().expect("user").starts_with("005"));
    assert!(
        sf.body["issued_at"]
            .as_str()
            .expect("string")
            .parse::<u64>()
            .is_ok()
    );
    assert!(sf.body["signature"].is_string());
    let id_path = id.trim_start_matches(&base).to_string();
    assert_eq!(ctx.api_status(&id_path, &sf.at).await, StatusCode::OK);
    assert_eq!(
        ctx.api_status("/salesforce/services/data/v59.0/sobjects", &sf.at)
            .await,
        StatusCode::OK
    );

    let bx = ctx.login(BOX).await;
    assert_eq!(bx.body["token_type"], "bearer");
    let me: Value = ctx.api(BOX.api, &bx.at).await.json().await.expect("json");
    assert_eq!(me["type"], "user");
    assert_eq!(me["name"], "alice");

    let ms = ctx.login(MICROSOFT).await;
    assert_eq!(ms.body["scope"], "User.Read");
    assert!(ms.rt.is_some());
    let me: Value = ctx
        .api(MICROSOFT.api, &ms.at)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(me["displayName"], "alice");
    assert_eq!(me["userPrincipalName"], "alice@example.com");
    // Any tenant works.
    let code = ctx
        .code(
            P {
                authorize: "/microsoft/contoso.onmicrosoft.com/oauth2/v2.0/authorize",
                ..MICROSOFT
            },
            "app",
            &[],
        )
        .await;
    let (status, _) = ctx
        .exchange(
            P {
                token: "/microsoft/organizations/oauth2/v2.0/token",
                ..MICROSOFT
            },
            &code,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let generic = ctx.login(GENERIC).await;
    assert_eq!(generic.body["scope"], "read write");
    assert_eq!(generic.body["token_type"], "Bearer");
}

#[tokio::test]
async fn codes_are_single_use_short_lived_and_bound() {
    let ctx = start().await;
    let code = ctx.code(GENERIC, "app", &[]).await;
    let (status, first) = ctx.exchange(GENERIC, &code).await;
    assert_eq!(status, StatusCode::OK);
    let at = first["access_token"].as_str().unwrap();
    assert_eq!(ctx.api_status("/generic/api/me", at).await, StatusCode::OK);
    let (status, body) = ctx.exchange(GENERIC, &code).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_grant");
    // A code presented twice may have been stolen: the tokens it gave are revoked (RFC 6749
    // §4.1.2).
    assert_eq!(
        ctx.api_status("/generic/api/me", at).await,
        StatusCode::UNAUTHORIZED
    );
    let rt = first["refresh_token"].as_str().unwrap();
    assert_eq!(ctx.refresh(GENERIC, rt).await.1["error"], "invalid_grant");
    // A code whose first exchange failed is gone all the same, without a grant to revoke.
    let code = ctx.code(GENERIC, "app", &[]).await;
    let (status, _) = ctx
        .token(
            "/generic/token",
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", "https://elsewhere.test/cb"),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        ctx.exchange(GENERIC, &code).await.0,
        StatusCode::BAD_REQUEST
    );

    // Adobe codes live 5 minutes.
    let code = ctx.code(ADOBE, "app", &[]).await;
    ctx.advance(301).await;
    let (status, body) = ctx.exchange(ADOBE, &code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    let code = ctx.code(ADOBE, "app", &[]).await;
    ctx.advance(290).await;
    assert_eq!(ctx.exchange(ADOBE, &code).await.0, StatusCode::OK);

    // Another redirect URI, another client, or another profile's token endpoint fail.
    let code = ctx.code(GENERIC, "app", &[]).await;
    let (status, body) = ctx
        .token(
            GENERIC.token,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", "http://localhost:8080/other"),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    let code = ctx.code(GENERIC, "app", &[]).await;
    let (status, body) = ctx
        .token(
            GENERIC.token,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("client_id", "other-app"),
                ("client_secret", "x"),
            ],
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    let code = ctx.code(GENERIC, "app", &[]).await;
    assert_eq!(ctx.exchange(BOX, &code).await.1["error"], "invalid_grant");
    // Box's codes live 30 seconds.
    let code = ctx.code(BOX, "app", &[]).await;
    ctx.advance(31).await;
    assert_eq!(ctx.exchange(BOX, &code).await.1["error"], "invalid_grant");
}

/// The S256 code challenge of a PKCE verifier (RFC 7636 §4.2).
fn s256_challenge(verifier: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier))
}

#[tokio::test]
async fn pkce_is_checked_when_a_challenge_was_sent() {
    let ctx = start().await;
    let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    let challenge = s256_challenge(verifier);
    let s256 = [
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let exchange = |code: String, verifier: Option<&'static str>| {
        let ctx = &ctx;
        async move {
            let mut pairs = vec![
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", REDIRECT),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ];
            if let Some(v) = verifier {
                pairs.push(("code_verifier", v));
            }
            ctx.token(GENERIC.token, &pairs).await
        }
    };
    let code = ctx.code(GENERIC, "app", &s256).await;
    assert_eq!(exchange(code, Some(verifier)).await.0, StatusCode::OK);
    let code = ctx.code(GENERIC, "app", &s256).await;
    let (status, body) = exchange(code, Some("wrong-verifier-wrong-verifier-wrong-verifier")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    let code = ctx.code(GENERIC, "app", &s256).await;
    assert_eq!(exchange(code, None).await.1["error"], "invalid_grant");
    let code = ctx.code(GENERIC, "app", &[]).await;
    assert_eq!(
        exchange(code, Some(verifier)).await.1["error"],
        "invalid_grant"
    );
    let code = ctx
        .code(
            GENERIC,
            "app",
            &[
                (
                    "code_challenge",
                    "plain-verifier-0123456789-0123456789-012345",
                ),
                ("code_challenge_method", "plain"),
            ],
        )
        .await;
    assert_eq!(
        exchange(code, Some("plain-verifier-0123456789-0123456789-012345"))
            .await
            .0,
        StatusCode::OK
    );
}

/// A public client (RFC 6749 §2.1: no secret) at the generic profile: its id and PKCE for the
/// code, its id alone for the refresh. Without PKCE it is refused, and a confidential client's
/// grant is never refreshed without the secret.
#[tokio::test]
async fn public_clients_use_pkce_and_their_id_alone() {
    let ctx = start().await;
    let verifier = "public-client-verifier-0123456789-0123456789";
    let challenge = s256_challenge(verifier);
    let s256 = [
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let code = ctx.code(GENERIC, "spa", &s256).await;
    let (status, body) = ctx
        .token(
            GENERIC.token,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("client_id", "spa"),
                ("code_verifier", verifier),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rt = body["refresh_token"].as_str().expect("rt");
    let (status, body) = ctx
        .token(
            GENERIC.token,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", rt),
                ("client_id", "spa"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Its revocation names it too: another client's name does not revoke its tokens.
    let at = body["access_token"].as_str().expect("at");
    let r = ctx
        .post_form(
            GENERIC.revoke,
            &[("token", at), ("client_id", "other")],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(ctx.api_status("/generic/api/me", at).await, StatusCode::OK);
    let r = ctx
        .post_form(GENERIC.revoke, &[("token", at), ("client_id", "spa")], None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ctx.api_status("/generic/api/me", at).await,
        StatusCode::UNAUTHORIZED
    );

    // No PKCE, no secret: refused, and the code is still good for the client with its secret.
    let code = ctx.code(GENERIC, "app", &[]).await;
    let (status, body) = ctx
        .token(
            GENERIC.token,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("client_id", "app"),
            ],
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client")),
        "{body}"
    );
    let (status, body) = ctx.exchange(GENERIC, &code).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rt = body["refresh_token"].as_str().expect("rt");
    let (status, body) = ctx
        .token(
            GENERIC.token,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", rt),
                ("client_id", "app"),
            ],
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client")),
        "{body}"
    );
}

#[tokio::test]
async fn consent_page_and_authorize_errors() {
    let ctx = start().await;
    let query = form(&[
        ("response_type", "code"),
        ("client_id", "app"),
        ("redirect_uri", REDIRECT),
        ("state", "xyz<\">"),
        ("scope", "read"),
    ]);
    let r = ctx.get(&format!("/generic/authorize?{query}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()[CONTENT_TYPE]
            .to_str()
            .expect("ascii")
            .starts_with("text/html")
    );
    let html = r.text().await.expect("text");
    assert!(
        html.contains("<form method=\"post\" action=\"/generic/authorize\">"),
        "{html}"
    );
    assert!(html.contains("name=\"login_hint\""));
    assert!(html.contains("Approve"));
    assert!(
        html.contains("xyz&lt;&quot;&gt;"),
        "state is escaped: {html}"
    );

    // The form posts back the hidden fields plus the user name.
    let r = ctx
        .post_form(
            "/generic/authorize",
            &[
                ("response_type", "code"),
                ("client_id", "app"),
                ("redirect_uri", REDIRECT),
                ("state", "xyz<\">"),
                ("scope", "read"),
                ("login_hint", "bob"),
                ("decision", "approve"),
            ],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::FOUND);
    let location = url::Url::parse(r.headers()[LOCATION].to_str().expect("ascii")).expect("url");
    let pairs: Vec<(String, String)> = location
        .query_pairs()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    assert!(pairs.contains(&("state".into(), "xyz<\">".into())));
    let code = pairs
        .iter()
        .find(|(k, _)| k == "code")
        .expect("code")
        .1
        .clone();
    let (status, body) = ctx.exchange(GENERIC, &code).await;
    assert_eq!(status, StatusCode::OK);
    let me: Value = ctx
        .api(
            "/generic/api/me",
            body["access_token"].as_str().expect("at"),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(me["user"], "bob");

    let r = ctx
        .post_form(
            "/generic/authorize",
            &[
                ("response_type", "code"),
                ("client_id", "app"),
                ("redirect_uri", REDIRECT),
                ("decision", "deny"),
            ],
            None,
        )
        .await;
    assert!(
        r.headers()[LOCATION]
            .to_str()
            .expect("ascii")
            .contains("error=access_denied")
    );

    // No client_id or redirect_uri: a 400 page, never a redirect.
    for q in [
        form(&[("response_type", "code"), ("redirect_uri", REDIRECT)]),
        form(&[("response_type", "code"), ("client_id", "app")]),
        form(&[
            ("response_type", "code"),
            ("client_id", "app"),
            ("redirect_uri", "not a url"),
        ]),
    ] {
        let r = ctx
            .get(&format!("/generic/authorize?{q}&login_hint=alice"))
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(r.headers().get(LOCATION).is_none());
    }
    // Bad response_type: an error redirect with the state.
    for (rt, error) in [
        (None, "invalid_request"),
        (Some("token"), "unsupported_response_type"),
    ] {
        let mut pairs = vec![
            ("client_id", "app"),
            ("redirect_uri", REDIRECT),
            ("state", "s1"),
            ("login_hint", "alice"),
        ];
        if let Some(rt) = rt {
            pairs.push(("response_type", rt));
        }
        let r = ctx
            .get(&format!("/generic/authorize?{}", form(&pairs)))
            .await;
        assert_eq!(r.status(), StatusCode::FOUND);
        let location = r.headers()[LOCATION].to_str().expect("ascii").to_string();
        assert!(
            location.contains(&format!("error={error}")) && location.contains("state=s1"),
            "{location}"
        );
    }
}

#[tokio::test]
async fn refresh_without_rotation_keeps_the_token_and_its_idle_window_slides() {
    let ctx = start().await;
    // Adobe: refresh at its own endpoint only; no RT in the answer; 60-day sliding idle limit.
    let adobe = ctx.login(ADOBE).await;
    let rt = adobe.rt.clone().expect("rt");
    let (status, body) = ctx
        .token(
            ADOBE.token,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &rt),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unsupported_grant_type"))
    );
    for _ in 0..3 {
        ctx.advance(59 * 86_400).await;
        let (status, body) = ctx.refresh(ADOBE, &rt).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.get("refresh_token").is_none());
        assert!(body["api_access_point"].is_string());
        assert_eq!(
            ctx.api_status(ADOBE.api, body["access_token"].as_str().expect("at"))
                .await,
            StatusCode::OK
        );
    }
    ctx.advance(61 * 86_400).await;
    let (status, body) = ctx.refresh(ADOBE, &rt).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );

    // Generic: the same RT comes back and works forever.
    let generic = ctx.login(GENERIC).await;
    let rt = generic.rt.expect("rt");
    ctx.advance(400 * 86_400).await;
    let (status, body) = ctx.refresh(GENERIC, &rt).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["refresh_token"], rt.as_str());

    // Salesforce: no RT and no expires_in on refresh; the old AT still works.
    let sf = ctx.login(SALESFORCE).await;
    let (status, body) = ctx.refresh(SALESFORCE, sf.rt.as_deref().expect("rt")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("refresh_token").is_none() && body.get("expires_in").is_none());
    assert_eq!(ctx.api_status(SALESFORCE.api, &sf.at).await, StatusCode::OK);

    // Absolute limit: not extended by use.
    ctx.settings(GENERIC, json!({"refreshTokenAbsoluteTtlSeconds": 1000}))
        .await;
    let generic = ctx.login(GENERIC).await;
    let rt = generic.rt.expect("rt");
    ctx.advance(600).await;
    assert_eq!(ctx.refresh(GENERIC, &rt).await.0, StatusCode::OK);
    ctx.advance(500).await;
    assert_eq!(ctx.refresh(GENERIC, &rt).await.1["error"], "invalid_grant");
}

#[tokio::test]
async fn box_refresh_tokens_are_single_use() {
    let ctx = start().await;
    let bx = ctx.login(BOX).await;
    let rt1 = bx.rt.expect("rt");
    let (status, body) = ctx.refresh(BOX, &rt1).await;
    assert_eq!(status, StatusCode::OK);
    let rt2 = body["refresh_token"].as_str().expect("new rt").to_string();
    assert_ne!(rt1, rt2);
    let (status, body) = ctx.refresh(BOX, &rt1).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"error": "invalid_grant", "error_description": "Refresh token has expired"})
    );
    // Without revokeGrantOnReuse the successor still works; idle 60 days kills it.
    assert_eq!(ctx.refresh(BOX, &rt2).await.0, StatusCode::OK);
    let rt3 = ctx.login(BOX).await.rt.expect("rt");
    ctx.advance(60 * 86_400).await;
    assert_eq!(ctx.refresh(BOX, &rt3).await.1["error"], "invalid_grant");
}

#[tokio::test]
async fn rotation_grace_and_reuse_detection() {
    let ctx = start().await;
    ctx.settings(
        GENERIC,
        json!({"rotateRefreshTokens": true, "refreshReuseGraceSeconds": 60, "revokeGrantOnReuse": true}),
    )
    .await;
    let tokens = ctx.login(GENERIC).await;
    let rt1 = tokens.rt.expect("rt");
    let (_, first) = ctx.refresh(GENERIC, &rt1).await;
    let rt2 = first["refresh_token"].as_str().expect("rt2").to_string();
    // Within the grace, the used token mints a fresh pair; the first successor stays valid.
    ctx.advance(30).await;
    let (status, retry) = ctx.refresh(GENERIC, &rt1).await;
    assert_eq!(status, StatusCode::OK);
    let rt3 = retry["refresh_token"].as_str().expect("rt3").to_string();
    assert_ne!(rt3, rt2);
    // Outside the grace, reuse kills the whole grant.
    ctx.advance(31).await;
    let (status, body) = ctx.refresh(GENERIC, &rt1).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    assert_eq!(ctx.refresh(GENERIC, &rt2).await.1["error"], "invalid_grant");
    assert_eq!(ctx.refresh(GENERIC, &rt3).await.1["error"], "invalid_grant");
    let at = first["access_token"].as_str().expect("at");
    assert_eq!(
        ctx.api_status("/generic/api/me", at).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ctx.api_status("/generic/api/me", &tokens.at).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn microsoft_keeps_old_refresh_tokens_and_needs_offline_access() {
    let ctx = start().await;
    let ms = ctx.login(MICROSOFT).await;
    let rt1 = ms.rt.expect("rt");
    let (status, body) = ctx.refresh(MICROSOFT, &rt1).await;
    assert_eq!(status, StatusCode::OK);
    let rt2 = body["refresh_token"].as_str().expect("rt2").to_string();
    assert_ne!(rt1, rt2);
    assert_eq!(ctx.refresh(MICROSOFT, &rt1).await.0, StatusCode::OK);
    assert_eq!(ctx.refresh(MICROSOFT, &rt2).await.0, StatusCode::OK);

    // Strict rotation asked for: the old token stops working (it silently stayed valid).
    ctx.settings(MICROSOFT, json!({"rotateRefreshTokens": true}))
        .await;
    let strict = ctx.login(MICROSOFT).await.rt.expect("rt");
    assert_eq!(ctx.refresh(MICROSOFT, &strict).await.0, StatusCode::OK);
    assert_eq!(
        ctx.refresh(MICROSOFT, &strict).await.0,
        StatusCode::BAD_REQUEST
    );
    ctx.settings(
        MICROSOFT,
        json!({"rotateRefreshTokens": false, "oldRefreshTokenStaysValid": true}),
    )
    .await;

    // Salesforce gives a refresh token only for the `refresh_token` (or `offline_access`)
    // scope.
    let code = ctx.code(SALESFORCE, "app", &[("scope", "api")]).await;
    let (status, body) = ctx.exchange(SALESFORCE, &code).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("refresh_token").is_none(), "{body}");
    let code = ctx
        .code(SALESFORCE, "app", &[("scope", "api offline_access")])
        .await;
    assert!(ctx.exchange(SALESFORCE, &code).await.1["refresh_token"].is_string());

    // Without offline_access: no refresh token.
    let code = ctx.code(MICROSOFT, "app", &[("scope", "User.Read")]).await;
    let (status, body) = ctx.exchange(MICROSOFT, &code).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("refresh_token").is_none(), "{body}");

    // 90 days idle: AADSTS700082.
    ctx.advance(91 * 86_400).await;
    let (status, body) = ctx.refresh(MICROSOFT, &rt2).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["error_codes"], json!([700082]));
    assert!(
        body["error_description"]
            .as_str()
            .expect("text")
            .starts_with("AADSTS700082:")
    );
    for field in ["timestamp", "trace_id", "correlation_id"] {
        assert!(body[field].is_string(), "{field}");
    }
    // Revoked: AADSTS50173.
    let ms = ctx.login(MICROSOFT).await;
    ctx.admin("/__sandbox/users/alice/revoke", json!({})).await;
    let (_, body) = ctx.refresh(MICROSOFT, ms.rt.as_deref().expect("rt")).await;
    assert_eq!(body["error_codes"], json!([50173]));
}

/// Revoking a user's sign-in sessions at Microsoft kills refresh tokens; the access tokens
/// already issued (JWTs) work until they expire. Turned off, the grant's tokens die together.
#[tokio::test]
async fn microsoft_revocation_spares_issued_access_tokens() {
    let ctx = start().await;
    let ms = login_as(&ctx, MICROSOFT, "spared").await;
    ctx.admin("/__sandbox/users/spared/revoke", json!({})).await;
    let (status, body) = ctx.refresh(MICROSOFT, ms.rt.as_deref().expect("rt")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error_codes"], json!([50173]));
    assert_eq!(ctx.api_status(MICROSOFT.api, &ms.at).await, StatusCode::OK);
    ctx.advance(3601).await;
    assert_eq!(
        ctx.api_status(MICROSOFT.api, &ms.at).await,
        StatusCode::UNAUTHORIZED
    );

    ctx.settings(MICROSOFT, json!({"revocationSparesAccessTokens": false}))
        .await;
    let strict = login_as(&ctx, MICROSOFT, "unspared").await;
    ctx.admin("/__sandbox/users/unspared/revoke", json!({}))
        .await;
    assert_eq!(
        ctx.api_status(MICROSOFT.api, &strict.at).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn adobe_revoke_cascades_and_reports_like_adobe() {
    let ctx = start().await;
    let adobe = ctx.login(ADOBE).await;
    let rt = adobe.rt.clone().expect("rt");
    let r = ctx
        .post_form(ADOBE.revoke, &[("token", &adobe.at)], None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.expect("body").is_empty());
    let r = ctx.api(ADOBE.api, &adobe.at).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"code": "INVALID_ACCESS_TOKEN", "message": "Access token provided is invalid or has expired"})
    );
    // Revoking the AT revoked its RT too.
    assert_eq!(ctx.refresh(ADOBE, &rt).await.1["error"], "invalid_grant");
    // The article's refresh path, `/oauth/refresh`, refreshes too.
    let legacy = ctx.login(ADOBE).await;
    let legacy_path = P {
        refresh: "/adobe-sign/oauth/refresh",
        ..ADOBE
    };
    let (status, body) = ctx
        .refresh(legacy_path, legacy.rt.as_deref().expect("rt"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["access_token"].is_string(), "{body}");
    // The article's path, `/oauth/revoke?token=`, revokes too.
    let other = ctx.login(ADOBE).await;
    let r = ctx
        .http
        .post(ctx.url(&format!("/adobe-sign/oauth/revoke?token={}", other.at)))
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ctx.api(ADOBE.api, &other.at).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let adobe_error = |r: reqwest::Response| async move {
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        r.json::<Value>().await.expect("json")["code"]
            .as_str()
            .expect("code")
            .to_string()
    };
    assert_eq!(
        adobe_error(
            ctx.post_form(ADOBE.revoke, &[("token", &adobe.at)], None)
                .await
        )
        .await,
        "EXPIRED_TOKEN"
    );
    assert_eq!(
        adobe_error(ctx.post_form(ADOBE.revoke, &[("token", &rt)], None).await).await,
        "EXPIRED_TOKEN"
    );
    assert_eq!(
        adobe_error(ctx.post_form(ADOBE.revoke, &[], None).await).await,
        "INVALID_REQUEST"
    );
    assert_eq!(
        adobe_error(ctx.post_form(ADOBE.revoke, &[("token", "")], None).await).await,
        "INVALID_REQUEST"
    );
    assert_eq!(
        adobe_error(
            ctx.post_form(ADOBE.revoke, &[("token", "nope")], None)
                .await
        )
        .await,
        "INVALID_TOKEN"
    );

    // Revoking the RT, given in the query string, kills its access tokens.
    let adobe = ctx.login(ADOBE).await;
    let r = ctx
        .http
        .post(ctx.url(&format!(
            "{}?{}",
            ADOBE.revoke,
            form(&[("token", adobe.rt.as_deref().expect("rt"))])
        )))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ctx.api_status(ADOBE.api, &adobe.at).await,
        StatusCode::UNAUTHORIZED
    );

    // An expired access token is EXPIRED_TOKEN too.
    let adobe = ctx.login(ADOBE).await;
    ctx.advance(3600).await;
    assert_eq!(
        adobe_error(
            ctx.post_form(ADOBE.revoke, &[("token", &adobe.at)], None)
                .await
        )
        .await,
        "EXPIRED_TOKEN"
    );
}

#[tokio::test]
async fn salesforce_box_and_generic_revocation() {
    let ctx = start().await;
    // Salesforce: an AT alone; an RT with its ATs.
    let sf = ctx.login(SALESFORCE).await;
    let rt = sf.rt.clone().expect("rt");
    assert_eq!(
        ctx.post_form(SALESFORCE.revoke, &[("token", &sf.at)], None)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        ctx.api_status(SALESFORCE.api, &sf.at).await,
        StatusCode::UNAUTHORIZED
    );
    let (status, body) = ctx.refresh(SALESFORCE, &rt).await;
    assert_eq!(status, StatusCode::OK);
    let at2 = body["access_token"].as_str().expect("at").to_string();
    // As the Cloud Elements article sends it: the token in the query, a JSON content type,
    // no body.
    let r = ctx
        .http
        .post(ctx.url(&format!("{}?token={rt}", SALESFORCE.revoke)))
        .header("content-type", "application/json")
        .header("cache-control", "no-cache")
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ctx.api_status(SALESFORCE.api, &at2).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ctx.refresh(SALESFORCE, &rt).await.1,
        json!({"error": "invalid_grant", "error_description": "expired access/refresh token"})
    );
    let r = ctx
        .post_form(SALESFORCE.revoke, &[("token", "bogus")], None)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"],
        "invalid_token"
    );
    let r = ctx.post_form(SALESFORCE.revoke, &[], None).await;
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"],
        "unsupported_token_type"
    );

    // Box: client credentials required; either token kills the grant.
    let bx = ctx.login(BOX).await;
    let rt = bx.rt.clone().expect("rt");
    let r = ctx.post_form(BOX.revoke, &[("token", &rt)], None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = ctx
        .post_form(
            BOX.revoke,
            &[
                ("client_id", "app"),
                ("client_secret", "s3cret"),
                ("token", &rt),
            ],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.expect("body").is_empty());
    assert_eq!(
        ctx.api_status(BOX.api, &bx.at).await,
        StatusCode::UNAUTHORIZED
    );

    // Generic: RFC 7009.
    let g = ctx.login(GENERIC).await;
    let r = ctx
        .post_form(
            GENERIC.revoke,
            &[("token", "unknown"), ("token_type_hint", "access_token")],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = ctx.post_form(GENERIC.revoke, &[], None).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"],
        "invalid_request"
    );
    assert_eq!(
        ctx.post_form(GENERIC.revoke, &[("token", &g.at)], None)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        ctx.api_status("/generic/api/me", &g.at).await,
        StatusCode::UNAUTHORIZED
    );
    let rt = g.rt.expect("rt");
    let (_, body) = ctx.refresh(GENERIC, &rt).await;
    let at2 = body["access_token"].as_str().expect("at").to_string();
    // Another client cannot revoke it (RFC 7009 §2.1: the token must be the client's).
    let r = ctx
        .post_form(
            GENERIC.revoke,
            &[("token", &rt)],
            Some(basic("other-app", "s3cret")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"],
        "unauthorized_client"
    );
    assert_eq!(
        ctx.api_status("/generic/api/me", &at2).await,
        StatusCode::OK
    );
    let r = ctx
        .post_form(
            GENERIC.revoke,
            &[("token", &rt), ("token_type_hint", "refresh_token")],
            Some(basic("app", "s3cret")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ctx.api_status("/generic/api/me", &at2).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(ctx.refresh(GENERIC, &rt).await.1["error"], "invalid_grant");

    // Microsoft's stand-in revoke: the refresh token's grant dies, its access tokens (JWTs)
    // live until they expire.
    let ms = ctx.login(MICROSOFT).await;
    let r = ctx
        .post_form(
            MICROSOFT.revoke,
            &[("token", ms.rt.as_deref().expect("rt"))],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ctx.refresh(MICROSOFT, ms.rt.as_deref().expect("rt"))
            .await
            .1["error"],
        "invalid_grant"
    );
    assert_eq!(ctx.api_status(MICROSOFT.api, &ms.at).await, StatusCode::OK);
    // Revoked itself after its grant, the access token dies.
    let r = ctx
        .post_form(MICROSOFT.revoke, &[("token", &ms.at)], None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ctx.api_status(MICROSOFT.api, &ms.at).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn user_revocation_kills_every_grant_of_the_user() {
    let ctx = start().await;
    let mut logged_in = Vec::new();
    for p in ALL {
        logged_in.push((p, ctx.login(p).await));
    }
    let bob_code = ctx.code(GENERIC, "app", &[("login_hint", "bob")]).await;
    let (_, bob) = ctx.exchange(GENERIC, &bob_code).await;
    let body = ctx.admin("/__sandbox/users/alice/revoke", json!({})).await;
    assert_eq!(body["revokedGrants"], 5);
    for (p, tokens) in &logged_in {
        // Microsoft's access tokens live until they expire.
        let expected = if p.key == "microsoft" {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(
            ctx.api_status(p.api, &tokens.at).await,
            expected,
            "{}",
            p.key
        );
        if let Some(rt) = &tokens.rt {
            assert_eq!(
                ctx.refresh(*p, rt).await.1["error"],
                "invalid_grant",
                "{}",
                p.key
            );
        }
    }
    assert_eq!(
        ctx.api_status("/generic/api/me", bob["access_token"].as_str().expect("at"))
            .await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn api_rejections_have_each_providers_shape() {
    let ctx = start().await;
    let mut tokens = Vec::new();
    for p in ALL {
        tokens.push(ctx.login(p).await.at);
    }
    ctx.advance(7200).await;
    for (p, at) in ALL.iter().zip(&tokens) {
        let r = ctx.api(p.api, at).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{}", p.key);
        let www = r
            .headers()
            .get(WWW_AUTHENTICATE)
            .map(|v| v.to_str().expect("ascii").to_string());
        let text = r.text().await.expect("body");
        match p.key {
            "adobe-sign" => assert!(text.contains("INVALID_ACCESS_TOKEN")),
            "salesforce" => assert_eq!(
                serde_json::from_str::<Value>(&text).expect("json"),
                json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])
            ),
            "box" => {
                assert!(text.is_empty());
                assert_eq!(
                    www.as_deref(),
                    Some(
                        "Bearer realm=\"Service\", error=\"invalid_token\", error_description=\"The access token provided is invalid.\""
                    )
                );
            }
            "microsoft" => {
                let v: Value = serde_json::from_str(&text).expect("json");
                assert_eq!(v["error"]["code"], "InvalidAuthenticationToken");
                assert_eq!(
                    v["error"]["message"],
                    "Access token has expired or is not yet valid."
                );
                assert!(v["error"]["innerError"]["request-id"].is_string());
            }
            _ => {
                let v: Value = serde_json::from_str(&text).expect("json");
                assert_eq!(v["error"], "invalid_token");
                assert!(www.expect("challenge").contains("error=\"invalid_token\""));
            }
        }
    }
    // Salesforce access tokens live 2 hours, the others 1 hour.
    let sf = ctx.login(SALESFORCE).await;
    ctx.advance(3700).await;
    assert_eq!(ctx.api_status(SALESFORCE.api, &sf.at).await, StatusCode::OK);
    // No token at all, and an unknown one.
    assert_eq!(
        ctx.get("/generic/api/me").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ctx.api_status("/box/2.0/users/me", "nope").await,
        StatusCode::UNAUTHORIZED
    );
    // A token of one profile is unknown at another.
    let g = ctx.login(GENERIC).await;
    assert_eq!(
        ctx.api_status("/box/api/me", &g.at).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn echo_reports_the_request() {
    let ctx = start().await;
    let g = ctx.login(GENERIC).await;
    let r = ctx
        .http
        .put(ctx.url("/generic/api/echo/sub/path?a=1&b=two"))
        .bearer_auth(&g.at)
        .header("X-Custom", "yes")
        .body("hello body")
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/generic/api/echo/sub/path");
    assert_eq!(v["query"], "a=1&b=two");
    assert_eq!(v["headers"]["x-custom"], "yes");
    assert!(v["headers"].get("authorization").is_none());
    assert_eq!(v["body"], "hello body");
    let r = ctx
        .http
        .post(ctx.url("/box/api/echo"))
        .bearer_auth("bad")
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn faults_fail_delay_and_queue() {
    let ctx = start().await;
    let g = ctx.login(GENERIC).await;
    let rt = g.rt.clone().expect("rt");
    ctx.admin(
        "/__sandbox/faults",
        json!({"target": "token", "status": 503, "count": 2}),
    )
    .await;
    ctx.admin(
        "/__sandbox/faults",
        json!({"target": "token", "status": 429}),
    )
    .await;
    for expected in [503, 503] {
        let (status, body) = ctx.refresh(GENERIC, &rt).await;
        assert_eq!(status.as_u16(), expected);
        assert_eq!(body["error"], "temporarily_unavailable");
    }
    let r = ctx
        .post_form(
            ADOBE.refresh,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", "x"),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
            None,
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "adobe refresh counts as token"
    );
    assert_eq!(r.headers()[RETRY_AFTER], "1");
    // A token answer, failed or not, is not to be cached (RFC 6749 §5.1).
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["pragma"], "no-cache");
    let r = ctx
        .post_form(
            GENERIC.token,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &rt),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["pragma"], "no-cache");

    // API and revoke targets, any profile.
    ctx.admin("/__sandbox/faults", json!({"target": "api", "status": 500}))
        .await;
    assert_eq!(
        ctx.api_status("/generic/api/me", &g.at).await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        ctx.api_status("/generic/api/me", &g.at).await,
        StatusCode::OK
    );
    ctx.admin(
        "/__sandbox/faults",
        json!({"target": "revoke", "status": 502, "count": 1}),
    )
    .await;
    assert_eq!(
        ctx.post_form(ADOBE.revoke, &[("token", "x")], None)
            .await
            .status(),
        StatusCode::BAD_GATEWAY
    );

    // A delay only slows the call down; a delay with a status holds then fails.
    ctx.admin(
        "/__sandbox/faults",
        json!({"target": "api", "status": 0, "delayMs": 300}),
    )
    .await;
    let started = Instant::now();
    assert_eq!(
        ctx.api_status("/generic/api/me", &g.at).await,
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(290));
    ctx.admin(
        "/__sandbox/faults",
        json!({"target": "api", "status": 503, "delayMs": 200}),
    )
    .await;
    let started = Instant::now();
    assert_eq!(
        ctx.api_status("/generic/api/me", &g.at).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(started.elapsed() >= Duration::from_millis(190));

    // DELETE clears; bad fault requests are refused.
    ctx.admin(
        "/__sandbox/faults",
        json!({"target": "api", "status": 503, "count": 5}),
    )
    .await;
    let r = ctx
        .http
        .delete(ctx.url("/__sandbox/faults"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ctx.api_status("/generic/api/me", &g.at).await,
        StatusCode::OK
    );
    for bad in [
        json!({"target": "nowhere", "status": 503}),
        json!({"target": "api", "status": 200}),
        json!({"target": "api", "status": "503"}),
        json!({"target": "api", "status": 503, "count": 0}),
    ] {
        assert_eq!(
            ctx.json(reqwest::Method::POST, "/__sandbox/faults", bad)
                .await
                .0,
            StatusCode::BAD_REQUEST
        );
    }
}

#[tokio::test]
async fn stats_count_and_reset_starts_over() {
    let ctx = start().await;
    let g = ctx.login(GENERIC).await;
    let rt = g.rt.clone().expect("rt");
    ctx.refresh(GENERIC, &rt).await;
    ctx.refresh(GENERIC, "unknown").await;
    ctx.admin(
        "/__sandbox/faults",
        json!({"target": "token", "status": 503}),
    )
    .await;
    ctx.refresh(GENERIC, &rt).await;
    ctx.api_status("/generic/api/me", &g.at).await;
    ctx.api_status("/generic/api/me", "bad").await;
    ctx.post_form(GENERIC.revoke, &[("token", "unknown")], None)
        .await;
    let stats = ctx.stats().await;
    assert_eq!(
        stats["token"],
        json!({"authorization_code": 1, "refresh_token": 1})
    );
    assert_eq!(stats["tokenErrors"], 2);
    assert_eq!(stats["revoke"], 1);
    assert_eq!(stats["api"], json!({"ok": 1, "unauthorized": 1}));

    ctx.settings(GENERIC, json!({"accessTokenTtlSeconds": 5}))
        .await;
    ctx.advance(1000).await;
    ctx.admin("/__sandbox/faults", json!({"target": "api", "status": 503}))
        .await;
    ctx.admin("/__sandbox/reset", json!({})).await;
    let stats = ctx.stats().await;
    assert_eq!(
        stats["token"],
        json!({"authorization_code": 0, "refresh_token": 0})
    );
    assert_eq!(stats["api"], json!({"ok": 0, "unauthorized": 0}));
    // Counting from zero does not end the connections a service holds, nor turn their clock
    // back (a revoked or used token would come alive again).
    let offset = || async {
        ctx.get("/__sandbox/clock")
            .await
            .json::<Value>()
            .await
            .expect("json")["offsetSeconds"]
            .clone()
    };
    assert_eq!(offset().await, 1000);
    let (status, body) = ctx.refresh(GENERIC, &rt).await;
    assert_eq!(status, StatusCode::OK, "grants stay: {body}");
    let rt = body["refresh_token"]
        .as_str()
        .map_or(rt.clone(), str::to_string);
    assert_eq!(ctx.stats().await["token"]["refresh_token"], 1);
    // Unless asked to forget them too.
    ctx.admin("/__sandbox/faults", json!({"target": "api", "status": 503}))
        .await;
    ctx.admin("/__sandbox/reset", json!({"grants": true})).await;
    assert_eq!(
        ctx.refresh(GENERIC, &rt).await.1["error"],
        "invalid_grant",
        "grants are gone"
    );
    assert_eq!(offset().await, 0);
    let settings: Value = ctx
        .get("/__sandbox/profiles/generic")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(settings["accessTokenTtlSeconds"], 3600);
    let g = ctx.login(GENERIC).await;
    assert_eq!(
        ctx.api_status("/generic/api/me", &g.at).await,
        StatusCode::OK,
        "faults are gone"
    );
}

#[tokio::test]
async fn bad_token_requests_answer_oauth_errors() {
    let ctx = start().await;
    let code = ctx.code(GENERIC, "app", &[]).await;
    ctx.exchange(GENERIC, &code).await; // remembers app:s3cret
    type Case<'a> = (Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![
                ("grant_type", "password"),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
            400,
            "unsupported_grant_type",
        ),
        (
            vec![("client_id", "app"), ("client_secret", "s3cret")],
            400,
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", "authorization_code"),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
            400,
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", "refresh_token"),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
            400,
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", "x"),
                ("client_id", "app"),
                ("client_secret", "other"),
            ],
            // Any secret is accepted without `--client`: the unknown token is what is refused.
            400,
            "invalid_grant",
        ),
        (
            // A client id alone is a public client (RFC 6749 §2.1): the unknown token is what
            // is refused.
            vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", "x"),
                ("client_id", "app"),
            ],
            400,
            "invalid_grant",
        ),
        (
            vec![("grant_type", "refresh_token"), ("refresh_token", "x")],
            401,
            "invalid_client",
        ),
        (
            vec![
                ("grant_type", "refresh_token"),
                ("grant_type", "refresh_token"),
            ],
            400,
            "invalid_request",
        ),
    ];
    for (pairs, status, error) in cases {
        let (got, body) = ctx.token(GENERIC.token, &pairs).await;
        assert_eq!(
            (got.as_u16(), body["error"].as_str()),
            (status, Some(error)),
            "{pairs:?}: {body}"
        );
        assert!(body["error_description"].is_string());
    }
    // Wrong content type, garbage bodies, bad Basic header, and both methods at once.
    let r = ctx
        .http
        .post(ctx.url(GENERIC.token))
        .json(&json!({"grant_type": "refresh_token"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"],
        "invalid_request"
    );
    let r = ctx
        .http
        .post(ctx.url(GENERIC.token))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(vec![0xff, 0xfe, b'=', b'&', b'%', b'z'])
        .send()
        .await
        .expect("POST");
    assert!(r.status().is_client_error());
    assert!(r.json::<Value>().await.expect("json")["error"].is_string());
    let r = ctx
        .post_form(
            GENERIC.token,
            &[("grant_type", "refresh_token")],
            Some("Basic %%%".into()),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key(WWW_AUTHENTICATE));
    let r = ctx
        .post_form(
            GENERIC.token,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", "x"),
                ("client_secret", "s3cret"),
            ],
            Some(basic("app", "s3cret")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Box and Salesforce word their invalid_grant like the real ones.
    let (_, body) = ctx.refresh(BOX, "unknown").await;
    assert_eq!(body["error_description"], "Refresh token has expired");
    let (_, body) = ctx.refresh(SALESFORCE, "unknown").await;
    assert_eq!(body["error_description"], "expired access/refresh token");
}

#[tokio::test]
async fn profile_settings_change_answers() {
    let ctx = start().await;
    let settings: Value = ctx
        .get("/__sandbox/profiles/box")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(settings["rotateRefreshTokens"], true);
    assert_eq!(settings["refreshTokenIdleTtlSeconds"], 5_184_000);
    let updated = ctx
        .settings(
            GENERIC,
            json!({"expiresInAsString": true, "invalidGrantStatus": 403, "accessTokenTtlSeconds": 60}),
        )
        .await;
    assert_eq!(updated["expiresInAsString"], true);
    assert_eq!(
        updated["rotateRefreshTokens"], false,
        "the full settings come back"
    );
    let g = ctx.login(GENERIC).await;
    assert_eq!(g.body["expires_in"], "60");
    ctx.advance(61).await;
    assert_eq!(
        ctx.api_status("/generic/api/me", &g.at).await,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = ctx.refresh(GENERIC, "unknown").await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    ctx.settings(
        GENERIC,
        json!({"errorsWithHttp200": true, "tokenResponseFormat": "form"}),
    )
    .await;
    let r = ctx
        .post_form(
            GENERIC.refresh,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", "x"),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()[CONTENT_TYPE],
        "application/x-www-form-urlencoded"
    );
    assert!(
        r.text()
            .await
            .expect("text")
            .contains("error=invalid_grant")
    );
    let r = ctx
        .post_form(
            GENERIC.refresh,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", g.rt.as_deref().expect("rt")),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
            None,
        )
        .await;
    let text = r.text().await.expect("text");
    assert!(
        text.contains("access_token=gen_at_") && text.contains("expires_in=60"),
        "{text}"
    );

    // Client authentication methods can be restricted.
    ctx.settings(GENERIC, json!({"clientAuthMethods": ["client_secret_basic"], "errorsWithHttp200": false, "tokenResponseFormat": "json"})).await;
    let (status, body) = ctx.refresh(GENERIC, g.rt.as_deref().expect("rt")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client"))
    );
    let r = ctx
        .post_form(
            GENERIC.refresh,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", g.rt.as_deref().expect("rt")),
            ],
            Some(basic("app", "s3cret")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    // Errors of the control endpoint.
    let put = |path: &'static str, body: Value| ctx.json(reqwest::Method::PUT, path, body);
    assert_eq!(
        put("/__sandbox/profiles/github", json!({})).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        put(
            "/__sandbox/profiles/generic",
            json!({"accessTokenTtlSeconds": "x"})
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        put(
            "/__sandbox/profiles/generic",
            json!({"accessTokenTtlSeconds": -1})
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        put("/__sandbox/profiles/generic", json!({"noSuchSetting": 1}))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        put(
            "/__sandbox/profiles/generic",
            json!({"clientAuthMethods": []})
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
    let r = ctx
        .http
        .put(ctx.url("/__sandbox/profiles/generic"))
        .body("{not json")
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        ctx.get("/__sandbox/profiles/github").await.status(),
        StatusCode::NOT_FOUND
    );
    let (status, _) = ctx
        .json(
            reqwest::Method::POST,
            "/__sandbox/clock",
            json!({"advanceSeconds": -5}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A century in one step, and not a second more in all: repeated centuries saturated the
    // clock, and every code was expired when issued.
    let century = 3_153_600_000_u64;
    let advance = |seconds: u64| {
        ctx.json(
            reqwest::Method::POST,
            "/__sandbox/clock",
            json!({"advanceSeconds": seconds}),
        )
    };
    let (status, _) = ctx
        .json(
            reqwest::Method::POST,
            "/__sandbox/reset",
            json!({"grants": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(advance(century - 10).await.0, StatusCode::OK);
    assert_eq!(advance(century).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(advance(5).await.0, StatusCode::OK);
}

#[tokio::test]
async fn fixed_client_restricts_who_may_authenticate() {
    let ctx = start_with(SandboxConfig {
        client: Some(("only".into(), "pw".into())),
        public_url: None,
    })
    .await;
    let q = form(&[
        ("response_type", "code"),
        ("client_id", "app"),
        ("redirect_uri", REDIRECT),
        ("login_hint", "alice"),
    ]);
    assert_eq!(
        ctx.get(&format!("/generic/authorize?{q}")).await.status(),
        StatusCode::BAD_REQUEST
    );
    let code = ctx.code(GENERIC, "only", &[]).await;
    let c = &ctx;
    let pairs = |secret: &'static str| {
        let code = code.clone();
        async move {
            c.token(
                GENERIC.token,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", REDIRECT),
                    ("client_id", "only"),
                    ("client_secret", secret),
                ],
            )
            .await
        }
    };
    let (status, body) = pairs("wrong").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client"))
    );
    let (status, tokens) = pairs("pw").await;
    assert_eq!(status, StatusCode::OK);
    // Revocation asks for the client too: nobody else may end its grants.
    let at = tokens["access_token"].as_str().expect("at");
    let r = ctx.post_form(GENERIC.revoke, &[("token", at)], None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(ctx.api_status("/generic/api/me", at).await, StatusCode::OK);
    // A token that authenticates the call itself (`Authorization: Bearer`, no body) is enough.
    let second = ctx.code(GENERIC, "only", &[]).await;
    let (_, other) = ctx
        .token(
            GENERIC.token,
            &[
                ("grant_type", "authorization_code"),
                ("code", &second),
                ("redirect_uri", REDIRECT),
                ("client_id", "only"),
                ("client_secret", "pw"),
            ],
        )
        .await;
    let bearer = other["access_token"].as_str().expect("at");
    let r = ctx
        .post_form(GENERIC.revoke, &[], Some(format!("Bearer {bearer}")))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ctx.api_status("/generic/api/me", bearer).await,
        StatusCode::UNAUTHORIZED
    );
    let r = ctx
        .post_form(GENERIC.revoke, &[("token", at)], Some(basic("only", "pw")))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ctx.api_status("/generic/api/me", at).await,
        StatusCode::UNAUTHORIZED
    );
    ctx.sandbox.shutdown().await;
}

#[tokio::test]
async fn metadata_documents_name_every_endpoint() {
    let ctx = start_with(SandboxConfig {
        client: None,
        public_url: Some("https://sandbox.example/".into()),
    })
    .await;
    let base = "https://sandbox.example";
    for p in ALL {
        let r = ctx
            .get(&format!(
                "/{}/.well-known/oauth-authorization-server",
                p.key
            ))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let doc: Value = r.json().await.expect("json");
        assert_eq!(doc["issuer"], format!("{base}/{}", p.key));
        assert_eq!(
            doc["authorization_endpoint"],
            format!("{base}{}", p.authorize)
        );
        assert_eq!(doc["token_endpoint"], format!("{base}{}", p.token));
        assert_eq!(doc["revocation_endpoint"], format!("{base}{}", p.revoke));
        assert_eq!(
            doc["code_challenge_methods_supported"],
            json!(["S256", "plain"])
        );
        assert_eq!(
            doc["grant_types_supported"],
            json!(["authorization_code", "refresh_token"])
        );
        let methods = if BODY_ONLY.contains(&p.key) {
            json!(["client_secret_post"])
        } else if p.key == "generic" {
            // And public clients.
            json!(["client_secret_post", "client_secret_basic", "none"])
        } else {
            json!(["client_secret_post", "client_secret_basic"])
        };
        assert_eq!(
            doc["token_endpoint_auth_methods_supported"], methods,
            "{}",
            p.key
        );
        assert_eq!(doc.get("refresh_endpoint").is_some(), p.key == "adobe-sign");
    }
    let doc: Value = ctx
        .get("/adobe-sign/.well-known/oauth-authorization-server")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(doc["refresh_endpoint"], format!("{base}{}", ADOBE.refresh));
    // The public URL is also the one in routing fields.
    assert_eq!(
        ctx.login(ADOBE).await.body["api_access_point"],
        format!("{base}/adobe-sign/")
    );
    let r = ctx.get("/nowhere").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.json::<Value>().await.expect("json")["error"].is_string());
    ctx.sandbox.shutdown().await;
}

// ----- quirk settings of issue #7 ---------------------------------------------------------

async fn login_as(ctx: &Ctx, p: P, user: &str) -> Tokens {
    let code = ctx.code(p, "app", &[("login_hint", user)]).await;
    let (status, body) = ctx.exchange(p, &code).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    Tokens {
        at: body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string(),
        rt: body["refresh_token"].as_str().map(str::to_string),
        body,
    }
}

#[tokio::test]
async fn grant_caps_evict_the_oldest_grant_of_the_user() {
    let ctx = start().await;
    assert_eq!(
        ctx.get("/__sandbox/profiles/salesforce")
            .await
            .json::<Value>()
            .await
            .expect("json")["maxGrantsPerUser"],
        5
    );
    ctx.settings(GENERIC, json!({"maxGrantsPerUser": 2})).await;
    let first = login_as(&ctx, GENERIC, "alice").await;
    let second = login_as(&ctx, GENERIC, "alice").await;
    let bob = login_as(&ctx, GENERIC, "bob").await;
    let third = login_as(&ctx, GENERIC, "alice").await;
    assert_eq!(
        ctx.api_status(GENERIC.api, &first.at).await,
        StatusCode::UNAUTHORIZED
    );
    let (status, body) = ctx.refresh(GENERIC, first.rt.as_deref().expect("rt")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_grant");
    for live in [&second, &third, &bob] {
        assert_eq!(ctx.api_status(GENERIC.api, &live.at).await, StatusCode::OK);
    }
}

#[tokio::test]
async fn routing_data_in_the_token_response_or_the_redirect() {
    let ctx = start().await;
    let (status, body) = ctx
        .json(
            reqwest::Method::PUT,
            "/__sandbox/profiles/box",
            json!({"routingField": "instance_url"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "generic only: {body}");
    let (status, _) = ctx
        .json(
            reqwest::Method::PUT,
            "/__sandbox/profiles/generic",
            json!({"routingField": "bad name!"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    ctx.settings(GENERIC, json!({"routingField": "instance_url"}))
        .await;
    let alice = ctx.login(GENERIC).await;
    let base = alice.body["instance_url"]
        .as_str()
        .expect("instance_url")
        .to_string();
    assert!(base.starts_with(&ctx.url("/generic/tenants/t-")), "{base}");
    let own = ctx
        .api(
            &format!("{}api/me", base.trim_start_matches(&ctx.sandbox.url)),
            &alice.at,
        )
        .await;
    assert_eq!(own.status(), StatusCode::OK);
    let me: Value = own.json().await.expect("json");
    assert!(base.contains(me["tenant"].as_str().expect("tenant")));
    assert_eq!(
        ctx.api_status("/generic/tenants/t-000000000000/api/me", &alice.at)
            .await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        ctx.api_status("/generic/tenants/t-000000000000/api/echo/x", "nope")
            .await,
        StatusCode::UNAUTHORIZED
    );

    ctx.settings(
        GENERIC,
        json!({"routingField": "realmId", "routingLocation": "redirect", "routingValue": "tenantId"}),
    )
    .await;
    let pairs = ctx.authorize(GENERIC, "app", &[]).await;
    let realm = pairs
        .iter()
        .find(|(k, _)| k == "realmId")
        .map(|(_, v)| v.clone());
    assert_eq!(
        realm.as_deref(),
        Some(me["tenant"].as_str().expect("tenant"))
    );
    let tokens = ctx.login(GENERIC).await;
    assert!(tokens.body.get("realmId").is_none(), "{}", tokens.body);
}

#[tokio::test]
async fn refresh_variants_separate_endpoint_scope_and_json_bodies() {
    let ctx = start().await;
    assert_eq!(
        ctx.post_form("/generic/refresh", &[], None).await.status(),
        StatusCode::NOT_FOUND
    );
    ctx.settings(GENERIC, json!({"separateRefreshEndpoint": true}))
        .await;
    let meta: Value = ctx
        .get("/generic/.well-known/oauth-authorization-server")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(meta["refresh_endpoint"], ctx.url("/generic/refresh"));
    let tokens = ctx.login(GENERIC).await;
    let rt = tokens.rt.clone().expect("rt");
    let (status, body) = ctx.refresh(GENERIC, &rt).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "unsupported_grant_type");
    let separate = P {
        refresh: "/generic/refresh",
        ..GENERIC
    };
    let (status, body) = ctx.refresh(separate, &rt).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    ctx.settings(
        GENERIC,
        json!({"separateRefreshEndpoint": false, "requireScopeOnRefresh": true}),
    )
    .await;
    let (status, body) = ctx.refresh(GENERIC, &rt).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_request");
    let mut pairs = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", rt.as_str()),
        ("client_id", "app"),
        ("client_secret", "s3cret"),
        ("scope", "read"),
    ];
    let (status, body) = ctx.token(GENERIC.token, &pairs).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["scope"], "read");
    // The narrower scope is the new access token's (RFC 6749 §6), not the grant's.
    let narrow = body["access_token"].as_str().expect("at");
    let me: Value = ctx
        .api("/generic/api/me", narrow)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(me["scope"], "read", "{me}");

    // JSON bodies: refused by default, accepted, then required.
    pairs.truncate(4);
    let as_json: serde_json::Map<String, Value> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let post_json = |body: Value| ctx.http.post(ctx.url(GENERIC.token)).json(&body).send();
    ctx.settings(GENERIC, json!({"requireScopeOnRefresh": false}))
        .await;
    let r = post_json(Value::Object(as_json.clone()))
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    ctx.settings(GENERIC, json!({"acceptJsonBodies": true}))
        .await;
    let r = post_json(Value::Object(as_json.clone()))
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::OK);
    let (status, _) = ctx.token(GENERIC.token, &pairs).await;
    assert_eq!(status, StatusCode::OK, "forms still work");
    let r = post_json(json!({"grant_type": ["refresh_token"]}))
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "nested values refused");
    ctx.settings(GENERIC, json!({"requireJsonBodies": true}))
        .await;
    let (status, body) = ctx.token(GENERIC.token, &pairs).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error_description"]
            .as_str()
            .expect("text")
            .contains("JSON")
    );
    let r = post_json(Value::Object(as_json)).await.expect("POST");
    assert_eq!(r.status(), StatusCode::OK);
    // A JSON revocation (QuickBooks) works too.
    let r = ctx
        .http
        .post(ctx.url(GENERIC.revoke))
        .json(&json!({"token": rt}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::OK);
    let (status, _) = ctx.refresh(GENERIC, &rt).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "revoked by the JSON call");
}

#[tokio::test]
async fn error_shapes_and_extra_token_fields() {
    let ctx = start().await;
    let expect = [
        (
            "hubspot",
            400,
            json!({"status": "BAD_REFRESH_TOKEN", "message": "missing or invalid refresh token"}),
        ),
        (
            "zoom",
            400,
            json!({"reason": "Invalid Token!", "error": "invalid_grant"}),
        ),
        (
            "slack",
            200,
            json!({"ok": false, "error": "invalid_refresh_token"}),
        ),
        (
            "github",
            200,
            json!({"error": "bad_refresh_token", "error_description": "The refresh token passed is incorrect or expired."}),
        ),
        (
            "oauth",
            400,
            json!({"error": "invalid_grant", "error_description": "The refresh token is not known."}),
        ),
    ];
    for (shape, status, fields) in expect {
        ctx.settings(GENERIC, json!({"errorShape": shape})).await;
        let (got, body) = ctx.refresh(GENERIC, "gen_rt_unknown").await;
        assert_eq!(got.as_u16(), status, "{shape}: {body}");
        for (name, value) in fields.as_object().expect("object") {
            assert_eq!(&body[name], value, "{shape}: {body}");
        }
    }
    ctx.settings(GENERIC, json!({"errorShape": "hubspot"}))
        .await;
    let code = ctx.code(GENERIC, "app", &[]).await;
    let (_, body) = ctx
        .token(
            GENERIC.token,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", "http://elsewhere/cb"),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
        )
        .await;
    assert_eq!(body["status"], "BAD_REDIRECT_URI", "{body}");

    let (status, body) = ctx
        .json(
            reqwest::Method::PUT,
            "/__sandbox/profiles/generic",
            json!({"extraTokenFields": {"access_token": "x"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    ctx.settings(
        GENERIC,
        json!({"errorShape": "oauth", "refreshTokenIdleTtlSeconds": 1000, "refreshTokenAbsoluteTtlSeconds": 600,
               "refreshTokenExpiresInField": "x_refresh_token_expires_in", "extraTokenFields": {"hub_id": 42, "token_use": "access_token"}}),
    )
    .await;
    let tokens = ctx.login(GENERIC).await;
    assert_eq!(tokens.body["x_refresh_token_expires_in"], 600);
    assert_eq!(tokens.body["hub_id"], 42);
    assert_eq!(tokens.body["token_use"], "access_token");
    ctx.advance(100).await;
    let (status, body) = ctx
        .refresh(GENERIC, tokens.rt.as_deref().expect("rt"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let left = body["x_refresh_token_expires_in"]
        .as_u64()
        .expect("seconds");
    assert!(
        (499..=500).contains(&left),
        "the absolute cap shrinks: {left}"
    );
}

#[tokio::test]
async fn revocation_modes_and_delays() {
    let ctx = start().await;
    // Refresh only: the refresh token dies, its access token lives.
    ctx.settings(GENERIC, json!({"revocationMode": "refreshOnly"}))
        .await;
    let t = ctx.login(GENERIC).await;
    let rt = t.rt.clone().expect("rt");
    let r = ctx.post_form(GENERIC.revoke, &[("token", &rt)], None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(ctx.refresh(GENERIC, &rt).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(ctx.api_status(GENERIC.api, &t.at).await, StatusCode::OK);
    // Bearer-authenticated revocation of the access token itself (Dropbox, Slack).
    let r = ctx
        .http
        .post(ctx.url(GENERIC.revoke))
        .bearer_auth(&t.at)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ctx.api_status(GENERIC.api, &t.at).await,
        StatusCode::UNAUTHORIZED
    );

    // No endpoint.
    ctx.settings(GENERIC, json!({"revocationMode": "none"}))
        .await;
    let t = ctx.login(GENERIC).await;
    let r = ctx
        .post_form(GENERIC.revoke, &[("token", &t.at)], None)
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Fake success: 200 and nothing changes.
    ctx.settings(GENERIC, json!({"revocationMode": "fakeSuccess"}))
        .await;
    let r = ctx
        .post_form(
            GENERIC.revoke,
            &[("token", t.rt.as_deref().expect("rt"))],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(ctx.api_status(GENERIC.api, &t.at).await, StatusCode::OK);
    assert_eq!(
        ctx.refresh(GENERIC, t.rt.as_deref().expect("rt")).await.0,
        StatusCode::OK
    );

    // A delay: the revocation takes effect later on the sandbox clock, for the endpoint and
    // for the user's revocation alike.
    ctx.settings(
        GENERIC,
        json!({"revocationMode": "cascade", "revocationDelaySeconds": 60}),
    )
    .await;
    let t = ctx.login(GENERIC).await;
    let r = ctx
        .post_form(
            GENERIC.revoke,
            &[("token", t.rt.as_deref().expect("rt"))],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(ctx.api_status(GENERIC.api, &t.at).await, StatusCode::OK);
    let other = login_as(&ctx, GENERIC, "zed").await;
    ctx.admin("/__sandbox/users/zed/revoke", json!({})).await;
    assert_eq!(ctx.api_status(GENERIC.api, &other.at).await, StatusCode::OK);
    ctx.advance(61).await;
    assert_eq!(
        ctx.api_status(GENERIC.api, &t.at).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ctx.api_status(GENERIC.api, &other.at).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn activation_delay_and_api_rejection_shapes() {
    let ctx = start().await;
    ctx.settings(GENERIC, json!({"accessTokenActivationDelaySeconds": 5}))
        .await;
    let t = ctx.login(GENERIC).await;
    let r = ctx.api(GENERIC.api, &t.at).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.expect("json");
    assert_eq!(
        body["error_description"],
        "The access token is not active yet."
    );
    ctx.advance(5).await;
    assert_eq!(ctx.api_status(GENERIC.api, &t.at).await, StatusCode::OK);

    ctx.settings(
        GENERIC,
        json!({"apiRejectionShape": "emptyWithWwwAuthenticate"}),
    )
    .await;
    let r = ctx.api(GENERIC.api, "gen_at_unknown").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.headers()[WWW_AUTHENTICATE]
            .to_str()
            .expect("ascii")
            .contains("invalid_token")
    );
    assert!(r.bytes().await.expect("body").is_empty());

    ctx.settings(GENERIC, json!({"apiRejectionShape": "array"}))
        .await;
    let r = ctx.api(GENERIC.api, "gen_at_unknown").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body[0]["errorCode"], "INVALID_SESSION_ID");

    ctx.settings(GENERIC, json!({"apiRejectionShape": "okFalse"}))
        .await;
    let r = ctx.api(GENERIC.api, "gen_at_unknown").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"ok": false, "error": "invalid_auth"})
    );
    ctx.advance(3600).await;
    let r = ctx.api(GENERIC.api, &t.at).await;
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"],
        "token_expired"
    );

    ctx.settings(GENERIC, json!({"apiRejectionShape": "xml"}))
        .await;
    let r = ctx.api(GENERIC.api, &t.at).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()[CONTENT_TYPE], "application/xml");
    let text = r.text().await.expect("text");
    assert!(
        text.contains("<Fault type=\"AUTHENTICATION\">") && text.contains("Token expired: "),
        "{text}"
    );

    ctx.settings(GENERIC, json!({"apiRejectionShape": "profile"}))
        .await;
    let r = ctx.api(GENERIC.api, &t.at).await;
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"],
        "invalid_token"
    );
    let (status, _) = ctx
        .json(
            reqwest::Method::PUT,
            "/__sandbox/profiles/generic",
            json!({"apiRejectionShape": "soap"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// Review findings of session 13, each once: a used refresh token presented again after its idle
/// life is a reuse (with `revokeGrantOnReuse`, the grant dies); a grant whose revocation is
/// pending refreshes without rotating; times past a century are refused; a routing field cannot
/// take an OAuth field's name; the revocation endpoint's `invalid_client` for Basic names the
/// scheme.
#[tokio::test]
async fn session_13_sandbox_findings_stay_fixed() {
    let ctx = start().await;
    ctx.settings(
        GENERIC,
        json!({"rotateRefreshTokens": true, "revokeGrantOnReuse": true,
               "refreshTokenIdleTtlSeconds": 86_400}),
    )
    .await;
    let rt1 = ctx.login(GENERIC).await.rt.expect("rt");
    let (_, body) = ctx.refresh(GENERIC, &rt1).await;
    let rt2 = body["refresh_token"].as_str().expect("rt2").to_string();
    ctx.advance(43_200).await;
    let (_, body) = ctx.refresh(GENERIC, &rt2).await;
    let rt3 = body["refresh_token"].as_str().expect("rt3").to_string();
    ctx.advance(43_201).await;
    let (status, body) = ctx.refresh(GENERIC, &rt1).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        ctx.refresh(GENERIC, &rt3).await.1["error"],
        "invalid_grant",
        "the reuse killed the grant"
    );

    // A pending revocation of the grant (a delay): refreshes work, unrotated.
    ctx.admin("/__sandbox/reset", json!({})).await;
    ctx.settings(BOX, json!({"revocationDelaySeconds": 60}))
        .await;
    let tokens = ctx.login(BOX).await;
    let rt = tokens.rt.expect("rt");
    let r = ctx
        .post_form(
            BOX.revoke,
            &[
                ("token", &rt),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ],
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    for _ in 0..2 {
        let (status, body) = ctx.refresh(BOX, &rt).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["refresh_token"], rt.as_str(), "{body}");
    }

    // Limits.
    let (status, _) = ctx
        .json(
            reqwest::Method::POST,
            "/__sandbox/clock",
            json!({"advanceSeconds": u64::MAX}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    for body in [
        json!({"accessTokenTtlSeconds": u64::MAX}),
        json!({"routingField": "access_token"}),
        json!({"refreshTokenExpiresInField": "refresh_token"}),
    ] {
        let (status, answer) = ctx
            .json(
                reqwest::Method::PUT,
                "/__sandbox/profiles/generic",
                body.clone(),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }
    assert!(
        ctx.login(GENERIC).await.rt.is_some(),
        "the sandbox still works"
    );

    // PKCE as RFC 7636 spells it: a challenge of 43 to 128 unreserved characters, and a method
    // only with a challenge (a client sending either wrong passes no real provider).
    for extra in [
        vec![
            ("code_challenge", "abc"),
            ("code_challenge_method", "plain"),
        ],
        vec![("code_challenge_method", "S256")],
    ] {
        let pairs = ctx.authorize(GENERIC, "app", &extra).await;
        assert!(
            pairs
                .iter()
                .any(|(k, v)| k == "error" && v == "invalid_request"),
            "{extra:?}: {pairs:?}"
        );
    }

    // invalid_client at the revocation endpoint, Basic tried: the scheme is named.
    let r = ctx
        .post_form(
            GENERIC.revoke,
            &[("token", "x")],
            Some(basic("app", "wrong")),
        )
        .await;
    let r = if r.status() == StatusCode::UNAUTHORIZED {
        r
    } else {
        // Any secret passes unless the sandbox holds a fixed client: a malformed header then.
        ctx.post_form(
            GENERIC.revoke,
            &[("token", "x")],
            Some("Basic %%%".to_string()),
        )
        .await
    };
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key("www-authenticate"));
}
