//! Unit tests of the proxy core on RFC 3665-style flows: fixture messages
//! from `tests/fixtures/sip/` go in as if from connections, the outgoing
//! messages are parsed and checked; a recording `MediaControl` double
//! checks the SDP roles and dialog ends.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::*;
use crate::{media::DialogKey, proxy::LocalAddr};

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Sdp {
        role: SdpRole,
        side: Side,
        to_tag: Option<String>,
        source: SocketAddr,
    },
    End {
        to_tag: Option<String>,
        reason: EndReason,
    },
}

#[derive(Default)]
struct Recorder {
    calls: Vec<Call>,
    /// `media_sources` of each SDP event, in order.
    sources: Vec<Vec<crate::config::Cidr>>,
    /// `far_media` of each SDP event, in order.
    far: Vec<FarMedia>,
    refuse: Option<MediaError>,
    expire: Vec<DialogKey>,
    /// Call-IDs (with caller tag) of calls "adopted" from an earlier run.
    adopted: Vec<(String, String)>,
}

struct Media(Arc<Mutex<Recorder>>);

impl MediaControl for Media {
    fn on_sdp(&mut self, ev: &SdpEvent<'_>, _now: Instant) -> Result<Vec<u8>, MediaError> {
        let mut r = self.0.lock().unwrap();
        r.calls.push(Call::Sdp {
            role: ev.role,
            side: ev.from_side,
            to_tag: ev.to_tag.map(str::to_owned),
            source: ev.source,
        });
        r.sources.push(ev.media_sources.to_vec());
        r.far.push(ev.far_media);
        if let Some(e) = r.refuse.clone() {
            return Err(e);
        }
        let mut b = ev.body.to_vec();
        b.extend_from_slice(b"a=x-rewritten\r\n");
        Ok(b)
    }
    fn on_dialog_end(
        &mut self,
        _d: &DialogKey,
        to_tag: Option<&str>,
        reason: EndReason,
        _now: Instant,
    ) {
        self.0.lock().unwrap().calls.push(Call::End {
            to_tag: to_tag.map(str::to_owned),
            reason,
        });
    }
    fn on_tick(&mut self, _now: Instant) -> Vec<DialogKey> {
        std::mem::take(&mut self.0.lock().unwrap().expire)
    }
    fn end_adopted(&mut self, call_id: &str, tags: &[&str], _now: Instant) -> bool {
        let mut r = self.0.lock().unwrap();
        let before = r.adopted.len();
        r.adopted
            .retain(|(c, t)| !(c == call_id && tags.contains(&t.as_str())));
        r.adopted.len() != before
    }
}

const CALLER: ConnId = 1;
const CALLEE: ConnId = 2;
const PEER_CALLER: ConnId = 3;

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sip")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap();
    // Fixtures are stored with LF line ends; the wire uses CRLF.
    text.replace("\r\n", "\n")
        .replace('\n', "\r\n")
        .into_bytes()
}

fn hop() -> HopTarget {
    HopTarget {
        host: "198.51.100.2".into(),
        port: 5061,
        tls_name: "biloxi.example.com".into(),
    }
}

fn setup() -> (Proxy, Arc<Mutex<Recorder>>) {
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
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let mut p = Proxy::new(settings, Box::new(Media(rec.clone())));
    p.on_conn_open(
        CALLER,
        ConnInfo {
            side: Side::Internal,
            peer: "10.77.0.2:40001".parse().unwrap(),
            proto: Proto::Tls,
        },
    );
    p.on_conn_open(
        CALLEE,
        ConnInfo {
            side: Side::External,
            peer: "198.51.100.2:5061".parse().unwrap(),
            proto: Proto::Tls,
        },
    );
    p.on_conn_open(
        PEER_CALLER,
        ConnInfo {
            side: Side::External,
            peer: "198.51.100.3:40002".parse().unwrap(),
            proto: Proto::Tls,
        },
    );
    (p, rec)
}

fn parse(o: &Outgoing) -> Message {
    Message::parse(&o.bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.bytes)))
}

/// A UAS answering a request it received (§8.2.6).
fn answer(req: &Message, code: u16, to_tag: &str, extra: &str, body: &str) -> Vec<u8> {
    let mut s = format!("SIP/2.0 {code} X\r\n");
    for h in req.headers() {
        for n in ["Via", "Record-Route", "From", "Call-ID", "CSeq"] {
            if crate::sip::message::same_header(&h.name, n) {
                s.push_str(&format!("{}: {}\r\n", h.name, h.value));
            }
        }
        if crate::sip::message::same_header(&h.name, "To") {
            let tag = if h.value.contains("tag=") || code == 100 {
                String::new()
            } else {
                format!(";tag={to_tag}")
            };
            s.push_str(&format!("To: {}{tag}\r\n", h.value));
        }
    }
    s.push_str(extra);
    if !body.is_empty() {
        s.push_str("Content-Type: application/sdp\r\n");
    }
    s.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.into_bytes()
}

const SDP_B: &str = "v=0\r\no=bob 1 1 IN IP4 198.51.100.2\r\ns=-\r\nc=IN IP4 198.51.100.2\r\nt=0 0\r\nm=audio 3456 RTP/AVP 0\r\n";

fn to_conn(out: &[Outgoing], c: ConnId) -> Vec<Message> {
    out.iter()
        .filter(|o| o.dest == Dest::Conn(c))
        .map(parse)
        .collect()
}

/// Sends the fixture INVITE from the internal caller; returns the INVITE
/// as forwarded to the route's next hop.
fn invite(p: &mut Proxy, now: Instant) -> Message {
    let out = p.on_message(CALLER, &fixture("rfc3665_3_1_invite.sip"), now);
    let back = to_conn(&out, CALLER);
    assert_eq!(back.len(), 1, "100 Trying");
    assert_eq!(back[0].status(), Some(100));
    let fwd: Vec<&Outgoing> = out
        .iter()
        .filter(|o| {
            o.dest
                == Dest::Hop {
                    side: Side::External,
                    hop: hop(),
                }
        })
        .collect();
    assert_eq!(fwd.len(), 1, "INVITE forwarded to the route: {out:?}");
    assert!(fwd[0].client_tx.is_some());
    parse(fwd[0])
}

#[test]
fn rfc3665_3_1_successful_session_through_the_edge() {
    let (mut p, rec) = setup();
    let now = Instant::now();
    let inv = invite(&mut p, now);
    p.on_sent(
        &ctx_key(inv.top_via().unwrap().branch().unwrap(), "INVITE"),
        CALLEE,
    );
    // §16.6: our Via on top with the external address, received stamped below.
    let vias = inv.vias().unwrap();
    assert_eq!(vias.len(), 2);
    assert_eq!(vias[0].host.to_string(), "203.0.113.1");
    assert!(vias[0].branch().unwrap().starts_with("z9hG4bK"));
    assert_eq!(vias[1].params.get("received"), Some(Some("10.77.0.2")));
    assert_eq!(inv.header("Max-Forwards"), Some("69"));
    // RFC 5658 double Record-Route, outgoing side on top.
    let rr = inv.name_addrs("Record-Route").unwrap();
    assert_eq!(rr.len(), 2);
    assert!(rr[0].uri.starts_with("sips:203.0.113.1:5061"), "{rr:?}");
    assert!(rr[1].uri.starts_with("sips:10.77.0.1:5061"), "{rr:?}");
    // The caller's Contact is hidden behind an external-side token.
    let contact = inv.name_addrs("Contact").unwrap();
    assert!(contact[0].uri.contains("@203.0.113.1:5061"), "{contact:?}");
    assert!(
        !inv.header("Contact").unwrap().contains("client"),
        "caller Contact leaked"
    );
    assert!(
        inv.body().ends_with(b"a=x-rewritten\r\n"),
        "SDP replaced by media layer"
    );

    // 180 without SDP, then 200 with the answer.
    let out = p.on_message(CALLEE, &answer(&inv, 180, "314159", "", ""), now);
    let r = to_conn(&out, CALLER);
    assert_eq!(r[0].status(), Some(180));
    assert_eq!(r[0].vias().unwrap().len(), 1, "our Via popped");
    let ok = answer(
        &inv,
        200,
        "314159",
        "Contact: <sips:bob@198.51.100.2:5061>\r\n",
        SDP_B,
    );
    let out = p.on_message(CALLEE, &ok, now);
    let r = to_conn(&out, CALLER);
    assert_eq!(r.len(), 1);
    let ok_fwd = &r[0];
    assert_eq!(ok_fwd.status(), Some(200));
    let c = ok_fwd.name_addrs("Contact").unwrap();
    assert!(
        c[0].uri.contains("@10.77.0.1:5061"),
        "callee Contact hidden behind internal token: {c:?}"
    );
    assert!(ok_fwd.body().ends_with(b"a=x-rewritten\r\n"));
    let calls = rec.lock().unwrap().calls.clone();
    let caller_src: SocketAddr = "10.77.0.2:40001".parse().unwrap();
    let callee_src: SocketAddr = "198.51.100.2:5061".parse().unwrap();
    assert_eq!(
        calls,
        vec![
            Call::Sdp {
                role: SdpRole::Offer,
                side: Side::Internal,
                to_tag: None,
                source: caller_src
            },
            Call::Sdp {
                role: SdpRole::Answer,
                side: Side::External,
                to_tag: Some("314159".into()),
                source: callee_src
            },
        ]
    );

    // ACK for 2xx: Route through both of our entries, Request-URI = token.
    let ack = format!(
        "ACK {} SIP/2.0\r\nVia: SIP/2.0/TLS client.atlanta.example.com:5061;branch=z9hG4bK74bfa\r\nRoute: <{}>\r\nRoute: <{}>\r\nMax-Forwards: 70\r\nFrom: Alice <sips:alice@atlanta.example.com>;tag=9fxced76sl\r\nTo: Bob <sips:bob@biloxi.example.com>;tag=314159\r\nCall-ID: 3848276298220188511@atlanta.example.com\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        c[0].uri, rr[1].uri, rr[0].uri
    );
    let out = p.on_message(CALLER, ack.as_bytes(), now);
    let a = to_conn(&out, CALLEE);
    assert_eq!(a.len(), 1, "{out:?}");
    assert!(a[0].method().unwrap().is("ACK"));
    assert_eq!(
        a[0].request_uri().unwrap().unwrap().to_string(),
        "sips:bob@198.51.100.2:5061",
        "token restored"
    );
    assert!(a[0].header("Route").is_none(), "our Routes popped");

    // BYE from the callee (fixture shape, with our Routes and the token).
    let bye_ruri = inv.name_addrs("Contact").unwrap()[0].uri.clone();
    let bye = String::from_utf8(fixture("rfc3665_3_1_bye.sip"))
        .unwrap()
        .replace("sips:alice@client.atlanta.example.com", &bye_ruri)
        .replace(
            "<sips:ss2.biloxi.example.com;lr>,<sips:ss1.atlanta.example.com;lr>",
            &format!("<{}>,<{}>", rr[0].uri, rr[1].uri),
        );
    let out = p.on_message(CALLEE, bye.as_bytes(), now);
    let b = to_conn(&out, CALLER);
    assert_eq!(
        b.len(),
        1,
        "BYE goes back over the caller's own connection: {out:?}"
    );
    assert_eq!(
        b[0].request_uri().unwrap().unwrap().to_string(),
        "sips:alice@client.atlanta.example.com;transport=tls"
    );
    let out = p.on_message(CALLER, &answer(&b[0], 200, "x", "", ""), now);
    assert_eq!(to_conn(&out, CALLEE)[0].status(), Some(200));
    assert_eq!(
        rec.lock().unwrap().calls.last(),
        Some(&Call::End {
            to_tag: Some("314159".into()),
            reason: EndReason::Bye
        })
    );
    p.on_tick(now + Duration::from_secs(40));
    assert_eq!(p.live(), (0, 0, 0), "no transaction or dialog left behind");
}

