//! In-process integration test of the optional internal UDP listener on
//! loopback: a legacy UDP user agent (a plain `tokio::net::UdpSocket`)
//! registers and calls through `sip_edge::transport::start` to an external
//! TLS user agent (routed via `[[route]]`), receives an inbound INVITE as a
//! datagram to its source port (RFC 3581 / RFC 5626 flow reuse over UDP),
//! sees the edge retransmit what it ignored (Timer A, RFC 3261 §17.1.1.2),
//! and survives malformed datagrams (§18.3). Ports are chosen by the OS,
//! certificates are throwaway rcgen ones, media is a recording double, and
//! every wait is bounded.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use sip_edge::{
    config::Config,
    media::{DialogKey, EndReason, MediaControl, MediaError, SdpEvent, SdpRole, Side},
    sip::{
        framer::{Frame, Framer, FramerLimits, KeepAliveRole},
        message::Message,
    },
    transport,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Sdp(SdpRole, Side),
    End(EndReason),
}

/// MediaControl double: records what the core asks, marks the body.
struct Recorder(Arc<Mutex<Vec<Call>>>);

impl MediaControl for Recorder {
    fn on_sdp(&mut self, ev: &SdpEvent<'_>, _now: Instant) -> Result<Vec<u8>, MediaError> {
        self.0
            .lock()
            .unwrap()
            .push(Call::Sdp(ev.role, ev.from_side));
        let mut b = ev.body.to_vec();
        b.extend_from_slice(b"a=x-edge:rewritten\r\n");
        Ok(b)
    }
    fn on_dialog_end(&mut self, _: &DialogKey, _: Option<&str>, r: EndReason, _: Instant) {
        self.0.lock().unwrap().push(Call::End(r));
    }
    fn on_tick(&mut self, _now: Instant) -> Vec<DialogKey> {
        Vec::new()
    }
}

