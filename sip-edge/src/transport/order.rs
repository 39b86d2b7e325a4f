//! The order in which the driver handles queued events (issue #12:
//! pinhole install p99 under load).
//!
//! Under load every connection's messages queue for the one driver, and a
//! callee's 200 OK (whose answer installs the call's pinholes) waited
//! behind every new INVITE queued before it: at 16 load workers the
//! install's p99 was 4× its median. The driver takes what is queued in one
//! batch and handles responses first: they finish calls and transactions
//! already under way, where a request starts new work (the usual overload
//! rule: complete before you admit).
//!
//! A batch alone still left a response that arrived while the batch ran
//! waiting for all of its requests (up to [`BATCH`] of them, each tens of
//! µs of SDP rewrite and routing). So between two requests of a round the
//! driver also takes what was queued meanwhile ([`run`]): responses and
//! connection set-ups are handled at once, anything else joins the back
//! of the round. A round takes at most [`PULLS`] such events, so timers,
//! control queries and the tick are never starved by a steady queue.
//!
//! What stays ordered:
//! - events of one kind keep their queue order (requests and closings
//!   join the round's line in the order they were queued);
//! - a connection's `Opened` and `Identity` (its set-up, queued before any
//!   of its messages) are handled on arrival, so no message of it is
//!   handled before its connection is known;
//! - `Closing`, `Closed` and `ConnectFailed` wait in the line, after every
//!   message of their connection queued before them, so the responses to a
//!   closing connection's messages are still queued before its writer
//!   goes.
//!
//! A response overtaking an earlier request is allowed: SIP orders nothing
//! across transactions (over UDP anything may arrive in any order), and
//! within one transaction a response never precedes the request it answers
//! on the same path.

use std::collections::VecDeque;

use super::Event;

/// Most events taken from the queue at once.
pub const BATCH: usize = 64;

/// Most events one round takes from the queue between its requests, on
/// top of its batch (see the module documentation).
pub const PULLS: usize = 4 * BATCH;

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

/// One round of the driver: handles the events of `batch` and those
/// `pull` yields meanwhile, each with `handle`, in the order the module
/// documentation gives; `batch` is left empty for the next receive.
pub fn run(
    batch: &mut Vec<Event>,
    mut pull: impl FnMut() -> Option<Event>,
    mut handle: impl FnMut(Event),
) {
    let mut line = VecDeque::with_capacity(batch.len());
    for ev in batch.drain(..) {
        if first(&ev) {
            handle(ev);
        } else {
            line.push_back(ev);
        }
    }
    let mut pulls = PULLS;
    while let Some(ev) = line.pop_front() {
        handle(ev);
        // What arrived while that ran: responses go now, ahead of the
        // requests still in line; the line itself stays at most a batch.
        while pulls > 0 && line.len() < BATCH {
            let Some(ev) = pull() else { break };
            pulls -= 1;
            if first(&ev) {
                handle(ev);
            } else {
                line.push_back(ev);
            }
        }
    }
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

    /// Labels of what one round handled, in order, over `batch` with
    /// `queued` arriving one at a time (each pull yields the next).
    fn handled(batch: &mut Vec<Event>, queued: Vec<Event>) -> Vec<String> {
        let mut queued = queued.into_iter();
        let mut order = Vec::new();
        run(batch, || queued.next(), |e| order.push(label(&e)));
        order
    }

    #[test]
    fn responses_and_connection_set_up_first_each_group_in_queue_order() {
        let (writer, _rx) = super::super::conn::write_queue();
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
        let order = handled(&mut batch, Vec::new());
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
    fn a_response_queued_while_the_round_runs_goes_before_the_requests_in_line() {
        let mut batch = vec![
            msg(1, "INVITE sips:a@x SIP/2.0\r\n"),
            msg(1, "INVITE sips:b@x SIP/2.0\r\n"),
            msg(1, "INVITE sips:c@x SIP/2.0\r\n"),
        ];
        let queued = vec![
            msg(1, "INVITE sips:d@x SIP/2.0\r\n"),
            msg(2, "SIP/2.0 200 OK\r\n"),
            Event::Closing {
                conn: 1,
                refused: None,
            },
            msg(2, "SIP/2.0 180 Ringing\r\n"),
        ];
        let order = handled(&mut batch, queued);
        assert!(batch.is_empty());
        // The 200 OK queued after the batch was taken is handled after the
        // first INVITE, not after the batch's three; requests and the
        // closing keep their queue order behind.
        assert_eq!(
            order,
            vec![
                "INVITE  1",
                "SIP/2.0 2",
                "SIP/2.0 2",
                "INVITE  1",
                "INVITE  1",
                "INVITE  1",
                "closing 1",
            ]
        );
    }

    #[test]
    fn a_round_takes_a_bounded_number_of_events_from_a_steady_queue() {
        let mut batch = vec![msg(1, "INVITE sips:a@x SIP/2.0\r\n")];
        let mut pulled = 0usize;
        let mut handled = 0usize;
        // An endless queue of requests and responses.
        run(
            &mut batch,
            || {
                pulled += 1;
                Some(if pulled.is_multiple_of(2) {
                    msg(2, "SIP/2.0 200 OK\r\n")
                } else {
                    msg(1, "BYE sips:a@x SIP/2.0\r\n")
                })
            },
            |_| handled += 1,
        );
        assert_eq!(pulled, PULLS);
        // Everything taken is handled before the round ends: nothing lost.
        assert_eq!(handled, PULLS + 1);
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
