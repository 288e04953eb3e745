//! Values that must not be printed. A broker or Redis URL may carry a password:
//! [`Secret`] keeps the password out of `Debug`, `Display`, logs and error
//! messages, and shows the rest. A [`Token`] (the admin token) is all secret and
//! is never shown at all. Only `expose` hands either out, for the one place that
//! connects or compares.

use std::fmt;

use serde::Deserialize;

/// A URL whose credentials are never printed: `amqp://app:s3cret@rabbit:5672/%2f`
/// prints as `amqp://***@rabbit:5672/%2f`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value that must not be printed.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, to connect with. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The value with its credentials replaced by `***`. Something that does not
    /// look like a URL prints as `***` altogether.
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return "***".into();
        };
        match credentials(rest) {
            Some((_, after)) => format!("{scheme}://***@{after}"),
            None => self.0.clone(),
        }
    }

    /// `text` (an error message, say) with this URL, its credentials and its
    /// password (as written and percent-decoded) replaced by `***` wherever
    /// they occur, so that an error from a library can be shown.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.replace(&self.0, &self.redacted());
        let Some((_, rest)) = self.0.split_once("://") else {
            return out.replace(&self.0, "***");
        };
        if let Some((userinfo, _)) = credentials(rest) {
            let password = userinfo.split_once(':').map_or("", |(_, p)| p);
            let decoded = percent_decode(password);
            for needle in [userinfo, password, decoded.as_str()] {
                if needle.len() >= 3 {
                    out = out.replace(needle, "***");
                }
            }
        }
        out
    }
}

/// What comes after `scheme://` split at the end of the credentials: the user
/// information and the rest (host, port, path), or `None` without credentials.
///
/// The credentials end at the **last** `@`, not at the first `/`, `?` or `#` as
/// RFC 3986 would have it: people write passwords with those characters
/// unescaped (`amqp://app:pa#ss@rabbit`), and such a URL must not print its
/// password either. An `@` further on (`amqp://rabbit/vhost?x=a@b`) hides more
/// than it needs to, which is the safe side.
fn credentials(rest: &str) -> Option<(&str, &str)> {
    rest.rfind('@').map(|at| (&rest[..at], &rest[at + 1..]))
}

/// A secret that is not a URL, such as the admin token: printed as `***`
/// whatever it holds (a token that happens to contain `://` is not a URL whose
/// host may be shown).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// Wraps a value that must not be printed.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, to compare with. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `%xx` sequences decoded (invalid ones kept as they are).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_redacted() {
        let url = Secret::new("amqp://app:s3cret@rabbit.internal:5672/%2f");
        assert_eq!(url.to_string(), "amqp://***@rabbit.internal:5672/%2f");
        assert_eq!(
            format!("{url:?}"),
            r#""amqp://***@rabbit.internal:5672/%2f""#
        );
        assert_eq!(url.expose(), "amqp://app:s3cret@rabbit.internal:5672/%2f");
    }

    #[test]
    fn scrub_hides_the_url_and_the_password_inside_other_text() {
        let url = Secret::new("amqp://app:s%40cret!@rabbit:5672/%2f");
        let said =
            "cannot connect to amqp://app:s%40cret!@rabbit:5672/%2f: bad password s@cret! for app";
        let shown = url.scrub(said);
        assert!(!shown.contains("s%40cret"), "{shown}");
        assert!(!shown.contains("s@cret"), "{shown}");
        assert!(shown.contains("amqp://***@rabbit:5672/%2f"), "{shown}");
    }

    #[test]
    fn a_password_with_an_at_sign_is_hidden_whole() {
        let url = Secret::new("amqps://app:p@ss@rabbit/vhost?heartbeat=10");
        assert_eq!(url.to_string(), "amqps://***@rabbit/vhost?heartbeat=10");
    }

    #[test]
    fn a_password_with_a_slash_question_mark_or_hash_is_hidden_whole() {
        // Found by fuzzing: `#`, `/` and `?` end the authority in RFC 3986, so the
        // whole URL, password included, used to be printed as it was.
        for url in [
            "amqp://app#:s3cret@rabbit",
            "amqp://app:s3/cret@rabbit:5672/%2f",
            "amqps://app:s3?cret@rabbit/vhost",
            "redis://:s3#cret@cache:6379/0",
            "://#s3cret@",
        ] {
            let secret = Secret::new(url);
            for shown in [secret.to_string(), format!("{secret:?}")] {
                assert!(!shown.contains("cret"), "{url} shown as {shown}");
            }
            let said = secret.scrub(&format!("cannot connect to {url}"));
            assert!(!said.contains("cret"), "{url} scrubbed to {said}");
        }
        assert_eq!(
            Secret::new("amqp://app:s3/cret@rabbit:5672/%2f").to_string(),
            "amqp://***@rabbit:5672/%2f"
        );
    }

    #[test]
    fn a_token_never_shows_even_when_it_looks_like_a_url() {
        // Found by fuzzing: the admin token was a `Secret`, which shows a URL
        // without credentials as it is, so a token with `://` and no `@` was
        // printed whole in the configuration's Debug.
        for value in ["amqp://app:s3cret:1", "0123456789abcdef", "a://b@c"] {
            let token = Token::new(value);
            assert_eq!(token.to_string(), "***");
            assert_eq!(format!("{token:?}"), r#""***""#);
            assert_eq!(token.expose(), value);
        }
    }

    #[test]
    fn urls_without_credentials_print_as_they_are_and_non_urls_not_at_all() {
        assert_eq!(
            Secret::new("amqp://rabbit:5672").to_string(),
            "amqp://rabbit:5672"
        );
        assert_eq!(Secret::new("app:s3cret@rabbit").to_string(), "***");
    }
}
