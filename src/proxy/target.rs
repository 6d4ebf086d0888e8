//! Where a proxied call goes: the instance's `base.url`, parsed once per cached instance, and the
//! caller's path joined under it.
//!
//! **No path leaves the base URL**: dot segments (plain, percent-encoded or followed by `;`
//! parameters, also between encoded slashes), an encoded slash beginning a segment (after
//! `;` parameters and spaces), backslashes, empty segments, control characters, `?` and `#`
//! are refused, and the target is built from the base's parsed scheme, authority and path
//! with the checked path appended, so the caller's text can neither name another host nor
//! climb out of the base path. The base itself passed the egress check (no link-local or metadata host)
//! when it was parsed.

use axum::http::Uri;
use axum::http::uri::{Authority, PathAndQuery, Scheme};

use crate::http::error::ApiError;

/// An instance's `base.url`, as the proxy joins paths to it.
#[derive(Debug, Clone)]
pub struct ProxyBase {
    /// The scheme and authority as the URL parser normalized them (host lowercased, IDNA to
    /// ASCII, default port left out), parsed once.
    scheme: Scheme,
    authority: Authority,
    /// The `Host` header for it, built once (the client would format one per call).
    host: axum::http::HeaderValue,
    /// The base path without its trailing slash: `""` for `https://api.example.com/`.
    path: String,
    /// Whether the base path ended with a slash: a call to the base itself (an empty path)
    /// goes to the base as it is written (`https://api.monday.com/v2`, not `…/v2/`).
    slash: bool,
    /// The origin's key in the client's pool of connections: a hash of scheme and authority.
    origin_key: u64,
}

impl ProxyBase {
    /// Parses and checks a `base.url`; the error says why it cannot be one.
    pub fn parse(base_url: &str) -> Result<ProxyBase, String> {
        Self::parse_named(base_url, "The instance's `base.url`")
    }

