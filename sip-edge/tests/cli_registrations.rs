//! `sip-edge registrations [--json]` as a client of the control socket:
//! a stand-in agent answers one canned registration on a Unix socket in a
//! tempdir; the binary must print it as a table and as the documented JSON
//! shape, and fail with a clear error when no agent listens.
//! Unprivileged.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixListener,
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_sip-edge");

const ANSWER: &str = r#"{"ok":true,"registrations":[{"aor":"alice@example.com","side":"outside","source":"198.51.100.2:40312","transport":"tls","flow":7,"flow_state":"up","contact":"sip:alice@192.168.1.5:5061;transport=tls","edge_contact":"sip:sef1@10.77.0.1:5061;transport=tls","expires_in_secs":3590}]}"#;

/// Answers `n` queries with `ANSWER`, checking each asks for registrations.
fn fake_agent(listener: UnixListener, n: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for _ in 0..n {
            let (s, _) = listener.accept().expect("accept");
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).expect("request");
            let v: serde_json::Value = serde_json::from_str(line.trim()).expect("request JSON");
            assert_eq!(v["query"], "registrations", "{line}");
            (&s).write_all(ANSWER.as_bytes()).expect("answer");
            (&s).write_all(b"\n").expect("answer");
        }
    })
}

#[test]
fn registrations_prints_json_and_a_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let agent = fake_agent(UnixListener::bind(&sock).expect("bind"), 2);
    let out = Command::new(BIN)
        .args(["registrations", "--json", "--socket"])
        .arg(&sock)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let r = &v["registrations"][0];
    for (key, want) in [
        ("aor", "alice@example.com"),
        ("side", "outside"),
        ("source", "198.51.100.2:40312"),
        ("transport", "tls"),
        ("flow_state", "up"),
    ] {
        assert_eq!(r[key], want, "{key}: {v}");
    }
    assert_eq!(r["flow"], 7);
    assert_eq!(r["expires_in_secs"], 3590);
    assert!(
        v.get("ok").is_none(),
        "the envelope stays inside the protocol"
    );
    let out = Command::new(BIN)
        .args(["registrations", "--socket"])
        .arg(&sock)
        .output()
        .expect("run");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("alice@example.com")
            && table.contains("198.51.100.2:40312")
            && table.contains("3590s"),
        "{table}"
    );
    agent.join().expect("fake agent");
}

#[test]
fn registrations_without_an_agent_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["registrations", "--socket"])
        .arg(dir.path().join("none.sock"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the agent"), "{err}");
}
