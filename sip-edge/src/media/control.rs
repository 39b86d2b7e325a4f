//! The [`MediaControl`] implementation the proxy calls: takes each media
//! body the proxy forwards, parses it (`sip::sdp`, `sip::msmsgs`, `sip::multipart`), feeds its
//! streams to the sans-IO `media::manager`, rewrites the body with the
//! manager's edge allocations, and applies the manager's pinhole operations
//! through a [`PinholeSink`] (production: [`MapsSink`] over
//! `datapath::maps::DatapathMaps`, the only BPF map writer; tests:
//! [`RecordingSink`]). Activity counters flow back the other way on each tick.
//!
//! Body types:
//! - `application/sdp`: parsed and rewritten (candidates per config).
//! - `text/x-msmsgsinvite` (Windows Messenger / Office Communicator file
//!   transfer): invitations without an address (INVITE, ACCEPT, CANCEL)
//!   pass unchanged and are remembered by `Invitation-Cookie` (CANCEL
//!   removes that transfer's pinhole). An INVITE or ACCEPT naming
//!   `IP-Address`/`Port` (or `IP-Address-Internal`/`PortX-Internal`) opens
//!   one strict TCP pinhole: the sender listens at the named address (§3
//!   checked), the dialog's other party connects from its signalling source
//!   IP with a learned port, and every address and port field (`IP-Address`,
//!   `IP-Address-Internal`, `Port`, `PortX`, `PortX-Internal`) is rewritten
//!   to the edge endpoint on the connector's side, so the inside's
//!   addresses never leak. An external connector is identified by the TLS
//!   peer the dialog's external messages come from: that is the peer UA with
//!   direct federation, but the peer's proxy otherwise, and then only
//!   `[media] latch = true` (full latch of the connector) lets the transfer
//!   work. Rules per mode and side: `media::manager` (File transfers). An
//!   address without a port, or an address in any other command, is
//!   refused (488). The offer/answer role the proxy reports is not used:
//!   the invitation command decides.
//! - `multipart/mixed` (Office Communicator 2007 R2 / Lync file transfer
//!   INVITE and its answer, [MS-SIPRE]/[MS-FTIP]): split by `sip::multipart`
//!   (RFC 2046 §5.1). Accepted only when its parts are exactly one
//!   `application/sdp` plus any number of address-free parts
//!   (`application/ms-filetransfer+xml`: request id, file name, size), each
//!   with no transfer encoding other than 7bit/8bit/binary. The SDP part
//!   goes through the `application/sdp` path unchanged in behaviour
//!   (rewrite, offer/answer, pinholes; its `m=data … TCP/TLS` stream is a
//!   TCP stream like any other); every other byte (preamble, boundary,
//!   other parts, epilogue) is forwarded as received. More or fewer than
//!   one SDP part, any other part type (nested multipart included), another
//!   multipart subtype, or malformed MIME: refused (NotAcceptable, 488),
//!   with nothing allocated or installed.
//! - `application/ms-filetransfer+xml` on its own (INFO download, cancel,
//!   progress inside the transfer dialog): carries no network address, so
//!   it is returned unchanged. The proxy only hands a body over with the
//!   `DialogKey` of a dialog it proxied, which is the condition for it.
//!   (The proxy's role decision currently gives INFO/MESSAGE a role only
//!   for x-msmsgsinvite commands, so it strips such an INFO body before it
//!   gets here; that is `proxy::core`'s to change.)
//! - Anything else: refused (NotAcceptable, 488). Passing it through
//!   untouched would leak private addresses and let media descriptions
//!   bypass the pinhole rules.
//!
//! A failed map write undoes every operation of the same body already
//! applied and rolls the manager back, so nothing is left half-installed;
//! the proxy gets `Exhausted` (503).
//!
//! Restart (issue #14 item 8, `media::adopt`): the production controller
//! journals which dialog owns which rules, and at start adopts the rules
//! an earlier run left: they keep forwarding, hold their ports, expire by
//! their counters on tick, and a BYE for their dialog removes them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Instant,
};

use sip_edge_common::PinholeKey;

mod ha;
#[cfg(test)]
mod parts_tests;

use super::{
    adopt::{self, flow_keys_text, Adopted, AdoptedFlow, Journal, Timeouts},
    manager::{InvitationInput, Manager, Op, PinholeId, SdpInput, Settings, StreamDesc},
    DialogKey, EndReason, FarMedia, MediaControl, MediaError, SdpEvent, SdpRole, Side,
};
use crate::{
    config::{Config, MediaCandidates, MediaMode},
    datapath::{
        lock,
        maps::{DatapathMaps, MapsError},
        rules::{Flow, Proto},
    },
    sip::{
        msmsgs,
        multipart::Multipart,
        sdp::{
            self, Allocation, CandidatePolicy, Endpoint, FlowRequest, MediaFlow, NoPinhole,
            RewritePolicy, Sdp,
        },
    },
};

/// Why a sink could not apply an operation.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The map writer failed (table full, key exists, policy...).
    #[error("pinhole map write failed: {source}")]
    Map {
        /// The map writer's error.
        #[source]
        source: MapsError,
    },
    /// The shared map handle's lock was poisoned by a panic elsewhere.
    #[error("pinhole maps unavailable: lock poisoned")]
    Poisoned,
    /// No installed pinhole has this id.
    #[error("no installed pinhole {id:?}")]
    Unknown {
        /// The id.
        id: PinholeId,
    },
    /// A test sink refused on purpose, or a key is already present.
    #[error("pinhole refused: {reason}")]
    Refused {
        /// Why.
        reason: String,
    },
}

/// Where pinhole operations go.
pub trait PinholeSink {
    /// Install both rules of a flow.
    fn install(&mut self, id: PinholeId, flow: &Flow) -> Result<(), SinkError>;
    /// Replace an installed flow by one with the same map keys.
    fn update(&mut self, id: PinholeId, old: &Flow, flow: &Flow) -> Result<(), SinkError>;
    /// Remove both rules of a flow.
    fn remove(&mut self, id: PinholeId) -> Result<(), SinkError>;
    /// Packets each installed flow of `part` has carried (both directions
    /// summed): at least every flow of the part whose count changed since
    /// the part was last read (a sink may leave out the others, or add
    /// flows of other parts: every consumer compares with the count it
    /// last saw).
    fn activity(&mut self, part: Part) -> Result<Vec<(PinholeId, u64)>, SinkError>;
    /// One flow's counters for the status queries (`crate::status`):
    /// packets and bytes of both directions, the latest last-seen time
    /// (CLOCK_MONOTONIC ns, 0 = never) and its rule slots. `None` when the
    /// sink keeps no counters.
    fn counters(&mut self, id: PinholeId) -> Option<FlowCounters> {
        let _ = id;
        None
    }
}

