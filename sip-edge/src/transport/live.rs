//! Live changes to a running transport (`crate::service`): a reloaded
//! configuration's routing, limits, timers and media settings, and the
//! drain of a graceful stop. The driver applies each [`Command`] between
//! two events, so no message is handled half under old and half under new
//! settings; connections and dialogs in progress are kept.
//!
//! Data flow: `service::reload` → [`Command`] → driver → `Proxy` (routes,
//! admission, media), `Shared` (parameters of new connections, connection
//! caps, peer identities).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::oneshot;
use tracing::info;

use super::{conn::ConnParams, limits::ConnLimitSettings, Driver};
use crate::{
    config::{Config, MediaCandidates},
    media::manager::Settings as MediaSettings,
    proxy::{admission::AdmissionSettings, ProxySettings},
    sip::framer::FramerLimits,
};

/// What a reload changes in the transport, built from the effective
/// configuration (`service::diff::effective`).
#[derive(Debug)]
pub struct LiveSettings {
    /// Routes, access rules, media sources, the dialog bound.
    pub proxy: ProxySettings,
    /// `[limits]` rates and registration-failure rules.
    pub admission: AdmissionSettings,
    /// `[media]` caps, policy, timers and ranges.
    pub media: MediaSettings,
    /// `[media] candidates`.
    pub candidates: MediaCandidates,
    /// Timers of new connections.
    pub params: ConnParams,
    /// `[limits] handshake_timeout_secs`.
    pub handshake_timeout: Duration,
    /// Accept-time connection caps.
    pub conn_limits: ConnLimitSettings,
    /// `[[peer]] tls_identity` names.
    pub peer_identities: Vec<String>,
}

/// A request to the driver.
#[derive(Debug)]
pub enum Command {
    /// Apply a reloaded configuration; `done` once applied.
    Apply {
        /// The new settings.
        settings: Box<LiveSettings>,
        /// Answered once in force.
        done: oneshot::Sender<()>,
    },
    /// A graceful stop began: refuse new calls from now on.
    Drain,
    /// How many calls are not yet ended.
    Calls {
        /// The answer.
        reply: oneshot::Sender<usize>,
    },
}

/// Parameters of new connections from `cfg`.
pub fn conn_params(cfg: &Config) -> ConnParams {
    let (idle, keepalive) = cfg
        .proxy
        .as_ref()
        .map_or((300, 0), |p| (p.idle_timeout_secs, p.keepalive_secs));
    ConnParams {
        idle: Duration::from_secs(idle),
        keepalive: (keepalive > 0).then(|| Duration::from_secs(keepalive)),
        message_timeout: Duration::from_secs(cfg.limits.message_timeout_secs),
        limits: FramerLimits::default(),
    }
}

/// `[[peer]] tls_identity` names of `cfg`.
pub fn peer_identities(cfg: &Config) -> Vec<String> {
    cfg.peers
        .iter()
        .filter_map(|p| p.tls_identity.clone())
        .collect()
}

/// The live settings of `cfg` (already the effective config: restart-only
/// values are the running ones) for the transport whose listeners are
/// bound at `internal`, `external` and `internal_udp` (`Running`); `None`
/// without `[proxy]`.
pub fn live_settings(
    cfg: &Config,
    internal: SocketAddr,
    external: SocketAddr,
    internal_udp: Option<SocketAddr>,
) -> Option<LiveSettings> {
    let p = cfg.proxy.as_ref()?;
    let mut proxy = ProxySettings::from_config(cfg, internal.port(), external.port())?;
    proxy.internal_udp_port = internal_udp.map(|a| a.port());
    Some(LiveSettings {
        proxy,
        admission: AdmissionSettings::from_limits(&cfg.limits),
        media: MediaSettings::from_config(cfg),
        candidates: cfg.media.candidates,
        params: conn_params(cfg),
        handshake_timeout: Duration::from_secs(cfg.limits.handshake_timeout_secs),
        conn_limits: ConnLimitSettings::from_limits(p.max_connections, &cfg.limits),
        peer_identities: peer_identities(cfg),
    })
}

impl Driver {
    /// Applies one command (between two events).
    pub(super) fn live(&mut self, cmd: Command) {
        match cmd {
            Command::Apply { settings, done } => {
                let s = *settings;
                self.proxy.set_settings(s.proxy);
                self.proxy.set_admission_settings(s.admission);
                self.proxy.reconfigure_media(s.media, s.candidates);
                self.shared.params.store(Arc::new(s.params));
                self.shared
                    .handshake_timeout
                    .store(Arc::new(s.handshake_timeout));
                self.shared.limits.set_settings(s.conn_limits);
                self.shared
                    .peer_identities
                    .store(Arc::new(s.peer_identities));
                info!("reloaded settings in force for new requests and connections");
                let _ = done.send(());
            }
            Command::Drain => {
                self.proxy.start_drain();
                info!(
                    calls = self.proxy.calls_in_progress(),
                    "draining: new INVITEs get 503 with Retry-After; calls in progress go on"
                );
            }
            Command::Calls { reply } => {
                let _ = reply.send(self.proxy.calls_in_progress());
            }
        }
    }
}
