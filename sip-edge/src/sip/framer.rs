//! Stream framer for SIP over TLS/TCP: owns the byte buffer of one
//! connection; bytes come in from the socket/TLS reader via [`Framer::push`]
//! and leave as whole messages or RFC 5626 keep-alives via
//! [`Framer::next_frame`], for the message layer (`sip::message`).
//!
//! Sans-IO: no sockets, no clocks. The framer is hand-written rather than
//! built on rsip because rsip parses whole messages and has no notion of
//! "not enough bytes yet", Content-Length framing or size limits; we only
//! need to find the end of the head and read Content-Length, which is a
//! small, heavily tested state machine (`memchr` finds line ends, `bytes`
//! hands out the frames without copying).
//!
//! Rules implemented:
//! - RFC 3261 §18.3: on a stream every message carries Content-Length
//!   (compact form `l`, §7.3.3); a message without one is a framing error,
//!   because the stream cannot be resynchronised.
//! - RFC 3261 §7.3.1: header names are case-insensitive, whitespace may
//!   surround the colon and values may be folded onto continuation lines.
//! - RFC 3261 §7.5: CRLFs before a start-line are ignored.
//! - RFC 5626 §4.4.1: a double CRLF is a keep-alive "ping", answered by a
//!   single CRLF "pong". Which of the two a CRLF means depends on which end
//!   of the flow we are, see [`KeepAliveRole`].
//! - Limits: the head may not exceed [`FramerLimits::max_header_bytes`]
//!   and the declared body may not exceed [`FramerLimits::max_body_bytes`];
//!   both are checked before the bytes are buffered past the limit, so a
//!   peer cannot make us buffer without bound.
//!
//! Leniency (documented, tested): a bare LF is accepted as a line end in the
//! head (several deployed UAs send it), and a bare LF between messages is
//! skipped like a CRLF.

use bytes::{Bytes, BytesMut};

/// Default head limit: generous for real traffic (big Via/Record-Route
/// stacks), small enough that a slow-loris peer cannot pin much memory.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default body limit: SDP with many candidates fits easily.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// An empty buffer with more capacity than this is released
/// ([`Framer::release_idle_buffer`]).
const RELEASE_ABOVE: usize = 8 * 1024;

/// How much of an offending line an error keeps for the log.
const ERROR_SNIPPET: usize = 64;

/// Size limits applied per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramerLimits {
    /// Largest head (start-line + headers + blank line) accepted, in bytes.
    pub max_header_bytes: usize,
    /// Largest Content-Length accepted, in bytes.
    pub max_body_bytes: usize,
}

impl Default for FramerLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// Which end of an RFC 5626 flow this connection is, which decides what a
/// CRLF between messages means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAliveRole {
    /// We accepted the connection (the UA pings us): `CRLFCRLF` is a
    /// [`Frame::Ping`] that must be answered with [`PONG`]; a single stray
    /// CRLF is skipped (RFC 3261 §7.5).
    Responder,
    /// We opened the connection and send the pings: every CRLF is a
    /// [`Frame::Pong`]. A lone CRLF cannot be told apart from the start of
    /// a ping without waiting for more bytes, so the role must be known.
    Initiator,
}

/// The bytes to send back for a [`Frame::Ping`] (RFC 5626 §4.4.1).
pub const PONG: &[u8] = b"\r\n";
/// The bytes of a keep-alive ping (RFC 5626 §4.4.1).
pub const PING: &[u8] = b"\r\n\r\n";

/// One framed SIP message: the head (start-line, headers and the blank
/// line) followed by exactly Content-Length body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    bytes: Bytes,
    body_offset: usize,
}

impl RawMessage {
    /// Start-line, headers and the terminating blank line.
    pub fn head(&self) -> &[u8] {
        self.bytes.get(..self.body_offset).unwrap_or_default()
    }

    /// The body (may be empty).
    pub fn body(&self) -> &[u8] {
        self.bytes.get(self.body_offset..).unwrap_or_default()
    }

    /// The whole message as received.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The whole message, without copying.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

/// What the framer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete SIP message.
    Message(RawMessage),
    /// RFC 5626 ping (`CRLFCRLF`): answer with [`PONG`].
    Ping,
    /// RFC 5626 pong (`CRLF`), only in [`KeepAliveRole::Initiator`].
    Pong,
}

