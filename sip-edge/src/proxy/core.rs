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

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use tracing::{debug, info, info_span, warn};

use super::{
    bindings::{Bindings, CONTACT_LIFETIME, TOKEN_PREFIX},
    build::{self, ByeLeg},
    ConnId, ConnInfo, Dest, HopTarget, Outgoing, Proto, ProxySettings,
};
use crate::{
    media::{DialogKey, EndReason, MediaControl, MediaError, SdpEvent, SdpRole, Side},
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
/// Timer C (§16.6 step 11): more than 3 minutes.
const TIMER_C: Duration = Duration::from_secs(181);
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
    caller_side: Side,
    offer_in_invite: bool,
    awaiting_ack_answer: bool,
    confirmed: bool,
    ended: bool,
    caller_cseq: u32,
    callee_cseq: u32,
    /// (destination, leg) for BYEs toward the caller and the callee.
    to_caller: Option<(Dest, Side, ByeLeg)>,
    to_callee: Option<(Dest, Side, ByeLeg)>,
}

/// How a request is refused: status and extra headers.
struct Reject {
    code: u16,
    why: String,
    extra: Vec<(&'static str, String)>,
}

fn reject(code: u16, why: impl Into<String>) -> Reject {
    Reject {
        code,
        why: why.into(),
        extra: Vec::new(),
    }
}

/// The proxy core; see the module docs.
pub struct Proxy {
    settings: ProxySettings,
    media: Box<dyn MediaControl>,
    conns: HashMap<ConnId, ConnInfo>,
    server_txs: HashMap<String, ServerTx>,
    client_txs: HashMap<String, ClientTx>,
    dialogs: HashMap<DialogKey, Dialog>,
    bindings: Bindings,
    retransmits: HashMap<String, Retransmit>,
    /// Client-transaction keys sent on each connection, so a closed
    /// connection fails its waiting transactions without scanning every
    /// transaction (completed ones linger for 64*T1: tens of thousands at
    /// a few hundred calls per second). Pruned lazily: entries whose
    /// transaction is gone or finished are dropped on close and on tick.
    sent_on: HashMap<ConnId, HashSet<String>>,
    counter: u64,
    stats: ProxyStats,
}

fn tx_key(branch: &str, via: &Via, method: &str) -> String {
    // §17.2.3: branch + sent-by + method, ACK matching the INVITE.
    let method = if method == "ACK" { "INVITE" } else { method };
    format!("{branch}|{}:{}|{method}", via.host, via.port.unwrap_or(0))
}

fn ctx_key(branch: &str, method: &str) -> String {
    format!("{branch}|{method}")
}

/// Bodies that can carry media addresses: they go through the media layer
/// or not across the edge at all. Multipart is included so a multipart
/// body with SDP inside is refused by the media layer instead of leaking
/// the inside's addresses unrewritten.
fn is_sdp_type(ct: &str) -> bool {
    let base = ct.split(';').next().unwrap_or("").trim();
    [
        "application/sdp",
        "text/x-msmsgsinvite",
        "application/ms-filetransfer+xml",
    ]
    .iter()
    .any(|t| base.eq_ignore_ascii_case(t))
        || base
            .get(..10)
            .is_some_and(|p| p.eq_ignore_ascii_case("multipart/"))
}

/// A media-bearing body that no offer/answer exchange covers (SDP in an
/// OPTIONS 200, a retransmitted 2xx, an out-of-dialog MESSAGE...) would
/// cross the edge with the other side's private addresses in it: remove it.
fn strip_unhandled_media_body(msg: &mut Message) {
    msg.set_body(Vec::new());
    msg.remove_header("Content-Type");
    debug!("media-bearing body outside an offer/answer exchange removed");
}

impl Proxy {
    /// A core with the given settings and media layer.
    pub fn new(settings: ProxySettings, media: Box<dyn MediaControl>) -> Self {
        Self {
            settings,
            media,
            conns: HashMap::new(),
            server_txs: HashMap::new(),
            client_txs: HashMap::new(),
            dialogs: HashMap::new(),
            bindings: Bindings::new(),
            retransmits: HashMap::new(),
            sent_on: HashMap::new(),
            counter: 0,
            stats: ProxyStats::default(),
        }
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

    /// A connection closed: its flow tokens die (RFC 5626 §5.3), client
    /// transactions waiting on it fail as if the hop answered 503 (§16.7
    /// step 1 treats a transport error so).
    pub fn on_conn_closed(&mut self, conn: ConnId, now: Instant) -> Vec<Outgoing> {
        self.conns.remove(&conn);
        self.bindings.conn_closed(conn);
        let mut waiting: Vec<String> = self
            .sent_on
            .remove(&conn)
            .unwrap_or_default()
            .into_iter()
            .filter(|k| {
                self.client_txs
                    .get(k)
                    .is_some_and(|c| c.final_code.is_none() && c.sent_on == Some(conn))
            })
            .collect();
        waiting.sort();
        let mut out = Vec::new();
        for k in waiting {
            self.fail_client(&k, 503, now, &mut out);
        }
        out
    }

    /// The transport could not deliver the request of client transaction
    /// `ckey` (connect or TLS failure): 503 upstream. A CANCEL of the same
    /// branch would go the same way, so it fails too.
    pub fn on_unreachable(&mut self, ckey: &str, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let branch = ckey.split('|').next().unwrap_or_default();
        for k in [ckey.to_owned(), ctx_key(branch, "CANCEL")] {
            if self.client_txs.contains_key(&k) {
                self.fail_client(&k, 503, now, &mut out);
            }
        }
        out
    }

    /// The transport sent the request of client transaction `ckey` over
    /// `conn` (so a closed connection can fail the transactions that were
    /// waiting on it).
    pub fn on_sent(&mut self, ckey: &str, conn: ConnId) {
        if let Some(c) = self.client_txs.get_mut(ckey) {
            c.sent_on = Some(conn);
            self.sent_on
                .entry(conn)
                .or_default()
                .insert(ckey.to_owned());
        }
    }

    fn next_id(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn new_branch(&mut self) -> String {
        let n = self.next_id();
        format!(
            "{MAGIC_COOKIE}-se{n:x}x{:08x}",
            (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32
        )
    }

    fn new_tag(&mut self) -> String {
        let n = self.next_id();
        format!("se{:x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn via_for(&self, side: Side, proto: Proto, branch: &str) -> String {
        let l = self.settings.local(side);
        // §18.1.1: sent-by is where responses come back; over UDP that is
        // the UDP listener's port.
        format!(
            "SIP/2.0/{} {}:{};branch={branch}",
            proto.via_token(),
            l.host,
            self.settings.port_for(side, proto)
        )
    }

    fn dest_proto(&self, dest: &Dest) -> Proto {
        match dest {
            Dest::Conn(c) => self.conns.get(c).map_or(Proto::Tls, |i| i.proto),
            Dest::Hop { .. } => Proto::Tls,
        }
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
                    ) {
                        // §18.3: a datagram shorter than its Content-Length
                        // is discarded, not answered.
                        info!(conn, error = %e, "truncated datagram discarded");
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
                if let Some(bytes) = build::bad_request_raw(raw, &e.to_string()) {
                    self.stats.responses_generated += 1;
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
        match msg.start {
            StartLine::Request { .. } => {
                if let Err(r) = self.on_request(conn, info, &mut msg, now, &mut out) {
                    if msg.method().is_some_and(|m| m.is("ACK")) {
                        // §17: ACK is never answered.
                        debug!(code = r.code, why = %r.why, "dropping ACK");
                    } else {
                        info!(code = r.code, why = %r.why, "rejecting request");
                        let tag = self.new_tag();
                        self.respond_local(conn, &msg, r.code, &tag, &r.extra, &mut out);
                    }
                }
            }
            StartLine::Response { .. } => self.on_response(conn, info, msg, now, &mut out),
        }
        out
    }

    fn respond_local(
        &mut self,
        conn: ConnId,
        req: &Message,
        code: u16,
        tag: &str,
        extra: &[(&'static str, String)],
        out: &mut Vec<Outgoing>,
    ) {
        self.stats.responses_generated += 1;
        out.push(Outgoing {
            dest: Dest::Conn(conn),
            bytes: build::response(req, code, Some(tag), extra),
            client_tx: None,
        });
    }

    fn on_request(
        &mut self,
        conn: ConnId,
        info: ConnInfo,
        msg: &mut Message,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Reject> {
        let bad = |e: crate::sip::message::MessageError| reject(400, e.to_string());
        if let StartLine::Request { version, .. } = &msg.start {
            if !version.eq_ignore_ascii_case("SIP/2.0") {
                return Err(reject(505, "version"));
            }
        }
        let method = msg.method().map(ToString::to_string).unwrap_or_default();
        // §16.3 step 1: the headers we need must parse.
        msg.call_id().map_err(bad)?;
        let cseq = msg.cseq().map_err(bad)?;
        if cseq.method.to_string() != method {
            return Err(reject(400, "CSeq method does not match the Request-Line"));
        }
        msg.from().map_err(bad)?;
        msg.to().map_err(bad)?;
        let vias = msg.vias().map_err(bad)?;
        let top = vias.first().cloned().ok_or_else(|| reject(400, "no Via"))?;
        // §18.2.1 / RFC 3581: stamp received (and rport when asked).
        msg.stamp_top_via(info.peer).map_err(bad)?;
        let top = msg.top_via().unwrap_or(top);
        let branch = top.branch().unwrap_or_default().to_owned();
        if !branch.starts_with(MAGIC_COOKIE) {
            // RFC 2543 transactions cannot be matched reliably; every
            // RFC 3261 element sends the cookie (§8.1.1.7).
            return Err(reject(400, "Via branch lacks the z9hG4bK magic cookie"));
        }
        let skey = tx_key(&branch, &top, &method);

        // Retransmission or ACK/CANCEL for an existing server transaction.
        if method == "ACK" {
            if let Some(stx) = self.server_txs.get(&skey) {
                if stx.final_sent {
                    // §17.2.1: ACK for our non-2xx final response ends here.
                    self.stats.retransmissions_absorbed += 1;
                    debug!("ACK for non-2xx absorbed");
                    return Ok(());
                }
            }
        } else if let Some(stx) = self.server_txs.get(&skey) {
            self.stats.retransmissions_absorbed += 1;
            if let Some(r) = stx.last_response.clone() {
                out.push(Outgoing {
                    dest: Dest::Conn(stx.conn),
                    bytes: r,
                    client_tx: None,
                });
            }
            return Ok(());
        }
        if method == "CANCEL" {
            return self.on_cancel(conn, msg, &top, &branch, now, out);
        }

        // §16.3 step 3: Max-Forwards.
        let mf = match msg.max_forwards() {
            Some(r) => r.map_err(bad)?,
            None => DEFAULT_MAX_FORWARDS + 1,
        };
        if mf == 0 {
            return Err(reject(483, "Max-Forwards reached 0"));
        }
        // §16.3 step 4: loop detection, cheap form: a Via of ours whose
        // branch is a live client transaction for the same Call-ID/CSeq.
        for v in vias.iter().skip(1) {
            if let Some(b) = v.branch() {
                if let Some(ctx) = self.client_txs.get(&ctx_key(b, &method)) {
                    if ctx.request.call_id().ok() == msg.call_id().ok()
                        && ctx.request.cseq().ok().map(|c| c.seq) == Some(cseq.seq)
                    {
                        return Err(reject(482, "request looped back to the edge"));
                    }
                }
            }
        }
        // §16.3 step 5: Proxy-Require.
        let unsupported: Vec<String> = msg
            .header_all("Proxy-Require")
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_owned())
            .filter(|t| {
                !t.is_empty()
                    && !SUPPORTED_PROXY_EXT
                        .iter()
                        .any(|s| s.eq_ignore_ascii_case(t))
            })
            .collect();
        if !unsupported.is_empty() {
            return Err(Reject {
                code: 420,
                why: "unsupported Proxy-Require".into(),
                extra: vec![("Unsupported", unsupported.join(", "))],
            });
        }
        if self.server_txs.len() >= MAX_SERVER_TXS && method != "ACK" {
            return Err(Reject {
                code: 503,
                why: "transaction table full".into(),
                extra: vec![("Retry-After", RETRY_AFTER_SECS.to_string())],
            });
        }
        let ruri = match msg.request_uri() {
            Some(Ok(u)) => u,
            Some(Err(_)) | None => return Err(reject(416, "Request-URI is not sip:/sips:")),
        };

        // §16.4: strict-router compatibility, then pop our own Routes.
        let mut ruri = ruri;
        if ruri.userinfo.is_none()
            && self.names_us(&ruri).is_some()
            && msg.header("Route").is_some()
        {
            let mut routes = msg.name_addrs("Route").map_err(bad)?;
            if let Some(last) = routes.pop() {
                msg.set_request_uri(&last.uri);
                msg.set_name_addrs("Route", &routes);
                ruri = SipUri::parse(&last.uri).map_err(|_| reject(416, "bad Route URI"))?;
            }
        }
        let mut routes = msg.name_addrs("Route").map_err(bad)?;
        let before = routes.len();
        while let Some(first) = routes.first() {
            match first.sip_uri() {
                Ok(u) if self.names_us(&u).is_some() => {
                    routes.remove(0);
                }
                _ => break,
            }
        }
        if routes.len() != before {
            msg.set_name_addrs("Route", &routes);
        }

        let from_side = info.side;
        let dialog_key = self.dialog_key_of(msg);
        let to_tag = msg.to_tag().ok().flatten();
        // Requests to the edge itself (no user part, no Route left).
        if ruri.userinfo.is_none() && routes.is_empty() && self.names_us(&ruri).is_some() {
            if method == "OPTIONS" {
                let tag = self.new_tag();
                self.respond_local(
                    conn,
                    msg,
                    200,
                    &tag,
                    &[(
                        "Allow",
                        "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, PRACK, MESSAGE, REGISTER"
                            .into(),
                    )],
                    out,
                );
                return Ok(());
            }
            return Err(reject(404, "nothing to route to at the edge itself"));
        }

        // Target selection.
        let (dest, dest_side) = self.select_target(from_side, &method, msg, &ruri, &routes, now)?;
        if method == "REGISTER" && from_side == Side::External {
            return Err(reject(
                403,
                "registrations are only proxied from the inside",
            ));
        }

        // Dialog bookkeeping and SDP before anything is sent.
        let is_invite = method == "INVITE";
        let initial_invite = is_invite && to_tag.is_none();
        if initial_invite {
            if let Some(k) = &dialog_key {
                self.dialogs.entry(k.clone()).or_insert(Dialog {
                    caller_side: from_side,
                    offer_in_invite: false,
                    awaiting_ack_answer: false,
                    confirmed: false,
                    ended: false,
                    caller_cseq: cseq.seq,
                    callee_cseq: 0,
                    to_caller: None,
                    to_callee: None,
                });
            }
        }
        if let Some(k) = &dialog_key {
            if let Some(d) = self.dialogs.get_mut(k) {
                if from_side == d.caller_side {
                    d.caller_cseq = d.caller_cseq.max(cseq.seq);
                } else {
                    d.callee_cseq = d.callee_cseq.max(cseq.seq);
                }
            }
        }
        let has_sdp = !msg.body().is_empty() && msg.header("Content-Type").is_some_and(is_sdp_type);
        if has_sdp {
            let role = self.request_sdp_role(&method, msg, dialog_key.as_ref());
            if role.is_none() || dialog_key.is_none() {
                strip_unhandled_media_body(msg);
            }
            if let (Some(role), Some(k)) = (role, dialog_key.clone()) {
                let callee_tag = self.callee_tag(&k, msg);
                let ct = msg.header("Content-Type").unwrap_or_default().to_owned();
                let body = msg.body().to_vec();
                let ev = SdpEvent {
                    dialog: &k,
                    to_tag: if role == SdpRole::Offer && initial_invite {
                        None
                    } else {
                        callee_tag.as_deref()
                    },
                    role,
                    from_side,
                    source: info.peer,
                    body: &body,
                    content_type: &ct,
                };
                match self.media.on_sdp(&ev, now) {
                    Ok(new_body) => msg.set_body(new_body),
                    Err(e) => {
                        if initial_invite {
                            self.end_dialog(&k, None, EndReason::Failure(e.status()), now);
                            self.dialogs.remove(&k);
                        }
                        return Err(media_reject(&e));
                    }
                }
                if is_invite {
                    if let Some(d) = self.dialogs.get_mut(&k) {
                        if initial_invite {
                            d.offer_in_invite = true;
                        }
                    }
                }
                if method == "ACK" {
                    if let Some(d) = self.dialogs.get_mut(&k) {
                        d.awaiting_ack_answer = false;
                    }
                }
            }
        }
        if method == "BYE" {
            if let Some(k) = &dialog_key {
                let tag = self.callee_tag(k, msg);
                self.end_dialog(k, tag.as_deref(), EndReason::Bye, now);
                self.dialogs.remove(k);
            }
        }

        // §16.6: build the forwarded request.
        let contacts_lifetime = if method == "REGISTER" {
            register_expires(msg).map_or(CONTACT_LIFETIME, |e| {
                Duration::from_secs(e.into()) + TIMER_64T1
            })
        } else {
            CONTACT_LIFETIME
        };
        self.rewrite_contacts(msg, from_side, conn, contacts_lifetime, now)?;
        msg.set_header(
            "Max-Forwards",
            (mf.min(DEFAULT_MAX_FORWARDS + 1) - 1).to_string(),
        );
        let out_scheme = if ruri.scheme == "sips" { "sips" } else { "sip" };
        let dest_proto = self.dest_proto(&dest);
        if initial_invite || (to_tag.is_none() && matches!(method.as_str(), "SUBSCRIBE" | "REFER"))
        {
            // RFC 5658 double Record-Route: the incoming side's address
            // below, the outgoing side's on top (the next hop sees it first).
            let in_rr = self.rr_uri(from_side, out_scheme, info.proto);
            let out_rr = self.rr_uri(dest_side, out_scheme, dest_proto);
            msg.prepend_header("Record-Route", in_rr);
            msg.prepend_header("Record-Route", out_rr);
        }
        if method == "REGISTER" && from_side == Side::Internal {
            // RFC 3327 §5: Path with a flow token naming this connection.
            let token = self
                .bindings
                .token_for(
                    from_side,
                    &format!("flow:{conn}"),
                    Some(conn),
                    contacts_lifetime,
                    now,
                )
                .ok_or_else(|| busy("binding table full"))?;
            let l = self.settings.local(Side::External);
            msg.prepend_header(
                "Path",
                format!("<sip:{token}@{}:{};transport=tls;lr;ob>", l.host, l.port),
            );
            let sup = msg.header("Supported").map(str::to_owned);
            if !sup
                .as_deref()
                .is_some_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("path")))
            {
                msg.set_header(
                    "Supported",
                    sup.map_or_else(|| "path".to_owned(), |s| format!("{s}, path")),
                );
            }
        }
        let new_branch = self.new_branch();
        let via = self.via_for(dest_side, dest_proto, &new_branch);
        msg.prepend_header("Via", via);

        let bytes = msg.to_bytes();
        self.stats.requests_forwarded += 1;
        if method == "ACK" {
            // §16.6: ACK for 2xx is forwarded end to end with no transaction.
            out.push(Outgoing {
                dest,
                bytes,
                client_tx: None,
            });
            return Ok(());
        }
        let to_tag_local = self.new_tag();
        let ckey = ctx_key(&new_branch, &method);
        let mut server = ServerTx {
            conn,
            request: msg.clone(),
            client_key: Some(ckey.clone()),
            last_response: None,
            final_sent: false,
            to_tag: to_tag_local.clone(),
            expires: None,
        };
        // The stored request must answer with the received Via stack, not ours.
        let _ = server.request.pop_top_via();
        if is_invite {
            // §16.2: 100 Trying hop by hop, so the UAC stops retransmitting.
            let trying = build::response(&server.request, 100, None, &[]);
            server.last_response = Some(trying.clone());
            self.stats.responses_generated += 1;
            out.push(Outgoing {
                dest: Dest::Conn(conn),
                bytes: trying,
                client_tx: None,
            });
        }
        self.server_txs.insert(skey.clone(), server);
        if let Dest::Conn(c) = dest {
            self.sent_on.entry(c).or_default().insert(ckey.clone());
        }
        self.client_txs.insert(
            ckey,
            ClientTx {
                server_key: Some(skey),
                request: msg.clone(),
                dest: dest.clone(),
                provisional: false,
                final_code: None,
                deadline: now + TIMER_64T1,
                cancel: Cancel::None,
                dialog: dialog_key.filter(|_| is_invite),
                initial_invite,
                offer_in_request: has_sdp,
                sent_on: match dest {
                    Dest::Conn(c) => Some(c),
                    Dest::Hop { .. } => None,
                },
            },
        );
        self.arm_retransmit(ctx_key(&new_branch, &method), &dest, &bytes, is_invite, now);
        out.push(Outgoing {
            dest,
            bytes,
            client_tx: Some(ctx_key(&new_branch, &method)),
        });
        Ok(())
    }

    /// Arms Timer A (INVITE) or E (non-INVITE) for a request the edge sent
    /// to `dest` when that is an unreliable (UDP) pseudo-connection
    /// (RFC 3261 §17.1.1.2, §17.1.2.2: Timers A and E run only over
    /// unreliable transports; TLS/TCP deliver or fail the connection).
    fn arm_retransmit(
        &mut self,
        key: String,
        dest: &Dest,
        bytes: &[u8],
        invite: bool,
        now: Instant,
    ) {
        if !self.dest_proto(dest).unreliable() {
            return;
        }
        if self.retransmits.len() >= MAX_RETRANSMISSIONS {
            warn!("retransmission table full; request sent once only");
            return;
        }
        self.retransmits.insert(
            key,
            Retransmit {
                dest: dest.clone(),
                bytes: bytes.to_vec(),
                next: now + T1,
                interval: T1,
                invite,
                until: now + TIMER_64T1,
            },
        );
    }

    /// Sends the CANCEL of client transaction `ckey` to `dest` (§9.1), armed
    /// for retransmission over UDP like any non-INVITE request.
    fn push_cancel(&mut self, ckey: &str, dest: Dest, now: Instant, out: &mut Vec<Outgoing>) {
        let Some(c) = self.client_txs.get(ckey) else {
            return;
        };
        let bytes = build::cancel_for(&c.request);
        if let Some(b) = c
            .request
            .top_via()
            .ok()
            .and_then(|v| v.branch().map(str::to_owned))
        {
            self.arm_retransmit(ctx_key(&b, "CANCEL"), &dest, &bytes, false, now);
        }
        out.push(Outgoing {
            dest,
            bytes,
            client_tx: None,
        });
    }

    /// When [`Self::on_retransmit`] next has work (Timer A/E granularity is
    /// finer than the 1 s tick); `None` when nothing is armed.
    pub fn next_retransmit(&self) -> Option<Instant> {
        self.retransmits.values().map(|r| r.next).min()
    }

    /// Fires due Timer A/E retransmissions (RFC 3261 §17.1.1.2: INVITE every
    /// T1, 2*T1, 4*T1... until a provisional; §17.1.2.2: non-INVITE at
    /// min(2^n*T1, T2), at T2 once a provisional came, until a final) and
    /// forgets entries whose transaction is answered or timed out.
    pub fn on_retransmit(&mut self, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let due: Vec<String> = self
            .retransmits
            .iter()
            .filter(|(_, r)| r.next <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            let state = self
                .client_txs
                .get(&k)
                .map(|c| (c.final_code.is_some(), c.provisional));
            let Some(r) = self.retransmits.get_mut(&k) else {
                continue;
            };
            let is_cancel = k.ends_with("|CANCEL");
            let done = match state {
                Some((final_seen, provisional)) => final_seen || (r.invite && provisional),
                // The transaction ended (answered, failed, timed out);
                // only a CANCEL lives without one, until its Timer F.
                None => !is_cancel,
            };
            if done || r.until <= now {
                self.retransmits.remove(&k);
                continue;
            }
            let provisional = state.is_some_and(|(_, p)| p);
            r.interval = if r.invite {
                r.interval.saturating_mul(2)
            } else if provisional {
                T2
            } else {
                r.interval.saturating_mul(2).min(T2)
            };
            r.next = now + r.interval;
            debug!(key = %k, "retransmitting request over UDP (Timer A/E)");
            out.push(Outgoing {
                dest: r.dest.clone(),
                bytes: r.bytes.clone(),
                client_tx: None,
            });
        }
        out
    }

    fn rr_uri(&self, side: Side, scheme: &str, proto: Proto) -> String {
        let l = self.settings.local(side);
        match (scheme, proto) {
            // A UDP client can only reach our UDP port; sips cannot be had
            // on that hop anyway (RFC 5630 §3.1.3), so the entry is sip:.
            (_, Proto::Udp) => format!(
                "<sip:{}:{};transport=udp;lr>",
                l.host,
                self.settings.port_for(side, proto)
            ),
            ("sips", _) => format!("<sips:{}:{};lr>", l.host, l.port),
            (_, Proto::Tcp) => format!("<sip:{}:{};transport=tcp;lr>", l.host, l.port),
            _ => format!("<sip:{}:{};transport=tls;lr>", l.host, l.port),
        }
    }

    fn select_target(
        &mut self,
        from_side: Side,
        method: &str,
        msg: &mut Message,
        ruri: &SipUri,
        routes: &[NameAddr],
        now: Instant,
    ) -> Result<(Dest, Side), Reject> {
        // A token we minted (Contact or Path rewrite): restore and follow.
        if let Some(side) = self.names_us(ruri) {
            if let Some(token) = ruri
                .userinfo
                .as_deref()
                .filter(|u| u.starts_with(TOKEN_PREFIX))
            {
                let b = self
                    .bindings
                    .lookup(token, now)
                    .ok_or_else(|| reject(404, "unknown or expired flow token"))?;
                let _ = side;
                if !b.original.starts_with("flow:") {
                    msg.set_request_uri(&b.original);
                }
                if let Some(first) = routes.first() {
                    return Ok((self.hop_of(&first.uri, b.side)?, b.side));
                }
                return match b.flow.filter(|c| self.conns.contains_key(c)) {
                    Some(c) => Ok((Dest::Conn(c), b.side)),
                    None if b.side == Side::External => {
                        Ok((self.hop_of(&b.original, b.side)?, b.side))
                    }
                    // RFC 5626 §5.3: the client's flow is gone.
                    None => Err(reject(480, "the client's connection is gone")),
                };
            }
        }
        // A Path flow token as the top remaining Route is ours too, but
        // names_us() already popped it; the registered-AOR lookup covers it.
        if let Some(first) = routes.first() {
            return Ok((
                self.hop_of(&first.uri, from_side.other())?,
                from_side.other(),
            ));
        }
        match from_side {
            Side::External => {
                let aor = aor_of(ruri);
                if let Some((_, b)) = self.bindings.registered(&aor, now) {
                    if let Some(c) = b.flow.filter(|c| self.conns.contains_key(c)) {
                        if !b.original.starts_with("flow:") {
                            msg.set_request_uri(&b.original);
                        }
                        return Ok((Dest::Conn(c), Side::Internal));
                    }
                }
                match &self.settings.internal_next_hop {
                    Some(h) => Ok((
                        Dest::Hop {
                            side: Side::Internal,
                            hop: h.clone(),
                        },
                        Side::Internal,
                    )),
                    None => Err(reject(
                        404,
                        format!("no registered client or internal next hop for {aor}"),
                    )),
                }
            }
            Side::Internal => {
                let host = ruri.host.to_string();
                match self.settings.route_for(&host) {
                    Some(h) => Ok((
                        Dest::Hop {
                            side: Side::External,
                            hop: h.clone(),
                        },
                        Side::External,
                    )),
                    None => Err(reject(
                        404,
                        format!("no [[route]] for {host} and no default route ({method})"),
                    )),
                }
            }
        }
    }

    fn hop_of(&self, uri: &str, side: Side) -> Result<Dest, Reject> {
        let u = SipUri::parse(uri).map_err(|_| reject(416, "next hop is not a sip:/sips: URI"))?;
        let host = match &u.host {
            Host::Ip(std::net::IpAddr::V6(a)) => a.to_string(),
            h => h.to_string(),
        };
        Ok(Dest::Hop {
            side,
            hop: HopTarget {
                tls_name: host.clone(),
                host,
                port: u.port.unwrap_or(5061),
            },
        })
    }

    /// Replaces every Contact URI by a token URI on the receiving side.
    fn rewrite_contacts(
        &mut self,
        msg: &mut Message,
        from_side: Side,
        conn: ConnId,
        lifetime: Duration,
        now: Instant,
    ) -> Result<(), Reject> {
        if msg.header("Contact").is_none() || msg.header("Contact") == Some("*") {
            return Ok(());
        }
        let mut contacts = msg
            .name_addrs("Contact")
            .map_err(|e| reject(400, e.to_string()))?;
        let to = self.settings.local(from_side.other()).clone();
        for c in &mut contacts {
            let Ok(u) = c.sip_uri() else { continue };
            if u.userinfo
                .as_deref()
                .is_some_and(|t| t.starts_with(TOKEN_PREFIX))
                && self.names_us(&u).is_some()
            {
                // One of ours going back to its own side: restore it.
                if let Some(b) = u
                    .userinfo
                    .as_deref()
                    .and_then(|t| self.bindings.lookup(t, now))
                {
                    if b.side == from_side.other() && !b.original.starts_with("flow:") {
                        c.uri = b.original;
                        c.angle = true;
                    }
                }
                continue;
            }
            let token = self
                .bindings
                .token_for(from_side, &c.uri, Some(conn), lifetime, now)
                .ok_or_else(|| busy("binding table full"))?;
            let tls = if u.scheme == "sips" {
                ""
            } else {
                ";transport=tls"
            };
            c.uri = format!("{}:{token}@{}:{}{tls}", u.scheme, to.host, to.port);
            c.angle = true;
        }
        msg.set_name_addrs("Contact", &contacts);
        Ok(())
    }

    fn dialog_key_of(&self, msg: &Message) -> Option<DialogKey> {
        let call_id = msg.call_id().ok()?.to_owned();
        let from_tag = msg.from_tag().ok().flatten().unwrap_or_default();
        let k = DialogKey {
            call_id: call_id.clone(),
            from_tag,
        };
        if self.dialogs.contains_key(&k) {
            return Some(k);
        }
        // A request from the callee: its To tag is the caller's From tag.
        if let Some(t) = msg.to_tag().ok().flatten() {
            let k2 = DialogKey {
                call_id,
                from_tag: t,
            };
            if self.dialogs.contains_key(&k2) {
                return Some(k2);
            }
        }
        Some(k)
    }

    /// The callee's tag of a message in dialog `k`.
    fn callee_tag(&self, k: &DialogKey, msg: &Message) -> Option<String> {
        let from = msg.from_tag().ok().flatten();
        if from.as_deref() == Some(k.from_tag.as_str()) {
            msg.to_tag().ok().flatten()
        } else {
            from
        }
    }

    fn request_sdp_role(
        &self,
        method: &str,
        msg: &Message,
        k: Option<&DialogKey>,
    ) -> Option<SdpRole> {
        match method {
            "INVITE" | "UPDATE" => Some(SdpRole::Offer),
            "ACK" | "PRACK" => Some(SdpRole::Answer),
            // Office Communicator file-transfer control (download, cancel,
            // progress) rides in INFO/MESSAGE as ms-filetransfer+xml: no
            // addresses, but a media body, so it goes through the media
            // layer (which passes it through inside proxied dialogs).
            "MESSAGE" | "INFO"
                if msg.header("Content-Type").is_some_and(|ct| {
                    ct.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .eq_ignore_ascii_case("application/ms-filetransfer+xml")
                }) =>
            {
                Some(SdpRole::Offer)
            }
            "MESSAGE" | "INFO" => {
                // Windows Messenger file transfer invitations ride in
                // MESSAGE: INVITE command = offer, ACCEPT = answer; any
                // other command (CANCEL, ...) still goes to the media layer
                // (it tears the transfer down), never around it. Header
                // names are case-insensitive like SIP's.
                let body = String::from_utf8_lossy(msg.body());
                let cmd = body.lines().find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.trim()
                        .eq_ignore_ascii_case("Invitation-Command")
                        .then(|| value.trim())
                });
                match cmd {
                    Some(c) if c.eq_ignore_ascii_case("ACCEPT") => Some(SdpRole::Answer),
                    Some(_) => Some(SdpRole::Offer),
                    None => None,
                }
            }
            _ => {
                let _ = k;
                None
            }
        }
    }

    fn end_dialog(&mut self, k: &DialogKey, to_tag: Option<&str>, reason: EndReason, now: Instant) {
        match self.dialogs.get_mut(k) {
            Some(d) if !d.ended => {
                d.ended = true;
                info!(?reason, "dialog media ends");
                self.media.on_dialog_end(k, to_tag, reason, now);
            }
            _ => {}
        }
    }

    fn on_cancel(
        &mut self,
        conn: ConnId,
        msg: &Message,
        top: &Via,
        branch: &str,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Reject> {
        // §16.10: match the INVITE server transaction, answer 200 hop by hop.
        let ikey = tx_key(branch, top, "INVITE");
        let Some(stx) = self.server_txs.get(&ikey) else {
            return Err(reject(481, "no INVITE transaction to cancel"));
        };
        let tag = stx.to_tag.clone();
        let client_key = stx.client_key.clone();
        let final_sent = stx.final_sent;
        self.respond_local(conn, msg, 200, &tag, &[], out);
        if final_sent {
            return Ok(());
        }
        if let Some(ck) = client_key {
            let mut send = false;
            if let Some(c) = self.client_txs.get_mut(&ck) {
                if c.cancel == Cancel::None && c.final_code.is_none() {
                    if c.provisional {
                        c.cancel = Cancel::Sent;
                        send = true;
                    } else {
                        c.cancel = Cancel::Pending;
                    }
                    // If the UAS never answers 487 we answer it ourselves.
                    c.deadline = now + TIMER_64T1;
                }
                if let Some(k) = c.dialog.clone() {
                    self.end_dialog(&k, None, EndReason::Cancel, now);
                }
            }
            if send {
                let dest = self.client_dest(&ck);
                self.push_cancel(&ck, dest, now, out);
            }
        }
        Ok(())
    }

    fn client_dest(&self, ckey: &str) -> Dest {
        match self.client_txs.get(ckey) {
            Some(c) => match c.sent_on.filter(|s| self.conns.contains_key(s)) {
                Some(s) => Dest::Conn(s),
                None => c.dest.clone(),
            },
            // Unreachable by construction (callers hold the key); a Conn
            // that does not exist makes the transport drop the message.
            None => Dest::Conn(ConnId::MAX),
        }
    }

    fn on_response(
        &mut self,
        conn: ConnId,
        info: ConnInfo,
        mut msg: Message,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let code = msg.status().unwrap_or(0);
        let (Ok(top), Ok(cseq)) = (msg.top_via(), msg.cseq()) else {
            debug!("response without usable Via/CSeq dropped");
            return;
        };
        let method = cseq.method.to_string();
        let ckey = ctx_key(top.branch().unwrap_or_default(), &method);
        if method == "CANCEL" {
            // Any response stops a CANCEL's Timer E (§17.1.2.2: provisional
            // only slows it, but a CANCEL is answered 200 at once, §9.2).
            self.retransmits.remove(&ckey);
        }
        let Some(c) = self.client_txs.get_mut(&ckey) else {
            // §16.7 step 1: no matching client transaction; we never send
            // statelessly, so there is nothing to forward it to.
            debug!(code, "stray response dropped");
            return;
        };
        if c.sent_on.is_none() {
            c.sent_on = Some(conn);
            self.sent_on.entry(conn).or_default().insert(ckey.clone());
        }
        if method == "CANCEL" || c.server_key.is_none() {
            // Responses to our own CANCEL/BYE end here.
            if code >= 200 {
                c.final_code = Some(code);
                c.deadline = now;
            }
            return;
        }
        if code < 200 {
            c.provisional = true;
            c.deadline = now
                + if method == "INVITE" {
                    TIMER_C
                } else {
                    TIMER_64T1
                };
            let cancel_now = c.cancel == Cancel::Pending;
            if cancel_now {
                c.cancel = Cancel::Sent;
                self.push_cancel(&ckey, Dest::Conn(conn), now, out);
            }
            if code == 100 {
                return;
            }
        }
        let Some(c) = self.client_txs.get_mut(&ckey) else {
            return;
        };
        let retransmitted_2xx = code >= 200 && c.final_code.is_some();
        let initial_invite = c.initial_invite;
        let dialog = c.dialog.clone();
        let offer_in_request = c.offer_in_request;
        let server_key = c.server_key.clone();
        let cancelled = c.cancel != Cancel::None;
        let forwarded_invite = c.request.clone();
        if code >= 200 {
            c.final_code = Some(code);
            // 2xx: RFC 6026 Accepted state keeps forwarding 2xx
            // retransmissions; non-2xx: Completed, absorbs retransmissions.
            c.deadline = now + TIMER_64T1;
        }
        if method == "INVITE" && code >= 300 {
            // §17.1.1.3: the ACK for a non-2xx is ours to send.
            out.push(Outgoing {
                dest: Dest::Conn(conn),
                bytes: build::ack_for(&forwarded_invite, &msg),
                client_tx: None,
            });
            if retransmitted_2xx {
                self.stats.retransmissions_absorbed += 1;
                return;
            }
        }
        let Some(skey) = server_key else { return };
        let Some(stx_conn) = self.server_txs.get(&skey).map(|s| s.conn) else {
            debug!("server transaction gone; response dropped");
            return;
        };
        if self.server_txs.get(&skey).is_some_and(|s| s.final_sent)
            && code >= 200
            && !(200..300).contains(&code)
        {
            self.stats.retransmissions_absorbed += 1;
            return;
        }
        let _ = msg.pop_top_via();
        let callee_tag = msg.to_tag().ok().flatten();

        // SDP in the response (§13.2.1 / RFC 3264 roles).
        let has_sdp = !msg.body().is_empty() && msg.header("Content-Type").is_some_and(is_sdp_type);
        let mut sdp_handled = false;
        if has_sdp && (100..300).contains(&code) && !retransmitted_2xx {
            let role = match (method.as_str(), code >= 200, offer_in_request) {
                ("INVITE", true, true) => Some(SdpRole::Answer),
                ("INVITE", false, true) => Some(SdpRole::EarlyAnswer),
                ("INVITE", _, false) => Some(SdpRole::Offer),
                ("UPDATE" | "PRACK", _, _) => Some(SdpRole::Answer),
                _ => None,
            };
            let key = dialog.clone().or_else(|| self.dialog_key_of(&msg));
            if let (Some(role), Some(k)) = (role, key) {
                let ct = msg.header("Content-Type").unwrap_or_default().to_owned();
                let body = msg.body().to_vec();
                let ev = SdpEvent {
                    dialog: &k,
                    to_tag: callee_tag.as_deref(),
                    role,
                    from_side: info.side,
                    source: info.peer,
                    body: &body,
                    content_type: &ct,
                };
                match self.media.on_sdp(&ev, now) {
                    Ok(b) => {
                        msg.set_body(b);
                        sdp_handled = true;
                        if method == "INVITE" && role == SdpRole::Offer && code >= 200 {
                            if let Some(d) = self.dialogs.get_mut(&k) {
                                d.awaiting_ack_answer = true;
                            }
                        }
                    }
                    Err(e) => {
                        self.media_refused_response(
                            &ckey, &skey, &k, &msg, &e, code, conn, now, out,
                        );
                        return;
                    }
                }
            }
        }
        if has_sdp && !sdp_handled {
            strip_unhandled_media_body(&mut msg);
        }
        if (200..300).contains(&code) && method == "INVITE" {
            if let Some(k) = &dialog {
                self.confirm_dialog(k, &forwarded_invite, &msg, stx_conn, conn, info.side);
            }
        }
        if let Err(r) = self.rewrite_contacts(&mut msg, info.side, conn, CONTACT_LIFETIME, now) {
            warn!(why = %r.why, "Contact rewrite failed; forwarding as is");
        }
        if method == "REGISTER" && (200..300).contains(&code) {
            self.learn_registration(&msg, &forwarded_invite, now);
        }
        if code >= 300 && method == "INVITE" && initial_invite && !cancelled {
            if let Some(k) = &dialog {
                self.end_dialog(k, callee_tag.as_deref(), EndReason::Failure(code), now);
                self.dialogs.remove(k);
            }
        } else if code >= 300 && cancelled {
            if let Some(k) = &dialog {
                self.dialogs.remove(k);
            }
        }
        let bytes = msg.to_bytes();
        self.stats.responses_forwarded += 1;
        if let Some(s) = self.server_txs.get_mut(&skey) {
            s.last_response = Some(bytes.clone());
            if code >= 200 {
                s.final_sent = true;
                s.expires = Some(
                    now + if method == "INVITE" && code < 300 {
                        Duration::ZERO
                    } else {
                        TIMER_64T1
                    },
                );
            }
        }
        out.push(Outgoing {
            dest: Dest::Conn(stx_conn),
            bytes,
            client_tx: None,
        });
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; a struct would only rename the same values"
    )]
    fn media_refused_response(
        &mut self,
        ckey: &str,
        skey: &str,
        k: &DialogKey,
        msg: &Message,
        e: &MediaError,
        code: u16,
        conn: ConnId,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        warn!(error = %e, code, "media refused the answer; failing the call");
        let tag = msg.to_tag().ok().flatten();
        self.end_dialog(k, tag.as_deref(), EndReason::Failure(e.status()), now);
        // Toward the UAS: a 2xx needs ACK + BYE, a provisional a CANCEL.
        let side = self.conns.get(&conn).map_or(Side::External, |i| i.side);
        let proto = self.dest_proto(&Dest::Conn(conn));
        let branch = self.new_branch();
        let via = self.via_for(side, proto, &branch);
        if let Some(c) = self.client_txs.get_mut(ckey) {
            if code >= 200 {
                let ack = build::ack_for(&c.request, msg);
                out.push(Outgoing {
                    dest: Dest::Conn(conn),
                    bytes: ack,
                    client_tx: None,
                });
                let request_uri = msg
                    .name_addrs("Contact")
                    .ok()
                    .and_then(|l| l.into_iter().next())
                    .map(|c| c.uri)
                    .unwrap_or_else(|| match &c.request.start {
                        StartLine::Request { uri, .. } => uri.clone(),
                        StartLine::Response { .. } => String::new(),
                    });
                let leg = ByeLeg {
                    request_uri,
                    routes: c.request.header_all("Route").map(str::to_owned).collect(),
                    from: c.request.header("From").unwrap_or_default().to_owned(),
                    to: msg.header("To").unwrap_or_default().to_owned(),
                };
                let seq = c.request.cseq().map_or(1, |q| q.seq.saturating_add(1));
                out.push(Outgoing {
                    dest: Dest::Conn(conn),
                    bytes: build::bye(&leg, &via, &k.call_id, seq),
                    client_tx: None,
                });
                c.final_code = Some(code);
            } else if c.cancel == Cancel::None {
                c.cancel = Cancel::Sent;
                out.push(Outgoing {
                    dest: Dest::Conn(conn),
                    bytes: build::cancel_for(&c.request),
                    client_tx: None,
                });
            }
            c.deadline = now + TIMER_64T1;
        }
        if let Some(s) = self.server_txs.get_mut(skey) {
            let extra = media_reject(e).extra;
            let bytes = build::response(&s.request, e.status(), Some(&s.to_tag), &extra);
            s.final_sent = true;
            s.last_response = Some(bytes.clone());
            s.expires = Some(now + TIMER_64T1);
            self.stats.responses_generated += 1;
            out.push(Outgoing {
                dest: Dest::Conn(s.conn),
                bytes,
                client_tx: None,
            });
        }
        self.dialogs.remove(k);
    }

    fn confirm_dialog(
        &mut self,
        k: &DialogKey,
        invite: &Message,
        resp: &Message,
        caller_conn: ConnId,
        callee_conn: ConnId,
        callee_side: Side,
    ) {
        let rr = resp.name_addrs("Record-Route").unwrap_or_default();
        let ours: Vec<bool> = rr
            .iter()
            .map(|r| r.sip_uri().is_ok_and(|u| self.names_us(&u).is_some()))
            .collect();
        let first_ours = ours.iter().position(|o| *o).unwrap_or(rr.len());
        let last_ours = ours.iter().rposition(|o| *o).map_or(rr.len(), |i| i + 1);
        // Entries above ours lead to the callee (reversed), below to the caller.
        let to_callee_routes: Vec<String> = rr
            .get(..first_ours)
            .unwrap_or_default()
            .iter()
            .rev()
            .map(ToString::to_string)
            .collect();
        let to_caller_routes: Vec<String> = rr
            .get(last_ours..)
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect();
        let callee_contact = resp
            .name_addrs("Contact")
            .ok()
            .and_then(|c| c.into_iter().next())
            .map(|c| c.uri);
        // The caller's Contact was rewritten in `invite`; restore it.
        let caller_contact = invite
            .name_addrs("Contact")
            .ok()
            .and_then(|c| c.into_iter().next())
            .and_then(|c| c.sip_uri().ok())
            .and_then(|u| u.userinfo)
            .and_then(|t| self.bindings.lookup(&t, Instant::now()).map(|b| b.original));
        let from = invite.header("From").unwrap_or_default().to_owned();
        let to = resp.header("To").unwrap_or_default().to_owned();
        let caller_side = callee_side.other();
        if let Some(d) = self.dialogs.get_mut(k) {
            d.confirmed = true;
            if let Some(uri) = callee_contact {
                d.to_callee = Some((
                    Dest::Conn(callee_conn),
                    callee_side,
                    ByeLeg {
                        request_uri: uri,
                        routes: to_callee_routes,
                        from: from.clone(),
                        to: to.clone(),
                    },
                ));
            }
            if let Some(uri) = caller_contact {
                d.to_caller = Some((
                    Dest::Conn(caller_conn),
                    caller_side,
                    ByeLeg {
                        request_uri: uri,
                        routes: to_caller_routes,
                        from: to,
                        to: from,
                    },
                ));
            }
        }
    }

    fn learn_registration(&mut self, resp: &Message, register: &Message, now: Instant) {
        // RFC 3261 §10.3: the 200 lists the bindings now in force; find the
        // ones the edge minted and remember AOR → flow.
        let Ok(to) = resp.to() else { return };
        let Ok(aor) = to.sip_uri() else { return };
        let aor = aor_of(&aor);
        let default_exp = register_expires(register).unwrap_or(3600);
        // The Contacts in the response were restored already; match by the
        // Contact we sent upstream (the token in the forwarded REGISTER).
        let Ok(sent) = register.name_addrs("Contact") else {
            return;
        };
        for c in sent {
            let Some(token) = c.sip_uri().ok().and_then(|u| u.userinfo) else {
                continue;
            };
            let granted = resp
                .name_addrs("Contact")
                .ok()
                .and_then(|list| {
                    list.into_iter().find_map(|r| {
                        let same = self
                            .bindings
                            .lookup(&token, now)
                            .is_some_and(|b| b.original == r.uri);
                        same.then(|| {
                            r.params
                                .get("expires")
                                .flatten()
                                .and_then(|e| e.parse::<u64>().ok())
                        })
                    })
                })
                .flatten();
            let exp = granted.unwrap_or(u64::from(default_exp));
            info!(%aor, expires = exp, "registration through the edge");
            self.bindings
                .register(&aor, &token, Duration::from_secs(exp), now);
        }
    }

    fn fail_client(&mut self, ckey: &str, code: u16, now: Instant, out: &mut Vec<Outgoing>) {
        let Some(c) = self.client_txs.remove(ckey) else {
            return;
        };
        if c.final_code.is_some() {
            return;
        }
        let code = if c.cancel != Cancel::None { 487 } else { code };
        if let Some(k) = &c.dialog {
            if c.initial_invite {
                let reason = if code == 408 {
                    EndReason::Timeout
                } else if code == 487 {
                    EndReason::Cancel
                } else {
                    EndReason::Failure(code)
                };
                self.end_dialog(k, None, reason, now);
                self.dialogs.remove(k);
            }
        }
        let Some(skey) = c.server_key else { return };
        let method = c
            .request
            .method()
            .map(ToString::to_string)
            .unwrap_or_default();
        if method == "ACK" {
            return;
        }
        if let Some(s) = self.server_txs.get_mut(&skey) {
            if s.final_sent {
                return;
            }
            let extra: Vec<(&str, String)> = if code == 503 {
                vec![("Retry-After", RETRY_AFTER_SECS.to_string())]
            } else {
                Vec::new()
            };
            let bytes = build::response(&s.request, code, Some(&s.to_tag), &extra);
            s.final_sent = true;
            s.last_response = Some(bytes.clone());
            s.expires = Some(now + TIMER_64T1);
            self.stats.responses_generated += 1;
            info!(code, "answering for an unreachable or silent next hop");
            out.push(Outgoing {
                dest: Dest::Conn(s.conn),
                bytes,
                client_tx: None,
            });
        }
    }

    /// Timers: B/F/C and the Completed/Accepted lifetimes, binding expiry,
    /// and the media layer's expiry (BYE both ways). Call at least once a
    /// second.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let txs = &self.client_txs;
        self.sent_on.retain(|_, keys| {
            keys.retain(|k| txs.get(k).is_some_and(|c| c.final_code.is_none()));
            !keys.is_empty()
        });
        let due: Vec<String> = self
            .client_txs
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            let Some(c) = self.client_txs.get_mut(&k) else {
                continue;
            };
            if c.final_code.is_some() {
                self.client_txs.remove(&k);
                continue;
            }
            let is_invite = c.request.method().is_some_and(|m| m.is("INVITE"));
            if is_invite && c.provisional && c.cancel == Cancel::None {
                // Timer C (§16.8): cancel the branch, wait 64*T1 for 487.
                c.cancel = Cancel::Sent;
                c.deadline = now + TIMER_64T1;
                let dest = self.client_dest(&k);
                self.push_cancel(&k, dest, now, &mut out);
                continue;
            }
            // Timer B/F (§17.1.1.2, §17.1.2.2): 408 upstream (§16.8).
            self.fail_client(&k, 408, now, &mut out);
        }
        self.server_txs
            .retain(|_, s| s.expires.is_none_or(|e| e > now));
        self.bindings.expire(now);
        for k in self.media.on_tick(now) {
            let span = info_span!("call", call_id = %k.call_id);
            let _g = span.enter();
            let Some(d) = self.dialogs.remove(&k) else {
                continue;
            };
            info!("media expired; sending BYE both ways");
            let legs = [(d.to_caller, d.callee_cseq), (d.to_callee, d.caller_cseq)];
            for (leg, cseq) in legs {
                let Some((dest, side, leg)) = leg else {
                    continue;
                };
                let branch = self.new_branch();
                let proto = self.dest_proto(&dest);
                let via = self.via_for(side, proto, &branch);
                let bytes = build::bye(&leg, &via, &k.call_id, cseq.saturating_add(1).max(1));
                self.arm_retransmit(ctx_key(&branch, "BYE"), &dest, &bytes, false, now);
                if let Ok(m) = Message::parse(&bytes) {
                    self.client_txs.insert(
                        ctx_key(&branch, "BYE"),
                        ClientTx {
                            server_key: None,
                            request: m,
                            dest: dest.clone(),
                            provisional: false,
                            final_code: None,
                            deadline: now + TIMER_64T1,
                            cancel: Cancel::None,
                            dialog: None,
                            initial_invite: false,
                            offer_in_request: false,
                            sent_on: None,
                        },
                    );
                }
                out.push(Outgoing {
                    dest,
                    bytes,
                    client_tx: Some(ctx_key(&branch, "BYE")),
                });
            }
        }
        out.extend(self.on_retransmit(now));
        out
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

/// `user@host` of a URI, lower-cased (the registration key).
fn aor_of(u: &SipUri) -> String {
    let user = u
        .userinfo
        .as_deref()
        .map(|s| s.split(';').next().unwrap_or(s))
        .unwrap_or("");
    format!("{user}@{}", u.host).to_ascii_lowercase()
}

/// Expires of a REGISTER: the header (§10.2.1.1).
fn register_expires(msg: &Message) -> Option<u32> {
    msg.header("Expires").and_then(|e| e.trim().parse().ok())
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
