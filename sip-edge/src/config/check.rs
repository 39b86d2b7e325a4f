//! `check-config` and the first step of `run`: everything the agent would
//! find out only while starting (or never), checked from a parsed, valid
//! [`Config`] without loading or attaching anything.
//!
//! Three groups:
//! - rules between keys (`rules`): listeners outside the media ranges and
//!   inside `[signalling] ports`, each listener on an edge address of the
//!   side it serves, no internal listener on a public or wildcard address,
//!   next hops that are not the edge;
//! - the host (`host`, skipped with `--no-host-checks` when the file is
//!   checked on another machine): interfaces exist, `pin_dir` is on bpffs,
//!   listener and source addresses are configured here;
//! - TLS material (`tls`, a host check too: its paths name files on the
//!   edge): certificate, key and CA files open and parse, the key matches
//!   the certificate, validity and SANs (warned).
//!
//! Data in: a [`Config`] (from `Config::from_file`), a [`Host`], the clock.
//! Data out: [`Finding`]s; `main.rs` prints them and exits 64 on any error.

pub mod host;
pub mod rules;
pub mod tls;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

pub use self::host::{Host, RealHost};
use super::{Config, ConfigError};

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The agent must not start with this (exit 64).
    Error,
    /// The agent can start, but something will not work as expected.
    Warning,
}

/// One thing wrong with a configuration, with the key it is about.
#[derive(Debug)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// Dotted key as written in the file (`proxy.internal_listen`).
    pub key: String,
    /// What is wrong and what to do.
    pub problem: Problem,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}: {}", self.key, self.problem)
    }
}