#[test]
fn rfc3665_3_3_busy_here_acked_by_the_proxy() {
    let (mut p, rec) = setup();
    let now = Instant::now();
    let inv = invite(&mut p, now);
    let out = p.on_message(CALLEE, &answer(&inv, 486, "b1", "", ""), now);
    let ack = to_conn(&out, CALLEE);
    assert_eq!(ack.len(), 1);
    assert!(ack[0].method().unwrap().is("ACK"));
    assert_eq!(
        ack[0].top_via().unwrap().branch(),
        inv.top_via().unwrap().branch(),
        "§17.1.1.3 same branch"
    );
    let up = to_conn(&out, CALLER);
    assert_eq!(up[0].status(), Some(486));
    // The caller's ACK is absorbed by the server transaction.
    let caller_ack = String::from_utf8(fixture("rfc3665_3_1_invite.sip"))
        .unwrap()
        .replacen("INVITE sips", "ACK sips", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 ACK")
        .replace(
            "To: Bob <sips:bob@biloxi.example.com>",
            "To: Bob <sips:bob@biloxi.example.com>;tag=b1",
        );
    let out = p.on_message(CALLER, caller_ack.as_bytes(), now);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(p.stats().retransmissions_absorbed, 1);
    assert_eq!(
        rec.lock().unwrap().calls.last(),
        Some(&Call::End {
            to_tag: Some("b1".into()),
            reason: EndReason::Failure(486)
        })
    );
    p.on_tick(now + Duration::from_secs(40));
    assert_eq!(p.live(), (0, 0, 0));
}

#[test]
fn rfc3665_3_8_cancel_hop_by_hop() {
    let (mut p, rec) = setup();
    let now = Instant::now();
    let inv = invite(&mut p, now);
    p.on_sent(
        &ctx_key(inv.top_via().unwrap().branch().unwrap(), "INVITE"),
        CALLEE,
    );
    p.on_message(CALLEE, &answer(&inv, 180, "c1", "", ""), now);
    let cancel = String::from_utf8(fixture("rfc3665_3_1_invite.sip"))
        .unwrap()
        .replacen("INVITE sips", "CANCEL sips", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    let cancel =
        cancel.split("Content-Type").next().unwrap().to_owned() + "Content-Length: 0\r\n\r\n";
    let out = p.on_message(CALLER, cancel.as_bytes(), now);
    assert_eq!(
        to_conn(&out, CALLER)[0].status(),
        Some(200),
        "200 to CANCEL, hop by hop"
    );
    let fwd = to_conn(&out, CALLEE);
    assert!(fwd[0].method().unwrap().is("CANCEL"));
    assert_eq!(
        fwd[0].top_via().unwrap().branch(),
        inv.top_via().unwrap().branch()
    );
    assert_eq!(
        rec.lock().unwrap().calls.last(),
        Some(&Call::End {
            to_tag: None,
            reason: EndReason::Cancel
        })
    );
    // 200 to our CANCEL is absorbed; 487 is ACKed and forwarded.
    assert!(p
        .on_message(CALLEE, &answer(&fwd[0], 200, "c1", "", ""), now)
        .is_empty());
    let out = p.on_message(CALLEE, &answer(&inv, 487, "c1", "", ""), now);
    assert!(to_conn(&out, CALLEE)[0].method().unwrap().is("ACK"));
    assert_eq!(to_conn(&out, CALLER)[0].status(), Some(487));
    let ends = rec
        .lock()
        .unwrap()
        .calls
        .iter()
        .filter(|c| matches!(c, Call::End { .. }))
        .count();
    assert_eq!(ends, 1, "dialog end reported once");
    p.on_tick(now + Duration::from_secs(40));
    assert_eq!(p.live(), (0, 0, 0));
}

#[test]
fn timer_c_outlives_timer_b_then_cancels_with_one_due_entry_per_transaction() {
    let (mut p, _rec) = setup();
    let now = Instant::now();
    let inv = invite(&mut p, now);
    let ckey = ctx_key(inv.top_via().unwrap().branch().unwrap(), "INVITE");
    p.on_sent(&ckey, CALLEE);
    p.on_message(CALLEE, &answer(&inv, 180, "c1", "", ""), now);
    // The 180 moved the deadline to Timer C (181 s here) without a second
    // entry: the first one, at Timer B's time, finds it moved and follows.
    assert_eq!(p.client_due.len(), 1);
    let out = p.on_tick(now + Duration::from_secs(33));
    assert!(out.is_empty(), "no Timer B after a provisional: {out:?}");
    assert_eq!(p.client_due.len(), 1);
    assert_eq!(p.live().1, 1);
    // Timer C: CANCEL toward the callee, then 64*T1 for its 487.
    let out = p.on_tick(now + Duration::from_secs(182));
    let fwd = to_conn(&out, CALLEE);
    assert!(fwd[0].method().unwrap().is("CANCEL"), "{out:?}");
    assert_eq!(p.client_due.len(), 1, "the wait for the 487");
    // No 487 came: the edge answers the caller for the cancelled branch.
    let out = p.on_tick(now + Duration::from_secs(215));
    assert_eq!(to_conn(&out, CALLER)[0].status(), Some(487));
    p.on_tick(now + Duration::from_secs(300));
    assert_eq!(p.live(), (0, 0, 0));
    assert!(p.client_due.is_empty(), "{:?}", p.client_due);
}

/// The driver runs the transaction timers several times a second
/// (`Proxy::on_timers`); they fire there as in the tick, only once.
#[test]
fn transaction_timers_fire_between_ticks_once() {
    let (mut p, _rec) = setup();
    let now = Instant::now();
    invite(&mut p, now);
    assert!(p.on_timers(now + Duration::from_secs(10)).is_empty());
    let out = p.on_timers(now + Duration::from_millis(32_100));
    assert_eq!(to_conn(&out, CALLER)[0].status(), Some(408));
    let again = p.on_tick(now + Duration::from_secs(33));
    assert!(to_conn(&again, CALLER).is_empty(), "{again:?}");
}

#[test]
fn timer_b_answers_408_and_ends_media() {
    let (mut p, rec) = setup();
    let now = Instant::now();
    invite(&mut p, now);
    assert!(p.on_tick(now + Duration::from_secs(10)).is_empty());
    let out = p.on_tick(now + Duration::from_secs(33));
    assert_eq!(to_conn(&out, CALLER)[0].status(), Some(408));
    assert_eq!(
        rec.lock().unwrap().calls.last(),
        Some(&Call::End {
            to_tag: None,
            reason: EndReason::Timeout
        })
    );
}

#[test]
fn closed_next_hop_connection_fails_only_waiting_transactions() {
    let (mut p, _) = setup();
    let now = Instant::now();
    let inv = invite(&mut p, now);
    p.on_sent(
        &ctx_key(inv.top_via().unwrap().branch().unwrap(), "INVITE"),
        CALLEE,
    );
    // Another connection closing touches nothing.
    assert!(p.on_conn_closed(99, now).is_empty());
    let out = p.on_conn_closed(CALLEE, now);
    let r = to_conn(&out, CALLER);
    assert_eq!(r.len(), 1, "one 503 upstream: {out:?}");
    assert_eq!(r[0].status(), Some(503));
    // The transaction is finished now: a second close (or a stale index
    // entry) must not answer again.
    p.on_sent(
        &ctx_key(inv.top_via().unwrap().branch().unwrap(), "INVITE"),
        CALLEE,
    );
    assert!(p.on_conn_closed(CALLEE, now).is_empty());
}

#[test]
fn unreachable_next_hop_gives_503_with_retry_after() {
    let (mut p, _) = setup();
    let now = Instant::now();
    let inv = invite(&mut p, now);
    let out = p.on_unreachable(
        &ctx_key(inv.top_via().unwrap().branch().unwrap(), "INVITE"),
        now,
    );
    let r = &to_conn(&out, CALLER)[0];
    assert_eq!(r.status(), Some(503));
    assert!(r.header("Retry-After").is_some());
}

#[test]
fn retransmitted_invite_is_absorbed() {
    let (mut p, _) = setup();
    let now = Instant::now();
    invite(&mut p, now);
    let out = p.on_message(CALLER, &fixture("rfc3665_3_1_invite.sip"), now);
    assert_eq!(out.len(), 1);
    assert_eq!(parse(&out[0]).status(), Some(100));
}

fn reject_case(edit: impl Fn(String) -> String, code: u16) -> Message {
    let (mut p, _) = setup();
    let text = edit(String::from_utf8(fixture("rfc3665_3_1_invite.sip")).unwrap());
    let out = p.on_message(CALLER, text.as_bytes(), Instant::now());
    assert_eq!(out.len(), 1, "{out:?}");
    let r = parse(&out[0]);
    assert_eq!(
        r.status(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out[0].bytes)
    );
    assert_eq!(
        r.call_id().unwrap(),
        "3848276298220188511@atlanta.example.com"
    );
    r
}

#[test]
fn requests_that_cannot_be_handled_get_proper_responses() {
    reject_case(|s| s.replace("Max-Forwards: 70", "Max-Forwards: 0"), 483);
    let r = reject_case(
        |s| {
            s.replace(
                "Max-Forwards: 70",
                "Max-Forwards: 70\r\nProxy-Require: foo, path",
            )
        },
        420,
    );
    assert_eq!(r.header("Unsupported"), Some("foo"));
    reject_case(
        |s| s.replace("INVITE sips:bob@biloxi.example.com", "INVITE tel:+15551234"),
        416,
    );
    reject_case(
        |s| {
            s.replace(
                "INVITE sips:bob@biloxi.example.com",
                "INVITE sips:bob@nowhere.example.org",
            )
        },
        404,
    );
    reject_case(|s| s.replace("CSeq: 1 INVITE", "CSeq: 1 BYE"), 400);
    reject_case(
        |s| s.replace("Max-Forwards: 70", "Max-Forwards: 70\r\nbroken header line"),
        400,
    );
    reject_case(|s| s.replace("SIP/2.0\r\nVia", "SIP/3.0\r\nVia"), 505);
}

#[test]
fn media_refusal_answers_the_offer() {
    let (mut p, rec) = setup();
    rec.lock().unwrap().refuse = Some(MediaError::Exhausted {
        reason: "global cap".into(),
    });
    let out = p.on_message(CALLER, &fixture("rfc3665_3_1_invite.sip"), Instant::now());
    let r = to_conn(&out, CALLER);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].status(), Some(503));
    assert_eq!(r[0].header("Retry-After"), Some("5"));
    assert!(
        out.iter().all(|o| o.dest == Dest::Conn(CALLER)),
        "nothing forwarded"
    );
    // Only the server transaction that absorbs the ACK (Timer H, §17.2.1).
    assert_eq!(p.live(), (1, 0, 0));
    p.on_tick(Instant::now() + Duration::from_secs(33));
    assert_eq!(p.live(), (0, 0, 0));
}

#[test]
fn media_refusal_of_the_answer_fails_the_call_both_ways() {
    let (mut p, rec) = setup();
    let now = Instant::now();
    let inv = invite(&mut p, now);
    rec.lock().unwrap().refuse = Some(MediaError::NotAcceptable {
        reason: "no usable stream".into(),
    });
    let ok = answer(
        &inv,
        200,
        "t9",
        "Contact: <sips:bob@198.51.100.2>\r\n",
        SDP_B,
    );
    let out = p.on_message(CALLEE, &ok, now);
    let up = to_conn(&out, CALLER);
    assert_eq!(up[0].status(), Some(488));
    let down: Vec<String> = to_conn(&out, CALLEE)
        .iter()
        .map(|m| m.method().unwrap().to_string())
        .collect();
    assert_eq!(down, vec!["ACK", "BYE"]);
    assert!(rec.lock().unwrap().calls.contains(&Call::End {
        to_tag: Some("t9".into()),
        reason: EndReason::Failure(488)
    }));
}

#[test]
fn rfc3665_2_1_register_then_inbound_invite_uses_the_flow() {
    let (mut p, _) = setup();
    let now = Instant::now();
    // The registrar's domain is routed like any other outbound request.
    let reg = String::from_utf8(fixture("rfc3665_2_1_register.sip"))
        .unwrap()
        .replace("sips:ss2.biloxi.example.com", "sips:biloxi.example.com");
    let out = p.on_message(CALLER, reg.as_bytes(), now);
    let fwd = parse(
        out.iter()
            .find(|o| matches!(o.dest, Dest::Hop { .. }))
            .unwrap(),
    );
    let path = fwd.name_addrs("Path").unwrap();
    assert_eq!(path.len(), 1);
    assert!(
        path[0].uri.contains("@203.0.113.1:5061") && path[0].uri.contains(";lr"),
        "{path:?}"
    );
    assert!(fwd.header("Supported").unwrap().contains("path"));
    let sent_contact = fwd.name_addrs("Contact").unwrap()[0].uri.clone();
    assert!(sent_contact.contains("@203.0.113.1"), "{sent_contact}");
    let ok = answer(
        &fwd,
        200,
        "r1",
        &format!("Contact: <{sent_contact}>;expires=3600\r\n"),
        "",
    );
    let out = p.on_message(CALLEE, &ok, now);
    let back = to_conn(&out, CALLER);
    assert_eq!(back[0].status(), Some(200));
    assert_eq!(
        back[0].name_addrs("Contact").unwrap()[0].uri,
        "sips:bob@client.biloxi.example.com",
        "client sees its own Contact"
    );

    // An inbound INVITE for the AOR (Request-URI = AOR) from another peer.
    let inbound = "INVITE sips:bob@biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.3:40002;branch=z9hG4bKin1\r\nMax-Forwards: 70\r\nFrom: <sips:carol@chicago.example.com>;tag=cc1\r\nTo: <sips:bob@biloxi.example.com>\r\nCall-ID: in1@chicago\r\nCSeq: 1 INVITE\r\nContact: <sips:carol@198.51.100.3:40002>\r\nContent-Length: 0\r\n\r\n";
    let out = p.on_message(PEER_CALLER, inbound.as_bytes(), now);
    let d = to_conn(&out, CALLER);
    assert_eq!(
        d.len(),
        1,
        "delivered over the registered connection: {out:?}"
    );
    assert_eq!(
        d[0].request_uri().unwrap().unwrap().to_string(),
        "sips:bob@client.biloxi.example.com"
    );
    assert_eq!(d[0].top_via().unwrap().host.to_string(), "10.77.0.1");
    assert!(d[0].name_addrs("Contact").unwrap()[0]
        .uri
        .contains("@10.77.0.1:5061"));
    // Once the connection is gone the AOR is no longer reachable.
    p.on_conn_closed(CALLER, now);
    let out = p.on_message(
        PEER_CALLER,
        inbound
            .replace("z9hG4bKin1", "z9hG4bKin2")
            .replace("in1@", "in2@")
            .as_bytes(),
        now,
    );
    assert_eq!(parse(&out[0]).status(), Some(404));
}

#[test]
fn register_from_outside_is_forbidden() {
    let (mut p, _) = setup();
    let mut settings_hop = p.settings.clone();
    settings_hop.internal_next_hop = Some(hop());
    p.settings = settings_hop;
    let reg = fixture("rfc3665_2_1_register.sip");
    let out = p.on_message(PEER_CALLER, &reg, Instant::now());
    assert_eq!(parse(&out[0]).status(), Some(403));
}

#[test]
fn media_expiry_sends_bye_both_ways() {
    let (mut p, rec) = setup();
    let now = Instant::now();
    let inv = invite(&mut p, now);
    let ok = answer(
        &inv,
        200,
        "e1",
        "Contact: <sips:bob@198.51.100.2:5061>\r\n",
        SDP_B,
    );
    p.on_message(CALLEE, &ok, now);
    // The parties' URIs come from the dialog's From/To (kept once for
    // them and for the BYEs).
    let calls = p.calls(now);
    assert_eq!(
        (calls[0].caller.as_str(), calls[0].callee.as_str()),
        (
            "sips:alice@atlanta.example.com",
            "sips:bob@biloxi.example.com"
        )
    );
    rec.lock().unwrap().expire.push(DialogKey {
        call_id: "3848276298220188511@atlanta.example.com".into(),
        from_tag: "9fxced76sl".into(),
    });
    let out = p.on_tick(now + Duration::from_secs(1));
    let to_caller = to_conn(&out, CALLER);
    let to_callee = to_conn(&out, CALLEE);
    assert!(to_caller[0].method().unwrap().is("BYE"));
    assert_eq!(
        to_caller[0].request_uri().unwrap().unwrap().to_string(),
        "sips:alice@client.atlanta.example.com;transport=tls"
    );
    assert_eq!(to_caller[0].from_tag().unwrap().as_deref(), Some("e1"));
    assert_eq!(
        to_caller[0].to_tag().unwrap().as_deref(),
        Some("9fxced76sl")
    );
    assert!(to_callee[0].method().unwrap().is("BYE"));
    assert_eq!(to_callee[0].to_tag().unwrap().as_deref(), Some("e1"));
    assert_eq!(
        to_callee[0].from_tag().unwrap().as_deref(),
        Some("9fxced76sl")
    );
    assert_eq!(to_callee[0].header("CSeq"), Some("2 BYE"));
}

#[test]
fn options_to_the_edge_itself_is_answered() {
    let (mut p, _) = setup();
    let o = "OPTIONS sip:10.77.0.1:5061 SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.2:40001;branch=z9hG4bKo1;rport\r\nMax-Forwards: 70\r\nFrom: <sip:a@x>;tag=o\r\nTo: <sip:10.77.0.1>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
    let out = p.on_message(CALLER, o.as_bytes(), Instant::now());
    let r = parse(&out[0]);
    assert_eq!(r.status(), Some(200));
    let v = r.top_via().unwrap();
    assert_eq!(v.rport(), Some(Some(40001)), "RFC 3581 rport filled in");
}