/// Throwaway PKI: a CA, the edge's leaf and the external UA's leaf.
struct Certs {
    dir: tempfile::TempDir,
    peer_cert: String,
    peer_key: String,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let issue = |names: &[&str]| {
            let key = KeyPair::generate().unwrap();
            let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (edge_cert, edge_key) = issue(&["edge.atlanta.example.com"]);
        let (peer_cert, peer_key) = issue(&["biloxi.example.com"]);
        for (name, text) in [
            ("ca.pem", ca.pem()),
            ("edge.pem", edge_cert),
            ("edge.key", edge_key),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        Certs {
            dir,
            peer_cert,
            peer_key,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for c in transport::tls::load_certs(Path::new(&self.path("ca.pem"))).unwrap() {
            roots.add(c).unwrap();
        }
        roots
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A SIP peer over one TLS stream (the external side).
struct TlsUa<S> {
    io: S,
    framer: Framer,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> TlsUa<S> {
    async fn send(&mut self, text: &str) {
        self.io.write_all(text.as_bytes()).await.unwrap();
    }

    async fn recv(&mut self) -> Message {
        let read = async {
            let mut buf = [0u8; 8192];
            loop {
                if let Some(Frame::Message(m)) = self.framer.next_frame().unwrap() {
                    return Message::from_frame(&m).unwrap();
                }
                let n = self.io.read(&mut buf).await.unwrap();
                assert!(n > 0, "the edge closed the TLS connection");
                self.framer.push(&buf[..n]).unwrap();
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("no message from the edge over TLS")
    }

    async fn expect_status(&mut self, code: u16) -> Message {
        let m = self.recv().await;
        assert_eq!(
            m.status(),
            Some(code),
            "{}",
            String::from_utf8_lossy(&m.to_bytes())
        );
        m
    }

    async fn expect_request(&mut self, method: &str) -> Message {
        let m = self.recv().await;
        assert!(
            m.method().is_some_and(|x| x.is(method)),
            "wanted {method}: {}",
            String::from_utf8_lossy(&m.to_bytes())
        );
        m
    }
}

/// The legacy client: one UDP socket, talking to the edge's UDP listener.
struct UdpUa {
    sock: UdpSocket,
    edge: SocketAddr,
}

impl UdpUa {
    async fn new(edge: SocketAddr) -> UdpUa {
        UdpUa {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            edge,
        }
    }

    fn port(&self) -> u16 {
        self.sock.local_addr().unwrap().port()
    }

    async fn send(&self, text: &str) {
        self.sock.send_to(text.as_bytes(), self.edge).await.unwrap();
    }

    /// The next datagram, asserting it came from the edge's UDP listener.
    async fn recv_raw(&self, within: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65_535];
        let (n, from) = tokio::time::timeout(within, self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        assert_eq!(
            from, self.edge,
            "datagrams come from the edge's UDP listener"
        );
        buf.truncate(n);
        Some(buf)
    }

    async fn recv(&self) -> Message {
        let raw = self
            .recv_raw(WAIT)
            .await
            .expect("no datagram from the edge");
        Message::parse(&raw).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&raw)))
    }

    async fn expect_status(&self, code: u16) -> Message {
        let m = self.recv().await;
        assert_eq!(
            m.status(),
            Some(code),
            "{}",
            String::from_utf8_lossy(&m.to_bytes())
        );
        m
    }

    fn via(&self, branch: &str) -> String {
        format!(
            "Via: SIP/2.0/UDP 127.0.0.1:{};branch={branch};rport\r\n",
            self.port()
        )
    }
}

/// A UAS response to `req` (§8.2.6): Via, Record-Route, From, Call-ID,
/// CSeq copied, To tagged.
fn response(req: &Message, code: u16, tag: &str, extra: &str, body: &str) -> String {
    let mut s = format!("SIP/2.0 {code} Test\r\n");
    for h in req.headers() {
        let name = h.name.to_ascii_lowercase();
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
        .contains(&name.as_str())
        {
            s += &format!("{}: {}\r\n", h.name, h.value);
        } else if name == "to" || name == "t" {
            let tag = if h.value.contains("tag=") {
                String::new()
            } else {
                format!(";tag={tag}")
            };
            s += &format!("To: {}{tag}\r\n", h.value);
        }
    }
    s += extra;
    if !body.is_empty() {
        s += "Content-Type: application/sdp\r\n";
    }
    s + &format!("Content-Length: {}\r\n\r\n{body}", body.len())
}

/// Route headers for a request inside the dialog a 2xx/request set up.
fn routes(rr_source: &Message, reverse: bool) -> String {
    let mut l = rr_source.name_addrs("Record-Route").unwrap();
    if reverse {
        l.reverse();
    }
    l.iter()
        .map(|r| format!("Route: <{}>\r\n", r.uri))
        .collect()
}

const SDP_ALICE: &str = "v=0\r\no=alice 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\nm=audio 49172 RTP/AVP 0\r\n";
const SDP_BOB: &str = "v=0\r\no=bob 1 1 IN IP4 198.51.100.2\r\ns=-\r\nc=IN IP4 198.51.100.2\r\nt=0 0\r\nm=audio 3456 RTP/AVP 0\r\n";

struct Edge {
    certs: Certs,
    running: transport::Running,
    peer: TcpListener,
    peer_tls: TlsAcceptor,
    calls: Arc<Mutex<Vec<Call>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Edge {
    /// An edge on loopback; `udp` adds `internal_udp_listen`. Both test
    /// domains route to one external TLS UA (it also acts as registrar).
    async fn start(udp: bool) -> Edge {
        let certs = Certs::new();
        let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer_port = peer.local_addr().unwrap().port();
        let peer_cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                CertificateDer::pem_slice_iter(certs.peer_cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(certs.peer_key.as_bytes()).unwrap(),
            )
            .unwrap();
        let udp_line = if udp {
            "internal_udp_listen = \"127.0.0.1:0\""
        } else {
            ""
        };
        let mut toml = format!(
            "[[interface]]\nname = \"int0\"\nrole = \"internal\"\n[addresses]\ninternal = [\"10.77.0.1\"]\npublic = [\"203.0.113.1\"]\n[media]\nport_ranges = [\"40000-40999\"]\n[proxy]\ninternal_listen = \"127.0.0.1:0\"\nexternal_listen = \"127.0.0.1:0\"\n{udp_line}\ncert = \"{}\"\nkey = \"{}\"\nca_roots = \"{}\"\n",
            certs.path("edge.pem"),
            certs.path("edge.key"),
            certs.path("ca.pem"),
        );
        for domain in ["biloxi.example.com", "atlanta.example.com"] {
            toml += &format!("[[route]]\ndomain = \"{domain}\"\nhost = \"127.0.0.1\"\nport = {peer_port}\ntls_name = \"biloxi.example.com\"\n");
        }
        let cfg = Config::from_toml(&toml).unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = transport::start(&cfg, Box::new(Recorder(calls.clone())), async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        Edge {
            certs,
            running,
            peer,
            peer_tls: TlsAcceptor::from(Arc::new(peer_cfg)),
            calls,
            _stop: stop,
        }
    }

    fn udp(&self) -> SocketAddr {
        self.running.internal_udp.expect("UDP listener configured")
    }

    /// The external UA accepts the edge's outgoing TLS connection.
    async fn accept_peer(&self) -> TlsUa<tokio_rustls::server::TlsStream<TcpStream>> {
        let (tcp, _) = tokio::time::timeout(WAIT, self.peer.accept())
            .await
            .expect("edge never connected")
            .unwrap();
        TlsUa {
            io: self.peer_tls.accept(tcp).await.unwrap(),
            framer: Framer::new(KeepAliveRole::Responder, FramerLimits::default()),
        }
    }

    /// An external UA connecting to the edge's external TLS listener.
    async fn connect_external(&self) -> TlsUa<tokio_rustls::client::TlsStream<TcpStream>> {
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.certs.roots())
            .with_no_client_auth();
        let tcp = TcpStream::connect(self.running.external).await.unwrap();
        let name = ServerName::try_from("edge.atlanta.example.com").unwrap();
        TlsUa {
            io: TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .unwrap(),
            framer: Framer::new(KeepAliveRole::Initiator, FramerLimits::default()),
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn udp_client_registers_calls_out_and_receives_a_retransmitted_inbound_invite() {
    let edge = Edge::start(true).await;
    let alice = UdpUa::new(edge.udp()).await;
    let port = alice.port();

    // REGISTER over UDP; the external UA plays the registrar.
    alice
        .send(&format!(
            "REGISTER sip:atlanta.example.com SIP/2.0\r\n{}Max-Forwards: 70\r\nFrom: <sip:alice@atlanta.example.com>;tag=r1\r\nTo: <sip:alice@atlanta.example.com>\r\nCall-ID: reg1\r\nCSeq: 1 REGISTER\r\nContact: <sip:alice@127.0.0.1:{port}>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n",
            alice.via("z9hG4bKreg1")
        ))
        .await;
    let mut bob = edge.accept_peer().await;
    let reg = bob.expect_request("REGISTER").await;
    assert!(
        reg.header("Path").is_some(),
        "Path flow token for the UDP flow"
    );
    let contact = reg.name_addrs("Contact").unwrap()[0].uri.clone();
    assert!(
        !contact.contains(&format!("alice@127.0.0.1:{port}")),
        "client address hidden: {contact}"
    );
    bob.send(&response(
        &reg,
        200,
        "reg",
        &format!("Contact: <{contact}>;expires=600\r\n"),
        "",
    ))
    .await;
    let ok = alice.expect_status(200).await;
    let via = ok.top_via().unwrap();
    assert_eq!(
        via.params.get("rport"),
        Some(Some(port.to_string().as_str())),
        "RFC 3581 rport"
    );
    assert_eq!(via.params.get("received"), Some(Some("127.0.0.1")));

    // Outbound call: INVITE / 100 / 180 / 200 / ACK / BYE / 200.
    alice
        .send(&format!(
            "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n{}Max-Forwards: 70\r\nFrom: <sip:alice@atlanta.example.com>;tag=a1\r\nTo: <sip:bob@biloxi.example.com>\r\nCall-ID: out1\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@127.0.0.1:{port}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{SDP_ALICE}",
            alice.via("z9hG4bKout1"),
            SDP_ALICE.len()
        ))
        .await;
    alice.expect_status(100).await;
    let inv = bob.expect_request("INVITE").await;
    assert!(String::from_utf8_lossy(inv.body()).contains("a=x-edge:rewritten"));
    let rr = inv.name_addrs("Record-Route").unwrap();
    assert_eq!(
        rr.last().unwrap().uri,
        format!("sip:127.0.0.1:{};transport=udp;lr", edge.udp().port()),
        "the client's side of the double Record-Route names the UDP listener"
    );
    bob.send(&response(&inv, 180, "b1", "", "")).await;
    alice.expect_status(180).await;
    bob.send(&response(
        &inv,
        200,
        "b1",
        "Contact: <sips:bob@127.0.0.1:5999>\r\n",
        SDP_BOB,
    ))
    .await;
    let ok = alice.expect_status(200).await;
    let remote = ok.name_addrs("Contact").unwrap()[0].uri.clone();
    let to = ok.header("To").unwrap().to_owned();
    alice
        .send(&format!(
            "ACK {remote} SIP/2.0\r\n{}{}Max-Forwards: 70\r\nFrom: <sip:alice@atlanta.example.com>;tag=a1\r\nTo: {to}\r\nCall-ID: out1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
            alice.via("z9hG4bKout1ack"),
            routes(&ok, true)
        ))
        .await;
    let ack = bob.expect_request("ACK").await;
    assert_eq!(
        ack.request_uri().unwrap().unwrap().to_string(),
        "sips:bob@127.0.0.1:5999"
    );
    alice
        .send(&format!(
            "BYE {remote} SIP/2.0\r\n{}{}Max-Forwards: 70\r\nFrom: <sip:alice@atlanta.example.com>;tag=a1\r\nTo: {to}\r\nCall-ID: out1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
            alice.via("z9hG4bKout1bye"),
            routes(&ok, true)
        ))
        .await;
    let bye = bob.expect_request("BYE").await;
    bob.send(&response(&bye, 200, "b1", "", "")).await;
    alice.expect_status(200).await;
    assert_eq!(
        edge.calls(),
        vec![
            Call::Sdp(SdpRole::Offer, Side::Internal),
            Call::Sdp(SdpRole::Answer, Side::External),
            Call::End(EndReason::Bye),
        ]
    );

    // Inbound: an external UA calls the AOR registered over UDP.
    let mut carol = edge.connect_external().await;
    carol
        .send(&format!(
            "INVITE sips:alice@atlanta.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.3:5061;branch=z9hG4bKin1\r\nMax-Forwards: 70\r\nFrom: <sips:carol@chicago.example.com>;tag=c1\r\nTo: <sips:alice@atlanta.example.com>\r\nCall-ID: in1\r\nCSeq: 1 INVITE\r\nContact: <sips:carol@198.51.100.3:5061>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{SDP_BOB}",
            SDP_BOB.len()
        ))
        .await;
    carol.expect_status(100).await;
    // The first copy is "lost": ignored. Timer A sends it again after T1.
    let first = alice
        .recv_raw(WAIT)
        .await
        .expect("INVITE datagram to the client's source port");
    let lost_at = Instant::now();
    let again = alice.recv_raw(WAIT).await.expect("INVITE retransmitted");
    let gap = lost_at.elapsed();
    assert_eq!(first, again, "retransmission is the same request");
    assert!(
        gap >= Duration::from_millis(300),
        "Timer A waits about T1, not {gap:?}"
    );
    let inv = Message::parse(&again).unwrap();
    assert!(inv.method().unwrap().is("INVITE"));
    assert_eq!(
        inv.request_uri().unwrap().unwrap().to_string(),
        format!("sip:alice@127.0.0.1:{port}")
    );
    let via = inv.top_via().unwrap();
    assert_eq!(
        (via.transport.as_str(), via.port),
        ("UDP", Some(edge.udp().port()))
    );
    assert!(String::from_utf8_lossy(inv.body()).contains("a=x-edge:rewritten"));
    // Busy: the edge ACKs the 486 hop by hop and relays it; Timer A stops.
    alice.send(&response(&inv, 486, "a9", "", "")).await;
    let ack = alice.recv().await;
    assert!(
        ack.method().unwrap().is("ACK"),
        "{}",
        String::from_utf8_lossy(&ack.to_bytes())
    );
    carol.expect_status(486).await;
    assert!(
        alice.recv_raw(Duration::from_millis(1600)).await.is_none(),
        "no retransmission after the final response"
    );
    let calls = edge.calls();
    assert_eq!(
        calls.get(3),
        Some(&Call::Sdp(SdpRole::Offer, Side::External)),
        "{calls:?}"
    );
    assert_eq!(
        calls.get(4),
        Some(&Call::End(EndReason::Failure(486))),
        "{calls:?}"
    );
}

#[tokio::test]
async fn malformed_datagrams_get_400_or_are_dropped_and_the_listener_lives() {
    let edge = Edge::start(true).await;
    let ua = UdpUa::new(edge.udp()).await;
    // Binary junk: nothing to answer to, dropped.
    ua.sock
        .send_to(&[0x16, 0x03, 0x01, 0xff, 0x00], edge.udp())
        .await
        .unwrap();
    ua.sock.send_to(b"", edge.udp()).await.unwrap();
    assert!(
        ua.recv_raw(Duration::from_millis(300)).await.is_none(),
        "junk datagrams are not answered"
    );
    // A request with Content-Length beyond the datagram: 400 (§18.3 "the
    // element SHOULD generate a 400", RFC 4475 §3.1.2.2).
    let options = |ua: &UdpUa, branch: &str, cl: usize| {
        format!(
            "OPTIONS sip:127.0.0.1:{} SIP/2.0\r\n{}Max-Forwards: 70\r\nFrom: <sip:probe@atlanta.example.com>;tag=p\r\nTo: <sip:127.0.0.1>\r\nCall-ID: {branch}\r\nCSeq: 1 OPTIONS\r\nContent-Length: {cl}\r\n\r\n",
            ua.edge.port(),
            ua.via(branch)
        )
    };
    ua.send(&options(&ua, "z9hG4bKshort", 40)).await;
    let r = ua.expect_status(400).await;
    assert_eq!(r.top_via().unwrap().branch(), Some("z9hG4bKshort"));
    // Parsable Via, broken header: 400 to the source.
    ua.send(&options(&ua, "z9hG4bKbad", 0).replace("Max-Forwards: 70", "Max-Forwards 70"))
        .await;
    let r = ua.expect_status(400).await;
    assert_eq!(r.top_via().unwrap().branch(), Some("z9hG4bKbad"));
    // CRLFCRLF keep-alive: CRLF pong.
    ua.send("\r\n\r\n").await;
    assert_eq!(ua.recv_raw(WAIT).await.as_deref(), Some(&b"\r\n"[..]));
    // Still serving: OPTIONS to the edge itself (UDP port names it) → 200.
    ua.send(&options(&ua, "z9hG4bKok", 0)).await;
    let ok = ua.expect_status(200).await;
    assert!(ok.header("Allow").is_some());
    // A second client on another port is its own pseudo-connection.
    let other = UdpUa::new(edge.udp()).await;
    other.send(&options(&other, "z9hG4bKok2", 0)).await;
    other.expect_status(200).await;
}

#[tokio::test]
async fn udp_listener_is_absent_unless_configured() {
    let edge = Edge::start(false).await;
    assert_eq!(edge.running.internal_udp, None);
    assert!(edge.running.internal_tcp.is_none());
    // Nothing listens for UDP on the internal TLS listener's port either.
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    probe
        .send_to(b"OPTIONS sip:x SIP/2.0\r\n\r\n", edge.running.internal)
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let got = tokio::time::timeout(Duration::from_millis(300), probe.recv_from(&mut buf)).await;
    assert!(
        !matches!(got, Ok(Ok(_))),
        "no UDP answer without internal_udp_listen"
    );
}

/// RFC 5626 §4.4.2: a UDP client's keep-alive is a STUN Binding request
/// (RFC 5389) on its SIP flow; the edge answers it with a Binding success
/// response (same transaction id) whose XOR-MAPPED-ADDRESS is the
/// client's source address, and ignores STUN that is not a request.
#[tokio::test]
async fn stun_binding_request_on_the_udp_listener_is_answered_with_the_source_address() {
    let edge = Edge::start(true).await;
    let ua = UdpUa::new(edge.udp()).await;
    let txid: [u8; 12] = *b"up-stun-txid";
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&txid);
    ua.sock.send_to(&req, edge.udp()).await.unwrap();
    let r = ua
        .recv_raw(WAIT)
        .await
        .expect("no STUN Binding response from the edge");
    assert_eq!(r.len(), 32, "{r:02x?}");
    assert_eq!(&r[..4], &[0x01, 0x01, 0x00, 0x0c], "success, 12 bytes");
    assert_eq!(&r[4..8], &[0x21, 0x12, 0xa4, 0x42]);
    assert_eq!(&r[8..20], &txid);
    assert_eq!(&r[20..24], &[0x00, 0x20, 0x00, 0x08], "XOR-MAPPED-ADDRESS");
    assert_eq!(r[25], 0x01, "IPv4");
    let port = u16::from_be_bytes([r[26], r[27]]) ^ 0x2112;
    let ip: Vec<u8> = r[28..32]
        .iter()
        .zip([0x21, 0x12, 0xa4, 0x42])
        .map(|(a, k)| a ^ k)
        .collect();
    assert_eq!(port, ua.port(), "mapped port is the client's source port");
    assert_eq!(ip, [127, 0, 0, 1]);
    // A Binding success response sent to the edge is not answered.
    let mut resp = r.clone();
    resp[8] ^= 1;
    ua.sock.send_to(&resp, edge.udp()).await.unwrap();
    assert!(ua.recv_raw(Duration::from_millis(300)).await.is_none());
    // The flow still carries SIP afterwards.
    ua.send("\r\n\r\n").await;
    assert_eq!(ua.recv_raw(WAIT).await.as_deref(), Some(&b"\r\n"[..]));
}
