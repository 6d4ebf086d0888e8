//! The proxy's outbound client: hyper's pooled client, used straight.
//!
//! reqwest (which the token, revocation and webhook calls use) parses every URL again, converts
//! it, and wraps each call in layers the proxy does not need; on the proxy's hot path that cost
//! more than the proxying itself. Here the target arrives as an `http::Uri` built from the
//! instance's base parsed once, and bodies pass through as they are.
//!
//! What it keeps of the service's outbound rules: names resolved through the egress guard (no
//! link-local or metadata address), redirects never followed (the client does not follow
//! them), TLS by rustls with the platform's roots, HTTP/2 where the provider offers it,
//! `TCP_NODELAY`, a connect timeout, and an idle timeout on the answer's body: a provider that
//! stops sending for that long is given up, however long the whole body takes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub type ProxyClient = Client<hyper_rustls::HttpsConnector<HttpConnector<GuardedNames>>, Body>;

/// Builds the proxy's client.
pub fn build() -> Result<ProxyClient, String> {
    crate::app::install_crypto_provider();
    let mut http = HttpConnector::new_with_resolver(GuardedNames);
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
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector))
}

/// Name resolution through the egress guard (see [`crate::egress`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct GuardedNames;

impl tower::Service<Name> for GuardedNames {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        Box::pin(async move {
            let found = crate::egress::resolve(name.as_str()).await?;
            Ok(found.into_iter())
        })
    }
}

/// A provider's answer body, given up when no data comes for `idle`. The timer is only set
/// while the body waits, so a body that is already there costs none.
pub struct IdleTimeout {
    inner: Incoming,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl IdleTimeout {
    pub fn new(inner: Incoming, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: None,
            waiting: false,
        }
    }

    pub fn into_body(self) -> Body {
        Body::new(self)
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

/// A transport failure in words, without addresses beyond what the error itself says.
pub fn failure_message(error: &hyper_util::client::legacy::Error) -> String {
    let chain = crate::oauth::error_chain(error);
    let kind = if error.is_connect() {
        "the connection failed"
    } else {
        "the request failed"
    };
    crate::oauth::cut_text(&format!("{kind}: {chain}"), 300)
}
