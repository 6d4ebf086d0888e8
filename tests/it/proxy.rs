//! The proxy: confinement to the base URL, what reaches the provider and what comes back,
//! streaming both ways, redirects, and the providers' ways of rejecting a token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::Env;
use crate::refresh::{
    api_calls, expire_access_tokens, instance, proxy_at, refreshes, register_connector,
};
use crate::support::{drop_test_database, sqlite_database};

/// A request written by hand, so that no client normalizes the path: the status line's code.
async fn raw_status(addr: SocketAddr, path: &str, authorization: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn paths_that_leave_the_base_url_are_refused_before_any_call() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "confined")
        .await;
    let token = created["token"].as_str().unwrap();
    let authorization = env.org.through(token);
    let before = api_calls(&env).await;
    let stats_before = env.sandbox_stats().await;
    for path in [
        "../__sandbox/stats",
        "api/../../__sandbox/stats",
        "%2e%2e/__sandbox/stats",
        "api/%2E%2E/%2e%2e/__sandbox/stats",
        ".%2e/__sandbox/stats",
        "api%2f..%2f..%2f__sandbox%2fstats",
        "api/..%5c..%5c__sandbox/stats",
        "http://evil.test/x",
        "%2f%2fevil.test/x",
        "/evil.test/x",
        "api/./me",
    ] {
        let status = raw_status(
            env.server.addr,
            &format!("/elements/api-v2/proxy/{path}"),
            &authorization,
        )
        .await;
        // `proxy//…` does not even match the proxy route (the router answers 404).
        let refused = if path.starts_with('/') {
            [400, 404].contains(&status)
        } else {
            status == 400
        };
        assert!(refused, "{path} is refused: {status}");
    }
    assert_eq!(
        api_calls(&env).await,
        before,
        "the provider was never called"
    );
    assert_eq!(
        env.sandbox_stats().await["faultsInjected"],
        stats_before["faultsInjected"]
    );
    // The same path without tricks goes through, and so does an encoded slash inside a
    // segment (GitLab's `projects/group%2Fproject`), which was refused.
    let status = raw_status(
        env.server.addr,
        "/elements/api-v2/proxy/api/me",
        &authorization,
    )
    .await;
    assert_eq!(status, 200);
    let status = raw_status(
        env.server.addr,
        "/elements/api-v2/proxy/api/echo/group%2Fproject",
        &authorization,
    )
    .await;
    assert_eq!(status, 200);
    env.stop().await;
    drop_test_database(&url).await;
}

#[tokio::test]
async fn the_request_arrives_as_sent_with_the_token_swapped_in() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "echoer")
        .await;
    let token = created["token"].as_str().unwrap();
    let response = env
        .http
        .post(env.api("/proxy/api/echo/sub/path?a=1&b=two%20words&a=3"))
        .header("authorization", env.org.through(token))
        .header("x-custom", "kept")
        .header("accept", "application/json")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "dropped")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .json(&json!({"hello": "world", "n": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/generic/api/echo/sub/path");
    assert_eq!(echo["query"], "a=1&b=two%20words&a=3");
    assert_eq!(
        serde_json::from_str::<Value>(echo["body"].as_str().unwrap()).unwrap(),
        json!({"hello": "world", "n": 1})
    );
    let headers = echo["headers"].as_object().unwrap();
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["content-type"], "application/json");
    for gone in ["x-hop", "keep-alive", "proxy-authorization", "connection"] {
        assert!(!headers.contains_key(gone), "{gone} forwarded: {echo}");
    }
    let everything = echo.to_string();
    assert!(
        !everything.contains(&env.org.user_secret) && !everything.contains(token),
        "the caller's credentials never reach the provider: {echo}"
    );
    // The echo answered at all: the bearer token replaced the caller's Authorization.
    assert_eq!(echo["user"], "echoer");
    // reqwest sends no User-Agent: ours goes instead.
    let agent = headers["user-agent"].as_str().unwrap();
    assert!(agent.starts_with("tokenwarden/"), "{echo}");

    // No hop-by-hop header at all: the caller's User-Agent goes on, and one Content-Length,
    // the body's.
    let response = env
        .http
        .post(env.api("/proxy/api/echo"))
        .header("authorization", env.org.through(token))
        .header("user-agent", "caller/1.0")
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["body"], "abc", "{echo}");
    assert_eq!(echo["headers"]["user-agent"], "caller/1.0", "{echo}");
    assert_eq!(echo["headers"]["content-length"], "3", "{echo}");

    // 5 MiB streamed up: the echo takes at most 1 MiB and says so; its answer comes back as is.
    let chunks = futures_util::stream::iter(
        (0..80).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 64 * 1024]))),
    );
    let response = env
        .http
        .put(env.api("/proxy/api/echo"))
        .header("authorization", env.org.through(token))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "payload_too_large", "{body}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// Bodies are told by the request itself, not by its method: an HTTP/2 caller's `DELETE` with a
