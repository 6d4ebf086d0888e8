//! Work the service does on its own, as named tasks that stop on shutdown:
//! - `scheduler`: sleeps until the next due instance (or a notification that the schedule
//!   changed), claims a batch of due instances with a lease (on PostgreSQL `FOR UPDATE SKIP
//!   LOCKED`, so replicas share the work without a coordinator) and refreshes them through the
//!   same single-flight path as the proxy, with bounded concurrency, a per-connector rate
//!   limit, and a share of the slots for a connector whose token endpoint fails slowly for
//!   now (one that hangs would hold them all: [`plan::Slots`]);
//! - `recovery`: finds refreshes interrupted by a crash (in flight, lease expired) and finishes
//!   them;
//! - `deliverer`: sends due webhooks from the outbox (see [`crate::events`]).
//!
//! The decisions (how many rows to claim, how long to sleep, whether a connector's rate allows
//! another refresh now) are pure functions in [`plan`], tested on an injected clock; the tasks
//! only carry them out.
//!
//! **The scheduler never claims more rows than it can start at once**: a claimed row's lease
//! (`LEASE_MS`) must not run out before its refresh starts, or another replica could claim it
//! again and present the same refresh token twice (fatal at strict, rotating providers).
//! **It never spins**: between two claims it waits for a free slot, or sleeps until the next due
//! time, at least [`plan::MIN_SLEEP`]. Memory is bounded by the concurrency and by the number of
//! connectors, not by the number of instances.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::app::{SharedApp, now_ms};
use crate::refresh::LEASE_MS;

/// How many scheduled refreshes run at once in one replica, unless `serve
/// --refresh-concurrency` says otherwise.
pub const SCHEDULER_CONCURRENCY: usize = 32;

pub fn spawn_all(app: &SharedApp, tasks: &mut JoinSet<()>, shutdown: &mut watch::Receiver<bool>) {
    if !app.config.background_tasks {
        return;
    }
    let (task_app, stop) = (Arc::clone(app), shutdown.clone());
    tasks.spawn(supervised(
        Arc::clone(app),
        "scheduler",
        shutdown.clone(),
        move || scheduler(Arc::clone(&task_app), stop.clone()),
    ));
    let (task_app, stop) = (Arc::clone(app), shutdown.clone());
    tasks.spawn(supervised(
        Arc::clone(app),
        "recovery",
        shutdown.clone(),
        move || recovery(Arc::clone(&task_app), stop.clone()),
    ));
    let (task_app, stop) = (Arc::clone(app), shutdown.clone());
    tasks.spawn(supervised(
        Arc::clone(app),
        "presence",
        shutdown.clone(),
        move || presence(Arc::clone(&task_app), stop.clone()),
    ));
    let (task_app, stop) = (Arc::clone(app), shutdown.clone());
    tasks.spawn(supervised(
        Arc::clone(app),
        "deliverer",
        shutdown.clone(),
        move || deliverer(Arc::clone(&task_app), stop.clone()),
    ));
}

/// How long a background task that panicked waits before it starts again.
#[cfg(not(test))]
const RESTART_AFTER: Duration = Duration::from_secs(1);
#[cfg(test)]
const RESTART_AFTER: Duration = Duration::from_millis(10);
/// The longest pause between restarts.
const RESTART_AFTER_AT_MOST: Duration = Duration::from_secs(60);

/// Runs the task `start` makes, [`named`], and starts it again if it panics: a scheduler that
/// died of one bad row left the replica serving calls while no refresh or keep-alive ran
/// again, and nothing said so. Its leases run out and its work is claimed anew, so a restart
/// is safe. Counted in `tokenwarden_background_restarts_total` and `/healthz`. Ends when the
/// task ends by itself (at shutdown); dropped, it stops the task too.
async fn supervised<F, Fut>(
    app: SharedApp,
    name: &'static str,
    shutdown: watch::Receiver<bool>,
    start: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    supervise(name, shutdown, start, move || {
        app.background_restarts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    })
    .await;
}

async fn supervise<F, Fut>(
    name: &'static str,
    mut shutdown: watch::Receiver<bool>,
    start: F,
    restarted: impl Fn(),
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    /// Aborts the task when the supervisor is dropped (a server dropped without shutdown).
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    // The pause doubles while the task keeps panicking soon after its start (a bad row it
    // meets at once), up to a minute; a run longer than that starts the count again.
    let mut pause = RESTART_AFTER;
    loop {
        let started = tokio::time::Instant::now();
        let task = tokio::spawn(named(name, start()));
        let _abort = AbortOnDrop(task.abort_handle());
        match task.await {
            Err(error) if error.is_panic() => {
                if started.elapsed() > RESTART_AFTER_AT_MOST {
                    pause = RESTART_AFTER;
                }
                tracing::error!(
                    task = name,
                    "a background task panicked ({error}); it starts again in {} ms",
                    pause.as_millis()
                );
                metrics::counter!("tokenwarden_background_restarts_total", "task" => name)
                    .increment(1);
                restarted();
                // A shutdown meanwhile ends the wait, and the supervision.
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                pause = (pause * 2).min(RESTART_AFTER_AT_MOST);
            }
            _ => return,
        }
    }
}

/// Runs a task inside a tracing span with its name, and logs its start and end.
async fn named(name: &'static str, task: impl std::future::Future<Output = ()>) {
    use tracing::Instrument as _;
    async move {
        tracing::debug!("background task started");
        task.await;
        tracing::debug!("background task stopped");
    }
    .instrument(tracing::info_span!("task", name))
    .await;
}

