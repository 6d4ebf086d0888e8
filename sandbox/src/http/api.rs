//! The protected API: `api/me` and `api/echo` on every profile, plus provider-shaped paths
//! (Adobe `api/rest/v6/users/me`, Salesforce `services/data/v59.0/…` and the identity URL,
//! Box `2.0/users/me`, Graph `v1.0/me`). Every call goes through [`authorize_call`], which
//! applies API faults, checks the bearer token and counts the outcome.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};

use super::shapes::api_rejection;
use super::token::{salesforce_org_id, salesforce_user_id, stable_hex};
use super::{AppState, base_url, bearer_token, injected_fault, json_response};
use crate::faults::FaultTarget;
use crate::profiles::Profile;
use crate::state::{AccessRejection, Sandbox, Stats, TokenOwner};

/// Echo bodies are for checking what a proxy forwarded; 1 MiB is plenty.
const MAX_ECHO_BODY_BYTES: usize = 1024 * 1024;

/// Checks the call's bearer token; the error is the profile's rejection answer.
async fn authorize_call(
    sandbox: &Sandbox,
    profile: Profile,
    headers: &HeaderMap,
) -> Result<TokenOwner, Response> {
    if let Some(fault) = injected_fault(sandbox, FaultTarget::Api).await {
        return Err(fault);
    }
    let checked = match bearer_token(headers) {
        Some(token) => sandbox.check_access_token(profile, token),
        None => Err(AccessRejection::Missing),
    };
    match checked {
        Ok(owner) => {
            Stats::bump(&sandbox.stats.api_ok);
            Ok(owner)
        }
        Err(rejection) => {
            Stats::bump(&sandbox.stats.api_unauthorized);
            let settings = sandbox.settings(profile);
            let answer = api_rejection(
                profile,
                settings.api_rejection_shape,
                rejection,
                sandbox.clock.now_ms(),
            );
            let accepts_gzip = headers
                .get(axum::http::header::ACCEPT_ENCODING)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().contains("gzip"));
            if settings.api_gzip && accepts_gzip {
                return Err(gzipped(answer).await);
            }
            Err(answer)
        }
    }
}

/// Most of a body read and dropped before a refusal, and for how long at most.
const DRAIN_AT_MOST: usize = 64 * 1024 * 1024;
const DRAIN_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// A request body of at most [`MAX_ECHO_BODY_BYTES`]; `None` when it is larger or breaks off.
/// Past the limit the rest is read and dropped ([`drain`]) before the answer, as servers
/// linger before closing: a connection closed with unread bytes is reset, and a reset throws
/// away the refusal the caller has not read yet.
async fn read_or_drain(mut body: axum::body::Body) -> Option<axum::body::Bytes> {
    use axum::body::HttpBody;
    let mut kept = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let Ok(data) = frame.ok()?.into_data() else {
            continue;
        };
        if kept.len() + data.len() > MAX_ECHO_BODY_BYTES {
            drain(body).await;
            return None;
        }
        kept.extend_from_slice(&data);
    }
    Some(kept.into())
}

/// Reads a body to its end and drops it, up to [`DRAIN_AT_MOST`] bytes and [`DRAIN_FOR`]
/// (a body declared larger is not read at all): what a refusal does before it answers.
async fn drain(mut body: axum::body::Body) {
    use axum::body::HttpBody;
    if body
        .size_hint()
        .exact()
        .is_some_and(|length| length > DRAIN_AT_MOST as u64)
    {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        let mut read = 0_usize;
        while let Some(Ok(frame)) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
        {
            read += frame.data_ref().map_or(0, |data| data.len());
            if read > DRAIN_AT_MOST {
                break;
            }
        }
    })
    .await;
}

/// The answer with its body gzip-encoded (`Content-Encoding: gzip`). The encoding is gzip's
/// simplest valid form, one stored deflate block: what matters is that a reader must decode it.
async fn gzipped(answer: Response) -> Response {
    use axum::http::{HeaderValue, header};
    let (mut parts, body) = answer.into_parts();
    let Ok(plain) = axum::body::to_bytes(body, MAX_ECHO_BODY_BYTES).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    // Header: magic, deflate, no flags, no time, no extra flags, unknown OS.
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut chunks = plain.chunks(65_535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = u8::from(chunks.peek().is_none());
        let len = chunk.len() as u16;
        out.push(last);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(&plain).to_le_bytes());
    out.extend_from_slice(&(plain.len() as u32).to_le_bytes());
    parts
        .headers
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(out))
}

