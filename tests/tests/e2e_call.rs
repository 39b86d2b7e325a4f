//! End-to-end proof of issue #3 in network namespaces: the real agent binary
//! runs the TLS SIP proxy and the XDP datapath in the edge namespace; test
//! user agents (`sip_edge_tests::testua`) in the client and peer namespaces place
//! real TLS calls through it, exchange RTP-sized UDP, an MSRP file and
//! Windows Messenger (x-msmsgsinvite) TCP transfers over the pinholes the
//! calls opened, and every scenario ends with the pinhole
//! map empty (read with the real CLI, `sip-edge pinhole list`). One agent
//! run per media mode. Needs root; skips through `testnet::record_skip`.

use std::{
    io::Write,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use sip_edge::{datapath::maps::DatapathMaps, sip::message::Message};
use sip_edge_tests::{
    edge::{self, alice_id, bob_id, contact, ip, sa, Edge, Flow, OutCall, PeerUa, WAIT},
    testnet::{self, udp_roundtrip},
    testua::{self, media_of, reply, rtp_packet, sdp, Dialog, MsrpOffer, SdpSpec, UaConn},
};

/// `start_with` with nothing appended.
fn start(tag: &str, mode: &str) -> Edge {
    start_with(tag, mode, "")
}

/// The agent on `testua::edge_config` in `mode` with `extra` appended to
/// the configuration (whole tables).
fn start_with(tag: &str, mode: &str, extra: &str) -> Edge {
    let mut e = Edge::prepare(tag);
    // Regression guard: half of the edge's ephemeral range lies in the
    // media range. The agent's connections must still take ports outside
    // it, because the agent reserves its media ranges
    // (net.ipv4.ip_local_reserved_ports, see sip_edge::ports);
    // `drop_policy_...` checks the port its connection to bob took.
    e.ephemeral_ports(40000, 41999);
    e.write_config(&(testua::edge_config(&e.pin_dir, &e.pki, mode) + extra));
    e.run_agent();
    e
}

/// Send until received (first packets may meet an unresolved neighbour).
fn eventually(
    from: &UdpSocket,
    to: SocketAddr,
    rx: &UdpSocket,
    payload: &[u8],
) -> Option<SocketAddr> {
    (0..20).find_map(|_| udp_roundtrip(from, to, rx, payload).map(|(_, src)| src))
}

/// `n` RTP packets from `from` to `to`; returns how many `rx` got and the
/// sources it saw.
fn rtp_burst(
    from: &UdpSocket,
    to: SocketAddr,
    rx: &UdpSocket,
    n: u16,
    ssrc: u32,
) -> (u16, Vec<SocketAddr>) {
    for seq in 0..n {
        from.send_to(&rtp_packet(seq, ssrc), to).expect("send rtp");
    }
    let mut got = 0;
    let mut srcs = Vec::new();
    let mut buf = [0u8; 2048];
    while got < n {
        match rx.recv_from(&mut buf) {
            Ok((172, src)) if buf[8..12] == ssrc.to_be_bytes() => {
                got += 1;
                if !srcs.contains(&src) {
                    srcs.push(src);
                }
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    (got, srcs)
}

/// Nothing with `payload` arrives at `rx` within its timeout.
fn silent(rx: &UdpSocket, payload: &[u8]) -> bool {
    let mut buf = [0u8; 2048];
    loop {
        match rx.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == payload => return false,
            Ok(_) => continue,
            Err(_) => return true,
        }
    }
}

/// INVITE from alice with `offer_spec`, 180 and 200 with `answer_spec`
/// from bob, ACK (`edge::call_out`, `Flow::Ringing`).
async fn call_out(
    alice: &mut UaConn,
    bob: &mut PeerUa,
    offer_spec: &SdpSpec,
    answer_spec: &SdpSpec,
) -> OutCall {
    edge::call_out(alice, bob, offer_spec, answer_spec, Flow::Ringing)
        .await
        .unwrap_or_else(|code| panic!("the call got {code}"))
}

/// BYE from alice, 200 from bob.
async fn bye_from_alice(alice: &mut UaConn, bob: &mut PeerUa, call: &mut OutCall) {
    alice
        .send(&call.a.request("BYE", "", ""))
        .await
        .expect("BYE");
    let bye = bob.recv_request("BYE").await;
    bob.conn()
        .send(&reply(&bye, 200, "OK", &call.b.local_tag, "", "", ""))
        .await
        .expect("200 BYE");
    alice
        .recv_status(200, WAIT)
        .await
        .expect("alice gets 200 for BYE");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "current_thread")]
async fn relay_mode_calls_over_tls_open_and_close_pinholes() {
    const NAME: &str = "e2e_call::relay_mode_calls_over_tls_open_and_close_pinholes";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let e = start(&format!("r{}", std::process::id()), "relay");
    let mut alice = e.connect_alice().await;
    let mut bob = PeerUa::new(&e);

    // --- a. internal -> external call, relay: RTP both ways through XDP.
    let a_rtp = e.udp(&e.topo.client, "10.77.0.2:4000");
    let b_rtp = e.udp(&e.topo.peer, "198.51.100.2:5000");
    let mut call = call_out(
        &mut alice,
        &mut bob,
        &SdpSpec {
            audio: Some(4000),
            video: Some(4010),
            msrp: None,
        },
        &SdpSpec {
            audio: Some(5000),
            video: Some(5010),
            msrp: None,
        },
    )
    .await;
    let offer = media_of(&call.offer, "audio").expect("offer audio");
    let answer = media_of(&call.answer, "audio").expect("answer audio");
    assert_eq!(
        offer.addr.ip(),
        ip("203.0.113.1"),
        "the peer must see the edge's public address in the offer"
    );
    assert_eq!(
        answer.addr.ip(),
        ip("10.77.0.1"),
        "the client must see the edge's internal address in the answer"
    );
    assert_eq!(
        media_of(&call.offer, "video").expect("video").addr.ip(),
        ip("203.0.113.1"),
        "second m-line rewritten too"
    );
    assert!(
        !String::from_utf8_lossy(&call.offer).contains("10.77.0.2"),
        "private address leaked to the outside"
    );
    // Signalling went over TLS end to end and the pinholes exist now.
    assert!(!e.pinholes().is_empty(), "no pinholes after 200 OK/ACK");
    let src = eventually(&b_rtp, offer.addr, &a_rtp, &rtp_packet(0, 1))
        .expect("peer -> client RTP never arrived");
    assert_eq!(
        src, answer.addr,
        "the client must receive media from the edge address its SDP named"
    );
    let src = eventually(&a_rtp, answer.addr, &b_rtp, &rtp_packet(0, 2))
        .expect("client -> peer RTP never arrived");
    assert_eq!(
        src, offer.addr,
        "the peer must receive media from the edge address its SDP named"
    );
    let (in_before, out_before) = (e.packets_at(offer.addr), e.packets_at(answer.addr));
    let (got_in, srcs_in) = rtp_burst(&b_rtp, offer.addr, &a_rtp, 50, 3);
    let (got_out, srcs_out) = rtp_burst(&a_rtp, answer.addr, &b_rtp, 50, 4);
    assert!(
        got_in >= 45 && got_out >= 45,
        "RTP lost: in {got_in}/50, out {got_out}/50"
    );
    assert_eq!((srcs_in, srcs_out), (vec![answer.addr], vec![offer.addr]));
    let (in_after, out_after) = (e.packets_at(offer.addr), e.packets_at(answer.addr));
    assert!(
        in_after >= in_before + u64::from(got_in),
        "inbound pinhole counter did not move: {in_before} -> {in_after}"
    );
    assert!(
        out_after >= out_before + u64::from(got_out),
        "outbound pinhole counter did not move: {out_before} -> {out_after}"
    );
    // An edge media port nobody negotiated stays closed, and is counted.
    let used: Vec<u16> = e
        .pinholes()
        .iter()
        .filter_map(|p| {
            p["local"]
                .as_str()
                .and_then(|l| l.parse::<SocketAddr>().ok())
                .map(|a| a.port())
        })
        .collect();
    let closed = (40000..41000)
        .rev()
        .find(|p| !used.contains(p))
        .expect("a free port");
    let before = e.reason("drop_no_pinhole");
    assert!(
        udp_roundtrip(
            &b_rtp,
            SocketAddr::new(ip("203.0.113.1"), closed),
            &a_rtp,
            b"unsolicited"
        )
        .is_none(),
        "un-negotiated media port open"
    );
    assert!(
        e.reason("drop_no_pinhole") > before,
        "drop at an un-negotiated port not counted"
    );
    bye_from_alice(&mut alice, &mut bob, &mut call).await;
    e.assert_empty("a. relay call after BYE");
    assert!(
        udp_roundtrip(&b_rtp, offer.addr, &a_rtp, b"after bye").is_none(),
        "media still flows after BYE"
    );

    // --- c1. CANCEL while ringing (with early media installed) -> empty.
    let mut a = Dialog::outgoing(&alice_id(), "sips:bob@peer.example.net");
    alice
        .send(&a.invite(&sdp(
            "alice",
            1,
            ip("10.77.0.2"),
            &SdpSpec {
                audio: Some(4000),
                ..Default::default()
            },
        )))
        .await
        .expect("INVITE");
    let inv = bob.recv_request("INVITE").await;
    let b = Dialog::incoming(&bob_id(), &inv).expect("dialog");
    let early = sdp(
        "bob",
        1,
        ip("198.51.100.2"),
        &SdpSpec {
            audio: Some(5000),
            ..Default::default()
        },
    );
    bob.conn()
        .send(&reply(
            &inv,
            180,
            "Ringing",
            &b.local_tag,
            &contact(&b.me),
            "application/sdp",
            &early,
        ))
        .await
        .expect("180");
    let r = alice.recv_status(180, WAIT).await.expect("180");
    a.on_invite_response(&r).expect("180");
    assert!(
        !e.pinholes().is_empty(),
        "early media (SDP in 180) installs pinholes"
    );
    alice
        .send(&a.cancel().expect("pending INVITE"))
        .await
        .expect("CANCEL");
    alice.recv_status(200, WAIT).await.expect("200 for CANCEL");
    let c = bob.recv_request("CANCEL").await;
    bob.conn()
        .send(&reply(&c, 200, "OK", &b.local_tag, "", "", ""))
        .await
        .expect("200 CANCEL");
    bob.conn()
        .send(&reply(
            &inv,
            487,
            "Request Terminated",
            &b.local_tag,
            "",
            "",
            "",
        ))
        .await
        .expect("487");
    bob.recv_request("ACK").await;
    let r = alice.recv_status(487, WAIT).await.expect("487");
    alice
        .send(&a.ack_failure(&r).expect("ack"))
        .await
        .expect("ACK 487");
    e.assert_empty("c. CANCEL during ringing");

    // --- c2. 486 Busy Here after early media -> empty.
    let mut a = Dialog::outgoing(&alice_id(), "sips:bob@peer.example.net");
    alice
        .send(&a.invite(&sdp(
            "alice",
            1,
            ip("10.77.0.2"),
            &SdpSpec {
                audio: Some(4000),
                ..Default::default()
            },
        )))
        .await
        .expect("INVITE");
    let inv = bob.recv_request("INVITE").await;
    let b = Dialog::incoming(&bob_id(), &inv).expect("dialog");
    bob.conn()
        .send(&reply(
            &inv,
            183,
            "Session Progress",
            &b.local_tag,
            &contact(&b.me),
            "application/sdp",
            &early,
        ))
        .await
        .expect("183");
    alice.recv_status(183, WAIT).await.expect("183");
    assert!(
        !e.pinholes().is_empty(),
        "early media (SDP in 183) installs pinholes"
    );
    bob.conn()
        .send(&reply(&inv, 486, "Busy Here", &b.local_tag, "", "", ""))
        .await
        .expect("486");
    bob.recv_request("ACK").await;
    let r = alice.recv_status(486, WAIT).await.expect("486");
    alice
        .send(&a.ack_failure(&r).expect("ack"))
        .await
        .expect("ACK 486");
    e.assert_empty("c. 486 Busy Here");

    // --- d. re-INVITE moves alice's audio to a new port.
    let a_old = e.udp(&e.topo.client, "10.77.0.2:4020");
    let a_new = e.udp(&e.topo.client, "10.77.0.2:4022");
    let b_rtp2 = e.udp(&e.topo.peer, "198.51.100.2:5020");
    let mut call = call_out(
        &mut alice,
        &mut bob,
        &SdpSpec {
            audio: Some(4020),
            ..Default::default()
        },
        &SdpSpec {
            audio: Some(5020),
            ..Default::default()
        },
    )
    .await;
    let public = media_of(&call.offer, "audio").expect("offer").addr;
    let inner = media_of(&call.answer, "audio").expect("answer").addr;
    eventually(&b_rtp2, public, &a_old, &rtp_packet(0, 5))
        .expect("media to the old port before the re-INVITE");
    let (got, _) = rtp_burst(&b_rtp2, public, &a_old, 30, 5);
    assert_eq!(got, 30, "burst before the re-INVITE");
    let before = e.packets_at(public);
    alice
        .send(&call.a.invite(&sdp(
            "alice",
            2,
            ip("10.77.0.2"),
            &SdpSpec {
                audio: Some(4022),
                ..Default::default()
            },
        )))
        .await
        .expect("re-INVITE");
    let reinv = bob.recv_request("INVITE").await;
    assert_eq!(
        media_of(reinv.body(), "audio").expect("re-offer").addr,
        public,
        "the re-offer keeps the edge's public port"
    );
    bob.conn()
        .send(&reply(
            &reinv,
            200,
            "OK",
            &call.b.local_tag,
            &contact(&call.b.me),
            "application/sdp",
            &sdp(
                "bob",
                2,
                ip("198.51.100.2"),
                &SdpSpec {
                    audio: Some(5020),
                    ..Default::default()
                },
            ),
        ))
        .await
        .expect("200 re-INVITE");
    let ok = alice.recv_status(200, WAIT).await.expect("200 re-INVITE");
    call.a.on_invite_response(&ok).expect("200");
    alice
        .send(&call.a.ack("", ""))
        .await
        .expect("ACK re-INVITE");
    bob.recv_request("ACK").await;
    let moved = rtp_packet(1, 6);
    let src = eventually(&b_rtp2, public, &a_new, &moved)
        .expect("media did not follow the re-INVITE to the new port");
    assert_eq!(src, inner);
    assert!(
        silent(&a_old, &moved),
        "media still reaches the old port after the re-INVITE"
    );
    // The rule was replaced in place (same key, same slot): its counter
    // carries on instead of starting again from zero.
    assert!(
        e.packets_at(public) > before,
        "counter reset by the re-INVITE: {} after, {before} before",
        e.packets_at(public)
    );
    eventually(
        &a_new,
        media_of(ok.body(), "audio").expect("re-answer").addr,
        &b_rtp2,
        &rtp_packet(2, 7),
    )
    .expect("media from the new port never reached the peer");
    bye_from_alice(&mut alice, &mut bob, &mut call).await;
    e.assert_empty("d. re-INVITE then BYE");

    // --- e. MSRP file transfer (RFC 4975/5547) over a TCP pinhole. No
    // a=setup: the offerer (alice) connects, from an ephemeral port the
    // pinhole learns (RFC 4145 defaults).
    let file: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let msrp_offer = MsrpOffer {
        port: 4200,
        session: "alice-s1".into(),
        setup: None,
        file_selector: Some(format!(
            "name:\"report.bin\" type:application/octet-stream size:{}",
            file.len()
        )),
    };
    let msrp_answer = MsrpOffer {
        port: 5200,
        session: "bob-s1".into(),
        setup: None,
        file_selector: None,
    };
    let listener = e
        .topo
        .tcp_listen(&e.topo.peer, sa("198.51.100.2:5200"))
        .expect("bob's MSRP listener");
    let mut call = call_out(
        &mut alice,
        &mut bob,
        &SdpSpec {
            msrp: Some(msrp_offer.clone()),
            ..Default::default()
        },
        &SdpSpec {
            msrp: Some(MsrpOffer {
                ..msrp_answer.clone()
            }),
            ..Default::default()
        },
    )
    .await;
    let offer_m = media_of(&call.offer, "message").expect("MSRP offer");
    let answer_m = media_of(&call.answer, "message").expect("MSRP answer");
    assert_eq!(offer_m.proto, "TCP/MSRP");
    assert_eq!(offer_m.addr.ip(), ip("203.0.113.1"));
    assert_eq!(answer_m.addr.ip(), ip("10.77.0.1"));
    let offer_path = offer_m.path.clone().expect("a=path in the offer");
    let answer_path = answer_m.path.clone().expect("a=path in the answer");
    assert!(
        offer_path.contains(&offer_m.addr.to_string()),
        "a=path not rewritten with the m-line: {offer_path}"
    );
    assert!(
        answer_path.contains(&answer_m.addr.to_string()),
        "a=path not rewritten with the m-line: {answer_path}"
    );
    let mut out = (0..10)
        .find_map(|_| {
            let r = testnet::in_ns(&e.topo.client, || {
                std::net::TcpStream::connect_timeout(&answer_m.addr, Duration::from_secs(2))
            })
            .ok()?
            .ok();
            if r.is_none() {
                std::thread::sleep(Duration::from_millis(200));
            }
            r
        })
        .expect("alice's MSRP connection through the pinhole");
    listener.set_nonblocking(false).expect("blocking");
    let (mut inside_bob, seen) = listener.accept().expect("bob accepts MSRP");
    assert_eq!(
        seen, offer_m.addr,
        "the peer must see the edge's public MSRP address"
    );
    out.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    inside_bob
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let own_path = msrp_offer.path(ip("10.77.0.2"));
    out.write_all(&testua::msrp_send(
        "tx1",
        &answer_path,
        &own_path,
        "msg1",
        &file,
    ))
    .expect("MSRP SEND");
    let got = testua::msrp_read(&mut inside_bob, 1 << 20).expect("bob reads the MSRP SEND");
    assert_eq!(got.start, "MSRP tx1 SEND");
    assert!(
        got.body == file,
        "file corrupted in transit ({} of {} bytes)",
        got.body.len(),
        file.len()
    );
    inside_bob
        .write_all(&testua::msrp_ok(
            "tx1",
            &offer_path,
            &msrp_answer.path(ip("198.51.100.2")),
        ))
        .expect("MSRP 200");
    let ok = testua::msrp_read(&mut out, 1 << 16).expect("alice reads the MSRP 200");
    assert_eq!(ok.start, "MSRP tx1 200 OK");
    let tcp_packets: u64 = e
        .pinholes()
        .iter()
        .filter(|p| p["proto"] == "tcp")
        .map(|p| p["packets"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        tcp_packets > 10,
        "the TCP pinhole counters did not carry the transfer: {tcp_packets}"
    );
    drop((out, inside_bob, listener));

    // x-msmsgsinvite file transfer (Windows Messenger), both directions, in
    // the same dialog: the INVITE command (no address) one way, the ACCEPT
    // naming a TCP listener the other way, rewritten by the edge to its own
    // endpoint on the connecting side (media/manager.rs, File transfers).
    // The connector connects from an ephemeral port the pinhole learns from
    // the SYN; 64 kB cross each way.
    let up: Vec<u8> = (0..65_536u32).map(|i| (i % 241) as u8).collect();
    let down: Vec<u8> = (0..65_536u32).map(|i| (i % 239) as u8 ^ 0x5a).collect();
    // One socket, one SYN sequence: the pinhole learns the first SYN's port.
    let connect = |ns: &str, to: SocketAddr| {
        testnet::in_ns(ns, || {
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })
        .expect("netns")
        .unwrap_or_else(|err| {
            panic!("connect to {to} from {ns} through the transfer pinhole: {err}")
        })
    };
    let endpoint_of = |m: &Message| {
        sip_edge::sip::msmsgs::parse(m.body())
            .expect("forwarded invitation parses")
            .endpoint
            .expect("forwarded ACCEPT names IP-Address/Port")
    };

    // e1. alice offers the file, bob listens outside, alice connects.
    let inv_body = testua::msmsgs_invite(4242, "notes.bin", up.len());
    alice
        .send(&call.a.request("MESSAGE", "text/x-msmsgsinvite", &inv_body))
        .await
        .expect("MESSAGE INVITE");
    let m = bob.recv_request("MESSAGE").await;
    assert_eq!(
        m.body(),
        inv_body.as_bytes(),
        "address-free invitation must pass unchanged"
    );
    bob.conn()
        .send(&reply(&m, 200, "OK", &call.b.local_tag, "", "", ""))
        .await
        .expect("200 MESSAGE");
    alice.recv_status(200, WAIT).await.expect("200 for MESSAGE");
    let bob_ft = e
        .topo
        .tcp_listen(&e.topo.peer, sa("198.51.100.2:6891"))
        .expect("bob's transfer listener");
    let accept = testua::msmsgs_accept(4242, sa("198.51.100.2:6891"));
    bob.conn()
        .send(&call.b.request("MESSAGE", "text/x-msmsgsinvite", &accept))
        .await
        .expect("MESSAGE ACCEPT");
    let m = alice
        .recv_request("MESSAGE", WAIT)
        .await
        .expect("the ACCEPT reaches alice");
    alice
        .send(&reply(&m, 200, "OK", &call.a.local_tag, "", "", ""))
        .await
        .expect("200 ACCEPT");
    bob.conn()
        .recv_status(200, WAIT)
        .await
        .expect("200 for the ACCEPT");
    let to = endpoint_of(&m);
    assert_eq!(
        to.ip(),
        ip("10.77.0.1"),
        "the inside must connect to the edge's internal address"
    );
    assert!(
        !String::from_utf8_lossy(m.body()).contains("198.51.100.2"),
        "the listener's address passed unrewritten"
    );
    let before = e.packets_at(to);
    let mut conn = connect(&e.topo.client, to);
    let (seen, got_up, got_down) =
        testua::tcp_exchange(&mut conn, bob_ft, &up, &down, Duration::from_secs(5))
            .expect("x-msmsgsinvite transfer alice -> bob");
    assert_eq!(
        seen.ip(),
        ip("203.0.113.1"),
        "the outside listener must see the edge's public address"
    );
    assert!(
        got_up == up && got_down == down,
        "transfer corrupted: {} of {} up, {} of {} down",
        got_up.len(),
        up.len(),
        got_down.len(),
        down.len()
    );
    assert!(
        e.packets_at(to) > before + 10 && e.packets_at(seen) > 10,
        "the transfer pinhole counters did not carry it: {} / {}",
        e.packets_at(to),
        e.packets_at(seen)
    );
    drop(conn);

    // e2. bob offers, alice listens inside, bob connects from outside.
    let inv_body = testua::msmsgs_invite(4343, "photo.jpg", up.len());
    bob.conn()
        .send(&call.b.request("MESSAGE", "text/x-msmsgsinvite", &inv_body))
        .await
        .expect("MESSAGE INVITE from bob");
    let m = alice
        .recv_request("MESSAGE", WAIT)
        .await
        .expect("bob's invitation reaches alice");
    assert_eq!(m.body(), inv_body.as_bytes());
    alice
        .send(&reply(&m, 200, "OK", &call.a.local_tag, "", "", ""))
        .await
        .expect("200 MESSAGE");
    bob.conn()
        .recv_status(200, WAIT)
        .await
        .expect("200 for bob's MESSAGE");
    let alice_ft = e
        .topo
        .tcp_listen(&e.topo.client, sa("10.77.0.2:6892"))
        .expect("alice's transfer listener");
    let accept = testua::msmsgs_accept(4343, sa("10.77.0.2:6892"));
    alice
        .send(&call.a.request("MESSAGE", "text/x-msmsgsinvite", &accept))
        .await
        .expect("MESSAGE ACCEPT from alice");
    let m = bob.recv_request("MESSAGE").await;
    bob.conn()
        .send(&reply(&m, 200, "OK", &call.b.local_tag, "", "", ""))
        .await
        .expect("200 ACCEPT");
    alice
        .recv_status(200, WAIT)
        .await
        .expect("200 for alice's ACCEPT");
    let to = endpoint_of(&m);
    assert_eq!(
        to.ip(),
        ip("203.0.113.1"),
        "the outside must connect to the public address"
    );
    assert!(
        !String::from_utf8_lossy(m.body()).contains("10.77."),
        "private address leaked in the ACCEPT"
    );
    let mut conn = connect(&e.topo.peer, to);
    let (seen, got_up, got_down) =
        testua::tcp_exchange(&mut conn, alice_ft, &up, &down, Duration::from_secs(5))
            .expect("x-msmsgsinvite transfer bob -> alice");
    assert_eq!(
        seen.ip(),
        ip("10.77.0.1"),
        "relay: the inside sees the edge's internal address"
    );
    assert!(got_up == up && got_down == down, "transfer corrupted");
    assert!(
        e.packets_at(to) > 10 && e.packets_at(seen) > 10,
        "the transfer pinhole counters did not carry it: {} / {}",
        e.packets_at(to),
        e.packets_at(seen)
    );
    drop(conn);
    bye_from_alice(&mut alice, &mut bob, &mut call).await;
    e.assert_empty("e. MSRP and x-msmsgsinvite transfers then BYE");

    // --- f. pinhole install time: 200 OK sent by the callee -> entry in
    // the pinned PINHOLES map, polled from the test process.
    let maps = DatapathMaps::from_pins(&e.pin_dir).expect("open pinned maps");
    let mut install = Vec::new();
    for i in 0..20u16 {
        let mut a = Dialog::outgoing(&alice_id(), "sips:bob@peer.example.net");
        alice
            .send(&a.invite(&sdp(
                "alice",
                1,
                ip("10.77.0.2"),
                &SdpSpec {
                    audio: Some(4300 + 2 * i),
                    ..Default::default()
                },
            )))
            .await
            .expect("INVITE");
        let inv = bob.recv_request("INVITE").await;
        let b = Dialog::incoming(&bob_id(), &inv).expect("dialog");
        assert!(
            maps.list().expect("list").is_empty(),
            "pinholes before the answer"
        );
        let answer = reply(
            &inv,
            200,
            "OK",
            &b.local_tag,
            &contact(&b.me),
            "application/sdp",
            &sdp(
                "bob",
                1,
                ip("198.51.100.2"),
                &SdpSpec {
                    audio: Some(5300 + 2 * i),
                    ..Default::default()
                },
            ),
        );
        let t0 = Instant::now();
        bob.conn().send(&answer).await.expect("200");
        let deadline = t0 + Duration::from_secs(2);
        loop {
            if !maps.list().expect("list").is_empty() {
                install.push(t0.elapsed());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pinhole not installed within 2 s of the 200 OK"
            );
            // A short blocking pause, not a spin: on a 2-vCPU machine a
            // spinning poller takes the CPU the agent needs to install
            // (tokio's timer would round this up to a millisecond; nothing
            // else runs on this test's runtime meanwhile).
            std::thread::sleep(Duration::from_micros(20));
        }
        let ok = alice.recv_status(200, WAIT).await.expect("200");
        a.on_invite_response(&ok).expect("200");
        alice.send(&a.ack("", "")).await.expect("ACK");
        bob.recv_request("ACK").await;
        let mut call = OutCall {
            a,
            b,
            offer: Vec::new(),
            answer: Vec::new(),
        };
        bye_from_alice(&mut alice, &mut bob, &mut call).await;
        e.assert_empty("f. timing call");
    }
    install.sort();
    println!(
        "pinhole install time (callee sends 200 OK -> entry in PINHOLES), {} calls: p50 {:?}, p99 {:?}, min {:?}, max {:?}",
        install.len(),
        percentile(&install, 0.50),
        percentile(&install, 0.99),
        install[0],
        install[install.len() - 1]
    );
    drop(alice);
    drop(bob);
    e.stop();
}

#[tokio::test(flavor = "current_thread")]
async fn nat_mode_inbound_call_to_a_registered_client() {
    const NAME: &str = "e2e_call::nat_mode_inbound_call_to_a_registered_client";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let e = start(&format!("t{}", std::process::id()), "nat");
    let mut alice = e.connect_alice().await;
    let mut registrar = PeerUa::new(&e);

    // b. alice registers through the edge (the peer is also the registrar
    // of peer.example.net); the edge adds Path and remembers her flow.
    register_alice(&mut alice, &mut registrar).await;

    // Bob calls alice's AOR at the edge's public listener.
    let mut bob = e.connect_bob().await;
    let a_rtp = e.udp(&e.topo.client, "10.77.0.2:4100");
    let b_rtp = e.udp(&e.topo.peer, "198.51.100.2:5100");
    let InCall {
        mut a,
        mut b,
        offer,
        answer,
    } = call_in(&mut alice, &mut bob, 5100, 4100).await;
    assert_eq!(
        offer.addr,
        sa("198.51.100.2:5100"),
        "nat mode passes the peer's own address to the client"
    );
    assert_eq!(
        answer.addr.ip(),
        ip("203.0.113.1"),
        "the peer must see the edge's public address"
    );
    let src = eventually(&b_rtp, answer.addr, &a_rtp, &rtp_packet(0, 11))
        .expect("peer -> client RTP (DNAT) never arrived");
    assert_eq!(src, offer.addr, "nat mode keeps the peer's source");
    let src = eventually(&a_rtp, offer.addr, &b_rtp, &rtp_packet(0, 12))
        .expect("client -> peer RTP (SNAT) never arrived");
    assert_eq!(src, answer.addr, "the peer must see the public address");
    let before = e.packets_at(answer.addr);
    let (got_in, _) = rtp_burst(&b_rtp, answer.addr, &a_rtp, 50, 13);
    let (got_out, _) = rtp_burst(&a_rtp, offer.addr, &b_rtp, 50, 14);
    assert!(
        got_in >= 45 && got_out >= 45,
        "RTP lost: in {got_in}/50, out {got_out}/50"
    );
    assert!(
        e.packets_at(answer.addr) >= before + u64::from(got_in),
        "inbound pinhole counter did not move"
    );
    let total: u64 = e
        .pinholes()
        .iter()
        .map(|p| p["packets"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        total >= u64::from(got_in) + u64::from(got_out),
        "pinhole counters {total} < packets delivered"
    );

    // BYE from the caller (outside) -> empty.
    bob.send(&b.request("BYE", "", "")).await.expect("BYE");
    let bye = alice
        .recv_request("BYE", WAIT)
        .await
        .expect("BYE reaches alice");
    alice
        .send(&reply(&bye, 200, "OK", &a.local_tag, "", "", ""))
        .await
        .expect("200 BYE");
    bob.recv_status(200, WAIT).await.expect("200 for BYE");
    let _ = &mut a;
    e.assert_empty("b. nat inbound call after BYE");
    assert!(
        udp_roundtrip(&b_rtp, answer.addr, &a_rtp, b"after bye").is_none(),
        "media still flows after BYE"
    );
    drop((alice, bob, registrar));
    e.stop();
}

/// REGISTER alice through the edge with `registrar` (the peer side) as the
/// registrar of peer.example.net: the edge must add Path and hide her
/// private Contact, and remember her flow for inbound requests.
async fn register_alice(alice: &mut UaConn, registrar: &mut PeerUa) {
    let me = alice_id();
    alice
        .send(&testua::register(
            &me,
            "sips:peer.example.net",
            &testua::unique("reg-"),
            1,
            600,
        ))
        .await
        .expect("REGISTER");
    let reg = registrar.recv_request("REGISTER").await;
    assert!(reg.header("Path").is_some(), "RFC 3327 Path missing");
    let bound = reg.name_addrs("Contact").expect("contact")[0].uri.clone();
    assert!(
        !bound.contains("10.77.0.2"),
        "private Contact leaked: {bound}"
    );
    registrar
        .conn()
        .send(&reply(
            &reg,
            200,
            "OK",
            "reg",
            &format!("Contact: <{bound}>;expires=600\r\n"),
            "",
            "",
        ))
        .await
        .expect("200 REGISTER");
    alice
        .recv_status(200, WAIT)
        .await
        .expect("alice registered");
}

/// An established external→internal call.
struct InCall {
    a: Dialog,
    b: Dialog,
    /// Bob's offered audio as alice received it.
    offer: testua::MediaLine,
    /// Alice's answered audio as bob received it.
    answer: testua::MediaLine,
}

/// Bob (outside, connected to the public listener) calls alice's AOR with
/// audio at `b_port`; alice answers with audio at `a_port`; ACK.
async fn call_in(alice: &mut UaConn, bob: &mut UaConn, b_port: u16, a_port: u16) -> InCall {
    let me = alice_id();
    let mut b = Dialog::outgoing(&bob_id(), "sips:alice@peer.example.net");
    b.remote_target = "sips:alice@peer.example.net".into();
    let audio = |p| SdpSpec {
        audio: Some(p),
        ..Default::default()
    };
    bob.send(&b.invite(&sdp("bob", 1, ip("198.51.100.2"), &audio(b_port))))
        .await
        .expect("INVITE");
    let inv = alice
        .recv_request("INVITE", WAIT)
        .await
        .expect("alice gets the INVITE over her registered connection");
    let offer = media_of(inv.body(), "audio").expect("offer");
    let a = Dialog::incoming(&me, &inv).expect("dialog");
    alice
        .send(&reply(
            &inv,
            180,
            "Ringing",
            &a.local_tag,
            &contact(&me),
            "",
            "",
        ))
        .await
        .expect("180");
    let r = bob.recv_status(180, WAIT).await.expect("180");
    b.on_invite_response(&r).expect("180");
    let body = sdp("alice", 1, ip("10.77.0.2"), &audio(a_port));
    alice
        .send(&reply(
            &inv,
            200,
            "OK",
            &a.local_tag,
            &contact(&me),
            "application/sdp",
            &body,
        ))
        .await
        .expect("200");
    let ok = bob.recv_status(200, WAIT).await.expect("200");
    b.on_invite_response(&ok).expect("200");
    let answer = media_of(ok.body(), "audio").expect("answer");
    assert!(
        !String::from_utf8_lossy(ok.body()).contains("10.77.0.2"),
        "private address leaked"
    );
    bob.send(&b.ack("", "")).await.expect("ACK");
    alice
        .recv_request("ACK", WAIT)
        .await
        .expect("ACK reaches alice");
    InCall {
        a,
        b,
        offer,
        answer,
    }
}

/// RTP both ways between `a_rtp` (sending to `a_to`) and `b_rtp` (sending to
/// `b_to`); each side must see the source its SDP named.
fn media_both_ways(
    b_rtp: &UdpSocket,
    b_to: SocketAddr,
    a_rtp: &UdpSocket,
    a_to: SocketAddr,
    a_sees: SocketAddr,
    b_sees: SocketAddr,
    ssrc: u32,
) {
    let src = eventually(b_rtp, b_to, a_rtp, &rtp_packet(0, ssrc))
        .expect("peer -> client RTP never arrived");
    assert_eq!(src, a_sees, "client saw the wrong source");
    let src = eventually(a_rtp, a_to, b_rtp, &rtp_packet(0, ssrc + 1))
        .expect("client -> peer RTP never arrived");
    assert_eq!(src, b_sees, "peer saw the wrong source");
}

/// The directions the two main tests do not cover: an inbound call in relay
/// mode and an outbound call in nat mode, so each mode is exercised both ways.
#[tokio::test(flavor = "current_thread")]
async fn each_mode_carries_calls_in_the_other_direction_too() {
    const NAME: &str = "e2e_call::each_mode_carries_calls_in_the_other_direction_too";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    // Relay, external -> internal.
    let e = start(&format!("x{}", std::process::id()), "relay");
    let mut alice = e.connect_alice().await;
    let mut registrar = PeerUa::new(&e);
    register_alice(&mut alice, &mut registrar).await;
    let mut bob = e.connect_bob().await;
    let a_rtp = e.udp(&e.topo.client, "10.77.0.2:4200");
    let b_rtp = e.udp(&e.topo.peer, "198.51.100.2:5200");
    let mut call = call_in(&mut alice, &mut bob, 5200, 4200).await;
    assert_eq!(
        call.offer.addr.ip(),
        ip("10.77.0.1"),
        "relay: the client must see the edge's internal address"
    );
    assert_eq!(
        call.answer.addr.ip(),
        ip("203.0.113.1"),
        "relay: the peer must see the public address"
    );
    media_both_ways(
        &b_rtp,
        call.answer.addr,
        &a_rtp,
        call.offer.addr,
        call.offer.addr,
        call.answer.addr,
        21,
    );
    bob.send(&call.b.request("BYE", "", "")).await.expect("BYE");
    let bye = alice
        .recv_request("BYE", WAIT)
        .await
        .expect("BYE reaches alice");
    alice
        .send(&reply(&bye, 200, "OK", &call.a.local_tag, "", "", ""))
        .await
        .expect("200 BYE");
    bob.recv_status(200, WAIT).await.expect("200 for BYE");
    e.assert_empty("relay inbound call after BYE");
    drop((alice, bob, registrar, a_rtp, b_rtp));
    e.stop();

    // Nat, internal -> external.
    let e = start(&format!("y{}", std::process::id()), "nat");
    let mut alice = e.connect_alice().await;
    let mut bob = PeerUa::new(&e);
    let a_rtp = e.udp(&e.topo.client, "10.77.0.2:4300");
    let b_rtp = e.udp(&e.topo.peer, "198.51.100.2:5300");
    let audio = |p| SdpSpec {
        audio: Some(p),
        ..Default::default()
    };
    let mut call = call_out(&mut alice, &mut bob, &audio(4300), &audio(5300)).await;
    let offer = media_of(&call.offer, "audio").expect("offer audio");
    let answer = media_of(&call.answer, "audio").expect("answer audio");
    assert_eq!(
        offer.addr.ip(),
        ip("203.0.113.1"),
        "nat: the peer must see the public address"
    );
    assert_eq!(
        answer.addr,
        sa("198.51.100.2:5300"),
        "nat: the client sees the peer's own address"
    );
    // DNAT in (the client sees the peer's own source), SNAT out.
    media_both_ways(
        &b_rtp,
        offer.addr,
        &a_rtp,
        answer.addr,
        answer.addr,
        offer.addr,
        31,
    );
    bye_from_alice(&mut alice, &mut bob, &mut call).await;
    e.assert_empty("nat outbound call after BYE");
    drop((alice, bob, a_rtp, b_rtp));
    e.stop();
}

/// Issue #14 item 2: with `[policy] default = "drop"` the edge must still
/// receive the replies to connections it opened itself (the agent's TLS
/// connection to the next hop arrives on an ephemeral port that is neither
/// a media nor a signalling port), while unsolicited traffic to the same
/// port is dropped in XDP, not answered by the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_policy_passes_the_edges_own_connections_and_drops_the_rest() {
    const NAME: &str = "e2e_call::drop_policy_passes_the_edges_own_connections_and_drops_the_rest";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let e = start_with(
        &format!("d{}", std::process::id()),
        "relay",
        "[policy]\ndefault = \"drop\"\n",
    );
    let mut alice = e.connect_alice().await;
    let mut bob = PeerUa::new(&e);
    let a_rtp = e.udp(&e.topo.client, "10.77.0.2:4000");
    let b_rtp = e.udp(&e.topo.peer, "198.51.100.2:5000");
    let spec = |port| SdpSpec {
        audio: Some(port),
        video: None,
        msrp: None,
    };
    // Fails with "edge connects to the peer" / 503 when the SYN-ACK of the
    // agent's own connection is dropped as `drop_other`.
    let mut call = call_out(&mut alice, &mut bob, &spec(4000), &spec(5000)).await;
    let offer = media_of(&call.offer, "audio").expect("offer audio");
    eventually(&b_rtp, offer.addr, &a_rtp, &rtp_packet(0, 9))
        .expect("media through a pinhole under the drop policy");
    // The port the edge's connection to bob uses: unsolicited traffic to it
    // from another source must be dropped in XDP (a timeout, not the
    // kernel's RST), UDP and TCP alike, and counted.
    let edge_port = bob.conn().remote;
    assert_eq!(edge_port.ip(), ip("203.0.113.1"));
    assert!(
        !(40000..=40999).contains(&edge_port.port()),
        "the agent's connection took media port {edge_port}: the media range is not reserved"
    );
    let before = e.reason("drop_other");
    e.probe_unsolicited(edge_port, 5, Duration::from_millis(500));
    let dropped = e.reason("drop_other") - before;
    assert!(
        dropped >= 6,
        "5 UDP probes and at least one SYN must count as drop_other, got {dropped}"
    );
    host_icmp_passes_under_the_drop_policy(&e, edge_port, bob.conn().local);
    // The edge's own connection still works after the probes.
    bye_from_alice(&mut alice, &mut bob, &mut call).await;
    e.assert_empty("drop policy");
    e.stop();
}

/// Under the drop policy the host's own IP stack keeps what it needs
/// (`pass_host_icmp`): a "fragmentation needed" about the edge's TLS
/// connection to the peer reaches the kernel (path MTU discovery), the same
/// error about a 4-tuple no socket owns is dropped, and IPv6 neighbour
/// discovery works on the XDP interface. Each fails when `icmp.rs` is not
/// consulted: the errors count as `drop_other` and the IPv6 connect cannot
/// resolve the edge's address.
fn host_icmp_passes_under_the_drop_policy(e: &Edge, edge: SocketAddr, peer: SocketAddr) {
    use sip_edge_tests::fixtures::packet::{Packet, L4};
    let mac = [2, 0, 0, 0, 0, 1];
    let frag_needed = |from: SocketAddr| {
        let sent = Packet::tcp(mac, mac, from, peer)
            .build()
            .expect("quoted segment");
        let mut err = Packet::udp(
            mac,
            mac,
            SocketAddr::new(peer.ip(), 0),
            SocketAddr::new(from.ip(), 0),
        );
        err.l4 = L4::Icmp {
            ty: 3,
            code: 4,
            rest: [0, 0, 0x04, 0xb0],
        };
        // The IPv4 header and the first 8 bytes of the segment (RFC 792).
        err.payload = sent[14..14 + 28].to_vec();
        err.build().expect("icmp frame")
    };
    let send = |frame: Vec<u8>, to: SocketAddr| {
        let sent = testnet::in_ns(&e.topo.peer, || send_raw_ipv4(&frame[14..], to)).expect("netns");
        assert_eq!(sent.expect("raw send"), frame.len() - 14);
    };
    let (pass0, drop0) = (e.reason("pass_host_icmp"), e.reason("drop_other"));
    // XDP on a veth runs in the receiver's NAPI poll: allow it a moment.
    let grown = |name: &str, from: u64| {
        let until = Instant::now() + Duration::from_secs(2);
        while e.reason(name) <= from && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        e.reason(name) - from
    };
    send(frag_needed(edge), edge);
    let owned = grown("pass_host_icmp", pass0);
    assert_eq!(
        owned, 1,
        "fragmentation needed about the edge's own connection must pass"
    );
    let unowned = SocketAddr::new(edge.ip(), 1);
    send(frag_needed(unowned), edge);
    assert!(
        grown("drop_other", drop0) >= 1,
        "an error about an unowned tuple must count as drop_other"
    );
    assert_eq!(
        e.reason("pass_host_icmp") - pass0,
        1,
        "an error about an unowned tuple passed"
    );

    // IPv6: forget the neighbours on both sides, then let the edge host
    // connect to a listener of the peer over IPv6. The peer's neighbour
    // advertisement (and the SYN-ACK, `pass_local_socket` over IPv6) must
    // come through XDP on the edge's public interface.
    for ns in [&e.topo.peer, &e.topo.edge] {
        testnet::sh(&[
            "ip", "netns", "exec", ns, "ip", "-6", "neigh", "flush", "all",
        ])
        .expect("flush neighbours");
    }
    let target = SocketAddr::new(testnet::PEER_V6.into(), 7443);
    let listener = testnet::in_ns(&e.topo.peer, || std::net::TcpListener::bind(target))
        .expect("netns")
        .expect("peer IPv6 listener");
    let (nd0, sock0) = (e.reason("pass_host_icmp"), e.reason("pass_local_socket"));
    let res = testnet::in_ns(&e.topo.edge, || {
        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(4))
    })
    .expect("netns");
    if let Err(err) = res {
        panic!("the edge host cannot reach {target} over IPv6 under the drop policy: {err}");
    }
    drop(listener);
    assert!(
        grown("pass_host_icmp", nd0) >= 1,
        "the neighbour advertisement must count as pass_host_icmp"
    );
    assert!(
        grown("pass_local_socket", sock0) >= 1,
        "the IPv6 SYN-ACK must count as pass_local_socket"
    );
}

/// Sends one whole IPv4 packet (header included) through a raw socket.
fn send_raw_ipv4(packet: &[u8], to: SocketAddr) -> std::io::Result<usize> {
    let std::net::IpAddr::V4(v4) = to.ip() else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    // SAFETY: plain socket calls on a descriptor this function owns; the
    // address and buffer outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.octets()),
            },
            sin_zero: [0; 8],
        };
        let n = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const sin).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n < 0 {
            Err(err)
        } else {
            Ok(n as usize)
        }
    }
}
