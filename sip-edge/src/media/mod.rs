//! Media of proxied dialogs: the boundary between the SIP proxy and the
//! pinhole machinery. The proxy reports every SDP body it forwards (with the
//! dialog, offer/answer role, the side it came from and the TLS peer that
//! sent it) and every dialog end; the media layer rewrites the SDP, decides
//! pinholes (sans-IO, `manager`), and the map writer applies them.
//!
//! Data flow: proxy → [`MediaControl`] → pinhole manager (decides) →
//! `datapath::maps` (the only BPF map writer) → XDP.

pub mod adopt;
pub mod control;
pub mod manager;
pub mod policy;

#[cfg(test)]
mod tests;

use std::{net::SocketAddr, time::Instant};

/// Which side of the edge a message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// From an internal client.
    Internal,
    /// From an external peer.
    External,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Internal => Side::External,
            Side::External => Side::Internal,
        }
    }
}

/// Identifies one INVITE-initiated dialog set at the edge: the Call-ID and
/// the caller's From tag. Forked early dialogs are told apart by the callee's
/// To tag passed with each answer.
///
/// The proxy's dialog table, the media manager (its dialogs and the owner
/// of each flow) and the crash journal each hold the key of every call;
/// its parts are [`SharedStr`]s, so those copies share one allocation of
/// each string (issue #12: bytes per established call).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DialogKey {
    /// Call-ID header value.
    pub call_id: SharedStr,
    /// From tag of the dialog-creating request.
    pub from_tag: SharedStr,
}

/// An immutable string whose clones share one allocation: an `Arc<str>`
/// with the comparisons and conversions a `String` field had, so the
/// dialog key's users read it as before. Hash, equality and order are
/// those of the `str` (`Borrow<str>` holds).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SharedStr(std::sync::Arc<str>);

impl SharedStr {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for SharedStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> Self {
        SharedStr(s.into())
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        SharedStr(s.into())
    }
}

impl From<&String> for SharedStr {
    fn from(s: &String) -> Self {
        SharedStr(s.as_str().into())
    }
}

impl From<SharedStr> for String {
    fn from(s: SharedStr) -> Self {
        s.0.as_ref().to_owned()
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, o: &str) -> bool {
        *self.0 == *o
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, o: &&str) -> bool {
        *self.0 == **o
    }
}

impl PartialEq<String> for SharedStr {
    fn eq(&self, o: &String) -> bool {
        *self.0 == **o
    }
}

impl PartialEq<SharedStr> for str {
    fn eq(&self, o: &SharedStr) -> bool {
        *self == *o.0
    }
}

impl PartialEq<SharedStr> for &str {
    fn eq(&self, o: &SharedStr) -> bool {
        **self == *o.0
    }
}

impl PartialEq<SharedStr> for String {
    fn eq(&self, o: &SharedStr) -> bool {
        **self == *o.0
    }
}

/// Offer or answer (RFC 3264), decided by the proxy from the message flow:
/// INVITE/UPDATE/re-INVITE with SDP = offer and its 2xx/18x SDP = answer; an
/// INVITE without SDP makes the 2xx SDP the offer and the ACK SDP the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SdpRole {
    /// An offer.
    Offer,
    /// An answer (reliable: 2xx, ACK, or a response to UPDATE/PRACK).
    Answer,
    /// SDP in a provisional (18x) response: early media, see the
    /// media layer's documented policy.
    EarlyAnswer,
}

/// One SDP body passing through the edge.
#[derive(Clone, Debug)]
pub struct SdpEvent<'a> {
    /// The dialog it belongs to.
    pub dialog: &'a DialogKey,
    /// The callee's To tag, for answers (tells forks apart); `None` for offers in initial INVITEs.
    pub to_tag: Option<&'a str>,
    /// Offer or answer.
    pub role: SdpRole,
    /// Side the message arrived from.
    pub from_side: Side,
    /// Transport address of the connection it arrived on (the signalling
    /// source: a pinhole's internal target must be this host or inside an
    /// allowed subnet, DESIGN.md §3).
    pub source: SocketAddr,
    /// Extra addresses (CIDR) the far party may receive media at besides
    /// its signalling source: the `media_sources` of its `[[route]]`, as
    /// the proxy matched it from the connection (empty for the inside).
    pub media_sources: &'a [crate::config::Cidr],
    /// How the outside party's real media source is learned, as the proxy
    /// decided from who the party is (a `[[peer]]`'s `latch`, a remote user
    /// registered through the edge); `Config` for the inside and for
    /// parties the proxy knows nothing about.
    pub far_media: FarMedia,
    /// The body as received.
    pub body: &'a [u8],
    /// Content-Type of the body (`application/sdp`, `text/x-msmsgsinvite`, ...).
    pub content_type: &'a str,
}

