//! Stage `forward`: real frames through the edge namespace of a
//! client/edge/peer topology (`testnet::Topology`). `sip_edge_gen` runs in
//! the peer namespace under BPF_PROG_TEST_RUN with live frames (XDP_TX out
//! of the peer's veth) and stamps 214-byte RTP-sized UDP frames spread over
//! N flows; `sip_edge_sink` counts what reaches the client's veth. Between
//! them, one forwarder at a time: sip-edge (1/10k/100k pinholes), the bare
//! redirect program (ceiling), kernel forwarding + nftables DNAT, a tokio
//! UDP relay and rtpengine-daemon. Figures: the unpaced rate (generator as
//! fast as it goes, loss reported) and a bounded zero-loss rate search.
//!
//! The generator, the edge's XDP and the sink all run in softirq on the
//! CPU that makes the test-run call, so XDP forwarders are measured as one
//! pipeline; "gen→drop at edge" is that pipeline's own ceiling.
//!
//! That one CPU is shared with whatever else the machine runs, so the
//! wall-clock rate of a burst moves with the share of the CPU the
//! generator's thread got (issue #12: 0.34-1.01 × bare redirect for one
//! pinhole across four runs, 10k pinholes slower than 100k in one). Each
//! XDP and kernel forwarder is therefore also reported per second of that
//! thread's CPU time (the generator plus the softirq work it runs), and
//! the edge program's own run time per packet is taken from the kernel's
//! BPF statistics over a separate burst (statistics cost every program two
//! clock reads per run, so they stay off while rates are measured).

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
    Ebpf, TestRun, TestRunAttrs, TestRunOptions,
};
use serde::Serialize;
use sip_edge_common::{
    addr_from_ip, bench_progs, map_names, BenchCfg, PinholeKey, PinholeRule, Reason,
    BENCH_CNT_SINK, BENCH_HDR_LEN, BENCH_PORTS_LEN, MATCH_DST, POLICY_PASS, PROTO_UDP,
    ROLE_EXTERNAL, ROLE_INTERNAL, RULE_REWRITE_DST, RULE_REWRITE_SRC,
};

use super::{io, progress, BenchError, Mode, NotMeasured};
use crate::testnet::{self, in_ns, sh, Topology};
use sip_edge::datapath::{
    loader::{self, MapSizes},
    maps::{DatapathIface, DatapathMaps, DatapathSettings},
};

/// One rate-search trial: (paced rate asked for, rate achieved, frames lost), rates in packets/s.
type Trial = (f64, f64, u64);

/// Frame size: Ethernet + IPv4 + UDP + RTP (12) + 160 bytes of G.711.
pub const FRAME_LEN: usize = 214;
/// Source port of every generated frame.
const GEN_SPORT: u16 = 30_000;
/// Client port every forwarder delivers to.
const CLIENT_PORT: u16 = 40_000;
/// First pinhole port on the public addresses.
const PORT_BASE: u16 = 10_000;
/// Flows per public address.
const PER_ADDR: u32 = 50_000;
/// Port the userspace relays listen on.
const RELAY_PORT: u16 = 20_000;
/// Live-frame batch size (the kernel default).
const BATCH: u32 = 64;

/// One forwarder's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Forwarder {
    /// Name, e.g. `sip-edge 10k pinholes`.
    pub name: String,
    /// Flows the generator spread frames over.
    pub flows: u32,
    /// Unpaced: frames sent.
    pub sent: u64,
    /// Unpaced: frames the sink counted.
    pub received: u64,
    /// Unpaced: received frames per second of wall time.
    pub rate_pps: f64,
    /// Unpaced: received frames per second of the generator thread's CPU
    /// time. An XDP (or kernel) forwarder runs in softirq on that thread's
    /// CPU, so this is the pipeline's rate per CPU second, whatever share
    /// of the CPU other processes left it; `None` for userspace relays,
    /// whose work runs elsewhere.
    pub cpu_rate_pps: Option<f64>,
    /// Generator thread CPU time over wall time during the unpaced burst.
    pub cpu_share: Option<f64>,
    /// Mean run time of the edge's XDP program per packet in live
    /// forwarding (BPF run-time statistics over a separate burst), ns.
    pub edge_prog_ns: Option<f64>,
    /// Highest paced rate with zero loss found by the search (pps).
    pub zero_loss_pps: f64,
    /// Trials of the search (rate tried, achieved, lost).
    pub trials: Vec<(f64, f64, u64)>,
    /// `rate_pps` over the bare redirect forwarder's.
    pub ratio_vs_redirect: Option<f64>,
    /// `cpu_rate_pps` over the bare redirect forwarder's.
    pub cpu_ratio_vs_redirect: Option<f64>,
    /// Free-form details (peer version, drop counts).
    pub note: String,
}

/// The stage's result.
#[derive(Clone, Debug, Serialize)]
pub struct ForwardStage {
    /// Frame size, bytes.
    pub frame_len: usize,
    /// Every forwarder measured.
    pub forwarders: Vec<Forwarder>,
    /// Junk-drop: frames to un-pinholed media ports dropped per second.
    pub junk_drop_pps: Option<f64>,
    /// Junk-drop per second of the generator thread's CPU time.
    pub junk_drop_cpu_pps: Option<f64>,
    /// Ratios the issue asks for (name, value).
    pub ratios: Vec<(String, f64)>,
    /// TCP throughput, bits/s (path, value): one connection, client → peer.
    pub tcp: Vec<(String, f64)>,
    /// Peer versions (name, version).
    pub versions: Vec<(String, String)>,
    /// Forwarders or figures that could not be measured.
    pub not_measured: Vec<NotMeasured>,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> BenchError {
    move |e| BenchError::Map {
        name,
        detail: e.to_string(),
    }
}

fn prog<'a>(e: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, BenchError> {
    e.program_mut(name)
        .ok_or(BenchError::MissingProgram { name })?
        .try_into()
        .map_err(|source| BenchError::Program { name, source })
}

/// Load `name` from `e` and attach it (driver mode) to `dev` in `ns`.
fn attach(e: &mut Ebpf, name: &'static str, ns: &str, dev: &str) -> Result<(), BenchError> {
    let p = prog(e, name)?;
    if p.fd().is_err() {
        p.load()
            .map_err(|source| BenchError::Program { name, source })?;
    }
    in_ns(ns, || -> Result<(), BenchError> {
        let idx = testnet::ifindex(dev).ok_or(BenchError::Map {
            name: "ifindex",
            detail: format!("{dev} in {ns}"),
        })?;
        p.attach_to_if_index(idx, XdpMode::Driver)
            .map_err(|source| BenchError::Program { name, source })?;
        Ok(())
    })?
}

fn mac(ns: &str, dev: &str) -> Result<[u8; 6], BenchError> {
    let out = sh(&["ip", "-n", ns, "link", "show", "dev", dev])?;
    let s = out
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("");
    let mut m = [0u8; 6];
    for (i, part) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16).map_err(|e| BenchError::Map {
            name: "mac",
            detail: format!("{dev}: {e}"),
        })?;
    }
    Ok(m)
}

