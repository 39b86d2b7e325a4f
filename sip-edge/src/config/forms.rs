//! The written forms of config values and what an admin is told when a
//! value is not in one: serde `deserialize_with` helpers for addresses
//! (`[2001:db8::1]:5061` for IPv6 listeners; no prefix length or zone id),
//! the `lo-hi` range form, and "did you mean" hints for unknown keys and
//! values, computed from the expected names serde lists in its error.
//!
//! Data in: TOML strings (through serde) and `toml::de::Error` messages.
//! Data out: typed values, or messages that show the expected form.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Deserializer};

/// How a range is written, quoted in every range message.
pub const RANGE_FORM: &str =
    "write a range as `lo-hi` (e.g. \"40000-49999\") or one port (\"40000\")";

/// Why `s` is not an `address:port`, with the expected form.
pub fn socket_addr_problem(s: &str) -> String {
    let t = s.trim();
    let forms = "expected `10.77.0.1:5061`, or `[2001:db8::1]:5061` for IPv6";
    if t.contains('/') {
        return format!("{s:?} has a prefix length; {forms}: no prefix length or zone id here");
    }
    if t.contains('%') {
        return format!("{s:?} has a zone id; {forms}: no prefix length or zone id here (use a global address of the interface)");
    }
    match t.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => {
            return format!("{s:?} reads as an IPv6 address with no port; an IPv6 listener is written in brackets, the port after them: `[2001:db8::1]:5061`");
        }
        Ok(IpAddr::V4(_)) => return format!("{s:?} has no port; {forms}"),
        Err(_) => {}
    }
    if !t.starts_with('[') && t.matches(':').count() >= 2 {
        return format!("{s:?}: an IPv6 address with a port is written in brackets; {forms}");
    }
    if let Some((host, _)) = t.rsplit_once(':') {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.parse::<IpAddr>().is_err() {
            return format!(
                "{s:?}: {host:?} is not an IP address (listeners take an address, not a name); {forms}"
            );
        }
        return format!("{s:?}: the port is not a number 0-65535; {forms}");
    }
    format!("{s:?} is not an address:port; {forms}")
}

/// Why `s` is not a bare IP address, with the expected form.
pub fn ip_addr_problem(s: &str) -> String {
    let t = s.trim();
    let form = "expected an address alone, e.g. `10.77.0.1` or `2001:db8::1`: no prefix length or zone id here";
    if t.contains('/') {
        return format!("{s:?} has a prefix length; {form}");
    }
    if t.contains('%') {
        return format!("{s:?} has a zone id; {form}");
    }
    if t.starts_with('[') || t.parse::<SocketAddr>().is_ok() {
        return format!("{s:?} has brackets or a port; {form}");
    }
    format!("{s:?} is not an IP address; {form}")
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| socket_addr_problem(s))
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.trim().parse().map_err(|_| ip_addr_problem(s))
}

/// `deserialize_with` for a listener `address:port`.
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_socket_addr(&s).map_err(serde::de::Error::custom)
}

/// `deserialize_with` for an optional listener `address:port`.
pub fn opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    parse_socket_addr(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `deserialize_with` for an optional bare IP address.
pub fn opt_ip<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    let s = String::deserialize(d)?;
    parse_ip(&s).map(Some).map_err(serde::de::Error::custom)
}

/// `deserialize_with` for a list of bare IP addresses.
pub fn ip_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .enumerate()
        .map(|(i, s)| parse_ip(s).map_err(|m| format!("entry {i}: {m}")))
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

/// The names quoted in backticks in a serde message, in order.
fn backticked(msg: &str) -> Vec<&str> {
    msg.split('`').skip(1).step_by(2).collect()
}

/// The candidate closest to `got`, if it is close enough to be a typo
/// (edit distance at most a third of the name, at least 2), or one is the
/// other with a suffix (`interfaces` for `interface`, `port_range`).
pub fn closest<'a>(got: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let got_l = got.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(&got_l, c), *c))
        .filter(|(d, c)| {
            *d <= (c.len() / 3).max(2) || c.starts_with(&got_l) || got_l.starts_with(*c)
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// The candidate one edit (insertion, deletion, substitution or swap)
/// away from `got`: for short names such as interfaces, where two edits
/// turn `int0` into the unrelated `ifb0`.
pub fn one_edit_away<'a>(got: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .find(|c| strsim::damerau_levenshtein(got, c) == 1)
        .copied()
}

/// A hint for a TOML error, from serde's message (`unknown field`,
/// `unknown variant`, `missing field`); empty when there is nothing to add.
pub fn hint(message: &str) -> String {
    let names = backticked(message);
    if message.starts_with("unknown field") || message.starts_with("unknown variant") {
        let Some((got, expected)) = names.split_first() else {
            return String::new();
        };
        let what = if message.starts_with("unknown field") {
            "key"
        } else {
            "value"
        };
        return match closest(got, expected) {
            Some(c) => format!("\nhint: did you mean `{c}`? (unknown {what} `{got}`)"),
            None if expected.is_empty() => {
                format!("\nhint: this table takes no keys; remove `{got}`")
            }
            None => format!(
                "\nhint: `{got}` is not a {what} here; see sip-edge.example.toml for every key"
            ),
        };
    }
    if message.starts_with("missing field") {
        if let Some(k) = names.first() {
            return format!("\nhint: `{k}` is required in this table (it has no default); sip-edge.example.toml shows its form");
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addr_messages_show_the_expected_form() {
        for (bad, says) in [
            (
                "2001:db8::1:5061",
                "in brackets, the port after them: `[2001:db8::1]:5061`",
            ),
            ("2001:db8::1::5061", "written in brackets"),
            ("10.77.0.1", "has no port"),
            ("10.77.0.1/24:5061", "no prefix length or zone id here"),
            ("[fe80::1%eth0]:5061", "zone id"),
            ("edge.example.com:5061", "not an IP address"),
            ("10.77.0.1:99999", "port is not a number"),
        ] {
            let m = socket_addr_problem(bad);
            assert!(m.contains(says), "{bad}: {m}");
        }
        assert_eq!(
            parse_socket_addr(" [2001:db8::1]:5061 ").ok(),
            "[2001:db8::1]:5061".parse().ok()
        );
    }

    #[test]
    fn ip_messages_show_the_expected_form() {
        for (bad, says) in [
            ("10.77.0.1/24", "no prefix length or zone id here"),
            ("fe80::1%eth0", "zone id"),
            ("10.77.0.1:5061", "port"),
            ("[2001:db8::1]", "brackets"),
            ("edge", "not an IP address"),
        ] {
            let m = ip_addr_problem(bad);
            assert!(m.contains(says), "{bad}: {m}");
        }
    }

    #[test]
    fn unknown_keys_and_values_get_the_closest_valid_one() {
        let h = hint("unknown field `ca_rots`, expected one of `internal_listen`, `cert`, `key`, `ca_roots`, `client_ca`");
        assert!(h.contains("did you mean `ca_roots`?"), "{h}");
        let h = hint("unknown field `interfaces`, expected one of `pin_dir`, `interface`, `route`");
        assert!(h.contains("`interface`"), "{h}");
        let h = hint("unknown variant `natve`, expected `native` or `skb`");
        assert!(h.contains("`native`"), "{h}");
        let h = hint("unknown field `colour`, expected `mode`");
        assert!(h.contains("not a key here"), "{h}");
        let h = hint("missing field `cert`");
        assert!(h.contains("`cert` is required"), "{h}");
        assert_eq!(hint("invalid type: integer"), "");
    }
}
