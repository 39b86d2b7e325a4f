//! Agent configuration: parsed from TOML (unknown keys rejected) and
//! validated in full before anything is loaded, attached or bound. `main.rs`
//! exits with code 64 (EX_USAGE) on any error from here.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub mod check;
pub mod forms;

/// Default directory for pinned maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sip-edge";

/// Errors of reading or validating a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type).
    #[error("invalid config {path}: {source}{hint}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error (carries line and column; boxed to keep
        /// `Result<_, ConfigError>` small).
        #[source]
        source: Box<toml::de::Error>,
        /// "did you mean" for an unknown key or value, or empty
        /// (`forms::hint`).
        hint: String,
    },
    /// A value parsed but breaks a rule; `field` names it as in the file.
    #[error("invalid config: {field}: {reason}")]
    Invalid {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
}

pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver (native) mode: the fast one; veth, most NIC drivers.
    #[default]
    Native,
    /// Generic (skb) mode: works everywhere, after skb allocation.
    Skb,
}

/// What an interface faces.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The clients' side.
    Internal,
    /// The outside world.
    External,
}

impl Role {
    /// The datapath's role code.
    pub fn code(self) -> u8 {
        match self {
            Role::Internal => sip_edge_common::ROLE_INTERNAL,
            Role::External => sip_edge_common::ROLE_EXTERNAL,
        }
    }
}

/// Traffic that is neither a pinhole hit nor aimed at a media port.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    /// Let the kernel handle it (the edge is not the only firewall).
    #[default]
    Pass,
    /// Drop it unless it is aimed at a signalling/admin port of the edge.
    Drop,
}

/// What happens to the datapath when the agent exits.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Leave program, links and maps pinned: established media keeps
    /// flowing while the agent restarts, and the next start re-adopts them.
    #[default]
    Keep,
    /// Detach the program and remove every pin.
    Remove,
}

/// Media anchoring mode (DESIGN.md §2).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MediaMode {
    /// Both legs anchored at edge addresses.
    #[default]
    Relay,
    /// The edge is the gateway: DNAT inbound, SNAT outbound.
    Nat,
}

/// `[[interface]]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Kernel interface name.
    pub name: String,
    /// Which side it faces.
    pub role: Role,
}

/// `[xdp]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct XdpSection {
    /// Attach mode.
    #[serde(default)]
    pub mode: XdpMode,
}

/// `[addresses]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Addresses {
    /// The edge's addresses on the internal side.
    #[serde(deserialize_with = "forms::ip_list")]
    pub internal: Vec<IpAddr>,
    /// The edge's public addresses (outside).
    #[serde(deserialize_with = "forms::ip_list")]
    pub public: Vec<IpAddr>,
}

/// What happens to ICE candidates in SDP leaving the inside (RFC 8839);
/// maps onto `sip::sdp::CandidatePolicy`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MediaCandidates {
    /// Leave every candidate alone (leaks private host candidates).
    Keep,
    /// Drop private host candidates.
    RemovePrivateHost,
    /// Replace the first private host candidate per component with the edge
    /// address:port, drop the others (no ICE mismatch).
    #[default]
    ReplacePrivateHost,
    /// Drop every candidate.
    RemoveAll,
}

/// `[media]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Media {
    /// Port ranges, `"40000-49999"` or a single `"40000"`.
    pub port_ranges: Vec<String>,
    /// Anchoring mode.
    #[serde(default)]
    pub mode: MediaMode,
    /// Internal subnets (CIDR, `"10.77.0.0/24"`) a pinhole may target besides
    /// the signalling source of the client that sent the SDP (DESIGN.md §3).
    /// Empty: only the signalling source itself.
    #[serde(default)]
    pub allowed_internal_subnets: Vec<String>,
    /// Media flows (each one pinhole pair) one internal client (by source
    /// IP) may hold at once.
    #[serde(default = "default_max_pinholes_per_client")]
    pub max_pinholes_per_client: u32,
    /// Calls with media the edge tracks at once.
    #[serde(default = "default_max_calls")]
    pub max_calls: u32,
    /// A call whose pinholes carried nothing for this long is ended.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// A confirmed call whose pinholes never carried a packet is ended after this.
    #[serde(default = "default_unused_timeout_secs")]
    pub unused_timeout_secs: u64,
    /// Longest call; its media is removed afterwards whatever happens.
    #[serde(default = "default_max_call_secs")]
    pub max_call_secs: u64,
    /// Latch the peer's real source from its first packet (DESIGN.md §2; opt-in).
    #[serde(default)]
    pub latch: bool,
    /// ICE candidate handling for SDP leaving the inside.
    #[serde(default)]
    pub candidates: MediaCandidates,
    /// Which outside addresses may receive a call's media besides those
    /// that are never allowed (DESIGN.md §3): `"signalling"` (default: the
    /// far party's signalling source, plus its route's `media_sources`) or
    /// `"any-public"` (any public unicast address).
    #[serde(default)]
    pub external_sources: MediaExternalSources,
}

/// `[media] external_sources`: see [`Media::external_sources`].
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MediaExternalSources {
    /// Only the far party's signalling source (and its route's
    /// `media_sources`), as Linux's SIP helper does.
    #[default]
    Signalling,
    /// Any public unicast address (explicit opt-in).
    AnyPublic,
}

fn default_max_pinholes_per_client() -> u32 {
    64
}

fn default_max_calls() -> u32 {
    10_000
}

fn default_idle_timeout_secs() -> u64 {
    60
}

fn default_unused_timeout_secs() -> u64 {
    20
}

fn default_max_call_secs() -> u64 {
    4 * 3600
}

/// An IPv4/IPv6 network, `addr/len`, validated (host bits must be zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Whether `ip` is inside (never across families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Parse `"10.77.0.0/24"` (a bare address means a single host).
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (a, l) = s
        .split_once('/')
        .map_or((s.trim(), None), |(a, l)| (a.trim(), Some(l.trim())));
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match l {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| format!("{l:?} is not a prefix length (0-{max})"))?,
    };
    let net_only = match addr {
        IpAddr::V4(v) => {
            u32::from(v) & !u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0) == 0
        }
        IpAddr::V6(v) => {
            u128::from(v) & !u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0) == 0
        }
    };
    if !net_only {
        return Err(format!(
            "{s:?} has host bits set; write the network address"
        ));
    }
    if len == 0 {
        return Err(format!(
            "{s:?} allows every address; list the internal subnets instead"
        ));
    }
    Ok(Cidr { addr, len })
}

