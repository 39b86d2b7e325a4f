//! End-to-end datapath test in network namespaces: the real agent binary
//! attaches XDP in the edge namespace, pinholes are added with the real CLI,
//! and real UDP/TCP sockets in the client and peer namespaces check what
//! arrives (and what does not). Needs root; skips with a printed reason.

use std::{
    io::{Read, Write},
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    sync::Arc,
    time::Duration,
};

use serde_json::Value;
use sip_edge_tests::{
    edge::{cli, reason, sa},
    testnet::{self, udp_roundtrip, AgentProcess, Pins, Topology},
};

fn add(topo: &Topology, pin_dir: &Path, args: &[&str]) -> (u64, u64) {
    let mut full = vec!["pinhole", "add"];
    full.extend_from_slice(args);
    let v: Value = serde_json::from_str(&cli(topo, pin_dir, &full)).expect("add json");
    (
        v["inbound_slot"].as_u64().expect("slot"),
        v["outbound_slot"].as_u64().expect("slot"),
    )
}

/// Send until received (the first packets of a flow may be dropped while
/// the edge resolves the next hop's MAC), at most `tries` times.
fn eventually(
    from: &UdpSocket,
    to: SocketAddr,
    rx: &UdpSocket,
    payload: &[u8],
    tries: usize,
) -> Option<SocketAddr> {
    (0..tries).find_map(|_| udp_roundtrip(from, to, rx, payload).map(|(_, src)| src))
}

