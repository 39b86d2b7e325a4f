//! The proxy state machine: server and client transactions, dialogs (for
//! SDP roles, media ends and BYE on media expiry) and routing. Events come
//! from the transport through the `on_*` methods with an `Instant`; every
//! method returns the [`Outgoing`] messages to send. No I/O, no clock.
//!
//! Requests sent to a UDP pseudo-connection (legacy internal clients) are
//! retransmitted here, not in the transport, because this is where the
//! transaction state that stops them lives (Timer A/E, RFC 3261 §17.1.1.2,
//! §17.1.2.2): the driver sleeps until [`Proxy::next_retransmit`] and calls
//! [`Proxy::on_retransmit`]; a response, Timer B/F or the end of the
//! transaction ends them. Requests the edge receives over UDP need nothing
//! new: server transactions already absorb retransmissions and resend the
//! last response.
//!
//! This file owns the state (the `Proxy` record, its transactions and
//! dialogs) and the entry point; the work on it is split by concern:
//! `request` (validate, absorb, forward), `response` (match, relay, hand
//! SDP to media), `transactions` (timers, retransmission, failing a
//! branch), `dialogs` (SDP roles, confirm and end media), `routing`
//! (Via/Record-Route, targets, Contact and registration bindings).

mod admit;
mod adopted;
mod calls;
mod dialogs;
mod live;
mod request;
mod response;
mod routing;
mod transactions;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use tracing::{debug, info, info_span, warn};

use super::{
    access::{self, Party, RateLimits},
    admission::Admission,
    bindings::{Bindings, FlowInfo, CONTACT_LIFETIME, TOKEN_PREFIX},
    build::{self, ByeLeg},
    ConnId, ConnInfo, Dest, HopTarget, Outgoing, Proto, ProxySettings,
};
use crate::{
    media::{
        DialogKey, EndReason, FarMedia, MediaControl, MediaError, SdpEvent, SdpRole, SharedStr,
        Side,
    },
    sip::{
        message::{Message, NameAddr, StartLine, Via},
        uri::{Host, SipUri},
    },
};

/// RFC 3261 §17.1.1.1: T1.
const T1: Duration = Duration::from_millis(500);
/// RFC 3261 §17.1.2.2: T2, the cap of Timer E (non-INVITE retransmissions).
const T2: Duration = Duration::from_secs(4);
/// Most armed UDP retransmissions; beyond it a request is sent once only
/// (bounded memory: every entry holds a copy of the request).
const MAX_RETRANSMISSIONS: usize = 10_000;
/// Timers B, F, H, J and the Accepted state (RFC 6026) are 64*T1.
const TIMER_64T1: Duration = Duration::from_millis(64 * 500);
/// Max-Forwards we add when a request has none (§16.6 step 3).
const DEFAULT_MAX_FORWARDS: u32 = 70;
/// Most live server transactions; beyond it new requests get 503.
const MAX_SERVER_TXS: usize = 100_000;
/// Retry-After (seconds) we put on our own 503s (§21.5.4).
const RETRY_AFTER_SECS: u32 = 5;
/// Extensions this proxy implements for Proxy-Require (§16.3 step 5):
/// none need proxy support except `path`/`outbound` handling we do.
const SUPPORTED_PROXY_EXT: &[&str] = &["path", "outbound"];
/// RFC 3261 §8.1.1.7 magic cookie.
const MAGIC_COOKIE: &str = "z9hG4bK";

/// Counters for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Requests forwarded.
    pub requests_forwarded: u64,
    /// Responses forwarded.
    pub responses_forwarded: u64,
    /// Responses the proxy generated.
    pub responses_generated: u64,
    /// Retransmissions absorbed.
    pub retransmissions_absorbed: u64,
}

