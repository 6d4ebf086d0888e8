//! Crash safety: `tokenwarden serve` as a real process, killed with SIGKILL while a refresh is
//! in flight at the provider, then started again on the same database. The instance is never
//! silently broken: it works (the provider did not rotate, or keeps a grace period), or it is
//! invalid with reason "refresh interrupted" and an `instance.invalidated` event.

use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokenwarden_sandbox::RunningSandbox;

use crate::harness::{CLIENT_ID, CLIENT_SECRET, Env, Org, TEST_MASTER_KEY, loopback};
use crate::refresh::{eventually, generic_profile, strict_rotation};
use crate::support::{drop_test_database, sqlite_database};

pub(crate) struct Child {
    pub(crate) process: tokio::process::Child,
    pub(crate) url: String,
}

/// `tokenwarden serve` as a process of its own on `database_url`, once it answers.
pub(crate) async fn spawn_serve(
    database_url: &str,
    sandbox_url: &str,
    http: &reqwest::Client,
) -> Child {
    use tokio::io::AsyncBufReadExt;
    // Port 0, and the address read from what `serve` announces: a port picked here and bound
    // later by the child could be taken meanwhile, by another test's server even.
    let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--database-url",
            database_url,
        ])
        .env("TOKENWARDEN_MASTER_KEY", TEST_MASTER_KEY)
        .env("TOKENWARDEN_SANDBOX_URL", sandbox_url)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("tokenwarden serve starts");
    let mut lines = tokio::io::BufReader::new(process.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("serving on ").nth(1) {
                return rest.trim().to_string();
            }
        }
        panic!("serve ended without announcing its address");
    })
    .await
    .expect("serve announces its address");
    // The rest of its log is read and dropped, so that the pipe never fills.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    eventually("serve to answer", Duration::from_secs(20), || async {
        let answer = http.get(format!("{url}/healthz")).send().await.ok()?;
        answer.status().is_success().then_some(())
    })
    .await;
    Child { process, url }
}

