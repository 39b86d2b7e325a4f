//! Pure translation from a media flow ("this client talks to that peer
//! through these edge ports") into the two directional pinhole rules the
//! datapath understands. No I/O: the map writer installs what this returns.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use sip_edge_common::{
    addr_from_ip, PinholeKey, PinholeRule, MATCH_DST, MATCH_SRC, PROTO_TCP, PROTO_UDP,
    ROLE_EXTERNAL, ROLE_INTERNAL, RULE_ANY_REMOTE_PORT, RULE_DST_FOLLOWS_PAIR, RULE_LATCH,
    RULE_LATCH_PORT, RULE_REWRITE_DST, RULE_REWRITE_SRC,
};

/// Which end of a flow connects from a port signalling did not name (TCP
/// media: the RFC 4145 `active` end, or an MSRP offerer, RFC 4975 §8.1, uses
/// an ephemeral source port). That end's address stays strict; its port is
/// learned once from the first packet (SYN) and fixed afterwards, and the
/// opposite rule sends to the learned port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LearnPort {
    /// Both ports are the signalled ones (UDP media, passive TCP ends).
    #[default]
    Neither,
    /// The external peer connects from an ephemeral port.
    Peer,
    /// The internal client connects from an ephemeral port (relay mode
    /// only: in nat mode the client's port is the SNAT key and must be known).
    Client,
}

/// Transport of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// RTP/RTCP and other datagram media.
    Udp,
    /// MSRP, RFC 4145 TCP media, legacy file transfer.
    Tcp,
}

impl Proto {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Udp => PROTO_UDP,
            Proto::Tcp => PROTO_TCP,
        }
    }
}

/// One media flow between an internal client and an external peer
/// (serde: the HA store's record of it, `crate::ha`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flow {
    /// Both legs anchored at the edge (DESIGN.md §2 relay).
    Relay {
        /// Transport.
        proto: Proto,
        /// The client's media address (from its SDP).
        client: SocketAddr,
        /// Edge address+port the client sends to (its SDP was rewritten to this).
        edge_int: SocketAddr,
        /// Public address+port the peer sends to.
        public: SocketAddr,
        /// The peer's media address (from its SDP).
        peer: SocketAddr,
        /// Latch the peer's real source once (opt-in, DESIGN.md §2).
        latch_peer: bool,
        /// Which end's port is learned (TCP active ends).
        learn_port: LearnPort,
    },
    /// The edge is the client's gateway: DNAT in, SNAT out (DESIGN.md §2 nat).
    Nat {
        /// Transport.
        proto: Proto,
        /// The client's media address.
        client: SocketAddr,
        /// Public address+port standing for the client outside.
        public: SocketAddr,
        /// The peer's media address.
        peer: SocketAddr,
        /// Latch the peer's real source once.
        latch_peer: bool,
        /// Which end's port is learned (`Client` is refused in nat mode).
        learn_port: LearnPort,
    },
}

/// Why a flow cannot become rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlowError {
    /// Addresses of one flow mix IPv4 and IPv6 (the datapath never translates families).
    #[error("flow mixes address families: {what}")]
    MixedFamilies {
        /// Which addresses disagree.
        what: &'static str,
    },
    /// Nat mode keys the client's outbound packets on its port, so that
    /// port cannot be learned.
    #[error("nat mode cannot learn the client's port: the SNAT rule is keyed on it")]
    NatClientPort,
    /// A port is zero.
    #[error("port 0 in {what}")]
    ZeroPort {
        /// Which address.
        what: &'static str,
    },
}

/// A rule with its key, ready for the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RulePair {
    /// The rule for packets arriving from outside (its state is `slot_out`).
    pub inbound: (PinholeKey, PinholeRule),
    /// The rule for packets arriving from inside.
    pub outbound: (PinholeKey, PinholeRule),
}

fn key(addr: SocketAddr, proto: Proto, role: u8, match_on: u8) -> PinholeKey {
    let (family, a) = addr_from_ip(addr.ip());
    PinholeKey {
        addr: a,
        port: addr.port().to_be(),
        proto: proto.number(),
        family,
        role,
        match_on,
        _pad: [0; 2],
    }
}

fn a16(addr: SocketAddr) -> [u8; 16] {
    addr_from_ip(addr.ip()).1
}

impl Flow {
    /// Transport of the flow.
    pub fn proto(&self) -> Proto {
        match self {
            Flow::Relay { proto, .. } | Flow::Nat { proto, .. } => *proto,
        }
    }

    /// The edge-owned public address+port of the flow.
    pub fn public(&self) -> SocketAddr {
        match self {
            Flow::Relay { public, .. } | Flow::Nat { public, .. } => *public,
        }
    }

