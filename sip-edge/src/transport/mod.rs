//! SIP transport of the edge: binds the TLS listeners (internal, external)
//! and the optional plain-TCP and plain-UDP internal listeners from
//! `[proxy]`, runs one task per connection (`conn`) and per UDP remote
//! address (`udp` pseudo-connections), opens and reuses outgoing TLS
//! connections per next hop, and drives the sans-IO proxy core
//! (`crate::proxy`) from one driver task: connection events, a 1 s tick
//! and the core's Timer A/E retransmission deadlines (UDP) in, messages
//! out to the connection writers.
//!
//! Data flow: socket → TLS (`tls`) → framer (`conn`) → driver → `Proxy`
//! → driver → connection writer → TLS → socket.

pub mod conn;
pub mod hello;
pub mod limits;
pub mod live;
pub mod memory;
mod order;
pub mod source;
pub mod stun;
pub mod tls;
pub mod udp;

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{info, info_span, warn, Instrument};

use self::{
    conn::ConnParams,
    limits::{ConnLimitSettings, ConnLimits, Refusal},
};
use crate::{
    config::{ClientAuth, Config},
    control,
    media::{MediaControl, Side},
    proxy::{
        admission::{Admission, AdmissionSettings},
        ConnId, ConnInfo, Dest, HopTarget, Outgoing, Proto, Proxy, ProxySettings,
    },
};

/// At most one refused-connection log line per rule per this long (a
/// flood must not become a log flood); the line counts what it stands for.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the driver runs the proxy's transaction timers.
const TIMERS_EVERY: Duration = Duration::from_millis(100);
/// Depth of the driver's event queue (connections wait when it is full).
const EVENT_QUEUE: usize = 1024;

/// Errors of starting the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The config has no `[proxy]` section.
    #[error("no [proxy] section: nothing to listen on")]
    NoProxySection,
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}; is the address configured on this host and the port free?")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A configured source address for outgoing connections is unusable.
    #[error(transparent)]
    Source {
        /// The bind error (names the config key).
        #[from]
        source: source::ConnectError,
    },
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls {
        /// The TLS error.
        #[from]
        source: tls::TlsError,
    },
}

/// Events from connection tasks to the driver.
#[derive(Debug)]
pub enum Event {
    /// A connection is up; `writer` queues bytes to it.
    Opened {
        /// Its id.
        conn: ConnId,
        /// Side, peer, protocol.
        info: ConnInfo,
        /// Its write queue.
        writer: conn::Writer,
        /// The next hop, for connections the edge opened.
        hop: Option<HopTarget>,
        /// Keeps the connection open past its idle time (registrations).
        hold: conn::Hold,
    },
    /// A framed message.
    Message {
        /// From which connection.
        conn: ConnId,
        /// The message bytes.
        bytes: Bytes,
    },
    /// The connection's reader stopped (the peer closed its side, or
    /// framing failed): the driver answers `refused` if any, then drops its
    /// writer, so the connection writes everything queued for it before it
    /// closes (events of one connection arrive in order, so the responses
    /// to every message it delivered are queued by then).
    Closing {
        /// Which.
        conn: ConnId,
        /// A message the framer refused and that is answered first.
        refused: Option<Refused>,
    },
    /// The connection ended.
    Closed {
        /// Which.
        conn: ConnId,
    },
    /// Connecting to a next hop failed.
    ConnectFailed {
        /// The hop.
        hop: HopTarget,
    },
    /// An accepted connection's TLS client certificate is valid for these
    /// `[[peer]] tls_identity` names (sent before `Opened`).
    Identity {
        /// Which.
        conn: ConnId,
        /// The names.
        names: Vec<String>,
    },
}

/// A message the stream framer refused, to answer before the close.
#[derive(Debug)]
pub struct Refused {
    /// The offending head as far as it was read.
    pub head: Bytes,
    /// The status to answer with (`FrameError::response_code`).
    pub code: u16,
    /// The framer's error, for the Warning.
    pub why: String,
}

