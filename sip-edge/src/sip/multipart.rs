//! MIME multipart bodies (RFC 2046 §5.1) as SIP carries them: splits a
//! `multipart/*` body into its parts (headers + content, as byte ranges of
//! the original body) and puts it back together with one part's content
//! replaced, every other byte (preamble, delimiters, other parts, epilogue)
//! kept as received. `media::control` uses it for Office Communicator file
//! transfer INVITEs (`multipart/mixed` = `application/sdp` +
//! `application/ms-filetransfer+xml`).
//!
//! Hand-written on purpose: the shape SIP needs is narrow (one level, no
//! transfer decoding, byte-exact reassembly), and the MIME crates we know
//! decode and re-encode parts instead of keeping their bytes, which a
//! middlebox must not do.
//!
//! Strictness (a firewall must not parse a body differently from the UA
//! behind it):
//! - The boundary comes from the `boundary` parameter (quoted or not,
//!   1–70 `bchars`, not ending in a space).
//! - A delimiter is `--boundary` at the start of the body or of a line,
//!   followed by optional linear white space and the line end; the close
//!   delimiter adds `--`. A line that starts with `--boundary` but goes on
//!   with anything else is refused as ambiguous rather than taken as
//!   content.
//! - Lines end in CRLF; a bare LF is accepted too (the line break before a
//!   delimiter belongs to the delimiter, RFC 2046 §5.1.1).
//! - Part headers end at the first empty line; folded headers are joined;
//!   a header line without a colon, a non-UTF-8 header or a repeated
//!   `Content-Type`/`Content-Transfer-Encoding` is refused.
//! - A missing close delimiter (a truncated body) is refused. The epilogue
//!   after it is kept and not looked at.

use std::ops::Range;

/// Why a multipart body cannot be handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    /// The Content-Type has no usable `boundary` parameter.
    #[error("multipart Content-Type {content_type:?} has no valid boundary parameter")]
    NoBoundary {
        /// The Content-Type value (truncated).
        content_type: String,
    },
    /// The body has no opening delimiter line.
    #[error("multipart body has no opening --{boundary} delimiter")]
    NoOpeningDelimiter {
        /// The boundary.
        boundary: String,
    },
    /// A line starts like a delimiter but is not one.
    #[error("multipart line at byte {offset} starts with the boundary but is not a delimiter")]
    BadDelimiter {
        /// Byte offset of the line.
        offset: usize,
    },
    /// The close delimiter is missing (truncated body).
    #[error("multipart body ends without its close delimiter --{boundary}--")]
    Unterminated {
        /// The boundary.
        boundary: String,
    },
    /// A part's header block is malformed.
    #[error("multipart part {part}: bad header line {line:?}")]
    BadHeader {
        /// 0-based part index.
        part: usize,
        /// The line (truncated, lossy).
        line: String,
    },
    /// A part's headers are not followed by an empty line.
    #[error("multipart part {part}: headers not ended by an empty line")]
    HeadersUnterminated {
        /// 0-based part index.
        part: usize,
    },
    /// A header that may appear once appears twice.
    #[error("multipart part {part}: header {name} repeated")]
    DuplicateHeader {
        /// 0-based part index.
        part: usize,
        /// Which header.
        name: &'static str,
    },
    /// A replacement was asked for a part that does not exist.
    #[error("multipart body has no part {index}")]
    NoSuchPart {
        /// The index asked for.
        index: usize,
    },
    /// A replacement content contains a delimiter line.
    #[error("replacement content for part {index} contains the boundary delimiter")]
    DelimiterInContent {
        /// The part.
        index: usize,
    },
}

/// One body part: where its pieces sit in the original body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The part's header block, without the empty line that ends it.
    pub headers: Range<usize>,
    /// The part's content (what follows the empty line, up to the line
    /// break before the next delimiter).
    pub content: Range<usize>,
    /// `Content-Type` value (trimmed, folding joined), if present.
    pub content_type: Option<String>,
    /// `Content-Transfer-Encoding` value (trimmed), if present.
    pub transfer_encoding: Option<String>,
}

impl Part {
    /// Lower-case `type/subtype` without parameters; `text/plain` when the
    /// part has no Content-Type (RFC 2046 §5.1.1 default).
    pub fn media_type(&self) -> String {
        self.content_type
            .as_deref()
            .map(base_type)
            .unwrap_or_else(|| "text/plain".to_owned())
    }
}

