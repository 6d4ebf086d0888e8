//! `{ANY} /elements/api-v2/proxy/{path}`: a call to the provider through an instance.
//!
//! The request goes to the instance's `base.url` + `/{path}` with its query, method, body and
//! end-to-end headers, and `Authorization: Bearer <access token>`; the provider's answer comes
//! back as it is (hop-by-hop headers removed). Bodies stream both ways. A request body of up to
//! [`REPLAYABLE_BODY_BYTES`] is kept so the call can be retried once after a refresh; a larger
//! upload streams straight through, and a rejection of it triggers the refresh for the next call
//! but is answered as the provider gave it; so it never goes with a token known to have
//! expired (an `on_401` connector refreshes that one first too).
//!
//! **The hot path makes no database query while the cached access token is fresh**: the caller's
//! secrets and the instance are checked against short-lived in-memory copies.
//! **No path leaves the instance's base URL**: dot segments (also between encoded slashes),
//! backslashes and absolute URLs are refused, and the joined URL is checked to keep the base's origin and path.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::uri::{Authority, PathAndQuery};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::body::Incoming;

use crate::app::{App, SharedApp, now_ms};
use crate::catalog::RefreshStrategy;
use crate::http::error::ApiError;
use crate::refresh::{CachedInstance, RefreshFailure};

mod auth;
pub mod client;
pub mod target;

pub use auth::{AuthCache, PrehashedKeys};
pub use target::{ProxyBase, confine};

pub const PROXY_PREFIX: &str = "/elements/api-v2/proxy/";
/// Whether a request path is a call through the proxy: under [`PROXY_PREFIX`], or the prefix
/// itself with or without its slash (a call to `base.url` itself: monday's whole API is
/// `POST https://api.monday.com/v2`).
pub fn is_proxied(path: &str) -> bool {
    path.starts_with(PROXY_PREFIX) || path == &PROXY_PREFIX[..PROXY_PREFIX.len() - 1]
}

/// Request bodies up to this size are kept for the retry after a refresh.
pub const REPLAYABLE_BODY_BYTES: usize = 1024 * 1024;

/// The most bytes of request bodies kept for a retry at once, all calls together; past it a
/// body goes on as a stream, sent once. A thousand 1 MB uploads held at a provider that does
/// not answer kept 2.4 GB (the growing buffer doubled each), and one tenant could take the
/// process's memory from all.
pub const KEPT_BODIES_BUDGET: usize = 256 * 1024 * 1024;

/// Bytes reserved now for bodies kept for a retry.
static KEPT_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A reservation of [`KEPT_BODIES_BUDGET`], given back when the call ends.
struct KeptCharge(usize);

impl KeptCharge {
    fn take(bytes: usize) -> Option<Self> {
        reserve(&KEPT_BYTES, KEPT_BODIES_BUDGET, bytes).then_some(KeptCharge(bytes))
    }
}

/// Adds `bytes` to `reserved` if that stays within `budget`; whether it did.
fn reserve(reserved: &std::sync::atomic::AtomicUsize, budget: usize, bytes: usize) -> bool {
    use std::sync::atomic::Ordering;
    let before = reserved.fetch_add(bytes, Ordering::AcqRel);
    if before + bytes > budget {
        reserved.fetch_sub(bytes, Ordering::AcqRel);
        return false;
    }
    true
}

impl Drop for KeptCharge {
    fn drop(&mut self) {
        KEPT_BYTES.fetch_sub(self.0, std::sync::atomic::Ordering::AcqRel);
    }
}
/// Rejection bodies are read up to this size to find the provider's words.
const REJECTION_BODY_BYTES: usize = 256 * 1024;

