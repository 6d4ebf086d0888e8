//! The checks behind every fuzz target, shared by the libFuzzer targets (`fuzz_targets/`) and
//! the stable-toolchain mutation loop (`src/bin/smoke.rs`). Each function takes raw bytes,
//! calls the real library code and asserts its invariants: a panic is a finding.
//!
//! Input formats (so that the seed corpora stay readable):
//! - `authorization_header`: the header value.
//! - `token_response`: `<status> [connector key]\n<content-type>\n<www-authenticate>\n<body>`
//!   (an empty line means "no header"; an unknown or missing key picks a connector by the
//!   body's length).
//! - `proxy_confine`: `<base url>\n<raw path>[\n<query>]` (no third line: no query).
//! - `connector_definition`: a connector as JSON (`POST /elements`) when it starts with `{`,
//!   else a catalog file in TOML (`[[connector]]` tables, as `catalog/connectors.toml`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tokenwarden::app::{App, AppConfig, SharedApp};
use tokenwarden::catalog::{self, Connector};
use tokenwarden::http::auth::{HeaderError, parse_authorization};

/// Longest message the OAuth error classes may carry: codes are cut to 100 characters and
/// descriptions to 300, so anything near this bound means an unbounded echo of a provider body.
const MAX_ERROR_CHARS: usize = 1_000;
/// `describe_provider_body` promises "at most about 300 characters" (300 and an ellipsis).
const MAX_DESCRIBED_CHARS: usize = 301;

/// A fixed "now" (2026-01-01T00:00:00Z) so that runs are reproducible.
const NOW_MS: i64 = 1_767_225_600_000;

// ---------------------------------------------------------------------------------------------
// authorization_header

pub fn authorization_header(data: &[u8]) {
    let value = String::from_utf8_lossy(data);
    match parse_authorization(&value) {
        Ok(credentials) => {
            let parts = [
                ("User", &credentials.user),
                ("Organization", &credentials.organization),
                ("Element", &credentials.element),
            ];
            let mut rebuilt = Vec::new();
            for (label, secret) in parts {
                let Some(secret) = secret else { continue };
                let secret = secret.expose();
                assert!(!secret.is_empty(), "{label}: empty secret accepted");
                assert_eq!(secret, secret.trim(), "{label}: secret not trimmed");
                assert!(!secret.contains(','), "{label}: secret holds the separator");
                assert!(
                    !secret.contains(char::is_whitespace),
                    "{label}: secret holds a space (a missing comma)"
                );
                assert!(value.contains(secret), "{label}: secret not from the input");
                rebuilt.push(format!("{label} {secret}"));
            }
            // What was parsed parses again to the same credentials, in any order.
            rebuilt.reverse();
            let again = parse_authorization(&rebuilt.join(" , ")).expect("rebuilt header refused");
            assert_eq!(again, credentials, "re-parsing changed the credentials");
        }
        Err(HeaderError::UnknownPart(shown)) => {
            // The message names the part, never what follows it (a secret, a Bearer token).
            // Its leading letters only (a secret glued to the name, `User:…`, is cut off).
            let letters = shown.strip_suffix('…').unwrap_or(&shown);
            assert!(letters.chars().count() <= 32, "unknown part shown whole");
            assert!(
                letters.chars().all(|c| c.is_ascii_alphabetic()),
                "unknown part shows more than its name: {shown:?}"
            );
        }
        Err(HeaderError::Empty(_) | HeaderError::Repeated(_) | HeaderError::Unseparated(_)) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// token_response

fn built_in() -> &'static [Connector] {
    static CONNECTORS: OnceLock<Vec<Connector>> = OnceLock::new();
    CONNECTORS.get_or_init(|| catalog::load_built_in().expect("the built-in catalog loads"))
}

/// One `App` for the whole run: `instances::apply_token_set` needs its keyring. Built once on a
/// runtime that lives as long as the process (the store's pool belongs to it).
fn app() -> &'static SharedApp {
    static APP: OnceLock<(tokio::runtime::Runtime, SharedApp)> = OnceLock::new();
    &APP.get_or_init(|| {
        tokenwarden::app::install_crypto_provider();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = std::env::temp_dir().join(format!("tokenwarden-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let mut config = AppConfig::new(format!("sqlite://{}/fuzz.db", dir.display()));
        // 32 zero bytes: the sealed values are thrown away.
        config.master_key = Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string());
        config.background_tasks = false;
        let app = runtime
            .block_on(App::build(config))
            .expect("the app builds");
        (runtime, app)
    })
    .1
}

fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[]),
    }
}