/// The header template for frames to `dst:port_base` from the peer.
fn template(src_mac: [u8; 6], dst_mac: [u8; 6], dst: Ipv4Addr) -> [u16; 22] {
    let mut b = [0u8; 44];
    b[0..6].copy_from_slice(&dst_mac);
    b[6..12].copy_from_slice(&src_mac);
    b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (FRAME_LEN - 14) as u16;
    let ip = &mut b[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = PROTO_UDP;
    ip[12..16].copy_from_slice(&testnet::PEER_V4.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = 0;
    for w in ip.chunks(2) {
        sum += u16::from_be_bytes([w[0], w[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let udp = &mut b[34..42];
    udp[0..2].copy_from_slice(&GEN_SPORT.to_be_bytes());
    udp[4..6].copy_from_slice(&((FRAME_LEN - 34) as u16).to_be_bytes());
    // UDP checksum 0 (none): the stamped port changes per flow.
    let mut w = [0u16; 22];
    for (i, c) in b.chunks(2).enumerate() {
        w[i] = u16::from_ne_bytes([c[0], c[1]]);
    }
    w
}

/// The generator side: programs in the peer and client namespaces.
struct Gen {
    obj: Ebpf,
    cfg: Array<MapData, BenchCfg>,
    ports: Array<MapData, u16>,
    cnt: PerCpuArray<MapData, u64>,
    peer_ns: String,
    peer_if: u32,
    frame: Vec<u8>,
    peer_mac: [u8; 6],
    ext_mac: [u8; 6],
    /// Smallest paced burst (frames per test-run call).
    min_burst: u32,
}

impl Gen {
    fn sink_count(&self) -> Result<u64, BenchError> {
        Ok(self
            .cnt
            .get(&BENCH_CNT_SINK, 0)
            .map_err(map_err(map_names::BENCH_CNT))?
            .iter()
            .sum())
    }

    fn configure(&mut self, dst: Ipv4Addr, flows: u32, port_base: u16) -> Result<(), BenchError> {
        let c = BenchCfg {
            hdr: template(self.peer_mac, self.ext_mac, dst),
            flows,
            per_addr: PER_ADDR,
            port_base,
            ..BenchCfg::default()
        };
        self.cfg.set(0, c, 0).map_err(map_err(map_names::BENCH_CFG))
    }

    /// Frames to `dst`, flow `f` to `ports[f]` (round robin): peers that
    /// choose their own ports (rtpengine).
    fn configure_ports(&mut self, dst: Ipv4Addr, ports: &[u16]) -> Result<(), BenchError> {
        if ports.is_empty() || ports.len() > BENCH_PORTS_LEN as usize {
            return Err(BenchError::Map {
                name: map_names::BENCH_PORTS,
                detail: format!("{} ports (1..={BENCH_PORTS_LEN})", ports.len()),
            });
        }
        for (i, p) in ports.iter().enumerate() {
            self.ports
                .set(i as u32, *p, 0)
                .map_err(map_err(map_names::BENCH_PORTS))?;
        }
        let c = BenchCfg {
            hdr: template(self.peer_mac, self.ext_mac, dst),
            flows: ports.len() as u32,
            per_addr: PER_ADDR,
            port_table: 1,
            ..BenchCfg::default()
        };
        self.cfg.set(0, c, 0).map_err(map_err(map_names::BENCH_CFG))
    }

    /// Run `f` in the peer namespace with the generator and its ctx: the
    /// kernel resolves the ctx's ingress ifindex in the caller's namespace.
    fn in_peer<T: Send>(
        &self,
        f: impl FnOnce(&dyn Fn(u32) -> Result<Duration, BenchError>) -> Result<T, BenchError> + Send,
    ) -> Result<T, BenchError> {
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(self.frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.peer_if.to_ne_bytes());
        let frame = &self.frame;
        let p: &Xdp = self
            .obj
            .program(bench_progs::GEN)
            .ok_or(BenchError::MissingProgram {
                name: bench_progs::GEN,
            })?
            .try_into()
            .map_err(|source| BenchError::Program {
                name: bench_progs::GEN,
                source,
            })?;
        in_ns(&self.peer_ns, || {
            let send = |n: u32| -> Result<Duration, BenchError> {
                let t = Instant::now();
                p.test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    repeat: n,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH.min(n)),
                    ..TestRunOptions::new()
                })
                .map_err(|source| BenchError::Program {
                    name: bench_progs::GEN,
                    source,
                })?;
                Ok(t.elapsed())
            };
            f(&send)
        })?
    }

    /// Send `n` frames as fast as the pipeline goes; the wall time.
    fn send(&mut self, n: u32) -> Result<Duration, BenchError> {
        self.send_cpu(n).map(|(wall, _)| wall)
    }

    /// As `send`, plus the CPU time the sending thread used meanwhile
    /// (the generator, and the softirq work it triggers on its CPU).
    fn send_cpu(&mut self, n: u32) -> Result<(Duration, Duration), BenchError> {
        self.in_peer(|send| {
            let c = thread_cpu();
            let wall = send(n)?;
            Ok((wall, thread_cpu().saturating_sub(c)))
        })
    }

    /// Unpaced burst of `n`: (sent, received, rate, rate per CPU second,
    /// CPU share).
    fn unpaced(&mut self, n: u32) -> Result<(u64, u64, f64, f64, f64), BenchError> {
        let before = self.sink_count()?;
        let (wall, cpu) = self.send_cpu(n)?;
        std::thread::sleep(Duration::from_millis(100));
        let got = self.sink_count()?.wrapping_sub(before);
        Ok((
            n as u64,
            got,
            got as f64 / wall.as_secs_f64(),
            got as f64 / cpu.as_secs_f64().max(1e-9),
            cpu.as_secs_f64() / wall.as_secs_f64(),
        ))
    }

    /// The edge program's mean run time per packet over a burst of `n`,
    /// from BPF run-time statistics, enabled for this burst only (they
    /// cost every program two clock reads per run). `None` when the kernel
    /// refuses them.
    fn profile(&mut self, edge_prog: &Xdp, n: u32) -> Option<f64> {
        let stats = |p: &Xdp| p.info().ok().map(|i| (i.run_time(), i.run_count()));
        let _on = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok()?;
        let (t0, c0) = stats(edge_prog)?;
        self.send(n).ok()?;
        let (t1, c1) = stats(edge_prog)?;
        let runs = c1.checked_sub(c0).filter(|r| *r > 0)?;
        Some(t1.saturating_sub(t0).as_nanos() as f64 / runs as f64)
    }

    /// One paced trial at `rate` (> 0) for `dur`: bursts every 0.5 ms
    /// (at least one live-frame batch). Returns (achieved rate, lost).
    fn paced(&mut self, rate: f64, dur: Duration) -> Result<(f64, u64), BenchError> {
        // XDP and kernel paths: bursts of 0.5 ms (at least one batch);
        // userspace relays: always `min_burst`, below rtpengine's queue guard.
        let burst = if self.min_burst < BATCH {
            self.min_burst
        } else {
            ((rate / 2000.0) as u32).max(BATCH)
        };
        let interval = Duration::from_secs_f64(burst as f64 / rate);
        let before = self.sink_count()?;
        let (sent, elapsed) = self.in_peer(|send| {
            let start = Instant::now();
            let mut next = start;
            let mut sent = 0u64;
            while start.elapsed() < dur {
                send(burst)?;
                sent += burst as u64;
                next += interval;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
            Ok((sent, start.elapsed()))
        })?;
        let achieved = sent as f64 / elapsed.as_secs_f64();
        std::thread::sleep(Duration::from_millis(100));
        let got = self.sink_count()?.wrapping_sub(before);
        Ok((achieved, sent.saturating_sub(got)))
    }

    /// Unpaced figure plus a bounded zero-loss search below it.
    fn measure(
        &mut self,
        name: &str,
        flows: u32,
        mode: Mode,
        start: Instant,
    ) -> Result<Forwarder, BenchError> {
        self.measure_with(name, flows, mode, start, None)
    }

    /// `relay_ceiling`: a userspace relay, searched below this rate with
    /// bursts smaller than rtpengine's 50-packet receive-queue guard
    /// (which starts discarding after five overruns), before the unpaced
    /// burst that would trip it.
    fn measure_with(
        &mut self,
        name: &str,
        flows: u32,
        mode: Mode,
        start: Instant,
        relay_ceiling: Option<f64>,
    ) -> Result<Forwarder, BenchError> {
        let (n, iters, dur) = if mode.quick {
            (200_000, 2, Duration::from_millis(150))
        } else {
            (2_000_000, 7, Duration::from_millis(400))
        };
        self.min_burst = if relay_ceiling.is_some() { 16 } else { BATCH };
        let pre = match relay_ceiling {
            Some(c) => Some(self.ascend(name, c, iters + 4, dur, start)?),
            None => None,
        };
        let (sent, received, rate, cpu_rate, share) = self.unpaced(n)?;
        progress(
            start,
            &format!(
                "forward: {name}: unpaced {:.3} Mpps ({received}/{sent} delivered), {:.3} Mpps per generator CPU second (CPU share {share:.2})",
                rate / 1e6,
                cpu_rate / 1e6
            ),
        );
        // Userspace relays work outside the generator's thread.
        let (cpu_rate, share) = match relay_ceiling {
            None => (Some(cpu_rate), Some(share)),
            Some(_) => (None, None),
        };
        let (best, trials) = match pre {
            Some(p) => p,
            None => self.search(name, rate * 1.2, iters, dur, start)?,
        };
        Ok(Forwarder {
            name: name.into(),
            flows,
            sent,
            received,
            rate_pps: rate,
            cpu_rate_pps: cpu_rate,
            cpu_share: share,
            edge_prog_ns: None,
            zero_loss_pps: best,
            trials,
            ratio_vs_redirect: None,
            cpu_ratio_vs_redirect: None,
            note: String::new(),
        })
    }

    /// Ascending search for userspace relays: from 5 kpps up by 1.5× until
    /// the first loss (or `ceiling`); rtpengine stays in its discarding
    /// state after a lossy overrun, so no trial may follow a lossy one.
    /// Resolution 1.5×. Returns (best zero-loss rate, trials).
    fn ascend(
        &mut self,
        name: &str,
        ceiling: f64,
        iters: u32,
        dur: Duration,
        start: Instant,
    ) -> Result<(f64, Vec<Trial>), BenchError> {
        let (mut rate, mut best, mut trials) = (5_000.0f64, 0.0f64, Vec::new());
        for _ in 0..iters {
            let (achieved, lost) = self.paced(rate, dur)?;
            progress(
                start,
                &format!(
                    "forward: {name}: paced {:.3} Mpps → achieved {:.3}, lost {lost}",
                    rate / 1e6,
                    achieved / 1e6
                ),
            );
            trials.push((rate, achieved, lost));
            if lost > 0 || achieved < rate * 0.9 {
                break;
            }
            best = achieved;
            rate *= 1.5;
            if rate > ceiling {
                break;
            }
        }
        Ok((best, trials))
    }

    /// Zero-loss search below `ceiling`: (best zero-loss rate, trials).
    fn search(
        &mut self,
        name: &str,
        ceiling: f64,
        iters: u32,
        dur: Duration,
        start: Instant,
    ) -> Result<(f64, Vec<Trial>), BenchError> {
        // Bisection between 0 and `ceiling` (a little above the unpaced
        // rate): a zero-loss trial raises the floor, a lossy one lowers the
        // ceiling; a trial the sender cannot pace up to ends the search.
        let (mut floor, mut ceil, mut best) = (0.0f64, ceiling, 0.0f64);
        let mut trials = Vec::new();
        for _ in 0..if ceiling > 0.0 { iters } else { 0 } {
            let mid = (floor + ceil) / 2.0;
            let (achieved, lost) = self.paced(mid, dur)?;
            progress(
                start,
                &format!(
                    "forward: {name}: paced {:.3} Mpps → achieved {:.3}, lost {lost}",
                    mid / 1e6,
                    achieved / 1e6
                ),
            );
            trials.push((mid, achieved, lost));
            if lost == 0 {
                best = best.max(achieved);
                floor = mid;
                if achieved < mid * 0.9 {
                    break;
                }
            } else {
                ceil = mid;
            }
        }
        Ok((best, trials))
    }
}

/// A process started by the bench, killed and reaped on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Frames of the profiling burst (`Gen::profile`).
fn profile_n(mode: Mode) -> u32 {
    if mode.quick {
        100_000
    } else {
        500_000
    }
}

/// This thread's CPU time (CLOCK_THREAD_CPUTIME_ID).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer; this clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Run the stage.
pub fn run(mode: Mode, start: Instant) -> Result<ForwardStage, BenchError> {
    progress(start, "forward: creating the client/edge/peer topology");
    // Per process, as the other stages: two benches never share a topology.
    let topo = Topology::create(&format!("bn{}", std::process::id() % 10_000))?;
    let (cl, edge, peer) = (topo.client.clone(), topo.edge.clone(), topo.peer.clone());
    let client_mac = mac(&cl, "eth0")?;
    // Static next hops: no ARP in the measured path, for every forwarder.
    let cm = client_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    sh(&[
        "ip",
        "-n",
        &edge,
        "neigh",
        "replace",
        "10.77.0.2",
        "lladdr",
        &cm,
        "nud",
        "permanent",
        "dev",
        "int0",
    ])?;
    for a in 2..=3 {
        sh(&[
            "ip",
            "-n",
            &edge,
            "addr",
            "add",
            &format!("203.0.113.{a}/32"),
            "dev",
            "ext0",
        ])?;
    }
    let mut obj = crate::harness::load()?;
    let cfg = Array::try_from(obj.take_map(map_names::BENCH_CFG).ok_or(BenchError::Map {
        name: map_names::BENCH_CFG,
        detail: "missing".into(),
    })?)
    .map_err(map_err(map_names::BENCH_CFG))?;
    let cnt = PerCpuArray::try_from(obj.take_map(map_names::BENCH_CNT).ok_or(BenchError::Map {
        name: map_names::BENCH_CNT,
        detail: "missing".into(),
    })?)
    .map_err(map_err(map_names::BENCH_CNT))?;
    let ports = Array::try_from(
        obj.take_map(map_names::BENCH_PORTS)
            .ok_or(BenchError::Map {
                name: map_names::BENCH_PORTS,
                detail: "missing".into(),
            })?,
    )
    .map_err(map_err(map_names::BENCH_PORTS))?;
    attach(&mut obj, bench_progs::SINK, &cl, "eth0")?;
    // The generator is attached (driver mode) to an idle, down veth in the
    // peer namespace only so the XDP dispatcher holds it: a test run then
    // skips the two RCU grace periods (~70 ms) it would wait for per call.
    sh(&[
        "ip", "-n", &peer, "link", "add", "gd0", "type", "veth", "peer", "name", "gd1",
    ])?;
    attach(&mut obj, bench_progs::GEN, &peer, "gd0")?;
    let peer_if = in_ns(&peer, || testnet::ifindex("eth0"))?.ok_or(BenchError::Map {
        name: "ifindex",
        detail: "peer eth0".into(),
    })?;
    let mut payload = vec![0u8; FRAME_LEN];
    // RTP version 2, PT 0 (PCMU): relays that peek at RTP see RTP.
    payload[BENCH_HDR_LEN] = 0x80;
    let mut g = Gen {
        obj,
        cfg,
        ports,
        cnt,
        peer_ns: peer.clone(),
        peer_if,
        frame: payload,
        peer_mac: mac(&peer, "eth0")?,
        ext_mac: mac(&edge, "ext0")?,
        min_burst: BATCH,
    };
    let int_if = in_ns(&edge, || testnet::ifindex("int0"))?.ok_or(BenchError::Map {
        name: "ifindex",
        detail: "int0".into(),
    })?;
    let ext_if = in_ns(&edge, || testnet::ifindex("ext0"))?.ok_or(BenchError::Map {
        name: "ifindex",
        detail: "ext0".into(),
    })?;
    let pub1 = testnet::EDGE_PUB_V4;
    let mut out = ForwardStage {
        frame_len: FRAME_LEN,
        forwarders: vec![],
        junk_drop_pps: None,
        junk_drop_cpu_pps: None,
        tcp: vec![],
        ratios: vec![],
        versions: vec![],
        not_measured: vec![],
    };

    // 1. The method's own ceiling: generator → XDP drop at the edge.
    {
        let mut e = crate::harness::load()?;
        attach(&mut e, bench_progs::SINK, &edge, "ext0")?;
        let ecnt: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(e.take_map(map_names::BENCH_CNT).ok_or(BenchError::Map {
                name: map_names::BENCH_CNT,
                detail: "missing".into(),
            })?)
            .map_err(map_err(map_names::BENCH_CNT))?;
        g.configure(pub1, 1, PORT_BASE)?;
        let n = if mode.quick { 200_000 } else { 2_000_000 };
        let before: u64 = ecnt
            .get(&BENCH_CNT_SINK, 0)
            .map_err(map_err(map_names::BENCH_CNT))?
            .iter()
            .sum();
        let (wall, cpu) = g.send_cpu(n)?;
        let got: u64 = ecnt
            .get(&BENCH_CNT_SINK, 0)
            .map_err(map_err(map_names::BENCH_CNT))?
            .iter()
            .sum::<u64>()
            - before;
        let rate = got as f64 / wall.as_secs_f64();
        progress(
            start,
            &format!("forward: generator → drop at edge: {:.3} Mpps", rate / 1e6),
        );
        out.forwarders.push(Forwarder {
            name: "gen→drop at edge (method ceiling)".into(),
            flows: 1,
            sent: n as u64,
            received: got,
            rate_pps: rate,
            cpu_rate_pps: Some(got as f64 / cpu.as_secs_f64().max(1e-9)),
            cpu_share: Some(cpu.as_secs_f64() / wall.as_secs_f64()),
            edge_prog_ns: None,
            zero_loss_pps: rate,
            trials: vec![],
            ratio_vs_redirect: None,
            cpu_ratio_vs_redirect: None,
            note: "frames counted and dropped by XDP on the edge's ingress".into(),
        });
    }
    // 2. Bare redirect forwarder (ceiling).
    {
        let mut e = crate::harness::load()?;
        let mut c: Array<MapData, BenchCfg> =
            Array::try_from(e.take_map(map_names::BENCH_CFG).ok_or(BenchError::Map {
                name: map_names::BENCH_CFG,
                detail: "missing".into(),
            })?)
            .map_err(map_err(map_names::BENCH_CFG))?;
        c.set(
            0,
            BenchCfg {
                redirect_ifindex: int_if,
                ..BenchCfg::default()
            },
            0,
        )
        .map_err(map_err(map_names::BENCH_CFG))?;
        attach(&mut e, bench_progs::REDIRECT, &edge, "ext0")?;
        g.configure(pub1, 1, PORT_BASE)?;
        let mut f = g.measure("bare redirect (XDP ceiling)", 1, mode, start)?;
        f.edge_prog_ns = g.profile(prog(&mut e, bench_progs::REDIRECT)?, profile_n(mode));
        out.forwarders.push(f);
    }
    // 3. sip-edge with 1 / 10k / 100k pinholes, then junk drop.
    {
        let sizes: Vec<u32> = if mode.quick {
            vec![1, 10_000]
        } else {
            vec![1, 10_000, 100_000]
        };
        let mut dp = in_ns(&edge, || {
            loader::load(
                MapSizes {
                    max_pinholes: 131_072,
                    // The media window on the four edge addresses below.
                    dst_slots: 4 * (65_000 - PORT_BASE as u32 + 1),
                },
                None,
            )
        })??;
        let mut maps = DatapathMaps::from_ebpf(&mut dp)?;
        // In the edge namespace: TX_PORTS resolves ifindexes in the caller's.
        let settings = DatapathSettings {
            ifaces: vec![
                DatapathIface {
                    ifindex: int_if,
                    role: ROLE_INTERNAL,
                },
                DatapathIface {
                    ifindex: ext_if,
                    role: ROLE_EXTERNAL,
                },
            ],
            edge_addrs: vec![
                testnet::EDGE_INT_V4.into(),
                pub1.into(),
                Ipv4Addr::new(203, 0, 113, 2).into(),
                Ipv4Addr::new(203, 0, 113, 3).into(),
            ],
            media_ports: vec![(PORT_BASE, 65_000)],
            pass_ports: vec![5061],
            default_policy: POLICY_PASS,
        };
        in_ns(&edge, || maps.apply_settings(&settings))??;
        let name = sip_edge_common::XDP_PROG_NAME;
        for dev in ["ext0", "int0"] {
            in_ns(&edge, || -> Result<(), BenchError> {
                let idx = testnet::ifindex(dev).ok_or(BenchError::Map {
                    name: "ifindex",
                    detail: dev.into(),
                })?;
                prog(&mut dp, name)?
                    .attach_to_if_index(idx, XdpMode::Driver)
                    .map_err(|source| BenchError::Program { name, source })?;
                Ok(())
            })??;
        }
        let (_, peer_addr) = addr_from_ip(testnet::PEER_V4.into());
        let mut installed = 0u32;
        for &size in &sizes {
            progress(
                start,
                &format!("forward: sip-edge: installing {size} pinholes"),
            );
            while installed < size {
                let i = installed;
                let pub_ip = Ipv4Addr::from(u32::from(pub1) + i / PER_ADDR);
                let port = PORT_BASE + (i % PER_ADDR) as u16;
                let (family, addr) = addr_from_ip(pub_ip.into());
                let key = PinholeKey {
                    addr,
                    port: port.to_be(),
                    proto: PROTO_UDP,
                    family,
                    role: ROLE_EXTERNAL,
                    match_on: MATCH_DST,
                    _pad: [0; 2],
                };
                let rule = PinholeRule {
                    remote_addr: peer_addr,
                    new_src: addr_from_ip(testnet::EDGE_INT_V4.into()).1,
                    new_dst: addr_from_ip(testnet::CLIENT_V4.into()).1,
                    remote_port: GEN_SPORT.to_be(),
                    new_src_port: port.to_be(),
                    new_dst_port: CLIENT_PORT.to_be(),
                    flags: RULE_REWRITE_SRC | RULE_REWRITE_DST,
                    slot: i,
                    pair_slot: i,
                };
                maps.insert_rule(key, rule)?;
                installed += 1;
            }
            g.configure(pub1, size, PORT_BASE)?;
            let label = match size {
                1 => "sip-edge 1 pinhole".to_string(),
                s => format!("sip-edge {}k pinholes", s / 1000),
            };
            let mut f = g.measure(&label, size, mode, start)?;
            f.edge_prog_ns = g.profile(prog(&mut dp, name)?, profile_n(mode));
            out.forwarders.push(f);
        }
        // Junk: media ports above every pinhole, spread over 1000 ports.
        let before = reason_count(&maps, Reason::DropNoPinhole)?;
        g.configure(pub1, 1000, 64_000)?;
        let n = if mode.quick { 200_000 } else { 2_000_000 };
        let (wall, cpu) = g.send_cpu(n)?;
        let dropped = reason_count(&maps, Reason::DropNoPinhole)? - before;
        let rate = dropped as f64 / wall.as_secs_f64();
        out.junk_drop_cpu_pps = Some(dropped as f64 / cpu.as_secs_f64().max(1e-9));
        progress(
            start,
            &format!(
                "forward: junk drop: {:.3} Mpps ({dropped}/{n} counted drop_no_pinhole)",
                rate / 1e6
            ),
        );
        out.junk_drop_pps = Some(rate);
        // TCP through a relay pinhole (XDP on both edge links).
        let peer_mac = g
            .peer_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        sh(&[
            "ip",
            "-n",
            &edge,
            "neigh",
            "replace",
            "198.51.100.2",
            "lladdr",
            &peer_mac,
            "nud",
            "permanent",
            "dev",
            "ext0",
        ])?;
        let mut peer_pass = crate::harness::load()?;
        attach(&mut peer_pass, crate::harness::PASS_PROG, &peer, "eth0")?;
        let client = SocketAddr::new(testnet::CLIENT_V4.into(), 45_000);
        let edge_port = 62_000;
        let flow = sip_edge::datapath::rules::Flow::Relay {
            proto: sip_edge::datapath::rules::Proto::Tcp,
            client,
            edge_int: SocketAddr::new(testnet::EDGE_INT_V4.into(), edge_port),
            public: SocketAddr::new(pub1.into(), edge_port),
            peer: SocketAddr::new(testnet::PEER_V4.into(), 9_000),
            latch_peer: false,
            learn_port: sip_edge::datapath::rules::LearnPort::Neither,
        };
        maps.add_flow(&flow)?;
        let dur = if mode.quick {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(2)
        };
        match tcp_throughput(
            &topo,
            client,
            SocketAddr::new(testnet::EDGE_INT_V4.into(), edge_port),
            SocketAddr::new(testnet::PEER_V4.into(), 9_000),
            dur,
        ) {
            Ok(bps) => {
                progress(
                    start,
                    &format!(
                        "forward: TCP through a sip-edge pinhole: {:.0} Mbit/s",
                        bps / 1e6
                    ),
                );
                out.tcp.push(("sip-edge TCP pinhole (relay)".into(), bps));
            }
            Err(e) => out.not_measured.push(NotMeasured {
                what: "TCP through a sip-edge pinhole".into(),
                reason: e.to_string(),
            }),
        }
        drop(peer_pass);
    }
    // TCP through plain kernel forwarding (no XDP on the edge).
    {
        let _ = sh(&[
            "ip",
            "-n",
            &peer,
            "route",
            "add",
            "10.77.0.0/24",
            "via",
            "203.0.113.1",
        ]);
        let mut peer_pass = crate::harness::load()?;
        attach(&mut peer_pass, crate::harness::PASS_PROG, &peer, "eth0")?;
        let dur = if mode.quick {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(2)
        };
        let to = SocketAddr::new(testnet::PEER_V4.into(), 9_001);
        match tcp_throughput(
            &topo,
            SocketAddr::new(testnet::CLIENT_V4.into(), 45_001),
            to,
            to,
            dur,
        ) {
            Ok(bps) => {
                progress(
                    start,
                    &format!(
                        "forward: TCP through kernel forwarding: {:.0} Mbit/s",
                        bps / 1e6
                    ),
                );
                out.tcp.push(("kernel forwarding".into(), bps));
            }
            Err(e) => out.not_measured.push(NotMeasured {
                what: "TCP through kernel forwarding".into(),
                reason: e.to_string(),
            }),
        }
    }
    // 4. Kernel forwarding + nftables DNAT + conntrack.
    match nft(&mut g, &edge, mode, start) {
        Ok((f, v)) => {
            out.forwarders.push(f);
            out.versions.push(("nftables".into(), v));
        }
        Err(e) => out.not_measured.push(NotMeasured {
            what: "kernel forwarding + nftables DNAT".into(),
            reason: e.to_string(),
        }),
    }
    // 4b. The same with a flowtable (software fast path), what an admin
    // tunes nftables forwarding with.
    match nft_flowtable(&mut g, &edge, &topo, mode, start) {
        Ok(f) => out.forwarders.push(f),
        Err(e) => out.not_measured.push(NotMeasured {
            what: "kernel forwarding + nftables DNAT + flowtable".into(),
            reason: e.to_string(),
        }),
    }
    // 5. Userspace relays.
    match tokio_relay(&mut g, &edge, mode, start) {
        Ok(f) => out.forwarders.push(f),
        Err(e) => out.not_measured.push(NotMeasured {
            what: "tokio UDP relay".into(),
            reason: e.to_string(),
        }),
    }
    match rtpengine(&mut g, &edge, mode, start) {
        Ok((f, missing, v)) => {
            out.forwarders.extend(f);
            out.not_measured.extend(missing);
            out.versions.push(("rtpengine-daemon".into(), v));
        }
        Err(e) => out.not_measured.push(NotMeasured {
            what: "rtpengine-daemon".into(),
            reason: e.to_string(),
        }),
    }
    // Ratios.
    let redirect = out
        .forwarders
        .iter()
        .find(|f| f.name.starts_with("bare redirect"))
        .map(|f| f.rate_pps);
    if let Some(r) = redirect {
        for f in &mut out.forwarders {
            f.ratio_vs_redirect = Some(f.rate_pps / r);
        }
    }
    let redirect_cpu = out
        .forwarders
        .iter()
        .find(|f| f.name.starts_with("bare redirect"))
        .and_then(|f| f.cpu_rate_pps);
    if let Some(r) = redirect_cpu {
        for f in &mut out.forwarders {
            f.cpu_ratio_vs_redirect = f.cpu_rate_pps.map(|c| c / r);
        }
    }
    let fw = out.forwarders.clone();
    let rate = |n: &str| {
        fw.iter()
            .find(|f| f.name.starts_with(n))
            .map(|f| f.rate_pps)
    };
    let cpu_rate = |n: &str| {
        fw.iter()
            .find(|f| f.name.starts_with(n))
            .and_then(|f| f.cpu_rate_pps)
    };
    let prog_ns = |n: &str| {
        fw.iter()
            .find(|f| f.name.starts_with(n))
            .and_then(|f| f.edge_prog_ns)
    };
    let zl = |n: &str| {
        fw.iter()
            .find(|f| f.name.starts_with(n))
            .map(|f| f.zero_loss_pps)
    };
    // A peer measured in several set-ups is compared at its best.
    let best_zl = |n: &str| {
        fw.iter()
            .filter(|f| f.name.starts_with(n))
            .map(|f| f.zero_loss_pps)
            .reduce(f64::max)
    };
    let best_rate = |n: &str| {
        fw.iter()
            .filter(|f| f.name.starts_with(n))
            .map(|f| f.rate_pps)
            .reduce(f64::max)
    };
    let mut ratio = |name: &str, a: Option<f64>, b: Option<f64>| {
        if let (Some(a), Some(b)) = (a, b) {
            if b > 0.0 {
                out.ratios.push((name.into(), a / b));
            }
        }
    };
    ratio(
        "sip-edge 1 pinhole / bare redirect (target >= 0.85)",
        rate("sip-edge 1 pinhole"),
        rate("bare redirect"),
    );
    ratio(
        "sip-edge 100k / bare redirect (target >= 0.6)",
        rate("sip-edge 100k"),
        rate("bare redirect"),
    );
    ratio(
        "per generator CPU second: sip-edge 1 pinhole / bare redirect",
        cpu_rate("sip-edge 1 pinhole"),
        cpu_rate("bare redirect"),
    );
    ratio(
        "per generator CPU second: sip-edge 100k / bare redirect",
        cpu_rate("sip-edge 100k"),
        cpu_rate("bare redirect"),
    );
    ratio(
        "junk drop / sip-edge 1 pinhole forward (target >= 1.3)",
        out.junk_drop_pps,
        rate("sip-edge 1 pinhole"),
    );
    ratio(
        "per generator CPU second: junk drop / sip-edge 1 pinhole forward",
        out.junk_drop_cpu_pps,
        cpu_rate("sip-edge 1 pinhole"),
    );
    ratio(
        "sip-edge 1 pinhole / nftables DNAT at its best (target >= 3)",
        rate("sip-edge 1 pinhole"),
        best_rate("kernel forwarding"),
    );
    // Userspace relays only by zero-loss rate: an unpaced burst overruns
    // their socket queues (rtpengine then discards the stream), so their
    // unpaced figure says nothing about their capacity.
    ratio(
        "zero-loss: sip-edge 100k / bare redirect",
        zl("sip-edge 100k"),
        zl("bare redirect"),
    );
    ratio(
        "zero-loss: sip-edge 1 pinhole / tokio relay",
        zl("sip-edge 1 pinhole"),
        zl("tokio"),
    );
    ratio(
        "zero-loss: sip-edge 1 pinhole / bare redirect",
        zl("sip-edge 1 pinhole"),
        zl("bare redirect"),
    );
    let tcp = |n: &str| out.tcp.iter().find(|t| t.0.starts_with(n)).map(|t| t.1);
    let (ta, tb) = (tcp("sip-edge"), tcp("kernel"));
    ratio(
        "zero-loss: sip-edge 1 pinhole / nftables DNAT at its best",
        zl("sip-edge 1 pinhole"),
        best_zl("kernel forwarding"),
    );
    ratio(
        "zero-loss: sip-edge 1 pinhole / rtpengine at its best (target >= 20)",
        zl("sip-edge 1 pinhole"),
        best_zl("rtpengine"),
    );
    ratio(
        "zero-loss: sip-edge 1 pinhole / rtpengine, 1 stream (its worst case)",
        zl("sip-edge 1 pinhole"),
        zl("rtpengine-daemon (userspace), 1 streams"),
    );
    if let (Some(a), Some(b)) = (ta, tb) {
        out.ratios.push((
            "TCP throughput: sip-edge pinhole / kernel forwarding".into(),
            a / b,
        ));
    }
    if let (Some(a), Some(b)) = (prog_ns("sip-edge 1 pinhole"), prog_ns("bare redirect")) {
        out.ratios.push((
            "live edge program ns/packet: sip-edge 1 pinhole minus bare redirect (BPF stats)"
                .into(),
            a - b,
        ));
    }
    drop(g);
    drop(topo);
    Ok(out)
}

/// One TCP connection from the client (bound to `local`) to `to`, with the
/// peer listening on `listen`; the client writes for `dur`. Bits per second
/// the peer read.
fn tcp_throughput(
    topo: &Topology,
    local: SocketAddr,
    to: SocketAddr,
    listen: SocketAddr,
    dur: Duration,
) -> Result<f64, BenchError> {
    use std::io::{Read as _, Write as _};
    let l = topo.tcp_listen(&topo.peer, listen)?;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, Duration)> {
        let (mut c, _) = l.accept()?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let (mut buf, mut total) = (vec![0u8; 1 << 16], 0u64);
        let t = Instant::now();
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) => return Err(e),
            }
        }
        Ok((total, t.elapsed()))
    });
    let mut c = topo.tcp_connect(&topo.client, local, to)?;
    let buf = vec![0x5au8; 1 << 16];
    let t = Instant::now();
    while t.elapsed() < dur {
        c.write_all(&buf).map_err(io("tcp write"))?;
    }
    c.shutdown(std::net::Shutdown::Write)
        .map_err(io("tcp shutdown"))?;
    let (total, took) = reader
        .join()
        .map_err(|_| BenchError::Map {
            name: "tcp",
            detail: "reader panicked".into(),
        })?
        .map_err(io("tcp read"))?;
    Ok(total as f64 * 8.0 / took.as_secs_f64())
}

