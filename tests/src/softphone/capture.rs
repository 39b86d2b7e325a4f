//! An ear on the wire: what reaches a softphone's RTP port, taken from a
//! packet socket in its namespace and decoded as G.711 μ-law.
//!
//! For calls after a re-INVITE, where baresip 1.0's `sndfile` recorder
//! stops writing (see `softphones.rs`): the tone must arrive at the port
//! the phone listens on (its `rtp_ports` range), from the edge. A packet
//! the edge sends anywhere else (another port, another host) is not
//! counted. Hand-written over `libc` (an `AF_PACKET` socket and a few
//! header offsets): the test crates carry no capture library, and the
//! IPv4/UDP/RTP headers needed are fixed-layout.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    ops::RangeInclusive,
    time::{Duration, Instant},
};

use crate::{softphone::ulaw, testnet};

/// What [`listen`] heard.
#[derive(Debug, Default, Clone)]
pub struct Heard {
    /// RTP packets with payload type 0 (PCMU) that matched.
    pub packets: usize,
    /// Their payloads, decoded, in arrival order (8 kHz).
    pub samples: Vec<f64>,
}

/// Listen `for_` in namespace `ns` to IPv4 UDP packets arriving from
/// `from` at a port in `ports` (the phone's RTP range); PCMU RTP payloads
/// only. An error names what could not be set up.
pub fn listen(
    ns: &str,
    from: Ipv4Addr,
    ports: RangeInclusive<u16>,
    for_: Duration,
) -> Result<Heard, String> {
    let mut heard = Heard::default();
    testnet::in_ns(ns, || {
        capture(for_, &mut |ip, outgoing| {
            if outgoing {
                return;
            }
            if let Some(payload) = pcmu_to(ip, from, &ports) {
                heard.packets += 1;
                heard.samples.extend(payload.iter().map(|b| ulaw(*b)));
            }
        })
    })
    .map_err(|e| format!("netns {ns}: {e}"))??;
    Ok(heard)
}

/// RFC 5389 STUN Binding traffic between `client` and `server` arriving
/// in namespace `ns` for `for_`: (requests client to server, success
/// responses server to client). The keep-alives of RFC 5626 §4.4.2.
/// Packets a namespace sends are not seen on its veth (no outgoing tap
/// there): watch requests in the server's namespace, answers in the
/// client's.
pub fn stun_bindings(
    ns: &str,
    client: SocketAddrV4,
    server: SocketAddrV4,
    for_: Duration,
) -> Result<(usize, usize), String> {
    let (mut requests, mut responses) = (0, 0);
    testnet::in_ns(ns, || {
        capture(
            for_,
            &mut |ip, outgoing| match stun_type(ip, client, server) {
                _ if outgoing => {}
                Some(0x0001) => requests += 1,
                Some(0x0101) => responses += 1,
                _ => {}
            },
        )
    })
    .map_err(|e| format!("netns {ns}: {e}"))??;
    Ok((requests, responses))
}

/// The STUN message type of an IPv4/UDP packet between `a` and `b`
/// (either way; requests go a to b, responses b to a), if it is STUN
/// (RFC 5389 §6: first two bits 0, magic cookie 0x2112A442).
fn stun_type(ip: &[u8], a: SocketAddrV4, b: SocketAddrV4) -> Option<u16> {
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    if ip.first()? >> 4 != 4 || *ip.get(9)? != 17 || ihl < 20 {
        return None;
    }
    let src = SocketAddrV4::new(
        Ipv4Addr::new(*ip.get(12)?, ip[13], ip[14], ip[15]),
        u16::from_be_bytes([*ip.get(ihl)?, *ip.get(ihl + 1)?]),
    );
    let dst = SocketAddrV4::new(
        Ipv4Addr::new(*ip.get(16)?, ip[17], ip[18], ip[19]),
        u16::from_be_bytes([*ip.get(ihl + 2)?, *ip.get(ihl + 3)?]),
    );
    let stun = ip.get(ihl + 8..)?;
    if stun.len() < 20 || stun[0] >> 6 != 0 || stun[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let t = u16::from_be_bytes([stun[0], stun[1]]);
    let ok = match t {
        0x0001 => src == a && dst == b,
        _ => src == b && dst == a,
    };
    ok.then_some(t)
}

/// Reads IPv4 packets (each with whether it was outgoing) in the current
/// namespace for `for_`.
fn capture(for_: Duration, seen: &mut dyn FnMut(&[u8], bool)) -> Result<(), String> {
    let proto = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket(2); the fd is closed below on every path.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) };
    if fd < 0 {
        return Err(format!(
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt with a valid timeval of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + for_;
    while Instant::now() < deadline {
        // SAFETY: an all-zero sockaddr_ll is valid; recvfrom writes at
        // most `len` bytes into each buffer given.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut sll_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of_mut!(sll).cast(),
                &mut sll_len,
            )
        };
        let Ok(n) = usize::try_from(n) else { continue };
        seen(&buf[..n], sll.sll_pkttype == libc::PACKET_OUTGOING);
    }
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    Ok(())
}

