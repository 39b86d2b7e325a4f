//! Protocol conformance (issue #8, hardening): every message of RFC 4475
//! (SIP torture tests, 49) and RFC 5118 (IPv6 torture tests, 12), sent raw
//! over TLS to the real agent in the edge namespace, once from an inside
//! client (client namespace → internal listener) and once from an outside
//! peer (peer namespace → external listener). For each message the test
//! checks what the RFC asks of a proxy, as the table in
//! `sip-edge/tests/fixtures/torture/corpus.rs` records it: the status the
//! edge answers (or none), whether the next hop received the request (a
//! raw TLS listener on each side records what arrives and answers it, so
//! every transaction ends), that the connection closes where the stream is
//! lost, and that no pinhole is ever installed (the corpus's INVITEs offer
//! media at third parties). It prints the score per side and fails on any
//! deviation from the table.
//!
//! One agent for the whole corpus; a new TLS connection per message (a
//! framing error closes the connection). Needs root; skips through
//! `testnet::record_skip`. Every wait is bounded.

use std::{io::Write as _, path::Path, time::Duration};

use sip_edge::sip::message::Message;
use sip_edge_tests::{
    edge::{sa, Edge, EDGE_EXT, EDGE_INT},
    testnet,
    testua::{self, TestPki, UaConn, UaError, UaListener},
};

#[path = "../../sip-edge/tests/fixtures/torture/corpus.rs"]
mod corpus;

use corpus::{Case, Expect, Rfc, CASES};

/// A response or a forwarded request normally arrives within this.
const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);
/// `[limits] message_timeout_secs` of this test's agent (clerr).
const MESSAGE_TIMEOUT_SECS: u64 = 2;

/// The demo configuration with the routes the corpus needs: requests from
/// inside go to the default route (the peer namespace), requests from
/// outside to the internal next hop (the client namespace, port 5062);
/// a short message deadline; request budgets the corpus cannot exhaust.
fn config(pin_dir: &Path, pki: &TestPki) -> String {
    format!(
        "{}[proxy.default_route]\nhost = \"198.51.100.2\"\nport = 5061\ntls_name = \"{}\"\n\
         [proxy.internal_next_hop]\nhost = \"10.77.0.2\"\nport = 5062\ntls_name = \"{}\"\n\
         [limits]\nmessage_timeout_secs = {MESSAGE_TIMEOUT_SECS}\nrequest_burst = 1000\n\
         invite_burst = 1000\nregister_burst = 1000\n",
        testua::edge_config(pin_dir, pki, "relay"),
        testua::PEER_TLS_NAME,
        testua::CLIENT_TLS_NAME,
    )
}

/// The next hop on the far side of the edge: accepts the edge's
/// connection when it comes and answers every request it gets.
struct NextHop {
    listener: UaListener,
    conn: Option<UaConn>,
}

impl NextHop {
    /// The next request (not an ACK: the edge acknowledges the next
    /// hop's 486 itself) within `wait`, if any.
    async fn request(&mut self, wait: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            if self.conn.is_none() {
                match self.listener.accept(left).await {
                    Ok(c) => self.conn = Some(c),
                    Err(_) => return None,
                }
                continue;
            }
            let conn = self.conn.as_mut()?;
            match conn.recv(left).await {
                Ok(m) if m.method().is_some_and(|x| x.is("ACK")) => continue,
                Ok(m) if m.method().is_some() => return Some(m),
                Ok(m) => eprintln!("next hop: ignoring a response: {m:?}"),
                Err(UaError::Timeout { .. }) => return None,
                // The edge closed its connection: it opens a new one.
                Err(e) => {
                    eprintln!("next hop: connection lost ({e}); accepting a new one");
                    self.conn = None;
                }
            }
        }
    }

    /// Answers `req` (486 to an INVITE, 200 to anything else).
    async fn answer(&mut self, req: &Message) -> u16 {
        let code = if req.method().is_some_and(|m| m.is("INVITE")) {
            486
        } else {
            200
        };
        let reply = testua::reply(req, code, "Torture", "nexthop", "", "", "");
        if let Some(c) = self.conn.as_mut() {
            c.send(&reply).await.expect("the next hop answers");
        }
        code
    }
}

