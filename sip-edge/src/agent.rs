//! The agent's main loop: bring the datapath up from the config, start the
//! TLS SIP proxy when the config has a `[proxy]` section (its media layer
//! writes pinholes through its own handle on the pinned maps), service the
//! datapath (resolve next hops the datapath met unresolved) until `shutdown`
//! resolves, then stop the proxy and keep or remove the datapath as
//! configured.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::{info, warn};

use crate::{
    config::{Config, OnExit},
    datapath::{
        attach::{AttachError, Datapath},
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

/// Run the agent until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
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
            Some(running)
        }
        None => {
            info!("no [proxy] section: datapath only, no SIP listeners");
            None
        }
    };
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(NEIGH_POLL);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
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