fn optional_header(line: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(line).trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn assert_no_secret_names(fields: &Map<String, Value>, path: &str) {
    for (name, value) in fields {
        let lower = name.to_ascii_lowercase();
        // Lifetimes of tokens are kept, as the service means to (QuickBooks'
        // `x_refresh_token_expires_in`).
        let lifetime = lower.ends_with("_expires_in") || lower.ends_with("_expires_at");
        assert!(
            lifetime
                || !["token", "secret", "password", "credential"]
                    .iter()
                    .any(|word| lower.contains(word)),
            "secret-looking field `{path}{name}` kept among the plain fields"
        );
        if let Value::Object(inner) = value {
            assert_no_secret_names(inner, &format!("{path}{name}."));
        }
        if let Value::Array(items) = value {
            for item in items {
                if let Value::Object(inner) = item {
                    assert_no_secret_names(inner, &format!("{path}{name}[]."));
                }
            }
        }
    }
}

pub fn token_response(data: &[u8]) {
    let (first, rest) = split_line(data);
    let (content_type_line, rest) = split_line(rest);
    let (www_line, body) = split_line(rest);
    let first = String::from_utf8_lossy(first);
    let mut words = first.split_whitespace();
    let status: u16 = words.next().and_then(|w| w.parse().ok()).unwrap_or(200);
    let connectors = built_in();
    let connector = words
        .next()
        .and_then(|key| connectors.iter().find(|c| c.key == key))
        .unwrap_or(&connectors[body.len() % connectors.len()]);
    let content_type = optional_header(content_type_line);
    let www_authenticate = optional_header(www_line);

    let parsed = tokenwarden::oauth::parse_token_response(
        status,
        content_type.as_deref(),
        body,
        &connector.oauth,
    );
    match parsed {
        Ok(tokens) => {
            assert!(
                (200..300).contains(&status),
                "a token set from HTTP {status}"
            );
            let access = tokens.access_token.expose();
            assert!(
                !access.is_empty() && access == access.trim(),
                "bad access token"
            );
            if let Some(refresh) = &tokens.refresh_token {
                assert!(
                    !refresh.expose().trim().is_empty(),
                    "blank refresh token kept"
                );
            }
            let raw: Value =
                serde_json::from_str(tokens.raw.expose()).expect("the raw response is JSON");
            assert!(raw.is_object(), "the raw response is not an object");
            assert_no_secret_names(&tokens.fields, "");

            // What the service does with it next: the token columns and the schedule.
            let applied = tokenwarden::instances::apply_token_set(
                app(),
                connector,
                1,
                &tokens,
                None,
                &Map::new(),
                NOW_MS,
            );
            let update = &applied.update;
            if tokens.expires_in.is_some() {
                let at = update.access_expires_at.expect("an access expiry");
                assert!(
                    at >= NOW_MS,
                    "access token expires before it was issued: {at}"
                );
            }
            if tokens.refresh_token_expires_in.is_some() {
                let at = update.refresh_expires_at.expect("a refresh expiry");
                assert!(
                    at >= NOW_MS,
                    "refresh token expires before it was issued: {at}"
                );
            }
            if let Some(due) = update.next_due_at {
                assert!(
                    due >= NOW_MS + tokenwarden::instances::MIN_SCHEDULED_INTERVAL_MS,
                    "next refresh due too soon: {due}"
                );
            }
        }
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.chars().count() <= MAX_ERROR_CHARS,
                "unbounded error message ({} chars)",
                message.chars().count()
            );
        }
    }

    let described =
        tokenwarden::oauth::describe_provider_body(status, www_authenticate.as_deref(), body);
    assert!(!described.is_empty(), "empty provider description");
    assert!(
        described.chars().count() <= MAX_DESCRIBED_CHARS,
        "provider description too long ({} chars)",
        described.chars().count()
    );
    if let Some(rejection) = tokenwarden::oauth::api_rejection(
        &connector.rejection,
        status,
        www_authenticate.as_deref(),
        body,
    ) {
        assert_eq!(rejection, described, "api_rejection describes differently");
    }
}

