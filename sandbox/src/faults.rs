//! Injected faults: queued failures and delays per kind of endpoint.
//!
//! `POST /__sandbox/faults` queues entries; each matching request takes one unit from the entry
//! at the head of its target's queue. The lock is held only to pop, never across the delay: the
//! caller sleeps after [`Faults::take`] returns.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultTarget {
    /// Token endpoints, including Adobe Sign's separate refresh endpoint.
    Token,
    /// The protected API of every profile.
    Api,
    /// Revocation endpoints.
    Revoke,
}

impl FaultTarget {
    fn index(self) -> usize {
        self as usize
    }
}

/// What one request must suffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// 0: no failure, only the delay.
    pub status: u16,
    pub delay_ms: u64,
    /// The `Retry-After` seconds the failure carries: a 429's (1 unless given), another
    /// status's when given (a 503's maintenance window).
    pub retry_after: Option<u64>,
    /// The request is handled first and its answer held for the delay: a provider that acts
    /// and answers too late (a client's timeout loses the answer, not the work: a refresh
    /// token rotated all the same). Token endpoints only.
    pub answer_late: bool,
    /// A provider's own refusal to answer with the status instead of the sandbox's generic
    /// `temporarily_unavailable`.
    pub error: Option<ImitatedError>,
}

/// Refusals of real providers a fault can answer with (`"error"` in `POST /__sandbox/faults`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ImitatedError {
    /// Microsoft Entra's loop detection: `invalid_grant` with AADSTS50196, sent to a client
    /// that repeats the same request too often; the grant itself is good.
    #[serde(rename = "AADSTS50196")]
    MicrosoftLoopDetected,
}

impl ImitatedError {
    /// The token endpoint's body for it.
    pub fn body(self) -> serde_json::Value {
        match self {
            ImitatedError::MicrosoftLoopDetected => serde_json::json!({
                "error": "invalid_grant",
                "error_description": "AADSTS50196: The server terminated an operation because it encountered a client request loop. Please contact your app vendor.",
                "error_codes": [50196],
            }),
        }
    }
}

#[derive(Debug)]
struct QueuedFault {
    fault: Fault,
    remaining: u32,
}

/// The body of `POST /__sandbox/faults`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultRequest {
    pub target: FaultTarget,
    #[serde(default)]
    pub status: u16,
    pub count: Option<u32>,
    #[serde(default)]
    pub delay_ms: u64,
    /// `Retry-After` in seconds: a 429's (default 1), or another failing status's.
    pub retry_after: Option<u64>,
    /// See [`Fault::answer_late`]: with `status` 0 and a `delayMs`.
    #[serde(default)]
    pub answer_late: bool,
    /// See [`Fault::error`]: with a failing `status`, on the token target.
    pub error: Option<ImitatedError>,
}

/// The longest delay a fault may ask for; longer ones would only hang test suites.
const MAX_DELAY_MS: u64 = 120_000;

#[derive(Debug, Default)]
pub struct Faults {
    queues: [Mutex<VecDeque<QueuedFault>>; 3],
    /// Units queued over all targets: lets the hot path skip the locks when nothing is queued.
    pending: AtomicUsize,
}

impl Faults {
    pub fn add(&self, request: FaultRequest) -> Result<(), String> {
        if request.status != 0 && !(400..=599).contains(&request.status) {
            return Err(format!(
                "status must be 0 (delay only) or an HTTP error status 400-599, got {}",
                request.status
            ));
        }
        if request.status == 0 && request.delay_ms == 0 {
            return Err("a fault needs a failing status, a delayMs, or both".to_string());
        }
        if request.answer_late
            && (request.target != FaultTarget::Token
                || request.status != 0
                || request.delay_ms == 0)
        {
            return Err(
                "answerLate is for the token target, with status 0 and a delayMs".to_string(),
            );
        }
        if request.error.is_some() && (request.target != FaultTarget::Token || request.status == 0)
        {
            return Err("error is for the token target, with a failing status".to_string());
        }
        if request.delay_ms > MAX_DELAY_MS {
            return Err(format!("delayMs must be at most {MAX_DELAY_MS}"));
        }
        let count = request.count.unwrap_or(1);
        if count == 0 {
            return Err("count must be at least 1".to_string());
        }
        let mut queue = lock(&self.queues[request.target.index()]);
        queue.push_back(QueuedFault {
            fault: Fault {
                status: request.status,
                delay_ms: request.delay_ms,
                retry_after: request
                    .retry_after
                    .or((request.status == 429).then_some(1))
                    .filter(|_| request.status != 0),
                answer_late: request.answer_late,
                error: request.error,
            },
            remaining: count,
        });
        self.pending.fetch_add(count as usize, Ordering::Relaxed);
        Ok(())
    }

