//! `{ANY} /elements/api-v2/proxy/{path}`: a call to the provider through an instance.
//!
//! The request goes to the instance's `base.url` + `/{path}` with its query, method, body and
//! end-to-end headers, and `Authorization: Bearer <access token>`; the provider's answer comes
//! back as it is (hop-by-hop headers removed). Bodies stream both ways. A request body of up to
//! [`REPLAYABLE_BODY_BYTES`] is kept so the call can be retried once after a refresh; a larger
//! upload streams straight through, and a rejection of it triggers the refresh for the next call
//! but is answered as the provider gave it.
//!
//! **The hot path makes no database query while the cached access token is fresh**: the caller's
//! secrets and the instance are checked against short-lived in-memory copies.
//! **No path leaves the instance's base URL**: dot segments, encoded slashes, backslashes and
//! absolute URLs are refused, and the joined URL is checked to keep the base's origin and path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;

use crate::app::{App, SharedApp, now_ms};
use crate::catalog::RefreshStrategy;
use crate::crypto::hash_secret;
use crate::http::auth::parse_authorization;
use crate::http::error::ApiError;
use crate::refresh::{CachedInstance, RefreshFailure};

pub const PROXY_PREFIX: &str = "/elements/api-v2/proxy/";
/// Request bodies up to this size are kept for the retry after a refresh.
pub const REPLAYABLE_BODY_BYTES: usize = 1024 * 1024;
/// Rejection bodies are read up to this size to find the provider's words.
const REJECTION_BODY_BYTES: usize = 256 * 1024;
/// How long a checked secret is trusted before it is checked against the store again.
const AUTH_TTL: Duration = Duration::from_secs(5);

/// Short-lived memory of checked proxy credentials, keyed by the secrets' hashes. A checked
/// secret older than [`AUTH_TTL`] is still accepted while it is checked again in the
/// background (once at a time), so a warm call makes no query; a revoked secret or deleted
/// instance is refused from the call after that check.
#[derive(Default)]
pub struct AuthCache {
    users: DashMap<Vec<u8>, (i64, Instant)>,
    organizations: DashMap<Vec<u8>, (i64, Instant)>,
    elements: DashMap<Vec<u8>, (i64, i64, Instant)>,
    rechecking: DashMap<Vec<u8>, ()>,
    /// Credential lookups a caller waited for.
    awaited_lookups: std::sync::atomic::AtomicU64,
}

impl AuthCache {
    pub fn forget_all(&self) {
        self.users.clear();
        self.elements.clear();
    }

    /// Drops credentials not checked for `idle` (a used entry is re-checked every few seconds,
    /// so only unused ones age out): memory follows the callers, not the tables.
    pub fn evict_idle(&self, idle: Duration) {
        self.users
            .retain(|_, (_, checked)| checked.elapsed() < idle);
        self.organizations
            .retain(|_, (_, checked)| checked.elapsed() < idle);
        self.elements
            .retain(|_, (_, _, checked)| checked.elapsed() < idle);
    }

