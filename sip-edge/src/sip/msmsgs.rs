//! Windows Messenger / Office Communicator `text/x-msmsgsinvite` bodies:
//! reads the `Name: value` lines of an invitation taken from a
//! `sip::message::Message` body, reports where the file-transfer TCP
//! connection will go, and rewrites `IP-Address`/`Port` (and the
//! `IP-Address-Internal`, `PortX`/`Port-X`, `PortX-Internal` variants) to
//! the address a [`sdp::PortAllocator`](crate::sip::sdp::PortAllocator)-like
//! closure picks, leaving every other line byte-for-byte.
//!
//! The format has no RFC; it is the MSN/Messenger invitation text format:
//! `Invitation-Command: INVITE|ACCEPT|CANCEL`, `Invitation-Cookie`,
//! `Application-Name`, `Application-GUID`, `IP-Address`, `Port`,
//! `AuthCookie`, `Request-Data`... Hand-written: no crate handles it.

use std::net::{IpAddr, SocketAddr};

/// Why an invitation body cannot be handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsmsgsError {
    /// An address or port field that does not parse.
    #[error("x-msmsgsinvite line {line_no}: bad {field} value {value:?}")]
    BadField {
        /// 1-based line number.
        line_no: usize,
        /// Field name.
        field: &'static str,
        /// The value (truncated).
        value: String,
    },
    /// The allocator had nothing for the transfer.
    #[error("no port available for the x-msmsgsinvite file transfer (cookie {cookie:?})")]
    PortsExhausted {
        /// Invitation-Cookie, if present.
        cookie: Option<String>,
    },
}

/// `Invitation-Command` values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `INVITE`: offers a transfer (usually without an address).
    Invite,
    /// `ACCEPT`: accepts it, usually carrying IP-Address/Port to connect to.
    Accept,
    /// `CANCEL`: ends it.
    Cancel,
    /// Anything else, as received.
    Other(String),
}

/// What the pinhole manager needs from one invitation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    /// The command, if present.
    pub command: Option<Command>,
    /// `Invitation-Cookie` (ties INVITE, ACCEPT and CANCEL together).
    pub cookie: Option<String>,
    /// `IP-Address` + `Port`: where the transfer connects to (TCP).
    pub endpoint: Option<SocketAddr>,
    /// `PortX` / `Port-X`: the alternative port, on the same address.
    pub port_x: Option<u16>,
    /// `IP-Address-Internal` + `PortX-Internal`, if present.
    pub internal: Option<SocketAddr>,
    /// Replacement for `endpoint` (after [`rewrite`]).
    pub new_endpoint: Option<SocketAddr>,
    /// An `IP-Address` or `IP-Address-Internal` line is present (even one
    /// without a port, which `endpoint`/`internal` cannot represent): such a
    /// body must be rewritten or refused, never forwarded as is.
    pub addressed: bool,
}

/// Field names we read, compared case-insensitively.
const IP: &str = "IP-Address";
const IP_INTERNAL: &str = "IP-Address-Internal";
const PORT: &str = "Port";
const PORTX: [&str; 2] = ["PortX", "Port-X"];
const PORTX_INTERNAL: &str = "PortX-Internal";

struct Line<'a> {
    name: Option<&'a str>,
    value: &'a str,
    raw: &'a [u8],
}

fn lines(body: &[u8]) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        let raw = &rest[..end];
        rest = &rest[end..];
        let text = std::str::from_utf8(raw).unwrap_or("");
        let text = text.trim_end_matches(['\r', '\n']);
        let (name, value) = match text.split_once(':') {
            Some((n, v)) if !n.is_empty() && !n.contains(' ') => (Some(n), v.trim()),
            _ => (None, ""),
        };
        out.push(Line { name, value, raw });
    }
    out
}

fn is(name: Option<&str>, want: &str) -> bool {
    name.is_some_and(|n| n.eq_ignore_ascii_case(want))
}

