//! Outgoing TCP connections of the edge: which local address a connection
//! toward a next hop leaves from, and the connect itself. Inputs are the
//! `[proxy]` config (`internal_source_address` / `external_source_address`,
//! the listeners) and `[addresses]`; the output is a connected
//! `TcpStream` for `spawn_connect`, which puts TLS on it.
//!
//! Why bind at all: the kernel picks the source of an unbound connection
//! from the route, which on a multi-homed edge need not be the address Via
//! and Record-Route name (RFC 3261 §18.2.1 makes the next hop answer to
//! them). A carrier that allow-lists the edge's public address refuses the
//! others. So a connection leaves from the edge's address on the side it
//! goes to: the configured source, else the side's listener address, else
//! the side's first `[addresses]` entry of the destination's family.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, warn};

use crate::{config::Config, media::Side};

/// Why an outgoing connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The next hop's name did not resolve.
    #[error(
        "cannot resolve {host}: {source}; check the [[route]] / next-hop host and the resolver"
    )]
    Resolve {
        /// The host.
        host: String,
        /// The resolver error.
        #[source]
        source: io::Error,
    },
    /// The name resolved to no address.
    #[error("{host} resolves to no address")]
    NoAddress {
        /// The host.
        host: String,
    },
    /// The socket could not be created.
    #[error("cannot create a socket toward {dest}: {source}")]
    Socket {
        /// Destination.
        dest: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket could not be bound to the side's source address.
    #[error("cannot bind the connection toward {dest} to source {source_ip}: {source}; is {source_ip} configured on this host? Set proxy.{key} to an address of this host")]
    Bind {
        /// Destination.
        dest: SocketAddr,
        /// The source address.
        source_ip: IpAddr,
        /// The config key that sets it.
        key: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Every resolved address refused or failed (the last error).
    #[error("connect to {dest}: {source}")]
    Connect {
        /// The last address tried.
        dest: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The source addresses of one side, per family; `None` = the kernel picks
/// (no edge address of that family is known for the side).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SideSources {
    /// For IPv4 destinations.
    pub v4: Option<IpAddr>,
    /// For IPv6 destinations.
    pub v6: Option<IpAddr>,
}

impl SideSources {
    /// The sources of a side: per family, the configured source address,
    /// else the listener's address (unless it is the wildcard), else the
    /// first of the side's `[addresses]` list.
    pub fn pick(configured: Option<IpAddr>, listen: IpAddr, addresses: &[IpAddr]) -> SideSources {
        let listen = (!listen.is_unspecified()).then_some(listen);
        let first = |v4: bool| {
            [configured, listen]
                .into_iter()
                .flatten()
                .chain(addresses.iter().copied())
                .find(|a| a.is_ipv4() == v4)
        };
        SideSources {
            v4: first(true),
            v6: first(false),
        }
    }

    /// The source for a connection to `dest`.
    pub fn for_dest(&self, dest: IpAddr) -> Option<IpAddr> {
        if dest.is_ipv4() {
            self.v4
        } else {
            self.v6
        }
    }
}

/// Source addresses of both sides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// Toward internal next hops.
    pub internal: SideSources,
    /// Toward external next hops.
    pub external: SideSources,
}

impl Sources {
    /// From the config (`[proxy]` must be present; without it, none).
    pub fn from_config(cfg: &Config) -> Sources {
        let Some(p) = cfg.proxy.as_ref() else {
            return Sources::default();
        };
        Sources {
            internal: SideSources::pick(
                p.internal_source_address,
                p.internal_listen.ip(),
                &cfg.addresses.internal,
            ),
            external: SideSources::pick(
                p.external_source_address,
                p.external_listen.ip(),
                &cfg.addresses.public,
            ),
        }
    }

    /// The sources of `side`.
    pub fn side(&self, side: Side) -> &SideSources {
        match side {
            Side::Internal => &self.internal,
            Side::External => &self.external,
        }
    }
}

/// The config key that sets `side`'s source address (for error messages).
pub fn key_of(side: Side) -> &'static str {
    match side {
        Side::Internal => "internal_source_address",
        Side::External => "external_source_address",
    }
}

/// A socket for `dest`, bound to `source` (port 0: the kernel picks the
/// port, outside `ip_local_reserved_ports`, so never a media port).
fn bound_socket(
    dest: SocketAddr,
    source: Option<IpAddr>,
    key: &'static str,
) -> Result<TcpSocket, ConnectError> {
    let sock = if dest.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|source| ConnectError::Socket { dest, source })?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))
            .map_err(|source| ConnectError::Bind {
                dest,
                source_ip: ip,
                key,
                source,
            })?;
    }
    Ok(sock)
}

