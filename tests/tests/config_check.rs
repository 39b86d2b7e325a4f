//! Issue #15: `run` checks the whole config before touching the kernel. In
//! the demo topology's edge namespace, the demo config passes
//! `check-config`; the same config with the certificate and key swapped
//! makes `run` exit 64, and afterwards no XDP program is attached to the
//! edge's interfaces and the pin directory does not exist. (Before, `run`
//! attached and pinned the datapath, then failed to load TLS and exited 1,
//! leaving it attached.) Privileged: skipped with the reason elsewhere.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use sip_edge_tests::{
    testnet::{self, Pins, Topology},
    testua::{edge_config, TestPki},
};

/// Runs `cmd` to completion within `limit`, killing it otherwise.
fn run_bounded(mut cmd: std::process::Command, limit: Duration) -> (Option<i32>, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status.code(), text);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            return (
                None,
                format!(
                    "still running after {limit:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn xdp_attached(topo: &Topology, iface: &str) -> bool {
    testnet::sh(&[
        "ip", "-n", &topo.edge, "-j", "-d", "link", "show", "dev", iface,
    ])
    .map(|j| j.contains("\"xdp\""))
    .unwrap_or(false)
}

#[test]
fn run_refuses_a_bad_certificate_before_attaching_anything() {
    const NAME: &str = "config_check::run_refuses_a_bad_certificate_before_attaching_anything";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    let tag = format!("c{}", std::process::id());
    let topo = Topology::create(&tag).expect("create namespaces");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sip-edge-test-{tag}"));
    let _pins = Pins(pin_dir.clone());
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate(tmp.path()).expect("pki");
    let good = edge_config(&pin_dir, &pki, "relay");
    let write = |name: &str, text: &str| -> PathBuf {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).expect("write config");
        p
    };
    let agent = testnet::agent_bin();

    // Control: in this namespace the config is right, so what follows
    // fails for the certificate alone.
    let good_path = write("good.toml", &good);
    let mut cmd = topo.edge_cmd(&agent);
    cmd.args(["check-config", "--config"]).arg(&good_path);
    let (code, out) = run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(code, Some(0), "the demo config must pass here: {out}");

    let swap = |text: &str, a: &Path, b: &Path| {
        let (a, b) = (a.display().to_string(), b.display().to_string());
        text.replace(&a, "@A@").replace(&b, &a).replace("@A@", &b)
    };
    let bad_path = write("bad.toml", &swap(&good, &pki.edge_cert, &pki.edge_key));
    let mut cmd = topo.edge_cmd(&agent);
    cmd.args(["run", "--config"]).arg(&bad_path);
    let (code, out) = run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(code, Some(64), "run must refuse the file: {out}");
    assert!(
        out.contains("proxy.cert") && out.contains("swapped"),
        "the error names the key and the mistake: {out}"
    );
    for iface in ["int0", "ext0"] {
        assert!(
            !xdp_attached(&topo, iface),
            "XDP is attached to {iface} after a refused start"
        );
    }
    assert!(
        !pin_dir.exists(),
        "{} exists after a refused start",
        pin_dir.display()
    );
}
