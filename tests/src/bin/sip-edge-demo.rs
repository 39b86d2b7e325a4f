//! `cargo xtask demo`: one real TLS call through sip-edge. Builds a client /
//! edge / peer topology in network namespaces, generates throwaway
//! certificates, starts the real agent (TLS SIP proxy + XDP datapath) in the
//! edge namespace with a built-in config, and lets two built-in user agents
//! (`sip_edge_tests::testua`) place a call from inside to outside: INVITE, 180,
//! 200, ACK, a few seconds of RTP-sized UDP both ways through the pinholes
//! the call opened, the pinhole table with its counters, the datapath
//! statistics, BYE, and the empty table. Everything it creates (namespaces,
//! pins, temp files) is removed on exit, on error too (RAII guards).
//!
//! With `--baresip`, two real baresip softphones place the call instead
//! (`sip_edge_tests::softphone::demo`).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use sip_edge_tests::{
    softphone,
    testnet::{self, AgentProcess, Pins, Topology},
    testua::{
        self, media_of, reply, rtp_packet, sdp, Dialog, SdpSpec, TestPki, UaConn, UaIdentity,
        UaListener,
    },
};

/// Every SIP wait.
const WAIT: Duration = Duration::from_secs(5);
/// RTP: one 20 ms packet each way per tick, for 3 s.
const RTP_PACKETS: u16 = 150;

fn sa(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| unreachable!("constant address {s}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| unreachable!("constant address {s}"))
}

fn main() -> ExitCode {
    // The agent inherits this: keep its log to warnings so the demo's own
    // output stays readable (single-threaded here, before any spawn).
    std::env::set_var("SIP_EDGE_LOG", "warn");
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ndemo failed: {e}\n(everything it created has been removed)");
            ExitCode::FAILURE
        }
    }
}

fn bin() -> PathBuf {
    testnet::agent_bin()
}