    /// Takes the fault the next request to `target` must suffer, if any.
    pub fn take(&self, target: FaultTarget) -> Option<Fault> {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut queue = lock(&self.queues[target.index()]);
        let head = queue.front_mut()?;
        let fault = head.fault;
        head.remaining -= 1;
        if head.remaining == 0 {
            queue.pop_front();
        }
        self.pending.fetch_sub(1, Ordering::Relaxed);
        Some(fault)
    }

    pub fn clear(&self) {
        for queue in &self.queues {
            lock(queue).clear();
        }
        self.pending.store(0, Ordering::Relaxed);
    }

    /// Units still queued per target, for the answer of the faults endpoints.
    pub fn pending_counts(&self) -> serde_json::Value {
        let count = |t: FaultTarget| -> u64 {
            lock(&self.queues[t.index()])
                .iter()
                .map(|q| u64::from(q.remaining))
                .sum()
        };
        serde_json::json!({
            "token": count(FaultTarget::Token),
            "api": count(FaultTarget::Api),
            "revoke": count(FaultTarget::Revoke),
        })
    }
}

/// A poisoned queue only means another request panicked mid-pop; the queue itself is still
/// consistent, so keep serving.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_queue_per_target() {
        let faults = Faults::default();
        let req = |status, count| FaultRequest {
            target: FaultTarget::Token,
            status,
            count,
            delay_ms: 0,
            retry_after: None,
            answer_late: false,
            error: None,
        };
        faults.add(req(503, Some(2))).expect("valid");
        faults.add(req(429, None)).expect("valid");
        assert_eq!(faults.take(FaultTarget::Api), None);
        let statuses: Vec<_> = std::iter::from_fn(|| faults.take(FaultTarget::Token))
            .map(|f| f.status)
            .collect();
        assert_eq!(statuses, vec![503, 503, 429]);
        assert!(faults.add(req(200, None)).is_err());
        assert!(faults.add(req(503, Some(0))).is_err());
        // A late answer: handled first, so only a delay, of a token endpoint.
        let late = |target, status, delay_ms| FaultRequest {
            target,
            status,
            count: None,
            delay_ms,
            retry_after: None,
            answer_late: true,
            error: None,
        };
        assert!(faults.add(late(FaultTarget::Token, 0, 100)).is_ok());
        assert!(faults.take(FaultTarget::Token).unwrap().answer_late);
        assert!(faults.add(late(FaultTarget::Token, 503, 100)).is_err());
        assert!(faults.add(late(FaultTarget::Token, 0, 0)).is_err());
        assert!(faults.add(late(FaultTarget::Api, 0, 100)).is_err());
        // A provider's own refusal: of a token endpoint, with a failing status.
        let imitated = |target, status| FaultRequest {
            target,
            status,
            count: None,
            delay_ms: 0,
            retry_after: None,
            answer_late: false,
            error: Some(ImitatedError::MicrosoftLoopDetected),
        };
        assert!(faults.add(imitated(FaultTarget::Api, 400)).is_err());
        assert!(faults.add(imitated(FaultTarget::Token, 0)).is_err());
        assert!(faults.add(imitated(FaultTarget::Token, 400)).is_ok());
        assert_eq!(
            faults.take(FaultTarget::Token).unwrap().error,
            Some(ImitatedError::MicrosoftLoopDetected)
        );
    }
}
