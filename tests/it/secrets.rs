//! Nothing secret at rest or in logs: the real binary serves a full scenario with
//! `RUST_LOG=trace`; then its SQLite file (and WAL) and its whole log are scanned for every
//! token, client secret, Element token and platform secret the run made. Also: ciphertexts do
//! not move between rows, `Debug` is redacted, the master-key rules at start.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{CLIENT_ID, Env, TEST_MASTER_KEY, http, loopback};
use crate::instances::{binary, call};
use crate::support::{drop_test_database, sqlite_database, test_databases};

/// The real `tokenwarden serve` on port 0, its stderr collected.
pub struct Served {
    pub child: Child,
    pub url: String,
    pub log: Arc<Mutex<String>>,
    /// The thread reading the log: it ends at the end of the log, after the process.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    pub fn start(database_url: &str, sandbox_url: &str, envs: &[(&str, &str)]) -> Served {
        let mut command = binary();
        command
            .args([
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--database-url",
                database_url,
                "--sandbox-url",
                sandbox_url,
            ])
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in envs {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            let mut url_tx = Some(url_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("serving on ").nth(1)
                    && let Some(tx) = url_tx.take()
                {
                    let _ = tx.send(rest.trim().to_string());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let url = url_rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("serve did not start: {}", log.lock().unwrap()));
        Served {
            child,
            url,
            log,
            reader: Some(reader),
        }
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/elements/api-v2{path}", self.url)
    }

    /// SIGTERM (graceful shutdown), then wait.
    pub fn stop(mut self) -> String {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log.lock().unwrap().clone()
    }
}

/// `tokenwarden orgs create` against a database: (organization id, user secret, org secret).
pub fn create_org_with_binary(database_url: &str, envs: &[(&str, &str)]) -> Value {
    let mut command = binary();
    command.args([
        "orgs",
        "create",
        "--name",
        "scan org",
        "--database-url",
        database_url,
    ]);
    for (name, value) in envs {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

async fn json_call(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    auth: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = client.request(method, url).header("authorization", auth);
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

/// oauth/url, then approval at the sandbox: (code, state).
async fn approve(
    client: &reqwest::Client,
    served: &Served,
    auth: &str,
    element: &str,
    user: &str,
) -> (String, String) {
    let callback = format!("{}/oauth/callback", served.url);
    let (status, body) = json_call(
        client,
        Method::GET,
        &served.api(&format!(
            "/elements/{element}/oauth/url?apiKey={CLIENT_ID}&callbackUrl={}",
            crate::elements::urlencode(&callback)
        )),
        auth,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let link = body["oauthUrl"].as_str().unwrap();
    let approved = client
        .get(format!("{link}&login_hint={user}"))
        .send()
        .await
        .unwrap();
    let location = url::Url::parse(approved.headers()["location"].to_str().unwrap()).unwrap();
    let get = |name: &str| {
        location
            .query_pairs()
            .find(|(k, _)| k == name)
            .unwrap()
            .1
            .into_owned()
    };
    (get("code"), get("state"))
}

const SCAN_CLIENT_SECRET: &str = "scan-client-secret-0d5e7a";
const SCAN_WEBHOOK_SECRET: &str = "scan-webhook-secret-9c1f42";
/// A token under a name of the caller's (`api.token`): a secret by its name.
const SCAN_CALLER_TOKEN: &str = "scan-caller-token-5e0b77";

#[tokio::test]
async fn database_and_trace_log_hold_no_secret() {
    let sandbox = tokenwarden_sandbox::spawn(loopback(), Default::default())
        .await
        .unwrap();
    let database_url = sqlite_database();
    let db_path = database_url.strip_prefix("sqlite://").unwrap().to_string();
    // No master key: a key file appears beside the database, mode 0600, with a log line.
    let served = Served::start(&database_url, &sandbox.url, &[("RUST_LOG", "trace")]);
    let key_path = format!("{db_path}.key");
    let metadata = std::fs::metadata(&key_path).unwrap_or_else(|e| panic!("{key_path}: {e}"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            metadata.permissions().mode() & 0o777,
            0o600,
            "key file mode"
        );
        // The database file, and the journal SQLite gives the database's mode, too.
        for path in [db_path.clone(), format!("{db_path}-wal")] {
            let mode = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{path}: {e}"))
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{path} mode");
        }
    }
    let master_key = std::fs::read_to_string(&key_path)
        .unwrap()
        .trim()
        .to_string();
    {
        let log = served.log.lock().unwrap();
        assert!(
            log.contains(&key_path) && log.contains("0600"),
            "no clear log line about the key file:\n{}",
            &log[..log.len().min(4000)]
        );
    }
    let org = create_org_with_binary(&database_url, &[]);
    let user_secret = org["userSecret"].as_str().unwrap().to_string();
    let org_secret = org["organizationSecret"].as_str().unwrap().to_string();
    let auth = format!("User {user_secret}, Organization {org_secret}");
    let client = http();
    let mut secrets: Vec<(String, String)> = vec![
        ("user secret".into(), user_secret.clone()),
        ("organization secret".into(), org_secret.clone()),
        ("client secret".into(), SCAN_CLIENT_SECRET.into()),
        (
            "secret configuration value".into(),
            SCAN_WEBHOOK_SECRET.into(),
        ),
        ("caller's token".into(), SCAN_CALLER_TOKEN.into()),
        ("master key".into(), master_key.clone()),
    ];
    let callback = format!("{}/oauth/callback", served.url);
    let configuration = json!({"oauth.api.key": CLIENT_ID, "oauth.api.secret": SCAN_CLIENT_SECRET, "oauth.callback.url": callback});
    let mut tokens = Vec::new();
    for (element, user, path) in [
        ("sandbox-adobe-sign", "scan-a", "api/rest/v6/users/me"),
        ("sandbox-generic", "scan-g", "api/me"),
        ("sandbox-salesforce", "scan-s", "api/me"),
    ] {
        let (code, state) = approve(&client, &served, &auth, element, user).await;
        secrets.push((format!("{element} code"), code.clone()));
        let (status, instance) = json_call(&client, Method::POST, &served.api("/instances"), &auth,
            Some(json!({"element": {"key": element}, "providerData": {"code": code, "state": state}, "configuration": configuration}))).await;
        assert_eq!(status, 200, "{instance}");
        let id = instance["id"].as_i64().unwrap();
        let element_token = instance["token"].as_str().unwrap().to_string();
        secrets.push((format!("{element} Element token"), element_token.clone()));
        let with_element = format!("{auth}, Element {element_token}");
        let through = format!("User {user_secret}, Element {element_token}");
        let reveal = |secrets: &mut Vec<(String, String)>, shown: &Value| {
            for key in ["oauth.user.token", "oauth.user.refresh_token"] {
                if let Some(value) = shown["configuration"][key].as_str() {
                    secrets.push((format!("{element} {key}"), value.to_string()));
                }
            }
        };
        let (_, shown) = json_call(
            &client,
            Method::GET,
            &served.api(&format!("/instances/{id}")),
            &with_element,
            None,
        )
        .await;
        reveal(&mut secrets, &shown);
        let response = client
            .get(served.api(&format!("/proxy/{path}")))
            .header("authorization", &through)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (status, _) = json_call(&client, Method::PATCH, &served.api(&format!("/instances/{id}")), &auth,
            Some(json!({"configuration": {"webhook.secret": SCAN_WEBHOOK_SECRET, "api.token": SCAN_CALLER_TOKEN, "event.notification.enabled": "false"}}))).await;
        assert_eq!(status, 200);
        // Shown to the organization's callers masked, as every secret.
        let (status, seen) = json_call(
            &client,
            Method::GET,
            &served.api(&format!("/instances/{id}")),
            &auth,
            None,
        )
        .await;
        assert_eq!(status, 200, "{seen}");
        assert_eq!(seen["configuration"]["api.token"], "********", "{seen}");
        let (status, refreshed) = json_call(
            &client,
            Method::POST,
            &served.api(&format!("/instances/{id}/tokens/refresh")),
            &with_element,
            None,
        )
        .await;
        assert_eq!(status, 200, "{refreshed}");
        reveal(&mut secrets, &refreshed);
        let (code, state) = approve(&client, &served, &auth, element, user).await;
        secrets.push((format!("{element} second code"), code.clone()));
        let (status, reauth) = json_call(
            &client,
            Method::PATCH,
            &served.api("/instances"),
            &with_element,
            Some(json!({"providerData": {"code": code, "state": state}})),
        )
        .await;
        assert_eq!(status, 200, "{reauth}");
        reveal(&mut secrets, &reauth);
        let response = client
            .get(served.api(&format!("/proxy/{path}")))
            .header("authorization", &through)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        tokens.push((id, element_token));
    }
    // Revoke one, delete another, fail a create (the provider's error path is logged too).
    let (status, _) = json_call(
        &client,
        Method::POST,
        &served.api(&format!("/instances/{}/tokens/revoke", tokens[0].0)),
        &auth,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = json_call(
        &client,
        Method::DELETE,
        &served.api(&format!("/instances/{}", tokens[1].0)),
        &auth,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = json_call(&client, Method::POST, &served.api("/instances"), &auth,
        Some(json!({"element": {"key": "sandbox-box"}, "providerData": {"code": "bogus-scan-code"}, "configuration": configuration}))).await;
    assert_eq!(status, 400);
    let (status, _) = json_call(
        &client,
        Method::GET,
        &served.api("/instances"),
        "User wrong-user-secret-x1, Organization nope-y2",
        None,
    )
    .await;
    assert_eq!(status, 401);
    let log = served.stop();
    sandbox.shutdown().await;
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log is not at trace level:\n{}",
        &log[..log.len().min(2000)]
    );

    // Every request is logged under its request id.
    assert!(log.contains("request_id="), "no request id in the log");
    let mut stored = Vec::new();
    for suffix in ["", "-wal"] {
        if let Ok(bytes) = std::fs::read(format!("{db_path}{suffix}")) {
            stored.extend_from_slice(&bytes);
        }
    }
    assert!(stored.len() > 4096, "the database file was not found");
    let mut leaks = Vec::new();
    for (what, value) in &secrets {
        assert!(
            value.len() >= 8,
            "{what} is too short to scan for: {value:?}"
        );
        if stored
            .windows(value.len())
            .any(|window| window == value.as_bytes())
        {
            leaks.push(format!("{what} in the database"));
        }
        if log.contains(value.as_str()) {
            let at = log.find(value.as_str()).unwrap();
            let line_start = log[..at].rfind('\n').map_or(0, |i| i + 1);
            let line_end = log[at..].find('\n').map_or(log.len(), |i| at + i);
            leaks.push(format!(
                "{what} in the log: {}",
                &log[line_start..line_end.min(line_start + 400)]
            ));
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets found as plain text:\n{}",
        leaks.join("\n")
    );
    drop_test_database(&database_url).await;
    let _ = std::fs::remove_file(&key_path);
}

/// Whether `marker` is in the SQLite file at `db_path` or its log, as they are now.
fn in_sqlite_files(db_path: &str, marker: &str) -> bool {
    ["", "-wal"].iter().any(|suffix| {
        std::fs::read(format!("{db_path}{suffix}")).is_ok_and(|bytes| {
            bytes
                .windows(marker.len())
                .any(|window| window == marker.as_bytes())
        })
    })
}

/// A deleted instance's configuration (plain text but for its secrets) is gone from the SQLite
/// file and its log at once, while the service runs: not left in freed pages or old log
/// frames for whoever copies the file later. (Its name stays in its events, which outlive it.)
#[tokio::test]
async fn a_deleted_instance_leaves_no_plain_text_in_the_sqlite_files() {
    let sandbox = tokenwarden_sandbox::spawn(loopback(), Default::default())
        .await
        .unwrap();
    let database_url = sqlite_database();
    let db_path = database_url.strip_prefix("sqlite://").unwrap().to_string();
    let served = Served::start(&database_url, &sandbox.url, &[]);
    let org = create_org_with_binary(&database_url, &[]);
    let auth = format!(
        "User {}, Organization {}",
        org["userSecret"].as_str().unwrap(),
        org["organizationSecret"].as_str().unwrap()
    );
    let client = http();
    let note = "deleted-configuration-b84e0d57";
    let (code, state) = approve(&client, &served, &auth, "sandbox-generic", "gone").await;
    let (status, instance) = json_call(&client, Method::POST, &served.api("/instances"), &auth,
        Some(json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": code, "state": state},
            "configuration": {"oauth.api.key": CLIENT_ID, "oauth.api.secret": "deleted-client-secret", "customer.note": note}}))).await;
    assert_eq!(status, 200, "{instance}");
    assert!(in_sqlite_files(&db_path, note), "the note was never stored");
    let id = instance["id"].as_i64().unwrap();
    let (status, deleted) = json_call(
        &client,
        Method::DELETE,
        &served.api(&format!("/instances/{id}")),
        &auth,
        None,
    )
    .await;
    assert_eq!(status, 200, "{deleted}");
    assert!(
        !in_sqlite_files(&db_path, note),
        "the configuration is still in the files of the database after its instance's deletion"
    );
    // Another process reading the file (a backup, Litestream) keeps the log: a deletion does
    // not wait for it (the checkpoint held SQLite's one connection for its 5 s busy timeout).
    if let Ok(mut reader) = std::process::Command::new("sqlite3")
        .arg(&db_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        let mut input = reader.stdin.take().unwrap();
        writeln!(input, "BEGIN; SELECT 'reading', count(*) FROM instances;").unwrap();
        input.flush().unwrap();
        let mut output = BufReader::new(reader.stdout.take().unwrap());
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        assert!(line.starts_with("reading"), "{line}");
        let (code, state) = approve(&client, &served, &auth, "sandbox-generic", "kept").await;
        let (status, instance) = json_call(&client, Method::POST, &served.api("/instances"), &auth,
            Some(json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": code, "state": state},
                "configuration": {"oauth.api.key": CLIENT_ID, "oauth.api.secret": "deleted-client-secret"}}))).await;
        assert_eq!(status, 200, "{instance}");
        let started = std::time::Instant::now();
        let (status, deleted) = json_call(
            &client,
            Method::DELETE,
            &served.api(&format!("/instances/{}", instance["id"])),
            &auth,
            None,
        )
        .await;
        assert_eq!(status, 200, "{deleted}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "a deletion waited {:?} for another process's read",
            started.elapsed()
        );
        drop(input);
        let _ = reader.wait();
    }
    served.stop();
    // A clean stop leaves the file whole, its log written into it: a copy of the file alone
    // is a copy of the database.
    assert!(
        !std::path::Path::new(&format!("{db_path}-wal")).exists(),
        "a clean stop left the SQLite log beside the file"
    );
    sandbox.shutdown().await;
    drop_test_database(&database_url).await;
    let _ = std::fs::remove_file(format!("{db_path}.key"));
}

#[tokio::test]
async fn postgres_without_a_master_key_refuses_to_start() {
    for (label, url) in test_databases().await {
        if label != "postgres" {
            drop_test_database(&url).await;
            continue;
        }
        let output = binary()
            .args(["serve", "--bind", "127.0.0.1:0", "--database-url", &url])
            .output()
            .unwrap();
        assert!(
            !output.status.success(),
            "serve started on PostgreSQL without a master key"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("TOKENWARDEN_MASTER_KEY") && stderr.contains("openssl rand -base64 32"),
            "{stderr}"
        );
        drop_test_database(&url).await;
    }
}

#[tokio::test]
async fn ciphertext_copied_between_rows_does_not_open() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let a = env.create_instance(&env.org, "sandbox-box", "copy-a").await;
        let b = env.create_instance(&env.org, "sandbox-box", "copy-b").await;
        let (a_id, b_id) = (a["id"].as_i64().unwrap(), b["id"].as_i64().unwrap());
        let b_shown = crate::instances::revealed(&env, &env.org, &b).await;
        let b_access = b_shown["configuration"]["oauth.user.token"]
            .as_str()
            .unwrap()
            .to_string();
        let pool = env.server.app.store.pool();
        for column in ["access_token_enc", "client_secret_enc"] {
            let sql = format!(
                "UPDATE instances SET {column} = (SELECT {column} FROM instances WHERE id = $1) WHERE id = $2"
            );
            let done = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(b_id)
                .bind(a_id)
                .execute(pool)
                .await
                .unwrap();
            assert_eq!(done.rows_affected(), 1);
        }
        for auth in [
            env.org.with_element(a["token"].as_str().unwrap()),
            env.org.platform(),
        ] {
            let answer = call(
                &env,
                Method::GET,
                &env.api(&format!("/instances/{a_id}")),
                Some(&auth),
                None,
            )
            .await;
            // Shown as unreadable, as a list shows it, without the secrets.
            assert!(
                answer.status == 200 && answer.body["state"] == "unreadable",
                "[{label}] a copied ciphertext opened: {}",
                answer.body
            );
            assert!(
                !answer.body.to_string().contains(&b_access),
                "[{label}] {}",
                answer.body
            );
            assert_eq!(
                answer.body["token"],
                Value::Null,
                "[{label}] {}",
                answer.body
            );
        }
        let listed = call(
            &env,
            Method::GET,
            &env.api("/instances"),
            Some(&env.org.with_element(a["token"].as_str().unwrap())),
            None,
        )
        .await;
        assert!(!listed.body.to_string().contains(&b_access), "[{label}]");
        // The other instance is unaffected, and the organization's list still answers.
        let b_again = crate::instances::revealed(&env, &env.org, &b).await;
        assert_eq!(
            b_again["configuration"]["oauth.user.token"],
            b_access.as_str()
        );
        let all = call(
            &env,
            Method::GET,
            &env.api("/instances"),
            Some(&env.org.platform()),
            None,
        )
        .await;
        assert_eq!(
            all.status, 200,
            "[{label}] one damaged row breaks the list: {}",
            all.body
        );
        assert!(all.body.as_array().unwrap().iter().any(|i| i["id"] == b_id));
        env.stop().await;
    }
}

#[tokio::test]
async fn debug_output_is_redacted() {
    let env = Env::start("sqlite", &sqlite_database()).await;
    let instance = env
        .create_instance(&env.org, "sandbox-box", "debug-user")
        .await;
    let shown = crate::instances::revealed(&env, &env.org, &instance).await;
    let access = shown["configuration"]["oauth.user.token"]
        .as_str()
        .unwrap()
        .to_string();
    let element = instance["token"].as_str().unwrap().to_string();
    let app = &env.server.app;
    let row = app
        .store
        .get_instance(env.org.id, instance["id"].as_i64().unwrap())
        .await
        .unwrap()
        .unwrap();
    let secrets = tokenwarden::instances::open_secrets(app, &row).unwrap();
    assert_eq!(secrets.access_token.as_ref().unwrap().expose(), access);
    let mut config = tokenwarden::app::AppConfig::new("sqlite://x.db");
    config.master_key = Some(TEST_MASTER_KEY.into());
    config.previous_master_keys = Some(TEST_MASTER_KEY.into());
    let created = tokenwarden::orgs::create_organization(app, "debug org")
        .await
        .unwrap();
    let user = tokenwarden::orgs::create_user(app, created.organization_id, "u")
        .await
        .unwrap();
    let organization = app
        .store
        .get_organization(created.organization_id)
        .await
        .unwrap()
        .unwrap();
    let texts = [
        format!("{row:?}"),
        format!("{:?}", secrets.access_token),
        format!("{:?}", secrets.element_token),
        format!("{config:?}"),
        format!("{:?}", app.keyring),
        format!("{created:?}"),
        format!("{user:?}"),
        format!("{organization:?}"),
    ];
    for text in &texts {
        for secret in [
            access.as_str(),
            element.as_str(),
            TEST_MASTER_KEY,
            created.user_secret.as_str(),
            created.organization_secret.as_str(),
            user.user_secret.as_str(),
        ] {
            assert!(!text.contains(secret), "Debug shows a secret: {text}");
        }
    }
    assert!(texts[1].contains("redacted"));
    let url = env.database_url.clone();
    env.stop().await;
    drop_test_database(&url).await;
}
