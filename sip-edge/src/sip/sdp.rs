//! SDP parse and rewrite (RFC 8866/4566): reads the body of an offer or
//! answer taken from a `sip::message::Message`, lists its media flows
//! ([`MediaFlow`]) for the pinhole manager, and rewrites the addresses and
//! ports NAT breaks (`c=`, `o=`, `m=`, `a=rtcp`, `a=candidate`, MSRP
//! `a=path`) to the ones a [`PortAllocator`] picks, so the body can be put
//! back into the message.
//!
//! Hand-written (no SDP crate we know keeps unknown lines and line ends
//! byte-for-byte, which a middlebox must): every line we do not rewrite is
//! copied as received, including its own line end (CRLF or LF).
//!
//! Rules followed:
//! - Media-level `c=` overrides session-level `c=` (RFC 8866 §5.7); when a
//!   rewritten stream needs a different address from the session one, a
//!   media-level `c=` is inserted after `m=`/`i=` (the §5 order).
//! - RTCP goes to RTP port + 1 unless `a=rtcp` says otherwise (RFC 3605)
//!   or `a=rtcp-mux` puts it on the RTP port (RFC 5761/8035).
//! - Port 0 (RFC 3264 §6), `a=inactive`, and multicast connections get no
//!   pinhole and no allocation; their addresses are still hidden behind the
//!   edge address so no private address leaks.
//! - TCP media (`TCP`, `TCP/MSRP`, `TCP/TLS/...`) report the RFC 4145
//!   `a=setup`/`a=connection` values; for MSRP (RFC 4975/5547) the first
//!   `a=path` URI (the one the peer connects to) gets the new host:port.
//!   Receivers that check To-Path strictly need RFC 6714 (CEMA) for this to
//!   work; that is the peer's side of the story.
//! - ICE (RFC 8839): a [`CandidatePolicy`] decides what happens to host
//!   candidates with private addresses (and mDNS `.local` names); in the
//!   non-`Keep` policies server-reflexive, peer-reflexive and relayed
//!   candidates with a private address are dropped, and the
//!   `raddr`/`rport` of other candidates are
//!   scrubbed to `0.0.0.0`/`::` port 9 as RFC 8839 §5.1 allows, so the
//!   private address does not leak. A non-host candidate naming the
//!   stream's new address (the edge itself: the peer-reflexive candidate a
//!   phone learns from checks that went through the relay) is dropped
//!   too; the replaced host candidate already stands for that path.
//! - `a=remote-candidates` (RFC 8839 §5.2, sent once ICE completed) names
//!   the receiver's own candidates as the sender saw them, which behind
//!   the edge are the edge's: in the non-`Keep` policies each one is
//!   replaced by the receiver's own media endpoint for that component
//!   ([`Sdp::rewrite_ice`]), and the attribute is dropped when one of them
//!   is not known: a receiver must never be told to pair with an address
//!   it does not have (RFC 5245 §9.1.3 lists the controlling agent's
//!   remote candidates of the selected pairs, which here are edge ports).
//! - `o=` keeps user, session id and version (we rewrite deterministically
//!   from the client's SDP; a changing allocation across re-offers with the
//!   same version is the allocator's concern).
//! - `m=` port counts (`49170/2`) keep their count; only the base port is
//!   allocated.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::sip::uri::Host;

/// Why an SDP body cannot be handled (the proxy answers 488 or 500).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    /// A line we must understand does not follow its grammar.
    #[error("SDP line {line_no} ({what}) is malformed: {line:?}")]
    BadLine {
        /// 1-based line number.
        line_no: usize,
        /// Which kind of line.
        what: &'static str,
        /// The line (truncated).
        line: String,
    },
    /// A stream that needs a pinhole has no connection address.
    #[error("media stream {index} has no c= line at media or session level")]
    MissingConnection {
        /// m-line index (0-based).
        index: usize,
    },
    /// A transport protocol we cannot classify as UDP or TCP.
    #[error("media stream {index} uses unsupported transport {proto:?}")]
    UnsupportedProto {
        /// m-line index (0-based).
        index: usize,
        /// The proto field.
        proto: String,
    },
    /// The allocator had no port for a stream.
    #[error("no media port available for stream {index}; raise the media port range or the pinhole caps")]
    PortsExhausted {
        /// m-line index (0-based).
        index: usize,
    },
    /// More m-lines than [`MAX_MEDIA_LINES`].
    #[error("{count} media streams in one session description; the edge takes at most {limit}")]
    TooManyStreams {
        /// m-lines in the body.
        count: usize,
        /// [`MAX_MEDIA_LINES`].
        limit: usize,
    },
    /// No edge address is configured for a family the SDP uses.
    #[error("no edge {family} address configured to hide stream {index}'s address")]
    NoEdgeAddress {
        /// m-line index (0-based), or `usize::MAX` for session-level lines.
        index: usize,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
}

/// Most m-lines one body may carry. Every stream may cost the edge a port
/// pair and a pinhole pair, and the body limit (64 kB) alone lets an
/// offer name thousands; real sessions carry a handful (audio, video,
/// content, BFCP, MSRP), and WebRTC's dozens of unified-plan m-lines
/// share one BUNDLE transport.
pub const MAX_MEDIA_LINES: usize = 64;

fn cut(s: &[u8]) -> String {
    String::from_utf8_lossy(s.get(..96).unwrap_or(s)).into_owned()
}

