//! tw-loadgen: the bench's helper binary. Every command talks only to loopback URLs it is given.
//!
//! - `upstream ADDR`                         minimal hyper server: any request -> small JSON body
//!                                           (a path ending in `/big`: 1 MiB)
//! - `minproxy ADDR UPSTREAM_PORT`          the reference: the least a Rust proxy can do (hyper
//!                                           server and pooled client, one thread, a static
//!                                           `Authorization` added); prints its port
//! - `bareproxy ADDR UPSTREAM_PORT`         a bare hyper proxy: the same, with a plain list of
//!                                           idle connections instead of hyper-util's pool (as
//!                                           tokenwarden's own pool); prints its port
//! - `rawproxy ADDR UPSTREAM_PORT`          the least any proxy can do: no hyper, httparse on both
//!                                           sides, GET only, one thread; prints its port
//! - `burst URL N [HEADER: VALUE]...`        N connections opened first, then N GETs at once;
//!                                           prints JSON {wallMs, statuses, p50Ms, p99Ms, maxMs}
//! - `create API AUTH ELEMENT COUNT CONC CALLBACK`
//!                                           creates COUNT instances through the OAuth flow
//!                                           (sandbox login_hint); prints "id token" lines
//! - `refresh API AUTH IDSFILE CONC SECONDS [TIMEOUT_MS]`
//!                                           POST /instances/{id}/tokens/refresh round-robin for
//!                                           SECONDS; prints JSON {requests, seconds, statuses}
//! - `watch SANDBOX DELTA TIMEOUT_S [BASE]`   polls /__sandbox/stats token.refresh_token until it
//!                                           grew by DELTA over BASE (default: the count at
//!                                           start); prints JSON {delta, firstMs, lastMs}

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map(String::as_str).unwrap_or("");
    let result = match command {
        // The upstream is deliberately single-threaded, the same for every path measured.
        "upstream" => current_thread().block_on(upstream(&args[1])),
        "burst" => multi_thread().block_on(burst(&args[1..])),
        "minproxy" => current_thread().block_on(minproxy(&args[1..])),
        "bareproxy" => current_thread().block_on(bareproxy(&args[1..])),
        "rawproxy" => current_thread().block_on(rawproxy(&args[1..])),
        "create" => multi_thread().block_on(create(&args[1..])),
        "refresh" => multi_thread().block_on(refresh(&args[1..])),
        "watch" => current_thread().block_on(watch(&args[1..])),
        _ => Err(format!(
            "unknown command {command:?}; see the source header"
        )),
    };
    if let Err(message) = result {
        eprintln!("tw-loadgen {command}: {message}");
        std::process::exit(1);
    }
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn arg<T: std::str::FromStr>(args: &[String], index: usize, name: &str) -> Result<T, String> {
    args.get(index)
        .ok_or(format!("missing {name}"))?
        .parse()
        .map_err(|_| format!("bad {name}"))
}

const BODY: &[u8] = br#"{"id":"bench","ok":true,"items":[1,2,3],"name":"a small JSON body"}"#;

/// Binds `addr`, prints the port, and serves each connection it accepts with hyper's HTTP/1.1
/// server and a service from `service()`.
async fn serve<S>(addr: &str, service: impl Fn() -> S) -> Result<(), String>
where
    S: hyper::service::HttpService<hyper::body::Incoming> + Send + 'static,
    S::Future: Send,
    S::ResBody: Send + 'static,
    <S::ResBody as http_body::Body>::Data: Send,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| e.to_string())?;
    println!("{}", listener.local_addr().unwrap().port());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service());
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

async fn upstream(addr: &str) -> Result<(), String> {
    serve(addr, || {
        hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
            // `/big`: a 1 MiB answer, for what a large body costs a proxy.
            let body = if request.uri().path().ends_with("/big") {
                static BIG: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
                BIG.get_or_init(|| Bytes::from(vec![b'x'; 1 << 20])).clone()
            } else {
                Bytes::from_static(BODY)
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .unwrap(),
            )
        })
    })
    .await
}

