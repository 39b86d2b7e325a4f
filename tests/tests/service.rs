//! Issue #9 (operator experience) as system tests: the real agent binary
//! in the edge namespace of a `testnet::Topology`, changed and stopped
//! while calls are up.
//!
//! - a reload (`sip-edge reload`, SIGHUP) changes a limit live with a call
//!   up, says which keys need a restart, and a bad file changes nothing;
//! - a renewed certificate serves new handshakes while a call that began
//!   under the old one keeps its media and ends with BYE over its original
//!   connections; a mismatched pair is refused; a file change is picked up
//!   without a reload;
//! - SIGTERM drains: new INVITEs get 503 with Retry-After, the call in
//!   progress ends with BYE and the agent exits then, or when the drain
//!   time is over;
//! - a reload of `media.port_ranges` gives the next call ports from the
//!   new range, with media through XDP both ways, and the agent's
//!   connections whose port lies in the new range keep working;
//! - sd_notify: READY=1 reaches a fake NOTIFY_SOCKET once the listeners
//!   answer, RELOADING=1/READY=1 around a SIGHUP, STOPPING=1 on SIGTERM;
//!   the SIGHUP's `[agent] log` filter takes effect (tracing reload handle).
//!
//! Run against the agent before this change (`SIP_EDGE_BIN` at main's
//! build) every test failed: no `reload` command, no `[agent]` table.
//!
//! Needs root; skips through `testnet::record_skip`. Namespaces and pins
//! are tagged `rl…`; every wait is bounded.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use sip_edge_tests::{
    edge::{self, alice_id, response_for, sa, Edge, Flow, OutCall, PeerUa, EDGE_INT, WAIT},
    testnet::{self, udp_roundtrip},
    testua::{self, media_of, reply, Dialog, SdpSpec, TestPki, UaConn},
};

/// The agent on the test configuration (`testua::edge_config`, relay) with
/// `tweak` applied.
fn start(tag: &str, tweak: impl Fn(String) -> String) -> Edge {
    Edge::start(tag, |pin_dir, pki| {
        tweak(testua::edge_config(pin_dir, pki, "relay"))
    })
}

/// The control socket `testua::edge_config` gives this edge.
fn control_socket(e: &Edge) -> PathBuf {
    std::env::temp_dir().join(format!(
        "{}.control.sock",
        e.pin_dir
            .file_name()
            .map_or_else(Default::default, |n| n.to_string_lossy())
    ))
}