/// Why a stream can no longer be framed. After an error the connection must
/// be closed: the framer keeps returning the same error and drops input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The head grew past the limit without a blank line.
    #[error("SIP head exceeds {limit} bytes without an empty line (message at stream offset {stream_offset}); raise max_header_bytes if the peer is legitimate")]
    HeadersTooLarge {
        /// Configured `max_header_bytes`.
        limit: usize,
        /// Offset of the message's first byte in the stream.
        stream_offset: u64,
    },
    /// Content-Length announces more than the body limit.
    #[error("Content-Length {declared} exceeds the body limit of {limit} bytes (message at stream offset {stream_offset})")]
    BodyTooLarge {
        /// The declared Content-Length.
        declared: u64,
        /// Configured `max_body_bytes`.
        limit: usize,
        /// Offset of the message's first byte in the stream.
        stream_offset: u64,
    },
    /// A message on a stream without Content-Length (RFC 3261 §18.3).
    #[error("message {start_line:?} at stream offset {stream_offset} has no Content-Length, required on stream transports (RFC 3261 §18.3)")]
    MissingContentLength {
        /// Start-line of the message (truncated).
        start_line: String,
        /// Offset of the message's first byte in the stream.
        stream_offset: u64,
    },
    /// Content-Length is not a plain decimal number.
    #[error("invalid Content-Length value {value:?} (message at stream offset {stream_offset})")]
    InvalidContentLength {
        /// The value as received (truncated).
        value: String,
        /// Offset of the message's first byte in the stream.
        stream_offset: u64,
    },
    /// Two Content-Length headers disagree (a request-smuggling shape).
    #[error("conflicting Content-Length values {first} and {second} (message at stream offset {stream_offset})")]
    ConflictingContentLength {
        /// The first value seen.
        first: u64,
        /// The disagreeing value.
        second: u64,
        /// Offset of the message's first byte in the stream.
        stream_offset: u64,
    },
    /// A byte that cannot appear where it was found (not SIP, e.g. a TLS
    /// record on a plain port, binary junk, a control character in a header).
    #[error("byte 0x{byte:02x} cannot appear at stream offset {offset} ({context}); is the peer speaking SIP (TLS on a plain port?)")]
    Garbage {
        /// The offending byte.
        byte: u8,
        /// Its offset in the stream.
        offset: u64,
        /// Where it was found.
        context: &'static str,
    },
    /// The first line is neither a Request-Line nor a Status-Line.
    #[error("not a SIP start-line: {line:?} (stream offset {stream_offset})")]
    BadStartLine {
        /// The line (truncated).
        line: String,
        /// Offset of the message's first byte in the stream.
        stream_offset: u64,
    },
    /// The caller pushed more without draining complete frames first.
    #[error("framer buffer holds {buffered} bytes, above {limit}; call next_frame until it returns None before pushing more")]
    BufferFull {
        /// Bytes already buffered.
        buffered: usize,
        /// Head limit + body limit.
        limit: usize,
    },
}

impl FrameError {
    /// The SIP status a request refused with this error is answered with
    /// before the connection closes, when the offending message's head is
    /// known well enough to answer (its first line was read): 400 for a
    /// malformed start line or Content-Length (RFC 3261 §21.4.1), 413 for a
    /// body over the limit (§21.4.11), 513 for a head over the limit
    /// (§21.5.11). `None` where nothing SIP-shaped came (binary junk, TLS on
    /// a plain port) or the caller misused the framer: those close silently.
    pub fn response_code(&self) -> Option<u16> {
        match self {
            FrameError::BadStartLine { .. }
            | FrameError::MissingContentLength { .. }
            | FrameError::InvalidContentLength { .. }
            | FrameError::ConflictingContentLength { .. } => Some(400),
            FrameError::BodyTooLarge { .. } => Some(413),
            FrameError::HeadersTooLarge { .. } => Some(513),
            FrameError::Garbage { .. } | FrameError::BufferFull { .. } => None,
        }
    }
}

/// Where the framer is within the current message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages: keep-alives or a start-line may come.
    Boundary,
    /// Inside a head; `scanned` bytes were already checked for the blank
    /// line and for bad bytes; `at` says which part of the head they end in.
    Head { scanned: usize, at: HeadPart },
    /// Head complete; waiting for `head_len + body_len` bytes.
    Body { head_len: usize, body_len: usize },
}

/// Which part of the head the scan has reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadPart {
    /// The first word of the start-line: each byte is checked as it
    /// arrives so binary junk is refused after one byte.
    FirstWord,
    /// The rest of the start-line, validated as a whole at its LF.
    StartLine,
    /// Header lines.
    Headers,
}

/// Sans-IO SIP stream framer; see the module docs.
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    limits: FramerLimits,
    role: KeepAliveRole,
    state: State,
    /// Stream offset of `buf[0]`.
    consumed: u64,
    failed: Option<FrameError>,
    /// The start of the offending message's head when framing failed with
    /// an error that is answered ([`FrameError::response_code`]).
    failed_head: Option<Bytes>,
}

