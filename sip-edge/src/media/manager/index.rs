//! Which dialog owns each installed flow, and which flow owns each map key.
//!
//! Every offer/answer and file transfer must check that its flows' map keys
//! are not held by another flow (in nat mode the client's own address is a
//! key). That check used to gather the keys of every installed flow into a
//! set per offer, an O(calls) walk that dominated the agent's CPU once it
//! held tens of thousands of calls (issue #12, scale series). The index is
//! kept up to date where flows are installed and removed instead, so the
//! check is one hash lookup per key. A flow's keys never change while it is
//! installed (an `Op::Update` keeps them, anything else is a new flow), so
//! removing by the flow's own keys is exact.

use std::collections::HashMap;

use sip_edge_common::PinholeKey;

use super::{keys_of, DialogKey, PinholeId};
use crate::datapath::rules::Flow;

#[derive(Debug, Default)]
pub(super) struct FlowIndex {
    dialog_of: HashMap<PinholeId, DialogKey>,
    owner_of: HashMap<PinholeKey, PinholeId>,
}

impl FlowIndex {
    /// Records flow `id` of dialog `dialog` and the map keys it holds.
    pub(super) fn insert(&mut self, id: PinholeId, dialog: &DialogKey, flow: &Flow) {
        self.dialog_of.insert(id, dialog.clone());
        for k in keys_of(flow) {
            // The uniqueness checks keep a key to one flow; should two ever
            // hold it, the first keeps it (its rule is the one removed last
            // by `remove` below only if it is still the owner).
            self.owner_of.entry(k).or_insert(id);
        }
    }

    /// Forgets flow `id` (`flow` is what it was installed with).
    pub(super) fn remove(&mut self, id: PinholeId, flow: &Flow) {
        self.dialog_of.remove(&id);
        for k in keys_of(flow) {
            if self.owner_of.get(&k) == Some(&id) {
                self.owner_of.remove(&k);
            }
        }
    }

    /// The dialog flow `id` belongs to.
    pub(super) fn dialog(&self, id: PinholeId) -> Option<&DialogKey> {
        self.dialog_of.get(&id)
    }

    /// The flow holding map key `k`, if any.
    pub(super) fn owner(&self, k: &PinholeKey) -> Option<PinholeId> {
        self.owner_of.get(k).copied()
    }

    /// Every installed flow id.
    pub(super) fn ids(&self) -> impl Iterator<Item = PinholeId> + '_ {
        self.dialog_of.keys().copied()
    }
}