#[utoipa::path(
    method(get, post, put, patch, delete, head, options),
    path = "/elements/api-v2/proxy/{path}",
    operation_id = "proxy_handle",
    tag = "proxy",
    summary = "Call the provider through an instance: forwarded to base.url + /{path} with the access token injected; needs `User <user secret>, Element <instance token>`",
    description = "Any other method but CONNECT and TRACE is forwarded too. The path may hold `/`: send it as it is (`/proxy/2.0/users/me`); an escaped `%2F` reaches the provider escaped. A client generated from this document escapes `/` in a path parameter (`%2F`), which the provider takes for another path: build the proxy's URL yourself (base path, `/proxy/`, the provider's path as it is). Everything the provider answers comes back as it is (its status, headers and body), besides the proxy's own answers below.",
    params(("path" = String, Path, description = "the provider path under the instance's base.url; may hold `/`, sent unescaped (not as a generated client escapes a path parameter)")),
    security(("instance" = [])),
    responses(
        (status = 200, description = "The provider's answer, as it is"),
        (status = 400, description = "A path that would leave the instance's base URL, or a request the proxy does not forward", body = crate::openapi::ErrorBody),
        (status = 401, description = "Request failed: the grant is gone (providerMessage has the provider's words), or bad secrets", body = crate::openapi::ErrorBody),
        (status = 405, description = "CONNECT and TRACE are not proxied (`Allow`)", body = crate::openapi::ErrorBody),
        (status = 409, description = "The instance is disabled", body = crate::openapi::ErrorBody),
        (status = 502, description = "The provider could not be reached, or broke off its answer", body = crate::openapi::ErrorBody),
        (status = 503, description = "The provider's token endpoint is failing for now, or the service's database does not answer; the instance stays valid (`Retry-After`)", body = crate::openapi::ErrorBody),
        (status = 504, description = "The provider did not answer in time", body = crate::openapi::ErrorBody),
        (status = "default", description = "The provider's own answer (any status), as it is"),
    ),
)]
pub async fn handle(State(app): State<SharedApp>, request: Request) -> Response {
    measured(app, request, None).await
}

/// The proxy's hot path, called by [`crate::http::Service`] without the router: the request id
/// the router's middleware gives every other call (in `X-Request-Id` and in errors), then the
/// call. The call's state is boxed once, here: each layer around it would copy it whole.
pub fn entry(
    app: SharedApp,
    request: axum::http::Request<Incoming>,
) -> impl Future<Output = Response> + Send {
    use tracing::Instrument;
    let request_id = crate::http::error::request_id_of(request.headers());
    // At debug level only: at the default level a proxied call costs no span.
    let span = tracing::debug_span!("request", request_id = crate::http::error::request_id_text(&request_id), method = %request.method(), path = request.uri().path());
    crate::http::error::REQUEST_ID.scope(
        request_id.clone(),
        Box::pin(measured(app, request, Some(request_id))).instrument(span),
    )
}

/// The provider's `X-Request-Id`, passed on under this name (ours takes `X-Request-Id`).
const X_PROVIDER_REQUEST_ID: header::HeaderName =
    header::HeaderName::from_static("x-provider-request-id");

/// On the provider's rejection of a token, passed on as it came because the call's body was
/// too large to keep and send again: the token has been refreshed since, and the call may be
/// sent again.
const TOKEN_REFRESHED: header::HeaderName =
    header::HeaderName::from_static("x-tokenwarden-token-refreshed");

/// A call, counted and timed; `request_id` goes into the answer's `X-Request-Id` when given.
async fn measured<B>(
    app: SharedApp,
    request: axum::http::Request<B>,
    request_id: Option<HeaderValue>,
) -> Response
where
    B: http_body::Body<Data = Bytes, Error: Into<axum::BoxError>> + Send + 'static,
{
    let started = Instant::now();
    // A tunnel is not a call: a provider's 2xx to it left the caller's connection with
    // nothing, and the token went along.
    // Nor is TRACE, which a provider answers with the request it received: the access token
    // the proxy put in, to a caller who holds only the Element token.
    // In any case: methods are case-sensitive, but servers that read `trace` as TRACE exist.
    let method = request.method().as_str();
    let mut response = if method.eq_ignore_ascii_case("CONNECT")
        || method.eq_ignore_ascii_case("TRACE")
    {
        let mut refused = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} is not proxied: the proxy forwards calls to the provider's API, not tunnels or traces",
                request.method()
            ),
        )
        .into_response();
        refused.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        refused
    } else {
        match proxy(&app, request, started).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        }
    };
    // Ours, not the provider's (RFC 9110 §6.2): an HTTP/1.0 answer passed on as one closed the
    // caller's connection after it. hyper answers an HTTP/1.0 caller in 1.0 all the same.
    *response.version_mut() = axum::http::Version::HTTP_11;
    if let Some(request_id) = request_id {
        let headers = response.headers_mut();
        // The provider's own request id (Shopify's, Zendesk's: what its support asks for) is
        // kept beside ours.
        if let Some(theirs) = headers.insert(crate::http::error::X_REQUEST_ID, request_id)
            && headers.get(crate::http::error::X_REQUEST_ID) != Some(&theirs)
        {
            headers.insert(X_PROVIDER_REQUEST_ID, theirs);
        }
    }
    crate::telemetry::PROXY_REQUESTS.count(response.status().as_u16());
    crate::telemetry::PROXY_SECONDS.record(started.elapsed());
    response
}

