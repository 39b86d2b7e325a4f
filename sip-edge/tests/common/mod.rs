//! What the in-process call tests (`dialog_memory`, `call_cpu`) share:
//! the proxy core as the agent builds it (edge addresses, one route, eight
//! caller connections inside and one callee connection outside), a pinhole
//! sink that keeps what the production `MapsSink` keeps per flow, and the
//! messages of one call, built the way a UA builds them.

// Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use std::{collections::HashMap, path::Path, time::Duration};

use sip_edge::{
    config::{MediaCandidates, MediaMode, PortRange},
    datapath::rules::Flow,
    media::{
        control::{MediaController, Part, PinholeSink, SinkError},
        manager::{PinholeId, Settings},
        policy::ExternalSources,
        MediaControl, Side,
    },
    proxy::{ConnId, ConnInfo, Dest, HopTarget, LocalAddr, Outgoing, Proto, Proxy, ProxySettings},
    sip::{message::Message, uri::Host},
};

/// Keeps per flow what `MapsSink` keeps: its two rule slots.
#[derive(Default)]
pub struct SlotSink {
    slots: HashMap<PinholeId, (u32, u32)>,
    next: u32,
}

impl PinholeSink for SlotSink {
    fn install(&mut self, id: PinholeId, _flow: &Flow) -> Result<(), SinkError> {
        self.next += 2;
        self.slots.insert(id, (self.next, self.next + 1));
        Ok(())
    }
    fn update(&mut self, _id: PinholeId, _old: &Flow, _flow: &Flow) -> Result<(), SinkError> {
        Ok(())
    }
    fn remove(&mut self, id: PinholeId) -> Result<(), SinkError> {
        self.slots.remove(&id);
        Ok(())
    }
    fn activity(&mut self, _part: Part) -> Result<Vec<(PinholeId, u64)>, SinkError> {
        Ok(self.slots.keys().map(|id| (*id, 0)).collect())
    }
}

/// Caller connections (1..=CALLERS), inside.
pub const CALLERS: u64 = 8;
/// The callee's connection, outside.
pub const CALLEE: ConnId = 100;

/// The route's next hop (the callee's side).
pub fn hop() -> HopTarget {
    HopTarget {
        host: "198.51.100.2".into(),
        port: 5061,
        tls_name: "biloxi.example.com".into(),
    }
}

/// Where a forwarded INVITE goes.
pub fn hop_dest() -> Dest {
    Dest::Hop {
        side: Side::External,
        hop: hop(),
    }
}

/// Media settings with room for every call the tests make.
pub fn media_settings(mode: MediaMode) -> Settings {
    Settings {
        mode,
        internal_addrs: vec!["10.77.0.1".parse().unwrap()],
        public_addrs: vec!["203.0.113.1".parse().unwrap()],
        port_ranges: vec![PortRange {
            start: 10000,
            end: 65000,
        }],
        reserved_ports: vec![5061],
        allowed_internal_subnets: Vec::new(),
        max_flows_per_client: 1_000_000,
        max_flows: 1_000_000,
        max_calls: 1_000_000,
        idle_timeout: Duration::from_secs(86_400),
        unused_timeout: Duration::from_secs(86_400),
        max_call: Duration::from_secs(86_400),
        latch: false,
        external_sources: ExternalSources::Signalling,
    }
}

/// The production media controller over a [`SlotSink`], with its
/// crash-recovery journal at `journal` if given.
pub fn controller(mode: MediaMode, journal: Option<&Path>) -> MediaController<SlotSink> {
    let mut c = MediaController::new(
        media_settings(mode),
        MediaCandidates::default(),
        SlotSink::default(),
    );
    if let Some(state) = journal {
        c.open_journal(state).expect("journal");
    }
    c
}

/// The proxy core over `media`, with its connections open.
pub fn proxy(media: Box<dyn MediaControl>) -> Proxy {
    let settings = ProxySettings {
        internal: LocalAddr {
            host: Host::Ip("10.77.0.1".parse().unwrap()),
            port: 5061,
        },
        external: LocalAddr {
            host: Host::Ip("203.0.113.1".parse().unwrap()),
            port: 5061,
        },
        routes: vec![("biloxi.example.com".into(), hop())],
        route_media: Vec::new(),
        default_route: None,
        internal_next_hop: None,
        access: Default::default(),
        internal_udp_port: None,
        max_dialog: Duration::from_secs(4 * 3600),
        ack_timeout: Duration::from_secs(32),
        timer_c: Duration::from_secs(181),
    };
    let mut p = Proxy::new(settings, media);
    for c in 0..CALLERS {
        p.on_conn_open(
            c + 1,
            ConnInfo {
                side: Side::Internal,
                peer: format!("10.77.0.{}:40001", 2 + c).parse().unwrap(),
                proto: Proto::Tls,
            },
        );
    }
    p.on_conn_open(
        CALLEE,
        ConnInfo {
            side: Side::External,
            peer: "198.51.100.2:5061".parse().unwrap(),
            proto: Proto::Tls,
        },
    );
    p
}

