//! Log output: human-readable lines by default, one JSON object per line
//! with `--log-format json` or `[log] format = "json"` (the command line
//! wins), both from `tracing-subscriber` on stderr.
//!
//! Security events (a refused pinhole, a refused connection, a refused
//! request, every 503 the edge sends) are logged under the one target
//! [`SECURITY`], so `SIP_EDGE_LOG=sip_edge::security=warn` or a JSON filter
//! on `"target":"sip_edge::security"` finds them all; their fields say who
//! (`peer`/`source`/`signalling_source`), what, and which `rule`.

use std::path::Path;

use serde::Deserialize;

/// The `tracing` target of every security line.
pub const SECURITY: &str = "sip_edge::security";

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Human,
    /// One JSON object per line: `timestamp`, `level`, `target`,
    /// `fields` (`message` and the event's fields), `span`, `spans`.
    Json,
}

/// `[log]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `"human"` (default) or `"json"`.
    #[serde(default)]
    pub format: LogFormat,
}

/// The `[log] format` of the config file at `path`, if it says one; read
/// before the full check so the check's own log lines already have it. A
/// file that does not parse says nothing here (the check reports it).
pub fn format_in(path: &Path) -> Option<LogFormat> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    let f = v.get("log")?.get("format")?.clone();
    f.try_into().ok()
}

/// Installs the process's subscriber: `filter` (EnvFilter syntax, `info`
/// when it does not parse), `format`, stderr.
pub fn init(filter: &str, format: LogFormat) -> SetFilter {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // With a reload handle either way: `[agent] log` sets the filter at
    // start and on reload (`crate::service::reload`).
    match format {
        LogFormat::Human => {
            let b = b.with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |f: &str| {
                let nf = tracing_subscriber::EnvFilter::try_new(f).map_err(|e| e.to_string())?;
                h.reload(nf).map_err(|e| e.to_string())
            })
        }
        LogFormat::Json => {
            let b = b
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |f: &str| {
                let nf = tracing_subscriber::EnvFilter::try_new(f).map_err(|e| e.to_string())?;
                h.reload(nf).map_err(|e| e.to_string())
            })
        }
    }
}

/// Sets the running log filter (an `EnvFilter` directive string).
pub type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_file_can_ask_for_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[log]\nformat = \"json\"\n").expect("write");
        assert_eq!(format_in(&p), Some(LogFormat::Json));
        std::fs::write(&p, "[log]\nformat = \"human\"\n").expect("write");
        assert_eq!(format_in(&p), Some(LogFormat::Human));
        std::fs::write(&p, "[log]\nformat = \"xml\"\n").expect("write");
        assert_eq!(format_in(&p), None, "the full check reports it");
        std::fs::write(&p, "pin_dir = \"/x\"\n").expect("write");
        assert_eq!(format_in(&p), None);
    }

    /// The JSON layer writes one parsable object per event, with the
    /// security target and fields where a test (and a log shipper) finds
    /// them.
    #[test]
    fn json_lines_parse_and_carry_target_and_fields() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .json()
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(calls = 3, "plain line");
            tracing::warn!(target: SECURITY, peer = "198.51.100.9:5061", rule = "limits.x", "refused");
        });
        let text = String::from_utf8(buf.0.lock().expect("lock").clone()).expect("utf8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["fields"]["calls"], 3);
        assert_eq!(lines[1]["target"], SECURITY);
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["fields"]["rule"], "limits.x");
        assert_eq!(lines[1]["fields"]["message"], "refused");
    }
}
