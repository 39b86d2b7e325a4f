//! Next hop of a rewritten packet: a per-pinhole cache of the last
//! `bpf_fib_lookup` result (in the rule's `PH_STATE` slot), else the lookup
//! itself; MAC rewrite and redirect through `TX_PORTS`; a next hop without a
//! neighbour entry is recorded in `NEIGH_MISS` for the agent to resolve.
//!
//! Why a cache: the lookup (FIB trie + neighbour table) was the largest
//! single cost of a hit (`sip-edge-tester --repeat 2000000 --filter bench`:
//! v4 hit 233-288 → 183-191 ns, v6 hit 353-441 → 171-181 ns with it). A media flow sends 50 packets/s to one
//! next hop, so one lookup per flow per `FIB_TTL_NS` keeps route, neighbour
//! (MAC) and MTU changes visible within that time while most packets skip
//! it. Only successes are cached: an unresolved neighbour is asked again on
//! every packet (`DropNoNeigh` + `NEIGH_MISS`, as before). The entry is keyed
//! on the rewritten destination and the ingress ifindex and carries the
//! largest IP length the MTU check passed, so a rule replaced in place, a
//! latched destination or a longer packet takes the full lookup. Not keyed
//! on source address or ports: policy routing by source/port (or ECMP
//! hashing on ports) is re-decided once per interval per pinhole, not per
//! packet.

use core::{
    intrinsics::{atomic_cxchg, AtomicOrdering},
    mem::size_of,
};

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action::XDP_DROP, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns},
    programs::XdpContext,
    EbpfContext as _,
};
use sip_edge_common::{
    NeighMiss, NeighMissKey, PinholeState, Reason, FAMILY_V4, FAMILY_V6, FIB_WRITING,
};

use crate::{
    maps::{NEIGH_MISS, TX_PORTS},
    parse::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Packet},
    pinhole::Target,
};

/// Kernel address family numbers the FIB helper expects.
const AF_INET: u8 = 2;
/// IPv6.
const AF_INET6: u8 = 10;

/// How long a cached next hop is used before the FIB is asked again. The
/// clock is CLOCK_MONOTONIC_COARSE (one jiffy resolution), so the real
/// interval is this plus at most one tick.
pub const FIB_TTL_NS: u64 = 1_000_000_000;

const _: () = assert!(core::mem::offset_of!(PinholeState, fib_dst) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(PinholeState, fib_at_ns) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(PinholeState, fib_dmac) % 2 == 0);
const _: () = assert!(core::mem::offset_of!(PinholeState, fib_smac) % 2 == 0);

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

/// Copy three 16-bit words (a MAC) with volatile stores, so LLVM cannot
/// fuse them into a `memmove` call (bpf-linker builds with
/// -bpf-expand-memcpy-in-order).
#[inline(always)]
unsafe fn mac_copy(dst: *mut u16, src: *const u16) {
    let mut i = 0;
    while i < 3 {
        unsafe { dst.add(i).write_volatile(src.add(i).read()) };
        i += 1;
    }
}

/// The packet's IP length (header included), host order, as the FIB
/// helper's MTU check wants it.
#[inline(always)]
fn ip_len(ctx: &XdpContext, pkt: &Packet) -> Result<u16, Reason> {
    if pkt.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, pkt.l3)?;
        Ok(u16::from_be(unsafe { (*ip).tot_len }))
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, pkt.l3)?;
        Ok(u16::from_be(unsafe { (*ip).payload_len }).wrapping_add(size_of::<Ipv6Hdr>() as u16))
    }
}

/// Route the (already rewritten) packet: from the pinhole's cached next hop
/// when it is fresh and matches, else through `bpf_fib_lookup` (refilling
/// the cache on success). Writes the MACs and redirects, returning
/// `XDP_REDIRECT`. `now` is CLOCK_MONOTONIC_COARSE.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    t: &Target,
    ifindex: u32,
    state: *mut PinholeState,
    now: u64,
) -> Result<u32, Reason> {
    let len = ip_len(ctx, pkt)?;
    // SAFETY: `state` is a live PH_STATE element; the word is 8-aligned.
    let at_p = unsafe { &raw mut (*state).fib_at_ns };
    let at = unsafe { at_p.read_volatile() };
    if at > FIB_WRITING
        && now.wrapping_sub(at) < FIB_TTL_NS
        && unsafe { (*state).fib_in_ifindex } == ifindex
        && len <= unsafe { (*state).fib_len }
        && dst_eq(unsafe { &raw const (*state).fib_dst }, &t.dst)
    {
        let eth: *mut EthHdr = ptr_at(ctx, 0)?;
        let egress = unsafe {
            mac_copy(
                (&raw mut (*eth).dst).cast(),
                (&raw const (*state).fib_dmac).cast(),
            );
            mac_copy(
                (&raw mut (*eth).src).cast(),
                (&raw const (*state).fib_smac).cast(),
            );
            (*state).fib_ifindex
        };
        // Seqlock-style re-check: a writer sets FIB_WRITING before and the
        // new time after its stores, so an unchanged stamp means the
        // fields read above belong together. Otherwise do the lookup (it
        // rewrites the MACs).
        if unsafe { at_p.read_volatile() } == at {
            return TX_PORTS
                .redirect(egress, XDP_DROP as u64)
                .map_err(|_| Reason::DropNoTxPort);
        }
    }
    lookup(ctx, pkt, t, ifindex, len, state, at, now)
}

