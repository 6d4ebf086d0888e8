//! The "Instances" section of the contract, endpoint by endpoint, on both engines: create (from a
//! code, from imported tokens, failures that create nothing), the instance JSON and its masking,
//! listing and tags, re-authentication and updates (`PATCH`, `PUT`), enable/disable, refresh,
//! revoke, delete, the callback page, users and the audit log, authentication, bad input.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{CLIENT_ID, CLIENT_SECRET, Env, Org};
use crate::support::{drop_test_database, test_databases};

pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub request_id: Option<String>,
    pub content_type: Option<String>,
}

/// One platform call: JSON in (when given), JSON (or text) out.
pub async fn call(
    env: &Env,
    method: Method,
    url: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let mut request = env.http.request(method, url);
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    reply(response).await
}

pub async fn reply(response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let request_id = header("x-request-id");
    let content_type = header("content-type");
    let text = response.text().await.unwrap();
    Reply {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        request_id,
        content_type,
    }
}

/// Asserts the error shape of the contract: JSON with `requestId` (the `X-Request-Id` header) and
/// a non-empty `message`.
pub fn assert_error(reply: &Reply, status: u16, context: &str) {
    assert_eq!(reply.status, status, "{context}: {}", reply.body);
    let message = reply.body["message"].as_str().unwrap_or_default();
    assert!(
        !message.is_empty(),
        "{context}: no message in {}",
        reply.body
    );
    let request_id = reply.body["requestId"].as_str().unwrap_or_default();
    assert!(
        !request_id.is_empty(),
        "{context}: no requestId in {}",
        reply.body
    );
    assert_eq!(
        reply.request_id.as_deref(),
        Some(request_id),
        "{context}: X-Request-Id"
    );
    assert!(
        reply
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("application/json")),
        "{context}: content type {:?}",
        reply.content_type
    );
}

pub async fn instances_of(env: &Env, org: &Org) -> Vec<Value> {
    let listed = call(
        env,
        Method::GET,
        &env.api("/instances"),
        Some(&org.platform()),
        None,
    )
    .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    listed.body.as_array().unwrap().clone()
}

pub async fn stats(env: &Env) -> Value {
    env.sandbox_stats().await
}

fn id_of(instance: &Value) -> i64 {
    instance["id"].as_i64().unwrap()
}

/// What a given instance answers with its Element token (secrets revealed).
pub async fn revealed(env: &Env, org: &Org, instance: &Value) -> Value {
    let token = instance["token"].as_str().unwrap();
    let got = call(
        env,
        Method::GET,
        &env.api(&format!("/instances/{}", id_of(instance))),
        Some(&org.with_element(token)),
        None,
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    got.body
}

#[tokio::test]
async fn create_from_code_shows_the_contract_fields_masked() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let before = stats(&env).await;
        let instance = env
            .create_instance(&env.org, "sandbox-adobe-sign", "alice")
            .await;
        for field in [
            "id",
            "name",
            "token",
            "element",
            "valid",
            "disabled",
            "tags",
            "createdDate",
            "updatedDate",
            "configuration",
        ] {
            assert!(
                instance.get(field).is_some(),
                "[{label}] `{field}` missing from {instance}"
            );
        }
        assert!(instance["id"].is_i64());
        assert_eq!(instance["name"], "alice's sandbox-adobe-sign");
        assert_eq!(instance["element"]["key"], "sandbox-adobe-sign");
        assert_eq!(instance["valid"], true);
        assert_eq!(instance["disabled"], false);
        assert_eq!(instance["tags"], json!(["it", "alice"]));
        assert!(instance["createdDate"].as_str().unwrap().starts_with("20"));
        assert!(instance["updatedDate"].as_str().unwrap().starts_with("20"));
        assert_eq!(instance["verification"]["ok"], true, "[{label}] {instance}");
        let configuration = &instance["configuration"];
        for key in [
            "oauth.user.token",
            "oauth.user.refresh_token",
            "oauth.user.refresh_time",
            "oauth.token.refresh_url",
            "oauth.callback.url",
            "oauth.api.key",
            "oauth.api.secret",
            "base.url",
            "oauth.user.refresh_interval",
        ] {
            assert!(
                configuration.get(key).is_some(),
                "[{label}] configuration `{key}` missing: {configuration}"
            );
        }
        assert_eq!(configuration["oauth.api.key"], CLIENT_ID);
        assert_eq!(configuration["oauth.callback.url"], env.callback());
        assert!(
            configuration["oauth.token.refresh_url"]
                .as_str()
                .unwrap()
                .ends_with("/adobe-sign/oauth/v2/refresh")
        );
        assert!(
            configuration["base.url"]
                .as_str()
                .unwrap()
                .starts_with(&env.sandbox.url),
            "{configuration}"
        );
        assert!(
            configuration["oauth.user.refresh_time"]
                .as_str()
                .unwrap()
                .parse::<i64>()
                .unwrap()
                > 1_600_000_000_000
        );
        assert!(
            configuration["oauth.user.refresh_interval"]
                .as_str()
                .unwrap()
                .parse::<i64>()
                .unwrap()
                > 0
        );
        // The create answer does not carry the Element token: secrets are masked.
        let masked_answer = instance.to_string();
        assert!(
            !masked_answer.contains(CLIENT_SECRET),
            "[{label}] client secret shown on create"
        );
        let after = stats(&env).await;
        assert_eq!(
            after["token"]["authorization_code"].as_i64().unwrap(),
            before["token"]["authorization_code"].as_i64().unwrap() + 1
        );

        // With the instance's Element token: shown. Without: masked.
        let shown = revealed(&env, &env.org, &instance).await;
        let access = shown["configuration"]["oauth.user.token"]
            .as_str()
            .unwrap()
            .to_string();
        let refresh = shown["configuration"]["oauth.user.refresh_token"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(shown["configuration"]["oauth.api.secret"], CLIENT_SECRET);
        assert!(
            access.len() > 10 && refresh.len() > 10 && access != refresh,
            "[{label}] {shown}"
        );
        assert!(
            !masked_answer.contains(&access) && !masked_answer.contains(&refresh),
            "[{label}] tokens shown on create"
        );
        let by_org = call(
            &env,
            Method::GET,
            &env.api(&format!("/instances/{}", id_of(&instance))),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(by_org.status, 200);
        let text = by_org.body.to_string();
        assert!(
            !text.contains(&access) && !text.contains(&refresh) && !text.contains(CLIENT_SECRET),
            "[{label}] {text}"
        );
        assert_eq!(by_org.body["configuration"]["oauth.user.token"], "********");
        assert_eq!(by_org.body["configuration"]["oauth.api.secret"], "********");
        assert_eq!(by_org.body["token"], instance["token"]);

        // Another instance's Element token does not reveal this one.
        let second = env.create_instance(&env.org, "sandbox-box", "bob").await;
        let cross = call(
            &env,
            Method::GET,
            &env.api(&format!("/instances/{}", id_of(&instance))),
            Some(&env.org.with_element(second["token"].as_str().unwrap())),
            None,
        )
        .await;
        assert_eq!(cross.status, 200, "[{label}] {}", cross.body);
        assert!(
            !cross.body.to_string().contains(&access),
            "[{label}] revealed with another Element token"
        );
        // `User` and `Element` alone (what calls through the instance carry) are no platform
        // credentials (the contract's `User, Organization[, Element]`): they read the
        // instance's refresh token and client secret, and repointed or deleted it.
        for method in [Method::GET, Method::DELETE] {
            let own = call(
                &env,
                method.clone(),
                &env.api(&format!("/instances/{}", id_of(&instance))),
                Some(&env.org.through(instance["token"].as_str().unwrap())),
                None,
            )
            .await;
            assert_error(&own, 401, &label);
            assert!(
                !own.body.to_string().contains(&access),
                "[{label}] {}",
                own.body
            );
        }

        // POST /elements/{key}/instances: the same without `element` in the body.
        let (code, state) = env.authorize(&env.org, "sandbox-microsoft", "carol").await;
        let by_path = call(&env, Method::POST, &env.api("/elements/sandbox-microsoft/instances"), Some(&auth),
                           Some(json!({"providerData": {"code": code, "state": state}, "configuration": env.configuration(),
                                       "name": "carol", "tags": ["qa"]}))).await;
        assert_eq!(by_path.status, 200, "[{label}] {}", by_path.body);
        assert_eq!(by_path.body["element"]["key"], "sandbox-microsoft");
        assert_eq!(by_path.body["verification"]["ok"], true);
        let (status, _) = env
            .proxy(
                &env.org,
                by_path.body["token"].as_str().unwrap(),
                Method::GET,
                "v1.0/me",
            )
            .await;
        assert_eq!(status, 200, "[{label}]");

        // GET /instances: the organization's; with an Element token, that one alone.
        let all = instances_of(&env, &env.org).await;
        assert_eq!(all.len(), 3, "[{label}]");
        assert!(!Value::Array(all.clone()).to_string().contains(&access));
        let alone = call(
            &env,
            Method::GET,
            &env.api("/instances"),
            Some(&env.org.with_element(instance["token"].as_str().unwrap())),
            None,
        )
        .await;
        assert_eq!(alone.status, 200);
        let alone = alone.body.as_array().unwrap();
        assert_eq!(alone.len(), 1, "[{label}]");
        assert_eq!(alone[0]["id"], instance["id"]);
        assert_eq!(
            alone[0]["configuration"]["oauth.user.token"],
            access.as_str()
        );
        // tags[] filter, as a browser or the articles' Swagger page encodes it, and repeated.
        for (query, expected) in [
            ("?tags[]=qa", vec![id_of(&by_path.body)]),
            ("?tags%5B%5D=qa", vec![id_of(&by_path.body)]),
            ("?tags[]=alice", vec![id_of(&instance)]),
            ("?tags[]=it", vec![id_of(&instance), id_of(&second)]),
            (
                "?tags[]=alice&tags[]=qa",
                vec![id_of(&instance), id_of(&by_path.body)],
            ),
            ("?tags[]=nobody", vec![]),
            ("?tags=qa", vec![id_of(&by_path.body)]),
        ] {
            let filtered = call(
                &env,
                Method::GET,
                &env.api(&format!("/instances{query}")),
                Some(&auth),
                None,
            )
            .await;
            assert_eq!(filtered.status, 200, "[{label}] {query}: {}", filtered.body);
            let mut ids: Vec<i64> = filtered
                .body
                .as_array()
                .unwrap()
                .iter()
                .map(id_of)
                .collect();
            let mut expected = expected.clone();
            ids.sort();
            expected.sort();
            assert_eq!(ids, expected, "[{label}] {query}");
        }
        // Another spelling of the filter is refused, not ignored (the whole list came back).
        for query in ["?tags[0]=qa", "?tags[][]=qa"] {
            let refused = call(
                &env,
                Method::GET,
                &env.api(&format!("/instances{query}")),
                Some(&auth),
                None,
            )
            .await;
            assert_error(&refused, 400, &format!("{label} {query}"));
        }
        // With an Element token, that instance alone whatever the query (the contract: a
        // one-element array).
        let element = env.org.with_element(instance["token"].as_str().unwrap());
        let alone = call(
            &env,
            Method::GET,
            &env.api("/instances?tags[]=qa"),
            Some(&element),
            None,
        )
        .await;
        assert_eq!(alone.status, 200, "[{label}] {}", alone.body);
        assert_eq!(alone.body.as_array().unwrap().len(), 1, "[{label}]");
        let missing = call(
            &env,
            Method::GET,
            &env.api("/instances/123456789"),
            Some(&auth),
            None,
        )
        .await;
        assert_error(&missing, 404, &label);
        let not_a_number = call(
            &env,
            Method::GET,
            &env.api("/instances/abc"),
            Some(&auth),
            None,
        )
        .await;
        assert_error(&not_a_number, 404, &label);
        // Path segments and query values that are not UTF-8 once decoded: the API's JSON 400,
        // not the router's plain text.
        for path in [
            "/instances/%FF",
            "/elements/%C3",
            "/elements/%C3/oauth/url",
            "/events?instanceId=%FF",
        ] {
            let refused = call(&env, Method::GET, &env.api(path), Some(&auth), None).await;
            assert_error(&refused, 400, &format!("{label} {path}"));
        }
        env.stop().await;
    }
}

/// The NUL character, which PostgreSQL cannot store in text: a 400 wherever it comes, and on a
/// create before the code is exchanged, so the code and its state still work afterwards.
#[tokio::test]
async fn nul_characters_answer_400_before_anything_is_spent() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let lookup = call(
            &env,
            Method::GET,
            &env.api("/elements/a%00b"),
            Some(&auth),
            None,
        )
        .await;
        assert!(
            [400, 404].contains(&lookup.status),
            "[{label}] {} {}",
            lookup.status,
            lookup.body
        );
        let (code, state) = env.authorize(&env.org, "sandbox-box", "nul").await;
        let body = |name: &str| {
            json!({"element": {"key": "sandbox-box"}, "providerData": {"code": code, "state": state},
                   "configuration": env.configuration(), "name": name})
        };
        for name in ["x\u{0}y", "tab\there"] {
            let refused = call(
                &env,
                Method::POST,
                &env.api("/instances"),
                Some(&auth),
                Some(body(name)),
            )
            .await;
            assert_error(&refused, 400, &label);
        }
        let mut configuration = env.configuration();
        configuration["custom"] = json!("a\u{0}b");
        let refused = call(&env, Method::POST, &env.api("/instances"), Some(&auth),
                           Some(json!({"element": {"key": "sandbox-box"}, "providerData": {"code": code, "state": state},
                                       "configuration": configuration}))).await;
        assert_error(&refused, 400, &label);
        // The redirect's fields are kept in the configuration too (PostgreSQL's `jsonb`
        // refused them at every later commit of the instance's tokens).
        let refused = call(&env, Method::POST, &env.api("/instances"), Some(&auth),
                           Some(json!({"element": {"key": "sandbox-box"},
                                       "providerData": {"code": code, "state": state, "realmId": "12\u{0}3"},
                                       "configuration": env.configuration()}))).await;
        assert_error(&refused, 400, &label);
        assert!(
            refused.body["message"].as_str().unwrap().contains("NUL"),
            "[{label}] {}",
            refused.body
        );
        let created = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(body("fine")),
        )
        .await;
        assert_eq!(
            created.status, 200,
            "[{label}] the code was spent: {}",
            created.body
        );
        env.stop().await;
        drop_test_database(&url).await;
    }
}

