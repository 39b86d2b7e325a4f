//! Throwaway three-namespace topology (client / edge / peer) for the network
//! tests and `cargo xtask demo`. Everything it creates is removed on drop.
//!
//! ```text
//!  client ns                    edge ns                       peer ns
//!  eth0 10.77.0.2/24  <-veth->  int0 10.77.0.1/24
//!       2001:db8:77::2/64            2001:db8:77::1/64
//!                               ext0 203.0.113.1/24  <-veth->  eth0 198.51.100.2/24
//!                                    2001:db8:ff::1/64              2001:db8:ff::2/64
//! ```
//!
//! Only RFC 5737 / RFC 3849 documentation ranges and 10.77.0.0/16 are used,
//! only inside namespaces this module creates. Sockets are created inside a
//! namespace by a short-lived thread that `setns`es into it; a socket stays
//! in the namespace it was created in, so tests then use it from anywhere.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use aya::{
    programs::{Xdp, XdpMode},
    Ebpf,
};

/// The client's address.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The edge's internal address.
pub const EDGE_INT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The edge's public address.
pub const EDGE_PUB_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The peer's address.
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The client's IPv6 address.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 2);
/// The edge's internal IPv6 address.
pub const EDGE_INT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1);
/// The edge's public IPv6 address.
pub const EDGE_PUB_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
/// The peer's IPv6 address.
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 2);

/// Name of the pass-through XDP program in the datapath object, attached to
/// the client's and peer's veth ends: a veth only accepts XDP_REDIRECTed
/// frames when its peer runs XDP (veth_xdp_xmit needs the receive NAPI).
pub use crate::harness::PASS_PROG;

/// The agent binary the system tests, the demo and the bench run: the
/// `sip-edge` built into the same target directory as the running
/// executable (`target/<profile>/`, also from a test binary under
/// `target/<profile>/deps/`), or `$SIP_EDGE_BIN`. It lives in another crate,
/// so cargo builds it only as part of the workspace: `cargo xtask test`
/// builds everything first; alone, `cargo build -p sip-edge` (with
/// `--release` for the bench).
pub fn agent_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("SIP_EDGE_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join("sip-edge")
}

/// Errors of building the topology.
#[derive(Debug, thiserror::Error)]
pub enum TestnetError {
    /// Not root, no `ip`, or no netns support.
    #[error("network namespaces unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// A command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Cmd {
        /// The command line.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// A socket or setns call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was attempted.
        op: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Loading or attaching the pass program failed.
    #[error("pass program on {ns}: {reason}")]
    Pass {
        /// Namespace.
        ns: String,
        /// Why.
        reason: String,
    },
}

fn io_err(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestnetError {
    let op = op.into();
    move |source| TestnetError::Io { op, source }
}

/// Run a command, failing with its stderr.
pub fn sh(args: &[&str]) -> Result<String, TestnetError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("spawn {}", args[0])))?;
    if !out.status.success() {
        return Err(TestnetError::Cmd {
            cmd: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why privileged network tests cannot run here, if they cannot.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "not running as root (network namespaces and XDP need CAP_NET_ADMIN/CAP_BPF)".into(),
        );
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("`ip` (iproute2) not installed; run `cargo xtask setup`".into());
    }
    if Command::new("nsenter").arg("--version").output().is_err() {
        return Some("`nsenter` (util-linux) not installed".into());
    }
    if !sip_edge::datapath::attach::is_bpffs(std::path::Path::new("/sys/fs/bpf")) {
        return Some("/sys/fs/bpf is not bpffs; run `cargo xtask setup` (mounts it)".into());
    }
    None
}

/// Run `f` on a thread inside network namespace `ns`.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, TestnetError> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).map_err(io_err(format!("open {path}")))?;
            // SAFETY: setns on this thread only, with a valid netns fd.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(TestnetError::Io {
                    op: format!("setns {path}"),
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(TestnetError::Unavailable {
                reason: format!("thread in {ns} panicked"),
            })
        })
    })
}

