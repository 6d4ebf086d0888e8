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
    let mut payload = Map::new();
    payload.insert("event".into(), body);
    let delivery_state = match webhook_url(row) {
        Some(url) => {
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

/// Where the instance's webhooks go: its callback URL, when it has one and
/// `event.notification.enabled` is `"true"`.
fn webhook_url(row: &InstanceRow) -> Option<String> {
    let configuration = plain_configuration(row);
    let enabled = configuration
        .get(crate::instances::WEBHOOK_ENABLED)
        .and_then(Value::as_str)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    configuration
        .get(crate::instances::WEBHOOK_URL)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|url| enabled && !url.is_empty())
        .map(str::to_string)
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

/// How long `instance.refresh_failing` waits: a streak of transient refresh failures is
/// reported once it has lasted this long (a single 503 that the next attempt cures is noise for
/// a webhook receiver; a provider down for minutes is not). The refresh engine decides with
/// [`refresh_failing_due`].
pub const REFRESH_FAILING_AFTER_MS: i64 = 5 * 60_000;

/// Whether a transient refresh failure at `now` should fire `instance.refresh_failing`: the
/// streak began at `failing_since` (the failure being recorded starts it when `None`) and has
/// lasted `threshold_ms` (by default [`REFRESH_FAILING_AFTER_MS`]), and it was not announced
/// yet (`announced`).
pub fn refresh_failing_due(
    failing_since: Option<i64>,
    now: i64,
    announced: bool,
    threshold_ms: i64,
) -> bool {
    !announced && now - failing_since.unwrap_or(now) >= threshold_ms
}

/// The first webhook retry waits about this long; each further one twice as long.
pub const DELIVERY_FIRST_RETRY_MS: i64 = 1_000;
/// The longest wait between two attempts.
pub const DELIVERY_MAX_RETRY_MS: i64 = 3_600_000;
/// A webhook is retried for this long after its event, then marked failed.
pub const DELIVERY_GIVE_UP_AFTER_MS: i64 = 24 * 3_600_000;
/// How long a deliverer holds a claimed event (longer than one attempt with its timeout).
const DELIVERY_LEASE_MS: i64 = 60_000;
const DELIVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Deliveries in flight at once in one replica, and claimed per query.
const DELIVERY_CONCURRENCY: usize = 16;
/// One organization's share of them: its receivers hanging up to their timeout hold at most
/// this many slots (and briefly up to twice as many), the rest stay for the others.
const DELIVERY_PER_ORGANIZATION: usize = 4;
/// Slots only an organization with no delivery in flight may take: however many
/// organizations' receivers hang, another organization's webhook finds a slot.
const DELIVERY_RESERVED_FOR_IDLE: usize = 4;
/// The deliverer looks at the outbox at least this often (new events are due at once).
pub const DELIVERY_MAX_SLEEP: std::time::Duration = std::time::Duration::from_secs(1);

/// The attempts the schedule makes in about a day (30 to 45 with its jitter).
const DELIVERY_ATTEMPTS_IN_A_DAY: i64 = 30;

/// When to try again after failed attempt number `attempt` (1 for the first) of an event that
/// occurred at `occurred_at`: exponential (1 s, 2 s, 4 s … capped at an hour) with jitter
/// (`random` in `[0, 1)` picks a point in the upper half of the step), or `None` once a day has
/// passed since the event and the event has had the attempts of a day. An event first tried
/// late (the service was stopped over a weekend) gets its day of attempts too: it was given up
/// at its first failure.
pub fn retry_at(attempt: i64, occurred_at: i64, now: i64, random: f64) -> Option<i64> {
    let day_over = now - occurred_at >= DELIVERY_GIVE_UP_AFTER_MS;
    if day_over && attempt >= DELIVERY_ATTEMPTS_IN_A_DAY {
        return None;
    }
    let step = DELIVERY_FIRST_RETRY_MS
        .saturating_mul(1_i64 << (attempt - 1).clamp(0, 30))
        .min(DELIVERY_MAX_RETRY_MS);
    let jittered = step / 2 + ((step / 2) as f64 * random.clamp(0.0, 1.0)) as i64;
    let at = now.saturating_add(jittered);
    Some(if day_over {
        at
    } else {
        at.min(occurred_at + DELIVERY_GIVE_UP_AFTER_MS)
    })
}

/// How long the deliverer sleeps when nothing was due, from the earliest pending attempt.
pub fn delivery_sleep(now: i64, next_attempt: Option<i64>) -> std::time::Duration {
    let wait = next_attempt.map_or(i64::MAX, |at| (at - now).max(0));
    std::time::Duration::from_millis(wait.clamp(50, DELIVERY_MAX_SLEEP.as_millis() as i64) as u64)
}

/// Delivers due webhooks, [`DELIVERY_CONCURRENCY`] at a time: each slot is refilled with the
/// next due event as soon as its delivery ends, so a receiver that is slow to answer holds one
/// slot, not every delivery of every organization. Returns how many were attempted, once
/// nothing more is due and nothing is in flight; after `shutdown`, it claims no more and lets
/// the deliveries in flight end. An event is claimed (attempt counted, next attempt moved a lease ahead) before it is
/// posted, so two replicas never post it at once and a deliverer that dies leaves it to be
/// retried: delivery is at least once, and receivers de-duplicate by `X-Tokenwarden-Event-Id`.
pub async fn deliver_due(
    app: &crate::app::SharedApp,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> usize {
    // Tasks of their own: a delivery waiting for the store must make progress while this
    // loop waits for the store too (SQLite has one connection).
    let mut in_flight = tokio::task::JoinSet::new();
    // Whose delivery each task is, for the fair share: a task that ends in any way (a panic
    // too) leaves it, by its id.
    let mut owners: std::collections::HashMap<tokio::task::Id, i64> = Default::default();
    let mut attempted = 0;
    loop {
        while let Some(done) = in_flight.try_join_next_with_id() {
            owners.remove(&ended_task(done));
        }
        // Two claims: first one event of each organization with nothing in flight, in any
        // free slot; then more of any organization not at its share, while more than
        // `DELIVERY_RESERVED_FOR_IDLE` slots are free. Organizations whose receivers all hang
        // can so hold the others' slots only down to that reserve: an organization with
        // nothing in flight always finds one (with one claim, four such organizations took
        // every slot, and everyone else's webhooks waited for their timeouts, hour after hour).
        for reserve in [0, DELIVERY_RESERVED_FOR_IDLE] {
            let free = DELIVERY_CONCURRENCY - in_flight.len();
            if free <= reserve || *shutdown.borrow() {
                break;
            }
            let now = now_ms();
            let mut per_organization: std::collections::HashMap<i64, usize> = Default::default();
            for organization in owners.values() {
                *per_organization.entry(*organization).or_default() += 1;
            }
            let (skip, share): (Vec<i64>, usize) = if reserve == 0 {
                (per_organization.keys().copied().collect(), 1)
            } else {
                let full = per_organization
                    .iter()
                    .filter(|(_, count)| **count >= DELIVERY_PER_ORGANIZATION)
                    .map(|(organization, _)| *organization)
                    .collect();
                (full, DELIVERY_PER_ORGANIZATION)
            };
            match app
                .store
                .claim_pending_deliveries(
                    now,
                    (free - reserve) as i64,
                    now + DELIVERY_LEASE_MS,
                    share as i64,
                    &skip,
                )
                .await
            {
                Ok(due) => {
                    attempted += due.len();
                    for event in due {
                        let app = std::sync::Arc::clone(app);
                        let organization = event.organization_id;
                        let task =
                            in_flight.spawn(async move { deliver_and_record(&app, event).await });
                        owners.insert(task.id(), organization);
                    }
                }
                Err(error) => {
                    tracing::warn!("deliverer: could not claim pending events: {error}");
                    break;
                }
            }
        }
        if in_flight.is_empty() {
            return attempted;
        }
        // A slot that is free is offered to events that fall due meanwhile, not only when a
        // delivery ends (one that hangs ends only at its timeout).
        let claiming = in_flight.len() < DELIVERY_CONCURRENCY && !*shutdown.borrow();
        tokio::select! {
            done = in_flight.join_next_with_id() => {
                if let Some(done) = done {
                    owners.remove(&ended_task(done));
                }
            }
            () = tokio::time::sleep(std::time::Duration::from_millis(200)), if claiming => {}
        }
    }
}

/// The id of a delivery task that ended, however it ended.
fn ended_task(done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) -> tokio::task::Id {
    match done {
        Ok((id, ())) => id,
        Err(error) => {
            tracing::error!("a webhook delivery task failed: {error}");
            error.id()
        }
    }
}

/// One delivery, its outcome recorded.
async fn deliver_and_record(app: &App, event: EventRow) {
    let (outcome, error) = deliver_one(app, &event).await;
    let label = match outcome {
        crate::store::DeliveryOutcome::Delivered { .. } => "delivered",
        crate::store::DeliveryOutcome::RetryAt(_) => "retry",
        crate::store::DeliveryOutcome::Failed => "failed",
    };
    metrics::counter!("tokenwarden_webhook_deliveries_total", "outcome" => label).increment(1);
    // A receiver that fails is the organization's to mend, and the operator's to see: each
    // failed attempt (exponentially spaced) is a line, the end of the tries a warning.
    let why = error.as_deref().unwrap_or("");
    match outcome {
        crate::store::DeliveryOutcome::RetryAt(at) => tracing::info!(
            event = %event.id,
            instance = event.instance_id,
            attempt = event.attempts,
            retry_in_s = (at - now_ms()).max(0) / 1000,
            "a webhook was not delivered; tried again later: {why}"
        ),
        crate::store::DeliveryOutcome::Failed => tracing::warn!(
            event = %event.id,
            instance = event.instance_id,
            attempt = event.attempts,
            "a webhook was given up: {why}"
        ),
        crate::store::DeliveryOutcome::Delivered { .. } => {}
    }
    if let Err(store_error) = app
        .store
        .mark_delivery(&event.id, outcome, error.as_deref(), Some(event.attempts))
        .await
    {
        tracing::warn!(event = %event.id, "could not record a delivery outcome: {store_error}");
    }
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
    // Where the instance sends its webhooks now, and with which key: a receiver moved off a
    // dead URL, or a key rotated after a leak, takes the events still queued too (they kept
    // the URL and key of their making, retried there for a day). An instance deleted since
    // leaves its events the URL and key they were made with.
    let current = match event.instance_id {
        Some(id) => match app.store.get_instance_by_id(id).await {
            Ok(row) => row.filter(|row| row.organization_id == event.organization_id),
            Err(error) => {
                return retry_or_give_up(event, format!("the store failed: {error}"), None);
            }
        },
        None => None,
    };
    let mut current_key = None;
    let url = match &current {
        Some(row) => {
            match webhook_url(row) {
                Some(url) => {
                    // Signing with another key would make the receiver refuse the event
                    // without saying why: one this replica cannot open waits for one that can.
                    match open_secrets(app, row) {
                        Ok(secrets) => {
                            current_key = Some(
                                secrets
                                    .secret_configuration
                                    .get("event.notification.signature.key")
                                    .cloned()
                                    .unwrap_or_default()
                                    .into_bytes(),
                            );
                        }
                        Err(_) => {
                            return retry_or_give_up(
                                event,
                                "the instance's signing key cannot be opened with the master keys this replica has".into(),
                                None,
                            );
                        }
                    }
                    url
                }
                None => {
                    return (
                        DeliveryOutcome::Failed,
                        Some("the instance's webhooks were turned off: not sent".into()),
                    );
                }
            }
        }
        None => match payload.pointer("/delivery/url").and_then(Value::as_str) {
            Some(url) => url.to_string(),
            None => return (DeliveryOutcome::Failed, Some("no callback URL".into())),
        },
    };
    let url = url.as_str();
    // Delivery outcomes are shown to the organization: a callback URL must not turn them into
    // a scanner of the metadata service.
    if let Err(why) = url::Url::parse(url)
        .map_err(|error| error.to_string())
        .and_then(|parsed| app.config.egress.check_url(&parsed))
    {
        return (DeliveryOutcome::Failed, Some(why));
    }
    // The instance's own signing key, when it has one; it must open: signing with another key
    // would make the receiver refuse the event without saying why.
    let own_key = match payload.pointer("/delivery/key").and_then(Value::as_str) {
        _ if current_key.is_some() => current_key,
        None => None,
        Some(text) => match STANDARD.decode(text).ok().and_then(|sealed| {
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
        }) {
            Some(key) => Some(key),
            // During a rotation of the master key another replica may hold the key it was
            // sealed with: tried again (there, or here once this replica has it) until the
            // event's day is over, not given up at once.
            None => {
                return retry_or_give_up(
                    event,
                    "the instance's signing key cannot be opened with the master keys this replica has".into(),
                    None,
                );
            }
        },
    };
    let key = match own_key.filter(|key| !key.is_empty()) {
        Some(key) => key,
        None => match organization_webhook_secret(app, event.organization_id).await {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                return retry_or_give_up(
                    event,
                    "the organization's webhook secret could not be read with the master keys this replica has".into(),
                    None,
                );
            }
            // The store failing for now: the delivery is tried again like a receiver's failure.
            Err(error) => {
                return retry_or_give_up(event, format!("the store failed: {error}"), None);
            }
        },
    };
    // The receiver checks it against its own clock: this machine's, not the database's.
    // On the database's clock, as the body's `occurredAt` is: a replica whose own clock is off
    // signed times its receivers refused (they check `t` against their clocks).
    let timestamp = crate::app::now_ms() / 1000;
    let signature = crypto::sign_event(&key, timestamp, body.as_bytes());
    let result = app
        .http
        .post(url)
        .header("content-type", "application/json")
        .header("x-tokenwarden-signature", signature)
        .header("x-tokenwarden-event-id", &event.id)
        .header("x-tokenwarden-event-type", &event.event_type)
        .body(body)
        .timeout(DELIVERY_TIMEOUT)
        .send()
        .await;
    let error = match result {
        Ok(response) if response.status().is_success() => {
            return (DeliveryOutcome::Delivered { at: now_ms() }, None);
        }
        // The receiver says the URL is gone for good (REST Hooks' way to unsubscribe): a day
        // of attempts would change nothing.
        Ok(response) if response.status() == reqwest::StatusCode::GONE => {
            return (
                DeliveryOutcome::Failed,
                Some("the receiver answered 410 Gone: not tried again".into()),
            );
        }
        // A receiver that asks for a wait (429, 503 with `Retry-After` in seconds) gets it, up
        // to the longest wait between attempts: it was tried again within a second.
        Ok(response) => {
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok())
                .map(|seconds| (seconds.min(DELIVERY_MAX_RETRY_MS as u64 / 1000) * 1000) as i64);
            let error = match wait {
                Some(ms) => format!(
                    "the receiver answered {} and asked for {} s",
                    response.status(),
                    ms / 1000
                ),
                None => format!("the receiver answered {}", response.status()),
            };
            return retry_or_give_up(event, error, wait);
        }
        Err(error) => format!(
            "the receiver could not be reached: {}",
            crate::oauth::transport_message(&error)
        ),
    };
    retry_or_give_up(event, error, None)
}

/// The next attempt of a delivery that failed with `error`, or the end of its tries.
/// The longest wait a receiver's `Retry-After` gets while its event holds the later ones.
const ORDERED_WAIT_MAX_MS: i64 = 10_000;

/// `asked_wait`: the wait the receiver asked for (ms), the least before the next attempt.
fn retry_or_give_up(
    event: &EventRow,
    error: String,
    asked_wait: Option<i64>,
) -> (crate::store::DeliveryOutcome, Option<String>) {
    use crate::store::DeliveryOutcome;
    // `attempts` was counted by the claim: it is this attempt's number.
    let random = u64::from_le_bytes(crypto::random_bytes::<8>()) as f64 / u64::MAX as f64;
    let now = now_ms();
    // While the event holds its instance's later ones (its first attempts), a wait asked for
    // is capped: an hour asked five times held them for five hours.
    let asked_wait = asked_wait.map(|wait| {
        if event.attempts <= crate::store::ORDERED_ATTEMPTS {
            wait.min(ORDERED_WAIT_MAX_MS)
        } else {
            wait
        }
    });
    match retry_at(event.attempts, event.occurred_at, now, random) {
        Some(at) => (
            DeliveryOutcome::RetryAt(at.max(now + asked_wait.unwrap_or(0))),
            Some(error),
        ),
        None => (
            DeliveryOutcome::Failed,
            Some(format!("{error}; gave up after a day of attempts")),
        ),
    }
}

/// The organization's webhook secret (the signing key of events whose instance has no
/// `event.notification.signature.key`), as `GET /events/webhook-secret` shows it.
/// `Err` when the store failed (a 503 when it is a passing state), `Ok(None)` when there is no
/// secret to open.
pub async fn organization_webhook_secret_text(
    app: &App,
    organization_id: i64,
) -> Result<Option<String>, crate::store::StoreError> {
    Ok(organization_webhook_secret(app, organization_id)
        .await?
        .and_then(|bytes| String::from_utf8(bytes).ok()))
}

/// `Err` when the store failed (try again later), `Ok(None)` when there is no secret to open.
async fn organization_webhook_secret(
    app: &App,
    organization_id: i64,
) -> Result<Option<Vec<u8>>, crate::store::StoreError> {
    let Some(organization) = app.store.get_organization(organization_id).await? else {
        return Ok(None);
    };
    Ok(app
        .keyring
        .open(
            &organization.webhook_secret_enc,
            Binding {
                table: "organizations",
                row: organization_id,
                field: "webhook_secret",
            },
        )
        .ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    #[test]
    fn retries_back_off_exponentially_with_jitter_for_a_day() {
        // Lowest and highest jitter bound each step.
        assert_eq!(retry_at(1, T0, T0, 0.0), Some(T0 + 500));
        assert_eq!(retry_at(1, T0, T0, 1.0), Some(T0 + 1_000));
        assert_eq!(retry_at(2, T0, T0, 0.0), Some(T0 + 1_000));
        assert_eq!(retry_at(4, T0, T0, 1.0), Some(T0 + 8_000));
        // Capped at an hour between attempts.
        assert_eq!(retry_at(40, T0, T0, 1.0), Some(T0 + DELIVERY_MAX_RETRY_MS));
        // Never scheduled past the day, and given up after it.
        let late = T0 + DELIVERY_GIVE_UP_AFTER_MS - 60_000;
        assert_eq!(
            retry_at(30, T0, late, 1.0),
            Some(T0 + DELIVERY_GIVE_UP_AFTER_MS)
        );
        assert_eq!(retry_at(31, T0, T0 + DELIVERY_GIVE_UP_AFTER_MS, 0.5), None);
        // First tried two days late: its attempts go on past the event's day.
        let weekend = T0 + 2 * DELIVERY_GIVE_UP_AFTER_MS;
        assert_eq!(retry_at(1, T0, weekend, 1.0), Some(weekend + 1_000));
        assert_eq!(
            retry_at(29, T0, weekend, 1.0),
            Some(weekend + DELIVERY_MAX_RETRY_MS)
        );
        assert_eq!(retry_at(30, T0, weekend, 1.0), None);
    }

    #[test]
    fn about_a_day_of_attempts_is_a_few_dozen_requests() {
        let mut now = T0;
        let mut attempts = 0;
        while let Some(next) = retry_at(attempts + 1, T0, now, 1.0) {
            attempts += 1;
            now = next;
        }
        assert!(
            (30..=45).contains(&attempts),
            "{attempts} attempts in a day"
        );
    }

    #[test]
    fn refresh_failing_fires_once_the_streak_is_long_enough() {
        assert!(
            !refresh_failing_due(None, T0, false, REFRESH_FAILING_AFTER_MS),
            "a first failure is not yet failing"
        );
        assert!(!refresh_failing_due(
            Some(T0),
            T0 + 60_000,
            false,
            REFRESH_FAILING_AFTER_MS
        ));
        assert!(refresh_failing_due(
            Some(T0),
            T0 + REFRESH_FAILING_AFTER_MS,
            false,
            REFRESH_FAILING_AFTER_MS
        ));
        assert!(!refresh_failing_due(
            Some(T0),
            T0 + REFRESH_FAILING_AFTER_MS,
            true,
            REFRESH_FAILING_AFTER_MS
        ));
    }

    #[test]
    fn the_deliverer_sleeps_until_the_next_attempt_within_bounds() {
        assert_eq!(delivery_sleep(T0, None), DELIVERY_MAX_SLEEP);
        assert_eq!(
            delivery_sleep(T0, Some(T0 + 300)),
            std::time::Duration::from_millis(300)
        );
        assert_eq!(
            delivery_sleep(T0, Some(T0 - 5)),
            std::time::Duration::from_millis(50)
        );
    }
}
