//! Issue #9: a real softphone on plain UDP inside, through the edge's
//! internal UDP listener (`[proxy] internal_udp_listen`), to a real
//! softphone over TLS outside, media through XDP, checked by ear.
//!
//! Topology: Kamailio (Debian's, TLS, the provider's registrar/proxy for
//! example.net) runs outside at 198.51.100.2:5070 and is the edge's
//! `[[route]]` for example.net; baresip "alice" (outside) registers at it
//! directly over TLS; baresip "carol" (inside, 10.77.0.2:5090) registers
//! over UDP at the edge's UDP listener 10.77.0.1:5060 as its outbound
//! proxy, so its REGISTER, INVITEs and BYEs cross the edge UDP inside, TLS
//! outside. carol runs with baresip's SIP trace (`-s`) so the test reads
//! what she received.
//!
//! Checked: `sip-edge registrations --json` lists carol inside over
//! `udp` from her own source port, and the Contact the registrar stored
//! (Kamailio's log) is the edge's TLS token URI on its external address;
//! the responses carol receives carry her Via stamped `received` and
//! `rport` (RFC 3581); the INVITE she receives names the edge's UDP
//! listener in its Via, Record-Route and Contact (`transport=udp`); she calls alice and alice calls her, each hears the
//! other's tone (alice 700 Hz, carol 900 Hz) in its recording, and the
//! edge's pinholes count packets both ways; carol's de-registration on
//! exit removes her binding at the edge. Over the UDP leg too: hold and
//! resume from carol (re-INVITEs with `a=sendonly`/`a=sendrecv` over UDP:
//! the edge's ports stay, media crosses XDP both ways after the resume),
//! and an SRTP call (SDES `a=crypto`, `mediaenc=srtp-mand` on both sides:
//! the keys cross UDP and TLS legs unharmed or nobody hears anything).
//! With Debian's kamailio-outbound-modules, Kamailio is an RFC 5626
//! registrar (`Require: outbound`, `Flow-Timer: 10` in its 200, seen at
//! carol): carol's own STUN keep-alives reach the edge's UDP listener and
//! are answered while the calls run (packet sockets at the edge and at
//! carol). Needs root, kamailio +
//! kamailio-tls-modules and baresip-core; skips through
//! `testnet::record_skip` otherwise.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use sip_edge_tests::{
    edge::Edge,
    softphone::{self, capture, tone_secs, Baresip, BaresipSpec},
    testnet,
    testua::{self, TestPki},
};

/// Kamailio, the provider's registrar outside.
const PROVIDER: &str = "198.51.100.2:5070";
/// The edge's internal UDP listener.
const EDGE_UDP: &str = "10.77.0.1:5060";
/// carol's SIP address (UDP).
const CAROL: &str = "10.77.0.2:5090";
/// The provider's `Flow-Timer` (seconds) for outbound registrations.
const FLOW_TIMER: u32 = 10;
const ALICE_HZ: f64 = 700.0;
const CAROL_HZ: f64 = 900.0;
/// How long each call is listened to.
const LISTEN: Duration = Duration::from_secs(3);
/// Seconds of the other side's tone required in `LISTEN` (see
/// `softphones.rs`: a third, for a loaded VM).
const MIN_TONE_SECS: f64 = 1.0;

fn edge_config(pin_dir: &Path, pki: &TestPki, control: &Path) -> String {
    format!(
        r#"# issue #9 UDP softphone test configuration
{datapath}{proxy}[control]
socket = "{control}"
mode = "0600"
[[route]]
domain = "example.net"
host = "198.51.100.2"
port = 5070
tls_name = "{tls_name}"
"#,
        // XDP passes the UDP listener's port to the kernel too.
        datapath = testua::datapath_config(
            pin_dir,
            "mode = \"relay\"\nallowed_internal_subnets = [\"10.77.0.0/24\"]\n",
        )
        .replace("ports = [5061]", "ports = [5060, 5061]"),
        proxy = testua::proxy_table(pki, &format!("internal_udp_listen = \"{EDGE_UDP}\"\n")),
        control = control.display(),
        tls_name = testua::PEER_TLS_NAME,
    )
}

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

fn packets_from(list: &[Value], role: &str) -> u64 {
    list.iter()
        .filter(|e| e["role"] == role)
        .map(|e| e["packets"].as_u64().unwrap_or(0))
        .sum()
}