/// Transport of a media flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// RTP/AVP, UDP/TLS/RTP/SAVPF, udptl, ...
    Udp,
    /// TCP, TCP/MSRP, TCP/TLS/RTP/AVP, ...
    Tcp,
}

/// `a=sendrecv|sendonly|recvonly|inactive` in force for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Default (RFC 8866 §6.7).
    SendRecv,
    /// `a=sendonly`.
    SendOnly,
    /// `a=recvonly`.
    RecvOnly,
    /// `a=inactive`.
    Inactive,
}

/// An address as SDP carries it: a literal or a host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Address or FQDN.
    pub host: Host,
    /// Port.
    pub port: u16,
}

/// Why a stream gets no pinhole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPinhole {
    /// Port 0: rejected or disabled stream (RFC 3264 §6).
    PortZero,
    /// `a=inactive`.
    Inactive,
    /// Multicast connection address.
    Multicast,
}

/// One media stream, as the pinhole manager needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaFlow {
    /// m-line index (0-based).
    pub index: usize,
    /// Media type (`audio`, `video`, `message`, `application`, `image`...).
    pub kind: String,
    /// UDP or TCP.
    pub proto: Proto,
    /// The proto field as written (`RTP/AVP`, `TCP/MSRP`...).
    pub proto_text: String,
    /// Where the stream's RTP (or TCP/MSRP) goes, as offered/answered.
    pub rtp: Option<Endpoint>,
    /// Where RTCP goes; `None` for non-RTP protos and with `a=rtcp-mux`.
    pub rtcp: Option<Endpoint>,
    /// `a=rtcp-mux` present.
    pub rtcp_mux: bool,
    /// Direction in force (media level overrides session level).
    pub direction: Direction,
    /// RFC 4145 `a=setup` value, if any.
    pub setup: Option<String>,
    /// RFC 4145 `a=connection` value, if any.
    pub connection: Option<String>,
    /// The first MSRP `a=path` URI as received.
    pub msrp_path: Option<String>,
    /// Why there is no pinhole, if there is none.
    pub no_pinhole: Option<NoPinhole>,
    /// Replacement RTP address (after [`Sdp::rewrite`]).
    pub new_rtp: Option<SocketAddr>,
    /// Replacement RTCP address (after [`Sdp::rewrite`]).
    pub new_rtcp: Option<SocketAddr>,
}

/// What the allocator is asked for one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRequest<'a> {
    /// The flow as parsed.
    pub flow: &'a MediaFlow,
    /// Whether a separate RTCP port is needed.
    pub needs_rtcp: bool,
}

/// The allocator's answer for one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Address written into the SDP for this stream.
    pub addr: IpAddr,
    /// Port for RTP / the TCP stream.
    pub port: u16,
    /// RTCP port; `None` means `port + 1` when RTCP is needed.
    pub rtcp_port: Option<u16>,
}

/// Decides replacement addresses and ports (relay: edge ports on this
/// leg's side; nat: public address + port mapped to the client).
pub trait PortAllocator {
    /// Allocates for a flow that needs a pinhole; `None` when exhausted.
    fn allocate(&mut self, req: &FlowRequest<'_>) -> Option<Allocation>;
}

impl<F: FnMut(&FlowRequest<'_>) -> Option<Allocation>> PortAllocator for F {
    fn allocate(&mut self, req: &FlowRequest<'_>) -> Option<Allocation> {
        self(req)
    }
}

/// What to do with ICE candidates (RFC 8839).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidatePolicy {
    /// Leave every candidate alone.
    Keep,
    /// Drop host candidates with private addresses or `.local` names, or
    /// naming another address than the stream's new one (the party's own,
    /// where the edge relays), and other candidates with private addresses.
    RemovePrivateHost,
    /// Replace the first such host candidate per component with the
    /// stream's new address:port (so the default destination is also a
    /// candidate, no ice-mismatch), drop the other ones and private
    /// candidates of any type.
    ReplacePrivateHost,
    /// Drop every candidate (ICE off through the edge).
    RemoveAll,
}

/// Leg-wide rewrite settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RewritePolicy {
    /// Candidate handling.
    pub candidates: CandidatePolicy,
    /// Edge IPv4 address on this leg, for lines not tied to an allocation.
    pub edge_v4: Option<Ipv4Addr>,
    /// Edge IPv6 address on this leg.
    pub edge_v6: Option<Ipv6Addr>,
}

/// Result of [`Sdp::rewrite`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The rewritten body.
    pub sdp: Vec<u8>,
    /// Every m-line's flow with old and new addresses.
    pub flows: Vec<MediaFlow>,
}

/// One line: where its text lies in the body (issue #12: a copy of every
/// line was one allocation per line per SDP).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    start: usize,
    end: usize,
    eol: &'static [u8],
}

impl Line {
    /// The line's text without its line end, in `body`.
    fn text<'a>(&self, body: &'a [u8]) -> &'a [u8] {
        body.get(self.start..self.end).unwrap_or_default()
    }
}

/// A parsed SDP body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sdp {
    /// The body the lines index.
    body: Vec<u8>,
    lines: Vec<Line>,
    /// Line index of each m= line.
    media_starts: Vec<usize>,
    flows: Vec<MediaFlow>,
}

