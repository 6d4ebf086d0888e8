//! The "Connectors" section of the contract: the catalog, an organization's own connectors, and
//! `GET /elements/{key}/oauth/url` (state, PKCE, single use). Every test runs on both engines.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{CLIENT_ID, CLIENT_SECRET, Env};
use crate::instances::call;
use crate::support::{drop_test_database, test_databases};

/// An organization's own connector pointing at the sandbox's generic profile.
pub fn own_connector(env: &Env, key: &str) -> Value {
    let sandbox = env.sandbox.url.clone();
    json!({"key": key, "name": format!("Own {key}"), "category": "other",
           "baseUrl": format!("{sandbox}/generic/"),
           "oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"),
                     "tokenUrl": format!("{sandbox}/generic/token"), "refreshUrl": null,
                     "revokeUrl": format!("{sandbox}/generic/revoke"),
                     "scopes": ["api", "offline_access"], "scopeSeparator": " ",
                     "clientAuth": "client_secret_post", "pkce": false,
                     "authorizationParams": {"prompt": "consent"}},
           "refresh": {"strategy": "on_401", "bufferSeconds": 60}})
}

#[tokio::test]
async fn catalog_lists_and_filters_built_in_connectors() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let listed = call(&env, Method::GET, &env.api("/elements"), Some(&auth), None).await;
        assert_eq!(listed.status, 200, "[{label}] {}", listed.body);
        let all = listed.body.as_array().unwrap();
        assert!(all.len() >= 30, "[{label}] only {} connectors", all.len());
        for entry in all {
            let key = entry["key"].as_str().unwrap_or_default();
            assert!(!key.is_empty(), "{entry}");
            assert!(
                entry["name"].as_str().is_some_and(|n| !n.is_empty()),
                "{key}"
            );
            assert_eq!(entry["authentication"]["type"], "oauth2", "{key}");
            let doc = entry["documentationUrl"].as_str().unwrap_or_default();
            assert!(
                doc.starts_with("https://"),
                "[{label}] {key} documentationUrl {doc:?}"
            );
        }
        for key in [
            "sandbox-adobe-sign",
            "sandbox-salesforce",
            "sandbox-box",
            "sandbox-microsoft",
            "sandbox-generic",
        ] {
            assert!(
                all.iter().any(|e| e["key"] == key),
                "[{label}] {key} missing"
            );
        }
        let filtered = call(
            &env,
            Method::GET,
            &env.api("/elements?category=sandbox"),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(filtered.status, 200);
        let filtered = filtered.body.as_array().unwrap();
        assert_eq!(
            filtered.len(),
            5,
            "[{label}] sandbox category: {filtered:?}"
        );
        assert!(filtered.iter().all(|e| e["category"] == "sandbox"));
        // The sandbox connectors show the sandbox this service uses, not a placeholder.
        let shown = serde_json::to_string(filtered).unwrap();
        assert!(!shown.contains("{sandbox}"), "[{label}] {shown}");
        assert!(
            shown.contains(&format!("{}/generic/", env.sandbox.url)),
            "[{label}] {shown}"
        );
        let none = call(
            &env,
            Method::GET,
            &env.api("/elements?category=no-such-category"),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(none.body, json!([]), "[{label}]");

        let one = call(
            &env,
            Method::GET,
            &env.api("/elements/sandbox-adobe-sign"),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(one.status, 200, "[{label}] {}", one.body);
        assert_eq!(one.body["key"], "sandbox-adobe-sign");
        assert_eq!(one.body["authentication"]["type"], "oauth2");
        assert!(
            one.body["documentationUrl"]
                .as_str()
                .unwrap()
                .starts_with("https://")
        );
        let missing = call(
            &env,
            Method::GET,
            &env.api("/elements/no-such-connector"),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(missing.status, 404, "[{label}] {}", missing.body);
        assert!(
            missing.body["message"]
                .as_str()
                .unwrap()
                .contains("no-such-connector")
        );
        env.stop().await;
    }
}

#[tokio::test]
async fn own_connectors_are_validated_unique_and_private() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let created = call(
            &env,
            Method::POST,
            &env.api("/elements"),
            Some(&auth),
            Some(own_connector(&env, "acme")),
        )
        .await;
        assert!(
            created.status == 200 || created.status == 201,
            "[{label}] {}",
            created.body
        );
        assert_eq!(created.body["key"], "acme");
        assert_eq!(created.body["authentication"]["type"], "oauth2");
        // A connector as a GET shows it posts back under another key: an own one, and a
        // built-in one taken as a template.
        for template in ["acme", "box", "salesforce", "sandbox-generic"] {
            let (_, mut shown) = env
                .get_json(&env.api(&format!("/elements/{template}")), &auth)
                .await;
            shown["key"] = json!(format!("{template}-copy"));
            let copied = call(
                &env,
                Method::POST,
                &env.api("/elements"),
                Some(&auth),
                Some(shown),
            )
            .await;
            assert!(
                copied.status == 200 || copied.status == 201,
                "[{label}] {template}: {}",
                copied.body
            );
            assert_eq!(copied.body["builtIn"], false, "[{label}] {}", copied.body);
        }

        let listed = call(&env, Method::GET, &env.api("/elements"), Some(&auth), None).await;
        assert!(
            listed
                .body
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["key"] == "acme"),
            "[{label}]"
        );
        let own_category = call(
            &env,
            Method::GET,
            &env.api("/elements?category=other"),
            Some(&auth),
            None,
        )
        .await;
        let own_category = own_category.body.as_array().unwrap();
        assert!(
            own_category.iter().any(|e| e["key"] == "acme"),
            "[{label}] {own_category:?}"
        );
        assert!(
            own_category.iter().all(|e| e["category"] == "other"),
            "[{label}]"
        );
        let other_count = own_category.len();
        let one = call(
            &env,
            Method::GET,
            &env.api("/elements/acme"),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(one.status, 200, "[{label}] {}", one.body);
        assert_eq!(one.body["name"], "Own acme");

        // Duplicate and built-in keys: 409.
        let again = call(
            &env,
            Method::POST,
            &env.api("/elements"),
            Some(&auth),
            Some(own_connector(&env, "acme")),
        )
        .await;
        assert_eq!(again.status, 409, "[{label}] {}", again.body);
        assert!(again.body["requestId"].is_string());
        let built_in = call(
            &env,
            Method::POST,
            &env.api("/elements"),
            Some(&auth),
            Some(own_connector(&env, "sandbox-box")),
        )
        .await;
        assert_eq!(built_in.status, 409, "[{label}] {}", built_in.body);

        // Invalid definitions: 400 naming the problem.
        let mut cases: Vec<(Value, &str)> = Vec::new();
        let mut no_token_url = own_connector(&env, "bad-one");
        no_token_url["oauth"]
            .as_object_mut()
            .unwrap()
            .remove("tokenUrl");
        cases.push((no_token_url, "tokenUrl"));
        let mut bad_url = own_connector(&env, "bad-two");
        bad_url["oauth"]["authorizationUrl"] = json!("not a url");
        cases.push((bad_url, "authorizationUrl"));
        let mut bad_key = own_connector(&env, "x");
        bad_key["key"] = json!("Has Spaces");
        cases.push((bad_key, "key"));
        let mut bad_auth = own_connector(&env, "bad-three");
        bad_auth["oauth"]["clientAuth"] = json!("client_secret_jwt");
        cases.push((bad_auth, "clientAuth"));
        let mut bad_strategy = own_connector(&env, "bad-four");
        bad_strategy["refresh"]["strategy"] = json!("sometimes");
        cases.push((bad_strategy, "strategy"));
        let mut no_name = own_connector(&env, "bad-five");
        no_name["name"] = json!("");
        cases.push((no_name, "name"));
        cases.push((json!(["not", "an", "object"]), "connector"));
        for (body, problem) in cases {
            let answer = call(
                &env,
                Method::POST,
                &env.api("/elements"),
                Some(&auth),
                Some(body.clone()),
            )
            .await;
            assert_eq!(answer.status, 400, "[{label}] {body} → {}", answer.body);
            let message = answer.body["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(problem),
                "[{label}] message {message:?} should name {problem:?}"
            );
            assert!(answer.body["requestId"].is_string());
        }
        let listed_after = call(
            &env,
            Method::GET,
            &env.api("/elements?category=other"),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(
            listed_after.body.as_array().unwrap().len(),
            other_count,
            "[{label}] invalid ones were not stored"
        );

        // Another organization sees none of it, and may register its own `acme`.
        let other = env.new_org("other").await;
        let theirs = call(
            &env,
            Method::GET,
            &env.api("/elements"),
            Some(&other.platform()),
            None,
        )
        .await;
        assert!(
            !theirs
                .body
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["key"] == "acme"),
            "[{label}]"
        );
        let hidden = call(
            &env,
            Method::GET,
            &env.api("/elements/acme"),
            Some(&other.platform()),
            None,
        )
        .await;
        assert_eq!(hidden.status, 404, "[{label}] {}", hidden.body);
        let url_hidden = call(
            &env,
            Method::GET,
            &env.api(&format!(
                "/elements/acme/oauth/url?apiKey=a&callbackUrl={}",
                env.callback()
            )),
            Some(&other.platform()),
            None,
        )
        .await;
        assert_eq!(url_hidden.status, 404, "[{label}] {}", url_hidden.body);
        let theirs_created = call(
            &env,
            Method::POST,
            &env.api("/elements"),
            Some(&other.platform()),
            Some(own_connector(&env, "acme")),
        )
        .await;
        assert!(
            theirs_created.status == 200 || theirs_created.status == 201,
            "[{label}] {}",
            theirs_created.body
        );

        // The own connector works end to end: URL, approval, instance, proxied call.
        let instance = env.create_instance(&env.org, "acme", "olga").await;
        assert_eq!(instance["element"]["key"], "acme");
        let token = instance["token"].as_str().unwrap();
        let (status, me) = env.proxy(&env.org, token, Method::GET, "api/me").await;
        assert_eq!(status, 200, "[{label}] {me}");
        env.stop().await;
    }
}

