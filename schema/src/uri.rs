//! Sturdy URIs: `capsync://HOST:PORT/TOKEN` (plain TCP) or `capsyncs://HOST:PORT/TOKEN` (TLS),
//! the address and the secret in one string.

use crate::token::{Token, TokenError};
use std::fmt;

pub const SCHEME: &str = "capsync://";
pub const TLS_SCHEME: &str = "capsyncs://";

/// A parsed sturdy URI. Formatting shows `capsync://HOST:PORT/csy_<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct SturdyUri {
    /// `HOST:PORT`, as given.
    pub address: String,
    pub token: Token,
    /// `capsyncs://`: connect with TLS and verify the server.
    pub tls: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    #[error("a sturdy URI looks like capsync://HOST:PORT/TOKEN (or capsyncs:// for TLS)")]
    Shape,
    #[error("the URI's address needs a host and a port")]
    Address,
    #[error("the URI's token is malformed: {0}")]
    Token(#[from] TokenError),
}

impl SturdyUri {
    pub fn new(address: impl Into<String>, token: Token) -> SturdyUri {
        SturdyUri { address: address.into(), token, tls: false }
    }

    pub fn with_tls(mut self, tls: bool) -> SturdyUri {
        self.tls = tls;
        self
    }

    /// The host part of the address, without brackets around an IPv6 literal.
    pub fn host(&self) -> &str {
        let host = self.address.rsplit_once(':').map(|(h, _)| h).unwrap_or(&self.address);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    fn scheme(&self) -> &'static str {
        if self.tls { TLS_SCHEME } else { SCHEME }
    }

    pub fn parse(text: &str) -> Result<SturdyUri, UriError> {
        let text = text.trim();
        let (tls, rest) = match text.strip_prefix(TLS_SCHEME) {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix(SCHEME).ok_or(UriError::Shape)?),
        };
        let (address, token) = rest.split_once('/').ok_or(UriError::Shape)?;
        let valid = address.rsplit_once(':').is_some_and(|(host, port)| valid_host(host) && port.parse::<u16>().is_ok());
        if !valid {
            return Err(UriError::Address);
        }
        Ok(SturdyUri { address: address.to_owned(), token: Token::parse(token)?, tls })
    }

    /// The full URI with its secret, for the one place that must hand it to the user.
    pub fn expose(&self) -> String {
        format!("{}{}/{}", self.scheme(), self.address, self.token.expose())
    }

    /// The URI with the token redacted, safe for logs and status output.
    pub fn redacted(&self) -> String {
        format!("{}{}/{}", self.scheme(), self.address, self.token)
    }
}

/// A DNS name or IPv4 address (`[A-Za-z0-9.-]`, at most 253 bytes), or an IPv6 address in
/// brackets.
fn valid_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty() && host.len() <= 253 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

impl fmt::Debug for SturdyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SturdyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_redacts() {
        let token = Token::generate();
        let text = format!("capsync://127.0.0.1:7420/{}", token.expose());
        let uri = SturdyUri::parse(&text).unwrap();
        assert_eq!(uri.address, "127.0.0.1:7420");
        assert_eq!(uri.expose(), text);
        assert!(!format!("{uri} {uri:?}").contains(&token.expose()[4..]));
        assert!(!uri.tls);
        let tls = SturdyUri::parse(&format!("capsyncs://[::1]:7420/{}", token.expose())).unwrap();
        assert!(tls.tls);
        assert_eq!(tls.host(), "::1");
        assert!(tls.expose().starts_with("capsyncs://[::1]:7420/csy_"));
    }

    #[test]
    fn rejects_bad_shapes() {
        let t = Token::generate();
        let t = t.expose();
        assert_eq!(SturdyUri::parse("http://x:1/a"), Err(UriError::Shape));
        assert_eq!(SturdyUri::parse(&format!("capsync://nohost/{t}")), Err(UriError::Address));
        assert_eq!(SturdyUri::parse(&format!("capsync://h:99999/{t}")), Err(UriError::Address));
        assert!(matches!(SturdyUri::parse("capsync://h:1/csy_x"), Err(UriError::Token(_))));
        for host in ["bad host", "h\u{7}x", "[not-v6]", "a_b", &"x".repeat(254)] {
            assert_eq!(SturdyUri::parse(&format!("capsync://{host}:1/{t}")), Err(UriError::Address), "{host:?}");
        }
        assert!(SturdyUri::parse(&format!("capsync://sync.example-1.com:7420/{t}")).is_ok());
    }

    /// Found by the sturdy_uri fuzz target: control and non-ASCII bytes (and a copy of the
    /// token) in the host were accepted.
    #[test]
    fn fuzz_regression_garbage_host() {
        let input = include_bytes!("../tests/fuzz-regressions/uri-host-garbage.bin");
        assert_eq!(SturdyUri::parse(&String::from_utf8_lossy(input)), Err(UriError::Address));
    }
}