#[test]
fn media_bodies_outside_offer_answer_never_cross_unrewritten() {
    // An OPTIONS carrying the caller's SDP (RFC 3261 §11 allows it) is not
    // an offer: its body would leak the inside's addresses, so it goes.
    let (mut p, rec) = setup();
    let text = String::from_utf8(fixture("rfc3665_3_1_invite.sip"))
        .unwrap()
        .replacen("INVITE sips:", "OPTIONS sips:", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 OPTIONS");
    assert!(text.contains("c=IN IP4"), "fixture carries SDP");
    let out = p.on_message(CALLER, text.as_bytes(), Instant::now());
    let fwd: Vec<Message> = out
        .iter()
        .filter(|o| matches!(o.dest, Dest::Hop { .. }))
        .map(parse)
        .collect();
    assert_eq!(fwd.len(), 1, "OPTIONS forwarded: {out:?}");
    assert!(
        fwd[0].body().is_empty(),
        "SDP crossed the edge: {}",
        String::from_utf8_lossy(fwd[0].body())
    );
    assert!(fwd[0].header("Content-Type").is_none());
    assert!(
        rec.lock().unwrap().calls.is_empty(),
        "OPTIONS is no offer/answer"
    );

    // A multipart body goes to the media layer (which refuses it) instead
    // of passing through with SDP inside.
    let (mut p, rec) = setup();
    let text = String::from_utf8(fixture("rfc3665_3_1_invite.sip"))
        .unwrap()
        .replace(
            "Content-Type: application/sdp",
            "Content-Type: multipart/mixed;boundary=b1",
        );
    rec.lock().unwrap().refuse = Some(MediaError::NotAcceptable {
        reason: "multipart".into(),
    });
    let out = p.on_message(CALLER, text.as_bytes(), Instant::now());
    assert!(
        out.iter().all(|o| !matches!(o.dest, Dest::Hop { .. })),
        "multipart INVITE forwarded: {out:?}"
    );
    assert!(
        out.iter().map(parse).any(|m| m.status() == Some(488)),
        "{out:?}"
    );
}

// ---- UDP pseudo-connections: Via/Record-Route, Timer A/E, §18.3 ----

const UDP_CLIENT: ConnId = 9;

/// A core with an internal UDP listener on 5060 and a legacy client on it
/// registered as bob@biloxi.example.com through the edge.
fn setup_udp_registered(now: Instant) -> Proxy {
    let (mut p, _) = setup();
    p.settings.internal_udp_port = Some(5060);
    p.on_conn_open(
        UDP_CLIENT,
        ConnInfo {
            side: Side::Internal,
            peer: "10.77.0.9:5062".parse().unwrap(),
            proto: Proto::Udp,
        },
    );
    let reg = "REGISTER sip:biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.77.0.9:5062;branch=z9hG4bKudpreg1;rport\r\nMax-Forwards: 70\r\nFrom: Bob <sip:bob@biloxi.example.com>;tag=u1\r\nTo: Bob <sip:bob@biloxi.example.com>\r\nCall-ID: udpreg@10.77.0.9\r\nCSeq: 1 REGISTER\r\nContact: <sip:bob@10.77.0.9:5062>\r\nExpires: 3600\r\nContent-Length: 0\r\n\r\n";
    let out = p.on_message(UDP_CLIENT, reg.as_bytes(), now);
    let fwd = parse(
        out.iter()
            .find(|o| matches!(o.dest, Dest::Hop { .. }))
            .unwrap(),
    );
    // Toward the registrar (TLS) nothing is armed for retransmission.
    assert_eq!(p.next_retransmit(), None);
    let contact = fwd.name_addrs("Contact").unwrap()[0].uri.clone();
    let ok = answer(
        &fwd,
        200,
        "r1",
        &format!("Contact: <{contact}>;expires=3600\r\n"),
        "",
    );
    let out = p.on_message(CALLEE, &ok, now);
    let back = to_conn(&out, UDP_CLIENT);
    assert_eq!(back[0].status(), Some(200));
    let via = back[0].top_via().unwrap();
    assert_eq!(
        via.params.get("rport"),
        Some(Some("5062")),
        "RFC 3581 rport stamped"
    );
    p
}

fn inbound_request(method: &str, branch: &str) -> String {
    format!("{method} sips:bob@biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.3:40002;branch={branch}\r\nMax-Forwards: 70\r\nFrom: <sips:carol@chicago.example.com>;tag=cc1\r\nTo: <sips:bob@biloxi.example.com>\r\nCall-ID: {branch}@chicago\r\nCSeq: 1 {method}\r\nContact: <sips:carol@198.51.100.3:40002>\r\nContent-Length: 0\r\n\r\n")
}

/// A de-registration that says `expires=0` on its Contact (RFC 3261
/// §10.2.1.1: the parameter overrides the Expires header; baresip sends
/// no header) removes the edge's binding when the registrar's 200 lists
/// no Contact, instead of keeping it for the default 3600 s.
#[test]
fn deregistration_by_contact_expires_zero_removes_the_binding() {
    let t0 = Instant::now();
    let mut p = setup_udp_registered(t0);
    assert_eq!(p.registrations(t0).len(), 1, "registered first");
    let reg = "REGISTER sip:biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.77.0.9:5062;branch=z9hG4bKudpdereg;rport\r\nMax-Forwards: 70\r\nFrom: Bob <sip:bob@biloxi.example.com>;tag=u1\r\nTo: Bob <sip:bob@biloxi.example.com>\r\nCall-ID: udpreg@10.77.0.9\r\nCSeq: 2 REGISTER\r\nContact: <sip:bob@10.77.0.9:5062>;expires=0\r\nContent-Length: 0\r\n\r\n";
    let out = p.on_message(UDP_CLIENT, reg.as_bytes(), t0);
    let fwd = parse(
        out.iter()
            .find(|o| matches!(o.dest, Dest::Hop { .. }))
            .unwrap(),
    );
    let out = p.on_message(CALLEE, &answer(&fwd, 200, "r2", "", ""), t0);
    assert_eq!(to_conn(&out, UDP_CLIENT)[0].status(), Some(200));
    let left = p.registrations(t0);
    assert!(
        left.is_empty(),
        "binding kept after de-registration: {left:?}"
    );
}

/// Issue #9: the Contact a UDP client receives names the edge's UDP
/// listener with `transport=udp` (the transport the client uses), not the
/// TLS listener, and the client's own Contact reaches the TLS side as a
/// TLS (here sips) URI.
#[test]
fn contact_toward_a_udp_client_names_the_udp_listener() {
    let t0 = Instant::now();
    let mut p = setup_udp_registered(t0);
    let out = p.on_message(
        PEER_CALLER,
        inbound_request("INVITE", "z9hG4bKudpct1").as_bytes(),
        t0,
    );
    let inv = to_conn(&out, UDP_CLIENT).remove(0);
    let c = inv.name_addrs("Contact").unwrap()[0].uri.clone();
    assert!(
        c.starts_with("sip:") && c.ends_with("@10.77.0.1:5060;transport=udp"),
        "Contact toward the UDP client: {c}"
    );
    let ok = answer(&inv, 200, "u2", "Contact: <sip:bob@10.77.0.9:5062>\r\n", "");
    let out = p.on_message(UDP_CLIENT, &ok, t0);
    let back = to_conn(&out, PEER_CALLER);
    assert_eq!(back[0].status(), Some(200), "{out:?}");
    let c = back[0].name_addrs("Contact").unwrap()[0].uri.clone();
    assert!(
        !c.contains("transport=udp") && c.contains(":5061"),
        "Contact toward the TLS side: {c}"
    );
}

#[test]
fn invite_to_a_udp_client_retransmits_on_timer_a_until_a_provisional() {
    let t0 = Instant::now();
    let mut p = setup_udp_registered(t0);
    let out = p.on_message(
        PEER_CALLER,
        inbound_request("INVITE", "z9hG4bKudpin1").as_bytes(),
        t0,
    );
    let sent: Vec<&Outgoing> = out
        .iter()
        .filter(|o| o.dest == Dest::Conn(UDP_CLIENT))
        .collect();
    assert_eq!(sent.len(), 1, "{out:?}");
    let inv = parse(sent[0]);
    let via = inv.top_via().unwrap();
    assert_eq!(
        (via.transport.as_str(), via.port),
        ("UDP", Some(5060)),
        "Via names our UDP port"
    );
    let rr = inv.name_addrs("Record-Route").unwrap();
    assert_eq!(
        rr[0].uri, "sip:10.77.0.1:5060;transport=udp;lr",
        "the client routes back to our UDP port"
    );
    // §17.1.1.2: Timer A = T1, doubling: copies at 0.5 s, 1.5 s, 3.5 s.
    let ms = |n: u64| t0 + Duration::from_millis(n);
    assert_eq!(p.next_retransmit(), Some(ms(500)));
    assert!(p.on_retransmit(ms(499)).is_empty());
    for (at, next) in [(500, 1500), (1500, 3500), (3500, 7500)] {
        let again = p.on_retransmit(ms(at));
        assert_eq!(again.len(), 1, "retransmission at {at} ms");
        assert_eq!(again[0].dest, Dest::Conn(UDP_CLIENT));
        assert_eq!(
            again[0].bytes, sent[0].bytes,
            "a retransmission is byte-identical"
        );
        assert_eq!(p.next_retransmit(), Some(ms(next)));
    }
    // A provisional stops Timer A (Proceeding state).
    p.on_message(UDP_CLIENT, &answer(&inv, 180, "b1", "", ""), ms(4000));
    assert!(p.on_retransmit(ms(7500)).is_empty());
    assert_eq!(p.next_retransmit(), None, "nothing armed once answered");
}

#[test]
fn non_invite_to_a_udp_client_caps_timer_e_at_t2_and_stops_on_final() {
    let t0 = Instant::now();
    let mut p = setup_udp_registered(t0);
    let out = p.on_message(
        PEER_CALLER,
        inbound_request("MESSAGE", "z9hG4bKudpmsg").as_bytes(),
        t0,
    );
    let msg = to_conn(&out, UDP_CLIENT).remove(0);
    // §17.1.2.2: intervals 0.5, 1, 2, 4, 4 s (capped at T2).
    let mut fired = Vec::new();
    let mut t = t0;
    while fired.len() < 6 && t < t0 + Duration::from_secs(20) {
        t += Duration::from_millis(100);
        if !p.on_retransmit(t).is_empty() {
            fired.push(t.duration_since(t0).as_millis());
        }
    }
    assert_eq!(fired, vec![500, 1500, 3500, 7500, 11500, 15500]);
    // A provisional keeps Timer E at T2; the final stops it.
    p.on_message(UDP_CLIENT, &answer(&msg, 100, "b1", "", ""), t);
    assert_eq!(
        p.next_retransmit(),
        Some(t0 + Duration::from_millis(19_500))
    );
    let out = p.on_message(UDP_CLIENT, &answer(&msg, 200, "b1", "", ""), t);
    assert_eq!(to_conn(&out, PEER_CALLER)[0].status(), Some(200));
    assert!(p.on_retransmit(t0 + Duration::from_secs(20)).is_empty());
    assert_eq!(p.next_retransmit(), None);
}

#[test]
fn timer_f_ends_udp_retransmissions_with_408() {
    let t0 = Instant::now();
    let mut p = setup_udp_registered(t0);
    p.on_message(
        PEER_CALLER,
        inbound_request("MESSAGE", "z9hG4bKudpf").as_bytes(),
        t0,
    );
    let out = p.on_tick(t0 + Duration::from_secs(33));
    assert_eq!(to_conn(&out, PEER_CALLER)[0].status(), Some(408));
    assert!(p.on_retransmit(t0 + Duration::from_secs(34)).is_empty());
    assert_eq!(
        p.next_retransmit(),
        None,
        "entry forgotten with its transaction"
    );
}

#[test]
fn requests_over_tls_are_never_retransmitted_by_the_core() {
    let (mut p, _) = setup();
    let now = Instant::now();
    invite(&mut p, now);
    assert_eq!(p.next_retransmit(), None);
    assert!(p.on_retransmit(now + Duration::from_secs(5)).is_empty());
}

#[test]
fn udp_datagrams_follow_rfc3261_18_3() {
    let now = Instant::now();
    let mut p = setup_udp_registered(now);
    let good = inbound_request("OPTIONS", "z9hG4bKudpopt").replace(
        "Via: SIP/2.0/TLS 198.51.100.3:40002",
        "Via: SIP/2.0/UDP 10.77.0.9:5062",
    );
    // A request declared longer than the datagram: 400 (§18.3 "SHOULD
    // generate a 400", RFC 4475 §3.1.2.2); before, it was discarded.
    let short = good.replace("Content-Length: 0", "Content-Length: 10");
    let out = p.on_message(UDP_CLIENT, short.as_bytes(), now);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dest, Dest::Conn(UDP_CLIENT));
    assert_eq!(parse(&out[0]).status(), Some(400));
    // A response declared longer than the datagram: discarded (§18.3).
    let short_response = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.77.0.1:5060;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>;tag=2\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 10\r\n\r\n";
    assert!(p
        .on_message(UDP_CLIENT, short_response.as_bytes(), now)
        .is_empty());
    // The same request over a stream is answered 400 too (the framer never
    // does this, but the core must not diverge silently).
    assert_eq!(
        parse(&p.on_message(CALLER, short.as_bytes(), now)[0]).status(),
        Some(400)
    );
    // Garbage without a Via: dropped (nothing to answer to, no reflection).
    assert!(p
        .on_message(UDP_CLIENT, b"\x16\x03\x01 not sip at all\r\n\r\n", now)
        .is_empty());
    // Malformed with a Via: 400 back to the datagram's source.
    let bad = good.replace("CSeq: 1 OPTIONS", "CSeq: x OPTIONS\r\nBroken header line");
    let out = p.on_message(UDP_CLIENT, bad.as_bytes(), now);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dest, Dest::Conn(UDP_CLIENT));
    assert_eq!(parse(&out[0]).status(), Some(400));
    // Content-Length absent: the body is the rest of the datagram.
    let m = good
        .replace("Content-Length: 0\r\n", "")
        .replace("\r\n\r\n", "\r\nContent-Type: text/plain\r\n\r\nhello");
    let out = p.on_message(UDP_CLIENT, m.as_bytes(), now);
    let fwd = parse(
        out.iter()
            .find(|o| matches!(o.dest, Dest::Hop { .. }))
            .unwrap(),
    );
    assert_eq!(fwd.body(), b"hello");
    assert_eq!(fwd.header("Content-Length"), Some("5"));
}

/// A confirmed call (fixture INVITE, 200 from the callee), then an
/// in-dialog `method` from the callee with `content_type` and `body`;
/// returns what went to the caller and the media calls it caused.
fn in_dialog_from_callee(
    method: &str,
    content_type: &str,
    body: &str,
) -> (Vec<Message>, Vec<Call>) {
    let (mut p, rec) = setup();
    let now = Instant::now();
    let inv = invite(&mut p, now);
    let rr = inv.name_addrs("Record-Route").unwrap();
    let ok = answer(
        &inv,
        200,
        "314159",
        "Contact: <sips:bob@198.51.100.2:5061>\r\n",
        SDP_B,
    );
    p.on_message(CALLEE, &ok, now);
    let ruri = inv.name_addrs("Contact").unwrap()[0].uri.clone();
    let msg = format!(
        "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS client.biloxi.example.com:5061;branch=z9hG4bKindlg1\r\nMax-Forwards: 70\r\nRoute: <{}>,<{}>\r\nFrom: Bob <sips:bob@biloxi.example.com>;tag=314159\r\nTo: Alice <sips:alice@atlanta.example.com>;tag=9fxced76sl\r\nCall-ID: 3848276298220188511@atlanta.example.com\r\nCSeq: 2 {method}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        rr[0].uri,
        rr[1].uri,
        body.len()
    );
    let before = rec.lock().unwrap().calls.len();
    let out = p.on_message(CALLEE, msg.as_bytes(), now);
    let calls = rec.lock().unwrap().calls[before..].to_vec();
    (to_conn(&out, CALLER), calls)
}

