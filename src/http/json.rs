//! A JSON extractor whose rejections answer in the API's error shape (axum's
//! `examples/error-handling`), so bad JSON is a clear 400 (or 413, 415) and never a bare text.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// A query-string extractor whose rejections answer in the API's error shape (400 with a
/// message naming the parameter), not axum's plain text.
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

/// A path-parameter extractor whose rejections answer in the API's error shape: a segment that
/// is not UTF-8 once percent-decoded (`/instances/%FF`) is a 400 with a message, not axum's
/// plain text.
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> ApiError {
    match rejection {
        PathRejection::FailedToDeserializePathParams(error) => ApiError::bad_request(format!(
            "The URL's path is not valid: {}",
            error.body_text()
        )),
        // Only a route without parameters could get here: a fault of ours, not of the input.
        other => ApiError::internal(format!("path parameters: {}", other.body_text())),
    }
}

pub fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::bad_request(format!(
        "The query string is not valid: {}",
        without_axum_words(&rejection.body_text())
    ))
}

/// axum's rejection text without its own opening words, which name its types ("Failed to
/// deserialize the JSON body into the target type: "): the rest, serde's, names the field.
fn without_axum_words(text: &str) -> &str {
    [
        "Failed to deserialize the JSON body into the target type: ",
        "Failed to parse the request body as JSON: ",
        "Failed to deserialize query string: ",
    ]
    .iter()
    .find_map(|prefix| text.strip_prefix(prefix))
    .unwrap_or(text)
}

/// A query string's yes-or-no parameter: `true` or `false` in any case (Python's `requests`
/// sends `True`), or `1` / `0`.
pub fn flag<'de, D>(deserializer: D) -> Result<Option<bool>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::Deserialize;
    let text = String::deserialize(deserializer)?;
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(Some(true)),
        "false" | "0" => Ok(Some(false)),
        _ => Err(serde::de::Error::custom(format!(
            "`{text}` is not `true` or `false`"
        ))),
    }
}

pub fn json_rejection(rejection: JsonRejection) -> ApiError {
    // A body that stopped coming (see `http::stalls_cut`): 408.
    if crate::http::stalled(&rejection) {
        return crate::http::stalled_body();
    }
    // A body of the wrong shape (wrong field types) is a plain 400 like every other invalid
    // input of the API, not axum's 422.
    let status = match &rejection {
        JsonRejection::JsonDataError(_) => StatusCode::BAD_REQUEST,
        other => other.status(),
    };
    let message = match &rejection {
        JsonRejection::JsonDataError(error) => {
            format!(
                "The JSON body does not have the expected shape: {}",
                without_axum_words(&error.body_text())
            )
        }
        JsonRejection::JsonSyntaxError(error) => {
            format!(
                "The body is not valid JSON: {}",
                without_axum_words(&error.body_text())
            )
        }
        JsonRejection::MissingJsonContentType(_) => {
            "Send the body as JSON with `Content-Type: application/json`".to_string()
        }
        other => {
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                "The body is larger than the service accepts".to_string()
            } else {
                format!("The body could not be read: {}", other.body_text())
            }
        }
    };
    ApiError::new(status, message)
}
