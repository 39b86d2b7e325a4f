//! `sip-edge doctor` (and `check-config --host`): checks the host the edge
//! runs on for what the datapath and the proxy need but cannot set for
//! themselves, and says what to change. Read-only: it never writes a
//! sysctl, a firewall rule or a link setting.
//!
//! Checks, each PASS / WARN / FAIL with the fix:
//! - IP forwarding on every XDP interface, per family in use (reuses
//!   `datapath::hostcheck`, the agent's start-up check), and whether a
//!   sysctl.d file keeps it on after a reboot;
//! - `rp_filter` on the XDP interfaces;
//! - native XDP and redirect support of each interface's driver for the
//!   configured `[xdp] mode` (`xdp` table);
//! - the media ranges in `net.ipv4.ip_local_reserved_ports`, now and after
//!   a reboot (`sysctl`);
//! - nftables / iptables input chains letting the signalling ports in
//!   (`firewall`);
//! - the BPF JIT.
//!
//! Data in: a [`Probe`] of the host (`/proc/sys`, `/sys/class/net`,
//! sysctl.d files, `ip -j -d link`, `nft -j list ruleset`,
//! `iptables-save`), so the evaluation is tested with fed inputs. Data
//! out: [`Check`]s, printed as text or JSON.

pub mod firewall;
pub mod sysctl;
pub mod xdp;

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use serde::Serialize;

use crate::{
    config::{check::rules, Config, PortRange, XdpMode},
    datapath::hostcheck,
    ports,
};

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Fine.
    Pass,
    /// Works now, or probably works, but something will bite.
    Warn,
    /// Media or signalling will be lost until it is changed.
    Fail,
}

/// One finding about the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Which check (`interface`, `forwarding`, `persisted`, `rp_filter`,
    /// `xdp`, `reserved_ports`, `firewall`, `bpf_jit`).
    pub check: &'static str,
    /// What it is about: an interface, `int0/ipv4`, `tcp/5061`.
    pub subject: String,
    /// The outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to change, when something should change.
    pub fix: Option<String>,
}

fn check(
    check: &'static str,
    subject: impl Into<String>,
    status: Status,
    detail: impl Into<String>,
    fix: Option<String>,
) -> Check {
    Check {
        check,
        subject: subject.into(),
        status,
        detail: detail.into(),
        fix,
    }
}

/// What the doctor reads from the host.
pub trait Probe {
    /// A file's text (`/proc/sys/...`, sysctl.d files).
    fn read(&self, path: &Path) -> io::Result<String>;
    /// The entries of a directory (empty when it does not exist).
    fn list(&self, dir: &Path) -> Vec<PathBuf>;
    /// The driver bound to an interface (`/sys/class/net/IF/device/driver`).
    fn driver(&self, iface: &str) -> Option<String>;
    /// The link kind of a virtual interface (`veth`, `vlan`, ...).
    fn link_kind(&self, iface: &str) -> Option<String>;
    /// A program's standard output, when it exists and succeeds.
    fn output(&self, program: &str, args: &[&str]) -> Option<String>;
}

/// The machine this runs on.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealProbe;

impl Probe for RealProbe {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn list(&self, dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }

    fn driver(&self, iface: &str) -> Option<String> {
        let link = std::fs::read_link(format!("/sys/class/net/{iface}/device/driver")).ok()?;
        link.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    fn link_kind(&self, iface: &str) -> Option<String> {
        let out = self.output("ip", &["-j", "-d", "link", "show", "dev", iface])?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v.get(0)?
            .get("linkinfo")?
            .get("info_kind")?
            .as_str()
            .map(str::to_owned)
    }

    fn output(&self, program: &str, args: &[&str]) -> Option<String> {
        let out = Command::new(program).args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Every check for the edge `cfg` describes.
pub fn run(cfg: &Config, probe: &dyn Probe) -> Vec<Check> {
    let mut out = Vec::new();
    // Per-interface checks only for interfaces that exist; a missing one
    // is one failure, not five.
    let mut ifaces: Vec<&str> = Vec::new();
    for i in &cfg.interfaces {
        let sys = format!("/sys/class/net/{}/ifindex", i.name);
        if probe.read(Path::new(&sys)).is_ok() {
            ifaces.push(i.name.as_str());
        } else {
            out.push(check(
                "interface",
                i.name.as_str(),
                Status::Fail,
                format!("{} does not exist on this host", i.name),
                Some("create it, or fix [[interface]] name (`ip link` lists them)".to_owned()),
            ));
        }
    }
    let addrs = || cfg.addresses.internal.iter().chain(&cfg.addresses.public);
    let v4 = addrs().any(IpAddr::is_ipv4);
    let v6 = addrs().any(IpAddr::is_ipv6);
    out.extend(forwarding(&ifaces, v4, v6, probe));
    let files = sysctl_files(probe);
    for iface in &ifaces {
        for (on, fam) in [(v4, "ipv4"), (v6, "ipv6")] {
            if on {
                out.push(forwarding_persisted(iface, fam, &files));
            }
        }
    }
    for iface in &ifaces {
        let read = |p: String| {
            probe
                .read(Path::new(&p))
                .ok()
                .and_then(|t| t.trim().parse::<u8>().ok())
        };
        out.push(rp_filter(
            iface,
            read("/proc/sys/net/ipv4/conf/all/rp_filter".to_owned()),
            read(format!(
                "/proc/sys/net/ipv4/conf/{}/rp_filter",
                iface.replace('.', "/")
            )),
        ));
    }
    for iface in &ifaces {
        let driver = probe.driver(iface);
        let kind = probe.link_kind(iface);
        out.push(xdp_support(
            iface,
            cfg.xdp.mode,
            driver.as_deref(),
            kind.as_deref(),
        ));
    }
    out.push(reserved_ports(
        &cfg.media_ranges(),
        probe.read(Path::new(ports::RESERVED_PORTS)).ok().as_deref(),
        sysctl::persisted(&files, "net.ipv4.ip_local_reserved_ports"),
    ));
    let nft = probe.output("nft", &["-j", "list", "ruleset"]);
    let ipt = probe.output("iptables-save", &[]);
    let ip6t = probe.output("ip6tables-save", &[]);
    for (proto, port) in signalling_ports(cfg) {
        out.push(firewall_check(
            proto,
            port,
            nft.as_deref(),
            ipt.as_deref(),
            ip6t.as_deref(),
        ));
    }
    out.push(bpf_jit(
        probe
            .read(Path::new("/proc/sys/net/core/bpf_jit_enable"))
            .ok()
            .as_deref(),
    ));
    out
}

/// Transport and port of every listener (or `[signalling] ports` as TCP
/// without a proxy section), deduplicated.
pub fn signalling_ports(cfg: &Config) -> Vec<(&'static str, u16)> {
    let mut v: Vec<(&'static str, u16)> = match &cfg.proxy {
        Some(p) => rules::listeners(p)
            .iter()
            .map(|l| (if l.udp { "udp" } else { "tcp" }, l.addr.port()))
            .collect(),
        None => cfg.signalling.ports.iter().map(|p| ("tcp", *p)).collect(),
    };
    v.retain(|(_, p)| *p != 0);
    v.sort_unstable();
    v.dedup();
    v
}

fn sysctl_files(probe: &dyn Probe) -> Vec<(PathBuf, String)> {
    let listings: Vec<(&str, Vec<PathBuf>)> = sysctl::DIRS
        .iter()
        .map(|d| (*d, probe.list(Path::new(d))))
        .collect();
    sysctl::boot_order(&listings)
        .into_iter()
        .filter_map(|p| probe.read(&p).ok().map(|t| (p, t)))
        .collect()
}

/// Forwarding now, per interface and family (the agent's own check).
pub fn forwarding(ifaces: &[&str], v4: bool, v6: bool, probe: &dyn Probe) -> Vec<Check> {
    let findings = hostcheck::check(ifaces, v4, v6, |p| probe.read(p));
    let mut out = Vec::new();
    for iface in ifaces {
        for (on, fam, family) in [
            (v4, "ipv4", hostcheck::Family::V4),
            (v6, "ipv6", hostcheck::Family::V6),
        ] {
            if !on {
                continue;
            }
            let subject = format!("{iface}/{fam}");
            match findings
                .iter()
                .find(|f| f.iface == *iface && f.family == family)
            {
                Some(f) => out.push(check(
                    "forwarding",
                    subject,
                    Status::Fail,
                    f.to_string(),
                    Some(format!(
                        "sysctl -w net.{fam}.conf.{}.forwarding=1",
                        iface.replace('.', "/")
                    )),
                )),
                None => out.push(check(
                    "forwarding",
                    subject,
                    Status::Pass,
                    format!("{fam} forwarding is on: bpf_fib_lookup can forward media arriving on {iface}"),
                    None,
                )),
            }
        }
    }
    out
}

/// Whether a sysctl.d file keeps forwarding on after a reboot.
pub fn forwarding_persisted(iface: &str, fam: &str, files: &[(PathBuf, String)]) -> Check {
    let key_if = iface.replace('.', "/");
    let mut keys = vec![
        format!("net.{fam}.conf.{key_if}.forwarding"),
        format!("net.{fam}.conf.all.forwarding"),
    ];
    if fam == "ipv4" {
        keys.push("net.ipv4.ip_forward".to_owned());
    }
    let set = keys
        .iter()
        .find_map(|k| sysctl::persisted(files, k).map(|(v, p)| (k.clone(), v, p)));
    let subject = format!("{iface}/{fam}");
    match set {
        Some((k, v, p)) if v == "1" => check(
            "persisted",
            subject,
            Status::Pass,
            format!("{} sets {k} = 1 at boot", p.display()),
            None,
        ),
        other => check(
            "persisted",
            subject,
            Status::Warn,
            match other {
                Some((k, v, p)) => format!("{} sets {k} = {v} at boot: after a reboot {fam} media arriving on {iface} is dropped (drop_fib_failed)", p.display()),
                None => format!("no sysctl.d file turns {fam} forwarding on: after a reboot media arriving on {iface} is dropped (drop_fib_failed)"),
            },
            Some(format!(
                "add `net.{fam}.conf.all.forwarding = 1` to /etc/sysctl.d/90-sip-edge.conf"
            )),
        ),
    }
}

/// `rp_filter` on an interface: the kernel uses the larger of `all` and
/// the interface's value.
pub fn rp_filter(iface: &str, all: Option<u8>, dev: Option<u8>) -> Check {
    let (Some(a), Some(d)) = (all, dev) else {
        return check(
            "rp_filter",
            iface,
            Status::Warn,
            format!("cannot read net.ipv4.conf.{{all,{iface}}}.rp_filter"),
            None,
        );
    };
    match a.max(d) {
        1 => check(
            "rp_filter",
            iface,
            Status::Warn,
            format!("strict reverse-path filtering (rp_filter = 1, all = {a}, {iface} = {d}): the kernel drops signalling and other packets arriving on {iface} whose source it would route out of another interface (several uplinks, asymmetric routes, nat-mode clients with another gateway); media forwarded in XDP is not affected"),
            Some(format!(
                "if the edge routes asymmetrically: sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{}.rp_filter=2 (loose), and persist it in /etc/sysctl.d/",
                iface.replace('.', "/")
            )),
        ),
        v => check(
            "rp_filter",
            iface,
            Status::Pass,
            format!("rp_filter = {v} ({})", if v == 0 { "off" } else { "loose" }),
            None,
        ),
    }
}

/// Native XDP and redirect support of an interface's driver.
pub fn xdp_support(iface: &str, mode: XdpMode, driver: Option<&str>, kind: Option<&str>) -> Check {
    let what = match (driver, kind) {
        (Some(d), _) => format!("driver {d}"),
        (None, Some(k)) => format!("{k} device"),
        (None, None) => "unknown device type".to_owned(),
    };
    let support = xdp::support(driver, kind);
    let skb = "set [xdp] mode = \"skb\" (generic mode: works on every device, slower)";
    match (mode, support) {
        (XdpMode::Skb, xdp::Support::Full) => check(
            "xdp",
            iface,
            Status::Pass,
            format!("{what}; generic (skb) mode works; the driver supports native XDP and redirect, so [xdp] mode = \"native\" would be faster"),
            None,
        ),
        (XdpMode::Skb, _) => check(
            "xdp",
            iface,
            Status::Pass,
            format!("{what}; generic (skb) mode works on every device"),
            None,
        ),
        (XdpMode::Native, xdp::Support::Full) => check(
            "xdp",
            iface,
            Status::Pass,
            format!("{what}: native XDP and redirect into it supported"),
            None,
        ),
        (XdpMode::Native, xdp::Support::RxOnly) => check(
            "xdp",
            iface,
            Status::Fail,
            format!("{what} runs native XDP but cannot send redirected frames (no ndo_xdp_xmit): media leaving by {iface} is dropped"),
            Some(skb.to_owned()),
        ),
        (XdpMode::Native, xdp::Support::GenericOnly) => check(
            "xdp",
            iface,
            Status::Fail,
            format!("{what} has no native XDP: attaching in native mode fails"),
            Some(skb.to_owned()),
        ),
        (XdpMode::Native, xdp::Support::Unknown) => check(
            "xdp",
            iface,
            Status::Warn,
            format!("{what} is not in the doctor's table of native XDP drivers; the attach says whether native mode works"),
            Some(format!("if `sip-edge run` cannot attach: {skb}")),
        ),
    }
}

fn range_list(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(|r| {
            if r.start == r.end {
                r.start.to_string()
            } else {
                format!("{}-{}", r.start, r.end)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The media ranges in `ip_local_reserved_ports` now and after a reboot.
pub fn reserved_ports(
    ranges: &[PortRange],
    runtime: Option<&str>,
    persisted: Option<(String, PathBuf)>,
) -> Check {
    let want = range_list(ranges);
    let covers = |text: &str| ports::merged(&ports::parse_list(text), ranges).is_none();
    let line = |have: Option<&str>| {
        let merged = have
            .and_then(|h| ports::merged(&ports::parse_list(h), ranges))
            .unwrap_or_else(|| want.clone());
        format!(
            "add `net.ipv4.ip_local_reserved_ports = {merged}` to /etc/sysctl.d/90-sip-edge.conf"
        )
    };
    match (&persisted, runtime) {
        (Some((v, p)), _) if covers(v) => check(
            "reserved_ports",
            want,
            Status::Pass,
            format!("{} reserves the media ranges at boot", p.display()),
            None,
        ),
        (p, Some(now)) if covers(now) => check(
            "reserved_ports",
            want.clone(),
            Status::Warn,
            "reserved now (the agent adds them at start), but no sysctl.d file does: after a reboot, programs started before the agent can get a media port as their source port, and XDP drops their replies".to_owned(),
            Some(line(p.as_ref().map(|(v, _)| v.as_str()))),
        ),
        (p, _) => check(
            "reserved_ports",
            want.clone(),
            Status::Warn,
            "the media ranges are not reserved (the agent reserves them at start): until then any program can get a media port as its source port, and XDP drops its replies".to_owned(),
            Some(line(p.as_ref().map(|(v, _)| v.as_str()))),
        ),
    }
}

/// Whether the input firewall lets new connections to a signalling port in.
pub fn firewall_check(
    proto: &'static str,
    port: u16,
    nft: Option<&str>,
    iptables: Option<&str>,
    ip6tables: Option<&str>,
) -> Check {
    let subject = format!("{proto}/{port}");
    let mut verdicts = Vec::new();
    if let Some(v) = nft.and_then(|j| firewall::nft(j, proto, port)) {
        verdicts.push(("nftables", v));
    }
    for (tool, text) in [("iptables", iptables), ("ip6tables", ip6tables)] {
        if let Some(v) = text.and_then(|t| firewall::iptables(t, proto, port)) {
            verdicts.push((tool, v));
        }
    }
    if verdicts.is_empty() {
        return check(
            "firewall",
            subject,
            Status::Pass,
            "no nftables ruleset or iptables filter table found: nothing filters input",
            None,
        );
    }
    for (tool, v) in &verdicts {
        if let firewall::Verdict::Dropped(at) = v {
            let fix = if *tool == "nftables" {
                format!("accept it before the drop, e.g. `nft insert rule <family> <table> <chain> {proto} dport {port} accept` in the chain named here, and persist it in /etc/nftables.conf")
            } else {
                format!("`{tool} -I INPUT -p {proto} --dport {port} -j ACCEPT`, and persist it")
            };
            return check(
                "firewall",
                subject,
                Status::Fail,
                format!("new {proto} connections to port {port} are dropped by {at} ({tool}): XDP passes them, the host firewall refuses them"),
                Some(fix),
            );
        }
    }
    let why: Vec<String> = verdicts
        .iter()
        .map(|(tool, v)| match v {
            firewall::Verdict::Accepted(w) | firewall::Verdict::Dropped(w) => {
                format!("{tool}: {w}")
            }
        })
        .collect();
    check("firewall", subject, Status::Pass, why.join("; "), None)
}

/// The BPF JIT (`net.core.bpf_jit_enable`).
pub fn bpf_jit(value: Option<&str>) -> Check {
    match value.map(str::trim) {
        Some("1") | Some("2") => check("bpf_jit", "kernel", Status::Pass, "BPF JIT is on", None),
        // Kernels built with CONFIG_BPF_JIT_ALWAYS_ON have no switch to read.
        None => check(
            "bpf_jit",
            "kernel",
            Status::Pass,
            "no bpf_jit_enable switch (JIT always on)",
            None,
        ),
        Some(v) => check(
            "bpf_jit",
            "kernel",
            Status::Warn,
            format!("bpf_jit_enable = {v}: the XDP program runs interpreted, many times slower"),
            Some("sysctl -w net.core.bpf_jit_enable=1".to_owned()),
        ),
    }
}

/// Text output: one line per check, its fix below, and a summary line.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let st = match c.status {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        s.push_str(&format!(
            "{st}  {:<15} {:<14} {}\n",
            c.check, c.subject, c.detail
        ));
        if let Some(f) = &c.fix {
            s.push_str(&format!("      fix: {f}\n"));
        }
    }
    let n = |st| checks.iter().filter(|c| c.status == st).count();
    s.push_str(&format!(
        "{} pass, {} warn, {} fail\n",
        n(Status::Pass),
        n(Status::Warn),
        n(Status::Fail)
    ));
    s
}

/// JSON output: `{checks: [...], pass, warn, fail}`.
pub fn render_json(checks: &[Check]) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        checks: &'a [Check],
        pass: usize,
        warn: usize,
        fail: usize,
    }
    let n = |st| checks.iter().filter(|c| c.status == st).count();
    let out = Out {
        checks,
        pass: n(Status::Pass),
        warn: n(Status::Warn),
        fail: n(Status::Fail),
    };
    // Serialising plain structs cannot fail; fall back to an error object.
    let mut s =
        serde_json::to_string_pretty(&out).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests;
