//! `/elements`: the connector catalog (built-in plus the organization's own) and the first step
//! of an authorization, `GET /elements/{key}/oauth/url`.

use std::collections::HashMap;

use axum::Json as AxumJson;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::caller::Caller;
use super::error::{ApiError, ApiResult};
use super::json::{Json, Path, Query};
use crate::app::{SharedApp, now_ms};
use crate::catalog::{self, Connector};
use crate::crypto::{Binding, hash_secret};
use crate::store::OAuthStateRow;

/// How long a `state` from `oauth/url` stays usable.
const STATE_TTL_MS: i64 = 15 * 60 * 1000;
/// Authorizations an organization may have pending at once (begun, not used, not expired).
const MAX_PENDING_STATES: i64 = 10_000;

/// A connector as the API shows it: `{sandbox}` in its URLs is the sandbox this service uses
/// (`TOKENWARDEN_SANDBOX_URL`), as in the instances made from it.
pub fn connector_json(connector: &Connector, built_in: bool, sandbox_url: &str) -> Value {
    fn resolve(value: &mut Value, sandbox: &str) {
        match value {
            Value::String(text) if text.contains("{sandbox}") => {
                *text = text.replace("{sandbox}", sandbox);
            }
            Value::Array(items) => items.iter_mut().for_each(|item| resolve(item, sandbox)),
            Value::Object(fields) => fields
                .values_mut()
                .for_each(|field| resolve(field, sandbox)),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(connector).unwrap_or_else(|_| json!({}));
    resolve(&mut value, sandbox_url.trim_end_matches('/'));
    if let Some(object) = value.as_object_mut() {
        object.insert("authentication".into(), json!({"type": "oauth2"}));
        object.insert("builtIn".into(), Value::Bool(built_in));
    }
    value
}

#[utoipa::path(
    get,
    path = "/elements/api-v2/elements",
    operation_id = "elements_list",
    tag = "connectors",
    summary = "The connector catalog (built-in and the organization's own); `?category=` filters",
    params(("category" = Option<String>, Query, description = "only the connectors of this category")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The catalog", body = [crate::catalog::Connector]),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn list(
    State(app): State<SharedApp>,
    caller: Caller,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<AxumJson<Vec<Value>>> {
    caller.require_organization()?;
    let category = query.get("category").map(String::as_str);
    let matches = |connector: &Connector| {
        category.is_none_or(|wanted| connector.category.as_deref() == Some(wanted))
    };
    // The organization's own connector of a key wins over a built-in of that key.
    let own = app.store.list_connectors(caller.organization_id).await?;
    let own_keys: std::collections::HashSet<&str> =
        own.iter().map(|row| row.key.as_str()).collect();
    let mut out: Vec<Value> = app
        .built_in
        .values()
        .filter(|c| matches(c) && !own_keys.contains(c.key.as_str()))
        .map(|connector| connector_json(connector, true, &app.config.sandbox_url))
        .collect();
    for row in &own {
        if let Ok(connector) = serde_json::from_str::<Connector>(&row.definition)
            && matches(&connector)
        {
            out.push(connector_json(&connector, false, &app.config.sandbox_url));
        }
    }
    Ok(AxumJson(out))
}

#[utoipa::path(
    get,
    path = "/elements/api-v2/elements/{key}",
    operation_id = "elements_get_one",
    tag = "connectors",
    summary = "One connector",
    params(("key" = String, Path, description = "the connector key")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The connector", body = crate::catalog::Connector),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn get_one(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<AxumJson<Value>> {
    caller.require_organization()?;
    let connector = find(&app, caller.organization_id, &key).await?;
    Ok(AxumJson(connector_json(
        &connector,
        app.is_built_in(caller.organization_id, &key),
        &app.config.sandbox_url,
    )))
}

pub async fn find(app: &SharedApp, organization_id: i64, key: &str) -> ApiResult<Connector> {
    app.connector(organization_id, key)
        .await?
        .map(std::sync::Arc::unwrap_or_clone)
        .ok_or_else(|| ApiError::not_found(format!("There is no connector `{key}`")))
}

#[utoipa::path(
    post,
    path = "/elements/api-v2/elements",
    operation_id = "elements_create",
    tag = "connectors",
    summary = "Register an organization's own OAuth2 connector",
    request_body(content = crate::catalog::Connector, content_type = "application/json", description = "The connector", example = json!({"key": "acme", "name": "Acme", "baseUrl": "https://api.acme.example/", "oauth": {"authorizationUrl": "https://acme.example/oauth/authorize", "tokenUrl": "https://acme.example/oauth/token", "revokeUrl": "https://acme.example/oauth/revoke", "scopes": ["read"]}, "refresh": {"strategy": "on_401"}})),
    security(("platform" = [])),
    responses(
        (status = 201, description = "Registered: the connector", body = crate::catalog::Connector),
        (status = 409, description = "The key is taken (a built-in connector's, or one of the organization's)", body = crate::openapi::ErrorBody),
        crate::openapi::PlatformErrors,
        crate::openapi::BodyErrors
    ),
)]
pub async fn create(
    State(app): State<SharedApp>,
    caller: Caller,
    Json(body): Json<Value>,
) -> ApiResult<(StatusCode, AxumJson<Value>)> {
    caller.require_organization()?;
    let Value::Object(mut fields) = body else {
        return Err(ApiError::bad_request(
            "The connector definition must be a JSON object",
        ));
    };
    // What a GET shows beside the definition, so that a connector read (a built-in one as a
    // template) can be posted back: `builtIn` is the service's to say, `authentication` is
    // OAuth 2.0 for every connector.
    fields.remove("builtIn");
    if let Some(authentication) = fields.remove("authentication")
        && authentication != json!({"type": "oauth2"})
    {
        return Err(ApiError::bad_request(
            "`authentication` is {\"type\": \"oauth2\"}: connectors are OAuth 2.0 ones",
        ));
    }
    let body = Value::Object(fields);
    // The path names the field at fault (`oauth.clientAuth: unknown variant …`).
    let connector: Connector = serde_path_to_error::deserialize(body).map_err(|error| {
        ApiError::bad_request(format!("The connector definition is not valid: {error}"))
    })?;
    catalog::validate(&connector, false)
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    // The operator's refused ranges, for the URLs the service calls naming an IP literal
    // (templates are judged once filled, names by what they resolve to): said at once rather
    // than at the first call. The authorization URL is the user's browser's to reach.
    let oauth = &connector.oauth;
    for (field, url) in [
        ("baseUrl", Some(&connector.base_url)),
        ("oauth.tokenUrl", Some(&oauth.token_url)),
        ("oauth.refreshUrl", oauth.refresh_url.as_ref()),
        ("oauth.revokeUrl", oauth.revoke_url.as_ref()),
    ] {
        if let Some(url) = url {
            app.config.egress.check_text(url).map_err(|why| {
                ApiError::bad_request(format!(
                    "The connector definition is not valid: {field}: {why}"
                ))
            })?;
        }
    }
    if app.built_in.contains_key(&connector.key) {
        return Err(ApiError::conflict(format!(
            "`{}` is the key of a built-in connector; choose another key",
            connector.key
        )));
    }
    let definition = serde_json::to_string(&connector).map_err(ApiError::internal)?;
    app.store
        .insert_connector(
            caller.organization_id,
            &connector.key,
            &definition,
            now_ms(),
        )
        .await
        .map_err(|error| match error {
            crate::store::StoreError::Conflict(_) => ApiError::conflict(format!(
                "This organization already has a connector `{}`",
                connector.key
            )),
            other => other.into(),
        })?;
    crate::audit::record(
        &app,
        &caller,
        "connector.created",
        Some(&connector.key),
        None,
    )
    .await;
    Ok((
        StatusCode::CREATED,
        AxumJson(connector_json(&connector, false, &app.config.sandbox_url)),
    ))
}

#[utoipa::path(
    delete,
    path = "/elements/api-v2/elements/{key}",
    operation_id = "elements_delete",
    tag = "connectors",
    summary = "Delete an organization's own connector",
    params(("key" = String, Path, description = "the connector key")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "Deleted (no body)"),
        (status = 403, description = "A built-in connector cannot be deleted", body = crate::openapi::ErrorBody),
        (status = 409, description = "Instances use the connector", body = crate::openapi::ErrorBody),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn delete(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_organization()?;
    if app.is_built_in(caller.organization_id, &key) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Built-in connectors cannot be deleted",
        ));
    }
    // Instances of a connector need it for every refresh and call: it goes after them.
    match app
        .store
        .delete_connector(caller.organization_id, &key)
        .await?
    {
        crate::store::ConnectorDeletion::Deleted => {
            // Its key may be a built-in's, which is the organization's connector of that key
            // from now on.
            app.refresh_shadowed().await;
        }
        crate::store::ConnectorDeletion::InUse(in_use) => {
            return Err(ApiError::conflict(format!(
                "Connector `{key}` still has {in_use} instance(s): delete them first"
            )));
        }
        crate::store::ConnectorDeletion::NotFound => {
            return Err(ApiError::not_found(format!(
                "There is no connector `{key}`"
            )));
        }
    }
    crate::audit::record(&app, &caller, "connector.deleted", Some(&key), None).await;
    Ok(StatusCode::OK)
}