/// Reads an invitation body.
pub fn parse(body: &[u8]) -> Result<Invitation, MsmsgsError> {
    let mut inv = Invitation {
        command: None,
        cookie: None,
        endpoint: None,
        port_x: None,
        internal: None,
        new_endpoint: None,
        addressed: false,
    };
    let (mut ip, mut port, mut ip_int, mut port_int) = (None, None, None, None);
    for (i, l) in lines(body).iter().enumerate() {
        let bad = |field| MsmsgsError::BadField {
            line_no: i + 1,
            field,
            value: l.value.chars().take(64).collect(),
        };
        let port_of = |field| l.value.parse::<u16>().map_err(|_| bad(field));
        let ip_of = |field| l.value.parse::<IpAddr>().map_err(|_| bad(field));
        if is(l.name, "Invitation-Command") {
            inv.command = Some(match l.value.to_ascii_uppercase().as_str() {
                "INVITE" => Command::Invite,
                "ACCEPT" => Command::Accept,
                "CANCEL" => Command::Cancel,
                _ => Command::Other(l.value.to_owned()),
            });
        } else if is(l.name, "Invitation-Cookie") {
            inv.cookie = Some(l.value.to_owned());
        } else if is(l.name, IP) {
            ip = Some(ip_of("IP-Address")?);
        } else if is(l.name, IP_INTERNAL) {
            ip_int = Some(ip_of("IP-Address-Internal")?);
        } else if is(l.name, PORT) {
            port = Some(port_of("Port")?);
        } else if PORTX.iter().any(|p| is(l.name, p)) {
            inv.port_x = Some(port_of("PortX")?);
        } else if is(l.name, PORTX_INTERNAL) {
            port_int = Some(port_of("PortX-Internal")?);
        }
    }
    inv.addressed = ip.is_some() || ip_int.is_some();
    inv.endpoint = ip.zip(port).map(|(a, p)| SocketAddr::new(a, p));
    inv.internal = ip_int
        .zip(port_int.or(port))
        .map(|(a, p)| SocketAddr::new(a, p));
    Ok(inv)
}

