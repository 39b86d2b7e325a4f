//! Issue #9: real softphones through the edge over TLS, media through XDP,
//! checked by ear on the receiving side.
//!
//! Topology (one edge per media mode, started once): the agent with
//! `[access]` for example.com and Kamailio (Debian's, the inside
//! registrar/PBX, TLS, Path support) as internal next hop; baresip "bob"
//! (Debian's) inside, registered at Kamailio directly; baresip "alice"
//! outside, registered through the edge (a remote user). Each sends its
//! own `ausine` tone (alice 700 Hz, bob 1100 Hz) and writes what it plays
//! to a WAV file; a call passes only when each side's recording holds the
//! other's tone for a good part of the time (some loss allowed on a loaded
//! VM; a call without audio scores nothing) and the edge's pinholes
//! counted packets both ways.
//!
//! Scenarios in order: registration through the edge (`sip-edge
//! registrations`); inside to outside call, hold and resume from inside,
//! hang-up from outside; outside to inside call, hold and resume from
//! outside, hang-up from inside; an SRTP call (SDES `a=crypto`, baresip
//! `mediaenc=srtp-mand`) whose keys must cross the edge unharmed for either
//! side to hear anything. Every baresip call offers `a=rtcp-mux` (RFC
//! 5761). A third test puts linphonec (linphone-cli) outside instead.
//! Needs root, kamailio + kamailio-tls-modules, baresip-core and
//! linphone-cli; skips through `testnet::record_skip` otherwise.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use sip_edge_tests::{
    edge::Edge,
    softphone::{self, capture, tone_secs, Baresip, BaresipSpec, Group, Linphone, Wav},
    testnet,
    testua::{self, TestPki},
};

/// Both baresips offer and accept `a=rtcp-mux` (RFC 5761): RTP and RTCP
/// on one port through one pinhole.
const MUX: &str = "rtcp_mux yes\n";
/// Where every baresip here receives RTP (`rtp_ports` of
/// `softphone::Baresip`).
const RTP_PORTS: std::ops::RangeInclusive<u16> = 20000..=20999;
/// Kamailio, the inside registrar/PBX.
const PBX: &str = "10.77.0.2:5070";
/// alice's (outside) tone.
const ALICE_HZ: f64 = 700.0;
/// bob's (inside) tone.
const BOB_HZ: f64 = 1100.0;
/// How long each check listens.
const LISTEN: Duration = Duration::from_secs(3);
/// Seconds of the other side's tone required in `LISTEN` (3 s): a third,
/// so a loaded VM may lose or delay a good part of the audio, while a call
/// without audio (0 s) or with one-way audio fails.
const MIN_TONE_SECS: f64 = 1.0;

fn edge_config(pin_dir: &Path, pki: &TestPki, control: &Path, mode: &str) -> String {
    format!(
        r#"# issue #9 softphone test configuration
{datapath}{proxy}[access]
served_domains = ["example.com"]
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
        control = control.display(),
    )
}

/// A baresip account line: `user@example.com` over TLS via `outbound`,
/// auto-answer, PCMU only, `extra` parameters appended.
fn account(user: &str, outbound: &str, extra: &str) -> String {
    format!(
        "<sip:{user}@example.com;transport=tls>;auth_pass=none;outbound=\"sip:{outbound};transport=tls\";regint=60;answermode=auto;audio_codecs=pcmu{extra}"
    )
}

/// alice, outside; `extra` config lines (`rtcp_mux yes`).
fn alice_spec<'a>(pki: &'a TestPki, extra: &'a str) -> BaresipSpec<'a> {
    BaresipSpec {
        name: "alice",
        listen: "198.51.100.2:5060",
        tone_hz: ALICE_HZ as u32,
        accounts: vec![
            account("alice", "203.0.113.1:5061", ""),
            account("alice-srtp", "203.0.113.1:5061", ";mediaenc=srtp-mand"),
        ],
        modules: &["srtp.so"],
        extra,
        identity: Some((&pki.peer_cert, &pki.peer_key)),
    }
}

/// bob, inside; `extra` config lines (`rtcp_mux yes`).
fn bob_spec<'a>(pki: &'a TestPki, extra: &'a str) -> BaresipSpec<'a> {
    BaresipSpec {
        name: "bob",
        listen: "10.77.0.2:5080",
        tone_hz: BOB_HZ as u32,
        accounts: vec![
            account("bob", PBX, ""),
            account("bob-srtp", PBX, ";mediaenc=srtp-mand"),
        ],
        modules: &["srtp.so"],
        extra,
        identity: Some((&pki.client_cert, &pki.client_key)),
    }
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

fn registered(control: &Path, aor: &str) -> Option<Value> {
    registrations(control)["registrations"]
        .as_array()?
        .iter()
        .find(|r| r["aor"] == aor)
        .cloned()
}

/// Packets of the rules matching packets that arrive on `role`'s side.
fn packets_from(list: &[Value], role: &str) -> u64 {
    list.iter()
        .filter(|e| e["role"] == role)
        .map(|e| e["packets"].as_u64().unwrap_or(0))
        .sum()
}

/// One phone as the checks see it: what it recorded so far, the tone it
/// sends, and its logs for failure messages.
struct Ear<'a> {
    who: &'static str,
    heard: &'a dyn Fn() -> Wav,
    sends_hz: f64,
    log: &'a dyn Fn() -> String,
}

