//! The command line against a running server: tables and JSON, and clear errors when the server
//! is down or the secrets are wrong.

use std::process::Command;

use crate::harness::Env;
use crate::support::test_databases;

fn tokenwarden(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(args)
        .env_remove("TOKENWARDEN_USER_SECRET")
        .env_remove("TOKENWARDEN_ORG_SECRET")
        .envs(envs.iter().copied())
        .output()
        .expect("the binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn instances_and_connectors_from_the_command_line() {
    for (label, url) in test_databases().await {
        command_line_on(Env::start(&label, &url).await).await;
        crate::support::drop_test_database(&url).await;
    }
}

async fn command_line_on(env: Env) {
    let instance = env.create_instance(&env.org, "sandbox-box", "carol").await;
    let id = instance["id"].to_string();
    let server = env.server.url.clone();
    let user = env.org.user_secret.clone();
    let org = env.org.organization_secret.clone();
    let secrets = [
        ("TOKENWARDEN_URL", server.as_str()),
        ("TOKENWARDEN_USER_SECRET", user.as_str()),
        ("TOKENWARDEN_ORG_SECRET", org.as_str()),
    ];

    let run = |args: Vec<String>, envs: Vec<(String, String)>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let envs: Vec<(&str, &str)> =
                envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            tokenwarden(&args, &envs)
        })
    };
    let owned = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let (ok, stdout, stderr) = run(args(&["instances", "list"]), owned(&secrets))
        .await
        .unwrap();
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("ID"), "a table: {stdout}");
    assert!(
        stdout.contains(&id) && stdout.contains("sandbox-box") && stdout.contains("valid"),
        "{stdout}"
    );

    let (ok, stdout, _) = run(args(&["instances", "list", "--json"]), owned(&secrets))
        .await
        .unwrap();
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(listed[0]["id"].to_string(), id);
    assert_eq!(
        listed[0]["configuration"]["oauth.user.token"], "********",
        "masked without the Element token"
    );

    let (ok, stdout, stderr) = run(args(&["instances", "disable", &id]), owned(&secrets))
        .await
        .unwrap();
    assert!(ok, "{stderr}");
    assert!(stdout.contains("disabled"), "{stdout}");
    let (ok, stdout, _) = run(args(&["instances", "enable", &id]), owned(&secrets))
        .await
        .unwrap();
    assert!(ok && stdout.contains("valid"), "{stdout}");
    let (ok, stdout, stderr) = run(args(&["instances", "refresh", &id]), owned(&secrets))
        .await
        .unwrap();
    assert!(ok, "{stderr}");
    assert!(stdout.contains("valid"), "{stdout}");
    // A value holding terminal controls (a tenant's, or a provider's) is shown escaped: raw,
    // it cleared the operator's screen and set the terminal's title.
    let patched = env
        .http
        .patch(env.api(&format!("/instances/{id}")))
        .header("authorization", env.org.platform())
        .json(&serde_json::json!({"configuration": {"note": "\u{1b}]0;owned\u{7}\u{1b}[2Jhi", "bidi": "a\u{202e}b\u{2028}c", "c1": "x\u{7f}y\u{9b}z"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let (ok, stdout, _) = run(args(&["instances", "show", &id]), owned(&secrets))
        .await
        .unwrap();
    assert!(ok && stdout.contains("base.url"), "{stdout}");
    assert!(
        !stdout.contains('\u{1b}') && !stdout.contains('\u{7}'),
        "{stdout:?}"
    );
    assert!(stdout.contains("\\u{1b}]0;owned"), "{stdout:?}");
    assert!(
        !stdout.contains('\u{202e}') && stdout.contains("a\\u{202e}b\\u{2028}c"),
        "{stdout:?}"
    );
    // As JSON too, where serde writes DEL, C1 and bidirectional characters raw: escaped in
    // JSON's own way, so the same values are read back.
    let (ok, stdout, _) = run(args(&["instances", "show", &id, "--json"]), owned(&secrets))
        .await
        .unwrap();
    assert!(ok, "{stdout}");
    assert!(
        !stdout.chars().any(|c| matches!(
            c,
            '\u{1b}' | '\u{7}' | '\u{7f}' | '\u{9b}' | '\u{202e}' | '\u{2028}'
        )),
        "{stdout:?}"
    );
    let shown: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(shown["configuration"]["c1"], "x\u{7f}y\u{9b}z", "{stdout}");
    assert_eq!(
        shown["configuration"]["bidi"], "a\u{202e}b\u{2028}c",
        "{stdout}"
    );

    let (ok, stdout, _) = run(
        args(&["connectors", "list", "--category", "sandbox"]),
        owned(&secrets),
    )
    .await
    .unwrap();
    assert!(ok && stdout.contains("sandbox-adobe-sign"), "{stdout}");
    assert!(
        stdout
            .lines()
            .skip(1)
            .all(|line| line.starts_with("sandbox-")),
        "only the category asked: {stdout}"
    );

    // A category no connector has is a typo, named with the ones there are.
    let (ok, _, stderr) = run(
        args(&["connectors", "list", "--category", "CRM & more"]),
        owned(&secrets),
    )
    .await
    .unwrap();
    assert!(
        !ok && stderr.contains("the categories are") && stderr.contains("sandbox"),
        "{stderr}"
    );

    // Why a refresh is failing is shown where the state is: in the table and in `show`.
    env.sandbox_post(
        "/__sandbox/faults",
        serde_json::json!({"target": "token", "status": 503, "count": 1}),
    )
    .await;
    let (ok, _, _) = run(args(&["instances", "refresh", &id]), owned(&secrets))
        .await
        .unwrap();
    assert!(!ok, "the refresh met the provider's 503");
    let long_name = "n".repeat(150);
    let renamed = env
        .http
        .patch(env.api(&format!("/instances/{id}")))
        .header("authorization", env.org.platform())
        .json(&serde_json::json!({"name": long_name}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), 200);
    let (ok, stdout, stderr) = run(args(&["instances", "list"]), owned(&secrets))
        .await
        .unwrap();
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("refresh_failing") && stdout.contains("503"),
        "the reason is the failure: {stdout}"
    );
    assert!(
        !stdout.contains(&long_name) && stdout.contains('…'),
        "a long name is cut: {stdout}"
    );
    let (ok, stdout, _) = run(args(&["instances", "show", &id]), owned(&secrets))
        .await
        .unwrap();
    assert!(
        ok && stdout
            .lines()
            .any(|line| line.starts_with("lastRefreshFailure") && line.contains("503")),
        "{stdout}"
    );
    // A revocation the provider cannot make (no revocation endpoint) says so: the grant lives
    // on there, and it printed only the new state.
    crate::refresh::register_connector(
        &env,
        "unrevocable",
        serde_json::json!({"oauth": {
            "authorizationUrl": format!("{}/generic/authorize", env.sandbox.url.trim_end_matches('/')),
            "tokenUrl": format!("{}/generic/token", env.sandbox.url.trim_end_matches('/')),
            "clientAuth": "client_secret_post", "pkce": false}}),
    )
    .await;
    let unrevocable = env.create_instance(&env.org, "unrevocable", "una").await;
    let (ok, stdout, stderr) = run(
        args(&["instances", "revoke", &unrevocable["id"].to_string()]),
        owned(&secrets),
    )
    .await
    .unwrap();
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("NOT revoked at the provider") && stdout.contains("no revocation endpoint"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = run(args(&["instances", "revoke", &id]), owned(&secrets))
        .await
        .unwrap();
    assert!(ok && !stdout.contains("NOT revoked"), "{stdout}{stderr}");
    // The README's `$API` as --url is the server's URL with the base path.
    let with_base = format!("{server}/elements/api-v2/");
    let (ok, stdout, stderr) = run(
        args(&["instances", "list"]),
        owned(&[
            ("TOKENWARDEN_URL", with_base.as_str()),
            ("TOKENWARDEN_USER_SECRET", user.as_str()),
            ("TOKENWARDEN_ORG_SECRET", org.as_str()),
        ]),
    )
    .await
    .unwrap();
    assert!(ok && stdout.contains(&id), "{stderr}");
    let (ok, _, stderr) = run(
        args(&["instances", "list"]),
        owned(&[
            ("TOKENWARDEN_URL", "notaurl"),
            ("TOKENWARDEN_USER_SECRET", user.as_str()),
            ("TOKENWARDEN_ORG_SECRET", org.as_str()),
        ]),
    )
    .await
    .unwrap();
    assert!(!ok && stderr.contains("not an http(s) URL"), "{stderr}");

    let wrong = [
        ("TOKENWARDEN_URL", server.as_str()),
        ("TOKENWARDEN_USER_SECRET", "nope"),
        ("TOKENWARDEN_ORG_SECRET", org.as_str()),
    ];
    let (ok, _, stderr) = run(args(&["instances", "list"]), owned(&wrong))
        .await
        .unwrap();
    assert!(!ok);
    assert!(stderr.contains("refused the secrets"), "{stderr}");

    let down = [
        ("TOKENWARDEN_URL", "http://127.0.0.1:9"),
        ("TOKENWARDEN_USER_SECRET", user.as_str()),
        ("TOKENWARDEN_ORG_SECRET", org.as_str()),
    ];
    let (ok, _, stderr) = run(args(&["instances", "list"]), owned(&down))
        .await
        .unwrap();
    assert!(!ok);
    assert!(stderr.contains("does not answer"), "{stderr}");

    let (ok, _, stderr) = run(
        args(&["instances", "list"]),
        owned(&[("TOKENWARDEN_URL", server.as_str())]),
    )
    .await
    .unwrap();
    assert!(
        !ok && stderr.contains("TOKENWARDEN_USER_SECRET"),
        "{stderr}"
    );

    // A reader that stops (`connectors list | head -1`): the command ends quietly, without a
    // panic's backtrace on standard error.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["connectors", "list"])
        .envs(secrets.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    env.stop().await;
}

/// `serve` refuses settings it cannot honour, with a message and before it binds or opens a
/// database: no panic, no setting silently ignored (a worker count past the machine's threads
/// panicked in the runtime; a refresh rate below one in two
/// seconds deferred every scheduled refresh for ever). `--workers 0` means one per core.
#[test]
fn serve_refuses_settings_it_cannot_honour() {
    for (flag, value, words) in [
        ("--workers", "10000000", "--workers"),
        ("--refresh-rate", "1e-300", "--refresh-rate"),
        ("--refresh-rate", "-1", "--refresh-rate"),
        ("--database-pool-size", "0", "not in 1..=1000"),
        ("--metrics-token", "hunter2", "--metrics-token"),
        (
            "--metrics-token",
            "hunter2 hunter2 hunter2",
            "--metrics-token",
        ),
        ("--sandbox-url", "notaurl", "--sandbox-url"),
        (
            "--sandbox-url",
            "user:hunter2@sandbox.example:4000",
            "--sandbox-url",
        ),
        (
            "--sandbox-url",
            "ftp://u:hunter2@sandbox/",
            "not an http(s) URL",
        ),
    ] {
        let setting = format!("{flag}={value}");
        let (ok, _, stderr) = tokenwarden(
            &[
                "serve",
                "--bind",
                "127.0.0.1:0",
                // Never opened when the settings are refused; a database that cannot be
                // opened ends a `serve` that accepted them at once, instead of serving.
                "--database-url",
                "sqlite:///nonexistent-directory/tokenwarden.db",
                &setting,
            ],
            &[],
        );
        assert!(!ok, "{flag} {value} accepted");
        assert!(stderr.contains(words), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{flag} {value}: {stderr}");
    }
}

/// A database whose key is lost (restored without its key file) or mistyped: `serve` refuses
/// to start and names where its key came from, instead of starting healthy with a new key and
/// failing every read of a token and every webhook. No new key file is made beside a database
/// that holds sealed secrets (it would stand where the lost one belongs), and a refused start
/// changes nothing: migrations wait for a key that opens the database.
#[tokio::test]
async fn serve_refuses_a_key_that_opens_nothing_of_the_database() {
    let url = crate::support::sqlite_database();
    let path = tokenwarden::crypto::sqlite_path(&url).unwrap();
    let (ok, _, stderr) = tokenwarden(
        &["orgs", "create", "--name", "keyed", "--database-url", &url],
        &[],
    );
    assert!(ok, "{stderr}");
    let key = std::fs::read_to_string(format!("{path}.key")).unwrap();
    std::fs::remove_file(format!("{path}.key")).unwrap();
    // The database as an older release left it: the last migration not applied yet.
    let last_migration = {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
        let (last,): (i64,) = sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&mut db)
            .await
            .unwrap();
        sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
            .bind(last)
            .execute(&mut db)
            .await
            .unwrap();
        // What the last migration (0011) added, taken out again.
        sqlx::query("ALTER TABLE replicas DROP COLUMN sealing_key")
            .execute(&mut db)
            .await
            .unwrap();
        db.close().await.unwrap();
        last
    };
    let applied = || {
        let url = url.clone();
        async move {
            use sqlx::Connection;
            let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
            let (count,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations WHERE version = $1")
                    .bind(last_migration)
                    .fetch_one(&mut db)
                    .await
                    .unwrap();
            db.close().await.unwrap();
            count == 1
        }
    };
    let serve = |envs: Vec<(&'static str, String)>| {
        let url = url.clone();
        async move {
            let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
                .args(["serve", "--bind", "127.0.0.1:0", "--database-url", &url])
                .env_remove("TOKENWARDEN_MASTER_KEY")
                .envs(envs)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
                .await
                .expect("serve stopped instead of serving")
                .unwrap()
        }
    };
    let output = serve(vec![]).await;
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(said.contains(&format!("{path}.key is missing")), "{said}");
    assert!(
        !std::path::Path::new(&format!("{path}.key")).exists(),
        "a new key file was made beside a database with sealed secrets"
    );
    let (_, other) = tokenwarden::crypto::MasterKey::generate();
    let output = serve(vec![("TOKENWARDEN_MASTER_KEY", other.expose().to_string())]).await;
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(said.contains("TOKENWARDEN_MASTER_KEY"), "{said}");
    // It names the key the secrets are under (by id), the one to give.
    let id = tokenwarden::crypto::MasterKey::from_base64(key.trim())
        .unwrap()
        .id_hex();
    assert!(said.contains(&format!("sealed under key {id}")), "{said}");
    assert!(
        !applied().await,
        "a start with a wrong key migrated the database"
    );
    // With its own key, the database is brought up to date.
    let (ok, _, stderr) = tokenwarden(
        &["orgs", "create", "--name", "again", "--database-url", &url],
        &[("TOKENWARDEN_MASTER_KEY", key.trim())],
    );
    assert!(ok, "{stderr}");
    assert!(applied().await);
    let _ = std::fs::remove_file(format!("{path}.key"));
    crate::support::drop_test_database(&url).await;
}

/// Two replicas given different master keys on a new database, which holds nothing sealed for
/// the first check to try: the second is refused at its start (each sealed instances the
/// other could not open), and a replica with the first key (or, during a rotation, a new key
/// with the first one as a previous key) starts.
#[tokio::test]
async fn a_second_replica_with_another_key_is_refused_on_a_new_database() {
    use tokio::io::AsyncBufReadExt;
    let url = crate::support::sqlite_database();
    let (_, first_key) = tokenwarden::crypto::MasterKey::generate();
    let (_, other_key) = tokenwarden::crypto::MasterKey::generate();
    let spawn = |envs: Vec<(&'static str, String)>| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(["serve", "--bind", "127.0.0.1:0", "--database-url", &url])
            .env_remove("TOKENWARDEN_MASTER_KEY")
            .env_remove("TOKENWARDEN_PREVIOUS_MASTER_KEYS")
            .envs(envs)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    // Serving, or ended: (serving, what it said).
    let outcome = |mut child: tokio::process::Child| async move {
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut said = String::new();
        let serving = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("serving on ") {
                    return true;
                }
                said.push_str(&line);
                said.push('\n');
            }
            false
        })
        .await
        .expect("serve neither served nor ended");
        (serving, said, child)
    };
    // Started at the same moment, two with each key: the two with one key serve (the
    // database keeps one key check, and the starts on one SQLite file take turns: side by side
    // their migrations failed with "table already exists").
    let with = |key: &tokenwarden::secret::Secret| {
        outcome(spawn(vec![(
            "TOKENWARDEN_MASTER_KEY",
            key.expose().to_string(),
        )]))
    };
    let (a1, b1, a2, b2) = tokio::join!(
        with(&first_key),
        with(&other_key),
        with(&first_key),
        with(&other_key)
    );
    let said = format!("{}\n{}\n{}\n{}", a1.1, b1.1, a2.1, b2.1);
    assert!(a1.0 == a2.0 && b1.0 == b2.0 && a1.0 != b1.0, "{said}");
    // Whichever won is the database's key from now on.
    let (first_key, other_key) = if a1.0 {
        (first_key, other_key)
    } else {
        (other_key, first_key)
    };
    drop((a1, b1, a2, b2));
    let (serving, said, first) = outcome(spawn(vec![(
        "TOKENWARDEN_MASTER_KEY",
        first_key.expose().to_string(),
    )]))
    .await;
    assert!(serving, "{said}");
    let (serving, said, _) = outcome(spawn(vec![(
        "TOKENWARDEN_MASTER_KEY",
        other_key.expose().to_string(),
    )]))
    .await;
    assert!(!serving, "a replica with another key started");
    assert!(said.contains("key check"), "{said}");
    assert!(said.contains("TOKENWARDEN_MASTER_KEY"), "{said}");
    let (serving, said, same) = outcome(spawn(vec![(
        "TOKENWARDEN_MASTER_KEY",
        first_key.expose().to_string(),
    )]))
    .await;
    assert!(serving, "{said}");
    drop(same);
    let (serving, said, rotated) = outcome(spawn(vec![
        ("TOKENWARDEN_MASTER_KEY", other_key.expose().to_string()),
        (
            "TOKENWARDEN_PREVIOUS_MASTER_KEYS",
            first_key.expose().to_string(),
        ),
    ]))
    .await;
    assert!(serving, "{said}");
    drop((first, rotated));
    // Without a key, beside a database whose only sealed value is its key check: no key file
    // is made for it (one was, and every later start without the variable was refused).
    let path = tokenwarden::crypto::sqlite_path(&url).unwrap();
    let (serving, said, _) = outcome(spawn(vec![])).await;
    assert!(!serving, "{said}");
    assert!(said.contains(&format!("{path}.key is missing")), "{said}");
    assert!(!std::path::Path::new(&format!("{path}.key")).exists());
    crate::support::drop_test_database(&url).await;
}

/// `tokenwarden demo` walks its steps and exits 0, also on a machine whose environment names an
/// HTTP proxy for other traffic (one that answers nothing here): the service's calls did not
/// reach the sandbox on loopback through it, and a proxy would resolve names past the egress
/// guard.
#[test]
fn the_demo_holds_with_a_proxy_in_the_environment() {
    let output = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .arg("demo")
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("ALL_PROXY", "http://127.0.0.1:9")
        .env("http_proxy", "http://127.0.0.1:9")
        .env("https_proxy", "http://127.0.0.1:9")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("NO_COLOR", "1")
        .output()
        .expect("the binary runs");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!said.contains("[FAIL]") && said.contains("[ok]"), "{said}");
}

/// `--help` shows which variables a flag reads, never their values: a database URL or a proxy
/// carries a password, a server URL may carry user info.
#[test]
fn help_never_shows_the_environment_values() {
    let envs = [
        ("TOKENWARDEN_DATABASE_URL", "postgres://u:hunter2-db@h/db"),
        (
            "TOKENWARDEN_OUTBOUND_PROXY",
            "http://u:hunter2-proxy@proxy:3128",
        ),
        ("TOKENWARDEN_URL", "https://u:hunter2-url@tw.example"),
        (
            "TOKENWARDEN_SANDBOX_URL",
            "http://u:hunter2-sandbox@sb.example",
        ),
        (
            "TOKENWARDEN_MASTER_KEY",
            "aHVudGVyMi1rZXktaHVudGVyMi1rZXktaHVudGVyMg==",
        ),
    ];
    for command in [
        &["serve", "--help"][..],
        &["orgs", "create", "--help"],
        &["instances", "list", "--help"],
    ] {
        let (ok, stdout, stderr) = tokenwarden(command, &envs);
        assert!(ok, "{command:?}: {stderr}");
        assert!(
            !stdout.contains("hunter2") && !stderr.contains("hunter2"),
            "{command:?} showed a value: {stdout}"
        );
    }
}

/// A database that refuses connections is named in the error with the cause (it said "pool
/// timed out while waiting for an open connection"), and without the URL's password, after the
/// wait a starting database is given.
#[test]
fn a_database_that_refuses_connections_is_named_at_once() {
    let started = std::time::Instant::now();
    let (ok, _, stderr) = tokenwarden(
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--database-url",
            "postgres://postgres:hunter2-db@127.0.0.1:1/nothing",
        ],
        &[(
            "TOKENWARDEN_MASTER_KEY",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )],
    );
    assert!(!ok);
    assert!(
        stderr.contains("127.0.0.1:1") && stderr.to_lowercase().contains("refused"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

/// A port in use is named as such (it was "could not build the HTTP client"), and a database
/// URL of no use (a bare file name, another database's scheme, `sqlite://` without a path) is
/// refused as a URL before anything is made (it was taken for PostgreSQL and asked for a
/// master key; `sqlite://` made an organization in memory and a key file in the current
/// directory, and exited 0).
#[test]
fn a_port_in_use_and_a_database_url_of_no_use_are_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let url = crate::support::sqlite_database();
    let (ok, _, stderr) = tokenwarden(&["serve", "--bind", &addr, "--database-url", &url], &[]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(&format!("could not listen on {addr}")) && !stderr.contains("HTTP client"),
        "{stderr}"
    );
    let dir = std::env::temp_dir().join(format!("tw-urls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for bad in ["tokenwarden.db", "mysql://db.example/tw", "sqlite://"] {
        let output = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(["orgs", "create", "--name", "x", "--database-url", bad])
            .env_remove("TOKENWARDEN_MASTER_KEY")
            .current_dir(&dir)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{bad}: {said}");
        assert!(said.contains("database URL"), "{bad}: {said}");
        assert!(!said.contains("PostgreSQL every replica"), "{bad}: {said}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "{bad}: a file was made"
        );
    }
    // An in-memory database for an administrative command: refused (its organization would
    // end with it), and no key file made in the current directory.
    let output = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args([
            "orgs",
            "create",
            "--name",
            "x",
            "--database-url",
            "sqlite::memory:",
        ])
        .env_remove("TOKENWARDEN_MASTER_KEY")
        .current_dir(&dir)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && said.contains("in-memory"),
        "{said}"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "a file was made"
    );
    // A master key that does not parse is said before the database is made.
    let url = format!("sqlite://{}/new.db", dir.display());
    let output = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["orgs", "create", "--name", "x", "--database-url", &url])
        .env("TOKENWARDEN_MASTER_KEY", "not-a-key!")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && said.contains("TOKENWARDEN_MASTER_KEY"),
        "{said}"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "the database was made"
    );
    std::fs::remove_dir_all(&dir).ok();
    drop(taken);
}

/// Administrative commands with a mistyped SQLite path or a name that is refused leave no
/// database behind: `keys rotate` made a new one, said it had re-encrypted 0 rows and exited
/// 0; `orgs create --name ""` failed after it had made one.
#[test]
fn a_mistyped_database_or_a_refused_name_makes_no_database() {
    let dir = std::env::temp_dir().join(format!("tw-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("typo.db");
    let url = format!("sqlite://{}", file.display());
    let (ok, _, stderr) = tokenwarden(&["keys", "rotate", "--database-url", &url], &[]);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("no database"), "{stderr}");
    let (ok, _, stderr) = tokenwarden(
        &[
            "users",
            "create",
            "--organization-id",
            "1",
            "--name",
            "u",
            "--database-url",
            &url,
        ],
        &[],
    );
    assert!(!ok, "{stderr}");
    for name in ["", "a\nb"] {
        let (ok, _, stderr) = tokenwarden(
            &["orgs", "create", "--name", name, "--database-url", &url],
            &[],
        );
        assert!(!ok, "{name:?}: {stderr}");
        assert!(stderr.contains("name"), "{stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "files made: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--bind` takes a name with its port (`localhost:0`), as most servers do: it was refused as
/// "invalid socket address syntax", and only an IP literal served.
#[test]
fn serve_binds_a_named_address() {
    use std::io::BufRead;
    let url = crate::support::sqlite_database();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["serve", "--bind", "localhost:0", "--database-url", &url])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let stderr = child.stderr.take().unwrap();
    let mut said = Vec::new();
    let announced = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .inspect(|line| said.push(line.clone()))
        .find_map(|line| line.split("serving on ").nth(1).map(str::to_string));
    let _ = child.kill();
    let _ = child.wait();
    let path = url.trim_start_matches("sqlite://");
    for suffix in ["", "-wal", "-shm", ".key"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
    let announced = announced.unwrap_or_else(|| panic!("not served: {said:?}"));
    assert!(announced.contains("127.0.0.1:"), "{announced}");
}

/// A leaked user or organization secret is replaced from the command line, and a user who
/// left is deleted: the old secret is refused by the running server at once, the new one
/// works, and the audit log says so. There was no way to revoke either (a privacy reviewer).
#[tokio::test]
async fn leaked_secrets_are_replaced_and_users_deleted() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let key = [("TOKENWARDEN_MASTER_KEY", crate::harness::TEST_MASTER_KEY)];
        let org_id = env.org.id.to_string();
        // A command on the test's database: (succeeded, stdout, stderr).
        let command = |args: &[&str]| {
            let mut all = args.to_vec();
            all.extend(["--database-url", &url]);
            tokenwarden(&all, &key)
        };
        let run = |args: &[&str]| {
            let (ok, stdout, stderr) = command(args);
            assert!(ok, "[{label}] {args:?}: {stderr}");
            serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
        };
        let listed = run(&["users", "list", "--organization-id", &org_id]);
        let owner = listed[0]["userId"].as_i64().unwrap().to_string();
        assert!(listed[0].get("userSecret").is_none(), "{listed}");
        let instances = env.api("/instances");
        let status = |auth: String| {
            let (http, instances) = (env.http.clone(), instances.clone());
            async move {
                http.get(&instances)
                    .header("authorization", auth)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        assert_eq!(status(env.org.platform()).await, 200);
        // The user's secret leaked.
        let rotated = run(&[
            "users",
            "rotate-secret",
            "--organization-id",
            &org_id,
            "--user-id",
            &owner,
        ]);
        let user_secret = rotated["userSecret"].as_str().unwrap().to_string();
        assert_eq!(
            status(env.org.platform()).await,
            401,
            "[{label}] the old user secret"
        );
        let with_user =
            |user: &str, organization: &str| format!("User {user}, Organization {organization}");
        assert_eq!(
            status(with_user(&user_secret, &env.org.organization_secret)).await,
            200
        );
        // The organization's secret leaked.
        let rotated = run(&["orgs", "rotate-secret", "--organization-id", &org_id]);
        let organization_secret = rotated["organizationSecret"].as_str().unwrap().to_string();
        assert_eq!(
            status(with_user(&user_secret, &env.org.organization_secret)).await,
            401
        );
        assert_eq!(
            status(with_user(&user_secret, &organization_secret)).await,
            200
        );
        // A second user, who leaves.
        let leaver = run(&[
            "users",
            "create",
            "--organization-id",
            &org_id,
            "--name",
            "leaver",
        ]);
        let leaver_secret = leaver["userSecret"].as_str().unwrap().to_string();
        assert_eq!(
            status(with_user(&leaver_secret, &organization_secret)).await,
            200
        );
        let leaver_id = leaver["userId"].as_i64().unwrap().to_string();
        run(&[
            "users",
            "delete",
            "--organization-id",
            &org_id,
            "--user-id",
            &leaver_id,
        ]);
        assert_eq!(
            status(with_user(&leaver_secret, &organization_secret)).await,
            401
        );
        // Unknown ids are said to be so.
        let (ok, _, stderr) = command(&[
            "users",
            "delete",
            "--organization-id",
            &org_id,
            "--user-id",
            &leaver_id,
        ]);
        assert!(!ok && stderr.contains("no user"), "{stderr}");
        // Not the last user: the organization could make no platform call without one.
        let (ok, _, stderr) = command(&[
            "users",
            "delete",
            "--organization-id",
            &org_id,
            "--user-id",
            &owner,
        ]);
        assert!(!ok && stderr.contains("last user"), "[{label}] {stderr}");
        assert_eq!(
            status(with_user(&user_secret, &organization_secret)).await,
            200
        );
        let (_, audit) = env
            .get_json(
                &env.api("/audit-logs"),
                &with_user(&user_secret, &organization_secret),
            )
            .await;
        let actions: Vec<&str> = audit["auditLogs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|entry| entry["action"].as_str())
            .collect();
        for action in [
            "user.secret_rotated",
            "organization.secret_rotated",
            "user.deleted",
        ] {
            assert!(actions.contains(&action), "[{label}] {action}: {actions:?}");
        }
        env.stop().await;
        crate::support::drop_test_database(&url).await;
    }
}

/// A damaged SQLite file (a backup copied over one whose leftover `-wal` SQLite replays onto
/// it) is refused at the start, with how to restore: it started healthy, and its refreshes and
/// event reads failed with 500s.
#[test]
fn serve_refuses_a_damaged_sqlite_file() {
    let url = crate::support::sqlite_database();
    let path = tokenwarden::crypto::sqlite_path(&url).unwrap();
    let (ok, _, stderr) = tokenwarden(
        &[
            "orgs",
            "create",
            "--name",
            "damaged",
            "--database-url",
            &url,
        ],
        &[],
    );
    assert!(ok, "{stderr}");
    // Every page but the first (the header and the schema) overwritten, and no log left
    // beside the file whose copies of the pages SQLite would read instead.
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 8192, "{} bytes", bytes.len());
    for byte in &mut bytes[4096..] {
        *byte = 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    // Bounded: a service that starts on it serves until stopped.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["serve", "--bind", "127.0.0.1:0", "--database-url", &url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        status.is_some_and(|status| !status.success()),
        "served a damaged file: {stderr}"
    );
    assert!(
        stderr.contains("is damaged") && stderr.contains(".restore"),
        "{stderr}"
    );
    for suffix in ["", ".key", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
}
