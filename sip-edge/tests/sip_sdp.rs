//! SDP rewrite tests over `tests/fixtures/sdp/` (RFC 8866/4566/3605/8839/
//! 4975/5547/4145 shapes) and the SDP inside the SIP fixtures: flows
//! reported, addresses hidden, unknown lines and line ends untouched.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use sip_edge::sip::message::Message;
use sip_edge::sip::sdp::{
    is_private, Allocation, CandidatePolicy, Direction, FlowRequest, NoPinhole, Proto,
    RewritePolicy, Sdp, SdpError,
};
use sip_edge::sip::uri::Host;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .expect("fixture")
}

const EDGE: &str = "203.0.113.5";

fn policy(c: CandidatePolicy) -> RewritePolicy {
    RewritePolicy {
        candidates: c,
        edge_v4: Some(EDGE.parse().expect("v4")),
        edge_v6: Some("2001:db8:e::5".parse().expect("v6")),
    }
}

/// Hands out 40000, 40002, ... on the edge address of the stream's family.
fn counter() -> impl FnMut(&FlowRequest<'_>) -> Option<Allocation> {
    let mut next = 40000u16;
    move |req: &FlowRequest<'_>| {
        let v6 = matches!(
            req.flow.rtp.as_ref().and_then(|e| e.host.ip()),
            Some(IpAddr::V6(_))
        );
        let addr: IpAddr = if v6 {
            "2001:db8:e::5".parse().ok()?
        } else {
            EDGE.parse().ok()?
        };
        let port = next;
        next += 2;
        Some(Allocation {
            addr,
            port,
            rtcp_port: None,
        })
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).expect("utf8")
}

fn ip(s: &str) -> Host {
    Host::Ip(s.parse().expect("ip"))
}

#[test]
fn every_fixture_parses_and_serialises_identically() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdp");
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("dir") {
        let p = e.expect("entry").path();
        let raw = std::fs::read(&p).expect("read");
        let sdp = Sdp::parse(&raw).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(sdp.to_bytes(), raw, "{}", p.display());
        n += 1;
    }
    assert!(n >= 7);
}

#[test]
fn rfc8866_example_mixed_families() {
    let sdp = Sdp::parse(&fixture("sdp/rfc8866_5_example.sdp")).unwrap();
    let flows = sdp.flows();
    assert_eq!(flows.len(), 3);
    assert_eq!(
        flows[0].rtp.as_ref().map(|e| (&e.host, e.port)),
        Some((&ip("198.51.100.1"), 49170))
    );
    assert_eq!(flows[0].rtcp.as_ref().map(|e| e.port), Some(49171));
    assert_eq!(
        flows[2].rtp.as_ref().map(|e| e.host.clone()),
        Some(ip("2001:db8::2"))
    );
    let out = sdp
        .rewrite(&policy(CandidatePolicy::Keep), &mut counter())
        .unwrap();
    let t = text(&out.sdp);
    assert!(
        t.contains("o=jdoe 3724394400 3724394405 IN IP4 203.0.113.5\r\n"),
        "{t}"
    );
    assert!(t.contains("\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n"), "{t}");
    assert!(t.contains("m=audio 40000 RTP/AVP 0\r\nm=audio 40002 RTP/AVP 0\r\nm=video 40004 RTP/AVP 99\r\nc=IN IP6 2001:db8:e::5\r\n"), "{t}");
    assert!(t.contains("u=http://www.jdoe.example.com/home.html\r\ne=Jane Doe <jane@jdoe.example.com>\r\np=+1 617 555-6011\r\n"));
    assert_eq!(
        out.flows[2].new_rtp,
        Some("[2001:db8:e::5]:40004".parse().unwrap())
    );
    assert_eq!(
        out.flows[0].new_rtcp,
        Some("203.0.113.5:40001".parse().unwrap())
    );
    assert!(!t.contains("198.51.100.1"));
}

