//! Verdicts for packets that do not use a pinhole: the edge-address port
//! policy (`EDGE_LIST`/`EDGE_ADDRS` + `PORT_POLICY`) and the default policy (`SETTINGS`).
//! Always-pass ports are checked before media ports, so a port in both sets
//! is signalling.

use sip_edge_common::{
    EdgeAddrKey, PortPolicy, Reason, EDGE_LIST_V4, EDGE_LIST_V6, FAMILY_V4, POLICY_DROP,
};

use aya_ebpf::programs::XdpContext;

use crate::{
    maps::{EDGE_ADDRS, EDGE_LIST, PORT_POLICY, SETTINGS},
    parse::Packet,
    socket,
};

/// What the destination port of a packet aimed at the edge is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PortClass {
    /// Always-pass port (signalling/admin) on an edge address.
    Pass,
    /// Media port on an edge address.
    Media,
    /// Anything else (not an edge address, or neither set, or no ports).
    Other,
}

const _: () = assert!(core::mem::size_of::<EdgeAddrKey>() == 20);
const _: () = assert!(core::mem::offset_of!(EdgeAddrKey, family) == 16);

/// `Dst::slot` when the destination has no `PH_DST` entry.
pub const NO_SLOT: u32 = u32::MAX;

/// What the packet's destination is to the edge, computed once per packet.
#[derive(Clone, Copy)]
pub struct Dst {
    /// An edge address.
    pub edge: bool,
    /// The `PH_DST` index of its address and port, or `NO_SLOT`.
    pub slot: u32,
}

/// Classify the destination address: a scan of the inline `EDGE_LIST`
/// (which also gives the address's `PH_DST` rows), then (only when the
/// agent flagged more addresses than fit inline) the `EDGE_ADDRS` hash.
#[inline(always)]
pub fn dst(pkt: &Packet) -> Dst {
    let mut d = Dst {
        edge: false,
        slot: NO_SLOT,
    };
    let Some(l) = EDGE_LIST.get_ptr(&0) else {
        d.edge = edge_hash(pkt);
        return d;
    };
    // SAFETY: a live array map value (plain data written whole by the agent).
    let l = unsafe { &*l };
    let mut idx = u32::MAX;
    if pkt.family == FAMILY_V4 {
        let a = pkt.dst[0] as u32 | (pkt.dst[1] as u32) << 16;
        let mut i = 0;
        while i < EDGE_LIST_V4 {
            if i >= count(&raw const l.n4) {
                break;
            }
            if l.v4[i] == a {
                idx = i as u32;
                break;
            }
            i += 1;
        }
    } else {
        // SAFETY: same size, both plain integers.
        let a: [u64; 2] = unsafe { core::mem::transmute(pkt.dst) };
        let mut i = 0;
        while i < EDGE_LIST_V6 {
            if i >= count(&raw const l.n6) {
                break;
            }
            if l.v6[i][0] == a[0] && l.v6[i][1] == a[1] {
                idx = l.n4 + i as u32;
                break;
            }
            i += 1;
        }
    }
    if idx == u32::MAX {
        d.edge = l.overflow != 0 && edge_hash(pkt);
        return d;
    }
    d.edge = true;
    let off = (u16::from_be(pkt.dport) as u32).wrapping_sub(l.port_base);
    if pkt.has_ports && idx < l.indexed && off < l.port_span {
        d.slot = idx * l.port_span + off;
    }
    d
}

/// An `EdgeList` entry count, read afresh on every iteration of a scan.
///
/// With a count read once, LLVM merges the two loop exits `i >= n` and
/// `i == EDGE_LIST_*` into one `i == min(n, EDGE_LIST_*)` register compare.
/// The 6.1 verifier learns nothing from a failed equality test between a
/// range and a constant inside it, so it walks the scan past the end of the
/// 672-byte map value and rejects the program ("invalid access to map
/// value"; newer verifiers, 6.12 here, narrow the range and accept it). A
/// volatile load inside the loop can be neither hoisted nor merged: every
/// iteration keeps the exit on the constant bound (`i` is a known constant
/// to the verifier) and an ordered `i >= n` compare, so the index never
/// passes `EDGE_LIST_* - 1` on any kernel. Cost: one L1-hot load per
/// scanned entry. The agent writes the value whole; a scan already read the
/// entries one by one, so a concurrent update is no less safe than before.
#[inline(always)]
fn count(n: *const u32) -> usize {
    // SAFETY: `n` points into a live array map value.
    unsafe { core::ptr::read_volatile(n) as usize }
}

