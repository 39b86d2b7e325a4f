//! Offer/answer (RFC 3264): rewriting each SDP to edge ports, and turning a
//! completed exchange into pinhole operations (install, update, remove).

use super::*;

impl Manager {
    /// One SDP body passing through (see the module policies). On error
    /// nothing changed. On success the caller applies `ops` and, if that
    /// fails, calls [`Manager::rollback`].
    pub fn on_sdp(&mut self, inp: &SdpInput<'_>, now: Instant) -> Result<Outcome, MediaError> {
        self.journaled(inp.dialog, |m, j| m.sdp_inner(inp, now, j))
    }

    pub(super) fn sdp_inner(
        &mut self,
        inp: &SdpInput<'_>,
        now: Instant,
        j: &mut Journal,
    ) -> Result<Outcome, MediaError> {
        // ICE through the relay: the edge's own port named as the party's
        // media means the path already installed (`ice`).
        let unrelayed: Vec<StreamDesc>;
        let unrelayed_inp: SdpInput<'_>;
        let inp = match self.unrelay(inp.dialog, inp.from_side, inp.streams) {
            Some(streams) => {
                unrelayed = streams;
                unrelayed_inp = SdpInput {
                    streams: &unrelayed,
                    ..inp.clone()
                };
                &unrelayed_inp
            }
            None => inp,
        };
        let pinned: Vec<StreamDesc>;
        let pinned_inp: SdpInput<'_>;
        let inp = if inp.from_side == Side::External && inp.far_media == FarMedia::RemoteUser {
            // Pinning hides the address named; the edge's own is never a
            // remote user's media (DESIGN.md §3), whatever the port.
            let who = Self::naming(inp.from_side, inp.source, inp.media_sources);
            for (i, st) in inp.streams.iter().enumerate() {
                for ep in [st.rtp, st.rtcp, st.path].into_iter().flatten() {
                    if self.policy.is_edge(ep.ip()) {
                        return Err(policy::refused(
                            inp.dialog,
                            &who,
                            &format!("stream {i}: media"),
                            ep,
                            Refusal::EdgeAddress,
                        ));
                    }
                }
            }
            // A remote user behind NAT names its private address (or any
            // other): media goes only to its signalling source address,
            // the port learned once (see `FarMedia::RemoteUser`).
            pinned = pin_to_source(inp.streams, inp.source.ip());
            pinned_inp = SdpInput {
                streams: &pinned,
                ..inp.clone()
            };
            &pinned_inp
        } else {
            inp
        };
        let who = Self::naming(inp.from_side, inp.source, inp.media_sources);
        for (i, st) in inp.streams.iter().enumerate() {
            let named = [("media", st.rtp), ("RTCP", st.rtcp), ("MSRP path", st.path)];
            for (what, ep) in named {
                let Some(ep) = ep else { continue };
                self.check_endpoint(
                    inp.dialog,
                    &who,
                    st.proto,
                    ep,
                    &format!("stream {i}: {what}"),
                )?;
            }
        }
        let key = inp.dialog;
        if !self.dialogs.contains_key(key) {
            if inp.role != SdpRole::Offer {
                return Err(not_acceptable(
                    "answer for a dialog whose offer the edge never saw",
                ));
            }
            if self.dialogs.len() >= self.s.max_calls as usize {
                return Err(exhausted(format!(
                    "{} calls with media already in progress",
                    self.s.max_calls
                )));
            }
            self.dialogs.insert(
                key.clone(),
                Box::new(Dialog {
                    created: now,
                    client: None,
                    counted: (None, 0),
                    slots: Vec::new(),
                    retired: RareVec::default(),
                    offer: None,
                    offer_from: inp.from_side,
                    active_fork: None,
                    confirmed: None,
                    confirmed_at: None,
                    flows: Vec::new(),
                    last_activity: now,
                    ever_active: false,
                    sources: [None, None],
                    far_media: FarMedia::Config,
                    seen: RareVec::default(),
                    transfers: RareVec::default(),
                }),
            );
        }
        if let Some(d) = self.dialogs.get_mut(key) {
            d.sources[side_ix(inp.from_side)] = Some(inp.source.ip());
            if inp.from_side == Side::Internal {
                d.client = Some(inp.source.ip());
            } else {
                d.far_media = inp.far_media;
            }
        }
        let allocations = self.allocate(inp, j)?;
        self.recount(key);
        self.check_caps(key)?;
        let fork = inp.to_tag.unwrap_or("");
        let Some(d) = self.dialogs.get_mut(key) else {
            return Err(not_acceptable("dialog vanished"));
        };
        if inp.role == SdpRole::Offer {
            d.offer = Some(inp.streams.into());
            d.offer_from = inp.from_side;
            return Ok(Outcome {
                allocations,
                ops: Vec::new(),
            });
        }
        // An answer. Another fork after confirmation: rewrite only.
        if d.confirmed.as_deref().is_some_and(|c| c != fork) {
            return Ok(Outcome {
                allocations,
                ops: Vec::new(),
            });
        }
        let Some(offer) = d.offer.clone() else {
            return Err(not_acceptable(
                "answer without an outstanding offer (RFC 3264 §4)",
            ));
        };
        if d.offer_from == inp.from_side {
            return Err(not_acceptable("answer from the side that made the offer"));
        }
        if offer.len() != inp.streams.len() {
            return Err(not_acceptable(format!(
                "answer has {} m-lines, offer had {} (RFC 3264 §6)",
                inp.streams.len(),
                offer.len()
            )));
        }
        let ops = self.commit(key, &offer, inp, now, j)?;
        if let Some(d) = self.dialogs.get_mut(key) {
            // One string for both (see `Dialog::active_fork`).
            let fork = match &d.confirmed {
                Some(c) if c.as_str() == fork => c.clone(),
                _ => SharedStr::from(fork),
            };
            if inp.role == SdpRole::Answer && d.confirmed.is_none() {
                d.confirmed = Some(fork.clone());
                d.confirmed_at = Some(now);
            }
            d.active_fork = Some(fork);
            if inp.role == SdpRole::Answer {
                // Offer/answer exchange complete (RFC 3264 §4).
                d.offer = None;
            }
        }
        Ok(Outcome { allocations, ops })
    }