/// body and no length (HTTP/2 has no chunked encoding and needs no length) reaches the provider
/// whole (it was dropped as "a DELETE has no body"), and an empty `POST` goes with
/// `Content-Length: 0` (it went with no length at all, which some providers answer with 411).
#[tokio::test]
async fn bodies_are_told_by_the_request_not_its_method() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "bodies")
        .await;
    let token = created["token"].as_str().unwrap();
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let chunks = futures_util::stream::iter(
        ["{\"delete\":", "\"these\"}"]
            .map(|part| Ok::<_, std::io::Error>(bytes::Bytes::from(part))),
    );
    let response = h2c
        .delete(env.api("/proxy/api/echo"))
        .header("authorization", env.org.through(token))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["method"], "DELETE", "{echo}");
    assert_eq!(echo["body"], "{\"delete\":\"these\"}", "{echo}");
    // An HTTP/2 caller's cookie split into fields goes on as one (RFC 9113 §8.2.3).
    let response = h2c
        .get(env.api("/proxy/api/echo"))
        .header("authorization", env.org.through(token))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["headers"]["cookie"], "a=1; b=2", "{echo}");

    let response = env
        .http
        .post(env.api("/proxy/api/echo"))
        .header("authorization", env.org.through(token))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["headers"]["content-length"], "0", "{echo}");
    assert_eq!(echo["body"], "", "{echo}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// A stranger's server under the proxy: counts uploads, serves a large download in chunks,
/// redirects, and answers with headers of its own.
async fn upstream() -> (String, Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<String>>>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let seen_authorization = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (h1, a1) = (Arc::clone(&hits), Arc::clone(&seen_authorization));
    let app = Router::new()
        .route(
            "/base/up",
            any(move |request: Request| {
                let (hits, seen) = (Arc::clone(&h1), Arc::clone(&a1));
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    if let Some(value) = request.headers().get("authorization") {
                        seen.lock()
                            .unwrap()
                            .push(value.to_str().unwrap().to_string());
                    }
                    let mut stream = request.into_body().into_data_stream();
                    let (mut total, mut sum) = (0usize, 0u64);
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.unwrap();
                        total += chunk.len();
                        sum += chunk.iter().map(|b| *b as u64).sum::<u64>();
                    }
                    axum::Json(json!({"bytes": total, "sum": sum}))
                }
            }),
        )
        .route(
            "/base/",
            any(|request: Request| async move {
                axum::Json(json!({
                    "root": request.method().as_str(),
                    "query": request.uri().query(),
                }))
            }),
        )
        .route(
            "/base/down",
            get(|| async {
                let chunks = futures_util::stream::iter(
                    (0..128u32).map(|i| Ok::<_, std::io::Error>(vec![(i % 251) as u8; 64 * 1024])),
                );
                let mut response = Response::new(Body::from_stream(chunks));
                response
                    .headers_mut()
                    .insert("x-upstream", "yes".parse().unwrap());
                response
                    .headers_mut()
                    .insert("content-type", "application/octet-stream".parse().unwrap());
                response
            }),
        )
        .route(
            "/base/moved",
            get(|| async {
                (
                    StatusCode::FOUND,
                    [("location", "http://127.0.0.1:9/stolen")],
                    "moved",
                )
                    .into_response()
            }),
        )
        .route(
            "/base/teapot",
            get(|headers: HeaderMap| async move {
                let _ = headers;
                (
                    StatusCode::IM_A_TEAPOT,
                    [("x-provider", "teapot"), ("content-type", "text/plain")],
                    "short and stout",
                )
                    .into_response()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}/base/"), hits, seen_authorization)
}

#[tokio::test]
async fn bodies_stream_both_ways_and_answers_come_back_as_they_are() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let (base, hits, seen) = upstream().await;
    register_connector(&env, "stranger", json!({"baseUrl": base})).await;
    let created = env.create_instance(&env.org, "stranger", "streamer").await;
    let token = created["token"].as_str().unwrap();

    // 5 MiB up, in chunks, never whole in memory on our side.
    let chunks = futures_util::stream::iter(
        (0..80u32)
            .map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![(i % 7) as u8; 64 * 1024]))),
    );
    let expected_sum: u64 = (0..80u64).map(|i| (i % 7) * 64 * 1024).sum();
    let response = env
        .http
        .post(env.api("/proxy/up"))
        .header("authorization", env.org.through(token))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let counted: Value = response.json().await.unwrap();
    assert_eq!(
        counted,
        json!({"bytes": 5 * 1024 * 1024, "sum": expected_sum})
    );
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .all(|a| a.starts_with("Bearer ")),
        "{:?}",
        seen.lock().unwrap()
    );

    // `base.url` itself, with the slash after `proxy` or without (monday's whole API is
    // `POST …/v2`): it was the platform's 404.
    for path in ["/proxy/", "/proxy/?q=1", "/proxy", "/proxy?q=1"] {
        let response = env
            .http
            .post(env.api(path))
            .header("authorization", env.org.through(token))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let root: Value = response.json().await.unwrap();
        let query = path.split_once('?').map(|(_, query)| query);
        assert_eq!(root, json!({"root": "POST", "query": query}), "{path}");
    }

    // 8 MiB down, chunk by chunk.
    let response = env
        .http
        .get(env.api("/proxy/down"))
        .header("authorization", env.org.through(token))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-upstream"], "yes");
    let mut stream = response.bytes_stream();
    let (mut total, mut chunks_seen) = (0usize, 0usize);
    while let Some(chunk) = stream.next().await {
        total += chunk.unwrap().len();
        chunks_seen += 1;
    }
    assert_eq!(total, 8 * 1024 * 1024);
    assert!(chunks_seen > 1, "the download came in pieces");

    // The provider's status, headers and body as they are; a redirect is not followed.
    let (status, body, headers) = proxy_at(
        &env,
        &env.server.url,
        &env.org,
        token,
        Method::GET,
        "teapot",
    )
    .await;
    assert_eq!(status, 418);
    assert_eq!(body, "short and stout");
    assert_eq!(headers["x-provider"], "teapot");
    let before = hits.load(Ordering::SeqCst);
    let (status, _, headers) =
        proxy_at(&env, &env.server.url, &env.org, token, Method::GET, "moved").await;
    assert_eq!(status, 302);
    assert_eq!(headers["location"], "http://127.0.0.1:9/stolen");
    assert_eq!(hits.load(Ordering::SeqCst), before);
    env.stop().await;
    drop_test_database(&url).await;
}

