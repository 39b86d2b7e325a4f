//! The end of media: dialog ends, activity counters from the datapath, and
//! the idle / never-used / maximum-length timers checked on tick.

use super::*;

impl Manager {
    /// The dialog (`to_tag: None`) or one fork of it ended.
    pub fn on_dialog_end(
        &mut self,
        dialog: &DialogKey,
        to_tag: Option<&str>,
        _reason: EndReason,
        _now: Instant,
    ) -> Vec<Op> {
        self.journal = None;
        let Some(d) = self.dialogs.get(dialog) else {
            return Vec::new();
        };
        match to_tag {
            None => self.drop_dialog(dialog),
            Some(t) if d.confirmed.as_deref() == Some(t) => self.drop_dialog(dialog),
            // A fork that lost the race to another's 2xx: nothing of it is installed.
            Some(_) if d.confirmed.is_some() => Vec::new(),
            Some(t) if d.active_fork.as_deref() == Some(t) => {
                let mut ops = Vec::new();
                if let Some(d) = self.dialogs.get_mut(dialog) {
                    for f in std::mem::take(&mut d.flows) {
                        self.ids.remove(f.id, &f.flow);
                        ops.push(Op::Remove {
                            id: f.id,
                            flow: f.flow,
                        });
                    }
                    d.active_fork = None;
                }
                ops.extend(self.remove_transfers(dialog, |_| true));
                ops
            }
            Some(_) => Vec::new(),
        }
    }

    pub(super) fn drop_dialog(&mut self, key: &DialogKey) -> Vec<Op> {
        if let Some(d) = self.dialogs.get_mut(key) {
            let blocks: Vec<Block> = d
                .slots
                .iter()
                .flatten()
                .flat_map(|s| s.blocks.iter().flatten().copied())
                .chain(d.retired.take())
                .chain(d.transfers.iter().flat_map(|t| t.blocks.iter().copied()))
                .collect();
            d.client = None;
            d.slots.clear();
            for b in &blocks {
                self.pool.free(b);
            }
        }
        self.recount(key);
        let Some(d) = self.dialogs.remove(key) else {
            return Vec::new();
        };
        let mut ops = Vec::new();
        for f in d.flows {
            self.ids.remove(f.id, &f.flow);
            ops.push(Op::Remove {
                id: f.id,
                flow: f.flow,
            });
        }
        for t in d.transfers {
            self.ids.remove(t.id, &t.flow);
            ops.push(Op::Remove {
                id: t.id,
                flow: t.flow,
            });
        }
        ops
    }

    /// Removes the transfers of `key` that `pred` selects, frees their
    /// ports and returns the removals.
    pub(super) fn remove_transfers(
        &mut self,
        key: &DialogKey,
        pred: impl Fn(&Transfer) -> bool,
    ) -> Vec<Op> {
        let Some(d) = self.dialogs.get_mut(key) else {
            return Vec::new();
        };
        let (gone, kept): (Vec<Transfer>, Vec<Transfer>) = std::mem::take(&mut d.transfers)
            .into_iter()
            .partition(|t| pred(t));
        d.transfers = kept.into();
        let mut ops = Vec::new();
        for t in gone {
            for b in &t.blocks {
                self.pool.free(b);
            }
            self.ids.remove(t.id, &t.flow);
            ops.push(Op::Remove {
                id: t.id,
                flow: t.flow,
            });
        }
        self.recount(key);
        ops
    }

    /// Packets a flow has carried so far (both directions), as read from the
    /// datapath counters. A change marks the dialog active at `now`.
    pub fn on_activity(&mut self, id: PinholeId, packets: u64, now: Instant) {
        let Some(key) = self.ids.dialog(id) else {
            return;
        };
        let Some(d) = self.dialogs.get_mut(key) else {
            return;
        };
        if let Some(t) = d.transfers.iter_mut().find(|t| t.id == id) {
            // A transfer's activity is its own: it never keeps the call's
            // media alive, nor does the call keep it.
            if packets != t.packets {
                t.packets = packets;
                t.last_activity = now;
            }
            return;
        }
        if let Some(f) = d.flows.iter_mut().find(|f| f.id == id) {
            if packets != f.packets {
                // Counters restart when an Update rewrites the rules.
                f.packets = packets;
                if packets > 0 {
                    d.last_activity = now;
                    d.ever_active = true;
                }
            }
        }
    }

    /// Expire dialogs (module doc: Expiry). Returns the expired dialogs and
    /// the operations removing their pinholes.
    pub fn on_tick(&mut self, now: Instant) -> (Vec<DialogKey>, Vec<Op>) {
        self.journal = None;
        let expired: Vec<DialogKey> = self
            .dialogs
            .iter()
            .filter(|(_, d)| {
                let age = now.saturating_duration_since(d.created);
                let quiet = now.saturating_duration_since(d.last_activity);
                let has_flows = !d.flows.is_empty();
                age >= self.s.max_call
                    || (has_flows && d.ever_active && quiet >= self.s.idle_timeout)
                    || (has_flows
                        && !d.ever_active
                        && d.confirmed_at.is_some()
                        && quiet >= self.s.unused_timeout)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut ops = Vec::new();
        for k in &expired {
            ops.extend(self.drop_dialog(k));
        }
        // Transfers expire on their own, leaving the dialog alone.
        let (idle, unused) = (self.s.idle_timeout, self.s.unused_timeout);
        let stale = |t: &Transfer| {
            if t.packets == 0 {
                now.saturating_duration_since(t.installed_at) >= unused
            } else {
                now.saturating_duration_since(t.last_activity) >= idle
            }
        };
        let with_stale: Vec<DialogKey> = self
            .dialogs
            .iter()
            .filter(|(_, d)| d.transfers.iter().any(stale))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &with_stale {
            ops.extend(self.remove_transfers(k, stale));
        }
        (expired, ops)
    }
}
