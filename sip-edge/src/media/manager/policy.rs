//! The security rules a pinhole endpoint and a dialog must pass before
//! anything is allocated (DESIGN.md §3): forbidden targets, ports, caps.

use super::*;

impl Manager {
    /// DESIGN.md §3 for one endpoint named in SDP or an invitation: the one
    /// table in `media::policy`. A refusal is logged as a security event
    /// (who, which address, which rule) and becomes `Forbidden` (488) with
    /// the rule in the Warning text.
    pub(super) fn check_endpoint(
        &self,
        dialog: &DialogKey,
        who: &Naming<'_>,
        proto: Proto,
        ep: SocketAddr,
        what: &str,
    ) -> Result<(), MediaError> {
        // RFC 4145 §4: an active-only TCP end writes the discard port 9; it
        // connects and its port is learned (checked again in `commit`, once
        // the answer shows who connects).
        let learned = proto == Proto::Tcp && ep.port() == LEARNED_PORT;
        self.policy
            .check(who, proto, ep, learned)
            .map_err(|rule| refused(dialog, who, what, ep, rule))
    }

    /// [`crate::media::policy::EndpointPolicy::check_candidate`] for an
    /// address the edge forwards but never pinholes (an ICE candidate, a
    /// multicast stream's group), named by `side` from `source`; a
    /// refusal is logged and answered like an endpoint's.
    pub fn check_unpinholed(
        &self,
        dialog: &DialogKey,
        side: Side,
        source: SocketAddr,
        what: &str,
        ep: SocketAddr,
    ) -> Result<(), MediaError> {
        let who = Self::naming(side, source, &[]);
        self.policy
            .check_candidate(ep.ip())
            .map_err(|rule| refused(dialog, &who, what, ep, rule))
    }

    pub(super) fn naming<'a>(
        side: Side,
        source: SocketAddr,
        media_sources: &'a [Cidr],
    ) -> Naming<'a> {
        Naming {
            side,
            source,
            media_sources: match side {
                Side::External => media_sources,
                Side::Internal => &[],
            },
        }
    }

    pub(super) fn recount(&mut self, key: &DialogKey) {
        let Some(d) = self.dialogs.get_mut(key) else {
            return;
        };
        let now = (d.client, d.reserved());
        let before = std::mem::replace(&mut d.counted, now);
        self.total_flows = self
            .total_flows
            .saturating_sub(before.1)
            .saturating_add(now.1);
        if let Some(c) = before.0 {
            let e = self.per_client.entry(c).or_insert(0);
            *e = e.saturating_sub(before.1);
            if *e == 0 {
                self.per_client.remove(&c);
            }
        }
        if let Some(c) = now.0 {
            if now.1 > 0 {
                *self.per_client.entry(c).or_insert(0) += now.1;
            }
        }
    }

    pub(super) fn check_caps(&self, key: &DialogKey) -> Result<(), MediaError> {
        let Some(d) = self.dialogs.get(key) else {
            return Ok(());
        };
        if self.total_flows > self.s.max_flows {
            return Err(exhausted(format!(
                "all {} media flows of the edge are in use",
                self.s.max_flows
            )));
        }
        if let Some(c) = d.client {
            if self.client_flows(c) > self.s.max_flows_per_client {
                return Err(exhausted(format!(
                    "client {c} already holds its {} media flows",
                    self.s.max_flows_per_client
                )));
            }
        }
        Ok(())
    }
}

/// The security log line and the error of one refused endpoint.
pub(super) fn refused(
    dialog: &DialogKey,
    who: &Naming<'_>,
    what: &str,
    ep: SocketAddr,
    rule: Refusal,
) -> MediaError {
    tracing::warn!(
        target: "sip_edge::security",
        call_id = %dialog.call_id,
        side = ?who.side,
        signalling_source = %who.source,
        endpoint = %ep,
        what,
        rule = rule.rule(),
        "media endpoint refused"
    );
    crate::metrics::pinhole_refused(rule.rule());
    MediaError::Forbidden {
        // The rule first: the Warning text is cut at 120 characters
        // (`proxy::build::warning_value`), and the rule is what a caller's
        // admin needs from it.
        reason: format!("rule {}: {what} {ep} is {rule}", rule.rule()),
        rule: Some(rule),
    }
}
