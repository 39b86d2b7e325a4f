//! The Redis side of HA: a background task that owns the connection
//! (`redis::aio::ConnectionManager`, which reconnects by itself), writes
//! this node's changes, refreshes their TTLs, and reads every node's keys
//! each `sync_interval_ms` into a snapshot for the media layer.
//!
//! The media layer only ever calls [`Writer::put`] / [`Writer::del`], which
//! `try_send` on a bounded channel: the signalling path never waits on the
//! store. The task keeps this node's live set in memory, so a store that
//! comes back (or a restarted store that lost everything) gets the whole
//! set written again on the first answer after an outage; while the store
//! is down, changes only update that set (nothing queues behind a dead
//! connection).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, watch};

use super::{now_ms, HaSection, Record, Status};

/// One change of this node's flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The flow (new or changed).
    Put(Box<Record>),
    /// The flow with this key ended (also another node's key: a claim
    /// deletes the old owner's).
    Del(String),
}

/// What the store held at one read: key → record, every node's.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The records.
    pub records: BTreeMap<String, Record>,
}

/// The media layer's side of the channel.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<Change>,
    status: Arc<Status>,
}

impl Writer {
    /// Queues `c`; a full queue drops it (counted, logged): never blocks.
    pub fn send(&self, c: Change) {
        match self.tx.try_send(c) {
            Ok(()) => {
                self.status.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let n = self.status.dropped.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() || n == 0 {
                    tracing::warn!(dropped = n + 1, error = %e, "HA change dropped: the store writer is behind; this call is not replicated");
                }
            }
        }
    }
}

fn client(section: &HaSection) -> redis::RedisResult<redis::Client> {
    redis::Client::open(section.store.as_str())
}

fn parse(keys: Vec<String>, values: Vec<Option<String>>, out: &mut BTreeMap<String, Record>) {
    for (k, v) in keys.into_iter().zip(values) {
        // A key gone between SCAN and MGET, or a value that is not ours.
        let Some(v) = v else { continue };
        match serde_json::from_str::<Record>(&v) {
            Ok(r) => {
                out.insert(k, r);
            }
            Err(e) => tracing::debug!(key = %k, error = %e, "HA store value skipped"),
        }
    }
}

/// Keys per MGET.
const MGET_CHUNK: usize = 500;

/// Reads every node's keys once, blocking (the agent's start, before its
/// listeners open), within about `connect_timeout_ms` per command.
pub fn read_blocking(section: &HaSection) -> redis::RedisResult<Snapshot> {
    let t = Duration::from_millis(section.connect_timeout_ms);
    let mut c = client(section)?.get_connection_with_timeout(t)?;
    c.set_read_timeout(Some(t))?;
    c.set_write_timeout(Some(t))?;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(section.pattern())
            .arg("COUNT")
            .arg(1000)
            .query(&mut c)?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut records = BTreeMap::new();
    for chunk in keys.chunks(MGET_CHUNK) {
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(chunk).query(&mut c)?;
        parse(chunk.to_vec(), values, &mut records);
    }
    Ok(Snapshot { records })
}

/// The task's handles.
pub struct Handle {
    /// Where changes go.
    pub writer: Writer,
    /// The latest read of the store.
    pub snapshot: watch::Receiver<Option<Arc<Snapshot>>>,
}

/// Starts the task (inside a tokio runtime). `own` is this node's live set
/// at start (flows its previous run left that the store still had), `ttl`
/// the keys' time to live.
pub fn spawn(section: &HaSection, status: Arc<Status>, ttl: Duration, own: Vec<Record>) -> Handle {
    let (tx, rx) = mpsc::channel(section.queue);
    let (snap_tx, snap_rx) = watch::channel(None);
    let task = Task {
        section: section.clone(),
        status: status.clone(),
        ttl_secs: ttl.as_secs().max(1),
        own: own
            .into_iter()
            .map(|r| (section.key(&section.node, &r.id), r))
            .collect(),
        conn: None,
        rewrite_all: true,
        deleted: std::collections::HashSet::new(),
        leased: None,
    };
    tokio::spawn(task.run(rx, snap_tx));
    Handle {
        writer: Writer { tx, status },
        snapshot: snap_rx,
    }
}

