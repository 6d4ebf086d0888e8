//! Events, webhooks, audit logs and revocation, as a user meets them: signed webhooks arrive at
//! a real receiver after it failed twice; every event type of a life cycle is listed, paginated
//! and filtered; no event or webhook carries a token or secret; revocation reaches the sandbox
//! in each catalog shape.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use crate::harness::{Env, Org};
use crate::scheduler::{eventually, register_generic_connector};
use crate::support::{drop_test_database, test_databases};

/// What the receiver got: headers and body of each request, in order.
pub(crate) type Received = Arc<Mutex<Vec<(HeaderMap, String)>>>;

/// A webhook receiver on port 0 that answers 500 to its first `failures` requests, then 200.
pub(crate) async fn receiver(failures: usize) -> (String, Received) {
    refusing_receiver(move |_, count| count <= failures).await
}

/// A webhook receiver on port 0 that answers 500 to the requests `refuse` picks (by their
/// headers and their number, from 1), 200 to the others.
async fn refusing_receiver(
    refuse: impl Fn(&HeaderMap, usize) -> bool + Clone + Send + Sync + 'static,
) -> (String, Received) {
    refusing_receiver_with(
        StatusCode::INTERNAL_SERVER_ERROR,
        move |headers, _, count| refuse(headers, count),
    )
    .await
}

/// [`refusing_receiver`] refusing with `refusal` the requests `refuse` picks by their headers,
/// body and number.
async fn refusing_receiver_with(
    refusal: StatusCode,
    refuse: impl Fn(&HeaderMap, &str, usize) -> bool + Clone + Send + Sync + 'static,
) -> (String, Received) {
    let received: Received = Arc::default();
    let seen = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let (seen, refuse) = (Arc::clone(&seen), refuse.clone());
            async move {
                let mut seen = seen.lock().unwrap();
                let refused = refuse(&headers, &body, seen.len() + 1);
                seen.push((headers, body));
                if refused { refusal } else { StatusCode::OK }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), received)
}

/// Checks `X-Tokenwarden-Signature: t=…,v1=…` over `"<t>.<body>"` with `key`, independently of
/// the service's code.
fn signature_verifies(header: &str, body: &str, key: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = Some(value.to_string()),
            Some(("v1", value)) => v1 = Some(value.to_string()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let age = time::OffsetDateTime::now_utc().unix_timestamp() - t.parse::<i64>().unwrap();
    if !(0..300).contains(&age) {
        return false;
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    expected == v1
}

async fn create_with(env: &Env, org: &Org, element: &str, user: &str, extra: Value) -> Value {
    let (code, state) = env.authorize(org, element, user).await;
    let mut configuration = env.configuration();
    for (k, v) in extra.as_object().unwrap() {
        configuration[k] = v.clone();
    }
    let response = env
        .http
        .post(env.api("/instances"))
        .header("authorization", org.platform())
        .json(
            &json!({"element": {"key": element}, "providerData": {"code": code, "state": state},
                      "configuration": configuration, "name": format!("{user}'s {element}")}),
        )
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "[{}] create: {body}", env.label);
    body
}

/// `DELETE /instances/{id}?revoke=true` while the provider's revocation endpoint answers 503
/// `failures` times.
async fn delete_while_revocation_fails(
    env: &Env,
    id: i64,
    auth: &str,
    failures: u32,
) -> (u16, Value) {
    delete_while_revocation_answers(env, id, auth, 503, failures).await
}

/// [`delete_while_revocation_fails`] with the revocation endpoint answering `status` (with
/// `temporarily_unavailable`, the sandbox's injected error).
async fn delete_while_revocation_answers(
    env: &Env,
    id: i64,
    auth: &str,
    status: u16,
    failures: u32,
) -> (u16, Value) {
    env.sandbox_post(
        "/__sandbox/faults",
        json!({"target": "revoke", "status": status, "count": failures}),
    )
    .await;
    send(
        env,
        reqwest::Method::DELETE,
        &format!("/instances/{id}?revoke=true"),
        auth,
    )
    .await
}

/// Sets the sandbox's generic profile's `revocationMode`.
async fn generic_revocation_mode(env: &Env, mode: &str) {
    set_generic_profile(env, json!({ "revocationMode": mode })).await;
}

/// Changes the sandbox's generic profile.
async fn set_generic_profile(env: &Env, settings: Value) {
    let response = env
        .http
        .put(format!(
            "{}/__sandbox/profiles/generic",
            env.sandbox.url.trim_end_matches('/')
        ))
        .json(&settings)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
}

/// Deletes instance `id` (without `?revoke=true`) and answers its `instance.deleted` event's
/// reason.
async fn deleted_saying(env: &Env, id: i64, auth: &str) -> String {
    let (status, body) = send(
        env,
        reqwest::Method::DELETE,
        &format!("/instances/{id}"),
        auth,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, events) = env
        .get_json(
            &env.api(&format!("/events?instanceId={id}&type=instance.deleted")),
            auth,
        )
        .await;
    events["events"][0]["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("{events}"))
        .to_string()
}

async fn send(env: &Env, method: reqwest::Method, path: &str, auth: &str) -> (u16, Value) {
    let response = env
        .http
        .request(method, env.api(path))
        .header("authorization", auth)
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

/// Every page of a paginated list (`limit` per page), following `next`.
async fn all_pages(env: &Env, path: &str, field: &str, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut next: Option<String> = None;
    let separator = if path.contains('?') { '&' } else { '?' };
    for _ in 0..200 {
        let url = match &next {
            Some(cursor) => format!("{path}{separator}limit={limit}&before={cursor}"),
            None => format!("{path}{separator}limit={limit}"),
        };
        let (status, page) = env.get_json(&env.api(&url), &env.org.platform()).await;
        assert_eq!(status, 200, "{page}");
        let got = page[field].as_array().unwrap().clone();
        assert!(got.len() <= limit);
        // The last page says so (`next` null), full or not: never an empty page after it.
        if got.len() < limit {
            assert!(page["next"].is_null(), "a short page is the last: {page}");
        }
        if got.is_empty() {
            assert!(items.is_empty(), "an empty page after the last: {page}");
            return items;
        }
        items.extend(got);
        next = page["next"].as_str().map(str::to_string);
        if next.is_none() {
            return items;
        }
    }
    panic!("pagination did not end");
}

async fn webhook_scenario(label: String, url: String) {
    let env = Env::start(&label, &url).await;
    let (hook, received) = receiver(2).await;
    let (status, secret) = send(
        &env,
        reqwest::Method::GET,
        "/events/webhook-secret",
        &env.org.platform(),
    )
    .await;
    assert_eq!(status, 200, "[{label}] {secret}");
    let org_secret = secret["webhookSecret"].as_str().unwrap().to_string();

    // Signed with the organization's webhook secret (no key of its own).
    let instance = create_with(
        &env,
        &env.org,
        "sandbox-generic",
        "wendy",
        json!({"event.notification.enabled": "true", "event.notification.callback.url": hook}),
    )
    .await;
    let id = instance["id"].as_i64().unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            received.lock().unwrap().len() >= 3
        })
        .await,
        "[{label}] the created event arrives after two failures: {} attempts",
        received.lock().unwrap().len()
    );
    let attempts = received.lock().unwrap().clone();
    let event_ids: Vec<&str> = attempts
        .iter()
        .map(|(headers, _)| headers["x-tokenwarden-event-id"].to_str().unwrap())
        .collect();
    assert!(
        event_ids.iter().all(|e| *e == event_ids[0]),
        "[{label}] retries carry the same event id"
    );
    let (headers, body) = &attempts[2];
    let signature = headers["x-tokenwarden-signature"].to_str().unwrap();
    assert!(
        signature_verifies(signature, body, org_secret.as_bytes()),
        "[{label}] signature verifies with the org's webhook secret"
    );
    let event: Value = serde_json::from_str(body).unwrap();
    assert_eq!(event["type"], "instance.created");
    assert_eq!(event["instanceId"], id);
    assert_eq!(event["id"], event_ids[0]);
    for field in ["elementKey", "occurredAt"] {
        assert!(event.get(field).is_some(), "[{label}] {field} in {event}");
    }
    // The outbox shows it delivered, on the third attempt.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (_, events) = env
                .get_json(
                    &env.api(&format!("/events?instanceId={id}&type=instance.created")),
                    &env.org.platform(),
                )
                .await;
            events["events"][0]["delivery"]["state"] == "delivered"
        })
        .await,
        "[{label}] delivered"
    );
    let (_, events) = env
        .get_json(
            &env.api(&format!("/events?instanceId={id}&type=instance.created")),
            &env.org.platform(),
        )
        .await;
    assert_eq!(events["events"][0]["delivery"]["attempts"], 3, "[{label}]");

    // With a key of its own, that key signs.
    let keyed = create_with(
        &env,
        &env.org,
        "sandbox-generic",
        "kim",
        json!({"event.notification.enabled": "true", "event.notification.callback.url": hook,
               "event.notification.signature.key": "kims-own-signing-key"}),
    )
    .await;
    let keyed_id = keyed["id"].as_i64().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            received
                .lock()
                .unwrap()
                .iter()
                .any(|(_, body)| body.contains(&format!("\"instanceId\":{keyed_id}")))
        })
        .await,
        "[{label}] the keyed instance's event arrives"
    );
    let (headers, body) = received
        .lock()
        .unwrap()
        .iter()
        .find(|(_, body)| body.contains(&format!("\"instanceId\":{keyed_id}")))
        .cloned()
        .unwrap();
    let signature = headers["x-tokenwarden-signature"].to_str().unwrap();
    assert!(signature_verifies(
        signature,
        &body,
        b"kims-own-signing-key"
    ));
    assert!(!signature_verifies(signature, &body, org_secret.as_bytes()));
    env.stop().await;
    drop_test_database(&url).await;
}

