//! Keeps the kernel from handing the edge's own sockets a media port.
//!
//! The datapath drops every packet aimed at a media port of an edge address
//! unless a pinhole matches. Linux picks ephemeral source ports for the
//! agent's outgoing TLS connections (and DNS lookups) from
//! `ip_local_port_range` (32768-60999 by default), which usually overlaps
//! the media ranges: the replies to such a connection would be dropped in
//! XDP. The agent therefore adds its media ranges to the network
//! namespace's `net.ipv4.ip_local_reserved_ports` (it applies to IPv6 too,
//! Documentation/networking/ip-sysctl.rst), which only excludes them from
//! automatic assignment; explicit binds still work.

use std::path::{Path, PathBuf};

use crate::config::PortRange;

/// The sysctl file, relative to the caller's network namespace.
pub const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Errors of reserving ports.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    /// Reading or writing the sysctl failed.
    #[error("cannot update {path}: {source}; without it the kernel may give the agent's own connections a media source port whose replies XDP drops (run as root, or reserve the media ranges yourself with sysctl net.ipv4.ip_local_reserved_ports)")]
    Sysctl {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Parse the kernel's `a,b-c,...` list.
pub fn parse_list(text: &str) -> Vec<PortRange> {
    text.trim()
        .split(',')
        .filter_map(|part| {
            let part = part.trim();
            if part.is_empty() {
                return None;
            }
            crate::config::parse_port_range(part).ok()
        })
        .collect()
}

/// The list with `want` merged in, or `None` when `have` already covers it.
pub fn merged(have: &[PortRange], want: &[PortRange]) -> Option<String> {
    let covered = |r: &PortRange| have.iter().any(|h| h.start <= r.start && r.end <= h.end);
    if want.iter().all(covered) {
        return None;
    }
    let all: Vec<String> = have
        .iter()
        .chain(want.iter().filter(|r| !covered(r)))
        .map(|r| {
            if r.start == r.end {
                r.start.to_string()
            } else {
                format!("{}-{}", r.start, r.end)
            }
        })
        .collect();
    Some(all.join(","))
}

/// Reserve `ranges` in the sysctl at `path` (normally [`RESERVED_PORTS`]);
/// returns whether anything changed.
pub fn reserve(path: &Path, ranges: &[PortRange]) -> Result<bool, PortsError> {
    let err = |source| PortsError::Sysctl {
        path: path.to_owned(),
        source,
    };
    let have = parse_list(&std::fs::read_to_string(path).map_err(err)?);
    match merged(&have, ranges) {
        None => Ok(false),
        Some(text) => {
            std::fs::write(path, text).map_err(err)?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u16, end: u16) -> PortRange {
        PortRange { start, end }
    }

    #[test]
    fn merge_adds_only_what_is_missing() {
        assert_eq!(parse_list("\n"), vec![]);
        assert_eq!(
            parse_list("8080,40000-40999\n"),
            vec![r(8080, 8080), r(40000, 40999)]
        );
        assert_eq!(
            merged(&[], &[r(40000, 49999)]).as_deref(),
            Some("40000-49999")
        );
        assert_eq!(
            merged(&[r(8080, 8080)], &[r(40000, 49999)]).as_deref(),
            Some("8080,40000-49999")
        );
        assert_eq!(
            merged(&[r(39000, 50000)], &[r(40000, 49999)]),
            None,
            "already covered"
        );
    }

    #[test]
    fn reserve_writes_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("reserved");
        std::fs::write(&f, "22\n").expect("write");
        assert!(reserve(&f, &[r(40000, 40999)]).expect("reserve"));
        assert_eq!(std::fs::read_to_string(&f).expect("read"), "22,40000-40999");
        assert!(
            !reserve(&f, &[r(40000, 40999)]).expect("reserve"),
            "second call changes nothing"
        );
    }
}
