//! Edge port allocation: which edge address faces a side, the port pool of
//! each address family's ranges, and the blocks an m-line keeps across re-offers.

use super::*;

/// A set of ports as a 65,536-bit map (8 KiB): the pool's scans test one
/// bit per port and skip 64 taken ports at a time. With a `BTreeSet` each
/// test was a tree walk, and a scan across tens of thousands of held ports
/// made a call set-up cost milliseconds once the ranges were nearly full
/// (issue #12, scale series at 50k calls).
#[derive(Clone)]
pub(super) struct PortSet {
    words: Box<[u64; 1024]>,
    len: usize,
}

impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PortSet({} ports)", self.len)
    }
}

impl PortSet {
    pub(super) fn new() -> PortSet {
        PortSet {
            words: Box::new([0; 1024]),
            len: 0,
        }
    }

    pub(super) fn contains(&self, p: &u16) -> bool {
        self.words[usize::from(*p >> 6)] >> (p & 63) & 1 == 1
    }

    pub(super) fn insert(&mut self, p: u16) -> bool {
        let (w, bit) = (usize::from(p >> 6), 1u64 << (p & 63));
        let new = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.len += usize::from(new);
        new
    }

    pub(super) fn remove(&mut self, p: &u16) -> bool {
        let (w, bit) = (usize::from(*p >> 6), 1u64 << (p & 63));
        let had = self.words[w] & bit != 0;
        self.words[w] &= !bit;
        self.len -= usize::from(had);
        had
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The 64-port word holding `p`.
    fn word(&self, p: u16) -> u64 {
        self.words[usize::from(p >> 6)]
    }
}

impl Extend<u16> for PortSet {
    fn extend<I: IntoIterator<Item = u16>>(&mut self, it: I) {
        for p in it {
            self.insert(p);
        }
    }
}

impl FromIterator<u16> for PortSet {
    fn from_iter<I: IntoIterator<Item = u16>>(it: I) -> PortSet {
        let mut s = PortSet::new();
        s.extend(it);
        s
    }
}

impl PortPool {
    pub(super) fn usable(&self, p: u16) -> bool {
        p >= MIN_MEDIA_PORT && !self.reserved.contains(&p) && !self.used.contains(&p)
    }

    /// Whether the 64 ports from `p` (a multiple of 64) are all taken.
    fn word_full(&self, p: u16) -> bool {
        self.used.word(p) | self.reserved.word(p) == u64::MAX
    }

    /// A single port, or for `pair` an even port with its odd neighbour
    /// (RFC 3550 §11), else any two free ports: the SDP rewrite then names
    /// the RTCP port in `a=rtcp` (RFC 3605). Without the fallback, the odd
    /// ports that muxed calls give back (`commit`) could never be used by
    /// the next mux offer, which still needs a spare RTCP port.
    pub(super) fn take(&mut self, pair: bool) -> Option<(u16, Option<u16>)> {
        if let Some(t) = self.take_from_cursor(pair) {
            return Some(t);
        }
        if !pair {
            return None;
        }
        let rtp = self.take_from_cursor(false)?.0;
        match self.take_from_cursor(false) {
            Some((rtcp, _)) => Some((rtp, Some(rtcp))),
            None => {
                self.used.remove(&rtp);
                None
            }
        }
    }

    fn take_from_cursor(&mut self, pair: bool) -> Option<(u16, Option<u16>)> {
        let mut candidates: Vec<(u16, u16)> =
            self.ranges.iter().map(|r| (r.start, r.end)).collect();
        candidates.sort_unstable();
        // Two passes: from the cursor to the end, then from the start.
        for pass in 0..2 {
            for &(start, end) in &candidates {
                let from = if pass == 0 {
                    start.max(self.cursor)
                } else {
                    start
                };
                let to = if pass == 0 {
                    end
                } else {
                    end.min(self.cursor.saturating_sub(1))
                };
                if from > to {
                    continue;
                }
                let mut p = from;
                loop {
                    if p.is_multiple_of(64) && to - p >= 63 && self.word_full(p) {
                        if to - p == 63 {
                            break;
                        }
                        p += 64;
                        continue;
                    }
                    if pair {
                        if p.is_multiple_of(2) && p < to && self.usable(p) && self.usable(p + 1) {
                            self.used.insert(p);
                            self.used.insert(p + 1);
                            self.cursor = p.saturating_add(2);
                            return Some((p, Some(p + 1)));
                        }
                    } else if self.usable(p) {
                        self.used.insert(p);
                        self.cursor = p.saturating_add(1);
                        return Some((p, None));
                    }
                    if p >= to {
                        break;
                    }
                    p += 1;
                }
            }
        }
        None
    }