/// The scheduler's decisions, without I/O or a clock of their own (times are epoch ms given by
/// the caller).
pub mod plan {
    use std::collections::HashMap;
    use std::time::Duration;

    /// The longest the scheduler sleeps without looking: another replica may have added due
    /// work it was not notified of.
    pub const MAX_SLEEP: Duration = Duration::from_secs(15);
    /// The shortest sleep: the earliest due row may be in the past yet unclaimable for a moment
    /// (leased by another replica that has not moved it yet); looking again at once would spin.
    pub const MIN_SLEEP: Duration = Duration::from_millis(100);
    /// Rows claimed at most per query.
    pub const BATCH: usize = 64;

    /// How many rows to claim now: as many as there are free slots, at most a batch, and
    /// nothing until a quarter of the slots are free: under load, claiming each freed slot on
    /// its own made one claim query (and one commit) per refresh.
    pub fn claim_limit(concurrency: usize, running: usize) -> usize {
        let free = concurrency.saturating_sub(running);
        if free < (concurrency / 4).max(1) {
            return 0;
        }
        free.min(BATCH)
    }

    /// How long to sleep after a claim, from the earliest due time in the store (`None`: no
    /// instance is scheduled at all).
    pub fn sleep_for(now: i64, next_due: Option<i64>) -> Duration {
        match next_due {
            None => MAX_SLEEP,
            Some(due) => {
                let wait = (due - now).max(0) as u64;
                Duration::from_millis(wait).clamp(MIN_SLEEP, MAX_SLEEP)
            }
        }
    }

    /// The least the scheduler sleeps after `failures` claims in a row failed (a database
    /// that answers reads but refuses writes, after a failover): doubling from
    /// [`MIN_SLEEP`] to 5 s, not a claim and a warning every 100 ms.
    pub fn pause_after_failed_claims(failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        MIN_SLEEP
            .saturating_mul(1 << failures.min(6))
            .min(Duration::from_secs(5))
    }

    /// How long a connector's rows wait when its share of the slots is full (see
    /// [`Slots`]): long enough that the scheduler's claims move past its backlog to other
    /// connectors' due rows, rather than claim and give back the same rows turn after turn.
    pub const CROWDED_OUT_MS: i64 = 30_000;

    /// How long the rows of a connector not known yet wait when the guarded share is full.
    pub const UNKNOWN_WAITS_MS: i64 = 1_000;

    /// A passing failure that took this long holds a slot for long: see [`Slots`].
    pub const SLOW_FAILURE: Duration = Duration::from_secs(1);

    /// A refresh that took this long, even one that succeeded, or one running this long,
    /// holds a slot for long: see [`Slots`].
    pub const SLOW_REFRESH: Duration = Duration::from_secs(2);

