//! The agent's control socket: a Unix stream socket (`[control] socket`,
//! default `/run/sip-edge/control.sock`) whose file permissions are the
//! access control (`[control] mode`, default 0660: root and the socket's
//! group; never anything for others). One JSON request per connection, one
//! JSON response, then the agent closes it. Status commands of the CLI
//! (`sip-edge registrations`) are its clients; new queries are new
//! [`Query`] variants, answered by whoever owns the state (the proxy driver
//! for `registrations`).
//!
//! Wire format (one line each way, UTF-8 JSON):
//!
//! - request: `{"query": "registrations"}`
//! - response: `{"ok": true, "registrations": [REGISTRATION, ...]}` or
//!   `{"ok": false, "error": "why"}`
//!
//! `REGISTRATION` ([`RegistrationEntry`]) is one binding the edge holds:
//! `aor` (`user@domain`, lower-cased), `side` (`"outside"`: a remote user
//! registered through the edge; `"inside"`: an inside client registered
//! with an outside registrar), `source` (the client's signalling address as
//! the edge sees it, `ip:port`, after any NAT), `transport` (`"tls"`,
//! `"tcp"`, `"udp"`), `flow` (the edge's connection id of the flow it
//! registered on), `flow_state` (`"up"`, or `"failed"`: the connection
//! closed and requests for the binding get 430 until it expires),
//! `contact` (the client's own Contact URI), `edge_contact` (the URI the
//! registrar holds: the edge's address on the registrar's side with the
//! flow token), `expires_in_secs` (seconds left of the registrar's grant).
//!
//! `status`, `calls` and `pinholes` (`sip-edge status|calls|pinholes`)
//! are answered by `crate::status`, which documents their JSON.
//!
//! Data flow: CLI → socket → [`serve`] → [`Request`] on a channel → the
//! driver that owns the state → JSON → socket → CLI.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use crate::config::{invalid, ConfigError};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/sip-edge/control.sock";
/// Default socket mode: owner and group read/write.
pub const DEFAULT_MODE: &str = "0660";
/// Longest request line read.
const MAX_REQUEST: usize = 4096;
/// How long one client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// `[control]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// Serve the socket at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Socket path (absolute).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// File mode, octal (`"0660"`, `"0600"`); no bits for others.
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn yes() -> bool {
    true
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

fn default_mode() -> String {
    DEFAULT_MODE.to_owned()
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection {
            enabled: true,
            socket: default_socket(),
            mode: default_mode(),
        }
    }
}

impl ControlSection {
    /// The mode as bits (validated: octal, no bits for others).
    pub fn mode_bits(&self) -> Option<u32> {
        u32::from_str_radix(self.mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| m & !0o770 == 0)
    }

    /// Rules types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.socket.is_absolute() {
            return Err(invalid(
                "control.socket",
                format!("{} must be an absolute path", self.socket.display()),
            ));
        }
        if self.mode_bits().is_none() {
            return Err(invalid(
                "control.mode",
                format!(
                    "{:?} is not an octal mode without bits for others, e.g. \"0660\" or \"0600\"",
                    self.mode
                ),
            ));
        }
        Ok(())
    }
}

/// Errors of the control socket, both ends.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Creating the socket's directory, binding or setting its mode failed.
    #[error("control socket {path}: {op}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another live agent serves the socket already.
    #[error("control socket {path} is served by another running agent; set [control] socket to another path")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket: never removed.
    #[error("{path} exists and is not a socket; remove it or set [control] socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The client could not reach the agent.
    #[error("cannot reach the agent at {path}: {source}; is `sip-edge run` running, and may this user open the socket (mode {DEFAULT_MODE} by default)?")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not the JSON this module writes.
    #[error("bad answer from the agent: {reason}")]
    BadAnswer {
        /// What was wrong.
        reason: String,
    },
    /// The agent answered with an error.
    #[error("the agent refused the query: {reason}")]
    Refused {
        /// The agent's reason.
        reason: String,
    },
}

/// What a client asks.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Query {
    /// The registrations the proxy holds (see the module docs).
    Registrations,
    /// The agent's state (`crate::status::StatusReport`).
    Status,
    /// The calls the proxy tracks with their pinholes (`crate::status`).
    Calls,
    /// The pinholes the media layer installed (`crate::status`).
    Pinholes,
    /// Re-read, check and apply the config file (`crate::service::reload`);
    /// answered by the agent: `{"ok": true, "changes": [CHANGE, ...],
    /// "warnings": [...], "certificate": "..."}`, each CHANGE `{"key",
    /// "old", "new", "apply": "live" | "restart"}`, or `{"ok": false,
    /// "error": "why; nothing changed"}`.
    Reload,
    /// The HA node's role, store health and replication lag (`crate::ha`).
    Ha,
}

#[derive(Debug, Deserialize, Serialize)]
struct WireRequest {
    query: Query,
}