/// A request body: kept whole (replayable) or streaming (sent once).
enum OutgoingBody {
    Kept(Bytes),
    Streaming(Body),
}

/// The request's body, kept when it is small enough and the budget of kept bodies allows
/// (with the reservation, to be held until the call ends), else as a stream.
async fn read_body<B>(
    body: B,
    seen: &Surveyed,
    stall: std::time::Duration,
) -> Result<(OutgoingBody, Option<KeptCharge>), ApiError>
where
    B: http_body::Body<Data = Bytes, Error: Into<axum::BoxError>> + Send + 'static,
{
    let declared = seen
        .content_length
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // No body: told by the body itself (HTTP/1 without a length or chunking, an HTTP/2 request
    // whose headers ended the stream), whatever the method. An HTTP/2 request carries no
    // `Transfer-Encoding` and need not carry a length: a `DELETE` with a body has neither.
    if declared == Some(0) || body.is_end_stream() {
        return Ok((OutgoingBody::Kept(Bytes::new()), None));
    }
    // Boxed only here: a call without a body (the usual GET) never is. Cut when it stops
    // coming for `stall` (the idle timeout), the part streamed on to the provider too: a
    // client that crashed mid-body held its connection for good.
    let body = Body::new(tower_http::timeout::TimeoutBody::new(stall, body));
    if declared.is_some_and(|n| n > REPLAYABLE_BODY_BYTES) {
        return Ok((OutgoingBody::Streaming(body), None));
    }
    // Room for it among the bodies kept (its length, or the most one may be), else sent once.
    let Some(charge) = KeptCharge::take(declared.unwrap_or(REPLAYABLE_BODY_BYTES)) else {
        return Ok((OutgoingBody::Streaming(body), None));
    };
    // Read up to the limit; past it, what was read and the rest go on as one stream.
    let mut stream = body.into_data_stream();
    let mut kept = bytes::BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            if crate::http::stalled(&error) {
                return crate::http::stalled_body();
            }
            ApiError::bad_request(format!("The request body could not be read: {error}"))
        })?;
        kept.extend_from_slice(&chunk);
        if kept.len() > REPLAYABLE_BODY_BYTES {
            let head =
                futures_util::stream::once(async move { Ok::<Bytes, axum::Error>(kept.freeze()) });
            return Ok((
                OutgoingBody::Streaming(Body::from_stream(head.chain(stream))),
                None,
            ));
        }
    }
    Ok((OutgoingBody::Kept(kept.freeze()), Some(charge)))
}

/// Whether a header is hop-by-hop by its name alone (RFC 9110 §7.6.1): `Connection` and the
/// fixed list. Standard names compare as small integers, so a scan of a request's headers
/// costs little.
fn hop_by_hop_name(name: &header::HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || matches!(
            name.as_str(),
            "keep-alive" | "proxy-connection" | "trailers"
        )
}

/// The headers a `Connection` header names: hop-by-hop too.
fn connection_named(headers: &HeaderMap) -> Vec<String> {
    let mut named_by_connection: Vec<String> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        if let Ok(text) = value.to_str() {
            named_by_connection
                .extend(text.split(',').map(|name| name.trim().to_ascii_lowercase()));
        }
    }
    named_by_connection
}

/// Removes, in place, the headers that are not passed on: hop-by-hop ones (those a
/// `Connection` header names too), and `also`. One scan of the names when there is nothing to
/// remove, the usual case.
fn strip(headers: &mut HeaderMap, also: &[header::HeaderName]) {
    if !headers
        .keys()
        .any(|name| hop_by_hop_name(name) || also.contains(name))
    {
        return;
    }
    // A name can be listed by `Connection` only when there is one, which is itself hop-by-hop:
    // so this is reached whenever it matters.
    let named_by_connection = connection_named(headers);
    let doomed = |name: &header::HeaderName| {
        hop_by_hop_name(name)
            || also.contains(name)
            || named_by_connection.iter().any(|n| n == name.as_str())
    };
    let names: Vec<header::HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// What the proxy needs to know of a caller's headers, found in one pass over them (a lookup
/// by name hashes the name each time).
struct Surveyed {
    /// The first `Content-Length`.
    content_length: Option<HeaderValue>,
    user_agent: bool,
    /// A hop-by-hop header (`Connection` among them) or `Expect`.
    hop_by_hop: bool,
    /// `Cookie` fields seen: an HTTP/2 caller splits its cookie into several.
    cookies: u8,
}

fn survey(headers: &HeaderMap) -> Surveyed {
    let mut seen = Surveyed {
        content_length: None,
        user_agent: false,
        hop_by_hop: false,
        cookies: 0,
    };
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            if seen.content_length.is_none() {
                seen.content_length = Some(value.clone());
            }
        } else if name == header::USER_AGENT {
            seen.user_agent = true;
        } else if name == header::COOKIE {
            seen.cookies = seen.cookies.saturating_add(1);
        } else if name == header::EXPECT || hop_by_hop_name(name) {
            seen.hop_by_hop = true;
        }
    }
    seen
}

