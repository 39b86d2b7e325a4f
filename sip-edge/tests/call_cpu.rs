//! Work the agent does per SIP call (issue #12: calls/s over TLS), counted
//! in-process so the figure does not depend on the shared machine's wall
//! clock: the proxy core with the production media controller (pinhole
//! manager, SDP rewrite, crash-recovery journal) driven through INVITE →
//! 200 OK (SDP answer) → ACK → BYE → 200 OK for every call over a few
//! persistent connections, as the benches do.
//!
//! Reported per call: heap allocations (alloc + realloc calls of a
//! counting global allocator, exact and repeatable: the stable figure on
//! a VM without a hardware PMU) and the thread CPU time spent inside the
//! proxy (noisy on a shared machine: shown, not asserted). Only the
//! proxy's own calls are counted: the driver's message building and
//! parsing run with counting off.
//!
//! One test function per binary: the counters are process-wide.

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use common::{
    assert_ack_forwarded, caller, controller, hop_dest, in_dialog, invite, ok_with_answer, proxy,
    response_head, to, with_body, CALLEE,
};
use sip_edge::{config::MediaMode, proxy::Dest, proxy::Proxy, sip::message::Message};

// --- counting allocator -------------------------------------------------------

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Counting is on only while the proxy runs on this thread.
    static ON: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    // `try_with`: the slot may be gone while the thread exits.
    if ON.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call forwards to `System` with the same layout; the
// counter is only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note();
        // SAFETY: forwarded as is.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `f` (the proxy) with allocation counting on, adding its thread
/// CPU time to `cpu`.
fn counted<T>(cpu: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t0 = thread_cpu();
    ON.with(|on| on.set(true));
    let r = f();
    ON.with(|on| on.set(false));
    *cpu += thread_cpu() - t0;
    r
}

/// One call, INVITE → 200 OK → ACK → BYE → 200 OK; panics unless each
/// step goes through. The proxy's work is counted into `cpu`.
fn call(p: &mut Proxy, i: u64, now: Instant, cpu: &mut Duration) {
    let (conn, _) = caller(i);
    let invite = invite(i);
    let out = counted(cpu, || p.on_message(conn, &invite, now));
    let fwd = out
        .iter()
        .find(|o| o.dest == hop_dest())
        .unwrap_or_else(|| panic!("INVITE {i} not forwarded: {out:?}"));
    let ckey = fwd.client_tx.clone().expect("client tx");
    counted(cpu, || p.on_sent(&ckey, CALLEE));
    let inv = Message::parse(&fwd.bytes).expect("forwarded INVITE");

    let ok = ok_with_answer(i, &inv);
    let out = counted(cpu, || p.on_message(CALLEE, &ok, now));
    let ok = to(&out, &Dest::Conn(conn));
    assert_eq!(
        ok.first().and_then(Message::status),
        Some(200),
        "200 OK {i} relayed: {out:?}"
    );
    let ok = &ok[0];

    let ack = in_dialog(i, ok, "ACK", 1);
    let out = counted(cpu, || p.on_message(conn, &ack, now));
    assert_ack_forwarded(&out, i);

    let bye = in_dialog(i, ok, "BYE", 2);
    let out = counted(cpu, || p.on_message(conn, &bye, now));
    let fwd = out
        .iter()
        .find(|o| o.dest == Dest::Conn(CALLEE))
        .unwrap_or_else(|| panic!("BYE {i} not forwarded: {out:?}"));
    if let Some(ckey) = fwd.client_tx.clone() {
        counted(cpu, || p.on_sent(&ckey, CALLEE));
    }
    let bye = Message::parse(&fwd.bytes).expect("forwarded BYE");
    assert!(bye.method().is_some_and(|m| m.is("BYE")), "BYE {i}");
    let ok = with_body(response_head(&bye, ""), "");
    let out = counted(cpu, || p.on_message(CALLEE, &ok, now));
    assert_eq!(
        to(&out, &Dest::Conn(conn))
            .first()
            .and_then(Message::status),
        Some(200),
        "BYE's 200 OK {i} relayed: {out:?}"
    );
}

/// (allocations, CPU µs) per call over `n` calls after `warm` warm-up calls.
fn measure(warm: u64, n: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("media-state.jsonl");
    let mut p = proxy(Box::new(controller(MediaMode::Nat, Some(&journal))));
    let mut now = Instant::now();
    let mut cpu = Duration::ZERO;
    let mut i = 0;
    let mut run = |p: &mut Proxy, upto: u64, cpu: &mut Duration| {
        while i < upto {
            call(p, i, now, cpu);
            i += 1;
            if i % BATCH == 0 {
                // The setup and teardown transactions end (64*T1).
                now += Duration::from_secs(40);
                counted(cpu, || p.on_tick(now));
            }
        }
    };
    run(&mut p, warm, &mut cpu);
    let a0 = ALLOCS.load(Ordering::Relaxed);
    cpu = Duration::ZERO;
    run(&mut p, warm + n, &mut cpu);
    let allocs = ALLOCS.load(Ordering::Relaxed) - a0;
    let (s, c, d) = p.live();
    assert_eq!((s, c, d), (0, 0, 0), "every call and transaction ended");
    (allocs as f64 / n as f64, cpu.as_secs_f64() * 1e6 / n as f64)
}

/// Calls per batch.
const BATCH: u64 = 100;

#[test]
fn a_call_costs_a_bounded_number_of_allocations() {
    let mut allocs = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..3 {
        let (a, c) = measure(500, 2000);
        allocs.push(a);
        cpus.push(c);
    }
    cpus.sort_by(f64::total_cmp);
    println!(
        "allocations per call: {allocs:?}; CPU µs per call in the proxy: min {:.1} median {:.1} max {:.1}",
        cpus[0], cpus[1], cpus[2]
    );
    let worst = allocs.iter().copied().fold(0.0, f64::max);
    assert!(
        worst <= BOUND,
        "a call costs {worst:.1} heap allocations (bound {BOUND})"
    );
}

/// Heap allocations (and reallocations) the agent may make for one call.
/// Measured on the tree this branch started from: 1353.6; after the
/// parsing work of issue #12 (methods, header lines, Via/From/To parsed
/// once and borrowed, SDP in one buffer, serialisation in place): 848.6;
/// with the token hex fix merged in from main (1185.1 without this
/// branch's work): 680.1. The bound is the latter plus ~1.5%: the count
/// is exact (only the proxy's own calls are counted), so another copy
/// of a message or a re-parse per message fails it.
const BOUND: f64 = 690.0;
