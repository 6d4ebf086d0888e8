//! The platform API (`/elements/api-v2/…`) and the operations endpoints, as one axum router.
//! One file per resource; every handler goes through [`caller::Caller`] for authentication and
//! answers errors as [`error::ApiError`].

pub mod auth;
pub mod caller;
pub mod dashboard;
pub mod elements;
pub mod error;
pub mod events;
pub mod instances;
pub mod json;
pub mod ops;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::{any, get, post, put};

use crate::app::SharedApp;

pub const BASE_PATH: &str = "/elements/api-v2";

pub fn router(app: SharedApp) -> Router {
    let max_body = app.config.max_body_bytes;
    let platform = Router::new()
        .route("/elements", get(elements::list).post(elements::create))
        .route(
            "/elements/{key}",
            get(elements::get_one).delete(elements::delete),
        )
        .route("/elements/{key}/oauth/url", get(elements::oauth_url))
        .route(
            "/elements/{key}/instances",
            post(instances::create_for_element),
        )
        .route(
            "/instances",
            get(instances::list)
                .post(instances::create)
                .patch(instances::patch_by_token)
                .put(instances::put_by_token)
                .delete(instances::delete_by_token),
        )
        .route(
            "/instances/enabled",
            put(instances::enable).delete(instances::disable),
        )
        .route(
            "/instances/{id}",
            get(instances::get_one)
                .patch(instances::patch)
                .put(instances::put)
                .delete(instances::delete),
        )
        .route(
            "/instances/{id}/enabled",
            put(instances::enable_by_id).delete(instances::disable_by_id),
        )
        .route(
            "/instances/{id}/tokens/refresh",
            post(instances::refresh_now),
        )
        .route("/instances/{id}/tokens/revoke", post(instances::revoke))
        .route("/events", get(events::list))
        .route(
            "/events/webhook-secret",
            get(events::webhook_secret).post(events::rotate_webhook_secret),
        )
        .route("/audit-logs", get(events::audit_logs))
        .layer(DefaultBodyLimit::max(max_body));
    // The proxy streams bodies of any size: no body limit there.
    let proxy = Router::new()
        .route("/proxy/{*path}", any(crate::proxy::handle))
        .route("/proxy/", any(crate::proxy::handle))
        .route("/proxy", any(crate::proxy::handle))
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .nest(BASE_PATH, platform.merge(proxy))
        .route("/", get(dashboard::page))
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route("/oauth/callback", get(ops::oauth_callback))
        .fallback(ops::not_found)
        .layer(axum::middleware::from_fn(error::request_id_layer))
        .with_state(app)
}

/// The whole HTTP service: calls through the proxy go straight to it (its hot path skips the
/// router and its middleware, which cost as much as the proxying itself); everything else
/// goes through the router. The router serves the proxy route too, with the same handler, for
/// whoever uses it on its own.
#[derive(Clone)]
pub struct Service {
    app: SharedApp,
    router: Router,
}

/// A platform request's body, cut when no byte of it comes for the idle timeout (a client
/// that crashed or hung mid-body held its connection, and a slot of `--max-connections`, for
/// good): the call answers 408.
fn stalls_cut(
    app: &crate::app::App,
) -> impl FnOnce(hyper::body::Incoming) -> axum::body::Body + use<> {
    let timeout = app.config.header_read_timeout;
    move |body| axum::body::Body::new(tower_http::timeout::TimeoutBody::new(timeout, body))
}

/// Whether an error is (or was caused by) a request body cut by [`stalls_cut`]'s timeout.
pub fn stalled(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// The answer to a request whose body stopped coming.
pub fn stalled_body() -> error::ApiError {
    error::ApiError::new(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        "The request body stopped coming before its end",
    )
}

/// The service's own answers (not the proxy's, which are the provider's) carry tokens, secrets
/// and instances' states: no cache keeps them (RFC 6749 §5.1 asks it of token answers), unless
/// the answer says otherwise.
fn uncached(mut response: axum::response::Response) -> axum::response::Response {
    response
        .headers_mut()
        .entry(axum::http::header::CACHE_CONTROL)
        .or_insert(axum::http::HeaderValue::from_static("no-store"));
    response
}

impl Service {
    pub fn app(&self) -> &SharedApp {
        &self.app
    }

    pub fn new(app: SharedApp) -> Self {
        Service {
            router: router(app.clone()),
            app,
        }
    }

    pub async fn call(
        self,
        request: axum::http::Request<hyper::body::Incoming>,
    ) -> axum::response::Response {
        let path = request.uri().path();
        if crate::proxy::is_proxied(path) {
            // Small: the call's large state is boxed inside.
            return crate::proxy::entry(self.app, request).await;
        }
        use tower::ServiceExt;
        let changes = !matches!(
            *request.method(),
            axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
        );
        if !changes {
            let routed = Box::pin(self.router.oneshot(request.map(stalls_cut(&self.app))));
            return match routed.await {
                Ok(response) => uncached(response),
                Err(never) => match never {},
            };
        }
        // A change, once its request has arrived, is carried out to its end whether the caller
        // waits for the answer or hangs up: cut at one of its awaits (hyper drops the call of a
        // connection that closed), it left a change written without its audit entry, or a
        // deletion without its scheduler told. A task of its own; not counted like a refresh
        // (a caller stalling its body would hold a shutdown), while the work that must outlive
        // a shutdown's start (an exchange, a revocation) is, inside it. The request id is fixed
        // here, so that an answer to a task that failed carries it too.
        let mut request = request;
        let request_id = error::request_id_of(request.headers());
        request
            .headers_mut()
            .insert(error::X_REQUEST_ID, request_id.clone());
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let routed = Box::pin(self.router.oneshot(request.map(stalls_cut(&self.app))));
        match tokio::spawn(routed).await {
            Ok(Ok(response)) => uncached(response),
            Ok(Err(never)) => match never {},
            Err(stopped) => error::REQUEST_ID.sync_scope(request_id.clone(), || {
                tracing::error!(request_id = error::request_id_text(&request_id), %method, %path, "a request stopped before its answer: {stopped}");
                let mut response =
                    error::ApiError::internal("The request stopped before its answer")
                        .into_response();
                response
                    .headers_mut()
                    .insert(error::X_REQUEST_ID, request_id.clone());
                response
            }),
        }
    }
}
