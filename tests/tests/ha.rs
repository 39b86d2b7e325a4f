//! Issue #11: two edge nodes sharing call state through Redis, as system
//! tests on the `ha_net` topology (inside client, edges a and b, outside
//! peer, a store namespace running redis-server):
//!
//! - 20 calls with sequence-numbered RTP both ways through edge a; `kill -9`
//!   of a; the virtual addresses move to b; every stream's loss is
//!   measured, every call must be carried by b; a re-INVITE through b
//!   reaches the outside peer and its 200 comes back, and every call ends
//!   with a BYE through b that the peer receives and answers (the nodes
//!   share `[ha] token_key_file`: b opens a's flow tokens); edge a comes back while the calls are up, resynchronises from the
//!   store before taking traffic (its old rules go, b's calls are mirrored),
//!   and after the BYEs no rule is left on either node nor a key in the
//!   store;
//! - a re-INVITE with SDP after the failover (issue #11): hold
//!   (`a=sendonly`), then new media ports, both through b, for a call a
//!   set up: b rewrites them to the call's edge ports, the media flows on
//!   the new ports, the old pinholes are gone, and the BYE through b
//!   removes every rule and key;
//! - `role = "auto"`: one node holds the store lease and reports active,
//!   the other standby; after a `kill -9` of the holder the other takes
//!   the lease within its length;
//! - the store down: calls still succeed, the outage is counted and shown
//!   by `sip-edge ha-status`, and when the store returns the node's live
//!   calls are written again.
//!
//! Needs root and redis-server; skips through `testnet::record_skip`.
//! Every loop is bounded in count and time.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use sip_edge_tests::{
    edge::{self, response_for, sa, Flow, PeerUa, WAIT},
    ha_net::{HaNet, Node, RedisServer},
    testnet::{self, AgentProcess, Pins},
    testua::{self, media_of, Dialog, SdpSpec, TestPki, UaConn, UaListener},
};

/// Calls of the failover test.
const CALLS: usize = 20;
/// RTP packet interval.
const PTIME: Duration = Duration::from_millis(20);

fn unavailable() -> Option<String> {
    if let Some(r) = testnet::unavailable_reason() {
        return Some(r);
    }
    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some(
            "redis-server not installed (Debian redis-server; cargo xtask test installs it)".into(),
        );
    }
    None
}

/// One edge node: its pins, configuration, control socket and agent.
struct EdgeNode {
    node: Node,
    agent: Option<AgentProcess>,
    pin_dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    _pins: Pins,
}

impl EdgeNode {
    fn new(tag: &str, node: Node, dir: &Path, pki: &TestPki, role: &str) -> EdgeNode {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sip-edge-test-{tag}-{}", node.name()));
        let pins = Pins(pin_dir.clone());
        let socket =
            std::env::temp_dir().join(format!("sip-edge-test-{tag}-{}.control.sock", node.name()));
        let config = dir.join(format!("edge-{}.toml", node.name()));
        // The pair's shared flow-token secret: each node routes in-dialog
        // requests on the other's Contact tokens.
        let key = dir.join("token.key");
        std::fs::write(&key, "ha-test-token-secret-0123456789abcdef\n").expect("token key");
        let text = format!(
            "{}[ha]\nstore = \"redis://{}/\"\nnode = \"{}\"\nrole = \"{role}\"\nsync_interval_ms = 100\ntoken_key_file = \"{}\"\n",
            testua::edge_config(&pin_dir, pki, "relay"),
            sip_edge_tests::ha_net::STORE,
            node.name(),
            key.display(),
        );
        std::fs::write(&config, text).expect("write config");
        EdgeNode {
            node,
            agent: None,
            pin_dir,
            config,
            socket,
            _pins: pins,
        }
    }

    fn start(&mut self, net: &HaNet) {
        let agent = AgentProcess::start_cmd(
            net.edge_cmd(self.node, &testnet::agent_bin()),
            &self.config,
            &self.pin_dir,
            &["int0", "ext0"],
        )
        .expect("start agent");
        self.agent = Some(agent);
        // The control socket comes up just after the SIP listeners.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "edge {}: control socket never came up",
                self.node.name()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(a) = self.agent.take() {
            a.kill9();
        }
    }