#[test]
fn rfc4566_multicast_gets_no_pinhole_and_keeps_lf() {
    let raw = fixture("sdp/rfc4566_5_example.sdp");
    let sdp = Sdp::parse(&raw).unwrap();
    assert!(sdp
        .flows()
        .iter()
        .all(|f| f.no_pinhole == Some(NoPinhole::Multicast)));
    assert!(sdp
        .flows()
        .iter()
        .all(|f| f.direction == Direction::RecvOnly));
    let mut called = false;
    let out = sdp
        .rewrite(&policy(CandidatePolicy::Keep), &mut |_: &FlowRequest<
            '_,
        >| {
            called = true;
            None
        })
        .unwrap();
    assert!(!called, "no allocation for multicast");
    let t = text(&out.sdp);
    assert!(t.contains("c=IN IP4 233.252.0.12/127\n"));
    assert!(t.contains("m=audio 49170 RTP/AVP 0\n"));
    assert!(!t.contains('\r'), "LF line ends preserved");
    assert!(
        t.contains("o=jdoe 2890844526 2890842807 IN IP4 203.0.113.5\n"),
        "o= hides the origin address"
    );
}

#[test]
fn rfc3605_rtcp_attribute_with_and_without_address() {
    let sdp = Sdp::parse(&fixture("sdp/rfc3605_rtcp.sdp")).unwrap();
    let f = sdp.flows();
    assert_eq!(
        f[0].rtcp.as_ref().map(|e| (e.host.clone(), e.port)),
        Some((ip("10.77.0.20"), 53020))
    );
    assert_eq!(
        f[1].rtcp.as_ref().map(|e| (e.host.clone(), e.port)),
        Some((ip("10.77.0.21"), 53022))
    );
    assert_eq!(f[1].direction, Direction::SendOnly);
    let mut alloc = |req: &FlowRequest<'_>| {
        assert!(req.needs_rtcp);
        Some(Allocation {
            addr: EDGE.parse().ok()?,
            port: 41000 + 10 * req.flow.index as u16,
            rtcp_port: Some(45001 + req.flow.index as u16),
        })
    };
    let out = sdp
        .rewrite(&policy(CandidatePolicy::Keep), &mut alloc)
        .unwrap();
    let t = text(&out.sdp);
    assert!(
        t.contains("m=audio 41000 RTP/AVP 0\r\na=rtcp:45001\r\n"),
        "{t}"
    );
    assert!(
        t.contains("m=video 41010 RTP/AVP 31\r\na=rtcp:45002 IN IP4 203.0.113.5\r\na=sendonly\r\n"),
        "{t}"
    );
    assert!(!t.contains("10.77."), "{t}");
    assert_eq!(
        out.flows[1].new_rtcp,
        Some("203.0.113.5:45002".parse().unwrap())
    );
}

#[test]
fn rfc8839_candidates_per_policy() {
    let raw = fixture("sdp/rfc8839_ice_offer.sdp");
    let sdp = Sdp::parse(&raw).unwrap();
    let f = &sdp.flows()[0];
    assert!(f.rtcp_mux);
    assert_eq!(f.rtcp, None);
    let run = |p| text(&sdp.rewrite(&policy(p), &mut counter()).unwrap().sdp);

    let keep = run(CandidatePolicy::Keep);
    assert!(keep.contains("a=candidate:1 1 UDP 2130706431 10.77.0.20 45664 typ host\r\n"));
    assert!(
        keep.contains("a=rtcp:40000\r\n"),
        "mux a=rtcp follows the RTP port: {keep}"
    );

    let removed = run(CandidatePolicy::RemovePrivateHost);
    assert!(!removed.contains("typ host"), "{removed}");
    assert!(
        removed.contains(
            "a=candidate:3 1 UDP 1694498815 192.0.2.3 45664 typ srflx raddr 0.0.0.0 rport 9\r\n"
        ),
        "{removed}"
    );
    assert!(!removed.contains("10.77."), "{removed}");
    assert!(!removed.contains("fd00::"), "{removed}");
    assert!(!removed.contains(".local"), "{removed}");

    let replaced = run(CandidatePolicy::ReplacePrivateHost);
    assert!(
        replaced.contains("a=candidate:1 1 UDP 2130706431 203.0.113.5 40000 typ host\r\n"),
        "{replaced}"
    );
    assert_eq!(replaced.matches("typ host").count(), 1, "{replaced}");

    let none = run(CandidatePolicy::RemoveAll);
    assert!(!none.contains("a=candidate"));
    for t in [&keep, &removed, &replaced, &none] {
        assert!(t.contains("a=x-unknown-attribute:keep me   exactly\r\n"));
        assert!(
            t.contains("a=ice-pwd:asd88fgpdd777uzjYhagZg\r\nb=RS:0\r\n")
                || t.contains("b=RS:0\r\nb=RR:0\r\n")
        );
    }
}