    /// How a scheduled refresh ended, for its connector's share of the slots.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Outcome {
        /// Answered (or failed) quickly.
        Fast,
        /// Answered, slowly ([`SLOW_REFRESH`]).
        Slow,
        /// Failed for now, slowly ([`SLOW_FAILURE`]): timing out, or failing late.
        SlowFailure,
    }

    /// A connector whose refreshes hold slots for long.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Class {
        Failing,
        Slow,
    }

    /// The scheduler's slots by connector. A connector whose last scheduled refresh failed
    /// slowly for a passing reason (a token endpoint timing out, or failing after
    /// [`SLOW_FAILURE`]) runs at most an eighth of the slots (1 at least, never all) until one of its
    /// refreshes ends otherwise: a provider that hangs for the whole provider timeout kept
    /// every slot of every replica busy with its backlog (each failure due again within its
    /// backoff), and every other connector's refreshes came late. One that fails fast (a 503
    /// at once) frees its slots at once, and keeps them all: it recovers at full speed.
    /// An organization's own failing connectors share one eighth between them (keys
    /// `{organization}/{key}`): twelve connectors of one organization, each to a token
    /// endpoint that never answers, took every slot, and every other organization's refreshes
    /// came late. All failing connectors together run at most a quarter of the slots (eight
    /// organizations with hanging token endpoints took every slot, an eighth each).
    ///
    /// A connector whose refreshes succeed but slowly (its last took [`SLOW_REFRESH`], or one
    /// of its refreshes has been running that long) runs at most half of the slots, its
    /// organization's slow connectors together as much: a provider answering in 8 s, with
    /// 5,000 instances of one organization due at once, held every slot for 20 minutes, and
    /// other organizations' tokens expired before their refresh. Slow and failing connectors,
    /// and those with no refresh ended here yet, together leave a quarter of the slots to the
    /// others, always, counted by what each running refresh's connector is known to be now:
    /// eight new connectors whose token endpoints all hung at once took every slot until
    /// their first refreshes had timed out.
    #[derive(Debug)]
    pub struct Slots<T> {
        /// Each running refresh's connector and start.
        tasks: HashMap<T, (String, std::time::Instant)>,
        running: HashMap<String, usize>,
        class: HashMap<String, Class>,
        /// Connectors with a refresh ended here: the others are not known yet, and count
        /// with the troubled ones (a new hanging connector took every slot until its first
        /// refreshes timed out; eight at once, every slot for four timeouts).
        known: std::collections::HashSet<String>,
    }

    impl<T> Default for Slots<T> {
        fn default() -> Self {
            Slots {
                tasks: HashMap::new(),
                running: HashMap::new(),
                class: HashMap::new(),
                known: std::collections::HashSet::new(),
            }
        }
    }

    /// Whose share a connector's failing refreshes take: its organization's for an
    /// organization's own (`{organization}/{key}`), its own for a built-in one.
    fn group(key: &str) -> &str {
        key.split_once('/').map_or(key, |(owner, _)| owner)
    }

    /// `part` of `concurrency`, at least 1 and fewer than all (with 2 slots, one stays for
    /// the others).
    fn part(concurrency: usize, part: usize) -> usize {
        part.clamp(1, concurrency.saturating_sub(1).max(1))
    }

    impl<T: std::hash::Hash + Eq> Slots<T> {
        /// The most refreshes of a failing connector at once, of `concurrency` slots: an
        /// eighth, and always fewer than all of them (with 2 slots, one stays for the others).
        pub fn failing_share(concurrency: usize) -> usize {
            part(concurrency, concurrency / 8)
        }

        /// Whether a refresh of connector `key` may start now.
        pub fn may_start(&self, key: &str, concurrency: usize) -> bool {
            self.may_start_at(key, concurrency, std::time::Instant::now())
        }

        /// The class a refresh of `key` counts in at `now`: its last outcome's, or slow while
        /// one of its refreshes has run [`SLOW_REFRESH`] already.
        fn class_at(&self, key: &str, now: std::time::Instant) -> Option<Class> {
            self.class.get(key).copied().or_else(|| {
                self.tasks
                    .values()
                    .any(|(running, at)| {
                        running == key && now.saturating_duration_since(*at) >= SLOW_REFRESH
                    })
                    .then_some(Class::Slow)
            })
        }

        /// [`Self::may_start`] at `now`. The refreshes running are counted by what their
        /// connectors are known to be now, not when they started.
        pub fn may_start_at(&self, key: &str, concurrency: usize, now: std::time::Instant) -> bool {
            let class = self.class_at(key, now);
            if class.is_none() && self.known.contains(key) {
                return true;
            }
            let mut classes: HashMap<&str, Option<Class>> = HashMap::new();
            let (mut guarded, mut of_class, mut of_group) = (0, 0, 0);
            for (running, _) in self.tasks.values() {
                let running_class = *classes
                    .entry(running.as_str())
                    .or_insert_with(|| self.class_at(running, now));
                if running_class.is_none() && self.known.contains(running) {
                    continue;
                }
                guarded += 1;
                if running_class == class {
                    of_class += 1;
                    if group(running) == group(key) {
                        of_group += 1;
                    }
                }
            }
            let of_key = self.running.get(key).copied().unwrap_or(0);
            // Slow, failing and not yet known ones together leave a quarter to the others.
            if guarded >= part(concurrency, concurrency * 3 / 4) {
                return false;
            }
            match class {
                None => true,
                Some(Class::Failing) => {
                    let share = Self::failing_share(concurrency);
                    of_key < share
                        && of_group < share
                        && of_class < part(concurrency, concurrency / 4)
                }
                Some(Class::Slow) => {
                    let half = part(concurrency, concurrency / 2);
                    of_key < half && of_group < half && of_class < half
                }
            }
        }

        /// How long the rows of `key` wait when it may not start now: long for a connector
        /// known to be troubled (the claims move past its backlog), a moment for one not
        /// known yet (its first refreshes tell within seconds).
        pub fn wait_ms(&self, key: &str, now: std::time::Instant) -> i64 {
            if self.class_at(key, now).is_some() {
                CROWDED_OUT_MS
            } else {
                UNKNOWN_WAITS_MS
            }
        }

        /// Task `task` refreshes an instance of connector `key`.
        pub fn started(&mut self, task: T, key: String) {
            self.started_at(task, key, std::time::Instant::now());
        }

        /// [`Self::started`] at `at`.
        pub fn started_at(&mut self, task: T, key: String, at: std::time::Instant) {
            *self.running.entry(key.clone()).or_insert(0) += 1;
            self.tasks.insert(task, (key, at));
        }

        /// Task `task` ended as `outcome` (`None`: the refresh did not reach the provider,
        /// and tells nothing of it).
        pub fn finished(&mut self, task: &T, outcome: Option<Outcome>) {
            let Some((key, _)) = self.tasks.remove(task) else {
                return;
            };
            if let Some(running) = self.running.get_mut(&key) {
                *running = running.saturating_sub(1);
                if *running == 0 {
                    self.running.remove(&key);
                }
            }
            let Some(outcome) = outcome else {
                return;
            };
            match outcome {
                Outcome::SlowFailure => {
                    self.class.insert(key.clone(), Class::Failing);
                }
                Outcome::Slow => {
                    self.class.insert(key.clone(), Class::Slow);
                }
                Outcome::Fast => {
                    self.class.remove(&key);
                }
            }
            self.known.insert(key);
        }

        /// The connectors with refreshes running (for the tests).
        pub fn busy(&self) -> usize {
            self.running.len()
        }
    }

    /// A token bucket: `burst` refreshes at once, then `per_second`.
    #[derive(Debug, Clone)]
    pub struct TokenBucket {
        tokens: f64,
        updated_at: i64,
    }

    /// Per-connector rate limits (one bucket per provider: built-in connectors by key,
    /// organization connectors by organization and key). Buckets that are full again are
    /// forgotten, so memory grows with the connectors in use, not with the instances.
    #[derive(Debug)]
    pub struct RateLimiter {
        pub per_second: f64,
        pub burst: f64,
        /// A refresh that would have to wait longer than this is put back (due again then)
        /// rather than held: its claim's lease would be running.
        pub max_wait_ms: i64,
        buckets: HashMap<String, TokenBucket>,
    }

    /// What the rate limit says about one more refresh now.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Admission {
        /// Start after this many ms (0: at once). The token is taken.
        After(i64),
        /// Too long a wait: give the row back, due again at this time. No token is taken.
        Defer(i64),
    }

    impl RateLimiter {
        pub fn new(per_second: f64, burst: f64, max_wait_ms: i64) -> Self {
            RateLimiter {
                per_second,
                // A bucket that never holds a whole token admits nothing: below a rate of one
                // refresh in two seconds, every claim was deferred, for ever.
                burst: burst.max(1.0),
                max_wait_ms,
                buckets: HashMap::new(),
            }
        }

        pub fn admit(&mut self, key: &str, now: i64) -> Admission {
            let (per_second, burst) = (self.per_second, self.burst);
            let bucket = self.buckets.entry(key.to_string()).or_insert(TokenBucket {
                tokens: burst,
                updated_at: now,
            });
            let elapsed = (now - bucket.updated_at).max(0) as f64 / 1000.0;
            bucket.tokens = (bucket.tokens + elapsed * per_second).min(burst);
            bucket.updated_at = now.max(bucket.updated_at);
            // Tokens may go negative: each admitted refresh reserves the next free slot.
            let wait_ms = if bucket.tokens >= 1.0 {
                0
            } else {
                ((1.0 - bucket.tokens) / per_second * 1000.0).ceil() as i64
            };
            if wait_ms > self.max_wait_ms {
                return Admission::Defer(now.saturating_add(wait_ms));
            }
            bucket.tokens -= 1.0;
            Admission::After(wait_ms)
        }

        /// Forgets buckets that have refilled completely by `now`.
        pub fn forget_idle(&mut self, now: i64) {
            let (per_second, burst) = (self.per_second, self.burst);
            self.buckets.retain(|_, bucket| {
                let elapsed = (now - bucket.updated_at).max(0) as f64 / 1000.0;
                bucket.tokens + elapsed * per_second < burst
            });
        }

        pub fn buckets(&self) -> usize {
            self.buckets.len()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const NOW: i64 = 1_700_000_000_000;

        #[test]
        fn a_slow_rate_still_admits() {
            // One refresh in ten seconds: the first at once, the next deferred to when its
            // token is there, and admitted then.
            let mut limiter = RateLimiter::new(0.1, 0.2, 2_000);
            assert_eq!(limiter.admit("c", NOW), Admission::After(0));
            assert_eq!(limiter.admit("c", NOW), Admission::Defer(NOW + 10_000));
            assert_eq!(limiter.admit("c", NOW + 10_000), Admission::After(0));
        }

        #[test]
        fn claims_only_what_it_can_start() {
            assert_eq!(claim_limit(16, 0), 16);
            assert_eq!(claim_limit(16, 10), 6);
            assert_eq!(claim_limit(16, 16), 0);
            assert_eq!(claim_limit(16, 13), 0, "fewer than a quarter free: wait");
            assert_eq!(claim_limit(16, 12), 4);
            assert_eq!(claim_limit(1, 0), 1);
            assert_eq!(claim_limit(2, 1), 1);
            assert_eq!(claim_limit(16, 20), 0);
            assert_eq!(claim_limit(1000, 0), BATCH);
        }

        #[test]
        fn sleeps_until_the_next_due_time_within_bounds() {
            assert_eq!(sleep_for(NOW, None), MAX_SLEEP);
            assert_eq!(
                sleep_for(NOW, Some(NOW + 2_500)),
                Duration::from_millis(2_500)
            );
            assert_eq!(sleep_for(NOW, Some(NOW + 3_600_000)), MAX_SLEEP);
            // Due already (another replica's lease, a backoff): never a busy loop.
            assert_eq!(sleep_for(NOW, Some(NOW - 60_000)), MIN_SLEEP);
            assert_eq!(sleep_for(NOW, Some(NOW)), MIN_SLEEP);
            // Claims failing: longer each time, 5 s at most.
            assert_eq!(pause_after_failed_claims(0), Duration::ZERO);
            assert_eq!(pause_after_failed_claims(1), Duration::from_millis(200));
            assert_eq!(pause_after_failed_claims(3), Duration::from_millis(800));
            assert_eq!(pause_after_failed_claims(6), Duration::from_secs(5));
            assert_eq!(pause_after_failed_claims(u32::MAX), Duration::from_secs(5));
        }

        #[test]
        fn the_rate_limit_allows_a_burst_then_a_steady_rate() {
            let mut limiter = RateLimiter::new(2.0, 3.0, 2_000);
            for _ in 0..3 {
                assert_eq!(limiter.admit("box", NOW), Admission::After(0));
            }
            // The fourth waits for the next token (500 ms at 2/s), the fifth for the one after.
            assert_eq!(limiter.admit("box", NOW), Admission::After(500));
            assert_eq!(limiter.admit("box", NOW), Admission::After(1_000));
            // Another connector has its own bucket.
            assert_eq!(limiter.admit("adobe", NOW), Admission::After(0));
            // A second later two tokens came back, both already reserved.
            assert_eq!(limiter.admit("box", NOW + 1_000), Admission::After(500));
        }

        #[test]
        fn a_failing_connector_runs_a_share_of_the_slots() {
            let mut slots = Slots::<u32>::default();
            // Healthy (known to answer): every slot if it has the rows.
            slots.started(999, "box".into());
            slots.finished(&999, Some(Outcome::Fast));
            for task in 0..32 {
                assert!(slots.may_start("box", 32));
                slots.started(task, "box".into());
            }
            for task in 0..32 {
                slots.finished(&task, Some(Outcome::Fast));
            }
            assert_eq!(slots.busy(), 0);
            // Its refresh failed for now: 4 of 32 at once, others unaffected.
            slots.started(100, "org/hangs".into());
            slots.finished(&100, Some(Outcome::SlowFailure));
            for task in 101..105 {
                assert!(slots.may_start("org/hangs", 32));
                slots.started(task, "org/hangs".into());
            }
            assert!(!slots.may_start("org/hangs", 32));
            assert!(slots.may_start("box", 32));
            // A slot freed: one more; an answer ends the limit.
            slots.finished(&101, Some(Outcome::SlowFailure));
            assert!(slots.may_start("org/hangs", 32));
            slots.started(105, "org/hangs".into());
            assert!(!slots.may_start("org/hangs", 32));
            slots.finished(&102, Some(Outcome::Fast));
            assert!(slots.may_start("org/hangs", 32));
            // A task ended twice (or never counted) changes nothing; nor does one that never
            // reached the provider.
            slots.finished(&102, Some(Outcome::SlowFailure));
            assert!(slots.may_start("org/hangs", 32));
            slots.started(106, "org/hangs".into());
            slots.finished(&106, Some(Outcome::SlowFailure));
            slots.started(107, "org/hangs".into());
            slots.finished(&107, None);
            assert!(slots.may_start("org/hangs", 32));
            slots.started(108, "org/hangs".into());
            slots.started(109, "org/hangs".into());
            assert!(!slots.may_start("org/hangs", 32), "still failing");
            // Fewer than all the slots, however few: with 2, one stays for the others (the
            // share was 2 of 2).
            assert_eq!(Slots::<u32>::failing_share(2), 1);
            assert_eq!(Slots::<u32>::failing_share(4), 1);
            assert_eq!(Slots::<u32>::failing_share(16), 2);
            assert_eq!(Slots::<u32>::failing_share(1), 1);
        }

        #[test]
        fn a_slow_connector_runs_half_the_slots_and_the_troubled_leave_a_quarter() {
            let mut slots = Slots::<u32>::default();
            slots.started(999, "box".into());
            slots.finished(&999, Some(Outcome::Fast));
            // Answers, in 8 s: half of 32, its organization's other slow connector with it.
            slots.started(0, "7/slow".into());
            slots.finished(&0, Some(Outcome::Slow));
            slots.started(1, "7/slower".into());
            slots.finished(&1, Some(Outcome::Slow));
            let mut task = 10;
            let mut start = |slots: &mut Slots<u32>, key: &str| {
                let may = slots.may_start(key, 32);
                if may {
                    slots.started(task, key.to_string());
                    task += 1;
                }
                may
            };
            let slow = (0..40).filter(|_| start(&mut slots, "7/slow")).count();
            assert_eq!(slow, 16);
            assert!(
                !start(&mut slots, "7/slower"),
                "the organization's half is taken"
            );
            assert!(start(&mut slots, "box"), "healthy ones are not limited");
            // Failing ones: an eighth each, a quarter together, and with the slow ones never
            // more than three quarters.
            for n in 0..8 {
                slots.started(1_000 + n, format!("{n}/hangs"));
                slots.finished(&(1_000 + n), Some(Outcome::SlowFailure));
            }
            let failing = (0..8)
                .flat_map(|n| std::iter::repeat_n(n, 4))
                .filter(|n| start(&mut slots, &format!("{n}/hangs")))
                .count();
            assert_eq!(
                failing, 8,
                "a quarter of 32 for all the failing connectors together"
            );
            // 16 slow and 8 failing run: three quarters; another slow one waits.
            slots.started(2_000, "9/slow".into());
            slots.finished(&2_000, Some(Outcome::Slow));
            assert!(!start(&mut slots, "9/slow"));
            assert!(start(&mut slots, "box"));
            // A fast answer ends the limit.
            slots.started(2_001, "7/slow".into());
            slots.finished(&2_001, Some(Outcome::Fast));
            assert_eq!(slots.class_at("7/slow", std::time::Instant::now()), None);
        }

        #[test]
        fn connectors_not_known_yet_leave_a_quarter_to_the_known() {
            let mut slots = Slots::<u32>::default();
            slots.started(999, "box".into());
            slots.finished(&999, Some(Outcome::Fast));
            // Eight new connectors (their token endpoints may all hang): three quarters.
            let mut task = 0;
            for n in 0..8 {
                for _ in 0..8 {
                    let key = format!("{n}/new");
                    if slots.may_start(&key, 32) {
                        slots.started(task, key);
                        task += 1;
                    }
                }
            }
            assert_eq!(task, 24);
            assert!(slots.may_start("box", 32));
            assert_eq!(
                slots.wait_ms("0/new", std::time::Instant::now()),
                UNKNOWN_WAITS_MS
            );
            // One answered at once: known, and no longer counted.
            slots.finished(&0, Some(Outcome::Fast));
            assert!(slots.may_start("0/new", 32));
            assert!(slots.may_start("1/new", 32), "seven of them run: 21 of 24");
        }

        #[test]
        fn a_connector_whose_refresh_runs_long_counts_as_slow_before_it_ends() {
            let mut slots = Slots::<u32>::default();
            let t0 = std::time::Instant::now();
            for task in 0..20 {
                assert!(slots.may_start_at("new", 32, t0));
                slots.started_at(task, "new".into(), t0);
            }
            // Two seconds on, none has ended: slow, and past its half.
            let later = t0 + SLOW_REFRESH;
            assert!(!slots.may_start_at("new", 32, later));
            assert!(slots.may_start_at("other", 32, later));
            for task in 0..5 {
                slots.finished(&task, None);
            }
            assert!(slots.may_start_at("new", 32, later), "15 running, of 16");
        }

        #[test]
        fn an_organization_s_failing_connectors_share_one_share() {
            let mut slots = Slots::<u32>::default();
            let mut task = 0;
            // Twelve connectors of organization 7, each failing slowly.
            for n in 0..12 {
                slots.started(task, format!("7/hangs{n}"));
                slots.finished(&task, Some(Outcome::SlowFailure));
                task += 1;
            }
            let mut started = 0;
            for n in 0..12 {
                let key = format!("7/hangs{n}");
                if slots.may_start(&key, 32) {
                    slots.started(task, key);
                    task += 1;
                    started += 1;
                }
            }
            assert_eq!(started, 4, "an eighth of 32 for the whole organization");
            // Another organization's failing connector, and a failing built-in one, have
            // their own; healthy ones are not limited.
            slots.started(task, "8/slow".into());
            slots.finished(&task, Some(Outcome::SlowFailure));
            task += 1;
            assert!(slots.may_start("8/slow", 32));
            slots.started(task, "box".into());
            slots.finished(&task, Some(Outcome::SlowFailure));
            task += 1;
            assert!(slots.may_start("box", 32));
            assert!(slots.may_start("7/healthy", 32));
            // One of organization 7's ends: one more of its failing ones may start.
            slots.finished(&12, Some(Outcome::SlowFailure));
            assert!(slots.may_start("7/hangs5", 32));
            assert!(task > 12);
        }

        #[test]
        fn a_long_wait_defers_the_row_instead_of_holding_its_lease() {
            let mut limiter = RateLimiter::new(1.0, 1.0, 1_500);
            assert_eq!(limiter.admit("k", NOW), Admission::After(0));
            assert_eq!(limiter.admit("k", NOW), Admission::After(1_000));
            assert_eq!(limiter.admit("k", NOW), Admission::Defer(NOW + 2_000));
            // A deferral takes no token: later, the wait is back to what was reserved.
            assert_eq!(limiter.admit("k", NOW + 1_000), Admission::After(1_000));
        }

        #[test]
        fn full_buckets_are_forgotten() {
            let mut limiter = RateLimiter::new(10.0, 5.0, 1_000);
            limiter.admit("a", NOW);
            limiter.admit("b", NOW + 1_000);
            limiter.forget_idle(NOW + 50);
            assert_eq!(limiter.buckets(), 2);
            limiter.forget_idle(NOW + 1_050);
            assert_eq!(limiter.buckets(), 1, "a refilled, b not yet");
            limiter.forget_idle(NOW + 10_000);
            assert_eq!(limiter.buckets(), 0);
        }
    }
}