pub(crate) async fn call(
    http: &reqwest::Client,
    server: &str,
    org: &Org,
    token: &str,
) -> (u16, Value) {
    let response = http
        .request(
            Method::GET,
            format!("{server}/elements/api-v2/proxy/api/me"),
        )
        .header("authorization", org.through(token))
        .timeout(Duration::from_secs(40))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn get(http: &reqwest::Client, url: &str, authorization: &str) -> Value {
    let response = http
        .get(url)
        .header("authorization", authorization)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    response.json().await.unwrap()
}

pub(crate) async fn stats(http: &reqwest::Client, sandbox: &str) -> Value {
    get(http, &format!("{sandbox}/__sandbox/stats"), "").await
}

/// One scenario: a fresh sandbox with `settings`, one instance, a refresh killed mid-flight.
/// `rotated_away`: the provider processed the lost request (its new refresh token died with
/// the process). Answers the instance after the restart, its events, and the call's answer.
async fn killed_mid_refresh(label: &str, settings: Value) -> (Value, Vec<String>, (u16, Value)) {
    let url = sqlite_database();
    let sandbox: RunningSandbox = tokenwarden_sandbox::spawn(loopback(), Default::default())
        .await
        .unwrap();
    let sandbox_url = sandbox.url.clone();
    // The in-process server only sets the scene (organization, instance), then stops.
    let env = Env::start_with_sandbox(label, &url, sandbox, |_| {}).await;
    generic_profile(&env, settings).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "crashy")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_i64().unwrap();
    let stored = crate::refresh::instance(&env, &env.server.url.clone(), &token).await;
    let refresh_token = stored["configuration"]["oauth.user.refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    let Env {
        server,
        sandbox,
        http,
        org,
        ..
    } = env;
    server.shutdown().await;

    let mut first = spawn_serve(&url, &sandbox_url, &http).await;
    let sandbox_post = |path: &str, body: Value| {
        let http = http.clone();
        let url = format!("{sandbox_url}{path}");
        async move {
            let answer = http.post(url).json(&body).send().await.unwrap();
            assert!(answer.status().is_success());
        }
    };
    sandbox_post("/__sandbox/clock", json!({"advanceSeconds": 10_000})).await;
    sandbox_post(
        "/__sandbox/faults",
        json!({"target": "token", "status": 0, "delayMs": 3_000, "count": 1}),
    )
    .await;
    let caller = {
        let (http, server, org_through, token) = (
            http.clone(),
            first.url.clone(),
            org.through(&token),
            token.clone(),
        );
        tokio::spawn(async move {
            let _ = http
                .get(format!("{server}/elements/api-v2/proxy/api/me"))
                .header("authorization", org_through)
                .send()
                .await;
            drop(token);
        })
    };
    // The refresh request has reached the provider and is held there.
    eventually("the refresh in flight", Duration::from_secs(20), || async {
        (stats(&http, &sandbox_url).await["faultsInjected"].as_u64() == Some(1)).then_some(())
    })
    .await;
    first.process.start_kill().unwrap(); // SIGKILL
    first.process.wait().await.unwrap();
    let _ = caller.await;
    // Did the provider finish the lost request (rotating the token away)? If it dropped it,
    // play the provider that did: the stored refresh token is used once more, now.
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    let processed = stats(&http, &sandbox_url).await["token"]["refresh_token"].as_u64() == Some(1);
    if !processed {
        let answer = http
            .post(format!("{sandbox_url}/generic/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(
                url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", &refresh_token)
                    .append_pair("client_id", CLIENT_ID)
                    .append_pair("client_secret", CLIENT_SECRET)
                    .finish(),
            )
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "[{label}] the lost refresh");
    }

    let second = spawn_serve(&url, &sandbox_url, &http).await;
    let answer = call(&http, &second.url, &org, &token).await;
    let shown = get(
        &http,
        &format!("{}/elements/api-v2/instances", second.url),
        &org.with_element(&token),
    )
    .await[0]
        .clone();
    let events: Vec<String> = get(
        &http,
        &format!("{}/elements/api-v2/events?instanceId={id}", second.url),
        &org.platform(),
    )
    .await["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    drop(second);
    sandbox.shutdown().await;
    drop_test_database(&url).await;
    (shown, events, answer)
}

/// `serve` killed while a revocation is at the provider: the instance is invalid after the
/// restart (reason `revoked`, an `instance.invalidated`), not valid on tokens the provider may
/// have revoked (it was, with neither an event nor a reason, until a call found out; a
/// black-box tester).
#[tokio::test]
async fn a_revocation_killed_at_the_provider_leaves_the_instance_invalid() {
    killed_while_revoking(false).await;
}

/// The same for `DELETE ?revoke=true`: the instance, not deleted yet, is invalid after the
/// restart (it was valid on revoked tokens).
#[tokio::test]
async fn a_deletion_killed_while_it_revokes_leaves_the_instance_invalid() {
    killed_while_revoking(true).await;
}

async fn killed_while_revoking(delete: bool) {
    let url = sqlite_database();
    let sandbox: RunningSandbox = tokenwarden_sandbox::spawn(loopback(), Default::default())
        .await
        .unwrap();
    let sandbox_url = sandbox.url.clone();
    let env = Env::start_with_sandbox("sqlite", &url, sandbox, |_| {}).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "revoked-mid-way")
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_i64().unwrap();
    let Env {
        server,
        sandbox,
        http,
        org,
        ..
    } = env;
    server.shutdown().await;

    let mut first = spawn_serve(&url, &sandbox_url, &http).await;
    let answer = http
        .post(format!("{sandbox_url}/__sandbox/faults"))
        .json(&json!({"target": "revoke", "status": 0, "delayMs": 5_000, "count": 1}))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());
    let revoking = {
        let (http, server, platform) = (http.clone(), first.url.clone(), org.platform());
        tokio::spawn(async move {
            let request = if delete {
                http.delete(format!(
                    "{server}/elements/api-v2/instances/{id}?revoke=true"
                ))
            } else {
                http.post(format!(
                    "{server}/elements/api-v2/instances/{id}/tokens/revoke"
                ))
            };
            let _ = request.header("authorization", platform).send().await;
        })
    };
    eventually(
        "the revocation at the provider",
        Duration::from_secs(20),
        || async {
            (stats(&http, &sandbox_url).await["faultsInjected"].as_u64() == Some(1)).then_some(())
        },
    )
    .await;
    first.process.start_kill().unwrap(); // SIGKILL
    first.process.wait().await.unwrap();
    let _ = revoking.await;

    let second = spawn_serve(&url, &sandbox_url, &http).await;
    let shown = get(
        &http,
        &format!("{}/elements/api-v2/instances/{id}", second.url),
        &org.platform(),
    )
    .await;
    assert_eq!(shown["valid"], false, "{shown}");
    assert_eq!(shown["stateReason"], "revoked", "{shown}");
    if delete {
        let (status, body) = call(&http, &second.url, &org, &token).await;
        assert_eq!(status, 401, "{body}");
        drop(second);
        sandbox.shutdown().await;
        drop_test_database(&url).await;
        return;
    }
    let events = get(
        &http,
        &format!("{}/elements/api-v2/events?instanceId={id}", second.url),
        &org.platform(),
    )
    .await;
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "instance.invalidated"),
        "{events}"
    );
    let (status, body) = call(&http, &second.url, &org, &token).await;
    assert_eq!(status, 401, "{body}");
    drop(second);
    sandbox.shutdown().await;
    drop_test_database(&url).await;
}

