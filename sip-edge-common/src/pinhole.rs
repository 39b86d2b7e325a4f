//! The pinhole table: what a packet must look like to use the fast path and
//! how it is rewritten. Written only by the agent's map writer; read by the
//! XDP program. Runtime state the datapath writes (counters, latch) lives
//! apart from the rule so the agent can replace a rule atomically without
//! clobbering counters: for `PINHOLES` rules in a separate `PH_STATE` slot
//! (the rule is replaced with one `bpf_map_update_elem`), for `MATCH_DST`
//! rules on edge addresses in the same `PH_DST` entry as the rule, next to
//! two rule copies (see `DstSlot`).
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

/// Value of the `PH_STATE` array: counters and latch state the datapath
/// writes for one rule. 96 bytes. The agent zeroes a slot before reusing it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PinholeState {
    /// Packets forwarded through the rule.
    pub packets: u64,
    /// Bytes (L2 frame length as received) forwarded through the rule.
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE: same epoch as
    /// CLOCK_MONOTONIC, one jiffy resolution) of the last forwarded packet; 0 = never.
    pub last_seen_ns: u64,
    /// The latched remote address (valid when `latch_state == LATCH_DONE`).
    pub latched_addr: Addr,
    /// `LATCH_*`, changed only by compare-and-swap in the datapath.
    pub latch_state: u32,
    /// Latched remote port, network order.
    pub latched_port: u16,
    /// Explicit padding.
    pub _pad: u16,
    /// FIB cache (datapath-private; zeroed with the slot): the next hop
    /// `bpf_fib_lookup` returned for `fib_dst`, so most packets of a flow
    /// skip the lookup. Valid while `fib_at_ns` (CLOCK_MONOTONIC_COARSE) is
    /// younger than the datapath's refresh interval; 0 = empty,
    /// `FIB_WRITING` = one CPU is filling it.
    pub fib_dst: Addr,
    /// When the cache was filled (coarse ns), or 0 / `FIB_WRITING`.
    pub fib_at_ns: u64,
    /// Egress ifindex the FIB chose.
    pub fib_ifindex: u32,
    /// Ingress ifindex the lookup was scoped to (its VRF/table).
    pub fib_in_ifindex: u32,
    /// Next-hop MAC (the frame's new destination).
    pub fib_dmac: [u8; 6],
    /// Egress MAC (the frame's new source).
    pub fib_smac: [u8; 6],
    /// Largest IP length the FIB's MTU check passed for this entry, host
    /// order: a longer packet takes the full lookup (and its MTU check).
    pub fib_len: u16,
    /// Explicit padding.
    pub _fib_pad: u16,
}
const _: () = assert!(core::mem::size_of::<PinholeState>() == 96);

/// `PinholeState::fib_at_ns` while one CPU rewrites the cache entry.
pub const FIB_WRITING: u64 = 1;

/// Slot ids with this bit set name a `PH_DST` entry (index in the low
/// bits); others a `PH_STATE` slot. `PinholeRule::slot`/`pair_slot` and
/// `pinhole del` use these ids.
pub const SLOT_DST: u32 = 1 << 31;

/// `DstSlot::ctl`: the entry holds a live rule.
pub const DST_VALID: u32 = 1 << 0;
/// `DstSlot::ctl`: the live rule is `rules[1]` (else `rules[0]`).
pub const DST_SEL: u32 = 1 << 1;
/// `DstSlot::ctl`: a writer has claimed the free entry and is filling it
/// (not yet visible to the datapath).
pub const DST_CLAIMED: u32 = 1 << 2;
/// `DstSlot::ctl` bits 8..16: the rule's protocol; bits 16..24: its role.
pub const DST_CTL_PROTO_SHIFT: u32 = 8;
/// See `DST_CTL_PROTO_SHIFT`.
pub const DST_CTL_ROLE_SHIFT: u32 = 16;

/// Value of the `PH_DST` array (mmapable, so each value is 256-byte
/// aligned in one page): a `MATCH_DST` rule on an edge address and media
/// port, stored at the index of its address and port (see `EdgeList`),
/// together with its state. One random flow touches one page and three
/// adjacent cache lines instead of a hash bucket, an element and a
/// separate `PH_STATE` slot.
///
/// Written by the agent through a shared mapping, never as a whole value
/// while live: a rule is replaced by writing the idle copy of `rules` and
/// then flipping `DST_SEL` in `ctl` with one 32-bit store, so a reader
/// sees either rule whole; `state` (counters, latch, FIB cache) is only
/// written by the datapath once the entry is published, so replacing a
/// rule keeps its counters and latch. A reader still on the old copy is
/// one packet's processing (under a microsecond); the agent replaces rules
/// on signalling (milliseconds apart), so it never rewrites a copy a reader
/// can still be in. The publish and flip stores are ordered after the
/// copies' stores (x86 TSO; the agent's stores are SeqCst). 256 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DstSlot {
    /// Counters, latch and FIB cache, as for a `PH_STATE` slot.
    pub state: PinholeState,
    /// `DST_VALID | DST_SEL | DST_CLAIMED`, protocol and role (see the
    /// `DST_CTL_*` shifts); 0 = free.
    pub ctl: u32,
    /// Rules in `PINHOLES` whose key indexes this entry (another protocol
    /// or role on the same port, or a key whose entry was taken): while
    /// non-zero, a packet that misses this entry tries `PINHOLES`.
    pub overflow: u32,
    /// Explicit padding.
    pub _pad: [u32; 6],
    /// The rule and its replacement copy; `DST_SEL` picks the live one.
    pub rules: [PinholeRule; 2],
}
const _: () = assert!(core::mem::size_of::<DstSlot>() == 256);
const _: () = assert!(core::mem::offset_of!(DstSlot, ctl) == 96);
const _: () = assert!(core::mem::offset_of!(DstSlot, rules) == 128);