/// Rewrites the address fields. `alloc` gets the parsed invitation (with an
/// endpoint) and returns the replacement for `IP-Address`/`Port`; `PortX`
/// becomes the same port (the edge listens on one), and the internal
/// fields are set to the replacement too so no private address leaks.
/// Bodies without an endpoint (a plain INVITE/CANCEL) come back unchanged;
/// one naming only `IP-Address-Internal` is rewritten like one naming
/// `IP-Address` (it would leak the same way).
pub fn rewrite(
    body: &[u8],
    alloc: &mut impl FnMut(&Invitation) -> Option<SocketAddr>,
) -> Result<(Vec<u8>, Invitation), MsmsgsError> {
    let mut inv = parse(body)?;
    if inv.endpoint.is_none() && inv.internal.is_none() {
        return Ok((body.to_vec(), inv));
    }
    let new = alloc(&inv).ok_or_else(|| MsmsgsError::PortsExhausted {
        cookie: inv.cookie.clone(),
    })?;
    inv.new_endpoint = Some(new);
    let mut out = Vec::with_capacity(body.len() + 16);
    for l in lines(body) {
        let value = if is(l.name, IP) || is(l.name, IP_INTERNAL) {
            Some(new.ip().to_string())
        } else if is(l.name, PORT)
            || PORTX.iter().any(|p| is(l.name, p))
            || is(l.name, PORTX_INTERNAL)
        {
            Some(new.port().to_string())
        } else {
            None
        };
        match (value, l.name) {
            (Some(v), Some(name)) => {
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(v.as_bytes());
                let eol: &[u8] = if l.raw.ends_with(b"\r\n") {
                    b"\r\n"
                } else if l.raw.ends_with(b"\n") {
                    b"\n"
                } else {
                    b""
                };
                out.extend_from_slice(eol);
            }
            _ => out.extend_from_slice(l.raw),
        }
    }
    Ok((out, inv))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCEPT: &[u8] = b"Invitation-Command: ACCEPT\r\nInvitation-Cookie: 21863\r\nIP-Address: 10.77.0.21\r\nPort: 6891\r\nPortX: 11178\r\nAuthCookie: 1398765431\r\nLaunch-Application: FALSE\r\nRequest-Data: IP-Address:\r\n\r\n";

    #[test]
    fn parses_accept() {
        let inv = parse(ACCEPT).unwrap();
        assert_eq!(inv.command, Some(Command::Accept));
        assert_eq!(inv.cookie.as_deref(), Some("21863"));
        assert_eq!(inv.endpoint, Some("10.77.0.21:6891".parse().unwrap()));
        assert_eq!(inv.port_x, Some(11178));
        assert_eq!(inv.internal, None);
        assert!(inv.addressed);
    }

    #[test]
    fn internal_only_is_rewritten_and_portless_addresses_are_flagged() {
        let body = b"Invitation-Command: ACCEPT\r\nIP-Address-Internal: 10.77.0.30\r\nPortX-Internal: 6892\r\n\r\n";
        let (out, inv) = rewrite(body, &mut |_: &Invitation| {
            Some("203.0.113.5:40200".parse().unwrap())
        })
        .unwrap();
        assert_eq!(inv.endpoint, None);
        assert!(!String::from_utf8(out).unwrap().contains("10.77.0.30"));
        let inv = parse(b"IP-Address: 10.77.0.30\r\n").unwrap();
        assert!(inv.addressed && inv.endpoint.is_none() && inv.internal.is_none());
        assert!(
            !parse(b"Invitation-Command: INVITE\r\nRequest-Data: IP-Address:\r\n")
                .unwrap()
                .addressed
        );
    }

    #[test]
    fn rewrites_only_address_fields() {
        let mut seen = None;
        let (out, inv) = rewrite(ACCEPT, &mut |i: &Invitation| {
            seen = i.endpoint;
            Some("203.0.113.5:40100".parse().unwrap())
        })
        .unwrap();
        assert_eq!(seen, Some("10.77.0.21:6891".parse().unwrap()));
        assert_eq!(inv.new_endpoint, Some("203.0.113.5:40100".parse().unwrap()));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Invitation-Command: ACCEPT\r\nInvitation-Cookie: 21863\r\nIP-Address: 203.0.113.5\r\nPort: 40100\r\nPortX: 40100\r\nAuthCookie: 1398765431\r\nLaunch-Application: FALSE\r\nRequest-Data: IP-Address:\r\n\r\n"
        );
    }

    #[test]
    fn internal_fields_and_lf() {
        let body = b"Invitation-Command: ACCEPT\nIP-Address: 198.51.100.7\nIP-Address-Internal: 10.77.0.30\nPort: 6891\nPortX-Internal: 6892\nX-Unknown:  spaced  \n";
        let inv = parse(body).unwrap();
        assert_eq!(inv.internal, Some("10.77.0.30:6892".parse().unwrap()));
        let (out, _) = rewrite(body, &mut |_: &Invitation| {
            Some("203.0.113.5:40200".parse().unwrap())
        })
        .unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(!t.contains("10.77.") && !t.contains("198.51.100.7"), "{t}");
        assert!(t.contains("IP-Address-Internal: 203.0.113.5\nPort: 40200\nPortX-Internal: 40200\nX-Unknown:  spaced  \n"), "{t}");
    }

    #[test]
    fn invite_without_address_is_untouched_and_errors_are_typed() {
        let body = b"Application-Name: File Transfer\r\nApplication-GUID: {5D3E02AB-6190-11d3-BBBB-00C04F795683}\r\nInvitation-Command: INVITE\r\nInvitation-Cookie: 21863\r\nApplication-File: photo.jpg\r\nApplication-FileSize: 32349\r\n\r\n";
        let (out, inv) = rewrite(body, &mut |_: &Invitation| {
            panic!("no allocation for INVITE")
        })
        .unwrap();
        assert_eq!(out, body);
        assert_eq!(inv.command, Some(Command::Invite));
        assert!(matches!(
            parse(b"IP-Address: 10.77.0.300\r\n"),
            Err(MsmsgsError::BadField {
                line_no: 1,
                field: "IP-Address",
                ..
            })
        ));
        assert!(matches!(
            parse(b"x: y\nPort: 70000\n"),
            Err(MsmsgsError::BadField {
                line_no: 2,
                field: "Port",
                ..
            })
        ));
        assert_eq!(
            rewrite(ACCEPT, &mut |_: &Invitation| None),
            Err(MsmsgsError::PortsExhausted {
                cookie: Some("21863".into())
            })
        );
    }

    #[test]
    fn fixture_in_a_sip_message() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sip/winmsgr_msmsgsinvite_accept.sip");
        let raw = std::fs::read(p).unwrap();
        let m = crate::sip::message::Message::parse(&raw).unwrap();
        assert!(m
            .header("Content-Type")
            .unwrap()
            .starts_with("text/x-msmsgsinvite"));
        let (out, inv) = rewrite(m.body(), &mut |_: &Invitation| {
            Some("203.0.113.5:40300".parse().unwrap())
        })
        .unwrap();
        assert_eq!(inv.endpoint, Some("10.77.0.21:6891".parse().unwrap()));
        let mut m2 = m.clone();
        m2.set_body(out);
        let back = crate::sip::message::Message::parse(&m2.to_bytes()).unwrap();
        assert_eq!(
            parse(back.body()).unwrap().endpoint,
            Some("203.0.113.5:40300".parse().unwrap())
        );
        // Truncations never panic.
        for k in 0..m.body().len() {
            let _ = rewrite(&m.body()[..k], &mut |_: &Invitation| {
                Some("203.0.113.5:1".parse().unwrap())
            });
        }
    }
}