/// Listen `LISTEN` to an established call: XDP forwards packets both ways
/// and each phone hears the other's tone.
fn both_hear(what: &str, edge: &Edge, alice: &Baresip, carol: &Baresip) {
    let (a0, c0) = (alice.heard().samples.len(), carol.heard().samples.len());
    let before = edge.pinholes();
    let (out0, in0) = (
        packets_from(&before, "internal"),
        packets_from(&before, "external"),
    );
    std::thread::sleep(LISTEN);
    let list = edge.pinholes();
    let out = packets_from(&list, "internal").saturating_sub(out0);
    let inn = packets_from(&list, "external").saturating_sub(in0);
    let secs = |b: &Baresip, from: usize, hz: f64, own: f64| {
        let w = b.heard();
        let part = &w.samples[from.min(w.samples.len())..];
        tone_secs(part, w.rate, hz, &[own, 425.0, 300.0])
    };
    let a = secs(alice, a0, CAROL_HZ, ALICE_HZ);
    let c = secs(carol, c0, ALICE_HZ, CAROL_HZ);
    eprintln!(
        "{what}: alice heard {CAROL_HZ} Hz for {a:.1} s, carol heard {ALICE_HZ} Hz for {c:.1} s; XDP forwarded {out} packets out, {inn} in"
    );
    assert!(
        out >= 50 && inn >= 50,
        "{what}: XDP forwarded {out} out, {inn} in: {list:#?}"
    );
    assert!(
        a >= MIN_TONE_SECS && c >= MIN_TONE_SECS,
        "{what}: alice heard carol for {a:.1} s, carol heard alice for {c:.1} s\nalice:\n{}\ncarol:\n{}",
        alice.group.tail(),
        carol.group.tail()
    );
}

fn established(what: &str, alice: &mut Baresip, carol: &mut Baresip, marks: (usize, usize)) {
    let ok = alice.saw("established", marks.0, Duration::from_secs(15))
        && carol.saw("established", marks.1, Duration::from_secs(15));
    assert!(
        ok,
        "{what}: not established\nalice:\n{}\ncarol:\n{}",
        alice.group.tail(),
        carol.group.tail()
    );
}

fn hang_up(what: &str, edge: &Edge, from: &mut Baresip, other: &mut Baresip) {
    let mark = other.log_mark();
    from.ok("hangup", "");
    assert!(
        other.saw("terminated", mark, Duration::from_secs(10)),
        "{what}: the hang-up did not reach the other side\n{}\nhung up at:\n{}",
        other.group.tail(),
        from.group.tail()
    );
    edge.assert_empty_within(
        &format!("{what}: after the hang-up"),
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_millis(300));
    from.clear_recordings();
    other.clear_recordings();
}

/// Hold, then resume, from `from` (carol: re-INVITEs over UDP with
/// `a=sendonly`, then `a=sendrecv`, RFC 3264 §8.4): each phone sees both
/// SDP updates, the edge keeps the call's media ports, and media crosses
/// XDP both ways after the resume. By packet counts, as in
/// `softphones.rs`: baresip 1.0's `sndfile` stops writing after a
/// re-INVITE.
fn hold_resume(what: &str, edge: &Edge, from: &Baresip, other: &Baresip) {
    let ports = |list: Vec<Value>| {
        let mut l: Vec<String> = list.iter().map(|e| e["local"].to_string()).collect();
        l.sort();
        l
    };
    let before = ports(edge.pinholes());
    let marks = (from.log_mark(), other.log_mark());
    from.ok("hold", "");
    std::thread::sleep(Duration::from_millis(1500));
    from.ok("resume", "");
    std::thread::sleep(Duration::from_millis(500));
    for (b, mark) in [(from, marks.0), (other, marks.1)] {
        let log = b.group.log();
        let tail: Vec<&str> = log.lines().skip(mark).collect();
        assert!(
            tail.iter().filter(|l| l.contains("update 'audio'")).count() >= 2,
            "{what}: two SDP updates (hold, resume) at each phone\n{}",
            tail.join("\n")
        );
    }
    assert_eq!(
        ports(edge.pinholes()),
        before,
        "{what}: the edge's media ports moved on hold/resume"
    );
    let list0 = edge.pinholes();
    let (out0, in0) = (
        packets_from(&list0, "internal"),
        packets_from(&list0, "external"),
    );
    std::thread::sleep(LISTEN);
    let list = edge.pinholes();
    let out = packets_from(&list, "internal").saturating_sub(out0);
    let inn = packets_from(&list, "external").saturating_sub(in0);
    eprintln!("{what} after resume: XDP forwarded {out} packets out, {inn} in");
    assert!(
        out >= 50 && inn >= 50,
        "{what} after resume: XDP forwarded {out} out, {inn} in: {list:#?}"
    );
}

