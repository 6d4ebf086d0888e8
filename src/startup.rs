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
    pub async fn shutdown(self) {
        let drain = self.app.config.shutdown_timeout;
        self.shutdown_within(drain).await;
    }

    /// [`Self::shutdown`], cutting calls still in flight after `drain`. The replica goes on
    /// saying it runs while it stops (a copy of the database must not start under it).
    pub async fn shutdown_within(self, drain: std::time::Duration) {
        let app = Arc::clone(&self.app);
        let presence = async {
            if !app.config.background_tasks {
                return std::future::pending().await;
            }
            loop {
                tokio::time::sleep(crate::background::PRESENCE_INTERVAL).await;
                let _ = app
                    .store
                    .replica_seen(
                        &app.replica_id,
                        crate::app::now_ms(),
                        &app.keyring.current_key_id(),
                    )
                    .await;
            }
        };
        tokio::select! {
            () = self.stop(drain) => {}
            () = presence => {}
        }
        // Stopped, all written: a copy need not wait for this replica's last word to grow old.
        if app.config.background_tasks {
            let _ = app.store.replica_gone(&app.replica_id).await;
        }
    }

    async fn stop(mut self, drain: std::time::Duration) {
        let _ = self.shutdown.send(true);
        // Superseded grants waiting to be revoked (Salesforce's cap counts them) are revoked
        // now, while the rest drains, rather than left alive by the stop.
        self.app.refresh.stopping();
        // Calls in flight (a slow report, a long download, a refresh waiting on a slow token
        // endpoint) finish, up to `--shutdown-timeout`: cut at 10 s, their callers got no
        // answer for work the provider had done, and retried it.
        let calls = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(drain, calls).await.is_err() {
            tracing::warn!(
                "shutdown: calls still in flight after {} s (--shutdown-timeout) are cut",
                drain.as_secs()
            );
            self.tasks.abort_all();
        }
        // Refreshes and revocations under way end with their commit: a revocation may wait
        // for the instance (15 s) and make two provider calls, then commit with retries. (Give
        // the process that long to stop: a termination grace period of 80 s.)
        let limit = (self.app.config.provider_timeout * 2 + std::time::Duration::from_secs(20))
            .max(
                self.app.config.provider_timeout
                    + crate::refresh::COMMIT_RETRY_FOR
                    + std::time::Duration::from_secs(10),
            );
        if !self.app.refresh.wait_until_done(limit).await {
            tracing::warn!(
                "shutdown: refreshes still running after {} s; their leases will expire",
                limit.as_secs()
            );
        }
        if !self
            .app
            .refresh
            .wait_for_superseded(std::time::Duration::from_secs(35))
            .await
        {
            tracing::warn!(
                "shutdown: superseded grants still being revoked after 35 s; leaving them"
            );
        }
        // Rotated tokens the store has not taken are the only copy of their grants: the stop
        // waits for the database to take them (a failover, a restart of it), bounded by the
        // time they are kept at all.
        let kept = self.app.refresh.kept_instances();
        if !kept.is_empty() {
            let limit = KEPT_TOKENS_STOP_WAIT.min(self.app.config.rotated_tokens_kept_for);
            tracing::warn!(
                instances = ?kept,
                "shutdown: waiting up to {} s for the database to take rotated tokens kept for it",
                limit.as_secs()
            );
            if !self.app.refresh.wait_for_kept(limit).await {
                tracing::error!(
                    instances = ?self.app.refresh.kept_instances(),
                    "shutdown: rotated tokens the store never took are dropped; the provider may have retired these instances' stored refresh tokens"
                );
            }
        }
    }
}

