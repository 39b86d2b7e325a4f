//! Stream-framer tests over the SIP fixtures in `tests/fixtures/sip/`: the
//! same frames must come out however the byte stream is cut (every prefix,
//! every split point, byte by byte), with keep-alives and pipelining mixed in.

use std::path::PathBuf;

use sip_edge::sip::framer::{Frame, FrameError, Framer, FramerLimits, KeepAliveRole};

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sip");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("fixture dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sip"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read fixture"))
        })
        .collect();
    out.sort();
    assert!(out.len() >= 8, "fixtures missing from {}", dir.display());
    out
}

fn drain(f: &mut Framer, out: &mut Vec<Frame>) -> Result<(), FrameError> {
    while let Some(fr) = f.next_frame()? {
        out.push(fr);
    }
    Ok(())
}

fn feed_in_chunks(role: KeepAliveRole, chunks: &[&[u8]]) -> Result<Vec<Frame>, FrameError> {
    let mut f = Framer::new(role, FramerLimits::default());
    let mut out = Vec::new();
    for c in chunks {
        f.push(c)?;
        drain(&mut f, &mut out)?;
    }
    Ok(out)
}

/// The expected frames of a stream built from fixtures and keep-alives,
/// computed without the framer.
enum Piece<'a> {
    Msg(&'a [u8]),
    Ping,
    StrayCrlf,
}

