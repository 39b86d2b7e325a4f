//! The core's side of admission (`proxy::admission`, issue #14 item 8 and
//! issue #15): asks about each new request, answers refusals statelessly
//! (503 with Retry-After for rates, RFC 3261 §21.5.4; 403 for blocked
//! sources and AORs) with a `sip_edge::security` log line, absorbs the ACKs
//! of those answers by their To tag, and reports each final response to a
//! REGISTER so registration failures are counted per source and per AOR.

use super::{routing::aor_of, *};
use crate::proxy::admission::{Request, Verdict};

impl Proxy {
    /// The To tags of responses the edge generates (`new_tag`).
    fn own_tag_prefix(&self) -> String {
        format!("se{}x", self.run_id)
    }

    /// An ACK whose To tag the edge minted and that no transaction
    /// absorbed: it acknowledges a final response the edge sent without
    /// keeping a transaction (an admission refusal); it ends here (§17.2.1).
    pub(super) fn is_ack_for_stateless_refusal(&self, msg: &Message) -> bool {
        msg.to_tag()
            .ok()
            .flatten()
            .is_some_and(|t| t.starts_with(&self.own_tag_prefix()))
    }

    /// Admission of a new request from `info.peer`.
    pub(super) fn admit(
        &mut self,
        info: ConnInfo,
        msg: &Message,
        method: &str,
        now: Instant,
    ) -> Result<(), Reject> {
        let initial = msg.to_tag().ok().flatten().is_none();
        let aor = (method == "REGISTER")
            .then(|| msg.to().ok().and_then(|t| t.sip_uri().ok()))
            .flatten()
            .map(|u| aor_of(&u));
        let req = Request {
            source: info.peer.ip(),
            side: info.side,
            method,
            initial,
            aor: aor.as_deref(),
        };
        let Verdict::Refuse(r) = self.admission.check(&req, now) else {
            return Ok(());
        };
        crate::metrics::admission_refused(r.rule.key(), r.code);
        if let Some(also) = r.log {
            warn!(
                target: "sip_edge::security",
                source = %info.peer.ip(),
                side = ?info.side,
                method,
                aor = aor.as_deref().unwrap_or(""),
                rule = r.rule.key(),
                code = r.code,
                retry_after = r.retry_after,
                also_refused_since_last_line = also,
                "request refused by admission"
            );
        }
        let (why, extra) = if r.code == 503 {
            (
                "too many requests from this address; retry later",
                vec![("Retry-After", r.retry_after.to_string())],
            )
        } else {
            ("blocked after failed registrations", Vec::new())
        };
        Err(Reject {
            code: r.code,
            why: why.into(),
            extra,
            stateless: true,
        })
    }

    /// A final response to a REGISTER the edge forwarded from `conn`.
    pub(super) fn note_register_result(
        &mut self,
        conn: ConnId,
        register: &Message,
        code: u16,
        now: Instant,
    ) {
        let Some(source) = self.conns.get(&conn).map(|i| i.peer.ip()) else {
            return;
        };
        let Some(aor) = register
            .to()
            .ok()
            .and_then(|t| t.sip_uri().ok())
            .map(|u| aor_of(&u))
        else {
            return;
        };
        let credentials = register.header("Authorization").is_some()
            || register.header("Proxy-Authorization").is_some();
        for b in self
            .admission
            .on_register_result(source, &aor, credentials, code, now)
        {
            warn!(
                target: "sip_edge::security",
                source = %b.source.map(|ip| ip.to_string()).unwrap_or_default(),
                aor = b.aor.as_deref().unwrap_or(""),
                failures = b.failures,
                block_secs = b.for_.as_secs(),
                "blocked after failed registrations: requests get 403 until the block ends"
            );
        }
    }
}
