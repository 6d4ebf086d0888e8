//! The operations endpoints: `/metrics` has every family after a scenario, `/openapi.json`
//! documents exactly the routes the router serves, `/healthz` checks the database.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::crash::{call, spawn_serve, stats};
use crate::harness::Env;
use crate::scheduler::{eventually, register_generic_connector};
use crate::support::{drop_test_database, test_databases};

/// `/metrics` of the server at `base` as text, checked to be Prometheus' text format.
async fn scrape(http: &reqwest::Client, base: &str) -> String {
    let response = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    response.text().await.unwrap()
}

/// The value of the sample named (with its labels) in `text`; 0 when it is not there.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The scenario runs against `tokenwarden serve` as a process of its own: its counters are
/// its own (the test process's recorder is shared by every test in it), so they are checked
/// for exactly what the scenario did.
#[tokio::test]
async fn metrics_has_every_family_after_a_scenario() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    env.sandbox_put(
        "/__sandbox/profiles/generic",
        json!({"accessTokenTtlSeconds": 2}),
    )
    .await;
    register_generic_connector(
        &env,
        &env.org,
        "metered",
        json!({"strategy": "before_expiry", "bufferSeconds": 1}),
    )
    .await;
    let instance = env.create_instance(&env.org, "metered", "mia").await;
    let token = instance["token"].as_str().unwrap().to_string();
    let Env {
        server,
        sandbox,
        http,
        org,
        ..
    } = env;
    server.shutdown().await;
    let serve = spawn_serve(&url, &sandbox.url, &http).await;
    let refreshes = || async {
        stats(&http, &sandbox.url).await["token"]["refresh_token"]
            .as_u64()
            .unwrap()
    };
    const PROXIED: &str = "tokenwarden_proxy_requests_total{status=\"2xx\"}";
    // An organization's connector is counted under one label: its key is its own.
    const REFRESHED: &str =
        "tokenwarden_refresh_attempts_total{connector=\"organization\",outcome=\"ok\"}";
    let before = scrape(&http, &serve.url).await;
    assert_eq!(sample(&before, PROXIED), 0.0, "a new process:\n{before}");
    for _ in 0..3 {
        let (status, body) = call(&http, &serve.url, &org, &token).await;
        assert_eq!(status, 200, "{body}");
    }
    let refreshed = refreshes().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            refreshes().await > refreshed
        })
        .await,
        "a scheduled refresh happened"
    );
    // Its metrics are recorded after the provider's answer.
    assert!(
        eventually(Duration::from_secs(10), || async {
            sample(&scrape(&http, &serve.url).await, REFRESHED) >= 1.0
        })
        .await,
        "the scheduled refresh was counted"
    );
    let text = scrape(&http, &serve.url).await;
    assert_eq!(
        sample(&text, PROXIED),
        3.0,
        "the three proxied calls counted:\n{text}"
    );
    for family in [
        "tokenwarden_proxy_seconds_bucket{le=",
        "tokenwarden_instances{state=\"valid\"}",
        "tokenwarden_instances{state=\"needs_reauthentication\"}",
        "tokenwarden_scheduler_lag_seconds_bucket{le=",
        "tokenwarden_outbox_backlog",
        "tokenwarden_outbox_oldest_pending_seconds",
        "tokenwarden_rotated_tokens_kept 0",
        "# HELP tokenwarden_clock_offset_seconds ",
        "tokenwarden_build_info{version=",
        "# HELP tokenwarden_instances ",
        "# HELP tokenwarden_proxy_requests_total ",
        "# HELP tokenwarden_proxy_seconds ",
    ] {
        assert!(text.contains(family), "{family} missing from:\n{text}");
    }
    assert_eq!(
        sample(&text, "tokenwarden_proxy_seconds_count"),
        3.0,
        "the calls' durations recorded:\n{text}"
    );
    // This machine's clock and the database's (the same machine's) agree.
    let offset = sample(&text, "tokenwarden_clock_offset_seconds");
    assert!(offset.abs() < 1.0, "clock offset {offset} s:\n{text}");
    assert!(
        !text.contains("metered"),
        "an organization's connector key in:\n{text}"
    );
    drop(serve);
    drop_test_database(&url).await;
}

