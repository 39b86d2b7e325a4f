//! The media layer's side of HA (`crate::ha`): what each applied pinhole
//! operation writes to the store, the mirrors of the other nodes' flows
//! installed through the same sink, their claim when traffic reaches them
//! here, and the read of the store before the listeners open. Each is
//! called from one line of `media::control`.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use super::*;
use crate::ha::{
    self,
    replica::{Action, Mirror, Replicas},
    store::{self, Change, Handle, Snapshot},
    HaSection, Record, Role, Status,
};

/// Sink ids of mirrors: below the adopted ones, far above the manager's.
const MIRROR_ID_BASE: u64 = 1 << 61;

/// The HA state of one controller.
pub struct HaNode {
    section: HaSection,
    status: Arc<Status>,
    handle: Handle,
    replicas: Replicas,
}

/// Edge ports a flow holds (those in the media ranges are the manager's).
fn flow_ports(flow: &Flow) -> Vec<u16> {
    match flow {
        Flow::Relay {
            edge_int, public, ..
        } => vec![edge_int.port(), public.port()],
        Flow::Nat { public, .. } => vec![public.port()],
    }
}

impl<S: PinholeSink> MediaController<S> {
    /// Start: reads the store once (bounded), drops the flows a previous
    /// run left whose key is gone (claimed elsewhere or ended), mirrors the
    /// other nodes' flows, then starts the store task. A store that does
    /// not answer leaves the node running alone (logged, counted).
    pub(super) fn ha_start(&mut self, section: &HaSection, ttl: Duration) {
        let status = Arc::new(Status::new(section));
        ha::publish(status.clone());
        let mut own = Vec::new();
        let first = store::read_blocking(section);
        match &first {
            Ok(snap) => {
                status.store_health(true, "");
                let me = &section.node;
                let gone = self.adopted.take_where(|f| {
                    f.journal_id
                        .as_ref()
                        .is_some_and(|j| !snap.records.contains_key(&section.key(me, j)))
                });
                if !gone.is_empty() {
                    tracing::info!(
                        flows = gone.len(),
                        "HA: flows of this node's previous run that the store no longer has (another node took them, or they ended) are removed"
                    );
                }
                self.drop_adopted(gone, "not in the HA store");
                own = snap
                    .records
                    .values()
                    .filter(|r| &r.node == me)
                    .cloned()
                    .collect();
            }
            Err(e) => {
                status.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(store = %status.store, error = %e, "HA store unreachable at start: running as a single node; other nodes' calls are not mirrored until it answers");
            }
        }
        let handle = store::spawn(section, status.clone(), ttl, own);
        self.ha = Some(HaNode {
            section: section.clone(),
            status: status.clone(),
            handle,
            replicas: Replicas::new(&section.node, MIRROR_ID_BASE),
        });
        if let Ok(snap) = first {
            self.ha_apply(&snap);
            status.resynced.store(true, Ordering::Relaxed);
            tracing::info!(
                mirrored = self.ha.as_ref().map_or(0, |h| h.replicas.len()),
                "HA: resynchronised from the store before taking traffic"
            );
        }
    }

    /// Writes what applied `ops` changed to the store.
    pub(super) fn ha_ops(&mut self, ops: &[Op]) {
        let Some(h) = &self.ha else { return };
        for op in ops {
            match op {
                Op::Install { id, flow } | Op::Update { id, flow, .. } => {
                    if let Some(d) = self.mgr.dialog_of(*id) {
                        let record = Record {
                            node: h.section.node.clone(),
                            id: format!("{}-{}", self.run, id.0),
                            call_id: d.call_id.clone(),
                            from_tag: d.from_tag.clone(),
                            flow: *flow,
                            ports: flow_ports(flow),
                            written_ms: ha::now_ms(),
                        };
                        h.handle.writer.send(Change::Put(Box::new(record)));
                    }
                }
                Op::Remove { id, .. } => {
                    let key = h
                        .section
                        .key(&h.section.node, &format!("{}-{}", self.run, id.0));
                    h.handle.writer.send(Change::Del(key));
                }
            }
        }
    }

    /// An adopted flow (a claimed mirror, or one of the previous run) ended.
    pub(super) fn ha_adopted_gone(&self, f: &AdoptedFlow) {
        if let (Some(h), Some(j)) = (&self.ha, &f.journal_id) {
            let key = h.section.key(&h.section.node, j);
            h.handle.writer.send(Change::Del(key));
        }
    }

