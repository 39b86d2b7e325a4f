//! Packets the host asked for: under `[policy] default = "drop"`, a packet
//! that would be dropped as `DropOther` is first looked up in the kernel's
//! socket tables. If a local socket that the host itself opened owns its
//! 4-tuple, it is the reply to a connection the edge made (the agent's TLS
//! connection to a next hop arrives on an ephemeral port that is neither
//! a media nor a signalling port) and passes; anything else stays dropped.
//!
//! "Opened by the host" is the socket state: a TCP socket past LISTEN
//! (SYN_SENT, ESTABLISHED, closing states; `bpf_sk_lookup_tcp` returns no
//! request or time-wait sockets) or a connected UDP socket (ESTABLISHED). A
//! listener (TCP LISTEN, unconnected UDP: CLOSE) is a service, not a reply,
//! and the drop policy exists to keep unsolicited traffic from services not
//! listed as always-pass ports. The lookup is in the namespace of the
//! ingress device (`BPF_F_CURRENT_NETNS`).
//!
//! A TCP segment aimed at a media port that missed every pinhole is looked
//! up too, under either policy, when it carries ACK (every segment of an
//! open connection but its first SYN does). Media ports are reserved
//! against ephemeral use (`ip_local_reserved_ports`), but only for sockets
//! bound after the reservation: a reload that adds a media range finds the
//! agent's connections to its next hops where the kernel put them, and one
//! whose local port lies in the new range would otherwise lose every reply
//! (`drop_no_pinhole`) until it timed out. A SYN, a segment to a listener
//! and anything UDP stay `drop_no_pinhole`: a UDP flood on the media ports
//! costs no lookup.

use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::{bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    programs::XdpContext,
};
use sip_edge_common::{FAMILY_V4, PROTO_TCP, PROTO_UDP};

use crate::parse::{ptr_at, Packet, TcpHdr};

/// `TCP_LISTEN` of `include/net/tcp_states.h`.
const TCP_LISTEN: u32 = 10;
/// `TCP_CLOSE`: also the state of an unconnected UDP socket.
const TCP_CLOSE: u32 = 7;
/// `sizeof(bpf_sock_tuple.ipv4)`: addresses and ports, no padding.
const TUPLE_V4: u32 = 12;
/// `sizeof(bpf_sock_tuple.ipv6)`.
const TUPLE_V6: u32 = 36;

/// `ACK` in the TCP flags byte (RFC 9293 §3.1).
const TCP_ACK: u8 = 0x10;

/// Whether the packet is a TCP segment with ACK set: one a local
/// connection past LISTEN may own (see module docs).
#[inline(always)]
pub fn tcp_ack(ctx: &XdpContext, pkt: &Packet) -> bool {
    if pkt.proto != PROTO_TCP || !pkt.has_ports {
        return false;
    }
    match ptr_at::<TcpHdr>(ctx, pkt.l4) {
        // SAFETY: bounds checked by `ptr_at`.
        Ok(h) => (unsafe { (*h).off_flags[1] } & TCP_ACK) != 0,
        Err(_) => false,
    }
}

/// Whether a socket the host opened owns the packet (see module docs).
#[inline(always)]
pub fn owned_by_local_socket(ctx: &XdpContext, pkt: &Packet) -> bool {
    if !pkt.has_ports || (pkt.proto != PROTO_TCP && pkt.proto != PROTO_UDP) {
        return false;
    }
    // SAFETY: plain integers; every byte the helper reads is written below.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if pkt.family == FAMILY_V4 {
        // SAFETY: writing the union's ipv4 member.
        let v4 = unsafe { &mut t.__bindgen_anon_1.ipv4 };
        // Network-order words as they lie in memory (see `Packet`).
        v4.saddr = pkt.src[0] as u32 | (pkt.src[1] as u32) << 16;
        v4.daddr = pkt.dst[0] as u32 | (pkt.dst[1] as u32) << 16;
        v4.sport = pkt.sport;
        v4.dport = pkt.dport;
        TUPLE_V4
    } else {
        // SAFETY: writing the union's ipv6 member.
        let v6 = unsafe { &mut t.__bindgen_anon_1.ipv6 };
        for i in 0..4 {
            v6.saddr[i] = pkt.src[2 * i] as u32 | (pkt.src[2 * i + 1] as u32) << 16;
            v6.daddr[i] = pkt.dst[2 * i] as u32 | (pkt.dst[2 * i + 1] as u32) << 16;
        }
        v6.sport = pkt.sport;
        v6.dport = pkt.dport;
        TUPLE_V6
    };
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: `t` lives across the call and `size` is its member's size;
    // the returned reference is released below on every path.
    let sk = unsafe {
        if pkt.proto == PROTO_TCP {
            bpf_sk_lookup_tcp(ctx.ctx.cast(), &mut t, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.ctx.cast(), &mut t, size, netns, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a referenced socket from the lookup; `state` is readable on
    // PTR_TO_SOCKET.
    let state = unsafe { (*sk).state };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
    state != TCP_LISTEN && state != TCP_CLOSE
}