    /// [`ProxyBase::parse`], the error naming the value `subject` (a connector's `baseUrl`, a
    /// `base.url` a caller gives): one check for every place a base is taken in.
    pub fn parse_named(base_url: &str, subject: &str) -> Result<ProxyBase, String> {
        let base =
            url::Url::parse(base_url).map_err(|_| format!("{subject} is not a valid URL"))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(format!("{subject} is not an absolute http(s) URL"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(format!(
                "{subject} has a query or fragment; a base takes neither"
            ));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(format!("{subject} holds user info; a base takes none"));
        }
        crate::egress::check_url(&base).map_err(|why| format!("{subject}: {why}"))?;
        let origin = base.origin().ascii_serialization();
        let path = base.path();
        let slash = path.ends_with('/');
        let path = path.strip_suffix('/').unwrap_or(path).to_string();
        let invalid = || "The instance's `base.url` is not a valid URL".to_string();
        let parsed = format!("{origin}{path}/")
            .parse::<Uri>()
            .map_err(|_| invalid())?;
        let parts = parsed.into_parts();
        let authority = parts.authority.ok_or_else(invalid)?;
        let scheme = parts.scheme.ok_or_else(invalid)?;
        Ok(ProxyBase {
            origin_key: origin_key(&scheme, &authority),
            host: axum::http::HeaderValue::from_str(authority.as_str()).map_err(|_| invalid())?,
            scheme,
            authority,
            path,
            slash,
        })
    }

    /// The origin's key in the client's pool of connections.
    pub fn origin_key(&self) -> u64 {
        self.origin_key
    }

    /// The `Host` header of calls under this base.
    pub fn host(&self) -> &axum::http::HeaderValue {
        &self.host
    }

    /// Whether calls under this base go over TLS.
    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// The base's authority (host and port as normalized).
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// `base/raw_path?query`, with `raw_path` (the request path after the proxy prefix, as the
    /// caller sent it) checked to stay under the base.
    pub fn join(&self, raw_path: &str, query: Option<&str>) -> Result<Uri, ApiError> {
        let mut parts = axum::http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(self.join_path(raw_path, query)?);
        Uri::from_parts(parts).map_err(|_| refuse("it does not make a valid URL"))
    }

    /// The path and query of [`ProxyBase::join`] alone: what an HTTP/1.1 request line to the
    /// base's origin carries (the proxy's hot path builds no whole URI).
    pub fn join_path(&self, raw_path: &str, query: Option<&str>) -> Result<PathAndQuery, ApiError> {
        check_path(raw_path)?;
        let mut joined = String::with_capacity(
            self.path.len() + raw_path.len() + query.map_or(0, |q| q.len() + 1) + 1,
        );
        joined.push_str(&self.path);
        if !raw_path.is_empty() || self.slash {
            joined.push('/');
        }
        joined.push_str(raw_path);
        if let Some(query) = query {
            joined.push('?');
            joined.push_str(query);
        }
        // As `Bytes` taking the string's buffer: from a `String` it would be copied again.
        PathAndQuery::from_maybe_shared(bytes::Bytes::from(joined.into_bytes()))
            .map_err(|_| refuse("it does not make a valid URL"))
    }
}

/// A hash of scheme and authority, keyed per process (the pool compares the authority too).
fn origin_key(scheme: &Scheme, authority: &Authority) -> u64 {
    use std::hash::BuildHasher;
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    KEYS.get_or_init(Default::default)
        .hash_one((scheme.as_str(), authority.as_str()))
}

fn refuse(why: &str) -> ApiError {
    ApiError::bad_request(format!("The proxy path is not accepted: {why}"))
}

/// The checks of a path under the base; see the module's documentation.
fn check_path(raw_path: &str) -> Result<(), ApiError> {
    if plain(raw_path) {
        return Ok(());
    }
    // A request path never holds `?` or `#` (the query comes separately); in a joined URL they
    // would end the path inside a segment.
    if raw_path.contains(['?', '#']) {
        return Err(refuse("`?` and `#` are not accepted in the path"));
    }
    if raw_path.contains("//") || raw_path.starts_with('/') {
        return Err(refuse(
            "absolute URLs and empty path segments are not accepted",
        ));
    }
    for segment in raw_path.split('/') {
        if !segment.contains('%') {
            check_segment(segment.as_bytes())?;
            continue;
        }
        let mut decoded = percent_decode(segment).ok_or_else(|| refuse("bad percent-encoding"))?;
        check_segment(&decoded)?;
        // Encoded more than once (`%252e%252e`): a server or gateway that decodes again would
        // see `..`. Each further decoding is checked too, decoded as leniently as such a
        // gateway would (an escape that is not one stays as it is).
        for _ in 0..3 {
            if !decoded.contains(&b'%') {
                break;
            }
            decoded = lenient_decode(&decoded);
            check_segment(&decoded)?;
        }
        if lenient_decode(&decoded) != decoded {
            return Err(refuse("a path segment encoded more than four times"));
        }
    }
    Ok(())
}

/// Whether a path is made of plain segments only: none empty, `.` or `..`, each of letters,
/// digits and `-._~!$&'()*+,=:@` (no `%`, `;`, `\\`, `?`, `#` or control characters). Such a path
/// passes every check below; it is what nearly every call sends, so it skips them (the percent
/// decoding and the per-segment scans were a measurable share of a proxied call). Anything
/// else gets the whole check.
fn plain(raw_path: &str) -> bool {
    !raw_path.is_empty()
        && raw_path.as_bytes().split(|b| *b == b'/').all(|segment| {
            !segment.iter().all(|b| *b == b'.')
                && segment.iter().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(
                            b,
                            b'-' | b'.'
                                | b'_'
                                | b'~'
                                | b'!'
                                | b'$'
                                | b'&'
                                | b'\''
                                | b'('
                                | b')'
                                | b'*'
                                | b'+'
                                | b','
                                | b'='
                                | b':'
                                | b'@'
                        )
                })
        })
}

