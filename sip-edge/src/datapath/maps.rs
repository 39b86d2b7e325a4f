//! The map writer: the only code in the agent that writes BPF maps. It opens
//! the datapath's maps either from a freshly loaded object or from their
//! pins (for the CLI, while an agent runs), writes the configuration maps,
//! installs/removes pinhole rules with their state slots, and reads counters.
//!
//! Where a rule goes: a `MATCH_DST` rule on an edge address and a port of
//! the media window takes its `PH_DST` entry (rule and state together,
//! written through a shared mapping of the map: claim with a
//! compare-and-swap, publish with one store, replace by flipping between
//! two rule copies); everything else (nat SNAT rules, keys whose entry is
//! taken or not indexed) goes to `PINHOLES` with a `PH_STATE` slot. Slot
//! ids with `SLOT_DST` set name `PH_DST` entries. `DST_PORTS` counts the
//! `MATCH_DST` rules per protocol and port with atomic adds.
//!
//! Handles on pinned maps (the agent's, the CLI's) change the pinhole
//! tables only under the pin directory's writer lock (`datapath::writer`,
//! which lists the races it closes) and re-read `EDGE_LIST` inside it; they
//! refuse pins of another map layout version (`datapath::layout`).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::{
    maps::{Array, DevMapHash, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray},
    Ebpf,
};
use serde::Serialize;
use sip_edge_common::{
    addr_from_ip, dst_port_index, ip_from_addr, map_names, DstCold, DstEntry, EdgeAddrKey,
    EdgeList, FlowStats, HotRule, IfaceConfig, LatchState, NeighMiss, NeighMissKey, PinholeKey,
    PinholeRule, PinholeState, PortPolicy, Reason, Settings, DST_CLAIMED, DST_CTL_KEY_MASK,
    DST_CTL_PROTO_SHIFT, DST_CTL_ROLE_SHIFT, DST_CTL_SEQ_SHIFT, DST_HOT, DST_OVF, DST_PORT_SLOTS,
    DST_SEL, DST_VALID, EDGE_LIST_V4, EDGE_LIST_V6, FAMILY_V4, FAMILY_V6, LATCH_DONE,
    MAP_LAYOUT_VERSION, MATCH_DST, PROTO_TCP, PROTO_UDP, ROLE_EXTERNAL, ROLE_INTERNAL, SLOT_DST,
    SLOT_IN_USE,
};

use super::{
    layout::{self, LayoutError},
    rules::{Flow, FlowError},
    writer::{WriterError, WriterGuard, WriterLock},
};

/// `BPF_NOEXIST`: insert only if the key is new.
const BPF_NOEXIST: u64 = 1;
/// `BPF_ANY`.
const BPF_ANY: u64 = 0;
/// `BPF_EXIST`: update only an existing key.
const BPF_EXIST: u64 = 2;