/// How long a stop waits for the database to take rotated tokens kept for it.
const KEPT_TOKENS_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Builds the application and starts serving on `bind` (port 0 allowed).
pub async fn spawn(bind: SocketAddr, config: AppConfig) -> Result<RunningServer, StartupError> {
    crate::app::install_crypto_provider();
    let app = App::build(config).await?;
    let listener = listen(bind)
        .map_err(|error| StartupError::Listen(format!("could not listen on {bind}: {error}")))?;
    let addr = listener
        .local_addr()
        .map_err(|error| StartupError::Listen(error.to_string()))?;
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    // Raised whatever the cap: a cap given above the limit would meet EMFILE first.
    let open_file_limit = raise_open_file_limit();
    let max_connections = app
        .config
        .max_connections
        .unwrap_or_else(|| default_max_connections(open_file_limit));
    if let Some(limit) = open_file_limit
        && max_connections as u64 > default_max_connections(Some(limit)) as u64
    {
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            "--max-connections is above half the open-file limit: calls in flight may run out of descriptors for their providers' connections"
        );
    }
    app.connections
        .max
        .store(max_connections as u64, std::sync::atomic::Ordering::Relaxed);
    let service = crate::http::Service::new(Arc::clone(&app));
    tasks.spawn(serve_http(
        listener,
        service,
        max_connections,
        shutdown_rx.clone(),
    ));
    crate::background::spawn_all(&app, &mut tasks, &mut shutdown_rx);
    // What it opened, named: a mistyped path made a new database, and nothing said which.
    tracing::info!(
        %addr,
        replica = %app.replica_id,
        database = %crate::secret::url_without_credentials(&app.config.database_url)
            .unwrap_or_else(|| "the database".to_string()),
        master_key = %format!("{} from {}", app.keyring.current_key_id(), crate::app::key_source(&app.config)),
        "tokenwarden is serving"
    );
    Ok(RunningServer {
        url: format!("http://{addr}"),
        addr,
        app,
        shutdown,
        tasks,
    })
}

/// Connections the kernel completes and queues for the accept loop. tokio's `bind` asks for
/// 128 (the standard library's value): a burst of more connections than that while the
/// service is busy overflows the queue, and the kernel drops the handshakes' last step, so
/// those callers wait for a retransmission, one second at least (`bench/run storm` opening 1,000
/// connections saw it on most rounds). The kernel caps it at `net.core.somaxconn` (4096 by
/// default since Linux 5.4).
const LISTEN_BACKLOG: u32 = 1024;

/// A listener on `bind` (port 0 allowed) with [`LISTEN_BACKLOG`]; `SO_REUSEADDR` as the standard
/// library sets it, so a restart does not wait for the old connections' `TIME_WAIT`. The
/// `sandbox` command listens with it too: a provider takes a burst of new connections from the
/// proxy's pool (1,000 calls at once open up to 1,000), as real ones do.
pub fn listen(bind: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if bind.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(bind)?;
    socket.listen(LISTEN_BACKLOG)
}

/// File descriptors kept for the database's connections, the providers' pooled ones beyond
/// one per call, the key file and the like, when the caller connections are capped by default.
const KEPT_DESCRIPTORS: u64 = 256;

/// The open-file limit, raised to its hard limit (as Go's runtime does at start): the soft
/// limit is 1,024 on most systems, which a proxy holding two descriptors per call in flight
/// reaches at about 500 callers. What it is afterwards; `None` where it cannot be read.
// `rlim_t` is not `u64` on every platform.
#[allow(clippy::unnecessary_cast)]
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit read and write the one struct given, which lives
        // on this stack frame for both calls.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        Some(limit.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Caller connections served at once when `serve --max-connections` is not given: half of the
/// open-file limit less [`KEPT_DESCRIPTORS`] (each call in flight also holds a connection to
/// its provider), at least 64, at most a million; 10,000 where the limit is unknown.
pub fn default_max_connections(open_file_limit: Option<u64>) -> usize {
    match open_file_limit {
        Some(limit) => (limit.saturating_sub(KEPT_DESCRIPTORS) / 2).clamp(64, 1_000_000) as usize,
        None => 10_000,
    }
}

