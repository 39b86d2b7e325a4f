//! Table-driven datapath fixtures: the XDP program, loaded through the
//! production `loader::load`, is run with BPF_PROG_TEST_RUN on packets built
//! by `packet`, inside a private namespace built by `netns`, and its verdict,
//! output frame, `REASONS` deltas, `PH_STATE` and `NEIGH_MISS` are compared
//! with the expectations in `table`. Used by `tests/datapath_fixtures.rs` and
//! the `sip-edge-tester` binary (which also times paths with `repeat`).

pub mod netns;
pub mod packet;
pub mod table;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use aya::maps::{xdp::DevMapHash, Array, HashMap, Map, MapData, MapError, PerCpuArray};
use aya::programs::{ProgramError, Xdp};
use aya::{Ebpf, TestRun, TestRunOptions};
use sip_edge_common::{
    addr_from_ip, dst_port_index, ip_from_addr, map_names, DstCold, DstEntry, EdgeAddrKey,
    EdgeList, HotRule, IfaceConfig, NeighMiss, NeighMissKey, PinholeKey, PinholeRule, PinholeState,
    PortPolicy, Reason, Settings, DST_HOT, DST_OVF, DST_VALID, LATCH_DONE, LATCH_NONE, MATCH_DST,
    REASON_COUNT, ROLE_EXTERNAL, ROLE_INTERNAL, SLOT_DST, STAMP_SHIFT, XDP_PROG_NAME,
};

use netns::{Links, Netns, NetnsError};
use packet::PacketError;
use sip_edge::datapath::loader::{self, LoadError, MapSizes};

pub use table::all as fixtures;

/// XDP return codes (uapi `enum xdp_action`).
pub const XDP_ABORTED: u32 = 0;
/// Drop.
pub const XDP_DROP: u32 = 1;
/// Pass to the kernel stack.
pub const XDP_PASS: u32 = 2;
/// Transmit back out of the ingress link.
pub const XDP_TX: u32 = 3;
/// Redirect (devmap).
pub const XDP_REDIRECT: u32 = 4;

/// `PINHOLES`/`PH_STATE` size the runner loads with; a rule slot at or past
/// it exercises `DropBadRule`.
pub const MAX_PINHOLES: u32 = 1024;

/// Name of an XDP action for reports.
pub fn action_name(a: u32) -> &'static str {
    match a {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "XDP_?",
    }
}

/// Errors of the fixture runner (not fixture failures, which are reported
/// per fixture).
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// Building or entering the namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The production loader failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A map the program should declare is missing.
    #[error("map {name} is missing from the loaded object")]
    MissingMap {
        /// Map name.
        name: &'static str,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// A devmap update failed.
    #[error("devmap {name}: {source}")]
    DevMap {
        /// Map name.
        name: &'static str,
        /// aya's error.
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    /// The program is missing or BPF_PROG_TEST_RUN failed.
    #[error("running {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// aya's error.
        #[source]
        source: ProgramError,
    },
    /// A fixture's packet could not be built.
    #[error(transparent)]
    Packet(#[from] PacketError),
    /// Creating or removing the private pin directory failed.
    #[error("pin dir {}: {source}", path.display())]
    PinDir {
        /// Path.
        path: std::path::PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing a sysctl failed.
    #[error("sysctl {path}: {source}")]
    Sysctl {
        /// /proc/sys path.
        path: &'static str,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> FixtureError {
    move |source| FixtureError::Map { name, source }
}

/// Interface a fixture packet arrives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iface {
    /// The internal link (`IFACES` role internal).
    Internal,
    /// The external link (`IFACES` role external).
    External,
    /// A routed link that is in neither `IFACES` nor `TX_PORTS`.
    Other,
    /// Loopback (not in `IFACES`).
    Loopback,
    /// An external-role link whose ifindex is ≥ `IFACE_SLOTS` (`IFACES_HI`).
    HighIndex,
}

impl Iface {
    fn index(self, l: &Links) -> u32 {
        match self {
            Iface::Internal => l.int,
            Iface::External => l.ext,
            Iface::Other => l.oth,
            Iface::Loopback => l.lo,
            Iface::HighIndex => l.hi,
        }
    }
}

/// One pinhole a fixture installs (and removes afterwards).
#[derive(Clone, Debug)]
pub struct Pinhole {
    /// `PINHOLES` key.
    pub key: PinholeKey,
    /// `PINHOLES` value.
    pub rule: PinholeRule,
    /// Initial `PH_STATE[rule.slot]`; zeroed when `None`.
    pub state: Option<PinholeState>,
    /// Whether the runner counts the rule in `DST_PORTS` as the map writer
    /// does; `false` installs it uncounted, to check that the datapath then
    /// skips the lookup by destination.
    pub counted: bool,
}

/// What the output frame must be.
#[derive(Clone, Debug)]
pub enum Output {
    /// Exactly these bytes (built independently).
    Exact(Vec<u8>),
    /// Identical to the input (passed frames must be untouched).
    Unchanged,
    /// Not checked (dropped frames).
    Any,
}

/// One BPF_PROG_TEST_RUN of a fixture.
#[derive(Clone, Debug)]
pub struct Step {
    /// What this step is about.
    pub note: &'static str,
    /// Ingress link.
    pub ingress: Iface,
    /// Input frame.
    pub input: Vec<u8>,
    /// Expected XDP action.
    pub action: u32,
    /// Expected output frame.
    pub output: Output,
    /// Expected `REASONS` deltas; every other reason must not move.
    pub reasons: Vec<(Reason, u64)>,
}

/// Expected `last_seen_ns` of a state slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LastSeen {
    /// Still 0.
    Never,
    /// A CLOCK_MONOTONIC_COARSE time between the fixture's start and end.
    DuringRun,
}

/// Expected latch of a state slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Latch {
    /// `LATCH_NONE`, address and port zero.
    None,
    /// `LATCH_DONE` with this remote.
    Done(SocketAddr),
}