/// One of the parts the reading of the flows' counters is spread over
/// ([`MediaControl::on_timers`]): the flows whose id is `index` modulo
/// `of`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// Which part, `0..of`.
    pub index: u64,
    /// How many parts.
    pub of: u64,
}

impl Part {
    /// Every flow at once.
    pub const ALL: Part = Part { index: 0, of: 1 };

    /// Whether flow `id` is in this part.
    pub fn holds(self, id: PinholeId) -> bool {
        id.0 % self.of.max(1) == self.index
    }
}

/// Parts the counter reads of a tick are spread over: with the driver's
/// timers every 100 ms, one part a tenth of a second.
pub const ACTIVITY_PARTS: u64 = 10;

/// Values by flow id in one map per [`Part`] of a fixed partition, so
/// reading one part walks only its own map.
#[derive(Debug)]
pub struct Parted<V> {
    maps: Vec<HashMap<PinholeId, V>>,
    len: usize,
}

impl<V> Parted<V> {
    /// Empty, over `parts` parts (at least one).
    pub fn new(parts: u64) -> Parted<V> {
        Parted {
            maps: (0..parts.max(1)).map(|_| HashMap::new()).collect(),
            len: 0,
        }
    }

    fn index(&self, id: PinholeId) -> usize {
        // `id % len < len`: always a valid index.
        usize::try_from(id.0 % self.maps.len() as u64).unwrap_or(0)
    }

    /// Values in all parts.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no part holds anything.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value of flow `id`.
    pub fn get(&self, id: PinholeId) -> Option<&V> {
        self.maps[self.index(id)].get(&id)
    }

