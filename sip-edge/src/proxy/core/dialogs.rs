//! Dialogs the edge proxied: their keys, SDP roles of each request, the
//! confirmation that installs media, and the end that removes it.

use super::*;

impl Proxy {
    /// The key of the dialog `msg` belongs to: the table's own key when
    /// the dialog is known (its clones share the table's strings, so the
    /// media layer and the journal keep no copies of their own), else a
    /// new one from the Call-ID and From tag.
    pub(super) fn dialog_key_of(&self, msg: &Message) -> Option<DialogKey> {
        let call_id: SharedStr = msg.call_id().ok()?.into();
        let from_tag = msg.from_tag().ok().flatten().unwrap_or_default();
        let k = DialogKey {
            call_id: call_id.clone(),
            from_tag: from_tag.into(),
        };
        if let Some((known, _)) = self.dialogs.get_key_value(&k) {
            return Some(known.clone());
        }
        // A request from the callee: its To tag is the caller's From tag.
        if let Some(t) = msg.to_tag().ok().flatten() {
            let k2 = DialogKey {
                call_id,
                from_tag: t.into(),
            };
            if let Some((known, _)) = self.dialogs.get_key_value(&k2) {
                return Some(known.clone());
            }
        }
        Some(k)
    }

    /// Who sends on `conn` (see [`PartyId`]).
    pub(super) fn party_id(&self, conn: ConnId, info: &ConnInfo, now: Instant) -> PartyId {
        if info.side == Side::External {
            if let Party::Peer(n) = self.outside_party(conn, info, now) {
                // Past u32::MAX peers (never): the source address, a
                // narrower identity, rather than an index that aliases.
                if let Ok(n) = u32::try_from(n) {
                    return PartyId::Peer(n);
                }
            }
        }
        PartyId::Addr(info.peer.ip().to_canonical())
    }

    /// An in-dialog request (`k` known, To tag present) must come from
    /// the dialog's party on the side it arrives from: the caller's
    /// source on the caller's side, the callee's on the other. Anything
    /// else is refused 403 and logged as a security event.
    pub(super) fn check_dialog_party(
        &self,
        k: &DialogKey,
        conn: ConnId,
        info: &ConnInfo,
        method: &str,
        now: Instant,
    ) -> Result<(), Reject> {
        let Some(d) = self.dialogs.get(k) else {
            return Ok(());
        };
        let got = self.party_id(conn, info, now);
        // Either party may be on either side (an inside-to-inside call
        // has both inside); the callee is unknown until it answered.
        let ok = match d.callee {
            Some(callee) => got == callee || (info.side == d.caller_side && got == d.caller),
            None => info.side != d.caller_side || got == d.caller,
        };
        if ok {
            return Ok(());
        }
        warn!(
            target: "sip_edge::security",
            source = %info.peer,
            side = ?info.side,
            method,
            call_id = %k.call_id,
            caller = ?d.caller,
            callee = ?d.callee,
            rule = "in-dialog-from-party",
            "in-dialog request from a source that is not the dialog's party refused"
        );
        Err(reject(
            403,
            "in-dialog request from a source that is not a party of the dialog",
        ))
    }

    /// The callee's tag of a message in dialog `k`.
    pub(super) fn callee_tag(&self, k: &DialogKey, msg: &Message) -> Option<String> {
        let from = msg.from_tag().ok().flatten();
        if from.as_deref() == Some(k.from_tag.as_str()) {
            msg.to_tag().ok().flatten()
        } else {
            from
        }
    }