impl Media {
    /// The validated internal subnets.
    pub fn allowed_subnets(&self) -> Vec<Cidr> {
        // validate() has checked every entry parses.
        self.allowed_internal_subnets
            .iter()
            .filter_map(|s| parse_cidr(s).ok())
            .collect()
    }

    /// Rules for the pinhole-manager keys (DESIGN.md §3).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, s) in self.allowed_internal_subnets.iter().enumerate() {
            parse_cidr(s).map_err(|reason| {
                invalid(format!("media.allowed_internal_subnets[{i}]"), reason)
            })?;
        }
        if self.max_pinholes_per_client == 0 {
            return Err(invalid(
                "media.max_pinholes_per_client",
                "must be at least 1",
            ));
        }
        if self.max_calls == 0 {
            return Err(invalid("media.max_calls", "must be at least 1"));
        }
        for (field, v) in [
            ("media.idle_timeout_secs", self.idle_timeout_secs),
            ("media.unused_timeout_secs", self.unused_timeout_secs),
            ("media.max_call_secs", self.max_call_secs),
        ] {
            if v == 0 || v > 7 * 24 * 3600 {
                return Err(invalid(field, "must be between 1 and 604800 seconds"));
            }
        }
        if self.unused_timeout_secs > self.idle_timeout_secs {
            return Err(invalid(
                "media.unused_timeout_secs",
                "must not exceed media.idle_timeout_secs (never-used pinholes expire first)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod media_tests {
    use super::*;

    fn media(extra: &str) -> Result<Media, String> {
        let m: Media = toml::from_str(&format!("port_ranges = [\"40000-40999\"]\n{extra}"))
            .map_err(|e| e.to_string())?;
        m.validate().map_err(|e| e.to_string())?;
        Ok(m)
    }

    #[test]
    fn defaults_keep_old_configs_valid() {
        let m = media("").expect("defaults");
        assert_eq!(
            (
                m.max_pinholes_per_client,
                m.max_calls,
                m.idle_timeout_secs,
                m.unused_timeout_secs,
                m.max_call_secs
            ),
            (64, 10_000, 60, 20, 14_400)
        );
        assert!(!m.latch);
        assert_eq!(m.candidates, MediaCandidates::ReplacePrivateHost);
        assert!(m.allowed_subnets().is_empty());
    }

    #[test]
    fn subnets_parse_and_match() {
        let m = media("allowed_internal_subnets = [\"10.77.0.0/24\", \"2001:db8:77::/64\", \"10.78.0.9\"]\ncandidates = \"remove-all\"").expect("valid");
        let s = m.allowed_subnets();
        assert!(s[0].contains("10.77.0.200".parse().expect("ip")));
        assert!(!s[0].contains("10.77.1.1".parse().expect("ip")));
        assert!(s[1].contains("2001:db8:77::5".parse().expect("ip")));
        assert!(!s[1].contains("10.77.0.1".parse().expect("ip")));
        assert!(
            s[2].contains("10.78.0.9".parse().expect("ip"))
                && !s[2].contains("10.78.0.8".parse().expect("ip"))
        );
    }

    #[test]
    fn bad_media_keys_are_rejected() {
        for (extra, want) in [
            ("allowed_internal_subnets = [\"10.77.0.1/24\"]", "host bits"),
            (
                "allowed_internal_subnets = [\"10.77.0.0/33\"]",
                "prefix length",
            ),
            (
                "allowed_internal_subnets = [\"0.0.0.0/0\"]",
                "every address",
            ),
            ("allowed_internal_subnets = [\"bogus\"]", "not an IP"),
            ("max_pinholes_per_client = 0", "max_pinholes_per_client"),
            ("max_calls = 0", "max_calls"),
            ("idle_timeout_secs = 0", "idle_timeout_secs"),
            ("idle_timeout_secs = 10", "unused_timeout_secs"),
            ("max_call_secs = 999999999", "max_call_secs"),
            ("candidates = \"sometimes\"", "candidates"),
            ("latch = \"yes\"", "latch"),
        ] {
            let e = media(extra).expect_err(extra);
            assert!(e.contains(want), "{extra}: {e}");
        }
    }
}

/// `[signalling]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Signalling {
    /// The agent's own SIP ports; always passed to the kernel.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Admin ports (ssh, monitoring) that must always pass.
    #[serde(default)]
    pub admin_ports: Vec<u16>,
}

/// `[limits]`: table sizes, and what one source may cost the edge
/// (issue #14 item 8). Connection limits apply at accept, per side and per
/// source address; request limits are token buckets per source address
/// (refill `*_rate` per second, hold `*_burst`), the excess answered 503
/// with Retry-After; registration failures block a source with 403.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Size of the pinhole table (each flow direction is one entry).
    #[serde(default = "default_max_pinholes")]
    pub max_pinholes: u32,
    /// Connections one source address may hold open on a side.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: u32,
    /// Of those, how many may be in their TLS handshake at once.
    #[serde(default = "default_max_handshakes_per_source")]
    pub max_handshakes_per_source: u32,
    /// New TLS/TCP connections per second one source address may open on a
    /// side (each costs the edge a handshake), after `handshake_burst`.
    #[serde(default = "default_handshake_rate")]
    pub handshake_rate: u32,
    /// New connections a quiet source may open at once.
    #[serde(default = "default_handshake_burst")]
    pub handshake_burst: u32,
    /// Seconds a TLS handshake (or an outgoing TCP connect) may take.
    #[serde(default = "default_handshake_timeout_secs")]
    pub handshake_timeout_secs: u64,
    /// Seconds a message may take from its first byte to its last; not
    /// extended by each byte (the idle timer is separate).
    #[serde(default = "default_message_timeout_secs")]
    pub message_timeout_secs: u64,
    /// New requests per second per source address (all methods but ACK and CANCEL).
    #[serde(default = "default_request_rate")]
    pub request_rate: u32,
    /// Requests a source may send at once before `request_rate` applies.
    #[serde(default = "default_request_burst")]
    pub request_burst: u32,
    /// New INVITEs (no To tag) per second per source address.
    #[serde(default = "default_invite_rate")]
    pub invite_rate: u32,
    /// INVITE burst per source address.
    #[serde(default = "default_invite_burst")]
    pub invite_burst: u32,
    /// REGISTERs per second per source address.
    #[serde(default = "default_register_rate")]
    pub register_rate: u32,
    /// REGISTER burst per source address.
    #[serde(default = "default_register_burst")]
    pub register_burst: u32,
    /// New requests per second from all sources of one side together
    /// (each side has its own budget: an outside flood never spends the
    /// inside's).
    #[serde(default = "default_global_request_rate")]
    pub global_request_rate: u32,
    /// Global burst.
    #[serde(default = "default_global_request_burst")]
    pub global_request_burst: u32,
    /// Source addresses tracked at once (bounded memory); beyond it new
    /// sources share one bucket.
    #[serde(default = "default_max_tracked_sources")]
    pub max_tracked_sources: u32,
    /// Failed registrations (403, or 401/407 to a REGISTER that carried
    /// credentials) from one source within the window that block it.
    #[serde(default = "default_register_failures_per_source")]
    pub register_failures_per_source: u32,
    /// Failed registrations for one AOR, from any source, within the window
    /// that block further REGISTERs for it.
    #[serde(default = "default_register_failures_per_aor")]
    pub register_failures_per_aor: u32,
    /// The window failures are counted in, seconds.
    #[serde(default = "default_register_failure_window_secs")]
    pub register_failure_window_secs: u64,
    /// How long a blocked source (or AOR) gets 403, seconds.
    #[serde(default = "default_block_secs")]
    pub block_secs: u64,
    /// Prefix length an IPv6 source is counted by, for the connection and
    /// request limits above (one host commonly holds a whole /64).
    #[serde(default = "default_ipv6_source_prefix")]
    pub ipv6_source_prefix: u8,
}

