//! Status queries of the running agent: `sip-edge status`, `sip-edge
//! calls` and `sip-edge pinholes`, answered over the control socket
//! (`crate::control`, queries `status`, `calls`, `pinholes`) in the shape
//! `registrations` set: the CLI sends the query, the agent answers JSON,
//! the CLI prints a table or, with `--json`, the JSON below.
//!
//! Who answers what: the agent part of `status` (version, uptime, config
//! path, listeners, datapath) is recorded here at start ([`set_config_path`],
//! [`agent_started`], [`listener`]); the proxy's driver answers the rest
//! (calls, pinholes, registrations, admission) from the state it owns
//! ([`answer`]). `sip-edge pinholes` falls back to reading the pinned maps
//! directly when no agent answers (as `sip-edge pinhole list` does) and
//! says which source answered.
//!
//! JSON (every field documented on its struct below):
//! - `status`: [`StatusReport`].
//! - `calls`: `{"calls": [CALL, ...]}`, `CALL` a [`CallEntry`] with its
//!   `pinholes`: [`PinholeStatus`].
//! - `pinholes`: `{"source": "agent", "pinholes": [PINHOLE, ...]}` with
//!   `PINHOLE` a [`PinholeStatus`], or, from the fallback, `{"source":
//!   "maps", "pinholes": [RULE, ...]}` with `RULE` one installed rule as
//!   `sip-edge pinhole list --json` prints it (`datapath::maps::PinholeEntry`).
//!
//! Data flow: CLI → control socket → [`dispatch`] → (driver → [`answer`])
//! → JSON → CLI → table or JSON.

use std::{
    path::PathBuf,
    sync::{Mutex, OnceLock},
    time::Instant,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::{
    config::Config,
    control::{ControlError, Query, Request},
    datapath::rules::Flow,
    media::{control::FlowCounters, DialogKey},
    proxy::Proxy,
};

/// JSON fields of one answer.
pub type Fields = serde_json::Map<String, serde_json::Value>;

/// `sip-edge status --json`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct StatusReport {
    /// The agent's version (`sip-edge --version`).
    pub version: String,
    /// Process id of the agent.
    pub pid: u32,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// The configuration file it runs on (absolute when given so).
    pub config: String,
    /// What the agent listens on: SIP listeners, metrics, control socket.
    pub listeners: Vec<ListenerStatus>,
    /// The XDP datapath.
    pub datapath: DatapathStatus,
    /// INVITE dialogs the proxy tracks (0 without `[proxy]`).
    pub calls_active: u64,
    /// Pinhole rules the agent installed (two per media flow).
    pub pinholes_in_use: u64,
    /// Pinhole rules the table holds (`[limits] max_pinholes`).
    pub pinholes_capacity: u64,
    /// Registrations the proxy holds (see `sip-edge registrations`).
    pub registrations: u64,
    /// Admission control (`[limits]` rates and blocks) since start.
    pub admission: AdmissionStatus,
    /// The HA node (`[ha]`; absent without it): the fields of
    /// `sip-edge ha-status --json` (node, role, store, store_up, lag_ms...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<serde_json::Value>,
}

/// One thing the agent listens on.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ListenerStatus {
    /// `"internal TLS"`, `"external TLS"`, `"internal TCP"`,
    /// `"internal UDP"`, `"metrics"`, `"control"`.
    pub name: String,
    /// `ip:port`, or the socket path for `control`.
    pub addr: String,
}

/// The datapath as the agent runs it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct DatapathStatus {
    /// XDP attach mode: `"native"` or `"skb"`.
    pub xdp_mode: String,
    /// Media mode: `"relay"` or `"nat"`.
    pub media_mode: String,
    /// Where maps and links are pinned.
    pub pin_dir: String,
    /// Whether the agent took over a datapath an earlier run left pinned.
    pub adopted: bool,
    /// The attached interfaces.
    pub interfaces: Vec<InterfaceStatus>,
}

/// One attached interface.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct InterfaceStatus {
    /// Kernel name.
    pub name: String,
    /// `"internal"` or `"external"`.
    pub role: String,
}

/// Admission control counters.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct AdmissionStatus {
    /// Requests admitted.
    pub admitted: u64,
    /// Requests refused, by rule (the `[limits]` key behind it).
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Blocks started after failed registrations.
    pub blocks: u64,
}