/// One query on its way to the state's owner, with where the answer goes.
#[derive(Debug)]
pub struct Request {
    /// The query.
    pub query: Query,
    /// The answer: the JSON fields to add to `{"ok": true}`, or why not.
    pub reply: oneshot::Sender<Result<serde_json::Map<String, serde_json::Value>, String>>,
}

/// One registration as `registrations` lists it (module docs).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// `user@domain`.
    pub aor: String,
    /// `"outside"` (remote user) or `"inside"`.
    pub side: String,
    /// The client's signalling address (`ip:port`).
    pub source: String,
    /// `"tls"`, `"tcp"` or `"udp"`.
    pub transport: String,
    /// The edge's connection id of the flow.
    pub flow: Option<u64>,
    /// `"up"` or `"failed"`.
    pub flow_state: String,
    /// The client's own Contact URI.
    pub contact: String,
    /// What the registrar holds: the edge's URI with the flow token.
    pub edge_contact: String,
    /// Seconds left of the registrar's grant.
    pub expires_in_secs: u64,
}

/// Binds the socket: creates its directory, refuses to take over a socket
/// another agent serves, removes a stale one, and binds under a temporary
/// name with the mode set before renaming it into place, so the socket is
/// never reachable with looser permissions.
pub fn bind(section: &ControlSection) -> Result<UnixListener, ControlError> {
    let path = section.socket.clone();
    let io = |op: &'static str| {
        let path = path.clone();
        move |source| ControlError::Io { path, op, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create the directory"))?;
    }
    match std::fs::symlink_metadata(&path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ControlError::NotASocket { path });
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(ControlError::InUse { path });
            }
            std::fs::remove_file(&path).map_err(io("remove a stale socket"))?;
        }
        Err(_) => {}
    }
    let tmp = PathBuf::from(format!("{}.{}.tmp", path.display(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io("bind"))?;
    let mode = section.mode_bits().unwrap_or(0o600);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io("set the mode"))?;
    std::fs::rename(&tmp, &path).map_err(io("move into place"))?;
    info!(path = %path.display(), mode = format!("{mode:04o}"), "control socket up");
    Ok(listener)
}

/// Serves `listener` until `shutdown` resolves, then removes the socket
/// file. Each connection is one task; a client's error never stops the
/// loop. `registrations` goes to `proxy` (none: no `[proxy]` runs).
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    proxy: Option<mpsc::Sender<Request>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, proxy)).await {
                warn!(error = %e, "control client too slow; closed");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer(stream: UnixStream, proxy: Option<mpsc::Sender<Request>>) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    // Capped: a client cannot make the agent buffer without limit.
    let mut rd = tokio::io::BufReader::new(rd.take(MAX_REQUEST as u64));
    let answer = match rd.read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<WireRequest>(line.trim()) {
            Ok(req) => dispatch(req.query, proxy).await,
            Err(e) => Err(format!("bad request: {e}")),
        },
        Err(e) => Err(format!("reading the request: {e}")),
    };
    let json = match answer {
        Ok(mut fields) => {
            fields.insert("ok".into(), serde_json::Value::Bool(true));
            serde_json::Value::Object(fields)
        }
        Err(why) => serde_json::json!({"ok": false, "error": why}),
    };
    let mut bytes = json.to_string().into_bytes();
    bytes.push(b'\n');
    let _ = wr.write_all(&bytes).await;
    let _ = wr.shutdown().await;
}

async fn dispatch(
    query: Query,
    proxy: Option<mpsc::Sender<Request>>,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match query {
        Query::Ha => crate::ha::status_fields(),
        Query::Registrations => {
            let proxy = proxy.ok_or("no [proxy] section: this agent runs no SIP proxy")?;
            let (tx, rx) = oneshot::channel();
            proxy
                .send(Request { query, reply: tx })
                .await
                .map_err(|_| "the SIP proxy has stopped".to_owned())?;
            rx.await
                .map_err(|_| "the SIP proxy did not answer".to_owned())?
        }
        Query::Status | Query::Calls | Query::Pinholes => {
            crate::status::dispatch(query, proxy).await
        }
        Query::Reload => ask_reload(proxy).await,
    }
}

/// `reload` goes to whoever holds `owner` (the agent, which forwards the
/// other queries to the proxy driver).
async fn ask_reload(
    owner: Option<mpsc::Sender<Request>>,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let owner = owner.ok_or("this agent cannot reload")?;
    let (tx, rx) = oneshot::channel();
    owner
        .send(Request {
            query: Query::Reload,
            reply: tx,
        })
        .await
        .map_err(|_| "the agent has stopped".to_owned())?;
    rx.await
        .map_err(|_| "the agent did not answer".to_owned())?
}

