//! `sip-edge-tester`: runs every datapath fixture (`sip_edge_tests::fixtures`)
//! through BPF_PROG_TEST_RUN in a private namespace and prints PASS/FAIL per
//! fixture; with `--repeat N` it also times each fixture's path (ns/packet,
//! kernel-measured, with `kernel.bpf_stats_enabled` forced to 0).
//!
//! Exit codes: 0 all passed, 1 a fixture failed, 2 runner error, 77 skipped
//! (not root / BPF unavailable).

use clap::Parser;
use sip_edge_tests::fixtures::{self, BenchResult, FixtureResult, Runner, Setup, StatsOff};

/// Verify (and optionally benchmark) the XDP datapath against its fixtures.
#[derive(Parser, Debug)]
#[command(name = "sip-edge-tester", version)]
struct Args {
    /// Also time each fixture with BPF_PROG_TEST_RUN repeat (N program runs).
    #[arg(long, value_name = "N")]
    repeat: Option<u64>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
    /// Only fixtures whose name or description contains this substring.
    #[arg(long, value_name = "SUBSTR")]
    filter: Option<String>,
}

#[derive(serde::Serialize)]
struct Row {
    #[serde(flatten)]
    result: FixtureResult,
    passed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    bench: Option<BenchResult>,
}

fn print_bench(b: &BenchResult) {
    let Some(ns) = b.ns_per_packet else {
        println!(
            "{:>9}     {:<36} {}",
            "-",
            b.name,
            b.note.as_deref().unwrap_or("not timed")
        );
        return;
    };
    let total = b.reasons.iter().map(|r| r.1).sum::<u64>().max(1);
    let path: Vec<String> = b
        .reasons
        .iter()
        .map(|(r, c)| format!("{r} {:.1}%", *c as f64 * 100.0 / total as f64))
        .collect();
    let target = match b.class.and_then(|c| c.target_ns().map(|t| (c, t))) {
        Some((c, t)) => format!(
            "  [{c:?} target <= {t} ns: {}]",
            if ns <= t { "met" } else { "MISSED" }
        ),
        None => String::new(),
    };
    let note = b
        .note
        .as_deref()
        .map(|n| format!("  ({n})"))
        .unwrap_or_default();
    println!(
        "{ns:>9.1} ns  {:<36} {}{target}{note}",
        b.name,
        path.join(", ")
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut all = fixtures::fixtures()?;
    if let Some(f) = &args.filter {
        all.retain(|x| x.name.contains(f.as_str()) || x.description.contains(f.as_str()));
    }
    let mut runner = match Runner::setup()? {
        Setup::Ready(r) => r,
        Setup::Skipped(reason) => {
            if args.json {
                println!("{}", serde_json::json!({ "skipped": reason }));
            } else {
                println!("SKIPPED: {reason}");
            }
            std::process::exit(77);
        }
    };
    let mut rows = Vec::new();
    for f in &all {
        let result = runner.run_fixture(f)?;
        let passed = result.passed();
        if !args.json {
            println!(
                "{} {} — {}",
                if passed { "PASS" } else { "FAIL" },
                f.name,
                f.description
            );
            for line in &result.failures {
                println!("    {}", line.trim_end().replace('\n', "\n    "));
            }
        }
        rows.push(Row {
            result,
            passed,
            bench: None,
        });
    }
    if let Some(n) = args.repeat {
        let _stats = StatsOff::new()?;
        if !args.json {
            println!("\nns/packet over {n} runs each (kernel-measured mean of BPF_PROG_TEST_RUN repeat; path = reasons counted while timing):");
        }
        for (f, row) in all.iter().zip(rows.iter_mut()) {
            let b = runner.bench(f, n)?;
            if !args.json {
                print_bench(&b);
            }
            row.bench = Some(b);
        }
    }
    let passed = rows.iter().filter(|r| r.passed).count();
    let failed = rows.len() - passed;
    if args.json {
        let doc = serde_json::json!({
            "netns": runner.netns_name(),
            "fixtures": rows,
            "passed": passed,
            "failed": failed,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{passed} passed, {failed} failed");
    }
    drop(runner);
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
