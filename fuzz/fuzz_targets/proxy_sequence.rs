//! The whole sans-IO proxy driven by arbitrary message sequences: inside
//! and outside user agents (2 + 2 connections) send new requests with
//! generated SDP, answer what reached them, continue dialogs (ACK, BYE,
//! re-INVITE, UPDATE, CANCEL), send raw bytes, drop connections, and time
//! passes. The proxy's outgoing messages are delivered to the connection
//! they name (a hop maps to the outside UA at its address), with the
//! transport's `on_sent`; a hop nobody listens at is `on_unreachable`.
//!
//! Invariants: no panic; every message the edge sends parses; nothing the
//! edge sends toward the outside names an inside address in its Contact or
//! its session description (c=, a=rtcp, a=candidate, a=path); and once
//! every connection is gone and the longest timer has run, no pinhole,
//! transaction or dialog is left.
#![no_main]

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sip_edge::{
    media::{
        control::{MediaController, RecordingSink},
        manager::Settings,
        DialogKey, EndReason, MediaControl, MediaError, SdpEvent, Side,
    },
    proxy::{ConnId, ConnInfo, Dest, Outgoing, Proto, Proxy, ProxySettings},
    sip::message::Message,
};
use sip_edge_fuzz::{config, sdp, source, SdpSpec};

/// The media layer, shared so the harness can look at its rules.
struct Shared(Arc<Mutex<MediaController<RecordingSink>>>);

impl MediaControl for Shared {
    fn on_sdp(&mut self, ev: &SdpEvent<'_>, now: Instant) -> Result<Vec<u8>, MediaError> {
        self.0.lock().expect("media lock").on_sdp(ev, now)
    }
    fn on_dialog_end(&mut self, d: &DialogKey, to_tag: Option<&str>, r: EndReason, now: Instant) {
        self.0.lock().expect("media lock").on_dialog_end(d, to_tag, r, now);
    }
    fn on_tick(&mut self, now: Instant) -> Vec<DialogKey> {
        self.0.lock().expect("media lock").on_tick(now)
    }
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// A new request from the UA on `conn`.
    New {
        conn: u8,
        method: u8,
        call: u8,
        target: u8,
        sdp: Option<SdpSpec>,
    },
    /// The UA on `conn` answers the `pick`-th request it received.
    Answer {
        conn: u8,
        pick: u8,
        code: u8,
        sdp: Option<SdpSpec>,
    },
    /// The UA on `conn` continues the dialog of the `pick`-th message it
    /// received (a response: as caller; a request: as callee).
    InDialog {
        conn: u8,
        pick: u8,
        method: u8,
        sdp: Option<SdpSpec>,
    },
    /// The `pick`-th message the UA received, sent again (a retransmission
    /// or a reflection).
    Again { conn: u8, pick: u8 },
    /// Raw bytes.
    Raw { conn: u8, bytes: Vec<u8> },
    /// The connection drops.
    Close { conn: u8 },
    /// Time passes.
    Tick { ms: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    nat: bool,
    steps: Vec<Step>,
}

/// Connections 1, 2: inside UAs; 3, 4: outside UAs.
const CONNS: u64 = 4;

struct Harness {
    proxy: Proxy,
    media: Arc<Mutex<MediaController<RecordingSink>>>,
    open: BTreeMap<ConnId, ConnInfo>,
    /// What each UA received, in order.
    inbox: BTreeMap<ConnId, Vec<Message>>,
    now: Instant,
    seq: u32,
}

fn info(conn: ConnId) -> ConnInfo {
    let outside = conn > 2;
    ConnInfo {
        side: if outside { Side::External } else { Side::Internal },
        peer: source(outside, (conn as u8 + 1) % 2),
        proto: Proto::Tls,
    }
}

impl Harness {
    fn conn(&mut self, c: u8) -> Option<ConnId> {
        let id = u64::from(c) % CONNS + 1;
        self.open.contains_key(&id).then_some(id)
    }

