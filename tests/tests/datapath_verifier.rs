//! The XDP object embedded in the agent goes through the kernel verifier via
//! the production loader (`datapath::loader::load`, not a copy), declares
//! every map the agent relies on, and re-adopts pinned maps on a second
//! load. Without root/BPF/bpffs the tests print `SKIPPED: <reason>`.

use std::path::Path;

use aya::maps::HashMap;
use aya::programs::Xdp;
use sip_edge::datapath::loader::{self, MapSizes};
use sip_edge_common::{
    addr_from_ip, map_names, PinholeKey, PinholeRule, FAMILY_V4, MATCH_DST, PROTO_UDP,
    ROLE_EXTERNAL, RULE_REWRITE_DST, XDP_PROG_NAME,
};

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: loading BPF programs needs CAP_BPF/CAP_SYS_ADMIN".into());
    }
    None
}

fn is_bpffs(p: &Path) -> bool {
    sip_edge::datapath::attach::is_bpffs(p)
}

#[test]
fn map_names_fit_bpf_obj_name() {
    for name in map_names::ALL.iter().chain(map_names::BENCH.iter()) {
        assert!(
            name.len() <= 15,
            "map name {name} is longer than BPF_OBJ_NAME_LEN - 1"
        );
    }
}

#[test]
fn production_loader_passes_verifier_and_declares_every_map() {
    if let Some(r) = skip_reason() {
        sip_edge_tests::testnet::record_skip(
            "datapath_verifier::production_loader_passes_verifier_and_declares_every_map",
            &r,
        );
        return;
    }
    // A private pin dir: with `None` the maps would be pinned into (and
    // shared through) /sys/fs/bpf itself, see the test below.
    let root = Path::new("/sys/fs/bpf");
    let dir = is_bpffs(root).then(|| {
        tempfile::Builder::new()
            .prefix("sip-edge-test-")
            .tempdir_in(root)
            .expect("pin dir in bpffs")
    });
    let ebpf = loader::load(MapSizes::default(), dir.as_ref().map(|d| d.path()))
        .unwrap_or_else(|e| panic!("load failed: {e:?}"));
    let prog: &Xdp = ebpf
        .program(XDP_PROG_NAME)
        .unwrap_or_else(|| panic!("program {XDP_PROG_NAME} missing"))
        .try_into()
        .expect("program is XDP");
    prog.fd().expect("program is loaded (verifier accepted it)");
    // For whoever changes the datapath: the verifier's cost on this kernel
    // (`cargo xtask kernels` holds every kernel to 10% of the budget).
    if let Ok(info) = prog.info() {
        eprintln!(
            "{XDP_PROG_NAME}: verified_insns {:?}",
            info.verified_instruction_count()
        );
    }
    for name in map_names::ALL {
        assert!(
            ebpf.map(name).is_some(),
            "map {name} is missing from the loaded object"
        );
    }
    let mut names: Vec<&str> = ebpf
        .maps()
        .map(|(n, _)| n)
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort_unstable();
    let mut want: Vec<&str> = map_names::ALL.to_vec();
    want.sort_unstable();
    assert_eq!(names, want, "the object declares exactly map_names::ALL");
    let progs: Vec<&str> = ebpf.programs().map(|(n, _)| n).collect();
    assert_eq!(
        progs,
        [XDP_PROG_NAME],
        "the object the agent embeds holds the datapath program only"
    );
}

/// The test and bench programs live in their own object, with the bench
/// maps, so nothing of theirs ships inside the agent.
#[test]
fn harness_object_holds_the_test_programs_and_bench_maps() {
    use sip_edge_common::bench_progs;
    use sip_edge_tests::harness;
    if let Some(r) = skip_reason() {
        sip_edge_tests::testnet::record_skip(
            "datapath_verifier::harness_object_holds_the_test_programs_and_bench_maps",
            &r,
        );
        return;
    }
    let ebpf = harness::load().unwrap_or_else(|e| panic!("parse failed: {e:?}"));
    let mut progs: Vec<&str> = ebpf.programs().map(|(n, _)| n).collect();
    progs.sort_unstable();
    let mut want = [
        bench_progs::GEN,
        bench_progs::PASS,
        bench_progs::REDIRECT,
        bench_progs::SINK,
    ];
    want.sort_unstable();
    assert_eq!(progs, want);
    let mut maps: Vec<&str> = ebpf
        .maps()
        .map(|(n, _)| n)
        .filter(|n| !n.starts_with('.'))
        .collect();
    maps.sort_unstable();
    let mut want_maps = map_names::BENCH.to_vec();
    want_maps.sort_unstable();
    assert_eq!(maps, want_maps);
}

