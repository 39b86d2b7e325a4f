//! Requests: validation (§16.3), server transactions and retransmission
//! absorption, CANCEL (§9.2), and forwarding with Via/Record-Route/Path.

use super::*;

impl Proxy {
    pub(super) fn on_request(
        &mut self,
        conn: ConnId,
        info: ConnInfo,
        msg: &mut Message,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Reject> {
        let bad = |e: crate::sip::message::MessageError| reject(400, e.to_string());
        if let StartLine::Request { version, .. } = &msg.start {
            if !version.eq_ignore_ascii_case("SIP/2.0") {
                return Err(reject(505, "version"));
            }
        }
        let method = msg.method().map(ToString::to_string).unwrap_or_default();
        // §16.3 step 1: the headers we need must parse.
        msg.call_id().map_err(bad)?;
        let cseq = msg.cseq().map_err(bad)?;
        if cseq.method.as_str() != method {
            return Err(reject(400, "CSeq method does not match the Request-Line"));
        }
        // Checked as from()/to() check them, copying only the tags.
        msg.from_tag().map_err(bad)?;
        msg.to_tag().map_err(bad)?;
        check_header_syntax(msg)?;
        let vias = msg.vias().map_err(bad)?;
        let top = vias.first().cloned().ok_or_else(|| reject(400, "no Via"))?;
        // §18.2.1 / RFC 3581: stamp received (and rport when asked).
        let top = msg.stamp_via(top, info.peer).map_err(bad)?;
        // §17.2.3: a branch without the z9hG4bK cookie is an RFC 2543
        // element's; `server_key` matches its requests the RFC 2543 way.
        let skey = server_key(info.side, msg, &top, &method);

        // Retransmission or ACK/CANCEL for an existing server transaction.
        if method == "ACK" {
            if let Some(stx) = self.server_txs.get(&skey) {
                // §17.2.1: the ACK for a non-2xx final response ends here.
                // (The ACK for a 2xx is end to end; an RFC 2543 one may
                // match the INVITE's key while it lingers.)
                if stx.final_sent && !stx.last_response.as_deref().is_some_and(is_2xx) {
                    self.stats.retransmissions_absorbed += 1;
                    debug!("ACK for non-2xx absorbed");
                    return Ok(());
                }
            }
            if self.is_ack_for_stateless_refusal(msg) {
                self.stats.retransmissions_absorbed += 1;
                return Ok(());
            }
        } else {
            if let Some(stx) = self.server_txs.get(&skey) {
                self.stats.retransmissions_absorbed += 1;
                // §18.2.2: over a stream the response goes back on the
                // connection the request came on when the first is gone.
                let dest = if self.conns.contains_key(&stx.conn) {
                    stx.conn
                } else {
                    conn
                };
                if let Some(r) = stx.last_response.clone() {
                    out.push(Outgoing {
                        dest: Dest::Conn(dest),
                        bytes: r,
                        client_tx: None,
                    });
                }
                return Ok(());
            }
        }
        if method == "CANCEL" {
            return self.on_cancel(conn, msg, &top, now, out);
        }
        // Issue #14 item 8, #15: rates and registration blocks, charged
        // only to new requests (retransmissions, ACK and CANCEL are
        // absorbed or matched above).
        self.refuse_while_draining(msg, &method)?;
        if method != "ACK" {
            self.admit(info, msg, &method, now)?;
        }

        // §16.3 step 3: Max-Forwards.
        let mf = match msg.max_forwards() {
            Some(r) => r.map_err(bad)?,
            None => DEFAULT_MAX_FORWARDS + 1,
        };
        if mf == 0 {
            return Err(reject(483, "Max-Forwards reached 0"));
        }
        // §16.3 step 4: loop detection, cheap form: a Via of ours whose
        // branch is a live client transaction for the same Call-ID/CSeq.
        for v in vias.iter().skip(1) {
            if let Some(b) = v.branch() {
                if let Some(ctx) = self.client_txs.get(&ctx_key(b, &method)) {
                    if ctx.request.call_id().ok() == msg.call_id().ok()
                        && ctx.request.cseq().ok().map(|c| c.seq) == Some(cseq.seq)
                    {
                        return Err(reject(482, "request looped back to the edge"));
                    }
                }
            }
        }
        // §16.3 step 5: Proxy-Require.
        let unsupported: Vec<String> = msg
            .header_all("Proxy-Require")
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_owned())
            .filter(|t| {
                !t.is_empty()
                    && !SUPPORTED_PROXY_EXT
                        .iter()
                        .any(|s| s.eq_ignore_ascii_case(t))
            })
            .collect();
        if !unsupported.is_empty() {
            return Err(Reject {
                code: 420,
                why: "unsupported Proxy-Require".into(),
                extra: vec![("Unsupported", unsupported.join(", "))],
                stateless: false,
            });
        }
        if self.server_txs.len() >= MAX_SERVER_TXS && method != "ACK" {
            return Err(Reject {
                code: 503,
                why: "transaction table full".into(),
                extra: vec![("Retry-After", RETRY_AFTER_SECS.to_string())],
                stateless: false,
            });
        }
        let ruri = request_uri(msg)?;

        // §16.4: strict-router compatibility, then pop our own Routes.
        let mut ruri = ruri;
        if ruri.userinfo.is_none()
            && self.names_us(&ruri).is_some()
            && msg.header("Route").is_some()
        {
            let mut routes = msg.name_addrs("Route").map_err(bad)?;
            if let Some(last) = routes.pop() {
                msg.set_request_uri(&last.uri);
                msg.set_name_addrs("Route", &routes);
                ruri = SipUri::parse(&last.uri).map_err(|_| reject(416, "bad Route URI"))?;
            }
        }
        let mut routes = msg.name_addrs("Route").map_err(bad)?;
        let before = routes.len();
        // A Route of ours with a flow token is a Path the edge added to a
        // REGISTER (RFC 3327 §5, RFC 5626 §5.3): it names the flow to use.
        let mut flow_route: Option<String> = None;
        while let Some(first) = routes.first() {
            match first.sip_uri() {
                Ok(u) if self.names_us(&u).is_some() => {
                    if flow_route.is_none() {
                        flow_route = u.userinfo.filter(|t| t.starts_with(TOKEN_PREFIX));
                    }
                    routes.remove(0);
                }
                _ => break,
            }
        }
        if routes.len() != before {
            msg.set_name_addrs("Route", &routes);
        }

        let from_side = info.side;
        let dialog_key = self.dialog_key_of(msg);
        let to_tag = msg.to_tag().ok().flatten();
        // Requests to the edge itself (no user part, no Route left).
        if ruri.userinfo.is_none() && routes.is_empty() && self.names_us(&ruri).is_some() {
            // The edge is the UAS here: a Require it does not support is
            // answered 420 (RFC 3261 §8.2.2.3); a proxy only checks
            // Proxy-Require, forwarding Require (RFC 4475 §3.3.5). It
            // supports no extension as a UAS (its one answer is OPTIONS).
            let required: Vec<String> = msg
                .header_all("Require")
                .flat_map(|v| v.split(','))
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .collect();
            if !required.is_empty() && method != "ACK" {
                return Err(Reject {
                    code: 420,
                    why: "unsupported Require".into(),
                    extra: vec![("Unsupported", required.join(", "))],
                    stateless: false,
                });
            }
            if method == "OPTIONS" {
                let tag = self.new_tag();
                self.respond_local(
                    conn,
                    msg,
                    200,
                    &tag,
                    &[(
                        "Allow",
                        "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, PRACK, MESSAGE, REGISTER"
                            .into(),
                    )],
                    out,
                );
                return Ok(());
            }
            return Err(reject(404, "nothing to route to at the edge itself"));
        }

        // Who may use the edge from outside (no open relay), then target
        // selection. Outside requests only ever go inside.
        if from_side == Side::External {
            self.admit_outside(
                conn,
                &info,
                &method,
                &ruri,
                !routes.is_empty(),
                flow_route.is_some(),
                to_tag.is_some(),
                now,
            )?;
        }
        // Only the dialog's own parties may speak in it: a stranger who
        // learnt its Call-ID and tags (an ex-participant, a leaked log)
        // must not end it with a BYE, move its media with a re-INVITE or
        // answer a late offer with an ACK.
        if let Some(k) = dialog_key.as_ref().filter(|_| to_tag.is_some()) {
            self.check_dialog_party(k, conn, &info, &method, now)?;
        }
        // A BYE of a call from before a restart (issue #14 item 8): end
        // its adopted pinholes; answered here if it cannot be routed.
        let adopted_bye = method == "BYE" && self.end_adopted_dialog(msg, dialog_key.as_ref(), now);
        // Target selection: outside REGISTERs go to the registrar.
        let (dest, dest_side) = if method == "REGISTER" && from_side == Side::External {
            self.remote_registrar()?
        } else {
            match self.select_target(
                from_side,
                &method,
                msg,
                &ruri,
                &routes,
                flow_route.as_deref(),
                now,
            ) {
                Ok(t) => t,
                Err(_) if adopted_bye => {
                    self.answer_adopted_bye(conn, msg, out);
                    return Ok(());
                }
                Err(r) => return Err(r),
            }
        };

        // Dialog bookkeeping and SDP before anything is sent.
        let is_invite = method == "INVITE";
        let initial_invite = is_invite && to_tag.is_none();
        if initial_invite {
            if let Some(k) = &dialog_key {
                if !self.dialogs.contains_key(k) {
                    crate::metrics::call_started();
                }
                let caller = self.party_id(conn, &info, now);
                self.dialogs.entry(k.clone()).or_insert_with(|| {
                    Box::new(Dialog {
                        created: now,
                        caller_side: from_side,
                        offer_in_invite: false,
                        awaiting_ack_answer: false,
                        confirmed: false,
                        ended: false,
                        caller_cseq: cseq.seq,
                        callee_cseq: 0,
                        to_caller: None,
                        to_callee: None,
                        from: msg.header("From").unwrap_or_default().into(),
                        to: msg.header("To").unwrap_or_default().into(),
                        caller,
                        callee: None,
                        ack_due: None,
                    })
                });
            }
        }
        if let Some(k) = &dialog_key {
            if let Some(d) = self.dialogs.get_mut(k) {
                if from_side == d.caller_side {
                    d.caller_cseq = d.caller_cseq.max(cseq.seq);
                } else {
                    d.callee_cseq = d.callee_cseq.max(cseq.seq);
                }
            }
        }
        let kind = match msg.header("Content-Type") {
            Some(ct) if !msg.body().is_empty() => body_kind(ct, msg.body()),
            _ => BodyKind::Opaque,
        };
        if kind == BodyKind::SignedMedia {
            // Neither rewritable nor forwardable (see BodyKind): refuse.
            let e = signed_media_refusal();
            if initial_invite {
                if let Some(k) = &dialog_key {
                    self.dialogs.remove(k);
                }
            }
            warn!(error = %e, "refusing a signed media body");
            return Err(media_reject(&e));
        }
        if kind == BodyKind::Media {
            let role = self.request_sdp_role(&method, msg, dialog_key.as_ref());
            if role.is_none() || dialog_key.is_none() {
                strip_unhandled_media_body(msg);
            }
            if let (Some(role), Some(k)) = (role, dialog_key.clone()) {
                let callee_tag = self.callee_tag(&k, msg);
                let ct = msg.header("Content-Type").unwrap_or_default().to_owned();
                let body = msg.body().to_vec();
                let (media_sources, far_media) = self.far_media(conn, &info, None, now);
                let ev = SdpEvent {
                    dialog: &k,
                    to_tag: if role == SdpRole::Offer && initial_invite {
                        None
                    } else {
                        callee_tag.as_deref()
                    },
                    role,
                    from_side,
                    source: info.peer,
                    media_sources: &media_sources,
                    far_media,
                    body: &body,
                    content_type: &ct,
                };
                match self.media.on_sdp(&ev, now) {
                    Ok(new_body) => msg.set_body(new_body),
                    Err(e) if method == "ACK" => {
                        // The answer of a late offer (RFC 3264 §4, offer in
                        // the 2xx) is refused: an ACK cannot be answered, so
                        // the ACK goes on without the answer (it completes
                        // the callee's INVITE, which stops its 2xx
                        // retransmissions) and the call is ended toward
                        // both parties right after it, with nothing opened.
                        warn!(error = %e, "media refused the answer in ACK; ending the call");
                        self.end_dialog(&k, None, EndReason::Failure(e.status()), now);
                        if let Some(d) = self.dialogs.remove(&k) {
                            self.byes_after.push((k.clone(), d));
                        }
                        strip_unhandled_media_body(msg);
                    }
                    Err(e) => {
                        if initial_invite {
                            self.end_dialog(&k, None, EndReason::Failure(e.status()), now);
                            self.dialogs.remove(&k);
                        }
                        return Err(media_reject(&e));
                    }
                }
                if is_invite {
                    if let Some(d) = self.dialogs.get_mut(&k) {
                        if initial_invite {
                            d.offer_in_invite = true;
                        }
                    }
                }
                if method == "ACK" {
                    if let Some(d) = self.dialogs.get_mut(&k) {
                        d.awaiting_ack_answer = false;
                    }
                }
            }
        }
        if method == "ACK" {
            if let Some(d) = dialog_key.as_ref().and_then(|k| self.dialogs.get_mut(k)) {
                d.ack_due = None;
            }
        }
        if method == "BYE" {
            if let Some(k) = &dialog_key {
                let tag = self.callee_tag(k, msg);
                self.end_dialog(k, tag.as_deref(), EndReason::Bye, now);
                self.dialogs.remove(k);
            }
        }

        // §16.6: build the forwarded request.
        // A REGISTER's tokens live as long as its transaction until the
        // registrar grants the binding (`learn_registration` then sets the
        // grant): REGISTERs the registrar refuses (401, 403) leave nothing
        // behind for long, whatever Expires they asked for.
        let contacts_lifetime = if method == "REGISTER" {
            TIMER_64T1
        } else {
            CONTACT_LIFETIME
        };
        let dest_proto = self.dest_proto(&dest);
        self.rewrite_contacts(msg, from_side, conn, dest_proto, contacts_lifetime, now)?;
        msg.set_header(
            "Max-Forwards",
            (mf.min(DEFAULT_MAX_FORWARDS + 1) - 1).to_string(),
        );
        let out_scheme = if ruri.scheme == "sips" { "sips" } else { "sip" };
        if initial_invite || (to_tag.is_none() && matches!(method.as_str(), "SUBSCRIBE" | "REFER"))
        {
            // RFC 5658 double Record-Route: the incoming side's address
            // below, the outgoing side's on top (the next hop sees it first).
            let in_rr = self.rr_uri(from_side, out_scheme, info.proto);
            let out_rr = self.rr_uri(dest_side, out_scheme, dest_proto);
            msg.prepend_header("Record-Route", in_rr);
            msg.prepend_header("Record-Route", out_rr);
        }
        if method == "REGISTER" {
            // RFC 3327 §5: Path with a flow token naming this connection, on
            // the registrar's side, so requests for the client come back
            // through the edge and leave over the flow it registered on
            // (RFC 5626 §5.3; `ob`: the edge keeps the flow, §5.1).
            let token = self
                .bindings
                .token_for(
                    from_side,
                    &format!("flow:{conn}"),
                    Some(conn),
                    contacts_lifetime,
                    now,
                )
                .ok_or_else(|| busy("binding table full"))?;
            self.bindings.path_minted(conn, &token);
            let l = self.settings.local(dest_side);
            msg.prepend_header(
                "Path",
                format!("<sip:{token}@{}:{};transport=tls;lr;ob>", l.host, l.port),
            );
            let sup = msg.header("Supported").map(str::to_owned);
            if !sup
                .as_deref()
                .is_some_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("path")))
            {
                msg.set_header(
                    "Supported",
                    sup.map_or_else(|| "path".to_owned(), |s| format!("{s}, path")),
                );
            }
        }
        let new_branch = self.new_branch();
        let via = self.via_for(dest_side, dest_proto, &new_branch);
        msg.prepend_header("Via", via);

        let bytes = msg.to_bytes();
        self.stats.requests_forwarded += 1;
        if method == "ACK" {
            // §16.6: ACK for 2xx is forwarded end to end with no transaction.
            out.push(Outgoing {
                dest,
                bytes,
                client_tx: None,
            });
            return Ok(());
        }
        let to_tag_local = self.new_tag();
        let ckey = ctx_key(&new_branch, &method);
        let mut server = ServerTx {
            conn,
            request: msg.clone(),
            client_key: Some(ckey.clone()),
            last_response: None,
            final_sent: false,
            to_tag: to_tag_local.clone(),
            expires: None,
        };
        // The stored request must answer with the received Via stack, not ours.
        let _ = server.request.remove_top_via();
        if is_invite {
            // §16.2: 100 Trying hop by hop, so the UAC stops retransmitting.
            let trying = build::response(&server.request, 100, None, &[]);
            server.last_response = Some(trying.clone());
            self.stats.responses_generated += 1;
            crate::metrics::sip_response(100, true);
            out.push(Outgoing {
                dest: Dest::Conn(conn),
                bytes: trying,
                client_tx: None,
            });
        }
        self.server_txs.insert(skey.clone(), server);
        if let Dest::Conn(c) = dest {
            self.sent_on.entry(c).or_default().insert(ckey.clone());
        }
        self.client_due
            .push(Reverse((now + TIMER_64T1, ckey.clone())));
        self.client_txs.insert(
            ckey,
            ClientTx {
                server_key: Some(skey),
                // The forwarded request is not needed past this point: the
                // transaction keeps it instead of a copy (issue #12).
                request: msg.take(),
                dest: dest.clone(),
                provisional: false,
                final_code: None,
                deadline: now + TIMER_64T1,
                cancel: Cancel::None,
                dialog: dialog_key.filter(|_| is_invite),
                initial_invite,
                offer_in_request: kind == BodyKind::Media,
                sent_on: match dest {
                    Dest::Conn(c) => Some(c),
                    Dest::Hop { .. } => None,
                },
            },
        );
        self.arm_retransmit(ctx_key(&new_branch, &method), &dest, &bytes, is_invite, now);
        out.push(Outgoing {
            dest,
            bytes,
            client_tx: Some(ctx_key(&new_branch, &method)),
        });
        Ok(())
    }

    pub(super) fn on_cancel(
        &mut self,
        conn: ConnId,
        msg: &Message,
        top: &Via,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Reject> {
        // §16.10: match the INVITE server transaction, answer 200 hop by hop.
        let side = self.conns.get(&conn).map_or(Side::Internal, |i| i.side);
        let ikey = server_key(side, msg, top, "INVITE");
        let Some(stx) = self.server_txs.get(&ikey) else {
            return Err(reject(481, "no INVITE transaction to cancel"));
        };
        // §9.2 matches a CANCEL by its Via alone, which anyone can copy:
        // only the INVITE's sender (its address, on its side) may cancel.
        let sender = self.conns.get(&stx.conn).map(|i| (i.side, i.peer.ip()));
        let this = self.conns.get(&conn).map(|i| (i.side, i.peer.ip()));
        if sender.is_none() || sender != this {
            warn!(
                target: "sip_edge::security",
                source = ?this.map(|t| t.1),
                invite_from = ?sender.map(|s| s.1),
                rule = "cancel-from-invite-sender",
                "CANCEL from another party than the INVITE's refused"
            );
            return Err(reject(481, "no INVITE transaction to cancel"));
        }
        let tag = stx.to_tag.clone();
        let client_key = stx.client_key.clone();
        let final_sent = stx.final_sent;
        self.respond_local(conn, msg, 200, &tag, &[], out);
        if final_sent {
            return Ok(());
        }
        if let Some(ck) = client_key {
            let mut send = false;
            if let Some(c) = self.client_txs.get_mut(&ck) {
                if c.cancel == Cancel::None && c.final_code.is_none() {
                    if c.provisional {
                        c.cancel = Cancel::Sent;
                        send = true;
                    } else {
                        c.cancel = Cancel::Pending;
                    }
                    // If the UAS never answers 487 we answer it ourselves.
                    c.set_deadline(&mut self.client_due, &ck, now + TIMER_64T1, now);
                }
                if let Some(k) = c.dialog.clone() {
                    self.end_dialog(&k, None, EndReason::Cancel, now);
                }
            }
            if send {
                let dest = self.client_dest(&ck);
                self.push_cancel(&ck, dest, now, out);
            }
        }
        Ok(())
    }
}

