//! Stage `scale` (issue #12, "how cost grows"): how sip-edge's cost moves
//! with the number of calls it holds, and the datapath's with the number of
//! pinholes it holds.
//!
//! Signalling series: the release agent in the namespace topology of stage
//! `sip`, in **nat** mode, with `limits`/`[media]` caps raised for the bench.
//! A pool of persistent TLS connections from the client namespace (many
//! dialogs per connection, so 50k calls need about 64 sockets, not 50k)
//! establishes calls up to each level (100, 1k, 10k, 50k; `--quick`: 100,
//! 1k) and keeps them established: every held call gets an in-dialog
//! OPTIONS once per [`REFRESH_SECS`] (spread evenly), answered end to end by
//! the called party. Each held call carries one audio stream with
//! `a=rtcp-mux` (RFC 5761), so the edge allocates one public port per call
//! and installs one pinhole pair (two map entries): the pinhole count in the
//! maps is checked at every level. nat, because the edge's port pool is one
//! pool for all its addresses (`media::manager::PortPool`): relay takes two
//! pool ports per muxed call and four with separate RTCP, which caps one
//! agent at about 32k (16k) such calls, below the 50k level; the README's
//! capacity paragraph uses that arithmetic.
//!
//! At each level, with the held calls being refreshed:
//! - **ramp**: the held calls were set up at this rate (INVITE → 200 → ACK
//!   on every pool connection at once), with the agent's CPU per call;
//! - **memory**: the agent's RSS (VmRSS) and its growth per held call since
//!   the agent started;
//! - **hold**: the agent's CPU per held call per second while only the
//!   refreshes run;
//! - **new calls on top**: stage `sip`'s load generator (`sip::load`,
//!   persistent connections, whole calls INVITE … BYE back to back) →
//!   calls/s, setup p50/p99, and agent CPU per new call (CPU in the window,
//!   less the hold CPU of that window, over the calls);
//! - **install**: stage `sip`'s pinhole install probe (`sip::install_latency`:
//!   the called party's 200 OK → the rule visible in the pinned maps).
//!
//! Agent CPU is utime + stime of /proc/PID/stat (clock ticks; every thread).
//! The time-outs that end calls without media (`[media]
//! unused_timeout_secs`, `idle_timeout_secs`) are raised to a day: the bench
//! sends no media, and the point is the cost of calls that stay up.
//!
//! Datapath series: ns/packet of the warm and cold pinhole hit at 1, 10k,
//! 100k and 1M pinholes, taken from stage `prog` of the same run, or measured
//! by running stage `prog` here when it was not selected.
//!
//! Also derived (`Capacity`): what one edge host of this kind sustains, from
//! the figures above and the machine's CPUs and memory; every formula is
//! written next to its result.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    io,
    prog::{self, ProgStage},
    progress,
    sip::{self, InstallLatency, LoadRun, Target},
    BenchError, Mode, NotMeasured,
};
use crate::{
    testnet::{self, AgentProcess, Pins, Topology},
    testua::{self, reply, sdp, Dialog, SdpSpec, TestPki, UaConn, UaError, UaListener},
};
use sip_edge::datapath::maps::DatapathMaps;

/// Seconds between two in-dialog OPTIONS of one held call.
pub const REFRESH_SECS: f64 = 60.0;
/// Mean call holding time assumed when turning per-call setup CPU into a
/// steady-state CPU load (`Capacity`), seconds: a common planning figure
/// for business voice traffic (about 3 minutes).
pub const HOLDING_TIME_SECS: f64 = 180.0;
/// Packets per second of one G.711 call with 20 ms packets, both directions.
pub const PPS_PER_CALL: f64 = 100.0;
/// The edge's media port ranges in this stage (one pool for both
/// addresses), around the signalling port 5061.
const MEDIA_RANGES: [(u16, u16); 2] = [(2000, 5060), (5062, 60999)];
/// The edge namespace's ephemeral range, outside the media range (the agent
/// reserves its media ranges, and its own connections to the called party
/// still need source ports).
const EPHEMERAL: &str = "61000 65535";
/// Pinhole table size of the agent in this stage (map entries).
const MAX_PINHOLES: u32 = 262_144;
/// Client media ports of held calls: everything ≥ 1024 except the ranges
/// `sip::load` (10000-19999) and the install probe (30000-31999) use: in
/// nat mode the client's own address and port is a map key, so two calls
/// cannot share one.
const HELD_PORTS: [(u32, u32); 3] = [(1024, 9999), (20000, 29999), (32000, 65535)];

/// Sizes of one run.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleSizes {
    /// Held-call levels.
    pub levels: Vec<u32>,
    /// Persistent TLS connections carrying the held calls.
    pub connections: u32,
    /// Workers placing new calls on top (each back to back).
    pub workers: u32,
    /// Seconds of the new-call window.
    pub seconds: f64,
    /// Seconds of the hold-only window.
    pub hold_seconds: f64,
    /// Probe calls per install figure.
    pub probe_calls: u32,
    /// Seconds between two refreshes of one held call.
    pub refresh_secs: f64,
    /// Seconds a ramp to the next level may take; a level not reached by
    /// then is measured where the ramp stopped, and the series ends there.
    pub ramp_budget_secs: f64,
}

impl ScaleSizes {
    fn for_mode(mode: Mode) -> ScaleSizes {
        if mode.quick {
            ScaleSizes {
                levels: vec![100, 1000],
                connections: 8,
                workers: 4,
                seconds: 1.5,
                hold_seconds: 1.0,
                probe_calls: 10,
                refresh_secs: REFRESH_SECS,
                ramp_budget_secs: 60.0,
            }
        } else {
            ScaleSizes {
                levels: vec![100, 1000, 10_000, 50_000],
                connections: 64,
                workers: 16,
                seconds: 5.0,
                hold_seconds: 5.0,
                probe_calls: 200,
                refresh_secs: REFRESH_SECS,
                ramp_budget_secs: 150.0,
            }
        }
    }
}