    /// Sets the value of flow `id`; returns the one it replaced.
    pub fn insert(&mut self, id: PinholeId, v: V) -> Option<V> {
        let i = self.index(id);
        let old = self.maps[i].insert(id, v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Takes the value of flow `id`.
    pub fn remove(&mut self, id: PinholeId) -> Option<V> {
        let i = self.index(id);
        let old = self.maps[i].remove(&id);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The flows of `part`: one map when `part` is of this partition,
    /// else every map, filtered (e.g. [`Part::ALL`]).
    pub fn part_mut(&mut self, part: Part) -> impl Iterator<Item = (&PinholeId, &mut V)> {
        let own = part.of == self.maps.len() as u64;
        self.maps
            .iter_mut()
            .enumerate()
            .filter(move |(i, _)| !own || *i as u64 == part.index)
            .flat_map(|(_, m)| m.iter_mut())
            .filter(move |(id, _)| part.holds(**id))
    }
}

/// What [`PinholeSink::counters`] reports for one flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Packets, both directions.
    pub packets: u64,
    /// Bytes, both directions.
    pub bytes: u64,
    /// CLOCK_MONOTONIC ns of the last packet either way; 0 = never.
    pub last_seen_ns: u64,
    /// Rule slots (inbound, outbound), as `sip-edge pinhole list` shows them.
    pub slots: (u32, u32),
}

/// Production sink: the map writer, shared with the rest of the agent.
pub struct MapsSink {
    maps: Arc<Mutex<DatapathMaps>>,
    /// The flows, by activity part ([`ACTIVITY_PARTS`]).
    flows: Parted<Tracked>,
}

/// What the sink keeps of one installed flow.
#[derive(Clone, Copy, Debug)]
struct Tracked {
    /// Rule slots (inbound, outbound).
    slots: (u32, u32),
    /// Packets and bytes at the last reading, so the forwarded-traffic
    /// metrics count each packet once.
    seen: (u64, u64),
}

impl Tracked {
    fn new(slots: (u32, u32)) -> Tracked {
        Tracked {
            slots,
            seen: (0, 0),
        }
    }
}

impl MapsSink {
    /// Writes through `maps`.
    pub fn new(maps: Arc<Mutex<DatapathMaps>>) -> MapsSink {
        MapsSink {
            maps,
            flows: Parted::new(ACTIVITY_PARTS),
        }
    }

    /// Tracks flow `id` at `slots` (a new flow or a re-install).
    fn track(&mut self, id: PinholeId, slots: (u32, u32)) {
        self.flows.insert(id, Tracked::new(slots));
        crate::metrics::pinholes_in_use(self.flows.len() * 2);
    }

    /// Takes over an installed rule pair under `id` (adoption at start):
    /// its counters are read on tick and `remove` deletes it.
    pub fn adopt(&mut self, id: PinholeId, slots: (u32, u32)) {
        self.track(id, slots);
    }
}

/// Packets and bytes of both rules of a flow (0 for a rule not found).
fn flow_totals(m: &DatapathMaps, (a, b): (u32, u32)) -> (u64, u64) {
    let read = |s: u32| m.traffic(s).unwrap_or_default();
    let (x, y) = (read(a), read(b));
    (x.0.saturating_add(y.0), x.1.saturating_add(y.1))
}

/// Ids of adopted flows: far above any the manager hands out (it counts
/// from 1).
const ADOPTED_ID_BASE: u64 = 1 << 62;

impl PinholeSink for MapsSink {
    fn install(&mut self, id: PinholeId, flow: &Flow) -> Result<(), SinkError> {
        let mut m = self.maps.lock().map_err(|_| SinkError::Poisoned)?;
        let started = Instant::now();
        let slots = m
            .add_flow(flow)
            .map_err(|source| SinkError::Map { source })?;
        crate::metrics::pinhole_installed(started.elapsed());
        drop(m);
        self.track(id, slots);
        Ok(())
    }

    fn update(&mut self, id: PinholeId, old: &Flow, flow: &Flow) -> Result<(), SinkError> {
        let (s_in, s_out) = self.flows.get(id).ok_or(SinkError::Unknown { id })?.slots;
        let map = |source: MapsError| SinkError::Map { source };
        let was = old.rules(s_in, s_out).map_err(|e| map(e.into()))?;
        let now = flow.rules(s_in, s_out).map_err(|e| map(e.into()))?;
        if was.inbound.0 == now.inbound.0 && was.outbound.0 == now.outbound.0 {
            // Same keys (the usual re-INVITE: the edge keeps its ports):
            // replace both rules in place, atomically for the datapath,
            // keeping counters, latch and FIB cache.
            let mut m = self.maps.lock().map_err(|_| SinkError::Poisoned)?;
            m.check_policy(flow).map_err(map)?;
            m.replace_rule(s_in, now.inbound.1).map_err(map)?;
            if let Err(e) = m.replace_rule(s_out, now.outbound.1) {
                // Never leave half a flow: put the inbound rule back.
                let _ = m.replace_rule(s_in, was.inbound.1);
                return Err(map(e));
            }
            return Ok(());
        }
        // Other keys: the old rules must go before the insert (a key may be
        // shared). The gap is a few map writes long.
        self.remove(id)?;
        if let Err(e) = self.install(id, flow) {
            let _ = self.install(id, old);
            return Err(e);
        }
        Ok(())
    }

    fn remove(&mut self, id: PinholeId) -> Result<(), SinkError> {
        let Tracked {
            slots: (s_in, s_out),
            seen: last,
        } = self.flows.remove(id).ok_or(SinkError::Unknown { id })?;
        crate::metrics::pinholes_in_use(self.flows.len() * 2);
        let mut m = self.maps.lock().map_err(|_| SinkError::Poisoned)?;
        // What the flow forwarded since the last tick, before it is gone.
        let now = flow_totals(&m, (s_in, s_out));
        crate::metrics::forwarded(now.0.saturating_sub(last.0), now.1.saturating_sub(last.1));
        m.delete_slot(s_in, true)
            .map_err(|source| SinkError::Map { source })?;
        Ok(())
    }

    fn activity(&mut self, part: Part) -> Result<Vec<(PinholeId, u64)>, SinkError> {
        let m = self.maps.lock().map_err(|_| SinkError::Poisoned)?;
        // Per pinhole, not a listing of every installed rule: every flow is
        // read each second (a tenth of them every 100 ms, `Part`), and
        // PH_DST can hold up to 2^20 entries. One read per
        // rule (a memory read: both tables are mapped) gives both the idle
        // check's packets and the forwarded-traffic metrics (each flow's
        // growth since the last reading). Only flows whose count moved are
        // returned: an unchanged count is news to no one (every consumer
        // compares with the count it last saw, and a flow first seen at 0
        // packets has carried nothing), and with tens of thousands of quiet
        // calls the rest is most of the tick's work. Only the two counters
        // are read (`DatapathMaps::traffic`), in the same table entry as
        // the slots: at 2,016 quiet calls the full reading (rule copies,
        // latch, clock) took a millisecond of the driver every second.
        let (mut packets, mut bytes) = (0u64, 0u64);
        let mut out = Vec::new();
        for (id, t) in self.flows.part_mut(part) {
            let now = flow_totals(&m, t.slots);
            let last = t.seen;
            if now == last {
                continue;
            }
            if now.0 != last.0 {
                out.push((*id, now.0));
            }
            t.seen = now;
            packets = packets.saturating_add(now.0.saturating_sub(last.0));
            bytes = bytes.saturating_add(now.1.saturating_sub(last.1));
        }
        crate::metrics::forwarded(packets, bytes);
        Ok(out)
    }

    fn counters(&mut self, id: PinholeId) -> Option<FlowCounters> {
        let slots = self.flows.get(id)?.slots;
        let m = self.maps.lock().ok()?;
        let read = |s: u32| m.counters(s).ok().flatten().unwrap_or_default();
        let (a, b) = (read(slots.0), read(slots.1));
        Some(FlowCounters {
            packets: a.0.saturating_add(b.0),
            bytes: a.1.saturating_add(b.1),
            last_seen_ns: a.2.max(b.2),
            slots,
        })
    }
}

/// One operation as a [`RecordingSink`] saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Installed.
    Install(PinholeId, Flow),
    /// Updated.
    Update(PinholeId, Flow),
    /// Removed.
    Remove(PinholeId),
}

/// Test sink: records operations, keeps the installed set, refuses
/// duplicate map keys like the real table does, can be told to fail.
#[derive(Debug, Default)]
pub struct RecordingSink {
    /// Every operation, in order.
    pub log: Vec<Recorded>,
    /// What is installed now.
    pub installed: BTreeMap<PinholeId, Flow>,
    /// Packet counters the next `activity` reports.
    pub packets: HashMap<PinholeId, u64>,
    /// Installs that still succeed before every further install fails (`None`: never fail).
    pub installs_before_failure: Option<usize>,
    keys: HashSet<PinholeKey>,
}

fn flow_keys(flow: &Flow) -> Vec<PinholeKey> {
    flow.rules(0, 1)
        .map(|p| vec![p.inbound.0, p.outbound.0])
        .unwrap_or_default()
}

impl RecordingSink {
    fn put(&mut self, id: PinholeId, flow: &Flow) -> Result<(), SinkError> {
        let keys = flow_keys(flow);
        if keys.is_empty() {
            return Err(SinkError::Refused {
                reason: format!("flow {flow:?} has no rules"),
            });
        }
        if keys.iter().any(|k| self.keys.contains(k)) {
            return Err(SinkError::Refused {
                reason: format!("a key of {flow:?} exists"),
            });
        }
        self.keys.extend(keys);
        self.installed.insert(id, *flow);
        Ok(())
    }

    fn take(&mut self, id: PinholeId) -> Result<Flow, SinkError> {
        let flow = self
            .installed
            .remove(&id)
            .ok_or(SinkError::Unknown { id })?;
        for k in flow_keys(&flow) {
            self.keys.remove(&k);
        }
        self.packets.remove(&id);
        Ok(flow)
    }
}

impl PinholeSink for RecordingSink {
    fn install(&mut self, id: PinholeId, flow: &Flow) -> Result<(), SinkError> {
        if let Some(n) = self.installs_before_failure.as_mut() {
            if *n == 0 {
                return Err(SinkError::Refused {
                    reason: "scripted table-full".into(),
                });
            }
            *n -= 1;
        }
        self.put(id, flow)?;
        self.log.push(Recorded::Install(id, *flow));
        Ok(())
    }

