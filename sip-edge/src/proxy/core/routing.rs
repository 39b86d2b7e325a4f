//! Where a request goes and what the edge writes for it to come back: Via
//! and Record-Route of each side, target selection, Contact rewriting and
//! the registration bindings learnt from REGISTER responses.

use super::*;

impl Proxy {
    pub(super) fn via_for(&self, side: Side, proto: Proto, branch: &str) -> String {
        let l = self.settings.local(side);
        // §18.1.1: sent-by is where responses come back; over UDP that is
        // the UDP listener's port.
        format!(
            "SIP/2.0/{} {}:{};branch={branch}",
            proto.via_token(),
            l.host,
            self.settings.port_for(side, proto)
        )
    }

    pub(super) fn dest_proto(&self, dest: &Dest) -> Proto {
        match dest {
            Dest::Conn(c) => self.conns.get(c).map_or(Proto::Tls, |i| i.proto),
            Dest::Hop { .. } => Proto::Tls,
        }
    }

    pub(super) fn rr_uri(&self, side: Side, scheme: &str, proto: Proto) -> String {
        let l = self.settings.local(side);
        match (scheme, proto) {
            // A UDP client can only reach our UDP port; sips cannot be had
            // on that hop anyway (RFC 5630 §3.1.3), so the entry is sip:.
            (_, Proto::Udp) => format!(
                "<sip:{}:{};transport=udp;lr>",
                l.host,
                self.settings.port_for(side, proto)
            ),
            ("sips", _) => format!("<sips:{}:{};lr>", l.host, l.port),
            (_, Proto::Tcp) => format!("<sip:{}:{};transport=tcp;lr>", l.host, l.port),
            _ => format!("<sip:{}:{};transport=tls;lr>", l.host, l.port),
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the request's parts as on_request already split them"
    )]
    pub(super) fn select_target(
        &mut self,
        from_side: Side,
        method: &str,
        msg: &mut Message,
        ruri: &SipUri,
        routes: &[NameAddr],
        flow_route: Option<&str>,
        now: Instant,
    ) -> Result<(Dest, Side), Reject> {
        // A token we minted (Contact or Path rewrite): restore and follow.
        if let Some(side) = self.names_us(ruri) {
            if let Some(token) = ruri
                .userinfo
                .as_deref()
                .filter(|u| u.starts_with(TOKEN_PREFIX))
            {
                let Some(b) = self.bindings.lookup(token, now) else {
                    // Minted by another node or an earlier run.
                    return self.follow_foreign(token, from_side, msg, routes, false);
                };
                let _ = side;
                if b.failed {
                    // RFC 5626 §5.3: the registered client's flow is gone.
                    return Err(flow_failed());
                }
                if !b.original.starts_with("flow:") {
                    msg.set_request_uri(&b.original);
                }
                if let Some(first) = routes.first() {
                    return Ok((self.hop_of(&first.uri, b.side)?, b.side));
                }
                return match b.flow.filter(|c| self.conns.contains_key(c)) {
                    Some(c) => Ok((Dest::Conn(c), b.side)),
                    None if b.side == Side::External => {
                        Ok((self.hop_of(&b.original, b.side)?, b.side))
                    }
                    // RFC 5626 §5.3: the client's flow is gone.
                    None => Err(reject(480, "the client's connection is gone")),
                };
            }
        }
        // A Path flow token of ours was the top Route (popped with our
        // other Routes): the request leaves over that flow, Request-URI
        // unchanged (RFC 5626 §5.3).
        if let Some(token) = flow_route {
            let Some(b) = self.bindings.lookup(token, now) else {
                return self.follow_foreign(token, from_side, msg, routes, true);
            };
            if b.failed {
                return Err(flow_failed());
            }
            return match b.flow.filter(|c| self.conns.contains_key(c)) {
                Some(c) => Ok((Dest::Conn(c), b.side)),
                None => Err(flow_failed()),
            };
        }
        if let Some(first) = routes.first() {
            return Ok((
                self.hop_of(&first.uri, from_side.other())?,
                from_side.other(),
            ));
        }
        match from_side {
            Side::External => {
                let aor = aor_of(ruri);
                // Only inside clients: a remote user's AOR is the inside
                // registrar's to route (through the internal next hop).
                if let Some((_, b)) = self.bindings.registered(&aor, Side::Internal, now) {
                    if let Some(c) = b.flow.filter(|c| self.conns.contains_key(c)) {
                        if !b.original.starts_with("flow:") {
                            msg.set_request_uri(&b.original);
                        }
                        return Ok((Dest::Conn(c), Side::Internal));
                    }
                }
                match &self.settings.internal_next_hop {
                    Some(h) => Ok((
                        Dest::Hop {
                            side: Side::Internal,
                            hop: h.clone(),
                        },
                        Side::Internal,
                    )),
                    None => Err(reject(
                        404,
                        format!("no registered client or internal next hop for {aor}"),
                    )),
                }
            }
            Side::Internal => {
                let host = ruri.host.to_string();
                match self.settings.route_for(&host) {
                    Some(h) => Ok((
                        Dest::Hop {
                            side: Side::External,
                            hop: h.clone(),
                        },
                        Side::External,
                    )),
                    None => Err(reject(
                        404,
                        format!("no [[route]] for {host} and no default route ({method})"),
                    )),
                }
            }
        }
    }

