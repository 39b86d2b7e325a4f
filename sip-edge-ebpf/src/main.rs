//! The sip-edge XDP program (issue #2), the only program of the object the
//! agent embeds (test and bench programs live in `harness.rs`): forwards packets that match a
//! pinhole (rewrite + incremental checksums + FIB + devmap redirect), drops
//! unmatched traffic aimed at media ports of edge addresses, passes the rest
//! to the kernel, and counts every verdict in `REASONS`.
//!
//! Verdict order for a packet arriving on an interface of role R:
//!
//! | step | condition                                             | reason               | action   |
//! |------|-------------------------------------------------------|----------------------|----------|
//! | 0    | Ethernet/VLAN/IP/UDP/TCP header cut short             | `DropTruncated`      | drop     |
//! | 0    | EtherType not IPv4/IPv6 (after at most one tag)       | `PassNotIp`          | pass     |
//! | 0    | ingress ifindex has no role in `IFACES`/`IFACES_HI`   | `PassUnknownIface`   | pass     |
//! | 0    | IP version ≠ EtherType, or IPv4 IHL < 5               | `DropMalformed`      | drop     |
//! | 0    | non-first fragment (IPv4 offset ≠ 0, IPv6 frag hdr)   | `PassFragment`       | pass     |
//! | 0    | first fragment: always-pass / media / other port      | `PassSignalling` / `DropFragment` / default | |
//! | 0    | IPv6 extension headers: media port / otherwise        | `DropIpv6Ext` / `PassIpv6Ext` |  |
//! | 0    | no UDP/TCP ports (ICMP, ...)                          | default policy       |          |
//! | 0    | no ports, `DropOther`, but ICMP the host needs (`icmp.rs`) | `PassHostIcmp`  | pass     |
//! | 1    | pinhole lookup by dst (then by src if R = internal)   | miss → step 6        |          |
//! | 1    | by dst: skipped (a miss) when `DST_PORTS` counts no `MATCH_DST` rule on the protocol and port; the `PH_DST` entry of an indexed edge address + port (a live entry of another protocol/role is a miss), `PINHOLES` when not indexed or the entry's `overflow` count is non-zero | | |
//! | 1    | rule's state slot outside `PH_STATE` / family mismatch| `DropBadRule`        | drop     |
//! | 2    | remote (or latched remote) differs                    | `DropRemoteMismatch` | drop     |
//! | 3    | TTL / hop limit ≤ 1                                   | `DropTtlExceeded`    | drop     |
//! | 4    | rewrite + checksums + TTL decrement                   |                      |          |
//! | 5    | next hop: the pinhole's cached FIB result (< 1 s old, same dst) or `bpf_fib_lookup` | | |
//! | 5    | FIB: no neighbour / other failure / egress ∉ TX_PORTS | `DropNoNeigh` / `DropFibFailed` / `DropNoTxPort` | drop |
//! | 5    | FIB success, redirected                               | `Forwarded`          | redirect |
//! | 6    | edge address (`EDGE_LIST` scan, `EDGE_ADDRS` on overflow), always-pass port | `PassSignalling` | pass |
//! | 6    | edge address, media port                              | `DropNoPinhole`      | drop     |
//! | 6    | anything else                                         | `PassOther` / `DropOther` (SETTINGS) | |
//! | 6    | `DropOther`, but a socket the host opened owns the 4-tuple | `PassLocalSocket`  | pass     |
//! | 6    | `DropNoPinhole`, but TCP with ACK a local connection past LISTEN owns | `PassLocalSocket` | pass |
//!
//! `Latched` is counted in addition to the packet's own reason when the
//! packet latched a pinhole.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core::intrinsics atomics: the bpfel target has no atomic CAS in core::sync::atomic"
)]

mod fib;
mod icmp;
mod mapdef;
mod maps;
mod nat;
mod parse;
mod pinhole;
mod policy;
mod socket;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_coarse_ns,
    macros::xdp,
    programs::XdpContext,
};
use sip_edge_common::{Addr, Reason, IFACE_SLOTS, REASON_COUNT};

use crate::{
    maps::{IFACES, IFACES_HI, REASONS},
    parse::{Kind, Packet},
};

