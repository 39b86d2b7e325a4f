//! The pinhole table: what a packet must look like to use the fast path and
//! how it is rewritten. Written only by the agent's map writer; read by the
//! XDP program. Runtime state the datapath writes (counters, latch) lives
//! apart from the rule so the agent can replace a rule atomically without
//! clobbering counters: for `PINHOLES` rules in a separate `PH_STATE` slot
//! (the rule is replaced with one `bpf_map_update_elem`), for `MATCH_DST`
//! rules on edge addresses in the one-cache-line `PH_DST` entry next to an
//! IPv4 copy of the rule, with two full rule copies in `PH_DST_COLD` (see
//! `DstEntry`).
//!
//! One rule describes one direction of one flow. Both media modes of
//! DESIGN.md §2 are sets of such rules:
//!
//! * relay, outside → inside: key `{role: external, match: dst, public:P}`,
//!   remote = peer, rewrite src → edge-int:Q and dst → client:C.
//! * relay, inside → outside: key `{role: internal, match: dst, edge-int:Q}`,
//!   remote = client:C, rewrite src → public:P and dst → peer.
//! * nat inbound (DNAT): key `{role: external, match: dst, public:P}`,
//!   remote = peer, rewrite dst → client:C.
//! * nat outbound (SNAT): key `{role: internal, match: src, client:C}`,
//!   remote = peer (the packet's destination), rewrite src → public:P.

use crate::Addr;

/// Which end of the packet the key's address/port is compared with.
pub const MATCH_DST: u8 = 0;
/// Key holds the packet's source (nat-mode SNAT of a client's flow).
pub const MATCH_SRC: u8 = 1;

/// Interface role: the inside (clients).
pub const ROLE_INTERNAL: u8 = 1;
/// Interface role: the outside (peers, public address).
pub const ROLE_EXTERNAL: u8 = 2;

/// Hash key of the `PINHOLES` map. 24 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PinholeKey {
    /// Matched address, network order (v4 in the first 4 bytes).
    pub addr: Addr,
    /// Matched port, network order.
    pub port: u16,
    /// `PROTO_UDP` or `PROTO_TCP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Role of the interface the packet arrives on (`ROLE_*`): a rule for
    /// the inside can never be hit by a packet arriving from outside.
    pub role: u8,
    /// `MATCH_DST` or `MATCH_SRC`.
    pub match_on: u8,
    /// Explicit padding; must be zero (hash keys compare all bytes).
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PinholeKey>() == 24);

/// Rule flag: rewrite the source address (and port if `new_src_port != 0`).
pub const RULE_REWRITE_SRC: u16 = 1 << 0;
/// Rule flag: rewrite the destination address (and port if `new_dst_port != 0`).
pub const RULE_REWRITE_DST: u16 = 1 << 1;
/// Rule flag: the remote is not fixed by signalling; the first packet's
/// remote end is latched once (DESIGN.md §2) and only it is accepted after.
pub const RULE_LATCH: u16 = 1 << 2;
/// Rule flag: accept any remote port (address still checked). For peers
/// that signal RTCP without `a=rtcp`; off unless the agent decides so.
pub const RULE_ANY_REMOTE_PORT: u16 = 1 << 3;
/// Rule flag: the destination is the opposite leg's remote; when that leg
/// (state slot `pair_slot`) has latched, send to the latched address/port
/// instead of `new_dst`/`new_dst_port`.
pub const RULE_DST_FOLLOWS_PAIR: u16 = 1 << 4;

/// Rule flag: the remote address is strict (must equal `remote_addr`) but
/// the remote port is learned once from the first packet and fixed after
/// (stored like a latch). For TCP media whose remote end connects from an
/// ephemeral port (RFC 4145 `a=setup:active`, MSRP offerers, RFC 4975
/// §8.1): signalling names the host but not the port.
pub const RULE_LATCH_PORT: u16 = 1 << 5;

