//! The two-node HA topology (issue #11): an inside client, two edge
//! namespaces, an outside peer and a store namespace running redis-server.
//!
//! ```text
//!                 eth0 ── int0 [edge a] ext0 ── eth0
//!  [client]                  ha0                       [peer]
//!  10.77.0.2/32   eth1 ── int0 [edge b] ext0 ── eth1   198.51.100.2/32
//!                            ha0
//!                  [store] 10.77.9.1 (redis)
//! ```
//!
//! Each edge has its own node addresses (10.77.0.11/.12 inside,
//! 203.0.113.11/.12 outside, 10.77.9.11/.12 to the store); the edges'
//! service addresses, 10.77.0.1 and 203.0.113.1 (the virtual ones), live on
//! one edge at a time. [`HaNet::move_vips`] is what a VRRP/keepalived
//! failover does on one L2 segment, done as two point-to-point links: the
//! addresses leave one edge and appear on the other, and the client's and
//! peer's host routes for them switch links (the neighbour entries of the
//! old link are flushed). Both edges may bind the virtual addresses before
//! they hold them (`net.ipv4.ip_nonlocal_bind`, as keepalived setups do).
//! Everything is removed on drop.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::{programs::Xdp, programs::XdpMode, Ebpf};

use crate::testnet::{ifindex, in_ns, sh, TestnetError, PASS_PROG};

/// The two edge nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// Edge a (starts active).
    A,
    /// Edge b (starts standby).
    B,
}

impl Node {
    /// `a` / `b`.
    pub fn name(self) -> &'static str {
        match self {
            Node::A => "a",
            Node::B => "b",
        }
    }
    fn octet(self) -> u8 {
        match self {
            Node::A => 11,
            Node::B => 12,
        }
    }
    /// The client's and the peer's link to this node.
    fn link(self) -> &'static str {
        match self {
            Node::A => "eth0",
            Node::B => "eth1",
        }
    }
}

/// Inside virtual address.
pub const VIP_INT: &str = "10.77.0.1";
/// Outside virtual address.
pub const VIP_EXT: &str = "203.0.113.1";
/// The store.
pub const STORE: &str = "10.77.9.1:6379";

/// The namespaces, removed on drop.
pub struct HaNet {
    /// Client namespace.
    pub client: String,
    /// Peer namespace.
    pub peer: String,
    /// Store namespace.
    pub store: String,
    edges: [String; 2],
    pass_progs: Vec<Ebpf>,
}

fn run(cmds: &[Vec<String>]) -> Result<(), TestnetError> {
    for c in cmds {
        let v: Vec<&str> = c.iter().map(String::as_str).collect();
        sh(&v)?;
    }
    Ok(())
}