/// Salesforce's `INVALID_SESSION_ID` array, Box's empty 401 with `WWW-Authenticate`, Microsoft
/// Graph's error object: each makes one refresh and one retry; once the user revoked the app,
/// `401 Request failed` with the provider's words. Microsoft's revocation reaches only refresh
/// tokens: the access token works until it expires.
#[tokio::test]
async fn every_rejection_shape_refreshes_and_reports_the_providers_words() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let server = env.server.url.clone();
    let cases = [
        (
            "sandbox-salesforce",
            "sf-user",
            "services/data/v59.0/sobjects",
            "INVALID_SESSION_ID",
        ),
        ("sandbox-box", "box-user", "2.0/users/me", "invalid_token"),
        (
            "sandbox-microsoft",
            "ms-user",
            "v1.0/me",
            "InvalidAuthenticationToken",
        ),
    ];
    let mut tokens = Vec::new();
    for (element, user, path, _) in cases {
        let created = env.create_instance(&env.org, element, user).await;
        let token = created["token"].as_str().unwrap().to_string();
        let (status, body, _) = proxy_at(&env, &server, &env.org, &token, Method::GET, path).await;
        assert_eq!(status, 200, "{element}: {body}");
        tokens.push(token);
    }
    expire_access_tokens(&env).await;
    for ((element, _, path, _), token) in cases.iter().zip(&tokens) {
        let before = refreshes(&env).await;
        let (status, body, _) = proxy_at(&env, &server, &env.org, token, Method::GET, path).await;
        assert_eq!(status, 200, "{element} after expiry: {body}");
        assert_eq!(refreshes(&env).await, before + 1, "{element}: one refresh");
    }
    for ((element, user, path, words), token) in cases.iter().zip(&tokens) {
        env.sandbox_post(&format!("/__sandbox/users/{user}/revoke"), json!({}))
            .await;
        if *element == "sandbox-microsoft" {
            let (status, body, _) =
                proxy_at(&env, &server, &env.org, token, Method::GET, path).await;
            assert_eq!(status, 200, "{element}: the access token lives on: {body}");
            expire_access_tokens(&env).await;
        }
        let (status, body, _) = proxy_at(&env, &server, &env.org, token, Method::GET, path).await;
        assert_eq!(status, 401, "{element} revoked: {body}");
        assert_eq!(body["message"], "Request failed", "{element}");
        assert!(
            body["providerMessage"].as_str().unwrap().contains(words),
            "{element}: {body}"
        );
        let shown = instance(&env, &server, token).await;
        assert_eq!(shown["valid"], false, "{element}: {shown}");
        assert!(
            shown["providerMessage"].as_str().unwrap().contains(words),
            "{element}: {shown}"
        );
    }
    env.stop().await;
    drop_test_database(&url).await;
}

/// A provider written by hand, as a stranger's HTTP/1.1 server would be: each connection it
/// accepts goes to `serve` with its number (from 1). It is registered as connector `key`, with
/// one instance for `user`; answers that instance's Element token and the count of connections
/// accepted so far.
async fn hand_written_provider<F, Fut>(
    env: &Env,
    key: &str,
    user: &str,
    serve: F,
) -> (String, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream, usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let connection = counter.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(serve(stream, connection));
        }
    });
    register_connector(env, key, json!({"baseUrl": format!("http://{addr}/")})).await;
    let created = env.create_instance(&env.org, key, user).await;
    (created["token"].as_str().unwrap().to_string(), accepted)
}

/// A service on SQLite whose proxy timeout is 1 s, with a sandbox of its own.
async fn env_with_a_one_second_provider_timeout(url: &str) -> Env {
    Env::start_adjusted("sqlite", url, |config| {
        config.proxy_timeout = std::time::Duration::from_secs(1);
    })
    .await
}

/// A provider that stops answering is given up: no headers within the provider timeout answer
/// 504, and an answer whose body stops coming is cut after that long without data, instead of
/// holding the caller (and a pooled connection) forever.
#[tokio::test]
async fn a_provider_that_stalls_is_given_up() {
    let url = sqlite_database();
    let env = env_with_a_one_second_provider_timeout(&url).await;
    // Answers nothing to `/silent`, and to anything else a head and 7 of 100 promised bytes.
    let (token, _) = hand_written_provider(
        &env,
        "staller",
        "patient",
        |mut stream, _connection| async move {
            let (mut seen, mut buffer) = (Vec::new(), [0u8; 4096]);
            let Some(head) = next_head(&mut stream, &mut seen, &mut buffer).await else {
                return;
            };
            if !head.starts_with("GET /silent") {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                    .await;
            }
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            drop(stream);
        },
    )
    .await;
    let token = token.as_str();

    let started = std::time::Instant::now();
    let (status, body) = env.proxy(&env.org, token, Method::GET, "silent").await;
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));

    let started = std::time::Instant::now();
    let response = env
        .http
        .get(env.api("/proxy/stalls"))
        .header("authorization", env.org.through(token))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(std::time::Duration::from_secs(10), response.bytes())
        .await
        .expect("the stalled body is cut, not awaited forever");
    assert!(body.is_err(), "a body cut short is an error: {body:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    env.stop().await;
    drop_test_database(&url).await;
}

