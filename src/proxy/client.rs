//! The proxy's outbound client: hyper's HTTP/1.1 connections in a pool of our own.
//!
//! reqwest (which the token, revocation and webhook calls use) parses every URL again and wraps
//! each call in layers the proxy does not need, and hyper-util's pooled client hashes the
//! target's authority twice per call and spawns a task per answer to put the connection back;
//! on the proxy's hot path each cost more than the proxying itself. Here a call arrives as its
//! origin (scheme and authority of the instance's base, parsed once, with a key computed then)
//! and its path and query; a connection is taken from the origin's idle list and goes back
//! there when the answer's body has been read to its end (see [`IdleTimeout`]), so a call
//! costs two short lock holds and no task. Each connection keeps one timer for the answer's
//! headers, moved forward per call rather than made anew.
//!
//! What it keeps of the service's outbound rules: names resolved through the egress guard (no
//! link-local or metadata address), redirects never followed, TLS by rustls with the
//! platform's roots, `TCP_NODELAY`, a connect timeout, and an idle timeout on the answer's body:
//! a provider that stops sending for that long is given up, however long the whole body takes.
//! Connections speak HTTP/1.1, as nginx's `proxy_pass` does: every provider speaks it, and a
//! connection per call in flight is what the pool keeps anyway. A pooled connection that the
//! provider closed meanwhile is noticed before the request goes out, and the request goes on
//! a new connection instead.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::uri::Authority;
use axum::http::{Request, Response, Uri};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Connector = hyper_rustls::HttpsConnector<HttpConnector<GuardedNames>>;

/// Idle connections kept per origin.
const MAX_IDLE_PER_ORIGIN: usize = 256;
/// An idle connection older than this is closed rather than used.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often idle lists are swept of closed and old connections.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// A pooled connection that closes this soon after a request went out on it was closed by the
/// provider as the request arrived (its keep-alive ended): the request is [`CallError::Stale`].
/// One that closes later may have been worked on, and is not.
const STALE_WITHIN: Duration = Duration::from_secs(1);
/// Whether a pooled connection was closed under a request: ended without an answer, or reset
/// (a provider that closes an idle connection with unread bytes on it, the request's, resets
/// it: the request was never read).
fn closed_under(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        source = cause.source();
    }
    false
}

/// The longest an upload keeps extending the wait for the answer (a caller trickling bytes
/// would hold the call open for good otherwise).
const UPLOAD_AT_MOST: Duration = Duration::from_secs(3600);

/// The proxy's connections to providers.
pub struct ProxyClient {
    connector: Connector,
    idle: Mutex<IdleLists>,
}

struct IdleLists {
    origins: HashMap<u64, Origin, super::PrehashedKeys>,
    swept: Instant,
}

/// One origin's idle connections, newest last, with when each was put back.
struct Origin {
    https: bool,
    authority: Authority,
    connections: Vec<(Connection, Instant)>,
}

/// A connection to a provider, and its timer for the answer's headers. The timer lives as long
/// as the connection and is moved forward for each call: moving a registered tokio timer later
/// is an atomic store, where a timer per call is put in and taken out of the timer wheel each
/// time (a measurable share of a proxied call).
struct Connection {
    sender: SendRequest<Body>,
    headers_due: Pin<Box<tokio::time::Sleep>>,
}

/// Builds the proxy's client.
pub fn build(egress: Arc<crate::egress::Policy>) -> Result<ProxyClient, String> {
    crate::app::install_crypto_provider();
    let mut http = HttpConnector::new_with_resolver(GuardedNames(egress));
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    use rustls_platform_verifier::ConfigVerifierExt;
    let tls = rustls::ClientConfig::with_platform_verifier()
        .map_err(|error| format!("the TLS roots could not be loaded: {error}"))?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(ProxyClient {
        connector,
        idle: Mutex::new(IdleLists {
            origins: HashMap::default(),
            swept: Instant::now(),
        }),
    })
}