/// The least a Rust proxy does: the same stack as tokenwarden's (hyper server, hyper-util's
/// pooled client) with nothing else: no authentication, no lookup, no checks.
async fn minproxy(args: &[String]) -> Result<(), String> {
    let addr: String = arg(args, 0, "ADDR")?;
    let upstream_port: u16 = arg(args, 1, "UPSTREAM_PORT")?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, hyper::body::Incoming> =
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build(connector);
    serve(&addr, move || {
        let client = client.clone();
        hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let client = client.clone();
            async move {
                let (mut parts, body) = request.into_parts();
                let path = parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/");
                parts.uri = format!("http://127.0.0.1:{upstream_port}{path}")
                    .parse()
                    .unwrap();
                parts.headers.remove("host");
                parts.headers.insert(
                    "authorization",
                    hyper::header::HeaderValue::from_static("Bearer bench-static-token"),
                );
                let answer = client.request(Request::from_parts(parts, body)).await;
                Ok::<_, Infallible>(match answer {
                    Ok(response) => response.map(|b| b.boxed()),
                    Err(_) => Response::builder()
                        .status(502)
                        .body(Empty::new().map_err(|never| match never {}).boxed())
                        .unwrap(),
                })
            }
        })
    })
    .await
}

/// An idle upstream connection, and the pool of them.
type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;
type IdleConnections = Arc<std::sync::Mutex<Vec<Sender>>>;

/// An answer's body that puts its connection back in the pool once it has ended.
struct GiveBack {
    body: hyper::body::Incoming,
    sender: Option<Sender>,
    idle: IdleConnections,
}

impl GiveBack {
    fn give_back_if_ended(&mut self) {
        if http_body::Body::is_end_stream(&self.body)
            && let Some(sender) = self.sender.take()
        {
            self.idle.lock().unwrap().push(sender);
        }
    }
}

impl http_body::Body for GiveBack {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        self.give_back_if_ended();
        polled
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.body)
    }
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        self.give_back_if_ended();
    }
}

/// A bare hyper proxy: hyper's server and HTTP/1.1 client connections with a plain list of
/// idle ones, one thread, a static `Authorization` added, GET only. It shows what the stack
/// costs without hyper-util's pool, as tokenwarden's own pool does without it.
async fn bareproxy(args: &[String]) -> Result<(), String> {
    let addr: String = arg(args, 0, "ADDR")?;
    let upstream_port: u16 = arg(args, 1, "UPSTREAM_PORT")?;
    let idle: IdleConnections = Arc::default();
    serve(&addr, move || {
        let idle = idle.clone();
        hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let idle = idle.clone();
            async move {
                let (mut parts, _body) = request.into_parts();
                parts.uri = hyper::Uri::from(parts.uri.path_and_query().cloned().unwrap());
                parts
                    .headers
                    .insert("host", hyper::header::HeaderValue::from_static("127.0.0.1"));
                parts.headers.insert(
                    "authorization",
                    hyper::header::HeaderValue::from_static("Bearer bench-static-token"),
                );
                let pooled = idle.lock().unwrap().pop();
                let mut sender = match pooled {
                    Some(sender) => sender,
                    None => {
                        let stream = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port))
                            .await
                            .map_err(|e| e.to_string())?;
                        let _ = stream.set_nodelay(true);
                        let (sender, connection) =
                            hyper::client::conn::http1::handshake(TokioIo::new(stream))
                                .await
                                .map_err(|e| e.to_string())?;
                        tokio::spawn(connection);
                        sender
                    }
                };
                let answer = sender
                    .send_request(Request::from_parts(parts, Empty::new()))
                    .await;
                Ok::<_, String>(match answer {
                    Ok(response) => response.map(|body| {
                        GiveBack {
                            body,
                            sender: Some(sender),
                            idle,
                        }
                        .boxed()
                    }),
                    Err(_) => Response::builder()
                        .status(502)
                        .body(Empty::new().map_err(|never| match never {}).boxed())
                        .unwrap(),
                })
            }
        })
    })
    .await
}

