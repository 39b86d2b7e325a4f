//! Changes to a running core (`crate::service`): new settings from a
//! reload, and the drain of a graceful stop. Dialogs, transactions and
//! registrations in progress are kept; only what new requests meet
//! changes.

use super::*;
use crate::{config::MediaCandidates, media::manager::Settings as MediaSettings};

impl Proxy {
    /// Routes, access rules and limits of a reloaded config. The edge's
    /// own addresses and ports stay those of the running listeners (a
    /// dialog in progress names them in its route set). Per-peer request
    /// buckets start full again (their peers may have moved).
    pub fn set_settings(&mut self, mut s: ProxySettings) {
        s.internal = self.settings.internal.clone();
        s.external = self.settings.external.clone();
        s.internal_udp_port = self.settings.internal_udp_port;
        self.settings = s;
        self.rates = access::RateLimits::default();
        // The maximum call length may have changed: look again.
        self.stale_check_at = None;
    }

    /// New admission limits; blocks and buckets in progress are kept.
    pub fn set_admission_settings(&mut self, s: super::super::admission::AdmissionSettings) {
        self.admission.set_settings(s);
    }

    /// New media settings for the media layer (`MediaControl::reconfigure`).
    pub fn reconfigure_media(&mut self, s: MediaSettings, candidates: MediaCandidates) {
        self.media.reconfigure(s, candidates);
    }

    /// A graceful stop began: new calls are refused from now on.
    pub fn start_drain(&mut self) {
        self.draining = true;
    }

    /// Calls (INVITE dialogs) not yet ended.
    pub fn calls_in_progress(&self) -> usize {
        self.dialogs.values().filter(|d| !d.ended).count()
    }

    /// While draining, a new INVITE (no To tag) gets 503 with Retry-After
    /// (RFC 3261 §21.5.4: the client tries another edge or comes back);
    /// requests within dialogs in progress, BYE above all, go on.
    pub(super) fn refuse_while_draining(&self, msg: &Message, method: &str) -> Result<(), Reject> {
        if self.draining && method == "INVITE" && msg.to_tag().ok().flatten().is_none() {
            return Err(busy("the edge is shutting down; try again later"));
        }
        Ok(())
    }
}