/// One call in `sip-edge calls --json`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct CallEntry {
    /// Call-ID of the dialog.
    pub call_id: String,
    /// From tag of its initial INVITE (with the Call-ID, the dialog key).
    pub from_tag: String,
    /// From URI of the initial INVITE (the caller).
    pub caller: String,
    /// To URI of the initial INVITE (the callee).
    pub callee: String,
    /// Side the caller is on: `"internal"` or `"external"`.
    pub caller_side: String,
    /// `"early"` (no 2xx yet) or `"confirmed"`.
    pub state: String,
    /// Seconds since the initial INVITE.
    pub age_secs: u64,
    /// The call's pinholes (media streams and file transfers).
    pub pinholes: Vec<PinholeStatus>,
}

/// One media flow (two datapath rules, one per direction).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct PinholeStatus {
    /// The agent's id of the flow (stable for its life).
    pub id: u64,
    /// Call-ID of the dialog it belongs to.
    pub call_id: String,
    /// From tag of that dialog.
    pub from_tag: String,
    /// `"media"` (an SDP stream) or `"transfer"` (an x-msmsgsinvite file
    /// transfer).
    pub kind: String,
    /// `"udp"` or `"tcp"`.
    pub proto: String,
    /// `"relay"` or `"nat"`.
    pub mode: String,
    /// The inside party's media address (`ip:port`).
    pub client: String,
    /// Relay: the edge's inside address the client sends to; nat: none.
    pub edge_internal: Option<String>,
    /// The edge's public address the outside party sends to.
    pub public: String,
    /// The outside party's media address as signalled.
    pub peer: String,
    /// Rule slots (inbound, outbound), as `sip-edge pinhole list` shows.
    pub slots: [u32; 2],
    /// Packets forwarded, both directions.
    pub packets: u64,
    /// Bytes forwarded (frames as received), both directions.
    pub bytes: u64,
    /// Seconds since the last packet either way; none: never used.
    pub last_seen_secs: Option<f64>,
}

/// CLOCK_MONOTONIC now, in ns (the datapath's `last_seen_ns` clock).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

impl PinholeStatus {
    /// From the media layer's view of one flow.
    pub fn new(id: u64, d: &DialogKey, kind: &str, flow: &Flow, c: &FlowCounters) -> Self {
        let (mode, client, edge_internal, public, peer) = match flow {
            Flow::Relay {
                client,
                edge_int,
                public,
                peer,
                ..
            } => ("relay", client, Some(edge_int.to_string()), public, peer),
            Flow::Nat {
                client,
                public,
                peer,
                ..
            } => ("nat", client, None, public, peer),
        };
        let last_seen_secs = (c.last_seen_ns != 0).then(|| {
            let ago = monotonic_ns().saturating_sub(c.last_seen_ns);
            // Millisecond precision is plenty for a human or a check.
            (ago / 1_000_000) as f64 / 1000.0
        });
        PinholeStatus {
            id,
            call_id: d.call_id.to_string(),
            from_tag: d.from_tag.to_string(),
            kind: kind.to_owned(),
            proto: format!("{:?}", flow.proto()).to_ascii_lowercase(),
            mode: mode.to_owned(),
            client: client.to_string(),
            edge_internal,
            public: public.to_string(),
            peer: peer.to_string(),
            slots: [c.slots.0, c.slots.1],
            packets: c.packets,
            bytes: c.bytes,
            last_seen_secs,
        }
    }
}

/// What the agent records about itself for `status`.
#[derive(Clone, Debug)]
struct AgentInfo {
    started: Instant,
    datapath: DatapathStatus,
    listeners: Vec<ListenerStatus>,
    capacity: u64,
}

static CONFIG_PATH: OnceLock<PathBuf> = OnceLock::new();
static AGENT: Mutex<Option<AgentInfo>> = Mutex::new(None);

/// The config file `run` was given (main.rs), for `status`.
pub fn set_config_path(path: &std::path::Path) {
    let p = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let _ = CONFIG_PATH.set(p);
}