/// A connector's own `proxy.timeoutSeconds` replaces the server's `--proxy-timeout` for its
/// calls, for the answer's head and between parts of its body: a provider that takes 2 s to
/// begin and pauses 2 s in its body is answered through a connector allowing 5 s, and given up
/// (504) through one without, behind a server-wide 1 s. Long polls (Salesforce's streaming API,
/// 110 s) needed the whole server's timeout raised.
#[tokio::test]
async fn a_connector_s_own_proxy_timeout_replaces_the_server_s() {
    let url = sqlite_database();
    let env = env_with_a_one_second_provider_timeout(&url).await;
    let (hasty, _) = hand_written_provider(&env, "hasty", "poller", |mut stream, _| async move {
        let (mut seen, mut buffer) = (Vec::new(), [0u8; 4096]);
        while next_head(&mut stream, &mut seen, &mut buffer)
            .await
            .is_some()
        {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
                .await;
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let _ = stream.write_all(b"-half").await;
        }
    })
    .await;
    let connectors = env
        .get_json(&env.api("/elements/hasty"), &env.org.platform())
        .await
        .1;
    register_connector(
        &env,
        "patient",
        json!({"baseUrl": connectors["baseUrl"], "proxy": {"timeoutSeconds": 5}}),
    )
    .await;
    let (_, shown) = env
        .get_json(&env.api("/elements/patient"), &env.org.platform())
        .await;
    assert_eq!(shown["proxy"]["timeoutSeconds"], 5, "{shown}");
    let patient = env.create_instance(&env.org, "patient", "poller").await;
    let patient = patient["token"].as_str().unwrap();

    let (status, body) = env.proxy(&env.org, &hasty, Method::GET, "poll").await;
    assert_eq!(status, 504, "{body}");
    let response = env
        .http
        .get(env.api("/proxy/poll"))
        .header("authorization", env.org.through(patient))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "first-half");
    // Out of its range: refused when written.
    for seconds in [0, 86_401] {
        let response = env
            .http
            .post(env.api("/elements"))
            .header("authorization", env.org.platform())
            .json(&json!({"key": format!("bad-{seconds}"), "name": "Bad",
                       "baseUrl": "https://api.example.com/",
                       "oauth": {"authorizationUrl": "https://example.com/a",
                                 "tokenUrl": "https://example.com/t"},
                       "proxy": {"timeoutSeconds": seconds}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("proxy.timeoutSeconds"),
            "{body}"
        );
    }
    env.stop().await;
    drop_test_database(&url).await;
}

/// Each pooled connection keeps one timer for the answer's headers and moves it forward per
/// call. A connection that sat idle past the timeout (its timer fired meanwhile) still serves
/// the next call, calls one after another keep being answered on it, and a provider that then
/// stops answering on that same connection is still given up in time.
#[tokio::test]
async fn a_pooled_connections_header_timer_serves_call_after_call() {
    let url = sqlite_database();
    let env = env_with_a_one_second_provider_timeout(&url).await;
    // Answers `/silent` never, anything else at once with the connection's number.
    let (token, accepted) = hand_written_provider(&env, "timely", "clock", |mut stream, connection| async move {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Some(head) = next_head(&mut stream, &mut seen, &mut buffer).await {
            if head.starts_with("GET /silent") {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                return;
            }
            let body = format!(r#"{{"connection":{connection}}}"#);
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let token = token.as_str();

    let (status, body) = env.proxy(&env.org, token, Method::GET, "data").await;
    assert_eq!((status, body), (200, json!({"connection": 1})));
    // Idle past the provider timeout: the connection's timer fires while it waits in the pool.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    for _ in 0..5 {
        let (status, body) = env.proxy(&env.org, token, Method::GET, "data").await;
        assert_eq!(
            (status, body),
            (200, json!({"connection": 1})),
            "the same connection, its timer moved forward"
        );
    }
    // The provider stops answering on that connection: given up after about the timeout.
    let started = std::time::Instant::now();
    let (status, body) = env.proxy(&env.org, token, Method::GET, "silent").await;
    assert_eq!(status, 504, "{body}");
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(900)
            && waited < std::time::Duration::from_secs(5),
        "given up after {waited:?}"
    );
    // That connection went with the call; the next call opens another.
    let (status, body) = env.proxy(&env.org, token, Method::GET, "data").await;
    assert_eq!((status, body), (200, json!({"connection": 2})));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    env.stop().await;
    drop_test_database(&url).await;
}

/// The proxy's hot path bypasses the router's middleware, so it keeps the contract's request
/// ids by itself: every answer carries `X-Request-Id` (the caller's well-formed one, or a new
/// one), and an error body's `requestId` is that id.
#[tokio::test]
async fn proxied_answers_carry_the_request_id() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "traced")
        .await;
    let token = created["token"].as_str().unwrap();
    let call = |path: &'static str, given: Option<&'static str>| {
        let mut request = env
            .http
            .get(env.api(&format!("/proxy/{path}")))
            .header("authorization", env.org.through(token));
        if let Some(id) = given {
            request = request.header("x-request-id", id);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let id = response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_string();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, id, body)
        }
    };
    let (status, id, _) = call("api/me", Some("trace-me-1")).await;
    assert_eq!((status, id.as_str()), (200, "trace-me-1"));
    let (status, id, _) = call("api/me", None).await;
    assert_eq!(status, 200);
    assert_eq!(id.len(), 24, "a new id: {id}");
    let (other_status, other, _) = call("api/me", None).await;
    assert_eq!(other_status, 200);
    assert_ne!(id, other, "each call its own id");
    // An error answered by the proxy itself: the body's requestId is the header's.
    let (status, id, body) = call("api%5cx", Some("bad-path-7")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(id, "bad-path-7");
    assert_eq!(body["requestId"], "bad-path-7", "{body}");
    let (status, id, body) = call("api%5cx", Some("not a valid id!")).await;
    assert_eq!(status, 400);
    assert_ne!(id, "not a valid id!", "a malformed id is replaced");
    assert_eq!(body["requestId"], id.as_str(), "{body}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// The next request head a hand-written server reads from `stream` (`seen` keeps what came
/// after it); `None` when the connection ends first.
async fn next_head(
    stream: &mut tokio::net::TcpStream,
    seen: &mut Vec<u8>,
    buffer: &mut [u8],
) -> Option<String> {
    let end = loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        match stream.read(buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buffer[..n]),
        }
    };
    let head = String::from_utf8_lossy(&seen[..end]).to_string();
    seen.drain(..end);
    Some(head)
}

/// Connections to a provider are kept and reused (one connection for calls one after another,
/// also after an answer without a body), a connection the provider closed is not used again,
/// and concurrent calls each get a connection of their own. The provider here is a stranger's
/// HTTP/1.1 server written by hand: it counts the connections it accepts and answers each
/// request with the connection's number and the request's number on it.
#[tokio::test]
async fn provider_connections_are_reused_and_closed_ones_are_not() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let (token, accepted) = hand_written_provider(&env, "keeper", "reuse", |mut stream, connection| async move {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        for request in 1.. {
            let Some(head) = next_head(&mut stream, &mut seen, &mut buffer).await else {
                return;
            };
            let body = format!(r#"{{"connection":{connection},"request":{request}}}"#);
            let answer = if head.starts_with("GET /empty") {
                "HTTP/1.1 204 No Content\r\n\r\n".to_string()
            } else if head.starts_with("HEAD ") {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            if head.starts_with("GET /hang-up") {
                // As a provider's keep-alive timeout does: closed without a word.
                return;
            }
        }
    })
    .await;
    let token = token.as_str();

    for request in 1..=4 {
        let (status, body) = env.proxy(&env.org, token, Method::GET, "data").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, json!({"connection": 1, "request": request}));
    }
    let head = env
        .http
        .head(env.api("/proxy/data"))
        .header("authorization", env.org.through(token))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let (status, _) = env.proxy(&env.org, token, Method::GET, "empty").await;
    assert_eq!(status, 204);
    let (status, body) = env.proxy(&env.org, token, Method::GET, "data").await;
    assert_eq!(
        (status, &body),
        (200, &json!({"connection": 1, "request": 7}))
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection so far");

    // The provider hangs up after an answer: the next call goes on a new connection.
    let (status, body) = env.proxy(&env.org, token, Method::GET, "hang-up").await;
    assert_eq!(
        (status, &body),
        (200, &json!({"connection": 1, "request": 8}))
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (status, body) = env.proxy(&env.org, token, Method::GET, "data").await;
    assert_eq!(
        (status, &body),
        (200, &json!({"connection": 2, "request": 1}))
    );

    // Calls at the same time: one connection each at most, every answer its own.
    let calls = (0..8).map(|_| env.proxy(&env.org, token, Method::GET, "data"));
    let answers = futures_util::future::join_all(calls).await;
    let mut pairs: Vec<(u64, u64)> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body}");
            (
                body["connection"].as_u64().unwrap(),
                body["request"].as_u64().unwrap(),
            )
        })
        .collect();
    pairs.sort();
    pairs.dedup();
    assert_eq!(pairs.len(), 8, "no answer given twice: {pairs:?}");
    assert!(accepted.load(Ordering::SeqCst) <= 2 + 8);
    env.stop().await;
    drop_test_database(&url).await;
}

