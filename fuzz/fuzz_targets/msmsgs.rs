//! `text/x-msmsgsinvite` invitations: parsing never panics, and a rewrite
//! leaves no address of the original behind: what it produces parses to
//! the allocated endpoint.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use sip_edge::sip::msmsgs;

fuzz_target!(|data: &[u8]| {
    let Ok(inv) = msmsgs::parse(data) else {
        return;
    };
    let edge: SocketAddr = "203.0.113.1:40002".parse().expect("literal");
    let Ok((out, _)) = msmsgs::rewrite(data, &mut |_| Some(edge)) else {
        return;
    };
    if inv.endpoint.is_none() && inv.internal.is_none() {
        assert_eq!(out, data, "an address-free invitation passes unchanged");
        return;
    }
    let re = msmsgs::parse(&out).expect("a rewritten invitation must parse");
    assert_eq!(re.endpoint, Some(edge), "rewritten endpoint");
    assert!(re.internal.is_none(), "the internal address must not leave");
});