/// A parsed multipart body borrowing the original bytes.
#[derive(Debug, Clone)]
pub struct Multipart<'a> {
    body: &'a [u8],
    boundary: String,
    parts: Vec<Part>,
}

/// `Type/Sub; x=y` → `type/sub`.
pub fn base_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn truncated(s: &[u8]) -> String {
    String::from_utf8_lossy(s.get(..96).unwrap_or(s)).into_owned()
}

/// Parameters of a Content-Type value, split at `;` outside quotes; quoted
/// values are unquoted (RFC 2045 §5.1 quoted-string with quoted-pairs).
fn params(content_type: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for ch in content_type.chars() {
        if escaped {
            cur.push(ch);
            escaped = false;
            continue;
        }
        match ch {
            '\\' if quoted => {
                cur.push(ch);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            ';' if !quoted => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    fields.push(cur);
    // The first field is the media type.
    for f in fields.into_iter().skip(1) {
        let Some((name, value)) = f.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            Some(inner) => {
                let mut v = String::new();
                let mut esc = false;
                for ch in inner.chars() {
                    if esc || ch != '\\' {
                        v.push(ch);
                        esc = false;
                    } else {
                        esc = true;
                    }
                }
                v
            }
            None => value.to_owned(),
        };
        out.push((name.trim().to_ascii_lowercase(), value));
    }
    out
}

/// RFC 2046 §5.1.1 `bchars`.
fn valid_boundary(b: &str) -> bool {
    (1..=70).contains(&b.len())
        && !b.ends_with(' ')
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c))
}

/// The `boundary` parameter of a multipart Content-Type.
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    params(content_type)
        .into_iter()
        .find(|(n, _)| n == "boundary")
        .map(|(_, v)| v)
        .filter(|b| valid_boundary(b))
        .ok_or_else(|| MultipartError::NoBoundary {
            content_type: truncated(content_type.as_bytes()),
        })
}

/// One line of the body: start, end of content (before CR LF / LF), end
/// including the line break.
struct Line {
    start: usize,
    text_end: usize,
    end: usize,
}

fn lines(body: &[u8], from: usize) -> impl Iterator<Item = Line> + '_ {
    let mut pos = from;
    std::iter::from_fn(move || {
        if pos >= body.len() {
            return None;
        }
        let start = pos;
        let rest = body.get(start..).unwrap_or_default();
        let (text_end, end) = match memchr::memchr(b'\n', rest) {
            Some(i) => {
                let lf = start + i;
                let text_end = if i > 0 && rest.get(i - 1) == Some(&b'\r') {
                    lf - 1
                } else {
                    lf
                };
                (text_end, lf + 1)
            }
            None => (body.len(), body.len()),
        };
        pos = end;
        Some(Line {
            start,
            text_end,
            end,
        })
    })
}

/// What a line is with respect to the boundary.
enum Kind {
    Content,
    Delimiter,
    Close,
}

fn classify(text: &[u8], dash_boundary: &[u8], offset: usize) -> Result<Kind, MultipartError> {
    let Some(rest) = text.strip_prefix(dash_boundary) else {
        return Ok(Kind::Content);
    };
    let lwsp = |s: &[u8]| s.iter().all(|c| *c == b' ' || *c == b'\t');
    if lwsp(rest) {
        return Ok(Kind::Delimiter);
    }
    match rest.strip_prefix(b"--") {
        // A CR left at the end is the start of a line break cut off by the
        // end of the body (only the last line can keep its CR).
        Some(after) if lwsp(after.strip_suffix(b"\r").unwrap_or(after)) => Ok(Kind::Close),
        _ => Err(MultipartError::BadDelimiter { offset }),
    }
}

/// Length of the line break that ends at `end` (exclusive), if any.
fn break_before(body: &[u8], end: usize) -> usize {
    match (
        end.checked_sub(2).and_then(|i| body.get(i)),
        end.checked_sub(1).and_then(|i| body.get(i)),
    ) {
        (Some(b'\r'), Some(b'\n')) => 2,
        (_, Some(b'\n')) => 1,
        _ => 0,
    }
}

