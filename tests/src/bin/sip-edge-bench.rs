//! `sip-edge-bench`: runs the benchmark suite (`sip_edge_tests::bench`, issue #4)
//! and writes one JSON report, an SVG plot beside it and a Markdown table
//! (also printed) for the README. Driven by `cargo xtask bench`.
//!
//! Exit codes: 0 done, 1 a stage produced no figures (in `--quick`, the CI
//! check), 77 skipped (not root / no namespaces).

use std::{path::PathBuf, time::Instant};

use anyhow::Context as _;
use clap::Parser;
use sip_edge_tests::bench::{
    self, forward, plot, prog, progress, scale, scale_plot, sip, Machine, Mode, NotMeasured, Report,
};

/// Benchmark the datapath and its peers; every figure is a ratio against
/// peers measured in the same run.
#[derive(Parser, Debug)]
#[command(name = "sip-edge-bench", version)]
struct Args {
    /// Smallest sizes and counts (about 3 minutes); checks that every stage
    /// produces figures, asserts nothing about timing.
    #[arg(long)]
    quick: bool,
    /// JSON report path; the plot goes to the same path with `.svg`, the
    /// table with `.md`, the scale stage's figure to `<stem>-scale.png`.
    #[arg(long, default_value = "target/bench/bench.json")]
    out: PathBuf,
    /// Stages to run, comma-separated (for profiling one stage); the report
    /// marks the others as not run.
    #[arg(long, value_delimiter = ',', default_values_t = [Stage::Prog, Stage::Forward, Stage::Sip, Stage::Scale])]
    stages: Vec<Stage>,
}

/// One stage of the suite.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// BPF_PROG_TEST_RUN ns/packet by path and table size.
    Prog,
    /// Live-frame forwarding rates against peer forwarders.
    Forward,
    /// SIP over TLS through sip-edge and Kamailio.
    Sip,
    /// Cost against held calls and pinholes (runs prog too if not selected).
    Scale,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Prog => "prog",
            Stage::Forward => "forward",
            Stage::Sip => "sip",
            Stage::Scale => "scale",
        })
    }
}

fn fmt_rate(pps: f64) -> String {
    format!("{:.3}", pps / 1e6)
}

fn table(r: &Report) -> String {
    let mut s = String::new();
    if let Some(p) = &r.prog {
        s.push_str(
            "| path | pinholes | phase | ns/packet | adjacent pass ns | × pass |\n|---|---:|---|---:|---:|---:|\n",
        );
        for row in &p.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.2} |\n",
                row.case,
                row.pinholes,
                row.phase,
                row.ns_per_packet,
                row.pass_ns,
                row.ratio_vs_pass
            ));
        }
        s.push_str("\n| target (issue #4) | limit ns | measured ns | adjacent pass ns | met |\n|---|---:|---:|---:|---|\n");
        for t in &p.targets {
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {} |\n",
                t.what,
                t.limit_ns,
                t.measured_ns,
                t.pass_ns,
                if t.met { "yes" } else { "no" }
            ));
        }
    }
    if let Some(f) = &r.forward {
        s.push_str("\n| forwarder | flows | unpaced Mpps | × bare redirect | zero-loss Mpps | generator CPU share | Mpps per generator CPU s | × bare redirect per CPU s | edge program ns/packet |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_default();
        for x in &f.forwarders {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                x.name,
                x.flows,
                fmt_rate(x.rate_pps),
                opt(x.ratio_vs_redirect, &|v| format!("{v:.2}")),
                fmt_rate(x.zero_loss_pps),
                opt(x.cpu_share, &|v| format!("{v:.2}")),
                opt(x.cpu_rate_pps, &fmt_rate),
                opt(x.cpu_ratio_vs_redirect, &|v| format!("{v:.2}")),
                opt(x.edge_prog_ns, &|v| format!("{v:.1}")),
            ));
        }
        if let Some(j) = f.junk_drop_pps {
            s.push_str(&format!(
                "\nJunk drop (frames to un-pinholed media ports): {} Mpps ({} Mpps per generator CPU second).\n",
                fmt_rate(j),
                f.junk_drop_cpu_pps.map(fmt_rate).unwrap_or_default()
            ));
        }
        for (n, bps) in &f.tcp {
            s.push_str(&format!(
                "\nTCP, one connection, {n}: {:.0} Mbit/s.\n",
                bps / 1e6
            ));
        }
        s.push_str("\n| ratio | value |\n|---|---:|\n");
        for (n, v) in &f.ratios {
            s.push_str(&format!("| {n} | {v:.2} |\n"));
        }
        for n in &f.not_measured {
            s.push_str(&format!("\n- {}: {}", n.what, n.reason));
        }
        s.push('\n');
    }
    if let Some(x) = &r.sip {
        s.push_str(&sip_table(x));
    }
    if let Some(x) = &r.scale {
        s.push_str(&scale::table(x));
    }
    for e in &r.stage_errors {
        s.push_str(&format!("- stage error, {}: {}\n", e.what, e.reason));
    }
    s
}

