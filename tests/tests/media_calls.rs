//! Call-flow tests of the media layer: drives `media::control::MediaController`
//! (manager + SDP rewrite) with a recording pinhole sink and synthetic
//! instants, the way the proxy will (quinn-style, no sleeps). Every scenario
//! ends with the "no orphans" check: no pinhole, port or dialog left.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use sip_edge::{
    config::{MediaCandidates, MediaMode, PortRange},
    datapath::rules::{Flow, Proto},
    media::{
        control::{MediaController, Recorded, RecordingSink},
        manager::Settings,
        policy::ExternalSources,
        DialogKey, EndReason, MediaControl, MediaError, SdpEvent, SdpRole, Side,
    },
};

const CLIENT: &str = "10.77.0.2:5061";
const CLIENT2: &str = "10.77.0.3:5061";
const PEER_PROXY: &str = "198.51.100.1:5061";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn settings(mode: MediaMode) -> Settings {
    Settings {
        mode,
        internal_addrs: vec!["10.77.0.1".parse().expect("ip")],
        public_addrs: vec!["203.0.113.1".parse().expect("ip")],
        port_ranges: vec![PortRange {
            start: 40000,
            end: 40099,
        }],
        reserved_ports: vec![40050],
        allowed_internal_subnets: Vec::new(),
        max_flows_per_client: 8,
        max_flows: 1000,
        max_calls: 100,
        idle_timeout: Duration::from_secs(60),
        unused_timeout: Duration::from_secs(20),
        max_call: Duration::from_secs(4 * 3600),
        latch: false,
        // The scenarios model a peer proxy (PEER_PROXY) in front of UAs
        // whose media comes from other public addresses.
        external_sources: ExternalSources::AnyPublic,
    }
}

/// One audio stream; `extra` lines go after the m= line.
fn audio(ip: &str, port: u16, extra: &str) -> String {
    format!("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n{extra}")
}

fn audio_video(ip: &str, a: u16, v: u16) -> String {
    format!(
        "{}m=video {v} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n",
        audio(ip, a, "")
    )
}

struct H {
    c: MediaController<RecordingSink>,
    t0: Instant,
    now: Instant,
}

impl H {
    fn new(s: Settings) -> H {
        let t0 = Instant::now();
        H {
            c: MediaController::new(
                s,
                MediaCandidates::ReplacePrivateHost,
                RecordingSink::default(),
            ),
            t0,
            now: t0,
        }
    }

    fn relay() -> H {
        H::new(settings(MediaMode::Relay))
    }

    fn at(&mut self, secs: u64) {
        self.now = self.t0 + Duration::from_secs(secs);
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "mirrors SdpEvent's fields one to one"
    )]
    fn sdp_typed(
        &mut self,
        d: &DialogKey,
        tag: Option<&str>,
        role: SdpRole,
        side: Side,
        src: &str,
        body: &str,
        ct: &str,
    ) -> Result<String, MediaError> {
        let ev = SdpEvent {
            dialog: d,
            to_tag: tag,
            role,
            from_side: side,
            source: sa(src),
            media_sources: &[],
            far_media: sip_edge::media::FarMedia::Config,
            body: body.as_bytes(),
            content_type: ct,
        };
        self.c
            .on_sdp(&ev, self.now)
            .map(|b| String::from_utf8(b).expect("utf-8 body"))
    }

    fn sdp(
        &mut self,
        d: &DialogKey,
        tag: Option<&str>,
        role: SdpRole,
        side: Side,
        src: &str,
        body: &str,
    ) -> Result<String, MediaError> {
        self.sdp_typed(d, tag, role, side, src, body, "application/sdp")
    }

    fn end(&mut self, d: &DialogKey, tag: Option<&str>, reason: EndReason) {
        self.c.on_dialog_end(d, tag, reason, self.now);
    }

    fn tick(&mut self) -> Vec<DialogKey> {
        self.c.on_tick(self.now)
    }

    fn flows(&self) -> Vec<Flow> {
        self.c.sink().installed.values().copied().collect()
    }

    fn packets(&mut self, n: u64) {
        let ids: Vec<_> = self.c.sink().installed.keys().copied().collect();
        for id in ids {
            *self.c.sink_mut().packets.entry(id).or_insert(0) += n;
        }
    }

    fn assert_no_orphans(&self) {
        assert!(
            self.c.sink().installed.is_empty(),
            "orphan rules: {:?}",
            self.c.sink().installed
        );
        assert!(
            self.c.manager().installed().is_empty(),
            "manager still tracks flows"
        );
        assert_eq!(self.c.manager().ports_in_use(), 0, "ports leaked");
        assert_eq!(self.c.manager().dialogs(), 0, "dialogs leaked");
    }
}

fn dialog(n: u32) -> DialogKey {
    DialogKey {
        call_id: format!("call-{n}@10.77.0.2").into(),
        from_tag: format!("ft{n}").into(),
    }
}

/// `m=<kind> <port>` of the n-th m-line and the c= address in force.
fn m_port(body: &str, n: usize) -> u16 {
    body.lines()
        .filter(|l| l.starts_with("m="))
        .nth(n)
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|p| p.parse().ok())
        .expect("m= port")
}

fn c_addr(body: &str) -> &str {
    body.lines()
        .find(|l| l.starts_with("c="))
        .and_then(|l| l.rsplit(' ').next())
        .expect("c=")
}