/// The Request-URI as a SIP URI, or the refusal RFC 3261 asks for: 416
/// for a well-formed URI of a scheme the edge does not route (§8.2.2.1,
/// RFC 4475 §3.3.2/§3.3.3), 400 for one that is no URI at all (in `<>`,
/// RFC 4475 §3.1.2.7) or a malformed `sip:`/`sips:` one (an IPv6 address
/// without brackets, RFC 5118 §4.2), and 400 for escaped headers, which
/// have no place in a Request-URI (§19.1.5, RFC 4475 §3.1.2.11).
fn request_uri(msg: &Message) -> Result<SipUri, Reject> {
    use crate::sip::message::MessageError;
    use crate::sip::uri::UriError;
    match msg.request_uri() {
        Some(Ok(u)) if !u.headers.is_empty() => Err(reject(
            400,
            "escaped headers in the Request-URI (RFC 3261 section 19.1.5)",
        )),
        Some(Ok(u)) => Ok(u),
        Some(Err(MessageError::BadUri {
            source: UriError::UnsupportedScheme { scheme, .. },
            ..
        })) if is_scheme(&scheme) => Err(reject(416, "Request-URI is not sip:/sips:")),
        Some(Err(e)) => Err(reject(400, e.to_string())),
        None => Err(reject(400, "no Request-URI")),
    }
}

