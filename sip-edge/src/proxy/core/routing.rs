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

    pub(super) fn select_target(
        &mut self,
        from_side: Side,
        method: &str,
        msg: &mut Message,
        ruri: &SipUri,
        routes: &[NameAddr],
        now: Instant,
    ) -> Result<(Dest, Side), Reject> {
        // A token we minted (Contact or Path rewrite): restore and follow.
        if let Some(side) = self.names_us(ruri) {
            if let Some(token) = ruri
                .userinfo
                .as_deref()
                .filter(|u| u.starts_with(TOKEN_PREFIX))
            {
                let b = self
                    .bindings
                    .lookup(token, now)
                    .ok_or_else(|| reject(404, "unknown or expired flow token"))?;
                let _ = side;
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
        // A Path flow token as the top remaining Route is ours too, but
        // names_us() already popped it; the registered-AOR lookup covers it.
        if let Some(first) = routes.first() {
            return Ok((
                self.hop_of(&first.uri, from_side.other())?,
                from_side.other(),
            ));
        }
        match from_side {
            Side::External => {
                let aor = aor_of(ruri);
                if let Some((_, b)) = self.bindings.registered(&aor, now) {
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

    pub(super) fn hop_of(&self, uri: &str, side: Side) -> Result<Dest, Reject> {
        let u = SipUri::parse(uri).map_err(|_| reject(416, "next hop is not a sip:/sips: URI"))?;
        let host = match &u.host {
            Host::Ip(std::net::IpAddr::V6(a)) => a.to_string(),
            h => h.to_string(),
        };
        Ok(Dest::Hop {
            side,
            hop: HopTarget {
                tls_name: host.clone(),
                host,
                port: u.port.unwrap_or(5061),
            },
        })
    }

    /// Replaces every Contact URI by a token URI on the receiving side.
    pub(super) fn rewrite_contacts(
        &mut self,
        msg: &mut Message,
        from_side: Side,
        conn: ConnId,
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
                        c.uri = b.original;
                        c.angle = true;
                    }
                }
                continue;
            }
            let token = self
                .bindings
                .token_for(from_side, &c.uri, Some(conn), lifetime, now)
                .ok_or_else(|| busy("binding table full"))?;
            let tls = if u.scheme == "sips" {
                ""
            } else {
                ";transport=tls"
            };
            c.uri = format!("{}:{token}@{}:{}{tls}", u.scheme, to.host, to.port);
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
                            .is_some_and(|b| b.original == r.uri);
                        same.then(|| {
                            r.params
                                .get("expires")
                                .flatten()
                                .and_then(|e| e.parse::<u64>().ok())
                        })
                    })
                })
                .flatten();
            let exp = granted.unwrap_or(u64::from(default_exp));
            info!(%aor, expires = exp, "registration through the edge");
            self.bindings
                .register(&aor, &token, Duration::from_secs(exp), now);
        }
    }
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