fn reason_count(maps: &DatapathMaps, r: Reason) -> Result<u64, BenchError> {
    Ok(maps
        .reasons()?
        .iter()
        .find(|c| c.reason == r.name())
        .map_or(0, |c| c.packets))
}

/// The pass program on ext0: a veth delivers XDP_TX'd frames only while its
/// peer end runs XDP (it needs the receive NAPI).
fn pass_on_ext(edge: &str) -> Result<Ebpf, BenchError> {
    let mut e = crate::harness::load()?;
    attach(&mut e, crate::harness::PASS_PROG, edge, "ext0")?;
    Ok(e)
}

fn nft(
    g: &mut Gen,
    edge: &str,
    mode: Mode,
    start: Instant,
) -> Result<(Forwarder, String), BenchError> {
    let v = Command::new("nft")
        .arg("--version")
        .output()
        .map_err(io("nft --version (apt package nftables)"))?;
    let version = String::from_utf8_lossy(&v.stdout).trim().to_owned();
    let _pass = pass_on_ext(edge)?;
    let rules = format!(
        "table ip sebench {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  udp dport {PORT_BASE}-65000 dnat to 10.77.0.2:{CLIENT_PORT}\n }}\n}}"
    );
    // Block syntax is file syntax: `nft -f`.
    let file = std::env::temp_dir().join(format!("sip-edge-bench-{}.nft", std::process::id()));
    std::fs::write(&file, format!("{rules}\n")).map_err(io(format!("write {}", file.display())))?;
    let loaded = sh(&[
        "ip",
        "netns",
        "exec",
        edge,
        "nft",
        "-f",
        &file.display().to_string(),
    ]);
    let _ = std::fs::remove_file(&file);
    loaded?;
    g.configure(testnet::EDGE_PUB_V4, 1, PORT_BASE)?;
    let mut f = g.measure(
        "kernel forwarding + nftables DNAT/conntrack",
        1,
        mode,
        start,
    );
    let _ = sh(&[
        "ip", "netns", "exec", edge, "nft", "delete", "table", "ip", "sebench",
    ]);
    if let Ok(f) = &mut f {
        f.note = version.clone();
    }
    Ok((f?, version))
}

