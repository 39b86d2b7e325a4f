//! SIP message validation and normalisation: turns a framed message (from
//! `sip::framer`, or a datagram) into an owned [`Message`] the proxy reads
//! and edits (headers in order, Via/From/To/Call-ID/CSeq helpers), and
//! serialises it back with a recomputed Content-Length for the TLS writer.
//!
//! rsip is the parser of record where it works; this layer exists because
//! rsip 0.4 rejects valid messages. Gaps worked around here, each with a
//! test that pins rsip's behaviour (so a fixed rsip is noticed):
//! - **Unknown methods** (RFC 3261 §8.2.1 says a proxy forwards them;
//!   RFC 4475 §3.1.1.1): rsip's request-line tokenizer fails on them. We
//!   keep [`Method::Extension`] and use rsip's method table for the known
//!   ones.
//! - **Folded headers and odd whitespace** (RFC 3261 §7.3.1, RFC 4475
//!   §3.1.1.1): we keep our own header list and unfold continuation lines
//!   into one value; [`Message::to_rsip`] hands rsip the unfolded form.
//! - **Bracketed IPv6** in Via sent-by and URIs (RFC 5118): rsip fails;
//!   Via and URIs are parsed by `sip::uri` here.
//! - **Escapes / user parameters** in URIs: see `sip::uri`.
//!
//! Headers are kept as received: an untouched header is written back
//! byte-for-byte (only its line ends become CRLF), so unknown headers and
//! their folding survive; a header the proxy sets is written as
//! `Name: value`.

use std::fmt;

use crate::sip::framer::RawMessage;
use crate::sip::uri::{parse_hostport, Host, SipUri, UriError};

/// Why a message was refused; the proxy answers most with 400 (RFC 3261
/// §16.3, §21.4.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// No empty line ends the head.
    #[error("message head has no terminating empty line")]
    NoHeadEnd,
    /// The start-line is neither a Request-Line nor a Status-Line.
    #[error("bad start-line {line:?}")]
    BadStartLine {
        /// The line (truncated).
        line: String,
    },
    /// A header line without a colon or with an invalid name.
    #[error("bad header line {line_no}: {line:?}")]
    BadHeaderLine {
        /// 1-based line number in the head.
        line_no: usize,
        /// The line (truncated).
        line: String,
    },
    /// Header or start-line bytes that are not UTF-8 (RFC 3261 §7.3.1).
    #[error("line {line_no} of the head is not UTF-8")]
    NotUtf8 {
        /// 1-based line number in the head.
        line_no: usize,
    },
    /// A header the operation needs is missing.
    #[error("missing {name} header")]
    MissingHeader {
        /// Canonical header name.
        name: &'static str,
    },
    /// A header value that does not follow its grammar.
    #[error("malformed {name} header {value:?}: {reason}")]
    BadHeaderValue {
        /// Canonical header name.
        name: &'static str,
        /// The value (truncated).
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A URI inside a header or the Request-Line does not parse.
    #[error("bad URI in {place}: {source}")]
    BadUri {
        /// Where the URI was found.
        place: &'static str,
        /// The URI error.
        source: UriError,
    },
    /// Content-Length disagrees with the body (RFC 3261 §18.3).
    #[error("Content-Length {declared} but the body has {actual} bytes")]
    ContentLengthMismatch {
        /// Declared length.
        declared: usize,
        /// Bytes present.
        actual: usize,
    },
    /// rsip refused the normalised message (see the module docs for the
    /// known gaps).
    #[error("rsip cannot represent this message: {reason}")]
    Rsip {
        /// rsip's own error text (rsip::Error has no std Error impl).
        reason: String,
    },
}

fn cut(s: &str) -> String {
    s.chars().take(96).collect()
}

/// A SIP method: one rsip knows, or an extension the proxy forwards as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// A method rsip 0.4 knows (RFC 3261 and common extensions).
    Known(rsip::Method),
    /// Any other token (RFC 3261 §8.2.1 / RFC 4475 §3.1.1.1).
    Extension(String),
}

impl Method {
    /// Method names are case-sensitive (RFC 3261 §7.1); rsip's table is
    /// used as the list of known ones.
    pub fn parse(s: &str) -> Option<Method> {
        if s.is_empty() || !s.bytes().all(is_token) {
            return None;
        }
        Some(known_methods().iter().find(|(_, n)| n == s).map_or_else(
            || Method::Extension(s.to_owned()),
            |(m, _)| Method::Known(*m),
        ))
    }

    /// The method's name as written on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Known(m) => known_methods()
                .iter()
                .find(|(k, _)| k == m)
                .map_or("", |(_, n)| n.as_str()),
            Method::Extension(s) => s,
        }
    }

    /// Whether this is `name` (e.g. `"INVITE"`).
    pub fn is(&self, name: &str) -> bool {
        self.as_str() == name
    }
}

/// rsip's methods with their names, built once: parsing and comparing a
/// method then allocates nothing (issue #12: `rsip::Method::all()` and a
/// `to_string()` per entry ran for every message).
fn known_methods() -> &'static [(rsip::Method, String)] {
    static KNOWN: std::sync::OnceLock<Vec<(rsip::Method, String)>> = std::sync::OnceLock::new();
    KNOWN.get_or_init(|| {
        rsip::Method::all()
            .into_iter()
            .map(|m| (m, m.to_string()))
            .collect()
    })
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::Known(_) | Method::Extension(_) => f.write_str(self.as_str()),
        }
    }
}

/// RFC 3261 §25.1 `token` characters.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// Request-Line or Status-Line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    /// `Method SP Request-URI SP SIP-Version`.
    Request {
        /// The method.
        method: Method,
        /// Request-URI as received (any scheme; see [`Message::request_uri`]).
        uri: String,
        /// SIP-Version as received (the proxy answers 505 if not 2.0).
        version: String,
    },
    /// `SIP-Version SP Status-Code SP Reason-Phrase`.
    Response {
        /// SIP-Version as received.
        version: String,
        /// Status code 100..=699.
        code: u16,
        /// Reason phrase (may be empty).
        reason: String,
    },
}

impl fmt::Display for StartLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartLine::Request {
                method,
                uri,
                version,
            } => write!(f, "{method} {uri} {version}"),
            StartLine::Response {
                version,
                code,
                reason,
            } => write!(f, "{version} {code} {reason}"),
        }
    }
}

/// Compact forms (RFC 3261 §7.3.3 and the extension RFCs' IANA entries).
const COMPACT: &[(&str, &str)] = &[
    ("a", "Accept-Contact"),
    ("b", "Referred-By"),
    ("c", "Content-Type"),
    ("d", "Request-Disposition"),
    ("e", "Content-Encoding"),
    ("f", "From"),
    ("i", "Call-ID"),
    ("j", "Reject-Contact"),
    ("k", "Supported"),
    ("l", "Content-Length"),
    ("m", "Contact"),
    ("n", "Identity-Info"),
    ("o", "Event"),
    ("r", "Refer-To"),
    ("s", "Subject"),
    ("t", "To"),
    ("u", "Allow-Events"),
    ("v", "Via"),
    ("x", "Session-Expires"),
    ("y", "Identity"),
];

/// Whether header name `a` (as received, maybe compact) means `b`.
pub fn same_header(a: &str, b: &str) -> bool {
    canonical(a).eq_ignore_ascii_case(canonical(b))
}

fn canonical(name: &str) -> &str {
    if name.len() == 1 {
        if let Some((_, long)) = COMPACT.iter().find(|(c, _)| c.eq_ignore_ascii_case(name)) {
            return long;
        }
    }
    name
}