#[tokio::test]
async fn failed_creates_answer_4xx_and_create_nothing() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        // A bogus code: the provider's words in providerMessage.
        let bogus = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(
                json!({"element": {"key": "sandbox-box"}, "providerData": {"code": "bogus-code"},
                                     "configuration": env.configuration()}),
            ),
        )
        .await;
        assert_error(&bogus, 400, &label);
        let provider = bogus.body["providerMessage"].as_str().unwrap_or_default();
        assert!(
            provider.contains("invalid_grant"),
            "[{label}] providerMessage {provider:?}"
        );
        // A used code.
        let (code, _state) = env.authorize(&env.org, "sandbox-box", "dan").await;
        let body = json!({"element": {"key": "sandbox-box"}, "providerData": {"code": code},
                          "configuration": env.configuration()});
        let first = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(body.clone()),
        )
        .await;
        assert_eq!(first.status, 200, "[{label}] {}", first.body);
        let count = instances_of(&env, &env.org).await.len();
        let used = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(body),
        )
        .await;
        // A retry (after a timeout, say) is answered with the instance the first created, and
        // the code is not presented again: presented twice, a code has its tokens revoked
        // (RFC 6749 §4.1.2; the sandbox does it), and that instance would lose its grant.
        assert_eq!(used.status, 200, "[{label}] {}", used.body);
        assert_eq!(used.body["id"], first.body["id"], "[{label}] {}", used.body);
        assert_eq!(
            instances_of(&env, &env.org).await.len(),
            count,
            "[{label}] no second instance"
        );
        let token = first.body["token"].as_str().unwrap();
        let (status, body) = env
            .proxy(&env.org, token, Method::GET, "2.0/users/me")
            .await;
        assert_eq!(
            status, 200,
            "[{label}] the first instance's grant lives: {body}"
        );
        // The same repeated with its state (a retry of the whole request): the state went
        // with the first too, and the answer is the same `invalid_grant`, not "unknown state".
        let (code, state) = env.authorize(&env.org, "sandbox-box", "dee").await;
        let body = json!({"element": {"key": "sandbox-box"},
                          "providerData": {"code": code, "state": state},
                          "configuration": env.configuration()});
        let first = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(body.clone()),
        )
        .await;
        assert_eq!(first.status, 200, "[{label}] {}", first.body);
        let again = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(body),
        )
        .await;
        assert_eq!(again.status, 200, "[{label}] {}", again.body);
        assert_eq!(
            again.body["id"], first.body["id"],
            "[{label}] {}",
            again.body
        );
        // The same code for another connector (another token endpoint) is no retry of that
        // create: that endpoint refuses it, and the first instance keeps its grant.
        let other = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(json!({"element": {"key": "sandbox-generic"},
                        "providerData": {"code": code},
                        "configuration": env.configuration()})),
        )
        .await;
        assert_error(&other, 400, &label);
        let provider = other.body["providerMessage"].as_str().unwrap_or_default();
        assert!(
            provider.contains("invalid_grant"),
            "[{label}] {}",
            other.body
        );
        let count = count + 1;
        // Unknown connector (both paths), missing configuration keys, neither code nor tokens.
        let unknown = call(&env, Method::POST, &env.api("/instances"), Some(&auth),
                           Some(json!({"element": {"key": "nope"}, "providerData": {"code": "x"}, "configuration": env.configuration()}))).await;
        assert!(
            unknown.status == 400 || unknown.status == 404,
            "[{label}] {}",
            unknown.body
        );
        assert_error(&unknown, unknown.status, &label);
        assert!(unknown.body["message"].as_str().unwrap().contains("nope"));
        let unknown_path = call(
            &env,
            Method::POST,
            &env.api("/elements/nope/instances"),
            Some(&auth),
            Some(json!({"providerData": {"code": "x"}, "configuration": env.configuration()})),
        )
        .await;
        assert_error(&unknown_path, 404, &label);
        let no_element = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(json!({"providerData": {"code": "x"}, "configuration": env.configuration()})),
        )
        .await;
        assert_error(&no_element, 400, &label);
        for (missing, expected) in [
            ("oauth.callback.url", "oauth.callback.url"),
            ("oauth.api.key", "oauth.api.key"),
        ] {
            let (code, _) = env.authorize(&env.org, "sandbox-box", "dan").await;
            let mut configuration = env.configuration();
            configuration.as_object_mut().unwrap().remove(missing);
            let answer = call(&env, Method::POST, &env.api("/instances"), Some(&auth),
                              Some(json!({"element": {"key": "sandbox-box"}, "providerData": {"code": code}, "configuration": configuration}))).await;
            assert_error(&answer, 400, &label);
            assert!(
                answer.body["message"].as_str().unwrap().contains(expected),
                "[{label}] {}",
                answer.body
            );
        }
        let nothing = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(json!({"element": {"key": "sandbox-box"}, "configuration": env.configuration()})),
        )
        .await;
        assert_error(&nothing, 400, &label);
        let import_nothing = call(&env, Method::POST, &env.api("/instances"), Some(&auth),
                                  Some(json!({"element": {"key": "sandbox-box"}, "externalAuthentication": "initial", "configuration": env.configuration()}))).await;
        assert_error(&import_nothing, 400, &label);
        // A token with a line break pasted in: no header could carry it, so every call would
        // have failed for good.
        for key in ["oauth.user.token", "oauth.user.refresh_token"] {
            let mut configuration = env.configuration();
            configuration[key] = json!("abc\ndef");
            let broken = call(&env, Method::POST, &env.api("/instances"), Some(&auth),
                              Some(json!({"element": {"key": "sandbox-box"}, "externalAuthentication": "initial", "configuration": configuration}))).await;
            assert_error(&broken, 400, &label);
            assert!(
                broken.body["message"].as_str().unwrap().contains(key),
                "[{label}] {}",
                broken.body
            );
        }
        // The provider down: still nothing created.
        env.sandbox_post(
            "/__sandbox/faults",
            json!({"target": "token", "status": 503, "count": 1}),
        )
        .await;
        let (code, state) = env.authorize(&env.org, "sandbox-generic", "dan").await;
        let body = json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": code, "state": state},
                          "configuration": env.configuration()});
        let down = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(body.clone()),
        )
        .await;
        // A failed exchange answers 4xx (the contract), 424 when the provider failed.
        assert_eq!(down.status, 424, "[{label}] {}", down.body);
        assert_eq!(
            instances_of(&env, &env.org).await.len(),
            count,
            "[{label}] failed creates stored something"
        );
        // The failed exchange did not burn the state (and its PKCE verifier): the same code
        // and state work once the provider is back.
        let retried = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(body),
        )
        .await;
        assert_eq!(
            retried.status, 200,
            "[{label}] retry after a provider failure: {}",
            retried.body
        );
        env.stop().await;
    }
}

/// A new instance of `key` for `user`, then its tokens imported into another
/// (`externalAuthentication: "initial"`): the import's answer and the access token imported.
/// Two creates with one code at once (a client's retry while its first request still waits
/// on the provider): the code is presented once, and both are answered with the one instance it
/// made. When the first request's exchange fails for a passing reason, the code is given back
/// and the waiting request exchanges it.
#[tokio::test]
async fn a_code_sent_twice_at_once_is_exchanged_once() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let create = |body: Value| {
            let (env, auth) = (&env, auth.clone());
            async move {
                call(
                    env,
                    Method::POST,
                    &env.api("/instances"),
                    Some(&auth),
                    Some(body),
                )
                .await
            }
        };
        let exchanges = || async {
            env.sandbox_stats().await["token"]["authorization_code"]
                .as_u64()
                .unwrap()
        };
        let (code, state) = env.authorize(&env.org, "sandbox-box", "gus").await;
        let body = json!({"element": {"key": "sandbox-box"},
                          "providerData": {"code": code, "state": state},
                          "configuration": env.configuration()});
        let before = exchanges().await;
        // The provider takes a second and a half to answer the first.
        env.sandbox_post(
            "/__sandbox/faults",
            json!({"target": "token", "delayMs": 1500, "count": 1}),
        )
        .await;
        // Four at once (the same request sent four times: which takes the state and which
        // claims the code is a race), and one more a moment later.
        let at_once = futures_util::future::join_all((0..4).map(|_| create(body.clone())));
        let later = async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            create(body.clone()).await
        };
        let (mut answers, later) = tokio::join!(at_once, later);
        answers.push(later);
        for answer in &answers {
            assert_eq!(answer.status, 200, "[{label}] {}", answer.body);
            assert_eq!(
                answer.body["id"], answers[0].body["id"],
                "[{label}] one instance"
            );
        }
        assert_eq!(
            exchanges().await,
            before + 1,
            "[{label}] the code went once"
        );
        assert_eq!(instances_of(&env, &env.org).await.len(), 1, "[{label}]");
        let token = answers[0].body["token"].as_str().unwrap();
        let (status, reply) = env
            .proxy(&env.org, token, Method::GET, "2.0/users/me")
            .await;
        assert_eq!(status, 200, "[{label}] its grant lives: {reply}");

        // Another organization with that code (copied, or a user's second account) is refused
        // without presenting it: presented again, it would have the first exchange's tokens
        // revoked (the sandbox does, as RFC 6749 §4.1.2 allows).
        let other_org = env.new_org("other").await;
        let before = exchanges().await;
        let theirs = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&other_org.platform()),
            Some(json!({"element": {"key": "sandbox-box"},
                        "providerData": {"code": code},
                        "configuration": env.configuration()})),
        )
        .await;
        assert_error(&theirs, 400, &label);
        assert!(
            theirs.body["providerMessage"]
                .as_str()
                .unwrap_or_default()
                .contains("exchanged already"),
            "[{label}] {}",
            theirs.body
        );
        assert_eq!(exchanges().await, before, "[{label}] the code went again");
        let (status, reply) = env
            .proxy(&env.org, token, Method::GET, "2.0/users/me")
            .await;
        assert_eq!(status, 200, "[{label}] the first grant lives on: {reply}");

        // Nor does it wait on the first organization's exchange, or take the code over when
        // that exchange fails: the first organization's retry gets the grant.
        let (code, _) = env.authorize(&env.org, "sandbox-box", "joe").await;
        let code_only = json!({"element": {"key": "sandbox-box"},
                               "providerData": {"code": code},
                               "configuration": env.configuration()});
        env.sandbox_post(
            "/__sandbox/faults",
            json!({"target": "token", "status": 503, "delayMs": 1000, "count": 1}),
        )
        .await;
        let first = create(code_only.clone());
        let theirs = async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let started = std::time::Instant::now();
            let answer = call(
                &env,
                Method::POST,
                &env.api("/instances"),
                Some(&other_org.platform()),
                Some(code_only.clone()),
            )
            .await;
            (answer, started.elapsed())
        };
        let (first, (theirs, waited)) = tokio::join!(first, theirs);
        assert_error(&first, 424, &label);
        assert_error(&theirs, 400, &label);
        assert!(
            waited < std::time::Duration::from_millis(500),
            "[{label}] waited {waited:?} on another organization's exchange"
        );
        let again = create(code_only).await;
        assert_eq!(again.status, 200, "[{label}] {}", again.body);

        // A PKCE connector's code without its state, sent six times at once: one request
        // takes the one pending authorization (with its verifier); none presents the code
        // without it.
        let (code, _state) = env.authorize(&env.org, "sandbox-generic", "ida").await;
        let body = json!({"element": {"key": "sandbox-generic"},
                          "providerData": {"code": code},
                          "configuration": env.configuration()});
        let before = exchanges().await;
        let answers = futures_util::future::join_all((0..6).map(|_| create(body.clone()))).await;
        for answer in &answers {
            assert_eq!(answer.status, 200, "[{label}] {}", answer.body);
            assert_eq!(answer.body["id"], answers[0].body["id"], "[{label}]");
            assert_eq!(answer.body["valid"], true, "[{label}]");
        }
        assert_eq!(
            exchanges().await,
            before + 1,
            "[{label}] the code went once"
        );

        // The first request's exchange fails (503 after a second): the second, waiting
        // meanwhile, exchanges the code itself.
        let (code, state) = env.authorize(&env.org, "sandbox-box", "hal").await;
        let body = json!({"element": {"key": "sandbox-box"},
                          "providerData": {"code": code, "state": state},
                          "configuration": env.configuration()});
        env.sandbox_post(
            "/__sandbox/faults",
            json!({"target": "token", "status": 503, "delayMs": 1000, "count": 1}),
        )
        .await;
        let first = create(body.clone());
        let second = async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            create(body.clone()).await
        };
        let (first, second) = tokio::join!(first, second);
        assert_error(&first, 424, &label);
        assert_eq!(second.status, 200, "[{label}] {}", second.body);
        assert_eq!(instances_of(&env, &env.org).await.len(), 4, "[{label}]");
        env.stop().await;
        drop_test_database(&url).await;
    }
}

async fn import_tokens_of_a_new_instance(env: &Env, key: &str, user: &str) -> (Reply, String) {
    let source = env.create_instance(&env.org, key, user).await;
    let shown = revealed(env, &env.org, &source).await;
    let access = shown["configuration"]["oauth.user.token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut configuration = env.configuration();
    configuration["oauth.user.token"] = json!(access);
    configuration["oauth.user.refresh_token"] =
        shown["configuration"]["oauth.user.refresh_token"].clone();
    let imported = call(
        env,
        Method::POST,
        &env.api("/instances"),
        Some(&env.org.platform()),
        Some(
            json!({"element": {"key": key}, "externalAuthentication": "initial",
                    "configuration": configuration}),
        ),
    )
    .await;
    assert_eq!(imported.status, 200, "[{}] {}", env.label, imported.body);
    (imported, access)
}

#[tokio::test]
async fn existing_tokens_can_be_imported() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        // Get real tokens from the sandbox with a first instance, then import them.
        let source = env
            .create_instance(&env.org, "sandbox-salesforce", "erin")
            .await;
        let shown = revealed(&env, &env.org, &source).await;
        // The contract's profile root, trailing `/` included, though Salesforce's
        // `instance_url` (which moves `base.url`) comes without it.
        assert_eq!(
            shown["configuration"]["base.url"],
            env.sandbox_url("/salesforce/"),
            "[{label}]"
        );
        let access = shown["configuration"]["oauth.user.token"]
            .as_str()
            .unwrap()
            .to_string();
        let refresh = shown["configuration"]["oauth.user.refresh_token"]
            .as_str()
            .unwrap()
            .to_string();
        let mut configuration = env.configuration();
        configuration["oauth.user.token"] = json!(access);
        configuration["oauth.user.refresh_token"] = json!(refresh);
        configuration["base.url"] = shown["configuration"]["base.url"].clone();
        let imported = call(&env, Method::POST, &env.api("/instances"), Some(&env.org.platform()),
                            Some(json!({"element": {"key": "sandbox-salesforce"}, "externalAuthentication": "initial",
                                        "configuration": configuration, "name": "imported"}))).await;
        assert_eq!(imported.status, 200, "[{label}] {}", imported.body);
        assert_eq!(imported.body["name"], "imported");
        assert_eq!(imported.body["valid"], true);
        assert_ne!(imported.body["token"], source["token"]);
        // An `on_401` connector without a keep-alive: the tokens stay as imported until a
        // rejection.
        let again = revealed(&env, &env.org, &imported.body).await;
        assert_eq!(again["configuration"]["oauth.user.token"], access.as_str());
        assert_eq!(
            again["configuration"]["oauth.user.refresh_token"],
            refresh.as_str()
        );
        let (status, body) = env
            .proxy(
                &env.org,
                imported.body["token"].as_str().unwrap(),
                Method::GET,
                "api/me",
            )
            .await;
        assert_eq!(status, 200, "[{label}] {body}");
        // A refresh token without the client id to refresh it: refused, not an instance
        // that dies at its first refresh (`invalid_client`); nor can a change take it away.
        let mut no_client = env.configuration();
        no_client["oauth.user.refresh_token"] = json!(refresh);
        no_client.as_object_mut().unwrap().remove("oauth.api.key");
        let refused = call(&env, Method::POST, &env.api("/instances"), Some(&env.org.platform()),
                           Some(json!({"element": {"key": "sandbox-salesforce"}, "externalAuthentication": "initial",
                                       "configuration": no_client}))).await;
        assert_error(&refused, 400, &label);
        assert!(
            refused.body["message"]
                .as_str()
                .unwrap()
                .contains("oauth.api.key"),
            "{}",
            refused.body
        );
        let emptied = call(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{}", imported.body["id"])),
            Some(&env.org.platform()),
            Some(json!({"configuration": {"oauth.api.key": " "}})),
        )
        .await;
        assert_error(&emptied, 400, &label);
        // Only a refresh token: refreshed before the create answers; then it works.
        let mut only_refresh = env.configuration();
        only_refresh["oauth.user.refresh_token"] = json!(refresh);
        let imported = call(&env, Method::POST, &env.api("/instances"), Some(&env.org.platform()),
                            Some(json!({"element": {"key": "sandbox-salesforce"}, "externalAuthentication": "initial",
                                        "configuration": only_refresh}))).await;
        assert_eq!(imported.status, 200, "[{label}] {}", imported.body);
        // Refreshed before the answer: it has an access token already.
        let shown = revealed(&env, &env.org, &imported.body).await;
        assert!(
            shown["configuration"]["oauth.user.token"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "[{label}] an imported refresh token was not refreshed before the answer: {shown}"
        );
        let (status, body) = env
            .proxy(
                &env.org,
                imported.body["token"].as_str().unwrap(),
                Method::GET,
                "api/me",
            )
            .await;
        assert_eq!(status, 200, "[{label}] {body}");
        // A connector refreshed before expiry, without a keep-alive: the tokens serve as they
        // were brought in (no refresh behind the caller's back).
        let (imported, generic_access) =
            import_tokens_of_a_new_instance(&env, "sandbox-generic", "erin-generic").await;
        let refreshes = env.sandbox_stats().await["token"]["refresh_token"].clone();
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let (status, body) = env
            .proxy(
                &env.org,
                imported.body["token"].as_str().unwrap(),
                Method::GET,
                "api/me",
            )
            .await;
        assert_eq!(status, 200, "[{label}] {body}");
        let shown = revealed(&env, &env.org, &imported.body).await;
        assert_eq!(
            shown["configuration"]["oauth.user.token"],
            generic_access.as_str(),
            "[{label}] {shown}"
        );
        assert_eq!(
            env.sandbox_stats().await["token"]["refresh_token"],
            refreshes,
            "[{label}] an imported grant was refreshed"
        );
        // A connector whose refresh tokens die unused (a keep-alive): refreshed at once, the
        // grant proved now and the inactivity clock started here.
        let (imported, boxed_access) =
            import_tokens_of_a_new_instance(&env, "sandbox-box", "erin-box").await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while revealed(&env, &env.org, &imported.body).await["configuration"]["oauth.user.token"]
            == boxed_access.as_str()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "[{label}] the scheduler did not refresh imported tokens"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        env.stop().await;
    }
}