/// `sip-edge reload --socket S [--json]`.
fn reload(e: &Edge) -> Output {
    std::process::Command::new(testnet::agent_bin())
        .args(["reload", "--socket"])
        .arg(control_socket(e))
        .stdin(Stdio::null())
        .output()
        .expect("run sip-edge reload")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Adds `lines` to the `[media]` table of the test configuration.
fn with_media(cfg: &str, lines: &str) -> String {
    cfg.replacen("[media]\n", &format!("[media]\n{lines}"), 1)
}

/// A call with the edge ports each side sends its audio to.
struct Call {
    out: OutCall,
    edge_int: SocketAddr,
}

async fn call(alice: &mut UaConn, bob: &mut PeerUa, a_port: u16, b_port: u16) -> Result<Call, u16> {
    let spec = |p| SdpSpec {
        audio: Some(p),
        video: None,
        msrp: None,
    };
    let out = edge::call_out(alice, bob, &spec(a_port), &spec(b_port), Flow::Refusable).await?;
    let edge_int = media_of(&out.answer, "audio").expect("answer audio").addr;
    Ok(Call { out, edge_int })
}

/// BYE from alice over her connection, 200 from bob over the edge's
/// connection to him.
async fn hang_up(alice: &mut UaConn, bob: &mut PeerUa, c: &mut Call) {
    alice
        .send(&c.out.a.request("BYE", "", ""))
        .await
        .expect("send BYE");
    let bye = bob.recv_request("BYE").await;
    bob.conn()
        .send(&reply(&bye, 200, "OK", &c.out.b.local_tag, "", "", ""))
        .await
        .expect("200 for BYE");
    let r = response_for(alice, &c.out.a.call_id).await;
    assert_eq!(
        r.status(),
        Some(200),
        "BYE answered: {:?}",
        r.header("Warning")
    );
}

/// Send until received (the first packets may meet an unresolved neighbour).
fn flows(from: &UdpSocket, to: SocketAddr, rx: &UdpSocket, payload: &[u8]) -> bool {
    (0..20).any(|_| udp_roundtrip(from, to, rx, payload).is_some())
}

/// Calls until one is admitted or `tries` are refused (503 each), with a
/// pause between: a SIGHUP's reload is applied a moment after the signal.
async fn call_eventually(
    alice: &mut UaConn,
    bob: &mut PeerUa,
    a: u16,
    b: u16,
    tries: u32,
) -> Result<Call, u16> {
    let mut last = 0;
    for _ in 0..tries {
        match call(alice, bob, a, b).await {
            Ok(c) => return Ok(c),
            Err(code) => last = code,
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(last)
}

/// A limit (`[media] max_calls`) changes live with a call up, first by
/// `sip-edge reload`, later by SIGHUP; a key that needs a restart is named
/// as such; a bad file (one invalid key beside a lowered limit) is refused
/// whole, by SIGHUP and by `sip-edge reload`, with the reason. The first
/// call's media flows throughout and it ends with BYE.
#[tokio::test(flavor = "current_thread")]
async fn reload_changes_a_limit_live_with_a_call_up_and_a_bad_file_changes_nothing() {
    const NAME: &str =
        "service::reload_changes_a_limit_live_with_a_call_up_and_a_bad_file_changes_nothing";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let base = std::cell::RefCell::new(String::new());
    let e = start(&format!("rlr{}", std::process::id()), |c| {
        *base.borrow_mut() = c.clone();
        with_media(&c, "max_calls = 1\n")
    });
    let base = base.into_inner();
    let mut alice = e.connect_alice().await;
    let mut bob = PeerUa::new(&e);
    let mut c1 = call(&mut alice, &mut bob, 4000, 5000)
        .await
        .expect("call 1");
    let a1 = e.udp(&e.topo.client, "10.77.0.2:4000");
    let b1 = e.udp(&e.topo.peer, "198.51.100.2:5000");
    assert!(flows(&a1, c1.edge_int, &b1, b"c1 before"), "call 1 media");
    assert_eq!(
        call(&mut alice, &mut bob, 4010, 5010).await.err(),
        Some(503),
        "max_calls = 1: a second call is refused"
    );

    // Raise the limit and ask for a restart-only change too.
    e.write_config(&with_media(&base, "max_calls = 2\n").replacen(
        "[signalling]\n",
        "[xdp]\nmode = \"skb\"\n[signalling]\n",
        1,
    ));
    let out = reload(&e);
    let said = text(&out.stdout);
    assert!(out.status.success(), "reload: {}{said}", text(&out.stderr));
    assert!(said.contains("media.max_calls: 1 -> 2: applied"), "{said}");
    assert!(
        said.contains("xdp.mode: (unset) -> \"skb\": needs a restart"),
        "{said}"
    );
    let mut c2 = call(&mut alice, &mut bob, 4010, 5010)
        .await
        .expect("call 2 admitted after the reload");
    assert!(
        flows(&a1, c1.edge_int, &b1, b"c1 across"),
        "call 1 media across the reload"
    );

    // A bad file: lowers the limit, and has one invalid key. SIGHUP first,
    // then `sip-edge reload` for the answer; neither changes anything.
    e.write_config(&with_media(&base, "max_calls = 1\n").replacen(
        "[signalling]\n",
        "[limits]\ninvite_rate = 0\n[signalling]\n",
        1,
    ));
    e.signal(libc::SIGHUP);
    let out = reload(&e);
    let said = text(&out.stderr);
    assert!(!out.status.success(), "a bad file must be refused");
    assert!(
        said.contains("limits.invite_rate") && said.contains("nothing changed"),
        "{said}"
    );
    // Still max_calls = 2 (2 up): a third is refused, not because of 1.
    assert_eq!(
        call(&mut alice, &mut bob, 4020, 5020).await.err(),
        Some(503)
    );
    hang_up(&mut alice, &mut bob, &mut c2).await;
    let mut c2 = call(&mut alice, &mut bob, 4010, 5010)
        .await
        .expect("a second call still fits: the bad file's max_calls = 1 was not applied");

    // SIGHUP with a good file: max_calls = 3 lets a third call in.
    e.write_config(&with_media(&base, "max_calls = 3\n"));
    e.signal(libc::SIGHUP);
    let mut c3 = call_eventually(&mut alice, &mut bob, 4020, 5020, 10)
        .await
        .expect("call 3 admitted after SIGHUP");
    assert!(
        flows(&a1, c1.edge_int, &b1, b"c1 end"),
        "call 1 media after SIGHUP"
    );
    for c in [&mut c3, &mut c2, &mut c1] {
        hang_up(&mut alice, &mut bob, c).await;
    }
    e.assert_empty("after the reloads");

    // New media ranges apply to the next call: its edge ports come from
    // the new range (outside the window the datapath indexed at start, so
    // its rules live in the hash table) and its media crosses XDP both ways.
    e.write_config(
        &with_media(
            &base,
            "max_calls = 3
",
        )
        .replacen(
            "port_ranges = [\"40000-40999\"]",
            "port_ranges = [\"42000-42099\"]",
            1,
        ),
    );
    let out = reload(&e);
    let said = text(&out.stdout);
    assert!(out.status.success(), "reload: {}{said}", text(&out.stderr));
    assert!(
        said.contains("media.port_ranges: [\"40000-40999\"] -> [\"42000-42099\"]: applied"),
        "{said}"
    );
    let mut c4 = call(&mut alice, &mut bob, 4030, 5030)
        .await
        .expect("call in the new range");
    let edge_pub = media_of(&c4.out.offer, "audio").expect("offer audio").addr;
    for p in [c4.edge_int.port(), edge_pub.port()] {
        assert!(
            (42000..=42099).contains(&p),
            "edge port {p} not from the new range"
        );
    }
    let a4 = e.udp(&e.topo.client, "10.77.0.2:4030");
    let b4 = e.udp(&e.topo.peer, "198.51.100.2:5030");
    assert!(
        flows(&a4, c4.edge_int, &b4, b"new range out"),
        "media out, new range"
    );
    assert!(
        flows(&b4, edge_pub, &a4, b"new range in"),
        "media in, new range"
    );
    hang_up(&mut alice, &mut bob, &mut c4).await;
    e.assert_empty("after the range change");
    e.stop();
}

/// A reload that adds a media range keeps the agent's connections whose
/// local port lies in it. The reservation (`ip_local_reserved_ports`)
/// keeps new connections out of a media range, not ones the kernel placed
/// there before the range was added: here the edge namespace's ephemeral
/// range is the range the reload adds, so the agent's TLS connection to
/// bob takes one of its ports. After the reload, bob's segments on that
/// connection miss every pinhole on a media port; XDP must pass them as
/// `pass_local_socket` (a local TCP connection owns them), or the next
/// call's 200 never reaches alice (`drop_no_pinhole`). Unsolicited UDP and
/// a SYN to the same port stay `drop_no_pinhole`.
#[tokio::test(flavor = "current_thread")]
async fn a_reload_that_adds_a_media_range_keeps_connections_already_in_it() {
    const NAME: &str = "service::a_reload_that_adds_a_media_range_keeps_connections_already_in_it";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let base = std::cell::RefCell::new(String::new());
    let e = start(&format!("rlw{}", std::process::id()), |c| {
        *base.borrow_mut() = c.clone();
        c
    });
    let base = base.into_inner();
    e.ephemeral_ports(42000, 42099);
    let mut alice = e.connect_alice().await;
    let mut bob = PeerUa::new(&e);
    let mut c1 = call(&mut alice, &mut bob, 4000, 5000)
        .await
        .expect("call 1");
    let edge_port = bob.conn().remote;
    assert!(
        (42000..=42099).contains(&edge_port.port()),
        "the edge's connection to bob must use the range the reload adds: {edge_port}"
    );
    hang_up(&mut alice, &mut bob, &mut c1).await;

    e.write_config(&base.replacen(
        "port_ranges = [\"40000-40999\"]",
        "port_ranges = [\"42100-42199\", \"42000-42099\"]",
        1,
    ));
    let out = reload(&e);
    let said = text(&out.stdout);
    assert!(out.status.success(), "reload: {}{said}", text(&out.stderr));
    let passed = e.reason("pass_local_socket");
    let mut c2 = call(&mut alice, &mut bob, 4010, 5010)
        .await
        .expect("call 2 over the connection whose port is now a media port");
    assert_eq!(bob.conn().remote, edge_port, "the same connection to bob");
    assert!(
        e.reason("pass_local_socket") > passed,
        "bob's segments must count as pass_local_socket"
    );
    let a2 = e.udp(&e.topo.client, "10.77.0.2:4010");
    let b2 = e.udp(&e.topo.peer, "198.51.100.2:5010");
    assert!(flows(&a2, c2.edge_int, &b2, b"c2 out"), "call 2 media out");

    // The port is a media port for everyone else: UDP to it and a SYN to
    // it are dropped in XDP (a timeout, not the kernel's RST).
    let before = e.reason("drop_no_pinhole");
    e.probe_unsolicited(edge_port, 3, Duration::from_millis(300));
    let until = Instant::now() + Duration::from_secs(2);
    while e.reason("drop_no_pinhole") < before + 4 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        e.reason("drop_no_pinhole") >= before + 4,
        "3 UDP probes and a SYN must count as drop_no_pinhole"
    );
    hang_up(&mut alice, &mut bob, &mut c2).await;
    e.assert_empty("after the widening reload");
    e.stop();
}

/// The end-entity certificate a fresh TLS connection from the client
/// namespace to the internal listener is shown, verified against `ca`.
async fn presented(e: &Edge, ca: &Path) -> Result<CertificateDer<'static>, String> {
    let tcp = testnet::in_ns(&e.topo.client, || {
        std::net::TcpStream::connect_timeout(&sa(EDGE_INT), WAIT)
    })
    .map_err(|x| x.to_string())?
    .map_err(|x| x.to_string())?;
    tcp.set_nonblocking(true).map_err(|x| x.to_string())?;
    let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|x| x.to_string())?;
    let cfg = testua::client_config(ca).map_err(|x| x.to_string())?;
    let name = ServerName::try_from(testua::EDGE_TLS_NAME).map_err(|x| x.to_string())?;
    let tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|x| x.to_string())?;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .map(CertificateDer::into_owned)
        .ok_or_else(|| "no certificate".to_owned())
}

