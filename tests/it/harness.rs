//! The service as its users meet it: the real server on port 0 over a fresh database, the real
//! sandbox provider over HTTP, and helpers that speak the platform API.

use std::net::SocketAddr;

use serde_json::{Value, json};
use tokenwarden::app::AppConfig;
use tokenwarden::startup::RunningServer;
use tokenwarden_sandbox::{RunningSandbox, SandboxConfig};

pub const CLIENT_ID: &str = "it-client";
pub const CLIENT_SECRET: &str = "it-secret";

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn http() -> reqwest::Client {
    tokenwarden::app::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap()
}

pub struct Org {
    pub id: i64,
    pub user_secret: String,
    pub organization_secret: String,
}

impl Org {
    pub fn platform(&self) -> String {
        format!(
            "User {}, Organization {}",
            self.user_secret, self.organization_secret
        )
    }

    pub fn with_element(&self, element_token: &str) -> String {
        format!("{}, Element {element_token}", self.platform())
    }

    pub fn through(&self, element_token: &str) -> String {
        format!("User {}, Element {element_token}", self.user_secret)
    }
}

pub struct Env {
    pub label: String,
    pub database_url: String,
    pub sandbox: RunningSandbox,
    pub server: RunningServer,
    pub http: reqwest::Client,
    pub org: Org,
}

impl Env {
    /// A sandbox and a server on the given database.
    pub async fn start(label: &str, database_url: &str) -> Env {
        Self::start_adjusted(label, database_url, |_| {}).await
    }

    /// A sandbox of its own and a server whose configuration `adjust` changes.
    pub async fn start_adjusted(
        label: &str,
        database_url: &str,
        adjust: impl FnOnce(&mut AppConfig),
    ) -> Env {
        let sandbox = tokenwarden_sandbox::spawn(loopback(), SandboxConfig::default())
            .await
            .unwrap();
        Self::start_with_sandbox(label, database_url, sandbox, adjust).await
    }

    pub async fn start_with_sandbox(
        label: &str,
        database_url: &str,
        sandbox: RunningSandbox,
        adjust: impl FnOnce(&mut AppConfig),
    ) -> Env {
        let server = start_server(database_url, &sandbox.url, adjust).await;
        let created = tokenwarden::orgs::create_organization(&server.app, "it org")
            .await
            .unwrap();
        Env {
            label: label.to_string(),
            database_url: database_url.to_string(),
            sandbox,
            server,
            http: http(),
            org: Org {
                id: created.organization_id,
                user_secret: created.user_secret,
                organization_secret: created.organization_secret,
            },
        }
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/elements/api-v2{path}", self.server.url)
    }

    pub fn sandbox_url(&self, path: &str) -> String {
        format!("{}{path}", self.sandbox.url)
    }

    pub fn callback(&self) -> String {
        format!("{}/oauth/callback", self.server.url)
    }

    pub async fn new_org(&self, name: &str) -> Org {
        let created = tokenwarden::orgs::create_organization(&self.server.app, name)
            .await
            .unwrap();
        Org {
            id: created.organization_id,
            user_secret: created.user_secret,
            organization_secret: created.organization_secret,
        }
    }

    /// `GET /elements/{key}/oauth/url`, then approval at the sandbox as `user`: (code, state).
    pub async fn authorize(&self, org: &Org, element: &str, user: &str) -> (String, String) {
        let callback = self.callback();
        self.authorize_with(
            org,
            element,
            user,
            &[
                ("apiKey", CLIENT_ID),
                ("apiSecret", CLIENT_SECRET),
                ("callbackUrl", callback.as_str()),
            ],
        )
        .await
    }

