//! Command-line interface: argument definitions (clap) and the `pinhole` and
//! `stats` commands, which open the pinned maps of a running (or kept)
//! datapath and print human or JSON output, and `registrations`, a client
//! of the running agent's control socket (`crate::control`).

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::{
    config::DEFAULT_PIN_DIR,
    datapath::{
        maps::{DatapathMaps, MapsError, PinholeEntry, ReasonCount},
        rules::{Flow, LearnPort, Proto},
    },
};

/// sip-edge: TLS SIP edge agent with an XDP pinhole datapath.
#[derive(Debug, Parser)]
#[command(name = "sip-edge", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "sip_edge=debug".
    #[arg(long, global = true, default_value = "info", env = "SIP_EDGE_LOG")]
    pub log: String,
    /// Log line format: human (default) or json; overrides `[log] format`.
    #[arg(long, global = true, value_enum, env = "SIP_EDGE_LOG_FORMAT")]
    pub log_format: Option<crate::logging::LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the config file as check-config does (exit 64 on any error,
    /// before anything is loaded or attached), then load, attach and pin
    /// the datapath and run until SIGINT/SIGTERM. Re-adopts a datapath an
    /// earlier run left pinned.
    Run {
        /// TOML configuration file (see sip-edge.example.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file as `run` would, without attaching
    /// anything: key rules, interfaces, pin_dir, addresses, TLS files.
    /// Exit 0 valid (warnings printed), 64 invalid.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Skip what depends on this machine (interfaces, bpffs, local
        /// addresses, certificate/key/CA files): for checking a file on
        /// another machine than the edge.
        #[arg(long, conflicts_with = "host")]
        no_host_checks: bool,
        /// Also check the host's settings, as `sip-edge doctor` does.
        #[arg(long)]
        host: bool,
    },
    /// Check the host the edge runs on (IP forwarding, rp_filter, XDP
    /// support of the NIC drivers, reserved media ports across reboots,
    /// the firewall letting the signalling ports in) and say what to
    /// change. Changes nothing. Exit 0 when nothing fails, 1 otherwise.
    Doctor {
        /// TOML configuration file of the edge.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Add, delete or list pinholes in the running datapath's maps.
    Pinhole {
        /// What to do with pinholes.
        #[command(subcommand)]
        action: PinholeAction,
    },
    /// Show per-reason packet counters of the running datapath.
    Stats(PinOpts),
    /// List the registrations the running agent holds (remote users
    /// registered through the edge, inside clients registered outside):
    /// AOR, source, flow, expiry. Asks the agent's control socket.
    Registrations(ControlOpts),
    /// The running agent's state: version, uptime, config, listeners,
    /// datapath, calls, pinholes, registrations, admission. Asks the
    /// agent's control socket.
    Status(ControlOpts),
    /// The calls the running agent tracks: Call-ID, parties, age, and
    /// each call's pinholes with packets, bytes and last activity.
    Calls(ControlOpts),
    /// The pinholes the running agent installed, with their calls; when
    /// no agent answers, the rules in the pinned maps (says which).
    Pinholes(crate::status::PinholesOpts),
    /// Ask the running agent to re-read its config file (as SIGHUP does):
    /// checked in full first (a bad file changes nothing and the answer
    /// says why), then what can change live is applied; prints each
    /// changed key and whether it was applied or needs a restart. Exit 1
    /// when the agent refused the file.
    Reload(ControlOpts),
    /// Show the HA node's role, store health and replication lag
    /// (`[ha]`). Asks the agent's control socket.
    HaStatus(ControlOpts),
}

/// Where the running agent's control socket is, and output format.
#[derive(Debug, Args, Clone)]
pub struct ControlOpts {
    /// The agent's control socket (`[control] socket`).
    #[arg(long, default_value = crate::control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `sip-edge registrations`: the agent's answer, as a table or as JSON
/// (`{"registrations": [...]}`, fields in `crate::control`).
pub fn registrations(opts: &ControlOpts) -> Result<String, crate::control::ControlError> {
    use crate::control::{query, registrations_table, ControlError, Query, RegistrationEntry};
    let fields = query(&opts.socket, Query::Registrations)?;
    let value = fields
        .get("registrations")
        .cloned()
        .unwrap_or(serde_json::Value::Array(Vec::new()));
    let list: Vec<RegistrationEntry> =
        serde_json::from_value(value).map_err(|e| ControlError::BadAnswer {
            reason: e.to_string(),
        })?;
    if opts.json {
        let v = serde_json::json!({ "registrations": list });
        let text = serde_json::to_string_pretty(&v).map_err(|e| ControlError::BadAnswer {
            reason: e.to_string(),
        })?;
        return Ok(text + "\n");
    }
    Ok(registrations_table(&list))
}

/// `sip-edge reload`: the agent's answer, as text or JSON.
pub fn reload(opts: &ControlOpts) -> Result<String, crate::control::ControlError> {
    use crate::control::{query, ControlError, Query};
    let fields = query(&opts.socket, Query::Reload)?;
    let bad = |e: serde_json::Error| ControlError::BadAnswer {
        reason: e.to_string(),
    };
    if opts.json {
        return Ok(serde_json::to_string_pretty(&fields).map_err(bad)? + "\n");
    }
    let changes: Vec<crate::service::diff::Change> =
        serde_json::from_value(fields.get("changes").cloned().unwrap_or_default()).map_err(bad)?;
    let outcome = crate::service::reload::Outcome {
        ok: true,
        error: None,
        changes,
        warnings: serde_json::from_value(fields.get("warnings").cloned().unwrap_or_default())
            .unwrap_or_default(),
        certificate: fields
            .get("certificate")
            .and_then(|c| c.as_str())
            .map(str::to_owned),
    };
    Ok(outcome.render())
}

/// `sip-edge ha-status`: the agent's HA state as text or as JSON
/// (`{"ha": {...}}`, fields in `crate::ha::Status::json`).
pub fn ha_status(opts: &ControlOpts) -> Result<String, crate::control::ControlError> {
    use crate::control::{query, ControlError, Query};
    let fields = query(&opts.socket, Query::Ha)?;
    let v = fields.get("ha").cloned().unwrap_or(serde_json::Value::Null);
    if opts.json {
        let text = serde_json::to_string_pretty(&serde_json::json!({ "ha": v })).map_err(|e| {
            ControlError::BadAnswer {
                reason: e.to_string(),
            }
        })?;
        return Ok(text + "\n");
    }
    Ok(crate::ha::status_text(&v))
}

/// Where the pinned maps live, and output format.
#[derive(Debug, Args, Clone)]
pub struct PinOpts {
    /// Pin directory of the datapath (the config's pin_dir).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `sip-edge pinhole ...`.
#[derive(Debug, Subcommand)]
pub enum PinholeAction {
    /// Add the two rules of one media flow; prints their slots.
    Add {
        /// The flow.
        #[command(subcommand)]
        flow: FlowArgs,
    },
    /// Delete a rule by slot (and, unless --single, its opposite direction).
    Del {
        /// Slot as shown by `pinhole list`.
        slot: u32,
        /// Delete only this direction, keep the pair.
        #[arg(long)]
        single: bool,
        /// Pin dir and output format.
        #[command(flatten)]
        opts: PinOpts,
    },
    /// List installed rules with their counters.
    List(PinOpts),
}

/// What every flow has: both ends, transport, remote-learning options.
#[derive(Debug, Args)]
pub struct FlowEnds {
    /// Transport.
    #[arg(long, value_enum, default_value = "udp")]
    pub proto: Proto,
    /// The client's media address:port (inside).
    #[arg(long)]
    pub client: SocketAddr,
    /// Edge public address:port the peer sends to (a media port).
    #[arg(long)]
    pub public: SocketAddr,
    /// The peer's media address:port (outside).
    #[arg(long)]
    pub peer: SocketAddr,
    /// Learn the peer's real source from its first packet (once).
    #[arg(long)]
    pub latch: bool,
    /// TCP: which end connects from a port signalling did not name; its
    /// address stays strict, its port is learned from the first packet.
    #[arg(long, value_enum, default_value = "neither")]
    pub learn_port: LearnPort,
    /// Pin dir and output format.
    #[command(flatten)]
    pub opts: PinOpts,
}

/// A flow to add.
#[derive(Debug, Subcommand)]
pub enum FlowArgs {
    /// Relay: both legs anchored at the edge. Inside, the client talks to
    /// --edge-int; outside, the peer talks to --public.
    Relay {
        /// Edge internal address:port the client sends to (a media port).
        #[arg(long)]
        edge_int: SocketAddr,
        /// Ends and options.
        #[command(flatten)]
        ends: FlowEnds,
    },
    /// NAT: the edge is the client's gateway; inbound to --public is DNATed
    /// to --client, the client's packets to --peer are SNATed to --public.
    Nat {
        /// Ends and options.
        #[command(flatten)]
        ends: FlowEnds,
    },
}

impl FlowArgs {
    /// The flow and the pin options.
    pub fn split(&self) -> (Flow, &PinOpts) {
        match self {
            FlowArgs::Relay { edge_int, ends: e } => (
                Flow::Relay {
                    proto: e.proto,
                    client: e.client,
                    edge_int: *edge_int,
                    public: e.public,
                    peer: e.peer,
                    latch_peer: e.latch,
                    learn_port: e.learn_port,
                },
                &e.opts,
            ),
            FlowArgs::Nat { ends: e } => (
                Flow::Nat {
                    proto: e.proto,
                    client: e.client,
                    public: e.public,
                    peer: e.peer,
                    latch_peer: e.latch,
                    learn_port: e.learn_port,
                },
                &e.opts,
            ),
        }
    }
}

#[derive(Serialize)]
struct Added {
    inbound_slot: u32,
    outbound_slot: u32,
}

/// Run a `pinhole` action; returns what to print.
pub fn pinhole(action: &PinholeAction) -> Result<String, MapsError> {
    match action {
        PinholeAction::Add { flow } => {
            let (flow, opts) = flow.split();
            let mut maps = DatapathMaps::from_pins(&opts.pin_dir)?;
            let (inbound_slot, outbound_slot) = maps.add_flow(&flow)?;
            Ok(if opts.json {
                json(&Added {
                    inbound_slot,
                    outbound_slot,
                })
            } else {
                format!("added: inbound slot {inbound_slot}, outbound slot {outbound_slot}\n")
            })
        }
        PinholeAction::Del { slot, single, opts } => {
            let mut maps = DatapathMaps::from_pins(&opts.pin_dir)?;
            let removed = maps.delete_slot(*slot, !single)?;
            Ok(if opts.json {
                json(&removed)
            } else {
                format!("deleted slots {removed:?}\n")
            })
        }
        PinholeAction::List(opts) => {
            let maps = DatapathMaps::from_pins(&opts.pin_dir)?;
            let list = maps.list()?;
            Ok(if opts.json { json(&list) } else { table(&list) })
        }
    }
}

/// Run `stats`; returns what to print.
pub fn stats(opts: &PinOpts) -> Result<String, MapsError> {
    let maps = DatapathMaps::from_pins(&opts.pin_dir)?;
    let reasons = maps.reasons()?;
    let pinholes = maps.list()?.len();
    #[derive(Serialize)]
    struct Stats<'a> {
        pinholes: usize,
        capacity: u32,
        reasons: &'a [ReasonCount],
    }
    Ok(if opts.json {
        json(&Stats {
            pinholes,
            capacity: maps.capacity(),
            reasons: &reasons,
        })
    } else {
        let mut s = format!("pinholes: {pinholes}/{}\n", maps.capacity());
        for r in &reasons {
            s.push_str(&format!("{:<22} {}\n", r.reason, r.packets));
        }
        s
    })
}

fn json<T: Serialize + ?Sized>(v: &T) -> String {
    // Serialising our own plain structs cannot fail; fall back to an error object anyway.
    let mut s =
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

fn table(list: &[PinholeEntry]) -> String {
    let mut s = format!(
        "{:>5} {:>5} {:<4} {:<8} {:<3} {:<28} {:<28} {:<28} {:<28} {:>10} {:>12}\n",
        "slot",
        "pair",
        "prot",
        "arrives",
        "on",
        "local",
        "remote",
        "new src",
        "new dst",
        "packets",
        "bytes"
    );
    for e in list {
        let remote = match &e.latched {
            Some(l) => format!("{} (latched {l})", e.remote),
            None => e.remote.clone(),
        };
        s.push_str(&format!(
            "{:>5} {:>5} {:<4} {:<8} {:<3} {:<28} {:<28} {:<28} {:<28} {:>10} {:>12}\n",
            e.slot,
            e.pair_slot,
            e.proto,
            e.role,
            e.match_on,
            e.local,
            remote,
            e.new_src.as_deref().unwrap_or("-"),
            e.new_dst.as_deref().unwrap_or("-"),
            e.packets,
            e.bytes
        ));
    }
    s
}
