//! Findings of the security review, each pinned by a test: who may create instances, per-
//! organization OAuth states, connectors in use, the contract's keep-alive shape, a wrong
//! `Organization` part on the proxy.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{CLIENT_ID, CLIENT_SECRET, Env};
use crate::support::{drop_test_database, test_databases};

async fn send(
    env: &Env,
    method: Method,
    url: &str,
    authorization: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = env
        .http
        .request(method, url)
        .header("authorization", authorization);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn own_connector(key: &str, env: &Env) -> Value {
    let sandbox = &env.sandbox.url;
    json!({"key": key, "name": "Acme", "baseUrl": format!("{sandbox}/generic/"),
           "oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"),
                     "tokenUrl": format!("{sandbox}/generic/token"),
                     "revokeUrl": format!("{sandbox}/generic/revoke"),
                     "scopes": ["api", "offline_access"], "scopeSeparator": " ",
                     "clientAuth": "client_secret_post", "pkce": false,
                     "authorizationParams": {"prompt": "consent"}},
           "refresh": {"strategy": "before_expiry", "bufferSeconds": 60, "keepAliveSeconds": 86400}})
}

#[tokio::test]
async fn review_findings_stay_fixed() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let platform = env.org.platform();

        // The contract's own connector shape, keep-alive without an idle TTL, is accepted.
        let (status, body) = send(
            &env,
            Method::POST,
            &env.api("/elements"),
            &platform,
            Some(own_connector("acme", &env)),
        )
        .await;
        assert_eq!(status, 201, "[{label}] {body}");

        // An Element token alone names an instance; it cannot create one.
        let instance = env.create_instance(&env.org, "acme", "kim").await;
        let token = instance["token"].as_str().unwrap();
        let (code, state) = env.authorize(&env.org, "acme", "kim").await;
        let body = json!({"element": {"key": "acme"}, "providerData": {"code": code, "state": state},
                          "configuration": env.configuration()});
        let (status, answer) = send(
            &env,
            Method::POST,
            &env.api("/instances"),
            &env.org.through(token),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 401, "[{label}] {answer}");
        let (status, answer) = send(
            &env,
            Method::POST,
            &env.api("/elements/acme/instances"),
            &env.org.through(token),
            Some(body),
        )
        .await;
        assert_eq!(status, 401, "[{label}] {answer}");

        // A connector in use cannot be deleted from under its instances.
        let (status, answer) = send(
            &env,
            Method::DELETE,
            &env.api("/elements/acme"),
            &platform,
            None,
        )
        .await;
        assert_eq!(status, 409, "[{label}] {answer}");
        let (status, answer) = env.proxy(&env.org, token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "[{label}] still works: {answer}");

        // OAuth states belong to their organization: another may hold the same value (no 409
        // tells it the value is taken), and presenting someone else's state is refused before
        // any provider call, without consuming it.
        let other = env.new_org("other").await;
        let oauth_url = |state: &str| {
            format!(
                "{}?apiKey={CLIENT_ID}&apiSecret={CLIENT_SECRET}&callbackUrl={}&state={state}",
                env.api("/elements/sandbox-generic/oauth/url"),
                url::form_urlencoded::byte_serialize(env.callback().as_bytes()).collect::<String>()
            )
        };
        let suffix = crate::support::random_id();
        let (shared, mine_only) = (format!("shared-{suffix}"), format!("mine-{suffix}"));
        let (status, body) = env.get_json(&oauth_url(&shared), &platform).await;
        assert_eq!(status, 200, "[{label}] {body}");
        let (status, theirs) = env.get_json(&oauth_url(&shared), &other.platform()).await;
        assert_eq!(
            status, 200,
            "[{label}] the same value in another organization: {theirs}"
        );
        let (status, mine) = env.get_json(&oauth_url(&mine_only), &platform).await;
        assert_eq!(status, 200, "[{label}] {mine}");
        let approve = env
            .http
            .get(format!(
                "{}&login_hint=kim",
                mine["oauthUrl"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap();
        let location = url::Url::parse(approve.headers()["location"].to_str().unwrap()).unwrap();
        let code = location
            .query_pairs()
            .find(|(k, _)| k == "code")
            .unwrap()
            .1
            .into_owned();
        let presented = json!({"element": {"key": "sandbox-generic"},
                               "providerData": {"code": code, "state": mine_only},
                               "configuration": env.configuration()});
        let before = env.sandbox_stats().await;
        let (status, answer) = send(
            &env,
            Method::POST,
            &env.api("/instances"),
            &other.platform(),
            Some(presented.clone()),
        )
        .await;
        assert_eq!(status, 400, "[{label}] {answer}");
        assert_eq!(
            env.sandbox_stats().await["tokenErrors"],
            before["tokenErrors"],
            "[{label}] no provider call"
        );
        let (status, created) = send(
            &env,
            Method::POST,
            &env.api("/instances"),
            &platform,
            Some(presented),
        )
        .await;
        assert_eq!(
            status, 200,
            "[{label}] the owner's state still works: {created}"
        );

        // Nothing points at the metadata service: not a connector, not a base URL.
        let mut metadata = own_connector("meta", &env);
        metadata["oauth"]["tokenUrl"] = json!("http://169.254.169.254/latest/meta-data/");
        let (status, answer) = send(
            &env,
            Method::POST,
            &env.api("/elements"),
            &platform,
            Some(metadata),
        )
        .await;
        assert_eq!(status, 400, "[{label}] {answer}");
        let id = instance["id"].as_i64().unwrap();
        // Nor a base the proxy could not go under (each was accepted, and every proxied call
        // of the instance then answered 409; the user info was shown in plain text).
        for base in [
            "http://169.254.169.254/latest/",
            "https://apiuser:s3cr3t@api.example.com/v1",
            "https://api.example.com/v1?key=abc",
            "https://api.example.com/v1#part",
        ] {
            let (status, answer) = send(
                &env,
                Method::PATCH,
                &env.api(&format!("/instances/{id}")),
                &platform,
                Some(json!({"configuration": {"base.url": base}})),
            )
            .await;
            assert_eq!(status, 400, "[{label}] {base}: {answer}");
            assert!(!answer.to_string().contains("s3cr3t"), "{answer}");
        }
        let (status, answer) = env.proxy(&env.org, token, Method::GET, "api/me").await;
        assert_eq!(
            status, 200,
            "[{label}] the instance kept its base URL: {answer}"
        );
        // A connector input brings one part of a URL, never a host, port, path or query.
        let microsoft = env
            .create_instance(&env.org, "sandbox-microsoft", "lee")
            .await;
        // Nor a dot segment, which moved the token endpoint (`…/microsoft/../oauth2/…`): the
        // refresh token and client secret went elsewhere on the host.
        for tenant in ["127.0.0.1:4199/x?", "..", ".", "..."] {
            let (status, answer) = send(
                &env,
                Method::PATCH,
                &env.api(&format!("/instances/{}", microsoft["id"])),
                &platform,
                Some(json!({"configuration": {"tenant": tenant}})),
            )
            .await;
            assert_eq!(status, 400, "[{label}] {tenant}: {answer}");
            assert!(
                answer["message"].as_str().unwrap().contains("tenant"),
                "{answer}"
            );
        }
        let (status, answer) = send(
            &env,
            Method::GET,
            &env.api("/elements/sandbox-microsoft/oauth/url?apiKey=k&callbackUrl=http://127.0.0.1/cb&tenant=.."),
            &platform,
            None,
        )
        .await;
        assert_eq!(status, 400, "[{label}] {answer}");

        // A wrong `Organization` part on the proxy is refused, not ignored.
        let wrong = format!(
            "User {}, Organization nope, Element {token}",
            env.org.user_secret
        );
        let (status, answer) =
            send(&env, Method::GET, &env.api("/proxy/api/me"), &wrong, None).await;
        assert_eq!(status, 401, "[{label}] {answer}");
        let right = format!("{}, Element {token}", env.org.platform());
        let (status, answer) =
            send(&env, Method::GET, &env.api("/proxy/api/me"), &right, None).await;
        assert_eq!(status, 200, "[{label}] {answer}");

        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// An organization's own connector whose key a later release gives a built-in connector stays
/// that organization's connector (its instances refreshed against the built-in's endpoints,
/// sending refresh tokens and the client secret there), and can still be deleted (403 as a
/// built-in). Other organizations see the built-in.
#[tokio::test]
async fn an_own_connector_keeps_its_key_when_a_built_in_takes_it() {
    let url = crate::support::sqlite_database();
    let mut env = Env::start("sqlite", &url).await;
    // As left by an earlier release: the organization's `sandbox-box`, on the generic profile.
    let mut own = own_connector("sandbox-box", &env);
    own["name"] = json!("Our own box");
    env.server
        .app
        .store
        .insert_connector(env.org.id, "sandbox-box", &own.to_string(), 0)
        .await
        .unwrap();
    let upgraded = crate::harness::start_server(&url, &env.sandbox.url, |_| {}).await;
    let old = std::mem::replace(&mut env.server, upgraded);
    old.shutdown().await;
    let other = env.new_org("other").await;

    let (status, body) = send(
        &env,
        Method::GET,
        &env.api("/elements/sandbox-box"),
        &env.org.platform(),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["name"].as_str(), body["builtIn"].as_bool()),
        (Some("Our own box"), Some(false)),
        "{body}"
    );
    let (_, body) = send(
        &env,
        Method::GET,
        &env.api("/elements/sandbox-box"),
        &other.platform(),
        None,
    )
    .await;
    assert_eq!(body["builtIn"], true, "{body}");
    let (_, listed) = send(
        &env,
        Method::GET,
        &env.api("/elements"),
        &env.org.platform(),
        None,
    )
    .await;
    let boxes: Vec<&Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["key"] == "sandbox-box")
        .collect();
    assert_eq!(boxes.len(), 1, "{boxes:?}");
    assert_eq!(boxes[0]["builtIn"], false);

    // Its instances use its endpoints: the generic profile's tokens, refreshed there.
    let instance = env.create_instance(&env.org, "sandbox-box", "own").await;
    let token = instance["token"].as_str().unwrap();
    let (status, body) = env.proxy(&env.org, token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = send(
        &env,
        Method::DELETE,
        &env.api(&format!("/instances/{}", instance["id"])),
        &env.org.platform(),
        None,
    )
    .await;
    assert_eq!(status, 200);

    let (status, body) = send(
        &env,
        Method::DELETE,
        &env.api("/elements/sandbox-box"),
        &env.org.platform(),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Gone, the built-in is the organization's `sandbox-box` again.
    let (_, body) = send(
        &env,
        Method::GET,
        &env.api("/elements/sandbox-box"),
        &env.org.platform(),
        None,
    )
    .await;
    assert_eq!(body["name"], "Sandbox: Box", "{body}");
    env.stop().await;
}

/// A change whose caller hangs up as soon as the request is sent is carried out whole, with its
/// audit entry: cut at one of its awaits, a rename was lost half the time and a disabling was
/// written without the audit entry that says who did it.
#[tokio::test]
async fn a_change_is_carried_out_when_its_caller_hangs_up() {
    use tokio::io::AsyncWriteExt;
    let url = crate::support::sqlite_database();
    let env = Env::start("hang-up", &url).await;
    let platform = env.org.platform();
    let instance = env
        .create_instance(&env.org, "sandbox-generic", "hangup")
        .await;
    let id = instance["id"].as_i64().unwrap();
    let element_token = instance["token"].as_str().unwrap().to_string();
    let send_and_hang_up = |request: String| async move {
        let mut stream = tokio::net::TcpStream::connect(env.server.addr)
            .await
            .unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.flush().await.unwrap();
        drop(stream);
    };
    let renames = 20;
    for n in 0..renames {
        let body = json!({"name": format!("renamed {n}")}).to_string();
        send_and_hang_up(format!(
            "PATCH /elements/api-v2/instances/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: {platform}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
        // Each rename arrives after the last one ended.
        let wanted = format!("renamed {n}");
        let mut name = Value::Null;
        for _ in 0..100 {
            let (_, shown) = send(
                &env,
                Method::GET,
                &env.api(&format!("/instances/{id}")),
                &platform,
                None,
            )
            .await;
            name = shown["name"].clone();
            if name == wanted.as_str() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(
            name,
            wanted.as_str(),
            "rename {n} was lost when its caller hung up"
        );
    }
    let element_auth = format!("{platform}, Element {element_token}");
    send_and_hang_up(format!(
        "DELETE /elements/api-v2/instances/enabled HTTP/1.1\r\nHost: x\r\nAuthorization: {element_auth}\r\n\r\n"
    ))
    .await;
    let mut audited = (0, false);
    for _ in 0..100 {
        let (_, audit) = send(&env, Method::GET, &env.api("/audit-logs"), &platform, None).await;
        let entries = audit["auditLogs"].as_array().cloned().unwrap_or_default();
        audited = (
            entries
                .iter()
                .filter(|e| e["action"] == "instance.updated")
                .count(),
            entries.iter().any(|e| e["action"] == "instance.disabled"),
        );
        if audited == (renames, true) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        audited,
        (renames, true),
        "(renames audited, disabling audited)"
    );
    let (_, shown) = send(
        &env,
        Method::GET,
        &env.api(&format!("/instances/{id}")),
        &platform,
        None,
    )
    .await;
    assert_eq!(shown["disabled"], true, "{shown}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// Inputs the service used to take and drop (or keep until they failed elsewhere): an empty
/// code, a webhook URL no delivery can use, another
/// instance's id in `/events?instanceId=` asked with an Element token.
#[tokio::test]
async fn unusable_update_inputs_are_refused() {
    let url = crate::support::sqlite_database();
    let env = Env::start("unusable inputs", &url).await;
    let platform = env.org.platform();
    let instance = env
        .create_instance(&env.org, "sandbox-generic", "una")
        .await;
    let other = env
        .create_instance(&env.org, "sandbox-generic", "otto")
        .await;
    let id = instance["id"].as_i64().unwrap();
    let path = env.api(&format!("/instances/{id}"));
    let patch = |body: Value| send(&env, Method::PATCH, &path, &platform, Some(body));
    let before = env.sandbox_stats().await["token"]["authorization_code"].clone();
    let (status, body) = patch(json!({"providerData": {"code": ""}})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        env.sandbox_stats().await["token"]["authorization_code"],
        before,
        "no code went out"
    );
    // A pasted token's surrounding whitespace is no part of it.
    let source = env
        .create_instance(&env.org, "sandbox-generic", "pasted")
        .await;
    let pasted = crate::instances::revealed(&env, &env.org, &source).await["configuration"]
        ["oauth.user.token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut configuration = env.configuration();
    configuration["oauth.user.token"] = json!(format!("  {pasted}\n"));
    let (status, imported) = send(
        &env,
        Method::POST,
        &env.api("/instances"),
        &platform,
        Some(json!({"element": {"key": "sandbox-generic"}, "externalAuthentication": "initial", "configuration": configuration})),
    )
    .await;
    assert_eq!(status, 200, "{imported}");
    let (_, shown) = send(
        &env,
        Method::GET,
        &env.api("/instances"),
        &format!(
            "{platform}, Element {}",
            imported["token"].as_str().unwrap()
        ),
        None,
    )
    .await;
    assert_eq!(
        shown[0]["configuration"]["oauth.user.token"], pasted,
        "{shown}"
    );
    // A refused import changes nothing else either.
    let (status, body) = patch(json!({"name": "half done", "externalAuthentication": "initial", "configuration": {"oauth.user.token": "a\nb"}})).await;
    assert_eq!(status, 400, "{body}");
    // A C1 control (a paste from a document) is no part of a token either.
    let (status, body) = patch(json!({"externalAuthentication": "initial", "configuration": {"oauth.user.token": "UPAT_\u{85}nel"}})).await;
    assert_eq!(status, 400, "{body}");
    let (_, shown) = send(&env, Method::GET, &path, &platform, None).await;
    assert_ne!(shown["name"], "half done", "{shown}");
    // More keys than an instance takes, over two PATCHes.
    let half = |from: usize| -> serde_json::Map<String, Value> {
        (from..from + 600)
            .map(|n| (format!("k{n}"), json!("v")))
            .collect()
    };
    let (status, body) = patch(json!({"configuration": half(0)})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = patch(json!({"configuration": half(600)})).await;
    assert_eq!(status, 400, "{body}");
    // More bytes than an instance takes (64 KiB), PATCH after PATCH (each body well under
    // it): one instance grew to 60 MB, and every read and write of it took seconds.
    let big = |from: usize| -> serde_json::Map<String, Value> {
        (from..from + 6)
            .map(|n| (format!("big{n}"), json!("x".repeat(4_000))))
            .collect()
    };
    let mut refused = None;
    for round in 0..5 {
        let (status, body) = patch(json!({"configuration": big(round * 6)})).await;
        if status != 200 {
            refused = Some((round, status, body));
            break;
        }
    }
    let (round, status, body) = refused.expect("the configuration grew past 64 KiB");
    assert_eq!((round, status), (2, 400), "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("bytes"),
        "{body}"
    );
    // An empty key, a blank code, and more keys than an instance takes.
    let (status, body) = patch(json!({"providerData": {"code": "  "}})).await;
    assert_eq!(status, 400, "{body}");
    let many: serde_json::Map<String, Value> =
        (0..1001).map(|n| (format!("k{n}"), json!("v"))).collect();
    for configuration in [json!({"": "x"}), json!({" ": "x"}), Value::Object(many)] {
        let (status, body) = patch(json!({"configuration": configuration})).await;
        assert_eq!(status, 400, "{body}");
    }
    for bad in [
        "not a url",
        "ftp://example.test/hook",
        "http://169.254.169.254/latest",
        // A password in it would be shown to whoever reads the instance.
        "https://hooks:s3cret@hooks.example.test/in",
        "https://hooks@hooks.example.test/in",
    ] {
        let (status, body) = patch(json!({"configuration": {"event.notification.enabled": "true", "event.notification.callback.url": bad}})).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("event.notification.callback.url"),
            "{body}"
        );
    }
    let (status, body) = patch(json!({"configuration": {"event.notification.enabled": "true", "event.notification.callback.url": "https://hooks.example.test/in"}})).await;
    assert_eq!(status, 200, "{body}");
    let element_only = format!(
        "User {}, Element {}",
        env.org.user_secret,
        instance["token"].as_str().unwrap()
    );
    // No platform call without the organization secret, about this instance or another.
    for about in [other["id"].to_string(), id.to_string()] {
        let (status, body) = send(
            &env,
            Method::GET,
            &env.api(&format!("/events?instanceId={about}")),
            &element_only,
            None,
        )
        .await;
        assert_eq!(
            status, 401,
            "events asked with an Element token alone: {body}"
        );
    }
    env.stop().await;
    drop_test_database(&url).await;
}

/// A request body that stops coming before its end (a client that crashed or hung mid-body)
/// is cut after the idle timeout with a 408, on the platform API and on the proxy: it held its
/// connection, and a slot of `--max-connections`, for good.
#[tokio::test]
async fn a_body_that_stops_coming_is_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = crate::support::sqlite_database();
    let env = Env::start_adjusted("sqlite", &url, |config| {
        config.header_read_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let instance = env
        .create_instance(&env.org, "sandbox-generic", "stalled")
        .await;
    let token = instance["token"].as_str().unwrap();
    // The platform API, the proxy, and the proxy with an upload too large to keep (1.5 MB of
    // 3 MB sent, streaming on to the provider: a 504 after the provider timeout, 30 s).
    let big = vec![b'x'; 1_500_000];
    for (path, authorization, length, sent) in [
        (
            "/elements/api-v2/instances",
            env.org.platform(),
            1000,
            &b"{"[..],
        ),
        (
            "/elements/api-v2/proxy/api/echo",
            env.org.through(token),
            1000,
            &b"{"[..],
        ),
        (
            "/elements/api-v2/proxy/api/echo",
            env.org.through(token),
            3_000_000,
            &big[..],
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(env.server.addr)
            .await
            .unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut buffer = [0u8; 4096];
            while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buffer).await.unwrap();
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buffer[..n]);
            }
        })
        .await;
        assert!(
            read.is_ok(),
            "{path} ({length}): no answer 10 s into a stalled body"
        );
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{path} ({length}): {answer}"
        );
    }
    env.stop().await;
    drop_test_database(&url).await;
}

/// An operator of a service shared by organizations that do not trust each other refuses
/// private ranges (`serve --egress-deny private`): a tenant's connector, `base.url`, webhook
/// or token URL may not reach the service's own ports or the private network, whether by an
/// IP literal (refused when given) or by a name resolving there (refused as the call goes
/// out, and nothing reaches the listener). `--egress-allow` takes a range back: here the
/// sandbox's address alone, 127.0.0.2.
#[tokio::test]
async fn an_operator_keeps_tenants_off_private_networks() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // What a tenant would reach: a listener on loopback that counts what arrives.
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reached);
    let internal = axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { "INTERNAL-SECRET-CONTENT" }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, internal).await.unwrap() });

    let url = crate::support::sqlite_database();
    let sandbox = tokenwarden_sandbox::spawn(
        "127.0.0.2:0".parse().unwrap(),
        tokenwarden_sandbox::SandboxConfig::default(),
    )
    .await
    .unwrap();
    let env = Env::start_with_sandbox("sqlite", &url, sandbox, |config| {
        config.egress =
            Arc::new(tokenwarden::egress::Policy::parse("private", "127.0.0.2/32").unwrap());
    })
    .await;
    let platform = env.org.platform();

    // The range taken back: the sandbox's connectors work.
    let instance = env
        .create_instance(&env.org, "sandbox-generic", "alice")
        .await;
    let id = instance["id"].as_i64().unwrap();
    let token = instance["token"].as_str().unwrap().to_string();
    let (status, _) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 200);

    // IP literals are refused when given: a connector, a base URL, a webhook.
    let mut inside = own_connector("inside", &env);
    inside["baseUrl"] = json!(format!("http://127.0.0.1:{port}/"));
    let (status, answer) = send(
        &env,
        Method::POST,
        &env.api("/elements"),
        &platform,
        Some(inside),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("egress policy"),
        "{answer}"
    );
    for (key, value) in [
        ("base.url", format!("http://127.0.0.1:{port}/")),
        ("base.url", format!("http://[::ffff:127.0.0.1]:{port}/")),
        ("base.url", "http://10.1.2.3/".to_string()),
        (
            "event.notification.callback.url",
            "http://192.168.1.1/hook".to_string(),
        ),
    ] {
        let (status, answer) = send(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{id}")),
            &platform,
            Some(json!({"configuration": {key: value}})),
        )
        .await;
        assert_eq!(status, 400, "{key} {value}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("egress policy"),
            "{answer}"
        );
    }

    // A name resolving there is taken, and refused as the call goes out.
    let (status, answer) = send(
        &env,
        Method::PATCH,
        &env.api(&format!("/instances/{id}")),
        &platform,
        Some(json!({"configuration": {"base.url": format!("http://localhost:{port}/")}})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = env.proxy(&env.org, &token, Method::GET, "anything").await;
    assert!((500..600).contains(&status), "{status} {answer}");
    assert!(!answer.to_string().contains("INTERNAL-SECRET"), "{answer}");
    assert!(answer.to_string().contains("egress policy"), "{answer}");

    // A token URL naming it: the exchange fails, saying why.
    let mut named = own_connector("named", &env);
    named["oauth"]["tokenUrl"] = json!(format!("http://localhost:{port}/token"));
    let (status, answer) = send(
        &env,
        Method::POST,
        &env.api("/elements"),
        &platform,
        Some(named),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let (status, answer) = send(
        &env,
        Method::POST,
        &env.api("/instances"),
        &platform,
        Some(
            json!({"element": {"key": "named"}, "providerData": {"code": "a-code"},
                    "configuration": env.configuration()}),
        ),
    )
    .await;
    assert!((400..500).contains(&status), "{status} {answer}");
    assert!(answer.to_string().contains("egress policy"), "{answer}");
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "nothing reached the listener"
    );

    env.stop().await;
    drop_test_database(&url).await;
}

/// The service's answers carry tokens and secrets: no cache keeps them (`Cache-Control:
/// no-store`, as RFC 6749 asks of token answers). The proxy's answers are the provider's own.
#[tokio::test]
async fn the_service_s_answers_are_not_cached() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "cached")
        .await;
    let id = created["id"].as_i64().unwrap();
    let token = created["token"].as_str().unwrap();
    for (url, authorization) in [
        (
            env.api(&format!("/instances/{id}")),
            env.org.with_element(token),
        ),
        (env.api("/instances"), env.org.platform()),
        (env.api("/instances/999999"), env.org.platform()),
        (env.api("/elements"), env.org.platform()),
    ] {
        let response = env
            .http
            .get(&url)
            .header("authorization", authorization)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response
                .headers()
                .get("cache-control")
                .map(|v| v.to_str().unwrap()),
            Some("no-store"),
            "{url}"
        );
    }
    let refreshed = env
        .http
        .post(env.api(&format!("/instances/{id}/tokens/refresh")))
        .header("authorization", env.org.platform())
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.headers()["cache-control"], "no-store");
    let proxied = env
        .http
        .get(env.api("/proxy/api/me"))
        .header("authorization", env.org.through(token))
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), 200);
    assert!(proxied.headers().get("cache-control").is_none());
    env.stop().await;
    drop_test_database(&url).await;
}

