//! The sandbox's control endpoints under `/__sandbox/`: user revocation, the clock, profile
//! settings, faults, statistics and reset. Bodies are JSON; bad JSON or wrong types answer 400
//! `{"error": "invalid_request", "message": …}`, unknown profiles 404.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{AppState, json_response};
use crate::clock::rfc3339;
use crate::faults::FaultRequest;
use crate::profiles::{Profile, ProfileSettingsPatch};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/__sandbox/health",
            get(|| async { json_response(StatusCode::OK, json!({"status": "ok"})) }),
        )
        .route("/__sandbox/users/{user}/revoke", post(revoke_user))
        .route("/__sandbox/clock", get(clock).post(advance_clock))
        .route("/__sandbox/profiles", get(all_profiles))
        .route(
            "/__sandbox/profiles/{profile}",
            get(profile_settings).put(update_profile),
        )
        .route(
            "/__sandbox/faults",
            get(faults).post(add_fault).delete(clear_faults),
        )
        .route("/__sandbox/stats", get(stats))
        .route("/__sandbox/reset", post(reset))
}

fn bad_request(message: impl Into<String>) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        json!({"error": "invalid_request", "message": message.into()}),
    )
}

/// Parses a JSON body into `T`, answering 400 with serde's explanation when it does not fit.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("The JSON body is invalid: {e}")))
}

fn find_profile(key: &str) -> Result<Profile, Response> {
    Profile::from_key(key).ok_or_else(|| {
        let known: Vec<&str> = Profile::ALL.iter().map(|p| p.key()).collect();
        json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "unknown_profile", "message": format!("No profile '{key}'. Known profiles: {}.", known.join(", "))}),
        )
    })
}

async fn revoke_user(State(sandbox): State<AppState>, Path(user): Path<String>) -> Response {
    let revoked = sandbox.revoke_user(&user);
    json_response(
        StatusCode::OK,
        json!({"user": user, "revokedGrants": revoked}),
    )
}

fn clock_answer(sandbox: &crate::state::Sandbox) -> Response {
    let now = sandbox.clock.now_ms();
    json_response(
        StatusCode::OK,
        json!({
            "now": now / 1000,
            "nowMs": now,
            "nowIso": rfc3339(now),
            "offsetSeconds": sandbox.clock.offset_seconds(),
        }),
    )
}

async fn clock(State(sandbox): State<AppState>) -> Response {
    clock_answer(&sandbox)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AdvanceClock {
    advance_seconds: u64,
}

async fn advance_clock(State(sandbox): State<AppState>, body: Bytes) -> Response {
    let request: AdvanceClock = match parse_json(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    // A century at most: past it the clock saturated, every code was expired when issued,
    // and only a reset brought the sandbox back.
    // And a century in all: advances of a century each, repeated, saturated it just the same.
    let total = sandbox
        .clock
        .offset_seconds()
        .saturating_add(i64::try_from(request.advance_seconds).unwrap_or(i64::MAX));
    if request.advance_seconds > crate::profiles::MAX_SECONDS
        || total > crate::profiles::MAX_SECONDS as i64
    {
        return bad_request(format!(
            "advanceSeconds must be at most {} (a hundred years), and the clock at most that far ahead in all (now {} s; POST /__sandbox/reset with {{\"grants\": true}} sets it back)",
            crate::profiles::MAX_SECONDS,
            sandbox.clock.offset_seconds()
        ));
    }
    sandbox.clock.advance_seconds(request.advance_seconds);
    clock_answer(&sandbox)
}

async fn all_profiles(State(sandbox): State<AppState>) -> Response {
    let all: serde_json::Map<String, serde_json::Value> = Profile::ALL
        .iter()
        .map(|p| (p.key().to_string(), json!(*sandbox.settings(*p))))
        .collect();
    json_response(StatusCode::OK, serde_json::Value::Object(all))
}

async fn profile_settings(State(sandbox): State<AppState>, Path(key): Path<String>) -> Response {
    match find_profile(&key) {
        Ok(profile) => json_response(StatusCode::OK, json!(*sandbox.settings(profile))),
        Err(response) => response,
    }
}

async fn update_profile(
    State(sandbox): State<AppState>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    let profile = match find_profile(&key) {
        Ok(profile) => profile,
        Err(response) => return response,
    };
    let patch: ProfileSettingsPatch = match parse_json(&body) {
        Ok(patch) => patch,
        Err(response) => return response,
    };
    if profile != Profile::Generic
        && (patch.separate_refresh_endpoint.is_some()
            || patch
                .routing_field
                .as_deref()
                .is_some_and(|f| !f.is_empty()))
    {
        return bad_request(
            "separateRefreshEndpoint and routingField are settings of the generic profile only \
             (the other profiles have their providers' own URL layout)",
        );
    }
    match sandbox.update_settings(profile, |settings| settings.apply(patch)) {
        Ok(settings) => json_response(StatusCode::OK, json!(*settings)),
        Err(message) => bad_request(message),
    }
}

async fn faults(State(sandbox): State<AppState>) -> Response {
    json_response(
        StatusCode::OK,
        json!({"pending": sandbox.faults.pending_counts()}),
    )
}

async fn add_fault(State(sandbox): State<AppState>, body: Bytes) -> Response {
    let request: FaultRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    match sandbox.faults.add(request) {
        Ok(()) => json_response(
            StatusCode::OK,
            json!({"pending": sandbox.faults.pending_counts()}),
        ),
        Err(message) => bad_request(message),
    }
}

async fn clear_faults(State(sandbox): State<AppState>) -> Response {
    sandbox.faults.clear();
    json_response(
        StatusCode::OK,
        json!({"pending": sandbox.faults.pending_counts()}),
    )
}

async fn stats(State(sandbox): State<AppState>) -> Response {
    json_response(StatusCode::OK, sandbox.stats.snapshot())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Reset {
    /// Also forget every code, grant and token issued (the users' consents).
    #[serde(default)]
    grants: bool,
}

/// Statistics, faults and every profile's settings back to a fresh start. Issued codes,
/// grants and tokens, and the clock they live on, stay unless `{"grants": true}`: a reset
/// between two checks (to count from zero) must not end the connections a service holds.
async fn reset(State(sandbox): State<AppState>, body: Bytes) -> Response {
    let request: Reset = if body.iter().all(u8::is_ascii_whitespace) {
        Reset::default()
    } else {
        match parse_json(&body) {
            Ok(r) => r,
            Err(response) => return response,
        }
    };
    sandbox.reset(request.grants);
    json_response(
        StatusCode::OK,
        json!({"reset": true, "grants": request.grants}),
    )
}
