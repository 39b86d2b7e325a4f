//! Agent configuration: parsed from TOML (unknown keys rejected) and
//! validated in full before anything is loaded, attached or bound. `main.rs`
//! exits with code 64 (EX_USAGE) on any error from here.

use std::{
    collections::HashSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

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
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error (carries line and column).
        #[source]
        source: toml::de::Error,
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

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), reason: reason.into() }
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
    pub internal: Vec<IpAddr>,
    /// The edge's public addresses (outside).
    pub public: Vec<IpAddr>,
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

/// `[limits]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Size of the pinhole table (each flow direction is one entry).
    #[serde(default = "default_max_pinholes")]
    pub max_pinholes: u32,
}

fn default_max_pinholes() -> u32 {
    65536
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_pinholes: default_max_pinholes() }
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
    let start: u16 = a.parse().map_err(|_| format!("{a:?} is not a port number (1-65535)"))?;
    let end: u16 = b.parse().map_err(|_| format!("{b:?} is not a port number (1-65535)"))?;
    if start > end {
        return Err(format!("range {s:?} is empty: {start} > {end}"));
    }
    Ok(PortRange { start, end })
}

impl Config {
    /// Read, parse and validate `path`.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
            other => other,
        })
    }

    /// Parse and validate TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|source| ConfigError::Parse { path: PathBuf::from("<text>"), source })?;
        config.validate()?;
        Ok(config)
    }

    /// The validated media port ranges.
    pub fn media_ranges(&self) -> Vec<PortRange> {
        // validate() has checked every entry parses; skip none silently.
        self.media.port_ranges.iter().filter_map(|r| parse_port_range(r).ok()).collect()
    }

    /// Every rule of the file that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interfaces.is_empty() {
            return Err(invalid("interface", "at least one [[interface]] is required"));
        }
        let mut names = HashSet::new();
        for (i, iface) in self.interfaces.iter().enumerate() {
            let field = format!("interface[{i}].name");
            if iface.name.is_empty() || iface.name.len() > 15 || iface.name.contains('/') {
                return Err(invalid(field, format!("{:?} is not a valid interface name (1-15 bytes)", iface.name)));
            }
            if !names.insert(iface.name.as_str()) {
                return Err(invalid(field, format!("{:?} is listed twice", iface.name)));
            }
        }
        if self.addresses.public.is_empty() {
            return Err(invalid("addresses.public", "at least one public address is required"));
        }
        let mut seen = HashSet::new();
        for (field, list) in [("addresses.internal", &self.addresses.internal), ("addresses.public", &self.addresses.public)] {
            for ip in list {
                if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                    return Err(invalid(field, format!("{ip} cannot be an edge address")));
                }
                if !seen.insert(*ip) {
                    return Err(invalid(field, format!("{ip} is listed more than once")));
                }
            }
        }
        if self.media.port_ranges.is_empty() {
            return Err(invalid("media.port_ranges", "at least one range is required, e.g. \"40000-49999\""));
        }
        let mut ranges = Vec::new();
        for (i, r) in self.media.port_ranges.iter().enumerate() {
            let field = format!("media.port_ranges[{i}]");
            let range = parse_port_range(r).map_err(|reason| invalid(&field, reason))?;
            if range.start < MIN_MEDIA_PORT {
                return Err(invalid(field, format!("{r:?} starts below {MIN_MEDIA_PORT}; media ports must not be privileged ports")));
            }
            for other in &ranges {
                let o: &PortRange = other;
                if range.start <= o.end && o.start <= range.end {
                    return Err(invalid(field, format!("{r:?} overlaps {}-{}", o.start, o.end)));
                }
            }
            ranges.push(range);
        }
        for (field, ports) in [("signalling.ports", &self.signalling.ports), ("signalling.admin_ports", &self.signalling.admin_ports)] {
            for p in ports {
                if *p == 0 {
                    return Err(invalid(field, "port 0 is not a port"));
                }
                if let Some(r) = ranges.iter().find(|r| r.contains(*p)) {
                    return Err(invalid(field, format!("port {p} lies inside media range {}-{}; the edge's own ports must never be media ports", r.start, r.end)));
                }
            }
        }
        if self.limits.max_pinholes == 0 || self.limits.max_pinholes > 1 << 24 {
            return Err(invalid("limits.max_pinholes", "must be between 1 and 16777216"));
        }
        if !self.pin_dir.is_absolute() {
            return Err(invalid("pin_dir", format!("{} must be an absolute path on bpffs", self.pin_dir.display())));
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
        assert_eq!(c.media_ranges(), vec![PortRange { start: 40000, end: 40999 }, PortRange { start: 50000, end: 50000 }]);
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
        assert!(e.contains("listed twice"), "{e}");
        let e = err_of(&GOOD.replace("public = [\"203.0.113.1\"]", "public = [\"10.77.0.1\"]"));
        assert!(e.contains("more than once"), "{e}");
    }

    #[test]
    fn missing_public_address_is_rejected() {
        let e = err_of(&GOOD.replace("public = [\"203.0.113.1\"]", "public = []"));
        assert!(e.contains("addresses.public"), "{e}");
    }

    #[test]
    fn example_config_in_repo_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sip-edge.example.toml");
        Config::from_file(&path).expect("shipped example config must validate");
    }
}