/// True for addresses that must not leave the inside: RFC 1918, CGNAT
/// (RFC 6598), loopback, link-local, unspecified, ULA (RFC 4193), also
/// written as IPv4-mapped IPv6 (`::ffff:10.0.0.1` is the same host).
pub fn is_private(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

fn is_multicast(h: &Host) -> bool {
    h.ip().is_some_and(|ip| ip.is_multicast())
}

fn fields(line: &[u8]) -> Vec<&str> {
    std::str::from_utf8(line).map_or_else(|_| Vec::new(), |s| s.split_ascii_whitespace().collect())
}

/// `c=IN IP4 addr[/ttl[/n]]` → (host, suffix).
fn parse_c(value: &[u8]) -> Option<(Host, String)> {
    let f = fields(value);
    let [net, _atype, addr] = f.as_slice() else {
        return None;
    };
    if *net != "IN" {
        return None;
    }
    let (a, suffix) = addr.find('/').map_or((*addr, ""), |i| addr.split_at(i));
    Some((Host::parse(a)?, suffix.to_owned()))
}

fn addr_type(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IP4",
        IpAddr::V6(_) => "IP6",
    }
}

/// The SDP form of an address: IPv6 without brackets.
fn sdp_addr(ip: IpAddr) -> String {
    ip.to_string()
}

/// `msrp://host:port/session;tcp` → (prefix "msrp://", host, port, rest).
fn parse_msrp_uri(uri: &str) -> Option<(&str, Host, u16, &str)> {
    let scheme_end = uri.find("://")? + 3;
    let (scheme, rest) = uri.split_at(scheme_end);
    let auth_end = rest.find('/').unwrap_or(rest.len());
    let (auth, tail) = rest.split_at(auth_end);
    let auth = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
    let (host, port) = crate::sip::uri::parse_hostport(auth, uri).ok()?;
    Some((scheme, host, port?, tail))
}

/// The address of an MSRP URI (`msrp://10.0.0.1:2855/s;tcp`), when its
/// host is an IP literal.
pub fn msrp_path_addr(uri: &str) -> Option<SocketAddr> {
    let (_, host, port, _) = parse_msrp_uri(uri)?;
    host.ip().map(|ip| SocketAddr::new(ip, port))
}