    /// [`Env::authorize`] with the `oauth/url` query given (a callback, a scope of its own).
    pub async fn authorize_with(
        &self,
        org: &Org,
        element: &str,
        user: &str,
        query: &[(&str, &str)],
    ) -> (String, String) {
        let response = self
            .http
            .get(self.api(&format!("/elements/{element}/oauth/url")))
            .query(query)
            .header("authorization", org.platform())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "[{}] oauth/url", self.label);
        let body: Value = response.json().await.unwrap();
        let url = body["oauthUrl"].as_str().unwrap().to_string();
        let approve = self
            .http
            .get(format!("{url}&login_hint={user}"))
            .send()
            .await
            .unwrap();
        assert!(
            approve.status().is_redirection(),
            "[{}] approval redirects: {}",
            self.label,
            approve.status()
        );
        let location = approve.headers()["location"].to_str().unwrap().to_string();
        let location = url::Url::parse(&location).unwrap();
        let code = location
            .query_pairs()
            .find(|(k, _)| k == "code")
            .unwrap()
            .1
            .into_owned();
        let state = location
            .query_pairs()
            .find(|(k, _)| k == "state")
            .unwrap()
            .1
            .into_owned();
        assert_eq!(
            state,
            body["state"].as_str().unwrap(),
            "state comes back unchanged"
        );
        (code, state)
    }

    pub fn configuration(&self) -> Value {
        json!({"oauth.api.key": CLIENT_ID, "oauth.api.secret": CLIENT_SECRET, "oauth.callback.url": self.callback()})
    }

    /// Creates an instance of `element` for sandbox user `user`; answers its JSON.
    pub async fn create_instance(&self, org: &Org, element: &str, user: &str) -> Value {
        let (code, state) = self.authorize(org, element, user).await;
        let response = self
            .http
            .post(self.api("/instances"))
            .header("authorization", org.platform())
            .json(&json!({"element": {"key": element}, "providerData": {"code": code, "state": state},
                          "configuration": self.configuration(), "name": format!("{user}'s {element}"), "tags": ["it", user]}))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "[{}] create instance: {body}", self.label);
        body
    }

    pub async fn proxy(
        &self,
        org: &Org,
        element_token: &str,
        method: reqwest::Method,
        path: &str,
    ) -> (u16, Value) {
        let response = self
            .http
            .request(method, self.api(&format!("/proxy/{path}")))
            .header("authorization", org.through(element_token))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get_json(&self, url: &str, authorization: &str) -> (u16, Value) {
        let response = self
            .http
            .get(url)
            .header("authorization", authorization)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn sandbox_post(&self, path: &str, body: Value) -> Value {
        let response = self
            .http
            .post(self.sandbox_url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "sandbox {path}: {}",
            response.status()
        );
        response.json().await.unwrap_or(Value::Null)
    }

    pub async fn sandbox_put(&self, path: &str, body: Value) -> Value {
        let response = self
            .http
            .put(self.sandbox_url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "sandbox {path}: {}",
            response.status()
        );
        response.json().await.unwrap_or(Value::Null)
    }

    pub async fn sandbox_stats(&self) -> Value {
        self.http
            .get(self.sandbox_url("/__sandbox/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn stop(self) {
        self.server.shutdown().await;
        self.sandbox.shutdown().await;
    }
}

pub async fn start_server(
    database_url: &str,
    sandbox_url: &str,
    adjust: impl FnOnce(&mut AppConfig),
) -> RunningServer {
    let mut config = AppConfig::new(database_url);
    config.sandbox_url = sandbox_url.to_string();
    config.master_key = Some(TEST_MASTER_KEY.to_string());
    // Tests watch `instance.refresh_failing` without waiting five minutes.
    config.refresh_failing_after = std::time::Duration::ZERO;
    // And superseded grants revoked without waiting a minute.
    config.superseded_grant_revoked_after = std::time::Duration::ZERO;
    // A stop cuts calls still in flight after 10 s, not a minute: tests that stop beside a
    // provider left hanging end sooner.
    config.shutdown_timeout = std::time::Duration::from_secs(10);
    adjust(&mut config);
    tokenwarden::startup::spawn(loopback(), config)
        .await
        .unwrap()
}

/// One key for every replica of a test (base64 of 32 bytes).
pub const TEST_MASTER_KEY: &str = "dG9rZW53YXJkZW4tdGVzdC1tYXN0ZXIta2V5LTMyYiE=";