#[tokio::test]
async fn a_refresh_killed_in_flight_never_leaves_the_instance_silently_broken() {
    let (strict, grace, plain) = tokio::join!(
        killed_mid_refresh("strict", strict_rotation()),
        killed_mid_refresh(
            "grace",
            json!({"rotateRefreshTokens": true, "refreshReuseGraceSeconds": 600,
                   "revokeGrantOnReuse": true})
        ),
        killed_mid_refresh("plain", json!({"rotateRefreshTokens": false})),
    );

    // Strict rotation: the token the provider handed out died with the process.
    let (shown, events, (status, body)) = strict;
    assert_eq!(status, 401, "strict: {body}");
    assert_eq!(body["message"], "Request failed");
    assert_eq!(shown["valid"], false, "strict: {shown}");
    assert!(
        shown["stateReason"]
            .as_str()
            .unwrap()
            .contains("refresh interrupted"),
        "strict: {shown}"
    );
    assert!(
        events.iter().any(|e| e == "instance.invalidated"),
        "strict: {events:?}"
    );

    // A grace period, or no rotation at all: the retry with what was stored works.
    for (label, (shown, events, (status, body))) in [("grace", grace), ("plain", plain)] {
        assert_eq!(status, 200, "{label}: {body}");
        assert_eq!(shown["valid"], true, "{label}: {shown}");
        assert!(
            !events.iter().any(|e| e == "instance.invalidated"),
            "{label}: {events:?}"
        );
    }
}

/// SIGTERM while a refresh is at the provider: the service lets the call finish (its refresh
/// committed, the caller answered 200), releases what it holds, and exits 0; a new process on
/// the same database works at once, and the provider saw one refresh.
#[tokio::test]
async fn sigterm_finishes_the_refresh_in_flight_and_exits_cleanly() {
    sigterm_during_a_refresh(true).await;
}

/// The same when the caller whose call started the refresh has hung up: nothing holds the
/// server open but the refresh itself, which still ends with its commit (the process used to
/// exit at once, cutting it after the provider had rotated the refresh token).
#[tokio::test]
async fn sigterm_finishes_a_refresh_whose_caller_hung_up() {
    sigterm_during_a_refresh(false).await;
}

/// A `serve` process (to be sent SIGTERM) on a new SQLite database holding one instance of
/// `sandbox-generic`, made by an in-process server that is stopped again.
struct SigtermScene {
    url: String,
    sandbox: RunningSandbox,
    sandbox_url: String,
    http: reqwest::Client,
    org: Org,
    token: String,
    id: i64,
    serving: Child,
}

async fn sigterm_scene(user: &str, strict: bool) -> SigtermScene {
    let url = sqlite_database();
    let sandbox: RunningSandbox = tokenwarden_sandbox::spawn(loopback(), Default::default())
        .await
        .unwrap();
    let sandbox_url = sandbox.url.clone();
    let env = Env::start_with_sandbox("sigterm", &url, sandbox, |_| {}).await;
    if strict {
        generic_profile(&env, strict_rotation()).await;
    }
    let created = env.create_instance(&env.org, "sandbox-generic", user).await;
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_i64().unwrap();
    let Env {
        server,
        sandbox,
        http,
        org,
        ..
    } = env;
    server.shutdown().await;
    let serving = spawn_serve(&url, &sandbox_url, &http).await;
    SigtermScene {
        url,
        sandbox,
        sandbox_url,
        http,
        org,
        token,
        id,
        serving,
    }
}

