//! The system tests' edge fixture: the real agent binary in the edge
//! namespace of a `testnet::Topology`, and the test user agents around it.
//!
//! This module owns what `tests/tests/e2e_call.rs`, `hardening.rs` and
//! `remote_users.rs` (and, for the CLI helpers, `network.rs`) used to
//! carry a copy each of:
//!
//! - `sa`/`ip`, address literals of the test topology;
//! - `Edge`: namespaces, pins, temp dir, PKI and the agent process of one
//!   test, started from a configuration text, restartable; the CLI
//!   (`sip-edge ... --pin-dir X --json` in the edge namespace), the
//!   pinhole list, drop-reason counters and the "no pinholes left" check;
//! - `PeerUa`: the peer side's TLS listener that accepts the edge's
//!   connection lazily (bob, or a registrar);
//! - `alice_id`/`bob_id` and `call_out`: an internal→external call through
//!   the edge (INVITE, optional 180, 200, ACK).
//!
//! The configuration texts themselves are built in `testua`
//! (`edge_config`, `datapath_config`, `proxy_table`).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;
use sip_edge::sip::message::Message;

use crate::{
    testnet::{self, AgentProcess, Pins, Topology},
    testua::{self, reply, sdp, Dialog, SdpSpec, TestPki, UaConn, UaIdentity, UaListener},
};

/// Every SIP wait of the fixture.
pub const WAIT: Duration = Duration::from_secs(5);
/// The edge's internal SIP listener.
pub const EDGE_INT: &str = "10.77.0.1:5061";
/// The edge's external SIP listener.
pub const EDGE_EXT: &str = "203.0.113.1:5061";