/// One level of held calls.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleLevel {
    /// The level aimed at.
    pub target_calls: u32,
    /// Calls held (established, refreshed) while measuring: the target
    /// unless set-ups failed or the ramp ran out of its time budget.
    pub held_calls: u32,
    /// Map entries the agent had installed at this level (two per held
    /// nat call: inbound and outbound).
    pub pinholes: u64,
    /// Held calls that failed to set up on the way here.
    pub ramp_failed: u64,
    /// Seconds the ramp from the previous level took.
    pub ramp_seconds: f64,
    /// Held calls set up per second on the way here.
    pub ramp_calls_per_s: f64,
    /// Held-call setup (INVITE → 200) p99 during the ramp, ms.
    pub ramp_setup_p99_ms: f64,
    /// Agent CPU per held call set up during the ramp, ms.
    pub ramp_cpu_ms_per_call: f64,
    /// Agent VmRSS at this level, kB.
    pub rss_kb: u64,
    /// (VmRSS here − VmRSS before the first call) / held calls, bytes.
    pub rss_bytes_per_call: f64,
    /// Agent CPU per held call per second with only the refreshes
    /// running, less the agent's CPU with no calls, µs.
    pub hold_cpu_us_per_call_s: f64,
    /// Agent CPU during the hold window, share of one CPU.
    pub hold_cpu_share: f64,
    /// New calls on top (stage `sip`'s generator, persistent connections).
    pub load: LoadRun,
    /// Agent CPU during the new-call window, share of one CPU.
    pub load_cpu_share: f64,
    /// (agent CPU in the new-call window − hold CPU for as long) / new
    /// calls, ms: one whole call (INVITE … BYE) at this level.
    pub cpu_ms_per_new_call: f64,
    /// Pinhole install latency with the held calls refreshed meanwhile.
    pub install: InstallLatency,
    /// In-dialog OPTIONS sent to held calls at this level.
    pub refreshes: u64,
    /// Of those, failed (no 200 within 5 s, or the connection broke).
    pub refresh_failed: u64,
    /// OPTIONS → 200 p99, ms.
    pub refresh_p99_ms: f64,
}

/// One point of the datapath series.
#[derive(Clone, Debug, Serialize)]
pub struct DatapathPoint {
    /// Path (`hit-v4-udp-relay`, `hit-v4-udp-nat`).
    pub case: String,
    /// Pinholes installed.
    pub pinholes: u32,
    /// `warm` or `cold`.
    pub phase: String,
    /// ns per packet.
    pub ns_per_packet: f64,
    /// The adjacent `sip_edge_pass` baseline, ns.
    pub pass_ns: f64,
}

/// One BPF map of the agent at this stage's configuration.
#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    /// Pin file name.
    pub name: String,
    /// Kernel map type (aya's name).
    pub map_type: String,
    /// Capacity.
    pub max_entries: u32,
    /// Key bytes.
    pub key_size: u32,
    /// Value bytes.
    pub value_size: u32,
    /// `memlock` of /proc/self/fdinfo: the kernel memory it holds, bytes.
    pub memlock_bytes: u64,
}

/// What one edge host of this kind sustains, from the measured figures.
#[derive(Clone, Debug, Serialize)]
pub struct Capacity {
    /// Logical CPUs.
    pub cpus: usize,
    /// MemTotal, bytes.
    pub mem_total_bytes: u64,
    /// The level the per-call figures below come from (the largest).
    pub at_calls: u32,
    /// Agent RSS per held call there, bytes.
    pub rss_bytes_per_call: f64,
    /// Kernel map memory per pinhole entry (the maps whose size follows
    /// `limits.max_pinholes`, over it), bytes.
    pub map_bytes_per_pinhole: f64,
    /// Kernel map memory that does not follow `max_pinholes`, bytes.
    pub map_fixed_bytes: u64,
    /// Map entries per call (measured: pinholes / held calls).
    pub pinholes_per_call: f64,
    /// MemTotal / (RSS per call + map bytes per call).
    pub calls_by_memory: f64,
    /// Hold CPU per call per second, µs.
    pub hold_cpu_us_per_call_s: f64,
    /// CPU per whole call (setup and tear-down), ms.
    pub cpu_ms_per_call: f64,
    /// cpus / (hold CPU per call·s + CPU per call / `HOLDING_TIME_SECS`).
    pub calls_by_cpu: f64,
    /// The same CPU budget spent on new calls only: cpus / CPU per call.
    pub call_rate_by_cpu: f64,
    /// CPU per whole call as a line in the held calls N, least squares over
    /// the levels: (ms at N = 0, µs more per held call).
    pub cpu_per_call_fit: Option<(f64, f64)>,
    /// With that line: the N where N × (hold + (a + b·N) / holding time)
    /// uses every CPU.
    pub calls_by_cpu_fit: Option<f64>,
    /// Edge media ports (the stage's range, one pool for all addresses).
    pub media_ports: u32,
    /// Calls the pool allows: nat + rtcp-mux (1 port), relay + rtcp-mux
    /// (2), relay with separate RTCP (4).
    pub calls_by_ports: Vec<(String, f64)>,
    /// Largest pinhole table `limits.max_pinholes` accepts.
    pub pinholes_by_config: u64,
    /// MemTotal / map bytes per pinhole.
    pub pinholes_by_memory: f64,
    /// Warm v4 UDP hit at the largest measured table, ns/packet.
    pub hit_ns_at_largest: Option<(u32, f64)>,
    /// 1000 / that: Mpps one CPU could push through the program alone.
    pub mpps_per_cpu_program: Option<f64>,
    /// The forward stage's zero-loss rate through sip-edge with the most
    /// pinholes it measured (same run, when it ran), Mpps.
    pub forward_zero_loss_mpps: Option<(String, f64)>,
    /// Calls whose media that rate carries (`PPS_PER_CALL` each).
    pub calls_by_forward_rate: Option<f64>,
    /// The smallest of the call limits above, and which it is.
    pub first_limit: (String, f64),
}

/// The stage's figures.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleStage {
    /// Sizes used.
    pub sizes: ScaleSizes,
    /// Agent VmRSS before the first call, kB.
    pub rss_start_kb: u64,
    /// Agent CPU with no calls (timers, housekeeping), share of one CPU;
    /// subtracted from the hold figures.
    pub idle_cpu_share: f64,
    /// One row per level.
    pub levels: Vec<ScaleLevel>,
    /// Datapath ns/packet against table size.
    pub datapath: Vec<DatapathPoint>,
    /// Where `datapath` came from.
    pub datapath_source: String,
    /// The agent's maps at this stage's configuration.
    pub maps: Vec<MapMemory>,
    /// Derived capacity of one host.
    pub capacity: Option<Capacity>,
    /// Figures that could not be measured, and why.
    pub not_measured: Vec<NotMeasured>,
}

// --- /proc ---------------------------------------------------------------------

/// utime + stime of `pid`, seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime 14, stime 15 (proc(5)).
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some((utime + stime) / if tck > 0 { tck as f64 } else { 100.0 })
}