fn default_max_pinholes() -> u32 {
    65536
}
fn default_max_connections_per_source() -> u32 {
    128
}
fn default_max_handshakes_per_source() -> u32 {
    16
}
fn default_handshake_rate() -> u32 {
    20
}
fn default_handshake_burst() -> u32 {
    64
}
fn default_handshake_timeout_secs() -> u64 {
    10
}
fn default_message_timeout_secs() -> u64 {
    10
}
fn default_request_rate() -> u32 {
    50
}
fn default_request_burst() -> u32 {
    200
}
fn default_invite_rate() -> u32 {
    10
}
fn default_invite_burst() -> u32 {
    50
}
fn default_register_rate() -> u32 {
    5
}
fn default_register_burst() -> u32 {
    20
}
fn default_global_request_rate() -> u32 {
    2000
}
fn default_global_request_burst() -> u32 {
    4000
}
fn default_max_tracked_sources() -> u32 {
    65536
}
fn default_register_failures_per_source() -> u32 {
    10
}
fn default_register_failures_per_aor() -> u32 {
    20
}
fn default_register_failure_window_secs() -> u64 {
    300
}
fn default_block_secs() -> u64 {
    900
}
fn default_ipv6_source_prefix() -> u8 {
    64
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pinholes: default_max_pinholes(),
            max_connections_per_source: default_max_connections_per_source(),
            max_handshakes_per_source: default_max_handshakes_per_source(),
            handshake_rate: default_handshake_rate(),
            handshake_burst: default_handshake_burst(),
            handshake_timeout_secs: default_handshake_timeout_secs(),
            message_timeout_secs: default_message_timeout_secs(),
            request_rate: default_request_rate(),
            request_burst: default_request_burst(),
            invite_rate: default_invite_rate(),
            invite_burst: default_invite_burst(),
            register_rate: default_register_rate(),
            register_burst: default_register_burst(),
            global_request_rate: default_global_request_rate(),
            global_request_burst: default_global_request_burst(),
            max_tracked_sources: default_max_tracked_sources(),
            register_failures_per_source: default_register_failures_per_source(),
            register_failures_per_aor: default_register_failures_per_aor(),
            register_failure_window_secs: default_register_failure_window_secs(),
            block_secs: default_block_secs(),
            ipv6_source_prefix: default_ipv6_source_prefix(),
        }
    }
}

impl Limits {
    /// Rules types cannot express (called from `Config::validate`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_pinholes == 0 || self.max_pinholes > 1 << 24 {
            return Err(invalid(
                "limits.max_pinholes",
                "must be between 1 and 16777216",
            ));
        }
        for (field, v) in [
            (
                "limits.max_connections_per_source",
                self.max_connections_per_source,
            ),
            (
                "limits.max_handshakes_per_source",
                self.max_handshakes_per_source,
            ),
            ("limits.handshake_rate", self.handshake_rate),
            ("limits.handshake_burst", self.handshake_burst),
            ("limits.request_rate", self.request_rate),
            ("limits.request_burst", self.request_burst),
            ("limits.invite_rate", self.invite_rate),
            ("limits.invite_burst", self.invite_burst),
            ("limits.register_rate", self.register_rate),
            ("limits.register_burst", self.register_burst),
            ("limits.global_request_rate", self.global_request_rate),
            ("limits.global_request_burst", self.global_request_burst),
            ("limits.max_tracked_sources", self.max_tracked_sources),
            (
                "limits.register_failures_per_source",
                self.register_failures_per_source,
            ),
            (
                "limits.register_failures_per_aor",
                self.register_failures_per_aor,
            ),
        ] {
            if v == 0 || v > 10_000_000 {
                return Err(invalid(
                    field,
                    "must be between 1 and 10000000 (raise it to loosen the limit; 0 would refuse everything)",
                ));
            }
        }
        if !(32..=128).contains(&self.ipv6_source_prefix) {
            return Err(invalid(
                "limits.ipv6_source_prefix",
                "must be between 32 and 128 (64: one source per /64, the usual end-site assignment)",
            ));
        }
        if self.max_handshakes_per_source > self.max_connections_per_source {
            return Err(invalid(
                "limits.max_handshakes_per_source",
                "must not exceed limits.max_connections_per_source (a handshake is a connection)",
            ));
        }
        for (field, v, max) in [
            (
                "limits.handshake_timeout_secs",
                self.handshake_timeout_secs,
                300,
            ),
            (
                "limits.message_timeout_secs",
                self.message_timeout_secs,
                3600,
            ),
            (
                "limits.register_failure_window_secs",
                self.register_failure_window_secs,
                86_400,
            ),
            ("limits.block_secs", self.block_secs, 7 * 86_400),
        ] {
            if v == 0 || v > max {
                return Err(invalid(
                    field,
                    format!("must be between 1 and {max} seconds"),
                ));
            }
        }
        Ok(())
    }
}

/// `[policy]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// For traffic not aimed at media ports of an edge address.
    #[serde(default)]
    pub default: DefaultPolicy,
}

