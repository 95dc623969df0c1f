//! Error markers: the stable first word of every capsync error description on the wire.
//!
//! A client decides what to do from the marker alone: `revoked`, `expired` and
//! `unknown-token` mean "stop using this ref", everything Cap'n Proto reports as
//! `disconnected` means "reconnect and replay".

use std::fmt;

/// One stable error marker. `Display` prints the wire form, e.g. `capsync/revoked`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Marker {
    Revoked,
    Expired,
    UnknownToken,
    Denied,
    Invalid,
    Gap,
    Diverged,
    TooLarge,
    Overloaded,
    /// The server failed for a reason of its own (storage full or broken); retry later.
    Internal,
}

impl Marker {
    pub const ALL: [Marker; 10] = [
        Marker::Revoked,
        Marker::Expired,
        Marker::UnknownToken,
        Marker::Denied,
        Marker::Invalid,
        Marker::Gap,
        Marker::Diverged,
        Marker::TooLarge,
        Marker::Overloaded,
        Marker::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Marker::Revoked => "capsync/revoked",
            Marker::Expired => "capsync/expired",
            Marker::UnknownToken => "capsync/unknown-token",
            Marker::Denied => "capsync/denied",
            Marker::Invalid => "capsync/invalid",
            Marker::Gap => "capsync/gap",
            Marker::Diverged => "capsync/diverged",
            Marker::TooLarge => "capsync/too-large",
            Marker::Overloaded => "capsync/overloaded",
            Marker::Internal => "capsync/internal",
        }
    }

    /// The marker a description starts with, if any. Cap'n Proto may prefix a remote
    /// exception's text (e.g. "remote exception: "), so the marker is searched, not only
    /// matched at position 0.
    pub fn find(description: &str) -> Option<Marker> {
        let at = description.find("capsync/")?;
        let rest = &description[at..];
        Marker::ALL.into_iter().find(|m| {
            rest.starts_with(m.as_str())
                && !rest[m.as_str().len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
        })
    }

    /// Whether a ref that got this marker must stop being used (no retry will help).
    pub fn is_terminal_for_ref(self) -> bool {
        matches!(self, Marker::Revoked | Marker::Expired | Marker::UnknownToken)
    }

    /// A Cap'n Proto exception carrying this marker and a human explanation.
    pub fn error(self, detail: impl fmt::Display) -> capnp::Error {
        let text = format!("{}: {detail}", self.as_str());
        match self {
            Marker::Overloaded => capnp::Error::overloaded(text),
            _ => capnp::Error::failed(text),
        }
    }
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The marker carried by a Cap'n Proto error, if it has one.
pub fn of_error(err: &capnp::Error) -> Option<Marker> {
    Marker::find(&err.extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_markers_behind_remote_prefixes() {
        assert_eq!(Marker::find("remote exception: capsync/revoked: share x"), Some(Marker::Revoked));
        assert_eq!(Marker::find("capsync/unknown-token: no such token"), Some(Marker::UnknownToken));
        assert_eq!(Marker::find("capsync/gapping"), None);
        assert_eq!(Marker::find("disconnected"), None);
        for m in Marker::ALL {
            assert_eq!(of_error(&m.error("x")), Some(m));
        }
    }
}
