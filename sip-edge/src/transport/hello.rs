//! The first TLS record of an accepted connection, looked at before rustls
//! gets it (issue #8, attack 7): which protocol versions does the
//! ClientHello offer?
//!
//! RFC 8996 §5: a server receiving a hello for TLS 1.0 or 1.1 "MUST
//! respond with a protocol_version alert message and close the
//! connection". rustls refuses such offers, but checks the
//! signature_algorithms extension first, and a hello without it (every
//! real TLS 1.0/1.1 client's: the extension is TLS 1.2's, RFC 5246
//! §7.4.1.4.1) got a handshake_failure alert instead. So the accept path
//! reads the first record here: an offer of nothing newer than TLS 1.1 is
//! answered with protocol_version at once; anything else (TLS 1.2 or 1.3
//! offered, not a handshake record, a hello this cannot judge from its
//! first record) goes to rustls unchanged, with the bytes read replayed.
//!
//! Hand-written because neither rustls nor any crate we use exposes the
//! legacy version and supported_versions of a hello before the handshake;
//! it parses only lengths and two fields, bounds-checked, and is tested on
//! every prefix of its fixtures.

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The largest first record read: a TLS record holds at most 2^14 bytes
/// of plaintext (RFC 8446 §5.1); a longer length is not a hello we judge.
const MAX_RECORD: usize = 5 + (1 << 14);

/// What the first record says about the offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// TLS 1.2 or newer offered (or something rustls should judge: not a
    /// handshake record, or the versions are not in the first record).
    ForRustls,
    /// Nothing newer than TLS 1.1 offered; the legacy version the client
    /// sent (for the alert's record header).
    OnlyLegacy(u16),
}

/// A fatal protocol_version alert (RFC 5246 §7.2.2, description 70) in a
/// record of `version`.
pub fn protocol_version_alert(version: u16) -> [u8; 7] {
    let v = version.to_be_bytes();
    [21, v[0], v[1], 0, 2, 2, 70]
}

/// Bounded cursor over the bytes read so far.
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|s| usize::from(s[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|s| usize::from(u16::from_be_bytes([s[0], s[1]])))
    }
}

/// GREASE values (RFC 8701 §2) are ignored among the versions.
fn is_grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a
}

/// Judges the bytes read so far; `None`: read more (the first record is
/// not complete and the answer is not in what is there).
pub fn classify(buf: &[u8]) -> Option<Offer> {
    match buf.first() {
        None => return None,
        Some(22) => {}
        Some(_) => return Some(Offer::ForRustls),
    }
    if buf.len() < 5 {
        return None;
    }
    let rec_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if rec_len == 0 || 5 + rec_len > MAX_RECORD {
        return Some(Offer::ForRustls);
    }
    let whole = buf.len() >= 5 + rec_len;
    let frag = &buf[5..buf.len().min(5 + rec_len)];
    // Out of bytes: wait for the rest of the record, or, with the whole
    // record there, let rustls judge what spans several records.
    let short = if whole { Some(Offer::ForRustls) } else { None };
    let mut c = Cur { b: frag, at: 0 };
    let Some(hs_type) = c.u8() else {
        return short;
    };
    if hs_type != 1 {
        return Some(Offer::ForRustls);
    }
    let Some(len) = c.take(3) else {
        return short;
    };
    let hs_end =
        4 + ((usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]));
    let Some(v) = c.take(2) else {
        return short;
    };
    let legacy = u16::from_be_bytes([v[0], v[1]]);
    let verdict = |newest: u16| {
        if newest >= 0x0303 {
            Offer::ForRustls
        } else {
            Offer::OnlyLegacy(legacy)
        }
    };
    // random, session id, cipher suites, compression methods.
    let fields = (|| {
        c.take(32)?;
        let n = c.u8()?;
        c.take(n)?;
        let n = c.u16()?;
        c.take(n)?;
        let n = c.u8()?;
        c.take(n)
    })();
    if fields.is_none() {
        return short;
    }
    if c.at >= hs_end {
        // No extensions (RFC 5246 §7.4.1.2): the legacy version is the offer.
        return Some(verdict(legacy));
    }
    let Some(ext_len) = c.u16() else {
        return short;
    };
    let ext_end = c.at.saturating_add(ext_len);
    while c.at < ext_end {
        let (Some(ty), Some(n)) = (c.u16(), c.u16()) else {
            return short;
        };
        let Some(body) = c.take(n) else {
            return short;
        };
        if ty == 43 {
            // supported_versions (RFC 8446 §4.2.1): a length byte, then versions.
            let newest = body
                .get(1..)
                .unwrap_or(&[])
                .chunks_exact(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .filter(|v| !is_grease(*v))
                .max()
                .unwrap_or(0);
            return Some(verdict(newest));
        }
    }
    Some(verdict(legacy))
}

