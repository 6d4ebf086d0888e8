//! `GET /events[?instanceId=…&type=…&before=…&limit=…]` and `GET /audit-logs`, newest first,
//! paginated with an opaque `before` cursor.

use std::collections::HashMap;

use axum::Json as AxumJson;
use axum::extract::State;

use super::json::Query;
use serde_json::{Value, json};

use super::caller::Caller;
use super::error::{ApiError, ApiResult};
use crate::app::SharedApp;
use crate::instances::iso8601;
use crate::store::{EventCursor, EventFilter};

fn limit(query: &HashMap<String, String>) -> ApiResult<i64> {
    match query.get("limit") {
        None => Ok(100),
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::bad_request("`limit` is a number from 1 to 1000")),
    }
}

#[utoipa::path(
    get,
    path = "/elements/api-v2/events",
    operation_id = "events_list",
    tag = "events",
    summary = "Events, newest first; `?instanceId=&type=&before=&limit=`",
    params(("instanceId" = Option<i64>, Query, description = "one instance's events"), ("type" = Option<String>, Query, description = "one event type, e.g. instance.invalidated"), ("before" = Option<String>, Query, description = "the `next` cursor of the previous page (a string)"), ("limit" = Option<i64>, Query, description = "page size, 1 to 1000")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "A page of events", body = crate::openapi::EventsPage),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn list(
    State(app): State<SharedApp>,
    caller: Caller,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<AxumJson<Value>> {
    let instance_id = match query.get("instanceId") {
        Some(text) => Some(
            text.parse::<i64>()
                .map_err(|_| ApiError::bad_request("`instanceId` is a number"))?,
        ),
        None => None,
    };
    // With only an Element token, a caller sees its own instance's events; another id is
    // one it may not see (404, as for ids that do not exist), not a request for its own.
    let instance_id = match (&caller.element, caller.has_organization_secret) {
        (Some(row), false) => {
            if instance_id.is_some_and(|asked| asked != row.id) {
                return Err(ApiError::not_found(format!(
                    "There is no instance {}",
                    instance_id.unwrap_or_default()
                )));
            }
            Some(row.id)
        }
        _ => instance_id,
    };
    let before = match query.get("before") {
        Some(cursor) => {
            let (at, id) = cursor
                .split_once('_')
                .and_then(|(at, id)| at.parse::<i64>().ok().map(|at| (at, id.to_string())))
                .ok_or_else(|| {
                    ApiError::bad_request("`before` is a cursor from a previous page")
                })?;
            Some(EventCursor {
                occurred_at: at,
                id,
            })
        }
        None => None,
    };
    // One more than the page: whether another page follows (`next` is `null` on the last).
    let page = limit(&query)?;
    let mut rows = app
        .store
        .list_events(
            caller.organization_id,
            &EventFilter {
                instance_id,
                event_type: query.get("type").cloned(),
                before,
                limit: page + 1,
            },
        )
        .await?;
    let more = rows.len() as i64 > page;
    rows.truncate(page as usize);
    // An instance id this organization knows nothing of (another organization's, or none's)
    // is a 404, as everywhere; a deleted instance's events stay listed.
    if rows.is_empty()
        && let Some(id) = instance_id
        && app
            .store
            .get_instance(caller.organization_id, id)
            .await?
            .is_none()
        && app
            .store
            .list_events(
                caller.organization_id,
                &EventFilter {
                    instance_id: Some(id),
                    event_type: None,
                    before: None,
                    limit: 1,
                },
            )
            .await?
            .is_empty()
    {
        return Err(ApiError::not_found("There is no such instance"));
    }
    let next = rows
        .last()
        .filter(|_| more)
        .map(|row| format!("{}_{}", row.occurred_at, row.id));
    let events: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut body = crate::events::public_body(row);
            if let Some(object) = body.as_object_mut() {
                object.insert("delivery".into(), json!({"state": row.delivery_state, "attempts": row.attempts, "lastError": row.last_error}));
            }
            body
        })
        .collect();
    Ok(AxumJson(json!({"events": events, "next": next})))
}

