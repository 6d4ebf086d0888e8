//! Small text helpers shared by the error and rejection code: cutting provider text to a safe
//! length, and removing secrets we sent from text a provider echoes back.

/// The most characters of provider text ever echoed into an error or a `providerMessage`.
pub(crate) const MAX_ECHO_CHARS: usize = 300;

/// `text` with runs of whitespace collapsed to one space, trimmed, and cut to `max_chars`
/// characters (an ellipsis marks the cut). Never splits a character. Characters that show
/// nothing but change how the rest shows (bidirectional overrides, zero-width characters, a
/// byte-order mark) are left out: a provider's message must read in a dashboard as it is.
pub(crate) fn cut(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 4));
    let mut count = 0;
    let mut pending_space = false;
    for c in text.chars() {
        if invisible(c) {
            continue;
        }
        if c.is_whitespace() || c.is_control() {
            pending_space = !out.is_empty();
            continue;
        }
        let needed = if pending_space { 2 } else { 1 };
        if count + needed > max_chars {
            // A word cut in its middle goes whole: the beginning of a token a provider echoed
            // would otherwise show, even a character or two too short to be told for one.
            if !pending_space && let Some(space) = out.rfind(' ') {
                out.truncate(space);
            }
            out.push('…');
            return out;
        }
        if pending_space {
            out.push(' ');
            count += 1;
            pending_space = false;
        }
        out.push(c);
        count += 1;
    }
    out
}

/// Unicode's format characters that matter in displayed text: the soft hyphen, the Arabic
/// letter mark, the Mongolian vowel separator, zero-width spaces and joiners, directional
/// marks, embeddings, overrides and isolates, invisible operators, variation selectors, the
/// byte-order mark and the tag characters (text hidden in plain sight).
pub(crate) fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
            | '\u{E0000}'..='\u{E007F}')
}

/// Replaces every occurrence of each secret in `text` with `[redacted]`, in the forms a provider
/// echoes what it was sent: as it is, form-encoded (`+` or `%20` for a space, upper- or
/// lower-case hex) and with JSON's escaped `/`. Secrets shorter than 4 characters are ignored:
/// they would redact ordinary words and cannot be meaningful tokens.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|secret| secret.len() >= 4) {
        for form in echoed_forms(secret) {
            if out.contains(form.as_str()) {
                out = out.replace(form.as_str(), "[redacted]");
            }
        }
    }
    // Text cut (an `…` where it was cut) may hold the beginning of a secret just before it, in
    // any of its forms: at the end, or in the middle when a cut field was joined to another
    // (`error: description`).
    if !out.contains('…') {
        return out;
    }
    let forms: Vec<String> = secrets
        .iter()
        .filter(|secret| secret.len() >= 8)
        .flat_map(|secret| echoed_forms(secret))
        .collect();
    let pieces: Vec<&str> = out.split('…').collect();
    let last = pieces.len() - 1;
    let mut redacted = String::with_capacity(out.len());
    for (index, piece) in pieces.iter().enumerate() {
        let mut head = *piece;
        let mut cut_secret = false;
        if index < last {
            for secret in &forms {
                let longest = secret.len().min(head.len());
                let tail = (4..=longest).rev().find(|&k| {
                    secret.is_char_boundary(k)
                        && head.is_char_boundary(head.len() - k)
                        && head.ends_with(&secret[..k])
                });
                if let Some(k) = tail {
                    head = &head[..head.len() - k];
                    cut_secret = true;
                    break;
                }
            }
        }
        redacted.push_str(head);
        if cut_secret {
            redacted.push_str("[redacted]");
        }
        if index < last {
            redacted.push('…');
        }
    }
    redacted
}