/// A server transaction (§17.2): the request as received.
#[derive(Debug)]
struct ServerTx {
    conn: ConnId,
    request: Message,
    client_key: Option<String>,
    last_response: Option<Vec<u8>>,
    final_sent: bool,
    to_tag: String,
    /// Set once final: when to forget it (absorbs retransmissions until then).
    expires: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cancel {
    None,
    /// CANCEL received before any provisional: send it once one arrives (§9.1).
    Pending,
    Sent,
}

/// A client transaction (§17.1): the request as forwarded.
#[derive(Debug)]
struct ClientTx {
    server_key: Option<String>,
    request: Message,
    /// Where the request went (CANCEL/ACK follow it, §9.1).
    dest: Dest,
    /// The connection it went out on, once the transport says so.
    sent_on: Option<ConnId>,
    provisional: bool,
    final_code: Option<u16>,
    deadline: Instant,
    cancel: Cancel,
    dialog: Option<DialogKey>,
    initial_invite: bool,
    offer_in_request: bool,
}

/// A client transaction that got its final response no longer waits on
/// the connection it was sent on (`Proxy::sent_on`): taken off that
/// connection's list at once, not by the tick's sweep, which then only
/// meets transactions that ended otherwise.
fn unlist_sent(sent_on: &mut HashMap<ConnId, HashSet<String>>, conn: Option<ConnId>, key: &str) {
    if let Some(keys) = conn.and_then(|c| sent_on.get_mut(&c)) {
        keys.remove(key);
    }
}

/// Entries of `Proxy::client_due`: when, and which transaction.
type DueQueue = BinaryHeap<Reverse<(Instant, String)>>;

impl ClientTx {
    /// Moves the deadline to `at`, adding an entry to `due` only when the
    /// queue holds none at or before it: when `at` is earlier than the old
    /// deadline, or the old one has passed (its entry was taken). A later
    /// deadline is found when the old entry comes up (`Proxy::due_clients`
    /// puts it back at the new time), so a transaction keeps about one
    /// entry however often its deadline moves.
    fn set_deadline(&mut self, due: &mut DueQueue, key: &str, at: Instant, now: Instant) {
        let old = self.deadline;
        self.deadline = at;
        if at < old || old <= now {
            due.push(Reverse((at, key.to_owned())));
        }
    }
}

/// A request the edge sent over an unreliable transport (UDP) and
/// retransmits until answered (RFC 3261 §17.1.1.2 Timer A for INVITE,
/// §17.1.2.2 Timer E for non-INVITE), keyed like the client transaction.
#[derive(Debug)]
struct Retransmit {
    dest: Dest,
    bytes: Vec<u8>,
    /// When Timer A/E fires next.
    next: Instant,
    /// The current interval (T1 doubling; capped at T2 for non-INVITE).
    interval: Duration,
    invite: bool,
    /// Timer B/F: give up then. Client transactions also end by their own
    /// deadline; a CANCEL (no client transaction of its own here) only so.
    until: Instant,
}

/// One INVITE dialog (set) the edge proxied.
#[derive(Debug)]
struct Dialog {
    /// When its INVITE came: the record goes `max_dialog` + 64*T1 later
    /// at the latest (see `ProxySettings::max_dialog`).
    created: Instant,
    caller_side: Side,
    offer_in_invite: bool,
    awaiting_ack_answer: bool,
    confirmed: bool,
    ended: bool,
    caller_cseq: u32,
    callee_cseq: u32,
    /// Where the edge's BYEs go toward the caller and the callee when it
    /// ends the call (set when the dialog is confirmed).
    to_caller: Option<ByeTarget>,
    to_callee: Option<ByeTarget>,
    /// The INVITE's From header value, and its To until the 2xx that
    /// confirms the dialog gives the To with the callee's tag: kept once
    /// for the BYE legs (the BYE toward the callee carries them as From
    /// and To, the one toward the caller swapped) and the caller and
    /// callee URIs of status queries (`calls`).
    from: Box<str>,
    to: Box<str>,
    /// Who the caller is (its INVITE's source) and, once it answered, who
    /// the callee is: only they may send requests in the dialog.
    caller: PartyId,
    callee: Option<PartyId>,
    /// A 2xx to an INVITE was forwarded and its ACK has not come: the
    /// call is ended both ways then (`ProxySettings::ack_timeout`).
    ack_due: Option<Instant>,
}

/// One leg of a confirmed dialog as a BYE from the edge needs it (the
/// From/To pair is the dialog's, see `Dialog::from`).
#[derive(Debug)]
struct ByeTarget {
    /// The party's connection (its requests and responses came on it).
    conn: ConnId,
    /// The side it is on.
    side: Side,
    /// Remote target (the party's Contact URI): the same allocation as
    /// the original of the party's Contact binding, which holds that URI
    /// too (issue #12: bytes per established call).
    request_uri: std::sync::Arc<str>,
    /// Route set from the edge toward the party.
    routes: Box<[String]>,
}

/// Who a dialog's party is, as the edge can tell: a trusted peer (any
/// of its addresses), or the source address of its signalling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PartyId {
    /// `[[peer]]` number (32 bits: two of these sit in every dialog
    /// record, which a `usize` made a malloc size class larger; issue
    /// #12).
    Peer(u32),
    /// Its signalling source address.
    Addr(std::net::IpAddr),
}