/// What one organization can make the service keep is bounded: a pending authorization's
/// fields (kept 15 minutes; 1,000 calls with 28 KB `callbackUrl` and `scope` kept 56 MB), and an
/// instance's configuration at a create as at an update (150 instances of 1 MB made each list
/// 151 MB, and ten lists at once took the service to 2 GB).
#[tokio::test]
async fn what_one_organization_makes_the_service_keep_is_bounded() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let platform = env.org.platform();
    let callback = env.callback();
    for (name, value) in [
        ("callbackUrl", format!("{callback}?{}", "x".repeat(2_100))),
        ("scope", "s ".repeat(2_100)),
        ("apiKey", "k".repeat(1_100)),
    ] {
        let mut query = vec![
            ("apiKey".to_string(), CLIENT_ID.to_string()),
            ("callbackUrl".to_string(), callback.clone()),
        ];
        query.retain(|(key, _)| key != name);
        query.push((name.to_string(), value));
        let response = env
            .http
            .get(env.api("/elements/sandbox-generic/oauth/url"))
            .query(&query)
            .header("authorization", &platform)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 400, "{name}: {body}");
        assert!(body["message"].as_str().unwrap().contains(name), "{body}");
    }
    let big: serde_json::Map<String, Value> = (0..20)
        .map(|n| (format!("big{n}"), json!("x".repeat(4_000))))
        .collect();
    let mut configuration = env.configuration();
    configuration.as_object_mut().unwrap().extend(big);
    configuration["oauth.user.token"] = json!("an-access-token");
    let (status, body) = send(
        &env,
        Method::POST,
        &env.api("/instances"),
        &platform,
        Some(
            json!({"element": {"key": "sandbox-generic"}, "externalAuthentication": "initial",
                    "configuration": configuration}),
        ),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("bytes"),
        "{body}"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A request with two `Authorization` headers is refused, on the API as through the proxy: the
/// service took the first, and a gateway in front may judge the request by the second.
#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "twice")
        .await;
    let id = created["id"].as_i64().unwrap();
    let token = created["token"].as_str().unwrap();
    let other = env.new_org("other").await;
    for (url, first, second) in [
        (
            env.api(&format!("/instances/{id}")),
            env.org.platform(),
            other.platform(),
        ),
        (
            env.api("/proxy/api/me"),
            env.org.through(token),
            other.platform(),
        ),
    ] {
        let response = env
            .http
            .get(&url)
            .header("authorization", &first)
            .header("authorization", &second)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{url}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("more than one Authorization header"),
            "{body}"
        );
        // One of them alone is answered.
        let alone = env
            .http
            .get(&url)
            .header("authorization", &first)
            .send()
            .await
            .unwrap();
        assert_eq!(alone.status(), 200, "{url}");
    }
    env.stop().await;
    drop_test_database(&url).await;
}