/// Reasons whose action is `XDP_PASS`; every other non-forward reason drops.
const PASS_MASK: u64 = (1 << Reason::PassNotIp as u32)
    | (1 << Reason::PassUnknownIface as u32)
    | (1 << Reason::PassSignalling as u32)
    | (1 << Reason::PassOther as u32)
    | (1 << Reason::PassFragment as u32)
    | (1 << Reason::PassIpv6Ext as u32)
    | (1 << Reason::PassLocalSocket as u32)
    | (1 << Reason::PassHostIcmp as u32);
const _: () = assert!(REASON_COUNT <= 64, "PASS_MASK holds one bit per reason");

/// Entry point: runs the verdict and counts its reason.
#[xdp]
pub fn sip_edge_xdp(ctx: XdpContext) -> u32 {
    match try_sip_edge_xdp(&ctx) {
        Ok(action) => {
            count(Reason::Forwarded);
            action
        }
        Err(reason) => {
            count(reason);
            if (PASS_MASK >> (reason as u32)) & 1 != 0 {
                XDP_PASS
            } else {
                XDP_DROP
            }
        }
    }
}

/// The verdict. `Ok` is a forwarded packet (the redirect action); every
/// other outcome, pass or drop, is an `Err(reason)`.
#[inline(always)]
fn try_sip_edge_xdp(ctx: &XdpContext) -> Result<u32, Reason> {
    let (l3, ver) = parse::eth(ctx)?;
    let ifindex = ctx.ingress_ifindex() as u32;
    let role = iface_role(ifindex);
    if role == 0 {
        return Err(Reason::PassUnknownIface);
    }
    let pkt = parse::ip(ctx, l3, ver)?;
    if pkt.kind == Kind::NoPorts {
        return Err(match policy::default_policy() {
            Reason::DropOther if icmp::host_needs(ctx, &pkt) => Reason::PassHostIcmp,
            r => r,
        });
    }
    let dst = policy::dst(&pkt);
    let media = match pkt.kind {
        Kind::Plain => match pinhole::lookup(&pkt, role, &dst)? {
            Some(hit) => return forward(ctx, &pkt, &hit, ifindex),
            None => Reason::DropNoPinhole,
        },
        Kind::Fragment => Reason::DropFragment,
        _ => Reason::DropIpv6Ext,
    };
    Err(policy::unmatched(ctx, &pkt, &dst, media))
}

/// Role of the ingress interface; 0 when it is not configured.
#[inline(always)]
fn iface_role(ifindex: u32) -> u8 {
    let cfg = if ifindex < IFACE_SLOTS {
        IFACES.get_ptr(&ifindex)
    } else {
        IFACES_HI.get_ptr(&ifindex)
    };
    // SAFETY: IFACES values are plain data written whole by the agent.
    cfg.map_or(0, |c| unsafe { (*c).role })
}

/// Verdict steps 2-5 for a pinhole hit.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    hit: &pinhole::Hit,
    ifindex: u32,
) -> Result<u32, Reason> {
    pinhole::check_remote(pkt, hit)?;
    if pkt.ttl <= 1 {
        return Err(Reason::DropTtlExceeded);
    }
    let t = pinhole::target(pkt, hit)?;
    nat::rewrite(ctx, pkt, &t)?;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let action = fib::forward(ctx, pkt, &t, ifindex, hit.stats, hit.fib_dst6, now)?;
    // Counters only for packets that actually leave (step 5).
    pinhole::account(hit.stats, (ctx.data_end() - ctx.data()) as u64, now);
    Ok(action)
}

/// Count one packet (or one latch) under `reason`. Per-CPU: no atomics.
#[inline(always)]
pub(crate) fn count(reason: Reason) {
    if let Some(c) = REASONS.get_ptr_mut(&(reason as u32)) {
        // SAFETY: a per-CPU array slot, only this CPU writes it now.
        unsafe { *c += 1 };
    }
}

/// A parsed address as the 16-byte key form of `sip_edge_common::Addr`.
#[inline(always)]
pub(crate) fn to_addr(a: &[u16; 8]) -> Addr {
    // SAFETY: same size, both plain integers.
    unsafe { core::mem::transmute::<[u16; 8], Addr>(*a) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
