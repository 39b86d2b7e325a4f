//! Pinholes left by an earlier run of the agent (issue #14 item 8: after
//! `kill -9` and a restart, BYEs for the old calls got 404, their pinholes
//! never expired, and new calls failed with 503 when given a port an orphan
//! rule still held).
//!
//! Decision (documented in the README, "Restart"): the agent keeps a small
//! journal of which dialog owns which rules, and at start adopts every rule
//! it finds in the pinned maps:
//!
//! - an adopted flow keeps forwarding (a crash must not cut live calls);
//! - its edge ports are taken in the port allocator until it goes, so new
//!   calls never collide with it;
//! - it expires by the media idle rules, read from its own counters: a
//!   flow that moves is idle after `idle_timeout_secs` without a packet; one
//!   that does not move after `idle_timeout_secs` if it had carried
//!   anything before the restart, `unused_timeout_secs` if never;
//!   `max_call_secs` from the restart bounds it in any case;
//! - an in-dialog BYE for a dialog the journal names ends it: its rules go
//!   at once and the BYE is answered by the edge (its Contact tokens died
//!   with the old process, so it cannot be routed on; the far party learns
//!   from its own BYE, session timers or silence, as after any crash).
//!
//! Why a journal and not state in the edge's Record-Route/Contact: the BYE
//! already carries the Call-ID and both tags, which is all that identifies
//! the dialog; what the new process lacks is which rules are the dialog's,
//! and that is the edge's own knowledge, not something to send to the
//! parties. The journal lives next to the pin lock
//! (`datapath::lock::state_path`, under /run: emptied on reboot, like the
//! pins). It is append-only, one JSON line per change (`add` with the
//! dialog and the rule keys as `describe_key` prints them, `del`), written
//! with one write(2) each, so a crash loses at most the line being
//! written; it is compacted when it holds four times more lines than live
//! entries, and removed when the agent stops with nothing live in it.
//! Rules the journal does not name (a lost journal, a pinhole added by
//! hand with `sip-edge pinhole add` while a proxy-mode agent ran) are
//! adopted without a dialog: they keep forwarding, hold their ports and
//! expire by the same rules, but no BYE names them.
//!
//! [`Adopted`] is the sans-IO part (which flows, their counters, when they
//! expire, which a BYE ends), tested with synthetic instants; [`Journal`]
//! is the file; `media::control` ties them to the map writer.

use std::{
    collections::{BTreeMap, HashMap},
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{manager::PinholeId, DialogKey};
use crate::{
    config::PortRange,
    datapath::{
        maps::{describe_key, PinholeEntry},
        rules::Flow,
    },
};

/// Errors of the journal; never fatal to the agent (it runs on without
/// one, and says so).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file could not be opened, read or written.
    #[error("media state journal {path}: {op}: {source}; the agent runs on, but calls it carries will not be ended by their BYE after a crash")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// One journal line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Line {
    /// `add` or `del`.
    op: String,
    /// The flow's journal id (unique across runs: the run's tag and the
    /// manager's id).
    id: String,
    /// Dialog (for `add`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    call_id: Option<String>,
    /// The caller's From tag (for `add`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from_tag: Option<String>,
    /// The flow's rule keys, as `describe_key` prints them (for `add`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    keys: Vec<String>,
    /// The flow's place in its dialog's media session (for `add`; absent
    /// in journals of older runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media: Option<FlowMedia>,
}

/// A flow's place in its dialog's media session: enough for a process that
/// did not set the dialog up (this node after a restart, another HA node)
/// to rebuild the session when an in-dialog offer (re-INVITE, UPDATE)
/// arrives, so the m-line keeps its edge ports, the old rules are replaced
/// and the BYE removes what the session holds (`Manager::rebuild`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowMedia {
    /// The installed flow.
    pub flow: crate::datapath::rules::Flow,
    /// Its m-line index.
    pub stream: usize,
    /// Whether it is the m-line's RTCP flow.
    pub rtcp: bool,
    /// The signalling source IP of each side (internal, external) when it
    /// was written: an in-dialog offer for a rebuilt dialog must come from
    /// the same party.
    #[serde(default)]
    pub sources: [Option<IpAddr>; 2],
    /// How the outside party's media source is learned.
    #[serde(default)]
    pub far_media: super::FarMedia,
}

