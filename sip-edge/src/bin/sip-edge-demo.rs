//! `cargo xtask demo`: builds a client / edge / peer topology in network
//! namespaces, starts the real agent in the edge namespace, opens a relay
//! pinhole for one media flow with the real CLI, sends RTP-sized UDP both
//! ways through XDP, shows what each side saw and the datapath's counters,
//! then tears everything down. (Signalling-driven pinholes replace the
//! static one once the TLS proxy lands, issue #3.)

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use sip_edge::testnet::{self, AgentProcess, Topology};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| unreachable!("constant address {s}"))
}

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bin() -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("sip-edge"))).unwrap_or_else(|| PathBuf::from("sip-edge"))
}

fn show(topo: &Topology, args: &[&str], pin_dir: &Path) -> Result<(), String> {
    let out = topo.edge_cmd(&bin()).args(args).arg("--pin-dir").arg(pin_dir).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("sip-edge {args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    println!("$ sip-edge {}\n{}", args.join(" "), String::from_utf8_lossy(&out.stdout));
    Ok(())
}

fn demo() -> Result<(), String> {
    if let Some(reason) = testnet::unavailable_reason() {
        return Err(reason);
    }
    println!("== creating namespaces: client 10.77.0.2 | edge 10.77.0.1 / 203.0.113.1 | peer 198.51.100.2");
    let mut topo = Topology::create(&format!("d{}", std::process::id())).map_err(|e| e.to_string())?;
    topo.attach_pass_programs().map_err(|e| e.to_string())?;
    let tmp = std::env::temp_dir().join(format!("sip-edge-demo-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sip-edge-demo-{}", std::process::id()));
    let config = tmp.join("sip-edge.toml");
    std::fs::write(
        &config,
        format!(
            "pin_dir = \"{}\"\non_exit = \"remove\"\n[[interface]]\nname = \"int0\"\nrole = \"internal\"\n[[interface]]\nname = \"ext0\"\nrole = \"external\"\n[addresses]\ninternal = [\"10.77.0.1\"]\npublic = [\"203.0.113.1\"]\n[media]\nport_ranges = [\"40000-40999\"]\n[signalling]\nports = [5061]\n",
            pin_dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    println!("== starting the agent in the edge namespace (XDP native on int0 and ext0)");
    let agent = AgentProcess::start(&topo, &bin(), &config, &pin_dir, &["int0", "ext0"]).map_err(|e| e.to_string())?;

    let client = topo.udp(&topo.client, sa("10.77.0.2:4000")).map_err(|e| e.to_string())?;
    let peer = topo.udp(&topo.peer, sa("198.51.100.2:5000")).map_err(|e| e.to_string())?;
    let rtp = [0x80u8; 172]; // 12-byte RTP header + 160 bytes of G.711: a 214-byte frame on the wire

    println!("== peer -> 203.0.113.1:40000 before any pinhole:");
    match testnet::udp_roundtrip(&peer, sa("203.0.113.1:40000"), &client, &rtp) {
        None => println!("   dropped in XDP (no pinhole), as it must be"),
        Some(_) => return Err("media port open without a pinhole".into()),
    }
    println!("== opening a relay pinhole with the CLI");
    show(
        &topo,
        &["pinhole", "add", "relay", "--client", "10.77.0.2:4000", "--edge-int", "10.77.0.1:40002", "--public", "203.0.113.1:40000", "--peer", "198.51.100.2:5000"],
        &pin_dir,
    )?;
    let mut inbound = None;
    let mut outbound = None;
    for _ in 0..50 {
        inbound = inbound.or_else(|| testnet::udp_roundtrip(&peer, sa("203.0.113.1:40000"), &client, &rtp).map(|(_, s)| s));
        outbound = outbound.or_else(|| testnet::udp_roundtrip(&client, sa("10.77.0.1:40002"), &peer, &rtp).map(|(_, s)| s));
    }
    let inbound = inbound.ok_or("inbound media never arrived")?;
    let outbound = outbound.ok_or("outbound media never arrived")?;
    println!("   client received media from {inbound} (the edge, not the peer)");
    println!("   peer received media from {outbound} (the public address, not the client)");
    show(&topo, &["pinhole", "list"], &pin_dir)?;
    show(&topo, &["stats"], &pin_dir)?;
    println!("== stopping the agent (on_exit = \"remove\": detaches and unpins) and removing namespaces");
    if !agent.stop() {
        return Err("agent did not exit cleanly".into());
    }
    drop(topo);
    let _ = std::fs::remove_dir_all(&tmp);
    if pin_dir.exists() {
        return Err(format!("{} still exists after the agent removed its pins", pin_dir.display()));
    }
    println!("== done: media crossed the edge only through the pinhole, and nothing is left behind");
    Ok(())
}
