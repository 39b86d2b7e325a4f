//! The one endpoint policy of DESIGN.md §3: every address and port a
//! pinhole would send to, named in SDP (`c=`, `m=`, `a=rtcp`, MSRP
//! `a=path`) or in an x-msmsgsinvite invitation, by either side, in offers
//! and answers, IPv4, IPv6 and IPv4-mapped IPv6 alike, is decided here by
//! [`EndpointPolicy::check`] against one table of forbidden targets. Inputs
//! come from `media::manager` (which the proxy feeds with each message's
//! signalling source); the answer is `Ok` or a typed [`Refusal`] naming the
//! rule, from which the security log line and the 488 Warning text are made.
//!
//! ICE candidates are never pinholed by the edge (only the `c=`/`m=`
//! default destination is), so no candidate reaches this check; what the
//! edge does with them is rewriting toward the other side (`sip::sdp`),
//! where every private address, whatever the candidate type, is hidden.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::Side;
use crate::{
    config::{Cidr, MIN_MEDIA_PORT},
    datapath::rules::Proto,
};

/// Which rule refused an endpoint; `rule()` is the stable name logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// 0.0.0.0/8 or `::` (RFC 1122 §3.2.1.3 "this host").
    Unspecified,
    /// 127.0.0.0/8 or `::1`: the edge itself.
    Loopback,
    /// 169.254.0.0/16 (RFC 3927) or fe80::/10: never routed, so it can only
    /// mean a host on one of the edge's own links.
    LinkLocal,
    /// Multicast: a pinhole is one-to-one.
    Multicast,
    /// 255.255.255.255 or 240.0.0.0/4 (RFC 1112 §4 class E): broadcast or
    /// reserved, never a unicast peer.
    Broadcast,
    /// One of the edge's own addresses, either side.
    EdgeAddress,
    /// Inside a configured internal subnet (`[media]
    /// allowed_internal_subnets`): the outside may not aim the inside's
    /// media at another inside host.
    InternalSubnet,
    /// RFC 1918, CGNAT (RFC 6598) or IPv6 ULA (RFC 4193) from outside: such
    /// an address is the inside's (or nobody's) as seen from the edge;
    /// only a route's explicit `media_sources` may name one (a carrier
    /// reached over a private interconnect).
    PrivateRange,
    /// Port below 1024: no media uses one, and it would let SDP aim the
    /// edge at a service port.
    PortBelow1024,
    /// From outside: not the far party's signalling source, nor inside its
    /// route's `media_sources`, and `[media] external_sources` is
    /// `"signalling"` (the default).
    NotSignallingSource,
    /// From inside: neither the client's signalling source nor inside
    /// `[media] allowed_internal_subnets`.
    NotClientSource,
}

impl Refusal {
    /// The rule name written into the security log line.
    pub fn rule(self) -> &'static str {
        match self {
            Refusal::Unspecified => "unspecified",
            Refusal::Loopback => "loopback",
            Refusal::LinkLocal => "link-local",
            Refusal::Multicast => "multicast",
            Refusal::Broadcast => "broadcast",
            Refusal::EdgeAddress => "edge-address",
            Refusal::InternalSubnet => "internal-subnet",
            Refusal::PrivateRange => "private-range",
            Refusal::PortBelow1024 => "port-below-1024",
            Refusal::NotSignallingSource => "not-signalling-source",
            Refusal::NotClientSource => "not-client-source",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Refusal::Unspecified => "an unspecified address",
            Refusal::Loopback => "a loopback address",
            Refusal::LinkLocal => "a link-local address",
            Refusal::Multicast => "a multicast address",
            Refusal::Broadcast => "a broadcast or reserved address",
            Refusal::EdgeAddress => "an address of the edge itself",
            Refusal::InternalSubnet => "an address inside an internal subnet",
            Refusal::PrivateRange => "a private (RFC 1918/6598/4193) address",
            Refusal::PortBelow1024 => "a port below 1024",
            Refusal::NotSignallingSource => {
                "not the far party's signalling source nor an allowed media source"
            }
            Refusal::NotClientSource => {
                "neither the client's signalling source nor in an allowed internal subnet"
            }
        };
        write!(f, "{s} (rule {})", self.rule())
    }
}

