//! SIP/SIPS URI and host grammar (RFC 3261 §19.1, §25.1) for the message
//! layer: parses the URIs found in Request-Lines, Via sent-by, Contact,
//! Route/Record-Route/Path and From/To, and prints them back for the
//! rewriters (the proxy replaces hosts and ports; everything else passes
//! through as received).
//!
//! Hand-written on purpose, with rsip as a test oracle: rsip 0.4's
//! `Uri::try_from` fails on bracketed IPv6 references (`sip:[2001:db8::1]`,
//! "invalid digit found in string"), fails on `tel:` URIs, and silently
//! misreads a user part carrying `;` parameters
//! (`sip:user;par=u%40example.net@example.com` gives host `user`). The tests
//! below pin each of those rsip behaviours so we notice when it is fixed,
//! and check that we agree with rsip on every URI it does parse.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a URI or host could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// No `scheme:` prefix.
    #[error("URI {uri:?} has no scheme")]
    NoScheme {
        /// The URI as received (truncated).
        uri: String,
    },
    /// A scheme other than sip/sips where a SIP URI is required.
    #[error("URI {uri:?} has scheme {scheme:?}; only sip: and sips: are routable here")]
    UnsupportedScheme {
        /// The URI as received (truncated).
        uri: String,
        /// Its scheme.
        scheme: String,
    },
    /// The host part is empty or has characters a host cannot have.
    #[error("invalid host {host:?} in {uri:?}")]
    BadHost {
        /// The host as found.
        host: String,
        /// The URI as received (truncated).
        uri: String,
    },
    /// An IPv6 reference without its closing bracket or with a bad address.
    #[error("invalid IPv6 reference {host:?} in {uri:?}")]
    BadIpv6 {
        /// The bracketed part as found.
        host: String,
        /// The URI as received (truncated).
        uri: String,
    },
    /// The port is not a number in 0..=65535.
    #[error("invalid port {port:?} in {uri:?}")]
    BadPort {
        /// The port text.
        port: String,
        /// The URI as received (truncated).
        uri: String,
    },
}

fn cut(s: &str) -> String {
    s.chars().take(96).collect()
}

/// A host: an IP address or a domain name (kept as received, compared
/// case-insensitively by callers).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// Domain name.
    Name(String),
}

impl Host {
    /// Parses `192.0.2.1`, `[2001:db8::1]`, a bare `2001:db8::1` (allowed
    /// by callers that know there is no port, e.g. SDP or `received=`), or a
    /// domain name.
    pub fn parse(s: &str) -> Option<Host> {
        if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            return parse_ipv6_reference(inner).map(|a| Host::Ip(IpAddr::V6(a)));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Some(Host::Ip(ip));
        }
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !s.starts_with(['-', '.']);
        ok.then(|| Host::Name(s.to_owned()))
    }

    /// The IP address, if this is a literal.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip(ip) => Some(*ip),
            Host::Name(_) => None,
        }
    }
}

/// The address inside an IPv6 reference. RFC 3261's ABNF (from RFC 2373)
/// admits three colons before an embedded IPv4 address
/// (`2001:db8:::192.0.2.1`), which RFC 4291 does not; RFC 5118 §4.10 asks
/// implementations to tolerate both, so that form reads as the two-colon
/// address it means. Nothing else beyond RFC 4291 is accepted.
fn parse_ipv6_reference(inner: &str) -> Option<Ipv6Addr> {
    if let Ok(a) = inner.parse::<Ipv6Addr>() {
        return Some(a);
    }
    let (head, v4) = inner.split_once(":::")?;
    if v4.contains(':') || v4.parse::<Ipv4Addr>().is_err() || head.contains("::") {
        return None;
    }
    format!("{head}::{v4}").parse().ok()
}

impl From<IpAddr> for Host {
    fn from(ip: IpAddr) -> Self {
        Host::Ip(ip)
    }
}

impl From<Ipv4Addr> for Host {
    fn from(ip: Ipv4Addr) -> Self {
        Host::Ip(IpAddr::V4(ip))
    }
}