fn cmd(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

impl HaNet {
    /// Builds the topology; `tag` (short) makes the names unique. The
    /// virtual addresses start on edge a.
    pub fn create(tag: &str) -> Result<HaNet, TestnetError> {
        let t = HaNet {
            client: format!("se-{tag}-cl"),
            peer: format!("se-{tag}-pr"),
            store: format!("se-{tag}-st"),
            edges: [format!("se-{tag}-ea"), format!("se-{tag}-eb")],
            pass_progs: Vec::new(),
        };
        for ns in t.all() {
            let _ = sh(&["ip", "netns", "del", ns]);
            sh(&["ip", "netns", "add", ns])?;
            run(&[
                cmd(&format!("ip -n {ns} link set lo up")),
                cmd(&format!(
                    "ip netns exec {ns} sysctl -qw net.ipv4.conf.all.rp_filter=0"
                )),
                cmd(&format!(
                    "ip netns exec {ns} sysctl -qw net.ipv4.conf.default.rp_filter=0"
                )),
            ])?;
        }
        let (c, p, s) = (&t.client, &t.peer, &t.store);
        let mut cmds = vec![
            cmd(&format!("ip -n {c} addr add 10.77.0.2/32 dev lo")),
            cmd(&format!("ip -n {p} addr add 198.51.100.2/32 dev lo")),
            cmd(&format!("ip -n {s} addr add 10.77.9.1/32 dev lo")),
        ];
        for n in [Node::A, Node::B] {
            let e = t.edge(n);
            let (o, l) = (n.octet(), n.link());
            cmds.extend([
                cmd(&format!(
                    "ip -n {e} link add int0 type veth peer name {l} netns {c}"
                )),
                cmd(&format!(
                    "ip -n {e} link add ext0 type veth peer name {l} netns {p}"
                )),
                cmd(&format!(
                    "ip -n {e} link add ha0 type veth peer name {l} netns {s}"
                )),
                cmd(&format!("ip -n {e} addr add 10.77.0.{o}/32 dev int0")),
                cmd(&format!("ip -n {e} addr add 203.0.113.{o}/32 dev ext0")),
                cmd(&format!("ip -n {e} addr add 10.77.9.{o}/32 dev ha0")),
                cmd(&format!("ip -n {e} link set int0 up")),
                cmd(&format!("ip -n {e} link set ext0 up")),
                cmd(&format!("ip -n {e} link set ha0 up")),
                cmd(&format!("ip -n {c} link set {l} up")),
                cmd(&format!("ip -n {p} link set {l} up")),
                cmd(&format!("ip -n {s} link set {l} up")),
                cmd(&format!("ip -n {e} route add 10.77.0.2/32 dev int0")),
                cmd(&format!("ip -n {e} route add 198.51.100.2/32 dev ext0")),
                cmd(&format!("ip -n {e} route add 10.77.9.1/32 dev ha0")),
                cmd(&format!(
                    "ip -n {c} route add 10.77.0.{o}/32 dev {l} src 10.77.0.2"
                )),
                cmd(&format!(
                    "ip -n {p} route add 203.0.113.{o}/32 dev {l} src 198.51.100.2"
                )),
                cmd(&format!(
                    "ip -n {s} route add 10.77.9.{o}/32 dev {l} src 10.77.9.1"
                )),
                // bpf_fib_lookup refuses to forward when forwarding is off.
                cmd(&format!(
                    "ip netns exec {e} sysctl -qw net.ipv4.ip_forward=1"
                )),
                cmd(&format!(
                    "ip netns exec {e} sysctl -qw net.ipv4.ip_nonlocal_bind=1"
                )),
            ]);
        }
        run(&cmds)?;
        // Senders compute checksums in software (testnet.rs says why).
        for ns in [c, p] {
            for l in ["eth0", "eth1"] {
                let _ = sh(&["ip", "netns", "exec", ns, "ethtool", "-K", l, "tx", "off"]);
            }
        }
        t.vips_on(Node::A)?;
        Ok(t)
    }

    fn all(&self) -> [&String; 5] {
        [
            &self.client,
            &self.peer,
            &self.store,
            &self.edges[0],
            &self.edges[1],
        ]
    }

    /// Namespace of edge `n`.
    pub fn edge(&self, n: Node) -> &str {
        match n {
            Node::A => &self.edges[0],
            Node::B => &self.edges[1],
        }
    }

    /// `nsenter --net=... -- program` in edge `n` (keeps the host's /sys,
    /// so pins stay visible).
    pub fn edge_cmd(&self, n: Node, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.edge(n)))
            .arg("--")
            .arg(program);
        c
    }

    fn vips_on(&self, n: Node) -> Result<(), TestnetError> {
        let (e, l, c, p) = (self.edge(n), n.link(), &self.client, &self.peer);
        run(&[
            cmd(&format!("ip -n {e} addr add {VIP_INT}/32 dev int0")),
            cmd(&format!("ip -n {e} addr add {VIP_EXT}/32 dev ext0")),
            cmd(&format!(
                "ip -n {c} route replace {VIP_INT}/32 dev {l} src 10.77.0.2"
            )),
            cmd(&format!(
                "ip -n {p} route replace {VIP_EXT}/32 dev {l} src 198.51.100.2"
            )),
        ])
    }

    /// The failover: the virtual addresses leave `from` and come up on
    /// `to`; the client's and peer's routes switch links and the old
    /// links' neighbour entries are flushed. Returns how long it took.
    pub fn move_vips(&self, from: Node, to: Node) -> Result<Duration, TestnetError> {
        let t0 = Instant::now();
        let e = self.edge(from);
        let _ = sh(&[
            "ip",
            "-n",
            e,
            "addr",
            "del",
            &format!("{VIP_INT}/32"),
            "dev",
            "int0",
        ]);
        let _ = sh(&[
            "ip",
            "-n",
            e,
            "addr",
            "del",
            &format!("{VIP_EXT}/32"),
            "dev",
            "ext0",
        ]);
        self.vips_on(to)?;
        for ns in [&self.client, &self.peer] {
            let _ = sh(&["ip", "-n", ns, "neigh", "flush", "dev", from.link()]);
        }
        Ok(t0.elapsed())
    }

    /// Edge `n`'s links to the client and the peer down (`false`) or up:
    /// with `kill -9` of its agent, the node is gone as a machine that
    /// lost power is (its XDP program, which outlives the agent, forwards
    /// nothing more).
    pub fn set_links(&self, n: Node, up: bool) -> Result<(), TestnetError> {
        let e = self.edge(n);
        let state = if up { "up" } else { "down" };
        run(&[
            cmd(&format!("ip -n {e} link set int0 {state}")),
            cmd(&format!("ip -n {e} link set ext0 {state}")),
        ])
    }

    /// The pass-through program on the client's and peer's links, so
    /// frames the edges redirect are accepted (see `testnet::PASS_PROG`).
    pub fn attach_pass_programs(&mut self) -> Result<(), TestnetError> {
        for ns in [self.client.clone(), self.peer.clone()] {
            for link in ["eth0", "eth1"] {
                let ebpf = in_ns(&ns, || -> Result<Ebpf, String> {
                    let mut ebpf = crate::harness::load().map_err(|e| e.to_string())?;
                    let prog: &mut Xdp = ebpf
                        .program_mut(PASS_PROG)
                        .ok_or_else(|| format!("{PASS_PROG} missing from the object"))?
                        .try_into()
                        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
                    prog.load().map_err(|e| e.to_string())?;
                    let idx = ifindex(link).ok_or(format!("{link} missing"))?;
                    prog.attach_to_if_index(idx, XdpMode::Driver)
                        .map_err(|e| e.to_string())?;
                    Ok(ebpf)
                })?
                .map_err(|reason| TestnetError::Pass {
                    ns: ns.clone(),
                    reason,
                })?;
                self.pass_progs.push(ebpf);
            }
        }
        Ok(())
    }

    /// A non-blocking UDP socket bound to `addr` in `ns`.
    pub fn udp(&self, ns: &str, addr: SocketAddr) -> UdpSocket {
        let s = in_ns(ns, || UdpSocket::bind(addr))
            .expect("netns")
            .unwrap_or_else(|e| panic!("bind {addr} in {ns}: {e}"));
        s.set_nonblocking(true).expect("nonblocking");
        s
    }

    /// Waits (bounded) until a TCP connect from `ns` to `to` succeeds.
    pub fn wait_tcp(&self, ns: &str, to: SocketAddr, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let ok = in_ns(ns, || {
                std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_ok()
            })
            .unwrap_or(false);
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for HaNet {
    fn drop(&mut self) {
        self.pass_progs.clear();
        for ns in self.all() {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// redis-server in the store namespace, bound to the store address only,
/// nothing persisted; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    ns: String,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts it and waits (bounded) until it accepts connections.
    pub fn start(net: &HaNet, dir: &Path) -> Result<RedisServer, TestnetError> {
        let mut r = RedisServer {
            child: None,
            ns: net.store.clone(),
            dir: dir.to_owned(),
        };
        r.restart(net)?;
        Ok(r)
    }

    /// Starts it again after `stop`.
    pub fn restart(&mut self, net: &HaNet) -> Result<(), TestnetError> {
        let addr: SocketAddr = STORE.parse().expect("store address");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "redis-server"])
            .args(["--bind", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| TestnetError::Cmd {
                cmd: "redis-server".into(),
                stderr: e.to_string(),
            })?;
        self.child = Some(child);
        if !net.wait_tcp(&net.store, addr, Duration::from_secs(10)) {
            return Err(TestnetError::Cmd {
                cmd: "redis-server".into(),
                stderr: "not accepting connections within 10 s".into(),
            });
        }
        Ok(())
    }

    /// Kills it (an outage: nothing is kept).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `redis-cli -h <store> <args>` from the store namespace; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let addr: SocketAddr = STORE.parse().expect("store address");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "redis-cli", "-h"])
            .arg(addr.ip().to_string())
            .args(["-p", &addr.port().to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
