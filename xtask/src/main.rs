//! `cargo xtask`: set-up, eBPF build, tests, demo and benchmarks for sip-edge.
//!
//! xtask deliberately does not depend on the `sip-edge` crate: that crate's
//! build script needs bpf-linker, which `cargo xtask setup` is what installs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod fuzz;
mod install;
mod kernels;
mod soak;

/// Debian packages the build and the tests need.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22 (matches nightly's LLVM).
    "llvm-22-dev",
    "libclang-22-dev",
    "libpolly-22-dev",
    // Inspecting maps, network namespaces, veth checksum offload.
    "bpftool",
    "iproute2",
    "ethtool",
    "util-linux",
];

/// Debian packages only `cargo xtask test` needs: the real peers of the
/// remote-user system test (tests/tests/remote_users.rs, issue #15),
/// Kamailio as the inside registrar over TLS and baresip as a remote user;
/// systemd for `systemd-analyze verify` of the unit (xtask/src/install.rs);
/// redis-server for the HA test (tests/tests/ha.rs); linphone-cli
/// (linphonec) as a second client stack of the softphone interop tests
/// (tests/tests/softphones.rs, issue #9).
const TEST_APT_PACKAGES: &[&str] = &[
    "kamailio",
    "kamailio-tls-modules",
    "baresip-core",
    // tests/tests/observability.rs scrapes the agent with a real server.
    "prometheus",
    "systemd",
    // tests/tests/ha.rs: the store two edge nodes share (issue #11).
    "redis-server",
    "linphone-cli",
    // tests/tests/udp_softphones.rs: Kamailio as an RFC 5626 registrar.
    "kamailio-outbound-modules",
];

/// Debian packages only `cargo xtask bench` needs: the peers it measures
/// sip-edge against (issue #4).
const BENCH_APT_PACKAGES: &[&str] = &[
    "nftables",
    "rtpengine-daemon",
    "kamailio",
    "kamailio-tls-modules",
    // The scale stage's PNG rasterises its text from DejaVu Sans (plotters'
    // ab_glyph: no fontconfig).
    "fonts-dejavu-core",
];

/// The toolchain the eBPF crate is built with (DESIGN.md §4).
const NIGHTLY: &str = "nightly";
/// bpf-linker release known to build against Debian's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The objects `build-ebpf` writes (cargo bin name, stable path): the
/// datapath the agent embeds, and the harness programs of tests and benches.
const EBPF_OBJECTS: &[(&str, &str)] = &[
    ("sip-edge", "target/bpf/sip-edge.bpf.o"),
    ("sip-edge-harness", "target/bpf/sip-edge-harness.bpf.o"),
];

