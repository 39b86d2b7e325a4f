//! Pinhole lookup, remote check (strict or latch-once) and the rewrite
//! target of a hit. Reads `PH_DST` (one cache line per rule by edge
//! address and port: IPv4 rule copy and state), `PH_DST_COLD` (full rule
//! copies, latch) and `PINHOLES` (written by the agent), copies the hit's
//! rule into this CPU's `HIT_RULE` entry, and reads/writes the rule's state
//! (in its `PH_DST` line or `PH_STATE` slot) with atomic instructions.
//!
//! Atomics: the `bpfel-unknown-none` target has `atomic-cas = false` and
//! `min-atomic-width = 64`, so `core::sync::atomic` offers no
//! compare-exchange or fetch-add there (and no `AtomicU32` at all), and the
//! object is built for the default `generic` BPF CPU, where LLVM can select
//! a 64-bit `cmpxchg` and a non-fetching `lock add` but not a 32-bit
//! `cmpxchg` (that needs alu32 / `-mcpu=v3`) nor an atomic load (load-acquire
//! is `-mcpu=v4`). Hence the `core::intrinsics` cmpxchg/fetch-add on 64-bit
//! words and volatile 64-bit loads below.

use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering};

use sip_edge_common::{
    dst_port_index, Addr, DstEntry, FlowStats, LatchState, PinholeKey, PinholeRule, Reason,
    DST_CTL_KEY_MASK, DST_CTL_PROTO_SHIFT, DST_CTL_ROLE_SHIFT, DST_HOT, DST_OVF, DST_SEL,
    DST_VALID, LATCH_CLAIMING, LATCH_DONE, LATCH_NONE, MATCH_DST, MATCH_SRC, ROLE_INTERNAL,
    RULE_ANY_REMOTE_PORT, RULE_DST_FOLLOWS_PAIR, RULE_LATCH, RULE_LATCH_PORT, RULE_REWRITE_DST,
    RULE_REWRITE_SRC, SLOT_DST, STAMP_SHIFT,
};

use crate::{
    count,
    maps::{DST_PORTS, HIT_RULE, PH_DST, PH_DST_COLD, PH_STATE, PINHOLES},
    parse::Packet,
    policy::{Dst, NO_SLOT},
    to_addr,
};

#[cfg(target_endian = "big")]
compile_error!(
    "the latch and hot-rule word layouts below assume a little-endian BPF target (bpfel)"
);

/// Byte offset of the 64-bit word holding `latch_state` (low 32 bits),
/// `latched_port` (bits 32..48) and `slot_mark` (bits 48..64, the agent's,
/// kept by every compare-and-swap below) in `LatchState`.
const LATCH_WORD_OFF: usize = core::mem::offset_of!(LatchState, latch_state);
const _: () = assert!(LATCH_WORD_OFF % 8 == 0);
const _: () = assert!(core::mem::offset_of!(LatchState, latched_port) == LATCH_WORD_OFF + 4);
const _: () = assert!(core::mem::offset_of!(sip_edge_common::DstCold, latch) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(sip_edge_common::PinholeState, latch) % 8 == 0);

/// Byte offsets of the 32-bit words of `DstEntry::rule` the hit reads:
/// flags | remote_port, remote4, new_src4, new_dst4, new_src_port |
/// new_dst_port (all 4-aligned in the 64-byte entry).
const HOT_OFF: usize = core::mem::offset_of!(DstEntry, rule);
const _: () = assert!(HOT_OFF == 4);

/// The hit's copy of its rule in `HIT_RULE` (this CPU's scratch entry):
/// the live rule's fields taken once per packet, from the hot line of a
/// `PH_DST` entry (validated against `ctl`, see `DstEntry`) or from a full
/// rule, so every later step reads one consistent copy. A map value, not
/// the stack: the verifier does not track what a map value holds, so every
/// source of a rule reaches the rest of the hit in the same state (a
/// stack copy had 6.1 walk the hit once per source and value range, past
/// 10% of its budget), and the stack stays under its 512 bytes.
#[inline(always)]
fn scratch() -> Result<*mut PinholeRule, Reason> {
    HIT_RULE.get_ptr_mut(&0).ok_or(Reason::DropBadRule)
}

