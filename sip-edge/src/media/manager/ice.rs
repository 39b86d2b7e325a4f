//! ICE through the edge (RFC 8445, RFC 8839): what the edge's own relay
//! ports look like to the phones once their connectivity checks crossed
//! them.
//!
//! The checks of a call whose media the edge relays go through the edge's
//! ports, so each phone's STUN answer reports the edge's port on the far
//! side as the checking phone's address. A phone that selects that pair
//! has a peer-reflexive local candidate which is the edge's own relay
//! address, and the re-offer it sends once ICE completed (RFC 8445 §8.1.2;
//! RFC 5245 §9.1.3) names it as the stream's default destination, plus
//! `a=remote-candidates` naming the edge ports it checked against. Taken
//! at its word, that re-offer would aim the other party's media at the
//! edge itself (refused by the endpoint policy), or for a remote user,
//! whose address is pinned to its signalling source, at the right host
//! but the edge's port number, where the phone does not listen.
//!
//! The edge knows better: a stream endpoint naming one of this dialog's
//! own relay ports for that stream means "the path through the edge",
//! which is the media endpoint already installed for that party. It is
//! replaced by that endpoint before anything is checked or committed, so
//! the pinhole stays where the party's media is. Without an installed
//! flow there is nothing it could mean, and the policy refuses it like
//! any other edge address. The `a=remote-candidates` the other phone
//! receives is rewritten to that phone's own endpoints
//! ([`Manager::own_endpoints`], `sip::sdp::Sdp::rewrite_ice`).

use super::*;

impl Manager {
    /// Whether `ep` is one of the edge ports dialog `dialog` holds for
    /// stream `index` (on either side, RTP or RTCP).
    pub fn is_relay_endpoint(&self, dialog: &DialogKey, index: usize, ep: SocketAddr) -> bool {
        let Some(slot) = self
            .dialogs
            .get(dialog)
            .and_then(|d| d.slots.get(index))
            .and_then(Option::as_ref)
        else {
            return false;
        };
        let ip = ep.ip().to_canonical();
        slot.blocks.iter().flatten().any(|b| {
            b.addr.to_canonical() == ip && (b.port == ep.port() || b.rtcp == Some(ep.port()))
        })
    }

    /// The endpoint the installed flow of stream `index` (`rtcp`: its RTCP
    /// flow) uses for `side`'s party.
    fn installed_endpoint(
        &self,
        dialog: &DialogKey,
        index: usize,
        rtcp: bool,
        side: Side,
    ) -> Option<SocketAddr> {
        let d = self.dialogs.get(dialog)?;
        let f = d
            .flows
            .iter()
            .find(|f| f.stream == index && f.rtcp == rtcp)?;
        let (client, peer) = match f.flow {
            Flow::Relay { client, peer, .. } | Flow::Nat { client, peer, .. } => (client, peer),
        };
        Some(match side {
            Side::Internal => client,
            Side::External => peer,
        })
    }

    /// `streams` (sent by `from`) with every RTP/RTCP endpoint that names
    /// one of the dialog's own relay ports of that stream replaced by the
    /// endpoint installed for `from`'s party (module docs); `None` when
    /// nothing was replaced.
    pub(super) fn unrelay(
        &self,
        dialog: &DialogKey,
        from: Side,
        streams: &[StreamDesc],
    ) -> Option<Vec<StreamDesc>> {
        let mut out = streams.to_vec();
        let mut changed = false;
        for (i, st) in out.iter_mut().enumerate() {
            for (ep, rtcp) in [(&mut st.rtp, false), (&mut st.rtcp, true)] {
                let Some(e) = *ep else { continue };
                if !self.is_relay_endpoint(dialog, i, e) {
                    continue;
                }
                if let Some(mine) = self.installed_endpoint(dialog, i, rtcp, from) {
                    tracing::debug!(
                        call_id = %dialog.call_id,
                        stream = i,
                        named = %e,
                        kept = %mine,
                        "SDP names the edge's own relay port (ICE peer-reflexive default): media stays where it is"
                    );
                    *ep = Some(mine);
                    changed = true;
                }
            }
        }
        changed.then_some(out)
    }

    /// Per stream of `dialog`: `to`'s own media endpoints (component 1 =
    /// RTP, component 2 = RTCP) as the installed flows send to them, for
    /// the `a=remote-candidates` of an SDP going to `to`. Streams without
    /// an installed flow have none.
    pub fn own_endpoints(&self, dialog: &DialogKey, to: Side) -> Vec<[Option<SocketAddr>; 2]> {
        let Some(d) = self.dialogs.get(dialog) else {
            return Vec::new();
        };
        (0..d.slots.len())
            .map(|i| {
                [
                    self.installed_endpoint(dialog, i, false, to),
                    self.installed_endpoint(dialog, i, true, to),
                ]
            })
            .collect()
    }
}
