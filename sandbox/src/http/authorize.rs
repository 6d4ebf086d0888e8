//! The authorization endpoint: approves at once with `login_hint`, otherwise shows a small
//! consent page whose form posts back here.
//!
//! Errors follow RFC 6749 §4.1.2.1: a missing or invalid `client_id` or `redirect_uri` gets a
//! 400 page (redirecting would hand the error to an unverified URL); anything else is reported
//! to the client by redirecting with `error` and `state`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use super::token::routing_pair;
use super::{AppState, base_url, html_escape, parse_form, parse_pairs};
use crate::profiles::{Profile, RoutingLocation};
use crate::state::{CodeRequest, PkceChallenge, PkceMethod, Sandbox};

/// `GET`: the authorization request.
pub async fn show(State(sandbox): State<AppState>, profile: Profile, request: Request) -> Response {
    let query = request.uri().query().unwrap_or("").to_string();
    let path = request.uri().path().to_string();
    let headers = request.headers().clone();
    let params = match parse_pairs(query.as_bytes()) {
        Ok(params) => params,
        Err(e) => return error_page(&e.0),
    };
    let validated = match validate(&sandbox, &params) {
        Ok(v) => v,
        Err(response) => return response,
    };
    match params
        .get("login_hint")
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
    {
        Some(user) => approve(&sandbox, profile, &headers, validated, user),
        None => consent_page(profile, &path, &params),
    }
}

/// `POST`: the consent form's answer.
pub async fn decide(
    State(sandbox): State<AppState>,
    profile: Profile,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = match parse_form(&headers, &body) {
        Ok(params) => params,
        Err(e) => return error_page(&e.0),
    };
    let validated = match validate(&sandbox, &params) {
        Ok(v) => v,
        Err(response) => return response,
    };
    if params.get("decision").map(String::as_str) == Some("deny") {
        return redirect_error(&validated, "access_denied", "The user denied the request.");
    }
    match params
        .get("login_hint")
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
    {
        Some(user) => approve(&sandbox, profile, &headers, validated, user),
        None => error_page("Enter a user name to approve the request."),
    }
}

/// A request whose client and redirect URI are known good.
struct Validated {
    client_id: String,
    redirect_uri: url::Url,
    /// As sent: the token request must repeat it character for character (RFC 6749 §4.1.3).
    redirect_uri_as_sent: String,
    state: Option<String>,
    scope: String,
    challenge: Option<PkceChallenge>,
}

