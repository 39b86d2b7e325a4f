//! `cargo xtask soak --minutes N` (issue #8): calls with media through the
//! real agent, one after the other for N minutes, while an attacker
//! namespace of 50 outside addresses runs three attacks at once:
//!
//! - attack 5: a UDP spray over the edge's public media range (live
//!   pinhole ports included), which the XDP program must drop;
//! - attack 7: stalled TLS handshakes, kept topped up (20 per address);
//! - attack 8: an INVITE flood over TLS from 10 of the addresses.
//!
//! It reports calls placed and failed, media loss each way, the attacks'
//! counts, and the agent's RSS and open fds at start and end; it exits
//! non-zero if a call failed, the agent died, a pinhole was left behind or
//! the agent's fds did not return to where they started. Bounded: every
//! loop stops at the deadline, every wait has a timeout; the attack
//! threads are stopped and joined on every way out (a panic too), so the
//! namespaces, pins and temp files go away on exit (RAII guards of
//! `sip_edge_tests::edge`). Checked by killing the agent mid-soak: the
//! soak reported the failed call and exited 1, and left nothing behind.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::Parser;
use sip_edge_tests::{
    edge::{self, response_for, sa, Edge, Flow, PeerUa, EDGE_EXT, EDGE_INT, WAIT},
    floods, testnet,
    testua::{self, media_of, rtp_packet, SdpSpec},
};

#[derive(Parser)]
#[command(
    name = "sip-edge-soak",
    about = "calls with media under attack, for N minutes"
)]
struct Args {
    /// How long calls are placed (the wind-down adds up to ~30 s).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// UDP spray packets per second over the media range.
    #[arg(long, default_value_t = 2000)]
    spray_rate: u64,
    /// INVITEs per second of the flood (all 10 flooding addresses together).
    #[arg(long, default_value_t = 500)]
    flood_rate: u64,
    /// Stalled handshakes kept open per attacker address.
    #[arg(long, default_value_t = 20)]
    stalled_per_source: usize,
}

/// Attack threads: `stop` set and every thread joined on drop.
struct Attacks {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, u64)>>,
}

