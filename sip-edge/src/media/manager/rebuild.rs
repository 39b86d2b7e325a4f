//! Rebuilding the media session of a dialog this manager did not set up
//! (issue #11: a call taken over from another HA node; issue #14 item 8:
//! a call from before a restart) from the flows the store or the journal
//! describe ([`FlowMedia`]), when an in-dialog offer for it arrives.
//!
//! The rebuilt dialog holds the flows as installed (same sink ids, so an
//! answer turns them into updates or replacements and the BYE removes
//! them) and, per m-line, the edge blocks they use, so the re-offer is
//! rewritten to the same edge ports (RFC 3264 §8, as for any dialog). The
//! ports stay taken in the pool: they were held for the adopted flows and
//! are freed with the blocks, as the manager's own are.

use super::*;
use crate::media::adopt::FlowMedia;

impl Manager {
    /// The place of installed flow `id` in its dialog's media session (what
    /// the journal and the HA store record). `None` for transfers.
    pub fn place_of(&self, id: PinholeId) -> Option<FlowMedia> {
        let d = self.dialogs.get(self.ids.dialog(id)?)?;
        let f = d.flows.iter().find(|f| f.id == id)?;
        Some(FlowMedia {
            flow: f.flow,
            stream: f.stream,
            rtcp: f.rtcp,
            sources: d.sources,
            far_media: d.far_media,
        })
    }

    /// Whether `key` is tracked.
    pub fn knows(&self, key: &DialogKey) -> bool {
        self.dialogs.contains_key(key)
    }

    /// The last signalling source IP of `side` in dialog `key`.
    pub fn source_of(&self, key: &DialogKey, side: Side) -> Option<IpAddr> {
        self.dialogs.get(key)?.sources[side_ix(side)]
    }

    /// Takes over `flows` (sink id, place, packets counted so far), already
    /// installed and their ports already held, as the confirmed media
    /// session of dialog `key`. Refused (nothing changed) when `key` is
    /// tracked already, the flows contradict each other (two for one
    /// m-line and role, another mode's flow, RTP and RTCP of one m-line on
    /// different transports) or a port is outside the media ranges.
    pub fn rebuild(
        &mut self,
        key: &DialogKey,
        flows: &[(PinholeId, FlowMedia, u64)],
        now: Instant,
    ) -> Result<(), String> {
        if self.dialogs.contains_key(key) {
            return Err("the dialog is tracked already".into());
        }
        if flows.is_empty() {
            return Err("no flows".into());
        }
        let in_range = |p: u16| self.pool.ranges.iter().any(|r| r.contains(p));
        let mut slots: Vec<Option<Slot>> = Vec::new();
        let mut installed: Vec<Installed> = Vec::new();
        let (mut sources, mut far_media) = ([None, None], FarMedia::Config);
        // RTP first: it makes the slot, RTCP adds its ports.
        let mut order: Vec<&(PinholeId, FlowMedia, u64)> = flows.iter().collect();
        order.sort_by_key(|(_, m, _)| (m.stream, m.rtcp));
        for (id, m, packets) in order {
            if m.stream >= 64 {
                return Err(format!("m-line {} out of bounds", m.stream));
            }
            let (proto, int, public) = match (self.s.mode, m.flow) {
                (
                    MediaMode::Relay,
                    Flow::Relay {
                        proto,
                        edge_int,
                        public,
                        ..
                    },
                ) => (proto, Some(edge_int), public),
                (MediaMode::Nat, Flow::Nat { proto, public, .. }) => (proto, None, public),
                _ => return Err("a flow of the other media mode".into()),
            };
            for p in int.iter().map(SocketAddr::port).chain([public.port()]) {
                if !in_range(p) {
                    return Err(format!("edge port {p} is outside the media port ranges"));
                }
            }
            if installed
                .iter()
                .any(|f| f.stream == m.stream && f.rtcp == m.rtcp)
            {
                return Err(format!("two flows for m-line {}", m.stream));
            }
            if slots.len() <= m.stream {
                slots.resize(m.stream + 1, None);
            }
            let block = |a: SocketAddr| Block {
                addr: a.ip(),
                port: a.port(),
                rtcp: None,
            };
            match (&mut slots[m.stream], m.rtcp) {
                (slot @ None, false) => {
                    *slot = Some(Slot {
                        proto,
                        rtcp: false,
                        blocks: [int.map(block), Some(block(public))],
                    });
                }
                (Some(s), true) if s.proto == proto => {
                    s.rtcp = true;
                    if let (Some(b), Some(a)) = (s.blocks[0].as_mut(), int) {
                        b.rtcp = Some(a.port());
                    }
                    if let Some(b) = s.blocks[1].as_mut() {
                        b.rtcp = Some(public.port());
                    }
                }
                _ => return Err(format!("m-line {}: RTCP without its RTP", m.stream)),
            }
            installed.push(Installed {
                id: *id,
                stream: m.stream,
                rtcp: m.rtcp,
                flow: m.flow,
                packets: *packets,
            });
            for (i, s) in m.sources.iter().enumerate() {
                if s.is_some() {
                    sources[i] = *s;
                }
            }
            far_media = m.far_media;
        }
        for f in &installed {
            self.ids.insert(f.id, key, &f.flow);
        }
        self.dialogs.insert(
            key.clone(),
            Box::new(Dialog {
                created: now,
                client: sources[0],
                counted: (None, 0),
                slots,
                retired: RareVec::default(),
                offer: None,
                offer_from: Side::Internal,
                active_fork: Some(SharedStr::default()),
                // The session was confirmed where it was set up; its
                // answers here all come as fork "" (`media::control`).
                confirmed: Some(SharedStr::default()),
                confirmed_at: Some(now),
                flows: installed,
                last_activity: now,
                ever_active: true,
                sources,
                far_media,
                seen: RareVec::default(),
                transfers: RareVec::default(),
            }),
        );
        self.recount(key);
        Ok(())
    }
}
