//! The doctor's evaluation, fed with host states (no host is read).

use std::collections::HashMap;

use super::*;

fn r(start: u16, end: u16) -> PortRange {
    PortRange { start, end }
}

#[test]
fn rp_filter_strict_is_warned_with_the_loose_setting() {
    let c = rp_filter("ext0", Some(0), Some(1));
    assert_eq!(c.status, Status::Warn);
    assert!(
        c.fix
            .as_deref()
            .is_some_and(|f| f.contains("net.ipv4.conf.ext0.rp_filter=2")),
        "{c:?}"
    );
    // The kernel uses max(all, dev).
    assert_eq!(rp_filter("ext0", Some(1), Some(0)).status, Status::Warn);
    assert_eq!(rp_filter("ext0", Some(2), Some(1)).status, Status::Pass);
    assert_eq!(rp_filter("ext0", Some(0), Some(0)).status, Status::Pass);
    assert_eq!(rp_filter("ext0", None, Some(0)).status, Status::Warn);
}

#[test]
fn xdp_support_follows_driver_and_mode() {
    let native = XdpMode::Native;
    assert_eq!(
        xdp_support("eth0", native, Some("ice"), None).status,
        Status::Pass
    );
    assert_eq!(
        xdp_support("veth0", native, None, Some("veth")).status,
        Status::Pass
    );
    let c = xdp_support("eth0", native, Some("mlx4_en"), None);
    assert_eq!(c.status, Status::Fail);
    assert!(c.detail.contains("cannot send redirected frames"), "{c:?}");
    assert!(c
        .fix
        .as_deref()
        .is_some_and(|f| f.contains("mode = \"skb\"")));
    assert_eq!(
        xdp_support("eth0.100", native, None, Some("vlan")).status,
        Status::Fail
    );
    assert_eq!(
        xdp_support("eth0", native, Some("e1000e"), None).status,
        Status::Fail
    );
    assert_eq!(
        xdp_support("eth0", native, Some("acme_nic"), None).status,
        Status::Warn
    );
    assert_eq!(
        xdp_support("eth0.100", XdpMode::Skb, None, Some("vlan")).status,
        Status::Pass
    );
    assert!(xdp_support("eth0", XdpMode::Skb, Some("ice"), None)
        .detail
        .contains("faster"));
}

#[test]
fn reserved_ports_must_survive_a_reboot() {
    let ranges = [r(40000, 49999)];
    let p = |v: &str| {
        Some((
            v.to_owned(),
            PathBuf::from("/etc/sysctl.d/90-sip-edge.conf"),
        ))
    };
    assert_eq!(
        reserved_ports(&ranges, Some(""), p("39000-50000")).status,
        Status::Pass
    );
    let c = reserved_ports(&ranges, Some("40000-49999\n"), None);
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("after a reboot"), "{c:?}");
    assert!(
        c.fix
            .as_deref()
            .is_some_and(|f| f.contains("net.ipv4.ip_local_reserved_ports = 40000-49999")),
        "{c:?}"
    );
    // A persisted list that misses the range: the fix keeps what it had.
    let c = reserved_ports(&ranges, Some(""), p("8080"));
    assert_eq!(c.status, Status::Warn);
    assert!(
        c.fix
            .as_deref()
            .is_some_and(|f| f.contains("= 8080,40000-49999")),
        "{c:?}"
    );
}

#[test]
fn forwarding_persistence_reads_the_boot_files() {
    let f = |t: &str| vec![(PathBuf::from("/etc/sysctl.d/90-x.conf"), t.to_owned())];
    assert_eq!(
        forwarding_persisted("int0", "ipv4", &f("net.ipv4.ip_forward=1")).status,
        Status::Pass
    );
    assert_eq!(
        forwarding_persisted("int0", "ipv6", &f("net.ipv4.ip_forward=1")).status,
        Status::Warn
    );
    assert_eq!(
        forwarding_persisted(
            "eth0.100",
            "ipv4",
            &f("net.ipv4.conf.eth0/100.forwarding = 1")
        )
        .status,
        Status::Pass
    );
    let c = forwarding_persisted("int0", "ipv4", &f("net.ipv4.conf.all.forwarding = 0"));
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("= 0 at boot"), "{c:?}");
}

