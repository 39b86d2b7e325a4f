//! The agent's main loop: bring the datapath up from the config, check the
//! host settings it needs (forwarding on the attached interfaces; warned,
//! see `datapath::hostcheck`), start the TLS SIP proxy when the config has
//! a `[proxy]` section (its media layer writes pinholes through its own
//! handle on the pinned maps), service the datapath (resolve next hops the
//! datapath met unresolved; log a rising `drop_fib_failed` with the fix),
//! serve the control socket (`crate::control`; its `registrations` queries
//! go to the proxy's driver, `reload` is answered here) until `shutdown`
//! resolves, then stop the proxy and keep or remove the datapath as
//! configured. As a service (`run_service`, `crate::service`): reload on
//! SIGHUP or `sip-edge reload`, look at the certificate files, tell
//! systemd when ready, and on the first stop signal drain calls for
//! `[agent] drain_secs` (a second one stops at once).

use std::{
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use sip_edge_common::reason::Reason;
use tracing::{info, warn};

use crate::{
    config::{Config, OnExit},
    datapath::{
        attach::{AttachError, Datapath},
        hostcheck::{self, FibFailWatch},
        lock::{LockError, PinDirLock},
        maps::{DatapathMaps, MapsError},
        neigh,
    },
    media::control::MediaController,
    ports::{self, PortsError},
    service::{
        notify,
        reload::{Outcome, Reloader, SetLog, TransportHandle},
    },
    transport::{self, live::Command, TransportError},
};

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Another agent runs on the same pin_dir (or its lock is unusable).
    #[error(transparent)]
    Lock {
        /// The lock error (names the other agent's pid).
        #[from]
        source: LockError,
    },
    /// The datapath could not be brought up or removed.
    #[error(transparent)]
    Attach {
        /// The datapath error.
        #[from]
        source: AttachError,
    },
    /// The media layer could not open the pinned maps.
    #[error("media layer cannot open the pinned maps: {source}")]
    Maps {
        /// The map error.
        #[from]
        source: MapsError,
    },
    /// The media ranges could not be reserved.
    #[error(transparent)]
    Ports {
        /// The sysctl error.
        #[from]
        source: PortsError,
    },
    /// The SIP transport could not start (bind, TLS material).
    #[error(transparent)]
    Transport {
        /// The transport error.
        #[from]
        source: TransportError,
    },
}

/// How often the agent looks for unresolved next hops.
const NEIGH_POLL: Duration = Duration::from_millis(50);
/// How often the agent reads `drop_fib_failed` (a log line per rise at most
/// this often: media loss is reported within seconds, never per packet).
const FIB_WATCH: Duration = Duration::from_secs(10);

/// Checks the host settings the datapath needs on the attached interfaces
/// (`hostcheck`), logs each missing one with its fix, and returns them.
fn check_host(cfg: &Config) -> Vec<hostcheck::Finding> {
    let ifaces: Vec<&str> = cfg.interfaces.iter().map(|i| i.name.as_str()).collect();
    let addrs = || cfg.addresses.internal.iter().chain(&cfg.addresses.public);
    let v4 = addrs().any(std::net::IpAddr::is_ipv4);
    let v6 = addrs().any(std::net::IpAddr::is_ipv6);
    hostcheck::check(&ifaces, v4, v6, |p| std::fs::read_to_string(p))
}

/// The `drop_fib_failed` total, if the counters can be read.
fn fib_failed(maps: &DatapathMaps) -> Option<u64> {
    match maps.reasons() {
        Ok(r) => r
            .iter()
            .find(|c| c.reason == Reason::DropFibFailed.name())
            .map(|c| c.packets),
        Err(e) => {
            warn!(error = %e, "reading REASONS");
            None
        }
    }
}