/// Several `Cookie` fields as one, joined by `; ` (RFC 9113 §8.2.3: an HTTP/2 caller's split
/// cookie is joined before it goes on over HTTP/1.1, where many servers read only the first).
fn join_cookies(headers: &mut HeaderMap) {
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// The caller's headers as they go to the provider: without hop-by-hop ones, `Expect` (the
/// proxy answered `100-continue` to its caller already) and `Content-Length` (set from the body
/// sent). `Host` and the caller's `Authorization` are replaced (or removed) by [`send`].
fn forwarded_headers(mut headers: HeaderMap, seen: &Surveyed) -> HeaderMap {
    if seen.hop_by_hop {
        strip(&mut headers, &[header::EXPECT, header::CONTENT_LENGTH]);
    } else if seen.content_length.is_some() {
        headers.remove(header::CONTENT_LENGTH);
    }
    if seen.cookies > 1 {
        join_cookies(&mut headers);
    }
    if !seen.user_agent {
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("tokenwarden/", env!("CARGO_PKG_VERSION"))),
        );
    }
    headers
}

/// A call through the proxy, `started` when it came (one clock reading serves the call's
/// freshness checks).
async fn proxy<B>(
    app: &SharedApp,
    request: axum::http::Request<B>,
    started: Instant,
) -> Result<Response, ApiError>
where
    B: http_body::Body<Data = Bytes, Error: Into<axum::BoxError>> + Send + 'static,
{
    let (parts, body) = request.into_parts();
    let instance_id = auth::authenticate(app, &parts.headers, started).await?;
    // The wall clock, read once for the call's freshness checks.
    let now = now_ms();
    let mut instance = app
        .refresh
        .get(app, instance_id, started, now)
        .await
        .map_err(failure_for_call)?;
    usable(&instance)?;
    // Inside the nested router the base path is already stripped.
    let path = parts.uri.path();
    let raw_path = path
        .strip_prefix(PROXY_PREFIX)
        .or_else(|| path.strip_prefix("/proxy/"))
        .unwrap_or("");
    let query = parts.uri.query();
    let mut target = target_of(&instance, raw_path, query)?;
    // When the call goes out: now (the credentials and the instance may have been read from
    // the database first), or after a refresh made first (the provider's time to answer, and
    // the window in which a closed pooled connection is retried, are counted from here, not
    // eaten by a slow database or token endpoint).
    let mut sent_at = Instant::now();
    // The body first: one too large to keep for a retry is sent once only (below).
    let seen = survey(&parts.headers);
    let (body, _kept_charge) = read_body(body, &seen, app.config.header_read_timeout).await?;
    let kept = matches!(body, OutgoingBody::Kept(_));
    let bodiless = matches!(&body, OutgoingBody::Kept(bytes) if bytes.is_empty());
    // The clock again once a body came: its reading may have taken long (a slow upload), and
    // the token's freshness is judged for when the call goes out.
    let now = if bodiless { now } else { now_ms() };
    // Refresh ahead of the call when the connector asks for it.
    let strategy = instance.connector.refresh.strategy;
    // A body too large to send twice with a token past its expiry, on a connector that
    // refreshes on a rejection only: refreshed first (see below).
    let upload_ahead = strategy == RefreshStrategy::On401
        && !kept
        && instance.has_refresh_token
        && instance.expired(now);
    let wants_refresh = match strategy {
        // Without a refresh token a refresh could only end the instance: the token serves
        // until the provider rejects it (then the refresh below says why).
        _ if !instance.has_refresh_token && instance.access_token.is_some() => false,
        RefreshStrategy::EveryRequest => true,
        // While a failed refresh backs off, a token that still works serves without a retry.
        RefreshStrategy::BeforeExpiry if instance.backing_off(now) && !instance.expired(now) => {
            false
        }
        RefreshStrategy::BeforeExpiry => {
            instance.expires_soon(now) || instance.access_token.is_none()
        }
        // `on_401`: only a rejection (or no token at all) refreshes, whatever the expiry
        // says; except for a body too large to send twice, which a token past its expiry
        // would get rejected with no retry.
        RefreshStrategy::On401 => instance.access_token.is_none() || upload_ahead,
    } || instance.rejected();
    if wants_refresh {
        let refreshed = app
            .refresh
            .refresh(app, instance.id, Some(instance.token_version), None)
            .await;
        // However it went, the refresh took the caller's time, not the provider's.
        sent_at = Instant::now();
        match refreshed {
            Ok(fresh) => {
                usable(&fresh)?;
                // A refresh may move the base (`oauth.baseUrlFrom`: Salesforce's instance_url).
                target = target_of(&fresh, raw_path, query)?;
                instance = fresh;
            }
            // A token that has not expired yet still serves while the provider (or our store)
            // recovers; so does an `on_401` connector's token for an upload (its expiry is
            // not the connector's word: the provider may well take it still).
            Err(
                RefreshFailure::Transient { .. }
                | RefreshFailure::Internal(_)
                | RefreshFailure::StoreUnavailable(_)
                | RefreshFailure::Misconfigured(_),
            ) if instance.access_token.is_some() && (!instance.expired(now) || upload_ahead) => {}
            Err(failure) => return Err(failure_for_call(failure)),
        }
    }
    // Reading a body took the caller's time, not the provider's.
    if !bodiless {
        sent_at = Instant::now();
    }
    let headers = forwarded_headers(parts.headers, &seen);
    let outgoing = Outgoing {
        method: &parts.method,
        declared_length: seen.content_length.as_ref(),
    };
    let (first_body, replayable) = match body {
        OutgoingBody::Kept(bytes) => (OutgoingBody::Kept(bytes.clone()), Some(bytes)),
        streaming => (streaming, None),
    };
    // The headers are needed again only for a retry, which only a kept body allows.
    let (first_headers, retry_headers) = if replayable.is_some() {
        (headers.clone(), Some(headers))
    } else {
        (headers, None)
    };
    // The kept body sent again with `copy`'s token: after a refresh, or on a new connection
    // (`fresh`) when the pooled one closed under it.
    let again = async |copy: &CachedInstance, fresh: bool| match (&replayable, &retry_headers) {
        (Some(bytes), Some(headers)) => {
            send(
                app,
                copy,
                &outgoing,
                target_of(copy, raw_path, query).map_err(SendError::Failed)?,
                headers.clone(),
                OutgoingBody::Kept(bytes.clone()),
                Instant::now(),
                fresh,
            )
            .await
        }
        _ => Err(SendError::Failed(ApiError::internal(
            "a body that was not kept cannot be sent again",
        ))),
    };
    let first = match send(
        app,
        &instance,
        &outgoing,
        target,
        first_headers,
        first_body,
        sent_at,
        false,
    )
    .await
    {
        Ok(first) => first,
        // A pooled connection the provider closed as the request went out (its keep-alive
        // ended): an idempotent request with a kept body goes once more, on a new connection,
        // as nginx does. Any other is not sent twice.
        Err(SendError::Stale(_)) if replayable.is_some() && idempotent(outgoing.method) => {
            again(&instance, true).await?
        }
        Err(error) => return Err(error.into()),
    };
    let (first, rejection) = inspect(app, &instance, first).await?;
    let Some(rejection_message) = rejection else {
        return Ok(first);
    };
    if rejection_passes(app, &instance, started) {
        return Ok(first);
    }
    // Calls that have not gone out yet with this token join the refresh instead of
    // presenting a token the provider has just refused (a storm costs one round trip less).
    instance.mark_rejected();
    // The provider rejected the token: one refresh (shared with every concurrent caller), one retry.
    match app
        .refresh
        .refresh(app, instance.id, Some(instance.token_version), None)
        .await
    {
        Ok(fresh) if replayable.is_some() => {
            let resend = async |copy: &CachedInstance| {
                // Disabled (or ended) meanwhile: no further call to the provider.
                usable(copy)?;
                // A pooled connection closed under it goes again on a new one, as the
                // first send does.
                let answered = match again(copy, false).await {
                    Err(SendError::Stale(_)) if idempotent(outgoing.method) => {
                        again(copy, true).await?
                    }
                    answered => answered?,
                };
                inspect(app, copy, answered).await
            };
            let (second, rejected_again) = resend(&fresh).await?;
            if rejected_again.is_none() || rejection_passes(app, &fresh, started) {
                return Ok(second);
            }
            // The token came from the store (another replica's refresh, which this copy
            // had not seen), and it is no better: a refresh of this call's own, and one
            // more try with what it gets. Its failures are answered as the first
            // refresh's are: the grant gone in the API's words; a passing failure leaves
            // the API's answer as it came.
            let newer = match app
                .refresh
                .refresh(app, fresh.id, Some(fresh.token_version), None)
                .await
            {
                Ok(newer) => newer,
                Err(RefreshFailure::Invalid {
                    reason, version, ..
                }) => {
                    let words = rejected_again.unwrap_or(rejection_message);
                    return Err(grant_gone(app, fresh.id, reason, version, words).await);
                }
                Err(_) => return Ok(second),
            };
            drop(second);
            let (third, rejected) = resend(&newer).await?;
            if rejected.is_some() {
                // Only to hold its rejections for the calls that follow.
                rejection_passes(app, &newer, started);
            }
            Ok(third)
        }
        // A body that was not kept is not sent again: the refresh serves the next call, and
        // the caller is told that sending it again will go with a new token (the provider's
        // 401 alone reads as a call the grant does not allow).
        Ok(_) => {
            let mut first = first;
            first.headers_mut().insert(
                TOKEN_REFRESHED,
                axum::http::HeaderValue::from_static("true"),
            );
            Ok(first)
        }
        Err(RefreshFailure::Invalid {
            reason, version, ..
        }) => Err(grant_gone(app, instance.id, reason, version, rejection_message).await),
        Err(failure) => Err(failure_for_call(failure)),
    }
}

