//! Running the agent as a service (issue #9, operator experience):
//! changing its configuration without dropping calls, presenting renewed
//! TLS certificates, stopping gracefully, and telling systemd where it is.
//!
//! - `[agent]` ([`AgentSection`]): drain time, log filter, how often the
//!   certificate files are looked at;
//! - [`diff`]: which keys changed between two files and whether each
//!   applies live or needs a restart (sans-IO, unit-tested);
//! - [`reload`]: SIGHUP and `sip-edge reload` (control socket): re-read
//!   the file, check it as `check-config` does (a bad file changes
//!   nothing), apply what can change live, report every changed key;
//! - [`certs`]: the listeners' certificate behind a swappable handle, new
//!   handshakes use the newest valid pair; polled for file changes;
//! - [`notify`]: sd_notify readiness, reloading and stopping states.
//!
//! Data flow: signal or control query → `reload::Reloader` → config file
//! → `config::check` → `diff` → the running parts' swappable handles
//! (transport driver command, certificate store, log filter handle).

pub mod certs;
pub mod diff;
pub mod notify;
pub mod reload;

use serde::Deserialize;

use crate::config::{invalid, ConfigError};

/// Longest drain the config accepts (an hour: a stop that waits longer is
/// no stop; calls keep their media through XDP with `on_exit = "keep"`).
pub const MAX_DRAIN_SECS: u64 = 3600;
/// Default interval of the certificate file check.
pub const DEFAULT_CERT_CHECK_SECS: u64 = 5;

/// `[agent]`: how the agent process behaves as a service.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// On SIGTERM, how long established calls may go on (new INVITEs get
    /// 503 with Retry-After meanwhile) before the agent exits. 0: exit at
    /// once, as before this key existed (with `on_exit = "keep"` the media
    /// of established calls keeps flowing through XDP anyway, and the next
    /// start adopts it).
    #[serde(default)]
    pub drain_secs: u64,
    /// Log filter (tracing EnvFilter syntax, e.g. `"info"` or
    /// `"info,sip_edge::proxy=debug"`); overrides `--log`/`SIP_EDGE_LOG`
    /// when set, and changes on reload.
    #[serde(default)]
    pub log: Option<String>,
    /// Seconds between looks at the certificate and key files' modification
    /// times (a changed pair is loaded as on reload); 0: only on reload.
    #[serde(default = "default_cert_check_secs")]
    pub cert_check_secs: u64,
}

fn default_cert_check_secs() -> u64 {
    DEFAULT_CERT_CHECK_SECS
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            drain_secs: 0,
            log: None,
            cert_check_secs: DEFAULT_CERT_CHECK_SECS,
        }
    }
}

impl AgentSection {
    /// Rules types cannot express (called from `Config::validate`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.drain_secs > MAX_DRAIN_SECS {
            return Err(invalid(
                "agent.drain_secs",
                format!("must be between 0 and {MAX_DRAIN_SECS} seconds"),
            ));
        }
        if self.cert_check_secs > 3600 {
            return Err(invalid(
                "agent.cert_check_secs",
                "must be between 0 (only on reload) and 3600 seconds",
            ));
        }
        if let Some(f) = &self.log {
            tracing_subscriber::EnvFilter::try_new(f).map_err(|e| {
                invalid(
                    "agent.log",
                    format!("{f:?} is not a log filter ({e}); e.g. \"info\" or \"info,sip_edge::proxy=debug\""),
                )
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(text: &str) -> Result<AgentSection, String> {
        let a: AgentSection = toml::from_str(text).map_err(|e| e.to_string())?;
        a.validate().map_err(|e| e.to_string())?;
        Ok(a)
    }

    #[test]
    fn defaults_and_bad_values() {
        assert_eq!(agent("").expect("defaults"), AgentSection::default());
        let a = agent("drain_secs = 30\nlog = \"info,sip_edge=debug\"").expect("valid");
        assert_eq!(a.drain_secs, 30);
        for (text, want) in [
            ("drain_secs = 3601", "agent.drain_secs"),
            ("cert_check_secs = 99999", "agent.cert_check_secs"),
            ("log = \"info,=[\"", "agent.log"),
            ("drain = 3", "unknown field"),
        ] {
            let e = agent(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