#[test]
fn firewall_dropping_the_signalling_port_fails_with_the_rule_to_add() {
    let save = "*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n";
    let c = firewall_check("tcp", 5061, None, Some(save), None);
    assert_eq!(c.status, Status::Fail);
    assert!(
        c.fix
            .as_deref()
            .is_some_and(|f| f.contains("iptables -I INPUT -p tcp --dport 5061 -j ACCEPT")),
        "{c:?}"
    );
    assert_eq!(
        firewall_check("tcp", 22, None, Some(save), None).status,
        Status::Pass
    );
    assert_eq!(
        firewall_check("tcp", 5061, None, None, None).status,
        Status::Pass
    );
    let nft = r#"{"nftables":[{"chain":{"family":"inet","table":"filter","name":"input","hook":"input","policy":"drop"}}]}"#;
    let c = firewall_check("udp", 5060, Some(nft), None, None);
    assert_eq!(c.status, Status::Fail);
    assert!(c.detail.contains("inet filter input"), "{c:?}");
}

/// A host described by files and command outputs.
struct Fake {
    files: HashMap<String, String>,
    outputs: HashMap<String, String>,
    drivers: HashMap<String, String>,
}

impl Probe for Fake {
    fn read(&self, path: &Path) -> io::Result<String> {
        self.files
            .get(path.to_string_lossy().as_ref())
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn list(&self, dir: &Path) -> Vec<PathBuf> {
        self.files
            .keys()
            .map(PathBuf::from)
            .filter(|p| p.parent() == Some(dir))
            .collect()
    }
    fn driver(&self, iface: &str) -> Option<String> {
        self.drivers.get(iface).cloned()
    }
    fn link_kind(&self, _iface: &str) -> Option<String> {
        None
    }
    fn output(&self, program: &str, _args: &[&str]) -> Option<String> {
        self.outputs.get(program).cloned()
    }
}

#[test]
fn a_whole_host_is_examined_per_interface_and_port() {
    let cfg = Config::from_toml(
        r#"
        [[interface]]
        name = "int0"
        role = "internal"
        [[interface]]
        name = "ext0"
        role = "external"
        [addresses]
        internal = ["10.77.0.1"]
        public = ["203.0.113.1"]
        [media]
        port_ranges = ["40000-40999"]
        [signalling]
        ports = [5061]
        "#,
    )
    .expect("valid");
    let files = [
        ("/sys/class/net/int0/ifindex", "2"),
        ("/sys/class/net/ext0/ifindex", "3"),
        ("/proc/sys/net/ipv4/conf/int0/forwarding", "1"),
        ("/proc/sys/net/ipv4/conf/ext0/forwarding", "0"),
        ("/proc/sys/net/ipv4/conf/all/rp_filter", "0"),
        ("/proc/sys/net/ipv4/conf/int0/rp_filter", "2"),
        ("/proc/sys/net/ipv4/conf/ext0/rp_filter", "1"),
        ("/proc/sys/net/ipv4/ip_local_reserved_ports", "40000-40999"),
        ("/proc/sys/net/core/bpf_jit_enable", "1"),
        (
            "/etc/sysctl.d/90-sip-edge.conf",
            "net.ipv4.ip_forward = 1\n",
        ),
    ];
    let fake = Fake {
        files: files
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        outputs: [(
            "iptables-save".to_owned(),
            "*filter\n:INPUT DROP [0:0]\nCOMMIT\n".to_owned(),
        )]
        .into_iter()
        .collect(),
        drivers: [
            ("int0".to_owned(), "ice".to_owned()),
            ("ext0".to_owned(), "mlx4_en".to_owned()),
        ]
        .into_iter()
        .collect(),
    };
    let checks = run(&cfg, &fake);
    let status = |check: &str, subject: &str| {
        checks
            .iter()
            .find(|c| c.check == check && c.subject == subject)
            .map(|c| c.status)
    };
    assert_eq!(status("forwarding", "int0/ipv4"), Some(Status::Pass));
    assert_eq!(status("forwarding", "ext0/ipv4"), Some(Status::Fail));
    assert_eq!(status("persisted", "ext0/ipv4"), Some(Status::Pass));
    assert_eq!(status("rp_filter", "ext0"), Some(Status::Warn));
    assert_eq!(status("rp_filter", "int0"), Some(Status::Pass));
    assert_eq!(status("xdp", "int0"), Some(Status::Pass));
    assert_eq!(status("xdp", "ext0"), Some(Status::Fail));
    assert_eq!(status("reserved_ports", "40000-40999"), Some(Status::Warn));
    assert_eq!(status("firewall", "tcp/5061"), Some(Status::Fail));
    assert_eq!(status("bpf_jit", "kernel"), Some(Status::Pass));
    let text = render(&checks);
    assert!(
        text.contains("FAIL  forwarding")
            && text.contains("fix: sysctl -w net.ipv4.conf.ext0.forwarding=1"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&render_json(&checks)).expect("json");
    assert_eq!(json["fail"], 3, "{json}");
    assert_eq!(json["checks"][0]["status"], "PASS");
}
