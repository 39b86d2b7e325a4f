//! Next hop of a rewritten packet: `bpf_fib_lookup` on the new addresses,
//! MAC rewrite and redirect through `TX_PORTS`; a next hop without a
//! neighbour entry is recorded in `NEIGH_MISS` for the agent to resolve.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action::XDP_DROP, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns},
    programs::XdpContext,
    EbpfContext as _,
};
use sip_edge_common::{NeighMiss, NeighMissKey, Reason, FAMILY_V4, FAMILY_V6};

use crate::{
    maps::{NEIGH_MISS, TX_PORTS},
    parse::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Packet},
    pinhole::Target,
};

/// Kernel address family numbers the FIB helper expects.
const AF_INET: u8 = 2;
/// IPv6.
const AF_INET6: u8 = 10;

/// The FIB parameters on an 8-aligned stack slot, zeroed a word at a time.
#[repr(C, align(8))]
struct Aligned(FibParams);
const _: () = assert!(size_of::<Aligned>() == 64);

/// Two network-order 16-bit words as the `__be32` they form in memory.
#[inline(always)]
fn be32(w: &[u16]) -> u32 {
    (w[0] as u32) | ((w[1] as u32) << 16)
}

const _: () = assert!(size_of::<NeighMissKey>() == 24);
const _: () = assert!(core::mem::offset_of!(NeighMissKey, ifindex) == 16);
const _: () = assert!(core::mem::offset_of!(NeighMissKey, family) == 20);
const _: () = assert!(core::mem::align_of::<NeighMissKey>() == 4);

/// Route the (already rewritten) packet: on success write the MACs and
/// redirect, returning `XDP_REDIRECT`. The ingress ifindex scopes the lookup
/// (its VRF/table), as for a packet the kernel would forward.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, t: &Target, ifindex: u32) -> Result<u32, Reason> {
    // Every byte is written first (the verifier rejects helpers reading
    // uninitialised stack). Volatile word stores, because bpf-linker builds
    // with -bpf-expand-memcpy-in-order, under which LLVM turns merged zero
    // stores into a call to a `memset` subprogram.
    let mut slot = core::mem::MaybeUninit::<Aligned>::uninit();
    let words = slot.as_mut_ptr().cast::<u64>();
    let mut i = 0;
    while i < size_of::<FibParams>() / 8 {
        // SAFETY: in bounds of the 64-byte, 8-aligned stack slot.
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
    // SAFETY: all bytes are initialised above; every field is an integer.
    let p = unsafe { &mut slot.assume_init_mut().0 };
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    p.sport = t.sport;
    p.dport = t.dport;
    p.ifindex = ifindex;
    if pkt.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, pkt.l3)?;
        unsafe {
            // The helper wants the total length in host order (MTU check).
            p.__bindgen_anon_1.tot_len = u16::from_be((*ip).tot_len);
            p.__bindgen_anon_2.flowinfo = (*ip).tos as u32;
        }
        p.__bindgen_anon_3.ipv6_src = [be32(&t.src[..2]), 0, 0, 0];
        p.__bindgen_anon_4.ipv6_dst = [be32(&t.dst[..2]), 0, 0, 0];
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, pkt.l3)?;
        p.family = AF_INET6;
        unsafe {
            p.__bindgen_anon_1.tot_len =
                u16::from_be((*ip).payload_len).wrapping_add(size_of::<Ipv6Hdr>() as u16);
            // Traffic class and flow label, network order; the version
            // nibble is masked off (htonl(0x0fffffff) in memory order).
            p.__bindgen_anon_2.flowinfo = be32(&(*ip).vtc_flow) & 0xffff_ff0f;
        }
        p.__bindgen_anon_3.ipv6_src =
            [be32(&t.src[0..2]), be32(&t.src[2..4]), be32(&t.src[4..6]), be32(&t.src[6..8])];
        p.__bindgen_anon_4.ipv6_dst =
            [be32(&t.dst[0..2]), be32(&t.dst[2..4]), be32(&t.dst[4..6]), be32(&t.dst[6..8])];
    }
    // SAFETY: `p` is fully initialised and sized as the helper expects.
    let rc = unsafe {
        bpf_fib_lookup(ctx.as_ptr(), &raw mut *p, size_of::<FibParams>() as i32, 0)
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let eth: *mut EthHdr = ptr_at(ctx, 0)?;
        unsafe {
            // smac/dmac sit at even offsets (52/58) of the params: copy
            // them as 16-bit words; volatile so LLVM cannot fuse them back
            // into a `memmove` call (see above).
            let dmac = (&raw const p.dmac).cast::<u16>();
            let smac = (&raw const p.smac).cast::<u16>();
            let dst = (&raw mut (*eth).dst).cast::<u16>();
            let src = (&raw mut (*eth).src).cast::<u16>();
            let mut i = 0;
            while i < 3 {
                dst.add(i).write_volatile(dmac.add(i).read());
                src.add(i).write_volatile(smac.add(i).read());
                i += 1;
            }
        }
        // A miss returns the low bits of the flags: XDP_DROP.
        TX_PORTS.redirect(p.ifindex, XDP_DROP as u64).map_err(|_| Reason::DropNoTxPort)
    } else if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        neigh_miss(p, pkt.family);
        Err(Reason::DropNoNeigh)
    } else {
        Err(Reason::DropFibFailed)
    }
}

/// Record a next hop without a neighbour entry. After the lookup the helper
/// has put the next hop (gateway, or the destination when on-link) into
/// `ipv4_dst`/`ipv6_dst` and the egress interface into `ifindex`.
#[inline(always)]
fn neigh_miss(p: &FibParams, family: u8) {
    // SAFETY: reading the union variant the helper filled for this family.
    let addr = unsafe {
        if family == FAMILY_V6 {
            p.__bindgen_anon_4.ipv6_dst
        } else {
            [p.__bindgen_anon_4.ipv4_dst, 0, 0, 0]
        }
    };
    // The key as words: `family` and its padding form the last word
    // (little-endian: family is its low byte), so no byte-sized stores or
    // memset are needed; the layout is asserted below.
    let words: [u32; 6] = [addr[0], addr[1], addr[2], addr[3], p.ifindex, family as u32];
    // SAFETY: same size, NeighMissKey's alignment (4) is that of u32.
    let key = unsafe { &*(&raw const words).cast::<NeighMissKey>() };
    let now = unsafe { bpf_ktime_get_ns() };
    match NEIGH_MISS.get_ptr_mut(key) {
        Some(v) => unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                &raw mut (*v).packets,
                1,
            );
            (&raw mut (*v).last_ns).write_volatile(now);
        },
        None => {
            // Two CPUs may both insert the first miss; either count is fine.
            let _ = NEIGH_MISS.insert(key, &NeighMiss { packets: 1, last_ns: now }, 0);
        }
    }
}
