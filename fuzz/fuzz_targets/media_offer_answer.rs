//! The media layer's offer/answer path (`MediaController` over the
//! sans-IO pinhole manager with a recording sink): arbitrary sequences of
//! offers, answers, early answers, dialog ends and ticks, with SDP built
//! from fields (to reach the logic) or raw bytes (to reach the parsers).
//!
//! Invariants, checked after every step: every rule the manager installs
//! targets an inside address that was a signalling source and an outside
//! address that was the far party's signalling source (DESIGN.md §3
//! default: no third party, never a forbidden target), on edge addresses
//! and ports of the configuration; and when every dialog has ended, or
//! the maximum call length has passed, no rule is left.
#![no_main]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sip_edge::{
    datapath::rules::Flow,
    media::{
        control::{MediaController, RecordingSink},
        manager::Settings,
        DialogKey, EndReason, FarMedia, MediaControl, SdpEvent, SdpRole, Side,
    },
};
use sip_edge_fuzz::{config, sdp, source, SdpSpec, EDGE_INT, EDGE_PUB};

#[derive(Arbitrary, Debug)]
enum Body {
    Built(SdpSpec),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Step {
    Sdp {
        dialog: u8,
        to_tag: Option<u8>,
        role: u8,
        outside: bool,
        source: u8,
        far_media: u8,
        body: Body,
    },
    End {
        dialog: u8,
        to_tag: Option<u8>,
        reason: u8,
    },
    Tick {
        secs: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    nat: bool,
    end_all: bool,
    steps: Vec<Step>,
}

/// The DESIGN.md §3 invariant on one flow of a dialog whose inside and
/// outside SDP came from `inside` and `outside` (see the module docs).
fn check(flow: &Flow, inside: &BTreeSet<IpAddr>, outside: &BTreeSet<IpAddr>) {
    let edge_int: IpAddr = EDGE_INT.parse().expect("literal");
    let edge_pub: IpAddr = EDGE_PUB.parse().expect("literal");
    let in_range = |p: u16| (40000..=40063).contains(&p);
    let (client, peer, public) = match flow {
        Flow::Relay {
            client,
            edge_int: e,
            public,
            peer,
            ..
        } => {
            assert_eq!(e.ip(), edge_int, "relay leg on a non-edge address: {flow:?}");
            assert!(in_range(e.port()), "edge port outside the ranges: {flow:?}");
            (client, peer, public)
        }
        Flow::Nat {
            client, public, peer, ..
        } => (client, peer, public),
    };
    assert_eq!(public.ip(), edge_pub, "public leg on a non-edge address: {flow:?}");
    assert!(in_range(public.port()), "public port outside the ranges: {flow:?}");
    assert!(
        inside.contains(&client.ip()),
        "inside target {client} is not a signalling source of the dialog's inside party ({inside:?}): {flow:?}"
    );
    assert!(
        outside.contains(&peer.ip()),
        "outside remote {peer} is not the far party's signalling source ({outside:?}): {flow:?}"
    );
}

fuzz_target!(|input: Input| {
    let cfg = config(if input.nat { "nat" } else { "relay" });
    let mut media = MediaController::new(
        Settings::from_config(cfg),
        cfg.media.candidates,
        RecordingSink::default(),
    );
    let t0 = Instant::now();
    let mut now = t0;
    let key = |d: u8| DialogKey {
        call_id: format!("call-{}", d % 4).into(),
        from_tag: "caller".into(),
    };
    let tag = |t: Option<u8>| t.map(|t| format!("fork-{}", t % 3));
    // Per dialog: the signalling sources its inside and outside SDP came from.
    let mut seen: BTreeMap<DialogKey, (BTreeSet<IpAddr>, BTreeSet<IpAddr>)> = BTreeMap::new();
    for step in input.steps.iter().take(64) {
        match step {
            Step::Sdp {
                dialog,
                to_tag,
                role,
                outside,
                source: src,
                far_media,
                body,
            } => {
                let k = key(*dialog);
                let src = source(*outside, *src);
                let entry = seen.entry(k.clone()).or_default();
                if *outside {
                    entry.1.insert(src.ip());
                } else {
                    entry.0.insert(src.ip());
                }
                let text;
                let bytes: &[u8] = match body {
                    Body::Built(spec) => {
                        text = sdp(spec);
                        text.as_bytes()
                    }
                    Body::Raw(raw) => raw,
                };
                let to_tag = tag(*to_tag);
                let ev = SdpEvent {
                    dialog: &k,
                    to_tag: to_tag.as_deref(),
                    role: [SdpRole::Offer, SdpRole::Answer, SdpRole::EarlyAnswer][*role as usize % 3],
                    from_side: if *outside { Side::External } else { Side::Internal },
                    source: src,
                    media_sources: &[],
                    far_media: [
                        FarMedia::Config,
                        FarMedia::Strict,
                        FarMedia::LatchPort,
                        FarMedia::Latch,
                        FarMedia::RemoteUser,
                    ][*far_media as usize % 5],
                    body: bytes,
                    content_type: "application/sdp",
                };
                let _ = media.on_sdp(&ev, now);
            }
            Step::End {
                dialog,
                to_tag,
                reason,
            } => {
                let reason = [EndReason::Bye, EndReason::Cancel, EndReason::Failure(486), EndReason::Timeout]
                    [*reason as usize % 4];
                media.on_dialog_end(&key(*dialog), tag(*to_tag).as_deref(), reason, now);
            }
            Step::Tick { secs } => {
                now += Duration::from_secs(u64::from(*secs % 16));
                let _ = media.on_tick(now);
            }
        }
        for (k, (inside, outside)) in &seen {
            for (_, flow) in media.manager().flows_of(k) {
                check(&flow, inside, outside);
            }
        }
        let owned: usize = seen.keys().map(|k| media.manager().flows_of(k).len()).sum();
        assert_eq!(
            owned,
            media.sink().installed.len(),
            "an installed rule belongs to no dialog"
        );
    }
    if input.end_all {
        for k in seen.keys() {
            media.on_dialog_end(k, None, EndReason::Bye, now);
        }
    } else {
        // Past the maximum call length every dialog has expired.
        for _ in 0..70 {
            now += Duration::from_secs(1);
            let _ = media.on_tick(now);
        }
    }
    assert!(
        media.sink().installed.is_empty(),
        "rules left after every dialog ended: {:?}",
        media.sink().installed
    );
    assert_eq!(media.manager().dialogs(), 0, "dialogs left");
});
