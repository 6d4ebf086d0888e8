//! The articles' scenario on every database engine: create from a code, call through the
//! instance, revoke at the provider, see the 401, re-authenticate in place, call again.

use reqwest::Method;
use serde_json::json;

use crate::harness::Env;
use crate::support::test_databases;

#[tokio::test]
async fn reauthentication_scenario_on_every_engine() {
    for (label, url) in test_databases().await {
        let env = Env::start(&label, &url).await;
        let instance = env
            .create_instance(&env.org, "sandbox-adobe-sign", "alice")
            .await;
        let token = instance["token"].as_str().unwrap().to_string();
        let (status, body) = env
            .proxy(&env.org, &token, Method::GET, "api/rest/v6/users/me")
            .await;
        assert_eq!(status, 200, "[{label}] {body}");
        let (_, listed) = env
            .get_json(&env.api("/instances"), &env.org.with_element(&token))
            .await;
        let access = listed[0]["configuration"]["oauth.user.token"]
            .as_str()
            .unwrap()
            .to_string();
        let revoked = env
            .http
            .post(env.sandbox_url("/adobe-sign/oauth/v2/revoke"))
            .query(&[("token", access.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(revoked.status(), 200);
        let (status, body) = env
            .proxy(&env.org, &token, Method::GET, "api/rest/v6/users/me")
            .await;
        assert_eq!(status, 401, "[{label}] {body}");
        assert_eq!(body["message"], "Request failed");
        assert!(
            body["providerMessage"]
                .as_str()
                .unwrap()
                .contains("INVALID_ACCESS_TOKEN"),
            "{body}"
        );
        let (code, state) = env.authorize(&env.org, "sandbox-adobe-sign", "alice").await;
        let patched = env
            .http
            .patch(env.api("/instances"))
            .header("authorization", env.org.with_element(&token))
            .json(&json!({"providerData": {"code": code, "state": state}}))
            .send()
            .await
            .unwrap();
        assert_eq!(patched.status(), 200);
        let (status, _) = env
            .proxy(&env.org, &token, Method::GET, "api/rest/v6/users/me")
            .await;
        assert_eq!(status, 200, "[{label}] after re-authentication");
        env.stop().await;
    }
}
