//! Endpoint-policy tests of the media layer (DESIGN.md §3, issue #14 item 1):
//! SDP bodies go through `control::MediaController` with a recording sink
//! and synthetic instants, like the proxy sends them; each case checks what
//! was refused and that nothing was installed for it.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::{
    control::{MediaController, RecordingSink},
    manager::Settings,
    policy::{ExternalSources, Refusal},
    DialogKey, EndReason, FarMedia, MediaControl, MediaError, SdpEvent, SdpRole, Side,
};
use crate::config::{parse_cidr, Cidr, MediaCandidates, MediaMode, PortRange};

/// The inside client (signalling and media).
const CLIENT: &str = "10.77.0.2:40001";
/// The far party's signalling source (direct TLS federation).
const PEER: &str = "198.51.100.2:5061";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

pub(super) fn settings() -> Settings {
    Settings {
        mode: MediaMode::Relay,
        internal_addrs: vec![
            "10.77.0.1".parse().expect("ip"),
            "fd00:77::1".parse().expect("ip"),
        ],
        public_addrs: vec![
            "203.0.113.1".parse().expect("ip"),
            "2001:db8:e::1".parse().expect("ip"),
        ],
        port_ranges: vec![PortRange {
            start: 40000,
            end: 40099,
        }],
        reserved_ports: Vec::new(),
        allowed_internal_subnets: Vec::new(),
        max_flows_per_client: 8,
        max_flows: 1000,
        max_calls: 100,
        idle_timeout: Duration::from_secs(60),
        unused_timeout: Duration::from_secs(20),
        max_call: Duration::from_secs(3600),
        latch: false,
        external_sources: ExternalSources::Signalling,
    }
}

struct H {
    c: MediaController<RecordingSink>,
    now: Instant,
    /// What the proxy matched for the far party's route.
    media_sources: Vec<Cidr>,
    /// How the proxy says the far party's media is learned.
    far_media: FarMedia,
}

impl H {
    fn new(s: Settings) -> H {
        H {
            c: MediaController::new(
                s,
                MediaCandidates::ReplacePrivateHost,
                RecordingSink::default(),
            ),
            now: Instant::now(),
            media_sources: Vec::new(),
            far_media: FarMedia::Config,
        }
    }

    fn sdp(
        &mut self,
        d: &DialogKey,
        role: SdpRole,
        side: Side,
        src: &str,
        body: &str,
    ) -> Result<String, MediaError> {
        let tag = (role != SdpRole::Offer).then_some("t1");
        let ev = SdpEvent {
            dialog: d,
            to_tag: tag,
            role,
            from_side: side,
            source: sa(src),
            media_sources: &self.media_sources,
            far_media: self.far_media,
            body: body.as_bytes(),
            content_type: "application/sdp",
        };
        self.c
            .on_sdp(&ev, self.now)
            .map(|b| String::from_utf8(b).expect("utf-8"))
    }

    fn installed(&self) -> usize {
        self.c.sink().installed.len()
    }
}

fn dialog(n: u32) -> DialogKey {
    DialogKey {
        call_id: format!("policy-{n}").into(),
        from_tag: "f".into(),
    }
}

/// One audio stream at `ip`:`port`; `extra` goes after the m= line.
fn audio(ip: &str, port: u16, extra: &str) -> String {
    let fam = if ip.contains(':') { "IP6" } else { "IP4" };
    format!("v=0\r\no=- 1 1 IN {fam} {ip}\r\ns=-\r\nc=IN {fam} {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n{extra}")
}

