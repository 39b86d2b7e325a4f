//! The agent's main loop: bring the datapath up from the config, service it
//! (resolve next hops the datapath met unresolved) until `shutdown`
//! resolves, then keep or remove it as configured.

use std::{future::Future, time::Duration};

use tracing::{info, warn};

use crate::{
    config::{Config, OnExit},
    datapath::{
        attach::{AttachError, Datapath},
        neigh,
    },
};

/// How often the agent looks for unresolved next hops.
const NEIGH_POLL: Duration = Duration::from_millis(50);

/// Run the agent until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), AttachError> {
    let mut dp = Datapath::start(&cfg)?;
    info!(pin_dir = %cfg.pin_dir.display(), adopted = ?dp.adopted, "datapath up");
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