#[tokio::test]
async fn reauthentication_and_updates_keep_identity() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let instance = env
            .create_instance(&env.org, "sandbox-salesforce", "fred")
            .await;
        let id = id_of(&instance);
        let token = instance["token"].as_str().unwrap().to_string();
        let old_access =
            revealed(&env, &env.org, &instance).await["configuration"]["oauth.user.token"]
                .as_str()
                .unwrap()
                .to_string();

        // PATCH without a code merges name, tags and configuration.
        let merged = call(&env, Method::PATCH, &env.api(&format!("/instances/{id}")), Some(&auth),
                          Some(json!({"name": "renamed", "configuration": {"custom.setting": "one", "webhook.secret": "w-s-1"}}))).await;
        assert_eq!(merged.status, 200, "[{label}] {}", merged.body);
        assert_eq!(merged.body["name"], "renamed");
        assert_eq!(
            merged.body["tags"], instance["tags"],
            "[{label}] tags kept when not given"
        );
        assert_eq!(merged.body["configuration"]["custom.setting"], "one");
        assert_eq!(merged.body["configuration"]["webhook.secret"], "********");
        assert_eq!(merged.body["configuration"]["oauth.api.key"], CLIENT_ID);
        assert_eq!(merged.body["token"], token.as_str());
        let tagged = call(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{id}")),
            Some(&auth),
            Some(json!({"tags": ["prod"]})),
        )
        .await;
        assert_eq!(tagged.body["tags"], json!(["prod"]));
        assert_eq!(tagged.body["name"], "renamed");
        assert_eq!(tagged.body["configuration"]["custom.setting"], "one");
        let shown = revealed(&env, &env.org, &instance).await;
        assert_eq!(
            shown["configuration"]["oauth.user.token"],
            old_access.as_str(),
            "[{label}] merge kept the tokens"
        );
        assert_eq!(shown["configuration"]["webhook.secret"], "w-s-1");
        assert_eq!(shown["configuration"]["oauth.api.secret"], CLIENT_SECRET);

        // Re-authentication with a bad code: an error with the provider's words, and the
        // instance still works with its old token.
        let bad = call(&env, Method::PATCH, &env.api("/instances"), Some(&env.org.with_element(&token)),
                       Some(json!({"providerData": {"code": "not-a-code"}, "configuration": {"oauth.user.token": "", "oauth.user.refresh_token": ""}}))).await;
        assert_error(&bad, 400, &label);
        assert!(
            bad.body["providerMessage"]
                .as_str()
                .unwrap_or_default()
                .contains("invalid_grant"),
            "{}",
            bad.body
        );
        let after_bad = revealed(&env, &env.org, &instance).await;
        assert_eq!(
            after_bad["configuration"]["oauth.user.token"],
            old_access.as_str(),
            "[{label}] failed re-auth changed the token"
        );
        assert_eq!(after_bad["name"], "renamed");
        assert_eq!(after_bad["valid"], true);
        let (status, _) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "[{label}] still works after a failed re-auth");

        // PATCH /instances with a code and blanked tokens (the Salesforce article): same id,
        // token, name and tags; valid; a new access token.
        let (code, state) = env.authorize(&env.org, "sandbox-salesforce", "fred").await;
        let patched = call(&env, Method::PATCH, &env.api("/instances"), Some(&env.org.with_element(&token)),
                           Some(json!({"providerData": {"code": code, "state": state},
                                       "configuration": {"oauth.user.token": "", "oauth.user.refresh_token": ""}}))).await;
        assert_eq!(patched.status, 200, "[{label}] {}", patched.body);
        assert_eq!(patched.body["id"], id);
        assert_eq!(patched.body["token"], token.as_str());
        assert_eq!(patched.body["name"], "renamed");
        assert_eq!(patched.body["tags"], json!(["prod"]));
        assert_eq!(patched.body["valid"], true);
        assert_eq!(patched.body["verification"]["ok"], true, "{}", patched.body);
        let new_access = patched.body["configuration"]["oauth.user.token"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            new_access != old_access && new_access != "********" && !new_access.is_empty(),
            "[{label}] {new_access}"
        );
        assert_eq!(patched.body["configuration"]["custom.setting"], "one");
        let (status, _) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200);

        // PATCH /instances/{id} with a code, organization secret only.
        let (code, state) = env.authorize(&env.org, "sandbox-salesforce", "fred").await;
        let reauthentication = json!({"providerData": {"code": code, "state": state}});
        let by_id = call(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{id}")),
            Some(&auth),
            Some(reauthentication.clone()),
        )
        .await;
        assert_eq!(by_id.status, 200, "[{label}] {}", by_id.body);
        assert_eq!(by_id.body["token"], token.as_str());
        assert_eq!(by_id.body["configuration"]["oauth.user.token"], "********");
        let access =
            revealed(&env, &env.org, &instance).await["configuration"]["oauth.user.token"].clone();
        // The same re-authentication again (a retry after a timeout): answered with the
        // instance as it is, the code not presented again (the sandbox revokes what a code
        // gave when it comes twice).
        let again = call(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{id}")),
            Some(&auth),
            Some(reauthentication),
        )
        .await;
        assert_eq!(again.status, 200, "[{label}] {}", again.body);
        assert_eq!(again.body["id"], id);
        assert_eq!(again.body["valid"], true);
        assert_eq!(
            revealed(&env, &env.org, &instance).await["configuration"]["oauth.user.token"],
            access,
            "[{label}] the repeat changed nothing"
        );
        let (status, body) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(
            status, 200,
            "[{label}] the first exchange's grant lives: {body}"
        );
        // A create with that code made nothing with it: refused, not answered with this
        // instance.
        let create = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(json!({"element": {"key": "sandbox-salesforce"},
                        "providerData": {"code": code},
                        "configuration": env.configuration()})),
        )
        .await;
        assert_error(&create, 400, &label);
        assert!(
            create.body["providerMessage"]
                .as_str()
                .unwrap_or_default()
                .contains("exchanged already"),
            "[{label}] {}",
            create.body
        );

        // PUT: the configuration replaced whole, id and token kept.
        let mut replacement = env.configuration();
        replacement["other.setting"] = json!("two");
        let put = call(
            &env,
            Method::PUT,
            &env.api(&format!("/instances/{id}")),
            Some(&auth),
            Some(json!({"name": "replaced", "configuration": replacement})),
        )
        .await;
        assert_eq!(put.status, 200, "[{label}] {}", put.body);
        assert_eq!(put.body["id"], id);
        assert_eq!(put.body["token"], token.as_str());
        assert_eq!(put.body["name"], "replaced");
        assert_eq!(put.body["configuration"]["other.setting"], "two");
        assert!(
            put.body["configuration"].get("custom.setting").is_none(),
            "[{label}] PUT kept a key it did not send: {}",
            put.body
        );
        assert!(
            put.body["configuration"].get("webhook.secret").is_none(),
            "[{label}] PUT kept a secret key it did not send"
        );
        let (status, _) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "[{label}] tokens survive a PUT without a code");

        // PUT with a code but without ?reAuthenticate=true: refused, the code not exchanged
        // (it answered 200 with the instance as it was, taken for a re-authentication).
        let before = stats(&env).await;
        let (code, state) = env.authorize(&env.org, "sandbox-salesforce", "fred").await;
        let put_code = call(&env, Method::PUT, &env.api(&format!("/instances/{id}")), Some(&auth),
                            Some(json!({"providerData": {"code": code.clone(), "state": state.clone()}, "configuration": env.configuration(), "name": "not this"}))).await;
        assert_eq!(put_code.status, 400, "[{label}] {}", put_code.body);
        assert!(
            put_code.body["message"]
                .as_str()
                .unwrap()
                .contains("reAuthenticate=true"),
            "[{label}] {}",
            put_code.body
        );
        let (_, unchanged) = env
            .get_json(&env.api(&format!("/instances/{id}")), &auth)
            .await;
        assert_eq!(unchanged["name"], "replaced", "[{label}] {unchanged}");
        assert_eq!(
            stats(&env).await["token"]["authorization_code"],
            before["token"]["authorization_code"]
        );
        // PUT /instances?reAuthenticate=true with a code.
        let (code, state) = env.authorize(&env.org, "sandbox-salesforce", "fred").await;
        let reauth = call(&env, Method::PUT, &env.api("/instances?reAuthenticate=true"), Some(&env.org.with_element(&token)),
                          Some(json!({"providerData": {"code": code, "state": state}, "configuration": env.configuration(), "name": "put-reauth"}))).await;
        assert_eq!(reauth.status, 200, "[{label}] {}", reauth.body);
        assert_eq!(reauth.body["id"], id);
        assert_eq!(reauth.body["token"], token.as_str());
        assert_eq!(reauth.body["name"], "put-reauth");
        assert_eq!(
            stats(&env).await["token"]["authorization_code"]
                .as_i64()
                .unwrap(),
            before["token"]["authorization_code"].as_i64().unwrap() + 1
        );
        let reauth_access = reauth.body["configuration"]["oauth.user.token"]
            .as_str()
            .unwrap()
            .to_string();
        assert_ne!(reauth_access, new_access);
        // PUT ?reAuthenticate=true without a code: 400, nothing changed.
        let no_code = call(
            &env,
            Method::PUT,
            &env.api(&format!("/instances/{id}?reAuthenticate=true")),
            Some(&auth),
            Some(json!({"configuration": env.configuration()})),
        )
        .await;
        assert_error(&no_code, 400, &label);
        let bad_flag = call(
            &env,
            Method::PUT,
            &env.api(&format!("/instances/{id}?reAuthenticate=maybe")),
            Some(&auth),
            Some(json!({"configuration": env.configuration()})),
        )
        .await;
        assert_error(&bad_flag, 400, &label);
        // PUT re-auth with a bad code leaves everything as it was.
        let bad_put = call(&env, Method::PUT, &env.api(&format!("/instances/{id}?reAuthenticate=true")), Some(&auth),
                           Some(json!({"providerData": {"code": "nope"}, "name": "should-not-stick", "configuration": {"oauth.api.key": CLIENT_ID, "oauth.callback.url": env.callback(), "x": "y"}}))).await;
        assert_error(&bad_put, 400, &label);
        let now = revealed(&env, &env.org, &instance).await;
        assert_eq!(now["name"], "put-reauth");
        assert_eq!(
            now["configuration"]["oauth.user.token"],
            reauth_access.as_str()
        );
        assert!(now["configuration"].get("x").is_none());
        let (status, _) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "[{label}]");
        // PATCH /instances and PUT /instances need an Element token.
        let no_element = call(
            &env,
            Method::PATCH,
            &env.api("/instances"),
            Some(&auth),
            Some(json!({"name": "x"})),
        )
        .await;
        assert_error(&no_element, 400, &label);
        env.stop().await;
    }
}

/// An instance read, edited and written back as it was shown keeps its tokens and secrets:
/// masked values are neither imported as tokens (`PATCH`) nor dropped (`PUT`), and the real
/// tokens the Element token's holder sends back unchanged are no import either.
#[tokio::test]
async fn an_instance_written_back_as_shown_keeps_its_tokens_and_secrets() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let instance = env
            .create_instance(&env.org, "sandbox-salesforce", "gina")
            .await;
        let id = id_of(&instance);
        let token = instance["token"].as_str().unwrap().to_string();
        let path = env.api(&format!("/instances/{id}"));
        let with_secret = call(
            &env,
            Method::PATCH,
            &path,
            Some(&auth),
            Some(json!({"configuration": {"webhook.secret": "w-s-1"}})),
        )
        .await;
        assert_eq!(with_secret.status, 200, "[{label}] {}", with_secret.body);
        let before = revealed(&env, &env.org, &instance).await;
        let shown = call(&env, Method::GET, &path, Some(&auth), None).await;
        assert_eq!(shown.status, 200, "[{label}] {}", shown.body);
        assert_eq!(shown.body["configuration"]["oauth.user.token"], "********");
        assert_eq!(shown.body["configuration"]["webhook.secret"], "********");
        let secret_keys = [
            "oauth.user.token",
            "oauth.user.refresh_token",
            "oauth.api.secret",
            "webhook.secret",
        ];
        for method in [Method::PATCH, Method::PUT] {
            let written = call(
                &env,
                method.clone(),
                &path,
                Some(&auth),
                Some(json!({"name": "edited", "configuration": shown.body["configuration"]})),
            )
            .await;
            assert_eq!(written.status, 200, "[{label}] {method}: {}", written.body);
            assert_eq!(written.body["valid"], true, "[{label}] {method}");
            let after = revealed(&env, &env.org, &instance).await;
            for key in secret_keys {
                assert_eq!(
                    after["configuration"][key], before["configuration"][key],
                    "[{label}] {method} changed {key}"
                );
            }
            let (status, body) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
            assert_eq!(status, 200, "[{label}] {method}: {body}");
        }
        // The holder of the Element token sees the real values and sends them back as they are.
        let written = call(
            &env,
            Method::PATCH,
            &env.api("/instances"),
            Some(&env.org.with_element(&token)),
            Some(json!({"configuration": before["configuration"]})),
        )
        .await;
        assert_eq!(written.status, 200, "[{label}] {}", written.body);
        let after = revealed(&env, &env.org, &instance).await;
        for key in secret_keys {
            assert_eq!(
                after["configuration"][key], before["configuration"][key],
                "[{label}] written back unchanged, {key} changed"
            );
        }
        let events = crate::refresh::event_types(&env, &env.server.url, id).await;
        assert_eq!(
            crate::refresh::count(&events, "instance.reauthenticated"),
            0,
            "[{label}] nothing was imported: {events:?}"
        );
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// A configuration read, then written back after a refresh rotated the tokens, carries the
/// retired ones: they are no import (at a single-use provider they would kill the grant at the
/// next refresh). Tokens are imported by `PATCH` only with `externalAuthentication: "initial"`.
#[tokio::test]
async fn a_stale_write_back_does_not_bring_back_retired_tokens() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let instance = env.create_instance(&env.org, "sandbox-box", "stale").await;
        let id = id_of(&instance);
        let path = env.api(&format!("/instances/{id}"));
        let read = revealed(&env, &env.org, &instance).await;
        let refresh = env.api(&format!("/instances/{id}/tokens/refresh"));
        let refreshed = call(&env, Method::POST, &refresh, Some(&auth), None).await;
        assert_eq!(refreshed.status, 200, "[{label}] {}", refreshed.body);
        let current = revealed(&env, &env.org, &instance).await;
        assert_ne!(
            current["configuration"]["oauth.user.refresh_token"],
            read["configuration"]["oauth.user.refresh_token"],
            "[{label}] Box rotates"
        );
        for method in [Method::PATCH, Method::PUT] {
            let written = call(
                &env,
                method.clone(),
                &path,
                Some(&auth),
                Some(json!({"name": "renamed", "configuration": read["configuration"]})),
            )
            .await;
            assert_eq!(written.status, 200, "[{label}] {method}: {}", written.body);
            let after = revealed(&env, &env.org, &instance).await;
            for key in ["oauth.user.token", "oauth.user.refresh_token"] {
                assert_eq!(
                    after["configuration"][key], current["configuration"][key],
                    "[{label}] {method} brought back the retired {key}"
                );
            }
        }
        let refreshed = call(&env, Method::POST, &refresh, Some(&auth), None).await;
        assert_eq!(
            refreshed.status, 200,
            "[{label}] the grant lives: {}",
            refreshed.body
        );
        // An explicit import: another grant's tokens replace this instance's.
        let other = env.create_instance(&env.org, "sandbox-box", "other").await;
        let other_shown = revealed(&env, &env.org, &other).await;
        let mut configuration = json!({});
        for key in ["oauth.user.token", "oauth.user.refresh_token"] {
            configuration[key] = other_shown["configuration"][key].clone();
        }
        let imported = call(
            &env,
            Method::PATCH,
            &path,
            Some(&auth),
            Some(json!({"externalAuthentication": "initial", "configuration": configuration})),
        )
        .await;
        assert_eq!(imported.status, 200, "[{label}] {}", imported.body);
        // (Box is refreshed on a schedule: the imported refresh token is used at once.)
        let events = crate::refresh::event_types(&env, &env.server.url, id).await;
        assert_eq!(
            crate::refresh::count(&events, "instance.reauthenticated"),
            1,
            "[{label}] imported once: {events:?}"
        );
        env.stop().await;
        drop_test_database(&url).await;
    }
}

