//! A minimal SIP user agent over TLS for the end-to-end tests and
//! `cargo xtask demo`: throwaway PKI (rcgen), TLS connections in network
//! namespaces, request/response builders for one dialog (REGISTER, INVITE,
//! ACK, CANCEL, BYE, re-INVITE, MESSAGE, and the UAS side's replies), SDP
//! offers/answers with audio, video and MSRP (RFC 4975) m-lines, and a small
//! reader for the SDP the edge rewrote. Not a compliant UA: just enough
//! RFC 3261 to drive the edge the way a real client does.
//!
//! Sockets and namespaces (documented choice): a socket stays in the
//! namespace it was created in, so every socket here is created as a std
//! socket on a short-lived thread inside the namespace
//! ([`crate::testnet::in_ns`]), then made non-blocking and handed to tokio
//! with `from_std`. The tokio runtime itself runs wherever the caller
//! likes, and must be current when these functions are called.
//! A [`UaConn`] has no background task: it only reads when asked, so the
//! caller drives both ends of a call from one task, step by step, each
//! wait bounded by a timeout.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::testnet::{self, TestnetError};
use sip_edge::{
    config::ClientAuth,
    sip::{
        framer::{Frame, Framer, FramerLimits, KeepAliveRole, PONG},
        message::Message,
    },
    transport::tls::{self, TlsError},
};

/// Name the edge's certificate carries (besides its two IP addresses).
pub const EDGE_TLS_NAME: &str = "edge.example.org";
/// Name the peer's certificate carries (besides 198.51.100.2).
pub const PEER_TLS_NAME: &str = "peer.example.net";
/// Name the internal client's certificate carries (besides 10.77.0.2).
pub const CLIENT_TLS_NAME: &str = "client.example.org";

/// Errors of the test user agent.
#[derive(Debug, thiserror::Error)]
pub enum UaError {
    /// Generating a certificate failed.
    #[error("generating the {what} certificate: {source}")]
    Cert {
        /// Which certificate.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// Reading or writing a file, or a socket operation.
    #[error("{op}: {source}")]
    Io {
        /// What was attempted.
        op: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Entering a namespace failed.
    #[error(transparent)]
    Netns {
        /// The namespace error.
        #[from]
        source: TestnetError,
    },
    /// TLS material could not be loaded or configured.
    #[error(transparent)]
    Tls {
        /// The TLS error.
        #[from]
        source: TlsError,
    },
    /// The TLS server name is not valid.
    #[error("invalid TLS server name {name:?}")]
    ServerName {
        /// The name.
        name: String,
    },
    /// Nothing arrived in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The other end closed the connection.
    #[error("connection closed by the other end while waiting for {what}")]
    Closed {
        /// What was awaited.
        what: String,
    },
    /// The byte stream could not be framed or parsed as SIP.
    #[error("bad SIP from the other end: {reason}")]
    BadSip {
        /// Why.
        reason: String,
    },
    /// A message arrived that the caller did not expect.
    #[error("wanted {wanted}, got: {got}")]
    Unexpected {
        /// What the caller waited for.
        wanted: String,
        /// The first line of what came.
        got: String,
    },
    /// A body or header the UA needs is missing or malformed.
    #[error("{what}")]
    Missing {
        /// What is missing.
        what: String,
    },
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> UaError {
    let op = op.into();
    move |source| UaError::Io { op, source }
}

fn missing(what: impl Into<String>) -> UaError {
    UaError::Missing { what: what.into() }
}

// --- PKI -------------------------------------------------------------------

/// Throwaway PKI written to a directory: a CA, the edge's certificate
/// (`edge.example.org`, 10.77.0.1, 203.0.113.1), the peer's
/// (`peer.example.net`, 198.51.100.2) and the client's (10.77.0.2).
#[derive(Clone, Debug)]
pub struct TestPki {
    /// CA certificate (PEM): every party trusts it.
    pub ca: PathBuf,
    /// Edge certificate chain and key.
    pub edge_cert: PathBuf,
    /// Edge key.
    pub edge_key: PathBuf,
    /// Peer certificate and key.
    pub peer_cert: PathBuf,
    /// Peer key.
    pub peer_key: PathBuf,
    /// Client certificate and key (for an internal next hop on the client).
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

impl TestPki {
    /// Generate everything into `dir` (which must exist).
    pub fn generate(dir: &Path) -> Result<TestPki, UaError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let cert_err = |what: &'static str| move |source| UaError::Cert { what, source };
        let ca_key = KeyPair::generate().map_err(cert_err("CA"))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA"))?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sip-edge test CA (throwaway)");
        let ca = ca_params.self_signed(&ca_key).map_err(cert_err("CA"))?;
        let leaf = |what: &'static str, names: &[&str]| -> Result<(String, String), UaError> {
            let k = KeyPair::generate().map_err(cert_err(what))?;
            let mut p =
                CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                    .map_err(cert_err(what))?;
            p.distinguished_name
                .push(DnType::CommonName, names.first().copied().unwrap_or(what));
            let c = p.signed_by(&k, &ca, &ca_key).map_err(cert_err(what))?;
            Ok((c.pem(), k.serialize_pem()))
        };
        let edge = leaf("edge", &[EDGE_TLS_NAME, "10.77.0.1", "203.0.113.1"])?;
        let peer = leaf("peer", &[PEER_TLS_NAME, "198.51.100.2"])?;
        let client = leaf("client", &[CLIENT_TLS_NAME, "10.77.0.2"])?;
        let write = |name: &str, text: &str| -> Result<PathBuf, UaError> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(io(format!("write {}", p.display())))?;
            Ok(p)
        };
        Ok(TestPki {
            ca: write("ca.pem", &ca.pem())?,
            edge_cert: write("edge.pem", &edge.0)?,
            edge_key: write("edge.key", &edge.1)?,
            peer_cert: write("peer.pem", &peer.0)?,
            peer_key: write("peer.key", &peer.1)?,
            client_cert: write("client.pem", &client.0)?,
            client_key: write("client.key", &client.1)?,
        })
    }
}