    /// Routes on a token this process does not hold (`proxy::tokens`):
    /// sealed with our key by another node or run, it names the party's
    /// side and own Contact. `path` is set when the token was a Path
    /// (flow) Route of ours.
    fn follow_foreign(
        &self,
        token: &str,
        from_side: Side,
        msg: &mut Message,
        routes: &[NameAddr],
        path: bool,
    ) -> Result<(Dest, Side), Reject> {
        let Some(sealed) = self.bindings.foreign(token) else {
            return Err(unknown_token(msg));
        };
        // Outside requests only ever go inside: an outside party's token
        // used from outside would make the edge a relay between outside
        // parties (tokens of outside parties are only shown inside).
        if from_side == Side::External && sealed.side == Side::External {
            warn!(target: "sip_edge::security", "an outside party's flow token used from outside; refused");
            return Err(reject(403, "this flow token is not usable from outside"));
        }
        // A flow lives only in the process that holds its connection
        // (RFC 5626 §5.3): the client must register again over a new one.
        if path || sealed.original.starts_with("flow:") {
            return Err(flow_failed());
        }
        info!(side = ?sealed.side, "routing on a flow token minted by another node or run");
        msg.set_request_uri(&sealed.original);
        // Further Routes (the far party's own proxies) come first; the
        // next hop, Route or Contact, passes `hop_of`'s checks.
        let next = routes
            .first()
            .map_or(sealed.original.as_str(), |r| r.uri.as_str());
        Ok((self.hop_of(next, sealed.side)?, sealed.side))
    }

    pub(super) fn hop_of(&self, uri: &str, side: Side) -> Result<Dest, Reject> {
        let u = SipUri::parse(uri).map_err(|_| reject(416, "next hop is not a sip:/sips: URI"))?;
        if !routable_host(&u.host) {
            // A Route or Contact from a message naming the edge host's own
            // loopback (RFC 4475 §3.1.1.11 preloads 127.0.0.1:5080), an
            // unspecified, multicast or broadcast address: relaying there
            // would reach services on the edge host itself or nobody, so
            // the edge refuses (local policy, RFC 3261 §16.5), as
            // `check-config` refuses such configured next hops.
            warn!(target: "sip_edge::security", next_hop = %u.host, "refusing a next hop on loopback or a non-unicast address");
            return Err(reject(
                403,
                "the next hop is a loopback, unspecified, multicast or broadcast address",
            ));
        }
        let host = match &u.host {
            Host::Ip(std::net::IpAddr::V6(a)) => a.to_string(),
            h => h.to_string(),
        };
        let port = u.port.unwrap_or(5061);
        let tls_name = self.configured_tls_name(&u.host, &host, port);
        Ok(Dest::Hop {
            side,
            hop: HopTarget {
                tls_name: tls_name.unwrap_or_else(|| host.clone()),
                host,
                port,
            },
        })
    }

