//! What a reload changes: every key that differs between the running
//! configuration and the new file, each classified as applied live or
//! needing a restart, and the configuration the running parts take
//! ([`effective`]: the new file with every restart-only value kept as it
//! was at start). Sans-IO: TOML text and parsed [`Config`]s in, a list of
//! [`Change`]s and a `Config` out.
//!
//! Keys are compared in the files as written (flattened to dotted paths,
//! arrays of tables by index: `route[1].host`), so a key added with its
//! default value shows as changed even though nothing changes in effect.
//!
//! Live keys are diffed against the last applied file, restart-only keys
//! against the file the agent started with: a restart-only change is
//! reported on every reload until the agent restarts, and never taken half.
//!
//! What applies live, and why the rest does not:
//! - `[[route]]`, `[[peer]]`, `[access]`, `proxy.default_route`,
//!   `proxy.internal_next_hop`: routing of new requests (a dialog's
//!   in-dialog requests follow its Record-Route, not the table);
//! - `[limits]` rates, bursts, registration-failure rules, per-source
//!   connection caps and the handshake/message timers; `proxy.idle_timeout_secs`
//!   and `proxy.keepalive_secs` (connections opened after the reload);
//! - `[media]` policy, caps, timers (calls in progress too, from the next
//!   tick) and `port_ranges` (ports of new calls; calls in progress keep
//!   theirs);
//! - `proxy.cert`, `proxy.key`: new TLS handshakes;
//! - `[agent]`, `on_exit`.
//!
//! Restart: anything bound, attached or sized at start (listen and source
//! addresses, interfaces, pin_dir, XDP mode, edge addresses, the pinhole
//! table size, signalling and admin ports, the default policy, the control
//! socket), what names the edge in dialogs in progress
//! (`proxy.*_advertise`), the media mode, the CA roots and client
//! certificate policy, and `proxy.max_connections`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Whether a changed key takes effect without a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Apply {
    /// Applied by the reload.
    Live,
    /// Needs `systemctl restart sip-edge` (the running value stays).
    Restart,
}

/// One changed key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Dotted key as in the file (`limits.invite_rate`, `route[0].host`).
    pub key: String,
    /// The running value, as TOML (`None`: not in the running file).
    pub old: Option<String>,
    /// The new value (`None`: removed from the file).
    pub new: Option<String>,
    /// Applied live, or needs a restart.
    pub apply: Apply,
}

/// Keys (indices removed, `route[0].host` → `route.host`) that apply
/// live, by prefix; everything else needs a restart. `limits.max_pinholes`
/// and `media.mode` are excluded below.
const LIVE_PREFIXES: &[&str] = &[
    "route",
    "peer",
    "access",
    "proxy.default_route",
    "proxy.internal_next_hop",
    "proxy.idle_timeout_secs",
    "proxy.keepalive_secs",
    "proxy.cert",
    "proxy.key",
    "limits",
    "media",
    "agent",
    "on_exit",
];

/// Restart-only keys under a live prefix.
const RESTART_KEYS: &[&str] = &["limits.max_pinholes", "media.mode"];

/// `route[0].host` → `route.host`.
fn without_indices(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut skip = false;
    for c in key.chars() {
        match c {
            '[' => skip = true,
            ']' => skip = false,
            c if !skip => out.push(c),
            _ => {}
        }
    }
    out
}

/// Whether `key` changes live (see the module docs).
pub fn class(key: &str) -> Apply {
    let k = without_indices(key);
    let under = |p: &str| k == p || k.starts_with(&format!("{p}."));
    if RESTART_KEYS.iter().any(|r| under(r)) {
        return Apply::Restart;
    }
    if LIVE_PREFIXES.iter().any(|p| under(p)) {
        Apply::Live
    } else {
        Apply::Restart
    }
}

/// Every leaf of a TOML table as dotted key → value text. Arrays of
/// tables are indexed (`route[0].host`); other arrays are one value.
pub fn flatten(t: &toml::Table) -> BTreeMap<String, String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            toml::Value::Array(a) if !a.is_empty() && a.iter().all(toml::Value::is_table) => {
                for (i, v) in a.iter().enumerate() {
                    walk(&format!("{prefix}[{i}]"), v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    for (k, v) in t {
        walk(k, v, &mut out);
    }
    out
}

fn changed_keys(
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
) -> Vec<(String, Option<String>, Option<String>)> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| ((*k).clone(), a.get(k).cloned(), b.get(k).cloned()))
        .collect()
}

/// The changes `new` brings: live keys against `applied` (the last file
/// applied), restart-only keys against `started` (the file of this run's
/// start). Sorted by key.
pub fn diff(started: &toml::Table, applied: &toml::Table, new: &toml::Table) -> Vec<Change> {
    let (s, a, n) = (flatten(started), flatten(applied), flatten(new));
    let mut out: Vec<Change> = changed_keys(&a, &n)
        .into_iter()
        .filter(|(k, _, _)| class(k) == Apply::Live)
        .chain(
            changed_keys(&s, &n)
                .into_iter()
                .filter(|(k, _, _)| class(k) == Apply::Restart),
        )
        .map(|(key, old, new)| Change {
            apply: class(&key),
            key,
            old,
            new,
        })
        .collect();
    out.sort_by(|x, y| x.key.cmp(&y.key));
    out
}

