//! `cargo xtask install` as a command: into a DESTDIR (`--root`), with a
//! prebuilt binary (`--bin`, no release build here), never touching the
//! real /etc.

use std::process::Command;

#[test]
fn cargo_xtask_install_lays_out_the_files_under_a_destdir() {
    let root = std::env::temp_dir().join(format!("xtask-cli-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("scratch");
    let bin = root.join("sip-edge-built");
    std::fs::write(&bin, b"#!/bin/sh\n").expect("fake binary");
    let dest = root.join("dest");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["install", "--prefix", "/usr/local", "--root"])
        .arg(&dest)
        .arg("--bin")
        .arg(&bin)
        .output()
        .expect("run xtask install");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = dest.join("etc/systemd/system/sip-edge.service");
    let config = dest.join("etc/sip-edge/sip-edge.toml");
    for p in [dest.join("usr/local/bin/sip-edge"), unit.clone(), config] {
        assert!(p.is_file(), "{} missing", p.display());
    }
    let text = std::fs::read_to_string(unit).expect("unit");
    assert!(text.contains("Type=notify"), "{text}");
    assert!(
        text.contains("ExecStart=/usr/local/bin/sip-edge run"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