/// What a finding says. Every message names the expected form or what to
/// change.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// A listener's port is 0 (the kernel would pick one nobody knows).
    #[error("{addr}: port 0 lets the kernel pick a port no client or peer knows; give the port, e.g. 5061 for TLS")]
    ListenerPortZero {
        /// The listener.
        addr: SocketAddr,
    },
    /// A listener's port lies in a media range: XDP drops what arrives.
    #[error("port {port} of {addr} lies inside media range {range} (media.port_ranges); XDP drops every packet to a media port that no pinhole matches, so nothing would reach this listener: move the listener (5061 for TLS) or the range")]
    ListenerInMediaRange {
        /// The listener.
        addr: SocketAddr,
        /// Its port.
        port: u16,
        /// The range, `lo-hi`.
        range: String,
    },
    /// A listener's port is not passed by XDP.
    #[error("port {port} of {addr} is not in signalling.ports {ports:?}; XDP passes only those ports (and admin_ports) to the kernel whatever [policy] default says later: add {port} to [signalling] ports")]
    ListenerPortNotPassed {
        /// The listener.
        addr: SocketAddr,
        /// Its port.
        port: u16,
        /// What `[signalling] ports` lists.
        ports: Vec<u16>,
    },
    /// An internal listener on the wildcard address.
    #[error("{addr} listens on every address, the public ones too: outside parties would reach the listener that trusts internal clients and relays to the trunk (an open relay); listen on one of addresses.internal {internal:?}")]
    InternalListenerWildcard {
        /// The listener.
        addr: SocketAddr,
        /// `addresses.internal`.
        internal: Vec<IpAddr>,
    },
    /// An internal listener on a public address.
    #[error("{addr} is on the edge's public address (addresses.public): outside parties would reach the listener that trusts internal clients and relays to the trunk (an open relay); listen on one of addresses.internal {internal:?}")]
    InternalListenerOnPublic {
        /// The listener.
        addr: SocketAddr,
        /// `addresses.internal`.
        internal: Vec<IpAddr>,
    },
    /// The external listener on an internal address.
    #[error("{addr} is on the edge's internal address (addresses.internal): peers outside cannot reach it, and inside clients would be treated as outside parties; listen on one of addresses.public {public:?}")]
    ExternalListenerOnInternal {
        /// The listener.
        addr: SocketAddr,
        /// `addresses.public`.
        public: Vec<IpAddr>,
    },
    /// The external listener on the wildcard address.
    #[error("{addr} listens on every address, the internal ones too: inside clients reaching it are treated as outside parties; prefer one of addresses.public {public:?}")]
    ExternalListenerWildcard {
        /// The listener.
        addr: SocketAddr,
        /// `addresses.public`.
        public: Vec<IpAddr>,
    },
    /// A wildcard listener and another listener on the same port.
    #[error("{addr} listens on every address and {other_key} ({other}) uses the same port: the second bind fails at start; give them different ports or name the external address")]
    WildcardSharesPort {
        /// The wildcard listener.
        addr: SocketAddr,
        /// The other listener's key.
        other_key: &'static str,
        /// The other listener.
        other: SocketAddr,
    },
    /// A listener's address is not an edge address of its side.
    #[error("{addr} is not one of the edge's {side} addresses ({list_key} = {have:?}); listen on one of them, or add the address to {list_key}")]
    ListenerNotEdgeAddress {
        /// The listener.
        addr: SocketAddr,
        /// "internal" or "public".
        side: &'static str,
        /// `addresses.internal` or `addresses.public`.
        list_key: &'static str,
        /// The list.
        have: Vec<IpAddr>,
    },
    /// A next hop is the edge itself: requests would loop.
    #[error("{host} is {why}: requests sent there come back to the edge and loop until Max-Forwards runs out; name the PBX, registrar or carrier the edge forwards to")]
    NextHopIsEdge {
        /// The hop's host.
        host: String,
        /// Why it is the edge.
        why: String,
    },
    /// A configured interface does not exist.
    #[error("interface {name:?} does not exist on this host{suggestion} (interfaces here: {known}); check [[interface]] name with `ip link`, or pass --no-host-checks when checking the file on another machine")]
    InterfaceMissing {
        /// The configured name.
        name: String,
        /// "; did you mean ...?" or empty.
        suggestion: String,
        /// Interfaces that exist.
        known: String,
    },
    /// The pin directory is not on bpffs.
    #[error("{dir} is not on a BPF filesystem ({detail}); maps and links can only be pinned on bpffs: mount it (`mount -t bpf bpf /sys/fs/bpf`) and set pin_dir below it, e.g. \"/sys/fs/bpf/sip-edge\"")]
    PinDirNotBpffs {
        /// The directory.
        dir: PathBuf,
        /// What it is on instead.
        detail: String,
    },
    /// An address the agent binds is not configured on the host.
    #[error("{addr} is not configured on any interface of this host{nonlocal}; the bind fails at start: add it (`ip addr add {addr}/PREFIX dev IFACE`) or fix the key")]
    NotLocal {
        /// The address.
        addr: IpAddr,
        /// Extra note when non-local binds are allowed.
        nonlocal: &'static str,
    },
    /// An edge address is not configured on the host (warned: floating
    /// addresses move in later).
    #[error("{addr} is not configured on any interface of this host: XDP matches media to it, but unless it is a floating address that moves here (keepalived, VRRP) nothing will arrive; add it or remove it")]
    EdgeAddressNotLocal {
        /// The address.
        addr: IpAddr,
    },
    /// The host's addresses or interfaces could not be listed.
    #[error("cannot list this host's {what}: {error}; the related checks were skipped")]
    HostUnreadable {
        /// Interfaces or addresses.
        what: &'static str,
        /// The OS error.
        error: String,
    },
    /// A flow-token key file cannot be used (`proxy::tokens`): missing,
    /// unreadable or too short. A host check like the TLS files, so the
    /// file alone can be checked on another machine.
    #[error("{reason}")]
    TokenKey {
        /// What is wrong, naming the file.
        reason: String,
    },
    /// A TLS file problem (see [`tls::TlsProblem`]).
    #[error(transparent)]
    Tls {
        /// What is wrong.
        #[from]
        source: tls::TlsProblem,
    },
}

impl Finding {
    fn error(key: impl Into<String>, problem: impl Into<Problem>) -> Finding {
        Finding {
            severity: Severity::Error,
            key: key.into(),
            problem: problem.into(),
        }
    }

