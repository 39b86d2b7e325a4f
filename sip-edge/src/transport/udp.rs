//! Optional plain-UDP listener on the internal side for legacy clients
//! (`[proxy] internal_udp_listen`, off unless set), RFC 3261 §18 over UDP.
//!
//! Every remote `address:port` that sends us a datagram becomes a
//! *pseudo-connection*: a [`ConnId`] with side Internal and proto
//! [`Proto::Udp`], reported to the driver like an accepted TCP connection,
//! so the proxy core treats it as a flow (RFC 5626 §3 over UDP: the
//! client's source address is reused for requests toward it, the way a NAT
//! binding is). A REGISTER through it binds the AOR to that flow; inbound
//! requests for the AOR leave as datagrams to the same address:port.
//!
//! Framing (§18.3): one datagram is one message; the core's parser takes
//! the body as the rest of the datagram when Content-Length is absent,
//! truncates a longer body, and the core discards a datagram shorter than
//! its Content-Length. Responses go back to the datagram's source address
//! and port whatever the Via says (RFC 3581 symmetric response; the core
//! stamps `received`/`rport` on the top Via).
//!
//! Keep-alives: a STUN Binding request (RFC 5626 §4.4.2, the UDP
//! keep-alive) is answered with a Binding success response carrying the
//! source address (`super::stun`); a datagram that is exactly CRLFCRLF is
//! answered with CRLF, as on streams (§4.4.1; the pong costs less than
//! the ping, so it cannot amplify). Other all-CRLF datagrams and other
//! STUN messages only count as traffic. Leading CRLFs before a message are
//! skipped (§7.5 tolerance).
//!
//! Lifetime: a pseudo-connection ends after `idle_timeout_secs` without a
//! datagram *from* the client (what the edge sends proves nothing about the
//! client's NAT binding), which closes the flow in the core (its
//! registrations stop routing, RFC 5626 §5.3). At most `max_connections`
//! pseudo-connections exist (counted apart from TCP/TLS ones); datagrams
//! from further addresses are dropped. Per-peer queues are bounded and a
//! full queue drops datagrams, which UDP senders must tolerate anyway.
//!
//! Size: the edge never switches a request to TCP for a UDP-only legacy
//! client; one larger than 1300 bytes (§18.1.1) is sent anyway, with a
//! warning, and IP fragments it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::{net::UdpSocket, sync::mpsc};
use tracing::{debug, info, info_span, warn, Instrument};

use super::{stun, Event, Shared};
use crate::{
    media::Side,
    proxy::{ConnId, ConnInfo, Proto},
    sip::framer::{PING, PONG},
};

/// §18.1.1: requests larger than this (MTU 1500 minus 200) should go over
/// a congestion-controlled transport; we have none toward UDP-only clients.
pub const UDP_MTU_LIMIT: usize = 1300;
/// Largest UDP payload (IPv4: 65535 - 8 - 20).
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams queued for one pseudo-connection before new ones are dropped.
const INBOUND_QUEUE: usize = 64;

/// What one received datagram is.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram {
    /// CRLFCRLF: answer CRLF.
    Ping,
    /// A STUN message (RFC 5389): a Binding request is answered.
    Stun(Bytes),
    /// Other keep-alive traffic (lone CRLFs): refreshes the flow only.
    KeepAlive,
    /// A SIP message (possibly malformed: the core answers or drops it).
    Message(Bytes),
}

/// Classifies a datagram (sans-IO, so it is unit-tested).
pub fn classify(d: Bytes) -> Datagram {
    if d.as_ref() == PING {
        return Datagram::Ping;
    }
    if d.iter().all(|b| *b == b'\r' || *b == b'\n') {
        return Datagram::KeepAlive;
    }
    // RFC 5389 §6: top two bits zero, cookie at offset 4; RFC 5626 §4.4.2
    // keep-alives over UDP are STUN Binding requests.
    if stun::is_stun(&d) {
        return Datagram::Stun(d);
    }
    let skip = d
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    Datagram::Message(d.slice(skip..))
}

/// Whether outgoing bytes are a request (not a response or a pong).
fn is_request(bytes: &[u8]) -> bool {
    !bytes.starts_with(b"SIP/") && bytes.len() > 2
}

/// Receives datagrams on `socket` until shutdown, handing each to the
/// pseudo-connection of its source address (created on first contact).
pub(super) async fn serve(socket: UdpSocket, shared: Shared) {
    let max_peers = shared.max_connections;
    let socket = Arc::new(socket);
    let mut peers: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let mut refused: u64 = 0;
    let mut shutdown = shared.shutdown.clone();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors surface here on some systems; the socket
                    // stays usable, so never stop receiving.
                    debug!(error = %e, "UDP receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        if n == 0 {
            continue;
        }
        let mut data = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
        if let Some(tx) = peers.get(&peer) {
            match tx.try_send(data) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    debug!(%peer, "pseudo-connection queue full; datagram dropped");
                    continue;
                }
                // Expired (idle): a new pseudo-connection takes over.
                Err(mpsc::error::TrySendError::Closed(d)) => {
                    peers.remove(&peer);
                    data = d;
                }
            }
        }
        // The map holds every live pseudo-connection (and expired ones
        // until swept here), so its size bounds them all.
        if peers.len() >= max_peers {
            peers.retain(|_, tx| !tx.is_closed());
        }
        if peers.len() >= max_peers {
            if refused.is_multiple_of(1000) {
                warn!(%peer, limit = max_peers, refused, "UDP datagram dropped: pseudo-connection limit (max_connections) reached");
            }
            refused += 1;
            continue;
        }
        let conn = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        // A fresh queue has room for the first datagram.
        let _ = tx.try_send(data);
        peers.insert(peer, tx);
        let span = info_span!("udp", conn, %peer, side = ?Side::Internal);
        tokio::spawn(pseudo_conn(socket.clone(), conn, peer, rx, shared.clone()).instrument(span));
    }
}