/// An ICE offer with public host candidates only (baresip's `ice`
/// module outside, seen in tests/tests/softphones.rs): relayed, its
/// default destination becomes the edge, so a host candidate naming the
/// party's own address would leave the callee with a default destination
/// no candidate matches (RFC 8445 §5.4: ice-mismatch) and an address
/// around the relay. The first host candidate per component now names the
/// edge's address and port, the others go; a non-host public candidate
/// stays as before.
#[test]
fn rfc8445_public_host_candidates_follow_the_relayed_default_destination() {
    let raw = b"v=0\r\no=- 1 1 IN IP4 198.51.100.2\r\ns=-\r\nc=IN IP4 198.51.100.2\r\nt=0 0\r\na=ice-ufrag:8P6wL9y\r\na=ice-pwd:ErgxWbwFakFEljC2ytnDAT5xZyfBEMf\r\nm=audio 20674 RTP/AVP 0\r\na=rtcp-mux\r\na=candidate:c6336402 1 UDP 2113929471 198.51.100.2 20674 typ host\r\na=candidate:ba0dfe20 1 UDP 2113929471 2001:db8:ff::2 20674 typ host\r\na=candidate:5 1 UDP 1694498815 192.0.2.9 30000 typ srflx raddr 198.51.100.2 rport 20674\r\n";
    let sdp = Sdp::parse(raw).unwrap();
    for p in [
        CandidatePolicy::ReplacePrivateHost,
        CandidatePolicy::RemovePrivateHost,
    ] {
        let t = text(&sdp.rewrite(&policy(p), &mut counter()).unwrap().sdp);
        assert!(t.contains("m=audio 40000 RTP/AVP 0\r\n"), "{t}");
        assert!(!t.contains("198.51.100.2 20674"), "{p:?}: {t}");
        assert!(!t.contains("2001:db8:ff::2"), "{p:?}: {t}");
        assert!(
            t.contains("a=candidate:5 1 UDP 1694498815 192.0.2.9 30000 typ srflx"),
            "{p:?}: {t}"
        );
        let hosts = t.matches("typ host").count();
        if p == CandidatePolicy::ReplacePrivateHost {
            assert!(
                t.contains("a=candidate:c6336402 1 UDP 2113929471 203.0.113.5 40000 typ host\r\n"),
                "{t}"
            );
            assert_eq!(hosts, 1, "{t}");
        } else {
            assert_eq!(hosts, 0, "{t}");
        }
    }
    // A host candidate that already is the default destination (nat mode:
    // the outside party's own address shown to the inside) stays.
    let mut same = |_: &FlowRequest<'_>| {
        Some(Allocation {
            addr: "198.51.100.2".parse().ok()?,
            port: 20674,
            rtcp_port: None,
        })
    };
    let t = text(
        &sdp.rewrite(&policy(CandidatePolicy::ReplacePrivateHost), &mut same)
            .unwrap()
            .sdp,
    );
    assert!(
        t.contains("a=candidate:c6336402 1 UDP 2113929471 198.51.100.2 20674 typ host\r\n"),
        "{t}"
    );
}

