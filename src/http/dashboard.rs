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
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let policy = POLICY.get_or_init(|| {
        format!(
            "default-src 'self'; script-src {}; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            script_sources(PAGE)
        )
    });
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, policy.as_str()),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(PAGE),
    )
        .into_response()
}

/// The page's own inline scripts, each by its SHA-256 (CSP `'sha256-…'`): only they run, not
/// a script or handler that text put into the page could bring (`'unsafe-inline'` let any).
pub fn script_sources(page: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let mut sources = Vec::new();
    let mut rest = page;
    while let Some(open) = rest.find("<script") {
        let after = &rest[open..];
        let Some(start) = after.find('>') else { break };
        let body = &after[start + 1..];
        let Some(end) = body.find("</script>") else {
            break;
        };
        // As the browser hashes it: its HTML parser turns CR LF (a checkout with Windows line
        // endings) and a lone CR into LF first.
        let script = body[..end].replace("\r\n", "\n").replace('\r', "\n");
        let digest = sha2::Sha256::digest(script.as_bytes());
        sources.push(format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        ));
        rest = &body[end..];
    }
    if sources.is_empty() {
        "'none'".to_string()
    } else {
        sources.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_is_hashed_as_the_browser_reads_it() {
        let lf = script_sources("<p>x</p><script>\nlet a = 1;\n</script>");
        assert!(lf.starts_with("'sha256-"), "{lf}");
        assert_eq!(
            script_sources("<p>x</p><script>\r\nlet a = 1;\r\n</script>"),
            lf
        );
        assert_eq!(script_sources("<p>no script</p>"), "'none'");
        assert!(script_sources(PAGE).starts_with("'sha256-"));
    }
}
