//! `tokenwarden demo`: the seed articles' re-authentication scenario, end to end, in seconds.
//!
//! Starts the sandbox provider and the service (temporary SQLite) on free ports and walks the
//! steps the articles make a reader click through in Postman, printing what was sent and what
//! came back. Exits non-zero if any step did not hold.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use serde_json::{Value, json};

use crate::app::AppConfig;

struct Printer {
    colour: bool,
    step: usize,
    failed: bool,
}

impl Printer {
    fn ok(&mut self, title: &str, detail: &str) {
        self.step += 1;
        if self.colour {
            println!(
                "\x1b[32m✔\x1b[0m {:>2}. \x1b[1m{title}\x1b[0m\n      {detail}",
                self.step
            );
        } else {
            println!("[ok]   {:>2}. {title}\n       {detail}", self.step);
        }
    }

    fn fail(&mut self, title: &str, detail: &str) {
        self.step += 1;
        self.failed = true;
        if self.colour {
            println!(
                "\x1b[31m✘\x1b[0m {:>2}. \x1b[1m{title}\x1b[0m\n      {detail}",
                self.step
            );
        } else {
            println!("[FAIL] {:>2}. {title}\n       {detail}", self.step);
        }
    }

    fn check(&mut self, held: bool, title: &str, detail: &str) -> Result<(), String> {
        if held {
            self.ok(title, detail);
            Ok(())
        } else {
            self.fail(title, detail);
            Err(format!("step {} did not hold: {title}", self.step))
        }
    }
}