#[test]
fn rfc4975_msrp_path_rewritten() {
    let sdp = Sdp::parse(&fixture("sdp/rfc4975_example.sdp")).unwrap();
    let f = &sdp.flows()[0];
    assert_eq!(f.proto, Proto::Tcp);
    assert_eq!(f.kind, "message");
    assert_eq!(f.rtcp, None);
    assert_eq!(
        f.rtp.as_ref().map(|e| e.host.clone()),
        Some(Host::Name("alice.example.com".into()))
    );
    assert_eq!(
        f.msrp_path.as_deref(),
        Some("msrp://alice.example.com:7654/jshA7weztas;tcp")
    );
    let out = sdp
        .rewrite(&policy(CandidatePolicy::Keep), &mut counter())
        .unwrap();
    let t = text(&out.sdp);
    assert!(
        t.contains("c=IN IP4 203.0.113.5\r\nt=0 0\r\nm=message 40000 TCP/MSRP *\r\n"),
        "{t}"
    );
    assert!(
        t.contains("a=path:msrp://203.0.113.5:40000/jshA7weztas;tcp\r\n"),
        "{t}"
    );
    assert!(!t.contains("alice.example.com"), "{t}");
}

#[test]
fn rfc5547_file_transfer_keeps_file_attributes() {
    let raw = fixture("sdp/rfc5547_file_transfer.sdp");
    let sdp = Sdp::parse(&raw).unwrap();
    assert_eq!(sdp.flows()[0].direction, Direction::SendOnly);
    let out = sdp
        .rewrite(&policy(CandidatePolicy::Keep), &mut counter())
        .unwrap();
    let t = text(&out.sdp);
    let raw_t = text(&raw);
    for l in raw_t
        .lines()
        .filter(|l| l.starts_with("a=file-") || l.starts_with("i=") || l.starts_with("a=accept"))
    {
        assert!(t.contains(l), "{l} lost");
    }
    assert!(t.contains("a=path:msrp://203.0.113.5:40000/jshA7we;tcp"));
}

#[test]
fn rfc4145_tcp_setup_port_zero_and_inactive() {
    let sdp = Sdp::parse(&fixture("sdp/rfc4145_example.sdp")).unwrap();
    let f = sdp.flows();
    assert_eq!(f.len(), 4);
    assert_eq!(
        (
            f[0].proto,
            f[0].setup.as_deref(),
            f[0].connection.as_deref()
        ),
        (Proto::Tcp, Some("passive"), Some("new"))
    );
    assert_eq!(
        (f[1].kind.as_str(), f[1].setup.as_deref()),
        ("application", Some("active"))
    );
    assert_eq!(f[2].no_pinhole, Some(NoPinhole::PortZero));
    assert_eq!(f[3].no_pinhole, Some(NoPinhole::Inactive));
    let mut asked = Vec::new();
    let mut alloc = |req: &FlowRequest<'_>| {
        asked.push(req.flow.index);
        Some(Allocation {
            addr: EDGE.parse().ok()?,
            port: 42000 + req.flow.index as u16,
            rtcp_port: None,
        })
    };
    let out = sdp
        .rewrite(&policy(CandidatePolicy::Keep), &mut alloc)
        .unwrap();
    assert_eq!(asked, vec![0, 1]);
    let t = text(&out.sdp);
    assert!(
        t.contains("m=image 42000 TCP t38\r\nc=IN IP4 203.0.113.5\r\na=setup:passive\r\n"),
        "{t}"
    );
    assert!(
        t.contains("m=audio 0 RTP/AVP 0\r\nc=IN IP4 203.0.113.5\r\n"),
        "{t}"
    );
    assert!(
        t.contains("m=video 49400 RTP/AVP 31\r\nc=IN IP4 203.0.113.5\r\na=inactive\r\n"),
        "{t}"
    );
    assert!(!t.contains("10.77."), "{t}");
    assert_eq!(out.flows[2].new_rtp, None);
}