#[tokio::test]
async fn enable_disable_refresh_revoke_delete() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let instance = env.create_instance(&env.org, "sandbox-box", "gina").await;
        let id = id_of(&instance);
        let token = instance["token"].as_str().unwrap().to_string();
        let (status, _) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200);

        // Disable: the proxy refuses, the provider is not called, no refresh either.
        let disabled = call(
            &env,
            Method::DELETE,
            &env.api("/instances/enabled"),
            Some(&env.org.with_element(&token)),
            None,
        )
        .await;
        assert_eq!(disabled.status, 200, "[{label}] {}", disabled.body);
        assert_eq!(disabled.body["disabled"], true);
        let before = stats(&env).await;
        let (status, body) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert!(
            (400..500).contains(&status),
            "[{label}] disabled proxy: {status} {body}"
        );
        let refreshed = call(
            &env,
            Method::POST,
            &env.api(&format!("/instances/{id}/tokens/refresh")),
            Some(&auth),
            None,
        )
        .await;
        assert!(
            (400..500).contains(&refreshed.status),
            "[{label}] {}",
            refreshed.body
        );
        let after = stats(&env).await;
        assert_eq!(
            after["api"], before["api"],
            "[{label}] a disabled instance called the provider"
        );
        assert_eq!(
            after["token"], before["token"],
            "[{label}] a disabled instance refreshed"
        );
        let listed = call(
            &env,
            Method::GET,
            &env.api(&format!("/instances/{id}")),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(listed.body["disabled"], true);
        let no_element = call(
            &env,
            Method::DELETE,
            &env.api("/instances/enabled"),
            Some(&auth),
            None,
        )
        .await;
        assert_error(&no_element, 400, &label);
        let enabled = call(
            &env,
            Method::PUT,
            &env.api("/instances/enabled"),
            Some(&env.org.with_element(&token)),
            None,
        )
        .await;
        assert_eq!(enabled.status, 200, "[{label}] {}", enabled.body);
        assert_eq!(enabled.body["disabled"], false);
        let (status, _) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "[{label}] enabled again");
        // Enabling what is enabled changes nothing and tells no one.
        let again = call(
            &env,
            Method::PUT,
            &env.api("/instances/enabled"),
            Some(&env.org.with_element(&token)),
            None,
        )
        .await;
        assert_eq!(again.status, 200, "[{label}] {}", again.body);
        assert_eq!(again.body["disabled"], false);
        let types = crate::refresh::event_types(&env, &env.server.url, id).await;
        let count = |kind: &str| types.iter().filter(|t| t.as_str() == kind).count();
        assert_eq!(
            (count("instance.disabled"), count("instance.enabled")),
            (1, 1),
            "[{label}] {types:?}"
        );

        // Refresh now: a refresh_token grant at the provider, a new access token.
        let old_access =
            revealed(&env, &env.org, &instance).await["configuration"]["oauth.user.token"]
                .as_str()
                .unwrap()
                .to_string();
        let before = stats(&env).await;
        let refreshed = call(
            &env,
            Method::POST,
            &env.api(&format!("/instances/{id}/tokens/refresh")),
            Some(&env.org.with_element(&token)),
            None,
        )
        .await;
        assert_eq!(refreshed.status, 200, "[{label}] {}", refreshed.body);
        let after = stats(&env).await;
        assert_eq!(
            after["token"]["refresh_token"].as_i64().unwrap(),
            before["token"]["refresh_token"].as_i64().unwrap() + 1
        );
        let new_access = refreshed.body["configuration"]["oauth.user.token"]
            .as_str()
            .unwrap();
        assert_ne!(new_access, old_access);
        let (status, _) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200);

        // Revoke: reaches the sandbox's revocation endpoint; the instance turns invalid.
        let before = stats(&env).await;
        let revoked = call(
            &env,
            Method::POST,
            &env.api(&format!("/instances/{id}/tokens/revoke")),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(revoked.status, 200, "[{label}] {}", revoked.body);
        assert_eq!(revoked.body["valid"], false);
        let after = stats(&env).await;
        assert!(
            after["revoke"].as_i64().unwrap() > before["revoke"].as_i64().unwrap(),
            "[{label}] {after}"
        );
        let (status, body) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 401, "[{label}] {body}");
        let shown = call(
            &env,
            Method::GET,
            &env.api(&format!("/instances/{id}")),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(shown.body["valid"], false);

        // Delete: gone, a second delete is a 404.
        let deleted = call(
            &env,
            Method::DELETE,
            &env.api(&format!("/instances/{id}")),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(deleted.status, 200, "[{label}] {}", deleted.body);
        let gone = call(
            &env,
            Method::GET,
            &env.api(&format!("/instances/{id}")),
            Some(&auth),
            None,
        )
        .await;
        assert_error(&gone, 404, &label);
        let again = call(
            &env,
            Method::DELETE,
            &env.api(&format!("/instances/{id}")),
            Some(&auth),
            None,
        )
        .await;
        assert_error(&again, 404, &label);
        assert!(instances_of(&env, &env.org).await.is_empty());
        let (status, _) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(
            status, 401,
            "[{label}] a deleted instance's token is refused"
        );
        for (method, path) in [
            (Method::POST, "tokens/refresh"),
            (Method::POST, "tokens/revoke"),
            (Method::PATCH, ""),
            (Method::PUT, ""),
        ] {
            let url = if path.is_empty() {
                env.api(&format!("/instances/{id}"))
            } else {
                env.api(&format!("/instances/{id}/{path}"))
            };
            let answer = call(&env, method.clone(), &url, Some(&auth), Some(json!({}))).await;
            assert_error(
                &answer,
                404,
                &format!("[{label}] {method} {path} of a deleted instance"),
            );
        }
        env.stop().await;
    }
}

#[tokio::test]
async fn oauth_callback_page_shows_code_and_state() {
    let env = Env::start("sqlite", &crate::support::sqlite_database()).await;
    let page = env
        .http
        .get(format!("{}?code=abc%3C123&state=st-1", env.callback()))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let text = page.text().await.unwrap();
    assert!(
        text.contains("abc&lt;123") && text.contains("st-1"),
        "{text}"
    );
    assert!(!text.contains("abc<123"), "the code is escaped");
    let error = env
        .http
        .get(format!(
            "{}?error=access_denied&error_description=The+user+said+no&state=st-2",
            env.callback()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(error.status(), 400);
    let text = error.text().await.unwrap();
    assert!(
        text.contains("access_denied")
            && text.contains("The user said no")
            && text.contains("st-2"),
        "{text}"
    );
    // The sandbox's redirect lands on it.
    let (code, state) = env.authorize(&env.org, "sandbox-box", "hank").await;
    let landed = env
        .http
        .get(format!("{}?code={code}&state={state}", env.callback()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(landed.contains(&code) && landed.contains(&state));
    let url = env.database_url.clone();
    env.stop().await;
    drop_test_database(&url).await;
}

pub fn binary() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tokenwarden"));
    command
        .env_remove("TOKENWARDEN_MASTER_KEY")
        .env_remove("TOKENWARDEN_PREVIOUS_MASTER_KEYS")
        .env_remove("TOKENWARDEN_DATABASE_URL")
        .env_remove("RUST_LOG");
    command
}

/// Runs the binary off the test's runtime thread, so the in-process server keeps serving (and
/// finishing its SQLite transactions) while the command runs; answers its JSON output.
async fn run_binary(label: &str, args: Vec<String>) -> Value {
    let shown = format!("[{label}] {args:?}");
    let output = tokio::task::spawn_blocking(move || {
        binary()
            .args(&args)
            .env("TOKENWARDEN_MASTER_KEY", crate::harness::TEST_MASTER_KEY)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{shown}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str::<Value>(text.trim())
        .unwrap_or_else(|_| panic!("{shown}: not one JSON object: {text:?}"))
}

#[tokio::test]
async fn users_and_orgs_from_the_command_line_and_the_audit_log() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let org = run_binary(
            &label,
            vec![
                "orgs".into(),
                "create".into(),
                "--name".into(),
                "Acme QA".into(),
                "--database-url".into(),
                url.clone(),
            ],
        )
        .await;
        for field in ["organizationSecret", "userSecret", "organizationId"] {
            assert!(
                org.get(field).is_some(),
                "[{label}] {field} missing from {org}"
            );
        }
        assert!(org["organizationId"].is_i64());
        let first = Org {
            id: org["organizationId"].as_i64().unwrap(),
            user_secret: org["userSecret"].as_str().unwrap().into(),
            organization_secret: org["organizationSecret"].as_str().unwrap().into(),
        };
        let user = run_binary(
            &label,
            vec![
                "users".into(),
                "create".into(),
                "--organization-id".into(),
                first.id.to_string(),
                "--name".into(),
                "Second User".into(),
                "--database-url".into(),
                url.clone(),
            ],
        )
        .await;
        let second = Org {
            id: first.id,
            user_secret: user["userSecret"].as_str().unwrap().into(),
            organization_secret: first.organization_secret.clone(),
        };
        assert_ne!(second.user_secret, first.user_secret);
        // Both users use the API, and see the same instances.
        let instance = env.create_instance(&second, "sandbox-box", "ivy").await;
        assert_eq!(instances_of(&env, &first).await.len(), 1);
        assert_eq!(instances_of(&env, &second).await[0]["id"], instance["id"]);
        let renamed = call(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{}", id_of(&instance))),
            Some(&first.platform()),
            Some(json!({"name": "by first", "configuration": {"oauth.api.secret": "rotated-secret", "region": "eu"}})),
        )
        .await;
        assert_eq!(renamed.status, 200);
        // A re-authentication that renames too.
        let (code, state) = env.authorize(&first, "sandbox-box", "ivy").await;
        let reauthenticated = call(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{}", id_of(&instance))),
            Some(&first.platform()),
            Some(json!({"name": "renamed at re-authentication",
                        "providerData": {"code": code, "state": state}})),
        )
        .await;
        assert_eq!(
            reauthenticated.status, 200,
            "[{label}] {}",
            reauthenticated.body
        );
        let secret_read = call(
            &env,
            Method::GET,
            &env.api("/events/webhook-secret"),
            Some(&first.platform()),
            None,
        )
        .await;
        assert_eq!(secret_read.status, 200, "[{label}] {}", secret_read.body);
        // The audit log names who did what.
        let audit = call(
            &env,
            Method::GET,
            &env.api("/audit-logs"),
            Some(&first.platform()),
            None,
        )
        .await;
        assert_eq!(audit.status, 200, "[{label}] {}", audit.body);
        let entries = audit.body["auditLogs"].as_array().unwrap();
        let created = entries
            .iter()
            .find(|e| e["action"] == "instance.created")
            .expect("instance.created audited");
        assert_eq!(created["userId"], user["userId"], "[{label}] {created}");
        assert_eq!(created["userName"], "Second User", "[{label}] {created}");
        assert_eq!(created["target"], instance["id"].to_string());
        let updated = entries
            .iter()
            .find(|e| e["action"] == "instance.updated")
            .expect("instance.updated audited");
        assert_eq!(updated["userName"], "owner", "[{label}] {updated}");
        // What it changed, by name: an operator tells a rename from a swapped secret.
        assert_eq!(
            updated["detail"], "changed: name, configuration (oauth.api.secret, region)",
            "[{label}] {updated}"
        );
        assert!(
            !audit.body.to_string().contains("rotated-secret"),
            "[{label}] a value in the audit log"
        );
        assert!(
            entries.iter().any(|e| e["action"] == "webhook_secret.read"),
            "[{label}] reading the signing key is audited"
        );
        let reauthenticated = entries
            .iter()
            .find(|e| e["action"] == "instance.reauthenticated")
            .expect("instance.reauthenticated audited");
        assert_eq!(
            reauthenticated["detail"], "changed: name",
            "[{label}] {reauthenticated}"
        );
        assert!(created["requestId"].as_str().is_some_and(|r| !r.is_empty()));
        assert!(!audit.body.to_string().contains(&second.user_secret));
        // A user of one org with another org's secret: 401.
        let mixed = format!(
            "User {}, Organization {}",
            second.user_secret, env.org.organization_secret
        );
        let refused = call(
            &env,
            Method::GET,
            &env.api("/instances"),
            Some(&mixed),
            None,
        )
        .await;
        assert_error(&refused, 401, &label);
        // users create for an organization that does not exist fails with a message.
        let database = url.clone();
        let output = tokio::task::spawn_blocking(move || {
            binary()
                .args([
                    "users",
                    "create",
                    "--organization-id",
                    "42",
                    "--name",
                    "x",
                    "--database-url",
                    &database,
                ])
                .env("TOKENWARDEN_MASTER_KEY", crate::harness::TEST_MASTER_KEY)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains("42"));
        env.stop().await;
    }
}

#[tokio::test]
async fn authentication_rules() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let org = &env.org;
        let list = env.api("/instances");
        let instance = env.create_instance(org, "sandbox-box", "jay").await;
        let element = instance["token"].as_str().unwrap();
        for (auth, context) in [
            (None, "no header"),
            (Some(String::new()), "empty header"),
            (Some(format!("User {}", org.user_secret)), "user only"),
            (
                Some(format!("Organization {}", org.organization_secret)),
                "organization only",
            ),
            (
                Some(format!(
                    "User nope, Organization {}",
                    org.organization_secret
                )),
                "wrong user",
            ),
            (
                Some(format!("User {}, Organization nope", org.user_secret)),
                "wrong organization",
            ),
            (
                Some(format!(
                    "User {}, Organisation {}",
                    org.user_secret, org.organization_secret
                )),
                "misspelt part",
            ),
            (Some(format!("Bearer {}", org.user_secret)), "bearer"),
            (
                Some(format!("User {}, Element nope", org.user_secret)),
                "wrong element",
            ),
            (
                Some(format!("{}, Element nope", org.platform())),
                "wrong element with organization",
            ),
        ] {
            let answer = call(&env, Method::GET, &list, auth.as_deref(), None).await;
            assert_error(&answer, 401, &format!("[{label}] {context}"));
            assert!(
                !answer.body.to_string().contains(&org.user_secret),
                "[{label}] {context}: secret echoed"
            );
        }
        for auth in [
            format!(
                "Organization {}, User {}",
                org.organization_secret, org.user_secret
            ),
            format!(
                "  User   {} ,   Organization {}  ",
                org.user_secret, org.organization_secret
            ),
            format!(
                "user {},organization {}",
                org.user_secret, org.organization_secret
            ),
            format!(
                "Element {element}, Organization {}, User {}",
                org.organization_secret, org.user_secret
            ),
        ] {
            let answer = call(&env, Method::GET, &list, Some(&auth), None).await;
            assert_eq!(answer.status, 200, "[{label}] {auth:?}: {}", answer.body);
        }
        // Every endpoint refuses without credentials.
        let id = id_of(&instance);
        for (method, path) in [
            (Method::GET, "/elements".to_string()),
            (Method::POST, "/elements".into()),
            (Method::GET, "/elements/sandbox-box".into()),
            (Method::GET, "/elements/sandbox-box/oauth/url".into()),
            (Method::POST, "/instances".into()),
            (Method::POST, "/elements/sandbox-box/instances".into()),
            (Method::GET, format!("/instances/{id}")),
            (Method::PATCH, format!("/instances/{id}")),
            (Method::PUT, format!("/instances/{id}")),
            (Method::DELETE, format!("/instances/{id}")),
            (Method::PATCH, "/instances".into()),
            (Method::PUT, "/instances".into()),
            (Method::PUT, "/instances/enabled".into()),
            (Method::DELETE, "/instances/enabled".into()),
            (Method::POST, format!("/instances/{id}/tokens/refresh")),
            (Method::POST, format!("/instances/{id}/tokens/revoke")),
            (Method::GET, "/events".into()),
            (Method::GET, "/audit-logs".into()),
            (Method::GET, "/proxy/api/me".into()),
        ] {
            let answer = call(&env, method.clone(), &env.api(&path), None, Some(json!({}))).await;
            assert_error(&answer, 401, &format!("[{label}] {method} {path}"));
        }
        env.stop().await;
    }
}

#[tokio::test]
async fn bad_input_answers_clear_json_errors() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let instance = env.create_instance(&env.org, "sandbox-box", "kim").await;
        let id = id_of(&instance);
        let raw =
            |method: Method, path: String, content_type: Option<&'static str>, body: Vec<u8>| {
                let mut request = env
                    .http
                    .request(method, env.api(&path))
                    .header("authorization", auth.clone())
                    .body(body);
                if let Some(content_type) = content_type {
                    request = request.header("content-type", content_type);
                }
                async move { reply(request.send().await.unwrap()).await }
            };
        let json_type = Some("application/json");
        for (method, path) in [
            (Method::POST, "/instances".to_string()),
            (Method::PATCH, format!("/instances/{id}")),
            (Method::PUT, format!("/instances/{id}")),
            (Method::POST, "/elements".to_string()),
            (Method::POST, "/elements/sandbox-box/instances".to_string()),
        ] {
            let context = format!("[{label}] {method} {path}");
            let answer = raw(
                method.clone(),
                path.clone(),
                json_type,
                b"{\"name\": ".to_vec(),
            )
            .await;
            assert_error(&answer, 400, &format!("{context} bad JSON"));
            let answer = raw(
                method.clone(),
                path.clone(),
                Some("text/plain"),
                b"{}".to_vec(),
            )
            .await;
            assert_error(&answer, 415, &format!("{context} wrong content type"));
            let answer = raw(method.clone(), path.clone(), None, b"{}".to_vec()).await;
            assert_error(&answer, 415, &format!("{context} no content type"));
            let big = format!("{{\"name\": \"{}\"}}", "x".repeat(1024 * 1024 + 10)).into_bytes();
            let answer = raw(method.clone(), path.clone(), json_type, big).await;
            assert_error(&answer, 413, &format!("{context} oversized body"));
        }
        for body in [
            json!({"name": 5}),
            json!({"tags": "qa"}),
            json!({"tags": [1, 2]}),
            json!({"configuration": "x"}),
            json!({"configuration": {"a": {"nested": true}}}),
            json!({"providerData": "code"}),
            json!([]),
        ] {
            let answer = call(
                &env,
                Method::PATCH,
                &env.api(&format!("/instances/{id}")),
                Some(&auth),
                Some(body.clone()),
            )
            .await;
            assert_error(&answer, 400, &format!("[{label}] PATCH {body}"));
            let mut create = body.clone();
            if let Some(object) = create.as_object_mut() {
                object.insert("element".into(), json!({"key": "sandbox-box"}));
            }
            let answer = call(
                &env,
                Method::POST,
                &env.api("/instances"),
                Some(&auth),
                Some(create.clone()),
            )
            .await;
            assert_error(&answer, 400, &format!("[{label}] POST {create}"));
        }
        let too_many_tags: Vec<String> = (0..60).map(|i| format!("t{i}")).collect();
        let answer = call(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{id}")),
            Some(&auth),
            Some(json!({"tags": too_many_tags})),
        )
        .await;
        assert_error(&answer, 400, &label);
        // Unknown paths and methods, inside and outside the base path.
        for (method, url) in [
            (Method::GET, env.api("/nothing-here")),
            (Method::GET, format!("{}/nothing", env.server.url)),
            (Method::GET, env.api(&format!("/instances/{id}/nothing"))),
        ] {
            let answer = call(&env, method, &url, Some(&auth), None).await;
            assert_error(&answer, 404, &format!("[{label}] {url}"));
        }
        let wrong_method = call(
            &env,
            Method::DELETE,
            &env.api("/audit-logs"),
            Some(&auth),
            None,
        )
        .await;
        assert_error(&wrong_method, 405, &format!("[{label}] DELETE /audit-logs"));
        let bad_query = call(
            &env,
            Method::DELETE,
            &env.api(&format!("/instances/{id}?revoke=perhaps")),
            Some(&auth),
            None,
        )
        .await;
        assert_error(&bad_query, 400, &format!("[{label}] bad query"));
        let bad_events = call(
            &env,
            Method::GET,
            &env.api("/events?instanceId=abc"),
            Some(&auth),
            None,
        )
        .await;
        assert_error(&bad_events, 400, &label);
        // Every response carries X-Request-Id, successes too; a well-formed incoming one is kept.
        let ok = call(&env, Method::GET, &env.api("/instances"), Some(&auth), None).await;
        assert!(ok.request_id.as_deref().is_some_and(|r| !r.is_empty()));
        let health = env
            .http
            .get(format!("{}/healthz", env.server.url))
            .header("x-request-id", "given-id-1")
            .send()
            .await
            .unwrap();
        assert_eq!(health.headers()["x-request-id"], "given-id-1");
        let (status, _) = env
            .proxy(
                &env.org,
                instance["token"].as_str().unwrap(),
                Method::GET,
                "api/me",
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            instances_of(&env, &env.org).await.len(),
            1,
            "[{label}] bad input created something"
        );
        env.stop().await;
    }
}