/// A provider may answer before it has read the request's body (a 413 to a large upload). The
/// connection is still busy sending that body, so the next call must not wait for it: it goes
/// on another connection, and this one is pooled again once the upload is done.
#[tokio::test]
async fn a_connection_still_uploading_is_not_lent_to_the_next_call() {
    const UPLOAD: usize = 2 * 1024 * 1024;
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    // Told when the provider has written its refusal of the upload.
    let refused_sent = Arc::new(tokio::sync::Notify::new());
    let on_refusal = Arc::clone(&refused_sent);
    let (token, _) =
        hand_written_provider(&env, "refuser", "upload", move |mut stream, _connection| {
            let on_refusal = Arc::clone(&on_refusal);
            async move {
                let mut seen = Vec::new();
                let mut buffer = vec![0u8; 64 * 1024];
                loop {
                    let Some(head) = next_head(&mut stream, &mut seen, &mut buffer).await else {
                        return;
                    };
                    if head.starts_with("POST /upload") {
                        // Refused at once; the body is then read (and dropped) as it comes.
                        let refused =
                            "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 7\r\n\r\ntoo big";
                        if stream.write_all(refused.as_bytes()).await.is_err() {
                            return;
                        }
                        on_refusal.notify_one();
                        let mut left = UPLOAD - seen.len().min(UPLOAD);
                        seen.drain(..(UPLOAD - left));
                        while left > 0 {
                            match stream.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    let used = n.min(left);
                                    left -= used;
                                    seen.extend_from_slice(&buffer[used..n]);
                                }
                            }
                        }
                    } else {
                        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .await;
    let (status, _) = env.proxy(&env.org, &token, Method::GET, "warm").await;
    assert_eq!(status, 200);

    // 2 MiB in 16 pieces; after the eighth, the upload waits until the next call is answered.
    // Lent the uploading connection, the next call would wait for the upload's end: never.
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let opens = gate.clone();
    let pieces = futures_util::stream::iter(0..16).then(move |piece| {
        let gate = gate.clone();
        async move {
            if piece == 8 {
                gate.notified().await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            Ok::<_, std::io::Error>(vec![7u8; UPLOAD / 16])
        }
    });
    let upload = env
        .http
        .post(env.api("/proxy/upload"))
        .header("authorization", env.org.through(&token))
        .header("content-length", UPLOAD.to_string())
        .body(reqwest::Body::wrap_stream(pieces))
        .send();
    let uploading = tokio::spawn(upload);
    // Once the refusal is back at the proxy (sooner, the connection would simply be busy, and
    // nothing tested), the next call.
    tokio::time::timeout(std::time::Duration::from_secs(15), refused_sent.notified())
        .await
        .expect("the provider refused the upload");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let next = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        env.proxy(&env.org, &token, Method::GET, "next"),
    )
    .await
    .expect("the next call waited for someone else's upload");
    assert_eq!(next, (200, json!("ok")));
    opens.notify_one();
    let refused = uploading.await.unwrap().unwrap();
    assert_eq!(refused.status(), 413);
    env.stop().await;
    drop_test_database(&url).await;
}

/// An upload that takes longer than the provider timeout goes through: the wait for the
/// answer's headers is counted from the upload's last chunk, not from the call's start (a 1 s
/// timeout here, against an upload of 3 s; it answered 504 partway through).
#[tokio::test]
async fn a_slow_upload_is_not_cut_by_the_provider_timeout() {
    let url = sqlite_database();
    let sandbox = tokenwarden_sandbox::spawn(crate::harness::loopback(), Default::default())
        .await
        .unwrap();
    let env = Env::start_with_sandbox("sqlite", &url, sandbox, |config| {
        config.proxy_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let (base, _, _) = upstream().await;
    register_connector(&env, "slow-upload", json!({"baseUrl": base})).await;
    let created = env
        .create_instance(&env.org, "slow-upload", "uploader")
        .await;
    let token = created["token"].as_str().unwrap();
    // 24 chunks of 128 KiB, 150 ms apart: 1 MiB is read first, the rest streams for 2 s.
    let chunks = futures_util::stream::iter(0..24u32).then(|i| async move {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![(i % 5) as u8; 128 * 1024]))
    });
    let expected_sum: u64 = (0..24u64).map(|i| (i % 5) * 128 * 1024).sum();
    let response = env
        .http
        .post(env.api("/proxy/up"))
        .header("authorization", env.org.through(token))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let counted: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        counted,
        json!({"bytes": 24 * 128 * 1024, "sum": expected_sum})
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A provider that closes a kept-alive connection as the next request arrives on it (its
/// keep-alive timeout ran out then): a GET goes once more on a new connection and succeeds
/// (the caller got a 502); a POST is never sent twice and gets the 502.
#[tokio::test]
async fn a_pooled_connection_closed_under_a_request_is_retried_only_when_idempotent() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                // Each connection answers its first request and closes on the second.
                for nth in 0.. {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    if nth > 0 {
                        return;
                    }
                    let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    register_connector(
        &env,
        "closing",
        json!({"baseUrl": format!("http://{addr}/")}),
    )
    .await;
    let created = env.create_instance(&env.org, "closing", "closer").await;
    let token = created["token"].as_str().unwrap();
    let call = |method: Method| {
        env.http
            .request(method, env.api("/proxy/thing"))
            .header("authorization", env.org.through(token))
            .send()
    };
    // The first GET opens a connection; the second finds it pooled, and the provider closes it.
    for n in 0..2 {
        let response = call(Method::GET).await.unwrap();
        let status = response.status();
        assert_eq!(status, 200, "GET {n}: {}", response.text().await.unwrap());
    }
    assert_eq!(
        requests.load(Ordering::SeqCst),
        3,
        "the second GET went twice"
    );
    let response = call(Method::POST).await.unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(requests.load(Ordering::SeqCst), 4, "the POST went once");
    env.stop().await;
    drop_test_database(&url).await;
}

/// An answer with both `Transfer-Encoding: chunked` and a `Content-Length` (a misconfigured
/// compression layer sends them) is the chunked body, whole: the length is not passed on
/// (RFC 9112 §6.3). Passed on, it cut the body at the length given, or broke the answer off
/// when the length was longer.
#[tokio::test]
async fn a_length_beside_chunked_coding_does_not_cut_the_answer() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let (token, _) = hand_written_provider(&env, "both", "lengths", |mut stream, _| async move {
        let (mut seen, mut buffer) = (Vec::new(), [0u8; 4096]);
        while let Some(head) = next_head(&mut stream, &mut seen, &mut buffer).await {
            let length = if head.starts_with("GET /longer") {
                50
            } else {
                3
            };
            let body = r#"{"whole":true}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            );
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    for path in ["shorter", "longer"] {
        let (status, body) = env.proxy(&env.org, &token, Method::GET, path).await;
        assert_eq!((status, &body), (200, &json!({"whole": true})), "{path}");
    }
    env.stop().await;
    drop_test_database(&url).await;
}

/// An answer the proxy cannot read (here more header lines than it takes), or none after the
/// request went out, is a 502 that says the request reached the provider (or may have), not
/// that the provider could not be reached: a POST may have been acted on.
#[tokio::test]
async fn an_unreadable_answer_says_the_request_reached_the_provider() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let (token, _) =
        hand_written_provider(&env, "verbose", "headers", |mut stream, _| async move {
            let (mut seen, mut buffer) = (Vec::new(), [0u8; 4096]);
            while next_head(&mut stream, &mut seen, &mut buffer)
                .await
                .is_some()
            {
                let mut answer = String::from("HTTP/1.1 200 OK\r\n");
                for n in 0..120 {
                    answer.push_str(&format!("X-Header-{n}: {n}\r\n"));
                }
                answer.push_str("Content-Length: 2\r\n\r\n{}");
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        })
        .await;
    let (status, body) = env.proxy(&env.org, &token, Method::POST, "data").await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("could not be read"),
        "{body}"
    );

    // A provider that takes the request and hangs up without an answer may have acted on it:
    // the 502 said it "could not be reached", and a caller trusting that sent the POST again.
    let (token, _) = hand_written_provider(&env, "hang-up", "silent", |mut stream, _| async move {
        let (mut seen, mut buffer) = (Vec::new(), [0u8; 4096]);
        let _ = next_head(&mut stream, &mut seen, &mut buffer).await;
    })
    .await;
    let (status, body) = env.proxy(&env.org, &token, Method::POST, "data").await;
    assert_eq!(status, 502, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("may have reached"), "{body}");
    assert!(!message.contains("could not be reached"), "{body}");

    // A 101 cannot pass (its headers are hop-by-hop, the connection is not handed over): the
    // caller got a bare 101 and a closed connection.
    let (token, _) = hand_written_provider(&env, "upgrades", "ws", |mut stream, _| async move {
        let (mut seen, mut buffer) = (Vec::new(), [0u8; 4096]);
        if next_head(&mut stream, &mut seen, &mut buffer).await.is_some() {
            let _ = stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                .await;
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
    })
    .await;
    let (status, body) = env.proxy(&env.org, &token, Method::GET, "socket").await;
    assert_eq!(status, 502, "{body}");
    assert!(body["message"].as_str().unwrap().contains("101"), "{body}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// The provider's own `X-Request-Id` (what its support asks for) reaches the caller as
/// `X-Provider-Request-Id`, beside the service's `X-Request-Id`: ours replaced it.
#[tokio::test]
async fn the_providers_request_id_is_kept_beside_ours() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let (token, _) = hand_written_provider(&env, "traced", "ids", |mut stream, _| async move {
        let (mut seen, mut buffer) = (Vec::new(), [0u8; 4096]);
        while next_head(&mut stream, &mut seen, &mut buffer).await.is_some() {
            let answer = "HTTP/1.1 200 OK\r\nX-Request-Id: prov-abc\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let response = env
        .http
        .get(env.api("/proxy/data"))
        .header("authorization", env.org.through(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-provider-request-id"], "prov-abc");
    assert_ne!(response.headers()["x-request-id"], "prov-abc");
    env.stop().await;
    drop_test_database(&url).await;
}

/// A body too large to keep for the retry after a refresh (over 1 MiB) is sent once only: on
/// a connector that refreshes on a 401 alone, a token known to have expired is refreshed
/// before it goes. It went with the expired token, and the caller got the provider's 401
/// although a refresh followed.
#[tokio::test]
async fn a_body_too_large_to_resend_does_not_go_with_an_expired_token() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    env.sandbox_put(
        "/__sandbox/profiles/generic",
        json!({"accessTokenTtlSeconds": 1}),
    )
    .await;
    register_connector(
        &env,
        "upload-on-401",
        json!({"refresh": {"strategy": "on_401"}}),
    )
    .await;
    let created = env
        .create_instance(&env.org, "upload-on-401", "uploader")
        .await;
    let token = created["token"].as_str().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let before = refreshes(&env).await;
    let chunks = futures_util::stream::iter(
        (0..32).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 64 * 1024]))),
    );
    let response = env
        .http
        .put(env.api("/proxy/api/echo"))
        .header("authorization", env.org.through(token))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    // The echo took the token, then refused a body over its 1 MiB.
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 413, "{body}");
    assert_eq!(refreshes(&env).await, before + 1);
    // A small body still goes with the token as it is (the connector's choice): the 401 it
    // gets is answered by a refresh and a retry.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let (status, body) = env.proxy(&env.org, token, Method::POST, "api/echo").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(refreshes(&env).await, before + 2);
    env.stop().await;
    drop_test_database(&url).await;
}

/// A body too large to keep, rejected by the provider with a token the service thought good
/// (the provider's clock ran ahead): the refresh happens, the call is not sent again, and the
/// provider's 401 comes back saying so (`X-Tokenwarden-Token-Refreshed`), which a caller
/// could not tell from a grant that does not allow the call. Sent again, it goes with the new
/// token.
#[tokio::test]
async fn a_rejected_upload_too_large_to_resend_says_the_token_was_refreshed() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "uploader")
        .await;
    let token = created["token"].as_str().unwrap();
    env.sandbox_post("/__sandbox/clock", json!({"advanceSeconds": 7_200}))
        .await;
    let before = refreshes(&env).await;
    let upload = || {
        let chunks = futures_util::stream::iter(
            (0..32).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 64 * 1024]))),
        );
        env.http
            .put(env.api("/proxy/api/echo"))
            .header("authorization", env.org.through(token))
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
    };
    let rejected = upload().await.unwrap();
    assert_eq!(rejected.status(), 401);
    assert_eq!(
        rejected.headers()["x-tokenwarden-token-refreshed"],
        "true",
        "{:?}",
        rejected.headers()
    );
    assert_eq!(refreshes(&env).await, before + 1);
    // Sent again: the new token is taken (the echo then refuses a body over its 1 MiB).
    let again = upload().await.unwrap();
    assert_eq!(again.status(), 413);
    assert!(
        again
            .headers()
            .get("x-tokenwarden-token-refreshed")
            .is_none()
    );
    assert_eq!(refreshes(&env).await, before + 1);
    env.stop().await;
    drop_test_database(&url).await;
}

/// The proxy as an HTTP/1.1 citizen towards its caller, whatever the provider speaks:
/// - an HTTP/1.0 answer delimited by the connection's close comes back as HTTP/1.1, and the
///   caller's connection stays open for its next request (it was answered `HTTP/1.0` and
///   closed, losing a pipelined request);
/// - `CONNECT` is refused with 405 and `Allow`, and never reaches the provider (it was sent
///   there, with the token, and a 2xx left the caller with nothing); so is `TRACE`, whose
///   answer echoes the token the proxy put in;
/// - an encoded slash may stand next to another or end a segment (Search Console's
///   `sites/https%3A%2F%2Fexample.com%2F`, Cloud Storage's `folder%2F` objects): passed on as
///   sent (it was refused with 400).
#[tokio::test]
async fn the_caller_gets_http_1_1_whatever_the_provider_speaks() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen_lines = Arc::clone(&lines);
    let (token, _) = hand_written_provider(&env, "old-timer", "nostalgic", move |mut stream, _| {
        let lines = Arc::clone(&seen_lines);
        async move {
            let (mut seen, mut buffer) = (Vec::new(), [0u8; 4096]);
            let Some(head) = next_head(&mut stream, &mut seen, &mut buffer).await else {
                return;
            };
            let line = head.lines().next().unwrap_or_default().to_string();
            lines.lock().unwrap().push(line.clone());
            let body = format!("{{\"line\": {:?}}}", line);
            let _ = stream
                .write_all(
                    format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}")
                        .as_bytes(),
                )
                .await;
            // The body ends with the connection.
        }
    })
    .await;
    let authorization = env.org.through(&token);
    let addr = env.server.addr;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let path = "/elements/api-v2/proxy/webmasters/v3/sites/https%3A%2F%2Fwww.example.com%2F/query";
    let gcs = "/elements/api-v2/proxy/o/photos%2F";
    // Two requests at once on one connection: both answered, in order, in HTTP/1.1.
    let requests = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {authorization}\r\n\r\n\
         GET {gcs} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(requests.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("both answered")
    .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(!text.contains("HTTP/1.0"), "{text}");
    assert_eq!(
        *lines.lock().unwrap(),
        [
            "GET /webmasters/v3/sites/https%3A%2F%2Fwww.example.com%2F/query HTTP/1.1",
            "GET /o/photos%2F HTTP/1.1"
        ],
        "passed on as sent"
    );

    // CONNECT and TRACE (which echoes the token the proxy put in): refused here.
    for method in ["CONNECT", "TRACE", "trace", "Connect"] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "{method} /elements/api-v2/proxy/echo HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(text.starts_with("http/1.1 405"), "{text}");
        assert!(text.contains("\r\nallow: get, "), "{text}");
        assert!(
            text.contains(&format!("{} is not proxied", method.to_lowercase())),
            "{text}"
        );
    }
    assert_eq!(lines.lock().unwrap().len(), 2, "the provider heard of it");
    env.stop().await;
    drop_test_database(&url).await;
}