    fn deliver(&mut self, out: Vec<Outgoing>) {
        let mut queue = out;
        // Delivering can make the proxy send more (on_unreachable): bound it.
        for _ in 0..8 {
            let mut next = Vec::new();
            for o in queue {
                let msg = Message::parse(&o.bytes).unwrap_or_else(|e| {
                    panic!(
                        "the edge sent a message that does not parse ({e}):\n{}",
                        String::from_utf8_lossy(&o.bytes)
                    )
                });
                let to = match &o.dest {
                    Dest::Conn(c) => self.open.get(c).map(|i| (*c, i.side)),
                    Dest::Hop { side, hop } => self
                        .open
                        .iter()
                        .find(|(_, i)| i.side == *side && i.peer.ip().to_string() == hop.host)
                        .map(|(c, i)| (*c, i.side)),
                };
                let Some((conn, side)) = to else {
                    if let Some(k) = &o.client_tx {
                        next.extend(self.proxy.on_unreachable(k, self.now));
                    }
                    continue;
                };
                if side == Side::External {
                    no_inside_address(&msg, &o.bytes);
                }
                if let Some(k) = &o.client_tx {
                    self.proxy.on_sent(k, conn);
                }
                let inbox = self.inbox.entry(conn).or_default();
                if inbox.len() < 64 {
                    inbox.push(msg);
                }
            }
            if next.is_empty() {
                return;
            }
            queue = next;
        }
    }