/// The least any proxy can do, without hyper: httparse on both sides, one task per caller
/// connection doing both hops, a plain list of idle upstream connections, the answer's head
/// and body written in one `write`. GET without a body only; the upstream must answer with a
/// `Content-Length`. Not a product: it shows where this machine's ceiling is for a proxy on
/// one thread (session 17: 18 % less CPU per call than nginx, and still level with it in req/s).
async fn rawproxy(args: &[String]) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: String = arg(args, 0, "ADDR")?;
    let upstream_port: u16 = arg(args, 1, "UPSTREAM_PORT")?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| e.to_string())?;
    println!("{}", listener.local_addr().unwrap().port());
    type Idle = std::rc::Rc<std::cell::RefCell<Vec<(tokio::net::TcpStream, Vec<u8>)>>>;
    let idle: Idle = Default::default();
    // Reads more into `buf` (growing it when full); false at the end of the stream.
    async fn more(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
        if buf.len() == buf.capacity() {
            buf.reserve(8192);
        }
        matches!(stream.read_buf(buf).await, Ok(n) if n > 0)
    }
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            loop {
                let Ok((mut caller, _)) = listener.accept().await else {
                    continue;
                };
                let _ = caller.set_nodelay(true);
                let idle = idle.clone();
                tokio::task::spawn_local(async move {
                    let mut buf: Vec<u8> = Vec::with_capacity(8192);
                    let mut out: Vec<u8> = Vec::with_capacity(8192);
                    loop {
                        // The caller's request head, rewritten for the upstream into `out`.
                        let head_len = loop {
                            let mut headers = [httparse::EMPTY_HEADER; 64];
                            let mut request = httparse::Request::new(&mut headers);
                            match request.parse(&buf) {
                                Ok(httparse::Status::Complete(n)) => {
                                    out.clear();
                                    out.extend_from_slice(request.method.unwrap_or("GET").as_bytes());
                                    out.push(b' ');
                                    out.extend_from_slice(request.path.unwrap_or("/").as_bytes());
                                    out.extend_from_slice(b" HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer bench-static-token\r\n");
                                    for h in request.headers.iter() {
                                        if ["host", "authorization", "connection"]
                                            .iter()
                                            .any(|name| h.name.eq_ignore_ascii_case(name))
                                        {
                                            continue;
                                        }
                                        out.extend_from_slice(h.name.as_bytes());
                                        out.extend_from_slice(b": ");
                                        out.extend_from_slice(h.value);
                                        out.extend_from_slice(b"\r\n");
                                    }
                                    out.extend_from_slice(b"\r\n");
                                    break n;
                                }
                                Ok(httparse::Status::Partial) => {}
                                Err(_) => return,
                            }
                            if !more(&mut caller, &mut buf).await {
                                return;
                            }
                        };
                        buf.drain(..head_len);
                        let pooled = idle.borrow_mut().pop();
                        let (mut upstream, mut answer) = match pooled {
                            Some(connection) => connection,
                            None => {
                                let Ok(stream) =
                                    tokio::net::TcpStream::connect(("127.0.0.1", upstream_port))
                                        .await
                                else {
                                    return;
                                };
                                let _ = stream.set_nodelay(true);
                                (stream, Vec::with_capacity(8192))
                            }
                        };
                        if upstream.write_all(&out).await.is_err() {
                            return;
                        }
                        // The answer's head, then its body by its length.
                        let whole = loop {
                            let mut headers = [httparse::EMPTY_HEADER; 64];
                            let mut response = httparse::Response::new(&mut headers);
                            match response.parse(&answer) {
                                Ok(httparse::Status::Complete(n)) => {
                                    let length = response
                                        .headers
                                        .iter()
                                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok());
                                    let Some(length) = length else { return };
                                    break n + length;
                                }
                                Ok(httparse::Status::Partial) => {}
                                Err(_) => return,
                            }
                            if !more(&mut upstream, &mut answer).await {
                                return;
                            }
                        };
                        while answer.len() < whole {
                            if !more(&mut upstream, &mut answer).await {
                                return;
                            }
                        }
                        if caller.write_all(&answer[..whole]).await.is_err() {
                            return;
                        }
                        answer.drain(..whole);
                        idle.borrow_mut().push((upstream, answer));
                    }
                });
            }
        })
        .await;
    Ok(())
}

fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs".to_string())?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok((authority.to_string(), path.to_string()))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

