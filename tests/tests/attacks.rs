//! Issue #8 ("Hardening"), attacks 1–6 as system tests: the real agent
//! binary in the edge namespace of a `testnet::Topology`, with a fourth
//! namespace on the outside segment (`Topology::add_attacker`,
//! 198.51.100.66) from which the attacks come. Each test checks what the
//! edge does with the kernel's view: the pinholes in the BPF maps
//! (`sip-edge pinhole list --json`), the XDP drop counters (`sip-edge
//! stats --json`), what the parties and the attacker receive, the agent's
//! log and its memory (/proc/PID/status).
//!
//! 1. SDP aimed at a third party, the inside or the edge itself;
//! 2. port abuse in m-lines;
//! 3. NAT-slipstreaming shapes;
//! 4. dialog abuse (a stranger's BYE/CANCEL, no 2xx, no ACK, dropped
//!    connections);
//! 5. RTP injection and source spoofing while a call runs;
//! 6. framing abuse over TLS.
//!
//! Needs root; skips through `testnet::record_skip`. Every loop is
//! bounded in count and time.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use sip_edge::sip::message::Message;
use sip_edge_tests::{
    edge::{self, alice_id, ip, response_for, sa, Edge, Flow, OutCall, PeerUa, EDGE_EXT, WAIT},
    testnet::{self, udp_roundtrip},
    testua::{self, media_of, reply, rtp_packet, Dialog, SdpSpec, UaConn, UaIdentity, UaListener},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The attacker's address, on the outside segment.
const ATTACKER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 66);
/// The edge's media port range (`testua::datapath_config`).
const MEDIA_PORTS: std::ops::RangeInclusive<u16> = 40000..=40999;
/// Rate limits high enough for a test that sends many INVITEs from one
/// source (the limits themselves are `hardening.rs`'s subject).
const LIMITS: &str = "[limits]\ninvite_rate = 1000\ninvite_burst = 1000\nrequest_rate = 2000\nrequest_burst = 2000\n";

/// Rules that refuse an ICE candidate (`EndpointPolicy::check_candidate`);
/// a candidate refused by another rule's address is hidden instead.
const NEVER_A_CANDIDATE: &[&str] = &[
    "loopback",
    "unspecified",
    "broadcast",
    "multicast",
    "edge-address",
];

/// Skips (recorded) when namespaces or BPF are unavailable.
fn skip(name: &str) -> bool {
    match testnet::unavailable_reason() {
        Some(reason) => {
            testnet::record_skip(name, &reason);
            true
        }
        None => false,
    }
}

/// The agent on `testua::edge_config` in `mode`, `[media]` lines
/// `media` and `[proxy]` lines `proxy` added, `extra` (whole tables)
/// appended, with the attacker namespace on the outside segment.
fn start(tag: &str, mode: &str, media: &str, proxy: &str, extra: &str) -> (Edge, String) {
    let mut e = Edge::prepare(tag);
    let atk = e.topo.add_attacker(ATTACKER).expect("attacker namespace");
    let _ = testnet::sh(&[
        "ip", "netns", "exec", &atk, "ethtool", "-K", "eth0", "tx", "off",
    ]);
    let cfg = testua::edge_config(&e.pin_dir, &e.pki, mode)
        .replace("[media]\n", &format!("[media]\n{media}"))
        .replace("[proxy]\n", &format!("[proxy]\n{proxy}"))
        + extra;
    e.write_config(&cfg);
    e.run_agent();
    (e, atk)
}

/// The attacker as a SIP party.
fn mallory() -> UaIdentity {
    UaIdentity {
        aor: "sips:mallory@198.51.100.66".into(),
        contact: "sips:mallory@198.51.100.66:5061".into(),
        via_host: "198.51.100.66:5061".into(),
        display: "Mallory".into(),
    }
}

/// The attacker's TLS connection to the edge's external listener.
async fn connect_mallory(e: &Edge, atk: &str) -> UaConn {
    testua::connect_tls(atk, sa(EDGE_EXT), &e.pki.ca, testua::EDGE_TLS_NAME, WAIT)
        .await
        .expect("the attacker connects to the edge over TLS")
}

/// The agent's log lines with ANSI styling removed.
fn plain_log(e: &Edge) -> Vec<String> {
    e.agent_log()
        .into_iter()
        .map(|l| {
            let mut out = String::with_capacity(l.len());
            let mut it = l.chars().peekable();
            while let Some(c) = it.next() {
                if c == '\u{1b}' {
                    for d in it.by_ref() {
                        if d.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    out.push(c);
                }
            }
            out
        })
        .collect()
}

/// A `sip_edge::security` line of the agent naming every one of `words`.
fn security_line(e: &Edge, words: &[&str]) -> Option<String> {
    plain_log(e)
        .into_iter()
        .find(|l| l.contains("sip_edge::security") && words.iter().all(|w| l.contains(w)))
}

/// The pinhole map must stay empty: `what` names the attempt.
fn assert_no_pinholes(e: &Edge, what: &str) {
    let list = e.pinholes();
    assert!(list.is_empty(), "{what}: pinholes opened: {list:#?}");
}

/// An SDP body for `c` (the session's connection address) with `media`
/// (m-lines and their attributes, CRLF-terminated).
fn sdp_body(c: IpAddr, media: &str) -> String {
    let fam = if c.is_ipv4() { "IP4" } else { "IP6" };
    format!("v=0\r\no=m 1 1 IN {fam} {c}\r\ns=-\r\nc=IN {fam} {c}\r\nt=0 0\r\n{media}")
}

fn c_line(a: IpAddr) -> String {
    let fam = if a.is_ipv4() { "IP4" } else { "IP6" };
    format!("c=IN {fam} {a}\r\n")
}

/// An INVITE from the attacker to an inside user through the edge with
/// `body` as its SDP offer; the edge's final answer.
async fn mallory_invites(conn: &mut UaConn, body: &str) -> Message {
    let mut d = Dialog::outgoing(&mallory(), "sips:alice@203.0.113.1");
    conn.send(&d.invite(body)).await.expect("send INVITE");
    response_for(conn, &d.call_id).await
}

/// The inside next hop for calls from outside: alice's own listener at
/// 10.77.0.2:5061 with the client certificate.
fn inside_next_hop() -> String {
    format!(
        "[proxy.internal_next_hop]\nhost = \"10.77.0.2\"\nport = 5061\ntls_name = \"{}\"\n",
        testua::CLIENT_TLS_NAME
    )
}

/// The next INVITE on `conn` (the ACKs the edge sends for the final
/// responses of earlier ones are skipped), within `WAIT`.
async fn next_invite(conn: &mut UaConn) -> Message {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = conn.recv(left).await.expect("an INVITE");
        if m.method().is_some_and(|x| x.is("INVITE")) {
            return m;
        }
    }
}

/// Alice's listener (the inside next hop).
fn alice_listener(e: &Edge) -> UaListener {
    UaListener::bind(
        &e.topo.client,
        sa("10.77.0.2:5061"),
        &e.pki.client_cert,
        &e.pki.client_key,
    )
    .expect("alice listens")
}