    /// Counter of `id` on tick: `true` if it is a mirror (its call taken
    /// over if it carried traffic).
    pub(super) fn ha_activity(&mut self, id: PinholeId, packets: u64, now: Instant) -> bool {
        let Some(h) = &mut self.ha else { return false };
        if !h.replicas.contains(id) {
            return false;
        }
        let taken = h.replicas.claim(id, packets);
        self.ha_take(taken, Some((id, packets)), now);
        true
    }

    /// An in-dialog BYE for a dialog this process does not know: if it is
    /// a mirrored call, take it over first, so the BYE ends it here.
    pub(super) fn ha_claim_dialog(&mut self, call_id: &str, tags: &[&str], now: Instant) {
        let Some(h) = &mut self.ha else { return };
        let taken = h.replicas.claim_dialog(call_id, tags);
        self.ha_take(taken, None, now);
    }

    /// Makes `taken` mirrors this node's: journalled, written under its
    /// prefix (the old owner's key deleted), adopted (`media::adopt`).
    fn ha_take(&mut self, taken: Vec<Mirror>, moved: Option<(PinholeId, u64)>, now: Instant) {
        let Some(h) = &mut self.ha else { return };
        for m in taken {
            let jid = format!("{}-m{}", self.run, m.id.0);
            let dialog = DialogKey {
                call_id: m.record.call_id.clone(),
                from_tag: m.record.from_tag.clone(),
            };
            if let Some(j) = &mut self.journal {
                j.add(&jid, &dialog, flow_keys_text(&m.record.flow));
            }
            let record = Record {
                node: h.section.node.clone(),
                id: jid.clone(),
                written_ms: ha::now_ms(),
                ..m.record.clone()
            };
            h.handle.writer.send(Change::Put(Box::new(record)));
            h.handle.writer.send(Change::Del(m.key.clone()));
            h.status.claimed.fetch_add(1, Ordering::Relaxed);
            if h.status.role() != Role::Active {
                h.status.set_role(Role::Active);
                tracing::warn!(from = %m.record.node, "HA: another node's calls reach this node: taking them over (role active)");
            }
            tracing::info!(call_id = %dialog.call_id, from = %m.record.node, "HA: flow taken over");
            let packets = moved.filter(|(id, _)| *id == m.id).map_or(0, |(_, p)| p);
            self.adopted.add(
                AdoptedFlow {
                    id: m.id,
                    journal_id: Some(jid),
                    dialog: Some(dialog),
                    ports: m.record.ports.clone(),
                },
                packets,
                now,
            );
        }
        h.status
            .mirrored
            .store(h.replicas.len() as u64, Ordering::Relaxed);
    }

    /// On tick: follow the store's latest read.
    pub(super) fn ha_tick(&mut self) {
        let Some(h) = &mut self.ha else { return };
        if !h.handle.snapshot.has_changed().unwrap_or(false) {
            return;
        }
        let Some(snap) = h.handle.snapshot.borrow_and_update().clone() else {
            return;
        };
        if !h.status.resynced.swap(true, Ordering::Relaxed) {
            tracing::info!("HA: first read of the store since start");
        }
        self.ha_apply(&snap);
    }

    fn ha_apply(&mut self, snap: &Snapshot) {
        let Some(h) = &mut self.ha else { return };
        let actions = h.replicas.reconcile(&snap.records);
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        for a in actions {
            match a {
                Action::Install { id, key, record } => match self.sink.install(id, &record.flow) {
                    Ok(()) => self.mgr.hold_ports(&record.ports),
                    Err(e) => {
                        failed.insert(key, e.to_string());
                    }
                },
                Action::Remove(m) => {
                    if let Err(e) = self.sink.remove(m.id) {
                        tracing::warn!(error = %e, "HA: removing a mirror failed");
                    }
                    self.mgr.release_ports(&m.record.ports);
                }
            }
        }
        for (key, why) in &failed {
            h.replicas.forget(key);
            tracing::debug!(%key, %why, "HA: mirror not installed (retried at the next read)");
        }
        h.status
            .mirrored
            .store(h.replicas.len() as u64, Ordering::Relaxed);
    }
}