async fn burst(args: &[String]) -> Result<(), String> {
    let url = args.first().ok_or("missing URL")?.clone();
    let n: usize = arg(args, 1, "N")?;
    let headers: Vec<(String, String)> = args[2..]
        .iter()
        .filter_map(|h| h.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let (authority, path) = split_url(&url)?;
    // Open every connection first, so the burst measures the service, not TCP accept.
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        senders.push(sender);
    }
    let start_gate = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for mut sender in senders {
        let gate = Arc::clone(&start_gate);
        let mut builder = Request::get(path.as_str()).header("host", authority.as_str());
        for (k, v) in &headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let request = builder.body(Empty::<Bytes>::new()).unwrap();
        tasks.push(tokio::spawn(async move {
            let _ = sender.ready().await;
            gate.wait().await;
            let began = Instant::now();
            let status = match sender.send_request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let _ = response.into_body().collect().await;
                    status
                }
                Err(_) => 0,
            };
            (status, began.elapsed())
        }));
    }
    start_gate.wait().await;
    let began = Instant::now();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(n);
    for task in tasks {
        let (status, elapsed) = task.await.map_err(|e| e.to_string())?;
        *statuses.entry(status.to_string()).or_default() += 1;
        latencies.push(elapsed.as_secs_f64() * 1000.0);
    }
    let wall = began.elapsed().as_secs_f64() * 1000.0;
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{}",
        json!({"wallMs": wall, "statuses": statuses, "p50Ms": percentile(&latencies, 0.5),
               "p99Ms": percentile(&latencies, 0.99), "maxMs": percentile(&latencies, 1.0)})
    );
    Ok(())
}

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

async fn send(
    client: &HttpClient,
    method: &str,
    url: &str,
    auth: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
    let mut builder = Request::builder().method(method).uri(url);
    if let Some(auth) = auth {
        builder = builder.header("authorization", auth);
    }
    let bytes = match body {
        Some(body) => {
            builder = builder.header("content-type", "application/json");
            Bytes::from(body.to_string())
        }
        None => Bytes::new(),
    };
    let response = client
        .request(builder.body(Full::new(bytes)).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, body))
}

fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&value[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn create_one(
    client: &HttpClient,
    api: &str,
    auth: &str,
    element: &str,
    callback: &str,
    user: &str,
) -> Result<(i64, String), String> {
    let url = format!(
        "{api}/elements/{element}/oauth/url?apiKey=bench-client&apiSecret=bench-secret&callbackUrl={}",
        percent_encode(callback)
    );
    let (status, _, body) = send(client, "GET", &url, Some(auth), None).await?;
    if status != 200 {
        return Err(format!(
            "oauth/url {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let answer: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let oauth_url = answer["oauthUrl"].as_str().ok_or("no oauthUrl")?;
    let (status, headers, _) = send(
        client,
        "GET",
        &format!("{oauth_url}&login_hint={user}"),
        None,
        None,
    )
    .await?;
    let location = headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or(format!("approval answered {status} without a location"))?;
    let code = query_param(location, "code").ok_or("no code")?;
    let state = query_param(location, "state").ok_or("no state")?;
    let body = json!({"element": {"key": element}, "providerData": {"code": code, "state": state},
        "configuration": {"oauth.api.key": "bench-client", "oauth.api.secret": "bench-secret",
                          "oauth.callback.url": callback},
        "name": format!("bench {user}"), "tags": ["bench"]});
    let (status, _, answer) = send(
        client,
        "POST",
        &format!("{api}/instances"),
        Some(auth),
        Some(&body),
    )
    .await?;
    if status != 200 {
        return Err(format!(
            "POST /instances {status}: {}",
            String::from_utf8_lossy(&answer)
        ));
    }
    let answer: Value = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
    Ok((
        answer["id"].as_i64().ok_or("no id")?,
        answer["token"].as_str().ok_or("no token")?.to_string(),
    ))
}

async fn create(args: &[String]) -> Result<(), String> {
    let api: String = arg(args, 0, "API")?;
    let auth: String = arg(args, 1, "AUTH")?;
    let element: String = arg(args, 2, "ELEMENT")?;
    let count: usize = arg(args, 3, "COUNT")?;
    let concurrency: usize = arg(args, 4, "CONC")?;
    let callback: String = arg(args, 5, "CALLBACK")?;
    let client = client();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, next) = (client.clone(), Arc::clone(&next));
        let (api, auth, element, callback) =
            (api.clone(), auth.clone(), element.clone(), callback.clone());
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, String>(made);
                }
                let user = format!("bench{i}");
                made.push(create_one(&client, &api, &auth, &element, &callback, &user).await?);
            }
        }));
    }
    for task in tasks {
        for (id, token) in task.await.map_err(|e| e.to_string())?? {
            println!("{id} {token}");
        }
    }
    Ok(())
}