/// Copy a full rule into the scratch entry, 8 bytes at a time (volatile:
/// no `memcpy` call under -bpf-expand-memcpy-in-order).
#[inline(always)]
fn copy_rule(dst: *mut PinholeRule, src: *const PinholeRule) {
    let (d, s) = (dst.cast::<u64>(), src.cast::<u64>());
    let mut i = 0;
    while i < core::mem::size_of::<PinholeRule>() / 8 {
        // SAFETY: both are 8-aligned 64-byte map values.
        unsafe { d.add(i).write_volatile(s.add(i).read_volatile()) };
        i += 1;
    }
}

/// Copy the hot IPv4 rule of entry `e` into the scratch entry: five
/// 32-bit loads from the entry's one cache line, volatile so they stay
/// between the two reads of `ctl` that validate them.
#[inline(always)]
fn copy_hot(dst: *mut PinholeRule, e: *const DstEntry) {
    let w = |off: usize| -> u32 {
        // SAFETY: 4-aligned words inside the 64-byte map value.
        unsafe { ((e as *const u8).add(HOT_OFF + off) as *const u32).read_volatile() }
    };
    let (fp, r4, s4, d4, ports) = (w(0), w(4), w(8), w(12), w(16));
    let d = dst.cast::<u64>();
    // SAFETY: an 8-aligned 64-byte map value; the words are the rule's
    // addresses (IPv4 in the low 32 bits of the first word of each),
    // then ports and flags, then slot and pair slot.
    unsafe {
        d.write_volatile(r4 as u64);
        d.add(1).write_volatile(0);
        d.add(2).write_volatile(s4 as u64);
        d.add(3).write_volatile(0);
        d.add(4).write_volatile(d4 as u64);
        d.add(5).write_volatile(0);
        // remote_port, new_src_port, new_dst_port, flags (memory order).
        d.add(6).write_volatile(
            (fp >> 16) as u64 | (ports as u64 & 0xffff_ffff) << 16 | (fp as u64 & 0xffff) << 48,
        );
        d.add(7).write_volatile(0);
    }
}
const _: () = assert!(core::mem::offset_of!(PinholeRule, remote_port) == 48);
const _: () = assert!(core::mem::offset_of!(PinholeRule, new_src_port) == 50);
const _: () = assert!(core::mem::offset_of!(PinholeRule, new_dst_port) == 52);
const _: () = assert!(core::mem::offset_of!(PinholeRule, flags) == 54);
const _: () = assert!(core::mem::offset_of!(PinholeRule, pair_slot) == 60);

/// A matched rule and where its state lives.
pub struct Hit {
    /// The rule (this CPU's copy in `HIT_RULE`).
    pub rule: *const PinholeRule,
    /// Counters and FIB cache.
    pub stats: *mut FlowStats,
    /// Latch state (only touched by latching rules).
    pub latch: *mut LatchState,
    /// IPv6 destination of the FIB cache (only touched by IPv6 rules;
    /// 4-byte aligned).
    pub fib_dst6: *mut Addr,
    /// The rule matched the packet's source (`MATCH_SRC`).
    pub match_src: bool,
}

/// Look up the packet's pinhole: by destination (its `PH_DST` entry when
/// `d` has one, else `PINHOLES`), then (inside only) by source for
/// nat-mode SNAT rules. `Ok(None)` is a miss; a rule whose slot is outside
/// `PH_STATE` is `DropBadRule`.
#[inline(always)]
pub fn lookup(pkt: &Packet, role: u8, d: &Dst) -> Result<Option<Hit>, Reason> {
    let mut key = PinholeKey {
        addr: to_addr(&pkt.dst),
        port: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        role,
        match_on: MATCH_DST,
        _pad: [0; 2],
    };
    if dst_port_used(pkt) {
        let mut try_hash = true;
        if d.slot != NO_SLOT {
            try_hash = false;
            if let Some(e) = PH_DST.get_ptr_mut(&d.slot) {
                // SAFETY: a live PH_DST value; `ctl` is one aligned 32-bit
                // word the agent changes with single stores.
                let ctl_p = unsafe { &raw const (*e).ctl };
                let ctl = unsafe { ctl_p.read_volatile() };
                let want = DST_VALID
                    | (pkt.proto as u32) << DST_CTL_PROTO_SHIFT
                    | (role as u32) << DST_CTL_ROLE_SHIFT;
                if ctl & DST_CTL_KEY_MASK == want {
                    return dst_hit(e, d.slot, ctl_p, ctl).map(Some);
                }
                try_hash = ctl & DST_OVF != 0;
            }
        }
        if try_hash {
            if let Some(r) = PINHOLES.get_ptr(&key) {
                return hit(r, false).map(Some);
            }
        }
    }
    if role != ROLE_INTERNAL {
        return Ok(None);
    }
    key.addr = to_addr(&pkt.src);
    key.port = pkt.sport;
    key.match_on = MATCH_SRC;
    match PINHOLES.get_ptr(&key) {
        Some(r) => hit(r, true).map(Some),
        None => Ok(None),
    }
}