/// The SIP messages baresip's trace (`-s`) logged as received from
/// `from`, each as its text (libre prints `<proto> <src> -> <dst>` above
/// each).
fn received_from(log: &str, from: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in log.lines() {
        if line.contains(" -> ") && line.contains(':') && !line.contains("SIP/2.0") {
            if let Some(m) = cur.take() {
                out.push(m);
            }
            // "UDP 10.77.0.1:5060 -> 10.77.0.2:5090"
            let words: Vec<&str> = line.split_whitespace().collect();
            let src = words
                .iter()
                .position(|w| *w == "->")
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| words.get(i));
            if src == Some(&from) {
                cur = Some(String::new());
            }
            continue;
        }
        if let Some(m) = cur.as_mut() {
            m.push_str(line);
            m.push('\n');
        }
    }
    out.extend(cur);
    out
}

#[tokio::test(flavor = "current_thread")]
async fn udp_baresip_inside_calls_and_is_called_by_tls_baresip_outside() {
    let name = "udp_softphones::udp_baresip_inside_calls_and_is_called_by_tls_baresip_outside";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(name, &reason);
        return;
    }
    let Some(modules) = softphone::kamailio_modules() else {
        testnet::record_skip(name, "kamailio with tls.so/registrar.so not installed (apt-get install kamailio kamailio-tls-modules)");
        return;
    };
    if !softphone::which("kamailio") || !softphone::baresip_installed() {
        testnet::record_skip(name, "kamailio or baresip not installed (apt-get install kamailio kamailio-tls-modules baresip-core)");
        return;
    }
    let started = Instant::now();
    let tag = format!("p2u{}", std::process::id());
    let mut edge = Edge::prepare(&tag);
    let control = edge.dir().join("control.sock");
    edge.write_config(&edge_config(&edge.pin_dir, &edge.pki, &control));
    edge.run_agent_within(Duration::from_secs(15));
    // Kamailio serves the peer's certificate (valid for 198.51.100.2,
    // the host its Record-Route names, which the edge verifies).
    let provider_pki = TestPki {
        client_cert: edge.pki.peer_cert.clone(),
        client_key: edge.pki.peer_key.clone(),
        ..edge.pki.clone()
    };
    // An RFC 5626 registrar (when Debian's outbound module is there):
    // its 200 carries `Require: outbound` and `Flow-Timer`, so carol
    // keeps her UDP flow alive with STUN every 8-10 s (§4.4.1).
    let outbound = softphone::kamailio_outbound_installed(&modules);
    let mut kcfg = softphone::kamailio_cfg(&provider_pki, &modules, PROVIDER);
    if outbound {
        kcfg = softphone::kamailio_outbound_cfg(&kcfg, FLOW_TIMER);
    } else {
        testnet::record_skip(
            "udp_softphones::udp_baresip_inside_calls_and_is_called_by_tls_baresip_outside (STUN keep-alive check)",
            "kamailio-outbound-modules not installed (apt-get install kamailio-outbound-modules)",
        );
    }
    let mut kamailio = softphone::start_kamailio_cfg(&edge.topo.peer, edge.dir(), &kcfg, PROVIDER);
    let mut alice = Baresip::start(
        &edge.topo.peer,
        edge.dir(),
        &edge.pki.ca,
        &BaresipSpec {
            name: "alice",
            listen: "198.51.100.2:5060",
            tone_hz: ALICE_HZ as u32,
            accounts: ["alice", "alice-srtp"]
                .iter()
                .zip(["", ";mediaenc=srtp-mand"])
                .map(|(user, enc)| format!("<sip:{user}@example.net;transport=tls>;auth_pass=none;outbound=\"sip:{PROVIDER};transport=tls\";regint=60;answermode=auto;audio_codecs=pcmu{enc}"))
                .collect(),
            modules: &["srtp.so"],
            extra: "rtcp_mux yes\n",
            identity: Some((&edge.pki.peer_cert, &edge.pki.peer_key)),
        },
    );
    let mut carol = Baresip::start_with_args(
        &edge.topo.client,
        edge.dir(),
        &edge.pki.ca,
        &BaresipSpec {
            name: "carol",
            listen: CAROL,
            tone_hz: CAROL_HZ as u32,
            accounts: ["carol", "carol-srtp"]
                .iter()
                .zip(["", ";mediaenc=srtp-mand"])
                .map(|(user, enc)| format!("<sip:{user}@example.net;transport=udp>;auth_pass=none;outbound=\"sip:{EDGE_UDP};transport=udp\";sipnat=outbound;regint=60;answermode=auto;audio_codecs=pcmu{enc}"))
                .collect(),
            // RFC 5626 needs a +sip.instance: uuid.so makes one.
            modules: &["uuid.so", "srtp.so"],
            extra: "rtcp_mux yes\n",
            identity: None,
        },
        &["-s"],
    );

    // --- carol registers over UDP through the edge; alice at Kamailio.
    let deadline = Instant::now() + Duration::from_secs(20);
    let entry = loop {
        let regs = registrations(&control);
        if let Some(e) = regs["registrations"]
            .as_array()
            .and_then(|l| l.iter().find(|r| r["aor"] == "carol@example.net"))
        {
            break e.clone();
        }
        assert!(
            carol.group.alive() && Instant::now() < deadline,
            "carol never registered through the edge: {regs}\ncarol:\n{}\nkamailio:\n{}",
            carol.group.tail(),
            kamailio.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("carol's registration at the edge: {entry}");
    assert_eq!(entry["side"], "inside", "{entry}");
    assert_eq!(entry["transport"], "udp", "{entry}");
    assert_eq!(entry["source"], CAROL, "{entry}");
    assert_eq!(entry["flow_state"], "up", "{entry}");
    let edge_contact = entry["edge_contact"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        edge_contact.starts_with("sip:")
            && edge_contact.contains("@203.0.113.1:5061;transport=tls"),
        "the registrar gets a TLS Contact on the edge's outside: {entry}"
    );
    // What Kamailio stored: that same TLS Contact (its xlog line).
    let klog = kamailio.log();
    let user = edge_contact
        .trim_start_matches("sip:")
        .split('@')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        klog.lines().any(|l| l.contains("REGISTER")
            && l.contains(&format!("{user}@203.0.113.1:5061;transport=tls"))),
        "Kamailio never got the edge's TLS Contact {edge_contact}\n{}",
        kamailio.tail()
    );
    assert!(
        alice.saw(
            "alice@example.net: {0/TLS/v4} 200 OK",
            0,
            Duration::from_secs(20)
        ),
        "alice never registered at the provider\n{}",
        alice.group.tail()
    );
    // RFC 3581: the 200 to carol's REGISTER came to her source port over
    // UDP, her Via stamped with where the edge saw her.
    let clog = carol.group.log();
    let from_edge = received_from(&clog, EDGE_UDP);
    let ok = from_edge
        .iter()
        .find(|m| m.starts_with("SIP/2.0 200") && m.contains("REGISTER"))
        .unwrap_or_else(|| panic!("no 200 to REGISTER from {EDGE_UDP} in carol's trace:\n{clog}"));
    let via = ok
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("via:"))
        .unwrap_or_default();
    eprintln!("carol's REGISTER 200 Via: {via}");
    assert!(
        via.contains("SIP/2.0/UDP 10.77.0.2:5090")
            && via.contains("received=10.77.0.2")
            && via.contains("rport=5090"),
        "carol's Via not stamped (RFC 3581): {via}\n{ok}"
    );
    eprintln!("registered after {:?}", started.elapsed());
    // RFC 5626 §4.4.2: carol's STUN keep-alives to the edge's UDP
    // listener and the edge's answers, watched while the calls run.
    // Requests are watched where they arrive (the edge), answers at carol.
    let keepalives = outbound.then(|| {
        [edge.topo.edge.clone(), edge.topo.client.clone()].map(|ns| {
            std::thread::spawn(move || {
                capture::stun_bindings(
                    &ns,
                    CAROL.parse().expect("carol"),
                    EDGE_UDP.parse().expect("edge"),
                    Duration::from_secs(u64::from(FLOW_TIMER) + 4),
                )
            })
        })
    });
    if outbound {
        let hdr = |name: &str| {
            ok.lines()
                .find(|l| l.to_ascii_lowercase().starts_with(name))
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            hdr("require:").contains("outbound")
                && hdr("flow-timer:").contains(&FLOW_TIMER.to_string()),
            "the outbound registrar's 200 reaches carol with Require: outbound and Flow-Timer\n{ok}"
        );
    }

    // --- carol (UDP, inside) calls alice (TLS, outside); alice hangs up.
    let what = "carol (UDP inside) calls alice (TLS outside)";
    let marks = (alice.log_mark(), carol.log_mark());
    carol.ok("dial", "sip:alice@example.net");
    established(what, &mut alice, &mut carol, marks);
    both_hear(what, &edge, &alice, &carol);
    hang_up(what, &edge, &mut alice, &mut carol);

    // --- alice calls carol; carol hangs up.
    let what = "alice (TLS outside) calls carol (UDP inside)";
    let marks = (alice.log_mark(), carol.log_mark());
    let cmark = carol.group.log().len();
    alice.ok("dial", "sip:carol@example.net");
    established(what, &mut alice, &mut carol, marks);
    let clog = carol.group.log();
    let invite = received_from(&clog[cmark.min(clog.len())..], EDGE_UDP)
        .into_iter()
        .find(|m| m.starts_with("INVITE "))
        .unwrap_or_else(|| panic!("{what}: no INVITE from {EDGE_UDP} in carol's trace"));
    let hdr = |name: &str| {
        invite
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    eprintln!(
        "{what}: INVITE at carol: Via {:?} Record-Route {:?} Contact {:?}",
        hdr("via"),
        hdr("record-route"),
        hdr("contact")
    );
    assert!(
        hdr("via")
            .first()
            .is_some_and(|v| v.contains("SIP/2.0/UDP 10.77.0.1:5060")),
        "{what}: the edge's Via toward carol names its UDP listener\n{invite}"
    );
    assert!(
        hdr("record-route")
            .first()
            .is_some_and(|v| v.contains("10.77.0.1:5060;transport=udp")),
        "{what}: the edge's Record-Route toward carol names its UDP listener\n{invite}"
    );
    // The remote target carol gets is reachable the way she talks to the
    // edge: its UDP listener, transport=udp (issue #9).
    assert!(
        hdr("contact")
            .first()
            .is_some_and(|v| v.contains("@10.77.0.1:5060;transport=udp>")),
        "{what}: the Contact toward carol names the edge's UDP listener\n{invite}"
    );
    both_hear(what, &edge, &alice, &carol);
    hold_resume(what, &edge, &carol, &alice);
    hang_up(what, &edge, &mut carol, &mut alice);

    // --- SRTP over the UDP leg: carol-srtp calls alice-srtp.
    let what = "SRTP: carol-srtp (UDP inside) calls alice-srtp (TLS outside)";
    let deadline = Instant::now() + Duration::from_secs(20);
    while !registrations(&control)["registrations"]
        .as_array()
        .is_some_and(|l| l.iter().any(|r| r["aor"] == "carol-srtp@example.net"))
    {
        assert!(
            Instant::now() < deadline,
            "{what}: carol-srtp never registered through the edge\n{}",
            carol.group.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let marks = (alice.log_mark(), carol.log_mark());
    carol.ok("uafind", "sip:carol-srtp@example.net");
    carol.ok("dial", "sip:alice-srtp@example.net");
    established(what, &mut alice, &mut carol, marks);
    // carol's trace: the answer that came back over UDP carries the
    // other side's SDES key (RFC 4568) on an RTP/SAVP stream.
    let clog = carol.group.log();
    let tail: Vec<&str> = clog.lines().skip(marks.1).collect();
    assert!(
        tail.iter()
            .any(|l| l.starts_with("m=audio") && l.contains("RTP/SAVP"))
            && tail.iter().any(|l| l.starts_with("a=crypto:")),
        "{what}: no RTP/SAVP stream with a=crypto in carol's trace\n{}",
        tail.join("\n")
    );
    both_hear(what, &edge, &alice, &carol);
    // carol made carol-srtp her current account; alice's `hangup` would
    // act on her current one, not the one that answered.
    hang_up(what, &edge, &mut carol, &mut alice);

    if let Some([at_edge, at_carol]) = keepalives {
        let (requests, _) = at_edge
            .join()
            .expect("capture thread")
            .expect("capture at the edge");
        let (_, responses) = at_carol
            .join()
            .expect("capture thread")
            .expect("capture at carol");
        eprintln!(
            "STUN keep-alives in {} s: carol sent {requests} Binding requests to {EDGE_UDP}, the edge answered {responses}",
            FLOW_TIMER + 4
        );
        assert!(
            requests >= 1 && responses >= requests,
            "carol's STUN keep-alives (Flow-Timer {FLOW_TIMER} s): {requests} requests, {responses} answers"
        );
    }
    eprintln!("all scenarios after {:?}", started.elapsed());
    alice.group.stop();
    // baresip de-registers on SIGTERM (Contact `;expires=0`, no Expires
    // header): the edge drops carol's binding instead of keeping it.
    carol.group.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let regs = registrations(&control);
        let kept = regs["registrations"]
            .as_array()
            .is_some_and(|l| l.iter().any(|r| r["aor"] == "carol@example.net"));
        if !kept {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "carol's binding outlived her de-registration: {regs}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    kamailio.stop();
    edge.stop();
}
