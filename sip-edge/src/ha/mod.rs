//! High availability (issue #11): call and pinhole state replicated through
//! a Redis store so that a second edge node can carry the calls of one that
//! died.
//!
//! The shape follows the systems that already do this (rtpengine's Redis
//! keyspace, Kamailio's DMQ dialogs): each node writes the calls it owns
//! under its own key prefix and mirrors the other nodes' keys into its own
//! XDP maps, so when the virtual addresses move to it the media of those
//! calls finds its rules already there.
//!
//! - **What is written** ([`Record`]): one key per pinhole flow, the same
//!   unit the restart journal (`media::adopt`) records: the dialog
//!   (Call-ID, caller's From tag), the flow (parties' media addresses, the
//!   edge's addresses and ports, latching: `datapath::rules::Flow`), the
//!   edge ports it holds and the writing node. Key
//!   `<prefix>:<node>:ph:<id>`, `id` the journal id, JSON value, a TTL of
//!   the media idle timeout that the owner refreshes while the flow lives:
//!   a key outlives its dead owner by at most the time after which the
//!   owner's own pinhole would have expired without traffic.
//! - **Never on the signalling path**: the media layer hands each change to
//!   a bounded channel ([`store::Writer`]) and goes on; a background task
//!   writes. A full channel or a store error is counted and logged, never
//!   fails a call: the node then runs as a single node (its calls are not
//!   protected) until the store answers again, when it writes its whole
//!   live set anew.
//! - **Mirroring** ([`replica::Replicas`], sans-IO): the task reads every
//!   node's keys when another node publishes a change on the channel
//!   `<prefix>:changed` (each owner publishes its node id after each
//!   write), and each `sync_interval_ms` in any case (a `SCAN` + `MGET`:
//!   the fallback that catches a lost notification or a dropped
//!   subscription), hands the read to the SIP driver at once
//!   ([`snapshot_ready`]), and the media layer installs the other nodes' flows as
//!   *mirrors*: rules in its maps, their ports held, removed when their key
//!   goes (the call ended at its owner, or the owner died and the key
//!   expired). A mirror whose counters move carries traffic here: the
//!   addresses moved to this node. It is *claimed*: written under this
//!   node's prefix (the old key deleted), journalled, and from then on an
//!   adopted flow (`media::adopt`): it expires by the idle rules and an
//!   in-dialog BYE for it is answered by this node and removes its rules.
//! - **Return of a node**: before its SIP listeners open, the agent reads
//!   the store once (blocking, bounded by `connect_timeout_ms`); flows its
//!   previous run left in the maps whose key is gone (another node claimed
//!   them, or they ended) are removed, and the other nodes' flows are
//!   mirrored. So no rule stays without a dialog that owns it somewhere.
//!
//! Data flow: media layer (`media::control`) → [`store::Writer`] channel →
//! Redis; Redis → [`store`] task → snapshot (watch channel) →
//! `media::control` tick → [`replica::Replicas`] → map writer.

pub mod replica;
pub mod store;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{invalid, ConfigError},
    datapath::rules::Flow,
};

/// `[ha]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HaSection {
    /// The store, `redis://host:port[/db]`.
    pub store: String,
    /// This node's id: its key prefix in the store (`[a-z0-9_-]`, ≤ 32).
    pub node: String,
    /// The role the node starts in; a standby that takes over calls
    /// reports `active` from then on. `auto`: the role is a lease in the
    /// store (below) that one node at a time holds.
    #[serde(default)]
    pub role: Role,
    /// With `role = "auto"`: how long the lease `<prefix>:active` lasts
    /// without renewal (the holder renews it every `sync_interval_ms`),
    /// 500..=60000 ms and at least three sync intervals.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// The first part of every key (`sip-edge`): several edge pairs can
    /// share one store.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// How often the other nodes' keys are read (the replication lag
    /// bound), 50..=5000 ms.
    #[serde(default = "default_sync_interval_ms")]
    pub sync_interval_ms: u64,
    /// How long a connection attempt or a command may take, 50..=10000 ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Changes waiting for the store beyond this many are dropped (and
    /// counted): memory stays bounded through an outage.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// A file holding a secret (at least 32 bytes, e.g. `openssl rand
    /// -hex 32`; surrounding whitespace ignored) that every node of the
    /// pair shares: the flow tokens in the Contacts the edge rewrites are
    /// sealed with a key derived from it, so the other node (and this
    /// node after a restart) routes the in-dialog requests of calls it did
    /// not set up (`proxy::tokens`). Without it those get 481.
    #[serde(default)]
    pub token_key_file: Option<std::path::PathBuf>,
}