/// A running transport: the bound addresses and a handle to await.
#[derive(Debug)]
pub struct Running {
    /// Internal TLS listener address (actual port).
    pub internal: SocketAddr,
    /// External TLS listener address.
    pub external: SocketAddr,
    /// Internal plain-TCP listener, if configured.
    pub internal_tcp: Option<SocketAddr>,
    /// Internal plain-UDP listener, if configured.
    pub internal_udp: Option<SocketAddr>,
    /// Completes after shutdown once the driver has stopped.
    pub driver: JoinHandle<()>,
    /// Control-socket queries the driver answers (`registrations`).
    pub control: mpsc::Sender<control::Request>,
    /// Reload and drain commands (`live`, `crate::service`).
    pub commands: mpsc::Sender<live::Command>,
    /// The certificate the listeners present (swapped on reload).
    pub certs: Arc<crate::service::certs::CertStore>,
}

/// Shared state of the accept loops and connectors.
#[derive(Clone)]
struct Shared {
    next_id: Arc<AtomicU64>,
    /// Live connection tasks (accepted and opened); for logs.
    active: Arc<AtomicUsize>,
    /// Connection tasks ended so far (the memory trim's clock).
    closed: Arc<AtomicU64>,
    /// Pseudo-connections of the UDP listener.
    max_connections: usize,
    /// Accept-time limits per side and source (`limits`).
    limits: ConnLimits,
    /// `[limits] handshake_timeout_secs` (swapped on reload).
    handshake_timeout: Arc<arc_swap::ArcSwap<Duration>>,
    /// Parameters of new connections (swapped on reload).
    params: Arc<arc_swap::ArcSwap<ConnParams>>,
    events: mpsc::Sender<Event>,
    shutdown: watch::Receiver<bool>,
    connector: TlsConnector,
    /// Where outgoing connections leave from, per side.
    sources: source::Sources,
    /// `[[peer]] tls_identity` names a client certificate is checked for
    /// (swapped on reload).
    peer_identities: Arc<arc_swap::ArcSwap<Vec<String>>>,
}

/// Counts a connection task as live until it ends, then as closed.
struct ActiveGuard {
    active: Arc<AtomicUsize>,
    closed: Arc<AtomicU64>,
    side: Side,
}

