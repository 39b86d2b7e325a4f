//! Transaction-stateful SIP proxy core (RFC 3261 §16/§17), sans-IO: the
//! transport (`crate::transport`) feeds it framed messages with the
//! connection they came on, connection events and a clock; it returns the
//! messages to send (to a connection or to a next hop the transport opens).
//! SDP bodies go through [`crate::media::MediaControl`] before they leave.
//!
//! Data flow: transport → [`Proxy::on_message`] → (validate, route,
//! rewrite Via/Record-Route/Contact/Path, SDP via `MediaControl`) →
//! [`Outgoing`] → transport → TLS writer.
//!
//! Contact/Path design (documented choice): every Contact crossing the edge
//! is replaced by `sip(s):TOKEN@EDGE_ADDR_OF_THE_RECEIVING_SIDE` (see
//! [`bindings`]); the token maps back to the original URI and the
//! connection it came from, so requests for an internal client reuse its
//! own connection (RFC 5626 flow reuse) and neither side ever sees the
//! other side's Contact addresses. The edge also double-Record-Routes
//! dialog-creating requests (RFC 5658: the top entry carries the edge's
//! address on the outgoing side, the second its address on the incoming
//! side) so in-dialog requests come back through it, and a REGISTER from
//! inside gets a `Path` with a flow token (RFC 3327) so a registrar that
//! honours Path routes inbound requests to the client's flow. Record-Route
//! entries of other proxies pass unchanged (topology hiding is not a goal).

pub mod access;
pub mod admission;
pub mod bindings;
pub mod build;
mod core;
pub mod tokens;

use std::net::SocketAddr;

pub use self::core::{Proxy, ProxyStats};
use crate::{
    config::{Cidr, Config, NextHop},
    media::Side,
    sip::uri::Host,
};

/// Identifies one connection of the transport.
pub type ConnId = u64;

/// Transport protocol of a connection (written into our Via, §18.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TLS over TCP.
    Tls,
    /// Plain TCP (legacy internal clients only).
    Tcp,
    /// UDP (legacy internal clients only): each remote address is a
    /// pseudo-connection of the transport; requests toward it are
    /// retransmitted by the core (RFC 3261 §17.1.1.2, §17.1.2.2).
    Udp,
}

impl Proto {
    /// The Via transport token.
    pub fn via_token(self) -> &'static str {
        match self {
            Proto::Tls => "TLS",
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }

    /// Whether the transport may lose messages, so client transactions
    /// retransmit (RFC 3261 §17.1.1.2 Timer A, §17.1.2.2 Timer E).
    pub fn unreliable(self) -> bool {
        self == Proto::Udp
    }
}

/// What the core knows about a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Side of the edge the peer is on.
    pub side: Side,
    /// The peer's transport address (the signalling source).
    pub peer: SocketAddr,
    /// TLS, TCP or UDP.
    pub proto: Proto,
}

/// A next hop the transport must reach over TLS (opened or reused).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HopTarget {
    /// Host to connect to.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Name verified in the server certificate.
    pub tls_name: String,
}

impl From<&NextHop> for HopTarget {
    fn from(h: &NextHop) -> Self {
        HopTarget {
            host: h.host.clone(),
            port: h.port,
            tls_name: h.server_name().to_owned(),
        }
    }
}

/// Where an outgoing message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// Over an existing connection.
    Conn(ConnId),
    /// To a next hop on `side` (connection reused or opened by the transport).
    Hop {
        /// Side of the edge the hop is on.
        side: Side,
        /// The hop.
        hop: HopTarget,
    },
}

/// One message to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Where.
    pub dest: Dest,
    /// Wire bytes.
    pub bytes: Vec<u8>,
    /// The client-transaction key when this is a request the edge sends
    /// statefully, so the transport can report [`Proxy::on_sent`] or
    /// [`Proxy::on_unreachable`] for it without a search.
    pub client_tx: Option<String>,
}

/// The edge's own address on one side: written into Via, Record-Route,
/// Path and rewritten Contacts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAddr {
    /// Host (IP literal or name).
    pub host: Host,
    /// TLS listener port.
    pub port: u16,
}

/// One `[[route]]`'s `media_sources` and how its far party is recognised:
/// a connection the edge opened to the route's next hop, or one whose peer
/// address is the route's `host` when that is an IP literal (the carrier
/// connecting in). `[[peer]]` entries carry their own (`access::PeerPolicy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMedia {
    /// The route's next hop.
    pub hop: HopTarget,
    /// The next hop's address, when `host` is an IP literal.
    pub host_ip: Option<std::net::IpAddr>,
    /// Extra addresses the far party may receive media at.
    pub sources: Vec<Cidr>,
}