/// What of `out` goes to `dest`, parsed.
pub fn to(out: &[Outgoing], dest: &Dest) -> Vec<Message> {
    out.iter()
        .filter(|o| &o.dest == dest)
        .map(|o| Message::parse(&o.bytes).expect("parse outgoing"))
        .collect()
}

/// Panics unless `out` forwards call `i`'s ACK to the callee.
pub fn assert_ack_forwarded(out: &[Outgoing], i: u64) {
    let acks = to(out, &Dest::Conn(CALLEE));
    assert!(
        acks.first()
            .and_then(Message::method)
            .is_some_and(|m| m.is("ACK")),
        "ACK {i} forwarded: {out:?}"
    );
}

/// `head` (header lines) with an SDP `body` (or none) and its length.
pub fn with_body(head: String, body: &str) -> Vec<u8> {
    let ct = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/sdp\r\n"
    };
    format!("{head}{ct}Content-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

/// The 200 OK head a UAS builds for `req` (§8.2.6: Via, Record-Route,
/// From, Call-ID, CSeq copied, To tagged with `to_tag` unless it is).
pub fn response_head(req: &Message, to_tag: &str) -> String {
    let mut head = String::from("SIP/2.0 200 OK\r\n");
    for h in req.headers() {
        let n = h.name.to_ascii_lowercase();
        if ["via", "record-route", "from", "call-id", "cseq"].contains(&n.as_str()) {
            head.push_str(&format!("{}: {}\r\n", h.name, h.value));
        } else if n == "to" {
            if h.value.contains(";tag=") {
                head.push_str(&format!("{}: {}\r\n", h.name, h.value));
            } else {
                head.push_str(&format!("{}: {};tag={to_tag}\r\n", h.name, h.value));
            }
        }
    }
    head
}

/// Call `i`'s caller connection and caller address.
pub fn caller(i: u64) -> (ConnId, String) {
    (1 + i % CALLERS, format!("10.77.0.{}", 2 + i % CALLERS))
}

/// Call `i`'s INVITE with an audio offer (rtcp-mux), from [`caller`].
pub fn invite(i: u64) -> Vec<u8> {
    let (_, ip) = caller(i);
    let caller_port = 20000 + 2 * (i % 20000);
    let offer = format!(
        "v=0\r\no=alice {i} 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {caller_port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=rtcp-mux\r\na=sendrecv\r\n"
    );
    with_body(
        format!(
            "INVITE sips:bob{i}@biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/TLS {ip}:40001;branch=z9hG4bK-inv{i}\r\nMax-Forwards: 70\r\nFrom: \"Alice {i}\" <sips:alice{i}@atlanta.example.com>;tag=a{i}x77\r\nTo: <sips:bob{i}@biloxi.example.com>\r\nCall-ID: {i}-3848276298220188511@atlanta.example.com\r\nCSeq: 1 INVITE\r\nContact: <sips:alice{i}@{ip}:40001;transport=tls>\r\nAllow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE\r\nUser-Agent: bench\r\n"
        ),
        &offer,
    )
}

/// The callee's 200 OK with its answer to call `i`'s forwarded INVITE.
pub fn ok_with_answer(i: u64, inv: &Message) -> Vec<u8> {
    let mut head = response_head(inv, &format!("b{i}x88"));
    head.push_str(&format!(
        "Contact: <sips:bob{i}@198.51.100.2:5061;transport=tls>\r\n"
    ));
    let callee_port = 30000 + 2 * (i % 15000);
    let answer = format!(
        "v=0\r\no=bob {i} 1 IN IP4 198.51.100.2\r\ns=-\r\nc=IN IP4 198.51.100.2\r\nt=0 0\r\nm=audio {callee_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=rtcp-mux\r\na=sendrecv\r\n"
    );
    with_body(head, &answer)
}

/// The caller's in-dialog `method` (CSeq `seq`) of call `i`, toward the
/// relayed 200 OK `ok`: Request-URI = its Contact, Route = its
/// Record-Route reversed (§12.1.2).
pub fn in_dialog(i: u64, ok: &Message, method: &str, seq: u32) -> Vec<u8> {
    let (_, ip) = caller(i);
    let contact = ok.name_addrs("Contact").expect("Contact")[0].uri.clone();
    let mut routes = ok.name_addrs("Record-Route").expect("Record-Route");
    routes.reverse();
    let mut r = format!(
        "{method} {contact} SIP/2.0\r\nVia: SIP/2.0/TLS {ip}:40001;branch=z9hG4bK-{method}{i}\r\nMax-Forwards: 70\r\n"
    );
    for route in &routes {
        r.push_str(&format!("Route: <{}>\r\n", route.uri));
    }
    r.push_str(&format!(
        "From: \"Alice {i}\" <sips:alice{i}@atlanta.example.com>;tag=a{i}x77\r\nTo: <sips:bob{i}@biloxi.example.com>;tag=b{i}x88\r\nCall-ID: {i}-3848276298220188511@atlanta.example.com\r\nCSeq: {seq} {method}\r\n"
    ));
    with_body(r, "")
}