impl fmt::Display for Host {
    /// URI form: IPv6 in brackets (RFC 3261 §25.1 `IPv6reference`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// Splits `host[:port]` where host may be an IPv6 reference.
pub fn parse_hostport(s: &str, uri: &str) -> Result<(Host, Option<u16>), UriError> {
    let (host, rest) = if s.starts_with('[') {
        let end = s.find(']').ok_or_else(|| UriError::BadIpv6 {
            host: cut(s),
            uri: cut(uri),
        })?;
        let (h, r) = s.split_at(end + 1);
        let host = Host::parse(h).ok_or_else(|| UriError::BadIpv6 {
            host: cut(h),
            uri: cut(uri),
        })?;
        (host, r)
    } else {
        let (h, r) = s.find(':').map_or((s, ""), |i| s.split_at(i));
        let host = Host::parse(h).ok_or_else(|| UriError::BadHost {
            host: cut(h),
            uri: cut(uri),
        })?;
        (host, r)
    };
    let port = match rest {
        "" => None,
        r => {
            let p = r.strip_prefix(':').unwrap_or(r);
            let bad = || UriError::BadPort {
                port: cut(p),
                uri: cut(uri),
            };
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            Some(p.parse::<u16>().map_err(|_| bad())?)
        }
    };
    Ok((host, port))
}

/// A `sip:`/`sips:` URI split into the parts the proxy reads or rewrites;
/// the user part, parameters and headers are kept as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri {
    /// `sip` or `sips`, lower-cased.
    pub scheme: String,
    /// Everything before `@` (user, password, user parameters), escaped as
    /// received; `None` when there is no `@`.
    pub userinfo: Option<String>,
    /// The host.
    pub host: Host,
    /// The port, if given.
    pub port: Option<u16>,
    /// `;param[=value]` list, raw, including the leading `;` (may be empty).
    pub params: String,
    /// `?headers`, raw, including the `?` (may be empty).
    pub headers: String,
}

impl SipUri {
    /// Parses a SIP or SIPS URI.
    pub fn parse(uri: &str) -> Result<SipUri, UriError> {
        let uri = uri.trim();
        let (scheme, rest) = uri
            .split_once(':')
            .ok_or_else(|| UriError::NoScheme { uri: cut(uri) })?;
        let scheme_lc = scheme.to_ascii_lowercase();
        if scheme_lc != "sip" && scheme_lc != "sips" {
            return Err(UriError::UnsupportedScheme {
                uri: cut(uri),
                scheme: cut(scheme),
            });
        }
        // '@' cannot appear unescaped in host, uri-parameters or headers
        // (§25.1), so the first one ends the userinfo, which may itself
        // contain ';' and '?' (`user-unreserved`, RFC 4475 §3.1.1.2).
        let (userinfo, after_at) = match rest.find('@') {
            Some(i) => (Some(rest[..i].to_owned()), &rest[i + 1..]),
            None => (None, rest),
        };
        let (hostpart, headers) = after_at
            .find('?')
            .map_or((after_at, ""), |i| after_at.split_at(i));
        // Params start at the first ';' after the host (an IPv6 reference
        // has no ';').
        let (hostport, params) = hostpart
            .find(';')
            .map_or((hostpart, ""), |i| hostpart.split_at(i));
        let (host, port) = parse_hostport(hostport, uri)?;
        Ok(SipUri {
            scheme: scheme_lc,
            userinfo,
            host,
            port,
            params: params.to_owned(),
            headers: headers.to_owned(),
        })
    }

    /// The value of a URI parameter (`;name=value` → `Some(Some(value))`,
    /// `;name` → `Some(None)`), names compared case-insensitively.
    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        self.params
            .split(';')
            .skip(1)
            .map(|p| p.split_once('=').map_or((p, None), |(n, v)| (n, Some(v))))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.map(str::trim))
    }
}

