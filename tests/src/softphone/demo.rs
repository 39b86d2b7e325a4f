//! `cargo xtask demo --baresip`: the demo call with two real baresip
//! softphones instead of the built-in user agents. The agent runs with the
//! demo configuration (`testua::edge_config`, relay mode, a `[[route]]` for
//! peer.example.net to the peer namespace); alice (baresip) inside uses the
//! edge as her outbound proxy over TLS and calls bob (baresip) outside at
//! `sips:bob@peer.example.net`, who listens for TLS at 198.51.100.2:5061
//! with the peer certificate and answers by himself. Each sends a tone
//! (alice 1100 Hz, bob 700 Hz); the demo shows the pinholes with their
//! counters, then what each side heard (Goertzel filter over baresip's
//! recording), and hangs up from outside.

use std::{path::Path, time::Duration};

use super::{tone_secs, Baresip, BaresipSpec};
use crate::{testnet::Topology, testua::TestPki};

/// alice's (inside) tone.
const ALICE_HZ: f64 = 1100.0;
/// bob's (outside) tone.
const BOB_HZ: f64 = 700.0;
/// Seconds of the other side's tone each must hear in the 3 s listened.
const MIN_TONE_SECS: f64 = 1.0;

/// The call; `show` prints a `sip-edge` CLI command's output (the demo's
/// own helper). Errors are the demo's failure message.
pub fn call(
    topo: &Topology,
    pki: &TestPki,
    dir: &Path,
    show: &dyn Fn(&[&str]) -> Result<(), String>,
) -> Result<(), String> {
    if !super::baresip_installed() {
        return Err("baresip is not installed (apt-get install baresip-core)".into());
    }
    let step = |t: &str| println!("\n== {t}");
    step("starting bob (baresip, outside, 198.51.100.2, TLS on 5061, sends 700 Hz) and alice (baresip, inside, 10.77.0.2, outbound proxy 10.77.0.1:5061 over TLS, sends 1100 Hz)");
    let mut bob = Baresip::start(
        &topo.peer,
        dir,
        &pki.ca,
        &BaresipSpec {
            name: "bob",
            listen: "198.51.100.2:5060",
            tone_hz: BOB_HZ as u32,
            accounts: vec![
                "<sip:bob@peer.example.net;transport=tls>;regint=0;answermode=auto;audio_codecs=pcmu"
                    .into(),
            ],
            modules: &[],
            extra: "",
            identity: Some((&pki.peer_cert, &pki.peer_key)),
        },
    );
    let mut alice = Baresip::start(
        &topo.client,
        dir,
        &pki.ca,
        &BaresipSpec {
            name: "alice",
            listen: "10.77.0.2:5060",
            tone_hz: ALICE_HZ as u32,
            accounts: vec![
                "<sip:alice@example.org;transport=tls>;outbound=\"sip:10.77.0.1:5061;transport=tls\";regint=0;answermode=auto;audio_codecs=pcmu"
                    .into(),
            ],
            modules: &[],
            extra: "",
            identity: Some((&pki.client_cert, &pki.client_key)),
        },
    );

    step("alice dials sip:bob@peer.example.net (the edge routes peer.example.net to 198.51.100.2:5061)");
    let marks = (alice.log_mark(), bob.log_mark());
    let dial = alice.cmd("dial", "sip:bob@peer.example.net");
    if dial["ok"] != true {
        return Err(format!("baresip refused to dial: {dial}"));
    }
    if !(alice.saw("established", marks.0, Duration::from_secs(15))
        && bob.saw("established", marks.1, Duration::from_secs(15)))
    {
        return Err(format!(
            "the call was not established\nalice:\n{}\nbob:\n{}",
            alice.group.tail(),
            bob.group.tail()
        ));
    }
    for (who, b) in [("alice", &alice), ("bob", &bob)] {
        let log = b.group.log();
        for l in log.lines().filter(|l| {
            l.contains("Call established") || l.contains("incoming rtp for 'audio' established")
        }) {
            println!("  {who}: {}", l.trim());
        }
    }

    step("3 s of audio both ways through the XDP pinholes");
    std::thread::sleep(Duration::from_secs(3));
    show(&["pinhole", "list"])?;

    step("what each side heard (Goertzel filter over baresip's recording of the call)");
    let heard = |b: &Baresip, freq: f64, own: f64| {
        let w = b.heard();
        (
            tone_secs(&w.samples, w.rate, freq, &[own, 425.0, 300.0]),
            w.secs(),
        )
    };
    let (a, a_total) = heard(&alice, BOB_HZ, ALICE_HZ);
    let (b, b_total) = heard(&bob, ALICE_HZ, BOB_HZ);
    println!("  alice heard bob's {BOB_HZ} Hz tone for {a:.1} s of {a_total:.1} s");
    println!("  bob heard alice's {ALICE_HZ} Hz tone for {b:.1} s of {b_total:.1} s");
    if a < MIN_TONE_SECS || b < MIN_TONE_SECS {
        return Err("a side did not hear the other's tone".into());
    }

    step("bob hangs up from outside");
    let mark = alice.log_mark();
    let hang = bob.cmd("hangup", "");
    if hang["ok"] != true {
        return Err(format!("baresip refused to hang up: {hang}"));
    }
    if !alice.saw("terminated", mark, Duration::from_secs(10)) {
        return Err(format!(
            "bob's BYE never reached alice\n{}",
            alice.group.tail()
        ));
    }
    println!("  alice: call terminated");
    alice.group.stop();
    bob.group.stop();
    Ok(())
}