/// The forms in which a provider may echo a secret it was sent, the longest first (so that a
/// form containing another goes whole).
fn echoed_forms(secret: &str) -> Vec<String> {
    let mut forms = Vec::new();
    // As sent, and as [`cut`] shows text (runs of whitespace and control characters as one
    // space, none at the ends): a secret pasted with a trailing newline, echoed in a provider's
    // description, is cut before it is redacted.
    let collapsed = cut(secret, secret.len() + 1);
    for text in [secret, collapsed.as_str()] {
        if text.len() < 4 {
            continue;
        }
        let form: String = url::form_urlencoded::byte_serialize(text.as_bytes()).collect();
        forms.push(text.to_string());
        if form != text {
            let spaced = form.replace('+', "%20");
            let lower = lower_hex(&spaced);
            forms.extend([lower_hex(&form), lower, spaced, form]);
        }
        forms.push(text.replace('/', "\\/"));
        // As a URL path segment (a revocation by path): `/` and spaces encoded, `+`, `=`
        // and `:` not.
        let mut url = url::Url::parse("http://x/").expect("a valid URL");
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.clear().push(text);
        }
        let segment = url.path().trim_start_matches('/').to_string();
        forms.extend([lower_hex(&segment), segment]);
    }
    forms.sort_by_key(|form| std::cmp::Reverse(form.len()));
    forms.dedup();
    forms
}

/// `%2F` as `%2f`: percent-encoding's hex digits in lower case.
fn lower_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut hex_left = 0;
    for c in encoded.chars() {
        if c == '%' {
            hex_left = 2;
            out.push(c);
        } else if hex_left > 0 {
            hex_left -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The canonical reason phrase of a status, e.g. "Service Unavailable".
pub(crate) fn reason_phrase(status: u16) -> &'static str {
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|status| status.canonical_reason())
        .unwrap_or("")
}

/// A short description of a body we will not echo: its kind and size.
pub(crate) fn describe_unechoed_body(content_type: Option<&str>, body: &[u8]) -> String {
    let trimmed = trim_body(body);
    if trimmed.is_empty() {
        return "an empty body".to_string();
    }
    let html_type = content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/html"))
    });
    let kind = if looks_like_html(trimmed) || (html_type && trimmed.starts_with(b"<")) {
        "an HTML page"
    } else if trimmed.starts_with(b"<") {
        "an XML body"
    } else {
        match content_type {
            Some(ct) if !ct.trim().is_empty() => {
                return format!(
                    "a body ({}) of {} bytes",
                    cut(ct.split(';').next().unwrap_or(ct), 60),
                    body.len()
                );
            }
            _ => "a body",
        }
    };
    format!("{kind} of {} bytes", body.len())
}

/// The body without a UTF-8 byte-order mark and surrounding ASCII whitespace.
pub(crate) fn trim_body(body: &[u8]) -> &[u8] {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    body.trim_ascii()
}

pub(crate) fn looks_like_html(body: &[u8]) -> bool {
    let head: Vec<u8> = body
        .iter()
        .take(64)
        .map(|b| b.to_ascii_lowercase())
        .collect();
    head.starts_with(b"<!doctype html") || head.starts_with(b"<html") || head.starts_with(b"<head")
}

