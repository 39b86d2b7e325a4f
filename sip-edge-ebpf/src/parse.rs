//! Packet parsing: bounds-checked header access (`ptr_at`) and the walk over
//! Ethernet (+ at most one 802.1Q/802.1ad tag), IPv4 (with options) or IPv6
//! (with up to four extension headers) and the UDP/TCP ports, producing the
//! `Packet` summary that `pinhole`, `policy`, `nat` and `fib` read.
//!
//! Header structs use only `u8`/`u16` fields (alignment 2): the IP header
//! sits at offset 14 or 18 of the frame, so 4-byte loads could be misaligned,
//! and every header we read starts at an even offset. Multi-byte fields stay
//! in network byte order, like the shared map keys.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use sip_edge_common::{Reason, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

/// EtherType IPv4, network order.
const ETH_P_IP: u16 = 0x0800_u16.to_be();
/// EtherType IPv6, network order.
const ETH_P_IPV6: u16 = 0x86dd_u16.to_be();
/// EtherType 802.1Q (C-tag), network order.
const ETH_P_8021Q: u16 = 0x8100_u16.to_be();
/// EtherType 802.1ad (S-tag), network order.
const ETH_P_8021AD: u16 = 0x88a8_u16.to_be();

/// IPv4 "more fragments" flag, host order.
const IP_MF: u16 = 0x2000;
/// IPv4 fragment offset mask, host order.
const IP_OFFSET: u16 = 0x1fff;

/// IPv6 extension headers we step over (RFC 8200 §4): hop-by-hop options.
const NEXTHDR_HOP: u8 = 0;
/// Routing header.
const NEXTHDR_ROUTING: u8 = 43;
/// Fragment header.
const NEXTHDR_FRAGMENT: u8 = 44;
/// Destination options.
const NEXTHDR_DEST: u8 = 60;
/// How many IPv6 extension headers are walked before giving up on ports.
const MAX_IPV6_EXT: usize = 4;

/// Ethernet header.
#[repr(C)]
pub struct EthHdr {
    /// Destination MAC.
    pub dst: [u16; 3],
    /// Source MAC.
    pub src: [u16; 3],
    /// EtherType, network order.
    pub ethertype: u16,
}

/// 802.1Q / 802.1ad tag following the outer EtherType.
#[repr(C)]
struct VlanHdr {
    /// Tag control information.
    _tci: u16,
    /// Encapsulated EtherType, network order.
    ethertype: u16,
}

/// IPv4 header without options (RFC 791 §3.1).
#[repr(C)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and IHL in 32-bit words (low nibble).
    pub ver_ihl: u8,
    /// DSCP/ECN.
    pub tos: u8,
    /// Total length, network order.
    pub tot_len: u16,
    /// Identification.
    pub id: u16,
    /// Flags and fragment offset, network order.
    pub frag_off: u16,
    /// Time to live.
    pub ttl: u8,
    /// Transport protocol.
    pub proto: u8,
    /// Header checksum.
    pub check: u16,
    /// Source address.
    pub src: [u16; 2],
    /// Destination address.
    pub dst: [u16; 2],
}

/// IPv6 fixed header (RFC 8200 §3).
#[repr(C)]
pub struct Ipv6Hdr {
    /// Version, traffic class, flow label.
    pub vtc_flow: [u16; 2],
    /// Payload length, network order.
    pub payload_len: u16,
    /// Next header.
    pub next_hdr: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source address.
    pub src: [u16; 8],
    /// Destination address.
    pub dst: [u16; 8],
}

/// The two bytes every hop-by-hop/routing/destination-options header starts with.
#[repr(C)]
struct Ipv6ExtHdr {
    /// Next header.
    next_hdr: u8,
    /// Length in 8-octet units, not counting the first 8 octets.
    len: u8,
}

/// IPv6 fragment header (RFC 8200 §4.5).
#[repr(C)]
struct Ipv6FragHdr {
    /// Next header.
    next_hdr: u8,
    /// Reserved.
    _reserved: u8,
    /// Fragment offset (13 bits, 8-octet units) | res | M, network order.
    frag_off: u16,
    /// Identification.
    _id: [u16; 2],
}