/// One header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Name as received (may be compact, any case).
    pub name: String,
    /// Value with continuation lines unfolded into single spaces and outer
    /// whitespace trimmed (RFC 3261 §7.3.1).
    pub value: String,
    /// How the header is written back (byte-for-byte when received).
    raw: Raw,
}

/// What a header's output is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Raw {
    /// Edited or new: written as `name: value`.
    Edited,
    /// Received as exactly `name: value` on one line: written the same way
    /// without keeping a copy of the line (issue #12: a copy of every
    /// line was an allocation per header per parse and per clone).
    Canonical,
    /// Received otherwise (other spacing, folded): the original line(s)
    /// without their final line end.
    Bytes(Vec<u8>),
}

impl Header {
    /// A new header, written as `name: value`.
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
            raw: Raw::Edited,
        }
    }

    /// Whether this header was received and is unmodified.
    pub fn is_original(&self) -> bool {
        self.raw != Raw::Edited
    }

    fn write(&self, out: &mut Vec<u8>) {
        match &self.raw {
            Raw::Bytes(raw) => out.extend_from_slice(raw),
            Raw::Edited | Raw::Canonical => {
                out.extend_from_slice(self.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(self.value.as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Splits a header value on commas that separate list elements (RFC 3261
/// §7.3.1), ignoring commas inside quotes and `<...>`.
pub fn split_list(value: &str) -> Vec<&str> {
    ListIter::new(value).collect()
}

/// The further elements of a list joined with ", ", `None` if there are
/// none.
fn join_rest<'a>(list: impl Iterator<Item = &'a str>) -> Option<String> {
    let mut rest: Option<String> = None;
    for r in list {
        match &mut rest {
            None => rest = Some(r.to_owned()),
            Some(v) => {
                v.push_str(", ");
                v.push_str(r);
            }
        }
    }
    rest
}

/// How many elements [`split_list`] finds, without collecting them.
pub fn list_len(value: &str) -> usize {
    ListIter::new(value).count()
}

/// How a [`scan_unquoted`] that found nothing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unquoted {
    /// Outside any quoted string.
    Closed,
    /// Inside a quoted string never closed.
    Open,
}

/// Byte index of the first byte of `s` outside a quoted string for which
/// `stop` says yes (`stop` sees every byte outside quotes, in order, so it
/// may keep state of its own, such as `<...>` nesting). RFC 3261 §25.1: a
/// quoted-string may hold any separator, and inside one `\` escapes the
/// next character. Every byte this looks for is ASCII, so a scan by bytes
/// never stops inside a UTF-8 sequence.
///
/// One scan for the three quote-aware splits of header values (list
/// commas, parameter semicolons, the name-addr's `<`), each of which had
/// its own copy of this loop.
fn scan_unquoted(s: &str, mut stop: impl FnMut(u8) -> bool) -> Result<usize, Unquoted> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, &b) in s.as_bytes().iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted {
            match b {
                b'\\' => escaped = true,
                b'"' => quoted = false,
                _ => {}
            }
        } else if b == b'"' {
            quoted = true;
        } else if stop(b) {
            return Ok(i);
        }
    }
    Err(if quoted {
        Unquoted::Open
    } else {
        Unquoted::Closed
    })
}

/// The elements [`split_list`] returns, one at a time without a `Vec`
/// (issue #12: the Via and name-addr accessors split every value they
/// read).
struct ListIter<'a> {
    rest: Option<&'a str>,
}

impl<'a> ListIter<'a> {
    fn new(value: &'a str) -> Self {
        Self { rest: Some(value) }
    }
}

impl<'a> Iterator for ListIter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.rest?;
        // A comma splits only outside quotes and outside `<...>`.
        let mut angle = false;
        let split = scan_unquoted(rest, |b| match b {
            b'<' => {
                angle = true;
                false
            }
            b'>' => {
                angle = false;
                false
            }
            b',' => !angle,
            _ => false,
        });
        match split {
            Ok(i) => {
                self.rest = rest.get(i + 1..);
                Some(rest[..i].trim())
            }
            Err(_) => {
                self.rest = None;
                Some(rest.trim())
            }
        }
    }
}

/// `;name[=value]` parameters with whitespace allowed around `;` and `=`
/// (RFC 4475 §3.1.1.1); quoted values keep their quotes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Params(pub Vec<(String, Option<String>)>);

impl Params {
    /// Parses the text after the first `;` of a parameter list.
    fn parse(s: &str) -> Params {
        Params(
            ParamIter::new(s)
                .map(|(n, v)| (n.to_owned(), v.map(str::to_owned)))
                .collect(),
        )
    }

    /// `Some(Some(v))` for `name=v`, `Some(None)` for a bare `name`.
    pub fn get(&self, name: &str) -> Option<Option<&str>> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    /// Sets (or adds, at the end) a parameter.
    pub fn set(&mut self, name: &str, value: Option<String>) {
        match self
            .0
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some(slot) => slot.1 = value,
            None => self.0.push((name.to_owned(), value)),
        }
    }

    /// Removes a parameter; returns whether it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.0.len() != before
    }
}

/// The `(name, value)` pairs of a parameter list, borrowed and trimmed,
/// empty ones skipped: what [`Params::parse`] owns, for a caller that only
/// looks one up (issue #12: a tag lookup parsed and copied every
/// parameter). `;` inside a quoted value does not split.
struct ParamIter<'a> {
    rest: Option<&'a str>,
}

impl<'a> ParamIter<'a> {
    fn new(s: &'a str) -> Self {
        Self { rest: Some(s) }
    }
}

impl<'a> Iterator for ParamIter<'a> {
    type Item = (&'a str, Option<&'a str>);

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(rest) = self.rest {
            let p = match scan_unquoted(rest, |b| b == b';') {
                Ok(i) => {
                    self.rest = rest.get(i + 1..);
                    &rest[..i]
                }
                Err(_) => {
                    self.rest = None;
                    rest
                }
            };
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            let (n, v) = p
                .split_once('=')
                .map_or((p, None), |(n, v)| (n, Some(v.trim())));
            return Some((n.trim(), v));
        }
        None
    }
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, v) in &self.0 {
            match v {
                Some(v) => write!(f, ";{n}={v}")?,
                None => write!(f, ";{n}")?,
            }
        }
        Ok(())
    }
}

/// One Via value (RFC 3261 §20.42; whitespace around `/` allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// `SIP/2.0`, normalised without inner whitespace.
    pub protocol: String,
    /// Transport (`TLS`, `TCP`, `UDP`, `WSS`...), as received.
    pub transport: String,
    /// sent-by host.
    pub host: Host,
    /// sent-by port.
    pub port: Option<u16>,
    /// Parameters in order.
    pub params: Params,
}

