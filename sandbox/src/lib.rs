//! tokenwarden's sandbox OAuth 2.0 provider.
//!
//! A real authorization server with a protected API that imitates the quirks of real providers
//! (Adobe Sign, Salesforce, Box, Microsoft, and a plain RFC 6749/7009 one), so that expired,
//! revoked and rotated tokens can be produced on demand.
//!
//! Module map:
//! - [`clock`]: the sandbox's clock (real time plus an offset the tests can advance).
//! - [`profiles`]: the profiles, their URL layout and their run-time settings.
//! - [`state`]: clients, codes, grants, tokens, counters, and every rule about token life.
//! - [`faults`]: queued injected failures and delays.
//! - [`http`]: the axum router and one handler module per kind of endpoint.
//!
//! This crate is a separate workspace member so that it can never be linked into the service
//! by accident; the `tokenwarden sandbox` command and the service's tests call [`spawn`] or
//! [`serve`].

pub mod clock;
pub mod faults;
pub mod http;
pub mod profiles;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::state::Sandbox;

/// How the sandbox is started.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// `--client ID:SECRET`: the only client accepted. `None` accepts any id and secret,
    /// remembering each id's secret at first use.
    pub client: Option<(String, String)>,
    /// Base URL used in metadata documents and routing fields (`api_access_point`,
    /// `instance_url`). Default: `http://{bound addr}`, or the request's Host header when bound
    /// to an unspecified address such as `0.0.0.0`.
    pub public_url: Option<String>,
}

/// A sandbox running on the current tokio runtime.
///
/// Dropping it without calling [`RunningSandbox::shutdown`] leaves the server running until
/// the runtime ends.
#[derive(Debug)]
pub struct RunningSandbox {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub url: String,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningSandbox {
    /// Stops accepting connections, drains in-flight requests (at most 5 seconds), and waits
    /// for the server task.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Binds `bind` (port 0 allowed), spawns the server on the current runtime and returns at once.
pub async fn spawn(bind: SocketAddr, config: SandboxConfig) -> std::io::Result<RunningSandbox> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let stop = async move {
        // A dropped handle is not a shutdown request: keep serving.
        if shutdown_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let task = tokio::spawn(serve(listener, config, stop));
    Ok(RunningSandbox {
        addr,
        url: format!("http://{addr}"),
        shutdown,
        task,
    })
}

/// Serves on `listener` until `shutdown` completes, then drains in-flight requests.
pub async fn serve(
    listener: TcpListener,
    config: SandboxConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let public_url = config
        .public_url
        .clone()
        .or_else(|| (!addr.ip().is_unspecified()).then(|| format!("http://{addr}")));
    let sandbox = Arc::new(Sandbox::new(config.client, public_url));

    // The purger drops long-dead records once a minute; it stops with the server.
    let (stop_purger, mut purger_stopped) = watch::channel(false);
    let purger_state = Arc::clone(&sandbox);
    let purger = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => purger_state.purge(),
                _ = purger_stopped.changed() => break,
            }
        }
    });

    tracing::info!(%addr, "sandbox OAuth provider listening");
    let result = axum::serve(listener, http::router(sandbox))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = stop_purger.send(true);
    let _ = purger.await;
    result
}

/// The sandbox's router with fresh state, for embedding in another server or in tests with
/// `tower::ServiceExt::oneshot`.
pub fn router(config: SandboxConfig) -> axum::Router {
    http::router(Arc::new(Sandbox::new(config.client, config.public_url)))
}