/// The articles' answer when a refresh after the API's rejection finds the grant gone: the
/// API's rejection, in the provider's words, also kept on the instance for the calls that
/// follow (written to its end even when the caller hangs up meanwhile).
async fn grant_gone(
    app: &SharedApp,
    id: i64,
    reason: String,
    version: Option<i64>,
    words: String,
) -> ApiError {
    let (owned, kept) = (std::sync::Arc::clone(app), words.clone());
    let _ = crate::refresh::spawn_to_the_end(app, async move {
        // Written at the version the refresh found invalid, and not while another process
        // holds the instance (a revocation at the provider, whose hold must last until it
        // ends, and whose words stand).
        if let Some(version) = version {
            let _ = owned
                .store
                .mark_invalid_unleased(id, &owned.replica_id, &reason, Some(&kept), None, version)
                .await;
        }
        owned.refresh.forget(id);
    })
    .await;
    ApiError::new(StatusCode::UNAUTHORIZED, "Request failed").with_provider_message(words)
}

/// Whether this copy's token was got from the provider by this process since `started`.
/// Whether a rejection of `copy`'s token passes through as the API gave it, without a refresh:
/// the API refuses the user, not the token's age. So it is for a token a refresh gave during
/// this call (its rejections then pass through for a while: `FRESH_REJECTION_HOLDS`), and for
/// one whose rejections pass through already.
fn rejection_passes(app: &App, copy: &CachedInstance, started: Instant) -> bool {
    if fetched_since(copy, started) {
        app.refresh
            .fresh_token_rejected(copy.id, copy.token_version);
        return true;
    }
    app.refresh
        .holds_rejections(copy.id, copy.token_version, Instant::now())
}

