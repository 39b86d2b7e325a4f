//! Next hop of a rewritten packet: a per-pinhole cache of the last
//! `bpf_fib_lookup` result (in the rule's `FlowStats`: the hot line of its
//! `PH_DST` entry or its `PH_STATE` slot; egress MACs per interface in
//! `EGRESS_MAC`), else the lookup itself; MAC rewrite and redirect through `TX_PORTS`; a next hop without a
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
    Addr, FlowStats, NeighMiss, NeighMissKey, Reason, FAMILY_V4, FAMILY_V6, FIB_WRITING,
    IFACE_SLOTS, STAMP_SHIFT,
};

use crate::{
    maps::{EGRESS_MAC, NEIGH_MISS, TX_PORTS},
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
/// `FIB_TTL_NS` in `FlowStats` stamp units.
const FIB_TTL: u32 = (FIB_TTL_NS >> STAMP_SHIFT) as u32;

/// The 64-bit word of `FlowStats` holding `last_seen` (low half) and
/// `fib_at` (high half): the only atomic compare-and-swap this CPU target
/// has is 64 bits wide (see `pinhole.rs`), so the cache claim swaps the
/// pair, keeping `last_seen` as read.
const STAMP_WORD_OFF: usize = core::mem::offset_of!(FlowStats, last_seen);
const _: () = assert!(STAMP_WORD_OFF % 8 == 0);
const _: () = assert!(core::mem::offset_of!(FlowStats, fib_at) == STAMP_WORD_OFF + 4);
const _: () = assert!(core::mem::offset_of!(FlowStats, fib_dst4) % 4 == 0);
const _: () = assert!(core::mem::offset_of!(FlowStats, fib_ifindex) % 4 == 0);
const _: () = assert!(
    core::mem::offset_of!(FlowStats, fib_in_ifindex)
        == core::mem::offset_of!(FlowStats, fib_ifindex) + 2
);
const _: () = assert!(core::mem::offset_of!(FlowStats, fib_dmac) % 2 == 0);
const _: () = assert!(IFACE_SLOTS <= 65536, "cached ifindexes are 16 bits");
const _: () = assert!(FAMILY_V4 >> 1 & 1 == 0 && FAMILY_V6 >> 1 & 1 == 1);

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
/// `XDP_REDIRECT`. `now` is CLOCK_MONOTONIC_COARSE. `dst6` is where an
/// IPv6 rule's cached destination lives (outside the hot line).
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    t: &Target,
    ifindex: u32,
    stats: *mut FlowStats,
    dst6: *mut Addr,
    now: u64,
) -> Result<u32, Reason> {
    let len = ip_len(ctx, pkt)?;
    let now32 = (now >> STAMP_SHIFT) as u32;
    // SAFETY: `stats` is a live map value; the words are aligned (asserted).
    let at_p = unsafe { &raw mut (*stats).fib_at };
    let at = unsafe { at_p.read_volatile() };
    // Egress and ingress ifindex as one word (egress in the low half).
    let ifx = unsafe { ((&raw const (*stats).fib_ifindex) as *const u32).read_volatile() };
    // The egress MAC: one word per interface; 0 = not known (a fresh
    // map after a restart that kept the pinholes): full lookup.
    let egress = ifx & 0xffff;
    let fresh = at > FIB_WRITING
        && now32.wrapping_sub(at) < FIB_TTL
        && ifx >> 16 == ifindex
        && len <= unsafe { (*stats).fib_len }
        && dst_eq(pkt, stats, dst6, &t.dst);
    let smac = if fresh {
        EGRESS_MAC
            .get_ptr(&egress)
            .map_or(0, |m| unsafe { m.read_volatile() })
    } else {
        0
    };
    if smac != 0 {
        let eth: *mut EthHdr = ptr_at(ctx, 0)?;
        unsafe {
            mac_copy(
                (&raw mut (*eth).dst).cast(),
                (&raw const (*stats).fib_dmac).cast(),
            );
            let s = (&raw mut (*eth).src).cast::<u16>();
            s.write_volatile(smac as u16);
            s.add(1).write_volatile((smac >> 16) as u16);
            s.add(2).write_volatile((smac >> 32) as u16);
        }
        // Seqlock-style re-check: a writer sets FIB_WRITING before and the
        // new stamp after its stores, so an unchanged stamp means the
        // fields read above belong together. Otherwise do the lookup (it
        // rewrites the MACs).
        if unsafe { at_p.read_volatile() } == at {
            return TX_PORTS
                .redirect(egress, XDP_DROP as u64)
                .map_err(|_| Reason::DropNoTxPort);
        }
    }
    lookup(ctx, pkt, t, ifindex, len, stats, dst6, now32)
}

