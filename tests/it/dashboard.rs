//! The dashboard in real headless Chromium (Debian's `chromium`, driven by `tests/browser/
//! dashboard.mjs` with playwright-core): sign in, see the instance, revoke it at the sandbox,
//! watch it turn to "needs re-authentication", Reconnect through the provider's popup, valid
//! again; a screenshot is saved. `.ci/run` installs Chromium and the script's one package; with
//! `CI=true` their absence is a failure, elsewhere the test says it was skipped.

use std::path::Path;
use std::process::Command;

use crate::harness::Env;
use crate::support::test_databases;

fn browser_ready() -> Result<(), String> {
    let chromium = std::env::var("CHROMIUM_PATH").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Err(format!(
            "no Chromium at {chromium} (apt-get install chromium)"
        ));
    }
    if !Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/node_modules/playwright-core"
    ))
    .exists()
    {
        return Err("tests/browser has no node_modules (npm ci --prefix tests/browser)".into());
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("no node on PATH".into());
    }
    Ok(())
}

#[tokio::test]
async fn dashboard_reconnect_in_chromium() {
    if let Err(missing) = browser_ready() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the browser test cannot run under CI: {missing}");
        }
        eprintln!("SKIPPED dashboard_reconnect_in_chromium: {missing}");
        return;
    }
    for (label, url) in test_databases().await {
        dashboard_on(Env::start(&label, &url).await).await;
        crate::support::drop_test_database(&url).await;
    }
}

async fn dashboard_on(env: Env) {
    let instance = env
        .create_instance(&env.org, "sandbox-adobe-sign", "alice")
        .await;
    let screenshot =
        std::env::temp_dir().join(format!("tokenwarden-dashboard-{}.png", instance["id"]));
    let service = env.server.url.clone();
    let sandbox = env.sandbox.url.clone();
    let org = env.org.organization_secret.clone();
    let user = env.org.user_secret.clone();
    let id = instance["id"].to_string();
    let shot = screenshot.display().to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/browser/dashboard.mjs"
            ))
            .args([&service, &sandbox, &org, &user, &id, &shot])
            .output()
    })
    .await
    .unwrap()
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the dashboard scenario failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("valid again"), "{stdout}");
    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "the screenshot at {} is missing or empty",
        screenshot.display()
    );
    eprintln!("dashboard screenshot: {}", screenshot.display());
    env.stop().await;
}