/// The PCMU payload of an IPv4/UDP/RTP packet from `from` to a port in
/// `ports`, if it is one.
fn pcmu_to<'a>(ip: &'a [u8], from: Ipv4Addr, ports: &RangeInclusive<u16>) -> Option<&'a [u8]> {
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    if ip.first()? >> 4 != 4 || *ip.get(9)? != 17 || ihl < 20 {
        return None;
    }
    if Ipv4Addr::new(*ip.get(12)?, ip[13], ip[14], ip[15]) != from {
        return None;
    }
    let udp = ip.get(ihl..)?;
    let dport = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    if !ports.contains(&dport) {
        return None;
    }
    let rtp = udp.get(8..)?;
    // RFC 3550 §5.1: version 2, payload type 0 (PCMU), CSRCs and an
    // extension before the payload.
    let (b0, b1) = (*rtp.first()?, *rtp.get(1)?);
    if b0 >> 6 != 2 || b1 & 0x7f != 0 {
        return None;
    }
    let mut at = 12 + 4 * usize::from(b0 & 0x0f);
    if b0 & 0x10 != 0 {
        let words = u16::from_be_bytes([*rtp.get(at + 2)?, *rtp.get(at + 3)?]);
        at += 4 + 4 * usize::from(words);
    }
    let end = if b0 & 0x20 != 0 {
        rtp.len().checked_sub(usize::from(*rtp.last()?))?
    } else {
        rtp.len()
    };
    rtp.get(at..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(src: [u8; 4], dport: u16, rtp: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&[10, 77, 0, 2]);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0]);
        p.extend_from_slice(rtp);
        p
    }

    #[test]
    fn only_pcmu_rtp_from_the_edge_to_the_phones_ports_counts() {
        let mut rtp = vec![0x80, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        rtp.extend_from_slice(&[0xff, 0x7f, 0x00]);
        let edge = Ipv4Addr::new(10, 77, 0, 1);
        let ports = 20000..=20999;
        let ok = packet([10, 77, 0, 1], 20002, &rtp);
        assert_eq!(pcmu_to(&ok, edge, &ports), Some(&[0xff, 0x7f, 0x00][..]));
        // Another port (the edge's own, say), another sender.
        assert_eq!(
            pcmu_to(&packet([10, 77, 0, 1], 40002, &rtp), edge, &ports),
            None
        );
        assert_eq!(
            pcmu_to(&packet([10, 77, 0, 9], 20002, &rtp), edge, &ports),
            None
        );
        // STUN (first two bits 0), another payload type.
        let stun = [0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42, 0, 0, 0, 0];
        assert_eq!(
            pcmu_to(&packet([10, 77, 0, 1], 20002, &stun), edge, &ports),
            None
        );
        let mut pt8 = rtp.clone();
        pt8[1] = 8;
        assert_eq!(
            pcmu_to(&packet([10, 77, 0, 1], 20002, &pt8), edge, &ports),
            None
        );
        // Truncated packets are no packets.
        assert_eq!(pcmu_to(&ok[..30], edge, &ports), None);
    }

    #[test]
    fn stun_bindings_are_told_by_direction_and_cookie() {
        let client: SocketAddrV4 = "10.77.0.2:5090".parse().expect("client");
        let server: SocketAddrV4 = "10.77.0.1:5060".parse().expect("server");
        let udp = |src: SocketAddrV4, dst: SocketAddrV4, body: &[u8]| {
            let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
            p.extend_from_slice(&src.ip().octets());
            p.extend_from_slice(&dst.ip().octets());
            p.extend_from_slice(&src.port().to_be_bytes());
            p.extend_from_slice(&dst.port().to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0]);
            p.extend_from_slice(body);
            p
        };
        let stun = |t: u16| {
            let mut m = t.to_be_bytes().to_vec();
            m.extend_from_slice(&[0, 0, 0x21, 0x12, 0xa4, 0x42]);
            m.extend_from_slice(&[7; 12]);
            m
        };
        let req = udp(client, server, &stun(0x0001));
        let resp = udp(server, client, &stun(0x0101));
        assert_eq!(stun_type(&req, client, server), Some(0x0001));
        assert_eq!(stun_type(&resp, client, server), Some(0x0101));
        // The wrong way round, another port, no cookie, CRLF.
        assert_eq!(
            stun_type(&udp(server, client, &stun(0x0001)), client, server),
            None
        );
        let other: SocketAddrV4 = "10.77.0.2:5091".parse().expect("other");
        assert_eq!(
            stun_type(&udp(other, server, &stun(0x0001)), client, server),
            None
        );
        let mut no_cookie = stun(0x0001);
        no_cookie[4] = 0;
        assert_eq!(
            stun_type(&udp(client, server, &no_cookie), client, server),
            None
        );
        assert_eq!(
            stun_type(&udp(client, server, b"\r\n\r\n"), client, server),
            None
        );
    }
}