    fn update(&mut self, id: PinholeId, _old: &Flow, flow: &Flow) -> Result<(), SinkError> {
        let old = self.take(id)?;
        if let Err(e) = self.put(id, flow) {
            let _ = self.put(id, &old);
            return Err(e);
        }
        self.log.push(Recorded::Update(id, *flow));
        Ok(())
    }

    fn remove(&mut self, id: PinholeId) -> Result<(), SinkError> {
        self.take(id)?;
        self.log.push(Recorded::Remove(id));
        Ok(())
    }

    fn counters(&mut self, id: PinholeId) -> Option<FlowCounters> {
        self.installed.contains_key(&id).then(|| FlowCounters {
            packets: self.packets.get(&id).copied().unwrap_or(0),
            ..FlowCounters::default()
        })
    }

    fn activity(&mut self, _part: Part) -> Result<Vec<(PinholeId, u64)>, SinkError> {
        Ok(self
            .installed
            .keys()
            .map(|id| (*id, self.packets.get(id).copied().unwrap_or(0)))
            .collect())
    }
}

/// The media layer the proxy owns: manager + body rewriting + sink.
pub struct MediaController<S: PinholeSink> {
    mgr: Manager,
    sink: S,
    candidates: CandidatePolicy,
    /// Rules an earlier run left (`media::adopt`).
    adopted: Adopted,
    /// Dialog → rules, for the next run after a crash (production only).
    journal: Option<Journal>,
    /// This run's prefix of journal ids.
    run: String,
    /// Replication to the other edge nodes (`crate::ha`), with `[ha]`.
    ha: Option<ha::HaNode>,
    /// Dialogs whose media session was rebuilt from adopted flows
    /// (`session_key`): the proxy does not know them, so their BYE comes
    /// through `end_adopted`, and either party's tag names them.
    rebuilt: HashSet<DialogKey>,
    /// The activity part the next [`MediaControl::on_timers`] reads
    /// ([`ACTIVITY_PARTS`]: read, the tick reads none of this round).
    next_part: u64,
}

fn not_acceptable(reason: impl Into<String>) -> MediaError {
    MediaError::NotAcceptable {
        reason: reason.into(),
    }
}

/// Whether two lists of rule keys name the same rules (in any order).
fn same_keys(a: &[String], b: &[String]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    b.sort();
    a == b
}

/// A random tag per controller (per run), so journal ids of two runs
/// never collide; the clock and pid if the OS has no randomness.
fn run_tag() -> String {
    let mut b = [0u8; 6];
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        b.copy_from_slice(&(t ^ u64::from(std::process::id())).to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `application/SDP; charset=x` → `application/sdp`.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Turns a rewritten SDP into the body to forward (see `on_sdp_wrapped`).
type BodyWrap<'a> = dyn Fn(&[u8]) -> Result<Vec<u8>, MediaError> + 'a;

/// Part types a `multipart/mixed` body may carry next to its one SDP part:
/// types known to hold no network address, forwarded byte for byte.
const ADDRESS_FREE_PARTS: &[&str] = &["application/ms-filetransfer+xml"];

/// Transfer encodings that leave a part readable as it is.
fn identity_encoding(enc: Option<&str>) -> bool {
    enc.is_none_or(|e| {
        ["7bit", "8bit", "binary"]
            .iter()
            .any(|k| e.trim().eq_ignore_ascii_case(k))
    })
}

fn candidate_policy(c: MediaCandidates) -> CandidatePolicy {
    match c {
        MediaCandidates::Keep => CandidatePolicy::Keep,
        MediaCandidates::RemovePrivateHost => CandidatePolicy::RemovePrivateHost,
        MediaCandidates::ReplacePrivateHost => CandidatePolicy::ReplacePrivateHost,
        MediaCandidates::RemoveAll => CandidatePolicy::RemoveAll,
    }
}

fn endpoint(e: &Endpoint, index: usize) -> Result<SocketAddr, MediaError> {
    e.host
        .ip()
        .map(|ip| SocketAddr::new(ip, e.port))
        .ok_or_else(|| {
            not_acceptable(format!(
                "stream {index}: media address {} is not an IP address",
                e.host
            ))
        })
}

fn stream_desc(f: &MediaFlow) -> Result<StreamDesc, MediaError> {
    let proto = match f.proto {
        sdp::Proto::Udp => Proto::Udp,
        sdp::Proto::Tcp => Proto::Tcp,
    };
    let (rtp, rtcp) = match (&f.no_pinhole, &f.rtp) {
        (None, Some(e)) => (
            Some(endpoint(e, f.index)?),
            f.rtcp.as_ref().map(|e| endpoint(e, f.index)).transpose()?,
        ),
        _ => (None, None),
    };
    // The MSRP path is where the peer connects (RFC 4975 §9); a name
    // (not an IP literal) is no address the edge could send to.
    let path = match (&f.no_pinhole, &f.msrp_path) {
        (None, Some(uri)) => sdp::msrp_path_addr(uri),
        _ => None,
    };
    Ok(StreamDesc {
        proto,
        rtp,
        rtcp,
        rtcp_mux: f.rtcp_mux && rtp.is_some(),
        rejected: f.no_pinhole == Some(NoPinhole::PortZero),
        setup: f.setup.as_ref().map(|s| s.trim().to_ascii_lowercase()),
        path,
    })
}

impl MediaController<MapsSink> {
    /// Production controller over the shared map writer; adopts what an
    /// earlier run left in the maps (`media::adopt`).
    pub fn from_config(config: &Config, maps: Arc<Mutex<DatapathMaps>>) -> Self {
        let mut c = MediaController::new(
            Settings::from_config(config),
            config.media.candidates,
            MapsSink::new(maps.clone()),
        );
        c.recover(&lock::state_path(&config.pin_dir), &maps, Instant::now());
        if let Some(h) = &config.ha {
            c.ha_start(
                h,
                std::time::Duration::from_secs(config.media.idle_timeout_secs),
            );
        }
        c
    }

    /// Adopts every rule pair in the maps (none of this process's yet),
    /// naming their dialogs from the journal at `state`, and starts this
    /// run's journal there. Nothing here fails the start: without the
    /// journal, rules are adopted without dialogs; without the maps, none.
    pub fn recover(
        &mut self,
        state: &std::path::Path,
        maps: &Arc<Mutex<DatapathMaps>>,
        now: Instant,
    ) {
        let (journal, old) = match Journal::open(state) {
            Ok((j, old)) => (Some(j), old),
            Err(e) => {
                tracing::warn!(error = %e, "media state journal unavailable");
                (None, BTreeMap::new())
            }
        };
        self.journal = journal;
        let listed = match maps.lock() {
            Ok(m) => m.list(),
            Err(_) => {
                tracing::warn!("pinhole maps unavailable (lock poisoned); nothing adopted");
                return;
            }
        };
        let entries = match listed {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the pinned rules; nothing adopted");
                return;
            }
        };
        let s = self.mgr.settings();
        let edge: Vec<IpAddr> = s
            .internal_addrs
            .iter()
            .chain(&s.public_addrs)
            .copied()
            .collect();
        let found = adopt::found_flows(&entries, &edge, &s.port_ranges);
        let by_key: HashMap<&str, &str> = old
            .iter()
            .flat_map(|(id, r)| r.keys.iter().map(move |k| (k.as_str(), id.as_str())))
            .collect();
        let mut keep = BTreeMap::new();
        let (mut named, mut ports) = (0usize, 0usize);
        for (n, f) in found.iter().enumerate() {
            let journal_id = f
                .keys
                .iter()
                .find_map(|k| by_key.get(k.as_str()))
                .map(|s| (*s).to_owned());
            let record = journal_id.as_ref().and_then(|j| old.get(j));
            if let (Some(j), Some(r)) = (&journal_id, record) {
                keep.insert(j.clone(), r.clone());
                named += 1;
            }
            let id = PinholeId(ADOPTED_ID_BASE + n as u64);
            self.sink.adopt(id, f.slots);
            self.mgr.hold_ports(&f.ports);
            ports += f.ports.len();
            self.adopted.add(
                AdoptedFlow {
                    id,
                    journal_id,
                    dialog: record.map(|r| r.dialog.clone()),
                    ports: f.ports.clone(),
                    // Only a place whose flow is the rule found (the
                    // journal could be older than the maps).
                    media: record
                        .and_then(|r| r.media)
                        .filter(|m| same_keys(&flow_keys_text(&m.flow), &f.keys)),
                },
                f.packets,
                now,
            );
        }
        if let Some(j) = &mut self.journal {
            j.reset(keep);
        }
        if !found.is_empty() {
            tracing::info!(
                flows = found.len(),
                with_dialog = named,
                ports_held = ports,
                "adopted pinholes an earlier run left: they keep forwarding until their call ends (BYE) or they go idle"
            );
        }
    }
}

impl<S: PinholeSink> MediaController<S> {
    /// A controller with explicit settings.
    pub fn new(settings: Settings, candidates: MediaCandidates, sink: S) -> Self {
        MediaController {
            mgr: Manager::new(settings),
            sink,
            candidates: candidate_policy(candidates),
            adopted: Adopted::default(),
            journal: None,
            run: run_tag(),
            ha: None,
            rebuilt: HashSet::new(),
            next_part: 0,
        }
    }

    /// Reads the counters of the flows of `part` and marks what moved as
    /// active.
    fn read_activity(&mut self, part: Part, now: Instant) -> Result<(), SinkError> {
        for (id, packets) in self.sink.activity(part)? {
            if !self.adopted.on_activity(id, packets, now) && !self.ha_activity(id, packets, now) {
                self.mgr.on_activity(id, packets, now);
            }
        }
        Ok(())
    }

    /// Adopted flows still tracked (tests, status).
    pub fn adopted(&self) -> usize {
        self.adopted.len()
    }

    /// Starts this run's journal at `state` with nothing adopted: what
    /// [`MediaController::recover`] does on a host without pinned maps
    /// (tests measuring or exercising the journal without the datapath).
    pub fn open_journal(&mut self, state: &std::path::Path) -> Result<(), adopt::JournalError> {
        let (j, _old) = Journal::open(state)?;
        self.journal = Some(j);
        Ok(())
    }

    /// Records applied ops in the journal (the dialog of each new flow,
    /// the removal of each gone one).
    fn journal_ops(&mut self, ops: &[Op]) {
        self.ha_ops(ops);
        let Some(j) = &mut self.journal else {
            return;
        };
        for op in ops {
            match op {
                Op::Install { id, flow } | Op::Update { id, flow, .. } => {
                    if let Some(d) = self.mgr.dialog_of(*id) {
                        j.add_media(
                            &format!("{}-{}", self.run, id.0),
                            d,
                            flow_keys_text(flow),
                            self.mgr.place_of(*id),
                        );
                    }
                }
                Op::Remove { id, .. } => j.del(&format!("{}-{}", self.run, id.0)),
            }
        }
    }

    /// The key under which the manager tracks the session of `ev` when
    /// its dialog was set up elsewhere (another HA node, an earlier run):
    /// `None` for the proxy's own dialogs. An in-dialog offer (it names
    /// the other party's tag) for a dialog with adopted flows that carry
    /// their place (`adopt::FlowMedia`) rebuilds the session from them
    /// (`Manager::rebuild`), so the offer keeps the m-lines' edge ports,
    /// its answer replaces the old rules, and the BYE removes the rules.
    /// Only the dialog's own parties may change it (DESIGN.md §3): the
    /// proxy checks that for its dialogs, this for rebuilt ones, by the
    /// signalling source IP of each side the session recorded.
    fn session_key(
        &mut self,
        ev: &SdpEvent<'_>,
        now: Instant,
    ) -> Result<Option<DialogKey>, MediaError> {
        let tags: Vec<&str> = [Some(ev.dialog.from_tag.as_str()), ev.to_tag]
            .into_iter()
            .flatten()
            .collect();
        let call_id = ev.dialog.call_id.as_str();
        let of_call = |k: &DialogKey| k.call_id == call_id && tags.contains(&k.from_tag.as_str());
        let known = if self.rebuilt.contains(ev.dialog) {
            Some(ev.dialog.clone())
        } else if self.mgr.knows(ev.dialog) {
            return Ok(None);
        } else {
            self.rebuilt.iter().find(|k| of_call(k)).cloned()
        };
        let key = match known {
            Some(k) => k,
            // Only an in-dialog offer (an initial INVITE names no To tag).
            None if ev.role != SdpRole::Offer || ev.to_tag.is_none() => return Ok(None),
            None => {
                self.ha_claim_dialog(call_id, &tags, now);
                let mut flows = self
                    .adopted
                    .take_where(|f| f.media.is_some() && f.dialog.as_ref().is_some_and(&of_call));
                let Some(key) = flows.first().and_then(|f| f.dialog.clone()) else {
                    return Ok(None);
                };
                // One dialog (forks of a Call-ID aside): the first one's.
                let others: Vec<AdoptedFlow> = flows
                    .iter()
                    .filter(|f| f.dialog.as_ref() != Some(&key))
                    .cloned()
                    .collect();
                flows.retain(|f| f.dialog.as_ref() == Some(&key));
                for f in others {
                    self.adopted.add(f, 0, now);
                }
                let list: Vec<(PinholeId, adopt::FlowMedia, u64)> = flows
                    .iter()
                    .filter_map(|f| f.media.map(|m| (f.id, m, 0)))
                    .collect();
                if let Err(why) = self.mgr.rebuild(&key, &list, now) {
                    tracing::warn!(call_id, why, "media session of a call set up elsewhere not rebuilt; its offer gets new edge ports");
                    for f in flows {
                        self.adopted.add(f, 0, now);
                    }
                    return Ok(None);
                }
                // Its flows are the manager's now: journalled and written
                // to the store under this run's ids, the old entries gone.
                for f in &flows {
                    self.ha_adopted_gone(f);
                    if let (Some(j), Some(jid)) = (&mut self.journal, &f.journal_id) {
                        j.del(jid);
                    }
                }
                let ops: Vec<Op> = list
                    .iter()
                    .map(|(id, m, _)| Op::Install {
                        id: *id,
                        flow: m.flow,
                    })
                    .collect();
                self.journal_ops(&ops);
                self.rebuilt.insert(key.clone());
                tracing::info!(
                    call_id,
                    flows = list.len(),
                    "media session of a call set up elsewhere rebuilt for its in-dialog offer"
                );
                key
            }
        };
        if let Some(was) = self.mgr.source_of(&key, ev.from_side) {
            if was.to_canonical() != ev.source.ip().to_canonical() {
                tracing::warn!(
                    target: "sip_edge::security",
                    call_id,
                    source = %ev.source,
                    party = %was,
                    rule = "in-dialog-from-party",
                    "media change for a taken-over call from a source that is not the dialog's party refused"
                );
                return Err(MediaError::Forbidden {
                    reason: format!(
                        "{} is not the dialog's party on its side ({was})",
                        ev.source.ip()
                    ),
                    rule: None,
                });
            }
        }
        Ok(Some(key))
    }

    /// Removes adopted flows (expired, or ended by a BYE).
    fn drop_adopted(&mut self, flows: Vec<AdoptedFlow>, why: &str) {
        for f in flows {
            self.ha_adopted_gone(&f);
            if let Err(e) = self.sink.remove(f.id) {
                tracing::warn!(error = %e, "removing an adopted pinhole failed");
            }
            self.mgr.release_ports(&f.ports);
            if let (Some(j), Some(jid)) = (&mut self.journal, &f.journal_id) {
                j.del(jid);
            }
            tracing::info!(
                call_id = f.dialog.as_ref().map_or("", |d| d.call_id.as_str()),
                ports = ?f.ports,
                why,
                "adopted pinhole removed"
            );
        }
    }

    /// The manager (read-only: tests and status output).
    pub fn manager(&self) -> &Manager {
        &self.mgr
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The sink, mutable (tests feed counters through it).
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    fn rewrite_policy(&self, to: Side) -> RewritePolicy {
        let s = self.mgr.settings();
        let list = match to {
            Side::Internal => &s.internal_addrs,
            Side::External => &s.public_addrs,
        };
        RewritePolicy {
            candidates: self.candidates,
            edge_v4: list.iter().find_map(|a| match a {
                IpAddr::V4(v) => Some(*v),
                IpAddr::V6(_) => None,
            }),
            edge_v6: list.iter().find_map(|a| match a {
                IpAddr::V6(v) => Some(*v),
                IpAddr::V4(_) => None,
            }),
        }
    }

    /// Apply ops in order; on a failure undo what was applied, roll the
    /// manager back and report `Exhausted`.
    fn apply(&mut self, ops: &[Op]) -> Result<(), MediaError> {
        let mut done: Vec<&Op> = Vec::new();
        for op in ops {
            let r = match op {
                Op::Install { id, flow } => self.sink.install(*id, flow),
                Op::Update { id, old, flow } => self.sink.update(*id, old, flow),
                Op::Remove { id, .. } => self.sink.remove(*id),
            };
            match (r, op) {
                (Ok(()), _) => done.push(op),
                // A rule that cannot be removed is already gone (or the
                // table is unreachable); the call must not fail for it.
                (Err(e), Op::Remove { id, .. }) => {
                    tracing::warn!(?id, error = %e, "removing a pinhole failed");
                    done.push(op);
                }
                (Err(e), _) => {
                    for undo in done.iter().rev() {
                        let r = match undo {
                            Op::Install { id, .. } => self.sink.remove(*id),
                            Op::Update { id, old, flow } => self.sink.update(*id, flow, old),
                            Op::Remove { id, flow } => self.sink.install(*id, flow),
                        };
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "undoing a pinhole operation failed");
                        }
                    }
                    self.mgr.rollback();
                    return Err(MediaError::Exhausted {
                        reason: e.to_string(),
                    });
                }
            }
        }
        self.journal_ops(ops);
        Ok(())
    }

    /// Ops that only remove: apply all, log failures.
    fn apply_removals(&mut self, ops: &[Op]) {
        for op in ops {
            let r = match op {
                Op::Remove { id, .. } => self.sink.remove(*id),
                Op::Install { id, flow } => self.sink.install(*id, flow),
                Op::Update { id, old, flow } => self.sink.update(*id, old, flow),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "pinhole operation failed");
            }
        }
        self.journal_ops(ops);
    }