/// Whether the cache is for destination `dst`: the IPv4 address in the
/// hot line, an IPv6 one where `dst6` points. Without a branch on the
/// family (both places are always readable): a branch here would have the
/// verifier walk the whole FIB path once more per family.
#[inline(always)]
fn dst_eq(pkt: &Packet, stats: *const FlowStats, dst6: *const Addr, dst: &[u16; 8]) -> bool {
    // SAFETY: 4-aligned words of live map values.
    let d4 = unsafe { ((&raw const (*stats).fib_dst4) as *const u32).read_volatile() };
    let a = dst6 as *const u32;
    let w = |i: usize| unsafe { a.add(i).read_volatile() };
    let diff4 = d4 ^ be32(&dst[0..2]);
    let diff6 = (w(0) ^ be32(&dst[0..2]))
        | (w(1) ^ be32(&dst[2..4]))
        | (w(2) ^ be32(&dst[4..6]))
        | (w(3) ^ be32(&dst[6..8]));
    // FAMILY_V4 = 4 (0b100), FAMILY_V6 = 6 (0b110): bit 1 picks.
    let v6 = 0u32.wrapping_sub(((pkt.family >> 1) & 1) as u32);
    (diff4 & !v6) | (diff6 & v6) == 0
}

/// Fill the pinhole's cache after a successful lookup. Only the CPU that
/// moves the stamp from the value it read to `FIB_WRITING` writes, so two
/// fillers never interleave; a loser just forwards with its own result.
/// Interfaces past 16 bits (egress: past `IFACE_SLOTS`) are never used
/// from the cache (see the stores below).
#[expect(
    clippy::too_many_arguments,
    reason = "inlined hot path; a struct would only add copies"
)]
#[inline(always)]
fn fill(
    pkt: &Packet,
    stats: *mut FlowStats,
    dst6: *mut Addr,
    p: &FibParams,
    dst: &[u16; 8],
    ifindex: u32,
    len: u16,
    now32: u32,
) {
    let smac = unsafe {
        let m = (&raw const p.smac).cast::<u16>();
        (m.read() as u64) | (m.add(1).read() as u64) << 16 | (m.add(2).read() as u64) << 32
    };
    if let Some(m) = EGRESS_MAC.get_ptr_mut(&p.ifindex) {
        // One store per fill (once per flow per `FIB_TTL_NS`).
        unsafe { m.write_volatile(smac) };
    }
    let word = unsafe { (stats as *mut u8).add(STAMP_WORD_OFF) as *mut u64 };
    // The stamp as it is now (not as the cache check read it: nothing
    // from that check stays live into the lookup, so the verifier meets
    // one state here whichever condition sent the packet to the lookup).
    let cur = unsafe { word.read_volatile() };
    if (cur >> 32) as u32 == FIB_WRITING {
        return;
    }
    let (_, won) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            word,
            cur,
            (cur & 0xffff_ffff) | (FIB_WRITING as u64) << 32,
        )
    };
    if !won {
        return;
    }
    unsafe {
        // The IPv4 slot always (unused by IPv6 rules); the IPv6 one only
        // for IPv6 (for an IPv4 entry `dst6` is its hot rule).
        ((&raw mut (*stats).fib_dst4) as *mut u32).write_volatile(be32(&dst[..2]));
        if pkt.family == FAMILY_V6 {
            let w = dst6.cast::<u32>();
            w.write_volatile(be32(&dst[0..2]));
            w.add(1).write_volatile(be32(&dst[2..4]));
            w.add(2).write_volatile(be32(&dst[4..6]));
            w.add(3).write_volatile(be32(&dst[6..8]));
        }
        // Ifindexes are cached in 16 bits, without a branch (a branch on
        // them here had the verifier walk every path after it again: 6.1
        // past 10% of its budget). An ingress past 16 bits never matches
        // the cache check (it compares all 32); an egress past 16 bits
        // stores ingress 0, which no packet arrives on. An egress past
        // `IFACE_SLOTS` has no `EGRESS_MAC` entry, so it is never used
        // from the cache either.
        let big = p.ifindex >> 16;
        let fits = 1 - ((big | big.wrapping_neg()) >> 31);
        let ingress = (ifindex & 0xffff) * fits;
        ((&raw mut (*stats).fib_ifindex) as *mut u32)
            .write_volatile((p.ifindex & 0xffff) | ingress << 16);
        mac_copy(
            (&raw mut (*stats).fib_dmac).cast(),
            (&raw const p.dmac).cast(),
        );
        (&raw mut (*stats).fib_len).write_volatile(len);
        // A stamp of 0 or 1 (every 52 days) would read as empty/writing.
        (&raw mut (*stats).fib_at).write_volatile(if now32 > FIB_WRITING {
            now32
        } else {
            FIB_WRITING + 1
        });
    }
}

/// The full lookup: on success write the MACs, fill the cache and
/// redirect, returning `XDP_REDIRECT`. The ingress ifindex scopes the lookup
/// (its VRF/table), as for a packet the kernel would forward.
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
    stats: *mut FlowStats,
    dst6: *mut Addr,
    now32: u32,
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
        fill(pkt, stats, dst6, p, &t.dst, ifindex, len, now32);
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