pub async fn run() -> ExitCode {
    crate::app::install_crypto_provider();
    let started = Instant::now();
    let mut printer = Printer {
        colour: std::io::stdout().is_terminal(),
        step: 0,
        failed: false,
    };
    let outcome = scenario(&mut printer).await;
    match outcome {
        Ok(()) if !printer.failed => {
            println!(
                "\nEvery step held ({} steps in {:.1} s).",
                printer.step,
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Ok(()) => ExitCode::FAILURE,
        Err(message) => {
            println!("\nThe demo stopped: {message}");
            ExitCode::FAILURE
        }
    }
}

/// A token or code as the demo shows it: its kind prefix only (`ads_at_…`), never its value.
fn short(value: &str) -> String {
    let kind: String = value.chars().take(7).collect();
    if value.len() > 7 {
        format!("{kind}…")
    } else {
        "…".to_string()
    }
}

async fn scenario(p: &mut Printer) -> Result<(), String> {
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().expect("loopback address");
    let sandbox =
        tokenwarden_sandbox::spawn(loopback, tokenwarden_sandbox::SandboxConfig::default())
            .await
            .map_err(|e| format!("could not start the sandbox: {e}"))?;
    let directory =
        std::env::temp_dir().join(format!("tokenwarden-demo-{}", crate::crypto::new_id()));
    std::fs::create_dir_all(&directory)
        .map_err(|e| format!("could not make a temporary directory: {e}"))?;
    let mut config = AppConfig::new(format!("sqlite://{}/demo.db", directory.display()));
    config.sandbox_url = sandbox.url.clone();
    let server = crate::startup::spawn(loopback, config)
        .await
        .map_err(|e| format!("could not start the service: {e}"))?;
    p.ok(
        "Start the sandbox provider and the service",
        &format!(
            "sandbox {} · service {} (temporary SQLite)",
            sandbox.url, server.url
        ),
    );
    let result = walk(p, &server.url, &sandbox.url, &server.app).await;
    server.shutdown().await;
    sandbox.shutdown().await;
    let _ = std::fs::remove_dir_all(&directory);
    result
}

async fn walk(
    p: &mut Printer,
    service: &str,
    sandbox: &str,
    app: &crate::app::SharedApp,
) -> Result<(), String> {
    let http = crate::app::build_http_client(std::time::Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let api = format!("{service}/elements/api-v2");
    let org = crate::orgs::create_organization(app, "Demo organization")
        .await
        .map_err(|e| e.message)?;
    p.ok(
        "Create an organization",
        &format!(
            "tokenwarden orgs create --name 'Demo organization' → organizationId {}",
            org.organization_id
        ),
    );
    let platform = format!(
        "User {}, Organization {}",
        org.user_secret, org.organization_secret
    );
    let callback = format!("{service}/oauth/callback");
    let element = "sandbox-adobe-sign";
    let ctx = Ctx {
        http: http.clone(),
        api: api.clone(),
        platform: platform.clone(),
        callback: callback.clone(),
        element,
        through: String::new(),
    };

    let (code, state) = authorize(p, &ctx, "").await?;
    let configuration = json!({"oauth.api.key": "demo-client", "oauth.api.secret": "demo-secret", "oauth.callback.url": callback});
    let created = http
        .post(format!("{api}/instances"))
        .header("authorization", &platform)
        .json(&json!({"element": {"key": element}, "providerData": {"code": code, "state": state},
                      "configuration": configuration, "name": "Alice's Adobe Sign", "tags": ["demo"]}))
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let status = created.status();
    let instance: Value = created
        .json()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let instance_id = instance["id"].as_i64().unwrap_or_default();
    let element_token = instance["token"].as_str().unwrap_or_default().to_string();
    p.check(
        status == 200 && instance["valid"] == true,
        "POST /instances with providerData.code",
        &format!(
            "{status} → instance {instance_id}, valid {}, verification {}",
            instance["valid"], instance["verification"]["ok"]
        ),
    )?;
    let full = format!("{platform}, Element {element_token}");
    let through = format!("User {}, Element {element_token}", org.user_secret);

    let listed: Value = http
        .get(format!("{api}/instances"))
        .header("authorization", &full)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?
        .json()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let access_token = listed[0]["configuration"]["oauth.user.token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    p.check(
        !access_token.is_empty() && access_token != crate::instances::MASK,
        "GET /instances with the Element token and find oauth.user.token",
        &format!("200 → oauth.user.token {}", short(&access_token)),
    )?;

    let ctx = Ctx {
        through: through.clone(),
        ..ctx
    };
    call(p, &ctx, "Call the provider through the instance", 200).await?;

    let revoke_url = format!("{sandbox}/adobe-sign/oauth/v2/revoke");
    let revoked = http
        .post(&revoke_url)
        .query(&[("token", access_token.as_str())])
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    p.check(
        revoked.status() == 200,
        "Revoke the token at the provider",
        &format!(
            "POST /adobe-sign/oauth/v2/revoke?token=… → {}",
            revoked.status()
        ),
    )?;
    let again = http
        .post(&revoke_url)
        .query(&[("token", access_token.as_str())])
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let again_status = again.status();
    let again_body = again.text().await.unwrap_or_default();
    p.check(
        again_status == 400 && again_body.contains("EXPIRED_TOKEN"),
        "Revoke it again",
        &format!("→ {again_status} {}", truncate(&again_body, 120)),
    )?;

    let body = call(
        p,
        &ctx,
        "Call again: the provider rejects the token, the refresh token is dead too",
        401,
    )
    .await?;
    p.check(
        body.contains("Request failed") && body.contains("INVALID_ACCESS_TOKEN"),
        "The answer is the articles' 401",
        &truncate(&body, 160),
    )?;
    let shown: Value = http
        .get(format!("{api}/instances/{instance_id}"))
        .header("authorization", &platform)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?
        .json()
        .await
        .map_err(|e| e.without_url().to_string())?;
    p.check(
        shown["valid"] == false,
        "The instance shows invalid",
        &format!(
            "GET /instances/{instance_id} → valid {}, reason {}",
            shown["valid"], shown["stateReason"]
        ),
    )?;

    let (code, state) = authorize(p, &ctx, " (again, for re-authentication)").await?;
    let patched = http
        .patch(format!("{api}/instances"))
        .header("authorization", &full)
        .json(&json!({"providerData": {"code": code, "state": state},
                      "configuration": {"oauth.user.token": "", "oauth.user.refresh_token": ""}}))
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let patched_status = patched.status();
    let patched: Value = patched
        .json()
        .await
        .map_err(|e| e.without_url().to_string())?;
    p.check(
        patched_status == 200
            && patched["valid"] == true
            && patched["id"].as_i64() == Some(instance_id)
            && patched["token"] == element_token.as_str(),
        "PATCH /instances with providerData.code",
        &format!(
            "{patched_status} → same id {}, same token, valid {}",
            patched["id"], patched["valid"]
        ),
    )?;
    call(p, &ctx, "Call again: re-authenticated", 200).await?;

    // An expired access token is refreshed on the fly.
    let advanced = http
        .post(format!("{sandbox}/__sandbox/clock"))
        .json(&json!({"advanceSeconds": 3700}))
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    p.check(
        advanced.status() == 200,
        "Move the provider's clock past the access token's expiry",
        "POST /__sandbox/clock {\"advanceSeconds\": 3700} → 200",
    )?;
    call(
        p,
        &ctx,
        "Call again: the expired access token is refreshed on the fly",
        200,
    )
    .await?;
    let stats: Value = http
        .get(format!("{sandbox}/__sandbox/stats"))
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?
        .json()
        .await
        .map_err(|e| e.without_url().to_string())?;
    p.check(
        stats["token"]["refresh_token"].as_u64().unwrap_or(0) >= 1,
        "The provider saw the refresh",
        &format!("GET /__sandbox/stats → token {}", stats["token"]),
    )?;
    Ok(())
}

struct Ctx {
    http: reqwest::Client,
    api: String,
    platform: String,
    callback: String,
    element: &'static str,
    through: String,
}

/// `GET /elements/{key}/oauth/url`, then approval at the provider as user "alice".
async fn authorize(p: &mut Printer, ctx: &Ctx, round: &str) -> Result<(String, String), String> {
    let element = ctx.element;
    let response = ctx
        .http
        .get(format!("{}/elements/{element}/oauth/url", ctx.api))
        .query(&[
            ("apiKey", "demo-client"),
            ("apiSecret", "demo-secret"),
            ("callbackUrl", ctx.callback.as_str()),
        ])
        .header("authorization", &ctx.platform)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let url = body["oauthUrl"].as_str().unwrap_or_default().to_string();
    p.check(
        status == 200 && !url.is_empty(),
        &format!("GET /elements/{element}/oauth/url{round}"),
        &format!("{status} → oauthUrl {}", short_url(&url)),
    )?;
    let approve = ctx
        .http
        .get(format!("{url}&login_hint=alice"))
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let location = approve
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let code = url::Url::parse(&location)
        .ok()
        .and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == "code")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_default();
    p.check(
        approve.status().is_redirection() && !code.is_empty(),
        "Approve at the provider (login_hint=alice) and intercept the code",
        &format!(
            "{} → redirect to /oauth/callback with code {}",
            approve.status(),
            short(&code)
        ),
    )?;
    Ok((code, body["state"].as_str().unwrap_or_default().to_string()))
}

/// A call to the provider through the instance.
async fn call(p: &mut Printer, ctx: &Ctx, title: &str, expect: u16) -> Result<String, String> {
    let response = ctx
        .http
        .get(format!("{}/proxy/api/rest/v6/users/me", ctx.api))
        .header("authorization", &ctx.through)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .map_err(|e| e.without_url().to_string())?;
    p.check(
        status == expect,
        title,
        &format!(
            "GET /proxy/api/rest/v6/users/me → {status} {}",
            truncate(&body, 140)
        ),
    )?;
    Ok(body)
}

fn truncate(text: &str, limit: usize) -> String {
    let text = text.replace('\n', " ");
    if text.chars().count() > limit {
        format!("{}…", text.chars().take(limit).collect::<String>())
    } else {
        text
    }
}

fn short_url(url: &str) -> String {
    truncate(url, 90)
}
