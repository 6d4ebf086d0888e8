//! Starting and stopping the service: the listener, the router, the background tasks, and a
//! graceful shutdown on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::app::{App, AppConfig, SharedApp, StartupError};

/// A service running in this process (tests and the demo use it; `serve` waits on it).
pub struct RunningServer {
    pub addr: SocketAddr,
    pub url: String,
    pub app: SharedApp,
    shutdown: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl RunningServer {
    /// Stops accepting, lets requests and background work finish (bounded), and returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(std::time::Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            tracing::warn!("shutdown: tasks still running after 10 s; leaving them");
            self.tasks.abort_all();
        }
    }
}

/// Builds the application and starts serving on `bind` (port 0 allowed).
pub async fn spawn(bind: SocketAddr, config: AppConfig) -> Result<RunningServer, StartupError> {
    crate::app::install_crypto_provider();
    let app = App::build(config).await?;
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|error| StartupError::Http(format!("could not listen on {bind}: {error}")))?;
    let addr = listener
        .local_addr()
        .map_err(|error| StartupError::Http(error.to_string()))?;
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let router = crate::http::router(Arc::clone(&app));
    let mut server_shutdown = shutdown_rx.clone();
    tasks.spawn(async move {
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = server_shutdown.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(error) = result {
            tracing::error!("the HTTP server stopped: {error}");
        }
    });
    crate::background::spawn_all(&app, &mut tasks, &mut shutdown_rx);
    tracing::info!(%addr, replica = %app.replica_id, "tokenwarden is serving");
    Ok(RunningServer {
        url: format!("http://{addr}"),
        addr,
        app,
        shutdown,
        tasks,
    })
}

/// `tokenwarden serve`: runs until SIGTERM or Ctrl-C, then shuts down gracefully.
pub async fn serve(bind: SocketAddr, config: AppConfig) -> Result<(), StartupError> {
    let server = spawn(bind, config).await?;
    eprintln!("tokenwarden serving on {}", server.url);
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