/// Why a call did not get an answer.
#[derive(Debug)]
pub enum CallError {
    /// No connection could be made.
    Connect(BoxError),
    /// The connection failed during the exchange.
    Exchange(hyper::Error),
    /// A pooled connection closed with the request on it and no answer: the provider closed
    /// it as the request went out (its keep-alive ended). The request may have reached it; an
    /// idempotent one can be sent again on a new connection.
    Stale(hyper::Error),
    /// No answer's headers came in time (connecting included).
    TimedOut,
}

impl CallError {
    /// In words, without addresses beyond what the error itself says.
    pub fn message(&self) -> String {
        let (kind, chain) = match self {
            CallError::Connect(error) => (
                "the connection failed",
                crate::oauth::error_chain(error.as_ref()),
            ),
            CallError::Exchange(error) | CallError::Stale(error) => {
                ("the request failed", crate::oauth::error_chain(error))
            }
            CallError::TimedOut => return "no answer came in time".into(),
        };
        crate::oauth::cut_text(&format!("{kind}: {chain}"), 300)
    }
}

/// A connection lent to one call: back to its origin's idle list when the answer's body has
/// been read to its end, closed otherwise.
pub struct Lease {
    client: Arc<ProxyClient>,
    key: u64,
    https: bool,
    authority: Authority,
    connection: Connection,
    /// When the call began.
    started: Instant,
}

impl ProxyClient {
    /// Sends `request` (its URI the path and query alone, as an HTTP/1.1 request line to an
    /// origin server carries them) on a pooled or new connection to the origin `https` and
    /// `authority`, `key` being the origin's key ([`super::ProxyBase::origin_key`]). The
    /// answer's headers must come by `deadline`, connecting included. `now` is the call's
    /// start: pooled connections are aged by it, and the connection goes back to the pool
    /// stamped with it, idle from then on as far as the pool knows (so one is closed early
    /// rather than late, and a call costs no clock reading of its own). `fresh`: on a new
    /// connection, not a pooled one. `upload`: a streamed request body's progress; while it
    /// goes on, the wait for the answer's headers is counted from its last chunk, not from
    /// `now` (a provider answers once the upload is in, however long it takes).
    #[allow(clippy::too_many_arguments)]
    pub async fn request(
        self: &Arc<Self>,
        key: u64,
        https: bool,
        authority: &Authority,
        mut request: Request<Body>,
        now: Instant,
        deadline: tokio::time::Instant,
        fresh: bool,
        upload: Option<Arc<UploadProgress>>,
    ) -> Result<(Response<Incoming>, Lease), CallError> {
        loop {
            let pooled = if fresh {
                None
            } else {
                self.take(key, https, authority, now)
            };
            let (mut connection, pooled) = match pooled {
                Some(connection) => (connection, true),
                // Boxed: the connection's set-up is a large future, and unboxed it would make
                // every call's future as large (and copied as often) for the rare call that
                // connects.
                None => {
                    let connecting = Box::pin(self.connect(https, authority, deadline));
                    match tokio::time::timeout_at(deadline, connecting).await {
                        Ok(connected) => (connected?, false),
                        Err(_) => return Err(CallError::TimedOut),
                    }
                }
            };
            let Connection {
                sender,
                headers_due,
            } = &mut connection;
            if sender.ready().await.is_err() {
                if pooled {
                    continue;
                }
                return Err(CallError::Connect(
                    "the new connection closed at once".into(),
                ));
            }
            headers_due.as_mut().reset(deadline);
            let mut sending = std::pin::pin!(sender.try_send_request(request));
            let sent = std::future::poll_fn(|cx| match sending.as_mut().poll(cx) {
                Poll::Ready(sent) => Poll::Ready(Some(sent)),
                Poll::Pending => loop {
                    if headers_due.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Due: unless the upload moved since, then counted from its last chunk (for
                    // an hour of upload at most).
                    let moved = upload
                        .as_ref()
                        .map(|upload| upload.last(now))
                        .filter(|last| last.saturating_duration_since(now) < UPLOAD_AT_MOST)
                        .map(|last| {
                            tokio::time::Instant::from_std(last)
                                + deadline
                                    .saturating_duration_since(tokio::time::Instant::from_std(now))
                        });
                    match moved {
                        Some(due) if due > tokio::time::Instant::now() => {
                            headers_due.as_mut().reset(due);
                        }
                        _ => return Poll::Ready(None),
                    }
                },
            })
            .await;
            match sent {
                Some(Ok(response)) => {
                    let lease = Lease {
                        client: Arc::clone(self),
                        key,
                        https,
                        authority: authority.clone(),
                        connection,
                        started: now,
                    };
                    return Ok((response, lease));
                }
                Some(Err(mut error)) => match error.take_message() {
                    // The pooled connection was closed before the request went out: it goes
                    // on another one, unsent and whole.
                    Some(unsent) if pooled => request = unsent,
                    _ => {
                        let error = error.into_error();
                        return Err(
                            if pooled && closed_under(&error) && now.elapsed() < STALE_WITHIN {
                                CallError::Stale(error)
                            } else {
                                CallError::Exchange(error)
                            },
                        );
                    }
                },
                // The connection goes with the request still out on it.
                None => return Err(CallError::TimedOut),
            }
        }
    }

    fn take(
        &self,
        key: u64,
        https: bool,
        authority: &Authority,
        now: Instant,
    ) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let origin = idle.origins.get_mut(&key)?;
        // Keys are hashes: a collision of two origins is not a match. (Bytes compared:
        // `Authority`'s own equality ignores case byte by byte, and both come normalized.)
        if origin.https != https || origin.authority.as_str() != authority.as_str() {
            return None;
        }
        while let Some((connection, since)) = origin.connections.pop() {
            if !connection.sender.is_closed() && now.saturating_duration_since(since) < IDLE_TIMEOUT
            {
                return Some(connection);
            }
        }
        None
    }