impl Via {
    /// Parses one Via value.
    pub fn parse(value: &str) -> Result<Via, MessageError> {
        let bad = |reason| MessageError::BadHeaderValue {
            name: "Via",
            value: cut(value),
            reason,
        };
        let mut parts = value.splitn(3, '/');
        let name = parts
            .next()
            .map(str::trim)
            .ok_or_else(|| bad("no protocol"))?;
        let version = parts
            .next()
            .map(str::trim)
            .ok_or_else(|| bad("no version"))?;
        let rest = parts
            .next()
            .map(str::trim_start)
            .ok_or_else(|| bad("no transport"))?;
        if name.is_empty() || version.is_empty() {
            return Err(bad("empty protocol"));
        }
        let t_end = rest.find([' ', '\t']).ok_or_else(|| bad("no sent-by"))?;
        let transport = &rest[..t_end];
        if transport.is_empty() || !transport.bytes().all(is_token) {
            return Err(bad("bad transport"));
        }
        let rest = rest[t_end..].trim_start();
        let (sent_by, params) = rest
            .find(';')
            .map_or((rest, ""), |i| (&rest[..i], &rest[i + 1..]));
        // sent-by may have LWS around the colon; an IPv6 reference has none.
        let sent_by: std::borrow::Cow<'_, str> = if sent_by.contains(char::is_whitespace) {
            sent_by.chars().filter(|c| !c.is_whitespace()).collect()
        } else {
            sent_by.into()
        };
        let (host, port) =
            parse_hostport(&sent_by, value).map_err(|source| MessageError::BadUri {
                place: "Via sent-by",
                source,
            })?;
        Ok(Via {
            protocol: format!("{name}/{version}"),
            transport: transport.to_owned(),
            host,
            port,
            params: Params::parse(params),
        })
    }

    /// The `branch` parameter.
    pub fn branch(&self) -> Option<&str> {
        self.params.get("branch").flatten()
    }

    /// The `received` parameter as an address (RFC 3261 §18.2.1).
    pub fn received(&self) -> Option<Host> {
        self.params.get("received").flatten().and_then(Host::parse)
    }

    /// `rport` (RFC 3581): `None` absent, `Some(None)` requested (no value),
    /// `Some(Some(p))` filled in.
    pub fn rport(&self) -> Option<Option<u16>> {
        self.params
            .get("rport")
            .map(|v| v.and_then(|p| p.parse().ok()))
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} {}", self.protocol, self.transport, self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write!(f, "{}", self.params)
    }
}

/// `name-addr` / `addr-spec` with header parameters (From, To, Contact,
/// Route, Record-Route, Path; RFC 3261 §20.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    /// Display name as received (quotes kept), if any.
    pub display: Option<String>,
    /// The URI text (any scheme); parse with [`SipUri::parse`].
    pub uri: String,
    /// Whether the URI was in `<...>`; kept on output.
    pub angle: bool,
    /// Header parameters (`tag`, `expires`, ...).
    pub params: Params,
}

/// A name-addr checked as [`NameAddr::parse`] checks it, borrowing the
/// header's text: for a caller that only reads it (issue #12: checking
/// From, To and Contact copied every part of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameAddrView<'a> {
    /// Display name as received (quotes kept), if any.
    pub display: Option<&'a str>,
    /// The URI text.
    pub uri: &'a str,
    /// Whether the URI was in `<...>`.
    pub angle: bool,
    /// The header parameters' text, after the `;` that starts them.
    pub params: &'a str,
}

impl<'a> NameAddrView<'a> {
    /// Parses one element (no commas) of header `name`.
    pub fn parse(value: &'a str, name: &'static str) -> Result<Self, MessageError> {
        NameAddr::parse_ref(value, name)
    }
}

impl NameAddr {
    /// Parses one element (no commas).
    pub fn parse(value: &str, name: &'static str) -> Result<NameAddr, MessageError> {
        let r = Self::parse_ref(value, name)?;
        Ok(NameAddr {
            display: r.display.map(str::to_owned),
            uri: r.uri.to_owned(),
            angle: r.angle,
            params: Params::parse(r.params),
        })
    }

    /// The tag parameter of a name-addr, checked as [`NameAddr::parse`]
    /// checks it, without copying the rest.
    fn tag_of(value: &str, name: &'static str) -> Result<Option<String>, MessageError> {
        let r = Self::parse_ref(value, name)?;
        Ok(ParamIter::new(r.params)
            .find(|(n, _)| n.eq_ignore_ascii_case("tag"))
            .and_then(|(_, v)| v)
            .map(str::to_owned))
    }

    fn parse_ref<'a>(value: &'a str, name: &'static str) -> Result<NameAddrView<'a>, MessageError> {
        let value = value.trim();
        let bad = |reason| MessageError::BadHeaderValue {
            name,
            value: cut(value),
            reason,
        };
        // A '<' outside the quoted display name.
        let lt = match scan_unquoted(value, |b| b == b'<') {
            Ok(i) => Some(i),
            Err(Unquoted::Open) => return Err(bad("unterminated quoted display name")),
            Err(Unquoted::Closed) => None,
        };
        match lt {
            Some(i) => {
                let gt = value[i..]
                    .find('>')
                    .map(|g| g + i)
                    .ok_or_else(|| bad("no closing '>'"))?;
                let display = value[..i].trim();
                let after = value[gt + 1..].trim_start();
                let params = match after {
                    "" => "",
                    a => a.strip_prefix(';').ok_or_else(|| bad("text after '>'"))?,
                };
                Ok(NameAddrView {
                    display: (!display.is_empty()).then_some(display),
                    uri: value[i + 1..gt].trim(),
                    angle: true,
                    params,
                })
            }
            None => {
                // addr-spec: any ';' belongs to the header (§20.10).
                let (uri, params) = value
                    .find(';')
                    .map_or((value, ""), |i| (&value[..i], &value[i + 1..]));
                if uri.trim().is_empty() || !uri.contains(':') {
                    return Err(bad("no URI"));
                }
                Ok(NameAddrView {
                    display: None,
                    uri: uri.trim(),
                    angle: false,
                    params,
                })
            }
        }
    }

    /// The `tag` parameter.
    pub fn tag(&self) -> Option<&str> {
        self.params.get("tag").flatten()
    }

    /// The URI parsed as SIP/SIPS.
    pub fn sip_uri(&self) -> Result<SipUri, UriError> {
        SipUri::parse(&self.uri)
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            write!(f, "{d} ")?;
        }
        // A URI with ';' or ',' needs brackets to keep its parameters.
        if self.angle || self.display.is_some() || self.uri.contains([';', ',', '?']) {
            write!(f, "<{}>", self.uri)?;
        } else {
            f.write_str(&self.uri)?;
        }
        write!(f, "{}", self.params)
    }
}

/// CSeq value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    /// Sequence number (< 2^31, RFC 3261 §8.1.1.5).
    pub seq: u32,
    /// Method.
    pub method: Method,
}

/// An owned, validated SIP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Request- or Status-Line.
    pub start: StartLine,
    headers: Vec<Header>,
    body: Vec<u8>,
}

impl Message {
    /// Parses a framed message.
    pub fn from_frame(raw: &RawMessage) -> Result<Message, MessageError> {
        Self::parse(raw.as_bytes())
    }