    /// Offer + answer known: compute the wanted flows and diff them against
    /// the installed ones.
    pub(super) fn commit(
        &mut self,
        key: &DialogKey,
        offer: &[StreamDesc],
        inp: &SdpInput<'_>,
        now: Instant,
        j: &mut Journal,
    ) -> Result<Vec<Op>, MediaError> {
        let Some(d) = self.dialogs.get(key) else {
            return Err(not_acceptable("dialog vanished"));
        };
        let mut wanted: Vec<(usize, bool, Flow)> = Vec::new();
        let mut release: Vec<usize> = Vec::new();
        // Streams whose answer accepted the offer's rtcp-mux (RFC 5761
        // §5.1.1): the RTCP ports kept in case it was declined go back.
        let mut muxed: Vec<usize> = Vec::new();
        for (i, (o, a)) in offer.iter().zip(inp.streams.iter()).enumerate() {
            if o.rejected || a.rejected {
                release.push(i);
                continue;
            }
            // Only a final answer: an early one's fork may lose to a 2xx
            // that declines mux and needs the RTCP ports after all.
            if o.rtcp_mux && a.rtcp_mux && o.proto == Proto::Udp && inp.role == SdpRole::Answer {
                muxed.push(i);
            }
            let (Some(o_rtp), Some(a_rtp)) = (o.rtp, a.rtp) else {
                continue;
            };
            if o.proto != a.proto {
                return Err(not_acceptable(format!(
                    "stream {i}: answer changes the transport"
                )));
            }
            let (int_rtp, ext_rtp) = if inp.from_side == Side::Internal {
                (a_rtp, o_rtp)
            } else {
                (o_rtp, a_rtp)
            };
            let Some(slot) = d.slots.get(i).and_then(Option::as_ref) else {
                return Err(not_acceptable(format!(
                    "stream {i}: no edge port was allocated"
                )));
            };
            let missing = || not_acceptable(format!("stream {i}: no edge port was allocated"));
            let public = slot.blocks[side_ix(Side::External)].ok_or_else(missing)?;
            let learn_port = match tcp_connector(o, a, inp.from_side) {
                Some(Side::External) => LearnPort::Peer,
                Some(Side::Internal) => LearnPort::Client,
                None => LearnPort::Neither,
            };
            let (latch_peer, learn_port) = far_latch(d.far_media, self.s.latch, learn_port);
            // Only a connecting TCP end's port is learned; the listening
            // end's port is where the edge sends, so it meets the port rule
            // now that the answer says who listens (RFC 4145 §4.1).
            for (side, ep, learned) in [
                (Side::Internal, int_rtp, learn_port == LearnPort::Client),
                (Side::External, ext_rtp, learn_port == LearnPort::Peer),
            ] {
                // `holdconn` (nobody connects yet): nothing flows until a
                // new offer says who connects, which is checked then.
                let connects = learn_port != LearnPort::Neither;
                if slot.proto == Proto::Tcp && connects && !learned && ep.port() < MIN_MEDIA_PORT {
                    let source =
                        d.sources[side_ix(side)].map_or(inp.source, |ip| SocketAddr::new(ip, 0));
                    let who = Self::naming(side, source, &[]);
                    return Err(policy::refused(
                        key,
                        &who,
                        &format!("stream {i}: listening TCP end"),
                        ep,
                        Refusal::PortBelow1024,
                    ));
                }
            }
            let mut pairs = vec![(false, int_rtp, ext_rtp, Some(public.port))];
            // An answer that declines the offer's rtcp-mux has RTCP of
            // its own; the offerer's then goes to its RTP port + 1 (RFC
            // 5761 §5.1.3 with the RFC 3605 default).
            let declined = |st: &StreamDesc, rtp: SocketAddr| {
                st.rtcp.or_else(|| {
                    (st.rtcp_mux && a.rtcp.is_some() && !a.rtcp_mux)
                        .then(|| rtp.port().checked_add(1))
                        .flatten()
                        .map(|p| SocketAddr::new(rtp.ip(), p))
                })
            };
            let (int_rtcp, ext_rtcp) = if inp.from_side == Side::Internal {
                (a.rtcp, declined(o, ext_rtp))
            } else {
                (declined(o, int_rtp), a.rtcp)
            };
            if let (Some(ci), Some(ce)) = (int_rtcp, ext_rtcp) {
                pairs.push((true, ci, ce, public.rtcp));
            }
            for (is_rtcp, client, peer, pub_port) in pairs {
                let Some(pub_port) = pub_port else { continue };
                let flow = match self.s.mode {
                    MediaMode::Relay => {
                        let inner = slot.blocks[side_ix(Side::Internal)].ok_or_else(missing)?;
                        let int_port = if is_rtcp {
                            inner.rtcp
                        } else {
                            Some(inner.port)
                        };
                        let Some(int_port) = int_port else { continue };
                        Flow::Relay {
                            proto: slot.proto,
                            client,
                            edge_int: SocketAddr::new(inner.addr, int_port),
                            public: SocketAddr::new(public.addr, pub_port),
                            peer,
                            latch_peer,
                            learn_port,
                        }
                    }
                    MediaMode::Nat => Flow::Nat {
                        proto: slot.proto,
                        client,
                        public: SocketAddr::new(public.addr, pub_port),
                        peer,
                        latch_peer,
                        learn_port,
                    },
                };
                flow.rules(0, 1)
                    .map_err(|e| not_acceptable(format!("stream {i}: {e}")))?;
                wanted.push((i, is_rtcp, flow));
            }
        }
        // Map keys must be unique: in nat mode the client's own address is a
        // key, so two calls (or m-lines) cannot share it. A key may be held
        // only by one of this dialog's own media flows, which the answer
        // replaces; file transfers are not replaced by an offer/answer, so
        // their keys stay taken, this dialog's included.
        let mut wanted_keys: HashSet<PinholeKey> = HashSet::new();
        for (i, _, f) in &wanted {
            for pk in keys_of(f) {
                let held_elsewhere = self
                    .ids
                    .owner(&pk)
                    .is_some_and(|owner| !d.flows.iter().any(|f| f.id == owner));
                if held_elsewhere || !wanted_keys.insert(pk) {
                    return Err(forbidden(format!(
                        "stream {i}: media address already used by another flow"
                    )));
                }
            }
        }

        let old: Vec<Installed> = d.flows.clone();
        let mut kept: Vec<Installed> = Vec::new();
        let mut installs: Vec<Op> = Vec::new();
        let mut updates: Vec<Op> = Vec::new();
        let mut new_flows: Vec<Installed> = Vec::new();
        let mut used_old: BTreeSet<PinholeId> = BTreeSet::new();
        for (stream, rtcp, flow) in wanted {
            match old.iter().find(|f| f.stream == stream && f.rtcp == rtcp) {
                Some(f) if f.flow == flow => {
                    used_old.insert(f.id);
                    kept.push(f.clone());
                }
                Some(f) if keys_of(&f.flow) == keys_of(&flow) => {
                    used_old.insert(f.id);
                    updates.push(Op::Update {
                        id: f.id,
                        old: f.flow,
                        flow,
                    });
                    kept.push(Installed {
                        flow,
                        packets: 0,
                        ..f.clone()
                    });
                }
                _ => {
                    let id = PinholeId(self.next_id);
                    self.next_id += 1;
                    installs.push(Op::Install { id, flow });
                    new_flows.push(Installed {
                        id,
                        stream,
                        rtcp,
                        flow,
                        packets: 0,
                    });
                }
            }
        }
        let removed: Vec<&Installed> = old.iter().filter(|f| !used_old.contains(&f.id)).collect();
        let new_keys: HashSet<PinholeKey> =
            new_flows.iter().flat_map(|f| keys_of(&f.flow)).collect();
        let (first, last): (Vec<&Installed>, Vec<&Installed>) = removed
            .iter()
            .partition(|f| keys_of(&f.flow).iter().any(|k| new_keys.contains(k)));
        let mut ops: Vec<Op> = first
            .iter()
            .map(|f| Op::Remove {
                id: f.id,
                flow: f.flow,
            })
            .collect();
        ops.extend(installs);
        ops.extend(updates);
        ops.extend(last.iter().map(|f| Op::Remove {
            id: f.id,
            flow: f.flow,
        }));

        // Apply to our own state.
        for f in &removed {
            self.ids.remove(f.id, &f.flow);
        }
        for f in &new_flows {
            self.ids.insert(f.id, key, &f.flow);
        }
        let Some(d) = self.dialogs.get_mut(key) else {
            return Err(not_acceptable("dialog vanished"));
        };
        kept.extend(new_flows);
        d.flows = kept;
        d.last_activity = now;
        let mut retired = d.retired.take();
        for i in release {
            if let Some(s) = d.slots.get_mut(i).and_then(Option::take) {
                retired.extend(s.blocks.into_iter().flatten());
            }
        }
        // A muxed stream's RTCP ports, unless a flow still uses them (an
        // a=rtcp naming another port alongside a=rtcp-mux): without this a
        // muxed call held two ports per edge address, halving how many
        // calls the media ranges carry. The block stays (same RTP port on
        // a re-offer); a re-offer without mux gets a new pair.
        for i in muxed {
            if d.flows.iter().any(|f| f.stream == i && f.rtcp) {
                continue;
            }
            if let Some(s) = d.slots.get_mut(i).and_then(Option::as_mut) {
                for b in s.blocks.iter_mut().flatten() {
                    if let Some(port) = b.rtcp.take() {
                        retired.push(Block {
                            addr: b.addr,
                            port,
                            rtcp: None,
                        });
                    }
                }
            }
        }
        // Retired blocks: no wanted flow uses them any more.
        for b in &retired {
            self.pool.free(b);
        }
        j.freed.extend(retired);
        self.recount(key);
        Ok(ops)
    }
}

