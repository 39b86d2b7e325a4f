//! Multipart splitter (RFC 2046 §5.1): the first input line is the
//! Content-Type, the rest the body. Parts lie inside the body, and
//! replacing one part's content changes that part only.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sip_edge::sip::multipart::Multipart;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let Ok(ct) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let body = data.get(split + 1..).unwrap_or_default();
    let Ok(m) = Multipart::parse(ct, body) else {
        return;
    };
    let _ = m.boundary();
    for (i, p) in m.parts().iter().enumerate() {
        assert!(p.headers.end <= body.len() && p.content.end <= body.len());
        assert!(p.headers.start <= p.headers.end && p.content.start <= p.content.end);
        let _ = p.media_type();
        assert_eq!(m.content(i), body.get(p.content.clone()));
    }
    if m.parts().is_empty() {
        return;
    }
    let replaced = m
        .replace_content(0, b"x=replaced")
        .expect("replacing a parsed part");
    let again = Multipart::parse(ct, &replaced).expect("a replaced body must parse");
    assert_eq!(again.parts().len(), m.parts().len(), "part count changed");
    assert_eq!(again.content(0), Some(&b"x=replaced"[..]));
    for i in 1..m.parts().len() {
        assert_eq!(again.content(i), m.content(i), "part {i} changed");
    }
});
