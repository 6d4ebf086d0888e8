//! The full isolation matrix: a second organization gets exactly what it gets for ids that do
//! not exist (404) on every instance endpoint, never sees the first one's connectors, events or
//! audit logs, and cannot combine its user with the first organization's Element token.

use reqwest::Method;
use serde_json::json;

use crate::elements::own_connector;
use crate::harness::Env;
use crate::instances::{assert_error, call, instances_of};
use crate::support::test_databases;

#[tokio::test]
async fn a_second_organization_sees_and_touches_nothing() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let a = &env.org;
        let b = env.new_org("b").await;
        let created = call(
            &env,
            Method::POST,
            &env.api("/elements"),
            Some(&a.platform()),
            Some(own_connector(&env, "a-own")),
        )
        .await;
        assert!(created.status < 300, "{}", created.body);
        let instance = env.create_instance(a, "sandbox-box", "ann").await;
        let id = instance["id"].as_i64().unwrap();
        let a_token = instance["token"].as_str().unwrap().to_string();
        let b_instance = env.create_instance(&b, "sandbox-box", "bert").await;
        let b_token = b_instance["token"].as_str().unwrap().to_string();
        let missing_id: i64 = 987_654_321;
        let before = env.sandbox_stats().await;

        let endpoints = |target: i64| {
            vec![
                (Method::GET, format!("/instances/{target}")),
                (Method::PATCH, format!("/instances/{target}")),
                (Method::PUT, format!("/instances/{target}")),
                (
                    Method::PUT,
                    format!("/instances/{target}?reAuthenticate=true"),
                ),
                (Method::DELETE, format!("/instances/{target}")),
                (Method::DELETE, format!("/instances/{target}?revoke=true")),
                (Method::PUT, format!("/instances/{target}/enabled")),
                (Method::DELETE, format!("/instances/{target}/enabled")),
                (Method::POST, format!("/instances/{target}/tokens/refresh")),
                (Method::POST, format!("/instances/{target}/tokens/revoke")),
            ]
        };
        let bodies = [
            json!({"name": "taken over", "tags": ["b"], "configuration": {"base.url": "http://evil.test/"}}),
            json!({"providerData": {"code": "x"}}),
        ];
        for auth in [b.platform(), b.with_element(&b_token)] {
            for ((method, path), (_, missing_path)) in
                endpoints(id).into_iter().zip(endpoints(missing_id))
            {
                for body in &bodies {
                    let theirs = call(
                        &env,
                        method.clone(),
                        &env.api(&path),
                        Some(&auth),
                        Some(body.clone()),
                    )
                    .await;
                    let context = format!("[{label}] {method} {path} as org B");
                    assert_error(&theirs, 404, &context);
                    let nothing = call(
                        &env,
                        method.clone(),
                        &env.api(&missing_path),
                        Some(&auth),
                        Some(body.clone()),
                    )
                    .await;
                    assert_eq!(nothing.status, 404, "{context} (missing id)");
                    assert_eq!(
                        theirs.body["message"]
                            .as_str()
                            .unwrap()
                            .replace(&id.to_string(), "ID"),
                        nothing.body["message"]
                            .as_str()
                            .unwrap()
                            .replace(&missing_id.to_string(), "ID"),
                        "{context}: other organization's id answered differently from a missing one"
                    );
                }
            }
        }
        // A's instance is untouched, and the provider was never called for it.
        let after = env.sandbox_stats().await;
        assert_eq!(after["token"], before["token"], "[{label}]");
        assert_eq!(after["revoke"], before["revoke"], "[{label}]");
        let mine = call(
            &env,
            Method::GET,
            &env.api(&format!("/instances/{id}")),
            Some(&a.platform()),
            None,
        )
        .await;
        assert_eq!(mine.status, 200);
        assert_eq!(mine.body["name"], instance["name"]);
        assert_eq!(mine.body["tags"], instance["tags"]);
        assert_eq!(mine.body["valid"], true);
        assert_eq!(mine.body["disabled"], false);
        assert_eq!(
            mine.body["configuration"]["base.url"],
            instance["configuration"]["base.url"]
        );
        let (status, _) = env.proxy(a, &a_token, Method::GET, "api/me").await;
        assert_eq!(status, 200);

        // Lists.
        let b_list = instances_of(&env, &b).await;
        assert_eq!(b_list.len(), 1);
        assert_eq!(b_list[0]["id"], b_instance["id"]);
        let tagged = call(
            &env,
            Method::GET,
            &env.api("/instances?tags[]=ann"),
            Some(&b.platform()),
            None,
        )
        .await;
        assert_eq!(tagged.body, json!([]), "[{label}]");

        // Connectors.
        let b_elements = call(
            &env,
            Method::GET,
            &env.api("/elements"),
            Some(&b.platform()),
            None,
        )
        .await;
        assert!(
            !b_elements
                .body
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["key"] == "a-own")
        );
        for (method, path) in [
            (Method::GET, "/elements/a-own"),
            (
                Method::GET,
                "/elements/a-own/oauth/url?apiKey=x&callbackUrl=http://x.test/cb",
            ),
            (Method::POST, "/elements/a-own/instances"),
            (Method::DELETE, "/elements/a-own"),
        ] {
            let answer = call(
                &env,
                method.clone(),
                &env.api(path),
                Some(&b.platform()),
                Some(json!({"providerData": {"code": "x"}})),
            )
            .await;
            assert_error(&answer, 404, &format!("[{label}] {method} {path} as org B"));
        }
        let still = call(
            &env,
            Method::GET,
            &env.api("/elements/a-own"),
            Some(&a.platform()),
            None,
        )
        .await;
        assert_eq!(
            still.status, 200,
            "[{label}] org B deleted org A's connector"
        );
        let by_key = call(&env, Method::POST, &env.api("/instances"), Some(&b.platform()),
                          Some(json!({"element": {"key": "a-own"}, "providerData": {"code": "x"}, "configuration": env.configuration()}))).await;
        assert!(
            by_key.status == 400 || by_key.status == 404,
            "[{label}] {}",
            by_key.body
        );

        // Events and audit logs.
        let a_events = call(
            &env,
            Method::GET,
            &env.api(&format!("/events?instanceId={id}")),
            Some(&a.platform()),
            None,
        )
        .await;
        assert_eq!(a_events.status, 200, "{}", a_events.body);
        assert!(
            !a_events.body["events"].as_array().unwrap().is_empty(),
            "[{label}] org A has events of its instance"
        );
        let b_events = call(
            &env,
            Method::GET,
            &env.api(&format!("/events?instanceId={id}")),
            Some(&b.platform()),
            None,
        )
        .await;
        let b_missing = call(
            &env,
            Method::GET,
            &env.api(&format!("/events?instanceId={missing_id}")),
            Some(&b.platform()),
            None,
        )
        .await;
        // Another organization's instance id is a 404, exactly as one that does not exist.
        assert_eq!(b_events.status, 404, "[{label}] {}", b_events.body);
        assert_eq!(b_missing.status, 404, "[{label}] {}", b_missing.body);
        assert_eq!(
            b_events.body["message"], b_missing.body["message"],
            "[{label}]"
        );
        let b_all_events = call(
            &env,
            Method::GET,
            &env.api("/events"),
            Some(&b.platform()),
            None,
        )
        .await;
        assert!(
            !b_all_events.body.to_string().contains(&id.to_string()),
            "[{label}] {}",
            b_all_events.body
        );
        let b_audit = call(
            &env,
            Method::GET,
            &env.api("/audit-logs"),
            Some(&b.platform()),
            None,
        )
        .await;
        assert_eq!(b_audit.status, 200);
        let text = b_audit.body.to_string();
        assert!(
            !text.contains(&id.to_string()) && !text.contains("a-own"),
            "[{label}] {text}"
        );
        let a_audit = call(
            &env,
            Method::GET,
            &env.api("/audit-logs"),
            Some(&a.platform()),
            None,
        )
        .await;
        assert!(
            !a_audit
                .body
                .to_string()
                .contains(&b_instance["id"].to_string()),
            "[{label}]"
        );

        // Mixed credentials: 401.
        for (auth, context) in [
            (
                format!("User {}, Element {a_token}", b.user_secret),
                "B's user, A's Element",
            ),
            (
                format!("{}, Element {a_token}", b.platform()),
                "B's user and org, A's Element",
            ),
            (
                format!(
                    "User {}, Organization {}",
                    b.user_secret, a.organization_secret
                ),
                "B's user, A's org",
            ),
            (
                format!(
                    "User {}, Organization {}",
                    a.user_secret, b.organization_secret
                ),
                "A's user, B's org",
            ),
        ] {
            let answer = call(&env, Method::GET, &env.api("/instances"), Some(&auth), None).await;
            assert_error(&answer, 401, &format!("[{label}] {context}"));
            let answer = call(
                &env,
                Method::GET,
                &env.api(&format!("/instances/{id}")),
                Some(&auth),
                None,
            )
            .await;
            assert_error(&answer, 401, &format!("[{label}] {context} by id"));
            let proxied = env
                .http
                .get(env.api("/proxy/api/me"))
                .header("authorization", &auth)
                .send()
                .await
                .unwrap();
            assert_eq!(
                proxied.status(),
                401,
                "[{label}] {context} through the proxy"
            );
        }
        let (status, _) = env.proxy(&b, &a_token, Method::GET, "api/me").await;
        assert_eq!(
            status, 401,
            "[{label}] B's user with A's Element token through the proxy"
        );
        env.stop().await;
    }
}
