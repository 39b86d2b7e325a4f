//! The other nodes' flows this node mirrors (sans-IO): given what the store
//! holds, which mirrors to install and which to remove; given a mirror's
//! packet counter, whether this node has taken it over. The media layer
//! (`media::control`) applies the answers to its map writer.

use std::collections::BTreeMap;

use super::Record;
use crate::media::manager::PinholeId;

/// One installed mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// Its id in the sink.
    pub id: PinholeId,
    /// Its store key.
    pub key: String,
    /// What the store said.
    pub record: Record,
}

/// What the media layer does to follow the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Install `record`'s flow under `id` and hold its ports.
    Install {
        /// Sink id.
        id: PinholeId,
        /// Store key.
        key: String,
        /// The flow's record.
        record: Record,
    },
    /// Remove mirror `id` and release its ports.
    Remove(Mirror),
}

/// The mirrors of one node.
#[derive(Debug)]
pub struct Replicas {
    me: String,
    base: u64,
    next: u64,
    mirrors: BTreeMap<String, Mirror>,
    /// Keys this node claimed, until the store no longer has them (the
    /// claim deletes them; a read from before that must not mirror them
    /// again).
    claimed: std::collections::BTreeSet<String>,
}

impl Replicas {
    /// Mirrors of node `me`; sink ids count from `base`.
    pub fn new(me: &str, base: u64) -> Replicas {
        Replicas {
            me: me.to_owned(),
            base,
            next: 0,
            mirrors: BTreeMap::new(),
            claimed: std::collections::BTreeSet::new(),
        }
    }

    /// Mirrors installed.
    pub fn len(&self) -> usize {
        self.mirrors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.mirrors.is_empty()
    }

    /// Whether `id` is a mirror.
    pub fn contains(&self, id: PinholeId) -> bool {
        self.mirrors.values().any(|m| m.id == id)
    }

