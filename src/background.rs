//! Work the service does on its own, as named tasks that stop on shutdown:
//! - `scheduler`: sleeps until the next due instance (or a notification), claims a batch of due
//!   instances with a lease (on PostgreSQL `FOR UPDATE SKIP LOCKED`, so replicas share the work
//!   without a coordinator) and refreshes them through the same single-flight path as the proxy,
//!   with bounded concurrency;
//! - `recovery`: finds refreshes interrupted by a crash (in flight, lease expired) and finishes them;
//! - `deliverer`: sends due webhooks from the outbox.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::app::{SharedApp, now_ms};
use crate::refresh::LEASE_MS;

/// How many refreshes the scheduler runs at once.
const SCHEDULER_CONCURRENCY: usize = 16;
const SCHEDULER_BATCH: i64 = 64;
/// The longest the scheduler sleeps without looking (other replicas may add due work).
const SCHEDULER_MAX_SLEEP: Duration = Duration::from_secs(15);

pub fn spawn_all(app: &SharedApp, tasks: &mut JoinSet<()>, shutdown: &mut watch::Receiver<bool>) {
    if !app.config.background_tasks {
        return;
    }
    tasks.spawn(scheduler(Arc::clone(app), shutdown.clone()));
    tasks.spawn(recovery(Arc::clone(app), shutdown.clone()));
    tasks.spawn(deliverer(Arc::clone(app), shutdown.clone()));
}

async fn scheduler(app: SharedApp, mut shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(SCHEDULER_CONCURRENCY));
    let mut running = JoinSet::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let now = now_ms();
        let claimed = match app
            .store
            .claim_due_instances(now, SCHEDULER_BATCH, &app.replica_id, now + LEASE_MS)
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!("scheduler: could not claim due instances: {error}");
                Vec::new()
            }
        };
        let claimed_count = claimed.len();
        if claimed_count > 0 {
            metrics::histogram!("tokenwarden_scheduler_lag_seconds").record(
                claimed
                    .iter()
                    .filter_map(|row| row.next_due_at)
                    .map(|due| (now - due).max(0) as f64 / 1000.0)
                    .fold(0.0, f64::max),
            );
        }
        for row in claimed {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                break;
            };
            let app = Arc::clone(&app);
            running.spawn(async move {
                let id = row.id;
                let version = row.token_version;
                if let Err(failure) = app
                    .refresh
                    .refresh(&app, id, Some(version), Some(row))
                    .await
                {
                    tracing::debug!(
                        instance = id,
                        "scheduled refresh did not succeed: {failure:?}"
                    );
                }
                drop(permit);
            });
        }
        while running.try_join_next().is_some() {}
        if claimed_count as i64 == SCHEDULER_BATCH {
            continue; // More may be due right now.
        }
        let sleep = match app.store.next_due_time().await {
            Ok(Some(due)) => Duration::from_millis(
                (due - now_ms()).clamp(50, SCHEDULER_MAX_SLEEP.as_millis() as i64) as u64,
            ),
            _ => SCHEDULER_MAX_SLEEP,
        };
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = app.refresh.schedule_changed() => {}
            _ = shutdown.changed() => {}
        }
    }
    // Graceful: let running refreshes commit (their leases would expire anyway).
    let drain = async { while running.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(8), drain).await;
}

async fn recovery(app: SharedApp, mut shutdown: watch::Receiver<bool>) {
    loop {
        let now = now_ms();
        match app.store.instances_with_refresh_in_flight(now).await {
            Ok(rows) => {
                for row in rows {
                    tracing::warn!(
                        instance = row.id,
                        "finishing a refresh that was interrupted"
                    );
                    let _ = app
                        .refresh
                        .refresh(&app, row.id, Some(row.token_version), None)
                        .await;
                }
            }
            Err(error) => tracing::warn!("recovery: {error}"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = shutdown.changed() => break,
        }
    }
}

async fn deliverer(app: SharedApp, mut shutdown: watch::Receiver<bool>) {
    loop {
        let attempted = crate::events::deliver_due(&app).await;
        if attempted > 0 {
            continue;
        }
        let _ = app.store.purge_expired_oauth_states(now_ms()).await;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => break,
        }
    }
}