impl Attacks {
    fn new() -> Attacks {
        Attacks {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    fn spawn(&mut self, f: impl FnOnce() -> (u64, u64) + Send + 'static) {
        self.threads.push(std::thread::spawn(f));
    }

    /// Stops and joins the threads; their counts in spawn order.
    fn finish(&mut self) -> Vec<(u64, u64)> {
        self.stop.store(true, Relaxed);
        self.threads
            .drain(..)
            .map(|t| t.join().unwrap_or((0, 0)))
            .collect()
    }
}

impl Drop for Attacks {
    fn drop(&mut self) {
        self.finish();
    }
}

/// RTP packets each way per call (20 ms apart: 1 s of audio).
const RTP_PACKETS: u16 = 50;
/// A call whose media lost more than this share either way failed.
const MAX_CALL_LOSS: f64 = 0.10;

#[derive(Default)]
struct Tally {
    placed: u64,
    failed: u64,
    sent: u64,
    lost_up: u64,
    lost_down: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The agent inherits this (single-threaded here, before any spawn):
    // warnings only, so security lines show but the report stays readable.
    // (The harness adds transport=info for its ready line; its
    // per-connection lines stay at warn.)
    std::env::set_var("SIP_EDGE_LOG", "warn,sip_edge::transport::conn=warn");
    if let Some(reason) = testnet::unavailable_reason() {
        eprintln!("soak cannot run: {reason}");
        return ExitCode::from(2);
    }
    if !(args.minutes > 0.0 && args.minutes <= 24.0 * 60.0) {
        eprintln!("--minutes must be between 0 and 1440");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if rt.block_on(soak(&args)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Keeps `per_source` stalled handshakes open from each address until
/// `stop`; returns how many connections it opened.
fn stalled_loop(
    e: &Edge,
    ns: &str,
    sources: &[IpAddr],
    per_source: usize,
    stop: &AtomicBool,
) -> u64 {
    let mut opened = 0u64;
    let mut held: Vec<std::net::TcpStream> = Vec::new();
    while !stop.load(Relaxed) {
        held.retain(|s| !floods::is_closed(s));
        let want = sources.len() * per_source;
        if held.len() < want {
            // Top up evenly: a few per address each round.
            let per = (want - held.len()).div_ceil(sources.len()).min(per_source);
            let new = floods::stalled_handshakes(&e.topo, ns, sources, per, sa(EDGE_EXT), &[]);
            opened += new.len() as u64;
            held.extend(new);
        }
        for _ in 0..20 {
            if stop.load(Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    opened
}

/// UDP over the public media range from every attacker address, at
/// `rate` packets per second, until `stop`; returns packets sent.
fn spray_loop(ns: &str, sources: &[IpAddr], rate: u64, stop: &AtomicBool) -> u64 {
    let socks: Vec<UdpSocket> = testnet::in_ns(ns, || {
        sources
            .iter()
            .filter_map(|s| UdpSocket::bind(SocketAddr::new(*s, 0)).ok())
            .collect()
    })
    .unwrap_or_default();
    if socks.is_empty() {
        return 0;
    }
    let payload = rtp_packet(1, 0xbad0_0bad);
    let mut sent = 0u64;
    let started = Instant::now();
    let mut port = 40000u16;
    while !stop.load(Relaxed) {
        // Pace: `rate` per second, in batches of 1 ms.
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let s = &socks[(sent as usize) % socks.len()];
            let _ = s.send_to(
                &payload,
                SocketAddr::new(IpAddr::from([203, 0, 113, 1]), port),
            );
            port = if port >= 40999 { 40000 } else { port + 1 };
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    sent
}

/// An INVITE flood over TLS from `sources` (one connection each) at `rate`
/// per second in all, until `stop`; returns (sent, refused with 503).
fn flood_loop(
    ns: &str,
    sources: &[IpAddr],
    ca: &std::path::Path,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> (u64, u64) {
    let sources = sources.to_vec();
    let ca = ca.to_owned();
    let sent = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let (s2, r2) = (sent.clone(), refused.clone());
    let _ = testnet::in_ns(ns, move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(cfg) = testua::client_config(&ca) else {
                return;
            };
            let per = (rate / sources.len().max(1) as u64).max(1);
            let mut tasks = Vec::new();
            for src in sources {
                let (cfg, stop, sent, refused) =
                    (cfg.clone(), stop.clone(), s2.clone(), r2.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Relaxed) {
                        let sock = match tokio::net::TcpSocket::new_v4() {
                            Ok(s) => s,
                            Err(_) => return,
                        };
                        if sock.bind(SocketAddr::new(src, 0)).is_err() {
                            return;
                        }
                        let Ok(Ok(tcp)) =
                            tokio::time::timeout(WAIT, sock.connect(sa(EDGE_EXT))).await
                        else {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        };
                        let Ok(mut conn) = testua::connect_tls_stream(
                            tcp,
                            sa(EDGE_EXT),
                            cfg.clone(),
                            testua::EDGE_TLS_NAME,
                            WAIT,
                        )
                        .await
                        else {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        };
                        // One batch of `per` INVITEs a second, their
                        // answers read before the next.
                        while !stop.load(Relaxed) {
                            let tick = Instant::now();
                            let t = floods::sip_flood_within(
                                &mut conn,
                                "INVITE",
                                per as usize,
                                EDGE_EXT,
                                None,
                                Duration::from_millis(900),
                            )
                            .await;
                            sent.fetch_add(t.sent as u64, Relaxed);
                            refused.fetch_add(t.refused as u64, Relaxed);
                            if t.sent == 0 {
                                break;
                            }
                            let rest = Duration::from_secs(1).saturating_sub(tick.elapsed());
                            tokio::time::sleep(rest).await;
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    });
    (sent.load(Relaxed), refused.load(Relaxed))
}

/// Receives RTP packets of `ssrc` on `rx` until it is quiet for 300 ms.
fn drain(rx: &UdpSocket, ssrc: u32) -> u64 {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while let Ok((len, _)) = rx.recv_from(&mut buf) {
        if len >= 12 && buf[8..12] == ssrc.to_be_bytes() {
            n += 1;
        }
    }
    n
}

/// One call: INVITE..ACK, 1 s of RTP both ways, BYE. Returns the packets
/// lost (up, down), or why it failed.
async fn one_call(
    e: &Edge,
    alice: &mut testua::UaConn,
    bob: &mut PeerUa,
    n: u16,
) -> Result<(u64, u64), String> {
    let a_port = 4000 + 2 * (n % 400);
    let b_port = 6000 + 2 * (n % 400);
    let spec = |p| SdpSpec {
        audio: Some(p),
        video: None,
        msrp: None,
    };
    let mut call = edge::call_out(alice, bob, &spec(a_port), &spec(b_port), Flow::Refusable)
        .await
        .map_err(|code| format!("refused with {code}"))?;
    let edge_int = media_of(&call.answer, "audio")
        .map_err(|e| e.to_string())?
        .addr;
    let edge_pub = media_of(&call.offer, "audio")
        .map_err(|e| e.to_string())?
        .addr;
    let a = e
        .topo
        .udp(&e.topo.client, sa(&format!("10.77.0.2:{a_port}")))
        .map_err(|e| e.to_string())?;
    let b = e
        .topo
        .udp(&e.topo.peer, sa(&format!("198.51.100.2:{b_port}")))
        .map_err(|e| e.to_string())?;
    let (ssrc_a, ssrc_b) = (0xa000_0000 | u32::from(n), 0xb000_0000 | u32::from(n));
    for seq in 0..RTP_PACKETS {
        let _ = a.send_to(&rtp_packet(seq, ssrc_a), edge_int);
        let _ = b.send_to(&rtp_packet(seq, ssrc_b), edge_pub);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let up = drain(&b, ssrc_a);
    let down = drain(&a, ssrc_b);
    alice
        .send(&call.a.request("BYE", "", ""))
        .await
        .map_err(|e| e.to_string())?;
    let bye = bob.recv_request("BYE").await;
    bob.conn()
        .send(&testua::reply(&bye, 200, "OK", "", "", "", ""))
        .await
        .map_err(|e| e.to_string())?;
    let r = response_for(alice, &call.a.call_id).await;
    if r.status() != Some(200) {
        return Err(format!("BYE answered {:?}", r.status()));
    }
    let lost = (
        u64::from(RTP_PACKETS).saturating_sub(up),
        u64::from(RTP_PACKETS).saturating_sub(down),
    );
    let limit = (f64::from(RTP_PACKETS) * MAX_CALL_LOSS) as u64;
    if lost.0 > limit || lost.1 > limit {
        return Err(format!(
            "media lost: {} up, {} down of {RTP_PACKETS}",
            lost.0, lost.1
        ));
    }
    Ok(lost)
}

async fn soak(args: &Args) -> bool {
    let tag = format!("flsk{}", std::process::id() % 100_000);
    eprintln!("soak: namespaces and agent ({tag})");
    let e = Arc::new(Edge::start(&tag, |pin_dir, pki| {
        testua::edge_config(pin_dir, pki, "relay")
    }));
    let atk = match e.topo.add_attacker_pool(50) {
        Ok(a) => a,
        Err(err) => {
            eprintln!("attacker namespace: {err}");
            return false;
        }
    };
    let sources = floods::ips(&atk.addrs);
    let pid = e.agent_pid();
    let mut bob = PeerUa::skipping_others(&e);
    let mut alice = e.connect_alice().await;
    // Warm-up call (neighbours, the edge's connection to bob).
    if let Err(why) = one_call(&e, &mut alice, &mut bob, 399).await {
        eprintln!("the warm-up call failed before any attack: {why}");
        return false;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss0, fd0) = (floods::rss_kb(pid), floods::fds(pid));
    let drops0 = e.reason("drop_no_pinhole") + e.reason("drop_remote_mismatch");
    eprintln!("soak: baseline RSS {rss0} kB, fds {fd0}; attacks start");

    // The attack threads, stopped and joined on every way out of here
    // (a panic too), so the fixture's guards run before the process ends.
    let mut attacks = Attacks::new();
    let stop = attacks.stop.clone();
    {
        let (ns, src, stop, rate) = (
            atk.ns.clone(),
            sources.clone(),
            stop.clone(),
            args.spray_rate,
        );
        attacks.spawn(move || (spray_loop(&ns, &src, rate, &stop), 0));
    }
    {
        let (ns, src, stop, ca) = (
            atk.ns.clone(),
            sources[..10].to_vec(),
            stop.clone(),
            e.pki.ca.clone(),
        );
        let rate = args.flood_rate;
        attacks.spawn(move || flood_loop(&ns, &src, &ca, rate, stop));
    }
    {
        let (e, ns, src, stop) = (
            e.clone(),
            atk.ns.clone(),
            sources[10..].to_vec(),
            stop.clone(),
        );
        let per = args.stalled_per_source;
        attacks.spawn(move || (stalled_loop(&e, &ns, &src, per, &stop), 0));
    }
    let mut t = Tally::default();
    let mut rss_max = rss0;
    let deadline = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    let mut last_print = Instant::now();
    let mut n: u16 = 0;
    while Instant::now() < deadline {
        t.placed += 1;
        // In a task of its own: the fixture's helpers panic on a timeout,
        // which fails this call, not the soak.
        let task = {
            let e = e.clone();
            tokio::spawn(async move {
                let r = one_call(&e, &mut alice, &mut bob, n).await;
                (alice, bob, r)
            })
        };
        match task.await {
            Ok((a, b, Ok((up, down)))) => {
                (alice, bob) = (a, b);
                t.sent += u64::from(RTP_PACKETS);
                t.lost_up += up;
                t.lost_down += down;
            }
            other => {
                t.failed += 1;
                let why = match other {
                    Ok((a, b, Err(why))) => {
                        drop((a, b));
                        why
                    }
                    Err(panic) => format!("{panic}"),
                    Ok(_) => unreachable!("matched above"),
                };
                eprintln!("soak: call {} failed: {why}", t.placed);
                // Start over with fresh user agents; an edge that no
                // longer answers ends the soak.
                bob = PeerUa::skipping_others(&e);
                match testua::connect_tls(
                    &e.topo.client,
                    sa(EDGE_INT),
                    &e.pki.ca,
                    testua::EDGE_TLS_NAME,
                    WAIT,
                )
                .await
                {
                    Ok(c) => alice = c,
                    Err(err) => {
                        eprintln!("soak: the edge no longer answers ({err}); stopping");
                        break;
                    }
                }
            }
        }
        n = (n + 1) % 399;
        rss_max = rss_max.max(floods::rss_kb(pid));
        if last_print.elapsed() > Duration::from_secs(15) {
            last_print = Instant::now();
            eprintln!(
                "soak: {} calls, {} failed; RSS {} kB, fds {}",
                t.placed,
                t.failed,
                floods::rss_kb(pid),
                floods::fds(pid)
            );
        }
    }
    let counts = attacks.finish();
    let (sprayed, (flood_sent, flood_refused), opened) = (counts[0].0, counts[1], counts[2].0);
    let rss_end_attack = floods::rss_kb(pid);
    // Stalled handshakes end by the agent's timeout (10 s by default); the
    // attacker's sockets are closed by now.
    let fd_end = floods::wait_fds_at_most(pid, fd0 + 2, Duration::from_secs(30));
    let rss_end = floods::rss_kb(pid);
    let drops = e.reason("drop_no_pinhole") + e.reason("drop_remote_mismatch") - drops0;
    let left = e.pinholes().len();
    let loss = |lost: u64| {
        if t.sent == 0 {
            0.0
        } else {
            100.0 * lost as f64 / t.sent as f64
        }
    };
    println!("soak report ({:.1} min)", args.minutes);
    println!("  calls placed {}, failed {}", t.placed, t.failed);
    println!(
        "  media: {} RTP packets each way; lost {} up ({:.3}%), {} down ({:.3}%)",
        t.sent,
        t.lost_up,
        loss(t.lost_up),
        t.lost_down,
        loss(t.lost_down)
    );
    println!("  attack 5: {sprayed} UDP packets sprayed over the media range; {drops} dropped by XDP (no pinhole / wrong remote)");
    println!("  attack 7: {opened} stalled handshakes opened");
    println!("  attack 8: {flood_sent} INVITEs flooded, {flood_refused} answered 503");
    println!("  agent RSS: start {rss0} kB, max {rss_max} kB, end of attacks {rss_end_attack} kB, end {rss_end} kB");
    // A dead agent has no fds (and its zombie no RSS).
    let alive = fd_end > 0 && rss_end > 0;
    println!("  agent fds: start {fd0}, end {fd_end}; agent alive: {alive}");
    println!("  pinholes left: {left}");
    let ok = alive && t.failed == 0 && t.placed > 0 && fd_end <= fd0 + 2 && left == 0;
    println!("soak {}", if ok { "passed" } else { "FAILED" });
    ok
}
