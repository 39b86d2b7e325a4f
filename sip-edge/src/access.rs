//! The configuration of outside access: `[access]` (the domains this edge
//! serves and remote users registering through it) and `[[peer]]` (trusted
//! carrier trunks and federation partners). Parsed with the rest of the
//! file by `config`, validated here (called from `Config::validate`), and
//! turned into the proxy's runtime rules (`proxy::access`) by
//! [`settings`].

use std::net::IpAddr;

use serde::Deserialize;

use crate::{
    config::{invalid, parse_cidr, ClientAuth, Config, ConfigError, NextHop},
    media::FarMedia,
    proxy::{
        access::{AccessSettings, PeerPolicy},
        HopTarget,
    },
    sip::uri::Host,
};

/// `[access]`: see the example configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccessSection {
    /// Domains this edge serves, exact or `*.suffix`: remote users register
    /// for them, and requests from outside for any other domain are
    /// refused 404.
    pub served_domains: Vec<String>,
    /// Whether clients outside may register through the edge.
    #[serde(default = "yes")]
    pub remote_users: bool,
    /// The inside registrar; defaults to `[proxy] internal_next_hop`.
    #[serde(default)]
    pub registrar: Option<NextHop>,
    /// Most remote-user registrations held at once; more are refused 503.
    #[serde(default = "default_max_remote_registrations")]
    pub max_remote_registrations: usize,
}

fn yes() -> bool {
    true
}

fn default_max_remote_registrations() -> usize {
    10_000
}

fn default_sips_port() -> u16 {
    5061
}

/// How a peer's media source is learned (DESIGN.md §2).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PeerLatch {
    /// Only what signalling named.
    Off,
    /// The named address; the port learned once.
    Port,
    /// Address and port learned once from the first packet.
    Full,
}

/// `[[peer]]`: one trusted outside party.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    /// Name (logs).
    pub name: String,
    /// Addresses or CIDRs it signals from.
    pub addresses: Vec<String>,
    /// A name its TLS client certificate must be valid for (mTLS; needs
    /// `[proxy] external_client_auth` `"optional"` or `"required"`).
    #[serde(default)]
    pub tls_identity: Option<String>,
    /// Host the edge connects to for its `domains`.
    #[serde(default)]
    pub host: Option<String>,
    /// Port (TLS).
    #[serde(default = "default_sips_port")]
    pub port: u16,
    /// Name its server certificate must carry; defaults to `host`.
    #[serde(default)]
    pub tls_name: Option<String>,
    /// Request-URI domains routed to it from inside (exact or `*.suffix`).
    #[serde(default)]
    pub domains: Vec<String>,
    /// Networks it may receive media at besides its signalling source.
    #[serde(default)]
    pub media_sources: Vec<String>,
    /// Latching of its media source; absent: `[media] latch`.
    #[serde(default)]
    pub latch: Option<PeerLatch>,
    /// Requests per second accepted from it (503 beyond); 0 = no limit.
    #[serde(default)]
    pub max_requests_per_sec: u32,
}

impl PeerSection {
    fn hop(&self) -> Option<NextHop> {
        self.host.as_ref().map(|h| NextHop {
            host: h.clone(),
            port: self.port,
            tls_name: self.tls_name.clone(),
        })
    }
}

fn domain_ok(d: &str) -> bool {
    let d = d.to_ascii_lowercase();
    Host::parse(d.strip_prefix("*.").unwrap_or(&d)).is_some()
}