/// Accepts connections until shutdown, then lets the requests under way finish (the caller
/// bounds the wait). HTTP/1.1 and HTTP/2 (prior knowledge), `TCP_NODELAY` on every connection.
/// At most `max_connections` are served at once, rather than taking the descriptors the
/// database and the providers' connections need: past that, connections that have not sent a
/// whole request head within [`UNHEARD_FOR`] of connecting are closed at once, oldest first;
/// else a connection accepted waits a
/// quarter second for a place, then the oldest connections are asked to finish (one that has
/// sent nothing, or an idle kept-alive one, closes at once, a busy one after its answer), one
/// first and twice as many each quarter second while none frees its place; the next ones wait
/// in the listen backlog meanwhile (as nginx reuses kept-alive connections when its
/// `worker_connections` run out: clients' idle pools, or a load balancer's, must not shut out
/// new callers and health checks).
async fn serve_http(
    listener: tokio::net::TcpListener,
    service: crate::http::Service,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Arc::new(OpenConnections::default());
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    // When the cap was last said to be reached (once a minute at most).
    let mut said_full: Option<std::time::Instant> = None;
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
        // A place for it: past the cap, the oldest connections are asked to finish while it
        // waits (it alone, one descriptor over the cap; the rest wait in the backlog), only
        // when a connection has come, not to keep a place free.
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if said_full.is_none_or(|at| at.elapsed() > std::time::Duration::from_secs(60)) {
                    said_full = Some(std::time::Instant::now());
                    tracing::warn!(
                        max_connections,
                        "{max_connections} connections open, the most served at once: the oldest are asked to finish for new ones (serve --max-connections)"
                    );
                }
                // Connections that have not sent a whole request in a second go first, at once
                // (idle sockets and heads sent a byte at a time held every place until the
                // idle timeout, shutting out every caller). Else a moment for a place to free
                // itself, then the oldest are asked, one first, twice as many each quarter of
                // a second while none frees its place (up to a sixty-fourth of the cap at a
                // time): no more go than the new ones need.
                let mut shed = 0;
                let waited = loop {
                    let dropped = open.drop_unheard(UNHEARD_FOR, shed.max(1));
                    if dropped == 0 && shed > 0 {
                        open.ask_oldest_to_finish(shed);
                    }
                    tokio::select! {
                        slot = Arc::clone(&slots).acquire_owned() => break slot.ok(),
                        () = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                        _ = shutdown.wait_for(|stop| *stop) => break None,
                    }
                    shed = (shed * 2).clamp(1, (max_connections / 64).max(1));
                };
                match waited {
                    Some(slot) => slot,
                    None => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        // Counted from here, so that shutdown waits for it whatever it is doing.
        let registration = open.register();
        let service = service.clone();
        let shutdown = shutdown.clone();
        let counted = Counted::new(Arc::clone(service.app()), slot);
        tokio::spawn(async move {
            serve_connection(stream, service, registration, shutdown).await;
            drop(counted);
        });
    }
    drop(listener);
    open.finish().await;
}