/// `load(.., None)` promises unpinned maps (tests and benchmarks must not
/// share state through /sys/fs/bpf); the object declares its maps pinned by
/// name, which aya honours by pinning into /sys/fs/bpf unless told a path.
/// Compared by map id, so another process's pin there cannot fool it.
#[test]
fn load_without_pin_dir_does_not_pin_into_sys_fs_bpf() {
    if let Some(r) = skip_reason() {
        sip_edge_tests::testnet::record_skip(
            "datapath_verifier::load_without_pin_dir_does_not_pin_into_sys_fs_bpf",
            &r,
        );
        return;
    }
    let mut ebpf = loader::load(
        MapSizes {
            max_pinholes: 1024,
            ..MapSizes::default()
        },
        None,
    )
    .unwrap_or_else(|e| panic!("load failed: {e:?}"));
    let ours = match ebpf.take_map(map_names::PINHOLES) {
        Some(aya::maps::Map::HashMap(md)) => md.info().expect("map info").id(),
        other => panic!("PINHOLES is not a plain hash map: {other:?}"),
    };
    let pin = Path::new("/sys/fs/bpf").join(map_names::PINHOLES);
    let pinned = aya::maps::MapInfo::from_pin(&pin)
        .map(|info| info.id() == ours)
        .unwrap_or(false);
    if pinned {
        // Do not leave the stray pins behind (unlinking never affects a
        // process that holds the maps open).
        for name in map_names::ALL {
            let _ = std::fs::remove_file(Path::new("/sys/fs/bpf").join(name));
        }
    }
    assert!(
        !pinned,
        "loader::load(_, None) pinned PINHOLES at {} (the object's maps are pinned by name and no path overrides it): \
         unrelated runs share one pinhole table",
        pin.display()
    );
}

#[test]
fn pinned_maps_are_readopted_by_a_second_load() {
    if let Some(r) = skip_reason() {
        sip_edge_tests::testnet::record_skip(
            "datapath_verifier::pinned_maps_are_readopted_by_a_second_load",
            &r,
        );
        return;
    }
    let root = Path::new("/sys/fs/bpf");
    if !is_bpffs(root) {
        sip_edge_tests::testnet::record_skip(
            "datapath_verifier::pinned_maps_are_readopted_by_a_second_load",
            "/sys/fs/bpf is not a bpffs mount (mount -t bpf bpf /sys/fs/bpf)",
        );
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("sip-edge-test-")
        .tempdir_in(root)
        .expect("pin dir in bpffs");
    let (family, addr) = addr_from_ip("203.0.113.1".parse().expect("ip"));
    assert_eq!(family, FAMILY_V4);
    let key = PinholeKey {
        addr,
        port: 40000u16.to_be(),
        proto: PROTO_UDP,
        family,
        role: ROLE_EXTERNAL,
        match_on: MATCH_DST,
        _pad: [0; 2],
    };
    let rule = PinholeRule {
        remote_addr: addr_from_ip("198.51.100.10".parse().expect("ip")).1,
        new_dst: addr_from_ip("10.77.0.2".parse().expect("ip")).1,
        remote_port: 30000u16.to_be(),
        new_dst_port: 16384u16.to_be(),
        flags: RULE_REWRITE_DST,
        slot: 7,
        ..Default::default()
    };
    {
        let mut first = loader::load(
            MapSizes {
                max_pinholes: 1024,
                ..MapSizes::default()
            },
            Some(dir.path()),
        )
        .expect("first load");
        let mut ph: HashMap<_, PinholeKey, PinholeRule> =
            HashMap::try_from(first.map_mut(map_names::PINHOLES).expect("PINHOLES"))
                .expect("hash map");
        ph.insert(key, rule, 0)
            .expect("insert through the first load");
        for name in map_names::ALL {
            assert!(
                dir.path().join(name).exists(),
                "map {name} is not pinned under {}",
                dir.path().display()
            );
        }
        let second = loader::load(
            MapSizes {
                max_pinholes: 1024,
                ..MapSizes::default()
            },
            Some(dir.path()),
        )
        .expect("second load");
        let ph2: HashMap<_, PinholeKey, PinholeRule> =
            HashMap::try_from(second.map(map_names::PINHOLES).expect("PINHOLES"))
                .expect("hash map");
        assert_eq!(
            ph2.get(&key, 0).expect("entry written by the first load"),
            rule
        );
    }
    // Both loads are gone; the pins keep the maps. Remove them.
    let path = dir.path().to_path_buf();
    dir.close().expect("remove pins");
    assert!(!path.exists(), "pin dir {} still exists", path.display());
}