/// The sender's connection and the statuses it got that no outcome
/// claimed yet (the edge's own answer to a later message on the stream
/// can overtake the next hop's answer to an earlier one: `dblreq`).
struct Sender {
    conn: UaConn,
    unclaimed: Vec<u16>,
    closed: bool,
}

/// What the sender saw.
enum Seen {
    /// A response with this status (100 Trying skipped).
    Status(u16),
    /// Nothing within the wait.
    Nothing,
    /// The edge closed the connection.
    Closed,
}

impl Sender {
    /// The status `want` (or, with `None`, any status) from what arrived
    /// or arrives within `wait`; other statuses are kept for later.
    async fn status(&mut self, want: Option<u16>, wait: Duration) -> Seen {
        if let Some(i) = self
            .unclaimed
            .iter()
            .position(|c| want.is_none_or(|w| w == *c))
        {
            return Seen::Status(self.unclaimed.remove(i));
        }
        if self.closed {
            return Seen::Closed;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.conn.recv(left).await {
                Ok(m) => match m.status() {
                    Some(100) => continue,
                    Some(c) if want.is_none_or(|w| w == c) => return Seen::Status(c),
                    Some(c) => self.unclaimed.push(c),
                    None => panic!("the edge sent the sender a request: {m:?}"),
                },
                Err(UaError::Timeout { .. }) => return Seen::Nothing,
                Err(UaError::BadSip { reason }) => {
                    panic!("the edge sent what is not SIP: {reason}")
                }
                Err(_) => {
                    self.closed = true;
                    return Seen::Closed;
                }
            }
        }
    }
}

/// Checks one expected outcome; `Err` says what happened instead.
///
/// `closes`: a later message on the same stream is expected to close the
/// connection (`dblreq`), so a forwarded request's answer may find it gone.
async fn check(
    expect: Expect,
    closes: bool,
    sender: &mut Sender,
    next: &mut NextHop,
) -> Result<(), String> {
    match expect {
        Expect::Forward => {
            let Some(req) = next.request(WAIT).await else {
                return Err(match sender.status(None, QUIET).await {
                    Seen::Status(c) => format!("answered {c}, nothing forwarded"),
                    Seen::Closed => "connection closed, nothing forwarded".into(),
                    Seen::Nothing => "nothing forwarded, nothing answered".into(),
                });
            };
            let code = next.answer(&req).await;
            match sender.status(Some(code), WAIT).await {
                Seen::Status(_) => Ok(()),
                // No connection left to answer on (§18.2.2).
                Seen::Closed if closes => Ok(()),
                _ => Err(format!(
                    "forwarded, but the next hop's {code} never came back (got {:?})",
                    sender.unclaimed
                )),
            }
        }
        Expect::Answer(want) => {
            let got = sender.status(Some(want), WAIT).await;
            let forwarded = next.request(QUIET).await;
            match (got, forwarded) {
                (_, Some(r)) => Err(format!(
                    "reached the next hop: {}",
                    r.method().map(ToString::to_string).unwrap_or_default()
                )),
                (Seen::Status(_), None) => Ok(()),
                (Seen::Nothing, None) if sender.unclaimed.is_empty() => Err("no answer".into()),
                (Seen::Nothing, None) => Err(format!("answered {:?}", sender.unclaimed)),
                (Seen::Closed, None) => Err(format!(
                    "connection closed; answered {:?}",
                    sender.unclaimed
                )),
            }
        }
        Expect::Drop | Expect::Closed | Expect::Incomplete => {
            let (wait, want_closed) = match expect {
                Expect::Drop => (QUIET, false),
                Expect::Closed => (WAIT, true),
                // Nothing at once, then closed at the message deadline.
                _ => (Duration::from_secs(1), false),
            };
            let got = sender.status(None, wait).await;
            if let Some(r) = next.request(QUIET).await {
                return Err(format!("reached the next hop: {:?}", r.method()));
            }
            match (got, want_closed) {
                (Seen::Status(c), _) => Err(format!("answered {c}")),
                (Seen::Nothing, true) => Err("the connection stayed open".into()),
                (Seen::Closed, false) => Err("the connection was closed".into()),
                _ if expect == Expect::Incomplete => {
                    match sender
                        .status(None, Duration::from_secs(MESSAGE_TIMEOUT_SECS + 3))
                        .await
                    {
                        Seen::Closed => Ok(()),
                        Seen::Status(c) => Err(format!("answered {c}")),
                        Seen::Nothing => Err("not closed at the message deadline".into()),
                    }
                }
                _ => Ok(()),
            }
        }
    }
}