/// Scheduled refreshes per connector and second (one replica), unless `serve --refresh-rate`
/// says otherwise; the burst allowed is twice that.
pub const RATE_PER_SECOND: f64 = 100.0;
const RATE_MAX_WAIT_MS: i64 = 2_000;

async fn scheduler(app: SharedApp, mut shutdown: watch::Receiver<bool>) {
    // Each scheduled refresh answers how its provider answered (slowly, failing).
    let mut running: JoinSet<Option<plan::Outcome>> = JoinSet::new();
    let mut slots = plan::Slots::default();
    let rate = app.config.refresh_rate_per_connector;
    let mut limiter =
        (rate > 0.0).then(|| plan::RateLimiter::new(rate, rate * 2.0, RATE_MAX_WAIT_MS));
    let concurrency = app.config.refresh_concurrency.max(1);
    let mut failed_claims = 0u32;
    loop {
        while let Some(ended) = running.try_join_next_with_id() {
            settle(&mut slots, ended);
        }
        if *shutdown.borrow() {
            break;
        }
        let limit = plan::claim_limit(concurrency, running.len());
        if limit == 0 {
            // Every slot is busy: wait for one to free, not on a timer.
            tokio::select! {
                Some(ended) = running.join_next_with_id() => settle(&mut slots, ended),
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let now = now_ms();
        // Read before the claim: see `refresh::Claimed`.
        let epoch = app.refresh.epoch();
        let claimed = match app
            .store
            .claim_due(now, limit as i64, &app.replica_id, now + LEASE_MS)
            .await
        {
            Ok(rows) => {
                app.refresh.note_store_answered();
                failed_claims = 0;
                rows
            }
            Err(error) => {
                app.refresh.note_store_error(&error);
                failed_claims = failed_claims.saturating_add(1);
                tracing::warn!("scheduler: could not claim due instances: {error}");
                Vec::new()
            }
        };
        let claimed_count = claimed.len();
        let mut deferred = false;
        for (row, due_at) in claimed {
            metrics::histogram!("tokenwarden_scheduler_lag_seconds")
                .record((now - due_at).max(0) as f64 / 1000.0);
            let connector_key = match app.connector_owner(row.organization_id, &row.element_key) {
                None => row.element_key.clone(),
                Some(organization) => format!("{organization}/{}", row.element_key),
            };
            if !slots.may_start(&connector_key, concurrency) {
                deferred = true;
                metrics::counter!("tokenwarden_scheduler_crowded_out_total").increment(1);
                let wait = slots.wait_ms(&connector_key, std::time::Instant::now());
                release(&app, &row, now, now + wait).await;
                continue;
            }
            let admission = limiter
                .as_mut()
                .map(|limiter| limiter.admit(&connector_key, now));
            let delay_ms = match admission {
                None => 0,
                Some(plan::Admission::After(ms)) => ms,
                Some(plan::Admission::Defer(at)) => {
                    deferred = true;
                    metrics::counter!("tokenwarden_scheduler_deferred_total").increment(1);
                    release(&app, &row, now, at).await;
                    continue;
                }
            };
            let app = Arc::clone(&app);
            let mut stop = shutdown.clone();
            let key = connector_key;
            let task = running.spawn(async move {
                if delay_ms > 0 {
                    let stopped = tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(delay_ms as u64)) => false,
                        result = stop.wait_for(|stop| *stop) => result.is_ok(),
                    };
                    if stopped {
                        // Not started: give the row back, due at once for another replica.
                        release(&app, &row, now, due_at).await;
                        return None;
                    }
                }
                let (id, version) = (row.id, row.token_version);
                let started = std::time::Instant::now();
                let outcome = match app
                    .refresh
                    .refresh(
                        &app,
                        id,
                        Some(version),
                        Some(crate::refresh::Claimed { row, epoch }),
                    )
                    .await
                {
                    Ok(_) => "ok",
                    Err(crate::refresh::RefreshFailure::Invalid { .. }) => "invalid",
                    Err(crate::refresh::RefreshFailure::Transient { .. }) => "transient",
                    Err(failure) => {
                        tracing::debug!(instance = id, "scheduled refresh skipped: {failure:?}");
                        "skipped"
                    }
                };
                metrics::counter!("tokenwarden_scheduler_refreshes_total", "outcome" => outcome)
                    .increment(1);
                let took = started.elapsed();
                match outcome {
                    "skipped" => None,
                    "transient" if took >= plan::SLOW_FAILURE => Some(plan::Outcome::SlowFailure),
                    "ok" if took >= plan::SLOW_REFRESH => Some(plan::Outcome::Slow),
                    _ => Some(plan::Outcome::Fast),
                }
            });
            slots.started(task.id(), key);
        }
        if let Some(limiter) = limiter.as_mut() {
            limiter.forget_idle(now);
        }
        // More may be due right now; the next turn waits for a free slot. Not when the rate
        // limit deferred some: claiming the backlog again at once would only give it back
        // again (a write per row and turn), so the loop sleeps its shortest sleep first.
        if claimed_count == limit && !deferred {
            continue;
        }
        let next_due = match app.store.next_due_time().await {
            Ok(next) => next,
            Err(error) => {
                tracing::warn!("scheduler: could not read the next due time: {error}");
                None
            }
        };
        let sleep =
            plan::sleep_for(now_ms(), next_due).max(plan::pause_after_failed_claims(failed_claims));
        // While a claimed row's refresh runs, its due time is its lease end; the refresh's
        // commit sets the real next one. So a finished refresh is a reason to look again, as
        // is a change made through the API (notified by the handlers).
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = app.refresh.schedule_changed() => {}
            Some(ended) = running.join_next_with_id(), if !running.is_empty() => {
                settle(&mut slots, ended);
            }
            _ = shutdown.changed() => {}
        }
    }
    // Graceful: refreshes already at the provider finish and commit (a rotated refresh token
    // must be stored); those still waiting for their rate slot gave their rows back above.
    // Each refresh runs as a task of its own that the stop waits for (`spawn_to_the_end`):
    // what ends here is the scheduler's wait for their outcomes, not the refreshes.
    let drain = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(8), drain)
        .await
        .is_err()
    {
        tracing::info!(
            "scheduler: stopped; refreshes still at the provider finish and commit before the process ends"
        );
        running.abort_all();
    }
}