/// An API that takes its token in a header of its own (Shopify's `X-Shopify-Access-Token`,
/// `proxy.tokenHeader`), or under another scheme (`proxy.tokenScheme`): the token goes there,
/// and the caller's `Authorization` (its secrets) goes nowhere; a verification call carries it
/// the same way. A header the proxy frames the message with is refused as the token's.
#[tokio::test]
async fn the_token_goes_in_the_header_the_connector_names() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let seen: Arc<std::sync::Mutex<Vec<HeaderMap>>> = Arc::default();
    let recorded = Arc::clone(&seen);
    let app = Router::new().route(
        "/api/{*rest}",
        any(move |headers: HeaderMap| {
            let recorded = Arc::clone(&recorded);
            async move {
                recorded.lock().unwrap().push(headers);
                axum::Json(json!({"ok": true}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let base = format!("http://{addr}/api/");
    for (key, proxy, header, prefix) in [
        (
            "shop-like",
            json!({"tokenHeader": "X-Shopify-Access-Token"}),
            "x-shopify-access-token",
            "",
        ),
        (
            "yandex-like",
            json!({"tokenScheme": "OAuth"}),
            "authorization",
            "OAuth ",
        ),
    ] {
        register_connector(
            &env,
            key,
            json!({"baseUrl": base, "proxy": proxy, "verify": {"path": "me"}}),
        )
        .await;
        let created = env.create_instance(&env.org, key, "header-user").await;
        let token = created["token"].as_str().unwrap();
        let access = crate::instances::revealed(&env, &env.org, &created).await["configuration"]
            ["oauth.user.token"]
            .as_str()
            .unwrap()
            .to_string();
        let (status, body, _) = proxy_at(
            &env,
            &env.server.url,
            &env.org,
            token,
            Method::GET,
            "things",
        )
        .await;
        assert_eq!(status, 200, "{key}: {body}");
        let calls = std::mem::take(&mut *seen.lock().unwrap());
        // The verification call at the create, then the proxied one.
        assert_eq!(calls.len(), 2, "{key}");
        for headers in &calls {
            assert_eq!(
                headers[header].to_str().unwrap(),
                format!("{prefix}{access}"),
                "{key}: {headers:?}"
            );
            if header != "authorization" {
                assert!(!headers.contains_key("authorization"), "{key}: {headers:?}");
            }
        }
    }
    let response = env
        .http
        .post(env.api("/elements"))
        .header("authorization", env.org.platform())
        .json(&json!({"key": "framed", "name": "Framed", "baseUrl": base,
            "oauth": {"authorizationUrl": format!("{base}authorize"), "tokenUrl": format!("{base}token")},
            "proxy": {"tokenHeader": "Content-Length"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("tokenHeader"),
        "{body}"
    );
    env.stop().await;
    drop_test_database(&url).await;
}
