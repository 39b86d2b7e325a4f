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
                            call_id: d.call_id.to_string(),
                            from_tag: d.from_tag.to_string(),
                            flow: *flow,
                            ports: flow_ports(flow),
                            written_ms: ha::now_ms(),
                            media: self.mgr.place_of(*id),
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
                call_id: m.record.call_id.as_str().into(),
                from_tag: m.record.from_tag.as_str().into(),
            };
            if let Some(j) = &mut self.journal {
                j.add_media(
                    &jid,
                    &dialog,
                    flow_keys_text(&m.record.flow),
                    m.record.media,
                );
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
            // An elected node's role is its lease's (`store::elect`).
            if !h.status.election && h.status.role() != Role::Active {
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
                    media: m.record.media.filter(|x| x.flow == m.record.flow),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        config::{MediaCandidates, MediaMode, PortRange},
        datapath::rules::{LearnPort, Proto},
        media::{manager::Settings, policy::ExternalSources},
    };

    fn settings() -> Settings {
        Settings {
            mode: MediaMode::Relay,
            internal_addrs: vec!["10.77.0.1".parse().expect("ip")],
            public_addrs: vec!["203.0.113.1".parse().expect("ip")],
            port_ranges: vec![PortRange {
                start: 40000,
                end: 40099,
            }],
            reserved_ports: Vec::new(),
            allowed_internal_subnets: Vec::new(),
            max_flows_per_client: 8,
            max_flows: 1000,
            max_calls: 100,
            idle_timeout: Duration::from_secs(60),
            unused_timeout: Duration::from_secs(20),
            max_call: Duration::from_secs(3600),
            latch: false,
            external_sources: ExternalSources::Signalling,
        }
    }

    fn record(node: &str, id: &str, call: &str, port: u16) -> Record {
        Record {
            node: node.into(),
            id: id.into(),
            call_id: call.into(),
            from_tag: "caller".into(),
            flow: Flow::Relay {
                proto: Proto::Udp,
                client: "10.77.0.2:4000".parse().expect("addr"),
                edge_int: format!("10.77.0.1:{port}").parse().expect("addr"),
                public: format!("203.0.113.1:{}", port + 1).parse().expect("addr"),
                peer: "198.51.100.2:5000".parse().expect("addr"),
                latch_peer: false,
                learn_port: LearnPort::Neither,
            },
            ports: vec![port, port + 1],
            written_ms: 1,
            media: None,
        }
    }

    type Fixture = (
        MediaController<RecordingSink>,
        tokio::sync::mpsc::Receiver<Change>,
        tokio::sync::watch::Sender<Option<Arc<Snapshot>>>,
        Arc<Status>,
    );

    fn node_b() -> Fixture {
        node("b")
    }

    fn node(name: &str) -> Fixture {
        let section: HaSection = toml::from_str(&format!(
            "store = \"redis://127.0.0.1:1/\"\nnode = \"{name}\"\nrole = \"standby\"\n"
        ))
        .expect("section");
        let status = Arc::new(Status::new(&section));
        let (handle, rx, snap) = store::detached(status.clone(), 64);
        let mut c = MediaController::new(
            settings(),
            MediaCandidates::ReplacePrivateHost,
            RecordingSink::default(),
        );
        c.ha = Some(HaNode {
            section: section.clone(),
            status: status.clone(),
            handle,
            replicas: Replicas::new(name, MIRROR_ID_BASE),
        });
        (c, rx, snap, status)
    }

    fn read(snap: &tokio::sync::watch::Sender<Option<Arc<Snapshot>>>, list: &[(&str, Record)]) {
        let records: BTreeMap<String, Record> = list
            .iter()
            .map(|(k, r)| ((*k).to_owned(), r.clone()))
            .collect();
        snap.send(Some(Arc::new(Snapshot { records })))
            .expect("snapshot");
    }

    fn drain(rx: &mut tokio::sync::mpsc::Receiver<Change>) -> Vec<Change> {
        let mut v = Vec::new();
        while let Ok(c) = rx.try_recv() {
            v.push(c);
        }
        v
    }

    /// Issue #11: the standby holds the active node's pinholes; media
    /// reaching it makes the whole call its own (written under its prefix,
    /// the old key deleted); a BYE then removes the rules and the key.
    #[test]
    fn a_mirror_carries_media_then_is_taken_over_and_ended_by_its_bye() {
        let (mut c, mut rx, snap, status) = node_b();
        let now = Instant::now();
        read(
            &snap,
            &[
                ("sip-edge:a:ph:r1-1", record("a", "r1-1", "call-1", 40010)),
                ("sip-edge:a:ph:r1-2", record("a", "r1-2", "call-1", 40012)),
                ("sip-edge:b:ph:x-1", record("b", "x-1", "own", 40020)),
            ],
        );
        assert!(c.on_tick(now).is_empty());
        assert_eq!(
            c.sink().installed.len(),
            2,
            "a's two flows mirrored, b's own skipped"
        );
        assert_eq!(status.mirrored.load(Ordering::Relaxed), 2);
        assert!(drain(&mut rx).is_empty(), "mirroring writes nothing");
        // A new call of b's own never takes a mirrored port.
        assert_eq!(c.manager().ports_in_use(), 4);

        // Media of the first flow reaches b.
        let ids: Vec<PinholeId> = c.sink().installed.keys().copied().collect();
        c.sink_mut().packets.insert(ids[0], 7);
        c.on_tick(now + Duration::from_secs(1));
        assert_eq!(c.adopted(), 2, "both flows of the call taken over");
        assert_eq!(status.claimed.load(Ordering::Relaxed), 2);
        assert_eq!(status.role(), Role::Active);
        let w = drain(&mut rx);
        let puts: Vec<&Record> = w
            .iter()
            .filter_map(|c| match c {
                Change::Put(r) => Some(&**r),
                Change::Del(_) => None,
            })
            .collect();
        let dels: Vec<&str> = w
            .iter()
            .filter_map(|c| match c {
                Change::Del(k) => Some(k.as_str()),
                Change::Put(_) => None,
            })
            .collect();
        assert_eq!(puts.len(), 2);
        assert!(puts.iter().all(|r| r.node == "b" && r.call_id == "call-1"));
        assert_eq!(dels, vec!["sip-edge:a:ph:r1-1", "sip-edge:a:ph:r1-2"]);
        // A read from before the deletes does not mirror them again.
        c.on_tick(now + Duration::from_secs(2));
        assert_eq!(c.sink().installed.len(), 2);

        // The BYE (callee's: From = callee tag, To = caller tag).
        assert!(c.end_adopted(
            "call-1",
            &["callee", "caller"],
            now + Duration::from_secs(3)
        ));
        assert!(c.sink().installed.is_empty(), "rules gone with the BYE");
        let dels: Vec<String> = drain(&mut rx)
            .into_iter()
            .filter_map(|c| match c {
                Change::Del(k) => Some(k),
                Change::Put(_) => None,
            })
            .collect();
        assert_eq!(dels.len(), 2);
        assert!(
            dels.iter().all(|k| k.starts_with("sip-edge:b:ph:")),
            "{dels:?}"
        );
        assert_eq!(c.manager().ports_in_use(), 0, "ports released");
    }

    /// A mirror goes when its key goes (the call ended at its owner, or
    /// the owner died and the key expired): no rule without a dialog.
    #[test]
    fn a_mirror_goes_with_its_key_and_a_bye_claims_an_unclaimed_call() {
        let (mut c, _rx, snap, status) = node_b();
        let now = Instant::now();
        read(
            &snap,
            &[
                ("sip-edge:a:ph:r1-1", record("a", "r1-1", "call-1", 40010)),
                ("sip-edge:a:ph:r1-2", record("a", "r1-2", "call-2", 40012)),
            ],
        );
        c.on_tick(now);
        assert_eq!(c.sink().installed.len(), 2);
        read(
            &snap,
            &[("sip-edge:a:ph:r1-2", record("a", "r1-2", "call-2", 40012))],
        );
        c.on_tick(now + Duration::from_secs(1));
        assert_eq!(
            c.sink().installed.len(),
            1,
            "call 1's mirror gone with its key"
        );
        assert_eq!(status.mirrored.load(Ordering::Relaxed), 1);
        // A BYE for call 2 reaches b before any of its media did.
        assert!(c.end_adopted(
            "call-2",
            &["caller", "callee"],
            now + Duration::from_secs(2)
        ));
        assert!(c.sink().installed.is_empty());
        assert_eq!(c.manager().ports_in_use(), 0);
    }

    /// Signalling never waits for the store: a full queue drops the
    /// change, counts it, and the call goes on.
    #[test]
    fn a_full_queue_drops_and_counts_never_blocks() {
        let section: HaSection =
            toml::from_str("store = \"redis://127.0.0.1:1/\"\nnode = \"a\"\n").expect("section");
        let status = Arc::new(Status::new(&section));
        let (handle, _rx, _snap) = store::detached(status.clone(), 2);
        for n in 0..5 {
            handle.writer.send(Change::Del(format!("k{n}")));
        }
        assert_eq!(status.queued.load(Ordering::Relaxed), 2);
        assert_eq!(status.dropped.load(Ordering::Relaxed), 3);
    }

    /// One SDP event through `c`.
    #[allow(clippy::too_many_arguments)]
    fn sdp(
        c: &mut MediaController<RecordingSink>,
        d: &DialogKey,
        to_tag: Option<&str>,
        role: crate::media::SdpRole,
        side: Side,
        src: &str,
        body: &str,
        now: Instant,
    ) -> Result<String, MediaError> {
        let ev = SdpEvent {
            dialog: d,
            to_tag,
            role,
            from_side: side,
            source: src.parse().expect("source"),
            media_sources: &[],
            far_media: FarMedia::Config,
            body: body.as_bytes(),
            content_type: "application/sdp",
        };
        c.on_sdp(&ev, now)
            .map(|b| String::from_utf8(b).expect("utf-8"))
    }

    fn audio(ip: &str, port: u16, dir: &str) -> String {
        format!("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na={dir}\r\n")
    }

    /// The port of the first m= line.
    fn m_port(sdp: &str) -> u16 {
        sdp.lines()
            .find_map(|l| l.strip_prefix("m=audio "))
            .and_then(|r| r.split(' ').next())
            .and_then(|p| p.parse().ok())
            .expect("m=audio port")
    }

    /// The records `a` wrote, as the store holds them.
    fn store_of(rx: &mut tokio::sync::mpsc::Receiver<Change>) -> Vec<(String, Record)> {
        let mut m: BTreeMap<String, Record> = BTreeMap::new();
        for c in drain(rx) {
            match c {
                Change::Put(r) => {
                    m.insert(format!("sip-edge:{}:ph:{}", r.node, r.id), *r);
                }
                Change::Del(k) => {
                    m.remove(&k);
                }
            }
        }
        m.into_iter().collect()
    }

    /// Issue #11 gap: a re-INVITE with SDP (hold, then a new media port)
    /// for a call the node took over reached a media layer that did not
    /// set the dialog up: it was handled as a new call (new edge ports, the
    /// old rules left until idle, the new ones never removed by the BYE).
    /// Now the store carries each flow's place in its session and the
    /// survivor rebuilds the session: same edge ports, the old rules
    /// replaced, everything removed at the BYE, only the parties heard.
    #[test]
    fn a_reinvite_with_sdp_for_a_taken_over_call_keeps_the_ports_and_the_bye_ends_it() {
        let now = Instant::now();
        let (mut a, mut a_rx, _a_snap, _) = node("a");
        let d = DialogKey {
            call_id: "call-9".into(),
            from_tag: "caller".into(),
        };
        let offer = sdp(
            &mut a,
            &d,
            None,
            crate::media::SdpRole::Offer,
            Side::Internal,
            "10.77.0.2:5061",
            &audio("10.77.0.2", 4000, "sendrecv"),
            now,
        )
        .expect("offer at a");
        let answer = sdp(
            &mut a,
            &d,
            Some("callee"),
            crate::media::SdpRole::Answer,
            Side::External,
            "198.51.100.2:5061",
            &audio("198.51.100.2", 5000, "sendrecv"),
            now,
        )
        .expect("answer at a");
        let (edge_pub, edge_int) = (m_port(&offer), m_port(&answer));
        assert_eq!(a.sink().installed.len(), 2, "RTP and RTCP at a");
        let written = store_of(&mut a_rx);
        assert_eq!(written.len(), 2);
        assert!(
            written.iter().all(|(_, r)| r.media.is_some()),
            "each record carries its place: {written:?}"
        );

        // b mirrors a's call; a dies; a stranger cannot move the media.
        let (mut b, mut b_rx, b_snap, _) = node("b");
        let list: Vec<(&str, Record)> = written
            .iter()
            .map(|(k, r)| (k.as_str(), r.clone()))
            .collect();
        read(&b_snap, &list);
        b.on_tick(now);
        assert_eq!(b.sink().installed.len(), 2, "mirrored at b");
        let t = now + Duration::from_secs(1);
        let stranger = sdp(
            &mut b,
            &d,
            Some("callee"),
            crate::media::SdpRole::Offer,
            Side::Internal,
            "10.77.0.9:5061",
            &audio("10.77.0.9", 4100, "sendonly"),
            t,
        );
        assert!(
            matches!(stranger, Err(MediaError::Forbidden { .. })),
            "{stranger:?}"
        );

        // Hold: alice's re-INVITE (a=sendonly) through b.
        let reoffer = sdp(
            &mut b,
            &d,
            Some("callee"),
            crate::media::SdpRole::Offer,
            Side::Internal,
            "10.77.0.2:5061",
            &audio("10.77.0.2", 4000, "sendonly"),
            t,
        )
        .expect("hold re-INVITE at b");
        assert_eq!(m_port(&reoffer), edge_pub, "the edge port does not move");
        assert!(reoffer.contains("a=sendonly"), "{reoffer}");
        let reanswer = sdp(
            &mut b,
            &d,
            Some("callee"),
            crate::media::SdpRole::Answer,
            Side::External,
            "198.51.100.2:5061",
            &audio("198.51.100.2", 5000, "recvonly"),
            t,
        )
        .expect("its answer");
        assert_eq!(m_port(&reanswer), edge_int);
        assert_eq!(b.sink().installed.len(), 2, "nothing added");
        assert_eq!(b.adopted(), 0, "the session is the manager's now");

        // New media ports both ways, the offer from bob this time (his
        // From tag names the dialog; the To tag is alice's).
        let bobs = DialogKey {
            call_id: "call-9".into(),
            from_tag: "callee".into(),
        };
        let reoffer = sdp(
            &mut b,
            &bobs,
            Some("caller"),
            crate::media::SdpRole::Offer,
            Side::External,
            "198.51.100.2:5061",
            &audio("198.51.100.2", 5100, "sendrecv"),
            t,
        )
        .expect("bob's re-INVITE");
        assert_eq!(m_port(&reoffer), edge_int, "the edge port does not move");
        sdp(
            &mut b,
            &bobs,
            Some("caller"),
            crate::media::SdpRole::Answer,
            Side::Internal,
            "10.77.0.2:5061",
            &audio("10.77.0.2", 4100, "sendrecv"),
            t,
        )
        .expect("alice's answer");
        let flows: Vec<Flow> = b.sink().installed.values().copied().collect();
        assert_eq!(flows.len(), 2, "{flows:?}");
        for f in &flows {
            let Flow::Relay { client, peer, .. } = f else {
                panic!("{f:?}")
            };
            assert!(
                [4100, 4101].contains(&client.port()) && [5100, 5101].contains(&peer.port()),
                "the old rules are replaced: {f:?}"
            );
        }
        let mine = store_of(&mut b_rx);
        assert!(
            mine.iter()
                .all(|(k, r)| k.starts_with("sip-edge:b:") && r.media.is_some()),
            "{mine:?}"
        );
        assert_eq!(mine.len(), 2, "b's records of the call: {mine:?}");

        // The BYE (bob's) removes everything, and the records.
        assert!(b.end_adopted("call-9", &["callee", "caller"], t));
        assert!(b.sink().installed.is_empty(), "{:?}", b.sink().installed);
        assert_eq!(b.manager().ports_in_use(), 0, "ports released");
        assert_eq!(b.manager().dialogs(), 0);
        let dels = drain(&mut b_rx)
            .into_iter()
            .filter(|c| matches!(c, Change::Del(k) if k.starts_with("sip-edge:b:")))
            .count();
        assert_eq!(dels, 2);
    }

    /// The same after a `kill -9` and restart of a single node (issue #11
    /// item 1, `[proxy] token_key_file`): the journal carries each flow's
    /// place, the restarted run adopts the rules with it (as `recover`
    /// does), and a re-INVITE with SDP keeps the edge ports and replaces
    /// the rules; its BYE removes them and their journal lines.
    #[test]
    fn after_a_restart_the_journal_rebuilds_the_session_for_a_reinvite() {
        let now = Instant::now();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("media.journal");
        let mut first = MediaController::new(
            settings(),
            MediaCandidates::ReplacePrivateHost,
            RecordingSink::default(),
        );
        first.journal = Some(Journal::open(&path).expect("journal").0);
        let d = DialogKey {
            call_id: "call-r".into(),
            from_tag: "caller".into(),
        };
        let role = crate::media::SdpRole::Offer;
        let offer = sdp(
            &mut first,
            &d,
            None,
            role,
            Side::Internal,
            "10.77.0.2:5061",
            &audio("10.77.0.2", 4000, "sendrecv"),
            now,
        )
        .expect("offer");
        sdp(
            &mut first,
            &d,
            Some("callee"),
            crate::media::SdpRole::Answer,
            Side::External,
            "198.51.100.2:5061",
            &audio("198.51.100.2", 5000, "sendrecv"),
            now,
        )
        .expect("answer");
        let rules: Vec<Flow> = first.sink().installed.values().copied().collect();
        drop(first); // kill -9: nothing more is written

        let mut again = MediaController::new(
            settings(),
            MediaCandidates::ReplacePrivateHost,
            RecordingSink::default(),
        );
        let (j, old) = Journal::open(&path).expect("journal again");
        again.journal = Some(j);
        assert_eq!(old.len(), 2, "{old:?}");
        for (n, (jid, r)) in old.iter().enumerate() {
            let m = r.media.expect("the journal carries the flow's place");
            assert!(rules.contains(&m.flow));
            let id = PinholeId(ADOPTED_ID_BASE + n as u64);
            again
                .sink
                .install(id, &m.flow)
                .expect("the rule in the maps");
            let ports = flow_ports(&m.flow);
            again.mgr.hold_ports(&ports);
            again.adopted.add(
                AdoptedFlow {
                    id,
                    journal_id: Some(jid.clone()),
                    dialog: Some(r.dialog.clone()),
                    ports,
                    media: Some(m),
                },
                5,
                now,
            );
        }
        let t = now + Duration::from_secs(1);
        let reoffer = sdp(
            &mut again,
            &d,
            Some("callee"),
            role,
            Side::Internal,
            "10.77.0.2:5061",
            &audio("10.77.0.2", 4100, "sendonly"),
            t,
        )
        .expect("re-INVITE after the restart");
        assert_eq!(m_port(&reoffer), m_port(&offer), "same edge port");
        sdp(
            &mut again,
            &d,
            Some("callee"),
            crate::media::SdpRole::Answer,
            Side::External,
            "198.51.100.2:5061",
            &audio("198.51.100.2", 5000, "recvonly"),
            t,
        )
        .expect("its answer");
        let now_rules: Vec<Flow> = again.sink().installed.values().copied().collect();
        assert_eq!(now_rules.len(), 2);
        assert!(
            now_rules.iter().all(|f| !rules.contains(f)),
            "the old rules are replaced: {now_rules:?}"
        );
        assert_eq!(again.journal.as_ref().expect("journal").len(), 2);
        assert!(again.end_adopted("call-r", &["caller", "callee"], t));
        assert!(again.sink().installed.is_empty());
        assert_eq!(again.manager().ports_in_use(), 0);
        assert!(
            again.journal.as_ref().expect("journal").is_empty(),
            "journal lines of the ended call removed"
        );
    }
}
