//! The benchmark suite behind `sip-edge-bench` / `cargo xtask bench`
//! (issue #4, DESIGN.md §6): `prog` times the XDP program with
//! BPF_PROG_TEST_RUN per path and table size, `forward` pushes live frames
//! through the edge of a namespace topology against peer forwarders, `sip`
//! places TLS calls through sip-edge and through Kamailio, `scale` measures
//! how sip-edge's cost grows with held calls and pinholes. Everything is
//! reported in one JSON document (`Report`) plus an SVG plot (and the scale
//! stage's PNG); ratios are always against peers measured in the same run.

pub mod forward;
pub mod plot;
pub mod prog;
pub mod scale;
pub mod scale_plot;
pub mod sip;
pub mod writer;

use std::time::Instant;

use serde::Serialize;

/// Errors of the benchmark stages.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The namespace used by `prog` could not be built.
    #[error(transparent)]
    Netns(#[from] crate::fixtures::netns::NetnsError),
    /// The forwarding topology failed.
    #[error(transparent)]
    Testnet(#[from] crate::testnet::TestnetError),
    /// Loading the datapath object failed.
    #[error(transparent)]
    Load(#[from] sip_edge::datapath::loader::LoadError),
    /// The map writer failed.
    #[error(transparent)]
    Maps(#[from] sip_edge::datapath::maps::MapsError),
    /// A test packet could not be built.
    #[error(transparent)]
    Packet(#[from] crate::fixtures::packet::PacketError),
    /// A fixture-runner helper failed.
    #[error(transparent)]
    Fixture(#[from] crate::fixtures::FixtureError),
    /// A program is missing, failed to load/attach, or a test run failed.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// aya's error.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A program is not in the object.
    #[error("program {name} is not in the datapath object")]
    MissingProgram {
        /// Program name.
        name: &'static str,
    },
    /// A map is missing or an operation on it failed.
    #[error("map {name}: {detail}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What failed.
        detail: String,
    },
    /// An I/O operation (file, socket, process) failed.
    #[error("{op}: {source}")]
    Io {
        /// What was attempted.
        op: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Writing the plot failed.
    #[error("plot {path}: {detail}")]
    Plot {
        /// Output path.
        path: String,
        /// What failed.
        detail: String,
    },
}

/// Build an `Io` error mapper.
pub fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let op = op.into();
    move |source| BenchError::Io { op, source }
}

/// Progress line on stderr with the time since the run started.
pub fn progress(start: Instant, msg: &str) {
    eprintln!("[{:>6.1}s] {msg}", start.elapsed().as_secs_f64());
}

/// How long and how wide a run is.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Mode {
    /// `--quick`: smallest sizes and counts, checks only that every stage
    /// produces figures.
    pub quick: bool,
}

/// A figure that could not be measured, and why (never a made-up number).
#[derive(Clone, Debug, Serialize)]
pub struct NotMeasured {
    /// What it would have been.
    pub what: String,
    /// Why not.
    pub reason: String,
}

/// The machine the run happened on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// `uname -srvm`.
    pub uname: String,
    /// /proc/loadavg at the start of the run.
    pub loadavg_start: String,
    /// /proc/loadavg at the end.
    pub loadavg_end: String,
    /// Kernel clocksource.
    pub clocksource: String,
}

impl Machine {
    /// Read the description from /proc, /sys and uname.
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let uname = std::process::Command::new("uname")
            .arg("-srvm")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        Machine {
            cpu,
            cpus,
            uname,
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            clocksource: std::fs::read_to_string(
                "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            )
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        }
    }
}

/// /proc/loadavg's first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One run's every figure.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Report format version.
    pub format: u32,
    /// Seconds since the epoch at the start.
    pub started_unix: u64,
    /// Quick or full.
    pub mode: Mode,
    /// The exact command line.
    pub command: String,
    /// Machine description.
    pub machine: Machine,
    /// Program-cost stage.
    pub prog: Option<prog::ProgStage>,
    /// Forwarding stage.
    pub forward: Option<forward::ForwardStage>,
    /// Signalling stage.
    pub sip: Option<sip::SipStage>,
    /// How cost grows with held calls and pinholes (issue #12).
    pub scale: Option<scale::ScaleStage>,
    /// Stages that failed as a whole (the run continues with the next).
    pub stage_errors: Vec<NotMeasured>,
}

/// A small deterministic generator (xorshift64*) for random flow orders:
/// reproducible runs, no extra dependency.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (seed 0 is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
