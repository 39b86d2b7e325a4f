//! Datapath configuration maps, written by the agent from its TOML config
//! before (and while) the program runs.

use crate::Addr;

/// Entries of the `IFACES` array, indexed by ifindex: an array lookup is
/// inlined by the verifier (no helper call, no hashing), which a per-packet
/// lookup wants. Interfaces with a larger ifindex (hosts with much
/// interface churn) go in the `IFACES_HI` hash instead, at the cost of one
/// hash lookup per packet on them.
pub const IFACE_SLOTS: u32 = 4096;

/// Value of `IFACES` / `IFACES_HI`: what an attached interface is; an
/// all-zero entry (role 0) is "not attached here". 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IfaceConfig {
    /// `ROLE_INTERNAL` or `ROLE_EXTERNAL`.
    pub role: u8,
    /// Explicit padding.
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<IfaceConfig>() == 8);

/// Key of `EDGE_ADDRS`: an address the edge owns. 20 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EdgeAddrKey {
    /// Network order; IPv4 in the first 4 bytes.
    pub addr: Addr,
    /// `FAMILY_V4` / `FAMILY_V6`.
    pub family: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<EdgeAddrKey>() == 20);

/// IPv4 addresses `EdgeList` holds inline.
pub const EDGE_LIST_V4: usize = 32;
/// IPv6 addresses `EdgeList` holds inline.
pub const EDGE_LIST_V6: usize = 32;

/// Value of `EDGE_LIST` (single entry): the edge-owned addresses of
/// `EDGE_ADDRS` as short inline lists, so classifying a packet's
/// destination is a scan of a few words instead of a jhash of a 20-byte
/// key, and the layout of the port-indexed pinhole table `PH_DST`. With
/// more addresses than fit inline the agent sets `overflow` and the
/// datapath falls back to the `EDGE_ADDRS` hash for addresses not found
/// inline (they are never indexed). 672 bytes.
///
/// Edge address index: IPv4 entry `i` is `i`, IPv6 entry `j` is `n4 + j`.
/// A `MATCH_DST` rule on edge address index `a < indexed` and host-order
/// port `p` with `port_base <= p < port_base + port_span` lives in
/// `PH_DST[a * port_span + (p - port_base)]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeList {
    /// IPv4 entries in use (the first `n4` of `v4`).
    pub n4: u32,
    /// IPv6 entries in use.
    pub n6: u32,
    /// Non-zero: `EDGE_ADDRS` holds addresses beyond these lists.
    pub overflow: u32,
    /// Edge address indexes below this one have their ports in `PH_DST`.
    pub indexed: u32,
    /// First port (host order) of the `PH_DST` port window.
    pub port_base: u32,
    /// Ports per edge address in `PH_DST`; 0 = no rule is indexed.
    pub port_span: u32,
    /// Explicit padding.
    pub _pad: [u32; 2],
    /// IPv4 addresses, network order (the 4 bytes as a native u32).
    pub v4: [u32; EDGE_LIST_V4],
    /// IPv6 addresses, network order (the 16 bytes as two native u64).
    pub v6: [[u64; 2]; EDGE_LIST_V6],
}
const _: () = assert!(core::mem::size_of::<EdgeList>() == 672);

impl Default for EdgeList {
    fn default() -> Self {
        EdgeList {
            n4: 0,
            n6: 0,
            overflow: 0,
            indexed: 0,
            port_base: 0,
            port_span: 0,
            _pad: [0; 2],
            v4: [0; EDGE_LIST_V4],
            v6: [[0; 2]; EDGE_LIST_V6],
        }
    }
}

/// Entries of `DST_PORTS`: one per (protocol, destination port).
pub const DST_PORT_SLOTS: u32 = 2 * 65536;

/// Index into `DST_PORTS` of a `MATCH_DST` key's protocol and port (host
/// order): UDP ports first, every other protocol (TCP) after.
#[inline(always)]
pub fn dst_port_index(proto: u8, port: u16) -> u32 {
    let hi = if proto == crate::PROTO_UDP { 0 } else { 65536 };
    hi | port as u32
}

/// Words in one 65536-bit port bitmap.
pub const PORT_BITMAP_WORDS: usize = 1024;

/// Value of `PORT_POLICY` (single entry): which destination ports on an
/// edge address are media (drop unless a pinhole matches) and which always
/// pass (the agent's signalling and admin ports). Bit `p` is
/// `words[p >> 6] >> (p & 63) & 1`, `p` in host order. 16 KiB.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortPolicy {
    /// Media ports (per protocol family-independent; UDP and TCP alike).
    pub media: [u64; PORT_BITMAP_WORDS],
    /// Always-pass ports; checked before `media`.
    pub pass: [u64; PORT_BITMAP_WORDS],
}
const _: () = assert!(core::mem::size_of::<PortPolicy>() == 16384);

impl PortPolicy {
    /// A policy with no ports set.
    pub const EMPTY: PortPolicy = PortPolicy {
        media: [0; PORT_BITMAP_WORDS],
        pass: [0; PORT_BITMAP_WORDS],
    };

    /// Whether bit `port` is set in `words`.
    #[inline(always)]
    pub fn bit(words: &[u64; PORT_BITMAP_WORDS], port: u16) -> bool {
        let p = port as usize;
        (words[(p >> 6) & (PORT_BITMAP_WORDS - 1)] >> (p & 63)) & 1 == 1
    }

    /// Set bit `port` in `words`.
    pub fn set(words: &mut [u64; PORT_BITMAP_WORDS], port: u16) {
        let p = port as usize;
        words[p >> 6] |= 1 << (p & 63);
    }
}

/// `Settings::default_policy`: traffic not aimed at a media port passes.
pub const POLICY_PASS: u32 = 0;
/// `Settings::default_policy`: traffic not aimed at a media port is dropped
/// unless it is aimed at an always-pass port.
pub const POLICY_DROP: u32 = 1;

/// Value of `SETTINGS` (single entry). 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// `POLICY_PASS` or `POLICY_DROP`, for traffic that is neither a
    /// pinhole hit nor aimed at a media port of an edge address.
    pub default_policy: u32,
    /// The pinned map layout this datapath's maps were created with
    /// (`MAP_LAYOUT_VERSION` of the sip-edge that created them; 0 in pins
    /// that predate the field). Written by userspace at load, read by
    /// loaders and the CLI before they trust any pinned map; the XDP
    /// program ignores it.
    pub layout_version: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 8);

/// Version of the pinned map layout: names, key and value types, sizes and
/// meaning of every map in `map_names::ALL`. Bump it with any change a
/// loader re-adopting older pins could misread; `Settings::layout_version`
/// carries it in the pins. 3: `PH_STATE` and `PORT_POLICY` are created
/// mmapable, and `PH_STATE` slots carry the agent's `slot_mark`.
pub const MAP_LAYOUT_VERSION: u32 = 3;

/// Key of `NEIGH_MISS`: a next hop `bpf_fib_lookup` could not resolve. 24 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NeighMissKey {
    /// Next-hop address, network order.
    pub addr: Addr,
    /// Egress ifindex from the FIB.
    pub ifindex: u32,
    /// `FAMILY_V4` / `FAMILY_V6`.
    pub family: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<NeighMissKey>() == 24);

/// Value of `NEIGH_MISS`. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NeighMiss {
    /// Packets dropped for this next hop.
    pub packets: u64,
    /// `bpf_ktime_get_ns()` of the last miss.
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<NeighMiss>() == 16);
