//! Sans-IO pinhole manager: takes the media streams of each offer/answer the
//! proxy forwards (already parsed by `media::control` from SDP or
//! x-msmsgsinvite bodies), dialog ends, datapath activity counters and the
//! current `Instant`; decides edge port allocations and returns pinhole
//! operations ([`Op`]) that `media::control` applies to the map writer. No
//! I/O and no clock of its own: tests drive it with synthetic instants.
//!
//! Policies (documented here because the proxy and tests depend on them):
//!
//! - **When pinholes appear.** Only when a dialog's offer and an answer are
//!   both known (RFC 3264 §4): offer in INVITE + answer in 2xx/18x, or the
//!   late-offer pattern (offer in 2xx, answer in ACK), or UPDATE/re-INVITE.
//!   Nothing is ever created for a dialog that did not start with an offer
//!   the proxy reported (no REGISTER/OPTIONS path reaches this module).
//! - **Ports.** Allocated when an SDP is rewritten (the far side must see an
//!   edge port before it answers). Relay: a block on the edge address facing
//!   the side the SDP goes to; nat: a public block for the internal party's
//!   SDP only. RTP gets an even port and RTCP port+1 (RFC 3550 §11); other
//!   streams (rtcp-mux, TCP) one port. A block belongs to an m-line index of
//!   the dialog and is kept across re-offers as long as that m-line keeps its
//!   transport and family (RFC 3264 §8: m-lines are never removed, only set
//!   to port 0), so re-INVITEs and hold/resume never move the edge port.
//!   Port 0 in a completed exchange releases the m-line's ports.
//! - **Changes** (re-INVITE/UPDATE, RFC 3264 §8): a flow whose edge keys stay
//!   the same becomes [`Op::Update`]; a flow with new keys is installed
//!   before the old one is removed, unless they share a map key (then the old
//!   goes first, or the insert would fail).
//! - **Early media.** An answer in an 18x (reliable or not) installs the
//!   fork's media at once so ring-back/announcements pass (RFC 3960 gateway
//!   model), marked early. A later answer from another fork replaces it
//!   (the shared edge port can only point at one peer, so the most recent
//!   fork wins); a 2xx confirms a fork, after which other forks' answers are
//!   rewritten (nothing private leaks) but install nothing: the UAC BYEs
//!   them (RFC 3261 §13.2.2.4). Ending a fork (`to_tag`) removes its media
//!   only if it is the installed one; ending without a tag ends everything.
//! - **Forks** share the dialog's edge ports: every fork's answer is
//!   rewritten to the same edge address, so the caller never sees a change.
//! - **Expiry** (checked in [`Manager::on_tick`]): maximum call length
//!   always; idle (no packet for `idle_timeout`) once a dialog's pinholes
//!   have carried something; never-used (`unused_timeout`) for confirmed
//!   dialogs whose pinholes never carried a packet. Early media alone never
//!   starts the never-used clock: callees may ring for minutes. The check
//!   runs in shares between ticks ([`Manager::on_timers`]), the tick
//!   ending what they found.
//! - **Security** (DESIGN.md §3): every endpoint either side names (`c=`,
//!   `a=rtcp`, MSRP `a=path`, x-msmsgsinvite listeners), in offers and
//!   answers, passes `media::policy::EndpointPolicy::check`: never the
//!   edge, loopback, link-local, unspecified, multicast, broadcast or a port
//!   below 1024; an internal target must be the signalling source of the
//!   party that sent the SDP or inside an allowed subnet; an external remote
//!   never an internal subnet or private range, and by default only the far
//!   party's signalling source (route `media_sources` and `[media]
//!   external_sources = "any-public"` widen that). A refusal is logged
//!   (target `sip_edge::security`) and nothing is allocated. TCP ends that
//!   are not the connecting one must name a port ≥ 1024 too (only a
//!   connector's port is learned). Caps (flows per client IP, flows overall,
//!   calls) refuse new work with `Exhausted`, never evict.
//! - **File transfers** (`text/x-msmsgsinvite`, [`Manager::on_invitation`]):
//!   the party whose invitation names `IP-Address`/`Port` listens there and
//!   the dialog's other party connects over TCP from an ephemeral port
//!   (MSN/Messenger invitation semantics; no RFC). The addressed invitation
//!   is the moment both ends are known: the listener is the named endpoint
//!   (§3-checked like an SDP target; an internal listener also needs a port
//!   ≥ 1024), the connector is the other side's signalling source IP (from
//!   the invitation with the same `Invitation-Cookie` it sent, which an
//!   `ACCEPT` requires; for an addressed `INVITE`, the last message of that
//!   side in the dialog). For an external connector that is
//!   the TLS peer the dialog's external messages come from: the peer UA with
//!   direct federation, but the peer's proxy otherwise — then only
//!   `[media] latch = true` lets the transfer through. The connector's
//!   address is strict, its port learned from its SYN
//!   ([`LearnPort`]; full latch with `latch = true` for external
//!   connectors). The edge allocates a TCP port on the connector's side
//!   (relay: both edge ports; nat with an external connector: one public
//!   port, DNAT to the listener; nat with an internal connector: relay-style
//!   rules through the edge's internal address, since a nat SNAT rule is
//!   keyed on the client's port, which is unknown) and the invitation is
//!   rewritten to it. One flow per transfer, counted in the caps, tied to
//!   the dialog (gone with it), removed by `Invitation-Command: CANCEL` with
//!   its cookie, and expiring on its own (never used for `unused_timeout`,
//!   idle for `idle_timeout`) without ending the dialog. An `ACCEPT` needs an
//!   earlier invitation with its cookie in the same dialog, and nothing is
//!   opened in a dialog whose session the edge did not set up.
//!
//! This file owns the state (dialogs, blocks, the journal) and the queries
//! on it; the work is split by concern: `offer_answer` (rewrite and
//! commit), `ports` (edge addresses and the port pool), `policy` (the
//! endpoint and cap checks), `expiry` (ends and timers), `transfer`
//! (x-msmsgsinvite file transfers).