    fn check(&self) -> Result<(), FlowError> {
        let addrs: Vec<(&'static str, SocketAddr)> = match *self {
            Flow::Relay {
                client,
                edge_int,
                public,
                peer,
                ..
            } => {
                vec![
                    ("client", client),
                    ("edge_int", edge_int),
                    ("public", public),
                    ("peer", peer),
                ]
            }
            Flow::Nat {
                client,
                public,
                peer,
                ..
            } => vec![("client", client), ("public", public), ("peer", peer)],
        };
        if let Flow::Nat {
            learn_port: LearnPort::Client,
            ..
        } = self
        {
            return Err(FlowError::NatClientPort);
        }
        for (what, a) in &addrs {
            if a.port() == 0 {
                return Err(FlowError::ZeroPort { what });
            }
        }
        let v4 = addrs[0].1.is_ipv4();
        if let Some((what, _)) = addrs.iter().find(|(_, a)| a.is_ipv4() != v4) {
            return Err(FlowError::MixedFamilies { what });
        }
        Ok(())
    }

    /// The two rules of this flow; `slot_in`/`slot_out` are their PH_STATE slots.
    pub fn rules(&self, slot_in: u32, slot_out: u32) -> Result<RulePair, FlowError> {
        self.check()?;
        Ok(match *self {
            Flow::Relay {
                proto,
                client,
                edge_int,
                public,
                peer,
                latch_peer,
                learn_port,
            } => {
                let peer_learn = learn_port == LearnPort::Peer;
                let client_learn = learn_port == LearnPort::Client;
                let latch = if latch_peer {
                    RULE_LATCH
                } else if peer_learn {
                    RULE_LATCH_PORT
                } else {
                    0
                };
                let follow = if latch_peer || peer_learn {
                    RULE_DST_FOLLOWS_PAIR
                } else {
                    0
                };
                let in_follow = if client_learn {
                    RULE_DST_FOLLOWS_PAIR
                } else {
                    0
                };
                let out_learn = if client_learn { RULE_LATCH_PORT } else { 0 };
                let inbound = PinholeRule {
                    remote_addr: a16(peer),
                    remote_port: peer.port().to_be(),
                    new_src: a16(edge_int),
                    new_src_port: edge_int.port().to_be(),
                    new_dst: a16(client),
                    new_dst_port: client.port().to_be(),
                    flags: RULE_REWRITE_SRC | RULE_REWRITE_DST | latch | in_follow,
                    slot: slot_in,
                    pair_slot: slot_out,
                };
                let outbound = PinholeRule {
                    remote_addr: a16(client),
                    remote_port: client.port().to_be(),
                    new_src: a16(public),
                    new_src_port: public.port().to_be(),
                    new_dst: a16(peer),
                    new_dst_port: peer.port().to_be(),
                    flags: RULE_REWRITE_SRC | RULE_REWRITE_DST | follow | out_learn,
                    slot: slot_out,
                    pair_slot: slot_in,
                };
                RulePair {
                    inbound: (key(public, proto, ROLE_EXTERNAL, MATCH_DST), inbound),
                    outbound: (key(edge_int, proto, ROLE_INTERNAL, MATCH_DST), outbound),
                }
            }
            Flow::Nat {
                proto,
                client,
                public,
                peer,
                latch_peer,
                learn_port,
            } => {
                let peer_learn = learn_port == LearnPort::Peer;
                let latch = if latch_peer {
                    RULE_LATCH
                } else if peer_learn {
                    RULE_LATCH_PORT
                } else {
                    0
                };
                let inbound = PinholeRule {
                    remote_addr: a16(peer),
                    remote_port: peer.port().to_be(),
                    new_dst: a16(client),
                    new_dst_port: client.port().to_be(),
                    flags: RULE_REWRITE_DST | latch,
                    slot: slot_in,
                    pair_slot: slot_out,
                    ..PinholeRule::default()
                };
                // The client keeps sending to the peer's signalled address;
                // with latching that is redirected to the latched one.
                let follow = if latch_peer || peer_learn {
                    RULE_REWRITE_DST | RULE_DST_FOLLOWS_PAIR
                } else {
                    0
                };
                // The client answers the peer's ephemeral port, which only
                // the inbound rule learns: the address stays strict here.
                let any_port = if peer_learn { RULE_ANY_REMOTE_PORT } else { 0 };
                let outbound = PinholeRule {
                    remote_addr: a16(peer),
                    remote_port: peer.port().to_be(),
                    new_src: a16(public),
                    new_src_port: public.port().to_be(),
                    new_dst: a16(peer),
                    new_dst_port: peer.port().to_be(),
                    flags: RULE_REWRITE_SRC | follow | any_port,
                    slot: slot_out,
                    pair_slot: slot_in,
                };
                RulePair {
                    inbound: (key(public, proto, ROLE_EXTERNAL, MATCH_DST), inbound),
                    outbound: (key(client, proto, ROLE_INTERNAL, MATCH_SRC), outbound),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn relay_rules_point_each_leg_at_the_other() {
        let f = Flow::Relay {
            proto: Proto::Udp,
            client: sa("10.77.0.2:4000"),
            edge_int: sa("10.77.0.1:40002"),
            public: sa("203.0.113.1:40000"),
            peer: sa("198.51.100.2:5000"),
            latch_peer: false,
            learn_port: LearnPort::Neither,
        };
        let p = f.rules(3, 4).expect("rules");
        let (k, r) = p.inbound;
        assert_eq!(
            (k.role, k.match_on, u16::from_be(k.port)),
            (ROLE_EXTERNAL, MATCH_DST, 40000)
        );
        assert_eq!(&k.addr[..4], &[203, 0, 113, 1]);
        assert_eq!(&r.remote_addr[..4], &[198, 51, 100, 2]);
        assert_eq!(u16::from_be(r.new_dst_port), 4000);
        assert_eq!(u16::from_be(r.new_src_port), 40002);
        assert_eq!((r.slot, r.pair_slot), (3, 4));
        let (k, r) = p.outbound;
        assert_eq!(
            (k.role, k.match_on, u16::from_be(k.port)),
            (ROLE_INTERNAL, MATCH_DST, 40002)
        );
        assert_eq!(&r.new_dst[..4], &[198, 51, 100, 2]);
        assert_eq!(u16::from_be(r.new_src_port), 40000);
        assert_eq!(r.flags & RULE_DST_FOLLOWS_PAIR, 0);
        assert_eq!((r.slot, r.pair_slot), (4, 3));
    }

    #[test]
    fn nat_outbound_matches_client_source() {
        let f = Flow::Nat {
            proto: Proto::Tcp,
            client: sa("[2001:db8:77::2]:4000"),
            public: sa("[2001:db8:ff::1]:40000"),
            peer: sa("[2001:db8:ff::99]:5000"),
            latch_peer: true,
            learn_port: LearnPort::Neither,
        };
        let p = f.rules(0, 1).expect("rules");
        assert_eq!(p.outbound.0.match_on, MATCH_SRC);
        assert_eq!(p.outbound.0.proto, PROTO_TCP);
        assert_ne!(p.outbound.1.flags & RULE_DST_FOLLOWS_PAIR, 0);
        assert_ne!(p.inbound.1.flags & RULE_LATCH, 0);
        assert_eq!(
            p.inbound.1.flags & RULE_REWRITE_SRC,
            0,
            "nat inbound keeps the peer's source"
        );
    }

    #[test]
    fn mixed_families_and_zero_ports_are_refused() {
        let f = Flow::Nat {
            proto: Proto::Udp,
            client: sa("10.77.0.2:4000"),
            public: sa("[2001:db8:ff::1]:40000"),
            peer: sa("198.51.100.2:5000"),
            latch_peer: false,
            learn_port: LearnPort::Neither,
        };
        assert_eq!(
            f.rules(0, 1),
            Err(FlowError::MixedFamilies { what: "public" })
        );
        let f = Flow::Nat {
            proto: Proto::Udp,
            client: sa("10.77.0.2:0"),
            public: sa("203.0.113.1:40000"),
            peer: sa("198.51.100.2:5000"),
            latch_peer: false,
            learn_port: LearnPort::Neither,
        };
        assert_eq!(f.rules(0, 1), Err(FlowError::ZeroPort { what: "client" }));
    }

    #[test]
    fn tcp_active_peer_learns_only_its_port() {
        let f = Flow::Relay {
            proto: Proto::Tcp,
            client: sa("10.77.0.2:4000"),
            edge_int: sa("10.77.0.1:40002"),
            public: sa("203.0.113.1:40000"),
            peer: sa("198.51.100.2:9"),
            latch_peer: false,
            learn_port: LearnPort::Peer,
        };
        let p = f.rules(0, 1).expect("rules");
        let inbound = p.inbound.1.flags;
        assert_ne!(inbound & RULE_LATCH_PORT, 0, "peer port must be learned");
        assert_eq!(inbound & RULE_LATCH, 0, "the peer address must stay strict");
        assert_ne!(
            p.outbound.1.flags & RULE_DST_FOLLOWS_PAIR,
            0,
            "replies go to the learned port"
        );
        let f = Flow::Relay {
            proto: Proto::Tcp,
            client: sa("10.77.0.2:4000"),
            edge_int: sa("10.77.0.1:40002"),
            public: sa("203.0.113.1:40000"),
            peer: sa("198.51.100.2:5000"),
            latch_peer: false,
            learn_port: LearnPort::Client,
        };
        let p = f.rules(0, 1).expect("rules");
        assert_ne!(p.outbound.1.flags & RULE_LATCH_PORT, 0);
        assert_ne!(p.inbound.1.flags & RULE_DST_FOLLOWS_PAIR, 0);
        let f = Flow::Nat {
            proto: Proto::Tcp,
            client: sa("10.77.0.2:4000"),
            public: sa("203.0.113.1:40000"),
            peer: sa("198.51.100.2:9"),
            latch_peer: false,
            learn_port: LearnPort::Client,
        };
        assert_eq!(f.rules(0, 1), Err(FlowError::NatClientPort));
        let f = Flow::Nat {
            proto: Proto::Tcp,
            client: sa("10.77.0.2:4000"),
            public: sa("203.0.113.1:40000"),
            peer: sa("198.51.100.2:9"),
            latch_peer: false,
            learn_port: LearnPort::Peer,
        };
        let p = f.rules(0, 1).expect("rules");
        assert_ne!(p.outbound.1.flags & RULE_ANY_REMOTE_PORT, 0);
        assert_ne!(p.inbound.1.flags & RULE_LATCH_PORT, 0);
    }
}