fn fetched_since(instance: &CachedInstance, started: Instant) -> bool {
    instance.fetched_at.get().is_some_and(|at| *at >= started)
}

fn usable(instance: &CachedInstance) -> Result<(), ApiError> {
    if instance.disabled {
        return Err(RefreshFailure::Disabled.into_api_error());
    }
    if !instance.valid {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "Request failed")
            .with_provider_message(
                instance
                    .provider_message
                    .clone()
                    .or_else(|| instance.state_reason.clone())
                    .unwrap_or_else(|| "The instance needs re-authentication".into()),
            ));
    }
    Ok(())
}

fn failure_for_call(failure: RefreshFailure) -> ApiError {
    match failure {
        RefreshFailure::NotFound => ApiError::unauthorized("The Element token is not valid"),
        other => other.into_api_error(),
    }
}

/// Where a call goes with this copy of the instance.
struct Target {
    /// The path and query under the instance's base, as the request line carries them.
    path: PathAndQuery,
    https: bool,
    authority: Authority,
    host: HeaderValue,
    /// The origin's key in the client's pool.
    origin_key: u64,
}

fn target_of(
    instance: &CachedInstance,
    raw_path: &str,
    query: Option<&str>,
) -> Result<Target, ApiError> {
    match &instance.proxy_base {
        Ok(base) => Ok(Target {
            path: base.join_path(raw_path, query)?,
            https: base.is_https(),
            authority: base.authority().clone(),
            host: base.host().clone(),
            origin_key: base.origin_key(),
        }),
        Err(why) => Err(ApiError::conflict(why.clone())),
    }
}