/// Attack 1: SDP naming a third party, the inside or the edge in `c=`,
/// `a=rtcp`, `a=candidate` or MSRP `a=path`, from outside (an offer to
/// the inside) and from inside (an offer to the outside). Each is
/// answered 488 with a Warning naming the rule, nothing is opened in the
/// maps, and the agent logs a `sip_edge::security` line naming the
/// source, the address and the rule. A good offer from the same attacker
/// goes through, so the path is the same one.
#[tokio::test(flavor = "current_thread")]
async fn sdp_aimed_at_a_third_party_the_inside_or_the_edge_opens_nothing() {
    if skip("attacks::sdp_aimed_at_a_third_party_the_inside_or_the_edge_opens_nothing") {
        return;
    }
    let (e, atk) = start(
        &format!("ak1{}", std::process::id()),
        "relay",
        "",
        "",
        &(LIMITS.to_owned() + &inside_next_hop()),
    );
    let alice_l = alice_listener(&e);
    let mut m = connect_mallory(&e, &atk).await;
    let me = IpAddr::V4(ATTACKER);
    // (address, rule) from outside.
    let targets: &[(&str, &str)] = &[
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("10.77.0.2", "private-range"),
        ("10.1.2.3", "private-range"),
        ("172.16.5.5", "private-range"),
        ("192.168.1.1", "private-range"),
        ("169.254.1.1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("224.0.0.1", "multicast"),
        ("239.1.1.1", "multicast"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("fe80::1", "link-local"),
        ("203.0.113.1", "edge-address"),
        ("10.77.0.1", "edge-address"),
        ("::ffff:203.0.113.1", "edge-address"),
        ("198.51.100.2", "not-signalling-source"),
    ];
    let mut refused = 0;
    let mut alice_in: Option<UaConn> = None;
    for &(addr, rule) in targets {
        let a: IpAddr = addr.parse().expect("target");
        let ext_v4 = a.is_ipv4();
        let fam = if ext_v4 { "IP4" } else { "IP6" };
        let cases = [
            ("c=", sdp_body(a, "m=audio 30000 RTP/AVP 0\r\n")),
            (
                "a=rtcp",
                sdp_body(
                    me,
                    &format!("m=audio 30000 RTP/AVP 0\r\na=rtcp:30001 IN {fam} {a}\r\n"),
                ),
            ),
            (
                "a=candidate",
                sdp_body(
                    me,
                    &format!(
                        "m=audio 30000 RTP/AVP 0\r\na=candidate:1 1 UDP 2130706431 {a} 30000 typ host\r\n"
                    ),
                ),
            ),
            (
                "a=path",
                sdp_body(
                    me,
                    &format!(
                        "m=message 30010 TCP/MSRP *\r\na=accept-types:text/plain\r\na=path:msrp://{}:30010/s1;tcp\r\n",
                        if ext_v4 { addr.to_owned() } else { format!("[{addr}]") }
                    ),
                ),
            ),
        ];
        for (field, body) in cases {
            let what = format!("outside offer, {field} {addr}");
            if field == "a=candidate" && !NEVER_A_CANDIDATE.contains(&rule) {
                // A private, link-local or third-party candidate is what a
                // client behind NAT lists: the call goes on, the candidate
                // is hidden (private) or kept (public), never pinholed.
                let mut d = Dialog::outgoing(&mallory(), "sips:alice@203.0.113.1");
                m.send(&d.invite(&body)).await.expect("INVITE");
                if alice_in.is_none() {
                    alice_in = Some(
                        alice_l
                            .accept(WAIT)
                            .await
                            .expect("the edge connects to alice"),
                    );
                }
                let conn = alice_in.as_mut().expect("alice's connection");
                let inv = next_invite(conn).await;
                let seen = String::from_utf8_lossy(inv.body()).into_owned();
                if rule != "not-signalling-source" {
                    assert!(
                        !seen.contains(&format!(" {addr} ")),
                        "{what}: the candidate crossed the edge: {seen}"
                    );
                }
                conn.send(&reply(&inv, 486, "Busy Here", "busy", "", "", ""))
                    .await
                    .expect("486");
                let r = response_for(&mut m, &d.call_id).await;
                assert_eq!(r.status(), Some(486), "{what}");
                assert_no_pinholes(&e, &what);
                continue;
            }
            let r = mallory_invites(&mut m, &body).await;
            assert_eq!(
                r.status(),
                Some(488),
                "{what}: {:?} {:?}",
                r.status(),
                r.header("Warning")
            );
            let warning = r.header("Warning").unwrap_or_default().to_owned();
            assert!(
                warning.contains(rule),
                "{what}: Warning {warning:?} names {rule}"
            );
            assert_no_pinholes(&e, &what);
            refused += 1;
        }
        // The log line names who (the attacker's address), what and the rule.
        let line = security_line(&e, &["198.51.100.66", &format!("rule=\"{rule}\"")]);
        assert!(line.is_some(), "no security log line for {addr} ({rule})");
    }
    eprintln!("{refused} outside offers refused with 488");

    // The same attacker with a sound offer (its own address) gets through
    // to alice: the refusals above are the policy, not a broken path.
    let mut d = Dialog::outgoing(&mallory(), "sips:alice@203.0.113.1");
    m.send(&d.invite(&sdp_body(me, "m=audio 30000 RTP/AVP 0\r\n")))
        .await
        .expect("good INVITE");
    let mut alice_in = match alice_in {
        Some(c) => c,
        None => alice_l
            .accept(WAIT)
            .await
            .expect("the edge connects to alice"),
    };
    let inv = next_invite(&mut alice_in).await;
    alice_in
        .send(&reply(&inv, 486, "Busy Here", "busy", "", "", ""))
        .await
        .expect("486");
    let r = response_for(&mut m, &d.call_id).await;
    assert_eq!(r.status(), Some(486));
    e.assert_empty("after the sound offer's 486");

    // From inside: alice names another inside host, the edge, or anything
    // but her own address.
    let mut bob = PeerUa::skipping_others(&e);
    let mut alice = e.connect_alice().await;
    let inside: &[(&str, &str)] = &[
        ("10.77.0.9", "not-client-source"),
        ("198.51.100.2", "not-client-source"),
        ("127.0.0.1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("169.254.9.9", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("224.0.0.1", "multicast"),
        ("10.77.0.1", "edge-address"),
    ];
    let client = ip("10.77.0.2");
    for &(addr, rule) in inside {
        let a: IpAddr = addr.parse().expect("target");
        for (field, media) in [
            ("c=", format!("m=audio 4000 RTP/AVP 0\r\n{}", c_line(a))),
            (
                "a=rtcp",
                format!(
                    "m=audio 4000 RTP/AVP 0\r\na=rtcp:4001 IN {} {a}\r\n",
                    if a.is_ipv4() { "IP4" } else { "IP6" }
                ),
            ),
        ] {
            let what = format!("inside offer, {field} {addr}");
            let mut d = Dialog::outgoing(&alice_id(), "sips:bob@peer.example.net");
            alice
                .send(&d.invite(&sdp_body(client, &media)))
                .await
                .expect("INVITE");
            let r = response_for(&mut alice, &d.call_id).await;
            assert_eq!(r.status(), Some(488), "{what}: {:?}", r.header("Warning"));
            assert!(
                r.header("Warning").unwrap_or_default().contains(rule),
                "{what}: Warning {:?} names {rule}",
                r.header("Warning")
            );
            assert_no_pinholes(&e, &what);
        }
        assert!(
            security_line(&e, &["10.77.0.2", &format!("rule=\"{rule}\"")]).is_some(),
            "no security log line for the inside offer of {addr} ({rule})"
        );
    }

    // An answer from outside aimed at the inside: the call fails toward
    // alice, bob is sent ACK + BYE, nothing is opened.
    let spec = SdpSpec {
        audio: Some(4000),
        ..SdpSpec::default()
    };
    let mut a = Dialog::outgoing(&alice_id(), "sips:bob@peer.example.net");
    alice
        .send(&a.invite(&testua::sdp("alice", 1, client, &spec)))
        .await
        .expect("INVITE");
    let inv = bob.recv_request("INVITE").await;
    let b = Dialog::incoming(&edge::bob_id(), &inv).expect("bob's dialog");
    bob.conn()
        .send(&reply(
            &inv,
            200,
            "OK",
            &b.local_tag,
            &edge::contact(&b.me),
            "application/sdp",
            &sdp_body(
                ip("198.51.100.2"),
                "m=audio 5000 RTP/AVP 0\r\nc=IN IP4 10.77.0.2\r\n",
            ),
        ))
        .await
        .expect("200");
    let r = response_for(&mut alice, &a.call_id).await;
    assert_eq!(r.status(), Some(488), "a refused answer fails the call");
    bob.recv_request("BYE").await;
    assert_no_pinholes(&e, "answer naming the inside");
    assert!(security_line(&e, &["198.51.100.2", "rule=\"private-range\""]).is_some());
    drop(alice_l);
}

/// Attack 2: ports in m-lines. A port below 1024, the edge's own
/// signalling or admin port at the edge's address, ports outside 1–65535
/// or not numbers, and 1,000 m-lines are refused (488) with nothing
/// opened; port 0 opens nothing for its stream while the call goes on;
/// and in nat mode, where the edge keeps the client's address but not
/// its port, a client's m-port equal to the edge's SIP port never makes
/// the edge open its own SIP port.
#[tokio::test(flavor = "current_thread")]
async fn port_abuse_in_m_lines_is_refused_and_port_0_opens_nothing() {
    if skip("attacks::port_abuse_in_m_lines_is_refused_and_port_0_opens_nothing") {
        return;
    }
    let (e, atk) = start(
        &format!("ak2{}", std::process::id()),
        "nat",
        "",
        "",
        &(LIMITS.to_owned() + &inside_next_hop()),
    );
    let alice_l = alice_listener(&e);
    let mut m = connect_mallory(&e, &atk).await;
    let me = IpAddr::V4(ATTACKER);
    let edge_pub = ip("203.0.113.1");
    let edge_int = ip("10.77.0.1");
    let cases: Vec<(String, String)> = vec![
        (
            "port 1023".into(),
            sdp_body(me, "m=audio 1023 RTP/AVP 0\r\n"),
        ),
        ("port 1".into(), sdp_body(me, "m=audio 1 RTP/AVP 0\r\n")),
        (
            "RTCP port 80".into(),
            sdp_body(me, "m=audio 30000 RTP/AVP 0\r\na=rtcp:80\r\n"),
        ),
        (
            "MSRP port 443".into(),
            sdp_body(
                me,
                "m=message 443 TCP/MSRP *\r\na=path:msrp://198.51.100.66:443/s;tcp\r\n",
            ),
        ),
        (
            "the edge's SIP port".into(),
            sdp_body(edge_pub, "m=audio 5061 RTP/AVP 0\r\n"),
        ),
        (
            "the edge's inside SIP port".into(),
            sdp_body(edge_int, "m=audio 5061 RTP/AVP 0\r\n"),
        ),
        (
            "the edge's admin port".into(),
            sdp_body(edge_pub, "m=audio 22 RTP/AVP 0\r\n"),
        ),
        (
            "a media port of the edge".into(),
            sdp_body(edge_pub, "m=audio 40000 RTP/AVP 0\r\n"),
        ),
        (
            "port 65536".into(),
            sdp_body(me, "m=audio 65536 RTP/AVP 0\r\n"),
        ),
        (
            "port 99999".into(),
            sdp_body(me, "m=audio 99999 RTP/AVP 0\r\n"),
        ),
        ("port -1".into(), sdp_body(me, "m=audio -1 RTP/AVP 0\r\n")),
        ("port abc".into(), sdp_body(me, "m=audio abc RTP/AVP 0\r\n")),
        (
            "port 4294967296".into(),
            sdp_body(me, "m=audio 4294967296 RTP/AVP 0\r\n"),
        ),
        (
            "RTCP port 70000".into(),
            sdp_body(me, "m=audio 30000 RTP/AVP 0\r\na=rtcp:70000\r\n"),
        ),
        (
            "1,000 m-lines".into(),
            sdp_body(me, &"m=audio 30000 RTP/AVP 0\r\n".repeat(1000)),
        ),
        (
            "1,000 m-lines, distinct ports".into(),
            sdp_body(
                me,
                &(0..1000)
                    .map(|i| format!("m=audio {} RTP/AVP 0\r\n", 20000 + 2 * i))
                    .collect::<String>(),
            ),
        ),
    ];
    for (what, body) in &cases {
        let r = mallory_invites(&mut m, body).await;
        assert_eq!(
            r.status(),
            Some(488),
            "{what}: got {:?} {:?}",
            r.status(),
            r.header("Warning")
        );
        assert_no_pinholes(&e, what);
    }

    // Port 0 (RFC 3264 §6: a disabled stream) opens nothing; the call
    // itself is forwarded.
    let mut d = Dialog::outgoing(&mallory(), "sips:alice@203.0.113.1");
    m.send(&d.invite(&sdp_body(
        me,
        "m=audio 0 RTP/AVP 0\r\nm=video 0 RTP/AVP 96\r\n",
    )))
    .await
    .expect("INVITE");
    let mut alice_in = alice_l.accept(WAIT).await.expect("edge connects to alice");
    let inv = alice_in
        .recv_request("INVITE", WAIT)
        .await
        .expect("INVITE with port 0");
    assert_no_pinholes(&e, "port 0 offer");
    let b = Dialog::incoming(&alice_id(), &inv).expect("dialog");
    alice_in
        .send(&reply(
            &inv,
            200,
            "OK",
            &b.local_tag,
            &edge::contact(&b.me),
            "application/sdp",
            &sdp_body(
                ip("10.77.0.2"),
                "m=audio 0 RTP/AVP 0\r\nm=video 0 RTP/AVP 96\r\n",
            ),
        ))
        .await
        .expect("200");
    let r = response_for(&mut m, &d.call_id).await;
    assert_eq!(r.status(), Some(200));
    assert_no_pinholes(&e, "port 0 answer");
    d.on_invite_response(&r).expect("200");
    m.send(&d.ack("", "")).await.expect("ACK");

    // nat mode from inside: m=audio 5061 / 5060 (the client's own ports)
    // get an edge port from the media range, never the edge's SIP port.
    let mut bob = PeerUa::skipping_others(&e);
    let mut alice = e.connect_alice().await;
    for port in [5061u16, 5060] {
        let spec = SdpSpec {
            audio: Some(port),
            ..SdpSpec::default()
        };
        let answer = SdpSpec {
            audio: Some(5000),
            ..SdpSpec::default()
        };
        let call = edge::call_out(&mut alice, &mut bob, &spec, &answer, Flow::Refusable)
            .await
            .unwrap_or_else(|c| panic!("call with m-port {port}: {c}"));
        let offered = media_of(&call.offer, "audio").expect("offer audio");
        assert!(
            MEDIA_PORTS.contains(&offered.addr.port()),
            "nat mode offered edge port {} for the client's m-port {port}",
            offered.addr.port()
        );
        for p in e.pinholes() {
            let local = p["local"].as_str().unwrap_or_default();
            let at_edge = local.starts_with("203.0.113.1:") || local.starts_with("10.77.0.1:");
            assert!(
                !at_edge
                    || local
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok())
                        .is_some_and(|p| MEDIA_PORTS.contains(&p)),
                "a pinhole on an edge service port: {p:#}"
            );
        }
        let mut a = call.a;
        alice.send(&a.request("BYE", "", "")).await.expect("BYE");
        let bye = bob.recv_request("BYE").await;
        bob.conn()
            .send(&reply(&bye, 200, "OK", &call.b.local_tag, "", "", ""))
            .await
            .expect("200 BYE");
        let _ = response_for(&mut alice, &a.call_id).await;
    }
    e.assert_empty("nat calls after BYE");
}

/// Reads what arrives on `s` until EOF, an error or `wait`; returns the
/// bytes and whether the connection was closed.
async fn drain<S: tokio::io::AsyncRead + Unpin>(s: &mut S, wait: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

/// A raw TLS stream (no SIP framing) from `local` in `ns` to the edge's
/// external listener.
async fn raw_tls(
    e: &Edge,
    ns: &str,
    local: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let std = e
        .topo
        .tcp_connect(ns, local, sa(EDGE_EXT))
        .expect("TCP to the edge");
    std.set_nonblocking(true).expect("non-blocking");
    std.set_nodelay(true).expect("nodelay");
    let tcp = tokio::net::TcpStream::from_std(std).expect("tokio stream");
    let cfg = testua::client_config(&e.pki.ca).expect("client config");
    let name = rustls_pki_types::ServerName::try_from(testua::EDGE_TLS_NAME).expect("name");
    tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("TLS handshake")
}

/// A REGISTER for `aor` from the attacker with a Contact of `contact`.
fn register_with_contact(contact: &str) -> String {
    format!(
        "REGISTER sips:corp.example SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.66:5061;branch={};rport\r\nMax-Forwards: 70\r\nFrom: <sips:mallory@corp.example>;tag={}\r\nTo: <sips:mallory@corp.example>\r\nCall-ID: {}\r\nCSeq: 1 REGISTER\r\nContact: <{contact}>\r\nExpires: 3600\r\nContent-Length: 0\r\n\r\n",
        testua::unique("z9hG4bK"),
        testua::unique("t"),
        testua::unique("reg-")
    )
}

/// Attack 3: NAT-slipstreaming shapes (SIP carried where an ALG would
/// find it but a SIP endpoint never puts it). An HTTP POST whose body is
/// a REGISTER and an INVITE naming an inside host, sent on the edge's TLS
/// port after the handshake and as plaintext; the same bytes sent by an
/// inside "browser" to an outside web server through the edge; a
/// REGISTER whose Contact names an inside host:port. None of them opens
/// a pinhole or reaches the inside as SIP.
#[tokio::test(flavor = "current_thread")]
async fn nat_slipstreaming_shapes_open_no_pinhole() {
    if skip("attacks::nat_slipstreaming_shapes_open_no_pinhole") {
        return;
    }
    let (e, atk) = start(
        &format!("ak3{}", std::process::id()),
        "relay",
        "",
        "",
        &(LIMITS.to_owned()
            + &inside_next_hop()
            + "[access]\nserved_domains = [\"corp.example\"]\nremote_users = true\n"),
    );
    let alice_l = alice_listener(&e);
    // The SIP an ALG would act on: a REGISTER and an INVITE whose Contact
    // and SDP name an inside service (alice's host, port 3306).
    let sip = format!(
        "{}INVITE sip:x@203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/TCP 10.77.0.2:3306;branch=z9hG4bKslip\r\nFrom: <sip:x@10.77.0.2>;tag=1\r\nTo: <sip:x@203.0.113.1>\r\nCall-ID: slip\r\nCSeq: 1 INVITE\r\nContact: <sip:x@10.77.0.2:3306;transport=tcp>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{}",
        register_with_contact("sip:x@10.77.0.2:3306;transport=tcp"),
        sdp_body(ip("10.77.0.2"), "m=audio 3306 RTP/AVP 0\r\n").len(),
        sdp_body(ip("10.77.0.2"), "m=audio 3306 RTP/AVP 0\r\n")
    );
    let post = format!(
        "POST /slip HTTP/1.1\r\nHost: 203.0.113.1:5061\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{sip}",
        sip.len()
    );
    let from = SocketAddr::new(IpAddr::V4(ATTACKER), 0);

    // a. After the TLS handshake: the edge refuses to parse HTTP as SIP.
    let mut tls = raw_tls(&e, &atk, from).await;
    tls.write_all(post.as_bytes()).await.expect("POST over TLS");
    tls.flush().await.expect("flush");
    let (got, closed) = drain(&mut tls, Duration::from_secs(4)).await;
    let text = String::from_utf8_lossy(&got);
    eprintln!(
        "HTTP over TLS got {:?} (closed: {closed})",
        text.lines().next()
    );
    assert!(
        !text.contains("SIP/2.0 200") && !text.contains("SIP/2.0 100"),
        "HTTP over TLS was taken for SIP: {text}"
    );
    assert!(closed, "the connection carrying HTTP stays open");
    assert_no_pinholes(&e, "HTTP POST over TLS");

    // b. Plaintext on the TLS port: no handshake, nothing parsed.
    let mut plain = e
        .topo
        .tcp_connect(&atk, from, sa(EDGE_EXT))
        .expect("TCP to the edge");
    plain
        .set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    plain.write_all(post.as_bytes()).expect("plaintext POST");
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(
        !String::from_utf8_lossy(&buf).contains("SIP/2.0"),
        "plaintext on the TLS port got a SIP answer"
    );
    assert_no_pinholes(&e, "plaintext POST on the TLS port");

    // c. The victim's browser inside posts to the attacker's web server
    // through the edge (the classic slipstream: an ALG on the path reads
    // the REGISTER in the TCP stream). The edge's agent never sees it.
    testnet::sh(&[
        "ip",
        "-n",
        &atk,
        "route",
        "add",
        "10.77.0.0/16",
        "via",
        "203.0.113.1",
    ])
    .expect("attacker route to the inside");
    let web = e
        .topo
        .tcp_listen(&atk, sa("198.51.100.66:5060"))
        .expect("attacker's web server");
    let mut browser = e
        .topo
        .tcp_connect(&e.topo.client, sa("10.77.0.2:0"), sa("198.51.100.66:5060"))
        .expect("the browser reaches the attacker through the edge");
    // Sent in two segments, the second starting at the REGISTER line, as
    // the attack aligns it to a packet boundary.
    let split = post.find("REGISTER").unwrap_or(0);
    browser.write_all(&post.as_bytes()[..split]).expect("head");
    browser.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(50));
    browser.write_all(&post.as_bytes()[split..]).expect("body");
    let (mut srv, _) = web.accept().expect("accept");
    srv.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut seen = vec![0u8; post.len()];
    srv.read_exact(&mut seen)
        .expect("the web server gets the POST");
    assert_eq!(seen, post.as_bytes(), "the edge left the POST alone");
    assert_no_pinholes(&e, "slipstream POST through the edge");

    // d. A REGISTER whose Contact names an inside host:port: forwarded to
    // the registrar with the Contact replaced by the edge's, and no pinhole.
    let mut m = connect_mallory(&e, &atk).await;
    m.send(&register_with_contact("sip:x@10.77.0.2:3306;transport=tcp"))
        .await
        .expect("REGISTER");
    let mut registrar = alice_l.accept(WAIT).await.expect("edge connects inside");
    let reg = registrar
        .recv_request("REGISTER", WAIT)
        .await
        .expect("the registrar gets the REGISTER");
    let contact = reg.header("Contact").unwrap_or_default().to_owned();
    assert!(
        !contact.contains("10.77.0.2:3306"),
        "the inside host:port crossed the edge in Contact: {contact}"
    );
    registrar
        .send(&reply(
            &reg,
            200,
            "OK",
            "reg",
            &format!("Contact: {contact};expires=3600\r\n"),
            "",
            "",
        ))
        .await
        .expect("200 REGISTER");
    let ok = m.recv_status(200, WAIT).await.expect("200 to the attacker");
    assert!(ok.header("Contact").is_some());
    assert_no_pinholes(&e, "REGISTER naming an inside host:port");
    // And an HTTP request line on an already working SIP connection ends it.
    m.send("GET / HTTP/1.1\r\nHost: 203.0.113.1\r\n\r\n")
        .await
        .expect("GET");
    match m.recv(Duration::from_secs(4)).await {
        Ok(r) => assert!(
            r.status().is_some_and(|c| c >= 400),
            "HTTP request line answered {:?}",
            r.status()
        ),
        Err(testua::UaError::Closed { .. }) | Err(testua::UaError::Io { .. }) => {}
        Err(err) => panic!("HTTP request line on a SIP connection: {err}"),
    }
    assert_no_pinholes(&e, "HTTP request line on a SIP connection");
}

/// Send until received (first packets may meet an unresolved neighbour).
fn flows(from: &UdpSocket, to: SocketAddr, rx: &UdpSocket, payload: &[u8]) -> bool {
    (0..20).any(|_| udp_roundtrip(from, to, rx, payload).is_some())
}

/// An established alice→bob call with its media ports.
struct Call {
    call: OutCall,
    /// Edge address:port alice sends to.
    edge_int: SocketAddr,
    /// Edge address:port bob sends to.
    edge_pub: SocketAddr,
}

async fn call(alice: &mut UaConn, bob: &mut PeerUa, a_port: u16, b_port: u16) -> Call {
    let spec = |p| SdpSpec {
        audio: Some(p),
        ..SdpSpec::default()
    };
    let call = edge::call_out(alice, bob, &spec(a_port), &spec(b_port), Flow::Refusable)
        .await
        .unwrap_or_else(|c| panic!("call refused with {c}"));
    let edge_int = media_of(&call.answer, "audio").expect("answer").addr;
    let edge_pub = media_of(&call.offer, "audio").expect("offer").addr;
    Call {
        call,
        edge_int,
        edge_pub,
    }
}

/// Media flows both ways through the call's pinholes.
fn media_both_ways(e: &Edge, c: &Call, a: &UdpSocket, b: &UdpSocket, what: &str) {
    assert!(
        flows(a, c.edge_int, b, format!("{what} up").as_bytes()),
        "{what}: alice→bob"
    );
    assert!(
        flows(b, c.edge_pub, a, format!("{what} down").as_bytes()),
        "{what}: bob→alice"
    );
    assert!(
        e.has_rule_at(c.edge_int) && e.has_rule_at(c.edge_pub),
        "{what}: pinholes"
    );
}

/// Waits (bounded) until no rule matches at `c`'s ports; the time it took.
fn gone_within(e: &Edge, c: &Call, within: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    while e.has_rule_at(c.edge_int) || e.has_rule_at(c.edge_pub) {
        assert!(
            t0.elapsed() < within,
            "{what}: pinholes still there after {within:?}: {:#?}",
            e.pinholes()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    t0.elapsed()
}

/// Attack 4: dialog abuse. A stranger's BYE (wrong tags; right tags from
/// another connection) and CANCEL (wrong branch; right branch from
/// another connection) end nothing: media keeps flowing, pinholes stay.
/// An INVITE that never gets a 2xx opens nothing lasting (Timer C, `[proxy]
/// timer_c_secs`, ends its early media); a 2xx whose ACK
/// never comes is torn down (`[proxy] ack_timeout_secs`, RFC 3261
/// §13.3.1.4); a call whose party's connection drops loses its pinholes
/// once its media stops.
#[tokio::test(flavor = "current_thread")]
async fn a_strangers_bye_or_cancel_ends_nothing_and_half_made_dialogs_go() {
    if skip("attacks::a_strangers_bye_or_cancel_ends_nothing_and_half_made_dialogs_go") {
        return;
    }
    let (e, atk) = start(
        &format!("ak4{}", std::process::id()),
        "relay",
        "idle_timeout_secs = 4\nunused_timeout_secs = 3\n",
        "ack_timeout_secs = 3\ntimer_c_secs = 4\n",
        LIMITS,
    );
    let mut bob = PeerUa::skipping_others(&e);
    let mut alice = e.connect_alice().await;
    let mut m = connect_mallory(&e, &atk).await;
    let a_rtp = e.udp(&e.topo.client, "10.77.0.2:4000");
    let b_rtp = e.udp(&e.topo.peer, "198.51.100.2:5000");
    let c = call(&mut alice, &mut bob, 4000, 5000).await;
    media_both_ways(&e, &c, &a_rtp, &b_rtp, "call up");
    // What alice's Contact looks like from outside (an edge flow token).
    let alice_target = c.call.b.remote_target.clone();

    // a. BYE with wrong tags from the attacker.
    let bye_wrong = format!(
        "BYE {alice_target} SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.66:5061;branch={};rport\r\nMax-Forwards: 70\r\nFrom: <sips:bob@peer.example.net>;tag=wrong1\r\nTo: <sips:alice@peer.example.net>;tag=wrong2\r\nCall-ID: {}\r\nCSeq: 9999 BYE\r\nContent-Length: 0\r\n\r\n",
        testua::unique("z9hG4bK"),
        c.call.a.call_id
    );
    m.send(&bye_wrong).await.expect("stranger's BYE");
    // If it reaches alice, her UA answers 481 (no such dialog).
    if let Ok(req) = alice.recv(Duration::from_secs(1)).await {
        if req.method().is_some_and(|x| x.is("BYE")) {
            alice
                .send(&reply(
                    &req,
                    481,
                    "Call/Transaction Does Not Exist",
                    "x",
                    "",
                    "",
                    "",
                ))
                .await
                .expect("481");
        }
    }
    let _ = m.recv(Duration::from_secs(2)).await;
    media_both_ways(&e, &c, &a_rtp, &b_rtp, "after a BYE with wrong tags");

    // b. BYE with the dialog's own Call-ID and tags, from the attacker's
    // connection (an ex-participant, or whoever learnt them).
    let bye_right = format!(
        "BYE {alice_target} SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.66:5061;branch={};rport\r\nMax-Forwards: 70\r\nFrom: <sips:bob@peer.example.net>;tag={}\r\nTo: <sips:bob@peer.example.net>;tag={}\r\nCall-ID: {}\r\nCSeq: 9999 BYE\r\nContent-Length: 0\r\n\r\n",
        testua::unique("z9hG4bK"),
        c.call.b.local_tag,
        c.call.a.local_tag,
        c.call.a.call_id
    );
    m.send(&bye_right)
        .await
        .expect("stranger's BYE with the right tags");
    let r = m.recv(WAIT).await.expect("an answer to the stranger's BYE");
    eprintln!("stranger's BYE with the dialog's tags: {:?}", r.status());
    assert!(
        r.status().is_some_and(|s| s >= 400),
        "the stranger's BYE was accepted: {:?}",
        r.status()
    );
    if let Ok(req) = alice.recv(Duration::from_millis(500)).await {
        panic!("the stranger's BYE reached alice: {:?}", req.method());
    }
    media_both_ways(
        &e,
        &c,
        &a_rtp,
        &b_rtp,
        "after a stranger's BYE with the right tags",
    );

    // c. CANCEL: a second call rings; the attacker cancels it with a
    // wrong branch, then with alice's own branch and Via.
    let spec = |p| SdpSpec {
        audio: Some(p),
        ..SdpSpec::default()
    };
    let mut a2 = Dialog::outgoing(&alice_id(), "sips:bob@peer.example.net");
    let inv_text = a2.invite(&testua::sdp("alice", 1, ip("10.77.0.2"), &spec(4010)));
    alice.send(&inv_text).await.expect("INVITE 2");
    let inv2 = bob.recv_request("INVITE").await;
    let b2 = Dialog::incoming(&edge::bob_id(), &inv2).expect("dialog 2");
    bob.conn()
        .send(&reply(
            &inv2,
            180,
            "Ringing",
            &b2.local_tag,
            &edge::contact(&b2.me),
            "",
            "",
        ))
        .await
        .expect("180");
    alice.recv_status(180, WAIT).await.expect("alice rings");
    let mut cancel_ok = a2.cancel().expect("cancel");
    let wrong = cancel_ok.replace("branch=z9hG4bK", "branch=z9hG4bKwrong");
    m.send(&wrong).await.expect("stranger's CANCEL");
    let r = m.recv(WAIT).await.expect("answer to a wrong CANCEL");
    assert_eq!(r.status(), Some(481), "CANCEL with a wrong branch");
    // Alice's own CANCEL bytes, sent by the attacker.
    cancel_ok = cancel_ok.replace("\r\nMax-Forwards", ";received=10.77.0.2\r\nMax-Forwards");
    m.send(&cancel_ok)
        .await
        .expect("stranger's CANCEL, alice's branch");
    let r = m.recv(WAIT).await.expect("answer to the stranger's CANCEL");
    eprintln!("stranger's CANCEL with alice's branch: {:?}", r.status());
    assert!(
        r.status().is_some_and(|s| s >= 400),
        "the stranger's CANCEL was accepted: {:?}",
        r.status()
    );
    if let Ok(req) = bob.conn().recv(Duration::from_millis(700)).await {
        assert!(
            !req.method().is_some_and(|x| x.is("CANCEL")),
            "the stranger's CANCEL reached bob"
        );
    }
    // The call still completes.
    bob.conn()
        .send(&reply(
            &inv2,
            200,
            "OK",
            &b2.local_tag,
            &edge::contact(&b2.me),
            "application/sdp",
            &testua::sdp("bob", 1, ip("198.51.100.2"), &spec(5010)),
        ))
        .await
        .expect("200");
    let ok = response_for(&mut alice, &a2.call_id).await;
    assert_eq!(
        ok.status(),
        Some(200),
        "call 2 completes despite the stranger"
    );
    a2.on_invite_response(&ok).expect("200");
    alice.send(&a2.ack("", "")).await.expect("ACK 2");
    bob.recv_request("ACK").await;
    alice.send(&a2.request("BYE", "", "")).await.expect("BYE 2");
    let bye = bob.recv_request("BYE").await;
    bob.conn()
        .send(&reply(&bye, 200, "OK", &b2.local_tag, "", "", ""))
        .await
        .expect("200 BYE");
    let _ = response_for(&mut alice, &a2.call_id).await;
    media_both_ways(&e, &c, &a_rtp, &b_rtp, "call 1 after call 2");

    // Call 1 ends with alice's own BYE.
    let mut a1 = c.call.a.clone();
    alice.send(&a1.request("BYE", "", "")).await.expect("BYE 1");
    let bye = bob.recv_request("BYE").await;
    bob.conn()
        .send(&reply(&bye, 200, "OK", &c.call.b.local_tag, "", "", ""))
        .await
        .expect("200 BYE");
    let _ = response_for(&mut alice, &a1.call_id).await;
    e.assert_empty("calls 1 and 2 ended");

    // d. An INVITE that never gets a 2xx: early media (183 with SDP)
    // opens pinholes; bob never answers: they go when the edge gives the
    // branch up (Timer C, `timer_c_secs = 4` here, 181 s by default).
    let mut a3 = Dialog::outgoing(&alice_id(), "sips:bob@peer.example.net");
    alice
        .send(&a3.invite(&testua::sdp("alice", 1, ip("10.77.0.2"), &spec(4020))))
        .await
        .expect("INVITE 3");
    let inv3 = bob.recv_request("INVITE").await;
    assert_no_pinholes(&e, "an offer alone");
    let b3 = Dialog::incoming(&edge::bob_id(), &inv3).expect("dialog 3");
    bob.conn()
        .send(&reply(
            &inv3,
            183,
            "Session Progress",
            &b3.local_tag,
            &edge::contact(&b3.me),
            "application/sdp",
            &testua::sdp("bob", 1, ip("198.51.100.2"), &spec(5020)),
        ))
        .await
        .expect("183");
    alice.recv_status(183, WAIT).await.expect("alice gets 183");
    assert!(!e.pinholes().is_empty(), "early media opens pinholes");
    let t0 = Instant::now();
    e.assert_empty_within("an INVITE without a 2xx", Duration::from_secs(9));
    let cancel = bob.recv_request("CANCEL").await;
    assert_eq!(
        cancel.call_id().ok(),
        Some(a3.call_id.as_str()),
        "Timer C cancels the branch"
    );
    eprintln!(
        "early pinholes of an unanswered INVITE gone after {:?}",
        t0.elapsed()
    );
    let _ = a3;

    // e. A 2xx whose ACK never comes, while media flows both ways (so no
    // idle timer can be what ends it).
    let mut a4 = Dialog::outgoing(&alice_id(), "sips:bob@peer.example.net");
    alice
        .send(&a4.invite(&testua::sdp("alice", 1, ip("10.77.0.2"), &spec(4000))))
        .await
        .expect("INVITE 4");
    let inv4 = bob.recv_request("INVITE").await;
    let b4 = Dialog::incoming(&edge::bob_id(), &inv4).expect("dialog 4");
    bob.conn()
        .send(&reply(
            &inv4,
            200,
            "OK",
            &b4.local_tag,
            &edge::contact(&b4.me),
            "application/sdp",
            &testua::sdp("bob", 1, ip("198.51.100.2"), &spec(5000)),
        ))
        .await
        .expect("200");
    let ok = response_for(&mut alice, &a4.call_id).await;
    a4.on_invite_response(&ok).expect("200");
    let c4 = Call {
        edge_int: media_of(ok.body(), "audio").expect("answer").addr,
        edge_pub: media_of(inv4.body(), "audio").expect("offer").addr,
        call: OutCall {
            a: a4.clone(),
            b: b4.clone(),
            offer: inv4.body().to_vec(),
            answer: ok.body().to_vec(),
        },
    };
    let stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let (a, b) = (
            a_rtp.try_clone().expect("clone"),
            b_rtp.try_clone().expect("clone"),
        );
        let (to_b, to_a, stop) = (c4.edge_int, c4.edge_pub, stop.clone());
        std::thread::spawn(move || {
            let mut seq = 0u16;
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                let _ = a.send_to(&rtp_packet(seq, 0xa11ce), to_b);
                let _ = b.send_to(&rtp_packet(seq, 0xb0b), to_a);
                seq = seq.wrapping_add(1);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        e.packets_at(c4.edge_int) > 0,
        "media flows in the un-ACKed call"
    );
    // ack_timeout_secs = 3 (see the configuration): gone within 3 s + ticks.
    let took = gone_within(&e, &c4, Duration::from_secs(9), "2xx without ACK");
    stop.store(true, Ordering::Relaxed);
    let _ = pump.join();
    eprintln!("an un-ACKed 2xx's pinholes went after {took:?}");
    // Both parties are told (BYE).
    let bye = bob.recv_request("BYE").await;
    bob.conn()
        .send(&reply(&bye, 200, "OK", &b4.local_tag, "", "", ""))
        .await
        .expect("200 BYE");
    let bye = alice
        .recv_request("BYE", WAIT)
        .await
        .expect("alice gets a BYE");
    assert_eq!(bye.call_id().ok(), Some(a4.call_id.as_str()));
    alice
        .send(&reply(&bye, 200, "OK", &a4.local_tag, "", "", ""))
        .await
        .expect("200 BYE");
    assert!(
        security_line(&e, &["ack"]).is_some() || plain_log(&e).iter().any(|l| l.contains("no ACK")),
        "the agent says why it ended the call"
    );

    // f. A party's connection drops mid-call and nothing is sent any
    // more: the pinholes expire by the idle timer (4 s here) and the
    // other party is sent a BYE. (The call is not ended at the close
    // itself: the edge closes idle client connections after
    // `[proxy] idle_timeout_secs`, mid-call too.)
    let c5 = call(&mut alice, &mut bob, 4030, 5030).await;
    let a5 = e.udp(&e.topo.client, "10.77.0.2:4030");
    let b5 = e.udp(&e.topo.peer, "198.51.100.2:5030");
    media_both_ways(&e, &c5, &a5, &b5, "call 5 up");
    drop(alice);
    let took = gone_within(
        &e,
        &c5,
        Duration::from_secs(12),
        "a dropped connection's call",
    );
    eprintln!("a dropped connection's pinholes went after {took:?}");
    let bye = bob.recv_request("BYE").await;
    assert_eq!(
        bye.call_id().ok(),
        Some(c5.call.a.call_id.as_str()),
        "BYE for call 5"
    );
    let _ = m;
}

/// Sends one IPv4/UDP datagram with a forged source through a raw socket
/// (`IPPROTO_RAW`, so the header is ours) from the calling thread's
/// namespace.
struct RawUdp {
    fd: std::os::fd::OwnedFd,
}

impl RawUdp {
    fn new() -> std::io::Result<RawUdp> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh valid fd.
        Ok(RawUdp {
            fd: unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
        })
    }

    fn send(&self, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
            return Err(std::io::Error::other("IPv4 only"));
        };
        let udp_len = 8 + payload.len();
        let total = 20 + udp_len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&s.octets());
        p[16..20].copy_from_slice(&d.octets());
        let mut sum = 0u32;
        for c in p[..20].chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        p[20..22].copy_from_slice(&src.port().to_be_bytes());
        p[22..24].copy_from_slice(&dst.port().to_be_bytes());
        p[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        // UDP checksum over the pseudo-header and the datagram.
        let mut sum = 0u32;
        for c in s.octets().chunks(2).chain(d.octets().chunks(2)) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        sum += 17 + udp_len as u32;
        for c in p[20..].chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let ck = !(sum as u16);
        p[26..28].copy_from_slice(&(if ck == 0 { 0xffff } else { ck }).to_be_bytes());
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(d.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid fd, buffer and sockaddr_in of the right size.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                p.as_ptr().cast(),
                p.len(),
                0,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Tag of every attacker payload, so a receiver can tell one.
const ATTACK_TAG: &[u8] = b"ATTACK!!";

/// Counts what a media socket receives: the party's own RTP (by SSRC)
/// and attacker-tagged datagrams, until `stop`.
fn receiver(
    sock: UdpSocket,
    ssrc: u32,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let (mut own, mut attack) = (0u64, 0u64);
        let mut buf = [0u8; 2048];
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            match sock.recv_from(&mut buf) {
                Ok((n, _)) if buf[..n].starts_with(ATTACK_TAG) => attack += 1,
                Ok((172, _)) if buf[8..12] == ssrc.to_be_bytes() => own += 1,
                Ok(_) => {}
                Err(_) if stop.load(Ordering::Relaxed) => break,
                Err(_) => {}
            }
        }
        (own, attack)
    })
}

/// The sum of the XDP drop reasons (`drop_*`), and every reason.
fn drops(e: &Edge) -> (u64, Vec<(String, u64)>) {
    let v: serde_json::Value = serde_json::from_str(&e.cli(&["stats"])).expect("stats json");
    let list: Vec<(String, u64)> = v["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .filter_map(|r| {
            let name = r["reason"].as_str()?.to_owned();
            Some((name, r["packets"].as_u64().unwrap_or(0)))
        })
        .collect();
    (
        list.iter()
            .filter(|(n, _)| n.starts_with("drop_"))
            .map(|(_, n)| n)
            .sum(),
        list,
    )
}

/// Attack 5: RTP injection while a latching call carries media both
/// ways. The attacker sprays every port of the media range at the edge's
/// public address and spoofs the peer's source address with a wrong port
/// at the call's own edge port. It receives nothing; neither party
/// receives an attacker packet; the call loses < 0.1%; the latch stays on
/// the peer; every sprayed packet is counted as an XDP drop.
#[test]
fn rtp_injection_and_source_spoofing_are_dropped_in_xdp() {
    if skip("attacks::rtp_injection_and_source_spoofing_are_dropped_in_xdp") {
        return;
    }
    let (e, atk) = start(
        &format!("ak5{}", std::process::id()),
        "relay",
        "latch = true\n",
        "",
        "",
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (c, _alice, _bob) = rt.block_on(async {
        let mut bob = PeerUa::skipping_others(&e);
        let mut alice = e.connect_alice().await;
        let c = call(&mut alice, &mut bob, 4000, 5000).await;
        (c, alice, bob)
    });
    let a_rtp = e.udp(&e.topo.client, "10.77.0.2:4000");
    let b_rtp = e.udp(&e.topo.peer, "198.51.100.2:5000");
    // Bob first, RTP and RTCP: the latches learn his ports. (An unlatched
    // pinhole is claimed by the first packet from the peer's address,
    // spoofed or not: latching is opt-in for that reason, DESIGN.md §2.)
    media_both_ways(&e, &c, &a_rtp, &b_rtp, "call up");
    let a_rtcp = e.udp(&e.topo.client, "10.77.0.2:4001");
    let b_rtcp = e.udp(&e.topo.peer, "198.51.100.2:5001");
    let edge_rtcp = SocketAddr::new(c.edge_pub.ip(), c.edge_pub.port() + 1);
    assert!(flows(&b_rtcp, edge_rtcp, &a_rtcp, b"rtcp up"), "bob's RTCP");
    let latched_before: Vec<String> = e
        .pinholes()
        .iter()
        .filter_map(|p| p["latched"].as_str().map(str::to_owned))
        .collect();
    eprintln!("latched before: {latched_before:?}");

    // The attacker's own socket (it must receive nothing) and raw socket.
    let atk_sock = e.udp(&atk, "198.51.100.66:31000");
    let raw = testnet::in_ns(&atk, RawUdp::new)
        .expect("netns")
        .expect("raw socket");
    let (drops0, by_reason0) = drops(&e);

    let stop = Arc::new(AtomicBool::new(false));
    let rx_a = receiver(a_rtp.try_clone().expect("clone"), 0xb0b, stop.clone());
    let rx_b = receiver(b_rtp.try_clone().expect("clone"), 0xa11ce, stop.clone());
    let atk_got = Arc::new(AtomicU64::new(0));
    let atk_rx = {
        let (s, got, stop) = (
            atk_sock.try_clone().expect("clone"),
            atk_got.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let mut buf = [0u8; 2048];
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(60) {
                match s.recv_from(&mut buf) {
                    Ok((n, _)) => {
                        got.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
        })
    };
    // Media both ways: 2,000 packets each, one every 2 ms.
    const N: u16 = 2000;
    let media = {
        let (a, b) = (
            a_rtp.try_clone().expect("clone"),
            b_rtp.try_clone().expect("clone"),
        );
        let (to_b, to_a) = (c.edge_int, c.edge_pub);
        std::thread::spawn(move || {
            for seq in 0..N {
                let _ = a.send_to(&rtp_packet(seq, 0xa11ce), to_b);
                let _ = b.send_to(&rtp_packet(seq, 0xb0b), to_a);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // The spray, meanwhile: 2 datagrams to every media port of the public
    // address from the attacker's own address, and 1,000 spoofed as bob
    // (his address, a wrong port) at the call's edge port and its RTCP port.
    let mut sprayed = 0u64;
    let edge_pub_ip = c.edge_pub.ip();
    let mut payload = ATTACK_TAG.to_vec();
    payload.extend_from_slice(&[0x80; 164]);
    for round in 0..2 {
        for (i, port) in MEDIA_PORTS.enumerate() {
            atk_sock
                .send_to(&payload, SocketAddr::new(edge_pub_ip, port))
                .expect("spray");
            sprayed += 1;
            if i % 50 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let _ = round;
    }
    let spoof_from = sa("198.51.100.2:5002");
    for i in 0..1000u32 {
        let to = if i % 2 == 0 {
            c.edge_pub
        } else {
            SocketAddr::new(edge_pub_ip, c.edge_pub.port() + 1)
        };
        raw.send(spoof_from, to, &payload).expect("spoof");
        sprayed += 1;
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let _ = media.join();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (a_own, a_attack) = rx_a.join().expect("alice's receiver");
    let (b_own, b_attack) = rx_b.join().expect("bob's receiver");
    let _ = atk_rx.join();
    let (drops1, by_reason1) = drops(&e);
    let delta: Vec<(String, u64)> = by_reason1
        .iter()
        .zip(&by_reason0)
        .map(|((n, after), (_, before))| (n.clone(), after - before))
        .filter(|(_, d)| *d > 0)
        .collect();
    eprintln!(
        "sprayed {sprayed}; XDP drops +{} {delta:?}; alice got {a_own}/{N} (+{a_attack} attacker), bob {b_own}/{N} (+{b_attack} attacker), attacker got {} bytes",
        drops1 - drops0,
        atk_got.load(Ordering::Relaxed)
    );
    assert_eq!(
        atk_got.load(Ordering::Relaxed),
        0,
        "the attacker received bytes"
    );
    assert_eq!(
        (a_attack, b_attack),
        (0, 0),
        "a party received an attacker packet"
    );
    let min = u64::from(N) - u64::from(N) / 1000;
    assert!(
        a_own >= min && b_own >= min,
        "call media lost ≥ 0.1%: alice {a_own}, bob {b_own} of {N}"
    );
    let latched_after: Vec<String> = e
        .pinholes()
        .iter()
        .filter_map(|p| p["latched"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(latched_before, latched_after, "the latch moved");
    assert!(
        latched_after
            .iter()
            .all(|l| !l.contains("198.51.100.66") && !l.ends_with(":5002")),
        "latched to the attacker: {latched_after:?}"
    );
}

/// Resident set size of `pid` in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// An OPTIONS to the edge from the attacker with `headers` and `body`
/// appended as given (Content-Length included in `headers`).
fn options_raw(headers: &str) -> String {
    format!(
        "OPTIONS sip:203.0.113.1:5061 SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.66:5061;branch={};rport\r\nMax-Forwards: 70\r\nFrom: <sip:m@198.51.100.66>;tag={}\r\nTo: <sip:203.0.113.1>\r\nCall-ID: {}\r\nCSeq: 1 OPTIONS\r\n{headers}",
        testua::unique("z9hG4bK"),
        testua::unique("t"),
        testua::unique("f-")
    )
}

/// The status code of the first SIP response in `bytes`.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let t = String::from_utf8_lossy(bytes);
    let i = t.find("SIP/2.0 ")?;
    t[i + 8..].get(..3)?.parse().ok()
}

/// Attack 6: framing abuse over TLS. A Content-Length larger than the
/// body, then silence: closed at the message deadline. Content-Length
/// 2^31, 2^64 and negative: 413 / 400, then closed. A head over the
/// limit: 513, then closed. One byte per TLS record: still one message,
/// answered. 10,000 CRLFCRLF keep-alives: 10,000 CRLF pongs (RFC 5626
/// §4.4.1), and the connection still works. An idle connection closes
/// after the idle timeout. The agent's RSS stays bounded across it all,
/// 100 connections each holding a nearly full body included.
#[tokio::test(flavor = "current_thread")]
async fn framing_abuse_over_tls_is_answered_closed_and_bounded() {
    if skip("attacks::framing_abuse_over_tls_is_answered_closed_and_bounded") {
        return;
    }
    let (e, atk) = start(
        &format!("ak6{}", std::process::id()),
        "relay",
        "",
        "idle_timeout_secs = 3\n",
        "[limits]\nmessage_timeout_secs = 2\nrequest_rate = 20000\nrequest_burst = 20000\nmax_connections_per_source = 256\nmax_handshakes_per_source = 64\nhandshake_rate = 1000\nhandshake_burst = 1000\n",
    );
    let pid = e.agent_pid();
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = rss_kb(pid);
    let from = SocketAddr::new(IpAddr::V4(ATTACKER), 0);

    // a. Content-Length larger than the body, then a stall.
    let mut s = raw_tls(&e, &atk, from).await;
    s.write_all(
        options_raw("Content-Type: text/plain\r\nContent-Length: 100\r\n\r\nabc").as_bytes(),
    )
    .await
    .expect("short body");
    s.flush().await.expect("flush");
    let t0 = Instant::now();
    let (_, closed) = drain(&mut s, Duration::from_secs(8)).await;
    let took = t0.elapsed();
    assert!(closed, "a stalled body kept its connection for 8 s");
    assert!(
        took < Duration::from_secs(6),
        "a stalled body was cut after {took:?} (deadline 2 s)"
    );
    assert!(security_line(&e, &["message_timeout_secs", "198.51.100.66"]).is_some());

    // b. Content-Length 2^31, 2^64 and negative; c. a head over the limit.
    let big_head = format!(
        "X-Pad: {}\r\nContent-Length: 0\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    for (what, headers, want) in [
        (
            "Content-Length 2^31",
            "Content-Length: 2147483648\r\n\r\n".to_owned(),
            413,
        ),
        (
            "Content-Length 2^64",
            "Content-Length: 18446744073709551616\r\n\r\n".to_owned(),
            400,
        ),
        (
            "Content-Length -1",
            "Content-Length: -1\r\n\r\n".to_owned(),
            400,
        ),
        (
            "Content-Length 65537",
            "Content-Length: 65537\r\n\r\n".to_owned(),
            413,
        ),
        ("a 20 kB head", big_head, 513),
    ] {
        let mut s = raw_tls(&e, &atk, from).await;
        s.write_all(options_raw(&headers).as_bytes())
            .await
            .expect("send");
        s.flush().await.expect("flush");
        let (got, closed) = drain(&mut s, Duration::from_secs(5)).await;
        assert_eq!(
            status_of(&got),
            Some(want),
            "{what}: {:?}",
            String::from_utf8_lossy(&got)
        );
        assert!(
            closed,
            "{what}: the connection stays open after the refusal"
        );
    }

    // d. One byte per TLS record.
    let mut s = raw_tls(&e, &atk, from).await;
    let msg = options_raw("Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello");
    for b in msg.as_bytes() {
        s.write_all(&[*b]).await.expect("one byte");
        s.flush().await.expect("one record");
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    while status_of(&got).is_none() {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("one byte per record: no answer ({other:?})"),
        }
    }
    assert_eq!(status_of(&got), Some(200), "one byte per record");

    // e. 10,000 keep-alive pings on the same connection: 10,000 pongs.
    let ping_block = "\r\n\r\n".repeat(500);
    for _ in 0..20 {
        s.write_all(ping_block.as_bytes()).await.expect("pings");
    }
    s.flush().await.expect("flush");
    let mut pongs = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while pongs.len() < 20_000 {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => pongs.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    assert_eq!(pongs.len(), 20_000, "10,000 pings get 10,000 CRLF pongs");
    assert!(pongs.chunks(2).all(|c| c == b"\r\n"), "pongs are CRLF");
    s.write_all(options_raw("Content-Length: 0\r\n\r\n").as_bytes())
        .await
        .expect("OPTIONS after pings");
    s.flush().await.expect("flush");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while status_of(&got).is_none() {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("after the pings: no answer ({other:?})"),
        }
    }
    assert_eq!(
        status_of(&got),
        Some(200),
        "the connection still works after the pings"
    );

    // f. Three rounds of 100 connections, each with a head announcing
    // 65,536 bytes and 60,000 of them, then silence: all closed at the
    // deadline; memory does not grow from round to round.
    let mut peaks = Vec::new();
    let mut afters = Vec::new();
    for round in 0..3 {
        let mut held = Vec::new();
        for _ in 0..100 {
            let mut s = raw_tls(&e, &atk, from).await;
            let head = options_raw("Content-Type: text/plain\r\nContent-Length: 65536\r\n\r\n");
            s.write_all(head.as_bytes()).await.expect("head");
            s.write_all(&vec![b'x'; 60_000]).await.expect("body");
            s.flush().await.expect("flush");
            held.push(s);
        }
        peaks.push(rss_kb(pid));
        let mut closed = 0;
        for s in &mut held {
            if drain(s, Duration::from_secs(8)).await.1 {
                closed += 1;
            }
        }
        assert_eq!(
            closed, 100,
            "round {round}: stalled bodies all cut at the deadline"
        );
        drop(held);
        std::thread::sleep(Duration::from_secs(1));
        afters.push(rss_kb(pid));
    }
    eprintln!("RSS: start {rss0} kB; with 100 stalled 60 kB bodies {peaks:?} kB; after each round {afters:?} kB");
    let (first, last) = (peaks[0], peaks[peaks.len() - 1]);
    assert!(
        first <= rss0 + 64 * 1024,
        "RSS grew to {first} kB from {rss0} kB"
    );
    assert!(
        last <= first + 8 * 1024,
        "RSS grows from round to round: peaks {peaks:?} kB"
    );
    assert!(
        afters[afters.len() - 1] <= rss0 + 24 * 1024,
        "RSS stayed at {afters:?} kB from {rss0} kB"
    );

    // g. An idle connection is closed after the idle timeout (3 s).
    let mut s = raw_tls(&e, &atk, from).await;
    let t0 = Instant::now();
    let (_, closed) = drain(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "an idle connection stayed open 10 s");
    let idle = t0.elapsed();
    eprintln!("idle connection closed after {idle:?}");
    assert!(idle >= Duration::from_secs(2), "closed too early: {idle:?}");
}
