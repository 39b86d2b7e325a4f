//! File-transfer invitations (text/x-msmsgsinvite): the listener, the
//! connector and the one TCP flow between them (see the module docs).

use super::*;

impl Manager {
    /// One `text/x-msmsgsinvite` invitation (module doc: File transfers).
    /// On error nothing changed; on success the caller rewrites the body to
    /// `advertise`, applies `ops` and, if that fails, calls
    /// [`Manager::rollback`].
    pub fn on_invitation(
        &mut self,
        inp: &InvitationInput<'_>,
        now: Instant,
    ) -> Result<InvitationOutcome, MediaError> {
        self.journaled(inp.dialog, |m, j| m.invitation_inner(inp, now, j))
    }

    pub(super) fn invitation_inner(
        &mut self,
        inp: &InvitationInput<'_>,
        now: Instant,
        j: &mut Journal,
    ) -> Result<InvitationOutcome, MediaError> {
        let key = inp.dialog;
        let cookie = inp.cookie.map(str::to_owned);
        let addressed = !inp.listen.is_empty();
        let Some(d) = self.dialogs.get_mut(key) else {
            if addressed {
                return Err(forbidden(
                    "x-msmsgsinvite file transfer in a dialog whose session the edge did not set up (DESIGN.md §3)",
                ));
            }
            // Nothing to open and nothing to leak.
            return Ok(InvitationOutcome::default());
        };
        d.sources[side_ix(inp.from_side)] = Some(inp.source.ip());
        if inp.from_side == Side::Internal && d.client.is_none() {
            d.client = Some(inp.source.ip());
        }
        match (inp.command, addressed) {
            (Some(Command::Cancel), false) => {
                d.seen.retain(|s| s.cookie != cookie);
                let ops = self.remove_transfers(key, |t| t.cookie == cookie);
                return Ok(InvitationOutcome { advertise: None, ops });
            }
            (Some(Command::Invite | Command::Accept), false) => {
                if d.seen.len() >= MAX_SEEN_INVITATIONS {
                    d.seen.remove(0);
                }
                d.seen.push(Seen { cookie, side: inp.from_side, source: inp.source.ip() });
                return Ok(InvitationOutcome::default());
            }
            (_, false) => return Ok(InvitationOutcome::default()),
            (Some(Command::Invite | Command::Accept), true) => {}
            (other, true) => {
                return Err(not_acceptable(format!(
                    "x-msmsgsinvite command {other:?} names an address; only INVITE and ACCEPT open a transfer"
                )))
            }
        }
        let is_accept = inp.command == Some(&Command::Accept);
        let listen_side = inp.from_side;
        let conn_side = listen_side.other();
        // The listener: the first named address that passes §3.
        let mut first_err = None;
        let mut listener = None;
        let who = Self::naming(listen_side, inp.source, inp.media_sources);
        for &l in inp.listen {
            let r = self
                .check_endpoint(key, &who, Proto::Tcp, l, "file transfer listener")
                .and_then(|()| {
                    if transfer_port_ok(listen_side, l) {
                        Ok(())
                    } else {
                        Err(forbidden(format!(
                            "file transfer listener {l} uses a privileged port"
                        )))
                    }
                });
            match r {
                Ok(()) => {
                    listener = Some(l);
                    break;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some(listener) = listener else {
            return Err(first_err
                .unwrap_or_else(|| not_acceptable("x-msmsgsinvite names no usable address")));
        };
        let Some(d) = self.dialogs.get(key) else {
            return Err(not_acceptable("dialog vanished"));
        };
        // The connector: the other side's signalling source.
        // An ACCEPT answers an invitation the connecting party sent with the
        // same cookie (INVITE → addressed ACCEPT, or the MSNFTP order INVITE
        // → ACCEPT → addressed ACCEPT from the inviter): without one, nobody
        // on the other side asked for this transfer.
        let from_seen = d
            .seen
            .iter()
            .rev()
            .find(|s| s.cookie == cookie && s.side == conn_side)
            .map(|s| s.source);
        if is_accept && from_seen.is_none() {
            return Err(not_acceptable(format!(
                "x-msmsgsinvite ACCEPT for invitation {cookie:?}: the edge forwarded no invitation with that cookie from the other party of this dialog"
            )));
        }
        let Some(connector) = from_seen.or(d.sources[side_ix(conn_side)]) else {
            return Err(not_acceptable(
                "the connecting party's signalling source is unknown in this dialog",
            ));
        };
        // The connector is a pinhole remote too (the edge lets it in and
        // answers it): the same table applies to its address. Its port is
        // learned from its SYN.
        let conn_who = Self::naming(conn_side, SocketAddr::new(connector, 0), inp.media_sources);
        self.check_endpoint(
            key,
            &conn_who,
            Proto::Tcp,
            SocketAddr::new(connector, LEARNED_PORT),
            "file transfer connector",
        )?;
        if connector.is_ipv4() != listener.is_ipv4() {
            return Err(not_acceptable(format!(
                "file transfer between {connector} and {listener} would need address family translation"
            )));
        }
        // A repeated invitation for the same transfer changes nothing.
        if let Some(t) = d.transfers.iter().find(|t| t.cookie == cookie) {
            if t.listener == listener && t.connector == connector {
                return Ok(InvitationOutcome {
                    advertise: Some(t.advertised),
                    ops: Vec::new(),
                });
            }
        }
        let mut ops = Vec::new();
        if let Some(d) = self.dialogs.get_mut(key) {
            let (old, kept): (Vec<Transfer>, Vec<Transfer>) = std::mem::take(&mut d.transfers)
                .into_iter()
                .partition(|t| t.cookie == cookie);
            d.transfers = kept.into();
            for t in old {
                for b in &t.blocks {
                    self.pool.free(b);
                    j.freed.push(*b);
                }
                self.ids.remove(t.id, &t.flow);
                ops.push(Op::Remove {
                    id: t.id,
                    flow: t.flow,
                });
            }
        }
        let like = listener.ip();
        let (int_addr, pub_addr) = (
            self.edge_addr(Side::Internal, like),
            self.edge_addr(Side::External, like),
        );
        let mut take =
            |pool: &mut PortPool, addr: &Result<IpAddr, MediaError>| -> Result<Block, MediaError> {
                let addr = addr.clone()?;
                let (port, _) = pool.take(false).ok_or_else(|| {
                    exhausted("no free port in the media port ranges for a file transfer")
                })?;
                let b = Block {
                    addr,
                    port,
                    rtcp: None,
                };
                j.allocated.push(b);
                Ok(b)
            };
        let connector_ep = SocketAddr::new(connector, LEARNED_PORT);
        let (flow, advertised, blocks) = match (conn_side, self.s.mode) {
            (Side::External, MediaMode::Nat) => {
                let public = take(&mut self.pool, &pub_addr)?;
                let adv = SocketAddr::new(public.addr, public.port);
                let flow = Flow::Nat {
                    proto: Proto::Tcp,
                    client: listener,
                    public: adv,
                    peer: connector_ep,
                    latch_peer: self.s.latch,
                    learn_port: LearnPort::Peer,
                };
                (flow, adv, vec![public])
            }
            (Side::External, MediaMode::Relay) => {
                let public = take(&mut self.pool, &pub_addr)?;
                let inner = take(&mut self.pool, &int_addr)?;
                let adv = SocketAddr::new(public.addr, public.port);
                let flow = Flow::Relay {
                    proto: Proto::Tcp,
                    client: listener,
                    edge_int: SocketAddr::new(inner.addr, inner.port),
                    public: adv,
                    peer: connector_ep,
                    latch_peer: self.s.latch,
                    learn_port: LearnPort::Peer,
                };
                (flow, adv, vec![public, inner])
            }
            // An internal connector: relay-style in both modes (nat cannot
            // learn the client's port, `FlowError::NatClientPort`).
            (Side::Internal, _) => {
                let inner = take(&mut self.pool, &int_addr)?;
                let public = take(&mut self.pool, &pub_addr)?;
                let adv = SocketAddr::new(inner.addr, inner.port);
                let flow = Flow::Relay {
                    proto: Proto::Tcp,
                    client: connector_ep,
                    edge_int: adv,
                    public: SocketAddr::new(public.addr, public.port),
                    peer: listener,
                    latch_peer: false,
                    learn_port: LearnPort::Client,
                };
                (flow, adv, vec![inner, public])
            }
        };
        flow.rules(0, 1)
            .map_err(|e| not_acceptable(format!("file transfer: {e}")))?;
        if keys_of(&flow).iter().any(|k| self.ids.owner(k).is_some()) {
            return Err(forbidden(format!(
                "file transfer listener {listener} is already used by another flow"
            )));
        }
        let id = PinholeId(self.next_id);
        self.next_id += 1;
        let Some(d) = self.dialogs.get_mut(key) else {
            return Err(not_acceptable("dialog vanished"));
        };
        d.transfers.push(Transfer {
            cookie,
            listener,
            connector,
            advertised,
            blocks,
            id,
            flow,
            installed_at: now,
            packets: 0,
            last_activity: now,
        });
        self.ids.insert(id, key, &flow);
        self.recount(key);
        self.check_caps(key)?;
        ops.push(Op::Install { id, flow });
        Ok(InvitationOutcome {
            advertise: Some(advertised),
            ops,
        })
    }
}

/// Whether `listen` can be a file transfer's listening end on `side`.
fn transfer_port_ok(side: Side, listen: SocketAddr) -> bool {
    match side {
        // Same rule as for SDP targets, without RFC 4145's port-9 exception:
        // a listener must name the port it listens on, on either side
        // (DESIGN.md §3: never a port below 1024).
        Side::Internal | Side::External => listen.port() >= MIN_MEDIA_PORT,
    }
}