/// What an outside party may not name as its media address, whatever the
/// configuration says (DESIGN.md §3), with why.
const FORBIDDEN_EXTERNAL: &[(&str, u16, &str, &str)] = &[
    ("10.77.0.99", 5000, "", "another inside host (RFC 1918)"),
    ("10.77.0.2", 5000, "", "the inside caller itself"),
    ("172.16.9.9", 5000, "", "RFC 1918"),
    ("192.168.1.1", 5000, "", "RFC 1918"),
    ("100.64.0.1", 5000, "", "CGNAT (RFC 6598)"),
    ("169.254.10.10", 5000, "", "IPv4 link-local"),
    ("fe80::1", 5000, "", "IPv6 link-local"),
    ("fd00:77::99", 5000, "", "IPv6 ULA"),
    ("::ffff:10.77.0.99", 5000, "", "IPv4-mapped inside host"),
    ("::ffff:127.0.0.1", 5000, "", "IPv4-mapped loopback"),
    ("127.0.0.1", 5000, "", "loopback"),
    ("::1", 5000, "", "IPv6 loopback"),
    ("0.0.0.0", 5000, "", "unspecified"),
    ("255.255.255.255", 5000, "", "broadcast"),
    ("203.0.113.1", 5000, "", "the edge's public address"),
    ("10.77.0.1", 5000, "", "the edge's internal address"),
    ("198.51.100.2", 80, "", "a privileged port of the far party"),
    (
        "198.51.100.2",
        1023,
        "",
        "a privileged port of the far party",
    ),
    (
        "198.51.100.2",
        5000,
        "a=rtcp:5001 IN IP4 10.77.0.99\r\n",
        "RTCP aimed inside",
    ),
    (
        "198.51.100.2",
        5000,
        "a=rtcp:53\r\n",
        "RTCP on a privileged port",
    ),
];

const INSIDE_OFFER: &str = "v=0\r\no=- 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";

#[test]
fn an_outside_answer_never_aims_media_at_forbidden_targets() {
    for (n, (ip, port, extra, why)) in FORBIDDEN_EXTERNAL.iter().enumerate() {
        let mut h = H::new(settings());
        let d = dialog(n as u32);
        h.sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, INSIDE_OFFER)
            .expect("inside offer");
        let e = h
            .sdp(
                &d,
                SdpRole::Answer,
                Side::External,
                PEER,
                &audio(ip, *port, extra),
            )
            .expect_err(why);
        assert!(matches!(e, MediaError::Forbidden { .. }), "{why}: {e:?}");
        assert_eq!(h.installed(), 0, "{why}: a pinhole was opened");
    }
}

#[test]
fn an_outside_offer_never_aims_media_at_forbidden_targets() {
    for (n, (ip, port, extra, why)) in FORBIDDEN_EXTERNAL.iter().enumerate() {
        let mut h = H::new(settings());
        let d = dialog(100 + n as u32);
        let e = h
            .sdp(
                &d,
                SdpRole::Offer,
                Side::External,
                PEER,
                &audio(ip, *port, extra),
            )
            .expect_err(why);
        assert!(matches!(e, MediaError::Forbidden { .. }), "{why}: {e:?}");
        assert_eq!(e.status(), 488, "{why}");
        assert_eq!(h.installed(), 0, "{why}");
        assert_eq!(h.c.manager().dialogs(), 0, "{why}: state kept");
    }
}

#[test]
fn by_default_outside_media_comes_from_the_signalling_source() {
    // Linux's SIP helper (nf_conntrack_sip) default: the far party's media
    // address is the address its signalling came from.
    let mut h = H::new(settings());
    let d = dialog(200);
    h.sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, INSIDE_OFFER)
        .expect("inside offer");
    let e = h
        .sdp(
            &d,
            SdpRole::Answer,
            Side::External,
            PEER,
            &audio("198.51.100.7", 5000, ""),
        )
        .expect_err("a public address other than the signalling source");
    assert!(matches!(e, MediaError::Forbidden { .. }), "{e:?}");
    assert_eq!(h.installed(), 0);
    // The signalling source itself is fine.
    let mut h = H::new(settings());
    h.sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, INSIDE_OFFER)
        .expect("inside offer");
    h.sdp(
        &d,
        SdpRole::Answer,
        Side::External,
        PEER,
        &audio("198.51.100.2", 5000, ""),
    )
    .expect("the far party's own address");
    assert_eq!(h.installed(), 2, "RTP and RTCP");
}

#[test]
fn msrp_paths_pass_the_same_policy() {
    let mut h = H::new(settings());
    let d = dialog(300);
    let offer = "v=0\r\no=- 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\nm=message 2855 TCP/MSRP *\r\na=path:msrp://10.77.0.2:2855/s111;tcp\r\n";
    h.sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, offer)
        .expect("offer");
    let answer = "v=0\r\no=- 1 1 IN IP4 198.51.100.2\r\ns=-\r\nc=IN IP4 198.51.100.2\r\nt=0 0\r\nm=message 2856 TCP/MSRP *\r\na=path:msrp://10.77.0.99:2856/s222;tcp\r\n";
    let e = h
        .sdp(&d, SdpRole::Answer, Side::External, PEER, answer)
        .expect_err("MSRP path aimed inside");
    assert!(matches!(e, MediaError::Forbidden { .. }), "{e:?}");
    assert_eq!(h.installed(), 0);
}

