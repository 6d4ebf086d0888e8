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