fn query_of(url: &str) -> std::collections::HashMap<String, String> {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[tokio::test]
async fn oauth_url_makes_state_and_keeps_pkce_verifier() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let cb = env.callback();
        let oauth_url = |key: &str, extra: &str| {
            env.api(&format!(
                "/elements/{key}/oauth/url?apiKey={CLIENT_ID}&apiSecret={CLIENT_SECRET}&callbackUrl={}{extra}",
                urlencode(&cb)
            ))
        };
        // No state: one is made, unguessable, different each time.
        let first = call(
            &env,
            Method::GET,
            &oauth_url("sandbox-adobe-sign", ""),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(first.status, 200, "[{label}] {}", first.body);
        assert_eq!(first.body["element"], "sandbox-adobe-sign");
        let state = first.body["state"].as_str().unwrap().to_string();
        assert!(
            state.len() >= 22,
            "[{label}] state {state:?} is too short to be unguessable"
        );
        let second = call(
            &env,
            Method::GET,
            &oauth_url("sandbox-adobe-sign", ""),
            Some(&auth),
            None,
        )
        .await;
        assert_ne!(second.body["state"], first.body["state"]);
        let link = first.body["oauthUrl"].as_str().unwrap();
        assert!(link.starts_with(&env.sandbox.url), "[{label}] {link}");
        let params = query_of(link);
        assert_eq!(params["client_id"], CLIENT_ID);
        assert_eq!(params["redirect_uri"], cb);
        assert_eq!(params["state"], state);
        assert_eq!(params["response_type"], "code");
        assert!(
            !link.contains(CLIENT_SECRET),
            "the client secret never goes into the URL"
        );

        // A given state is echoed; asked for again for the same connector (a reload, a fixed
        // state), the new authorization replaces the old one (it answered 409 for 15
        // minutes); for another connector, it is refused.
        let given = call(
            &env,
            Method::GET,
            &oauth_url("sandbox-adobe-sign", "&state=my-own-state-123"),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(given.status, 200, "[{label}] {}", given.body);
        assert_eq!(given.body["state"], "my-own-state-123");
        assert_eq!(
            query_of(given.body["oauthUrl"].as_str().unwrap())["state"],
            "my-own-state-123"
        );
        let reused = call(
            &env,
            Method::GET,
            &oauth_url("sandbox-adobe-sign", "&state=my-own-state-123"),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(reused.status, 200, "[{label}] {}", reused.body);
        let elsewhere = call(
            &env,
            Method::GET,
            &oauth_url("sandbox-box", "&state=my-own-state-123"),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(elsewhere.status, 409, "[{label}] {}", elsewhere.body);
        // With PKCE: the newest URL's verifier is the one kept, and its code is exchanged.
        let mut newest = Value::Null;
        for _ in 0..2 {
            newest = call(
                &env,
                Method::GET,
                &oauth_url("sandbox-generic", "&state=fixed-pkce-state"),
                Some(&auth),
                None,
            )
            .await
            .body;
        }
        let approved = env
            .http
            .get(format!(
                "{}&login_hint=fixed",
                newest["oauthUrl"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap();
        let location = approved.headers()["location"].to_str().unwrap().to_string();
        let code = query_of(&location)["code"].clone();
        let created = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(json!({"element": {"key": "sandbox-generic"},
                        "providerData": {"code": code, "state": "fixed-pkce-state"},
                        "configuration": env.configuration()})),
        )
        .await;
        assert_eq!(created.status, 200, "[{label}] {}", created.body);

        // Missing apiKey or callbackUrl: 400 naming it.
        let no_key = call(
            &env,
            Method::GET,
            &env.api(&format!(
                "/elements/sandbox-box/oauth/url?callbackUrl={}",
                urlencode(&cb)
            )),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(no_key.status, 400, "[{label}] {}", no_key.body);
        assert!(no_key.body["message"].as_str().unwrap().contains("apiKey"));
        let no_cb = call(
            &env,
            Method::GET,
            &env.api("/elements/sandbox-box/oauth/url?apiKey=x"),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(no_cb.status, 400, "[{label}] {}", no_cb.body);
        assert!(
            no_cb.body["message"]
                .as_str()
                .unwrap()
                .contains("callbackUrl")
        );
        // A redirect URI takes no fragment, and must be a place to return to; a native app's
        // own scheme is one (RFC 8252).
        // Nor user info (shown to whoever reads the instance), nor the redirect's own
        // parameters (the app would read its own `code` in place of the provider's); a query
        // of the app's own stays (privacy and browser-flow testers).
        for (callback, expected) in [
            ("https://app.test/cb#part", 400),
            ("javascript:alert(1)", 400),
            ("com.example.app:/oauth2redirect", 200),
            ("urn:ietf:wg:oauth:2.0:oob", 200),
            ("https://user:pw@app.test/cb", 400),
            ("https://app.test/cb?code=preset", 400),
            ("https://app.test/cb?state=preset", 400),
            ("https://app.test/cb?tenant=eu", 200),
        ] {
            let answer = call(
                &env,
                Method::GET,
                &env.api(&format!(
                    "/elements/sandbox-box/oauth/url?apiKey=x&callbackUrl={}",
                    urlencode(callback)
                )),
                Some(&auth),
                None,
            )
            .await;
            assert_eq!(
                answer.status, expected,
                "[{label}] {callback}: {}",
                answer.body
            );
        }
        // A caller's own state goes through a browser and back: printable ASCII only.
        for (state, expected) in [
            ("a\r\nb", 400),
            ("a\u{0}b", 400),
            ("caf\u{e9}", 400),
            ("a b~c", 200),
        ] {
            let answer = call(
                &env,
                Method::GET,
                &env.api(&format!(
                    "/elements/sandbox-box/oauth/url?apiKey=x&callbackUrl={}&state={}",
                    urlencode(&cb),
                    urlencode(state)
                )),
                Some(&auth),
                None,
            )
            .await;
            assert_eq!(
                answer.status, expected,
                "[{label}] {state:?}: {}",
                answer.body
            );
        }
        let unknown = call(
            &env,
            Method::GET,
            &oauth_url("no-such-connector", ""),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(unknown.status, 404, "[{label}] {}", unknown.body);

        // PKCE: the challenge is in the URL, the verifier stays in the service and is used at
        // the exchange (the sandbox refuses the code without it).
        let pkce = call(
            &env,
            Method::GET,
            &oauth_url("sandbox-generic", ""),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(pkce.status, 200, "[{label}] {}", pkce.body);
        let pkce_params = query_of(pkce.body["oauthUrl"].as_str().unwrap());
        assert_eq!(
            pkce_params.get("code_challenge_method").map(String::as_str),
            Some("S256")
        );
        let challenge = pkce_params["code_challenge"].clone();
        assert!(challenge.len() >= 43, "{challenge}");
        assert!(!pkce.body.to_string().contains("code_verifier"));
        let instance = env
            .create_instance(&env.org, "sandbox-generic", "pkce-user")
            .await;
        assert_eq!(instance["valid"], true);
        assert_eq!(instance["verification"]["ok"], true, "[{label}] {instance}");

        // State is single use: a PKCE code exchanged with a state already used is refused.
        let (code, state) = env.authorize(&env.org, "sandbox-generic", "pkce-two").await;
        let body = json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": code, "state": state},
                          "configuration": env.configuration()});
        let ok = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(body),
        )
        .await;
        assert_eq!(ok.status, 200, "[{label}] {}", ok.body);
        let (code2, _) = env.authorize(&env.org, "sandbox-generic", "pkce-two").await;
        let replay = json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": code2, "state": state},
                            "configuration": env.configuration()});
        let refused = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(replay),
        )
        .await;
        assert_eq!(refused.status, 400, "[{label}] {}", refused.body);
        assert!(
            refused.body["message"].as_str().unwrap().contains("state"),
            "{}",
            refused.body
        );
        // Without the state (the contract's body carries the code alone): the one
        // authorization pending for the connector, client and redirect URI is the one the
        // user followed, and its verifier goes with the code.
        // (An organization of its own: the authorizations above are still pending here.)
        let fresh = env.new_org("stateless").await;
        let fresh_auth = fresh.platform();
        let (code3, _) = env.authorize(&fresh, "sandbox-generic", "pkce-two").await;
        let stateless = json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": code3},
                               "configuration": env.configuration()});
        let created = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&fresh_auth),
            Some(stateless),
        )
        .await;
        assert_eq!(created.status, 200, "[{label}] {}", created.body);
        assert_eq!(created.body["valid"], true, "[{label}] {}", created.body);
        // With two pending (another URL asked for since), which one the user followed is
        // unknown: the state is asked for, and the code is not presented (a wrong verifier
        // would spend it); with its state it works.
        let (code4, state4) = env.authorize(&fresh, "sandbox-generic", "pkce-three").await;
        let newer = call(
            &env,
            Method::GET,
            &oauth_url("sandbox-generic", ""),
            Some(&fresh_auth),
            None,
        )
        .await;
        assert_eq!(newer.status, 200, "[{label}] {}", newer.body);
        let exchanges = env.sandbox_stats().await["token"]["authorization_code"].clone();
        let ambiguous = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&fresh_auth),
            Some(json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": code4.clone()},
                        "configuration": env.configuration()})),
        )
        .await;
        assert_eq!(ambiguous.status, 400, "[{label}] {}", ambiguous.body);
        assert!(
            ambiguous.body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("providerData.state"),
            "[{label}] {}",
            ambiguous.body
        );
        assert_eq!(
            env.sandbox_stats().await["token"]["authorization_code"],
            exchanges,
            "[{label}] the code was presented"
        );
        let with_state = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&fresh_auth),
            Some(json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": code4, "state": state4},
                        "configuration": env.configuration()})),
        )
        .await;
        assert_eq!(with_state.status, 200, "[{label}] {}", with_state.body);

        // Non-PKCE connector: a state already used (or never issued) is refused too.
        let (code4, state4) = env.authorize(&env.org, "sandbox-box", "bea").await;
        let first_use = json!({"element": {"key": "sandbox-box"}, "providerData": {"code": code4, "state": state4},
                               "configuration": env.configuration()});
        let ok = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(first_use),
        )
        .await;
        assert_eq!(ok.status, 200, "[{label}] {}", ok.body);
        let (code5, _) = env.authorize(&env.org, "sandbox-box", "bea").await;
        let second_use = json!({"element": {"key": "sandbox-box"}, "providerData": {"code": code5, "state": state4},
                                "configuration": env.configuration()});
        let refused = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(second_use),
        )
        .await;
        assert_eq!(refused.status, 400, "[{label}] {}", refused.body);
        // A state of another organization does not carry over.
        let other = env.new_org("other").await;
        let (code6, state6) = env.authorize(&env.org, "sandbox-generic", "carl").await;
        let foreign = json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": code6, "state": state6},
                             "configuration": env.configuration()});
        let refused = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&other.platform()),
            Some(foreign),
        )
        .await;
        assert_eq!(refused.status, 400, "[{label}] {}", refused.body);
        // … and was not consumed by the attempt: its owner still completes the authorization.
        let own = json!({"element": {"key": "sandbox-generic"}, "providerData": {"code": code6, "state": state6},
                         "configuration": env.configuration()});
        let ok = call(
            &env,
            Method::POST,
            &env.api("/instances"),
            Some(&auth),
            Some(own),
        )
        .await;
        assert_eq!(ok.status, 200, "[{label}] {}", ok.body);
        env.stop().await;
    }
}