/// A connection's place among those served at once, and in the count `/healthz` shows: given
/// back when the connection's task ends, however it ends.
struct Counted {
    app: SharedApp,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Counted {
    fn new(app: SharedApp, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        app.connections
            .open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Counted { app, _slot: slot }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.app
            .connections
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One connection, in the protocol its first bytes show. They are peeked at, not read, so the
/// connection is served by hyper's HTTP/1 or HTTP/2 connection straight on the socket: hyper-util's
/// auto-detecting connection reads through a rewinding wrapper for the connection's whole life,
/// a cost on every proxied call. A client that sends the HTTP/2 preface in pieces (none seen in
/// practice) is peeked at again until the bytes tell, within the header read timeout.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    service: crate::http::Service,
    registration: Registration,
    mut shutdown: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let header_read_timeout = service.app().config.header_read_timeout;
    let mut head = [0u8; 24];
    // The first bytes, until they tell the protocol: a client that sends part of the HTTP/2
    // preface and stops is given up with the rest at the header read timeout.
    let told = async {
        let mut pause = std::time::Duration::from_millis(5);
        loop {
            let n = stream.peek(&mut head).await?;
            if n == 0 || n == head.len() || !HTTP2_PREFACE.starts_with(&head[..n]) {
                return Ok::<usize, std::io::Error>(n);
            }
            // More of the preface may come: a pause, growing (a client that stops there costs
            // a look now and then, not 200 a second), so as not to spin on the same bytes.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(250));
        }
    };
    let peeked = tokio::select! {
        peeked = tokio::time::timeout(header_read_timeout, told) => peeked,
        _ = shutdown.wait_for(|stop| *stop) => return,
        // The cap reached: a connection that has sent nothing yet is among the first to go.
        () = registration.asked_to_finish() => return,
    };
    let seen = match peeked {
        Ok(Ok(0) | Err(_)) | Err(_) => return,
        Ok(Ok(n)) => &head[..n],
    };
    let heard = registration.heard_handle();
    let service = hyper::service::service_fn(move |request| {
        heard.mark();
        let service = service.clone();
        async move { Ok::<_, std::convert::Infallible>(service.call(request).await) }
    });
    let io = TokioIo::new(stream);
    // A connection's errors (a caller hanging up) are the caller's business.
    // HTTP/1: hyper's header read timeout, which needs its timer (without one it is off).
    // HTTP/2: pings find peers that went away.
    if seen == HTTP2_PREFACE {
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(header_read_timeout))
            .serve_connection(io, service);
        let _ = registration.watch(connection).await;
    } else {
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(io, service);
        let _ = registration.watch(connection).await;
    }
}

/// The connections being served, so that shutdown can ask each to finish (an HTTP/1 connection
/// answers what it is reading and closes; an idle one closes at once) and wait until all have.
///
/// hyper-util's graceful watcher polls a channel every time a connection is woken, once or
/// twice per proxied call. Here a connection's poll reads one flag, and leaves its waker only
/// when the waker changes (for a task, never): shutdown sets the flag, then wakes them all.
#[derive(Default)]
struct OpenConnections {
    stopping: std::sync::atomic::AtomicBool,
    next_id: std::sync::atomic::AtomicU64,
    /// Connections with a smaller id are asked to finish (the cap reached: the oldest go).
    finish_before: std::sync::atomic::AtomicU64,
    /// Each open connection's waker, by id (ids grow: the oldest first).
    wakers: std::sync::Mutex<std::collections::BTreeMap<u64, std::task::Waker>>,
    /// The connections that have not sent a whole request head yet, by id: when they came.
    unheard: std::sync::Mutex<std::collections::BTreeMap<u64, (std::time::Instant, Arc<Heard>)>>,
    /// Notified when the last connection closes after shutdown began.
    all_closed: tokio::sync::Notify,
}

impl OpenConnections {
    /// Counts a connection in until the registration is dropped.
    fn register(self: &Arc<Self>) -> Registration {
        use std::sync::atomic::Ordering;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.wakers
            .lock()
            .unwrap()
            .insert(id, std::task::Waker::noop().clone());
        let heard = Arc::new(Heard::default());
        self.unheard
            .lock()
            .unwrap()
            .insert(id, (std::time::Instant::now(), Arc::clone(&heard)));
        Registration {
            open: Arc::clone(self),
            id,
            heard,
        }
    }

    /// Gives up at most `count` of the connections that came `silent_for` ago or more and have
    /// not sent a whole request head since (oldest first): they close at once, without an
    /// answer, whatever they were reading. Returns how many.
    fn drop_unheard(&self, silent_for: std::time::Duration, count: usize) -> usize {
        use std::sync::atomic::Ordering;
        let chosen: Vec<u64> = {
            let unheard = self.unheard.lock().unwrap();
            unheard
                .iter()
                .filter(|(_, (at, heard))| {
                    at.elapsed() >= silent_for
                        && !heard.dropped.load(Ordering::SeqCst)
                        && !heard.heard.load(Ordering::SeqCst)
                })
                .take(count)
                .map(|(id, (_, heard))| {
                    heard.dropped.store(true, Ordering::SeqCst);
                    *id
                })
                .collect()
        };
        let wakers = self.wakers.lock().unwrap();
        for id in &chosen {
            if let Some(waker) = wakers.get(id) {
                waker.wake_by_ref();
            }
        }
        chosen.len()
    }

