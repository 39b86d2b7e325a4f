//! Message layer: parsing never panics, every accessor the proxy uses
//! copes with what parsed, and serialising is a fixed point (what the
//! edge writes parses back to the same message).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sip_edge::sip::message::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::parse(data) else {
        return;
    };
    let _ = m.method();
    let _ = m.status();
    let _ = m.request_uri();
    let _ = m.vias();
    let _ = m.top_via().map(|v| (v.branch().map(str::to_owned), v.received(), v.rport()));
    let _ = m.call_id();
    let _ = m.cseq();
    let _ = m.max_forwards();
    let _ = m.from().map(|n| (n.tag().map(str::to_owned), n.sip_uri().is_ok()));
    let _ = m.to().map(|n| n.sip_uri().is_ok());
    let _ = m.from_tag();
    let _ = m.to_tag();
    for name in ["Contact", "Route", "Record-Route", "Path"] {
        let _ = m.name_addrs(name).map(|v| v.iter().map(|n| n.sip_uri().is_ok()).count());
    }
    let once = m.to_bytes();
    let again = Message::parse(&once).expect("the edge's own serialisation must parse");
    assert_eq!(again.to_bytes(), once, "serialisation is not a fixed point");
});
