//! `sip-edge` binary: parses the command line, sets up logging and hands
//! over to the library. Exit codes: 0 ok, 1 runtime error, 64 bad config or
//! usage (EX_USAGE).

use std::process::ExitCode;

use clap::Parser;
use sip_edge::{
    cli::{self, Cli, Command},
    config::Config,
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
            let cfg = match Config::from_file(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sip-edge: {e}");
                    return ExitCode::from(EX_USAGE);
                }
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
        Command::CheckConfig { config } => match Config::from_file(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sip-edge: {e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Pinhole { action } => print_or_fail(cli::pinhole(&action)),
        Command::Stats(opts) => print_or_fail(cli::stats(&opts)),
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