/// The agent is up on `cfg` (agent.rs, after the datapath).
pub fn agent_started(cfg: &Config, adopted: bool) {
    let info = AgentInfo {
        started: Instant::now(),
        datapath: DatapathStatus {
            xdp_mode: format!("{:?}", cfg.xdp.mode).to_ascii_lowercase(),
            media_mode: format!("{:?}", cfg.media.mode).to_ascii_lowercase(),
            pin_dir: cfg.pin_dir.display().to_string(),
            adopted,
            interfaces: cfg
                .interfaces
                .iter()
                .map(|i| InterfaceStatus {
                    name: i.name.clone(),
                    role: format!("{:?}", i.role).to_ascii_lowercase(),
                })
                .collect(),
        },
        // Whoever reads this asked over the control socket: it is up.
        listeners: cfg
            .control
            .enabled
            .then(|| ListenerStatus {
                name: "control".into(),
                addr: cfg.control.socket.display().to_string(),
            })
            .into_iter()
            .collect(),
        capacity: u64::from(cfg.limits.max_pinholes),
    };
    crate::metrics::pinholes_capacity(cfg.limits.max_pinholes);
    if let Ok(mut g) = AGENT.lock() {
        *g = Some(info);
    }
}

/// The agent listens on `addr` (a socket address or a path) for `name`.
pub fn listener(name: &str, addr: impl std::fmt::Display) {
    if let Ok(mut g) = AGENT.lock() {
        if let Some(a) = g.as_mut() {
            a.listeners.push(ListenerStatus {
                name: name.to_owned(),
                addr: addr.to_string(),
            });
        }
    }
}

/// The SIP listeners are bound (agent.rs).
pub fn transport_up(r: &crate::transport::Running) {
    listener("internal TLS", r.internal);
    listener("external TLS", r.external);
    if let Some(a) = r.internal_tcp {
        listener("internal TCP", a);
    }
    if let Some(a) = r.internal_udp {
        listener("internal UDP", a);
    }
}

/// The agent's own part of `status`.
fn agent_part() -> StatusReport {
    let info = AGENT.lock().ok().and_then(|g| g.clone());
    StatusReport {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        uptime_secs: info.as_ref().map_or(0, |i| i.started.elapsed().as_secs()),
        config: CONFIG_PATH
            .get()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        listeners: info
            .as_ref()
            .map(|i| i.listeners.clone())
            .unwrap_or_default(),
        pinholes_capacity: info.as_ref().map_or(0, |i| i.capacity),
        datapath: info.map(|i| i.datapath).unwrap_or_default(),
        ha: crate::ha::current().map(|h| h.json()),
        ..StatusReport::default()
    }
}

fn fields(key: &str, v: impl Serialize) -> Result<Fields, String> {
    let v = serde_json::to_value(v).map_err(|e| e.to_string())?;
    let mut m = Fields::new();
    m.insert(key.to_owned(), v);
    Ok(m)
}

/// The driver's answer to a status query (transport's driver task, which
/// owns `proxy`).
pub fn answer(proxy: &mut Proxy, query: Query, now: Instant) -> Result<Fields, String> {
    match query {
        // The agent's own (`crate::agent`); never forwarded here.
        Query::Reload => Err("reload is answered by the agent".into()),
        Query::Ha => crate::ha::status_fields(),
        Query::Calls => fields("calls", proxy.calls(now)),
        Query::Pinholes => {
            let mut m = fields("pinholes", proxy.media_pinholes())?;
            m.insert("source".into(), "agent".into());
            Ok(m)
        }
        Query::Status => {
            let a = proxy.admission_stats();
            let rules = [
                "limits.request_rate",
                "limits.invite_rate",
                "limits.register_rate",
                "limits.global_request_rate",
                "limits.register_failures_per_source",
                "limits.register_failures_per_aor",
            ];
            let admission = AdmissionStatus {
                admitted: a.admitted,
                refused: rules
                    .iter()
                    .zip(a.refused)
                    .map(|(k, n)| ((*k).to_owned(), n))
                    .collect(),
                blocks: a.blocks,
            };
            let mut m = fields("admission", admission)?;
            m.insert("calls_active".into(), proxy.live().2.into());
            m.insert(
                "pinholes_in_use".into(),
                (proxy.media_pinholes().len() * 2).into(),
            );
            m.insert(
                "registrations".into(),
                proxy.registrations(now).len().into(),
            );
            Ok(m)
        }
        Query::Registrations => Err("not a status query".into()),
    }
}

