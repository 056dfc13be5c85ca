//! The one canonical form of a request path, on which every route rule is decided and which is
//! exactly what the app receives (the Istio CVE-2019-9901 class: a rule matched on one spelling
//! of a path while the app serves another).
//!
//! [`canonicalize`] gives every path exactly one spelling, in this order:
//! 1. percent-escapes of every character that may also appear raw in a path segment are
//!    decoded: the unreserved `A-Z a-z 0-9 - . _ ~` (RFC 3986 §2.3) and `: @ ! $ & ' ( ) * + , =`
//!    (§3.3 `pchar`), since nearly every framework decodes them before routing; every other
//!    escape is kept, with upper-case hex digits (§6.2.2.1);
//! 2. runs of `/` are merged into one;
//! 3. dot segments are removed (§5.2.4).
//!
//! A path whose meaning would still depend on who reads it is refused instead
//! ([`PathError`]): an escaped `/` or `\` (one server splits on it, another does not), a raw
//! `\` (some servers treat it as `/`), a `..` that would climb above the root, a NUL or any
//! other control byte (raw or escaped), a malformed escape, an escaped `%` followed by two hex
//! digits (`%252e`: an app that decodes twice would see `.`), escapes that do not decode to
//! UTF-8 (overlong `%c0%ae` is `.` to a lax decoder), a raw `;` (Tomcat, Jetty and Spring cut
//! `;parameters` off each segment before routing, so `/admin;x/users` is `/admin/users` to
//! them), raw bytes beyond ASCII, and anything that is not an absolute path. The query is not
//! part of the path and is left alone.

use std::borrow::Cow;

/// Why a request path is refused (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("the path holds an encoded '/' or '\\' (%2F, %5C), which servers read differently")]
    EncodedSeparator,
    #[error("the path holds a '\\', which some servers read as '/'")]
    Backslash,
    #[error("the path holds a control character (byte {0:#04x})")]
    ControlByte(u8),
    #[error("the path holds a malformed percent-escape")]
    BadEscape,
    #[error("the path climbs above the root with '..'")]
    AboveRoot,
    #[error("the path holds ';', which some servers cut off with what follows in its segment")]
    Semicolon,
    #[error("the path holds a double-encoded escape (%25 followed by hex digits)")]
    DoubleEncoded,
    #[error("the path holds escapes that are not UTF-8")]
    NotUtf8,
    #[error("the path holds a raw byte beyond ASCII (byte {0:#04x}); percent-encode it")]
    RawNonAscii(u8),
}

/// Characters that may appear raw in a path segment (RFC 3986 `pchar` without `%`), so their
/// escapes are decoded. `;` is not among them: it is refused raw and kept escaped.
fn decoded_in_path(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b':'
                | b'@'
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
        )
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Is `path` already canonical? Cheap, allocation-free: the common case on the data path.
fn is_canonical(path: &[u8]) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    let mut prev_slash = false;
    for &b in path {
        match b {
            b'%' | b'\\' | b';' => return false,
            b if b >= 0x80 => return false,
            b'/' if prev_slash => return false,
            b if b < 0x20 || b == 0x7f => return false,
            _ => {}
        }
        prev_slash = b == b'/';
    }
    // Dot segments: "/." or "/.." followed by "/" or the end.
    !path
        .split(|&b| b == b'/')
        .any(|seg| seg == b"." || seg == b"..")
}