#[test]
fn every_msmsgs_command_goes_to_the_media_layer() {
    // An in-dialog MESSAGE from the callee carrying a Messenger CANCEL (any
    // header case) must reach the media layer, which tears the transfer
    // down; before, only INVITE/ACCEPT did and the body was stripped.
    let body = "MIME-Version: 1.0\r\ninvitation-command: CANCEL\r\nInvitation-Cookie: 7\r\nCancel-Code: TIMEOUT\r\n";
    let (fwd, calls) = in_dialog_from_callee("MESSAGE", "text/x-msmsgsinvite; charset=UTF-8", body);
    assert_eq!(fwd.len(), 1, "MESSAGE forwarded to the caller");
    assert!(
        fwd[0].body().ends_with(b"a=x-rewritten\r\n"),
        "body went through the media layer"
    );
    assert!(
        matches!(
            calls.as_slice(),
            [Call::Sdp {
                role: SdpRole::Offer,
                side: Side::External,
                ..
            }]
        ),
        "{calls:?}"
    );
}

#[test]
fn filetransfer_xml_in_info_reaches_the_media_layer() {
    // Office Communicator's download/cancel requests carry an
    // application/ms-filetransfer+xml body and no Invitation-Command line;
    // they must go through the media layer, not be stripped.
    let body = "<request xmlns=\"http://schemas.microsoft.com/rtc/2009/05/filetransfer\" requestId=\"2\"><downloadFile><fileInfo><name>a.txt</name></fileInfo></downloadFile></request>";
    let (fwd, calls) = in_dialog_from_callee("INFO", "application/ms-filetransfer+xml", body);
    assert_eq!(fwd.len(), 1, "INFO forwarded to the caller");
    assert!(fwd[0].body().starts_with(body.as_bytes()), "XML body kept");
    assert_eq!(calls.len(), 1, "media layer consulted: {calls:?}");
}

// ---- Identifiers (RFC 3261 §8.1.1.7, §19.3): unique across restarts ----

#[test]
fn branches_and_tags_differ_between_two_runs() {
    // Two `Proxy` instances stand for two agent runs: each starts its
    // counter afresh, so only a per-run random part can tell them apart.
    // A stateful next hop that still remembers the first run's INVITE
    // would otherwise take the second run's first INVITE for a
    // retransmission of it (RFC 3261 §17.2.3 matches on the branch).
    let (mut a, _) = setup();
    let (mut b, _) = setup();
    let (ba, bb) = (a.new_branch(), b.new_branch());
    assert_ne!(ba, bb, "first branch of two runs repeats");
    for br in [&ba, &bb] {
        assert!(br.starts_with(MAGIC_COOKIE), "{br}");
        assert!(
            br.len() >= MAGIC_COOKIE.len() + 16,
            "too little entropy: {br}"
        );
        assert!(
            br.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&c)),
            "branch is a token (§25.1): {br}"
        );
    }
    let (ta, tb) = (a.new_tag(), b.new_tag());
    assert_ne!(ta, tb, "first tag of two runs repeats");
    // Within one run they stay unique too.
    assert_ne!(a.new_branch(), ba);
    assert_ne!(a.new_tag(), ta);
    // And the forwarded INVITE carries such a branch.
    let inv = invite(&mut b, Instant::now());
    let v = inv.top_via().unwrap();
    let br = v.branch().unwrap();
    assert!(
        br.starts_with(MAGIC_COOKIE) && br.len() >= MAGIC_COOKIE.len() + 16,
        "{br}"
    );
}

// ---- Bodies the edge does not rewrite (RFC 3261 §23, RFC 1847) ----

/// A request from the internal caller to biloxi with `ct` and `body`.
fn request_with_body(method: &str, ct: &str, body: &str) -> Vec<u8> {
    let head = String::from_utf8(fixture("rfc3665_3_1_invite.sip")).unwrap();
    let head = head.split("\r\n\r\n").next().unwrap().to_owned();
    let head = head
        .replacen("INVITE sips:", &format!("{method} sips:"), 1)
        .replace("CSeq: 1 INVITE", &format!("CSeq: 1 {method}"))
        .replace(
            "Content-Type: application/sdp",
            &format!("Content-Type: {ct}"),
        )
        .replace(
            "Content-Length: 151",
            &format!("Content-Length: {}", body.len()),
        );
    format!("{head}\r\n\r\n{body}").into_bytes()
}

const SIGNED_CT: &str =
    "multipart/signed;protocol=\"application/pkcs7-signature\";micalg=sha-256;boundary=sig42";

/// An S/MIME-signed body (RFC 8551 §3.5, RFC 1847 §2.1) around `inner`.
fn signed(inner_ct: &str, inner: &str) -> String {
    format!(
        "--sig42\r\nContent-Type: {inner_ct}\r\n\r\n{inner}\r\n--sig42\r\nContent-Type: application/pkcs7-signature; name=smime.p7s\r\nContent-Transfer-Encoding: binary\r\n\r\n\u{1}\u{2}fake-signature\r\n--sig42--\r\n"
    )
}

#[test]
fn signed_message_body_passes_byte_exact() {
    // A MESSAGE with a signed text body: nothing in it is an address the
    // edge rewrites, and any change would break the signature (RFC 3261
    // §23.3). It must reach the next hop exactly as sent.
    let (mut p, rec) = setup();
    let body = signed("text/plain", "Watson, come here.");
    let out = p.on_message(
        CALLER,
        &request_with_body("MESSAGE", SIGNED_CT, &body),
        Instant::now(),
    );
    let fwd: Vec<Message> = out
        .iter()
        .filter(|o| matches!(o.dest, Dest::Hop { .. }))
        .map(parse)
        .collect();
    assert_eq!(fwd.len(), 1, "MESSAGE forwarded: {out:?}");
    assert_eq!(
        fwd[0].body(),
        body.as_bytes(),
        "signed body changed on the way"
    );
    assert_eq!(fwd[0].header("Content-Type"), Some(SIGNED_CT));
    assert!(rec.lock().unwrap().calls.is_empty(), "no media layer work");

    // Non-media multipart (a text part and an image) passes too.
    let (mut p, _) = setup();
    let ct = "multipart/mixed;boundary=mx";
    let body = "--mx\r\nContent-Type: text/plain\r\n\r\nhi\r\n--mx\r\nContent-Type: image/png\r\n\r\nPNG\r\n--mx--\r\n";
    let out = p.on_message(
        CALLER,
        &request_with_body("MESSAGE", ct, body),
        Instant::now(),
    );
    let fwd: Vec<Message> = out
        .iter()
        .filter(|o| matches!(o.dest, Dest::Hop { .. }))
        .map(parse)
        .collect();
    assert_eq!(fwd[0].body(), body.as_bytes());
    assert_eq!(fwd[0].header("Content-Type"), Some(ct));
}

#[test]
fn signed_sdp_the_edge_must_rewrite_is_refused_not_broken() {
    // A signed offer: the edge must rewrite the SDP (it names the inside),
    // which would break the signature. Refuse it with a clear reason
    // rather than forward a body whose signature no longer verifies.
    let (mut p, rec) = setup();
    let sdp = "v=0\r\no=alice 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\nm=audio 49172 RTP/AVP 0\r\n";
    let body = signed("application/sdp", sdp);
    let out = p.on_message(
        CALLER,
        &request_with_body("INVITE", SIGNED_CT, &body),
        Instant::now(),
    );
    assert!(
        out.iter().all(|o| !matches!(o.dest, Dest::Hop { .. })),
        "signed SDP forwarded: {out:?}"
    );
    let r = to_conn(&out, CALLER);
    let last = r.last().expect("a final response");
    assert_eq!(last.status(), Some(488), "{r:?}");
    let w = last.header("Warning").unwrap_or_default();
    assert!(w.contains("signed"), "Warning says why: {w:?}");
    assert!(
        rec.lock().unwrap().calls.is_empty(),
        "nothing reached media"
    );
    assert_eq!(p.live().2, 0, "no dialog left");
}

#[test]
fn only_parts_the_edge_rewrites_make_a_body_media_bearing() {
    let sdp = "v=0\r\nc=IN IP4 10.77.0.2\r\nm=audio 4000 RTP/AVP 0\r\n";
    let mixed = |inner_ct: &str, inner: &str| {
        format!("--m1\r\nContent-Type: {inner_ct}\r\n\r\n{inner}\r\n--m1--\r\n")
    };
    let signed_ct = SIGNED_CT;
    let cases: Vec<(&str, String, BodyKind)> = vec![
        ("application/sdp", sdp.into(), BodyKind::Media),
        (
            "Application/SDP; charset=utf-8",
            sdp.into(),
            BodyKind::Media,
        ),
        ("text/plain", "hi".into(), BodyKind::Opaque),
        (
            "application/pkcs7-mime; smime-type=enveloped-data",
            "x".into(),
            BodyKind::Opaque,
        ),
        (
            "multipart/mixed;boundary=m1",
            mixed("application/sdp", sdp),
            BodyKind::Media,
        ),
        (
            "multipart/mixed;boundary=m1",
            mixed("text/plain", "hi"),
            BodyKind::Opaque,
        ),
        // An address-free part alone is not rewritten when inside multipart.
        (
            "multipart/mixed;boundary=m1",
            mixed("application/ms-filetransfer+xml", "<a/>"),
            BodyKind::Opaque,
        ),
        (signed_ct, signed("text/plain", "hi"), BodyKind::Opaque),
        (
            signed_ct,
            signed("application/sdp", sdp),
            BodyKind::SignedMedia,
        ),
        (
            signed_ct,
            signed("text/x-msmsgsinvite", "Invitation-Command: INVITE"),
            BodyKind::SignedMedia,
        ),
        // SDP nested in a signed part of a mixed body is still signed.
        (
            "multipart/mixed;boundary=m1",
            mixed(signed_ct, &signed("application/sdp", sdp)),
            BodyKind::SignedMedia,
        ),
        // Unparsable MIME cannot be shown SDP-free (nor to hold SDP: the
        // media layer refuses it, or it is removed outside offer/answer).
        (
            "multipart/mixed;boundary=m1",
            "no delimiters here".into(),
            BodyKind::Media,
        ),
        (signed_ct, "garbage".into(), BodyKind::Media),
    ];
    for (ct, body, want) in cases {
        assert_eq!(body_kind(ct, body.as_bytes()), want, "{ct}: {body:?}");
    }
}

// ---- The far party's route reaches the media layer (DESIGN.md §3) ----

#[test]
fn route_media_sources_follow_the_far_partys_connection() {
    let (mut p, rec) = setup();
    let carrier = vec![crate::config::parse_cidr("192.0.2.0/24").unwrap()];
    p.settings.route_media = vec![crate::proxy::RouteMedia {
        hop: hop(),
        // As for a route by host name: only the connection tells.
        host_ip: None,
        sources: carrier.clone(),
    }];
    // The route's host name resolved to another address than CALLEE's.
    const SBC: ConnId = 7;
    p.on_conn_open(
        SBC,
        ConnInfo {
            side: Side::External,
            peer: "192.0.2.10:5061".parse().unwrap(),
            proto: Proto::Tls,
        },
    );
    let now = Instant::now();
    let inv = invite(&mut p, now);
    p.on_sent(
        &ctx_key(inv.top_via().unwrap().branch().unwrap(), "INVITE"),
        SBC,
    );
    let ok = answer(&inv, 200, "t7", "Contact: <sips:bob@192.0.2.10>\r\n", SDP_B);
    p.on_message(SBC, &ok, now);
    let got = rec.lock().unwrap().sources.clone();
    assert_eq!(
        got,
        vec![Vec::new(), carrier.clone()],
        "offer from inside, answer via the route"
    );

    // A peer matched by the route's IP literal, connecting in.
    let (mut p, rec) = setup();
    p.settings.route_media = vec![crate::proxy::RouteMedia {
        hop: HopTarget {
            host: "198.51.100.3".into(),
            port: 5061,
            tls_name: "chicago.example.com".into(),
        },
        host_ip: Some("198.51.100.3".parse().unwrap()),
        sources: carrier.clone(),
    }];
    let inv = invite(&mut p, now);
    let ok = answer(
        &inv,
        200,
        "t8",
        "Contact: <sips:bob@198.51.100.2>\r\n",
        SDP_B,
    );
    // The answer from CALLEE (198.51.100.2): not that route.
    p.on_message(CALLEE, &ok, now);
    assert_eq!(rec.lock().unwrap().sources, vec![Vec::new(), Vec::new()]);
    assert_eq!(
        p.far_media(PEER_CALLER, &p.conns[&PEER_CALLER], None, now)
            .0,
        carrier
    );
}

#[test]
fn a_policy_refusal_says_which_rule_in_the_warning() {
    let (mut p, rec) = setup();
    rec.lock().unwrap().refuse = Some(MediaError::Forbidden {
        reason: "stream 0: media 10.77.0.99:5000 is an address inside an internal subnet (rule internal-subnet)".into(),
        rule: Some(crate::media::policy::Refusal::InternalSubnet),
    });
    let out = p.on_message(CALLER, &fixture("rfc3665_3_1_invite.sip"), Instant::now());
    let r = to_conn(&out, CALLER);
    let last = r.last().unwrap();
    assert_eq!(last.status(), Some(488));
    let w = last.header("Warning").unwrap_or_default();
    assert!(
        w.starts_with("399 ") && w.contains("rule internal-subnet"),
        "{w}"
    );
}

#[test]
fn a_refused_answer_in_ack_ends_the_call_both_ways() {
    // Late offer (RFC 3264 §4): offer in the 2xx, answer in the ACK. An ACK
    // cannot be refused with a response, so the edge completes the
    // callee's INVITE with the ACK (answer removed: nothing unchecked
    // crosses) and ends the call toward both parties.
    let (mut p, rec) = setup();
    let now = Instant::now();
    let out = p.on_message(
        CALLER,
        &request_with_body("INVITE", "application/sdp", ""),
        now,
    );
    let inv = out
        .iter()
        .find(|o| matches!(o.dest, Dest::Hop { .. }))
        .map(parse)
        .unwrap();
    p.on_sent(
        &ctx_key(inv.top_via().unwrap().branch().unwrap(), "INVITE"),
        CALLEE,
    );
    let ok = answer(
        &inv,
        200,
        "t5",
        "Contact: <sips:bob@198.51.100.2>\r\n",
        SDP_B,
    );
    let out = p.on_message(CALLEE, &ok, now);
    let ok_up = to_conn(&out, CALLER).pop().unwrap();
    assert_eq!(ok_up.status(), Some(200));
    rec.lock().unwrap().refuse = Some(MediaError::Forbidden {
        reason: "answer aims inside".into(),
        rule: None,
    });
    let rr = ok_up.name_addrs("Record-Route").unwrap();
    let target = ok_up.name_addrs("Contact").unwrap()[0].uri.clone();
    let sdp = "v=0\r\no=alice 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let routes: Vec<String> = rr.iter().map(|r| format!("<{}>", r.uri)).collect();
    let ack = format!(
        "ACK {target} SIP/2.0\r\nVia: SIP/2.0/TLS client.atlanta.example.com:5061;branch=z9hG4bKack1\r\nMax-Forwards: 70\r\nRoute: {}\r\nFrom: Alice <sips:alice@atlanta.example.com>;tag=9fxced76sl\r\nTo: Bob <sips:bob@biloxi.example.com>;tag=t5\r\nCall-ID: 3848276298220188511@atlanta.example.com\r\nCSeq: 1 ACK\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        routes.join(","),
        sdp.len()
    );
    let out = p.on_message(CALLER, ack.as_bytes(), now);
    let down: Vec<Message> = out
        .iter()
        .filter(|o| o.dest != Dest::Conn(CALLER))
        .map(parse)
        .collect();
    let methods: Vec<String> = down
        .iter()
        .map(|m| m.method().unwrap().to_string())
        .collect();
    assert_eq!(methods, vec!["ACK", "BYE"], "{out:?}");
    assert!(down[0].body().is_empty(), "refused answer forwarded");
    let up: Vec<String> = to_conn(&out, CALLER)
        .iter()
        .map(|m| m.method().map(|x| x.to_string()).unwrap_or_default())
        .collect();
    assert_eq!(up, vec!["BYE"], "the caller is told too");
    assert!(rec.lock().unwrap().calls.iter().any(|c| matches!(
        c,
        Call::End {
            reason: EndReason::Failure(488),
            ..
        }
    )));
    assert_eq!(p.live().2, 0, "dialog gone");
}

