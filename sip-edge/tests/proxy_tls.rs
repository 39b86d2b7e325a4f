//! In-process integration test of the TLS proxy on loopback 127.0.0.1: an
//! internal test UA (tokio-rustls client) calls a domain routed to an
//! external test UA (TLS listener), through `sip_edge::transport::start`
//! with throwaway rcgen certificates in a tempdir and a recording
//! `MediaControl` double. Every wait is bounded by a timeout.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::ServerName;
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
    io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Sdp(SdpRole, Side),
    End(EndReason),
}

struct Recording(Arc<Mutex<Vec<Call>>>);

impl MediaControl for Recording {
    fn on_sdp(&mut self, ev: &SdpEvent<'_>, _now: Instant) -> Result<Vec<u8>, MediaError> {
        self.0
            .lock()
            .unwrap()
            .push(Call::Sdp(ev.role, ev.from_side));
        let side = match ev.from_side {
            Side::Internal => "for-external",
            Side::External => "for-internal",
        };
        Ok(format!("{}a=x-edge:{side}\r\n", String::from_utf8_lossy(ev.body)).into_bytes())
    }
    fn on_dialog_end(
        &mut self,
        _d: &DialogKey,
        _t: Option<&str>,
        reason: EndReason,
        _now: Instant,
    ) {
        self.0.lock().unwrap().push(Call::End(reason));
    }
    fn on_tick(&mut self, _now: Instant) -> Vec<DialogKey> {
        Vec::new()
    }
}

struct Pki {
    _dir: tempfile::TempDir,
    ca_pem: std::path::PathBuf,
    edge: (std::path::PathBuf, std::path::PathBuf),
    peer: (String, String),
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>| {
        let k = KeyPair::generate().unwrap();
        let c = CertificateParams::new(names)
            .unwrap()
            .signed_by(&k, &ca, &ca_key)
            .unwrap();
        (c.pem(), k.serialize_pem())
    };
    let (edge_cert, edge_key) = leaf(vec!["edge.atlanta.example.com".into(), "127.0.0.1".into()]);
    let peer = leaf(vec!["biloxi.example.com".into()]);
    let w = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    Pki {
        ca_pem: w("ca.pem", &ca.pem()),
        edge: (w("edge.pem", &edge_cert), w("edge.key", &edge_key)),
        peer,
        _dir: dir,
    }
}

fn ca_roots(p: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in sip_edge::transport::tls::load_certs(p).unwrap() {
        roots.add(c).unwrap();
    }
    roots
}