/// Value of the `PINHOLES` map. 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PinholeRule {
    /// The other end of the packet that must match (the source for
    /// `MATCH_DST` rules, the destination for `MATCH_SRC` rules).
    pub remote_addr: Addr,
    /// New source address when `RULE_REWRITE_SRC`.
    pub new_src: Addr,
    /// New destination address when `RULE_REWRITE_DST`.
    pub new_dst: Addr,
    /// Remote port, network order.
    pub remote_port: u16,
    /// New source port, network order; 0 keeps the packet's.
    pub new_src_port: u16,
    /// New destination port, network order; 0 keeps the packet's.
    pub new_dst_port: u16,
    /// `RULE_*` bits.
    pub flags: u16,
    /// Index of this rule's `PinholeState` in `PH_STATE`.
    pub slot: u32,
    /// Index of the opposite direction's state (for `RULE_DST_FOLLOWS_PAIR`).
    pub pair_slot: u32,
}
const _: () = assert!(core::mem::size_of::<PinholeRule>() == 64);

/// Latch state: no packet has been latched yet.
pub const LATCH_NONE: u32 = 0;
/// Latch state: one CPU is writing the latched address (transient).
pub const LATCH_CLAIMING: u32 = 1;
/// Latch state: `latched_addr`/`latched_port` are valid and final.
pub const LATCH_DONE: u32 = 2;

/// Shift of the coarse clock (`bpf_ktime_get_coarse_ns`) into the 32-bit
/// time stamps of `FlowStats` (units of 2^20 ns, about 1.05 ms; a stamp
/// wraps after about 52 days, and the agent rebuilds the full time from
/// its own clock, see `FlowStats::last_seen_ns`).
pub const STAMP_SHIFT: u32 = 20;

/// What the datapath writes for one rule on every forwarded packet: its
/// counters, last-seen stamp and FIB cache. 40 bytes, so that with the
/// 24-byte head of a `DstEntry` a hit reads and writes one cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowStats {
    /// Packets forwarded through the rule.
    pub packets: u64,
    /// Bytes (L2 frame length as received) forwarded through the rule.
    pub bytes: u64,
    /// Coarse clock (CLOCK_MONOTONIC_COARSE) of the last forwarded packet
    /// `>> STAMP_SHIFT`, low bit forced to 1; 0 = never.
    pub last_seen: u32,
    /// FIB cache (datapath-private; zeroed with the rule): when it was
    /// filled, coarse clock `>> STAMP_SHIFT` (never 0 or 1 once filled);
    /// 0 = empty, `FIB_WRITING` = one CPU is filling it. Valid while
    /// younger than the datapath's refresh interval.
    pub fib_at: u32,
    /// The IPv4 destination the cached next hop is for (IPv6 rules keep
    /// theirs elsewhere: `PinholeState::fib_dst6`, or in a `DstEntry` the
    /// bytes of `rule`, which an IPv6 entry never uses).
    pub fib_dst4: [u8; 4],
    /// Egress ifindex the FIB chose (only ifindexes below `IFACE_SLOTS`
    /// are cached; the egress MAC is in `EGRESS_MAC[fib_ifindex]`).
    pub fib_ifindex: u16,
    /// Ingress ifindex the lookup was scoped to (its VRF/table).
    pub fib_in_ifindex: u16,
    /// Next-hop MAC (the frame's new destination).
    pub fib_dmac: [u8; 6],
    /// Largest IP length the FIB's MTU check passed for this entry, host
    /// order: a longer packet takes the full lookup (and its MTU check).
    pub fib_len: u16,
}
const _: () = assert!(core::mem::size_of::<FlowStats>() == 40);

/// `FlowStats::fib_at` while one CPU rewrites the cache entry.
pub const FIB_WRITING: u32 = 1;

