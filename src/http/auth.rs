//! The platform's `Authorization` header:
//! `User <user secret>, Organization <organization secret>[, Element <instance token>]`,
//! order-insensitive and whitespace-tolerant. Parsing is separate from checking so it can be
//! tested and fuzzed on its own.

use crate::secret::Secret;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct PlatformCredentials {
    pub user: Option<Secret>,
    pub organization: Option<Secret>,
    pub element: Option<Secret>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the Authorization header names `{0}` more than once")]
    Repeated(&'static str),
    #[error(
        "the Authorization header has a part `{0}` that is not `User`, `Organization` or `Element` (each followed by a space and its value)"
    )]
    UnknownPart(String),
    #[error("the Authorization header part `{0}` has no value")]
    Empty(&'static str),
    #[error(
        "the Authorization header part `{0}` holds more than one word: separate the parts with commas (`User <secret>, Organization <secret>`)"
    )]
    Unseparated(&'static str),
}

/// Parses the header value. Unknown parts are refused rather than ignored, so a typo
/// ("Organisation") gets a message instead of a puzzling 401.
pub fn parse_authorization(value: &str) -> Result<PlatformCredentials, HeaderError> {
    let mut credentials = PlatformCredentials::default();
    for part in value.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (name, secret) = match part.split_once(char::is_whitespace) {
            Some((name, secret)) => (name, secret.trim()),
            None => (part, ""),
        };
        let (label, slot) = if name.eq_ignore_ascii_case("user") {
            ("User", &mut credentials.user)
        } else if name.eq_ignore_ascii_case("organization") {
            ("Organization", &mut credentials.organization)
        } else if name.eq_ignore_ascii_case("element") {
            ("Element", &mut credentials.element)
        } else {
            return Err(HeaderError::UnknownPart(shown_part(name)));
        };
        if secret.is_empty() {
            return Err(HeaderError::Empty(label));
        }
        // No secret holds a space: `User X; Organization Y` or `User X Organization Y` lacks
        // its comma (said so, rather than "the user secret is not valid").
        if secret.contains(char::is_whitespace) {
            return Err(HeaderError::Unseparated(label));
        }
        if slot.is_some() {
            return Err(HeaderError::Repeated(label));
        }
        *slot = Some(Secret::new(secret));
    }
    Ok(credentials)
}

/// What a refused part's message may show of its name: the name itself when it is a short
/// word (`Organisation`, `Bearer`); else only the known name it starts with (`User…` for
/// `User:<secret>`), or nothing. A secret glued to a name, or given alone, is never shown.
fn shown_part(name: &str) -> String {
    if name.len() <= 16 && name.chars().all(|c| c.is_ascii_alphabetic()) {
        return name.to_string();
    }
    for known in ["Organization", "Element", "User"] {
        if name
            .get(..known.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(known))
        {
            return format!("{known}…");
        }
    }
    "…".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_any_order_and_spacing() {
        let parsed = parse_authorization("  Element  e1 ,Organization o1,   User   u1  ").unwrap();
        assert_eq!(parsed.user.unwrap().expose(), "u1");
        assert_eq!(parsed.organization.unwrap().expose(), "o1");
        assert_eq!(parsed.element.unwrap().expose(), "e1");
        let two = parse_authorization("User u, Element e").unwrap();
        assert!(two.organization.is_none());
    }

    #[test]
    fn refuses_unknown_empty_and_repeated_parts() {
        assert_eq!(
            parse_authorization("User u, Organisation o"),
            Err(HeaderError::UnknownPart("Organisation".into()))
        );
        assert_eq!(
            parse_authorization("User , Organization o"),
            Err(HeaderError::Empty("User"))
        );
        assert_eq!(
            parse_authorization("User a, User b"),
            Err(HeaderError::Repeated("User"))
        );
        assert_eq!(
            parse_authorization("Bearer xyz"),
            Err(HeaderError::UnknownPart("Bearer".into()))
        );
        // A missing comma is named, not taken for a wrong secret, and the secrets not shown.
        for unseparated in ["User u1; Organization o1", "User u1 Organization o1"] {
            let refused = parse_authorization(unseparated);
            assert_eq!(refused, Err(HeaderError::Unseparated("User")));
            let said = refused.unwrap_err().to_string();
            assert!(!said.contains("u1") && !said.contains("o1"), "{said}");
        }
        // Glued to its name, a secret is never shown.
        for glued in [
            "User:s3cr3t-value",
            "Element=tok3n",
            "User\u{00e9}s3cr3t",
            "Usersecretsecretsecret",
            "abcdefghsecretsecretxyz0",
        ] {
            let refused = parse_authorization(glued).unwrap_err().to_string();
            assert!(
                !refused.contains("s3cr3t") && !refused.contains("tok3n"),
                "{refused}"
            );
        }
        assert_eq!(
            parse_authorization("User:abc"),
            Err(HeaderError::UnknownPart("User…".into()))
        );
        assert_eq!(
            parse_authorization("").unwrap(),
            PlatformCredentials::default()
        );
    }
}