async fn refresh(args: &[String]) -> Result<(), String> {
    let api: String = arg(args, 0, "API")?;
    let auth: String = arg(args, 1, "AUTH")?;
    let file: String = arg(args, 2, "IDSFILE")?;
    let concurrency: usize = arg(args, 3, "CONC")?;
    let seconds: f64 = arg(args, 4, "SECONDS")?;
    // Optional: give up on a request after this many ms (chaos: a refresh waiting on a lease
    // held by a killed process would otherwise hold its worker for the whole lease).
    let give_up = match args.get(5) {
        Some(ms) => Some(Duration::from_millis(
            ms.parse().map_err(|_| "bad TIMEOUT_MS")?,
        )),
        None => None,
    };
    let ids: Vec<String> = std::fs::read_to_string(&file)
        .map_err(|e| format!("{file}: {e}"))?
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect();
    if ids.is_empty() {
        return Err("no ids".into());
    }
    let ids = Arc::new(ids);
    let client = client();
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let began = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, next, ids) = (client.clone(), Arc::clone(&next), Arc::clone(&ids));
        let (api, auth) = (api.clone(), auth.clone());
        tasks.push(tokio::spawn(async move {
            let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed) % ids.len();
                let url = format!("{api}/instances/{}/tokens/refresh", ids[i]);
                let sent = send(&client, "POST", &url, Some(&auth), None);
                let answer = match give_up {
                    Some(limit) => match tokio::time::timeout(limit, sent).await {
                        Ok(answer) => answer,
                        Err(_) => {
                            *statuses.entry("timeout".to_string()).or_default() += 1;
                            continue;
                        }
                    },
                    None => sent.await,
                };
                let status = match answer {
                    Ok((status, _, _)) => status,
                    Err(_) => {
                        // The service is down (chaos): do not spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        0
                    }
                };
                *statuses.entry(status.to_string()).or_default() += 1;
            }
            statuses
        }));
    }
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks {
        for (k, v) in task.await.map_err(|e| e.to_string())? {
            *statuses.entry(k).or_default() += v;
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"requests": statuses.values().sum::<usize>(), "seconds": elapsed, "statuses": statuses})
    );
    Ok(())
}

async fn refresh_count(client: &HttpClient, sandbox: &str) -> Result<i64, String> {
    let (_, _, body) = send(
        client,
        "GET",
        &format!("{sandbox}/__sandbox/stats"),
        None,
        None,
    )
    .await?;
    let stats: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    Ok(stats["token"]["refresh_token"].as_i64().unwrap_or(0))
}

async fn watch(args: &[String]) -> Result<(), String> {
    let sandbox: String = arg(args, 0, "SANDBOX")?;
    let delta: i64 = arg(args, 1, "DELTA")?;
    let timeout: f64 = arg(args, 2, "TIMEOUT_S")?;
    let client = client();
    // The count to measure from: given (taken before the work was started), or now.
    let base = match args.get(3) {
        Some(base) => base.parse().map_err(|_| "bad BASE".to_string())?,
        None => refresh_count(&client, &sandbox).await?,
    };
    let began = Instant::now();
    let mut first: Option<f64> = None;
    let mut last = 0.0;
    let mut seen = 0;
    while began.elapsed().as_secs_f64() < timeout {
        let now = refresh_count(&client, &sandbox).await? - base;
        let t = began.elapsed().as_secs_f64() * 1000.0;
        if now > 0 && first.is_none() {
            first = Some(t);
        }
        if now > seen {
            seen = now;
            last = t;
        }
        if seen >= delta {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "{}",
        json!({"delta": seen, "firstMs": first, "lastMs": last, "timedOut": seen < delta})
    );
    Ok(())
}