/// Which outside addresses may be a pinhole's external remote besides the
/// forbidden table (`[media] external_sources`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalSources {
    /// Only the far party's signalling source address, plus the CIDRs of
    /// its route's `media_sources` (Linux nf_conntrack_sip's default).
    #[default]
    Signalling,
    /// Any public unicast address.
    AnyPublic,
}

/// Who named an endpoint and what it may name.
#[derive(Clone, Copy, Debug)]
pub struct Naming<'a> {
    /// Side the SDP (or invitation) came from.
    pub side: Side,
    /// Its signalling source (the TLS/TCP/UDP peer it arrived from).
    pub source: SocketAddr,
    /// Extra media sources of the far party's route (outside only).
    pub media_sources: &'a [Cidr],
}

/// The forbidden-target table and the source rules, built from settings.
#[derive(Clone, Debug, Default)]
pub struct EndpointPolicy {
    /// Every address of the edge, both sides.
    pub edge_addrs: Vec<IpAddr>,
    /// `[media] allowed_internal_subnets`.
    pub internal_subnets: Vec<Cidr>,
    /// `[media] external_sources`.
    pub external: ExternalSources,
}

/// `::ffff:a.b.c.d` is a.b.c.d (RFC 4291 §2.5.5.2): the kernel delivers to
/// the IPv4 host, so it must meet the IPv4 rules.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn is_private_range(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(a) => (a.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// The part of the table no configuration changes.
fn fixed_refusal(ip: IpAddr) -> Option<Refusal> {
    match ip {
        IpAddr::V4(a) => {
            if a.octets()[0] == 0 {
                Some(Refusal::Unspecified)
            } else if a.is_loopback() {
                Some(Refusal::Loopback)
            } else if a.is_link_local() {
                Some(Refusal::LinkLocal)
            } else if a.is_multicast() {
                Some(Refusal::Multicast)
            } else if a == Ipv4Addr::BROADCAST || a.octets()[0] >= 240 {
                Some(Refusal::Broadcast)
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            if a == Ipv6Addr::UNSPECIFIED {
                Some(Refusal::Unspecified)
            } else if a.is_loopback() {
                Some(Refusal::Loopback)
            } else if (a.segments()[0] & 0xffc0) == 0xfe80 {
                Some(Refusal::LinkLocal)
            } else if a.is_multicast() {
                Some(Refusal::Multicast)
            } else {
                None
            }
        }
    }
}

impl EndpointPolicy {
    /// Whether `ip` is one of the edge's own addresses.
    pub fn is_edge(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.edge_addrs.iter().any(|e| canonical(*e) == ip)
    }

    /// Decides the address of an ICE candidate (RFC 8839 §5.1). The edge
    /// never pinholes a candidate, and private ones (RFC 1918, ULA,
    /// link-local) are what a client behind NAT lists as a matter of
    /// course, so the rewrite hides those (`sip::sdp`); but no host has a
    /// loopback (RFC 8445 §5.1.1.1: never a candidate), unspecified,
    /// multicast, broadcast or reserved address, nor one of the edge's own,
    /// so a candidate naming one is an attempt to aim the other party's
    /// connectivity checks (and the media they select) somewhere it was
    /// never meant to go: refused like any other endpoint.
    pub fn check_candidate(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = canonical(ip);
        match fixed_refusal(ip) {
            Some(Refusal::LinkLocal) | None => {}
            Some(r) => return Err(r),
        }
        if self.edge_addrs.iter().any(|e| canonical(*e) == ip) {
            return Err(Refusal::EdgeAddress);
        }
        Ok(())
    }

    /// Decides one endpoint `ep` that `who` names for a pinhole of `proto`.
    /// `port_learned`: the endpoint connects (RFC 4145 active TCP end) and
    /// its port is learned from its first packet, so the port written (the
    /// discard port 9 by RFC 4145 §4 convention) is never sent to.
    pub fn check(
        &self,
        who: &Naming<'_>,
        proto: Proto,
        ep: SocketAddr,
        port_learned: bool,
    ) -> Result<(), Refusal> {
        let ip = canonical(ep.ip());
        let source = canonical(who.source.ip());
        if let Some(r) = fixed_refusal(ip) {
            return Err(r);
        }
        if self.edge_addrs.iter().any(|e| canonical(*e) == ip) {
            return Err(Refusal::EdgeAddress);
        }
        let learned = port_learned && proto == Proto::Tcp;
        if ep.port() < MIN_MEDIA_PORT && !learned {
            return Err(Refusal::PortBelow1024);
        }
        let in_internal = self.internal_subnets.iter().any(|c| c.contains(ip));
        match who.side {
            Side::Internal => {
                if ip == source || in_internal {
                    Ok(())
                } else {
                    Err(Refusal::NotClientSource)
                }
            }
            Side::External => {
                if in_internal {
                    return Err(Refusal::InternalSubnet);
                }
                let listed = who.media_sources.iter().any(|c| c.contains(ip));
                if is_private_range(ip) && !listed {
                    return Err(Refusal::PrivateRange);
                }
                if ip == source || listed || self.external == ExternalSources::AnyPublic {
                    Ok(())
                } else {
                    Err(Refusal::NotSignallingSource)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_cidr;

    fn policy(external: ExternalSources) -> EndpointPolicy {
        EndpointPolicy {
            edge_addrs: vec![
                "10.77.0.1".parse().expect("ip"),
                "203.0.113.1".parse().expect("ip"),
                "2001:db8:e::1".parse().expect("ip"),
            ],
            internal_subnets: vec![parse_cidr("10.77.0.0/24").expect("cidr")],
            external,
        }
    }

    fn ext<'a>(source: &str, media_sources: &'a [Cidr]) -> Naming<'a> {
        Naming {
            side: Side::External,
            source: source.parse().expect("sa"),
            media_sources,
        }
    }

    fn check(p: &EndpointPolicy, who: &Naming<'_>, ep: &str) -> Result<(), Refusal> {
        p.check(who, Proto::Udp, ep.parse().expect("sa"), false)
    }

    #[test]
    fn the_forbidden_table_names_its_rule() {
        let p = policy(ExternalSources::AnyPublic);
        let who = ext("198.51.100.2:5061", &[]);
        for (ep, want) in [
            ("10.77.0.99:5000", Refusal::InternalSubnet),
            ("[::ffff:10.77.0.99]:5000", Refusal::InternalSubnet),
            ("10.9.9.9:5000", Refusal::PrivateRange),
            ("100.100.0.1:5000", Refusal::PrivateRange),
            ("[fd12::1]:5000", Refusal::PrivateRange),
            ("169.254.1.1:5000", Refusal::LinkLocal),
            ("[fe80::1]:5000", Refusal::LinkLocal),
            ("127.0.0.2:5000", Refusal::Loopback),
            ("[::1]:5000", Refusal::Loopback),
            ("[::ffff:127.0.0.1]:5000", Refusal::Loopback),
            ("0.0.0.0:5000", Refusal::Unspecified),
            ("[::]:5000", Refusal::Unspecified),
            ("224.0.0.1:5000", Refusal::Multicast),
            ("[ff02::1]:5000", Refusal::Multicast),
            ("255.255.255.255:5000", Refusal::Broadcast),
            ("240.0.0.1:5000", Refusal::Broadcast),
            ("203.0.113.1:5000", Refusal::EdgeAddress),
            ("[::ffff:203.0.113.1]:5000", Refusal::EdgeAddress),
            ("[2001:db8:e::1]:5000", Refusal::EdgeAddress),
            ("198.51.100.9:1023", Refusal::PortBelow1024),
        ] {
            assert_eq!(check(&p, &who, ep), Err(want), "{ep}");
        }
        assert_eq!(check(&p, &who, "198.51.100.9:1024"), Ok(()));
        assert_eq!(check(&p, &who, "[2001:db8:5::9]:5000"), Ok(()));
    }

    #[test]
    fn media_sources_widen_only_the_source_rule_and_private_ranges() {
        let p = policy(ExternalSources::Signalling);
        let none = ext("198.51.100.2:5061", &[]);
        assert_eq!(check(&p, &none, "198.51.100.2:5000"), Ok(()));
        assert_eq!(
            check(&p, &none, "198.51.100.7:5000"),
            Err(Refusal::NotSignallingSource)
        );
        let carrier = [
            parse_cidr("198.51.100.0/24").expect("cidr"),
            parse_cidr("172.20.0.0/16").expect("cidr"),
        ];
        let who = ext("198.51.100.2:5061", &carrier);
        assert_eq!(check(&p, &who, "198.51.100.7:5000"), Ok(()));
        // A private interconnect the admin listed explicitly.
        assert_eq!(check(&p, &who, "172.20.1.1:5000"), Ok(()));
        // The fixed table and internal subnets still win.
        let wide = [parse_cidr("10.0.0.0/8").expect("cidr")];
        let who = ext("198.51.100.2:5061", &wide);
        assert_eq!(
            check(&p, &who, "10.77.0.5:5000"),
            Err(Refusal::InternalSubnet)
        );
        assert_eq!(check(&p, &who, "10.1.0.5:80"), Err(Refusal::PortBelow1024));
    }

    #[test]
    fn candidates_never_name_loopback_broadcast_multicast_or_the_edge() {
        let p = policy(ExternalSources::Signalling);
        for (a, want) in [
            ("127.0.0.1", Some(Refusal::Loopback)),
            ("::1", Some(Refusal::Loopback)),
            ("::ffff:127.0.0.1", Some(Refusal::Loopback)),
            ("0.0.0.0", Some(Refusal::Unspecified)),
            ("255.255.255.255", Some(Refusal::Broadcast)),
            ("224.0.0.1", Some(Refusal::Multicast)),
            ("ff02::1", Some(Refusal::Multicast)),
            ("203.0.113.1", Some(Refusal::EdgeAddress)),
            ("::ffff:10.77.0.1", Some(Refusal::EdgeAddress)),
            // What NATed and IPv6 clients list: hidden by the rewrite.
            ("192.168.1.2", None),
            ("fe80::1", None),
            ("169.254.3.3", None),
            ("198.51.100.9", None),
        ] {
            let ip: IpAddr = a.parse().expect("ip");
            assert_eq!(p.check_candidate(ip).err(), want, "{a}");
        }
    }

    #[test]
    fn inside_targets_are_the_client_or_an_allowed_subnet() {
        let p = policy(ExternalSources::AnyPublic);
        let who = Naming {
            side: Side::Internal,
            source: "10.77.1.2:40001".parse().expect("sa"),
            media_sources: &[],
        };
        assert_eq!(check(&p, &who, "10.77.1.2:4000"), Ok(()));
        assert_eq!(check(&p, &who, "[::ffff:10.77.1.2]:4000"), Ok(()));
        assert_eq!(check(&p, &who, "10.77.0.50:4000"), Ok(()));
        assert_eq!(
            check(&p, &who, "10.77.2.2:4000"),
            Err(Refusal::NotClientSource)
        );
        assert_eq!(check(&p, &who, "10.77.1.2:22"), Err(Refusal::PortBelow1024));
        assert_eq!(check(&p, &who, "10.77.0.1:4000"), Err(Refusal::EdgeAddress));
        // RFC 4145 §4: an active TCP end writes port 9 and connects.
        assert_eq!(
            p.check(&who, Proto::Tcp, "10.77.1.2:9".parse().expect("sa"), true),
            Ok(())
        );
    }
}