// ---------------------------------------------------------------------------------------------
// proxy_confine

pub fn proxy_confine(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let base_url = lines.next().unwrap_or("");
    let raw_path = lines.next().unwrap_or("");
    let query = lines.next();

    let Ok(uri) = tokenwarden::proxy::confine(base_url, raw_path, query) else {
        return;
    };
    // What the provider gets, read by a WHATWG URL parser.
    let target = url::Url::parse(&uri.to_string()).expect("confine made an unparseable URL");
    // The invariant: an accepted URL stays under the instance's base URL.
    let base = url::Url::parse(base_url).expect("confine accepted an unparseable base URL");
    assert_eq!(target.scheme(), base.scheme(), "scheme changed: {target}");
    assert_eq!(target.host_str(), base.host_str(), "host changed: {target}");
    assert_eq!(
        target.port_or_known_default(),
        base.port_or_known_default(),
        "port changed: {target}"
    );
    assert!(
        target.username().is_empty() || target.username() == base.username(),
        "user info added: {target}"
    );
    let base_path = base.path();
    assert!(
        target.path().starts_with(base_path),
        "path {} leaves the base path {base_path}",
        target.path()
    );
    // On a segment boundary: `/api` must not become `/api-admin`.
    let below = &target.path()[base_path.len()..];
    assert!(
        base_path.ends_with('/') || below.is_empty() || below.starts_with('/'),
        "path {} is beside the base path {base_path}, not under it",
        target.path()
    );
    tokenwarden::egress::check_url(&target).expect("confine accepted a forbidden destination");
    // And for a server that decodes the path (encoded slashes too, and again, as a gateway in
    // front of it may) and resolves dot segments as the most lenient servers read them.
    let resolved = |path: &str| {
        let mut bytes = path.as_bytes().to_vec();
        for _ in 0..6 {
            bytes = lenient_decode(&bytes);
        }
        let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
        let mut kept: Vec<String> = Vec::new();
        for segment in text.split('/') {
            // `..;x` is `..` to Tomcat; `...` and `.. ` are `..` to servers that trim dots
            // and spaces.
            let name = segment.split(';').next().unwrap_or("");
            let dots = name.contains('.') && name.chars().all(|c| c == '.' || c == ' ');
            if dots && name.trim_end() != "." {
                kept.pop();
            } else if !dots && !segment.is_empty() {
                kept.push(segment.to_string());
            }
        }
        kept
    };
    // No segment begins with a slash once decoded (a network path where it begins the path, or
    // behind a gateway that strips the segments before it), also after `;` parameters and
    // spaces that servers drop.
    for segment in below.split('/') {
        let mut bytes = segment.as_bytes().to_vec();
        for _ in 0..6 {
            let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
            if let Some((head, _)) = text.split_once('/') {
                let head = head.split(';').next().unwrap_or("");
                assert!(
                    !head.trim().is_empty(),
                    "segment {segment} begins with a slash once decoded: {target}"
                );
            }
            bytes = lenient_decode(&bytes);
        }
    }
    let under = resolved(target.path());
    let base_segments = resolved(base_path);
    assert!(
        under.starts_with(&base_segments),
        "path {} leaves the base path {base_path} once decoded and resolved",
        target.path()
    );
}