mod expiry;
mod ice;
mod index;
mod offer_answer;
mod policy;
mod ports;
mod rebuild;
mod transfer;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use sip_edge_common::PinholeKey;

use ports::PortSet;

use super::{
    policy::{EndpointPolicy, ExternalSources, Naming, Refusal},
    DialogKey, EndReason, FarMedia, MediaError, SdpRole, SharedStr, Side,
};
use crate::{
    config::{Cidr, Config, MediaExternalSources, MediaMode, PortRange, MIN_MEDIA_PORT},
    datapath::rules::{Flow, LearnPort, Proto},
    sip::{msmsgs::Command, sdp::Allocation},
};

/// Port written for a connecting end whose port is learned: the RFC 4145 §4
/// convention (discard port 9); the datapath ignores it under
/// `RULE_LATCH_PORT`.
const LEARNED_PORT: u16 = 9;

/// Address-free invitations remembered per dialog (cookie, side, source);
/// the oldest goes first, so a chatty client cannot grow the state.
const MAX_SEEN_INVITATIONS: usize = 16;

/// Identifies one installed flow (two directional rules) for the life of
/// the manager; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinholeId(pub u64);

/// What the map writer must do. Each op carries what is needed to undo it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Install a new flow.
    Install {
        /// Its id.
        id: PinholeId,
        /// The flow.
        flow: Flow,
    },
    /// Replace an installed flow by one with the same map keys.
    Update {
        /// The id (kept).
        id: PinholeId,
        /// What is installed now.
        old: Flow,
        /// What replaces it.
        flow: Flow,
    },
    /// Remove an installed flow.
    Remove {
        /// Its id.
        id: PinholeId,
        /// The flow being removed.
        flow: Flow,
    },
}

