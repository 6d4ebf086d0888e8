//! `GET /`: the dashboard, one page embedded in the binary (nothing is loaded from outside the
//! machine). It signs in with the organization and user secrets, kept in the tab's session
//! storage (never in a URL), and speaks the platform API like any other client.

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

const PAGE: &str = include_str!("../../assets/dashboard.html");

#[utoipa::path(
    get,
    path = "/",
    operation_id = "dashboard_page",
    tag = "operations",
    summary = "The dashboard (an HTML page): instances, states, events, Reconnect",
    responses((status = 200, description = "Success")),
)]
pub async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(PAGE),
    )
        .into_response()
}
