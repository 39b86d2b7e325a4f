//! Transaction timers and bookkeeping (RFC 3261 §17): what a sent, unreachable
//! or closed connection does to client transactions, UDP retransmission
//! (Timers A/E), Timer B/C/F expiry on tick, and failing a branch upstream.

use super::*;

impl Proxy {
    /// A connection closed: its flow tokens die (RFC 5626 §5.3), client
    /// transactions waiting on it fail as if the hop answered 503 (§16.7
    /// step 1 treats a transport error so).
    pub fn on_conn_closed(&mut self, conn: ConnId, now: Instant) -> Vec<Outgoing> {
        self.conns.remove(&conn);
        self.conn_hops.remove(&conn);
        self.identities.remove(&conn);
        self.bindings.conn_closed(conn);
        let mut waiting: Vec<String> = self
            .sent_on
            .remove(&conn)
            .unwrap_or_default()
            .into_iter()
            .filter(|k| {
                self.client_txs
                    .get(k)
                    .is_some_and(|c| c.final_code.is_none() && c.sent_on == Some(conn))
            })
            .collect();
        waiting.sort();
        let mut out = Vec::new();
        for k in waiting {
            self.fail_client(&k, 503, now, &mut out);
        }
        out
    }

    /// The transport could not deliver the request of client transaction
    /// `ckey` (connect or TLS failure): 503 upstream. A CANCEL of the same
    /// branch would go the same way, so it fails too.
    pub fn on_unreachable(&mut self, ckey: &str, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let branch = ckey.split('|').next().unwrap_or_default();
        for k in [ckey.to_owned(), ctx_key(branch, "CANCEL")] {
            if self.client_txs.contains_key(&k) {
                self.fail_client(&k, 503, now, &mut out);
            }
        }
        out
    }

    /// The transport sent the request of client transaction `ckey` over
    /// `conn` (so a closed connection can fail the transactions that were
    /// waiting on it).
    pub fn on_sent(&mut self, ckey: &str, conn: ConnId) {
        if let Some(c) = self.client_txs.get_mut(ckey) {
            c.sent_on = Some(conn);
            if let Dest::Hop { hop, .. } = &c.dest {
                self.conn_hops.insert(conn, hop.clone());
            }
            self.sent_on
                .entry(conn)
                .or_default()
                .insert(ckey.to_owned());
        }
    }

    /// Arms Timer A (INVITE) or E (non-INVITE) for a request the edge sent
    /// to `dest` when that is an unreliable (UDP) pseudo-connection
    /// (RFC 3261 §17.1.1.2, §17.1.2.2: Timers A and E run only over
    /// unreliable transports; TLS/TCP deliver or fail the connection).
    pub(super) fn arm_retransmit(
        &mut self,
        key: String,
        dest: &Dest,
        bytes: &[u8],
        invite: bool,
        now: Instant,
    ) {
        if !self.dest_proto(dest).unreliable() {
            return;
        }
        if self.retransmits.len() >= MAX_RETRANSMISSIONS {
            warn!("retransmission table full; request sent once only");
            return;
        }
        self.retransmits.insert(
            key,
            Retransmit {
                dest: dest.clone(),
                bytes: bytes.to_vec(),
                next: now + T1,
                interval: T1,
                invite,
                until: now + TIMER_64T1,
            },
        );
    }

    /// Sends the CANCEL of client transaction `ckey` to `dest` (§9.1), armed
    /// for retransmission over UDP like any non-INVITE request.
    pub(super) fn push_cancel(
        &mut self,
        ckey: &str,
        dest: Dest,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let Some(c) = self.client_txs.get(ckey) else {
            return;
        };
        let bytes = build::cancel_for(&c.request);
        if let Some(b) = c
            .request
            .top_via()
            .ok()
            .and_then(|v| v.branch().map(str::to_owned))
        {
            self.arm_retransmit(ctx_key(&b, "CANCEL"), &dest, &bytes, false, now);
        }
        out.push(Outgoing {
            dest,
            bytes,
            client_tx: None,
        });
    }