/// Reads from `s` until [`classify`] can judge (at most the first record);
/// returns the bytes read (to replay to rustls) and the verdict. An EOF
/// before that is `ForRustls` with what was read (rustls then fails it).
pub async fn sniff<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(Vec<u8>, Offer)> {
    let mut buf = Vec::with_capacity(512);
    loop {
        if let Some(o) = classify(&buf) {
            return Ok((buf, o));
        }
        // Straight into `buf`: no chunk array lives in the connection
        // task's future across the wait (issue #12, memory per connection).
        let want = MAX_RECORD.saturating_sub(buf.len()).min(2048);
        buf.reserve(want);
        let n = (&mut *s).take(want as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return Ok((buf, Offer::ForRustls));
        }
    }
}

/// The stream rustls runs on: the bytes [`sniff`] read, then the socket.
pub type Sniffed = tokio::io::Join<
    tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
>;

/// The TLS handshake of an accepted connection, after [`sniff`]: an offer
/// of TLS 1.0/1.1 only gets a protocol_version alert and an error; the
/// rest is rustls' handshake on the replayed bytes and the socket.
pub async fn accept(
    acc: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
) -> std::io::Result<tokio_rustls::server::TlsStream<Sniffed>> {
    use tokio::io::AsyncWriteExt as _;
    let (mut rd, mut wr) = tcp.into_split();
    let (read, offer) = sniff(&mut rd).await?;
    if let Offer::OnlyLegacy(v) = offer {
        // Best effort: the peer may be gone already.
        let _ = wr.write_all(&protocol_version_alert(v)).await;
        let _ = wr.shutdown().await;
        return Err(std::io::Error::other(
            "the client offered only TLS 1.0/1.1; protocol_version alert sent (RFC 8996)",
        ));
    }
    let stream = tokio::io::join(std::io::Cursor::new(read).chain(rd), wr);
    let mut tls = acc.accept(stream).await?;
    release_replayed(tls.get_mut().0);
    Ok(tls)
}