// --- connections -------------------------------------------------------------

/// Anything a SIP connection can run over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One line of a UA's message log: direction, time since the UA's
/// connection opened, and the message's first line.
#[derive(Clone, Debug)]
pub struct LogLine {
    /// `true` when sent by this UA.
    pub sent: bool,
    /// Time since the connection opened.
    pub at: Duration,
    /// When, on the monotonic clock (to merge several UAs' logs).
    pub when: Instant,
    /// Request-Line or Status-Line.
    pub first_line: String,
}

/// One TLS connection of a user agent.
pub struct UaConn {
    stream: Box<dyn Stream>,
    framer: Framer,
    opened: Instant,
    /// Every message sent and received, in order.
    pub log: Vec<LogLine>,
    /// This end's transport address.
    pub local: SocketAddr,
    /// The other end's transport address.
    pub remote: SocketAddr,
}

fn first_line(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    s.lines().next().unwrap_or("").to_owned()
}

fn tokio_tcp(s: std::net::TcpStream) -> Result<tokio::net::TcpStream, UaError> {
    s.set_nonblocking(true).map_err(io("set_nonblocking"))?;
    // SIP messages are small writes in quick succession (180 then 200):
    // with Nagle on, the second waits for the delayed ACK of the first (~40 ms).
    s.set_nodelay(true).map_err(io("set_nodelay"))?;
    tokio::net::TcpStream::from_std(s)
        .map_err(io("register socket with tokio (is a runtime current?)"))
}

/// The TLS client configuration of a test UA: trusts only `ca`, TLS 1.3
/// or 1.2, no client certificate. Built once and shared by every
/// connection of a load run (which also lets rustls resume sessions).
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, UaError> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|source| TlsError::Config {
        what: "test UA client",
        source,
    })?
    .with_root_certificates(tls::load_roots(ca)?)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Connect from namespace `ns` to `to` and run a TLS handshake that trusts
/// only `ca` and verifies `server_name` (a DNS name or an IP address).
pub async fn connect_tls(
    ns: &str,
    to: SocketAddr,
    ca: &Path,
    server_name: &str,
    wait: Duration,
) -> Result<UaConn, UaError> {
    let std_stream = testnet::in_ns(ns, || std::net::TcpStream::connect_timeout(&to, wait))?
        .map_err(io(format!("connect to {to} from {ns}")))?;
    let tcp = tokio_tcp(std_stream)?;
    handshake(tcp, to, client_config(ca)?, server_name, wait).await
}

/// Like [`connect_tls`], from the source address `local` (port 0: any) of
/// namespace `ns`: a second address of a namespace (an attacker beside a
/// legitimate peer) gets connections of its own.
pub async fn connect_tls_from(
    topo: &testnet::Topology,
    ns: &str,
    local: SocketAddr,
    to: SocketAddr,
    ca: &Path,
    server_name: &str,
    wait: Duration,
) -> Result<UaConn, UaError> {
    let std_stream = topo.tcp_connect(ns, local, to)?;
    let tcp = tokio_tcp(std_stream)?;
    handshake(tcp, to, client_config(ca)?, server_name, wait).await
}

/// Connect to `to` from the calling thread's own network namespace (a
/// thread that entered one, e.g. a load generator's runtime thread) with a
/// shared client configuration.
pub async fn connect_tls_here(
    to: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    server_name: &str,
    wait: Duration,
) -> Result<UaConn, UaError> {
    let tcp = tokio::time::timeout(wait, tokio::net::TcpStream::connect(to))
        .await
        .map_err(|_| UaError::Timeout {
            what: format!("TCP connect to {to}"),
            after: wait,
        })?
        .map_err(io(format!("connect to {to}")))?;
    tcp.set_nodelay(true).map_err(io("set_nodelay"))?;
    handshake(tcp, to, cfg, server_name, wait).await
}

/// A TLS handshake to `to` on a TCP connection the caller made (e.g. bound
/// to one of many source addresses).
pub async fn connect_tls_stream(
    tcp: tokio::net::TcpStream,
    to: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    server_name: &str,
    wait: Duration,
) -> Result<UaConn, UaError> {
    handshake(tcp, to, cfg, server_name, wait).await
}