fn check_segment(decoded: &[u8]) -> Result<(), ApiError> {
    // An encoded slash is part of the segment for the provider (GitLab's `group%2Fproject`,
    // Cloud Storage's `folder%2Ffile` and `folder%2F`, Search Console's
    // `sites/https%3A%2F%2Fexample.com%2F`); one that decodes it anyway sees the pieces as
    // segments, so each piece is checked as one. Empty pieces climb nowhere, but a segment may
    // not begin with one: `%2F%2Fhost` reads as a network path where it begins the path, under
    // a base at the root or behind a gateway that strips the segments before it; so do
    // `;%2F%2Fhost` and `%20%2F%2Fhost` at servers that drop `;` parameters or trim spaces.
    // Backslashes, which some servers take as slashes, stay refused.
    if decoded.contains(&b'\\') {
        return Err(refuse("encoded backslashes are not accepted"));
    }
    if let Some(slash) = decoded.iter().position(|b| *b == b'/') {
        let head = &decoded[..slash];
        let head = head.split(|b| *b == b';').next().unwrap_or(b"");
        if String::from_utf8_lossy(head).trim().is_empty() {
            return Err(refuse("a path segment may not begin with an encoded slash"));
        }
    }
    for piece in decoded.split(|b| *b == b'/') {
        // `..;x` is `..` to servers that take `;` as path parameters (Tomcat, Spring).
        let before_parameters = piece.split(|b| *b == b';').next().unwrap_or(b"");
        // Dots and spaces alone (`...`, `.. `): Windows servers trim trailing dots and
        // spaces, which leaves `..`.
        if before_parameters.contains(&b'.')
            && before_parameters.iter().all(|b| matches!(b, b'.' | b' '))
        {
            return Err(refuse("`.` and `..` segments are not accepted"));
        }
    }
    if String::from_utf8_lossy(decoded)
        .chars()
        .any(char::is_control)
    {
        return Err(refuse("control characters are not accepted"));
    }
    // Overlong UTF-8 (`%C0%AE` for `.`, `%C0%AF` for `/`, `%E0%80%AE`): no valid text has it,
    // and lenient decoders (old IIS) read it as the character it spells out.
    if decoded.windows(2).any(|pair| {
        matches!(
            pair,
            [0xC0 | 0xC1, 0x80..=0xBF]
                | [0xE0, 0x80..=0x9F]
                | [0xF0, 0x80..=0x8F]
                | [0xF8..=0xFF, 0x80..=0xBF]
        )
    }) {
        return Err(refuse("overlong UTF-8 sequences are not accepted"));
    }
    Ok(())
}

/// Percent-decoding that keeps what is not a valid escape (`%` not followed by two hex digits).
fn lenient_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && let (Some(high), Some(low)) = (
                bytes.get(index + 1).copied().and_then(hex),
                bytes.get(index + 2).copied().and_then(hex),
            )
        {
            out.push(high << 4 | low);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    out
}

fn percent_decode(segment: &str) -> Option<Vec<u8>> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = segment.get(index + 1..index + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    Some(out)
}

/// The target of a call: `base_url` parsed and `raw_path` joined under it.
pub fn confine(base_url: &str, raw_path: &str, query: Option<&str>) -> Result<Uri, ApiError> {
    ProxyBase::parse(base_url)
        .map_err(ApiError::conflict)?
        .join(raw_path, query)
}

#[cfg(test)]
mod tests {
    use super::{check_path, confine, plain};

    #[test]
    fn plain_paths_are_a_subset_of_the_accepted_ones() {
        for path in [
            "data",
            "api/rest/v6/users/me",
            "a.b/c-d/e_f/~g/h:i@j/k=l,m+n*o(p)q'r&s$t!u",
            "v1/.well-known/x",
            "..a",
        ] {
            assert!(plain(path), "{path}");
            assert!(check_path(path).is_ok(), "{path}");
        }
        // Whatever the fast path does not take goes to the whole check, which decides.
        for path in [
            "",
            "/",
            "a//b",
            "/etc/passwd",
            "a/../b",
            "..",
            ".",
            "...",
            "a/./b",
            "..;x/b",
            "a/%2e%2e/b",
            "a/%2F/b",
            "a\\b",
            "a?b",
            "a#b",
            "a/\u{7f}",
            "a b",
            "a/",
            "é",
        ] {
            assert!(!plain(path), "{path:?} is not plain");
        }
    }

    const BASE: &str = "http://127.0.0.1:4000/adobe-sign/";

