//! Connection admission of the TLS/TCP listeners (issue #14 item 8): one
//! outside address holding thousands of idle connections or stalled
//! handshakes used to exhaust the single `max_connections` budget and lock
//! the inside out. Three limits now apply at accept, before any byte is
//! read:
//!
//! - each side has its own budget (`[proxy] max_connections` per side), so
//!   an outside flood never takes the inside's slots, and the reverse;
//! - each source address may hold at most `[limits]
//!   max_connections_per_source` connections on a side (an IPv6 source is
//!   its `ipv6_source_prefix`, /64 by default: `admission::source_key`);
//! - of those, at most `max_handshakes_per_source` may still be in their
//!   TLS handshake (a handshake costs the edge a private-key operation and
//!   is what a slow-loris peer stalls; `handshake_timeout_secs` ends each);
//! - and a source may open at most `handshake_rate` new connections per
//!   second on a side after a burst of `handshake_burst`: the caps above
//!   bound what a source holds, not how fast it churns, and one source
//!   completing ~160 handshakes/s and closing each cost the edge ~15% of a
//!   core (issue #8). The buckets outlive the connections (a churning
//!   source has none open between handshakes), so they are kept in their
//!   own table, bounded by `max_tracked_sources`: full buckets are dropped
//!   first, and when every tracked source is mid-burst a new source is let
//!   through unmetered rather than refused (the caps still hold), so a
//!   spoofed-source sweep cannot lock out sources it never used; a sweep
//!   that freed nothing is not repeated for a second, so a table kept full
//!   does not cost a scan per accept.
//!
//! [`LimitTable`] is the sans-IO bookkeeping (unit-tested);
//! [`ConnLimits`] shares it between the accept loops and hands out a
//! [`Permit`] per connection that gives its slots back on drop, however
//! the connection task ends. Entries of sources with nothing open are
//! removed at once, so the table holds at most one entry per open
//! connection. Connections the edge opens itself are not counted here:
//! there is one per next hop, and a flood must never keep the edge from
//! reaching its carrier.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::{
    config::Limits,
    media::Side,
    proxy::admission::{source_key, Bucket, BucketSpec},
};

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The side's budget (`[proxy] max_connections`) is spent.
    SideFull,
    /// The source holds `max_connections_per_source` already.
    SourceConnections,
    /// The source has `max_handshakes_per_source` handshakes in progress.
    SourceHandshakes,
    /// The source opened `handshake_burst` connections and more than
    /// `handshake_rate` per second since.
    SourceHandshakeRate,
}

impl Refusal {
    /// The rule's name, as the security log prints it (config key).
    pub fn rule(self) -> &'static str {
        match self {
            Refusal::SideFull => "proxy.max_connections (per side)",
            Refusal::SourceConnections => "limits.max_connections_per_source",
            Refusal::SourceHandshakes => "limits.max_handshakes_per_source",
            Refusal::SourceHandshakeRate => "limits.handshake_rate",
        }
    }
}

/// The configured limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimitSettings {
    /// Connections per side.
    pub per_side: usize,
    /// Connections per source address and side.
    pub per_source: u32,
    /// Handshakes in progress per source address and side.
    pub handshakes_per_source: u32,
    /// IPv6 sources are counted by this prefix length.
    pub v6_prefix: u8,
    /// New connections per source and side (`handshake_rate`/`_burst`).
    pub new_per_source: BucketSpec,
    /// Sources whose connection rate is tracked at once.
    pub max_rate_sources: usize,
}