/// The part of a UDP header the datapath reads: ports, length, checksum.
#[repr(C)]
pub struct UdpHdr {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Length.
    pub len: u16,
    /// Checksum (0 on IPv4 = none).
    pub check: u16,
}

/// TCP header up to and including the checksum and urgent pointer (20 bytes).
#[repr(C)]
pub struct TcpHdr {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence and acknowledgement numbers.
    _seq_ack: [u16; 4],
    /// Data offset (high nibble of byte 0) and the flags (byte 1).
    pub off_flags: [u8; 2],
    /// Window.
    _win: u16,
    /// Checksum.
    pub check: u16,
    /// Urgent pointer.
    _urg: u16,
}

/// Pointer to a `T` at `off` bytes into the frame, or `DropTruncated` when
/// the frame is shorter. This comparison against `data_end` is what the
/// verifier uses to allow the access; each caller re-derives pointers with
/// it right before use instead of carrying them across helper calls.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return Err(Reason::DropTruncated);
    }
    Ok((start + off) as *mut T)
}

/// How far a parsed IP packet may go.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// UDP/TCP without fragmentation or extension headers: fast-path candidate.
    Plain,
    /// First fragment (IPv4 MF with offset 0, or an IPv6 fragment header with
    /// offset 0): judged by its ports, never fast-pathed.
    Fragment,
    /// IPv6 with extension headers (and no fragment header): judged, never fast-pathed.
    Ipv6Ext,
    /// Another transport (ICMP, ...) without extension headers: no ports to judge.
    NoPorts,
}

/// What the verdict code needs to know about a packet.
pub struct Packet {
    /// Offset of the IP header in the frame.
    pub l3: usize,
    /// Offset of the transport header (valid when `has_ports`).
    pub l4: usize,
    /// Source address, network order; IPv4 uses words 0..2, the rest are zero.
    pub src: [u16; 8],
    /// Destination address, same layout as `src`.
    pub dst: [u16; 8],
    /// Source port, network order (0 without ports).
    pub sport: u16,
    /// Destination port, network order (0 without ports).
    pub dport: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Transport protocol number (after extension headers on IPv6).
    pub proto: u8,
    /// TTL / hop limit as received.
    pub ttl: u8,
    /// Whether `sport`/`dport` were read from a UDP/TCP header.
    pub has_ports: bool,
    /// Fast-path eligibility.
    pub kind: Kind,
}

/// Which IP version the Ethernet layer announced.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    /// EtherType 0x0800.
    V4,
    /// EtherType 0x86dd.
    V6,
}

/// Parse Ethernet and at most one VLAN tag. Returns the IP header offset.
/// A second tag (QinQ) is not IP to us: `PassNotIp`.
#[inline(always)]
pub fn eth(ctx: &XdpContext) -> Result<(usize, L3), Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let mut ethertype = unsafe { (*eth).ethertype };
    let mut l3 = size_of::<EthHdr>();
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let vlan: *const VlanHdr = ptr_at(ctx, l3)?;
        ethertype = unsafe { (*vlan).ethertype };
        l3 += size_of::<VlanHdr>();
    }
    if ethertype == ETH_P_IP {
        Ok((l3, L3::V4))
    } else if ethertype == ETH_P_IPV6 {
        Ok((l3, L3::V6))
    } else {
        Err(Reason::PassNotIp)
    }
}