/// Every rule of `[access]` and `[[peer]]` types cannot express.
pub fn validate(cfg: &Config) -> Result<(), ConfigError> {
    if cfg.proxy.is_none() && (cfg.access.is_some() || !cfg.peers.is_empty()) {
        return Err(invalid(
            "access",
            "[access] and [[peer]] need a [proxy] section",
        ));
    }
    let Some(proxy) = cfg.proxy.as_ref() else {
        return Ok(());
    };
    if let Some(a) = &cfg.access {
        if a.served_domains.is_empty() {
            return Err(invalid(
                "access.served_domains",
                "list at least one domain this edge serves, e.g. [\"example.com\"]",
            ));
        }
        for (i, d) in a.served_domains.iter().enumerate() {
            if !domain_ok(d) {
                return Err(invalid(
                    format!("access.served_domains[{i}]"),
                    format!("{d:?} is not a domain (use \"example.com\" or \"*.example.com\")"),
                ));
            }
        }
        if a.remote_users && a.registrar.is_none() && proxy.internal_next_hop.is_none() {
            return Err(invalid(
                "access.registrar",
                "remote users need a registrar: set access.registrar or proxy.internal_next_hop",
            ));
        }
        if let Some(r) = &a.registrar {
            if Host::parse(&r.host).is_none() || r.port == 0 {
                return Err(invalid(
                    "access.registrar",
                    format!("{}:{} is not a host and port", r.host, r.port),
                ));
            }
        }
        if a.max_remote_registrations == 0 {
            return Err(invalid(
                "access.max_remote_registrations",
                "must be at least 1",
            ));
        }
    }
    let mut names = std::collections::HashSet::new();
    let mut domains: std::collections::HashSet<String> = cfg
        .routes
        .iter()
        .map(|r| r.domain.to_ascii_lowercase())
        .collect();
    for (i, p) in cfg.peers.iter().enumerate() {
        let at = |k: &str| format!("peer[{i}].{k}");
        if p.name.trim().is_empty() || !names.insert(p.name.as_str()) {
            return Err(invalid(
                at("name"),
                format!("{:?} is empty or used twice", p.name),
            ));
        }
        if p.addresses.is_empty() {
            return Err(invalid(
                at("addresses"),
                "list the addresses or CIDRs the peer signals from",
            ));
        }
        for (j, a) in p.addresses.iter().enumerate() {
            parse_cidr(a).map_err(|reason| invalid(format!("peer[{i}].addresses[{j}]"), reason))?;
        }
        if p.tls_identity.is_some() && proxy.external_client_auth == ClientAuth::None {
            return Err(invalid(
                at("tls_identity"),
                "needs proxy.external_client_auth = \"optional\" or \"required\" (no client certificate is asked for)",
            ));
        }
        if let Some(h) = &p.host {
            if Host::parse(h).is_none() || p.port == 0 {
                return Err(invalid(
                    at("host"),
                    format!("{h}:{} is not a host and port", p.port),
                ));
            }
        }
        if !p.domains.is_empty() && p.host.is_none() {
            return Err(invalid(
                at("host"),
                "a peer with domains needs the host to send their requests to",
            ));
        }
        for (j, d) in p.domains.iter().enumerate() {
            if !domain_ok(d) {
                return Err(invalid(
                    format!("peer[{i}].domains[{j}]"),
                    format!("{d:?} is not a domain"),
                ));
            }
            if !domains.insert(d.to_ascii_lowercase()) {
                return Err(invalid(
                    format!("peer[{i}].domains[{j}]"),
                    format!("{d:?} is routed twice ([[route]] or another [[peer]])"),
                ));
            }
        }
        cfg.validate_media_sources(&at("media_sources"), &p.media_sources)?;
    }
    Ok(())
}

/// The proxy's runtime access rules from a validated configuration.
pub fn settings(cfg: &Config) -> AccessSettings {
    let internal_hop = cfg
        .proxy
        .as_ref()
        .and_then(|p| p.internal_next_hop.as_ref());
    let peers = cfg
        .peers
        .iter()
        .map(|p| PeerPolicy {
            name: p.name.clone(),
            addresses: p
                .addresses
                .iter()
                .filter_map(|a| parse_cidr(a).ok())
                .collect(),
            tls_identity: p.tls_identity.clone(),
            hop: p.hop().as_ref().map(HopTarget::from),
            domains: p.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
            media_sources: p
                .media_sources
                .iter()
                .filter_map(|s| parse_cidr(s).ok())
                .collect(),
            far_media: match p.latch {
                None => FarMedia::Config,
                Some(PeerLatch::Off) => FarMedia::Strict,
                Some(PeerLatch::Port) => FarMedia::LatchPort,
                Some(PeerLatch::Full) => FarMedia::Latch,
            },
            max_requests_per_sec: p.max_requests_per_sec,
        })
        .collect();
    match &cfg.access {
        Some(a) => AccessSettings {
            enforce: true,
            served_domains: a
                .served_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            remote_users: a.remote_users,
            registrar: a.registrar.as_ref().or(internal_hop).map(HopTarget::from),
            max_remote_registrations: a.max_remote_registrations,
            peers,
        },
        None => AccessSettings {
            enforce: !cfg.peers.is_empty(),
            served_domains: Vec::new(),
            remote_users: false,
            registrar: None,
            max_remote_registrations: 0,
            peers,
        },
    }
}