impl Sdp {
    /// Parses a body; the flows are available from [`Sdp::flows`].
    pub fn parse(body: &[u8]) -> Result<Sdp, SdpError> {
        let mut lines = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            let (text, eol, next): (&[u8], &'static [u8], &[u8]) = match memchr::memchr(b'\n', rest)
            {
                Some(i) if i > 0 && rest[i - 1] == b'\r' => {
                    (&rest[..i - 1], b"\r\n", &rest[i + 1..])
                }
                Some(i) => (&rest[..i], b"\n", &rest[i + 1..]),
                None => (rest, b"", &[]),
            };
            let start = body.len() - rest.len();
            lines.push(Line {
                start,
                end: start + text.len(),
                eol,
            });
            rest = next;
        }
        let media_starts: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.text(body).starts_with(b"m="))
            .map(|(i, _)| i)
            .collect();
        if media_starts.len() > MAX_MEDIA_LINES {
            return Err(SdpError::TooManyStreams {
                count: media_starts.len(),
                limit: MAX_MEDIA_LINES,
            });
        }
        let session_end = media_starts.first().copied().unwrap_or(lines.len());
        let bad = |i: usize, what, l: &Line| SdpError::BadLine {
            line_no: i + 1,
            what,
            line: cut(l.text(body)),
        };
        let mut session_c = None;
        let mut session_dir = Direction::SendRecv;
        for (i, l) in lines.iter().enumerate().take(session_end) {
            if let Some(v) = l.text(body).strip_prefix(b"c=") {
                session_c = Some(parse_c(v).ok_or_else(|| bad(i, "c=", l))?.0);
            }
            if let Some(d) = direction_of(l.text(body)) {
                session_dir = d;
            }
        }
        let mut flows = Vec::new();
        for (index, &start) in media_starts.iter().enumerate() {
            let end = media_starts.get(index + 1).copied().unwrap_or(lines.len());
            let m = &lines[start];
            let f = fields(&m.text(body)[2..]);
            let [kind, port, proto, ..] = f.as_slice() else {
                return Err(bad(start, "m=", m));
            };
            let port: u16 = port
                .split('/')
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| bad(start, "m= port", m))?;
            let up = proto.to_ascii_uppercase();
            let is_rtp = up.contains("RTP");
            let proto_kind = if up.starts_with("TCP") {
                Proto::Tcp
            } else if up.starts_with("RTP/")
                || up.starts_with("UDP")
                || up == "UDPTL"
                || up.starts_with("DTLS/")
            {
                Proto::Udp
            } else {
                return Err(SdpError::UnsupportedProto {
                    index,
                    proto: (*proto).to_owned(),
                });
            };
            let mut c = None;
            let mut dir = session_dir;
            let (mut rtcp_attr, mut mux, mut setup, mut connection, mut path) =
                (None, false, None, None, None);
            for (i, l) in lines.iter().enumerate().take(end).skip(start + 1) {
                let t = l.text(body);
                if let Some(v) = t.strip_prefix(b"c=") {
                    c = Some(parse_c(v).ok_or_else(|| bad(i, "c=", l))?.0);
                } else if let Some(v) = t.strip_prefix(b"a=rtcp:") {
                    let f = fields(v);
                    let p: u16 = f
                        .first()
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(|| bad(i, "a=rtcp", l))?;
                    let h = match f.as_slice() {
                        [_] => None,
                        [_, "IN", _, a] => Some(Host::parse(a).ok_or_else(|| bad(i, "a=rtcp", l))?),
                        _ => return Err(bad(i, "a=rtcp", l)),
                    };
                    rtcp_attr = Some((p, h));
                } else if t == &b"a=rtcp-mux"[..] {
                    mux = true;
                } else if let Some(v) = t.strip_prefix(b"a=setup:") {
                    setup = Some(String::from_utf8_lossy(v).trim().to_owned());
                } else if let Some(v) = t.strip_prefix(b"a=connection:") {
                    connection = Some(String::from_utf8_lossy(v).trim().to_owned());
                } else if let Some(v) = t.strip_prefix(b"a=path:") {
                    if path.is_none() {
                        let first = fields(v)
                            .first()
                            .map(|s| (*s).to_owned())
                            .ok_or_else(|| bad(i, "a=path", l))?;
                        parse_msrp_uri(&first).ok_or_else(|| bad(i, "a=path", l))?;
                        path = Some(first);
                    }
                } else if let Some(d) = direction_of(t) {
                    dir = d;
                }
            }
            let host = c.or_else(|| session_c.clone());
            let no_pinhole = if port == 0 {
                Some(NoPinhole::PortZero)
            } else if dir == Direction::Inactive {
                Some(NoPinhole::Inactive)
            } else if host.as_ref().is_some_and(is_multicast) {
                Some(NoPinhole::Multicast)
            } else {
                None
            };
            if no_pinhole.is_none() && host.is_none() {
                return Err(SdpError::MissingConnection { index });
            }
            let rtp = host.clone().map(|host| Endpoint { host, port });
            let rtcp = match (&host, is_rtp && !mux) {
                (Some(h), true) => {
                    let (p, a) = rtcp_attr
                        .clone()
                        .map_or((port.checked_add(1), None), |(p, a)| (Some(p), a));
                    p.map(|port| Endpoint {
                        host: a.unwrap_or_else(|| h.clone()),
                        port,
                    })
                }
                _ => None,
            };
            flows.push(MediaFlow {
                index,
                kind: (*kind).to_owned(),
                proto: proto_kind,
                proto_text: (*proto).to_owned(),
                rtp,
                rtcp,
                rtcp_mux: mux,
                direction: dir,
                setup,
                connection,
                msrp_path: path,
                no_pinhole,
                new_rtp: None,
                new_rtcp: None,
            });
        }
        Ok(Sdp {
            body: body.to_vec(),
            lines,
            media_starts,
            flows,
        })
    }

    /// The media flows as received.
    pub fn flows(&self) -> &[MediaFlow] {
        &self.flows
    }

    /// The address and port of every ICE candidate (RFC 8839 §5.1) written
    /// as an IP literal, with the index of its m-line. FQDN (mDNS)
    /// candidates name no address and are left out; a malformed line is
    /// the rewrite's business (it refuses the body; port 0 stands in for
    /// an unreadable port here).
    pub fn candidate_addrs(&self) -> Vec<(usize, SocketAddr)> {
        let mut out = Vec::new();
        for (k, &start) in self.media_starts.iter().enumerate() {
            let end = self
                .media_starts
                .get(k + 1)
                .copied()
                .unwrap_or(self.lines.len());
            for l in self.lines.get(start..end).unwrap_or_default() {
                if let Some(v) = l.text(&self.body).strip_prefix(b"a=candidate:") {
                    let f = fields(v);
                    if let Some(ip) = f.get(4).and_then(|a| a.parse::<IpAddr>().ok()) {
                        let port = f.get(5).and_then(|p| p.parse().ok()).unwrap_or(0);
                        out.push((k, SocketAddr::new(ip, port)));
                    }
                }
            }
        }
        out
    }

    /// The body as parsed (byte-identical to the input).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for l in &self.lines {
            out.extend_from_slice(l.text(&self.body));
            out.extend_from_slice(l.eol);
        }
        out
    }

    /// Rewrites every address/port the far side would use, asking `alloc`
    /// for each stream that needs a pinhole. `a=remote-candidates` is
    /// dropped unless the policy is `Keep` (see [`Sdp::rewrite_ice`]).
    pub fn rewrite(
        &self,
        policy: &RewritePolicy,
        alloc: &mut impl PortAllocator,
    ) -> Result<Rewritten, SdpError> {
        self.rewrite_ice(policy, alloc, &[])
    }

    /// [`Sdp::rewrite`], with `own[k]`: the receiver's own media endpoints
    /// of stream `k` (component 1, component 2) as the edge sends to them,
    /// which replace the edge ports `a=remote-candidates` names.
    pub fn rewrite_ice(
        &self,
        policy: &RewritePolicy,
        alloc: &mut impl PortAllocator,
        own: &[[Option<SocketAddr>; 2]],
    ) -> Result<Rewritten, SdpError> {
        let edge_for = |index: usize, orig: Option<&Host>| -> Result<IpAddr, SdpError> {
            let want_v6 = matches!(orig.and_then(Host::ip), Some(IpAddr::V6(_)));
            let (first, second) = if want_v6 {
                (
                    policy.edge_v6.map(IpAddr::V6),
                    policy.edge_v4.map(IpAddr::V4),
                )
            } else {
                (
                    policy.edge_v4.map(IpAddr::V4),
                    policy.edge_v6.map(IpAddr::V6),
                )
            };
            first.or(second).ok_or(SdpError::NoEdgeAddress {
                index,
                family: if want_v6 { "IPv6" } else { "IPv4" },
            })
        };
        let mut flows = self.flows.clone();
        // Per stream: new address, new rtp port, new rtcp port.
        let mut plan: Vec<(IpAddr, Option<u16>, Option<u16>)> = Vec::with_capacity(flows.len());
        // Per stream: the RTCP port a mux offer keeps in case mux is
        // declined (named in a=rtcp when it is not RTP + 1).
        let mut mux_rtcp: Vec<Option<u16>> = Vec::with_capacity(flows.len());
        for flow in &mut flows {
            let needs_rtcp = flow.rtcp.is_some();
            if flow.no_pinhole.is_some() {
                let addr = edge_for(flow.index, flow.rtp.as_ref().map(|e| &e.host))?;
                plan.push((addr, None, None));
                mux_rtcp.push(None);
                continue;
            }
            let a = alloc
                .allocate(&FlowRequest { flow, needs_rtcp })
                .ok_or(SdpError::PortsExhausted { index: flow.index })?;
            let rtcp_port = if needs_rtcp {
                Some(a.rtcp_port.unwrap_or_else(|| a.port.saturating_add(1)))
            } else {
                None
            };
            flow.new_rtp = Some(SocketAddr::new(a.addr, a.port));
            flow.new_rtcp = rtcp_port.map(|p| SocketAddr::new(a.addr, p));
            plan.push((a.addr, Some(a.port), rtcp_port));
            mux_rtcp.push(a.rtcp_port.filter(|_| flow.rtcp_mux && !needs_rtcp));
        }
        let session_end = self
            .media_starts
            .first()
            .copied()
            .unwrap_or(self.lines.len());
        let session_c_line = self.lines[..session_end]
            .iter()
            .position(|l| l.text(&self.body).starts_with(b"c="));
        let session_c_host = session_c_line
            .and_then(|i| self.lines.get(i))
            .and_then(|l| parse_c(&l.text(&self.body)[2..]));
        // The session-level address: that of the first stream relying on it.
        let relies_on_session = |k: usize| -> bool {
            let start = self.media_starts[k];
            let end = self
                .media_starts
                .get(k + 1)
                .copied()
                .unwrap_or(self.lines.len());
            !self.lines[start + 1..end]
                .iter()
                .any(|l| l.text(&self.body).starts_with(b"c="))
        };
        let session_addr = match (0..flows.len()).find(|&k| relies_on_session(k)) {
            Some(k) => plan[k].0,
            None => edge_for(usize::MAX, session_c_host.as_ref().map(|(h, _)| h))?,
        };
        let session_multicast = session_c_host
            .as_ref()
            .is_some_and(|(h, _)| is_multicast(h));

        // The output is written into one buffer: unchanged lines are copied
        // into it, not cloned one allocation each (issue #12).
        let mut sdp: Vec<u8> = Vec::with_capacity(
            self.lines
                .iter()
                .map(|l| l.text(&self.body).len() + 2)
                .sum::<usize>()
                + 64,
        );
        let emit = |sdp: &mut Vec<u8>, text: &[u8], eol: &[u8]| {
            sdp.extend_from_slice(text);
            sdp.extend_from_slice(eol);
        };
        for (i, l) in self.lines[..session_end].iter().enumerate() {
            let t = l.text(&self.body);
            let new = if t.starts_with(b"o=") {
                let f = fields(&t[2..]);
                match f.as_slice() {
                    [user, id, ver, "IN", _, _] => Some(format!(
                        "o={user} {id} {ver} IN {} {}",
                        addr_type(session_addr),
                        sdp_addr(session_addr)
                    )),
                    _ => {
                        return Err(SdpError::BadLine {
                            line_no: i + 1,
                            what: "o=",
                            line: cut(t),
                        })
                    }
                }
            } else if t.starts_with(b"c=") && !session_multicast {
                Some(format!(
                    "c=IN {} {}",
                    addr_type(session_addr),
                    sdp_addr(session_addr)
                ))
            } else {
                None
            };
            emit(
                &mut sdp,
                new.as_ref().map_or(l.text(&self.body), |s| s.as_bytes()),
                l.eol,
            );
        }
        for (k, &start) in self.media_starts.iter().enumerate() {
            let end = self
                .media_starts
                .get(k + 1)
                .copied()
                .unwrap_or(self.lines.len());
            let (addr, rtp_port, rtcp_port) = plan[k];
            let flow = &flows[k];
            let multicast = flow.no_pinhole == Some(NoPinhole::Multicast);
            let eol = self.lines[start].eol;
            let mut seen_candidate: [bool; 2] = [false, false];
            let mut media_c_needed = relies_on_session(k) && addr != session_addr && !multicast;
            let mut saw_rtcp = false;
            for (i, l) in self.lines[start..end].iter().enumerate() {
                let t = l.text(&self.body);
                let line_no = start + i + 1;
                let bad = |what| SdpError::BadLine {
                    line_no,
                    what,
                    line: cut(t),
                };
                let mut new: Option<String> = None;
                let mut drop = false;
                if i == 0 {
                    if let Some(p) = rtp_port {
                        let f = fields(&t[2..]);
                        let count = f
                            .get(1)
                            .and_then(|p| p.split_once('/'))
                            .map(|(_, n)| format!("/{n}"))
                            .unwrap_or_default();
                        let mut parts: Vec<String> = f.iter().map(|s| (*s).to_owned()).collect();
                        if let Some(slot) = parts.get_mut(1) {
                            *slot = format!("{p}{count}");
                        }
                        new = Some(format!("m={}", parts.join(" ")));
                    }
                } else if t.starts_with(b"c=") {
                    if !multicast {
                        new = Some(format!("c=IN {} {}", addr_type(addr), sdp_addr(addr)));
                    }
                } else if let Some(v) = t.strip_prefix(b"a=rtcp:") {
                    saw_rtcp = true;
                    let f = fields(v);
                    let orig: u16 = f
                        .first()
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(|| bad("a=rtcp"))?;
                    // With rtcp-mux a=rtcp repeats the RTP port (RFC 5761 §5.1.3).
                    let mux_echo = flow.rtcp_mux && Some(orig) == flow.rtp.as_ref().map(|e| e.port);
                    let port = if mux_echo {
                        rtp_port
                    } else {
                        rtcp_port.or(rtp_port)
                    };
                    if let Some(p) = port {
                        new = Some(if f.len() > 1 {
                            format!("a=rtcp:{p} IN {} {}", addr_type(addr), sdp_addr(addr))
                        } else {
                            format!("a=rtcp:{p}")
                        });
                    } else if f.len() > 1
                        && !(multicast
                            && f.get(3)
                                .and_then(|a| a.parse::<IpAddr>().ok())
                                .is_some_and(|a| a.is_multicast()))
                    {
                        // A unicast RTCP address names a host even on a
                        // multicast stream (RFC 3605 §2.1): hide it.
                        new = Some(format!(
                            "a=rtcp:{orig} IN {} {}",
                            addr_type(addr),
                            sdp_addr(addr)
                        ));
                    }
                } else if let Some(v) = t.strip_prefix(b"a=candidate:") {
                    match candidate(
                        v,
                        policy.candidates,
                        &mut seen_candidate,
                        addr,
                        rtp_port,
                        rtcp_port.or(rtp_port),
                    ) {
                        Some(CandidateAction::Keep) => {}
                        Some(CandidateAction::Drop) => drop = true,
                        Some(CandidateAction::Replace(s)) => new = Some(format!("a=candidate:{s}")),
                        None => return Err(bad("a=candidate")),
                    }
                } else if let Some(v) = t.strip_prefix(b"a=remote-candidates:") {
                    if policy.candidates != CandidatePolicy::Keep {
                        match remote_candidates(v, own.get(k)) {
                            Some(s) => new = Some(format!("a=remote-candidates:{s}")),
                            None => drop = true,
                        }
                    }
                } else if let Some(v) = t.strip_prefix(b"a=path:") {
                    // A stream without a pinhole (port 0, inactive) keeps
                    // its port but still names the edge: its path is the
                    // party's own address, which must not cross the edge
                    // any more than a live stream's (like `a=rtcp` above).
                    if !multicast {
                        let s = std::str::from_utf8(v).map_err(|_| bad("a=path"))?;
                        let mut uris: Vec<String> =
                            s.split_ascii_whitespace().map(str::to_owned).collect();
                        if let Some(first) = uris.first_mut() {
                            let (scheme, _, orig, tail) =
                                parse_msrp_uri(first).ok_or_else(|| bad("a=path"))?;
                            let p = rtp_port.unwrap_or(orig);
                            *first = format!("{scheme}{}{tail}", SocketAddr::new(addr, p));
                        }
                        new = Some(format!("a=path:{}", uris.join(" ")));
                    }
                }
                if !drop {
                    emit(
                        &mut sdp,
                        new.as_ref().map_or(l.text(&self.body), |s| s.as_bytes()),
                        l.eol,
                    );
                }
                // Insert a media-level c= after m= (and i=, if next).
                let next_is_info = self
                    .lines
                    .get(start + i + 1)
                    .is_some_and(|n| n.text(&self.body).starts_with(b"i="))
                    && start + i + 1 < end;
                if media_c_needed && !next_is_info {
                    let c = format!("c=IN {} {}", addr_type(addr), sdp_addr(addr));
                    emit(&mut sdp, c.as_bytes(), eol);
                    media_c_needed = false;
                }
            }
            // An edge RTCP port other than RTP + 1 (the pool's fallback)
            // must be named, or the far end sends RTCP to RTP + 1 (RFC 3605
            // §2.1).
            let named = rtcp_port.or(mux_rtcp.get(k).copied().flatten());
            if let (false, Some(p), Some(r)) = (saw_rtcp, named, rtp_port) {
                if r.checked_add(1) != Some(p) {
                    emit(&mut sdp, format!("a=rtcp:{p}").as_bytes(), eol);
                }
            }
        }
        Ok(Rewritten { sdp, flows })
    }
}

