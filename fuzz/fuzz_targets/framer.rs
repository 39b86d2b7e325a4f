//! Stream framer: any byte stream, cut at any points, frames the same way
//! as in one piece, and never buffers more than one maximal message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sip_edge::sip::framer::{Frame, FrameError, Framer, FramerLimits, KeepAliveRole};

const LIMITS: FramerLimits = FramerLimits {
    max_header_bytes: 2048,
    max_body_bytes: 4096,
};

/// Frames of `data` pushed in pieces of `chunk` bytes (whole when 0),
/// draining after each push as the transport does; stops at the first
/// error.
fn frames(data: &[u8], chunk: usize, role: KeepAliveRole) -> (Vec<Frame>, Option<FrameError>) {
    let mut f = Framer::new(role, LIMITS);
    let mut out = Vec::new();
    let pieces: Vec<&[u8]> = if chunk == 0 {
        vec![data]
    } else {
        data.chunks(chunk).collect()
    };
    for piece in pieces {
        if let Err(e) = f.push(piece) {
            return (out, Some(e));
        }
        loop {
            match f.next_frame() {
                Ok(Some(fr)) => out.push(fr),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        // Bounded memory: after draining, what is left is part of one
        // message, never more than the limits plus the piece just pushed.
        assert!(
            f.buffered() <= LIMITS.max_header_bytes + LIMITS.max_body_bytes + piece.len(),
            "framer holds {} bytes",
            f.buffered()
        );
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((ctl, data)) = data.split_first() else {
        return;
    };
    let role = if ctl & 0x80 != 0 {
        KeepAliveRole::Responder
    } else {
        KeepAliveRole::Initiator
    };
    let chunk = (*ctl as usize & 0x3f) + 1;
    let (whole, whole_err) = frames(data, 0, role);
    let (split, split_err) = frames(data, chunk, role);
    // Where neither failed, the cut points changed nothing; where one
    // failed, the frames before the failure agree.
    match (&whole_err, &split_err) {
        (None, None) => assert_eq!(whole, split, "frames depend on where the stream was cut"),
        _ => {
            let n = whole.len().min(split.len());
            assert_eq!(whole[..n], split[..n], "frames before an error differ");
        }
    }
    for fr in &whole {
        if let Frame::Message(m) = fr {
            assert_eq!(m.head().len() + m.body().len(), m.as_bytes().len());
        }
    }
});