fn validate(sandbox: &Sandbox, params: &HashMap<String, String>) -> Result<Validated, Response> {
    let get = |name: &str| {
        params
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let Some(client_id) = get("client_id") else {
        return Err(error_page("The request has no client_id."));
    };
    if !sandbox.client_id_allowed(client_id) {
        return Err(error_page(
            "The client_id is not registered at this sandbox (started with --client).",
        ));
    }
    let Some(redirect_uri) = get("redirect_uri") else {
        return Err(error_page("The request has no redirect_uri."));
    };
    let parsed_redirect_uri = match url::Url::parse(redirect_uri) {
        Ok(url) if url.fragment().is_none() && !url.cannot_be_a_base() => url,
        _ => {
            return Err(error_page(
                "The redirect_uri is not an absolute URL without fragment.",
            ));
        }
    };
    let mut validated = Validated {
        client_id: client_id.to_string(),
        redirect_uri_as_sent: redirect_uri.to_string(),
        redirect_uri: parsed_redirect_uri,
        state: get("state").map(str::to_string),
        scope: get("scope").unwrap_or("").to_string(),
        challenge: None,
    };
    match get("response_type") {
        Some("code") => {}
        None => {
            return Err(redirect_error(
                &validated,
                "invalid_request",
                "response_type is missing.",
            ));
        }
        Some(_) => {
            return Err(redirect_error(
                &validated,
                "unsupported_response_type",
                "Only response_type=code is supported.",
            ));
        }
    }
    if get("code_challenge").is_none() && get("code_challenge_method").is_some() {
        return Err(redirect_error(
            &validated,
            "invalid_request",
            "code_challenge_method was given without a code_challenge.",
        ));
    }
    if let Some(challenge) = get("code_challenge") {
        // RFC 7636 §4.2: 43 to 128 unreserved characters (an S256 challenge is 43). A client
        // that sends another passes no real provider either.
        if !pkce_text(challenge) {
            return Err(redirect_error(
                &validated,
                "invalid_request",
                "code_challenge must be 43 to 128 characters of A-Z, a-z, 0-9, '-', '.', '_' and '~' (RFC 7636).",
            ));
        }
        let method = match get("code_challenge_method") {
            Some("S256") => PkceMethod::S256,
            // RFC 7636 §4.3: a missing method means plain.
            Some("plain") | None => PkceMethod::Plain,
            Some(_) => {
                return Err(redirect_error(
                    &validated,
                    "invalid_request",
                    "code_challenge_method must be S256 or plain.",
                ));
            }
        };
        validated.challenge = Some(PkceChallenge {
            method,
            value: challenge.to_string(),
        });
    }
    Ok(validated)
}

fn approve(
    sandbox: &Sandbox,
    profile: Profile,
    headers: &HeaderMap,
    validated: Validated,
    user: &str,
) -> Response {
    let code = sandbox.issue_code(CodeRequest {
        profile,
        user: user.to_string(),
        client_id: validated.client_id.clone(),
        redirect_uri: validated.redirect_uri_as_sent.clone(),
        scope: validated.scope.clone(),
        challenge: validated.challenge.clone(),
    });
    let mut target = validated.redirect_uri.clone();
    {
        let mut pairs = target.query_pairs_mut();
        pairs.append_pair("code", &code);
        if let Some(state) = &validated.state {
            pairs.append_pair("state", state);
        }
        if profile == Profile::AdobeSign {
            // Adobe Sign tells the client which shard to use for every later call.
            let access_point = format!("{}/adobe-sign/", base_url(sandbox, headers));
            pairs.append_pair("api_access_point", &access_point);
            pairs.append_pair("web_access_point", &access_point);
        }
        let settings = sandbox.settings(profile);
        if settings.routing_location != RoutingLocation::TokenResponse
            && let Some((field, value)) =
                routing_pair(profile, &settings, user, &base_url(sandbox, headers))
        {
            pairs.append_pair(&field, &value);
        }
    }
    redirect(&target)
}

/// RFC 6749 §4.1.2.1: report the error to the (valid) redirect URI.
fn redirect_error(validated: &Validated, error: &str, description: &str) -> Response {
    let mut target = validated.redirect_uri.clone();
    {
        let mut pairs = target.query_pairs_mut();
        pairs.append_pair("error", error);
        pairs.append_pair("error_description", description);
        if let Some(state) = &validated.state {
            pairs.append_pair("state", state);
        }
    }
    redirect(&target)
}

fn redirect(target: &url::Url) -> Response {
    match HeaderValue::from_str(target.as_str()) {
        Ok(location) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
        Err(_) => error_page("The redirect URI cannot be put in a Location header."),
    }
}

fn error_page(message: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Sandbox: authorization error</title></head>\
         <body><h1>Authorization error</h1><p>{}</p></body></html>",
        html_escape(message)
    );
    (StatusCode::BAD_REQUEST, Html(body)).into_response()
}

/// The consent page: every parameter of the request rides along as a hidden field.
fn consent_page(profile: Profile, path: &str, params: &HashMap<String, String>) -> Response {
    let mut hidden = String::new();
    let mut names: Vec<&String> = params.keys().filter(|k| *k != "login_hint").collect();
    names.sort();
    for name in names {
        hidden.push_str(&format!(
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">\n",
            html_escape(name),
            html_escape(&params[name])
        ));
    }
    let client = params.get("client_id").map(String::as_str).unwrap_or("");
    let scope = params.get("scope").map(String::as_str).unwrap_or("");
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Sandbox {profile}: authorize</title></head>\n\
         <body>\n<h1>Sandbox {profile}</h1>\n\
         <p>The application <b>{client}</b> asks for access{scope_text}.</p>\n\
         <form method=\"post\" action=\"{action}\">\n{hidden}\
         <label>User name <input type=\"text\" name=\"login_hint\" value=\"alice\" required></label>\n\
         <button type=\"submit\" name=\"decision\" value=\"approve\">Approve</button>\n\
         <button type=\"submit\" name=\"decision\" value=\"deny\" formnovalidate>Deny</button>\n\
         </form>\n</body></html>\n",
        profile = html_escape(profile.key()),
        client = html_escape(client),
        scope_text = if scope.is_empty() {
            String::new()
        } else {
            format!(" to <code>{}</code>", html_escape(scope))
        },
        action = html_escape(path),
    );
    Html(body).into_response()
}

/// A PKCE verifier or challenge as RFC 7636 §4.1 spells one: 43 to 128 unreserved characters.
pub(crate) fn pkce_text(text: &str) -> bool {
    (43..=128).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}