// --- issue #14 item 7 ---------------------------------------------------

/// The fixture INVITE turned into the caller's ACK for a final response
/// that carried To-tag `tag` (same Via, so it matches the INVITE's server
/// transaction, §17.2.3), without a body.
fn caller_ack(invite: &str, tag: &str) -> String {
    let head = invite.split("Content-Type").next().unwrap_or(invite);
    (head.to_owned() + "Content-Length: 0\r\n\r\n")
        .replacen("INVITE sips", "ACK sips", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 ACK")
        .replace(
            "To: Bob <sips:bob@biloxi.example.com>",
            &format!("To: Bob <sips:bob@biloxi.example.com>;tag={tag}"),
        )
}

/// RFC 3261 §17.2.3: a request whose branch lacks the `z9hG4bK` cookie
/// comes from an RFC 2543 element; it is matched the RFC 2543 way
/// (Request-URI, From tag, Call-ID, CSeq, top Via) and processed, not
/// refused. Retransmissions and the ACK for a non-2xx still match.
#[test]
fn rfc2543_invite_without_the_cookie_is_proxied_and_its_ack_absorbed() {
    let (mut p, _) = setup();
    let now = Instant::now();
    let text = String::from_utf8(fixture("rfc3665_3_1_invite.sip"))
        .unwrap()
        .replace("branch=z9hG4bK74bf9", "branch=74bf9");
    let out = p.on_message(CALLER, text.as_bytes(), now);
    let back = to_conn(&out, CALLER);
    assert_eq!(back.len(), 1, "{out:?}");
    assert_eq!(back[0].status(), Some(100), "processed, not refused");
    let fwd = out
        .iter()
        .find(|o| matches!(o.dest, Dest::Hop { .. }))
        .expect("INVITE forwarded");
    let inv = parse(fwd);
    assert!(
        inv.top_via()
            .unwrap()
            .branch()
            .unwrap()
            .starts_with("z9hG4bK"),
        "the edge's own branch is RFC 3261"
    );
    // A retransmission matches the first INVITE the RFC 2543 way.
    let out = p.on_message(CALLER, text.as_bytes(), now);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(parse(&out[0]).status(), Some(100));
    // Another INVITE with the same cookie-less branch but another Call-ID
    // is another transaction (the branch alone identifies nothing here).
    let other = text.replace(
        "3848276298220188511@atlanta.example.com",
        "other-call@atlanta.example.com",
    );
    let out = p.on_message(CALLER, other.as_bytes(), now);
    assert!(
        out.iter().any(|o| matches!(o.dest, Dest::Hop { .. })),
        "{out:?}"
    );
    // 486 upstream, and the caller's ACK for it ends at the edge.
    let out = p.on_message(CALLEE, &answer(&inv, 486, "b1", "", ""), now);
    assert_eq!(to_conn(&out, CALLER)[0].status(), Some(486));
    let out = p.on_message(CALLER, caller_ack(&text, "b1").as_bytes(), now);
    assert!(out.is_empty(), "{out:?}");
}

/// RFC 3261 §17.2.1: a final response the edge generates itself (here the
/// media layer's 488) creates the INVITE server transaction that absorbs
/// the caller's ACK. Without it the ACK was routed on to a callee that
/// never saw the INVITE, with the edge's To-tag and the inside Via.
#[test]
fn a_locally_rejected_invite_absorbs_its_ack_and_retransmissions() {
    let (mut p, rec) = setup();
    rec.lock().unwrap().refuse = Some(MediaError::NotAcceptable {
        reason: "no IPv4 edge address for media".into(),
    });
    let now = Instant::now();
    let text = String::from_utf8(fixture("rfc3665_3_1_invite.sip")).unwrap();
    let out = p.on_message(CALLER, text.as_bytes(), now);
    let r = to_conn(&out, CALLER);
    assert_eq!(r.len(), 1, "{out:?}");
    assert_eq!(r[0].status(), Some(488));
    let tag = r[0]
        .to_tag()
        .unwrap()
        .expect("a final response carries a To-tag");
    let first = out[0].bytes.clone();
    let out = p.on_message(CALLER, caller_ack(&text, &tag).as_bytes(), now);
    assert!(
        out.is_empty(),
        "the ACK for the edge's own 488 ends at the edge: {out:?}"
    );
    // A retransmitted INVITE gets the same 488 again, without a second
    // trip through the media layer.
    let out = p.on_message(CALLER, text.as_bytes(), now);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].bytes, first);
    let sdp_calls = rec
        .lock()
        .unwrap()
        .calls
        .iter()
        .filter(|c| matches!(c, Call::Sdp { .. }))
        .count();
    assert_eq!(sdp_calls, 1);
    // Timer H (64*T1) ends it.
    p.on_tick(now + Duration::from_secs(33));
    assert_eq!(p.live(), (0, 0, 0));
}

/// RFC 3261 §20.43: the edge's own 4xx/5xx carry a Warning (code 399) with
/// the edge's host on the side the response goes to and a short reason, so
/// the rejected party's log shows why.
#[test]
fn the_edges_own_errors_say_why_in_a_warning() {
    let r = reject_case(
        |s| {
            s.replace(
                "INVITE sips:bob@biloxi.example.com",
                "INVITE sips:bob@nowhere.example.org",
            )
        },
        404,
    );
    let w = r.header("Warning").expect("a Warning on the 404");
    assert!(w.starts_with("399 10.77.0.1 \""), "{w}");
    assert!(w.contains("no [[route]] for nowhere.example.org"), "{w}");

    let (mut p, rec) = setup();
    rec.lock().unwrap().refuse = Some(MediaError::NotAcceptable {
        reason: "no IPv4 edge address for media".into(),
    });
    let out = p.on_message(CALLER, &fixture("rfc3665_3_1_invite.sip"), Instant::now());
    let w = to_conn(&out, CALLER)[0]
        .header("Warning")
        .map(str::to_owned)
        .expect("a Warning on the 488");
    assert!(w.starts_with("399 10.77.0.1 \""), "{w}");
    assert!(w.contains("no IPv4 edge address for media"), "{w}");

    let (mut p, _) = setup();
    let now = Instant::now();
    let inv = invite(&mut p, now);
    let out = p.on_unreachable(
        &ctx_key(inv.top_via().unwrap().branch().unwrap(), "INVITE"),
        now,
    );
    let w = to_conn(&out, CALLER)[0]
        .header("Warning")
        .map(str::to_owned)
        .expect("a Warning on the 503");
    assert!(w.starts_with("399 10.77.0.1 \""), "{w}");

    // Toward the outside the Warning names the public address, never the
    // inside one.
    let (mut p, _) = setup();
    let out = p.on_message(
        PEER_CALLER,
        inbound_request("INVITE", "z9hG4bKnoroute").as_bytes(),
        Instant::now(),
    );
    let r = to_conn(&out, PEER_CALLER);
    assert_eq!(r[0].status(), Some(404), "{out:?}");
    let w = r[0].header("Warning").expect("a Warning on the 404");
    assert!(w.starts_with("399 203.0.113.1 \""), "{w}");
}

const MESSAGE_FROM_INSIDE: &str = "MESSAGE sips:bob@biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/TLS client.atlanta.example.com:5061;branch=z9hG4bKmsg1\r\nMax-Forwards: 70\r\nFrom: Alice <sips:alice@atlanta.example.com>;tag=m1\r\nTo: Bob <sips:bob@biloxi.example.com>\r\nCall-ID: msg1@atlanta.example.com\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi";

/// RFC 3261 §17.2.2: Timer J is 0 on reliable transports, so a non-INVITE
/// server transaction over TLS ends with its final response. A later
/// request reusing the branch (here on a new connection, the first one
/// closed) is a new request, not answered with the stored response on the
/// closed connection.
#[test]
fn non_invite_over_tls_ends_at_its_final_response() {
    let (mut p, _) = setup();
    let now = Instant::now();
    let out = p.on_message(CALLER, MESSAGE_FROM_INSIDE.as_bytes(), now);
    let fwd = parse(
        out.iter()
            .find(|o| matches!(o.dest, Dest::Hop { .. }))
            .expect("forwarded"),
    );
    let out = p.on_message(CALLEE, &answer(&fwd, 200, "b1", "", ""), now);
    assert_eq!(to_conn(&out, CALLER)[0].status(), Some(200));
    assert_eq!(p.live().0, 0, "Timer J = 0 over TLS");
    p.on_conn_closed(CALLER, now);
    const CALLER2: ConnId = 4;
    p.on_conn_open(
        CALLER2,
        ConnInfo {
            side: Side::Internal,
            peer: "10.77.0.2:40003".parse().unwrap(),
            proto: Proto::Tls,
        },
    );
    let again = MESSAGE_FROM_INSIDE.replace("CSeq: 1 MESSAGE", "CSeq: 2 MESSAGE");
    let out = p.on_message(CALLER2, again.as_bytes(), now);
    assert!(
        out.iter().any(|o| matches!(o.dest, Dest::Hop { .. })),
        "a new request, forwarded: {out:?}"
    );
    assert!(
        out.iter().all(|o| o.dest != Dest::Conn(CALLER)),
        "nothing for the closed connection: {out:?}"
    );
}

/// Over UDP the same transaction lingers for Timer J (64*T1) and absorbs
/// retransmissions with the stored response (§17.2.2).
#[test]
fn non_invite_over_udp_keeps_absorbing_for_timer_j() {
    let now = Instant::now();
    let mut p = setup_udp_registered(now);
    let req = MESSAGE_FROM_INSIDE.replace(
        "Via: SIP/2.0/TLS client.atlanta.example.com:5061",
        "Via: SIP/2.0/UDP 10.77.0.9:5062",
    );
    let out = p.on_message(UDP_CLIENT, req.as_bytes(), now);
    let fwd = parse(
        out.iter()
            .find(|o| matches!(o.dest, Dest::Hop { .. }))
            .expect("forwarded"),
    );
    p.on_message(CALLEE, &answer(&fwd, 200, "b1", "", ""), now);
    let out = p.on_message(UDP_CLIENT, req.as_bytes(), now);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(parse(&out[0]).status(), Some(200));
    p.on_tick(now + Duration::from_secs(33));
    assert_eq!(p.live().0, 0);
}

/// Issue #14 item 7: a message the stream framer refused is answered
/// before the close, from the head it kept; a response head is not.
#[test]
fn framing_errors_are_answered_from_the_kept_head() {
    let (mut p, _) = setup();
    let head = b"INVITE sips:bob@biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.3:40002;branch=z9hG4bKbig\r\nCall-ID: big@chicago\r\nCSeq: 1 INVITE\r\nContent-Length: 99999999\r\n\r\n";
    let out = p.on_framing_error(PEER_CALLER, head, 413, "body over the limit");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dest, Dest::Conn(PEER_CALLER));
    let r = parse(&out[0]);
    assert_eq!(r.status(), Some(413));
    assert_eq!(r.call_id().unwrap(), "big@chicago");
    assert_eq!(
        r.header("Warning"),
        Some("399 203.0.113.1 \"body over the limit\"")
    );
    assert!(p
        .on_framing_error(CALLEE, b"SIP/2.0 200 OK\r\nCall-ID: x\r\n", 513, "x")
        .is_empty());
}

// --- remote users and trusted peers (issue #15) ------------------------------

/// A remote user outside (behind its NAT's public address).
const REMOTE: ConnId = 10;
/// The inside registrar/PBX, connected to the edge.
const REGISTRAR: ConnId = 11;

fn registrar_hop() -> HopTarget {
    HopTarget {
        host: "10.77.0.10".into(),
        port: 5061,
        tls_name: "pbx.example.com".into(),
    }
}

/// `setup()` with `[access]` for example.com (registrar 10.77.0.10) and a
/// carrier `[[peer]]` at 198.51.100.2/32 (the CALLEE connection); the
/// PEER_CALLER connection (198.51.100.3) is nobody.
fn setup_access() -> (Proxy, Arc<Mutex<Recorder>>) {
    let (mut p, rec) = setup();
    p.settings.internal_next_hop = Some(registrar_hop());
    p.settings.access = super::access::AccessSettings {
        enforce: true,
        served_domains: vec!["example.com".into()],
        remote_users: true,
        registrar: Some(registrar_hop()),
        max_remote_registrations: 100,
        peers: vec![super::access::PeerPolicy {
            name: "carrier".into(),
            addresses: vec![crate::config::parse_cidr("198.51.100.2").unwrap()],
            tls_identity: None,
            hop: None,
            domains: Vec::new(),
            media_sources: vec![crate::config::parse_cidr("198.51.100.128/25").unwrap()],
            far_media: FarMedia::LatchPort,
            max_requests_per_sec: 0,
        }],
    };
    p.on_conn_open(
        REMOTE,
        ConnInfo {
            side: Side::External,
            peer: "198.51.100.20:40123".parse().unwrap(),
            proto: Proto::Tls,
        },
    );
    p.on_conn_open(
        REGISTRAR,
        ConnInfo {
            side: Side::Internal,
            peer: "10.77.0.10:5061".parse().unwrap(),
            proto: Proto::Tls,
        },
    );
    (p, rec)
}

fn to_registrar(out: &[Outgoing]) -> Vec<Message> {
    out.iter()
        .filter(|o| {
            o.dest
                == Dest::Hop {
                    side: Side::Internal,
                    hop: registrar_hop(),
                }
        })
        .map(parse)
        .collect()
}

/// A remote user's REGISTER from behind a NAT (private Contact).
fn remote_register(branch: &str, expires: u32) -> String {
    format!("REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 192.168.1.5:5061;branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=r1\r\nTo: <sip:alice@example.com>\r\nCall-ID: reg-alice\r\nCSeq: 1 REGISTER\r\nSupported: outbound\r\nContact: <sip:alice@192.168.1.5:5061;transport=tls;ob>;reg-id=1;+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\"\r\nExpires: {expires}\r\nContent-Length: 0\r\n\r\n")
}

