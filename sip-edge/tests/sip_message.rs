//! Message-layer tests over the SIP fixtures: framer → Message round trips
//! byte-for-byte, and mutated fixtures never panic the framer, the parser,
//! the accessors or the serialiser (a cheap deterministic fuzz loop).

use std::path::PathBuf;

use sip_edge::sip::framer::{Frame, Framer, FramerLimits, KeepAliveRole};
use sip_edge::sip::message::Message;

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sip");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("fixture dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sip"))
        .map(|p| {
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                std::fs::read(&p).expect("read"),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_fixture_round_trips_through_framer_and_message() {
    for (name, raw) in fixtures() {
        let mut f = Framer::new(KeepAliveRole::Responder, FramerLimits::default());
        f.push(&raw).expect("push");
        let Some(Frame::Message(frame)) = f.next_frame().expect("frame") else {
            panic!("{name}: no message");
        };
        let m = Message::from_frame(&frame).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            m.to_bytes(),
            raw,
            "{name}: untouched message must serialise byte-for-byte"
        );
        m.call_id().unwrap_or_else(|e| panic!("{name}: {e}"));
        m.cseq().unwrap_or_else(|e| panic!("{name}: {e}"));
        m.top_via().unwrap_or_else(|e| panic!("{name}: {e}"));
        m.from_tag().unwrap_or_else(|e| panic!("{name}: {e}"));
        m.to_tag().unwrap_or_else(|e| panic!("{name}: {e}"));
        // Re-serialised with every header rewritten still parses the same.
        let mut edited = m.clone();
        let names: Vec<(String, String)> = m
            .headers()
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        for (n, v) in names.iter().filter(|(n, _)| !n.eq_ignore_ascii_case("via")) {
            edited.set_header(n, v.clone());
        }
        let again = Message::parse(&edited.to_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(again.call_id(), m.call_id(), "{name}");
        assert_eq!(again.body(), m.body(), "{name}");
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const SPICY: &[u8] = b"[]:;<>\"\\,@ \t\r\n=/%?*0123456789\x00\xff";

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] = SPICY[rng.below(SPICY.len())];
            }
            1 => v.insert(at, SPICY[rng.below(SPICY.len())]),
            2 if at < v.len() => {
                let end = (at + rng.below(8)).min(v.len());
                v.drain(at..end);
            }
            3 => v.truncate(at),
            _ => {
                // Duplicate a slice (repeats headers, brackets, params).
                let end = (at + rng.below(24)).min(v.len());
                let piece = v[at..end].to_vec();
                let to = rng.below(v.len() + 1);
                v.splice(to..to, piece);
            }
        }
    }
    v
}

fn exercise(bytes: &[u8]) {
    let mut f = Framer::new(KeepAliveRole::Responder, FramerLimits::default());
    let _ = f.push(bytes);
    while let Ok(Some(_)) = f.next_frame() {}
    let Ok(mut m) = Message::parse(bytes) else {
        return;
    };
    let _ = (
        m.call_id(),
        m.cseq(),
        m.vias(),
        m.top_via(),
        m.from_tag(),
        m.to_tag(),
        m.max_forwards(),
    );
    let _ = (
        m.name_addrs("Contact"),
        m.name_addrs("Route"),
        m.name_addrs("Record-Route"),
        m.request_uri(),
    );
    if let Ok(addrs) = m.name_addrs("Contact") {
        for a in &addrs {
            let _ = a.sip_uri();
        }
        m.set_name_addrs("Contact", &addrs);
    }
    let _ = m.stamp_top_via("203.0.113.1:40000".parse().expect("addr"));
    let _ = m.pop_top_via();
    let _ = m.to_rsip();
    let out = m.to_bytes();
    // What we write must parse again (we never emit something we reject).
    Message::parse(&out).unwrap_or_else(|e| {
        panic!(
            "re-parse failed: {e}\ninput: {:?}\noutput: {:?}",
            String::from_utf8_lossy(bytes),
            String::from_utf8_lossy(&out)
        )
    });
}

#[test]
fn mutated_fixtures_never_panic() {
    let fx = fixtures();
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    for round in 0..20_000 {
        let (_, base) = &fx[round % fx.len()];
        exercise(&mutate(&mut rng, base));
    }
}