/// The whole file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where maps and links are pinned (on bpffs).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// What to do with the datapath when the agent exits.
    #[serde(default)]
    pub on_exit: OnExit,
    /// `[xdp]`.
    #[serde(default)]
    pub xdp: XdpSection,
    /// `[[interface]]`, at least one.
    #[serde(rename = "interface")]
    pub interfaces: Vec<Interface>,
    /// `[addresses]`.
    pub addresses: Addresses,
    /// `[media]`.
    pub media: Media,
    /// `[signalling]`.
    #[serde(default)]
    pub signalling: Signalling,
    /// `[limits]`.
    #[serde(default)]
    pub limits: Limits,
    /// `[policy]`.
    #[serde(default)]
    pub policy: Policy,
    /// `[proxy]`: the TLS SIP proxy; absent = no SIP listeners (datapath only).
    #[serde(default)]
    pub proxy: Option<ProxySection>,
    /// `[[route]]`: outbound routes by Request-URI domain.
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    /// `[access]`: served domains and remote users (`crate::access`).
    #[serde(default)]
    pub access: Option<crate::access::AccessSection>,
    /// `[[peer]]`: trusted outside peers (`crate::access`).
    #[serde(default, rename = "peer")]
    pub peers: Vec<crate::access::PeerSection>,
    /// `[control]`: the agent's control socket (`crate::control`).
    #[serde(default)]
    pub control: crate::control::ControlSection,
    /// `[admin]`: the metrics endpoint (`crate::admin`).
    #[serde(default)]
    pub admin: crate::admin::AdminSection,
    /// `[log]`: log format (`crate::logging`).
    #[serde(default)]
    pub log: crate::logging::LogSection,
    /// `[agent]`: drain time, log filter, certificate checks (`crate::service`).
    #[serde(default)]
    pub agent: crate::service::AgentSection,
    /// `[ha]`: call state replicated to other edge nodes (`crate::ha`).
    #[serde(default)]
    pub ha: Option<crate::ha::HaSection>,
}

/// A next hop the proxy opens TLS connections to.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NextHop {
    /// Host name or IP literal to connect to.
    pub host: String,
    /// TCP port (TLS).
    #[serde(default = "default_sips_port")]
    pub port: u16,
    /// Name the server certificate must carry (RFC 5922 §4); defaults to `host`.
    #[serde(default)]
    pub tls_name: Option<String>,
}

impl NextHop {
    /// The name verified against the peer's certificate.
    pub fn server_name(&self) -> &str {
        self.tls_name.as_deref().unwrap_or(&self.host)
    }
}

fn default_sips_port() -> u16 {
    5061
}

/// `[[route]]`: requests from inside whose Request-URI host is `domain` (or
/// a subdomain of it, with `"*.example.com"`) go to this next hop.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Domain, exact (case-insensitive) or `*.suffix`.
    pub domain: String,
    /// Host name or IP literal to connect to.
    pub host: String,
    /// TCP port (TLS).
    #[serde(default = "default_sips_port")]
    pub port: u16,
    /// Name the server certificate must carry; defaults to `host`.
    #[serde(default)]
    pub tls_name: Option<String>,
    /// Addresses (CIDR) this route's far parties may receive media at
    /// besides their signalling source: carriers whose SBC sends and
    /// receives media from other hosts than its signalling. May name a
    /// private range (a private interconnect); never the edge, an internal
    /// subnet, loopback, link-local, multicast or unspecified addresses.
    #[serde(default)]
    pub media_sources: Vec<String>,
}

impl Route {
    /// The validated `media_sources`.
    pub fn media_sources(&self) -> Vec<Cidr> {
        // validate() has checked every entry.
        self.media_sources
            .iter()
            .filter_map(|s| parse_cidr(s).ok())
            .collect()
    }

    /// The route's next hop (serde's `flatten` cannot be combined with
    /// `deny_unknown_fields`, so the fields are repeated here).
    pub fn next_hop(&self) -> NextHop {
        NextHop {
            host: self.host.clone(),
            port: self.port,
            tls_name: self.tls_name.clone(),
        }
    }
}

/// Client-certificate policy of the external TLS listener (federation peers).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificate asked for.
    #[default]
    None,
    /// Asked for and verified if sent.
    Optional,
    /// Required and verified against `client_ca`.
    Required,
}

/// `[proxy]`: listeners, certificates and routing of the SIP proxy.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// TLS listener for internal clients, e.g. `"10.77.0.1:5061"`.
    #[serde(deserialize_with = "forms::socket_addr")]
    pub internal_listen: SocketAddr,
    /// TLS listener for external peers, e.g. `"203.0.113.1:5061"`.
    #[serde(deserialize_with = "forms::socket_addr")]
    pub external_listen: SocketAddr,
    /// Host written into Via/Record-Route/Contact on the internal side;
    /// defaults to the internal listen address.
    #[serde(default)]
    pub internal_advertise: Option<String>,
    /// Same for the external side; defaults to the external listen address.
    #[serde(default)]
    pub external_advertise: Option<String>,
    /// Optional plain TCP listener for legacy internal clients (off by default).
    #[serde(default, deserialize_with = "forms::opt_socket_addr")]
    pub internal_tcp_listen: Option<SocketAddr>,
    /// Optional plain UDP listener for legacy internal clients (off by
    /// default); each remote address:port is a pseudo-connection.
    #[serde(default, deserialize_with = "forms::opt_socket_addr")]
    pub internal_udp_listen: Option<SocketAddr>,
    /// Source address of connections the edge opens toward internal next
    /// hops; defaults to the internal listener's address (or, when that is
    /// the wildcard, the first `addresses.internal` of the hop's family).
    #[serde(default, deserialize_with = "forms::opt_ip")]
    pub internal_source_address: Option<IpAddr>,
    /// Source address of connections the edge opens toward external next
    /// hops (what a carrier allow-lists); defaults to the external
    /// listener's address (or the first `addresses.public` of the family).
    #[serde(default, deserialize_with = "forms::opt_ip")]
    pub external_source_address: Option<IpAddr>,
    /// PEM certificate chain presented on both listeners.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA roots used to verify the servers the proxy connects to.
    pub ca_roots: PathBuf,
    /// Client certificates on the external listener.
    #[serde(default)]
    pub external_client_auth: ClientAuth,
    /// PEM CA roots for client certificates; defaults to `ca_roots`.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Where requests from outside go when they are not for a client
    /// registered through the edge (a registrar/PBX); none = 404.
    #[serde(default)]
    pub internal_next_hop: Option<NextHop>,
    /// Where requests from inside go when no `[[route]]` matches; none = 404.
    #[serde(default)]
    pub default_route: Option<NextHop>,
    /// Seconds without traffic after which a connection is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Seconds between RFC 5626 CRLF pings on connections the edge opened; 0 = off.
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    /// Most simultaneous connections per side (the internal and the
    /// external listeners each have this many; an outside flood never
    /// takes the inside's); more are refused at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a 2xx to an INVITE waits for its ACK before the edge ends
    /// the call both ways (RFC 3261 §13.3.1.4: 64*T1, the time a UAS
    /// retransmits its 2xx before giving up).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_secs: u64,
    /// Seconds an INVITE branch may stay provisional (ringing, early
    /// media) before the edge cancels it (Timer C, RFC 3261 §16.6 step
    /// 11, which wants more than 3 minutes; lower it only for tests).
    #[serde(default = "default_timer_c")]
    pub timer_c_secs: u64,
    /// A file with a secret (≥ 32 bytes) the flow tokens are sealed with
    /// (`proxy::tokens`), so the agent after a restart still routes the
    /// in-dialog requests of calls it set up before; `[ha] token_key_file`
    /// does the same across the pair and is used when this is unset.
    #[serde(default)]
    pub token_key_file: Option<PathBuf>,
}

