//! The map writer alone (issue #12): pinhole installs and removals through
//! the agent's own path (`media::control::MapsSink` over
//! `DatapathMaps::from_ebpf_pinned`, writer lock included) on the maps of a
//! loaded datapath object, with no SIP in front. A steady churn: a window of
//! live relay flows, each step removing the oldest and installing a new one,
//! as calls ending and starting do. Run by the `sip` stage before the agent
//! starts (it needs no namespace: no program is attached).
//!
//! Figures: installs/s sustained (installs over the wall time of the whole
//! churn, removals included), the same per CPU second of the churning
//! thread (user + system: what one core sustains, readable on a shared,
//! loaded machine where wall time counts other processes' turns), and each
//! install's own time p50/p99.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use sip_edge::{
    datapath::{
        loader::{self, MapSizes},
        maps::{DatapathMaps, DatapathSettings},
        rules::{Flow, LearnPort, Proto},
    },
    media::{
        control::{MapsSink, PinholeSink, SinkError},
        manager::PinholeId,
    },
};
use sip_edge_common::{map_names, POLICY_PASS};

use super::{BenchError, Mode};

/// The writer figures.
#[derive(Clone, Debug, Serialize)]
pub struct WriterRate {
    /// Flows kept installed while churning.
    pub live_flows: u32,
    /// Installs made (each a flow: two rules).
    pub installs: u64,
    /// Wall time of the churn, seconds.
    pub seconds: f64,
    /// `installs` / `seconds` (removals included in the time).
    pub installs_per_s: f64,
    /// CPU time of the churning thread (user + system), seconds.
    pub cpu_seconds: f64,
    /// `installs` / `cpu_seconds`: what one core sustains.
    pub installs_per_cpu_s: f64,
    /// One install through `MapsSink::install`, median, µs.
    pub install_p50_us: f64,
    /// Same, 99th percentile, µs.
    pub install_p99_us: f64,
    /// One removal, median, µs.
    pub remove_p50_us: f64,
}

/// Unlinks the private pin directory on drop (also on error paths).
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        for name in map_names::ALL {
            let _ = std::fs::remove_file(self.0.join(name));
        }
        let _ = std::fs::remove_dir(&self.0);
        let _ = std::fs::remove_file(sip_edge::datapath::writer::writer_lock_path(&self.0));
    }
}

const INSIDE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const FIRST_PORT: u16 = 20_000;
const LAST_PORT: u16 = 29_999;

/// The `n`th flow: an even edge port pair out of the media range on both
/// edge addresses, as the agent's relay allocations are.
fn flow(n: u32) -> Flow {
    let span = u32::from(LAST_PORT - FIRST_PORT + 1) / 2;
    let port = FIRST_PORT + 2 * (n % span) as u16;
    Flow::Relay {
        proto: Proto::Udp,
        client: SocketAddr::new(IpAddr::from([10, 77, 0, 2]), 30_000 + (n % 10_000) as u16),
        edge_int: SocketAddr::new(INSIDE.into(), port),
        public: SocketAddr::new(OUTSIDE.into(), port),
        peer: SocketAddr::new(IpAddr::from([198, 51, 100, 2]), 6_000 + (n % 10_000) as u16),
        latch_peer: false,
        learn_port: LearnPort::Neither,
    }
}

fn sink_err(what: &'static str) -> impl FnOnce(SinkError) -> BenchError {
    move |e| BenchError::Map {
        name: what,
        detail: e.to_string(),
    }
}

/// CPU time of the calling thread (user + system), seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn pct_us(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e6
}

/// Churn pinholes through the agent's writer for a fixed time.
pub fn run(mode: Mode) -> Result<WriterRate, BenchError> {
    let (live, seconds) = if mode.quick {
        (200u32, 0.5)
    } else {
        (1000u32, 3.0)
    };
    let pin = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/sip-edge-bench-writer-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&pin.0).map_err(super::io(format!("mkdir {}", pin.0.display())))?;
    let settings = DatapathSettings {
        ifaces: Vec::new(),
        edge_addrs: vec![INSIDE.into(), OUTSIDE.into()],
        media_ports: vec![(FIRST_PORT, LAST_PORT)],
        pass_ports: vec![5061],
        default_policy: POLICY_PASS,
    };
    // The agent's sizes for this media range (`[datapath] max_pinholes`
    // default order of magnitude).
    let mut ebpf = loader::load(
        MapSizes {
            max_pinholes: 65_536,
            dst_slots: settings.dst_slots(),
        },
        Some(&pin.0),
    )?;
    let mut maps = DatapathMaps::from_ebpf_pinned(&mut ebpf, &pin.0)?;
    maps.apply_settings(&settings)?;
    let mut sink = MapsSink::new(Arc::new(Mutex::new(maps)));
    let mut window: VecDeque<PinholeId> = VecDeque::with_capacity(live as usize + 1);
    let mut installs = Vec::new();
    let mut removes = Vec::new();
    let mut n = 0u32;
    let started = Instant::now();
    let cpu_started = thread_cpu_seconds();
    let budget = Duration::from_secs_f64(seconds);
    while started.elapsed() < budget {
        if window.len() >= live as usize {
            if let Some(id) = window.pop_front() {
                let t = Instant::now();
                sink.remove(id).map_err(sink_err("writer bench remove"))?;
                removes.push(t.elapsed());
            }
        }
        let id = PinholeId(u64::from(n) + 1);
        let f = flow(n);
        let t = Instant::now();
        sink.install(id, &f)
            .map_err(sink_err("writer bench install"))?;
        installs.push(t.elapsed());
        window.push_back(id);
        n = n.wrapping_add(1);
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds() - cpu_started;
    for id in window {
        sink.remove(id).map_err(sink_err("writer bench remove"))?;
    }
    drop(sink);
    drop(ebpf);
    installs.sort();
    removes.sort();
    Ok(WriterRate {
        live_flows: live,
        installs: installs.len() as u64,
        seconds: wall,
        installs_per_s: installs.len() as f64 / wall.max(1e-9),
        cpu_seconds: cpu,
        installs_per_cpu_s: if cpu > 0.0 {
            installs.len() as f64 / cpu
        } else {
            0.0
        },
        install_p50_us: pct_us(&installs, 0.50),
        install_p99_us: pct_us(&installs, 0.99),
        remove_p50_us: pct_us(&removes, 0.50),
    })
}