/// Whether `ip` is inside one of `peer`'s signalling networks (used by
/// tests and diagnostics).
pub fn peer_has(peer: &PeerSection, ip: IpAddr) -> bool {
    peer.addresses
        .iter()
        .filter_map(|a| parse_cidr(a).ok())
        .any(|c| c.contains(ip.to_canonical()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [[interface]]
        name = "int0"
        role = "internal"
        [addresses]
        internal = ["10.77.0.1"]
        public = ["203.0.113.1"]
        [media]
        port_ranges = ["40000-40999"]
        allowed_internal_subnets = ["10.77.0.0/24"]
        [proxy]
        internal_listen = "10.77.0.1:5061"
        external_listen = "203.0.113.1:5061"
        cert = "/c.pem"
        key = "/k.pem"
        ca_roots = "/ca.pem"
        internal_next_hop = { host = "10.77.0.10" }
    "#;

    fn err(extra: &str) -> String {
        match Config::from_toml(&format!("{BASE}{extra}")) {
            Ok(_) => panic!("accepted: {extra}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn access_and_peers_parse_with_defaults() {
        let c = Config::from_toml(&format!(
            "{BASE}
            [access]
            served_domains = [\"Example.com\"]
            [[peer]]
            name = \"carrier\"
            addresses = [\"198.51.100.0/28\"]
            host = \"198.51.100.2\"
            domains = [\"pstn.example\"]
            media_sources = [\"198.51.100.128/25\"]
            latch = \"port\"
            max_requests_per_sec = 50
            "
        ))
        .expect("valid");
        let s = settings(&c);
        assert!(s.enforce && s.remote_users);
        assert_eq!(s.served_domains, vec!["example.com"]);
        assert_eq!(
            s.registrar.as_ref().map(|h| h.host.as_str()),
            Some("10.77.0.10")
        );
        assert_eq!(s.max_remote_registrations, 10_000);
        assert_eq!(s.peers[0].far_media, FarMedia::LatchPort);
        assert_eq!(s.peers[0].hop.as_ref().map(|h| h.port), Some(5061));
        assert!(peer_has(
            &c.peers[0],
            "::ffff:198.51.100.3".parse().unwrap()
        ));
        // No [access], no [[peer]]: nothing enforced (the earlier behaviour).
        let open = settings(&Config::from_toml(BASE).expect("valid"));
        assert!(!open.enforce);
    }

    #[test]
    fn bad_access_and_peer_keys_are_rejected() {
        for (extra, want) in [
            ("[access]\nserved_domains = []", "served_domains"),
            ("[access]\nserved_domains = [\"bad domain\"]", "served_domains[0]"),
            ("[access]\nserved_domains = [\"e.com\"]\nmax_remote_registrations = 0", "max_remote"),
            ("[[peer]]\nname = \"p\"\naddresses = []", "addresses"),
            ("[[peer]]\nname = \"p\"\naddresses = [\"198.51.100.1/24\"]", "host bits"),
            (
                "[[peer]]\nname = \"p\"\naddresses = [\"198.51.100.1\"]\ntls_identity = \"p.example\"",
                "external_client_auth",
            ),
            ("[[peer]]\nname = \"p\"\naddresses = [\"198.51.100.1\"]\ndomains = [\"x.example\"]", "needs the host"),
            (
                "[[peer]]\nname = \"p\"\naddresses = [\"198.51.100.1\"]\nmedia_sources = [\"10.77.0.0/25\"]",
                "internal subnet",
            ),
            (
                "[[peer]]\nname = \"p\"\naddresses = [\"198.51.100.1\"]\n[[peer]]\nname = \"p\"\naddresses = [\"198.51.100.2\"]",
                "used twice",
            ),
            ("[[peer]]\nname = \"p\"\naddresses = [\"198.51.100.1\"]\nlatch = \"sometimes\"", "latch"),
        ] {
            let e = err(extra);
            assert!(e.contains(want), "{extra}: {e}");
        }
        let no_registrar = BASE.replace("internal_next_hop = { host = \"10.77.0.10\" }", "");
        let e = Config::from_toml(&format!(
            "{no_registrar}[access]\nserved_domains = [\"e.com\"]"
        ))
        .expect_err("no registrar")
        .to_string();
        assert!(e.contains("registrar"), "{e}");
    }
}