/// Registers an organization connector (`POST /elements`), which must succeed.
async fn register_connector(env: &Env, connector: Value) {
    let registered = call(
        env,
        Method::POST,
        &env.api("/elements"),
        Some(&env.org.platform()),
        Some(connector),
    )
    .await;
    assert!(
        registered.status < 300,
        "[{}] {} {}",
        env.label,
        registered.status,
        registered.body
    );
}

/// Small input rules a user meets: a connector's `verify.method` written in lower case is sent
/// as the standard method (it went out as the custom method `get`, and every verification
/// failed), and its path's inputs are filled (QuickBooks' `{realmId}` went out as it was); a name cannot be blanked by PATCH; name and tag limits count characters, not bytes.
#[tokio::test]
async fn verification_method_case_and_name_limits() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let auth = env.org.platform();
    let sandbox = env.sandbox.url.clone();
    register_connector(
        &env,
        json!({
                "key": "lowercase-verify", "name": "Lower-case verify",
                "baseUrl": format!("{sandbox}/generic/"),
                "oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"),
                          "tokenUrl": format!("{sandbox}/generic/token"), "scopes": ["api"]},
                "inputs": {"who": {"description": "whose profile", "default": "me"}},
                "verify": {"method": "get", "path": "api/{who}"},
        }),
    )
    .await;
    let instance = env
        .create_instance(&env.org, "lowercase-verify", "lower")
        .await;
    assert_eq!(instance["verification"]["ok"], true, "[{label}] {instance}");
    let path = env.api(&format!("/instances/{}", id_of(&instance)));
    let blank = call(
        &env,
        Method::PATCH,
        &path,
        Some(&auth),
        Some(json!({"name": "  "})),
    )
    .await;
    assert_error(&blank, 400, &label);
    // 70 characters of three bytes each: within the 200-character limit.
    let wide = "名".repeat(70);
    let renamed = call(
        &env,
        Method::PATCH,
        &path,
        Some(&auth),
        Some(json!({"name": wide, "tags": ["標".repeat(40)]})),
    )
    .await;
    assert_eq!(renamed.status, 200, "[{label}] {}", renamed.body);
    assert_eq!(renamed.body["name"], wide.as_str());
    let long = call(
        &env,
        Method::PATCH,
        &path,
        Some(&auth),
        Some(json!({"name": "名".repeat(201)})),
    )
    .await;
    assert_error(&long, 400, &label);
    env.stop().await;
    drop_test_database(&url).await;
}

/// An instance without a refresh token (imported with its access token alone) is not ended by
/// a refresh it cannot make: "refresh now" answers 409 and leaves it valid, and a connector
/// that refreshes before every call serves with the token it has.
#[tokio::test]
async fn an_instance_without_refresh_token_is_not_ended_by_a_refresh_it_cannot_make() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let auth = env.org.platform();
    crate::scheduler::register_generic_connector(
        &env,
        &env.org,
        "every-call",
        json!({"strategy": "every_request"}),
    )
    .await;
    let source = env.create_instance(&env.org, "every-call", "source").await;
    let access = revealed(&env, &env.org, &source).await["configuration"]["oauth.user.token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut configuration = env.configuration();
    configuration["oauth.user.token"] = json!(access);
    let imported = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&auth),
        Some(
            json!({"element": {"key": "every-call"}, "externalAuthentication": "initial",
                    "configuration": configuration}),
        ),
    )
    .await;
    assert_eq!(imported.status, 200, "[{label}] {}", imported.body);
    let id = id_of(&imported.body);
    let token = imported.body["token"].as_str().unwrap().to_string();
    let refreshed = call(
        &env,
        Method::POST,
        &env.api(&format!("/instances/{id}/tokens/refresh")),
        Some(&auth),
        None,
    )
    .await;
    assert_error(&refreshed, 409, &label);
    let (status, body) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "[{label}] {body}");
    let shown = call(
        &env,
        Method::GET,
        &env.api(&format!("/instances/{id}")),
        Some(&auth),
        None,
    )
    .await;
    assert_eq!(shown.body["valid"], true, "[{label}] {}", shown.body);
    env.stop().await;
    drop_test_database(&url).await;
}

/// A connector input that fills the connector's URLs changes them when PATCH changes it:
/// `base.url` (when the inputs made it, not when it was set) and the refresh URL shown.
#[tokio::test]
async fn changing_a_connector_input_moves_the_urls_it_fills() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let auth = env.org.platform();
    let sandbox = env.sandbox.url.clone();
    register_connector(
        &env,
        json!({
                "key": "tenanted", "name": "Tenanted",
                "baseUrl": format!("{sandbox}/generic/{{tenant}}/"),
                "inputs": {"tenant": {"description": "the tenant"}},
                "oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"),
                          "tokenUrl": format!("{sandbox}/generic/token"),
                          "refreshUrl": format!("{sandbox}/generic/token?tenant={{tenant}}"),
                          "scopes": ["api"]},
        }),
    )
    .await;
    // Brought in with the tokens of another grant (the code flow is not what this is about).
    let source = env
        .create_instance(&env.org, "sandbox-generic", "tenant-user")
        .await;
    let shown = revealed(&env, &env.org, &source).await;
    let mut configuration = env.configuration();
    configuration["tenant"] = json!("alpha");
    configuration["oauth.user.token"] = shown["configuration"]["oauth.user.token"].clone();
    let created = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&auth),
        Some(
            json!({"element": {"key": "tenanted"}, "externalAuthentication": "initial",
                    "configuration": configuration}),
        ),
    )
    .await;
    assert_eq!(created.status, 200, "[{label}] {}", created.body);
    let path = env.api(&format!("/instances/{}", id_of(&created.body)));
    let patch = |configuration: Value| {
        let (env, path, auth) = (&env, &path, &auth);
        async move {
            let patched = call(
                env,
                Method::PATCH,
                path,
                Some(auth),
                Some(json!({"configuration": configuration})),
            )
            .await;
            assert_eq!(patched.status, 200, "{}", patched.body);
            patched.body["configuration"].clone()
        }
    };
    // Written back as read, with the input changed: `base.url` given unchanged still follows.
    let mut read = created.body["configuration"].clone();
    read["tenant"] = json!("beta");
    let moved = patch(read).await;
    assert_eq!(
        moved["base.url"],
        format!("{sandbox}/generic/beta/"),
        "[{label}]"
    );
    assert_eq!(
        moved["oauth.token.refresh_url"],
        format!("{sandbox}/generic/token?tenant=beta"),
        "[{label}]"
    );
    // A base set by hand stays when the input changes again.
    let own = format!("{sandbox}/generic/own/");
    patch(json!({"base.url": own})).await;
    let kept = patch(json!({"tenant": "gamma"})).await;
    assert_eq!(kept["base.url"], own.as_str(), "[{label}]");
    assert_eq!(
        kept["oauth.token.refresh_url"],
        format!("{sandbox}/generic/token?tenant=gamma"),
        "[{label}]"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A connector input the authorization redirect names (Adobe Acrobat Sign's shard, from
/// `api_access_point`): the code is exchanged at the host it names, not at the input's
/// default, and the instance keeps the value.
#[tokio::test]
async fn an_input_named_by_the_redirect_routes_the_exchange() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let auth = env.org.platform();
    let sandbox = env.sandbox.url.clone();
    // `{profile}` stands for the shard: its default would send the code to the wrong host.
    register_connector(
        &env,
        json!({
                "key": "sharded", "name": "Sharded",
                "baseUrl": "{sandbox}/{profile}/",
                "inputs": {"profile": {"description": "the shard", "default": "generic",
                                       "fromRedirect": "api_access_point"}},
                "oauth": {"authorizationUrl": format!("{sandbox}/adobe-sign/public/oauth/v2"),
                          "tokenUrl": "{sandbox}/{profile}/oauth/v2/token",
                          "refreshUrl": "{sandbox}/{profile}/oauth/v2/refresh",
                          "scopes": ["user_login:self"], "clientAuth": "client_secret_post"},
        }),
    )
    .await;
    let oauth_url = call(
        &env,
        Method::GET,
        &format!(
            "{}?apiKey={}&callbackUrl={}",
            env.api("/elements/sharded/oauth/url"),
            crate::harness::CLIENT_ID,
            env.callback()
        ),
        Some(&auth),
        None,
    )
    .await;
    assert_eq!(oauth_url.status, 200, "[{label}] {}", oauth_url.body);
    let approve = env
        .http
        .get(format!(
            "{}&login_hint=shard-user",
            oauth_url.body["oauthUrl"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    let location = url::Url::parse(approve.headers()["location"].to_str().unwrap()).unwrap();
    let redirect: serde_json::Map<String, Value> = location
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), json!(v.into_owned())))
        .collect();
    assert!(redirect.contains_key("api_access_point"), "{redirect:?}");
    let created = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&auth),
        Some(json!({"element": {"key": "sharded"},
                    "providerData": redirect, "configuration": env.configuration()})),
    )
    .await;
    assert_eq!(created.status, 200, "[{label}] {}", created.body);
    assert_eq!(created.body["configuration"]["profile"], "adobe-sign");
    assert_eq!(
        created.body["configuration"]["oauth.token.refresh_url"],
        format!("{sandbox}/adobe-sign/oauth/v2/refresh")
    );
    // A redirect that names the host in another of the provider's shapes (Adobe's
    // `api.{shard}.echosign.com` beside `api.{shard}.adobesign.com`): read by its
    // `redirectShapes`, not left at the default.
    let port = url::Url::parse(&sandbox).unwrap().port().unwrap();
    register_connector(
        &env,
        json!({
                "key": "sharded-shapes", "name": "Sharded, two shapes",
                "baseUrl": format!("http://localhost:{port}/{{profile}}/"),
                "inputs": {"profile": {"description": "the shard", "default": "generic",
                                       "fromRedirect": "api_access_point",
                                       "redirectShapes": ["{sandbox}/{profile}/"]}},
                "oauth": {"authorizationUrl": format!("{sandbox}/adobe-sign/public/oauth/v2"),
                          "tokenUrl": "{sandbox}/{profile}/oauth/v2/token",
                          "refreshUrl": "{sandbox}/{profile}/oauth/v2/refresh",
                          "scopes": ["user_login:self"], "clientAuth": "client_secret_post"},
        }),
    )
    .await;
    let (code, state) = env
        .authorize(&env.org, "sharded-shapes", "shape-user")
        .await;
    let created = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&auth),
        Some(json!({"element": {"key": "sharded-shapes"},
                    "providerData": {"code": code, "state": state,
                                     "api_access_point": format!("{sandbox}/adobe-sign/")},
                    "configuration": env.configuration()})),
    )
    .await;
    assert_eq!(created.status, 200, "[{label}] {}", created.body);
    assert_eq!(created.body["configuration"]["profile"], "adobe-sign");
    env.stop().await;
    drop_test_database(&url).await;
}

/// A `base.url` named by the authorization redirect (`oauth.baseUrlFrom`), which comes through
/// the user's browser, is taken only on a host the connector names: a user could otherwise
/// send the calls made through their instance to an address of the service's network.
#[tokio::test]
async fn a_redirect_names_no_api_host_of_its_own() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let auth = env.org.platform();
    let sandbox = env.sandbox.url.clone();
    register_connector(
        &env,
        json!({
                "key": "routed", "name": "Routed by its redirect",
                "baseUrl": "{sandbox}/generic/",
                "oauth": {"authorizationUrl": "{sandbox}/generic/authorize",
                          "tokenUrl": "{sandbox}/generic/token",
                          "scopes": ["api", "offline_access"], "clientAuth": "client_secret_post",
                          "baseUrlFrom": "api_access_point"},
        }),
    )
    .await;
    for (user, named, expected) in [
        (
            "elsewhere",
            "http://127.0.0.1:9/internal-admin/".to_string(),
            format!("{sandbox}/generic/"),
        ),
        (
            "same-host",
            format!("{sandbox}/generic/v2/"),
            format!("{sandbox}/generic/v2/"),
        ),
    ] {
        let (code, state) = env.authorize(&env.org, "routed", user).await;
        let created = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(json!({"element": {"key": "routed"},
                        "providerData": {"code": code, "state": state, "api_access_point": named},
                        "configuration": env.configuration()})),
        )
        .await;
        assert_eq!(created.status, 200, "[{label}] {}", created.body);
        assert_eq!(
            created.body["configuration"]["base.url"], expected,
            "[{label}] {user}: {}",
            created.body
        );
    }
    env.stop().await;
    drop_test_database(&url).await;
}

