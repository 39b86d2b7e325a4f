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
    logging::LogFormat,
};

const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format.or_else(|| match &cli.command {
        Command::Run { config } => sip_edge::logging::format_in(config),
        _ => None,
    });
    let set_log = sip_edge::logging::init(&cli.log, format.unwrap_or_default());
    match cli.command {
        Command::Run { config } => {
            sip_edge::status::set_config_path(&config);
            // The whole check-config first (TLS files, interfaces, bpffs,
            // listeners): a bad file exits 64 before the kernel is touched.
            let report = Report::of_file(&config, Options::default(), &RealHost);
            if format == Some(LogFormat::Json) && !report.has_errors() {
                // Every stderr line of a JSON-logging agent is JSON.
                for f in &report.findings {
                    tracing::warn!(config = %config.display(), finding = %f, "check-config");
                }
            } else if report.has_errors() || !report.findings.is_empty() {
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
            if let Some(f) = &cfg.agent.log {
                if let Err(e) = set_log(f) {
                    eprintln!("sip-edge: [agent] log {f:?}: {e}");
                }
            }
            let run = async {
                let (stops, hangups) = signals();
                let svc = sip_edge::agent::Service {
                    stops,
                    hangups,
                    config_path: Some(config.clone()),
                    set_log: Some(set_log),
                    default_log: cli.log.clone(),
                };
                sip_edge::agent::run_service(cfg, svc).await
            };
            match rt.block_on(run) {
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
        Command::Status(opts) => print_or_fail(sip_edge::status::status(&opts)),
        Command::Calls(opts) => print_or_fail(sip_edge::status::calls(&opts)),
        Command::Pinholes(opts) => print_or_fail(sip_edge::status::pinholes(&opts)),
        Command::Reload(opts) => match cli::reload(&opts) {
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sip-edge: {e}");
                ExitCode::FAILURE
            }
        },
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

fn print_or_fail<E: std::fmt::Display>(r: Result<String, E>) -> ExitCode {
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

/// SIGTERM and SIGINT as stop requests (the first drains calls, the
/// second stops at once: `agent::Service`), SIGHUP as reload requests.
/// Without signal handlers, ctrl-c is the only way out.
fn signals() -> (
    tokio::sync::mpsc::Receiver<()>,
    tokio::sync::mpsc::Receiver<()>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let (stop_tx, stops) = tokio::sync::mpsc::channel(4);
    let (hup_tx, hangups) = tokio::sync::mpsc::channel(4);
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(mut t), Ok(mut i), Ok(mut h)) => {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = t.recv() => { let _ = stop_tx.try_send(()); }
                        _ = i.recv() => { let _ = stop_tx.try_send(()); }
                        _ = h.recv() => { let _ = hup_tx.try_send(()); }
                    }
                }
            });
        }
        _ => {
            eprintln!("sip-edge: cannot install signal handlers; only ctrl-c stops the agent");
            tokio::spawn(async move {
                let _keep = hup_tx;
                while tokio::signal::ctrl_c().await.is_ok() {
                    let _ = stop_tx.try_send(());
                }
            });
        }
    }
    (stops, hangups)
}