/// VmRSS of `pid`, kB.
fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn mem_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Raise RLIMIT_NOFILE to its hard limit (the agent, started later by this
/// process, inherits it).
fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_cur
}

/// Every map pinned in `dir`, with its kernel memory (fdinfo `memlock`).
fn map_memory(dir: &Path) -> Vec<MapMemory> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut out: Vec<MapMemory> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let info = aya::maps::MapInfo::from_pin(e.path()).ok()?;
            let fd = info.fd().ok()?;
            let raw = fd.as_fd().as_raw_fd();
            let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).ok()?;
            let memlock = fdinfo
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            Some(MapMemory {
                name: e.file_name().to_string_lossy().into_owned(),
                map_type: info
                    .map_type()
                    .map(|t| format!("{t:?}"))
                    .unwrap_or_else(|_| "unknown".into()),
                max_entries: info.max_entries(),
                key_size: info.key_size(),
                value_size: info.value_size(),
                memlock_bytes: memlock,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

// --- the called party ------------------------------------------------------------

/// An audio offer or answer; with `mux`, RTCP on the RTP port (RFC 5761).
fn audio(user: &str, addr: IpAddr, port: u16, mux: bool) -> String {
    let mut s = sdp(
        user,
        1,
        addr,
        &SdpSpec {
            audio: Some(port),
            ..Default::default()
        },
    );
    if mux {
        s.push_str("a=rtcp-mux\r\n");
    }
    s
}

/// Answers every INVITE (initial or re-INVITE) with 200 and an audio answer
/// that mirrors the offer's rtcp-mux, every other request but ACK with 200.
async fn callee_conn(mut conn: UaConn, next_port: Arc<AtomicU32>, stop: Arc<AtomicBool>) {
    let me = sip::callee(conn.local.port());
    let contact = format!("Contact: <{}>\r\n", me.contact);
    while !stop.load(Ordering::Relaxed) {
        let m = match conn.recv(Duration::from_millis(500)).await {
            Ok(m) => m,
            Err(UaError::Timeout { .. }) => continue,
            Err(_) => return,
        };
        conn.log.clear();
        let answer = if m.method().is_some_and(|x| x.is("INVITE")) {
            let Ok(d) = Dialog::incoming(&me, &m) else {
                return;
            };
            let mux = String::from_utf8_lossy(m.body()).contains("a=rtcp-mux");
            let n = next_port.fetch_add(1, Ordering::Relaxed) % 20_000;
            let body = audio(
                "bob",
                IpAddr::from([198, 51, 100, 2]),
                20_000 + 2 * n as u16,
                mux,
            );
            let tag = m
                .to_tag()
                .ok()
                .flatten()
                .unwrap_or_else(|| d.local_tag.clone());
            reply(&m, 200, "OK", &tag, &contact, "application/sdp", &body)
        } else if m.method().is_some_and(|x| x.is("ACK")) || m.status().is_some() {
            continue;
        } else {
            reply(&m, 200, "OK", &testua::unique("t"), "", "", "")
        };
        if conn.send(&answer).await.is_err() {
            return;
        }
    }
}

/// The called party on its own thread in the peer namespace.
struct Callee {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Callee {
    fn start(ns: &str, pki: &TestPki) -> Result<Callee, BenchError> {
        let addr = sip::sa(sip::CALLEE);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (ns, cert, key, s) = (
            ns.to_owned(),
            pki.peer_cert.clone(),
            pki.peer_key.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let r = sip::block_in_ns(&ns, async move {
                let l = match UaListener::bind_here(addr, &cert, &key) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let next = Arc::new(AtomicU32::new(0));
                while !s.load(Ordering::Relaxed) {
                    if let Ok(c) = l.accept(Duration::from_millis(200)).await {
                        tokio::spawn(callee_conn(c, next.clone(), s.clone()));
                    }
                }
            });
            if let Err(e) = r {
                eprintln!("scale callee thread: {e}");
            }
        });
        let mut c = Callee {
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(sip::WAIT) {
            Ok(Ok(())) => Ok(c),
            other => {
                c.shutdown();
                Err(BenchError::Io {
                    op: format!("callee listen on {addr}"),
                    source: std::io::Error::other(match other {
                        Ok(Err(e)) => e,
                        _ => "not ready within 5 s".into(),
                    }),
                })
            }
        }
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Callee {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// --- the held calls ------------------------------------------------------------------

/// Client media port of held call `i` (see [`HELD_PORTS`]).
fn held_port(i: u32) -> Option<u16> {
    let mut i = i;
    for (a, b) in HELD_PORTS {
        let n = b - a + 1;
        if i < n {
            return u16::try_from(a + i).ok();
        }
        i -= n;
    }
    None
}

/// Held calls [`HELD_PORTS`] has ports for.
fn held_capacity() -> u32 {
    HELD_PORTS.iter().map(|(a, b)| b - a + 1).sum()
}

/// One pool connection and the calls it holds.
struct HeldConn {
    conn: Option<UaConn>,
    calls: Vec<Dialog>,
}

#[derive(Default)]
struct OpStats {
    ok: u64,
    failed: u64,
    /// Not attempted (time budget spent).
    skipped: u64,
    took: Vec<Duration>,
    errors: Vec<String>,
}

impl OpStats {
    fn note(&mut self, e: &UaError) {
        self.failed += 1;
        let m = e.to_string();
        if self.errors.len() < 3 && !self.errors.contains(&m) {
            self.errors.push(m);
        }
    }
    fn merge(&mut self, o: OpStats) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.skipped += o.skipped;
        self.took.extend(o.took);
        for e in o.errors {
            if self.errors.len() < 3 && !self.errors.contains(&e) {
                self.errors.push(e);
            }
        }
    }
}

impl HeldConn {
    async fn conn(&mut self, t: &Target) -> Result<&mut UaConn, UaError> {
        if self.conn.is_none() {
            self.conn =
                Some(testua::connect_tls_here(t.addr, t.cfg.clone(), t.tls_name, sip::WAIT).await?);
        }
        self.conn.as_mut().ok_or(UaError::Closed {
            what: "pool connection".into(),
        })
    }

    /// Set up one held call with client media port `port`.
    async fn establish(&mut self, t: &Target, port: u16) -> Result<Duration, UaError> {
        let c = self.conn(t).await?;
        let mut d = Dialog::outgoing(&sip::caller(), t.ruri);
        let offer = audio("alice", IpAddr::from([10, 77, 0, 2]), port, true);
        let t0 = Instant::now();
        c.send(&d.invite(&offer)).await?;
        let ok = c.recv_status(200, sip::WAIT).await?;
        let took = t0.elapsed();
        d.on_invite_response(&ok)?;
        c.send(&d.ack("", "")).await?;
        c.log.clear();
        self.calls.push(d);
        Ok(took)
    }

    /// In-dialog OPTIONS to held call `i`.
    async fn refresh(&mut self, t: &Target, i: usize) -> Result<Duration, UaError> {
        let Some(mut d) = self.calls.get(i).cloned() else {
            return Ok(Duration::ZERO);
        };
        let c = self.conn(t).await?;
        let req = d.request("OPTIONS", "", "");
        let t0 = Instant::now();
        c.send(&req).await?;
        c.recv_status(200, sip::WAIT).await?;
        c.log.clear();
        if let Some(slot) = self.calls.get_mut(i) {
            slot.cseq = d.cseq;
        }
        Ok(t0.elapsed())
    }

    /// Set up the calls of `ports`, one after another.
    async fn grow(mut self, t: Target, ports: Vec<u16>, deadline: Instant) -> (HeldConn, OpStats) {
        let mut s = OpStats::default();
        for (n, p) in ports.iter().copied().enumerate() {
            if Instant::now() > deadline {
                s.skipped = (ports.len() - n) as u64;
                break;
            }
            // A broken connection may still carry a late answer: start afresh.
            match self.establish(&t, p).await {
                Ok(took) => {
                    s.ok += 1;
                    s.took.push(took);
                }
                Err(e) => {
                    s.note(&e);
                    self.conn = None;
                }
            }
        }
        (self, s)
    }

    /// Refresh every held call once per `period`, evenly spread, until `stop`.
    async fn refresh_loop(
        mut self,
        t: Target,
        period: Duration,
        stop: Arc<AtomicBool>,
    ) -> (HeldConn, OpStats) {
        let mut s = OpStats::default();
        let n = self.calls.len();
        if n == 0 {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return (self, s);
        }
        let gap = period / n as u32;
        // Connections start at different points of their cycle.
        let mut next = tokio::time::Instant::now() + gap.mul_f64(spread_unit(n));
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let now = tokio::time::Instant::now();
            if now < next {
                tokio::time::sleep((next - now).min(Duration::from_millis(50))).await;
                continue;
            }
            match self.refresh(&t, i).await {
                Ok(took) => {
                    s.ok += 1;
                    s.took.push(took);
                }
                Err(e) => {
                    s.note(&e);
                    self.conn = None;
                }
            }
            i = (i + 1) % n;
            next += gap;
        }
        (self, s)
    }
}

/// A start offset in `0..1` that differs between connections of different
/// sizes without a random source: the golden-ratio sequence.
fn spread_unit(n: usize) -> f64 {
    (n as f64 * 0.618_033_988_75).fract()
}

enum Cmd {
    Grow {
        to: u32,
        deadline: Instant,
        reply: std::sync::mpsc::Sender<Result<OpStats, String>>,
    },
    RefreshStart {
        period: Duration,
    },
    RefreshStop {
        reply: std::sync::mpsc::Sender<OpStats>,
    },
}

/// The held calls: a thread in the client namespace with the pool.
struct Holder {
    tx: tokio::sync::mpsc::UnboundedSender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn gone() -> BenchError {
    BenchError::Io {
        op: "held-call thread".into(),
        source: std::io::Error::other("exited"),
    }
}

impl Holder {
    fn start(ns: &str, t: Target, connections: u32) -> Holder {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Cmd>();
        let ns = ns.to_owned();
        let thread = std::thread::spawn(move || {
            let r = sip::block_in_ns(&ns, async move {
                let mut pool: Vec<HeldConn> = (0..connections)
                    .map(|_| HeldConn {
                        conn: None,
                        calls: Vec::new(),
                    })
                    .collect();
                let mut held: u32 = 0;
                let mut refreshing: Option<(Arc<AtomicBool>, Vec<_>)> = None;
                while let Some(cmd) = rx.recv().await {
                    match cmd {
                        Cmd::Grow {
                            to,
                            deadline,
                            reply,
                        } => {
                            if to > held_capacity() {
                                let _ = reply.send(Err(format!(
                                    "{to} held calls: client media ports for {} only",
                                    held_capacity()
                                )));
                                continue;
                            }
                            let k = pool.len() as u32;
                            let mut shares: Vec<Vec<u16>> = vec![Vec::new(); k as usize];
                            for (j, i) in (held..to).enumerate() {
                                if let Some(p) = held_port(i) {
                                    shares[j % k as usize].push(p);
                                }
                            }
                            let tasks: Vec<_> = std::mem::take(&mut pool)
                                .into_iter()
                                .zip(shares)
                                .map(|(h, ports)| tokio::spawn(h.grow(t.clone(), ports, deadline)))
                                .collect();
                            let mut s = OpStats::default();
                            for task in tasks {
                                match task.await {
                                    Ok((h, st)) => {
                                        pool.push(h);
                                        s.merge(st);
                                    }
                                    Err(e) => s.errors.push(e.to_string()),
                                }
                            }
                            // Ports of failed calls are not retried: the
                            // next level starts after the last one handed out.
                            held = to;
                            let _ = reply.send(Ok(s));
                        }
                        Cmd::RefreshStart { period } => {
                            let stop = Arc::new(AtomicBool::new(false));
                            let tasks: Vec<_> = std::mem::take(&mut pool)
                                .into_iter()
                                .map(|h| {
                                    tokio::spawn(h.refresh_loop(t.clone(), period, stop.clone()))
                                })
                                .collect();
                            refreshing = Some((stop, tasks));
                        }
                        Cmd::RefreshStop { reply } => {
                            let mut s = OpStats::default();
                            if let Some((stop, tasks)) = refreshing.take() {
                                stop.store(true, Ordering::Relaxed);
                                for task in tasks {
                                    if let Ok((h, st)) = task.await {
                                        pool.push(h);
                                        s.merge(st);
                                    }
                                }
                            }
                            let _ = reply.send(s);
                        }
                    }
                }
                // Dropping the pool closes every connection; the agent's
                // dialogs go with the agent.
                drop(pool);
            });
            if let Err(e) = r {
                eprintln!("held-call thread: {e}");
            }
        });
        Holder {
            tx,
            thread: Some(thread),
        }
    }

    fn grow(&self, to: u32, budget: Duration) -> Result<OpStats, BenchError> {
        let (reply, rx) = std::sync::mpsc::channel();
        let deadline = Instant::now() + budget;
        self.tx
            .send(Cmd::Grow {
                to,
                deadline,
                reply,
            })
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?.map_err(|e| BenchError::Io {
            op: "grow held calls".into(),
            source: std::io::Error::other(e),
        })
    }

    fn refresh_start(&self, period: Duration) -> Result<(), BenchError> {
        self.tx
            .send(Cmd::RefreshStart { period })
            .map_err(|_| gone())
    }

    fn refresh_stop(&self) -> Result<OpStats, BenchError> {
        let (reply, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Cmd::RefreshStop { reply })
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop (after a running
        // refresh is stopped by the dropped tasks' runtime).
        let (tx, _) = tokio::sync::mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// --- the agent -----------------------------------------------------------------------

/// The demo configuration in nat mode, widened for tens of thousands of
/// calls from one client address: media ranges of 58,999 ports, caps
/// (calls, flows per client, map entries) above the largest level, no
/// per-source admission limits, media time-outs of a day (no media is
/// sent), and the install probe's route.
fn config(pin_dir: &Path, pki: &TestPki) -> Result<String, BenchError> {
    let base = testua::edge_config(pin_dir, pki, "nat");
    let edits = [
        (
            "port_ranges = [\"40000-40999\"]\n".to_owned(),
            format!(
                "port_ranges = [{}]\nmax_pinholes_per_client = 1000000\nmax_calls = 1000000\n\
                 idle_timeout_secs = 86400\nunused_timeout_secs = 86400\n",
                MEDIA_RANGES
                    .iter()
                    .map(|(a, b)| format!("\"{a}-{b}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        (
            "[[route]]\n".to_owned(),
            "[[route]]\ndomain = \"probe.example.net\"\nhost = \"198.51.100.2\"\nport = 5062\ntls_name = \"peer.example.net\"\n[[route]]\n".to_owned(),
        ),
    ];
    let mut cfg = base
        + &format!(
            "\n[limits]\nmax_pinholes = {MAX_PINHOLES}\nmax_connections_per_source = 100000\n\
             max_handshakes_per_source = 100000\nrequest_rate = 10000000\nrequest_burst = 10000000\n\
             invite_rate = 10000000\ninvite_burst = 10000000\nregister_rate = 10000000\n\
             register_burst = 10000000\nglobal_request_rate = 10000000\n\
             global_request_burst = 10000000\n"
        );
    for (from, to) in edits {
        if !cfg.contains(&from) {
            return Err(BenchError::Io {
                op: "derive the scale agent configuration".into(),
                source: std::io::Error::other(format!(
                    "`{}` not in testua::edge_config",
                    from.trim()
                )),
            });
        }
        cfg = cfg.replacen(&from, &to, 1);
    }
    Ok(cfg)
}

/// Held calls' refresh statistics folded into `level`.
fn refresh_figures(s: &mut OpStats) -> (u64, u64, f64) {
    s.took.sort();
    (s.ok + s.failed, s.failed, sip::percentile_ms(&s.took, 0.99))
}

/// Everything measured with the agent up.
#[allow(clippy::too_many_arguments)]
fn run_levels(
    topo: &Topology,
    pki: &TestPki,
    dir: &Path,
    sizes: &ScaleSizes,
    t: &Target,
    stage: &mut ScaleStage,
    start: Instant,
) -> Result<(), BenchError> {
    let bin = testnet::agent_bin();
    if !bin.exists() {
        return Err(BenchError::Io {
            op: format!("agent binary {}", bin.display()),
            source: std::io::Error::other(
                "missing: build it with `cargo build --release -p sip-edge --bin sip-edge`",
            ),
        });
    }
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/sip-edge-bench-scale-{}",
        std::process::id()
    ));
    let _pins = Pins(pin_dir.clone());
    let cfg = dir.join("sip-edge-scale.toml");
    std::fs::write(&cfg, config(&pin_dir, pki)?).map_err(io("write agent config"))?;
    testnet::sh(&[
        "ip",
        "netns",
        "exec",
        &topo.edge,
        "sysctl",
        "-qw",
        &format!("net.ipv4.ip_local_port_range={EPHEMERAL}"),
    ])?;
    // (The harness keeps `sip_edge::transport` at info for its ready line;
    // the per-connection lines of `transport::conn` stay at warn.)
    std::env::set_var("SIP_EDGE_LOG", "warn,sip_edge::transport::conn=warn");
    let agent = AgentProcess::start(topo, &bin, &cfg, &pin_dir, &["int0", "ext0"])?;
    let pid = agent.pid();
    sip::wait_listening(
        &topo.client,
        sip::sa(sip::PROXY_INSIDE),
        "sip-edge inside listener",
        || rss_kb(pid).is_some(),
    )?;
    stage.maps = map_memory(&pin_dir);
    let maps = DatapathMaps::from_pins(&pin_dir)?;
    std::thread::sleep(Duration::from_millis(500));
    stage.rss_start_kb = rss_kb(pid).unwrap_or(0);
    let cpu = || cpu_secs(pid).unwrap_or(0.0);
    let (c0, t0) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(sizes.hold_seconds));
    stage.idle_cpu_share = (cpu() - c0) / t0.elapsed().as_secs_f64();
    let holder = Holder::start(&topo.client, t.clone(), sizes.connections);
    let period = Duration::from_secs_f64(sizes.refresh_secs);
    let mut prev = 0u32;
    let mut held_total = 0u32;
    for &level in &sizes.levels {
        progress(
            start,
            &format!(
                "scale: ramp {prev} → {level} held calls over {} connections",
                sizes.connections
            ),
        );
        let (c0, t0) = (cpu(), Instant::now());
        let mut ramp = holder.grow(level, Duration::from_secs_f64(sizes.ramp_budget_secs))?;
        held_total += ramp.ok as u32;
        let ramp_s = t0.elapsed().as_secs_f64();
        let ramp_cpu = cpu() - c0;
        ramp.took.sort();
        if let Some(e) = ramp.errors.first() {
            progress(
                start,
                &format!("scale: {} ramp failures, e.g. {e}", ramp.failed),
            );
        }
        let pinholes = maps.list().map(|l| l.len() as u64).unwrap_or(0);
        holder.refresh_start(period)?;
        std::thread::sleep(Duration::from_millis(500));
        let rss = rss_kb(pid).unwrap_or(0);
        // Hold only.
        let (c0, t0) = (cpu(), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(sizes.hold_seconds));
        let hold_cpu_rate = (cpu() - c0) / t0.elapsed().as_secs_f64();
        // New calls on top.
        let (c0, t0) = (cpu(), Instant::now());
        let load = sip::load(
            &topo.client,
            "sip-edge",
            t,
            sizes.workers,
            sizes.seconds,
            false,
            Arc::default(),
        )?;
        let load_wall = t0.elapsed().as_secs_f64();
        let load_cpu = cpu() - c0;
        let install = sip::install_latency(topo, pki, &pin_dir, t, sizes.probe_calls, 0, false)?;
        let mut refresh = holder.refresh_stop()?;
        let (refreshes, refresh_failed, refresh_p99_ms) = refresh_figures(&mut refresh);
        let held = held_total;
        let row = ScaleLevel {
            target_calls: level,
            held_calls: held,
            pinholes,
            ramp_failed: ramp.failed,
            ramp_seconds: ramp_s,
            ramp_calls_per_s: ramp.ok as f64 / ramp_s.max(1e-9),
            ramp_setup_p99_ms: sip::percentile_ms(&ramp.took, 0.99),
            ramp_cpu_ms_per_call: ramp_cpu * 1e3 / ramp.ok.max(1) as f64,
            rss_kb: rss,
            rss_bytes_per_call: (rss as f64 - stage.rss_start_kb as f64) * 1024.0
                / held.max(1) as f64,
            hold_cpu_us_per_call_s: (hold_cpu_rate - stage.idle_cpu_share).max(0.0) * 1e6
                / held.max(1) as f64,
            hold_cpu_share: hold_cpu_rate,
            load_cpu_share: load_cpu / load_wall.max(1e-9),
            cpu_ms_per_new_call: ((load_cpu - hold_cpu_rate * load_wall).max(0.0)) * 1e3
                / (load.calls + load.late).max(1) as f64,
            load,
            install,
            refreshes,
            refresh_failed,
            refresh_p99_ms,
        };
        progress(
            start,
            &format!(
                "scale: {} held ({} pinholes): ramp {:.0}/s ({:.2} ms CPU/call, {} failed), RSS {} kB ({:.0} B/call), hold {:.1} µs CPU/call·s, new calls {:.0}/s setup p99 {:.2} ms ({:.2} ms CPU/call, {} failed), install p99 {:.2} ms, refresh {} sent {} failed",
                row.held_calls,
                row.pinholes,
                row.ramp_calls_per_s,
                row.ramp_cpu_ms_per_call,
                row.ramp_failed,
                row.rss_kb,
                row.rss_bytes_per_call,
                row.hold_cpu_us_per_call_s,
                row.load.calls_per_s,
                row.load.setup_p99_ms,
                row.cpu_ms_per_new_call,
                row.load.failed,
                row.install.p99_ms,
                row.refreshes,
                row.refresh_failed
            ),
        );
        stage.levels.push(row);
        prev = level;
        if ramp.skipped > 0 {
            let reason = format!(
                "the ramp to {level} held calls reached {held} in its budget of {:.0} s ({:.2} ms agent CPU per set-up on the way, {} set-ups left): levels from {level} on are not measured",
                sizes.ramp_budget_secs,
                ramp_cpu * 1e3 / ramp.ok.max(1) as f64,
                ramp.skipped
            );
            progress(start, &format!("scale: {reason}"));
            stage.not_measured.push(NotMeasured {
                what: format!("{level} held calls"),
                reason,
            });
            break;
        }
    }
    drop(holder);
    if !agent.stop() {
        progress(
            start,
            "scale: sip-edge agent did not exit cleanly on SIGTERM",
        );
    }
    Ok(())
}

// --- datapath and capacity ---------------------------------------------------

fn datapath_points(p: &ProgStage) -> Vec<DatapathPoint> {
    p.rows
        .iter()
        .filter(|r| {
            r.class == "hit" && (r.case == "hit-v4-udp-relay" || r.case == "hit-v4-udp-nat")
        })
        .map(|r| DatapathPoint {
            case: r.case.clone(),
            pinholes: r.pinholes,
            phase: r.phase.into(),
            ns_per_packet: r.ns_per_packet,
            pass_ns: r.pass_ns,
        })
        .collect()
}

fn capacity(
    stage: &ScaleStage,
    forward: Option<&super::forward::ForwardStage>,
) -> Option<Capacity> {
    let top = stage.levels.iter().max_by_key(|l| l.held_calls)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = mem_total_bytes();
    // Maps whose capacity is the configured pinhole table (or a multiple of
    // it) grow with `limits.max_pinholes`; the rest is fixed.
    let (scaled, fixed): (Vec<&MapMemory>, Vec<&MapMemory>) = stage
        .maps
        .iter()
        .partition(|m| m.max_entries >= MAX_PINHOLES && m.max_entries % MAX_PINHOLES == 0);
    let per_pinhole =
        scaled.iter().map(|m| m.memlock_bytes).sum::<u64>() as f64 / MAX_PINHOLES as f64;
    let pinholes_per_call = top.pinholes as f64 / top.held_calls.max(1) as f64;
    let calls_by_memory =
        mem as f64 / (top.rss_bytes_per_call.max(1.0) + per_pinhole * pinholes_per_call);
    let hold = top.hold_cpu_us_per_call_s * 1e-6;
    let per_call = top.cpu_ms_per_new_call * 1e-3;
    let calls_by_cpu = cpus as f64 / (hold + per_call / HOLDING_TIME_SECS).max(1e-12);
    let ports: u32 = MEDIA_RANGES.iter().map(|(a, b)| u32::from(b - a) + 1).sum();
    let calls_by_ports = vec![
        ("nat, rtcp-mux (1 port per call)".to_owned(), ports as f64),
        (
            "relay, rtcp-mux (2 ports per call)".to_owned(),
            ports as f64 / 2.0,
        ),
        (
            "relay, separate RTCP (4 ports per call)".to_owned(),
            ports as f64 / 4.0,
        ),
    ];
    let hit = stage
        .datapath
        .iter()
        .filter(|p| p.case == "hit-v4-udp-relay" && p.phase == "warm")
        .max_by_key(|p| p.pinholes)
        .map(|p| (p.pinholes, p.ns_per_packet));
    let fwd = forward.and_then(|f| {
        f.forwarders
            .iter()
            .filter(|x| x.name.starts_with("sip-edge"))
            .max_by_key(|x| x.flows)
            .map(|x| (x.name.clone(), x.zero_loss_pps / 1e6))
    });
    let calls_by_forward_rate = fwd.as_ref().map(|(_, m)| m * 1e6 / PPS_PER_CALL);
    // Setup cost grows with the calls held: fit it and solve
    // (b/T)·N² + (a/T + hold)·N − cpus = 0 for N.
    let pts: Vec<(f64, f64)> = stage
        .levels
        .iter()
        .filter(|l| l.load.calls > 0)
        .map(|l| (l.held_calls as f64, l.cpu_ms_per_new_call * 1e-3))
        .collect();
    let fit = (pts.len() >= 2).then(|| {
        let n = pts.len() as f64;
        let (sx, sy) = pts.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
        let (mx, my) = (sx / n, sy / n);
        let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let b = if sxx > 0.0 { (sxy / sxx).max(0.0) } else { 0.0 };
        ((my - b * mx).max(0.0), b)
    });
    let calls_by_cpu_fit = fit.map(|(a, b)| {
        let qa = b / HOLDING_TIME_SECS;
        let qb = a / HOLDING_TIME_SECS + hold;
        if qa > 0.0 {
            (-qb + (qb * qb + 4.0 * qa * cpus as f64).sqrt()) / (2.0 * qa)
        } else {
            cpus as f64 / qb.max(1e-12)
        }
    });
    let mut limits = vec![
        ("memory".to_owned(), calls_by_memory),
        (
            "CPU (signalling)".to_owned(),
            calls_by_cpu_fit.unwrap_or(calls_by_cpu),
        ),
        ("media ports, nat + rtcp-mux".to_owned(), ports as f64),
    ];
    if let Some(c) = calls_by_forward_rate {
        limits.push(("forwarding rate (measured, veth)".to_owned(), c));
    }
    let first_limit = limits
        .into_iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default();
    Some(Capacity {
        cpus,
        mem_total_bytes: mem,
        at_calls: top.held_calls,
        rss_bytes_per_call: top.rss_bytes_per_call,
        map_bytes_per_pinhole: per_pinhole,
        map_fixed_bytes: fixed.iter().map(|m| m.memlock_bytes).sum(),
        pinholes_per_call,
        calls_by_memory,
        hold_cpu_us_per_call_s: top.hold_cpu_us_per_call_s,
        cpu_ms_per_call: top.cpu_ms_per_new_call,
        calls_by_cpu,
        call_rate_by_cpu: cpus as f64 / per_call.max(1e-12),
        cpu_per_call_fit: fit.map(|(a, b)| (a * 1e3, b * 1e6)),
        calls_by_cpu_fit,
        media_ports: ports,
        calls_by_ports,
        pinholes_by_config: 1 << 24,
        pinholes_by_memory: mem as f64 / per_pinhole.max(1.0),
        hit_ns_at_largest: hit,
        mpps_per_cpu_program: hit.map(|(_, ns)| 1e3 / ns),
        forward_zero_loss_mpps: fwd,
        calls_by_forward_rate,
        first_limit,
    })
}

/// Run the stage. `prog` is stage `prog`'s result of this run, if it ran
/// (otherwise it is run here for the datapath series); `forward` feeds the
/// capacity arithmetic when that stage ran.
pub fn run(
    mode: Mode,
    start: Instant,
    prog_stage: Option<&ProgStage>,
    forward: Option<&super::forward::ForwardStage>,
) -> Result<ScaleStage, BenchError> {
    let sizes = ScaleSizes::for_mode(mode);
    let nofile = raise_nofile();
    progress(
        start,
        &format!(
            "scale: levels {:?} held calls over {} connections, {} workers × {:.1} s on top, refresh every {:.0} s, RLIMIT_NOFILE {nofile}",
            sizes.levels, sizes.connections, sizes.workers, sizes.seconds, sizes.refresh_secs
        ),
    );
    let mut stage = ScaleStage {
        sizes: sizes.clone(),
        rss_start_kb: 0,
        idle_cpu_share: 0.0,
        levels: Vec::new(),
        datapath: Vec::new(),
        datapath_source: String::new(),
        maps: Vec::new(),
        capacity: None,
        not_measured: Vec::new(),
    };
    {
        let tmp = tempfile::tempdir().map_err(io("tempdir"))?;
        let pki = TestPki::generate(tmp.path()).map_err(sip::ua_err("certificates"))?;
        let mut topo = Topology::create(&format!("sc{}", std::process::id() % 10_000))?;
        topo.attach_pass_programs()?;
        let _callee = Callee::start(&topo.peer, &pki)?;
        let target = Target {
            addr: sip::sa(sip::PROXY_INSIDE),
            tls_name: testua::EDGE_TLS_NAME,
            cfg: testua::client_config(&pki.ca).map_err(sip::ua_err("client TLS config"))?,
            ruri: "sips:bob@peer.example.net",
        };
        if let Err(e) = run_levels(&topo, &pki, tmp.path(), &sizes, &target, &mut stage, start) {
            progress(start, &format!("scale: {e}"));
            stage.not_measured.push(NotMeasured {
                what: "held-call levels".into(),
                reason: format!("{e:#}"),
            });
        }
    }
    match prog_stage {
        Some(p) => {
            stage.datapath = datapath_points(p);
            stage.datapath_source = "stage prog of this run".into();
        }
        None => {
            progress(
                start,
                "scale: stage prog not selected; running it for the datapath series",
            );
            match prog::run(mode, start) {
                Ok(p) => {
                    stage.datapath = datapath_points(&p);
                    stage.datapath_source =
                        "stage prog, run by stage scale (prog was not selected)".into();
                }
                Err(e) => stage.not_measured.push(NotMeasured {
                    what: "datapath series".into(),
                    reason: format!("{e:#}"),
                }),
            }
        }
    }
    stage.capacity = capacity(&stage, forward);
    Ok(stage)
}

/// The stage's PNG beside the report: `<stem>-scale.png`.
pub fn png_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map_or_else(|| "bench".into(), |s| s.to_string_lossy().into_owned());
    out.with_file_name(format!("{stem}-scale.png"))
}

/// Every level measured (the series may end early at a level the ramp
/// could not reach in its budget; that is in `not_measured`) with new calls
/// completed and its pinholes in the maps, and a datapath series: what
/// `--stages scale` must produce.
pub fn complete(s: &ScaleStage) -> bool {
    !s.levels.is_empty()
        && s.levels.iter().all(|l| {
            l.load.calls > 0 && l.install.calls > 0 && l.pinholes >= 2 * l.held_calls as u64
        })
        && !s.datapath.is_empty()
}

/// The stage's Markdown tables.
pub fn table(s: &ScaleStage) -> String {
    let mut t = String::from(
        "\n| held calls | pinholes | ramp setups/s | ramp CPU ms/call | RSS MB | RSS B/call | hold CPU µs/call·s | new calls/s | setup p50 ms | setup p99 ms | CPU ms/new call | install p50 ms | install p99 ms | refreshes (failed) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for l in &s.levels {
        t.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.1} | {:.0} | {:.1} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} ({}) |\n",
            if l.held_calls == l.target_calls {
                l.held_calls.to_string()
            } else {
                format!("{} of {}", l.held_calls, l.target_calls)
            },
            l.pinholes,
            l.ramp_calls_per_s,
            l.ramp_cpu_ms_per_call,
            l.rss_kb as f64 / 1024.0,
            l.rss_bytes_per_call,
            l.hold_cpu_us_per_call_s,
            l.load.calls_per_s,
            l.load.setup_p50_ms,
            l.load.setup_p99_ms,
            l.cpu_ms_per_new_call,
            l.install.p50_ms,
            l.install.p99_ms,
            l.refreshes,
            l.refresh_failed
        ));
    }
    t.push_str(&format!(
        "\nHeld calls: nat mode, one rtcp-mux audio stream each, over {} TLS connections, in-dialog OPTIONS every {:.0} s; new calls: {} workers × {:.1} s, persistent connections; agent RSS before the first call {:.1} MB, agent CPU with no calls {:.1}% of one CPU.\n",
        s.sizes.connections,
        s.sizes.refresh_secs,
        s.sizes.workers,
        s.sizes.seconds,
        s.rss_start_kb as f64 / 1024.0,
        s.idle_cpu_share * 100.0
    ));
    if !s.datapath.is_empty() {
        t.push_str(&format!(
            "\n| datapath ({}) | pinholes | phase | ns/packet | adjacent pass ns |\n|---|---:|---|---:|---:|\n",
            s.datapath_source
        ));
        for p in &s.datapath {
            t.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.1} |\n",
                p.case, p.pinholes, p.phase, p.ns_per_packet, p.pass_ns
            ));
        }
    }
    if !s.maps.is_empty() {
        t.push_str(&format!(
            "\n| agent map (limits.max_pinholes = {MAX_PINHOLES}) | type | entries | key B | value B | kernel memory kB |\n|---|---|---:|---:|---:|---:|\n"
        ));
        for m in &s.maps {
            t.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.0} |\n",
                m.name,
                m.map_type,
                m.max_entries,
                m.key_size,
                m.value_size,
                m.memlock_bytes as f64 / 1024.0
            ));
        }
    }
    if let Some(c) = &s.capacity {
        t.push_str(&format!(
            "\nCapacity of one host like this one ({} CPUs, {:.1} GiB), from the {}-call level:\n\n\
             - memory: {:.1} GiB / ({:.0} B RSS + {:.2} pinholes × {:.0} B of map) = {:.0} calls\n\
             - CPU: {} / ({:.1} µs hold per call·s + {:.2} ms per call / {:.0} s holding time) = {:.0} calls (all of it on setups: {:.0} calls/s)\n",
            c.cpus,
            c.mem_total_bytes as f64 / (1u64 << 30) as f64,
            c.at_calls,
            c.mem_total_bytes as f64 / (1u64 << 30) as f64,
            c.rss_bytes_per_call,
            c.pinholes_per_call,
            c.map_bytes_per_pinhole,
            c.calls_by_memory,
            c.cpus,
            c.hold_cpu_us_per_call_s,
            c.cpu_ms_per_call,
            HOLDING_TIME_SECS,
            c.calls_by_cpu,
            c.call_rate_by_cpu,
        ));
        if let (Some((a, b)), Some(n)) = (c.cpu_per_call_fit, c.calls_by_cpu_fit) {
            t.push_str(&format!(
                "- CPU, with the growth: CPU per call ≈ {a:.2} ms + {b:.2} µs × held calls (least squares over the levels); {} CPUs are used up at {n:.0} held calls ({HOLDING_TIME_SECS:.0} s holding time)\n",
                c.cpus
            ));
        }
        for (what, n) in &c.calls_by_ports {
            t.push_str(&format!(
                "- media ports: {} ports, {what}: {n:.0} calls\n",
                c.media_ports
            ));
        }
        t.push_str(&format!(
            "- pinholes: at most {} (`limits.max_pinholes`); memory: {:.1} GiB / {:.0} B = {:.0}\n",
            c.pinholes_by_config,
            c.mem_total_bytes as f64 / (1u64 << 30) as f64,
            c.map_bytes_per_pinhole,
            c.pinholes_by_memory
        ));
        if let (Some((n, ns)), Some(m)) = (c.hit_ns_at_largest, c.mpps_per_cpu_program) {
            t.push_str(&format!(
                "- packets: warm hit at {n} pinholes {ns:.0} ns → {m:.2} Mpps per CPU in the program alone ({:.0} calls at {PPS_PER_CALL:.0} pps each)\n",
                m * 1e6 / PPS_PER_CALL
            ));
        }
        if let (Some((name, mpps)), Some(calls)) =
            (&c.forward_zero_loss_mpps, c.calls_by_forward_rate)
        {
            t.push_str(&format!(
                "- forwarding (stage forward, {name}, zero loss): {mpps:.3} Mpps = {calls:.0} calls\n"
            ));
        }
        t.push_str(&format!(
            "- first limit: {} at {:.0} calls\n",
            c.first_limit.0, c.first_limit.1
        ));
    }
    for n in &s.not_measured {
        t.push_str(&format!("\n- not measured, {}: {}\n", n.what, n.reason));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_ports_avoid_the_load_and_probe_ranges() {
        let cap = held_capacity();
        assert!(cap >= 50_000, "{cap}");
        let mut seen = std::collections::HashSet::new();
        for i in 0..cap {
            let p = held_port(i).expect("port");
            assert!(p >= 1024);
            assert!(!(10_000..20_000).contains(&p), "{p}");
            assert!(!(30_000..32_000).contains(&p), "{p}");
            assert!(seen.insert(p), "{p} twice");
        }
        assert_eq!(held_port(cap), None);
    }

    #[test]
    fn proc_stat_parses_our_own_cpu_time() {
        let pid = std::process::id();
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_secs(pid).is_some_and(|s| s >= 0.0));
        assert!(rss_kb(pid).is_some_and(|k| k > 0));
    }
}
