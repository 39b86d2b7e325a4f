//! Attack generators of the flood tests (`tests/tests/floods.rs`, issue #8
//! attacks 7 and 8) and of the soak (`sip-edge-soak`): hand-built TLS
//! ClientHellos, stalled handshakes, handshake floods and SIP request
//! floods from many source addresses, and the agent's RSS and fd count
//! from /proc. Every loop is bounded in count and time; every address is
//! one of the test ranges (checked).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    testnet::{self, Topology},
    testua::{self, UaConn},
};

/// TLS record and handshake constants (RFC 5246 §6.2.1, §7.4; RFC 8446 §4).
const CT_HANDSHAKE: u8 = 22;
const CT_ALERT: u8 = 21;
const HS_CLIENT_HELLO: u8 = 1;
/// The alert a server sends for a version it does not speak (RFC 5246 §7.2.2).
pub const ALERT_PROTOCOL_VERSION: u8 = 70;

/// A ClientHello in TLS records, written here byte by byte because no TLS
/// library will produce the hellos an attacker sends: `version` is the
/// legacy `client_version` (0x0301 TLS 1.0, 0x0302 TLS 1.1, 0x0303 TLS
/// 1.2) and no `supported_versions` extension is sent, so the offer is
/// that version only; `pad` bytes of a padding extension (RFC 7685) are
/// added; `declared` overrides the handshake length field (a lie).
pub fn client_hello(version: u16, pad: usize, declared: Option<u32>) -> Vec<u8> {
    hello_with(version, pad, declared, true)
}

/// A ClientHello as a real TLS 1.0/1.1 client sends it: `version`, no
/// signature_algorithms (a TLS 1.2 extension; OpenSSL's `s_client -tls1`
/// sends none), no supported_versions.
pub fn old_client_hello(version: u16) -> Vec<u8> {
    hello_with(version, 0, None, false)
}