/// The provider's answer, and the connection it came on.
type Answered = (axum::http::Response<hyper::body::Incoming>, client::Lease);

/// What stays the same between a call and its retry.
struct Outgoing<'a> {
    method: &'a Method,
    /// The caller's `Content-Length`, passed on with a streamed body.
    declared_length: Option<&'a HeaderValue>,
}

/// Why [`send`] got no answer.
enum SendError {
    Failed(ApiError),
    /// On a pooled connection the provider closed with the request on it (see
    /// [`client::CallError::Stale`]).
    Stale(ApiError),
}

impl From<SendError> for ApiError {
    fn from(error: SendError) -> Self {
        match error {
            SendError::Failed(error) | SendError::Stale(error) => error,
        }
    }
}

/// Methods that may be sent twice with the same effect (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

/// Sends the call (`fresh`: on a new connection) and waits for the answer's headers.
#[allow(clippy::too_many_arguments)]
async fn send(
    app: &App,
    instance: &CachedInstance,
    outgoing: &Outgoing<'_>,
    target: Target,
    mut headers: HeaderMap,
    body: OutgoingBody,
    now: Instant,
    fresh: bool,
) -> Result<Answered, SendError> {
    match (&instance.bearer, &instance.access_token) {
        (Some((name, value)), _) => {
            // The caller's `Authorization` (its secrets) does not go on beside a token carried
            // in another header.
            if name != header::AUTHORIZATION {
                headers.remove(header::AUTHORIZATION);
            }
            headers.insert(name.clone(), value.clone());
        }
        (None, Some(_)) => {
            return Err(SendError::Failed(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "The provider's access token holds characters no HTTP header can carry",
            )));
        }
        // No token at all: the caller's `Authorization` (its secrets) must not go on either.
        (None, None) => {
            headers.remove(header::AUTHORIZATION);
        }
    }
    // Replaces the caller's.
    headers.insert(header::HOST, target.host);
    // A connector whose rejections are told by their body (Slack's 200 `ok:false`, body
    // markers) gets its answers plain: a gzip body (what Python's requests and browsers ask
    // for) could not be read for them, and a dead token would go unnoticed.
    let rejection = &instance.connector.rejection;
    if !rejection.body_markers.is_empty() || !rejection.ok_false_errors.is_empty() {
        headers.remove(header::ACCEPT_ENCODING);
    }
    let mut upload = None;
    let body = match body {
        OutgoingBody::Kept(bytes) => {
            if bytes.is_empty() && outgoing.declared_length.is_none() {
                // A method that carries content says it carries none (RFC 9110 §8.6: some
                // providers answer 411 otherwise); hyper writes no length for an empty body.
                if matches!(*outgoing.method, Method::POST | Method::PUT | Method::PATCH) {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
                }
                Body::empty()
            } else {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                Body::from(bytes)
            }
        }
        OutgoingBody::Streaming(body) => {
            if let Some(length) = outgoing.declared_length {
                headers.insert(header::CONTENT_LENGTH, length.clone());
            }
            let progress = std::sync::Arc::new(client::UploadProgress::default());
            upload = Some(std::sync::Arc::clone(&progress));
            Body::new(client::Uploading::new(body, now, progress))
        }
    };
    let mut request = axum::http::Request::new(body);
    *request.method_mut() = outgoing.method.clone();
    *request.uri_mut() = Uri::from(target.path);
    *request.headers_mut() = headers;
    // The answer's headers must come within the proxy timeout; its body then streams for as
    // long as it keeps coming.
    let timeout = instance.connector.proxy.timeout(app.config.proxy_timeout);
    app.proxy_http
        .request(
            target.origin_key,
            target.https,
            &target.authority,
            request,
            now,
            tokio::time::Instant::from_std(now) + timeout,
            fresh,
            upload,
        )
        .await
        .map_err(|error| match error {
            client::CallError::TimedOut => SendError::Failed(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("The provider did not answer within {} s", timeout.as_secs()),
            )),
            // The caller's upload stopped coming, not the provider.
            client::CallError::Exchange(error) if crate::http::stalled(&error) => {
                SendError::Failed(crate::http::stalled_body())
            }
            error => {
                let stale = matches!(error, client::CallError::Stale(_));
                // An answer came but could not be read (a malformed head, more than 100
                // header lines): the request reached the provider, which may have acted on it.
                let unreadable = matches!(&error, client::CallError::Exchange(e) if e.is_parse());
                // Cut during the exchange: the request went out, whole or in part, and may
                // have been acted on (a caller must not take it for one never sent).
                let what = if unreadable {
                    "The provider's answer could not be read (the request reached it)"
                } else if matches!(error, client::CallError::Connect(_)) {
                    "The provider could not be reached"
                } else {
                    "The connection to the provider broke during the request (it may have reached the provider)"
                };
                let error = ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("{what}: {}", error.message()),
                );
                if stale {
                    SendError::Stale(error)
                } else {
                    SendError::Failed(error)
                }
            }
        })
}