#[test]
fn private_srflx_and_relay_candidates_never_leave_unchanged() {
    // RFC 8445 §5.1.1: a server-reflexive or relayed candidate normally
    // carries a public address, but a STUN/TURN server inside (or a
    // double NAT) gives private ones; they name the inside all the same.
    let mut h = H::new(settings());
    let d = dialog(400);
    let offer = format!(
        "{INSIDE_OFFER}a=candidate:1 1 UDP 2130706431 10.77.0.2 4000 typ host\r\na=candidate:2 1 UDP 1694498815 10.77.5.5 4100 typ srflx raddr 10.77.0.2 rport 4000\r\na=candidate:3 1 UDP 16777215 192.168.7.7 4200 typ relay raddr 10.77.0.2 rport 4000\r\na=candidate:4 1 UDP 1694498815 198.51.100.77 4300 typ srflx raddr 10.77.0.2 rport 4000\r\n"
    );
    let out = h
        .sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, &offer)
        .expect("offer");
    for private in ["10.77.5.5", "192.168.7.7", "10.77.0.2"] {
        assert!(
            !out.contains(private),
            "{private} left toward the outside:\n{out}"
        );
    }
    assert!(
        out.contains("198.51.100.77 4300 typ srflx"),
        "public candidate kept:\n{out}"
    );
}

