//! The RFC 4475 and RFC 5118 torture corpus through the sans-IO edge: the
//! stream framer and the proxy core as the transport drives them (a new
//! TLS connection per message, framing errors answered through
//! `on_framing_error`), with the real media layer on a recording sink and
//! the configuration of `tests/tests/torture.rs`. Each message goes in
//! from an inside client and from an outside peer; what the edge answers,
//! whether it forwards and whether any pinhole is installed is compared
//! with the table in `tests/fixtures/torture/corpus.rs`, which follows the
//! RFCs. Runs without privileges, so the table is checked everywhere.

use std::{
    io::Write as _,
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

#[path = "../../../tests/fixtures/torture/corpus.rs"]
#[expect(
    dead_code,
    reason = "shared with tests/tests/torture.rs, which reads every field"
)]
mod corpus;

use corpus::{Case, Expect, CASES};

use super::*;
use crate::{
    config::Config,
    media::{
        control::{MediaController, RecordingSink},
        manager::Settings,
    },
    sip::framer::{Frame, Framer, FramerLimits, KeepAliveRole},
};

/// The configuration of the namespace run, with paths that need not exist
/// (nothing here opens them): inside requests go out by the default route,
/// outside ones to the internal next hop.
const CONFIG: &str = r#"pin_dir = "/sys/fs/bpf/sip-edge-torture-unit"
[[interface]]
name = "int0"
role = "internal"
[[interface]]
name = "ext0"
role = "external"
[addresses]
internal = ["10.77.0.1"]
public = ["203.0.113.1"]
[media]
port_ranges = ["40000-40999"]
[signalling]
ports = [5061]
[proxy]
internal_listen = "10.77.0.1:5061"
external_listen = "203.0.113.1:5061"
internal_udp_listen = "10.77.0.1:5060"
cert = "/nonexistent/edge.pem"
key = "/nonexistent/edge.key"
ca_roots = "/nonexistent/ca.pem"
[proxy.default_route]
host = "198.51.100.2"
port = 5061
tls_name = "peer.example.net"
[proxy.internal_next_hop]
host = "10.77.0.2"
port = 5062
tls_name = "client.example.net"
"#;

fn config() -> Config {
    // One file per call: the tests run in parallel threads.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "sip-edge-torture-unit-{}-{n}.toml",
        std::process::id()
    ));
    std::fs::write(&path, CONFIG).expect("write config");
    let cfg = Config::from_file(&path).expect("the torture config is valid");
    let _ = std::fs::remove_file(&path);
    cfg
}

struct Shared(Arc<Mutex<MediaController<RecordingSink>>>);

impl MediaControl for Shared {
    fn on_sdp(&mut self, ev: &SdpEvent<'_>, now: Instant) -> Result<Vec<u8>, MediaError> {
        self.0.lock().expect("media lock").on_sdp(ev, now)
    }
    fn on_dialog_end(&mut self, d: &DialogKey, to_tag: Option<&str>, r: EndReason, now: Instant) {
        self.0
            .lock()
            .expect("media lock")
            .on_dialog_end(d, to_tag, r, now);
    }
    fn on_tick(&mut self, now: Instant) -> Vec<DialogKey> {
        self.0.lock().expect("media lock").on_tick(now)
    }
    fn on_timers(&mut self, now: Instant) {
        self.0.lock().expect("media lock").on_timers(now);
    }
}

/// What one framed message did.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Forward,
    Answer(u16),
    Drop,
    Closed,
    Incomplete,
}

/// One side's edge: the proxy, its media layer, the next hop's connection.
struct Edge {
    proxy: Proxy,
    media: Arc<Mutex<MediaController<RecordingSink>>>,
    side: Side,
    next_hop: ConnId,
    next_conn: ConnId,
    now: Instant,
}

impl Edge {
    fn new(side: Side) -> Edge {
        let cfg = config();
        let media = Arc::new(Mutex::new(MediaController::new(
            Settings::from_config(&cfg),
            cfg.media.candidates,
            RecordingSink::default(),
        )));
        let settings = ProxySettings::from_config(&cfg, 5061, 5061).expect("proxy settings");
        let mut proxy = Proxy::new(settings, Box::new(Shared(media.clone())));
        // The connection the edge opened to the next hop (the other side).
        let next_hop = 1;
        proxy.on_conn_open(
            next_hop,
            ConnInfo {
                side: side.other(),
                peer: match side {
                    Side::Internal => "198.51.100.2:5061",
                    Side::External => "10.77.0.2:5062",
                }
                .parse()
                .expect("addr"),
                proto: Proto::Tls,
            },
        );
        Edge {
            proxy,
            media,
            side,
            next_hop,
            next_conn: 100,
            now: Instant::now(),
        }
    }