async fn handshake(
    tcp: tokio::net::TcpStream,
    to: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    server_name: &str,
    wait: Duration,
) -> Result<UaConn, UaError> {
    let local = tcp.local_addr().map_err(io("local_addr"))?;
    let name = ServerName::try_from(server_name.to_owned()).map_err(|_| UaError::ServerName {
        name: server_name.to_owned(),
    })?;
    let tls = tokio::time::timeout(wait, TlsConnector::from(cfg).connect(name, tcp))
        .await
        .map_err(|_| UaError::Timeout {
            what: format!("TLS handshake with {to}"),
            after: wait,
        })?
        .map_err(io(format!("TLS handshake with {to}")))?;
    Ok(UaConn::new(
        Box::new(tls),
        KeepAliveRole::Initiator,
        local,
        to,
    ))
}

/// A TLS SIP listener in a namespace (the peer's, or a client's).
pub struct UaListener {
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    /// The bound address.
    pub addr: SocketAddr,
}

impl UaListener {
    /// Listen on `addr` inside `ns`, presenting `cert`/`key`.
    pub fn bind(
        ns: &str,
        addr: SocketAddr,
        cert: &Path,
        key: &Path,
    ) -> Result<UaListener, UaError> {
        let l = testnet::in_ns(ns, || std::net::TcpListener::bind(addr))?
            .map_err(io(format!("listen on {addr} in {ns}")))?;
        UaListener::from_std(l, addr, cert, key)
    }

    /// Listen on `addr` in the calling thread's own network namespace.
    pub fn bind_here(addr: SocketAddr, cert: &Path, key: &Path) -> Result<UaListener, UaError> {
        let l = std::net::TcpListener::bind(addr).map_err(io(format!("listen on {addr}")))?;
        UaListener::from_std(l, addr, cert, key)
    }

    fn from_std(
        l: std::net::TcpListener,
        addr: SocketAddr,
        cert: &Path,
        key: &Path,
    ) -> Result<UaListener, UaError> {
        l.set_nonblocking(true).map_err(io("set_nonblocking"))?;
        let listener = tokio::net::TcpListener::from_std(l)
            .map_err(io("register listener with tokio (is a runtime current?)"))?;
        let cfg = tls::server_config(cert, key, ClientAuth::None, cert)?;
        Ok(UaListener {
            listener,
            acceptor: TlsAcceptor::from(cfg),
            addr,
        })
    }

    /// Accept one connection and complete its TLS handshake.
    pub async fn accept(&self, wait: Duration) -> Result<UaConn, UaError> {
        let (tcp, remote) = tokio::time::timeout(wait, self.listener.accept())
            .await
            .map_err(|_| UaError::Timeout {
                what: format!("a connection on {}", self.addr),
                after: wait,
            })?
            .map_err(io("accept"))?;
        tcp.set_nodelay(true).map_err(io("set_nodelay"))?;
        let tls = tokio::time::timeout(wait, self.acceptor.accept(tcp))
            .await
            .map_err(|_| UaError::Timeout {
                what: format!("TLS handshake from {remote}"),
                after: wait,
            })?
            .map_err(io(format!("TLS handshake from {remote}")))?;
        Ok(UaConn::new(
            Box::new(tls),
            KeepAliveRole::Responder,
            self.addr,
            remote,
        ))
    }
}

impl UaConn {
    fn new(
        stream: Box<dyn Stream>,
        role: KeepAliveRole,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> UaConn {
        UaConn {
            stream,
            framer: Framer::new(role, FramerLimits::default()),
            opened: Instant::now(),
            log: Vec::new(),
            local,
            remote,
        }
    }

    /// Send one message (written and flushed before this returns).
    pub async fn send(&mut self, text: &str) -> Result<(), UaError> {
        self.send_bytes(text.as_bytes()).await
    }

    /// Send raw bytes, which need not be text (torture messages).
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), UaError> {
        self.stream.write_all(bytes).await.map_err(io("send SIP"))?;
        self.stream.flush().await.map_err(io("flush SIP"))?;
        self.log.push(LogLine {
            sent: true,
            at: self.opened.elapsed(),
            when: Instant::now(),
            first_line: first_line(bytes),
        });
        Ok(())
    }

    /// The next SIP message (keep-alive pings are answered on the way).
    pub async fn recv(&mut self, wait: Duration) -> Result<Message, UaError> {
        let what = "a SIP message".to_owned();
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 8192];
        loop {
            match self.framer.next_frame() {
                Ok(Some(Frame::Message(raw))) => {
                    let m = Message::from_frame(&raw).map_err(|e| UaError::BadSip {
                        reason: e.to_string(),
                    })?;
                    self.log.push(LogLine {
                        sent: false,
                        at: self.opened.elapsed(),
                        when: Instant::now(),
                        first_line: first_line(raw.as_bytes()),
                    });
                    return Ok(m);
                }
                Ok(Some(Frame::Ping)) => {
                    self.stream.write_all(PONG).await.map_err(io("send pong"))?;
                    continue;
                }
                Ok(Some(Frame::Pong)) => continue,
                Ok(None) => {}
                Err(e) => {
                    return Err(UaError::BadSip {
                        reason: e.to_string(),
                    })
                }
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .map_err(|_| UaError::Timeout {
                    what: what.clone(),
                    after: wait,
                })?
                .map_err(io("read SIP"))?;
            if n == 0 {
                return Err(UaError::Closed { what });
            }
            self.framer.push(&buf[..n]).map_err(|e| UaError::BadSip {
                reason: e.to_string(),
            })?;
        }
    }