    /// When [`Self::on_retransmit`] next has work (Timer A/E granularity is
    /// finer than the 1 s tick); `None` when nothing is armed.
    pub fn next_retransmit(&self) -> Option<Instant> {
        self.retransmits.values().map(|r| r.next).min()
    }

    /// Fires due Timer A/E retransmissions (RFC 3261 §17.1.1.2: INVITE every
    /// T1, 2*T1, 4*T1... until a provisional; §17.1.2.2: non-INVITE at
    /// min(2^n*T1, T2), at T2 once a provisional came, until a final) and
    /// forgets entries whose transaction is answered or timed out.
    pub fn on_retransmit(&mut self, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let due: Vec<String> = self
            .retransmits
            .iter()
            .filter(|(_, r)| r.next <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            let state = self
                .client_txs
                .get(&k)
                .map(|c| (c.final_code.is_some(), c.provisional));
            let Some(r) = self.retransmits.get_mut(&k) else {
                continue;
            };
            let is_cancel = k.ends_with("|CANCEL");
            let done = match state {
                Some((final_seen, provisional)) => final_seen || (r.invite && provisional),
                // The transaction ended (answered, failed, timed out);
                // only a CANCEL lives without one, until its Timer F.
                None => !is_cancel,
            };
            if done || r.until <= now {
                self.retransmits.remove(&k);
                continue;
            }
            let provisional = state.is_some_and(|(_, p)| p);
            r.interval = if r.invite {
                r.interval.saturating_mul(2)
            } else if provisional {
                T2
            } else {
                r.interval.saturating_mul(2).min(T2)
            };
            r.next = now + r.interval;
            debug!(key = %k, "retransmitting request over UDP (Timer A/E)");
            out.push(Outgoing {
                dest: r.dest.clone(),
                bytes: r.bytes.clone(),
                client_tx: None,
            });
        }
        out
    }

    pub(super) fn client_dest(&self, ckey: &str) -> Dest {
        match self.client_txs.get(ckey) {
            Some(c) => match c.sent_on.filter(|s| self.conns.contains_key(s)) {
                Some(s) => Dest::Conn(s),
                None => c.dest.clone(),
            },
            // Unreachable by construction (callers hold the key); a Conn
            // that does not exist makes the transport drop the message.
            None => Dest::Conn(ConnId::MAX),
        }
    }

    pub(super) fn fail_client(
        &mut self,
        ckey: &str,
        code: u16,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let Some(c) = self.client_txs.remove(ckey) else {
            return;
        };
        if c.final_code.is_some() {
            return;
        }
        let code = if c.cancel != Cancel::None { 487 } else { code };
        if let Some(k) = &c.dialog {
            if c.initial_invite {
                let reason = if code == 408 {
                    EndReason::Timeout
                } else if code == 487 {
                    EndReason::Cancel
                } else {
                    EndReason::Failure(code)
                };
                self.end_dialog(k, None, reason, now);
                self.dialogs.remove(k);
            }
        }
        let Some(skey) = c.server_key else { return };
        let method = c
            .request
            .method()
            .map(ToString::to_string)
            .unwrap_or_default();
        if method == "ACK" {
            return;
        }
        let Some(conn) = self
            .server_txs
            .get(&skey)
            .filter(|s| !s.final_sent)
            .map(|s| s.conn)
        else {
            return;
        };
        let mut extra: Vec<(&str, String)> = if code == 503 {
            vec![("Retry-After", RETRY_AFTER_SECS.to_string())]
        } else {
            Vec::new()
        };
        let why = match code {
            408 => "no final response from the next hop",
            487 => "request cancelled",
            _ => "next hop unreachable",
        };
        extra.push(self.warning(conn, why));
        let info = self.conns.get(&conn).copied();
        let Some(s) = self.server_txs.get_mut(&skey) else {
            return;
        };
        crate::metrics::sip_response(code, true);
        if let Some(i) = info {
            crate::metrics::local_refusal(i.peer, i.side, &s.request, code, why, false);
        }
        let bytes = build::response(&s.request, code, Some(&s.to_tag), &extra);
        s.last_response = Some(bytes.clone());
        self.stats.responses_generated += 1;
        info!(code, "answering for an unreachable or silent next hop");
        out.push(Outgoing {
            dest: Dest::Conn(conn),
            bytes,
            client_tx: None,
        });
        self.server_final(&skey, code, now);
    }

