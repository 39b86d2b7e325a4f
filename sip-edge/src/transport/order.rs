//! The order in which the driver handles a batch of queued events (issue
//! #12: pinhole install p99 under load).
//!
//! Under load every connection's messages queue for the one driver, and a
//! callee's 200 OK (whose answer installs the call's pinholes) waited
//! behind every new INVITE queued before it: at 16 load workers the
//! install's p99 was 4× its median. The driver now takes what is queued
//! in one batch and handles responses first: they finish calls and
//! transactions already under way, where a request starts new work (the
//! usual overload rule: complete before you admit).
//!
//! What stays ordered:
//! - events of one kind keep their queue order (the split is stable);
//! - a connection's `Opened` and `Identity` (its set-up, queued before any
//!   of its messages) go with the first group, so no message of it is
//!   handled before its connection is known;
//! - `Closing`, `Closed` and `ConnectFailed` go with the second group,
//!   after every message of their batch, so the responses to a closing
//!   connection's messages are still queued before its writer goes.
//!
//! A response overtaking an earlier request of the same batch is allowed:
//! SIP orders nothing across transactions (over UDP anything may arrive
//! in any order), and within one transaction a response never precedes
//! the request it answers on the same path.

use super::Event;

/// Most events taken from the queue at once.
pub const BATCH: usize = 64;

/// Whether `bytes` is a SIP response (Status-Line, RFC 3261 §7.2: the
/// version first; ABNF literals match any case).
fn is_response(bytes: &[u8]) -> bool {
    bytes
        .get(..4)
        .is_some_and(|v| v.eq_ignore_ascii_case(b"SIP/"))
}

/// Handled in the first group.
fn first(ev: &Event) -> bool {
    match ev {
        Event::Opened { .. } | Event::Identity { .. } => true,
        Event::Message { bytes, .. } => is_response(bytes),
        Event::Closing { .. } | Event::Closed { .. } | Event::ConnectFailed { .. } => false,
    }
}

/// The events of `batch` in the order to handle them (see the module
/// documentation); `batch` is left empty for the next receive.
pub fn prioritized(batch: &mut Vec<Event>) -> impl Iterator<Item = Event> {
    let (a, b): (Vec<Event>, Vec<Event>) = batch.drain(..).partition(first);
    a.into_iter().chain(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        media::Side,
        proxy::{ConnInfo, Proto},
        transport::conn::Hold,
    };
    use bytes::Bytes;

    fn msg(conn: u64, text: &'static str) -> Event {
        Event::Message {
            conn,
            bytes: Bytes::from_static(text.as_bytes()),
        }
    }

    fn label(ev: &Event) -> String {
        match ev {
            Event::Opened { conn, .. } => format!("open {conn}"),
            Event::Identity { conn, .. } => format!("id {conn}"),
            Event::Message { conn, bytes } => format!(
                "{} {conn}",
                String::from_utf8_lossy(bytes.get(..7).unwrap_or_default())
            ),
            Event::Closing { conn, .. } => format!("closing {conn}"),
            Event::Closed { conn } => format!("closed {conn}"),
            Event::ConnectFailed { .. } => "failed".into(),
        }
    }

    #[test]
    fn responses_and_connection_set_up_first_each_group_in_queue_order() {
        let (writer, _rx) = tokio::sync::mpsc::channel(1);
        let opened = Event::Opened {
            conn: 3,
            info: ConnInfo {
                side: Side::External,
                peer: "198.51.100.2:5061".parse().unwrap(),
                proto: Proto::Tls,
            },
            writer,
            hop: None,
            hold: Hold::default(),
        };
        let mut batch = vec![
            msg(1, "INVITE sips:b@x SIP/2.0\r\n"),
            msg(2, "SIP/2.0 180 Ringing\r\n"),
            Event::Closing {
                conn: 2,
                refused: None,
            },
            opened,
            Event::Identity {
                conn: 3,
                names: vec!["peer".into()],
            },
            msg(3, "sip/2.0 200 OK\r\n"),
            msg(1, "ACK sips:b@x SIP/2.0\r\n"),
            msg(2, "SIP/2.0 200 OK\r\n"),
            Event::Closed { conn: 1 },
        ];
        let order: Vec<String> = prioritized(&mut batch).map(|e| label(&e)).collect();
        assert!(batch.is_empty());
        assert_eq!(
            order,
            vec![
                "SIP/2.0 2",
                "open 3",
                "id 3",
                "sip/2.0 3",
                "SIP/2.0 2",
                "INVITE  1",
                "closing 2",
                "ACK sip 1",
                "closed 1",
            ]
        );
    }

    #[test]
    fn only_a_status_line_is_a_response() {
        assert!(is_response(b"SIP/2.0 200 OK\r\n"));
        assert!(is_response(b"sip/2.0 100 Trying\r\n"));
        assert!(!is_response(b"SIP"));
        assert!(!is_response(b"OPTIONS sip:x SIP/2.0\r\n"));
        assert!(!is_response(b""));
    }
}