/// Static settings of the core.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// Edge address on the internal side.
    pub internal: LocalAddr,
    /// Edge address on the external side.
    pub external: LocalAddr,
    /// `[[route]]`: (lower-cased domain or `*.suffix`, hop).
    pub routes: Vec<(String, HopTarget)>,
    /// Route for requests from inside that match no domain.
    pub default_route: Option<HopTarget>,
    /// Where requests from outside go unless for a registered client.
    pub internal_next_hop: Option<HopTarget>,
    /// Routes with `media_sources` (DESIGN.md §3): how a far party's
    /// connection is recognised as belonging to one, and its extra media
    /// addresses, handed to the media layer with each SDP from outside.
    pub route_media: Vec<RouteMedia>,
    /// Who may use the edge from outside: served domains, remote users,
    /// trusted peers (`[access]`, `[[peer]]`; `proxy::access`).
    pub access: access::AccessSettings,
    /// Port of the internal UDP listener, if any: our Via and
    /// Record-Route toward UDP clients carry it (they send in-dialog
    /// requests there, §18.1.1), and Route entries with it name us.
    pub internal_udp_port: Option<u16>,
    /// How long the proxy keeps a dialog record at most: the media layer's
    /// maximum call length (`[media] max_call_secs`). The media layer
    /// expires every dialog it holds media for, but a dialog without media
    /// (no SDP, every stream disabled) has only this bound.
    pub max_dialog: std::time::Duration,
    /// How long a 2xx to an INVITE waits for its ACK before the call is
    /// ended both ways (`[proxy] ack_timeout_secs`).
    pub ack_timeout: std::time::Duration,
    /// Timer C (`[proxy] timer_c_secs`).
    pub timer_c: std::time::Duration,
}

impl ProxySettings {
    /// Settings from the config, with the listeners' actual ports (a
    /// configured port 0 is only known after binding).
    pub fn from_config(
        cfg: &Config,
        internal_port: u16,
        external_port: u16,
    ) -> Option<ProxySettings> {
        let p = cfg.proxy.as_ref()?;
        let access = crate::access::settings(cfg);
        let host = |adv: &Option<String>, listen: SocketAddr| {
            adv.as_deref()
                .and_then(Host::parse)
                .unwrap_or(Host::Ip(listen.ip()))
        };
        Some(ProxySettings {
            internal: LocalAddr {
                host: host(&p.internal_advertise, p.internal_listen),
                port: internal_port,
            },
            external: LocalAddr {
                host: host(&p.external_advertise, p.external_listen),
                port: external_port,
            },
            routes: cfg
                .routes
                .iter()
                .map(|r| {
                    (
                        r.domain.to_ascii_lowercase(),
                        HopTarget::from(&r.next_hop()),
                    )
                })
                .chain(access.peers.iter().flat_map(|p| {
                    // A peer's domains route to it like a [[route]].
                    p.hop
                        .iter()
                        .flat_map(move |h| p.domains.iter().map(move |d| (d.clone(), h.clone())))
                }))
                .collect(),
            route_media: cfg
                .routes
                .iter()
                .filter(|r| !r.media_sources.is_empty())
                .map(|r| RouteMedia {
                    hop: HopTarget::from(&r.next_hop()),
                    host_ip: r.host.parse().ok(),
                    sources: r.media_sources(),
                })
                .collect(),
            default_route: p.default_route.as_ref().map(HopTarget::from),
            internal_next_hop: p.internal_next_hop.as_ref().map(HopTarget::from),
            access,
            // Known only once bound: the transport fills it in.
            internal_udp_port: None,
            max_dialog: std::time::Duration::from_secs(cfg.media.max_call_secs),
            ack_timeout: std::time::Duration::from_secs(p.ack_timeout_secs),
            timer_c: std::time::Duration::from_secs(p.timer_c_secs),
        })
    }

    /// The edge's address on `side`.
    pub fn local(&self, side: Side) -> &LocalAddr {
        match side {
            Side::Internal => &self.internal,
            Side::External => &self.external,
        }
    }

    /// The port the edge listens on for `proto` on `side` (plain TCP shares
    /// the TLS port in what we write, as before; UDP has its own).
    pub fn port_for(&self, side: Side, proto: Proto) -> u16 {
        match (side, proto, self.internal_udp_port) {
            (Side::Internal, Proto::Udp, Some(p)) => p,
            _ => self.local(side).port,
        }
    }

    /// The outbound route for a Request-URI host (exact domain first, then
    /// the longest `*.suffix`, then the default).
    pub fn route_for(&self, host: &str) -> Option<&HopTarget> {
        let host = host.to_ascii_lowercase();
        if let Some((_, h)) = self.routes.iter().find(|(d, _)| *d == host) {
            return Some(h);
        }
        self.routes
            .iter()
            .filter_map(|(d, h)| {
                let suffix = d.strip_prefix("*.")?;
                let matches = host.len() > suffix.len()
                    && host.ends_with(suffix)
                    && host.as_bytes().get(host.len() - suffix.len() - 1) == Some(&b'.');
                matches.then_some((suffix.len(), h))
            })
            .max_by_key(|(n, _)| *n)
            .map(|(_, h)| h)
            .or(self.default_route.as_ref())
    }
}