    pub fn awaited_lookups(&self) -> u64 {
        self.awaited_lookups
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_lookup(&self) {
        self.awaited_lookups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Checks a user secret and an Element token again in the background.
fn recheck_in_background(app: &SharedApp, user_hash: Vec<u8>, element_hash: Vec<u8>) {
    let key = [user_hash.as_slice(), element_hash.as_slice()].concat();
    if app.auth_cache.rechecking.insert(key.clone(), ()).is_some() {
        return;
    }
    let app = Arc::clone(app);
    tokio::spawn(async move {
        let cache = &app.auth_cache;
        match app.store.find_user_by_secret_hash(&user_hash).await {
            Ok(Some(user)) => {
                cache
                    .users
                    .insert(user_hash, (user.organization_id, Instant::now()));
            }
            Ok(None) => {
                cache.users.remove(&user_hash);
            }
            Err(error) => tracing::warn!("re-checking a user secret: {error}"),
        }
        match app.store.find_instance_by_token_hash(&element_hash).await {
            Ok(Some(row)) => {
                cache
                    .elements
                    .insert(element_hash, (row.id, row.organization_id, Instant::now()));
            }
            Ok(None) => {
                cache.elements.remove(&element_hash);
            }
            Err(error) => tracing::warn!("re-checking an Element token: {error}"),
        }
        cache.rechecking.remove(&key);
    });
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
];

#[utoipa::path(
    method(get, post, put, patch, delete),
    path = "/elements/api-v2/proxy/{path}",
    operation_id = "proxy_handle",
    tag = "proxy",
    summary = "Call the provider through an instance: forwarded to base.url + /{path} with the access token injected; needs `User <user secret>, Element <instance token>`",
    params(("path" = String, Path, description = "the provider path under the instance's base.url")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The provider's answer, as it is"),
        (status = 400, description = "A path that would leave the instance's base URL", body = crate::openapi::ErrorBody),
        (status = 401, description = "Request failed: the grant is gone (providerMessage has the provider's words), or bad secrets", body = crate::openapi::ErrorBody),
        (status = 503, description = "The provider's token endpoint is failing for now; the instance stays valid", body = crate::openapi::ErrorBody),
    ),
)]
pub async fn handle(State(app): State<SharedApp>, request: Request) -> Response {
    let started = Instant::now();
    let response = match proxy(&app, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    let class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("tokenwarden_proxy_requests_total", "status" => class).increment(1);
    metrics::histogram!("tokenwarden_proxy_seconds").record(started.elapsed().as_secs_f64());
    response
}

/// Who is calling: `User <secret>, Element <token>`; answers the instance id.
async fn authenticate(app: &SharedApp, headers: &HeaderMap) -> Result<i64, ApiError> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| {
            ApiError::unauthorized(
                "Calls through an instance need `Authorization: User <user secret>, Element <instance token>`",
            )
        })?;
    let credentials = parse_authorization(header)
        .map_err(|error| ApiError::unauthorized(format!("Bad Authorization header: {error}")))?;
    let (Some(user), Some(element)) = (credentials.user, credentials.element) else {
        return Err(ApiError::unauthorized(
            "Calls through an instance need `Authorization: User <user secret>, Element <instance token>`",
        ));
    };
    let user_hash = hash_secret(user.expose());
    let element_hash = hash_secret(element.expose());
    let cache = &app.auth_cache;
    // The `Organization` part is optional here, but a wrong one is refused, not ignored.
    let organization_check = match credentials.organization {
        Some(secret) => Some(organization_of(app, &hash_secret(secret.expose())).await?),
        None => None,
    };
    let cached_user = cache.users.get(&user_hash).map(|entry| *entry);
    let cached_element = cache.elements.get(&element_hash).map(|entry| *entry);
    if let (Some((organization_id, user_checked)), Some((id, instance_organization, checked))) =
        (cached_user, cached_element)
    {
        if user_checked.elapsed() >= AUTH_TTL || checked.elapsed() >= AUTH_TTL {
            recheck_in_background(app, user_hash, element_hash);
        }
        if instance_organization != organization_id {
            return Err(ApiError::unauthorized("The Element token is not valid"));
        }
        if organization_check.is_some_and(|org| org != organization_id) {
            return Err(ApiError::unauthorized(
                "The organization secret is not valid for this user",
            ));
        }
        return Ok(id);
    }
    cache.count_lookup();
    let organization_id = match cached_user {
        Some((organization_id, checked)) if checked.elapsed() < AUTH_TTL => organization_id,
        _ => {
            let user = app
                .store
                .find_user_by_secret_hash(&user_hash)
                .await?
                .ok_or_else(|| ApiError::unauthorized("The user secret is not valid"))?;
            cache
                .users
                .insert(user_hash, (user.organization_id, Instant::now()));
            user.organization_id
        }
    };
    let (instance_id, instance_organization) = match cached_element {
        Some((id, organization, checked)) if checked.elapsed() < AUTH_TTL => (id, organization),
        _ => {
            let row = app
                .store
                .find_instance_by_token_hash(&element_hash)
                .await?
                .ok_or_else(|| ApiError::unauthorized("The Element token is not valid"))?;
            cache
                .elements
                .insert(element_hash, (row.id, row.organization_id, Instant::now()));
            (row.id, row.organization_id)
        }
    };
    if instance_organization != organization_id {
        return Err(ApiError::unauthorized("The Element token is not valid"));
    }
    if organization_check.is_some_and(|org| org != organization_id) {
        return Err(ApiError::unauthorized(
            "The organization secret is not valid for this user",
        ));
    }
    Ok(instance_id)
}

/// The organization of an organization secret (by its hash), from memory while trusted.
async fn organization_of(app: &SharedApp, hash: &[u8]) -> Result<i64, ApiError> {
    if let Some((id, checked)) = app.auth_cache.organizations.get(hash).map(|e| *e)
        && checked.elapsed() < AUTH_TTL
    {
        return Ok(id);
    }
    let organization = app
        .store
        .find_organization_by_secret_hash(hash)
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized("The organization secret is not valid for this user")
        })?;
    app.auth_cache
        .organizations
        .insert(hash.to_vec(), (organization.id, Instant::now()));
    Ok(organization.id)
}