/// How the agent runs as a service (`main.rs` fills it from the signals
/// and the command line).
pub struct Service {
    /// Stop requests (SIGTERM, SIGINT): the first drains calls for
    /// `[agent] drain_secs`, the second stops at once.
    pub stops: mpsc::Receiver<()>,
    /// Reload requests (SIGHUP).
    pub hangups: mpsc::Receiver<()>,
    /// The config file, re-read on reload (none: reload is refused).
    pub config_path: Option<PathBuf>,
    /// Sets the log filter on reload.
    pub set_log: Option<SetLog>,
    /// The filter in force when `[agent] log` is unset (`--log`).
    pub default_log: String,
}

/// How often a drain asks how many calls are left.
const DRAIN_POLL: Duration = Duration::from_millis(200);

/// Run the agent until `shutdown` completes (no reload, no drain wait
/// beyond `[agent] drain_secs`; tests and embedders).
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let (stop_tx, stops) = mpsc::channel(1);
    let (_hangup_tx, hangups) = mpsc::channel(1);
    let svc = Service {
        stops,
        hangups,
        config_path: None,
        set_log: None,
        default_log: String::new(),
    };
    let agent = run_service(cfg, svc);
    tokio::pin!(agent);
    tokio::pin!(shutdown);
    let mut signalled = false;
    loop {
        tokio::select! {
            r = &mut agent => return r,
            () = &mut shutdown, if !signalled => {
                signalled = true;
                let _ = stop_tx.send(()).await;
            }
        }
    }
}