/// The routes `src/http/mod.rs` registers, as (method, full path), read from its source: the
/// router offers no list of its routes, and this reading needs no discipline from whoever adds
/// one.
fn routes_in_router_source() -> Vec<(String, String)> {
    let source = include_str!("../../src/http/mod.rs");
    let top_level = source
        .find(".nest(BASE_PATH")
        .expect("the router nests the platform API under BASE_PATH");
    let mut routes = Vec::new();
    let mut rest = source;
    let mut offset = 0;
    while let Some(at) = rest.find(".route(") {
        let start = offset + at;
        let after = &source[start + ".route(".len()..];
        let open = after.find('"').unwrap();
        let close = after[open + 1..].find('"').unwrap();
        let path = &after[open + 1..open + 1 + close];
        // The handler expression runs to the parenthesis that closes `.route(`.
        let mut depth = 1;
        let mut end = 0;
        for (i, c) in after.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let handlers = &after[open + close + 2..end];
        let full = if start < top_level {
            format!("/elements/api-v2{path}")
        } else {
            path.to_string()
        }
        .replace("{*path}", "{path}");
        for method in ["get", "post", "put", "patch", "delete", "any"] {
            let called = handlers.contains(&format!("{method}("));
            if called {
                routes.push((method.to_string(), full.clone()));
            }
        }
        offset = start + ".route(".len();
        rest = &source[offset..];
    }
    routes
}

fn concrete(path: &str) -> String {
    path.replace("{id}", "1")
        .replace("{key}", "sandbox-generic")
        .replace("{path}", "api/me")
}

const FALLBACK: &str = "There is no such path";