    fn warning(key: impl Into<String>, problem: impl Into<Problem>) -> Finding {
        Finding {
            severity: Severity::Warning,
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// What to check besides the rules between keys.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Check the host: interfaces, bpffs, local addresses, TLS files.
    /// Off when the file is checked on another machine than the edge.
    pub host_checks: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { host_checks: true }
    }
}

/// The checks `--no-host-checks` skips, named in the report.
pub const HOST_CHECKS: &str =
    "interfaces exist, pin_dir on bpffs, addresses configured here, certificate/key/CA files";

/// Every finding for `cfg` (which passed `Config::validate`), errors first.
pub fn check(cfg: &Config, opts: Options, host: &dyn Host) -> Vec<Finding> {
    let mut out = rules::check(cfg);
    if opts.host_checks {
        out.extend(host::check(cfg, host));
        if let Some(p) = &cfg.proxy {
            out.extend(tls::check(p, std::time::SystemTime::now()));
        }
        // The flow-token secret (`proxy::tokens`) is a key like proxy.key.
        let token_keys = [
            (
                "proxy.token_key_file",
                cfg.proxy.as_ref().and_then(|p| p.token_key_file.as_deref()),
            ),
            (
                "ha.token_key_file",
                cfg.ha.as_ref().and_then(|h| h.token_key_file.as_deref()),
            ),
        ];
        for (key, path) in token_keys {
            let Some(p) = path else { continue };
            if let Err(e) = crate::proxy::tokens::key_from_file(key, p) {
                out.push(Finding::error(
                    key,
                    Problem::TokenKey {
                        reason: e.to_string(),
                    },
                ));
            } else if let Some(f) = tls::world_readable(key, p) {
                out.push(f);
            }
        }
    }
    // Stable: errors first, each group in the order of the file.
    out.sort_by_key(|f| f.severity);
    out
}

/// The outcome of checking one file.
#[derive(Debug)]
pub struct Report {
    /// The file.
    pub path: PathBuf,
    /// The parsed config, when it parsed and passed `validate`.
    pub config: Option<Config>,
    /// Why it did not parse or validate.
    pub invalid: Option<ConfigError>,
    /// Findings of the full check.
    pub findings: Vec<Finding>,
    /// Whether host checks ran.
    pub host_checks: bool,
}

impl Report {
    /// Read, parse, validate and check `path`.
    pub fn of_file(path: &Path, opts: Options, host: &dyn Host) -> Report {
        let (config, invalid, findings) = match Config::from_file(path) {
            Ok(c) => {
                let f = check(&c, opts, host);
                (Some(c), None, f)
            }
            Err(e) => (None, Some(e), Vec::new()),
        };
        Report {
            path: path.to_owned(),
            config,
            invalid,
            findings,
            host_checks: opts.host_checks,
        }
    }

    /// Whether the agent must refuse this file (exit 64).
    pub fn has_errors(&self) -> bool {
        self.invalid.is_some() || self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// The config, when the file has no errors.
    pub fn into_config(self) -> Option<Config> {
        if self.has_errors() {
            None
        } else {
            self.config
        }
    }

    /// Every line to print, each naming the file; the last one sums up.
    pub fn render(&self) -> String {
        let p = self.path.display();
        let mut s = String::new();
        match &self.invalid {
            // The TOML error already names the file and shows the line.
            Some(e @ ConfigError::Parse { .. }) | Some(e @ ConfigError::Read { .. }) => {
                s.push_str(&format!("{e}\n"));
            }
            Some(ConfigError::Invalid { field, reason }) => {
                s.push_str(&format!("{p}: error: {field}: {reason}\n"));
            }
            None => {}
        }
        for f in &self.findings {
            s.push_str(&format!("{p}: {f}\n"));
        }
        let errors = self.invalid.iter().count()
            + self
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .count();
        let warnings = self.findings.len() + self.invalid.iter().count() - errors;
        let skipped = if self.host_checks {
            String::new()
        } else {
            format!(" (host checks skipped: {HOST_CHECKS}; run check-config on the edge host to run them)")
        };
        if errors == 0 {
            let w = match warnings {
                0 => String::new(),
                1 => " with 1 warning".to_owned(),
                n => format!(" with {n} warnings"),
            };
            s.push_str(&format!("{p}: ok{w}{skipped}\n"));
        } else {
            s.push_str(&format!(
                "{p}: {errors} error(s), {warnings} warning(s){skipped}; the agent refuses this file (exit 64) before anything is attached\n"
            ));
        }
        s
    }
}