fn parse_part(body: &[u8], range: Range<usize>, index: usize) -> Result<Part, MultipartError> {
    let mut content_type = None;
    let mut transfer_encoding = None;
    let mut header_end = None;
    // (name, value) of the header being read, for folding.
    let mut fields: Vec<(String, String)> = Vec::new();
    let slice = body.get(range.clone()).unwrap_or_default();
    for line in lines(slice, 0) {
        let text = slice.get(line.start..line.text_end).unwrap_or_default();
        if text.is_empty() {
            if line.end == line.text_end {
                // An empty last line without a line break: no separator.
                break;
            }
            header_end = Some((line.start, line.end));
            break;
        }
        let bad = || MultipartError::BadHeader {
            part: index,
            line: truncated(text),
        };
        let text = std::str::from_utf8(text).map_err(|_| bad())?;
        if text.starts_with([' ', '\t']) {
            let last = fields.last_mut().ok_or_else(bad)?;
            last.1.push(' ');
            last.1.push_str(text.trim());
            continue;
        }
        let (name, value) = text.split_once(':').ok_or_else(bad)?;
        let name = name.trim_end();
        if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic() && c != b':') {
            return Err(bad());
        }
        fields.push((name.to_owned(), value.trim().to_owned()));
    }
    let (headers, content) = match header_end {
        Some((h, c)) => (range.start..range.start + h, range.start + c..range.end),
        // A part with nothing in it (RFC 2046 allows an empty body part).
        None if slice.is_empty() => (range.clone(), range.clone()),
        None => return Err(MultipartError::HeadersUnterminated { part: index }),
    };
    for (name, value) in fields {
        let slot = if name.eq_ignore_ascii_case("content-type") {
            Some((&mut content_type, "Content-Type"))
        } else if name.eq_ignore_ascii_case("content-transfer-encoding") {
            Some((&mut transfer_encoding, "Content-Transfer-Encoding"))
        } else {
            None
        };
        if let Some((slot, name)) = slot {
            if slot.replace(value).is_some() {
                return Err(MultipartError::DuplicateHeader { part: index, name });
            }
        }
    }
    Ok(Part {
        headers,
        content,
        content_type,
        transfer_encoding,
    })
}