/// Errors of the map writer.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// A map is missing from the object or the pin directory.
    #[error("map {name} not found{}; is the agent running (`sip-edge run`) with this pin dir?", .pin_dir.as_ref().map(|d| format!(" under {}", d.display())).unwrap_or_default())]
    Missing {
        /// Map name.
        name: &'static str,
        /// Pin directory searched, if any.
        pin_dir: Option<PathBuf>,
    },
    /// Opening or converting a map failed.
    #[error("map {name}: {source}")]
    Open {
        /// Map name.
        name: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// A map operation failed.
    #[error("{op} on map {name} failed: {source}")]
    Op {
        /// What was attempted.
        op: &'static str,
        /// Map name.
        name: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// A devmap insert failed.
    #[error("adding ifindex {ifindex} to {name} failed: {source}")]
    TxPort {
        /// Map name.
        name: &'static str,
        /// The interface.
        ifindex: u32,
        /// aya's error.
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    /// The pinhole table has no free state slot (limits.max_pinholes reached).
    #[error("pinhole table full: all {capacity} slots in use (raise limits.max_pinholes)")]
    Full {
        /// Table size.
        capacity: u32,
    },
    /// A rule for the same key is already installed.
    #[error("a pinhole for {key} already exists")]
    Exists {
        /// Human form of the key.
        key: String,
    },
    /// The flow cannot be expressed.
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// The flow breaks the running datapath's policy (DESIGN.md §3).
    #[error("refused: {reason}")]
    Policy {
        /// Which rule is broken.
        reason: String,
    },
    /// Mapping a map into memory failed.
    #[error("mmap of map {name} failed: {source}; was it created by an older sip-edge without BPF_F_MMAPABLE? (stop the agent and remove the pins)")]
    Mmap {
        /// Map name.
        name: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// More edge addresses than `EDGE_ADDRS` holds.
    #[error("{count} edge addresses configured; the datapath holds at most {max}")]
    TooManyEdgeAddrs {
        /// Addresses configured.
        count: usize,
        /// Capacity.
        max: u32,
    },
    /// No rule uses the given slot.
    #[error("no pinhole with slot {slot}")]
    NoSuchSlot {
        /// The slot asked for.
        slot: u32,
    },
    /// Another rule owns the `PH_STATE` slot a raw rule names.
    #[error("PH_STATE slot {slot} is owned by another pinhole rule")]
    SlotInUse {
        /// The slot asked for.
        slot: u32,
    },
    /// The writer lock of the pin directory (`datapath::writer`).
    #[error(transparent)]
    Writer(#[from] WriterError),
    /// The pins have another map layout (`datapath::layout`).
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

fn op(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { op, name, source }
}

/// One installed rule with its runtime state, for listing.
#[derive(Clone, Debug, Serialize)]
pub struct PinholeEntry {
    /// State slot (the id `pinhole del` takes).
    pub slot: u32,
    /// Slot of the opposite direction.
    pub pair_slot: u32,
    /// "udp" / "tcp".
    pub proto: &'static str,
    /// "internal" / "external": where matching packets arrive.
    pub role: &'static str,
    /// "dst" / "src": which end of the packet `local` is compared with.
    pub match_on: &'static str,
    /// The matched address:port.
    pub local: String,
    /// The remote end that must match (signalled).
    pub remote: String,
    /// Source rewrite, if any.
    pub new_src: Option<String>,
    /// Destination rewrite, if any.
    pub new_dst: Option<String>,
    /// Raw RULE_* flags.
    pub flags: u16,
    /// Latched remote, once latched.
    pub latched: Option<String>,
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// CLOCK_MONOTONIC ns of the last packet; 0 = never.
    pub last_seen_ns: u64,
}

/// Reason counters summed over CPUs.
#[derive(Clone, Debug, Serialize)]
pub struct ReasonCount {
    /// Stable reason name.
    pub reason: &'static str,
    /// Packets.
    pub packets: u64,
}

/// Handles to every map of the datapath.
pub struct DatapathMaps {
    pinholes: HashMap<MapData, PinholeKey, PinholeRule>,
    state: StateTable,
    reasons: PerCpuArray<MapData, u64>,
    ifaces: Array<MapData, IfaceConfig>,
    ifaces_hi: HashMap<MapData, u32, IfaceConfig>,
    port_policy: PolicyTable,
    edge_addrs: HashMap<MapData, EdgeAddrKey, u32>,
    edge_list: Array<MapData, EdgeList>,
    dst_ports: DstPorts,
    dst: DstTable,
    /// `EDGE_LIST` as last read or written: the `PH_DST` layout.
    layout: EdgeList,
    settings: Array<MapData, Settings>,
    tx_ports: DevMapHash<MapData>,
    neigh_miss: HashMap<MapData, NeighMissKey, NeighMiss>,
    /// The pin directory's writer lock; `None` for maps nobody else can
    /// open (an object loaded without pins: tests, benchmarks).
    writer: Option<WriterLock>,
    /// `PINHOLES` key of each `PH_STATE` slot this handle installed or
    /// found at load: a rule is removed or replaced by slot, and finding
    /// its key by walking `PINHOLES` (a system call per rule) made every
    /// nat-mode hang-up cost O(calls). A hint, checked against the map
    /// before use (another writer may have changed the rule); a miss falls
    /// back to the walk.
    slot_keys: std::collections::HashMap<u32, PinholeKey>,
}

/// An mmapable ARRAY map whose values are `T`s, mapped shared into this
/// process.
struct Mapped<T> {
    /// Keeps the map alive.
    _map: MapData,
    /// Start of the mapping (page-aligned: value `i` at
    /// `i * size_of::<T>()`).
    base: *mut u8,
    /// Bytes mapped.
    len: usize,
    /// Entries.
    entries: u32,
    _values: std::marker::PhantomData<T>,
}

// SAFETY: the mapping is shared memory, accessed through atomics or
// volatile copies with the ordering documented at each use; the pointer is
// owned by this struct and unmapped once, on drop.
unsafe impl<T> Send for Mapped<T> {}

impl<T> Mapped<T> {
    /// Maps `map`, whose value size must be `size_of::<T>()`.
    fn new(name: &'static str, map: Map) -> Result<Self, MapsError> {
        let value_size = size_of::<T>() as u32;
        let Map::Array(data) = map else {
            return Err(MapsError::Open {
                name,
                source: MapError::InvalidMapType { map_type: 0 },
            });
        };
        let info = data
            .info()
            .map_err(|source| MapsError::Open { name, source })?;
        if info.value_size() != value_size {
            return Err(MapsError::Mmap {
                name,
                source: std::io::Error::other("unexpected value size"),
            });
        }
        let entries = info.max_entries();
        let len = (entries as usize * value_size as usize).max(1);
        // SAFETY: a fresh shared mapping of the map's data pages; the
        // kernel refuses (EINVAL) maps created without BPF_F_MMAPABLE.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MapsError::Mmap {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Mapped {
            _map: data,
            base: p.cast(),
            len,
            entries,
            _values: std::marker::PhantomData,
        })
    }

    /// Value `idx`; `None` past the end. A pointer into shared memory: the
    /// datapath may change the value at any time, so callers read and
    /// write it with atomics or volatile copies.
    fn at(&self, idx: u32) -> Option<*mut T> {
        // SAFETY: idx < entries, so the value lies inside the mapping;
        // aligned for `T` as every value type here has a size that is a
        // multiple of its alignment, from a page-aligned base.
        (idx < self.entries).then(|| unsafe { self.base.add(idx as usize * size_of::<T>()).cast() })
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

/// `PH_STATE`, mapped: the media layer reads every flow's counters each
/// second (idle expiry, forwarded-traffic metrics), and one `bpf()` lookup
/// per rule made that tick cost tens of milliseconds of the proxy's event
/// loop at tens of thousands of calls (issue #12, scale series). Reads and
/// the reset at install are plain memory accesses instead.
struct StateTable {
    map: Mapped<PinholeState>,
    /// Where the next free-slot search starts (see `free_slots`).
    cursor: std::cell::Cell<u32>,
}

impl StateTable {
    fn new(map: Map) -> Result<Self, MapsError> {
        Ok(StateTable {
            map: Mapped::new(map_names::PH_STATE, map)?,
            cursor: std::cell::Cell::new(0),
        })
    }

    fn len(&self) -> u32 {
        self.map.entries
    }

    fn at(&self, slot: u32) -> Option<*mut PinholeState> {
        self.map.at(slot)
    }

    /// The 64-bit word holding `latch_state`, `latched_port` and
    /// `slot_mark` of `slot`, which the datapath changes by compare-and-swap.
    fn latch_word(&self, slot: u32) -> Option<&AtomicU64> {
        let off = std::mem::offset_of!(PinholeState, latch)
            + std::mem::offset_of!(LatchState, latch_state);
        // SAFETY: inside the slot's value (bounds checked by `at`), 8-byte
        // aligned (asserted in sip-edge-common and the datapath), shared
        // with the datapath's atomics.
        self.at(slot)
            .map(|p| unsafe { &*p.cast::<u8>().add(off).cast::<AtomicU64>() })
    }

    /// Whether a rule owns `slot` (its `slot_mark`).
    fn in_use(&self, slot: u32) -> bool {
        self.latch_word(slot)
            .is_some_and(|w| (w.load(Ordering::Acquire) >> 48) as u16 == SLOT_IN_USE)
    }

    /// Up to `n` free slots, searched from where the last search stopped
    /// (a slot just freed is not reused at once), at most one pass over
    /// the array: memory reads only.
    fn free(&self, n: usize) -> Vec<u32> {
        let len = self.len();
        let mut out = Vec::with_capacity(n);
        if len == 0 {
            return out;
        }
        let start = self.cursor.get() % len;
        for i in 0..len {
            if out.len() == n {
                break;
            }
            let slot = (start + i) % len;
            if !self.in_use(slot) {
                out.push(slot);
            }
        }
        if let Some(last) = out.last() {
            self.cursor.set((last + 1) % len);
        }
        out
    }

    /// Sets or clears the mark of `slot` in place, leaving the latch bits
    /// as the datapath has them (start-up reconciliation, see `recount`).
    fn mark(&self, slot: u32, used: bool) {
        if let Some(w) = self.latch_word(slot) {
            let mark = if used {
                u64::from(SLOT_IN_USE) << 48
            } else {
                0
            };
            let _ = w.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some((v & 0x0000_ffff_ffff_ffff) | mark)
            });
        }
    }

    /// Packets and bytes of `slot` (`None` past the end).
    fn traffic(&self, slot: u32) -> Option<(u64, u64)> {
        let p = self.at(slot)?;
        // SAFETY: `at` checked the bounds; volatile reads of two aligned
        // u64s the datapath adds to atomically.
        Some(unsafe {
            let st = &raw const (*p).stats;
            (
                (&raw const (*st).packets).read_volatile(),
                (&raw const (*st).bytes).read_volatile(),
            )
        })
    }

    /// The state in `slot`; `None` past the end. The program updates the
    /// counters with atomic adds meanwhile: a copy may mix one packet's
    /// bytes with the previous packet count, which every reader tolerates.
    fn get(&self, slot: u32) -> Option<PinholeState> {
        // SAFETY: `at` checked the bounds; a volatile copy of plain data.
        self.at(slot).map(|p| unsafe { p.read_volatile() })
    }

    /// Fresh counters and latch state in `slot`, marked in use (`claim`)
    /// or free, visible before whatever the caller publishes next (the
    /// rule that points here).
    fn reset(&self, slot: u32, claim: bool) -> Result<(), MapsError> {
        let p = self.at(slot).ok_or(MapsError::NoSuchSlot { slot })?;
        let mut st = PinholeState::default();
        if claim {
            st.latch.slot_mark = SLOT_IN_USE;
        }
        // SAFETY: `at` checked the bounds; the slot belongs to no live rule
        // (installs pick a free slot, removals reset after unpublishing).
        unsafe { p.write_volatile(st) };
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }
}

/// `PORT_POLICY`, mapped: every install checks its edge ports against the
/// media ranges, and a lookup copied the whole 16 KiB bitmap out of the
/// kernel each time (a fifth of an install's cost); a bit is one load here.
struct PolicyTable(Mapped<PortPolicy>);

impl PolicyTable {
    fn word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: the mapping holds one 16 KiB `PortPolicy` (value size
        // checked by `Mapped::new`), 2 * PORT_BITMAP_WORDS aligned u64s;
        // callers pass i < 2 * PORT_BITMAP_WORDS.
        unsafe { &*self.0.base.cast::<AtomicU64>().add(i) }
    }

    /// Whether `port` is a media port.
    fn media(&self, port: u16) -> bool {
        let p = usize::from(port);
        (self.word(p >> 6).load(Ordering::Relaxed) >> (p & 63)) & 1 == 1
    }

    /// Stores `p` word by word: the datapath reads single words, each of
    /// which goes from its old to its new value at once (as with the map
    /// update system call, the whole bitmap is not replaced atomically).
    fn set(&self, p: &PortPolicy) {
        for (i, w) in p.media.iter().chain(p.pass.iter()).enumerate() {
            self.word(i).store(*w, Ordering::Relaxed);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

/// `DST_PORTS`: counts of `MATCH_DST` rules per (protocol, port), changed
/// with atomic adds so the agent and a concurrent CLI never lose each
/// other's updates.
struct DstPorts(Mapped<AtomicU64>);

impl DstPorts {
    fn new(map: Map) -> Result<Self, MapsError> {
        let m = Mapped::new(map_names::DST_PORTS, map)?;
        if m.entries != DST_PORT_SLOTS {
            return Err(MapsError::Mmap {
                name: map_names::DST_PORTS,
                source: std::io::Error::other("unexpected map size"),
            });
        }
        Ok(DstPorts(m))
    }

    fn at(&self, idx: u32) -> Option<&AtomicU64> {
        // SAFETY: a value inside the mapping (bounds checked by `at`),
        // valid while `self` lives; an `AtomicU64` has the layout of the
        // map's u64.
        self.0.at(idx).map(|p| unsafe { &*p })
    }

    fn counter(&self, key: &PinholeKey) -> Option<&AtomicU64> {
        (key.match_on == MATCH_DST)
            .then(|| self.at(dst_port_index(key.proto, u16::from_be(key.port))))
            .flatten()
    }

    /// Count a rule on `key` (before it becomes visible).
    fn add(&self, key: &PinholeKey) {
        if let Some(c) = self.counter(key) {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Uncount a rule on `key` (after it was removed).
    fn sub(&self, key: &PinholeKey) {
        if let Some(c) = self.counter(key) {
            // Never below zero: a count that is too high only costs a hash
            // lookup, one too low would hide a rule.
            let _ = c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1));
        }
    }

    /// Recount from the installed rules (agent start: the pins may come
    /// from a build that had no `DST_PORTS`).
    fn rebuild(&self, keys: &[PinholeKey]) {
        let mut counts = vec![0u64; DST_PORT_SLOTS as usize];
        for k in keys.iter().filter(|k| k.match_on == MATCH_DST) {
            counts[dst_port_index(k.proto, u16::from_be(k.port)) as usize] += 1;
        }
        for (i, n) in counts.into_iter().enumerate() {
            if let Some(c) = self.at(i as u32) {
                c.store(n, Ordering::SeqCst);
            }
        }
    }
}

/// `PH_DST` + `PH_DST_COLD` (see `DstEntry`): the agent claims a free
/// entry with a compare-and-swap on `ctl`, fills state and rule, then
/// publishes with one store; replaces a live rule by filling the idle full
/// copy, flipping `DST_SEL` with `DST_HOT` cleared, rewriting the hot copy
/// and setting `DST_HOT` again; removes by storing 0 (keeping `DST_OVF`).
struct DstTable {
    hot: Mapped<DstEntry>,
    cold: Mapped<DstCold>,
}

/// One step of the sequence in `ctl` (bits `DST_CTL_SEQ_SHIFT..`).
const SEQ_STEP: u32 = 1 << DST_CTL_SEQ_SHIFT;

impl DstTable {
    fn new(hot: Mapped<DstEntry>, cold: Mapped<DstCold>) -> Result<Self, MapsError> {
        if cold.entries != hot.entries {
            return Err(MapsError::Mmap {
                name: map_names::PH_DST_COLD,
                source: std::io::Error::other(format!(
                    "{} entries, {} has {}",
                    cold.entries,
                    map_names::PH_DST,
                    hot.entries
                )),
            });
        }
        Ok(DstTable { hot, cold })
    }

    fn entries(&self) -> u32 {
        self.hot.entries
    }

    fn entry(&self, idx: u32) -> Option<*mut DstEntry> {
        self.hot.at(idx)
    }

    fn cold(&self, idx: u32) -> Option<*mut DstCold> {
        self.cold.at(idx)
    }

    fn ctl(&self, idx: u32) -> Option<&AtomicU32> {
        // SAFETY: an aligned u32 inside a live entry of the mapping.
        self.entry(idx)
            .map(|e| unsafe { &*(&raw mut (*e).ctl).cast::<AtomicU32>() })
    }

    fn overflow(&self, idx: u32) -> Option<&AtomicU32> {
        // SAFETY: as for `ctl`.
        self.cold(idx)
            .map(|e| unsafe { &*(&raw mut (*e).overflow).cast::<AtomicU32>() })
    }

    /// Mirror entry `idx`'s overflow count `n` into its `DST_OVF` bit.
    fn mirror_ovf(&self, idx: u32, n: u32) {
        if let Some(c) = self.ctl(idx) {
            if n > 0 {
                c.fetch_or(DST_OVF, Ordering::SeqCst);
            } else {
                c.fetch_and(!DST_OVF, Ordering::SeqCst);
            }
        }
    }

    /// Count one more `PINHOLES` rule indexing entry `idx` (before it is
    /// inserted: the datapath then tries the hash on a miss).
    fn ovf_add(&self, idx: u32) {
        if let Some(o) = self.overflow(idx) {
            let n = o.fetch_add(1, Ordering::SeqCst).saturating_add(1);
            self.mirror_ovf(idx, n);
        }
    }

    /// Count one `PINHOLES` rule fewer (after it was removed); never below 0.
    fn ovf_sub(&self, idx: u32) {
        if let Some(o) = self.overflow(idx) {
            let n = o
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                .map_or(0, |v| v - 1);
            self.mirror_ovf(idx, n);
        }
    }

    /// Store a recounted overflow count.
    fn ovf_set(&self, idx: u32, n: u32) {
        if let Some(o) = self.overflow(idx) {
            // Raise the bit before a higher count can matter, drop it after.
            if n > 0 {
                self.mirror_ovf(idx, n);
            }
            o.store(n, Ordering::SeqCst);
            if n == 0 {
                self.mirror_ovf(idx, n);
            }
        }
    }

    /// Claim the free entry `idx` for `key`; false when it is taken.
    fn claim(&self, idx: u32, key: &PinholeKey) -> bool {
        self.ctl(idx).is_some_and(|c| {
            let cur = c.load(Ordering::SeqCst);
            cur & (DST_VALID | DST_CLAIMED) == 0
                && c.compare_exchange(
                    cur,
                    (cur & DST_OVF) | DST_CLAIMED | ctl_key(key),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
        })
    }

    /// Undo a claim that was never published.
    fn unclaim(&self, idx: u32) {
        if let Some(c) = self.ctl(idx) {
            let cur = c.load(Ordering::SeqCst);
            if cur & DST_CLAIMED != 0 && cur & DST_VALID == 0 {
                let _ = c.compare_exchange(cur, cur & DST_OVF, Ordering::SeqCst, Ordering::SeqCst);
            }
        }
    }

    /// Fill a claimed entry with fresh state and `rule`, then make it
    /// visible to the datapath.
    fn publish(&self, idx: u32, key: &PinholeKey, rule: &PinholeRule) {
        let (Some(e), Some(cold), Some(c)) = (self.entry(idx), self.cold(idx), self.ctl(idx))
        else {
            return;
        };
        let hot = HotRule::of(key.family, rule);
        // SAFETY: the entry is claimed by us and not visible yet; volatile
        // so the copies are not elided or merged across the publish below.
        unsafe {
            (&raw mut (*e).stats).write_volatile(FlowStats::default());
            (&raw mut (*e).rule).write_volatile(hot.unwrap_or_default());
            (&raw mut (*cold).latch).write_volatile(LatchState::default());
            (&raw mut (*cold).rules)
                .cast::<PinholeRule>()
                .write_volatile(*rule);
        }
        let cur = c.load(Ordering::SeqCst);
        let hot_bit = if hot.is_some() { DST_HOT } else { 0 };
        c.store(
            (cur & DST_OVF) | DST_VALID | hot_bit | ctl_key(key),
            Ordering::SeqCst,
        );
    }

    /// Replace the live rule of entry `idx` without a reader ever seeing a
    /// torn rule: write the idle full copy, flip `DST_SEL` with `DST_HOT`
    /// cleared (one store: readers now take the full copy), rewrite the
    /// hot copy, then set `DST_HOT` (a second store). Each store steps the
    /// sequence, so a reader that read the hot copy across either store
    /// sees `ctl` move and falls back to the full copy. State (counters,
    /// latch, FIB cache) is kept.
    fn replace(&self, idx: u32, family: u8, rule: &PinholeRule) -> bool {
        let (Some(e), Some(cold), Some(c)) = (self.entry(idx), self.cold(idx), self.ctl(idx))
        else {
            return false;
        };
        let cur = c.load(Ordering::SeqCst);
        if cur & DST_VALID == 0 {
            return false;
        }
        let idle = usize::from(cur & DST_SEL == 0);
        // SAFETY: the idle copy is not read by the datapath (it reads the
        // copy `DST_SEL` names, re-read per packet).
        unsafe {
            (&raw mut (*cold).rules)
                .cast::<PinholeRule>()
                .add(idle)
                .write_volatile(*rule);
        }
        let flipped = ((cur ^ DST_SEL) & !DST_HOT).wrapping_add(SEQ_STEP);
        if c.compare_exchange(cur, flipped, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        if let Some(hot) = HotRule::of(family, rule) {
            // SAFETY: no reader uses the hot copy while DST_HOT is clear.
            unsafe { (&raw mut (*e).rule).write_volatile(hot) };
            let _ = c.compare_exchange(
                flipped,
                (flipped | DST_HOT).wrapping_add(SEQ_STEP),
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        true
    }

    /// Remove the live rule of entry `idx` (its overflow bit stays).
    fn remove(&self, idx: u32) {
        if let Some(c) = self.ctl(idx) {
            c.fetch_and(DST_OVF, Ordering::SeqCst);
        }
    }

    /// Live rule and state of entry `idx`, with its `ctl`.
    /// Packets and bytes of entry `idx`, if it holds a live rule.
    fn traffic(&self, idx: u32) -> Option<(u64, u64)> {
        let e = self.entry(idx)?;
        if self.ctl(idx)?.load(Ordering::Acquire) & DST_VALID == 0 {
            return None;
        }
        // SAFETY: `entry` checked the bounds; volatile reads of two aligned
        // u64s the datapath adds to atomically.
        Some(unsafe {
            let st = &raw const (*e).stats;
            (
                (&raw const (*st).packets).read_volatile(),
                (&raw const (*st).bytes).read_volatile(),
            )
        })
    }

    fn read(&self, idx: u32) -> Option<(u32, PinholeRule, PinholeState)> {
        let (e, cold) = (self.entry(idx)?, self.cold(idx)?);
        let ctl = self.ctl(idx)?.load(Ordering::SeqCst);
        if ctl & DST_VALID == 0 {
            return None;
        }
        let sel = usize::from(ctl & DST_SEL != 0);
        // SAFETY: reads of a live entry; the counters may be mid-update,
        // which a listing tolerates.
        let (rule, state) = unsafe {
            (
                (&raw const (*cold).rules)
                    .cast::<PinholeRule>()
                    .add(sel)
                    .read_volatile(),
                PinholeState {
                    stats: (&raw const (*e).stats).read_volatile(),
                    latch: (&raw const (*cold).latch).read_volatile(),
                    // An IPv6 entry's FIB destination (see `DstEntry::rule`).
                    fib_dst6: (&raw const (*e).rule).cast::<[u8; 16]>().read_volatile(),
                },
            )
        };
        Some((ctl, rule, state))
    }
}

/// The key bits of `DstEntry::ctl` for `key`.
pub fn ctl_key(key: &PinholeKey) -> u32 {
    (key.proto as u32) << DST_CTL_PROTO_SHIFT | (key.role as u32) << DST_CTL_ROLE_SHIFT
}

/// The `PH_DST` index of a `MATCH_DST` key under layout `l` of a table
/// with `entries` entries; `None` when the key is not indexed there.
pub fn dst_index(l: &EdgeList, entries: u32, key: &PinholeKey) -> Option<u32> {
    if key.match_on != MATCH_DST || l.port_span == 0 {
        return None;
    }
    let a = &key.addr;
    let idx = if key.family == FAMILY_V4 {
        let w = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        l.v4[..(l.n4 as usize).min(EDGE_LIST_V4)]
            .iter()
            .position(|x| *x == w)? as u32
    } else {
        let w = v6_words(a);
        l.n4 + l.v6[..(l.n6 as usize).min(EDGE_LIST_V6)]
            .iter()
            .position(|x| *x == w)? as u32
    };
    let off = (u16::from_be(key.port) as u32).wrapping_sub(l.port_base);
    if idx >= l.indexed || off >= l.port_span {
        return None;
    }
    let i = idx.checked_mul(l.port_span)?.checked_add(off)?;
    (i < entries).then_some(i)
}

/// The key of `PH_DST` entry `idx` with `ctl` under layout `l`.
fn dst_key(l: &EdgeList, idx: u32, ctl: u32) -> Option<PinholeKey> {
    if l.port_span == 0 {
        return None;
    }
    let a = idx / l.port_span;
    let port = (l.port_base + idx % l.port_span) as u16;
    let (family, addr) = if a < l.n4 {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&l.v4.get(a as usize)?.to_ne_bytes());
        (FAMILY_V4, addr)
    } else {
        let w = l.v6.get((a - l.n4) as usize)?;
        let mut addr = [0u8; 16];
        addr[..8].copy_from_slice(&w[0].to_ne_bytes());
        addr[8..].copy_from_slice(&w[1].to_ne_bytes());
        (FAMILY_V6, addr)
    };
    Some(PinholeKey {
        addr,
        port: port.to_be(),
        proto: (ctl >> DST_CTL_PROTO_SHIFT) as u8,
        family,
        role: (ctl >> DST_CTL_ROLE_SHIFT) as u8,
        match_on: MATCH_DST,
        _pad: [0; 2],
    })
}

/// A v6 address as the two native words `EdgeList::v6` holds.
fn v6_words(a: &[u8; 16]) -> [u64; 2] {
    let mut w = [0u64; 2];
    for (i, chunk) in a.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        w[i] = u64::from_ne_bytes(b);
    }
    w
}

/// `EDGE_LIST` for `addrs`: the first addresses of each family inline,
/// `overflow` set when any did not fit; the `PH_DST` window spans every
/// media range, and as many inline addresses as `dst_entries` has rows for
/// are indexed.
pub fn edge_list(addrs: &[IpAddr], media_ports: &[(u16, u16)], dst_entries: u32) -> EdgeList {
    let mut l = EdgeList::default();
    let mut v6 = Vec::new();
    for ip in addrs {
        let (family, a) = addr_from_ip(*ip);
        if family == FAMILY_V4 {
            if (l.n4 as usize) < EDGE_LIST_V4 {
                l.v4[l.n4 as usize] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
                l.n4 += 1;
            } else {
                l.overflow = 1;
            }
        } else {
            v6.push(a);
        }
    }
    for a in v6 {
        if (l.n6 as usize) < EDGE_LIST_V6 {
            l.v6[l.n6 as usize] = v6_words(&a);
            l.n6 += 1;
        } else {
            l.overflow = 1;
        }
    }
    let lo = media_ports.iter().map(|r| r.0.min(r.1)).min();
    let hi = media_ports.iter().map(|r| r.0.max(r.1)).max();
    if let (Some(lo), Some(hi)) = (lo, hi) {
        l.port_base = lo as u32;
        l.port_span = hi as u32 - lo as u32 + 1;
        l.indexed = (l.n4 + l.n6).min(dst_entries / l.port_span);
    }
    l
}

/// An attached interface as the datapath knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathIface {
    /// Kernel ifindex.
    pub ifindex: u32,
    /// `ROLE_*`.
    pub role: u8,
}

/// Everything the configuration maps hold.
#[derive(Clone, Debug)]
pub struct DatapathSettings {
    /// Attached interfaces.
    pub ifaces: Vec<DatapathIface>,
    /// Edge-owned addresses.
    pub edge_addrs: Vec<IpAddr>,
    /// Media ports.
    pub media_ports: Vec<(u16, u16)>,
    /// Always-pass ports.
    pub pass_ports: Vec<u16>,
    /// `POLICY_*`.
    pub default_policy: u32,
}

/// Most `PH_DST` entries `DatapathSettings::dst_slots` asks for (64 MiB of
/// hot lines, 192 MiB of cold parts).
pub const MAX_DST_SLOTS: u32 = 1 << 20;

impl DatapathSettings {
    /// `PH_DST` entries that index every inline edge address's media
    /// window (at least 1, at most `MAX_DST_SLOTS`): the loader's size.
    pub fn dst_slots(&self) -> u32 {
        let l = edge_list(&self.edge_addrs, &self.media_ports, u32::MAX);
        (l.indexed.saturating_mul(l.port_span)).clamp(1, MAX_DST_SLOTS)
    }
}

fn conv<T>(name: &'static str, r: Result<T, MapError>) -> Result<T, MapsError> {
    r.map_err(|source| MapsError::Open { name, source })
}

impl DatapathMaps {
    /// Take the maps out of a loaded object (loaded without pins: nobody
    /// else writes them).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::from_ebpf_with(ebpf, None)
    }

    /// Take the maps out of an object loaded with its maps pinned under
    /// `pin_dir`: the recount and every later change happen under the pin
    /// directory's writer lock.
    pub fn from_ebpf_pinned(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Self, MapsError> {
        Self::from_ebpf_with(ebpf, Some(WriterLock::open(pin_dir)?))
    }

    fn from_ebpf_with(ebpf: &mut Ebpf, writer: Option<WriterLock>) -> Result<Self, MapsError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(MapsError::Missing {
                name,
                pin_dir: None,
            })
        };
        let mut maps = Self::from_maps(&mut take)?;
        maps.writer = writer;
        let _g = maps.begin()?;
        // Record the layout first thing (`datapath::layout`); the loader
        // checked that re-adopted pins carry this very version.
        let mut s = maps.settings.get(&0, 0).unwrap_or_default();
        if s.layout_version != MAP_LAYOUT_VERSION {
            s.layout_version = MAP_LAYOUT_VERSION;
            maps.settings
                .set(0, s, BPF_ANY)
                .map_err(op("update", map_names::SETTINGS))?;
        }
        maps.recount();
        Ok(maps)
    }

    /// Takes the writer lock (when the maps are pinned) and re-reads the
    /// `PH_DST` layout under it: the start of every change.
    fn begin(&mut self) -> Result<Option<WriterGuard>, MapsError> {
        let g = self.guard()?;
        self.layout = self.pinned_layout();
        Ok(g)
    }

    fn guard(&self) -> Result<Option<WriterGuard>, MapsError> {
        Ok(self.writer.as_ref().map(WriterLock::lock).transpose()?)
    }

    fn pinned_layout(&self) -> EdgeList {
        self.edge_list.get(&0, 0).unwrap_or_default()
    }

    /// Open the maps pinned under `dir` by a running (or kept) datapath,
    /// after checking their layout version.
    pub fn from_pins(dir: &Path) -> Result<Self, MapsError> {
        layout::check(dir)?;
        let writer = WriterLock::open(dir)?;
        let mut take = |name: &'static str| {
            let path = dir.join(name);
            if !path.exists() {
                return Err(MapsError::Missing {
                    name,
                    pin_dir: Some(dir.to_owned()),
                });
            }
            let data =
                MapData::from_pin(&path).map_err(|source| MapsError::Open { name, source })?;
            Map::from_map_data(data).map_err(|source| MapsError::Open { name, source })
        };
        let mut maps = Self::from_maps(&mut take)?;
        maps.writer = Some(writer);
        Ok(maps)
    }

    fn from_maps(
        take: &mut dyn FnMut(&'static str) -> Result<Map, MapsError>,
    ) -> Result<Self, MapsError> {
        use map_names::*;
        let mut m = DatapathMaps {
            pinholes: conv(PINHOLES, HashMap::try_from(take(PINHOLES)?))?,
            state: StateTable::new(take(PH_STATE)?)?,
            reasons: conv(REASONS, PerCpuArray::try_from(take(REASONS)?))?,
            ifaces: conv(IFACES, Array::try_from(take(IFACES)?))?,
            ifaces_hi: conv(IFACES_HI, HashMap::try_from(take(IFACES_HI)?))?,
            port_policy: PolicyTable(Mapped::new(PORT_POLICY, take(PORT_POLICY)?)?),
            edge_addrs: conv(EDGE_ADDRS, HashMap::try_from(take(EDGE_ADDRS)?))?,
            edge_list: conv(EDGE_LIST, Array::try_from(take(EDGE_LIST)?))?,
            dst_ports: DstPorts::new(take(DST_PORTS)?)?,
            dst: DstTable::new(
                Mapped::new(PH_DST, take(PH_DST)?)?,
                Mapped::new(PH_DST_COLD, take(PH_DST_COLD)?)?,
            )?,
            layout: EdgeList::default(),
            settings: conv(SETTINGS, Array::try_from(take(SETTINGS)?))?,
            tx_ports: conv(TX_PORTS, DevMapHash::try_from(take(TX_PORTS)?))?,
            neigh_miss: conv(NEIGH_MISS, HashMap::try_from(take(NEIGH_MISS)?))?,
            writer: None,
            slot_keys: std::collections::HashMap::new(),
        };
        m.layout = m.edge_list.get(&0, 0).unwrap_or_default();
        Ok(m)
    }

    /// Recount `DST_PORTS` and the `PH_DST` overflow counts from the
    /// installed rules. Done by the owner of a (re)loaded datapath:
    /// re-adopted pins may predate them or an interrupted writer may have
    /// left a count behind.
    fn recount(&mut self) {
        let rules: Vec<(PinholeKey, PinholeRule)> =
            self.pinholes.iter().filter_map(Result::ok).collect();
        self.slot_keys = rules.iter().map(|(k, r)| (r.slot, *k)).collect();
        // Slot marks: a writer interrupted between marking a slot and
        // inserting its rule (or between removing a rule and clearing the
        // mark) leaves one wrong; the rules are the truth.
        let owned: BTreeSet<u32> = rules.iter().map(|(_, r)| r.slot).collect();
        for slot in 0..self.state.len() {
            let used = owned.contains(&slot);
            if self.state.in_use(slot) != used {
                self.state.mark(slot, used);
            }
        }
        let mut keys: Vec<PinholeKey> = rules.into_iter().map(|(k, _)| k).collect();
        // Counted first, stored once per entry: a count never dips to 0
        // under a live PINHOLES rule while the datapath runs.
        let mut overflow = std::collections::HashMap::<u32, u32>::new();
        for k in &keys {
            if let Some(i) = dst_index(&self.layout, self.dst.entries(), k) {
                *overflow.entry(i).or_default() += 1;
            }
        }
        for idx in 0..self.dst.entries() {
            self.dst
                .ovf_set(idx, overflow.get(&idx).copied().unwrap_or(0));
        }
        for idx in 0..self.dst.entries() {
            if let Some((ctl, _, _)) = self.dst.read(idx) {
                keys.extend(dst_key(&self.layout, idx, ctl));
            }
        }
        self.dst_ports.rebuild(&keys);
    }

    /// Replace the configuration maps' contents with `s` (stale entries of
    /// an earlier configuration are removed).
    pub fn apply_settings(&mut self, s: &DatapathSettings) -> Result<(), MapsError> {
        use map_names::*;
        let _g = self.begin()?;
        let wanted = |k: u32| s.ifaces.iter().any(|i| i.ifindex == k);
        // IFACES is an array indexed by ifindex: "stale" is a non-zero role.
        let stale_lo: Vec<u32> = (0..self.ifaces.len())
            .filter(|k| !wanted(*k) && self.ifaces.get(k, 0).is_ok_and(|c| c.role != 0))
            .collect();
        let stale_hi: Vec<u32> = self
            .ifaces_hi
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted(*k))
            .collect();
        for k in stale_lo {
            self.ifaces
                .set(k, IfaceConfig::default(), BPF_ANY)
                .map_err(op("update", IFACES))?;
            // The devmap may lack it; a missing key is fine.
            let _ = self.tx_ports.remove(k);
        }
        for k in stale_hi {
            self.ifaces_hi.remove(&k).map_err(op("delete", IFACES_HI))?;
            let _ = self.tx_ports.remove(k);
        }
        for i in &s.ifaces {
            self.tx_ports
                .insert(i.ifindex, i.ifindex, None, BPF_ANY)
                .map_err(|source| MapsError::TxPort {
                    name: TX_PORTS,
                    ifindex: i.ifindex,
                    source,
                })?;
            let cfg = IfaceConfig {
                role: i.role,
                _pad: [0; 7],
            };
            if i.ifindex < self.ifaces.len() {
                self.ifaces
                    .set(i.ifindex, cfg, BPF_ANY)
                    .map_err(op("update", IFACES))?;
            } else {
                self.ifaces_hi
                    .insert(i.ifindex, cfg, BPF_ANY)
                    .map_err(op("update", IFACES_HI))?;
            }
        }
        let max = self.edge_addrs.map().info().map_or(64, |i| i.max_entries());
        if s.edge_addrs.len() > max as usize {
            return Err(MapsError::TooManyEdgeAddrs {
                count: s.edge_addrs.len(),
                max,
            });
        }
        let wanted: Vec<EdgeAddrKey> = s.edge_addrs.iter().map(|ip| edge_key(*ip)).collect();
        let stale: Vec<EdgeAddrKey> = self
            .edge_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for k in stale {
            self.edge_addrs
                .remove(&k)
                .map_err(op("delete", EDGE_ADDRS))?;
        }
        for k in wanted {
            self.edge_addrs
                .insert(k, 1, BPF_ANY)
                .map_err(op("update", EDGE_ADDRS))?;
        }
        // After EDGE_ADDRS: the list's overflow flag points the datapath there.
        let list = edge_list(&s.edge_addrs, &s.media_ports, self.dst.entries());
        if list != self.layout {
            // Another layout gives every PH_DST index another address and
            // port: rules indexed under the old one would answer for the
            // wrong key, so they go, and so do hash rules the overflow
            // counts point at (recounted below).
            let mut dropped = 0u32;
            for idx in 0..self.dst.entries() {
                if let Some((ctl, _, _)) = self.dst.read(idx) {
                    self.dst.remove(idx);
                    if let Some(k) = dst_key(&self.layout, idx, ctl) {
                        self.dst_ports.sub(&k);
                    }
                    dropped += 1;
                }
            }
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    "edge addresses or media ranges changed: pinholes indexed under the old layout were removed"
                );
            }
        }
        self.edge_list
            .set(0, list, BPF_ANY)
            .map_err(op("update", EDGE_LIST))?;
        self.layout = list;
        self.recount();
        let mut policy = PortPolicy::EMPTY;
        for (a, b) in &s.media_ports {
            for p in *a..=*b {
                PortPolicy::set(&mut policy.media, p);
            }
        }
        for p in &s.pass_ports {
            PortPolicy::set(&mut policy.pass, *p);
        }
        self.port_policy.set(&policy);
        self.settings
            .set(
                0,
                Settings {
                    default_policy: s.default_policy,
                    layout_version: MAP_LAYOUT_VERSION,
                },
                BPF_ANY,
            )
            .map_err(op("update", SETTINGS))?;
        Ok(())
    }

    /// Replace only the port policy (media and always-pass ports), as a
    /// reload of the media ranges does (`crate::service`): the PH_DST
    /// layout stays as at start, so no installed rule moves or goes; a
    /// rule on a port outside the layout's window lives in PINHOLES, where
    /// the datapath looks it up as for any unindexed key.
    pub fn set_port_policy(
        &mut self,
        media_ports: &[(u16, u16)],
        pass_ports: &[u16],
    ) -> Result<(), MapsError> {
        let mut policy = PortPolicy::EMPTY;
        for (a, b) in media_ports {
            for p in *a..=*b {
                PortPolicy::set(&mut policy.media, p);
            }
        }
        for p in pass_ports {
            PortPolicy::set(&mut policy.pass, *p);
        }
        self.port_policy.set(&policy);
        Ok(())
    }

    /// Capacity of the pinhole table.
    pub fn capacity(&self) -> u32 {
        self.state.len()
    }

    fn free_slots(&self, n: usize) -> Result<Vec<u32>, MapsError> {
        // Relay flows live in PH_DST entirely: no PH_STATE slot. The others
        // find theirs by the slot marks in the mapped PH_STATE, not by a
        // walk of PINHOLES: a walk is a system call per rule, which made
        // each nat-mode call set-up cost O(calls) (13 ms of CPU per call at
        // 16k held calls in the scale series).
        if n == 0 {
            return Ok(Vec::new());
        }
        let free = self.state.free(n);
        if free.len() < n {
            return Err(MapsError::Full {
                capacity: self.capacity(),
            });
        }
        Ok(free)
    }

    /// Check a flow against the running datapath's configuration: the
    /// edge-side addresses must be edge addresses and their ports media ports
    /// (DESIGN.md §3: pinholes only within configured ranges).
    pub fn check_policy(&self, flow: &Flow) -> Result<(), MapsError> {
        let mut edge_side = vec![flow.public()];
        if let Flow::Relay { edge_int, .. } = flow {
            edge_side.push(*edge_int);
        }
        for a in edge_side {
            if self.edge_addrs.get(&edge_key(a.ip()), 0).is_err() {
                return Err(MapsError::Policy {
                    reason: format!("{} is not an edge address of this datapath", a.ip()),
                });
            }
            if !self.port_policy.media(a.port()) {
                return Err(MapsError::Policy {
                    reason: format!(
                        "port {} of {a} is not in a configured media range",
                        a.port()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Install both rules of `flow` (after `check_policy`); returns the
    /// slot ids (inbound, outbound). A `MATCH_DST` rule takes the `PH_DST`
    /// entry of its key when that is free, anything else a `PH_STATE` slot.
    /// Nothing is left behind on failure.
    pub fn add_flow(&mut self, flow: &Flow) -> Result<(u32, u32), MapsError> {
        let _g = self.begin()?;
        self.check_policy(flow)?;
        let probe = flow.rules(0, 0)?;
        let keys = [probe.inbound.0, probe.outbound.0];
        let mut claimed: Vec<u32> = Vec::new();
        let mut ids = [None; 2];
        for (n, k) in keys.iter().enumerate() {
            if let Some(idx) = self.dst_index(k) {
                if self.dst.claim(idx, k) {
                    claimed.push(idx);
                    ids[n] = Some(SLOT_DST | idx);
                }
            }
        }
        let need = ids.iter().filter(|i| i.is_none()).count();
        let free = match self.free_slots(need) {
            Ok(f) => f,
            Err(e) => {
                claimed.iter().for_each(|i| self.dst.unclaim(*i));
                return Err(e);
            }
        };
        let mut free = free.into_iter();
        let s_in = ids[0].or_else(|| free.next()).unwrap_or(0);
        let s_out = ids[1].or_else(|| free.next()).unwrap_or(0);
        let pair = match flow.rules(s_in, s_out) {
            Ok(p) => p,
            Err(e) => {
                claimed.iter().for_each(|i| self.dst.unclaim(*i));
                return Err(e.into());
            }
        };
        if let Err(e) = self.install(pair.inbound.0, pair.inbound.1) {
            claimed.iter().for_each(|i| self.dst.unclaim(*i));
            return Err(e);
        }
        if let Err(e) = self.install(pair.outbound.0, pair.outbound.1) {
            // Roll back: a half flow must never stay installed.
            let _ = self.remove_one(s_in);
            claimed.iter().for_each(|i| self.dst.unclaim(*i));
            return Err(e);
        }
        Ok((s_in, s_out))
    }

    /// The `PH_DST` index of `key` under the current layout.
    fn dst_index(&self, key: &PinholeKey) -> Option<u32> {
        dst_index(&self.layout, self.dst.entries(), key)
    }

    /// Install one raw rule and return its slot id. A `MATCH_DST` key with a
    /// free `PH_DST` entry goes there (its `slot` becomes that entry's id,
    /// and a `pair_slot` equal to the old `slot` follows); anything else
    /// goes to `PINHOLES` with `rule.slot` as its `PH_STATE` slot, which
    /// must be free (see `free_slots`).
    pub fn insert_rule(
        &mut self,
        key: PinholeKey,
        mut rule: PinholeRule,
    ) -> Result<u32, MapsError> {
        let _g = self.begin()?;
        if let Some(idx) = self.dst_index(&key) {
            if self.dst.claim(idx, &key) {
                let id = SLOT_DST | idx;
                if rule.pair_slot == rule.slot {
                    rule.pair_slot = id;
                }
                rule.slot = id;
                if let Err(e) = self.install(key, rule) {
                    self.dst.unclaim(idx);
                    return Err(e);
                }
                return Ok(id);
            }
        }
        self.install(key, rule)?;
        Ok(rule.slot)
    }

    /// Write a rule whose slot id is decided (a claimed `PH_DST` entry or a
    /// free `PH_STATE` slot).
    fn install(&mut self, key: PinholeKey, rule: PinholeRule) -> Result<(), MapsError> {
        if rule.slot & SLOT_DST != 0 {
            let idx = rule.slot & !SLOT_DST;
            if self.dst_index(&key) != Some(idx) {
                return Err(MapsError::Policy {
                    reason: format!(
                        "slot {:#x} is not the entry of {}",
                        rule.slot,
                        describe_key(&key)
                    ),
                });
            }
            // The same key in PINHOLES (placed there while this entry was
            // taken) is the same pinhole: refuse, as BPF_NOEXIST would.
            // Every PINHOLES rule whose key has this entry counts in its
            // `overflow` (below, and `recount`), so a zero count, read
            // under the writer lock, means no such rule: the lookup (a
            // system call per rule, the most of an install) is skipped.
            let maybe_in_hash = self
                .dst
                .overflow(idx)
                .is_none_or(|o| o.load(Ordering::SeqCst) != 0);
            if maybe_in_hash && self.pinholes.get(&key, 0).is_ok() {
                return Err(MapsError::Exists {
                    key: describe_key(&key),
                });
            }
            // Counted before it becomes visible (the datapath skips the
            // lookup by destination on a zero count).
            self.dst_ports.add(&key);
            self.dst.publish(idx, &key, &rule);
            return Ok(());
        }
        if rule.slot >= self.capacity() {
            return Err(MapsError::Full {
                capacity: self.capacity(),
            });
        }
        // A live PH_DST entry with the same key is the same pinhole.
        let overflow = self.dst_index(&key);
        if let Some(idx) = overflow {
            if let Some((ctl, _, _)) = self.dst.read(idx) {
                if ctl & DST_CTL_KEY_MASK == DST_VALID | ctl_key(&key) {
                    return Err(MapsError::Exists {
                        key: describe_key(&key),
                    });
                }
            }
        }
        // A slot another rule owns would share its counters and latch,
        // and removing either would reset both.
        if self.state.in_use(rule.slot) {
            return Err(MapsError::SlotInUse { slot: rule.slot });
        }
        // Fresh counters and latch state, and the slot marked taken, before
        // the rule becomes visible.
        self.state.reset(rule.slot, true)?;
        // Counted before it becomes visible: DST_PORTS, and the overflow
        // count that sends misses of its PH_DST entry here.
        self.dst_ports.add(&key);
        if let Some(i) = overflow {
            self.dst.ovf_add(i);
        }
        let r = self.pinholes.insert(key, rule, BPF_NOEXIST);
        if r.is_err() {
            let _ = self.state.reset(rule.slot, false);
            self.dst_ports.sub(&key);
            if let Some(i) = overflow {
                self.dst.ovf_sub(i);
            }
        }
        match r {
            Ok(()) => {
                self.slot_keys.insert(rule.slot, key);
                Ok(())
            }
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Err(MapsError::Exists {
                    key: describe_key(&key),
                })
            }
            Err(source) => Err(MapsError::Op {
                op: "insert",
                name: map_names::PINHOLES,
                source,
            }),
        }
    }

    /// Replace the rule of slot id `slot` by `rule` (same key): atomically
    /// for readers, keeping its counters and latch state (a re-INVITE that
    /// changes the rewrite). `rule.slot` is set to `slot`.
    pub fn replace_rule(&mut self, slot: u32, mut rule: PinholeRule) -> Result<(), MapsError> {
        let _g = self.begin()?;
        rule.slot = slot;
        if slot & SLOT_DST != 0 {
            let idx = slot & !SLOT_DST;
            // The entry's family (its address in the layout) decides
            // whether the rule has an IPv4 hot copy.
            let family = self
                .dst
                .ctl(idx)
                .and_then(|c| dst_key(&self.layout, idx, c.load(Ordering::SeqCst)))
                .map_or(0, |k| k.family);
            return if self.dst.replace(idx, family, &rule) {
                Ok(())
            } else {
                Err(MapsError::NoSuchSlot { slot })
            };
        }
        let key = self
            .rules_of_slot(slot)
            .first()
            .map(|(k, _)| *k)
            .ok_or(MapsError::NoSuchSlot { slot })?;
        // A hash update swaps the element whole (RCU); PH_STATE is untouched.
        self.pinholes
            .insert(key, rule, BPF_EXIST)
            .map_err(op("update", map_names::PINHOLES))
    }

    /// The `PINHOLES` rule(s) owning `PH_STATE` slot `slot`: the cached key
    /// when the map still holds it with that slot, else a walk.
    fn rules_of_slot(&self, slot: u32) -> Vec<(PinholeKey, PinholeRule)> {
        if let Some(k) = self.slot_keys.get(&slot) {
            if let Ok(r) = self.pinholes.get(k, 0) {
                if r.slot == slot {
                    return vec![(*k, r)];
                }
            }
        }
        self.pinholes
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| r.slot == slot)
            .collect()
    }

    /// Remove the rule(s) with slot id `slot`; `Ok(None)` when none.
    /// Returns the pair slot of the removed rule.
    fn remove_one(&mut self, slot: u32) -> Result<Option<u32>, MapsError> {
        if slot & SLOT_DST != 0 {
            let idx = slot & !SLOT_DST;
            let Some((ctl, rule, _)) = self.dst.read(idx) else {
                return Ok(None);
            };
            self.dst.remove(idx);
            if let Some(k) = dst_key(&self.layout, idx, ctl) {
                self.dst_ports.sub(&k);
            }
            return Ok(Some(rule.pair_slot));
        }
        let entries = self.rules_of_slot(slot);
        let Some(pair) = entries.first().map(|(_, r)| r.pair_slot) else {
            return Ok(None);
        };
        self.slot_keys.remove(&slot);
        for (k, r) in &entries {
            self.pinholes
                .remove(k)
                .map_err(op("delete", map_names::PINHOLES))?;
            self.dst_ports.sub(k);
            if let Some(i) = self.dst_index(k) {
                self.dst.ovf_sub(i);
            }
            self.state.reset(r.slot, false)?;
        }
        Ok(Some(pair))
    }

    /// Remove every rule whose slot is `slot`; with `with_pair`, also the
    /// rule of its pair slot. Returns the slots removed.
    pub fn delete_slot(&mut self, slot: u32, with_pair: bool) -> Result<Vec<u32>, MapsError> {
        let _g = self.begin()?;
        let Some(pair) = self.remove_one(slot)? else {
            return Err(MapsError::NoSuchSlot { slot });
        };
        let mut slots = vec![slot];
        if with_pair && pair != slot && self.remove_one(pair)?.is_some() {
            slots.push(pair);
        }
        Ok(slots)
    }

    /// Every installed rule with its counters, sorted by slot.
    pub fn list(&self) -> Result<Vec<PinholeEntry>, MapsError> {
        // A consistent view: no writer is half way, and the layout is the
        // pinned one, not the one cached when this handle opened.
        let _g = self.guard()?;
        let layout = self.pinned_layout();
        let mut out = Vec::new();
        for item in self.pinholes.iter() {
            let (k, r) = item.map_err(op("iterate", map_names::PINHOLES))?;
            let st = self.state.get(r.slot).unwrap_or_default();
            out.push(entry(&k, &r, &st));
        }
        for idx in 0..self.dst.entries() {
            if let Some((ctl, r, st)) = self.dst.read(idx) {
                if let Some(k) = dst_key(&layout, idx, ctl) {
                    out.push(entry(&k, &r, &st));
                }
            }
        }
        out.sort_by_key(|e| e.slot);
        Ok(out)
    }

    /// The rule installed under `key`, if any: one read of its `PH_DST`
    /// entry or one `PINHOLES` lookup, not a walk (for pollers such as the
    /// benchmark's pinhole install timer).
    pub fn lookup(&self, key: &PinholeKey) -> Result<Option<PinholeEntry>, MapsError> {
        if let Some(idx) = self.dst_index(key) {
            if let Some((ctl, r, st)) = self.dst.read(idx) {
                if dst_key(&self.layout, idx, ctl).as_ref() == Some(key) {
                    return Ok(Some(entry(key, &r, &st)));
                }
            }
        }
        match self.pinholes.get(key, 0) {
            Ok(r) => {
                let st = self.state.get(r.slot).unwrap_or_default();
                Ok(Some(entry(key, &r, &st)))
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(op("lookup", map_names::PINHOLES)(e)),
        }
    }

    /// Packets forwarded by the rule in `slot` (a `PH_DST` entry id or a
    /// `PH_STATE` slot); `None` when nothing is installed there. O(1): the
    /// media layer's idle check reads its own slots, not the whole table.
    pub fn packets(&self, slot: u32) -> Result<Option<u64>, MapsError> {
        if slot & SLOT_DST != 0 {
            return Ok(self
                .dst
                .read(slot & !SLOT_DST)
                .map(|(_, _, st)| st.stats.packets));
        }
        Ok(self.state.get(slot).map(|st| st.stats.packets))
    }

    /// Packets and bytes of the rule in `slot` (`None`: no rule there):
    /// two loads from the mapped tables, for the media tick, which reads
    /// every flow each second.
    pub fn traffic(&self, slot: u32) -> Option<(u64, u64)> {
        if slot & SLOT_DST != 0 {
            self.dst.traffic(slot & !SLOT_DST)
        } else {
            self.state.traffic(slot)
        }
    }

    /// Packets, bytes and last-seen time (CLOCK_MONOTONIC ns, 0 = never)
    /// of the rule in `slot`, like [`DatapathMaps::packets`]: O(1), for the
    /// status queries and the forwarded-bytes metric.
    pub fn counters(&self, slot: u32) -> Result<Option<(u64, u64, u64)>, MapsError> {
        let st = if slot & SLOT_DST != 0 {
            self.dst.read(slot & !SLOT_DST).map(|(_, _, st)| st)
        } else {
            self.state.get(slot)
        };
        let now = coarse_now_ns();
        Ok(st.map(|st| (st.stats.packets, st.stats.bytes, st.stats.last_seen_ns(now))))
    }

    /// Per-reason packet counts summed over CPUs, in `Reason` order.
    pub fn reasons(&self) -> Result<Vec<ReasonCount>, MapsError> {
        Reason::ALL
            .iter()
            .map(|r| {
                let per_cpu = self
                    .reasons
                    .get(&(*r as u32), 0)
                    .map_err(op("lookup", map_names::REASONS))?;
                Ok(ReasonCount {
                    reason: r.name(),
                    packets: per_cpu.iter().sum(),
                })
            })
            .collect()
    }

    /// Next hops the datapath could not resolve, oldest first; each is
    /// removed from the map as it is returned (the caller resolves it).
    pub fn take_neigh_misses(&mut self) -> Result<Vec<(u32, IpAddr)>, MapsError> {
        let keys: Vec<NeighMissKey> = self.neigh_miss.keys().filter_map(Result::ok).collect();
        let mut out = Vec::new();
        for k in keys {
            let _ = self.neigh_miss.remove(&k);
            if let Some(ip) = ip_from_addr(k.family, &k.addr) {
                out.push((k.ifindex, ip));
            }
        }
        Ok(out)
    }
}

/// CLOCK_MONOTONIC_COARSE now (the clock the datapath stamps with), to
/// rebuild full times from its 32-bit stamps (`FlowStats::last_seen_ns`).
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn edge_key(ip: IpAddr) -> EdgeAddrKey {
    let (family, addr) = addr_from_ip(ip);
    EdgeAddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

fn sock(family: u8, addr: &[u8; 16], port_be: u16) -> String {
    match ip_from_addr(family, addr) {
        Some(ip) => SocketAddr::new(ip, u16::from_be(port_be)).to_string(),
        None => format!("<family {family}>"),
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_UDP => "udp",
        PROTO_TCP => "tcp",
        _ => "?",
    }
}

fn role_name(r: u8) -> &'static str {
    match r {
        ROLE_INTERNAL => "internal",
        ROLE_EXTERNAL => "external",
        _ => "?",
    }
}

/// `udp external dst 203.0.113.1:40000`.
pub fn describe_key(k: &PinholeKey) -> String {
    format!(
        "{} {} {} {}",
        proto_name(k.proto),
        role_name(k.role),
        if k.match_on == MATCH_DST {
            "dst"
        } else {
            "src"
        },
        sock(k.family, &k.addr, k.port)
    )
}

fn entry(k: &PinholeKey, r: &PinholeRule, st: &PinholeState) -> PinholeEntry {
    use sip_edge_common::{RULE_REWRITE_DST, RULE_REWRITE_SRC};
    let keep_port = |new: u16, what: &str| {
        if new == 0 {
            format!("{what}:*")
        } else {
            String::new()
        }
    };
    let rewrite = |flag: u16, a: &[u8; 16], p: u16| {
        (r.flags & flag != 0).then(|| {
            if p == 0 {
                keep_port(
                    p,
                    &ip_from_addr(k.family, a)
                        .map(|i| i.to_string())
                        .unwrap_or_default(),
                )
            } else {
                sock(k.family, a, p)
            }
        })
    };
    PinholeEntry {
        slot: r.slot,
        pair_slot: r.pair_slot,
        proto: proto_name(k.proto),
        role: role_name(k.role),
        match_on: if k.match_on == MATCH_DST {
            "dst"
        } else {
            "src"
        },
        local: sock(k.family, &k.addr, k.port),
        remote: sock(k.family, &r.remote_addr, r.remote_port),
        new_src: rewrite(RULE_REWRITE_SRC, &r.new_src, r.new_src_port),
        new_dst: rewrite(RULE_REWRITE_DST, &r.new_dst, r.new_dst_port),
        flags: r.flags,
        latched: (st.latch.latch_state == LATCH_DONE)
            .then(|| sock(k.family, &st.latch.latched_addr, st.latch.latched_port)),
        packets: st.stats.packets,
        bytes: st.stats.bytes,
        last_seen_ns: st.stats.last_seen_ns(coarse_now_ns()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sip_edge_common::{PROTO_UDP, ROLE_EXTERNAL};

    fn key(sa: &str) -> PinholeKey {
        let sa: SocketAddr = sa.parse().expect("test address");
        let (family, addr) = addr_from_ip(sa.ip());
        PinholeKey {
            addr,
            port: sa.port().to_be(),
            proto: PROTO_UDP,
            family,
            role: ROLE_EXTERNAL,
            match_on: MATCH_DST,
            _pad: [0; 2],
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().expect("test ip")).collect()
    }

    #[test]
    fn dst_index_round_trips_and_refuses_what_is_not_indexed() {
        let addrs = ips(&["10.77.0.1", "2001:db8:ff::1", "203.0.113.1"]);
        let l = edge_list(&addrs, &[(41000, 41999), (40000, 40099)], 3 * 2000);
        assert_eq!((l.n4, l.n6, l.port_base, l.port_span), (2, 1, 40000, 2000));
        assert_eq!(l.indexed, 3);
        let mut seen = BTreeSet::new();
        for sa in [
            "10.77.0.1:40000",
            "203.0.113.1:41999",
            "[2001:db8:ff::1]:40050",
        ] {
            let k = key(sa);
            let idx = dst_index(&l, 6000, &k).expect("indexed");
            assert!(seen.insert(idx), "{sa}: index {idx} reused");
            let ctl = DST_VALID | ctl_key(&k);
            assert_eq!(dst_key(&l, idx, ctl), Some(k), "{sa}");
        }
        // Outside the window, not an edge address, a source key, or past
        // the table: not indexed.
        assert_eq!(dst_index(&l, 6000, &key("10.77.0.1:39999")), None);
        assert_eq!(dst_index(&l, 6000, &key("10.77.0.1:42000")), None);
        assert_eq!(dst_index(&l, 6000, &key("10.77.0.9:40000")), None);
        let mut src = key("10.77.0.1:40000");
        src.match_on = sip_edge_common::MATCH_SRC;
        assert_eq!(dst_index(&l, 6000, &src), None);
        assert_eq!(dst_index(&l, 3999, &key("[2001:db8:ff::1]:40000")), None);
    }

    #[test]
    fn stamps_rebuild_the_coarse_time_across_a_wrap() {
        use sip_edge_common::{stamp_ns, STAMP_SHIFT};
        let unit = 1u64 << STAMP_SHIFT;
        // 3 s ago, stamped as the datapath does (low bit forced).
        let now = 100 * 1_000_000_000u64;
        let then = now - 3 * 1_000_000_000;
        let st = (then >> STAMP_SHIFT) as u32 | 1;
        let back = stamp_ns(st, now);
        assert!(back.abs_diff(then) < 2 * unit, "{back} vs {then}");
        // Across the 32-bit wrap of the stamp.
        let now = (1u64 << (32 + STAMP_SHIFT)) + 5 * unit;
        let then = now - 10 * unit;
        let back = stamp_ns((then >> STAMP_SHIFT) as u32, now);
        assert_eq!(back, (then >> STAMP_SHIFT) << STAMP_SHIFT);
        assert_eq!(stamp_ns(0, now), 0, "0 stays never");
    }

    #[test]
    fn only_all_ipv4_rules_get_a_hot_copy() {
        let mut r = PinholeRule {
            remote_addr: addr_from_ip("198.51.100.7".parse().expect("ip")).1,
            new_dst: addr_from_ip("10.77.0.2".parse().expect("ip")).1,
            remote_port: 5000u16.to_be(),
            new_dst_port: 4000u16.to_be(),
            flags: sip_edge_common::RULE_REWRITE_DST,
            ..PinholeRule::default()
        };
        let h = HotRule::of(FAMILY_V4, &r).expect("v4 rule");
        assert_eq!(
            (
                h.remote4,
                h.new_dst4,
                h.remote_port,
                h.new_dst_port,
                h.flags
            ),
            (
                [198, 51, 100, 7],
                [10, 77, 0, 2],
                r.remote_port,
                r.new_dst_port,
                r.flags
            )
        );
        assert_eq!(
            HotRule::of(FAMILY_V6, &r),
            None,
            "v6 keys use the full rule"
        );
        // A v4 rule carrying v6 bytes must reach the datapath's DropBadRule.
        r.new_src[8] = 1;
        assert_eq!(HotRule::of(FAMILY_V4, &r), None);
    }

    #[test]
    fn edge_list_overflows_instead_of_dropping_addresses() {
        let many: Vec<IpAddr> = (0..EDGE_LIST_V4 as u32 + 1)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0xcb00_7100 + i)))
            .collect();
        let l = edge_list(&many, &[(40000, 40999)], 1000 * 4);
        assert_eq!(l.n4 as usize, EDGE_LIST_V4);
        assert_eq!(l.overflow, 1);
        // Only as many addresses as the table has rows for are indexed.
        assert_eq!(l.indexed, 4);
        assert_eq!(dst_index(&l, 4000, &key("203.0.113.3:40000")), Some(3000));
        assert_eq!(dst_index(&l, 4000, &key("203.0.113.4:40000")), None);
        let none = edge_list(&many, &[], 1000);
        assert_eq!((none.port_span, none.indexed), (0, 0));
    }
}