fn default_prefix() -> String {
    "sip-edge".into()
}
fn default_sync_interval_ms() -> u64 {
    200
}
fn default_connect_timeout_ms() -> u64 {
    500
}
fn default_lease_ms() -> u64 {
    3000
}
fn default_queue() -> usize {
    4096
}

/// The role a node starts in.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds the virtual addresses and takes the calls.
    #[default]
    Active,
    /// Mirrors the active node's calls until its addresses arrive.
    Standby,
    /// Elected: active while it holds the store's lease, standby otherwise
    /// (`store::elect`). Only a configuration value: a node reports
    /// `active` or `standby`.
    Auto,
}

impl Role {
    /// `active` / `standby`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
            Role::Auto => "auto",
        }
    }
}

fn id_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl HaSection {
    /// Rules types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.store.starts_with("redis://") {
            return Err(invalid(
                "ha.store",
                format!(
                    "{:?} is not a redis:// URL (e.g. \"redis://10.0.0.5:6379/0\")",
                    self.store
                ),
            ));
        }
        if let Err(e) = redis::Client::open(self.store.as_str()) {
            return Err(invalid("ha.store", format!("{:?}: {e}", self.store)));
        }
        if !id_ok(&self.node) {
            return Err(invalid(
                "ha.node",
                format!(
                    "{:?} must be 1 to 32 of a-z, 0-9, '-' and '_' (it is the node's key prefix)",
                    self.node
                ),
            ));
        }
        if !id_ok(&self.key_prefix) {
            return Err(invalid(
                "ha.key_prefix",
                format!(
                    "{:?} must be 1 to 32 of a-z, 0-9, '-' and '_'",
                    self.key_prefix
                ),
            ));
        }
        if !(50..=5000).contains(&self.sync_interval_ms) {
            return Err(invalid(
                "ha.sync_interval_ms",
                format!("{} is outside 50..=5000", self.sync_interval_ms),
            ));
        }
        if !(50..=10_000).contains(&self.connect_timeout_ms) {
            return Err(invalid(
                "ha.connect_timeout_ms",
                format!("{} is outside 50..=10000", self.connect_timeout_ms),
            ));
        }
        if !(500..=60_000).contains(&self.lease_ms) {
            return Err(invalid(
                "ha.lease_ms",
                format!("{} is outside 500..=60000", self.lease_ms),
            ));
        }
        if self.role == Role::Auto && self.lease_ms < 3 * self.sync_interval_ms {
            return Err(invalid(
                "ha.lease_ms",
                format!(
                    "{} is less than three sync intervals ({} ms): the lease is renewed each interval",
                    self.lease_ms,
                    3 * self.sync_interval_ms
                ),
            ));
        }
        if !(1..=1_000_000).contains(&self.queue) {
            return Err(invalid(
                "ha.queue",
                format!("{} is outside 1..=1000000", self.queue),
            ));
        }
        // The key file itself is a host check (`config::check`), like the
        // TLS files: the file alone can be checked on another machine.
        Ok(())
    }

    /// The flow-token key from `token_key_file`, if configured.
    pub fn token_key(&self) -> Result<Option<crate::proxy::tokens::TokenKey>, ConfigError> {
        self.token_key_file
            .as_deref()
            .map(|p| crate::proxy::tokens::key_from_file("ha.token_key_file", p))
            .transpose()
    }

    /// The key of flow `id` of `node`.
    pub fn key(&self, node: &str, id: &str) -> String {
        format!("{}:{node}:ph:{id}", self.key_prefix)
    }

    /// The pub/sub channel each owner publishes its node id on after every
    /// write, so the other nodes read at once instead of at the next poll.
    pub fn channel(&self) -> String {
        format!("{}:changed", self.key_prefix)
    }

    /// The key of the `role = "auto"` lease.
    pub fn lease_key(&self) -> String {
        format!("{}:active", self.key_prefix)
    }

    /// The pattern matching every node's flow keys.
    pub fn pattern(&self) -> String {
        format!("{}:*:ph:*", self.key_prefix)
    }

    /// The store URL without a password, for logs and status.
    pub fn store_shown(&self) -> String {
        match (self.store.find("://"), self.store.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                format!("{}://***@{}", &self.store[..s], &self.store[at + 1..])
            }
            _ => self.store.clone(),
        }
    }
}