/// Which end of a TCP stream connects (and so uses an ephemeral source
/// port), from the offer's and the answer's `a=setup` (RFC 4145 §4.1: absent
/// means `active` in an offer and `passive` in an answer; MSRP follows the
/// same default, the offerer connects, RFC 4975 §8.1). `None`: nobody
/// connects yet (`holdconn`) or the stream is not TCP.
pub(super) fn tcp_connector(
    offer: &StreamDesc,
    answer: &StreamDesc,
    answer_side: Side,
) -> Option<Side> {
    if offer.proto != Proto::Tcp {
        return None;
    }
    let o = offer.setup.as_deref().unwrap_or("active");
    let a = answer.setup.as_deref().unwrap_or("passive");
    match (o, a) {
        (_, "active") => Some(answer_side),
        ("active" | "actpass", "passive") => Some(answer_side.other()),
        _ => None,
    }
}

/// The outside party's latching (DESIGN.md §2) from how it is known:
/// `(latch_peer, learn_port)` for its flows. A port latch applies to an
/// end whose port is not already learned as a TCP connector's.
pub(super) fn far_latch(far: FarMedia, config_latch: bool, tcp: LearnPort) -> (bool, LearnPort) {
    let port_learned = if tcp == LearnPort::Neither {
        LearnPort::Peer
    } else {
        tcp
    };
    match far {
        FarMedia::Config => (config_latch, tcp),
        FarMedia::Strict => (false, tcp),
        FarMedia::Latch => (true, tcp),
        FarMedia::LatchPort | FarMedia::RemoteUser => (false, port_learned),
    }
}

/// A remote user's streams with every address it named replaced by its
/// signalling source address `ip` (ports kept: the port is learned later).
pub(super) fn pin_to_source(streams: &[StreamDesc], ip: IpAddr) -> Vec<StreamDesc> {
    let pin = |ep: Option<SocketAddr>| ep.map(|e| SocketAddr::new(ip, e.port()));
    streams
        .iter()
        .map(|st| StreamDesc {
            rtp: pin(st.rtp),
            rtcp: pin(st.rtcp),
            path: pin(st.path),
            ..st.clone()
        })
        .collect()
}
