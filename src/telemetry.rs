//! Logging. `RUST_LOG` sets the filter (default `info`). No module logs a token or secret at any
//! level: secrets are `Secret`s, whose formatting is `[redacted]`.

pub fn init() {
    init_with_default("info");
}

/// Logging with `default` as the filter when `RUST_LOG` is not set.
pub fn init_with_default(default: &str) {
    use tracing_subscriber::EnvFilter;
    // PostgreSQL's notices (`relation "_sqlx_migrations" already exists, skipping` at every
    // start) are not the operator's news.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},sqlx::postgres::notice=warn")));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

use std::sync::OnceLock;
use std::sync::atomic::AtomicI64;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets (seconds) of every histogram: provider calls take milliseconds to the
/// provider timeout; scheduler lag is near zero unless the scheduler falls behind.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the Prometheus recorder once per process (tests start several apps in one).
/// Histograms are exported as Prometheus histograms (`_bucket`, `_sum`, `_count`), which can be
/// aggregated across replicas, not as per-process summaries.
///
/// The families: `tokenwarden_refresh_attempts_total{connector,outcome}`,
/// `tokenwarden_refresh_seconds`, `tokenwarden_proxy_requests_total{status}` (status class),
/// `tokenwarden_proxy_seconds`, `tokenwarden_instances{state}`,
/// `tokenwarden_scheduler_lag_seconds` (claim time minus due time),
/// `tokenwarden_scheduler_refreshes_total{outcome}`, `tokenwarden_scheduler_deferred_total`,
/// `tokenwarden_outbox_backlog`, `tokenwarden_outbox_oldest_pending_seconds`,
/// `tokenwarden_webhook_deliveries_total{outcome}`, `tokenwarden_build_info{version}`,
/// `tokenwarden_rotated_tokens_kept` (rotated tokens waiting in memory for the database: a
/// restart loses them).
///
/// A thread drains histogram samples into their buckets every [`UPKEEP_EVERY`]: the exporter
/// keeps each recorded value until then (or until a scrape), so without it a proxy nobody
/// scrapes would grow by every call's sample.
pub fn install_metrics() {
    PROMETHEUS.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .ok()?
            .install_recorder()
            .ok()?;
        let upkept = handle.clone();
        // Without the thread (none could be made), scrapes still drain the samples.
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkept.run_upkeep();
                }
            });
        describe_families();
        Some(handle)
    });
}

/// `# HELP` of each family, and `tokenwarden_build_info{version}`.
fn describe_families() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "tokenwarden_refresh_attempts_total",
        "Token refreshes at the provider by connector and outcome (ok, transient: tried again, invalid: the grant is gone)"
    );
    describe_histogram!(
        "tokenwarden_refresh_seconds",
        "Time of a refresh at the provider's token endpoint"
    );
    describe_gauge!(
        "tokenwarden_instances",
        "Instances by state (valid, refresh_failing, needs_reauthentication, disabled), read from the database: every replica sharing it shows the same counts (take max, not sum)"
    );
    describe_histogram!(
        "tokenwarden_scheduler_lag_seconds",
        "How late a scheduled refresh was claimed after it fell due"
    );
    describe_counter!(
        "tokenwarden_scheduler_refreshes_total",
        "Scheduled refreshes by outcome"
    );
    describe_counter!(
        "tokenwarden_scheduler_deferred_total",
        "Scheduled refreshes put off by the per-connector rate"
    );
    describe_gauge!(
        "tokenwarden_outbox_backlog",
        "Webhooks waiting to be delivered"
    );
    describe_gauge!(
        "tokenwarden_outbox_oldest_pending_seconds",
        "Age of the oldest webhook waiting to be delivered (0 when none)"
    );
    describe_counter!(
        "tokenwarden_webhook_deliveries_total",
        "Webhook delivery attempts by outcome (delivered, retry, failed: given up)"
    );
    describe_gauge!(
        "tokenwarden_rotated_tokens_kept",
        "Rotated tokens waiting in memory for the database (a restart loses them)"
    );
    describe_gauge!(
        "tokenwarden_clock_offset_seconds",
        "How far the clock the service goes by (PostgreSQL's with several replicas) is ahead of this machine's wall clock (negative: behind)"
    );
    describe_gauge!(
        "tokenwarden_build_info",
        "1, labelled with the running version"
    );
    metrics::gauge!("tokenwarden_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// How often histogram samples are drained into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

pub fn render_metrics() -> String {
    install_metrics();
    let mut text = PROMETHEUS
        .get()
        .and_then(|handle| handle.as_ref())
        .map(|handle| handle.render())
        .unwrap_or_default();
    PROXY_REQUESTS.render(&mut text);
    PROXY_SECONDS.render(&mut text);
    text
}

/// `tokenwarden_proxy_requests_total{status}`: proxied calls by the answer's status class.
pub static PROXY_REQUESTS: StatusClassCounter =
    StatusClassCounter::new("tokenwarden_proxy_requests_total");

/// A counter by status class (`1xx` … `5xx`) of our own, rendered as the exporter renders its
/// counters: a call costs one relaxed atomic addition (the exporter's also moves a generation
/// counter, through a shared handle).
pub struct StatusClassCounter {
    name: &'static str,
    counts: [std::sync::atomic::AtomicU64; 5],
}

impl StatusClassCounter {
    pub const fn new(name: &'static str) -> Self {
        StatusClassCounter {
            name,
            counts: [const { std::sync::atomic::AtomicU64::new(0) }; 5],
        }
    }

    pub fn count(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.counts[class].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Appends the family in Prometheus' text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let name = self.name;
        begin_family(out, name, "counter");
        for (class, count) in self.counts.iter().enumerate() {
            let count = count.load(std::sync::atomic::Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{status=\"{}xx\"}} {count}", class + 1);
        }
    }
}

/// A family's `# TYPE` line, after a blank line as the exporter separates its families.
fn begin_family(out: &mut String, name: &str, kind: &str) {
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push('\n');
    }
    if let Some(help) = help_of(name) {
        out.push_str(&format!("# HELP {name} {help}\n"));
    }
    out.push_str(&format!("# TYPE {name} {kind}\n"));
}

/// The `# HELP` of the families rendered here rather than by the exporter.
fn help_of(name: &str) -> Option<&'static str> {
    match name {
        "tokenwarden_proxy_requests_total" => Some(
            "Calls through the proxy by the answer's status class (the provider's answers and the proxy's own)",
        ),
        "tokenwarden_proxy_seconds" => Some("Time of a call through the proxy"),
        _ => None,
    }
}

