//! Operations endpoints outside the base path: `/healthz`, `/metrics`, `/openapi.json`,
//! `/oauth/callback` (the page a provider redirects to), and the JSON 404 for unknown paths.

use std::collections::HashMap;

use axum::Json as AxumJson;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde_json::{Value, json};

use super::error::ApiError;
use crate::app::SharedApp;

/// How long a write the database refused keeps `/healthz` unavailable.
const HEALTH_WRITE_FAILURE_MS: i64 = 30_000;

/// How long a value sealed under a key this replica lacks keeps `/healthz` degraded.
const UNKNOWN_KEY_WITHIN_MS: i64 = 60_000;

/// How long `/healthz` waits for its write before it answers 503.
const HEALTH_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(2_000);

#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "ops_healthz",
    tag = "operations",
    summary = "Health, with a database check",
    description = "`status` is `ok`; `degraded` while rotated tokens the database did not take are kept in memory (`keptTokens`): the process must not be restarted then, or they are lost; `degraded` too, with a `reason`, when secrets sealed under a master key this replica was not given were read in the last minute (a replica left out of a key rotation); `unavailable` (503) while the database does not answer or does not take a write within 2 s (a full disk, a read-only file: `reason` says, and `database` is `not taking writes`). `clockOffsetMs`: how far the clock the service goes by (PostgreSQL's, read each minute) is ahead of this machine's (negative: behind). Use it for readiness, not liveness.",
    responses(
        (status = 200, description = "Up, its database answering (`status`: `ok`, or `degraded` while rotated tokens wait in memory for the database, or when secrets under a master key this replica lacks were read in the last minute)", body = crate::openapi::Health),
        (status = 503, description = "The database does not answer, or does not take a write (`reason`)", body = crate::openapi::Health),
    ),
)]
pub async fn healthz(State(app): State<SharedApp>) -> Response {
    // A write the database refused lately (a full disk) counts as one the probe made: the probe
    // rewrites a row in place, which a full disk may still take.
    let ping = match crate::store::recent_write_failure(HEALTH_WRITE_FAILURE_MS) {
        // Said as it is: the database answers, and refuses writes.
        Some((ago, message)) => Err(crate::store::StoreError::Database(format!(
            "a write was refused {} s ago: {message}",
            ago / 1000
        ))),
        // Bounded: with the database gone the pool waits its 10 s for a connection, and a
        // load balancer's probe gives up long before (Kubernetes: 1 s by default) and learns
        // nothing but a timeout.
        None => tokio::time::timeout(HEALTH_CHECK_TIMEOUT, app.store.write_check())
            .await
            .unwrap_or_else(|_| {
                Err(crate::store::StoreError::Unavailable(format!(
                    "no write was made within {} ms",
                    HEALTH_CHECK_TIMEOUT.as_millis()
                )))
            }),
    };
    // Rotated tokens the store did not take: the only copy of a grant a rotating provider has
    // retired the old token of, until the database takes them.
    let kept = app.refresh.kept_count();
    let body = |status: &str, database: &str, reason: Option<String>| {
        json!({
            "status": status,
            "database": database,
            "reason": reason,
            "keptTokens": kept,
            "clockOffsetMs": crate::app::clock_offset_ms(),
            "backgroundRestarts": app
                .background_restarts
                .load(std::sync::atomic::Ordering::Relaxed),
            "connections": {
                "open": app.connections.open.load(std::sync::atomic::Ordering::Relaxed),
                "max": app.connections.max.load(std::sync::atomic::Ordering::Relaxed),
            },
        })
    };
    match ping {
        Ok(()) => {
            // Instances sealed under a key this replica was not given (left out of a key
            // rotation): each answers 409 `unreadable` here, and only a restart with the key
            // mends it. Still ready for the others, so not a 503.
            let unknown_key = app.keyring.recent_unknown_key(UNKNOWN_KEY_WITHIN_MS).map(|id| {
                format!(
                    "secrets sealed under master key {id}, which this replica was not given, were read in the last minute: give it in TOKENWARDEN_PREVIOUS_MASTER_KEYS (or as TOKENWARDEN_MASTER_KEY) and restart it"
                )
            });
            let status = if kept == 0 && unknown_key.is_none() {
                "ok"
            } else {
                "degraded"
            };
            AxumJson(body(status, app.store.engine_name(), unknown_key)).into_response()
        }
        Err(error) => {
            // Once in 10 s: probes come every few seconds, each with the same news.
            static LAST_SAID: std::sync::atomic::AtomicI64 =
                std::sync::atomic::AtomicI64::new(i64::MIN);
            if crate::telemetry::at_most_every(&LAST_SAID, crate::app::system_now_ms(), 10_000) {
                tracing::error!("health check: the database does not take a write: {error}");
            }
            // A database that answers but refuses writes (a full disk, read-only) is told
            // from one that does not answer: the operator's fixes differ.
            let database = if crate::store::recent_write_failure(HEALTH_WRITE_FAILURE_MS).is_some()
            {
                "not taking writes"
            } else {
                "not answering"
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                AxumJson(body("unavailable", database, Some(error.to_string()))),
            )
                .into_response()
        }
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "ops_metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    description = "Open, unless the service was started with `--metrics-token`: then only with `Authorization: Bearer <that token>`.",
    responses(
        (status = 200, description = "Success"),
        (status = 401, description = "`--metrics-token` is set and the request does not carry it", body = crate::openapi::ErrorBody),
    ),
)]
pub async fn metrics(State(app): State<SharedApp>, headers: axum::http::HeaderMap) -> Response {
    if let Some(expected) = &app.config.metrics_token_hash {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let (scheme, token) = value.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let accepted = given.is_some_and(|token| {
            crate::crypto::hashes_equal(&crate::crypto::hash_secret(token), expected)
        });
        if !accepted {
            let mut response = ApiError::unauthorized(
                "the metrics need `Authorization: Bearer <the token set with --metrics-token>`",
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"metrics\""),
            );
            return response;
        }
    }
    crate::telemetry::update_gauges(&app).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::render_metrics(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "ops_openapi",
    tag = "operations",
    summary = "This document",
    responses((status = 200, description = "Success")),
)]
pub async fn openapi() -> AxumJson<Value> {
    AxumJson(crate::openapi::document())
}

fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            other => other.to_string(),
        })
        .collect()
}

/// The page a provider redirects the user to: shows `code` and `state` so they can be copied
/// into `POST /instances` or `PATCH /instances` (what the articles' users intercept), and posts
/// them to the opener when it is a popup (the dashboard's Reconnect).
#[utoipa::path(
    get,
    path = "/oauth/callback",
    operation_id = "ops_oauth_callback",
    tag = "operations",
    summary = "The page a provider redirects to: shows code and state",
    params(("code" = Option<String>, Query, description = "the authorization code"), ("state" = Option<String>, Query, description = "the state"), ("error" = Option<String>, Query, description = "the provider's error, when the user refused")),
    responses(
        (status = 200, description = "The code and state, shown"),
        (status = 400, description = "The provider refused (`error`), or sent no code"),
    ),
)]
pub async fn oauth_callback(Query(query): Query<HashMap<String, String>>) -> Response {
    let field = |name: &str| escape(query.get(name).map(String::as_str).unwrap_or(""));
    let no_code = query.get("code").is_none_or(|code| code.trim().is_empty());
    // A redirect without a code and without an error is told as a refusal too, so that the
    // window that opened this one stops waiting (it waited out its five minutes).
    let refusal = match query.get("error").filter(|error| !error.trim().is_empty()) {
        Some(error) => Some((
            error.as_str(),
            query
                .get("error_description")
                .map(String::as_str)
                .unwrap_or(""),
        )),
        None if no_code || query.contains_key("error") => Some((
            "invalid_request",
            "No code in this redirect: authorize again",
        )),
        None => None,
    };
    let body = if let Some((error, description)) = refusal {
        // The window that opened this one (the dashboard's Reconnect) hears of the refusal at
        // once, not after waiting out its five minutes.
        let page = format!(
            "<!doctype html><html><head><meta charset=utf-8><title>Authorization failed</title></head><body><h1>Authorization failed</h1><p>The provider answered <code id=error>{}</code>: <span id=error_description>{}</span></p><p>state: <code id=state>{}</code></p><script>{REFUSED_SCRIPT}</script></body></html>",
            escape(error),
            escape(description),
            field("state"),
        );
        return (StatusCode::BAD_REQUEST, callback_headers(), Html(page)).into_response();
    } else {
        let extras: String = query
            .iter()
            .filter(|(name, _)| !matches!(name.as_str(), "code" | "state"))
            .map(|(name, value)| {
                format!("<li>{}: <code>{}</code></li>", escape(name), escape(value))
            })
            .collect();
        format!(
            "<!doctype html><html><head><meta charset=utf-8><title>Authorization code</title></head><body><h1>Authorization code received</h1><p>code: <code id=code>{code}</code></p><p>state: <code id=state>{state}</code></p><ul>{extras}</ul><p>Pass it as <code>providerData.code</code> to <code>POST /instances</code> or <code>PATCH /instances</code>.</p><script>{CODE_SCRIPT}</script></body></html>",
            code = field("code"),
            state = field("state"),
        )
    };
    (callback_headers(), Html(body)).into_response()
}