/// Try `f` up to 10 times, 200 ms apart (the first SYN may meet an
/// unresolved neighbour at the edge).
fn retry<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..10 {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

fn write_config(dir: &Path, pin_dir: &Path) -> PathBuf {
    let cfg = format!(
        r#"
pin_dir = "{}"
on_exit = "keep"
[[interface]]
name = "int0"
role = "internal"
[[interface]]
name = "ext0"
role = "external"
[addresses]
internal = ["10.77.0.1", "2001:db8:77::1"]
public = ["203.0.113.1", "2001:db8:ff::1"]
[media]
port_ranges = ["40000-40999"]
[signalling]
ports = [5061]
"#,
        pin_dir.display()
    );
    let path = dir.join("sip-edge.toml");
    std::fs::write(&path, cfg).expect("write config");
    path
}

#[test]
fn pinholes_added_with_the_cli_carry_udp_and_tcp_through_xdp() {
    const NAME: &str = "network::pinholes_added_with_the_cli_carry_udp_and_tcp_through_xdp";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let tag = format!("n{}", std::process::id());
    let mut topo = Topology::create(&tag).expect("create namespaces");
    topo.attach_pass_programs()
        .expect("attach pass programs on the end hosts");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sip-edge-test-{tag}"));
    let _pins = Pins(pin_dir.clone());
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(tmp.path(), &pin_dir);
    let agent = AgentProcess::start(
        &topo,
        &testnet::agent_bin(),
        &config,
        &pin_dir,
        &["int0", "ext0"],
    )
    .expect("start agent");

    let client = topo
        .udp(&topo.client, sa("10.77.0.2:4000"))
        .expect("client socket");
    let peer = topo
        .udp(&topo.peer, sa("198.51.100.2:5000"))
        .expect("peer socket");
    let stranger = topo
        .udp(&topo.peer, sa("198.51.100.2:5001"))
        .expect("second peer socket");

    // No pinhole yet: a media port of the edge is closed, and it is counted.
    let before = reason(&topo, &pin_dir, "drop_no_pinhole");
    assert!(
        udp_roundtrip(&peer, sa("203.0.113.1:40000"), &client, b"too early").is_none(),
        "media port open without a pinhole"
    );
    assert!(
        reason(&topo, &pin_dir, "drop_no_pinhole") > before,
        "unapproved packet not counted"
    );

    // Relay flow, UDP, both directions, addresses rewritten on each side.
    let (slot_in, _slot_out) = add(
        &topo,
        &pin_dir,
        &[
            "relay",
            "--client",
            "10.77.0.2:4000",
            "--edge-int",
            "10.77.0.1:40002",
            "--public",
            "203.0.113.1:40000",
            "--peer",
            "198.51.100.2:5000",
        ],
    );
    let src = eventually(&peer, sa("203.0.113.1:40000"), &client, b"rtp in", 20)
        .expect("inbound relay packet never arrived");
    assert_eq!(
        src,
        sa("10.77.0.1:40002"),
        "client must see the edge's internal address, never the peer"
    );
    // The edge had never talked to the client: the first forwarded packet
    // met an unresolved neighbour, was dropped and counted, and the agent
    // got the kernel to resolve it, so the flow recovered by itself.
    assert!(
        reason(&topo, &pin_dir, "drop_no_neigh") >= 1,
        "first packet did not take the unresolved-neighbour path"
    );
    let src = eventually(&client, sa("10.77.0.1:40002"), &peer, b"rtp out", 20)
        .expect("outbound relay packet never arrived");
    assert_eq!(
        src,
        sa("203.0.113.1:40000"),
        "peer must see the edge's public address, never the client"
    );

    // Strict remote: the same peer host from another port is refused.
    let mismatch = reason(&topo, &pin_dir, "drop_remote_mismatch");
    assert!(
        udp_roundtrip(&stranger, sa("203.0.113.1:40000"), &client, b"hijack").is_none(),
        "pinhole accepted an unsignalled source"
    );
    assert!(reason(&topo, &pin_dir, "drop_remote_mismatch") > mismatch);
    // An unapproved port stays closed and is counted.
    let before = reason(&topo, &pin_dir, "drop_no_pinhole");
    assert!(udp_roundtrip(&peer, sa("203.0.113.1:40001"), &client, b"other port").is_none());
    assert!(reason(&topo, &pin_dir, "drop_no_pinhole") > before);

    // The XDP counters, not the kernel, carried it.
    let list: Value =
        serde_json::from_str(&cli(&topo, &pin_dir, &["pinhole", "list"])).expect("list json");
    let inbound = list
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["slot"] == slot_in)
        .expect("inbound rule listed");
    assert!(
        inbound["packets"].as_u64().unwrap_or(0) >= 1,
        "per-pinhole counter did not move: {inbound}"
    );

    // NAT flow: the client uses the edge as gateway and talks to the peer directly.
    let client_nat = topo
        .udp(&topo.client, sa("10.77.0.2:4100"))
        .expect("socket");
    let peer_nat = topo
        .udp(&topo.peer, sa("198.51.100.2:5100"))
        .expect("socket");
    add(
        &topo,
        &pin_dir,
        &[
            "nat",
            "--client",
            "10.77.0.2:4100",
            "--public",
            "203.0.113.1:40100",
            "--peer",
            "198.51.100.2:5100",
        ],
    );
    let src = eventually(
        &peer_nat,
        sa("203.0.113.1:40100"),
        &client_nat,
        b"nat in",
        20,
    )
    .expect("DNAT packet never arrived");
    assert_eq!(
        src,
        sa("198.51.100.2:5100"),
        "nat mode keeps the peer's source"
    );
    let src = eventually(
        &client_nat,
        sa("198.51.100.2:5100"),
        &peer_nat,
        b"nat out",
        20,
    )
    .expect("SNAT packet never arrived");
    assert_eq!(
        src,
        sa("203.0.113.1:40100"),
        "peer must see the public address"
    );

    // IPv6 relay.
    let client6 = topo
        .udp(&topo.client, sa("[2001:db8:77::2]:4300"))
        .expect("socket");
    let peer6 = topo
        .udp(&topo.peer, sa("[2001:db8:ff::2]:5300"))
        .expect("socket");
    add(
        &topo,
        &pin_dir,
        &[
            "relay",
            "--client",
            "[2001:db8:77::2]:4300",
            "--edge-int",
            "[2001:db8:77::1]:40302",
            "--public",
            "[2001:db8:ff::1]:40300",
            "--peer",
            "[2001:db8:ff::2]:5300",
        ],
    );
    let src = eventually(&peer6, sa("[2001:db8:ff::1]:40300"), &client6, b"v6 in", 30)
        .expect("IPv6 inbound never arrived");
    assert_eq!(src, sa("[2001:db8:77::1]:40302"));
    let src = eventually(
        &client6,
        sa("[2001:db8:77::1]:40302"),
        &peer6,
        b"v6 out",
        30,
    )
    .expect("IPv6 outbound never arrived");
    assert_eq!(src, sa("[2001:db8:ff::1]:40300"));

    // TCP relay: the peer connects to the public port and reaches the client.
    add(
        &topo,
        &pin_dir,
        &[
            "relay",
            "--proto",
            "tcp",
            "--client",
            "10.77.0.2:4200",
            "--edge-int",
            "10.77.0.1:40202",
            "--public",
            "203.0.113.1:40200",
            "--peer",
            "198.51.100.2:5200",
        ],
    );
    let listener = topo
        .tcp_listen(&topo.client, sa("10.77.0.2:4200"))
        .expect("listen");
    let mut out = retry(|| {
        topo.tcp_connect(&topo.peer, sa("198.51.100.2:5200"), sa("203.0.113.1:40200"))
            .ok()
    })
    .expect("TCP connect through the pinhole");
    let (mut inside, seen) = listener.accept().expect("accept");
    assert_eq!(
        seen,
        sa("10.77.0.1:40202"),
        "client must see the edge's internal address"
    );
    inside
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    out.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let file = vec![0x5au8; 64 * 1024];
    out.write_all(&file).expect("send file");
    let mut got = vec![0u8; file.len()];
    inside
        .read_exact(&mut got)
        .expect("receive file through TCP pinhole");
    assert_eq!(got, file);
    inside.write_all(b"ack").expect("reply");
    let mut ack = [0u8; 3];
    out.read_exact(&mut ack).expect("reply through TCP pinhole");
    assert_eq!(&ack, b"ack");
    drop((out, inside));

    // TCP where the peer connects from an ephemeral port (RFC 4145 active
    // end): its address is strict, its port learned from the SYN; nat mode.
    add(
        &topo,
        &pin_dir,
        &[
            "nat",
            "--proto",
            "tcp",
            "--learn-port",
            "peer",
            "--client",
            "10.77.0.2:4400",
            "--public",
            "203.0.113.1:40400",
            "--peer",
            "198.51.100.2:9",
        ],
    );
    let listener = topo
        .tcp_listen(&topo.client, sa("10.77.0.2:4400"))
        .expect("listen");
    let mut out = retry(|| {
        testnet::in_ns(&topo.peer, || {
            std::net::TcpStream::connect_timeout(&sa("203.0.113.1:40400"), Duration::from_secs(2))
        })
        .ok()?
        .ok()
    })
    .expect("TCP connect from an ephemeral port through a learn-port pinhole");
    let (mut inside, seen) = listener.accept().expect("accept");
    assert_eq!(
        seen.ip(),
        sa("198.51.100.2:9").ip(),
        "nat mode keeps the peer's address"
    );
    assert_eq!(
        seen.port(),
        out.local_addr().expect("local").port(),
        "the peer's ephemeral port reaches the client"
    );
    inside
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    out.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    out.write_all(b"MSRP a786hjs2 SEND").expect("send");
    let mut got = [0u8; 18];
    inside
        .read_exact(&mut got)
        .expect("receive through learned-port pinhole");
    inside.write_all(b"MSRP a786hjs2 200 OK").expect("reply");
    let mut ack = [0u8; 20];
    out.read_exact(&mut ack).expect("reply to the learned port");
    assert_eq!(&ack, b"MSRP a786hjs2 200 OK");
    drop((out, inside));

    // Restarting the agent does not interrupt an approved flow: keep a
    // stream running across the restart and lose nothing.
    let running = Arc::new(AtomicBool::new(true));
    let sender = {
        let peer = peer.try_clone().expect("clone socket");
        let running = running.clone();
        std::thread::spawn(move || {
            let mut sent = 0u32;
            // Bounded: at most 400 packets, 10 ms apart.
            while running.load(Ordering::Relaxed) && sent < 400 {
                let _ = peer.send_to(&sent.to_be_bytes(), sa("203.0.113.1:40000"));
                sent += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        })
    };
    let receiver = {
        let client = client.try_clone().expect("clone socket");
        std::thread::spawn(move || {
            let mut got = 0u32;
            let mut buf = [0u8; 64];
            while let Ok((n, _)) = client.recv_from(&mut buf) {
                if n == 4 {
                    got += 1;
                }
            }
            got
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(agent.stop(), "agent did not exit cleanly on SIGTERM");
    std::thread::sleep(Duration::from_millis(300));
    let agent = AgentProcess::start(
        &topo,
        &testnet::agent_bin(),
        &config,
        &pin_dir,
        &["int0", "ext0"],
    )
    .expect("restart agent");
    std::thread::sleep(Duration::from_millis(300));
    running.store(false, Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    let got = receiver.join().expect("receiver");
    assert_eq!(
        got, sent,
        "packets lost across an agent restart: {got}/{sent}"
    );

    // Deleting the pinhole stops the flow.
    let _ = cli(&topo, &pin_dir, &["pinhole", "del", &slot_in.to_string()]);
    assert!(
        udp_roundtrip(&peer, sa("203.0.113.1:40000"), &client, b"after delete").is_none(),
        "flow continued after pinhole delete"
    );
    assert!(agent.stop());
    let leftover = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    drop(topo);
    let after = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        leftover.contains(&tag) && !after.contains(&tag),
        "namespaces not cleaned up"
    );
}