#[tokio::test]
async fn openapi_documents_exactly_the_routes_served() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let response = env
        .http
        .get(format!("{}/openapi.json", env.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();
    // Generated from the handlers' attributes: every operation has its own id.
    let mut ids: Vec<&str> = paths
        .values()
        .flat_map(|operations| operations.as_object().unwrap().values())
        .map(|operation| operation["operationId"].as_str().unwrap_or(""))
        .collect();
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "operation ids are unique: {ids:?}");
    assert!(ids.iter().all(|id| !id.is_empty()));
    // Bodies and query parameters are described, so a client can be generated from it.
    let api = |path: &str| format!("/elements/api-v2{path}");
    for (method, path) in [
        ("post", "/elements"),
        ("post", "/instances"),
        ("post", "/elements/{key}/instances"),
        ("patch", "/instances/{id}"),
        ("patch", "/instances"),
        ("put", "/instances/{id}"),
        ("put", "/instances"),
    ] {
        let body = &paths[&api(path)][method]["requestBody"]["content"]["application/json"];
        assert!(body["example"].is_object(), "{method} {path}: {body}");
    }
    let query = |method: &str, path: &str| -> Vec<(String, bool)> {
        paths[&api(path)][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["required"] == true,
                )
            })
            .collect()
    };
    for (method, path, expected) in [
        (
            "get",
            "/events",
            &["instanceId", "type", "before", "limit"][..],
        ),
        ("get", "/audit-logs", &["before", "limit"]),
        ("get", "/instances", &["tags[]"]),
        ("get", "/elements", &["category"]),
        ("delete", "/instances/{id}", &["revoke"]),
        ("put", "/instances/{id}", &["reAuthenticate"]),
        (
            "get",
            "/elements/{key}/oauth/url",
            &["apiKey", "apiSecret", "callbackUrl", "state", "scope"],
        ),
    ] {
        let found = query(method, path);
        for name in expected {
            assert!(
                found.iter().any(|(n, _)| n == name),
                "{method} {path}: {found:?}"
            );
        }
    }
    // The paging cursors are strings (the events' is `<ms>_<id>`): a client generated with an
    // integer could not page.
    for path in ["/events", "/audit-logs"] {
        let before = paths[&api(path)]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "before")
            .unwrap();
        assert_eq!(before["schema"]["type"], "string", "{path}: {before}");
    }
    let oauth_url = query("get", "/elements/{key}/oauth/url");
    assert!(
        oauth_url.contains(&("apiKey".to_string(), true)),
        "{oauth_url:?}"
    );
    assert!(
        oauth_url.contains(&("state".to_string(), false)),
        "{oauth_url:?}"
    );
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, operations) in paths {
        for method in operations.as_object().unwrap().keys() {
            documented.push((method.clone(), path.clone()));
        }
    }
    // Every route the router registers is documented (a proxy `any` as at least `get`).
    let served = routes_in_router_source();
    assert!(
        served.len() >= 25,
        "the source reading found the routes: {served:?}"
    );
    for (method, path) in &served {
        let method = if method == "any" { "get" } else { method };
        assert!(
            documented.contains(&(method.to_string(), path.clone())),
            "{method} {path} is served but not in /openapi.json"
        );
    }
    // Every documented route answers something other than the fallback, and every other
    // method on a documented path is refused (405) or falls back: none is served undocumented.
    let methods = ["get", "post", "put", "patch", "delete"];
    for (path, operations) in paths {
        let target = format!("{}{}", env.server.url, concrete(path));
        for method in methods {
            let response = env
                .http
                .request(method.to_uppercase().parse::<Method>().unwrap(), &target)
                .header("authorization", "User nobody, Organization nobody")
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            let fallback = status == 404 && body.contains(FALLBACK);
            if operations.get(method).is_some() {
                assert!(
                    !fallback && status != 405,
                    "{method} {path} is documented but not served: {status} {body}"
                );
            } else if !path.contains("/proxy/") {
                assert!(
                    fallback || status == 405,
                    "{method} {path} answers {status} but is not documented"
                );
            }
        }
    }
    // The fallback itself is what the check above relies on.
    let response = env
        .http
        .get(format!("{}/no/such/route", env.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.text().await.unwrap().contains(FALLBACK));
    // A platform path with a trailing slash is told to drop it (it was told the API is
    // under the base path it was under).
    let response = env
        .http
        .get(env.api("/instances/"))
        .header("authorization", env.org.platform())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body = response.text().await.unwrap();
    assert!(
        body.contains(FALLBACK) && body.contains("end without a slash"),
        "{body}"
    );
    // The base path itself says where the paths go on.
    let response = env.http.get(env.api("/")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let body = response.text().await.unwrap();
    assert!(body.contains("go on from /elements/api-v2"), "{body}");
    env.stop().await;
    drop_test_database(&url).await;
}

#[tokio::test]
async fn healthz_checks_the_database() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let (status, body) = env
            .get_json(&format!("{}/healthz", env.server.url), "")
            .await;
        assert_eq!(status, 200, "[{label}] {body}");
        assert_eq!(body["status"], "ok");
        // The clock the service goes by is this machine's, or its database's on this machine.
        let offset = body["clockOffsetMs"].as_i64().unwrap_or(i64::MAX);
        assert!(offset.abs() < 1_000, "[{label}] {body}");
        assert!(
            body["database"]
                .as_str()
                .unwrap()
                .starts_with(label.as_str()),
            "{body}"
        );
        // With the database gone, it says so.
        env.server.app.store.close().await;
        let (status, body) = env
            .get_json(&format!("{}/healthz", env.server.url), "")
            .await;
        assert_eq!(status, 503, "[{label}] {body}");
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// A database that answers reads but takes no write (here another process holds SQLite's write
/// lock past the busy timeout; a full disk and a read-only file fail the same way) is not
/// healthy: `/healthz` said ok while every change and every refresh's commit failed.
#[tokio::test]
async fn healthz_checks_that_the_database_takes_a_write() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let healthz = format!("{}/healthz", env.server.url);
    let (status, body) = env.get_json(&healthz, "").await;
    assert_eq!(status, 200, "{body}");
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut other = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    // Within its 2 s, not the 5 s busy timeout: a load balancer's probe gives up first and
    // learns nothing.
    let asked = std::time::Instant::now();
    let (status, body) = env.get_json(&healthz, "").await;
    assert!(
        asked.elapsed() < Duration::from_millis(3_500),
        "answered after {:?}",
        asked.elapsed()
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["database"], "not answering", "{body}");
    assert!(
        body["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    let _ = other.close().await;
    let (status, body) = env.get_json(&healthz, "").await;
    assert_eq!(status, 200, "{body}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// The server speaks HTTP/1.1 and HTTP/2 with prior knowledge on the same port (the first bytes
/// decide, a preface sent in pieces included), and shutting down closes idle keep-alive
/// connections at once instead of waiting for their callers to go.
#[tokio::test]
async fn http1_and_http2_on_one_port_and_shutdown_closes_idle_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = crate::support::sqlite_database();
    let env = Env::start("protocols", &url).await;
    let healthz = format!("{}/healthz", env.server.url);

    let http1 = env.http.get(&healthz).send().await.unwrap();
    assert_eq!(http1.version(), reqwest::Version::HTTP_11);
    assert_eq!(http1.status(), 200);
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let http2 = h2c.get(&healthz).send().await.unwrap();
    assert_eq!(http2.version(), reqwest::Version::HTTP_2);
    assert_eq!(http2.status(), 200);
    assert_eq!(http2.json::<Value>().await.unwrap()["status"], "ok");

    // The preface in two writes: the server answers with its SETTINGS frame (type 4).
    let mut raw = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    raw.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    raw.write_all(b"\r\nSM\r\n\r\n").await.unwrap();
    raw.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), raw.read_exact(&mut frame))
        .await
        .expect("no answer to a preface sent in pieces")
        .unwrap();
    assert_eq!(frame[3], 4, "the first frame is SETTINGS: {frame:?}");
    drop(raw);

    // Both clients keep their connections open, idle, and one more connection has sent nothing
    // yet. The service's own bound on shutdown is 10 s; the connections must not be what it
    // waits for.
    let silent = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let Env {
        server, sandbox, ..
    } = env;
    server.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for idle connections",
        started.elapsed()
    );
    drop(silent);
    sandbox.shutdown().await;
    drop_test_database(&url).await;
}