fn default_timer_c() -> u64 {
    181
}

fn default_ack_timeout() -> u64 {
    32
}

fn default_idle_timeout() -> u64 {
    300
}

fn default_keepalive() -> u64 {
    30
}

fn default_max_connections() -> usize {
    4096
}

impl ProxySection {
    fn validate(&self, routes: &[Route], addresses: &Addresses) -> Result<(), ConfigError> {
        // A source address must be one unicast address of this host on its
        // own side: an internal address on the outside would leak the
        // inside (and be dropped by any sane peer), and the reverse would
        // make internal hops see the public address.
        for (field, src, other_side) in [
            (
                "proxy.internal_source_address",
                self.internal_source_address,
                &addresses.public,
            ),
            (
                "proxy.external_source_address",
                self.external_source_address,
                &addresses.internal,
            ),
        ] {
            let Some(ip) = src else { continue };
            let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
            if ip.is_unspecified() || ip.is_multicast() || broadcast {
                return Err(invalid(
                    field,
                    format!("{ip} is not a unicast address; name one address of this host on that side, or remove the key to use the listener's"),
                ));
            }
            if other_side.contains(&ip) {
                return Err(invalid(
                    field,
                    format!("{ip} is an edge address of the other side; connections must leave from an address of their own side"),
                ));
            }
        }
        // Port 0 (tests: the OS picks) binds two distinct ports.
        if self.internal_listen == self.external_listen && self.internal_listen.port() != 0 {
            return Err(invalid("proxy.external_listen", "must differ from proxy.internal_listen: the side a message came from is the listener it arrived on"));
        }
        if let Some(tcp) = self.internal_tcp_listen {
            if tcp == self.internal_listen || tcp == self.external_listen {
                return Err(invalid(
                    "proxy.internal_tcp_listen",
                    format!("{tcp} is already a TLS listener"),
                ));
            }
        }
        if let Some(udp) = self.internal_udp_listen {
            // Plain UDP is for internal legacy clients only: refuse any
            // address that would expose it on the external side.
            if udp.ip().is_unspecified() {
                return Err(invalid("proxy.internal_udp_listen", format!("{udp}: bind an internal address, not the wildcard (plain UDP would be reachable from outside)")));
            }
            if udp.ip() == self.external_listen.ip() && udp.ip() != self.internal_listen.ip() {
                return Err(invalid("proxy.internal_udp_listen", format!("{udp} is on the external listener's address; plain UDP is for internal clients only")));
            }
        }
        if self.idle_timeout_secs == 0 {
            return Err(invalid("proxy.idle_timeout_secs", "must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(invalid("proxy.max_connections", "must be at least 1"));
        }
        if !(1..=3600).contains(&self.ack_timeout_secs) {
            return Err(invalid("proxy.ack_timeout_secs", "must be 1 to 3600"));
        }
        if !(1..=3600).contains(&self.timer_c_secs) {
            return Err(invalid("proxy.timer_c_secs", "must be 1 to 3600"));
        }
        for (field, adv) in [
            ("proxy.internal_advertise", &self.internal_advertise),
            ("proxy.external_advertise", &self.external_advertise),
        ] {
            if let Some(a) = adv {
                if crate::sip::uri::Host::parse(a).is_none() {
                    return Err(invalid(
                        field,
                        format!("{a:?} is not a host name or IP address"),
                    ));
                }
            }
        }
        let route_hops: Vec<NextHop> = routes.iter().map(Route::next_hop).collect();
        let hops = route_hops
            .iter()
            .enumerate()
            .map(|(i, h)| (format!("route[{i}]"), h))
            .chain(
                self.internal_next_hop
                    .iter()
                    .map(|h| ("proxy.internal_next_hop".to_owned(), h)),
            )
            .chain(
                self.default_route
                    .iter()
                    .map(|h| ("proxy.default_route".to_owned(), h)),
            );
        for (field, hop) in hops {
            if crate::sip::uri::Host::parse(&hop.host).is_none() {
                return Err(invalid(
                    format!("{field}.host"),
                    format!("{:?} is not a host name or IP address", hop.host),
                ));
            }
            if hop.port == 0 {
                return Err(invalid(format!("{field}.port"), "port 0 is not a port"));
            }
        }
        let mut domains = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            let d = r.domain.to_ascii_lowercase();
            let bare = d.strip_prefix("*.").unwrap_or(&d);
            if crate::sip::uri::Host::parse(bare).is_none() {
                return Err(invalid(
                    format!("route[{i}].domain"),
                    format!(
                        "{:?} is not a domain (use \"example.com\" or \"*.example.com\")",
                        r.domain
                    ),
                ));
            }
            if let Some(first) = domains.insert(d, i) {
                return Err(invalid(
                    format!("route[{i}].domain"),
                    format!(
                        "{:?} is routed twice (route[{first}] and route[{i}]); keep one [[route]] per domain",
                        r.domain
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}

/// An inclusive port range, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (inclusive).
    pub end: u16,
}

impl PortRange {
    /// Whether `port` is inside.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

/// Lowest port a media range may use (DESIGN.md §3: never below 1024).
pub const MIN_MEDIA_PORT: u16 = 1024;

/// Parse `"a-b"` or `"a"`.
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (s.trim(), s.trim()),
    };
    let start: u16 = a.parse().map_err(|_| {
        format!(
            "{s:?}: {a:?} is not a port number (1-65535); {}",
            forms::RANGE_FORM
        )
    })?;
    let end: u16 = b.parse().map_err(|_| {
        format!(
            "{s:?}: {b:?} is not a port number (1-65535); {}",
            forms::RANGE_FORM
        )
    })?;
    if start > end {
        return Err(format!(
            "range {s:?} is empty: {start} > {end}; {}, low port first",
            forms::RANGE_FORM
        ));
    }
    Ok(PortRange { start, end })
}

/// Whether two networks share an address (one contains the other's base).
fn overlaps(a: &Cidr, b: &Cidr) -> bool {
    a.contains(b.addr) || b.contains(a.addr)
}

impl Config {
    /// A `media_sources` list (per `[[route]]`; a future `[[peer]]` takes
    /// the same key and check): CIDRs that may widen where outside media
    /// goes, but never into what DESIGN.md §3 forbids whatever the config.
    pub(crate) fn validate_media_sources(
        &self,
        field: &str,
        list: &[String],
    ) -> Result<(), ConfigError> {
        let internal = self.media.allowed_subnets();
        for (i, s) in list.iter().enumerate() {
            let at = format!("{field}[{i}]");
            let c = parse_cidr(s).map_err(|reason| invalid(&at, reason))?;
            let base = c.addr.to_canonical();
            let fixed = match base {
                IpAddr::V4(a) => {
                    a.octets()[0] == 0
                        || a.is_loopback()
                        || a.is_link_local()
                        || a.is_multicast()
                        || a.octets()[0] >= 240
                }
                IpAddr::V6(a) => {
                    a.is_unspecified()
                        || a.is_loopback()
                        || a.is_multicast()
                        || (a.segments()[0] & 0xffc0) == 0xfe80
                }
            };
            // A prefix short enough to hold such ranges (say 0.0.0.0/1) is
            // refused too: the table would still win, but the admin meant
            // something else.
            let wide = [
                "0.0.0.0/8",
                "127.0.0.0/8",
                "169.254.0.0/16",
                "224.0.0.0/4",
                "240.0.0.0/4",
                "::1",
                "fe80::/10",
                "ff00::/8",
            ]
            .iter()
            .filter_map(|n| parse_cidr(n).ok())
            .any(|n| n.len >= c.len && c.contains(n.addr));
            if fixed || wide {
                return Err(invalid(at, format!("{s:?} covers loopback, link-local, multicast, broadcast or unspecified addresses, which never receive media; list the carrier's media subnets")));
            }
            if let Some(n) = internal.iter().find(|n| overlaps(n, &c)) {
                return Err(invalid(at, format!("{s:?} overlaps internal subnet {}/{} (media.allowed_internal_subnets); the outside may never aim media inside", n.addr, n.len)));
            }
            let edge = self.addresses.internal.iter().chain(&self.addresses.public);
            if let Some(e) = edge.into_iter().find(|e| c.contains(e.to_canonical())) {
                return Err(invalid(
                    at,
                    format!("{s:?} contains the edge's own address {e}"),
                ));
            }
        }
        Ok(())
    }

    /// Read, parse and validate `path`.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, hint, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
                hint,
            },
            other => other,
        })
    }

    /// Parse and validate TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            hint: forms::hint(source.message()),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The validated media port ranges.
    pub fn media_ranges(&self) -> Vec<PortRange> {
        // validate() has checked every entry parses; skip none silently.
        self.media
            .port_ranges
            .iter()
            .filter_map(|r| parse_port_range(r).ok())
            .collect()
    }

    /// Every rule of the file that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interfaces.is_empty() {
            return Err(invalid(
                "interface",
                "at least one [[interface]] is required",
            ));
        }
        let mut names = HashMap::new();
        for (i, iface) in self.interfaces.iter().enumerate() {
            let field = format!("interface[{i}].name");
            if iface.name.is_empty() || iface.name.len() > 15 || iface.name.contains('/') {
                return Err(invalid(
                    field,
                    format!(
                        "{:?} is not a valid interface name (1-15 bytes)",
                        iface.name
                    ),
                ));
            }
            if let Some(first) = names.insert(iface.name.as_str(), i) {
                return Err(invalid(
                    field,
                    format!(
                        "{:?} is listed more than once (interface[{first}] and interface[{i}]); an interface has one role: remove one entry",
                        iface.name
                    ),
                ));
            }
        }
        if self.addresses.public.is_empty() {
            return Err(invalid(
                "addresses.public",
                "at least one public address is required",
            ));
        }
        let mut seen = HashMap::new();
        for (field, list) in [
            ("addresses.internal", &self.addresses.internal),
            ("addresses.public", &self.addresses.public),
        ] {
            for ip in list {
                if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                    return Err(invalid(field, format!("{ip} cannot be an edge address (unspecified, multicast or loopback); list the unicast addresses the edge has on that side")));
                }
                if let Some(first) = seen.insert(*ip, field) {
                    let why = if first == field {
                        format!("{ip} is listed more than once in {field}; remove the repeat")
                    } else {
                        format!("{ip} is listed more than once, in {first} and in {field}; an edge address belongs to one side: keep it in the list of the side it faces")
                    };
                    return Err(invalid(field, why));
                }
            }
        }
        self.media.validate()?;
        if self.media.port_ranges.is_empty() {
            return Err(invalid(
                "media.port_ranges",
                "at least one range is required, e.g. \"40000-49999\"",
            ));
        }
        let mut ranges = Vec::new();
        for (i, r) in self.media.port_ranges.iter().enumerate() {
            let field = format!("media.port_ranges[{i}]");
            let range = parse_port_range(r).map_err(|reason| invalid(&field, reason))?;
            if range.start < MIN_MEDIA_PORT {
                return Err(invalid(field, format!("{r:?} starts below {MIN_MEDIA_PORT}; media ports must not be privileged ports")));
            }
            for (j, other) in ranges.iter().enumerate() {
                let o: &PortRange = other;
                if range.start <= o.end && o.start <= range.end {
                    return Err(invalid(
                        field,
                        format!("{r:?} overlaps media.port_ranges[{j}] ({}-{}); ranges must not share ports: merge them into one `lo-hi` range", o.start, o.end),
                    ));
                }
            }
            ranges.push(range);
        }
        let mut seen_ports = HashMap::new();
        for (field, ports) in [
            ("signalling.ports", &self.signalling.ports),
            ("signalling.admin_ports", &self.signalling.admin_ports),
        ] {
            for p in ports {
                if *p == 0 {
                    return Err(invalid(field, "port 0 is not a port"));
                }
                if let Some(first) = seen_ports.insert(*p, field) {
                    let lists = if first == field {
                        format!("twice in {field}")
                    } else {
                        format!("in {first} and in {field}")
                    };
                    return Err(invalid(
                        field,
                        format!("port {p} is listed more than once, {lists}; list each port once"),
                    ));
                }
                if let Some(r) = ranges.iter().find(|r| r.contains(*p)) {
                    return Err(invalid(field, format!("port {p} lies inside media range {}-{}; the edge's own ports must never be media ports", r.start, r.end)));
                }
            }
        }
        self.limits.validate()?;
        for (i, r) in self.routes.iter().enumerate() {
            self.validate_media_sources(&format!("route[{i}].media_sources"), &r.media_sources)?;
        }
        match &self.proxy {
            Some(p) => p.validate(&self.routes, &self.addresses)?,
            None if !self.routes.is_empty() => {
                return Err(invalid("route", "[[route]] needs a [proxy] section"));
            }
            None => {}
        }
        crate::access::validate(self)?;
        self.control.validate()?;
        self.admin.validate(self)?;
        self.agent.validate()?;
        if let Some(h) = &self.ha {
            h.validate()?;
        }
        if !self.pin_dir.is_absolute() {
            return Err(invalid(
                "pin_dir",
                format!(
                    "{} must be an absolute path on bpffs",
                    self.pin_dir.display()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[interface]]
        name = "int0"
        role = "internal"
        [[interface]]
        name = "ext0"
        role = "external"
        [addresses]
        internal = ["10.77.0.1"]
        public = ["203.0.113.1"]
        [media]
        port_ranges = ["40000-40999", "50000"]
        [signalling]
        ports = [5061]
    "#;

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::from_toml(GOOD).expect("valid");
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(c.on_exit, OnExit::Keep);
        assert_eq!(c.xdp.mode, XdpMode::Native);
        assert_eq!(c.limits.max_pinholes, 65536);
        assert_eq!(
            c.media_ranges(),
            vec![
                PortRange {
                    start: 40000,
                    end: 40999
                },
                PortRange {
                    start: 50000,
                    end: 50000
                }
            ]
        );
    }

    fn err_of(text: &str) -> String {
        match Config::from_toml(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = err_of(&format!("{GOOD}\n[limits]\nmax_pinhole = 3\n"));
        assert!(e.contains("max_pinhole"), "{e}");
    }

    #[test]
    fn privileged_media_range_is_rejected() {
        let e = err_of(&GOOD.replace("\"50000\"", "\"1000-2000\""));
        assert!(e.contains("below 1024"), "{e}");
    }

    #[test]
    fn signalling_port_inside_media_range_is_rejected() {
        let e = err_of(&GOOD.replace("ports = [5061]", "ports = [40500]"));
        assert!(e.contains("inside media range"), "{e}");
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let e = err_of(&GOOD.replace("\"50000\"", "\"40900-41000\""));
        assert!(e.contains("overlaps"), "{e}");
    }

    #[test]
    fn bad_range_text_is_rejected() {
        for bad in ["\"x-1\"", "\"2000-1500\"", "\"70000\""] {
            let e = err_of(&GOOD.replace("\"50000\"", bad));
            assert!(e.contains("media.port_ranges[1]"), "{bad}: {e}");
        }
    }

    #[test]
    fn duplicate_interface_and_address_are_rejected() {
        let e = err_of(&GOOD.replace("name = \"ext0\"", "name = \"int0\""));
        assert!(e.contains("listed more than once"), "{e}");
        let e = err_of(&GOOD.replace("public = [\"203.0.113.1\"]", "public = [\"10.77.0.1\"]"));
        assert!(e.contains("more than once"), "{e}");
    }

    #[test]
    fn missing_public_address_is_rejected() {
        let e = err_of(&GOOD.replace("public = [\"203.0.113.1\"]", "public = []"));
        assert!(e.contains("addresses.public"), "{e}");
    }

    const PROXY: &str = r#"
        [proxy]
        internal_listen = "10.77.0.1:5061"
        external_listen = "203.0.113.1:5061"
        cert = "/etc/sip-edge/edge.pem"
        key = "/etc/sip-edge/edge.key"
        ca_roots = "/etc/sip-edge/ca.pem"
        [proxy.default_route]
        host = "sip.example.net"
        [[route]]
        domain = "biloxi.example.com"
        host = "198.51.100.2"
        port = 5061
        tls_name = "biloxi.example.com"
    "#;

    #[test]
    fn proxy_section_is_optional_and_parses_with_defaults() {
        assert!(Config::from_toml(GOOD).expect("valid").proxy.is_none());
        let c = Config::from_toml(&format!("{GOOD}{PROXY}")).expect("valid");
        let p = c.proxy.expect("proxy section");
        assert_eq!(p.idle_timeout_secs, 300);
        assert_eq!(p.external_client_auth, ClientAuth::None);
        assert_eq!(p.internal_tcp_listen, None);
        assert_eq!(p.internal_udp_listen, None, "UDP is off unless configured");
        assert_eq!(
            p.default_route.as_ref().map(|h| (h.port, h.server_name())),
            Some((5061, "sip.example.net"))
        );
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].next_hop().server_name(), "biloxi.example.com");
    }

    #[test]
    fn media_source_keys_default_to_the_signalling_source_and_are_validated() {
        let both = format!("{GOOD}{PROXY}");
        let c = Config::from_toml(&both).expect("valid");
        assert_eq!(c.media.external_sources, MediaExternalSources::Signalling);
        assert!(c.routes[0].media_sources.is_empty());
        let c = Config::from_toml(&both.replace(
            "port_ranges = [\"40000-40999\", \"50000\"]",
            "port_ranges = [\"40000-40999\"]\nexternal_sources = \"any-public\"",
        ))
        .expect("valid");
        assert_eq!(c.media.external_sources, MediaExternalSources::AnyPublic);
        let e = err_of(&both.replace(
            "port_ranges = [\"40000-40999\", \"50000\"]",
            "port_ranges = [\"40000-40999\"]\nexternal_sources = \"anything\"",
        ));
        assert!(e.contains("external_sources"), "{e}");
        let with = |list: &str| {
            format!(
                "{}\n{}",
                GOOD.replace(
                    "[signalling]",
                    "allowed_internal_subnets = [\"10.77.0.0/24\"]\n[signalling]",
                ),
                PROXY.replace(
                    "tls_name = \"biloxi.example.com\"",
                    &format!("tls_name = \"biloxi.example.com\"\nmedia_sources = {list}"),
                )
            )
        };
        let c = Config::from_toml(&with(
            "[\"192.0.2.0/24\", \"172.20.0.0/16\", \"2001:db8:c::/48\"]",
        ))
        .expect("valid");
        assert_eq!(c.routes[0].media_sources().len(), 3);
        for (bad, says) in [
            ("[\"192.0.2.0/33\"]", "prefix length"),
            ("[\"192.0.2.1/24\"]", "host bits"),
            ("[\"carrier\"]", "not an IP address"),
            ("[\"10.0.0.0/8\"]", "overlaps internal subnet"),
            ("[\"10.77.0.64/26\"]", "overlaps internal subnet"),
            ("[\"203.0.113.0/24\"]", "edge's own address"),
            ("[\"127.0.0.0/8\"]", "loopback"),
            ("[\"169.254.0.0/16\"]", "link-local"),
            ("[\"fe80::/64\"]", "link-local"),
            ("[\"224.0.0.0/8\"]", "multicast"),
            ("[\"128.0.0.0/1\"]", "multicast"),
        ] {
            let e = err_of(&with(bad));
            assert!(
                e.contains("route[0].media_sources[0]") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn bad_proxy_sections_are_rejected() {
        let both = format!("{GOOD}{PROXY}");
        let e = err_of(&both.replace("203.0.113.1:5061", "10.77.0.1:5061"));
        assert!(e.contains("proxy.external_listen"), "{e}");
        let e = err_of(&format!(
            "{both}\n[[route]]\ndomain = \"BILOXI.example.com\"\nhost = \"x\"\n"
        ));
        assert!(e.contains("routed twice"), "{e}");
        let e = err_of(&both.replace("domain = \"biloxi.example.com\"", "domain = \"bad domain\""));
        assert!(e.contains("route[0].domain"), "{e}");
        let e = err_of(&format!(
            "{GOOD}\n[[route]]\ndomain = \"a.example\"\nhost = \"x\"\n"
        ));
        assert!(e.contains("needs a [proxy]"), "{e}");
        let e = err_of(&both.replace("ca_roots", "ca_rots"));
        assert!(e.contains("ca_rots"), "{e}");
        for bad in ["0.0.0.0:5060", "203.0.113.1:5060", "[::]:5060"] {
            let e = err_of(&both.replace(
                "[proxy]\n",
                &format!("[proxy]\ninternal_udp_listen = \"{bad}\"\n"),
            ));
            assert!(e.contains("proxy.internal_udp_listen"), "{bad}: {e}");
        }
        let ok = both.replace(
            "[proxy]\n",
            "[proxy]\ninternal_udp_listen = \"10.77.0.1:5060\"\n",
        );
        let udp = Config::from_toml(&ok)
            .expect("internal UDP listener is valid")
            .proxy
            .and_then(|p| p.internal_udp_listen);
        assert_eq!(udp, Some("10.77.0.1:5060".parse().expect("addr")));
    }

    /// Issue #14 item 4: per-side source addresses of outgoing connections.
    #[test]
    fn source_addresses_parse_and_are_validated() {
        let both = format!("{GOOD}{PROXY}");
        let with = |kv: &str| both.replace("[proxy]\n", &format!("[proxy]\n{kv}\n"));
        let c = Config::from_toml(&both).expect("valid");
        let p = c.proxy.expect("proxy");
        assert_eq!(
            (p.internal_source_address, p.external_source_address),
            (None, None),
            "default: the listener's address"
        );
        let c =
            Config::from_toml(&with("external_source_address = \"203.0.113.5\"")).expect("valid");
        assert_eq!(
            c.proxy.and_then(|p| p.external_source_address),
            Some("203.0.113.5".parse().expect("ip"))
        );
        for (kv, field) in [
            (
                "external_source_address = \"0.0.0.0\"",
                "proxy.external_source_address",
            ),
            (
                "external_source_address = \"224.0.0.1\"",
                "proxy.external_source_address",
            ),
            (
                "external_source_address = \"10.77.0.1\"",
                "proxy.external_source_address",
            ),
            (
                "internal_source_address = \"203.0.113.1\"",
                "proxy.internal_source_address",
            ),
            (
                "internal_source_address = \"255.255.255.255\"",
                "proxy.internal_source_address",
            ),
        ] {
            let e = err_of(&with(kv));
            assert!(e.contains(field), "{kv}: {e}");
        }
        let e = err_of(&with("external_source_address = \"not-an-ip\""));
        assert!(e.contains("external_source_address"), "{e}");
    }

    /// Issue #14 item 8: the `[limits]` keys of connection and request
    /// admission have sane defaults and are validated.
    #[test]
    fn limits_keys_default_and_are_validated() {
        let c = Config::from_toml(GOOD).expect("valid");
        let l = &c.limits;
        assert_eq!(
            (
                l.max_connections_per_source,
                l.max_handshakes_per_source,
                l.handshake_timeout_secs,
                l.message_timeout_secs
            ),
            (128, 16, 10, 10)
        );
        assert_eq!(
            (
                l.request_rate,
                l.request_burst,
                l.invite_rate,
                l.invite_burst
            ),
            (50, 200, 10, 50)
        );
        assert_eq!(
            (
                l.register_rate,
                l.register_burst,
                l.global_request_rate,
                l.global_request_burst
            ),
            (5, 20, 2000, 4000)
        );
        assert_eq!(
            (
                l.max_tracked_sources,
                l.register_failures_per_source,
                l.register_failures_per_aor,
                l.register_failure_window_secs,
                l.block_secs
            ),
            (65536, 10, 20, 300, 900)
        );
        assert_eq!(l.ipv6_source_prefix, 64);
        let with = |kv: &str| format!("{GOOD}\n[limits]\n{kv}\n");
        let c =
            Config::from_toml(&with("invite_rate = 2\nmessage_timeout_secs = 30")).expect("valid");
        assert_eq!(
            (c.limits.invite_rate, c.limits.message_timeout_secs),
            (2, 30)
        );
        for (kv, field) in [
            (
                "max_connections_per_source = 0",
                "limits.max_connections_per_source",
            ),
            (
                "max_handshakes_per_source = 200",
                "limits.max_handshakes_per_source",
            ),
            (
                "handshake_timeout_secs = 0",
                "limits.handshake_timeout_secs",
            ),
            (
                "message_timeout_secs = 99999",
                "limits.message_timeout_secs",
            ),
            ("invite_rate = 0", "limits.invite_rate"),
            ("register_burst = 0", "limits.register_burst"),
            ("global_request_rate = 0", "limits.global_request_rate"),
            ("max_tracked_sources = 0", "limits.max_tracked_sources"),
            ("block_secs = 0", "limits.block_secs"),
            (
                "register_failures_per_aor = 0",
                "limits.register_failures_per_aor",
            ),
            ("invite_rate = -1", "invite_rate"),
            ("ipv6_source_prefix = 16", "limits.ipv6_source_prefix"),
            ("ipv6_source_prefix = 129", "limits.ipv6_source_prefix"),
        ] {
            let e = err_of(&with(kv));
            assert!(e.contains(field), "{kv}: {e}");
        }
    }

    #[test]
    fn example_config_in_repo_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sip-edge.example.toml");
        Config::from_file(&path).expect("shipped example config must validate");
    }
}