    pub(super) fn free(&mut self, b: &Block) {
        self.used.remove(&b.port);
        if let Some(r) = b.rtcp {
            self.used.remove(&r);
        }
    }

    pub(super) fn retake(&mut self, b: &Block) {
        self.used.insert(b.port);
        if let Some(r) = b.rtcp {
            self.used.insert(r);
        }
    }
}

impl Manager {
    pub(super) fn edge_addr(&self, facing: Side, like: IpAddr) -> Result<IpAddr, MediaError> {
        let list = match facing {
            Side::Internal => &self.s.internal_addrs,
            Side::External => &self.s.public_addrs,
        };
        list.iter()
            .copied()
            .find(|a| a.is_ipv4() == like.is_ipv4())
            .ok_or_else(|| {
                not_acceptable(format!(
                    "no {} edge address on the {} side for media at {like}",
                    if like.is_ipv4() { "IPv4" } else { "IPv6" },
                    if facing == Side::Internal {
                        "internal"
                    } else {
                        "public"
                    }
                ))
            })
    }

    /// Edge blocks for the streams of an SDP about to be rewritten.
    pub(super) fn allocate(
        &mut self,
        inp: &SdpInput<'_>,
        j: &mut Journal,
    ) -> Result<Vec<Option<Allocation>>, MediaError> {
        let facing = inp.from_side.other();
        // Nat rewrites only the internal party's SDP (DESIGN.md §2).
        let rewrite = self.s.mode == MediaMode::Relay || inp.from_side == Side::Internal;
        let mut out = Vec::with_capacity(inp.streams.len());
        for (i, st) in inp.streams.iter().enumerate() {
            let Some(rtp) = st.rtp else {
                out.push(None);
                continue;
            };
            if !rewrite {
                // nat: an outside remote user's SDP is rewritten only to
                // name its own signalling address (already substituted in
                // `rtp`), so the inside sends where the pinhole expects.
                out.push((inp.far_media == FarMedia::RemoteUser).then(|| Allocation {
                    addr: rtp.ip(),
                    port: rtp.port(),
                    rtcp_port: st.rtcp.map(|r| r.port()),
                }));
                continue;
            }
            let addr = self.edge_addr(facing, rtp.ip())?;
            // A mux offer may be declined (RFC 5761 §5.1.3): RTCP then
            // needs its port, so a mux stream keeps a pair too.
            let need_rtcp = st.rtcp.is_some() || (st.rtcp_mux && st.proto == Proto::Udp);
            let Some(d) = self.dialogs.get_mut(inp.dialog) else {
                return Err(not_acceptable("dialog vanished"));
            };
            if d.slots.len() <= i {
                d.slots.resize(i + 1, None);
            }
            let compatible = d.slots[i]
                .as_ref()
                .is_some_and(|s| s.proto == st.proto && (s.rtcp || !need_rtcp));
            if !compatible {
                // RFC 3264 §8.1: a new stream may take a port-0 slot; its old
                // ports go when the exchange completes.
                if let Some(old) = d.slots[i].take() {
                    d.retired.extend(old.blocks.into_iter().flatten());
                }
                d.slots[i] = Some(Slot {
                    proto: st.proto,
                    rtcp: need_rtcp,
                    blocks: [None, None],
                });
            }
            let existing = d.slots[i].as_ref().and_then(|s| s.blocks[side_ix(facing)]);
            // A block whose RTCP port went back after an accepted mux
            // serves a mux re-offer; one without mux needs a pair again.
            let block = match existing {
                Some(b) if b.addr == addr && (b.rtcp.is_some() || !need_rtcp || st.rtcp_mux) => b,
                other => {
                    let (port, rtcp) = self
                        .pool
                        .take(need_rtcp)
                        .ok_or_else(|| exhausted("no free port in the media port ranges"))?;
                    let b = Block { addr, port, rtcp };
                    j.allocated.push(b);
                    let Some(d) = self.dialogs.get_mut(inp.dialog) else {
                        return Err(not_acceptable("dialog vanished"));
                    };
                    if let Some(old) = other {
                        d.retired.push(old);
                    }
                    if let Some(s) = d.slots.get_mut(i).and_then(Option::as_mut) {
                        s.blocks[side_ix(facing)] = Some(b);
                    }
                    b
                }
            };
            out.push(Some(Allocation {
                addr: block.addr,
                port: block.port,
                rtcp_port: block.rtcp,
            }));
        }
        Ok(out)
    }
}