/// `/oauth/callback` shows a code with `Cache-Control: no-store` (no cache keeps it), and a
/// refusal tells the window that opened it (the dashboard's Reconnect waited its full five
/// minutes), also uncached.
#[tokio::test]
async fn the_callback_page_is_not_cached_and_reports_a_refusal() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let page = |query: &str| {
        env.http
            .get(format!("{}/oauth/callback?{query}", env.server.url))
            .send()
    };
    // A redirect with an empty code, or none, has none to show, and tells the opener so (it
    // waited out its five minutes), with the page's headers (a privacy reviewer).
    for query in ["code=&state=xyz", "state=xyz", "error=&state=xyz"] {
        let empty = page(query).await.unwrap();
        assert_eq!(empty.status(), 400, "{query}");
        assert_eq!(empty.headers()["cache-control"], "no-store", "{query}");
        assert!(
            empty.headers().contains_key("content-security-policy"),
            "{query}"
        );
        let text = empty.text().await.unwrap();
        assert!(
            text.contains("postMessage") && text.contains("invalid_request"),
            "{query}: {text}"
        );
    }
    let shown = page("code=abc&state=xyz").await.unwrap();
    assert_eq!(shown.status(), 200);
    assert_eq!(shown.headers()["cache-control"], "no-store");
    // Only its own script runs (a provider's text on the page cannot bring one), in no frame.
    let policy = shown.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        policy.contains("script-src 'sha256-")
            && !policy.contains("unsafe-inline")
            && policy.contains("frame-ancestors 'none'"),
        "{policy}"
    );
    assert_eq!(shown.headers()["referrer-policy"], "no-referrer");
    assert_eq!(shown.headers()["x-frame-options"], "DENY");
    assert_eq!(shown.headers()["x-content-type-options"], "nosniff");
    let dashboard = env
        .http
        .get(format!("{}/", env.server.url))
        .send()
        .await
        .unwrap();
    let policy = dashboard.headers()["content-security-policy"]
        .to_str()
        .unwrap();
    assert!(
        policy.contains("script-src 'sha256-") && !policy.contains("script-src 'unsafe-inline'"),
        "{policy}"
    );
    assert!(shown.text().await.unwrap().contains("abc"));
    let refused = page("error=access_denied&error_description=no&state=xyz")
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(refused.headers()["cache-control"], "no-store");
    let text = refused.text().await.unwrap();
    assert!(text.contains("access_denied"), "{text}");
    assert!(
        text.contains("postMessage") && text.contains("error:"),
        "the refusal is posted to the opener: {text}"
    );
    env.stop().await;
    crate::support::drop_test_database(&url).await;
}