#[test]
fn exhaustion_and_missing_connection_are_errors() {
    let sdp = Sdp::parse(&fixture("sdp/rfc3605_rtcp.sdp")).unwrap();
    assert_eq!(
        sdp.rewrite(&policy(CandidatePolicy::Keep), &mut |_: &FlowRequest<
            '_,
        >| None),
        Err(SdpError::PortsExhausted { index: 0 })
    );
    assert_eq!(
        Sdp::parse(
            b"v=0\r\no=- 1 1 IN IP4 10.77.0.20\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
        ),
        Err(SdpError::MissingConnection { index: 0 })
    );
    assert!(matches!(
        Sdp::parse(b"v=0\r\nc=IN IP4 10.77.0.20\r\nm=audio 4000 SCTP 0\r\n"),
        Err(SdpError::UnsupportedProto { index: 0, .. })
    ));
    assert!(matches!(
        Sdp::parse(b"v=0\r\nc=IN IP4 10.77.0.20\r\nm=audio x RTP/AVP 0\r\n"),
        Err(SdpError::BadLine { line_no: 3, .. })
    ));
    assert!(matches!(
        Sdp::parse(b"v=0\r\nc=IN IP4\r\n"),
        Err(SdpError::BadLine { line_no: 2, .. })
    ));
    let no_v6 = RewritePolicy {
        edge_v6: None,
        edge_v4: None,
        candidates: CandidatePolicy::Keep,
    };
    let sdp = Sdp::parse(
        b"v=0\r\no=- 1 1 IN IP6 2001:db8::1\r\nc=IN IP6 2001:db8::1\r\nm=audio 0 RTP/AVP 0\r\n",
    )
    .unwrap();
    assert!(matches!(
        sdp.rewrite(&no_v6, &mut counter()),
        Err(SdpError::NoEdgeAddress { family: "IPv6", .. })
    ));
}

#[test]
fn sdp_inside_sip_fixtures() {
    for (name, addr) in [
        ("sip/rfc3665_3_1_invite.sip", "192.0.2.101"),
        ("sip/rfc4475_style_ipv6.sip", "2001:db8::10"),
    ] {
        let m = Message::parse(&fixture(name)).unwrap();
        let sdp = Sdp::parse(m.body()).unwrap();
        assert_eq!(
            sdp.flows()[0].rtp.as_ref().map(|e| e.host.clone()),
            Some(ip(addr)),
            "{name}"
        );
        let out = sdp
            .rewrite(&policy(CandidatePolicy::Keep), &mut counter())
            .unwrap();
        let mut m2 = m.clone();
        m2.set_body(out.sdp.clone());
        let back = Message::parse(&m2.to_bytes()).unwrap();
        assert_eq!(
            back.body(),
            &out.sdp[..],
            "{name}: Content-Length recomputed"
        );
        assert!(!text(back.body()).contains(addr), "{name}");
        let new = out.flows[0].new_rtp.expect("allocated");
        assert_eq!(new.port(), 40000);
        assert!(!is_private(new.ip()));
    }
}

#[test]
fn private_ranges() {
    for p in [
        "10.77.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "127.0.0.1",
        "169.254.1.1",
        "fd00::1",
        "fe80::1",
        "::1",
    ] {
        assert!(is_private(p.parse().unwrap()), "{p}");
    }
    for p in [
        "192.0.2.1",
        "203.0.113.5",
        "100.128.0.1",
        "2001:db8::1",
        "172.32.0.1",
    ] {
        assert!(!is_private(p.parse().unwrap()), "{p}");
    }
}

