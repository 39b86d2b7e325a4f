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
//!   starts the never-used clock: callees may ring for minutes.
//! - **Security** (DESIGN.md §3): an internal target must be the signalling
//!   source of the party that sent the SDP or inside an allowed subnet, on a
//!   port ≥ 1024; an external peer must not name loopback, unspecified, an
//!   edge address or an allowed internal subnet. Caps (flows per client IP,
//!   flows overall, calls) refuse new work with `Exhausted`, never evict.
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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use sip_edge_common::PinholeKey;

use super::{DialogKey, EndReason, MediaError, SdpRole, Side};
use crate::{
    config::{Cidr, Config, MediaMode, PortRange, MIN_MEDIA_PORT},
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
    /// Port 0: the stream is rejected/disabled and its ports can go.
    pub rejected: bool,
    /// RFC 4145 `a=setup` value (lowercase) for TCP streams, if present.
    pub setup: Option<String>,
}

/// Which end of a TCP stream connects (and so uses an ephemeral source
/// port), from the offer's and the answer's `a=setup` (RFC 4145 §4.1: absent
/// means `active` in an offer and `passive` in an answer; MSRP follows the
/// same default, the offerer connects, RFC 4975 §8.1). `None`: nobody
/// connects yet (`holdconn`) or the stream is not TCP.
fn tcp_connector(offer: &StreamDesc, answer: &StreamDesc, answer_side: Side) -> Option<Side> {
    if offer.proto != Proto::Tcp {
        return None;
    }
    let o = offer.setup.as_deref().unwrap_or("active");
    let a = answer.setup.as_deref().unwrap_or("passive");
    match (o, a) {
        (_, "active") => Some(answer_side),
        ("active" | "actpass", "passive") => Some(answer_side.other()),
        _ => None,
    }
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
struct Offer {
    from: Side,
    streams: Vec<StreamDesc>,
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
    retired: Vec<Block>,
    offer: Option<Offer>,
    active_fork: Option<String>,
    confirmed: Option<String>,
    confirmed_at: Option<Instant>,
    flows: Vec<Installed>,
    last_activity: Instant,
    ever_active: bool,
    /// Last signalling source IP of each side (by `side_ix`).
    sources: [Option<IpAddr>; 2],
    /// Address-free invitations, oldest first.
    seen: Vec<Seen>,
    /// File-transfer pinholes.
    transfers: Vec<Transfer>,
}

impl Dialog {
    fn ids(&self) -> impl Iterator<Item = PinholeId> + '_ {
        self.flows
            .iter()
            .map(|f| f.id)
            .chain(self.transfers.iter().map(|t| t.id))
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
    reserved: BTreeSet<u16>,
    used: BTreeSet<u16>,
    /// Next port to try: allocation rotates through the ranges so a port
    /// just released is not handed out again at once (late packets of the
    /// old call must not reach the new one).
    cursor: u16,
}

impl PortPool {
    fn usable(&self, p: u16) -> bool {
        p >= MIN_MEDIA_PORT && !self.reserved.contains(&p) && !self.used.contains(&p)
    }

    /// A single port, or an even port with its odd neighbour free (`pair`).
    fn take(&mut self, pair: bool) -> Option<(u16, Option<u16>)> {
        let mut candidates: Vec<(u16, u16)> =
            self.ranges.iter().map(|r| (r.start, r.end)).collect();
        candidates.sort_unstable();
        // Two passes: from the cursor to the end, then from the start.
        for pass in 0..2 {
            for &(start, end) in &candidates {
                let from = if pass == 0 {
                    start.max(self.cursor)
                } else {
                    start
                };
                let to = if pass == 0 {
                    end
                } else {
                    end.min(self.cursor.saturating_sub(1))
                };
                if from > to {
                    continue;
                }
                let mut p = from;
                loop {
                    if pair {
                        if p.is_multiple_of(2) && p < to && self.usable(p) && self.usable(p + 1) {
                            self.used.insert(p);
                            self.used.insert(p + 1);
                            self.cursor = p.saturating_add(2);
                            return Some((p, Some(p + 1)));
                        }
                    } else if self.usable(p) {
                        self.used.insert(p);
                        self.cursor = p.saturating_add(1);
                        return Some((p, None));
                    }
                    if p >= to {
                        break;
                    }
                    p += 1;
                }
            }
        }
        None
    }

    fn free(&mut self, b: &Block) {
        self.used.remove(&b.port);
        if let Some(r) = b.rtcp {
            self.used.remove(&r);
        }
    }

    fn retake(&mut self, b: &Block) {
        self.used.insert(b.port);
        if let Some(r) = b.rtcp {
            self.used.insert(r);
        }
    }
}

/// What one `on_sdp` changed, so a failed map write can be undone.
#[derive(Debug)]
struct Journal {
    key: DialogKey,
    before: Option<Dialog>,
    allocated: Vec<Block>,
    freed: Vec<Block>,
}

/// The pinhole manager.
#[derive(Debug)]
pub struct Manager {
    s: Settings,
    pool: PortPool,
    dialogs: BTreeMap<DialogKey, Dialog>,
    ids: HashMap<PinholeId, DialogKey>,
    per_client: HashMap<IpAddr, u32>,
    total_flows: u32,
    next_id: u64,
    journal: Option<Journal>,
}

fn forbidden(reason: impl Into<String>) -> MediaError {
    MediaError::Forbidden {
        reason: reason.into(),
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

/// Whether `listen` can be a file transfer's listening end on `side`.
fn transfer_port_ok(side: Side, listen: SocketAddr) -> bool {
    match side {
        // Same rule as for SDP targets, without RFC 4145's port-9 exception:
        // a listener must name the port it listens on.
        Side::Internal => listen.port() >= MIN_MEDIA_PORT,
        Side::External => listen.port() != 0,
    }
}

impl Manager {
    /// A manager with nothing installed.
    pub fn new(s: Settings) -> Manager {
        let pool = PortPool {
            ranges: s.port_ranges.clone(),
            reserved: s.reserved_ports.iter().copied().collect(),
            used: BTreeSet::new(),
            cursor: 0,
        };
        Manager {
            s,
            pool,
            dialogs: BTreeMap::new(),
            ids: HashMap::new(),
            per_client: HashMap::new(),
            total_flows: 0,
            next_id: 1,
            journal: None,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.s
    }

    /// Every installed flow id (tests: "no orphans" means this is empty).
    pub fn installed(&self) -> BTreeSet<PinholeId> {
        self.ids.keys().copied().collect()
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

    /// Dialogs tracked.
    pub fn dialogs(&self) -> usize {
        self.dialogs.len()
    }

    /// Edge ports currently allocated.
    pub fn ports_in_use(&self) -> usize {
        self.pool.used.len()
    }

    /// Flows counted against `client`'s cap.
    pub fn client_flows(&self, client: IpAddr) -> u32 {
        self.per_client.get(&client).copied().unwrap_or(0)
    }

    fn edge_addr(&self, facing: Side, like: IpAddr) -> Result<IpAddr, MediaError> {
        let list = match facing {
            Side::Internal => &self.s.internal_addrs,
            Side::External => &self.s.public_addrs,
        };
        list.iter()
            .copied()
            .find(|a| a.is_ipv4() == like.is_ipv4())
            .ok_or_else(|| {
                not_acceptable(format!(
                    "no {} edge address on the {} side for media at {like}",
                    if like.is_ipv4() { "IPv4" } else { "IPv6" },
                    if facing == Side::Internal {
                        "internal"
                    } else {
                        "public"
                    }
                ))
            })
    }

    fn is_edge_addr(&self, ip: IpAddr) -> bool {
        self.s.internal_addrs.contains(&ip) || self.s.public_addrs.contains(&ip)
    }

    /// DESIGN.md §3 address rules for one endpoint named in SDP.
    fn check_endpoint(
        &self,
        side: Side,
        source: SocketAddr,
        proto: Proto,
        ep: SocketAddr,
    ) -> Result<(), MediaError> {
        let ip = ep.ip();
        let allowed_subnet = self
            .s
            .allowed_internal_subnets
            .iter()
            .any(|c| c.contains(ip));
        match side {
            Side::Internal => {
                if ip != source.ip() && !allowed_subnet {
                    return Err(forbidden(format!(
                        "media target {ep} is neither the client's signalling source {} nor in an allowed internal subnet",
                        source.ip()
                    )));
                }
                // Media never needs a privileged port; refusing them keeps a
                // client from aiming the edge at its own services.
                // RFC 4145 §4: an active-only TCP end writes the discard port 9.
                let tcp_discard = proto == Proto::Tcp && ep.port() == 9;
                if ep.port() < MIN_MEDIA_PORT && !tcp_discard {
                    return Err(forbidden(format!(
                        "media target {ep} uses a privileged port"
                    )));
                }
            }
            Side::External => {
                if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                    return Err(forbidden(format!(
                        "peer media address {ip} is not routable"
                    )));
                }
                if self.is_edge_addr(ip) || allowed_subnet {
                    return Err(forbidden(format!(
                        "peer media address {ip} points inside the edge"
                    )));
                }
            }
        }
        Ok(())
    }

    fn recount(&mut self, key: &DialogKey) {
        let Some(d) = self.dialogs.get_mut(key) else {
            return;
        };
        let now = (d.client, d.reserved());
        let before = std::mem::replace(&mut d.counted, now);
        self.total_flows = self
            .total_flows
            .saturating_sub(before.1)
            .saturating_add(now.1);
        if let Some(c) = before.0 {
            let e = self.per_client.entry(c).or_insert(0);
            *e = e.saturating_sub(before.1);
            if *e == 0 {
                self.per_client.remove(&c);
            }
        }
        if let Some(c) = now.0 {
            if now.1 > 0 {
                *self.per_client.entry(c).or_insert(0) += now.1;
            }
        }
    }

    fn check_caps(&self, key: &DialogKey) -> Result<(), MediaError> {
        let Some(d) = self.dialogs.get(key) else {
            return Ok(());
        };
        if self.total_flows > self.s.max_flows {
            return Err(exhausted(format!(
                "all {} media flows of the edge are in use",
                self.s.max_flows
            )));
        }
        if let Some(c) = d.client {
            if self.client_flows(c) > self.s.max_flows_per_client {
                return Err(exhausted(format!(
                    "client {c} already holds its {} media flows",
                    self.s.max_flows_per_client
                )));
            }
        }
        Ok(())
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
                self.journal = Some(j);
                Ok(o)
            }
            Err(e) => {
                self.undo(j);
                Err(e)
            }
        }
    }

    /// One SDP body passing through (see the module policies). On error
    /// nothing changed. On success the caller applies `ops` and, if that
    /// fails, calls [`Manager::rollback`].
    pub fn on_sdp(&mut self, inp: &SdpInput<'_>, now: Instant) -> Result<Outcome, MediaError> {
        self.journaled(inp.dialog, |m, j| m.sdp_inner(inp, now, j))
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
            for id in d.ids() {
                self.ids.remove(&id);
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
            for id in d.ids() {
                self.ids.insert(id, j.key.clone());
            }
            // Re-count from zero: `counted` was taken when `d` was current.
            d.counted = (None, 0);
            self.dialogs.insert(j.key.clone(), d);
            self.recount(&j.key);
        }
    }

    fn sdp_inner(
        &mut self,
        inp: &SdpInput<'_>,
        now: Instant,
        j: &mut Journal,
    ) -> Result<Outcome, MediaError> {
        for (i, st) in inp.streams.iter().enumerate() {
            for ep in [st.rtp, st.rtcp].into_iter().flatten() {
                self.check_endpoint(inp.from_side, inp.source, st.proto, ep)
                    .map_err(|e| match e {
                        MediaError::Forbidden { reason } => {
                            forbidden(format!("stream {i}: {reason}"))
                        }
                        other => other,
                    })?;
            }
        }
        let key = inp.dialog;
        if !self.dialogs.contains_key(key) {
            if inp.role != SdpRole::Offer {
                return Err(not_acceptable(
                    "answer for a dialog whose offer the edge never saw",
                ));
            }
            if self.dialogs.len() >= self.s.max_calls as usize {
                return Err(exhausted(format!(
                    "{} calls with media already in progress",
                    self.s.max_calls
                )));
            }
            self.dialogs.insert(
                key.clone(),
                Dialog {
                    created: now,
                    client: None,
                    counted: (None, 0),
                    slots: Vec::new(),
                    retired: Vec::new(),
                    offer: None,
                    active_fork: None,
                    confirmed: None,
                    confirmed_at: None,
                    flows: Vec::new(),
                    last_activity: now,
                    ever_active: false,
                    sources: [None, None],
                    seen: Vec::new(),
                    transfers: Vec::new(),
                },
            );
        }
        if let Some(d) = self.dialogs.get_mut(key) {
            d.sources[side_ix(inp.from_side)] = Some(inp.source.ip());
            if inp.from_side == Side::Internal {
                d.client = Some(inp.source.ip());
            }
        }
        let allocations = self.allocate(inp, j)?;
        self.recount(key);
        self.check_caps(key)?;
        let fork = inp.to_tag.unwrap_or("").to_owned();
        let Some(d) = self.dialogs.get_mut(key) else {
            return Err(not_acceptable("dialog vanished"));
        };
        if inp.role == SdpRole::Offer {
            d.offer = Some(Offer {
                from: inp.from_side,
                streams: inp.streams.to_vec(),
            });
            return Ok(Outcome {
                allocations,
                ops: Vec::new(),
            });
        }
        // An answer. Another fork after confirmation: rewrite only.
        if d.confirmed.as_ref().is_some_and(|c| *c != fork) {
            return Ok(Outcome {
                allocations,
                ops: Vec::new(),
            });
        }
        let Some(offer) = d.offer.clone() else {
            return Err(not_acceptable(
                "answer without an outstanding offer (RFC 3264 §4)",
            ));
        };
        if offer.from == inp.from_side {
            return Err(not_acceptable("answer from the side that made the offer"));
        }
        if offer.streams.len() != inp.streams.len() {
            return Err(not_acceptable(format!(
                "answer has {} m-lines, offer had {} (RFC 3264 §6)",
                inp.streams.len(),
                offer.streams.len()
            )));
        }
        let ops = self.commit(key, &offer.streams, inp, now, j)?;
        if let Some(d) = self.dialogs.get_mut(key) {
            d.active_fork = Some(fork.clone());
            if inp.role == SdpRole::Answer {
                if d.confirmed.is_none() {
                    d.confirmed = Some(fork);
                    d.confirmed_at = Some(now);
                }
                // Offer/answer exchange complete (RFC 3264 §4).
                d.offer = None;
            }
        }
        Ok(Outcome { allocations, ops })
    }

    /// Edge blocks for the streams of an SDP about to be rewritten.
    fn allocate(
        &mut self,
        inp: &SdpInput<'_>,
        j: &mut Journal,
    ) -> Result<Vec<Option<Allocation>>, MediaError> {
        let facing = inp.from_side.other();
        // Nat rewrites only the internal party's SDP (DESIGN.md §2).
        let rewrite = self.s.mode == MediaMode::Relay || inp.from_side == Side::Internal;
        let mut out = Vec::with_capacity(inp.streams.len());
        for (i, st) in inp.streams.iter().enumerate() {
            let Some(rtp) = st.rtp else {
                out.push(None);
                continue;
            };
            if !rewrite {
                out.push(None);
                continue;
            }
            let addr = self.edge_addr(facing, rtp.ip())?;
            let need_rtcp = st.rtcp.is_some();
            let Some(d) = self.dialogs.get_mut(inp.dialog) else {
                return Err(not_acceptable("dialog vanished"));
            };
            if d.slots.len() <= i {
                d.slots.resize(i + 1, None);
            }
            let compatible = d.slots[i]
                .as_ref()
                .is_some_and(|s| s.proto == st.proto && s.rtcp == need_rtcp);
            if !compatible {
                // RFC 3264 §8.1: a new stream may take a port-0 slot; its old
                // ports go when the exchange completes.
                if let Some(old) = d.slots[i].take() {
                    d.retired.extend(old.blocks.into_iter().flatten());
                }
                d.slots[i] = Some(Slot {
                    proto: st.proto,
                    rtcp: need_rtcp,
                    blocks: [None, None],
                });
            }
            let existing = d.slots[i].as_ref().and_then(|s| s.blocks[side_ix(facing)]);
            let block = match existing {
                Some(b) if b.addr == addr => b,
                other => {
                    let (port, rtcp) = self
                        .pool
                        .take(need_rtcp)
                        .ok_or_else(|| exhausted("no free port in the media port ranges"))?;
                    let b = Block { addr, port, rtcp };
                    j.allocated.push(b);
                    let Some(d) = self.dialogs.get_mut(inp.dialog) else {
                        return Err(not_acceptable("dialog vanished"));
                    };
                    if let Some(old) = other {
                        d.retired.push(old);
                    }
                    if let Some(s) = d.slots.get_mut(i).and_then(Option::as_mut) {
                        s.blocks[side_ix(facing)] = Some(b);
                    }
                    b
                }
            };
            out.push(Some(Allocation {
                addr: block.addr,
                port: block.port,
                rtcp_port: block.rtcp,
            }));
        }
        Ok(out)
    }

    /// Offer + answer known: compute the wanted flows and diff them against
    /// the installed ones.
    fn commit(
        &mut self,
        key: &DialogKey,
        offer: &[StreamDesc],
        inp: &SdpInput<'_>,
        now: Instant,
        j: &mut Journal,
    ) -> Result<Vec<Op>, MediaError> {
        let Some(d) = self.dialogs.get(key) else {
            return Err(not_acceptable("dialog vanished"));
        };
        let mut wanted: Vec<(usize, bool, Flow)> = Vec::new();
        let mut release: Vec<usize> = Vec::new();
        for (i, (o, a)) in offer.iter().zip(inp.streams.iter()).enumerate() {
            if o.rejected || a.rejected {
                release.push(i);
                continue;
            }
            let (Some(o_rtp), Some(a_rtp)) = (o.rtp, a.rtp) else {
                continue;
            };
            if o.proto != a.proto {
                return Err(not_acceptable(format!(
                    "stream {i}: answer changes the transport"
                )));
            }
            let (int, ext, int_rtp, ext_rtp) = if inp.from_side == Side::Internal {
                (a, o, a_rtp, o_rtp)
            } else {
                (o, a, o_rtp, a_rtp)
            };
            let Some(slot) = d.slots.get(i).and_then(Option::as_ref) else {
                return Err(not_acceptable(format!(
                    "stream {i}: no edge port was allocated"
                )));
            };
            let missing = || not_acceptable(format!("stream {i}: no edge port was allocated"));
            let public = slot.blocks[side_ix(Side::External)].ok_or_else(missing)?;
            let learn_port = match tcp_connector(o, a, inp.from_side) {
                Some(Side::External) => LearnPort::Peer,
                Some(Side::Internal) => LearnPort::Client,
                None => LearnPort::Neither,
            };
            let mut pairs = vec![(false, int_rtp, ext_rtp, Some(public.port))];
            if let (Some(ci), Some(ce)) = (int.rtcp, ext.rtcp) {
                pairs.push((true, ci, ce, public.rtcp));
            }
            for (is_rtcp, client, peer, pub_port) in pairs {
                let Some(pub_port) = pub_port else { continue };
                let flow = match self.s.mode {
                    MediaMode::Relay => {
                        let inner = slot.blocks[side_ix(Side::Internal)].ok_or_else(missing)?;
                        let int_port = if is_rtcp {
                            inner.rtcp
                        } else {
                            Some(inner.port)
                        };
                        let Some(int_port) = int_port else { continue };
                        Flow::Relay {
                            proto: slot.proto,
                            client,
                            edge_int: SocketAddr::new(inner.addr, int_port),
                            public: SocketAddr::new(public.addr, pub_port),
                            peer,
                            latch_peer: self.s.latch,
                            learn_port,
                        }
                    }
                    MediaMode::Nat => Flow::Nat {
                        proto: slot.proto,
                        client,
                        public: SocketAddr::new(public.addr, pub_port),
                        peer,
                        latch_peer: self.s.latch,
                        learn_port,
                    },
                };
                flow.rules(0, 1)
                    .map_err(|e| not_acceptable(format!("stream {i}: {e}")))?;
                wanted.push((i, is_rtcp, flow));
            }
        }
        // Map keys must be unique: in nat mode the client's own address is a
        // key, so two calls (or m-lines) cannot share it.
        let mut taken: HashSet<PinholeKey> = HashSet::new();
        for (k, other) in &self.dialogs {
            // File transfers are not replaced by an offer/answer: their keys
            // stay taken, this dialog's included.
            for t in &other.transfers {
                taken.extend(keys_of(&t.flow));
            }
            if k == key {
                continue;
            }
            for f in &other.flows {
                for pk in keys_of(&f.flow) {
                    taken.insert(pk);
                }
            }
        }
        for (i, _, f) in &wanted {
            for pk in keys_of(f) {
                if !taken.insert(pk) {
                    return Err(forbidden(format!(
                        "stream {i}: media address already used by another flow"
                    )));
                }
            }
        }

        let old: Vec<Installed> = d.flows.clone();
        let mut kept: Vec<Installed> = Vec::new();
        let mut installs: Vec<Op> = Vec::new();
        let mut updates: Vec<Op> = Vec::new();
        let mut new_flows: Vec<Installed> = Vec::new();
        let mut used_old: BTreeSet<PinholeId> = BTreeSet::new();
        for (stream, rtcp, flow) in wanted {
            match old.iter().find(|f| f.stream == stream && f.rtcp == rtcp) {
                Some(f) if f.flow == flow => {
                    used_old.insert(f.id);
                    kept.push(f.clone());
                }
                Some(f) if keys_of(&f.flow) == keys_of(&flow) => {
                    used_old.insert(f.id);
                    updates.push(Op::Update {
                        id: f.id,
                        old: f.flow,
                        flow,
                    });
                    kept.push(Installed {
                        flow,
                        packets: 0,
                        ..f.clone()
                    });
                }
                _ => {
                    let id = PinholeId(self.next_id);
                    self.next_id += 1;
                    installs.push(Op::Install { id, flow });
                    new_flows.push(Installed {
                        id,
                        stream,
                        rtcp,
                        flow,
                        packets: 0,
                    });
                }
            }
        }
        let removed: Vec<&Installed> = old.iter().filter(|f| !used_old.contains(&f.id)).collect();
        let new_keys: HashSet<PinholeKey> =
            new_flows.iter().flat_map(|f| keys_of(&f.flow)).collect();
        let (first, last): (Vec<&Installed>, Vec<&Installed>) = removed
            .iter()
            .partition(|f| keys_of(&f.flow).iter().any(|k| new_keys.contains(k)));
        let mut ops: Vec<Op> = first
            .iter()
            .map(|f| Op::Remove {
                id: f.id,
                flow: f.flow,
            })
            .collect();
        ops.extend(installs);
        ops.extend(updates);
        ops.extend(last.iter().map(|f| Op::Remove {
            id: f.id,
            flow: f.flow,
        }));

        // Apply to our own state.
        for f in &removed {
            self.ids.remove(&f.id);
        }
        for f in &new_flows {
            self.ids.insert(f.id, key.clone());
        }
        let Some(d) = self.dialogs.get_mut(key) else {
            return Err(not_acceptable("dialog vanished"));
        };
        kept.extend(new_flows);
        d.flows = kept;
        d.last_activity = now;
        for i in release {
            if let Some(s) = d.slots.get_mut(i).and_then(Option::take) {
                d.retired.extend(s.blocks.into_iter().flatten());
            }
        }
        // Retired blocks: no wanted flow uses them any more.
        let retired = std::mem::take(&mut d.retired);
        for b in &retired {
            self.pool.free(b);
        }
        j.freed.extend(retired);
        self.recount(key);
        Ok(ops)
    }

    /// The dialog (`to_tag: None`) or one fork of it ended.
    pub fn on_dialog_end(
        &mut self,
        dialog: &DialogKey,
        to_tag: Option<&str>,
        _reason: EndReason,
        _now: Instant,
    ) -> Vec<Op> {
        self.journal = None;
        let Some(d) = self.dialogs.get(dialog) else {
            return Vec::new();
        };
        match to_tag {
            None => self.drop_dialog(dialog),
            Some(t) if d.confirmed.as_deref() == Some(t) => self.drop_dialog(dialog),
            // A fork that lost the race to another's 2xx: nothing of it is installed.
            Some(_) if d.confirmed.is_some() => Vec::new(),
            Some(t) if d.active_fork.as_deref() == Some(t) => {
                let mut ops = Vec::new();
                if let Some(d) = self.dialogs.get_mut(dialog) {
                    for f in std::mem::take(&mut d.flows) {
                        self.ids.remove(&f.id);
                        ops.push(Op::Remove {
                            id: f.id,
                            flow: f.flow,
                        });
                    }
                    d.active_fork = None;
                }
                ops.extend(self.remove_transfers(dialog, |_| true));
                ops
            }
            Some(_) => Vec::new(),
        }
    }

    fn drop_dialog(&mut self, key: &DialogKey) -> Vec<Op> {
        if let Some(d) = self.dialogs.get_mut(key) {
            let blocks: Vec<Block> = d
                .slots
                .iter()
                .flatten()
                .flat_map(|s| s.blocks.iter().flatten().copied())
                .chain(d.retired.drain(..))
                .chain(d.transfers.iter().flat_map(|t| t.blocks.iter().copied()))
                .collect();
            d.client = None;
            d.slots.clear();
            for b in &blocks {
                self.pool.free(b);
            }
        }
        self.recount(key);
        let Some(d) = self.dialogs.remove(key) else {
            return Vec::new();
        };
        let mut ops = Vec::new();
        for f in d.flows {
            self.ids.remove(&f.id);
            ops.push(Op::Remove {
                id: f.id,
                flow: f.flow,
            });
        }
        for t in d.transfers {
            self.ids.remove(&t.id);
            ops.push(Op::Remove {
                id: t.id,
                flow: t.flow,
            });
        }
        ops
    }

    /// Removes the transfers of `key` that `pred` selects, frees their
    /// ports and returns the removals.
    fn remove_transfers(&mut self, key: &DialogKey, pred: impl Fn(&Transfer) -> bool) -> Vec<Op> {
        let Some(d) = self.dialogs.get_mut(key) else {
            return Vec::new();
        };
        let (gone, kept): (Vec<Transfer>, Vec<Transfer>) = std::mem::take(&mut d.transfers)
            .into_iter()
            .partition(|t| pred(t));
        d.transfers = kept;
        let mut ops = Vec::new();
        for t in gone {
            for b in &t.blocks {
                self.pool.free(b);
            }
            self.ids.remove(&t.id);
            ops.push(Op::Remove {
                id: t.id,
                flow: t.flow,
            });
        }
        self.recount(key);
        ops
    }

    /// Packets a flow has carried so far (both directions), as read from the
    /// datapath counters. A change marks the dialog active at `now`.
    pub fn on_activity(&mut self, id: PinholeId, packets: u64, now: Instant) {
        let Some(key) = self.ids.get(&id) else {
            return;
        };
        let Some(d) = self.dialogs.get_mut(key) else {
            return;
        };
        if let Some(t) = d.transfers.iter_mut().find(|t| t.id == id) {
            // A transfer's activity is its own: it never keeps the call's
            // media alive, nor does the call keep it.
            if packets != t.packets {
                t.packets = packets;
                t.last_activity = now;
            }
            return;
        }
        if let Some(f) = d.flows.iter_mut().find(|f| f.id == id) {
            if packets != f.packets {
                // Counters restart when an Update rewrites the rules.
                f.packets = packets;
                if packets > 0 {
                    d.last_activity = now;
                    d.ever_active = true;
                }
            }
        }
    }

    /// Expire dialogs (module doc: Expiry). Returns the expired dialogs and
    /// the operations removing their pinholes.
    pub fn on_tick(&mut self, now: Instant) -> (Vec<DialogKey>, Vec<Op>) {
        self.journal = None;
        let expired: Vec<DialogKey> = self
            .dialogs
            .iter()
            .filter(|(_, d)| {
                let age = now.saturating_duration_since(d.created);
                let quiet = now.saturating_duration_since(d.last_activity);
                let has_flows = !d.flows.is_empty();
                age >= self.s.max_call
                    || (has_flows && d.ever_active && quiet >= self.s.idle_timeout)
                    || (has_flows
                        && !d.ever_active
                        && d.confirmed_at.is_some()
                        && quiet >= self.s.unused_timeout)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut ops = Vec::new();
        for k in &expired {
            ops.extend(self.drop_dialog(k));
        }
        // Transfers expire on their own, leaving the dialog alone.
        let (idle, unused) = (self.s.idle_timeout, self.s.unused_timeout);
        let stale = |t: &Transfer| {
            if t.packets == 0 {
                now.saturating_duration_since(t.installed_at) >= unused
            } else {
                now.saturating_duration_since(t.last_activity) >= idle
            }
        };
        let with_stale: Vec<DialogKey> = self
            .dialogs
            .iter()
            .filter(|(_, d)| d.transfers.iter().any(stale))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &with_stale {
            ops.extend(self.remove_transfers(k, stale));
        }
        (expired, ops)
    }

    /// One `text/x-msmsgsinvite` invitation (module doc: File transfers).
    /// On error nothing changed; on success the caller rewrites the body to
    /// `advertise`, applies `ops` and, if that fails, calls
    /// [`Manager::rollback`].
    pub fn on_invitation(
        &mut self,
        inp: &InvitationInput<'_>,
        now: Instant,
    ) -> Result<InvitationOutcome, MediaError> {
        self.journaled(inp.dialog, |m, j| m.invitation_inner(inp, now, j))
    }

    fn invitation_inner(
        &mut self,
        inp: &InvitationInput<'_>,
        now: Instant,
        j: &mut Journal,
    ) -> Result<InvitationOutcome, MediaError> {
        let key = inp.dialog;
        let cookie = inp.cookie.map(str::to_owned);
        let addressed = !inp.listen.is_empty();
        let Some(d) = self.dialogs.get_mut(key) else {
            if addressed {
                return Err(forbidden(
                    "x-msmsgsinvite file transfer in a dialog whose session the edge did not set up (DESIGN.md §3)",
                ));
            }
            // Nothing to open and nothing to leak.
            return Ok(InvitationOutcome::default());
        };
        d.sources[side_ix(inp.from_side)] = Some(inp.source.ip());
        if inp.from_side == Side::Internal && d.client.is_none() {
            d.client = Some(inp.source.ip());
        }
        match (inp.command, addressed) {
            (Some(Command::Cancel), false) => {
                d.seen.retain(|s| s.cookie != cookie);
                let ops = self.remove_transfers(key, |t| t.cookie == cookie);
                return Ok(InvitationOutcome { advertise: None, ops });
            }
            (Some(Command::Invite | Command::Accept), false) => {
                if d.seen.len() >= MAX_SEEN_INVITATIONS {
                    d.seen.remove(0);
                }
                d.seen.push(Seen { cookie, side: inp.from_side, source: inp.source.ip() });
                return Ok(InvitationOutcome::default());
            }
            (_, false) => return Ok(InvitationOutcome::default()),
            (Some(Command::Invite | Command::Accept), true) => {}
            (other, true) => {
                return Err(not_acceptable(format!(
                    "x-msmsgsinvite command {other:?} names an address; only INVITE and ACCEPT open a transfer"
                )))
            }
        }
        let is_accept = inp.command == Some(&Command::Accept);
        let listen_side = inp.from_side;
        let conn_side = listen_side.other();
        // The listener: the first named address that passes §3.
        let mut first_err = None;
        let mut listener = None;
        for &l in inp.listen {
            let r = self
                .check_endpoint(listen_side, inp.source, Proto::Tcp, l)
                .and_then(|()| {
                    if transfer_port_ok(listen_side, l) {
                        Ok(())
                    } else {
                        Err(forbidden(format!(
                            "file transfer listener {l} uses a privileged port"
                        )))
                    }
                });
            match r {
                Ok(()) => {
                    listener = Some(l);
                    break;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some(listener) = listener else {
            return Err(first_err
                .unwrap_or_else(|| not_acceptable("x-msmsgsinvite names no usable address")));
        };
        let Some(d) = self.dialogs.get(key) else {
            return Err(not_acceptable("dialog vanished"));
        };
        // The connector: the other side's signalling source.
        // An ACCEPT answers an invitation the connecting party sent with the
        // same cookie (INVITE → addressed ACCEPT, or the MSNFTP order INVITE
        // → ACCEPT → addressed ACCEPT from the inviter): without one, nobody
        // on the other side asked for this transfer.
        let from_seen = d
            .seen
            .iter()
            .rev()
            .find(|s| s.cookie == cookie && s.side == conn_side)
            .map(|s| s.source);
        if is_accept && from_seen.is_none() {
            return Err(not_acceptable(format!(
                "x-msmsgsinvite ACCEPT for invitation {cookie:?}: the edge forwarded no invitation with that cookie from the other party of this dialog"
            )));
        }
        let Some(connector) = from_seen.or(d.sources[side_ix(conn_side)]) else {
            return Err(not_acceptable(
                "the connecting party's signalling source is unknown in this dialog",
            ));
        };
        if connector.is_ipv4() != listener.is_ipv4() {
            return Err(not_acceptable(format!(
                "file transfer between {connector} and {listener} would need address family translation"
            )));
        }
        // A repeated invitation for the same transfer changes nothing.
        if let Some(t) = d.transfers.iter().find(|t| t.cookie == cookie) {
            if t.listener == listener && t.connector == connector {
                return Ok(InvitationOutcome {
                    advertise: Some(t.advertised),
                    ops: Vec::new(),
                });
            }
        }
        let mut ops = Vec::new();
        if let Some(d) = self.dialogs.get_mut(key) {
            let (old, kept): (Vec<Transfer>, Vec<Transfer>) = std::mem::take(&mut d.transfers)
                .into_iter()
                .partition(|t| t.cookie == cookie);
            d.transfers = kept;
            for t in old {
                for b in &t.blocks {
                    self.pool.free(b);
                    j.freed.push(*b);
                }
                self.ids.remove(&t.id);
                ops.push(Op::Remove {
                    id: t.id,
                    flow: t.flow,
                });
            }
        }
        let like = listener.ip();
        let (int_addr, pub_addr) = (
            self.edge_addr(Side::Internal, like),
            self.edge_addr(Side::External, like),
        );
        let mut take =
            |pool: &mut PortPool, addr: &Result<IpAddr, MediaError>| -> Result<Block, MediaError> {
                let addr = addr.clone()?;
                let (port, _) = pool.take(false).ok_or_else(|| {
                    exhausted("no free port in the media port ranges for a file transfer")
                })?;
                let b = Block {
                    addr,
                    port,
                    rtcp: None,
                };
                j.allocated.push(b);
                Ok(b)
            };
        let connector_ep = SocketAddr::new(connector, LEARNED_PORT);
        let (flow, advertised, blocks) = match (conn_side, self.s.mode) {
            (Side::External, MediaMode::Nat) => {
                let public = take(&mut self.pool, &pub_addr)?;
                let adv = SocketAddr::new(public.addr, public.port);
                let flow = Flow::Nat {
                    proto: Proto::Tcp,
                    client: listener,
                    public: adv,
                    peer: connector_ep,
                    latch_peer: self.s.latch,
                    learn_port: LearnPort::Peer,
                };
                (flow, adv, vec![public])
            }
            (Side::External, MediaMode::Relay) => {
                let public = take(&mut self.pool, &pub_addr)?;
                let inner = take(&mut self.pool, &int_addr)?;
                let adv = SocketAddr::new(public.addr, public.port);
                let flow = Flow::Relay {
                    proto: Proto::Tcp,
                    client: listener,
                    edge_int: SocketAddr::new(inner.addr, inner.port),
                    public: adv,
                    peer: connector_ep,
                    latch_peer: self.s.latch,
                    learn_port: LearnPort::Peer,
                };
                (flow, adv, vec![public, inner])
            }
            // An internal connector: relay-style in both modes (nat cannot
            // learn the client's port, `FlowError::NatClientPort`).
            (Side::Internal, _) => {
                let inner = take(&mut self.pool, &int_addr)?;
                let public = take(&mut self.pool, &pub_addr)?;
                let adv = SocketAddr::new(inner.addr, inner.port);
                let flow = Flow::Relay {
                    proto: Proto::Tcp,
                    client: connector_ep,
                    edge_int: adv,
                    public: SocketAddr::new(public.addr, public.port),
                    peer: listener,
                    latch_peer: false,
                    learn_port: LearnPort::Client,
                };
                (flow, adv, vec![inner, public])
            }
        };
        flow.rules(0, 1)
            .map_err(|e| not_acceptable(format!("file transfer: {e}")))?;
        let mut taken: HashSet<PinholeKey> = HashSet::new();
        for other in self.dialogs.values() {
            for f in &other.flows {
                taken.extend(keys_of(&f.flow));
            }
            for t in &other.transfers {
                taken.extend(keys_of(&t.flow));
            }
        }
        if keys_of(&flow).iter().any(|k| taken.contains(k)) {
            return Err(forbidden(format!(
                "file transfer listener {listener} is already used by another flow"
            )));
        }
        let id = PinholeId(self.next_id);
        self.next_id += 1;
        let Some(d) = self.dialogs.get_mut(key) else {
            return Err(not_acceptable("dialog vanished"));
        };
        d.transfers.push(Transfer {
            cookie,
            listener,
            connector,
            advertised,
            blocks,
            id,
            flow,
            installed_at: now,
            packets: 0,
            last_activity: now,
        });
        self.ids.insert(id, key.clone());
        self.recount(key);
        self.check_caps(key)?;
        ops.push(Op::Install { id, flow });
        Ok(InvitationOutcome {
            advertise: Some(advertised),
            ops,
        })
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
            used: BTreeSet::new(),
            cursor: 0,
        }
    }

    #[test]
    fn pairs_are_even_odd_inside_ranges_and_skip_reserved() {
        let mut p = pool(&[(40001, 40007)], &[40004]);
        // 40001 is odd, 40004 reserved: the only pair is 40006/40007... and 40002/40003.
        assert_eq!(p.take(true), Some((40002, Some(40003))));
        assert_eq!(p.take(true), Some((40006, Some(40007))));
        assert_eq!(p.take(true), None);
        assert_eq!(p.take(false), Some((40001, None)));
        assert_eq!(p.take(false), Some((40005, None)));
        assert_eq!(
            p.take(false),
            None,
            "40004 is reserved, everything else used"
        );
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