    /// Asks the `count` oldest connections not asked yet to finish (gracefully: an idle one
    /// closes at once, a busy one after its answer).
    fn ask_oldest_to_finish(&self, count: usize) {
        use std::sync::atomic::Ordering;
        let wakers = self.wakers.lock().unwrap();
        let from = self.finish_before.load(Ordering::SeqCst);
        let chosen: Vec<(&u64, &std::task::Waker)> = wakers.range(from..).take(count).collect();
        let Some((last, _)) = chosen.last() else {
            return;
        };
        self.finish_before.store(**last + 1, Ordering::SeqCst);
        for (_, waker) in chosen {
            waker.wake_by_ref();
        }
    }

    /// Asks every connection to finish, and waits until they have.
    async fn finish(&self) {
        use std::sync::atomic::Ordering;
        self.stopping.store(true, Ordering::SeqCst);
        let closed = self.all_closed.notified();
        tokio::pin!(closed);
        closed.as_mut().enable();
        {
            let wakers = self.wakers.lock().unwrap();
            if wakers.is_empty() {
                return;
            }
            for waker in wakers.values() {
                waker.wake_by_ref();
            }
        }
        closed.await;
    }
}

/// A connection counted among the open ones.
struct Registration {
    open: Arc<OpenConnections>,
    id: u64,
    heard: Arc<Heard>,
}

/// How long a connection may go without sending a whole request head before it is the first
/// to go when the cap is reached (a caller sends its request as it connects).
const UNHEARD_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a connection has sent a whole request head, and whether it was given up before.
#[derive(Default)]
struct Heard {
    heard: std::sync::atomic::AtomicBool,
    dropped: std::sync::atomic::AtomicBool,
}

/// What a connection's service tells its registration with: a request came.
struct HeardHandle {
    open: Arc<OpenConnections>,
    id: u64,
    heard: Arc<Heard>,
}

impl HeardHandle {
    /// A request head came whole: the connection is no longer among the unheard (once; then
    /// one load per request).
    fn mark(&self) {
        use std::sync::atomic::Ordering;
        if !self.heard.heard.load(Ordering::Relaxed)
            && !self.heard.heard.swap(true, Ordering::SeqCst)
        {
            self.open.unheard.lock().unwrap().remove(&self.id);
        }
    }
}

impl Registration {
    /// Whether the connection is asked to finish: shutdown, or the cap reached and it among the
    /// oldest, or among those that have sent no request.
    fn asked(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.open.stopping.load(Ordering::SeqCst)
            || self.id < self.open.finish_before.load(Ordering::SeqCst)
            || self.heard.dropped.load(Ordering::SeqCst)
    }

    /// Whether the connection is given up: the cap reached before it sent a whole request.
    fn given_up(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.heard.dropped.load(Ordering::SeqCst) && !self.heard.heard.load(Ordering::SeqCst)
    }

    fn heard_handle(&self) -> HeardHandle {
        HeardHandle {
            open: Arc::clone(&self.open),
            id: self.id,
            heard: Arc::clone(&self.heard),
        }
    }

