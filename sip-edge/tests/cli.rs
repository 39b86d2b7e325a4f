//! The `sip-edge` binary's command-line contract: exit codes (64 for a bad
//! config, before anything is attached), help text, and clear errors when
//! no datapath is pinned. Unprivileged: nothing here touches BPF.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sip-edge");

fn example() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sip-edge.example.toml")
}

/// The example names interfaces this machine lacks: it is valid as a
/// file, checked as if on another machine.
#[test]
fn check_config_accepts_the_shipped_example() {
    let out = Command::new(BIN)
        .args(["check-config", "--no-host-checks", "--config"])
        .arg(example())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_config_exits_64_before_attaching() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(example())
        .expect("example")
        .replace("[media]", "[media]\nno_such_key = 1");
    std::fs::write(&bad, text).expect("write");
    for sub in ["check-config", "run"] {
        let out = Command::new(BIN)
            .args([sub, "--config"])
            .arg(&bad)
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            Some(64),
            "{sub}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no_such_key"),
            "{sub}: error does not name the key: {err}"
        );
    }
    let missing = dir.path().join("missing.toml");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&missing)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn help_explains_every_pinhole_flag() {
    let out = Command::new(BIN)
        .args(["pinhole", "add", "relay", "--help"])
        .output()
        .expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--client",
        "--edge-int",
        "--public",
        "--peer",
        "--proto",
        "--latch",
        "--learn-port",
        "--pin-dir",
        "--json",
    ] {
        assert!(help.contains(flag), "help lacks {flag}:\n{help}");
    }
}

#[test]
fn commands_without_a_datapath_say_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [vec!["stats"], vec!["pinhole", "list"]] {
        let out = Command::new(BIN)
            .args(&args)
            .arg("--pin-dir")
            .arg(dir.path())
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is the agent running"), "{args:?}: {err}");
    }
}

/// `doctor --json`: every check with its status and fix; a missing
/// interface fails (exit 1) instead of five unreadable sysctls. Read-only,
/// so it runs on whatever host the tests run on.
#[test]
fn doctor_prints_json_and_fails_on_a_missing_interface() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("doctor.toml");
    std::fs::write(
        &cfg,
        "[[interface]]\nname = \"se-nodoc0\"\nrole = \"external\"\n[addresses]\ninternal = []\npublic = [\"203.0.113.1\"]\n[media]\nport_ranges = [\"40000-40999\"]\n[signalling]\nports = [5061]\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["doctor", "--json", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let checks = v["checks"].as_array().expect("checks");
    let iface = checks
        .iter()
        .find(|c| c["check"] == "interface")
        .expect("interface check");
    assert_eq!(iface["status"], "FAIL");
    assert_eq!(iface["subject"], "se-nodoc0");
    assert!(
        !checks
            .iter()
            .any(|c| c["check"] == "forwarding" && c["subject"] == "se-nodoc0/ipv4"),
        "no per-interface checks for a missing interface: {v}"
    );
    for name in ["reserved_ports", "firewall", "bpf_jit"] {
        assert!(
            checks.iter().any(|c| c["check"] == name),
            "{name} missing: {v}"
        );
    }
    // check-config --host runs the doctor after the file checks.
    let out = Command::new(BIN)
        .args(["check-config", "--host", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(64),
        "the file check fails first (no such interface)"
    );
}
