//! Heap bytes the agent keeps per idle TLS connection (issue #12: ≤ 16 kB
//! of agent memory per idle TLS connection), counted by a global
//! allocator in this test binary: the real `sip_edge::transport::start`
//! (TLS accept path with the first-record check, connection tasks, the
//! driver and the proxy core's connection table) on 127.0.0.1, with the
//! production log subscriber installed (`logging::init("info")`: each
//! connection's span lives in its registry, as in the agent).
//!
//! Method: open N1 TLS connections (TLS 1.3, the rustls client defaults,
//! as the bench's clients) and leave them idle, read the live heap; open
//! N1 more, read again; bytes per idle connection = the difference / N1.
//! A reading is the least of the live counts sampled over a quiet second
//! once every client's handshake completed and the count stopped moving:
//! the driver's 1 s tick and 100 ms timers allocate and free around each
//! run, and the least sample is the state between them (the same at both
//! readings). With 2·N1 connections at the second reading, the driver's
//! and the proxy's hash tables are at the same load at both readings, so
//! their buckets count at their average cost. The allocator counts
//! requested bytes and, separately, glibc malloc chunks (8-byte header,
//! 16-byte rounding, 32-byte minimum), which is what shows in RSS.
//!
//! Only the server side is counted, exactly: the clients run in a child
//! process (this test binary again, started with `TLS_IDLE_MEMORY_CLIENT`
//! set, which makes this test function the client), so nothing they
//! allocate is in this process's counters. The parent tells the child over its
//! stdin how many connections to open and reads "opened N" on its stdout
//! once each client's handshake completed; the child holds them until its
//! stdin closes.
//!
//! A breakdown by allocation site: `TLS_IDLE_MEMORY_PROFILE=1 heaptrack
//! <this test binary> --nocapture`, then `heaptrack_print -l` on its
//! output file (the server is forgotten after the second reading, so what
//! the connections hold shows as leaked, with its stacks).
//!
//! One test function per binary: the counters are process-wide, and the
//! harness runs tests of one binary on parallel threads.

mod memtest;

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use memtest::{live, Counting, NoMedia};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::ServerName;
use sip_edge::{config::Config, transport};

// --- the counting allocator ----------------------------------------------------

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Throwaway CA and edge certificate (PEM files in a tempdir).
struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec![NAME.to_owned()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("cert");
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    write("edge.pem", cert.pem());
    write("edge.key", key.serialize_pem());
    let ca = write("ca.pem", ca.pem());
    Pki { dir, ca }
}

const NAME: &str = "edge.example.com";
const WAIT: Duration = Duration::from_secs(60);

/// The agent's config: defaults, with the accept-time limits of one
/// source lifted (every client is 127.0.0.1), as the bench does.
fn config(pki: &Pki) -> Config {
    let d = pki.dir.path();
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
        idle_timeout_secs = 3600
        [limits]
        max_connections_per_source = 100000
        max_handshakes_per_source = 100000
        handshake_rate = 10000000
        handshake_burst = 10000000
        "#,
        d.join("edge.pem").display(),
        d.join("edge.key").display(),
        pki.ca.display()
    );
    Config::from_toml(&toml).expect("config")
}

// --- the clients (child process) -------------------------------------------------

const CLIENT_ENV: &str = "TLS_IDLE_MEMORY_CLIENT";

/// The child: reads "N" lines on stdin, opens N more TLS connections to
/// the address in `CLIENT_ENV` each time, answers "opened TOTAL"; holds
/// them until stdin closes.
fn client(spec: &str) {
    let (addr, ca) = spec.split_once('|').expect("addr|ca");
    let addr: SocketAddr = addr.parse().expect("addr");
    let mut roots = rustls::RootCertStore::empty();
    for c in sip_edge::transport::tls::load_certs(std::path::Path::new(ca)).expect("ca") {
        roots.add(c).expect("root");
    }
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut held = Vec::new();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let n: usize = line.expect("stdin").trim().parse().expect("count");
        rt.block_on(async {
            for _ in 0..n {
                let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
                tcp.set_nodelay(true).expect("nodelay");
                let tls = tokio::time::timeout(
                    WAIT,
                    tokio_rustls::TlsConnector::from(cfg.clone())
                        .connect(ServerName::try_from(NAME).expect("name"), tcp),
                )
                .await
                .expect("handshake timed out")
                .expect("handshake");
                held.push(tls);
            }
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "opened {}", held.len()).expect("stdout");
        out.flush().expect("flush");
    }
}

/// The client process, driven over its stdin and stdout.
struct Clients {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    opened: usize,
}