/// Frees the replayed bytes once rustls has read them all (the handshake
/// needs the whole ClientHello, so it has): the cursor would otherwise keep
/// the sniffed record's buffer for the connection's lifetime (issue #12,
/// memory per idle connection).
fn release_replayed(stream: &mut Sniffed) {
    let cursor = stream.reader_mut().get_mut().0;
    if cursor.position() >= cursor.get_ref().len() as u64 {
        *cursor = std::io::Cursor::new(Vec::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello record: legacy `version`, `exts` as (type, body).
    fn hello(version: u16, exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = version.to_be_bytes().to_vec();
        body.extend([7u8; 32]);
        body.push(0);
        body.extend([0, 2, 0x00, 0x2f]);
        body.extend([1, 0]);
        if !exts.is_empty() {
            let mut e = Vec::new();
            for (t, b) in exts {
                e.extend(t.to_be_bytes());
                e.extend((b.len() as u16).to_be_bytes());
                e.extend(b);
            }
            body.extend((e.len() as u16).to_be_bytes());
            body.extend(e);
        }
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![22, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    fn versions(v: &[u16]) -> (u16, Vec<u8>) {
        let mut b = vec![(v.len() * 2) as u8];
        for x in v {
            b.extend(x.to_be_bytes());
        }
        (43, b)
    }

    /// Every fixture judged on every prefix: `None` until the answer is
    /// in, then the fixture's verdict (linkerd's check_all_prefixes shape).
    #[test]
    fn every_prefix_waits_or_gives_the_fixtures_verdict() {
        let sigalgs = (13u16, vec![0, 2, 4, 3]);
        let cases: Vec<(&str, Vec<u8>, Offer)> = vec![
            (
                "TLS 1.0, no extensions (OpenSSL -tls1)",
                hello(0x0301, &[]),
                Offer::OnlyLegacy(0x0301),
            ),
            (
                "TLS 1.1 with a padding extension",
                hello(0x0302, &[(21, vec![0; 40])]),
                Offer::OnlyLegacy(0x0302),
            ),
            (
                "TLS 1.2",
                hello(0x0303, std::slice::from_ref(&sigalgs)),
                Offer::ForRustls,
            ),
            (
                "TLS 1.3 with GREASE",
                hello(
                    0x0303,
                    &[sigalgs.clone(), versions(&[0x3a3a, 0x0304, 0x0303])],
                ),
                Offer::ForRustls,
            ),
            (
                "supported_versions of 1.1 and 1.0 only",
                hello(0x0303, &[versions(&[0x0302, 0x0301])]),
                Offer::OnlyLegacy(0x0303),
            ),
            (
                "supported_versions of GREASE only",
                hello(0x0303, &[versions(&[0x0a0a])]),
                Offer::OnlyLegacy(0x0303),
            ),
            (
                "plaintext SIP",
                b"OPTIONS sip:203.0.113.1 SIP/2.0\r\n".to_vec(),
                Offer::ForRustls,
            ),
            (
                "an alert record",
                vec![21, 3, 3, 0, 2, 2, 40],
                Offer::ForRustls,
            ),
        ];
        for (name, bytes, want) in cases {
            for n in 0..bytes.len() {
                let got = classify(&bytes[..n]);
                assert!(
                    got.is_none() || got == Some(want),
                    "{name}: prefix {n} judged {got:?}, want {want:?}"
                );
            }
            assert_eq!(classify(&bytes), Some(want), "{name}");
        }
    }

    #[test]
    fn hellos_the_first_record_cannot_settle_go_to_rustls() {
        // A handshake length beyond the record (the hello spans records):
        // judged from the first record if the answer is there, else rustls.
        let mut big = hello(0x0303, &[(21, vec![0; 100])]);
        big[6..9].copy_from_slice(&[0x00, 0xff, 0xff]);
        let rec_end = big.len();
        big.truncate(rec_end - 50);
        big[3..5].copy_from_slice(&((rec_end - 50 - 5) as u16).to_be_bytes());
        assert_eq!(classify(&big), Some(Offer::ForRustls));
        // A record length above 2^14 is not a hello we judge.
        assert_eq!(classify(&[22, 3, 1, 0xff, 0xff, 1]), Some(Offer::ForRustls));
        // Garbage lengths never panic.
        for b in 0..=255u8 {
            let _ = classify(&[22, 3, 1, 0, 9, 1, b, b, b, b, b, b, b, b]);
        }
    }

    #[tokio::test]
    async fn sniff_reads_until_the_verdict_and_keeps_the_bytes() {
        let h = hello(0x0301, &[]);
        let mut more = h.clone();
        more.extend(b"rest");
        let (read, offer) = sniff(&mut &more[..]).await.expect("sniff");
        assert_eq!(offer, Offer::OnlyLegacy(0x0301));
        assert!(read.starts_with(&h[..5]) && more.starts_with(&read));
        let (read, offer) = sniff(&mut &h[..10]).await.expect("sniff at EOF");
        assert_eq!((read.len(), offer), (10, Offer::ForRustls));
        assert_eq!(protocol_version_alert(0x0301), [21, 3, 1, 0, 2, 2, 70]);
    }
}