impl ConnLimitSettings {
    /// The limits of `[limits]`, with `per_side` connections per side.
    pub fn from_limits(per_side: usize, l: &Limits) -> ConnLimitSettings {
        ConnLimitSettings {
            per_side,
            per_source: l.max_connections_per_source,
            handshakes_per_source: l.max_handshakes_per_source,
            v6_prefix: l.ipv6_source_prefix,
            new_per_source: BucketSpec {
                rate: l.handshake_rate,
                burst: l.handshake_burst,
            },
            max_rate_sources: usize::try_from(l.max_tracked_sources).unwrap_or(usize::MAX),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    open: u32,
    handshaking: u32,
}

/// Open connections and handshakes per side and per source (sans-IO).
#[derive(Debug)]
pub struct LimitTable {
    s: ConnLimitSettings,
    sides: [usize; 2],
    sources: HashMap<(Side, IpAddr), Counts>,
    rates: HashMap<(Side, IpAddr), Bucket>,
    /// When a full `rates` table was last swept and nothing could go: no
    /// new sweep for a second, so a table kept full by sources mid-burst
    /// does not cost a scan per accept.
    swept_full: Option<Instant>,
}

fn ix(side: Side) -> usize {
    match side {
        Side::Internal => 0,
        Side::External => 1,
    }
}

impl LimitTable {
    /// An empty table.
    pub fn new(s: ConnLimitSettings) -> LimitTable {
        LimitTable {
            s,
            sides: [0, 0],
            sources: HashMap::new(),
            rates: HashMap::new(),
            swept_full: None,
        }
    }

    /// A new connection from `ip` on `side`, starting its handshake: counted,
    /// or refused with the limit it would break.
    pub fn open(&mut self, side: Side, ip: IpAddr) -> Result<(), Refusal> {
        self.open_at(side, ip, Instant::now())
    }

    /// `open` at `now`.
    pub fn open_at(&mut self, side: Side, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let ip = source_key(ip, self.s.v6_prefix);
        if self.sides[ix(side)] >= self.s.per_side {
            return Err(Refusal::SideFull);
        }
        let c = self.sources.get(&(side, ip)).copied().unwrap_or_default();
        if c.open >= self.s.per_source {
            return Err(Refusal::SourceConnections);
        }
        if c.handshaking >= self.s.handshakes_per_source {
            return Err(Refusal::SourceHandshakes);
        }
        if let Some(b) = self.rate_bucket(side, ip, now) {
            if !b.ready() {
                return Err(Refusal::SourceHandshakeRate);
            }
            b.take();
        }
        self.sides[ix(side)] += 1;
        let e = self.sources.entry((side, ip)).or_default();
        e.open += 1;
        e.handshaking += 1;
        Ok(())
    }

    /// The connection-rate bucket of `key`'s source, refilled to `now`;
    /// `None` (unmetered) when the table is full of sources mid-burst.
    fn rate_bucket(&mut self, side: Side, ip: IpAddr, now: Instant) -> Option<&mut Bucket> {
        let spec = self.s.new_per_source;
        let key = (side, ip);
        if !self.rates.contains_key(&key) && self.rates.len() >= self.s.max_rate_sources {
            let recent = self
                .swept_full
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1));
            if recent {
                return None;
            }
            self.rates.retain(|_, b| {
                b.refill(spec, now);
                !b.is_full(spec)
            });
            if self.rates.len() >= self.s.max_rate_sources {
                self.swept_full = Some(now);
                return None;
            }
        }
        let b = self
            .rates
            .entry(key)
            .or_insert_with(|| Bucket::full(spec, now));
        b.refill(spec, now);
        Some(b)
    }

    /// Sources whose connection rate is tracked.
    pub fn rate_sources(&self) -> usize {
        self.rates.len()
    }

    /// The handshake of a connection counted by `open` ended (done or not).
    pub fn handshake_over(&mut self, side: Side, ip: IpAddr) {
        if let Some(c) = self
            .sources
            .get_mut(&(side, source_key(ip, self.s.v6_prefix)))
        {
            c.handshaking = c.handshaking.saturating_sub(1);
        }
    }

    /// A connection counted by `open` closed; `handshaking` if it closed
    /// before `handshake_over`.
    pub fn close(&mut self, side: Side, ip: IpAddr, handshaking: bool) {
        let key = (side, source_key(ip, self.s.v6_prefix));
        self.sides[ix(side)] = self.sides[ix(side)].saturating_sub(1);
        if let Some(c) = self.sources.get_mut(&key) {
            c.open = c.open.saturating_sub(1);
            if handshaking {
                c.handshaking = c.handshaking.saturating_sub(1);
            }
            if c.open == 0 {
                self.sources.remove(&key);
            }
        }
    }

    /// Connections open on `side`.
    pub fn open_on(&self, side: Side) -> usize {
        self.sides[ix(side)]
    }

    /// (open, handshaking) of `ip` on `side`.
    pub fn of(&self, side: Side, ip: IpAddr) -> (u32, u32) {
        self.sources
            .get(&(side, source_key(ip, self.s.v6_prefix)))
            .map_or((0, 0), |c| (c.open, c.handshaking))
    }

    /// Sources tracked (bounded by the open connections).
    pub fn sources(&self) -> usize {
        self.sources.len()
    }
}

/// The table shared by the accept loops.
#[derive(Clone, Debug)]
pub struct ConnLimits(Arc<Mutex<LimitTable>>);

impl ConnLimits {
    /// Limits per `s`.
    pub fn new(s: ConnLimitSettings) -> ConnLimits {
        ConnLimits(Arc::new(Mutex::new(LimitTable::new(s))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut LimitTable) -> T) -> T {
        // The table stays consistent whatever panicked while holding it:
        // every operation is a few counter updates.
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut t)
    }