/// Everything the manager needs from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Relay or nat.
    pub mode: MediaMode,
    /// Edge addresses on the internal side.
    pub internal_addrs: Vec<IpAddr>,
    /// Edge public addresses.
    pub public_addrs: Vec<IpAddr>,
    /// Media port ranges.
    pub port_ranges: Vec<PortRange>,
    /// Ports never handed out even if inside a range (signalling, admin).
    pub reserved_ports: Vec<u16>,
    /// Internal subnets a pinhole may target besides the signalling source.
    pub allowed_internal_subnets: Vec<Cidr>,
    /// Flows one internal client IP may hold.
    pub max_flows_per_client: u32,
    /// Flows overall (each flow is two map entries).
    pub max_flows: u32,
    /// Dialogs with media.
    pub max_calls: u32,
    /// Silence after which a dialog that carried media expires.
    pub idle_timeout: Duration,
    /// Time a confirmed dialog's pinholes may stay unused.
    pub unused_timeout: Duration,
    /// Maximum call length.
    pub max_call: Duration,
    /// Latch peers (opt-in).
    pub latch: bool,
    /// Which outside addresses may receive media (`[media]
    /// external_sources`; DESIGN.md §3, `media::policy`).
    pub external_sources: ExternalSources,
}

impl Settings {
    /// From a validated configuration.
    pub fn from_config(c: &Config) -> Settings {
        let m = &c.media;
        let mut reserved = c.signalling.ports.clone();
        reserved.extend_from_slice(&c.signalling.admin_ports);
        Settings {
            mode: m.mode,
            internal_addrs: c.addresses.internal.clone(),
            public_addrs: c.addresses.public.clone(),
            port_ranges: c.media_ranges(),
            reserved_ports: reserved,
            allowed_internal_subnets: m.allowed_subnets(),
            max_flows_per_client: m.max_pinholes_per_client,
            // Each flow is two PINHOLES entries.
            max_flows: (c.limits.max_pinholes / 2).max(1),
            max_calls: m.max_calls,
            idle_timeout: Duration::from_secs(m.idle_timeout_secs),
            unused_timeout: Duration::from_secs(m.unused_timeout_secs),
            max_call: Duration::from_secs(m.max_call_secs),
            latch: m.latch,
            external_sources: match m.external_sources {
                MediaExternalSources::Signalling => ExternalSources::Signalling,
                MediaExternalSources::AnyPublic => ExternalSources::AnyPublic,
            },
        }
    }
}

/// One m-line as the manager needs it (x-msmsgsinvite transfers go through
/// [`Manager::on_invitation`] instead).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamDesc {
    /// Transport.
    pub proto: Proto,
    /// RTP / TCP endpoint; `None` when the stream needs no pinhole
    /// (port 0, `a=inactive`, multicast).
    pub rtp: Option<SocketAddr>,
    /// RTCP endpoint; `None` with rtcp-mux or for non-RTP streams.
    pub rtcp: Option<SocketAddr>,
    /// `a=rtcp-mux` on an RTP stream (RFC 5761). An offer with it still
    /// gets an RTCP port from the edge: the answerer may decline mux and
    /// send RTCP to RTP + 1 (§5.1.3), where the offerer then listens.
    pub rtcp_mux: bool,
    /// Port 0: the stream is rejected/disabled and its ports can go.
    pub rejected: bool,
    /// RFC 4145 `a=setup` value (lowercase) for TCP streams, if present.
    pub setup: Option<String>,
    /// The first MSRP `a=path` URI's address, when it is an IP literal
    /// (RFC 4975 §9: where the peer connects); checked like `c=`.
    pub path: Option<SocketAddr>,
}

/// One `text/x-msmsgsinvite` invitation as the manager sees it.
#[derive(Clone, Debug)]
pub struct InvitationInput<'a> {
    /// Dialog it travels in.
    pub dialog: &'a DialogKey,
    /// Where it came from.
    pub from_side: Side,
    /// Signalling source (transport address it arrived on).
    pub source: SocketAddr,
    /// Extra media sources of the far party's route (outside only).
    pub media_sources: &'a [Cidr],
    /// `Invitation-Command`, if present.
    pub command: Option<&'a Command>,
    /// `Invitation-Cookie`, if present.
    pub cookie: Option<&'a str>,
    /// Where the sender says it listens, best candidate first (empty: the
    /// invitation names no address).
    pub listen: &'a [SocketAddr],
}