    /// The next request, which must be `method`.
    pub async fn recv_request(&mut self, method: &str, wait: Duration) -> Result<Message, UaError> {
        let m = self.recv(wait).await?;
        if m.method().is_some_and(|x| x.is(method)) {
            Ok(m)
        } else {
            Err(UaError::Unexpected {
                wanted: method.to_owned(),
                got: first_line(&m.to_bytes()),
            })
        }
    }

    /// The next response other than 100 Trying, which must have `code`.
    pub async fn recv_status(&mut self, code: u16, wait: Duration) -> Result<Message, UaError> {
        loop {
            let m = self.recv(wait).await?;
            match m.status() {
                Some(100) if code != 100 => continue,
                Some(c) if c == code => return Ok(m),
                _ => {
                    return Err(UaError::Unexpected {
                        wanted: format!("a {code} response"),
                        got: first_line(&m.to_bytes()),
                    })
                }
            }
        }
    }
}

// --- messages ----------------------------------------------------------------

static COUNTER: AtomicU64 = AtomicU64::new(1);

/// A token unique within this process run (branches, tags, Call-IDs).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{:x}{n:x}{t:x}", std::process::id())
}

/// Who a user agent is.
#[derive(Clone, Debug)]
pub struct UaIdentity {
    /// AOR, e.g. `sips:alice@peer.example.net`.
    pub aor: String,
    /// Contact URI, e.g. `sips:alice@10.77.0.2:5061`.
    pub contact: String,
    /// `host:port` written into Via.
    pub via_host: String,
    /// Display name.
    pub display: String,
}

fn new_branch() -> String {
    unique("z9hG4bK")
}

fn body_headers(content_type: &str, body: &str) -> String {
    let mut s = String::new();
    if !body.is_empty() {
        let _ = write!(s, "Content-Type: {content_type}\r\n");
    }
    let _ = write!(s, "Content-Length: {}\r\n\r\n{body}", body.len());
    s
}

/// A REGISTER for `me` at `registrar` (a `sips:domain` URI).
pub fn register(
    me: &UaIdentity,
    registrar: &str,
    call_id: &str,
    cseq: u32,
    expires: u32,
) -> String {
    format!(
        "REGISTER {registrar} SIP/2.0\r\nVia: SIP/2.0/TLS {};branch={};rport\r\nMax-Forwards: 70\r\nFrom: <{}>;tag={}\r\nTo: <{}>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\nContact: <{}>\r\nExpires: {expires}\r\n{}",
        me.via_host,
        new_branch(),
        me.aor,
        unique("r"),
        me.aor,
        me.contact,
        body_headers("", "")
    )
}

/// The response a UAS (or registrar) sends to `req` (RFC 3261 §8.2.6):
/// Via, From, Call-ID, CSeq and Record-Route copied, a To tag added if
/// missing; `extra` holds complete header lines (`Contact: <...>\r\n`).
pub fn reply(
    req: &Message,
    code: u16,
    reason: &str,
    to_tag: &str,
    extra: &str,
    content_type: &str,
    body: &str,
) -> String {
    let mut s = format!("SIP/2.0 {code} {reason}\r\n");
    for h in req.headers() {
        let n = h.name.to_ascii_lowercase();
        if [
            "via",
            "v",
            "record-route",
            "from",
            "f",
            "call-id",
            "i",
            "cseq",
        ]
        .contains(&n.as_str())
        {
            let _ = write!(s, "{}: {}\r\n", h.name, h.value);
        } else if n == "to" || n == "t" {
            let tag = if h.value.contains("tag=") || code == 100 {
                String::new()
            } else {
                format!(";tag={to_tag}")
            };
            let _ = write!(s, "{}: {}{tag}\r\n", h.name, h.value);
        }
    }
    s.push_str(extra);
    s.push_str(&body_headers(content_type, body));
    s
}

/// One dialog (or dialog attempt) as seen by one UA, either side.
#[derive(Clone, Debug)]
pub struct Dialog {
    /// Call-ID.
    pub call_id: String,
    /// Our tag.
    pub local_tag: String,
    /// Their tag, once known.
    pub remote_tag: Option<String>,
    /// Our URI (From of our requests).
    pub local_uri: String,
    /// Their URI (To of our requests).
    pub remote_uri: String,
    /// Where in-dialog requests go (their Contact).
    pub remote_target: String,
    /// Route headers for in-dialog requests, in the order to send.
    pub route_set: Vec<String>,
    /// Our last CSeq number.
    pub cseq: u32,
    /// Us.
    pub me: UaIdentity,
    /// The last INVITE we sent (for CANCEL and non-2xx ACK).
    last_invite: Option<(String, String, u32)>,
}

impl Dialog {
    /// A new outgoing call from `me` to `target` (a `sips:` URI).
    pub fn outgoing(me: &UaIdentity, target: &str) -> Dialog {
        Dialog {
            call_id: unique("call-"),
            local_tag: unique("t"),
            remote_tag: None,
            local_uri: me.aor.clone(),
            remote_uri: target.to_owned(),
            remote_target: target.to_owned(),
            route_set: Vec::new(),
            cseq: 0,
            me: me.clone(),
            last_invite: None,
        }
    }

