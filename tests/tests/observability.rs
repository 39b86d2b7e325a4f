//! Operator observability (issue #9) end to end, in network namespaces: the
//! real agent, configured with `[admin] metrics_listen` and `[log] format =
//! "json"`, carries a real TLS call with RTP through XDP; then
//!
//! - a real Prometheus server (Debian's `prometheus`) in the edge
//!   namespace scrapes `/metrics` every second: `up == 1`, and counters
//!   moved by the call (calls, forwarded packets, XDP `forwarded`, a
//!   refused pinhole by rule, the failed call by code) are read back
//!   through its HTTP API (`/api/v1/query`);
//! - `sip-edge status|calls|pinholes --json` over the control socket: the
//!   documented fields are there, with their types and the call's values;
//!   `pinholes` without an agent falls back to the pinned maps and says so;
//! - every line the agent logged is a JSON object, and the refused pinhole
//!   of a second call wrote a `sip_edge::security` line naming its rule.
//!
//! Needs root and `prometheus`; skips through `testnet::record_skip`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use sip_edge_tests::{
    edge::{self, ip, Edge, Flow, PeerUa, WAIT},
    testnet::{self, udp_roundtrip},
    testua::{self, media_of, reply, rtp_packet, SdpSpec},
};

/// The agent's metrics endpoint inside the edge namespace.
const METRICS: &str = "127.0.0.1:9477";
/// Prometheus's own HTTP API inside the edge namespace.
const PROMETHEUS: &str = "127.0.0.1:9490";