    fn send(&mut self, conn: ConnId, text: &str) {
        let out = self.proxy.on_message(conn, text.as_bytes(), self.now);
        self.deliver(out);
    }
}

/// Toward the outside: no inside address in Contact or in the session
/// description (Via is the RFC 3261 §16.6 stack and is left alone).
fn no_inside_address(msg: &Message, raw: &[u8]) {
    let inside = |s: &str| s.contains("10.77.0.");
    if let Some(c) = msg.header("Contact") {
        assert!(!inside(c), "Contact leaks an inside address:\n{}", String::from_utf8_lossy(raw));
    }
    let body = String::from_utf8_lossy(msg.body());
    for line in body.lines() {
        if ["c=", "a=rtcp", "a=candidate", "a=path"].iter().any(|p| line.starts_with(p)) {
            assert!(
                !inside(line),
                "session description leaks an inside address ({line}):\n{}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}

fn sdp_part(spec: &Option<SdpSpec>) -> (String, String) {
    match spec {
        Some(s) => ("Content-Type: application/sdp\r\n".into(), sdp(s)),
        None => (String::new(), String::new()),
    }
}

fn header_lines(m: &Message, name: &str) -> String {
    m.headers()
        .iter()
        .filter(|h| sip_edge::sip::message::same_header(&h.name, name))
        .map(|h| format!("{name}: {}\r\n", h.value))
        .collect()
}

/// The Record-Route values of `m`, in order (the route set, §12.1).
fn record_routes(m: &Message) -> Vec<String> {
    m.headers()
        .iter()
        .filter(|hd| sip_edge::sip::message::same_header(&hd.name, "Record-Route"))
        .map(|hd| hd.value.clone())
        .collect()
}

fn ua_host(h: &Harness, conn: ConnId) -> String {
    h.open.get(&conn).map(|i| i.peer.to_string()).unwrap_or_default()
}

fn new_request(h: &mut Harness, conn: ConnId, method: u8, call: u8, target: u8, spec: &Option<SdpSpec>) {
    let method = ["INVITE", "REGISTER", "OPTIONS", "MESSAGE", "BYE", "UPDATE", "INFO", "SUBSCRIBE"]
        [method as usize % 8];
    let ruri = [
        "sips:bob@peer.example.net",
        "sips:alice@10.77.0.1",
        "sips:carol@203.0.113.1",
        "sips:nobody@elsewhere.example.org",
        "sips:peer.example.net",
    ][target as usize % 5];
    let me = ua_host(h, conn);
    h.seq += 1;
    let (ct, body) = sdp_part(spec);
    let text = format!(
        "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS {me};branch=z9hG4bK-f{seq}\r\nMax-Forwards: 70\r\nFrom: <sips:ua{conn}@example.com>;tag=t{conn}-{call}\r\nTo: <{ruri}>\r\nCall-ID: c{call}@fuzz\r\nCSeq: {seq} {method}\r\nContact: <sips:ua{conn}@{me};transport=tls>\r\n{ct}Content-Length: {}\r\n\r\n{body}",
        body.len(),
        seq = h.seq
    );
    h.send(conn, &text);
}

fn answer(h: &mut Harness, conn: ConnId, pick: u8, code: u8, spec: &Option<SdpSpec>) {
    let Some(req) = pick_msg(h, conn, pick, true) else {
        return;
    };
    let code = [100u16, 180, 183, 200, 202, 401, 404, 486, 487, 500, 503][code as usize % 11];
    let to = req.header("To").unwrap_or_default().to_owned();
    let to = if to.contains("tag=") || code == 100 {
        to
    } else {
        format!("{to};tag=u{conn}")
    };
    let me = ua_host(h, conn);
    let (ct, body) = if code / 100 == 2 || code == 183 { sdp_part(spec) } else { (String::new(), String::new()) };
    let text = format!(
        "SIP/2.0 {code} X\r\n{}{}From: {}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {}\r\nContact: <sips:ua{conn}@{me};transport=tls>\r\n{ct}Content-Length: {}\r\n\r\n{body}",
        header_lines(&req, "Via"),
        header_lines(&req, "Record-Route"),
        req.header("From").unwrap_or_default(),
        req.header("Call-ID").unwrap_or_default(),
        req.header("CSeq").unwrap_or_default(),
        body.len()
    );
    h.send(conn, &text);
}

fn in_dialog(h: &mut Harness, conn: ConnId, pick: u8, method: u8, spec: &Option<SdpSpec>) {
    let Some(m) = pick_msg(h, conn, pick, false) else {
        return;
    };
    let method = ["ACK", "BYE", "INVITE", "UPDATE", "INFO", "CANCEL"][method as usize % 6];
    let contact = m
        .name_addrs("Contact")
        .ok()
        .and_then(|v| v.first().map(|n| n.uri.clone()))
        .unwrap_or_else(|| "sips:nobody@invalid".into());
    let me = ua_host(h, conn);
    let call_id = m.header("Call-ID").unwrap_or_default().to_owned();
    let cseq_n: u32 = m
        .header("CSeq")
        .and_then(|c| c.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let (from, to, routes, cseq) = if m.status().is_some() {
        // As caller: the route set is the Record-Route reversed (§12.1.2).
        let mut rr = record_routes(&m);
        rr.reverse();
        let cseq = if method == "ACK" || method == "CANCEL" { cseq_n } else { cseq_n + 1 };
        (
            m.header("From").unwrap_or_default().to_owned(),
            m.header("To").unwrap_or_default().to_owned(),
            rr,
            cseq,
        )
    } else {
        let rr = record_routes(&m);
        (
            format!("{};tag=u{conn}", m.header("To").unwrap_or_default()),
            m.header("From").unwrap_or_default().to_owned(),
            rr,
            100 + cseq_n,
        )
    };
    h.seq += 1;
    let (ct, body) = if method == "ACK" || method == "INVITE" || method == "UPDATE" {
        sdp_part(spec)
    } else {
        (String::new(), String::new())
    };
    let route: String = routes.iter().map(|r| format!("Route: {r}\r\n")).collect();
    let text = format!(
        "{method} {contact} SIP/2.0\r\nVia: SIP/2.0/TLS {me};branch=z9hG4bK-f{seq}\r\nMax-Forwards: 70\r\n{route}From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContact: <sips:ua{conn}@{me};transport=tls>\r\n{ct}Content-Length: {}\r\n\r\n{body}",
        body.len(),
        seq = h.seq
    );
    h.send(conn, &text);
}

/// The `pick`-th received message of `conn` (requests only with `request`).
fn pick_msg(h: &Harness, conn: ConnId, pick: u8, request: bool) -> Option<Message> {
    let inbox = h.inbox.get(&conn)?;
    let list: Vec<&Message> = inbox
        .iter()
        .filter(|m| !request || m.method().is_some())
        .collect();
    if list.is_empty() {
        return None;
    }
    Some(list[pick as usize % list.len()].clone())
}

fuzz_target!(|input: Input| {
    let cfg = config(if input.nat { "nat" } else { "relay" });
    let media = Arc::new(Mutex::new(MediaController::new(
        Settings::from_config(cfg),
        cfg.media.candidates,
        RecordingSink::default(),
    )));
    let settings = ProxySettings::from_config(cfg, 5061, 5061).expect("proxy settings");
    let mut h = Harness {
        proxy: Proxy::new(settings, Box::new(Shared(media.clone()))),
        media: media.clone(),
        open: BTreeMap::new(),
        inbox: BTreeMap::new(),
        now: Instant::now(),
        seq: 0,
    };
    for c in 1..=CONNS {
        h.open.insert(c, info(c));
        h.proxy.on_conn_open(c, info(c));
    }
    for step in input.steps.iter().take(48) {
        match step {
            Step::New { conn, method, call, target, sdp } => {
                if let Some(c) = h.conn(*conn) {
                    new_request(&mut h, c, *method, call % 4, *target, sdp);
                }
            }
            Step::Answer { conn, pick, code, sdp } => {
                if let Some(c) = h.conn(*conn) {
                    answer(&mut h, c, *pick, *code, sdp);
                }
            }
            Step::InDialog { conn, pick, method, sdp } => {
                if let Some(c) = h.conn(*conn) {
                    in_dialog(&mut h, c, *pick, *method, sdp);
                }
            }
            Step::Again { conn, pick } => {
                if let Some(c) = h.conn(*conn) {
                    if let Some(m) = pick_msg(&h, c, *pick, false) {
                        let bytes = m.to_bytes();
                        let out = h.proxy.on_message(c, &bytes, h.now);
                        h.deliver(out);
                    }
                }
            }
            Step::Raw { conn, bytes } => {
                if let Some(c) = h.conn(*conn) {
                    let out = h.proxy.on_message(c, bytes, h.now);
                    h.deliver(out);
                }
            }
            Step::Close { conn } => {
                if let Some(c) = h.conn(*conn) {
                    h.open.remove(&c);
                    let out = h.proxy.on_conn_closed(c, h.now);
                    h.deliver(out);
                }
            }
            Step::Tick { ms } => {
                h.now += Duration::from_millis(u64::from(*ms % 5000));
                let out = h.proxy.on_tick(h.now);
                h.deliver(out);
            }
        }
    }
    // Every connection goes, then the longest timer runs out (maximum
    // call length 60 s, Timer C 181 s, 64*T1 after that).
    let conns: Vec<ConnId> = h.open.keys().copied().collect();
    for c in conns {
        h.open.remove(&c);
        let out = h.proxy.on_conn_closed(c, h.now);
        h.deliver(out);
    }
    for _ in 0..300 {
        h.now += Duration::from_secs(1);
        let out = h.proxy.on_tick(h.now);
        h.deliver(out);
    }
    let media = h.media.lock().expect("media lock");
    assert!(
        media.sink().installed.is_empty(),
        "pinholes left after every connection closed and every timer ran: {:?}",
        media.sink().installed
    );
    assert_eq!(h.proxy.live(), (0, 0, 0), "transactions or dialogs left (server, client, dialogs)");
});