    fn sender(&self) -> std::net::SocketAddr {
        match self.side {
            Side::Internal => "10.77.0.2:40000",
            Side::External => "198.51.100.2:40000",
        }
        .parse()
        .expect("addr")
    }

    /// Sends `bytes` on a new connection the way the transport frames
    /// them; one outcome per framed message (or for the framing error or
    /// the incomplete rest).
    fn send(&mut self, bytes: &[u8]) -> Vec<Seen> {
        self.next_conn += 1;
        let conn = self.next_conn;
        self.proxy.on_conn_open(
            conn,
            ConnInfo {
                side: self.side,
                peer: self.sender(),
                proto: Proto::Tls,
            },
        );
        self.frame(conn, bytes)
    }

    /// Sends `bytes` as one datagram to the inside UDP listener (legacy
    /// clients, `internal_udp_listen`): no framer, the whole datagram is
    /// the message (RFC 3261 §18.3).
    fn send_datagram(&mut self, bytes: &[u8]) -> Vec<Seen> {
        self.next_conn += 1;
        let conn = self.next_conn;
        self.proxy.on_conn_open(
            conn,
            ConnInfo {
                side: self.side,
                peer: self.sender(),
                proto: Proto::Udp,
            },
        );
        // The RFC's messages reuse branches (z9hG4bKkdjuw...): sent within
        // Timer J of each other over UDP, a later one is rightly absorbed
        // as a retransmission of an earlier one. Each is its own test, so
        // each comes after the last one's transaction is gone.
        self.now += TIMER_64T1 + Duration::from_secs(1);
        let _ = self.proxy.on_tick(self.now);
        let out = self.proxy.on_message(conn, bytes, self.now);
        let seen = vec![self.outcome(conn, out)];
        let _ = self.proxy.on_conn_closed(conn, self.now);
        seen
    }

    fn frame(&mut self, conn: ConnId, bytes: &[u8]) -> Vec<Seen> {
        let mut framer = Framer::new(KeepAliveRole::Responder, FramerLimits::default());
        let mut seen = Vec::new();
        let pushed = framer.push(bytes);
        assert!(pushed.is_ok(), "push: {pushed:?}");
        loop {
            self.now += Duration::from_millis(10);
            match framer.next_frame() {
                Ok(Some(Frame::Message(raw))) => {
                    let out = self.proxy.on_message(conn, raw.as_bytes(), self.now);
                    seen.push(self.outcome(conn, out));
                }
                Ok(Some(Frame::Ping | Frame::Pong)) => {}
                Ok(None) => {
                    if framer.in_message() {
                        seen.push(Seen::Incomplete);
                    }
                    break;
                }
                Err(e) => {
                    let out = match (e.response_code(), framer.failed_head()) {
                        (Some(code), Some(head)) => {
                            self.proxy
                                .on_framing_error(conn, head, code, &e.to_string())
                        }
                        _ => Vec::new(),
                    };
                    seen.push(if out.is_empty() {
                        Seen::Closed
                    } else {
                        self.outcome(conn, out)
                    });
                    break;
                }
            }
        }
        let _ = self.proxy.on_conn_closed(conn, self.now);
        seen
    }

    /// Classifies what the edge sent for one message; a forwarded request
    /// is answered by the next hop (200, 486 to an INVITE) so its
    /// transaction ends, and the sender must get that answer back.
    fn outcome(&mut self, conn: ConnId, out: Vec<Outgoing>) -> Seen {
        let mut answered = None;
        let mut forwarded = None;
        for o in out {
            let m = Message::parse(&o.bytes).unwrap_or_else(|e| {
                panic!("the edge sent what does not parse ({e}): {:?}", o.bytes)
            });
            match (&o.dest, m.status()) {
                (Dest::Conn(c), Some(code)) if *c == conn => {
                    if code >= 200 && answered.is_none() {
                        answered = Some(code);
                    }
                }
                (Dest::Conn(c), _) if *c == conn => panic!("request sent back to the sender"),
                (_, None) => {
                    assert!(forwarded.is_none(), "two requests forwarded for one");
                    forwarded = Some(m);
                }
                (_, Some(code)) => panic!("a {code} response went elsewhere than the sender"),
            }
        }
        match (answered, forwarded) {
            (None, None) => Seen::Drop,
            (Some(code), None) => Seen::Answer(code),
            (Some(code), Some(_)) => panic!("answered {code} and forwarded"),
            (None, Some(req)) => {
                let code = if req.method().is_some_and(|m| m.is("INVITE")) {
                    486
                } else {
                    200
                };
                let reply = build::response(&req, code, Some("nexthop"), &[]);
                self.now += Duration::from_millis(10);
                let back = self.proxy.on_message(self.next_hop, &reply, self.now);
                let relayed = back.iter().any(|o| {
                    o.dest == Dest::Conn(conn)
                        && Message::parse(&o.bytes).is_ok_and(|m| m.status() == Some(code))
                });
                assert!(relayed, "the next hop's {code} did not reach the sender");
                Seen::Forward
            }
        }
    }