    /// Admits a connection from `ip` on `side` (see [`LimitTable::open`]).
    pub fn admit(&self, side: Side, ip: IpAddr) -> Result<Permit, Refusal> {
        self.with(|t| t.open(side, ip))?;
        Ok(Permit {
            limits: self.clone(),
            side,
            ip,
            handshaking: true,
        })
    }

    /// Connections open on `side`.
    pub fn open_on(&self, side: Side) -> usize {
        self.with(|t| t.open_on(side))
    }

    /// New limits (a reload): connections already open stay; the next
    /// `admit` checks against these.
    pub fn set_settings(&self, s: ConnLimitSettings) {
        self.with(|t| t.s = s);
    }
}

/// One admitted connection's slots; given back on drop.
#[derive(Debug)]
pub struct Permit {
    limits: ConnLimits,
    side: Side,
    ip: IpAddr,
    handshaking: bool,
}

impl Permit {
    /// The TLS handshake is over (plain TCP: at once).
    pub fn handshake_over(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let (side, ip) = (self.side, self.ip);
            self.limits.with(|t| t.handshake_over(side, ip));
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let (side, ip, hs) = (self.side, self.ip, self.handshaking);
        self.limits.with(|t| t.close(side, ip, hs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> LimitTable {
        LimitTable::new(ConnLimitSettings {
            per_side: 10,
            per_source: 4,
            handshakes_per_source: 2,
            v6_prefix: 64,
            new_per_source: BucketSpec {
                rate: 1000,
                burst: 1000,
            },
            max_rate_sources: 1000,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// The lock-out of issue #14 item 8: one outside address filling the
    /// budget. Sides are separate, and one source cannot take a side.
    #[test]
    fn an_outside_flood_never_takes_the_insides_slots() {
        let mut t = table();
        let mut outside = 0;
        for n in 0..20u8 {
            let src = IpAddr::from([198, 51, 100, 10 + n / 4]);
            if t.open(Side::External, src).is_ok() {
                t.handshake_over(Side::External, src);
                outside += 1;
            }
        }
        assert_eq!(outside, 10, "the external side's budget is its own");
        assert_eq!(
            t.open(Side::External, ip("198.51.100.99")),
            Err(Refusal::SideFull)
        );
        for n in 0..4u8 {
            assert_eq!(
                t.open(Side::Internal, IpAddr::from([10, 77, 0, 2 + n])),
                Ok(())
            );
        }
        assert_eq!(t.open_on(Side::Internal), 4);
    }

    #[test]
    fn stalled_handshakes_and_connections_are_capped_per_source() {
        let mut t = table();
        let a = ip("198.51.100.66");
        assert_eq!(t.open(Side::External, a), Ok(()));
        assert_eq!(t.open(Side::External, a), Ok(()));
        assert_eq!(
            t.open(Side::External, a),
            Err(Refusal::SourceHandshakes),
            "two stalled handshakes are the most one source gets"
        );
        assert_eq!(t.open(Side::External, ip("198.51.100.2")), Ok(()));
        t.handshake_over(Side::External, a);
        t.handshake_over(Side::External, a);
        assert_eq!(t.open(Side::External, a), Ok(()));
        t.handshake_over(Side::External, a);
        assert_eq!(t.open(Side::External, a), Ok(()));
        assert_eq!(t.of(Side::External, a), (4, 1));
        assert_eq!(t.open(Side::External, a), Err(Refusal::SourceConnections));
        // A v4-mapped v6 peer address is the same source.
        assert_eq!(
            t.open(Side::External, ip("::ffff:198.51.100.66")),
            Err(Refusal::SourceConnections)
        );
        t.close(Side::External, a, true);
        assert_eq!(t.of(Side::External, a), (3, 0));
        for _ in 0..3 {
            t.close(Side::External, a, false);
        }
        assert_eq!(t.of(Side::External, a), (0, 0));
        assert_eq!(t.sources(), 1, "only the open peer's entry is left");
        assert_eq!(t.open_on(Side::External), 1);
    }

    /// Issue #8: a host with a /64 rotating its source address took a
    /// fresh per-source budget with each one. Now an IPv6 source is its
    /// /64 (configurable): addresses in one /64 share the caps, another
    /// /64 has its own.
    #[test]
    fn ipv6_sources_in_one_64_share_their_caps() {
        let mut t = table();
        let mut ok = 0;
        for n in 0..20u16 {
            let a = IpAddr::from([0x2001, 0xdb8, 0xff, 0, 0, 0, 0x66, n]);
            if t.open(Side::External, a).is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 2, "two handshakes for the whole /64");
        assert_eq!(
            t.of(Side::External, ip("2001:db8:ff::1234:5678")),
            (2, 2),
            "any address of the /64 sees its count"
        );
        assert_eq!(t.open(Side::External, ip("2001:db8:fe::66")), Ok(()));
        t.close(Side::External, ip("2001:db8:ff::abcd"), true);
        assert_eq!(t.of(Side::External, ip("2001:db8:ff::66:0")), (1, 1));
        let mut per_address = LimitTable::new(ConnLimitSettings {
            v6_prefix: 128,
            ..t.s
        });
        for n in 0..4u16 {
            let a = IpAddr::from([0x2001, 0xdb8, 0xff, 0, 0, 0, 0x66, n]);
            assert_eq!(per_address.open(Side::External, a), Ok(()));
        }
    }

    /// Issue #8 follow-up: the caps bound what a source holds, not how fast
    /// it churns; a source opening and closing connections as fast as it
    /// can got a handshake each time. Now `handshake_burst` at once, then
    /// `handshake_rate` per second; other sources and the other side are
    /// untouched; a full rate table lets new sources through unmetered
    /// rather than refusing them.
    #[test]
    fn connection_churn_is_rate_limited_per_source() {
        let mut t = LimitTable::new(ConnLimitSettings {
            new_per_source: BucketSpec { rate: 2, burst: 3 },
            max_rate_sources: 2,
            ..table().s
        });
        let t0 = Instant::now();
        let a = ip("198.51.100.66");
        let churn = |t: &mut LimitTable, src: IpAddr, side: Side, at: Instant| {
            let r = t.open_at(side, src, at);
            if r.is_ok() {
                t.close(side, src, true);
            }
            r
        };
        for n in 0..3 {
            assert_eq!(churn(&mut t, a, Side::External, t0), Ok(()), "burst {n}");
        }
        assert_eq!(
            churn(&mut t, a, Side::External, t0),
            Err(Refusal::SourceHandshakeRate)
        );
        assert_eq!(t.of(Side::External, a), (0, 0), "nothing held");
        // The inside side is another bucket (two of its three spent).
        assert_eq!(churn(&mut t, a, Side::Internal, t0), Ok(()));
        assert_eq!(churn(&mut t, a, Side::Internal, t0), Ok(()));
        // Half a second later, one token (2/s) is back, and only one.
        let t1 = t0 + std::time::Duration::from_millis(500);
        assert_eq!(churn(&mut t, a, Side::External, t1), Ok(()));
        assert_eq!(
            churn(&mut t, a, Side::External, t1),
            Err(Refusal::SourceHandshakeRate)
        );
        // The table holds 2 sources, both mid-burst: a third source is let
        // through unmetered, not refused.
        let b = ip("198.51.100.67");
        for _ in 0..5 {
            assert_eq!(churn(&mut t, b, Side::External, t1), Ok(()));
        }
        assert_eq!(t.rate_sources(), 2);
        // A sweep that freed nothing is not repeated within a second (a
        // table kept full would cost a scan per accept): half a second
        // later the inside bucket is full again, yet a new source is
        // still let through unmetered rather than swept in.
        let c = ip("198.51.100.68");
        let t15 = t1 + std::time::Duration::from_millis(500);
        for _ in 0..5 {
            assert_eq!(churn(&mut t, c, Side::External, t15), Ok(()));
        }
        assert_eq!(t.rate_sources(), 2, "no sweep within a second");
        // Once the first buckets are full again they make room.
        let t2 = t1 + std::time::Duration::from_secs(5);
        for n in 0..3 {
            assert_eq!(churn(&mut t, b, Side::External, t2), Ok(()), "b {n}");
        }
        assert_eq!(
            churn(&mut t, b, Side::External, t2),
            Err(Refusal::SourceHandshakeRate)
        );
    }

    #[test]
    fn permits_give_their_slots_back_on_drop() {
        let l = ConnLimits::new(ConnLimitSettings {
            per_side: 2,
            per_source: 2,
            handshakes_per_source: 1,
            v6_prefix: 64,
            new_per_source: BucketSpec {
                rate: 1000,
                burst: 1000,
            },
            max_rate_sources: 1000,
        });
        let a = ip("203.0.113.77");
        let mut p1 = l.admit(Side::External, a).expect("first");
        assert_eq!(
            l.admit(Side::External, a).map(|_| ()),
            Err(Refusal::SourceHandshakes)
        );
        p1.handshake_over();
        p1.handshake_over();
        let p2 = l.admit(Side::External, a).expect("second");
        assert_eq!(l.open_on(Side::External), 2);
        drop(p2);
        drop(p1);
        assert_eq!(l.open_on(Side::External), 0);
        assert!(l.admit(Side::External, a).is_ok());
    }
}
