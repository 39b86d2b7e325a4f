//! Who may use the edge from outside, decided for every request that
//! arrives on the external side (sans-IO: the core asks with the request's
//! facts and an `Instant`): trusted peers (`[[peer]]`: carrier trunks and
//! federation partners, recognised by signalling source CIDR, optionally by
//! their TLS client certificate, or by the connection the edge opened to
//! them), remote users (clients registered through the edge, recognised by
//! the flow they registered on, RFC 5626), and everyone else, who may only
//! register for a served domain (`[access]`).
//!
//! No open relay: with `[access]` or any `[[peer]]` configured, a request
//! from outside that comes from neither a peer nor a remote user is
//! refused 403, and one for a domain the edge does not serve 404, so
//! nothing unknown reaches the inside PBX, which could otherwise send it
//! on to a trunk (toll fraud). Requests from outside only ever go inside:
//! the core never forwards outside to outside. Without either section the
//! edge keeps its earlier behaviour (any outside party may call inside)
//! and says so at start.
//!
//! Inputs come from `crate::access` (the config sections) through
//! [`super::ProxySettings`]; the answer goes back to `proxy::core`, which
//! answers the request itself or forwards it.

use std::{net::IpAddr, time::Instant};

use super::HopTarget;
use crate::{config::Cidr, media::FarMedia};

/// One `[[peer]]` as the core uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPolicy {
    /// The peer's name (logs, listings).
    pub name: String,
    /// Signalling source networks it connects from.
    pub addresses: Vec<Cidr>,
    /// A name its TLS client certificate must be valid for, if required.
    pub tls_identity: Option<String>,
    /// Where the edge connects to reach it (with `domains`).
    pub hop: Option<HopTarget>,
    /// Domains routed to it from inside.
    pub domains: Vec<String>,
    /// Extra networks it may receive media at (DESIGN.md §3).
    pub media_sources: Vec<Cidr>,
    /// How its media source is learned.
    pub far_media: FarMedia,
    /// Requests per second accepted from it; 0 = no limit.
    pub max_requests_per_sec: u32,
}

/// The access rules of the external side.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessSettings {
    /// Whether the rules are enforced (`[access]` or a `[[peer]]` exists).
    pub enforce: bool,
    /// Served domains, lower-cased, exact or `*.suffix`.
    pub served_domains: Vec<String>,
    /// Outside clients may register through the edge for served domains.
    pub remote_users: bool,
    /// Where their REGISTERs go (default: `[proxy] internal_next_hop`).
    pub registrar: Option<HopTarget>,
    /// Most live remote-user registrations; more are refused 503.
    pub max_remote_registrations: usize,
    /// The trusted peers.
    pub peers: Vec<PeerPolicy>,
}

/// Who an outside request comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Party {
    /// `[[peer]]` number `n`.
    Peer(usize),
    /// A client registered through the edge on this flow.
    RemoteUser,
    /// Neither.
    Unknown,
}

/// The facts about one outside connection the core knows.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// The connection's peer address.
    pub ip: IpAddr,
    /// The next hop the edge opened the connection to, if it did.
    pub opened_to: Option<&'a HopTarget>,
    /// The peer names its TLS client certificate was verified for.
    pub identities: &'a [String],
    /// The connection carries a live registration of a remote user.
    pub registered_flow: bool,
}

/// Whether `host` matches `pattern` (exact, or `*.suffix` for subdomains).
pub fn domain_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len()
                && host.ends_with(suffix)
                && host.as_bytes().get(host.len() - suffix.len() - 1) == Some(&b'.')
        }
        None => pattern == host,
    }
}

impl AccessSettings {
    /// Whether the edge serves `host` (a Request-URI host, any case).
    pub fn serves(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.served_domains.iter().any(|d| domain_matches(d, &host))
    }

    /// Who a request on an outside connection comes from. A peer is a
    /// connection the edge opened to its next hop, or one from inside its
    /// `addresses` whose certificate (when `tls_identity` is set) was
    /// verified for that name.
    pub fn classify(&self, src: &Source<'_>) -> Party {
        let ip = src.ip.to_canonical();
        let found = self.peers.iter().position(|p| {
            let opened = src.opened_to.is_some() && p.hop.as_ref() == src.opened_to;
            let from = p.addresses.iter().any(|c| c.contains(ip))
                && p.tls_identity
                    .as_ref()
                    .is_none_or(|n| src.identities.iter().any(|i| i.eq_ignore_ascii_case(n)));
            opened || from
        });
        match found {
            Some(n) => Party::Peer(n),
            None if src.registered_flow => Party::RemoteUser,
            None => Party::Unknown,
        }
    }
}

