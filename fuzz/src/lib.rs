//! What the structured fuzz targets share: the agent configuration they
//! run under, the address pool the fuzzer picks SDP addresses from (the
//! signalling sources, public strangers and every kind of forbidden
//! target), and an SDP builder, so inputs reach the offer/answer logic
//! instead of dying in the parser.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::OnceLock,
};

use arbitrary::Arbitrary;
use sip_edge::config::Config;

/// Edge addresses of the fuzz configuration.
pub const EDGE_INT: &str = "10.77.0.1";
/// Public edge address.
pub const EDGE_PUB: &str = "203.0.113.1";
/// Inside signalling sources (clients).
pub const INSIDE: [&str; 2] = ["10.77.0.2:5061", "10.77.0.3:5061"];
/// Outside signalling sources (far parties).
pub const OUTSIDE: [&str; 2] = ["198.51.100.2:5061", "198.51.100.3:5061"];

/// Addresses an SDP may name: the sources themselves, a public stranger
/// and the targets DESIGN.md §3 forbids on one side or both.
pub const POOL: [&str; 20] = [
    "10.77.0.2",
    "10.77.0.3",
    "198.51.100.2",
    "198.51.100.3",
    "198.51.100.99",
    "10.77.0.99",
    "192.168.1.10",
    "172.16.0.5",
    "100.64.0.1",
    "127.0.0.1",
    "0.0.0.0",
    "255.255.255.255",
    "224.0.0.5",
    "169.254.1.1",
    "10.77.0.1",
    "203.0.113.1",
    "2001:db8::2",
    "fe80::1",
    "::1",
    "::ffff:10.77.0.99",
];

/// The agent configuration for `mode` ("relay" or "nat"), written once to
/// a temporary file because `Config` is read the way the agent reads it.
/// Short media timers so a run can expire everything it opened.
pub fn config(mode: &str) -> &'static Config {
    static RELAY: OnceLock<Config> = OnceLock::new();
    static NAT: OnceLock<Config> = OnceLock::new();
    let cell = if mode == "nat" { &NAT } else { &RELAY };
    cell.get_or_init(|| {
        let text = format!(
            r#"pin_dir = "/sys/fs/bpf/sip-edge-fuzz"
[[interface]]
name = "int0"
role = "internal"
[[interface]]
name = "ext0"
role = "external"
[addresses]
internal = ["{EDGE_INT}"]
public = ["{EDGE_PUB}"]
[media]
port_ranges = ["40000-40063"]
mode = "{mode}"
idle_timeout_secs = 10
unused_timeout_secs = 10
max_call_secs = 60
[signalling]
ports = [5061]
[proxy]
internal_listen = "{EDGE_INT}:5061"
external_listen = "{EDGE_PUB}:5061"
cert = "/nonexistent/edge.pem"
key = "/nonexistent/edge.key"
ca_roots = "/nonexistent/ca.pem"
[[route]]
domain = "peer.example.net"
host = "198.51.100.2"
port = 5061
tls_name = "peer.example.net"
"#
        );
        let path: PathBuf = std::env::temp_dir().join(format!(
            "sip-edge-fuzz-{mode}-{}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).expect("write the fuzz config");
        let cfg = Config::from_file(&path).expect("the fuzz config is valid");
        let _ = std::fs::remove_file(&path);
        cfg
    })
}

/// A pool address.
pub fn pool(i: u8) -> IpAddr {
    POOL[i as usize % POOL.len()].parse().expect("pool literal")
}

/// A signalling source on `outside` or the inside.
pub fn source(outside: bool, i: u8) -> SocketAddr {
    let list = if outside { OUTSIDE } else { INSIDE };
    list[i as usize % list.len()].parse().expect("source literal")
}

/// One m-line of a generated SDP.
#[derive(Arbitrary, Debug, Clone)]
pub struct MLine {
    /// 0 audio, 1 video, 2 MSRP over TCP, 3 application/TCP.
    pub kind: u8,
    /// Port (0 disables the stream).
    pub port: u16,
    /// Media-level `c=` (pool index), overriding the session one.
    pub addr: Option<u8>,
    /// `a=rtcp:` port and optional address.
    pub rtcp: Option<(u16, Option<u8>)>,
    /// `a=candidate` lines: (pool address, port, type 0 host 1 srflx 2 relay).
    pub candidates: Vec<(u8, u16, u8)>,
    /// `a=rtcp-mux`.
    pub mux: bool,
    /// 0 sendrecv, 1 sendonly, 2 recvonly, 3 inactive.
    pub dir: u8,
}

/// A generated SDP body.
#[derive(Arbitrary, Debug, Clone)]
pub struct SdpSpec {
    /// Session `c=` (pool index).
    pub addr: u8,
    /// `o=` version.
    pub version: u8,
    /// The m-lines (at most 8 are written).
    pub lines: Vec<MLine>,
}

/// The SDP text of `spec`.
pub fn sdp(spec: &SdpSpec) -> String {
    let fam = |ip: IpAddr| if ip.is_ipv6() { "IP6" } else { "IP4" };
    let c = pool(spec.addr);
    let mut s = format!(
        "v=0\r\no=- 1 {} IN {} {c}\r\ns=-\r\nc=IN {} {c}\r\nt=0 0\r\n",
        spec.version,
        fam(c),
        fam(c)
    );
    for m in spec.lines.iter().take(8) {
        match m.kind % 4 {
            0 => s.push_str(&format!("m=audio {} RTP/AVP 0 8\r\n", m.port)),
            1 => s.push_str(&format!("m=video {} RTP/AVP 96\r\n", m.port)),
            2 => s.push_str(&format!("m=message {} TCP/MSRP *\r\n", m.port)),
            _ => s.push_str(&format!("m=application {} TCP *\r\n", m.port)),
        }
        if let Some(a) = m.addr {
            let ip = pool(a);
            s.push_str(&format!("c=IN {} {ip}\r\n", fam(ip)));
        }
        if m.kind % 4 == 2 {
            let ip = pool(m.addr.unwrap_or(spec.addr));
            let host = if ip.is_ipv6() { format!("[{ip}]") } else { ip.to_string() };
            s.push_str(&format!(
                "a=path:msrp://{host}:{}/s{};tcp\r\n",
                m.port, spec.version
            ));
        }
        if let Some((port, addr)) = m.rtcp {
            match addr {
                Some(a) => {
                    let ip = pool(a);
                    s.push_str(&format!("a=rtcp:{port} IN {} {ip}\r\n", fam(ip)));
                }
                None => s.push_str(&format!("a=rtcp:{port}\r\n")),
            }
        }
        for (i, (a, port, typ)) in m.candidates.iter().take(4).enumerate() {
            let typ = ["host", "srflx", "relay"][*typ as usize % 3];
            let extra = if typ == "host" { String::new() } else { " raddr 0.0.0.0 rport 0".into() };
            s.push_str(&format!(
                "a=candidate:{i} 1 UDP {} {} {port} typ {typ}{extra}\r\n",
                2_130_706_431u32 - i as u32,
                pool(*a)
            ));
        }
        if m.mux {
            s.push_str("a=rtcp-mux\r\n");
        }
        s.push_str(["a=sendrecv\r\n", "a=sendonly\r\n", "a=recvonly\r\n", "a=inactive\r\n"][m.dir as usize % 4]);
    }
    s
}