    /// Puts a connection whose answer has ended back in its origin's idle list. One that cannot
    /// take the next request yet (it still sends the request's body: an answer may end before
    /// an upload has, a 413 say) is put back only once it can, by a task of its own; a pooled
    /// connection is always ready for the next call.
    /// `now`: when the call that used it began, or later.
    fn give_back(
        self: Arc<Self>,
        lease_key: u64,
        https: bool,
        authority: Authority,
        mut connection: Connection,
        now: Instant,
    ) {
        if connection.sender.is_closed() {
            return;
        }
        if !connection.sender.is_ready() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let ready = tokio::time::timeout(IDLE_TIMEOUT, connection.sender.ready()).await;
                    if let Ok(Ok(())) = ready {
                        self.give_back(lease_key, https, authority, connection, Instant::now());
                    }
                });
            }
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(idle.swept) > SWEEP_EVERY {
            idle.swept = now;
            sweep(&mut idle);
        }
        let origin = idle.origins.entry(lease_key).or_insert_with(|| Origin {
            https,
            authority: authority.clone(),
            connections: Vec::new(),
        });
        if origin.https == https
            && origin.authority.as_str() == authority.as_str()
            && origin.connections.len() < MAX_IDLE_PER_ORIGIN
        {
            origin.connections.push((connection, now));
        }
    }

    /// Closes idle connections that are too old or that the provider closed (the background
    /// loop calls this, so they go also when no call comes any more).
    pub fn sweep_idle(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.swept = Instant::now();
        sweep(&mut idle);
    }

    async fn connect(
        &self,
        https: bool,
        authority: &Authority,
        deadline: tokio::time::Instant,
    ) -> Result<Connection, CallError> {
        use tower::ServiceExt;
        let scheme = if https { "https" } else { "http" };
        let uri: Uri = format!("{scheme}://{authority}/")
            .parse()
            .map_err(|error: axum::http::uri::InvalidUri| CallError::Connect(error.into()))?;
        let io = self
            .connector
            .clone()
            .oneshot(uri)
            .await
            .map_err(CallError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Body>(io)
            .await
            .map_err(CallError::Exchange)?;
        tokio::spawn(async move {
            // A connection's end (the provider closing it, a broken body) is seen by its lease.
            let _ = connection.await;
        });
        Ok(Connection {
            sender,
            headers_due: Box::pin(tokio::time::sleep_until(deadline)),
        })
    }
}

