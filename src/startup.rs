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
    let service = crate::http::Service::new(Arc::clone(&app));
    tasks.spawn(serve_http(listener, service, shutdown_rx.clone()));
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

/// Accepts connections until shutdown, then lets the requests under way finish (the caller
/// bounds the wait). HTTP/1.1 and HTTP/2 (prior knowledge), `TCP_NODELAY` on every connection.
async fn serve_http(
    listener: tokio::net::TcpListener,
    service: crate::http::Service,
    mut shutdown: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: the listener stays; try again soon.
                tracing::warn!("accepting a connection: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |request| {
                let service = service.clone();
                async move { Ok::<_, std::convert::Infallible>(service.call(request).await) }
            }),
        );
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            // A connection's errors (a caller hanging up) are the caller's business.
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
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