    /// The UAS side of a received INVITE: the dialog it creates once we
    /// answer with our tag.
    pub fn incoming(me: &UaIdentity, invite: &Message) -> Result<Dialog, UaError> {
        let from = invite.from().map_err(|e| missing(format!("From: {e}")))?;
        let to = invite.to().map_err(|e| missing(format!("To: {e}")))?;
        let contact = invite
            .name_addrs("Contact")
            .ok()
            .and_then(|c| c.into_iter().next())
            .ok_or_else(|| missing("INVITE without Contact"))?;
        Ok(Dialog {
            call_id: invite
                .call_id()
                .map_err(|e| missing(format!("Call-ID: {e}")))?
                .to_owned(),
            local_tag: unique("t"),
            remote_tag: from.tag().map(str::to_owned),
            local_uri: to.uri.clone(),
            remote_uri: from.uri.clone(),
            remote_target: contact.uri,
            route_set: invite
                .name_addrs("Record-Route")
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.uri)
                .collect(),
            cseq: 1000,
            me: me.clone(),
            last_invite: None,
        })
    }

    fn routes(&self) -> String {
        self.route_set
            .iter()
            .map(|r| format!("Route: <{r}>\r\n"))
            .collect()
    }

    fn to_header(&self) -> String {
        match &self.remote_tag {
            Some(t) => format!("<{}>;tag={t}", self.remote_uri),
            None => format!("<{}>", self.remote_uri),
        }
    }

    /// A request in this dialog (or the initial INVITE when no remote tag
    /// is known yet). Increments CSeq unless `method` is ACK.
    pub fn request(&mut self, method: &str, content_type: &str, body: &str) -> String {
        if method != "ACK" {
            self.cseq += 1;
        }
        let branch = new_branch();
        let contact = if ["INVITE", "UPDATE", "SUBSCRIBE"].contains(&method) {
            format!("Contact: <{}>\r\n", self.me.contact)
        } else {
            String::new()
        };
        let text = format!(
            "{method} {} SIP/2.0\r\nVia: SIP/2.0/TLS {};branch={branch};rport\r\n{}Max-Forwards: 70\r\nFrom: \"{}\" <{}>;tag={}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} {method}\r\n{contact}{}",
            self.remote_target,
            self.me.via_host,
            self.routes(),
            self.me.display,
            self.local_uri,
            self.local_tag,
            self.to_header(),
            self.call_id,
            self.cseq,
            body_headers(content_type, body)
        );
        if method == "INVITE" {
            self.last_invite = Some((branch, self.remote_target.clone(), self.cseq));
        }
        text
    }

    /// The initial INVITE with an SDP offer (empty `sdp`: late offer).
    pub fn invite(&mut self, sdp: &str) -> String {
        self.request("INVITE", "application/sdp", sdp)
    }

    /// Learn the remote tag, route set and target from a response to our
    /// INVITE (18x with a tag, or 2xx).
    pub fn on_invite_response(&mut self, resp: &Message) -> Result<(), UaError> {
        let code = resp.status().ok_or_else(|| missing("not a response"))?;
        if let Ok(Some(tag)) = resp.to_tag() {
            self.remote_tag = Some(tag);
        }
        if (200..300).contains(&code) || ((101..200).contains(&code) && self.route_set.is_empty()) {
            let mut rr: Vec<String> = resp
                .name_addrs("Record-Route")
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.uri)
                .collect();
            rr.reverse();
            if (200..300).contains(&code) || !rr.is_empty() {
                self.route_set = rr;
            }
            if let Some(c) = resp
                .name_addrs("Contact")
                .ok()
                .and_then(|c| c.into_iter().next())
            {
                self.remote_target = c.uri;
            }
        }
        Ok(())
    }

    /// ACK for a 2xx (RFC 3261 §13.2.2.4): a new transaction, in-dialog.
    pub fn ack(&mut self, content_type: &str, body: &str) -> String {
        if let Some((_, _, n)) = &self.last_invite {
            self.cseq = *n;
        }
        self.request("ACK", content_type, body)
    }

    fn same_transaction(&self, method: &str, to: &str) -> Option<String> {
        let (branch, ruri, n) = self.last_invite.as_ref()?;
        Some(format!(
            "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS {};branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: \"{}\" <{}>;tag={}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {n} {method}\r\nContent-Length: 0\r\n\r\n",
            self.me.via_host, self.me.display, self.local_uri, self.local_tag, self.call_id
        ))
    }

    /// CANCEL of our pending INVITE (§9.1: same branch, R-URI and CSeq number).
    pub fn cancel(&self) -> Option<String> {
        self.same_transaction("CANCEL", &format!("<{}>", self.remote_uri))
    }

    /// ACK for a non-2xx final response to our INVITE (§17.1.1.3: same
    /// branch, the response's To).
    pub fn ack_failure(&self, resp: &Message) -> Option<String> {
        let to = resp.header("To")?.to_owned();
        self.same_transaction("ACK", &to)
    }
}

// --- SDP ---------------------------------------------------------------------

/// An MSRP m-line (RFC 4975 §8.1, file transfer per RFC 5547).
#[derive(Clone, Debug)]
pub struct MsrpOffer {
    /// TCP port in the m-line.
    pub port: u16,
    /// Session id in the path URI.
    pub session: String,
    /// `a=setup` (RFC 4145); `None` leaves the default (offerer connects).
    pub setup: Option<&'static str>,
    /// `a=file-selector` value, for file transfer.
    pub file_selector: Option<String>,
}

