//! RFC 8414 authorization-server metadata, one document per profile.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::{AppState, base_url, json_response};
use crate::profiles::{ClientAuthMethod, Profile};

pub fn document(State(sandbox): State<AppState>, profile: Profile, headers: HeaderMap) -> Response {
    let base = base_url(&sandbox, &headers);
    let paths = profile.paths();
    let settings = sandbox.settings(profile);
    let mut auth_methods: Vec<&str> = settings
        .client_auth_methods
        .iter()
        .map(|m| match m {
            ClientAuthMethod::ClientSecretPost => "client_secret_post",
            ClientAuthMethod::ClientSecretBasic => "client_secret_basic",
        })
        .collect();
    // Public clients (an id and no secret) at the generic profile, unless the sandbox runs for
    // one confidential client.
    if crate::http::token::public_clients_allowed(&sandbox, profile) {
        auth_methods.push("none");
    }
    let mut doc = Map::new();
    doc.insert("issuer".into(), json!(format!("{base}/{}", profile.key())));
    doc.insert(
        "authorization_endpoint".into(),
        json!(format!("{base}{}", paths.authorize)),
    );
    doc.insert(
        "token_endpoint".into(),
        json!(format!("{base}{}", paths.token)),
    );
    let refresh = paths.refresh.or((profile == Profile::Generic
        && settings.separate_refresh_endpoint)
        .then_some("/generic/refresh"));
    if let Some(refresh) = refresh {
        // Adobe Sign refreshes at a separate URL; not an RFC 8414 field.
        doc.insert("refresh_endpoint".into(), json!(format!("{base}{refresh}")));
    }
    doc.insert(
        "revocation_endpoint".into(),
        json!(format!("{base}{}", paths.revoke)),
    );
    if profile == Profile::Microsoft {
        doc.insert(
            "revocation_endpoint_note".into(),
            json!(
                "Sandbox-only stand-in: the Microsoft identity platform has no revocation endpoint."
            ),
        );
    }
    doc.insert("response_types_supported".into(), json!(["code"]));
    doc.insert(
        "grant_types_supported".into(),
        json!(["authorization_code", "refresh_token"]),
    );
    doc.insert(
        "token_endpoint_auth_methods_supported".into(),
        json!(auth_methods),
    );
    doc.insert(
        "revocation_endpoint_auth_methods_supported".into(),
        json!(auth_methods),
    );
    doc.insert(
        "code_challenge_methods_supported".into(),
        json!(["S256", "plain"]),
    );
    doc.insert(
        "api_base".into(),
        json!(format!("{base}/{}/", profile.key())),
    );
    json_response(StatusCode::OK, Value::Object(doc))
}