async fn sigterm_during_a_refresh(caller_stays: bool) {
    let SigtermScene {
        url,
        sandbox,
        sandbox_url,
        http,
        org,
        token,
        id,
        serving: mut first,
    } = sigterm_scene("graceful", true).await;
    for (path, body) in [
        ("/__sandbox/clock", json!({"advanceSeconds": 10_000})),
        (
            "/__sandbox/faults",
            json!({"target": "token", "status": 0, "delayMs": 1_500, "count": 1}),
        ),
    ] {
        let answer = http
            .post(format!("{sandbox_url}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success());
    }
    let caller = {
        let (http, server, org, token) = (
            http.clone(),
            first.url.clone(),
            org.through(&token),
            token.clone(),
        );
        tokio::spawn(async move {
            let response = http
                .get(format!("{server}/elements/api-v2/proxy/api/me"))
                .header("authorization", org)
                .send()
                .await
                .unwrap();
            drop(token);
            response.status().as_u16()
        })
    };
    eventually("the refresh in flight", Duration::from_secs(20), || async {
        (stats(&http, &sandbox_url).await["faultsInjected"].as_u64() == Some(1)).then_some(())
    })
    .await;
    if !caller_stays {
        caller.abort();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = first.process.id().expect("running").to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    if caller_stays {
        assert_eq!(caller.await.unwrap(), 200, "the call in flight is answered");
    }
    let exit = tokio::time::timeout(Duration::from_secs(20), first.process.wait())
        .await
        .expect("serve exits within 20 s of SIGTERM")
        .unwrap();
    assert!(exit.success(), "serve exits cleanly: {exit:?}");

    // Nothing is left held: no lease, no refresh marked in flight.
    let store = tokenwarden::store::Store::connect(&url).await.unwrap();
    let row = store.get_instance_by_id(id).await.unwrap().unwrap();
    assert_eq!(row.refresh_lease_owner, None, "{row:?}");
    assert_eq!(row.refresh_in_flight_since, None, "{row:?}");
    store.close().await;

    let second = spawn_serve(&url, &sandbox_url, &http).await;
    let (status, body) = call(&http, &second.url, &org, &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        stats(&http, &sandbox_url).await["token"]["refresh_token"],
        1,
        "one refresh, kept across the restart"
    );
    drop(second);
    sandbox.shutdown().await;
    drop_test_database(&url).await;
}

/// SIGTERM while a proxied call waits 12 s on a slow provider (a report, a long poll): the call
/// is answered, then the process exits. Calls still in flight 10 s after the signal were cut
/// with no answer, though the provider had served them (a deploy lost every slow call, and a
/// caller retrying a POST made it twice).
#[tokio::test]
async fn sigterm_lets_a_slow_call_in_flight_finish() {
    let SigtermScene {
        url,
        sandbox,
        sandbox_url,
        http,
        org,
        token,
        mut serving,
        ..
    } = sigterm_scene("slow", false).await;
    let answer = http
        .post(format!("{sandbox_url}/__sandbox/faults"))
        .json(&json!({"target": "api", "status": 0, "delayMs": 12_000, "count": 1}))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());
    let caller = {
        let (http, server, authorization) =
            (http.clone(), serving.url.clone(), org.through(&token));
        tokio::spawn(async move {
            let response = http
                .get(format!("{server}/elements/api-v2/proxy/api/me"))
                .header("authorization", authorization)
                .send()
                .await
                .map_err(|error| error.to_string())?;
            let status = response.status().as_u16();
            let body = response.text().await.map_err(|error| error.to_string())?;
            Ok::<_, String>((status, body))
        })
    };
    eventually(
        "the call at the provider",
        Duration::from_secs(20),
        || async {
            (stats(&http, &sandbox_url).await["faultsInjected"].as_u64() == Some(1)).then_some(())
        },
    )
    .await;
    let pid = serving.process.id().expect("running").to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let (status, body) = caller
        .await
        .unwrap()
        .expect("the call in flight is answered");
    assert_eq!(status, 200, "{body}");
    let exit = tokio::time::timeout(Duration::from_secs(20), serving.process.wait())
        .await
        .expect("serve exits once the call is answered")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    sandbox.shutdown().await;
    drop_test_database(&url).await;
}