/// Latch-once bookkeeping of one rule (DESIGN.md §2). 24 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LatchState {
    /// The latched remote address (valid when `latch_state == LATCH_DONE`).
    pub latched_addr: Addr,
    /// `LATCH_*`, changed only by compare-and-swap in the datapath.
    pub latch_state: u32,
    /// Latched remote port, network order.
    pub latched_port: u16,
    /// In `PH_STATE`: `SLOT_IN_USE` while a `PINHOLES` rule owns the slot,
    /// 0 when it is free, written only by the agent's map writer (under
    /// its lock). The datapath never changes it: its compare-and-swaps on
    /// the word holding `latch_state` keep bits 48..64. Lets a writer find
    /// a free slot by reading the mapped array instead of walking
    /// `PINHOLES`. Always 0 in `PH_DST_COLD`.
    pub slot_mark: u16,
}

/// `LatchState::slot_mark` of a `PH_STATE` slot a rule owns.
pub const SLOT_IN_USE: u16 = 0x5e11;
const _: () = assert!(core::mem::size_of::<LatchState>() == 24);

/// Value of the `PH_STATE` array: the state the datapath writes for one
/// `PINHOLES` rule. 80 bytes. The agent zeroes a slot before reusing it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PinholeState {
    /// Counters, last seen, FIB cache.
    pub stats: FlowStats,
    /// Latch.
    pub latch: LatchState,
    /// The IPv6 destination the cached next hop is for.
    pub fib_dst6: Addr,
}
const _: () = assert!(core::mem::size_of::<PinholeState>() == 80);

/// Slot ids with this bit set name a `PH_DST` entry (index in the low
/// bits); others a `PH_STATE` slot. `PinholeRule::slot`/`pair_slot` and
/// `pinhole del` use these ids.
pub const SLOT_DST: u32 = 1 << 31;

/// `DstEntry::ctl`: the entry holds a live rule.
pub const DST_VALID: u32 = 1 << 0;
/// `DstEntry::ctl`: the live rule is `DstCold::rules[1]` (else `rules[0]`).
pub const DST_SEL: u32 = 1 << 1;
/// `DstEntry::ctl`: a writer has claimed the free entry and is filling it
/// (not yet visible to the datapath).
pub const DST_CLAIMED: u32 = 1 << 2;
/// `DstEntry::ctl`: `DstEntry::rule` is a faithful IPv4 copy of the live
/// rule, so a hit needs nothing from `DstCold` (unless the rule latches or
/// follows its pair).
pub const DST_HOT: u32 = 1 << 3;
/// `DstEntry::ctl`: `DstCold::overflow` is non-zero (rules in `PINHOLES`
/// index this entry): a packet that misses the entry tries `PINHOLES`.
pub const DST_OVF: u32 = 1 << 4;
/// `DstEntry::ctl` bits 8..16: the rule's protocol; bits 16..24: its role.
pub const DST_CTL_PROTO_SHIFT: u32 = 8;
/// See `DST_CTL_PROTO_SHIFT`.
pub const DST_CTL_ROLE_SHIFT: u32 = 16;
/// `DstEntry::ctl` bits 24..32: a sequence number the agent steps with
/// every change of the live rule, so a reader that saw `ctl` change under
/// it (seqlock-style) never uses a torn hot copy.
pub const DST_CTL_SEQ_SHIFT: u32 = 24;
/// The `ctl` bits a packet's key must match (live, not claimed, protocol
/// and role).
pub const DST_CTL_KEY_MASK: u32 = DST_VALID | DST_CLAIMED | 0x00ff_ff00;

/// The live rule's match and rewrite fields as the IPv4 hit path reads
/// them (addresses as their 4 network-order bytes). 20 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HotRule {
    /// `RULE_*` bits.
    pub flags: u16,
    /// Remote port, network order.
    pub remote_port: u16,
    /// Remote address.
    pub remote4: [u8; 4],
    /// New source address.
    pub new_src4: [u8; 4],
    /// New destination address.
    pub new_dst4: [u8; 4],
    /// New source port, network order; 0 keeps the packet's.
    pub new_src_port: u16,
    /// New destination port, network order; 0 keeps the packet's.
    pub new_dst_port: u16,
}
const _: () = assert!(core::mem::size_of::<HotRule>() == 20);