impl Clients {
    fn start(addr: SocketAddr, ca: &std::path::Path) -> Clients {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CLIENT_ENV, format!("{addr}|{}", ca.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("client process");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Clients {
            child,
            lines,
            opened: 0,
        }
    }

    /// Opens `n` more connections; returns once all are established.
    fn open(&mut self, n: usize) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{n}").expect("to client");
        stdin.flush().expect("flush");
        self.opened += n;
        let want = format!("opened {}", self.opened);
        for line in self.lines.by_ref() {
            let line = line.expect("from client");
            // libtest's "test NAME ... " may precede it on the line.
            if line.ends_with(&want) {
                return;
            }
        }
        panic!("the client process ended before opening {want}");
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The least live count over a quiet second, once the count stopped
/// moving by more than the timers' churn (see the module docs).
fn settled() -> (isize, isize) {
    let sample = || {
        let mut least = live();
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(25));
            let l = live();
            if l.1 < least.1 {
                least = l;
            }
        }
        least
    };
    let deadline = Instant::now() + WAIT;
    let mut last = sample();
    loop {
        let now = sample();
        if now.1 == last.1 || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

const TEST: &str = "an_idle_tls_connection_keeps_a_bounded_number_of_heap_bytes";

#[test]
fn an_idle_tls_connection_keeps_a_bounded_number_of_heap_bytes() {
    if let Ok(spec) = std::env::var(CLIENT_ENV) {
        return client(&spec);
    }
    let profile = std::env::var_os("TLS_IDLE_MEMORY_PROFILE").is_some();
    let set_log = sip_edge::logging::init("info", sip_edge::logging::LogFormat::Human);
    let pki = pki();
    let cfg = config(&pki);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let edge = rt
        .block_on(transport::start(&cfg, Box::new(NoMedia), async move {
            let _ = stopped.await;
        }))
        .expect("transport");
    let mut clients = Clients::start(edge.internal, &pki.ca);
    // Warm-up: the first connections set up what every later one shares
    // (the session cache, the span registry's pages, the driver's tables).
    clients.open(N1);
    let a = settled();
    clients.open(N1);
    let b = settled();
    let req = (b.0 - a.0) as f64 / N1 as f64;
    let chunks = (b.1 - a.1) as f64 / N1 as f64;
    println!(
        "idle TLS connection: {req:.0} B requested, {chunks:.0} B in malloc chunks \
         ({N1} → {} connections)",
        2 * N1
    );
    if profile {
        // Profiling (heaptrack's "leaked" report): what the connections keep.
        std::mem::forget(clients);
        std::mem::forget(rt);
        std::mem::forget(edge);
        std::mem::forget(stop);
        return;
    }
    // The closes of the teardown are not worth 2·N1 log lines.
    let _ = set_log("warn");
    drop(clients);
    drop(stop);
    drop(rt);
    assert!(
        chunks <= BOUND,
        "an idle TLS connection keeps {chunks:.0} heap bytes (bound {BOUND})"
    );
}

/// Connections per reading (the second reading holds 2·N1).
const N1: usize = 500;

/// Malloc bytes an idle TLS connection may keep. Issue #12 asks ≤ 16 kB
/// of agent memory per idle TLS connection (the bench's PSS read ~17 kB).
/// This test, in the debug build `cargo test` makes, measured 16.6 kB
/// before it had a bound (6.6 kB of it the connection task, which kept
/// room for the TLS handshake's state and a dead copy of the stream for
/// the connection's life; 1.35 kB tokio's mpsc write queue; 115 B a
/// keep-alive interval no accepted connection uses), 12.8 kB once the
/// handshake ran boxed and `conn::run` split the stream before making its
/// future, 11.8 kB with the write queue from futures-channel, 11.66 kB
/// without the unused interval, 11.36-11.51 kB (five runs) with
/// `conn::run`'s body an `async` block that keeps its captures once, and
/// 11.09-11.23 kB (five runs) with the reader's events sent by `reserve`
/// then `send` (a waiting `Sender::send` holds its event twice).
/// What remains (heaptrack, see the module docs; requested bytes):
/// rustls' receive buffer 4.3 kB (sized to 4 kB before every read and
/// never shrunk: the buffered rustls API has no way to release it),
/// rustls' traffic state 1.4 kB (record keys, key schedule) and 0.65 kB
/// (connection), the TLS stream in the split halves' shared allocation
/// 1.3 kB, the connection's future 1.87 kB (reader, writer and timers;
/// debug build), the task 0.4 kB, tokio's I/O registration 0.26 kB, the
/// log span 0.46 kB, the write queue 0.2 kB, the driver's and the proxy's
/// tables 0.2 kB. The bound is the worst figure plus 10%: another
/// per-connection buffer or a future kept inline fails it; allocator
/// noise does not (the count is exact; the tracing registry's pages,
/// which double, make the readings vary by about ±100 B).
const BOUND: f64 = 12_360.0;