    fn on_sdp_body(&mut self, ev: &SdpEvent<'_>, now: Instant) -> Result<Vec<u8>, MediaError> {
        self.on_sdp_wrapped(ev, now, &|sdp: &[u8]| Ok(sdp.to_vec()))
    }

    /// The SDP path; `wrap` turns the rewritten SDP into the body to
    /// forward (identity, or the multipart reassembly). It runs before any
    /// pinhole operation is applied, so its failure rolls everything back.
    fn on_sdp_wrapped(
        &mut self,
        ev: &SdpEvent<'_>,
        now: Instant,
        wrap: &BodyWrap<'_>,
    ) -> Result<Vec<u8>, MediaError> {
        let parsed = Sdp::parse(ev.body).map_err(|e| not_acceptable(e.to_string()))?;
        // A dialog set up by another node or an earlier run: its session
        // is the manager's once rebuilt, under the caller's key.
        let session = self.session_key(ev, now)?;
        let rebuilt_ev;
        let ev = match &session {
            Some(k) => {
                rebuilt_ev = SdpEvent {
                    dialog: k,
                    to_tag: None,
                    ..ev.clone()
                };
                &rebuilt_ev
            }
            None => ev,
        };
        // Addresses the edge passes on but never pinholes still meet the
        // policy (DESIGN.md §3): ICE candidates, and multicast streams,
        // which no edge carries (a pinhole is one-to-one) and which would
        // have the other side send its media to a group on its own LAN.
        let (dialog, side, source) = (ev.dialog, ev.from_side, ev.source);
        for (index, ep) in parsed.candidate_addrs() {
            // The edge's own relay port of this very stream is the
            // peer-reflexive candidate ICE through the relay produces
            // (`media::manager` `ice`); the rewrite drops it.
            if self.mgr.is_relay_endpoint(dialog, index, ep) {
                continue;
            }
            let what = format!("stream {index}: ICE candidate");
            self.mgr
                .check_unpinholed(dialog, side, source, &what, SocketAddr::new(ep.ip(), 0))?;
        }
        for f in parsed.flows() {
            if f.no_pinhole != Some(NoPinhole::Multicast) {
                continue;
            }
            if let Some(ip) = f.rtp.as_ref().and_then(|e| e.host.ip()) {
                let what = format!("stream {}: media", f.index);
                let ep = SocketAddr::new(ip, f.rtp.as_ref().map_or(0, |e| e.port));
                self.mgr.check_unpinholed(dialog, side, source, &what, ep)?;
            }
        }
        let streams = parsed
            .flows()
            .iter()
            .map(stream_desc)
            .collect::<Result<Vec<_>, _>>()?;
        let to = ev.from_side.other();
        let rewrite = self.mgr.settings().mode == MediaMode::Relay
            || ev.from_side == Side::Internal
            || ev.far_media == FarMedia::RemoteUser;
        let policy = self.rewrite_policy(to);
        if rewrite {
            // Dry run with a placeholder port: every way the rewrite can fail
            // shows here, before the manager allocates anything.
            let edge = policy
                .edge_v4
                .map(IpAddr::V4)
                .or(policy.edge_v6.map(IpAddr::V6));
            let mut dry = |r: &FlowRequest<'_>| {
                let want_v6 = r
                    .flow
                    .rtp
                    .as_ref()
                    .and_then(|e| e.host.ip())
                    .is_some_and(|ip| ip.is_ipv6());
                let addr = if want_v6 {
                    policy.edge_v6.map(IpAddr::V6).or(edge)
                } else {
                    edge
                };
                addr.map(|addr| Allocation {
                    addr,
                    port: 9,
                    rtcp_port: None,
                })
            };
            parsed
                .rewrite(&policy, &mut dry)
                .map_err(|e| not_acceptable(e.to_string()))?;
        }
        // The receiver's own endpoints, as installed before this SDP, for
        // its `a=remote-candidates`.
        let own = self.mgr.own_endpoints(ev.dialog, to);
        let out = self.mgr.on_sdp(
            &SdpInput {
                dialog: ev.dialog,
                to_tag: ev.to_tag,
                role: ev.role,
                from_side: ev.from_side,
                source: ev.source,
                media_sources: ev.media_sources,
                far_media: ev.far_media,
                streams: &streams,
            },
            now,
        )?;
        let body = if rewrite {
            let mut alloc =
                |r: &FlowRequest<'_>| out.allocations.get(r.flow.index).copied().flatten();
            match parsed.rewrite_ice(&policy, &mut alloc, &own) {
                Ok(r) => r.sdp,
                Err(e) => {
                    self.mgr.rollback();
                    return Err(not_acceptable(e.to_string()));
                }
            }
        } else {
            ev.body.to_vec()
        };
        let body = match wrap(&body) {
            Ok(b) => b,
            Err(e) => {
                self.mgr.rollback();
                return Err(e);
            }
        };
        self.apply(&out.ops)?;
        Ok(body)
    }

    /// `multipart/mixed` = one SDP part + address-free parts (module docs).
    fn on_multipart_body(
        &mut self,
        ev: &SdpEvent<'_>,
        now: Instant,
    ) -> Result<Vec<u8>, MediaError> {
        let t = media_type(ev.content_type);
        if t != "multipart/mixed" {
            return Err(not_acceptable(format!(
                "{t} bodies are not rewritten; only multipart/mixed with one application/sdp part"
            )));
        }
        let mp = Multipart::parse(ev.content_type, ev.body)
            .map_err(|e| not_acceptable(e.to_string()))?;
        let mut sdp_part = None;
        for (i, part) in mp.parts().iter().enumerate() {
            let pt = part.media_type();
            if !identity_encoding(part.transfer_encoding.as_deref()) {
                return Err(not_acceptable(format!(
                    "multipart part {i} ({pt}) is transfer-encoded; it cannot be checked"
                )));
            }
            if pt == "application/sdp" {
                if sdp_part.replace(i).is_some() {
                    return Err(not_acceptable("multipart body has more than one SDP part"));
                }
            } else if !ADDRESS_FREE_PARTS.contains(&pt.as_str()) {
                return Err(not_acceptable(format!(
                    "multipart part {i} has type {pt:?}, which the edge cannot rewrite"
                )));
            }
        }
        let index = sdp_part.ok_or_else(|| not_acceptable("multipart body has no SDP part"))?;
        let sdp = mp
            .content(index)
            .ok_or_else(|| not_acceptable("multipart SDP part out of range"))?;
        let part_ev = SdpEvent {
            body: sdp,
            content_type: "application/sdp",
            ..ev.clone()
        };
        self.on_sdp_wrapped(&part_ev, now, &|new: &[u8]| {
            mp.replace_content(index, new)
                .map_err(|e| not_acceptable(e.to_string()))
        })
    }

    fn on_msmsgs_body(&mut self, ev: &SdpEvent<'_>, now: Instant) -> Result<Vec<u8>, MediaError> {
        let inv = msmsgs::parse(ev.body).map_err(|e| not_acceptable(e.to_string()))?;
        if inv.addressed && inv.endpoint.is_none() && inv.internal.is_none() {
            return Err(not_acceptable(
                "x-msmsgsinvite names IP-Address without a Port",
            ));
        }
        // An inside sender's LAN address (IP-Address-Internal) is the one the
        // edge reaches; an outside sender's public one (IP-Address) is.
        let order = match ev.from_side {
            Side::Internal => [inv.internal, inv.endpoint],
            Side::External => [inv.endpoint, inv.internal],
        };
        let listen: Vec<SocketAddr> = order.into_iter().flatten().collect();
        let out = self.mgr.on_invitation(
            &InvitationInput {
                dialog: ev.dialog,
                from_side: ev.from_side,
                source: ev.source,
                media_sources: ev.media_sources,
                command: inv.command.as_ref(),
                cookie: inv.cookie.as_deref(),
                listen: &listen,
            },
            now,
        )?;
        let body = match out.advertise {
            None if inv.addressed => {
                // Never forward an address the edge did not replace.
                self.mgr.rollback();
                return Err(not_acceptable("x-msmsgsinvite address was not rewritten"));
            }
            None => ev.body.to_vec(),
            Some(edge) => {
                match msmsgs::rewrite(ev.body, &mut |_: &msmsgs::Invitation| Some(edge)) {
                    Ok((b, _)) => b,
                    Err(e) => {
                        self.mgr.rollback();
                        return Err(not_acceptable(e.to_string()));
                    }
                }
            }
        };
        self.apply(&out.ops)?;
        Ok(body)
    }
}