/// What [`Manager::on_invitation`] decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InvitationOutcome {
    /// The edge endpoint to write into the invitation's address fields
    /// (`None`: forward the body unchanged; it names no address).
    pub advertise: Option<SocketAddr>,
    /// Pinhole operations, in order.
    pub ops: Vec<Op>,
}

/// One SDP as the manager sees it.
#[derive(Clone, Debug)]
pub struct SdpInput<'a> {
    /// Dialog.
    pub dialog: &'a DialogKey,
    /// Fork To-tag, if known.
    pub to_tag: Option<&'a str>,
    /// Offer / answer / early answer.
    pub role: SdpRole,
    /// Where it came from.
    pub from_side: Side,
    /// Signalling source (transport address it arrived on).
    pub source: SocketAddr,
    /// Extra media sources of the far party's route (outside only).
    pub media_sources: &'a [Cidr],
    /// How the outside party's media source is learned (outside only).
    pub far_media: FarMedia,
    /// The streams, in m-line order.
    pub streams: &'a [StreamDesc],
}

/// What [`Manager::on_sdp`] decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Per stream (same order as the input): the edge address/port to write
    /// into the SDP, or `None` to leave the stream's address alone.
    pub allocations: Vec<Option<Allocation>>,
    /// Pinhole operations, in the order they must be applied.
    pub ops: Vec<Op>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    addr: IpAddr,
    port: u16,
    rtcp: Option<u16>,
}

#[derive(Clone, Debug)]
struct Slot {
    proto: Proto,
    rtcp: bool,
    /// Indexed by `side_ix`: the block on the edge address facing that side.
    blocks: [Option<Block>; 2],
}

#[derive(Clone, Debug)]
struct Installed {
    id: PinholeId,
    stream: usize,
    rtcp: bool,
    flow: Flow,
    packets: u64,
}

/// An address-free invitation seen in a dialog.
#[derive(Clone, Debug)]
struct Seen {
    cookie: Option<String>,
    side: Side,
    source: IpAddr,
}

/// One x-msmsgsinvite file transfer's pinhole.
#[derive(Clone, Debug)]
struct Transfer {
    cookie: Option<String>,
    listener: SocketAddr,
    connector: IpAddr,
    advertised: SocketAddr,
    blocks: Vec<Block>,
    id: PinholeId,
    flow: Flow,
    installed_at: Instant,
    packets: u64,
    last_activity: Instant,
}

#[derive(Clone, Debug)]
struct Dialog {
    created: Instant,
    client: Option<IpAddr>,
    /// (client, flows) this dialog is counted under in the caps.
    counted: (Option<IpAddr>, u32),
    slots: Vec<Option<Slot>>,
    retired: RareVec<Block>,
    /// The outstanding offer's streams, and the side that made it
    /// (meaningful while there is one): two fields rather than an
    /// `Option<(Side, _)>`, so the side takes a byte of padding instead
    /// of a word (issue #12).
    offer: Option<Box<[StreamDesc]>>,
    offer_from: Side,
    /// The fork (To tag) whose answer is installed, and the one a 2xx
    /// confirmed: the same tag in an established call, so one shared
    /// string rather than two copies (issue #12).
    active_fork: Option<SharedStr>,
    confirmed: Option<SharedStr>,
    confirmed_at: Option<Instant>,
    flows: Vec<Installed>,
    last_activity: Instant,
    ever_active: bool,
    /// Last signalling source IP of each side (by `side_ix`).
    sources: [Option<IpAddr>; 2],
    /// How the outside party's media source is learned (from its last SDP).
    far_media: FarMedia,
    /// Address-free invitations, oldest first.
    seen: RareVec<Seen>,
    /// File-transfer pinholes.
    transfers: RareVec<Transfer>,
}