/// Cheap no-panic check: every truncation and a few byte edits of every
/// fixture either parse and rewrite, or return an error.
#[test]
fn mangled_sdp_never_panics() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdp");
    for e in std::fs::read_dir(dir).expect("dir") {
        let raw = std::fs::read(e.expect("entry").path()).expect("read");
        for k in 0..raw.len() {
            for edit in [
                None,
                Some(b' '),
                Some(b'/'),
                Some(b'\n'),
                Some(b':'),
                Some(0xff),
            ] {
                let mut v = raw[..k].to_vec();
                if let Some(b) = edit {
                    v.push(b);
                    v.extend_from_slice(&raw[k..]);
                }
                if let Ok(sdp) = Sdp::parse(&v) {
                    for p in [
                        CandidatePolicy::Keep,
                        CandidatePolicy::ReplacePrivateHost,
                        CandidatePolicy::RemovePrivateHost,
                    ] {
                        let _ = sdp.rewrite(&policy(p), &mut counter());
                    }
                }
            }
        }
    }
    let _: SocketAddr = "203.0.113.5:1".parse().expect("addr");
}

/// Found by the `proxy_sequence` fuzz target: a disabled (port 0) or
/// inactive MSRP stream kept its `a=path` as received, so the inside
/// client's address left toward the outside. A stream without a pinhole
/// still names the edge, never the party behind it.
#[test]
fn streams_without_a_pinhole_hide_their_msrp_path_too() {
    for (m, dir) in [
        ("m=message 0 TCP/MSRP *", ""),
        ("m=message 2855 TCP/MSRP *", "a=inactive\r\n"),
    ] {
        let body = format!(
            "v=0\r\no=- 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\n\
             {m}\r\na=path:msrp://10.77.0.2:2855/s1;tcp\r\n{dir}"
        );
        let sdp = Sdp::parse(body.as_bytes()).expect("parse");
        let out = sdp
            .rewrite(&policy(CandidatePolicy::ReplacePrivateHost), &mut counter())
            .expect("rewrite");
        let s = text(&out.sdp);
        assert!(
            !s.contains("10.77.0.2"),
            "inside address left in {m:?}:\n{s}"
        );
        assert!(s.contains(&format!("a=path:msrp://{EDGE}:")), "{s}");
    }
}

/// Found by the `proxy_sequence` fuzz target: an IPv4-mapped IPv6 form of
/// a private address (`::ffff:10.77.0.99`) was not private to the
/// candidate filter, so the host candidate left toward the outside.
#[test]
fn ipv4_mapped_private_addresses_are_private() {
    for a in [
        "::ffff:10.77.0.99",
        "::ffff:192.168.1.1",
        "::ffff:127.0.0.1",
        "::ffff:100.64.0.1",
    ] {
        assert!(is_private(a.parse().expect("ip")), "{a}");
    }
    assert!(!is_private("::ffff:198.51.100.2".parse().expect("ip")));
    let body = "v=0\r\no=- 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\n\
                m=audio 4000 RTP/AVP 0\r\n\
                a=candidate:1 1 UDP 2130706431 ::ffff:10.77.0.99 4000 typ host\r\n";
    let out = Sdp::parse(body.as_bytes())
        .expect("parse")
        .rewrite(&policy(CandidatePolicy::RemovePrivateHost), &mut counter())
        .expect("rewrite");
    assert!(!text(&out.sdp).contains("10.77.0.99"), "{}", text(&out.sdp));
}

/// Found by the `proxy_sequence` fuzz target: on a multicast stream the
/// `a=rtcp` line was left alone even when it named a unicast inside host.
#[test]
fn a_unicast_rtcp_address_on_a_multicast_stream_is_hidden() {
    let body = "v=0\r\no=- 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 224.0.0.5/16\r\nt=0 0\r\n\
                m=video 5004 RTP/AVP 96\r\na=rtcp:5005 IN IP4 10.77.0.99\r\n";
    let out = Sdp::parse(body.as_bytes())
        .expect("parse")
        .rewrite(&policy(CandidatePolicy::ReplacePrivateHost), &mut counter())
        .expect("rewrite");
    let s = text(&out.sdp);
    assert!(!s.contains("10.77.0.99"), "{s}");
    assert!(
        s.contains("c=IN IP4 224.0.0.5/16"),
        "the group address stays: {s}"
    );
}