impl<S: PinholeSink + Send> MediaControl for MediaController<S> {
    fn on_sdp(&mut self, ev: &SdpEvent<'_>, now: Instant) -> Result<Vec<u8>, MediaError> {
        let t = media_type(ev.content_type);
        let r = match t.as_str() {
            "application/sdp" => self.on_sdp_body(ev, now),
            "text/x-msmsgsinvite" => self.on_msmsgs_body(ev, now),
            // Address-free by definition (module docs): forwarded as is.
            "application/ms-filetransfer+xml" => Ok(ev.body.to_vec()),
            _ if t.starts_with("multipart/") => self.on_multipart_body(ev, now),
            _ => Err(not_acceptable(format!(
                "body type {t:?} is not a media description the edge can rewrite"
            ))),
        };
        if let Err(e) = &r {
            crate::metrics::media_refused(&ev.dialog.call_id, ev.from_side, ev.source, e);
        }
        r
    }

    fn on_dialog_end(
        &mut self,
        dialog: &DialogKey,
        to_tag: Option<&str>,
        reason: EndReason,
        now: Instant,
    ) {
        let ops = self.mgr.on_dialog_end(dialog, to_tag, reason, now);
        self.apply_removals(&ops);
        if !self.mgr.knows(dialog) {
            self.rebuilt.remove(dialog);
        }
    }