/// A `Vec` for what few dialogs ever hold (file transfers, port blocks
/// waiting to be freed, address-free invitations): one pointer in the
/// dialog while empty instead of a `Vec`'s three words, and every
/// established call keeps its dialog for hours (issue #12: bytes per
/// call). Reads go through the slice it derefs to.
#[derive(Clone, Debug)]
#[expect(
    clippy::box_collection,
    reason = "the box is the point: one word while empty, the extra allocation only when used"
)]
struct RareVec<T>(Option<Box<Vec<T>>>);

impl<T> Default for RareVec<T> {
    fn default() -> Self {
        RareVec(None)
    }
}

impl<T> RareVec<T> {
    fn vec(&mut self) -> &mut Vec<T> {
        self.0.get_or_insert_with(Box::default)
    }

    fn push(&mut self, v: T) {
        self.vec().push(v);
    }

    fn extend(&mut self, items: impl IntoIterator<Item = T>) {
        let mut items = items.into_iter().peekable();
        if items.peek().is_some() {
            self.vec().extend(items);
        }
    }

    fn remove(&mut self, i: usize) -> T {
        let v = self.vec().remove(i);
        self.drop_if_empty();
        v
    }

    fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        if let Some(v) = &mut self.0 {
            v.retain(keep);
        }
        self.drop_if_empty();
    }

    /// Everything held, leaving it empty.
    fn take(&mut self) -> Vec<T> {
        self.0.take().map(|v| *v).unwrap_or_default()
    }

    fn drop_if_empty(&mut self) {
        if self.0.as_ref().is_some_and(|v| v.is_empty()) {
            self.0 = None;
        }
    }
}

impl<T> std::ops::Deref for RareVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl<T> std::ops::DerefMut for RareVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.0 {
            Some(v) => v.as_mut_slice(),
            None => &mut [],
        }
    }
}

impl<T> From<Vec<T>> for RareVec<T> {
    fn from(v: Vec<T>) -> Self {
        RareVec((!v.is_empty()).then(|| Box::new(v)))
    }
}

impl<T> IntoIterator for RareVec<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.map(|v| *v).unwrap_or_default().into_iter()
    }
}

impl Dialog {
    /// Every installed flow of the dialog: media, then file transfers.
    fn installed(&self) -> impl Iterator<Item = (PinholeId, &Flow)> + '_ {
        self.flows
            .iter()
            .map(|f| (f.id, &f.flow))
            .chain(self.transfers.iter().map(|t| (t.id, &t.flow)))
    }

    /// Drops spare capacity: a `Vec` grows to four elements at its first
    /// push, a call has one or two flows and m-lines, and an established
    /// call keeps its record for hours (issue #12: bytes per call).
    fn compact(&mut self) {
        self.flows.shrink_to_fit();
        self.slots.shrink_to_fit();
    }

    fn reserved(&self) -> u32 {
        let mut n = u32::try_from(self.transfers.len()).unwrap_or(u32::MAX);
        for s in self.slots.iter().flatten() {
            if s.blocks.iter().any(Option::is_some) {
                n = n.saturating_add(if s.rtcp { 2 } else { 1 });
            }
        }
        n
    }
}

fn side_ix(s: Side) -> usize {
    match s {
        Side::Internal => 0,
        Side::External => 1,
    }
}

/// Ports of the configured ranges, each handed out at most once.
#[derive(Clone, Debug)]
struct PortPool {
    ranges: Vec<PortRange>,
    reserved: PortSet,
    used: PortSet,
    /// Next port to try: allocation rotates through the ranges so a port
    /// just released is not handed out again at once (late packets of the
    /// old call must not reach the new one).
    cursor: u16,
}

impl PortPool {}

/// What one `on_sdp` changed, so a failed map write can be undone.
#[derive(Debug)]
struct Journal {
    key: DialogKey,
    before: Option<Box<Dialog>>,
    allocated: Vec<Block>,
    freed: Vec<Block>,
}