#[test]
fn route_media_sources_and_any_public_widen_only_the_source_rule() {
    let answer_from = |s: Settings, sources: &[&str], ip: &str| {
        let mut h = H::new(s);
        h.media_sources = sources
            .iter()
            .map(|c| parse_cidr(c).expect("cidr"))
            .collect();
        let d = dialog(500);
        h.sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, INSIDE_OFFER)
            .expect("inside offer");
        let r = h.sdp(
            &d,
            SdpRole::Answer,
            Side::External,
            PEER,
            &audio(ip, 5000, ""),
        );
        (r, h.installed())
    };
    // A carrier whose SBC has media on 192.0.2.0/24.
    let (r, n) = answer_from(settings(), &["192.0.2.0/24"], "192.0.2.40");
    assert!(r.is_ok() && n == 2, "{r:?}");
    let (r, n) = answer_from(settings(), &["192.0.2.0/24"], "198.51.100.7");
    assert!(
        matches!(
            r,
            Err(MediaError::Forbidden {
                rule: Some(Refusal::NotSignallingSource),
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(n, 0);
    // A private interconnect, listed explicitly.
    let (r, _) = answer_from(settings(), &["172.20.0.0/16"], "172.20.3.3");
    assert!(r.is_ok(), "{r:?}");
    // any-public: every public unicast address, never the table.
    let any = Settings {
        external_sources: ExternalSources::AnyPublic,
        ..settings()
    };
    let (r, _) = answer_from(any.clone(), &[], "198.51.100.7");
    assert!(r.is_ok(), "{r:?}");
    for (ip, rule) in [
        ("10.77.0.99", Refusal::PrivateRange),
        ("169.254.0.9", Refusal::LinkLocal),
        ("203.0.113.1", Refusal::EdgeAddress),
    ] {
        let (r, n) = answer_from(any.clone(), &[], ip);
        assert!(
            matches!(r, Err(MediaError::Forbidden { rule: Some(got), .. }) if got == rule),
            "{ip}: {r:?}"
        );
        assert_eq!(n, 0, "{ip}");
    }
    // An allowed internal subnet is an internal subnet, named as such.
    let inside = Settings {
        external_sources: ExternalSources::AnyPublic,
        allowed_internal_subnets: vec![parse_cidr("10.77.0.0/24").expect("cidr")],
        ..settings()
    };
    let (r, _) = answer_from(inside, &["10.0.0.0/8"], "10.77.0.99");
    assert!(
        matches!(
            r,
            Err(MediaError::Forbidden {
                rule: Some(Refusal::InternalSubnet),
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn a_listening_tcp_end_outside_needs_an_unprivileged_port() {
    // The inside offers to connect (a=setup:active, port 9 by RFC 4145
    // §4); the outside answers passive on port 25: the edge would send the
    // inside's TCP stream to a mail server.
    let mut h = H::new(settings());
    let d = dialog(600);
    let offer = "v=0\r\no=- 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\nm=application 9 TCP wb\r\na=setup:active\r\n";
    h.sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, offer)
        .expect("active end may write port 9");
    let answer = "v=0\r\no=- 1 1 IN IP4 198.51.100.2\r\ns=-\r\nc=IN IP4 198.51.100.2\r\nt=0 0\r\nm=application 9 TCP wb\r\na=setup:passive\r\n";
    let e = h
        .sdp(&d, SdpRole::Answer, Side::External, PEER, answer)
        .expect_err("the listening end names port 9");
    assert!(
        matches!(
            e,
            MediaError::Forbidden {
                rule: Some(Refusal::PortBelow1024),
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(h.installed(), 0);
}

// --- remote users and peers (issue #15) ---------------------------------------

/// A remote user's signalling source (its NAT's public address).
const REMOTE_USER: &str = "198.51.100.20:40123";

fn installed_flows(h: &H) -> Vec<crate::datapath::rules::Flow> {
    h.c.sink().installed.values().copied().collect()
}

#[test]
fn a_remote_users_media_is_pinned_to_its_signalling_address_with_the_port_learned() {
    use crate::datapath::rules::{Flow, LearnPort};
    for (n, (named, why)) in [
        ("192.168.1.5", "its private address behind NAT"),
        ("198.51.100.99", "a third public address"),
        ("198.51.100.20", "its own public address"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut h = H::new(settings());
        h.far_media = FarMedia::RemoteUser;
        let d = dialog(300 + n as u32);
        h.sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, INSIDE_OFFER)
            .expect("inside offer");
        h.sdp(
            &d,
            SdpRole::Answer,
            Side::External,
            REMOTE_USER,
            &audio(named, 7078, ""),
        )
        .unwrap_or_else(|e| panic!("{why}: {e}"));
        // RTP and RTCP (port + 1).
        let flows = installed_flows(&h);
        assert_eq!(flows.len(), 2, "{why}");
        let mut ports = Vec::new();
        for f in flows {
            match f {
                Flow::Relay {
                    peer,
                    latch_peer,
                    learn_port,
                    ..
                } => {
                    assert_eq!(peer.ip(), sa(REMOTE_USER).ip(), "{why}");
                    assert!(!latch_peer, "{why}: never a full latch (no third address)");
                    assert_eq!(learn_port, LearnPort::Peer, "{why}: the port is learned");
                    ports.push(peer.port());
                }
                other => panic!("{why}: {other:?}"),
            }
        }
        ports.sort_unstable();
        assert_eq!(ports, vec![7078, 7079], "{why}");
    }
    // The fixed table still applies to what is left: a port below 1024.
    let mut h = H::new(settings());
    h.far_media = FarMedia::RemoteUser;
    let d = dialog(310);
    h.sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, INSIDE_OFFER)
        .expect("inside offer");
    let e = h
        .sdp(
            &d,
            SdpRole::Answer,
            Side::External,
            REMOTE_USER,
            &audio("192.168.1.5", 53, ""),
        )
        .expect_err("port 53");
    assert!(matches!(e, MediaError::Forbidden { .. }), "{e:?}");
}

#[test]
fn nat_mode_shows_the_inside_a_remote_users_public_address() {
    let mut s = settings();
    s.mode = MediaMode::Nat;
    let mut h = H::new(s);
    h.far_media = FarMedia::RemoteUser;
    let d = dialog(320);
    let fwd = h
        .sdp(
            &d,
            SdpRole::Offer,
            Side::External,
            REMOTE_USER,
            &audio("192.168.1.5", 7078, ""),
        )
        .expect("remote offer");
    assert!(
        fwd.contains("c=IN IP4 198.51.100.20") && !fwd.contains("192.168.1.5"),
        "{fwd}"
    );
    assert!(fwd.contains("m=audio 7078 "), "{fwd}");
}

#[test]
fn a_peers_latch_mode_decides_its_flows() {
    use crate::datapath::rules::{Flow, LearnPort};
    for (far, latch, learn) in [
        (FarMedia::Strict, false, LearnPort::Neither),
        (FarMedia::LatchPort, false, LearnPort::Peer),
        (FarMedia::Latch, true, LearnPort::Neither),
        (FarMedia::Config, false, LearnPort::Neither),
    ] {
        let mut h = H::new(settings());
        h.far_media = far;
        let d = dialog(330);
        h.sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, INSIDE_OFFER)
            .expect("inside offer");
        h.sdp(
            &d,
            SdpRole::Answer,
            Side::External,
            PEER,
            &audio("198.51.100.2", 5000, ""),
        )
        .expect("answer");
        match installed_flows(&h)[0] {
            Flow::Relay {
                latch_peer,
                learn_port,
                peer,
                ..
            } => {
                assert_eq!((latch_peer, learn_port), (latch, learn), "{far:?}");
                assert_eq!(peer, sa("198.51.100.2:5000"), "{far:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// The port of the first m= line of `sdp`.
fn m_port(sdp: &str) -> u16 {
    sdp.lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no m=audio port in {sdp}"))
}

/// A call between the inside client (ICE, rtcp-mux, 10.77.0.2:4000) and a
/// remote user (198.51.100.20:7078) through the relay, set up by an inside
/// offer and an outside answer: the edge's public port (what the remote
/// user checks against) and its internal port (what the client does).
fn ice_call(h: &mut H, d: &DialogKey) -> (u16, u16) {
    h.far_media = FarMedia::RemoteUser;
    let offer = format!(
        "{INSIDE_OFFER}a=rtcp-mux\r\na=ice-ufrag:in\r\na=ice-pwd:inpassword0123456789012\r\na=candidate:1 1 UDP 2130706431 10.77.0.2 4000 typ host\r\n"
    );
    let out = h
        .sdp(d, SdpRole::Offer, Side::Internal, CLIENT, &offer)
        .expect("inside offer");
    let public = m_port(&out);
    let answer = audio(
        "198.51.100.20",
        7078,
        "a=rtcp-mux\r\na=ice-ufrag:out\r\na=ice-pwd:outpassword012345678901\r\na=candidate:1 1 UDP 2130706431 198.51.100.20 7078 typ host\r\n",
    );
    let inside = h
        .sdp(d, SdpRole::Answer, Side::External, REMOTE_USER, &answer)
        .expect("outside answer");
    (public, m_port(&inside))
}

/// Every installed flow's (client, peer).
fn ends(h: &H) -> Vec<(SocketAddr, SocketAddr)> {
    use crate::datapath::rules::Flow;
    installed_flows(h)
        .into_iter()
        .map(|f| match f {
            Flow::Relay { client, peer, .. } | Flow::Nat { client, peer, .. } => (client, peer),
        })
        .collect()
}

#[test]
fn an_ice_re_offer_naming_the_edges_relay_port_keeps_the_remote_users_media_where_it_is() {
    // baresip 1.0 with `medianat=ice` outside: the checks went through the
    // relay, so its selected local candidate is peer-reflexive, the edge's
    // internal port as the inside phone saw it, and its re-offer (RFC 8445
    // §8.1.2) names that, with a=remote-candidates naming the edge's
    // public port (the inside phone's candidate as the edge showed it).
    let mut h = H::new(settings());
    let d = dialog(700);
    let (public, internal) = ice_call(&mut h, &d);
    let before = ends(&h);
    assert_eq!(
        before,
        vec![(sa("10.77.0.2:4000"), sa("198.51.100.20:7078"))]
    );
    let re_offer = format!(
        "v=0\r\no=- 1 2 IN IP4 10.77.0.1\r\ns=-\r\nc=IN IP4 10.77.0.1\r\nt=0 0\r\nm=audio {internal} RTP/AVP 0\r\na=rtcp-mux\r\na=ice-ufrag:out\r\na=ice-pwd:outpassword012345678901\r\na=candidate:1 1 UDP 2130706431 198.51.100.20 7078 typ host\r\na=candidate:2 1 UDP 1862270975 10.77.0.1 {internal} typ prflx\r\na=remote-candidates:1 203.0.113.1 {public}\r\n"
    );
    let to_inside = h
        .sdp(&d, SdpRole::Offer, Side::External, REMOTE_USER, &re_offer)
        .expect("the re-offer is accepted");
    // The inside phone is told which of its own candidates was selected.
    assert!(
        to_inside.contains("a=remote-candidates:1 10.77.0.2 4000\r\n"),
        "{to_inside}"
    );
    assert!(!to_inside.contains("prflx"), "{to_inside}");
    assert_eq!(m_port(&to_inside), internal, "the edge port stays");
    h.sdp(
        &d,
        SdpRole::Answer,
        Side::Internal,
        CLIENT,
        &format!(
            "{INSIDE_OFFER}a=rtcp-mux\r\na=ice-ufrag:in\r\na=ice-pwd:inpassword0123456789012\r\na=candidate:1 1 UDP 2130706431 10.77.0.2 4000 typ host\r\n"
        ),
    )
    .expect("inside answer");
    // The remote user's media still goes to the port it listens on, never
    // to the edge's own port number.
    assert_eq!(ends(&h), before);
}

#[test]
fn an_ice_re_offer_from_inside_naming_the_edges_public_port_is_the_installed_path() {
    // The inside phone controlling: its peer-reflexive candidate is the
    // edge's public port, as the outside phone saw its checks.
    let mut h = H::new(settings());
    let d = dialog(701);
    let (public, internal) = ice_call(&mut h, &d);
    let before = ends(&h);
    let re_offer = format!(
        "v=0\r\no=- 1 2 IN IP4 203.0.113.1\r\ns=-\r\nc=IN IP4 203.0.113.1\r\nt=0 0\r\nm=audio {public} RTP/AVP 0\r\na=rtcp-mux\r\na=ice-ufrag:in\r\na=ice-pwd:inpassword0123456789012\r\na=candidate:1 1 UDP 2130706431 10.77.0.2 4000 typ host\r\na=candidate:2 1 UDP 1862270975 203.0.113.1 {public} typ prflx\r\na=remote-candidates:1 10.77.0.1 {internal}\r\n"
    );
    let to_outside = h
        .sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, &re_offer)
        .expect("the re-offer is accepted");
    assert!(
        to_outside.contains("a=remote-candidates:1 198.51.100.20 7078\r\n"),
        "{to_outside}"
    );
    assert!(!to_outside.contains("prflx"), "{to_outside}");
    assert!(!to_outside.contains("10.77."), "{to_outside}");
    h.sdp(
        &d,
        SdpRole::Answer,
        Side::External,
        REMOTE_USER,
        &audio("198.51.100.20", 7078, "a=rtcp-mux\r\n"),
    )
    .expect("outside answer");
    assert_eq!(ends(&h), before);
}

#[test]
fn the_edges_address_is_never_a_remote_users_media_outside_the_ice_case() {
    let mut h = H::new(settings());
    h.far_media = FarMedia::RemoteUser;
    // No flow installed yet: an edge address means nothing but the edge.
    let d = dialog(702);
    h.sdp(&d, SdpRole::Offer, Side::Internal, CLIENT, INSIDE_OFFER)
        .expect("inside offer");
    for named in ["10.77.0.1", "203.0.113.1"] {
        let e = h
            .sdp(
                &d,
                SdpRole::Answer,
                Side::External,
                REMOTE_USER,
                &audio(named, 7078, ""),
            )
            .expect_err(named);
        assert!(matches!(e, MediaError::Forbidden { .. }), "{named}: {e:?}");
    }
    assert_eq!(h.installed(), 0);
    // After ICE: another edge port than the call's own is still refused,
    // and so is a remote-candidates-free candidate naming it.
    let d = dialog(703);
    let (_, internal) = ice_call(&mut h, &d);
    let other = internal.wrapping_add(2);
    let e = h
        .sdp(
            &d,
            SdpRole::Offer,
            Side::External,
            REMOTE_USER,
            &audio("10.77.0.1", other, ""),
        )
        .expect_err("another edge port");
    assert!(matches!(e, MediaError::Forbidden { .. }), "{e:?}");
    let e = h
        .sdp(
            &d,
            SdpRole::Offer,
            Side::External,
            REMOTE_USER,
            &audio(
                "198.51.100.20",
                7078,
                &format!("a=candidate:2 1 UDP 1 203.0.113.1 {other} typ prflx\r\n"),
            ),
        )
        .expect_err("a candidate naming another edge port");
    assert!(matches!(e, MediaError::Forbidden { .. }), "{e:?}");
}

#[test]
fn an_answer_declining_rtcp_mux_gets_rtcp_through_the_edge() {
    // linphonec answering baresip's mux offer without a=rtcp-mux (RFC
    // 5761 §5.1.3): RTCP goes to RTP + 1 both ways, so the edge's mux
    // offer must have kept an RTCP port.
    let mut h = H::new(settings());
    let d = dialog(710);
    let to_outside = h
        .sdp(
            &d,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &format!("{INSIDE_OFFER}a=rtcp-mux\r\n"),
        )
        .expect("mux offer");
    let public = m_port(&to_outside);
    let to_inside = h
        .sdp(
            &d,
            SdpRole::Answer,
            Side::External,
            PEER,
            &audio("198.51.100.2", 7078, ""),
        )
        .expect("the answer without mux is accepted");
    let internal = m_port(&to_inside);
    let mut got: Vec<(SocketAddr, SocketAddr, SocketAddr)> = installed_flows(&h)
        .into_iter()
        .map(|f| match f {
            crate::datapath::rules::Flow::Relay {
                client,
                public,
                peer,
                ..
            } => (client, public, peer),
            other => panic!("{other:?}"),
        })
        .collect();
    got.sort();
    let ep = |ip: &str, port: u16| SocketAddr::new(ip.parse().expect("ip"), port);
    assert_eq!(
        got,
        vec![
            (
                ep("10.77.0.2", 4000),
                ep("203.0.113.1", public),
                ep("198.51.100.2", 7078)
            ),
            (
                ep("10.77.0.2", 4001),
                ep("203.0.113.1", public + 1),
                ep("198.51.100.2", 7079)
            ),
        ]
    );
    assert!(to_inside.contains(&format!("m=audio {internal} ")));
    // Accepted mux: one flow, the RTCP port unused.
    let d = dialog(711);
    let ports0 = h.c.manager().ports_in_use();
    let before = h.installed();
    // Offer from inside (with or without mux), answer from outside; the
    // edge's offer as the outside sees it.
    let exchange = |h: &mut H, offer_mux: &str, answer_mux: &str| -> String {
        let out = h
            .sdp(
                &d,
                SdpRole::Offer,
                Side::Internal,
                CLIENT,
                &format!("{INSIDE_OFFER}{offer_mux}"),
            )
            .expect("offer");
        h.sdp(
            &d,
            SdpRole::Answer,
            Side::External,
            PEER,
            &audio("198.51.100.2", 7080, answer_mux),
        )
        .expect("answer");
        out
    };
    let mux = "a=rtcp-mux\r\n";
    let first = exchange(&mut h, mux, mux);
    assert_eq!(h.installed() - before, 1);
    // The RTCP ports kept for a declined mux go back: one port per edge
    // address (two in relay mode) for the accepted mux stream.
    assert_eq!(h.c.manager().ports_in_use() - ports0, 2);
    // A re-offer with mux keeps the stream's edge ports and its flow.
    let again = exchange(&mut h, mux, mux);
    assert_eq!(m_port(&again), m_port(&first), "{again}");
    assert_eq!(h.installed() - before, 1);
    assert_eq!(h.c.manager().ports_in_use() - ports0, 2);
    // A re-offer without mux needs RTCP again: a new pair, and the answer
    // without mux gets its RTCP flow.
    let plain = exchange(&mut h, "", "");
    assert_ne!(
        m_port(&plain),
        m_port(&first),
        "a fresh pair for RTP and RTCP"
    );
    assert_eq!(h.installed() - before, 2, "RTP and RTCP");
}

/// In nat mode the inside client's own media address is a map key: a second
/// call naming the same address must be refused (its rule would replace the
/// first call's), a re-offer of the call holding it is not a conflict, and
/// once that call ends the address is free again. The check reads the
/// manager's key index (issue #12: no walk over every call per offer), so
/// this also fails if the index misses an install or keeps a removed flow.
#[test]
fn nat_mode_refuses_a_second_call_on_the_same_client_address_until_the_first_ends() {
    let mut s = settings();
    s.mode = MediaMode::Nat;
    let mut h = H::new(s);
    let answer = audio("198.51.100.2", 5000, "");
    let call = |h: &mut H, d: &DialogKey| -> Result<String, MediaError> {
        h.sdp(d, SdpRole::Offer, Side::Internal, CLIENT, INSIDE_OFFER)?;
        h.sdp(d, SdpRole::Answer, Side::External, PEER, &answer)
    };
    let (first, second) = (dialog(400), dialog(401));
    call(&mut h, &first).expect("first call");
    let n = h.installed();
    assert_eq!(n, 2, "RTP and RTCP");
    // The first call's re-offer with the same address keeps its pinhole.
    call(&mut h, &first).expect("re-offer of the call holding the address");
    assert_eq!(h.installed(), n);
    let e = call(&mut h, &second).expect_err("second call on the same client address");
    assert!(
        matches!(e, MediaError::Forbidden { .. }) && e.to_string().contains("already used"),
        "{e}"
    );
    assert_eq!(h.installed(), n, "the refused call installed nothing");
    h.c.on_dialog_end(&first, Some("t1"), EndReason::Bye, h.now);
    assert_eq!(h.installed(), 0);
    call(&mut h, &second).expect("the address is free once the first call ended");
    assert_eq!(h.installed(), n);
}

/// nat mode (the scale series' calls): the outside answer is not rewritten,
/// so a muxed call holds one public port once the answer accepts mux.
#[test]
fn nat_mode_muxed_call_holds_one_port() {
    let mut s = settings();
    s.mode = MediaMode::Nat;
    let mut h = H::new(s);
    let d = dialog(420);
    h.sdp(
        &d,
        SdpRole::Offer,
        Side::Internal,
        CLIENT,
        &format!("{INSIDE_OFFER}a=rtcp-mux\r\n"),
    )
    .expect("mux offer");
    assert_eq!(h.c.manager().ports_in_use(), 2, "a pair until the answer");
    h.sdp(
        &d,
        SdpRole::Answer,
        Side::External,
        PEER,
        &audio("198.51.100.2", 7080, "a=rtcp-mux\r\n"),
    )
    .expect("mux answer");
    assert_eq!(h.installed(), 1);
    assert_eq!(h.c.manager().ports_in_use(), 1);
}

/// Once muxed calls have given their RTCP ports back, no even/odd pair may
/// be left while odd ports are free: the next mux offer then gets two
/// single ports and its SDP names the RTCP one (RFC 3605), so the media
/// ranges carry one muxed call per port instead of one per pair.
#[test]
fn a_mux_offer_without_an_adjacent_pair_left_names_its_rtcp_port() {
    let mut s = settings();
    s.mode = MediaMode::Nat;
    s.port_ranges = vec![PortRange {
        start: 40000,
        end: 40005,
    }];
    let mut h = H::new(s);
    let mux_offer = |port: u16| {
        format!("v=0\r\no=- 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtcp-mux\r\n")
    };
    let call = |h: &mut H, n: u32| -> Result<String, MediaError> {
        let d = dialog(500 + n);
        let out = h.sdp(
            &d,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &mux_offer(4000 + 2 * n as u16),
        )?;
        h.sdp(
            &d,
            SdpRole::Answer,
            Side::External,
            PEER,
            &audio("198.51.100.2", 7000 + 2 * n as u16, "a=rtcp-mux\r\n"),
        )?;
        Ok(out)
    };
    for n in 0..3 {
        let out = call(&mut h, n).expect("call with an adjacent pair");
        assert!(!out.contains("a=rtcp:"), "{out}");
    }
    assert_eq!(h.c.manager().ports_in_use(), 3);
    let out = call(&mut h, 3).expect("a fourth muxed call on the odd ports");
    let rtp = m_port(&out);
    assert!(
        rtp % 2 == 1,
        "an odd port given back by a muxed call: {out}"
    );
    let rtcp_line = out
        .lines()
        .find(|l| l.starts_with("a=rtcp:"))
        .unwrap_or_else(|| panic!("no a=rtcp naming the RTCP port: {out}"));
    let rtcp: u16 = rtcp_line["a=rtcp:".len()..].parse().expect("port");
    assert!(rtcp != rtp + 1 && (40000..=40005).contains(&rtcp), "{out}");
    assert_eq!(h.c.manager().ports_in_use(), 4);
    let e = call(&mut h, 4).expect_err("the ranges are used up");
    assert!(matches!(e, MediaError::Exhausted { .. }), "{e}");
}