    #[test]
    fn paths_stay_under_the_base() {
        assert_eq!(
            confine(BASE, "api/rest/v6/users/me", Some("a=1"))
                .unwrap()
                .to_string(),
            "http://127.0.0.1:4000/adobe-sign/api/rest/v6/users/me?a=1"
        );
        assert_eq!(
            confine("http://h/base", "x", None).unwrap().to_string(),
            "http://h/base/x"
        );
        assert_eq!(
            confine("HTTPS://API.Example.COM:443", "v1/x", Some(""))
                .unwrap()
                .to_string(),
            "https://api.example.com/v1/x?"
        );
        assert_eq!(
            confine("http://h/a%20b/", "c", None).unwrap().to_string(),
            "http://h/a%20b/c"
        );
        // The base itself, as it is written.
        for (base, query, joined) in [
            (
                "https://api.monday.com/v2",
                None,
                "https://api.monday.com/v2",
            ),
            (
                "https://api.myob.com/accountright/",
                None,
                "https://api.myob.com/accountright/",
            ),
            ("http://h", Some("a=1"), "http://h/?a=1"),
            ("http://h/v2", Some("a=1"), "http://h/v2?a=1"),
        ] {
            assert_eq!(confine(base, "", query).unwrap().to_string(), joined);
        }
        for bad in [
            "../secret",
            "api/../../x",
            "%2e%2e/x",
            "%2E%2E/x",
            "%2e/x",
            "api%2f..%2f..%2fx",
            "a%5cb",
            "a\\b",
            "http://evil.test/x",
            "/evil",
            "a//b",
            "a/./b",
            "%00",
            "%zz",
            "%+1",
            "%1",
            "..;/x",
            "a/..;jsessionid=1/b",
            "a?b",
            "a#b",
            "a/%252e%252e/x",
            "a/%25252e%25252e/x",
            "a/%252f/x",
            "a/..%20/x",
            "a/.../x",
            "a/%2e%2e%2e/x",
            "a/%252e%252e;%25/x",
            "a/%252e%252e;%FF/x",
            "a/%252525252e%252525252e/x",
            "a%2F..%2Fb",
            "a%2F%2e%2e%2Fb",
            "%2Fetc/passwd",
            "%2F%2Fevil.test/x",
            "%252F%252Fevil.test/x",
            ";%2F%2Fevil.test/x",
            "%20%2F%2Fevil.test/x",
            "svc/%2F%2Fevil.test/x",
            "svc/%3Bx%2F%2Fevil.test/x",
            "o/%2F",
            "%C0%AE%C0%AE/evil",
            "a/%C0%AF%C0%AFevil",
            "a/%E0%80%AE%E0%80%AE/x",
            "a/%F8%80%80%80%AE%F8%80%80%80%AE/x",
            "a/%25C0%25AE%25C0%25AE/x",
            "a/%2F..%2Fb",
            "a/x%2F%2F..",
            "a%2F.%2Fb",
            "a%2F..;x%2Fb",
        ] {
            assert!(confine(BASE, bad, None).is_err(), "{bad} must be refused");
        }
        // A literal percent (not an encoding once decoded) and dots within names still pass,
        // and so does an encoded slash inside a segment (GitLab's `group%2Fproject`).
        for good in [
            "search/100%25",
            "a/v1.2/x",
            "a/.well-known/x",
            "a/%2561",
            "projects/group%2Fproject/issues",
            "o/folder%2fsub%2Ffile.txt",
            // Search Console's site URL, Cloud Storage's "folder" objects.
            "webmasters/v3/sites/https%3A%2F%2Fwww.example.com%2F/searchAnalytics/query",
            "storage/v1/b/bkt/o/photos%2F",
            "o/a%2F%2Fb",
            "a%2F/b",
        ] {
            assert!(confine(BASE, good, None).is_ok(), "{good} must pass");
        }
        for bad_base in [
            "not a url",
            "ftp://h/",
            "http://h/?q=1",
            "http://h/#f",
            "http://user:pw@h/",
            "http://169.254.169.254/",
            "mailto:a@b",
        ] {
            assert!(
                confine(bad_base, "x", None).is_err(),
                "{bad_base} must be refused"
            );
        }
    }
}