/// The configuration the running parts take from `new`: every value that
/// needs a restart stays as in `started` (the module docs list them);
/// everything else is `new`'s. `class` and this function must agree: the
/// unit tests check each restart key against it.
pub fn effective(started: &Config, new: &Config) -> Config {
    let mut e = new.clone();
    e.pin_dir = started.pin_dir.clone();
    e.xdp = started.xdp.clone();
    e.interfaces = started.interfaces.clone();
    e.addresses = started.addresses.clone();
    e.signalling = started.signalling.clone();
    e.policy = started.policy.clone();
    e.control = started.control.clone();
    e.media.mode = started.media.mode;
    e.limits.max_pinholes = started.limits.max_pinholes;
    match (&started.proxy, &mut e.proxy) {
        (Some(s), Some(p)) => {
            p.internal_listen = s.internal_listen;
            p.external_listen = s.external_listen;
            p.internal_advertise = s.internal_advertise.clone();
            p.external_advertise = s.external_advertise.clone();
            p.internal_tcp_listen = s.internal_tcp_listen;
            p.internal_udp_listen = s.internal_udp_listen;
            p.internal_source_address = s.internal_source_address;
            p.external_source_address = s.external_source_address;
            p.ca_roots = s.ca_roots.clone();
            p.external_client_auth = s.external_client_auth;
            p.client_ca = s.client_ca.clone();
            p.max_connections = s.max_connections;
        }
        // Adding or removing [proxy] binds or closes listeners: restart.
        _ => e.proxy = started.proxy.clone(),
    }
    // Without [proxy], routes cannot apply (`Config::validate`).
    if e.proxy.is_none() {
        e.routes.clear();
    }
    e
}