/// A scheduled refresh ended (a panicked one tells nothing of its provider).
fn settle(
    slots: &mut plan::Slots<tokio::task::Id>,
    ended: Result<(tokio::task::Id, Option<plan::Outcome>), tokio::task::JoinError>,
) {
    match ended {
        Ok((task, outcome)) => slots.finished(&task, outcome),
        Err(error) => slots.finished(&error.id(), None),
    }
}

/// Gives a row claimed at `claimed_at` back, due at `due_at`.
async fn release(app: &SharedApp, row: &crate::store::InstanceRow, claimed_at: i64, due_at: i64) {
    if let Err(error) = app
        .store
        .release_claim(
            row.id,
            &app.replica_id,
            row.refresh_lease_until.unwrap_or_default(),
            row.token_version,
            claimed_at,
            due_at,
        )
        .await
    {
        tracing::warn!(
            instance = row.id,
            "could not give back a claimed instance ({error}); its lease will expire"
        );
    }
}

/// How often a replica says it runs (`replicas`), and looks for the mark of a copy.
pub const PRESENCE_INTERVAL: Duration = Duration::from_secs(10);

/// Says every [`PRESENCE_INTERVAL`] that this replica runs, as `tokenwarden database copy` asks
/// before it copies; and stops the service when the database was copied away meanwhile (this
/// process paused past the copy's wait, or cut off from the database: the service runs on the
/// copy, and this one would refresh the same grants). A task of its own: the recovery task's
/// rounds can be long (refreshes at the provider). The goodbye is said at the end of the stop.
async fn presence(app: SharedApp, mut shutdown: watch::Receiver<bool>) {
    loop {
        // A passing failure is the database's, said elsewhere; noted for the refreshes that
        // other replicas' cut ones leave (`refresh::OUTAGE_TAKEOVER_GRACE_MS`).
        match app
            .store
            .replica_seen(&app.replica_id, now_ms(), &app.keyring.current_key_id())
            .await
        {
            Ok(_) => app.refresh.note_store_answered(),
            Err(error) => app.refresh.note_store_error(&error),
        }
        if let Ok(Some((target, at))) = app.store.copied_to().await {
            tracing::error!(
                "this database was copied to {target} at {} (`tokenwarden database copy`) while this service ran: it stops",
                crate::instances::iso8601(at)
            );
            app.copied_away.notify_one();
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(PRESENCE_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// How often crash recovery looks for interrupted refreshes. They are rare (a replica died
/// during a provider call), and their leases last [`LEASE_MS`] anyway.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(10);

async fn recovery(app: SharedApp, mut shutdown: watch::Receiver<bool>) {
    // On the monotonic clock: a wall clock stepped back put the minute's work off by the step.
    let mut last_purge: Option<std::time::Instant> = None;
    loop {
        let now = now_ms();
        match app.store.interrupted_refreshes(now, 50).await {
            Ok(rows) => {
                app.refresh.note_store_answered();
                for row in rows {
                    if *shutdown.borrow() {
                        break;
                    }
                    // Without a refresh token no refresh was under way (a hold's or a store's
                    // mark), and one now could only end an instance whose token may well work.
                    if row.refresh_token_enc.is_none() {
                        let _ = app.store.forget_interrupted(row.id, now).await;
                        continue;
                    }
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
            Err(error) => {
                app.refresh.note_store_error(&error);
                tracing::warn!("recovery: {error}");
            }
        }
        // Memory follows what calls use: idle in-memory copies go.
        app.refresh.evict_idle(IDLE_CACHE_EVICTION);
        app.auth_cache.evict_idle(IDLE_CACHE_EVICTION);
        app.proxy_http.sweep_idle();
        // The database too: expired OAuth states, and events and audit entries past their
        // retention, once a minute.
        if last_purge.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
            // A clock stepped since the start (NTP, a resumed virtual machine) is followed.
            crate::app::align_clock(&app.store).await;
            app.refresh_shadowed().await;
            let _ = app.store.purge_expired_oauth_states(now).await;
            let _ = app.store.forget_replicas_before(now - 86_400_000).await;
            purge_old_rows(&app, now).await;
            last_purge = Some(std::time::Instant::now());
        }
        tokio::select! {
            () = tokio::time::sleep(RECOVERY_INTERVAL) => {}
            _ = shutdown.changed() => break,
        }
    }
}

/// Deletes events past the retention, and audit entries past theirs when one is set, a
/// batch at a time so that no statement runs long (at most 100 batches a minute each).
async fn purge_old_rows(app: &crate::app::App, now: i64) {
    const BATCH: i64 = 1_000;
    let events_before = now - app.config.event_retention.as_millis() as i64;
    purge_in_batches("events", BATCH, || {
        app.store.purge_old_events(events_before, BATCH)
    })
    .await;
    if let Some(retention) = app.config.audit_retention {
        let audit_before = now - retention.as_millis() as i64;
        purge_in_batches("audit entries", BATCH, || {
            app.store.purge_old_audit(audit_before, BATCH)
        })
        .await;
    }
}

async fn purge_in_batches<F, Purged>(what: &str, batch: i64, mut purge: F)
where
    F: FnMut() -> Purged,
    Purged: std::future::Future<Output = Result<u64, crate::store::StoreError>>,
{
    for _ in 0..100 {
        match purge().await {
            Ok(deleted) if deleted as i64 == batch => continue,
            Ok(_) => break,
            Err(error) => {
                tracing::warn!("purging old {what} failed: {error}");
                break;
            }
        }
    }
}

/// In-memory copies of instances and credentials unused this long are dropped.
const IDLE_CACHE_EVICTION: Duration = Duration::from_secs(600);

async fn deliverer(app: SharedApp, mut shutdown: watch::Receiver<bool>) {
    loop {
        let attempted = crate::events::deliver_due(&app, &shutdown).await;
        if *shutdown.borrow() {
            break;
        }
        if attempted > 0 {
            continue;
        }
        let sleep = match app.store.next_delivery_time().await {
            Ok(next) => crate::events::delivery_sleep(now_ms(), next),
            Err(_) => crate::events::DELIVERY_MAX_SLEEP,
        };
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            _ = shutdown.changed() => break,
        }
    }
}

#[cfg(test)]
mod supervision_tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A task that panics is started again; one that ends is not.
    #[tokio::test]
    async fn a_task_that_panics_starts_again() {
        let starts = Arc::new(AtomicUsize::new(0));
        let restarts = Arc::new(AtomicUsize::new(0));
        let (counted, restarted) = (Arc::clone(&starts), Arc::clone(&restarts));
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        super::supervise(
            "test",
            shutdown,
            move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        panic!("a bad row");
                    }
                }
            },
            move || {
                restarted.fetch_add(1, Ordering::SeqCst);
            },
        )
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        assert_eq!(restarts.load(Ordering::SeqCst), 2);
    }
}