fn build(pieces: &[Piece<'_>]) -> (Vec<u8>, Vec<Vec<u8>>, Vec<bool>) {
    let mut stream = Vec::new();
    let mut msgs = Vec::new();
    let mut kinds = Vec::new(); // true = message, false = ping
    for p in pieces {
        match p {
            Piece::Msg(m) => {
                stream.extend_from_slice(m);
                msgs.push(m.to_vec());
                kinds.push(true);
            }
            Piece::Ping => {
                stream.extend_from_slice(b"\r\n\r\n");
                kinds.push(false);
            }
            Piece::StrayCrlf => stream.extend_from_slice(b"\r\n"),
        }
    }
    (stream, msgs, kinds)
}

fn check_frames(frames: &[Frame], msgs: &[Vec<u8>], kinds: &[bool]) {
    assert_eq!(frames.len(), kinds.len(), "frame count");
    let mut m = msgs.iter();
    for (fr, is_msg) in frames.iter().zip(kinds) {
        match (fr, is_msg) {
            (Frame::Message(raw), true) => {
                let want = m.next().expect("message");
                assert_eq!(raw.as_bytes(), &want[..]);
                assert_eq!(raw.head().len() + raw.body().len(), want.len());
                assert!(raw.head().ends_with(b"\r\n\r\n"));
            }
            (Frame::Ping, false) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

#[test]
fn each_fixture_alone_is_one_message() {
    for (name, bytes) in fixtures() {
        let frames = feed_in_chunks(KeepAliveRole::Responder, &[&bytes])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(frames.len(), 1, "{name}");
        check_frames(&frames, std::slice::from_ref(&bytes), &[true]);
    }
}

#[test]
fn every_prefix_yields_a_prefix_of_the_frames() {
    let fx = fixtures();
    let mut pieces = vec![Piece::Ping, Piece::StrayCrlf];
    for (_, b) in &fx {
        pieces.push(Piece::Msg(b));
        pieces.push(Piece::Ping);
    }
    let (stream, msgs, kinds) = build(&pieces);
    let all = feed_in_chunks(KeepAliveRole::Responder, &[&stream]).expect("whole stream");
    check_frames(&all, &msgs, &kinds);
    for k in 0..=stream.len() {
        let got = feed_in_chunks(KeepAliveRole::Responder, &[&stream[..k]])
            .unwrap_or_else(|e| panic!("prefix {k}: {e}"));
        assert!(got.len() <= all.len(), "prefix {k}");
        assert_eq!(&all[..got.len()], &got[..], "prefix {k}");
    }
}

#[test]
fn every_split_point_yields_the_same_frames() {
    let fx = fixtures();
    for (name, a) in &fx {
        // Each fixture pipelined with the next one, ping between.
        let next = &fx[(fx.iter().position(|(n, _)| n == name).unwrap_or(0) + 1) % fx.len()].1;
        let (stream, msgs, kinds) = build(&[
            Piece::Msg(a),
            Piece::Ping,
            Piece::Msg(next),
            Piece::StrayCrlf,
            Piece::Msg(a),
        ]);
        for k in 0..=stream.len() {
            let (x, y) = stream.split_at(k);
            let got = feed_in_chunks(KeepAliveRole::Responder, &[x, y])
                .unwrap_or_else(|e| panic!("{name} split {k}: {e}"));
            check_frames(&got, &msgs, &kinds);
        }
    }
}

#[test]
fn byte_by_byte_and_three_way_splits() {
    let fx = fixtures();
    let mut pieces = Vec::new();
    for (_, b) in &fx {
        pieces.push(Piece::Msg(b));
    }
    let (stream, msgs, kinds) = build(&pieces);
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    check_frames(
        &feed_in_chunks(KeepAliveRole::Responder, &bytes).expect("byte by byte"),
        &msgs,
        &kinds,
    );
    // Three-way splits on one fixture with a body (a split inside the head and one inside the body).
    let (_, invite) = fx
        .iter()
        .find(|(n, _)| n == "rfc3665_3_1_invite.sip")
        .expect("invite fixture");
    for i in (0..invite.len()).step_by(7) {
        for j in (i..invite.len()).step_by(11) {
            let got = feed_in_chunks(
                KeepAliveRole::Responder,
                &[&invite[..i], &invite[i..j], &invite[j..]],
            )
            .expect("3-way");
            check_frames(&got, std::slice::from_ref(invite), &[true]);
        }
    }
}

#[test]
fn initiator_sees_pongs_at_every_split() {
    let fx = fixtures();
    let msg = &fx[0].1;
    let mut stream = b"\r\n".to_vec();
    stream.extend_from_slice(msg);
    stream.extend_from_slice(b"\r\n");
    for k in 0..=stream.len() {
        let (x, y) = stream.split_at(k);
        let got = feed_in_chunks(KeepAliveRole::Initiator, &[x, y]).expect("initiator");
        assert_eq!(got.len(), 3, "split {k}");
        assert_eq!(got[0], Frame::Pong);
        assert!(matches!(&got[1], Frame::Message(m) if m.as_bytes() == &msg[..]));
        assert_eq!(got[2], Frame::Pong);
    }
}

#[test]
fn errors_do_not_depend_on_the_split() {
    let mut bad = fixtures()[0].1.clone();
    // Garbage after a good message.
    bad.extend_from_slice(b"\x16\x03\x01 hello");
    let whole = feed_in_chunks(KeepAliveRole::Responder, &[&bad]).unwrap_err();
    assert!(matches!(whole, FrameError::Garbage { byte: 0x16, .. }));
    for k in 0..=bad.len() {
        let (x, y) = bad.split_at(k);
        assert_eq!(
            feed_in_chunks(KeepAliveRole::Responder, &[x, y]).unwrap_err(),
            whole,
            "split {k}"
        );
    }
}

#[test]
fn truncating_a_fixture_never_yields_a_message() {
    for (name, bytes) in fixtures() {
        for k in 0..bytes.len() {
            let got = feed_in_chunks(KeepAliveRole::Responder, &[&bytes[..k]])
                .unwrap_or_else(|e| panic!("{name} prefix {k}: {e}"));
            assert!(got.is_empty(), "{name}: prefix {k} produced {got:?}");
        }
    }
}

#[test]
fn limits_apply_to_fixtures() {
    let fx = fixtures();
    let (_, ok200) = fx
        .iter()
        .find(|(n, _)| n == "rfc3665_3_1_200_ok.sip")
        .expect("200 fixture");
    let head_len = ok200
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head end")
        + 4;
    let body_len = ok200.len() - head_len;
    let exact = FramerLimits {
        max_header_bytes: head_len,
        max_body_bytes: body_len,
    };
    let mut f = Framer::new(KeepAliveRole::Responder, exact);
    f.push(ok200).expect("push");
    assert!(matches!(f.next_frame(), Ok(Some(Frame::Message(_)))));

    let mut f = Framer::new(
        KeepAliveRole::Responder,
        FramerLimits {
            max_header_bytes: head_len - 1,
            ..exact
        },
    );
    f.push(ok200).expect("push");
    assert!(matches!(
        f.next_frame(),
        Err(FrameError::HeadersTooLarge { .. })
    ));

    let mut f = Framer::new(
        KeepAliveRole::Responder,
        FramerLimits {
            max_body_bytes: body_len - 1,
            ..exact
        },
    );
    f.push(ok200).expect("push");
    assert!(
        matches!(f.next_frame(), Err(FrameError::BodyTooLarge { declared, .. }) if declared == body_len as u64)
    );
}
