//! Regression tests of the SIP transport for issue #14 (items 7 and 4),
//! in-process on loopback only (127.0.0.1-127.0.0.4): the real
//! `sip_edge::transport::start` with throwaway rcgen certificates in a
//! tempdir and a pass-through `MediaControl`; a plain-TCP internal listener
//! stands in for a client so the test can write raw bytes. Every wait is
//! bounded by a timeout.
//!
//! - A framing error whose head was delimited is answered (400/413/513)
//!   before the connection closes, and what the edge already had to say on
//!   that connection is written first.
//! - Outgoing connections leave from the edge's address on their side.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use sip_edge::{
    config::Config,
    media::{DialogKey, EndReason, MediaControl, MediaError, SdpEvent},
    sip::message::Message,
    transport::{self, Running},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const WAIT: Duration = Duration::from_secs(5);

/// Media layer double: bodies pass unchanged.
struct PassThrough;

impl MediaControl for PassThrough {
    fn on_sdp(&mut self, ev: &SdpEvent<'_>, _now: Instant) -> Result<Vec<u8>, MediaError> {
        Ok(ev.body.to_vec())
    }
    fn on_dialog_end(&mut self, _: &DialogKey, _: Option<&str>, _: EndReason, _: Instant) {}
    fn on_tick(&mut self, _now: Instant) -> Vec<DialogKey> {
        Vec::new()
    }
}

/// Throwaway CA and edge certificate (PEM files in a tempdir).
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["edge.example.com".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", ca.pem()),
        cert: write("edge.pem", cert.pem()),
        key: write("edge.key", key.serialize_pem()),
        _dir: dir,
    }
}

/// Starts the edge; `extra` goes into `[proxy]`, `route_port` is the
/// TLS next hop for biloxi.example.com on 127.0.0.1.
async fn edge(
    pki: &Pki,
    extra: &str,
    route_port: u16,
) -> (Running, tokio::sync::oneshot::Sender<()>) {
    let toml = format!(
        r#"
        [[interface]]
        name = "int0"
        role = "internal"
        [addresses]
        internal = ["10.77.0.1"]
        public = ["203.0.113.1"]
        [media]
        port_ranges = ["40000-40999"]
        [proxy]
        internal_listen = "127.0.0.1:0"
        external_listen = "127.0.0.2:0"
        internal_tcp_listen = "127.0.0.4:0"
        cert = "{}"
        key = "{}"
        ca_roots = "{}"
        {extra}
        [[route]]
        domain = "biloxi.example.com"
        host = "127.0.0.1"
        port = {route_port}
        tls_name = "biloxi.example.com"
        "#,
        pki.cert.display(),
        pki.key.display(),
        pki.ca.display()
    );
    let cfg = Config::from_toml(&toml).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = transport::start(&cfg, Box::new(PassThrough), async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    (running, stop)
}

/// Everything the edge writes until it closes the connection.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut all))
        .await
        .expect("the edge closes the connection")
        .unwrap();
    all
}

/// Splits a byte stream of SIP messages without bodies at each blank line.
fn messages(bytes: &[u8]) -> Vec<Message> {
    String::from_utf8_lossy(bytes)
        .split_inclusive("\r\n\r\n")
        .filter(|m| m.trim().len() > 2)
        .map(|m| Message::parse(m.as_bytes()).unwrap())
        .collect()
}