    /// `sip-edge ha-status --json`.
    fn ha(&self) -> Value {
        let out = std::process::Command::new(testnet::agent_bin())
            .args(["ha-status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .expect("run sip-edge ha-status");
        assert!(
            out.status.success(),
            "ha-status of {}: {}",
            self.node.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("ha-status json");
        v["ha"].clone()
    }

    /// Waits (bounded) until `ok` holds for the HA status.
    fn wait_ha(&self, what: &str, within: Duration, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.ha();
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "edge {}: {what} not reached within {within:?}: {v:#}",
                self.node.name()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Packets counted for drop/pass reason `name` (`sip-edge stats`).
    fn reason(&self, name: &str) -> u64 {
        let out = std::process::Command::new(testnet::agent_bin())
            .args(["stats", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()
            .expect("stats");
        let v: Value = serde_json::from_slice(&out.stdout).expect("stats json");
        v["reasons"]
            .as_array()
            .and_then(|l| l.iter().find(|r| r["reason"] == name))
            .and_then(|r| r["packets"].as_u64())
            .unwrap_or(0)
    }

    /// The edge addresses:ports its rules match on.
    fn rules(&self) -> Vec<String> {
        let out = std::process::Command::new(testnet::agent_bin())
            .args(["pinhole", "list", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()
            .expect("pinhole list");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("list json");
        let mut l: Vec<String> = v
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|e| e["local"].as_str().map(str::to_owned))
            .collect();
        l.sort();
        l
    }
}

impl Drop for EdgeNode {
    /// A node killed and not restarted (a failed assertion midway) leaves
    /// its lock, journal and socket behind: remove them with the agent.
    fn drop(&mut self) {
        self.agent.take();
        use sip_edge::datapath::lock;
        let _ = std::fs::remove_file(lock::state_path(&self.pin_dir));
        let _ = std::fs::remove_file(lock::lock_path(Path::new(lock::RUN_DIR), &self.pin_dir));
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// Alice's connection to the inside virtual address (whichever edge has it).
async fn alice(net: &HaNet, pki: &TestPki) -> UaConn {
    testua::connect_tls(
        &net.client,
        sa("10.77.0.1:5061"),
        &pki.ca,
        testua::EDGE_TLS_NAME,
        WAIT,
    )
    .await
    .expect("alice connects to the edge over TLS")
}

/// One established call and where each side sends its audio.
struct Call {
    a: Dialog,
    edge_int: SocketAddr,
    edge_pub: SocketAddr,
    alice: SocketAddr,
    bob: SocketAddr,
}

async fn call(alice: &mut UaConn, bob: &mut PeerUa, i: usize) -> Call {
    let a_port = 4000 + 2 * i as u16;
    let b_port = 5000 + 2 * i as u16;
    let spec = |p| SdpSpec {
        audio: Some(p),
        video: None,
        msrp: None,
    };
    let c = edge::call_out(alice, bob, &spec(a_port), &spec(b_port), Flow::Refusable)
        .await
        .unwrap_or_else(|code| panic!("call {i} refused with {code}"));
    Call {
        a: c.a,
        edge_int: media_of(&c.answer, "audio").expect("answer audio").addr,
        edge_pub: media_of(&c.offer, "audio").expect("offer audio").addr,
        alice: SocketAddr::new(sa("10.77.0.2:0").ip(), a_port),
        bob: SocketAddr::new(sa("198.51.100.2:0").ip(), b_port),
    }
}

/// A minimal RTP packet (RFC 3550 §5.1): V=2, PT 0, `seq`, `ssrc`, 160
/// bytes of payload (20 ms of G.711).
fn rtp(seq: u16, ssrc: u32) -> [u8; 172] {
    let mut p = [0u8; 172];
    p[0] = 0x80;
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p[8..12].copy_from_slice(&ssrc.to_be_bytes());
    p
}

/// Every stream both ways: stream 2i is alice→bob of call i, 2i+1
/// bob→alice; `received[s]` the sequence numbers that arrived.
struct Media {
    sent: u32,
    received: Vec<Vec<u16>>,
}

/// Sends one packet per stream every `PTIME` until `stop`, drains every
/// socket meanwhile and for 300 ms after. `seq` shows the next sequence
/// number. Bounded: at most 60 s.
fn pump(
    socks: Vec<(UdpSocket, UdpSocket)>,
    targets: Vec<(SocketAddr, SocketAddr)>,
    seq: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Media> {
    std::thread::spawn(move || {
        let streams = socks.len() * 2;
        let mut received: Vec<Vec<u16>> = vec![Vec::new(); streams];
        let drain = |received: &mut Vec<Vec<u16>>| {
            let mut buf = [0u8; 2048];
            for (a, b) in &socks {
                for s in [a, b] {
                    for _ in 0..64 {
                        let Ok(n) = s.recv(&mut buf) else { break };
                        if n >= 12 {
                            let ssrc =
                                u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
                            if ssrc < received.len() {
                                received[ssrc].push(u16::from_be_bytes([buf[2], buf[3]]));
                            }
                        }
                    }
                }
            }
        };
        let start = Instant::now();
        let mut next = Instant::now();
        let mut n: u32 = 0;
        while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
            for (i, ((a, b), (to_b, to_a))) in socks.iter().zip(&targets).enumerate() {
                let _ = a.send_to(&rtp(n as u16, 2 * i as u32), *to_b);
                let _ = b.send_to(&rtp(n as u16, 2 * i as u32 + 1), *to_a);
            }
            n += 1;
            seq.store(n, Ordering::Relaxed);
            next += PTIME;
            while Instant::now() < next {
                drain(&mut received);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let end = Instant::now() + Duration::from_millis(300);
        while Instant::now() < end {
            drain(&mut received);
            std::thread::sleep(Duration::from_millis(5));
        }
        Media { sent: n, received }
    })
}

/// Packets of `got` missing in `from..to`.
fn lost(got: &[u16], from: u32, to: u32) -> u32 {
    let set: std::collections::HashSet<u16> = got.iter().copied().collect();
    (from..to).filter(|s| !set.contains(&(*s as u16))).count() as u32
}

/// The failover (issue #11): 20 calls through edge a, `kill -9` of a, the
/// addresses move to b; media loss is measured per call and direction,
/// every call is carried by b and ended by a BYE through b; a comes back
/// and resynchronises before taking traffic; nothing is left anywhere.
#[tokio::test(flavor = "current_thread")]
async fn twenty_calls_survive_a_kill_9_of_the_active_edge() {
    const NAME: &str = "ha::twenty_calls_survive_a_kill_9_of_the_active_edge";
    if let Some(reason) = unavailable() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let tag = format!("h2a{}", std::process::id() % 100_000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate(tmp.path()).expect("certificates");
    let mut net = HaNet::create(&tag).expect("namespaces");
    net.attach_pass_programs().expect("pass programs");
    let redis = RedisServer::start(&net, tmp.path()).expect("redis-server");
    let mut a = EdgeNode::new(&tag, Node::A, tmp.path(), &pki, "active");
    let mut b = EdgeNode::new(&tag, Node::B, tmp.path(), &pki, "standby");
    a.start(&net);
    b.start(&net);
    for n in [&a, &b] {
        n.wait_ha("store up and resynced", Duration::from_secs(5), |v| {
            v["store_up"] == true && v["resynced"] == true
        });
    }
    assert_eq!(b.ha()["role"], "standby");

    // 20 calls through a.
    let mut bob = PeerUa::on_listener(
        UaListener::bind(
            &net.peer,
            sa("198.51.100.2:5061"),
            &pki.peer_cert,
            &pki.peer_key,
        )
        .expect("bob listens"),
    );
    let mut alice_a = alice(&net, &pki).await;
    let mut calls = Vec::new();
    for i in 0..CALLS {
        calls.push(call(&mut alice_a, &mut bob, i).await);
    }
    let owned = a.wait_ha("its calls written", Duration::from_secs(5), |v| {
        u(v, "owned") >= CALLS as u64 && u(v, "queued") == 0
    })["owned"]
        .as_u64()
        .unwrap_or(0);
    let bs = b.wait_ha("a's calls mirrored", Duration::from_secs(5), |v| {
        u(v, "mirrored") == owned
    });
    assert_eq!(u(&bs, "owned"), 0, "b owns nothing yet: {bs:#}");
    println!(
        "HA standby before the failover: mirrored {} flows of a's {}, replication lag bound {} ms, last read {} ms ago",
        u(&bs, "mirrored"),
        owned,
        u(&bs, "lag_ms"),
        u(&bs, "last_sync_age_ms")
    );
    assert_eq!(a.rules(), b.rules(), "b's maps hold a's rules");

    // Media both ways on every call.
    let mut socks = Vec::new();
    let mut targets = Vec::new();
    for c in &calls {
        socks.push((net.udp(&net.client, c.alice), net.udp(&net.peer, c.bob)));
        targets.push((c.edge_int, c.edge_pub));
    }
    let seq = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let media = pump(socks, targets, seq.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(1000));
    let measured_from = seq.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1000));

    // The crash and the failover.
    let at_kill = seq.load(Ordering::Relaxed);
    let t_kill = Instant::now();
    a.kill9();
    net.set_links(Node::A, false).expect("edge a's links down");
    let moved_in = net.move_vips(Node::A, Node::B).expect("move the addresses");
    // From the kill to the addresses up on b: the outage the test itself
    // imposes (a loaded machine stretches it: every step is an `ip` run).
    let window = t_kill.elapsed();
    drop(alice_a);
    bob.conn = None;
    std::thread::sleep(Duration::from_millis(3000));
    stop.store(true, Ordering::Relaxed);
    let m = media.join().expect("media thread");

    // Loss per call and direction.
    let mut before = 0;
    let mut up = Vec::new();
    let mut down = Vec::new();
    let mut resumed = [true; CALLS];
    for (i, ok) in resumed.iter_mut().enumerate() {
        for (s, list) in [(2 * i, &mut up), (2 * i + 1, &mut down)] {
            let got = &m.received[s];
            before += lost(got, measured_from, at_kill);
            list.push(lost(got, at_kill, m.sent));
            // The last half second after the failover arrived.
            if lost(got, m.sent.saturating_sub(25), m.sent) > 2 {
                *ok = false;
            }
        }
    }
    let stats = |v: &[u32]| {
        let max = v.iter().copied().max().unwrap_or(0);
        let mean = f64::from(v.iter().sum::<u32>()) / v.len().max(1) as f64;
        (mean, max)
    };
    let (up_mean, up_max) = stats(&up);
    let (down_mean, down_max) = stats(&down);
    println!(
        "HA failover: kill to addresses up on b {} ms (the move itself {} ms); packets lost per call ({} ms RTP): inside->outside mean {up_mean:.1} max {up_max}, outside->inside mean {down_mean:.1} max {down_max}; before the kill {before} lost over {} packets",
        window.as_millis(),
        moved_in.as_millis(),
        PTIME.as_millis(),
        (at_kill - measured_from) as usize * 2 * CALLS
    );
    println!("HA failover: per call up {up:?} down {down:?}");
    println!(
        "HA failover: on b, media dropped waiting for a neighbour (drop_no_neigh) {}, forwarded {}",
        b.reason("drop_no_neigh"),
        b.reason("forwarded")
    );
    assert_eq!(before, 0, "media lost before the failover");
    // Loss bounded by the move: what the kill-to-move window holds, plus
    // at most 500 ms (a neighbour resolution and a packet in flight).
    let bound = (window.as_millis() / PTIME.as_millis()) as u32 + 25;
    println!(
        "HA failover: loss beyond the kill-to-move window: up {} ms, down {} ms (bound {} packets)",
        (i64::from(up_max) * PTIME.as_millis() as i64) - window.as_millis() as i64,
        (i64::from(down_max) * PTIME.as_millis() as i64) - window.as_millis() as i64,
        bound
    );
    assert!(
        up_max <= bound && down_max <= bound,
        "loss beyond the move: up {up:?} down {down:?}, window {window:?}"
    );
    let bs = b.ha();
    assert_eq!(bs["role"], "active", "b took over: {bs:#}");

    // Edge a returns while b carries the calls: it resynchronises from
    // the store before taking traffic, so its old rules (now b's calls)
    // go and b's calls are mirrored instead.
    net.set_links(Node::A, true).expect("edge a's links up");
    a.start(&net);
    let as_ = a.ha();
    assert_eq!(as_["resynced"], true, "{as_:#}");
    let b_owned = u(&b.ha(), "owned");
    assert!(
        b_owned >= CALLS as u64,
        "b owns every call's flows: {:#}",
        b.ha()
    );
    a.wait_ha("b's calls mirrored", Duration::from_secs(3), |v| {
        u(v, "mirrored") == b_owned && u(v, "owned") == 0
    });
    assert_eq!(
        a.rules(),
        b.rules(),
        "a's maps mirror b's calls, nothing else"
    );

    // In-dialog requests through b reach bob (issue #11): the Contact
    // tokens a minted open at b (the pair shares the token key). A
    // re-INVITE without a body (a session refresh, RFC 4028) goes to bob,
    // whose 200 comes back to alice, and her ACK reaches him.
    let mut alice_b = alice(&net, &pki).await;
    {
        let c = calls.last_mut().expect("calls");
        alice_b
            .send(&c.a.request("INVITE", "", ""))
            .await
            .expect("re-INVITE");
        let reinv = bob.recv_request("INVITE").await;
        assert_eq!(reinv.call_id().ok(), Some(c.a.call_id.as_str()));
        assert!(reinv.to_tag().ok().flatten().is_some(), "in-dialog");
        bob.conn()
            .send(&testua::reply(
                &reinv,
                200,
                "OK",
                "",
                &edge::contact(&edge::bob_id()),
                "",
                "",
            ))
            .await
            .expect("200 to the re-INVITE");
        let ok = response_for(&mut alice_b, &c.a.call_id).await;
        assert_eq!(ok.status(), Some(200), "re-INVITE through b: {ok:?}");
        c.a.on_invite_response(&ok).expect("200");
        alice_b.send(&c.a.ack("", "")).await.expect("ACK");
        bob.recv_request("ACK").await;
        println!("HA failover: a re-INVITE through b reached the far party and its 200 came back");
    }

    // Every call ends with a BYE through b, which bob receives and
    // answers (not an answer of the edge's own).
    let mut ended = 0;
    for (i, c) in calls.iter_mut().enumerate() {
        alice_b
            .send(&c.a.request("BYE", "", ""))
            .await
            .expect("BYE");
        let bye = bob.recv_request("BYE").await;
        assert_eq!(bye.call_id().ok(), Some(c.a.call_id.as_str()));
        bob.conn()
            .send(&testua::reply(&bye, 200, "OK", "", "", "", ""))
            .await
            .expect("bob's 200 to BYE");
        let r = response_for(&mut alice_b, &c.a.call_id).await;
        assert!(
            r.header("Warning").is_none(),
            "call {i}: the 200 is bob's, not the edge's own: {r:?}"
        );
        if r.status() == Some(200) && resumed[i] {
            ended += 1;
        } else {
            eprintln!(
                "call {i}: BYE answered {:?}, media resumed {}",
                r.status(),
                resumed[i]
            );
        }
        for local in [c.edge_int, c.edge_pub] {
            assert!(
                !b.rules().contains(&local.to_string()),
                "call {i}: b's rule at {local} outlived its BYE"
            );
        }
    }
    println!("HA failover: calls that survived (media resumed both ways, BYE through b ended them): {ended}/{CALLS}");
    assert_eq!(ended, CALLS, "calls that survived the failover");

    // Nothing left: no rule on either node, no key in the store.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (ra, rb) = (a.rules(), b.rules());
        let keys = redis.cli(&["--scan", "--pattern", "sip-edge:*"]);
        if ra.is_empty() && rb.is_empty() && keys.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: a {ra:?} b {rb:?} store {keys}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The store down (issue #11): calls still succeed, the outage is counted
/// and shown, and when the store returns the live calls are written again.
#[tokio::test(flavor = "current_thread")]
async fn a_store_outage_never_fails_a_call_and_heals() {
    const NAME: &str = "ha::a_store_outage_never_fails_a_call_and_heals";
    if let Some(reason) = unavailable() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let tag = format!("h2s{}", std::process::id() % 100_000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate(tmp.path()).expect("certificates");
    let mut net = HaNet::create(&tag).expect("namespaces");
    net.attach_pass_programs().expect("pass programs");
    let mut redis = RedisServer::start(&net, tmp.path()).expect("redis-server");
    let mut a = EdgeNode::new(&tag, Node::A, tmp.path(), &pki, "active");
    a.start(&net);
    a.wait_ha("store up", Duration::from_secs(5), |v| {
        v["store_up"] == true
    });

    redis.stop();
    let down = a.wait_ha("the outage seen", Duration::from_secs(5), |v| {
        v["store_up"] == false && u(v, "outages") >= 1 && u(v, "errors") >= 1
    });
    let text = std::process::Command::new(testnet::agent_bin())
        .args(["ha-status", "--socket"])
        .arg(&a.socket)
        .output()
        .expect("ha-status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("DOWN"), "ha-status shows the outage: {text}");
    // `sip-edge status` carries the same (issue #11).
    let status = std::process::Command::new(testnet::agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(&a.socket)
        .output()
        .expect("status");
    let status: Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(
        status["ha"]["store_up"], false,
        "status shows the outage: {status}"
    );
    assert_eq!(status["ha"]["node"], down["node"], "{status}");

    let mut bob = PeerUa::on_listener(
        UaListener::bind(
            &net.peer,
            sa("198.51.100.2:5061"),
            &pki.peer_cert,
            &pki.peer_key,
        )
        .expect("bob listens"),
    );
    let mut alice_a = alice(&net, &pki).await;
    let t0 = Instant::now();
    let mut calls = Vec::new();
    for i in 0..3 {
        calls.push(call(&mut alice_a, &mut bob, i).await);
    }
    let setup = t0.elapsed();
    // The calls' media flows through the node (single-node mode).
    let c = &calls[0];
    let (sa_, sb) = (net.udp(&net.client, c.alice), net.udp(&net.peer, c.bob));
    let mut got = false;
    for n in 0..50u16 {
        let _ = sa_.send_to(&rtp(n, 0), c.edge_int);
        std::thread::sleep(Duration::from_millis(20));
        let mut buf = [0u8; 256];
        if sb.recv(&mut buf).is_ok() {
            got = true;
            break;
        }
    }
    assert!(got, "media of a call made during the outage");
    let during = a.wait_ha(
        "the calls kept in the live set",
        Duration::from_secs(5),
        |v| u(v, "owned") >= 3,
    );
    println!(
        "HA store outage: 3 calls set up in {} ms with the store down; status: outages {} errors {} dropped {} owned {}",
        setup.as_millis(),
        u(&during, "outages"),
        u(&during, "errors"),
        u(&during, "dropped"),
        u(&during, "owned")
    );
    assert!(u(&down, "outages") >= 1);

    // The store returns (empty): the node writes its live calls again.
    redis.restart(&net).expect("redis-server again");
    let back = a.wait_ha("the store back", Duration::from_secs(5), |v| {
        v["store_up"] == true
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys = redis.cli(&["--scan", "--pattern", "sip-edge:a:*"]);
        if keys.lines().count() as u64 == u(&back, "owned") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "live calls not written again: {keys} vs {back:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Their BYEs remove the keys.
    for c in &mut calls {
        alice_a
            .send(&c.a.request("BYE", "", ""))
            .await
            .expect("BYE");
        let bye = bob.recv_request("BYE").await;
        bob.conn()
            .send(&testua::reply(&bye, 200, "OK", "", "", "", ""))
            .await
            .expect("200 to BYE");
        let r = response_for(&mut alice_a, &c.a.call_id).await;
        assert_eq!(r.status(), Some(200), "BYE during single-node mode");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !redis
        .cli(&["--scan", "--pattern", "sip-edge:*"])
        .trim()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "keys of ended calls remain");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends up to 25 packets from `from` (in `from_ns`) to `to`, 20 ms apart,
/// until `at` (in `at_ns`) receives one; whether it did.
fn flows(net: &HaNet, from: (&str, SocketAddr), to: SocketAddr, at: (&str, SocketAddr)) -> bool {
    let (tx, rx) = (net.udp(from.0, from.1), net.udp(at.0, at.1));
    let mut buf = [0u8; 256];
    for n in 0..25u16 {
        let _ = tx.send_to(&rtp(n, 7), to);
        std::thread::sleep(Duration::from_millis(20));
        if rx.recv(&mut buf).is_ok() {
            return true;
        }
    }
    false
}

/// Alice's SDP at port `port` with direction `dir`.
fn alice_sdp(version: u32, port: u16, dir: &str) -> String {
    let spec = SdpSpec {
        audio: Some(port),
        video: None,
        msrp: None,
    };
    testua::sdp("alice", version, sa("10.77.0.2:0").ip(), &spec)
        .replace("a=sendrecv", &format!("a={dir}"))
}

/// Bob's SDP at port `port` with direction `dir`.
fn bob_sdp(version: u32, port: u16, dir: &str) -> String {
    let spec = SdpSpec {
        audio: Some(port),
        video: None,
        msrp: None,
    };
    testua::sdp("bob", version, sa("198.51.100.2:0").ip(), &spec)
        .replace("a=sendrecv", &format!("a={dir}"))
}

/// Alice's re-INVITE with `offer` through the edge she is connected to;
/// bob answers `answer`. Returns the offer as bob got it and the answer as
/// alice got it.
async fn reinvite(
    alice: &mut UaConn,
    bob: &mut PeerUa,
    a: &mut Dialog,
    offer: &str,
    answer: &str,
) -> (Vec<u8>, Vec<u8>) {
    alice
        .send(&a.request("INVITE", "application/sdp", offer))
        .await
        .expect("re-INVITE");
    let reinv = bob.recv_request("INVITE").await;
    assert_eq!(reinv.call_id().ok(), Some(a.call_id.as_str()));
    let got_offer = reinv.body().to_vec();
    bob.conn()
        .send(&testua::reply(
            &reinv,
            200,
            "OK",
            "",
            &edge::contact(&edge::bob_id()),
            "application/sdp",
            answer,
        ))
        .await
        .expect("200 to the re-INVITE");
    let ok = response_for(alice, &a.call_id).await;
    assert_eq!(ok.status(), Some(200), "re-INVITE: {ok:?}");
    a.on_invite_response(&ok).expect("200");
    alice.send(&a.ack("", "")).await.expect("ACK");
    bob.recv_request("ACK").await;
    (got_offer, ok.body().to_vec())
}

/// Issue #11: a re-INVITE with SDP for a call that edge a set up, sent
/// through b after a's `kill -9`. Before, b's media layer treated it as a
/// new call: other edge ports in the rewritten SDP, the old rules left,
/// and the new ones outliving the BYE.
#[tokio::test(flavor = "current_thread")]
async fn a_reinvite_with_sdp_after_the_failover_moves_the_media_and_the_bye_ends_it() {
    const NAME: &str =
        "ha::a_reinvite_with_sdp_after_the_failover_moves_the_media_and_the_bye_ends_it";
    if let Some(reason) = unavailable() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let tag = format!("h2r{}", std::process::id() % 100_000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate(tmp.path()).expect("certificates");
    let mut net = HaNet::create(&tag).expect("namespaces");
    net.attach_pass_programs().expect("pass programs");
    let redis = RedisServer::start(&net, tmp.path()).expect("redis-server");
    let mut a = EdgeNode::new(&tag, Node::A, tmp.path(), &pki, "active");
    let mut b = EdgeNode::new(&tag, Node::B, tmp.path(), &pki, "standby");
    a.start(&net);
    b.start(&net);
    for n in [&a, &b] {
        n.wait_ha("store up and resynced", Duration::from_secs(5), |v| {
            v["store_up"] == true && v["resynced"] == true
        });
    }
    let mut bob = PeerUa::on_listener(
        UaListener::bind(
            &net.peer,
            sa("198.51.100.2:5061"),
            &pki.peer_cert,
            &pki.peer_key,
        )
        .expect("bob listens"),
    );
    let mut alice_a = alice(&net, &pki).await;
    // Replication lag (issue #11): from a call's 200 at alice (its owner
    // installed and queued its flows before forwarding the answer) to its
    // rules in b's maps, as `sip-edge pinhole list` shows them (a few ms
    // per look). Each call then ends with a BYE through a.
    let mut lags = Vec::new();
    for i in 1..=5 {
        let mut m = call(&mut alice_a, &mut bob, i).await;
        let t0 = Instant::now();
        let want = a.rules();
        while b.rules() != want {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "call {i} never mirrored on b"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        lags.push(t0.elapsed().as_millis());
        alice_a
            .send(&m.a.request("BYE", "", ""))
            .await
            .expect("BYE");
        let bye = bob.recv_request("BYE").await;
        bob.conn()
            .send(&testua::reply(&bye, 200, "OK", "", "", "", ""))
            .await
            .expect("200 to BYE");
        assert_eq!(
            response_for(&mut alice_a, &m.a.call_id).await.status(),
            Some(200)
        );
    }
    lags.sort_unstable();
    println!(
        "HA replication lag (call answered at a -> its rules in b's maps), ms, sorted: {lags:?}"
    );
    // Owners publish each write and the standby applies the read at once:
    // before, the mirror waited for the media layer's 1 s tick (medians
    // of about 1000 ms were measured).
    assert!(
        lags[2] < 500,
        "the standby learns of new calls promptly: {lags:?} ms"
    );
    let mut c = call(&mut alice_a, &mut bob, 0).await;
    let owned = u(
        &a.wait_ha("its call written", Duration::from_secs(5), |v| {
            u(v, "owned") >= 1 && u(v, "queued") == 0
        }),
        "owned",
    );
    b.wait_ha("a's call mirrored", Duration::from_secs(5), |v| {
        u(v, "mirrored") == owned
    });
    // The count alone could still be the last ended call's.
    let t0 = Instant::now();
    while b.rules() != a.rules() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "call never mirrored on b"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (cl, pr) = (net.client.clone(), net.peer.clone());
    let (alice_2, bob_2) = (
        SocketAddr::new(c.alice.ip(), 4100),
        SocketAddr::new(c.bob.ip(), 5100),
    );

    // a dies, the addresses move to b, the media goes on through b.
    a.kill9();
    net.set_links(Node::A, false).expect("edge a's links down");
    net.move_vips(Node::A, Node::B).expect("move the addresses");
    drop(alice_a);
    bob.conn = None;
    assert!(
        flows(&net, (&cl, c.alice), c.edge_int, (&pr, c.bob)),
        "alice -> bob through b after the failover"
    );
    let rules_before = b.rules();
    let mut alice_b = alice(&net, &pki).await;

    // Hold: alice sends only. The offer bob gets names the call's edge
    // port; the answer alice gets too.
    let (offer, answer) = reinvite(
        &mut alice_b,
        &mut bob,
        &mut c.a,
        &alice_sdp(2, c.alice.port(), "sendonly"),
        &bob_sdp(2, c.bob.port(), "recvonly"),
    )
    .await;
    let text = String::from_utf8_lossy(&offer);
    assert!(text.contains("a=sendonly"), "hold reaches bob: {text}");
    assert_eq!(
        media_of(&offer, "audio").expect("offer audio").addr,
        c.edge_pub,
        "the hold offer keeps the call's public edge port: {text}"
    );
    assert_eq!(
        media_of(&answer, "audio").expect("answer audio").addr,
        c.edge_int,
        "the answer keeps the call's inside edge port"
    );
    assert!(
        flows(&net, (&cl, c.alice), c.edge_int, (&pr, c.bob)),
        "alice -> bob on hold (sendonly)"
    );
    assert_eq!(b.rules(), rules_before, "hold adds no rule");
    println!(
        "HA re-INVITE after failover: hold (a=sendonly) through b kept the edge ports {} / {}",
        c.edge_int, c.edge_pub
    );

    // New media ports on both ends.
    let (offer, answer) = reinvite(
        &mut alice_b,
        &mut bob,
        &mut c.a,
        &alice_sdp(3, alice_2.port(), "sendrecv"),
        &bob_sdp(3, bob_2.port(), "sendrecv"),
    )
    .await;
    assert_eq!(media_of(&offer, "audio").expect("audio").addr, c.edge_pub);
    assert_eq!(media_of(&answer, "audio").expect("audio").addr, c.edge_int);
    assert!(
        flows(&net, (&cl, alice_2), c.edge_int, (&pr, bob_2)),
        "alice -> bob on the new ports"
    );
    assert!(
        flows(&net, (&pr, bob_2), c.edge_pub, (&cl, alice_2)),
        "bob -> alice on the new ports"
    );
    // The old pinholes are gone: the old ports reach nobody.
    assert!(
        !flows(&net, (&cl, c.alice), c.edge_int, (&pr, bob_2)),
        "alice's old port still passes"
    );
    assert!(
        !flows(&net, (&pr, c.bob), c.edge_pub, (&cl, alice_2)),
        "bob's old port still passes"
    );
    assert_eq!(
        b.rules(),
        rules_before,
        "the call's rules replaced, not added"
    );
    println!("HA re-INVITE after failover: new media ports through b: media flows on them, the old ports no longer pass");

    // The BYE through b removes every rule and key of the call.
    alice_b
        .send(&c.a.request("BYE", "", ""))
        .await
        .expect("BYE");
    let bye = bob.recv_request("BYE").await;
    bob.conn()
        .send(&testua::reply(&bye, 200, "OK", "", "", "", ""))
        .await
        .expect("bob's 200 to BYE");
    let r = response_for(&mut alice_b, &c.a.call_id).await;
    assert_eq!(r.status(), Some(200));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rb = b.rules();
        let keys = redis.cli(&["--scan", "--pattern", "sip-edge:*"]);
        if rb.is_empty() && keys.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after the BYE: b {rb:?} store {keys}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !flows(&net, (&cl, alice_2), c.edge_int, (&pr, bob_2)),
        "media passes after the BYE"
    );
}

/// Election (issue #11): with `role = "auto"` exactly one node holds the
/// lease and reports `active`; when it dies the other takes the lease once
/// it has run out, and `sip-edge status` shows the role.
#[tokio::test(flavor = "current_thread")]
async fn role_auto_elects_one_node_and_the_survivor_takes_the_lease() {
    const NAME: &str = "ha::role_auto_elects_one_node_and_the_survivor_takes_the_lease";
    if let Some(reason) = unavailable() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let tag = format!("h2e{}", std::process::id() % 100_000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate(tmp.path()).expect("certificates");
    let mut net = HaNet::create(&tag).expect("namespaces");
    net.attach_pass_programs().expect("pass programs");
    let redis = RedisServer::start(&net, tmp.path()).expect("redis-server");
    let mut a = EdgeNode::new(&tag, Node::A, tmp.path(), &pki, "auto");
    let mut b = EdgeNode::new(&tag, Node::B, tmp.path(), &pki, "auto");
    for n in [&a, &b] {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&n.config)
            .expect("config");
        f.write_all(b"lease_ms = 1000\n").expect("lease");
    }
    a.start(&net);
    a.wait_ha("a holds the lease", Duration::from_secs(5), |v| {
        v["role"] == "active" && v["election"] == "lease"
    });
    b.start(&net);
    b.wait_ha("b resynced", Duration::from_secs(5), |v| {
        v["resynced"] == true
    });
    // Several renewals later b is still the standby.
    std::thread::sleep(Duration::from_millis(1500));
    let (ra, rb) = (a.ha(), b.ha());
    assert_eq!(
        (ra["role"].as_str(), rb["role"].as_str()),
        (Some("active"), Some("standby")),
        "one active: a {ra:#} b {rb:#}"
    );
    assert_eq!(redis.cli(&["GET", "sip-edge:active"]).trim(), "a");

    let t = Instant::now();
    a.kill9();
    b.wait_ha("b takes the lease", Duration::from_secs(5), |v| {
        v["role"] == "active"
    });
    let took = t.elapsed();
    println!(
        "HA election: b active {} ms after the kill of a (lease 1000 ms, sync 100 ms)",
        took.as_millis()
    );
    assert_eq!(redis.cli(&["GET", "sip-edge:active"]).trim(), "b");
    let status = std::process::Command::new(testnet::agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(&b.socket)
        .output()
        .expect("status");
    let status: Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(status["ha"]["role"], "active", "{status}");
    assert_eq!(status["ha"]["election"], "lease", "{status}");
}