/// A Prometheus server in the edge namespace; killed on drop.
struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `METRICS` every second, storage in a temp dir.
    fn start(e: &Edge) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: sip-edge\n    static_configs:\n      - targets: ['{METRICS}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let mut cmd = e.topo.edge_cmd(Path::new("prometheus"));
        cmd.arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = cmd.spawn().expect("spawn prometheus");
        Prometheus { child, _dir: dir }
    }

    /// `GET /api/v1/query?query=<q>`: the result vector.
    fn query(&self, e: &Edge, q: &str) -> Option<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", encode(q));
        let body = http_get(e, PROMETHEUS, &path)?;
        let v: Value = serde_json::from_str(&body).ok()?;
        if v["status"] != "success" {
            return None;
        }
        v["data"]["result"].as_array().cloned()
    }

    /// The single value of `q`, when the result has exactly one sample.
    fn value(&self, e: &Edge, q: &str) -> Option<f64> {
        let r = self.query(e, q)?;
        match r.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Waits (bounded) until `q`'s single value satisfies `ok`; the last
    /// value seen otherwise.
    fn wait_for(
        &self,
        e: &Edge,
        q: &str,
        within: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> Result<f64, Option<f64>> {
        let deadline = Instant::now() + within;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.value(e, q);
            if let Some(v) = last.filter(|v| ok(*v)) {
                return Ok(v);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(last)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encoding of a query parameter (RFC 3986 unreserved kept).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET inside the edge namespace; the body on 200.
fn http_get(e: &Edge, addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let path = path.to_owned();
    testnet::in_ns(&e.topo.edge, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let (head, body) = resp.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200")
            .then(|| body.to_owned())
            .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
    })
    .ok()
    .flatten()
}

/// `sip-edge <args>` in the edge namespace: stdout, which must come with
/// exit status 0.
fn sip_edge(e: &Edge, args: &[&str]) -> String {
    let out = e
        .topo
        .edge_cmd(&testnet::agent_bin())
        .args(args)
        .output()
        .expect("run sip-edge");
    assert!(
        out.status.success(),
        "sip-edge {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sip-edge <args> --json` parsed.
fn sip_edge_json(e: &Edge, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let text = sip_edge(e, &a);
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{args:?}: not JSON ({err}): {text}"))
}

/// `n` RTP packets from `from` to `to`; how many `rx` got.
fn burst(from: &UdpSocket, to: SocketAddr, rx: &UdpSocket, n: u16, ssrc: u32) -> u16 {
    for seq in 0..n {
        from.send_to(&rtp_packet(seq, ssrc), to).expect("send rtp");
    }
    let mut got = 0;
    let mut buf = [0u8; 2048];
    while got < n {
        match rx.recv_from(&mut buf) {
            Ok((172, _)) if buf[8..12] == ssrc.to_be_bytes() => got += 1,
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    got
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {v:#}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a non-negative integer in {v:#}"))
}

#[tokio::test(flavor = "current_thread")]
async fn a_real_call_shows_in_prometheus_status_calls_and_json_logs() {
    const NAME: &str = "observability::a_real_call_shows_in_prometheus_status_calls_and_json_logs";
    if let Some(reason) = testnet::unavailable_reason() {
        testnet::record_skip(NAME, &reason);
        return;
    }
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        testnet::record_skip(
            NAME,
            "prometheus is not installed (apt-get install prometheus)",
        );
        return;
    }
    let tag = format!("mx{}", std::process::id());
    let mut e = Edge::prepare(&tag);
    let config_path = e.dir().join("sip-edge.toml");
    e.write_config(&format!(
        "{}[admin]\nmetrics_listen = \"{METRICS}\"\n[log]\nformat = \"json\"\n",
        testua::edge_config(&e.pin_dir, &e.pki, "relay")
    ));
    e.run_agent();
    // The control socket edge_config chose for this pin dir.
    let socket: PathBuf = std::env::temp_dir().join(format!(
        "{}.control.sock",
        e.pin_dir
            .file_name()
            .expect("pin dir name")
            .to_string_lossy()
    ));
    let sock = socket.to_str().expect("utf-8 path");
    let prom = Prometheus::start(&e);
    let up = prom.wait_for(&e, "up{job=\"sip-edge\"}", Duration::from_secs(60), |v| {
        v == 1.0
    });
    assert_eq!(
        up,
        Ok(1.0),
        "Prometheus never scraped the agent successfully"
    );
    let calls_before = prom
        .value(&e, "sip_edge_calls_total")
        .expect("sip_edge_calls_total is exposed before any call");

    // --- A real call with RTP both ways through XDP.
    let mut alice = e.connect_alice().await;
    let mut bob = PeerUa::skipping_others(&e);
    let a_rtp = e.udp(&e.topo.client, "10.77.0.2:4000");
    let b_rtp = e.udp(&e.topo.peer, "198.51.100.2:5000");
    let audio = |port| SdpSpec {
        audio: Some(port),
        ..Default::default()
    };
    let mut call = edge::call_out(
        &mut alice,
        &mut bob,
        &audio(4000),
        &audio(5000),
        Flow::Ringing,
    )
    .await
    .unwrap_or_else(|code| panic!("the call got {code}"));
    let offer = media_of(&call.offer, "audio").expect("offer audio");
    let answer = media_of(&call.answer, "audio").expect("answer audio");
    assert!(
        (0..20).any(|_| udp_roundtrip(&b_rtp, offer.addr, &a_rtp, &rtp_packet(0, 1)).is_some()),
        "peer -> client RTP never arrived"
    );
    let got_in = burst(&b_rtp, offer.addr, &a_rtp, 50, 3);
    let got_out = burst(&a_rtp, answer.addr, &b_rtp, 50, 4);
    assert!(
        got_in >= 45 && got_out >= 45,
        "RTP lost: {got_in}/50 in, {got_out}/50 out"
    );

    // --- status over the control socket.
    let st = sip_edge_json(&e, &["status", "--socket", sock]);
    assert_eq!(s(&st, "version"), env!("CARGO_PKG_VERSION"));
    assert!(n(&st, "pid") > 0 && st["uptime_secs"].is_u64(), "{st:#}");
    assert_eq!(
        Path::new(s(&st, "config")),
        std::path::absolute(&config_path).expect("absolute")
    );
    let listeners: Vec<(String, String)> = st["listeners"]
        .as_array()
        .expect("listeners array")
        .iter()
        .map(|l| (s(l, "name").to_owned(), s(l, "addr").to_owned()))
        .collect();
    for want in [
        ("internal TLS", edge::EDGE_INT),
        ("external TLS", edge::EDGE_EXT),
        ("metrics", METRICS),
        ("control", sock),
    ] {
        assert!(
            listeners.iter().any(|(n, a)| n == want.0 && a == want.1),
            "{want:?} missing from {listeners:?}"
        );
    }
    let dp = &st["datapath"];
    assert_eq!(s(dp, "xdp_mode"), "native");
    assert_eq!(s(dp, "media_mode"), "relay");
    assert_eq!(Path::new(s(dp, "pin_dir")), e.pin_dir.as_path());
    assert!(dp["adopted"].is_boolean());
    let ifaces: Vec<(&str, &str)> = dp["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .map(|i| (s(i, "name"), s(i, "role")))
        .collect();
    assert_eq!(ifaces, vec![("int0", "internal"), ("ext0", "external")]);
    assert_eq!(n(&st, "calls_active"), 1, "{st:#}");
    let in_use = n(&st, "pinholes_in_use");
    assert!(
        in_use >= 2 && in_use.is_multiple_of(2),
        "two rules per flow: {in_use}"
    );
    assert!(n(&st, "pinholes_capacity") >= in_use);
    assert_eq!(n(&st, "registrations"), 0);
    assert!(
        n(&st["admission"], "admitted") >= 1,
        "the INVITE at least: {st:#}"
    );
    assert!(st["admission"]["refused"].is_object() && st["admission"]["blocks"].is_u64());

    // --- calls: the call with its pinholes and their counters.
    let calls = sip_edge_json(&e, &["calls", "--socket", sock]);
    eprintln!("$ sip-edge calls --json\n{calls:#}");
    let list = calls["calls"].as_array().expect("calls array");
    assert_eq!(list.len(), 1, "{calls:#}");
    let c = &list[0];
    assert_eq!(s(c, "call_id"), call.a.call_id);
    assert!(!s(c, "from_tag").is_empty());
    assert!(s(c, "caller").contains("alice@"), "{c:#}");
    assert!(s(c, "callee").contains("bob@"), "{c:#}");
    assert_eq!(s(c, "caller_side"), "internal");
    assert_eq!(s(c, "state"), "confirmed");
    assert!(c["age_secs"].is_u64());
    let pins = c["pinholes"].as_array().expect("pinholes array");
    assert!(!pins.is_empty(), "{c:#}");
    let rtp = pins
        .iter()
        .find(|p| p["client"] == "10.77.0.2:4000")
        .unwrap_or_else(|| panic!("no pinhole for alice's RTP: {c:#}"));
    assert_eq!(s(rtp, "call_id"), call.a.call_id);
    assert_eq!(
        (s(rtp, "kind"), s(rtp, "proto"), s(rtp, "mode")),
        ("media", "udp", "relay")
    );
    assert_eq!(s(rtp, "peer"), "198.51.100.2:5000");
    assert_eq!(s(rtp, "public"), offer.addr.to_string());
    assert_eq!(
        rtp["edge_internal"].as_str(),
        Some(answer.addr.to_string().as_str())
    );
    assert!(rtp["id"].is_u64() && rtp["slots"].as_array().is_some_and(|a| a.len() == 2));
    let packets = n(rtp, "packets");
    assert!(
        packets >= u64::from(got_in + got_out),
        "{packets} < {got_in}+{got_out}: {rtp:#}"
    );
    assert!(n(rtp, "bytes") >= packets * 172, "{rtp:#}");
    let seen = rtp["last_seen_secs"]
        .as_f64()
        .expect("last_seen_secs after traffic");
    assert!((0.0..60.0).contains(&seen), "{seen}");

    // --- pinholes: from the agent, then from the maps when none answers.
    let ph = sip_edge_json(&e, &["pinholes", "--socket", sock]);
    assert_eq!(s(&ph, "source"), "agent");
    assert_eq!(ph["pinholes"].as_array().map(Vec::len), Some(pins.len()));
    let pin_dir = e.pin_dir.to_str().expect("utf-8");
    let fb = sip_edge_json(
        &e,
        &[
            "pinholes",
            "--socket",
            "/nonexistent/mx.sock",
            "--pin-dir",
            pin_dir,
        ],
    );
    assert_eq!(s(&fb, "source"), "maps");
    assert_eq!(
        fb["pinholes"].as_array().map(Vec::len),
        Some(usize::try_from(in_use).expect("count")),
        "one rule per direction: {fb:#}"
    );
    let active = prom.wait_for(&e, "sip_edge_calls_active", Duration::from_secs(20), |v| {
        v == 1.0
    });
    assert_eq!(active, Ok(1.0), "Prometheus sees the live call");
    // The human forms, for the README's samples.
    for args in [&["status"][..], &["calls"], &["pinholes"]] {
        let mut a = args.to_vec();
        a.extend(["--socket", sock]);
        eprintln!("$ sip-edge {}\n{}", args.join(" "), sip_edge(&e, &a));
    }
    let scrape = http_get(&e, METRICS, "/metrics").expect("GET /metrics");
    eprintln!("/metrics:\n{scrape}");

    alice
        .send(&call.a.request("BYE", "", ""))
        .await
        .expect("BYE");
    let bye = bob.recv_request("BYE").await;
    bob.conn()
        .send(&reply(&bye, 200, "OK", &call.b.local_tag, "", "", ""))
        .await
        .expect("200 BYE");
    alice.recv_status(200, WAIT).await.expect("200 for BYE");
    e.assert_empty("after BYE");

    // --- A second call whose answer names a third party's address: the
    // pinhole is refused (not the far party's signalling source).
    let mut a = testua::Dialog::outgoing(&edge::alice_id(), "sips:bob@peer.example.net");
    alice
        .send(&a.invite(&testua::sdp("alice", 1, ip("10.77.0.2"), &audio(4002))))
        .await
        .expect("INVITE");
    let inv = bob.recv_request("INVITE").await;
    let b = testua::Dialog::incoming(&edge::bob_id(), &inv).expect("bob's dialog");
    bob.conn()
        .send(&reply(
            &inv,
            200,
            "OK",
            &b.local_tag,
            &edge::contact(&b.me),
            "application/sdp",
            &testua::sdp("bob", 1, ip("198.51.100.77"), &audio(5002)),
        ))
        .await
        .expect("200 with a third party's address");
    let fin = edge::response_for(&mut alice, &a.call_id).await;
    assert_eq!(fin.status(), Some(488), "the edge refuses the answer");
    e.assert_empty("after the refused answer");

    // --- Prometheus saw the calls, the traffic, the refusal, the failure.
    let within = Duration::from_secs(20);
    let calls_after = prom.wait_for(&e, "sip_edge_calls_total", within, |v| {
        v >= calls_before + 2.0
    });
    assert!(
        calls_after.is_ok(),
        "sip_edge_calls_total: {calls_before} -> {calls_after:?}"
    );
    let fwd = prom.wait_for(
        &e,
        "sip_edge_pinhole_forwarded_packets_total",
        within,
        |v| v >= f64::from(got_in + got_out),
    );
    assert!(fwd.is_ok(), "forwarded packets: {fwd:?}");
    let fwd_bytes = prom.wait_for(&e, "sip_edge_pinhole_forwarded_bytes_total", within, |v| {
        v >= 100.0 * 172.0
    });
    assert!(fwd_bytes.is_ok(), "forwarded bytes: {fwd_bytes:?}");
    let xdp = prom.wait_for(
        &e,
        "sip_edge_xdp_packets_total{reason=\"forwarded\"}",
        within,
        |v| v >= f64::from(got_in + got_out),
    );
    assert!(xdp.is_ok(), "XDP forwarded: {xdp:?}");
    let rule = prom.wait_for(
        &e,
        "sip_edge_pinholes_refused_total{rule=\"not-signalling-source\"}",
        within,
        |v| v >= 1.0,
    );
    assert!(rule.is_ok(), "refused pinhole by rule: {rule:?}");
    let failed = prom.wait_for(
        &e,
        "sip_edge_calls_failed_total{code=\"488\"}",
        within,
        |v| v >= 1.0,
    );
    assert!(failed.is_ok(), "failed call by code: {failed:?}");
    let active = prom.wait_for(&e, "sip_edge_calls_active", within, |v| v == 0.0);
    assert_eq!(active, Ok(0.0), "no call is left after BYE and the refusal");
    let inst = prom.wait_for(&e, "sip_edge_pinhole_install_seconds_count", within, |v| {
        v >= 1.0
    });
    assert!(inst.is_ok(), "install latency histogram: {inst:?}");
    assert_eq!(prom.value(&e, "up{job=\"sip-edge\"}"), Some(1.0));

    // --- Every agent log line is JSON; the refusal wrote a security line.
    let log = e.agent_log();
    assert!(log.len() > 3, "the agent logged: {log:?}");
    let lines: Vec<Value> = log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|err| panic!("not JSON ({err}): {l}")))
        .collect();
    let security = lines
        .iter()
        .find(|l| {
            l["target"] == "sip_edge::security"
                && l["fields"]["rule"] == "not-signalling-source"
                && l["fields"]["call_id"] == a.call_id.as_str()
        })
        .unwrap_or_else(|| panic!("no security line for the refused pinhole in {log:#?}"));
    assert_eq!(security["level"], "WARN");
    assert_eq!(security["fields"]["endpoint"], "198.51.100.77:5002");
    assert_eq!(security["fields"]["side"], "External");
    eprintln!("security line: {security}");
    e.stop();
}