#[utoipa::path(
    get,
    path = "/elements/api-v2/audit-logs",
    operation_id = "events_audit_logs",
    tag = "events",
    summary = "Who did what, newest first",
    params(("before" = Option<String>, Query, description = "the `next` cursor of the previous page (a string)"), ("limit" = Option<i64>, Query, description = "page size, 1 to 1000")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "A page of the audit log", body = crate::openapi::AuditLogsPage),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn audit_logs(
    State(app): State<SharedApp>,
    caller: Caller,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<AxumJson<Value>> {
    caller.require_organization()?;
    let before = match query.get("before") {
        Some(text) => Some(
            text.parse::<i64>()
                .map_err(|_| ApiError::bad_request("`before` is a cursor from a previous page"))?,
        ),
        None => None,
    };
    let page = limit(&query)?;
    let mut rows = app
        .store
        .list_audit(caller.organization_id, page + 1, before)
        .await?;
    let more = rows.len() as i64 > page;
    rows.truncate(page as usize);
    let next = rows.last().filter(|_| more).map(|row| row.id.to_string());
    let entries: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({"id": row.id, "userId": row.user_id, "userName": row.user_name, "action": row.action, "target": row.target,
                   "requestId": row.request_id, "detail": row.detail, "at": iso8601(row.at)})
        })
        .collect();
    Ok(AxumJson(json!({"auditLogs": entries, "next": next})))
}

/// `GET /events/webhook-secret`: the organization's webhook secret, the key of the
/// `X-Tokenwarden-Signature` HMAC for instances without their own
/// `event.notification.signature.key`. Needs the organization secret: whoever can manage the
/// organization can verify its webhooks.
#[utoipa::path(
    get,
    path = "/elements/api-v2/events/webhook-secret",
    operation_id = "events_webhook_secret",
    tag = "events",
    summary = "The organization's webhook secret (the signing key of events of instances without `event.notification.signature.key`)",
    security(("platform" = [])),
    responses(
        (status = 200, description = "The secret", body = crate::openapi::WebhookSecret),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn webhook_secret(
    State(app): State<SharedApp>,
    caller: Caller,
) -> ApiResult<AxumJson<Value>> {
    caller.require_organization()?;
    // Who read the key that signs the organization's events, recorded before it is handed
    // out: a database that cannot write (full) answers 503 rather than an unrecorded secret.
    crate::audit::record_first(&app, &caller, "webhook_secret.read", None).await?;
    let secret = crate::events::organization_webhook_secret_text(&app, caller.organization_id)
        .await?
        .ok_or_else(|| ApiError::internal("the organization's webhook secret could not be read"))?;
    Ok(webhook_secret_body(&secret))
}

fn webhook_secret_body(secret: &str) -> AxumJson<Value> {
    AxumJson(json!({
        "webhookSecret": secret,
        "signatureHeader": "X-Tokenwarden-Signature",
        "signatureScheme": "t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">"
    }))
}

/// `POST /events/webhook-secret`: a new webhook secret for the organization (one leaked, or
/// one a departing engineer knew). It signs every delivery from now on, retries of earlier
/// events included: the old one signs nothing more, and a receiver that refuses a webhook it
/// cannot verify gets it again, signed with the new one, once it has it.
#[utoipa::path(
    post,
    path = "/elements/api-v2/events/webhook-secret",
    operation_id = "events_rotate_webhook_secret",
    tag = "events",
    summary = "Replace the organization's webhook secret",
    description = "The new secret signs every delivery from now on, retries of earlier events included; the old one signs nothing more. A receiver that answers non-2xx to a webhook it cannot verify gets it again (retries go on for a day) signed with the new secret once it has it.",
    security(("platform" = [])),
    responses(
        (status = 200, description = "The new secret", body = crate::openapi::WebhookSecret),
        (status = 409, description = "Another request replaced the secret meanwhile", body = crate::openapi::ErrorBody),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn rotate_webhook_secret(
    State(app): State<SharedApp>,
    caller: Caller,
) -> ApiResult<AxumJson<Value>> {
    caller.require_organization()?;
    // Recorded first, as a read is: no secret changes hands unrecorded.
    crate::audit::record_first(&app, &caller, "webhook_secret.rotated", None).await?;
    let secret = crate::crypto::new_platform_secret();
    let sealed = app.keyring.seal_secret(
        &secret,
        crate::crypto::Binding {
            table: "organizations",
            row: caller.organization_id,
            field: "webhook_secret",
        },
    );
    // Over the secret read: of two rotations at once one wins, and the other is told, rather
    // than handed a secret that is no longer in force.
    let current = app
        .store
        .get_organization(caller.organization_id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such organization"))?;
    if !app
        .store
        .reseal_organization_webhook_secret(
            caller.organization_id,
            &current.webhook_secret_enc,
            &sealed,
        )
        .await?
    {
        return Err(ApiError::conflict(
            "The webhook secret was replaced by another request meanwhile: read the one in force with GET /events/webhook-secret",
        ));
    }
    Ok(webhook_secret_body(secret.expose()))
}
