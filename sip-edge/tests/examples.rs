//! The configuration files shipped in the repository stay true:
//! `sip-edge.example.toml` shows no required key as a commented default
//! (issue #15), and the README's deployment example
//! (`examples/remote-worker.toml`) passes the whole check on a host shaped
//! like the one it describes, with certificates made for its names.

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use sip_edge::config::{
    check::{Host, Options, Report},
    Config,
};

fn manifest(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A commented `key = value` line or `[table]` header, uncommented.
fn uncomment(line: &str) -> Option<String> {
    let rest = line.strip_prefix("# ")?;
    let is_header = rest.starts_with('[')
        && rest.trim_end().ends_with(']')
        && rest
            .trim_end()
            .chars()
            .all(|c| c.is_ascii_lowercase() || "[]._".contains(c));
    let is_key = rest.split_once(" = ").is_some_and(|(k, _)| {
        !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
    });
    (is_header || is_key).then(|| rest.to_owned())
}

/// Whether an uncommented key line is marked required (its trailing
/// comment starts with "required").
fn marked_required(line: &str) -> bool {
    line.split_once('#')
        .is_some_and(|(_, c)| c.trim_start().starts_with("required"))
}

#[test]
fn the_example_config_shows_no_required_key_as_a_commented_default() {
    let text = std::fs::read_to_string(manifest("sip-edge.example.toml")).expect("example");
    // Every commented key and table turned on: the whole file still parses.
    let lines: Vec<(String, bool)> = text
        .lines()
        .map(|l| match uncomment(l) {
            Some(u) => (u, true),
            None => (l.to_owned(), false),
        })
        .collect();
    let full = |skip: Option<usize>| {
        lines
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .map(|(_, (l, _))| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    Config::from_toml(&full(None)).expect("the example with every key turned on must be valid");
    let mut checked = 0;
    for (i, (line, was_commented)) in lines.iter().enumerate() {
        if !was_commented || line.starts_with('[') {
            continue;
        }
        let key = line.split(" = ").next().unwrap_or_default();
        let without = Config::from_toml(&full(Some(i)));
        if marked_required(line) {
            // Required outright (serde's missing field) or by another key
            // of its table (a validation error naming it).
            let e = without.expect_err(line).to_string();
            assert!(
                e.contains(&format!("missing field `{key}`")) || e.contains(&format!(".{key}:")),
                "{key} is marked required but its absence says: {e}"
            );
        } else {
            assert!(
                without.is_ok(),
                "`{key}` is shown as a commented default but is required: mark it `# required` ({:?})",
                without.err().map(|e| e.to_string())
            );
        }
        checked += 1;
    }
    assert!(checked > 30, "only {checked} commented keys found");
}

/// A host with the example's interfaces and addresses.
struct EdgeHost;

impl Host for EdgeHost {
    fn interfaces(&self) -> io::Result<Vec<String>> {
        Ok(vec!["lo".into(), "int0".into(), "ext0".into()])
    }
    fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        Ok(["127.0.0.1", "10.20.0.1", "203.0.113.10"]
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect())
    }
    fn bpffs(&self, dir: &Path) -> Result<(), String> {
        dir.starts_with("/sys/fs/bpf")
            .then_some(())
            .ok_or_else(|| "not bpffs".to_owned())
    }
    fn nonlocal_bind(&self, _v6: bool) -> bool {
        false
    }
}

/// Certificates for the example's names in `dir`: the edge's, its key
/// (mode 600) and the CA.
fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    let ca_key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "Example CA");
    let ca = p.self_signed(&ca_key).expect("ca");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["sip.example.com".to_owned(), "10.20.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("cert");
    let (c, k, r) = (
        dir.join("edge.pem"),
        dir.join("edge.key"),
        dir.join("ca-roots.pem"),
    );
    std::fs::write(&c, cert.pem()).expect("write");
    std::fs::write(&k, key.serialize_pem()).expect("write");
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(&r, ca.pem()).expect("write");
    (c, k, r)
}

#[test]
fn the_deployment_example_passes_the_whole_check() {
    let example = manifest("examples/remote-worker.toml");
    let text = std::fs::read_to_string(&example).expect("example");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, roots) = pki(dir.path());
    let text = text
        .replace("/etc/sip-edge/edge.pem", &cert.display().to_string())
        .replace("/etc/sip-edge/edge.key", &key.display().to_string())
        .replace("/etc/sip-edge/ca-roots.pem", &roots.display().to_string());
    let path = dir.path().join("remote-worker.toml");
    std::fs::write(&path, text).expect("write");
    let r = Report::of_file(&path, Options::default(), &EdgeHost);
    assert!(
        r.invalid.is_none() && r.findings.is_empty(),
        "{}",
        r.render()
    );
    // As shipped, checked away from the edge.
    let out = Command::new(env!("CARGO_BIN_EXE_sip-edge"))
        .args(["check-config", "--no-host-checks", "--config"])
        .arg(&example)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