fn hello_with(version: u16, pad: usize, declared: Option<u32>, sigalgs: bool) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend((0..32u8).map(|i| i.wrapping_mul(37)));
    body.push(0); // session id
                  // AES-128-GCM/ECDHE-RSA, ECDHE-ECDSA; AES-128-CBC-SHA (TLS 1.0 era).
    let suites: [u16; 4] = [0xc02f, 0xc02b, 0xc013, 0x002f];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    let mut ext = Vec::new();
    // supported_groups: x25519, secp256r1.
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    // ec_point_formats: uncompressed.
    ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256.
    if sigalgs {
        ext.extend_from_slice(&[0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04]);
    }
    let mut left = pad;
    while left > 0 {
        let n = left.min(0xfff0);
        ext.extend_from_slice(&[0x00, 0x15]);
        ext.extend_from_slice(&(n as u16).to_be_bytes());
        ext.extend(std::iter::repeat_n(0u8, n));
        left -= n;
    }
    // The extensions' length is a u16: a larger block is sent with a
    // truncated length, which is what an oversized hello is.
    body.extend_from_slice(&((ext.len() & 0xffff) as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let len = declared.unwrap_or(body.len() as u32);
    let mut hs = vec![HS_CLIENT_HELLO];
    hs.extend_from_slice(&len.to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut out = Vec::new();
    for chunk in hs.chunks(16384) {
        out.push(CT_HANDSHAKE);
        // Record version 0x0301 as clients send for compatibility.
        out.extend_from_slice(&[0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// What the server did with what we sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerReply {
    /// A TLS alert record (level, description), then (maybe) the close.
    Alert(u8, u8),
    /// Other bytes (e.g. a ServerHello): the first record's content type.
    Record(u8),
    /// Closed (EOF or reset) without a byte.
    Closed,
    /// Nothing and still open after the wait.
    Silent,
}

/// Sends `bytes` on `s` and reads the server's first reply within `wait`.
pub fn send_and_read(s: &mut TcpStream, bytes: &[u8], wait: Duration) -> ServerReply {
    let _ = s.set_write_timeout(Some(wait));
    if s.write_all(bytes).is_err() {
        // The server closed while we wrote (it refused early): what did it say?
        return read_reply(s, Duration::from_millis(500));
    }
    read_reply(s, wait)
}

/// The server's first reply on `s` within `wait`.
pub fn read_reply(s: &mut TcpStream, wait: Duration) -> ServerReply {
    let deadline = Instant::now() + wait;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return if buf.is_empty() {
                ServerReply::Silent
            } else {
                ServerReply::Record(buf[0])
            };
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut chunk) {
            Ok(0) | Err(_) if buf.is_empty() => {
                // A read timeout is an error too: distinguish by the clock.
                if Instant::now() >= deadline {
                    return ServerReply::Silent;
                }
                return ServerReply::Closed;
            }
            Ok(0) | Err(_) => return ServerReply::Record(buf[0]),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf[0] == CT_ALERT && buf.len() >= 7 {
                    return ServerReply::Alert(buf[5], buf[6]);
                }
                if buf[0] != CT_ALERT && buf.len() >= 5 {
                    return ServerReply::Record(buf[0]);
                }
            }
        }
    }
}

/// Whether the server closed `s` (EOF or reset) — without blocking.
pub fn is_closed(s: &TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut b = [0u8; 1];
    let closed = match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = s.set_nonblocking(false);
    closed
}

/// Opens `per_source` TCP connections from each of `sources` (in `ns`) to
/// `to`; each sends `first` (nothing, or a partial ClientHello) and then
/// stalls. Connections refused at connect are not returned.
pub fn stalled_handshakes(
    topo: &Topology,
    ns: &str,
    sources: &[IpAddr],
    per_source: usize,
    to: SocketAddr,
    first: &[u8],
) -> Vec<TcpStream> {
    let mut out = Vec::new();
    for src in sources {
        assert!(testnet::is_test_addr(*src), "{src} is not a test address");
        for _ in 0..per_source {
            if let Ok(mut s) = topo.tcp_connect(ns, SocketAddr::new(*src, 0), to) {
                if !first.is_empty() {
                    let _ = s.write_all(first);
                }
                out.push(s);
            }
        }
    }
    out
}

/// Full TLS handshakes opened and dropped as fast as possible from each of
/// `sources` (one task each, in `ns`) to `to`, until `within` is over or
/// `max` handshakes are done; returns (completed, failed).
pub fn handshake_flood(
    ns: &str,
    sources: &[IpAddr],
    to: SocketAddr,
    ca: &Path,
    within: Duration,
    max: usize,
) -> (usize, usize) {
    let sources = sources.to_vec();
    let ca = ca.to_owned();
    testnet::in_ns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let cfg = testua::client_config(&ca).expect("client config");
            let deadline = tokio::time::Instant::now() + within;
            let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for src in sources {
                assert!(testnet::is_test_addr(src), "{src} is not a test address");
                let (cfg, done, failed) = (cfg.clone(), done.clone(), failed.clone());
                tasks.push(tokio::spawn(async move {
                    use std::sync::atomic::Ordering::Relaxed;
                    while tokio::time::Instant::now() < deadline
                        && done.load(Relaxed) + failed.load(Relaxed) < max
                    {
                        let ok = async {
                            let sock = tokio::net::TcpSocket::new_v4().ok()?;
                            sock.bind(SocketAddr::new(src, 0)).ok()?;
                            let tcp = sock.connect(to).await.ok()?;
                            let name =
                                rustls_pki_types::ServerName::try_from(testua::EDGE_TLS_NAME)
                                    .ok()?;
                            tokio_rustls::TlsConnector::from(cfg.clone())
                                .connect(name, tcp)
                                .await
                                .ok()
                        };
                        match tokio::time::timeout(Duration::from_secs(3), ok).await {
                            Ok(Some(tls)) => {
                                done.fetch_add(1, Relaxed);
                                drop(tls);
                            }
                            _ => {
                                failed.fetch_add(1, Relaxed);
                                // Refused (per-source cap): do not spin.
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            use std::sync::atomic::Ordering::Relaxed;
            (done.load(Relaxed), failed.load(Relaxed))
        })
    })
    .expect("handshake flood in its namespace")
}

/// A SIP request to the edge at `edge` from `via` (a fresh transaction).
pub fn request(method: &str, via: SocketAddr, edge: &str, call_id: Option<&str>) -> String {
    let call_id = call_id.map_or_else(|| testua::unique("fl-"), str::to_owned);
    let (ruri, to) = match method {
        "REGISTER" => (
            "sip:peer.example.net".to_owned(),
            "<sip:flood@peer.example.net>".to_owned(),
        ),
        "INVITE" => (format!("sip:nobody@{edge}"), format!("<sip:nobody@{edge}>")),
        _ => (format!("sip:{edge}"), format!("<sip:{edge}>")),
    };
    format!(
        "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS {via};branch=z9hG4bK{};rport\r\nMax-Forwards: 70\r\nFrom: <sip:flood@example.org>;tag={}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: 1 {method}\r\nContact: <sip:flood@{via};transport=tls>\r\nContent-Length: 0\r\n\r\n",
        testua::unique("b"),
        testua::unique("t"),
    )
}

/// What a SIP flood got back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodTally {
    /// Requests sent.
    pub sent: usize,
    /// Responses with status 503.
    pub refused: usize,
    /// Of those, with a Retry-After of at least 1 s.
    pub retry_after: usize,
    /// Other final responses (the admitted ones' answers).
    pub other_final: usize,
    /// Provisional responses.
    pub provisional: usize,
}

impl FloodTally {
    /// Adds another tally.
    pub fn add(&mut self, o: FloodTally) {
        self.sent += o.sent;
        self.refused += o.refused;
        self.retry_after += o.retry_after;
        self.other_final += o.other_final;
        self.provisional += o.provisional;
    }
}

/// Sends `n` requests `method` on `conn` (each a new transaction, or all
/// the same one when `same` is given: a retransmission storm), then reads
/// responses until `n` final ones arrived or nothing came for 2 s.
pub async fn sip_flood(
    conn: &mut UaConn,
    method: &str,
    n: usize,
    edge: &str,
    same: Option<&str>,
) -> FloodTally {
    sip_flood_within(conn, method, n, edge, same, Duration::from_secs(30)).await
}

/// [`sip_flood`], reading responses for at most `within`.
pub async fn sip_flood_within(
    conn: &mut UaConn,
    method: &str,
    n: usize,
    edge: &str,
    same: Option<&str>,
    within: Duration,
) -> FloodTally {
    let mut t = FloodTally::default();
    let via = conn.local;
    let fixed = same.map(|_| request(method, via, edge, same));
    for _ in 0..n {
        let msg = fixed
            .clone()
            .unwrap_or_else(|| request(method, via, edge, None));
        if conn.send(&msg).await.is_err() {
            break;
        }
        t.sent += 1;
    }
    let deadline = Instant::now() + within;
    while t.refused + t.other_final < t.sent && Instant::now() < deadline {
        let quiet = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(2));
        let Ok(m) = conn.recv(quiet).await else {
            break;
        };
        match m.status() {
            Some(503) => {
                t.refused += 1;
                if m.header("Retry-After").is_some_and(|v| {
                    v.split(';')
                        .next()
                        .and_then(|s| s.trim().parse::<u32>().ok())
                        .is_some_and(|s| s >= 1)
                }) {
                    t.retry_after += 1;
                }
            }
            Some(c) if c < 200 => t.provisional += 1,
            Some(_) => t.other_final += 1,
            None => {}
        }
    }
    t
}

/// Resident set size of `pid` in kB (0 when unreadable).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Open file descriptors of `pid` (0 when unreadable).
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Waits (up to `within`) until `pid` has at most `limit` fds; returns the
/// count seen last.
pub fn wait_fds_at_most(pid: u32, limit: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = fds(pid);
        if n <= limit || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads a source's whole reply on a plaintext connection: used to check
/// that SIP sent to the TLS port gets no SIP answer.
pub fn read_all(s: &mut TcpStream, wait: Duration) -> Vec<u8> {
    let _ = s.set_read_timeout(Some(wait));
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// IPv4 addresses as `IpAddr`s.
pub fn ips(v: &[std::net::Ipv4Addr]) -> Vec<IpAddr> {
    v.iter().copied().map(IpAddr::V4).collect()
}