fn direction_of(line: &[u8]) -> Option<Direction> {
    match line {
        b"a=sendrecv" => Some(Direction::SendRecv),
        b"a=sendonly" => Some(Direction::SendOnly),
        b"a=recvonly" => Some(Direction::RecvOnly),
        b"a=inactive" => Some(Direction::Inactive),
        _ => None,
    }
}

enum CandidateAction {
    Keep,
    Drop,
    Replace(String),
}

/// RFC 8839 §5.1: `foundation component transport priority address port
/// typ type [raddr a] [rport p] *(ext)`. `None` = malformed.
fn candidate(
    v: &[u8],
    policy: CandidatePolicy,
    seen: &mut [bool; 2],
    addr: IpAddr,
    rtp_port: Option<u16>,
    rtcp_port: Option<u16>,
) -> Option<CandidateAction> {
    let mut f: Vec<String> = fields(v).iter().map(|s| (*s).to_owned()).collect();
    if f.len() < 8 || f[6] != "typ" {
        return None;
    }
    let component: u32 = f[1].parse().ok()?;
    f[5].parse::<u16>().ok()?;
    let host_private = match f[4].parse::<IpAddr>() {
        Ok(ip) => is_private(ip),
        // mDNS names (RFC 8839 §5.1 allows FQDNs; browsers use .local).
        Err(_) => true,
    };
    match policy {
        CandidatePolicy::Keep => return Some(CandidateAction::Keep),
        CandidatePolicy::RemoveAll => return Some(CandidateAction::Drop),
        CandidatePolicy::RemovePrivateHost | CandidatePolicy::ReplacePrivateHost => {}
    }
    if f[7] == "host" {
        // A public host candidate other than the stream's new address is
        // the party's own address where the edge put itself in between
        // (relay mode): left alone it is a default destination that no
        // candidate matches (RFC 8445 §5.4 ice-mismatch, which ICE-only
        // clients such as baresip's `ice` module answer by giving up on
        // the call's media), and a path around the edge's pinholes. It
        // goes the way of a private one.
        let moved = f[4].parse::<IpAddr>().is_ok_and(|ip| ip != addr);
        if !host_private && !moved {
            return Some(CandidateAction::Keep);
        }
        if policy == CandidatePolicy::RemovePrivateHost {
            return Some(CandidateAction::Drop);
        }
        let (slot, port) = match component {
            1 => (0, rtp_port),
            2 => (1, rtcp_port),
            _ => return Some(CandidateAction::Drop),
        };
        let Some(port) = port else {
            return Some(CandidateAction::Drop);
        };
        if seen[slot] {
            return Some(CandidateAction::Drop);
        }
        seen[slot] = true;
        f[4] = sdp_addr(addr);
        f[5] = port.to_string();
        return Some(CandidateAction::Replace(f.join(" ")));
    }
    // Non-host (srflx, prflx, relay) with a private address of its own: a
    // STUN/TURN server inside, or a double NAT, hands those out (RFC 8445
    // §5.1.1.2); they name the inside as much as a host candidate does, and
    // the edge's own address already stands in for the component.
    if host_private {
        return Some(CandidateAction::Drop);
    }
    // Non-host naming the edge itself: the peer-reflexive candidate a
    // phone learned from checks relayed by the edge (the edge's port as
    // the other phone saw it). The replaced host candidate already names
    // that path; a copy would only be a second, redundant pair.
    if f[4].parse::<IpAddr>().is_ok_and(|ip| ip == addr) {
        return Some(CandidateAction::Drop);
    }
    // Non-host: hide a private related address.
    let mut changed = false;
    let mut i = 8;
    while i + 1 < f.len() {
        if f[i] == "raddr" {
            if let Ok(ip) = f[i + 1].parse::<IpAddr>() {
                if is_private(ip) {
                    f[i + 1] = if ip.is_ipv6() {
                        "::".into()
                    } else {
                        "0.0.0.0".into()
                    };
                    changed = true;
                }
            }
        }
        i += 2;
    }
    if changed {
        let mut i = 8;
        while i + 1 < f.len() {
            if f[i] == "rport" {
                f[i + 1] = "9".into();
            }
            i += 2;
        }
        return Some(CandidateAction::Replace(f.join(" ")));
    }
    Some(CandidateAction::Keep)
}

