//! Messages the proxy core originates itself: responses to requests it
//! rejects or answers hop-by-hop (RFC 3261 §8.2.6, §16.3, §16.10), the ACK
//! for a non-2xx final response (§17.1.1.3), CANCEL (§9.1) and BYE for
//! dialogs the media layer expired. Inputs are parsed messages from
//! `proxy::core`; outputs are wire bytes for the transport.

use std::fmt::Write as _;

use crate::sip::message::{same_header, Message};

/// Standard reason phrases for the codes the proxy generates.
pub fn reason(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Request Entity Too Large",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        430 => "Flow Failed",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        500 => "Server Internal Error",
        503 => "Service Unavailable",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        _ => "Error",
    }
}

/// A response to `req` (§8.2.6.2): Via list, From, To (with `to_tag` added
/// when the request's To has none and the code is above 100), Call-ID and
/// CSeq copied; `extra` headers appended; empty body.
pub fn response(
    req: &Message,
    code: u16,
    to_tag: Option<&str>,
    extra: &[(&str, String)],
) -> Vec<u8> {
    let mut out = format!("SIP/2.0 {code} {}\r\n", reason(code));
    for h in req.headers() {
        let copy = ["Via", "From", "Call-ID", "CSeq"]
            .iter()
            .any(|n| same_header(&h.name, n));
        if copy {
            let _ = write!(out, "{}: {}\r\n", h.name, h.value);
        } else if same_header(&h.name, "To") {
            let has_tag = req.to_tag().ok().flatten().is_some();
            match to_tag {
                Some(t) if code > 100 && !has_tag => {
                    let _ = write!(out, "{}: {};tag={t}\r\n", h.name, h.value);
                }
                _ => {
                    let _ = write!(out, "{}: {}\r\n", h.name, h.value);
                }
            }
        }
    }
    for (n, v) in extra {
        let _ = write!(out, "{n}: {v}\r\n");
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out.into_bytes()
}

/// Longest Warning text the edge writes (a log line, not a document).
const WARN_TEXT_MAX: usize = 120;

/// The value of a Warning header (RFC 3261 §20.43) the edge adds to its
/// own error responses: code 399 (miscellaneous), the edge's host as the
/// warn-agent and `why` as a quoted string, cut to printable ASCII without
/// quotes or backslashes (so it always parses) and to [`WARN_TEXT_MAX`]
/// characters.
pub fn warning_value(host: &str, why: &str) -> String {
    let text: String = why
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\')
        .take(WARN_TEXT_MAX)
        .collect();
    format!("399 {host} \"{text}\"")
}

/// An error response (400, 413, 505, 513...) for bytes the framer or the
/// message layer refused: the Via, From, To, Call-ID and CSeq lines are
/// copied raw from the head when present, so the client can match it
/// (§8.2.6, §16.3 step 1), and a Warning from `host` carries `why`. A head
/// cut short (a framer limit) contributes only its complete lines. `None`
/// for responses, which are never answered.
pub fn error_raw(raw: &[u8], code: u16, host: &str, why: &str) -> Option<Vec<u8>> {
    if raw.starts_with(b"SIP/") {
        return None;
    }
    let head = match memchr::memmem::find(raw, b"\r\n\r\n") {
        Some(end) => raw.get(..end).unwrap_or_default(),
        // No blank line: keep whole lines only (a cut Via would mislead).
        None => match memchr::memrchr(b'\n', raw) {
            Some(last) => raw.get(..last).unwrap_or_default(),
            None => raw,
        },
    };
    let mut out = format!("SIP/2.0 {code} {}\r\n", reason(code)).into_bytes();
    for line in head.split(|b| *b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = String::from_utf8_lossy(line.get(..colon).unwrap_or_default());
        let name = name.trim();
        if ["Via", "From", "To", "Call-ID", "CSeq"]
            .iter()
            .any(|n| same_header(name, n))
            && line.is_ascii()
        {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(
        format!(
            "Warning: {}\r\nContent-Length: 0\r\n\r\n",
            warning_value(host, why)
        )
        .as_bytes(),
    );
    Some(out)
}

/// The ACK for a non-2xx final response to the INVITE `invite` that the
/// proxy forwarded (§17.1.1.3): same Request-URI, top Via only, Route,
/// From, Call-ID, CSeq number; To from the response.
pub fn ack_for(invite: &Message, resp: &Message) -> Vec<u8> {
    derived(invite, "ACK", resp.header("To"))
}

/// The CANCEL for a forwarded INVITE (§9.1): same Request-URI, top Via
/// (same branch), Route, From, To, Call-ID and CSeq number.
pub fn cancel_for(invite: &Message) -> Vec<u8> {
    derived(invite, "CANCEL", None)
}

fn derived(invite: &Message, method: &str, to: Option<&str>) -> Vec<u8> {
    let uri = match &invite.start {
        crate::sip::message::StartLine::Request { uri, .. } => uri.as_str(),
        crate::sip::message::StartLine::Response { .. } => "",
    };
    let mut out = format!("{method} {uri} SIP/2.0\r\n");
    if let Ok(v) = invite.top_via() {
        let _ = write!(out, "Via: {v}\r\n");
    }
    for r in invite.header_all("Route") {
        let _ = write!(out, "Route: {r}\r\n");
    }
    out.push_str("Max-Forwards: 70\r\n");
    if let Some(f) = invite.header("From") {
        let _ = write!(out, "From: {f}\r\n");
    }
    if let Some(t) = to.or_else(|| invite.header("To")) {
        let _ = write!(out, "To: {t}\r\n");
    }
    if let Ok(c) = invite.call_id() {
        let _ = write!(out, "Call-ID: {c}\r\n");
    }
    if let Ok(c) = invite.cseq() {
        let _ = write!(out, "CSeq: {} {method}\r\n", c.seq);
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out.into_bytes()
}

/// What the proxy needs to send a BYE into one leg of a dialog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ByeLeg {
    /// Remote target (the party's original Contact URI).
    pub request_uri: String,
    /// Route set from the edge toward the party.
    pub routes: Vec<String>,
    /// From header value (the other party, with its tag).
    pub from: String,
    /// To header value (this party, with its tag).
    pub to: String,
}

/// A BYE (§15.1.1) into `leg` with our Via (`via`, including the branch).
pub fn bye(leg: &ByeLeg, via: &str, call_id: &str, cseq: u32) -> Vec<u8> {
    let mut out = format!("BYE {} SIP/2.0\r\nVia: {via}\r\n", leg.request_uri);
    for r in &leg.routes {
        let _ = write!(out, "Route: {r}\r\n");
    }
    let _ = write!(
        out,
        "Max-Forwards: 70\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} BYE\r\nReason: SIP;cause=408;text=\"session ended by sip-edge\"\r\nContent-Length: 0\r\n\r\n",
        leg.from, leg.to
    );
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] = b"INVITE sip:bob@b.example SIP/2.0\r\nVia: SIP/2.0/TLS e:5061;branch=z9hG4bKe1\r\nVia: SIP/2.0/TLS a:5061;branch=z9hG4bKa1\r\nRoute: <sip:p.b.example;lr>\r\nMax-Forwards: 69\r\nFrom: <sip:a@a.example>;tag=f1\r\nTo: <sip:bob@b.example>\r\nCall-ID: c1\r\nCSeq: 7 INVITE\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn response_adds_to_tag_and_copies_vias() {
        let req = Message::parse(INVITE).unwrap();
        let r = Message::parse(&response(
            &req,
            486,
            Some("tt"),
            &[("Retry-After", "5".into())],
        ))
        .unwrap();
        assert_eq!(r.status(), Some(486));
        assert_eq!(r.vias().unwrap().len(), 2);
        assert_eq!(r.to_tag().unwrap().as_deref(), Some("tt"));
        assert_eq!(r.header("Retry-After"), Some("5"));
        let t = Message::parse(&response(&req, 100, Some("tt"), &[])).unwrap();
        assert_eq!(t.to_tag().unwrap(), None, "100 Trying carries no To tag");
    }

    #[test]
    fn ack_and_cancel_keep_branch_and_route() {
        let req = Message::parse(INVITE).unwrap();
        let mut resp_bytes = response(&req, 486, Some("x9"), &[]);
        resp_bytes.truncate(resp_bytes.len());
        let resp = Message::parse(&resp_bytes).unwrap();
        let ack = Message::parse(&ack_for(&req, &resp)).unwrap();
        assert_eq!(ack.vias().unwrap().len(), 1);
        assert_eq!(ack.top_via().unwrap().branch(), Some("z9hG4bKe1"));
        assert_eq!(ack.to_tag().unwrap().as_deref(), Some("x9"));
        assert_eq!(ack.header("CSeq"), Some("7 ACK"));
        assert_eq!(ack.header("Route"), Some("<sip:p.b.example;lr>"));
        let c = Message::parse(&cancel_for(&req)).unwrap();
        assert_eq!(c.header("CSeq"), Some("7 CANCEL"));
        assert_eq!(c.to_tag().unwrap(), None);
    }

    #[test]
    fn bad_request_from_garbage_head() {
        let raw = b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/TLS a;branch=z9hG4bK1\r\nbroken line\r\nCall-ID: q\r\nContent-Length: 0\r\n\r\n";
        let out = error_raw(raw, 400, "10.77.0.1", "bad header line 3: \"broken\"").unwrap();
        let m = Message::parse(&out).unwrap();
        assert_eq!(m.status(), Some(400));
        assert_eq!(m.call_id().unwrap(), "q");
        let w = m.header("Warning").unwrap();
        assert!(w.starts_with("399 10.77.0.1 \"bad header line 3"), "{w}");
        assert!(error_raw(b"SIP/2.0 200 OK\r\n\r\n", 400, "h", "x").is_none());
        // A head cut at a limit: the partial last line is left out.
        let cut = b"INVITE sip:x SIP/2.0\r\nCall-ID: q\r\nVia: SIP/2.0/TLS a;bra";
        let m = Message::parse(&error_raw(cut, 513, "h", "too big").unwrap()).unwrap();
        assert_eq!(m.status(), Some(513));
        assert_eq!(m.call_id().unwrap(), "q");
        assert!(m.header("Via").is_none());
    }
}
