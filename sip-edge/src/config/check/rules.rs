//! Rules between keys that `Config::validate` does not enforce because
//! in-process tests bind loopback listeners on port 0: every listener sits
//! outside the media ranges, inside `[signalling] ports` and on an edge
//! address of the side it serves (never an internal listener on a public
//! or wildcard address: an open relay to the trunk), and no next hop is
//! the edge itself. Pure: reads only the [`Config`].

use std::net::{IpAddr, SocketAddr};

use super::{Finding, Problem};
use crate::{
    config::{Config, ProxySection},
    sip::uri::Host as UriHost,
};

/// Which side a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenSide {
    /// Internal clients.
    Internal,
    /// External peers.
    External,
}

/// One socket the proxy binds.
#[derive(Clone, Copy, Debug)]
pub struct Listener {
    /// Its key under `[proxy]`.
    pub key: &'static str,
    /// Address and port.
    pub addr: SocketAddr,
    /// The side it serves.
    pub side: ListenSide,
    /// TCP (TLS and plain) or UDP.
    pub udp: bool,
}

/// Every listener of `[proxy]`.
pub fn listeners(p: &ProxySection) -> Vec<Listener> {
    let mut v = vec![
        Listener {
            key: "proxy.internal_listen",
            addr: p.internal_listen,
            side: ListenSide::Internal,
            udp: false,
        },
        Listener {
            key: "proxy.external_listen",
            addr: p.external_listen,
            side: ListenSide::External,
            udp: false,
        },
    ];
    if let Some(a) = p.internal_tcp_listen {
        v.push(Listener {
            key: "proxy.internal_tcp_listen",
            addr: a,
            side: ListenSide::Internal,
            udp: false,
        });
    }
    if let Some(a) = p.internal_udp_listen {
        v.push(Listener {
            key: "proxy.internal_udp_listen",
            addr: a,
            side: ListenSide::Internal,
            udp: true,
        });
    }
    v
}

fn canon(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn has(list: &[IpAddr], ip: IpAddr) -> bool {
    list.iter().any(|a| canon(*a) == canon(ip))
}

/// Every rule of this module.
pub fn check(cfg: &Config) -> Vec<Finding> {
    let Some(p) = &cfg.proxy else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let ls = listeners(p);
    for l in &ls {
        check_listener(cfg, l, &mut out);
    }
    // A wildcard socket and a specific one of the same transport on the
    // same port: the second bind fails (EADDRINUSE) once XDP is attached.
    for (i, a) in ls.iter().enumerate() {
        for b in &ls[i + 1..] {
            if a.udp != b.udp || a.addr.port() != b.addr.port() || a.addr.port() == 0 {
                continue;
            }
            let (w, o) = if a.addr.ip().is_unspecified() {
                (a, b)
            } else if b.addr.ip().is_unspecified() {
                (b, a)
            } else {
                continue;
            };
            out.push(Finding::error(
                w.key,
                Problem::WildcardSharesPort {
                    addr: w.addr,
                    other_key: o.key,
                    other: o.addr,
                },
            ));
        }
    }
    check_next_hops(cfg, p, &mut out);
    out
}

fn check_listener(cfg: &Config, l: &Listener, out: &mut Vec<Finding>) {
    let (addr, port) = (l.addr, l.addr.port());
    if port == 0 {
        out.push(Finding::error(l.key, Problem::ListenerPortZero { addr }));
    } else {
        if let Some(r) = cfg.media_ranges().iter().find(|r| r.contains(port)) {
            out.push(Finding::error(
                l.key,
                Problem::ListenerInMediaRange {
                    addr,
                    port,
                    range: format!("{}-{}", r.start, r.end),
                },
            ));
        }
        if !cfg.signalling.ports.contains(&port) {
            out.push(Finding::error(
                l.key,
                Problem::ListenerPortNotPassed {
                    addr,
                    port,
                    ports: cfg.signalling.ports.clone(),
                },
            ));
        }
    }
    let (internal, public) = (&cfg.addresses.internal, &cfg.addresses.public);
    let ip = addr.ip();
    let problem = match l.side {
        ListenSide::Internal if ip.is_unspecified() => Some(Problem::InternalListenerWildcard {
            addr,
            internal: internal.clone(),
        }),
        ListenSide::Internal if has(public, ip) => Some(Problem::InternalListenerOnPublic {
            addr,
            internal: internal.clone(),
        }),
        ListenSide::Internal if !has(internal, ip) => Some(Problem::ListenerNotEdgeAddress {
            addr,
            side: "internal",
            list_key: "addresses.internal",
            have: internal.clone(),
        }),
        ListenSide::External if ip.is_unspecified() => {
            out.push(Finding::warning(
                l.key,
                Problem::ExternalListenerWildcard {
                    addr,
                    public: public.clone(),
                },
            ));
            None
        }
        ListenSide::External if has(internal, ip) => Some(Problem::ExternalListenerOnInternal {
            addr,
            public: public.clone(),
        }),
        ListenSide::External if !has(public, ip) => Some(Problem::ListenerNotEdgeAddress {
            addr,
            side: "public",
            list_key: "addresses.public",
            have: public.clone(),
        }),
        _ => None,
    };
    if let Some(problem) = problem {
        out.push(Finding::error(l.key, problem));
    }
}

/// Every next hop with its key: routes, the internal next hop, the
/// default route.
pub fn next_hops(cfg: &Config) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = cfg
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("route[{i}].host"), r.host.clone()))
        .collect();
    if let Some(p) = &cfg.proxy {
        v.extend(
            p.internal_next_hop
                .iter()
                .map(|h| ("proxy.internal_next_hop.host".to_owned(), h.host.clone())),
        );
        v.extend(
            p.default_route
                .iter()
                .map(|h| ("proxy.default_route.host".to_owned(), h.host.clone())),
        );
    }
    v
}

fn check_next_hops(cfg: &Config, p: &ProxySection, out: &mut Vec<Finding>) {
    let advertised: Vec<String> = [&p.internal_advertise, &p.external_advertise]
        .into_iter()
        .flatten()
        .map(|a| a.to_ascii_lowercase())
        .collect();
    for (key, host) in next_hops(cfg) {
        let why = match UriHost::parse(&host) {
            Some(UriHost::Ip(ip)) => {
                let ip = canon(ip);
                if ip.is_loopback() || ip.is_unspecified() {
                    Some("a loopback or unspecified address, this host".to_owned())
                } else if has(&cfg.addresses.internal, ip) {
                    Some("one of the edge's own addresses (addresses.internal)".to_owned())
                } else if has(&cfg.addresses.public, ip) {
                    Some("one of the edge's own addresses (addresses.public)".to_owned())
                } else {
                    None
                }
            }
            Some(UriHost::Name(n)) => {
                let n = n.to_ascii_lowercase();
                if n == "localhost" || n.ends_with(".localhost") {
                    Some("this host (localhost)".to_owned())
                } else if advertised.contains(&n) {
                    Some("the name the edge advertises for itself (proxy.*_advertise)".to_owned())
                } else {
                    None
                }
            }
            None => None,
        };
        if let Some(why) = why {
            out.push(Finding::error(key, Problem::NextHopIsEdge { host, why }));
        }
    }
}
