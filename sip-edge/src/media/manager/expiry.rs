//! The end of media: dialog ends, activity counters from the datapath, and
//! the idle / never-used / maximum-length timers checked on tick.

use std::ops::Bound::{Excluded, Unbounded};

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

    /// A share of the tick's expiry check, between ticks (the driver's
    /// timers, every 100 ms): the next `1 / parts` of the dialogs, in key
    /// order, from where the last share stopped; nothing once this round
    /// has looked at every dialog. What would be due by the next tick (a
    /// second ahead) is kept for the tick, which checks it again: a call
    /// ends at the same tick as when the tick looked at every dialog.
    ///
    /// At 50k held calls the check of every dialog at once (two walks:
    /// dialogs, then their file transfers) held the driver 5.5-18 ms each
    /// second while calls waited (issue #12, a probe in the scale bench).
    /// A queue by expiry time would skip the walk altogether but keeps an
    /// entry per dialog (its key and a time, ~60 B per call with the
    /// queue's slack, against the 2 kB per call budget); the walk in
    /// shares costs no memory.
    pub fn on_timers(&mut self, now: Instant, parts: usize) {
        let share = self.dialogs.len().div_ceil(parts.max(1)).max(1);
        let by = now.checked_add(TICK).unwrap_or(now);
        self.sweep_on(by, Some(share));
    }

    /// Expire dialogs (module doc: Expiry). Returns the expired dialogs and
    /// the operations removing their pinholes.
    ///
    /// The tick looks at the dialogs this round's shares (`on_timers`) did
    /// not reach (all of them where nothing calls `on_timers`), then ends
    /// what any of them found, each checked again now: activity since the
    /// share looked may have kept it. Then a new round starts.
    pub fn on_tick(&mut self, now: Instant) -> (Vec<DialogKey>, Vec<Op>) {
        self.journal = None;
        self.looked = self.sweep_on(now, None);
        self.sweep = Sweep::Start;
        let mut found = std::mem::take(&mut self.swept);
        // In key order, as a walk of the dialogs gave them.
        found.sort_unstable();
        found.dedup();
        let s = &self.s;
        let (expired, with_stale): (Vec<DialogKey>, Vec<DialogKey>) = found
            .into_iter()
            .filter(|k| self.dialogs.get(k).is_some_and(|d| due(d, s, now)))
            .partition(|k| self.dialogs.get(k).is_some_and(|d| expired(d, s, now)));
        let mut ops = Vec::new();
        for k in &expired {
            ops.extend(self.drop_dialog(k));
        }
        // Transfers expire on their own, leaving the dialog alone.
        let (idle, unused) = (self.s.idle_timeout, self.s.unused_timeout);
        for k in &with_stale {
            ops.extend(self.remove_transfers(k, |t| stale(t, idle, unused, now)));
        }
        (expired, ops)
    }

    /// How many dialogs the last tick looked at itself (the rest were
    /// looked at by this round's shares).
    pub fn expiry_looked(&self) -> usize {
        self.looked
    }

    /// Looks at up to `budget` dialogs (all that are left: `None`) from
    /// where the sweep stands, keeps those due by `by` in `swept`; how many
    /// it looked at.
    fn sweep_on(&mut self, by: Instant, budget: Option<usize>) -> usize {
        let range = match &self.sweep {
            Sweep::Start => self.dialogs.range::<DialogKey, _>(..),
            Sweep::After(k) => self.dialogs.range::<DialogKey, _>((Excluded(k), Unbounded)),
            Sweep::Done => return 0,
        };
        let mut looked = 0;
        let mut last = None;
        for (k, d) in range {
            if budget.is_some_and(|b| looked >= b) {
                break;
            }
            looked += 1;
            if due(d, &self.s, by) {
                self.swept.push(k.clone());
            }
            last = Some(k);
        }
        let more = budget.is_some_and(|b| looked >= b);
        self.sweep = match last {
            Some(k) if more => Sweep::After(k.clone()),
            _ => Sweep::Done,
        };
        looked
    }
}

/// The tick's period: how far ahead a share looks (`Manager::on_timers`).
const TICK: Duration = Duration::from_secs(1);

/// Where a round of the expiry sweep stands.
#[derive(Clone, Debug, Default)]
pub(super) enum Sweep {
    /// Nothing looked at yet.
    #[default]
    Start,
    /// Looked at every dialog up to this key.
    After(DialogKey),
    /// Looked at every dialog.
    Done,
}

/// Whether the media of `d` expired at `now`.
fn expired(d: &Dialog, s: &Settings, now: Instant) -> bool {
    let age = now.saturating_duration_since(d.created);
    let quiet = now.saturating_duration_since(d.last_activity);
    let has_flows = !d.flows.is_empty();
    age >= s.max_call
        || (has_flows && d.ever_active && quiet >= s.idle_timeout)
        || (has_flows && !d.ever_active && d.confirmed_at.is_some() && quiet >= s.unused_timeout)
}

/// Whether transfer `t` expired at `now`: never used for `unused_timeout`
/// after its install, or idle for `idle_timeout`.
fn stale(t: &Transfer, idle: Duration, unused: Duration, now: Instant) -> bool {
    if t.packets == 0 {
        now.saturating_duration_since(t.installed_at) >= unused
    } else {
        now.saturating_duration_since(t.last_activity) >= idle
    }
}

/// Whether `d` or one of its transfers expired at `now`.
fn due(d: &Dialog, s: &Settings, now: Instant) -> bool {
    expired(d, s, now)
        || d.transfers
            .iter()
            .any(|t| stale(t, s.idle_timeout, s.unused_timeout, now))
}