/// A test user agent on one TLS connection.
struct Ua<S> {
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    framer: Framer,
    /// CRLF keep-alive pongs received so far.
    pongs: u32,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite> Ua<S> {
    fn new(s: S, role: KeepAliveRole) -> Self {
        let (rd, wr) = tokio::io::split(s);
        Ua {
            rd,
            wr,
            framer: Framer::new(role, FramerLimits::default()),
            pongs: 0,
        }
    }

    async fn send(&mut self, text: &str) {
        self.wr.write_all(text.as_bytes()).await.unwrap();
    }

    async fn recv(&mut self) -> Message {
        let fut = async {
            let mut buf = [0u8; 4096];
            loop {
                match self.framer.next_frame().unwrap() {
                    Some(Frame::Message(m)) => return Message::from_frame(&m).unwrap(),
                    Some(Frame::Pong) => {
                        self.pongs += 1;
                        continue;
                    }
                    Some(_) => continue,
                    None => {}
                }
                let n = self.rd.read(&mut buf).await.unwrap();
                assert!(n > 0, "connection closed by the edge");
                self.framer.push(&buf[..n]).unwrap();
            }
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .expect("timed out waiting for a message")
    }

    async fn recv_status(&mut self, code: u16) -> Message {
        let m = self.recv().await;
        assert_eq!(
            m.status(),
            Some(code),
            "{}",
            String::from_utf8_lossy(&m.to_bytes())
        );
        m
    }

    async fn recv_request(&mut self, method: &str) -> Message {
        let m = self.recv().await;
        assert!(
            m.method().is_some_and(|x| x.is(method)),
            "wanted {method}: {}",
            String::from_utf8_lossy(&m.to_bytes())
        );
        m
    }
}

/// The response a UAS sends to `req` (§8.2.6).
fn reply(req: &Message, code: u16, tag: &str, extra: &str, body: &str) -> String {
    let mut s = format!("SIP/2.0 {code} Whatever\r\n");
    for h in req.headers() {
        let n = h.name.to_ascii_lowercase();
        if ["via", "record-route", "from", "call-id", "cseq"].contains(&n.as_str()) {
            s.push_str(&format!("{}: {}\r\n", h.name, h.value));
        } else if n == "to" {
            let t = if h.value.contains("tag=") {
                String::new()
            } else {
                format!(";tag={tag}")
            };
            s.push_str(&format!("To: {}{t}\r\n", h.value));
        }
    }
    s.push_str(extra);
    if !body.is_empty() {
        s.push_str("Content-Type: application/sdp\r\n");
    }
    s.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s
}

const SDP_A: &str = "v=0\r\no=alice 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\nm=audio 49172 RTP/AVP 0\r\n";
const SDP_B: &str = "v=0\r\no=bob 1 1 IN IP4 198.51.100.2\r\ns=-\r\nc=IN IP4 198.51.100.2\r\nt=0 0\r\nm=audio 3456 RTP/AVP 0\r\n";

fn invite(call: &str, branch: &str, with_sdp: bool) -> String {
    let body = if with_sdp { SDP_A } else { "" };
    let ct = if with_sdp {
        "Content-Type: application/sdp\r\n"
    } else {
        ""
    };
    format!(
        "INVITE sips:bob@biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.2:5061;branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: Alice <sips:alice@atlanta.example.com>;tag=a-{call}\r\nTo: Bob <sips:bob@biloxi.example.com>\r\nCall-ID: {call}\r\nCSeq: 1 INVITE\r\nContact: <sips:alice@10.77.0.2:5061>\r\n{ct}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

type Client = Ua<tokio_rustls::client::TlsStream<TcpStream>>;
type Server = Ua<tokio_rustls::server::TlsStream<TcpStream>>;

struct Harness {
    pki: Pki,
    edge: transport::Running,
    peer_listener: TcpListener,
    peer_acceptor: TlsAcceptor,
    calls: Arc<Mutex<Vec<Call>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Harness {
    async fn start() -> Harness {
        let pki = pki();
        let peer_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer_port = peer_listener.local_addr().unwrap().port();
        let peer_cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            rustls::pki_types::CertificateDer::pem_slice_iter(pki.peer.0.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
            rustls::pki_types::PrivateKeyDer::from_pem_slice(pki.peer.1.as_bytes()).unwrap(),
        )
        .unwrap();
        use rustls::pki_types::pem::PemObject;
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
            external_listen = "127.0.0.1:0"
            cert = "{}"
            key = "{}"
            ca_roots = "{}"
            [[route]]
            domain = "biloxi.example.com"
            host = "127.0.0.1"
            port = {peer_port}
            tls_name = "biloxi.example.com"
            "#,
            pki.edge.0.display(),
            pki.edge.1.display(),
            pki.ca_pem.display()
        );
        let cfg = Config::from_toml(&toml).unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let edge = transport::start(&cfg, Box::new(Recording(calls.clone())), async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        Harness {
            pki,
            edge,
            peer_listener,
            peer_acceptor: TlsAcceptor::from(Arc::new(peer_cfg)),
            calls,
            _stop: stop,
        }
    }

    async fn connect(&self, to: SocketAddr) -> Client {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(ca_roots(&self.pki.ca_pem))
        .with_no_client_auth();
        let tcp = TcpStream::connect(to).await.unwrap();
        let tls = TlsConnector::from(Arc::new(cfg))
            .connect(
                ServerName::try_from("edge.atlanta.example.com").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        Ua::new(tls, KeepAliveRole::Initiator)
    }

    /// The external peer accepts the edge's outgoing connection.
    async fn accept_peer(&self) -> Server {
        let (tcp, _) = tokio::time::timeout(WAIT, self.peer_listener.accept())
            .await
            .expect("edge never connected")
            .unwrap();
        let tls = self.peer_acceptor.accept(tcp).await.unwrap();
        Ua::new(tls, KeepAliveRole::Responder)
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

fn route_set(rr: &Message, reverse: bool) -> String {
    let mut list = rr.name_addrs("Record-Route").unwrap();
    if reverse {
        list.reverse();
    }
    list.iter()
        .map(|r| format!("Route: <{}>\r\n", r.uri))
        .collect()
}

#[tokio::test]
async fn call_180_200_ack_bye_end_to_end() {
    let h = Harness::start().await;
    let mut alice = h.connect(h.edge.internal).await;
    alice.send(&invite("call1", "z9hG4bKc1", true)).await;
    alice.recv_status(100).await;
    let mut bob = h.accept_peer().await;
    let inv = bob.recv_request("INVITE").await;
    let top = inv.top_via().unwrap();
    assert_eq!(
        top.port,
        Some(h.edge.external.port()),
        "edge Via on the external side"
    );
    assert_eq!(
        inv.name_addrs("Record-Route").unwrap().len(),
        2,
        "double Record-Route"
    );
    assert!(
        !inv.header("Contact").unwrap().contains("10.77.0.2"),
        "internal Contact hidden"
    );
    assert!(String::from_utf8_lossy(inv.body()).contains("a=x-edge:for-external"));
    assert_eq!(
        inv.header("Content-Length")
            .map(|l| l.parse::<usize>().unwrap()),
        Some(inv.body().len())
    );

    bob.send(&reply(&inv, 180, "bob1", "", "")).await;
    alice.recv_status(180).await;
    bob.send(&reply(
        &inv,
        200,
        "bob1",
        "Contact: <sips:bob@127.0.0.1:5999>\r\n",
        SDP_B,
    ))
    .await;
    let ok = alice.recv_status(200).await;
    assert!(String::from_utf8_lossy(ok.body()).contains("a=x-edge:for-internal"));
    let contact = ok.name_addrs("Contact").unwrap()[0].uri.clone();
    assert!(
        contact.contains(&format!(":{}", h.edge.internal.port())),
        "callee Contact is an internal-side edge URI: {contact}"
    );

    alice
        .send(&format!(
            "ACK {contact} SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.2:5061;branch=z9hG4bKc1ack\r\n{}Max-Forwards: 70\r\nFrom: Alice <sips:alice@atlanta.example.com>;tag=a-call1\r\nTo: {}\r\nCall-ID: call1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
            route_set(&ok, true),
            ok.header("To").unwrap()
        ))
        .await;
    let ack = bob.recv_request("ACK").await;
    assert_eq!(
        ack.request_uri().unwrap().unwrap().to_string(),
        "sips:bob@127.0.0.1:5999"
    );

    let alice_contact = inv.name_addrs("Contact").unwrap()[0].uri.clone();
    bob.send(&format!(
        "BYE {alice_contact} SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKb1bye\r\n{}Max-Forwards: 70\r\nFrom: {}\r\nTo: {}\r\nCall-ID: call1\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
        route_set(&inv, false),
        ok.header("To").unwrap(),
        inv.header("From").unwrap()
    ))
    .await;
    let bye = alice.recv_request("BYE").await;
    assert_eq!(
        bye.request_uri().unwrap().unwrap().to_string(),
        "sips:alice@10.77.0.2:5061"
    );
    alice.send(&reply(&bye, 200, "x", "", "")).await;
    bob.recv_status(200).await;
    assert_eq!(
        h.calls(),
        vec![
            Call::Sdp(SdpRole::Offer, Side::Internal),
            Call::Sdp(SdpRole::Answer, Side::External),
            Call::End(EndReason::Bye)
        ]
    );
}

#[tokio::test]
async fn cancel_flow() {
    let h = Harness::start().await;
    let mut alice = h.connect(h.edge.internal).await;
    let inv_text = invite("call2", "z9hG4bKc2", true);
    alice.send(&inv_text).await;
    alice.recv_status(100).await;
    let mut bob = h.accept_peer().await;
    let inv = bob.recv_request("INVITE").await;
    bob.send(&reply(&inv, 180, "bob2", "", "")).await;
    alice.recv_status(180).await;
    let cancel = inv_text
        .split("Contact:")
        .next()
        .unwrap()
        .replacen("INVITE sips", "CANCEL sips", 1)
        .replace("1 INVITE", "1 CANCEL")
        + "Content-Length: 0\r\n\r\n";
    alice.send(&cancel).await;
    alice.recv_status(200).await;
    let c = bob.recv_request("CANCEL").await;
    assert_eq!(
        c.top_via().unwrap().branch(),
        inv.top_via().unwrap().branch()
    );
    bob.send(&reply(&c, 200, "bob2", "", "")).await;
    bob.send(&reply(&inv, 487, "bob2", "", "")).await;
    bob.recv_request("ACK").await;
    let r = alice.recv_status(487).await;
    let ack = inv_text
        .split("Contact:")
        .next()
        .unwrap()
        .replacen("INVITE sips", "ACK sips", 1)
        .replace("1 INVITE", "1 ACK")
        .replace(
            "To: Bob <sips:bob@biloxi.example.com>",
            &format!("To: {}", r.header("To").unwrap()),
        )
        + "Content-Length: 0\r\n\r\n";
    alice.send(&ack).await;
    assert_eq!(
        h.calls(),
        vec![
            Call::Sdp(SdpRole::Offer, Side::Internal),
            Call::End(EndReason::Cancel)
        ]
    );
}

#[tokio::test]
async fn busy_486_flow() {
    let h = Harness::start().await;
    let mut alice = h.connect(h.edge.internal).await;
    alice.send(&invite("call3", "z9hG4bKc3", true)).await;
    alice.recv_status(100).await;
    let mut bob = h.accept_peer().await;
    let inv = bob.recv_request("INVITE").await;
    bob.send(&reply(&inv, 486, "bob3", "", "")).await;
    let ack = bob.recv_request("ACK").await;
    assert_eq!(ack.to_tag().unwrap().as_deref(), Some("bob3"));
    alice.recv_status(486).await;
    assert_eq!(
        h.calls(),
        vec![
            Call::Sdp(SdpRole::Offer, Side::Internal),
            Call::End(EndReason::Failure(486))
        ]
    );
}

#[tokio::test]
async fn register_then_inbound_invite_over_the_registered_connection() {
    let h = Harness::start().await;
    let mut alice = h.connect(h.edge.internal).await;
    alice
        .send("REGISTER sips:biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.2:5061;branch=z9hG4bKr1\r\nMax-Forwards: 70\r\nFrom: <sips:alice@biloxi.example.com>;tag=r1\r\nTo: <sips:alice@biloxi.example.com>\r\nCall-ID: reg1\r\nCSeq: 1 REGISTER\r\nContact: <sips:alice@10.77.0.2:5061>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n")
        .await;
    let mut registrar = h.accept_peer().await;
    let reg = registrar.recv_request("REGISTER").await;
    let path = reg.name_addrs("Path").unwrap();
    assert_eq!(path.len(), 1, "RFC 3327 Path added");
    let bound = reg.name_addrs("Contact").unwrap()[0].uri.clone();
    assert!(!bound.contains("10.77.0.2"));
    registrar
        .send(&reply(
            &reg,
            200,
            "reg",
            &format!("Contact: <{bound}>;expires=600\r\n"),
            "",
        ))
        .await;
    let ok = alice.recv_status(200).await;
    assert_eq!(
        ok.name_addrs("Contact").unwrap()[0].uri,
        "sips:alice@10.77.0.2:5061"
    );

    // Carol, outside, calls alice's AOR through the external listener.
    let mut carol = h.connect(h.edge.external).await;
    carol
        .send("INVITE sips:alice@biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.3:5061;branch=z9hG4bKi1\r\nMax-Forwards: 70\r\nFrom: <sips:carol@chicago.example.com>;tag=c1\r\nTo: <sips:alice@biloxi.example.com>\r\nCall-ID: in1\r\nCSeq: 1 INVITE\r\nContact: <sips:carol@198.51.100.3:5061>\r\nContent-Length: 0\r\n\r\n")
        .await;
    carol.recv_status(100).await;
    let inv = alice.recv_request("INVITE").await;
    assert_eq!(
        inv.request_uri().unwrap().unwrap().to_string(),
        "sips:alice@10.77.0.2:5061"
    );
    assert_eq!(inv.top_via().unwrap().port, Some(h.edge.internal.port()));
    alice.send(&reply(&inv, 486, "al", "", "")).await;
    carol.recv_status(486).await;
}

#[tokio::test]
async fn malformed_input_gets_400_and_the_connection_survives() {
    let h = Harness::start().await;
    let mut alice = h.connect(h.edge.internal).await;
    alice.send("INVITE sips:bob@biloxi.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.2;branch=z9hG4bKm1\r\nthis is not a header\r\nCall-ID: bad1\r\nContent-Length: 0\r\n\r\n").await;
    let r = alice.recv_status(400).await;
    assert_eq!(r.call_id().unwrap(), "bad1");
    // Keep-alive ping answered, then a valid request on the same connection.
    alice.send("\r\n\r\n").await;
    let e = h.edge.internal;
    alice
        .send(&format!("OPTIONS sip:{}:{} SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.2;branch=z9hG4bKm2\r\nMax-Forwards: 70\r\nFrom: <sip:a@x>;tag=m\r\nTo: <sip:e@x>\r\nCall-ID: ok1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n", e.ip(), e.port()))
        .await;
    let ok = alice.recv_status(200).await;
    assert_eq!(ok.call_id().unwrap(), "ok1");
    assert_eq!(alice.pongs, 1, "the CRLFCRLF ping got its CRLF pong");
}

#[tokio::test]
async fn unreachable_route_gets_503() {
    let h = Harness::start().await;
    // Close the peer listener: connecting to the route is refused.
    // (The placeholder is bound before the old port is freed, so it can
    // never take the routed port.)
    let placeholder = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let Harness {
        pki,
        edge,
        peer_listener,
        peer_acceptor,
        calls,
        _stop,
    } = h;
    drop(peer_listener);
    let h2 = Harness {
        pki,
        edge,
        peer_listener: placeholder,
        peer_acceptor,
        calls,
        _stop,
    };
    let mut alice = h2.connect(h2.edge.internal).await;
    alice.send(&invite("call5", "z9hG4bKc5", false)).await;
    alice.recv_status(100).await;
    let r = alice.recv_status(503).await;
    assert!(r.header("Retry-After").is_some());
}