/// What [`decide`] is asked about one request from outside.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The method.
    pub method: &'a str,
    /// The Request-URI host.
    pub host: &'a str,
    /// The Request-URI host is one of the edge's own addresses (carriers
    /// send `sip:+number@EDGE-IP`).
    pub host_is_edge: bool,
    /// The Request-URI is a flow token the edge minted (a Contact or Path
    /// it handed out: the holder was given it by a dialog or registration).
    pub token: bool,
    /// A Route not naming the edge is left after the edge's own.
    pub foreign_route: bool,
    /// The request has a To tag (in a dialog).
    pub in_dialog: bool,
}

/// Why a request from outside is refused: status and reason text (for the
/// Warning, RFC 3261 §20.43).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// 403 or 404.
    pub code: u16,
    /// Why.
    pub why: &'static str,
}

/// The no-open-relay rule for one request from `party` (module docs).
/// `Ok` lets the core route it (always toward the inside).
pub fn decide(s: &AccessSettings, party: Party, r: &Request<'_>) -> Result<(), Refusal> {
    if !s.enforce {
        return Ok(());
    }
    let refuse = |code, why| Err(Refusal { code, why });
    if r.method == "REGISTER" {
        if !s.remote_users {
            return refuse(403, "registrations are only proxied from the inside");
        }
        if matches!(party, Party::Peer(_)) {
            return refuse(403, "a trusted peer does not register through the edge");
        }
        if !s.serves(r.host) {
            return refuse(404, "not a domain this edge serves");
        }
        return Ok(());
    }
    if r.foreign_route && !r.in_dialog {
        // A preloaded route beyond the edge would make it a relay.
        return refuse(403, "a route beyond the edge is not accepted from outside");
    }
    if r.token {
        // The token is the capability: only a party that was handed it in
        // a dialog or registration knows it (RFC 5626 §5.2).
        return Ok(());
    }
    if r.method == "ACK" && r.in_dialog {
        return Ok(());
    }
    match party {
        Party::Unknown => refuse(
            403,
            "not a known peer or a user registered through the edge",
        ),
        Party::Peer(_) | Party::RemoteUser => {
            if r.host_is_edge || s.serves(r.host) {
                Ok(())
            } else {
                refuse(404, "not a domain this edge serves")
            }
        }
    }
}

/// Per-peer request rate limits: one token bucket per `[[peer]]` with a
/// limit (capacity one second of requests), refilled by the clock the core
/// is driven with.
#[derive(Debug, Default)]
pub struct RateLimits {
    buckets: Vec<Option<(f64, Instant)>>,
}

impl RateLimits {
    /// Takes one request of peer `n` with limit `per_sec` (0: unlimited);
    /// `false` when its bucket is empty.
    pub fn take(&mut self, n: usize, per_sec: u32, now: Instant) -> bool {
        if per_sec == 0 {
            return true;
        }
        if self.buckets.len() <= n {
            self.buckets.resize(n + 1, None);
        }
        let cap = f64::from(per_sec);
        let Some(slot) = self.buckets.get_mut(n) else {
            return true;
        };
        let (tokens, at) = slot.unwrap_or((cap, now));
        let refill = now.saturating_duration_since(at).as_secs_f64() * cap;
        let tokens = (tokens + refill).min(cap);
        if tokens >= 1.0 {
            *slot = Some((tokens - 1.0, now));
            true
        } else {
            *slot = Some((tokens, now));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_cidr;
    use std::time::Duration;

    fn settings() -> AccessSettings {
        AccessSettings {
            enforce: true,
            served_domains: vec!["example.com".into(), "*.corp.example".into()],
            remote_users: true,
            registrar: None,
            max_remote_registrations: 10,
            peers: vec![
                PeerPolicy {
                    name: "carrier".into(),
                    addresses: vec![parse_cidr("198.51.100.0/28").unwrap()],
                    tls_identity: None,
                    hop: None,
                    domains: Vec::new(),
                    media_sources: Vec::new(),
                    far_media: FarMedia::Config,
                    max_requests_per_sec: 0,
                },
                PeerPolicy {
                    name: "partner".into(),
                    addresses: vec![parse_cidr("192.0.2.0/24").unwrap()],
                    tls_identity: Some("sip.partner.example".into()),
                    hop: None,
                    domains: vec!["partner.example".into()],
                    media_sources: Vec::new(),
                    far_media: FarMedia::Strict,
                    max_requests_per_sec: 0,
                },
            ],
        }
    }

    fn src<'a>(ip: &str, ids: &'a [String], registered: bool) -> Source<'a> {
        Source {
            ip: ip.parse().unwrap(),
            opened_to: None,
            identities: ids,
            registered_flow: registered,
        }
    }

