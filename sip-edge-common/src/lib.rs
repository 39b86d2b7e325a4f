//! Types shared by the XDP datapath (`sip-edge-ebpf`) and the agent
//! (`sip-edge`): map keys and values, reason codes, and map names.
//!
//! Everything here is `#[repr(C)]` with explicit padding and a compile-time
//! size check, because the same bytes are written by userspace through the
//! bpf(2) syscall and read by the verifier-checked program. Addresses and
//! ports are kept in **network byte order** so the datapath compares them with
//! packet bytes without converting; the `user` feature adds the conversions.
#![no_std]

pub mod bench;
pub mod config;
pub mod pinhole;
pub mod reason;

pub use bench::*;
pub use config::*;
pub use pinhole::*;
pub use reason::*;

/// Names of every map the program declares; the agent pins each under its
/// pin directory with the same name. BPF object names are limited to 15
/// bytes (BPF_OBJ_NAME_LEN - 1), which the tests check.
pub mod map_names {
    /// `HASH<PinholeKey, PinholeRule>`: the pinhole table (plain hash, never LRU).
    pub const PINHOLES: &str = "PINHOLES";
    /// `ARRAY<PinholeState>`: per-pinhole counters and latch state, indexed by `PinholeRule::slot`.
    pub const PH_STATE: &str = "PH_STATE";
    /// `PERCPU_ARRAY<u64>` indexed by `Reason`: packets per verdict reason.
    pub const REASONS: &str = "REASONS";
    /// `ARRAY<IfaceConfig>` indexed by ifindex (< `IFACE_SLOTS`): role of
    /// each interface the program is attached to; role 0 = none.
    pub const IFACES: &str = "IFACES";
    /// `HASH<u32 ifindex, IfaceConfig>`: the same for ifindexes ≥ `IFACE_SLOTS`.
    pub const IFACES_HI: &str = "IFACES_HI";
    /// `ARRAY<PortPolicy>` (one entry): media-range and always-pass port bitmaps.
    pub const PORT_POLICY: &str = "PORT_POLICY";
    /// `HASH<EdgeAddrKey, u32>`: addresses owned by the edge (internal and public).
    pub const EDGE_ADDRS: &str = "EDGE_ADDRS";
    /// `ARRAY<DstEntry>` (mmapable): the hot line of `MATCH_DST` rules
    /// (IPv4 rule copy, counters, FIB cache), indexed by edge address and
    /// port (`EdgeList`).
    pub const PH_DST: &str = "PH_DST";
    /// `ARRAY<DstCold>` (mmapable): the rest of each `PH_DST` entry (full
    /// rule copies, latch, overflow count), same index.
    pub const PH_DST_COLD: &str = "PH_DST_COLD";
    /// `ARRAY<u64>` indexed by ifindex (< `IFACE_SLOTS`): the source MAC
    /// of each egress interface as the FIB last returned it (datapath
    /// private; the FIB cache of a rule keeps only the next hop's MAC).
    pub const EGRESS_MAC: &str = "EGRESS_MAC";
    /// `PERCPU_ARRAY<PinholeRule>` (one entry): the datapath's per-CPU
    /// copy of the rule of the packet it is forwarding (private).
    pub const HIT_RULE: &str = "HIT_RULE";
    /// `ARRAY<EdgeList>` (one entry): the edge addresses as inline lists.
    pub const EDGE_LIST: &str = "EDGE_LIST";
    /// `ARRAY<u32>` (mmapable) indexed by `dst_port_index`: how many
    /// `MATCH_DST` rules use each protocol and port; 0 = the datapath skips
    /// the pinhole lookup by destination.
    pub const DST_PORTS: &str = "DST_PORTS";
    /// `ARRAY<Settings>` (one entry): global datapath settings.
    pub const SETTINGS: &str = "SETTINGS";
    /// `DEVMAP_HASH<u32 ifindex>`: the interfaces redirects may leave through.
    pub const TX_PORTS: &str = "TX_PORTS";
    /// `LRU_HASH<NeighMissKey, NeighMiss>`: next hops the kernel had no
    /// neighbour entry for; the agent asks the kernel to resolve them.
    pub const NEIGH_MISS: &str = "NEIGH_MISS";

    /// `ARRAY<BenchCfg>` (one entry): benchmark generator/redirect settings.
    /// Bench programs only; never pinned by the agent.
    pub const BENCH_CFG: &str = "BENCH_CFG";
    /// `PERCPU_ARRAY<u64>`: generator sequence and sink count (`BENCH_CNT_*`).
    pub const BENCH_CNT: &str = "BENCH_CNT";
    /// `ARRAY<u16>`: flow → destination port when `BenchCfg::port_table` is set.
    pub const BENCH_PORTS: &str = "BENCH_PORTS";
    /// Maps only the benchmark programs use (not in `ALL`: nothing pins them).
    pub const BENCH: [&str; 3] = [BENCH_CFG, BENCH_CNT, BENCH_PORTS];

    /// Every map name, for pinning and cleanup loops.
    pub const ALL: [&str; 16] = [
        PINHOLES,
        PH_STATE,
        REASONS,
        IFACES,
        PORT_POLICY,
        EDGE_ADDRS,
        SETTINGS,
        TX_PORTS,
        NEIGH_MISS,
        IFACES_HI,
        EDGE_LIST,
        DST_PORTS,
        PH_DST,
        PH_DST_COLD,
        EGRESS_MAC,
        HIT_RULE,
    ];
}

/// Name of the XDP program function in the object.
pub const XDP_PROG_NAME: &str = "sip_edge_xdp";

/// Address families as stored in keys (not the kernel's AF_* numbers, which
/// differ between platforms' headers; these are ours and fixed).
pub const FAMILY_V4: u8 = 4;
/// IPv6 family code.
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers used in keys (IANA).
pub const PROTO_TCP: u8 = 6;
/// UDP protocol number.
pub const PROTO_UDP: u8 = 17;

/// Bytes of a network-order IPv6 address; IPv4 uses the first four, the
/// rest are zero (never v4-mapped, so a v4 and a v6 key never collide).
pub type Addr = [u8; 16];

#[cfg(feature = "user")]
mod user;
#[cfg(feature = "user")]
pub use user::*;
