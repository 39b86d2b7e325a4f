//! `cargo xtask install`: builds the agent in release and installs it as a
//! systemd service: the binary under `PREFIX/bin`, the unit
//! `packaging/sip-edge.service` (its ExecStart pointed at that binary) in
//! `/etc/systemd/system`, and the example configuration as
//! `/etc/sip-edge/sip-edge.toml` unless a configuration is there already
//! (never overwritten: it is the admin's). `--root` is a DESTDIR: every
//! path is written below it, the unit still names the final paths (for
//! packaging, and for tests that must not touch the real /etc).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

/// Where the unit's text names the binary (replaced by `PREFIX/bin/sip-edge`).
const UNIT_BIN: &str = "/usr/local/bin/sip-edge";
/// The unit in the repository.
pub const UNIT_SRC: &str = "packaging/sip-edge.service";
/// The configuration installed when none exists.
pub const CONFIG_SRC: &str = "sip-edge/sip-edge.example.toml";

/// What `cargo xtask install` was asked.
#[derive(Debug, Clone)]
pub struct Options {
    /// Installation prefix of the binary (`/usr/local`).
    pub prefix: PathBuf,
    /// DESTDIR: prepended to every path written (`/` to install for real).
    pub root: PathBuf,
    /// An already built binary to install instead of building one.
    pub bin: Option<PathBuf>,
}

/// What was written, for the summary and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// The binary.
    pub bin: PathBuf,
    /// The unit.
    pub unit: PathBuf,
    /// The configuration, and whether it was written (false: one existed).
    pub config: (PathBuf, bool),
}

/// `root` + absolute `path`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The unit's text with ExecStart and friends pointed at `bin`.
pub fn unit_text(src: &str, bin: &Path) -> String {
    src.replace(UNIT_BIN, &bin.to_string_lossy())
}

/// Builds (unless `opts.bin`) and installs; prints what to do next.
pub fn install(root_dir: &Path, opts: &Options) -> Result<Installed> {
    let bin = match &opts.bin {
        Some(b) => b.clone(),
        None => {
            crate::setup()?;
            crate::run(Command::new("cargo").args([
                "build",
                "--release",
                "--locked",
                "-p",
                "sip-edge",
            ]))?;
            root_dir.join("target/release/sip-edge")
        }
    };
    let done = lay_out(root_dir, opts, &bin)?;
    crate::step(&format!(
        "installed {} and {}; configuration {} ({})",
        done.bin.display(),
        done.unit.display(),
        done.config.0.display(),
        if done.config.1 {
            "the example: edit interfaces, addresses and [proxy] before starting"
        } else {
            "kept as it was"
        }
    ));
    if opts.root == Path::new("/") {
        crate::step("next: sip-edge check-config --config /etc/sip-edge/sip-edge.toml && systemctl daemon-reload && systemctl enable --now sip-edge");
    }
    Ok(done)
}