/// Expected `PH_STATE[slot]` after all steps.
#[derive(Clone, Debug)]
pub struct StateExpect {
    /// Slot index.
    pub slot: u32,
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded (frame lengths as received).
    pub bytes: u64,
    /// last_seen_ns.
    pub last_seen: LastSeen,
    /// Latch state.
    pub latch: Latch,
}

/// Which target a benchmark fixture is held to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchClass {
    /// Pinhole hit (target ≤ 80 ns).
    Hit,
    /// Drop (target ≤ 40 ns).
    Drop,
    /// Pass to the kernel.
    Pass,
}

impl BenchClass {
    /// Target ns/packet, if any.
    pub fn target_ns(self) -> Option<f64> {
        match self {
            BenchClass::Hit => Some(80.0),
            BenchClass::Drop => Some(40.0),
            BenchClass::Pass => None,
        }
    }
}

/// One fixture.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// Short unique id (used by `--filter`).
    pub name: String,
    /// Group (one #[test] per group).
    pub group: &'static str,
    /// What the fixture checks.
    pub description: String,
    /// Pinholes installed for the fixture.
    pub pinholes: Vec<Pinhole>,
    /// `SETTINGS` during the fixture.
    pub settings: Settings,
    /// Packets, in order.
    pub steps: Vec<Step>,
    /// Expected state slots afterwards.
    pub states: Vec<StateExpect>,
    /// Expected `NEIGH_MISS` entries: (next hop, egress link). Exactly these.
    pub neigh_miss: Vec<(IpAddr, Iface)>,
    /// Whether `--repeat` holds this fixture to a target.
    pub bench: Option<BenchClass>,
}

/// Result of one fixture.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FixtureResult {
    /// Fixture id.
    pub name: String,
    /// Fixture description.
    pub description: String,
    /// Mismatches; empty means pass.
    pub failures: Vec<String>,
}

impl FixtureResult {
    /// Whether every expectation held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Result of timing one fixture's first step with `repeat`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    /// Fixture id.
    pub name: String,
    /// Mean ns per program run as reported by the kernel; `None` when the
    /// fixture is not timed (see `note`).
    pub ns_per_packet: Option<f64>,
    /// Program runs timed.
    pub packets: u64,
    /// Reasons counted during the timed runs (name, count): shows which
    /// path was actually measured.
    pub reasons: Vec<(String, u64)>,
    /// Target class, if any.
    pub class: Option<BenchClass>,
    /// Why the fixture was not timed, or timed on fewer runs.
    pub note: Option<String>,
}

/// What `Runner::setup` produced.
pub enum Setup {
    /// Ready to run fixtures.
    Ready(Box<Runner>),
    /// Cannot run here (not root, no BPF); the reason is for printing.
    Skipped(String),
}

/// The maps the runner writes per fixture.
struct Maps {
    pinholes: HashMap<MapData, PinholeKey, PinholeRule>,
    state: Array<MapData, PinholeState>,
    reasons: PerCpuArray<MapData, u64>,
    settings: Array<MapData, Settings>,
    neigh_miss: HashMap<MapData, NeighMissKey, NeighMiss>,
    dst_ports: Array<MapData, u64>,
    dst: Array<MapData, DstEntry>,
    dst_cold: Array<MapData, DstCold>,
}