    pub(super) fn request_sdp_role(
        &self,
        method: &str,
        msg: &Message,
        k: Option<&DialogKey>,
    ) -> Option<SdpRole> {
        match method {
            "INVITE" | "UPDATE" => Some(SdpRole::Offer),
            "ACK" | "PRACK" => Some(SdpRole::Answer),
            // Office Communicator file-transfer control (download, cancel,
            // progress) rides in INFO/MESSAGE as ms-filetransfer+xml: no
            // addresses, but a media body, so it goes through the media
            // layer (which passes it through inside proxied dialogs).
            "MESSAGE" | "INFO"
                if msg.header("Content-Type").is_some_and(|ct| {
                    ct.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .eq_ignore_ascii_case("application/ms-filetransfer+xml")
                }) =>
            {
                Some(SdpRole::Offer)
            }
            "MESSAGE" | "INFO" => {
                // Windows Messenger file transfer invitations ride in
                // MESSAGE: INVITE command = offer, ACCEPT = answer; any
                // other command (CANCEL, ...) still goes to the media layer
                // (it tears the transfer down), never around it. Header
                // names are case-insensitive like SIP's.
                let body = String::from_utf8_lossy(msg.body());
                let cmd = body.lines().find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.trim()
                        .eq_ignore_ascii_case("Invitation-Command")
                        .then(|| value.trim())
                });
                match cmd {
                    Some(c) if c.eq_ignore_ascii_case("ACCEPT") => Some(SdpRole::Answer),
                    Some(_) => Some(SdpRole::Offer),
                    None => None,
                }
            }
            _ => {
                let _ = k;
                None
            }
        }
    }

    pub(super) fn end_dialog(
        &mut self,
        k: &DialogKey,
        to_tag: Option<&str>,
        reason: EndReason,
        now: Instant,
    ) {
        match self.dialogs.get_mut(k) {
            Some(d) if !d.ended => {
                d.ended = true;
                info!(?reason, "dialog media ends");
                self.media.on_dialog_end(k, to_tag, reason, now);
            }
            _ => {}
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; a struct would only rename the same values"
    )]
    pub(super) fn media_refused_response(
        &mut self,
        ckey: &str,
        skey: &str,
        k: &DialogKey,
        msg: &Message,
        e: &MediaError,
        code: u16,
        conn: ConnId,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        warn!(error = %e, code, "media refused the answer; failing the call");
        if self.client_txs.get(ckey).is_some_and(|c| c.initial_invite) {
            crate::metrics::call_final(e.status());
        }
        let tag = msg.to_tag().ok().flatten();
        self.end_dialog(k, tag.as_deref(), EndReason::Failure(e.status()), now);
        // Toward the UAS: a 2xx needs ACK + BYE, a provisional a CANCEL.
        let side = self.conns.get(&conn).map_or(Side::External, |i| i.side);
        let proto = self.dest_proto(&Dest::Conn(conn));
        let branch = self.new_branch();
        let via = self.via_for(side, proto, &branch);
        if let Some(c) = self.client_txs.get_mut(ckey) {
            if code >= 200 {
                let ack = build::ack_for(&c.request, msg);
                out.push(Outgoing {
                    dest: Dest::Conn(conn),
                    bytes: ack,
                    client_tx: None,
                });
                let request_uri = msg
                    .name_addrs("Contact")
                    .ok()
                    .and_then(|l| l.into_iter().next())
                    .map(|c| c.uri)
                    .unwrap_or_else(|| match &c.request.start {
                        StartLine::Request { uri, .. } => uri.clone(),
                        StartLine::Response { .. } => String::new(),
                    });
                let leg = ByeLeg {
                    request_uri,
                    routes: c.request.header_all("Route").map(str::to_owned).collect(),
                    from: c.request.header("From").unwrap_or_default().to_owned(),
                    to: msg.header("To").unwrap_or_default().to_owned(),
                };
                let seq = c.request.cseq().map_or(1, |q| q.seq.saturating_add(1));
                out.push(Outgoing {
                    dest: Dest::Conn(conn),
                    bytes: build::bye(&leg, &via, &k.call_id, seq),
                    client_tx: None,
                });
                c.final_code = Some(code);
                unlist_sent(&mut self.sent_on, c.sent_on, ckey);
            } else if c.cancel == Cancel::None {
                c.cancel = Cancel::Sent;
                out.push(Outgoing {
                    dest: Dest::Conn(conn),
                    bytes: build::cancel_for(&c.request),
                    client_tx: None,
                });
            }
            c.set_deadline(&mut self.client_due, ckey, now + TIMER_64T1, now);
        }
        if let Some(caller) = self.server_txs.get(skey).map(|s| s.conn) {
            let mut extra = media_reject(e).extra;
            // The answer came from the other side: its details (addresses,
            // which policy rule) stay there; the caller learns only that
            // the edge refused it.
            extra.push(self.warning(
                caller,
                "the answering party's session description was refused by the edge",
            ));
            if let Some(s) = self.server_txs.get_mut(skey) {
                let bytes = build::response(&s.request, e.status(), Some(&s.to_tag), &extra);
                s.last_response = Some(bytes.clone());
                self.stats.responses_generated += 1;
                crate::metrics::sip_response(e.status(), true);
                out.push(Outgoing {
                    dest: Dest::Conn(caller),
                    bytes,
                    client_tx: None,
                });
            }
            self.server_final(skey, e.status(), now);
        }
        self.dialogs.remove(k);
    }

    pub(super) fn confirm_dialog(
        &mut self,
        k: &DialogKey,
        invite: &Message,
        resp: &Message,
        caller_conn: ConnId,
        callee_conn: ConnId,
        callee_side: Side,
    ) {
        let rr = resp.name_addrs("Record-Route").unwrap_or_default();
        let ours: Vec<bool> = rr
            .iter()
            .map(|r| r.sip_uri().is_ok_and(|u| self.names_us(&u).is_some()))
            .collect();
        let first_ours = ours.iter().position(|o| *o).unwrap_or(rr.len());
        let last_ours = ours.iter().rposition(|o| *o).map_or(rr.len(), |i| i + 1);
        // Entries above ours lead to the callee (reversed), below to the caller.
        let to_callee_routes: Vec<String> = rr
            .get(..first_ours)
            .unwrap_or_default()
            .iter()
            .rev()
            .map(ToString::to_string)
            .collect();
        let to_caller_routes: Vec<String> = rr
            .get(last_ours..)
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect();
        let callee_contact = resp
            .name_addrs("Contact")
            .ok()
            .and_then(|c| c.into_iter().next())
            .map(|c| c.uri);
        // The caller's Contact was rewritten in `invite`; restore it.
        let caller_contact = invite
            .name_addrs("Contact")
            .ok()
            .and_then(|c| c.into_iter().next())
            .and_then(|c| c.sip_uri().ok())
            .and_then(|u| u.userinfo)
            .and_then(|t| self.bindings.lookup(&t, Instant::now()).map(|b| b.original));
        let caller_side = callee_side.other();
        if let Some(d) = self.dialogs.get_mut(k) {
            d.confirmed = true;
            if callee_contact.is_some() || caller_contact.is_some() {
                d.from = invite.header("From").unwrap_or_default().into();
                d.to = resp.header("To").unwrap_or_default().into();
            }
            if let Some(uri) = callee_contact {
                d.to_callee = Some(ByeTarget {
                    conn: callee_conn,
                    side: callee_side,
                    // Shared with its binding once the 2xx's Contact is
                    // bound (`share_callee_contact`).
                    request_uri: uri.into(),
                    routes: to_callee_routes.into(),
                });
            }
            if let Some(uri) = caller_contact {
                d.to_caller = Some(ByeTarget {
                    conn: caller_conn,
                    side: caller_side,
                    request_uri: uri,
                    routes: to_caller_routes.into(),
                });
            }
        }
    }

    /// The 2xx that confirmed dialog `k` had its Contact bound to a token
    /// (`rewrite_contacts`, after `confirm_dialog`): the BYE target toward
    /// the callee takes the binding's copy of the URI instead of its own.
    pub(super) fn share_callee_contact(&mut self, k: &DialogKey) {
        let Some(t) = self.dialogs.get_mut(k).and_then(|d| d.to_callee.as_mut()) else {
            return;
        };
        if let Some(uri) = self.bindings.original(t.side, &t.request_uri, Some(t.conn)) {
            t.request_uri = uri;
        }
    }
}
