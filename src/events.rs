//! Events: what happened to an instance, recorded in the outbox in the same transaction as the
//! state change, and delivered as signed webhooks when the instance asks for them.
//!
//! The stored payload is `{"event": <public body>, "delivery": {"url", "key"}}`: the public body
//! is what `GET /events` shows and what the webhook carries (never a token or secret); `key` is
//! the signing key, sealed, so a deleted instance's last event can still be signed.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

use crate::app::{App, now_ms};
use crate::crypto::{self, Binding};
use crate::instances::{iso8601, open_secrets, plain_configuration};
use crate::store::{DeliveryState, EventRow, InstanceRow, NewEvent};

pub const CREATED: &str = "instance.created";
pub const REFRESHED: &str = "instance.token.refreshed";
pub const REFRESH_FAILING: &str = "instance.refresh_failing";
pub const RECOVERED: &str = "instance.recovered";
pub const INVALIDATED: &str = "instance.invalidated";
pub const REAUTHENTICATED: &str = "instance.reauthenticated";
pub const DISABLED: &str = "instance.disabled";
pub const ENABLED: &str = "instance.enabled";
pub const DELETED: &str = "instance.deleted";
pub const REVOKED: &str = "instance.revoked";

/// Builds the outbox row of an event about `row`. Delivery is pending when the instance has
/// `event.notification.enabled: "true"` and a callback URL.
pub fn new_event(app: &App, row: &InstanceRow, event_type: &str, reason: Option<&str>) -> NewEvent {
    let id = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    let body = json!({
        "id": id,
        "type": event_type,
        "instanceId": row.id,
        "instanceName": row.name,
        "elementKey": row.element_key,
        "organizationId": row.organization_id,
        "occurredAt": iso8601(now),
        "reason": reason,
    });
    let configuration = plain_configuration(row);
    let enabled = configuration
        .get("event.notification.enabled")
        .and_then(Value::as_str)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let url = configuration
        .get("event.notification.callback.url")
        .and_then(Value::as_str)
        .filter(|url| !url.is_empty())
        .map(str::to_string);
    let mut payload = Map::new();
    payload.insert("event".into(), body);
    let delivery_state = match (enabled, url) {
        (true, Some(url)) => {
            // An empty key means "the organization's webhook secret", read at delivery.
            let sealed = app.keyring.seal(
                &signing_key(app, row),
                Binding {
                    table: "events",
                    row: 0,
                    field: &id,
                },
            );
            payload.insert(
                "delivery".into(),
                json!({"url": url, "key": STANDARD.encode(sealed)}),
            );
            DeliveryState::Pending
        }
        _ => DeliveryState::None,
    };
    NewEvent {
        id,
        organization_id: row.organization_id,
        instance_id: Some(row.id),
        element_key: Some(row.element_key.clone()),
        event_type: event_type.to_string(),
        reason: reason.map(str::to_string),
        occurred_at: now,
        payload: Value::Object(payload).to_string(),
        next_attempt_at: (delivery_state == DeliveryState::Pending).then_some(now),
        delivery_state,
    }
}

/// The instance's `event.notification.signature.key`, else the organization's webhook secret.
fn signing_key(app: &App, row: &InstanceRow) -> Vec<u8> {
    open_secrets(app, row)
        .ok()
        .and_then(|secrets| {
            secrets
                .secret_configuration
                .get("event.notification.signature.key")
                .cloned()
        })
        .unwrap_or_default()
        .into_bytes()
}

/// The public body of a stored event.
pub fn public_body(row: &EventRow) -> Value {
    serde_json::from_str::<Value>(&row.payload)
        .ok()
        .and_then(|payload| payload.get("event").cloned())
        .unwrap_or_else(|| json!({"id": row.id, "type": row.event_type}))
}

/// Delivers due webhooks once. Returns how many were attempted.
pub async fn deliver_due(app: &App) -> usize {
    let now = now_ms();
    let Ok(due) = app
        .store
        .claim_pending_deliveries(now, 50, now + 60_000)
        .await
    else {
        return 0;
    };
    let count = due.len();
    for event in due {
        let outcome = deliver_one(app, &event).await;
        let _ = app
            .store
            .mark_delivery(&event.id, outcome.0, outcome.1.as_deref())
            .await;
    }
    count
}

async fn deliver_one(
    app: &App,
    event: &EventRow,
) -> (crate::store::DeliveryOutcome, Option<String>) {
    use crate::store::DeliveryOutcome;
    let payload: Value = serde_json::from_str(&event.payload).unwrap_or(Value::Null);
    let body = payload
        .get("event")
        .cloned()
        .unwrap_or(Value::Null)
        .to_string();
    let Some(url) = payload.pointer("/delivery/url").and_then(Value::as_str) else {
        return (DeliveryOutcome::Failed, Some("no callback URL".into()));
    };
    let mut key = payload
        .pointer("/delivery/key")
        .and_then(Value::as_str)
        .and_then(|text| STANDARD.decode(text).ok())
        .and_then(|sealed| {
            app.keyring
                .open(
                    &sealed,
                    Binding {
                        table: "events",
                        row: 0,
                        field: &event.id,
                    },
                )
                .ok()
        })
        .unwrap_or_default();
    if key.is_empty() {
        key = organization_webhook_secret(app, event.organization_id)
            .await
            .unwrap_or_default();
    }
    let timestamp = now_ms() / 1000;
    let signature = crypto::sign_event(&key, timestamp, body.as_bytes());
    let result = app
        .http
        .post(url)
        .header("content-type", "application/json")
        .header("x-tokenwarden-signature", signature)
        .header("x-tokenwarden-event-id", &event.id)
        .header("x-tokenwarden-event-type", &event.event_type)
        .body(body)
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await;
    let error = match result {
        Ok(response) if response.status().is_success() => {
            return (DeliveryOutcome::Delivered { at: now_ms() }, None);
        }
        Ok(response) => format!("the receiver answered {}", response.status()),
        Err(error) => format!(
            "the receiver could not be reached: {}",
            crate::oauth::transport_message(&error)
        ),
    };
    // Exponential backoff with jitter, for up to a day.
    let attempts = event.attempts + 1;
    let age = now_ms() - event.occurred_at;
    if age > 24 * 3600 * 1000 {
        return (DeliveryOutcome::Failed, Some(error));
    }
    let base = (5_000i64 << attempts.min(14)).min(3_600_000);
    let jitter = (u64::from_le_bytes(crypto::random_bytes::<8>()) % (base as u64 / 2 + 1)) as i64;
    (
        DeliveryOutcome::RetryAt(now_ms() + base / 2 + jitter),
        Some(error),
    )
}

async fn organization_webhook_secret(app: &App, organization_id: i64) -> Option<Vec<u8>> {
    let organization = app.store.get_organization(organization_id).await.ok()??;
    app.keyring
        .open(
            &organization.webhook_secret_enc,
            Binding {
                table: "organizations",
                row: organization_id,
                field: "webhook_secret",
            },
        )
        .ok()
}
