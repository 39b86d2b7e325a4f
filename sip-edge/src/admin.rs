//! `[admin]`: where the agent serves its operator endpoints. Today one:
//! `metrics_listen`, the Prometheus `/metrics` endpoint (`crate::metrics`).
//! Off unless set; the example config puts it on loopback.
//!
//! Validated with the rest of the file (`Config::validate`): never a media
//! port (XDP would drop the scrapes), never a SIP listener's port on an
//! overlapping address, and off loopback only on a port `[signalling]
//! admin_ports` lists (XDP passes only signalling and admin ports to the
//! kernel on attached interfaces).

use std::net::SocketAddr;

use serde::Deserialize;

use crate::config::{forms, invalid, Config, ConfigError};

/// `[admin]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// `address:port` of the Prometheus endpoint (`GET /metrics`); none:
    /// not served.
    #[serde(default, deserialize_with = "forms::opt_socket_addr")]
    pub metrics_listen: Option<SocketAddr>,
}

impl AdminSection {
    /// Rules types cannot express (module docs).
    pub fn validate(&self, cfg: &Config) -> Result<(), ConfigError> {
        let Some(addr) = self.metrics_listen else {
            return Ok(());
        };
        let field = "admin.metrics_listen";
        let port = addr.port();
        if port == 0 {
            return Err(invalid(
                field,
                format!("{addr}: choose a port (e.g. 9477); Prometheus must know where to scrape"),
            ));
        }
        if let Some(r) = cfg.media_ranges().iter().find(|r| r.contains(port)) {
            return Err(invalid(field, format!("port {port} lies inside media range {}-{}; XDP drops what arrives on media ports that no pinhole matches: pick a port outside every media range", r.start, r.end)));
        }
        if let Some(p) = &cfg.proxy {
            let sip = [
                Some(("proxy.internal_listen", p.internal_listen)),
                Some(("proxy.external_listen", p.external_listen)),
                p.internal_tcp_listen
                    .map(|a| ("proxy.internal_tcp_listen", a)),
            ];
            for (key, l) in sip.into_iter().flatten() {
                let overlap =
                    l.ip() == addr.ip() || l.ip().is_unspecified() || addr.ip().is_unspecified();
                if l.port() == port && overlap {
                    return Err(invalid(
                        field,
                        format!("{addr} collides with {key} ({l}): pick another port"),
                    ));
                }
            }
        }
        if !addr.ip().is_loopback() && !cfg.signalling.admin_ports.contains(&port) {
            return Err(invalid(field, format!("{addr} is not on loopback and port {port} is not in signalling.admin_ports {:?}; XDP passes only signalling and admin ports to the kernel: add {port} to [signalling] admin_ports, or listen on 127.0.0.1", cfg.signalling.admin_ports)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn with(admin: &str, admin_ports: &str) -> Result<Config, String> {
        let text = format!(
            r#"
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
            admin_ports = [{admin_ports}]
            [proxy]
            internal_listen = "10.77.0.1:5061"
            external_listen = "203.0.113.1:5061"
            cert = "/etc/sip-edge/cert.pem"
            key = "/etc/sip-edge/key.pem"
            ca_roots = "/etc/sip-edge/ca.pem"
            [admin]
            {admin}
            "#
        );
        Config::from_toml(&text).map_err(|e| e.to_string())
    }

    #[test]
    fn off_by_default_and_loopback_is_fine() {
        assert_eq!(with("", "").expect("valid").admin.metrics_listen, None);
        let c = with("metrics_listen = \"127.0.0.1:9477\"", "").expect("valid");
        assert_eq!(
            c.admin.metrics_listen,
            Some("127.0.0.1:9477".parse().expect("addr"))
        );
    }

    #[test]
    fn media_ports_sip_listeners_and_unpassed_ports_are_refused() {
        let e = with("metrics_listen = \"127.0.0.1:40010\"", "").expect_err("media port");
        assert!(
            e.contains("admin.metrics_listen") && e.contains("media range 40000-40999"),
            "{e}"
        );
        let e = with("metrics_listen = \"10.77.0.1:5061\"", "").expect_err("SIP port");
        assert!(e.contains("collides with proxy.internal_listen"), "{e}");
        let e = with("metrics_listen = \"0.0.0.0:5061\"", "").expect_err("wildcard");
        assert!(e.contains("collides"), "{e}");
        let e = with("metrics_listen = \"10.77.0.1:9477\"", "").expect_err("not passed");
        assert!(e.contains("admin_ports"), "{e}");
        with("metrics_listen = \"10.77.0.1:9477\"", "9477").expect("listed in admin_ports");
        let e = with("metrics_listen = \"127.0.0.1:0\"", "").expect_err("port 0");
        assert!(e.contains("choose a port"), "{e}");
        let e = with("metrics_port = 1", "").expect_err("unknown key");
        assert!(e.contains("metrics_port"), "{e}");
    }
}