/// Two network-order addresses as two 64-bit words each.
#[inline(always)]
fn dst_eq(a: *const [u8; 16], b: &[u16; 8]) -> bool {
    // SAFETY: `a` is the 8-aligned `fib_dst` of a map value.
    let a = unsafe { *(a as *const [u64; 2]) };
    let b: [u64; 2] = unsafe { core::mem::transmute(*b) };
    a[0] == b[0] && a[1] == b[1]
}

/// Fill the pinhole's cache after a successful lookup. Only the CPU that
/// moves the stamp from the value it read to `FIB_WRITING` writes, so two
/// fillers never interleave; a loser just forwards with its own result.
#[inline(always)]
fn fill(
    state: *mut PinholeState,
    seen: u64,
    p: &FibParams,
    dst: &[u16; 8],
    ifindex: u32,
    len: u16,
    now: u64,
) {
    if seen == FIB_WRITING {
        return;
    }
    let at_p = unsafe { &raw mut (*state).fib_at_ns };
    let (_, won) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            at_p,
            seen,
            FIB_WRITING,
        )
    };
    if !won {
        return;
    }
    unsafe {
        let d: [u64; 2] = core::mem::transmute(*dst);
        let w = (&raw mut (*state).fib_dst).cast::<u64>();
        w.write_volatile(d[0]);
        w.add(1).write_volatile(d[1]);
        (&raw mut (*state).fib_ifindex).write_volatile(p.ifindex);
        (&raw mut (*state).fib_in_ifindex).write_volatile(ifindex);
        mac_copy(
            (&raw mut (*state).fib_dmac).cast(),
            (&raw const p.dmac).cast(),
        );
        mac_copy(
            (&raw mut (*state).fib_smac).cast(),
            (&raw const p.smac).cast(),
        );
        (&raw mut (*state).fib_len).write_volatile(len);
        // A coarse clock read right at boot could be <= FIB_WRITING.
        at_p.write_volatile(if now > FIB_WRITING {
            now
        } else {
            FIB_WRITING + 1
        });
    }
}

/// The full lookup: on success write the MACs, fill the cache and
/// redirect, returning `XDP_REDIRECT`. The ingress ifindex scopes the lookup
/// (its VRF/table), as for a packet the kernel would forward. `seen` is the
/// cache stamp read before.
#[expect(
    clippy::too_many_arguments,
    reason = "inlined hot path; a struct would only add copies"
)]
#[inline(always)]
fn lookup(
    ctx: &XdpContext,
    pkt: &Packet,
    t: &Target,
    ifindex: u32,
    len: u16,
    state: *mut PinholeState,
    seen: u64,
    now: u64,
) -> Result<u32, Reason> {
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
        // The helper wants the total length in host order (MTU check).
        p.__bindgen_anon_1.tot_len = len;
        p.__bindgen_anon_2.flowinfo = unsafe { (*ip).tos } as u32;
        p.__bindgen_anon_3.ipv6_src = [be32(&t.src[..2]), 0, 0, 0];
        p.__bindgen_anon_4.ipv6_dst = [be32(&t.dst[..2]), 0, 0, 0];
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, pkt.l3)?;
        p.family = AF_INET6;
        p.__bindgen_anon_1.tot_len = len;
        unsafe {
            // Traffic class and flow label, network order; the version
            // nibble is masked off (htonl(0x0fffffff) in memory order).
            p.__bindgen_anon_2.flowinfo = be32(&(*ip).vtc_flow) & 0xffff_ff0f;
        }
        p.__bindgen_anon_3.ipv6_src = [
            be32(&t.src[0..2]),
            be32(&t.src[2..4]),
            be32(&t.src[4..6]),
            be32(&t.src[6..8]),
        ];
        p.__bindgen_anon_4.ipv6_dst = [
            be32(&t.dst[0..2]),
            be32(&t.dst[2..4]),
            be32(&t.dst[4..6]),
            be32(&t.dst[6..8]),
        ];
    }
    // SAFETY: `p` is fully initialised and sized as the helper expects.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &raw mut *p, size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let eth: *mut EthHdr = ptr_at(ctx, 0)?;
        // smac/dmac sit at even offsets (52/58) of the params: copy them
        // as 16-bit words.
        unsafe {
            mac_copy((&raw mut (*eth).dst).cast(), (&raw const p.dmac).cast());
            mac_copy((&raw mut (*eth).src).cast(), (&raw const p.smac).cast());
        }
        fill(state, seen, p, &t.dst, ifindex, len, now);
        // A miss returns the low bits of the flags: XDP_DROP.
        TX_PORTS
            .redirect(p.ifindex, XDP_DROP as u64)
            .map_err(|_| Reason::DropNoTxPort)
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
            let _ = NEIGH_MISS.insert(
                key,
                &NeighMiss {
                    packets: 1,
                    last_ns: now,
                },
                0,
            );
        }
    }
}
