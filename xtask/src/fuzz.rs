//! `cargo xtask fuzz TARGET|all --time S`: runs the cargo-fuzz (libFuzzer)
//! targets of `fuzz/` for a bounded time each, seeded from the repository's
//! fixtures, and reports runs, time and the verdict per target. Installs
//! cargo-fuzz itself; the targets build with nightly and AddressSanitizer.
//!
//! Corpora live under `target/fuzz/corpus/TARGET` (grown by every run, never
//! committed); a crash leaves its input under `fuzz/artifacts/TARGET/` and
//! fails the command, with the line that replays it.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{run, step, NIGHTLY};

/// cargo-fuzz release used (it builds on the stable toolchain).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target with the fixture directories or files that seed it.
pub const TARGETS: &[(&str, &[&str])] = &[
    (
        "framer",
        &[
            "sip-edge/tests/fixtures/sip",
            "sip-edge/tests/fixtures/torture",
        ],
    ),
    (
        "message",
        &[
            "sip-edge/tests/fixtures/sip",
            "sip-edge/tests/fixtures/torture",
        ],
    ),
    ("sdp", &["sip-edge/tests/fixtures/sdp"]),
    ("multipart", &[]),
    (
        "msmsgs",
        &["sip-edge/tests/fixtures/sip/winmsgr_msmsgsinvite_accept.sip"],
    ),
    ("media_offer_answer", &[]),
    ("proxy_sequence", &[]),
];

/// One target's outcome.
struct Outcome {
    target: &'static str,
    runs: Option<u64>,
    secs: f64,
    crash: Option<String>,
}

fn ensure_cargo_fuzz() -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        step("cargo-fuzz: present, skipping");
        return Ok(());
    }
    step(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}: installing"));
    run(Command::new("cargo").args([
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// Copy the seed fixtures of `target` into its corpus directory.
fn seed(root: &Path, target: &str, seeds: &[&str], corpus: &Path) -> Result<()> {
    std::fs::create_dir_all(corpus).with_context(|| format!("mkdir {}", corpus.display()))?;
    for s in seeds {
        let p = root.join(s);
        let files: Vec<std::path::PathBuf> = if p.is_dir() {
            std::fs::read_dir(&p)
                .with_context(|| format!("read {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                // Messages only: the torture directory also holds its
                // table (`corpus.rs`).
                .filter(|f| f.is_file() && f.extension().is_none_or(|e| e != "rs"))
                .collect()
        } else {
            vec![p]
        };
        for f in files {
            let name = f.file_name().context("seed without a name")?;
            let dst = corpus.join(format!("seed-{}", name.to_string_lossy()));
            std::fs::copy(&f, &dst)
                .with_context(|| format!("seed {target}: {} -> {}", f.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// libFuzzer's closing "Done N runs in S second(s)" line.
fn runs_of(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix("Done "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The artifact libFuzzer wrote for a crash ("Test unit written to PATH").
fn artifact_of(log: &str) -> Option<String> {
    log.lines().find_map(|l| {
        l.split_once("Test unit written to ")
            .map(|(_, p)| p.trim().to_owned())
    })
}

fn fuzz_one(root: &Path, target: &'static str, seeds: &[&str], secs: u64) -> Result<Outcome> {
    let corpus = root.join("target/fuzz/corpus").join(target);
    seed(root, target, seeds, &corpus)?;
    step(&format!("fuzz {target}: {secs} s"));
    let started = Instant::now();
    let out = Command::new("rustup")
        .args(["run", NIGHTLY, "cargo", "fuzz", "run", "-O", target])
        .arg(&corpus)
        .args([
            "--",
            &format!("-max_total_time={secs}"),
            "-rss_limit_mb=4096",
            "-max_len=8192",
            "-print_final_stats=1",
        ])
        .current_dir(root.join("fuzz"))
        .env_remove("RUSTFLAGS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("spawning cargo fuzz run {target}"))?;
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let log_path = root.join("target/fuzz").join(format!("{target}.log"));
    std::fs::write(&log_path, &log).with_context(|| format!("write {}", log_path.display()))?;
    let crash = (!out.status.success()).then(|| {
        artifact_of(&log).unwrap_or_else(|| format!("no artifact; see {}", log_path.display()))
    });
    if let Some(c) = &crash {
        // The panic message and the first frames say what broke.
        for l in log
            .lines()
            .skip_while(|l| !l.contains("panicked at") && !l.contains("ERROR: AddressSanitizer"))
            .take(30)
        {
            eprintln!("  {l}");
        }
        eprintln!("  replay: (cd fuzz && cargo +nightly fuzz run -O {target} {c})");
    }
    Ok(Outcome {
        target,
        runs: runs_of(&log),
        secs: started.elapsed().as_secs_f64(),
        crash,
    })
}

/// Run `which` ("all" or a target name) for `secs` seconds each.
pub fn fuzz(root: &Path, which: &str, secs: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    let chosen: Vec<&(&str, &[&str])> = TARGETS
        .iter()
        .filter(|(t, _)| which == "all" || *t == which)
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
        bail!(
            "no fuzz target {which:?}; targets: all, {}",
            names.join(", ")
        );
    }
    std::fs::create_dir_all(root.join("target/fuzz")).context("mkdir target/fuzz")?;
    // One build for every target first, so the time limit is fuzzing time.
    run(Command::new("rustup")
        .args(["run", NIGHTLY, "cargo", "fuzz", "build", "-O"])
        .current_dir(root.join("fuzz"))
        .env_remove("RUSTFLAGS"))?;
    let mut outcomes = Vec::new();
    for (t, seeds) in chosen {
        outcomes.push(fuzz_one(root, t, seeds, secs)?);
    }
    println!("\n| target | runs | seconds | result |\n|---|---:|---:|---|");
    for o in &outcomes {
        println!(
            "| {} | {} | {:.0} | {} |",
            o.target,
            o.runs.map_or_else(|| "?".into(), |n| n.to_string()),
            o.secs,
            o.crash
                .as_deref()
                .map_or_else(|| "clean".to_owned(), |c| format!("CRASH {c}"))
        );
    }
    let crashed = outcomes.iter().filter(|o| o.crash.is_some()).count();
    if crashed > 0 {
        bail!("{crashed} fuzz target(s) crashed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_summary_lines_are_read() {
        let log = "#1024 pulse\nDone 231784 runs in 61 second(s)\nstat::number_of_executed_units: 231784\n";
        assert_eq!(runs_of(log), Some(231_784));
        assert_eq!(runs_of("no summary"), None);
        let crash = "==1== ERROR: libFuzzer: deadly signal\nartifact_prefix='a/'; Test unit written to fuzz/artifacts/x/crash-1\n";
        assert_eq!(
            artifact_of(crash).as_deref(),
            Some("fuzz/artifacts/x/crash-1")
        );
    }

    #[test]
    fn every_target_has_a_bin_in_the_fuzz_manifest() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let manifest =
            std::fs::read_to_string(root.join("fuzz/Cargo.toml")).expect("fuzz manifest");
        for (t, seeds) in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "{t} missing from fuzz/Cargo.toml"
            );
            for s in *seeds {
                assert!(root.join(s).exists(), "seed {s} of {t} is missing");
            }
        }
    }
}