/// The pinhole manager.
#[derive(Debug)]
pub struct Manager {
    s: Settings,
    policy: EndpointPolicy,
    pool: PortPool,
    /// Boxed: a `Dialog` is a few hundred bytes, and a B-tree node holds
    /// eleven values inline whether used or not.
    dialogs: BTreeMap<DialogKey, Box<Dialog>>,
    ids: index::FlowIndex,
    per_client: HashMap<IpAddr, u32>,
    total_flows: u32,
    next_id: u64,
    journal: Option<Journal>,
    /// Where the expiry sweep of this round goes on (`expiry`).
    sweep: expiry::Sweep,
    /// Dialogs the sweep found expired or with a stale transfer, for the
    /// tick to check again and end.
    swept: Vec<DialogKey>,
    /// Dialogs the last tick looked at itself.
    looked: usize,
}

fn forbidden(reason: impl Into<String>) -> MediaError {
    MediaError::Forbidden {
        reason: reason.into(),
        rule: None,
    }
}

fn not_acceptable(reason: impl Into<String>) -> MediaError {
    MediaError::NotAcceptable {
        reason: reason.into(),
    }
}

fn exhausted(reason: impl Into<String>) -> MediaError {
    MediaError::Exhausted {
        reason: reason.into(),
    }
}

/// The map keys a flow occupies (both directions).
fn keys_of(flow: &Flow) -> Vec<PinholeKey> {
    flow.rules(0, 1)
        .map(|p| vec![p.inbound.0, p.outbound.0])
        .unwrap_or_default()
}

