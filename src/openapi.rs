//! `GET /openapi.json`: the OpenAPI 3.1 description of every route.

use serde_json::{Value, json};

/// Every route of the service: (method, path, summary). The router test checks that each one is
/// served, so the description cannot drift from the code silently.
pub const ROUTES: &[(&str, &str, &str)] = &[
    (
        "get",
        "/elements/api-v2/elements",
        "The connector catalog (built-in and the organization's own); `?category=` filters",
    ),
    (
        "post",
        "/elements/api-v2/elements",
        "Register an organization's own OAuth2 connector",
    ),
    ("get", "/elements/api-v2/elements/{key}", "One connector"),
    (
        "delete",
        "/elements/api-v2/elements/{key}",
        "Delete an organization's own connector",
    ),
    (
        "get",
        "/elements/api-v2/elements/{key}/oauth/url",
        "The provider's authorization URL (PKCE verifier kept server-side)",
    ),
    (
        "post",
        "/elements/api-v2/elements/{key}/instances",
        "Create an instance of this connector",
    ),
    (
        "get",
        "/elements/api-v2/instances",
        "The organization's instances (or the Element token's one); `?tags[]=`",
    ),
    (
        "post",
        "/elements/api-v2/instances",
        "Create an instance from a provider's code or imported tokens",
    ),
    (
        "patch",
        "/elements/api-v2/instances",
        "Re-authenticate or update the instance named by the Element token",
    ),
    (
        "put",
        "/elements/api-v2/instances",
        "Replace the configuration of the instance named by the Element token",
    ),
    (
        "put",
        "/elements/api-v2/instances/enabled",
        "Enable the instance named by the Element token",
    ),
    (
        "delete",
        "/elements/api-v2/instances/enabled",
        "Disable the instance named by the Element token",
    ),
    ("get", "/elements/api-v2/instances/{id}", "One instance"),
    (
        "patch",
        "/elements/api-v2/instances/{id}",
        "Re-authenticate (`providerData.code`) or merge name, tags, configuration",
    ),
    (
        "put",
        "/elements/api-v2/instances/{id}",
        "Replace the configuration; `?reAuthenticate=true` with a code re-authenticates",
    ),
    (
        "delete",
        "/elements/api-v2/instances/{id}",
        "Delete; `?revoke=true` revokes at the provider first",
    ),
    ("put", "/elements/api-v2/instances/{id}/enabled", "Enable"),
    (
        "delete",
        "/elements/api-v2/instances/{id}/enabled",
        "Disable",
    ),
    (
        "post",
        "/elements/api-v2/instances/{id}/tokens/refresh",
        "Refresh the access token now",
    ),
    (
        "post",
        "/elements/api-v2/instances/{id}/tokens/revoke",
        "Revoke at the provider; the instance turns invalid",
    ),
    (
        "get",
        "/elements/api-v2/events",
        "Events, newest first; `?instanceId=&type=&before=&limit=`",
    ),
    (
        "get",
        "/elements/api-v2/events/webhook-secret",
        "The organization's webhook secret (the signing key of events of instances without `event.notification.signature.key`)",
    ),
    (
        "get",
        "/elements/api-v2/audit-logs",
        "Who did what, newest first",
    ),
    (
        "get",
        "/elements/api-v2/proxy/{path}",
        "Call the provider through an instance (any method)",
    ),
    (
        "get",
        "/",
        "The dashboard (an HTML page): instances, states, events, Reconnect",
    ),
    ("get", "/healthz", "Health, with a database check"),
    ("get", "/metrics", "Prometheus metrics"),
    ("get", "/openapi.json", "This document"),
    (
        "get",
        "/oauth/callback",
        "The page a provider redirects to: shows code and state",
    ),
];

pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in ROUTES {
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        let platform = path.starts_with("/elements/api-v2");
        let mut operation = json!({
            "summary": summary,
            "responses": {
                "200": {"description": "Success"},
                "400": {"description": "Bad input", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "401": {"description": "Missing or wrong secrets", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "404": {"description": "Not found", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        if platform {
            operation["security"] = json!([{"platform": []}]);
        }
        let parameters: Vec<Value> = path
            .split('/')
            .filter(|segment| segment.starts_with('{'))
            .map(|segment| {
                let name = segment.trim_matches(|c| c == '{' || c == '}');
                json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
            })
            .collect();
        if !parameters.is_empty() {
            operation["parameters"] = Value::Array(parameters);
        }
        entry[*method] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "tokenwarden", "version": env!("CARGO_PKG_VERSION"),
                 "description": "OAuth 2.0 connection service: connectors, instances, refresh, proxy, revocation, events."},
        "paths": paths,
        "components": {
            "securitySchemes": {"platform": {"type": "apiKey", "in": "header", "name": "Authorization",
                "description": "User <user secret>, Organization <organization secret>[, Element <instance token>]"}},
            "schemas": {"Error": {"type": "object", "required": ["requestId", "message"],
                "properties": {"requestId": {"type": "string"}, "message": {"type": "string"}, "providerMessage": {"type": "string"}}}}
        }
    })
}
