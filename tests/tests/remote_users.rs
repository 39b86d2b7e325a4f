//! Issue #15 in network namespaces, with real third-party peers: the agent
//! runs in the edge namespace with `[access]` (served domain example.com)
//! and a carrier `[[peer]]`; Kamailio (Debian's, as registrar with usrloc
//! and Path support, over TLS) runs in the client namespace as the inside
//! PBX at 10.77.0.2:5070; baresip (Debian's) runs in the peer namespace as
//! a remote user and registers over TLS to the edge's public address.
//!
//! One scenario per media mode (relay, nat), in order: baresip registers
//! through the edge to Kamailio (`sip-edge registrations --json` lists
//! it); an inside test UA (bob, registered at Kamailio) calls alice through
//! Kamailio, baresip auto-answers, RTP crosses the XDP pinholes both ways
//! (pinhole counters of both directions rise, the remote user's port is
//! latched, and a Goertzel filter finds baresip's 440 Hz `ausine` tone in
//! what bob receives), bob holds and resumes (re-INVITEs through the PBX;
//! the edge ports stay) and hangs up; then alice calls bob (baresip driven
//! through its `ctrl_tcp` socket), audio crosses again, and alice hangs up
//! from outside; baresip is killed and a call to it gets 430 Flow Failed; a
//! stranger outside (neither peer nor registered user) is refused 403 for
//! served and foreign domains while the carrier sees nothing, though a
//! request from inside for the carrier's domain does reach it. Needs root,
//! kamailio + kamailio-tls-modules and baresip-core; skips through
//! `testnet::record_skip` otherwise.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use sip_edge::sip::message::Message;
use sip_edge_tests::{
    edge::{ip, sa, Edge},
    softphone::{self, has_tone, kamailio_modules, Baresip, BaresipSpec},
    testnet,
    testua::{self, media_of, rtp_packet, sdp, Dialog, SdpSpec, TestPki, UaConn, UaIdentity},
};

/// Every SIP wait.
const WAIT: Duration = Duration::from_secs(10);
/// Kamailio, the inside registrar/PBX.
const PBX: &str = "10.77.0.2:5070";
/// The carrier `[[peer]]` (a second address in the peer namespace).
const CARRIER: &str = "198.51.100.3:5061";

/// baresip headless (DESIGN.md §4): a 440 Hz `ausine` tone as the source,
/// auto-answer, registration every 60 s over TLS with the edge as outbound
/// proxy.
fn baresip_spec() -> BaresipSpec<'static> {
    BaresipSpec {
        name: "baresip",
        listen: "198.51.100.2:5060",
        tone_hz: 440,
        accounts: vec!["<sip:alice@example.com;transport=tls>;auth_pass=none;outbound=\"sip:203.0.113.1:5061;transport=tls\";regint=60;answermode=auto;audio_codecs=pcmu".into()],
        modules: &[],
        extra: "",
        identity: None,
    }
}

/// The demo topology's datapath and TLS proxy (`testua`) with Kamailio as
/// the inside next hop, `[access]` for example.com, the carrier peer and a
/// control socket at `control`.
fn edge_config(pin_dir: &Path, pki: &TestPki, control: &Path, mode: &str) -> String {
    format!(
        r#"# issue #15 test configuration
{datapath}{proxy}[access]
served_domains = ["example.com"]
[[peer]]
name = "carrier"
addresses = ["198.51.100.3"]
host = "198.51.100.3"
port = 5061
tls_name = "{peer_name}"
domains = ["carrier.example"]
[control]
socket = "{control}"
mode = "0600"
"#,
        datapath = testua::datapath_config(
            pin_dir,
            &format!("mode = \"{mode}\"\nallowed_internal_subnets = [\"10.77.0.0/24\"]\n"),
        ),
        proxy = testua::proxy_table(
            pki,
            &format!(
                "internal_next_hop = {{ host = \"10.77.0.2\", port = 5070, tls_name = \"{}\" }}\n",
                testua::CLIENT_TLS_NAME
            ),
        ),
        peer_name = testua::PEER_TLS_NAME,
        control = control.display(),
    )
}

