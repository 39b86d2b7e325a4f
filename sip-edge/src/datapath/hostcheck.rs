//! Host settings the XDP datapath needs and cannot set for itself, checked
//! from `/proc/sys` (through a reader, so tests feed it text) at agent
//! start, and the watch on the `drop_fib_failed` counter that repeats the
//! hint while media is being lost. Findings go to the agent's log.
//!
//! Why: a pinhole hit is forwarded by `bpf_fib_lookup` + a devmap redirect.
//! The kernel's FIB helper refuses (`BPF_FIB_LKUP_RET_FWD_DISABLED`) when
//! forwarding is off on the *ingress* device, per family
//! (`net/core/filter.c`: `IN_DEV_FORWARD(in_dev)` for IPv4,
//! `idev->cnf.forwarding` for IPv6), and an IPv6 lookup needs IPv6 enabled
//! on the device at all. With either missing, calls set up and pinholes
//! install, but every media packet is dropped as `drop_fib_failed`.
//!
//! Decision: warn, do not refuse. Signalling works regardless, a host often
//! applies its sysctls after services start (the watch then shows the loss
//! stop), and turning forwarding on makes the kernel route other traffic
//! too, which is the admin's decision (README: host settings), not the
//! agent's. The agent never writes these sysctls.

use std::{fmt, io, path::Path};

/// Address family of a finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    fn proc_dir(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

/// What is wrong on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// `net.<family>.conf.<iface>.forwarding` is 0.
    ForwardingOff,
    /// IPv6 is disabled on the interface (or absent from the kernel).
    Ipv6Disabled,
    /// The setting could not be read.
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        error: String,
    },
}

/// One setting the datapath needs that the host does not have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The attached interface.
    pub iface: String,
    /// The family the setting belongs to.
    pub family: Family,
    /// What is wrong.
    pub problem: Problem,
}

/// The sysctl key form of an interface name: a `.` in the name (VLANs,
/// `eth0.100`) is written `/` because `.` separates the key's parts.
fn sysctl_iface(iface: &str) -> String {
    iface.replace('.', "/")
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fam = self.family.proc_dir();
        let key_if = sysctl_iface(&self.iface);
        match &self.problem {
            Problem::ForwardingOff => write!(
                f,
                "{fam} forwarding is off on {iface}: bpf_fib_lookup refuses every media packet arriving there (drop_fib_failed); fix: sysctl -w net.{fam}.conf.{key_if}.forwarding=1 (and persist it in /etc/sysctl.d/)",
                iface = self.iface
            ),
            Problem::Ipv6Disabled => write!(
                f,
                "IPv6 is disabled on {iface} but the edge has IPv6 addresses: IPv6 media cannot be forwarded there; fix: sysctl -w net.ipv6.conf.{key_if}.disable_ipv6=0 and net.ipv6.conf.{key_if}.forwarding=1",
                iface = self.iface
            ),
            Problem::Unreadable { path, error } => write!(
                f,
                "cannot read {path} ({error}); check by hand that {fam} forwarding is on for {iface}",
                iface = self.iface
            ),
        }
    }
}

/// Checks the settings the datapath needs on every attached interface in
/// `ifaces`, for the families the edge has addresses of. `read` returns a
/// `/proc/sys` file's text (`std::fs::read_to_string` in the agent).
pub fn check(
    ifaces: &[&str],
    v4: bool,
    v6: bool,
    read: impl Fn(&Path) -> io::Result<String>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let families = [(v4, Family::V4), (v6, Family::V6)];
    for iface in ifaces {
        for family in families.iter().filter(|(on, _)| *on).map(|(_, f)| *f) {
            let dir = format!("/proc/sys/net/{}/conf/{iface}", family.proc_dir());
            let finding = |problem| Finding {
                iface: (*iface).to_owned(),
                family,
                problem,
            };
            if family == Family::V6 {
                // No conf directory: IPv6 is off for the device (or the
                // kernel) altogether.
                match read(Path::new(&format!("{dir}/disable_ipv6"))) {
                    Ok(v) if v.trim() != "0" => {
                        out.push(finding(Problem::Ipv6Disabled));
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        out.push(finding(Problem::Ipv6Disabled));
                        continue;
                    }
                    _ => {}
                }
            }
            let path = format!("{dir}/forwarding");
            match read(Path::new(&path)) {
                Ok(v) if v.trim() == "0" => out.push(finding(Problem::ForwardingOff)),
                Ok(_) => {}
                Err(e) => out.push(finding(Problem::Unreadable {
                    path,
                    error: e.to_string(),
                })),
            }
        }
    }
    out
}