impl ActiveGuard {
    fn new(shared: &Shared, side: Side) -> ActiveGuard {
        shared.active.fetch_add(1, Ordering::Relaxed);
        crate::metrics::connection_open(side, 1);
        ActiveGuard {
            active: shared.active.clone(),
            closed: shared.closed.clone(),
            side,
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        crate::metrics::connection_open(self.side, -1);
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Binds every listener of `[proxy]` and starts the driver; returns once
/// listening. The transport stops when `shutdown` resolves.
pub async fn start(
    cfg: &Config,
    media: Box<dyn MediaControl>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, TransportError> {
    let p = cfg.proxy.as_ref().ok_or(TransportError::NoProxySection)?;
    let client_ca = p.client_ca.clone().unwrap_or_else(|| p.ca_roots.clone());
    // One certificate store for both listeners and outgoing connections,
    // swapped on reload (`service::certs`).
    let certs = crate::service::certs::CertStore::load(&p.cert, &p.key)?;
    let int_tls = crate::service::certs::server_config(&certs, ClientAuth::None, &client_ca)?;
    let ext_tls = crate::service::certs::server_config(&certs, p.external_client_auth, &client_ca)?;
    let client_tls = crate::service::certs::client_config(&p.ca_roots, &certs)?;
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| TransportError::Bind { what, addr, source })
    };
    let int_l = bind("internal TLS", p.internal_listen).await?;
    let ext_l = bind("external TLS", p.external_listen).await?;
    let tcp_l = match p.internal_tcp_listen {
        Some(a) => Some(bind("internal TCP", a).await?),
        None => None,
    };
    let local = |l: &TcpListener, what: &'static str, addr: SocketAddr| {
        l.local_addr()
            .map_err(|source| TransportError::Bind { what, addr, source })
    };
    let int_addr = local(&int_l, "internal TLS", p.internal_listen)?;
    let ext_addr = local(&ext_l, "external TLS", p.external_listen)?;
    let tcp_addr = match (&tcp_l, p.internal_tcp_listen) {
        (Some(l), Some(a)) => Some(local(l, "internal TCP", a)?),
        _ => None,
    };
    let udp_sock = match p.internal_udp_listen {
        Some(addr) => {
            let what = "internal UDP";
            let s = UdpSocket::bind(addr)
                .await
                .map_err(|source| TransportError::Bind { what, addr, source })?;
            let local =
                s.local_addr()
                    .map_err(|source| TransportError::Bind { what, addr, source })?;
            Some((s, local))
        }
        None => None,
    };
    let udp_addr = udp_sock.as_ref().map(|(_, a)| *a);
    let mut settings = ProxySettings::from_config(cfg, int_addr.port(), ext_addr.port())
        .ok_or(TransportError::NoProxySection)?;
    settings.internal_udp_port = udp_addr.map(|a| a.port());
    let sources = source::verify(source::Sources::from_config(cfg), cfg)?;
    info!(?sources, "outgoing connections leave from these addresses");
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Shared {
        next_id: Arc::new(AtomicU64::new(1)),
        active: Arc::new(AtomicUsize::new(0)),
        closed: Arc::new(AtomicU64::new(0)),
        max_connections: p.max_connections,
        limits: ConnLimits::new(ConnLimitSettings::from_limits(
            p.max_connections,
            &cfg.limits,
        )),
        handshake_timeout: Arc::new(arc_swap::ArcSwap::from_pointee(Duration::from_secs(
            cfg.limits.handshake_timeout_secs,
        ))),
        params: Arc::new(arc_swap::ArcSwap::from_pointee(live::conn_params(cfg))),
        events: events_tx,
        shutdown: stop_rx,
        connector: TlsConnector::from(client_tls),
        sources,
        peer_identities: Arc::new(arc_swap::ArcSwap::from_pointee(live::peer_identities(cfg))),
    };
    if !settings.access.enforce {
        warn!("no [access] or [[peer]] section: requests from any outside party are proxied to the inside; list served domains and trusted peers to restrict them");
    }
    tokio::spawn(accept_loop(
        int_l,
        Side::Internal,
        Some(TlsAcceptor::from(int_tls)),
        shared.clone(),
    ));
    tokio::spawn(accept_loop(
        ext_l,
        Side::External,
        Some(TlsAcceptor::from(ext_tls)),
        shared.clone(),
    ));
    if let Some(l) = tcp_l {
        tokio::spawn(accept_loop(l, Side::Internal, None, shared.clone()));
    }
    if let Some((s, _)) = udp_sock {
        tokio::spawn(udp::serve(s, shared.clone()));
    }
    info!(%int_addr, %ext_addr, tcp = ?tcp_addr, udp = ?udp_addr, "SIP listeners up");
    let mut proxy = Proxy::new(settings, media);
    proxy.set_admission(Admission::new(AdmissionSettings::from_limits(&cfg.limits)));
    // Flow tokens other HA nodes and later runs can open (`proxy::tokens`);
    // the file was checked when the config was loaded.
    let key_file = token_key_file(cfg);
    match key_file.map(|(f, p)| crate::proxy::tokens::key_from_file(f, p)) {
        Some(Ok(key)) => proxy.set_token_key(key),
        Some(Err(e)) => warn!(error = %e, "flow tokens stay per-process"),
        None => {}
    }
    let (control_tx, control_rx) = mpsc::channel(16);
    let (commands_tx, commands_rx) = mpsc::channel(4);
    let driver = tokio::spawn(drive(
        proxy,
        events_rx,
        control_rx,
        commands_rx,
        shared,
        stop_tx,
        shutdown,
    ));
    Ok(Running {
        internal: int_addr,
        external: ext_addr,
        internal_tcp: tcp_addr,
        internal_udp: udp_addr,
        driver,
        control: control_tx,
        commands: commands_tx,
        certs,
    })
}

/// Refused connections of one accept loop, for rate-limited security logs.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    fn refused(&mut self, side: Side, peer: SocketAddr, why: Refusal, shared: &Shared) {
        crate::metrics::connection_refused(side, why.rule());
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < REFUSAL_LOG_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        self.last = Some(now);
        let also = std::mem::take(&mut self.suppressed);
        warn!(
            target: "sip_edge::security",
            %peer,
            ?side,
            rule = why.rule(),
            open_on_side = shared.limits.open_on(side),
            also_refused_since_last_line = also,
            "connection refused at accept"
        );
    }
}