/// One replicated flow: the store's value (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The node that owns it.
    pub node: String,
    /// Its id (the journal id of the owner's run).
    pub id: String,
    /// The dialog's Call-ID.
    pub call_id: String,
    /// The caller's From tag.
    pub from_tag: String,
    /// The flow: parties, edge addresses and ports, latching.
    pub flow: Flow,
    /// Edge ports it holds in the media ranges.
    pub ports: Vec<u16>,
    /// When the owner wrote it (ms since the epoch).
    pub written_ms: u64,
    /// The flow's place in its dialog's media session (m-line, RTP or
    /// RTCP, the parties' signalling sources): what the node that takes
    /// the call over needs to rebuild the session for a re-INVITE with
    /// SDP (`Manager::rebuild`). Absent from records of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<crate::media::adopt::FlowMedia>,
}

/// Milliseconds since the epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What `sip-edge ha-status` and `/metrics` show; shared by the store task
/// (health, counters) and the media layer (role, mirrors).
#[derive(Debug, Default)]
pub struct Status {
    /// Node id.
    pub node: String,
    /// Store URL (no password).
    pub store: String,
    role: Mutex<Option<Role>>,
    /// `role = "auto"`: the role is the store lease's.
    pub election: bool,
    /// The store answered the last command.
    pub store_up: AtomicBool,
    /// The first read of the store at start finished (or was given up).
    pub resynced: AtomicBool,
    /// Times the store went from answering to not.
    pub outages: AtomicU64,
    /// Writes done.
    pub writes: AtomicU64,
    /// Writes (or reads) that failed.
    pub errors: AtomicU64,
    /// Changes dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Changes waiting for the store.
    pub queued: AtomicU64,
    /// Flows this node owns (written under its prefix).
    pub owned: AtomicU64,
    /// Other nodes' flows mirrored in this node's maps.
    pub mirrored: AtomicU64,
    /// Mirrors this node took over (their traffic arrived here).
    pub claimed: AtomicU64,
    /// When the last full read of the store finished (ms since the epoch).
    pub last_sync_ms: AtomicU64,
    /// The replication lag's bound at the last read: the sync interval
    /// plus what the read took (another node's write is in this node's
    /// maps by then).
    pub lag_ms: AtomicU64,
}

impl Status {
    /// A status for `section`.
    pub fn new(section: &HaSection) -> Status {
        Status {
            node: section.node.clone(),
            store: section.store_shown(),
            // An elected node is a standby until it holds the lease.
            role: Mutex::new(Some(match section.role {
                Role::Auto => Role::Standby,
                r => r,
            })),
            election: section.role == Role::Auto,
            ..Status::default()
        }
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
            .lock()
            .ok()
            .and_then(|r| *r)
            .unwrap_or(Role::Active)
    }

    /// Sets the role.
    pub fn set_role(&self, role: Role) {
        if let Ok(mut r) = self.role.lock() {
            *r = Some(role);
        }
    }

    /// Marks the store up or down; a change is logged and a fall counted.
    pub fn store_health(&self, up: bool, why: &str) {
        let was = self.store_up.swap(up, Ordering::Relaxed);
        if was && !up {
            self.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(store = %self.store, why, "HA store unreachable: running as a single node (calls go on; they are not replicated until it answers)");
        } else if !was && up {
            tracing::info!(store = %self.store, "HA store reachable: replicating");
        }
    }

    /// The JSON the control socket answers (`{"ha": {...}}`).
    pub fn json(&self) -> serde_json::Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let last = l(&self.last_sync_ms);
        serde_json::json!({
            "node": self.node,
            "role": self.role().name(),
            "election": if self.election { "lease" } else { "static" },
            "store": self.store,
            "store_up": self.store_up.load(Ordering::Relaxed),
            "resynced": self.resynced.load(Ordering::Relaxed),
            "outages": l(&self.outages),
            "writes": l(&self.writes),
            "errors": l(&self.errors),
            "dropped": l(&self.dropped),
            "queued": l(&self.queued),
            "owned": l(&self.owned),
            "mirrored": l(&self.mirrored),
            "claimed": l(&self.claimed),
            "last_sync_age_ms": if last == 0 { serde_json::Value::Null } else { now_ms().saturating_sub(last).into() },
            "lag_ms": l(&self.lag_ms),
        })
    }
}

static STATUS: OnceLock<Arc<Status>> = OnceLock::new();

static SNAPSHOT_READY: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Signalled when the store task has a new read for the media layer; the
/// SIP driver (`transport`) then has the proxy apply it at once
/// (`MediaControl::sync_replicas`) rather than at its next 1 s tick. A
/// permit is kept when nobody waits, so no read is missed.
pub fn snapshot_ready() -> &'static tokio::sync::Notify {
    &SNAPSHOT_READY
}

/// Publishes the agent's HA status for the control socket (first call wins:
/// one agent, one HA node per process).
pub fn publish(status: Arc<Status>) {
    let _ = STATUS.set(status);
}