/// The provider's answer as ours: hop-by-hop headers removed, the body streamed through.
fn answer(timeout: std::time::Duration, (response, lease): Answered) -> Response {
    let (mut parts, body) = response.into_parts();
    // A length beside a transfer coding is not the body's (RFC 9112 §6.3: a proxy removes it):
    // passed on, the answer was cut at it, or broken off when it was longer.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    strip(&mut parts.headers, &[]);
    let body = client::IdleTimeout::new(body, timeout, Some(lease));
    Response::from_parts(parts, Body::new(body))
}

/// Turns the provider's answer into ours, reading the body only when it may be a rejection.
async fn inspect(
    app: &App,
    instance: &CachedInstance,
    answered: Answered,
) -> Result<(Response, Option<String>), ApiError> {
    let response = &answered.0;
    let status = response.status();
    // A switch of protocols (a WebSocket) cannot pass: its `Upgrade` and `Connection` headers
    // are hop-by-hop and the connection is not handed over, so the caller got a bare 101 and
    // a closed connection.
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "The provider answered 101 Switching Protocols: protocol upgrades (WebSocket) are not proxied",
        ));
    }
    let rejection = &instance.connector.rejection;
    let maybe_rejected = rejection.statuses.contains(&status.as_u16())
        || (!status.is_success() && !rejection.body_markers.is_empty())
        || (status.is_success() && !rejection.ok_false_errors.is_empty() && {
            response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("json"))
        });
    let response = answer(
        instance.connector.proxy.timeout(app.config.proxy_timeout),
        answered,
    );
    if !maybe_rejected {
        return Ok((response, None));
    }
    let www = response
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (parts, body) = response.into_parts();
    // The head of the body is read to find the provider's words; the answer given back is the
    // whole body, head and rest, whatever its size (the length header stays true).
    let mut stream = body.into_data_stream();
    let head = read_limited(&mut stream, REJECTION_BODY_BYTES).await?;
    // An API that echoes the token it rejects must not get it into `providerMessage`.
    let token = instance
        .access_token
        .as_ref()
        .map(|t| t.expose())
        .unwrap_or("");
    // An encoded body (the provider compressed it anyway) cannot be read here: the status and
    // `WWW-Authenticate` decide alone, and say why (no garbled bytes in `providerMessage`).
    let encoded = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
    let readable: &[u8] = if encoded { &[] } else { &head };
    let message = crate::oauth::api_rejection(rejection, status.as_u16(), www.as_deref(), readable)
        .map(|text| crate::oauth::redact(&text, &[token]));
    let whole =
        futures_util::stream::once(async move { Ok::<Bytes, axum::Error>(head) }).chain(stream);
    Ok((
        Response::from_parts(parts, Body::from_stream(whole)),
        message,
    ))
}

/// Reads at least `limit` bytes (or all) of a body; the rest stays in the stream.
async fn read_limited(
    stream: &mut (impl futures_util::Stream<Item = Result<Bytes, axum::Error>> + Unpin),
    limit: usize,
) -> Result<Bytes, ApiError> {
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("The provider's answer broke off: {error}"),
            )
        })?;
        out.extend_from_slice(&chunk);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_bodies_stay_within_their_budget() {
        let reserved = std::sync::atomic::AtomicUsize::new(0);
        assert!(reserve(&reserved, 10, 6));
        assert!(!reserve(&reserved, 10, 5), "11 of 10");
        assert_eq!(reserved.load(std::sync::atomic::Ordering::Acquire), 6);
        assert!(reserve(&reserved, 10, 4));
        reserved.fetch_sub(6, std::sync::atomic::Ordering::AcqRel);
        assert!(reserve(&reserved, 10, 5));
    }
}