/// The three namespaces, removed on drop.
pub struct Topology {
    /// Client namespace name.
    pub client: String,
    /// Edge namespace name.
    pub edge: String,
    /// Peer namespace name.
    pub peer: String,
    /// Attacker namespace name, once [`Topology::add_attacker`] made it.
    pub attacker: Option<String>,
    pass_progs: Vec<Ebpf>,
}

impl Topology {
    /// Create the namespaces, links, addresses and routes. `tag` makes the
    /// names unique (keep it short: it goes into interface-free names only).
    pub fn create(tag: &str) -> Result<Topology, TestnetError> {
        if let Some(reason) = unavailable_reason() {
            return Err(TestnetError::Unavailable { reason });
        }
        let t = Topology {
            client: format!("se-{tag}-cl"),
            edge: format!("se-{tag}-edge"),
            peer: format!("se-{tag}-peer"),
            attacker: None,
            pass_progs: Vec::new(),
        };
        for ns in [&t.client, &t.edge, &t.peer] {
            let _ = sh(&["ip", "netns", "del", ns]);
            sh(&["ip", "netns", "add", ns])?;
            // No duplicate address detection: link-local addresses would
            // otherwise take ~2 s to become usable, delaying neighbour
            // discovery (and the first IPv6 packets) for no test value.
            for key in [
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ] {
                sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", key])?;
            }
        }
        let (c, e, p) = (t.client.as_str(), t.edge.as_str(), t.peer.as_str());
        let cmds: Vec<Vec<&str>> = vec![
            vec![
                "ip", "-n", e, "link", "add", "int0", "type", "veth", "peer", "name", "eth0",
                "netns", c,
            ],
            vec![
                "ip", "-n", e, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0",
                "netns", p,
            ],
            vec!["ip", "-n", c, "addr", "add", "10.77.0.2/24", "dev", "eth0"],
            vec![
                "ip",
                "-n",
                c,
                "addr",
                "add",
                "2001:db8:77::2/64",
                "dev",
                "eth0",
                "nodad",
            ],
            vec!["ip", "-n", e, "addr", "add", "10.77.0.1/24", "dev", "int0"],
            vec![
                "ip",
                "-n",
                e,
                "addr",
                "add",
                "2001:db8:77::1/64",
                "dev",
                "int0",
                "nodad",
            ],
            vec![
                "ip",
                "-n",
                e,
                "addr",
                "add",
                "203.0.113.1/24",
                "dev",
                "ext0",
            ],
            vec![
                "ip",
                "-n",
                e,
                "addr",
                "add",
                "2001:db8:ff::1/64",
                "dev",
                "ext0",
                "nodad",
            ],
            vec![
                "ip",
                "-n",
                p,
                "addr",
                "add",
                "198.51.100.2/24",
                "dev",
                "eth0",
            ],
            vec![
                "ip",
                "-n",
                p,
                "addr",
                "add",
                "2001:db8:ff::2/64",
                "dev",
                "eth0",
                "nodad",
            ],
            vec!["ip", "-n", c, "link", "set", "lo", "up"],
            vec!["ip", "-n", e, "link", "set", "lo", "up"],
            vec!["ip", "-n", p, "link", "set", "lo", "up"],
            vec!["ip", "-n", c, "link", "set", "eth0", "up"],
            vec!["ip", "-n", e, "link", "set", "int0", "up"],
            vec!["ip", "-n", e, "link", "set", "ext0", "up"],
            vec!["ip", "-n", p, "link", "set", "eth0", "up"],
            // The edge is the client's gateway (nat mode needs it).
            vec!["ip", "-n", c, "route", "add", "default", "via", "10.77.0.1"],
            vec![
                "ip",
                "-n",
                c,
                "-6",
                "route",
                "add",
                "default",
                "via",
                "2001:db8:77::1",
            ],
            // Peer and edge public address are on one wire, different prefixes.
            vec![
                "ip",
                "-n",
                e,
                "route",
                "add",
                "198.51.100.0/24",
                "dev",
                "ext0",
            ],
            vec![
                "ip",
                "-n",
                p,
                "route",
                "add",
                "203.0.113.0/24",
                "dev",
                "eth0",
            ],
            // bpf_fib_lookup refuses to forward when forwarding is off.
            vec![
                "ip",
                "netns",
                "exec",
                e,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
            vec![
                "ip",
                "netns",
                "exec",
                e,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.forwarding=1",
            ],
        ];
        for cmd in &cmds {
            sh(cmd)?;
        }
        // veth hands CHECKSUM_PARTIAL skbs to XDP with only the pseudo-header
        // sum in the L4 checksum; once redirected that state is lost and the
        // receiver would drop them. Real NICs deliver complete checksums, so
        // the senders here compute them in software.
        for ns in [c, p] {
            let _ = sh(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off",
            ]);
        }
        Ok(t)
    }