fn der(pem: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(pem).expect("certificate PEM")
}

/// A call established under certificate A; the files are swapped to B and
/// the agent reloaded: a new TLS connection is shown B, the call's media
/// still flows and it ends with BYE over the connections it began on. A
/// pair whose key is not the certificate's is refused and B stays. With
/// `[agent] cert_check_secs`, a file change alone brings the next pair in.
#[tokio::test(flavor = "current_thread")]
async fn a_renewed_certificate_serves_new_handshakes_while_a_call_spans_the_swap() {
    const NAME: &str =
        "service::a_renewed_certificate_serves_new_handshakes_while_a_call_spans_the_swap";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let base = std::cell::RefCell::new(String::new());
    let e = start(&format!("rlc{}", std::process::id()), |c| {
        *base.borrow_mut() = c.clone();
        format!("{c}[agent]\ncert_check_secs = 0\n")
    });
    let base = base.into_inner();
    let cert_a = der(&e.pki.edge_cert);
    assert_eq!(presented(&e, &e.pki.ca).await.expect("probe A"), cert_a);
    let mut alice = e.connect_alice().await;
    let mut bob = PeerUa::new(&e);
    let mut c = call(&mut alice, &mut bob, 4000, 5000)
        .await
        .expect("call under A");
    let a1 = e.udp(&e.topo.client, "10.77.0.2:4000");
    let b1 = e.udp(&e.topo.peer, "198.51.100.2:5000");
    assert!(flows(&a1, c.edge_int, &b1, b"under A"), "media under A");

    // Cert B: a new PKI (its own CA), copied over A's files, then reload.
    let dir_b = e.dir().join("b");
    std::fs::create_dir_all(&dir_b).expect("dir b");
    let pki_b = TestPki::generate(&dir_b).expect("pki b");
    std::fs::copy(&pki_b.edge_cert, &e.pki.edge_cert).expect("swap cert");
    std::fs::copy(&pki_b.edge_key, &e.pki.edge_key).expect("swap key");
    let out = reload(&e);
    let said = text(&out.stdout);
    assert!(out.status.success(), "reload: {}{said}", text(&out.stderr));
    assert!(said.contains("certificate reloaded"), "{said}");
    let cert_b = der(&pki_b.edge_cert);
    assert_ne!(cert_a, cert_b);
    assert_eq!(
        presented(&e, &pki_b.ca).await.expect("probe B"),
        cert_b,
        "a new handshake is shown B"
    );
    assert!(
        presented(&e, &e.pki.ca).await.is_err(),
        "A's CA no longer verifies the edge"
    );
    assert!(
        flows(&a1, c.edge_int, &b1, b"under B"),
        "the call's media across the swap"
    );

    // A mismatched pair (C's certificate, B's key): refused, B stays.
    let dir_c = e.dir().join("c");
    std::fs::create_dir_all(&dir_c).expect("dir c");
    let pki_c = TestPki::generate(&dir_c).expect("pki c");
    std::fs::copy(&pki_c.edge_cert, &e.pki.edge_cert).expect("cert c");
    let out = reload(&e);
    assert!(!out.status.success(), "mismatched pair must be refused");
    let said = text(&out.stderr);
    assert!(said.contains("nothing changed"), "{said}");
    assert_eq!(
        presented(&e, &pki_b.ca).await.expect("probe B again"),
        cert_b
    );

    // The call ends cleanly over its original connections: alice's (made
    // under A) and the edge's to bob (`PeerUa` reads the one it accepted).
    hang_up(&mut alice, &mut bob, &mut c).await;
    e.assert_empty("call across the swap ended");

    // File polling: cert_check_secs = 1 by reload, then C's key arrives
    // next to C's certificate; no reload, C is shown within a few seconds.
    std::fs::copy(&pki_b.edge_cert, &e.pki.edge_cert).expect("back to b");
    e.write_config(&format!("{base}[agent]\ncert_check_secs = 1\n"));
    let out = reload(&e);
    assert!(out.status.success(), "reload: {}", text(&out.stderr));
    std::fs::copy(&pki_c.edge_cert, &e.pki.edge_cert).expect("cert c");
    std::fs::copy(&pki_c.edge_key, &e.pki.edge_key).expect("key c");
    let cert_c = der(&pki_c.edge_cert);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if presented(&e, &pki_c.ca).await.ok().as_ref() == Some(&cert_c) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the changed files were never picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    e.stop();
}