impl<'a> Ear<'a> {
    fn baresip(
        who: &'static str,
        b: &'a Baresip,
        heard: &'a dyn Fn() -> Wav,
        log: &'a dyn Fn() -> String,
    ) -> Ear<'a> {
        Ear {
            who,
            heard,
            sends_hz: f64::from(b.tone_hz),
            log,
        }
    }
}

/// Seconds of `freq` in what `ear` recorded since sample `from` (the
/// whole recording when it restarted since), and seconds recorded.
fn heard_secs(ear: &Ear<'_>, from: usize, freq: f64) -> (f64, f64) {
    let w = (ear.heard)();
    let start = if w.samples.len() >= from { from } else { 0 };
    let part = &w.samples[start..];
    (
        tone_secs(part, w.rate, freq, &[ear.sends_hz, 425.0, 300.0]),
        part.len() as f64 / f64::from(w.rate),
    )
}

/// Listen for `LISTEN` and require the edge's pinholes to have counted
/// packets both ways and, `by_ear`, each side to have heard the other's
/// tone (`outside` hears `inside`'s and the other way round).
fn both_hear(what: &str, edge: &Edge, outside: &Ear<'_>, inside: &Ear<'_>, by_ear: bool) {
    let (o0, i0) = (
        (outside.heard)().samples.len(),
        (inside.heard)().samples.len(),
    );
    let before = edge.pinholes();
    let (out0, in0) = (
        packets_from(&before, "internal"),
        packets_from(&before, "external"),
    );
    std::thread::sleep(LISTEN);
    let (o_heard, o_secs) = heard_secs(outside, o0, inside.sends_hz);
    let (i_heard, i_secs) = heard_secs(inside, i0, outside.sends_hz);
    let list = edge.pinholes();
    let out = packets_from(&list, "internal").saturating_sub(out0);
    let inn = packets_from(&list, "external").saturating_sub(in0);
    eprintln!(
        "{what}: {} heard {} Hz for {o_heard:.1} s of {o_secs:.1} s, {} heard {} Hz for {i_heard:.1} s of {i_secs:.1} s; XDP forwarded {out} packets out, {inn} in",
        outside.who, inside.sends_hz, inside.who, outside.sends_hz
    );
    // 50 packets/s each way at 20 ms ptime: a third of them at least.
    assert!(
        out >= 50,
        "{what}: XDP forwarded {out} packets inside to outside: {list:#?}"
    );
    assert!(
        inn >= 50,
        "{what}: XDP forwarded {inn} packets outside to inside: {list:#?}"
    );
    if !by_ear {
        return;
    }
    for (ear, heard, secs, other) in [
        (inside, i_heard, i_secs, outside),
        (outside, o_heard, o_secs, inside),
    ] {
        assert!(
            heard >= MIN_TONE_SECS,
            "{what}: {} heard {}'s {} Hz tone for {heard:.1} s of {secs:.1} s\n{}:\n{}\n{}:\n{}",
            ear.who,
            other.who,
            other.sends_hz,
            outside.who,
            (outside.log)(),
            inside.who,
            (inside.log)()
        );
    }
}

/// Wait until both phones logged the call as established.
fn established(
    what: &str,
    marks: (usize, usize),
    alice: &mut Baresip,
    bob: &mut Baresip,
    kamailio: &Group,
) {
    let ok = alice.saw("established", marks.0, Duration::from_secs(15))
        && bob.saw("established", marks.1, Duration::from_secs(15));
    assert!(
        ok,
        "{what}: the call was not established\nalice:\n{}\nbob:\n{}\nkamailio:\n{}",
        alice.group.tail(),
        bob.group.tail(),
        kamailio.tail()
    );
    eprintln!("{what}: established");
}

/// Hang up on `from`'s side, wait for the other side to see the call end,
/// for the edge to remove every pinhole, and start fresh recordings.
fn hang_up(what: &str, edge: &Edge, from: &mut Baresip, other: &mut Baresip) {
    let mark = other.log_mark();
    from.ok("hangup", "");
    assert!(
        other.saw("terminated", mark, Duration::from_secs(10)),
        "{what}: the hang-up did not reach the other side\n{}",
        other.group.tail()
    );
    edge.assert_empty_within(
        &format!("{what}: after the hang-up"),
        Duration::from_secs(5),
    );
    // The next call's recordings start empty: a call without audio must
    // never pass on what an earlier call wrote.
    std::thread::sleep(Duration::from_millis(300));
    from.clear_recordings();
    other.clear_recordings();
}