/// The agent's answer to a status query (control socket task): its own
/// part, completed by the proxy's driver when a proxy runs.
pub async fn dispatch(
    query: Query,
    proxy: Option<mpsc::Sender<Request>>,
) -> Result<Fields, String> {
    let from_proxy = match proxy {
        Some(p) => {
            let (tx, rx) = oneshot::channel();
            p.send(Request { query, reply: tx })
                .await
                .map_err(|_| "the SIP proxy has stopped".to_owned())?;
            rx.await
                .map_err(|_| "the SIP proxy did not answer".to_owned())??
        }
        None => match query {
            Query::Calls => fields("calls", Vec::<CallEntry>::new())?,
            Query::Pinholes => {
                let mut m = fields("pinholes", Vec::<PinholeStatus>::new())?;
                m.insert("source".into(), "agent".into());
                m
            }
            _ => Fields::new(),
        },
    };
    match query {
        Query::Status => {
            let base = serde_json::to_value(agent_part()).map_err(|e| e.to_string())?;
            let serde_json::Value::Object(mut m) = base else {
                return Err("status is not an object".into());
            };
            m.extend(from_proxy);
            Ok(m)
        }
        _ => Ok(from_proxy),
    }
}

/// Where the running agent's control socket is (and, for `pinholes`, the
/// pin dir of the fallback), and output format.
#[derive(Debug, clap::Args, Clone)]
pub struct PinholesOpts {
    /// The agent's control socket and output format.
    #[command(flatten)]
    pub control: crate::cli::ControlOpts,
    /// Pin directory read directly when no agent answers.
    #[arg(long, default_value = crate::config::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Errors of the status commands.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The agent could not be asked, or refused.
    #[error(transparent)]
    Control {
        /// The control error.
        #[from]
        source: ControlError,
    },
    /// Neither the agent nor the pinned maps answered.
    #[error("{control}; reading the pinned maps directly failed too: {maps}")]
    NoSource {
        /// Why the agent did not answer.
        control: String,
        /// Why the maps could not be read (boxed: a large error).
        maps: Box<crate::datapath::maps::MapsError>,
    },
}

fn bad(e: impl std::fmt::Display) -> ControlError {
    ControlError::BadAnswer {
        reason: e.to_string(),
    }
}

fn pretty(v: &impl Serialize) -> Result<String, ControlError> {
    Ok(serde_json::to_string_pretty(v).map_err(bad)? + "\n")
}

/// `sip-edge status`.
pub fn status(opts: &crate::cli::ControlOpts) -> Result<String, StatusError> {
    let fields = crate::control::query(&opts.socket, Query::Status)?;
    let r: StatusReport = serde_json::from_value(serde_json::Value::Object(fields)).map_err(bad)?;
    if opts.json {
        return Ok(pretty(&r)?);
    }
    Ok(status_text(&r))
}

/// The human form of `status`.
pub fn status_text(r: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "sip-edge {} (pid {}), up {}",
        r.version,
        r.pid,
        duration(r.uptime_secs)
    );
    let _ = writeln!(s, "config:         {}", r.config);
    for l in &r.listeners {
        let _ = writeln!(s, "listener:       {:<14} {}", l.name, l.addr);
    }
    let d = &r.datapath;
    let ifaces: Vec<String> = d
        .interfaces
        .iter()
        .map(|i| format!("{} ({})", i.name, i.role))
        .collect();
    let _ = writeln!(
        s,
        "datapath:       xdp {} on {}, media {}, pins {}{}",
        d.xdp_mode,
        ifaces.join(", "),
        d.media_mode,
        d.pin_dir,
        if d.adopted { " (adopted)" } else { "" }
    );
    let _ = writeln!(s, "calls active:   {}", r.calls_active);
    let _ = writeln!(
        s,
        "pinholes:       {}/{}",
        r.pinholes_in_use, r.pinholes_capacity
    );
    let _ = writeln!(s, "registrations:  {}", r.registrations);
    let refused: u64 = r.admission.refused.values().sum();
    let _ = write!(
        s,
        "admission:      {} admitted, {} refused",
        r.admission.admitted, refused
    );
    let by: Vec<String> = r
        .admission
        .refused
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if !by.is_empty() {
        let _ = write!(s, " ({})", by.join(", "));
    }
    let _ = writeln!(s, ", {} blocks", r.admission.blocks);
    if let Some(h) = &r.ha {
        let f = |k: &str| match &h[k] {
            serde_json::Value::String(v) => v.clone(),
            serde_json::Value::Null => "-".to_owned(),
            v => v.to_string(),
        };
        let _ = writeln!(
            s,
            "ha:             node {}, role {}, store {} ({}), lag {} ms",
            f("node"),
            f("role"),
            f("store"),
            if h["store_up"] == true { "up" } else { "DOWN" },
            f("lag_ms")
        );
    }
    s
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `sip-edge calls`.
pub fn calls(opts: &crate::cli::ControlOpts) -> Result<String, StatusError> {
    let fields = crate::control::query(&opts.socket, Query::Calls)?;
    let list: Vec<CallEntry> =
        serde_json::from_value(fields.get("calls").cloned().unwrap_or_default()).map_err(bad)?;
    if opts.json {
        return Ok(pretty(&serde_json::json!({ "calls": list }))?);
    }
    Ok(calls_table(&list))
}