    fn on_timers(&mut self, now: Instant) {
        if self.next_part < ACTIVITY_PARTS {
            let part = Part {
                index: self.next_part,
                of: ACTIVITY_PARTS,
            };
            match self.read_activity(part, now) {
                Ok(()) => self.next_part += 1,
                // The tick reads it again, and says so if it fails again.
                Err(e) => tracing::debug!(error = %e, "reading pinhole counters failed"),
            }
        }
        // And a share of the expiry check (the tick ends what it found).
        self.mgr.on_timers(now, ACTIVITY_PARTS as usize);
    }

    fn on_tick(&mut self, now: Instant) -> Vec<DialogKey> {
        // The parts the timers did not read since the last tick (all of
        // them where nothing calls `on_timers`): every flow is read once
        // between two ticks.
        let first = std::mem::take(&mut self.next_part);
        for index in first..ACTIVITY_PARTS {
            let part = Part {
                index,
                of: ACTIVITY_PARTS,
            };
            // Without counters every call would look idle: skip this
            // round's expiry (a later tick catches up) rather than cut
            // live calls.
            if let Err(e) = self.read_activity(part, now) {
                tracing::warn!(error = %e, "reading pinhole counters failed");
                return Vec::new();
            }
        }
        self.ha_tick();
        let (expired, ops) = self.mgr.on_tick(now);
        self.apply_removals(&ops);
        if !self.rebuilt.is_empty() {
            let mgr = &self.mgr;
            self.rebuilt.retain(|k| mgr.knows(k));
        }
        if !self.adopted.is_empty() {
            let s = self.mgr.settings();
            let t = Timeouts {
                idle: s.idle_timeout,
                unused: s.unused_timeout,
                max_call: s.max_call,
            };
            let gone = self.adopted.expire(now, t);
            self.drop_adopted(gone, "idle");
        }
        expired
    }