    /// The certificate name configured for a next hop taken from a message
    /// (a Record-Route, Route or Contact): a configured route or peer whose
    /// host is this one, or a peer whose signalling addresses hold this
    /// IP. A carrier's SBC record-routes with its IP literal while its
    /// certificate carries its DNS name (`tls_name`); verifying the IP
    /// instead would fail every in-dialog request to it (RFC 5922 §4 lets
    /// local policy map a next hop to the identity expected).
    fn configured_tls_name(&self, parsed: &Host, host: &str, port: u16) -> Option<String> {
        let s = &self.settings;
        let same = |h: &HopTarget| h.host.eq_ignore_ascii_case(host) && h.port == port;
        let configured = s
            .routes
            .iter()
            .map(|(_, h)| h)
            .chain(s.default_route.iter())
            .chain(s.internal_next_hop.iter())
            .chain(s.access.registrar.iter())
            .chain(s.access.peers.iter().filter_map(|p| p.hop.as_ref()));
        if let Some(h) = configured.into_iter().find(|h| same(h)) {
            return Some(h.tls_name.clone());
        }
        let Host::Ip(ip) = parsed else { return None };
        s.access
            .peers
            .iter()
            .find(|p| p.addresses.iter().any(|c| c.contains(*ip)))
            .and_then(|p| p.hop.as_ref())
            .map(|h| h.tls_name.clone())
    }

    /// Replaces every Contact URI by a token URI on the receiving side,
    /// reachable over `to_proto`, the transport the message leaves on: a
    /// UDP client gets the UDP listener with `transport=udp` (it may not
    /// speak TLS at all, and its target refresh must come back the way it
    /// talks to the edge); everyone else the TLS listener.
    pub(super) fn rewrite_contacts(
        &mut self,
        msg: &mut Message,
        from_side: Side,
        conn: ConnId,
        to_proto: Proto,
        lifetime: Duration,
        now: Instant,
    ) -> Result<(), Reject> {
        if msg.header("Contact").is_none() || msg.header("Contact") == Some("*") {
            return Ok(());
        }
        let mut contacts = msg
            .name_addrs("Contact")
            .map_err(|e| reject(400, e.to_string()))?;
        let to = self.settings.local(from_side.other()).clone();
        for c in &mut contacts {
            let Ok(u) = c.sip_uri() else { continue };
            if u.userinfo
                .as_deref()
                .is_some_and(|t| t.starts_with(TOKEN_PREFIX))
                && self.names_us(&u).is_some()
            {
                // One of ours going back to its own side: restore it.
                if let Some(b) = u
                    .userinfo
                    .as_deref()
                    .and_then(|t| self.bindings.lookup(t, now))
                {
                    if b.side == from_side.other() && !b.original.starts_with("flow:") {
                        c.uri = b.original.to_string();
                        c.angle = true;
                    }
                }
                continue;
            }
            let token = self
                .bindings
                .token_for(from_side, &c.uri, Some(conn), lifetime, now)
                .ok_or_else(|| busy("binding table full"))?;
            c.uri = if to_proto == Proto::Udp {
                // sips cannot be had over UDP (RFC 5630 §3.1.3), as in
                // `rr_uri`.
                format!(
                    "sip:{token}@{}:{};transport=udp",
                    to.host,
                    self.settings.port_for(from_side.other(), Proto::Udp)
                )
            } else if u.scheme == "sips" {
                format!("sips:{token}@{}:{}", to.host, to.port)
            } else {
                format!("sip:{token}@{}:{};transport=tls", to.host, to.port)
            };
            c.angle = true;
        }
        msg.set_name_addrs("Contact", &contacts);
        Ok(())
    }