fn last_seen(p: &PinholeStatus) -> String {
    p.last_seen_secs
        .map_or_else(|| "never".to_owned(), |s| format!("{s:.1}s ago"))
}

/// The human form of `calls`: one line per call, one indented line per
/// pinhole.
pub fn calls_table(list: &[CallEntry]) -> String {
    use std::fmt::Write as _;
    if list.is_empty() {
        return "no calls\n".into();
    }
    let mut s = format!(
        "{:<36} {:<28} {:<28} {:<9} {:>8}\n",
        "CALL-ID", "CALLER", "CALLEE", "STATE", "AGE"
    );
    for c in list {
        let _ = writeln!(
            s,
            "{:<36} {:<28} {:<28} {:<9} {:>8}",
            c.call_id,
            c.caller,
            c.callee,
            c.state,
            duration(c.age_secs)
        );
        for p in &c.pinholes {
            let _ = writeln!(
                s,
                "  {} {} {} <-> {} <-> {}  {} pkts {} bytes, last {}",
                p.proto,
                p.kind,
                p.client,
                p.public,
                p.peer,
                p.packets,
                p.bytes,
                last_seen(p)
            );
        }
    }
    s
}

/// `sip-edge pinholes`: from the agent, else from the pinned maps.
pub fn pinholes(opts: &PinholesOpts) -> Result<String, StatusError> {
    let json = opts.control.json;
    match crate::control::query(&opts.control.socket, Query::Pinholes) {
        Ok(fields) => {
            let list: Vec<PinholeStatus> =
                serde_json::from_value(fields.get("pinholes").cloned().unwrap_or_default())
                    .map_err(bad)?;
            if json {
                return Ok(pretty(
                    &serde_json::json!({"source": "agent", "pinholes": list}),
                )?);
            }
            Ok(pinholes_table(&list))
        }
        // Only "nobody answers there" falls back; an agent that answers
        // with an error is reported as such.
        Err(control @ ControlError::Connect { .. }) => {
            let rules = crate::datapath::maps::DatapathMaps::from_pins(&opts.pin_dir)
                .and_then(|m| m.list())
                .map_err(|maps| StatusError::NoSource {
                    control: control.to_string(),
                    maps: Box::new(maps),
                })?;
            if json {
                return Ok(pretty(
                    &serde_json::json!({"source": "maps", "pinholes": rules}),
                )?);
            }
            let mut s = format!(
                "source: pinned maps under {} (no agent answered at {}; rules without their calls)\n",
                opts.pin_dir.display(),
                opts.control.socket.display()
            );
            for e in &rules {
                s.push_str(&format!(
                    "slot {:>5} pair {:>5} {} {} {} local {} remote {} {} pkts {} bytes\n",
                    e.slot,
                    e.pair_slot,
                    e.proto,
                    e.role,
                    e.match_on,
                    e.local,
                    e.remote,
                    e.packets,
                    e.bytes
                ));
            }
            if rules.is_empty() {
                s.push_str("no pinholes\n");
            }
            Ok(s)
        }
        Err(e) => Err(e.into()),
    }
}