/// The part of the request path after the proxy prefix, checked to stay under the base URL.
pub fn confine(base_url: &str, raw_path: &str, query: Option<&str>) -> Result<url::Url, ApiError> {
    let refuse =
        |why: &str| ApiError::bad_request(format!("The proxy path is not accepted: {why}"));
    // A request path never holds `?` or `#` (the query comes separately); in a joined URL they
    // would end the path inside a segment checked below as a whole (`..#x` is `..` to the URL
    // parser).
    if raw_path.contains(['?', '#']) {
        return Err(refuse("`?` and `#` are not accepted in the path"));
    }
    if raw_path.contains("//") || raw_path.starts_with('/') {
        return Err(refuse(
            "absolute URLs and empty path segments are not accepted",
        ));
    }
    for segment in raw_path.split('/') {
        let decoded = percent_decode(segment).ok_or_else(|| refuse("bad percent-encoding"))?;
        // `..;x` is `..` to servers that take `;` as path parameters (Tomcat, Spring).
        let before_parameters = decoded.split(';').next().unwrap_or("");
        if matches!(before_parameters, "." | "..") {
            return Err(refuse("`.` and `..` segments are not accepted"));
        }
        if decoded.contains('/') || decoded.contains('\\') {
            return Err(refuse("encoded slashes and backslashes are not accepted"));
        }
        if decoded.chars().any(char::is_control) {
            return Err(refuse("control characters are not accepted"));
        }
    }
    let base = url::Url::parse(base_url)
        .map_err(|_| ApiError::conflict("The instance's `base.url` is not a valid URL"))?;
    // Joined to the parsed base, not the raw string: what the check below compares with is the
    // parsed base, and the two differ when the string has characters the parser strips (leading
    // or trailing spaces and control characters), which would land the path beside the base.
    // One trailing slash is dropped, not all: `/api//` stays `/api//`, not its parent `/api/`.
    let base_text = base.as_str();
    let mut joined = format!(
        "{}/{}",
        base_text.strip_suffix('/').unwrap_or(base_text),
        raw_path
    );
    if let Some(query) = query {
        joined.push('?');
        joined.push_str(query);
    }
    let target = url::Url::parse(&joined).map_err(|_| refuse("it does not make a valid URL"))?;
    let base_path = base.path().strip_suffix('/').unwrap_or(base.path());
    if target.scheme() != base.scheme()
        || target.host_str() != base.host_str()
        || target.port_or_known_default() != base.port_or_known_default()
        || !target.path().starts_with(base_path)
    {
        return Err(refuse("it leaves the instance's base URL"));
    }
    crate::egress::check_url(&target).map_err(|why| refuse(&why))?;
    Ok(target)
}

fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = segment.get(index + 1..index + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// A request body: kept whole (replayable) or streaming (sent once).
enum OutgoingBody {
    Kept(Bytes),
    Streaming(reqwest::Body),
}

async fn read_body(
    body: Body,
    method: &Method,
    headers: &HeaderMap,
) -> Result<OutgoingBody, ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared == Some(0)
        || (declared.is_none()
            && !headers.contains_key("transfer-encoding")
            && matches!(
                *method,
                Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
            ))
    {
        return Ok(OutgoingBody::Kept(Bytes::new()));
    }
    if declared.is_some_and(|n| n > REPLAYABLE_BODY_BYTES) {
        let stream = body.into_data_stream();
        return Ok(OutgoingBody::Streaming(reqwest::Body::wrap_stream(stream)));
    }
    // Read up to the limit; past it, what was read and the rest go on as one stream.
    let mut stream = body.into_data_stream();
    let mut kept = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::bad_request(format!("The request body could not be read: {error}"))
        })?;
        kept.extend_from_slice(&chunk);
        if kept.len() > REPLAYABLE_BODY_BYTES {
            let head =
                futures_util::stream::once(async move { Ok::<Bytes, axum::Error>(kept.freeze()) });
            return Ok(OutgoingBody::Streaming(reqwest::Body::wrap_stream(
                head.chain(stream),
            )));
        }
    }
    Ok(OutgoingBody::Kept(kept.freeze()))
}

/// The headers a `Connection` header names: hop-by-hop too (RFC 9110 §7.6.1).
fn connection_named(headers: &HeaderMap) -> Vec<String> {
    let mut named_by_connection: Vec<String> = Vec::new();
    for value in headers.get_all(axum::http::header::CONNECTION) {
        if let Ok(text) = value.to_str() {
            named_by_connection
                .extend(text.split(',').map(|name| name.trim().to_ascii_lowercase()));
        }
    }
    named_by_connection
}

fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let named_by_connection = connection_named(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let lower = name.as_str();
        if HOP_BY_HOP.contains(&lower)
            || lower == "host"
            // The proxy answered `100-continue` to its caller already; the client does not do it.
            || lower == "expect"
            || lower == "authorization"
            || lower == "content-length"
            || named_by_connection.iter().any(|n| n == lower)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

async fn proxy(app: &SharedApp, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let instance_id = authenticate(app, &parts.headers).await?;
    let mut instance = app
        .refresh
        .get(app, instance_id)
        .await
        .map_err(failure_for_call)?;
    usable(&instance)?;
    // Inside the nested router the base path is already stripped.
    let path = parts.uri.path();
    let raw_path = path
        .strip_prefix(PROXY_PREFIX)
        .or_else(|| path.strip_prefix("/proxy/"))
        .unwrap_or("");
    let target = confine(&instance.base_url, raw_path, parts.uri.query())?;
    // Refresh ahead of the call when the connector asks for it.
    let strategy = instance.connector.refresh.strategy;
    let now = now_ms();
    let wants_refresh = match strategy {
        RefreshStrategy::EveryRequest => true,
        // While a failed refresh backs off, a token that still works serves without a retry.
        RefreshStrategy::BeforeExpiry if instance.backing_off(now) && !instance.expired(now) => {
            false
        }
        RefreshStrategy::BeforeExpiry => {
            instance.expires_soon(now) || instance.access_token.is_none()
        }
        // `on_401`: only a rejection (or no token at all) refreshes, whatever the expiry says.
        RefreshStrategy::On401 => instance.access_token.is_none(),
    } || instance.rejected();
    if wants_refresh {
        match app
            .refresh
            .refresh(app, instance.id, Some(instance.token_version), None)
            .await
        {
            Ok(fresh) => {
                usable(&fresh)?;
                instance = fresh;
            }
            // A token that has not expired yet still serves while the provider (or our store)
            // recovers.
            Err(RefreshFailure::Transient { .. } | RefreshFailure::Internal(_))
                if instance.access_token.is_some() && !instance.expired(now) => {}
            Err(failure) => return Err(failure_for_call(failure)),
        }
    }
    let headers = forwarded_headers(&parts.headers);
    let body = read_body(body, &parts.method, &parts.headers).await?;
    let replayable = match &body {
        OutgoingBody::Kept(bytes) => Some(bytes.clone()),
        OutgoingBody::Streaming(_) => None,
    };
    let first = send(
        app,
        &instance,
        &parts.method,
        &target,
        &headers,
        body,
        &parts.headers,
    )
    .await?;
    let (first, rejection) = inspect(&instance, first).await?;
    let Some(rejection_message) = rejection else {
        return Ok(first);
    };
    // Calls that have not gone out yet with this token join the refresh instead of
    // presenting a token the provider has just refused (a storm costs one round trip less).
    instance.mark_rejected();
    // The provider rejected the token: one refresh (shared with every concurrent caller), one retry.
    match app
        .refresh
        .refresh(app, instance.id, Some(instance.token_version), None)
        .await
    {
        Ok(fresh) => match replayable {
            Some(bytes) => {
                let second = send(
                    app,
                    &fresh,
                    &parts.method,
                    &target,
                    &headers,
                    OutgoingBody::Kept(bytes),
                    &parts.headers,
                )
                .await?;
                stream_response(second)
            }
            None => Ok(first),
        },
        Err(RefreshFailure::Invalid {
            reason, version, ..
        }) => {
            // The articles' answer: the API's rejection, in the provider's words, also kept on the
            // instance for the calls that follow.
            let _ = app
                .store
                .mark_invalid(
                    instance.id,
                    &reason,
                    Some(&rejection_message),
                    None,
                    version,
                )
                .await;
            app.refresh.forget(instance.id);
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "Request failed")
                .with_provider_message(rejection_message))
        }
        Err(failure) => Err(failure_for_call(failure)),
    }
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