    pub(super) fn learn_registration(&mut self, resp: &Message, register: &Message, now: Instant) {
        // RFC 3261 §10.3: the 200 lists the bindings now in force; find the
        // ones the edge minted and remember AOR → flow.
        let Ok(to) = resp.to() else { return };
        let Ok(aor) = to.sip_uri() else { return };
        let aor = aor_of(&aor);
        let default_exp = register_expires(register).unwrap_or(3600);
        // The Contacts in the response were restored already; match by the
        // Contact we sent upstream (the token in the forwarded REGISTER).
        let Ok(sent) = register.name_addrs("Contact") else {
            return;
        };
        let mut longest = Duration::ZERO;
        for c in sent {
            let Some(token) = c.sip_uri().ok().and_then(|u| u.userinfo) else {
                continue;
            };
            let granted = resp
                .name_addrs("Contact")
                .ok()
                .and_then(|list| {
                    list.into_iter().find_map(|r| {
                        let same = self
                            .bindings
                            .lookup(&token, now)
                            .is_some_and(|b| *b.original == *r.uri);
                        same.then(|| {
                            r.params
                                .get("expires")
                                .flatten()
                                .and_then(|e| e.parse::<u64>().ok())
                        })
                    })
                })
                .flatten();
            // Without a grant in the 200, what the client asked: its
            // Contact's own `expires` first (§10.2.1.1), so a
            // de-registration (`;expires=0`) removes the binding.
            let asked = c
                .params
                .get("expires")
                .flatten()
                .and_then(|e| e.parse::<u64>().ok());
            let exp = granted.or(asked).unwrap_or(u64::from(default_exp));
            let Some(flow) = self
                .bindings
                .lookup(&token, now)
                .and_then(|b| b.flow)
                .and_then(|c| self.conns.get(&c))
                .map(|i| FlowInfo {
                    side: i.side,
                    source: i.peer,
                    proto: i.proto,
                })
            else {
                continue;
            };
            info!(%aor, expires = exp, side = ?flow.side, source = %flow.source, "registration through the edge");
            self.bindings
                .register(&aor, &token, Duration::from_secs(exp), flow, now);
            longest = longest.max(Duration::from_secs(exp));
        }
        // Our Path (the top one, RFC 3327 §5) lives as long as the longest
        // binding it carries.
        if let Some(path) = register
            .name_addrs("Path")
            .ok()
            .and_then(|p| p.into_iter().next())
            .and_then(|p| p.sip_uri().ok())
            .and_then(|u| u.userinfo)
            .filter(|t| t.starts_with(TOKEN_PREFIX))
        {
            self.bindings.extend(&path, now + longest);
        }
    }

    /// The registrar of remote users (`[access]`), on the inside.
    pub(super) fn remote_registrar(&self) -> Result<(Dest, Side), Reject> {
        let hop = self
            .settings
            .access
            .registrar
            .clone()
            .ok_or_else(|| reject(403, "registrations are only proxied from the inside"))?;
        Ok((
            Dest::Hop {
                side: Side::Internal,
                hop,
            },
            Side::Internal,
        ))
    }

    /// Who an outside connection's party is (`proxy::access`).
    pub(super) fn outside_party(&self, conn: ConnId, info: &ConnInfo, now: Instant) -> Party {
        let none = Vec::new();
        self.settings.access.classify(&access::Source {
            ip: info.peer.ip(),
            opened_to: self.conn_hops.get(&conn),
            identities: self.identities.get(&conn).unwrap_or(&none),
            registered_flow: self
                .bindings
                .has_live_registration(conn, Side::External, now),
        })
    }