impl<'a> Multipart<'a> {
    /// Splits `body` using the boundary of `content_type`.
    pub fn parse(content_type: &str, body: &'a [u8]) -> Result<Multipart<'a>, MultipartError> {
        let boundary = boundary(content_type)?;
        let dash = [b"--".as_slice(), boundary.as_bytes()].concat();
        // Each part's raw range (headers + content), opened at the end of
        // a delimiter line and closed at the line break before the next.
        let mut open: Option<usize> = None;
        let mut raws: Vec<Range<usize>> = Vec::new();
        let mut closed = false;
        for line in lines(body, 0) {
            let text = body.get(line.start..line.text_end).unwrap_or_default();
            let kind = classify(text, &dash, line.start)?;
            if matches!(kind, Kind::Content) {
                continue;
            }
            if let Some(start) = open.take() {
                let end = line.start - break_before(body, line.start);
                raws.push(start..end.max(start));
            }
            match kind {
                Kind::Close => {
                    if raws.is_empty() {
                        // `--b--` before any part: nothing to close.
                        return Err(MultipartError::NoOpeningDelimiter { boundary });
                    }
                    closed = true;
                    break;
                }
                _ => {
                    if line.end == line.text_end {
                        // A delimiter at the very end, with no line break.
                        return Err(MultipartError::Unterminated { boundary });
                    }
                    open = Some(line.end);
                }
            }
        }
        if !closed {
            return Err(if raws.is_empty() && open.is_none() {
                MultipartError::NoOpeningDelimiter { boundary }
            } else {
                MultipartError::Unterminated { boundary }
            });
        }
        let parts = raws
            .into_iter()
            .enumerate()
            .map(|(i, r)| parse_part(body, r, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Multipart {
            body,
            boundary,
            parts,
        })
    }

    /// The boundary in use.
    pub fn boundary(&self) -> &str {
        &self.boundary
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The content bytes of part `index`.
    pub fn content(&self, index: usize) -> Option<&'a [u8]> {
        self.parts
            .get(index)
            .and_then(|p| self.body.get(p.content.clone()))
    }

    /// The original body with part `index`'s content replaced by `new`;
    /// every other byte is kept. Refuses content that would contain a
    /// delimiter line (it would split the part for the receiver).
    pub fn replace_content(&self, index: usize, new: &[u8]) -> Result<Vec<u8>, MultipartError> {
        let part = self
            .parts
            .get(index)
            .ok_or(MultipartError::NoSuchPart { index })?;
        let dash = [b"--".as_slice(), self.boundary.as_bytes()].concat();
        if lines(new, 0).any(|l| {
            new.get(l.start..l.text_end)
                .is_some_and(|t| t.starts_with(&dash))
        }) {
            return Err(MultipartError::DelimiterInContent { index });
        }
        let head = self.body.get(..part.content.start).unwrap_or_default();
        let tail = self.body.get(part.content.end..).unwrap_or_default();
        // An empty part (RFC 2046 §5.1.1 allows one) has no empty line
        // between headers and content, and the line break before the next
        // delimiter may be the one that ended the previous delimiter line:
        // content put there as is would be read as headers, or run into
        // the delimiter line, so the receiver would see other parts than
        // the edge checked. Give it the empty header block and its own
        // line break.
        let empty_part = part.content.start == part.headers.end;
        if empty_part && !new.is_empty() {
            let sep: &[u8] =
                if tail.is_empty() || tail.starts_with(b"\n") || tail.starts_with(b"\r\n") {
                    b""
                } else {
                    b"\r\n"
                };
            return Ok([head, b"\r\n", new, sep, tail].concat());
        }
        Ok([head, new, tail].concat())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `multipart` fuzz target: content replaced into an empty
    /// part ran into the next delimiter line ("x=replaced--b"), so the
    /// rewritten body no longer split into the parts the edge checked.
    #[test]
    fn content_replaced_into_an_empty_part_stays_that_part() {
        for body in [
            &b"--b\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n"[..],
            b"--b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n",
        ] {
            let m = Multipart::parse("multipart/mixed;boundary=b", body).unwrap();
            assert_eq!(m.content(0), Some(&b""[..]));
            let out = m.replace_content(0, b"x=replaced").unwrap();
            let again = Multipart::parse("multipart/mixed;boundary=b", &out)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
            assert_eq!(again.parts().len(), 2);
            assert_eq!(again.content(0), Some(&b"x=replaced"[..]));
            assert_eq!(again.content(1), Some(&b"hi"[..]));
        }
    }

    const CT: &str = "multipart/mixed; boundary=\"----=_Part 1\"";
    const BODY: &str = "preamble text\r\n\
        ------=_Part 1\r\n\
        Content-Type: application/sdp\r\n\
        \r\n\
        v=0\r\nc=IN IP4 10.0.0.1\r\n\
        \r\n\
        ------=_Part 1  \r\n\
        content-type: application/ms-filetransfer+xml;\r\n charset=utf-8\r\n\
        Content-Transfer-Encoding: 8bit\r\n\
        \r\n\
        <request/>\
        \r\n\
        ------=_Part 1--\r\n\
        epilogue\r\n";

    #[test]
    fn splits_parts_with_preamble_epilogue_folding_and_padding() {
        let m = Multipart::parse(CT, BODY.as_bytes()).expect("parse");
        assert_eq!(m.boundary(), "----=_Part 1");
        assert_eq!(m.parts().len(), 2);
        assert_eq!(m.parts()[0].media_type(), "application/sdp");
        assert_eq!(
            m.content(0),
            Some(b"v=0\r\nc=IN IP4 10.0.0.1\r\n".as_slice())
        );
        assert_eq!(m.parts()[1].media_type(), "application/ms-filetransfer+xml");
        assert_eq!(
            m.parts()[1].content_type.as_deref(),
            Some("application/ms-filetransfer+xml; charset=utf-8")
        );
        assert_eq!(m.parts()[1].transfer_encoding.as_deref(), Some("8bit"));
        assert_eq!(m.content(1), Some(b"<request/>".as_slice()));
    }

    #[test]
    fn replace_keeps_every_other_byte() {
        let m = Multipart::parse(CT, BODY.as_bytes()).expect("parse");
        let out = m
            .replace_content(0, b"v=0\r\nc=IN IP4 192.0.2.9\r\n")
            .expect("replace");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            BODY.replace("10.0.0.1", "192.0.2.9")
        );
        assert_eq!(
            m.replace_content(0, b"v=0\r\n------=_Part 1--\r\n"),
            Err(MultipartError::DelimiterInContent { index: 0 })
        );
        assert_eq!(
            m.replace_content(2, b""),
            Err(MultipartError::NoSuchPart { index: 2 })
        );
    }

    #[test]
    fn bare_lf_and_unquoted_boundary_and_body_starting_with_delimiter() {
        let body = "--b\nContent-Type: application/sdp\n\nv=0\n--b--";
        let m = Multipart::parse("multipart/mixed;boundary=b", body.as_bytes()).expect("parse");
        assert_eq!(m.parts().len(), 1);
        assert_eq!(m.content(0), Some(b"v=0".as_slice()));
        assert_eq!(
            m.parts()[0].headers,
            4..34,
            "header lines with their breaks"
        );
    }

    #[test]
    fn boundary_parameter_rules() {
        assert_eq!(
            boundary("multipart/mixed; BOUNDARY=abc").as_deref(),
            Ok("abc")
        );
        assert_eq!(
            boundary("multipart/mixed; x=\"a;b\"; boundary=\"q\\\"\"").ok(),
            None,
            "a quote is not a bchar"
        );
        assert_eq!(
            boundary("multipart/mixed; x=\"a;boundary=z\"; boundary=y").as_deref(),
            Ok("y"),
            "`;` inside quotes does not split"
        );
        for bad in [
            "multipart/mixed",
            "multipart/mixed; boundary=",
            "multipart/mixed; boundary=\"a \"",
            "multipart/mixed; boundary=a<b",
        ] {
            assert!(boundary(bad).is_err(), "{bad}");
        }
        let long = format!("multipart/mixed; boundary={}", "x".repeat(71));
        assert!(boundary(&long).is_err());
    }

    /// A malformed body and the check its error must pass.
    type Case = (&'static str, fn(&MultipartError) -> bool);

    #[test]
    fn malformed_bodies_are_refused() {
        let ct = "multipart/mixed;boundary=b";
        let cases: &[Case] = &[
            ("no delimiter at all", |e| {
                matches!(e, MultipartError::NoOpeningDelimiter { .. })
            }),
            ("--b--\r\n", |e| {
                matches!(e, MultipartError::NoOpeningDelimiter { .. })
            }),
            ("--b\r\nContent-Type: a/b\r\n\r\nx\r\n", |e| {
                matches!(e, MultipartError::Unterminated { .. })
            }),
            ("--b\r\nContent-Type: a/b\r\n\r\nx\r\n--b", |e| {
                matches!(e, MultipartError::Unterminated { .. })
            }),
            ("--b\r\nContent-Type: a/b\r\n\r\nx\r\n--bx\r\n--b--", |e| {
                matches!(e, MultipartError::BadDelimiter { offset: 29 })
            }),
            ("--b\r\nContent-Type: a/b\r\n\r\nx\r\n--b--x\r\n", |e| {
                matches!(e, MultipartError::BadDelimiter { .. })
            }),
            ("--b\r\nno colon here\r\n\r\nx\r\n--b--", |e| {
                matches!(e, MultipartError::BadHeader { part: 0, .. })
            }),
            ("--b\r\n folded first\r\n\r\nx\r\n--b--", |e| {
                matches!(e, MultipartError::BadHeader { part: 0, .. })
            }),
            ("--b\r\nContent-Type: a/b\r\n--b--", |e| {
                matches!(e, MultipartError::HeadersUnterminated { part: 0 })
            }),
            (
                "--b\r\nContent-Type: a/b\r\nContent-type: c/d\r\n\r\nx\r\n--b--",
                |e| {
                    matches!(
                        e,
                        MultipartError::DuplicateHeader {
                            part: 0,
                            name: "Content-Type"
                        }
                    )
                },
            ),
        ];
        for (body, want) in cases {
            let e = Multipart::parse(ct, body.as_bytes()).expect_err(body);
            assert!(want(&e), "{body:?}: {e:?}");
        }
        let e = Multipart::parse(ct, b"--b\r\nX-H: \xff\r\n\r\nx\r\n--b--").expect_err("utf-8");
        assert!(matches!(e, MultipartError::BadHeader { .. }), "{e:?}");
    }

    #[test]
    fn an_empty_part_has_no_type_but_parses() {
        let m = Multipart::parse("multipart/mixed;boundary=b", b"--b\r\n--b--").expect("parse");
        assert_eq!(m.parts().len(), 1);
        assert_eq!(m.parts()[0].media_type(), "text/plain");
        assert_eq!(m.content(0), Some(b"".as_slice()));
    }

    #[test]
    fn every_prefix_parses_or_errs_without_panicking() {
        for n in 0..=BODY.len() {
            let prefix = BODY.as_bytes().get(..n).expect("prefix");
            if let Ok(m) = Multipart::parse(CT, prefix) {
                // Only prefixes that keep the close delimiter parse.
                assert!(
                    n >= BODY.find("------=_Part 1--").expect("close") + 16,
                    "{n}"
                );
                for i in 0..m.parts().len() {
                    let _ = m.replace_content(i, b"x");
                }
            }
        }
    }
}
