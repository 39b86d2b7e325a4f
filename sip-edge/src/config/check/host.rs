//! Checks of the machine the config is checked on, which `run` would
//! otherwise only meet after XDP is attached: the `[[interface]]`s exist,
//! `pin_dir` is on bpffs, every address the agent binds (listeners, source
//! addresses) is configured here and no next hop is a local address;
//! `[addresses]` entries that are not local are warned (floating addresses).
//!
//! Data in: the host through the [`Host`] trait ([`RealHost`]:
//! `if_nameindex`, `getifaddrs`, `statfs`, `/proc/sys`), so tests feed a
//! fake one. Nothing here changes the host.

use std::{ffi::CStr, io, net::IpAddr, path::Path};

use super::{rules, Finding, Problem};
use crate::{config::Config, sip::uri::Host as UriHost};

/// What the checks need to know about the host.
pub trait Host {
    /// Names of the interfaces in this network namespace.
    fn interfaces(&self) -> io::Result<Vec<String>>;
    /// Addresses configured on any interface.
    fn addresses(&self) -> io::Result<Vec<IpAddr>>;
    /// `Ok(())` when `dir` (or its nearest existing ancestor) is on bpffs,
    /// else what it is on.
    fn bpffs(&self, dir: &Path) -> Result<(), String>;
    /// Whether binding non-local addresses is allowed for the family
    /// (`net.ipv{4,6}.ip_nonlocal_bind`).
    fn nonlocal_bind(&self, v6: bool) -> bool;
}

/// The machine this runs on.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealHost;

impl Host for RealHost {
    fn interfaces(&self) -> io::Result<Vec<String>> {
        // SAFETY: if_nameindex returns a heap array terminated by a zero
        // entry, or null on failure; freed below with if_freenameindex.
        let list = unsafe { libc::if_nameindex() };
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut names = Vec::new();
        let mut i = 0;
        loop {
            // SAFETY: within the array up to and including its terminator.
            let e = unsafe { &*list.add(i) };
            if e.if_index == 0 || e.if_name.is_null() {
                break;
            }
            // SAFETY: if_name is a NUL-terminated string owned by the list.
            names.push(
                unsafe { CStr::from_ptr(e.if_name) }
                    .to_string_lossy()
                    .into_owned(),
            );
            i += 1;
        }
        // SAFETY: the pointer came from if_nameindex and is freed once.
        unsafe { libc::if_freenameindex(list) };
        Ok(names)
    }

    fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `head` with a list freed by freeifaddrs.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: `cur` is a node of the list getifaddrs returned.
            let ifa = unsafe { &*cur };
            if !ifa.ifa_addr.is_null() {
                // SAFETY: ifa_addr points to a sockaddr whose family says
                // which struct it is.
                let fam = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
                if fam == libc::AF_INET {
                    // SAFETY: family AF_INET: a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    // s_addr holds the bytes in network order.
                    out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                } else if fam == libc::AF_INET6 {
                    // SAFETY: family AF_INET6: a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
            }
            cur = ifa.ifa_next;
        }
        // SAFETY: freed once, from getifaddrs.
        unsafe { libc::freeifaddrs(head) };
        Ok(out)
    }

    fn bpffs(&self, dir: &Path) -> Result<(), String> {
        if crate::datapath::attach::is_bpffs(dir) {
            Ok(())
        } else {
            Err("another filesystem, or no such directory and no bpffs above it".to_owned())
        }
    }

    fn nonlocal_bind(&self, v6: bool) -> bool {
        let fam = if v6 { "ipv6" } else { "ipv4" };
        std::fs::read_to_string(format!("/proc/sys/net/{fam}/ip_nonlocal_bind"))
            .map(|v| v.trim() == "1")
            .unwrap_or(false)
    }
}

/// Every host check for `cfg`.
pub fn check(cfg: &Config, host: &dyn Host) -> Vec<Finding> {
    let mut out = Vec::new();
    match host.interfaces() {
        Ok(names) => {
            for (i, iface) in cfg.interfaces.iter().enumerate() {
                if names.contains(&iface.name) {
                    continue;
                }
                let cands: Vec<&str> = names.iter().map(String::as_str).collect();
                let suggestion = crate::config::forms::one_edit_away(&iface.name, &cands)
                    .map(|c| format!("; did you mean {c:?}?"))
                    .unwrap_or_default();
                out.push(Finding::error(
                    format!("interface[{i}].name"),
                    Problem::InterfaceMissing {
                        name: iface.name.clone(),
                        suggestion,
                        known: names.join(", "),
                    },
                ));
            }
        }
        Err(e) => out.push(Finding::warning(
            "interface",
            Problem::HostUnreadable {
                what: "interfaces",
                error: e.to_string(),
            },
        )),
    }
    if let Err(detail) = host.bpffs(&cfg.pin_dir) {
        out.push(Finding::error(
            "pin_dir",
            Problem::PinDirNotBpffs {
                dir: cfg.pin_dir.clone(),
                detail,
            },
        ));
    }
    let local = match host.addresses() {
        Ok(a) => a,
        Err(e) => {
            out.push(Finding::warning(
                "addresses",
                Problem::HostUnreadable {
                    what: "addresses",
                    error: e.to_string(),
                },
            ));
            return out;
        }
    };
    let is_local = |ip: IpAddr| local.iter().any(|l| l.to_canonical() == ip.to_canonical());
    // What the agent binds: a missing one fails the start (or the first
    // outgoing connection), after the datapath is attached.
    let mut binds: Vec<(String, IpAddr)> = Vec::new();
    if let Some(p) = &cfg.proxy {
        for l in rules::listeners(p) {
            binds.push((l.key.to_owned(), l.addr.ip()));
        }
        for (key, a) in [
            ("proxy.internal_source_address", p.internal_source_address),
            ("proxy.external_source_address", p.external_source_address),
        ] {
            if let Some(a) = a {
                binds.push((key.to_owned(), a));
            }
        }
    }
    for (key, ip) in binds {
        if ip.is_unspecified() || is_local(ip) {
            continue;
        }
        if host.nonlocal_bind(ip.is_ipv6()) {
            out.push(Finding::warning(
                key,
                Problem::NotLocal {
                    addr: ip,
                    nonlocal: " (ip_nonlocal_bind is on, so the bind succeeds; nothing arrives until the address moves here)",
                },
            ));
        } else {
            out.push(Finding::error(
                key,
                Problem::NotLocal {
                    addr: ip,
                    nonlocal: "",
                },
            ));
        }
    }
    for (key, list) in [
        ("addresses.internal", &cfg.addresses.internal),
        ("addresses.public", &cfg.addresses.public),
    ] {
        for ip in list.iter().filter(|ip| !is_local(**ip)) {
            out.push(Finding::warning(
                key,
                Problem::EdgeAddressNotLocal { addr: *ip },
            ));
        }
    }
    for (key, host_s) in rules::next_hops(cfg) {
        if let Some(UriHost::Ip(ip)) = UriHost::parse(&host_s) {
            let edge = cfg.addresses.internal.iter().chain(&cfg.addresses.public);
            let known = edge
                .into_iter()
                .any(|e| e.to_canonical() == ip.to_canonical());
            // Edge addresses were reported by the rules already.
            if is_local(ip) && !known {
                out.push(Finding::error(
                    key,
                    Problem::NextHopIsEdge {
                        host: host_s,
                        why: "an address of this host".to_owned(),
                    },
                ));
            }
        }
    }
    out
}