/// An input the token response names (Adobe Acrobat Sign answers `api_access_point`, "the base
/// URI to be used for subsequent calls (/oauth/v2/refresh and /oauth/v2/revoke)"): an instance
/// made from a code alone refreshes at the host the provider named. It refreshed at the
/// input's default, another shard, which does not know the account's tokens.
#[tokio::test]
async fn an_input_named_by_the_token_response_routes_the_refreshes() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let auth = env.org.platform();
    let sandbox = env.sandbox.url.clone();
    // The exchange at a shard-neutral host, as Adobe's documentation shows it; the refresh and
    // revocation at the account's shard.
    register_connector(
        &env,
        json!({
                "key": "sharded-late", "name": "Sharded, named by the token response",
                "baseUrl": "{sandbox}/{profile}/",
                "inputs": {"profile": {"description": "the shard", "default": "generic",
                                       "fromRedirect": "api_access_point"}},
                "oauth": {"authorizationUrl": format!("{sandbox}/adobe-sign/public/oauth/v2"),
                          "tokenUrl": "{sandbox}/adobe-sign/oauth/v2/token",
                          "refreshUrl": "{sandbox}/{profile}/oauth/v2/refresh",
                          "revokeUrl": "{sandbox}/{profile}/oauth/v2/revoke",
                          "scopes": ["user_login:self"], "clientAuth": "client_secret_post"},
        }),
    )
    .await;
    let (code, state) = env.authorize(&env.org, "sharded-late", "late-user").await;
    let created = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&auth),
        Some(json!({"element": {"key": "sharded-late"},
                    "providerData": {"code": code, "state": state},
                    "configuration": env.configuration()})),
    )
    .await;
    assert_eq!(created.status, 200, "[{label}] {}", created.body);
    assert_eq!(
        created.body["configuration"]["profile"], "adobe-sign",
        "[{label}] {}",
        created.body
    );
    assert_eq!(
        created.body["configuration"]["oauth.token.refresh_url"],
        format!("{sandbox}/adobe-sign/oauth/v2/refresh")
    );
    let id = created.body["id"].as_i64().unwrap();
    let refreshed = call(
        &env,
        Method::POST,
        &env.api(&format!("/instances/{id}/tokens/refresh")),
        Some(&auth),
        None,
    )
    .await;
    assert_eq!(refreshed.status, 200, "[{label}] {}", refreshed.body);
    assert_eq!(
        refreshed.body["valid"], true,
        "[{label}] {}",
        refreshed.body
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A body that would change nothing of what it asks is refused with what to send instead; it
/// was answered 200 (a misspelled code read as a re-authentication done). An instance as it
/// is shown, written back, still passes.
#[tokio::test]
async fn instance_bodies_that_would_change_nothing_are_refused() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let auth = env.org.platform();
    let created = env
        .create_instance(&env.org, "sandbox-generic", "strict")
        .await;
    let id = created["id"].as_i64().unwrap();
    let path = env.api(&format!("/instances/{id}"));
    for (body, says) in [
        (
            json!({"provider_data": {"code": "x"}}),
            "unknown field `provider_data`",
        ),
        (json!({"code": "x"}), "unknown field `code`"),
        (
            json!({"providerData": {"Code": "x"}}),
            "`providerData` without `code`",
        ),
        (json!({"providerData": {}}), "`providerData` without `code`"),
        (
            json!({"externalAuthentication": "nope"}),
            "`externalAuthentication` is",
        ),
        (
            json!({"externalAuthentication": "initial"}),
            "needs `oauth.user.token`",
        ),
        (json!({"disabled": true}), "/enabled"),
        (
            json!({"configuration": {"event.notification.enabled": "yes"}}),
            "\"true\" or \"false\"",
        ),
        (
            json!({"configuration": {"p.secret": "********"}}),
            "no value for it",
        ),
        (
            json!({"element": {"key": "sandbox-box"}}),
            "cannot make it one of",
        ),
        (
            json!({"id": 12345, "name": "other"}),
            "the instance updated",
        ),
        // Another instance's read, written back here.
        (
            json!({"token": "another-instance-s-element-token", "name": "other"}),
            "not the Element token of the instance updated",
        ),
        (json!({"eventsEnabled": true}), "event.notification.enabled"),
        (
            json!({"cachingEnabled": "true"}),
            "`cachingEnabled` asks for",
        ),
        (
            json!({"configuration": {"k": 12345678901234567890123_f64}}),
            "give it as a string",
        ),
    ] {
        let answer = call(&env, Method::PATCH, &path, Some(&auth), Some(body.clone())).await;
        assert_eq!(answer.status, 400, "[{label}] {body}: {}", answer.body);
        assert!(
            answer.body["message"]
                .as_str()
                .is_some_and(|message| message.contains(says)),
            "[{label}] {body}: {}",
            answer.body
        );
    }
    // Blank switches webhooks off.
    let answer = call(
        &env,
        Method::PATCH,
        &path,
        Some(&auth),
        Some(json!({"configuration": {"event.notification.enabled": ""}})),
    )
    .await;
    assert_eq!(answer.status, 200, "[{label}] {}", answer.body);
    // The instance as shown, written back whole (PUT) and merged (PATCH): accepted.
    let (_, shown) = env.get_json(&path, &auth).await;
    for method in [Method::PUT, Method::PATCH] {
        let answer = call(
            &env,
            method.clone(),
            &path,
            Some(&auth),
            Some(shown.clone()),
        )
        .await;
        assert_eq!(answer.status, 200, "[{label}] {method}: {}", answer.body);
        assert_eq!(answer.body["valid"], true);
    }
    // A create: of the path's connector (one created disabled: `imports`).
    let (code, state) = env.authorize(&env.org, "sandbox-generic", "strict-2").await;
    let base = json!({"providerData": {"code": code, "state": state},
                      "configuration": env.configuration()});
    let mut other = base.clone();
    other["element"] = json!({"key": "sandbox-box"});
    for (body, says) in [(other, "`sandbox-box`")] {
        let answer = call(
            &env,
            Method::POST,
            &env.api("/elements/sandbox-generic/instances"),
            Some(&auth),
            Some(body),
        )
        .await;
        assert_eq!(answer.status, 400, "[{label}] {}", answer.body);
        assert!(
            answer.body["message"]
                .as_str()
                .is_some_and(|message| message.contains(says)),
            "[{label}] {}",
            answer.body
        );
    }
    // A masked token brought in stands for nothing, nor does an import's masked client
    // secret (no authorization kept one).
    let mut masked = env.configuration();
    masked["oauth.user.refresh_token"] = json!("********");
    let mut masked_secret = env.configuration();
    masked_secret["oauth.user.refresh_token"] = json!("a-refresh-token");
    masked_secret["oauth.api.secret"] = json!("********");
    for configuration in [masked, masked_secret] {
        let answer = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(
                json!({"element": {"key": "sandbox-generic"}, "externalAuthentication": "initial",
                        "configuration": configuration}),
            ),
        )
        .await;
        assert_eq!(answer.status, 400, "[{label}] {}", answer.body);
        assert!(
            answer.body["message"]
                .as_str()
                .is_some_and(|message| message.contains("mask")),
            "[{label}] {}",
            answer.body
        );
    }
    // The code was not spent by the refusals; Cloud Elements' own create body (its fields
    // for features of its platform) is taken.
    let mut cloud_elements = base;
    cloud_elements["retrieveObjectsAfterInstantiation"] = json!(true);
    cloud_elements["eventsEnabled"] = json!(false);
    let answer = call(
        &env,
        Method::POST,
        &env.api("/elements/sandbox-generic/instances"),
        Some(&auth),
        Some(cloud_elements),
    )
    .await;
    assert_eq!(answer.status, 200, "[{label}] {}", answer.body);
    env.stop().await;
    drop_test_database(&url).await;
}

/// `base.url` of a connector whose token responses name the API host (Salesforce's
/// `instance_url`) cannot be changed by an update: it was shown changed, unused, and undone by
/// the next refresh. Written back as it is, it passes; other connectors' can be changed.
#[tokio::test]
async fn a_base_url_the_provider_names_is_not_changed_by_an_update() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let auth = env.org.platform();
    let elsewhere = format!("{}/generic/", env.sandbox.url);
    let salesforce = env
        .create_instance(&env.org, "sandbox-salesforce", "routed")
        .await;
    let path = env.api(&format!("/instances/{}", salesforce["id"]));
    let answer = call(
        &env,
        Method::PATCH,
        &path,
        Some(&auth),
        Some(json!({"configuration": {"base.url": elsewhere}})),
    )
    .await;
    assert_eq!(answer.status, 400, "[{label}] {}", answer.body);
    assert!(
        answer.body["message"]
            .as_str()
            .is_some_and(|message| message.contains("instance_url")),
        "[{label}] {}",
        answer.body
    );
    // Written back as shown, or without its trailing slash: the same root.
    let unslashed = salesforce["configuration"]["base.url"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let answer = call(
        &env,
        Method::PATCH,
        &path,
        Some(&auth),
        Some(json!({"configuration": {"base.url": unslashed}})),
    )
    .await;
    assert_eq!(answer.status, 200, "[{label}] {}", answer.body);
    assert_eq!(
        answer.body["configuration"]["base.url"], salesforce["configuration"]["base.url"],
        "[{label}] the stored one stays"
    );
    let shown = salesforce["configuration"]["base.url"].clone();
    let answer = call(
        &env,
        Method::PATCH,
        &path,
        Some(&auth),
        Some(json!({"configuration": {"base.url": shown}})),
    )
    .await;
    assert_eq!(answer.status, 200, "[{label}] {}", answer.body);
    let generic = env
        .create_instance(&env.org, "sandbox-generic", "movable")
        .await;
    let answer = call(
        &env,
        Method::PATCH,
        &env.api(&format!("/instances/{}", generic["id"])),
        Some(&auth),
        Some(json!({"configuration": {"base.url": format!("{}/box/", env.sandbox.url)}})),
    )
    .await;
    assert_eq!(answer.status, 200, "[{label}] {}", answer.body);
    env.stop().await;
    drop_test_database(&url).await;
}

/// `DELETE /instances` deletes the instance the Element token names, as `PATCH` and `PUT`
/// `/instances` update it (Cloud Elements has it); without an Element token it names none.
#[tokio::test]
async fn delete_by_the_element_token() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "by token")
        .await;
    let token = created["token"].as_str().unwrap();
    let answer = call(
        &env,
        Method::DELETE,
        &env.api("/instances"),
        Some(&env.org.platform()),
        None,
    )
    .await;
    assert_eq!(answer.status, 400, "[{label}] {}", answer.body);
    let with_element = format!("{}, Element {token}", env.org.platform());
    let answer = call(
        &env,
        Method::DELETE,
        &env.api("/instances"),
        Some(&with_element),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "[{label}] {}", answer.body);
    assert_eq!(answer.body["deleted"], true);
    let (status, _) = env
        .get_json(
            &env.api(&format!("/instances/{}", created["id"])),
            &env.org.platform(),
        )
        .await;
    assert_eq!(status, 404, "[{label}]");
    env.stop().await;
    drop_test_database(&url).await;
}

/// Imported tokens the provider rejects: with no refresh token to replace the access token,
/// the create (or update) is refused with the provider's words and nothing is written; with
/// one, the create refreshes before it answers, and answers how that went (invalid when the
/// provider refuses the refresh token too). All were answered `valid: true`, and the first
/// call answered 401.
#[tokio::test]
async fn imported_tokens_the_provider_rejects_are_refused_or_replaced() {
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let auth = env.org.platform();
    let import = |configuration: Value| {
        json!({"element": {"key": "sandbox-generic"}, "externalAuthentication": "initial",
               "configuration": configuration, "name": "imported"})
    };
    let listed = async || {
        env.get_json(&env.api("/instances"), &auth)
            .await
            .1
            .as_array()
            .unwrap()
            .len()
    };
    let before = listed().await;
    let mut bogus = env.configuration();
    bogus["oauth.user.token"] = json!("bogus-access-token");
    let refused = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&auth),
        Some(import(bogus.clone())),
    )
    .await;
    assert_eq!(refused.status, 400, "[{label}] {}", refused.body);
    assert!(
        refused.body["providerMessage"].is_string(),
        "{}",
        refused.body
    );
    assert_eq!(listed().await, before, "[{label}] nothing created");
    // With a refresh token the provider refuses too: refused in the provider's words, and
    // nothing created (the row its refresh ran on is removed again), not `valid: true`.
    let mut dead_refresh = bogus.clone();
    dead_refresh["oauth.user.refresh_token"] = json!("bogus-refresh-token");
    let dead = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&auth),
        Some(import(dead_refresh)),
    )
    .await;
    assert_eq!(dead.status, 400, "[{label}] {}", dead.body);
    assert!(
        dead.body["providerMessage"]
            .as_str()
            .is_some_and(|words| words.contains("invalid_grant")),
        "{}",
        dead.body
    );
    assert_eq!(listed().await, before, "[{label}] nothing created");
    // With a refresh token that works: created on the tokens it gives.
    let source = env
        .create_instance(&env.org, "sandbox-generic", "source")
        .await;
    let revealed = revealed(&env, &env.org, &source).await;
    let mut with_refresh = bogus.clone();
    with_refresh["oauth.user.refresh_token"] =
        revealed["configuration"]["oauth.user.refresh_token"].clone();
    let refreshes = crate::refresh::stat(&env, &["token", "refresh_token"]).await;
    let created = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&auth),
        Some(import(with_refresh)),
    )
    .await;
    assert_eq!(created.status, 200, "[{label}] {}", created.body);
    let token = created.body["token"].as_str().unwrap().to_string();
    assert_eq!(created.body["valid"], true, "[{label}] {}", created.body);
    assert_eq!(
        crate::refresh::stat(&env, &["token", "refresh_token"]).await,
        refreshes + 1,
        "[{label}] refreshed before the answer"
    );
    let unauthorized = crate::refresh::stat(&env, &["api", "unauthorized"]).await;
    let (status, body) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
    assert_eq!(status, 200, "[{label}] {body}");
    assert_eq!(
        crate::refresh::stat(&env, &["api", "unauthorized"]).await,
        unauthorized,
        "[{label}] the first call went with a working token"
    );
    // An update importing a rejected access token, the instance's refresh token given back as
    // shown (kept): refreshed with it before the answer; with a refresh token the provider
    // refuses, answered invalid.
    let patch_import = |id: Value, configuration: Value| {
        let auth = auth.clone();
        let env = &env;
        async move {
            call(
                env,
                Method::PATCH,
                &env.api(&format!("/instances/{id}")),
                Some(&auth),
                Some(json!({"externalAuthentication": "initial", "configuration": configuration})),
            )
            .await
        }
    };
    let kept = patch_import(
        source["id"].clone(),
        json!({"oauth.user.token": "bogus-imported", "oauth.user.refresh_token": "********"}),
    )
    .await;
    assert_eq!(kept.status, 200, "[{label}] {}", kept.body);
    assert_eq!(kept.body["valid"], true, "[{label}] {}", kept.body);
    assert_ne!(
        kept.body["lastRefreshDate"], source["lastRefreshDate"],
        "[{label}] refreshed before the answer"
    );
    let ended = patch_import(
        created.body["id"].clone(),
        json!({"oauth.user.token": "bogus-imported", "oauth.user.refresh_token": "bogus-too"}),
    )
    .await;
    assert_eq!(ended.status, 200, "[{label}] {}", ended.body);
    assert_eq!(ended.body["valid"], false, "[{label}] {}", ended.body);
    // An update importing a rejected access token into an instance with no refresh token.
    let mut access_only = env.configuration();
    access_only["oauth.user.token"] = revealed["configuration"]["oauth.user.token"].clone();
    let only = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&auth),
        Some(import(access_only)),
    )
    .await;
    assert_eq!(only.status, 200, "[{label}] {}", only.body);
    let refused = call(
        &env,
        Method::PATCH,
        &env.api(&format!("/instances/{}", only.body["id"])),
        Some(&auth),
        Some(
            json!({"name": "renamed", "externalAuthentication": "initial",
                    "configuration": {"oauth.user.token": "bogus-again"}}),
        ),
    )
    .await;
    assert_eq!(refused.status, 400, "[{label}] {}", refused.body);
    assert!(
        refused.body["message"]
            .as_str()
            .is_some_and(|message| message.contains("nothing was changed")),
        "{}",
        refused.body
    );
    assert!(
        refused.body["providerMessage"].is_string(),
        "{}",
        refused.body
    );
    let (_, shown) = env
        .get_json(&env.api(&format!("/instances/{}", only.body["id"])), &auth)
        .await;
    assert_eq!(shown["name"], "imported", "[{label}] {shown}");
    env.stop().await;
    drop_test_database(&url).await;
}

/// A verification call whose answer never ends: the service reads the first 64 KiB of a
/// refusal for the provider's words and stops (it read the whole body, for as long as the
/// provider timeout allowed, into memory: a way for any caller to exhaust it).
#[tokio::test]
async fn an_endless_verification_answer_is_not_read_whole() {
    use tokio::io::AsyncWriteExt;
    let (label, url) = test_databases().await.into_iter().next().unwrap();
    let env = Env::start(&label, &url).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut head).await;
                let start = "HTTP/1.1 401 Unauthorized\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
                if stream.write_all(start.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
                // 16 KiB every 5 ms, until the reader hangs up.
                while stream.write_all(chunk.as_bytes()).await.is_ok() {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            });
        }
    });
    let sandbox = env.sandbox.url.clone();
    register_connector(
        &env,
        json!({
            "key": "endless-verify", "name": "Endless verify",
            "baseUrl": format!("http://{addr}/"),
            "oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"),
                      "tokenUrl": format!("{sandbox}/generic/token")},
            "verify": {"path": "api/me"},
        }),
    )
    .await;
    let mut configuration = env.configuration();
    configuration["oauth.user.token"] = json!("an-imported-access-token");
    let started = std::time::Instant::now();
    let imported = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&env.org.platform()),
        Some(
            json!({"element": {"key": "endless-verify"}, "externalAuthentication": "initial",
                    "configuration": configuration}),
        ),
    )
    .await;
    // Rejected, with no refresh token to replace it: refused with the provider's words, read
    // in part.
    assert_eq!(imported.status, 400, "[{label}] {}", imported.body);
    let words = imported.body["providerMessage"].as_str().unwrap();
    assert!(
        words.starts_with("xxxx") && words.len() < 70_000,
        "{}",
        words.len()
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the endless answer was read for {:?}",
        started.elapsed()
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A token endpoint that takes the code and answers 200 without tokens this service can read:
/// a 424 that says so (the caller's code was not refused), and the code stays spent, so a
/// retry with it is refused here rather than presented again.
#[tokio::test]
async fn an_unreadable_answer_to_the_code_exchange_is_not_a_refusal() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let app = axum::Router::new().route(
        "/token",
        axum::routing::post(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { axum::Json(json!({"hello": "world"})) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let registered = call(
        &env,
        Method::POST,
        &env.api("/elements"),
        Some(&env.org.platform()),
        Some(
            json!({"key": "mumbler", "name": "Mumbler", "baseUrl": format!("{server}/api/"),
                    "oauth": {"authorizationUrl": format!("{server}/authorize"),
                              "tokenUrl": format!("{server}/token")}}),
        ),
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.body);
    let body = json!({"element": {"key": "mumbler"}, "providerData": {"code": "a-code"},
                      "configuration": env.configuration()});
    let first = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&env.org.platform()),
        Some(body.clone()),
    )
    .await;
    assert_eq!(first.status, 424, "{}", first.body);
    assert!(
        first.body["message"]
            .as_str()
            .unwrap()
            .contains("could not be read"),
        "{}",
        first.body
    );
    let again = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&env.org.platform()),
        Some(body),
    )
    .await;
    assert_eq!(again.status, 400, "{}", again.body);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the spent code went to the provider again"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A re-authentication through an authorization URL made for another redirect URI (the