/// The hit of a live `PH_DST` entry whose `ctl` (read as `ctl`) matched:
/// the hot copy when `DST_HOT` is set and `ctl` did not move while it was
/// read, else the full copy `ctl` names in `PH_DST_COLD`. The cold entry's
/// address is only computed here (an inlined array lookup); its memory is
/// touched only by rules that need it.
#[inline(always)]
fn dst_hit(e: *mut DstEntry, idx: u32, ctl_p: *const u32, ctl: u32) -> Result<Hit, Reason> {
    let cold = PH_DST_COLD.get_ptr_mut(&idx).ok_or(Reason::DropBadRule)?;
    let rule = scratch()?;
    // SAFETY: `rules` is a two-element array in a live PH_DST_COLD value.
    let rules = unsafe { (&raw const (*cold).rules).cast::<PinholeRule>() };
    let hit = Hit {
        rule,
        // SAFETY: fields of live map values. An IPv6 entry is never hot:
        // its FIB destination lives in the hot rule's bytes (see
        // `DstEntry::rule`), in the line already read.
        stats: unsafe { &raw mut (*e).stats },
        latch: unsafe { &raw mut (*cold).latch },
        fib_dst6: unsafe { (&raw mut (*e).rule).cast::<Addr>() },
        match_src: false,
    };
    if ctl & DST_HOT != 0 {
        copy_hot(rule, e);
        // SAFETY: as for the first read of `ctl`.
        if unsafe { ctl_p.read_volatile() } == ctl {
            // SAFETY: the scratch entry and a live cold value.
            unsafe {
                if (*rule).flags & RULE_DST_FOLLOWS_PAIR != 0 {
                    // The pair slot is in the full copy `ctl` named (cold).
                    let sel = (ctl & DST_SEL != 0) as usize;
                    (*rule).pair_slot = (*rules.add(sel)).pair_slot;
                }
            }
            return Ok(hit);
        }
    }
    // The full copy `ctl` names now: the agent wrote it before flipping
    // `DST_SEL`, and never rewrites the live copy.
    let now = unsafe { ctl_p.read_volatile() };
    let sel = (now & DST_SEL != 0) as usize;
    // SAFETY: index 0 or 1 of the two-element array.
    copy_rule(rule, unsafe { rules.add(sel) });
    Ok(hit)
}

/// A `PINHOLES` rule with its state slot.
#[inline(always)]
fn hit(r: *const PinholeRule, match_src: bool) -> Result<Hit, Reason> {
    let slot = unsafe { (*r).slot };
    let (stats, latch, fib_dst6) = state_ptr(slot).ok_or(Reason::DropBadRule)?;
    let rule = scratch()?;
    copy_rule(rule, r);
    Ok(Hit {
        rule,
        stats,
        latch,
        fib_dst6,
        match_src,
    })
}

/// The `PH_STATE` slot of a `PINHOLES` rule (the agent never gives a
/// `PINHOLES` rule a `PH_DST` id: such a slot is out of range here, a
/// `DropBadRule`). One pointer kind per field keeps the verifier from
/// walking the rest of the hit once per kind.
#[inline(always)]
fn state_ptr(slot: u32) -> Option<(*mut FlowStats, *mut LatchState, *mut Addr)> {
    let s = PH_STATE.get_ptr_mut(&slot)?;
    // SAFETY: a live map value.
    unsafe {
        Some((
            &raw mut (*s).stats,
            &raw mut (*s).latch,
            &raw mut (*s).fib_dst6,
        ))
    }
}

