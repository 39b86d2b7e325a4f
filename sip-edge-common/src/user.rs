//! Userspace-only helpers (feature `user`): aya `Pod` impls so the agent can
//! put these types in maps, and conversions to and from `std::net`.

extern crate std;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{
    Addr, EdgeAddrKey, IfaceConfig, NeighMiss, NeighMissKey, PinholeKey, PinholeRule, PinholeState,
    PortPolicy, Settings, FAMILY_V4, FAMILY_V6,
};

// SAFETY: every type is #[repr(C)], Copy, has explicit padding fields and no
// pointers, so any byte pattern the kernel hands back is a valid value.
unsafe impl aya::Pod for PinholeKey {}
unsafe impl aya::Pod for PinholeRule {}
unsafe impl aya::Pod for PinholeState {}
unsafe impl aya::Pod for IfaceConfig {}
unsafe impl aya::Pod for EdgeAddrKey {}
unsafe impl aya::Pod for crate::EdgeList {}
unsafe impl aya::Pod for crate::DstEntry {}
unsafe impl aya::Pod for crate::DstCold {}
unsafe impl aya::Pod for PortPolicy {}
unsafe impl aya::Pod for Settings {}
unsafe impl aya::Pod for NeighMissKey {}
unsafe impl aya::Pod for NeighMiss {}
unsafe impl aya::Pod for crate::BenchCfg {}

/// Encode an IP address as (family, 16 network-order bytes).
pub fn addr_from_ip(ip: IpAddr) -> (u8, Addr) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (FAMILY_V4, out)
        }
        IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
    }
}

/// Decode (family, bytes) back to an address; `None` for an unknown family.
pub fn ip_from_addr(family: u8, addr: &Addr) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

impl Default for PortPolicy {
    fn default() -> Self {
        PortPolicy::EMPTY
    }
}

impl crate::FlowStats {
    /// `last_seen` as CLOCK_MONOTONIC ns (0 = never), given the coarse
    /// clock `now_ns` read at about the same time: the stamp holds the
    /// clock's bits from `STAMP_SHIFT` up to 32 above it, so the full
    /// time is the latest one at or before `now_ns` with those bits
    /// (exact to one unit, about 1 ms, while the stamp is younger than
    /// its 52-day wrap).
    pub fn last_seen_ns(&self, now_ns: u64) -> u64 {
        stamp_ns(self.last_seen, now_ns)
    }
}

/// A 32-bit stamp (`FlowStats::last_seen`) as ns on the clock that reads
/// `now_ns`; 0 stays 0.
pub fn stamp_ns(stamp: u32, now_ns: u64) -> u64 {
    if stamp == 0 {
        return 0;
    }
    let now = now_ns >> crate::STAMP_SHIFT;
    let back = (now as u32).wrapping_sub(stamp) as u64;
    now.saturating_sub(back) << crate::STAMP_SHIFT
}