/// The `<title>` of an HTML page, if any.
pub(crate) fn html_title(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let lower = text.to_ascii_lowercase();
    let start = lower.find("<title")?;
    let open_end = start + lower[start..].find('>')? + 1;
    let close = open_end + lower[open_end..].find("</title")?;
    let title = cut(&text[open_end..close], MAX_ECHO_CHARS);
    (!title.is_empty()).then_some(title)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_html_body_is_told_by_its_type_too() {
        let body = b"<h1>Bad Gateway</h1>";
        assert!(
            describe_unechoed_body(Some("text/html; charset=utf-8"), body)
                .starts_with("an HTML page")
        );
        assert!(describe_unechoed_body(Some("application/xml"), body).starts_with("an XML body"));
    }

    #[test]
    fn redaction_covers_a_secret_cut_in_the_middle_of_a_text() {
        // A long `error` holding the token, cut to 100 characters, joined to a description.
        let token = "rt-0123456789abcdefghijklmnopqrstuvwxyz";
        let joined = format!("{}…: try again", "x".repeat(80) + " rt-0123456789abcdef");
        let shown = redact(&joined, &[token]);
        assert!(!shown.contains("rt-0123"), "{shown}");
        assert!(shown.ends_with("[redacted]…: try again"), "{shown}");
        // Cut, a word goes whole: no beginning of the token shows, however short.
        for at in 95..100 {
            let text = format!("{} {token} was refused", "x".repeat(at - 1));
            let shown = cut(&text, 100);
            assert!(!shown.contains(" r"), "{at}: {shown}");
            assert!(shown.ends_with('…'), "{at}: {shown}");
        }
        // A provider's own ellipsis after ordinary words stays as it was.
        assert_eq!(redact("wait… then retry", &[token]), "wait… then retry");
    }

    #[test]
    fn invisible_characters_are_left_out() {
        assert_eq!(
            cut("token \u{202E}dilavni\u{202C} \u{200B}expired\u{FEFF}", 300),
            "token dilavni expired"
        );
        assert_eq!(cut("hid\u{E0041}\u{E0042}den\u{00AD}", 300), "hidden");
    }

    #[test]
    fn redaction_covers_a_secret_cut_or_in_a_path() {
        // Pasted with a newline and double spaces, echoed, then cut to one line.
        let secret = "s3cret-value  tail\n";
        let shown = redact(
            &cut(&format!("client_secret {secret} rejected"), 300),
            &[secret],
        );
        assert_eq!(shown, "client_secret [redacted] rejected");
        // As a path segment, as a revocation by path sends it.
        let token = "rt+ab/c==";
        let shown = redact("not found: /refresh-tokens/rt+ab%2Fc==", &[token]);
        assert_eq!(shown, "not found: /refresh-tokens/[redacted]");
    }

    #[test]
    fn redaction_covers_the_encoded_forms_a_provider_echoes() {
        let secret = "ab/cd+ef== x";
        for echoed in [
            "ab/cd+ef== x",
            "ab%2Fcd%2Bef%3D%3D+x",
            "ab%2fcd%2bef%3d%3d+x",
            "ab%2Fcd%2Bef%3D%3D%20x",
            "ab%2fcd%2bef%3d%3d%20x",
            "ab\\/cd+ef== x",
        ] {
            let text = format!("refresh_token={echoed}&grant_type=refresh_token");
            let shown = redact(&text, &[secret]);
            assert_eq!(
                shown, "refresh_token=[redacted]&grant_type=refresh_token",
                "{echoed}"
            );
        }
        // Cut in the middle of an encoded form.
        assert_eq!(
            redact("refresh_token=ab%2Fcd%2Bef…", &[secret]),
            "refresh_token=[redacted]…"
        );
        // A plain token has one form; ordinary text stays.
        assert_eq!(
            redact("token abcd1234 ok", &["abcd1234"]),
            "token [redacted] ok"
        );
        assert_eq!(redact("nothing here", &["abcd1234"]), "nothing here");
    }

    #[test]
    fn cut_collapses_whitespace_and_respects_characters() {
        assert_eq!(cut("  a \n\t b  ", 10), "a b");
        assert_eq!(cut("ééééé", 3), "ééé…");
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut(&"x".repeat(1000), 300).chars().count(), 301);
    }

    #[test]
    fn redact_removes_secrets() {
        assert_eq!(
            redact("token abcd1234 is bad", &["abcd1234", "ab"]),
            "token [redacted] is bad"
        );
    }

    #[test]
    fn html_title_is_found() {
        assert_eq!(
            html_title(b"<html><head><TITLE>502 Bad Gateway</title></head></html>").as_deref(),
            Some("502 Bad Gateway")
        );
        assert_eq!(html_title(b"<html></html>"), None);
    }
}