    /// Parses head and body. On a datagram a body longer than Content-Length
    /// is truncated and a shorter one is an error (RFC 3261 §18.3); a frame
    /// from the stream framer always matches.
    pub fn parse(bytes: &[u8]) -> Result<Message, MessageError> {
        let (head, body) = split_head(bytes).ok_or(MessageError::NoHeadEnd)?;
        let mut lines = head
            .split(|c| *c == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let first = lines.next().unwrap_or_default();
        let first = std::str::from_utf8(first).map_err(|_| MessageError::NotUtf8 { line_no: 1 })?;
        let start = parse_start_line(first)?;
        // A slot per line (the start and empty lines leave two spare) and
        // two more: parsing, and a proxy adding its Via and Record-Routes,
        // do not regrow the list (issue #12).
        let mut headers: Vec<Header> =
            Vec::with_capacity(memchr::memchr_iter(b'\n', head).count() + 2);
        for (n, line) in lines.enumerate() {
            let line_no = n + 2;
            if line.is_empty() {
                break;
            }
            let text = std::str::from_utf8(line).map_err(|_| MessageError::NotUtf8 { line_no })?;
            if text.starts_with([' ', '\t']) {
                let h = headers
                    .last_mut()
                    .ok_or_else(|| MessageError::BadHeaderLine {
                        line_no,
                        line: cut(text),
                    })?;
                if h.raw == Raw::Canonical {
                    // Its first line was `name: value`, the value not yet
                    // extended by this continuation.
                    let mut first = Vec::with_capacity(h.name.len() + 2 + h.value.len());
                    first.extend_from_slice(h.name.as_bytes());
                    first.extend_from_slice(b": ");
                    first.extend_from_slice(h.value.as_bytes());
                    h.raw = Raw::Bytes(first);
                }
                let cont = text.trim();
                if !cont.is_empty() {
                    if !h.value.is_empty() {
                        h.value.push(' ');
                    }
                    h.value.push_str(cont);
                }
                if let Raw::Bytes(raw) = &mut h.raw {
                    raw.extend_from_slice(b"\r\n");
                    raw.extend_from_slice(line);
                }
                continue;
            }
            let (name, value) =
                text.split_once(':')
                    .ok_or_else(|| MessageError::BadHeaderLine {
                        line_no,
                        line: cut(text),
                    })?;
            let name = name.trim_end_matches([' ', '\t']);
            if name.is_empty() || !name.bytes().all(is_token) {
                return Err(MessageError::BadHeaderLine {
                    line_no,
                    line: cut(text),
                });
            }
            let trimmed = value.trim();
            let canonical = name.len() + 1 == text.len() - value.len()
                && value.len() == trimmed.len() + 1
                && value.starts_with(' ');
            headers.push(Header {
                name: name.to_owned(),
                value: trimmed.to_owned(),
                raw: if canonical {
                    Raw::Canonical
                } else {
                    Raw::Bytes(line.to_vec())
                },
            });
        }
        let mut msg = Message {
            start,
            headers,
            body: Vec::new(),
        };
        // Two Content-Length values that disagree leave the body length
        // unknown (RFC 4475 §3.3.9): the framer refuses them on streams,
        // this refuses them in datagrams.
        let conflict = {
            let mut lengths = msg.header_all("Content-Length").map(str::trim);
            let first = lengths.next();
            first.and_then(|f| lengths.find(|v| *v != f).map(|o| format!("{f}, {o}")))
        };
        if let Some(values) = conflict {
            return Err(MessageError::BadHeaderValue {
                name: "Content-Length",
                value: cut(&values),
                reason: "conflicting values",
            });
        }
        let declared = match msg.header("Content-Length") {
            Some(v) => Some(
                v.parse::<usize>()
                    .map_err(|_| MessageError::BadHeaderValue {
                        name: "Content-Length",
                        value: cut(v),
                        reason: "not a decimal number",
                    })?,
            ),
            None => None,
        };
        let body = match declared {
            Some(d) if d > body.len() => {
                return Err(MessageError::ContentLengthMismatch {
                    declared: d,
                    actual: body.len(),
                })
            }
            Some(d) => body.get(..d).unwrap_or_default(),
            None => body,
        };
        msg.body = body.to_vec();
        Ok(msg)
    }

    /// Moves the message out, leaving an empty response (no headers, no
    /// body, status 0) in its place: for a caller that is done with it and
    /// would otherwise clone it (issue #12).
    pub fn take(&mut self) -> Message {
        std::mem::replace(
            self,
            Message {
                start: StartLine::Response {
                    version: String::new(),
                    code: 0,
                    reason: String::new(),
                },
                headers: Vec::new(),
                body: Vec::new(),
            },
        )
    }

    /// Request method, `None` for responses.
    pub fn method(&self) -> Option<&Method> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    /// Status code, `None` for requests.
    pub fn status(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    /// The Request-URI parsed as SIP/SIPS (requests only).
    pub fn request_uri(&self) -> Option<Result<SipUri, MessageError>> {
        match &self.start {
            StartLine::Request { uri, .. } => {
                Some(SipUri::parse(uri).map_err(|source| MessageError::BadUri {
                    place: "Request-URI",
                    source,
                }))
            }
            StartLine::Response { .. } => None,
        }
    }

    /// Replaces the Request-URI (requests only; no-op on responses).
    pub fn set_request_uri(&mut self, new: &str) {
        if let StartLine::Request { uri, .. } = &mut self.start {
            *uri = new.to_owned();
        }
    }

    /// All headers in order.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The first value of a header (compact forms and case handled).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| same_header(&h.name, name))
            .map(|h| h.value.as_str())
    }

    /// Every value of a header, in order, one per header line (split list
    /// values with [`split_list`]).
    pub fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |h| same_header(&h.name, name))
            .map(|h| h.value.as_str())
    }

    /// Sets a header: the first occurrence takes the value (keeping its
    /// position and spelling), other occurrences are removed; appended when
    /// absent.
    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.headers.iter().position(|h| same_header(&h.name, name)) {
            Some(i) => {
                if let Some(h) = self.headers.get_mut(i) {
                    h.value = value;
                    h.raw = Raw::Edited;
                }
                let mut idx = 0;
                self.headers.retain(|h| {
                    let keep = idx <= i || !same_header(&h.name, name);
                    idx += 1;
                    keep
                });
            }
            None => self.headers.push(Header::new(name, value)),
        }
    }

    /// Inserts a header at `index` (clamped to the end).
    pub fn insert_header(&mut self, index: usize, header: Header) {
        let i = index.min(self.headers.len());
        self.headers.insert(i, header);
    }

    /// Inserts a header before the first header of the same name, or
    /// appends it (how a proxy adds its Via or Record-Route, §16.6).
    pub fn prepend_header(&mut self, name: &str, value: impl Into<String>) {
        let i = self
            .headers
            .iter()
            .position(|h| same_header(&h.name, name))
            .unwrap_or(self.headers.len());
        self.headers.insert(i, Header::new(name, value));
    }

    /// Keeps only the headers named in `names` (compact forms match) and
    /// drops the body: what a finished transaction still needs of its
    /// request to derive an ACK, CANCEL or BYE from it (issue #12: a full
    /// INVITE with its SDP was kept for 64*T1 after every call's 2xx).
    pub fn retain_only(&mut self, names: &[&str]) {
        self.headers
            .retain(|h| names.iter().any(|n| same_header(&h.name, n)));
        self.headers.shrink_to_fit();
        self.body = Vec::new();
    }

    /// Removes every occurrence; returns how many were removed.
    pub fn remove_header(&mut self, name: &str) -> usize {
        let before = self.headers.len();
        self.headers.retain(|h| !same_header(&h.name, name));
        before - self.headers.len()
    }

    /// Every Via value in order (list values split).
    pub fn vias(&self) -> Result<Vec<Via>, MessageError> {
        self.header_all("Via")
            .flat_map(ListIter::new)
            .map(Via::parse)
            .collect()
    }

    /// The topmost Via.
    pub fn top_via(&self) -> Result<Via, MessageError> {
        let v = self
            .header("Via")
            .ok_or(MessageError::MissingHeader { name: "Via" })?;
        let first = ListIter::new(v).next().unwrap_or_default();
        Via::parse(first)
    }

    /// Replaces the topmost Via value, keeping further values of the same
    /// header line after it.
    pub fn set_top_via(&mut self, via: &Via) -> Result<(), MessageError> {
        let h = self
            .headers
            .iter_mut()
            .find(|h| same_header(&h.name, "Via"))
            .ok_or(MessageError::MissingHeader { name: "Via" })?;
        let mut value = via.to_string();
        for r in ListIter::new(&h.value).skip(1) {
            value.push_str(", ");
            value.push_str(r);
        }
        h.value = value;
        h.raw = Raw::Edited;
        Ok(())
    }

    /// Removes the topmost Via value (a proxy forwarding a response,
    /// RFC 3261 §16.7 step 3) and returns it.
    pub fn pop_top_via(&mut self) -> Result<Via, MessageError> {
        let i = self
            .headers
            .iter()
            .position(|h| same_header(&h.name, "Via"))
            .ok_or(MessageError::MissingHeader { name: "Via" })?;
        let (top, rest) = {
            let mut list = ListIter::new(self.headers.get(i).map_or("", |h| h.value.as_str()));
            let top = Via::parse(list.next().unwrap_or_default())?;
            (top, join_rest(list))
        };
        self.replace_or_remove(i, rest);
        Ok(top)
    }

    /// Removes the topmost Via value without parsing it: for a caller that
    /// parsed it already, or added it itself (issue #12).
    pub fn remove_top_via(&mut self) -> Result<(), MessageError> {
        let i = self
            .headers
            .iter()
            .position(|h| same_header(&h.name, "Via"))
            .ok_or(MessageError::MissingHeader { name: "Via" })?;
        let rest = {
            let mut list = ListIter::new(self.headers.get(i).map_or("", |h| h.value.as_str()));
            list.next();
            join_rest(list)
        };
        self.replace_or_remove(i, rest);
        Ok(())
    }

    fn replace_or_remove(&mut self, i: usize, value: Option<String>) {
        match value {
            None => {
                self.headers.remove(i);
            }
            Some(v) => {
                if let Some(h) = self.headers.get_mut(i) {
                    h.value = v;
                    h.raw = Raw::Edited;
                }
            }
        }
    }

    /// RFC 3261 §18.2.1 / RFC 3581 §4: records the packet's source on the
    /// top Via: `received` when it differs from sent-by (or rport was
    /// asked), `rport` filled in when the client asked for it.
    pub fn stamp_top_via(&mut self, source: std::net::SocketAddr) -> Result<(), MessageError> {
        let via = self.top_via()?;
        self.stamp_via(via, source).map(|_| ())
    }

    /// [`Message::stamp_top_via`] for a caller that parsed the top Via
    /// already (`via`, as [`Message::top_via`] returned it); returns it
    /// stamped, as `top_via` would now read it (issue #12: the request
    /// path parsed the same Via three times).
    pub fn stamp_via(
        &mut self,
        mut via: Via,
        source: std::net::SocketAddr,
    ) -> Result<Via, MessageError> {
        let wants_rport = via.rport().is_some();
        if via.host != Host::Ip(source.ip()) || wants_rport {
            via.params.set("received", Some(source.ip().to_string()));
        }
        if wants_rport {
            via.params.set("rport", Some(source.port().to_string()));
        }
        self.set_top_via(&via)?;
        Ok(via)
    }

    /// Call-ID.
    pub fn call_id(&self) -> Result<&str, MessageError> {
        self.header("Call-ID")
            .filter(|v| !v.is_empty())
            .ok_or(MessageError::MissingHeader { name: "Call-ID" })
    }

    /// CSeq number and method.
    pub fn cseq(&self) -> Result<CSeq, MessageError> {
        let v = self
            .header("CSeq")
            .ok_or(MessageError::MissingHeader { name: "CSeq" })?;
        let bad = |reason| MessageError::BadHeaderValue {
            name: "CSeq",
            value: cut(v),
            reason,
        };
        let mut it = v.split_whitespace();
        let seq = it.next().ok_or_else(|| bad("empty"))?;
        let method = it.next().ok_or_else(|| bad("no method"))?;
        if it.next().is_some() {
            return Err(bad("trailing text"));
        }
        if seq.len() > 10 || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("sequence number not decimal"));
        }
        let seq = seq
            .parse::<u32>()
            .map_err(|_| bad("sequence number too large"))?;
        if seq >= 1 << 31 {
            return Err(bad("sequence number not below 2**31"));
        }
        let method = Method::parse(method).ok_or_else(|| bad("bad method"))?;
        Ok(CSeq { seq, method })
    }

    /// Max-Forwards, if present.
    pub fn max_forwards(&self) -> Option<Result<u32, MessageError>> {
        self.header("Max-Forwards").map(|v| {
            v.parse::<u32>().map_err(|_| MessageError::BadHeaderValue {
                name: "Max-Forwards",
                value: cut(v),
                reason: "not a decimal number",
            })
        })
    }

    /// From (parsed).
    pub fn from(&self) -> Result<NameAddr, MessageError> {
        let v = self
            .header("From")
            .ok_or(MessageError::MissingHeader { name: "From" })?;
        NameAddr::parse(v, "From")
    }

    /// To (parsed).
    pub fn to(&self) -> Result<NameAddr, MessageError> {
        let v = self
            .header("To")
            .ok_or(MessageError::MissingHeader { name: "To" })?;
        NameAddr::parse(v, "To")
    }

    /// From tag.
    pub fn from_tag(&self) -> Result<Option<String>, MessageError> {
        let v = self
            .header("From")
            .ok_or(MessageError::MissingHeader { name: "From" })?;
        NameAddr::tag_of(v, "From")
    }

    /// To tag.
    pub fn to_tag(&self) -> Result<Option<String>, MessageError> {
        let v = self
            .header("To")
            .ok_or(MessageError::MissingHeader { name: "To" })?;
        NameAddr::tag_of(v, "To")
    }

    /// Every element of a name-addr list header (Contact, Route,
    /// Record-Route, Path), in order. A `Contact: *` yields nothing.
    pub fn name_addrs(&self, name: &'static str) -> Result<Vec<NameAddr>, MessageError> {
        self.header_all(name)
            .flat_map(ListIter::new)
            .filter(|v| *v != "*")
            .map(|v| NameAddr::parse(v, name))
            .collect()
    }

    /// The first `name` header (From, To) as a borrowed name-addr, with the
    /// errors of [`Message::from`]/[`Message::to`].
    pub fn name_addr_view(&self, name: &'static str) -> Result<NameAddrView<'_>, MessageError> {
        let v = self
            .header(name)
            .ok_or(MessageError::MissingHeader { name })?;
        NameAddrView::parse(v, name)
    }

    /// [`Message::name_addrs`], borrowed.
    pub fn name_addr_views(
        &self,
        name: &'static str,
    ) -> Result<Vec<NameAddrView<'_>>, MessageError> {
        self.header_all(name)
            .flat_map(ListIter::new)
            .filter(|v| *v != "*")
            .map(|v| NameAddrView::parse(v, name))
            .collect()
    }

    /// Replaces all headers `name` by one header line per element.
    pub fn set_name_addrs(&mut self, name: &str, list: &[NameAddr]) {
        let pos = self.headers.iter().position(|h| same_header(&h.name, name));
        let spelled = pos
            .and_then(|i| self.headers.get(i))
            .map_or_else(|| name.to_owned(), |h| h.name.clone());
        self.remove_header(name);
        let at = pos.unwrap_or(self.headers.len()).min(self.headers.len());
        for (k, na) in list.iter().enumerate() {
            self.headers
                .insert(at + k, Header::new(spelled.clone(), na.to_string()));
        }
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Replaces the body (Content-Length is recomputed on output).
    pub fn set_body(&mut self, body: Vec<u8>) {
        self.body = body;
    }

    /// Serialises the message; Content-Length is rewritten to the body size
    /// in place of the first one received (others dropped), or appended.
    pub fn to_bytes(&self) -> Vec<u8> {
        use std::io::Write as _;
        let mut out = Vec::with_capacity(512 + self.body.len());
        // Formatted straight into the output (issue #12: the start line
        // and Content-Length were each formatted into a String first).
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{}\r\n", self.start);
        let mut wrote_cl = false;
        for h in &self.headers {
            if same_header(&h.name, "Content-Length") {
                if !wrote_cl {
                    let _ = write!(out, "{}: {}\r\n", h.name, self.body.len());
                    wrote_cl = true;
                }
                continue;
            }
            h.write(&mut out);
        }
        if !wrote_cl {
            let _ = write!(out, "Content-Length: {}\r\n", self.body.len());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// The message as rsip sees it, after our normalisation (headers
    /// unfolded, one per line). Fails for the gaps in the module docs.
    pub fn to_rsip(&self) -> Result<rsip::SipMessage, MessageError> {
        let mut norm = self.clone();
        for h in &mut norm.headers {
            h.raw = Raw::Edited;
        }
        rsip::SipMessage::try_from(norm.to_bytes().as_slice()).map_err(|e| MessageError::Rsip {
            reason: cut(&e.to_string()),
        })
    }
}

/// Head (with its empty line) and the rest.
fn split_head(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', bytes.get(from..)?) {
        let nl = from + i;
        match bytes.get(nl + 1..) {
            Some([b'\n', ..]) => return Some((&bytes[..nl + 2], &bytes[nl + 2..])),
            Some([b'\r', b'\n', ..]) => return Some((&bytes[..nl + 3], &bytes[nl + 3..])),
            _ => from = nl + 1,
        }
    }
    None
}

fn parse_start_line(line: &str) -> Result<StartLine, MessageError> {
    let bad = || MessageError::BadStartLine { line: cut(line) };
    let is_version = |w: &str| {
        w.len() > 4
            && w.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("SIP/"))
            && w[4..].bytes().all(|c| c.is_ascii_digit() || c == b'.')
    };
    let mut parts = line.splitn(3, ' ');
    let a = parts.next().ok_or_else(bad)?;
    let b = parts.next().ok_or_else(bad)?;
    let c = parts.next().ok_or_else(bad)?;
    if is_version(a) {
        if b.len() != 3 || !b.bytes().all(|d| d.is_ascii_digit()) {
            return Err(bad());
        }
        let code = b.parse::<u16>().map_err(|_| bad())?;
        if !(100..=699).contains(&code) {
            return Err(bad());
        }
        return Ok(StartLine::Response {
            version: a.to_owned(),
            code,
            reason: c.to_owned(),
        });
    }
    let method = Method::parse(a).ok_or_else(bad)?;
    if b.is_empty() || c.contains(' ') || !is_version(c) || !b.contains(':') {
        return Err(bad());
    }
    Ok(StartLine::Request {
        method,
        uri: b.to_owned(),
        version: c.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three quote-aware splits (list commas, parameter semicolons,
    /// the name-addr's `<`) share one scan: separators inside quoted
    /// strings, after an escaped quote and inside `<...>` (commas) do not
    /// split; non-ASCII text and an escaped multi-byte character pass.
    #[test]
    fn separators_inside_quotes_brackets_and_after_escapes_do_not_split() {
        let list = r#""Doe, \"J\" ;x" <sip:a@x;lr,q>;p="1,2", sip:b@y , "é\é" <sip:c@z>"#;
        assert_eq!(
            split_list(list),
            vec![
                r#""Doe, \"J\" ;x" <sip:a@x;lr,q>;p="1,2""#,
                "sip:b@y",
                r#""é\é" <sip:c@z>"#
            ]
        );
        let first = NameAddr::parse(split_list(list)[0], "Contact").expect("first");
        assert_eq!(first.display.as_deref(), Some(r#""Doe, \"J\" ;x""#));
        assert_eq!(first.uri, "sip:a@x;lr,q");
        assert_eq!(first.params.get("p"), Some(Some(r#""1,2""#)));
        let p = Params::parse(r#"a="x;y\";z" ; b ;c= 3;;"#);
        assert_eq!(
            p.0,
            vec![
                ("a".to_owned(), Some(r#""x;y\";z""#.to_owned())),
                ("b".to_owned(), None),
                ("c".to_owned(), Some("3".to_owned())),
            ]
        );
        let last = NameAddr::parse(r#""é\é" <sip:c@z>;tag=9"#, "To").expect("utf-8");
        assert_eq!(
            (last.uri.as_str(), last.params.get("tag")),
            ("sip:c@z", Some(Some("9")))
        );
        // A display name never closed: its '<' is quoted, so no name-addr.
        let open = NameAddr::parse(r#""Doe <sip:a@x>"#, "From");
        assert!(
            matches!(&open, Err(MessageError::BadHeaderValue { reason, .. }) if reason.contains("unterminated")),
            "{open:?}"
        );
        // An escaped quote does not close it either.
        assert!(NameAddr::parse(r#""Doe \" <sip:a@x>"#, "From").is_err());
    }

    fn fixture(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sip")
            .join(name);
        std::fs::read(p).expect("fixture")
    }

    #[test]
    fn parses_start_lines() {
        assert!(matches!(
            parse_start_line("INVITE sip:a@b SIP/2.0"),
            Ok(StartLine::Request {
                method: Method::Known(rsip::Method::Invite),
                ..
            })
        ));
        assert!(matches!(
            parse_start_line("FOO sip:a@b SIP/2.0"),
            Ok(StartLine::Request { method: Method::Extension(m), .. }) if m == "FOO"
        ));
        // Method names are case-sensitive: "invite" is an extension method.
        assert!(matches!(
            parse_start_line("invite sip:a@b SIP/2.0"),
            Ok(StartLine::Request {
                method: Method::Extension(_),
                ..
            })
        ));
        assert!(matches!(
            parse_start_line("SIP/2.0 486 Busy Here"),
            Ok(StartLine::Response { code: 486, .. })
        ));
        assert!(matches!(
            parse_start_line("SIP/2.0 200 "),
            Ok(StartLine::Response { code: 200, .. })
        ));
        for bad in [
            "SIP/2.0 099 x",
            "SIP/2.0 700 x",
            "INVITE sip:a@b",
            "INVITE  sip:a SIP/2.0",
            "IN<VITE sip:a SIP/2.0",
            "INVITE a SIP/2.0",
        ] {
            assert!(parse_start_line(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_method_and_folding_rsip_gap() {
        let raw = fixture("rfc4475_style_folded_unknown_method.sip");
        // rsip gap: the whole message is refused.
        assert!(rsip::SipMessage::try_from(raw.as_slice()).is_err());
        let m = Message::parse(&raw).unwrap();
        assert_eq!(
            m.method(),
            Some(&Method::Extension("NEWFANGLEDMETHOD".into()))
        );
        assert_eq!(m.to().unwrap().tag(), Some("1918181833n"));
        assert_eq!(m.to().unwrap().uri, "sip:vivekg@chair-dnrc.example.com");
        assert_eq!(m.from_tag().unwrap().as_deref(), Some("98asjd8"));
        assert_eq!(
            m.from().unwrap().display.as_deref(),
            Some("\"J Rosenberg \\\\\\\"\"")
        );
        assert_eq!(m.max_forwards(), Some(Ok(68)));
        let cseq = m.cseq().unwrap();
        assert_eq!(cseq.seq, 9);
        assert_eq!(cseq.method, Method::Extension("NEWFANGLEDMETHOD".into()));
        let vias = m.vias().unwrap();
        assert_eq!(vias.len(), 2);
        assert_eq!(vias[0].protocol, "SIP/2.0");
        assert_eq!(vias[0].transport, "TLS");
        assert_eq!(vias[0].host, Host::Ip("192.0.2.2".parse().unwrap()));
        assert_eq!(vias[0].port, Some(5061));
        assert_eq!(vias[0].branch(), Some("390skdjuw"));
        assert_eq!(vias[1].transport, "TCP");
        assert_eq!(
            m.header("NewFangledHeader"),
            Some("newfangled value continued newfangled value")
        );
        assert_eq!(m.header("unknownheaderwithunusualvalue"), Some(";;,,;;,;"));
        // Untouched headers go out byte-for-byte, folds included.
        let out = m.to_bytes();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text
            .contains("NewFangledHeader:   newfangled value\r\n continued newfangled value\r\n"));
        assert!(text.contains("from   : \"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8\r\n"));
        assert_eq!(out, raw, "nothing changed, so nothing may differ");
    }

    #[test]
    fn folded_known_method_goes_through_rsip_after_unfolding() {
        let raw = String::from_utf8(fixture("rfc4475_style_folded_unknown_method.sip"))
            .unwrap()
            .replace("NEWFANGLEDMETHOD", "OPTIONS");
        // rsip gap: folded lines are refused even with a known method.
        assert!(rsip::SipMessage::try_from(raw.as_bytes()).is_err());
        let m = Message::parse(raw.as_bytes()).unwrap();
        let r = m.to_rsip().unwrap();
        assert!(r.is_request());
        assert_eq!(r.body().len(), m.body().len());
        // Unknown methods stay a gap even after normalisation.
        let m2 = Message::parse(&fixture("rfc4475_style_folded_unknown_method.sip")).unwrap();
        assert!(matches!(m2.to_rsip(), Err(MessageError::Rsip { .. })));
    }

    #[test]
    fn ipv6_via_and_contact_rsip_gap() {
        let raw = fixture("rfc4475_style_ipv6.sip");
        assert!(
            rsip::SipMessage::try_from(raw.as_slice()).is_err(),
            "rsip parses bracketed IPv6 now?"
        );
        let m = Message::parse(&raw).unwrap();
        let via = m.top_via().unwrap();
        assert_eq!(via.host, Host::Ip("2001:db8::10".parse().unwrap()));
        assert_eq!(via.port, Some(5061));
        assert_eq!(via.rport(), Some(None));
        let contact = &m.name_addrs("Contact").unwrap()[0];
        let uri = contact.sip_uri().unwrap();
        assert_eq!(uri.host, Host::Ip("2001:db8::10".parse().unwrap()));
        assert_eq!(uri.port, Some(5061));
        assert_eq!(uri.param("transport"), Some(Some("tls")));
        let ruri = m.request_uri().unwrap().unwrap();
        assert_eq!(ruri.host.to_string(), "[2001:db8::20]");
        let mut m = m;
        m.stamp_top_via("[2001:db8::99]:40000".parse().unwrap())
            .unwrap();
        let via = m.top_via().unwrap();
        assert_eq!(
            via.received(),
            Some(Host::Ip("2001:db8::99".parse().unwrap()))
        );
        assert_eq!(via.rport(), Some(Some(40000)));
        assert!(String::from_utf8(m.to_bytes()).unwrap().contains(
            "Via: SIP/2.0/TLS [2001:db8::10]:5061;branch=z9hG4bKas3-111;rport=40000;received=2001:db8::99\r\n"
        ));
    }

    #[test]
    fn compact_headers() {
        let m = Message::parse(&fixture("rfc4475_style_compact_headers.sip")).unwrap();
        assert_eq!(m.call_id().unwrap(), "compact-1@atlanta.example.com");
        assert_eq!(m.from_tag().unwrap().as_deref(), Some("cmpf"));
        assert_eq!(m.to_tag().unwrap(), None);
        assert_eq!(m.header("Content-Type"), Some("text/plain"));
        assert_eq!(m.header("Supported"), Some("path"));
        assert_eq!(m.vias().unwrap().len(), 2);
        assert_eq!(m.body(), b"Hello Bob");
        let c = m.name_addrs("Contact").unwrap();
        assert_eq!(
            c[0].sip_uri().unwrap().host,
            Host::Ip("10.77.0.20".parse().unwrap())
        );
        // rsip handles this one: we agree on the basics.
        let r = m.to_rsip().unwrap();
        assert_eq!(r.body(), &m.body().to_vec());
    }

    #[test]
    fn escaped_uris_are_kept_as_received() {
        let raw = fixture("rfc4475_style_escaped.sip");
        let m = Message::parse(&raw).unwrap();
        let ruri = m.request_uri().unwrap().unwrap();
        assert_eq!(ruri.userinfo.as_deref(), Some("%61lice"));
        assert_eq!(m.to().unwrap().uri, "sip:%61lice@atlanta.example.com");
        assert!(!m.to().unwrap().angle);
        assert_eq!(
            m.from().unwrap().sip_uri().unwrap().userinfo.as_deref(),
            Some("I%20have%20spaces")
        );
        assert_eq!(m.to_bytes(), raw);
    }

    #[test]
    fn rfc3665_flow_accessors() {
        let ok = Message::parse(&fixture("rfc3665_3_1_200_ok.sip")).unwrap();
        assert_eq!(ok.status(), Some(200));
        assert_eq!(ok.to_tag().unwrap().as_deref(), Some("314159"));
        assert_eq!(ok.from_tag().unwrap().as_deref(), Some("9fxced76sl"));
        assert_eq!(
            ok.call_id().unwrap(),
            "3848276298220188511@atlanta.example.com"
        );
        assert_eq!(
            ok.cseq().unwrap(),
            CSeq {
                seq: 1,
                method: Method::Known(rsip::Method::Invite)
            }
        );
        let vias = ok.vias().unwrap();
        assert_eq!(vias.len(), 3);
        assert_eq!(
            vias[1].received(),
            Some(Host::Ip("192.0.2.111".parse().unwrap()))
        );
        assert_eq!(ok.name_addrs("Record-Route").unwrap().len(), 2);
        assert!(ok.body().starts_with(b"v=0\r\n"));
        let bye = Message::parse(&fixture("rfc3665_3_1_bye.sip")).unwrap();
        let route = bye.name_addrs("Route").unwrap();
        assert_eq!(route.len(), 2);
        assert_eq!(route[1].uri, "sips:ss1.atlanta.example.com;lr");
        assert_eq!(route[1].sip_uri().unwrap().param("lr"), Some(None));
    }

    #[test]
    fn header_editing_preserves_order() {
        let raw = fixture("rfc3665_3_1_invite.sip");
        let mut m = Message::parse(&raw).unwrap();
        let names = |m: &Message| {
            m.headers()
                .iter()
                .map(|h| h.name.clone())
                .collect::<Vec<_>>()
        };
        let before = names(&m);
        m.prepend_header(
            "Via",
            "SIP/2.0/TLS edge.example.com:5061;branch=z9hG4bKedge1",
        );
        m.prepend_header("Record-Route", "<sips:edge.example.com;lr>");
        m.set_header("max-forwards", "69");
        m.insert_header(99, Header::new("X-Edge", "1"));
        let after = names(&m);
        assert_eq!(after[0], "Via");
        assert_eq!(after[1], "Via");
        assert_eq!(&after[2..before.len() + 1], &before[1..]);
        assert_eq!(after[after.len() - 2], "Record-Route");
        assert_eq!(after[after.len() - 1], "X-Edge");
        assert_eq!(m.header("Max-Forwards"), Some("69"));
        assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bKedge1"));
        assert_eq!(
            m.pop_top_via().unwrap().host,
            Host::Name("edge.example.com".into())
        );
        assert_eq!(m.remove_header("X-Edge"), 1);
        assert_eq!(m.remove_header("Record-Route"), 1);
        m.set_header("Max-Forwards", "70");
        assert_eq!(m.to_bytes(), raw, "undoing every edit gives back the input");
    }

    #[test]
    fn set_header_collapses_duplicates() {
        let mut m =
            Message::parse(b"OPTIONS sip:a@b SIP/2.0\r\nX: 1\r\nY: y\r\nx: 2\r\nl: 0\r\n\r\n")
                .unwrap();
        m.set_header("X", "3");
        assert_eq!(m.header_all("X").collect::<Vec<_>>(), vec!["3"]);
        assert_eq!(m.headers()[0].name, "X");
        m.set_header("Z", "new");
        assert_eq!(m.headers().last().map(|h| h.value.as_str()), Some("new"));
    }

    #[test]
    fn via_lists_in_one_header() {
        let mut m = Message::parse(
            b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/TLS 192.0.2.1:5061;branch=z9hG4bKa, SIP/2.0/TLS 192.0.2.2;branch=z9hG4bKb\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(m.vias().unwrap().len(), 2);
        let top = m.pop_top_via().unwrap();
        assert_eq!(top.branch(), Some("z9hG4bKa"));
        assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bKb"));
        assert_eq!(m.pop_top_via().unwrap().port, None);
        assert_eq!(
            m.top_via(),
            Err(MessageError::MissingHeader { name: "Via" })
        );
    }

    #[test]
    fn stamp_received_only_when_needed() {
        let raw = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TLS 10.77.0.20:5061;branch=z9hG4bK1\r\nContent-Length: 0\r\n\r\n";
        let mut m = Message::parse(raw).unwrap();
        m.stamp_top_via("10.77.0.20:5061".parse().unwrap()).unwrap();
        assert_eq!(m.top_via().unwrap().received(), None);
        m.stamp_top_via("203.0.113.9:40000".parse().unwrap())
            .unwrap();
        assert_eq!(
            m.top_via().unwrap().received(),
            Some(Host::Ip("203.0.113.9".parse().unwrap()))
        );
        assert_eq!(m.top_via().unwrap().rport(), None);
    }

    #[test]
    fn content_length_recomputed() {
        let raw = fixture("rfc3665_3_1_invite.sip");
        let mut m = Message::parse(&raw).unwrap();
        let mut body = m.body().to_vec();
        body.extend_from_slice(b"a=sendrecv\r\n");
        let n = body.len();
        m.set_body(body);
        let out = String::from_utf8(m.to_bytes()).unwrap();
        assert!(out.contains(&format!("\r\nContent-Length: {n}\r\n")));
        assert_eq!(Message::parse(out.as_bytes()).unwrap().body().len(), n);
        // Compact l: keeps its spelling; missing one is appended.
        let mut m = Message::parse(b"MESSAGE sip:a@b SIP/2.0\r\nl: 2\r\n\r\nhi").unwrap();
        m.set_body(b"hello".to_vec());
        assert!(m.to_bytes().ends_with(b"\r\nl: 5\r\n\r\nhello"));
        let mut m = Message::parse(b"MESSAGE sip:a@b SIP/2.0\r\nX: y\r\n\r\n").unwrap();
        m.set_body(b"hey".to_vec());
        assert!(m
            .to_bytes()
            .ends_with(b"X: y\r\nContent-Length: 3\r\n\r\nhey"));
    }

    #[test]
    fn conflicting_content_lengths_are_refused() {
        // RFC 4475 §3.3.9 (mcl01) as a datagram: the framer is not there
        // to refuse it.
        assert!(matches!(
            Message::parse(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 13\r\nl: 5\r\n\r\nThere's no way to know"),
            Err(MessageError::BadHeaderValue {
                name: "Content-Length",
                ..
            })
        ));
        // The same value twice is no conflict.
        assert!(
            Message::parse(b"OPTIONS sip:a@b SIP/2.0\r\nl: 2\r\nContent-Length: 2\r\n\r\nhi")
                .is_ok()
        );
    }

    #[test]
    fn datagram_body_rules() {
        // Longer body than declared: truncated (RFC 3261 §18.3).
        let m = Message::parse(b"MESSAGE sip:a@b SIP/2.0\r\nl: 2\r\n\r\nhello").unwrap();
        assert_eq!(m.body(), b"he");
        assert_eq!(
            Message::parse(b"MESSAGE sip:a@b SIP/2.0\r\nl: 9\r\n\r\nhello"),
            Err(MessageError::ContentLengthMismatch {
                declared: 9,
                actual: 5
            })
        );
    }

    #[test]
    fn malformed_inputs_are_typed_errors() {
        assert_eq!(
            Message::parse(b"OPTIONS sip:a@b SIP/2.0\r\nl: 0\r\n"),
            Err(MessageError::NoHeadEnd)
        );
        assert!(matches!(
            Message::parse(b"OPTIONS sip:a@b SIP/2.0\r\nNoColonHere\r\n\r\n"),
            Err(MessageError::BadHeaderLine { line_no: 2, .. })
        ));
        assert!(matches!(
            Message::parse(b"OPTIONS sip:a@b SIP/2.0\r\n continuation-first: x\r\n\r\n"),
            Err(MessageError::BadHeaderLine { line_no: 2, .. })
        ));
        assert!(matches!(
            Message::parse(b"OPTIONS sip:a@b SIP/2.0\r\nX: \xff\r\n\r\n"),
            Err(MessageError::NotUtf8 { line_no: 2 })
        ));
        let m = Message::parse(b"OPTIONS sip:a@b SIP/2.0\r\nCSeq: 2147483648 OPTIONS\r\nVia: SIP/2.0 192.0.2.1\r\nFrom: \"x <sip:a@b>\r\nTo: <sip:a@b\r\n\r\n").unwrap();
        assert!(matches!(
            m.cseq(),
            Err(MessageError::BadHeaderValue { name: "CSeq", .. })
        ));
        assert!(matches!(
            m.top_via(),
            Err(MessageError::BadHeaderValue { name: "Via", .. })
        ));
        assert!(matches!(
            m.from(),
            Err(MessageError::BadHeaderValue { name: "From", .. })
        ));
        assert!(matches!(
            m.to(),
            Err(MessageError::BadHeaderValue { name: "To", .. })
        ));
        assert_eq!(
            m.call_id(),
            Err(MessageError::MissingHeader { name: "Call-ID" })
        );
    }

    #[test]
    fn name_addr_shapes() {
        let n = NameAddr::parse(
            "\"A, <b>\" <sip:a@example.com;transport=tls>;tag=1;expires=60",
            "Contact",
        )
        .unwrap();
        assert_eq!(n.display.as_deref(), Some("\"A, <b>\""));
        assert_eq!(n.uri, "sip:a@example.com;transport=tls");
        assert_eq!(n.tag(), Some("1"));
        assert_eq!(n.params.get("expires"), Some(Some("60")));
        assert_eq!(
            n.to_string(),
            "\"A, <b>\" <sip:a@example.com;transport=tls>;tag=1;expires=60"
        );
        let n = NameAddr::parse("sip:a@example.com;tag=x", "To").unwrap();
        assert_eq!(n.uri, "sip:a@example.com");
        assert_eq!(n.tag(), Some("x"));
        assert_eq!(
            split_list("<sip:a@b;x=1,2>, \"c,d\" <sip:e@f>"),
            vec!["<sip:a@b;x=1,2>", "\"c,d\" <sip:e@f>"]
        );
    }
}
