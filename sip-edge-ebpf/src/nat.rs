//! Header rewrite of a pinhole hit: new addresses/ports, TTL/hop-limit
//! decrement, and incremental checksum updates (RFC 1624 eqn. 3:
//! HC' = ~(~HC + ~m + m')) for the IPv4 header checksum and the UDP/TCP
//! checksum, whose pseudo-header covers the addresses (RFC 768, RFC 9293
//! §3.1, RFC 8200 §8.1).
//!
//! Sums are taken over the 16-bit words exactly as they sit in memory; the
//! one's-complement sum is byte-order independent (RFC 1071 §2(B)), so no
//! byte swapping is needed.

use aya_ebpf::programs::XdpContext;
use sip_edge_common::{Reason, FAMILY_V4, PROTO_UDP};

use crate::{
    parse::{ptr_at, Ipv4Hdr, Ipv6Hdr, Packet, TcpHdr, UdpHdr},
    pinhole::Target,
};

/// Add the change of `N` 16-bit words from `old` to `new` to `acc`.
#[inline(always)]
fn delta<const N: usize>(mut acc: u64, old: &[u16; N], new: &[u16; N]) -> u64 {
    let mut i = 0;
    while i < N {
        acc += (!old[i]) as u64 + new[i] as u64;
        i += 1;
    }
    acc
}

/// Fold a 64-bit sum of 16-bit words to 16 bits with end-around carry.
#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Apply a summed change to a stored checksum (RFC 1624 eqn. 3).
#[inline(always)]
fn apply(check: u16, d: u64) -> u16 {
    !fold((!check) as u64 + d)
}

/// Rewrite the packet's addresses and ports to `t`, decrement the TTL/hop
/// limit and fix the checksums. The caller has checked TTL > 1.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, t: &Target) -> Result<(), Reason> {
    // The L4 part of the change: ports, then the pseudo-header addresses.
    let ports = delta(0, &[pkt.sport, pkt.dport], &[t.sport, t.dport]);
    if pkt.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3)?;
        let old_a = [pkt.src[0], pkt.src[1], pkt.dst[0], pkt.dst[1]];
        let new_a = [t.src[0], t.src[1], t.dst[0], t.dst[1]];
        let addrs = delta(0, &old_a, &new_a);
        unsafe {
            // TTL shares a word with the protocol (bytes 8..10): in a
            // little-endian load the TTL is the low byte, so the word
            // decreases by one.
            let ttl_word = (&raw mut (*ip).ttl) as *mut u16;
            let old_tw = *ttl_word;
            let new_tw = old_tw.wrapping_sub(1);
            *ttl_word = new_tw;
            (*ip).src = [t.src[0], t.src[1]];
            (*ip).dst = [t.dst[0], t.dst[1]];
            (*ip).check = apply((*ip).check, delta(addrs, &[old_tw], &[new_tw]));
        }
        l4(ctx, pkt, t, ports + addrs, true)
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3)?;
        let addrs = delta(delta(0, &pkt.src, &t.src), &pkt.dst, &t.dst);
        unsafe {
            (*ip).src = t.src;
            (*ip).dst = t.dst;
            (*ip).hop_limit = pkt.ttl.wrapping_sub(1);
        }
        l4(ctx, pkt, t, ports + addrs, false)
    }
}

/// Write the ports and update the UDP/TCP checksum by `d`. An IPv4 UDP
/// checksum of 0 means "none" and stays 0; a computed 0 is sent as 0xffff
/// (RFC 768), which on IPv6 is the only valid form (RFC 8200 §8.1).
#[inline(always)]
fn l4(ctx: &XdpContext, pkt: &Packet, t: &Target, d: u64, v4: bool) -> Result<(), Reason> {
    if pkt.proto == PROTO_UDP {
        let h: *mut UdpHdr = ptr_at(ctx, pkt.l4)?;
        unsafe {
            (*h).sport = t.sport;
            (*h).dport = t.dport;
            let c = (*h).check;
            if !(v4 && c == 0) {
                let n = apply(c, d);
                (*h).check = if n == 0 { 0xffff } else { n };
            }
        }
    } else {
        let h: *mut TcpHdr = ptr_at(ctx, pkt.l4)?;
        unsafe {
            (*h).sport = t.sport;
            (*h).dport = t.dport;
            (*h).check = apply((*h).check, d);
        }
    }
    Ok(())
}