async fn accept_loop(listener: TcpListener, side: Side, tls: Option<TlsAcceptor>, shared: Shared) {
    let mut shutdown = shared.shutdown.clone();
    let mut refusals = RefusalLog::default();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off, never stop accepting.
                    warn!(error = %e, ?side, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        // Issue #14 item 8: per-side budgets, per-source caps on
        // connections and handshakes; dropping `tcp` closes it at once.
        let permit = match shared.limits.admit(side, peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                refusals.refused(side, peer, why, &shared);
                continue;
            }
        };
        let guard = ActiveGuard::new(&shared, side);
        let conn = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", conn, %peer, ?side, tls = tls.is_some());
        // Issue #12: the handshake (rustls mid-handshake, the first-record
        // check, its timeout) runs in its own allocation, freed once done;
        // inline, the task kept room for it beside the connection's future
        // for the connection's whole life. The task itself keeps only the
        // two boxes' pointers, the span and the slots.
        let setup = Box::pin(accepted(
            tcp,
            (peer, side),
            tls.clone(),
            conn,
            (permit, guard),
            shared.clone(),
        ));
        tokio::spawn(
            async move {
                if let Some((run, _held)) = setup.await {
                    run.await;
                }
            }
            .instrument(span),
        );
    }
}

/// A connection task's future, boxed (`accepted`).
type ConnTask = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The task of accepted connection `conn` over `stream`, not yet polled.
fn conn_task<S>(stream: S, conn: ConnId, info: ConnInfo, shared: &Shared) -> ConnTask
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(conn::run(
        stream,
        conn,
        info,
        None,
        (**shared.params.load()).clone(),
        shared.events.clone(),
        shared.shutdown.clone(),
    ))
}

/// An accepted connection's setup: the TLS handshake, if any, and the
/// client certificate's identities; then the connection's future (not
/// yet polled) and what must live as long as it (its slots in the limits
/// and the live count), or `None` if it ended there.
async fn accepted(
    tcp: tokio::net::TcpStream,
    (peer, side): (SocketAddr, Side),
    tls: Option<TlsAcceptor>,
    conn: ConnId,
    mut held: (limits::Permit, ActiveGuard),
    shared: Shared,
) -> Option<(ConnTask, (limits::Permit, ActiveGuard))> {
    let _ = tcp.set_nodelay(true);
    match tls {
        Some(acc) => {
            // The first record is judged before rustls (RFC 8996
            // alerts, `hello`), within the same timeout.
            let hs =
                tokio::time::timeout(**shared.handshake_timeout.load(), hello::accept(&acc, tcp))
                    .await;
            held.0.handshake_over();
            crate::metrics::tls_handshake(
                false,
                hs.as_ref().map_or(Some("timeout"), |r| {
                    r.as_ref().err().map(crate::metrics::tls_failure)
                }),
            );
            match hs {
                Ok(Ok(s)) => {
                    let info = ConnInfo {
                        side,
                        peer,
                        proto: Proto::Tls,
                    };
                    let names = identities(
                        s.get_ref().1.peer_certificates(),
                        &shared.peer_identities.load(),
                    );
                    if !names.is_empty() {
                        info!(?names, "client certificate names a trusted peer");
                        let ev = Event::Identity { conn, names };
                        if shared.events.send(ev).await.is_err() {
                            return None;
                        }
                    }
                    Some((conn_task(s, conn, info, &shared), held))
                }
                Ok(Err(e)) => {
                    info!(
                        target: "sip_edge::security",
                        %peer,
                        ?side,
                        rule = "tls",
                        reason = crate::metrics::tls_failure(&e),
                        error = %e,
                        "TLS handshake failed; connection closed"
                    );
                    None
                }
                Err(_) => {
                    info!(
                        target: "sip_edge::security",
                        %peer,
                        ?side,
                        rule = "limits.handshake_timeout_secs",
                        "TLS handshake not completed in time; connection closed"
                    );
                    None
                }
            }
        }
        None => {
            held.0.handshake_over();
            let info = ConnInfo {
                side,
                peer,
                proto: Proto::Tcp,
            };
            Some((conn_task(tcp, conn, info, &shared), held))
        }
    }
}