    /// Completes when the connection is asked to finish (shutdown, or the cap reached), before
    /// it is served: its waker is left where [`OpenConnections`] wakes them.
    async fn asked_to_finish(&self) {
        let mut left: Option<std::task::Waker> = None;
        std::future::poll_fn(|cx| {
            let open = &self.open;
            if left
                .as_ref()
                .is_none_or(|waker| !waker.will_wake(cx.waker()))
            {
                let waker = cx.waker().clone();
                open.wakers.lock().unwrap().insert(self.id, waker.clone());
                left = Some(waker);
            }
            if self.asked() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// The connection, finishing gracefully when the server shuts down.
    fn watch<C>(self, connection: C) -> Watched<C>
    where
        C: hyper_util::server::graceful::GracefulConnection,
    {
        Watched {
            connection: Box::pin(connection),
            registration: self,
            waker: std::task::Waker::noop().clone(),
            asked: false,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if !self.heard.heard.load(Ordering::SeqCst) {
            self.open.unheard.lock().unwrap().remove(&self.id);
        }
        let mut wakers = self.open.wakers.lock().unwrap();
        wakers.remove(&self.id);
        if wakers.is_empty() && self.open.stopping.load(Ordering::SeqCst) {
            self.open.all_closed.notify_waiters();
        }
    }
}

/// A connection that finishes gracefully when its server shuts down.
struct Watched<C> {
    connection: std::pin::Pin<Box<C>>,
    registration: Registration,
    /// The waker left with the registration.
    waker: std::task::Waker,
    /// Whether it was asked to finish already.
    asked: bool,
}

impl<C> std::future::Future for Watched<C>
where
    C: hyper_util::server::graceful::GracefulConnection,
{
    /// `None`: given up before a whole request came (the connection is dropped).
    type Output = Option<C::Output>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<C::Output>> {
        let this = self.get_mut();
        if !this.asked {
            let open = &this.registration.open;
            // The waker first, the flag after: shutdown sets the flag before it takes the lock
            // to wake, so a connection either sees the flag here or is woken.
            if !this.waker.will_wake(cx.waker()) {
                this.waker = cx.waker().clone();
                let mut wakers = open.wakers.lock().unwrap();
                wakers.insert(this.registration.id, this.waker.clone());
            }
            if this.registration.asked() {
                if this.registration.given_up() {
                    return std::task::Poll::Ready(None);
                }
                this.asked = true;
                this.connection.as_mut().graceful_shutdown();
            }
        } else if this.registration.given_up() {
            // Asked to finish (a head begun does not end that way), then given up.
            return std::task::Poll::Ready(None);
        }
        this.connection.as_mut().poll(cx).map(Some)
    }
}

/// `tokenwarden serve`: runs until SIGTERM or Ctrl-C, then shuts down gracefully.
pub async fn serve(bind: SocketAddr, config: AppConfig) -> Result<(), StartupError> {
    let server = spawn(bind, config).await?;
    eprintln!("tokenwarden serving on {}", server.url);
    let app = Arc::clone(&server.app);
    let copied_away = tokio::select! {
        () = shutdown_signal() => false,
        () = app.copied_away.notified() => true,
    };
    tracing::info!("shutting down");
    if copied_away {
        // The service runs on the copy: what is written here from now on is not there.
        server
            .shutdown_within(std::time::Duration::from_secs(10))
            .await;
    } else {
        server.shutdown().await;
    }
    // A clean stop leaves the SQLite file whole: its log written into it and removed (a copy
    // of the file alone after a stop missed the last writes).
    app.store
        .close_within(std::time::Duration::from_secs(5))
        .await;
    if copied_away {
        return Err(StartupError::Copied(
            "this database was copied away while the service ran (`tokenwarden database copy`): the service runs on the copy now".into(),
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The default cap leaves a descriptor per call in flight for its provider, and 256 for the
    /// rest; the open-file limit is raised, never lowered.
    #[test]
    fn the_default_cap_follows_the_open_file_limit() {
        assert_eq!(default_max_connections(Some(1024)), 384);
        assert_eq!(default_max_connections(Some(1_048_576)), 524_160);
        assert_eq!(default_max_connections(Some(100)), 64);
        assert_eq!(default_max_connections(Some(u64::MAX)), 1_000_000);
        assert_eq!(default_max_connections(None), 10_000);
        let before = raise_open_file_limit().unwrap();
        assert!(raise_open_file_limit().unwrap() >= before);
    }

    /// A burst of connections larger than tokio's default backlog (128) is queued whole while
    /// nothing accepts: every one of them is there to accept at once, none waits for the
    /// kernel's retransmission (a second or more).
    #[tokio::test]
    async fn a_burst_of_connections_is_queued_while_nothing_accepts() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        const BURST: usize = 300;
        let mut clients = Vec::with_capacity(BURST);
        for n in 0..BURST {
            // A full queue drops the handshake: the connect then waits for retransmissions.
            let connecting = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(std::time::Duration::from_secs(3), connecting).await {
                Ok(connected) => clients.push(connected.unwrap()),
                Err(_) => panic!("connection {n} of {BURST} was not taken into the queue"),
            }
        }
        let mut accepted = 0;
        while let Ok(Ok(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(300), listener.accept()).await
        {
            accepted += 1;
        }
        assert_eq!(accepted, BURST, "connections dropped from the accept queue");
    }
}