impl MsrpOffer {
    /// The `a=path` URI this m-line advertises for `addr`.
    pub fn path(&self, addr: IpAddr) -> String {
        format!(
            "msrp://{}:{}/{};tcp",
            host_of(addr),
            self.port,
            self.session
        )
    }
}

/// What one UA offers or answers.
#[derive(Clone, Debug, Default)]
pub struct SdpSpec {
    /// Audio RTP port (RTCP on port+1).
    pub audio: Option<u16>,
    /// Video RTP port.
    pub video: Option<u16>,
    /// MSRP.
    pub msrp: Option<MsrpOffer>,
}

fn host_of(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v) => v.to_string(),
        IpAddr::V6(v) => format!("[{v}]"),
    }
}

/// An SDP body for `addr` with the streams of `spec`; `version` is the
/// o= session version (increment it for re-offers, RFC 3264 §8).
pub fn sdp(user: &str, version: u32, addr: IpAddr, spec: &SdpSpec) -> String {
    let fam = if addr.is_ipv4() { "IP4" } else { "IP6" };
    let mut s = format!("v=0\r\no={user} 2890844526 {version} IN {fam} {addr}\r\ns=-\r\nc=IN {fam} {addr}\r\nt=0 0\r\n");
    if let Some(p) = spec.audio {
        let _ = write!(s, "m=audio {p} RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=sendrecv\r\n");
    }
    if let Some(p) = spec.video {
        let _ = write!(s, "m=video {p} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n");
    }
    if let Some(m) = &spec.msrp {
        let _ = write!(s, "m=message {} TCP/MSRP *\r\na=accept-types:message/cpim text/plain application/octet-stream\r\na=path:{}\r\n", m.port, m.path(addr));
        if let Some(setup) = m.setup {
            let _ = write!(s, "a=setup:{setup}\r\n");
        }
        if let Some(f) = &m.file_selector {
            let _ = write!(s, "a=sendonly\r\na=file-selector:{f}\r\n");
        }
    }
    s
}

/// One m-line of a received SDP, with its effective connection address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaLine {
    /// `audio`, `video`, `message`, ...
    pub kind: String,
    /// Where to send (media c= or session c=, and the m= port).
    pub addr: SocketAddr,
    /// Transport, e.g. `RTP/AVP`, `TCP/MSRP`.
    pub proto: String,
    /// `a=path`, if any.
    pub path: Option<String>,
    /// `a=setup`, if any.
    pub setup: Option<String>,
}

/// The m-lines of an SDP body (enough of RFC 8866 for the tests).
pub fn media_lines(body: &[u8]) -> Result<Vec<MediaLine>, UaError> {
    let text = String::from_utf8_lossy(body);
    let mut session_c: Option<IpAddr> = None;
    let mut out: Vec<(MediaLine, Option<IpAddr>)> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(c) = line.strip_prefix("c=") {
            let ip = c
                .split_whitespace()
                .nth(2)
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<IpAddr>().ok())
                .ok_or_else(|| missing(format!("bad c= line {line:?}")))?;
            match out.last_mut() {
                Some((_, c)) => *c = Some(ip),
                None => session_c = Some(ip),
            }
        } else if let Some(m) = line.strip_prefix("m=") {
            let mut f = m.split_whitespace();
            let kind = f.next().unwrap_or("").to_owned();
            let port = f
                .next()
                .and_then(|p| p.split('/').next())
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or_else(|| missing(format!("bad m= line {line:?}")))?;
            let proto = f.next().unwrap_or("").to_owned();
            out.push((
                MediaLine {
                    kind,
                    addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port),
                    proto,
                    path: None,
                    setup: None,
                },
                None,
            ));
        } else if let Some(p) = line.strip_prefix("a=path:") {
            if let Some((m, _)) = out.last_mut() {
                m.path = Some(p.trim().to_owned());
            }
        } else if let Some(p) = line.strip_prefix("a=setup:") {
            if let Some((m, _)) = out.last_mut() {
                m.setup = Some(p.trim().to_owned());
            }
        }
    }
    out.into_iter()
        .map(|(mut m, c)| {
            let ip = c
                .or(session_c)
                .ok_or_else(|| missing(format!("m={} has no connection address", m.kind)))?;
            m.addr = SocketAddr::new(ip, m.addr.port());
            Ok(m)
        })
        .collect()
}

/// The first m-line of `kind` in `body`.
pub fn media_of(body: &[u8], kind: &str) -> Result<MediaLine, UaError> {
    media_lines(body)?
        .into_iter()
        .find(|m| m.kind == kind)
        .ok_or_else(|| missing(format!("no m={kind} line in the SDP")))
}

// --- media -------------------------------------------------------------------

/// A 172-byte RTP packet (12-byte header, 160 bytes of G.711 = 20 ms):
/// a 214-byte frame on the wire.
pub fn rtp_packet(seq: u16, ssrc: u32) -> [u8; 172] {
    let mut p = [0xd5u8; 172]; // PCMA silence
    p[0] = 0x80; // V=2
    p[1] = 8; // PT 8 (PCMA)
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p[8..12].copy_from_slice(&ssrc.to_be_bytes());
    p
}