/// nftables DNAT with a flowtable (`flow add @ft`, software offload): a
/// flow's packets skip the forward path once conntrack saw it both ways, so
/// one datagram from the client answers the generator's flow first.
fn nft_flowtable(
    g: &mut Gen,
    edge: &str,
    topo: &Topology,
    mode: Mode,
    start: Instant,
) -> Result<Forwarder, BenchError> {
    let _pass = pass_on_ext(edge)?;
    let rules = format!(
        "table ip sebenchft {{\n flowtable ft {{\n  hook ingress priority 0; devices = {{ ext0, int0 }};\n }}\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  udp dport {PORT_BASE}-65000 dnat to 10.77.0.2:{CLIENT_PORT}\n }}\n chain fw {{\n  type filter hook forward priority filter; policy accept;\n  ip protocol udp flow add @ft\n }}\n}}"
    );
    let file = std::env::temp_dir().join(format!("sip-edge-bench-ft-{}.nft", std::process::id()));
    std::fs::write(&file, format!("{rules}\n")).map_err(io(format!("write {}", file.display())))?;
    let loaded = sh(&[
        "ip",
        "netns",
        "exec",
        edge,
        "nft",
        "-f",
        &file.display().to_string(),
    ]);
    let _ = std::fs::remove_file(&file);
    if let Err(e) = loaded {
        return Err(BenchError::Map {
            name: "nftables flowtable",
            detail: format!("{e} (flowtables need a kernel built with CONFIG_NF_FLOW_TABLE)"),
        });
    }
    let measured = (|| {
        // The generator's flow once from a socket, then the client's reply:
        // conntrack now has the flow established, the next packet offloads it.
        let peer_src = SocketAddr::new(testnet::PEER_V4.into(), GEN_SPORT);
        let to_edge = SocketAddr::new(testnet::EDGE_PUB_V4.into(), PORT_BASE);
        let client = SocketAddr::new(testnet::CLIENT_V4.into(), CLIENT_PORT);
        let p = in_ns(&topo.peer, || UdpSocket::bind(peer_src))?.map_err(io("bind peer"))?;
        let c = in_ns(&topo.client, || UdpSocket::bind(client))?.map_err(io("bind client"))?;
        p.send_to(b"prime", to_edge).map_err(io("prime send"))?;
        std::thread::sleep(Duration::from_millis(50));
        c.send_to(b"reply", peer_src).map_err(io("reply send"))?;
        std::thread::sleep(Duration::from_millis(50));
        drop((p, c));
        g.configure(testnet::EDGE_PUB_V4, 1, PORT_BASE)?;
        let mut f = g.measure(
            "kernel forwarding + nftables DNAT + flowtable",
            1,
            mode,
            start,
        )?;
        let ct =
            in_ns(edge, || std::fs::read_to_string("/proc/net/nf_conntrack"))?.unwrap_or_default();
        f.note = if ct.contains("[OFFLOAD]") {
            "flow offloaded (conntrack shows [OFFLOAD])".into()
        } else {
            "conntrack did not show the flow as [OFFLOAD]: the figure may be the plain path".into()
        };
        Ok(f)
    })();
    let _ = sh(&[
        "ip",
        "netns",
        "exec",
        edge,
        "nft",
        "delete",
        "table",
        "ip",
        "sebenchft",
    ]);
    measured
}