    /// The actions that make the mirrors match `store` (key → record, every
    /// node's; this node's own are skipped). A record that changed (a
    /// re-INVITE at its owner) is removed and installed again. Installs
    /// come after removals: a changed flow may reuse a key.
    pub fn reconcile(&mut self, store: &BTreeMap<String, Record>) -> Vec<Action> {
        let mut out = Vec::new();
        let gone: Vec<String> = self
            .mirrors
            .iter()
            .filter(|(k, m)| store.get(*k).is_none_or(|r| r.flow != m.record.flow))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(m) = self.mirrors.remove(&k) {
                out.push(Action::Remove(m));
            }
        }
        self.claimed.retain(|k| store.contains_key(k));
        for (k, r) in store {
            if r.node == self.me || self.mirrors.contains_key(k) || self.claimed.contains(k) {
                continue;
            }
            let id = PinholeId(self.base + self.next);
            self.next += 1;
            self.mirrors.insert(
                k.clone(),
                Mirror {
                    id,
                    key: k.clone(),
                    record: r.clone(),
                },
            );
            out.push(Action::Install {
                id,
                key: k.clone(),
                record: r.clone(),
            });
        }
        out
    }

    /// An install failed (a key this node already has): forget it; the next
    /// reconcile tries again.
    pub fn forget(&mut self, key: &str) {
        self.mirrors.remove(key);
    }

    /// Mirror `id` counted `packets`: traffic for it reached this node, so
    /// its call is this node's now. Returns every mirror of that dialog
    /// (its other streams, RTCP, go with it: a pinhole dies with its
    /// dialog, wherever the dialog is) when `packets` > 0.
    pub fn claim(&mut self, id: PinholeId, packets: u64) -> Vec<Mirror> {
        if packets == 0 {
            return Vec::new();
        }
        let Some(m) = self.mirrors.values().find(|m| m.id == id) else {
            return Vec::new();
        };
        let (call_id, tag) = (m.record.call_id.clone(), m.record.from_tag.clone());
        self.claim_dialog(&call_id, &[tag.as_str()])
    }

    /// Takes every mirror of the dialog with Call-ID `call_id` whose
    /// caller tag is one of `tags` (an in-dialog request reached this node
    /// for it).
    pub fn claim_dialog(&mut self, call_id: &str, tags: &[&str]) -> Vec<Mirror> {
        let keys: Vec<String> = self
            .mirrors
            .iter()
            .filter(|(_, m)| {
                m.record.call_id == call_id && tags.iter().any(|t| *t == m.record.from_tag)
            })
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter()
            .filter_map(|k| {
                self.claimed.insert(k.clone());
                self.mirrors.remove(&k)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::rules::{Flow, LearnPort, Proto};

    fn rec(node: &str, id: &str, port: u16) -> Record {
        Record {
            node: node.into(),
            id: id.into(),
            call_id: format!("call-{id}"),
            from_tag: "t".into(),
            flow: Flow::Relay {
                proto: Proto::Udp,
                client: "10.77.0.2:4000".parse().unwrap(),
                edge_int: format!("10.77.0.1:{port}").parse().unwrap(),
                public: format!("203.0.113.1:{}", port + 2).parse().unwrap(),
                peer: "198.51.100.2:5000".parse().unwrap(),
                latch_peer: false,
                learn_port: LearnPort::Neither,
            },
            ports: vec![port, port + 2],
            written_ms: 1,
            media: None,
        }
    }

    fn store(list: &[(&str, Record)]) -> BTreeMap<String, Record> {
        list.iter()
            .map(|(k, r)| ((*k).to_owned(), r.clone()))
            .collect()
    }

    fn installs(a: &[Action]) -> Vec<&str> {
        a.iter()
            .filter_map(|a| match a {
                Action::Install { key, .. } => Some(key.as_str()),
                Action::Remove(_) => None,
            })
            .collect()
    }

    fn removes(a: &[Action]) -> Vec<&str> {
        a.iter()
            .filter_map(|a| match a {
                Action::Remove(m) => Some(m.key.as_str()),
                Action::Install { .. } => None,
            })
            .collect()
    }

    #[test]
    fn other_nodes_flows_are_mirrored_and_go_with_their_keys() {
        let mut r = Replicas::new("b", 1000);
        let s = store(&[
            ("p:a:ph:1", rec("a", "1", 40000)),
            ("p:a:ph:2", rec("a", "2", 40010)),
            ("p:b:ph:9", rec("b", "9", 40020)),
        ]);
        let a = r.reconcile(&s);
        assert_eq!(
            installs(&a),
            vec!["p:a:ph:1", "p:a:ph:2"],
            "own keys skipped"
        );
        assert!(r.reconcile(&s).is_empty(), "nothing changed");
        // Call 1 ended at its owner (or its key expired).
        let s2 = store(&[("p:a:ph:2", rec("a", "2", 40010))]);
        let a = r.reconcile(&s2);
        assert_eq!(removes(&a), vec!["p:a:ph:1"]);
        assert!(installs(&a).is_empty());
        assert_eq!(r.len(), 1);
        // A re-INVITE moved call 2's flow: removed, then installed again.
        let s3 = store(&[("p:a:ph:2", rec("a", "2", 40030))]);
        let a = r.reconcile(&s3);
        assert_eq!(
            (removes(&a), installs(&a)),
            (vec!["p:a:ph:2"], vec!["p:a:ph:2"])
        );
        assert!(matches!(a[0], Action::Remove(_)), "removal first: {a:?}");
        // The store emptied (every call over): no mirror left.
        assert_eq!(removes(&r.reconcile(&BTreeMap::new())), vec!["p:a:ph:2"]);
        assert!(r.is_empty());
    }

    #[test]
    fn a_claim_takes_the_whole_dialog_and_a_bye_claims_too() {
        let mut r = Replicas::new("b", 1000);
        let mut rtcp = rec("a", "2", 40001);
        rtcp.call_id = "call-1".into();
        let other = rec("a", "3", 40020);
        let a = r.reconcile(&store(&[
            ("p:a:ph:1", rec("a", "1", 40000)),
            ("p:a:ph:2", rtcp),
            ("p:a:ph:3", other),
        ]));
        let Action::Install { id, .. } = a[0].clone() else {
            panic!("{a:?}")
        };
        let keys: Vec<String> = r.claim(id, 1).into_iter().map(|m| m.key).collect();
        assert_eq!(keys, vec!["p:a:ph:1", "p:a:ph:2"], "RTP and RTCP of call 1");
        assert!(r.claim_dialog("call-3", &["someone-else"]).is_empty());
        assert_eq!(r.claim_dialog("call-3", &["x", "t"]).len(), 1, "either tag");
        assert!(r.is_empty());
    }

    #[test]
    fn a_mirror_is_claimed_once_its_counter_moves() {
        let mut r = Replicas::new("b", 1000);
        let a = r.reconcile(&store(&[("p:a:ph:1", rec("a", "1", 40000))]));
        let Action::Install { id, .. } = a[0].clone() else {
            panic!("{a:?}")
        };
        assert!(r.contains(id));
        assert!(r.claim(id, 0).is_empty(), "no traffic: still a mirror");
        let m = r.claim(id, 3);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].record.id, "1");
        assert!(!r.contains(id) && r.claim(id, 9).is_empty());
        // A read from before the claim's delete does not mirror it again;
        // once the key is gone, a new key of that name would be.
        let s = store(&[("p:a:ph:1", rec("a", "1", 40000))]);
        assert!(r.reconcile(&s).is_empty());
        assert!(r.reconcile(&BTreeMap::new()).is_empty());
        assert_eq!(installs(&r.reconcile(&s)), vec!["p:a:ph:1"]);
        let mut f = Replicas::new("b", 1000);
        let a = f.reconcile(&store(&[("p:a:ph:1", rec("a", "1", 40000))]));
        f.forget("p:a:ph:1");
        assert_eq!(a.len(), 1);
        assert_eq!(
            installs(&f.reconcile(&store(&[("p:a:ph:1", rec("a", "1", 40000))]))),
            vec!["p:a:ph:1"],
            "a failed install is tried again"
        );
    }
}