/// RFC 8839 §5.2: `a=remote-candidates:` then `component address port`
/// triples. Each address becomes the receiver's own endpoint for that
/// component (`own`: component 1, component 2); `None` (drop the
/// attribute) when the line is malformed or a component is unknown.
fn remote_candidates(v: &[u8], own: Option<&[Option<SocketAddr>; 2]>) -> Option<String> {
    let own = own?;
    let f = fields(v);
    if f.is_empty() || !f.len().is_multiple_of(3) {
        return None;
    }
    let mut out = Vec::with_capacity(f.len() / 3);
    for t in f.chunks_exact(3) {
        let component: usize = t[0].parse().ok()?;
        t[2].parse::<u16>().ok()?;
        let ep = (*own.get(component.checked_sub(1)?)?)?;
        out.push(format!("{component} {} {}", sdp_addr(ep.ip()), ep.port()));
    }
    Some(out.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_streams(n: usize) -> Vec<u8> {
        let mut s = String::from(
            "v=0\r\no=- 1 1 IN IP4 198.51.100.2\r\ns=-\r\nc=IN IP4 198.51.100.2\r\nt=0 0\r\n",
        );
        for i in 0..n {
            s.push_str(&format!("m=audio {} RTP/AVP 0\r\n", 20000 + 2 * i));
        }
        s.into_bytes()
    }

    #[test]
    fn more_m_lines_than_the_cap_are_refused_before_anything_is_read() {
        assert_eq!(
            Sdp::parse(&with_streams(MAX_MEDIA_LINES))
                .map(|s| s.flows().len())
                .ok(),
            Some(MAX_MEDIA_LINES)
        );
        assert_eq!(
            Sdp::parse(&with_streams(1000)).err(),
            Some(SdpError::TooManyStreams {
                count: 1000,
                limit: MAX_MEDIA_LINES
            })
        );
    }

    #[test]
    fn candidate_addresses_are_listed_per_stream() {
        let body = b"v=0\r\nc=IN IP4 198.51.100.2\r\nm=audio 5000 RTP/AVP 0\r\na=candidate:1 1 UDP 1 127.0.0.1 5000 typ host\r\na=candidate:2 1 UDP 1 abc.local 5000 typ host\r\nm=video 5002 RTP/AVP 96\r\na=candidate:1 1 UDP 1 ::1 5002 typ host\r\n";
        let sdp = Sdp::parse(body).expect("sdp");
        assert_eq!(
            sdp.candidate_addrs(),
            vec![
                (0, "127.0.0.1:5000".parse().expect("ep")),
                (1, "[::1]:5002".parse().expect("ep"))
            ]
        );
    }
}

#[cfg(test)]
mod ice_tests {
    use super::*;

    fn relay_to(addr: &str, port: u16) -> impl FnMut(&FlowRequest<'_>) -> Option<Allocation> {
        let addr: IpAddr = addr.parse().expect("ip");
        move |_: &FlowRequest<'_>| {
            Some(Allocation {
                addr,
                port,
                rtcp_port: None,
            })
        }
    }

    fn policy(candidates: CandidatePolicy) -> RewritePolicy {
        RewritePolicy {
            candidates,
            edge_v4: Some(Ipv4Addr::new(10, 77, 0, 1)),
            edge_v6: None,
        }
    }

    /// An ICE re-offer from outside after the checks went through the
    /// edge (10.77.0.1:30002 inside, 203.0.113.1:30000 outside).
    const RE_OFFER: &[u8] = b"v=0\r\no=- 1 2 IN IP4 10.77.0.1\r\ns=-\r\nc=IN IP4 10.77.0.1\r\nt=0 0\r\nm=audio 30002 RTP/AVP 0\r\na=candidate:1 1 UDP 2130706431 198.51.100.20 7078 typ host\r\na=candidate:2 1 UDP 1862270975 10.77.0.1 30002 typ prflx\r\na=candidate:3 2 UDP 1862270974 198.51.100.30 7079 typ srflx raddr 198.51.100.20 rport 7079\r\na=remote-candidates:1 203.0.113.1 30000 2 203.0.113.1 30001\r\n";

    fn text(b: &[u8]) -> String {
        String::from_utf8(b.to_vec()).expect("utf-8")
    }

    #[test]
    fn remote_candidates_name_the_receivers_own_endpoints() {
        let sdp = Sdp::parse(RE_OFFER).expect("sdp");
        let own = [[
            Some("10.77.0.2:4000".parse().expect("ep")),
            Some("10.77.0.2:4001".parse().expect("ep")),
        ]];
        let out = text(
            &sdp.rewrite_ice(
                &policy(CandidatePolicy::ReplacePrivateHost),
                &mut relay_to("10.77.0.1", 30002),
                &own,
            )
            .expect("rewrite")
            .sdp,
        );
        assert!(
            out.contains("a=remote-candidates:1 10.77.0.2 4000 2 10.77.0.2 4001\r\n"),
            "{out}"
        );
        // The peer-reflexive candidate naming the edge goes; the replaced
        // host candidate names that path.
        assert!(!out.contains("prflx"), "{out}");
        assert!(
            out.contains("a=candidate:1 1 UDP 2130706431 10.77.0.1 30002 typ host\r\n"),
            "{out}"
        );
        assert!(out.contains("198.51.100.30 7079 typ srflx"), "{out}");
    }

    #[test]
    fn remote_candidates_the_edge_cannot_translate_are_dropped_and_keep_keeps_them() {
        let sdp = Sdp::parse(RE_OFFER).expect("sdp");
        // Unknown receiver (no installed flow), or component 2 unknown.
        for own in [
            Vec::new(),
            vec![[Some("10.77.0.2:4000".parse().expect("ep")), None]],
        ] {
            let out = text(
                &sdp.rewrite_ice(
                    &policy(CandidatePolicy::ReplacePrivateHost),
                    &mut relay_to("10.77.0.1", 30002),
                    &own,
                )
                .expect("rewrite")
                .sdp,
            );
            assert!(!out.contains("remote-candidates"), "{own:?}: {out}");
            assert!(!out.contains("203.0.113.1"), "{own:?}: {out}");
        }
        let out = text(
            &sdp.rewrite(
                &policy(CandidatePolicy::Keep),
                &mut relay_to("10.77.0.1", 30002),
            )
            .expect("rewrite")
            .sdp,
        );
        assert!(
            out.contains("a=remote-candidates:1 203.0.113.1 30000 2 203.0.113.1 30001\r\n"),
            "{out}"
        );
    }

    #[test]
    fn malformed_remote_candidates_are_dropped_not_fatal() {
        let own = [[Some("10.77.0.2:4000".parse().expect("ep")), None]];
        for bad in [
            "1 203.0.113.1",
            "x 203.0.113.1 30000",
            "1 203.0.113.1 99999",
            "0 203.0.113.1 30000",
            "",
        ] {
            let body = format!(
                "v=0\r\nc=IN IP4 198.51.100.20\r\nm=audio 7078 RTP/AVP 0\r\na=remote-candidates:{bad}\r\n"
            );
            let sdp = Sdp::parse(body.as_bytes()).expect("sdp");
            let out = text(
                &sdp.rewrite_ice(
                    &policy(CandidatePolicy::ReplacePrivateHost),
                    &mut relay_to("10.77.0.1", 30002),
                    &own,
                )
                .expect("rewrite")
                .sdp,
            );
            assert!(!out.contains("remote-candidates"), "{bad:?}: {out}");
        }
    }
}