/// dashboard's callback page, where the instance was created with the platform's own) sends
/// the provider the URI the code was issued for, the state's: it sent the instance's, and the
/// provider refused the code (RFC 6749 §4.1.3). The instance keeps its own URI.
#[tokio::test]
async fn a_reauthentication_uses_the_redirect_uri_of_its_state() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let created = env
        .create_instance(&env.org, "sandbox-generic", "elsewhere")
        .await;
    let other_callback = "http://127.0.0.1:1/oauth/callback";
    let (code, state) = env
        .authorize_with(
            &env.org,
            "sandbox-generic",
            "elsewhere",
            &[("apiKey", CLIENT_ID), ("callbackUrl", other_callback)],
        )
        .await;
    let reauthenticated = call(
        &env,
        Method::PATCH,
        &env.api(&format!("/instances/{}", created["id"])),
        Some(&env.org.platform()),
        Some(json!({"providerData": {"code": code, "state": state}})),
    )
    .await;
    assert_eq!(reauthenticated.status, 200, "{}", reauthenticated.body);
    assert_eq!(
        reauthenticated.body["configuration"]["oauth.callback.url"],
        env.callback()
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// A scope asked for at `oauth/url` stays the instance's: its refreshes ask for it again where
/// the connector names a scope on refresh (Microsoft's), instead of the connector's own, which
/// narrowed what the user had consented to (or, wider, was refused and ended the instance).
#[tokio::test]
async fn the_scope_asked_for_survives_the_refresh() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let asked = "offline_access User.Read Mail.Send";
    let callback = env.callback();
    let (code, state) = env
        .authorize_with(
            &env.org,
            "sandbox-microsoft",
            "scoped",
            &[
                ("apiKey", CLIENT_ID),
                ("callbackUrl", callback.as_str()),
                ("scope", asked),
            ],
        )
        .await;
    let created = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&env.org.platform()),
        // No redirect URI in the configuration: the state's becomes the instance's.
        Some(json!({"element": {"key": "sandbox-microsoft"},
                    "providerData": {"code": code, "state": state},
                    "configuration": {"oauth.api.key": CLIENT_ID, "oauth.api.secret": CLIENT_SECRET}})),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    assert_eq!(created.body["configuration"]["oauth.scope"], asked);
    assert_eq!(
        created.body["configuration"]["oauth.callback.url"],
        env.callback()
    );
    let token = created.body["token"].as_str().unwrap();
    let scope_now = || async {
        let (status, me) = env.proxy(&env.org, token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "{me}");
        me["scope"].as_str().unwrap_or_default().to_string()
    };
    assert!(scope_now().await.contains("Mail.Send"));
    let refreshed = call(
        &env,
        Method::POST,
        &env.api(&format!("/instances/{}/tokens/refresh", created.body["id"])),
        Some(&env.org.platform()),
        None,
    )
    .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    let after = scope_now().await;
    assert!(
        after.contains("Mail.Send"),
        "the refreshed token's scope: {after}"
    );
    // A replacement of the configuration that does not name the scope keeps it, as it keeps
    // the client's credentials.
    let shown = revealed(&env, &env.org, &created.body).await;
    let mut configuration = shown["configuration"].clone();
    configuration.as_object_mut().unwrap().remove("oauth.scope");
    let replaced = call(
        &env,
        Method::PUT,
        &env.api(&format!("/instances/{}", created.body["id"])),
        Some(&env.org.platform()),
        Some(json!({"configuration": configuration})),
    )
    .await;
    assert_eq!(replaced.status, 200, "{}", replaced.body);
    assert_eq!(replaced.body["configuration"]["oauth.scope"], asked);
    env.stop().await;
    drop_test_database(&url).await;
}

/// Where the network's only way out is a proxy (`serve --outbound-proxy`), token calls go
/// through it (the environment's `HTTP(S)_PROXY` is not followed), except to this machine. Here
/// the "proxy" answers every request itself, with tokens of its own, for a provider name only it
/// knows; the sandbox on loopback is reached directly all the same. A proxy this service cannot
/// speak to (`socks5://`, a mistyped scheme) is refused at start, without its credentials.
#[tokio::test]
async fn token_calls_go_through_the_outbound_proxy_named() {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let recorded = Arc::clone(&seen);
    let proxy = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let recorded = Arc::clone(&recorded);
        async move {
            recorded.lock().unwrap().push(request.uri().to_string());
            axum::Json(
                json!({"access_token": "from-the-proxy", "token_type": "Bearer",
                              "expires_in": 3600, "refresh_token": "rt-from-the-proxy"}),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, proxy).await.unwrap() });
    let url = crate::support::sqlite_database();
    let sandbox = tokenwarden_sandbox::spawn(crate::harness::loopback(), Default::default())
        .await
        .unwrap();
    let env = Env::start_with_sandbox("sqlite", &url, sandbox, |config| {
        config.outbound_proxy = Some(proxy_url.clone());
    })
    .await;
    // The sandbox, on loopback: directly.
    let direct = env
        .create_instance(&env.org, "sandbox-generic", "direct")
        .await;
    let shown = revealed(&env, &env.org, &direct).await;
    assert_ne!(shown["configuration"]["oauth.user.token"], "from-the-proxy");
    assert!(
        seen.lock().unwrap().is_empty(),
        "loopback went through the proxy"
    );
    // A provider out there: through the proxy.
    let registered = call(
        &env,
        Method::POST,
        &env.api("/elements"),
        Some(&env.org.platform()),
        Some(
            json!({"key": "far-away", "name": "Far away", "baseUrl": "http://provider.invalid/api/",
                    "oauth": {"authorizationUrl": "http://provider.invalid/authorize",
                              "tokenUrl": "http://provider.invalid/token"}}),
        ),
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.body);
    let created = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&env.org.platform()),
        Some(
            json!({"element": {"key": "far-away"}, "providerData": {"code": "a-code"},
                    "configuration": env.configuration()}),
        ),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let shown = revealed(&env, &env.org, &created.body).await;
    assert_eq!(shown["configuration"]["oauth.user.token"], "from-the-proxy");
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|uri| uri.contains("provider.invalid/token")),
        "the token call went through the proxy: {seen:?}"
    );
    env.stop().await;
    drop_test_database(&url).await;

    for refused in [
        "socks5://user:s3cr3t@127.0.0.1:1080",
        "htpp://user:s3cr3t@proxy:3128",
    ] {
        let mut config = tokenwarden::app::AppConfig::new(crate::support::sqlite_database());
        config.master_key = Some(crate::harness::TEST_MASTER_KEY.to_string());
        config.outbound_proxy = Some(refused.to_string());
        let error = tokenwarden::app::App::build(config)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(
            error.contains("outbound proxy") && !error.contains("s3cr3t"),
            "{error}"
        );
    }
}

/// A revocation and a re-authentication of one instance at once: the re-authentication waits
/// for the revocation's hold instead of writing under it, so the revocation ends the old grant
/// (the instance invalid, `instance.invalidated`) and the re-authentication then connects the
/// new one (valid, `instance.reauthenticated` after). Written under it, the revocation answered
/// 200 with the instance still valid and no event, its audit entry after the re-authentication.
#[tokio::test]
async fn a_reauthentication_during_a_revocation_comes_after_it() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let created = env
            .create_instance(&env.org, "sandbox-generic", "rita")
            .await;
        let id = created["id"].as_i64().unwrap();
        let token = created["token"].as_str().unwrap().to_string();
        let (code, state) = env.authorize(&env.org, "sandbox-generic", "rosa").await;
        env.sandbox_post(
            "/__sandbox/faults",
            json!({"target": "revoke", "status": 0, "delayMs": 1500, "count": 2}),
        )
        .await;
        let held_before = env.sandbox_stats().await["faultsInjected"]
            .as_u64()
            .unwrap();
        let revoke_url = env.api(&format!("/instances/{id}/tokens/revoke"));
        let revoking = call(&env, Method::POST, &revoke_url, Some(&auth), None);
        let instance_url = env.api(&format!("/instances/{id}"));
        let reauthenticating = async {
            // Once the revocation is at the provider (it holds the instance by then).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while env.sandbox_stats().await["faultsInjected"]
                .as_u64()
                .unwrap()
                == held_before
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "[{label}] no revocation came"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            call(
                &env,
                Method::PATCH,
                &instance_url,
                Some(&auth),
                Some(json!({"providerData": {"code": code, "state": state}})),
            )
            .await
        };
        let (revoked, reauthenticated) = tokio::join!(revoking, reauthenticating);
        assert_eq!(revoked.status, 200, "[{label}] {}", revoked.body);
        assert_eq!(revoked.body["valid"], false, "[{label}] {}", revoked.body);
        assert_eq!(
            reauthenticated.status, 200,
            "[{label}] {}",
            reauthenticated.body
        );
        assert_eq!(reauthenticated.body["valid"], true, "[{label}]");
        // The invalidation first (the same millisecond allowed: events of one millisecond
        // are listed in no set order).
        let (status, listed) = env
            .get_json(&env.api(&format!("/events?instanceId={id}")), &auth)
            .await;
        assert_eq!(status, 200, "[{label}] {listed}");
        let at = |kind: &str| {
            listed["events"]
                .as_array()
                .unwrap()
                .iter()
                .find(|event| event["type"] == kind)
                .and_then(|event| event["occurredAt"].as_str().map(str::to_string))
        };
        let (invalidated, reauth) = (at("instance.invalidated"), at("instance.reauthenticated"));
        assert!(
            matches!((&invalidated, &reauth), (Some(i), Some(r)) if i <= r),
            "[{label}] {listed}"
        );
        let (status, body) = env.proxy(&env.org, &token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "[{label}] the new grant serves: {body}");
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// Concurrent PATCHes of one instance all land: past their unheld attempts they take turns
/// holding the instance, instead of answering 409 "kept being refreshed" with no refresh
/// running.
#[tokio::test]
async fn concurrent_patches_of_one_instance_all_land() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let auth = env.org.platform();
    let created = env
        .create_instance(&env.org, "sandbox-generic", "pat")
        .await;
    let id = created["id"].as_i64().unwrap();
    let instance_url = env.api(&format!("/instances/{id}"));
    let patches = (0..24).map(|k| {
        call(
            &env,
            Method::PATCH,
            &instance_url,
            Some(&auth),
            Some(json!({"configuration": {format!("custom.k{k}"): "v"}})),
        )
    });
    let answers = futures_util::future::join_all(patches).await;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let shown = call(&env, Method::GET, &instance_url, Some(&auth), None).await;
    for k in 0..24 {
        assert_eq!(
            shown.body["configuration"][format!("custom.k{k}")],
            "v",
            "{}",
            shown.body
        );
    }
    env.stop().await;
    drop_test_database(&url).await;
}

/// A disable waits for a refresh under way on another replica (here its lease, taken for
/// 2 s): that replica's scheduler trusts a claim for a few seconds, and would have presented
/// the refresh token after the 200 said the instance makes no more provider calls. The
/// disable answers when the refresh's lease ends, and the instance is disabled.
#[tokio::test]
async fn a_disable_waits_for_a_refresh_under_way_elsewhere() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let instance = env.create_instance(&env.org, "sandbox-box", "hana").await;
    let id = id_of(&instance);
    let now = tokenwarden::app::now_ms();
    env.server
        .app
        .store
        .try_acquire_refresh_lease(id, "another-replica", now, now + 2_000, true)
        .await
        .unwrap()
        .expect("the lease");
    let started = std::time::Instant::now();
    let disabled = call(
        &env,
        Method::DELETE,
        &env.api(&format!("/instances/{id}/enabled")),
        Some(&env.org.platform()),
        None,
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(disabled.status, 200, "{}", disabled.body);
    assert_eq!(disabled.body["disabled"], true);
    assert!(
        waited >= std::time::Duration::from_millis(1_500),
        "answered after {waited:?}, with the refresh still under way"
    );
    // Enabling waits for nothing.
    let started = std::time::Instant::now();
    let enabled = call(
        &env,
        Method::PUT,
        &env.api(&format!("/instances/{id}/enabled")),
        Some(&env.org.platform()),
        None,
    )
    .await;
    assert_eq!(enabled.status, 200, "{}", enabled.body);
    assert_eq!(enabled.body["disabled"], false);
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    env.stop().await;
    drop_test_database(&url).await;
}

/// A `sandbox-box` instance of `user` whose next token call the sandbox holds `delay_ms`: its
/// id, and the paths of its refresh and of its enabled state.
async fn slow_refresh(env: &Env, user: &str, delay_ms: u64) -> (i64, String, String) {
    let instance = env.create_instance(&env.org, "sandbox-box", user).await;
    let id = id_of(&instance);
    env.sandbox_post(
        "/__sandbox/faults",
        json!({"target": "token", "status": 0, "delayMs": delay_ms}),
    )
    .await;
    (
        id,
        env.api(&format!("/instances/{id}/tokens/refresh")),
        env.api(&format!("/instances/{id}/enabled")),
    )
}

/// A disable sent while a refresh of the instance is at the provider is written after that
/// refresh: `instance.token.refreshed` comes before `instance.disabled`, as it happened. The
/// disable was written first and then waited, so the events told of a refresh of an instance
/// already disabled (a black-box tester; webhooks in the same order).
#[tokio::test]
async fn a_disable_during_a_refresh_is_told_after_it() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let (id, refresh_path, disable_path) = slow_refresh(&env, "ordered", 2_000).await;
        let platform = env.org.platform();
        let refresh = call(&env, Method::POST, &refresh_path, Some(&platform), None);
        let disable = async {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            call(&env, Method::DELETE, &disable_path, Some(&platform), None).await
        };
        let (refreshed, disabled) = tokio::join!(refresh, disable);
        assert_eq!(refreshed.status, 200, "[{label}] {}", refreshed.body);
        assert_eq!(disabled.status, 200, "[{label}] {}", disabled.body);
        assert_eq!(disabled.body["disabled"], true, "[{label}]");
        let events = crate::refresh::event_types(&env, &env.server.url, id).await;
        let at = |kind: &str| events.iter().position(|e| e == kind);
        assert!(
            at("instance.token.refreshed") < at("instance.disabled")
                && at("instance.disabled").is_some(),
            "[{label}] {events:?}"
        );
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// A disable sent while this replica's refresh of the instance hangs at its provider answers
/// after the hold's wait (15 s), not when the refresh gives up (the provider timeout, 30 s):
/// the wait for the replica's own refresh was not bounded (a black-box tester: 29 s).
#[tokio::test]
async fn a_disable_waits_for_a_hanging_refresh_no_longer_than_the_hold() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let (id, refresh_path, disable_path) = slow_refresh(&env, "hung", 22_000).await;
    let platform = env.org.platform();
    let refresh = call(&env, Method::POST, &refresh_path, Some(&platform), None);
    let disable = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let started = std::time::Instant::now();
        let answer = call(&env, Method::DELETE, &disable_path, Some(&platform), None).await;
        (answer, started.elapsed())
    };
    // A deletion that cannot have the instance in that time says when to try again.
    let delete = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        env.http
            .delete(env.api(&format!("/instances/{id}")))
            .header("authorization", platform.clone())
            .send()
            .await
            .unwrap()
    };
    let (_, (disabled, took), deleted) = tokio::join!(refresh, disable, delete);
    assert_eq!(deleted.status(), 503);
    assert_eq!(deleted.headers()["retry-after"], "5");
    assert_eq!(disabled.status, 200, "{}", disabled.body);
    assert_eq!(disabled.body["disabled"], true);
    assert!(
        took < std::time::Duration::from_secs(18),
        "the disable answered after {took:?}"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// `oauth.callback.url` is a redirect URI, checked as `oauth/url` checks `callbackUrl`: a
/// `javascript:` URL or one with a password in it was stored and shown to every reader (a
/// privacy reviewer).
#[tokio::test]
async fn the_callback_url_is_checked_as_a_redirect_uri() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let instance = env.create_instance(&env.org, "sandbox-box", "cally").await;
    let id = id_of(&instance);
    let path = env.api(&format!("/instances/{id}"));
    for (callback, expected) in [
        ("javascript:alert(1)", 400),
        ("https://user:s3cret@app.example/cb", 400),
        ("https://app.example/cb?code=preset", 400),
        ("https://app.example/cb2", 200),
    ] {
        let answer = call(
            &env,
            Method::PATCH,
            &path,
            Some(&env.org.platform()),
            Some(json!({"configuration": {"oauth.callback.url": callback}})),
        )
        .await;
        assert_eq!(answer.status, expected, "{callback}: {}", answer.body);
    }
    env.stop().await;
    drop_test_database(&url).await;
}