/// What the journal says about one live flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its dialog.
    pub dialog: DialogKey,
    /// Its rule keys.
    pub keys: Vec<String>,
    /// Its place in the dialog's media session, when the run wrote it.
    pub media: Option<FlowMedia>,
}

/// The rule keys of a flow as the journal stores them (`describe_key`).
pub(crate) fn flow_keys_text(flow: &Flow) -> Vec<String> {
    flow.rules(0, 0)
        .map(|p| vec![describe_key(&p.inbound.0), describe_key(&p.outbound.0)])
        .unwrap_or_default()
}

/// What the journal keeps in memory of one live flow (issue #12: bytes
/// per established call): its [`Record`], with the rule keys left out when
/// they are those of its `media.flow` (as for every flow a run writes) and
/// spelled out again when the file is compacted. The file's lines are the
/// same either way.
#[derive(Clone, Debug)]
struct Kept {
    dialog: DialogKey,
    /// `None`: `flow_keys_text` of `media`'s flow. Boxed again: a thin
    /// pointer rather than a slice's two words, as it is `None` for
    /// every flow this run writes (issue #12: the record fits a smaller
    /// malloc size class).
    #[expect(
        clippy::box_collection,
        reason = "one word per record instead of three; see the doc above"
    )]
    keys: Option<Box<Vec<String>>>,
    media: Option<FlowMedia>,
}

impl Kept {
    fn new(dialog: DialogKey, keys: Vec<String>, media: Option<FlowMedia>) -> Kept {
        let derived = media.is_some_and(|m| flow_keys_text(&m.flow) == keys);
        Kept {
            dialog,
            keys: (!derived).then(|| Box::new(keys)),
            media,
        }
    }

    /// The rule keys the flow was written with.
    fn keys(&self) -> Vec<String> {
        match (&self.keys, &self.media) {
            (Some(k), _) => k.to_vec(),
            (None, Some(m)) => flow_keys_text(&m.flow),
            (None, None) => Vec::new(),
        }
    }
}

/// Lines beyond this many times the live entries (plus a floor) trigger a
/// compaction.
const COMPACT_FACTOR: usize = 4;
const COMPACT_FLOOR: usize = 1024;

/// The append-only journal of dialog → rule keys.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Boxed: a B-tree node holds 11 slots whether used or not, so a
    /// large inline value costs its size again in empty slots.
    live: BTreeMap<Box<str>, Box<Kept>>,
    lines: usize,
    failed: bool,
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Replays journal text into the live set (a torn last line is skipped).
fn replay(r: impl BufRead) -> BTreeMap<String, Record> {
    let mut live = BTreeMap::new();
    for line in r.lines().map_while(Result::ok) {
        let Ok(l) = serde_json::from_str::<Line>(&line) else {
            continue;
        };
        match (l.op.as_str(), l.call_id, l.from_tag) {
            ("add", Some(call_id), Some(from_tag)) => {
                live.insert(
                    l.id,
                    Record {
                        dialog: DialogKey {
                            call_id: call_id.into(),
                            from_tag: from_tag.into(),
                        },
                        keys: l.keys,
                        media: l.media,
                    },
                );
            }
            ("del", _, _) => {
                live.remove(&l.id);
            }
            _ => {}
        }
    }
    live
}

fn add_line(id: &str, dialog: &DialogKey, keys: Vec<String>, media: Option<FlowMedia>) -> Line {
    Line {
        op: "add".into(),
        id: id.to_owned(),
        call_id: Some(dialog.call_id.to_string()),
        from_tag: Some(dialog.from_tag.to_string()),
        keys,
        media,
    }
}

