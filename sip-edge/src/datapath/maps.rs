//! The map writer: the only code in the agent that writes BPF maps. It opens
//! the datapath's maps either from a freshly loaded object or from their
//! pins (for the CLI, while an agent runs), writes the configuration maps,
//! installs/removes pinhole rules with their state slots, and reads counters.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use aya::{
    maps::{Array, DevMapHash, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray},
    Ebpf,
};
use serde::Serialize;
use sip_edge_common::{
    addr_from_ip, dst_port_index, ip_from_addr, map_names, EdgeAddrKey, EdgeList, IfaceConfig, NeighMiss, NeighMissKey,
    PinholeKey, PinholeRule, PinholeState, PortPolicy, Reason, Settings, DST_PORT_SLOTS,
    EDGE_LIST_V4, EDGE_LIST_V6, FAMILY_V4, LATCH_DONE, MATCH_DST,
    PROTO_TCP, PROTO_UDP, ROLE_EXTERNAL, ROLE_INTERNAL,
};

use super::rules::{Flow, FlowError};

/// `BPF_NOEXIST`: insert only if the key is new.
const BPF_NOEXIST: u64 = 1;
/// `BPF_ANY`.
const BPF_ANY: u64 = 0;

/// Errors of the map writer.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// A map is missing from the object or the pin directory.
    #[error("map {name} not found{}; is the agent running (`sip-edge run`) with this pin dir?", .pin_dir.as_ref().map(|d| format!(" under {}", d.display())).unwrap_or_default())]
    Missing {
        /// Map name.
        name: &'static str,
        /// Pin directory searched, if any.
        pin_dir: Option<PathBuf>,
    },
    /// Opening or converting a map failed.
    #[error("map {name}: {source}")]
    Open {
        /// Map name.
        name: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// A map operation failed.
    #[error("{op} on map {name} failed: {source}")]
    Op {
        /// What was attempted.
        op: &'static str,
        /// Map name.
        name: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// A devmap insert failed.
    #[error("adding ifindex {ifindex} to {name} failed: {source}")]
    TxPort {
        /// Map name.
        name: &'static str,
        /// The interface.
        ifindex: u32,
        /// aya's error.
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    /// The pinhole table has no free state slot (limits.max_pinholes reached).
    #[error("pinhole table full: all {capacity} slots in use (raise limits.max_pinholes)")]
    Full {
        /// Table size.
        capacity: u32,
    },
    /// A rule for the same key is already installed.
    #[error("a pinhole for {key} already exists")]
    Exists {
        /// Human form of the key.
        key: String,
    },
    /// The flow cannot be expressed.
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// The flow breaks the running datapath's policy (DESIGN.md §3).
    #[error("refused: {reason}")]
    Policy {
        /// Which rule is broken.
        reason: String,
    },
    /// Mapping a map into memory failed.
    #[error("mmap of map {name} failed: {source}; was it created by an older sip-edge without BPF_F_MMAPABLE? (stop the agent and remove the pins)")]
    Mmap {
        /// Map name.
        name: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// More edge addresses than `EDGE_ADDRS` holds.
    #[error("{count} edge addresses configured; the datapath holds at most {max}")]
    TooManyEdgeAddrs {
        /// Addresses configured.
        count: usize,
        /// Capacity.
        max: u32,
    },
    /// No rule uses the given slot.
    #[error("no pinhole with slot {slot}")]
    NoSuchSlot {
        /// The slot asked for.
        slot: u32,
    },
}

fn op(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { op, name, source }
}

/// One installed rule with its runtime state, for listing.
#[derive(Clone, Debug, Serialize)]
pub struct PinholeEntry {
    /// State slot (the id `pinhole del` takes).
    pub slot: u32,
    /// Slot of the opposite direction.
    pub pair_slot: u32,
    /// "udp" / "tcp".
    pub proto: &'static str,
    /// "internal" / "external": where matching packets arrive.
    pub role: &'static str,
    /// "dst" / "src": which end of the packet `local` is compared with.
    pub match_on: &'static str,
    /// The matched address:port.
    pub local: String,
    /// The remote end that must match (signalled).
    pub remote: String,
    /// Source rewrite, if any.
    pub new_src: Option<String>,
    /// Destination rewrite, if any.
    pub new_dst: Option<String>,
    /// Raw RULE_* flags.
    pub flags: u16,
    /// Latched remote, once latched.
    pub latched: Option<String>,
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// CLOCK_MONOTONIC ns of the last packet; 0 = never.
    pub last_seen_ns: u64,
}

/// Reason counters summed over CPUs.
#[derive(Clone, Debug, Serialize)]
pub struct ReasonCount {
    /// Stable reason name.
    pub reason: &'static str,
    /// Packets.
    pub packets: u64,
}

/// Handles to every map of the datapath.
pub struct DatapathMaps {
    pinholes: HashMap<MapData, PinholeKey, PinholeRule>,
    state: Array<MapData, PinholeState>,
    reasons: PerCpuArray<MapData, u64>,
    ifaces: Array<MapData, IfaceConfig>,
    ifaces_hi: HashMap<MapData, u32, IfaceConfig>,
    port_policy: Array<MapData, PortPolicy>,
    edge_addrs: HashMap<MapData, EdgeAddrKey, u32>,
    edge_list: Array<MapData, EdgeList>,
    dst_ports: DstPorts,
    settings: Array<MapData, Settings>,
    tx_ports: DevMapHash<MapData>,
    neigh_miss: HashMap<MapData, NeighMissKey, NeighMiss>,
}

/// `DST_PORTS` mapped into this process (`BPF_F_MMAPABLE`): counts of
/// `MATCH_DST` rules per (protocol, port), changed with atomic adds so the
/// agent and a concurrent CLI never lose each other's updates.
struct DstPorts {
    /// Keeps the map (and the mapping's backing object) alive.
    _map: MapData,
    /// Start of the mapping: `DST_PORT_SLOTS` u64 counters.
    base: *mut u8,
    /// Bytes mapped.
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics; the
// pointer is owned by this struct and unmapped once, on drop.
unsafe impl Send for DstPorts {}

impl DstPorts {
    fn new(map: Map) -> Result<Self, MapsError> {
        let name = map_names::DST_PORTS;
        let Map::Array(data) = map else {
            return Err(MapsError::Open {
                name,
                source: MapError::InvalidMapType { map_type: 0 },
            });
        };
        let len = DST_PORT_SLOTS as usize * 8;
        let info = data.info().map_err(|source| MapsError::Open { name, source })?;
        if info.max_entries() != DST_PORT_SLOTS || info.value_size() != 8 {
            return Err(MapsError::Mmap {
                name,
                source: std::io::Error::other("unexpected map size"),
            });
        }
        // SAFETY: a fresh shared mapping of the map's data pages; the
        // kernel refuses (EINVAL) maps created without BPF_F_MMAPABLE.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MapsError::Mmap {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(DstPorts {
            _map: data,
            base: p.cast(),
            len,
        })
    }

    fn counter(&self, key: &PinholeKey) -> Option<&AtomicU64> {
        if key.match_on != MATCH_DST {
            return None;
        }
        let idx = dst_port_index(key.proto, u16::from_be(key.port)) as usize;
        // SAFETY: idx < DST_PORT_SLOTS (index is at most 2^17 - 1), each
        // element is an 8-byte aligned u64 of the page-aligned mapping.
        Some(unsafe { &*self.base.add(idx * 8).cast::<AtomicU64>() })
    }

    /// Count a rule on `key` (before it becomes visible).
    fn add(&self, key: &PinholeKey) {
        if let Some(c) = self.counter(key) {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Uncount a rule on `key` (after it was removed).
    fn sub(&self, key: &PinholeKey) {
        if let Some(c) = self.counter(key) {
            // Never below zero: a count that is too high only costs a hash
            // lookup, one too low would hide a rule.
            let _ = c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1));
        }
    }

    /// Recount from the installed rules (agent start: the pins may come
    /// from a build that had no `DST_PORTS`).
    fn rebuild(&self, keys: &[PinholeKey]) {
        let mut counts = vec![0u64; DST_PORT_SLOTS as usize];
        for k in keys.iter().filter(|k| k.match_on == MATCH_DST) {
            counts[dst_port_index(k.proto, u16::from_be(k.port)) as usize] += 1;
        }
        for (i, n) in counts.into_iter().enumerate() {
            // SAFETY: as in `counter`.
            let c = unsafe { &*self.base.add(i * 8).cast::<AtomicU64>() };
            c.store(n, Ordering::SeqCst);
        }
    }
}

impl Drop for DstPorts {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

/// `EDGE_LIST` for `addrs`: the first addresses of each family inline,
/// `overflow` set when any did not fit.
pub fn edge_list(addrs: &[IpAddr]) -> EdgeList {
    let mut l = EdgeList::default();
    for ip in addrs {
        let (family, a) = addr_from_ip(*ip);
        if family == FAMILY_V4 {
            if (l.n4 as usize) < EDGE_LIST_V4 {
                l.v4[l.n4 as usize] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
                l.n4 += 1;
            } else {
                l.overflow = 1;
            }
        } else if (l.n6 as usize) < EDGE_LIST_V6 {
            let mut w = [0u64; 2];
            for (i, chunk) in a.chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                w[i] = u64::from_ne_bytes(b);
            }
            l.v6[l.n6 as usize] = w;
            l.n6 += 1;
        } else {
            l.overflow = 1;
        }
    }
    l
}

/// An attached interface as the datapath knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathIface {
    /// Kernel ifindex.
    pub ifindex: u32,
    /// `ROLE_*`.
    pub role: u8,
}

/// Everything the configuration maps hold.
#[derive(Clone, Debug)]
pub struct DatapathSettings {
    /// Attached interfaces.
    pub ifaces: Vec<DatapathIface>,
    /// Edge-owned addresses.
    pub edge_addrs: Vec<IpAddr>,
    /// Media ports.
    pub media_ports: Vec<(u16, u16)>,
    /// Always-pass ports.
    pub pass_ports: Vec<u16>,
    /// `POLICY_*`.
    pub default_policy: u32,
}

fn conv<T>(name: &'static str, r: Result<T, MapError>) -> Result<T, MapsError> {
    r.map_err(|source| MapsError::Open { name, source })
}

impl DatapathMaps {
    /// Take the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(MapsError::Missing {
                name,
                pin_dir: None,
            })
        };
        let maps = Self::from_maps(&mut take)?;
        // The owner of a (re)loaded datapath recounts DST_PORTS from the
        // rules: re-adopted pins may predate it or an interrupted writer may
        // have left a count behind.
        let keys: Vec<PinholeKey> = maps.pinholes.keys().filter_map(Result::ok).collect();
        maps.dst_ports.rebuild(&keys);
        Ok(maps)
    }

    /// Open the maps pinned under `dir` by a running (or kept) datapath.
    pub fn from_pins(dir: &Path) -> Result<Self, MapsError> {
        let mut take = |name: &'static str| {
            let path = dir.join(name);
            if !path.exists() {
                return Err(MapsError::Missing {
                    name,
                    pin_dir: Some(dir.to_owned()),
                });
            }
            let data =
                MapData::from_pin(&path).map_err(|source| MapsError::Open { name, source })?;
            Map::from_map_data(data).map_err(|source| MapsError::Open { name, source })
        };
        Self::from_maps(&mut take)
    }

    fn from_maps(
        take: &mut dyn FnMut(&'static str) -> Result<Map, MapsError>,
    ) -> Result<Self, MapsError> {
        use map_names::*;
        Ok(DatapathMaps {
            pinholes: conv(PINHOLES, HashMap::try_from(take(PINHOLES)?))?,
            state: conv(PH_STATE, Array::try_from(take(PH_STATE)?))?,
            reasons: conv(REASONS, PerCpuArray::try_from(take(REASONS)?))?,
            ifaces: conv(IFACES, Array::try_from(take(IFACES)?))?,
            ifaces_hi: conv(IFACES_HI, HashMap::try_from(take(IFACES_HI)?))?,
            port_policy: conv(PORT_POLICY, Array::try_from(take(PORT_POLICY)?))?,
            edge_addrs: conv(EDGE_ADDRS, HashMap::try_from(take(EDGE_ADDRS)?))?,
            edge_list: conv(EDGE_LIST, Array::try_from(take(EDGE_LIST)?))?,
            dst_ports: DstPorts::new(take(DST_PORTS)?)?,
            settings: conv(SETTINGS, Array::try_from(take(SETTINGS)?))?,
            tx_ports: conv(TX_PORTS, DevMapHash::try_from(take(TX_PORTS)?))?,
            neigh_miss: conv(NEIGH_MISS, HashMap::try_from(take(NEIGH_MISS)?))?,
        })
    }

    /// Replace the configuration maps' contents with `s` (stale entries of
    /// an earlier configuration are removed).
    pub fn apply_settings(&mut self, s: &DatapathSettings) -> Result<(), MapsError> {
        use map_names::*;
        let wanted = |k: u32| s.ifaces.iter().any(|i| i.ifindex == k);
        // IFACES is an array indexed by ifindex: "stale" is a non-zero role.
        let stale_lo: Vec<u32> = (0..self.ifaces.len())
            .filter(|k| !wanted(*k) && self.ifaces.get(k, 0).is_ok_and(|c| c.role != 0))
            .collect();
        let stale_hi: Vec<u32> = self
            .ifaces_hi
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted(*k))
            .collect();
        for k in stale_lo {
            self.ifaces
                .set(k, IfaceConfig::default(), BPF_ANY)
                .map_err(op("update", IFACES))?;
            // The devmap may lack it; a missing key is fine.
            let _ = self.tx_ports.remove(k);
        }
        for k in stale_hi {
            self.ifaces_hi.remove(&k).map_err(op("delete", IFACES_HI))?;
            let _ = self.tx_ports.remove(k);
        }
        for i in &s.ifaces {
            self.tx_ports
                .insert(i.ifindex, i.ifindex, None, BPF_ANY)
                .map_err(|source| MapsError::TxPort {
                    name: TX_PORTS,
                    ifindex: i.ifindex,
                    source,
                })?;
            let cfg = IfaceConfig {
                role: i.role,
                _pad: [0; 7],
            };
            if i.ifindex < self.ifaces.len() {
                self.ifaces
                    .set(i.ifindex, cfg, BPF_ANY)
                    .map_err(op("update", IFACES))?;
            } else {
                self.ifaces_hi
                    .insert(i.ifindex, cfg, BPF_ANY)
                    .map_err(op("update", IFACES_HI))?;
            }
        }
        let max = self.edge_addrs.map().info().map_or(64, |i| i.max_entries());
        if s.edge_addrs.len() > max as usize {
            return Err(MapsError::TooManyEdgeAddrs {
                count: s.edge_addrs.len(),
                max,
            });
        }
        let wanted: Vec<EdgeAddrKey> = s.edge_addrs.iter().map(|ip| edge_key(*ip)).collect();
        let stale: Vec<EdgeAddrKey> = self
            .edge_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for k in stale {
            self.edge_addrs
                .remove(&k)
                .map_err(op("delete", EDGE_ADDRS))?;
        }
        for k in wanted {
            self.edge_addrs
                .insert(k, 1, BPF_ANY)
                .map_err(op("update", EDGE_ADDRS))?;
        }
        // After EDGE_ADDRS: the list's overflow flag points the datapath there.
        self.edge_list
            .set(0, edge_list(&s.edge_addrs), BPF_ANY)
            .map_err(op("update", EDGE_LIST))?;
        let mut policy = PortPolicy::EMPTY;
        for (a, b) in &s.media_ports {
            for p in *a..=*b {
                PortPolicy::set(&mut policy.media, p);
            }
        }
        for p in &s.pass_ports {
            PortPolicy::set(&mut policy.pass, *p);
        }
        self.port_policy
            .set(0, policy, BPF_ANY)
            .map_err(op("update", PORT_POLICY))?;
        self.settings
            .set(
                0,
                Settings {
                    default_policy: s.default_policy,
                    _pad: 0,
                },
                BPF_ANY,
            )
            .map_err(op("update", SETTINGS))?;
        Ok(())
    }

    /// Capacity of the pinhole table.
    pub fn capacity(&self) -> u32 {
        self.state.len()
    }

    fn used_slots(&self) -> BTreeSet<u32> {
        self.pinholes
            .iter()
            .filter_map(Result::ok)
            .map(|(_, r)| r.slot)
            .collect()
    }

    fn free_slots(&self, n: usize) -> Result<Vec<u32>, MapsError> {
        let used = self.used_slots();
        let capacity = self.capacity();
        let free: Vec<u32> = (0..capacity)
            .filter(|s| !used.contains(s))
            .take(n)
            .collect();
        if free.len() < n {
            return Err(MapsError::Full { capacity });
        }
        Ok(free)
    }

    /// Check a flow against the running datapath's configuration: the
    /// edge-side addresses must be edge addresses and their ports media ports
    /// (DESIGN.md §3: pinholes only within configured ranges).
    pub fn check_policy(&self, flow: &Flow) -> Result<(), MapsError> {
        let policy = self
            .port_policy
            .get(&0, 0)
            .map_err(op("lookup", map_names::PORT_POLICY))?;
        let mut edge_side = vec![flow.public()];
        if let Flow::Relay { edge_int, .. } = flow {
            edge_side.push(*edge_int);
        }
        for a in edge_side {
            if self.edge_addrs.get(&edge_key(a.ip()), 0).is_err() {
                return Err(MapsError::Policy {
                    reason: format!("{} is not an edge address of this datapath", a.ip()),
                });
            }
            if !PortPolicy::bit(&policy.media, a.port()) {
                return Err(MapsError::Policy {
                    reason: format!(
                        "port {} of {a} is not in a configured media range",
                        a.port()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Install both rules of `flow` (after `check_policy`); returns the
    /// slots (inbound, outbound). Nothing is left behind on failure.
    pub fn add_flow(&mut self, flow: &Flow) -> Result<(u32, u32), MapsError> {
        self.check_policy(flow)?;
        let slots = self.free_slots(2)?;
        let (s_in, s_out) = (slots[0], slots[1]);
        let pair = flow.rules(s_in, s_out)?;
        self.insert_rule(pair.inbound.0, pair.inbound.1)?;
        if let Err(e) = self.insert_rule(pair.outbound.0, pair.outbound.1) {
            // Roll back: a half flow must never stay installed.
            if self.pinholes.remove(&pair.inbound.0).is_ok() {
                self.dst_ports.sub(&pair.inbound.0);
            }
            return Err(e);
        }
        Ok((s_in, s_out))
    }

    /// Install one raw rule; its `slot` must be free (see `free_slot`).
    pub fn insert_rule(&mut self, key: PinholeKey, rule: PinholeRule) -> Result<(), MapsError> {
        if rule.slot >= self.capacity() {
            return Err(MapsError::Full {
                capacity: self.capacity(),
            });
        }
        // Fresh counters and latch state before the rule becomes visible.
        self.state
            .set(rule.slot, PinholeState::default(), BPF_ANY)
            .map_err(op("update", map_names::PH_STATE))?;
        // Counted before it becomes visible (the datapath skips the lookup
        // by destination on a zero count).
        self.dst_ports.add(&key);
        let r = self.pinholes.insert(key, rule, BPF_NOEXIST);
        if r.is_err() {
            self.dst_ports.sub(&key);
        }
        match r {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Err(MapsError::Exists {
                    key: describe_key(&key),
                })
            }
            Err(source) => Err(MapsError::Op {
                op: "insert",
                name: map_names::PINHOLES,
                source,
            }),
        }
    }

    /// Remove every rule whose slot is `slot`; with `with_pair`, also the
    /// rule of its pair slot. Returns the slots removed.
    pub fn delete_slot(&mut self, slot: u32, with_pair: bool) -> Result<Vec<u32>, MapsError> {
        let entries: Vec<(PinholeKey, PinholeRule)> =
            self.pinholes.iter().filter_map(Result::ok).collect();
        let Some((_, rule)) = entries.iter().find(|(_, r)| r.slot == slot) else {
            return Err(MapsError::NoSuchSlot { slot });
        };
        let mut slots = vec![slot];
        if with_pair
            && rule.pair_slot != slot
            && entries.iter().any(|(_, r)| r.slot == rule.pair_slot)
        {
            slots.push(rule.pair_slot);
        }
        for (k, r) in entries.iter().filter(|(_, r)| slots.contains(&r.slot)) {
            self.pinholes
                .remove(k)
                .map_err(op("delete", map_names::PINHOLES))?;
            self.dst_ports.sub(k);
            self.state
                .set(r.slot, PinholeState::default(), BPF_ANY)
                .map_err(op("update", map_names::PH_STATE))?;
        }
        Ok(slots)
    }

    /// Every installed rule with its counters, sorted by slot.
    pub fn list(&self) -> Result<Vec<PinholeEntry>, MapsError> {
        let mut out = Vec::new();
        for item in self.pinholes.iter() {
            let (k, r) = item.map_err(op("iterate", map_names::PINHOLES))?;
            let st = self.state.get(&r.slot, 0).unwrap_or_default();
            out.push(entry(&k, &r, &st));
        }
        out.sort_by_key(|e| e.slot);
        Ok(out)
    }

    /// Per-reason packet counts summed over CPUs, in `Reason` order.
    pub fn reasons(&self) -> Result<Vec<ReasonCount>, MapsError> {
        Reason::ALL
            .iter()
            .map(|r| {
                let per_cpu = self
                    .reasons
                    .get(&(*r as u32), 0)
                    .map_err(op("lookup", map_names::REASONS))?;
                Ok(ReasonCount {
                    reason: r.name(),
                    packets: per_cpu.iter().sum(),
                })
            })
            .collect()
    }

    /// Next hops the datapath could not resolve, oldest first; each is
    /// removed from the map as it is returned (the caller resolves it).
    pub fn take_neigh_misses(&mut self) -> Result<Vec<(u32, IpAddr)>, MapsError> {
        let keys: Vec<NeighMissKey> = self.neigh_miss.keys().filter_map(Result::ok).collect();
        let mut out = Vec::new();
        for k in keys {
            let _ = self.neigh_miss.remove(&k);
            if let Some(ip) = ip_from_addr(k.family, &k.addr) {
                out.push((k.ifindex, ip));
            }
        }
        Ok(out)
    }
}

fn edge_key(ip: IpAddr) -> EdgeAddrKey {
    let (family, addr) = addr_from_ip(ip);
    EdgeAddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

fn sock(family: u8, addr: &[u8; 16], port_be: u16) -> String {
    match ip_from_addr(family, addr) {
        Some(ip) => SocketAddr::new(ip, u16::from_be(port_be)).to_string(),
        None => format!("<family {family}>"),
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_UDP => "udp",
        PROTO_TCP => "tcp",
        _ => "?",
    }
}

fn role_name(r: u8) -> &'static str {
    match r {
        ROLE_INTERNAL => "internal",
        ROLE_EXTERNAL => "external",
        _ => "?",
    }
}

/// `udp external dst 203.0.113.1:40000`.
pub fn describe_key(k: &PinholeKey) -> String {
    format!(
        "{} {} {} {}",
        proto_name(k.proto),
        role_name(k.role),
        if k.match_on == MATCH_DST {
            "dst"
        } else {
            "src"
        },
        sock(k.family, &k.addr, k.port)
    )
}

fn entry(k: &PinholeKey, r: &PinholeRule, st: &PinholeState) -> PinholeEntry {
    use sip_edge_common::{RULE_REWRITE_DST, RULE_REWRITE_SRC};
    let keep_port = |new: u16, what: &str| {
        if new == 0 {
            format!("{what}:*")
        } else {
            String::new()
        }
    };
    let rewrite = |flag: u16, a: &[u8; 16], p: u16| {
        (r.flags & flag != 0).then(|| {
            if p == 0 {
                keep_port(
                    p,
                    &ip_from_addr(k.family, a)
                        .map(|i| i.to_string())
                        .unwrap_or_default(),
                )
            } else {
                sock(k.family, a, p)
            }
        })
    };
    PinholeEntry {
        slot: r.slot,
        pair_slot: r.pair_slot,
        proto: proto_name(k.proto),
        role: role_name(k.role),
        match_on: if k.match_on == MATCH_DST {
            "dst"
        } else {
            "src"
        },
        local: sock(k.family, &k.addr, k.port),
        remote: sock(k.family, &r.remote_addr, r.remote_port),
        new_src: rewrite(RULE_REWRITE_SRC, &r.new_src, r.new_src_port),
        new_dst: rewrite(RULE_REWRITE_DST, &r.new_dst, r.new_dst_port),
        flags: r.flags,
        latched: (st.latch_state == LATCH_DONE)
            .then(|| sock(k.family, &st.latched_addr, st.latched_port)),
        packets: st.packets,
        bytes: st.bytes,
        last_seen_ns: st.last_seen_ns,
    }
}