    /// No pinhole was ever installed.
    fn no_pinholes(&self, name: &str) {
        let m = self.media.lock().expect("media lock");
        assert!(
            m.sink().installed.is_empty() && m.sink().log.is_empty(),
            "{name}: the media layer installed {:?}",
            m.sink().log
        );
    }
}

fn expected(e: Expect) -> Seen {
    match e {
        Expect::Forward => Seen::Forward,
        Expect::Answer(c) => Seen::Answer(c),
        Expect::Drop => Seen::Drop,
        Expect::Closed => Seen::Closed,
        Expect::Incomplete => Seen::Incomplete,
    }
}

fn dir() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/torture"
    ))
}

/// Over UDP, where RFC 4475's messages "ostensibly" arrived, the outcome
/// differs from a stream's for four of them: the datagram is the message.
fn over_udp(case: &Case) -> Vec<Seen> {
    match case.name {
        // §3.1.1.8: the octets after the REGISTER are noise, ignored.
        "dblreq" => vec![Seen::Forward],
        // §3.1.2.2: "When sent over UDP ... should respond with a 400".
        "clerr" => vec![Seen::Answer(400)],
        // A response whose start line is unreadable: dropped, and there is
        // no connection to close.
        "bigcode" => vec![Seen::Drop],
        // §3.4.1: no Content-Length is fine in a datagram; the INVITE is
        // processed (its SDP names a third party: 488).
        "inv2543" => vec![Seen::Answer(488)],
        _ => case.expected(false).iter().map(|e| expected(*e)).collect(),
    }
}

/// Runs the corpus from one side (`udp`: as datagrams to the inside UDP
/// listener); returns the messages that deviate.
fn run(side: Side, udp: bool) -> Vec<String> {
    let mut edge = Edge::new(side);
    let mut deviations = Vec::new();
    for case in CASES {
        let bytes = corpus::load(dir(), case).unwrap_or_else(|e| panic!("{e}"));
        let (seen, want) = if udp {
            (edge.send_datagram(&bytes), over_udp(case))
        } else {
            let want: Vec<Seen> = case
                .expected(side == Side::External)
                .iter()
                .map(|e| expected(*e))
                .collect();
            (edge.send(&bytes), want)
        };
        if seen != want {
            deviations.push(format!(
                "{} (RFC {} §{}): expected {want:?}, got {seen:?}",
                case.name,
                rfc(case),
                case.section
            ));
        }
        edge.no_pinholes(case.name);
    }
    deviations
}

fn rfc(c: &Case) -> &'static str {
    match c.rfc {
        corpus::Rfc::Rfc4475 => "4475",
        corpus::Rfc::Rfc5118 => "5118",
    }
}

#[test]
fn corpus_is_complete_and_byte_exact() {
    let n4475 = CASES
        .iter()
        .filter(|c| c.rfc == corpus::Rfc::Rfc4475)
        .count();
    assert_eq!((n4475, CASES.len() - n4475), (49, 12));
    let mut names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CASES.len(), "a message is listed twice");
    for case in CASES {
        // `load` checks the recorded length.
        corpus::load(dir(), case).unwrap_or_else(|e| panic!("{e}"));
    }
    // The bytes the RFC writes in <hex>: quoted NUL/BEL/DEL, no trailing
    // space lost.
    let intmeth = CASES.iter().find(|c| c.name == "intmeth").expect("intmeth");
    let b = corpus::load(dir(), intmeth).expect("intmeth");
    assert!(b.windows(6).any(|w| w == b"NUL:\\\0"));
    let trws = CASES.iter().find(|c| c.name == "trws").expect("trws");
    assert!(corpus::load(dir(), trws)
        .expect("trws")
        .starts_with(b"OPTIONS sip:remote-target@example.com SIP/2.0  \r\n"));
}

fn check(side: Side, udp: bool) {
    let deviations = run(side, udp);
    let ok = CASES.len() - deviations.len();
    let over = if udp { "UDP" } else { "TLS" };
    // Straight to stderr, past libtest's capture: the score shows in
    // every run, passing or not.
    let _ = writeln!(
        std::io::stderr(),
        "torture (sans-IO, from the {side:?} side over {over}): {ok}/{} messages with the RFC's outcome",
        CASES.len()
    );
    assert!(
        deviations.is_empty(),
        "{} deviations:\n{}",
        deviations.len(),
        deviations.join("\n")
    );
}

#[test]
fn torture_corpus_from_inside() {
    check(Side::Internal, false);
}

#[test]
fn torture_corpus_over_inside_udp() {
    check(Side::Internal, true);
}