/// The latch state of slot id `slot` (see `state_ptr`).
#[inline(always)]
fn latch_ptr(slot: u32) -> Option<*mut LatchState> {
    if slot & SLOT_DST != 0 {
        PH_DST_COLD
            .get_ptr_mut(&(slot & !SLOT_DST))
            .map(|c| unsafe { &raw mut (*c).latch })
    } else {
        PH_STATE
            .get_ptr_mut(&slot)
            .map(|s| unsafe { &raw mut (*s).latch })
    }
}

/// Whether any `MATCH_DST` rule uses the packet's protocol and destination
/// port (`DST_PORTS`); a missing entry counts as used.
#[inline(always)]
fn dst_port_used(pkt: &Packet) -> bool {
    let idx = dst_port_index(pkt.proto, u16::from_be(pkt.dport));
    match DST_PORTS.get_ptr(&idx) {
        // SAFETY: a live array value; the agent changes it with atomic adds.
        Some(n) => (unsafe { n.read_volatile() }) != 0,
        None => true,
    }
}

/// An address as two words against a packet's.
#[inline(always)]
fn words_eq(a: &[u64; 2], b: &[u16; 8]) -> bool {
    let b: [u64; 2] = unsafe { core::mem::transmute(*b) };
    a[0] == b[0] && a[1] == b[1]
}

/// Two network-order addresses, compared as two 64-bit words.
#[inline(always)]
fn addr_eq(a: *const [u8; 16], b: &[u16; 8]) -> bool {
    // SAFETY: `a` points into a map value, 8-byte aligned (offset 0 of
    // LatchState, itself 8-aligned in its value).
    let a = unsafe { *(a as *const [u64; 2]) };
    words_eq(&a, b)
}

/// Verdict step 2: the packet's remote end (its source for `MATCH_DST`, its
/// destination for `MATCH_SRC`) must be the rule's remote, or with
/// `RULE_LATCH` the latched one; an unlatched slot latches this packet's.
#[inline(always)]
pub fn check_remote(pkt: &Packet, hit: &Hit) -> Result<(), Reason> {
    let (raddr, rport) = if hit.match_src {
        (&pkt.dst, pkt.dport)
    } else {
        (&pkt.src, pkt.sport)
    };
    let rule = hit.rule;
    // SAFETY: this CPU's scratch copy of the rule.
    let flags = unsafe { (*rule).flags };
    let any_port = flags & RULE_ANY_REMOTE_PORT != 0;
    let remote = unsafe { &raw const (*rule).remote_addr };
    if flags & (RULE_LATCH | RULE_LATCH_PORT) == 0 {
        let ok = addr_eq(remote, raddr) && (any_port || unsafe { (*rule).remote_port } == rport);
        return if ok {
            Ok(())
        } else {
            Err(Reason::DropRemoteMismatch)
        };
    }
    // Port-only latch: the address stays strict; only the port is learned.
    if flags & RULE_LATCH == 0 && !addr_eq(remote, raddr) {
        return Err(Reason::DropRemoteMismatch);
    }
    latch(hit.latch, raddr, rport, any_port)
}