pub fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Built-in connectors whose templates name the client id (GitHub's revocation URL) or an
/// input in their scopes (Dynamics' `https://{org}.crm.dynamics.com/…`) make authorization
/// URLs with everything filled in.
/// The `scope` parameter of an authorization URL.
fn scope_in(url: &str) -> String {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(name, _)| name == "scope")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn authorization_urls_fill_scopes_and_leave_the_client_id_to_the_client() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let auth = env.org.platform();
        let github = call(
            &env,
            Method::GET,
            &env.api(&format!(
                "/elements/github/oauth/url?apiKey=gh-client&callbackUrl={}",
                env.callback()
            )),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(github.status, 200, "[{label}] {}", github.body);
        let dynamics = call(
            &env,
            Method::GET,
            &env.api(&format!(
                "/elements/microsoft-dynamics/oauth/url?apiKey=d-client&org=contoso&callbackUrl={}",
                env.callback()
            )),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(dynamics.status, 200, "[{label}] {}", dynamics.body);
        let oauth_url = dynamics.body["oauthUrl"].as_str().unwrap_or_default();
        let scope = scope_in(oauth_url);
        assert_eq!(
            scope, "offline_access https://contoso.crm.dynamics.com/user_impersonation",
            "[{label}] {oauth_url}"
        );
        // A scope of the caller's keeps the connector's refresh-token scope: a Graph
        // `scope=Mail.Read` without `offline_access` got no refresh token, and its instance
        // died with its first access token.
        let asked = call(
            &env,
            Method::GET,
            &env.api(&format!(
                "/elements/microsoft-graph/oauth/url?apiKey=m-client&scope=Mail.Read&callbackUrl={}",
                env.callback()
            )),
            Some(&auth),
            None,
        )
        .await;
        assert_eq!(asked.status, 200, "[{label}] {}", asked.body);
        let asked_url = asked.body["oauthUrl"].as_str().unwrap();
        assert_eq!(
            scope_in(asked_url),
            "Mail.Read offline_access",
            "[{label}] {asked_url}"
        );
        env.stop().await;
        drop_test_database(&url).await;
    }
}