/// `GET /elements/{key}/oauth/url?apiKey=…&apiSecret=…&callbackUrl=…[&state=…][&scope=…]`.
/// Other query parameters fill the connector's inputs (e.g. `tenant`, `shop`).
#[utoipa::path(
    get,
    path = "/elements/api-v2/elements/{key}/oauth/url",
    operation_id = "elements_oauth_url",
    tag = "connectors",
    summary = "The provider's authorization URL (`apiKey`, `callbackUrl`, optional `state`, `scope`); the PKCE verifier stays server-side",
    params(("key" = String, Path, description = "the connector key"), ("apiKey" = String, Query, description = "the OAuth client id"), ("apiSecret" = Option<String>, Query, description = "the client secret (kept for the exchange when given; a re-authentication whose request gives no secret takes it too, and the instance keeps it)"), ("callbackUrl" = String, Query, description = "the redirect URI registered at the provider"), ("state" = Option<String>, Query, description = "your own state (else one is made); single use, 15 minutes"), ("scope" = Option<String>, Query, description = "scopes, space-separated (else the connector's)")),
    security(("platform" = [])),
    responses(
        (status = 200, description = "The authorization URL", body = crate::openapi::OAuthUrl),
        (status = 429, description = "The organization has 10,000 authorizations pending (`Retry-After`)", body = crate::openapi::ErrorBody),
        crate::openapi::PlatformErrors
    ),
)]
pub async fn oauth_url(
    State(app): State<SharedApp>,
    caller: Caller,
    Path(key): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<AxumJson<Value>> {
    caller.require_organization()?;
    let connector = find(&app, caller.organization_id, &key).await?;
    let api_key = query
        .get("apiKey")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request("`apiKey` (the OAuth client id) is required"))?;
    let callback_url = query
        .get("callbackUrl")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request("`callbackUrl` (the redirect URI) is required"))?;
    // Each is kept with the pending authorization for 15 minutes.
    for (name, longest) in [
        ("apiKey", 1024),
        ("apiSecret", 4096),
        ("callbackUrl", 2048),
        ("scope", 4096),
    ] {
        if query.get(name).is_some_and(|value| value.len() > longest) {
            return Err(ApiError::bad_request(format!(
                "`{name}` is longer than {longest} characters"
            )));
        }
    }
    if let Some(why) = crate::oauth::redirect_uri_problem(callback_url) {
        return Err(ApiError::bad_request(format!(
            "`callbackUrl` is no redirect URI: {why}"
        )));
    }
    let state = match query.get("state").filter(|v| !v.is_empty()) {
        Some(state) if let Some(why) = crate::oauth::state_problem(state) => {
            return Err(ApiError::bad_request(format!("`state` is refused: {why}")));
        }
        Some(state) if state.len() <= 512 => state.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "`state` is longer than 512 characters",
            ));
        }
        None => crate::oauth::new_state(),
    };
    let scope = query.get("scope").filter(|v| !v.is_empty()).cloned();
    let inputs: serde_json::Map<String, Value> = query
        .iter()
        .filter(|(name, _)| connector.inputs.contains_key(*name))
        .map(|(name, value)| (name.clone(), Value::String(value.clone())))
        .collect();
    let (endpoints, spec) = app
        .oauth_settings(&connector, &inputs)
        .map_err(|error| ApiError::bad_request(format!("Connector input missing: {error}")))?;
    // The scope asked for keeps the connector's refresh-token scopes (`offline_access`): it is
    // stored as asked and sent again at refreshes.
    let scope = scope.map(|asked| crate::oauth::with_offline_scopes(&asked, &spec));
    let pkce = connector.oauth.pkce.then(crate::oauth::new_pkce);
    let url = crate::oauth::authorization_url(
        &spec,
        &endpoints,
        api_key,
        callback_url,
        &state,
        scope.as_deref(),
        pkce.as_ref().map(|p| p.challenge.as_str()),
    )
    .map_err(|error| ApiError::bad_request(error.provider_message()))?;
    let state_hash = state_key(caller.organization_id, &state);
    // Bound to the row's key (the state's hash), so that key rotation can re-seal it without
    // knowing the state itself.
    let state_field = crate::crypto::hex(&state_hash);
    let code_verifier_enc = pkce.as_ref().map(|pkce| {
        app.keyring.seal_secret(
            &pkce.verifier,
            Binding {
                table: "oauth_states",
                row: 0,
                field: &state_field,
            },
        )
    });
    // The client secret, when given, is kept for the code's exchange (a create whose
    // configuration leaves it out), sealed like the verifier.
    // A masked value (read from an instance without its Element token) is no secret.
    let api_secret_enc = query
        .get("apiSecret")
        .filter(|secret| !secret.is_empty() && secret.as_str() != crate::instances::MASK)
        .map(|secret| {
            let field = crate::store::OAuthStateSealed::ClientSecret.binding_field(&state_hash);
            app.keyring.seal_secret(
                &crate::secret::Secret::new(secret.clone()),
                Binding {
                    table: "oauth_states",
                    row: 0,
                    field: &field,
                },
            )
        });
    // Pending authorizations are kept 15 minutes: one organization's are bounded, so that a
    // loop of these calls cannot fill the database.
    if app
        .store
        .count_pending_oauth_states(caller.organization_id, now_ms(), MAX_PENDING_STATES)
        .await?
        >= MAX_PENDING_STATES
    {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "This organization has {MAX_PENDING_STATES} authorizations pending (each is kept 15 minutes): wait for some to be used or expire"
            ),
        )
        .with_retry_after(60));
    }
    // A state asked for again (a reload, an integration that passes a fixed one) gets the new
    // authorization in place of the old one, for the same connector.
    let kept = app
        .store
        .replace_oauth_state(&OAuthStateRow {
            state_hash,
            organization_id: caller.organization_id,
            element_key: key.clone(),
            callback_url: callback_url.clone(),
            api_key: api_key.clone(),
            code_verifier_enc,
            scope,
            expires_at: now_ms() + STATE_TTL_MS,
            api_secret_enc,
        })
        .await?;
    if !kept {
        return Err(ApiError::conflict(
            "This `state` is in use for another connector; choose another or let the service make one",
        ));
    }
    Ok(AxumJson(
        json!({"element": key, "oauthUrl": url.as_str(), "state": state}),
    ))
}

/// Where a `state` is kept: per organization, so one organization can neither learn that
/// another holds a state value nor consume it.
pub fn state_key(organization_id: i64, state: &str) -> Vec<u8> {
    hash_secret(&format!("oauth-state/{organization_id}/{state}"))
}
