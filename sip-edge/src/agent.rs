//! The agent's main loop: bring the datapath up from the config, check the
//! host settings it needs (forwarding on the attached interfaces; warned,
//! see `datapath::hostcheck`), start the TLS SIP proxy when the config has
//! a `[proxy]` section (its media layer writes pinholes through its own
//! handle on the pinned maps), service the datapath (resolve next hops the
//! datapath met unresolved; log a rising `drop_fib_failed` with the fix),
//! serve the control socket (`crate::control`; its `registrations` queries
//! go to the proxy's driver) until `shutdown` resolves, then stop the proxy
//! and keep or remove the datapath as configured.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

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
    transport::{self, TransportError},
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

/// Run the agent until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
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
    let control = if cfg.control.enabled {
        match crate::control::bind(&cfg.control) {
            Ok(listener) => Some(tokio::spawn(crate::control::serve(
                listener,
                cfg.control.socket.clone(),
                proxy.as_ref().map(|p| p.control.clone()),
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
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(NEIGH_POLL);
    let mut fib_tick = tokio::time::interval(FIB_WATCH);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
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
    match cfg.on_exit {
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