/// CRC-32 (IEEE, as gzip's trailer has it), bit by bit: rejections are small.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Runs `answer` for an authorized call, or answers the rejection.
async fn protected(
    sandbox: &Sandbox,
    profile: Profile,
    headers: &HeaderMap,
    answer: impl FnOnce(&TokenOwner, &str) -> Value,
) -> Response {
    match authorize_call(sandbox, profile, headers).await {
        Ok(owner) => json_response(StatusCode::OK, answer(&owner, &base_url(sandbox, headers))),
        Err(rejection) => rejection,
    }
}

/// `GET /{profile}/api/me`: the same shape on every profile.
pub async fn me(State(sandbox): State<AppState>, profile: Profile, headers: HeaderMap) -> Response {
    protected(&sandbox, profile, &headers, |owner, _| {
        json!({
            "user": owner.user,
            "profile": profile.key(),
            "scope": owner.scope,
            "clientId": owner.client_id,
        })
    })
    .await
}

/// `{ANY} /{profile}/api/echo[/…]`: what the sandbox received, minus the Authorization header.
pub async fn echo(State(sandbox): State<AppState>, profile: Profile, request: Request) -> Response {
    echo_for_tenant(sandbox, profile, None, request).await
}

/// Refuses a token of another tenant than the one in the path: routing data matters only if
/// using the wrong host fails, as it does at Salesforce or QuickBooks.
fn check_tenant(owner: &TokenOwner, tenant: &str) -> Result<String, Response> {
    let own = Sandbox::tenant_of(&owner.user);
    if own == tenant {
        Ok(own)
    } else {
        Err(json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "wrong_tenant", "message": format!("This access token belongs to another tenant than '{tenant}': call the host named by the routing data of the authorization.")}),
        ))
    }
}

/// `GET /generic/tenants/{tenant}/api/me`: `api/me` of one tenant, with its id.
pub async fn tenant_me(
    State(sandbox): State<AppState>,
    profile: Profile,
    tenant: String,
    headers: HeaderMap,
) -> Response {
    let owner = match authorize_call(&sandbox, profile, &headers).await {
        Ok(owner) => owner,
        Err(rejection) => return rejection,
    };
    match check_tenant(&owner, &tenant) {
        Ok(tenant) => json_response(
            StatusCode::OK,
            json!({
                "user": owner.user,
                "profile": profile.key(),
                "scope": owner.scope,
                "clientId": owner.client_id,
                "tenant": tenant,
            }),
        ),
        Err(response) => response,
    }
}

/// `{ANY} /generic/tenants/{tenant}/api/echo[/…]`.
pub async fn tenant_echo(
    State(sandbox): State<AppState>,
    profile: Profile,
    tenant: String,
    request: Request,
) -> Response {
    echo_for_tenant(sandbox, profile, Some(tenant), request).await
}

async fn echo_for_tenant(
    sandbox: AppState,
    profile: Profile,
    tenant: Option<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let owner = match authorize_call(&sandbox, profile, &parts.headers).await {
        Ok(owner) => owner,
        Err(rejection) => {
            drain(body).await;
            return rejection;
        }
    };
    if let Some(tenant) = &tenant
        && let Err(response) = check_tenant(&owner, tenant)
    {
        drain(body).await;
        return response;
    }
    let body = match read_or_drain(body).await {
        Some(body) => body,
        None => {
            return json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "payload_too_large", "message": "The echo endpoint takes at most 1 MiB."}),
            );
        }
    };
    let mut headers = Map::new();
    for name in parts.headers.keys() {
        if name == axum::http::header::AUTHORIZATION {
            continue;
        }
        let values: Vec<String> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.insert(name.as_str().to_string(), json!(values.join(", ")));
    }
    let query = parts.uri.query().unwrap_or("");
    let query_params: Map<String, Value> = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), json!(v)))
        .collect();
    json_response(
        StatusCode::OK,
        json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": query,
            "queryParams": query_params,
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
            "user": owner.user,
            "profile": profile.key(),
        }),
    )
}