    /// The server transaction `skey` sent its final response `code`: how
    /// long it lingers. RFC 3261 §17.2.1: an INVITE's waits for the ACK of
    /// a non-2xx (Timer H, 64*T1, on every transport) and ends at a 2xx;
    /// §17.2.2: a non-INVITE's absorbs retransmissions for Timer J, 64*T1
    /// over UDP and 0 over TLS/TCP, so over a stream it ends here (kept, it
    /// answered a later request reusing its branch with the stored response,
    /// on a connection that may be long closed).
    pub(super) fn server_final(&mut self, skey: &str, code: u16, now: Instant) {
        let Some(s) = self.server_txs.get_mut(skey) else {
            return;
        };
        s.final_sent = true;
        let invite = s.request.method().is_some_and(|m| m.is("INVITE"));
        let unreliable = self
            .conns
            .get(&s.conn)
            .is_some_and(|i| i.proto.unreliable());
        let linger = match (invite, code) {
            (true, 200..=299) => Some(Duration::ZERO),
            (true, _) => Some(TIMER_64T1),
            (false, _) if unreliable => Some(TIMER_64T1),
            (false, _) => None,
        };
        match linger {
            Some(d) => {
                s.expires = Some(now + d);
                sooner(&mut self.server_due, now + d);
            }
            None => {
                self.server_txs.remove(skey);
            }
        }
    }

    /// The transaction and ACK timers that came due: Timers B, C and F,
    /// the end of the Accepted and Completed states, and 2xx left without
    /// their ACK. Each looks only at what is due (`client_due`,
    /// `ack_waits`), so the driver calls it several times a second
    /// (`transport`): once a second, a burst's expiring transactions were
    /// one stall of tens of milliseconds (issue #12, held calls). Also
    /// part of [`Proxy::on_tick`].
    pub fn on_timers(&mut self, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        self.media.on_timers(now);
        // Server transactions are few at any time (over TLS a non-INVITE
        // one ends as soon as its final response is sent), but a burst's
        // end drops thousands at once: in tenths, not all in one tick.
        if self.server_due.is_some_and(|t| t <= now) {
            let mut next = None;
            self.server_txs.retain(|_, s| match s.expires {
                Some(e) if e <= now => false,
                Some(e) => {
                    sooner(&mut next, e);
                    true
                }
                None => true,
            });
            self.server_due = next;
        }
        for k in self.due_clients(now) {
            let Some(c) = self.client_txs.get_mut(&k) else {
                continue;
            };
            if c.final_code.is_some() {
                self.client_txs.remove(&k);
                continue;
            }
            let is_invite = c.request.method().is_some_and(|m| m.is("INVITE"));
            if is_invite && c.provisional && c.cancel == Cancel::None {
                // Timer C (§16.8): cancel the branch, wait 64*T1 for 487.
                // The edge has given up on it: its early media ends now,
                // not when (or if) the 487 comes.
                c.cancel = Cancel::Sent;
                c.set_deadline(&mut self.client_due, &k, now + TIMER_64T1, now);
                let dialog = c.dialog.clone().filter(|_| c.initial_invite);
                let dest = self.client_dest(&k);
                self.push_cancel(&k, dest, now, &mut out);
                if let Some(d) = dialog {
                    self.end_dialog(&d, None, EndReason::Cancel, now);
                }
                continue;
            }
            // Timer B/F (§17.1.1.2, §17.1.2.2): 408 upstream (§16.8).
            self.fail_client(&k, 408, now, &mut out);
        }
        // RFC 3261 §13.3.1.4: a 2xx whose ACK never came (64*T1 by
        // default) ends the call both ways, media first. A caller that
        // takes the 2xx and never ACKs would otherwise hold a confirmed
        // call, and its pinholes, until the idle or maximum-length timer.
        // (A wait pushed after a reload shortened `ack_timeout` may end
        // before the ones ahead of it: it is then seen with them, late by
        // at most the difference.)
        let mut unacked: Vec<DialogKey> = Vec::new();
        while self.ack_waits.front().is_some_and(|(t, _)| *t <= now) {
            let Some((_, k)) = self.ack_waits.pop_front() else {
                break;
            };
            let waiting = self
                .dialogs
                .get(&k)
                .is_some_and(|d| d.ack_due.is_some_and(|t| t <= now));
            if waiting && !unacked.contains(&k) {
                unacked.push(k);
            }
        }
        for k in unacked {
            let span = info_span!("call", call_id = %k.call_id);
            let _g = span.enter();
            warn!(
                target: "sip_edge::security",
                rule = "proxy.ack_timeout_secs",
                limit_secs = self.settings.ack_timeout.as_secs(),
                "no ACK for the 2xx in time; ending the call both ways"
            );
            self.end_dialog(&k, None, EndReason::Timeout, now);
            if let Some(d) = self.dialogs.remove(&k) {
                self.send_byes(&k, d, now, &mut out);
            }
        }
        out
    }