fn sip_table(x: &sip::SipStage) -> String {
    let mut s = String::from(
        "\n| SIP over TLS | connections | workers | calls/s | calls | failed | setup p50 ms | setup p99 ms |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &x.runs {
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} | {:.2} | {:.2} |\n",
            r.system,
            r.connections,
            r.workers,
            r.calls_per_s,
            r.calls,
            r.failed,
            r.setup_p50_ms,
            r.setup_p99_ms
        ));
    }
    s.push_str("\n| pinhole install (200 OK → rule visible in the maps) | calls | p50 ms | p99 ms | max ms | load calls/s |\n|---|---:|---:|---:|---:|---:|\n");
    for l in &x.install {
        s.push_str(&format!(
            "| sip-edge, {} | {} | {:.2} | {:.2} | {:.2} | {:.0} |\n",
            l.condition, l.calls, l.p50_ms, l.p99_ms, l.max_ms, l.background_calls_per_s
        ));
    }
    if let Some(w) = &x.writer {
        s.push_str(&format!(
            "\n| pinhole map writer alone (install + remove churn) | live flows | installs/s | installs per CPU s | install p50 µs | install p99 µs | remove p50 µs |\n|---|---:|---:|---:|---:|---:|---:|\n| sip-edge `MapsSink` | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} |\n",
            w.live_flows, w.installs_per_s, w.installs_per_cpu_s, w.install_p50_us, w.install_p99_us, w.remove_p50_us
        ));
    }
    s.push_str("\n| memory (PSS) | per | held | bytes each |\n|---|---|---:|---:|\n");
    for m in &x.memory {
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} |\n",
            m.system, m.per, m.count, m.bytes_per_item
        ));
    }
    if !x.ratios.is_empty() {
        s.push_str("\n| ratio | value |\n|---|---:|\n");
        for (n, v) in &x.ratios {
            s.push_str(&format!("| {n} | {v:.2} |\n"));
        }
    }
    for n in &x.not_measured {
        s.push_str(&format!("\n- not measured, {}: {}\n", n.what, n.reason));
    }
    s
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    if let Some(reason) = sip_edge_tests::testnet::unavailable_reason() {
        println!("SKIPPED: {reason}");
        std::process::exit(77);
    }
    let mode = Mode { quick: args.quick };
    let mut report = Report {
        format: 1,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        mode,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::describe(),
        prog: None,
        forward: None,
        sip: None,
        scale: None,
        stage_errors: vec![],
    };
    progress(
        start,
        &format!(
            "machine: {} x{}, {}, load {}",
            report.machine.cpu,
            report.machine.cpus,
            report.machine.uname,
            report.machine.loadavg_start
        ),
    );
    if args.stages.contains(&Stage::Prog) {
        match prog::run(mode, start) {
            Ok(p) => report.prog = Some(p),
            Err(e) => report.stage_errors.push(NotMeasured {
                what: "prog".into(),
                reason: format!("{e:#}"),
            }),
        }
    }
    if args.stages.contains(&Stage::Forward) {
        match forward::run(mode, start) {
            Ok(f) => report.forward = Some(f),
            Err(e) => report.stage_errors.push(NotMeasured {
                what: "forward".into(),
                reason: format!("{e:#}"),
            }),
        }
    }
    if args.stages.contains(&Stage::Sip) {
        match sip::run(mode, start) {
            Ok(x) => report.sip = Some(x),
            Err(e) => report.stage_errors.push(NotMeasured {
                what: "sip".into(),
                reason: format!("{e:#}"),
            }),
        }
    }
    if args.stages.contains(&Stage::Scale) {
        match scale::run(mode, start, report.prog.as_ref(), report.forward.as_ref()) {
            Ok(x) => report.scale = Some(x),
            Err(e) => report.stage_errors.push(NotMeasured {
                what: "scale".into(),
                reason: format!("{e:#}"),
            }),
        }
    }
    report.machine.loadavg_end = bench::loadavg();
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    let svg = args.out.with_extension("svg");
    // Both plots lay text out with a registered font (plotters' ab_glyph).
    if let Err(e) = scale_plot::register_fonts().and_then(|()| plot::draw(&report, &svg)) {
        eprintln!("plot: {e}");
    }
    let png = scale::png_path(&args.out);
    if let Some(x) = &report.scale {
        if let Err(e) = scale_plot::draw(x, &png) {
            eprintln!("scale plot: {e}");
        }
    }
    let md = table(&report);
    std::fs::write(args.out.with_extension("md"), &md)
        .with_context(|| format!("write {}", args.out.with_extension("md").display()))?;
    println!("{md}");
    progress(
        start,
        &format!(
            "wrote {}, {}, {} (load {} → {})",
            args.out.display(),
            svg.display(),
            args.out.with_extension("md").display(),
            report.machine.loadavg_start,
            report.machine.loadavg_end
        ),
    );
    let ran = |s: Stage| args.stages.contains(&s);
    let ok = (!ran(Stage::Prog) || report.prog.as_ref().is_some_and(|p| !p.rows.is_empty()))
        && (!ran(Stage::Forward)
            || report
                .forward
                .as_ref()
                .is_some_and(|f| !f.forwarders.is_empty()))
        && (!ran(Stage::Sip)
            || report
                .sip
                .as_ref()
                .is_some_and(|x| x.runs.iter().any(|r| r.calls > 0)))
        && (!ran(Stage::Scale) || report.scale.as_ref().is_some_and(scale::complete));
    if !ok {
        eprintln!("a stage produced no figures: {:?}", report.stage_errors);
        std::process::exit(1);
    }
    Ok(())
}
