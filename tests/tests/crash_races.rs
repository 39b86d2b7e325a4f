//! Issue #8 ("Hardening") items 10 and 11 on the pinned maps, without a
//! network: the real loader and map writer on a pin directory of their own
//! (`/sys/fs/bpf/cr<pid>-*`).
//!
//! - several writers (threads with their own handles, as separate
//!   processes have, and the `sip-edge pinhole` CLI as a second process)
//!   hammer add/remove while the "agent" re-applies its settings (the
//!   start-up recount); afterwards every invariant holds: no key with two
//!   rules (shadowed), no state slot shared by two rules, no half flow,
//!   `DST_PORTS` equal to the rules on each port;
//! - a handle opened before the `PH_DST` layout changed writes under the
//!   new layout, not the one it cached (stale `EDGE_LIST`);
//! - pins of another map layout version are refused with an error naming
//!   the pin dir, both versions and what to do.
//!
//! Each of the first two failed before the map writer lock
//! (`sip_edge::datapath::writer`); the third before `datapath::layout`.
//! Needs root and bpffs; skips through `testnet::record_skip`.

use std::{
    collections::{BTreeMap, HashMap as StdMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use sip_edge::datapath::{
    attach, loader,
    maps::{edge_list, DatapathMaps, DatapathSettings, MapsError, PinholeEntry},
    rules::{Flow, LearnPort, Proto},
    writer,
};
use sip_edge_common::{
    dst_port_index, map_names, EdgeList, PinholeState, Settings, MAP_LAYOUT_VERSION, POLICY_DROP,
    PROTO_TCP, PROTO_UDP, SLOT_IN_USE,
};
use sip_edge_tests::testnet;

/// A pin directory of this test's own, removed (pins, writer lock) on drop.
struct Pins {
    dir: PathBuf,
    ebpf: Option<aya::Ebpf>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        self.ebpf = None;
        let _ = attach::remove_pins(&self.dir, &[]);
        let _ = std::fs::remove_file(writer::writer_lock_path(&self.dir));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn settings(media: (u16, u16)) -> DatapathSettings {
    DatapathSettings {
        ifaces: Vec::new(),
        edge_addrs: vec!["10.77.0.1".parse().unwrap(), "203.0.113.1".parse().unwrap()],
        media_ports: vec![media],
        pass_ports: vec![5061],
        default_policy: POLICY_DROP,
    }
}

const MEDIA: (u16, u16) = (40000, 44095);

/// Loads the datapath with its maps pinned under a fresh directory, as
/// `sip-edge run` does, and applies `settings(media)`. `None`: skipped.
fn pins(test: &str, name: &str, media: (u16, u16)) -> Option<(Pins, DatapathMaps)> {
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(test, &reason);
        return None;
    }
    let bpffs = Path::new("/sys/fs/bpf");
    if !attach::is_bpffs(bpffs) {
        testnet::record_skip(test, "/sys/fs/bpf is not a bpffs mount");
        return None;
    }
    let dir = bpffs.join(format!("cr{}-{name}", std::process::id()));
    let _ = std::fs::create_dir(&dir);
    let mut p = Pins { dir, ebpf: None };
    let s = settings(media);
    let mut ebpf = loader::load(
        loader::MapSizes {
            max_pinholes: 1024,
            dst_slots: s.dst_slots(),
        },
        Some(&p.dir),
    )
    .expect("load the datapath with pins");
    let mut maps = DatapathMaps::from_ebpf_pinned(&mut ebpf, &p.dir).expect("maps");
    maps.apply_settings(&s).expect("settings");
    p.ebpf = Some(ebpf);
    Some((p, maps))
}

/// A small deterministic generator (no dependency for a test's dice).
struct Dice(u64);
impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// A flow on a few colliding ports: relay (both rules in `PH_DST`, or in
/// `PINHOLES` when the entry is taken) or nat (a `PINHOLES` SNAT rule).
fn flow(d: &mut Dice) -> Flow {
    let port = |d: &mut Dice| MEDIA.0 + d.below(24) as u16;
    let proto = if d.below(4) == 0 {
        Proto::Tcp
    } else {
        Proto::Udp
    };
    let client = sa(&format!("10.77.0.{}:{}", 2 + d.below(3), 4000 + d.below(8)));
    let peer = sa(&format!("198.51.100.2:{}", 5000 + d.below(8)));
    let public = sa(&format!("203.0.113.1:{}", port(d)));
    if d.below(3) == 0 {
        Flow::Nat {
            proto,
            client,
            public,
            peer,
            latch_peer: false,
            learn_port: LearnPort::Neither,
        }
    } else {
        Flow::Relay {
            proto,
            client,
            edge_int: sa(&format!("10.77.0.1:{}", port(d))),
            public,
            peer,
            latch_peer: false,
            learn_port: LearnPort::Neither,
        }
    }
}

/// Every invariant of the pinhole tables; the broken ones, in words.
fn broken_invariants(dir: &Path, list: &[PinholeEntry], media: (u16, u16)) -> Vec<String> {
    let mut bad = Vec::new();
    // One rule per key: a second one is shadowed (never matched, never
    // found by a delete of the key's slot).
    let mut by_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for e in list {
        by_key
            .entry(format!("{} {} {} {}", e.proto, e.role, e.match_on, e.local))
            .or_default()
            .push(e.slot);
    }
    for (k, slots) in &by_key {
        if slots.len() > 1 {
            bad.push(format!("shadowed rule: {k} held by slots {slots:?}"));
        }
    }
    // One rule per slot: a shared state slot mixes two flows' counters
    // and latch, and a delete of one removes both.
    let mut by_slot: StdMap<u32, Vec<&PinholeEntry>> = StdMap::new();
    for e in list {
        by_slot.entry(e.slot).or_default().push(e);
    }
    for (slot, es) in &by_slot {
        if es.len() > 1 {
            let keys: Vec<&str> = es.iter().map(|e| e.local.as_str()).collect();
            bad.push(format!("slot {slot:#x} shared by {keys:?}"));
        }
    }
    // Whole flows: each rule's pair names it back, and in a relay flow
    // each rule's source rewrite is where the other one matches (a rule
    // written at the wrong PH_DST index shows another local address).
    for e in list {
        let Some(p) = by_slot.get(&e.pair_slot).and_then(|v| v.first()) else {
            bad.push(format!(
                "half flow: slot {:#x} ({}) has no pair",
                e.slot, e.local
            ));
            continue;
        };
        if p.pair_slot != e.slot {
            bad.push(format!(
                "slot {:#x}: its pair {:#x} names {:#x}",
                e.slot, p.slot, p.pair_slot
            ));
        }
        if let (Some(a), Some(b)) = (&e.new_src, &p.new_src) {
            if e.match_on == "dst" && p.match_on == "dst" && (a != &p.local || b != &e.local) {
                bad.push(format!(
                    "relay pair disagrees: {} -> src {a}, {} -> src {b}",
                    e.local, p.local
                ));
            }
        }
    }
    // DST_PORTS counts the dst rules on each (protocol, port).
    let mut want: StdMap<u32, u64> = StdMap::new();
    for e in list.iter().filter(|e| e.match_on == "dst") {
        let port = sa(&e.local).port();
        let proto = if e.proto == "tcp" {
            PROTO_TCP
        } else {
            PROTO_UDP
        };
        *want.entry(dst_port_index(proto, port)).or_default() += 1;
    }
    let data = MapData::from_pin(dir.join(map_names::DST_PORTS)).expect("DST_PORTS pin");
    let counts: Array<MapData, u64> =
        Array::try_from(Map::from_map_data(data).expect("map")).expect("array");
    for idx in 0..counts.len() {
        let got = counts.get(&idx, 0).unwrap_or(0);
        let w = want.get(&idx).copied().unwrap_or(0);
        if got != w {
            bad.push(format!(
                "DST_PORTS[{} {}] = {got}, {w} rules there",
                if idx >> 16 == 0 { "udp" } else { "tcp" },
                idx & 0xffff
            ));
        }
    }
    // EDGE_LIST is the layout the settings ask for.
    let data = MapData::from_pin(dir.join(map_names::EDGE_LIST)).expect("EDGE_LIST pin");
    let el: Array<MapData, EdgeList> =
        Array::try_from(Map::from_map_data(data).expect("map")).expect("array");
    let got = el.get(&0, 0).expect("EDGE_LIST[0]");
    let want = edge_list(&settings(media).edge_addrs, &[media], u32::MAX);
    if got.port_base != want.port_base || got.port_span != want.port_span || got.n4 != want.n4 {
        bad.push(format!("EDGE_LIST is {got:?}, settings ask for {want:?}"));
    }
    bad
}

/// Item 11: the CLI and the agent writing the maps at once could leave a
/// shadowed rule, a state slot shared by two flows, a half flow or an
/// undercounted `DST_PORTS` entry (the datapath then skips the lookup by
/// destination and drops live media). Now every change is made under the
/// pin directory's writer lock. Run without the lock: shadowed rules,
/// shared slots and wrong DST_PORTS counts after the hammering.
#[test]
fn concurrent_writers_keep_every_map_invariant() {
    const NAME: &str = "crash_races::concurrent_writers_keep_every_map_invariant";
    let Some((p, mut agent)) = pins(NAME, "race", MEDIA) else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    const WRITERS: u64 = 3;
    const RUN: Duration = Duration::from_secs(8);
    let writers: Vec<_> = (0..WRITERS)
        .map(|n| {
            let dir = p.dir.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut m = DatapathMaps::from_pins(&dir).expect("a writer's own handle");
                let mut d = Dice(0x9e37_79b9_7f4a_7c15 ^ ((n + 1) * 0x1234_5678));
                let mut mine: Vec<u32> = Vec::new();
                let (mut added, mut refused) = (0usize, 0usize);
                while !stop.load(Ordering::SeqCst) && added < 50_000 {
                    // The agent writes as signalling arrives, not back to
                    // back: leave the lock free between changes.
                    std::thread::sleep(Duration::from_micros(200));
                    if !mine.is_empty() && d.below(5) < 2 {
                        let s = mine.swap_remove(d.below(mine.len() as u64) as usize);
                        let _ = m.delete_slot(s, true);
                        continue;
                    }
                    match m.add_flow(&flow(&mut d)) {
                        Ok((a, _)) => {
                            added += 1;
                            mine.push(a);
                        }
                        Err(MapsError::Exists { .. }) => refused += 1,
                        Err(MapsError::Full { .. }) => refused += 1,
                        Err(e) => panic!("writer {n}: {e}"),
                    }
                }
                (added, refused)
            })
        })
        .collect();
    // A second process: the CLI adding and deleting on the same ports.
    let cli = {
        let dir = p.dir.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut d = Dice(0xdead_beef_cafe_f00d);
            let (mut ok, mut runs) = (0usize, 0usize);
            while !stop.load(Ordering::SeqCst) && runs < 2000 {
                runs += 1;
                let Flow::Relay {
                    client,
                    edge_int,
                    public,
                    peer,
                    ..
                } = (loop {
                    if let f @ Flow::Relay { .. } = flow(&mut d) {
                        break f;
                    }
                })
                else {
                    unreachable!()
                };
                let out = Command::new(testnet::agent_bin())
                    .args(["pinhole", "add", "relay", "--json", "--pin-dir"])
                    .arg(&dir)
                    .args(["--client", &client.to_string()])
                    .args(["--edge-int", &edge_int.to_string()])
                    .args(["--public", &public.to_string()])
                    .args(["--peer", &peer.to_string()])
                    .stdin(Stdio::null())
                    .output()
                    .expect("run sip-edge pinhole add");
                if !out.status.success() {
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(
                        err.contains("already exists"),
                        "the CLI failed otherwise than on a taken key: {err}"
                    );
                    continue;
                }
                ok += 1;
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("CLI JSON");
                let slot = v["inbound_slot"].as_u64().expect("slot");
                if d.below(2) == 0 {
                    let _ = Command::new(testnet::agent_bin())
                        .args(["pinhole", "del", &slot.to_string(), "--pin-dir"])
                        .arg(&dir)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
            (ok, runs)
        })
    };
    // The agent: re-applying its settings recounts DST_PORTS (a start).
    let started = Instant::now();
    let mut applies = 0;
    while started.elapsed() < RUN {
        agent.apply_settings(&settings(MEDIA)).expect("re-apply");
        applies += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::SeqCst);
    let mut totals = Vec::new();
    for w in writers {
        totals.push(w.join().expect("writer thread"));
    }
    let (cli_ok, cli_runs) = cli.join().expect("CLI thread");
    let list = agent.list().expect("list");
    eprintln!(
        "writers (added, refused): {totals:?}; CLI {cli_ok}/{cli_runs} adds; {applies} recounts; {} rules left",
        list.len()
    );
    assert!(
        totals.iter().all(|(a, _)| *a > 100) && cli_ok > 5,
        "the writers did not really write: {totals:?}, CLI {cli_ok}"
    );
    let bad = broken_invariants(&p.dir, &list, MEDIA);
    assert!(
        bad.is_empty(),
        "{} invariants broken:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// Item 11: a handle caches the `PH_DST` layout (`EDGE_LIST`) when it
/// opens the maps. After the agent restarted with other media ranges, a
/// CLI handle opened before wrote its rules at the index the old layout
/// gave them, where the datapath reads another address and port: the
/// rule answered for a port nobody signalled. Now each change re-reads
/// the layout under the writer lock. Run without: the rule was listed at
/// 203.0.113.1:40136 for a flow on port 40100.
#[test]
fn a_handle_opened_before_a_layout_change_writes_under_the_new_layout() {
    const NAME: &str =
        "crash_races::a_handle_opened_before_a_layout_change_writes_under_the_new_layout";
    let first = (40000, 40199);
    let Some((p, mut agent)) = pins(NAME, "layout", first) else {
        return;
    };
    let mut cli = DatapathMaps::from_pins(&p.dir).expect("the CLI's handle");
    // The agent restarts with the media range moved (same table size).
    let second = (40064, 40263);
    agent.apply_settings(&settings(second)).expect("new layout");
    let f = Flow::Relay {
        proto: Proto::Udp,
        client: sa("10.77.0.2:4000"),
        edge_int: sa("10.77.0.1:40100"),
        public: sa("203.0.113.1:40200"),
        peer: sa("198.51.100.2:5000"),
        latch_peer: false,
        learn_port: LearnPort::Neither,
    };
    cli.add_flow(&f).expect("add under the new layout");
    let list = agent.list().expect("list");
    let locals: Vec<&str> = list.iter().map(|e| e.local.as_str()).collect();
    assert!(
        locals.contains(&"10.77.0.1:40100") && locals.contains(&"203.0.113.1:40200"),
        "the flow's rules are where it was signalled: {locals:?}"
    );
    let bad = broken_invariants(&p.dir, &list, second);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Item 10: pinned maps carry their layout version; pins of another
/// version (here: written into `SETTINGS`, as a future or past build would
/// leave them) are refused by the loader and the CLI with an error naming
/// the pin dir, the version found and the one expected, and what to do,
/// instead of being re-adopted and misread. Pins from before the version
/// existed hold 0 and are refused the same way. Run before the version
/// existed: the loader re-adopted the maps without a word.
#[test]
fn pins_of_another_layout_version_are_refused_with_an_explanation() {
    const NAME: &str =
        "crash_races::pins_of_another_layout_version_are_refused_with_an_explanation";
    let Some((p, agent)) = pins(NAME, "version", MEDIA) else {
        return;
    };
    drop(agent);
    let open_settings = || {
        let data = MapData::from_pin(p.dir.join(map_names::SETTINGS)).expect("SETTINGS pin");
        let a: Array<MapData, Settings> =
            Array::try_from(Map::from_map_data(data).expect("map")).expect("array");
        a
    };
    let s = open_settings().get(&0, 0).expect("SETTINGS[0]");
    assert_eq!(s.layout_version, MAP_LAYOUT_VERSION, "written at load");
    // The same build re-adopts its own pins.
    let sizes = loader::MapSizes {
        max_pinholes: 1024,
        dst_slots: settings(MEDIA).dst_slots(),
    };
    drop(loader::load(sizes, Some(&p.dir)).expect("same version: re-adopted"));
    for (found, says) in [
        (MAP_LAYOUT_VERSION + 1, (MAP_LAYOUT_VERSION + 1).to_string()),
        (0, "0 (none recorded".to_owned()),
    ] {
        let mut a = open_settings();
        a.set(
            0,
            Settings {
                layout_version: found,
                ..s
            },
            0,
        )
        .expect("write a foreign version");
        let err = match loader::load(sizes, Some(&p.dir)) {
            Ok(_) => panic!("pins of layout version {found} were re-adopted"),
            Err(e) => e.to_string(),
        };
        for part in [
            p.dir.display().to_string(),
            format!("version {says}"),
            format!("needs version {MAP_LAYOUT_VERSION}"),
            "remove the pins".to_owned(),
        ] {
            assert!(err.contains(&part), "loader error lacks {part:?}: {err}");
        }
        let cli = Command::new(testnet::agent_bin())
            .args(["pinhole", "list", "--pin-dir"])
            .arg(&p.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run sip-edge pinhole list");
        let stderr = String::from_utf8_lossy(&cli.stderr);
        assert!(
            !cli.status.success(),
            "the CLI read pins of version {found}"
        );
        assert!(
            stderr.contains(&format!("version {says}")) && stderr.contains("remove the pins"),
            "CLI error: {stderr}"
        );
    }
}

/// A writer killed between marking a `PH_STATE` slot taken and inserting
/// its rule leaves a slot marked with no rule (a leak). The opposite, a
/// live rule whose slot reads free, would hand that slot to the next flow
/// (two flows sharing counters and latch). The owner's load reconciles the
/// marks with `PINHOLES`; without the reconciliation both marks stay wrong
/// (checked: the test fails at the first assertion after the reload).
#[test]
fn slot_marks_left_wrong_by_a_killed_writer_are_repaired_at_load() {
    const NAME: &str = "crash_races::slot_marks_left_wrong_by_a_killed_writer_are_repaired_at_load";
    let Some((p, mut agent)) = pins(NAME, "marks", MEDIA) else {
        return;
    };
    let nat = |client: &str, public: u16| Flow::Nat {
        proto: Proto::Udp,
        client: sa(client),
        public: sa(&format!("203.0.113.1:{public}")),
        peer: sa("198.51.100.2:5000"),
        latch_peer: false,
        learn_port: LearnPort::Neither,
    };
    // The nat rule matching the client's source lives in PINHOLES with a
    // PH_STATE slot (no SLOT_DST bit).
    let (_, live) = agent
        .add_flow(&nat("10.77.0.2:4000", MEDIA.0))
        .expect("nat flow");
    assert_eq!(live & sip_edge_common::SLOT_DST, 0, "a PH_STATE slot");
    drop(agent);
    let state = || {
        let data = MapData::from_pin(p.dir.join(map_names::PH_STATE)).expect("PH_STATE pin");
        let a: Array<MapData, PinholeState> =
            Array::try_from(Map::from_map_data(data).expect("map")).expect("array");
        a
    };
    let mark = |slot: u32| state().get(&slot, 0).expect("slot").latch.slot_mark;
    assert_eq!(mark(live), SLOT_IN_USE, "an installed rule marks its slot");
    let leaked = (0..1024)
        .find(|s| *s != live && mark(*s) == 0)
        .expect("a free slot");
    // The killed writers' leftovers.
    let mut st = state().get(&leaked, 0).expect("slot");
    st.latch.slot_mark = SLOT_IN_USE;
    state()
        .set(leaked, st, 0)
        .expect("mark a slot without a rule");
    let mut st = state().get(&live, 0).expect("slot");
    st.latch.slot_mark = 0;
    state().set(live, st, 0).expect("clear a live rule's mark");
    // The agent restarts over its pins.
    let mut ebpf = loader::load(
        loader::MapSizes {
            max_pinholes: 1024,
            dst_slots: settings(MEDIA).dst_slots(),
        },
        Some(&p.dir),
    )
    .expect("re-adopt the pins");
    let mut agent = DatapathMaps::from_ebpf_pinned(&mut ebpf, &p.dir).expect("maps");
    assert_eq!(
        mark(live),
        SLOT_IN_USE,
        "the live rule's slot is marked again"
    );
    assert_eq!(mark(leaked), 0, "the leaked slot is free again");
    let (_, next) = agent
        .add_flow(&nat("10.77.0.3:4000", MEDIA.0 + 2))
        .expect("another nat flow");
    assert_ne!(
        next, live,
        "the next flow never shares the live rule's slot"
    );
    drop(agent);
    drop(ebpf);
}
