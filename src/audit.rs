//! The audit log: who did what, when, under which request id. Every mutating platform call
//! records a line; automatic state changes are recorded by the engine with no user.

use crate::app::{App, now_ms};
use crate::http::caller::Caller;
use crate::http::error::current_request_id;
use crate::store::NewAudit;

pub async fn record(
    app: &App,
    caller: &Caller,
    action: &str,
    target: Option<&str>,
    detail: Option<&str>,
) {
    write(
        app,
        caller.organization_id,
        Some(caller.user_id),
        action,
        target,
        detail,
    )
    .await;
}

pub async fn record_automatic(
    app: &App,
    organization_id: i64,
    action: &str,
    target: Option<&str>,
    detail: Option<&str>,
) {
    write(app, organization_id, None, action, target, detail).await;
}

/// [`record`] for an action that must not happen unrecorded (handing out a secret): the entry
/// is written first, and its failure is the caller's.
pub async fn record_first(
    app: &App,
    caller: &Caller,
    action: &str,
    target: Option<&str>,
) -> Result<(), crate::store::StoreError> {
    app.store
        .insert_audit(&entry(
            caller.organization_id,
            Some(caller.user_id),
            action,
            target,
            None,
        ))
        .await
        .map(|_| ())
}

fn entry(
    organization_id: i64,
    user_id: Option<i64>,
    action: &str,
    target: Option<&str>,
    detail: Option<&str>,
) -> NewAudit {
    NewAudit {
        organization_id,
        user_id,
        action: action.to_string(),
        target: target.map(str::to_string),
        request_id: Some(current_request_id()),
        detail: detail.map(str::to_string),
        at: now_ms(),
    }
}

async fn write(
    app: &App,
    organization_id: i64,
    user_id: Option<i64>,
    action: &str,
    target: Option<&str>,
    detail: Option<&str>,
) {
    let entry = entry(organization_id, user_id, action, target, detail);
    if let Err(error) = app.store.insert_audit(&entry).await {
        tracing::warn!("could not write an audit line for {action}: {error}");
    }
}