    fn pinholes(&mut self) -> Vec<crate::status::PinholeStatus> {
        let mut out = Vec::new();
        for d in self.mgr.dialog_keys() {
            let flows = self.mgr.flows_of(&d).into_iter().map(|f| (f, "media"));
            let transfers = self
                .mgr
                .transfers_of(&d)
                .into_iter()
                .map(|f| (f, "transfer"));
            for ((id, flow), kind) in flows.chain(transfers).collect::<Vec<_>>() {
                let c = self.sink.counters(id).unwrap_or_default();
                out.push(crate::status::PinholeStatus::new(id.0, &d, kind, &flow, &c));
            }
        }
        out
    }

    fn sync_replicas(&mut self) {
        self.ha_tick();
    }

    fn end_adopted(&mut self, call_id: &str, tags: &[&str], now: Instant) -> bool {
        self.ha_claim_dialog(call_id, tags, now);
        let sessions: Vec<DialogKey> = self
            .rebuilt
            .iter()
            .filter(|k| k.call_id == call_id && tags.contains(&k.from_tag.as_str()))
            .cloned()
            .collect();
        let mut any = !sessions.is_empty();
        for k in sessions {
            self.rebuilt.remove(&k);
            let ops = self.mgr.on_dialog_end(&k, None, EndReason::Bye, now);
            self.apply_removals(&ops);
        }
        let gone = self.adopted.end_dialog(call_id, tags);
        any |= !gone.is_empty();
        self.drop_adopted(gone, "BYE");
        any
    }

    fn reconfigure(&mut self, settings: Settings, candidates: MediaCandidates) {
        self.mgr.reconfigure(settings);
        self.candidates = candidate_policy(candidates);
    }
}