/// Percent-decoding that keeps what is not a valid escape.
fn lenient_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && let (Some(high), Some(low)) = (
                bytes.get(index + 1).copied().and_then(hex),
                bytes.get(index + 2).copied().and_then(hex),
            )
        {
            out.push(high << 4 | low);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// connector_definition

pub fn connector_definition(data: &[u8]) {
    if data.first() == Some(&b'{') {
        // As `POST /elements` reads it: a JSON object, then the connector type, then `validate`.
        let Ok(value) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        if !value.is_object() {
            return;
        }
        let Ok(connector) = serde_json::from_value::<Connector>(value) else {
            return;
        };
        if catalog::validate(&connector, false).is_ok() {
            check_valid_connector(&connector, false);
        }
    } else {
        let text = String::from_utf8_lossy(data);
        let Ok(connectors) = catalog::parse_catalog(&text) else {
            return;
        };
        for connector in &connectors {
            if catalog::validate(connector, true).is_ok() {
                check_valid_connector(connector, true);
            }
        }
    }
}

/// What the service does with a connector it accepted.
fn check_valid_connector(connector: &Connector, built_in: bool) {
    // Stored as JSON and read back on every use: the round trip must give it back, valid.
    let stored = serde_json::to_string(connector).expect("a valid connector serializes");
    let read: Connector = serde_json::from_str(&stored).expect("a stored connector reads back");
    assert_eq!(
        &read, connector,
        "the stored connector reads back different"
    );
    catalog::validate(&read, built_in).expect("a stored connector validates again");

    // Its URLs filled as for a new instance, and an authorization URL built from them.
    let mut values = BTreeMap::new();
    values.insert(
        catalog::SANDBOX_PLACEHOLDER.to_string(),
        "http://127.0.0.1:4000".to_string(),
    );
    for (name, input) in &connector.inputs {
        values.insert(
            name.clone(),
            input
                .default
                .clone()
                .unwrap_or_else(|| "tenant1".to_string()),
        );
    }
    let fill = |template: &str| catalog::fill_template(template, &values);
    let _ = fill(&connector.base_url);
    let oauth = &connector.oauth;
    if let (Ok(authorization_url), Ok(token_url)) =
        (fill(&oauth.authorization_url), fill(&oauth.token_url))
    {
        let endpoints = tokenwarden::oauth::Endpoints {
            refresh_url: oauth
                .refresh_url
                .as_deref()
                .and_then(|url| fill(url).ok())
                .unwrap_or_else(|| token_url.clone()),
            revoke_url: oauth.revoke_url.as_deref().and_then(|url| fill(url).ok()),
            authorization_url,
            token_url,
        };
        let _ = tokenwarden::oauth::authorization_url(
            oauth,
            &endpoints,
            "client-id",
            "http://127.0.0.1:8080/oauth/callback",
            "state",
            None,
            Some("challenge"),
        );
    }

    // Its schedule: never before the last refresh plus the floor, whatever the settings.
    let hour = 3_600_000;
    for (access, refresh) in [
        (Some(NOW_MS + hour), Some(NOW_MS + 90 * 24 * hour)),
        (Some(NOW_MS + 60_000), None),
        (None, None),
        (None, Some(NOW_MS + 24 * hour)),
    ] {
        let due = tokenwarden::instances::next_due_at(connector, true, access, refresh, NOW_MS);
        if let Some(due) = due {
            assert!(
                due >= NOW_MS + tokenwarden::instances::MIN_SCHEDULED_INTERVAL_MS,
                "refresh due at {due}, before the last one ({NOW_MS}) plus the floor"
            );
        }
        if let (Some(keep_alive), Some(due)) = (connector.refresh.keep_alive_seconds, due) {
            let keep_alive_due =
                NOW_MS.saturating_add(keep_alive.saturating_mul(1000).min(i64::MAX as u64) as i64);
            assert!(
                due <= keep_alive_due.max(NOW_MS + 1_000),
                "keep-alive refresh comes late"
            );
        }
    }
}
