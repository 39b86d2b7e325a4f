//! `sip-edge` binary: parses the command line, sets up logging and hands
//! over to the library. Exit codes: 0 ok, 1 runtime error or a failed
//! `doctor` check, 64 bad config or usage (EX_USAGE): `run` runs the whole
//! `check-config` first, so a bad file exits 64 before anything is loaded
//! or attached.

use std::process::ExitCode;

use clap::Parser;
use sip_edge::{
    cli::{self, Cli, Command},
    config::{
        check::{Options, RealHost, Report},
        Config,
    },
    doctor::{self as host_doctor, RealProbe, Status},
};

const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run { config } => {
            // The whole check-config first (TLS files, interfaces, bpffs,
            // listeners): a bad file exits 64 before the kernel is touched.
            let report = Report::of_file(&config, Options::default(), &RealHost);
            if report.has_errors() || !report.findings.is_empty() {
                eprint!("{}", report.render());
            }
            let Some(cfg) = report.into_config() else {
                return ExitCode::from(EX_USAGE);
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("sip-edge: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(sip_edge::agent::run(cfg, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "sip-edge: {}",
                        anyhow::Error::from(e)
                            .chain()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(": ")
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig {
            config,
            no_host_checks,
            host,
        } => {
            let opts = Options {
                host_checks: !no_host_checks,
            };
            let report = Report::of_file(&config, opts, &RealHost);
            if report.has_errors() {
                eprint!("{}", report.render());
                return ExitCode::from(EX_USAGE);
            }
            print!("{}", report.render());
            match (host, report.config) {
                (true, Some(cfg)) => doctor(&cfg, false),
                _ => ExitCode::SUCCESS,
            }
        }
        Command::Doctor { config, json } => match Config::from_file(&config) {
            Ok(cfg) => doctor(&cfg, json),
            Err(e) => {
                eprintln!("sip-edge: {e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Pinhole { action } => print_or_fail(cli::pinhole(&action)),
        Command::Stats(opts) => print_or_fail(cli::stats(&opts)),
        Command::HaStatus(opts) => match cli::ha_status(&opts) {
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sip-edge: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Registrations(opts) => match cli::registrations(&opts) {
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sip-edge: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `doctor`: prints every host check; exit 1 when one fails.
fn doctor(cfg: &Config, json: bool) -> ExitCode {
    let checks = host_doctor::run(cfg, &RealProbe);
    if json {
        print!("{}", host_doctor::render_json(&checks));
    } else {
        print!("{}", host_doctor::render(&checks));
    }
    if checks.iter().any(|c| c.status == Status::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_or_fail(r: Result<String, sip_edge::datapath::maps::MapsError>) -> ExitCode {
    match r {
        Ok(s) => {
            print!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sip-edge: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {},
                _ = i.recv() => {},
            }
        }
        _ => {
            // Without signal handlers, ctrl-c is the only way out.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
