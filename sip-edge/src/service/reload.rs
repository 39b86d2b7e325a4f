//! One reload (SIGHUP, `sip-edge reload`): re-read the config file, check
//! it in full as `check-config` does (a file with any error changes
//! nothing, and the answer says why), then apply what changes live in
//! this order, each step only after the one before succeeded:
//!
//! 1. the certificate pair (`certs`): loaded whole or the reload stops
//!    here with nothing changed;
//! 2. the datapath's media ports, when `media.port_ranges` changed: the
//!    new ranges join the old ones in XDP's port policy (ports of removed
//!    ranges stay closed to all but the pinholes of calls in progress
//!    until a restart), and are reserved against ephemeral use;
//! 3. the transport driver's settings (`transport::live`): routes,
//!    access, limits, timers, media policy and ranges of new calls;
//! 4. the log filter.
//!
//! Every changed key is logged and answered with its class (`diff`).
//!
//! Data in: the config file, the running parts' handles. Data out: an
//! [`Outcome`] (logged, sent to the control client).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{
    certs::{self, CertStore},
    diff::{self, Apply, Change},
    notify,
};
use crate::{
    config::{
        check::{Options, RealHost, Report},
        Config, PortRange,
    },
    datapath::maps::DatapathMaps,
    transport::live::{self, Command},
};

/// How long the driver may take to apply new settings.
const APPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// Sets the process's log filter (tracing's reload handle, from `main.rs`).
pub type SetLog = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The running transport as a reload sees it.
pub struct TransportHandle {
    /// The driver's command queue.
    pub commands: mpsc::Sender<Command>,
    /// The listeners' certificate.
    pub certs: Arc<CertStore>,
    /// Bound listener addresses (internal, external, internal UDP).
    pub internal: SocketAddr,
    /// External listener.
    pub external: SocketAddr,
    /// Internal UDP listener.
    pub internal_udp: Option<SocketAddr>,
}

/// The result of one reload.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    /// Whether the file was taken (every live change applied).
    pub ok: bool,
    /// Why not: the check's report, or the step that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every changed key with its class.
    pub changes: Vec<Change>,
    /// Warnings of the check (the file was taken).
    pub warnings: Vec<String>,
    /// The certificate now presented, when the reload changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

impl Outcome {
    fn refused(why: String) -> Outcome {
        Outcome {
            ok: false,
            error: Some(why),
            ..Outcome::default()
        }
    }

    /// The human form (`sip-edge reload` without `--json`).
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(e) = &self.error {
            s.push_str(&format!("reload refused, nothing changed:\n{e}"));
            if !e.ends_with('\n') {
                s.push('\n');
            }
            return s;
        }
        for w in &self.warnings {
            s.push_str(&format!("{w}\n"));
        }
        s.push_str(&diff::render(&self.changes));
        if let Some(c) = &self.certificate {
            s.push_str(&format!("certificate reloaded: {c}\n"));
        }
        let restart: Vec<&str> = self
            .changes
            .iter()
            .filter(|c| c.apply == Apply::Restart)
            .map(|c| c.key.as_str())
            .collect();
        if !restart.is_empty() {
            s.push_str(&format!(
                "restart the agent to apply: {}\n",
                restart.join(", ")
            ));
        }
        s
    }
}

/// Holds what a reload compares against and the handles it applies through.
pub struct Reloader {
    path: PathBuf,
    started: Config,
    started_raw: toml::Table,
    applied: Config,
    applied_raw: toml::Table,
    transport: Option<TransportHandle>,
    set_log: Option<SetLog>,
    /// The filter of `--log`/`SIP_EDGE_LOG`, in force when `[agent] log` is unset.
    default_log: String,
    /// Media port ranges XDP treats as media since start (only grows).
    media_ports: Vec<PortRange>,
}

