//! Inputs the fuzz targets (`fuzz/`, issue #8) found, kept as plain tests.

use serde_json::Map;
use tokenwarden::app::{App, AppConfig};
use tokenwarden::catalog;
use tokenwarden::instances::{MIN_SCHEDULED_INTERVAL_MS, apply_token_set, next_due_at};

use crate::support::sqlite_database;

const NOW: i64 = 1_767_225_600_000;

fn connector(key: &str) -> catalog::Connector {
    catalog::load_built_in()
        .unwrap()
        .into_iter()
        .find(|c| c.key == key)
        .unwrap()
}

/// fuzz/token_response: `"expires_in": 1e17` (and a refresh-token lifetime of 1e17 s as a
/// string) overflowed `now + seconds * 1000`: a panic in debug builds, an expiry in the past in
/// release builds (every call refreshing first). Such a lifetime now means "far ahead".
#[tokio::test]
async fn absurd_token_lifetimes_mean_far_ahead() {
    tokenwarden::app::install_crypto_provider();
    let mut config = AppConfig::new(sqlite_database());
    config.master_key = Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string());
    config.background_tasks = false;
    let app = App::build(config).await.unwrap();
    let connector = connector("sandbox-generic");
    let applied_for = |body: &[u8]| {
        let tokens = tokenwarden::oauth::parse_token_response(
            200,
            Some("application/json"),
            body,
            &connector.oauth,
        )
        .unwrap();
        apply_token_set(&app, &connector, 1, &tokens, None, &Map::new(), NOW)
    };
    let applied = applied_for(br#"{"access_token":"a1b2c3d4","refresh_token":"r1","expires_in":1e17,"refresh_token_expires_in":"99999999999999999"}"#);
    // Lives past a hundred years are no expiry at all (they were dates no calendar shows).
    assert_eq!(applied.update.access_expires_at, None);
    assert_eq!(applied.update.refresh_expires_at, None);
    if let Some(due) = applied.update.next_due_at {
        assert!(due > NOW + 86_400_000 / 2, "due too soon: {due}");
    }
    // Just under a hundred years: far ahead, without overflow.
    let applied = applied_for(br#"{"access_token":"a1b2c3d4","refresh_token":"r1","expires_in":3000000000,"refresh_token_expires_in":"3000000000"}"#);
    let access = applied.update.access_expires_at.unwrap();
    let refresh = applied.update.refresh_expires_at.unwrap();
    assert!(access > NOW + 90 * 365 * 86_400_000, "{access}");
    assert!(refresh > NOW + 90 * 365 * 86_400_000, "{refresh}");
    let due = applied.update.next_due_at.unwrap();
    assert!(due > NOW + 86_400_000 / 2, "due too soon: {due}");
}

/// fuzz/connector_definition: an organization connector with `keepAliveSeconds` of 1e16
/// passed validation and overflowed the schedule (in release builds: a refresh every second).
#[test]
fn a_huge_keep_alive_does_not_overflow_the_schedule() {
    let mut connector = connector("sandbox-generic");
    connector.refresh.keep_alive_seconds = Some(10_000_000_000_000_000);
    for keep_alive in [10_000_000_000_000_000, u64::MAX] {
        connector.refresh.keep_alive_seconds = Some(keep_alive);
        let due = next_due_at(&connector, true, Some(NOW + 3_600_000), None, NOW).unwrap();
        assert!(due >= NOW + MIN_SCHEDULED_INTERVAL_MS, "{due}");
        assert!(
            due <= NOW + 3_600_000,
            "the access token's expiry still decides: {due}"
        );
        let idle = next_due_at(&connector, true, None, None, NOW).unwrap();
        assert!(
            idle > NOW + 100 * 365 * 86_400_000,
            "keep-alive far ahead, not past: {idle}"
        );
    }
}

/// fuzz/proxy_confine: a `base.url` whose string ends in characters the URL parser strips
/// (spaces, control characters) was joined as a string but checked as parsed, so the path
/// landed beside the base path (`/v1%20/users` for the base `/v1`).
#[test]
fn a_base_url_with_trailing_junk_keeps_paths_under_it() {
    for base in [
        "https://api.example.com/v1 ",
        "https://api.example.com/v1\u{e}\0",
        " https://api.example.com/v1/\t",
    ] {
        let url = tokenwarden::proxy::confine(base, "users/me", Some("a=1")).unwrap();
        assert_eq!(
            url.to_string(),
            "https://api.example.com/v1/users/me?a=1",
            "{base:?}"
        );
    }
}

/// fuzz/proxy_confine: a base path ending in `//` lost all its trailing slashes, so the path
/// went to the base's parent (`/api/x` for the base `/api//`).
#[test]
fn a_base_path_keeps_its_empty_last_segment() {
    let url = tokenwarden::proxy::confine("https://api.example.com/api//", "x", None).unwrap();
    assert_eq!(url.path(), "/api//x");
    let url = tokenwarden::proxy::confine("https://api.example.com/api/", "x", None).unwrap();
    assert_eq!(url.path(), "/api/x");
    let url = tokenwarden::proxy::confine("https://api.example.com", "x", None).unwrap();
    assert_eq!(url.path(), "/x");
}

/// fuzz/proxy_confine: `..` checks ran on `/`-separated segments, but a `#` or `?` in the path
/// ends the URL's path inside a segment: `%2e.#x` is `..` to the URL parser, which then popped
/// the base's empty last segment (`/api//` → `/api/`).
#[test]
fn fragments_and_queries_in_the_path_are_refused() {
    for path in ["%2e.#om", "users/..#x", "..?x=1", "a?b", "a#b"] {
        let refused = tokenwarden::proxy::confine("https://api.example.com/api//", path, None);
        assert!(refused.is_err(), "{path:?} accepted: {refused:?}");
    }
}

/// The fuzz targets' checks (`fuzz/src/lib.rs`), compiled with the suite, so that a change of
/// the library they call cannot leave them broken unseen (the fuzz crate is a workspace of its
/// own, which `cargo test --workspace` does not build: a new `HeaderError` variant broke it
/// once), and run over their seed corpora.
#[path = "../../fuzz/src/lib.rs"]
mod fuzz_checks;

#[test]
fn the_fuzz_checks_hold_on_their_seed_corpora() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus");
    type Check = fn(&[u8]);
    let targets: [(&str, Check); 4] = [
        ("authorization_header", fuzz_checks::authorization_header),
        ("token_response", fuzz_checks::token_response),
        ("proxy_confine", fuzz_checks::proxy_confine),
        ("connector_definition", fuzz_checks::connector_definition),
    ];
    for (name, check) in targets {
        let mut seen = 0;
        for entry in std::fs::read_dir(format!("{root}/{name}")).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            check(&data);
            seen += 1;
        }
        assert!(seen > 0, "{name}: no seeds");
    }
    // The checks' own database, made beside the process's temporary files.
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("tokenwarden-fuzz-{}", std::process::id())),
    );
}