/// `sip-edge registrations --json` through the control socket.
fn registrations(control: &Path) -> Value {
    let out = Command::new(testnet::agent_bin())
        .args(["registrations", "--json", "--socket"])
        .arg(control)
        .output()
        .expect("run sip-edge registrations");
    assert!(
        out.status.success(),
        "sip-edge registrations failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("registrations JSON")
}

fn alice_entry(v: &Value) -> Option<Value> {
    v["registrations"]
        .as_array()?
        .iter()
        .find(|r| r["aor"] == "alice@example.com")
        .cloned()
}

/// Packets of the rules matching packets that arrive on `role`'s side
/// (`"internal"`: inside to outside; `"external"`: outside to inside).
fn packets_from(list: &[Value], role: &str) -> u64 {
    list.iter()
        .filter(|e| e["role"] == role)
        .map(|e| e["packets"].as_u64().unwrap_or(0))
        .sum()
}

/// RTP both ways between `sock` and `to` for about 2 s: bob's packets out,
/// the PCMU payloads it receives from `to` back.
async fn talk(sock: &std::net::UdpSocket, to: SocketAddr, ssrc: u32) -> Vec<u8> {
    sock.set_nonblocking(true).expect("nonblocking");
    let mut payload = Vec::new();
    let mut buf = [0u8; 2048];
    for seq in 0..100u16 {
        sock.send_to(&rtp_packet(seq, ssrc), to).expect("send rtp");
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            // RTP version 2, payload type 0 (PCMU), fixed 12-byte header.
            if from == to && n > 12 && buf[0] >> 6 == 2 && buf[1] & 0x7f == 0 {
                payload.extend_from_slice(&buf[12..n]);
            }
        }
    }
    payload
}

/// The final response to the request just sent (provisionals skipped).
async fn final_response(conn: &mut UaConn) -> Message {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = conn.recv(left).await.expect("a response");
        match m.status() {
            Some(c) if c >= 200 => return m,
            Some(_) => continue,
            None => panic!("a request instead of a response: {:?}", m.method()),
        }
    }
}

fn bob() -> UaIdentity {
    UaIdentity {
        aor: "sip:bob@example.com".into(),
        contact: "sip:bob@10.77.0.2:5090;transport=tls".into(),
        via_host: "10.77.0.2:5090".into(),
        display: "Bob".into(),
    }
}

