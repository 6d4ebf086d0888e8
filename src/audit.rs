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

async fn write(
    app: &App,
    organization_id: i64,
    user_id: Option<i64>,
    action: &str,
    target: Option<&str>,
    detail: Option<&str>,
) {
    let entry = NewAudit {
        organization_id,
        user_id,
        action: action.to_string(),
        target: target.map(str::to_string),
        request_id: Some(current_request_id()),
        detail: detail.map(str::to_string),
        at: now_ms(),
    };
    if let Err(error) = app.store.insert_audit(&entry).await {
        tracing::warn!("could not write an audit line for {action}: {error}");
    }
}
