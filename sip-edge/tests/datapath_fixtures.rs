//! Runs every datapath fixture (`sip_edge::datapath::fixtures`) through
//! BPF_PROG_TEST_RUN, one #[test] per fixture group, each in its own
//! namespace. Without root or BPF the tests print `SKIPPED: <reason>` and
//! return: a skip is not a pass.

use sip_edge::datapath::fixtures::{self, Output, Runner, Setup, XDP_PASS};
use sip_edge_common::Reason;

fn run_group(group: &str) {
    let all = fixtures::fixtures().expect("fixture packets build");
    let mine: Vec<_> = all.into_iter().filter(|f| f.group == group).collect();
    assert!(!mine.is_empty(), "no fixtures in group {group}");
    let mut runner = match Runner::setup().expect("fixture runner setup") {
        Setup::Ready(r) => r,
        Setup::Skipped(reason) => {
            sip_edge::testnet::record_skip(
                &format!("datapath_fixtures::{group}"),
                &format!("{reason} ({} fixtures not run)", mine.len()),
            );
            return;
        }
    };
    let mut failed = Vec::new();
    // Each fixture twice: MATCH_DST rules in their PH_DST entries (as the
    // map writer places them), then all in PINHOLES behind PH_DST overflow
    // counts (as for a key whose entry is taken). Verdicts must not differ.
    for hash_only in [false, true] {
        runner.hash_only = hash_only;
        let mode = if hash_only { "hash" } else { "ph_dst" };
        for f in &mine {
            let res = runner.run_fixture(f).expect("fixture runner error");
            if res.passed() {
                eprintln!("PASS [{mode}] {} — {}", f.name, f.description);
            } else {
                let msg = format!(
                    "FAIL [{mode}] {} — {}\n    {}",
                    f.name,
                    f.description,
                    res.failures.join("\n    ")
                );
                eprintln!("{msg}");
                failed.push(msg);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} fixtures in group {group} failed:\n{}",
        failed.len(),
        mine.len(),
        failed.join("\n")
    );
}

#[test]
fn hit() {
    run_group("hit");
}

#[test]
fn remote() {
    run_group("remote");
}

#[test]
fn latch() {
    run_group("latch");
}

#[test]
fn policy() {
    run_group("policy");
}

#[test]
fn hit_drop() {
    run_group("hit-drop");
}

#[test]
fn parse() {
    run_group("parse");
}

#[test]
fn fragment() {
    run_group("fragment");
}

#[test]
fn bench() {
    run_group("bench");
}

/// Every fixture belongs to a group that has a #[test] above, and names are unique.
#[test]
fn every_fixture_is_run() {
    let groups = [
        "hit", "remote", "latch", "policy", "hit-drop", "parse", "fragment", "bench",
    ];
    let all = fixtures::fixtures().expect("fixture packets build");
    let mut names = std::collections::HashSet::new();
    for f in &all {
        assert!(
            groups.contains(&f.group),
            "fixture {} has group {} with no #[test]",
            f.name,
            f.group
        );
        assert!(
            names.insert(f.name.clone()),
            "duplicate fixture name {}",
            f.name
        );
    }
}

/// Negative control: a fixture with deliberately wrong expectations must
/// fail on every one of them, so a green run means something.
#[test]
fn harness_reports_every_mismatch() {
    let all = fixtures::fixtures().expect("fixture packets build");
    let mut f = all
        .into_iter()
        .find(|f| f.name == "hit-v4-udp-relay-in")
        .expect("fixture exists");
    let mut runner = match Runner::setup().expect("fixture runner setup") {
        Setup::Ready(r) => r,
        Setup::Skipped(reason) => {
            sip_edge::testnet::record_skip(
                "datapath_fixtures::harness_reports_every_mismatch",
                &reason,
            );
            return;
        }
    };
    if let Output::Exact(b) = &mut f.steps[0].output {
        let last = b.len() - 1;
        b[last] ^= 0xff;
    }
    f.steps[0].action = XDP_PASS;
    f.steps[0].reasons = vec![(Reason::PassOther, 1)];
    f.states[0].packets = 2;
    let res = runner.run_fixture(&f).expect("fixture runner error");
    let text = res.failures.join("\n");
    for needle in [
        "action XDP_PASS expected, got XDP_REDIRECT",
        "output frame differs",
        "REASONS[forwarded]",
        "REASONS[pass_other]",
        "PH_STATE[1].packets = 1, expected 2",
    ] {
        assert!(
            text.contains(needle),
            "expected a failure mentioning {needle:?}, got:\n{text}"
        );
    }
}