impl fmt::Display for SipUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.scheme)?;
        if let Some(u) = &self.userinfo {
            write!(f, "{u}@")?;
        }
        write!(f, "{}", self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write!(f, "{}{}", self.params, self.headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_shapes() {
        let u = SipUri::parse("sips:bob@client.biloxi.example.com:5061;transport=tls;lr?Subject=x")
            .unwrap();
        assert_eq!(u.scheme, "sips");
        assert_eq!(u.userinfo.as_deref(), Some("bob"));
        assert_eq!(u.host, Host::Name("client.biloxi.example.com".into()));
        assert_eq!(u.port, Some(5061));
        assert_eq!(u.param("transport"), Some(Some("tls")));
        assert_eq!(u.param("LR"), Some(None));
        assert_eq!(u.param("maddr"), None);
        assert_eq!(u.headers, "?Subject=x");
        assert_eq!(
            u.to_string(),
            "sips:bob@client.biloxi.example.com:5061;transport=tls;lr?Subject=x"
        );
    }

    #[test]
    fn rfc5118_abnf_bug_three_colons_are_tolerated() {
        // RFC 5118 §4.10: both forms name the same address.
        let three = SipUri::parse("sip:user@[2001:db8:::192.0.2.1]").unwrap();
        let two = SipUri::parse("sip:user@[2001:db8::192.0.2.1]").unwrap();
        assert_eq!(three.host, two.host);
        // Only before an embedded IPv4 address, and never a second "::".
        for bad in [
            "sip:[2001:db8:::1]",
            "sip:[2001::db8:::192.0.2.1]",
            "sip:[2001:db8::::192.0.2.1]",
        ] {
            assert!(SipUri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_part_may_hold_question_marks() {
        // RFC 4475 §3.1.1.2: '?' is user-unreserved; headers follow the host.
        let u = SipUri::parse(
            "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com",
        )
        .unwrap();
        assert_eq!(u.host, Host::Name("example.com".into()));
        assert_eq!(u.headers, "");
        let h = SipUri::parse("sip:user@example.com?Route=%3Csip:example.com%3E").unwrap();
        assert_eq!(h.headers, "?Route=%3Csip:example.com%3E");
    }

    #[test]
    fn ipv6_references() {
        // rsip gap: rsip::Uri::try_from fails on every bracketed IPv6 host.
        for s in [
            "sip:bob@[2001:db8::20]:5061;transport=tls",
            "sip:[2001:db8::1]",
        ] {
            assert!(
                rsip::Uri::try_from(s).is_err(),
                "rsip now parses {s}: drop the workaround?"
            );
            let u = SipUri::parse(s).unwrap();
            assert!(matches!(u.host, Host::Ip(IpAddr::V6(_))));
            assert_eq!(u.to_string(), s);
        }
        let u = SipUri::parse("sip:bob@[2001:db8::20]:5061").unwrap();
        assert_eq!(u.port, Some(5061));
        for bad in ["sip:[2001:db8::1", "sip:[zz::1]:5060", "sip:[192.0.2.1]"] {
            assert!(
                matches!(SipUri::parse(bad), Err(UriError::BadIpv6 { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn user_parameters_stay_in_the_user_part() {
        let s = "sip:user;par=u%40example.net@example.com";
        // rsip gap: it reads the host as "user".
        let r = rsip::Uri::try_from(s).unwrap();
        assert_eq!(r.host_with_port.host.to_string(), "user");
        let u = SipUri::parse(s).unwrap();
        assert_eq!(u.userinfo.as_deref(), Some("user;par=u%40example.net"));
        assert_eq!(u.host, Host::Name("example.com".into()));
        assert_eq!(u.params, "");
    }

    #[test]
    fn errors() {
        assert!(matches!(
            SipUri::parse("bob"),
            Err(UriError::NoScheme { .. })
        ));
        // rsip gap: tel: fails in rsip too ("number too large"); we say why.
        assert!(rsip::Uri::try_from("tel:+15551234").is_err());
        assert!(matches!(
            SipUri::parse("tel:+15551234"),
            Err(UriError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            SipUri::parse("sip:a@b:99999"),
            Err(UriError::BadPort { .. })
        ));
        assert!(matches!(
            SipUri::parse("sip:a@b:"),
            Err(UriError::BadPort { .. })
        ));
        assert!(matches!(
            SipUri::parse("sip:a@"),
            Err(UriError::BadHost { .. })
        ));
        assert!(matches!(
            SipUri::parse("sip:a@b_c"),
            Err(UriError::BadHost { .. })
        ));
    }

    #[test]
    fn agrees_with_rsip_where_rsip_works() {
        for s in [
            "sip:alice@192.0.2.1:5061",
            "sips:bob@biloxi.example.com",
            "sip:%61lice@atlanta.example.com;transport=TLS",
            "sip:cal%6Cer@192.0.2.5:5061;%6C%72=;transport=tls",
            "sip:ss1.atlanta.example.com;lr",
            "sip:192.0.2.7",
        ] {
            let r = rsip::Uri::try_from(s).unwrap();
            let u = SipUri::parse(s).unwrap();
            assert_eq!(u.host.to_string(), r.host_with_port.host.to_string(), "{s}");
            assert_eq!(u.port, r.host_with_port.port.map(|p| *p.value()), "{s}");
            assert_eq!(u.userinfo, r.auth.map(|a| a.user), "{s}");
        }
    }

    #[test]
    fn host_display_and_parse() {
        assert_eq!(
            Host::parse("2001:db8::1").unwrap().to_string(),
            "[2001:db8::1]"
        );
        assert_eq!(Host::parse("[2001:db8::1]"), Host::parse("2001:db8::1"));
        assert_eq!(
            Host::parse("192.0.2.1"),
            Some(Host::Ip("192.0.2.1".parse().unwrap()))
        );
        assert_eq!(Host::parse(""), None);
        assert_eq!(Host::parse("-x"), None);
    }
}