impl Framer {
    /// A framer for one connection.
    pub fn new(role: KeepAliveRole, limits: FramerLimits) -> Self {
        Self {
            buf: BytesMut::new(),
            limits,
            role,
            state: State::Boundary,
            consumed: 0,
            failed: None,
            failed_head: None,
        }
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Appends bytes read from the connection. Call [`Framer::next_frame`]
    /// until it returns `Ok(None)` between pushes; otherwise the buffer is
    /// refused once it holds more than one maximal message.
    pub fn push(&mut self, data: &[u8]) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let limit = self
            .limits
            .max_header_bytes
            .saturating_add(self.limits.max_body_bytes);
        if self.buf.len() > limit {
            return Err(self.fail(FrameError::BufferFull {
                buffered: self.buf.len(),
                limit,
            }));
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Whether part of a message (its first byte or more, not only CRLFs
    /// between messages) is buffered: the transport's message deadline
    /// runs while this holds (issue #14 item 8).
    pub fn in_message(&self) -> bool {
        !matches!(self.state, State::Boundary)
            || self.buf.iter().any(|b| *b != b'\r' && *b != b'\n')
    }

    /// Lets go of a buffer a large message grew, once nothing is left in
    /// it, so an idle connection holds no more than a fresh one.
    pub fn release_idle_buffer(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > RELEASE_ABOVE {
            self.buf = BytesMut::new();
        }
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.step() {
            Ok(f) => Ok(f),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// After an error with a [`FrameError::response_code`]: the offending
    /// message's head as buffered (at most `max_header_bytes`; cut short
    /// when the head was over the limit or not all read yet), to build the
    /// error response from (Via, Call-ID, CSeq...).
    pub fn failed_head(&self) -> Option<&[u8]> {
        self.failed_head.as_deref()
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        // Errors are raised while the message is at the buffer's start
        // (between messages or inside its head), so its head is a prefix.
        if e.response_code().is_some() && !matches!(self.state, State::Boundary) {
            let keep = self.buf.len().min(self.limits.max_header_bytes);
            self.failed_head = Some(self.buf.split_to(keep).freeze());
        }
        self.buf = BytesMut::new();
        self.failed = Some(e.clone());
        e
    }

    fn consume(&mut self, n: usize) -> Bytes {
        self.consumed = self.consumed.saturating_add(n as u64);
        self.buf.split_to(n).freeze()
    }

    fn step(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            match self.state {
                State::Boundary => {
                    if let Some(frame) = self.boundary()? {
                        return Ok(frame);
                    }
                }
                State::Head { scanned, at } => {
                    if !self.head(scanned, at)? {
                        return Ok(None);
                    }
                }
                State::Body { head_len, body_len } => {
                    let total = head_len.saturating_add(body_len);
                    if self.buf.len() < total {
                        return Ok(None);
                    }
                    let bytes = self.consume(total);
                    self.state = State::Boundary;
                    return Ok(Some(Frame::Message(RawMessage {
                        bytes,
                        body_offset: head_len,
                    })));
                }
            }
        }
    }

    /// Between messages. `Ok(Some(x))` returns `x` to the caller (a
    /// keep-alive, or `None` = need more bytes); `Ok(None)` means the state
    /// changed and the loop continues.
    fn boundary(&mut self) -> Result<Option<Option<Frame>>, FrameError> {
        let b = &self.buf[..];
        match (self.role, b) {
            (_, [] | [b'\r']) => Ok(Some(None)),
            (KeepAliveRole::Initiator, [b'\r', b'\n', ..]) => {
                self.consume(2);
                Ok(Some(Some(Frame::Pong)))
            }
            (KeepAliveRole::Responder, [b'\r', b'\n', b'\r', b'\n', ..]) => {
                self.consume(4);
                Ok(Some(Some(Frame::Ping)))
            }
            // A CRLF that may still become a ping.
            (KeepAliveRole::Responder, [b'\r', b'\n'] | [b'\r', b'\n', b'\r']) => Ok(Some(None)),
            // A stray CRLF before a start-line (RFC 3261 §7.5).
            (KeepAliveRole::Responder, [b'\r', b'\n', ..]) => {
                self.consume(2);
                Ok(None)
            }
            (_, [b'\n', ..]) => {
                self.consume(1);
                Ok(None)
            }
            (_, [b'\r', byte, ..]) => Err(FrameError::Garbage {
                byte: *byte,
                offset: self.consumed.saturating_add(1),
                context: "CR not followed by LF between messages",
            }),
            _ => {
                self.state = State::Head {
                    scanned: 0,
                    at: HeadPart::FirstWord,
                };
                Ok(None)
            }
        }
    }

    /// Scans the head for bad bytes and the blank line. Returns `true` when
    /// the state advanced to `Body`.
    fn head(&mut self, scanned: usize, mut at: HeadPart) -> Result<bool, FrameError> {
        let max = self.limits.max_header_bytes;
        // Never look (or wait) past the head limit.
        let avail = self.buf.len().min(max);
        let mut i = scanned;
        let mut end = None;
        while i < avail {
            let byte = self.buf[i];
            if at == HeadPart::FirstWord {
                // RFC 3261 §7.1/§7.2: a method (token) or `SIP/x.y`.
                match byte {
                    b' ' if i > 0 => at = HeadPart::StartLine,
                    b'/' => {}
                    b if is_token(b) => {}
                    _ => {
                        return Err(FrameError::Garbage {
                            byte,
                            offset: self.consumed.saturating_add(i as u64),
                            context: "first word of the start-line",
                        })
                    }
                }
            }
            match byte {
                b'\n' => {
                    if at != HeadPart::Headers {
                        check_start_line(&self.buf[..i], self.consumed)?;
                        at = HeadPart::Headers;
                    }
                    // Blank line? Needs the next one or two bytes.
                    match self.buf.get(i + 1..avail) {
                        Some([b'\n', ..]) => {
                            end = Some(i + 2);
                            break;
                        }
                        Some([b'\r', b'\n', ..]) => {
                            end = Some(i + 3);
                            break;
                        }
                        Some([] | [b'\r']) => break,
                        _ => {}
                    }
                }
                b'\r' => match self.buf.get(i + 1..avail) {
                    Some([b'\n', ..]) => {}
                    Some([]) => break,
                    _ => {
                        return Err(FrameError::Garbage {
                            byte: b'\r',
                            offset: self.consumed.saturating_add(i as u64),
                            context: "CR not followed by LF in the head",
                        })
                    }
                },
                b'\t' => {}
                // RFC 3261 §25.1 quoted-pair: a backslash escapes any
                // character but CR and LF, NUL and DEL included (RFC 4475
                // §3.1.1.2 quotes BEL, NUL and DEL in a display name). The
                // backslash is an escape when an odd run of them precedes.
                0..=0x1f | 0x7f
                    if at == HeadPart::Headers && escaped_by_backslash(&self.buf[..i]) => {}
                0..=0x1f | 0x7f => {
                    return Err(FrameError::Garbage {
                        byte,
                        offset: self.consumed.saturating_add(i as u64),
                        context: "control character in the head",
                    })
                }
                _ => {}
            }
            i += 1;
        }
        let Some(head_len) = end else {
            self.state = State::Head { scanned: i, at };
            // `i` stops short of `avail` only while waiting for the byte
            // after a line end; the limit applies to the whole head.
            if self.buf.len() >= max {
                return Err(FrameError::HeadersTooLarge {
                    limit: max,
                    stream_offset: self.consumed,
                });
            }
            return Ok(false);
        };
        let body_len = content_length(&self.buf[..head_len], self.consumed)?;
        if body_len > self.limits.max_body_bytes as u64 {
            return Err(FrameError::BodyTooLarge {
                declared: body_len,
                limit: self.limits.max_body_bytes,
                stream_offset: self.consumed,
            });
        }
        // Fits in usize: bounded by max_body_bytes.
        let body_len = usize::try_from(body_len).unwrap_or(usize::MAX);
        self.state = State::Body { head_len, body_len };
        Ok(true)
    }
}

fn snippet(b: &[u8]) -> String {
    let b = b.get(..ERROR_SNIPPET).unwrap_or(b);
    String::from_utf8_lossy(b).into_owned()
}

/// Whether the byte after `before` is escaped: an odd number of
/// backslashes ends `before`.
fn escaped_by_backslash(before: &[u8]) -> bool {
    before.iter().rev().take_while(|b| **b == b'\\').count() % 2 == 1
}

/// RFC 3261 §25.1 `token` characters.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// Request-Line `Method SP Request-URI SP SIP/x.y` or Status-Line
/// `SIP/x.y SP 3DIGIT SP Reason` (RFC 3261 §7.1, §7.2). Any version
/// number passes so the proxy can answer 505 itself.
fn check_start_line(line: &[u8], stream_offset: u64) -> Result<(), FrameError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let bad = || FrameError::BadStartLine {
        line: snippet(line),
        stream_offset,
    };
    let is_version = |w: &[u8]| {
        w.len() > 4
            && w[..4].eq_ignore_ascii_case(b"SIP/")
            && w[4..].iter().all(|c| c.is_ascii_digit() || *c == b'.')
    };
    let mut parts = line.splitn(3, |c| *c == b' ');
    let first = parts.next().ok_or_else(bad)?;
    let second = parts.next().ok_or_else(bad)?;
    let third = parts.next().ok_or_else(bad)?;
    if is_version(first) {
        if second.len() == 3 && second.iter().all(u8::is_ascii_digit) {
            return Ok(());
        }
        return Err(bad());
    }
    if !first.is_empty()
        && first.iter().all(|c| is_token(*c))
        && !second.is_empty()
        && is_version(third)
    {
        return Ok(());
    }
    Err(bad())
}

/// Finds Content-Length / `l` in a complete head (start-line excluded),
/// unfolding continuation lines.
fn content_length(head: &[u8], stream_offset: u64) -> Result<u64, FrameError> {
    let mut found: Option<u64> = None;
    for (name, value) in logical_headers(head) {
        let name = trim(&name);
        if !(name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l")) {
            continue;
        }
        let v = trim(&value);
        let invalid = || FrameError::InvalidContentLength {
            value: snippet(v),
            stream_offset,
        };
        if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
            return Err(invalid());
        }
        let n = std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(invalid)?;
        match found {
            Some(first) if first != n => {
                return Err(FrameError::ConflictingContentLength {
                    first,
                    second: n,
                    stream_offset,
                })
            }
            _ => found = Some(n),
        }
    }
    found.ok_or_else(|| {
        let first = head.split(|c| *c == b'\n').next().unwrap_or_default();
        FrameError::MissingContentLength {
            start_line: snippet(first.strip_suffix(b"\r").unwrap_or(first)),
            stream_offset,
        }
    })
}

fn trim(b: &[u8]) -> &[u8] {
    let is_ws = |c: &u8| matches!(c, b' ' | b'\t' | b'\r' | b'\n');
    let start = b.iter().position(|c| !is_ws(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !is_ws(c)).map_or(start, |e| e + 1);
    b.get(start..end).unwrap_or_default()
}

/// Header lines of a head (after the start-line), continuation lines
/// joined to their header with one space. Lines without a colon are
/// skipped here; the message layer reports them.
fn logical_headers(head: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut lines = head
        .split(|c| *c == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let _start_line = lines.next();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            if let Some((_, v)) = out.last_mut() {
                v.push(b' ');
                v.extend_from_slice(trim(line));
            }
            continue;
        }
        if let Some(colon) = memchr::memchr(b':', line) {
            out.push((line[..colon].to_vec(), line[colon + 1..].to_vec()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(s: &str) -> Frame {
        let head_end = s
            .find("\r\n\r\n")
            .map(|i| i + 4)
            .or_else(|| s.find("\n\n").map(|i| i + 2))
            .expect("fixture has a blank line");
        Frame::Message(RawMessage {
            bytes: Bytes::copy_from_slice(s.as_bytes()),
            body_offset: head_end,
        })
    }

    fn drain(f: &mut Framer) -> Result<Vec<Frame>, FrameError> {
        let mut out = Vec::new();
        while let Some(fr) = f.next_frame()? {
            out.push(fr);
        }
        Ok(out)
    }

    fn frames_of(role: KeepAliveRole, input: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut f = Framer::new(role, FramerLimits::default());
        f.push(input)?;
        drain(&mut f)
    }

    const OPTIONS: &str = "OPTIONS sip:edge.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 192.0.2.10:5061;branch=z9hG4bK1\r\nCall-ID: a@b\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn quoted_pair_control_characters_are_sip() {
        // RFC 3261 §25.1 quoted-pair, RFC 4475 §3.1.1.2: NUL, BEL and DEL
        // after a backslash belong to the header.
        let m = "OPTIONS sip:a@example.com SIP/2.0\r\nTo: \"BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f\" <sip:a@example.com>\r\nl: 0\r\n\r\n";
        assert_eq!(
            frames_of(KeepAliveRole::Responder, m.as_bytes()),
            Ok(vec![msg(m)])
        );
        // Bare, or after an escaped backslash, they are still junk.
        for bad in [
            "OPTIONS sip:a@example.com SIP/2.0\r\nTo: \"a\x00\" <sip:a@example.com>\r\nl: 0\r\n\r\n",
            "OPTIONS sip:a@example.com SIP/2.0\r\nTo: \"a\\\\\x00\" <sip:a@example.com>\r\nl: 0\r\n\r\n",
            "OPTIONS sip:a@\\\x00 SIP/2.0\r\nl: 0\r\n\r\n",
        ] {
            assert!(
                matches!(
                    frames_of(KeepAliveRole::Responder, bad.as_bytes()),
                    Err(FrameError::Garbage { byte: 0, .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn single_message_without_body() {
        assert_eq!(
            frames_of(KeepAliveRole::Responder, OPTIONS.as_bytes()),
            Ok(vec![msg(OPTIONS)])
        );
    }

    #[test]
    fn head_and_body_split_correctly() {
        let m = "MESSAGE sip:a@example.com SIP/2.0\r\nl: 5\r\n\r\nhello";
        let frames = frames_of(KeepAliveRole::Responder, m.as_bytes()).unwrap();
        let Frame::Message(raw) = &frames[0] else {
            panic!("not a message")
        };
        assert_eq!(raw.body(), b"hello");
        assert_eq!(
            raw.head(),
            b"MESSAGE sip:a@example.com SIP/2.0\r\nl: 5\r\n\r\n"
        );
        assert_eq!(raw.as_bytes(), m.as_bytes());
    }

    #[test]
    fn content_length_spellings() {
        for h in [
            "Content-Length: 3",
            "content-length:3",
            "CONTENT-LENGTH   :   3   ",
            "l: 3",
            "L:3",
            "Content-Length:\r\n 3",
            "Content-Length:\r\n\t  3",
            "l :\t3",
        ] {
            let m = format!("MESSAGE sip:a@example.com SIP/2.0\r\n{h}\r\n\r\nabc");
            let frames = frames_of(KeepAliveRole::Responder, m.as_bytes());
            assert_eq!(frames, Ok(vec![msg(&m)]), "header {h:?}");
        }
    }

    #[test]
    fn lookalike_headers_are_not_content_length() {
        // `Lx:` and `Content-Lengthy:` are other headers; message then has none.
        for h in ["Lx: 3", "Content-Lengthy: 3", "X-l: 3"] {
            let m = format!("MESSAGE sip:a@example.com SIP/2.0\r\n{h}\r\n\r\n");
            assert!(
                matches!(
                    frames_of(KeepAliveRole::Responder, m.as_bytes()),
                    Err(FrameError::MissingContentLength { .. })
                ),
                "{h}"
            );
        }
    }

    #[test]
    fn missing_content_length_is_an_error_with_context() {
        let m = "INVITE sip:bob@example.com SIP/2.0\r\nCall-ID: x\r\n\r\nv=0\r\n";
        let mut input = OPTIONS.as_bytes().to_vec();
        input.extend_from_slice(m.as_bytes());
        let mut f = Framer::new(KeepAliveRole::Responder, FramerLimits::default());
        f.push(&input).unwrap();
        assert_eq!(f.next_frame(), Ok(Some(msg(OPTIONS))));
        let err = f.next_frame().unwrap_err();
        assert_eq!(
            err,
            FrameError::MissingContentLength {
                start_line: "INVITE sip:bob@example.com SIP/2.0".into(),
                stream_offset: OPTIONS.len() as u64,
            }
        );
        // Sticky: the stream cannot be resynchronised.
        assert_eq!(f.next_frame(), Err(err.clone()));
        assert_eq!(f.push(b"more"), Err(err));
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn invalid_and_conflicting_content_length() {
        for v in [
            "",
            "-1",
            "+1",
            "1 2",
            "0x10",
            "abc",
            "99999999999999999999999",
        ] {
            let m = format!("MESSAGE sip:a@example.com SIP/2.0\r\nContent-Length: {v}\r\n\r\n");
            assert!(
                matches!(
                    frames_of(KeepAliveRole::Responder, m.as_bytes()),
                    Err(FrameError::InvalidContentLength { .. })
                ),
                "{v:?}"
            );
        }
        let m = "MESSAGE sip:a@example.com SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\nab";
        assert_eq!(
            frames_of(KeepAliveRole::Responder, m.as_bytes()),
            Err(FrameError::ConflictingContentLength {
                first: 1,
                second: 2,
                stream_offset: 0
            })
        );
        // Equal duplicates are harmless.
        let m = "MESSAGE sip:a@example.com SIP/2.0\r\nContent-Length: 2\r\nl: 2\r\n\r\nab";
        assert_eq!(
            frames_of(KeepAliveRole::Responder, m.as_bytes()),
            Ok(vec![msg(m)])
        );
    }

    #[test]
    fn keepalives_responder() {
        let mut input = b"\r\n\r\n".to_vec();
        input.extend_from_slice(OPTIONS.as_bytes());
        input.extend_from_slice(b"\r\n\r\n\r\n\r\n\r\n");
        input.extend_from_slice(OPTIONS.as_bytes());
        assert_eq!(
            frames_of(KeepAliveRole::Responder, &input),
            Ok(vec![
                Frame::Ping,
                msg(OPTIONS),
                Frame::Ping,
                Frame::Ping,
                msg(OPTIONS)
            ])
        );
        // A lone CRLF is undecided until the next bytes come.
        let mut f = Framer::new(KeepAliveRole::Responder, FramerLimits::default());
        f.push(b"\r\n").unwrap();
        assert_eq!(f.next_frame(), Ok(None));
        f.push(b"\r\n").unwrap();
        assert_eq!(f.next_frame(), Ok(Some(Frame::Ping)));
        assert_eq!(f.next_frame(), Ok(None));
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn keepalives_initiator() {
        let mut input = b"\r\n".to_vec();
        input.extend_from_slice(OPTIONS.as_bytes());
        input.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            frames_of(KeepAliveRole::Initiator, &input),
            Ok(vec![Frame::Pong, msg(OPTIONS), Frame::Pong, Frame::Pong])
        );
        let mut f = Framer::new(KeepAliveRole::Initiator, FramerLimits::default());
        f.push(b"\r").unwrap();
        assert_eq!(f.next_frame(), Ok(None));
        f.push(b"\n").unwrap();
        assert_eq!(f.next_frame(), Ok(Some(Frame::Pong)));
    }

    #[test]
    fn bare_lf_heads_are_accepted() {
        let m = "MESSAGE sip:a@example.com SIP/2.0\nl: 2\n\nab";
        assert_eq!(
            frames_of(KeepAliveRole::Responder, m.as_bytes()),
            Ok(vec![msg(m)])
        );
        let m2 = "MESSAGE sip:a@example.com SIP/2.0\nl: 2\n\r\nab";
        let frames = frames_of(KeepAliveRole::Responder, m2.as_bytes()).unwrap();
        let Frame::Message(raw) = &frames[0] else {
            panic!()
        };
        assert_eq!(raw.body(), b"ab");
    }

    #[test]
    fn garbage_is_rejected_on_the_first_bad_byte() {
        // A TLS ClientHello on a plain port.
        let mut f = Framer::new(KeepAliveRole::Responder, FramerLimits::default());
        f.push(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
        assert_eq!(
            f.next_frame(),
            Err(FrameError::Garbage {
                byte: 0x16,
                offset: 0,
                context: "first word of the start-line"
            })
        );
        // Junk after a good message carries the stream offset.
        let mut input = OPTIONS.as_bytes().to_vec();
        input.extend_from_slice(b"\x00\x01");
        let mut f = Framer::new(KeepAliveRole::Responder, FramerLimits::default());
        f.push(&input).unwrap();
        assert_eq!(f.next_frame(), Ok(Some(msg(OPTIONS))));
        assert!(
            matches!(f.next_frame(), Err(FrameError::Garbage { byte: 0, offset, .. }) if offset == OPTIONS.len() as u64)
        );
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"INVITE\r\n\r\n",
            b"SIP/2.0 20 OK\r\nl: 0\r\n\r\n",
            b" INVITE sip:a SIP/2.0\r\n",
        ] {
            let r = frames_of(KeepAliveRole::Responder, bad);
            assert!(
                matches!(
                    r,
                    Err(FrameError::BadStartLine { .. } | FrameError::Garbage { .. })
                ),
                "{bad:?}: {r:?}"
            );
        }
        let r = frames_of(
            KeepAliveRole::Responder,
            b"INVITE sip:a SIP/2.0\r\nX: a\x01b\r\n",
        );
        assert!(
            matches!(
                r,
                Err(FrameError::Garbage {
                    byte: 1,
                    context: "control character in the head",
                    ..
                })
            ),
            "{r:?}"
        );
        let r = frames_of(KeepAliveRole::Responder, b"INVITE sip:a SIP/2.0\rX: a\r\n");
        assert!(
            matches!(r, Err(FrameError::Garbage { byte: b'\r', .. })),
            "{r:?}"
        );
        let r = frames_of(KeepAliveRole::Responder, b"\r\r\n");
        assert!(matches!(r, Err(FrameError::Garbage { .. })), "{r:?}");
    }

    #[test]
    fn any_sip_version_and_status_lines_pass_the_framer() {
        for m in [
            "OPTIONS sip:a@example.com SIP/7.0\r\nl: 0\r\n\r\n",
            "SIP/2.0 200 OK\r\nl: 0\r\n\r\n",
            "sip/2.0 180 Ringing\r\nl: 0\r\n\r\n",
            "NEWMETHOD sip:a@example.com SIP/2.0\r\nl: 0\r\n\r\n",
        ] {
            assert_eq!(
                frames_of(KeepAliveRole::Responder, m.as_bytes()),
                Ok(vec![msg(m)]),
                "{m}"
            );
        }
    }

    #[test]
    fn header_limit_without_unbounded_buffering() {
        let limits = FramerLimits {
            max_header_bytes: 128,
            max_body_bytes: 16,
        };
        let mut f = Framer::new(KeepAliveRole::Responder, limits);
        f.push(b"INVITE sip:a@example.com SIP/2.0\r\n").unwrap();
        assert_eq!(f.next_frame(), Ok(None));
        let mut err = None;
        for _ in 0..100 {
            if let Err(e) = f.push(b"X-Filler: aaaaaaaaaaaaaaaa\r\n") {
                err = Some(e);
                break;
            }
            if let Err(e) = f.next_frame() {
                err = Some(e);
                break;
            }
            assert!(f.buffered() < 128 + 64);
        }
        assert_eq!(
            err,
            Some(FrameError::HeadersTooLarge {
                limit: 128,
                stream_offset: 0
            })
        );
        assert_eq!(f.buffered(), 0);
        // Exactly at the limit passes.
        let base = "M sip:a SIP/2.0\r\nl: 0\r\n";
        let pad = 128 - base.len() - "X: \r\n\r\n".len();
        let m = format!("{base}X: {}\r\n\r\n", "a".repeat(pad));
        assert_eq!(m.len(), 128);
        let mut f = Framer::new(KeepAliveRole::Responder, limits);
        f.push(m.as_bytes()).unwrap();
        assert_eq!(f.next_frame(), Ok(Some(msg(&m))));
        let m2 = format!("{base}X: {}a\r\n\r\n", "a".repeat(pad));
        let mut f = Framer::new(KeepAliveRole::Responder, limits);
        f.push(m2.as_bytes()).unwrap();
        assert!(matches!(
            f.next_frame(),
            Err(FrameError::HeadersTooLarge { .. })
        ));
    }

    #[test]
    fn body_limit_checked_before_buffering() {
        let limits = FramerLimits {
            max_header_bytes: 1024,
            max_body_bytes: 16,
        };
        let mut f = Framer::new(KeepAliveRole::Responder, limits);
        f.push(b"MESSAGE sip:a SIP/2.0\r\nl: 17\r\n\r\n").unwrap();
        assert_eq!(
            f.next_frame(),
            Err(FrameError::BodyTooLarge {
                declared: 17,
                limit: 16,
                stream_offset: 0
            })
        );
        let m = format!("MESSAGE sip:a SIP/2.0\r\nl: 16\r\n\r\n{}", "b".repeat(16));
        let mut f = Framer::new(KeepAliveRole::Responder, limits);
        f.push(m.as_bytes()).unwrap();
        assert_eq!(f.next_frame(), Ok(Some(msg(&m))));
    }

    #[test]
    fn push_without_draining_is_refused() {
        let limits = FramerLimits {
            max_header_bytes: 64,
            max_body_bytes: 16,
        };
        let mut f = Framer::new(KeepAliveRole::Responder, limits);
        let m = "M sip:a SIP/2.0\r\nl: 0\r\n\r\n";
        for _ in 0..4 {
            f.push(m.as_bytes()).unwrap();
        }
        assert_eq!(
            f.push(m.as_bytes()),
            Err(FrameError::BufferFull {
                buffered: 4 * m.len(),
                limit: 80
            })
        );
    }

    /// Issue #14 item 7: errors whose message head is known keep that head
    /// (after a complete earlier message) so the connection can answer
    /// 400/413/513 before closing; junk keeps nothing and gets no answer.
    #[test]
    fn answerable_errors_keep_the_offending_head() {
        let limits = FramerLimits {
            max_header_bytes: 128,
            max_body_bytes: 16,
        };
        let ok = "OPTIONS sip:a SIP/2.0\r\nl: 0\r\n\r\n";
        let cases: [(String, Option<u16>); 5] = [
            (
                "INVITE sip:a\r\nCall-ID: c1\r\nl: 0\r\n\r\n".into(),
                Some(400),
            ),
            (
                "INVITE sip:a SIP/2.0\r\nCall-ID: c1\r\n\r\n".into(),
                Some(400),
            ),
            (
                "INVITE sip:a SIP/2.0\r\nCall-ID: c1\r\nl: 17\r\n\r\n".into(),
                Some(413),
            ),
            (
                format!(
                    "INVITE sip:a SIP/2.0\r\nCall-ID: c1\r\nX: {}\r\n",
                    "y".repeat(200)
                ),
                Some(513),
            ),
            ("\x16\x03\x01 junk".into(), None),
        ];
        for (bad, code) in cases {
            let mut f = Framer::new(KeepAliveRole::Responder, limits);
            f.push(format!("{ok}{bad}").as_bytes()).unwrap();
            assert_eq!(f.next_frame(), Ok(Some(msg(ok))));
            let e = f.next_frame().expect_err(&bad);
            assert_eq!(e.response_code(), code, "{bad:?}: {e}");
            match code {
                Some(_) => {
                    let head = f.failed_head().expect("head kept");
                    assert!(head.starts_with(b"INVITE sip:a"), "{bad:?}");
                    assert!(head.len() <= limits.max_header_bytes);
                    assert!(memchr::memmem::find(head, b"Call-ID: c1").is_some());
                }
                None => assert_eq!(f.failed_head(), None),
            }
        }
    }
}