/// What a generated client sends is taken as it means it (an SDK author's findings): a query
/// flag in Python's spelling (`True`), a tag given twice, an error naming the field at fault
/// rather than the framework's types.
#[tokio::test]
async fn a_generated_client_s_spellings_are_understood() {
    let url = crate::support::sqlite_database();
    let env = Env::start("client spellings", &url).await;
    let platform = env.org.platform();
    let instance = env
        .create_instance(&env.org, "sandbox-generic", "sdk")
        .await;
    let id = instance["id"].as_i64().unwrap();
    let path = env.api(&format!("/instances/{id}"));
    let (status, body) = send(
        &env,
        Method::PATCH,
        &path,
        &platform,
        Some(json!({"tags": ["a", "b", "a"]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tags"], json!(["a", "b"]), "{body}");
    // A wrong type: serde's words, which name the field, without axum's.
    let (status, body) = send(
        &env,
        Method::PATCH,
        &path,
        &platform,
        Some(json!({"tags": "a"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("tags") && !message.contains("target type"),
        "{body}"
    );
    // Neither yes nor no: refused, naming the value.
    let (status, body) = send(
        &env,
        Method::DELETE,
        &format!("{path}?revoke=maybe"),
        &platform,
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("`maybe`"),
        "{body}"
    );
    // `True` is true: the grant is revoked at the provider before the deletion.
    let before = env.sandbox_stats().await["revoke"].as_u64().unwrap();
    let (status, body) = send(
        &env,
        Method::DELETE,
        &format!("{path}?revoke=True"),
        &platform,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        env.sandbox_stats().await["revoke"].as_u64().unwrap() > before,
        "no revocation reached the provider"
    );
    env.stop().await;
    drop_test_database(&url).await;
}
