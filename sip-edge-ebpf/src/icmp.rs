//! ICMP the host needs under `[policy] default = "drop"`.
//!
//! A packet without ports takes the default policy, so the drop policy
//! would also drop what the host's own IP stack depends on:
//!
//! * IPv6 neighbour discovery (RFC 4861: router solicitation/advertisement,
//!   neighbour solicitation/advertisement, redirect; types 133-137). Without
//!   it no IPv6 packet leaves the host on an XDP interface. RFC 4861 §7.1.1
//!   makes receivers discard ND messages whose hop limit is not 255, which
//!   proves they were not forwarded by a router; we pass only those, so an
//!   off-link sender cannot use ND to get through.
//! * ICMP errors about the host's own connections: destination unreachable
//!   (IPv4 type 3, including "fragmentation needed" for path MTU discovery,
//!   RFC 1191), time exceeded (11), parameter problem (12); ICMPv6
//!   destination unreachable (1), packet too big (2, RFC 8201), time
//!   exceeded (3), parameter problem (4). Such an error quotes the packet
//!   the host sent; it passes when the quoted packet's 4-tuple, seen from
//!   the host, is owned by a socket the host opened: the same rule as
//!   `PassLocalSocket` (see `socket.rs`). An error quoting anything else
//!   (a media flow XDP forwarded, a service's listener, a made-up tuple)
//!   stays dropped.
//!
//! Echo request/reply and every other ICMP type stay under the policy.
//! Reached only for `Kind::NoPorts` packets under the drop policy, so the
//! fast path and the pass policy never run this code.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use sip_edge_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

use crate::{
    parse::{ptr_at, Ipv4Hdr, Ipv6Hdr, Kind, Packet},
    socket,
};

/// IANA protocol number of ICMP.
const PROTO_ICMP: u8 = 1;
/// IANA next-header number of ICMPv6.
const PROTO_ICMPV6: u8 = 58;
/// Fragment offset bits of the IPv4 `frag_off` field.
const IP_OFFSET: u16 = 0x1fff;

/// The fixed part of every ICMP/ICMPv6 message: type, code, checksum and
/// the 4 type-specific bytes, after which an error quotes the packet.
#[repr(C)]
struct IcmpHdr {
    ty: u8,
    _code: u8,
    _check: u16,
    _rest: u32,
}

/// The first 4 bytes of a UDP or TCP header.
#[repr(C)]
struct Ports {
    sport: u16,
    dport: u16,
}

/// Whether a port-less packet is ICMP the host needs (module docs).
#[inline(always)]
pub fn host_needs(ctx: &XdpContext, pkt: &Packet) -> bool {
    let Ok(h) = ptr_at::<IcmpHdr>(ctx, pkt.l4) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let ty = unsafe { (*h).ty };
    let quoted = pkt.l4 + size_of::<IcmpHdr>();
    if pkt.family == FAMILY_V4 {
        pkt.proto == PROTO_ICMP && matches!(ty, 3 | 11 | 12) && quoted_v4(ctx, quoted)
    } else if pkt.proto != PROTO_ICMPV6 {
        false
    } else if (133..=137).contains(&ty) {
        pkt.ttl == 255
    } else {
        (1..=4).contains(&ty) && quoted_v6(ctx, quoted)
    }
}

/// The quoted IPv4 packet at `off`, as the reply direction the host's
/// socket would see, is owned by a local socket.
#[inline(always)]
fn quoted_v4(ctx: &XdpContext, off: usize) -> bool {
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, off) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let (ver_ihl, frag_off, proto, s, d) = unsafe {
        (
            (*ip).ver_ihl,
            u16::from_be((*ip).frag_off),
            (*ip).proto,
            (*ip).src,
            (*ip).dst,
        )
    };
    // A quoted non-first fragment has no ports where we would read them.
    if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 || frag_off & IP_OFFSET != 0 {
        return false;
    }
    let l4 = off + ((ver_ihl & 0x0f) as usize) * 4;
    let mut src = [0u16; 8];
    let mut dst = [0u16; 8];
    // The host sent s -> d; a reply on its socket would come d -> s.
    src[0] = d[0];
    src[1] = d[1];
    dst[0] = s[0];
    dst[1] = s[1];
    owned(ctx, l4, FAMILY_V4, proto, src, dst)
}

/// Same for a quoted IPv6 packet (without extension headers: the host's
/// own TCP/UDP sockets do not send any).
#[inline(always)]
fn quoted_v6(ctx: &XdpContext, off: usize) -> bool {
    let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let (proto, s, d) = unsafe { ((*ip).next_hdr, (*ip).src, (*ip).dst) };
    owned(ctx, off + size_of::<Ipv6Hdr>(), FAMILY_V6, proto, d, s)
}

/// Look the reply-direction 4-tuple up (`socket::owned_by_local_socket`).
#[inline(always)]
fn owned(ctx: &XdpContext, l4: usize, family: u8, proto: u8, src: [u16; 8], dst: [u16; 8]) -> bool {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return false;
    }
    let Ok(p) = ptr_at::<Ports>(ctx, l4) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let (sport, dport) = unsafe { ((*p).sport, (*p).dport) };
    let reply = Packet {
        l3: 0,
        l4,
        src,
        dst,
        sport: dport,
        dport: sport,
        family,
        proto,
        ttl: 0,
        has_ports: true,
        kind: Kind::Plain,
    };
    socket::owned_by_local_socket(ctx, &reply)
}
