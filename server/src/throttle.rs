//! Failed-redeem accounting: which addresses are guessing, and how many of their failures
//! reach the audit table.
//!
//! An address that fails more than `max_failed_redeems` times in one window is *throttled*:
//! its further failures are answered `capsync/overloaded` after a delay, so guessing costs the
//! guesser time and a call slot. A correct token is still looked up and honoured, so a real
//! admin behind the same address (a NAT, a shared host) is never locked out. Failures are
//! audited up to a server-wide number per window; the rest are counted and summed up in one
//! row when the window turns, so many addresses cannot grow the audit table without bound.
//! The per-address map forgets addresses whose window has passed and never holds more than
//! [`MAX_TRACKED`] of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Addresses tracked at once; past this, new addresses are not throttled individually (the
/// server-wide audit cap still holds).
pub const MAX_TRACKED: usize = 65_536;

#[derive(Debug)]
pub struct RedeemFailures {
    window: Duration,
    max_per_address: u32,
    max_audited: u32,
    per_address: HashMap<IpAddr, (Instant, u32)>,
    /// Server-wide: (window start, failures audited in it, failures not audited in it).
    audited: (Instant, u32, u64),
}

/// What to do with one failed redeem.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The address is over its budget: answer `capsync/overloaded`, after a delay.
    pub throttled: bool,
    /// This failure is the one that made the address throttled (audited as such).
    pub newly_throttled: bool,
    /// Write this failure's audit row.
    pub audit: bool,
    /// Failures of the last window that were not audited, to record in one summary row.
    pub suppressed: Option<u64>,
}

impl RedeemFailures {
    pub fn new(window: Duration, max_per_address: u32, max_audited: u32) -> RedeemFailures {
        RedeemFailures {
            window,
            max_per_address,
            max_audited,
            per_address: HashMap::new(),
            audited: (Instant::now(), 0, 0),
        }
    }

    /// Records a failed redeem from `ip` (if known) at `now`.
    pub fn record(&mut self, ip: Option<IpAddr>, now: Instant) -> Verdict {
        let mut throttled = false;
        let mut newly_throttled = false;
        if let Some(ip) = ip {
            if !self.per_address.contains_key(&ip) && self.per_address.len() >= MAX_TRACKED {
                let window = self.window;
                self.per_address.retain(|_, (start, _)| now.duration_since(*start) <= window);
            }
            if self.per_address.len() < MAX_TRACKED || self.per_address.contains_key(&ip) {
                let entry = self.per_address.entry(ip).or_insert((now, 0));
                if now.duration_since(entry.0) > self.window {
                    *entry = (now, 0);
                }
                entry.1 = entry.1.saturating_add(1);
                throttled = entry.1 > self.max_per_address;
                newly_throttled = entry.1 == self.max_per_address + 1;
            }
        }
        let mut suppressed = None;
        if now.duration_since(self.audited.0) > self.window {
            if self.audited.2 > 0 {
                suppressed = Some(self.audited.2);
            }
            self.audited = (now, 0, 0);
        }
        // A throttled address's failures are not audited one by one: the throttling is.
        let audit = !throttled && self.audited.1 < self.max_audited;
        if audit {
            self.audited.1 += 1;
        } else if !newly_throttled {
            self.audited.2 += 1;
        }
        Verdict { throttled, newly_throttled, audit, suppressed }
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.per_address.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> Option<IpAddr> {
        Some(IpAddr::from(n.to_be_bytes()))
    }

    #[test]
    fn an_address_is_throttled_past_its_budget_and_forgiven_in_the_next_window() {
        let mut f = RedeemFailures::new(Duration::from_secs(60), 3, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!f.record(ip(1), t0).throttled);
        }
        let v = f.record(ip(1), t0);
        assert!(v.throttled && v.newly_throttled && !v.audit);
        assert!(f.record(ip(1), t0).throttled);
        assert!(!f.record(ip(2), t0).throttled, "other addresses are not affected");
        assert!(!f.record(ip(1), t0 + Duration::from_secs(61)).throttled);
    }

    #[test]
    fn audit_rows_are_capped_server_wide_and_the_rest_summed_up() {
        let mut f = RedeemFailures::new(Duration::from_secs(60), 1000, 10);
        let t0 = Instant::now();
        let audited = (0..50).filter(|n| f.record(ip(*n), t0).audit).count();
        assert_eq!(audited, 10);
        let next = f.record(ip(99), t0 + Duration::from_secs(61));
        assert_eq!(next.suppressed, Some(40));
        assert!(next.audit);
    }

    #[test]
    fn the_address_map_forgets_old_addresses_and_stays_bounded() {
        let mut f = RedeemFailures::new(Duration::from_secs(1), 5, 10);
        let t0 = Instant::now();
        for n in 0..MAX_TRACKED as u32 {
            f.record(ip(n), t0);
        }
        assert_eq!(f.tracked(), MAX_TRACKED);
        f.record(ip(u32::MAX), t0);
        assert_eq!(f.tracked(), MAX_TRACKED, "full within the window: bounded");
        f.record(ip(u32::MAX), t0 + Duration::from_secs(2));
        assert_eq!(f.tracked(), 1, "a new window forgets the addresses of the old one");
    }
}