    /// Timers: B/F/C and the Completed/Accepted lifetimes, binding expiry,
    /// and the media layer's expiry (BYE both ways). Call at least once a
    /// second.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        self.admission.tick(now);
        let txs = &self.client_txs;
        self.sent_on.retain(|_, keys| {
            keys.retain(|k| txs.get(k).is_some_and(|c| c.final_code.is_none()));
            !keys.is_empty()
        });
        out.extend(self.on_timers(now));
        self.bindings.expire(now);
        for k in self.media.on_tick(now) {
            let span = info_span!("call", call_id = %k.call_id);
            let _g = span.enter();
            let Some(d) = self.dialogs.remove(&k) else {
                continue;
            };
            info!("media expired; sending BYE both ways");
            self.send_byes(&k, d, now, &mut out);
        }
        // The media layer ends what it holds media for by `max_call`; a
        // dialog without media (no SDP, every stream disabled) whose ends
        // went away without a BYE would otherwise stay forever. 64*T1 past
        // the maximum call length, no media expiry can still be pending.
        // Only once the oldest dialog at the last look could be past it
        // (later dialogs are younger), not a walk of every dialog each
        // second.
        let limit = self.settings.max_dialog + TIMER_64T1;
        let mut stale: Vec<DialogKey> = Vec::new();
        if !self.dialogs.is_empty() && self.stale_check_at.is_none_or(|t| t <= now) {
            let mut oldest: Option<Instant> = None;
            for (k, d) in &self.dialogs {
                if now.saturating_duration_since(d.created) > limit {
                    stale.push(k.clone());
                } else {
                    oldest = Some(oldest.map_or(d.created, |o| o.min(d.created)));
                }
            }
            self.stale_check_at = oldest.map(|o| o + limit);
        }
        for k in stale {
            debug!(call_id = %k.call_id, "dialog record past the maximum call length forgotten");
            self.media.on_dialog_end(&k, None, EndReason::Timeout, now);
            self.dialogs.remove(&k);
        }
        // A burst of set-ups leaves the tables sized for it once their
        // transactions end (64*T1 after a 2xx): give the room back when
        // they are three-quarters empty, so the agent's memory follows
        // the calls it holds rather than its busiest half-minute.
        shrink_idle(&mut self.server_txs);
        shrink_idle(&mut self.client_txs);
        shrink_idle(&mut self.sent_on);
        shrink_idle(&mut self.dialogs);
        out.extend(self.on_retransmit(now));
        out
    }

    /// Keys of the client transactions whose deadline has passed, each
    /// once, from `client_due`: an entry whose transaction is gone is
    /// dropped, and one whose deadline moved later is put back at the new
    /// time (so a deadline set without an entry of its own still fires).
    fn due_clients(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        while self
            .client_due
            .peek()
            .is_some_and(|Reverse((t, _))| *t <= now)
        {
            let Some(Reverse((_, k))) = self.client_due.pop() else {
                break;
            };
            match self.client_txs.get(&k).map(|c| c.deadline) {
                Some(d) if d <= now => due.push(k),
                Some(d) => self.client_due.push(Reverse((d, k))),
                None => {}
            }
        }
        due.sort_unstable();
        due.dedup();
        due
    }

    /// BYE on each leg of dialog `d` (already removed from the table), each
    /// as a client transaction of its own.
    pub(super) fn send_byes(
        &mut self,
        k: &DialogKey,
        d: Box<Dialog>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let Dialog {
            to_caller,
            to_callee,
            from,
            to,
            caller_cseq,
            callee_cseq,
            ..
        } = *d;
        // Toward the caller the callee is the sender: From and To swap.
        let legs = [
            (to_caller, callee_cseq, (&to, &from)),
            (to_callee, caller_cseq, (&from, &to)),
        ];
        for (target, cseq, (from, to)) in legs {
            let Some(t) = target else {
                continue;
            };
            let (dest, side) = (Dest::Conn(t.conn), t.side);
            let leg = ByeLeg {
                request_uri: t.request_uri.to_string(),
                routes: t.routes.into_vec(),
                from: from.to_string(),
                to: to.to_string(),
            };
            let branch = self.new_branch();
            let proto = self.dest_proto(&dest);
            let via = self.via_for(side, proto, &branch);
            let bytes = build::bye(&leg, &via, &k.call_id, cseq.saturating_add(1).max(1));
            self.arm_retransmit(ctx_key(&branch, "BYE"), &dest, &bytes, false, now);
            if let Ok(m) = Message::parse(&bytes) {
                self.client_due
                    .push(Reverse((now + TIMER_64T1, ctx_key(&branch, "BYE"))));
                self.client_txs.insert(
                    ctx_key(&branch, "BYE"),
                    ClientTx {
                        server_key: None,
                        request: m,
                        dest: dest.clone(),
                        provisional: false,
                        final_code: None,
                        deadline: now + TIMER_64T1,
                        cancel: Cancel::None,
                        dialog: None,
                        initial_invite: false,
                        offer_in_request: false,
                        sent_on: None,
                    },
                );
            }
            out.push(Outgoing {
                dest,
                bytes,
                client_tx: Some(ctx_key(&branch, "BYE")),
            });
        }
    }
}