#[test]
fn torture_corpus_from_outside() {
    check(Side::External, false);
}

/// RFC 4475 §3.2.1: a branch that is the bare `z9hG4bK` cookie identifies
/// no transaction, so the edge matches such requests the RFC 2543 way.
/// Before, it took the cookie for a transaction id: a second request from
/// the same sent-by with a bare cookie (another Call-ID) was absorbed as a
/// retransmission of the first, still pending, and never forwarded.
#[test]
fn bare_cookie_branches_are_matched_the_rfc_2543_way() {
    let mut edge = Edge::new(Side::Internal);
    let conn = 50;
    edge.proxy.on_conn_open(
        conn,
        ConnInfo {
            side: Side::Internal,
            peer: edge.sender(),
            proto: Proto::Tls,
        },
    );
    let options = |call: &str| {
        format!(
            "OPTIONS sip:user@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.2:5061;branch=z9hG4bK\r\nMax-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:user@example.com>\r\nCall-ID: {call}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        )
    };
    for call in ["bare-1@example.com", "bare-2@example.com"] {
        let out = edge
            .proxy
            .on_message(conn, options(call).as_bytes(), edge.now);
        let forwarded = out.iter().any(|o| {
            o.dest != Dest::Conn(conn)
                && Message::parse(&o.bytes).is_ok_and(|m| m.call_id() == Ok(call))
        });
        assert!(forwarded, "{call} was not forwarded: {out:?}");
    }
}

/// The same request from the other side of the edge is a new request, not
/// a retransmission (RFC 4475's `invut` sent from inside, answered 486 by
/// the next hop, then from outside within Timer H): before, the second
/// got the first's stored 486 at once, never reaching its own next hop.
#[test]
fn the_same_branch_from_the_other_side_is_no_retransmission() {
    let invut = CASES.iter().find(|c| c.name == "invut").expect("invut");
    let bytes = corpus::load(dir(), invut).expect("invut");
    let mut edge = Edge::new(Side::Internal);
    assert_eq!(edge.send(&bytes), vec![Seen::Forward]);
    let outside = 60;
    edge.proxy.on_conn_open(
        outside,
        ConnInfo {
            side: Side::External,
            peer: "198.51.100.2:40000".parse().expect("addr"),
            proto: Proto::Tls,
        },
    );
    let out = edge.proxy.on_message(outside, &bytes, edge.now);
    let to_inside_hop = out.iter().any(|o| {
        matches!(
            &o.dest,
            Dest::Hop {
                side: Side::Internal,
                ..
            }
        ) && Message::parse(&o.bytes).is_ok_and(|m| m.method().is_some_and(|x| x.is("INVITE")))
    });
    assert!(to_inside_hop, "not forwarded inside: {out:?}");
    assert!(
        !out.iter().any(|o| o.dest == Dest::Conn(outside)
            && Message::parse(&o.bytes).is_ok_and(|m| m.status() == Some(486))),
        "the inside transaction's 486 went outside"
    );
}

/// RFC 3261 §8.2.2.3 with the edge as the UAS (an OPTIONS to the edge
/// itself): a Require it does not support gets 420 with Unsupported;
/// before, the edge answered 200. RFC 4475 §3.3.5 (`bext01`) is the
/// proxy half: Require is forwarded, Proxy-Require checked.
#[test]
fn require_at_the_edge_itself_gets_420() {
    let mut edge = Edge::new(Side::Internal);
    let conn = 70;
    edge.proxy.on_conn_open(
        conn,
        ConnInfo {
            side: Side::Internal,
            peer: edge.sender(),
            proto: Proto::Tls,
        },
    );
    let options = |n: u32, require: &str| {
        format!(
            "OPTIONS sip:10.77.0.1:5061 SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.2:5061;branch=z9hG4bKreq{n}\r\nMax-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:10.77.0.1>\r\nCall-ID: req-{n}@example.com\r\nCSeq: 1 OPTIONS\r\n{require}Content-Length: 0\r\n\r\n"
        )
    };
    let answer = |out: Vec<Outgoing>| {
        assert_eq!(out.len(), 1, "{out:?}");
        Message::parse(&out[0].bytes).expect("response")
    };
    let r = answer(
        edge.proxy.on_message(
            conn,
            options(
                1,
                "Require: nothingSupportsThis, nothingSupportsThisEither\r\n",
            )
            .as_bytes(),
            edge.now,
        ),
    );
    assert_eq!(r.status(), Some(420));
    assert_eq!(
        r.header("Unsupported"),
        Some("nothingSupportsThis, nothingSupportsThisEither")
    );
    let r = answer(
        edge.proxy
            .on_message(conn, options(2, "").as_bytes(), edge.now),
    );
    assert_eq!(r.status(), Some(200));
}