/// SIGTERM with `[agent] drain_secs`: a new INVITE gets 503 with
/// Retry-After, the call in progress keeps its media and its BYE goes
/// through, and the agent exits (status 0) once it ended, well before the
/// drain time. A second run: the drain time runs out with a call up, and
/// the agent exits then.
#[tokio::test(flavor = "current_thread")]
async fn sigterm_drains_calls_then_exits() {
    const NAME: &str = "service::sigterm_drains_calls_then_exits";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let mut e = start(&format!("rld{}", std::process::id()), |c| {
        format!("{c}[agent]\ndrain_secs = 60\n")
    });
    let mut alice = e.connect_alice().await;
    // Skips the edge's ACK of a 486 below.
    let mut bob = PeerUa::skipping_others(&e);
    let mut c = call(&mut alice, &mut bob, 4000, 5000).await.expect("call");
    let a1 = e.udp(&e.topo.client, "10.77.0.2:4000");
    let b1 = e.udp(&e.topo.peer, "198.51.100.2:5000");
    e.signal(libc::SIGTERM);
    // The drain begins a moment after the signal: an INVITE that still got
    // through is turned down by bob (486), and the next one tried.
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let mut d = Dialog::outgoing(&alice_id(), "sips:bob@peer.example.net");
        alice.send(&d.invite("")).await.expect("send INVITE");
        let first = alice.recv(WAIT).await.expect("a response to the INVITE");
        if first.status() == Some(503) {
            break first;
        }
        assert_eq!(first.status(), Some(100), "admitted before the drain began");
        let inv = bob.recv_request("INVITE").await;
        bob.conn()
            .send(&reply(
                &inv,
                486,
                "Busy Here",
                &testua::unique("t"),
                "",
                "",
                "",
            ))
            .await
            .expect("486");
        let busy = response_for(&mut alice, &d.call_id).await;
        assert_eq!(busy.status(), Some(486));
        if let Some(ack) = d.ack_failure(&busy) {
            alice.send(&ack).await.expect("ACK");
        }
        assert!(Instant::now() < deadline, "no 503 while draining");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        refused.header("Retry-After").is_some(),
        "503 carries Retry-After"
    );
    assert!(
        flows(&a1, c.edge_int, &b1, b"draining"),
        "media while draining"
    );
    assert!(
        e.wait_exit(Duration::from_millis(500)).is_none(),
        "still draining with a call up"
    );
    let t0 = Instant::now();
    hang_up(&mut alice, &mut bob, &mut c).await;
    let status = e
        .wait_exit(Duration::from_secs(10))
        .expect("agent exits once the call ended");
    assert!(status.success(), "{status}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "exit follows the last BYE"
    );

    drop((alice, bob));

    // Drain time over with a call up.
    let cfg = std::fs::read_to_string(e.config_path()).expect("config");
    e.write_config(&cfg.replace("drain_secs = 60", "drain_secs = 2"));
    e.run_agent();
    let mut alice = e.connect_alice().await;
    let mut bob = PeerUa::new(&e);
    let _c = call(&mut alice, &mut bob, 4010, 5010).await.expect("call");
    let t0 = Instant::now();
    e.signal(libc::SIGTERM);
    let status = e
        .wait_exit(Duration::from_secs(15))
        .expect("agent exits after the drain time");
    let took = t0.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= Duration::from_millis(1500),
        "exited after {took:?}, before the 2 s drain time"
    );
}

