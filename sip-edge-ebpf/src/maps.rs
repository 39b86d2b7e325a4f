//! Every BPF map of the datapath, declared in one place (katran's
//! `balancer_maps.h` shape); README "Inspecting with bpftool" has the table
//! of each map's key, value, writer and readers. Names are exactly `sip_edge_common::map_names`.
//! The agent's loader pins every map by name under its pin directory (and
//! re-adopts existing pins); the object itself asks for no pinning, so a
//! test or benchmark load without a pin directory never touches bpffs. The
//! agent writes the configuration maps, `PINHOLES`, `DST_PORTS` and the
//! rules of `PH_DST`; this program writes only `PH_STATE`, the state part
//! of `PH_DST` entries (and the latch in `PH_DST_COLD`), `EGRESS_MAC`, `REASONS` and `NEIGH_MISS`.
//!
//! The maps are BTF-defined (`.maps` section, libbpf layout, see
//! `mapdef.rs`) so `bpftool map dump` prints every field.

use aya_ebpf::bindings::bpf_devmap_val;
use sip_edge_common::{
    DstCold, DstEntry, EdgeAddrKey, EdgeList, IfaceConfig, NeighMiss, NeighMissKey, PinholeKey,
    PinholeRule, PinholeState, PortPolicy, Settings, DST_PORT_SLOTS, IFACE_SLOTS, REASON_COUNT,
};

use crate::mapdef::{MapDef, ARRAY, DEVMAP_HASH, HASH, LRU_HASH, MMAPABLE, PERCPU_ARRAY};

/// Default number of pinholes (and of `PH_STATE` slots); the agent's loader
/// overrides both from its configuration before the maps are created.
pub const DEFAULT_MAX_PINHOLES: usize = 65536;

/// The pinhole table, written only by the agent's map writer. A plain HASH,
/// never LRU: a full table must refuse new calls, not evict live ones.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static PINHOLES: MapDef<HASH, PinholeKey, PinholeRule, DEFAULT_MAX_PINHOLES> = MapDef::new();

/// Default number of `PH_DST` entries; the loader sizes it from the edge
/// addresses and media ranges.
pub const DEFAULT_DST_SLOTS: usize = 65536;

/// The hot line of `MATCH_DST` rules on edge addresses and media ports,
/// indexed by edge address and port (`EdgeList`): one array lookup and one
/// 64-byte entry per packet (IPv4 rule copy, counters, FIB cache; see
/// `DstEntry`) instead of a hash lookup plus a `PH_STATE` slot. Mmapable:
/// the agent publishes and replaces rules in place.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static PH_DST: MapDef<ARRAY, u32, DstEntry, DEFAULT_DST_SLOTS, MMAPABLE> = MapDef::new();

/// The cold part of each `PH_DST` entry, same index (`DstCold`): both full
/// rule copies, latch, IPv6 FIB destination, overflow count.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static PH_DST_COLD: MapDef<ARRAY, u32, DstCold, DEFAULT_DST_SLOTS, MMAPABLE> = MapDef::new();

/// This CPU's copy of the rule of the packet being forwarded (one entry;
/// see `pinhole::scratch`). Datapath private.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static HIT_RULE: MapDef<PERCPU_ARRAY, u32, PinholeRule, 1> = MapDef::new();

/// Source MAC of each egress interface as the FIB last returned it (low 48
/// bits, memory order; 0 = unknown), indexed by ifindex: the per-rule FIB
/// cache keeps only the next hop's MAC and the egress ifindex, which is
/// what lets it fit in the entry's cache line. Written by this program on
/// every full lookup whose result differs; a few L1-hot lines.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static EGRESS_MAC: MapDef<ARRAY, u32, u64, { IFACE_SLOTS as usize }> = MapDef::new();

/// Counters and latch state of each rule, indexed by `PinholeRule::slot`.
/// Kept apart from the rule so the agent can replace a rule atomically
/// without losing counters; written here with atomic instructions.
/// Mmapable: the agent reads every flow's counters each second without a
/// syscall per rule.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static PH_STATE: MapDef<ARRAY, u32, PinholeState, DEFAULT_MAX_PINHOLES, MMAPABLE> =
    MapDef::new();

/// Packets per final verdict, indexed by `Reason` (per CPU, no atomics).
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static REASONS: MapDef<PERCPU_ARRAY, u32, u64, { REASON_COUNT as usize }> = MapDef::new();

/// Role of each interface the program is attached to, indexed by ifindex
/// (an ARRAY: the verifier inlines its lookup; a HASH costs a helper call
/// and a jhash on every packet, hit or drop). Role 0 (or an ifindex in neither map) means the program
/// runs somewhere it was not configured for, and every packet is passed
/// untouched.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static IFACES: MapDef<ARRAY, u32, IfaceConfig, { IFACE_SLOTS as usize }> = MapDef::new();

/// The same for interfaces whose ifindex is ≥ `IFACE_SLOTS` (the fallback).
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static IFACES_HI: MapDef<HASH, u32, IfaceConfig, 64> = MapDef::new();

/// Media and always-pass port bitmaps (entry 0). Missing or zeroed: no port
/// is media and none is always-pass.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static PORT_POLICY: MapDef<ARRAY, u32, PortPolicy, 1, MMAPABLE> = MapDef::new();

/// Addresses the edge owns; only traffic to these is judged by `PORT_POLICY`.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static EDGE_ADDRS: MapDef<HASH, EdgeAddrKey, u32, 64> = MapDef::new();

/// The addresses of `EDGE_ADDRS` as inline lists (entry 0), scanned
/// instead of hashing; `overflow` sends a miss on to `EDGE_ADDRS`.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static EDGE_LIST: MapDef<ARRAY, u32, EdgeList, 1> = MapDef::new();

/// Number of `MATCH_DST` rules per (protocol, destination port), indexed by
/// `dst_port_index`; 0 = no rule can match a packet's destination, so the
/// `PINHOLES` lookup by destination is skipped (junk to unused media ports
/// drops without hashing). Maintained by the agent's map writer with atomic
/// adds through mmap (counted up before a rule is inserted, down after it
/// is removed, so a visible rule is always counted).
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static DST_PORTS: MapDef<ARRAY, u32, u64, { DST_PORT_SLOTS as usize }, MMAPABLE> =
    MapDef::new();

/// Global settings (entry 0). Missing: all zero, i.e. `POLICY_PASS`.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static SETTINGS: MapDef<ARRAY, u32, Settings, 1> = MapDef::new();

/// Interfaces a forwarded packet may leave through, keyed by ifindex; the
/// FIB's egress ifindex is looked up here by `bpf_redirect_map`.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static TX_PORTS: MapDef<DEVMAP_HASH, u32, bpf_devmap_val, 64> = MapDef::new();

/// Next hops the FIB had no neighbour entry for. LRU: it is a hint list for
/// the agent (which asks the kernel to resolve them), never authoritative.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static NEIGH_MISS: MapDef<LRU_HASH, NeighMissKey, NeighMiss, 1024> = MapDef::new();