    #[test]
    fn peers_match_by_source_cidr_and_certificate() {
        let s = settings();
        assert_eq!(s.classify(&src("198.51.100.9", &[], false)), Party::Peer(0));
        assert_eq!(
            s.classify(&src("::ffff:198.51.100.9", &[], false)),
            Party::Peer(0),
            "IPv4-mapped is the IPv4 address"
        );
        assert_eq!(
            s.classify(&src("198.51.100.99", &[], false)),
            Party::Unknown
        );
        assert_eq!(
            s.classify(&src("198.51.100.99", &[], true)),
            Party::RemoteUser
        );
        // The partner's address without its certificate is nobody.
        assert_eq!(s.classify(&src("192.0.2.7", &[], false)), Party::Unknown);
        let ids = vec!["SIP.partner.example".to_owned()];
        assert_eq!(s.classify(&src("192.0.2.7", &ids, false)), Party::Peer(1));
        // A connection the edge opened to a peer's host is that peer's.
        let mut s = settings();
        let hop = HopTarget {
            host: "sbc.carrier.example".into(),
            port: 5061,
            tls_name: "sbc.carrier.example".into(),
        };
        s.peers[0].hop = Some(hop.clone());
        let opened = Source {
            opened_to: Some(&hop),
            ..src("203.0.113.77", &[], false)
        };
        assert_eq!(s.classify(&opened), Party::Peer(0));
    }

    fn req<'a>(method: &'a str, host: &'a str) -> Request<'a> {
        Request {
            method,
            host,
            host_is_edge: false,
            token: false,
            foreign_route: false,
            in_dialog: false,
        }
    }

    #[test]
    fn no_open_relay() {
        let s = settings();
        let unknown = Party::Unknown;
        // Anyone may register for a served domain (the registrar
        // authenticates), nobody for another.
        assert_eq!(decide(&s, unknown, &req("REGISTER", "example.com")), Ok(()));
        assert_eq!(
            decide(&s, unknown, &req("REGISTER", "a.corp.example")),
            Ok(())
        );
        assert_eq!(
            decide(&s, unknown, &req("REGISTER", "foreign.example"))
                .unwrap_err()
                .code,
            404
        );
        // An unknown party may not call, not even a served domain.
        assert_eq!(
            decide(&s, unknown, &req("INVITE", "example.com"))
                .unwrap_err()
                .code,
            403
        );
        // Peers and remote users: served domains and the edge itself only.
        for party in [Party::Peer(0), Party::RemoteUser] {
            assert_eq!(decide(&s, party, &req("INVITE", "example.com")), Ok(()));
            let r = decide(&s, party, &req("INVITE", "foreign.example")).unwrap_err();
            assert_eq!(r.code, 404);
            let edge = Request {
                host_is_edge: true,
                ..req("INVITE", "203.0.113.1")
            };
            assert_eq!(decide(&s, party, &edge), Ok(()));
            let routed = Request {
                foreign_route: true,
                ..req("INVITE", "example.com")
            };
            assert_eq!(decide(&s, party, &routed).unwrap_err().code, 403);
        }
        // A token the edge handed out is its own capability.
        let token = Request {
            token: true,
            in_dialog: true,
            ..req("BYE", "10.77.0.1")
        };
        assert_eq!(decide(&s, unknown, &token), Ok(()));
        // A peer never registers; remote users can be switched off.
        assert_eq!(
            decide(&s, Party::Peer(0), &req("REGISTER", "example.com"))
                .unwrap_err()
                .code,
            403
        );
        let off = AccessSettings {
            remote_users: false,
            ..settings()
        };
        assert_eq!(
            decide(&off, unknown, &req("REGISTER", "example.com"))
                .unwrap_err()
                .code,
            403
        );
        // Not enforced: the earlier behaviour.
        let open = AccessSettings::default();
        assert_eq!(decide(&open, unknown, &req("INVITE", "x.example")), Ok(()));
    }

    #[test]
    fn rate_limit_refills_with_the_clock() {
        let mut r = RateLimits::default();
        let t0 = Instant::now();
        assert!((0..5).all(|_| r.take(1, 5, t0)));
        assert!(!r.take(1, 5, t0));
        assert!(r.take(1, 5, t0 + Duration::from_millis(250)));
        assert!(r.take(0, 0, t0), "0 is no limit");
    }
}