/// The published HA status, when this agent runs an `[ha]` node.
pub fn current() -> Option<Arc<Status>> {
    STATUS.get().cloned()
}

/// The control socket's answer to `ha`.
pub fn status_fields() -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let s = STATUS
        .get()
        .ok_or("no [ha] section: this agent replicates nothing")?;
    let mut m = serde_json::Map::new();
    m.insert("ha".into(), s.json());
    Ok(m)
}

/// The human form of `ha-status`.
pub fn status_text(v: &serde_json::Value) -> String {
    let f = |k: &str| match &v[k] {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = format!(
        "node {}  role {} ({})  store {} ({})\n",
        f("node"),
        f("role"),
        f("election"),
        f("store"),
        if v["store_up"] == true { "up" } else { "DOWN" }
    );
    out.push_str(&format!(
        "flows: owned {}  mirrored {}  claimed {}\n",
        f("owned"),
        f("mirrored"),
        f("claimed")
    ));
    out.push_str(&format!(
        "replication: last sync {} ms ago, lag {} ms, resynced {}\n",
        f("last_sync_age_ms"),
        f("lag_ms"),
        f("resynced")
    ));
    out.push_str(&format!(
        "store: writes {}  errors {}  outages {}  queued {}  dropped {}\n",
        f("writes"),
        f("errors"),
        f("outages"),
        f("queued"),
        f("dropped")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml_text: &str) -> Result<HaSection, String> {
        let s: HaSection = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        s.validate().map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn the_section_is_validated_like_the_rest() {
        let s = section("store = \"redis://10.0.0.5:6379/0\"\nnode = \"edge-a\"\n").unwrap();
        assert_eq!(s.role, Role::Active);
        assert_eq!(s.sync_interval_ms, 200);
        assert_eq!(s.key("edge-a", "r1-7"), "sip-edge:edge-a:ph:r1-7");
        for (bad, why) in [
            ("store = \"http://x\"\nnode = \"a\"\n", "redis://"),
            ("store = \"redis://x:6379\"\nnode = \"A b\"\n", "ha.node"),
            (
                "store = \"redis://x:6379\"\nnode = \"a\"\nrole = \"leader\"\n",
                "role",
            ),
            (
                "store = \"redis://x:6379\"\nnode = \"a\"\nsync_interval_ms = 10\n",
                "sync_interval_ms",
            ),
            (
                "store = \"redis://x:6379\"\nnode = \"a\"\nstroe = 1\n",
                "stroe",
            ),
            (
                "store = \"redis://x:6379\"\nnode = \"a\"\nlease_ms = 100\n",
                "lease_ms",
            ),
            (
                "store = \"redis://x:6379\"\nnode = \"a\"\nrole = \"auto\"\nlease_ms = 500\n",
                "three sync intervals",
            ),
        ] {
            let e = section(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn an_elected_node_starts_as_a_standby() {
        let s = section("store = \"redis://x:6379\"\nnode = \"a\"\nrole = \"auto\"\n").unwrap();
        assert_eq!((s.role, s.lease_ms), (Role::Auto, 3000));
        assert_eq!(s.lease_key(), "sip-edge:active");
        let st = Status::new(&s);
        assert_eq!(st.role(), Role::Standby, "until it holds the lease");
        let v = st.json();
        assert_eq!(
            (v["role"].as_str(), v["election"].as_str()),
            (Some("standby"), Some("lease"))
        );
        assert!(
            status_text(&v).contains("role standby (lease)"),
            "{}",
            status_text(&v)
        );
        let fixed = Status::new(&section("store = \"redis://x:6379\"\nnode = \"a\"\n").unwrap());
        assert_eq!(fixed.json()["election"], "static");
    }

    #[test]
    fn the_password_never_shows() {
        let s = section("store = \"redis://:secret@10.0.0.5:6379/0\"\nnode = \"a\"\n").unwrap();
        assert_eq!(s.store_shown(), "redis://***@10.0.0.5:6379/0");
        let st = Status::new(&s);
        assert!(!st.json().to_string().contains("secret"));
    }

    #[test]
    fn an_outage_is_counted_once_per_fall() {
        let s = section("store = \"redis://x:6379\"\nnode = \"a\"\n").unwrap();
        let st = Status::new(&s);
        st.store_health(true, "");
        st.store_health(false, "refused");
        st.store_health(false, "refused");
        st.store_health(true, "");
        st.store_health(false, "timeout");
        assert_eq!(st.outages.load(Ordering::Relaxed), 2);
        let text = status_text(&st.json());
        assert!(
            text.contains("DOWN") && text.contains("outages 2"),
            "{text}"
        );
    }
}
