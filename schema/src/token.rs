//! Sturdy-ref tokens: 256 random bits as `csy_` + 43 base64url characters.
//!
//! The `csy_` prefix lets secret scanners recognise a leaked token. A [`Token`] never prints
//! itself (`Debug` and `Display` are redacted); only [`Token::expose`] gives the text, for the
//! one place that must send or store it. The server keeps only [`TokenHash`] (SHA-256).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest, Sha256};
use std::fmt;

pub const PREFIX: &str = "csy_";
const BODY_LEN: usize = 43;

/// A bearer secret. Redacted in every formatting trait.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

/// SHA-256 of a token's full text: the only form the server stores or compares.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("a token starts with `csy_` followed by 43 base64url characters")]
    Malformed,
}

impl Token {
    /// A fresh token from the operating system's CSPRNG.
    pub fn generate() -> Token {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Token(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// Checks the shape only; whether the server knows it is for the server to say.
    pub fn parse(text: &str) -> Result<Token, TokenError> {
        let body = text.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let well_formed = body.len() == BODY_LEN
            && body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if well_formed {
            Ok(Token(text.to_owned()))
        } else {
            Err(TokenError::Malformed)
        }
    }

    /// The secret text, for the wire or a file the user asked for.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl TokenHash {
    /// Hashes any presented text, well-formed or not, so lookups never branch on the secret.
    pub fn of(text: &str) -> TokenHash {
        TokenHash(Sha256::digest(text.as_bytes()).into())
    }

    /// A short, non-reversible tag for logs: the first 6 bytes of the hash, in hex.
    pub fn tag(&self) -> String {
        self.0[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(csy_<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("csy_<redacted>")
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.tag())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_never_print() {
        let token = Token::generate();
        assert_eq!(token.expose().len(), PREFIX.len() + BODY_LEN);
        assert_eq!(Token::parse(token.expose()), Ok(token.clone()));
        let body = &token.expose()[PREFIX.len()..];
        assert!(!format!("{token:?} {token}").contains(body));
        assert_ne!(Token::generate(), token);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in ["", "csy_", "abc", "csy_short", &format!("csy_{}", "!".repeat(43))] {
            assert_eq!(Token::parse(bad), Err(TokenError::Malformed), "{bad:?}");
        }
    }
}