/// RFC 3986 §3.1 `scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme(s: &str) -> bool {
    s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// Headers that occur once (RFC 3261 §7.3.1, §20: no comma list, no
/// repetition); a request with two is refused (RFC 4475 §3.3.8).
const SINGLE_VALUE: &[&str] = &["Call-ID", "CSeq", "From", "To", "Max-Forwards"];

/// §16.3 step 1 beyond what the accessors check: single-value headers
/// occur once, and the name-addr headers the edge reads (From, To,
/// Contact) follow §20.10 and §25.1, so the edge never passes on a
/// malformed one it could only guess at (RFC 4475 §3.1.2.13, §3.1.2.15:
/// "a proxy must not propagate the error").
fn check_header_syntax(msg: &Message) -> Result<(), Reject> {
    for name in SINGLE_VALUE {
        let values: usize = match *name {
            "From" | "To" => msg
                .header_all(name)
                .map(crate::sip::message::list_len)
                .sum(),
            _ => msg.header_all(name).count(),
        };
        if values > 1 {
            return Err(reject(400, format!("{name} occurs more than once")));
        }
    }
    // Borrowed views: nothing here is kept (issue #12).
    let from = msg
        .name_addr_view("From")
        .map_err(|e| reject(400, e.to_string()))?;
    let to = msg
        .name_addr_view("To")
        .map_err(|e| reject(400, e.to_string()))?;
    let contacts = msg
        .name_addr_views("Contact")
        .map_err(|e| reject(400, e.to_string()))?;
    for (name, na) in [("From", &from), ("To", &to)]
        .into_iter()
        .chain(contacts.iter().map(|c| ("Contact", c)))
    {
        if let Some(d) = na.display {
            if !is_display_name(d) {
                return Err(reject(
                    400,
                    format!("{name} display name is neither tokens nor a quoted string"),
                ));
            }
        }
        // §20.10: a URI with a comma, question mark or semicolon must be
        // in <>; without them a ';' starts header parameters, so only ','
        // and '?' are left in the URI to betray it.
        if !na.angle && na.uri.contains(['?', ',']) {
            return Err(reject(
                400,
                format!("{name} URI with headers or a comma must be enclosed in <>"),
            ));
        }
    }
    Ok(())
}

/// RFC 3261 §25.1 `display-name = *(token LWS) / quoted-string`.
fn is_display_name(d: &str) -> bool {
    if let Some(inner) = d.strip_prefix('"') {
        // A quoted string ends at its first unescaped quote, which must be
        // the last character.
        let mut escaped = false;
        for (i, c) in inner.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => return i + 1 == inner.len(),
                _ => {}
            }
        }
        return false;
    }
    d.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b) || b == b' ' || b == b'\t')
}