/// An MSRP SEND request carrying `data` in one chunk (RFC 4975 §7.1).
pub fn msrp_send(
    tid: &str,
    to_path: &str,
    from_path: &str,
    message_id: &str,
    data: &[u8],
) -> Vec<u8> {
    let mut v = format!(
        "MSRP {tid} SEND\r\nTo-Path: {to_path}\r\nFrom-Path: {from_path}\r\nMessage-ID: {message_id}\r\nByte-Range: 1-{n}/{n}\r\nContent-Type: application/octet-stream\r\n\r\n",
        n = data.len()
    )
    .into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(format!("\r\n-------{tid}$\r\n").as_bytes());
    v
}

/// The 200 OK to an MSRP request (RFC 4975 §7.2): paths swapped.
pub fn msrp_ok(tid: &str, to_path: &str, from_path: &str) -> Vec<u8> {
    format!(
        "MSRP {tid} 200 OK\r\nTo-Path: {to_path}\r\nFrom-Path: {from_path}\r\n-------{tid}$\r\n"
    )
    .into_bytes()
}

/// One MSRP transaction read from a stream: the start line and the body
/// (empty for responses).
#[derive(Clone, Debug)]
pub struct MsrpFrame {
    /// `MSRP <tid> SEND` or `MSRP <tid> 200 OK`.
    pub start: String,
    /// The body between the blank line and the end-line.
    pub body: Vec<u8>,
}