/// Writes the files (no build): the binary, the unit and, if missing, the
/// configuration.
pub fn lay_out(root_dir: &Path, opts: &Options, bin: &Path) -> Result<Installed> {
    let final_bin = opts.prefix.join("bin/sip-edge");
    let bin_to = under(&opts.root, &final_bin);
    let unit_to = under(
        &opts.root,
        Path::new("/etc/systemd/system/sip-edge.service"),
    );
    let config_to = under(&opts.root, Path::new("/etc/sip-edge/sip-edge.toml"));
    for p in [&bin_to, &unit_to, &config_to] {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
    }
    // Into place by rename: a running agent's binary is never written over.
    let tmp = bin_to.with_extension("new");
    std::fs::copy(bin, &tmp)
        .with_context(|| format!("copy {} to {}", bin.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &bin_to).with_context(|| format!("install {}", bin_to.display()))?;
    let unit = std::fs::read_to_string(root_dir.join(UNIT_SRC)).context("read the unit")?;
    std::fs::write(&unit_to, unit_text(&unit, &final_bin))
        .with_context(|| format!("write {}", unit_to.display()))?;
    std::fs::set_permissions(&unit_to, std::fs::Permissions::from_mode(0o644))?;
    let wrote_config = !config_to.exists();
    if wrote_config {
        std::fs::copy(root_dir.join(CONFIG_SRC), &config_to)
            .with_context(|| format!("write {}", config_to.display()))?;
        // It will name the key file: readable by root and the group only.
        std::fs::set_permissions(&config_to, std::fs::Permissions::from_mode(0o640))?;
        if let Some(d) = config_to.parent() {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o750))?;
        }
    }
    Ok(Installed {
        bin: bin_to,
        unit: unit_to,
        config: (config_to, wrote_config),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    fn repo() -> PathBuf {
        crate::workspace_root().expect("root")
    }

    /// Writes "test: reason" for `cargo xtask test`'s skip count, as the
    /// system tests' `testnet::record_skip` does.
    fn record_skip(test: &str, reason: &str) {
        eprintln!("SKIPPED {test}: {reason}");
        if let Some(path) = std::env::var_os("SIP_EDGE_SKIP_LOG") {
            use std::io::Write as _;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{test}: {reason}");
            }
        }
    }

    #[test]
    fn install_lays_out_binary_unit_and_config_and_keeps_an_existing_config() {
        let root = scratch("install");
        let fake_bin = root.join("built-sip-edge");
        std::fs::write(&fake_bin, b"#!/bin/sh\n").expect("fake binary");
        let opts = Options {
            prefix: PathBuf::from("/opt/se"),
            root: root.join("dest"),
            bin: Some(fake_bin.clone()),
        };
        let done = install(&repo(), &opts).expect("install");
        let dest = root.join("dest");
        assert_eq!(done.bin, dest.join("opt/se/bin/sip-edge"));
        assert_eq!(
            std::fs::metadata(&done.bin)
                .expect("bin")
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        let unit = std::fs::read_to_string(dest.join("etc/systemd/system/sip-edge.service"))
            .expect("unit");
        assert!(
            unit.contains(
                "ExecStart=/opt/se/bin/sip-edge run --config /etc/sip-edge/sip-edge.toml"
            ),
            "{unit}"
        );
        assert!(
            !unit.contains(UNIT_BIN),
            "every mention of the binary follows the prefix"
        );
        let config = dest.join("etc/sip-edge/sip-edge.toml");
        assert_eq!(done.config, (config.clone(), true));
        assert_eq!(
            std::fs::read_to_string(&config).expect("config"),
            std::fs::read_to_string(repo().join(CONFIG_SRC)).expect("example")
        );
        // A second install never overwrites the admin's configuration.
        std::fs::write(&config, "# mine\n").expect("edit");
        let again = install(&repo(), &opts).expect("install again");
        assert!(!again.config.1);
        assert_eq!(
            std::fs::read_to_string(&config).expect("config"),
            "# mine\n"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_cli_takes_prefix_root_and_bin() {
        use clap::Parser as _;
        let cli = crate::Cli::try_parse_from([
            "xtask", "install", "--prefix", "/usr", "--root", "/tmp/x", "--bin", "/tmp/b",
        ])
        .expect("parse");
        match cli.cmd {
            crate::Cmd::Install { prefix, root, bin } => {
                assert_eq!(
                    (prefix, root, bin),
                    (
                        PathBuf::from("/usr"),
                        PathBuf::from("/tmp/x"),
                        Some(PathBuf::from("/tmp/b"))
                    )
                );
            }
            _ => panic!("not install"),
        }
    }

    /// `systemd-analyze verify` on the unit as installed (ExecStart at a
    /// binary that exists): no error and no warning (an unknown key is only
    /// a warning, so any output fails the test).
    #[test]
    fn systemd_analyze_verifies_the_unit() {
        const NAME: &str = "xtask::install::tests::systemd_analyze_verifies_the_unit";
        if Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_err()
        {
            record_skip(NAME, "systemd-analyze is not installed (Debian: systemd)");
            return;
        }
        let root = scratch("verify");
        let bin = root.join("sip-edge");
        std::fs::write(&bin, b"#!/bin/sh\n").expect("bin");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("mode");
        let src = std::fs::read_to_string(repo().join(UNIT_SRC)).expect("unit");
        let unit = root.join("sip-edge.service");
        std::fs::write(&unit, unit_text(&src, &bin)).expect("write unit");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .current_dir(&root)
            .output()
            .expect("run systemd-analyze");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&root);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify: {said}"
        );
    }
}