/// Tables up to this many slots keep their room: a table that fills and
/// empties with every refresh round (the server transactions of held
/// calls' OPTIONS) was shrunk and grown again each second, a rehash each
/// way, and a few thousand slots are a few hundred kB at most.
const SHRINK_ABOVE: usize = 16 * 1024;

/// Shrinks `m` to twice its length when it uses under a quarter of its
/// room (tables up to `SHRINK_ABOVE` slots are left alone).
fn shrink_idle<K: std::hash::Hash + Eq, V>(m: &mut std::collections::HashMap<K, V>) {
    if m.capacity() > SHRINK_ABOVE && m.len() < m.capacity() / 4 {
        m.shrink_to(m.len() * 2);
    }
}

#[cfg(test)]
mod shrink_tests {
    use std::collections::HashMap;

    #[test]
    fn tables_emptied_after_a_burst_give_their_room_back() {
        let mut m: HashMap<u32, [u8; 64]> = (0..100_000).map(|i| (i, [0; 64])).collect();
        m.retain(|k, _| *k < 10);
        let burst = m.capacity();
        super::shrink_idle(&mut m);
        assert!(m.capacity() < burst / 100, "{} of {burst}", m.capacity());
        assert_eq!(m.len(), 10);
        // A table still a third full keeps its room (no shrink/grow churn).
        let mut busy: HashMap<u32, u8> = (0..3000).map(|i| (i, 0)).collect();
        busy.retain(|k, _| *k < 1500);
        let cap = busy.capacity();
        super::shrink_idle(&mut busy);
        assert_eq!(busy.capacity(), cap);
        // Nor does a small one that empties and fills every round.
        let mut round: HashMap<u32, u8> = (0..5000).map(|i| (i, 0)).collect();
        round.clear();
        let cap = round.capacity();
        super::shrink_idle(&mut round);
        assert_eq!(round.capacity(), cap);
    }
}