/// Run the agent as a service until stopped (module docs).
pub async fn run_service(cfg: Config, mut svc: Service) -> Result<(), AgentError> {
    // Before anything touches the kernel (issue #14 item 8): a second agent
    // on these pins would swap its program into our links and, with
    // on_exit = "remove", delete them under us. Held until we return.
    let _lock = PinDirLock::acquire(&cfg.pin_dir)?;
    let mut dp = Datapath::start(&cfg)?;
    // After the datapath is up (a failed attach changes nothing) and before
    // any socket of ours exists: never an ephemeral port in a media range,
    // or XDP would drop the replies to our own connections.
    if ports::reserve(
        std::path::Path::new(ports::RESERVED_PORTS),
        &cfg.media_ranges(),
    )? {
        info!(ranges = ?cfg.media.port_ranges, "media ranges added to net.ipv4.ip_local_reserved_ports");
    }
    info!(pin_dir = %cfg.pin_dir.display(), adopted = ?dp.adopted, "datapath up");
    crate::status::agent_started(&cfg, !dp.adopted.is_empty());
    // Warn, never refuse (hostcheck's module docs say why): media is lost
    // until the admin fixes these, and the watch below repeats the hint.
    let findings = check_host(&cfg);
    for f in &findings {
        warn!(finding = %f, "host setting the datapath needs is missing; media through XDP will be dropped");
    }
    if findings.is_empty() {
        info!("forwarding is on for every attached interface (bpf_fib_lookup can forward)");
    }
    let mut fib_watch = FibFailWatch::default();
    if let Some(total) = fib_failed(&dp.maps) {
        fib_watch.observe(total);
    }
    let (stop_proxy, proxy_stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = match cfg.proxy {
        Some(_) => {
            // The media layer is the only pinhole writer; it gets its own
            // handle on the pinned maps (the agent's handle only drains
            // NEIGH_MISS).
            let maps = Arc::new(Mutex::new(DatapathMaps::from_pins(&cfg.pin_dir)?));
            let media = MediaController::from_config(&cfg, maps);
            let running = transport::start(&cfg, Box::new(media), async move {
                let _ = proxy_stopped.await;
            })
            .await?;
            crate::status::transport_up(&running);
            Some(running)
        }
        None => {
            info!("no [proxy] section: datapath only, no SIP listeners");
            None
        }
    };
    // The control socket: a failure to serve it never stops the agent
    // (the datapath and the proxy work without it); it is logged.
    let (stop_control, control_stopped) = tokio::sync::oneshot::channel::<()>();
    // Queries come here first: `reload` is the agent's, the rest go on to
    // the proxy's driver (`forward_query`).
    let (queries_tx, mut queries) = mpsc::channel::<crate::control::Request>(16);
    let control = if cfg.control.enabled {
        match crate::control::bind(&cfg.control) {
            Ok(listener) => Some(tokio::spawn(crate::control::serve(
                listener,
                cfg.control.socket.clone(),
                Some(queries_tx),
                async move {
                    let _ = control_stopped.await;
                },
            ))),
            Err(e) => {
                warn!(error = %e, "control socket not served; `sip-edge registrations` will not reach this agent");
                None
            }
        }
    } else {
        None
    };
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = crate::metrics::http::start(&cfg, async move {
        let _ = metrics_stopped.await;
    })
    .await;
    let mut reloader = svc.config_path.take().map(|path| {
        Reloader::new(
            path,
            cfg.clone(),
            proxy.as_ref().map(|p| TransportHandle {
                commands: p.commands.clone(),
                certs: p.certs.clone(),
                internal: p.internal,
                external: p.external,
                internal_udp: p.internal_udp,
            }),
            svc.set_log.take(),
            std::mem::take(&mut svc.default_log),
        )
    });
    // Listeners bound, XDP attached, control socket up.
    notify::ready("running");
    let mut cert_every = cfg.agent.cert_check_secs;
    let mut cert_tick = tokio::time::interval(Duration::from_secs(cert_every.max(1)));
    let mut drain_tick = tokio::time::interval(DRAIN_POLL);
    let mut drain_until: Option<tokio::time::Instant> = None;
    let (mut stops_open, mut hangups_open) = (true, true);
    let mut tick = tokio::time::interval(NEIGH_POLL);
    let mut fib_tick = tokio::time::interval(FIB_WATCH);
    loop {
        tokio::select! {
            s = svc.stops.recv(), if stops_open => {
                let Some(()) = s else {
                    stops_open = false;
                    continue;
                };
                if drain_until.is_some() {
                    info!("second stop signal: stopping now, calls in progress or not");
                    break;
                }
                let drain = reloader
                    .as_ref()
                    .map_or(cfg.agent.drain_secs, |r| r.applied().agent.drain_secs);
                match &proxy {
                    Some(p) if drain > 0 => {
                        notify::stopping(&format!("draining calls for up to {drain} s"));
                        let _ = p.commands.send(Command::Drain).await;
                        info!(drain_secs = drain, "stop requested: draining calls (new INVITEs get 503); a second SIGTERM stops at once");
                        drain_until = Some(tokio::time::Instant::now() + Duration::from_secs(drain));
                    }
                    _ => {
                        notify::stopping("stopping");
                        break;
                    }
                }
            }
            _ = drain_tick.tick(), if drain_until.is_some() => {
                let left = match &proxy {
                    Some(p) => calls(p).await,
                    None => 0,
                };
                if left == 0 {
                    info!("drain: every call has ended; stopping");
                    break;
                }
                if drain_until.is_some_and(|t| tokio::time::Instant::now() >= t) {
                    warn!(calls = left, "drain time over; stopping with calls in progress");
                    break;
                }
            }
            h = svc.hangups.recv(), if hangups_open => {
                if h.is_none() {
                    hangups_open = false;
                    continue;
                }
                match &mut reloader {
                    Some(r) => {
                        info!("SIGHUP: reloading the configuration");
                        r.reload().await;
                        retime(&mut cert_tick, &mut cert_every, r);
                    }
                    None => warn!("SIGHUP ignored: the agent was not started from a config file"),
                }
            }
            Some(req) = queries.recv() => {
                if req.query == crate::control::Query::Reload {
                    let out = match &mut reloader {
                        Some(r) => {
                            let out = r.reload().await;
                            retime(&mut cert_tick, &mut cert_every, r);
                            out
                        }
                        None => Outcome {
                            ok: false,
                            error: Some("the agent was not started from a config file".into()),
                            ..Outcome::default()
                        },
                    };
                    let _ = req.reply.send(outcome_fields(out));
                } else {
                    forward_query(req, proxy.as_ref().map(|p| &p.control));
                }
            }
            _ = cert_tick.tick(), if cert_every > 0 => {
                if let Some(r) = &reloader {
                    r.check_cert_files();
                }
            }
            _ = fib_tick.tick() => {
                let Some(lost) = fib_failed(&dp.maps).and_then(|t| fib_watch.observe(t)) else {
                    continue;
                };
                // Re-read the settings: they are the usual cause, and may
                // have changed since start.
                let findings = check_host(&cfg);
                if findings.is_empty() {
                    warn!(lost, "media packets dropped as drop_fib_failed: bpf_fib_lookup found no route; forwarding is on, so check the route to the destination (ip route get ADDR) and that its egress interface is an attached [[interface]]");
                }
                for f in &findings {
                    warn!(lost, finding = %f, "media packets dropped as drop_fib_failed");
                }
            }
            _ = tick.tick() => {
                match dp.maps.take_neigh_misses() {
                    Ok(misses) => for (ifindex, addr) in misses {
                        match neigh::resolve(ifindex, addr) {
                            Ok(()) => info!(%addr, ifindex, "asked the kernel to resolve next hop"),
                            Err(e) => warn!(error = %e, "next-hop resolution"),
                        }
                    },
                    Err(e) => warn!(error = %e, "reading NEIGH_MISS"),
                }
            }
        }
    }
    let _ = stop_control.send(());
    if let Some(c) = control {
        let _ = c.await;
    }
    let _ = stop_metrics.send(());
    if let Some(m) = metrics {
        let _ = m.await;
    }
    if let Some(p) = proxy {
        let _ = stop_proxy.send(());
        if let Err(e) = p.driver.await {
            warn!(error = %e, "SIP driver task ended abnormally");
        }
    }
    let on_exit = reloader
        .as_ref()
        .map_or(cfg.on_exit, |r| r.applied().on_exit);
    match on_exit {
        OnExit::Keep => {
            info!("exiting; datapath stays attached and pinned (on_exit = \"keep\")");
            Ok(())
        }
        OnExit::Remove => {
            dp.remove()?;
            info!("exiting; datapath detached and pins removed (on_exit = \"remove\")");
            Ok(())
        }
    }
}

/// Calls the proxy has not ended (0 once its driver is gone).
async fn calls(p: &transport::Running) -> usize {
    let (reply, answer) = oneshot::channel();
    if p.commands.send(Command::Calls { reply }).await.is_err() {
        return 0;
    }
    answer.await.unwrap_or(0)
}

/// A control query that is not the agent's own goes to the proxy driver.
fn forward_query(
    req: crate::control::Request,
    proxy: Option<&mpsc::Sender<crate::control::Request>>,
) {
    match proxy {
        Some(p) => {
            if let Err(e) = p.try_send(req) {
                let req = match e {
                    mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
                };
                let _ = req
                    .reply
                    .send(Err("the SIP proxy is busy or stopped; try again".into()));
            }
        }
        None => {
            let _ = req.reply.send(Err(
                "no [proxy] section: this agent runs no SIP proxy".into()
            ));
        }
    }
}

/// A reload's outcome as the control socket's answer.
fn outcome_fields(out: Outcome) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    if let Some(e) = out.error {
        return Err(format!("{e}\nnothing changed"));
    }
    match serde_json::to_value(&out) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.remove("ok");
            Ok(m)
        }
        Ok(_) => Err("reload outcome is not an object".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// After a reload: the certificate check runs every `[agent]
/// cert_check_secs` of the applied config (0: off).
fn retime(tick: &mut tokio::time::Interval, every: &mut u64, r: &Reloader) {
    let now = r.applied().agent.cert_check_secs;
    if now != *every {
        *every = now;
        *tick = tokio::time::interval(Duration::from_secs(now.max(1)));
    }
}
