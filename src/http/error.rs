//! The one error type of the platform API, and the request id every answer carries.
//!
//! Caller faults map to 4xx with a message that says what to do; internal faults map to an
//! opaque 500 whose detail is logged (with the request id) and never sent. Bodies are
//! `{"requestId": "...", "message": "...", "providerMessage": "..."?}` as the contract says.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

tokio::task_local! {
    /// As the header carries it: taken from the caller's header or made once, then shared by
    /// reference count with the answer's header (the proxy's hot path copies no id).
    pub static REQUEST_ID: HeaderValue;
}

/// The id of the request being served, or a fresh one outside a request.
pub fn current_request_id() -> String {
    let id = REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| new_request_id());
    // Only visible ASCII gets in: see `request_id_of`.
    id.to_str().unwrap_or_default().to_owned()
}

/// 24 hex digits: a random prefix drawn once per process and a counter that starts at a random
/// value, so ids are unique across replicas and restarts without drawing randomness per call.
fn new_request_id() -> HeaderValue {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    static STATE: OnceLock<([u8; 8], AtomicU64)> = OnceLock::new();
    let (prefix, counter) = STATE.get_or_init(|| {
        let bytes = crate::crypto::random_bytes::<12>();
        let start = u64::from_be_bytes(bytes[4..].try_into().expect("8 bytes"));
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(crate::crypto::hex(&bytes[..4]).as_bytes());
        (prefix, AtomicU64::new(start))
    });
    let count = counter.fetch_add(1, Ordering::Relaxed);
    // Formatted in place: the proxy's hot path makes one per call.
    let mut text = Vec::with_capacity(24);
    text.extend_from_slice(prefix);
    text.extend(
        (0..16)
            .rev()
            .map(|i| DIGITS[((count >> (i * 4)) & 0xf) as usize]),
    );
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).expect("hex digits make a header")
}

/// `X-Request-Id`, built once: a header named by a string is parsed, and allocated, per use.
pub const X_REQUEST_ID: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-request-id");

/// The id of a request: its well-formed `X-Request-Id`, or a new one.
pub fn request_id_of(headers: &axum::http::HeaderMap) -> HeaderValue {
    headers
        .get(X_REQUEST_ID)
        .filter(|value| {
            let value = value.as_bytes();
            !value.is_empty()
                && value.len() <= 64
                && value
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// A request id as text, for logs (ids are visible ASCII).
pub fn request_id_text(id: &HeaderValue) -> &str {
    id.to_str().unwrap_or_default()
}

/// Middleware: gives every request an id (kept from a well-formed incoming `X-Request-Id`),
/// makes it available to handlers and errors, and returns it in `X-Request-Id`.
pub async fn request_id_layer(request: Request, next: Next) -> Response {
    let request_id = request_id_of(request.headers());
    let span = tracing::info_span!("request", request_id = request_id_text(&request_id), method = %request.method(), path = %request.uri().path());
    // The proxy answers what the provider answered, untouched; everything else answers errors
    // as JSON, including the router's own 405.
    let proxied = crate::proxy::is_proxied(request.uri().path());
    let mut response = REQUEST_ID
        .scope(request_id.clone(), {
            use tracing::Instrument;
            next.run(request).instrument(span)
        })
        .await;
    if !proxied && response.status() == StatusCode::METHOD_NOT_ALLOWED {
        let allow = response.headers().get(axum::http::header::ALLOW).cloned();
        let message = match allow.as_ref().and_then(|value| value.to_str().ok()) {
            Some(allowed) if !allowed.is_empty() => {
                format!("This path does not take this method; it takes {allowed}")
            }
            _ => "This path does not take this method".to_string(),
        };
        response = REQUEST_ID.sync_scope(request_id.clone(), || {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, message).into_response()
        });
        if let Some(allow) = allow {
            response
                .headers_mut()
                .insert(axum::http::header::ALLOW, allow);
        }
    }
    response.headers_mut().insert(X_REQUEST_ID, request_id);
    response
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub provider_message: Option<String>,
    /// Seconds, for 429/503 answers.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    request_id: String,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider_message: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            provider_message: None,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn with_provider_message(mut self, provider_message: impl Into<String>) -> Self {
        self.provider_message = Some(provider_message.into());
        self
    }

    /// With `Retry-After: <seconds>`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// An internal fault: the detail goes to the log with the request id, the caller gets an
    /// opaque message. The detail must not contain secrets (our error types never carry them).
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(request_id = %current_request_id(), "internal error: {detail}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal error; the request id identifies it in the service's log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            request_id: current_request_id(),
            message: &self.message,
            provider_message: self.provider_message.as_deref(),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        match error {
            crate::store::StoreError::NotFound => ApiError::not_found("Not found"),
            crate::store::StoreError::Conflict(message) => ApiError::conflict(message),
            crate::store::StoreError::InvalidText(_) => {
                ApiError::bad_request("A text value holds a character that cannot be stored (NUL)")
            }
            crate::store::StoreError::Unavailable(why) => {
                tracing::debug!("the database does not answer: {why}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The service's database does not answer, or cannot write (full, read-only), just now; try again shortly",
                )
                .with_retry_after(5)
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<crate::crypto::CryptoError> for ApiError {
    fn from(error: crate::crypto::CryptoError) -> Self {
        ApiError::internal(error)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
