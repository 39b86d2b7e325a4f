//! Heap bytes the agent keeps per established call (issue #12: ≤ 2 kB of
//! agent state per established call), counted by a global allocator in
//! this test binary: the proxy core with the production media controller
//! (pinhole manager, SDP rewrite, crash-recovery journal) over a sink that
//! keeps what the production `MapsSink` keeps per flow (its two rule
//! slots), driven through INVITE → 200 OK (SDP answer) → ACK for every
//! call over a few persistent connections, as the benches do.
//!
//! Method: establish N1 calls, let the transactions of their setup end
//! (a tick 64*T1 later, RFC 3261 §17), count the live heap bytes; do the
//! same for N2 more; bytes per call = the difference / N2. Both readings
//! are at the same state (no transaction pending, tables warmed), so what
//! the difference holds is what each further established call keeps. The
//! allocator counts requested bytes and, separately, what glibc's malloc
//! spends on them (its 8-byte chunk header, 16-byte rounding and 32-byte
//! minimum chunk), which is what shows up in RSS.
//!
//! One test function per binary: the counters are process-wide, and the
//! harness runs tests of one binary on parallel threads.

mod common;
mod memtest;

use std::time::{Duration, Instant};

use common::{
    assert_ack_forwarded, caller, controller, hop_dest, in_dialog, invite, ok_with_answer, proxy,
    to, CALLEE,
};
use memtest::{live, Counting, NoMedia};
use sip_edge::{
    config::MediaMode,
    media::MediaControl,
    proxy::{Dest, Proxy},
    sip::message::Message,
};

// --- the counting allocator ----------------------------------------------------

#[global_allocator]
static GLOBAL: Counting = Counting;

// --- the agent under test -------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Layer {
    /// The proxy core only.
    ProxyOnly,
    /// Proxy + media controller, no journal.
    Media(MediaMode),
    /// Proxy + media controller + crash-recovery journal (production).
    Journal(MediaMode),
}

fn layer_proxy(layer: Layer, state: &std::path::Path) -> Proxy {
    let media: Box<dyn MediaControl> = match layer {
        Layer::ProxyOnly => Box::new(NoMedia),
        Layer::Media(mode) => Box::new(controller(mode, None)),
        Layer::Journal(mode) => Box::new(controller(mode, Some(state))),
    };
    proxy(media)
}

/// One call, INVITE → 200 OK → ACK; panics unless each step goes through.
fn establish(p: &mut Proxy, i: u64, now: Instant) {
    let (conn, _) = caller(i);
    let out = p.on_message(conn, &invite(i), now);
    let fwd = out
        .iter()
        .find(|o| o.dest == hop_dest())
        .unwrap_or_else(|| panic!("INVITE {i} not forwarded: {out:?}"));
    p.on_sent(fwd.client_tx.as_deref().expect("client tx"), CALLEE);
    let inv = Message::parse(&fwd.bytes).expect("forwarded INVITE");
    let out = p.on_message(CALLEE, &ok_with_answer(i, &inv), now);
    let ok = to(&out, &Dest::Conn(conn));
    assert_eq!(
        ok.first().and_then(Message::status),
        Some(200),
        "200 OK {i} relayed: {out:?}"
    );
    let out = p.on_message(conn, &in_dialog(i, &ok[0], "ACK", 1), now);
    assert_ack_forwarded(&out, i);
}

/// Heap bytes per further established call, (requested, malloc chunks).
fn measure(layer: Layer, n1: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("media-state.jsonl");
    let mut p = layer_proxy(layer, &state);
    let mut now = Instant::now();
    let mut i = 0;
    // Calls come in batches 40 s apart, each batch's setup transactions
    // ending (64*T1) before the next: the transaction tables stay at the
    // size a steady call rate gives them, the same at both readings.
    let mut level = |p: &mut Proxy, upto: u64, now: &mut Instant| {
        while i < upto {
            establish(p, i, *now);
            i += 1;
            if i % BATCH == 0 || i == upto {
                *now += Duration::from_secs(40);
                let _ = p.on_tick(*now);
            }
        }
        let (s, c, d) = p.live();
        assert_eq!((s, c), (0, 0), "transactions left after 64*T1");
        assert_eq!(d as u64, upto, "every call is an established dialog");
        live()
    };
    // N2 = 2 * N1: a hash table then has the same load at both readings,
    // so the difference carries its buckets at their average cost rather
    // than a doubling's worth or none of it.
    let a = level(&mut p, n1, &mut now);
    let b = level(&mut p, 2 * n1, &mut now);
    if std::env::var_os("DIALOG_MEMORY_PROFILE").is_some() {
        // Profiling (heaptrack's "leaked" report): what the calls keep.
        std::mem::forget(p);
    }
    (
        (b.0 - a.0) as f64 / n1 as f64,
        (b.1 - a.1) as f64 / n1 as f64,
    )
}

/// Calls per batch (see `measure`).
const BATCH: u64 = 100;

#[test]
fn an_established_call_keeps_a_bounded_number_of_heap_bytes() {
    let n1 = 1500;
    let all = [
        Layer::ProxyOnly,
        Layer::Media(MediaMode::Nat),
        Layer::Journal(MediaMode::Nat),
        Layer::Journal(MediaMode::Relay),
    ];
    let profile = std::env::var_os("DIALOG_MEMORY_PROFILE").is_some();
    let layers = if profile { &all[2..3] } else { &all[..] };
    let mut worst: f64 = 0.0;
    for &layer in layers {
        let (req, chunks) = measure(layer, n1);
        println!("{layer:?}: {req:.0} B/call requested, {chunks:.0} B/call in malloc chunks");
        worst = worst.max(chunks);
    }
    assert!(
        profile || worst <= BOUND,
        "an established call keeps {worst:.0} heap bytes (bound {BOUND})"
    );
}

/// Malloc bytes an established call may keep. Issue #12 asks ≤ 2 kB of
/// agent state per call; this test measured 5.4 kB before the compaction
/// of bindings, flow records and the dialog table (commit history),
/// 4.2 kB after, 4.0 kB with the media manager's dialogs boxed, 2.78 kB
/// once the dialog key was shared by the proxy, the media manager and the
/// journal, the proxy's dialog record kept one From/To pair for its BYE
/// legs and its parties, and the journal kept its records boxed without
/// the rule keys their flows give, 2.4 kB with the Contact bindings
/// keyed by their tokens' nonces instead of the tokens, and 1.96 kB
/// (proxy alone 0.89 kB) once the bindings were one table of 56-byte
/// slots with a reverse index of bare nonces, the dialog's BYE targets
/// shared their Contact URIs with the bindings, and the media manager's
/// dialog (one fork string, the rarely used lists behind one pointer),
/// the proxy's dialog record and the journal record each fitted a
/// smaller malloc size class, in every layer configuration above. The
/// bound is the latter plus 10%: a per-call copy of a request (≥ 1 kB)
/// or another copy of a dialog's keys, legs or tokens fails it, allocator
/// noise does not (the count is exact: nothing else allocates while the
/// proxy runs).
const BOUND: f64 = 2157.0;
