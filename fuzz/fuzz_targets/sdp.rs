//! SDP parser: never panics, and a parsed body serialises back byte for
//! byte (the edge rewrites only the lines it must; everything else,
//! including line endings, passes untouched).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sip_edge::sip::sdp::Sdp;

fuzz_target!(|data: &[u8]| {
    let Ok(sdp) = Sdp::parse(data) else {
        return;
    };
    let _ = sdp.flows().len();
    assert_eq!(sdp.to_bytes(), data, "an unrewritten SDP must pass byte-exact");
});
