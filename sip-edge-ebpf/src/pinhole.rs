//! Pinhole lookup, remote check (strict or latch-once) and the rewrite
//! target of a hit. Reads `PH_DST` (rules by edge address and port, with
//! their state) and `PINHOLES` (written by the agent), and reads/writes the
//! rule's state (in its `PH_DST` entry or `PH_STATE` slot) with atomic
//! instructions.
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
    dst_port_index, PinholeKey, PinholeRule, PinholeState, Reason, DST_CTL_PROTO_SHIFT,
    DST_CTL_ROLE_SHIFT, DST_SEL, DST_VALID, LATCH_CLAIMING, LATCH_DONE, LATCH_NONE, MATCH_DST,
    MATCH_SRC, ROLE_INTERNAL, RULE_ANY_REMOTE_PORT, RULE_DST_FOLLOWS_PAIR, RULE_LATCH,
    RULE_LATCH_PORT, RULE_REWRITE_DST, RULE_REWRITE_SRC, SLOT_DST,
};

use crate::{
    count,
    maps::{DST_PORTS, PH_DST, PH_STATE, PINHOLES},
    parse::Packet,
    policy::{Dst, NO_SLOT},
    to_addr,
};

#[cfg(target_endian = "big")]
compile_error!("the latch word layout below assumes a little-endian BPF target (bpfel)");

/// Byte offset of the 64-bit word holding `latch_state` (low 32 bits),
/// `latched_port` (bits 32..48) and `_pad` in `PinholeState`.
const LATCH_WORD_OFF: usize = core::mem::offset_of!(PinholeState, latch_state);
const _: () = assert!(LATCH_WORD_OFF % 8 == 0);
const _: () = assert!(core::mem::offset_of!(PinholeState, latched_port) == LATCH_WORD_OFF + 4);

/// A matched rule and its state slot.
pub struct Hit {
    /// The rule (map value; the agent may replace it concurrently).
    pub rule: *const PinholeRule,
    /// The rule's `PH_STATE` slot.
    pub state: *mut PinholeState,
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
                let ctl = unsafe { (&raw const (*e).ctl).read_volatile() };
                let want = DST_VALID
                    | (pkt.proto as u32) << DST_CTL_PROTO_SHIFT
                    | (role as u32) << DST_CTL_ROLE_SHIFT;
                if ctl & !DST_SEL == want {
                    // A branch, not `rules.add(sel)`: the CPU predicts it
                    // (copy 0 unless the rule was replaced an odd number of
                    // times) and fetches the rule's cache line in parallel
                    // with `ctl`'s instead of after it.
                    let rules = unsafe { (&raw const (*e).rules).cast::<PinholeRule>() };
                    let rule = if ctl & DST_SEL == 0 {
                        rules
                    } else {
                        // SAFETY: index 1 of the two-element array.
                        unsafe { rules.add(1) }
                    };
                    return Ok(Some(Hit {
                        rule,
                        state: e.cast::<PinholeState>(),
                        match_src: false,
                    }));
                }
                try_hash = unsafe { (&raw const (*e).overflow).read_volatile() } != 0;
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

/// A `PINHOLES` rule with its state slot.
#[inline(always)]
fn hit(rule: *const PinholeRule, match_src: bool) -> Result<Hit, Reason> {
    let slot = unsafe { (*rule).slot };
    let state = state_ptr(slot).ok_or(Reason::DropBadRule)?;
    Ok(Hit {
        rule,
        state,
        match_src,
    })
}

/// The state of slot id `slot`: a `PH_DST` entry's (`SLOT_DST` set) or a
/// `PH_STATE` slot.
#[inline(always)]
fn state_ptr(slot: u32) -> Option<*mut PinholeState> {
    if slot & SLOT_DST != 0 {
        PH_DST
            .get_ptr_mut(&(slot & !SLOT_DST))
            .map(|e| e.cast::<PinholeState>())
    } else {
        PH_STATE.get_ptr_mut(&slot)
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

/// Two network-order addresses, compared as two 64-bit words.
#[inline(always)]
fn addr_eq(a: *const [u8; 16], b: &[u16; 8]) -> bool {
    // SAFETY: `a` points into a map value, whose address fields are 8-byte
    // aligned (offsets 0/16/32 of PinholeRule, 24 of PinholeState).
    let a = unsafe { *(a as *const [u64; 2]) };
    let b: [u64; 2] = unsafe { core::mem::transmute(*b) };
    a[0] == b[0] && a[1] == b[1]
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
    let flags = unsafe { (*rule).flags };
    let any_port = flags & RULE_ANY_REMOTE_PORT != 0;
    if flags & (RULE_LATCH | RULE_LATCH_PORT) == 0 {
        let ok = addr_eq(unsafe { &raw const (*rule).remote_addr }, raddr)
            && (any_port || unsafe { (*rule).remote_port } == rport);
        return if ok {
            Ok(())
        } else {
            Err(Reason::DropRemoteMismatch)
        };
    }
    // Port-only latch: the address stays strict; only the port is learned.
    if flags & RULE_LATCH == 0 && !addr_eq(unsafe { &raw const (*rule).remote_addr }, raddr) {
        return Err(Reason::DropRemoteMismatch);
    }
    latch(hit.state, raddr, rport, any_port)
}

/// Latch-once (DESIGN.md §2): the first packet claims the slot with a
/// compare-and-swap NONE→CLAIMING, stores its remote, then publishes DONE
/// with a second compare-and-swap (a full barrier, so a reader that sees
/// DONE also sees the address). Afterwards only that remote is accepted; the
/// latch never moves. A packet racing a claim in progress is dropped.
#[inline(always)]
fn latch(
    state: *mut PinholeState,
    raddr: &[u16; 8],
    rport: u16,
    any_port: bool,
) -> Result<(), Reason> {
    // SAFETY: `state` is a live PH_STATE element; the word is 8-byte aligned
    // (asserted above) and lies inside the value.
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
        let pair = unsafe { (*rule).pair_slot };
        if let Some(ps) = state_ptr(pair) {
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
/// (several CPUs may forward the same flow), last-seen time with a store.
/// `now` is CLOCK_MONOTONIC_COARSE (`bpf_ktime_get_coarse_ns`, one jiffy =
/// 1-10 ms resolution, a few ns cheaper than the fine clock per packet);
/// the agent's idle timeouts are seconds.
#[inline(always)]
pub fn account(state: *mut PinholeState, frame_len: u64, now: u64) {
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*state).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*state).bytes, frame_len);
        (&raw mut (*state).last_seen_ns).write_volatile(now);
    }
}