/// Client side: asks the agent at `path` and returns the answer's fields
/// (`ok` removed), or the agent's error.
pub fn query(
    path: &Path,
    q: Query,
) -> Result<serde_json::Map<String, serde_json::Value>, ControlError> {
    let connect = |source| ControlError::Connect {
        path: path.to_owned(),
        source,
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(connect)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(connect)?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(connect)?;
    let mut req =
        serde_json::to_string(&WireRequest { query: q }).map_err(|e| ControlError::BadAnswer {
            reason: e.to_string(),
        })?;
    req.push('\n');
    s.write_all(req.as_bytes()).map_err(connect)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(connect)?;
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|e| ControlError::BadAnswer {
            reason: format!("{e}: {line:?}"),
        })?;
    let serde_json::Value::Object(mut fields) = v else {
        return Err(ControlError::BadAnswer {
            reason: "not a JSON object".into(),
        });
    };
    match fields.remove("ok") {
        Some(serde_json::Value::Bool(true)) => Ok(fields),
        _ => Err(ControlError::Refused {
            reason: fields
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no reason given")
                .to_owned(),
        }),
    }
}

/// The human form of `registrations`: one line per binding.
pub fn registrations_table(list: &[RegistrationEntry]) -> String {
    use std::fmt::Write as _;
    if list.is_empty() {
        return "no registrations\n".into();
    }
    let mut out = format!(
        "{:<32} {:<8} {:<24} {:<5} {:>6} {:<7} {:>8}\n",
        "AOR", "SIDE", "SOURCE", "PROTO", "FLOW", "STATE", "EXPIRES"
    );
    for r in list {
        let flow = r.flow.map_or_else(|| "-".to_owned(), |f| f.to_string());
        let _ = writeln!(
            out,
            "{:<32} {:<8} {:<24} {:<5} {:>6} {:<7} {:>7}s",
            r.aor, r.side, r.source, r.transport, flow, r.flow_state, r.expires_in_secs
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_must_leave_others_out() {
        let mut c = ControlSection::default();
        assert_eq!(c.mode_bits(), Some(0o660));
        assert!(c.validate().is_ok());
        for bad in ["0666", "0777", "rw", "0o607"] {
            c.mode = bad.into();
            assert!(c.validate().is_err(), "{bad}");
        }
        c.mode = "0600".into();
        assert!(c.validate().is_ok());
        c.socket = "relative.sock".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_table_lists_every_binding() {
        let e = RegistrationEntry {
            aor: "alice@example.com".into(),
            side: "outside".into(),
            source: "198.51.100.2:40312".into(),
            transport: "tls".into(),
            flow: Some(7),
            flow_state: "up".into(),
            contact: "sip:alice@198.51.100.2:5061;transport=tls".into(),
            edge_contact: "sip:sefx@10.77.0.1:5061;transport=tls".into(),
            expires_in_secs: 3590,
        };
        let t = registrations_table(std::slice::from_ref(&e));
        assert!(
            t.contains("alice@example.com") && t.contains("3590s"),
            "{t}"
        );
        assert_eq!(registrations_table(&[]), "no registrations\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_json_request_one_json_answer_and_the_mode_is_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let section = ControlSection {
            enabled: true,
            socket: dir.path().join("sub/control.sock"),
            mode: "0600".into(),
        };
        let listener = bind(&section).expect("bind");
        let mode = std::fs::metadata(&section.socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second agent must not take the socket over.
        assert!(matches!(bind(&section), Err(ControlError::InUse { .. })));
        let (tx, mut rx) = mpsc::channel::<Request>(4);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            section.socket.clone(),
            Some(tx),
            async move {
                let _ = stopped.await;
            },
        ));
        let owner = tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                let entry = RegistrationEntry {
                    aor: "alice@example.com".into(),
                    side: "outside".into(),
                    source: "198.51.100.2:40312".into(),
                    transport: "tls".into(),
                    flow: Some(3),
                    flow_state: "up".into(),
                    contact: "sip:alice@192.168.1.5:5061;transport=tls".into(),
                    edge_contact: "sip:sef1@10.77.0.1:5061;transport=tls".into(),
                    expires_in_secs: 60,
                };
                let mut m = serde_json::Map::new();
                m.insert(
                    "registrations".into(),
                    serde_json::to_value(vec![entry]).expect("json"),
                );
                let _ = r.reply.send(Ok(m));
            }
        });
        let path = section.socket.clone();
        let fields = tokio::task::spawn_blocking(move || query(&path, Query::Registrations))
            .await
            .expect("join")
            .expect("query");
        let list: Vec<RegistrationEntry> =
            serde_json::from_value(fields["registrations"].clone()).expect("shape");
        assert_eq!(list[0].aor, "alice@example.com");
        assert_eq!(list[0].flow_state, "up");
        // A bad request gets {"ok": false, "error": ...}.
        let path = section.socket.clone();
        let raw = tokio::task::spawn_blocking(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&path).expect("connect");
            s.write_all(b"{\"query\":\"everything\"}\n").expect("write");
            let mut l = String::new();
            BufReader::new(s).read_line(&mut l).expect("read");
            l
        })
        .await
        .expect("join");
        let v: serde_json::Value = serde_json::from_str(&raw).expect("json");
        assert_eq!(v["ok"], false);
        assert!(v["error"]
            .as_str()
            .is_some_and(|e| e.contains("bad request")));
        let _ = stop.send(());
        server.await.expect("server");
        owner.abort();
        assert!(!section.socket.exists(), "socket removed at shutdown");
    }
}