fn sweep(idle: &mut IdleLists) {
    idle.origins.retain(|_, origin| {
        origin.connections.retain(|(connection, since)| {
            !connection.sender.is_closed() && since.elapsed() < IDLE_TIMEOUT
        });
        !origin.connections.is_empty()
    });
}

impl Lease {
    fn give_back(self) {
        let Lease {
            client,
            key,
            https,
            authority,
            connection,
            started,
        } = self;
        client.give_back(key, https, authority, connection, started);
    }
}

/// How far a streamed request body has gone: when its last chunk went, in milliseconds after
/// the call began.
#[derive(Default)]
pub struct UploadProgress {
    last_ms: std::sync::atomic::AtomicU64,
}

impl UploadProgress {
    /// When the last chunk went (`began` when none has).
    fn last(&self, began: Instant) -> Instant {
        began + Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// A streamed request body that records its progress in an [`UploadProgress`].
pub struct Uploading {
    inner: Body,
    began: Instant,
    progress: Arc<UploadProgress>,
}

impl Uploading {
    pub fn new(inner: Body, began: Instant, progress: Arc<UploadProgress>) -> Self {
        Uploading {
            inner,
            began,
            progress,
        }
    }
}

impl HttpBody for Uploading {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_)) | None) = &frame {
            let since = self.began.elapsed().as_millis() as u64;
            self.progress
                .last_ms
                .store(since, std::sync::atomic::Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Name resolution through the egress guard (see [`crate::egress`]).
#[derive(Clone, Debug, Default)]
pub struct GuardedNames(Arc<crate::egress::Policy>);

impl tower::Service<Name> for GuardedNames {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = Arc::clone(&self.0);
        Box::pin(async move {
            let found = policy.resolve(name.as_str()).await?;
            Ok(found.into_iter())
        })
    }
}

/// A provider's answer body, given up when no data comes for `idle`. The timer is only set
/// while the body waits, so a body that is already there costs none.
///
/// It also holds the connection's [`Lease`]: the connection goes back to the pool as soon as
/// the body has ended (a caller may stop polling at `is_end_stream` and drop the body), and is
/// closed with the body otherwise.
pub struct IdleTimeout {
    inner: Incoming,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
    lease: Option<Lease>,
}

impl IdleTimeout {
    pub fn new(inner: Incoming, idle: Duration, lease: Option<Lease>) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: None,
            waiting: false,
            lease,
        }
    }

    fn give_back_when_ended(&mut self) {
        if self.inner.is_end_stream()
            && let Some(lease) = self.lease.take()
        {
            lease.give_back();
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the provider sent nothing for {0} s")]
pub struct IdleTimedOut(u64);

impl HttpBody for IdleTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                match &frame {
                    Some(Ok(_)) => this.give_back_when_ended(),
                    None => {
                        if let Some(lease) = this.lease.take() {
                            lease.give_back();
                        }
                    }
                    // A broken body: the connection goes with it.
                    Some(Err(_)) => this.lease = None,
                }
                Poll::Ready(frame.map(|result| result.map_err(BoxError::from)))
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + this.idle;
                let timer = match &mut this.timer {
                    Some(timer) => {
                        if !this.waiting {
                            timer.as_mut().reset(deadline);
                        }
                        timer
                    }
                    None => this
                        .timer
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.waiting = true;
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(Box::new(IdleTimedOut(this.idle.as_secs())))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for IdleTimeout {
    fn drop(&mut self) {
        // An answer without a body (a 204, a HEAD) or one its reader stopped at the end of.
        self.give_back_when_ended();
    }
}