/// The `[[peer]] tls_identity` names the (already chain-verified) client
/// certificate is valid for, by the name rules rustls applies to server
/// certificates (RFC 5922 §7.1: SIP domain certificates name DNS SANs).
fn identities(
    certs: Option<&[rustls::pki_types::CertificateDer<'static>]>,
    names: &[String],
) -> Vec<String> {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Vec::new();
    };
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return Vec::new();
    };
    names
        .iter()
        .filter(|n| {
            ServerName::try_from(n.as_str())
                .is_ok_and(|sn| cert.verify_is_valid_for_subject_name(&sn).is_ok())
        })
        .cloned()
        .collect()
}

fn spawn_connect(hop: HopTarget, side: Side, shared: Shared) {
    let conn = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("conn", conn, host = %hop.host, port = hop.port, ?side, outgoing = true);
    tokio::spawn(
        async move {
            let fail = |why: String| {
                let events = shared.events.clone();
                let hop = hop.clone();
                async move {
                    warn!(why, "cannot reach next hop");
                    let _ = events.send(Event::ConnectFailed { hop }).await;
                }
            };
            let name = match ServerName::try_from(hop.tls_name.clone()) {
                Ok(n) => n,
                Err(e) => return fail(format!("bad TLS name {:?}: {e}", hop.tls_name)).await,
            };
            // From the edge's address on this side (issue #14 item 4): the
            // one Via and Record-Route name, and a peer allow-lists.
            let tcp = match tokio::time::timeout(
                **shared.handshake_timeout.load(),
                source::connect(&hop.host, hop.port, side, &shared.sources),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return fail(e.to_string()).await,
                Err(_) => return fail("connect timed out".into()).await,
            };
            let peer = match tcp.peer_addr() {
                Ok(p) => p,
                Err(e) => return fail(format!("peer address: {e}")).await,
            };
            let _ = tcp.set_nodelay(true);
            let hs = tokio::time::timeout(
                **shared.handshake_timeout.load(),
                shared.connector.connect(name, tcp),
            )
            .await;
            crate::metrics::tls_handshake(
                true,
                hs.as_ref().map_or(Some("timeout"), |r| {
                    r.as_ref().err().map(crate::metrics::tls_failure)
                }),
            );
            let tls = match hs {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return fail(format!("TLS: {e}")).await,
                Err(_) => return fail("TLS handshake timed out".into()).await,
            };
            let _guard = ActiveGuard::new(&shared, side);
            let info = ConnInfo {
                side,
                peer,
                proto: Proto::Tls,
            };
            conn::run(
                tls,
                conn,
                info,
                Some(hop.clone()),
                (**shared.params.load()).clone(),
                shared.events.clone(),
                shared.shutdown.clone(),
            )
            .await;
        }
        .instrument(span),
    );
}

/// A message waiting for a connection: bytes and its client branch.
type Queued = (Vec<u8>, Option<String>);

/// The driver: owns the proxy core, the writers and the next-hop pool.
struct Driver {
    proxy: Proxy,
    writers: HashMap<ConnId, conn::Writer>,
    /// Idle holds of the connections, set from live registrations.
    holds: HashMap<ConnId, conn::Hold>,
    pool: HashMap<HopTarget, ConnId>,
    pending: HashMap<HopTarget, Vec<Queued>>,
    shared: Shared,
    trim: memory::TrimPolicy,
}