/// The provider-shaped API paths of `profile`.
pub fn provider_routes(profile: Profile) -> Router<AppState> {
    let shaped = move |shape: fn(&TokenOwner, &str) -> Value| {
        get(
            move |State(sandbox): State<AppState>, headers: HeaderMap| async move {
                protected(&sandbox, profile, &headers, shape).await
            },
        )
    };
    match profile {
        Profile::AdobeSign => {
            Router::new().route("/adobe-sign/api/rest/v6/users/me", shaped(adobe_user))
        }
        Profile::Salesforce => Router::new()
            .route(
                "/salesforce/services/data/v59.0/sobjects",
                shaped(salesforce_sobjects),
            )
            .route(
                "/salesforce/services/data/v59.0/chatter/users/me",
                shaped(salesforce_chatter_user),
            )
            .route("/salesforce/id/{org}/{user}", shaped(salesforce_identity)),
        Profile::Box => Router::new().route("/box/2.0/users/me", shaped(box_user)),
        Profile::Microsoft => Router::new().route("/microsoft/v1.0/me", shaped(graph_user)),
        Profile::Generic => Router::new(),
    }
}

fn email(user: &str) -> String {
    format!("{user}@example.com")
}

fn adobe_user(owner: &TokenOwner, _base: &str) -> Value {
    let hex = stable_hex(&owner.user);
    json!({
        "id": format!("CBJCHBCAABAA{}", &hex[..20]),
        "email": email(&owner.user),
        "firstName": owner.user,
        "lastName": "Sandbox",
        "accountId": "CBJCHBCAABAASANDBOXACCOUNT",
        "accountType": "ENTERPRISE",
        "status": "ACTIVE",
        "isAccountAdmin": false,
        "company": "tokenwarden sandbox",
    })
}

fn salesforce_sobjects(_owner: &TokenOwner, _base: &str) -> Value {
    let sobject = |name: &str, prefix: &str| {
        json!({"name": name, "label": name, "keyPrefix": prefix, "queryable": true,
               "urls": {"sobject": format!("/services/data/v59.0/sobjects/{name}")}})
    };
    json!({
        "encoding": "UTF-8",
        "maxBatchSize": 200,
        "sobjects": [sobject("Account", "001"), sobject("Contact", "003"), sobject("Opportunity", "006")],
    })
}

fn salesforce_chatter_user(owner: &TokenOwner, base: &str) -> Value {
    let id = salesforce_user_id(&owner.user);
    json!({
        "id": id,
        "type": "User",
        "username": email(&owner.user),
        "displayName": owner.user,
        "name": owner.user,
        "firstName": owner.user,
        "lastName": "Sandbox",
        "email": email(&owner.user),
        "url": format!("/services/data/v59.0/chatter/users/{id}"),
        "companyName": "tokenwarden sandbox",
        "instanceUrl": format!("{base}/salesforce"),
    })
}

fn salesforce_identity(owner: &TokenOwner, base: &str) -> Value {
    let user_id = salesforce_user_id(&owner.user);
    let org_id = salesforce_org_id();
    json!({
        "id": format!("{base}/salesforce/id/{org_id}/{user_id}"),
        "user_id": user_id,
        "organization_id": org_id,
        "username": email(&owner.user),
        "display_name": owner.user,
        "email": email(&owner.user),
        "active": true,
        "user_type": "STANDARD",
    })
}

fn box_user(owner: &TokenOwner, _base: &str) -> Value {
    let hex = stable_hex(&owner.user);
    let id: String = hex
        .bytes()
        .filter(u8::is_ascii_digit)
        .take(11)
        .map(char::from)
        .collect();
    json!({
        "type": "user",
        "id": id,
        "name": owner.user,
        "login": email(&owner.user),
        "status": "active",
        "language": "en",
    })
}

fn graph_user(owner: &TokenOwner, _base: &str) -> Value {
    let hex = stable_hex(&owner.user);
    json!({
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users/$entity",
        "id": format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]),
        "displayName": owner.user,
        "givenName": owner.user,
        "surname": "Sandbox",
        "mail": email(&owner.user),
        "userPrincipalName": email(&owner.user),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32_is_gzips() {
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(super::crc32(b""), 0);
    }
}