fn tokio_relay(
    g: &mut Gen,
    edge: &str,
    mode: Mode,
    start: Instant,
) -> Result<Forwarder, BenchError> {
    let _pass = pass_on_ext(edge)?;
    let listen = SocketAddr::new(testnet::EDGE_PUB_V4.into(), RELAY_PORT);
    let to = SocketAddr::new(testnet::CLIENT_V4.into(), CLIENT_PORT);
    let sock = in_ns(edge, || UdpSocket::bind(listen))?.map_err(io(format!("bind {listen}")))?;
    sock.set_nonblocking(true).map_err(io("nonblocking"))?;
    force_rcvbuf(&sock)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let relay = std::thread::spawn(move || -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let s = tokio::net::UdpSocket::from_std(sock)?;
            let mut buf = vec![0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(100), s.recv_from(&mut buf)).await
                {
                    Ok(Ok((n, _))) => {
                        let _ = s.send_to(&buf[..n], to).await;
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {}
                }
            }
            Ok(())
        })
    });
    g.configure(testnet::EDGE_PUB_V4, 1, RELAY_PORT)?;
    let f = g.measure_with(
        "tokio UDP relay (1 thread)",
        1,
        mode,
        start,
        Some(400_000.0),
    );
    stop.store(true, Ordering::Relaxed);
    let _ = relay.join();
    f
}

