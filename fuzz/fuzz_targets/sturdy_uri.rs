//! Tokens, sturdy URIs and error markers parsed from arbitrary text: no panic, round trips,
//! and redaction that never shows the secret.
#![no_main]

use capsync_schema::{Marker, SturdyUri, Token};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(uri) = SturdyUri::parse(&text) {
        assert_eq!(SturdyUri::parse(&uri.expose()).as_ref(), Ok(&uri), "expose() parses back");
        // Redaction hides the token field; whatever the user typed as the address is shown.
        let secret = &uri.token.expose()[4..];
        if !uri.address.contains(secret) {
            assert!(!uri.redacted().contains(secret) && !format!("{uri:?}").contains(secret), "redaction hides the token");
        }
    }
    if let Ok(token) = Token::parse(&text) {
        assert_eq!(token.expose(), text.as_ref());
        assert!(!format!("{token} {token:?}").contains(&token.expose()[4..]));
    }
    if let Some(marker) = Marker::find(&text) {
        assert!(text.contains(marker.as_str()));
    }
});