/// `EDGE_ADDRS` lookup of the packet's destination.
#[inline(always)]
fn edge_hash(pkt: &Packet) -> bool {
    // The key as 16-bit words: `family` and its padding form the last two
    // (little-endian: family is the low byte), avoiding byte stores and a
    // memset call for the 3-byte padding; layout asserted below.
    let words: [u16; 10] = [
        pkt.dst[0],
        pkt.dst[1],
        pkt.dst[2],
        pkt.dst[3],
        pkt.dst[4],
        pkt.dst[5],
        pkt.dst[6],
        pkt.dst[7],
        pkt.family as u16,
        0,
    ];
    // SAFETY: same size; EdgeAddrKey has alignment 1.
    let key = unsafe { &*(&raw const words).cast::<EdgeAddrKey>() };
    EDGE_ADDRS.get_ptr(key).is_some()
}

/// Classify the packet's destination: edge address + port bitmaps.
#[inline(always)]
pub fn classify(pkt: &Packet, d: &Dst) -> PortClass {
    if !pkt.has_ports || !d.edge {
        return PortClass::Other;
    }
    // A missing entry behaves as an all-zero policy.
    let Some(pp) = PORT_POLICY.get_ptr(&0) else {
        return PortClass::Other;
    };
    let port = u16::from_be(pkt.dport);
    // SAFETY: `pp` is a live array map value; `bit` masks its index.
    let pp = unsafe { &*pp };
    if PortPolicy::bit(&pp.pass, port) {
        PortClass::Pass
    } else if PortPolicy::bit(&pp.media, port) {
        PortClass::Media
    } else {
        PortClass::Other
    }
}

/// `SETTINGS.default_policy` for traffic that is neither a pinhole hit nor
/// aimed at a media or always-pass port of an edge address.
#[inline(always)]
pub fn default_policy() -> Reason {
    match SETTINGS.get_ptr(&0) {
        // SAFETY: a live array map value.
        Some(s) if unsafe { (*s).default_policy } == POLICY_DROP => Reason::DropOther,
        _ => Reason::PassOther,
    }
}

/// Verdict of a packet that does not use a pinhole; `media` is the reason
/// when it is aimed at a media port of an edge address:
///
/// * `DropNoPinhole` (a fast-path candidate that missed, verdict step 6) and
///   `DropFragment` (a first fragment: a pinhole flow is never fragmented,
///   and forwarding only the first fragment would be useless): an
///   always-pass port is `PassSignalling`, anything else the default policy;
/// * `DropIpv6Ext` (IPv6 with extension headers, never fast-pathed):
///   anything not aimed at a media port is `PassIpv6Ext`;
/// * under the drop policy, what a local socket the host opened owns is
///   `PassLocalSocket` (see `socket.rs`);
/// * so is a TCP segment with ACK that missed the pinholes on a media port
///   (a connection opened before a reload added that range).
#[inline(always)]
pub fn unmatched(ctx: &XdpContext, pkt: &Packet, d: &Dst, media: Reason) -> Reason {
    let ext = media as u32 == Reason::DropIpv6Ext as u32;
    let r = match classify(pkt, d) {
        PortClass::Media => media,
        _ if ext => Reason::PassIpv6Ext,
        PortClass::Pass => Reason::PassSignalling,
        PortClass::Other => default_policy(),
    };
    // Drop-by-default drops unsolicited traffic, never the replies to the
    // host's own connections (DESIGN.md §3). One lookup site for both
    // cases keeps the helper calls inlined once.
    let ask = match r {
        Reason::DropOther => true,
        Reason::DropNoPinhole => socket::tcp_ack(ctx, pkt),
        _ => false,
    };
    if ask && socket::owned_by_local_socket(ctx, pkt) {
        Reason::PassLocalSocket
    } else {
        r
    }
}
