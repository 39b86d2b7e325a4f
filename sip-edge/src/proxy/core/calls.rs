//! The core's answers to the status queries (`crate::status`): the calls
//! it tracks, each with the pinholes the media layer installed for it.

use super::*;
use crate::status::{CallEntry, PinholeStatus};

impl Proxy {
    /// Every INVITE dialog tracked, oldest first, with its pinholes.
    pub fn calls(&mut self, now: Instant) -> Vec<CallEntry> {
        let mut pins: HashMap<DialogKey, Vec<PinholeStatus>> = HashMap::new();
        for p in self.media.pinholes() {
            let k = DialogKey {
                call_id: p.call_id.as_str().into(),
                from_tag: p.from_tag.as_str().into(),
            };
            pins.entry(k).or_default().push(p);
        }
        let mut list: Vec<(Instant, CallEntry)> = self
            .dialogs
            .iter()
            .map(|(k, d)| {
                let side = match d.caller_side {
                    Side::Internal => "internal",
                    Side::External => "external",
                };
                let entry = CallEntry {
                    call_id: k.call_id.to_string(),
                    from_tag: k.from_tag.to_string(),
                    caller: uri_of(&d.from, "From"),
                    callee: uri_of(&d.to, "To"),
                    caller_side: side.to_owned(),
                    state: if d.confirmed { "confirmed" } else { "early" }.to_owned(),
                    age_secs: now.saturating_duration_since(d.created).as_secs(),
                    pinholes: pins.remove(k).unwrap_or_default(),
                };
                (d.created, entry)
            })
            .collect();
        list.sort_by_key(|(t, _)| *t);
        list.into_iter().map(|(_, c)| c).collect()
    }

    /// Every flow the media layer installed.
    pub fn media_pinholes(&mut self) -> Vec<PinholeStatus> {
        self.media.pinholes()
    }
}

/// The URI of a From or To header value (empty if it does not parse: the
/// request that created the dialog had it parsed already).
fn uri_of(value: &str, name: &'static str) -> String {
    NameAddr::parse(value, name)
        .map(|n| n.uri)
        .unwrap_or_default()
}