/// A connection that sends no request head, or only part of one, or nothing more after an
/// answer, is closed after the header read timeout: without hyper's timer the timeout was off,
/// and such connections held the process's descriptors for good.
#[tokio::test]
async fn connections_that_send_no_request_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = crate::support::sqlite_database();
    let env = Env::start_adjusted("slow callers", &url, |config| {
        config.header_read_timeout = Duration::from_millis(800);
    })
    .await;
    let closed_within = |mut stream: tokio::net::TcpStream| async move {
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the connection is still open after 10 s");
        (
            started.elapsed(),
            String::from_utf8_lossy(&rest).to_string(),
        )
    };
    let silent = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    let mut partial = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Part of the HTTP/2 preface, then nothing.
    let mut preface = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    preface.write_all(b"PRI * HT").await.unwrap();
    let mut kept_alive = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (silent, partial, preface, kept_alive) = tokio::join!(
        closed_within(silent),
        closed_within(partial),
        closed_within(preface),
        closed_within(kept_alive)
    );
    for (what, (after, _)) in [
        ("silent", &silent),
        ("partial", &partial),
        ("part of the HTTP/2 preface", &preface),
        ("kept alive", &kept_alive),
    ] {
        assert!(
            *after < Duration::from_secs(5),
            "{what}: closed after {after:?}"
        );
    }
    // The kept-alive connection had its answer first.
    assert!(kept_alive.1.starts_with("HTTP/1.1 200"), "{}", kept_alive.1);
    env.stop().await;
    drop_test_database(&url).await;
}

/// At most `max_connections` callers are served at once: past that, the oldest connection
/// (idle, kept alive) is asked to finish and closes, and the next caller is served in its
/// place, as nginx does when its connections run out (a client's pool of idle connections
/// must not shut out new callers and health checks). `/healthz` shows the count and the cap.
#[tokio::test]
async fn connections_past_the_cap_make_the_oldest_idle_one_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = crate::support::sqlite_database();
    let env = Env::start_adjusted("capped", &url, |config| {
        config.max_connections = Some(2);
    })
    .await;
    let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    // Reads one answer's head and body (a small JSON body, in one read or a few).
    async fn answer(stream: &mut tokio::net::TcpStream) -> String {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains('}') {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buffer[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    }
    let mut first = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    first.write_all(request).await.unwrap();
    let said = answer(&mut first).await;
    assert!(said.contains("200 OK"), "{said}");
    let mut second = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    second.write_all(request).await.unwrap();
    let said = answer(&mut second).await;
    assert!(
        said.contains(r#""connections":{"max":2,"open":2}"#),
        "{said}"
    );
    // A third: the oldest, idle, is closed for it, and it is served.
    let mut third = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    third.write_all(request).await.unwrap();
    let said = tokio::time::timeout(Duration::from_secs(5), answer(&mut third))
        .await
        .expect("served once the oldest connection closed");
    assert!(said.contains("200 OK"), "{said}");
    assert!(
        said.contains(r#""connections":{"max":2,"open":2}"#),
        "{said}"
    );
    let mut rest = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), first.read(&mut rest))
        .await
        .expect("the oldest connection was closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    // The second, younger, still serves.
    second.write_all(request).await.unwrap();
    let said = answer(&mut second).await;
    assert!(said.contains("200 OK"), "{said}");
    drop((second, third));
    env.stop().await;
    drop_test_database(&url).await;
}

/// `GET /healthz` from a new connection, closed after its answer, which must come within
/// `within` (`what` says what a timeout means): the answer as text.
async fn healthz_as_a_new_caller(env: &Env, within: Duration, what: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut caller = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    caller
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut said = Vec::new();
    tokio::time::timeout(within, caller.read_to_end(&mut said))
        .await
        .expect(what)
        .unwrap();
    String::from_utf8_lossy(&said).into_owned()
}

/// Past the cap, connections that have not sent a whole request head in a second are given up
/// first and at once, whether silent or sending a head a byte at a time: such sockets, opened
/// faster than they time out, held every place until the idle timeout (75 s) and shut out
/// every caller, health checks included, with no secret needed.
#[tokio::test]
async fn unfinished_heads_past_the_cap_make_way_for_a_caller() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = crate::support::sqlite_database();
    let env = Env::start_adjusted("capped-slow", &url, |config| {
        config.max_connections = Some(4);
    })
    .await;
    let mut held = Vec::new();
    // Two heads begun and never ended, two sockets that say nothing, and as many again
    // waiting in the backlog.
    for index in 0..8 {
        let mut stream = tokio::net::TcpStream::connect(env.server.addr)
            .await
            .unwrap();
        if index % 2 == 0 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
                .await
                .unwrap();
        }
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let started = std::time::Instant::now();
    let said =
        healthz_as_a_new_caller(&env, Duration::from_secs(10), "the caller was served").await;
    assert!(said.contains("200 OK"), "{said}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "served after {:?}",
        started.elapsed()
    );
    // The first unfinished head was given up: closed, without an answer.
    let mut rest = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), held[0].read(&mut rest))
        .await
        .expect("the oldest unfinished head was closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    drop(held);
    env.stop().await;
    drop_test_database(&url).await;
}