/// Re-authenticating a disabled instance exchanges the code (the re-authentication itself)
/// and makes no verification call to the provider's API: a disabled instance makes no
/// provider calls (a black-box tester saw the API called).
#[tokio::test]
async fn a_disabled_instance_is_reauthenticated_without_an_api_call() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let instance = env
        .create_instance(&env.org, "sandbox-box", "dormant")
        .await;
    let id = id_of(&instance);
    let platform = env.org.platform();
    let disabled = call(
        &env,
        Method::DELETE,
        &env.api(&format!("/instances/{id}/enabled")),
        Some(&platform),
        None,
    )
    .await;
    assert_eq!(disabled.status, 200, "{}", disabled.body);
    let api_before = env.sandbox_stats().await["api"]["ok"].clone();
    let (code, state) = env.authorize(&env.org, "sandbox-box", "dormant").await;
    let reauthenticated = call(
        &env,
        Method::PATCH,
        &env.api(&format!("/instances/{id}")),
        Some(&platform),
        Some(json!({"providerData": {"code": code, "state": state}})),
    )
    .await;
    assert_eq!(reauthenticated.status, 200, "{}", reauthenticated.body);
    assert_eq!(
        reauthenticated.body["disabled"], true,
        "{}",
        reauthenticated.body
    );
    assert_eq!(
        env.sandbox_stats().await["api"]["ok"],
        api_before,
        "the API was called"
    );
    // Nor is an import of tokens (another grant's) verified at the provider's API.
    let other = env
        .create_instance(&env.org, "sandbox-box", "dormant")
        .await;
    let api_before = env.sandbox_stats().await["api"]["ok"].clone();
    let shown = revealed(&env, &env.org, &other).await;
    let configuration = &shown["configuration"];
    let imported = call(
        &env,
        Method::PATCH,
        &env.api(&format!("/instances/{id}")),
        Some(&platform),
        Some(
            json!({"externalAuthentication": "initial", "configuration": {
            "oauth.user.token": configuration["oauth.user.token"],
            "oauth.user.refresh_token": configuration["oauth.user.refresh_token"]}}),
        ),
    )
    .await;
    assert_eq!(imported.status, 200, "{}", imported.body);
    assert_eq!(
        env.sandbox_stats().await["api"]["ok"],
        api_before,
        "the API was called for the import"
    );
    env.stop().await;
    drop_test_database(&url).await;
}

/// The client secret given to `oauth/url` (`apiSecret`, "kept for the exchange when given")
/// serves a create whose configuration leaves it out, and the instance keeps it for its
/// refreshes: the exchange went without a secret, and the provider refused the client.
#[tokio::test]
async fn the_secret_given_with_the_authorization_url_serves_the_exchange() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let (code, state) = env.authorize(&env.org, "sandbox-box", "kiri").await;
        let mut configuration = env.configuration();
        configuration
            .as_object_mut()
            .unwrap()
            .remove("oauth.api.secret");
        let created = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&env.org.platform()),
            Some(json!({"element": {"key": "sandbox-box"},
                        "providerData": {"code": code, "state": state},
                        "configuration": configuration})),
        )
        .await;
        assert_eq!(created.status, 200, "[{label}] {}", created.body);
        let id = id_of(&created.body);
        let token = created.body["token"].as_str().unwrap();
        // Kept by the instance: shown to the Element token's holder, and used to refresh.
        let (_, shown) = env
            .get_json(&env.api("/instances"), &env.org.with_element(token))
            .await;
        assert_eq!(
            shown[0]["configuration"]["oauth.api.secret"], CLIENT_SECRET,
            "[{label}] {shown}"
        );
        let refreshed = call(
            &env,
            Method::POST,
            &env.api(&format!("/instances/{id}/tokens/refresh")),
            Some(&env.org.platform()),
            None,
        )
        .await;
        assert_eq!(refreshed.status, 200, "[{label}] {}", refreshed.body);
        // A masked secret in a create is no value: left out, the kept one serves (the mask
        // went to the provider as the secret).
        let (code, state) = env.authorize(&env.org, "sandbox-box", "kiri").await;
        let mut masked = configuration.clone();
        masked["oauth.api.secret"] = json!("********");
        let created = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&env.org.platform()),
            Some(json!({"element": {"key": "sandbox-box"},
                        "providerData": {"code": code, "state": state},
                        "configuration": masked})),
        )
        .await;
        assert_eq!(created.status, 200, "[{label}] {}", created.body);
        let token = created.body["token"].as_str().unwrap();
        let (_, shown) = env
            .get_json(&env.api("/instances"), &env.org.with_element(token))
            .await;
        assert_eq!(
            shown[0]["configuration"]["oauth.api.secret"], CLIENT_SECRET,
            "[{label}] {shown}"
        );
        // A masked apiSecret (read from an instance without its Element token) is no secret:
        // not kept, not sent (the exchange goes without one, and this provider refuses the
        // client; it took the mask for a secret, and the instance kept it).
        let callback = env.callback();
        let (code, state) = env
            .authorize_with(
                &env.org,
                "sandbox-box",
                "kiri",
                &[
                    ("apiKey", CLIENT_ID),
                    ("apiSecret", "********"),
                    ("callbackUrl", callback.as_str()),
                ],
            )
            .await;
        let created = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&env.org.platform()),
            Some(json!({"element": {"key": "sandbox-box"},
                        "providerData": {"code": code, "state": state},
                        "configuration": configuration})),
        )
        .await;
        assert_eq!(created.status, 400, "[{label}] {}", created.body);
        assert!(
            created.body["providerMessage"]
                .as_str()
                .is_some_and(|said| said.contains("invalid_client")),
            "[{label}] {}",
            created.body
        );
        // (Through a key rotation while the authorization is pending: `keys.rs`.)
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// A client secret rotated at the provider: the user begins a new authorization with the new
/// one (`apiSecret`) and re-authenticates the instance with its code, the request giving no
/// secret. The exchange goes with the new secret, not the instance's old one (the provider
/// refused the client, and the re-authentication failed), and the instance keeps it.
#[tokio::test]
async fn a_re_authentication_takes_the_secret_its_authorization_was_given() {
    const ROTATED: &str = "it-secret-rotated";
    for (label, url) in test_databases().await {
        // A provider that knows only the rotated secret.
        let sandbox = tokenwarden_sandbox::spawn(
            crate::harness::loopback(),
            tokenwarden_sandbox::SandboxConfig {
                client: Some((CLIENT_ID.to_string(), ROTATED.to_string())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let env = Env::start_with_sandbox(&label, &url, sandbox, |_| {}).await;
        // The instance as it was before the rotation: tokens and the old secret.
        let mut configuration = env.configuration();
        configuration["oauth.user.token"] = json!("old-access-token");
        configuration["oauth.user.refresh_token"] = json!("old-refresh-token");
        let imported = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&env.org.platform()),
            Some(
                json!({"element": {"key": "sandbox-box"}, "externalAuthentication": "initial",
                        "configuration": configuration}),
            ),
        )
        .await;
        assert_eq!(imported.status, 200, "[{label}] {}", imported.body);
        let id = id_of(&imported.body);
        let token = imported.body["token"].as_str().unwrap().to_string();
        let callback = env.callback();
        let (code, state) = env
            .authorize_with(
                &env.org,
                "sandbox-box",
                "kiri",
                &[
                    ("apiKey", CLIENT_ID),
                    ("apiSecret", ROTATED),
                    ("callbackUrl", callback.as_str()),
                ],
            )
            .await;
        let reauthenticated = call(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{id}")),
            Some(&env.org.platform()),
            Some(json!({"providerData": {"code": code, "state": state}})),
        )
        .await;
        assert_eq!(
            reauthenticated.status, 200,
            "[{label}] {}",
            reauthenticated.body
        );
        assert_eq!(reauthenticated.body["valid"], true, "[{label}]");
        let (_, shown) = env
            .get_json(&env.api("/instances"), &env.org.with_element(&token))
            .await;
        assert_eq!(
            shown[0]["configuration"]["oauth.api.secret"], ROTATED,
            "[{label}] {shown}"
        );
        let refreshed = call(
            &env,
            Method::POST,
            &env.api(&format!("/instances/{id}/tokens/refresh")),
            Some(&env.org.platform()),
            None,
        )
        .await;
        assert_eq!(refreshed.status, 200, "[{label}] {}", refreshed.body);
        // The code alone (the articles' body, no state): the one pending authorization of
        // this client and redirect URI gives its secret all the same.
        let imported = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&env.org.platform()),
            Some(
                json!({"element": {"key": "sandbox-box"}, "externalAuthentication": "initial",
                        "configuration": configuration}),
            ),
        )
        .await;
        assert_eq!(imported.status, 200, "[{label}] {}", imported.body);
        let id = id_of(&imported.body);
        let (code, _) = env
            .authorize_with(
                &env.org,
                "sandbox-box",
                "kiri",
                &[
                    ("apiKey", CLIENT_ID),
                    ("apiSecret", ROTATED),
                    ("callbackUrl", callback.as_str()),
                ],
            )
            .await;
        // Another user's authorization of the same app, pending beside it.
        let (other_code, other_state) = env
            .authorize_with(
                &env.org,
                "sandbox-box",
                "kaito",
                &[
                    ("apiKey", CLIENT_ID),
                    ("apiSecret", ROTATED),
                    ("callbackUrl", callback.as_str()),
                ],
            )
            .await;
        let reauthenticated = call(
            &env,
            Method::PATCH,
            &env.api(&format!("/instances/{id}")),
            Some(&env.org.platform()),
            Some(json!({"providerData": {"code": code}})),
        )
        .await;
        assert_eq!(
            reauthenticated.status, 200,
            "[{label}] {}",
            reauthenticated.body
        );
        // That one is left for its own request (read for the secret, not taken).
        let mut without_secret = env.configuration();
        without_secret
            .as_object_mut()
            .unwrap()
            .remove("oauth.api.secret");
        let created = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&env.org.platform()),
            Some(json!({"element": {"key": "sandbox-box"},
                        "providerData": {"code": other_code, "state": other_state},
                        "configuration": without_secret})),
        )
        .await;
        assert_eq!(created.status, 200, "[{label}] {}", created.body);
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// `GET /instances?limit=` answers pages, oldest first, each naming the next in a `Link`
/// header until the last: together the whole list, with or without a tag filter. Bad paging
/// input is a 400.
#[tokio::test]
async fn the_list_comes_in_pages() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let platform = env.org.platform();
        let mut ids = Vec::new();
        let mut element = String::new();
        for user in ["p1", "p2", "p3", "p4", "p5"] {
            let created = env.create_instance(&env.org, "sandbox-generic", user).await;
            ids.push(created["id"].as_i64().unwrap());
            element = created["token"].as_str().unwrap().to_string();
        }
        let whole = call(
            &env,
            Method::GET,
            &env.api("/instances"),
            Some(&platform),
            None,
        )
        .await;
        let whole: Vec<i64> = whole
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_i64().unwrap())
            .collect();
        assert_eq!(whole, ids, "[{label}] the whole list, oldest first");
        for (first, expected, expected_pages) in [
            ("/instances?limit=2".to_string(), ids.clone(), 3),
            (
                "/instances?limit=1&tags[]=p4&tags[]=p2".to_string(),
                vec![ids[1], ids[3]],
                2,
            ),
            ("/instances?limit=5".to_string(), ids.clone(), 1),
        ] {
            let mut next = Some(env.api(&first));
            let mut seen = Vec::new();
            let mut pages = 0;
            while let Some(page_url) = next.take() {
                let response = env
                    .http
                    .get(&page_url)
                    .header("authorization", &platform)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "[{label}] {page_url}");
                if let Some(link) = response.headers().get("link") {
                    let link = link.to_str().unwrap();
                    let target = link
                        .strip_prefix('<')
                        .and_then(|rest| rest.split_once(">; rel=\"next\""))
                        .map(|(target, _)| target)
                        .unwrap_or_else(|| panic!("[{label}] {link}"));
                    next = Some(format!("{}{target}", env.server.url));
                }
                let body: Value = response.json().await.unwrap();
                let page: Vec<i64> = body
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i["id"].as_i64().unwrap())
                    .collect();
                assert!(!page.is_empty(), "[{label}] {page_url}: an empty page");
                seen.extend(page);
                pages += 1;
                assert!(pages <= 5, "[{label}] {first}: pages never end");
            }
            assert_eq!(seen, expected, "[{label}] {first}");
            assert_eq!(pages, expected_pages, "[{label}] {first}");
        }
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "after=nonsense",
            "limit=2&after=1",
            "limit=2&limit=3",
        ] {
            // The Element token's caller too, though its answer is its one instance.
            for authorization in [platform.clone(), env.org.with_element(&element)] {
                let reply = call(
                    &env,
                    Method::GET,
                    &env.api(&format!("/instances?{bad}")),
                    Some(&authorization),
                    None,
                )
                .await;
                assert_eq!(reply.status, 400, "[{label}] {bad}: {}", reply.body);
            }
        }
        env.stop().await;
        drop_test_database(&url).await;
    }
}

/// `null` removes a configuration key, as the OpenAPI document says: at a PATCH, a PUT and a
/// create it was stored as an empty text, so a key could not be deleted, and a client secret
/// read as `null` and written back became `""`, shown masked as if one were set. A blank token
/// still drops it (the contract). And a configuration read and written back unchanged near the
/// key limit is taken: the keys a GET adds (the tokens, their times) were counted against it.
#[tokio::test]
async fn null_removes_a_configuration_key_and_a_read_configuration_goes_back() {
    let url = crate::support::sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let platform = env.org.platform();
    let instance = env
        .create_instance(&env.org, "sandbox-generic", "nulls")
        .await;
    let path = env.api(&format!("/instances/{}", id_of(&instance)));
    let patch = async |configuration: Value| {
        let answer = call(
            &env,
            Method::PATCH,
            &path,
            Some(&platform),
            Some(json!({"configuration": configuration})),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.body
    };
    // The client id a refresh token needs is not removed (it was, answered 200, and the next
    // refresh failed).
    let refused = call(
        &env,
        Method::PATCH,
        &path,
        Some(&platform),
        Some(json!({"configuration": {"oauth.api.key": null}})),
    )
    .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    patch(json!({"y.k": "v", "z.k": "w"})).await;
    let shown = patch(json!({"y.k": null})).await;
    assert!(shown["configuration"].get("y.k").is_none(), "{shown}");
    assert_eq!(shown["configuration"]["z.k"], "w", "{shown}");
    // The client secret the grant was made with is not removed or blanked while the grant
    // stays (the next refresh failed as `invalid_client`).
    for secret in [Value::Null, json!("")] {
        let refused = call(
            &env,
            Method::PATCH,
            &path,
            Some(&platform),
            Some(json!({"configuration": {"oauth.api.secret": secret}})),
        )
        .await;
        assert_eq!(refused.status, 400, "{}", refused.body);
    }
    // An instance without one (a public client) reads it as null, and written back whole it
    // stays without one: it was stored as `""` and shown masked.
    // (Here an access token imported alone, with no client secret.)
    let access_token =
        revealed(&env, &env.org, &instance).await["configuration"]["oauth.user.token"]
            .as_str()
            .unwrap()
            .to_string();
    let public = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&platform),
        Some(json!({"element": {"key": "sandbox-generic"},
                    "externalAuthentication": "initial",
                    "configuration": {"oauth.user.token": access_token}})),
    )
    .await;
    assert_eq!(public.status, 200, "{}", public.body);
    let shown = public.body;
    assert_eq!(
        shown["configuration"]["oauth.api.secret"],
        Value::Null,
        "{shown}"
    );
    let put = call(
        &env,
        Method::PUT,
        &env.api(&format!("/instances/{}", id_of(&shown))),
        Some(&platform),
        Some(json!({"configuration": shown["configuration"], "name": shown["name"]})),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(
        put.body["configuration"]["oauth.api.secret"],
        Value::Null,
        "{}",
        put.body
    );
    // Near the limit: as many keys as the instance may keep, then the whole configuration as
    // read, written back.
    let (_, current) = env.get_json(&path, &platform).await;
    let stored = current["configuration"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(key, value)| !value.is_null() && !key.starts_with("oauth.user."))
        .count();
    let many: serde_json::Map<String, Value> = (0..1000 - stored)
        .map(|n| (format!("k.{n}"), Value::String("v".into())))
        .collect();
    let full = patch(Value::Object(many)).await;
    for method in [Method::PATCH, Method::PUT] {
        let back = call(
            &env,
            method.clone(),
            &path,
            Some(&platform),
            Some(json!({"configuration": full["configuration"], "name": full["name"]})),
        )
        .await;
        assert_eq!(back.status, 200, "{method}: {}", back.body);
    }
    // One more is refused.
    let over = call(
        &env,
        Method::PATCH,
        &path,
        Some(&platform),
        Some(json!({"configuration": {"one.more": "x"}})),
    )
    .await;
    assert_eq!(over.status, 400, "{}", over.body);
    // A create's nulls are no keys.
    let (code, state) = env.authorize(&env.org, "sandbox-generic", "created").await;
    let mut configuration = env.configuration();
    configuration["n.x"] = Value::Null;
    let created = call(
        &env,
        Method::POST,
        &env.api("/instances"),
        Some(&platform),
        Some(json!({"element": {"key": "sandbox-generic"},
                    "providerData": {"code": code, "state": state},
                    "configuration": configuration})),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    assert!(
        created.body["configuration"].get("n.x").is_none(),
        "{}",
        created.body
    );
    env.stop().await;
    drop_test_database(&url).await;
}