#[test]
fn relay_outbound_call_installs_rtp_and_rtcp_and_bye_removes() {
    let mut h = H::relay();
    let d = dialog(1);
    let out = h
        .sdp(
            &d,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &audio("10.77.0.2", 4000, ""),
        )
        .expect("offer");
    assert_eq!(c_addr(&out), "203.0.113.1");
    assert!(!out.contains("10.77.0.2"), "private address leaked: {out}");
    let public = m_port(&out, 0);
    assert!(
        (40000..=40099).contains(&public) && public.is_multiple_of(2),
        "{public}"
    );
    assert!(h.flows().is_empty(), "no pinhole before the answer");
    let back = h
        .sdp(
            &d,
            Some("tt1"),
            SdpRole::Answer,
            Side::External,
            PEER_PROXY,
            &audio("198.51.100.7", 5000, ""),
        )
        .expect("answer");
    assert_eq!(c_addr(&back), "10.77.0.1");
    let int = m_port(&back, 0);
    assert_ne!(int, public);
    let flows = h.flows();
    assert_eq!(flows.len(), 2, "RTP + RTCP");
    assert!(flows.contains(&Flow::Relay {
        proto: Proto::Udp,
        client: sa("10.77.0.2:4000"),
        edge_int: SocketAddr::new("10.77.0.1".parse().expect("ip"), int),
        public: SocketAddr::new("203.0.113.1".parse().expect("ip"), public),
        peer: sa("198.51.100.7:5000"),
        latch_peer: false,
        learn_port: sip_edge::datapath::rules::LearnPort::Neither,
    }));
    assert!(flows.contains(&Flow::Relay {
        proto: Proto::Udp,
        client: sa("10.77.0.2:4001"),
        edge_int: SocketAddr::new("10.77.0.1".parse().expect("ip"), int + 1),
        public: SocketAddr::new("203.0.113.1".parse().expect("ip"), public + 1),
        peer: sa("198.51.100.7:5001"),
        latch_peer: false,
        learn_port: sip_edge::datapath::rules::LearnPort::Neither,
    }));
    h.end(&d, Some("tt1"), EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn relay_inbound_call_with_rtcp_mux_is_one_flow() {
    let mut h = H::relay();
    let d = dialog(2);
    let out = h
        .sdp(
            &d,
            None,
            SdpRole::Offer,
            Side::External,
            PEER_PROXY,
            &audio("198.51.100.7", 5000, "a=rtcp-mux\r\n"),
        )
        .expect("offer");
    assert_eq!(c_addr(&out), "10.77.0.1");
    h.sdp(
        &d,
        Some("tt"),
        SdpRole::Answer,
        Side::Internal,
        CLIENT,
        &audio("10.77.0.2", 4000, "a=rtcp-mux\r\n"),
    )
    .expect("answer");
    assert_eq!(h.flows().len(), 1);
    // One pinhole, but the mux offer keeps an RTCP port for the dialog
    // (the answerer may decline mux, RFC 5761 §5.1.3), and the client's
    // budget counts both ports.
    assert_eq!(
        h.c.manager().client_flows("10.77.0.2".parse().expect("ip")),
        2
    );
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn nat_mode_rewrites_only_the_internal_sdp() {
    let mut h = H::new(settings(MediaMode::Nat));
    let d = dialog(3);
    let out = h
        .sdp(
            &d,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &audio("10.77.0.2", 4000, ""),
        )
        .expect("offer");
    assert_eq!(c_addr(&out), "203.0.113.1");
    let public = m_port(&out, 0);
    let answer = audio("198.51.100.7", 5000, "");
    let back = h
        .sdp(
            &d,
            Some("t"),
            SdpRole::Answer,
            Side::External,
            PEER_PROXY,
            &answer,
        )
        .expect("answer");
    assert_eq!(back, answer, "the peer's SDP passes untouched in nat mode");
    assert!(h.flows().contains(&Flow::Nat {
        proto: Proto::Udp,
        client: sa("10.77.0.2:4000"),
        public: SocketAddr::new("203.0.113.1".parse().expect("ip"), public),
        peer: sa("198.51.100.7:5000"),
        latch_peer: false,
        learn_port: sip_edge::datapath::rules::LearnPort::Neither,
    }));
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn late_offer_in_200_answer_in_ack() {
    let mut h = H::relay();
    let d = dialog(4);
    // INVITE without SDP: nothing reported. 200 OK carries the offer.
    h.sdp(
        &d,
        Some("tt"),
        SdpRole::Offer,
        Side::External,
        PEER_PROXY,
        &audio("198.51.100.7", 5000, ""),
    )
    .expect("offer in 200");
    assert!(h.flows().is_empty());
    h.sdp(
        &d,
        Some("tt"),
        SdpRole::Answer,
        Side::Internal,
        CLIENT,
        &audio("10.77.0.2", 4000, ""),
    )
    .expect("answer in ACK");
    assert_eq!(h.flows().len(), 2);
    h.end(&d, Some("tt"), EndReason::Bye);
    h.assert_no_orphans();
}

fn established(h: &mut H, d: &DialogKey) -> (u16, u16) {
    let out = h
        .sdp(
            d,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &audio("10.77.0.2", 4000, ""),
        )
        .expect("offer");
    let back = h
        .sdp(
            d,
            Some("tt"),
            SdpRole::Answer,
            Side::External,
            PEER_PROXY,
            &audio("198.51.100.7", 5000, ""),
        )
        .expect("answer");
    (m_port(&out, 0), m_port(&back, 0))
}

#[test]
fn reinvite_moving_a_stream_keeps_edge_ports_and_updates_in_place() {
    let mut h = H::relay();
    let d = dialog(5);
    let (public, int) = established(&mut h, &d);
    let ids_before: Vec<_> = h.c.sink().installed.keys().copied().collect();
    // The peer moves its media (re-INVITE from outside).
    let out = h
        .sdp(
            &d,
            Some("tt"),
            SdpRole::Offer,
            Side::External,
            PEER_PROXY,
            &audio("198.51.100.8", 6000, ""),
        )
        .expect("re-offer");
    assert_eq!(
        m_port(&out, 0),
        int,
        "the client keeps talking to the same edge port"
    );
    let back = h
        .sdp(
            &d,
            Some("tt"),
            SdpRole::Answer,
            Side::Internal,
            CLIENT,
            &audio("10.77.0.2", 4000, ""),
        )
        .expect("re-answer");
    assert_eq!(m_port(&back, 0), public);
    let ids_after: Vec<_> = h.c.sink().installed.keys().copied().collect();
    assert_eq!(ids_before, ids_after, "same pinholes, updated");
    assert!(h.c.sink().log.iter().any(|r| matches!(r, Recorded::Update(_, Flow::Relay { peer, .. }) if *peer == sa("198.51.100.8:6000"))));
    assert!(
        !h.c.sink()
            .log
            .iter()
            .any(|r| matches!(r, Recorded::Remove(_))),
        "media never interrupted"
    );
    // The client adds video: new flows installed, audio untouched.
    let log_len = h.c.sink().log.len();
    let out = h
        .sdp(
            &d,
            Some("tt"),
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &audio_video("10.77.0.2", 4000, 4002),
        )
        .expect("add video");
    assert_eq!(m_port(&out, 0), public);
    h.sdp(
        &d,
        Some("tt"),
        SdpRole::Answer,
        Side::External,
        PEER_PROXY,
        &audio_video("198.51.100.8", 6000, 6002),
    )
    .expect("video answer");
    assert_eq!(h.flows().len(), 4);
    assert!(
        h.c.sink().log[log_len..]
            .iter()
            .all(|r| matches!(r, Recorded::Install(..))),
        "{:?}",
        &h.c.sink().log[log_len..]
    );
    h.end(&d, Some("tt"), EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn hold_with_inactive_removes_pinholes_but_keeps_ports_and_sendonly_keeps_both() {
    let mut h = H::relay();
    let d = dialog(6);
    let (public, _) = established(&mut h, &d);
    let ports = h.c.manager().ports_in_use();
    h.sdp(
        &d,
        Some("tt"),
        SdpRole::Offer,
        Side::Internal,
        CLIENT,
        &audio("10.77.0.2", 4000, "a=sendonly\r\n"),
    )
    .expect("hold");
    h.sdp(
        &d,
        Some("tt"),
        SdpRole::Answer,
        Side::External,
        PEER_PROXY,
        &audio("198.51.100.7", 5000, "a=recvonly\r\n"),
    )
    .expect("held");
    assert_eq!(
        h.flows().len(),
        2,
        "sendonly hold: music on hold still flows"
    );
    h.sdp(
        &d,
        Some("tt"),
        SdpRole::Offer,
        Side::Internal,
        CLIENT,
        &audio("10.77.0.2", 4000, "a=inactive\r\n"),
    )
    .expect("inactive");
    h.sdp(
        &d,
        Some("tt"),
        SdpRole::Answer,
        Side::External,
        PEER_PROXY,
        &audio("198.51.100.7", 5000, "a=inactive\r\n"),
    )
    .expect("inactive answer");
    assert!(h.flows().is_empty(), "inactive: no pinhole");
    assert_eq!(
        h.c.manager().ports_in_use(),
        ports,
        "ports kept for the resume"
    );
    let out = h
        .sdp(
            &d,
            Some("tt"),
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &audio("10.77.0.2", 4000, ""),
        )
        .expect("resume");
    assert_eq!(m_port(&out, 0), public, "resume on the same edge port");
    h.sdp(
        &d,
        Some("tt"),
        SdpRole::Answer,
        Side::External,
        PEER_PROXY,
        &audio("198.51.100.7", 5000, ""),
    )
    .expect("resumed");
    assert_eq!(h.flows().len(), 2);
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn port_zero_in_the_answer_rejects_the_stream_and_frees_its_ports() {
    let mut h = H::relay();
    let d = dialog(7);
    h.sdp(
        &d,
        None,
        SdpRole::Offer,
        Side::Internal,
        CLIENT,
        &audio_video("10.77.0.2", 4000, 4002),
    )
    .expect("offer");
    assert_eq!(h.c.manager().ports_in_use(), 4);
    h.sdp(
        &d,
        Some("t"),
        SdpRole::Answer,
        Side::External,
        PEER_PROXY,
        &audio_video("198.51.100.7", 5000, 0),
    )
    .expect("answer");
    assert_eq!(h.flows().len(), 2, "audio only");
    assert!(h.flows().iter().all(
        |f| matches!(f, Flow::Relay { peer, .. } if peer.port() == 5000 || peer.port() == 5001)
    ));
    assert_eq!(
        h.c.manager().ports_in_use(),
        4,
        "video's public pair released, audio's internal pair taken"
    );
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn early_media_forks_replace_then_2xx_confirms() {
    let mut h = H::relay();
    let d = dialog(8);
    h.sdp(
        &d,
        None,
        SdpRole::Offer,
        Side::Internal,
        CLIENT,
        &audio("10.77.0.2", 4000, ""),
    )
    .expect("offer");
    let a = h
        .sdp(
            &d,
            Some("forkA"),
            SdpRole::EarlyAnswer,
            Side::External,
            PEER_PROXY,
            &audio("198.51.100.7", 5000, ""),
        )
        .expect("183 A");
    let peer = |h: &H| -> Vec<u16> {
        let mut v: Vec<u16> = h
            .flows()
            .iter()
            .map(|f| match f {
                Flow::Relay { peer, .. } | Flow::Nat { peer, .. } => peer.port(),
            })
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(peer(&h), vec![5000, 5001], "early media installed");
    let b = h
        .sdp(
            &d,
            Some("forkB"),
            SdpRole::EarlyAnswer,
            Side::External,
            PEER_PROXY,
            &audio("198.51.100.9", 7000, ""),
        )
        .expect("183 B");
    assert_eq!(
        m_port(&a, 0),
        m_port(&b, 0),
        "forks share the edge port the caller sees"
    );
    assert_eq!(peer(&h), vec![7000, 7001], "latest fork wins");
    h.sdp(
        &d,
        Some("forkA"),
        SdpRole::Answer,
        Side::External,
        PEER_PROXY,
        &audio("198.51.100.7", 5000, ""),
    )
    .expect("200 A");
    assert_eq!(
        peer(&h),
        vec![5000, 5001],
        "2xx fork replaces the early one"
    );
    // B's late 2xx after confirmation: rewritten, nothing installed; its BYE removes nothing.
    let late = h
        .sdp(
            &d,
            Some("forkB"),
            SdpRole::Answer,
            Side::External,
            PEER_PROXY,
            &audio("198.51.100.9", 7000, ""),
        )
        .expect("200 B");
    assert_eq!(c_addr(&late), "10.77.0.1");
    h.end(&d, Some("forkB"), EndReason::Bye);
    assert_eq!(peer(&h), vec![5000, 5001]);
    h.end(&d, Some("forkA"), EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn early_media_cleaned_by_cancel_and_by_486() {
    for reason in [
        EndReason::Cancel,
        EndReason::Failure(486),
        EndReason::Timeout,
    ] {
        let mut h = H::relay();
        let d = dialog(9);
        h.sdp(
            &d,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &audio("10.77.0.2", 4000, ""),
        )
        .expect("offer");
        h.sdp(
            &d,
            Some("f"),
            SdpRole::EarlyAnswer,
            Side::External,
            PEER_PROXY,
            &audio("198.51.100.7", 5000, ""),
        )
        .expect("183");
        assert_eq!(h.flows().len(), 2);
        h.end(&d, None, reason);
        h.assert_no_orphans();
    }
}

#[test]
fn a_failed_early_fork_goes_and_another_fork_answers() {
    let mut h = H::relay();
    let d = dialog(10);
    h.sdp(
        &d,
        None,
        SdpRole::Offer,
        Side::Internal,
        CLIENT,
        &audio("10.77.0.2", 4000, ""),
    )
    .expect("offer");
    h.sdp(
        &d,
        Some("a"),
        SdpRole::EarlyAnswer,
        Side::External,
        PEER_PROXY,
        &audio("198.51.100.7", 5000, ""),
    )
    .expect("183 a");
    h.end(&d, Some("a"), EndReason::Failure(486));
    assert!(
        h.flows().is_empty(),
        "the failed fork's early media is gone"
    );
    assert_eq!(h.c.manager().dialogs(), 1, "the dialog set lives on");
    h.sdp(
        &d,
        Some("b"),
        SdpRole::Answer,
        Side::External,
        PEER_PROXY,
        &audio("198.51.100.9", 7000, ""),
    )
    .expect("200 b");
    assert_eq!(h.flows().len(), 2);
    h.end(&d, Some("b"), EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn idle_unused_and_max_length_expiry() {
    // Never used: confirmed, no packet.
    let mut h = H::relay();
    let d = dialog(11);
    established(&mut h, &d);
    h.at(19);
    assert!(h.tick().is_empty());
    h.at(20);
    assert_eq!(h.tick(), vec![d.clone()]);
    h.assert_no_orphans();

    // Idle: media flowed, then stopped.
    let mut h = H::relay();
    established(&mut h, &d);
    for s in 1..=100 {
        h.at(s);
        h.packets(50);
        assert!(h.tick().is_empty(), "active call expired at {s}s");
    }
    h.at(159);
    assert!(h.tick().is_empty());
    h.at(160);
    assert_eq!(h.tick(), vec![d.clone()]);
    h.assert_no_orphans();

    // Maximum call length, even while media flows.
    let mut h = H::relay();
    established(&mut h, &d);
    h.packets(1);
    h.at(1);
    h.tick();
    h.at(4 * 3600 - 1);
    h.packets(1);
    assert!(h.tick().is_empty());
    h.at(4 * 3600);
    h.packets(1);
    assert_eq!(h.tick(), vec![d.clone()]);
    h.assert_no_orphans();

    // Early media that never carries anything is not "unused": callees ring long.
    let mut h = H::relay();
    h.sdp(
        &d,
        None,
        SdpRole::Offer,
        Side::Internal,
        CLIENT,
        &audio("10.77.0.2", 4000, ""),
    )
    .expect("offer");
    h.sdp(
        &d,
        Some("f"),
        SdpRole::EarlyAnswer,
        Side::External,
        PEER_PROXY,
        &audio("198.51.100.7", 5000, ""),
    )
    .expect("183");
    h.at(170);
    assert!(h.tick().is_empty());
    h.end(&d, None, EndReason::Cancel);
    h.assert_no_orphans();
}

#[test]
fn internal_targets_must_be_the_signalling_source_or_an_allowed_subnet() {
    let mut h = H::relay();
    let d = dialog(12);
    // SDP names another internal host: NAT-slipstreaming shape.
    let e = h
        .sdp(
            &d,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &audio("10.77.0.99", 4000, ""),
        )
        .expect_err("other host");
    assert!(matches!(e, MediaError::Forbidden { .. }), "{e:?}");
    assert_eq!(e.status(), 488);
    // A privileged port on the client itself.
    let e = h
        .sdp(
            &d,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &audio("10.77.0.2", 22, ""),
        )
        .expect_err("port 22");
    assert!(matches!(e, MediaError::Forbidden { .. }), "{e:?}");
    // An a=rtcp pointing elsewhere is checked too.
    let e = h
        .sdp(
            &d,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &audio("10.77.0.2", 4000, "a=rtcp:4001 IN IP4 10.77.0.50\r\n"),
        )
        .expect_err("rtcp elsewhere");
    assert!(matches!(e, MediaError::Forbidden { .. }), "{e:?}");
    h.assert_no_orphans();

    // With the subnet allowed, a media server next to the client is fine.
    let mut s = settings(MediaMode::Relay);
    s.allowed_internal_subnets = vec![sip_edge::config::parse_cidr("10.77.0.0/24").expect("cidr")];
    let mut h = H::new(s);
    h.sdp(
        &d,
        None,
        SdpRole::Offer,
        Side::Internal,
        CLIENT,
        &audio("10.77.0.99", 4000, ""),
    )
    .expect("allowed subnet");
    // ...and an outside peer may not name that subnet or the edge itself.
    for bad in ["10.77.0.5", "203.0.113.1", "127.0.0.1", "0.0.0.0"] {
        let e = h
            .sdp(
                &d,
                Some("t"),
                SdpRole::Answer,
                Side::External,
                PEER_PROXY,
                &audio(bad, 5000, ""),
            )
            .expect_err(bad);
        assert!(matches!(e, MediaError::Forbidden { .. }), "{bad}: {e:?}");
    }
    assert!(h.flows().is_empty());
    h.end(&d, None, EndReason::Cancel);
    h.assert_no_orphans();
}

#[test]
fn nothing_without_a_proxied_offer_and_bad_bodies_are_refused() {
    let mut h = H::relay();
    let d = dialog(13);
    let e = h
        .sdp(
            &d,
            Some("t"),
            SdpRole::Answer,
            Side::External,
            PEER_PROXY,
            &audio("198.51.100.7", 5000, ""),
        )
        .expect_err("no offer");
    assert!(matches!(e, MediaError::NotAcceptable { .. }), "{e:?}");
    let e = h
        .sdp(
            &d,
            None,
            SdpRole::Offer,
            Side::External,
            PEER_PROXY,
            "v=0\r\nm=audio x RTP/AVP 0\r\n",
        )
        .expect_err("garbage");
    assert!(matches!(e, MediaError::NotAcceptable { .. }), "{e:?}");
    let e = h
        .sdp(
            &d,
            None,
            SdpRole::Offer,
            Side::External,
            PEER_PROXY,
            &audio("media.example.com", 5000, ""),
        )
        .expect_err("fqdn");
    assert!(matches!(e, MediaError::NotAcceptable { .. }), "{e:?}");
    // Multipart: only one SDP part + address-free parts (Lync file
    // transfer tests below); an SDP hidden in a text part is refused.
    let multipart = "--b\r\nContent-Type: text/plain\r\n\r\nv=0\r\nc=IN IP4 10.77.0.2\r\n--b--\r\n";
    let e = h
        .sdp_typed(
            &d,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            multipart,
            "multipart/mixed;boundary=b",
        )
        .expect_err("multipart");
    assert!(matches!(e, MediaError::NotAcceptable { .. }), "{e:?}");
    // x-msmsgsinvite outside a dialog the edge set up: address-free
    // invitations pass, addressed ones are refused.
    let invite = "Invitation-Command: INVITE\r\nInvitation-Cookie: 7\r\n\r\n";
    assert_eq!(
        h.sdp_typed(
            &d,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            invite,
            "text/x-msmsgsinvite; charset=UTF-8"
        )
        .expect("invite"),
        invite
    );
    let accept = "Invitation-Command: ACCEPT\r\nInvitation-Cookie: 7\r\nIP-Address: 10.77.0.2\r\nPort: 6891\r\n\r\n";
    let e = h
        .sdp_typed(
            &d,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            accept,
            "text/x-msmsgsinvite",
        )
        .expect_err("accept");
    assert!(matches!(e, MediaError::Forbidden { .. }), "{e:?}");
    h.assert_no_orphans();
}

#[test]
fn per_client_and_global_caps_refuse_without_evicting() {
    let mut s = settings(MediaMode::Relay);
    s.max_flows_per_client = 4;
    let mut h = H::new(s);
    let (d1, d2, d3) = (dialog(21), dialog(22), dialog(23));
    established(&mut h, &d1);
    established(&mut h, &d2);
    let live = h.flows();
    let e = h
        .sdp(
            &d3,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &audio("10.77.0.2", 4100, ""),
        )
        .expect_err("over cap");
    assert!(matches!(e, MediaError::Exhausted { .. }), "{e:?}");
    assert_eq!(e.status(), 503);
    assert_eq!(h.flows(), live, "live calls untouched");
    // Another client is not affected by the first one's cap.
    h.sdp(
        &d3,
        None,
        SdpRole::Offer,
        Side::Internal,
        CLIENT2,
        &audio("10.77.0.3", 4000, ""),
    )
    .expect("other client");
    for d in [&d1, &d2, &d3] {
        h.end(d, None, EndReason::Bye);
    }
    h.assert_no_orphans();

    // Port exhaustion: 40000-40003 holds two RTP/RTCP pairs.
    let mut s = settings(MediaMode::Relay);
    s.port_ranges = vec![PortRange {
        start: 40000,
        end: 40003,
    }];
    let mut h = H::new(s);
    established(&mut h, &d1);
    let e = h
        .sdp(
            &d2,
            None,
            SdpRole::Offer,
            Side::Internal,
            CLIENT,
            &audio("10.77.0.2", 4100, ""),
        )
        .expect_err("no ports");
    assert!(matches!(e, MediaError::Exhausted { .. }), "{e:?}");
    assert_eq!(h.flows().len(), 2);
    h.end(&d1, None, EndReason::Bye);
    // Released ports can be used again.
    established(&mut h, &d2);
    h.end(&d2, None, EndReason::Bye);
    h.assert_no_orphans();

    // Call cap.
    let mut s = settings(MediaMode::Relay);
    s.max_calls = 1;
    let mut h = H::new(s);
    established(&mut h, &d1);
    let e = h
        .sdp(
            &d2,
            None,
            SdpRole::Offer,
            Side::External,
            PEER_PROXY,
            &audio("198.51.100.7", 5000, ""),
        )
        .expect_err("call cap");
    assert!(matches!(e, MediaError::Exhausted { .. }), "{e:?}");
    h.end(&d1, None, EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn a_map_failure_leaves_nothing_half_installed() {
    let mut h = H::relay();
    let d = dialog(30);
    h.sdp(
        &d,
        None,
        SdpRole::Offer,
        Side::Internal,
        CLIENT,
        &audio("10.77.0.2", 4000, ""),
    )
    .expect("offer");
    let ports = h.c.manager().ports_in_use();
    h.c.sink_mut().installs_before_failure = Some(1);
    let e = h
        .sdp(
            &d,
            Some("t"),
            SdpRole::Answer,
            Side::External,
            PEER_PROXY,
            &audio("198.51.100.7", 5000, ""),
        )
        .expect_err("table full");
    assert!(matches!(e, MediaError::Exhausted { .. }), "{e:?}");
    assert!(h.flows().is_empty(), "RTP installed then undone");
    assert!(h.c.manager().installed().is_empty());
    assert_eq!(
        h.c.manager().ports_in_use(),
        ports,
        "the answer's allocation was rolled back"
    );
    // The table frees up; the (retransmitted) answer now works.
    h.c.sink_mut().installs_before_failure = None;
    h.sdp(
        &d,
        Some("t"),
        SdpRole::Answer,
        Side::External,
        PEER_PROXY,
        &audio("198.51.100.7", 5000, ""),
    )
    .expect("answer");
    assert_eq!(h.flows().len(), 2);
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn msrp_and_rfc4145_tcp_streams_get_one_tcp_flow_each() {
    let mut h = H::relay();
    let d = dialog(31);
    let offer = "v=0\r\no=- 1 1 IN IP4 10.77.0.2\r\ns=-\r\nc=IN IP4 10.77.0.2\r\nt=0 0\r\nm=message 2855 TCP/MSRP *\r\na=path:msrp://10.77.0.2:2855/s111;tcp\r\nm=application 9 TCP wb\r\na=setup:active\r\na=connection:new\r\n";
    let out = h
        .sdp(&d, None, SdpRole::Offer, Side::Internal, CLIENT, offer)
        .expect("offer");
    assert!(!out.contains("10.77.0.2"), "{out}");
    let answer = "v=0\r\no=- 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\nm=message 2856 TCP/MSRP *\r\na=path:msrp://198.51.100.7:2856/s222;tcp\r\nm=application 5100 TCP wb\r\na=setup:passive\r\na=connection:new\r\n";
    let back = h
        .sdp(
            &d,
            Some("t"),
            SdpRole::Answer,
            Side::External,
            PEER_PROXY,
            answer,
        )
        .expect("answer");
    assert!(back.contains("a=path:msrp://10.77.0.1:"), "{back}");
    let flows = h.flows();
    assert_eq!(flows.len(), 2);
    assert!(flows.iter().all(|f| f.proto() == Proto::Tcp));
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

// ---- x-msmsgsinvite file transfer (media::manager, File transfers) ----

const MSMSGS: &str = "text/x-msmsgsinvite; charset=UTF-8";

fn ft_invite(cookie: u32) -> String {
    format!(
        "Application-Name: File Transfer\r\nApplication-GUID: {{5D3E02AB-6190-11d3-BBBB-00C04F795683}}\r\nInvitation-Command: INVITE\r\nInvitation-Cookie: {cookie}\r\nApplication-File: notes.txt\r\nApplication-FileSize: 65536\r\n\r\n"
    )
}

fn ft_accept(cookie: u32, addr: SocketAddr) -> String {
    format!(
        "Invitation-Command: ACCEPT\r\nInvitation-Cookie: {cookie}\r\nIP-Address: {}\r\nPort: {}\r\nPortX: {}\r\nAuthCookie: 1398765431\r\nLaunch-Application: FALSE\r\nRequest-Data: IP-Address:\r\n\r\n",
        addr.ip(),
        addr.port(),
        addr.port() + 1
    )
}

fn ft_cancel(cookie: u32) -> String {
    format!(
        "Invitation-Command: CANCEL\r\nInvitation-Cookie: {cookie}\r\nCancel-Code: REJECT\r\n\r\n"
    )
}

impl H {
    /// An invitation as the proxy reports it (INVITE command = offer, ACCEPT = answer).
    fn ft(
        &mut self,
        d: &DialogKey,
        side: Side,
        src: &str,
        body: &str,
    ) -> Result<String, MediaError> {
        let role = if body.contains("Invitation-Command: ACCEPT") {
            SdpRole::Answer
        } else {
            SdpRole::Offer
        };
        self.sdp_typed(d, Some("tt"), role, side, src, body, MSMSGS)
    }

    /// INVITE command from `inviter`, addressed ACCEPT from the other side;
    /// returns the ACCEPT as forwarded.
    fn transfer(
        &mut self,
        d: &DialogKey,
        cookie: u32,
        accept_side: Side,
        listen: SocketAddr,
    ) -> Result<String, MediaError> {
        let src = |s: Side| {
            if s == Side::Internal {
                CLIENT
            } else {
                PEER_PROXY
            }
        };
        let inv = ft_invite(cookie);
        assert_eq!(
            self.ft(d, accept_side.other(), src(accept_side.other()), &inv)
                .expect("INVITE command"),
            inv,
            "address-free invitation passes unchanged"
        );
        self.ft(d, accept_side, src(accept_side), &ft_accept(cookie, listen))
    }
}

/// Where the forwarded invitation tells the connector to go.
fn advertised(body: &str) -> SocketAddr {
    sip_edge::sip::msmsgs::parse(body.as_bytes())
        .expect("invitation")
        .endpoint
        .expect("IP-Address/Port")
}

fn ip_of(s: &str) -> std::net::IpAddr {
    s.parse().expect("ip")
}

use sip_edge::datapath::rules::LearnPort;

#[test]
fn msmsgs_relay_external_listener_internal_connector() {
    let mut h = H::relay();
    let d = dialog(40);
    established(&mut h, &d);
    let call = h.flows();
    let out = h
        .transfer(&d, 4242, Side::External, sa("198.51.100.7:6891"))
        .expect("ACCEPT");
    let adv = advertised(&out);
    assert_eq!(
        adv.ip(),
        ip_of("10.77.0.1"),
        "the inside connects to the edge's internal address"
    );
    assert!(!out.contains("198.51.100.7"), "{out}");
    assert!(
        out.contains(&format!("PortX: {}\r\n", adv.port())),
        "PortX follows Port: {out}"
    );
    let t = h.c.manager().transfers_of(&d);
    assert_eq!(t.len(), 1);
    let Flow::Relay {
        proto,
        client,
        edge_int,
        public,
        peer,
        latch_peer,
        learn_port,
    } = t[0].1
    else {
        panic!("relay flow expected: {:?}", t[0].1)
    };
    assert_eq!(
        (proto, edge_int, peer, latch_peer, learn_port),
        (
            Proto::Tcp,
            adv,
            sa("198.51.100.7:6891"),
            false,
            LearnPort::Client
        )
    );
    assert_eq!(
        client.ip(),
        ip_of("10.77.0.2"),
        "connector = the client's signalling source, strict"
    );
    assert_eq!(public.ip(), ip_of("203.0.113.1"));
    assert!((40000..=40099).contains(&public.port()) && public.port() != adv.port());
    assert_eq!(
        h.flows().len(),
        call.len() + 1,
        "the call's media is untouched"
    );
    assert_eq!(
        h.c.manager().client_flows(ip_of("10.77.0.2")),
        3,
        "RTP/RTCP + the transfer count against the client"
    );
    h.end(&d, Some("tt"), EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn msmsgs_relay_internal_listener_external_connector_with_internal_variants() {
    let mut h = H::relay();
    let d = dialog(41);
    established(&mut h, &d);
    // Messenger behind a NAT names its outside guess and its LAN address.
    h.ft(&d, Side::External, PEER_PROXY, &ft_invite(7))
        .expect("INVITE command");
    let accept = "Invitation-Command: ACCEPT\r\nInvitation-Cookie: 7\r\nIP-Address: 192.0.2.50\r\nIP-Address-Internal: 10.77.0.2\r\nPort: 6891\r\nPortX: 11178\r\nPortX-Internal: 6892\r\nAuthCookie: 9\r\n\r\n";
    let out = h.ft(&d, Side::Internal, CLIENT, accept).expect("ACCEPT");
    assert!(
        !out.contains("10.77.") && !out.contains("192.0.2.50"),
        "inside addresses leaked: {out}"
    );
    let adv = advertised(&out);
    assert_eq!(adv.ip(), ip_of("203.0.113.1"));
    for f in ["Port", "PortX", "PortX-Internal"] {
        assert!(
            out.contains(&format!("\r\n{f}: {}\r\n", adv.port())),
            "{f} not rewritten: {out}"
        );
    }
    let t = h.c.manager().transfers_of(&d);
    let Flow::Relay {
        client,
        public,
        peer,
        learn_port,
        latch_peer,
        ..
    } = t[0].1
    else {
        panic!("{:?}", t[0].1)
    };
    assert_eq!(
        client,
        sa("10.77.0.2:6892"),
        "the LAN address and its PortX-Internal are the listener"
    );
    assert_eq!(public, adv);
    assert_eq!(
        (peer, learn_port, latch_peer),
        (sa("198.51.100.1:9"), LearnPort::Peer, false),
        "connector = the external TLS peer, strict"
    );
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn msmsgs_nat_mode_both_directions() {
    let mut h = H::new(settings(MediaMode::Nat));
    let d = dialog(42);
    established(&mut h, &d);
    // Internal listener: one public port, DNAT to the client.
    let out = h
        .transfer(&d, 1, Side::Internal, sa("10.77.0.2:6891"))
        .expect("ACCEPT from inside");
    let adv = advertised(&out);
    assert_eq!(adv.ip(), ip_of("203.0.113.1"));
    assert_eq!(
        h.c.manager().transfers_of(&d)[0].1,
        Flow::Nat {
            proto: Proto::Tcp,
            client: sa("10.77.0.2:6891"),
            public: adv,
            peer: sa("198.51.100.1:9"),
            latch_peer: false,
            learn_port: LearnPort::Peer
        }
    );
    // External listener, internal connector: nat cannot learn the client's
    // port, so the transfer goes relay-style through the internal address.
    let out = h
        .transfer(&d, 2, Side::External, sa("198.51.100.7:6891"))
        .expect("ACCEPT from outside");
    let adv2 = advertised(&out);
    assert_eq!(
        adv2.ip(),
        ip_of("10.77.0.1"),
        "rewritten even though nat mode leaves outside SDP alone"
    );
    let Flow::Relay {
        client,
        edge_int,
        peer,
        learn_port,
        ..
    } = h.c.manager().transfers_of(&d)[1].1
    else {
        panic!()
    };
    assert_eq!(
        (client.ip(), edge_int, peer, learn_port),
        (
            ip_of("10.77.0.2"),
            adv2,
            sa("198.51.100.7:6891"),
            LearnPort::Client
        )
    );
    assert_eq!(h.flows().len(), 4);
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn msmsgs_latch_opt_in_latches_an_external_connector_only() {
    let mut s = settings(MediaMode::Relay);
    s.latch = true;
    let mut h = H::new(s);
    let d = dialog(43);
    established(&mut h, &d);
    h.transfer(&d, 1, Side::Internal, sa("10.77.0.2:6891"))
        .expect("inside listens");
    h.transfer(&d, 2, Side::External, sa("198.51.100.7:6891"))
        .expect("outside listens");
    let t = h.c.manager().transfers_of(&d);
    assert!(
        matches!(
            t[0].1,
            Flow::Relay {
                latch_peer: true,
                learn_port: LearnPort::Peer,
                ..
            }
        ),
        "{:?}",
        t[0].1
    );
    assert!(
        matches!(
            t[1].1,
            Flow::Relay {
                latch_peer: false,
                learn_port: LearnPort::Client,
                ..
            }
        ),
        "{:?}",
        t[1].1
    );
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn msmsgs_refusals_follow_design_section_3_and_change_nothing() {
    let mut s = settings(MediaMode::Relay);
    s.allowed_internal_subnets = vec![sip_edge::config::parse_cidr("10.77.5.0/24").expect("cidr")];
    let mut h = H::new(s);
    let d = dialog(44);
    established(&mut h, &d);
    let live = h.flows();
    let ports = h.c.manager().ports_in_use();
    let cases: Vec<(Side, String, &str)> = vec![
        // The inside names another internal host (NAT slipstreaming shape).
        (Side::Internal, ft_accept(1, sa("10.77.0.99:6891")), "forbidden"),
        // ...or a privileged port on itself.
        (Side::Internal, ft_accept(1, sa("10.77.0.2:445")), "forbidden"),
        // The outside names the inside, the edge, loopback.
        (Side::External, ft_accept(1, sa("10.77.5.9:6891")), "forbidden"),
        (Side::External, ft_accept(1, sa("203.0.113.1:6891")), "forbidden"),
        (Side::External, ft_accept(1, sa("127.0.0.1:6891")), "forbidden"),
        // An address without a port, an address in a CANCEL.
        (Side::Internal, "Invitation-Command: ACCEPT\r\nInvitation-Cookie: 1\r\nIP-Address: 10.77.0.2\r\n\r\n".into(), "unacceptable"),
        (Side::Internal, "Invitation-Command: CANCEL\r\nInvitation-Cookie: 1\r\nIP-Address: 10.77.0.2\r\nPort: 6891\r\n\r\n".into(), "unacceptable"),
        // A bad address value.
        (Side::External, "Invitation-Command: ACCEPT\r\nIP-Address: 198.51.100.300\r\nPort: 1\r\n\r\n".into(), "unacceptable"),
    ];
    for (side, body, want) in &cases {
        let other = side.other();
        let src = |s: Side| {
            if s == Side::Internal {
                CLIENT
            } else {
                PEER_PROXY
            }
        };
        h.ft(&d, other, src(other), &ft_invite(1))
            .expect("INVITE command");
        let e = h.ft(&d, *side, src(*side), body).expect_err(body);
        let ok = match *want {
            "forbidden" => matches!(e, MediaError::Forbidden { .. }),
            _ => matches!(e, MediaError::NotAcceptable { .. }),
        };
        assert!(ok, "{body}: {e:?}");
        assert_eq!(e.status(), 488);
    }
    // An ACCEPT for a cookie nobody invited, or one only its own side invited.
    let e = h
        .ft(
            &d,
            Side::External,
            PEER_PROXY,
            &ft_accept(99, sa("198.51.100.7:6891")),
        )
        .expect_err("uninvited");
    assert!(matches!(e, MediaError::NotAcceptable { .. }), "{e:?}");
    h.ft(&d, Side::External, PEER_PROXY, &ft_invite(98))
        .expect("INVITE command from outside");
    let e = h
        .ft(
            &d,
            Side::External,
            PEER_PROXY,
            &ft_accept(98, sa("198.51.100.7:6891")),
        )
        .expect_err("self-invited");
    assert!(matches!(e, MediaError::NotAcceptable { .. }), "{e:?}");
    // A dialog the edge never set up.
    let e = h
        .ft(
            &dialog(45),
            Side::External,
            PEER_PROXY,
            &ft_accept(1, sa("198.51.100.7:6891")),
        )
        .expect_err("no dialog");
    assert!(matches!(e, MediaError::Forbidden { .. }), "{e:?}");
    assert_eq!(h.flows(), live, "refusals never touch live flows");
    assert_eq!(
        h.c.manager().ports_in_use(),
        ports,
        "refusals allocate nothing"
    );
    assert!(h.c.manager().transfers_of(&d).is_empty());
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn msmsgs_cancel_expiry_reinvite_caps_and_map_failures() {
    let mut h = H::relay();
    let d = dialog(46);
    established(&mut h, &d);
    // Two transfers; CANCEL with one cookie removes only that one.
    h.transfer(&d, 1, Side::External, sa("198.51.100.7:6891"))
        .expect("t1");
    let out2 = h
        .transfer(&d, 2, Side::Internal, sa("10.77.0.2:6893"))
        .expect("t2");
    assert_eq!(h.c.manager().transfers_of(&d).len(), 2);
    // The same ACCEPT again (a second MESSAGE) changes nothing.
    let log = h.c.sink().log.len();
    assert_eq!(
        h.ft(
            &d,
            Side::Internal,
            CLIENT,
            &ft_accept(2, sa("10.77.0.2:6893"))
        )
        .expect("again"),
        out2
    );
    assert_eq!(h.c.sink().log.len(), log);
    let cancel = ft_cancel(1);
    assert_eq!(
        h.ft(&d, Side::Internal, CLIENT, &cancel).expect("CANCEL"),
        cancel
    );
    let t = h.c.manager().transfers_of(&d);
    assert_eq!(t.len(), 1);
    assert!(
        matches!(
            t[0].1,
            Flow::Nat { .. }
                | Flow::Relay {
                    learn_port: LearnPort::Peer,
                    ..
                }
        ),
        "cookie 2 stays"
    );
    // A re-INVITE of the call keeps the transfer.
    h.sdp(
        &d,
        Some("tt"),
        SdpRole::Offer,
        Side::External,
        PEER_PROXY,
        &audio("198.51.100.8", 6000, ""),
    )
    .expect("re-offer");
    h.sdp(
        &d,
        Some("tt"),
        SdpRole::Answer,
        Side::Internal,
        CLIENT,
        &audio("10.77.0.2", 4000, ""),
    )
    .expect("re-answer");
    assert_eq!(h.c.manager().transfers_of(&d).len(), 1);
    // Never used: gone after unused_timeout, the call lives on.
    h.at(10);
    h.packets(5); // the call's media flows (the transfer's too: see below)
    let tid = h.c.manager().transfers_of(&d)[0].0;
    h.c.sink_mut().packets.remove(&tid);
    assert!(h.tick().is_empty());
    h.at(20);
    assert!(
        h.tick().is_empty(),
        "an unused transfer never ends the call"
    );
    assert!(
        h.c.manager().transfers_of(&d).is_empty(),
        "unused transfer expired"
    );
    assert_eq!(h.flows().len(), 2, "the call's media stays");
    // Idle: carried data, then silence for idle_timeout.
    h.transfer(&d, 3, Side::External, sa("198.51.100.7:6895"))
        .expect("t3");
    let tid = h.c.manager().transfers_of(&d)[0].0;
    h.at(25);
    h.packets(100);
    assert!(h.tick().is_empty());
    // From now on only the call's media moves.
    let call_only = |h: &mut H| {
        h.packets(1);
        if let Some(p) = h.c.sink_mut().packets.get_mut(&tid) {
            *p -= 1;
        }
    };
    for t in [50, 25 + 59] {
        h.at(t);
        call_only(&mut h);
        assert!(h.tick().is_empty());
    }
    assert_eq!(
        h.c.manager().transfers_of(&d).len(),
        1,
        "active within idle_timeout"
    );
    h.at(25 + 60);
    call_only(&mut h);
    assert!(h.tick().is_empty(), "an idle transfer never ends the call");
    assert!(
        h.c.manager().transfers_of(&d).is_empty(),
        "idle transfer expired"
    );
    assert_eq!(h.flows().len(), 2, "the call's media stays");
    // A map failure leaves nothing half installed; ports come back.
    let ports = h.c.manager().ports_in_use();
    h.c.sink_mut().installs_before_failure = Some(0);
    let e = h
        .transfer(&d, 4, Side::External, sa("198.51.100.7:6897"))
        .expect_err("table full");
    assert!(matches!(e, MediaError::Exhausted { .. }), "{e:?}");
    assert_eq!(h.c.manager().ports_in_use(), ports);
    assert!(h.c.manager().transfers_of(&d).is_empty());
    h.c.sink_mut().installs_before_failure = None;
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();

    // Per-client cap: the transfer is refused, the call untouched.
    let mut s = settings(MediaMode::Relay);
    s.max_flows_per_client = 2;
    let mut h = H::new(s);
    established(&mut h, &d);
    let live = h.flows();
    let e = h
        .transfer(&d, 1, Side::External, sa("198.51.100.7:6891"))
        .expect_err("over cap");
    assert!(matches!(e, MediaError::Exhausted { .. }), "{e:?}");
    assert_eq!(e.status(), 503);
    assert_eq!(h.flows(), live);
    // The call's expiry takes its transfers along.
    h.c.sink_mut().installs_before_failure = None;
    h.at(20);
    assert_eq!(h.tick(), vec![d.clone()]);
    h.assert_no_orphans();
}

#[test]
fn msmsgs_transfers_die_with_their_dialog_on_every_end() {
    for reason in [
        EndReason::Bye,
        EndReason::Cancel,
        EndReason::Timeout,
        EndReason::Shutdown,
    ] {
        let mut h = H::new(settings(MediaMode::Nat));
        let d = dialog(47);
        established(&mut h, &d);
        h.transfer(&d, 1, Side::Internal, sa("10.77.0.2:6891"))
            .expect("t1");
        h.transfer(&d, 2, Side::External, sa("198.51.100.7:6891"))
            .expect("t2");
        assert_eq!(h.flows().len(), 4);
        h.end(&d, None, reason);
        h.assert_no_orphans();
    }
}

#[test]
fn msmsgs_msnftp_order_inviter_listens_after_plain_accept() {
    // MSNFTP order: the sender INVITEs, the receiver ACCEPTs without an
    // address, the sender ACCEPTs again naming its listener; the receiver
    // connects.
    let mut h = H::relay();
    let d = dialog(48);
    established(&mut h, &d);
    h.ft(&d, Side::Internal, CLIENT, &ft_invite(5))
        .expect("INVITE command");
    let plain =
        "Invitation-Command: ACCEPT\r\nInvitation-Cookie: 5\r\nRequest-Data: IP-Address:\r\n\r\n";
    assert_eq!(
        h.ft(&d, Side::External, PEER_PROXY, plain)
            .expect("plain ACCEPT"),
        plain
    );
    let out = h
        .ft(
            &d,
            Side::Internal,
            CLIENT,
            &ft_accept(5, sa("10.77.0.2:6891")),
        )
        .expect("addressed ACCEPT");
    assert_eq!(advertised(&out).ip(), ip_of("203.0.113.1"));
    let t = h.c.manager().transfers_of(&d);
    assert!(
        matches!(t[0].1, Flow::Relay { client, peer, learn_port: LearnPort::Peer, .. } if client == sa("10.77.0.2:6891") && peer == sa("198.51.100.1:9")),
        "{:?}",
        t[0].1
    );
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

// ---- Office Communicator 2007 R2 / Lync file transfer: multipart/mixed ----
// (media::control module docs; MIME splitting in sip::multipart)

const FT_BOUNDARY: &str = "urn:uuid:6F3A2C1B-0D4E-4B8A-9C7D-2E5F1A3B4C5D";

fn ft_xml(id: u32) -> String {
    format!(
        "<request xmlns=\"http://schemas.microsoft.com/rtc/2009/05/filetransfer\" requestId=\"{id}\">\r\n<publishFile>\r\n<fileInfo><name>report.pdf</name><size>1048576</size></fileInfo>\r\n</publishFile>\r\n</request>"
    )
}

fn data_sdp(ip: &str, port: u16, setup: &str) -> String {
    format!(
        "v=0\r\no=- 0 0 IN IP4 {ip}\r\ns=session\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=data {port} TCP/TLS/MSRP *\r\na=setup:{setup}\r\na=connection:new\r\na=accept-types:application/octet-stream\r\n"
    )
}

/// `--boundary`-delimited body of `parts` (content type, content), with a
/// preamble and an epilogue like Communicator's.
fn multipart(parts: &[(&str, &str)]) -> String {
    let mut b = String::from("This is a multi-part message in MIME format.\r\n");
    for (ct, content) in parts {
        b.push_str(&format!(
            "--{FT_BOUNDARY}\r\nContent-Type: {ct}\r\n\r\n{content}\r\n"
        ));
    }
    b.push_str(&format!("--{FT_BOUNDARY}--\r\nepilogue\r\n"));
    b
}

fn mixed_ct() -> String {
    format!("multipart/mixed;boundary=\"{FT_BOUNDARY}\"")
}

/// The content of the part of type `ct` in a body built by [`multipart`].
fn part_of<'a>(body: &'a str, ct: &str) -> &'a str {
    let head = format!("Content-Type: {ct}\r\n\r\n");
    let start = body.find(&head).expect("part") + head.len();
    let len = body
        .get(start..)
        .and_then(|r| r.find(&format!("\r\n--{FT_BOUNDARY}")))
        .expect("part end");
    body.get(start..start + len).expect("part content")
}

impl H {
    fn mixed(
        &mut self,
        d: &DialogKey,
        tag: Option<&str>,
        role: SdpRole,
        side: Side,
        src: &str,
        body: &str,
    ) -> Result<String, MediaError> {
        self.sdp_typed(d, tag, role, side, src, body, &mixed_ct())
    }
}

#[test]
fn lync_file_transfer_multipart_rewrites_sdp_keeps_xml_and_installs_tcp_pinhole() {
    let mut h = H::relay();
    let d = dialog(60);
    let xml = ft_xml(7);
    let offer = multipart(&[
        ("application/sdp", &data_sdp("10.77.0.2", 9, "active")),
        ("application/ms-filetransfer+xml", &xml),
    ]);
    let out = h
        .mixed(&d, None, SdpRole::Offer, Side::Internal, CLIENT, &offer)
        .expect("offer");
    assert!(!out.contains("10.77.0.2"), "private address leaked: {out}");
    let sdp = part_of(&out, "application/sdp");
    assert_eq!(c_addr(sdp), "203.0.113.1");
    assert_eq!(
        part_of(&out, "application/ms-filetransfer+xml"),
        xml,
        "XML part byte for byte"
    );
    // Everything but the SDP part is as received: boundary, preamble,
    // part headers, epilogue.
    assert_eq!(
        out.replace(sdp, "SDP"),
        offer.replace(&data_sdp("10.77.0.2", 9, "active"), "SDP"),
        "{out}"
    );
    assert!(h.flows().is_empty(), "no pinhole before the answer");

    // The answer: a multipart with only the SDP part (plain SDP works too).
    let answer = multipart(&[(
        "application/sdp",
        &data_sdp("198.51.100.7", 5100, "passive"),
    )]);
    let back = h
        .mixed(
            &d,
            Some("tt"),
            SdpRole::Answer,
            Side::External,
            PEER_PROXY,
            &answer,
        )
        .expect("answer");
    let sdp = part_of(&back, "application/sdp");
    assert_eq!(c_addr(sdp), "10.77.0.1");
    assert!(!back.contains("198.51.100.7"), "{back}");
    let edge_int = m_port(sdp, 0);
    assert!((40000..=40099).contains(&edge_int), "{edge_int}");
    let flows = h.flows();
    assert_eq!(flows.len(), 1, "one TCP flow: {flows:?}");
    assert!(
        matches!(flows[0], Flow::Relay { proto: Proto::Tcp, peer, edge_int: e, .. }
            if peer == sa("198.51.100.7:5100") && e.port() == edge_int),
        "{:?}",
        flows[0]
    );

    // INFO download / cancel: bare ms-filetransfer+xml passes unchanged and
    // touches no pinhole.
    let info = "<request requestId=\"8\"><downloadFile><fileInfo><name>report.pdf</name></fileInfo></downloadFile></request>";
    for side in [Side::External, Side::Internal] {
        let src = if side == Side::External {
            PEER_PROXY
        } else {
            CLIENT
        };
        assert_eq!(
            h.sdp_typed(
                &d,
                Some("tt"),
                SdpRole::Offer,
                side,
                src,
                info,
                "application/ms-filetransfer+xml; charset=utf-8"
            )
            .expect("INFO body"),
            info
        );
    }
    assert_eq!(h.flows(), flows, "INFO changed no pinhole");

    h.end(&d, Some("tt"), EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn lync_file_transfer_inbound_in_nat_mode_and_plain_sdp_answer() {
    // NAT mode: the external offer passes unchanged (nothing to hide),
    // the internal answer's SDP part is rewritten.
    let mut h = H::new(settings(MediaMode::Nat));
    let d = dialog(61);
    let offer = multipart(&[
        ("application/ms-filetransfer+xml", &ft_xml(1)),
        ("application/sdp", &data_sdp("198.51.100.7", 9, "active")),
    ]);
    let out = h
        .mixed(&d, None, SdpRole::Offer, Side::External, PEER_PROXY, &offer)
        .expect("offer");
    assert_eq!(out, offer);
    let back = h
        .sdp(
            &d,
            Some("tt"),
            SdpRole::Answer,
            Side::Internal,
            CLIENT,
            &data_sdp("10.77.0.2", 6000, "passive"),
        )
        .expect("answer");
    assert!(!back.contains("10.77.0.2"), "{back}");
    assert_eq!(h.flows().len(), 1);
    assert!(h.flows().iter().all(|f| f.proto() == Proto::Tcp));
    h.end(&d, None, EndReason::Bye);
    h.assert_no_orphans();
}

#[test]
fn multipart_refusals_leave_nothing_behind() {
    let mut h = H::relay();
    let sdp = data_sdp("10.77.0.2", 9, "active");
    let xml = ft_xml(3);
    let nested = format!(
        "multipart/mixed; boundary=inner\r\n\r\n--inner\r\nContent-Type: application/sdp\r\n\r\n{sdp}\r\n--inner--"
    );
    let cases: Vec<(&str, String, String)> = vec![
        (
            "two SDP parts",
            mixed_ct(),
            multipart(&[("application/sdp", &sdp), ("application/sdp", &sdp)]),
        ),
        (
            "no SDP part",
            mixed_ct(),
            multipart(&[("application/ms-filetransfer+xml", &xml)]),
        ),
        (
            "unknown part type",
            mixed_ct(),
            multipart(&[("application/sdp", &sdp), ("text/plain", "IP 10.77.0.2")]),
        ),
        (
            "nested multipart",
            mixed_ct(),
            multipart(&[("application/ms-filetransfer+xml", &xml)]).replacen(
                "Content-Type: application/ms-filetransfer+xml\r\n\r\n",
                &format!("Content-Type: {nested}\r\n\r\nx"),
                1,
            ),
        ),
        (
            "other multipart subtype",
            mixed_ct().replace("mixed", "alternative"),
            multipart(&[("application/sdp", &sdp)]),
        ),
        (
            "no boundary parameter",
            "multipart/mixed".to_owned(),
            multipart(&[("application/sdp", &sdp)]),
        ),
        (
            "wrong boundary",
            "multipart/mixed; boundary=other".to_owned(),
            multipart(&[("application/sdp", &sdp)]),
        ),
        (
            "no close delimiter",
            mixed_ct(),
            multipart(&[("application/sdp", &sdp)]).replace(&format!("--{FT_BOUNDARY}--"), ""),
        ),
        (
            "base64 SDP part",
            mixed_ct(),
            multipart(&[("application/sdp", &sdp)]).replace(
                "Content-Type: application/sdp\r\n",
                "Content-Type: application/sdp\r\nContent-Transfer-Encoding: base64\r\n",
            ),
        ),
        (
            "malformed part header",
            mixed_ct(),
            multipart(&[("application/sdp", &sdp)]).replace(
                "Content-Type: application/sdp\r\n",
                "Content-Type application/sdp\r\n",
            ),
        ),
    ];
    for (n, (what, ct, body)) in cases.iter().enumerate() {
        let d = dialog(70 + n as u32);
        let e = h
            .sdp_typed(&d, None, SdpRole::Offer, Side::Internal, CLIENT, body, ct)
            .expect_err(what);
        assert!(
            matches!(e, MediaError::NotAcceptable { .. }),
            "{what}: {e:?}"
        );
        h.end(&d, None, EndReason::Failure(488));
    }
    assert!(h.c.sink().log.is_empty(), "{:?}", h.c.sink().log);
    h.assert_no_orphans();

    // A refused multipart answer installs nothing; the offer's ports go
    // with the dialog.
    let d = dialog(90);
    h.mixed(
        &d,
        None,
        SdpRole::Offer,
        Side::Internal,
        CLIENT,
        &multipart(&[("application/sdp", &sdp)]),
    )
    .expect("offer");
    let bad = multipart(&[
        (
            "application/sdp",
            &data_sdp("198.51.100.7", 5100, "passive"),
        ),
        (
            "application/sdp",
            &data_sdp("198.51.100.7", 5102, "passive"),
        ),
    ]);
    h.mixed(
        &d,
        Some("tt"),
        SdpRole::Answer,
        Side::External,
        PEER_PROXY,
        &bad,
    )
    .expect_err("two SDP answers");
    assert!(h.flows().is_empty());
    h.end(&d, None, EndReason::Failure(488));
    h.assert_no_orphans();
}

#[test]
fn every_truncation_of_a_multipart_offer_is_handled_without_panic() {
    let mut h = H::relay();
    let offer = multipart(&[
        ("application/sdp", &data_sdp("10.77.0.2", 9, "active")),
        ("application/ms-filetransfer+xml", &ft_xml(9)),
    ]);
    let close = offer.find(&format!("--{FT_BOUNDARY}--")).expect("close") + FT_BOUNDARY.len() + 4;
    let answer = data_sdp("198.51.100.7", 5100, "passive");
    let mut accepted = 0;
    for n in 0..=offer.len() {
        let d = dialog(1000 + n as u32);
        let body = offer.get(..n).expect("ascii prefix");
        match h.mixed(&d, None, SdpRole::Offer, Side::Internal, CLIENT, body) {
            Ok(out) => {
                assert!(
                    n >= close,
                    "a prefix without the close delimiter passed: {n}"
                );
                assert!(!out.contains("10.77.0.2"), "{out}");
                accepted += 1;
                h.sdp(
                    &d,
                    Some("tt"),
                    SdpRole::Answer,
                    Side::External,
                    PEER_PROXY,
                    &answer,
                )
                .expect("answer");
                assert_eq!(h.flows().len(), 1);
            }
            Err(e) => assert!(matches!(e, MediaError::NotAcceptable { .. }), "{n}: {e:?}"),
        }
        h.end(&d, None, EndReason::Bye);
        h.assert_no_orphans();
    }
    assert_eq!(
        accepted,
        offer.len() - close + 1,
        "every prefix keeping the close delimiter"
    );
}

/// Issue #12: the expiry check is spread over the driver's 100 ms timers
/// (a tenth of the dialogs each), the tick ending what they found. The
/// same calls end at the same ticks as with the tick alone, the tick
/// itself then looks at no dialog, and a call a share found due but whose
/// media moved before the tick is kept.
#[test]
fn the_expiry_check_in_shares_ends_the_same_calls_at_the_same_ticks() {
    let wide = || {
        let mut s = settings(MediaMode::Relay);
        s.port_ranges = vec![PortRange {
            start: 40000,
            end: 41999,
        }];
        s.reserved_ports = Vec::new();
        (s.max_calls, s.max_flows, s.max_flows_per_client) = (1000, 10_000, 10_000);
        H::new(s)
    };
    const CALLS: u32 = 200;
    // Quiet calls, 20 set up each second from 0 to 9 s (never used: they
    // end 20 s after their setup), and one that carries media until 30 s
    // (idle: it ends at 90 s).
    let set_up = |h: &mut H| {
        for i in 0..CALLS {
            h.at(u64::from(i / 20));
            established(h, &dialog(2000 + i));
        }
        h.at(0);
        established(h, &dialog(1));
    };
    let active = |h: &mut H, at_s: u64| {
        if at_s <= 30 {
            let ids: Vec<_> =
                h.c.manager()
                    .flows_of(&dialog(1))
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect();
            for id in ids {
                *h.c.sink_mut().packets.entry(id).or_insert(0) += 5;
            }
        }
    };
    let (mut ticks, mut shares) = (wide(), wide());
    set_up(&mut ticks);
    set_up(&mut shares);
    let mut ended_by_ticks = Vec::new();
    for s in 1..=95u64 {
        active(&mut ticks, s);
        active(&mut shares, s);
        ticks.at(s);
        let a = ticks.tick();
        assert_eq!(
            ticks.c.manager().expiry_looked(),
            ticks.c.manager().dialogs() + a.len(),
            "the tick alone looks at every dialog"
        );
        // Ten shares in the second before the tick, then the tick.
        for tenth in 0..10u64 {
            shares.now = shares.t0 + Duration::from_millis((s - 1) * 1000 + tenth * 100 + 50);
            shares.c.on_timers(shares.now);
        }
        shares.at(s);
        let b = shares.tick();
        assert_eq!(a, b, "second {s}");
        assert_eq!(shares.c.manager().expiry_looked(), 0, "second {s}");
        if (20..30).contains(&s) {
            assert_eq!(a.len(), 20, "the calls set up at {} s", s - 20);
        }
        ended_by_ticks.extend(a);
    }
    assert!(ended_by_ticks.contains(&dialog(1)));
    assert_eq!(ended_by_ticks.len(), CALLS as usize + 1);
    // The active call ended at 90 s, not before.
    let mut h = wide();
    set_up(&mut h);
    for s in 1..=89 {
        active(&mut h, s);
        h.at(s);
        assert!(!h.tick().contains(&dialog(1)), "ended at {s} s");
    }
    h.at(90);
    assert!(h.tick().contains(&dialog(1)));

    // A share finds a never-used call due; its media moves before the tick.
    let mut h = wide();
    let d = dialog(7);
    established(&mut h, &d);
    h.now = h.t0 + Duration::from_millis(20_500);
    h.c.on_timers(h.now);
    h.packets(3);
    h.at(21);
    assert!(h.tick().is_empty(), "its media moved before the tick");
    assert_eq!(h.flows().len(), 2);
}
