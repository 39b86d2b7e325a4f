//! Runs every datapath fixture (`sip_edge_tests::fixtures`) through
//! BPF_PROG_TEST_RUN, one #[test] per fixture group, each in its own
//! namespace. Without root or BPF the tests print `SKIPPED: <reason>` and
//! return: a skip is not a pass.

use sip_edge_common::Reason;
use sip_edge_tests::fixtures::{self, Output, Runner, Setup, XDP_PASS};

fn run_group(group: &str) {
    let all = fixtures::fixtures().expect("fixture packets build");
    let mine: Vec<_> = all.into_iter().filter(|f| f.group == group).collect();
    assert!(!mine.is_empty(), "no fixtures in group {group}");
    let mut runner = match Runner::setup().expect("fixture runner setup") {
        Setup::Ready(r) => r,
        Setup::Skipped(reason) => {
            sip_edge_tests::testnet::record_skip(
                &format!("datapath_fixtures::{group}"),
                &format!("{reason} ({} fixtures not run)", mine.len()),
            );
            return;
        }
    };
    let mut failed = Vec::new();
    // Each fixture twice: MATCH_DST rules in their PH_DST entries (as the
    // map writer places them), then all in PINHOLES behind PH_DST overflow
    // counts (as for a key whose entry is taken). Verdicts must not differ.
    for hash_only in [false, true] {
        runner.hash_only = hash_only;
        let mode = if hash_only { "hash" } else { "ph_dst" };
        for f in &mine {
            let res = runner.run_fixture(f).expect("fixture runner error");
            if res.passed() {
                eprintln!("PASS [{mode}] {} — {}", f.name, f.description);
            } else {
                let msg = format!(
                    "FAIL [{mode}] {} — {}\n    {}",
                    f.name,
                    f.description,
                    res.failures.join("\n    ")
                );
                eprintln!("{msg}");
                failed.push(msg);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} fixtures in group {group} failed:\n{}",
        failed.len(),
        mine.len(),
        failed.join("\n")
    );
}

#[test]
fn hit() {
    run_group("hit");
}

#[test]
fn remote() {
    run_group("remote");
}

#[test]
fn latch() {
    run_group("latch");
}

#[test]
fn policy() {
    run_group("policy");
}

#[test]
fn hit_drop() {
    run_group("hit-drop");
}

#[test]
fn parse() {
    run_group("parse");
}

#[test]
fn fragment() {
    run_group("fragment");
}

#[test]
fn bench() {
    run_group("bench");
}

/// Every fixture belongs to a group that has a #[test] above, and names are unique.
#[test]
fn every_fixture_is_run() {
    let groups = [
        "hit", "remote", "latch", "policy", "hit-drop", "parse", "fragment", "bench",
    ];
    let all = fixtures::fixtures().expect("fixture packets build");
    let mut names = std::collections::HashSet::new();
    for f in &all {
        assert!(
            groups.contains(&f.group),
            "fixture {} has group {} with no #[test]",
            f.name,
            f.group
        );
        assert!(
            names.insert(f.name.clone()),
            "duplicate fixture name {}",
            f.name
        );
    }
}

/// Negative control: a fixture with deliberately wrong expectations must
/// fail on every one of them, so a green run means something.
#[test]
fn harness_reports_every_mismatch() {
    let all = fixtures::fixtures().expect("fixture packets build");
    let mut f = all
        .into_iter()
        .find(|f| f.name == "hit-v4-udp-relay-in")
        .expect("fixture exists");
    let mut runner = match Runner::setup().expect("fixture runner setup") {
        Setup::Ready(r) => r,
        Setup::Skipped(reason) => {
            sip_edge_tests::testnet::record_skip(
                "datapath_fixtures::harness_reports_every_mismatch",
                &reason,
            );
            return;
        }
    };
    if let Output::Exact(b) = &mut f.steps[0].output {
        let last = b.len() - 1;
        b[last] ^= 0xff;
    }
    f.steps[0].action = XDP_PASS;
    f.steps[0].reasons = vec![(Reason::PassOther, 1)];
    f.states[0].packets = 2;
    let res = runner.run_fixture(&f).expect("fixture runner error");
    let text = res.failures.join("\n");
    for needle in [
        "action XDP_PASS expected, got XDP_REDIRECT",
        "output frame differs",
        "REASONS[forwarded]",
        "REASONS[pass_other]",
        "PH_STATE[1].packets = 1, expected 2",
    ] {
        assert!(
            text.contains(needle),
            "expected a failure mentioning {needle:?}, got:\n{text}"
        );
    }
}

/// The map writer's `PH_DST` path end to end, through the production
/// loader and `DatapathMaps`: `add_flow` places both relay rules in PH_DST,
/// a packet hits; `replace_rule` (a re-INVITE moving the client's port)
/// takes effect on the next packet without losing the counters, twice (both
/// rule copies); `delete_slot` closes the pinhole again.
#[test]
fn writer_places_replaces_and_removes_ph_dst_rules() {
    use std::net::{IpAddr, SocketAddr};

    use aya::programs::{TestRun, TestRunOptions, Xdp};
    use sip_edge::datapath::{
        loader::{self, MapSizes},
        maps::{DatapathIface, DatapathMaps, DatapathSettings},
        rules::{Flow, LearnPort, Proto},
    };
    use sip_edge_common::{
        map_names, POLICY_PASS, ROLE_EXTERNAL, ROLE_INTERNAL, SLOT_DST, XDP_PROG_NAME,
    };
    use sip_edge_tests::fixtures::{netns, packet::Packet, XDP_DROP, XDP_REDIRECT};

    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        sip_edge_tests::testnet::record_skip(
            "datapath_fixtures::writer_places_replaces_and_removes_ph_dst_rules",
            "not root",
        );
        return;
    }
    let ns = netns::Netns::create().expect("namespace");
    struct Pins(std::path::PathBuf);
    impl Drop for Pins {
        fn drop(&mut self) {
            for name in map_names::ALL {
                let _ = std::fs::remove_file(self.0.join(name));
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let pins = Pins(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        ns.name()
    )));
    std::fs::create_dir(&pins.0).expect("pin dir");
    let settings = DatapathSettings {
        ifaces: vec![
            DatapathIface {
                ifindex: ns.links.int,
                role: ROLE_INTERNAL,
            },
            DatapathIface {
                ifindex: ns.links.ext,
                role: ROLE_EXTERNAL,
            },
        ],
        edge_addrs: vec![
            IpAddr::from(netns::EDGE_INT4),
            netns::EDGE_PUB4.into(),
            netns::EDGE_INT6.into(),
            netns::EDGE_PUB6.into(),
        ],
        media_ports: vec![(40000, 40999)],
        pass_ports: vec![5061],
        default_policy: POLICY_PASS,
    };
    let mut ebpf = loader::load(
        MapSizes {
            max_pinholes: 64,
            dst_slots: settings.dst_slots(),
        },
        Some(&pins.0),
    )
    .expect("load");
    let mut maps = DatapathMaps::from_ebpf(&mut ebpf).expect("maps");
    maps.apply_settings(&settings).expect("settings");

    let peer = SocketAddr::new(netns::PEER4.into(), 5000);
    let public = SocketAddr::new(netns::EDGE_PUB4.into(), 40000);
    let flow = |client_port: u16| Flow::Relay {
        proto: Proto::Udp,
        client: SocketAddr::new(netns::CLIENT4.into(), client_port),
        edge_int: SocketAddr::new(netns::EDGE_INT4.into(), 40002),
        public,
        peer,
        latch_peer: false,
        learn_port: LearnPort::Neither,
    };
    let (s_in, s_out) = maps.add_flow(&flow(4000)).expect("add flow");
    assert_ne!(s_in & SLOT_DST, 0, "inbound rule not in PH_DST: {s_in:#x}");
    assert_ne!(
        s_out & SLOT_DST,
        0,
        "outbound rule not in PH_DST: {s_out:#x}"
    );

    let frame = Packet::udp(netns::MAC_GW, netns::MAC_EXT, peer, public)
        .build()
        .expect("frame");
    let ext = ns.links.ext;
    let run_frame = |ebpf: &aya::Ebpf, frame: &[u8]| -> (u32, Option<u16>) {
        let prog: &Xdp = ebpf
            .program(XDP_PROG_NAME)
            .expect("program")
            .try_into()
            .expect("xdp");
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ext.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 512];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: 1,
                ..TestRunOptions::new()
            })
            .expect("test run");
        // Ethernet 14 + IPv4 20: the UDP destination port.
        let dport =
            (res.return_value == XDP_REDIRECT).then(|| u16::from_be_bytes([out[36], out[37]]));
        (res.return_value, dport)
    };
    let run = |ebpf: &aya::Ebpf| run_frame(ebpf, &frame);
    // The listing and the per-slot read (the media layer's idle check)
    // must agree.
    let packets = |maps: &DatapathMaps| {
        let listed = maps
            .list()
            .expect("list")
            .iter()
            .find(|e| e.slot == s_in)
            .map(|e| e.packets);
        assert_eq!(maps.packets(s_in).expect("packets"), listed);
        listed
    };
    assert_eq!(run(&ebpf), (XDP_REDIRECT, Some(4000)));
    assert_eq!(packets(&maps), Some(1));

    // Twice: the first replacement writes copy 1, the second copy 0 again.
    for (n, port) in [(2, 4100u16), (3, 4200)] {
        let pair = flow(port).rules(s_in, s_out).expect("rules");
        maps.replace_rule(s_in, pair.inbound.1).expect("replace");
        assert_eq!(
            run(&ebpf),
            (XDP_REDIRECT, Some(port)),
            "after replacing with client port {port}"
        );
        assert_eq!(
            packets(&maps),
            Some(n),
            "counters kept across the replacement"
        );
    }

    // The same flow again is the same pinhole.
    assert!(matches!(
        maps.add_flow(&flow(4000)),
        Err(sip_edge::datapath::maps::MapsError::Exists { .. })
    ));
    // TCP on the same edge ports: the PH_DST entries are taken by the UDP
    // rules, so these go to PINHOLES behind the entries' overflow counts,
    // and still hit.
    let tcp = Flow::Relay {
        proto: Proto::Tcp,
        client: SocketAddr::new(netns::CLIENT4.into(), 4000),
        edge_int: SocketAddr::new(netns::EDGE_INT4.into(), 40002),
        public,
        peer,
        latch_peer: false,
        learn_port: LearnPort::Neither,
    };
    let (t_in, t_out) = maps.add_flow(&tcp).expect("add tcp flow");
    assert_eq!(
        (t_in & SLOT_DST, t_out & SLOT_DST),
        (0, 0),
        "tcp rules in PINHOLES"
    );
    let syn = Packet::tcp(netns::MAC_GW, netns::MAC_EXT, peer, public)
        .build()
        .expect("tcp frame");
    assert_eq!(
        run_frame(&ebpf, &syn),
        (XDP_REDIRECT, Some(4000)),
        "tcp via overflow"
    );
    assert_eq!(
        maps.packets(t_in).expect("packets"),
        Some(1),
        "a PINHOLES rule's counter, read by slot"
    );
    assert_eq!(
        maps.delete_slot(t_in, true).expect("delete tcp"),
        vec![t_in, t_out]
    );
    assert_eq!(run_frame(&ebpf, &syn).0, XDP_DROP, "tcp pinhole closed");

    assert_eq!(
        maps.delete_slot(s_in, true).expect("delete"),
        vec![s_in, s_out]
    );
    assert_eq!(run(&ebpf).0, XDP_DROP, "pinhole closed");
    assert!(maps.list().expect("list").is_empty());
    drop(maps);
    drop(ebpf);
    drop(pins);
    drop(ns);
}