impl Manager {
    /// A manager with nothing installed.
    pub fn new(s: Settings) -> Manager {
        let pool = PortPool {
            ranges: s.port_ranges.clone(),
            reserved: s.reserved_ports.iter().copied().collect(),
            used: PortSet::new(),
            cursor: 0,
        };
        let policy = EndpointPolicy {
            edge_addrs: s
                .internal_addrs
                .iter()
                .chain(&s.public_addrs)
                .copied()
                .collect(),
            internal_subnets: s.allowed_internal_subnets.clone(),
            external: s.external_sources,
        };
        Manager {
            s,
            policy,
            pool,
            dialogs: BTreeMap::new(),
            ids: index::FlowIndex::default(),
            per_client: HashMap::new(),
            total_flows: 0,
            next_id: 1,
            journal: None,
            sweep: expiry::Sweep::Start,
            swept: Vec::new(),
            looked: 0,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.s
    }

    /// Settings of a reloaded config (`crate::service`): caps, policy and
    /// timers apply to what comes next (timers to calls in progress too,
    /// from the next tick); ports of calls in progress stay held whatever
    /// the new ranges, and new calls get ports from the new ranges. Edge
    /// addresses and the mode need a restart: the caller keeps them.
    pub fn reconfigure(&mut self, s: Settings) {
        self.pool.ranges = s.port_ranges.clone();
        self.pool.reserved = s.reserved_ports.iter().copied().collect();
        self.policy = EndpointPolicy {
            edge_addrs: s
                .internal_addrs
                .iter()
                .chain(&s.public_addrs)
                .copied()
                .collect(),
            internal_subnets: s.allowed_internal_subnets.clone(),
            external: s.external_sources,
        };
        self.s = s;
    }

    /// Every installed flow id (tests: "no orphans" means this is empty).
    pub fn installed(&self) -> BTreeSet<PinholeId> {
        self.ids.ids().collect()
    }

    /// Installed flows of one dialog, by m-line then RTP before RTCP.
    pub fn flows_of(&self, dialog: &DialogKey) -> Vec<(PinholeId, Flow)> {
        let mut v: Vec<(usize, bool, PinholeId, Flow)> = self
            .dialogs
            .get(dialog)
            .map(|d| {
                d.flows
                    .iter()
                    .map(|f| (f.stream, f.rtcp, f.id, f.flow))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|(s, r, _, _)| (*s, *r));
        v.into_iter().map(|(_, _, id, f)| (id, f)).collect()
    }

    /// File-transfer flows of one dialog, in the order they were installed.
    pub fn transfers_of(&self, dialog: &DialogKey) -> Vec<(PinholeId, Flow)> {
        self.dialogs
            .get(dialog)
            .map(|d| d.transfers.iter().map(|t| (t.id, t.flow)).collect())
            .unwrap_or_default()
    }

    /// Keys of the dialogs tracked, in order (status queries).
    pub fn dialog_keys(&self) -> Vec<DialogKey> {
        self.dialogs.keys().cloned().collect()
    }

    /// Dialogs tracked.
    pub fn dialogs(&self) -> usize {
        self.dialogs.len()
    }

    /// Edge ports currently allocated.
    pub fn ports_in_use(&self) -> usize {
        self.pool.used.len()
    }

    /// The dialog an installed flow belongs to.
    pub fn dialog_of(&self, id: PinholeId) -> Option<&DialogKey> {
        self.ids.dialog(id)
    }

    /// Marks `ports` taken (rules of an earlier run hold them, see
    /// `media::adopt`), so no new call is given them.
    pub fn hold_ports(&mut self, ports: &[u16]) {
        self.pool.used.extend(ports.iter().copied());
    }

    /// Gives back ports taken by [`Manager::hold_ports`].
    pub fn release_ports(&mut self, ports: &[u16]) {
        for p in ports {
            self.pool.used.remove(p);
        }
    }

    /// Flows counted against `client`'s cap.
    pub fn client_flows(&self, client: IpAddr) -> u32 {
        self.per_client.get(&client).copied().unwrap_or(0)
    }

    /// Run `f` against a journal of dialog `key`: on success the journal is
    /// kept for [`Manager::rollback`], on error everything `f` changed is
    /// undone at once.
    fn journaled<T>(
        &mut self,
        key: &DialogKey,
        f: impl FnOnce(&mut Self, &mut Journal) -> Result<T, MediaError>,
    ) -> Result<T, MediaError> {
        self.journal = None;
        let mut j = Journal {
            key: key.clone(),
            before: self.dialogs.get(key).cloned(),
            allocated: Vec::new(),
            freed: Vec::new(),
        };
        match f(self, &mut j) {
            Ok(o) => {
                if let Some(d) = self.dialogs.get_mut(key) {
                    d.compact();
                }
                self.journal = Some(j);
                Ok(o)
            }
            Err(e) => {
                self.undo(j);
                Err(e)
            }
        }
    }

    /// Undo the last successful [`Manager::on_sdp`] (its ops could not be
    /// applied). The caller has already undone whatever it applied.
    pub fn rollback(&mut self) {
        if let Some(j) = self.journal.take() {
            self.undo(j);
        }
    }

    fn undo(&mut self, j: Journal) {
        for b in &j.allocated {
            self.pool.free(b);
        }
        for b in &j.freed {
            self.pool.retake(b);
        }
        if let Some(d) = self.dialogs.get(&j.key) {
            for (id, flow) in d.installed() {
                self.ids.remove(id, flow);
            }
        }
        // Keep the caps counters consistent: drop the current counting first.
        if let Some(d) = self.dialogs.get_mut(&j.key) {
            d.client = None;
            d.slots.clear();
        }
        self.recount(&j.key);
        self.dialogs.remove(&j.key);
        if let Some(mut d) = j.before {
            for (id, flow) in d.installed() {
                self.ids.insert(id, &j.key, flow);
            }
            // Re-count from zero: `counted` was taken when `d` was current.
            d.counted = (None, 0);
            self.dialogs.insert(j.key.clone(), d);
            self.recount(&j.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ranges: &[(u16, u16)], reserved: &[u16]) -> PortPool {
        PortPool {
            ranges: ranges
                .iter()
                .map(|&(start, end)| PortRange { start, end })
                .collect(),
            reserved: reserved.iter().copied().collect(),
            used: PortSet::new(),
            cursor: 0,
        }
    }

    #[test]
    fn pairs_are_even_odd_inside_ranges_and_skip_reserved() {
        let mut p = pool(&[(40001, 40007)], &[40004]);
        // 40001 is odd, 40004 reserved: the only pair is 40006/40007... and 40002/40003.
        assert_eq!(p.take(true), Some((40002, Some(40003))));
        assert_eq!(p.take(true), Some((40006, Some(40007))));
        // No adjacent pair left: two single ports (the SDP names the RTCP
        // port in a=rtcp).
        assert_eq!(p.take(true), Some((40001, Some(40005))));
        assert_eq!(p.take(true), None);
        assert_eq!(
            p.take(false),
            None,
            "40004 is reserved, everything else used"
        );
        // A lone free port is no pair, and is not taken by trying.
        p.free(&Block {
            addr: IpAddr::from([203, 0, 113, 1]),
            port: 40005,
            rtcp: None,
        });
        assert_eq!(p.take(true), None);
        assert_eq!(p.take(false), Some((40005, None)));
    }

    #[test]
    fn a_scan_across_taken_ports_finds_the_one_left() {
        // Whole 64-port words taken are skipped; the port left free in the
        // middle, and one at the very end of the port space, are found.
        let mut p = pool(&[(1024, 65535)], &[]);
        p.used
            .extend((1024..=65535).filter(|&x| x != 40000 && x != 65535));
        assert_eq!(p.used.len(), 65535 - 1024 + 1 - 2);
        assert_eq!(p.take(false), Some((40000, None)));
        assert_eq!(p.take(false), Some((65535, None)));
        assert_eq!(p.take(false), None);
        assert_eq!(p.take(true), None);
        assert!(p.used.remove(&2001) && p.used.remove(&2000));
        assert_eq!(p.take(true), Some((2000, Some(2001))));
    }

    #[test]
    fn released_ports_come_back_after_the_rest() {
        let mut p = pool(&[(50000, 50003)], &[]);
        let a = p.take(true).expect("first pair");
        let b = p.take(true).expect("second pair");
        assert_ne!(a, b);
        assert_eq!(p.take(true), None);
        p.free(&Block {
            addr: IpAddr::from([203, 0, 113, 1]),
            port: a.0,
            rtcp: a.1,
        });
        assert_eq!(p.take(true), Some(a), "a released pair is reused");
    }

    #[test]
    fn never_below_1024_and_single_port_ranges_have_no_pair() {
        let mut p = pool(&[(1000, 1025), (60000, 60000)], &[]);
        let mut got = Vec::new();
        while let Some((port, rtcp)) = p.take(false) {
            got.push(port);
            assert!(rtcp.is_none());
        }
        assert_eq!(got, vec![1024, 1025, 60000]);
        let mut p = pool(&[(60000, 60000)], &[]);
        assert_eq!(p.take(true), None);
    }
}

#[cfg(test)]
mod rare_vec_tests {
    use super::RareVec;

    /// A `RareVec` holds what a `Vec` would, and gives its box back
    /// whenever it becomes empty (so an emptied list costs one word again).
    #[test]
    fn a_rare_vec_is_a_vec_that_frees_its_box_when_empty() {
        let mut v: RareVec<u32> = RareVec::default();
        assert!(v.is_empty() && v.0.is_none());
        v.extend(std::iter::empty());
        assert!(v.0.is_none(), "extending by nothing allocates nothing");
        v.extend([1, 2, 3]);
        v.push(4);
        assert_eq!(&*v, &[1, 2, 3, 4]);
        assert_eq!(v.remove(0), 1);
        v.retain(|x| *x != 3);
        assert_eq!(&*v, &[2, 4]);
        v.iter_mut().for_each(|x| *x += 1);
        assert_eq!(v.clone().into_iter().collect::<Vec<_>>(), vec![3, 5]);
        v.retain(|_| false);
        assert!(v.0.is_none());
        v = vec![7].into();
        assert_eq!(v.remove(0), 7);
        assert!(v.0.is_none());
        v = vec![8, 9].into();
        assert_eq!(v.take(), vec![8, 9]);
        assert!(v.0.is_none());
        assert!(RareVec::<u32>::from(Vec::new()).0.is_none());
    }
}