impl HotRule {
    /// The hot copy of `rule` for a key of `family`: only IPv4 rules whose
    /// addresses are all IPv4 (an IPv4 rule carrying IPv6 bytes must reach
    /// the full rule and its `DropBadRule` check).
    pub fn of(family: u8, rule: &PinholeRule) -> Option<HotRule> {
        let v4 = |a: &Addr| -> Option<[u8; 4]> {
            if a[4..].iter().all(|b| *b == 0) {
                Some([a[0], a[1], a[2], a[3]])
            } else {
                None
            }
        };
        if family != crate::FAMILY_V4 {
            return None;
        }
        Some(HotRule {
            flags: rule.flags,
            remote_port: rule.remote_port,
            remote4: v4(&rule.remote_addr)?,
            new_src4: v4(&rule.new_src)?,
            new_dst4: v4(&rule.new_dst)?,
            new_src_port: rule.new_src_port,
            new_dst_port: rule.new_dst_port,
        })
    }
}

/// Value of the `PH_DST` array (mmapable): the hot line of a `MATCH_DST`
/// rule on an edge address and media port, stored at the index of its
/// address and port (see `EdgeList`). 64 bytes, one cache line: `ctl`, the
/// live rule's IPv4 match/rewrite fields and the counters and FIB cache
/// the hit writes. Everything else of the entry (both full rule copies,
/// latch, overflow count) is in `DstCold` at the
/// same index of `PH_DST_COLD`.
///
/// Written by the agent through a shared mapping, never as a whole value
/// while live: a rule is replaced by writing the idle copy of
/// `DstCold::rules`, flipping `DST_SEL` and clearing `DST_HOT` with one
/// 32-bit store (readers now use the full copy), rewriting `rule`, then
/// setting `DST_HOT` (each store also steps the sequence in `ctl`). A
/// reader of the hot copy reads `ctl`, the copy, then `ctl` again, and
/// uses the copy only if `ctl` did not move; so it sees either rule whole.
/// `stats` is only written by the datapath once the entry is published,
/// so replacing a rule keeps its counters. The stores are ordered (x86
/// TSO; the agent's stores are SeqCst).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DstEntry {
    /// `DST_VALID | DST_SEL | DST_CLAIMED | DST_HOT | DST_OVF`, protocol,
    /// role and sequence (see the `DST_CTL_*` shifts); 0 = free.
    pub ctl: u32,
    /// IPv4 copy of the live rule, valid while `DST_HOT` is set. An IPv6
    /// entry (never hot) keeps the IPv6 destination of its FIB cache in
    /// the first 16 bytes instead (datapath-private, zeroed on publish), so
    /// its hit reads this line and one rule line.
    pub rule: HotRule,
    /// Counters and FIB cache.
    pub stats: FlowStats,
}
const _: () = assert!(core::mem::size_of::<DstEntry>() == 64);
const _: () = assert!(core::mem::offset_of!(DstEntry, stats) == 24);

/// Value of the `PH_DST_COLD` array (mmapable), the cold part of the
/// `PH_DST` entry at the same index: read on a hit only for IPv6 rules
/// (one line: the live full copy), latching rules and rules that follow
/// their pair. 192 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DstCold {
    /// Latch (written by the datapath once the entry is published).
    pub latch: LatchState,
    /// Rules in `PINHOLES` whose key indexes this entry (another protocol
    /// or role on the same port, or a key whose entry was taken); mirrored
    /// by `DST_OVF` in the entry's `ctl`.
    pub overflow: u32,
    /// Explicit padding (to the rules' cache line).
    pub _pad: [u32; 9],
    /// The rule and its replacement copy; `DST_SEL` picks the live one.
    pub rules: [PinholeRule; 2],
}
const _: () = assert!(core::mem::size_of::<DstCold>() == 192);
const _: () = assert!(core::mem::offset_of!(DstCold, rules) == 64);
