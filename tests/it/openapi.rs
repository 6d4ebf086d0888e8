//! `/openapi.json` tells the truth: every answer of a scenario through the platform API has its
//! status documented, and its JSON body matches the schema the document gives for it (a client
//! generated from the document reads it); the bodies the README sends match the documented
//! request schemas.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::Env;
use crate::support::{drop_test_database, sqlite_database};

/// The part of JSON Schema the document uses: `$ref`, `allOf`/`oneOf`/`anyOf`, `type` (one or a
/// list), `enum`, `required`, `properties`, `additionalProperties`, `items`, `format:
/// date-time`, `minimum`/`maximum`, `minLength`. Each mismatch is pushed to `errors`, named by
/// where it is.
fn check(document: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        let target = &document["components"]["schemas"][name];
        assert!(!target.is_null(), "{reference} is not in the document");
        return check(document, target, value, at, errors);
    }
    if let Some(all) = schema["allOf"].as_array() {
        for part in all {
            check(document, part, value, at, errors);
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(choices) = schema[key].as_array() {
            let fitting = choices
                .iter()
                .filter(|choice| {
                    let mut found = Vec::new();
                    check(document, choice, value, at, &mut found);
                    found.is_empty()
                })
                .count();
            if fitting == 0 || (key == "oneOf" && fitting > 1) {
                errors.push(format!("{at}: {value} fits {fitting} of {key} {schema}"));
            }
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() {
        let fits = types.iter().any(|kind| match *kind {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => true,
        });
        if !fits {
            errors.push(format!("{at}: {value} is not of type {types:?}"));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let (Some("date-time"), Some(text)) = (schema["format"].as_str(), value.as_str())
        && !(text.len() >= 20 && text.as_bytes()[10] == b'T' && text.ends_with('Z'))
    {
        errors.push(format!("{at}: {text} is not a date-time"));
    }
    if let Some(minimum) = schema["minimum"].as_f64()
        && value.as_f64().is_some_and(|number| number < minimum)
    {
        errors.push(format!("{at}: {value} is below {minimum}"));
    }
    if let Some(maximum) = schema["maximum"].as_f64()
        && value.as_f64().is_some_and(|number| number > maximum)
    {
        errors.push(format!("{at}: {value} is above {maximum}"));
    }
    if let (Some(least), Some(text)) = (schema["minLength"].as_u64(), value.as_str())
        && (text.chars().count() as u64) < least
    {
        errors.push(format!("{at}: {text:?} is shorter than {least}"));
    }
    if let Some(object) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap();
            if !object.contains_key(name) {
                errors.push(format!("{at}: required `{name}` is missing"));
            }
        }
        let properties = schema["properties"].as_object();
        for (name, field) in object {
            let here = format!("{at}.{name}");
            match properties.and_then(|properties| properties.get(name)) {
                Some(property) => check(document, property, field, &here, errors),
                None => match &schema["additionalProperties"] {
                    Value::Bool(false) => errors.push(format!("{here}: not a documented field")),
                    extra @ Value::Object(_) => check(document, extra, field, &here, errors),
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (index, item) in array.iter().enumerate() {
            check(document, items, item, &format!("{at}[{index}]"), errors);
        }
    }
}

struct Conformance {
    document: Value,
    errors: Vec<String>,
    answers: usize,
}

impl Conformance {
    /// Checks an answer of `method template` against the document.
    fn answer(&mut self, method: &Method, template: &str, status: u16, body: &str) {
        self.answers += 1;
        let operation =
            &self.document["paths"][template][method.as_str().to_ascii_lowercase().as_str()];
        assert!(
            operation.is_object(),
            "{method} {template} is not in the document"
        );
        let responses = &operation["responses"];
        let shown: String = body.chars().take(300).collect();
        // The proxy's 200 and default answers are the provider's own: any body.
        let providers = template.contains("/proxy");
        let response = match responses.get(status.to_string()) {
            Some(_) if providers && status == 200 => return,
            Some(response) => response,
            None => match responses.get("default") {
                Some(_) if providers => return,
                Some(response) => response,
                None => {
                    self.errors.push(format!(
                        "{method} {template}: {status} is not documented ({shown})"
                    ));
                    return;
                }
            },
        };
        if body.trim().is_empty() {
            return;
        }
        let schema = &response["content"]["application/json"]["schema"];
        let Ok(value) = serde_json::from_str::<Value>(body) else {
            if !schema.is_null() {
                self.errors.push(format!(
                    "{method} {template} {status}: documented as JSON, answered {shown}"
                ));
            }
            return;
        };
        if schema.is_null() {
            self.errors.push(format!(
                "{method} {template} {status}: a JSON body the document gives no schema for: {shown}"
            ));
            return;
        }
        let document = self.document.clone();
        check(
            &document,
            schema,
            &value,
            &format!("{method} {template} {status}"),
            &mut self.errors,
        );
    }

    /// Whether a request body fits the documented one (its mismatches, when not).
    fn fits(&self, method: &Method, template: &str, body: &Value) -> Vec<String> {
        let operation =
            &self.document["paths"][template][method.as_str().to_ascii_lowercase().as_str()];
        let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
        let mut errors = Vec::new();
        check(&self.document, schema, body, "request", &mut errors);
        errors
    }

    /// Checks a request body against the documented one.
    fn request(&mut self, method: &Method, template: &str, body: &Value) {
        let operation =
            &self.document["paths"][template][method.as_str().to_ascii_lowercase().as_str()];
        let schema = operation["requestBody"]["content"]["application/json"]["schema"].clone();
        assert!(
            !schema.is_null(),
            "{method} {template}: no request body documented"
        );
        let document = self.document.clone();
        check(
            &document,
            &schema,
            body,
            &format!("{method} {template} request"),
            &mut self.errors,
        );
    }
}

const API: &str = "/elements/api-v2";

/// Sends a call and checks its answer; returns the status and the body.
async fn call(
    env: &Env,
    conformance: &mut Conformance,
    method: Method,
    template: &str,
    path: &str,
    authorization: &str,
    body: Option<Value>,
) -> (u16, Value) {
    // Both under the platform API's base path.
    let template = &format!("{API}{template}");
    let path = &format!("{API}{path}");
    if let Some(body) = &body {
        conformance.request(&method, template, body);
    }
    let url = format!("{}{path}", env.server.url);
    let mut request = env
        .http
        .request(method.clone(), url)
        .header("authorization", authorization);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    assert!(
        response.headers().contains_key("x-request-id"),
        "{method} {path}: no X-Request-Id"
    );
    let text = response.text().await.unwrap();
    conformance.answer(&method, template, status, &text);
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A call: method, the path's template, the path (both under the base path), the
/// `Authorization`, the body, the status it must answer.
type Step = (Method, &'static str, String, String, Option<Value>, u16);

/// Sends each call, checks its answer against the document and its status; the bodies.
async fn steps(env: &Env, conformance: &mut Conformance, steps: Vec<Step>) -> Vec<Value> {
    let mut bodies = Vec::new();
    for (method, template, path, authorization, body, expected) in steps {
        let shown = format!("{method} {path}");
        let (status, answer) = call(
            env,
            conformance,
            method,
            template,
            &path,
            &authorization,
            body,
        )
        .await;
        assert_eq!(status, expected, "{shown}: {answer}");
        bodies.push(answer);
    }
    bodies
}

#[tokio::test]
async fn the_openapi_document_describes_what_the_service_answers() {
    let url = sqlite_database();
    let env = Env::start("sqlite", &url).await;
    let document: Value = env
        .http
        .get(format!("{}/openapi.json", env.server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut conformance = Conformance {
        document,
        errors: Vec::new(),
        answers: 0,
    };
    let c = &mut conformance;
    let platform = env.org.platform();
    let p = |path: &str| format!("{API}{path}");
    let through = |token: &str| env.org.through(token);
    let (get, post, put, patch, delete) = (
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    );
    let org = || platform.clone();

    // Connectors.
    let acme = json!({"key": "acme-docs", "name": "Acme", "baseUrl": "https://api.acme.test/",
        "oauth": {"authorizationUrl": "https://acme.test/authorize", "tokenUrl": "https://acme.test/token",
                  "scopes": ["api", "offline_access"], "clientAuth": "client_secret_post", "pkce": false}});
    let url_for = format!(
        "/elements/sandbox-box/oauth/url?apiKey=tw-client&apiSecret=tw-secret&callbackUrl={}",
        env.callback()
    );
    #[rustfmt::skip]
    let plan: Vec<Step> = vec![
        (get.clone(), "/elements", "/elements".into(), org(), None, 200),
        (get.clone(), "/elements/{key}", "/elements/sandbox-box".into(), org(), None, 200),
        (get.clone(), "/elements/{key}", "/elements/nope".into(), org(), None, 404),
        (post.clone(), "/elements", "/elements".into(), org(), Some(acme.clone()), 201),
        (post.clone(), "/elements", "/elements".into(), org(), Some(acme), 409),
        (delete.clone(), "/elements/{key}", "/elements/acme-docs".into(), org(), None, 200),
        (delete.clone(), "/elements/{key}", "/elements/sandbox-box".into(), org(), None, 403),
        (get.clone(), "/elements/{key}/oauth/url", url_for, org(), None, 200),
    ];
    steps(&env, c, plan).await;

    // An instance, as the README makes one; read, written back, updated, replaced, disabled
    // (refreshes and calls refused), enabled, refreshed, called.
    let (code, state) = env.authorize(&env.org, "sandbox-box", "olga").await;
    let create = json!({"element": {"key": "sandbox-box"}, "providerData": {"code": code, "state": state},
        "configuration": env.configuration(), "name": "Olga", "tags": ["qa"]});
    let plan: Vec<Step> = vec![(
        post.clone(),
        "/instances",
        "/instances".into(),
        org(),
        Some(create),
        200,
    )];
    let made = steps(&env, c, plan).await;
    let id = made[0]["id"].as_i64().unwrap();
    let token = made[0]["token"].as_str().unwrap().to_string();
    let one = format!("/instances/{id}");
    let with_element = env.org.with_element(&token);
    let plan: Vec<Step> = vec![(
        get.clone(),
        "/instances/{id}",
        one.clone(),
        with_element.clone(),
        None,
        200,
    )];
    let read = steps(&env, c, plan).await;
    let mut written_back = read[0].clone();
    written_back["name"] = json!("Olga B.");
    let replaced = json!({"name": "Olga", "tags": ["qa"], "configuration": env.configuration()});
    #[rustfmt::skip]
    let plan: Vec<Step> = vec![
        (get.clone(), "/instances", "/instances".into(), org(), None, 200),
        (get.clone(), "/instances", "/instances".into(), with_element.clone(), None, 200),
        (get.clone(), "/instances/{id}", one.clone(), org(), None, 200),
        (get.clone(), "/instances/{id}", "/instances/1".into(), org(), None, 404),
        (patch.clone(), "/instances/{id}", one.clone(), with_element.clone(), Some(written_back), 200),
        (patch.clone(), "/instances/{id}", one.clone(), org(), Some(json!({"tags": ["qa", "docs"]})), 200),
        (put.clone(), "/instances/{id}", one.clone(), org(), Some(replaced), 200),
        (delete.clone(), "/instances/{id}/enabled", format!("{one}/enabled"), org(), None, 200),
        (post.clone(), "/instances/{id}/tokens/refresh", format!("{one}/tokens/refresh"), org(), None, 409),
        (get.clone(), "/proxy/{path}", "/proxy/api/me".into(), through(&token), None, 409),
        (put.clone(), "/instances/{id}/enabled", format!("{one}/enabled"), org(), None, 200),
        (post.clone(), "/instances/{id}/tokens/refresh", format!("{one}/tokens/refresh"), org(), None, 200),
        (get.clone(), "/proxy/{path}", "/proxy/api/me".into(), through(&token), None, 200),
        (get.clone(), "/proxy/{path}", "/proxy/api/nothing-here".into(), through(&token), None, 404),
        // Events, the audit log, the webhook secret.
        (get.clone(), "/events", "/events?limit=5".into(), org(), None, 200),
        (get.clone(), "/events", "/events?limit=0".into(), org(), None, 400),
        (get.clone(), "/audit-logs", "/audit-logs".into(), org(), None, 200),
        (get.clone(), "/events/webhook-secret", "/events/webhook-secret".into(), org(), None, 200),
        // Revoked, then deleted.
        (post.clone(), "/instances/{id}/tokens/revoke", format!("{one}/tokens/revoke"), org(), None, 200),
        (delete.clone(), "/instances/{id}", one.clone(), org(), None, 200),
    ];
    let answers = steps(&env, c, plan).await;
    let revoked = &answers[answers.len() - 2];
    assert!(revoked["revocation"].is_object(), "{revoked}");
    let health = env
        .http
        .get(format!("{}/healthz", env.server.url))
        .send()
        .await
        .unwrap();
    let status = health.status().as_u16();
    c.answer(&get, "/healthz", status, &health.text().await.unwrap());

    // A connector without a revocation endpoint: its instance made for it, revoked (nothing to
    // send), deleted with `?revoke=true`.
    let sandbox = &env.sandbox.url;
    let plain = json!({"key": "plain-docs", "name": "Plain", "baseUrl": format!("{sandbox}/generic/"),
        "oauth": {"authorizationUrl": format!("{sandbox}/generic/authorize"), "tokenUrl": format!("{sandbox}/generic/token")}});
    let plan: Vec<Step> = vec![(
        post.clone(),
        "/elements",
        "/elements".into(),
        org(),
        Some(plain),
        201,
    )];
    steps(&env, c, plan).await;
    let (code, state) = env.authorize(&env.org, "plain-docs", "pia").await;
    let body = json!({"providerData": {"code": code, "state": state}, "configuration": env.configuration(), "name": "Pia"});
    #[rustfmt::skip]
    let plan: Vec<Step> = vec![(post.clone(), "/elements/{key}/instances", "/elements/plain-docs/instances".into(), org(), Some(body), 200)];
    let made = steps(&env, c, plan).await;
    let plain = format!("/instances/{}", made[0]["id"].as_i64().unwrap());
    // Bodies the document calls invalid are refused, and valid ones taken.
    for (body, taken) in [
        (json!({"bogus": 1}), false),
        (json!({"name": "x", "disabled": "yes"}), false),
        (
            json!({"configuration": {"note": 5, "flag": true, "gone": null}}),
            true,
        ),
    ] {
        let fits = c.fits(&patch, &p("/instances/{id}"), &body).is_empty();
        assert_eq!(fits, taken, "the document on {body}");
        let answer = env
            .http
            .patch(format!("{}{API}{plain}", env.server.url))
            .header("authorization", &platform)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        c.answer(
            &patch,
            &p("/instances/{id}"),
            status,
            &answer.text().await.unwrap(),
        );
        assert_eq!(status == 200, taken, "the service on {body}: {status}");
    }
    #[rustfmt::skip]
    let plan: Vec<Step> = vec![
        (post.clone(), "/instances/{id}/tokens/revoke", format!("{plain}/tokens/revoke"), org(), None, 200),
        (delete.clone(), "/instances/{id}", format!("{plain}?revoke=true"), org(), None, 200),
    ];
    steps(&env, c, plan).await;

    assert!(c.answers > 30, "{} answers checked", c.answers);
    assert!(
        c.errors.is_empty(),
        "the document and the answers disagree:\n{}",
        c.errors.join("\n")
    );
    env.stop().await;
    drop_test_database(&url).await;
}
