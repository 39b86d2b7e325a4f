//! The STUN Binding answer of the internal UDP listener: RFC 5626 §4.4.2
//! keep-alives over UDP are STUN Binding requests (RFC 5389) sent on the
//! SIP flow itself, and a client such as baresip/libre treats a flow whose
//! Binding requests go unanswered as failed (§4.4.2: no response means
//! re-register), and compares the XOR-MAPPED-ADDRESS it gets back with the
//! previous one to notice a NAT rebinding.
//!
//! Written here rather than taken from a crate (`stun_codec`,
//! `stun-rs`): the edge answers exactly one message type with exactly one
//! attribute, without authentication (§4.4.2: keep-alive Binding requests
//! carry none), and those crates bring a full codec with HMAC, CRC and
//! MD5 dependencies into the agent for a 32- or 44-byte reply. Unknown
//! attributes in the request are ignored: RFC 5389 §7.3.1 would answer
//! comprehension-required ones 420, but keep-alive requests carry none
//! that matter here (libre sends none; a SOFTWARE or FINGERPRINT is
//! comprehension-optional), and the answer says nothing but the source
//! address the client already sent from.
//!
//! Amplification: the answer (32 bytes IPv4, 44 IPv6) is at most 2.2
//! times the smallest request (20 bytes), goes only to the datagram's
//! source on the internal side, and only where `internal_udp_listen` is
//! configured on an internal address.

use std::net::SocketAddr;

/// RFC 5389 §6: the magic cookie.
pub const MAGIC_COOKIE: u32 = 0x2112_a442;
/// Binding request (method 0x001, class request).
const BINDING_REQUEST: u16 = 0x0001;
/// Binding success response (method 0x001, class success).
const BINDING_SUCCESS: u16 = 0x0101;
/// RFC 5389 §15.2.
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// STUN header length.
const HEADER: usize = 20;

/// Whether `d` looks like a STUN message (RFC 5389 §6: top two bits zero,
/// the magic cookie at offset 4, a length that is a multiple of 4 and
/// matches the datagram).
pub fn is_stun(d: &[u8]) -> bool {
    d.len() >= HEADER && d[0] & 0xc0 == 0 && d[4..8] == MAGIC_COOKIE.to_be_bytes() && {
        let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
        len % 4 == 0 && HEADER + len == d.len()
    }
}

/// The Binding success response to `request` received from `source`
/// (XOR-MAPPED-ADDRESS = `source`, same transaction id), or `None` when
/// `request` is not a well-formed STUN Binding request (other STUN
/// messages, responses and indications are not answered, so two STUN
/// speakers can never ping-pong through the edge).
pub fn binding_response(request: &[u8], source: SocketAddr) -> Option<Vec<u8>> {
    if !is_stun(request) || u16::from_be_bytes([request[0], request[1]]) != BINDING_REQUEST {
        return None;
    }
    let txid = &request[8..HEADER];
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = source.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let (family, addr): (u8, Vec<u8>) = match source {
        SocketAddr::V4(a) => (
            0x01,
            a.ip()
                .octets()
                .iter()
                .zip(cookie.iter())
                .map(|(b, k)| b ^ k)
                .collect(),
        ),
        SocketAddr::V6(a) => (
            0x02,
            a.ip()
                .octets()
                .iter()
                .zip(cookie.iter().chain(txid.iter()))
                .map(|(b, k)| b ^ k)
                .collect(),
        ),
    };
    let attr_len = 4 + addr.len();
    let mut out = Vec::with_capacity(HEADER + 4 + attr_len);
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    out.extend_from_slice(&cookie);
    out.extend_from_slice(txid);
    out.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(attr_len as u16).to_be_bytes());
    out.push(0);
    out.push(family);
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&addr);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(txid: [u8; 12], attrs: &[u8]) -> Vec<u8> {
        let mut r = vec![0x00, 0x01];
        r.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        r.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        r.extend_from_slice(&txid);
        r.extend_from_slice(attrs);
        r
    }

    #[test]
    fn ipv4_binding_response_matches_rfc5769_sample() {
        // RFC 5769 §2.2 sample response: 192.0.2.1:32853, transaction id
        // b7 e7 a7 01 bc 34 d6 86 fa 87 df ae; its XOR-MAPPED-ADDRESS
        // attribute is 00 20 00 08 00 01 a1 47 e1 12 a6 43.
        let txid = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        let r = binding_response(&request(txid, &[]), "192.0.2.1:32853".parse().unwrap())
            .expect("answered");
        assert_eq!(&r[..4], &[0x01, 0x01, 0x00, 0x0c]);
        assert_eq!(&r[4..8], &MAGIC_COOKIE.to_be_bytes());
        assert_eq!(&r[8..20], &txid);
        assert_eq!(
            &r[20..],
            &[0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]
        );
        assert!(is_stun(&r));
    }

    #[test]
    fn ipv6_binding_response_matches_rfc5769_sample() {
        // RFC 5769 §2.3: 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
        let txid = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        let r = binding_response(
            &request(txid, &[]),
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .unwrap(),
        )
        .expect("answered");
        assert_eq!(&r[2..4], &[0x00, 0x18]);
        assert_eq!(
            &r[20..],
            &[
                0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa, 0xa5, 0xd3,
                0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9
            ]
        );
    }

    #[test]
    fn only_well_formed_binding_requests_are_answered() {
        let src: SocketAddr = "10.77.0.2:5060".parse().unwrap();
        let txid = [7; 12];
        // A request with a (comprehension-optional) SOFTWARE attribute.
        let soft = [0x80, 0x22, 0x00, 0x04, b'l', b'i', b'b', b'r'];
        assert!(binding_response(&request(txid, &soft), src).is_some());
        // A success response or an indication: never answered.
        let mut resp = request(txid, &[]);
        resp[1] = 0x01;
        resp[0] = 0x01;
        assert!(binding_response(&resp, src).is_none());
        let mut ind = request(txid, &[]);
        ind[1] = 0x11;
        assert!(binding_response(&ind, src).is_none());
        // Length field disagreeing with the datagram, truncated, no cookie.
        let mut bad = request(txid, &[]);
        bad[3] = 8;
        assert!(binding_response(&bad, src).is_none());
        assert!(binding_response(&request(txid, &[])[..19], src).is_none());
        let mut nocookie = request(txid, &[]);
        nocookie[4] = 0;
        assert!(binding_response(&nocookie, src).is_none());
        assert!(binding_response(b"OPTIONS sip:x SIP/2.0\r\n\r\n", src).is_none());
    }
}