/// Parse the IP header at `l3` (and the transport ports when present).
#[inline(always)]
pub fn ip(ctx: &XdpContext, l3: usize, ver: L3) -> Result<Packet, Reason> {
    match ver {
        L3::V4 => ipv4(ctx, l3),
        L3::V6 => ipv6(ctx, l3),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize) -> Result<Packet, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3)?;
    let (ver_ihl, frag_off, ttl, proto, s, d) = unsafe {
        (
            (*ip).ver_ihl,
            u16::from_be((*ip).frag_off),
            (*ip).ttl,
            (*ip).proto,
            (*ip).src,
            (*ip).dst,
        )
    };
    if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 {
        return Err(Reason::DropMalformed);
    }
    // Non-first fragments carry no ports; the kernel gets them (and cannot
    // reassemble a datagram whose first fragment we dropped).
    if frag_off & IP_OFFSET != 0 {
        return Err(Reason::PassFragment);
    }
    let l4 = l3 + ((ver_ihl & 0x0f) as usize) * 4;
    let mut pkt = Packet {
        l3,
        l4,
        src: [s[0], s[1], 0, 0, 0, 0, 0, 0],
        dst: [d[0], d[1], 0, 0, 0, 0, 0, 0],
        sport: 0,
        dport: 0,
        family: FAMILY_V4,
        proto,
        ttl,
        has_ports: false,
        kind: Kind::NoPorts,
    };
    ports(ctx, &mut pkt)?;
    if frag_off & IP_MF != 0 {
        pkt.kind = Kind::Fragment;
    } else if pkt.has_ports {
        pkt.kind = Kind::Plain;
    }
    Ok(pkt)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize) -> Result<Packet, Reason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3)?;
    let (first, mut nh, ttl, src, dst) = unsafe {
        (
            (*ip).vtc_flow[0],
            (*ip).next_hdr,
            (*ip).hop_limit,
            (*ip).src,
            (*ip).dst,
        )
    };
    // vtc_flow[0] holds the first two bytes; the version is the high nibble
    // of the first byte, i.e. bits 4..8 of the little-endian load.
    if (first & 0x00f0) != 0x0060 {
        return Err(Reason::DropMalformed);
    }
    let mut off = l3 + size_of::<Ipv6Hdr>();
    let mut ext = false;
    let mut frag = false;
    for _ in 0..MAX_IPV6_EXT {
        if nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_DEST {
            let h: *const Ipv6ExtHdr = ptr_at(ctx, off)?;
            let (next, len) = unsafe { ((*h).next_hdr, (*h).len) };
            nh = next;
            off += (len as usize + 1) * 8;
            ext = true;
        } else if nh == NEXTHDR_FRAGMENT {
            let h: *const Ipv6FragHdr = ptr_at(ctx, off)?;
            let (next, fo) = unsafe { ((*h).next_hdr, u16::from_be((*h).frag_off)) };
            if fo >> 3 != 0 {
                return Err(Reason::PassFragment);
            }
            nh = next;
            off += size_of::<Ipv6FragHdr>();
            frag = true;
        } else {
            break;
        }
    }
    let mut pkt = Packet {
        l3,
        l4: off,
        src,
        dst,
        sport: 0,
        dport: 0,
        family: FAMILY_V6,
        proto: nh,
        ttl,
        has_ports: false,
        kind: Kind::NoPorts,
    };
    // AH, ESP, a fifth extension header or an unknown one: no ports.
    ports(ctx, &mut pkt)?;
    pkt.kind = if frag {
        Kind::Fragment
    } else if ext {
        Kind::Ipv6Ext
    } else if pkt.has_ports {
        Kind::Plain
    } else {
        Kind::NoPorts
    };
    Ok(pkt)
}

/// Read the ports of a UDP or TCP header at `pkt.l4`; other protocols have none.
#[inline(always)]
fn ports(ctx: &XdpContext, pkt: &mut Packet) -> Result<(), Reason> {
    let (sport, dport) = if pkt.proto == PROTO_UDP {
        let h: *const UdpHdr = ptr_at(ctx, pkt.l4)?;
        unsafe { ((*h).sport, (*h).dport) }
    } else if pkt.proto == PROTO_TCP {
        let h: *const TcpHdr = ptr_at(ctx, pkt.l4)?;
        unsafe { ((*h).sport, (*h).dport) }
    } else {
        return Ok(());
    };
    pkt.sport = sport;
    pkt.dport = dport;
    pkt.has_ports = true;
    Ok(())
}