async fn drive(
    proxy: Proxy,
    mut events: mpsc::Receiver<Event>,
    mut control: mpsc::Receiver<control::Request>,
    mut commands: mpsc::Receiver<live::Command>,
    shared: Shared,
    stop: watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) {
    let mut d = Driver {
        proxy,
        writers: HashMap::new(),
        holds: HashMap::new(),
        pool: HashMap::new(),
        pending: HashMap::new(),
        shared,
        trim: memory::TrimPolicy::default(),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Transaction timers between ticks (`Proxy::on_timers`): what expires
    // is handled in tenths of a second's worth, not one second's at once.
    let mut timers = tokio::time::interval(TIMERS_EVERY);
    timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(order::BATCH);
    tokio::pin!(shutdown);
    loop {
        // Timer A/E (UDP only) need sub-second precision: sleep until the
        // core's next retransmission, if any.
        let retransmit = d
            .proxy
            .next_retransmit()
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            n = events.recv_many(&mut batch, order::BATCH) => {
                if n == 0 {
                    break;
                }
                // Responses first (`order`): a queued 200 OK no longer
                // waits behind every new request queued before it, nor
                // behind those taken before it arrived.
                order::run(&mut batch, || events.try_recv().ok(), |ev| d.event(ev));
                crate::metrics::calls_active(d.proxy.live().2);
            }
            Some(req) = control.recv() => d.control(req),
            Some(cmd) = commands.recv() => d.live(cmd),
            () = crate::ha::snapshot_ready().notified() => d.proxy.sync_replicas(),
            _ = timers.tick() => {
                let out = d.proxy.on_timers(Instant::now());
                d.send_all(out);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let out = d.proxy.on_tick(now);
                d.send_all(out);
                d.hold_registered_flows(now);
                // Issue #14 item 8: give freed connection memory back to
                // the OS once connections went away, and (#12) that of a
                // burst's transactions once they ended (see `memory`); off
                // the driver, which must keep routing meanwhile.
                let (server, client, _) = d.proxy.live();
                if d.trim.due(d.shared.closed.load(Ordering::Relaxed), server + client, now) {
                    tokio::task::spawn_blocking(memory::trim);
                }
            }
            () = async {
                match retransmit {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let out = d.proxy.on_retransmit(Instant::now());
                d.send_all(out);
            }
            () = &mut shutdown => break,
        }
    }
    info!("SIP transport shutting down");
    d.proxy.shutdown(Instant::now());
    let _ = stop.send(true);
}

impl Driver {
    /// A flow that carries a live registration stays open until the
    /// registration expires, idle or not (see `conn`).
    fn hold_registered_flows(&self, now: Instant) {
        for (conn, until) in self.proxy.registered_flows(now) {
            if let Some(h) = self.holds.get(&conn) {
                h.store(conn::hold_value(until), Ordering::Relaxed);
            }
        }
    }

    /// A control-socket query about the proxy's state.
    fn control(&mut self, req: control::Request) {
        let answer = match req.query {
            control::Query::Registrations => {
                let list = self.proxy.registrations(Instant::now());
                serde_json::to_value(list)
                    .map(|v| {
                        let mut m = serde_json::Map::new();
                        m.insert("registrations".into(), v);
                        m
                    })
                    .map_err(|e| e.to_string())
            }
            q @ (control::Query::Status | control::Query::Calls | control::Query::Pinholes) => {
                crate::status::answer(&mut self.proxy, q, Instant::now())
            }
            // The agent's own (`crate::agent`); never forwarded here.
            control::Query::Reload => Err("reload is answered by the agent".into()),
            // Answered by the control socket itself (`crate::ha`).
            control::Query::Ha => crate::ha::status_fields(),
        };
        let _ = req.reply.send(answer);
    }

    fn event(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::Opened {
                conn,
                info,
                writer,
                hop,
                hold,
            } => {
                self.writers.insert(conn, writer);
                self.holds.insert(conn, hold);
                self.proxy.on_conn_open(conn, info);
                if let Some(hop) = hop {
                    self.pool.insert(hop.clone(), conn);
                    for (bytes, branch) in self.pending.remove(&hop).unwrap_or_default() {
                        self.send_on(conn, bytes, branch);
                    }
                }
            }
            Event::Message { conn, bytes } => {
                let out = self.proxy.on_message(conn, &bytes, now);
                self.send_all(out);
            }
            Event::Closing { conn, refused } => {
                if let Some(r) = refused {
                    let out = self.proxy.on_framing_error(conn, &r.head, r.code, &r.why);
                    self.send_all(out);
                }
                // The connection task drains its queue once this, the only
                // sender, is gone, then closes; nothing new goes to it.
                self.writers.remove(&conn);
                self.pool.retain(|_, c| *c != conn);
            }
            Event::Closed { conn } => {
                self.writers.remove(&conn);
                self.holds.remove(&conn);
                self.pool.retain(|_, c| *c != conn);
                let out = self.proxy.on_conn_closed(conn, now);
                self.send_all(out);
            }
            Event::Identity { conn, names } => self.proxy.on_conn_identity(conn, names),
            Event::ConnectFailed { hop } => {
                for (_, branch) in self.pending.remove(&hop).unwrap_or_default() {
                    if let Some(b) = branch {
                        let out = self.proxy.on_unreachable(&b, now);
                        self.send_all(out);
                    }
                }
            }
        }
    }

    fn send_all(&mut self, out: Vec<Outgoing>) {
        for o in out {
            match o.dest {
                Dest::Conn(c) => self.send_on(c, o.bytes, o.client_tx),
                Dest::Hop { side, hop } => match self.pool.get(&hop).copied() {
                    Some(c) => self.send_on(c, o.bytes, o.client_tx),
                    None => {
                        let first = !self.pending.contains_key(&hop);
                        self.pending
                            .entry(hop.clone())
                            .or_default()
                            .push((o.bytes, o.client_tx));
                        if first {
                            spawn_connect(hop, side, self.shared.clone());
                        }
                    }
                },
            }
        }
    }

    fn send_on(&mut self, conn: ConnId, bytes: Vec<u8>, branch: Option<String>) {
        let ok = match self.writers.get_mut(&conn) {
            // Bounded queue: a peer that does not read cannot make us buffer
            // without limit; what does not fit fails like a transport error.
            Some(w) => w.try_send(bytes).is_ok(),
            None => false,
        };
        if let Some(b) = branch {
            if ok {
                self.proxy.on_sent(&b, conn);
            } else {
                warn!(conn, "cannot queue request; failing its transaction");
                let out = self.proxy.on_unreachable(&b, Instant::now());
                self.send_all(out);
            }
        } else if !ok {
            warn!(conn, "cannot queue message for connection; dropped");
        }
    }
}

/// The flow-token secret file: `[proxy]`'s, else `[ha]`'s.
fn token_key_file(cfg: &Config) -> Option<(&'static str, &std::path::Path)> {
    let proxy = cfg.proxy.as_ref().and_then(|p| p.token_key_file.as_deref());
    let ha = cfg.ha.as_ref().and_then(|h| h.token_key_file.as_deref());
    proxy
        .map(|p| ("proxy.token_key_file", p))
        .or(ha.map(|p| ("ha.token_key_file", p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_certificate_names_only_the_peers_it_is_valid_for() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![
            "sbc.carrier.example".to_owned(),
            "*.partner.example".to_owned(),
        ])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
        let der = vec![cert.der().clone()];
        let names = [
            "sbc.carrier.example".to_owned(),
            "sip.partner.example".to_owned(),
            "other.example".to_owned(),
        ];
        assert_eq!(
            identities(Some(&der), &names),
            vec!["sbc.carrier.example", "sip.partner.example"]
        );
        assert!(identities(None, &names).is_empty(), "no certificate");
    }
}