/// The human form of `pinholes` from the agent.
pub fn pinholes_table(list: &[PinholeStatus]) -> String {
    use std::fmt::Write as _;
    let mut s = "source: agent\n".to_owned();
    if list.is_empty() {
        s.push_str("no pinholes\n");
        return s;
    }
    let _ = writeln!(
        s,
        "{:>5} {:<4} {:<5} {:<22} {:<22} {:<22} {:>8} {:>10} {:>10}  CALL-ID",
        "ID", "PROT", "MODE", "CLIENT", "PUBLIC", "PEER", "PACKETS", "BYTES", "LAST"
    );
    for p in list {
        let _ = writeln!(
            s,
            "{:>5} {:<4} {:<5} {:<22} {:<22} {:<22} {:>8} {:>10} {:>10}  {}",
            p.id,
            p.proto,
            p.mode,
            p.client,
            p.public,
            p.peer,
            p.packets,
            p.bytes,
            last_seen(p),
            p.call_id
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::rules::{LearnPort, Proto};

    fn pinhole() -> PinholeStatus {
        let flow = Flow::Relay {
            proto: Proto::Udp,
            client: "10.77.0.2:4000".parse().expect("addr"),
            edge_int: "10.77.0.1:40002".parse().expect("addr"),
            public: "203.0.113.1:40000".parse().expect("addr"),
            peer: "198.51.100.2:5000".parse().expect("addr"),
            latch_peer: false,
            learn_port: LearnPort::Neither,
        };
        let d = DialogKey {
            call_id: "c1@x".into(),
            from_tag: "f1".into(),
        };
        let c = FlowCounters {
            packets: 10,
            bytes: 1720,
            last_seen_ns: 0,
            slots: (3, 4),
        };
        PinholeStatus::new(7, &d, "media", &flow, &c)
    }

    #[test]
    fn a_flow_becomes_its_documented_fields() {
        let p = pinhole();
        let v = serde_json::to_value(&p).expect("json");
        for key in [
            "id",
            "call_id",
            "from_tag",
            "kind",
            "proto",
            "mode",
            "client",
            "edge_internal",
            "public",
            "peer",
            "slots",
            "packets",
            "bytes",
            "last_seen_secs",
        ] {
            assert!(v.get(key).is_some(), "{key} missing: {v}");
        }
        assert_eq!(v["proto"], "udp");
        assert_eq!(v["mode"], "relay");
        assert_eq!(v["edge_internal"], "10.77.0.1:40002");
        assert_eq!(v["slots"], serde_json::json!([3, 4]));
        assert!(v["last_seen_secs"].is_null(), "never used: null, not 0");
        let back: PinholeStatus = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, p);
    }

    #[test]
    fn tables_show_the_calls_and_their_pinholes() {
        let call = CallEntry {
            call_id: "c1@x".into(),
            from_tag: "f1".into(),
            caller: "sips:alice@example.com".into(),
            callee: "sips:bob@example.net".into(),
            caller_side: "internal".into(),
            state: "confirmed".into(),
            age_secs: 75,
            pinholes: vec![pinhole()],
        };
        let t = calls_table(std::slice::from_ref(&call));
        assert!(
            t.contains("c1@x") && t.contains("sips:alice@example.com") && t.contains("1m15s"),
            "{t}"
        );
        assert!(t.contains("10 pkts 1720 bytes, last never"), "{t}");
        assert_eq!(calls_table(&[]), "no calls\n");
        let p = pinholes_table(&call.pinholes);
        assert!(
            p.starts_with("source: agent\n") && p.contains("203.0.113.1:40000"),
            "{p}"
        );
        let r = StatusReport {
            version: "0.1.0".into(),
            calls_active: 1,
            pinholes_in_use: 2,
            pinholes_capacity: 65536,
            ..StatusReport::default()
        };
        let s = status_text(&r);
        assert!(
            s.contains("pinholes:       2/65536") && s.contains("calls active:   1"),
            "{s}"
        );
    }

    /// With `[ha]`, the status names the node's role, the store's health
    /// and the lag (issue #11); without it there is no `ha` field at all.
    #[test]
    fn the_ha_node_shows_in_status() {
        let plain = StatusReport::default();
        let v = serde_json::to_value(&plain).expect("json");
        assert!(v.get("ha").is_none(), "{v}");
        assert!(!status_text(&plain).contains("ha:"));
        let r = StatusReport {
            ha: Some(serde_json::json!({
                "node": "edge-b", "role": "standby", "store": "redis://10.77.9.1:6379/0",
                "store_up": false, "lag_ms": 120
            })),
            ..StatusReport::default()
        };
        let s = status_text(&r);
        assert!(
            s.contains("ha:             node edge-b, role standby, store redis://10.77.9.1:6379/0 (DOWN), lag 120 ms"),
            "{s}"
        );
        let back: StatusReport =
            serde_json::from_value(serde_json::to_value(&r).expect("json")).expect("parse");
        assert_eq!(back, r);
    }
}