/// A socket address literal of the test topology.
pub fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// An IP address literal of the test topology.
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// `sip-edge <args> --pin-dir <pin_dir> --json` in the edge namespace;
/// its stdout, which must come with exit status 0.
pub fn cli(topo: &Topology, pin_dir: &Path, args: &[&str]) -> String {
    let out = topo
        .edge_cmd(&testnet::agent_bin())
        .args(args)
        .arg("--pin-dir")
        .arg(pin_dir)
        .arg("--json")
        .output()
        .expect("run sip-edge CLI");
    assert!(
        out.status.success(),
        "sip-edge {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Packets counted for drop/pass reason `name` (`sip-edge stats`).
pub fn reason(topo: &Topology, pin_dir: &Path, name: &str) -> u64 {
    let v: Value = serde_json::from_str(&cli(topo, pin_dir, &["stats"])).expect("stats json");
    v["reasons"]
        .as_array()
        .expect("reasons array")
        .iter()
        .find(|r| r["reason"] == name)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or_else(|| panic!("no reason {name} in stats"))
}

/// One agent run. Field order is drop order: the agent stops first, then
/// the pins go, then the namespaces, then the temp dir.
pub struct Edge {
    agent: Option<AgentProcess>,
    _pins: Pins,
    pub topo: Topology,
    pub pin_dir: PathBuf,
    pub pki: TestPki,
    config: PathBuf,
    tmp: tempfile::TempDir,
}

impl Edge {
    /// Namespaces `tag` (pass programs on the end hosts), the pin
    /// directory `/sys/fs/bpf/sip-edge-test-<tag>`, a temp dir and a PKI
    /// in it; no agent yet (`write_config`, then `run_agent`).
    pub fn prepare(tag: &str) -> Edge {
        let mut topo = Topology::create(tag).expect("create namespaces");
        topo.attach_pass_programs()
            .expect("attach pass programs on the end hosts");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sip-edge-test-{tag}"));
        let pins = Pins(pin_dir.clone());
        let tmp = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::generate(tmp.path()).expect("certificates");
        let config = tmp.path().join("sip-edge.toml");
        Edge {
            agent: None,
            _pins: pins,
            topo,
            pin_dir,
            pki,
            config,
            tmp,
        }
    }

    /// `prepare`, the configuration `config(pin_dir, pki)`, and the agent
    /// on it (`run_agent`).
    pub fn start(tag: &str, config: impl FnOnce(&Path, &TestPki) -> String) -> Edge {
        let mut e = Edge::prepare(tag);
        e.write_config(&config(&e.pin_dir, &e.pki));
        e.run_agent();
        e
    }

    /// The test's temp dir (the PKI and the configuration are in it).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Writes the configuration the agent runs on.
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("write config");
    }

    /// Starts the agent on the configuration and waits up to 10 s for its
    /// internal SIP listener (it comes up right after the datapath).
    pub fn run_agent(&mut self) {
        self.run_agent_within(Duration::from_secs(10));
    }

    /// `run_agent`, waiting up to `within` for the listener.
    pub fn run_agent_within(&mut self, within: Duration) {
        let agent = AgentProcess::start(
            &self.topo,
            &testnet::agent_bin(),
            &self.config,
            &self.pin_dir,
            &["int0", "ext0"],
        )
        .expect("start agent");
        let deadline = Instant::now() + within;
        while testnet::in_ns(&self.topo.client, || {
            std::net::TcpStream::connect_timeout(&sa(EDGE_INT), Duration::from_millis(200))
        })
        .expect("netns")
        .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the agent's internal SIP listener never came up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.agent = Some(agent);
    }

    /// Every line the running agent logged so far (empty when none runs).
    pub fn agent_log(&self) -> Vec<String> {
        self.agent
            .as_ref()
            .map(AgentProcess::log_lines)
            .unwrap_or_default()
    }

    /// The running agent's pid (0 when none runs).
    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().map_or(0, AgentProcess::pid)
    }

    /// Sends `signal` to the running agent (SIGHUP, SIGTERM...).
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(a) = &self.agent {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(a.pid() as libc::pid_t, signal) };
        }
    }

    /// Waits up to `within` for the agent to exit after a signal; its exit
    /// status (the agent is gone then), or `None` while it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let status = self.agent.as_mut()?.wait_exit(within)?;
        self.agent = None;
        Some(status)
    }

    /// The configuration file the agent runs on.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// `kill -9` of the agent: no cleanup, the pins stay.
    pub fn kill9(&mut self) {
        if let Some(a) = self.agent.take() {
            a.kill9();
        }
    }

    /// Stops the agent, which must exit cleanly, and removes everything.
    pub fn stop(mut self) {
        if let Some(a) = self.agent.take() {
            assert!(a.stop(), "agent did not exit cleanly");
        }
    }

    /// The CLI on this edge's pins (see `cli`).
    pub fn cli(&self, args: &[&str]) -> String {
        cli(&self.topo, &self.pin_dir, args)
    }

    /// Every installed rule, as `sip-edge pinhole list --json` prints it.
    pub fn pinholes(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&self.cli(&["pinhole", "list"])).expect("list json");
        v.as_array().expect("array").clone()
    }

    /// Packets counted for reason `name`.
    pub fn reason(&self, name: &str) -> u64 {
        reason(&self.topo, &self.pin_dir, name)
    }

    /// Sets the edge namespace's ephemeral port range
    /// (`net.ipv4.ip_local_port_range`), where the kernel picks the local
    /// port of the agent's connections to next hops.
    pub fn ephemeral_ports(&self, lo: u16, hi: u16) {
        testnet::sh(&[
            "ip",
            "netns",
            "exec",
            &self.topo.edge,
            "sysctl",
            "-qw",
            &format!("net.ipv4.ip_local_port_range={lo} {hi}"),
        ])
        .expect("edge ephemeral port range");
    }

    /// Unsolicited traffic from the peer namespace to `to`: `udp`
    /// datagrams from 198.51.100.2:7000, then one connection attempt that
    /// must time out within `syn_wait` (the SYN dropped in XDP, neither
    /// accepted nor answered with the kernel's RST).
    pub fn probe_unsolicited(&self, to: SocketAddr, udp: usize, syn_wait: Duration) {
        let probe = self.udp(&self.topo.peer, "198.51.100.2:7000");
        for _ in 0..udp {
            probe.send_to(b"unsolicited", to).expect("send probe");
        }
        let syn = testnet::in_ns(&self.topo.peer, || {
            std::net::TcpStream::connect_timeout(&to, syn_wait)
        })
        .expect("netns");
        match syn {
            Err(err) => assert_eq!(
                err.kind(),
                std::io::ErrorKind::TimedOut,
                "an unsolicited SYN to {to} must be dropped, not answered: {err}"
            ),
            Ok(_) => panic!("an unsolicited connection to {to} was accepted"),
        }
    }

    /// The scenario's closing check: nothing left in the pinhole map
    /// within 2 s.
    pub fn assert_empty(&self, scenario: &str) {
        self.assert_empty_within(scenario, Duration::from_secs(2));
    }

    /// `assert_empty` waiting up to `within`.
    pub fn assert_empty_within(&self, scenario: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let list = self.pinholes();
            if list.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{scenario}: pinholes left behind: {list:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Packets the rule matching `local` (an edge address:port) carried.
    pub fn packets_at(&self, local: SocketAddr) -> u64 {
        self.pinholes()
            .iter()
            .filter(|e| e["local"].as_str() == Some(&local.to_string()))
            .map(|e| e["packets"].as_u64().unwrap_or(0))
            .sum()
    }

    /// Whether a rule matches on edge address:port `local`.
    pub fn has_rule_at(&self, local: SocketAddr) -> bool {
        self.pinholes()
            .iter()
            .any(|e| e["local"].as_str() == Some(&local.to_string()))
    }

    /// Alice (client namespace) connected to the edge's internal listener.
    pub async fn connect_alice(&self) -> UaConn {
        testua::connect_tls(
            &self.topo.client,
            sa(EDGE_INT),
            &self.pki.ca,
            testua::EDGE_TLS_NAME,
            WAIT,
        )
        .await
        .expect("alice connects to the edge over TLS")
    }

    /// Bob (peer namespace) connected to the edge's external listener.
    pub async fn connect_bob(&self) -> UaConn {
        testua::connect_tls(
            &self.topo.peer,
            sa(EDGE_EXT),
            &self.pki.ca,
            testua::EDGE_TLS_NAME,
            WAIT,
        )
        .await
        .expect("bob connects to the edge over TLS")
    }

    /// A UDP socket bound to `addr` in namespace `ns`.
    pub fn udp(&self, ns: &str, addr: &str) -> UdpSocket {
        self.topo.udp(ns, sa(addr)).expect("media socket")
    }
}

/// The peer side (198.51.100.2:5061, the peer's certificate): the edge's
/// connection to it, accepted on the first request and reused.
pub struct PeerUa {
    /// The listener the edge connects to.
    pub listener: UaListener,
    /// The edge's connection, once accepted; `None` again makes the next
    /// `recv_request` accept a new one.
    pub conn: Option<UaConn>,
    skip_others: bool,
}

impl PeerUa {
    /// A peer whose `recv_request` takes the next message, which must be
    /// the request asked for.
    pub fn new(e: &Edge) -> PeerUa {
        PeerUa {
            listener: UaListener::bind(
                &e.topo.peer,
                sa("198.51.100.2:5061"),
                &e.pki.peer_cert,
                &e.pki.peer_key,
            )
            .expect("bob listens"),
            conn: None,
            skip_others: false,
        }
    }

    /// A peer on `listener` (topologies other than `Edge`'s), skipping
    /// other messages as `skipping_others` does.
    pub fn on_listener(listener: UaListener) -> PeerUa {
        PeerUa {
            listener,
            conn: None,
            skip_others: true,
        }
    }

    /// A peer whose `recv_request` skips other messages (such as BYEs of
    /// calls the edge ends) until the request asked for, within `WAIT`.
    pub fn skipping_others(e: &Edge) -> PeerUa {
        PeerUa {
            skip_others: true,
            ..PeerUa::new(e)
        }
    }

    /// The next request `method` from the edge, accepting its connection
    /// if needed.
    pub async fn recv_request(&mut self, method: &str) -> Message {
        if self.conn.is_none() {
            self.conn = Some(
                self.listener
                    .accept(WAIT)
                    .await
                    .expect("edge connects to the peer"),
            );
        }
        if !self.skip_others {
            return self
                .conn()
                .recv_request(method, WAIT)
                .await
                .unwrap_or_else(|e| panic!("bob waiting for {method}: {e}"));
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self
                .conn()
                .recv(left)
                .await
                .unwrap_or_else(|e| panic!("bob waiting for {method}: {e}"));
            if m.method().is_some_and(|x| x.is(method)) {
                return m;
            }
        }
    }

    /// The edge's connection (after a first `recv_request`).
    pub fn conn(&mut self) -> &mut UaConn {
        self.conn.as_mut().expect("bob's connection")
    }
}

/// Alice, inside at 10.77.0.2.
pub fn alice_id() -> UaIdentity {
    UaIdentity {
        aor: "sips:alice@peer.example.net".into(),
        contact: "sips:alice@10.77.0.2:5061".into(),
        via_host: "10.77.0.2:5061".into(),
        display: "Alice".into(),
    }
}

/// Bob, outside at 198.51.100.2.
pub fn bob_id() -> UaIdentity {
    UaIdentity {
        aor: "sips:bob@peer.example.net".into(),
        contact: "sips:bob@198.51.100.2:5061".into(),
        via_host: "198.51.100.2:5061".into(),
        display: "Bob".into(),
    }
}

/// A Contact header line for `me`.
pub fn contact(me: &UaIdentity) -> String {
    format!("Contact: <{}>\r\n", me.contact)
}

/// An established internal→external call.
pub struct OutCall {
    pub a: Dialog,
    pub b: Dialog,
    /// The offer as bob received it.
    pub offer: Vec<u8>,
    /// The answer as alice received it.
    pub answer: Vec<u8>,
}

/// How `call_out` goes between the INVITE and the 200.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Bob rings (180) before he answers; alice must get the 180 and then
    /// the 200 (100 Trying skipped), anything else fails the test.
    Ringing,
    /// Bob answers at once. Alice's first response must be 100 Trying and
    /// her final one 200 (other messages meanwhile skipped); either other
    /// status is returned as `Err` (a refusal by the edge).
    Refusable,
}