/// The canonical form of an absolute request path (no query), or why it is refused.
pub fn canonicalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let raw = path.as_bytes();
    if is_canonical(raw) {
        return Ok(Cow::Borrowed(path));
    }
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. Escapes: decode what may appear raw, normalise the rest, refuse the ambiguous.
    let mut decoded = Vec::with_capacity(raw.len());
    // Every byte the escapes stand for, to check they decode to UTF-8.
    let mut plain = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    raw.get(i + 1).copied().and_then(hex),
                    raw.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let c = h << 4 | l;
                if c == b'/' || c == b'\\' {
                    return Err(PathError::EncodedSeparator);
                }
                if c < 0x20 || c == 0x7f {
                    return Err(PathError::ControlByte(c));
                }
                if decoded_in_path(c) {
                    decoded.push(c);
                } else {
                    decoded.push(b'%');
                    decoded.extend_from_slice(format!("{c:02X}").as_bytes());
                }
                plain.push(c);
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::Semicolon),
            b if b < 0x20 || b == 0x7f => return Err(PathError::ControlByte(b)),
            b if b >= 0x80 => return Err(PathError::RawNonAscii(b)),
            _ => decoded.push(b),
        }
        plain.push(b);
        i += 1;
    }
    if std::str::from_utf8(&plain).is_err() {
        return Err(PathError::NotUtf8);
    }
    // A kept `%25` followed by two hex digits, checked after decoding (the digits may have been
    // escapes themselves: `%25%32%65` is `%252e`), is an escape to an app that decodes twice.
    if decoded
        .windows(5)
        .any(|w| w[..3] == *b"%25" && hex(w[3]).is_some() && hex(w[4]).is_some())
    {
        return Err(PathError::DoubleEncoded);
    }
    // 2 and 3. Segments, with empty ones (runs of '/') merged and dot segments resolved.
    let mut out: Vec<&[u8]> = Vec::new();
    let segments: Vec<&[u8]> = decoded[1..].split(|&b| b == b'/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (n, seg) in segments.into_iter().enumerate() {
        match seg {
            b"" => trailing_slash = n == last && !out.is_empty(),
            b"." => trailing_slash = n == last,
            b".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = n == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut canonical = Vec::with_capacity(decoded.len());
    for seg in &out {
        canonical.push(b'/');
        canonical.extend_from_slice(seg);
    }
    if canonical.is_empty() || trailing_slash {
        canonical.push(b'/');
    }
    // Only ASCII bytes and bytes of the (valid UTF-8) input were copied: still valid UTF-8.
    Ok(Cow::Owned(
        String::from_utf8(canonical).map_err(|_| PathError::BadEscape)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> String {
        canonicalize(p)
            .unwrap_or_else(|e| panic!("{p:?} refused: {e}"))
            .into_owned()
    }

    #[test]
    fn canonical_paths_pass_unchanged_without_allocating() {
        for p in [
            "/",
            "/orders",
            "/orders/7",
            "/a/b/",
            "/a.b/c..d/.e",
            "/x~y_z-1",
        ] {
            assert!(
                matches!(canonicalize(p), Ok(Cow::Borrowed(q)) if q == p),
                "{p}"
            );
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(ok("/healthz/../orders"), "/orders");
        assert_eq!(ok("/healthz/./../orders/"), "/orders/");
        assert_eq!(ok("/a/b/c/./../../g"), "/a/g"); // RFC 3986 §5.4.2
        assert_eq!(ok("/a/."), "/a/");
        assert_eq!(ok("/a/.."), "/");
        assert_eq!(ok("/."), "/");
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_normalised() {
        assert_eq!(ok("/healthz/%2e%2e/orders"), "/orders");
        assert_eq!(ok("/healthz/%2E%2e/orders"), "/orders");
        assert_eq!(ok("/healthz/.%2e/orders"), "/orders");
        assert_eq!(ok("/%6Frders"), "/orders");
        assert_eq!(ok("/a%20b"), "/a%20b");
        assert_eq!(ok("/a%3fb"), "/a%3Fb");
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
        // Characters that may appear raw are decoded, so each has one spelling.
        assert_eq!(ok("/v1/orders%3Acancel"), "/v1/orders:cancel");
        assert_eq!(ok("/a%40b%21%24%26%27%28%29%2a%2B%2C%3D"), "/a@b!$&'()*+,=");
        // Those that may not stay escaped.
        assert_eq!(ok("/a%3bb%23c%25"), "/a%3Bb%23c%25");
    }

    #[test]
    fn runs_of_slashes_are_merged() {
        assert_eq!(ok("//orders"), "/orders");
        assert_eq!(ok("/healthz//..//orders"), "/orders");
        assert_eq!(ok("/a///b//"), "/a/b/");
        assert_eq!(ok("//"), "/");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        use PathError::*;
        let cases: &[(&str, PathError)] = &[
            ("/healthz%2f..%2forders", EncodedSeparator),
            ("/healthz%2F..%2Forders", EncodedSeparator),
            ("/healthz%5c..%5corders", EncodedSeparator),
            ("/healthz\\..\\orders", Backslash),
            ("/..", AboveRoot),
            ("/../orders", AboveRoot),
            ("/a/../../orders", AboveRoot),
            ("/%2e%2e/orders", AboveRoot),
            ("/orders%00", ControlByte(0)),
            ("/orders%0a", ControlByte(0x0a)),
            ("/orders\u{7f}", ControlByte(0x7f)),
            ("/orders%7F", ControlByte(0x7f)),
            ("/orders%", BadEscape),
            ("/orders%4", BadEscape),
            ("/orders%zz", BadEscape),
            ("/healthz/..;/orders", Semicolon),
            ("/healthz/.;x/orders", Semicolon),
            ("/admin;x/users", Semicolon),
            ("/healthz/%252e%252e/orders", DoubleEncoded),
            ("/public/%25%32%65%25%32%65/admin", DoubleEncoded),
            ("/public/%252%65/admin", DoubleEncoded),
            ("/public/%25%32%66admin", DoubleEncoded),
            ("/healthz/%c0%ae%c0%ae/orders", NotUtf8),
            ("/caf%c3", NotUtf8),
            ("/caf\u{e9}", RawNonAscii(0xc3)),
            ("orders", NotAbsolute),
            ("*", NotAbsolute),
            ("", NotAbsolute),
        ];
        for (p, want) in cases {
            assert_eq!(canonicalize(p).as_ref(), Err(want), "{p:?}");
        }
    }

    #[test]
    fn an_escaped_semicolon_and_a_literal_percent_are_kept() {
        assert_eq!(ok("/orders%3bv=1/7"), "/orders%3Bv=1/7");
        assert_eq!(ok("/files/100%25"), "/files/100%25");
    }

    /// Every path built from a small alphabet of tricky pieces: if it is accepted, its
    /// canonical form is accepted again and unchanged (one spelling, whatever reads it twice).
    #[test]
    fn canonicalizing_is_idempotent_over_tricky_combinations() {
        let pieces = [
            "/", "a", ".", "..", "%2e", "%25", "%32", "%65", "%2f", "%3a", ":", "%41", "~", "%7e",
            "%c3", "%a9", "%20",
        ];
        let mut checked = 0;
        let mut stack = vec![(String::new(), 0)];
        while let Some((p, depth)) = stack.pop() {
            let path = format!("/{p}");
            if let Ok(c) = canonicalize(&path) {
                let again = canonicalize(&c).unwrap_or_else(|e| panic!("{path} -> {c} -> {e}"));
                assert_eq!(again, c, "{path}");
                checked += 1;
            }
            if depth < 4 {
                for piece in pieces {
                    stack.push((format!("{p}{piece}"), depth + 1));
                }
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    #[test]
    fn canonical_output_is_a_fixed_point() {
        for p in [
            "/healthz/%2e%2e/orders",
            "//a/./b/../c//",
            "/%7euser/x%20y",
            "/a/b/..",
        ] {
            let once = ok(p);
            assert_eq!(ok(&once), once, "{p}");
            assert!(matches!(canonicalize(&once), Ok(Cow::Borrowed(_))) || once.contains('%'));
        }
    }
}