/// How a request is refused: status and extra headers.
struct Reject {
    code: u16,
    why: String,
    extra: Vec<(&'static str, String)>,
    /// Answer without a server transaction: admission refusals, so a flood
    /// costs no state (their ACKs are absorbed by the edge's To tag).
    stateless: bool,
}

fn reject(code: u16, why: impl Into<String>) -> Reject {
    Reject {
        code,
        why: why.into(),
        extra: Vec::new(),
        stateless: false,
    }
}

/// The proxy core; see the module docs.
pub struct Proxy {
    settings: ProxySettings,
    media: Box<dyn MediaControl>,
    conns: HashMap<ConnId, ConnInfo>,
    server_txs: HashMap<String, ServerTx>,
    /// No server transaction's `expires` comes before this (`None`: none
    /// is set): the timers walk `server_txs` only once one can have come
    /// (issue #12: after a burst the table keeps its size, and a walk of
    /// its empty buckets every 100 ms took 0.2-1.6 ms at 50k held calls).
    server_due: Option<Instant>,
    client_txs: HashMap<String, ClientTx>,
    /// When each client transaction's `deadline` falls (earliest first),
    /// so the tick finds the due ones without walking every transaction
    /// (issue #12: INVITE transactions stay 64*T1 in the Accepted state,
    /// tens of thousands at a few thousand calls/s, and the walk stalled
    /// the driver for milliseconds each second). Entries go stale when a
    /// deadline moves or the transaction ends; the tick checks each
    /// against the transaction (`Proxy::due_clients`).
    client_due: DueQueue,
    /// Boxed: a `Dialog` is several hundred bytes, and a table stores its
    /// values inline in every bucket, empty ones included (issue #12:
    /// bytes per established call).
    dialogs: HashMap<DialogKey, Box<Dialog>>,
    /// Dialogs whose 2xx waits for its ACK, in the order the waits end
    /// (`ack_timeout` after each 2xx), so the tick looks at the waits
    /// that ended rather than at every dialog. An entry whose dialog was
    /// ACKed or ended is dropped when it comes up.
    ack_waits: VecDeque<(Instant, DialogKey)>,
    /// No dialog can be past the maximum call length before this (the
    /// oldest one's creation + the limit, at the last look); `None`: look
    /// at the next tick.
    stale_check_at: Option<Instant>,
    bindings: Bindings,
    retransmits: HashMap<String, Retransmit>,
    /// Client-transaction keys sent on each connection, so a closed
    /// connection fails its waiting transactions without scanning every
    /// transaction (completed ones linger for 64*T1: tens of thousands at
    /// a few hundred calls per second). Pruned lazily: entries whose
    /// transaction is gone or finished are dropped on close and on tick.
    sent_on: HashMap<ConnId, HashSet<String>>,
    /// The next hop each connection the edge sent a routed request on was
    /// opened for: tells which `[[route]]` a far party's SDP comes through
    /// (its `media_sources`, DESIGN.md §3). Removed on close.
    conn_hops: HashMap<ConnId, HopTarget>,
    /// Peer names each outside connection's TLS client certificate was
    /// verified for (`[[peer]] tls_identity`), from the transport.
    identities: HashMap<ConnId, Vec<String>>,
    /// Per-peer request rate limits (`[[peer]] max_requests_per_sec`).
    rates: RateLimits,
    /// Dialogs to end with BYE both ways once the message being handled
    /// has been forwarded (a refused answer in an ACK: the ACK first).
    byes_after: Vec<(DialogKey, Box<Dialog>)>,
    counter: u64,
    /// Random per instance (per agent run): the counter restarts at zero on
    /// every start, and RFC 3261 wants branches (§8.1.1.7) and tags
    /// (§19.3) unique across space and time, so that a stateful next hop
    /// never takes a new run's request for a retransmission of an old one.
    run_id: String,
    stats: ProxyStats,
    /// Rate limits and registration-failure blocks (`proxy::admission`);
    /// unlimited unless the transport sets it from `[limits]`.
    admission: Admission,
    /// A graceful stop is under way: new INVITEs get 503 (`live`).
    draining: bool,
}

/// 64 random bits as 16 hex digits, from the OS (getrandom(2)). Should the
/// OS refuse, the clock and the process id still make each run differ:
/// uniqueness, not secrecy, is what branches and tags need.
fn run_id() -> String {
    let mut b = [0u8; 8];
    let n = match getrandom::getrandom(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(e) => {
            warn!(error = %e, "no OS randomness; deriving the run id from the clock");
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            (t ^ u64::from(std::process::id()).rotate_left(40)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        }
    };
    format!("{n:016x}")
}

fn tx_key(branch: &str, via: &Via, method: &str) -> String {
    // §17.2.3: branch + sent-by + method, ACK matching the INVITE.
    let method = if method == "ACK" { "INVITE" } else { method };
    format!("{branch}|{}:{}|{method}", via.host, via.port.unwrap_or(0))
}

/// The server-transaction key of a request (RFC 3261 §17.2.3). With the
/// `z9hG4bK` cookie the branch identifies the transaction; without it the
/// request comes from an RFC 2543 element, whose branch (if any) is not
/// unique, so the key is what RFC 2543 matched on: Request-URI, From tag,
/// Call-ID, CSeq number and method, and the top Via (sent-by and branch;
/// `received`/`rport` are the edge's own additions). ACK takes the INVITE's
/// method so it finds its transaction (§17.2.3); CANCEL asks for the
/// INVITE's key explicitly (§9.2). The To tag
/// is left out: a retransmission carries the INVITE's own, and an ACK
/// carries the response's, which the caller checks where it matters.
///
/// The side the request arrived on is part of the key: the same branch
/// and sent-by from the other side of the edge is never a retransmission
/// (it cannot be: the two sides are different networks), and matching it
/// would hand one side's stored response to the other (RFC 4475 messages
/// sent from both sides did exactly that).
fn server_key(side: Side, msg: &Message, top: &Via, method: &str) -> String {
    let side = match side {
        Side::Internal => "i",
        Side::External => "e",
    };
    format!("{side}|{}", server_key_on_side(msg, top, method))
}

fn server_key_on_side(msg: &Message, top: &Via, method: &str) -> String {
    let branch = top.branch().unwrap_or_default();
    // The cookie alone identifies nothing (RFC 4475 §3.2.1): such a
    // request is matched the RFC 2543 way, like one without the cookie.
    if branch.starts_with(MAGIC_COOKIE) && branch.len() > MAGIC_COOKIE.len() {
        return tx_key(branch, top, method);
    }
    let method = if method == "ACK" { "INVITE" } else { method };
    let uri = match &msg.start {
        StartLine::Request { uri, .. } => uri.as_str(),
        StartLine::Response { .. } => "",
    };
    let from_tag = msg.from_tag().ok().flatten().unwrap_or_default();
    let call_id = msg.call_id().unwrap_or_default();
    let seq = msg.cseq().map_or(0, |c| c.seq);
    format!(
        "2543|{uri}|{from_tag}|{call_id}|{seq}|{method}|{}:{}|{branch}",
        via_sent_by_host(top),
        top.port.unwrap_or(0)
    )
}

fn via_sent_by_host(v: &Via) -> String {
    v.host.to_string().to_ascii_lowercase()
}

/// Whether a stored response is a 2xx (its ACK is a transaction of its own,
/// §17.1.1.3, never absorbed by the INVITE's server transaction).
fn is_2xx(response: &[u8]) -> bool {
    response
        .get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case(b"SIP/2.0 2"))
}

fn ctx_key(branch: &str, method: &str) -> String {
    format!("{branch}|{method}")
}

impl Proxy {
    /// A core with the given settings and media layer.
    pub fn new(settings: ProxySettings, media: Box<dyn MediaControl>) -> Self {
        Self {
            settings,
            media,
            conns: HashMap::new(),
            server_txs: HashMap::new(),
            server_due: None,
            client_txs: HashMap::new(),
            client_due: BinaryHeap::new(),
            dialogs: HashMap::new(),
            ack_waits: VecDeque::new(),
            stale_check_at: None,
            bindings: Bindings::new(),
            retransmits: HashMap::new(),
            sent_on: HashMap::new(),
            conn_hops: HashMap::new(),
            identities: HashMap::new(),
            rates: RateLimits::default(),
            byes_after: Vec::new(),
            counter: 0,
            run_id: run_id(),
            stats: ProxyStats::default(),
            admission: Admission::unlimited(),
            draining: false,
        }
    }

