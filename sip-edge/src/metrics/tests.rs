//! The exposition as Prometheus reads it: parse the text back into
//! (name, labels, value) samples and check what the hooks counted. The
//! registry is process-wide and tests run in parallel, so every check is a
//! delta or uses label values only this test writes.

use std::collections::BTreeMap;

use super::*;

/// One sample line: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// A strict reader of the OpenMetrics text format for what `render`
/// writes: `# TYPE/HELP/UNIT` lines, samples `name{k="v",...} value`, and
/// `# EOF` last. Panics on anything else, which fails the test.
fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" {
            assert!(lines.peek().is_none(), "text after # EOF");
            return (samples, types);
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            types.insert(name.to_owned(), ty.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value.parse().expect("numeric value");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l.strip_suffix('}').expect("closing brace");
                let mut map = BTreeMap::new();
                // Our label values never hold commas or quotes.
                for kv in l.split(',').filter(|s| !s.is_empty()) {
                    let (k, v) = kv.split_once('=').expect("k=v");
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .expect("quoted value");
                    map.insert(k.to_owned(), v.to_owned());
                }
                (n.to_owned(), map)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name {name:?}"
        );
        samples.push((name, labels, value));
    }
    panic!("no # EOF at the end:\n{text}");
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels.len() == l.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

#[test]
fn hooks_show_up_with_their_names_labels_and_values() {
    let (before, _) = parse(&render(None).expect("render"));
    let v0 = |name, labels: &[(&str, &str)]| value(&before, name, labels).unwrap_or(0.0);
    let calls0 = v0("sip_edge_calls_total", &[]);
    let reg0 = v0(
        "sip_edge_sip_requests_total",
        &[("side", "external"), ("method", "REGISTER")],
    );
    sip_request(Side::External, "register");
    sip_request(Side::External, "REGISTER");
    // A method nobody defined is not a label value of its own.
    sip_request(Side::Internal, "X-FLOOD-ABCDEF");
    sip_response(699, true);
    call_started();
    call_final(486);
    call_final(200);
    admission_refused("limits.test_rule", 503);
    connection_refused(Side::External, "limits.test_refusal");
    tls_handshake(false, Some("certificate"));
    tls_handshake(true, None);
    pinhole_refused("test-rule");
    pinhole_refused("test-rule");
    pinhole_installed(Duration::from_micros(120));
    pinholes_capacity(65536);

    let (samples, types) = parse(&render(None).expect("render"));
    let v = |name, labels: &[(&str, &str)]| value(&samples, name, labels);
    assert_eq!(
        types.get("sip_edge_sip_requests").map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        v(
            "sip_edge_sip_requests_total",
            &[("side", "external"), ("method", "REGISTER")]
        ),
        Some(reg0 + 2.0),
        "method names are case-folded onto the known set"
    );
    assert!(v(
        "sip_edge_sip_requests_total",
        &[("side", "internal"), ("method", "other")]
    )
    .is_some_and(|x| x >= 1.0));
    assert!(
        !samples
            .iter()
            .any(|(_, l, _)| l.values().any(|x| x.contains("FLOOD"))),
        "a peer's method name never becomes a label"
    );
    assert!(v(
        "sip_edge_sip_responses_total",
        &[("code", "699"), ("origin", "local")]
    )
    .is_some_and(|x| x >= 1.0));
    assert!(v("sip_edge_calls_total", &[]).is_some_and(|x| x >= calls0 + 1.0));
    assert!(v("sip_edge_calls_failed_total", &[("code", "486")]).is_some_and(|x| x >= 1.0));
    assert_eq!(
        v("sip_edge_calls_failed_total", &[("code", "200")]),
        None,
        "2xx is no failure"
    );
    assert_eq!(
        v(
            "sip_edge_admission_refused_total",
            &[("rule", "limits.test_rule"), ("code", "503")]
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "sip_edge_connections_refused_total",
            &[("side", "external"), ("rule", "limits.test_refusal")]
        ),
        Some(1.0)
    );
    assert!(v(
        "sip_edge_tls_handshakes_total",
        &[
            ("direction", "accepted"),
            ("result", "failed"),
            ("reason", "certificate")
        ]
    )
    .is_some_and(|x| x >= 1.0));
    assert_eq!(
        v("sip_edge_pinholes_refused_total", &[("rule", "test-rule")]),
        Some(2.0)
    );
    assert_eq!(v("sip_edge_pinholes_capacity", &[]), Some(65536.0));
    assert_eq!(
        types.get("sip_edge_pinholes_capacity").map(String::as_str),
        Some("gauge")
    );
    assert_eq!(
        types
            .get("sip_edge_pinhole_install_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    assert!(v("sip_edge_pinhole_install_seconds_count", &[]).is_some_and(|x| x >= 1.0));
    // 120 µs falls in the 200 µs bucket (50, 100, 200, ... µs).
    assert!(v(
        "sip_edge_pinhole_install_seconds_bucket",
        &[("le", "0.0002")]
    )
    .is_some_and(|x| x >= 1.0));
    // Without maps the datapath part says so, and still parses.
    assert_eq!(v("sip_edge_datapath_readable", &[]), Some(0.0));
}

#[test]
fn tls_failures_have_bounded_reasons() {
    let cert = std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
    );
    assert_eq!(tls_failure(&cert), "certificate");
    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
    assert_eq!(tls_failure(&eof), "eof");
    let other = std::io::Error::other("peer said something odd");
    assert_eq!(tls_failure(&other), "io");
}

/// The HA node's state is scraped with the rest (issue #11: `/metrics`
/// carries role, store health and lag).
#[test]
fn the_ha_node_is_exposed() {
    use std::sync::atomic::Ordering::Relaxed;
    let ha = crate::ha::Status::default();
    ha.set_role(crate::ha::Role::Standby);
    ha.store_up.store(true, Relaxed);
    ha.lag_ms.store(137, Relaxed);
    ha.mirrored.store(40, Relaxed);
    ha.outages.store(2, Relaxed);
    let mut out = String::new();
    encode_registry(&mut out, &ha_registry(&ha)).expect("encode");
    for line in [
        "sip_edge_ha_role{role=\"standby\"} 1",
        "sip_edge_ha_store_up 1",
        "sip_edge_ha_lag_milliseconds 137",
        "sip_edge_ha_flows_mirrored 40",
        "sip_edge_ha_store_outages_total 2",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} missing in:\n{out}");
    }
}