/// Live-frame skbs carry a whole page each (truesize ~4 KiB), so a default
/// receive buffer holds about 50 frames, less than one burst; relays get
/// 32 MiB (SO_RCVBUFFORCE: root may exceed rmem_max).
fn force_rcvbuf(sock: &UdpSocket) -> Result<(), BenchError> {
    use std::os::fd::AsRawFd as _;
    let size: libc::c_int = 32 << 20;
    // SAFETY: valid socket fd and a correctly sized int option.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            4,
        )
    };
    if rc != 0 {
        return Err(BenchError::Io {
            op: "SO_RCVBUFFORCE".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Minimal bencode for the ng protocol: dictionaries of strings/lists.
enum Ben {
    S(String),
    L(Vec<Ben>),
    D(Vec<(String, Ben)>),
}

fn ben(b: &Ben, out: &mut String) {
    match b {
        Ben::S(s) => out.push_str(&format!("{}:{s}", s.len())),
        Ben::L(l) => {
            out.push('l');
            l.iter().for_each(|x| ben(x, out));
            out.push('e');
        }
        Ben::D(d) => {
            out.push('d');
            for (k, v) in d {
                out.push_str(&format!("{}:{k}", k.len()));
                ben(v, out);
            }
            out.push('e');
        }
    }
}

fn ng(sock: &UdpSocket, cookie: &str, msg: &Ben) -> Result<String, BenchError> {
    let mut s = format!("{cookie} ");
    ben(msg, &mut s);
    sock.send(s.as_bytes()).map_err(io("ng send"))?;
    let mut buf = vec![0u8; 65536];
    let n = sock
        .recv(&mut buf)
        .map_err(io("ng recv (is rtpengine listening?)"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Streams per rtpengine measurement: its worst case (one stream, one
/// socket, one busy thread) and how its users run it (many calls spread
/// over worker threads).
const RTPENGINE_STREAMS: [u32; 3] = [1, 100, 1000];

/// Its SDP: one audio stream at `ip:port`.
fn rtpengine_sdp(ip: &str, port: u16) -> String {
    format!("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n")
}

/// One call through rtpengine (offer from the client, answer from the
/// peer); the port rtpengine offered the peer, where the generator sends.
fn rtpengine_call(sock: &UdpSocket, n: u32) -> Result<u16, BenchError> {
    let id = format!("sebench-{n}");
    let call = |cmd: &str, sdp_: String, extra: Vec<(String, Ben)>| {
        let mut d = vec![
            ("command".to_string(), Ben::S(cmd.into())),
            ("call-id".into(), Ben::S(id.clone())),
            ("from-tag".into(), Ben::S("client".into())),
            ("sdp".into(), Ben::S(sdp_)),
            ("flags".into(), Ben::L(vec![])),
        ];
        d.extend(extra);
        Ben::D(d)
    };
    // The client's media at 10.77.0.2 (the sink counts every UDP frame,
    // whatever its port); rtpengine's port in the offer's SDP is where the
    // peer sends.
    let client_port = CLIENT_PORT + 2 * (n % 10_000) as u16;
    let r1 = ng(
        sock,
        &format!("o{n}"),
        &call("offer", rtpengine_sdp("10.77.0.2", client_port), vec![]),
    )?;
    let port = r1
        .split("m=audio ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| BenchError::Map {
            name: "rtpengine",
            detail: format!("offer reply without m=audio: {r1}"),
        })?;
    let r2 = ng(
        sock,
        &format!("a{n}"),
        &call(
            "answer",
            rtpengine_sdp("198.51.100.2", GEN_SPORT),
            vec![("to-tag".into(), Ben::S("peer".into()))],
        ),
    )?;
    if !r2.contains("result") || r2.contains("error") {
        return Err(BenchError::Map {
            name: "rtpengine",
            detail: format!("answer failed: {r2}"),
        });
    }
    Ok(port)
}

/// rtpengine-daemon as its users run it: `--num-threads` = vCPUs, and one
/// measurement per entry of `RTPENGINE_STREAMS`, each on fresh calls (a
/// stream rtpengine saw overrun stays in its discarding state).
fn rtpengine(
    g: &mut Gen,
    edge: &str,
    mode: Mode,
    start: Instant,
) -> Result<(Vec<Forwarder>, Vec<NotMeasured>, String), BenchError> {
    let v = Command::new("rtpengine")
        .arg("--version")
        .output()
        .map_err(io("rtpengine --version (apt package rtpengine-daemon)"))?;
    let version = String::from_utf8_lossy(&v.stdout)
        .trim()
        .trim_start_matches("Version: ")
        .to_owned();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _pass = pass_on_ext(edge)?;
    // rtpengine sizes its own sockets from the namespace defaults (see
    // `force_rcvbuf`); best effort, the figure is reported either way.
    for kv in [
        "net.core.rmem_max=33554432",
        "net.core.rmem_default=33554432",
    ] {
        let _ = sh(&["ip", "netns", "exec", edge, "sysctl", "-qw", kv]);
    }
    let log_path = std::env::temp_dir().join("sip-edge-bench-rtpengine.log");
    let log =
        std::fs::File::create(&log_path).map_err(io(format!("create {}", log_path.display())))?;
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{edge}"))
        .args([
            "--",
            "rtpengine",
            "--foreground",
            "--log-stderr",
            "--table=-1",
            "--interface=203.0.113.1",
            "--listen-ng=127.0.0.1:22222",
            // Four ports per call (RTP and RTCP on each side) for 1,101 calls.
            "--port-min=30000",
            "--port-max=39999",
            "--log-level=4",
            "--no-redis-required",
        ])
        .arg(format!("--num-threads={threads}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(io("spawn rtpengine"))?;
    let _d = Daemon(child);
    let sock = in_ns(edge, || UdpSocket::bind("127.0.0.1:0"))?.map_err(io("bind ng client"))?;
    sock.connect("127.0.0.1:22222").map_err(io("connect ng"))?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(io("timeout"))?;
    let mut up = Err(BenchError::Map {
        name: "rtpengine",
        detail: "no answer to ping within 5 s".into(),
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(r) = ng(
            &sock,
            "c0",
            &Ben::D(vec![("command".into(), Ben::S("ping".into()))]),
        ) {
            if r.contains("pong") {
                up = Ok(());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    up?;
    let (mut done, mut missing, mut next) = (Vec::new(), Vec::new(), 0u32);
    for streams in RTPENGINE_STREAMS {
        let name = format!("rtpengine-daemon (userspace), {streams} streams, {threads} threads");
        let measured = (|| {
            let mut ports = Vec::with_capacity(streams as usize);
            for _ in 0..streams {
                ports.push(rtpengine_call(&sock, next)?);
                next += 1;
            }
            g.configure_ports(testnet::EDGE_PUB_V4, &ports)?;
            g.measure_with(&name, streams, mode, start, Some(400_000.0))
        })();
        match measured {
            Ok(mut f) => {
                f.note = format!(
                    "rtpengine {version}, --table=-1 (no kernel module), --num-threads={threads}, {streams} calls each sending one stream; it drops a stream's packets after its receive queue held >50 packets five times (log: {})",
                    log_path.display()
                );
                done.push(f);
            }
            Err(e) => missing.push(NotMeasured {
                what: name,
                reason: e.to_string(),
            }),
        }
    }
    Ok((done, missing, version))
}