    /// Seals flow tokens with a key shared with the other HA node and
    /// later runs (`proxy::tokens`; `[ha] token_key_file`), so they can
    /// route this process's dialogs. Call before the first message.
    pub fn set_token_key(&mut self, key: super::tokens::TokenKey) {
        self.bindings.set_key(key);
    }

    /// Replaces the admission policy (the transport's, from `[limits]`).
    pub fn set_admission(&mut self, a: Admission) {
        self.admission = a;
    }

    /// Admission counters.
    pub fn admission_stats(&self) -> super::admission::AdmissionStats {
        self.admission.stats()
    }

    /// Counters.
    pub fn stats(&self) -> ProxyStats {
        self.stats
    }

    /// Number of live transactions and dialogs (tests check nothing leaks).
    pub fn live(&self) -> (usize, usize, usize) {
        (
            self.server_txs.len(),
            self.client_txs.len(),
            self.dialogs.len(),
        )
    }

    /// A connection was accepted or opened.
    pub fn on_conn_open(&mut self, conn: ConnId, info: ConnInfo) {
        self.conns.insert(conn, info);
    }

    /// The transport verified `conn`'s TLS client certificate for these
    /// `[[peer]] tls_identity` names (before or after `on_conn_open`).
    pub fn on_conn_identity(&mut self, conn: ConnId, names: Vec<String>) {
        self.identities.insert(conn, names);
    }