/// A loaded program in its own namespace. Field order is drop order: the
/// program and maps go before the namespace is deleted.
pub struct Runner {
    ebpf: Ebpf,
    maps: Maps,
    ns: Netns,
    /// `EDGE_LIST` as written: the `PH_DST` layout.
    layout: EdgeList,
    /// Install every rule in `PINHOLES` (with `PH_DST` overflow counts)
    /// instead of giving `MATCH_DST` rules their `PH_DST` entry, as the map
    /// writer does for a key whose entry is taken.
    pub hash_only: bool,
    /// Fixture slot → slot id of the installed fixture's rules placed in
    /// `PH_DST`.
    placed: std::collections::HashMap<u32, u32>,
}

/// `PH_DST` entries the runner loads with: the media range on the four
/// edge addresses.
const DST_SLOTS: u32 = 4 * 1000;

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it in `ctx_in`: data 0,
/// data_end = frame length, data_meta 0, ingress_ifindex, rx_queue_index 0,
/// egress_ifindex 0 (uapi/linux/bpf.h; the kernel rejects other shapes).
fn xdp_md(len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    b[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    b
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `p` is on a bpf filesystem.
fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statfs is a valid out-buffer; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Unlink the pins of a private pin dir and the dir itself.
fn remove_pins(dir: &Path) -> Result<(), FixtureError> {
    for name in map_names::ALL {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(FixtureError::PinDir {
                    path: dir.join(name),
                    source,
                })
            }
        }
    }
    std::fs::remove_dir(dir).map_err(|source| FixtureError::PinDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// `clock` in ns: CLOCK_MONOTONIC is the clock of `bpf_ktime_get_ns()`
/// (`NEIGH_MISS`), CLOCK_MONOTONIC_COARSE that of
/// `bpf_ktime_get_coarse_ns()` (`PH_STATE.last_seen_ns`), which lags the
/// fine clock by up to a tick: a run's window starts at the coarse reading.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; both clocks always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in ns.
fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn os_error_of(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        cur = err.source();
    }
    None
}

fn take<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    conv: impl FnOnce(Map) -> Result<T, MapError>,
) -> Result<T, FixtureError> {
    let map = ebpf
        .take_map(name)
        .ok_or(FixtureError::MissingMap { name })?;
    conv(map).map_err(map_err(name))
}

/// The port policy the fixtures assume (`table::MEDIA_PORTS`, `PASS_PORTS`).
pub fn port_policy() -> Box<PortPolicy> {
    let mut p = Box::new(PortPolicy::EMPTY);
    for port in table::MEDIA_PORTS {
        PortPolicy::set(&mut p.media, port);
    }
    for port in table::PASS_PORTS {
        PortPolicy::set(&mut p.pass, port);
    }
    p
}