/// A handle with no task behind it (tests of the media layer's side):
/// what it writes comes out of the receiver, and reads go in through the
/// sender.
#[cfg(test)]
pub fn detached(
    status: Arc<Status>,
    queue: usize,
) -> (
    Handle,
    mpsc::Receiver<Change>,
    watch::Sender<Option<Arc<Snapshot>>>,
) {
    let (tx, rx) = mpsc::channel(queue);
    let (snap_tx, snap_rx) = watch::channel(None);
    (
        Handle {
            writer: Writer { tx, status },
            snapshot: snap_rx,
        },
        rx,
        snap_tx,
    )
}

struct Task {
    section: HaSection,
    status: Arc<Status>,
    ttl_secs: u64,
    own: HashMap<String, Record>,
    conn: Option<ConnectionManager>,
    /// Write the whole live set at the next answer (start, after an outage).
    rewrite_all: bool,
    /// Keys deleted while the store did not answer: deleted at its first
    /// answer, so another node's mirror of an ended call does not wait for
    /// the key's TTL.
    deleted: std::collections::HashSet<String>,
    /// `role = "auto"`: when this node last held the lease.
    leased: Option<std::time::Instant>,
}

/// Takes or renews the `role = "auto"` lease in one step: SET NX PX when
/// nobody holds it, PEXPIRE when this node does (a script, so no other
/// node can take it between the check and the renewal). 1 = held.
const LEASE_SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end \
if not v then redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) return 1 end \
return 0";