/// How the outside party's real media source is learned (DESIGN.md §2:
/// strict by default; latching is opt-in, happens once and never moves).
/// Serialized in the restart journal and the HA store (`media::adopt`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FarMedia {
    /// `[media] latch` decides (strict unless it is set).
    #[default]
    Config,
    /// Only the address and port signalling named (a `[[peer]]` with
    /// `latch = "off"`).
    Strict,
    /// The address signalling named; the port is learned from the first
    /// packet and fixed after (`latch = "port"`).
    LatchPort,
    /// Address and port learned once from the first packet
    /// (`latch = "full"`).
    Latch,
    /// A remote user registered through the edge, maybe behind NAT: every
    /// address its SDP names (private or not) is replaced by its signalling
    /// source address, and the port is learned once from its first packet.
    /// Media is never sent to, nor accepted from, a third address.
    RemoteUser,
}

/// Why the media layer refused a body; the proxy answers the request with
/// the given status (or, for a response, turns it into a failure toward the
/// other side and ends the dialog).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MediaError {
    /// The body cannot be parsed or names nothing usable (488 Not Acceptable Here).
    #[error("unacceptable session description: {reason}")]
    NotAcceptable {
        /// Why.
        reason: String,
    },
    /// The description breaks policy, e.g. an internal target that is not the
    /// signalling source nor in an allowed subnet (488, or 403).
    #[error("media refused by policy: {reason}")]
    Forbidden {
        /// What was refused and why, for the Warning header and logs.
        reason: String,
        /// The endpoint-policy rule, when one refused it (DESIGN.md §3).
        rule: Option<policy::Refusal>,
    },
    /// Per-client or global pinhole/port limit reached (503 with Retry-After).
    #[error("media capacity exhausted: {reason}")]
    Exhausted {
        /// Which limit.
        reason: String,
    },
}

impl MediaError {
    /// The SIP status the proxy should answer with.
    pub fn status(&self) -> u16 {
        match self {
            MediaError::NotAcceptable { .. } => 488,
            MediaError::Forbidden { .. } => 488,
            MediaError::Exhausted { .. } => 503,
        }
    }
}

/// Why a dialog's media ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// BYE.
    Bye,
    /// CANCEL of the initial INVITE.
    Cancel,
    /// Final non-2xx response to the initial INVITE.
    Failure(u16),
    /// A transaction timed out (Timer B/F, no ACK for a 2xx).
    Timeout,
    /// The proxy is shutting down or the connection it depended on is gone.
    Shutdown,
}

/// What the proxy calls. Implementations must be cheap (no blocking I/O
/// beyond map writes) and must never panic on any body.
pub trait MediaControl: Send {
    /// Rewrite `ev.body` for the other side and update the dialog's media;
    /// returns the body to forward.
    fn on_sdp(&mut self, ev: &SdpEvent<'_>, now: Instant) -> Result<Vec<u8>, MediaError>;
    /// The dialog (or, with `to_tag`, one fork of it) ended: remove its pinholes.
    fn on_dialog_end(
        &mut self,
        dialog: &DialogKey,
        to_tag: Option<&str>,
        reason: EndReason,
        now: Instant,
    );
    /// Periodic timer (idle/never-used/maximum-length expiry); the proxy
    /// calls it at least once a second. Returns dialogs whose media expired,
    /// so the proxy can end them (e.g. send BYE both ways).
    fn on_tick(&mut self, now: Instant) -> Vec<DialogKey>;
    /// Between ticks (the driver calls it every 100 ms): a share of the
    /// tick's work done ahead (reading the flows' counters, checking the
    /// dialogs for expiry), so the tick itself stays short (issue #12: at
    /// 50k held calls that work held the driver for milliseconds every
    /// second while calls waited). The tick still does whatever this did
    /// not, and ends what expired.
    fn on_timers(&mut self, now: Instant) {
        let _ = now;
    }
    /// A BYE for a dialog this process does not know (Call-ID `call_id`,
    /// the BYE's From and To tags in `tags`): remove the pinholes an
    /// earlier run of the agent left for it (`media::adopt`); whether there
    /// were any.
    fn end_adopted(&mut self, call_id: &str, tags: &[&str], now: Instant) -> bool {
        let _ = (call_id, tags, now);
        false
    }
    /// A new read of the HA store is ready (`crate::ha::snapshot_ready`):
    /// follow it now (mirrors in, mirrors out) instead of at the next tick.
    fn sync_replicas(&mut self) {}
    /// Every flow this media layer installed, with its dialog and counters
    /// (`sip-edge calls`, `sip-edge pinholes`; `crate::status`).
    fn pinholes(&mut self) -> Vec<crate::status::PinholeStatus> {
        Vec::new()
    }
    /// A reloaded config's media settings (`crate::service`): apply to new
    /// offers, keep what is installed. Layers without settings ignore it.
    fn reconfigure(
        &mut self,
        settings: manager::Settings,
        candidates: crate::config::MediaCandidates,
    ) {
        let _ = (settings, candidates);
    }
}