/// What the callback page runs: it tells the window that opened it (the dashboard's
/// Reconnect) what the provider sent, on this origin only.
const CODE_SCRIPT: &str = "if (window.opener) { window.opener.postMessage({type: 'tokenwarden-oauth', code: document.getElementById('code').textContent, state: document.getElementById('state').textContent}, window.location.origin); }";
const REFUSED_SCRIPT: &str = "if (window.opener) { window.opener.postMessage({type: 'tokenwarden-oauth', error: document.getElementById('error').textContent, errorDescription: document.getElementById('error_description').textContent, state: document.getElementById('state').textContent}, window.location.origin); }";

/// The page shows an authorization code: no cache keeps it, no other page frames it, it sends
/// no referrer, and only its own script runs (a provider's text in it cannot bring one).
fn callback_headers() -> [(axum::http::HeaderName, String); 5] {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let policy = POLICY.get_or_init(|| {
        let scripts = crate::http::dashboard::script_sources(&format!(
            "<script>{CODE_SCRIPT}</script><script>{REFUSED_SCRIPT}</script>"
        ));
        format!(
            "default-src 'none'; script-src {scripts}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    });
    [
        (axum::http::header::CACHE_CONTROL, "no-store".to_string()),
        (axum::http::header::CONTENT_SECURITY_POLICY, policy.clone()),
        (
            axum::http::header::REFERRER_POLICY,
            "no-referrer".to_string(),
        ),
        // For browsers that do not read `frame-ancestors`.
        (axum::http::header::X_FRAME_OPTIONS, "DENY".to_string()),
        (
            axum::http::header::X_CONTENT_TYPE_OPTIONS,
            "nosniff".to_string(),
        ),
    ]
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    let path = uri.path();
    if path.trim_end_matches('/') == "/elements/api-v2" {
        return ApiError::not_found(
            "There is no such path: the platform API's paths go on from /elements/api-v2 (`/instances`, `/elements`, …; `/openapi.json` lists them)",
        );
    }
    if path.starts_with("/elements/api-v2/") {
        if path.ends_with('/') {
            return ApiError::not_found(
                "There is no such path: the platform API's paths end without a slash (`/openapi.json` lists them)",
            );
        }
        return ApiError::not_found(
            "There is no such path in the platform API (`/openapi.json` lists them)",
        );
    }
    ApiError::not_found("There is no such path; the platform API is under /elements/api-v2")
}