impl Task {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.section.connect_timeout_ms)
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Change>,
        snap: watch::Sender<Option<Arc<Snapshot>>>,
    ) {
        let mut sync = tokio::time::interval(Duration::from_millis(self.section.sync_interval_ms));
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Three refreshes per TTL: a key lives while its owner does.
        let mut refresh = tokio::time::interval(Duration::from_millis(self.ttl_secs * 1000 / 3));
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let changed = Arc::new(tokio::sync::Notify::new());
        let listener = tokio::spawn(subscribe(self.section.clone(), changed.clone()));
        loop {
            tokio::select! {
                () = changed.notified() => {
                    if let Some(s) = self.read().await {
                        if snap.send(Some(Arc::new(s))).is_err() {
                            break;
                        }
                        super::snapshot_ready().notify_one();
                    }
                }
                c = rx.recv() => {
                    let Some(c) = c else { break };
                    self.status.queued.fetch_sub(1, Ordering::Relaxed);
                    self.change(c).await;
                }
                _ = sync.tick() => {
                    if self.section.role == super::Role::Auto {
                        self.elect().await;
                    }
                    if let Some(s) = self.read().await {
                        if snap.send(Some(Arc::new(s))).is_err() {
                            break;
                        }
                        super::snapshot_ready().notify_one();
                    }
                }
                _ = refresh.tick() => {
                    self.rewrite_all = true;
                    self.flush().await;
                }
            }
        }
        listener.abort();
    }

    /// `role = "auto"`: takes or renews the lease ([`LEASE_SCRIPT`]) and
    /// sets the role from it. A node that cannot reach the store keeps its
    /// role until its lease would have run out, then reports standby (it
    /// cannot know it still holds it).
    async fn elect(&mut self) {
        let held = match self.conn().await {
            Some(mut conn) => {
                let cmd = redis::cmd("EVAL")
                    .arg(LEASE_SCRIPT)
                    .arg(1)
                    .arg(self.section.lease_key())
                    .arg(&self.section.node)
                    .arg(self.section.lease_ms)
                    .to_owned();
                match tokio::time::timeout(self.timeout(), cmd.query_async::<i64>(&mut conn)).await
                {
                    Ok(Ok(n)) => Some(n == 1),
                    Ok(Err(e)) => {
                        self.failed(&e.to_string());
                        None
                    }
                    Err(_) => {
                        self.failed("lease timed out");
                        None
                    }
                }
            }
            None => None,
        };
        let now = std::time::Instant::now();
        let lease = Duration::from_millis(self.section.lease_ms);
        let active = match held {
            Some(true) => {
                self.leased = Some(now);
                true
            }
            Some(false) => {
                self.leased = None;
                false
            }
            None => self.leased.is_some_and(|t| now.duration_since(t) < lease),
        };
        let role = if active {
            super::Role::Active
        } else {
            super::Role::Standby
        };
        if self.status.role() != role {
            tracing::warn!(role = role.name(), lease = %self.section.lease_key(), "HA election: role changed");
            self.status.set_role(role);
        }
    }

    fn failed(&mut self, why: &str) {
        self.status.errors.fetch_add(1, Ordering::Relaxed);
        self.status.store_health(false, why);
        self.rewrite_all = true;
    }

    /// The connection, made if needed (bounded by the timeout).
    async fn conn(&mut self) -> Option<ConnectionManager> {
        if let Some(c) = &self.conn {
            return Some(c.clone());
        }
        let t = self.timeout();
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(t))
            .set_response_timeout(Some(t))
            .set_number_of_retries(1);
        let made = match client(&self.section) {
            Ok(c) => tokio::time::timeout(t * 2, ConnectionManager::new_with_config(c, cfg)).await,
            Err(e) => {
                self.failed(&e.to_string());
                return None;
            }
        };
        match made {
            Ok(Ok(c)) => {
                self.conn = Some(c.clone());
                Some(c)
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("connection timed out");
                None
            }
        }
    }

    async fn change(&mut self, c: Change) {
        let cmd = match c {
            Change::Put(r) => {
                let key = self.section.key(&r.node, &r.id);
                let Ok(json) = serde_json::to_string(&*r) else {
                    return;
                };
                if r.node == self.section.node {
                    self.own.insert(key.clone(), *r);
                }
                let mut cmd = redis::cmd("SET");
                cmd.arg(key).arg(json).arg("EX").arg(self.ttl_secs);
                cmd
            }
            Change::Del(key) => {
                self.own.remove(&key);
                self.deleted.insert(key.clone());
                let mut cmd = redis::cmd("DEL");
                cmd.arg(key);
                cmd
            }
        };
        self.status
            .owned
            .store(self.own.len() as u64, Ordering::Relaxed);
        // During an outage the change only updates the live set (and the
        // deleted keys): it is written with the rest at the first answer.
        if !self.status.store_up.load(Ordering::Relaxed) {
            return;
        }
        self.flush().await;
        if self.rewrite_all {
            return;
        }
        // The write and its notification (`HaSection::channel`) in one
        // round trip.
        let mut pipe = redis::pipe();
        pipe.add_command(cmd).ignore();
        pipe.cmd("PUBLISH")
            .arg(self.section.channel())
            .arg(&self.section.node)
            .ignore();
        if let Some(mut conn) = self.conn().await {
            match tokio::time::timeout(self.timeout(), pipe.query_async::<()>(&mut conn)).await {
                Ok(Ok(())) => {
                    self.status.writes.fetch_add(1, Ordering::Relaxed);
                    self.deleted.clear();
                }
                Ok(Err(e)) => self.failed(&e.to_string()),
                Err(_) => self.failed("write timed out"),
            }
        }
    }

    /// Writes the whole live set when asked to (pipelined).
    async fn flush(&mut self) {
        if !self.rewrite_all {
            return;
        }
        if self.own.is_empty() && self.deleted.is_empty() {
            // Nothing to write (an empty pipeline is an error to Redis).
            self.rewrite_all = false;
            return;
        }
        let Some(mut conn) = self.conn().await else {
            return;
        };
        let mut pipe = redis::pipe();
        for k in &self.deleted {
            pipe.cmd("DEL").arg(k).ignore();
        }
        for (k, r) in &self.own {
            if let Ok(json) = serde_json::to_string(r) {
                pipe.cmd("SET")
                    .arg(k)
                    .arg(json)
                    .arg("EX")
                    .arg(self.ttl_secs)
                    .ignore();
            }
        }
        pipe.cmd("PUBLISH")
            .arg(self.section.channel())
            .arg(&self.section.node)
            .ignore();
        let n = (self.own.len() + self.deleted.len()) as u64;
        match tokio::time::timeout(self.timeout(), pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {
                self.status.writes.fetch_add(n, Ordering::Relaxed);
                self.deleted.clear();
                self.status.store_health(true, "");
                self.rewrite_all = false;
            }
            Ok(Err(e)) => self.failed(&e.to_string()),
            Err(_) => self.failed("write timed out"),
        }
    }

    /// Every node's keys (SCAN + MGET), or `None` when the store fails.
    async fn read(&mut self) -> Option<Snapshot> {
        self.flush().await;
        let started = std::time::Instant::now();
        let mut conn = self.conn().await?;
        let t = self.timeout();
        let pattern = self.section.pattern();
        let r = tokio::time::timeout(t * 4, async {
            let mut keys: Vec<String> = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await?;
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            let mut records = BTreeMap::new();
            for chunk in keys.chunks(MGET_CHUNK) {
                let values: Vec<Option<String>> =
                    redis::cmd("MGET").arg(chunk).query_async(&mut conn).await?;
                parse(chunk.to_vec(), values, &mut records);
            }
            Ok::<_, redis::RedisError>(records)
        })
        .await;
        match r {
            Ok(Ok(records)) => {
                let now = now_ms();
                self.status.store_health(true, "");
                if self.rewrite_all {
                    // Back after an outage: the live set is written before
                    // the next read.
                    self.flush().await;
                }
                // A write of another node reaches this node's maps at
                // the next read at the latest: the interval plus what a
                // read takes is the lag's bound.
                let lag = self.section.sync_interval_ms
                    + u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.status.lag_ms.store(lag, Ordering::Relaxed);
                self.status.last_sync_ms.store(now, Ordering::Relaxed);
                Some(Snapshot { records })
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("read timed out");
                None
            }
        }
    }
}