fn stranger() -> UaIdentity {
    UaIdentity {
        aor: "sip:mallory@evil.example".into(),
        contact: "sip:mallory@198.51.100.2:5099;transport=tls".into(),
        via_host: "198.51.100.2:5099".into(),
        display: "Mallory".into(),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn relay_mode_remote_baresip_through_the_edge_with_kamailio_inside() {
    scenario("relay").await;
}

#[tokio::test(flavor = "current_thread")]
async fn nat_mode_remote_baresip_through_the_edge_with_kamailio_inside() {
    scenario("nat").await;
}

async fn scenario(mode: &str) {
    let name =
        format!("remote_users::{mode}_mode_remote_baresip_through_the_edge_with_kamailio_inside");
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(&name, &reason);
        return;
    }
    let Some(modules) = kamailio_modules() else {
        testnet::record_skip(&name, "kamailio with tls.so/registrar.so not installed (apt-get install kamailio kamailio-tls-modules)");
        return;
    };
    if !softphone::which("kamailio") || !softphone::baresip_installed() {
        testnet::record_skip(&name, "kamailio or baresip not installed (apt-get install kamailio kamailio-tls-modules baresip-core)");
        return;
    }
    let tag = format!("ru{}{}", &mode[..1], std::process::id());
    let mut edge = Edge::prepare(&tag);
    testnet::sh(&[
        "ip",
        "-n",
        &edge.topo.peer,
        "addr",
        "add",
        "198.51.100.3/24",
        "dev",
        "eth0",
    ])
    .expect("carrier address");
    let control = edge.dir().join("control.sock");
    edge.write_config(&edge_config(&edge.pin_dir, &edge.pki, &control, mode));
    edge.run_agent_within(Duration::from_secs(15));

    // --- the inside registrar/PBX, and bob registered with it.
    let mut kamailio =
        softphone::start_kamailio(&edge.topo.client, edge.dir(), &edge.pki, &modules, PBX);
    let mut bob_conn = testua::connect_tls(
        &edge.topo.client,
        sa(PBX),
        &edge.pki.ca,
        testua::CLIENT_TLS_NAME,
        WAIT,
    )
    .await
    .expect("bob connects to the PBX");
    let bob_listener = testua::UaListener::bind(
        &edge.topo.client,
        sa("10.77.0.2:5090"),
        &edge.pki.client_cert,
        &edge.pki.client_key,
    )
    .expect("bob listens");
    bob_conn
        .send(&testua::register(
            &bob(),
            "sip:example.com",
            &testua::unique("reg-"),
            1,
            300,
        ))
        .await
        .expect("bob's REGISTER");
    assert_eq!(
        final_response(&mut bob_conn).await.status(),
        Some(200),
        "bob registered at the PBX"
    );

    // --- the remote user registers through the edge.
    let mut baresip = Baresip::start(&edge.topo.peer, edge.dir(), &edge.pki.ca, &baresip_spec());
    let deadline = Instant::now() + Duration::from_secs(20);
    let entry = loop {
        if let Some(e) = alice_entry(&registrations(&control)) {
            break e;
        }
        assert!(
            baresip.group.alive() && Instant::now() < deadline,
            "baresip never registered through the edge\nbaresip:\n{}\nkamailio:\n{}",
            baresip.group.tail(),
            kamailio.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "sip-edge registrations --json:\n{}",
        serde_json::to_string_pretty(&registrations(&control)).unwrap_or_default()
    );
    assert_eq!(entry["side"], "outside", "{entry}");
    assert_eq!(entry["transport"], "tls", "{entry}");
    assert_eq!(entry["flow_state"], "up", "{entry}");
    assert!(
        entry["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("198.51.100.2:")),
        "{entry}"
    );
    assert!(
        entry["expires_in_secs"].as_u64().is_some_and(|e| e > 0),
        "{entry}"
    );
    assert!(
        entry["edge_contact"]
            .as_str()
            .is_some_and(|c| c.contains("@10.77.0.1:5061")),
        "{entry}"
    );

    // --- bob (inside) calls alice through the PBX; audio both ways.
    let rtp = edge
        .topo
        .udp(&edge.topo.client, sa("10.77.0.2:4000"))
        .expect("bob's RTP socket");
    let mut call = Dialog::outgoing(&bob(), "sip:alice@example.com");
    let offer = sdp(
        "bob",
        1,
        ip("10.77.0.2"),
        &SdpSpec {
            audio: Some(4000),
            video: None,
            msrp: None,
        },
    );
    bob_conn.send(&call.invite(&offer)).await.expect("INVITE");
    let ok = loop {
        let m = bob_conn.recv(WAIT).await.unwrap_or_else(|e| {
            panic!(
                "waiting for alice's answer: {e}\nbaresip:\n{}\nkamailio:\n{}",
                baresip.group.tail(),
                kamailio.tail()
            )
        });
        match m.status() {
            Some(200) => break m,
            Some(c) if c < 200 => {
                let _ = call.on_invite_response(&m);
            }
            other => panic!(
                "the call failed: {other:?} {:?}\nbaresip:\n{}",
                m.header("Warning"),
                baresip.group.tail()
            ),
        }
    };
    call.on_invite_response(&ok).expect("200");
    bob_conn.send(&call.ack("", "")).await.expect("ACK");
    let answer = media_of(ok.body(), "audio").expect("answer audio");
    let expected = if mode == "relay" {
        "10.77.0.1"
    } else {
        "198.51.100.2"
    };
    assert_eq!(
        answer.addr.ip(),
        ip(expected),
        "{mode}: the inside sees the edge (relay) or alice's public address (nat), never hers behind NAT"
    );
    let heard = talk(&rtp, answer.addr, 0xb0b).await;
    let list = edge.pinholes();
    let out = packets_from(&list, "internal");
    let inn = packets_from(&list, "external");
    eprintln!(
        "{mode}: pinholes during the call: {}",
        serde_json::to_string(&list).unwrap_or_default()
    );
    assert!(out >= 50, "{mode}: bob's RTP through XDP: {out} packets");
    assert!(inn >= 20, "{mode}: alice's RTP through XDP: {inn} packets");
    assert!(
        heard.len() >= 160 * 20,
        "{mode}: bob heard {} bytes of alice's audio",
        heard.len()
    );
    assert!(
        has_tone(&heard),
        "{mode}: baresip's 440 Hz tone did not arrive intact"
    );
    assert!(
        edge.reason("latched") >= 1,
        "{mode}: the remote user's port was latched (FarMedia::RemoteUser)"
    );

    // --- hold and resume from inside (RFC 3264 §8.4): the edge keeps its ports.
    for (version, dir) in [(2, "a=sendonly"), (3, "a=sendrecv")] {
        let body = sdp(
            "bob",
            version,
            ip("10.77.0.2"),
            &SdpSpec {
                audio: Some(4000),
                video: None,
                msrp: None,
            },
        )
        .replace("a=sendrecv", dir);
        bob_conn
            .send(&call.request("INVITE", "application/sdp", &body))
            .await
            .expect("re-INVITE");
        let r = final_response(&mut bob_conn).await;
        assert_eq!(r.status(), Some(200), "{mode}: re-INVITE ({dir})");
        bob_conn.send(&call.ack("", "")).await.expect("ACK");
        let again = media_of(r.body(), "audio").expect("re-answer audio");
        assert_eq!(
            again.addr, answer.addr,
            "{mode}: the media address moved on {dir}"
        );
    }
    let before = packets_from(&edge.pinholes(), "external");
    talk(&rtp, answer.addr, 0xb0b).await;
    assert!(
        packets_from(&edge.pinholes(), "external") > before,
        "{mode}: audio after resume"
    );
    bob_conn
        .send(&call.request("BYE", "", ""))
        .await
        .expect("BYE");
    assert_eq!(
        final_response(&mut bob_conn).await.status(),
        Some(200),
        "hang-up from inside"
    );
    wait_no_pinholes(&edge, mode, "bob's BYE");

    // --- alice (outside) calls bob; audio both ways; alice hangs up.
    baresip.ok("dial", "sip:bob@example.com");
    let mut bob_in = bob_listener
        .accept(WAIT)
        .await
        .expect("the PBX reaches bob");
    let inv = bob_in
        .recv_request("INVITE", WAIT)
        .await
        .unwrap_or_else(|e| panic!("alice's INVITE: {e}\nbaresip:\n{}", baresip.group.tail()));
    let alice_offer = media_of(inv.body(), "audio").expect("alice's offer");
    assert_eq!(
        alice_offer.addr.ip(),
        ip(expected),
        "{mode}: alice's offer as bob sees it"
    );
    let d = Dialog::incoming(&bob(), &inv).expect("bob's dialog");
    let rtp2 = edge
        .topo
        .udp(&edge.topo.client, sa("10.77.0.2:4002"))
        .expect("bob's second RTP socket");
    let bob_answer = sdp(
        "bob",
        1,
        ip("10.77.0.2"),
        &SdpSpec {
            audio: Some(4002),
            video: None,
            msrp: None,
        },
    );
    bob_in
        .send(&testua::reply(
            &inv,
            200,
            "OK",
            &d.local_tag,
            &format!("Contact: <{}>\r\n", bob().contact),
            "application/sdp",
            &bob_answer,
        ))
        .await
        .expect("200");
    bob_in.recv_request("ACK", WAIT).await.expect("alice's ACK");
    let heard = talk(&rtp2, alice_offer.addr, 0xb0b2).await;
    let list = edge.pinholes();
    assert!(
        packets_from(&list, "internal") >= 50,
        "{mode}: bob's RTP to alice: {list:#?}"
    );
    assert!(
        packets_from(&list, "external") >= 20,
        "{mode}: alice's RTP to bob: {list:#?}"
    );
    assert!(has_tone(&heard), "{mode}: alice's tone in her own call");
    baresip.ok("hangup", "");
    let bye = bob_in
        .recv_request("BYE", WAIT)
        .await
        .expect("alice hangs up from outside");
    bob_in
        .send(&testua::reply(&bye, 200, "OK", &d.local_tag, "", "", ""))
        .await
        .expect("200 BYE");
    wait_no_pinholes(&edge, mode, "alice's BYE");

    // --- the remote user's flow dies: a request for it gets 430.
    // SIGKILL: no de-registration, the connection just dies (as when a
    // NATed client loses its network).
    baresip.group.kill9();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let e = alice_entry(&registrations(&control)).expect("the binding stays until expiry");
        if e["flow_state"] == "failed" {
            break;
        }
        assert!(Instant::now() < deadline, "flow never marked failed: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut again = Dialog::outgoing(&bob(), "sip:alice@example.com");
    bob_conn.send(&again.invite(&offer)).await.expect("INVITE");
    let fail = final_response(&mut bob_conn).await;
    assert_eq!(
        fail.status(),
        Some(430),
        "RFC 5626 §5.3 Flow Failed through the PBX"
    );
    if let Some(ack) = again.ack_failure(&fail) {
        let _ = bob_conn.send(&ack).await;
    }

    // --- no open relay: a stranger outside gets 403, the carrier nothing.
    let carrier = testua::UaListener::bind(
        &edge.topo.peer,
        sa(CARRIER),
        &edge.pki.peer_cert,
        &edge.pki.peer_key,
    )
    .expect("carrier listens");
    let mut mallory = testua::connect_tls(
        &edge.topo.peer,
        sa("203.0.113.1:5061"),
        &edge.pki.ca,
        testua::EDGE_TLS_NAME,
        WAIT,
    )
    .await
    .expect("a stranger connects");
    for target in [
        "sip:+15551234@carrier.example",
        "sip:+15551234@example.com",
        "sip:bob@foreign.example",
    ] {
        let mut d = Dialog::outgoing(&stranger(), target);
        mallory
            .send(&d.invite(&offer.replace("10.77.0.2", "198.51.100.2")))
            .await
            .expect("INVITE");
        let r = final_response(&mut mallory).await;
        assert_eq!(r.status(), Some(403), "{target}: {:?}", r.header("Warning"));
        if let Some(ack) = d.ack_failure(&r) {
            let _ = mallory.send(&ack).await;
        }
    }
    assert!(
        carrier.accept(Duration::from_secs(1)).await.is_err(),
        "the carrier was reached from outside"
    );
    // The route is real: from inside, the carrier's domain reaches it.
    let mut inside = testua::connect_tls(
        &edge.topo.client,
        sa("10.77.0.1:5061"),
        &edge.pki.ca,
        testua::EDGE_TLS_NAME,
        WAIT,
    )
    .await
    .expect("inside connects to the edge");
    let mut o = Dialog::outgoing(&bob(), "sip:+15551234@carrier.example");
    inside
        .send(&o.request("OPTIONS", "", ""))
        .await
        .expect("OPTIONS");
    let mut at_carrier = carrier
        .accept(WAIT)
        .await
        .expect("the edge reaches the carrier");
    at_carrier
        .recv_request("OPTIONS", WAIT)
        .await
        .expect("the carrier gets the inside's OPTIONS");

    drop(at_carrier);
    kamailio.stop();
    edge.stop();
}

fn wait_no_pinholes(edge: &Edge, mode: &str, after: &str) {
    edge.assert_empty_within(&format!("{mode}: after {after}"), Duration::from_secs(5));
}