/// Read one MSRP frame from a blocking stream (which must have a read
/// timeout), at most `limit` bytes.
pub fn msrp_read(stream: &mut impl std::io::Read, limit: usize) -> Result<MsrpFrame, UaError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let head_end = buf.windows(2).position(|w| w == b"\r\n");
        if let Some(e) = head_end {
            let start = String::from_utf8_lossy(&buf[..e]).into_owned();
            let tid = start.split_whitespace().nth(1).unwrap_or("").to_owned();
            let end_line = format!("-------{tid}$\r\n");
            if let Some(pos) = buf
                .windows(end_line.len())
                .position(|w| w == end_line.as_bytes())
            {
                let head = &buf[..pos];
                let body = match head.windows(4).position(|w| w == b"\r\n\r\n") {
                    // The body ends with the CRLF before the end-line.
                    Some(b) => head[b + 4..head.len().saturating_sub(2)].to_vec(),
                    None => Vec::new(),
                };
                return Ok(MsrpFrame { start, body });
            }
        }
        if buf.len() > limit {
            return Err(missing(format!("MSRP frame larger than {limit} bytes")));
        }
        let n = stream.read(&mut chunk).map_err(io("read MSRP"))?;
        if n == 0 {
            return Err(UaError::Closed {
                what: "an MSRP frame".into(),
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// --- x-msmsgsinvite file transfer --------------------------------------------

/// A Windows Messenger file-transfer `Invitation-Command: INVITE` body
/// (`text/x-msmsgsinvite`; no address: the sender offers the file).
pub fn msmsgs_invite(cookie: u32, file: &str, size: usize) -> String {
    format!(
        "Application-Name: File Transfer\r\nApplication-GUID: {{5D3E02AB-6190-11d3-BBBB-00C04F795683}}\r\nInvitation-Command: INVITE\r\nInvitation-Cookie: {cookie}\r\nApplication-File: {file}\r\nApplication-FileSize: {size}\r\n\r\n"
    )
}

/// An `Invitation-Command: ACCEPT` body naming where its sender listens.
pub fn msmsgs_accept(cookie: u32, listen: SocketAddr) -> String {
    format!(
        "Invitation-Command: ACCEPT\r\nInvitation-Cookie: {cookie}\r\nIP-Address: {}\r\nPort: {}\r\nPortX: {}\r\nAuthCookie: 1398765431\r\nLaunch-Application: FALSE\r\nRequest-Data: IP-Address:\r\n\r\n",
        listen.ip(),
        listen.port(),
        listen.port().saturating_add(1)
    )
}

/// One TCP transfer both ways: `listener` (blocking) accepts on its own
/// thread, reads `up.len()` bytes and answers with `down`; `out` (already
/// connected to the listener, possibly through the edge) sends `up` and
/// reads `down.len()` bytes. Returns the source the listener saw and the
/// bytes each end received, so the caller can compare them.
pub fn tcp_exchange(
    out: &mut std::net::TcpStream,
    listener: std::net::TcpListener,
    up: &[u8],
    down: &[u8],
    wait: Duration,
) -> Result<(SocketAddr, Vec<u8>, Vec<u8>), UaError> {
    use std::io::{Read, Write};
    let (want_up, down_owned) = (up.len(), down.to_vec());
    let far = std::thread::spawn(move || -> Result<(SocketAddr, Vec<u8>), UaError> {
        // Poll: a connection that went elsewhere must not hang the test.
        listener
            .set_nonblocking(true)
            .map_err(io("listener non-blocking"))?;
        let deadline = Instant::now() + wait;
        let (mut s, seen) = loop {
            match listener.accept() {
                Ok(a) => break a,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(io("accept the transfer")(e)),
            }
        };
        s.set_nonblocking(false).map_err(io("stream blocking"))?;
        s.set_read_timeout(Some(wait)).map_err(io("read timeout"))?;
        let mut got = vec![0u8; want_up];
        s.read_exact(&mut got)
            .map_err(io("listener reads the upload"))?;
        s.write_all(&down_owned)
            .map_err(io("listener sends the download"))?;
        Ok((seen, got))
    });
    out.set_read_timeout(Some(wait))
        .map_err(io("read timeout"))?;
    out.write_all(up)
        .map_err(io("connector sends the upload"))?;
    let mut got_down = vec![0u8; down.len()];
    let read = out
        .read_exact(&mut got_down)
        .map_err(io("connector reads the download"));
    let (seen, got_up) = far
        .join()
        .map_err(|_| missing("the listener thread panicked"))??;
    read?;
    Ok((seen, got_up, got_down))
}

/// The datapath part of the agent configuration of the demo topology
/// (`testnet::Topology`): pins removed on exit, interfaces, edge
/// addresses, the media range 40000-40999 and SIP port 5061; `media` is
/// appended to `[media]` (whole `key = value` lines).
pub fn datapath_config(pin_dir: &Path, media: &str) -> String {
    format!(
        r#"pin_dir = "{pin}"
on_exit = "remove"
[[interface]]
name = "int0"
role = "internal"
[[interface]]
name = "ext0"
role = "external"
[addresses]
internal = ["10.77.0.1"]
public = ["203.0.113.1"]
[media]
port_ranges = ["40000-40999"]
{media}[signalling]
ports = [5061]
"#,
        pin = pin_dir.display(),
    )
}

/// `[proxy]` of the demo topology: TLS listeners on both sides of the edge
/// with `pki`'s edge certificate; `extra` is appended (whole lines).
pub fn proxy_table(pki: &TestPki, extra: &str) -> String {
    format!(
        r#"[proxy]
internal_listen = "10.77.0.1:5061"
external_listen = "203.0.113.1:5061"
cert = "{cert}"
key = "{key}"
ca_roots = "{ca}"
{extra}"#,
        cert = pki.edge_cert.display(),
        key = pki.edge_key.display(),
        ca = pki.ca.display()
    )
}

/// The agent configuration of the demo topology: `datapath_config` in
/// media `mode` (`"relay"` or `"nat"`), `proxy_table`, a control socket
/// and a route for peer.example.net to the peer namespace. Shared by
/// `cargo xtask demo`, the bench and the system tests so all exercise the
/// same configuration.
pub fn edge_config(pin_dir: &Path, pki: &TestPki, mode: &str) -> String {
    // One control socket per agent: tests run agents side by side.
    let control = std::env::temp_dir().join(format!(
        "{}.control.sock",
        pin_dir
            .file_name()
            .map_or_else(|| "sip-edge".into(), |n| n.to_string_lossy())
    ));
    format!(
        r#"# sip-edge demo/test configuration (see sip-edge.example.toml)
{datapath}{proxy}[control]
socket = "{control}"
[[route]]
domain = "peer.example.net"
host = "198.51.100.2"
port = 5061
tls_name = "peer.example.net"
"#,
        datapath = datapath_config(pin_dir, &format!("mode = \"{mode}\"\n")),
        proxy = proxy_table(pki, ""),
        control = control.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdp_round_trips_through_media_lines() {
        let spec = SdpSpec {
            audio: Some(4000),
            video: Some(4002),
            msrp: Some(MsrpOffer {
                port: 4200,
                session: "s1".into(),
                setup: Some("active"),
                file_selector: None,
            }),
        };
        let ip: IpAddr = "10.77.0.2".parse().unwrap();
        let lines = media_lines(sdp("alice", 1, ip, &spec).as_bytes()).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].addr, "10.77.0.2:4000".parse().unwrap());
        assert_eq!(lines[1].kind, "video");
        assert_eq!(lines[2].proto, "TCP/MSRP");
        assert_eq!(
            lines[2].path.as_deref(),
            Some("msrp://10.77.0.2:4200/s1;tcp")
        );
        assert_eq!(lines[2].setup.as_deref(), Some("active"));
    }

    #[test]
    fn media_level_c_overrides_session_c() {
        let body = b"v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 5 RTP/AVP 0\r\nc=IN IP4 192.0.2.9\r\nm=video 7 RTP/AVP 96\r\n";
        let l = media_lines(body).unwrap();
        assert_eq!(l[0].addr, "192.0.2.9:5".parse().unwrap());
        assert_eq!(l[1].addr, "192.0.2.1:7".parse().unwrap());
    }

    #[test]
    fn msrp_frames_parse_back() {
        let data = vec![7u8; 1000];
        let f = msrp_read(
            &mut &msrp_send("t1", "msrp://b", "msrp://a", "m1", &data)[..],
            1 << 20,
        )
        .unwrap();
        assert_eq!(f.start, "MSRP t1 SEND");
        assert_eq!(f.body, data);
        let ok = msrp_read(&mut &msrp_ok("t1", "msrp://a", "msrp://b")[..], 1 << 20).unwrap();
        assert_eq!(ok.start, "MSRP t1 200 OK");
        assert!(ok.body.is_empty());
    }

    #[test]
    fn pki_is_written() {
        let dir = std::env::temp_dir().join(unique("se-pki-"));
        std::fs::create_dir_all(&dir).unwrap();
        let p = TestPki::generate(&dir).unwrap();
        assert!(tls::load_roots(&p.ca).is_ok());
        assert!(tls::server_config(&p.edge_cert, &p.edge_key, ClientAuth::None, &p.ca).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