fn raw(path: &std::path::Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.parse::<toml::Table>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

impl Reloader {
    /// A reloader for the agent started from `path` with `started`.
    pub fn new(
        path: PathBuf,
        started: Config,
        transport: Option<TransportHandle>,
        set_log: Option<SetLog>,
        default_log: String,
    ) -> Reloader {
        // The file may have changed since the start's check; an unreadable
        // one compares as empty (every key then shows as changed once).
        let started_raw = raw(&path).unwrap_or_default();
        Reloader {
            media_ports: started.media_ranges(),
            applied: started.clone(),
            applied_raw: started_raw.clone(),
            started,
            started_raw,
            path,
            transport,
            set_log,
            default_log,
        }
    }

    /// The configuration in force (restart-only values as at start).
    pub fn applied(&self) -> &Config {
        &self.applied
    }

    /// Re-reads, checks and applies the file; logs and returns the outcome.
    pub async fn reload(&mut self) -> Outcome {
        notify::reloading();
        let out = self.reload_inner().await;
        match &out.error {
            Some(e) => {
                warn!(file = %self.path.display(), error = %e.trim_end(), "reload refused; the running configuration is unchanged")
            }
            None => {
                for c in &out.changes {
                    info!(
                        key = %c.key,
                        old = c.old.as_deref().unwrap_or("(unset)"),
                        new = c.new.as_deref().unwrap_or("(unset)"),
                        applied = ?c.apply,
                        "{}",
                        match c.apply {
                            Apply::Live => "config key changed: applied",
                            Apply::Restart => "config key changed: needs a restart, running value kept",
                        }
                    );
                }
                info!(
                    file = %self.path.display(),
                    changed = out.changes.len(),
                    restart_needed = out.changes.iter().filter(|c| c.apply == Apply::Restart).count(),
                    "reload done"
                );
            }
        }
        notify::ready(if out.ok {
            "running (configuration reloaded)"
        } else {
            "running (last reload refused; see the log)"
        });
        out
    }

    async fn reload_inner(&mut self) -> Outcome {
        let report = Report::of_file(&self.path, Options::default(), &RealHost);
        if report.has_errors() {
            return Outcome::refused(report.render());
        }
        let warnings: Vec<String> = report.findings.iter().map(ToString::to_string).collect();
        let Some(new) = report.into_config() else {
            return Outcome::refused("the file did not parse".into());
        };
        let new_raw = match raw(&self.path) {
            Ok(t) => t,
            Err(e) => return Outcome::refused(e),
        };
        let changes = diff::diff(&self.started_raw, &self.applied_raw, &new_raw);
        let eff = diff::effective(&self.started, &new);
        // 1. The certificate: whole or nothing.
        let mut certificate = None;
        if let (Some(t), Some(p)) = (&self.transport, &eff.proxy) {
            let before = t.certs.current();
            if let Err(e) = t.certs.replace(&p.cert, &p.key) {
                return Outcome::refused(format!(
                    "proxy.cert/proxy.key: {e}; the certificate in use stays"
                ));
            }
            let now = t.certs.current();
            if now.cert != before.cert {
                let s = certs::summary(&now);
                info!(certificate = %s, "new TLS handshakes present the reloaded certificate; established connections keep theirs");
                certificate = Some(s);
            }
        }
        // 2. Media ports in XDP (before the media layer may hand them out).
        let ranges = eff.media_ranges();
        let added: Vec<PortRange> = ranges
            .iter()
            .filter(|r| !self.media_ports.contains(r))
            .copied()
            .collect();
        if !added.is_empty() {
            let mut all = self.media_ports.clone();
            all.extend(added.iter().copied());
            if let Err(e) = self.widen_media_ports(&eff, &all) {
                return Outcome::refused(format!("media.port_ranges: {e}"));
            }
            self.media_ports = all;
        }
        // 3. The transport.
        if let Some(t) = &self.transport {
            let Some(settings) = live::live_settings(&eff, t.internal, t.external, t.internal_udp)
            else {
                return Outcome::refused("no [proxy] section in force".into());
            };
            let (done, applied) = oneshot::channel();
            let cmd = Command::Apply {
                settings: Box::new(settings),
                done,
            };
            if t.commands.send(cmd).await.is_err() {
                return Outcome::refused("the SIP transport has stopped".into());
            }
            match tokio::time::timeout(APPLY_TIMEOUT, applied).await {
                Ok(Ok(())) => {}
                _ => {
                    return Outcome::refused(
                        "the SIP transport did not confirm the new settings".into(),
                    )
                }
            }
        }
        // 4. The log filter.
        if eff.agent.log != self.applied.agent.log {
            if let Some(set) = &self.set_log {
                let f = eff.agent.log.as_deref().unwrap_or(&self.default_log);
                if let Err(e) = set(f) {
                    warn!(error = %e, filter = f, "log filter not changed");
                }
            }
        }
        self.applied = eff;
        self.applied_raw = new_raw;
        Outcome {
            ok: true,
            error: None,
            changes,
            warnings,
            certificate,
        }
    }

    /// XDP treats `all` as media ports from now on; the new ones are
    /// reserved against ephemeral use (`ports::reserve`).
    fn widen_media_ports(&self, eff: &Config, all: &[PortRange]) -> Result<(), String> {
        let mut maps = DatapathMaps::from_pins(&eff.pin_dir).map_err(|e| e.to_string())?;
        let mut pass = eff.signalling.ports.clone();
        pass.extend(&eff.signalling.admin_ports);
        let spans: Vec<(u16, u16)> = all.iter().map(|r| (r.start, r.end)).collect();
        maps.set_port_policy(&spans, &pass)
            .map_err(|e| e.to_string())?;
        crate::ports::reserve(std::path::Path::new(crate::ports::RESERVED_PORTS), all)
            .map_err(|e| e.to_string())?;
        info!(ranges = ?eff.media.port_ranges, "media ranges of new calls changed; XDP's media ports widened");
        Ok(())
    }

    /// Looks at the certificate files (the `[agent] cert_check_secs` poll).
    pub fn check_cert_files(&self) {
        let Some(t) = &self.transport else { return };
        match t.certs.check_files() {
            Ok(certs::CertCheck::Unchanged) => {}
            Ok(certs::CertCheck::Replaced { summary }) => {
                info!(certificate = %summary, "certificate files changed: new TLS handshakes present the new certificate; established connections keep theirs");
            }
            Err(e) => {
                warn!(error = %e, "certificate files changed but the pair was refused; the certificate in use stays");
            }
        }
    }
}