/// Removes the demo's temp dir on drop.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn show(topo: &Topology, args: &[&str], pin_dir: &Path) -> Result<(), String> {
    let out = topo
        .edge_cmd(&bin())
        .args(args)
        .arg("--pin-dir")
        .arg(pin_dir)
        .output()
        .map_err(|e| format!("running sip-edge: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "sip-edge {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    println!("$ sip-edge {}", args.join(" "));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    Ok(())
}

/// Rules in the pinhole table (`pinhole list --json`).
fn pinhole_count(topo: &Topology, pin_dir: &Path) -> Result<usize, String> {
    let out = topo
        .edge_cmd(&bin())
        .args(["pinhole", "list", "--json", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .map_err(|e| format!("running sip-edge: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("pinhole list --json: {e}"))?;
    v.as_array()
        .map(Vec::len)
        .ok_or_else(|| "pinhole list --json did not print an array".to_owned())
}

fn config(pin_dir: &Path, pki: &TestPki) -> String {
    testua::edge_config(pin_dir, pki, "relay")
}

/// Prints a UA's SIP log lines not printed yet.
struct SipPrinter {
    who: &'static str,
    shown: usize,
    start: Instant,
}

impl SipPrinter {
    fn print(&mut self, c: &UaConn) {
        for l in c.log.iter().skip(self.shown) {
            let arrow = if l.sent { "sends   " } else { "receives" };
            println!(
                "  [{:>7.1} ms] {:<5} {arrow} {}",
                l.when.saturating_duration_since(self.start).as_secs_f64() * 1000.0,
                self.who,
                l.first_line
            );
        }
        self.shown = c.log.len();
    }
}

fn demo() -> Result<(), String> {
    if let Some(reason) = testnet::unavailable_reason() {
        return Err(reason);
    }
    let pid = std::process::id();
    // Guards, dropped in reverse order: agent, pins, namespaces, temp dir.
    let tmp = TempDir(std::env::temp_dir().join(format!("sip-edge-demo-{pid}")));
    std::fs::create_dir_all(&tmp.0).map_err(|e| format!("creating {}: {e}", tmp.0.display()))?;

    step(
        "creating namespaces: client 10.77.0.2 | edge 10.77.0.1 + 203.0.113.1 | peer 198.51.100.2",
    );
    let mut topo = Topology::create(&format!("d{pid}")).map_err(|e| e.to_string())?;
    topo.attach_pass_programs().map_err(|e| e.to_string())?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sip-edge-demo-{pid}"));
    let pins = Pins(pin_dir.clone());

    step("generating throwaway certificates (a demo CA, edge.example.org, peer.example.net)");
    let pki = TestPki::generate(&tmp.0).map_err(|e| e.to_string())?;
    let cfg_path = tmp.0.join("sip-edge.toml");
    std::fs::write(&cfg_path, config(&pin_dir, &pki))
        .map_err(|e| format!("writing the config: {e}"))?;
    println!("  in {} (removed at the end)", tmp.0.display());

    step("starting the agent in the edge namespace: TLS SIP on 10.77.0.1:5061 (inside) and 203.0.113.1:5061 (outside), XDP on int0 and ext0, relay mode");
    let agent = AgentProcess::start(&topo, &bin(), &cfg_path, &pin_dir, &["int0", "ext0"])
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while testnet::in_ns(&topo.client, || {
        std::net::TcpStream::connect_timeout(&sa("10.77.0.1:5061"), Duration::from_millis(200))
    })
    .map_err(|e| e.to_string())?
    .is_err()
    {
        if Instant::now() > deadline {
            return Err("the agent's SIP listener did not come up within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let result = if std::env::args().any(|a| a == "--baresip") {
        softphone::demo::call(&topo, &pki, &tmp.0, &|args| show(&topo, args, &pin_dir))
    } else {
        rt.block_on(call(&topo, &pki, &pin_dir))
    };

    step("stopping the agent (on_exit = \"remove\": detaches XDP, removes pins) and deleting the namespaces");
    let clean = agent.stop();
    drop(pins);
    drop(topo);
    drop(tmp);
    result?;
    if !clean {
        return Err("the agent did not exit cleanly".into());
    }
    if pin_dir.exists() {
        return Err(format!(
            "{} still exists after the agent removed its pins",
            pin_dir.display()
        ));
    }
    println!("\n== done: the call's media crossed the edge only through pinholes the call opened, and nothing is left behind");
    Ok(())
}

async fn call(topo: &Topology, pki: &TestPki, pin_dir: &Path) -> Result<(), String> {
    let e = |x: testua::UaError| x.to_string();
    let alice_id = UaIdentity {
        aor: "sips:alice@example.org".into(),
        contact: "sips:alice@10.77.0.2:5061".into(),
        via_host: "10.77.0.2:5061".into(),
        display: "Alice".into(),
    };
    let bob_id = UaIdentity {
        aor: "sips:bob@peer.example.net".into(),
        contact: "sips:bob@198.51.100.2:5061".into(),
        via_host: "198.51.100.2:5061".into(),
        display: "Bob".into(),
    };
    let bob_listener = UaListener::bind(
        &topo.peer,
        sa("198.51.100.2:5061"),
        &pki.peer_cert,
        &pki.peer_key,
    )
    .map_err(e)?;
    let a_rtp = topo
        .udp(&topo.client, sa("10.77.0.2:4000"))
        .map_err(|x| x.to_string())?;
    let b_rtp = topo
        .udp(&topo.peer, sa("198.51.100.2:5000"))
        .map_err(|x| x.to_string())?;

    step("the call: alice (inside, 10.77.0.2) calls sips:bob@peer.example.net (outside, 198.51.100.2), TLS on both legs");
    let mut alice = testua::connect_tls(
        &topo.client,
        sa("10.77.0.1:5061"),
        &pki.ca,
        testua::EDGE_TLS_NAME,
        WAIT,
    )
    .await
    .map_err(e)?;
    let start = Instant::now();
    let (mut pa, mut pb) = (
        SipPrinter {
            who: "alice",
            shown: 0,
            start,
        },
        SipPrinter {
            who: "bob",
            shown: 0,
            start,
        },
    );
    let mut a = Dialog::outgoing(&alice_id, "sips:bob@peer.example.net");
    let offer_sent = sdp(
        "alice",
        1,
        ip("10.77.0.2"),
        &SdpSpec {
            audio: Some(4000),
            ..Default::default()
        },
    );
    alice.send(&a.invite(&offer_sent)).await.map_err(e)?;
    pa.print(&alice);
    let mut bob = bob_listener.accept(WAIT).await.map_err(e)?;
    let inv = bob.recv_request("INVITE", WAIT).await.map_err(e)?;
    pb.print(&bob);
    let b = Dialog::incoming(&bob_id, &inv).map_err(e)?;
    let contact = format!("Contact: <{}>\r\n", bob_id.contact);
    bob.send(&reply(&inv, 180, "Ringing", &b.local_tag, &contact, "", ""))
        .await
        .map_err(e)?;
    pb.print(&bob);
    let r = alice.recv_status(180, WAIT).await.map_err(e)?;
    a.on_invite_response(&r).map_err(e)?;
    pa.print(&alice);
    let answer_sent = sdp(
        "bob",
        1,
        ip("198.51.100.2"),
        &SdpSpec {
            audio: Some(5000),
            ..Default::default()
        },
    );
    bob.send(&reply(
        &inv,
        200,
        "OK",
        &b.local_tag,
        &contact,
        "application/sdp",
        &answer_sent,
    ))
    .await
    .map_err(e)?;
    pb.print(&bob);
    let ok = alice.recv_status(200, WAIT).await.map_err(e)?;
    a.on_invite_response(&ok).map_err(e)?;
    pa.print(&alice);
    alice.send(&a.ack("", "")).await.map_err(e)?;
    pa.print(&alice);
    bob.recv_request("ACK", WAIT).await.map_err(e)?;
    pb.print(&bob);

    let offer = media_of(inv.body(), "audio").map_err(e)?;
    let answer = media_of(ok.body(), "audio").map_err(e)?;
    println!("\n  SDP as rewritten by the edge (each side only ever sees the edge):");
    println!(
        "    alice offered 10.77.0.2:4000      -> bob was told to send to {}",
        offer.addr
    );
    println!(
        "    bob answered  198.51.100.2:5000   -> alice was told to send to {}",
        answer.addr
    );

    step(&format!("media: {RTP_PACKETS} RTP-sized UDP packets (172-byte RTP, 20 ms apart) each way, through XDP"));
    let (sent, got_a, got_b, src_a, src_b) =
        rtp(&a_rtp, &b_rtp, answer.addr, offer.addr).map_err(|x| format!("sending RTP: {x}"))?;
    println!(
        "  alice -> {}: sent {sent}, bob received {got_b} (from {})",
        answer.addr,
        src_b.map_or("-".into(), |s| s.to_string())
    );
    println!(
        "  bob   -> {}: sent {sent}, alice received {got_a} (from {})",
        offer.addr,
        src_a.map_or("-".into(), |s| s.to_string())
    );
    if got_a == 0 || got_b == 0 {
        return Err("media did not cross the edge".into());
    }
    if got_a < sent || got_b < sent {
        println!("  (the first packets may be dropped while the edge resolves a neighbour's MAC: counted as drop_no_neigh)");
    }

    step("the pinholes this call opened, with their XDP counters (RTP and RTCP, one rule per direction)");
    show(topo, &["pinhole", "list"], pin_dir)?;
    step("datapath statistics (per-reason packet counters)");
    show(topo, &["stats"], pin_dir)?;

    step("alice hangs up");
    alice.send(&a.request("BYE", "", "")).await.map_err(e)?;
    pa.print(&alice);
    let bye = bob.recv_request("BYE", WAIT).await.map_err(e)?;
    pb.print(&bob);
    bob.send(&reply(&bye, 200, "OK", &b.local_tag, "", "", ""))
        .await
        .map_err(e)?;
    pb.print(&bob);
    alice.recv_status(200, WAIT).await.map_err(e)?;
    pa.print(&alice);
    step("after BYE the pinhole table is empty");
    show(topo, &["pinhole", "list"], pin_dir)?;
    let left = pinhole_count(topo, pin_dir)?;
    if left != 0 {
        return Err(format!("{left} pinholes left after BYE"));
    }
    println!("  (header only: no pinholes left)");
    if testnet::udp_roundtrip(&b_rtp, offer.addr, &a_rtp, &rtp_packet(9999, 2)).is_some() {
        return Err("media still flows after BYE".into());
    }
    println!("  bob -> {}: dropped in XDP now (no pinhole)", offer.addr);
    Ok(())
}

type RtpResult = (u16, u16, u16, Option<SocketAddr>, Option<SocketAddr>);

/// Bounded RTP exchange: one packet each way per 20 ms tick.
fn rtp(
    a: &UdpSocket,
    b: &UdpSocket,
    a_to: SocketAddr,
    b_to: SocketAddr,
) -> std::io::Result<RtpResult> {
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    let (mut got_a, mut got_b, mut src_a, mut src_b) = (0u16, 0u16, None, None);
    let mut buf = [0u8; 2048];
    let drain = |s: &UdpSocket, got: &mut u16, src: &mut Option<SocketAddr>, buf: &mut [u8]| {
        while let Ok((n, from)) = s.recv_from(buf) {
            if n == 172 {
                *got += 1;
                *src = Some(from);
            }
        }
    };
    for seq in 0..RTP_PACKETS {
        a.send_to(&rtp_packet(seq, 0xa11ce), a_to)?;
        b.send_to(&rtp_packet(seq, 0xb0b), b_to)?;
        std::thread::sleep(Duration::from_millis(20));
        drain(a, &mut got_a, &mut src_a, &mut buf);
        drain(b, &mut got_b, &mut src_b, &mut buf);
    }
    std::thread::sleep(Duration::from_millis(50));
    drain(a, &mut got_a, &mut src_a, &mut buf);
    drain(b, &mut got_b, &mut src_b, &mut buf);
    a.set_nonblocking(false)?;
    b.set_nonblocking(false)?;
    Ok((RTP_PACKETS, got_a, got_b, src_a, src_b))
}