/// One pseudo-connection: reports `Opened`, forwards its datagrams to the
/// driver, sends what the driver queues for it to `peer`, ends on idle
/// timeout or shutdown and reports `Closed`.
async fn pseudo_conn(
    socket: Arc<UdpSocket>,
    conn: ConnId,
    peer: SocketAddr,
    mut inbound: mpsc::Receiver<Bytes>,
    shared: Shared,
) {
    let (tx, mut rx) = super::conn::write_queue();
    let info = ConnInfo {
        side: Side::Internal,
        peer,
        proto: Proto::Udp,
    };
    let events = shared.events.clone();
    let opened = Event::Opened {
        conn,
        info,
        writer: tx,
        hop: None,
        // UDP flows end by their own idle rule (module docs).
        hold: Default::default(),
    };
    if events.send(opened).await.is_err() {
        return;
    }
    debug!("UDP pseudo-connection opened");
    let idle_for = shared.params.load().idle;
    let idle = tokio::time::sleep(idle_for);
    tokio::pin!(idle);
    let mut shutdown = shared.shutdown.clone();
    let why = loop {
        tokio::select! {
            d = inbound.recv() => {
                let Some(d) = d else { break "listener gone" };
                idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
                match classify(d) {
                    Datagram::Ping => {
                        // RFC 5626 §4.4.1 pong, to the ping's source.
                        if let Err(e) = socket.send_to(PONG, peer).await {
                            debug!(error = %e, "pong send failed");
                        }
                    }
                    Datagram::Stun(d) => match stun::binding_response(&d, peer) {
                        // RFC 5626 §4.4.2: the flow is alive; tell the
                        // client the address it is seen from.
                        Some(answer) => {
                            if let Err(e) = socket.send_to(&answer, peer).await {
                                debug!(error = %e, "STUN answer send failed");
                            }
                        }
                        None => debug!("STUN message other than a Binding request"),
                    },
                    Datagram::KeepAlive => debug!("UDP keep-alive"),
                    Datagram::Message(bytes) => {
                        if events.send(Event::Message { conn, bytes }).await.is_err() {
                            break "driver gone";
                        }
                    }
                }
            }
            m = rx.next() => {
                let Some(bytes) = m else { break "driver dropped the writer" };
                if bytes.len() > UDP_MTU_LIMIT && is_request(&bytes) {
                    // §18.1.1 would switch to TCP; a UDP-only legacy client
                    // cannot take that, so send it and let IP fragment it.
                    warn!(len = bytes.len(), limit = UDP_MTU_LIMIT, "request over the UDP size limit sent anyway (client is UDP-only)");
                }
                // A send error (ICMP unreachable, no route) loses this
                // datagram only; transactions time out or retransmit.
                if let Err(e) = socket.send_to(&bytes, peer).await {
                    info!(error = %e, len = bytes.len(), "UDP send failed");
                }
            }
            () = &mut idle => break "idle timeout",
            _ = shutdown.changed() => break "shutdown",
        }
    };
    // The listener sees the closed queue and opens a new pseudo-connection
    // for this address on its next datagram.
    inbound.close();
    info!(reason = why, "UDP pseudo-connection closed");
    let _ = events.send(Event::Closed { conn }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_are_classified() {
        assert_eq!(classify(Bytes::from_static(b"\r\n\r\n")), Datagram::Ping);
        assert_eq!(classify(Bytes::from_static(b"\r\n")), Datagram::KeepAlive);
        let mut stun = vec![0x00, 0x01, 0x00, 0x00];
        stun.extend_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        stun.extend_from_slice(&[7; 12]);
        let stun = Bytes::from(stun);
        assert_eq!(classify(stun.clone()), Datagram::Stun(stun));
        assert_eq!(
            classify(Bytes::from_static(b"\r\nOPTIONS sip:x SIP/2.0\r\n\r\n")),
            Datagram::Message(Bytes::from_static(b"OPTIONS sip:x SIP/2.0\r\n\r\n"))
        );
        assert_eq!(
            classify(Bytes::from_static(b"\x00garbage")),
            Datagram::Message(Bytes::from_static(b"\x00garbage"))
        );
    }

    #[test]
    fn only_requests_count_for_the_size_warning() {
        assert!(is_request(b"INVITE sip:a@b SIP/2.0\r\n"));
        assert!(!is_request(b"SIP/2.0 200 OK\r\n"));
        assert!(!is_request(PONG));
    }
}