    /// Attach the pass-through program to the client's and peer's `eth0`
    /// so redirected frames are accepted (see [`PASS_PROG`]).
    pub fn attach_pass_programs(&mut self) -> Result<(), TestnetError> {
        for ns in [self.client.clone(), self.peer.clone()] {
            let ebpf = in_ns(&ns, || -> Result<Ebpf, String> {
                let mut ebpf = crate::harness::load().map_err(|e| e.to_string())?;
                let prog: &mut Xdp = ebpf
                    .program_mut(PASS_PROG)
                    .ok_or_else(|| format!("{PASS_PROG} missing from the object"))?
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| e.to_string())?;
                prog.load().map_err(|e| e.to_string())?;
                let idx = ifindex("eth0").ok_or("eth0 missing")?;
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
        Ok(())
    }

    /// A fourth namespace on the outside segment (`se-<tag>-atk`): a
    /// macvlan (bridge mode) on the peer's `eth0`, so it shares the wire
    /// between the peer and the edge's `ext0` (what it sends reaches the
    /// edge's XDP program like the peer's traffic), with address `addr`
    /// (in 198.51.100.0/24 or 203.0.113.0/24) and a route to the edge's
    /// public prefix. Removed on drop with the others.
    pub fn add_attacker(&mut self, addr: Ipv4Addr) -> Result<String, TestnetError> {
        if !is_test_addr(IpAddr::V4(addr)) {
            return Err(TestnetError::Unavailable {
                reason: format!("{addr} is not a test address"),
            });
        }
        let ns = self.edge.replace("-edge", "-atk");
        let _ = sh(&["ip", "netns", "del", &ns]);
        sh(&["ip", "netns", "add", &ns])?;
        self.attacker = Some(ns.clone());
        let cidr = format!("{addr}/24");
        let p = self.peer.as_str();
        for cmd in [
            vec![
                "ip", "-n", p, "link", "add", "link", "eth0", "name", "atk0", "type", "macvlan",
                "mode", "bridge",
            ],
            vec!["ip", "-n", p, "link", "set", "atk0", "netns", &ns],
            vec!["ip", "-n", &ns, "link", "set", "atk0", "name", "eth0"],
            vec!["ip", "-n", &ns, "addr", "add", &cidr, "dev", "eth0"],
            vec!["ip", "-n", &ns, "link", "set", "lo", "up"],
            vec!["ip", "-n", &ns, "link", "set", "eth0", "up"],
            vec![
                "ip",
                "-n",
                &ns,
                "route",
                "add",
                "203.0.113.0/24",
                "dev",
                "eth0",
            ],
        ] {
            sh(&cmd)?;
        }
        Ok(ns)
    }

    /// `/run/netns/<edge>`.
    pub fn edge_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.edge))
    }

    /// A command that runs `program` inside the edge namespace, keeping the
    /// host's /sys (so pins under /sys/fs/bpf stay visible; `ip netns exec`
    /// would remount /sys).
    pub fn edge_cmd(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.edge_path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// A UDP socket bound to `addr` inside namespace `ns`, with a read timeout.
    pub fn udp(&self, ns: &str, addr: SocketAddr) -> Result<UdpSocket, TestnetError> {
        let s = in_ns(ns, || UdpSocket::bind(addr))?
            .map_err(io_err(format!("bind udp {addr} in {ns}")))?;
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .map_err(io_err("set timeout"))?;
        Ok(s)
    }

    /// A TCP listener on `addr` inside `ns`.
    pub fn tcp_listen(&self, ns: &str, addr: SocketAddr) -> Result<TcpListener, TestnetError> {
        in_ns(ns, || TcpListener::bind(addr))?.map_err(io_err(format!("listen tcp {addr} in {ns}")))
    }

    /// A TCP connection from `ns` (bound to `local`) to `to`.
    pub fn tcp_connect(
        &self,
        ns: &str,
        local: SocketAddr,
        to: SocketAddr,
    ) -> Result<TcpStream, TestnetError> {
        in_ns(ns, || -> std::io::Result<TcpStream> {
            let sock = if to.is_ipv4() {
                socket2_tcp(libc::AF_INET)?
            } else {
                socket2_tcp(libc::AF_INET6)?
            };
            bind_connect(sock, local, to)
        })?
        .map_err(io_err(format!("connect tcp {local} -> {to} in {ns}")))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.pass_progs.clear();
        for ns in [&self.client, &self.edge, &self.peer]
            .into_iter()
            .chain(self.attacker.as_ref())
        {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

pub use sip_edge::datapath::attach::ifindex;

fn socket2_tcp(family: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned immediately.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh valid fd.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the matching variant.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// std has no bind-before-connect for TCP; the flow's client port must be
/// the one the pinhole names, so do it with libc.
fn bind_connect(
    fd: std::os::fd::OwnedFd,
    local: SocketAddr,
    to: SocketAddr,
) -> std::io::Result<TcpStream> {
    let (l, llen) = sockaddr(local);
    let (r, rlen) = sockaddr(to);
    let one: libc::c_int = 1;
    // SAFETY: valid fd and correctly sized option/addresses.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            4,
        );
        if libc::bind(
            fd.as_raw_fd(),
            &l as *const _ as *const libc::sockaddr,
            llen,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        if libc::connect(
            fd.as_raw_fd(),
            &r as *const _ as *const libc::sockaddr,
            rlen,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(TcpStream::from(fd))
}

/// Send `payload` from `from` to `to` and return what `rx` receives within
/// its timeout: the payload and the source address it saw.
pub fn udp_roundtrip(
    from: &UdpSocket,
    to: SocketAddr,
    rx: &UdpSocket,
    payload: &[u8],
) -> Option<(Vec<u8>, SocketAddr)> {
    from.send_to(payload, to).ok()?;
    let mut buf = [0u8; 2048];
    loop {
        match rx.recv_from(&mut buf) {
            Ok((n, src)) if &buf[..n] == payload => return Some((buf[..n].to_vec(), src)),
            // A stale datagram from an earlier step: keep reading.
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// Whether an address is one of the test ranges (guards against misuse).
pub fn is_test_addr(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            (o[0] == 10 && o[1] == 77)
                || (o[0] == 198 && o[1] == 51 && o[2] == 100)
                || (o[0] == 203 && o[1] == 0 && o[2] == 113)
        }
        IpAddr::V6(a) => a.segments()[0] == 0x2001 && a.segments()[1] == 0xdb8,
    }
}

/// Report a privileged test that cannot run: printed, and appended to the
/// file named by `SIP_EDGE_SKIP_LOG` (set by `cargo xtask test`) so the
/// summary counts it as skipped, never as passed.
pub fn record_skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os("SIP_EDGE_SKIP_LOG") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{test}: {reason}");
        }
    }
}

/// A running agent inside the edge namespace; killed (SIGTERM, then
/// SIGKILL) on drop.
pub struct AgentProcess {
    child: std::process::Child,
    log: AgentLog,
}

/// The last [`AGENT_LOG_LINES`] lines the agent wrote to stderr, kept for
/// tests that check what it logged.
pub type AgentLog = std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>;

/// How many of the agent's log lines an [`AgentLog`] keeps.
pub const AGENT_LOG_LINES: usize = 20_000;

impl AgentProcess {
    /// Start `sip-edge run --config <config>` in the edge namespace and wait
    /// (bounded) until it says it is ready: the line it logs once the
    /// datapath is attached and configured and, with `[proxy]`, its SIP
    /// listeners are bound. Not the pins under `pin_dir`: on a restart the
    /// previous run's pins already exist, and a slow machine would signal
    /// the new agent before it swapped its program in. The agent's log goes
    /// on to our stderr. The links of `ifaces` must be pinned by then.
    pub fn start(
        topo: &Topology,
        bin: &std::path::Path,
        config: &std::path::Path,
        pin_dir: &std::path::Path,
        ifaces: &[&str],
    ) -> Result<AgentProcess, TestnetError> {
        Self::start_cmd(topo.edge_cmd(bin), config, pin_dir, ifaces)
    }

    /// `start` with the command that runs the agent binary in its
    /// namespace (`nsenter --net=...`), for topologies of their own.
    pub fn start_cmd(
        mut cmd: Command,
        config: &std::path::Path,
        pin_dir: &std::path::Path,
        ifaces: &[&str],
    ) -> Result<AgentProcess, TestnetError> {
        use std::io::BufRead as _;
        /// Logged last when ready: datapath-only, or with the SIP proxy.
        const READY: [&str; 2] = ["no [proxy] section", "SIP listeners up"];
        cmd.args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        // The ready lines are info; keep them whatever filter is set.
        if let Ok(f) = std::env::var("SIP_EDGE_LOG") {
            cmd.env(
                "SIP_EDGE_LOG",
                format!("{f},sip_edge::agent=info,sip_edge::transport=info"),
            );
        }
        let mut child = cmd.spawn().map_err(io_err("spawn agent"))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let log = AgentLog::default();
        if let Some(err) = child.stderr.take() {
            let log = log.clone();
            // Ends at EOF, when the agent exits.
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("{line}");
                    if let Ok(mut l) = log.lock() {
                        if l.len() >= AGENT_LOG_LINES {
                            l.pop_front();
                        }
                        l.push_back(line.clone());
                    }
                    if READY.iter().any(|r| line.contains(r)) {
                        let _ = ready_tx.send(());
                    }
                }
            });
        }
        let mut agent = AgentProcess { child, log };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ready = ready_rx.recv_timeout(Duration::from_millis(50));
            if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) = ready {
                // Its stderr is closed: it is exiting; do not spin.
                std::thread::sleep(Duration::from_millis(50));
            }
            if ready.is_ok() {
                let missing: Vec<&str> = ifaces
                    .iter()
                    .copied()
                    .filter(|i| !sip_edge::datapath::attach::link_pin(pin_dir, i).exists())
                    .collect();
                if !missing.is_empty() {
                    return Err(TestnetError::Cmd {
                        cmd: "sip-edge run".into(),
                        stderr: format!("ready, but no link pinned for {missing:?}"),
                    });
                }
                return Ok(agent);
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Err(TestnetError::Cmd {
                    cmd: "sip-edge run".into(),
                    stderr: format!("agent exited early: {status}"),
                });
            }
            if std::time::Instant::now() > deadline {
                return Err(TestnetError::Cmd {
                    cmd: "sip-edge run".into(),
                    stderr: "agent not ready within 60 s".into(),
                });
            }
        }
    }

    /// The agent's log so far (stderr; its last [`AGENT_LOG_LINES`] lines), in order.
    pub fn log_lines(&self) -> Vec<String> {
        self.log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The agent's process id (for reading its memory in /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `within` for the agent to exit on its own (after a
    /// signal the test sent); its exit status, or `None` if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait (bounded); returns whether it exited cleanly.
    pub fn stop(mut self) -> bool {
        self.terminate()
    }

    /// SIGKILL and reap: a crash, so nothing of the agent's own exit path
    /// runs (pins, links and rules stay as they were).
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) -> bool {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// Removes a datapath's pins (links of `int0`/`ext0` and every map) on
/// drop, also on panic: tests and the demo must leave bpffs as they found it.
pub struct Pins(pub PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let links: Vec<PathBuf> = ["int0", "ext0"]
            .iter()
            .map(|i| sip_edge::datapath::attach::link_pin(&self.0, i))
            .collect();
        let _ = sip_edge::datapath::attach::remove_pins(&self.0, &links);
    }
}