fn rfc(c: &Case) -> &'static str {
    match c.rfc {
        Rfc::Rfc4475 => "4475",
        Rfc::Rfc5118 => "5118",
    }
}

/// The corpus from one side: each message on a new connection; returns
/// the deviations.
async fn run_side(e: &Edge, outside: bool, next: &mut NextHop) -> Vec<String> {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../sip-edge/tests/fixtures/torture"
    ));
    let (ns, to) = if outside {
        (&e.topo.peer, sa(EDGE_EXT))
    } else {
        (&e.topo.client, sa(EDGE_INT))
    };
    let mut deviations = Vec::new();
    for case in CASES {
        let bytes = corpus::load(dir, case).unwrap_or_else(|err| panic!("{err}"));
        let conn = testua::connect_tls(ns, to, &e.pki.ca, testua::EDGE_TLS_NAME, WAIT)
            .await
            .expect("connect to the edge");
        let mut sender = Sender {
            conn,
            unclaimed: Vec::new(),
            closed: false,
        };
        sender.conn.send_bytes(&bytes).await.expect("send");
        let mut problems = Vec::new();
        let expected = case.expected(outside);
        for (i, want) in expected.iter().enumerate() {
            let closes = expected[i + 1..].contains(&Expect::Closed);
            if let Err(p) = check(*want, closes, &mut sender, next).await {
                problems.push(format!("message {}: expected {want:?}, {p}", i + 1));
                break;
            }
        }
        if problems.is_empty() && !sender.unclaimed.is_empty() {
            problems.push(format!("unexpected responses {:?}", sender.unclaimed));
        }
        let pinholes = e.pinholes();
        if !pinholes.is_empty() {
            problems.push(format!("pinholes installed: {pinholes:?}"));
        }
        let verdict = if problems.is_empty() {
            "ok"
        } else {
            "DEVIATES"
        };
        println!(
            "  {:<30} RFC {} §{:<9} {:?}: {verdict}",
            case.name,
            rfc(case),
            case.section,
            case.expected(outside)
        );
        if !problems.is_empty() {
            deviations.push(format!(
                "{} ({}, RFC: {}): {}",
                case.name,
                if case.valid { "valid" } else { "invalid" },
                case.note,
                problems.join("; ")
            ));
        }
    }
    deviations
}

/// The whole corpus from inside and from outside, against the table.
#[tokio::test(flavor = "current_thread")]
async fn rfc4475_and_rfc5118_from_both_sides() {
    const NAME: &str = "torture::rfc4475_and_rfc5118_from_both_sides";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let e = Edge::start(&format!("tt{}", std::process::id()), config);
    // Inside requests go out to the peer namespace, outside ones in to
    // the client namespace.
    let mut outside_hop = NextHop {
        listener: UaListener::bind(
            &e.topo.peer,
            sa("198.51.100.2:5061"),
            &e.pki.peer_cert,
            &e.pki.peer_key,
        )
        .expect("outside next hop listens"),
        conn: None,
    };
    let mut inside_hop = NextHop {
        listener: UaListener::bind(
            &e.topo.client,
            sa("10.77.0.2:5062"),
            &e.pki.client_cert,
            &e.pki.client_key,
        )
        .expect("inside next hop listens"),
        conn: None,
    };
    let mut report = Vec::new();
    let mut failed = Vec::new();
    for (outside, label, hop) in [
        (false, "inside client", &mut outside_hop),
        (true, "outside peer", &mut inside_hop),
    ] {
        println!("torture from the {label}:");
        let deviations = run_side(&e, outside, hop).await;
        report.push(format!(
            "torture from the {label}: {}/{} messages with the RFC's outcome",
            CASES.len() - deviations.len(),
            CASES.len()
        ));
        failed.extend(deviations.into_iter().map(|d| format!("[{label}] {d}")));
    }
    // Straight to stderr, past libtest's capture: the score shows in
    // every run, passing or not (`cargo xtask test` captures output).
    for line in &report {
        let _ = writeln!(std::io::stderr(), "{line}");
    }
    e.assert_empty("torture corpus");
    e.stop();
    assert!(
        failed.is_empty(),
        "{} deviations from the table:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