/// `tokenwarden_proxy_seconds`: a proxied call's time, recorded on the proxy's hot path.
pub static PROXY_SECONDS: LatencyHistogram = LatencyHistogram::new("tokenwarden_proxy_seconds");

/// The bounds of [`BUCKETS`] in nanoseconds.
const BUCKET_NANOS: [u64; BUCKETS.len()] = {
    let mut nanos = [0u64; BUCKETS.len()];
    let mut i = 0;
    while i < BUCKETS.len() {
        nanos[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};

/// A histogram of durations over [`BUCKETS`], rendered as the exporter renders its own. A
/// sample costs two relaxed atomic additions; the exporter's histogram pins an epoch and
/// queues each sample for its upkeep, a measurable share of a proxied call.
pub struct LatencyHistogram {
    name: &'static str,
    /// Samples per bucket (not cumulative); the last one holds those above every bound.
    counts: [std::sync::atomic::AtomicU64; BUCKETS.len() + 1],
    sum_nanos: std::sync::atomic::AtomicU64,
}

impl LatencyHistogram {
    pub const fn new(name: &'static str) -> Self {
        LatencyHistogram {
            name,
            counts: [const { std::sync::atomic::AtomicU64::new(0) }; BUCKETS.len() + 1],
            sum_nanos: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn record(&self, elapsed: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKET_NANOS
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(BUCKETS.len());
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// Appends the family in Prometheus' text format: cumulative buckets, sum, count.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        let name = self.name;
        begin_family(out, name, "histogram");
        let mut cumulative = 0u64;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// How often a scrape reads the gauges from the store; scrapes in between see the last values
/// (a count over every instance per scrape would hold up SQLite's one connection at scale).
const GAUGES_EVERY_MS: i64 = 15_000;

/// Gauges read from the store when `/metrics` is scraped, at most every [`GAUGES_EVERY_MS`]:
/// instances by state (the API's state names), outbox backlog. They count the whole database,
/// so every replica reports the same totals: aggregate them across replicas with `max`, not
/// `sum`.
pub async fn update_gauges(app: &crate::app::App) {
    // In memory, no query: set at every scrape.
    metrics::gauge!("tokenwarden_rotated_tokens_kept").set(app.refresh.kept_count() as f64);
    metrics::gauge!("tokenwarden_clock_offset_seconds")
        .set(crate::app::clock_offset_ms() as f64 / 1000.0);
    // Per process: one service runs per process (the tests' one scrape included).
    static LAST_MS: AtomicI64 = AtomicI64::new(i64::MIN);
    let now = crate::app::now_ms();
    if !at_most_every(&LAST_MS, now, GAUGES_EVERY_MS) {
        return;
    }
    if let Ok(counts) = app.store.count_instances_by_state().await {
        // Every state is set, to 0 when absent, so a state that empties does not keep its
        // last count.
        for (stored, shown) in [
            ("valid", "valid"),
            ("invalid", "needs_reauthentication"),
            ("disabled", "disabled"),
            ("refresh_failing", "refresh_failing"),
        ] {
            let count = counts
                .iter()
                .find(|(name, _)| name == stored)
                .map_or(0, |(_, count)| *count);
            metrics::gauge!("tokenwarden_instances", "state" => shown).set(count as f64);
        }
    }
    if let Ok((backlog, oldest)) = app.store.pending_deliveries().await {
        metrics::gauge!("tokenwarden_outbox_backlog").set(backlog as f64);
        let age = oldest.map_or(0.0, |at| (now - at).max(0) as f64 / 1000.0);
        metrics::gauge!("tokenwarden_outbox_oldest_pending_seconds").set(age);
    }
}

/// Whether `interval_ms` has passed at `now` since the last call `last` let through; if so, this
/// one is let through (one caller of those racing) and `last` becomes `now`. For work or news
/// that comes at most once in a while: gauges read from the database, a log line repeated by
/// every request.
pub fn at_most_every(last: &AtomicI64, now: i64, interval_ms: i64) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let seen = last.load(Relaxed);
    now.saturating_sub(seen) >= interval_ms
        && last.compare_exchange(seen, now, Relaxed, Relaxed).is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn at_most_every_lets_one_through_each_interval() {
        let last = super::AtomicI64::new(i64::MIN);
        assert!(super::at_most_every(&last, 1_000, 10_000));
        assert!(!super::at_most_every(&last, 5_000, 10_000));
        assert!(super::at_most_every(&last, 11_000, 10_000));
        assert!(!super::at_most_every(&last, 11_000, 10_000));
    }

    #[test]
    fn a_status_class_counter_counts_each_class() {
        let counter = super::StatusClassCounter::new("t_total");
        for status in [200, 204, 302, 401, 404, 503, 101] {
            counter.count(status);
        }
        let mut text = String::new();
        counter.render(&mut text);
        assert_eq!(
            text,
            "# TYPE t_total counter\nt_total{status=\"1xx\"} 1\nt_total{status=\"2xx\"} 2\n\
             t_total{status=\"3xx\"} 1\nt_total{status=\"4xx\"} 2\nt_total{status=\"5xx\"} 1\n"
        );
    }

    #[test]
    fn a_latency_histogram_renders_cumulative_buckets_as_the_exporter_does() {
        use std::time::Duration;
        let histogram = super::LatencyHistogram::new("t_seconds");
        // On a bound (`le` includes it), between bounds, and above every bound.
        histogram.record(Duration::from_millis(5));
        histogram.record(Duration::from_millis(7));
        histogram.record(Duration::from_secs(61));
        let mut text = String::new();
        histogram.render(&mut text);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "# TYPE t_seconds histogram");
        assert_eq!(lines[1], "t_seconds_bucket{le=\"0.005\"} 1");
        assert_eq!(lines[2], "t_seconds_bucket{le=\"0.01\"} 2");
        assert!(lines.contains(&"t_seconds_bucket{le=\"1\"} 2"), "{text}");
        assert!(lines.contains(&"t_seconds_bucket{le=\"60\"} 2"), "{text}");
        assert!(lines.contains(&"t_seconds_bucket{le=\"+Inf\"} 3"), "{text}");
        assert!(lines.contains(&"t_seconds_sum 61.012"), "{text}");
        assert_eq!(lines.last(), Some(&"t_seconds_count 3"));
    }

    /// The exporter keeps every histogram sample until it is drained: a process nobody scrapes
    /// would grow by each proxied call's sample if no thread drained them.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_drains_histogram_samples_without_a_scrape() {
        super::install_metrics();
        let threads = || -> Vec<String> {
            std::fs::read_dir("/proc/self/task")
                .expect("the process's threads")
                .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
                .map(|name| name.trim().to_string())
                .collect()
        };
        // A new thread names itself once it runs.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut names = threads();
        while !names.iter().any(|name| name == "metrics-upkeep")
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
            names = threads();
        }
        assert!(
            names.iter().any(|name| name == "metrics-upkeep"),
            "threads: {names:?}"
        );
    }
}