/// An attacker namespace on the outside (`<topology tag>-atk`), behind the
/// peer namespace: `eth0` with `n` addresses 198.51.100.130.. (/25), its
/// default route via the peer (198.51.100.129 on the peer's `atk0`), which
/// forwards; the edge reaches 198.51.100.128/25 via the peer
/// (198.51.100.2), so the attacker's packets enter the edge on `ext0`
/// through the agent's XDP program like any outside traffic. Removed on
/// drop (with its veth; the edge route goes with the topology).
pub struct Attacker {
    /// The namespace.
    pub ns: String,
    /// Its source addresses, one per simulated attacker host.
    pub addrs: Vec<Ipv4Addr>,
}

impl Topology {
    /// Adds the attacker namespace with `n` (1..=100) source addresses.
    pub fn add_attacker_pool(&self, n: usize) -> Result<Attacker, TestnetError> {
        let n = n.clamp(1, 100);
        let ns = self.peer.replace("-peer", "-atk");
        let _ = sh(&["ip", "netns", "del", &ns]);
        sh(&["ip", "netns", "add", &ns])?;
        let atk = Attacker {
            ns: ns.clone(),
            addrs: (0..n)
                .map(|i| Ipv4Addr::new(198, 51, 100, 130 + i as u8))
                .collect(),
        };
        let (p, e, a) = (self.peer.as_str(), self.edge.as_str(), ns.as_str());
        let cmds: Vec<Vec<&str>> = vec![
            vec![
                "ip", "-n", p, "link", "add", "atk0", "type", "veth", "peer", "name", "eth0",
                "netns", a,
            ],
            vec![
                "ip",
                "-n",
                p,
                "addr",
                "add",
                "198.51.100.129/25",
                "dev",
                "atk0",
            ],
            vec!["ip", "-n", p, "link", "set", "atk0", "up"],
            vec!["ip", "-n", a, "link", "set", "lo", "up"],
            vec!["ip", "-n", a, "link", "set", "eth0", "up"],
            vec![
                "ip",
                "netns",
                "exec",
                p,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
            vec![
                "ip",
                "-n",
                e,
                "route",
                "add",
                "198.51.100.128/25",
                "via",
                "198.51.100.2",
                "dev",
                "ext0",
            ],
        ];
        for cmd in &cmds {
            sh(cmd)?;
        }
        for addr in &atk.addrs {
            sh(&[
                "ip",
                "-n",
                a,
                "addr",
                "add",
                &format!("{addr}/25"),
                "dev",
                "eth0",
            ])?;
        }
        sh(&[
            "ip",
            "-n",
            a,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.129",
        ])?;
        // As for the end hosts: complete checksums in software.
        let _ = sh(&[
            "ip", "netns", "exec", a, "ethtool", "-K", "eth0", "tx", "off",
        ]);
        Ok(atk)
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}