/// Checks at start-up that every source can be bound. A configured
/// `*_source_address` that cannot fails the start with the key to fix (not
/// every call later); a source merely derived from `[addresses]` that is
/// not on this host (say, a public address the edge reaches through 1:1
/// NAT) is dropped with a warning and the kernel picks.
pub fn verify(mut sources: Sources, cfg: &Config) -> Result<Sources, ConnectError> {
    let configured = |side| {
        cfg.proxy.as_ref().and_then(|p| match side {
            Side::Internal => p.internal_source_address,
            Side::External => p.external_source_address,
        })
    };
    for side in [Side::Internal, Side::External] {
        let s = match side {
            Side::Internal => &mut sources.internal,
            Side::External => &mut sources.external,
        };
        // Documentation-range destinations: only the family matters.
        let probes = [
            (&mut s.v4, SocketAddr::from(([192, 0, 2, 1], 5061))),
            (
                &mut s.v6,
                SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 5061)),
            ),
        ];
        for (slot, dest) in probes {
            let Some(ip) = *slot else { continue };
            if let Err(e) = bound_socket(dest, Some(ip), key_of(side)) {
                if configured(side) == Some(ip) {
                    return Err(e);
                }
                warn!(error = %e, ?side, "edge address unusable as a source; the kernel picks");
                *slot = None;
            }
        }
    }
    Ok(sources)
}

/// Connects to `host:port` from `side`'s source address: every resolved
/// address in turn until one connects.
pub async fn connect(
    host: &str,
    port: u16,
    side: Side,
    sources: &Sources,
) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ConnectError::Resolve {
            host: host.to_owned(),
            source,
        })?
        .collect();
    let mut last = None;
    for dest in addrs {
        let source = sources.side(side).for_dest(dest.ip());
        if source.is_none() {
            debug!(%dest, ?side, "no edge address of this family on the side; the kernel picks the source");
        }
        let sock = bound_socket(dest, source, key_of(side))?;
        match sock.connect(dest).await {
            Ok(s) => return Ok(s),
            Err(source) => last = Some(ConnectError::Connect { dest, source }),
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::NoAddress {
        host: host.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_follow_config_then_listener_then_addresses() {
        let public = [ip("203.0.113.1"), ip("2001:db8::1")];
        // The listener's address by default, the other family from [addresses].
        let s = SideSources::pick(None, ip("203.0.113.9"), &public);
        assert_eq!(s.v4, Some(ip("203.0.113.9")));
        assert_eq!(s.v6, Some(ip("2001:db8::1")));
        // A configured source wins for its family.
        let s = SideSources::pick(Some(ip("203.0.113.7")), ip("203.0.113.9"), &public);
        assert_eq!(s.for_dest(ip("198.51.100.2")), Some(ip("203.0.113.7")));
        // A wildcard listener says nothing: [addresses] decides.
        let s = SideSources::pick(None, ip("0.0.0.0"), &public);
        assert_eq!(s.v4, Some(ip("203.0.113.1")));
        // No address of a family: the kernel picks.
        let s = SideSources::pick(None, ip("0.0.0.0"), &[ip("203.0.113.1")]);
        assert_eq!(s.for_dest(ip("2001:db8::5")), None);
    }

    #[test]
    fn a_configured_source_not_on_this_host_fails_the_start_with_the_key() {
        if std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind")
            .is_ok_and(|v| v.trim() != "0")
        {
            eprintln!("skipped: net.ipv4.ip_nonlocal_bind is on, any address binds");
            return;
        }
        let base = |extra: &str| {
            Config::from_toml(&format!(
                r#"
                [[interface]]
                name = "int0"
                role = "internal"
                [addresses]
                internal = ["10.77.0.1"]
                public = ["198.51.100.250"]
                [media]
                port_ranges = ["40000-40999"]
                [proxy]
                internal_listen = "127.0.0.1:5061"
                external_listen = "0.0.0.0:5062"
                cert = "/x.pem"
                key = "/x.key"
                ca_roots = "/ca.pem"
                {extra}
                "#
            ))
            .unwrap()
        };
        // Derived from [addresses] (TEST-NET-2, never on a test host): dropped.
        let cfg = base("");
        let s = verify(Sources::from_config(&cfg), &cfg).unwrap();
        assert_eq!(s.external.v4, None);
        assert_eq!(s.internal.v4, Some(ip("127.0.0.1")));
        // Configured: the start fails and names the key.
        let cfg = base("external_source_address = \"198.51.100.250\"");
        let e = verify(Sources::from_config(&cfg), &cfg)
            .expect_err("not a local address")
            .to_string();
        assert!(e.contains("external_source_address"), "{e}");
    }
}
