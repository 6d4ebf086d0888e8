//! Who is calling: the `Authorization` header checked against the store.
//!
//! `User` and `Organization` are always required; `Element` names one instance besides (calls
//! through an instance, which need only `User` and `Element`, are authenticated by the proxy).
//! An Element token of another organization is refused exactly like an unknown one.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::auth::parse_authorization;
use super::error::ApiError;
use crate::app::SharedApp;
use crate::crypto::hash_secret;
use crate::store::InstanceRow;

#[derive(Clone)]
pub struct Caller {
    pub user_id: i64,
    pub organization_id: i64,
    /// The instance named by the `Element` part, when there is one.
    pub element: Option<InstanceRow>,
    pub has_organization_secret: bool,
}

impl Caller {
    /// Who made the request, for an audit entry written after the request's own future (by a
    /// task that outlives a caller hanging up).
    pub fn for_the_record(&self) -> Caller {
        Caller {
            user_id: self.user_id,
            organization_id: self.organization_id,
            element: None,
            has_organization_secret: self.has_organization_secret,
        }
    }

    /// Organization-wide calls need the organization secret, or at least an Element token.
    pub fn require_organization(&self) -> Result<(), ApiError> {
        if self.has_organization_secret {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "This call needs `Authorization: User <user secret>, Organization <organization secret>`",
            ))
        }
    }

    /// Whether the request carries this instance's Element token (secrets are shown then).
    pub fn holds_element_of(&self, instance_id: i64) -> bool {
        self.element
            .as_ref()
            .is_some_and(|row| row.id == instance_id)
    }

    pub fn require_element(&self) -> Result<&InstanceRow, ApiError> {
        self.element.as_ref().ok_or_else(|| {
            ApiError::bad_request(
                "This call names its instance by the Element token: add `, Element <instance token>` to the Authorization header",
            )
        })
    }
}

/// The answer to a request with more than one `Authorization` header (the API's and the
/// proxy's).
pub const TWO_AUTHORIZATION_HEADERS: &str = "The request has more than one Authorization header: send one, `User <user secret>, Organization <organization secret>` (with `, Element <instance token>` where an instance is named)";

impl FromRequestParts<SharedApp> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &SharedApp,
    ) -> Result<Self, Self::Rejection> {
        // Two headers are refused rather than one of them taken: a gateway in front may judge
        // the request by the other.
        if parts
            .headers
            .get_all(axum::http::header::AUTHORIZATION)
            .iter()
            .nth(1)
            .is_some()
        {
            return Err(ApiError::bad_request(TWO_AUTHORIZATION_HEADERS));
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "Missing Authorization header: send `User <user secret>, Organization <organization secret>`",
                )
            })?
            .to_str()
            .map_err(|_| ApiError::unauthorized("The Authorization header is not readable text"))?;
        let credentials = parse_authorization(header).map_err(|error| {
            ApiError::unauthorized(format!("Bad Authorization header: {error}"))
        })?;
        let user_secret = credentials.user.ok_or_else(|| {
            ApiError::unauthorized("The Authorization header needs `User <user secret>`")
        })?;
        let user = app
            .store
            .find_user_by_secret_hash(&hash_secret(user_secret.expose()))
            .await?
            .ok_or_else(|| ApiError::unauthorized("The user secret is not valid"))?;
        let mut has_organization_secret = false;
        if let Some(organization_secret) = credentials.organization {
            let organization = app
                .store
                .find_organization_by_secret_hash(&hash_secret(organization_secret.expose()))
                .await?;
            match organization {
                Some(organization) if organization.id == user.organization_id => {
                    has_organization_secret = true;
                }
                _ => {
                    return Err(ApiError::unauthorized(
                        "The organization secret is not valid for this user",
                    ));
                }
            }
        }
        let element = match credentials.element {
            Some(element_token) => {
                let row = app
                    .store
                    .find_instance_by_token_hash(&hash_secret(element_token.expose()))
                    .await?
                    .filter(|row| row.organization_id == user.organization_id)
                    .ok_or_else(|| ApiError::unauthorized("The Element token is not valid"))?;
                Some(row)
            }
            None => None,
        };
        // Platform calls need both secrets, as the contract says: `User` and `Element` alone are
        // what calls through an instance (the proxy, which does not come here) carry, and the
        // runtime that holds them for that must not read the instance's refresh token and
        // client secret, repoint it or delete it with them.
        if !has_organization_secret {
            return Err(ApiError::unauthorized(
                "The Authorization header needs `Organization <organization secret>` beside `User <user secret>` (calls through an instance, at /proxy, need only `User` and `Element`)",
            ));
        }
        Ok(Caller {
            user_id: user.id,
            organization_id: user.organization_id,
            element,
            has_organization_secret,
        })
    }
}