/// Past the cap, connections that have sent nothing yet are asked to finish too, and close
/// (a load balancer's pre-opened connections held their places until the idle timeout).
#[tokio::test]
async fn silent_connections_past_the_cap_close_for_a_caller() {
    use tokio::io::AsyncReadExt;
    let url = crate::support::sqlite_database();
    let env = Env::start_adjusted("capped-silent", &url, |config| {
        config.max_connections = Some(2);
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(
            tokio::net::TcpStream::connect(env.server.addr)
                .await
                .unwrap(),
        );
    }
    // Both are accepted and counted before the caller comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let said = healthz_as_a_new_caller(
        &env,
        Duration::from_secs(5),
        "the caller was served once a silent connection closed",
    )
    .await;
    assert!(said.contains("200 OK"), "{said}");
    let mut first = silent.remove(0);
    let mut rest = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), first.read(&mut rest))
        .await
        .expect("the oldest silent connection was closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// The service holds SQLite's own locks on its database file for as long as it runs. The start
/// closed a descriptor of the file it had opened to take its turn at the migrations, which
/// dropped every POSIX lock of the process on it: another process's SQLite (an operator's
/// `sqlite3`, a backup) then took the database for unused, checkpointed it and deleted the
/// live write-ahead log, and writes answered 2xx were lost at the next crash (a black-box
/// tester). Seen in `/proc/locks`: a lock of this process on the database file's inode.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_service_keeps_its_locks_on_the_sqlite_file() {
    use std::os::unix::fs::MetadataExt;
    let url = crate::support::sqlite_database();
    let env = crate::harness::Env::start("sqlite", &url).await;
    // A write and a read, so that SQLite holds what it holds at rest.
    let _ = env
        .create_instance(&env.org, "sandbox-generic", "locked")
        .await;
    let path = url.strip_prefix("sqlite://").unwrap();
    let inode = std::fs::metadata(path).unwrap().ino();
    let pid = std::process::id().to_string();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    let held = locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 5
            && fields[1] == "POSIX"
            && fields[4] == pid
            && fields[5].rsplit(':').next() == Some(&inode.to_string())
    });
    assert!(held, "no lock of pid {pid} on inode {inode}:\n{locks}");
    env.stop().await;
    crate::support::drop_test_database(&url).await;
}