impl Runner {
    /// Create the namespace, load the program there and fill the static
    /// maps. Returns `Skipped` where this cannot work (not root, BPF not
    /// permitted); a verifier rejection is an error, never a skip.
    pub fn setup() -> Result<Setup, FixtureError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(Setup::Skipped(
                "not root: BPF_PROG_TEST_RUN and network namespaces need root".into(),
            ));
        }
        let ns = match Netns::create() {
            Ok(ns) => ns,
            Err(e @ (NetnsError::Spawn { .. } | NetnsError::Command { .. })) => {
                return Ok(Setup::Skipped(format!(
                    "cannot build the test namespace: {e}"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        // A private pin dir, unlinked right after the load (our fds keep the
        // maps): should the object ever declare its maps pinned by name
        // again, `load(.., None)` would pin them at /sys/fs/bpf/<NAME> and
        // share them with every other loader on the machine (it did, before
        // a2659b0; `datapath_verifier` guards that). Without bpffs, `None`.
        let bpffs = Path::new("/sys/fs/bpf");
        let sizes = MapSizes {
            max_pinholes: MAX_PINHOLES,
            dst_slots: DST_SLOTS,
        };
        let loaded = if is_bpffs(bpffs) {
            let pin_dir = bpffs.join(ns.name());
            std::fs::create_dir(&pin_dir).map_err(|source| FixtureError::PinDir {
                path: pin_dir.clone(),
                source,
            })?;
            let loaded = loader::load(sizes, Some(&pin_dir));
            remove_pins(&pin_dir)?;
            loaded
        } else {
            loader::load(sizes, None)
        };
        let mut ebpf = match loaded {
            Ok(e) => e,
            Err(e @ LoadError::Object { .. })
                if matches!(os_error_of(&e), Some(libc::EPERM | libc::ENOSYS)) =>
            {
                return Ok(Setup::Skipped(format!("BPF unavailable: {e}")))
            }
            Err(e) => return Err(e.into()),
        };
        let links = ns.links;
        // The namespace is fresh, so its ifindexes are small: IFACES (the
        // array) holds them; the high link goes in `IFACES_HI` (`iface-hi-*`).
        let mut ifaces: Array<MapData, IfaceConfig> =
            take(&mut ebpf, map_names::IFACES, Array::try_from)?;
        for (idx, role) in [(links.int, ROLE_INTERNAL), (links.ext, ROLE_EXTERNAL)] {
            ifaces
                .set(idx, IfaceConfig { role, _pad: [0; 7] }, 0)
                .map_err(map_err(map_names::IFACES))?;
        }
        let mut hi: HashMap<MapData, u32, IfaceConfig> =
            take(&mut ebpf, map_names::IFACES_HI, HashMap::try_from)?;
        hi.insert(
            links.hi,
            IfaceConfig {
                role: ROLE_EXTERNAL,
                _pad: [0; 7],
            },
            0,
        )
        .map_err(map_err(map_names::IFACES_HI))?;
        let mut tx: DevMapHash<MapData> =
            take(&mut ebpf, map_names::TX_PORTS, DevMapHash::try_from)?;
        for idx in [links.int, links.ext] {
            tx.insert(idx, idx, None, 0)
                .map_err(|source| FixtureError::DevMap {
                    name: map_names::TX_PORTS,
                    source,
                })?;
        }
        let mut edge: HashMap<MapData, EdgeAddrKey, u32> =
            take(&mut ebpf, map_names::EDGE_ADDRS, HashMap::try_from)?;
        let edge_ips = [
            IpAddr::from(netns::EDGE_INT4),
            netns::EDGE_PUB4.into(),
            netns::EDGE_INT6.into(),
            netns::EDGE_PUB6.into(),
        ];
        let mut list: Array<MapData, EdgeList> =
            take(&mut ebpf, map_names::EDGE_LIST, Array::try_from)?;
        let layout = sip_edge::datapath::maps::edge_list(
            &edge_ips,
            &[(*table::MEDIA_PORTS.start(), *table::MEDIA_PORTS.end())],
            DST_SLOTS,
        );
        list.set(0, layout, 0)
            .map_err(map_err(map_names::EDGE_LIST))?;
        for ip in edge_ips {
            let (family, addr) = addr_from_ip(ip);
            edge.insert(
                EdgeAddrKey {
                    addr,
                    family,
                    _pad: [0; 3],
                },
                1,
                0,
            )
            .map_err(map_err(map_names::EDGE_ADDRS))?;
        }
        let mut policy: Array<MapData, PortPolicy> =
            take(&mut ebpf, map_names::PORT_POLICY, Array::try_from)?;
        policy
            .set(0, port_policy(), 0)
            .map_err(map_err(map_names::PORT_POLICY))?;
        let maps = Maps {
            pinholes: take(&mut ebpf, map_names::PINHOLES, HashMap::try_from)?,
            state: take(&mut ebpf, map_names::PH_STATE, Array::try_from)?,
            reasons: take(&mut ebpf, map_names::REASONS, PerCpuArray::try_from)?,
            settings: take(&mut ebpf, map_names::SETTINGS, Array::try_from)?,
            neigh_miss: take(&mut ebpf, map_names::NEIGH_MISS, HashMap::try_from)?,
            dst_ports: take(&mut ebpf, map_names::DST_PORTS, Array::try_from)?,
            dst: take(&mut ebpf, map_names::PH_DST, Array::try_from)?,
            dst_cold: take(&mut ebpf, map_names::PH_DST_COLD, Array::try_from)?,
        };
        Ok(Setup::Ready(Box::new(Runner {
            ebpf,
            maps,
            ns,
            layout,
            hash_only: false,
            placed: Default::default(),
        })))
    }

    /// Name of the namespace the runner works in.
    pub fn netns_name(&self) -> &str {
        self.ns.name()
    }

    fn program(&self) -> Result<&Xdp, FixtureError> {
        let prog = self
            .ebpf
            .program(XDP_PROG_NAME)
            .ok_or(FixtureError::Program {
                name: XDP_PROG_NAME,
                source: ProgramError::NotLoaded,
            })?;
        prog.try_into().map_err(|source| FixtureError::Program {
            name: XDP_PROG_NAME,
            source,
        })
    }

    /// One BPF_PROG_TEST_RUN: (action, output frame, kernel-reported mean
    /// duration per run).
    fn run(
        &self,
        ingress: Iface,
        input: &[u8],
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, Duration), FixtureError> {
        let ctx = xdp_md(input.len(), ingress.index(&self.ns.links));
        // Room for a program that grows the frame (encapsulation); ours never does.
        let mut out = vec![0u8; input.len() + 512];
        let res = self
            .program()?
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat,
                ..TestRunOptions::new()
            })
            .map_err(|source| FixtureError::Program {
                name: XDP_PROG_NAME,
                source,
            })?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out, res.duration))
    }

    fn reasons(&self) -> Result<Vec<u64>, FixtureError> {
        (0..REASON_COUNT)
            .map(|i| {
                let v = self
                    .maps
                    .reasons
                    .get(&i, 0)
                    .map_err(map_err(map_names::REASONS))?;
                Ok(v.iter().sum())
            })
            .collect()
    }

    fn install(&mut self, f: &Fixture) -> Result<(), FixtureError> {
        self.maps
            .settings
            .set(0, f.settings, 0)
            .map_err(map_err(map_names::SETTINGS))?;
        self.clear_neigh_miss()?;
        // MATCH_DST rules on an indexed key take its PH_DST entry (ids
        // `SLOT_DST | index`, fixture slots and pair slots mapped), as the
        // map writer places them; a slot past PH_STATE stays in PINHOLES
        // (it tests DropBadRule).
        self.placed.clear();
        if !self.hash_only {
            for p in &f.pinholes {
                if let Some(idx) = self.dst_index(&p.key) {
                    if p.rule.slot < MAX_PINHOLES
                        && !self.placed.values().any(|v| *v == SLOT_DST | idx)
                    {
                        self.placed.insert(p.rule.slot, SLOT_DST | idx);
                    }
                }
            }
        }
        for p in &f.pinholes {
            let mut rule = p.rule;
            rule.slot = self.id_of(rule.slot);
            rule.pair_slot = self.id_of(rule.pair_slot);
            if p.counted {
                self.count_dst(&p.key, 1)?;
            }
            if rule.slot & SLOT_DST != 0 && self.placed.contains_key(&p.rule.slot) {
                let idx = rule.slot & !SLOT_DST;
                // As the map writer publishes: the full rule in the cold
                // part, its IPv4 copy (when it has one) in the hot line.
                let (mut e, mut c) = self.dst_get(idx)?;
                let st = p.state.unwrap_or_default();
                let hot = HotRule::of(p.key.family, &rule);
                e.stats = st.stats;
                e.rule = hot.unwrap_or_default();
                e.ctl = (e.ctl & DST_OVF)
                    | DST_VALID
                    | if hot.is_some() { DST_HOT } else { 0 }
                    | sip_edge::datapath::maps::ctl_key(&p.key);
                c.latch = st.latch;
                c.rules = [rule, PinholeRule::default()];
                self.dst_set(idx, e, c)?;
                continue;
            }
            if rule.slot < MAX_PINHOLES {
                self.maps
                    .state
                    .set(rule.slot, p.state.unwrap_or_default(), 0)
                    .map_err(map_err(map_names::PH_STATE))?;
            }
            if let Some(idx) = self.dst_index(&p.key) {
                let (mut e, mut c) = self.dst_get(idx)?;
                c.overflow += 1;
                e.ctl |= DST_OVF;
                self.dst_set(idx, e, c)?;
            }
            self.maps
                .pinholes
                .insert(p.key, rule, 0)
                .map_err(map_err(map_names::PINHOLES))?;
        }
        Ok(())
    }

    fn dst_index(&self, key: &PinholeKey) -> Option<u32> {
        sip_edge::datapath::maps::dst_index(&self.layout, DST_SLOTS, key)
    }

    /// The installed id of fixture slot `slot`.
    fn id_of(&self, slot: u32) -> u32 {
        self.placed.get(&slot).copied().unwrap_or(slot)
    }

    fn dst_get(&self, idx: u32) -> Result<(DstEntry, DstCold), FixtureError> {
        Ok((
            self.maps
                .dst
                .get(&idx, 0)
                .map_err(map_err(map_names::PH_DST))?,
            self.maps
                .dst_cold
                .get(&idx, 0)
                .map_err(map_err(map_names::PH_DST_COLD))?,
        ))
    }

    /// Write entry `idx`: the cold part first, the hot line (with `ctl`)
    /// after, as the map writer publishes.
    fn dst_set(&mut self, idx: u32, e: DstEntry, c: DstCold) -> Result<(), FixtureError> {
        self.maps
            .dst_cold
            .set(idx, c, 0)
            .map_err(map_err(map_names::PH_DST_COLD))?;
        self.maps
            .dst
            .set(idx, e, 0)
            .map_err(map_err(map_names::PH_DST))
    }

    /// State of fixture slot `slot` as installed.
    fn state_of(&self, slot: u32) -> Result<PinholeState, FixtureError> {
        let id = self.id_of(slot);
        if id & SLOT_DST != 0 {
            let (e, c) = self.dst_get(id & !SLOT_DST)?;
            return Ok(PinholeState {
                stats: e.stats,
                latch: c.latch,
                fib_dst6: [0; 16],
            });
        }
        self.maps
            .state
            .get(&id, 0)
            .map_err(map_err(map_names::PH_STATE))
    }

    /// Add `delta` to the `DST_PORTS` count of a `MATCH_DST` key (what the
    /// map writer does with atomics; the runner is the only writer here).
    fn count_dst(&mut self, key: &PinholeKey, delta: i64) -> Result<(), FixtureError> {
        if key.match_on != MATCH_DST {
            return Ok(());
        }
        let idx = dst_port_index(key.proto, u16::from_be(key.port));
        let n = self
            .maps
            .dst_ports
            .get(&idx, 0)
            .map_err(map_err(map_names::DST_PORTS))?;
        self.maps
            .dst_ports
            .set(idx, n.saturating_add_signed(delta), 0)
            .map_err(map_err(map_names::DST_PORTS))
    }

    fn uninstall(&mut self, f: &Fixture) -> Result<(), FixtureError> {
        for p in &f.pinholes {
            if p.counted {
                self.count_dst(&p.key, -1)?;
            }
            if let Some(idx) = self.dst_index(&p.key) {
                self.dst_set(idx, DstEntry::default(), DstCold::default())?;
            }
            let id = self.id_of(p.rule.slot);
            if id & SLOT_DST != 0 && self.placed.contains_key(&p.rule.slot) {
                continue;
            }
            self.maps
                .pinholes
                .remove(&p.key)
                .map_err(map_err(map_names::PINHOLES))?;
            if p.rule.slot < MAX_PINHOLES {
                self.maps
                    .state
                    .set(p.rule.slot, PinholeState::default(), 0)
                    .map_err(map_err(map_names::PH_STATE))?;
            }
        }
        self.placed.clear();
        self.clear_neigh_miss()?;
        self.maps
            .settings
            .set(0, Settings::default(), 0)
            .map_err(map_err(map_names::SETTINGS))
    }

    fn clear_neigh_miss(&mut self) -> Result<(), FixtureError> {
        let keys: Vec<NeighMissKey> = self
            .maps
            .neigh_miss
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::NEIGH_MISS))?;
        for k in keys {
            self.maps
                .neigh_miss
                .remove(&k)
                .map_err(map_err(map_names::NEIGH_MISS))?;
        }
        Ok(())
    }

    /// Run one fixture and compare everything it expects. Runner errors
    /// (map or syscall failures) are `Err`; expectation mismatches are
    /// listed in the result.
    pub fn run_fixture(&mut self, f: &Fixture) -> Result<FixtureResult, FixtureError> {
        self.install(f)?;
        let checked = self.check(f);
        let cleaned = self.uninstall(f);
        let failures = checked?;
        cleaned?;
        Ok(FixtureResult {
            name: f.name.clone(),
            description: f.description.clone(),
            failures,
        })
    }

    fn check(&self, f: &Fixture) -> Result<Vec<String>, FixtureError> {
        let mut fails = Vec::new();
        let t0_coarse = clock_ns(libc::CLOCK_MONOTONIC_COARSE);
        let t0 = monotonic_ns();
        for (n, step) in f.steps.iter().enumerate() {
            let tag = format!("step {} ({})", n + 1, step.note);
            let before = self.reasons()?;
            let (action, out, _) = self.run(step.ingress, &step.input, 1)?;
            let after = self.reasons()?;
            if action != step.action {
                fails.push(format!(
                    "{tag}: action {} expected, got {}",
                    action_name(step.action),
                    action_name(action)
                ));
            }
            let expected = match &step.output {
                Output::Exact(b) => Some(b.as_slice()),
                Output::Unchanged => Some(step.input.as_slice()),
                Output::Any => None,
            };
            if let Some(exp) = expected {
                if exp != out.as_slice() {
                    fails.push(format!(
                        "{tag}: output frame differs\n{}",
                        packet::diff(exp, &out)
                    ));
                }
            }
            let mut want = vec![0u64; REASON_COUNT as usize];
            for (r, d) in &step.reasons {
                want[*r as usize] += d;
            }
            for r in Reason::ALL {
                let got = after[r as usize].wrapping_sub(before[r as usize]);
                if got != want[r as usize] {
                    fails.push(format!(
                        "{tag}: REASONS[{}] moved by {got}, expected {}",
                        r.name(),
                        want[r as usize]
                    ));
                }
            }
        }
        let t1 = monotonic_ns();
        for s in &f.states {
            let got = self.state_of(s.slot)?;
            fails.extend(compare_state(s, &got, t0_coarse, t1));
        }
        let want: HashSet<NeighMissKey> = f
            .neigh_miss
            .iter()
            .map(|(ip, iface)| {
                let (family, addr) = addr_from_ip(*ip);
                NeighMissKey {
                    addr,
                    ifindex: iface.index(&self.ns.links),
                    family,
                    _pad: [0; 3],
                }
            })
            .collect();
        let mut got = HashSet::new();
        for k in self.maps.neigh_miss.keys() {
            let k = k.map_err(map_err(map_names::NEIGH_MISS))?;
            let v = self
                .maps
                .neigh_miss
                .get(&k, 0)
                .map_err(map_err(map_names::NEIGH_MISS))?;
            if v.packets == 0 || v.last_ns < t0 || v.last_ns > t1 {
                fails.push(format!(
                    "NEIGH_MISS {}: packets {} last_ns {} (expected >0 and within the run)",
                    show_nm(&k),
                    v.packets,
                    v.last_ns
                ));
            }
            got.insert(k);
        }
        if got != want {
            let show =
                |s: &HashSet<NeighMissKey>| s.iter().map(show_nm).collect::<Vec<_>>().join(", ");
            fails.push(format!(
                "NEIGH_MISS entries [{}], expected [{}]",
                show(&got),
                show(&want)
            ));
        }
        Ok(fails)
    }

    /// Time the fixture's first step with BPF_PROG_TEST_RUN `repeat` and
    /// return the kernel's mean ns per program run. Call with `StatsOff`
    /// held.
    ///
    /// Two kernel facts shape this (net/bpf/test_run.c):
    /// * `repeat` reruns the program on the same buffer without restoring
    ///   it, so a rewriting step is repeatable only if its rule rewrites the
    ///   packet onto itself (the `bench-hit-*` fixtures), and then only while
    ///   the TTL lasts: TTL 255 allows `HIT_CHUNK` forwarded runs per call.
    ///   Other forwarding fixtures are not timed (they would measure the
    ///   miss path of their own output).
    /// * every XDP test run swaps the XDP dispatcher twice, each time
    ///   waiting for an RCU grace period (~35 ms on the 2-vCPU VM), so hits
    ///   are capped at `HIT_CALLS` calls; other paths run in one call.
    pub fn bench(&mut self, f: &Fixture, packets: u64) -> Result<BenchResult, FixtureError> {
        const HIT_CHUNK: u64 = 254;
        const HIT_CALLS: u64 = 40;
        let mut res = BenchResult {
            name: f.name.clone(),
            ns_per_packet: None,
            packets: 0,
            reasons: vec![],
            class: f.bench,
            note: None,
        };
        let Some(step) = f.steps.first() else {
            res.note = Some("no steps".into());
            return Ok(res);
        };
        let (chunk, packets) = if step.action == XDP_REDIRECT {
            if f.bench != Some(BenchClass::Hit) {
                res.note =
                    Some("not timed: its rewrite is not repeatable (see bench-hit-*)".into());
                return Ok(res);
            }
            let capped = packets.min(HIT_CHUNK * HIT_CALLS);
            if capped < packets {
                res.note = Some(format!(
                    "hit path capped at {capped} runs ({HIT_CALLS} calls x {HIT_CHUNK}, TTL-bound)"
                ));
            }
            (HIT_CHUNK, capped)
        } else {
            (u64::from(u32::MAX), packets)
        };
        self.install(f)?;
        let timed = (|| {
            let before = self.reasons()?;
            let (mut left, mut total_ns) = (packets, 0f64);
            while left > 0 {
                let n = left.min(chunk);
                let (_, _, d) = self.run(step.ingress, &step.input, n as u32)?;
                // The kernel returns time_spent / repeat (bpf_test_timer_continue):
                // already the mean per run, not the total.
                total_ns += d.as_nanos() as f64 * n as f64;
                left -= n;
            }
            let after = self.reasons()?;
            let reasons = Reason::ALL
                .iter()
                .filter_map(|r| {
                    let d = after[*r as usize].wrapping_sub(before[*r as usize]);
                    (d > 0).then(|| (r.name().to_string(), d))
                })
                .collect();
            Ok::<_, FixtureError>((total_ns, reasons))
        })();
        let cleaned = self.uninstall(f);
        let (total_ns, reasons) = timed?;
        cleaned?;
        res.ns_per_packet = (packets > 0).then(|| total_ns / packets as f64);
        res.packets = packets;
        res.reasons = reasons;
        Ok(res)
    }
}

