//! Responses: matching to client transactions (§17.1.3), forwarding upstream
//! (§16.7), and the offer/answer hand-off to the media layer.

use super::*;

impl Proxy {
    pub(super) fn on_response(
        &mut self,
        conn: ConnId,
        info: ConnInfo,
        mut msg: Message,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let code = msg.status().unwrap_or(0);
        let (Ok(top), Ok(cseq)) = (msg.top_via(), msg.cseq()) else {
            debug!("response without usable Via/CSeq dropped");
            return;
        };
        let method = cseq.method.to_string();
        let ckey = ctx_key(top.branch().unwrap_or_default(), &method);
        if method == "CANCEL" {
            // Any response stops a CANCEL's Timer E (§17.1.2.2: provisional
            // only slows it, but a CANCEL is answered 200 at once, §9.2).
            self.retransmits.remove(&ckey);
        }
        let Some(c) = self.client_txs.get_mut(&ckey) else {
            // §16.7 step 1: no matching client transaction; we never send
            // statelessly, so there is nothing to forward it to.
            debug!(code, "stray response dropped");
            return;
        };
        if c.sent_on.is_none() {
            c.sent_on = Some(conn);
            self.sent_on.entry(conn).or_default().insert(ckey.clone());
        }
        let dest_hop = match &c.dest {
            Dest::Hop { hop, .. } => Some(hop.clone()),
            Dest::Conn(_) => None,
        };
        if let Some(hop) = &dest_hop {
            // The far party's later requests (re-INVITE, ACK with an
            // answer) come on this connection: remember its route.
            self.conn_hops.entry(conn).or_insert_with(|| hop.clone());
        }
        if method == "CANCEL" || c.server_key.is_none() {
            // Responses to our own CANCEL/BYE end here.
            if code >= 200 {
                c.final_code = Some(code);
                c.set_deadline(&mut self.client_due, &ckey, now, now);
                unlist_sent(&mut self.sent_on, c.sent_on, &ckey);
            }
            return;
        }
        if code < 200 {
            c.provisional = true;
            let at = now
                + if method == "INVITE" {
                    self.settings.timer_c
                } else {
                    TIMER_64T1
                };
            c.set_deadline(&mut self.client_due, &ckey, at, now);
            let cancel_now = c.cancel == Cancel::Pending;
            if cancel_now {
                c.cancel = Cancel::Sent;
                self.push_cancel(&ckey, Dest::Conn(conn), now, out);
            }
            if code == 100 {
                return;
            }
        }
        let Some(c) = self.client_txs.get_mut(&ckey) else {
            return;
        };
        let retransmitted_2xx = code >= 200 && c.final_code.is_some();
        let initial_invite = c.initial_invite;
        let dialog = c.dialog.clone();
        let offer_in_request = c.offer_in_request;
        let server_key = c.server_key.clone();
        let cancelled = c.cancel != Cancel::None;
        // The forwarded request, for what a final INVITE or REGISTER
        // response derives from it (ACK, dialog, registration); a
        // provisional or a BYE's 200 needs none (issue #12: cloning the
        // whole request for every response was per-call work in the
        // driver).
        let forwarded_invite = (code >= 200 && matches!(method.as_str(), "INVITE" | "REGISTER"))
            .then(|| c.request.clone());
        if code >= 200 {
            c.final_code = Some(code);
            unlist_sent(&mut self.sent_on, c.sent_on, &ckey);
            // 2xx to an INVITE: RFC 6026 Accepted state keeps forwarding 2xx
            // retransmissions (the UAS repeats them on any transport,
            // §13.3.1.4). Anything else: Completed, absorbing retransmitted
            // finals for Timer D (INVITE) or K (non-INVITE), which are 0
            // over TLS/TCP (§17.1.1.2, §17.1.2.2): freed below once forwarded.
            let at = if accepted_2xx(&method, code) || info.proto.unreliable() {
                now + TIMER_64T1
            } else {
                now
            };
            c.set_deadline(&mut self.client_due, &ckey, at, now);
        }
        if method == "INVITE" && code >= 300 {
            // §17.1.1.3: the ACK for a non-2xx is ours to send.
            if let Some(req) = &forwarded_invite {
                out.push(Outgoing {
                    dest: Dest::Conn(conn),
                    bytes: build::ack_for(req, &msg),
                    client_tx: None,
                });
            }
            if retransmitted_2xx {
                self.stats.retransmissions_absorbed += 1;
                return;
            }
        }
        let Some(skey) = server_key else { return };
        let Some(stx_conn) = self.server_txs.get(&skey).map(|s| s.conn) else {
            debug!("server transaction gone; response dropped");
            return;
        };
        if self.server_txs.get(&skey).is_some_and(|s| s.final_sent)
            && code >= 200
            && !(200..300).contains(&code)
        {
            self.stats.retransmissions_absorbed += 1;
            return;
        }
        if method == "REGISTER" {
            if let Some(req) = &forwarded_invite {
                self.note_register_result(stx_conn, req, code, now);
            }
        }
        // Parsed above (`top`): removed without parsing it again.
        let _ = msg.remove_top_via();
        let callee_tag = msg.to_tag().ok().flatten();
        if method == "INVITE" && callee_tag.is_some() && code < 300 {
            let who = self.party_id(conn, &info, now);
            if let Some(d) = dialog.as_ref().and_then(|k| self.dialogs.get_mut(k)) {
                d.callee.get_or_insert(who);
            }
        }

        // SDP in the response (§13.2.1 / RFC 3264 roles).
        let kind = match msg.header("Content-Type") {
            Some(ct) if !msg.body().is_empty() => body_kind(ct, msg.body()),
            _ => BodyKind::Opaque,
        };
        let has_sdp = kind != BodyKind::Opaque;
        let mut sdp_handled = false;
        if has_sdp && (100..300).contains(&code) && !retransmitted_2xx {
            let role = match (method.as_str(), code >= 200, offer_in_request) {
                ("INVITE", true, true) => Some(SdpRole::Answer),
                ("INVITE", false, true) => Some(SdpRole::EarlyAnswer),
                ("INVITE", _, false) => Some(SdpRole::Offer),
                ("UPDATE" | "PRACK", _, _) => Some(SdpRole::Answer),
                _ => None,
            };
            let key = dialog.clone().or_else(|| self.dialog_key_of(&msg));
            if let (Some(role), Some(k)) = (role, key) {
                let ct = msg.header("Content-Type").unwrap_or_default().to_owned();
                let body = msg.body().to_vec();
                let (media_sources, far_media) =
                    self.far_media(conn, &info, dest_hop.as_ref(), now);
                let ev = SdpEvent {
                    dialog: &k,
                    to_tag: callee_tag.as_deref(),
                    role,
                    from_side: info.side,
                    source: info.peer,
                    media_sources: &media_sources,
                    far_media,
                    body: &body,
                    content_type: &ct,
                };
                let result = if kind == BodyKind::SignedMedia {
                    Err(signed_media_refusal())
                } else {
                    self.media.on_sdp(&ev, now)
                };
                match result {
                    Ok(b) => {
                        msg.set_body(b);
                        sdp_handled = true;
                        if method == "INVITE" && role == SdpRole::Offer && code >= 200 {
                            if let Some(d) = self.dialogs.get_mut(&k) {
                                d.awaiting_ack_answer = true;
                            }
                        }
                    }
                    Err(e) => {
                        self.media_refused_response(
                            &ckey, &skey, &k, &msg, &e, code, conn, now, out,
                        );
                        return;
                    }
                }
            }
        }
        if has_sdp && !sdp_handled {
            strip_unhandled_media_body(&mut msg);
        }
        if (200..300).contains(&code) && method == "INVITE" {
            if let (Some(k), Some(req)) = (&dialog, &forwarded_invite) {
                self.confirm_dialog(k, req, &msg, stx_conn, conn, info.side);
                let due = now + self.settings.ack_timeout;
                if let Some(d) = self.dialogs.get_mut(k) {
                    if d.ack_due.is_none() {
                        d.ack_due = Some(due);
                        self.ack_waits.push_back((due, k.clone()));
                    }
                }
            }
        }
        let to_proto = self.conns.get(&stx_conn).map_or(Proto::Tls, |i| i.proto);
        if let Err(r) =
            self.rewrite_contacts(&mut msg, info.side, conn, to_proto, CONTACT_LIFETIME, now)
        {
            warn!(why = %r.why, "Contact rewrite failed; forwarding as is");
        }
        if (200..300).contains(&code) && method == "INVITE" {
            if let Some(k) = &dialog {
                self.share_callee_contact(k);
            }
        }
        if method == "REGISTER" && (200..300).contains(&code) {
            if let Some(req) = &forwarded_invite {
                self.learn_registration(&msg, req, now);
            }
            if info.side == Side::Internal {
                // The registrar echoes the Path (RFC 3327 §5.3); the edge's
                // entry names its inside address, which a remote user has
                // no use for and the outside must not see.
                msg.remove_header("Path");
            }
        }
        if method == "INVITE" && initial_invite {
            crate::metrics::call_final(code);
        }
        if code >= 300 && method == "INVITE" && initial_invite && !cancelled {
            if let Some(k) = &dialog {
                self.end_dialog(k, callee_tag.as_deref(), EndReason::Failure(code), now);
                self.dialogs.remove(k);
            }
        } else if code >= 300 && cancelled {
            if let Some(k) = &dialog {
                self.dialogs.remove(k);
            }
        }
        let bytes = msg.to_bytes();
        self.stats.responses_forwarded += 1;
        if let Some(s) = self.server_txs.get_mut(&skey) {
            s.last_response = Some(bytes.clone());
        }
        if code >= 200 {
            self.server_final(&skey, code, now);
            self.finish_client(&ckey, &method, code, info.proto.unreliable());
        }
        out.push(Outgoing {
            dest: Dest::Conn(stx_conn),
            bytes,
            client_tx: None,
        });
    }

    /// After a final response was forwarded: over TLS/TCP a Completed
    /// client transaction goes at once (Timers D and K are 0); one in the
    /// Accepted state keeps only what an ACK, CANCEL or BYE is derived
    /// from, not the whole request with its body.
    fn finish_client(&mut self, ckey: &str, method: &str, code: u16, unreliable: bool) {
        if !accepted_2xx(method, code) {
            if !unreliable {
                self.client_txs.remove(ckey);
            }
            return;
        }
        if let Some(c) = self.client_txs.get_mut(ckey) {
            c.request
                .retain_only(&["Via", "Route", "From", "To", "Call-ID", "CSeq", "Contact"]);
        }
    }
}

/// A 2xx to an INVITE: its client transaction enters the Accepted state
/// (RFC 6026 §7.2) for 64*T1 whatever the transport.
fn accepted_2xx(method: &str, code: u16) -> bool {
    method == "INVITE" && (200..300).contains(&code)
}