/// Latch-once (DESIGN.md §2): the first packet claims the slot with a
/// compare-and-swap NONE→CLAIMING, stores its remote, then publishes DONE
/// with a second compare-and-swap (a full barrier, so a reader that sees
/// DONE also sees the address). Afterwards only that remote is accepted; the
/// latch never moves. A packet racing a claim in progress is dropped.
#[inline(always)]
fn latch(
    state: *mut LatchState,
    raddr: &[u16; 8],
    rport: u16,
    any_port: bool,
) -> Result<(), Reason> {
    // SAFETY: `state` is a live latch in a map value; the word is 8-byte
    // aligned (asserted above) and lies inside the value.
    let word = unsafe { (state as *mut u8).add(LATCH_WORD_OFF) as *mut u64 };
    // A plain aligned 64-bit load is single-copy atomic; LLVM's BPF backend
    // cannot select an `atomic load` below -mcpu=v4 (load-acquire).
    let mut cur = unsafe { word.read_volatile() };
    if cur as u32 == LATCH_NONE {
        let claim = (cur & !0xffff_ffff) | LATCH_CLAIMING as u64;
        let (seen, won) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                word, cur, claim,
            )
        };
        if won {
            unsafe {
                (&raw mut (*state).latched_addr as *mut [u16; 8]).write(*raddr);
            }
            // The port goes in with DONE: bits 32..48 of the same word.
            let done = (cur & 0xffff_0000_0000_0000) | ((rport as u64) << 32) | LATCH_DONE as u64;
            unsafe {
                atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    word, claim, done,
                );
            }
            count(Reason::Latched);
            return Ok(());
        }
        cur = seen;
    }
    if cur as u32 != LATCH_DONE {
        // Another CPU is between its claim and its publish.
        return Err(Reason::DropRemoteMismatch);
    }
    let port = (cur >> 32) as u16;
    if addr_eq(unsafe { &raw const (*state).latched_addr }, raddr) && (any_port || port == rport) {
        Ok(())
    } else {
        Err(Reason::DropRemoteMismatch)
    }
}

/// Where a hit packet goes: addresses and ports after the rewrite.
pub struct Target {
    /// New source address (the packet's own when not rewritten).
    pub src: [u16; 8],
    /// New destination address.
    pub dst: [u16; 8],
    /// New source port, network order.
    pub sport: u16,
    /// New destination port, network order.
    pub dport: u16,
}

/// Verdict step 4 (the decision half): the addresses and ports a hit packet
/// is rewritten to. An IPv4 packet whose rule carries an IPv6 address
/// (non-zero bytes past the first four) is `DropBadRule`.
#[inline(always)]
pub fn target(pkt: &Packet, hit: &Hit) -> Result<Target, Reason> {
    let rule = hit.rule;
    // SAFETY: this CPU's scratch copy of the rule (8-aligned addresses).
    let flags = unsafe { (*rule).flags };
    let mut t = Target {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
    };
    if flags & RULE_REWRITE_SRC != 0 {
        t.src = unsafe { *(&raw const (*rule).new_src as *const [u16; 8]) };
        let p = unsafe { (*rule).new_src_port };
        if p != 0 {
            t.sport = p;
        }
    }
    if flags & RULE_REWRITE_DST != 0 {
        t.dst = unsafe { *(&raw const (*rule).new_dst as *const [u16; 8]) };
        let p = unsafe { (*rule).new_dst_port };
        if p != 0 {
            t.dport = p;
        }
    }
    if flags & RULE_DST_FOLLOWS_PAIR != 0 {
        if let Some(ps) = latch_ptr(unsafe { (*rule).pair_slot }) {
            let w =
                unsafe { ((ps as *const u8).add(LATCH_WORD_OFF) as *const u64).read_volatile() };
            if w as u32 == LATCH_DONE {
                t.dst = unsafe { *(&raw const (*ps).latched_addr as *const [u16; 8]) };
                t.dport = (w >> 32) as u16;
            }
        }
    }
    if pkt.family == sip_edge_common::FAMILY_V4 && (not_v4(&t.src) || not_v4(&t.dst)) {
        return Err(Reason::DropBadRule);
    }
    Ok(t)
}

/// Whether an address has bytes past the IPv4 part.
#[inline(always)]
fn not_v4(a: &[u16; 8]) -> bool {
    (a[2] | a[3] | a[4] | a[5] | a[6] | a[7]) != 0
}

/// Count a forwarded packet on its rule: packets and bytes with atomic adds
/// (several CPUs may forward the same flow), last-seen stamp with a store,
/// all in the line the hit already read. `now` is CLOCK_MONOTONIC_COARSE
/// (`bpf_ktime_get_coarse_ns`, one jiffy = 1-10 ms resolution, a few ns
/// cheaper than the fine clock per packet); the agent's idle timeouts are
/// seconds, and the stamp keeps about 1 ms of it (`STAMP_SHIFT`).
#[inline(always)]
pub fn account(stats: *mut FlowStats, frame_len: u64, now: u64) {
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*stats).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*stats).bytes, frame_len);
        (&raw mut (*stats).last_seen).write_volatile((now >> STAMP_SHIFT) as u32 | 1);
    }
}