fn show_nm(k: &NeighMissKey) -> String {
    let ip = ip_from_addr(k.family, &k.addr)
        .map(|i| i.to_string())
        .unwrap_or_else(|| format!("family {}", k.family));
    format!("{ip}@if{}", k.ifindex)
}

fn compare_state(s: &StateExpect, got: &PinholeState, t0: u64, t1: u64) -> Vec<String> {
    let mut f = Vec::new();
    let tag = format!("PH_STATE[{}]", s.slot);
    let (latch, got) = (&got.latch, &got.stats);
    if got.packets != s.packets {
        f.push(format!(
            "{tag}.packets = {}, expected {}",
            got.packets, s.packets
        ));
    }
    if got.bytes != s.bytes {
        f.push(format!("{tag}.bytes = {}, expected {}", got.bytes, s.bytes));
    }
    // The stamp keeps the coarse clock from bit STAMP_SHIFT up, low bit
    // set: compare in its units.
    let unit = |ns: u64| (ns >> STAMP_SHIFT) as u32;
    match s.last_seen {
        LastSeen::Never if got.last_seen != 0 => f.push(format!("{tag}.last_seen = {}, expected 0", got.last_seen)),
        LastSeen::DuringRun if got.last_seen & !1 < unit(t0) & !1 || got.last_seen > unit(t1) | 1 => {
            f.push(format!("{tag}.last_seen = {}, expected within [{}, {}] (CLOCK_MONOTONIC_COARSE .. CLOCK_MONOTONIC >> {STAMP_SHIFT})", got.last_seen, unit(t0), unit(t1) | 1))
        }
        _ => {}
    }
    let want = match s.latch {
        Latch::None => (LATCH_NONE, [0u8; 16], 0u16),
        Latch::Done(sa) => (LATCH_DONE, addr_from_ip(sa.ip()).1, sa.port().to_be()),
    };
    if (latch.latch_state, latch.latched_addr, latch.latched_port) != want {
        let fam = if matches!(s.latch, Latch::Done(SocketAddr::V6(_))) {
            6
        } else {
            4
        };
        let show = |st: u32, a: &[u8; 16], p: u16| {
            let ip = ip_from_addr(fam, a)
                .map(|i| i.to_string())
                .unwrap_or_default();
            format!("state {st} {ip} port {}", u16::from_be(p))
        };
        f.push(format!(
            "{tag} latch: {}, expected {}",
            show(latch.latch_state, &latch.latched_addr, latch.latched_port),
            show(want.0, &want.1, want.2)
        ));
    }
    f
}

/// Forces `kernel.bpf_stats_enabled` to 0 while held (run-time stats add
/// two clock reads per program run), restoring the old value on drop.
pub struct StatsOff {
    old: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsOff {
    /// Write 0, remembering the previous value.
    pub fn new() -> Result<StatsOff, FixtureError> {
        let old = std::fs::read_to_string(BPF_STATS).map_err(|source| FixtureError::Sysctl {
            path: BPF_STATS,
            source,
        })?;
        std::fs::write(BPF_STATS, "0").map_err(|source| FixtureError::Sysctl {
            path: BPF_STATS,
            source,
        })?;
        Ok(StatsOff {
            old: Some(old.trim().to_string()),
        })
    }
}

impl Drop for StatsOff {
    fn drop(&mut self) {
        if let Some(old) = self.old.take() {
            if let Err(e) = std::fs::write(BPF_STATS, &old) {
                eprintln!("warning: could not restore {BPF_STATS} to {old}: {e}");
            }
        }
    }
}