/// With `--metrics-token`, `/metrics` answers only that bearer token (401 with
/// `WWW-Authenticate` otherwise); `/healthz` stays open for the load balancer. Metrics were open
/// to whoever reached the port: connector keys, volumes, failures.
#[tokio::test]
async fn metrics_ask_for_their_token_when_one_is_set() {
    let token = "metrics-token-0123456789";
    let url = crate::support::sqlite_database();
    let env = Env::start_adjusted("sqlite", &url, |config| {
        config.metrics_token_hash = Some(tokenwarden::crypto::hash_secret(token));
    })
    .await;
    let metrics = format!("{}/metrics", env.server.url);
    for given in [
        None,
        Some("Bearer wrong-token-0123456789".to_string()),
        Some(format!("Basic {token}")),
        Some(format!("Bearer {token}x")),
    ] {
        let mut request = env.http.get(&metrics);
        if let Some(given) = &given {
            request = request.header("authorization", given);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{given:?}");
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{given:?}"
        );
        let body = response.text().await.unwrap();
        assert!(body.contains("--metrics-token"), "{body}");
        assert!(!body.contains("tokenwarden_"), "{body}");
    }
    for scheme in ["Bearer", "bearer"] {
        let response = env
            .http
            .get(&metrics)
            .header("authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response
                .text()
                .await
                .unwrap()
                .contains("tokenwarden_build_info")
        );
    }
    let (status, _) = env
        .get_json(&format!("{}/healthz", env.server.url), "")
        .await;
    assert_eq!(status, 200);
    env.stop().await;
    drop_test_database(&url).await;
}

/// PostgreSQL cut every pooled connection (a restart, a failover, `pg_terminate_backend`, a
/// pooler's idle timeout): the calls after it are answered, not failed one per dead connection
/// (each pooled connection's first query failed with a 503, as many as the pool held).
#[tokio::test]
async fn calls_after_the_database_cut_idle_connections_are_answered() {
    let Ok(url) = crate::support::create_postgres_database().await else {
        panic!("PostgreSQL is needed for this test (.ci/run starts it)");
    };
    let env = Env::start("postgres", &url).await;
    let platform = env.org.platform();
    env.create_instance(&env.org, "sandbox-generic", "idle")
        .await;
    // Several connections in the pool: parallel calls open them.
    let list = env.api("/instances");
    let calls = (0..8).map(|_| env.get_json(&list, &platform));
    for (status, body) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200, "{body}");
    }
    use sqlx::Connection;
    let (server, database) = url.rsplit_once('/').unwrap();
    let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    // Each connection names its replica (`pg_stat_activity` could not tell replicas apart).
    let names: Vec<String> =
        sqlx::query_scalar("SELECT application_name FROM pg_stat_activity WHERE datname = $1")
            .bind(database)
            .fetch_all(&mut admin)
            .await
            .unwrap();
    let replica = &env.server.app.replica_id;
    assert!(
        names
            .iter()
            .any(|name| name == &format!("tokenwarden {replica}")),
        "{names:?}"
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let cut = sqlx::query_scalar::<_, bool>(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
    )
    .bind(database)
    .fetch_all(&mut admin)
    .await
    .unwrap()
    .len();
    assert!(cut > 1, "{cut} connections cut");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    for attempt in 0..20 {
        let (status, body) = env.get_json(&env.api("/instances"), &platform).await;
        assert_eq!(status, 200, "call {attempt} after the cut: {body}");
    }
    // Under load (connections idle for less than a second) the cut is found by one call at
    // most: the connection that failed has the others pinged. Each dead connection failed a
    // call in turn.
    for (status, body) in
        futures_util::future::join_all((0..8).map(|_| env.get_json(&list, &platform))).await
    {
        assert_eq!(status, 200, "{body}");
    }
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(database)
        .execute(&mut admin)
        .await
        .unwrap();
    let mut failed = Vec::new();
    for attempt in 0..20 {
        let (status, _) = env.get_json(&list, &platform).await;
        if status != 200 {
            failed.push((attempt, status));
        }
    }
    assert!(failed.len() <= 1, "calls failed after the cut: {failed:?}");
    let _ = admin.close().await;
    env.stop().await;
    drop_test_database(&url).await;
}