impl Journal {
    /// Reads what an earlier run left at `path` (its live records, by
    /// journal id) and opens the file for this run's lines; [`Journal::reset`]
    /// then keeps only what was adopted.
    pub fn open(path: &Path) -> Result<(Journal, BTreeMap<String, Record>), JournalError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("create its directory", path))?;
        }
        let old = match File::open(path) {
            Ok(f) => replay(BufReader::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io_err("read", path)(e)),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err("open", path))?;
        let j = Journal {
            path: path.to_owned(),
            file,
            live: BTreeMap::new(),
            lines: 0,
            failed: false,
        };
        Ok((j, old))
    }

    /// Starts over with exactly `records` (after adoption).
    pub fn reset(&mut self, records: BTreeMap<String, Record>) {
        self.live = records
            .into_iter()
            .map(|(id, r)| (id.into(), Box::new(Kept::new(r.dialog, r.keys, r.media))))
            .collect();
        self.compact();
    }

    /// How many flows are live.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no flow is live.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    fn write(&mut self, l: &Line) {
        if self.failed {
            return;
        }
        let Ok(mut text) = serde_json::to_string(l) else {
            return;
        };
        text.push('\n');
        // One write(2) per line: a crash tears at most this line.
        if let Err(e) = self.file.write_all(text.as_bytes()) {
            self.fail(io_err("append", &self.path.clone())(e));
            return;
        }
        self.lines += 1;
        if self.lines > COMPACT_FACTOR * self.live.len() + COMPACT_FLOOR {
            self.compact();
        }
    }

    fn fail(&mut self, e: JournalError) {
        tracing::warn!(error = %e, "media state journal disabled");
        self.failed = true;
    }

    /// A flow was installed (or replaced: the same id again).
    pub fn add(&mut self, id: &str, dialog: &DialogKey, keys: Vec<String>) {
        self.add_media(id, dialog, keys, None);
    }

    /// [`Journal::add`] with the flow's place in its media session.
    pub fn add_media(
        &mut self,
        id: &str,
        dialog: &DialogKey,
        keys: Vec<String>,
        media: Option<FlowMedia>,
    ) {
        let line = add_line(id, dialog, keys, media);
        let kept = Box::new(Kept::new(dialog.clone(), line.keys.clone(), media));
        self.live.insert(id.into(), kept);
        self.write(&line);
    }

    /// A flow was removed.
    pub fn del(&mut self, id: &str) {
        if self.live.remove(id).is_some() {
            self.write(&Line {
                op: "del".into(),
                id: id.to_owned(),
                call_id: None,
                from_tag: None,
                keys: Vec::new(),
                media: None,
            });
        }
    }

    /// Rewrites the file with the live entries only (temp file + rename,
    /// so a crash leaves the old or the new file, never half of one).
    fn compact(&mut self) {
        if self.failed {
            return;
        }
        let tmp = self.path.with_extension("state.tmp");
        let mut text = String::new();
        for (id, k) in &self.live {
            if let Ok(s) = serde_json::to_string(&add_line(id, &k.dialog, k.keys(), k.media)) {
                text.push_str(&s);
                text.push('\n');
            }
        }
        let r = std::fs::write(&tmp, text.as_bytes())
            .map_err(io_err("write", &tmp))
            .and_then(|()| std::fs::rename(&tmp, &self.path).map_err(io_err("replace", &self.path)))
            .and_then(|()| {
                OpenOptions::new()
                    .append(true)
                    .open(&self.path)
                    .map_err(io_err("reopen", &self.path))
            });
        match r {
            Ok(f) => {
                self.file = f;
                self.lines = self.live.len();
            }
            Err(e) => self.fail(e),
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Nothing to remember: leave nothing behind in /run.
        if self.live.is_empty() && !self.failed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One rule pair found in the maps at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundFlow {
    /// Slot ids (as `pinhole list` prints them) of its two rules.
    pub slots: (u32, u32),
    /// Its rule keys.
    pub keys: Vec<String>,
    /// Edge ports it holds in the media ranges.
    pub ports: Vec<u16>,
    /// Packets both rules carried so far.
    pub packets: u64,
}

/// The key text of a listed rule, as `datapath::maps::describe_key` prints
/// the key (`udp external dst 203.0.113.1:40000`).
pub fn entry_key(e: &PinholeEntry) -> String {
    format!("{} {} {} {}", e.proto, e.role, e.match_on, e.local)
}

/// Groups listed rules into flows (each rule with its `pair_slot`) and the
/// edge ports they hold: the matched address:port and the source rewrite,
/// where the address is an edge address and the port in a media range.
pub fn found_flows(
    entries: &[PinholeEntry],
    edge: &[IpAddr],
    ranges: &[PortRange],
) -> Vec<FoundFlow> {
    let by_slot: HashMap<u32, &PinholeEntry> = entries.iter().map(|e| (e.slot, e)).collect();
    let edge_port = |text: &str| -> Option<u16> {
        let a: SocketAddr = text.parse().ok()?;
        let ip = a.ip().to_canonical();
        (edge.iter().any(|e| e.to_canonical() == ip) && ranges.iter().any(|r| r.contains(a.port())))
            .then_some(a.port())
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for e in entries {
        if seen.contains(&e.slot) {
            continue;
        }
        let pair = by_slot
            .get(&e.pair_slot)
            .filter(|p| p.slot != e.slot)
            .copied();
        let rules: Vec<&PinholeEntry> = std::iter::once(e).chain(pair).collect();
        let mut ports = Vec::new();
        for r in &rules {
            seen.insert(r.slot);
            for p in [Some(r.local.as_str()), r.new_src.as_deref()]
                .into_iter()
                .flatten()
                .filter_map(edge_port)
            {
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
        }
        out.push(FoundFlow {
            slots: (e.slot, pair.map_or(e.slot, |p| p.slot)),
            keys: rules.iter().map(|r| entry_key(r)).collect(),
            ports,
            packets: rules.iter().map(|r| r.packets).fold(0, u64::saturating_add),
        });
    }
    out
}

/// The idle rules adopted flows expire by (the `[media]` ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// No packet for this long after carrying some.
    pub idle: Duration,
    /// Never a packet for this long.
    pub unused: Duration,
    /// Longest life after adoption.
    pub max_call: Duration,
}

/// One adopted flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedFlow {
    /// The id it has in the sink.
    pub id: PinholeId,
    /// Its journal id, when the journal named it.
    pub journal_id: Option<String>,
    /// Its dialog, when the journal named it.
    pub dialog: Option<DialogKey>,
    /// Edge ports it holds.
    pub ports: Vec<u16>,
    /// Its place in the dialog's media session, when known (the journal
    /// or the HA store carried it).
    pub media: Option<FlowMedia>,
}

#[derive(Clone, Debug)]
struct Tracked {
    flow: AdoptedFlow,
    since: Instant,
    packets: u64,
    carried_before: bool,
    moved_at: Option<Instant>,
}

/// Adopted flows and their expiry (sans-IO).
#[derive(Debug, Default)]
pub struct Adopted {
    flows: BTreeMap<PinholeId, Tracked>,
}

impl Adopted {
    /// Tracks `flow`, adopted at `now` with `packets` carried so far.
    pub fn add(&mut self, flow: AdoptedFlow, packets: u64, now: Instant) {
        self.flows.insert(
            flow.id,
            Tracked {
                flow,
                since: now,
                packets,
                carried_before: packets > 0,
                moved_at: None,
            },
        );
    }

    /// Flows tracked.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Whether `id` is an adopted flow.
    pub fn contains(&self, id: PinholeId) -> bool {
        self.flows.contains_key(&id)
    }

    /// The counter of `id` read `packets` at `now`; `false` if `id` is not
    /// adopted.
    pub fn on_activity(&mut self, id: PinholeId, packets: u64, now: Instant) -> bool {
        let Some(t) = self.flows.get_mut(&id) else {
            return false;
        };
        if packets != t.packets {
            t.packets = packets;
            t.moved_at = Some(now);
        }
        true
    }

    /// Removes and returns the flows due at `now` (module docs).
    pub fn expire(&mut self, now: Instant, t: Timeouts) -> Vec<AdoptedFlow> {
        let due: Vec<PinholeId> = self
            .flows
            .iter()
            .filter(|(_, f)| {
                let age = now.saturating_duration_since(f.since);
                let quiet = match f.moved_at {
                    Some(m) => now.saturating_duration_since(m) >= t.idle,
                    None if f.carried_before => age >= t.idle,
                    None => age >= t.unused,
                };
                quiet || age >= t.max_call
            })
            .map(|(id, _)| *id)
            .collect();
        due.into_iter()
            .filter_map(|id| self.flows.remove(&id).map(|f| f.flow))
            .collect()
    }

    /// Removes and returns the flows `pick` chooses (HA: those whose
    /// store key is gone, `crate::ha`).
    pub fn take_where(&mut self, pick: impl Fn(&AdoptedFlow) -> bool) -> Vec<AdoptedFlow> {
        let ids: Vec<PinholeId> = self
            .flows
            .iter()
            .filter(|(_, f)| pick(&f.flow))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.flows.remove(&id).map(|f| f.flow))
            .collect()
    }

    /// Removes and returns the flows of the dialog with Call-ID `call_id`
    /// whose caller tag is one of `tags` (a BYE's From and To tags: either
    /// party may send it).
    pub fn end_dialog(&mut self, call_id: &str, tags: &[&str]) -> Vec<AdoptedFlow> {
        let ids: Vec<PinholeId> =
            self.flows
                .iter()
                .filter(|(_, f)| {
                    f.flow.dialog.as_ref().is_some_and(|d| {
                        d.call_id == call_id && tags.iter().any(|t| *t == d.from_tag)
                    })
                })
                .map(|(id, _)| *id)
                .collect();
        ids.into_iter()
            .filter_map(|id| self.flows.remove(&id).map(|f| f.flow))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(60),
        unused: Duration::from_secs(20),
        max_call: Duration::from_secs(3600),
    };

    fn dialog(c: &str, f: &str) -> DialogKey {
        DialogKey {
            call_id: c.into(),
            from_tag: f.into(),
        }
    }

    fn flow(n: u64, d: Option<DialogKey>) -> AdoptedFlow {
        AdoptedFlow {
            id: PinholeId(n),
            journal_id: d.as_ref().map(|_| format!("j{n}")),
            dialog: d,
            ports: vec![40000 + n as u16],
            media: None,
        }
    }

    fn ids(v: &[AdoptedFlow]) -> Vec<u64> {
        v.iter().map(|f| f.id.0).collect()
    }

    /// Issue #14 item 8: orphan rules of a crashed run never expired.
    #[test]
    fn adopted_flows_expire_by_the_idle_rules_read_from_their_counters() {
        let t0 = Instant::now();
        let mut a = Adopted::default();
        a.add(flow(1, None), 0, t0); // never carried: unused rule
        a.add(flow(2, None), 500, t0); // carried before, then silent: idle rule
        a.add(flow(3, None), 500, t0); // keeps moving
        a.add(flow(4, None), 0, t0); // starts moving after the restart
        let at = |s| t0 + Duration::from_secs(s);
        for s in (10..=300).step_by(10) {
            a.on_activity(PinholeId(3), 500 + s, at(s));
            if s >= 10 {
                a.on_activity(PinholeId(4), s, at(s));
            }
            let gone = a.expire(at(s), T);
            match s {
                20 => assert_eq!(ids(&gone), vec![1], "never used: {s} s"),
                60 => assert_eq!(ids(&gone), vec![2], "idle since the restart: {s} s"),
                _ => assert!(gone.is_empty(), "{s} s: {gone:?}"),
            }
        }
        assert_eq!(a.len(), 2);
        // Silence from 300 s: idle 60 s later.
        assert!(a.expire(at(359), T).is_empty());
        assert_eq!(ids(&a.expire(at(360), T)), vec![3, 4]);
        // The maximum length bounds even a busy flow.
        a.add(flow(5, None), 1, t0);
        for s in (0..3600).step_by(30) {
            a.on_activity(PinholeId(5), s + 2, at(s));
        }
        assert_eq!(ids(&a.expire(at(3600), T)), vec![5]);
    }

    #[test]
    fn a_bye_from_either_party_ends_only_its_dialogs_flows() {
        let t0 = Instant::now();
        let mut a = Adopted::default();
        a.add(flow(1, Some(dialog("c1", "caller"))), 9, t0);
        a.add(flow(2, Some(dialog("c1", "caller"))), 9, t0);
        a.add(flow(3, Some(dialog("c2", "caller"))), 9, t0);
        a.add(flow(4, None), 9, t0);
        assert!(a.end_dialog("c1", &["someone", "else"]).is_empty());
        // The callee's BYE: From = callee tag, To = caller tag.
        assert_eq!(ids(&a.end_dialog("c1", &["callee", "caller"])), vec![1, 2]);
        assert!(a.end_dialog("c1", &["caller"]).is_empty(), "gone already");
        assert_eq!(a.len(), 2);
        assert!(a.contains(PinholeId(3)) && a.contains(PinholeId(4)));
    }

    fn entry(
        slot: u32,
        pair: u32,
        local: &str,
        new_src: Option<&str>,
        packets: u64,
    ) -> PinholeEntry {
        PinholeEntry {
            slot,
            pair_slot: pair,
            proto: "udp",
            role: "external",
            match_on: "dst",
            local: local.into(),
            remote: "198.51.100.2:5000".into(),
            new_src: new_src.map(str::to_owned),
            new_dst: None,
            flags: 0,
            latched: None,
            packets,
            bytes: 0,
            last_seen_ns: 0,
        }
    }

    #[test]
    fn rules_group_into_flows_with_the_edge_ports_they_hold() {
        let edge: Vec<IpAddr> = vec!["10.77.0.1".parse().unwrap(), "203.0.113.1".parse().unwrap()];
        let ranges = [PortRange {
            start: 40000,
            end: 40999,
        }];
        let entries = vec![
            entry(10, 11, "203.0.113.1:40000", Some("10.77.0.1:40002"), 5),
            entry(11, 10, "10.77.0.1:40002", Some("203.0.113.1:40000"), 7),
            // A nat SNAT rule: the client's address is no edge port.
            entry(20, 21, "10.77.0.2:4000", Some("203.0.113.1:40100"), 0),
            entry(21, 20, "203.0.113.1:40100", None, 0),
            // Outside the media range: not ours to hold.
            entry(30, 30, "203.0.113.1:5061", None, 0),
        ];
        let f = found_flows(&entries, &edge, &ranges);
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].slots, (10, 11));
        assert_eq!(f[0].ports, vec![40000, 40002]);
        assert_eq!(f[0].packets, 12);
        assert_eq!(
            f[0].keys,
            vec![
                "udp external dst 203.0.113.1:40000".to_owned(),
                "udp external dst 10.77.0.1:40002".to_owned()
            ]
        );
        assert_eq!(f[1].ports, vec![40100]);
        assert_eq!(f[2].slots, (30, 30));
        assert!(f[2].ports.is_empty());
    }

    #[test]
    fn the_journal_replays_across_a_crash_and_compacts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.state");
        {
            let (mut j, old) = Journal::open(&path).expect("open");
            assert!(old.is_empty());
            j.add("r1-1", &dialog("c1", "a"), vec!["k1".into(), "k2".into()]);
            j.add("r1-2", &dialog("c2", "b"), vec!["k3".into()]);
            j.del("r1-2");
            j.add("r1-3", &dialog("c3", "c"), vec!["k4".into()]);
            // A crash: the file stays as written (no Drop cleanup runs).
            std::mem::forget(j);
        }
        // A torn last line is skipped.
        let mut f = OpenOptions::new().append(true).open(&path).expect("append");
        f.write_all(b"{\"op\":\"add\",\"id\":\"r1-").expect("torn");
        drop(f);
        let (mut j, old) = Journal::open(&path).expect("reopen");
        assert_eq!(old.keys().collect::<Vec<_>>(), vec!["r1-1", "r1-3"]);
        assert_eq!(old["r1-1"].keys, vec!["k1".to_owned(), "k2".to_owned()]);
        let mut keep = old.clone();
        keep.remove("r1-3");
        j.reset(keep);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 1, "compacted: {text}");
        for n in 0..3000 {
            j.add(&format!("r2-{n}"), &dialog("c", "t"), vec![]);
            j.del(&format!("r2-{n}"));
        }
        let lines = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .count();
        assert!(lines <= COMPACT_FACTOR + COMPACT_FLOOR + 2, "{lines}");
        j.del("r1-1");
        drop(j);
        assert!(
            !path.exists(),
            "an empty journal is removed on a clean stop"
        );
    }

    fn relay_media(port: u16) -> FlowMedia {
        use crate::datapath::rules::{LearnPort, Proto};
        FlowMedia {
            flow: Flow::Relay {
                proto: Proto::Udp,
                client: "10.77.0.2:4000".parse().expect("addr"),
                edge_int: format!("10.77.0.1:{port}").parse().expect("addr"),
                public: format!("203.0.113.1:{}", port + 1).parse().expect("addr"),
                peer: "198.51.100.2:5000".parse().expect("addr"),
                latch_peer: false,
                learn_port: LearnPort::Neither,
            },
            stream: 0,
            rtcp: false,
            sources: [
                Some("10.77.0.2".parse().expect("ip")),
                Some("198.51.100.2".parse().expect("ip")),
            ],
            far_media: Default::default(),
        }
    }

    /// A flow's rule keys are kept in memory only when they are not its
    /// flow's own (`Kept`); either way a compaction writes back exactly the
    /// lines the journal was given, and a reopen recovers every record.
    #[test]
    fn compaction_writes_back_the_records_as_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.state");
        let (m1, m2) = (relay_media(40000), relay_media(40010));
        let own = flow_keys_text(&m1.flow);
        assert_eq!(own.len(), 2, "{own:?}");
        {
            let (mut j, _) = Journal::open(&path).expect("open");
            j.add_media("r1-1", &dialog("c1", "a"), own.clone(), Some(m1));
            // Keys that are not the flow's (a journal older than the maps).
            j.add_media("r1-2", &dialog("c2", "b"), vec!["other".into()], Some(m2));
            j.add("r1-3", &dialog("c3", "c"), vec!["k".into()]);
            assert!(
                j.live["r1-1"].keys.is_none(),
                "the flow's own keys are derived"
            );
            assert!(j.live["r1-2"].keys.is_some() && j.live["r1-3"].keys.is_some());
            let written = std::fs::read_to_string(&path).expect("read");
            j.compact();
            let compacted = std::fs::read_to_string(&path).expect("read");
            assert_eq!(compacted, written);
            std::mem::forget(j);
        }
        let (_j, old) = Journal::open(&path).expect("reopen");
        let want = [
            ("r1-1", dialog("c1", "a"), own, Some(m1)),
            (
                "r1-2",
                dialog("c2", "b"),
                vec!["other".to_owned()],
                Some(m2),
            ),
            ("r1-3", dialog("c3", "c"), vec!["k".to_owned()], None),
        ];
        assert_eq!(old.len(), want.len());
        for (id, dialog, keys, media) in want {
            assert_eq!(
                old[id],
                Record {
                    dialog,
                    keys,
                    media
                },
                "{id}"
            );
        }
    }

    /// Lines as an agent before the in-memory compaction of the journal
    /// wrote them (one with the flow's place, one from an older run
    /// without): this agent recovers them and compacts them unchanged.
    #[test]
    fn a_journal_an_earlier_agent_wrote_is_recovered_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.state");
        let text = concat!(
            r#"{"op":"add","id":"9f00aa-1","call_id":"c1@x","from_tag":"t1","keys":["udp external dst 203.0.113.1:40001","udp internal dst 10.77.0.1:40000"],"media":{"flow":{"relay":{"proto":"udp","client":"10.77.0.2:4000","edge_int":"10.77.0.1:40000","public":"203.0.113.1:40001","peer":"198.51.100.2:5000","latch_peer":false,"learn_port":"neither"}},"stream":0,"rtcp":false,"sources":["10.77.0.2","198.51.100.2"],"far_media":"config"}}"#,
            "\n",
            r#"{"op":"add","id":"9f00aa-2","call_id":"c2@x","from_tag":"t2","keys":["k2a","k2b"]}"#,
            "\n",
        );
        std::fs::write(&path, text).expect("write");
        let (mut j, old) = Journal::open(&path).expect("open");
        let r1 = &old["9f00aa-1"];
        assert_eq!(r1.dialog, dialog("c1@x", "t1"));
        assert_eq!(r1.media, Some(relay_media(40000)));
        assert_eq!(r1.keys, flow_keys_text(&relay_media(40000).flow));
        let r2 = &old["9f00aa-2"];
        assert_eq!(
            (&r2.dialog, &r2.keys, r2.media),
            (
                &dialog("c2@x", "t2"),
                &vec!["k2a".to_owned(), "k2b".to_owned()],
                None
            )
        );
        j.reset(old);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
        std::mem::forget(j);
    }
}