/// INVITE from alice with `offer` (audio etc. at 10.77.0.2), then as
/// `flow` says, 200 with `answer` (at 198.51.100.2) from bob, ACK.
pub async fn call_out(
    alice: &mut UaConn,
    bob: &mut PeerUa,
    offer: &SdpSpec,
    answer: &SdpSpec,
    flow: Flow,
) -> Result<OutCall, u16> {
    let mut a = Dialog::outgoing(&alice_id(), "sips:bob@peer.example.net");
    alice
        .send(&a.invite(&sdp("alice", 1, ip("10.77.0.2"), offer)))
        .await
        .expect("send INVITE");
    if flow == Flow::Refusable {
        // The edge answers 100 Trying to what it forwards; a refusal
        // arrives instead, before bob sees anything.
        let first = alice.recv(WAIT).await.expect("alice gets a response");
        if first.status() != Some(100) {
            return Err(first.status().unwrap_or(0));
        }
    }
    let inv = bob.recv_request("INVITE").await;
    let b = Dialog::incoming(&bob_id(), &inv).expect("bob's dialog");
    if flow == Flow::Ringing {
        bob.conn()
            .send(&reply(
                &inv,
                180,
                "Ringing",
                &b.local_tag,
                &contact(&b.me),
                "",
                "",
            ))
            .await
            .expect("180");
        let ringing = alice.recv_status(180, WAIT).await.expect("alice gets 180");
        a.on_invite_response(&ringing).expect("180");
    }
    bob.conn()
        .send(&reply(
            &inv,
            200,
            "OK",
            &b.local_tag,
            &contact(&b.me),
            "application/sdp",
            &sdp("bob", 1, ip("198.51.100.2"), answer),
        ))
        .await
        .expect("200");
    let ok = match flow {
        Flow::Ringing => alice.recv_status(200, WAIT).await.expect("alice gets 200"),
        Flow::Refusable => {
            let ok = response_for(alice, &a.call_id).await;
            if ok.status() != Some(200) {
                return Err(ok.status().unwrap_or(0));
            }
            ok
        }
    };
    a.on_invite_response(&ok).expect("200");
    alice.send(&a.ack("", "")).await.expect("ACK");
    bob.recv_request("ACK").await;
    Ok(OutCall {
        a,
        b,
        offer: inv.body().to_vec(),
        answer: ok.body().to_vec(),
    })
}

/// The next final response whose Call-ID is `call_id`, within `WAIT`
/// (requests the edge sends meanwhile, e.g. BYEs of calls it ends, are
/// skipped).
pub async fn response_for(conn: &mut UaConn, call_id: &str) -> Message {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = conn
            .recv(left)
            .await
            .unwrap_or_else(|e| panic!("waiting for a response to {call_id}: {e}"));
        if m.status().is_some_and(|c| c >= 200) && m.call_id().ok() == Some(call_id) {
            return m;
        }
    }
}