async fn send(
    app: &App,
    instance: &Arc<CachedInstance>,
    method: &Method,
    target: &url::Url,
    headers: &HeaderMap,
    body: OutgoingBody,
    original: &HeaderMap,
) -> Result<reqwest::Response, ApiError> {
    let mut builder = app
        .proxy_http
        .request(method.clone(), target.clone())
        .headers(headers.clone());
    if let Some(token) = &instance.access_token {
        builder = builder.bearer_auth(token.expose());
    }
    builder = match body {
        OutgoingBody::Kept(bytes) => {
            if bytes.is_empty() && !original.contains_key(axum::http::header::CONTENT_LENGTH) {
                builder
            } else {
                builder.body(bytes)
            }
        }
        OutgoingBody::Streaming(stream) => {
            if let Some(length) = original.get(axum::http::header::CONTENT_LENGTH) {
                builder = builder.header(axum::http::header::CONTENT_LENGTH, length.clone());
            }
            builder.body(stream)
        }
    };
    // The answer's headers must come within the provider timeout; its body then streams for
    // as long as it keeps coming.
    let answered = tokio::time::timeout(app.config.provider_timeout, builder.send()).await;
    let Ok(answered) = answered else {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "The provider did not answer within {} s",
                app.config.provider_timeout.as_secs()
            ),
        ));
    };
    answered.map_err(|error| {
        let mut api = ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "The provider could not be reached: {}",
                crate::oauth::transport_message(&error)
            ),
        );
        if error.is_timeout() {
            api.status = StatusCode::GATEWAY_TIMEOUT;
        }
        api
    })
}

/// Turns the provider's answer into ours, reading the body only when it may be a rejection.
async fn inspect(
    instance: &CachedInstance,
    response: reqwest::Response,
) -> Result<(Response, Option<String>), ApiError> {
    let status = response.status();
    let rejection = &instance.connector.rejection;
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let maybe_rejected = rejection.statuses.contains(&status.as_u16())
        || (!status.is_success() && !rejection.body_markers.is_empty())
        || (status.is_success() && is_json && !rejection.ok_false_errors.is_empty());
    if !maybe_rejected {
        return Ok((stream_response(response)?, None));
    }
    let mut builder = Response::builder().status(status.as_u16());
    let response_headers = end_to_end(response.headers());
    let www = response
        .headers()
        .get(axum::http::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // The head of the body is read to find the provider's words; the answer given back is the
    // whole body, head and rest, whatever its size (the length header stays true).
    let mut stream = response.bytes_stream();
    let head = read_limited(&mut stream, REJECTION_BODY_BYTES).await?;
    // An API that echoes the token it rejects must not get it into `providerMessage`.
    let token = instance
        .access_token
        .as_ref()
        .map(|t| t.expose())
        .unwrap_or("");
    let message = crate::oauth::api_rejection(rejection, status.as_u16(), www.as_deref(), &head)
        .map(|text| crate::oauth::redact(&text, &[token]));
    if let Some(headers) = builder.headers_mut() {
        *headers = response_headers;
    }
    let whole =
        futures_util::stream::once(async move { Ok::<Bytes, reqwest::Error>(head) }).chain(stream);
    Ok((
        builder
            .body(Body::from_stream(whole))
            .map_err(ApiError::internal)?,
        message,
    ))
}

fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named_by_connection = connection_named(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(&name.as_str())
            && !named_by_connection.iter().any(|n| n == name.as_str())
        {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The provider's answer as ours, its body streamed through.
fn stream_response(response: reqwest::Response) -> Result<Response, ApiError> {
    let mut builder = Response::builder().status(response.status().as_u16());
    if let Some(headers) = builder.headers_mut() {
        *headers = end_to_end(response.headers());
    }
    builder
        .body(Body::from_stream(response.bytes_stream()))
        .map_err(ApiError::internal)
}

/// Reads at least `limit` bytes (or all) of a body; the rest stays in the stream.
async fn read_limited(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin),
    limit: usize,
) -> Result<Bytes, ApiError> {
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "The provider's answer broke off: {}",
                    crate::oauth::transport_message(&error)
                ),
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
    use super::confine;

    const BASE: &str = "http://127.0.0.1:4000/adobe-sign/";

    #[test]
    fn paths_stay_under_the_base() {
        assert_eq!(
            confine(BASE, "api/rest/v6/users/me", Some("a=1"))
                .unwrap()
                .as_str(),
            "http://127.0.0.1:4000/adobe-sign/api/rest/v6/users/me?a=1"
        );
        assert_eq!(
            confine("http://h/base", "x", None).unwrap().as_str(),
            "http://h/base/x"
        );
        for bad in [
            "../secret",
            "api/../../x",
            "%2e%2e/x",
            "%2E%2E/x",
            "api%2f..%2f..%2fx",
            "a%5cb",
            "http://evil.test/x",
            "/evil",
            "a/./b",
            "%00",
            "%zz",
            "..;/x",
            "a/..;jsessionid=1/b",
        ] {
            assert!(confine(BASE, bad, None).is_err(), "{bad} must be refused");
        }
    }
}