/// Registers alice through the edge; returns the Contact and Path the
/// registrar stored (the edge's token URIs on the inside).
fn register_remote_alice(p: &mut Proxy, now: Instant) -> (String, String) {
    let out = p.on_message(REMOTE, remote_register("z9hG4bKrr1", 600).as_bytes(), now);
    let fwd = to_registrar(&out);
    assert_eq!(
        fwd.len(),
        1,
        "REGISTER goes to the inside registrar: {out:?}"
    );
    let reg = &fwd[0];
    let path = reg.name_addrs("Path").unwrap();
    assert_eq!(path.len(), 1, "one Path of ours (RFC 3327 §5)");
    let path_uri = path[0].uri.clone();
    assert!(
        path_uri.contains("@10.77.0.1:5061")
            && path_uri.contains(";lr")
            && path_uri.contains(";ob"),
        "Path names the edge's inside address with a flow token: {path_uri}"
    );
    assert!(reg.header("Supported").unwrap().contains("path"));
    let contact = reg.name_addrs("Contact").unwrap()[0].uri.clone();
    assert!(
        contact.starts_with("sip:sef") && contact.contains("@10.77.0.1:5061"),
        "the registrar sees an edge Contact, never the private one: {contact}"
    );
    assert_eq!(reg.top_via().unwrap().host.to_string(), "10.77.0.1");
    let ok = answer(
        reg,
        200,
        "reg",
        &format!("Contact: <{contact}>;expires=600\r\nPath: <{path_uri}>\r\n"),
        "",
    );
    let out = p.on_message(REGISTRAR, &ok, now);
    let back = to_conn(&out, REMOTE);
    assert_eq!(back[0].status(), Some(200));
    assert_eq!(
        back[0].name_addrs("Contact").unwrap()[0].uri,
        "sip:alice@192.168.1.5:5061;transport=tls;ob",
        "the client sees its own Contact"
    );
    assert!(
        back[0].header("Path").is_none(),
        "the inside address in the Path never goes out"
    );
    (contact, path_uri)
}

/// The PBX's INVITE for alice at the Contact it holds, via her Path.
fn pbx_invite(contact: &str, path: &str, branch: &str, sdp: &str) -> String {
    format!("INVITE {contact} SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.10:5061;branch={branch}\r\nRoute: <{path}>\r\nMax-Forwards: 69\r\nFrom: <sip:bob@example.com>;tag=pbx1\r\nTo: <sip:alice@example.com>\r\nCall-ID: {branch}@pbx\r\nCSeq: 1 INVITE\r\nContact: <sip:bob@10.77.0.10:5061;transport=tls>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}", sdp.len())
}

const SDP_INSIDE: &str = "v=0\r\no=bob 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";

#[test]
fn a_remote_user_registers_through_the_edge_and_is_listed() {
    let (mut p, _) = setup_access();
    let now = Instant::now();
    register_remote_alice(&mut p, now);
    let regs = p.registrations(now);
    assert_eq!(regs.len(), 1, "{regs:?}");
    let r = &regs[0];
    assert_eq!(r.aor, "alice@example.com");
    assert_eq!(r.side, "outside");
    assert_eq!(r.source, "198.51.100.20:40123");
    assert_eq!(r.transport, "tls");
    assert_eq!(r.flow, Some(REMOTE));
    assert_eq!(r.flow_state, "up");
    assert_eq!(r.expires_in_secs, 600);
    assert!(r.edge_contact.contains("@10.77.0.1:5061"), "{r:?}");
    // Its flow is kept open until the registration expires.
    assert_eq!(
        p.registered_flows(now),
        vec![(REMOTE, now + Duration::from_secs(600))]
    );
    // A remote user's AOR is never routed from outside to its flow: that is
    // the inside registrar's job (remote-to-remote goes through the PBX).
    let inbound = "INVITE sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.2:5061;branch=z9hG4bKc1\r\nMax-Forwards: 70\r\nFrom: <sip:+1555@carrier.example>;tag=c1\r\nTo: <sip:alice@example.com>\r\nCall-ID: c1@carrier\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
    let out = p.on_message(CALLEE, inbound.as_bytes(), now);
    assert!(
        to_conn(&out, REMOTE).is_empty(),
        "no outside-to-outside hairpin"
    );
    assert_eq!(to_registrar(&out).len(), 1, "to the PBX: {out:?}");
    // De-registration (Expires: 0) removes it.
    let out = p.on_message(REMOTE, remote_register("z9hG4bKrr2", 0).as_bytes(), now);
    let reg = &to_registrar(&out)[0];
    let ok = answer(reg, 200, "reg", "", "");
    p.on_message(REGISTRAR, &ok, now);
    assert!(p.registrations(now).is_empty());
}

#[test]
fn an_inside_call_to_a_remote_user_leaves_over_its_flow_with_its_media_pinned() {
    let (mut p, rec) = setup_access();
    let now = Instant::now();
    let (contact, path) = register_remote_alice(&mut p, now);
    let out = p.on_message(
        REGISTRAR,
        pbx_invite(&contact, &path, "z9hG4bKpbx1", SDP_INSIDE).as_bytes(),
        now,
    );
    let d = to_conn(&out, REMOTE);
    assert_eq!(d.len(), 1, "over the flow alice registered on: {out:?}");
    assert_eq!(
        d[0].request_uri().unwrap().unwrap().to_string(),
        "sip:alice@192.168.1.5:5061;transport=tls;ob",
        "the Request-URI is her own Contact again"
    );
    assert_eq!(d[0].top_via().unwrap().host.to_string(), "203.0.113.1");
    assert!(d[0].header("Route").is_none(), "the Path route was ours");
    // Her answer from behind the NAT names a private address: the media
    // layer is told she is a remote user (pinned to her source, port learned).
    let sdp_nat = "v=0\r\no=alice 1 1 IN IP4 192.168.1.5\r\ns=-\r\nc=IN IP4 192.168.1.5\r\nt=0 0\r\nm=audio 7078 RTP/AVP 0\r\n";
    let ok = answer(
        &d[0],
        200,
        "al1",
        "Contact: <sip:alice@192.168.1.5:5061;transport=tls;ob>\r\n",
        sdp_nat,
    );
    let out = p.on_message(REMOTE, &ok, now);
    assert_eq!(to_conn(&out, REGISTRAR)[0].status(), Some(200));
    let r = rec.lock().unwrap();
    assert_eq!(r.far, vec![FarMedia::Config, FarMedia::RemoteUser]);
    assert!(matches!(
        &r.calls[1],
        Call::Sdp { side: Side::External, source, .. } if source.to_string() == "198.51.100.20:40123"
    ));
}

#[test]
fn a_request_for_a_dead_flow_gets_430() {
    let (mut p, _) = setup_access();
    let now = Instant::now();
    let (contact, path) = register_remote_alice(&mut p, now);
    p.on_conn_closed(REMOTE, now);
    let regs = p.registrations(now);
    assert_eq!(regs[0].flow_state, "failed", "{regs:?}");
    // By the Contact token (with the Path route, as a registrar sends it).
    let out = p.on_message(
        REGISTRAR,
        pbx_invite(&contact, &path, "z9hG4bKdead1", SDP_INSIDE).as_bytes(),
        now,
    );
    let r = to_conn(&out, REGISTRAR);
    let fin = r.iter().find(|m| m.status() != Some(100)).expect("a final");
    assert_eq!(
        fin.status(),
        Some(430),
        "RFC 5626 §5.3 Flow Failed: {out:?}"
    );
    // By the Path route alone (a registrar that rewrites the Request-URI).
    let by_path = pbx_invite("sip:alice@example.com", &path, "z9hG4bKdead2", "")
        .replace("Content-Type: application/sdp\r\n", "");
    let out = p.on_message(REGISTRAR, by_path.as_bytes(), now);
    assert_eq!(to_conn(&out, REGISTRAR)[0].status(), Some(430), "{out:?}");
    // Once the registration would have expired the token is unknown.
    p.on_tick(now + Duration::from_secs(601));
    assert!(p.registrations(now + Duration::from_secs(601)).is_empty());
}