#[derive(Parser)]
#[command(name = "xtask", about = "sip-edge development tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the build and the tests need (idempotent).
    Setup,
    /// Build the XDP objects (BTF, unstripped) to target/bpf/: sip-edge.bpf.o
    /// (the datapath) and sip-edge-harness.bpf.o (test and bench programs).
    BuildEbpf,
    /// Set up, build, and run every test; ends with `N passed, N failed`.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the demo: namespaces, agent, traffic through XDP.
    Demo {
        /// Two real baresip softphones (Debian's baresip-core) place the
        /// call instead of the built-in user agents.
        #[arg(long)]
        baresip: bool,
    },
    /// Set up (plus the bench peers), build in release and run the
    /// benchmark suite: JSON report, SVG plot and Markdown table.
    Bench {
        /// Small sizes and counts (about 3 minutes); checks only that every
        /// stage produces figures.
        #[arg(long)]
        quick: bool,
        /// JSON report path (the plot and table go beside it).
        #[arg(long, default_value = "target/bench/bench.json")]
        out: PathBuf,
        /// Only these stages, comma-separated (prog, forward, sip, scale).
        #[arg(long)]
        stages: Option<String>,
    },
    /// Kernel support matrix: boot Debian's 6.1 and 6.12 cloud kernels
    /// under qemu, load the XDP program and run the verifier and fixture
    /// tests in each (and on the host); table + target/kernels/report.json.
    Kernels,
    /// Run the cargo-fuzz targets of fuzz/ (or one) for a bounded time
    /// each, seeded from the test fixtures; a table of runs and verdicts.
    Fuzz {
        /// A target name, or `all`.
        target: String,
        /// Seconds of fuzzing per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
    },
    /// Build in release and install the agent as a systemd service: the
    /// binary, packaging/sip-edge.service and, unless one exists, the
    /// example configuration as /etc/sip-edge/sip-edge.toml.
    Install {
        /// Prefix of the binary (PREFIX/bin/sip-edge).
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Write everything below this directory (DESTDIR).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Install this binary instead of building one.
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// Calls with media through the edge for N minutes under a UDP spray,
    /// stalled handshakes and an INVITE flood; fails if a call failed or
    /// the agent's fds leaked.
    Soak {
        /// Minutes of calls.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => {
            setup()?;
            build_ebpf(&root)
        }
        Cmd::Test { args } => {
            setup()?;
            apt_install(TEST_APT_PACKAGES)?;
            test(&root, &args)
        }
        Cmd::Demo { baresip } => {
            setup()?;
            if baresip {
                apt_install(&["baresip-core"])?;
            }
            demo(&root, baresip)
        }
        Cmd::Bench { quick, out, stages } => {
            setup()?;
            apt_install(BENCH_APT_PACKAGES)?;
            bench(&root, quick, &out, stages.as_deref())
        }
        Cmd::Kernels => {
            setup()?;
            kernels::kernels(&root)
        }
        Cmd::Fuzz { target, time } => {
            setup()?;
            fuzz::fuzz(&root, &target, time)
        }
        Cmd::Install {
            prefix,
            root: dest,
            bin,
        } => install::install(
            &root,
            &install::Options {
                prefix,
                root: dest,
                bin,
            },
        )
        .map(|_| ()),
        Cmd::Soak { minutes } => {
            setup()?;
            soak::soak(&root, minutes)
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(dir
        .parent()
        .context("xtask has no parent directory")?
        .to_owned())
}

fn step(msg: &str) {
    eprintln!("xtask: {msg}");
}

fn run(cmd: &mut Command) -> Result<()> {
    step(&format!("running {cmd:?}"));
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// Install the Debian packages of `list` that are missing (idempotent).
fn apt_install(list: &[&str]) -> Result<()> {
    let missing: Vec<&str> = list
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step(&format!(
            "apt packages ({}): all present, skipping",
            list.join(" ")
        ));
    } else {
        step(&format!("apt packages: installing {}", missing.join(" ")));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// Idempotent set-up: prints what it does and what it skips.
fn setup() -> Result<()> {
    // 1. Debian packages.
    apt_install(APT_PACKAGES)?;
    // 2. rust-src for the nightly toolchain (build-std=core).
    let comps = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .context("rustup not found")?;
    if String::from_utf8_lossy(&comps.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        step("rust-src (nightly): present, skipping");
    } else {
        step("rust-src (nightly): installing");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    // 3. bpf-linker built against LLVM 22.
    let linker = Command::new("bpf-linker").arg("--version").output();
    let have = matches!(&linker, Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if have {
        step(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: present, skipping"
        ));
    } else {
        step(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: building against LLVM 22 (about 2 minutes)"
        ));
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", path))?;
    }
    // bpf-linker must be on PATH for rustc: cargo's bin dir may not be.
    let bin = cargo_bin_dir();
    let path = std::env::var("PATH").unwrap_or_default();
    if !path.split(':').any(|p| Path::new(p) == bin) {
        // SAFETY-free: single-threaded at this point; children inherit it.
        std::env::set_var("PATH", format!("{}:{path}", bin.display()));
    }
    // 4. bpffs.
    if is_bpffs("/sys/fs/bpf") {
        step("bpffs: mounted at /sys/fs/bpf, skipping");
    } else {
        step("bpffs: mounting at /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

fn is_bpffs(path: &str) -> bool {
    // `stat -f -c %T` prints "bpf_fs" on bpffs.
    Command::new("stat")
        .args(["-f", "-c", "%T", path])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "bpf_fs")
        .unwrap_or(false)
}

/// Build the eBPF crate exactly as the agent's build.rs (aya-build) does,
/// and copy the object to a stable path for bpftool / llvm-objdump.
fn build_ebpf(root: &Path) -> Result<()> {
    let target_dir = root.join("target/ebpf");
    let mut flags = String::new();
    for (i, f) in [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            flags.push('\x1f');
        }
        flags.push_str(f);
    }
    run(Command::new("rustup")
        .args([
            "run",
            NIGHTLY,
            "cargo",
            "build",
            "-p",
            "sip-edge-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS"))?;
    for (bin, path) in EBPF_OBJECTS {
        let built = target_dir.join("bpfel-unknown-none/release").join(bin);
        let out = root.join(path);
        std::fs::create_dir_all(out.parent().context("no parent")?)?;
        std::fs::copy(&built, &out)
            .with_context(|| format!("copy {} -> {}", built.display(), out.display()))?;
        step(&format!("wrote {}", out.display()));
    }
    Ok(())
}

/// Totals of a `cargo test` run, from its `test result:` lines.
#[derive(Default, Debug)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

fn parse_result_line(line: &str, t: &mut Totals) {
    // "test result: ok. 26 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; ..."
    let Some(rest) = line.split("test result:").nth(1) else {
        return;
    };
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        let n = words.iter().find_map(|w| w.parse::<u64>().ok());
        if let Some(n) = n {
            if part.contains("passed") {
                t.passed += n;
            } else if part.contains("failed") {
                t.failed += n;
            } else if part.contains("ignored") {
                t.ignored += n;
            }
        }
    }
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    run(Command::new("cargo").args(["build", "--locked", "--all-targets"]))?;
    // Privileged tests that cannot run append "test: reason" lines here;
    // they are reported as skipped, not passed.
    let skip_log = root.join("target/skipped-tests.log");
    let _ = std::fs::remove_file(&skip_log);
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--locked", "--no-fail-fast"])
        .env("SIP_EDGE_SKIP_LOG", &skip_log);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    step(&format!("running {cmd:?}"));
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .context("spawning cargo test")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    let mut t = Totals::default();
    for line in stdout.lines() {
        parse_result_line(line, &mut t);
    }
    let skipped: BTreeMap<String, String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split_once(": ")
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
        })
        .collect();
    for (name, why) in &skipped {
        println!("SKIPPED {name}: {why}");
    }
    let skipped_n = skipped.len() as u64;
    let passed = t.passed.saturating_sub(skipped_n);
    println!(
        "{passed} passed, {} failed, {} skipped",
        t.failed,
        skipped_n + t.ignored
    );
    if !out.status.success() || t.failed > 0 {
        bail!("tests failed");
    }
    if t.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Build the bench binary in release (the forward stage's paced sender
/// runs in userspace) and run it; it prints progress for every step.
fn bench(root: &Path, quick: bool, out: &Path, stages: Option<&str>) -> Result<()> {
    run(Command::new("cargo").args([
        "build",
        "--locked",
        "--release",
        "-p",
        "sip-edge-tests",
        "--bin",
        "sip-edge-bench",
        // The sip stage runs the agent binary next to the bench binary.
        "-p",
        "sip-edge",
        "--bin",
        "sip-edge",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let mut cmd = Command::new(target.join("release/sip-edge-bench"));
    cmd.arg("--out").arg(out);
    if quick {
        cmd.arg("--quick");
    }
    if let Some(s) = stages {
        cmd.arg("--stages").arg(s);
    }
    run(&mut cmd)
}

fn demo(root: &Path, baresip: bool) -> Result<()> {
    // The demo binary runs the agent binary built beside it.
    run(Command::new("cargo").args([
        "build",
        "--locked",
        "-p",
        "sip-edge",
        "--bin",
        "sip-edge",
        "-p",
        "sip-edge-tests",
        "--bin",
        "sip-edge-demo",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let mut cmd = Command::new(target.join("debug/sip-edge-demo"));
    if baresip {
        cmd.arg("--baresip");
    }
    run(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_summed() {
        let mut t = Totals::default();
        parse_result_line("test result: ok. 26 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.02s", &mut t);
        parse_result_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
            &mut t,
        );
        parse_result_line("running 3 tests", &mut t);
        assert_eq!((t.passed, t.failed, t.ignored), (29, 2, 1));
    }
}