    fn next_id(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn new_branch(&mut self) -> String {
        let n = self.next_id();
        format!("{MAGIC_COOKIE}-se{}x{n:x}", self.run_id)
    }

    fn new_tag(&mut self) -> String {
        let n = self.next_id();
        format!("se{}x{n:x}", self.run_id)
    }

    /// The media policy of the far party whose message arrived on `conn`
    /// (`hop`: the next hop a response's request went to): a `[[peer]]`'s
    /// `media_sources` and latching, a remote user's (its signalling
    /// address only, port latched), or its `[[route]]`'s `media_sources`,
    /// matched by the hop the connection was opened for or by the peer
    /// address; nothing for the inside or an unmatched party.
    fn far_media(
        &self,
        conn: ConnId,
        info: &ConnInfo,
        hop: Option<&HopTarget>,
        now: Instant,
    ) -> (Vec<crate::config::Cidr>, FarMedia) {
        if info.side != Side::External {
            return (Vec::new(), FarMedia::Config);
        }
        let hop = hop.or_else(|| self.conn_hops.get(&conn));
        let none = Vec::new();
        let party = self.settings.access.classify(&access::Source {
            ip: info.peer.ip(),
            opened_to: hop,
            identities: self.identities.get(&conn).unwrap_or(&none),
            registered_flow: self
                .bindings
                .has_live_registration(conn, Side::External, now),
        });
        match party {
            Party::Peer(n) => {
                if let Some(p) = self.settings.access.peers.get(n) {
                    return (p.media_sources.clone(), p.far_media);
                }
            }
            Party::RemoteUser => return (Vec::new(), FarMedia::RemoteUser),
            Party::Unknown => {}
        }
        let peer = info.peer.ip().to_canonical();
        let sources = self
            .settings
            .route_media
            .iter()
            .find(|r| hop == Some(&r.hop) || r.host_ip.is_some_and(|ip| ip.to_canonical() == peer))
            .map(|r| r.sources.clone())
            .unwrap_or_default();
        (sources, FarMedia::Config)
    }

    /// Whether a URI names this edge (either side's address and port).
    fn names_us(&self, uri: &SipUri) -> Option<Side> {
        [Side::Internal, Side::External].into_iter().find(|s| {
            let l = self.settings.local(*s);
            let host_eq = match (&uri.host, &l.host) {
                (Host::Name(a), Host::Name(b)) => a.eq_ignore_ascii_case(b),
                (a, b) => a == b,
            };
            let port = uri.port.unwrap_or(5061);
            // The UDP listener's port names us too (the Record-Route we give
            // UDP clients carries it).
            host_eq && (port == l.port || port == self.settings.port_for(*s, Proto::Udp))
        })
    }

    /// A framed message arrived on `conn`.
    pub fn on_message(&mut self, conn: ConnId, raw: &[u8], now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let Some(info) = self.conns.get(&conn).copied() else {
            warn!(conn, "message on unknown connection dropped");
            return out;
        };
        let mut msg = match Message::parse(raw) {
            Ok(m) => m,
            Err(e) => {
                if info.proto == Proto::Udp {
                    if matches!(
                        e,
                        crate::sip::message::MessageError::ContentLengthMismatch { .. }
                    ) && raw.starts_with(b"SIP/")
                    {
                        // §18.3: a response shorter than its Content-Length
                        // is discarded; a request gets 400 (below, by its
                        // Via), as RFC 4475 §3.1.2.2 says of `clerr`.
                        info!(conn, error = %e, "truncated response datagram discarded");
                        return out;
                    }
                    if !has_via_line(raw) {
                        // Nothing to route a 400 by (§18.2.2 needs the
                        // Via); answering junk from any source would only
                        // make the edge a reflector.
                        info!(conn, error = %e, "malformed datagram without Via dropped");
                        return out;
                    }
                }
                info!(conn, error = %e, "refusing malformed message");
                let host = self.settings.local(info.side).host.to_string();
                if let Some(bytes) = build::error_raw(raw, 400, &host, &e.to_string()) {
                    self.stats.responses_generated += 1;
                    crate::metrics::sip_response(400, true);
                    out.push(Outgoing {
                        dest: Dest::Conn(conn),
                        bytes,
                        client_tx: None,
                    });
                }
                return out;
            }
        };
        let call_id = msg.call_id().map(str::to_owned).unwrap_or_default();
        let span = info_span!("call", call_id = %call_id);
        let _g = span.enter();
        crate::metrics::sip_message(info.side, &msg);
        match msg.start {
            StartLine::Request { .. } => {
                if let Err(r) = self.on_request(conn, info, &mut msg, now, &mut out) {
                    crate::metrics::local_refusal(
                        info.peer,
                        info.side,
                        &msg,
                        r.code,
                        &r.why,
                        r.stateless,
                    );
                    if msg.method().is_some_and(|m| m.is("ACK")) {
                        // §17: ACK is never answered.
                        debug!(code = r.code, why = %r.why, "dropping ACK");
                    } else {
                        info!(code = r.code, why = %r.why, "rejecting request");
                        let tag = self.new_tag();
                        let stateless = r.stateless;
                        let mut extra = r.extra;
                        extra.push(self.warning(conn, &r.why));
                        let bytes = self.respond_local(conn, &msg, r.code, &tag, &extra, &mut out);
                        if !stateless {
                            self.remember_local_final(conn, info, msg, tag, bytes, now);
                        }
                    }
                }
            }
            StartLine::Response { .. } => self.on_response(conn, info, msg, now, &mut out),
        }
        for (k, d) in std::mem::take(&mut self.byes_after) {
            self.send_byes(&k, d, now, &mut out);
        }
        out
    }

    /// The stream framer refused what `conn` sent and the connection will
    /// close: the error response to send first (400/413/513 from
    /// `FrameError::response_code`), built from the offending `head` (its
    /// Via, From, To, Call-ID and CSeq lines) with a Warning carrying `why`.
    /// Nothing when `head` starts a response (never answered, §17.1.3).
    pub fn on_framing_error(
        &mut self,
        conn: ConnId,
        head: &[u8],
        code: u16,
        why: &str,
    ) -> Vec<Outgoing> {
        let Some(info) = self.conns.get(&conn) else {
            return Vec::new();
        };
        let host = self.settings.local(info.side).host.to_string();
        let Some(bytes) = build::error_raw(head, code, &host, why) else {
            return Vec::new();
        };
        info!(conn, code, why, "answering a message the framer refused");
        self.stats.responses_generated += 1;
        crate::metrics::sip_response(code, true);
        vec![Outgoing {
            dest: Dest::Conn(conn),
            bytes,
            client_tx: None,
        }]
    }

    /// Sends a response the edge generates to `req` on `conn`; returns its
    /// bytes (a server transaction may keep them for retransmissions).
    fn respond_local(
        &mut self,
        conn: ConnId,
        req: &Message,
        code: u16,
        tag: &str,
        extra: &[(&'static str, String)],
        out: &mut Vec<Outgoing>,
    ) -> Vec<u8> {
        self.stats.responses_generated += 1;
        crate::metrics::sip_response(code, true);
        let bytes = build::response(req, code, Some(tag), extra);
        out.push(Outgoing {
            dest: Dest::Conn(conn),
            bytes: bytes.clone(),
            client_tx: None,
        });
        bytes
    }

    /// RFC 3261 §20.43: a Warning (code 399, miscellaneous) naming this
    /// edge by its address on the side of `conn`, so the party the edge
    /// refused sees why in its log. The text is the party's own problem
    /// (its request, its SDP) or a generic one; never the other side's
    /// details (callers pass only such texts).
    fn warning(&self, conn: ConnId, why: &str) -> (&'static str, String) {
        let side = self.conns.get(&conn).map_or(Side::Internal, |i| i.side);
        (
            "Warning",
            build::warning_value(&self.settings.local(side).host.to_string(), why),
        )
    }

    /// A final response the edge generated to `req` creates the server
    /// transaction it would have had if forwarded (RFC 3261 §17.2.1,
    /// §17.2.2): an INVITE's absorbs the ACK for it (Timer H, 64*T1) and
    /// retransmissions get the same response; a non-INVITE's absorbs
    /// retransmissions over UDP for Timer J (64*T1) and, over TLS/TCP,
    /// where Timer J is 0, is not kept at all. Without it the ACK for the
    /// edge's own 488 was routed on to a callee that never saw the INVITE.
    fn remember_local_final(
        &mut self,
        conn: ConnId,
        info: ConnInfo,
        req: Message,
        to_tag: String,
        response: Vec<u8>,
        now: Instant,
    ) {
        let (Some(method), Ok(top)) = (req.method().map(ToString::to_string), req.top_via()) else {
            return;
        };
        if method != "INVITE" && !info.proto.unreliable() {
            return;
        }
        if self.server_txs.len() >= MAX_SERVER_TXS {
            return;
        }
        let key = server_key(info.side, &req, &top, &method);
        let expires = now + TIMER_64T1;
        self.server_txs.entry(key).or_insert(ServerTx {
            conn,
            request: req,
            client_key: None,
            last_response: Some(response),
            final_sent: true,
            to_tag,
            expires: Some(expires),
        });
        sooner(&mut self.server_due, expires);
    }

    /// Ends every dialog's media (agent shutdown).
    pub fn shutdown(&mut self, now: Instant) {
        let keys: Vec<DialogKey> = self.dialogs.keys().cloned().collect();
        for k in keys {
            self.end_dialog(&k, None, EndReason::Shutdown, now);
        }
        self.dialogs.clear();
    }
}

fn media_reject(e: &MediaError) -> Reject {
    let mut r = reject(e.status(), e.to_string());
    if e.status() == 503 {
        r.extra.push(("Retry-After", RETRY_AFTER_SECS.to_string()));
    }
    r
}

fn busy(why: &str) -> Reject {
    Reject {
        code: 503,
        why: why.into(),
        extra: vec![("Retry-After", RETRY_AFTER_SECS.to_string())],
        stateless: false,
    }
}

/// Whether a raw (unparsable) message has a Via header line, long or
/// compact form (§7.3.3), to send a 400 back by.
fn has_via_line(raw: &[u8]) -> bool {
    raw.split(|b| *b == b'\n').skip(1).any(|l| {
        let name = l.split(|b| *b == b':').next().unwrap_or_default();
        let name = String::from_utf8_lossy(name);
        l.contains(&b':') && crate::sip::message::same_header(name.trim(), "Via")
    })
}

/// What a message body means to the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyKind {
    /// Nothing in it is rewritten (text, images, S/MIME-signed or
    /// encrypted bodies without SDP...): forwarded byte for byte.
    Opaque,
    /// Carries media addresses the edge must rewrite: it goes through the
    /// media layer, or not across the edge at all.
    Media,
    /// Carries media the edge must rewrite under a `multipart/signed`
    /// signature (RFC 1847, S/MIME RFC 8551, RFC 3261 §23): rewriting would
    /// break the signature and forwarding unrewritten would leak the
    /// inside, so it is refused.
    SignedMedia,
}

/// Top-level types that go to the media layer. `ms-filetransfer+xml` is
/// address-free but rides in INFO/MESSAGE of a file-transfer dialog, where
/// the media layer passes it on (see `media::control`).
const MEDIA_TYPES: &[&str] = &[
    "application/sdp",
    "text/x-msmsgsinvite",
    "application/ms-filetransfer+xml",
];

/// Part types inside a multipart body that the edge must rewrite.
const REWRITTEN_PART_TYPES: &[&str] = &["application/sdp", "text/x-msmsgsinvite"];

/// Multipart nesting looked into; deeper bodies count as media-bearing
/// (the media layer refuses them) rather than pass unchecked.
const MAX_MULTIPART_DEPTH: usize = 4;

/// Classifies a body by its Content-Type and, for `multipart/*`, by the
/// parts it holds (RFC 2046 §5.1): only a part the edge must rewrite makes
/// it media-bearing, so a signed or mixed body without SDP passes intact.
fn body_kind(ct: &str, body: &[u8]) -> BodyKind {
    let base = crate::sip::multipart::base_type(ct);
    if MEDIA_TYPES.contains(&base.as_str()) {
        return BodyKind::Media;
    }
    multipart_kind(ct, body, 0, false)
}

fn multipart_kind(ct: &str, body: &[u8], depth: usize, signed: bool) -> BodyKind {
    let base = crate::sip::multipart::base_type(ct);
    let media = if signed {
        BodyKind::SignedMedia
    } else {
        BodyKind::Media
    };
    if REWRITTEN_PART_TYPES.contains(&base.as_str()) {
        return media;
    }
    if !base.starts_with("multipart/") {
        // Includes application/pkcs7-mime (S/MIME encryption, RFC 8551
        // §3.3): end-to-end encrypted, nothing the edge could rewrite.
        return BodyKind::Opaque;
    }
    let signed = signed || base == "multipart/signed";
    if depth >= MAX_MULTIPART_DEPTH {
        return media;
    }
    // A body that does not parse as MIME cannot be shown SDP-free: treat it
    // as media-bearing, so it is refused or removed, never passed unread.
    let Ok(mp) = crate::sip::multipart::Multipart::parse(ct, body) else {
        return media;
    };
    let mut kind = BodyKind::Opaque;
    for (i, part) in mp.parts().iter().enumerate() {
        let part_ct = part.content_type.as_deref().unwrap_or("text/plain");
        let content = mp.content(i).unwrap_or_default();
        match multipart_kind(part_ct, content, depth + 1, signed) {
            BodyKind::SignedMedia => return BodyKind::SignedMedia,
            BodyKind::Media => kind = BodyKind::Media,
            BodyKind::Opaque => {}
        }
    }
    kind
}

/// The refusal of a signed body the edge would have to rewrite.
fn signed_media_refusal() -> MediaError {
    MediaError::NotAcceptable {
        reason: "signed body (multipart/signed) carries SDP the edge must rewrite; \
                 rewriting would break the signature (RFC 3261 section 23); send it unsigned"
            .into(),
    }
}

/// A media-bearing body that no offer/answer exchange covers (SDP in an
/// OPTIONS 200, a retransmitted 2xx, an out-of-dialog MESSAGE...) would
/// cross the edge with the other side's private addresses in it: remove it.
fn strip_unhandled_media_body(msg: &mut Message) {
    msg.set_body(Vec::new());
    msg.remove_header("Content-Type");
    debug!("media-bearing body outside an offer/answer exchange removed");
}

/// Expires of a REGISTER: the header (§10.2.1.1).
fn register_expires(msg: &Message) -> Option<u32> {
    msg.header("Expires").and_then(|e| e.trim().parse().ok())
}

/// Lowers `due` to `at` when that comes sooner.
fn sooner(due: &mut Option<Instant>, at: Instant) {
    *due = Some(due.map_or(at, |d| d.min(at)));
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod torture;