/// The human form: one line per key.
pub fn render(changes: &[Change]) -> String {
    use std::fmt::Write as _;
    if changes.is_empty() {
        return "no changes\n".into();
    }
    let mut s = String::new();
    for c in changes {
        let what = match c.apply {
            Apply::Live => "applied",
            Apply::Restart => "needs a restart (running value kept)",
        };
        let _ = writeln!(
            s,
            "{}: {} -> {}: {what}",
            c.key,
            c.old.as_deref().unwrap_or("(unset)"),
            c.new.as_deref().unwrap_or("(unset)")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
pin_dir = "/sys/fs/bpf/sip-edge"
[[interface]]
name = "int0"
role = "internal"
[[interface]]
name = "ext0"
role = "external"
[addresses]
internal = ["10.77.0.1"]
public = ["203.0.113.1"]
[media]
port_ranges = ["40000-40999"]
[signalling]
ports = [5061]
[proxy]
internal_listen = "10.77.0.1:5061"
external_listen = "203.0.113.1:5061"
cert = "/etc/sip-edge/edge.pem"
key = "/etc/sip-edge/edge.key"
ca_roots = "/etc/sip-edge/ca.pem"
[[route]]
domain = "peer.example.net"
host = "198.51.100.2"
"#;

    fn table(text: &str) -> toml::Table {
        text.parse().expect("toml")
    }

    fn with(extra_replace: &[(&str, &str)]) -> String {
        let mut t = BASE.to_owned();
        for (a, b) in extra_replace {
            assert!(t.contains(a), "{a}");
            t = t.replacen(a, b, 1);
        }
        t
    }

    fn changes(new: &str) -> Vec<(String, Apply)> {
        let b = table(BASE);
        diff(&b, &b, &table(new))
            .into_iter()
            .map(|c| (c.key, c.apply))
            .collect()
    }

    #[test]
    fn each_changed_key_is_listed_with_its_class() {
        let new = with(&[
            ("[media]\n", "[media]\nmax_calls = 5\nmode = \"nat\"\n"),
            (
                "[signalling]\n",
                "[limits]\ninvite_rate = 1\nmax_pinholes = 1024\n[signalling]\n",
            ),
            ("host = \"198.51.100.2\"", "host = \"198.51.100.3\""),
            ("\"10.77.0.1:5061\"", "\"10.77.0.1:5062\""),
            (
                "cert = \"/etc/sip-edge/edge.pem\"",
                "cert = \"/etc/sip-edge/edge2.pem\"",
            ),
            (
                "pin_dir = \"/sys/fs/bpf/sip-edge\"",
                "pin_dir = \"/sys/fs/bpf/other\"\n[agent]\nlog = \"debug\"",
            ),
        ]);
        assert_eq!(
            changes(&new),
            vec![
                ("agent.log".to_owned(), Apply::Live),
                ("limits.invite_rate".to_owned(), Apply::Live),
                ("limits.max_pinholes".to_owned(), Apply::Restart),
                ("media.max_calls".to_owned(), Apply::Live),
                ("media.mode".to_owned(), Apply::Restart),
                ("pin_dir".to_owned(), Apply::Restart),
                ("proxy.cert".to_owned(), Apply::Live),
                ("proxy.internal_listen".to_owned(), Apply::Restart),
                ("route[0].host".to_owned(), Apply::Live),
            ]
        );
        assert!(changes(BASE).is_empty(), "the same file changes nothing");
    }

    #[test]
    fn added_and_removed_tables_show_every_key() {
        let new = BASE.replace(
            "[[route]]\ndomain = \"peer.example.net\"\nhost = \"198.51.100.2\"\n",
            "",
        );
        assert_eq!(
            changes(&new),
            vec![
                ("route[0].domain".to_owned(), Apply::Live),
                ("route[0].host".to_owned(), Apply::Live)
            ]
        );
        let b = table(BASE);
        let d = diff(&b, &b, &table(&new));
        assert_eq!(d[0].new, None);
        assert_eq!(d[0].old.as_deref(), Some("\"peer.example.net\""));
        let text = render(&d);
        assert!(
            text.contains("route[0].host: \"198.51.100.2\" -> (unset): applied"),
            "{text}"
        );
    }

    #[test]
    fn restart_keys_stay_reported_until_restart_and_live_ones_once() {
        let started = table(BASE);
        let new = table(&with(&[
            ("\"10.77.0.1:5061\"", "\"10.77.0.1:5062\""),
            ("[media]\n", "[media]\nmax_calls = 5\n"),
        ]));
        // The second reload of the same file: the live key was applied by
        // the first (applied = new), the restart key is still pending.
        let again = diff(&started, &new, &new);
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].key, "proxy.internal_listen");
        assert_eq!(again[0].apply, Apply::Restart);
    }

    #[test]
    fn classes_of_keys_in_arrays_and_nested_tables() {
        for (k, want) in [
            ("route[3].media_sources", Apply::Live),
            ("peer[0].tls_identity", Apply::Live),
            ("access.served_domains", Apply::Live),
            ("proxy.default_route.host", Apply::Live),
            ("proxy.internal_advertise", Apply::Restart),
            ("proxy.ca_roots", Apply::Restart),
            ("proxy.max_connections", Apply::Restart),
            ("proxy.keepalive_secs", Apply::Live),
            ("interface[1].name", Apply::Restart),
            ("xdp.mode", Apply::Restart),
            ("control.socket", Apply::Restart),
            ("media.port_ranges", Apply::Live),
            ("media.mode", Apply::Restart),
            ("limits.max_pinholes", Apply::Restart),
            ("limits.max_connections_per_source", Apply::Live),
            ("on_exit", Apply::Live),
            ("media_extra", Apply::Restart),
        ] {
            assert_eq!(class(k), want, "{k}");
        }
    }

    /// `effective` keeps exactly what `class` calls restart-only: a file
    /// changing only restart keys leaves the running config as it was, and
    /// one changing only live keys is taken whole.
    #[test]
    fn effective_agrees_with_the_classes() {
        let started = Config::from_toml(BASE).expect("base");
        let restart_only = Config::from_toml(&with(&[
            ("\"10.77.0.1:5061\"", "\"10.77.0.1:5062\""),
            ("pin_dir = \"/sys/fs/bpf/sip-edge\"", "pin_dir = \"/sys/fs/bpf/other\""),
            ("ports = [5061]", "ports = [5061, 5062]"),
            ("[media]\n", "[media]\nmode = \"nat\"\n"),
            ("ca_roots = \"/etc/sip-edge/ca.pem\"", "ca_roots = \"/etc/other.pem\"\nmax_connections = 7\ninternal_advertise = \"edge.example.net\""),
            ("[signalling]\n", "[limits]\nmax_pinholes = 1024\n[policy]\ndefault = \"drop\"\n[control]\nsocket = \"/run/x.sock\"\n[xdp]\nmode = \"skb\"\n[signalling]\n"),
            ("public = [\"203.0.113.1\"]", "public = [\"203.0.113.1\", \"203.0.113.9\"]"),
        ]))
        .expect("restart-only");
        assert_eq!(effective(&started, &restart_only), started);
        let b = table(BASE);
        let n = table(&with(&[
            ("\"10.77.0.1:5061\"", "\"10.77.0.1:5062\""),
            ("[media]\n", "[media]\nmode = \"nat\"\n"),
        ]));
        assert!(diff(&b, &b, &n).iter().all(|c| c.apply == Apply::Restart));
        let live_only = Config::from_toml(
            &with(&[
                ("host = \"198.51.100.2\"", "host = \"198.51.100.3\""),
                (
                    "[media]\n",
                    "[media]\nmax_calls = 5\nlatch = true\nport_ranges = [\"41000-41999\"]\n",
                ),
                (
                    "[signalling]\n",
                    "[limits]\ninvite_rate = 1\n[agent]\ndrain_secs = 9\n[signalling]\n",
                ),
                (
                    "cert = \"/etc/sip-edge/edge.pem\"",
                    "cert = \"/etc/sip-edge/edge2.pem\"\nidle_timeout_secs = 9",
                ),
            ])
            .replacen("port_ranges = [\"40000-40999\"]\n", "", 1),
        )
        .expect("live-only");
        assert_eq!(effective(&started, &live_only), live_only);
    }
}
