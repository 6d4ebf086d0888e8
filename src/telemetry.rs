//! Logging. `RUST_LOG` sets the filter (default `info`). No module logs a token or secret at any
//! level: secrets are `Secret`s, whose formatting is `[redacted]`.

pub fn init() {
    init_with_default("info");
}

/// Logging with `default` as the filter when `RUST_LOG` is not set.
pub fn init_with_default(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

use std::sync::OnceLock;

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
/// `tokenwarden_outbox_backlog`, `tokenwarden_webhook_deliveries_total{outcome}`.
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
        Some(handle)
    });
}

/// How often histogram samples are drained into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

pub fn render_metrics() -> String {
    install_metrics();
    PROMETHEUS
        .get()
        .and_then(|handle| handle.as_ref())
        .map(|handle| handle.render())
        .unwrap_or_default()
}

/// Gauges read from the store when `/metrics` is scraped: instances by state, outbox backlog.
pub async fn update_gauges(app: &crate::app::App) {
    if let Ok(counts) = app.store.count_instances_by_state().await {
        // Every state is set, to 0 when absent, so a state that empties does not keep its
        // last count.
        for state in ["valid", "invalid", "disabled", "refresh_failing"] {
            let count = counts
                .iter()
                .find(|(name, _)| name == state)
                .map_or(0, |(_, count)| *count);
            metrics::gauge!("tokenwarden_instances", "state" => state).set(count as f64);
        }
    }
    if let Ok(backlog) = app.store.count_pending_deliveries().await {
        metrics::gauge!("tokenwarden_outbox_backlog").set(backlog as f64);
    }
}

#[cfg(test)]
mod tests {
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
