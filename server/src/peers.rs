//! Who is connected, for the limits that keep one peer from locking the others out: at most
//! `max_connections_per_address` connections from one address, and a share of the connection
//! limit kept for addresses that have redeemed a token recently, so a flood of connections that
//! never redeem (from one address or many) cannot take every slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long an address that redeemed a token counts as known.
const TRUSTED_FOR: Duration = Duration::from_secs(3600);
/// Known addresses remembered at most (the oldest are forgotten first).
const MAX_TRUSTED: usize = 65_536;

#[derive(Debug, Default)]
pub struct Peers {
    open: HashMap<IpAddr, usize>,
    /// Open connections that have not redeemed a token yet.
    anonymous: usize,
    trusted: HashMap<IpAddr, Instant>,
}

/// Why a new connection was turned away.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    TooManyFromAddress,
    NoRoomForAnonymous,
}

impl Peers {
    /// Admits a new connection from `ip` (counted as anonymous until it redeems), or refuses.
    /// `max_per_address` 0 means no per-address limit; `anonymous_limit` is the share of the
    /// connection limit that connections from unknown addresses may use.
    pub fn admit(&mut self, ip: IpAddr, max_per_address: usize, anonymous_limit: usize) -> Result<(), Refusal> {
        let open = self.open.get(&ip).copied().unwrap_or(0);
        if max_per_address > 0 && open >= max_per_address {
            return Err(Refusal::TooManyFromAddress);
        }
        if self.anonymous >= anonymous_limit && !self.is_trusted(ip) {
            return Err(Refusal::NoRoomForAnonymous);
        }
        *self.open.entry(ip).or_insert(0) += 1;
        self.anonymous += 1;
        Ok(())
    }

    /// A connection from `ip` redeemed a token (the first time on that connection).
    pub fn authenticated(&mut self, ip: IpAddr) {
        self.anonymous = self.anonymous.saturating_sub(1);
        self.redeemed(ip);
    }

    /// Remembers that `ip` redeemed a token.
    pub fn redeemed(&mut self, ip: IpAddr) {
        let now = Instant::now();
        if self.trusted.len() >= MAX_TRUSTED && !self.trusted.contains_key(&ip) {
            self.trusted.retain(|_, at| now.duration_since(*at) < TRUSTED_FOR);
            if self.trusted.len() >= MAX_TRUSTED {
                if let Some(oldest) = self.trusted.iter().min_by_key(|(_, at)| **at).map(|(ip, _)| *ip) {
                    self.trusted.remove(&oldest);
                }
            }
        }
        self.trusted.insert(ip, now);
    }

    /// A connection from `ip` closed; `anonymous` if it never redeemed.
    pub fn closed(&mut self, ip: IpAddr, anonymous: bool) {
        if let Some(open) = self.open.get_mut(&ip) {
            *open -= 1;
            if *open == 0 {
                self.open.remove(&ip);
            }
        }
        if anonymous {
            self.anonymous = self.anonymous.saturating_sub(1);
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.get(&ip).is_some_and(|at| at.elapsed() < TRUSTED_FOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_is_capped_and_known_addresses_keep_their_share() {
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let mut peers = Peers::default();
        peers.redeemed(c);
        assert!(peers.admit(a, 2, 3).is_ok());
        assert!(peers.admit(a, 2, 3).is_ok());
        assert_eq!(peers.admit(a, 2, 3), Err(Refusal::TooManyFromAddress));
        assert!(peers.admit(b, 2, 3).is_ok());
        assert_eq!(peers.admit(b, 2, 3), Err(Refusal::NoRoomForAnonymous), "the anonymous share is used up");
        assert!(peers.admit(c, 2, 3).is_ok(), "an address that redeemed before gets in");
        peers.authenticated(c);
        peers.closed(a, true);
        assert!(peers.admit(b, 2, 3).is_ok(), "a closed anonymous connection frees its slot");
    }
}