    /// The no-open-relay check of a request from outside (`proxy::access`)
    /// and a trusted peer's rate limit. A refusal is a security event.
    #[expect(
        clippy::too_many_arguments,
        reason = "the request's facts, each one a separate question"
    )]
    pub(super) fn admit_outside(
        &mut self,
        conn: ConnId,
        info: &ConnInfo,
        method: &str,
        ruri: &SipUri,
        foreign_route: bool,
        flow_route: bool,
        in_dialog: bool,
        now: Instant,
    ) -> Result<(), Reject> {
        if !self.settings.access.enforce {
            if method == "REGISTER" {
                return Err(reject(
                    403,
                    "registrations are only proxied from the inside",
                ));
            }
            return Ok(());
        }
        let party = self.outside_party(conn, info, now);
        let host = ruri.host.to_string();
        let host_is_edge = [Side::Internal, Side::External].iter().any(|s| {
            match (&ruri.host, &self.settings.local(*s).host) {
                (Host::Name(a), Host::Name(b)) => a.eq_ignore_ascii_case(b),
                (a, b) => a == b,
            }
        });
        let token = flow_route
            || (self.names_us(ruri).is_some()
                && ruri
                    .userinfo
                    .as_deref()
                    .is_some_and(|u| u.starts_with(TOKEN_PREFIX)));
        let req = access::Request {
            method,
            host: host.trim_start_matches('[').trim_end_matches(']'),
            host_is_edge,
            token,
            foreign_route,
            in_dialog,
        };
        if let Err(r) = access::decide(&self.settings.access, party, &req) {
            warn!(
                target: "sip_edge::security",
                source = %info.peer,
                method,
                request_uri_host = %host,
                ?party,
                code = r.code,
                "outside request refused: {}",
                r.why
            );
            return Err(reject(r.code, r.why));
        }
        if method == "REGISTER"
            && self.bindings.registrations_on(Side::External, now)
                >= self.settings.access.max_remote_registrations
            && !self
                .bindings
                .has_live_registration(conn, Side::External, now)
        {
            return Err(busy("remote-user registrations are at their limit"));
        }
        if let Party::Peer(n) = party {
            let limit = self
                .settings
                .access
                .peers
                .get(n)
                .map_or(0, |p| p.max_requests_per_sec);
            if method != "ACK" && !self.rates.take(n, limit, now) {
                warn!(target: "sip_edge::security", source = %info.peer, peer = n, "peer over its request rate; 503");
                return Err(busy("request rate of this peer exceeded"));
            }
        }
        Ok(())
    }

    /// The connections that carry a live registration, with when it
    /// expires (the transport keeps them open until then).
    pub fn registered_flows(&self, now: Instant) -> Vec<(ConnId, Instant)> {
        self.bindings
            .registrations()
            .into_iter()
            .filter(|r| !r.failed && r.expires > now)
            .filter_map(|r| Some((r.conn?, r.expires)))
            .collect()
    }

    /// The registrations the edge holds, for `sip-edge registrations`.
    pub fn registrations(&self, now: Instant) -> Vec<crate::control::RegistrationEntry> {
        self.bindings
            .registrations()
            .into_iter()
            .map(|r| {
                let edge = self.settings.local(r.flow.side.other());
                crate::control::RegistrationEntry {
                    aor: r.aor,
                    side: match r.flow.side {
                        Side::External => "outside",
                        Side::Internal => "inside",
                    }
                    .into(),
                    source: r.flow.source.to_string(),
                    transport: r.flow.proto.via_token().to_ascii_lowercase(),
                    flow: r.conn,
                    flow_state: if r.failed { "failed" } else { "up" }.into(),
                    contact: r.contact,
                    edge_contact: format!(
                        "sip:{}@{}:{};transport=tls",
                        r.token, edge.host, edge.port
                    ),
                    expires_in_secs: r.expires.saturating_duration_since(now).as_secs(),
                }
            })
            .collect()
    }
}

/// RFC 5626 §5.3: a request for a flow that no longer exists.
fn flow_failed() -> Reject {
    reject(430, "the client's flow is gone (RFC 5626 section 5.3)")
}

/// `user@host` of a URI, lower-cased (the registration key).
pub(super) fn aor_of(u: &SipUri) -> String {
    let user = u
        .userinfo
        .as_deref()
        .map(|s| s.split(';').next().unwrap_or(s))
        .unwrap_or("");
    format!("{user}@{}", u.host).to_ascii_lowercase()
}

/// The answer to a request whose flow token (in its Request-URI or top
/// Route) this edge does not know. Inside a dialog (a To tag) that is 481
/// Call/Transaction Does Not Exist (RFC 3261 §12.2.2): the edge minted the
/// token for a dialog it no longer has, typically one from before a
/// restart, and 481 is what makes the sender end it (RFC 5057 §5.1: a 481
/// to a re-INVITE or UPDATE terminates the dialog). Outside a dialog the
/// token named a registration's flow that is gone: 404.
fn unknown_token(msg: &Message) -> Reject {
    if msg.to_tag().ok().flatten().is_some() {
        reject(
            481,
            "no such dialog at this edge (its flow token is unknown, e.g. the call predates an edge restart)",
        )
    } else {
        reject(404, "unknown or expired flow token")
    }
}

/// Whether a message may send the edge to `host`: not `localhost`, not a
/// loopback, unspecified, multicast or broadcast address (IPv4-mapped
/// IPv6 included).
fn routable_host(host: &Host) -> bool {
    match host {
        Host::Name(n) => {
            let n = n.trim_end_matches('.');
            !(n.eq_ignore_ascii_case("localhost") || n.to_ascii_lowercase().ends_with(".localhost"))
        }
        Host::Ip(ip) => {
            let ip = ip.to_canonical();
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || matches!(ip, std::net::IpAddr::V4(a) if a.is_broadcast()))
        }
    }
}