#[tokio::test]
async fn webhooks_arrive_signed_after_a_receiver_that_first_fails() {
    let scenarios = test_databases()
        .await
        .into_iter()
        .map(|(label, url)| webhook_scenario(label, url));
    futures_util::future::join_all(scenarios).await;
}

/// The tokens and secrets of an instance, as its Element token holder sees them.
async fn secrets_of(env: &Env, element: &str) -> Vec<String> {
    let (_, listed) = env
        .get_json(&env.api("/instances"), &env.org.with_element(element))
        .await;
    let configuration = &listed[0]["configuration"];
    let mut secrets = vec![element.to_string()];
    for key in [
        "oauth.user.token",
        "oauth.user.refresh_token",
        "oauth.api.secret",
        "event.notification.signature.key",
    ] {
        if let Some(value) = configuration[key].as_str()
            && value.len() >= 6
        {
            secrets.push(value.to_string());
        }
    }
    secrets
}

async fn life_cycle_scenario(label: String, url: String) {
    let env = Env::start(&label, &url).await;
    let (hook, received) = receiver(0).await;
    let platform = env.org.platform();
    let instance = create_with(
        &env,
        &env.org,
        "sandbox-generic",
        "lena",
        json!({"event.notification.enabled": "true", "event.notification.callback.url": hook,
               "event.notification.signature.key": "lenas-signing-key"}),
    )
    .await;
    let id = instance["id"].as_i64().unwrap();
    let element = instance["token"].as_str().unwrap().to_string();
    let mut secrets = secrets_of(&env, &element).await;
    let path = |tail: &str| format!("/instances/{id}{tail}");
    let (status, _) = send(
        &env,
        reqwest::Method::POST,
        &path("/tokens/refresh"),
        &platform,
    )
    .await;
    assert_eq!(status, 200);
    secrets.extend(secrets_of(&env, &element).await);
    let (status, _) = send(&env, reqwest::Method::DELETE, &path("/enabled"), &platform).await;
    assert_eq!(status, 200);
    let (status, _) = send(&env, reqwest::Method::PUT, &path("/enabled"), &platform).await;
    assert_eq!(status, 200);
    // The user revokes the app at the provider: the next refresh finds the grant gone.
    env.sandbox_post("/__sandbox/users/lena/revoke", json!({}))
        .await;
    let (status, _) = send(
        &env,
        reqwest::Method::POST,
        &path("/tokens/refresh"),
        &platform,
    )
    .await;
    assert_eq!(status, 409);
    // Re-authentication in place.
    let (code, state) = env.authorize(&env.org, "sandbox-generic", "lena").await;
    let patched = env
        .http
        .patch(env.api(&path("")))
        .header("authorization", &platform)
        .json(&json!({"providerData": {"code": code, "state": state}}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    secrets.extend(secrets_of(&env, &element).await);
    let (status, _) = send(&env, reqwest::Method::DELETE, &path(""), &platform).await;
    assert_eq!(status, 200);

    let expected = [
        "instance.created",
        "instance.token.refreshed",
        "instance.disabled",
        "instance.enabled",
        "instance.invalidated",
        "instance.reauthenticated",
        "instance.deleted",
    ];
    // Paginated two at a time, newest first, no duplicates.
    let events = all_pages(&env, &format!("/events?instanceId={id}"), "events", 2).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let mut oldest_first = types.clone();
    oldest_first.reverse();
    assert_eq!(oldest_first, expected, "[{label}]");
    let ids: std::collections::HashSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids.len(),
        events.len(),
        "[{label}] no duplicates across pages"
    );
    let invalidated = events
        .iter()
        .find(|e| e["type"] == "instance.invalidated")
        .unwrap();
    assert!(
        invalidated["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "[{label}] invalidated carries a reason: {invalidated}"
    );
    // Filtered by type.
    let (_, filtered) = env
        .get_json(&env.api("/events?type=instance.disabled"), &platform)
        .await;
    assert_eq!(
        filtered["events"].as_array().unwrap().len(),
        1,
        "{filtered}"
    );
    // Every event arrives as a webhook.
    assert!(
        eventually(Duration::from_secs(15), || async {
            received.lock().unwrap().len() >= expected.len()
        })
        .await,
        "[{label}] all webhooks arrive"
    );
    // No token or secret in any event or webhook body.
    let mut bodies: Vec<String> = events.iter().map(Value::to_string).collect();
    bodies.extend(
        received
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| body.clone()),
    );
    secrets.push(crate::harness::CLIENT_SECRET.to_string());
    secrets.push("lenas-signing-key".to_string());
    for body in &bodies {
        for secret in &secrets {
            assert!(
                !body.contains(secret.as_str()),
                "[{label}] a secret leaked into {body}"
            );
        }
    }
    // The audit log: each mutating call, who and under which request id, paginated.
    let audit = all_pages(&env, "/audit-logs", "auditLogs", 3).await;
    let actions: Vec<&str> = audit
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for action in [
        "instance.created",
        "instance.token.refreshed",
        "instance.disabled",
        "instance.enabled",
        "instance.invalidated",
        "instance.reauthenticated",
        "instance.deleted",
    ] {
        assert!(
            actions.contains(&action),
            "[{label}] {action} in {actions:?}"
        );
    }
    for entry in &audit {
        assert!(entry["requestId"].as_str().is_some(), "{entry}");
        assert!(entry["at"].as_str().is_some(), "{entry}");
    }
    let automatic = audit
        .iter()
        .find(|a| a["action"] == "instance.invalidated")
        .unwrap();
    assert!(
        automatic["userId"].is_null(),
        "an automatic change has no user"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

#[tokio::test]
async fn a_life_cycle_is_in_events_and_audit_logs_without_any_secret() {
    let scenarios = test_databases()
        .await
        .into_iter()
        .map(|(label, url)| life_cycle_scenario(label, url));
    futures_util::future::join_all(scenarios).await;
}

/// Salesforce's revocations cascade one way only (the refresh token's takes its access tokens):
/// a refresh token whose revocation failed for now is not revoked by revoking the access
/// token, so a deletion with `?revoke=true` keeps the instance for another try.
#[tokio::test]
async fn a_refresh_token_not_revoked_keeps_the_instance() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let platform = env.org.platform();
    let instance = env
        .create_instance(&env.org, "sandbox-salesforce", "sam")
        .await;
    let id = instance["id"].as_i64().unwrap();
    let (status, body) = delete_while_revocation_fails(&env, id, &platform, 1).await;
    assert_eq!(status, 502, "{body}");
    let (status, body) = send(
        &env,
        reqwest::Method::GET,
        &format!("/instances/{id}"),
        &platform,
    )
    .await;
    assert_eq!(status, 200, "the instance was deleted: {body}");
    // Invalid now, and said as a revocation says it: the event and the audit entry (it turned
    // invalid with neither, a black-box tester).
    let (_, events) = env
        .get_json(
            &env.api(&format!(
                "/events?instanceId={id}&type=instance.invalidated"
            )),
            &platform,
        )
        .await;
    assert_eq!(events["events"].as_array().unwrap().len(), 1, "{events}");
    let (_, audit) = env.get_json(&env.api("/audit-logs"), &platform).await;
    let target = id.to_string();
    let entry = audit["auditLogs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["action"] == "instance.revoked" && entry["target"] == target.as_str())
        .unwrap_or_else(|| panic!("{audit}"))
        .clone();
    assert!(
        entry["detail"]
            .as_str()
            .is_some_and(|d| d.contains("did not confirm")),
        "{entry}"
    );
    // Deleted without `?revoke=true`: the deletion's event and audit entry say the grant was
    // not revoked (once deleted, nothing can revoke it).
    let reason = deleted_saying(&env, id, &platform).await;
    assert!(reason.contains("not revoked at the provider"), "{reason}");
    let (_, audit) = env.get_json(&env.api("/audit-logs"), &platform).await;
    assert!(
        audit["auditLogs"].as_array().unwrap().iter().any(|entry| {
            entry["action"] == "instance.deleted"
                && entry["target"] == target.as_str()
                && entry["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("not revoked at the provider"))
        }),
        "{audit}"
    );
    // Revoked before (confirmed), then deleted without `?revoke=true`: said so.
    let revoked = env
        .create_instance(&env.org, "sandbox-salesforce", "sam")
        .await;
    let revoked_id = revoked["id"].as_i64().unwrap();
    let (status, body) = send(
        &env,
        reqwest::Method::POST,
        &format!("/instances/{revoked_id}/tokens/revoke"),
        &platform,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let reason = deleted_saying(&env, revoked_id, &platform).await;
    assert!(
        reason.contains("revoked at the provider before"),
        "{reason}"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

#[tokio::test]
async fn revocation_reaches_the_sandbox_in_each_shape() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let platform = env.org.platform();
    for (element, user) in [
        ("sandbox-adobe-sign", "ada"),
        ("sandbox-salesforce", "sal"),
        ("sandbox-microsoft", "mia"),
        ("sandbox-box", "bob"),
        ("sandbox-generic", "gil"),
    ] {
        let instance = env.create_instance(&env.org, element, user).await;
        let id = instance["id"].as_i64().unwrap();
        let token = instance["token"].as_str().unwrap();
        let before = env.sandbox_stats().await["revoke"].as_u64().unwrap();
        let errors_before = env.sandbox_stats().await["revokeErrors"].clone();
        let (status, body) = send(
            &env,
            reqwest::Method::POST,
            &format!("/instances/{id}/tokens/revoke"),
            &platform,
        )
        .await;
        assert_eq!(status, 200, "{element}: {body}");
        assert_eq!(
            body["revocation"]["revokedAtProvider"], true,
            "{element}: {body}"
        );
        // Nothing to tell: both tokens went (it said "the refresh token was not revoked"
        // after revoking it, when the access token's revocation came second).
        assert_eq!(
            body["revocation"]["providerMessage"],
            Value::Null,
            "{element}: {body}"
        );
        assert_eq!(body["valid"], false, "{element}: {body}");
        let stats = env.sandbox_stats().await;
        assert!(
            stats["revoke"].as_u64().unwrap() > before,
            "{element}: the sandbox saw the revocation: {stats}"
        );
        // Salesforce's and Microsoft's access tokens die with the refresh token revoked first:
        // the second revocation finds it dead (an error there, ignored here).
        if !matches!(element, "sandbox-salesforce" | "sandbox-microsoft") {
            assert_eq!(
                stats["revokeErrors"], errors_before,
                "{element}: accepted: {stats}"
            );
        }
        let (status, body) = env
            .proxy(&env.org, token, reqwest::Method::GET, "api/me")
            .await;
        assert_eq!(status, 401, "{element}: {body}");
    }
    // A connector without a revocation endpoint: invalid here, and it says so.
    let sandbox = env.sandbox.url.clone();
    let response = env
        .http
        .post(env.api("/elements"))
        .header("authorization", &platform)
        .json(&json!({"key": "norevoke", "name": "No revocation",
            "baseUrl": format!("{sandbox}/generic/"),
            "oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"),
                      "tokenUrl": format!("{sandbox}/generic/token"), "scopes": ["api"]}}))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
    let instance = env.create_instance(&env.org, "norevoke", "nora").await;
    let id = instance["id"].as_i64().unwrap();
    let before = env.sandbox_stats().await["revoke"].as_u64().unwrap();
    let (status, body) = send(
        &env,
        reqwest::Method::POST,
        &format!("/instances/{id}/tokens/revoke"),
        &platform,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revocation"]["revokedAtProvider"], false, "{body}");
    assert!(
        body["revocation"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no revocation endpoint")),
        "{body}"
    );
    assert_eq!(body["valid"], false);
    assert_eq!(
        env.sandbox_stats().await["revoke"].as_u64().unwrap(),
        before
    );
    // DELETE ?revoke=true revokes, then deletes.
    register_generic_connector(&env, &env.org, "gone", json!({})).await;
    // Only the access token's revocation goes through: at this provider (RFC 7009) that ends
    // the access token alone, and the refresh token keeps the grant alive. Not revoked, then,
    // and the instance is kept (it was deleted, reported revoked, with a live grant).
    let partial = env.create_instance(&env.org, "gone", "pat").await;
    let partial_id = partial["id"].as_i64().unwrap();
    env.sandbox_post(
        "/__sandbox/faults",
        json!({"target": "revoke", "status": 503, "count": 1}),
    )
    .await;
    let (status, body) = send(
        &env,
        reqwest::Method::DELETE,
        &format!("/instances/{partial_id}?revoke=true"),
        &platform,
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["providerMessage"]
            .as_str()
            .is_some_and(|m| m.contains("the refresh token was not")),
        "{body}"
    );
    // Kept, and invalid (the DELETE made it so before it asked the provider, so that a
    // process dying meanwhile leaves no valid instance on revoked tokens), saying why.
    let (status, body) = send(
        &env,
        reqwest::Method::GET,
        &format!("/instances/{partial_id}"),
        &platform,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["valid"], false, "{body}");
    assert!(
        body["providerMessage"]
            .as_str()
            .is_some_and(|m| m.contains("the DELETE can be sent again")),
        "{body}"
    );
    // A provider that refuses both revocations (its endpoint answers 404: a 4xx without a
    // passing error code will not change on a retry): the instance is deleted all the same,
    // and the answer says the grant was not revoked.
    generic_revocation_mode(&env, "none").await;
    let (status, body) = send(
        &env,
        reqwest::Method::DELETE,
        &format!("/instances/{partial_id}?revoke=true"),
        &platform,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revocation"]["revokedAtProvider"], false, "{body}");
    assert_eq!(body["revocation"]["retryable"], false, "{body}");
    let (status, _) = send(
        &env,
        reqwest::Method::GET,
        &format!("/instances/{partial_id}"),
        &platform,
    )
    .await;
    assert_eq!(status, 404, "deleted after the refusal");
    generic_revocation_mode(&env, "cascade").await;
    // `tokens/revoke` while the provider fails: invalid all the same (the contract), the
    // instance says the provider did not confirm it, and the answer is no 200 (a script took
    // it for a revocation), with the provider's words once (both tokens' 503s are alike).
    let unconfirmed = env.create_instance(&env.org, "gone", "una").await;
    let unconfirmed_path = format!("/instances/{}/tokens/revoke", unconfirmed["id"]);
    env.sandbox_post(
        "/__sandbox/faults",
        json!({"target": "revoke", "status": 503, "count": 2}),
    )
    .await;
    let (status, body) = send(&env, reqwest::Method::POST, &unconfirmed_path, &platform).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("send the revocation again")),
        "{body}"
    );
    let said = body["providerMessage"].as_str().unwrap().to_string();
    assert!(!said.contains("; "), "told once: {said}");
    let (_, shown) = send(
        &env,
        reqwest::Method::GET,
        &format!("/instances/{}", unconfirmed["id"]),
        &platform,
    )
    .await;
    assert_eq!(shown["valid"], false, "{shown}");
    assert!(
        shown["providerMessage"]
            .as_str()
            .is_some_and(|m| m.contains("did not confirm")),
        "{shown}"
    );
    // Sent again, the provider confirms it; the instance was invalidated once.
    let (status, body) = send(&env, reqwest::Method::POST, &unconfirmed_path, &platform).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revocation"]["revokedAtProvider"], true, "{body}");
    let (_, events) = send(
        &env,
        reqwest::Method::GET,
        &format!(
            "/events?instanceId={}&type=instance.invalidated",
            unconfirmed["id"]
        ),
        &platform,
    )
    .await;
    assert_eq!(
        events["events"].as_array().unwrap().len(),
        1,
        "one invalidation: {events}"
    );
    let instance = env.create_instance(&env.org, "gone", "gail").await;
    let id = instance["id"].as_i64().unwrap();
    // A revocation endpoint that fails: the instance is kept, to be revoked later.
    let (status, body) = delete_while_revocation_fails(&env, id, &platform, 2).await;
    assert_eq!(status, 502, "{body}");
    assert!(body["providerMessage"].is_string(), "{body}");
    let (status, _) = send(
        &env,
        reqwest::Method::GET,
        &format!("/instances/{id}"),
        &platform,
    )
    .await;
    assert_eq!(status, 200, "kept after the failed revocation");
    // A 4xx that says the provider cannot answer just now (`temporarily_unavailable`): kept
    // too. It deleted the instance, and the grant lived on at the provider.
    let (status, body) = delete_while_revocation_answers(&env, id, &platform, 400, 2).await;
    assert_eq!(status, 502, "{body}");
    let (status, _) = send(
        &env,
        reqwest::Method::GET,
        &format!("/instances/{id}"),
        &platform,
    )
    .await;
    assert_eq!(status, 200, "kept after the refused revocation");
    // The app's credentials refused (the provider takes another client authentication now):
    // kept, 409, until they are fixed. It was deleted, and the grant lived on.
    set_generic_profile(&env, json!({"clientAuthMethods": ["client_secret_post"]})).await;
    let (status, body) = send(
        &env,
        reqwest::Method::DELETE,
        &format!("/instances/{id}?revoke=true"),
        &platform,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["providerMessage"]
            .as_str()
            .is_some_and(|m| m.contains("invalid_client")),
        "{body}"
    );
    set_generic_profile(
        &env,
        json!({"clientAuthMethods": ["client_secret_basic", "client_secret_post"]}),
    )
    .await;
    let (status, _) = send(
        &env,
        reqwest::Method::GET,
        &format!("/instances/{id}"),
        &platform,
    )
    .await;
    assert_eq!(status, 200, "kept after the app's credentials were refused");
    let before = env.sandbox_stats().await["revoke"].as_u64().unwrap();
    let (status, body) = send(
        &env,
        reqwest::Method::DELETE,
        &format!("/instances/{id}?revoke=true"),
        &platform,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revocation"]["revokedAtProvider"], true, "{body}");
    assert!(env.sandbox_stats().await["revoke"].as_u64().unwrap() > before);
    let (status, _) = send(
        &env,
        reqwest::Method::GET,
        &format!("/instances/{id}"),
        &platform,
    )
    .await;
    assert_eq!(status, 404);
    let (_, events) = env
        .get_json(&env.api(&format!("/events?instanceId={id}")), &platform)
        .await;
    assert_eq!(events["events"][0]["type"], "instance.deleted");
    env.stop().await;
    drop_test_database(&url).await;
}

/// A receiver that never answers holds one delivery slot until its timeout (10 s), not the
/// deliverer: an event for another receiver that falls due meanwhile arrives at once. (The
/// deliverer used to claim a batch and wait for all of it before claiming again.)
#[tokio::test]
async fn a_hanging_receiver_does_not_hold_up_other_deliveries() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_url = format!("http://{}/hook", hanging.local_addr().unwrap());
    let accepted = Arc::new(tokio::sync::Notify::new());
    let on_accept = Arc::clone(&accepted);
    // Set when the deliverer gives up on the hanging receiver (its 10 s timeout): the other
    // event must have arrived before that.
    let hang_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_end = Arc::clone(&hang_ended);
    let holder = tokio::spawn(async move {
        while let Ok((mut stream, _)) = hanging.accept().await {
            on_accept.notify_one();
            let on_end = Arc::clone(&on_end);
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buffer = [0u8; 4096];
                // Read and never answer, until the deliverer closes its end.
                while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
                on_end.store(true, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    let (hook, received) = receiver(0).await;
    create_with(&env, &env.org, "sandbox-generic", "hung",
                json!({"event.notification.enabled": "true", "event.notification.callback.url": hanging_url})).await;
    // The deliverer is in the hanging delivery.
    tokio::time::timeout(std::time::Duration::from_secs(10), accepted.notified())
        .await
        .expect("the hanging receiver was called");
    create_with(
        &env,
        &env.org,
        "sandbox-generic",
        "quick",
        json!({"event.notification.enabled": "true", "event.notification.callback.url": hook}),
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while received.lock().unwrap().is_empty() {
        assert!(
            !hang_ended.load(std::sync::atomic::Ordering::SeqCst),
            "[{label}] the other receiver's event waited for the hanging one"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "[{label}] no delivery"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        !hang_ended.load(std::sync::atomic::Ordering::SeqCst),
        "[{label}] the other receiver's event waited for the hanging one"
    );
    holder.abort();
    env.stop().await;
    drop_test_database(&url).await;
}

/// Organizations whose receivers all hang hold the delivery slots only down to a reserve: four
/// of them, five webhooks each, took all sixteen slots, and another organization's webhook
/// waited for their 10 s timeouts (hours, with a backlog of retries).
#[tokio::test]
async fn hanging_receivers_of_several_organizations_leave_a_slot_for_another() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_url = format!("http://{}/hook", hanging.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let hang_ended = Arc::new(AtomicBool::new(false));
    let holder = {
        let (accepted, hang_ended) = (Arc::clone(&accepted), Arc::clone(&hang_ended));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = hanging.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let hang_ended = Arc::clone(&hang_ended);
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buffer = [0u8; 4096];
                    while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
                    hang_ended.store(true, Ordering::SeqCst);
                });
            }
        })
    };
    for n in 0..4 {
        let org = env.new_org(&format!("hung-{n}")).await;
        for i in 0..5 {
            create_with(&env, &org, "sandbox-generic", &format!("hung-{n}-{i}"),
                        json!({"event.notification.enabled": "true", "event.notification.callback.url": hanging_url})).await;
        }
    }
    // The hanging deliveries have taken what they may.
    assert!(
        eventually(Duration::from_secs(10), || async {
            accepted.load(Ordering::SeqCst) >= 12
        })
        .await,
        "the hanging receivers were called"
    );
    let (hook, received) = receiver(0).await;
    let other = env.new_org("quick").await;
    create_with(
        &env,
        &other,
        "sandbox-generic",
        "quick",
        json!({"event.notification.enabled": "true", "event.notification.callback.url": hook}),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(8), || async {
            !received.lock().unwrap().is_empty() || hang_ended.load(Ordering::SeqCst)
        })
        .await,
        "nothing happened"
    );
    assert!(
        !received.lock().unwrap().is_empty() && !hang_ended.load(Ordering::SeqCst),
        "the other organization's webhook waited for the hanging ones ({} of them called)",
        accepted.load(Ordering::SeqCst)
    );
    holder.abort();
    env.stop().await;
    drop_test_database(&url).await;
}

/// Webhooks of one instance go out in the order of its events: when the first one fails, the
/// events written after it wait for its retry instead of arriving before it (a receiver that
/// saw `instance.enabled` before `instance.disabled` would think the instance off).
#[tokio::test]
async fn webhooks_of_one_instance_arrive_in_the_order_of_their_events() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let (hook, received) = receiver(1).await;
        let platform = env.org.platform();
        let instance = create_with(
            &env,
            &env.org,
            "sandbox-generic",
            "orderly",
            json!({"event.notification.enabled": "true", "event.notification.callback.url": hook}),
        )
        .await;
        let id = instance["id"].as_i64().unwrap();
        // `instance.created` is refused once; its retry comes a second later.
        assert!(
            eventually(Duration::from_secs(10), || async {
                !received.lock().unwrap().is_empty()
            })
            .await,
            "[{label}] the first webhook did not come"
        );
        let path = |tail: &str| format!("/instances/{id}{tail}");
        for (method, tail) in [
            (reqwest::Method::DELETE, "/enabled"),
            (reqwest::Method::PUT, "/enabled"),
            (reqwest::Method::POST, "/tokens/refresh"),
        ] {
            let (status, body) = send(&env, method, &path(tail), &platform).await;
            assert_eq!(status, 200, "[{label}] {tail}: {body}");
        }
        assert!(
            eventually(Duration::from_secs(20), || async {
                received.lock().unwrap().len() >= 5
            })
            .await,
            "[{label}] not every webhook came: {}",
            received.lock().unwrap().len()
        );
        let types: Vec<String> = received.lock().unwrap()[1..]
            .iter()
            .map(|(headers, _)| {
                headers["x-tokenwarden-event-type"]
                    .to_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            types,
            [
                "instance.created",
                "instance.disabled",
                "instance.enabled",
                "instance.token.refreshed"
            ],
            "[{label}] webhooks delivered out of order"
        );
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// An instance whose events go to `hook`, created and then disabled (two events in order);
/// its id.
async fn created_then_disabled(env: &Env, name: &str, hook: &str) -> i64 {
    let instance = create_with(
        env,
        &env.org,
        "sandbox-generic",
        name,
        json!({"event.notification.enabled": "true", "event.notification.callback.url": hook}),
    )
    .await;
    let id = instance["id"].as_i64().unwrap();
    let (status, body) = send(
        env,
        reqwest::Method::DELETE,
        &format!("/instances/{id}/enabled"),
        &env.org.platform(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    id
}

/// A webhook its receiver keeps refusing holds the later ones of its instance only for its
/// first attempts: after about half a minute they go out (it used to be a day).
#[tokio::test]
async fn a_webhook_that_keeps_failing_stops_holding_the_later_ones() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let (hook, received) =
        refusing_receiver(|headers, _| headers["x-tokenwarden-event-type"] == "instance.created")
            .await;
    created_then_disabled(&env, "stubborn", &hook).await;
    let disabled_arrived = || {
        received
            .lock()
            .unwrap()
            .iter()
            .any(|(headers, _)| headers["x-tokenwarden-event-type"] == "instance.disabled")
    };
    assert!(
        // Five ordered attempts back off for 15.5–31 s in all, with jitter.
        eventually(Duration::from_secs(75), || async { disabled_arrived() }).await,
        "[{label}] the later webhook is still held"
    );
    let refusals = received
        .lock()
        .unwrap()
        .iter()
        .filter(|(headers, _)| headers["x-tokenwarden-event-type"] == "instance.created")
        .count();
    assert!(
        refusals >= 5,
        "[{label}] held during the first attempts: {refusals}"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A receiver answering 410 Gone says the URL is gone for good: the event is given up at
/// once, with that reason, and holds nothing back (it was tried for a day, like a 500).
#[tokio::test]
async fn a_webhook_answered_gone_is_not_tried_again() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let (hook, received) = refusing_receiver_with(StatusCode::GONE, |headers, _, _| {
        headers["x-tokenwarden-event-type"] == "instance.created"
    })
    .await;
    let id = created_then_disabled(&env, "gone", &hook).await;
    let arrived = |kind: &str| {
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|(headers, _)| headers["x-tokenwarden-event-type"] == kind)
            .count()
    };
    // The first retry of a 500 comes after 0.5–1 s: waiting past it shows none comes.
    assert!(
        eventually(Duration::from_secs(10), || async {
            arrived("instance.disabled") == 1
        })
        .await,
        "[{label}] the later webhook was held"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(arrived("instance.created"), 1, "[{label}] tried again");
    let (_, events) = env
        .get_json(
            &env.api(&format!("/events?instanceId={id}")),
            &env.org.platform(),
        )
        .await;
    let created = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|event| event["type"] == "instance.created")
        .unwrap();
    assert_eq!(
        created["delivery"]["state"], "failed",
        "[{label}] {created}"
    );
    assert!(
        created["delivery"]["lastError"]
            .as_str()
            .unwrap()
            .contains("410 Gone"),
        "[{label}] {created}"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// `instance.recovered` is written in the commit's transaction, exactly when the commit ends a
/// failure streak (the store call the refresh engine is to use instead of a separate insert).
#[tokio::test]
async fn recovered_is_written_with_the_commit_that_ends_a_failure_streak() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let instance = env
        .create_instance(&env.org, "sandbox-generic", "rita")
        .await;
    let id = instance["id"].as_i64().unwrap();
    let app = std::sync::Arc::clone(&env.server.app);
    let row = app.store.get_instance_by_id(id).await.unwrap().unwrap();
    let event = |kind: &str| tokenwarden::events::new_event(&app, &row, kind, None);
    let now = tokenwarden::app::now_ms();
    app.store
        .record_transient_failure(id, "x", now, "503", now, None, None, None)
        .await
        .unwrap();
    let version = app
        .store
        .get_instance_by_id(id)
        .await
        .unwrap()
        .unwrap()
        .token_version;
    let update = tokenwarden::store::TokenUpdate::default();
    let (refreshed, recovered) = (
        event("instance.token.refreshed"),
        event("instance.recovered"),
    );
    assert!(
        app.store
            .commit_refreshed_tokens_recovering(
                id,
                "x",
                version,
                &update,
                Some(&refreshed),
                Some(&recovered)
            )
            .await
            .unwrap()
    );
    // Not failing any more: a second commit writes no recovered event.
    let (again, not_recovered) = (
        event("instance.token.refreshed"),
        event("instance.recovered"),
    );
    assert!(
        app.store
            .commit_refreshed_tokens_recovering(
                id,
                "x",
                version + 1,
                &update,
                Some(&again),
                Some(&not_recovered)
            )
            .await
            .unwrap()
    );
    let (_, events) = env
        .get_json(
            &env.api(&format!("/events?instanceId={id}")),
            &env.org.platform(),
        )
        .await;
    let types: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types.iter().filter(|t| **t == "instance.recovered").count(),
        1,
        "[{label}] {types:?}"
    );
    assert_eq!(
        types
            .iter()
            .filter(|t| **t == "instance.token.refreshed")
            .count(),
        2
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// During a rotation of the master key, replicas hold different keys for a while: an event
/// one replica sealed under the new key, claimed by one that has only the old key, waits for a
/// replica that can open it (it was marked failed for good, and the webhook never sent).
#[tokio::test]
async fn a_webhook_sealed_under_a_key_this_replica_lacks_waits_for_one_that_has_it() {
    let url = match crate::support::create_postgres_database().await {
        Ok(url) => url,
        Err(error) => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{error}");
            eprintln!("skipped: PostgreSQL unavailable ({error})");
            return;
        }
    };
    const NEW_KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    // Replica A, not yet given the new key, delivers webhooks.
    let env = Env::start("postgres", &url).await;
    let (hook, received) = receiver(0).await;
    // Replica B, already restarted with the new key (and the old one), delivers none.
    let b = crate::harness::start_server(&url, &env.sandbox.url, |config| {
        config.master_key = Some(NEW_KEY.to_string());
        config.previous_master_keys = Some(crate::harness::TEST_MASTER_KEY.to_string());
        config.background_tasks = false;
    })
    .await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "rotating")
        .await;
    let id = created["id"].as_i64().unwrap();
    let through_b = |path: &str| format!("{}/elements/api-v2{path}", b.url);
    let patched = env
        .http
        .patch(through_b(&format!("/instances/{id}")))
        .header("authorization", env.org.platform())
        .json(
            &json!({"configuration": {"event.notification.enabled": "true",
                                        "event.notification.callback.url": hook}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    // B refreshes: its event is sealed under the new key.
    let refreshed = env
        .http
        .post(through_b(&format!("/instances/{id}/tokens/refresh")))
        .header("authorization", env.org.platform())
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 200);
    let delivery = || async {
        let (status, body) = env
            .get_json(
                &env.api(&format!(
                    "/events?instanceId={id}&type=instance.token.refreshed"
                )),
                &env.org.platform(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["events"][0]["delivery"].clone()
    };
    // A tried it, and keeps it for later.
    let tried = crate::refresh::eventually("A's attempt", Duration::from_secs(15), || async {
        let delivery = delivery().await;
        (delivery["attempts"].as_i64().unwrap_or(0) >= 1).then_some(delivery)
    })
    .await;
    assert_eq!(tried["state"], "pending", "{tried}");
    assert!(received.lock().unwrap().is_empty());
    // A replica with the new key takes over the delivery.
    let Env {
        server, sandbox, ..
    } = env;
    server.shutdown().await;
    let c = crate::harness::start_server(&url, &sandbox.url, |config| {
        config.master_key = Some(NEW_KEY.to_string());
        config.previous_master_keys = Some(crate::harness::TEST_MASTER_KEY.to_string());
    })
    .await;
    crate::refresh::eventually("the webhook", Duration::from_secs(30), || async {
        let received = received.lock().unwrap();
        received
            .iter()
            .any(|(_, body)| body.contains("instance.token.refreshed"))
            .then_some(())
    })
    .await;
    c.shutdown().await;
    b.shutdown().await;
    drop_test_database(&url).await;
}

/// Events still queued go where the instance sends its webhooks now, signed with its key now:
/// a receiver moved off a dead URL, or a key rotated after a leak, takes them too (they were
/// retried at the old URL, under the old key, for a day).
#[tokio::test]
async fn queued_webhooks_follow_the_instance_s_url_and_key() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let (old_hook, old_received) = refusing_receiver(|_, _| true).await;
    let (new_hook, new_received) = receiver(0).await;
    let instance = create_with(
        &env,
        &env.org,
        "sandbox-generic",
        "moving",
        json!({"event.notification.enabled": "true", "event.notification.callback.url": old_hook,
               "event.notification.signature.key": "key-one"}),
    )
    .await;
    let id = instance["id"].as_i64().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            !old_received.lock().unwrap().is_empty()
        })
        .await,
        "[{label}] the first attempt"
    );
    let patch = |configuration: Value| {
        let request = env
            .http
            .patch(env.api(&format!("/instances/{id}")))
            .header("authorization", env.org.platform())
            .json(&json!({ "configuration": configuration }));
        async move { request.send().await.unwrap().status() }
    };
    let status = patch(json!({"event.notification.callback.url": new_hook,
                              "event.notification.signature.key": "key-two"}))
    .await;
    assert_eq!(status, 200);
    assert!(
        eventually(Duration::from_secs(15), || async {
            !new_received.lock().unwrap().is_empty()
        })
        .await,
        "[{label}] the queued webhook went to the new URL"
    );
    let (headers, body) = new_received.lock().unwrap()[0].clone();
    assert_eq!(headers["x-tokenwarden-event-type"], "instance.created");
    let signature = headers["x-tokenwarden-signature"].to_str().unwrap();
    assert!(
        signature_verifies(signature, &body, b"key-two"),
        "{signature}"
    );
    // Turned off: what is still queued is not sent, and says why.
    let (refusing, _) = refusing_receiver(|_, _| true).await;
    assert_eq!(
        patch(json!({"event.notification.callback.url": refusing})).await,
        200
    );
    let (status, _) = send(
        &env,
        reqwest::Method::DELETE,
        &format!("/instances/{id}/enabled"),
        &env.org.platform(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        patch(json!({"event.notification.enabled": "false"})).await,
        200
    );
    let given_up = || async {
        let (_, events) = env
            .get_json(
                &env.api(&format!("/events?instanceId={id}&type=instance.disabled")),
                &env.org.platform(),
            )
            .await;
        events["events"][0]["delivery"]["lastError"]
            .as_str()
            .is_some_and(|error| error.contains("turned off"))
    };
    assert!(
        eventually(Duration::from_secs(15), given_up).await,
        "[{label}] the queued webhook was given up"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A receiver that asks for a wait (`429`/`503` with `Retry-After`) gets it: the next attempt
/// comes no sooner (it came within a second).
#[tokio::test]
async fn a_receiver_s_retry_after_is_honoured() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let times: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
    let seen = Arc::clone(&times);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let seen = Arc::clone(&seen);
            async move {
                let mut seen = seen.lock().unwrap();
                seen.push(std::time::Instant::now());
                if seen.len() == 1 {
                    (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "4")]).into_response()
                } else {
                    StatusCode::OK.into_response()
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    create_with(
        &env,
        &env.org,
        "sandbox-generic",
        "patient",
        json!({"event.notification.enabled": "true", "event.notification.callback.url": hook}),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            times.lock().unwrap().len() >= 2
        })
        .await,
        "[{label}] tried again"
    );
    let times = times.lock().unwrap().clone();
    assert!(
        times[1] - times[0] >= Duration::from_millis(3_900),
        "[{label}] tried again after {:?}",
        times[1] - times[0]
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// With `--audit-retention-days`, entries older than the retention are deleted by the
/// service's minute-by-minute purge, the newer ones kept; without it the log is kept whole.
/// The log grew without end: a year of refreshes is millions of rows.
#[tokio::test]
async fn the_audit_log_is_purged_past_its_retention_only_when_one_is_set() {
    use tokenwarden::store::NewAudit;
    let day = 86_400_000;
    let now = tokenwarden::app::system_now_ms();
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let org = env.org.id;
    for (action, at) in [
        ("old-1", now - 3 * day),
        ("old-2", now - 2 * day),
        ("new", now),
    ] {
        env.server
            .app
            .store
            .insert_audit(&NewAudit {
                organization_id: org,
                user_id: None,
                action: action.to_string(),
                target: None,
                request_id: None,
                detail: None,
                at,
            })
            .await
            .unwrap();
    }
    let actions = async |env: &Env| {
        let rows = env
            .server
            .app
            .store
            .list_audit(org, 100, None)
            .await
            .unwrap();
        let mut actions: Vec<String> = rows.into_iter().map(|row| row.action).collect();
        actions.sort();
        actions
    };
    env.stop().await;
    // Restarted without a retention: a purge runs at the start, and keeps everything.
    let env = Env::start("sqlite", &url).await;
    assert!(
        !eventually(Duration::from_secs(2), async || actions(&env).await.len()
            < 3)
        .await,
        "{:?}",
        actions(&env).await
    );
    env.stop().await;
    let env = Env::start_adjusted("sqlite", &url, |config| {
        config.audit_retention = Some(Duration::from_secs(86_400));
    })
    .await;
    assert!(
        eventually(Duration::from_secs(10), async || actions(&env).await
            == ["new"])
        .await,
        "{:?}",
        actions(&env).await
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// `POST /events/webhook-secret` replaces the organization's webhook secret: GET shows the new
/// one, it signs every delivery from then on (a retry of an event made before included), the
/// old one verifies none of them, and the rotation is in the audit log. A receiver that refuses
/// what it cannot verify gets the event again once it has the new secret. A leaked secret could
/// not be replaced: any holder could forge the organization's webhooks for ever.
#[tokio::test]
async fn the_organization_webhook_secret_is_rotated() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let platform = env.org.platform();
    let (_, old) = send(
        &env,
        reqwest::Method::GET,
        "/events/webhook-secret",
        &platform,
    )
    .await;
    let old = old["webhookSecret"].as_str().unwrap().to_string();
    // The receiver knows one secret at a time, and refuses what it does not verify.
    let known = Arc::new(Mutex::new(old.clone()));
    let knows = Arc::clone(&known);
    let (hook, received) =
        refusing_receiver_with(StatusCode::UNAUTHORIZED, move |headers, body, _| {
            let signature = headers["x-tokenwarden-signature"].to_str().unwrap();
            !signature_verifies(signature, body, knows.lock().unwrap().as_bytes())
        })
        .await;
    let instance = create_with(
        &env,
        &env.org,
        "sandbox-generic",
        "rosa",
        json!({"event.notification.enabled": "true", "event.notification.callback.url": hook}),
    )
    .await;
    let id = instance["id"].as_i64().unwrap();
    let delivered = async |kind: &str| {
        let (_, events) = env
            .get_json(
                &env.api(&format!("/events?instanceId={id}&type={kind}")),
                &platform,
            )
            .await;
        events["events"][0]["delivery"]["state"] == "delivered"
    };
    assert!(
        eventually(Duration::from_secs(10), async || delivered(
            "instance.created"
        )
        .await)
        .await,
        "signed with the old secret"
    );

    let (status, rotated) = send(
        &env,
        reqwest::Method::POST,
        "/events/webhook-secret",
        &platform,
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["webhookSecret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    let (_, shown) = send(
        &env,
        reqwest::Method::GET,
        "/events/webhook-secret",
        &platform,
    )
    .await;
    assert_eq!(shown["webhookSecret"], new.as_str());
    // An event now: signed with the new secret, so the receiver (still with the old) refuses
    // it, until it takes the new one.
    let (status, _) = send(
        &env,
        reqwest::Method::POST,
        &format!("/instances/{id}/tokens/refresh"),
        &platform,
    )
    .await;
    assert_eq!(status, 200);
    let refused = async || {
        received.lock().unwrap().iter().any(|(headers, body)| {
            body.contains("instance.token.refreshed")
                && headers["x-tokenwarden-signature"].to_str().is_ok()
        })
    };
    assert!(eventually(Duration::from_secs(10), refused).await);
    assert!(!delivered("instance.token.refreshed").await);
    *known.lock().unwrap() = new.clone();
    assert!(
        eventually(Duration::from_secs(20), async || {
            delivered("instance.token.refreshed").await
        })
        .await,
        "delivered once the receiver has the new secret"
    );
    for (headers, body) in received.lock().unwrap().iter() {
        if body.contains("instance.token.refreshed") {
            let signature = headers["x-tokenwarden-signature"].to_str().unwrap();
            assert!(signature_verifies(signature, body, new.as_bytes()));
            assert!(!signature_verifies(signature, body, old.as_bytes()));
        }
    }
    let (_, audit) = env.get_json(&env.api("/audit-logs"), &platform).await;
    assert!(
        audit["auditLogs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|entry| entry["action"] == "webhook_secret.rotated"),
        "{audit}"
    );
    // Only with the organization secret.
    let (status, _) = send(
        &env,
        reqwest::Method::POST,
        "/events/webhook-secret",
        &env.org.through(instance["token"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 401);
    env.stop().await;
    drop_test_database(&url).await;
}

/// A revocation sent again to an instance it left invalid (confirmed by the provider or not)
/// announces no second `instance.invalidated`: each had an event id of its own, and a webhook
/// receiver took every one for a new loss of the connection.
#[tokio::test]
async fn a_revocation_sent_again_announces_no_second_invalidation() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let platform = env.org.platform();
    let sandbox = env.sandbox.url.trim_end_matches('/').to_string();
    crate::refresh::register_connector(
        &env,
        "unrevocable",
        json!({"oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"),
                         "tokenUrl": format!("{sandbox}/generic/token"),
                         "clientAuth": "client_secret_post", "pkce": false}}),
    )
    .await;
    for element in ["sandbox-generic", "unrevocable"] {
        let instance = env.create_instance(&env.org, element, "twice").await;
        let id = instance["id"].as_i64().unwrap();
        for _ in 0..3 {
            let (status, body) = send(
                &env,
                reqwest::Method::POST,
                &format!("/instances/{id}/tokens/revoke"),
                &platform,
            )
            .await;
            assert_eq!(status, 200, "{element}: {body}");
            assert_eq!(body["valid"], false, "{element}: {body}");
        }
        let (_, events) = env
            .get_json(
                &env.api(&format!(
                    "/events?instanceId={id}&type=instance.invalidated"
                )),
                &platform,
            )
            .await;
        assert_eq!(
            events["events"].as_array().unwrap().len(),
            1,
            "{element}: {events}"
        );
    }
    env.stop().await;
    drop_test_database(&url).await;
}
