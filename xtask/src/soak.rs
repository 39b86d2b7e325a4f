//! `cargo xtask soak --minutes N` (issue #8): builds the agent and the
//! soak driver (`tests/src/bin/sip-edge-soak.rs`) and runs it: calls with
//! media through the edge for N minutes under a UDP spray over the media
//! range, stalled TLS handshakes and an INVITE flood from an attacker
//! namespace; it prints calls placed and failed, media loss, the agent's
//! RSS and fds at start and end, and fails if a call failed or fds leaked.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Result};

use crate::run;

pub fn soak(root: &Path, minutes: f64) -> Result<()> {
    if !(minutes > 0.0 && minutes <= 1440.0) {
        bail!("--minutes must be between 0 and 1440");
    }
    // The driver runs the agent binary built beside it (debug, as the
    // system tests do).
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
        "sip-edge-soak",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    run(Command::new(target.join("debug/sip-edge-soak"))
        .arg("--minutes")
        .arg(minutes.to_string()))
}