#[test]
fn no_open_relay_from_outside() {
    let (mut p, _) = setup_access();
    let now = Instant::now();
    let invite_for = |ruri: &str, branch: &str| {
        format!("INVITE {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.3:40002;branch={branch}\r\nMax-Forwards: 70\r\nFrom: <sip:mallory@evil.example>;tag=m1\r\nTo: <{ruri}>\r\nCall-ID: {branch}@x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
    };
    let forwarded = |out: &[Outgoing]| {
        out.iter()
            .filter(|o| matches!(o.dest, Dest::Hop { .. }))
            .count()
    };
    // Nobody (neither a peer nor a registered user): 403, even for a served domain.
    for (ruri, b) in [
        ("sip:+15551234@example.com", "z9hG4bKo1"),
        ("sip:+15551234@pstn.foreign.example", "z9hG4bKo2"),
        ("sip:+15551234@203.0.113.1", "z9hG4bKo3"),
    ] {
        let out = p.on_message(PEER_CALLER, invite_for(ruri, b).as_bytes(), now);
        assert_eq!(to_conn(&out, PEER_CALLER)[0].status(), Some(403), "{ruri}");
        assert_eq!(forwarded(&out), 0, "{ruri}: relayed");
    }
    // Nobody registers for a foreign domain either.
    let reg = remote_register("z9hG4bKo4", 600)
        .replace("REGISTER sip:example.com", "REGISTER sip:foreign.example");
    let out = p.on_message(PEER_CALLER, reg.as_bytes(), now);
    assert_eq!(to_conn(&out, PEER_CALLER)[0].status(), Some(404));
    assert_eq!(forwarded(&out), 0);
    // The carrier (a [[peer]] by source address): its calls for served
    // domains and the edge's address go inside, a foreign domain is 404.
    let out = p.on_message(
        CALLEE,
        invite_for("sip:+15551234@pstn.foreign.example", "z9hG4bKo5").as_bytes(),
        now,
    );
    assert_eq!(to_conn(&out, CALLEE)[0].status(), Some(404));
    assert_eq!(forwarded(&out), 0);
    for (ruri, b) in [
        ("sip:+15551234@example.com", "z9hG4bKo6"),
        ("sip:+15551234@203.0.113.1", "z9hG4bKo7"),
    ] {
        let out = p.on_message(CALLEE, invite_for(ruri, b).as_bytes(), now);
        assert_eq!(to_registrar(&out).len(), 1, "{ruri}: {out:?}");
    }
    // A preloaded Route beyond the edge is refused (it would relay).
    let routed = invite_for("sip:+1555@example.com", "z9hG4bKo8").replace(
        "Max-Forwards",
        "Route: <sip:203.0.113.1:5061;lr>\r\nRoute: <sip:10.77.0.99;lr>\r\nMax-Forwards",
    );
    let out = p.on_message(CALLEE, routed.as_bytes(), now);
    assert_eq!(to_conn(&out, CALLEE)[0].status(), Some(403));
    // A registered remote user may call served domains, not foreign ones.
    register_remote_alice(&mut p, now);
    let out = p.on_message(
        REMOTE,
        invite_for("sip:+4930123@example.com", "z9hG4bKo9").as_bytes(),
        now,
    );
    assert_eq!(to_registrar(&out).len(), 1, "{out:?}");
    let out = p.on_message(
        REMOTE,
        invite_for("sip:bob@foreign.example", "z9hG4bKo10").as_bytes(),
        now,
    );
    assert_eq!(to_conn(&out, REMOTE)[0].status(), Some(404));
    assert_eq!(forwarded(&out), 0);
}

#[test]
fn a_peer_is_matched_by_source_cidr_and_gets_its_media_policy() {
    let (mut p, rec) = setup_access();
    let now = Instant::now();
    let inbound = format!("INVITE sip:+15551234@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.2:5061;branch=z9hG4bKpm1\r\nMax-Forwards: 70\r\nFrom: <sip:+1999@carrier.example>;tag=c1\r\nTo: <sip:+15551234@example.com>\r\nCall-ID: pm1@carrier\r\nCSeq: 1 INVITE\r\nContact: <sip:+1999@198.51.100.2:5061;transport=tls>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{SDP_B}", SDP_B.len());
    let out = p.on_message(CALLEE, inbound.as_bytes(), now);
    assert_eq!(to_registrar(&out).len(), 1, "{out:?}");
    let r = rec.lock().unwrap();
    assert_eq!(r.far, vec![FarMedia::LatchPort], "the peer's latch mode");
    assert_eq!(
        r.sources[0],
        vec![crate::config::parse_cidr("198.51.100.128/25").unwrap()],
        "the peer's media_sources"
    );
}

#[test]
fn a_peers_rate_limit_answers_503() {
    let (mut p, _) = setup_access();
    p.settings.access.peers[0].max_requests_per_sec = 2;
    let now = Instant::now();
    let opt = |b: &str| {
        format!("OPTIONS sip:+1@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.2:5061;branch={b}\r\nMax-Forwards: 70\r\nFrom: <sip:c@carrier.example>;tag=o\r\nTo: <sip:+1@example.com>\r\nCall-ID: {b}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    };
    for b in ["z9hG4bKrl1", "z9hG4bKrl2"] {
        assert_eq!(
            to_registrar(&p.on_message(CALLEE, opt(b).as_bytes(), now)).len(),
            1
        );
    }
    let out = p.on_message(CALLEE, opt("z9hG4bKrl3").as_bytes(), now);
    let r = &to_conn(&out, CALLEE)[0];
    assert_eq!(r.status(), Some(503));
    assert!(r.header("Retry-After").is_some());
}

#[test]
fn tokens_of_a_refused_register_go_with_its_transaction_a_granted_path_lasts() {
    let (mut p, _) = setup_access();
    let now = Instant::now();
    // A REGISTER asking for a day that the registrar refuses (401).
    let out = p.on_message(
        PEER_CALLER,
        remote_register("z9hG4bKrf1", 86_400).as_bytes(),
        now,
    );
    let reg = &to_registrar(&out)[0];
    p.on_message(REGISTRAR, &answer(reg, 401, "reg", "", ""), now);
    assert!(!p.bindings.is_empty());
    p.on_tick(now + TIMER_64T1 + Duration::from_secs(1));
    assert!(
        p.bindings.is_empty(),
        "a refused REGISTER's tokens outlive its transaction"
    );
    // A granted one: its Path keeps working for the registration's life.
    let (_, path) = register_remote_alice(&mut p, now);
    let later = now + Duration::from_secs(300);
    p.on_tick(later);
    let by_path = pbx_invite("sip:alice@example.com", &path, "z9hG4bKrf2", "")
        .replace("Content-Type: application/sdp\r\n", "");
    let out = p.on_message(REGISTRAR, by_path.as_bytes(), later);
    assert_eq!(
        to_conn(&out, REMOTE).len(),
        1,
        "the Path route still leads to alice's flow: {out:?}"
    );
}

fn strict_admission() -> crate::proxy::admission::Admission {
    use crate::proxy::admission::{Admission, AdmissionSettings, BucketSpec};
    Admission::new(AdmissionSettings {
        invite: BucketSpec { rate: 1, burst: 3 },
        failures_per_source: 3,
        ..AdmissionSettings::from_limits(&crate::config::Limits::default())
    })
}

/// Issue #14 item 8: an INVITE flood from one inside host gets 503 with
/// Retry-After past its burst, answered statelessly (no transaction, no
/// 100 Trying, nothing forwarded); the retransmission of an admitted
/// INVITE is absorbed, not charged; the ACK of a 503 ends at the edge.
#[test]
fn an_invite_flood_is_refused_statelessly_and_retransmissions_are_not_charged() {
    let (mut p, _) = setup();
    p.set_admission(strict_admission());
    let now = Instant::now();
    let base = String::from_utf8(fixture("rfc3665_3_1_invite.sip")).unwrap();
    let nth = |n: usize| {
        base.replace("z9hG4bK74bf9", &format!("z9hG4bKflood{n}"))
            .replace(
                "3848276298220188511@atlanta.example.com",
                &format!("flood{n}@atlanta"),
            )
    };
    let mut forwarded = 0;
    let mut refused = Vec::new();
    for n in 0..10 {
        let out = p.on_message(CALLER, nth(n).as_bytes(), now);
        forwarded += out
            .iter()
            .filter(|o| matches!(o.dest, Dest::Hop { .. }))
            .count();
        let back = to_conn(&out, CALLER);
        assert_eq!(back.len(), 1, "{out:?}");
        if back[0].status() == Some(503) {
            refused.push(back[0].clone());
        }
    }
    assert_eq!(forwarded, 3, "the burst");
    assert_eq!(refused.len(), 7);
    assert_eq!(refused[0].header("Retry-After"), Some("1"));
    assert!(refused[0]
        .header("Warning")
        .is_some_and(|w| w.contains("too many requests")));
    let (server_txs, _, _) = p.live();
    assert_eq!(server_txs, 3, "refusals keep no transaction");
    assert_eq!(p.admission_stats().admitted, 3);
    // The first INVITE again: absorbed (100 Trying), not refused.
    let out = p.on_message(CALLER, nth(0).as_bytes(), now);
    assert_eq!(to_conn(&out, CALLER)[0].status(), Some(100));
    assert_eq!(p.admission_stats().admitted, 3, "not charged");
    // The ACK for a 503: absorbed at the edge, never routed on.
    let to = refused[0].header("To").unwrap().to_owned();
    let ack = nth(5)
        .replacen(
            "INVITE sips:bob@biloxi.example.com",
            "ACK sips:bob@biloxi.example.com",
            1,
        )
        .replace("CSeq: 1 INVITE", "CSeq: 1 ACK")
        .replace(
            "To: Bob <sips:bob@biloxi.example.com>",
            &format!("To: {to}"),
        );
    assert!(ack.contains(";tag=se"), "{ack}");
    let before = p.stats().retransmissions_absorbed;
    let out = p.on_message(CALLER, ack.as_bytes(), now);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(p.stats().retransmissions_absorbed, before + 1);
    // A second later a token is back.
    let out = p.on_message(CALLER, nth(20).as_bytes(), now + Duration::from_secs(1));
    assert_eq!(to_conn(&out, CALLER)[0].status(), Some(100));
}

/// Issue #15: a registrar's 401s to REGISTERs that carried credentials are
/// failures; past the limit the source gets 403 for the block time, and
/// its REGISTERs no longer reach the registrar.
#[test]
fn registration_brute_force_through_the_edge_is_blocked_with_403() {
    let (mut p, _) = setup();
    p.set_admission(strict_admission());
    let now = Instant::now();
    let reg = String::from_utf8(fixture("rfc3665_2_1_register.sip"))
        .unwrap()
        .replace("sips:ss2.biloxi.example.com", "sips:biloxi.example.com");
    let with_creds = |n: usize| {
        reg.replace("z9hG4bKnashds7", &format!("z9hG4bKguess{n}"))
            .replace(
                "Max-Forwards: 70\r\n",
                &format!("Max-Forwards: 70\r\nAuthorization: Digest username=\"bob\", realm=\"biloxi.example.com\", nonce=\"n\", uri=\"sips:biloxi.example.com\", response=\"guess{n}\"\r\n"),
            )
    };
    for n in 0..3 {
        let msg = with_creds(n);
        assert!(msg.contains("Authorization"), "fixture shape changed");
        let out = p.on_message(CALLER, msg.as_bytes(), now);
        let fwd = parse(
            out.iter()
                .find(|o| matches!(o.dest, Dest::Hop { .. }))
                .unwrap(),
        );
        let out = p.on_message(CALLEE, &answer(&fwd, 401, "reg", "", ""), now);
        assert_eq!(to_conn(&out, CALLER)[0].status(), Some(401));
    }
    let out = p.on_message(
        CALLER,
        with_creds(9).as_bytes(),
        now + Duration::from_secs(1),
    );
    assert!(
        !out.iter().any(|o| matches!(o.dest, Dest::Hop { .. })),
        "a blocked source's REGISTER never reaches the registrar"
    );
    let back = to_conn(&out, CALLER);
    assert_eq!(back[0].status(), Some(403));
    assert!(
        back[0].header("Retry-After").is_none(),
        "403 has no Retry-After"
    );
}

/// Issue #14 item 8: after a crash, a BYE for an old call could not be
/// routed (its Contact token died with the old process) and got 404 while
/// its pinholes stayed. Now the media layer ends the adopted call and the
/// edge answers 200; a BYE for a call nobody knows gets 481 (issue #8:
/// RFC 3261 §15.1.2, it used to get 404).
#[test]
fn a_bye_for_a_call_of_an_earlier_run_ends_its_adopted_pinholes() {
    let (mut p, rec) = setup();
    let now = Instant::now();
    rec.lock()
        .unwrap()
        .adopted
        .push(("old-call@atlanta".into(), "caller-tag".into()));
    let bye = |call: &str| {
        format!("BYE sips:sef0123456789abcdef1@10.77.0.1:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.2:5061;branch=z9hG4bKbye{call}\r\nRoute: <sips:10.77.0.1:5061;lr>\r\nMax-Forwards: 70\r\nFrom: <sips:alice@atlanta.example.com>;tag=caller-tag\r\nTo: <sips:bob@biloxi.example.com>;tag=callee-tag\r\nCall-ID: {call}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
    };
    let out = p.on_message(CALLER, bye("old-call@atlanta").as_bytes(), now);
    let back = to_conn(&out, CALLER);
    assert_eq!(back.len(), 1, "{out:?}");
    assert_eq!(back[0].status(), Some(200));
    assert!(back[0]
        .header("Warning")
        .is_some_and(|w| w.contains("before an edge restart")));
    assert!(
        rec.lock().unwrap().adopted.is_empty(),
        "its pinholes are gone"
    );
    let out = p.on_message(CALLER, bye("unknown@atlanta").as_bytes(), now);
    assert_eq!(to_conn(&out, CALLER)[0].status(), Some(481));
}

/// Issue #8, item 10: after a restart, a re-INVITE or UPDATE of a call
/// from before it (its Contact token died with the old process) got 404
/// Not Found, which tells the sender nothing about the dialog; 481
/// Call/Transaction Does Not Exist is right (RFC 3261 §12.2.2) and makes
/// the sender end the call (RFC 5057 §5.1), whose BYE then removes its
/// adopted pinholes. The adopted pinholes stay until then: a re-INVITE is
/// no proof the call ended. An out-of-dialog request with an unknown token
/// keeps its 404.
#[test]
fn in_dialog_requests_of_a_call_from_before_a_restart_get_481() {
    let (mut p, rec) = setup();
    let now = Instant::now();
    rec.lock()
        .unwrap()
        .adopted
        .push(("old-call@atlanta".into(), "caller-tag".into()));
    let req = |method: &str, to_tag: &str, n: u32| {
        let to_tag = if to_tag.is_empty() {
            String::new()
        } else {
            format!(";tag={to_tag}")
        };
        format!("{method} sips:sef0123456789abcdef1@10.77.0.1:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.2:5061;branch=z9hG4bK{method}{n}\r\nRoute: <sips:10.77.0.1:5061;lr>\r\nMax-Forwards: 70\r\nFrom: <sips:alice@atlanta.example.com>;tag=caller-tag\r\nTo: <sips:bob@biloxi.example.com>{to_tag}\r\nCall-ID: old-call@atlanta\r\nCSeq: {n} {method}\r\nContact: <sips:alice@10.77.0.2:5061;transport=tls>\r\nContent-Length: 0\r\n\r\n")
    };
    for (n, method) in [(3, "INVITE"), (4, "UPDATE"), (5, "INFO")] {
        let out = p.on_message(CALLER, req(method, "callee-tag", n).as_bytes(), now);
        let back = to_conn(&out, CALLER);
        let last = back
            .last()
            .unwrap_or_else(|| panic!("{method}: no answer: {out:?}"));
        assert_eq!(last.status(), Some(481), "{method}: {last:?}");
        assert!(
            !out.iter().any(|o| matches!(o.dest, Dest::Hop { .. })),
            "{method} is not forwarded anywhere"
        );
    }
    assert_eq!(
        rec.lock().unwrap().adopted.len(),
        1,
        "a re-INVITE is no BYE: the adopted pinholes stay"
    );
    // Out of a dialog (no To tag) an unknown token is still 404.
    let out = p.on_message(CALLER, req("INVITE", "", 9).as_bytes(), now);
    assert_eq!(
        to_conn(&out, CALLER).last().and_then(|m| m.status()),
        Some(404)
    );
}

/// Issue #15, from outside: a remote source guessing passwords through the
/// edge (REGISTERs with credentials the inside registrar answers 401) is
/// blocked at the edge with 403 once past the limit, and its next
/// REGISTER never reaches the registrar.
#[test]
fn an_outside_registration_brute_force_is_blocked_at_the_edge() {
    let (mut p, _) = setup_access();
    p.set_admission(strict_admission());
    let now = Instant::now();
    let guess = |n: usize| {
        remote_register(&format!("z9hG4bKbf{n}"), 600).replace(
            "Max-Forwards: 70\r\n",
            &format!("Max-Forwards: 70\r\nAuthorization: Digest username=\"alice\", realm=\"example.com\", nonce=\"n\", uri=\"sip:example.com\", response=\"guess{n}\"\r\n"),
        )
    };
    for n in 0..3 {
        let out = p.on_message(REMOTE, guess(n).as_bytes(), now);
        let fwd = to_registrar(&out);
        assert_eq!(fwd.len(), 1, "guess {n} reaches the registrar: {out:?}");
        let out = p.on_message(REGISTRAR, &answer(&fwd[0], 401, "reg", "", ""), now);
        assert_eq!(to_conn(&out, REMOTE)[0].status(), Some(401));
    }
    let out = p.on_message(REMOTE, guess(9).as_bytes(), now + Duration::from_secs(1));
    assert!(
        to_registrar(&out).is_empty(),
        "a blocked source's REGISTER never reaches the registrar: {out:?}"
    );
    assert_eq!(to_conn(&out, REMOTE)[0].status(), Some(403));
}

/// Found by the `proxy_sequence` fuzz target: a dialog the media layer
/// holds nothing for (no SDP, or every stream disabled) is never expired
/// by it, and with its connections gone and no BYE the proxy kept its
/// record forever: memory any caller could grow without bound. No dialog
/// record outlives the maximum call length (plus 64*T1 for the BYE the
/// media expiry sends).
#[test]
fn a_dialog_without_media_does_not_outlive_the_maximum_call_length() {
    let (mut p, _) = setup();
    let now = Instant::now();
    let no_sdp = String::from_utf8(fixture("rfc3665_3_1_invite.sip"))
        .unwrap()
        .split("Content-Type")
        .next()
        .unwrap()
        .to_owned()
        + "Content-Length: 0\r\n\r\n";
    let out = p.on_message(CALLER, no_sdp.as_bytes(), now);
    let inv = parse(
        out.iter()
            .find(|o| matches!(o.dest, Dest::Hop { .. }))
            .expect("INVITE forwarded"),
    );
    let out = p.on_message(
        CALLEE,
        &answer(
            &inv,
            200,
            "t",
            "Contact: <sips:bob@198.51.100.2:5061>\r\n",
            "",
        ),
        now,
    );
    let ok = &to_conn(&out, CALLER)[0];
    assert_eq!(ok.status(), Some(200));
    assert_eq!(p.live().2, 1, "the dialog is known");
    // The caller ACKs (an un-ACKed 2xx ends sooner: `ack_timeout`).
    let _ = p.on_message(CALLER, ack_2xx(ok, "t").as_bytes(), now);
    p.on_conn_closed(CALLER, now);
    p.on_conn_closed(CALLEE, now);
    let max = p.settings.max_dialog;
    p.on_tick(now + max);
    assert_eq!(p.live().2, 1, "kept up to the maximum call length");
    p.on_tick(now + max + Duration::from_secs(64 * 500 / 1000 + 1));
    assert_eq!(p.live(), (0, 0, 0), "nothing left");
}

/// A graceful stop (`live`, `crate::service`): once draining, a new
/// INVITE gets 503 with Retry-After and goes nowhere, while the call in
/// progress goes on and its BYE ends it.
#[test]
fn a_drain_refuses_new_invites_and_lets_calls_in_progress_end() {
    let (mut p, _rec) = setup();
    let now = Instant::now();
    let inv = invite(&mut p, now);
    p.on_sent(
        &ctx_key(inv.top_via().unwrap().branch().unwrap(), "INVITE"),
        CALLEE,
    );
    let ok = answer(
        &inv,
        200,
        "314159",
        "Contact: <sips:bob@198.51.100.2:5061>\r\n",
        SDP_B,
    );
    p.on_message(CALLEE, &ok, now);
    assert_eq!(p.calls_in_progress(), 1);
    p.start_drain();
    let second = String::from_utf8(fixture("rfc3665_3_1_invite.sip"))
        .unwrap()
        .replace("3848276298220188511", "42")
        .replace("z9hG4bK74bf9", "z9hG4bKsecond");
    let out = p.on_message(CALLER, second.as_bytes(), now);
    assert!(
        out.iter().all(|o| o.dest == Dest::Conn(CALLER)),
        "nothing forwarded while draining: {out:?}"
    );
    let back = to_conn(&out, CALLER);
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].status(), Some(503));
    assert_eq!(back[0].header("Retry-After"), Some("5"));
    assert_eq!(p.calls_in_progress(), 1, "the refused INVITE is no call");
    // The call in progress: BYE from the callee still crosses.
    let rr = inv.name_addrs("Record-Route").unwrap();
    let bye = String::from_utf8(fixture("rfc3665_3_1_bye.sip"))
        .unwrap()
        .replace(
            "sips:alice@client.atlanta.example.com",
            &inv.name_addrs("Contact").unwrap()[0].uri,
        )
        .replace(
            "<sips:ss2.biloxi.example.com;lr>,<sips:ss1.atlanta.example.com;lr>",
            &format!("<{}>,<{}>", rr[0].uri, rr[1].uri),
        );
    let out = p.on_message(CALLEE, bye.as_bytes(), now);
    let b = to_conn(&out, CALLER);
    assert_eq!(b.len(), 1, "BYE forwarded while draining: {out:?}");
    let out = p.on_message(CALLER, &answer(&b[0], 200, "x", "", ""), now);
    assert_eq!(to_conn(&out, CALLEE)[0].status(), Some(200));
    assert_eq!(p.calls_in_progress(), 0, "the call ended");
}

/// A reload's new routes (`Proxy::set_settings`) take new requests to the
/// new next hop; the edge's own addresses stay those of the listeners.
#[test]
fn reloaded_routes_apply_to_new_requests_and_keep_the_edge_addresses() {
    let (mut p, _rec) = setup();
    let now = Instant::now();
    let new_hop = HopTarget {
        host: "198.51.100.9".into(),
        port: 5061,
        tls_name: "biloxi.example.com".into(),
    };
    let mut s = p.settings.clone();
    s.routes = vec![("biloxi.example.com".into(), new_hop.clone())];
    s.internal.port = 9999;
    p.set_settings(s);
    assert_eq!(p.settings.internal.port, 5061, "listener port kept");
    let out = p.on_message(CALLER, &fixture("rfc3665_3_1_invite.sip"), now);
    assert!(
        out.iter().any(|o| o.dest
            == Dest::Hop {
                side: Side::External,
                hop: new_hop.clone()
            }),
        "INVITE goes to the reloaded route: {out:?}"
    );
}

/// The ACK the caller of the RFC 3665 fixture sends for the 2xx `ok`
/// (callee tag `tag`): through the Record-Route set to its Contact.
fn ack_2xx(ok: &Message, tag: &str) -> String {
    let rr = ok.name_addrs("Record-Route").unwrap();
    let target = ok.name_addrs("Contact").unwrap()[0].uri.clone();
    let routes: String = rr
        .iter()
        .rev()
        .map(|r| format!("Route: <{}>\r\n", r.uri))
        .collect();
    format!(
        "ACK {target} SIP/2.0\r\nVia: SIP/2.0/TLS client.atlanta.example.com:5061;branch=z9hG4bKack2xx\r\n{routes}Max-Forwards: 70\r\nFrom: Alice <sips:alice@atlanta.example.com>;tag=9fxced76sl\r\nTo: Bob <sips:bob@biloxi.example.com>;tag={tag}\r\nCall-ID: 3848276298220188511@atlanta.example.com\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    )
}

/// An answered INVITE of the RFC 3665 fixture (callee tag `tag`): the
/// 2xx as the caller got it.
fn answered(p: &mut Proxy, tag: &str, now: Instant) -> Message {
    let out = p.on_message(CALLER, &fixture("rfc3665_3_1_invite.sip"), now);
    let inv = parse(
        out.iter()
            .find(|o| matches!(o.dest, Dest::Hop { .. }))
            .expect("INVITE forwarded"),
    );
    let out = p.on_message(
        CALLEE,
        &answer(
            &inv,
            200,
            tag,
            "Contact: <sips:bob@198.51.100.2:5061>\r\n",
            SDP_B,
        ),
        now,
    );
    to_conn(&out, CALLER)[0].clone()
}

/// Issue #8 item 4: a 2xx whose ACK never came kept the call (and its
/// pinholes) until the idle or maximum-length timer. Now the call is
/// ended both ways `ack_timeout` after the 2xx (RFC 3261 §13.3.1.4); an
/// ACKed call is left alone.
#[test]
fn a_2xx_without_its_ack_ends_the_call_both_ways() {
    let (mut p, rec) = setup();
    let now = Instant::now();
    let ok = answered(&mut p, "t1", now);
    assert_eq!(ok.status(), Some(200));
    let wait = p.settings.ack_timeout;
    assert!(p.on_tick(now + wait - Duration::from_secs(1)).is_empty());
    let out = p.on_tick(now + wait + Duration::from_millis(1));
    let byes_to_caller = to_conn(&out, CALLER);
    assert!(
        byes_to_caller
            .iter()
            .any(|m| m.method().is_some_and(|x| x.is("BYE"))),
        "BYE to the caller: {out:?}"
    );
    assert!(
        rec.lock()
            .unwrap()
            .calls
            .iter()
            .any(|c| matches!(c, Call::End { .. })),
        "media ended"
    );
    assert_eq!(p.live().2, 0, "dialog gone");

    // An ACKed call stays.
    let (mut p, _) = setup();
    let ok = answered(&mut p, "t2", now);
    let _ = p.on_message(CALLER, ack_2xx(&ok, "t2").as_bytes(), now);
    assert!(p.on_tick(now + wait * 2).is_empty());
    assert_eq!(p.live().2, 1, "an ACKed call is kept");
}

/// Issue #8 item 4: a BYE with the dialog's Call-ID and tags from a
/// connection of another address ended the call's media and was routed
/// on. Now only the dialog's parties speak in it: 403, nothing ended.
#[test]
fn a_bye_from_a_stranger_with_the_dialogs_tags_is_refused() {
    let (mut p, rec) = setup();
    let now = Instant::now();
    let ok = answered(&mut p, "t3", now);
    let _ = p.on_message(CALLER, ack_2xx(&ok, "t3").as_bytes(), now);
    // Another outside party (198.51.100.3), not the callee (198.51.100.2).
    let stranger = PEER_CALLER;
    let bye = "BYE sips:alice@10.77.0.2 SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.3:5061;branch=z9hG4bKstranger\r\nMax-Forwards: 70\r\nFrom: Bob <sips:bob@biloxi.example.com>;tag=t3\r\nTo: Alice <sips:alice@atlanta.example.com>;tag=9fxced76sl\r\nCall-ID: 3848276298220188511@atlanta.example.com\r\nCSeq: 9 BYE\r\nContent-Length: 0\r\n\r\n";
    let out = p.on_message(stranger, bye.as_bytes(), now);
    let r = to_conn(&out, stranger);
    assert_eq!(r.len(), 1, "{out:?}");
    assert_eq!(r[0].status(), Some(403));
    assert!(to_conn(&out, CALLER).is_empty(), "not routed on");
    assert!(
        !rec.lock()
            .unwrap()
            .calls
            .iter()
            .any(|c| matches!(c, Call::End { .. })),
        "media untouched"
    );
    assert_eq!(p.live().2, 1, "dialog kept");
}

/// Issue #11: a Contact token minted by one Proxy (node a, or the run
/// before a restart) routes an in-dialog request at another Proxy that
/// shares the token key (node b), to the party's own Contact; another
/// key, an altered token or a hop the edge must never open are refused.
#[test]
fn a_token_minted_by_one_proxy_routes_at_another_with_the_same_key() {
    const SECRET: &[u8] = b"a secret both ha nodes share, 32+ bytes";
    let keyed = |secret: &[u8]| {
        let (mut p, rec) = setup();
        p.set_token_key(crate::proxy::tokens::TokenKey::from_secret(secret).unwrap());
        (p, rec)
    };
    let now = Instant::now();
    let (mut a, _) = keyed(SECRET);
    let inv = invite(&mut a, now);
    let ok = answer(
        &inv,
        200,
        "314159",
        "Contact: <sips:bob@198.51.100.2:5061>\r\n",
        SDP_B,
    );
    let out = a.on_message(CALLEE, &ok, now);
    let token_uri = to_conn(&out, CALLER)[0].name_addrs("Contact").unwrap()[0]
        .uri
        .clone();
    let rr = inv.name_addrs("Record-Route").unwrap();
    let bye = |ruri: &str, cseq: u32| {
        format!(
            "BYE {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS client.atlanta.example.com:5061;branch=z9hG4bKbye{cseq}\r\nRoute: <{}>\r\nRoute: <{}>\r\nMax-Forwards: 70\r\nFrom: Alice <sips:alice@atlanta.example.com>;tag=9fxced76sl\r\nTo: Bob <sips:bob@biloxi.example.com>;tag=314159\r\nCall-ID: 3848276298220188511@atlanta.example.com\r\nCSeq: {cseq} BYE\r\nContent-Length: 0\r\n\r\n",
            rr[1].uri, rr[0].uri
        )
    };
    let refused = |p: &mut Proxy, ruri: &str| {
        let out = p.on_message(CALLER, bye(ruri, 3).as_bytes(), now);
        assert!(
            !out.iter().any(|o| matches!(o.dest, Dest::Hop { .. })),
            "{ruri}: {out:?}"
        );
        to_conn(&out, CALLER).last().and_then(Message::status)
    };

    // Node b, same key: the BYE leaves for bob's own Contact over TLS.
    let (mut b, _) = keyed(SECRET);
    let out = b.on_message(CALLER, bye(&token_uri, 2).as_bytes(), now);
    let fwd: Vec<&Outgoing> = out
        .iter()
        .filter(|o| {
            o.dest
                == Dest::Hop {
                    side: Side::External,
                    hop: HopTarget {
                        host: "198.51.100.2".into(),
                        port: 5061,
                        // bob's Contact is the configured route's server.
                        tls_name: "biloxi.example.com".into(),
                    },
                }
        })
        .collect();
    assert_eq!(fwd.len(), 1, "BYE routed by node b: {out:?}");
    let m = parse(fwd[0]);
    assert!(m.method().unwrap().is("BYE"));
    assert_eq!(
        m.request_uri().unwrap().unwrap().to_string(),
        "sips:bob@198.51.100.2:5061",
        "token restored at b"
    );
    assert!(m.header("Route").is_none(), "our Routes popped");

    // Another key, an altered token: 481 (the dialog is unknown here).
    let (mut c, _) = keyed(b"some other secret that is 32+ bytes");
    assert_eq!(refused(&mut c, &token_uri), Some(481));
    let (mut d, _) = setup();
    assert_eq!(refused(&mut d, &token_uri), Some(481), "per-process key");
    let at = token_uri.find("sef").unwrap() + 20;
    let mut altered = token_uri.clone().into_bytes();
    altered[at] = if altered[at] == b'0' { b'1' } else { b'0' };
    let altered = String::from_utf8(altered).unwrap();
    assert_eq!(refused(&mut b, &altered), Some(481));

    // A token of this very process that the table forgot (its flow
    // closed) keeps the old answer: it is not "foreign".
    a.on_conn_closed(CALLEE, now);
    assert_eq!(refused(&mut a, &token_uri), Some(481));

    // A sealed token naming the edge host's loopback (a party that gave
    // such a Contact): refused like any such Route or Contact.
    let key = crate::proxy::tokens::TokenKey::from_secret(SECRET).unwrap();
    let lo = format!(
        "sips:{}@10.77.0.1:5061",
        key.seal(Side::External, "sips:x@127.0.0.1:5080")
    );
    assert_eq!(refused(&mut b, &lo), Some(403));
    // An outside party's token used from outside: no outside-to-outside
    // relay.
    let out = b.on_message(PEER_CALLER, bye(&token_uri, 4).as_bytes(), now);
    assert!(!out.iter().any(|o| matches!(o.dest, Dest::Hop { .. })));
    assert_eq!(
        to_conn(&out, PEER_CALLER).last().and_then(Message::status),
        Some(403)
    );
    // A Path (flow) token: the flow lives only where its connection is.
    let path = format!("sips:{}@10.77.0.1:5061", key.seal(Side::External, "flow:7"));
    assert_eq!(refused(&mut b, &path), Some(430));
}

/// A Record-Route or Contact naming a configured next hop's IP must be
/// verified against that hop's configured certificate name, not the IP:
/// a carrier SBC record-routes with its address while its certificate
/// carries its DNS name, and every in-dialog request to it failed the
/// handshake.
#[test]
fn a_next_hop_from_a_message_takes_the_configured_tls_name() {
    let (mut p, _) = setup_access();
    p.settings.access.peers[0].hop = Some(HopTarget {
        host: "sbc.carrier.example".into(),
        port: 5061,
        tls_name: "sbc.carrier.example".into(),
    });
    let name = |p: &Proxy, uri: &str, side: Side| match p.hop_of(uri, side) {
        Ok(Dest::Hop { hop, .. }) => hop.tls_name,
        Ok(other) => panic!("{uri}: {other:?}"),
        Err(_) => panic!("{uri}: refused"),
    };
    p.settings.access.peers[0]
        .addresses
        .push(crate::config::parse_cidr("198.51.100.7").unwrap());
    // A configured route's host and port.
    assert_eq!(
        name(&p, "sip:198.51.100.2:5061;lr;transport=tls", Side::External),
        "biloxi.example.com"
    );
    // Another of the peer's signalling addresses (within its `addresses`).
    assert_eq!(
        name(&p, "sip:198.51.100.7:5061;lr;transport=tls", Side::External),
        "sbc.carrier.example"
    );
    // The registrar's IP literal, configured with its own name.
    assert_eq!(
        name(&p, "sips:10.77.0.10:5061;lr", Side::Internal),
        "pbx.example.com"
    );
    // Same host on another port is another server: no configured name.
    assert_eq!(
        name(&p, "sips:10.77.0.10:5071;lr", Side::Internal),
        "10.77.0.10"
    );
    // Nobody configured: the URI's own host, as before.
    assert_eq!(
        name(&p, "sips:bob@203.0.113.9:5061", Side::External),
        "203.0.113.9"
    );
}

/// Issue #12: over TLS/TCP Timers D and K are 0 (RFC 3261 §17.1.1.2,
/// §17.1.2.2): a client transaction whose final response was forwarded is
/// freed at once, not 64*T1 later; the INVITE's in the Accepted state
/// (RFC 6026) stays, but keeps only the headers an ACK, CANCEL or BYE is
/// derived from, not the whole INVITE with its SDP.
#[test]
fn client_transactions_over_tls_keep_nothing_after_their_final() {
    let (mut p, _rec) = setup();
    let now = Instant::now();
    // INVITE → 486: Completed, Timer D = 0 over TLS.
    let inv = invite(&mut p, now);
    let busy = answer(&inv, 486, "t486", "", "");
    let out = p.on_message(CALLEE, &busy, now);
    assert_eq!(to_conn(&out, CALLER)[0].status(), Some(486));
    assert_eq!(p.live().1, 0, "no client transaction left after a 486");

    // INVITE → 200: Accepted, compacted.
    let (mut p, _rec) = setup();
    let inv = invite(&mut p, now);
    let ok = answer(
        &inv,
        200,
        "314159",
        "Contact: <sips:bob@198.51.100.2:5061>\r\n",
        SDP_B,
    );
    p.on_message(CALLEE, &ok, now);
    assert_eq!(p.live().1, 1, "the Accepted INVITE transaction stays");
    let c = p.client_txs.values().next().expect("client transaction");
    assert!(c.request.body().is_empty(), "no SDP kept");
    assert!(c.request.header("Content-Type").is_none());
    assert!(c.request.header("Max-Forwards").is_none());
    assert!(c.request.header("Call-ID").is_some() && c.request.header("CSeq").is_some());
    // A retransmitted 2xx still goes upstream through it.
    let out = p.on_message(CALLEE, &ok, now);
    assert_eq!(to_conn(&out, CALLER)[0].status(), Some(200));

    // BYE from the callee → 200: Completed, Timer K = 0 over TLS.
    let rr = inv.name_addrs("Record-Route").unwrap();
    let bye = String::from_utf8(fixture("rfc3665_3_1_bye.sip"))
        .unwrap()
        .replace(
            "sips:alice@client.atlanta.example.com",
            &inv.name_addrs("Contact").unwrap()[0].uri,
        )
        .replace(
            "<sips:ss2.biloxi.example.com;lr>,<sips:ss1.atlanta.example.com;lr>",
            &format!("<{}>,<{}>", rr[0].uri, rr[1].uri),
        );
    let out = p.on_message(CALLEE, bye.as_bytes(), now);
    let b = to_conn(&out, CALLER);
    assert_eq!(b.len(), 1, "{out:?}");
    assert_eq!(p.live().1, 2, "the BYE's client transaction is live");
    let out = p.on_message(CALLER, &answer(&b[0], 200, "x", "", ""), now);
    assert_eq!(to_conn(&out, CALLEE)[0].status(), Some(200));
    assert_eq!(p.live().1, 1, "only the Accepted INVITE is left");
}