/// Hold, then resume, driven from `from` (re-INVITEs with `a=sendonly`,
/// then `a=sendrecv`, RFC 3264 §8.4): the edge keeps the call's media
/// ports, and media crosses XDP both ways again after the resume. By
/// packet counts, not by ear: baresip 1.0's `sndfile` stops writing what
/// it decodes after a re-INVITE, also in a direct call on loopback with no
/// edge in between.
fn hold_resume(what: &str, edge: &Edge, from: &Baresip, alice: &Baresip, bob: &Baresip) {
    let (a_heard, a_log) = (|| alice.heard(), || alice.group.tail());
    let (b_heard, b_log) = (|| bob.heard(), || bob.group.tail());
    let ports = |list: Vec<Value>| {
        let mut l: Vec<String> = list.iter().map(|e| e["local"].to_string()).collect();
        l.sort();
        l
    };
    let before = ports(edge.pinholes());
    let marks = (alice.log_mark(), bob.log_mark());
    from.ok("hold", "");
    std::thread::sleep(Duration::from_millis(1500));
    from.ok("resume", "");
    std::thread::sleep(Duration::from_millis(500));
    for (b, mark) in [(alice, marks.0), (bob, marks.1)] {
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
    both_hear(
        &format!("{what} after resume"),
        edge,
        &Ear::baresip("alice", alice, &a_heard, &a_log),
        &Ear::baresip("bob", bob, &b_heard, &b_log),
        false,
    );
}

#[tokio::test(flavor = "current_thread")]
async fn relay_mode_baresip_to_baresip_through_the_edge() {
    scenario("relay").await;
}

#[tokio::test(flavor = "current_thread")]
async fn nat_mode_baresip_to_baresip_through_the_edge() {
    scenario("nat").await;
}

async fn scenario(mode: &str) {
    let name = format!("softphones::{mode}_mode_baresip_to_baresip_through_the_edge");
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(&name, &reason);
        return;
    }
    let Some(modules) = softphone::kamailio_modules() else {
        testnet::record_skip(&name, "kamailio with tls.so/registrar.so not installed (apt-get install kamailio kamailio-tls-modules)");
        return;
    };
    if !softphone::which("kamailio") || !softphone::baresip_installed() {
        testnet::record_skip(&name, "kamailio or baresip not installed (apt-get install kamailio kamailio-tls-modules baresip-core)");
        return;
    }
    let started = Instant::now();
    let tag = format!("p2{}{}", &mode[..1], std::process::id());
    let mut edge = Edge::prepare(&tag);
    let control = edge.dir().join("control.sock");
    edge.write_config(&edge_config(&edge.pin_dir, &edge.pki, &control, mode));
    edge.run_agent_within(Duration::from_secs(15));
    let mut kamailio =
        softphone::start_kamailio(&edge.topo.client, edge.dir(), &edge.pki, &modules, PBX);

    // --- registration: bob at the PBX, alice through the edge.
    let mut bob = Baresip::start(
        &edge.topo.client,
        edge.dir(),
        &edge.pki.ca,
        &bob_spec(&edge.pki, MUX),
    );
    let mut alice = Baresip::start(
        &edge.topo.peer,
        edge.dir(),
        &edge.pki.ca,
        &alice_spec(&edge.pki, MUX),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    for aor in ["alice@example.com", "alice-srtp@example.com"] {
        let entry = loop {
            if let Some(e) = registered(&control, aor) {
                break e;
            }
            assert!(
                alice.group.alive() && Instant::now() < deadline,
                "{aor} never registered through the edge\nalice:\n{}\nkamailio:\n{}",
                alice.group.tail(),
                kamailio.tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(entry["side"], "outside", "{entry}");
        assert_eq!(entry["transport"], "tls", "{entry}");
        assert_eq!(entry["flow_state"], "up", "{entry}");
    }
    for aor in ["bob@example.com", "bob-srtp@example.com"] {
        // baresip logs "<aor>: {0/TLS/v4} 200 OK ... [1 binding]".
        let deadline = Instant::now() + Duration::from_secs(20);
        while !bob
            .group
            .log()
            .lines()
            .any(|l| l.contains(&format!("{aor}:")) && l.contains("200 OK"))
        {
            assert!(
                bob.group.alive() && Instant::now() < deadline,
                "{aor} never registered at the PBX\nbob:\n{}",
                bob.group.tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    eprintln!("{mode}: registered after {:?}", started.elapsed());

    // --- inside calls outside; hold/resume from inside; outside hangs up.
    let what = format!("{mode}: bob (inside) calls alice (outside)");
    let marks = (alice.log_mark(), bob.log_mark());
    bob.ok("dial", "sip:alice@example.com");
    established(&what, marks, &mut alice, &mut bob, &kamailio);
    both_hear(
        &what,
        &edge,
        &Ear::baresip("alice", &alice, &|| alice.heard(), &|| alice.group.tail()),
        &Ear::baresip("bob", &bob, &|| bob.heard(), &|| bob.group.tail()),
        true,
    );
    hold_resume(&what, &edge, &bob, &alice, &bob);
    hang_up(&what, &edge, &mut alice, &mut bob);

    // --- outside calls inside; hold/resume from outside; inside hangs up.
    let what = format!("{mode}: alice (outside) calls bob (inside)");
    let marks = (alice.log_mark(), bob.log_mark());
    alice.ok("dial", "sip:bob@example.com");
    established(&what, marks, &mut alice, &mut bob, &kamailio);
    both_hear(
        &what,
        &edge,
        &Ear::baresip("alice", &alice, &|| alice.heard(), &|| alice.group.tail()),
        &Ear::baresip("bob", &bob, &|| bob.heard(), &|| bob.group.tail()),
        true,
    );
    hold_resume(&what, &edge, &alice, &alice, &bob);
    hang_up(&what, &edge, &mut bob, &mut alice);

    // --- SRTP (SDES, RFC 4568): the keys cross the edge in a=crypto.
    let what = format!("{mode}: SRTP call alice-srtp to bob-srtp");
    let marks = (alice.log_mark(), bob.log_mark());
    alice.ok("uafind", "sip:alice-srtp@example.com");
    alice.ok("dial", "sip:bob-srtp@example.com");
    established(&what, marks, &mut alice, &mut bob, &kamailio);
    both_hear(
        &what,
        &edge,
        &Ear::baresip("alice", &alice, &|| alice.heard(), &|| alice.group.tail()),
        &Ear::baresip("bob", &bob, &|| bob.heard(), &|| bob.group.tail()),
        true,
    );
    hang_up(&what, &edge, &mut alice, &mut bob);

    eprintln!("{mode}: all scenarios after {:?}", started.elapsed());
    alice.group.stop();
    bob.group.stop();
    kamailio.stop();
    edge.stop();
}

/// carol's (outside, linphonec) tone.
const CAROL_HZ: f64 = 500.0;

/// A second SIP stack outside: linphonec (liblinphone 5.1, belle-sip,
/// mediastreamer2) registers through the edge over TLS; bob (baresip,
/// inside) calls it and it hangs up, then it calls bob and bob hangs up;
/// each hears the other's tone (linphonec plays a WAV file this test
/// writes and records what it receives).
#[tokio::test(flavor = "current_thread")]
async fn linphone_outside_calls_and_is_called_by_baresip_inside() {
    let name = "softphones::linphone_outside_calls_and_is_called_by_baresip_inside";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(name, &reason);
        return;
    }
    let Some(modules) = softphone::kamailio_modules() else {
        testnet::record_skip(name, "kamailio with tls.so/registrar.so not installed (apt-get install kamailio kamailio-tls-modules)");
        return;
    };
    if !softphone::which("kamailio")
        || !softphone::baresip_installed()
        || !softphone::which("linphonec")
    {
        testnet::record_skip(name, "kamailio, baresip or linphonec not installed (apt-get install kamailio kamailio-tls-modules baresip-core linphone-cli)");
        return;
    }
    let mode = "relay";
    let started = Instant::now();
    let tag = format!("p2l{}", std::process::id());
    let mut edge = Edge::prepare(&tag);
    // liblinphone calls the network down ("Local loopback network only")
    // five seconds after start when no default route gives it a local
    // address, and then closes its flows. The outside host's default route
    // points at the edge, whose namespace has no way further: whatever
    // else linphonec might try (DNS) dies there.
    testnet::sh(&[
        "ip",
        "-n",
        &edge.topo.peer,
        "route",
        "add",
        "default",
        "via",
        "203.0.113.1",
        "dev",
        "eth0",
    ])
    .expect("default route outside");
    let control = edge.dir().join("control.sock");
    edge.write_config(&edge_config(&edge.pin_dir, &edge.pki, &control, mode));
    edge.run_agent_within(Duration::from_secs(15));
    let mut kamailio =
        softphone::start_kamailio(&edge.topo.client, edge.dir(), &edge.pki, &modules, PBX);
    let mut bob = Baresip::start(
        &edge.topo.client,
        edge.dir(),
        &edge.pki.ca,
        &bob_spec(&edge.pki, ""),
    );
    let mut carol = Linphone::start(
        &edge.topo.peer,
        edge.dir(),
        &edge.pki.ca,
        "carol@example.com",
        "203.0.113.1:5061",
        CAROL_HZ as u32,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let entry = loop {
        if let Some(e) = registered(&control, "carol@example.com") {
            break e;
        }
        assert!(
            carol.group.alive() && Instant::now() < deadline,
            "linphonec never registered through the edge\nlinphonec:\n{}\nkamailio:\n{}",
            carol.group.tail(),
            kamailio.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(entry["transport"], "tls", "{entry}");
    assert!(
        bob.saw(
            "bob@example.com: {0/TLS/v4} 200 OK",
            0,
            Duration::from_secs(20)
        ),
        "bob never registered at the PBX\n{}",
        bob.group.tail()
    );

    // --- bob (inside) calls carol (outside); carol hangs up.
    let what = "linphonec: bob (inside) calls carol (outside)";
    let marks = (carol.log_mark(), bob.log_mark());
    bob.ok("dial", "sip:carol@example.com");
    let ok = bob.saw("established", marks.1, Duration::from_secs(15))
        && carol.saw("connected", marks.0, Duration::from_secs(15));
    assert!(
        ok,
        "{what}: not established\nlinphonec:\n{}\nbob:\n{}\nkamailio:\n{}",
        carol.group.tail(),
        bob.group.tail(),
        kamailio.tail()
    );
    listen_both(what, &edge, &carol, &bob);
    let mark = bob.log_mark();
    carol.send("terminate");
    assert!(
        bob.saw("terminated", mark, Duration::from_secs(10)),
        "{what}: linphonec's BYE never reached bob\n{}\n{}",
        carol.group.tail(),
        bob.group.tail()
    );
    edge.assert_empty_within(
        &format!("{what}: after the hang-up"),
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_millis(300));
    carol_heard(what, &carol);
    bob.clear_recordings();
    let _ = std::fs::remove_file(&carol.heard);

    // --- carol (outside) calls bob (inside); bob hangs up.
    let what = "linphonec: carol (outside) calls bob (inside)";
    let marks = (carol.log_mark(), bob.log_mark());
    carol.send("call sip:bob@example.com");
    let ok = bob.saw("established", marks.1, Duration::from_secs(15))
        && carol.saw("connected", marks.0, Duration::from_secs(15));
    assert!(
        ok,
        "{what}: not established\nlinphonec:\n{}\nbob:\n{}\nkamailio:\n{}",
        carol.group.tail(),
        bob.group.tail(),
        kamailio.tail()
    );
    listen_both(what, &edge, &carol, &bob);
    let mark = carol.log_mark();
    bob.ok("hangup", "");
    assert!(
        carol.saw("ended", mark, Duration::from_secs(10)),
        "{what}: bob's BYE never reached linphonec\n{}\nkamailio:\n{}",
        carol.group.tail(),
        kamailio.tail()
    );
    edge.assert_empty_within(
        &format!("{what}: after the hang-up"),
        Duration::from_secs(5),
    );

    carol_heard(what, &carol);

    eprintln!("linphonec: all scenarios after {:?}", started.elapsed());
    carol.send("quit");
    carol.group.stop();
    bob.group.stop();
    kamailio.stop();
    edge.stop();
}

/// During a call with carol: media through XDP both ways, and bob hears
/// carol's tone.
fn listen_both(what: &str, edge: &Edge, carol: &Linphone, bob: &Baresip) {
    let b0 = bob.heard().samples.len();
    both_hear(
        what,
        edge,
        &Ear {
            who: "carol (linphonec)",
            heard: &|| carol.heard(),
            sends_hz: CAROL_HZ,
            log: &|| carol.group.tail(),
        },
        &Ear::baresip("bob", bob, &|| bob.heard(), &|| bob.group.tail()),
        false,
    );
    let w = bob.heard();
    let part = &w.samples[b0.min(w.samples.len())..];
    let secs = tone_secs(part, w.rate, CAROL_HZ, &[BOB_HZ, 425.0, 300.0]);
    eprintln!("{what}: bob heard carol's {CAROL_HZ} Hz for {secs:.1} s");
    assert!(
        secs >= MIN_TONE_SECS,
        "{what}: bob heard carol's {CAROL_HZ} Hz tone for {secs:.1} s\n{}",
        bob.group.tail()
    );
}

/// After a call with bob ended: carol's recording of it holds bob's tone.
fn carol_heard(what: &str, carol: &Linphone) {
    let deadline = Instant::now() + Duration::from_secs(3);
    let secs = loop {
        let w = carol.heard();
        let secs = tone_secs(&w.samples, w.rate, BOB_HZ, &[CAROL_HZ, 425.0, 300.0]);
        if secs >= MIN_TONE_SECS || Instant::now() >= deadline {
            eprintln!(
                "{what}: carol heard bob's {BOB_HZ} Hz for {secs:.1} s of {:.1} s",
                w.secs()
            );
            break secs;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        secs >= MIN_TONE_SECS,
        "{what}: carol (linphonec) heard bob's {BOB_HZ} Hz tone for {secs:.1} s\n{}",
        carol.group.tail()
    );
}

/// Issue #9, ICE: both baresips with `medianat=ice` (the `ice` module,
/// full ICE, host candidates only), `relay` mode. ICE completes through
/// the edge's relay ports; the controlling side then re-offers (RFC 8445
/// §8.1.2) its selected candidate, a peer-reflexive one that is the
/// edge's own relay address on the far side, with `a=remote-candidates`
/// naming the candidates the edge put in front of the other phone. Both
/// call directions; each side must hear the other after the re-offer.
#[tokio::test(flavor = "current_thread")]
async fn ice_baresip_to_baresip_through_the_relay() {
    ice_scenario("relay").await;
}

/// The same in `nat` mode: the inside phone's checks leave with the
/// edge's public address, so its selected local candidate (when it
/// calls) is the edge's public port standing for it.
#[tokio::test(flavor = "current_thread")]
async fn ice_baresip_to_baresip_in_nat_mode() {
    ice_scenario("nat").await;
}

async fn ice_scenario(mode: &str) {
    let name = format!("softphones::ice_baresip_to_baresip ({mode})");
    let name = name.as_str();
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(name, &reason);
        return;
    }
    let Some(modules) = softphone::kamailio_modules() else {
        testnet::record_skip(name, "kamailio with tls.so/registrar.so not installed (apt-get install kamailio kamailio-tls-modules)");
        return;
    };
    if !softphone::which("kamailio")
        || !softphone::baresip_installed()
        || !Path::new(softphone::BARESIP_MODULES)
            .join("ice.so")
            .exists()
    {
        testnet::record_skip(name, "kamailio or baresip (with ice.so) not installed (apt-get install kamailio kamailio-tls-modules baresip-core)");
        return;
    }
    let started = Instant::now();
    let tag = format!("p2i{}{}", &mode[..1], std::process::id());
    let mut edge = Edge::prepare(&tag);
    let control = edge.dir().join("control.sock");
    edge.write_config(&edge_config(&edge.pin_dir, &edge.pki, &control, mode));
    edge.run_agent_within(Duration::from_secs(15));
    let mut kamailio =
        softphone::start_kamailio(&edge.topo.client, edge.dir(), &edge.pki, &modules, PBX);
    let ice = ";medianat=ice";
    let mut bob = Baresip::start_with_args(
        &edge.topo.client,
        edge.dir(),
        &edge.pki.ca,
        &BaresipSpec {
            accounts: vec![account("bob", PBX, ice)],
            modules: &["ice.so"],
            ..bob_spec(&edge.pki, MUX)
        },
        &["-s"],
    );
    let mut alice = Baresip::start_with_args(
        &edge.topo.peer,
        edge.dir(),
        &edge.pki.ca,
        &BaresipSpec {
            accounts: vec![account("alice", "203.0.113.1:5061", ice)],
            modules: &["ice.so"],
            ..alice_spec(&edge.pki, MUX)
        },
        &["-s"],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while registered(&control, "alice@example.com").is_none() {
        assert!(
            alice.group.alive() && Instant::now() < deadline,
            "alice never registered through the edge\n{}",
            alice.group.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        bob.saw(
            "bob@example.com: {0/TLS/v4} 200 OK",
            0,
            Duration::from_secs(20)
        ),
        "bob never registered at the PBX\n{}",
        bob.group.tail()
    );

    for (what, caller_is_bob) in [
        (
            format!("ice ({mode}): alice (outside) calls bob (inside)"),
            false,
        ),
        (
            format!("ice ({mode}): bob (inside) calls alice (outside)"),
            true,
        ),
    ] {
        let what = what.as_str();
        let marks = (alice.log_mark(), bob.log_mark());
        if caller_is_bob {
            bob.ok("dial", "sip:alice@example.com");
        } else {
            alice.ok("dial", "sip:bob@example.com");
        }
        established(what, marks, &mut alice, &mut bob, &kamailio);
        // The controlling side's re-offer after ICE completed: it carries
        // a=remote-candidates (RFC 8445 §8.1.2 / RFC 5245 §9.1.3). Through
        // the relay it always comes (the selected local candidate is
        // peer-reflexive); in nat mode only when the inside phone, whose
        // checks leave with the edge's address, is the caller.
        let deadline = Instant::now() + Duration::from_secs(10);
        let re_offered = |b: &Baresip, mark: usize| {
            b.group
                .log()
                .lines()
                .skip(mark)
                .any(|l| l.starts_with("a=remote-candidates"))
        };
        let mut seen = false;
        while !seen {
            seen = re_offered(&alice, marks.0) || re_offered(&bob, marks.1);
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("{what}: ICE re-offer with a=remote-candidates: {seen}");
        assert!(
            seen || mode == "nat",
            "{what}: no ICE re-offer with a=remote-candidates\nalice:\n{}\nbob:\n{}",
            alice.group.tail(),
            bob.group.tail()
        );
        // The callee (ICE-controlled) is told which of its own candidates
        // was selected, not the edge port the caller checked against.
        let (callee, own_ip, mark) = if caller_is_bob {
            (&alice, "198.51.100.2", marks.0)
        } else {
            (&bob, "10.77.0.2", marks.1)
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen
            && !callee
                .group
                .log()
                .lines()
                .skip(mark)
                .any(|l| l.starts_with(&format!("a=remote-candidates:1 {own_ip} ")))
        {
            assert!(
                Instant::now() < deadline,
                "{what}: the callee never got a=remote-candidates naming its own {own_ip}\n{}",
                callee.group.tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // The re-offer's transaction, then media: each phone must get
        // the other's tone at its own RTP port (`capture`: baresip's
        // `sndfile` stops recording after a re-INVITE), and the call's
        // pinholes count packets both ways.
        std::thread::sleep(Duration::from_millis(1000));
        for (who, b, mark) in [("alice", &alice, marks.0), ("bob", &bob, marks.1)] {
            let log = b.group.log();
            assert!(
                !log.lines().skip(mark).any(|l| l.starts_with("SIP/2.0 488")),
                "{what}: the ICE re-offer was refused ({who}'s trace)\n{}",
                b.group.tail()
            );
        }
        let before = edge.pinholes();
        let (out0, in0) = (
            packets_from(&before, "internal"),
            packets_from(&before, "external"),
        );
        let (at_alice, at_bob) = std::thread::scope(|s| {
            let a = s.spawn(|| {
                capture::listen(
                    &edge.topo.peer,
                    Ipv4Addr::new(203, 0, 113, 1),
                    RTP_PORTS,
                    LISTEN,
                )
            });
            let b = s.spawn(|| {
                capture::listen(
                    &edge.topo.client,
                    // nat: the edge rewrites only the inside phone's side.
                    if mode == "nat" {
                        Ipv4Addr::new(198, 51, 100, 2)
                    } else {
                        Ipv4Addr::new(10, 77, 0, 1)
                    },
                    RTP_PORTS,
                    LISTEN,
                )
            });
            (
                a.join().expect("capture thread"),
                b.join().expect("capture thread"),
            )
        });
        let (at_alice, at_bob) = (
            at_alice.expect("capture at alice"),
            at_bob.expect("capture at bob"),
        );
        let list = edge.pinholes();
        let out = packets_from(&list, "internal").saturating_sub(out0);
        let inn = packets_from(&list, "external").saturating_sub(in0);
        let a_secs = tone_secs(&at_alice.samples, 8000, BOB_HZ, &[ALICE_HZ, 425.0, 300.0]);
        let b_secs = tone_secs(&at_bob.samples, 8000, ALICE_HZ, &[BOB_HZ, 425.0, 300.0]);
        eprintln!(
            "{what}: after the ICE re-offer, alice's RTP port got {} packets ({a_secs:.1} s of bob's {BOB_HZ} Hz), bob's {} ({b_secs:.1} s of alice's {ALICE_HZ} Hz); XDP forwarded {out} packets out, {inn} in",
            at_alice.packets, at_bob.packets
        );
        assert!(
            out >= 50 && inn >= 50,
            "{what}: XDP forwarded {out} out, {inn} in: {list:#?}"
        );
        assert!(
            a_secs >= MIN_TONE_SECS && b_secs >= MIN_TONE_SECS,
            "{what}: at alice's RTP port {a_secs:.1} s of bob's tone, at bob's {b_secs:.1} s of alice's\nalice:\n{}\nbob:\n{}\nedge:\n{:#?}",
            alice.group.tail(),
            bob.group.tail(),
            list
        );
        if caller_is_bob {
            hang_up(what, &edge, &mut alice, &mut bob);
        } else {
            hang_up(what, &edge, &mut bob, &mut alice);
        }
    }
    eprintln!("ice ({mode}): all scenarios after {:?}", started.elapsed());
    alice.group.stop();
    bob.group.stop();
    kamailio.stop();
    edge.stop();
}

/// linphonec (outside) called by baresip (inside) offering `a=rtcp-mux`
/// (RFC 5761), then calling it: the offer crosses the edge with its
/// `a=rtcp` and `a=rtcp-mux` consistent, linphonec accepts it and each
/// side hears the other.
#[tokio::test(flavor = "current_thread")]
async fn linphone_outside_and_baresip_inside_with_rtcp_mux() {
    let name = "softphones::linphone_outside_and_baresip_inside_with_rtcp_mux";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(name, &reason);
        return;
    }
    let Some(modules) = softphone::kamailio_modules() else {
        testnet::record_skip(name, "kamailio with tls.so/registrar.so not installed (apt-get install kamailio kamailio-tls-modules)");
        return;
    };
    if !softphone::which("kamailio")
        || !softphone::baresip_installed()
        || !softphone::which("linphonec")
    {
        testnet::record_skip(name, "kamailio, baresip or linphonec not installed (apt-get install kamailio kamailio-tls-modules baresip-core linphone-cli)");
        return;
    }
    let started = Instant::now();
    let tag = format!("p2m{}", std::process::id());
    let mut edge = Edge::prepare(&tag);
    testnet::sh(&[
        "ip",
        "-n",
        &edge.topo.peer,
        "route",
        "add",
        "default",
        "via",
        "203.0.113.1",
        "dev",
        "eth0",
    ])
    .expect("default route outside");
    let control = edge.dir().join("control.sock");
    edge.write_config(&edge_config(&edge.pin_dir, &edge.pki, &control, "relay"));
    edge.run_agent_within(Duration::from_secs(15));
    let mut kamailio =
        softphone::start_kamailio(&edge.topo.client, edge.dir(), &edge.pki, &modules, PBX);
    let mut bob = Baresip::start_with_args(
        &edge.topo.client,
        edge.dir(),
        &edge.pki.ca,
        &bob_spec(&edge.pki, MUX),
        &["-s"],
    );
    let mut carol = Linphone::start(
        &edge.topo.peer,
        edge.dir(),
        &edge.pki.ca,
        "carol@example.com",
        "203.0.113.1:5061",
        CAROL_HZ as u32,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while registered(&control, "carol@example.com").is_none() {
        assert!(
            carol.group.alive() && Instant::now() < deadline,
            "linphonec never registered through the edge\n{}",
            carol.group.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        bob.saw(
            "bob@example.com: {0/TLS/v4} 200 OK",
            0,
            Duration::from_secs(20)
        ),
        "bob never registered at the PBX\n{}",
        bob.group.tail()
    );

    let what = "rtcp-mux: bob (inside) calls carol (linphonec, outside)";
    let marks = (carol.log_mark(), bob.log_mark());
    bob.ok("dial", "sip:carol@example.com");
    let ok = bob.saw("established", marks.1, Duration::from_secs(15))
        && carol.saw("connected", marks.0, Duration::from_secs(15));
    let debug = std::fs::read_to_string(edge.dir().join("linphone-debug.log")).unwrap_or_default();
    assert!(
        ok,
        "{what}: not established\nlinphonec:\n{}\nbob:\n{}\nlinphone debug (SDP lines):\n{}",
        carol.group.tail(),
        bob.group.tail(),
        debug
            .lines()
            .filter(|l| l.contains("rtcp")
                || l.contains("488")
                || l.contains("m=audio")
                || l.contains("ncompatible")
                || l.contains("not acceptable"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // linphonec declines mux (its answer has none and it sends RTCP to
    // RTP + 1): the edge pinholes RTP and RTCP, two flows of two rules.
    let rules = edge.pinholes();
    eprintln!("{what}: {} pinhole rules", rules.len());
    assert_eq!(rules.len(), 4, "{what}: RTP and RTCP flows: {rules:#?}");
    listen_both(what, &edge, &carol, &bob);
    let mark = bob.log_mark();
    carol.send("terminate");
    assert!(
        bob.saw("terminated", mark, Duration::from_secs(10)),
        "{what}: linphonec's BYE never reached bob\n{}",
        bob.group.tail()
    );
    edge.assert_empty_within(
        &format!("{what}: after the hang-up"),
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_millis(300));
    carol_heard(what, &carol);
    eprintln!("rtcp-mux with linphonec after {:?}", started.elapsed());
    carol.send("quit");
    carol.group.stop();
    bob.group.stop();
    kamailio.stop();
    edge.stop();
}

/// `cargo xtask demo --baresip`'s call, on the demo's configuration
/// (`testua::edge_config`, relay, `[[route]]` for peer.example.net) and
/// through the demo's own code (`softphone::demo::call`): baresip inside
/// with the edge as outbound proxy calls baresip outside, no registrar,
/// each must hear the other's tone, the outside one hangs up.
#[tokio::test(flavor = "current_thread")]
async fn demo_baresip_call_through_the_edge() {
    let name = "softphones::demo_baresip_call_through_the_edge";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(name, &reason);
        return;
    }
    if !softphone::baresip_installed() {
        testnet::record_skip(name, "baresip not installed (apt-get install baresip-core)");
        return;
    }
    let tag = format!("p2d{}", std::process::id());
    let mut edge = Edge::prepare(&tag);
    edge.write_config(&testua::edge_config(&edge.pin_dir, &edge.pki, "relay"));
    edge.run_agent_within(Duration::from_secs(15));
    let result = softphone::demo::call(&edge.topo, &edge.pki, edge.dir(), &|args| {
        eprintln!("{}", edge.cli(args));
        Ok(())
    });
    if let Err(e) = result {
        panic!("the demo's baresip call failed: {e}");
    }
    edge.assert_empty_within("after the demo call", Duration::from_secs(5));
    edge.stop();
}