/// An OPTIONS for the edge itself (answered 200 by the edge), `edge` being
/// its internal TLS listener (the address its URIs carry).
fn options_to_edge(edge: SocketAddr) -> String {
    format!("OPTIONS sip:{edge} SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKopt1\r\nMax-Forwards: 70\r\nFrom: <sip:alice@atlanta.example.com>;tag=a1\r\nTo: <sip:{edge}>\r\nCall-ID: opt1@atlanta\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
}

fn malformed(start_line: &str, extra: &str) -> String {
    format!("{start_line}\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKbad1\r\nMax-Forwards: 70\r\nFrom: <sip:alice@atlanta.example.com>;tag=a1\r\nTo: <sip:bob@biloxi.example.com>\r\nCall-ID: bad1@atlanta\r\nCSeq: 1 INVITE\r\n{extra}\r\n")
}

/// Issue #14 item 7: a malformed start line, an oversized body and a head
/// over the limit each get an error response (400 / 413 / 513, with the
/// request's Via and Call-ID and a Warning) before the edge closes; before,
/// the connection closed without a word.
#[tokio::test]
async fn framing_errors_with_a_delimited_head_are_answered_before_the_close() {
    let pki = pki();
    let (edge, _stop) = edge(&pki, "", 9).await;
    let tcp = edge.internal_tcp.expect("TCP listener");
    let huge_header = format!("Subject: {}\r\n", "x".repeat(20 * 1024));
    let cases = [
        (
            malformed("INVITE sip:bob@biloxi.example.com", "Content-Length: 0\r\n"),
            400,
        ),
        (
            malformed(
                "INVITE sip:bob@biloxi.example.com SIP/2.0",
                "Content-Length: 10000000\r\n",
            ),
            413,
        ),
        (
            malformed("INVITE sip:bob@biloxi.example.com SIP/2.0", &huge_header),
            513,
        ),
    ];
    for (bytes, code) in cases {
        let mut s = TcpStream::connect(tcp).await.unwrap();
        s.write_all(bytes.as_bytes()).await.unwrap();
        let got = read_to_close(&mut s).await;
        let msgs = messages(&got);
        assert_eq!(msgs.len(), 1, "{code}: {}", String::from_utf8_lossy(&got));
        let r = &msgs[0];
        assert_eq!(r.status(), Some(code));
        assert_eq!(r.call_id().unwrap(), "bad1@atlanta");
        assert_eq!(
            r.top_via().unwrap().branch(),
            Some("z9hG4bKbad1"),
            "the client can match it"
        );
        assert!(
            r.header("Warning")
                .is_some_and(|w| w.starts_with("399 127.0.0.1 ")),
            "{r:?}"
        );
    }
}

/// Issue #14 item 7: what the edge answers to a request is still written
/// when the same connection then fails framing: the OPTIONS' 200 comes
/// first, then the 400, then the close.
#[tokio::test]
async fn a_response_for_a_closing_connection_is_written_before_the_close() {
    let pki = pki();
    let (edge, _stop) = edge(&pki, "", 9).await;
    let tcp = edge.internal_tcp.expect("TCP listener");
    let mut s = TcpStream::connect(tcp).await.unwrap();
    let both = format!(
        "{}{}",
        options_to_edge(edge.internal),
        malformed("INVITE sip:bob@biloxi.example.com", "Content-Length: 0\r\n")
    );
    s.write_all(both.as_bytes()).await.unwrap();
    let got = read_to_close(&mut s).await;
    let codes: Vec<Option<u16>> = messages(&got).iter().map(Message::status).collect();
    assert_eq!(
        codes,
        vec![Some(200), Some(400)],
        "{}",
        String::from_utf8_lossy(&got)
    );
}

/// Accepts one connection on `l` and returns the address it came from.
async fn source_of_next_connection(l: &TcpListener) -> SocketAddr {
    let (_s, peer) = tokio::time::timeout(WAIT, l.accept())
        .await
        .expect("the edge never connected to the next hop")
        .unwrap();
    peer
}

/// Sends a request from inside that the edge routes to the next hop.
async fn send_outbound_request(tcp: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(tcp).await.unwrap();
    let msg = "MESSAGE sip:bob@biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKsrc1\r\nMax-Forwards: 70\r\nFrom: <sip:alice@atlanta.example.com>;tag=a1\r\nTo: <sip:bob@biloxi.example.com>\r\nCall-ID: src1@atlanta\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n";
    s.write_all(msg.as_bytes()).await.unwrap();
    s
}

/// Issue #14 item 4: a connection the edge opens to an external next hop
/// leaves from the edge's external address (here 127.0.0.2, the external
/// listener's), the one its Via and Record-Route name, not whatever source
/// the kernel picks for the route (127.0.0.1 toward 127.0.0.1).
#[tokio::test]
async fn outgoing_connections_leave_from_the_sides_edge_address() {
    let pki = pki();
    let hop = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (edge, _stop) = edge(&pki, "", hop.local_addr().unwrap().port()).await;
    let _client = send_outbound_request(edge.internal_tcp.expect("TCP listener")).await;
    let src = source_of_next_connection(&hop).await;
    assert_eq!(src.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
}

/// Issue #14 item 4: `proxy.external_source_address` overrides it.
#[tokio::test]
async fn the_source_address_of_a_side_can_be_configured() {
    let pki = pki();
    let hop = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (edge, _stop) = edge(
        &pki,
        "external_source_address = \"127.0.0.3\"",
        hop.local_addr().unwrap().port(),
    )
    .await;
    let _client = send_outbound_request(edge.internal_tcp.expect("TCP listener")).await;
    let src = source_of_next_connection(&hop).await;
    assert_eq!(src.ip(), "127.0.0.3".parse::<IpAddr>().unwrap());
}