/// Receives sd_notify datagrams until one contains `want`.
fn notified(
    sock: &std::os::unix::net::UnixDatagram,
    want: &str,
    within: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = text(&buf[..n]);
            if m.lines().any(|l| l == want) {
                return Ok(m);
            }
            seen.push(m);
        }
    }
    Err(format!("no {want} within {within:?}; got {seen:?}"))
}

/// Kills the agent this test spawned itself, whatever happens.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `Type=notify` readiness: with NOTIFY_SOCKET pointing at a datagram
/// socket the test binds, READY=1 arrives, and by then the internal
/// listener answers; SIGHUP gives RELOADING=1 then READY=1; SIGTERM
/// STOPPING=1.
#[tokio::test(flavor = "current_thread")]
async fn readiness_reaches_a_fake_notify_socket() {
    const NAME: &str = "service::readiness_reaches_a_fake_notify_socket";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let e = Edge::prepare(&format!("rln{}", std::process::id()));
    e.write_config(&testua::edge_config(&e.pin_dir, &e.pki, "relay"));
    let path = e.dir().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut child = Child(
        e.topo
            .edge_cmd(&testnet::agent_bin())
            .args(["run", "--config"])
            .arg(e.config_path())
            .env("NOTIFY_SOCKET", &path)
            .env("SIP_EDGE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agent"),
    );
    // The agent's log, line by line (read off the pipe so it never fills).
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    if let Some(err) = child.0.stderr.take() {
        let log = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("{line}");
                log.lock().expect("log").push(line);
            }
        });
    }
    let ready = notified(&sock, "READY=1", Duration::from_secs(60)).expect("READY=1");
    assert!(ready.contains("STATUS="), "{ready}");
    let up = testnet::in_ns(&e.topo.client, || {
        std::net::TcpStream::connect_timeout(&sa(EDGE_INT), Duration::from_secs(1))
    })
    .expect("netns");
    assert!(up.is_ok(), "READY=1 came before the listener answered");
    // The reload also turns on debug logging (`[agent] log`, the tracing
    // reload handle): sd_notify's debug line appears only after it.
    e.write_config(&format!(
        "{}[agent]\nlog = \"info,sip_edge::service=debug\"\n",
        testua::edge_config(&e.pin_dir, &e.pki, "relay")
    ));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGHUP) };
    notified(&sock, "RELOADING=1", Duration::from_secs(10)).expect("RELOADING=1");
    notified(&sock, "READY=1", Duration::from_secs(10)).expect("READY=1 after reload");
    // SAFETY: as above.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    notified(&sock, "STOPPING=1", Duration::from_secs(10)).expect("STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.0.try_wait().ok().flatten().is_none() {
        assert!(Instant::now() < deadline, "agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = log.lock().expect("log").clone();
    let reloaded = log
        .iter()
        .position(|l| l.contains("config key changed: applied") && l.contains("agent.log"))
        .unwrap_or_else(|| panic!("no agent.log change in the log: {log:#?}"));
    let debug: Vec<usize> = (0..log.len())
        .filter(|i| log[*i].contains("sd_notify sent"))
        .collect();
    assert!(
        !debug.is_empty(),
        "no debug line after the reload: {log:#?}"
    );
    assert!(
        debug.iter().all(|i| *i > reloaded),
        "debug lines before the reload set the filter: {log:#?}"
    );
}