/// Watches the `drop_fib_failed` counter: says how many packets were lost
/// since the previous reading, once per rise, so the agent logs the hint
/// while media is being lost and stays quiet otherwise.
#[derive(Debug, Default)]
pub struct FibFailWatch {
    last: Option<u64>,
}

impl FibFailWatch {
    /// Feeds the counter's current total; `Some(new drops)` when it rose.
    /// The first reading only sets the baseline (the maps may be adopted
    /// from an earlier run with old counts).
    pub fn observe(&mut self, total: u64) -> Option<u64> {
        let prev = self.last.replace(total)?;
        // A smaller total (maps recreated) restarts the baseline.
        total.checked_sub(prev).filter(|d| *d > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/proc/sys` with the given files.
    fn procfs<'a>(files: &'a [(&'a str, &'a str)]) -> impl Fn(&Path) -> io::Result<String> + 'a {
        move |p: &Path| {
            files
                .iter()
                .find(|(name, _)| Path::new(name) == p)
                .map(|(_, v)| (*v).to_owned())
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }

    /// Issue #14 item 3: forwarding off on an attached interface is found,
    /// per interface and family, with the sysctl that fixes it.
    #[test]
    fn forwarding_off_on_an_attached_interface_is_reported_with_the_fix() {
        let sys = procfs(&[
            ("/proc/sys/net/ipv4/conf/int0/forwarding", "1\n"),
            ("/proc/sys/net/ipv4/conf/ext0/forwarding", "0\n"),
            ("/proc/sys/net/ipv6/conf/int0/forwarding", "0\n"),
            ("/proc/sys/net/ipv6/conf/int0/disable_ipv6", "0\n"),
            ("/proc/sys/net/ipv6/conf/ext0/forwarding", "1\n"),
            ("/proc/sys/net/ipv6/conf/ext0/disable_ipv6", "0\n"),
        ]);
        let f = check(&["int0", "ext0"], true, false, &sys);
        assert_eq!(
            f,
            vec![Finding {
                iface: "ext0".into(),
                family: Family::V4,
                problem: Problem::ForwardingOff
            }]
        );
        assert!(
            f[0].to_string()
                .contains("sysctl -w net.ipv4.conf.ext0.forwarding=1"),
            "{}",
            f[0]
        );
        let f = check(&["int0", "ext0"], true, true, &sys);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!((f[0].iface.as_str(), f[0].family), ("int0", Family::V6));
        // All good: nothing to say.
        let ok = procfs(&[
            ("/proc/sys/net/ipv4/conf/int0/forwarding", "1\n"),
            ("/proc/sys/net/ipv6/conf/int0/forwarding", "1\n"),
            ("/proc/sys/net/ipv6/conf/int0/disable_ipv6", "0\n"),
        ]);
        assert!(check(&["int0"], true, true, &ok).is_empty());
    }

    #[test]
    fn ipv6_disabled_unreadable_and_vlan_names() {
        let sys = procfs(&[
            ("/proc/sys/net/ipv6/conf/eth0.100/disable_ipv6", "1\n"),
            ("/proc/sys/net/ipv4/conf/eth0.100/forwarding", "0\n"),
        ]);
        let f = check(&["eth0.100"], true, true, &sys);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(
            f[0].to_string()
                .contains("net.ipv4.conf.eth0/100.forwarding=1"),
            "a dot in the name is a slash in the key: {}",
            f[0]
        );
        assert_eq!(f[1].problem, Problem::Ipv6Disabled);
        // IPv6 not needed: not checked.
        assert_eq!(check(&["eth0.100"], true, false, &sys).len(), 1);
        // A missing IPv4 file is unreadable, said so.
        let f = check(&["gone0"], true, false, &sys);
        assert!(matches!(f[0].problem, Problem::Unreadable { .. }), "{f:?}");
    }

    #[test]
    fn the_fib_fail_watch_reports_each_rise_once() {
        let mut w = FibFailWatch::default();
        assert_eq!(w.observe(500), None, "baseline (adopted maps)");
        assert_eq!(w.observe(500), None);
        assert_eq!(w.observe(530), Some(30));
        assert_eq!(w.observe(530), None);
        assert_eq!(w.observe(10), None, "counters recreated: new baseline");
        assert_eq!(w.observe(12), Some(2));
    }
}
