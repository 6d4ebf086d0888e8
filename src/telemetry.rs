//! Logging. `RUST_LOG` sets the filter (default `info`). No module logs a token or secret at any
//! level: secrets are `Secret`s, whose formatting is `[redacted]`.

pub fn init() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process (tests start several apps in one).
pub fn install_metrics() {
    PROMETHEUS.get_or_init(|| PrometheusBuilder::new().install_recorder().ok());
}

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
        for (state, count) in counts {
            metrics::gauge!("tokenwarden_instances", "state" => state).set(count as f64);
        }
    }
    if let Ok(backlog) = app.store.count_pending_deliveries().await {
        metrics::gauge!("tokenwarden_outbox_backlog").set(backlog as f64);
    }
}