/// Listens on the store's change channel (`HaSection::channel`) and wakes
/// the task's read for every other node's notification. A subscription
/// that cannot be made or breaks is made again after a second; meanwhile
/// the poll (`sync_interval_ms`) carries on alone, so nothing depends on a
/// notification arriving.
async fn subscribe(section: HaSection, changed: Arc<tokio::sync::Notify>) {
    use futures_util::StreamExt;
    let t = Duration::from_millis(section.connect_timeout_ms);
    let channel = section.channel();
    loop {
        let made = async {
            let mut ps = tokio::time::timeout(t * 2, client(&section)?.get_async_pubsub())
                .await
                .map_err(|_| {
                    redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
                })??;
            tokio::time::timeout(t * 2, ps.subscribe(&channel))
                .await
                .map_err(|_| {
                    redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
                })??;
            Ok::<_, redis::RedisError>(ps)
        }
        .await;
        match made {
            Ok(ps) => {
                tracing::debug!(%channel, "HA: subscribed to the store's change notifications");
                let mut stream = ps.into_on_message();
                while let Some(msg) = stream.next().await {
                    if msg.get_payload_bytes() != section.node.as_bytes() {
                        changed.notify_one();
                    }
                }
                tracing::debug!(%channel, "HA: change subscription ended; polling until it is back");
            }
            Err(e) => {
                tracing::debug!(%channel, error = %e, "HA: no change subscription; polling");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
