//! Real third-party SIP software for the system tests and the demo:
//! Debian's Kamailio (as the inside registrar/PBX) and baresip (as a
//! headless softphone), run in the test namespaces as process groups, and
//! the audio checks that prove media crossed the edge: a Goertzel filter
//! over G.711 payloads or over a softphone's WAV recording.
//!
//! `tests/tests/remote_users.rs`, `tests/tests/softphones.rs` and
//! `sip-edge-demo --baresip` share these; each writes its own configuration
//! files into its temp dir, and every process started here is killed (by
//! its own process group id) when its `Group` drops.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{testnet, testua::TestPki};

pub mod capture;
pub mod demo;

/// A process group killed (SIGTERM, then SIGKILL) on drop: Kamailio forks
/// workers, baresip may too; the whole group goes, by its id only.
pub struct Group {
    child: Child,
    what: &'static str,
    log: PathBuf,
}

impl Group {
    /// Start `cmd` in a new process group, stdout and stderr to `log`.
    pub fn spawn(mut cmd: Command, what: &'static str, log: PathBuf) -> Group {
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Group { child, what, log }
    }

    /// `spawn`, with a pipe to the program's standard input.
    pub fn spawn_piped(mut cmd: Command, what: &'static str, log: PathBuf) -> (Group, ChildStdin) {
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        (Group { child, what, log }, stdin)
    }

    /// Whether the group's leader still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last 30 lines of the log, for failure messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Signal the whole group.
    pub fn kill(&mut self, sig: i32) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) on the process group this test created.
        unsafe { libc::kill(-pgid, sig) };
    }

    /// SIGKILL the group and reap the leader (a client that loses its
    /// network: no de-registration).
    pub fn kill9(&mut self) {
        self.kill(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, up to 5 s, then SIGKILL.
    pub fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        self.kill(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && self.alive() {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill(libc::SIGKILL);
        let _ = self.child.wait();
        eprintln!("{} stopped", self.what);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop();
        // Workers that outlived their parent are still in the group.
        self.kill(libc::SIGKILL);
    }
}

/// `program` in network namespace `ns`.
pub fn nsenter(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    c
}

/// Whether `program` is on `PATH`.
pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Kamailio's module directory (Debian's multiarch path, or a fallback).
pub fn kamailio_modules() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/kamailio/modules",
        "/usr/lib/kamailio/modules",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.join("tls.so").exists() && p.join("registrar.so").exists())
}

/// Whether Debian's baresip with the modules the tests load is installed.
pub fn baresip_installed() -> bool {
    which("baresip") && Path::new(BARESIP_MODULES).join("ausine.so").exists()
}

/// Kamailio as a registrar with Path support (RFC 3327) on TLS `listen`,
/// and a record-routing proxy for everything else: REGISTER is saved in
/// usrloc (Path stored, `use_path`), other initial requests are looked up
/// and relayed over the stored Path; in-dialog requests follow the route
/// set. One TCP worker: Kamailio 5.6's TLS shares OpenSSL state between
/// workers, which Debian's OpenSSL 3 does not survive (see the bench).
pub fn kamailio_cfg(pki: &TestPki, modules: &Path, listen: &str) -> String {
    format!(
        r#"#!KAMAILIO
# sip-edge system test: the inside registrar/PBX (generated).
debug=2
log_stderror=yes
children=1
tcp_children=1
enable_tls=yes
auto_aliases=no
listen=tls:{listen}
mpath="{modules}"
loadmodule "tls.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "maxfwd.so"
loadmodule "siputils.so"
loadmodule "pv.so"
loadmodule "textops.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "xlog.so"
modparam("tls", "tls_method", "TLSv1.2+")
modparam("tls", "certificate", "{cert}")
modparam("tls", "private_key", "{key}")
modparam("tls", "verify_certificate", 0)
modparam("tls", "require_certificate", 0)
modparam("usrloc", "db_mode", 0)
modparam("registrar", "use_path", 1)
modparam("registrar", "path_mode", 2)

request_route {{
    xlog("L_INFO", "$rm $ru from $si:$sp contact $ct\n");
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (has_totag()) {{
        if (loose_route()) {{
            t_relay();
            exit;
        }}
        if (is_method("ACK")) {{
            if (t_check_trans()) {{
                t_relay();
            }}
            exit;
        }}
        sl_send_reply("404", "Not here");
        exit;
    }}
    if (is_method("CANCEL")) {{
        if (t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}
    t_check_trans();
    # A client's outbound proxy setting preloads a Route naming this PBX:
    # drop it, as Kamailio's default configuration does, so the request
    # follows the registered Path and nothing else.
    remove_hf("Route");
    if (is_method("REGISTER")) {{
        if (!save("location")) {{
            sl_reply_error();
        }}
        exit;
    }}
    if (!lookup("location")) {{
        sl_send_reply("404", "Not Found");
        exit;
    }}
    record_route();
    if (!t_relay()) {{
        sl_reply_error();
    }}
    exit;
}}
"#,
        modules = modules.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
    )
}

/// Kamailio (`kamailio_cfg` on TLS `listen`) in namespace `ns`, with its
/// config, runtime dir and log in `dir`; returns once it accepts TCP.
pub fn start_kamailio(ns: &str, dir: &Path, pki: &TestPki, modules: &Path, listen: &str) -> Group {
    start_kamailio_cfg(ns, dir, &kamailio_cfg(pki, modules, listen), listen)
}

/// `kamailio_cfg` as an RFC 5626 registrar: the `outbound` module
/// (Debian's kamailio-outbound-modules), `Require: outbound` in the 200 to
/// an outbound REGISTER, and `Flow-Timer: flow_timer` in it, which asks
/// the client for keep-alives every 80-100% of that many seconds (§4.4.1).
pub fn kamailio_outbound_cfg(cfg: &str, flow_timer: u32) -> String {
    cfg.replacen(
        "loadmodule \"xlog.so\"\n",
        &format!(
            "loadmodule \"xlog.so\"\nloadmodule \"outbound.so\"\nmodparam(\"registrar\", \"outbound_mode\", 1)\nmodparam(\"registrar\", \"flow_timer\", {flow_timer})\n"
        ),
        1,
    )
}

/// Whether Debian's Kamailio has its `outbound` module.
pub fn kamailio_outbound_installed(modules: &Path) -> bool {
    modules.join("outbound.so").exists()
}

/// Kamailio on configuration text `cfg` (listening on TLS `listen`) in
/// namespace `ns`, config, runtime dir and log in `dir`; returns once it
/// accepts TCP.
pub fn start_kamailio_cfg(ns: &str, dir: &Path, cfg: &str, listen: &str) -> Group {
    let kcfg = dir.join("kamailio.cfg");
    std::fs::write(&kcfg, cfg).expect("kamailio cfg");
    let krun = dir.join("kamailio-run");
    std::fs::create_dir_all(&krun).expect("kamailio run dir");
    let mut kcmd = nsenter(ns, "kamailio");
    kcmd.args(["-DD", "-E", "-m", "64", "-M", "8", "-f"])
        .arg(&kcfg)
        .arg("-Y")
        .arg(&krun);
    let mut kamailio = Group::spawn(kcmd, "kamailio", dir.join("kamailio.log"));
    let to: SocketAddr = listen.parse().expect("kamailio listen address");
    wait_tcp(ns, to, "kamailio", &mut || kamailio.alive());
    kamailio
}

/// Wait (up to 15 s) until something in `ns` accepts TCP on `to`.
pub fn wait_tcp(ns: &str, to: SocketAddr, what: &str, alive: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while testnet::in_ns(ns, || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200))
    })
    .expect("netns")
    .is_err()
    {
        assert!(alive(), "{what} exited before listening");
        assert!(Instant::now() < deadline, "{what} never listened on {to}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where Debian installs baresip's modules.
pub const BARESIP_MODULES: &str = "/usr/lib/baresip/modules";

/// One headless baresip (DESIGN.md §4): an `ausine` tone as its
/// microphone, what it receives dumped to WAV files by the `sndfile` filter
/// (baresip 1.0's `aufile` has no player), auto-answer, driven through
/// `ctrl_tcp` on 127.0.0.1:4444 of its namespace.
pub struct BaresipSpec<'a> {
    /// A short name for logs and files (`alice`, `bob`).
    pub name: &'static str,
    /// `sip_listen` (baresip adds TLS on port + 1).
    pub listen: &'a str,
    /// The tone it sends, in Hz.
    pub tone_hz: u32,
    /// Lines of its `accounts` file.
    pub accounts: Vec<String>,
    /// Modules loaded beyond the base set (`srtp.so`, `ice.so`, ...).
    pub modules: &'a [&'a str],
    /// Extra `config` lines (whole lines).
    pub extra: &'a str,
    /// Certificate and key (PEM) of its TLS listener: a PBX that sends
    /// it a request opens a connection to its Contact.
    pub identity: Option<(&'a Path, &'a Path)>,
}

/// A running baresip.
pub struct Baresip {
    /// The process group.
    pub group: Group,
    /// Its namespace.
    pub ns: String,
    /// Where `sndfile` writes `dump-*-dec.wav` (what it hears) and
    /// `dump-*-enc.wav` (what it sends), one pair per call.
    pub dumps: PathBuf,
    /// The tone it sends.
    pub tone_hz: u32,
}

impl Baresip {
    /// Write `spec`'s config into `dir/<name>/` and start baresip in `ns`.
    pub fn start(ns: &str, dir: &Path, ca: &Path, spec: &BaresipSpec<'_>) -> Baresip {
        Baresip::start_with_args(ns, dir, ca, spec, &[])
    }

    /// `start`, with extra command-line `args` (`-s`: SIP trace to the log).
    pub fn start_with_args(
        ns: &str,
        dir: &Path,
        ca: &Path,
        spec: &BaresipSpec<'_>,
        args: &[&str],
    ) -> Baresip {
        let home = dir.join(spec.name);
        std::fs::create_dir_all(&home).expect("baresip dir");
        let dumps = dir.join(format!("{}-audio", spec.name));
        std::fs::create_dir_all(&dumps).expect("baresip dump dir");
        let mut modules = String::new();
        for m in [
            "g711.so",
            "ausine.so",
            "sndfile.so",
            "alsa.so",
            "ctrl_tcp.so",
        ]
        .iter()
        .chain(spec.modules)
        {
            modules.push_str(&format!("module {m}\n"));
        }
        let config = format!(
            "poll_method epoll\n\
             sip_listen {listen}\n\
             sip_cafile {ca}\n\
             call_local_timeout 120\n\
             audio_source ausine,{tone}\n\
             snd_path {dumps}\n\
             audio_player alsa,null\n\
             audio_alert alsa,null\n\
             ausrc_srate 48000\n\
             ausrc_channels 2\n\
             rtp_ports 20000-20999\n\
             ringback_disabled yes\n\
             module_path {BARESIP_MODULES}\n\
             {modules}\
             ctrl_tcp_listen 127.0.0.1:4444\n\
             module_app account.so\n\
             module_app menu.so\n\
             {extra}",
            listen = spec.listen,
            ca = ca.display(),
            dumps = dumps.display(),
            tone = spec.tone_hz,
            extra = spec.extra,
        );
        let mut config = config;
        if let Some((cert, key)) = spec.identity {
            let mut pem = std::fs::read(cert).expect("baresip certificate");
            pem.extend(std::fs::read(key).expect("baresip key"));
            let path = home.join("identity.pem");
            std::fs::write(&path, pem).expect("baresip identity");
            config.push_str(&format!("sip_certificate {}\n", path.display()));
        }
        std::fs::write(home.join("config"), config).expect("baresip config");
        let mut accounts = spec.accounts.join("\n");
        accounts.push('\n');
        std::fs::write(home.join("accounts"), accounts).expect("baresip accounts");
        std::fs::write(home.join("contacts"), "").expect("baresip contacts");
        let mut cmd = nsenter(ns, "baresip");
        cmd.arg("-f").arg(&home).args(args).env("HOME", dir);
        let group = Group::spawn(cmd, spec.name, dir.join(format!("{}.log", spec.name)));
        let mut b = Baresip {
            group,
            ns: ns.to_string(),
            dumps,
            tone_hz: spec.tone_hz,
        };
        let ctrl = "127.0.0.1:4444".parse().expect("ctrl address");
        let group = &mut b.group;
        wait_tcp(ns, ctrl, spec.name, &mut || group.alive());
        b
    }

    /// One command through `ctrl_tcp` (a netstring of JSON); baresip's
    /// response (`{"response":true,"ok":...,"data":...}`), events skipped.
    pub fn cmd(&self, command: &str, params: &str) -> Value {
        let json =
            serde_json::json!({"command": command, "params": params, "token": command}).to_string();
        testnet::in_ns(&self.ns, || -> Result<Value, String> {
            let mut s = std::net::TcpStream::connect_timeout(
                &"127.0.0.1:4444".parse().expect("ctrl address"),
                Duration::from_secs(2),
            )
            .map_err(|e| format!("ctrl_tcp connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .map_err(|e| e.to_string())?;
            s.write_all(format!("{}:{json},", json.len()).as_bytes())
                .map_err(|e| format!("ctrl_tcp write: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while Instant::now() < deadline {
                match s.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(_) => {}
                }
                while let Some((msg, rest)) = netstring(&buf) {
                    let v: Value = serde_json::from_slice(msg).unwrap_or(Value::Null);
                    buf = rest.to_vec();
                    if v["response"] == true {
                        return Ok(v);
                    }
                }
            }
            Err(format!("no ctrl_tcp response to {command}"))
        })
        .expect("netns")
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", self.group.what, self.group.tail()))
    }

    /// `cmd`, which must answer ok.
    pub fn ok(&self, command: &str, params: &str) -> Value {
        let v = self.cmd(command, params);
        assert!(
            v["ok"] == true,
            "{} {command} {params}: {v}\n{}",
            self.group.what,
            self.group.tail()
        );
        v
    }

    /// What it received in its latest call so far (the newest
    /// `dump-*-dec.wav`; empty before the first call).
    pub fn heard(&self) -> Wav {
        let newest = std::fs::read_dir(&self.dumps)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with("-dec.wav"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .max();
        match newest {
            Some((_, path)) => Wav::read(&path),
            None => Wav::read(Path::new("")),
        }
    }

    /// Forget every recording, so the next call starts from nothing.
    pub fn clear_recordings(&self) {
        for e in std::fs::read_dir(&self.dumps)
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_file(e.path());
        }
    }

    /// Wait up to `within` for a log line containing `needle` that was not
    /// there `seen` lines ago; false when none came (or baresip exited).
    pub fn saw(&mut self, needle: &str, seen: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let log = self.group.log();
            if log.lines().skip(seen).any(|l| l.contains(needle)) {
                return true;
            }
            if !self.group.alive() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The number of log lines so far (a mark for `wait_log`).
    pub fn log_mark(&self) -> usize {
        self.group.log().lines().count()
    }
}

/// One headless `linphonec` (Debian's linphone-cli, liblinphone): a
/// second SIP stack (belle-sip, mediastreamer2). Commands go to its
/// standard input; with `soundcard use files` it sends a WAV file (a tone
/// this module writes) and records what it receives to another.
pub struct Linphone {
    /// The process group.
    pub group: Group,
    stdin: ChildStdin,
    /// The WAV file it records (what it hears).
    pub heard: PathBuf,
}

impl Linphone {
    /// Write a `linphonerc` for `aor` (`user@domain`) registering over TLS
    /// through `proxy` (`host:port`) every 60 s, trusting `ca`; start
    /// `linphonec -a` (auto-answer) in `ns`, sending a `tone_hz` tone.
    /// Every request goes through `proxy` (`reg_route`): a call to
    /// `user@domain` would otherwise resolve the domain in DNS.
    pub fn start(
        ns: &str,
        dir: &Path,
        ca: &Path,
        aor: &str,
        proxy: &str,
        tone_hz: u32,
    ) -> Linphone {
        let home = dir.join("linphone");
        // liblinphone never starts its core (no REGISTER, nothing) when it
        // cannot create its database here.
        std::fs::create_dir_all(home.join(".local/share/linphone")).expect("linphone dir");
        let tone = home.join("tone.wav");
        std::fs::write(&tone, tone_wav(f64::from(tone_hz), 8000, 30)).expect("tone file");
        let heard = home.join("heard.wav");
        let rc = home.join("linphonerc");
        std::fs::write(
            &rc,
            format!(
                "[sip]\n\
                 sip_port=0\n\
                 sip_tcp_port=0\n\
                 sip_tls_port=-1\n\
                 root_ca={ca}\n\
                 verify_server_certs=1\n\
                 verify_server_cn=0\n\
                 default_proxy=0\n\
                 [rtp]\n\
                 audio_rtp_port=26000\n\
                 [sound]\n\
                 echocancellation=0\n\
                 [proxy_0]\n\
                 reg_proxy=<sip:{proxy};transport=tls>\n\
                 reg_route=<sip:{proxy};transport=tls;lr>\n\
                 reg_identity=sip:{aor}\n\
                 reg_expires=60\n\
                 reg_sendregister=1\n\
                 publish=0\n",
                ca = ca.display(),
            ),
        )
        .expect("linphonerc");
        let mut cmd = nsenter(ns, "linphonec");
        cmd.arg("-c")
            .arg(&rc)
            .args(["-a", "-d", "5", "-l"])
            .arg(dir.join("linphone-debug.log"))
            .env("HOME", &home);
        let (group, stdin) = Group::spawn_piped(cmd, "linphonec", dir.join("linphonec.log"));
        let mut l = Linphone {
            group,
            stdin,
            heard,
        };
        l.send("soundcard use files");
        l.send(&format!("play {}", tone.display()));
        l.send(&format!("record {}", l.heard.display()));
        l
    }

    /// One command line.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("linphonec {line}: {e}\n{}", self.group.tail()));
    }

    /// What it recorded in its latest call (liblinphone writes the file
    /// when the call ends).
    pub fn heard(&self) -> Wav {
        Wav::read(&self.heard)
    }

    /// Wait up to `within` for output containing `needle` after line
    /// `seen`; false when none came (or linphonec exited).
    pub fn saw(&mut self, needle: &str, seen: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self
                .group
                .log()
                .lines()
                .skip(seen)
                .any(|l| l.contains(needle))
            {
                return true;
            }
            if !self.group.alive() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The number of output lines so far.
    pub fn log_mark(&self) -> usize {
        self.group.log().lines().count()
    }
}

/// A mono 16-bit WAV file of `secs` seconds of a `freq` tone at half
/// scale.
pub fn tone_wav(freq: f64, rate: u32, secs: u32) -> Vec<u8> {
    let n = rate * secs;
    let mut b = Vec::with_capacity(44 + 2 * n as usize);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + 2 * n).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(2 * rate).to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&(2 * n).to_le_bytes());
    for i in 0..n {
        let v =
            16000.0 * (2.0 * std::f64::consts::PI * freq * f64::from(i) / f64::from(rate)).sin();
        b.extend_from_slice(&(v as i16).to_le_bytes());
    }
    b
}

/// The first netstring in `buf` and what follows it.
fn netstring(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = buf.iter().position(|b| *b == b':')?;
    let len: usize = std::str::from_utf8(&buf[..colon]).ok()?.parse().ok()?;
    let end = colon + 1 + len;
    if buf.len() <= end {
        return None;
    }
    Some((&buf[colon + 1..end], &buf[end + 1..]))
}

/// Samples of a WAV file a softphone wrote, mixed down to mono.
pub struct Wav {
    /// Samples per second.
    pub rate: u32,
    /// Linear PCM, one value per frame.
    pub samples: Vec<f64>,
}

impl Wav {
    /// Read a 16-bit PCM RIFF/WAVE file. A file still being written
    /// (header sizes not yet filled in) is read up to its current end;
    /// a missing or unreadable file is empty.
    pub fn read(path: &Path) -> Wav {
        let bytes = std::fs::read(path).unwrap_or_default();
        Wav::parse(&bytes).unwrap_or(Wav {
            rate: 8000,
            samples: Vec::new(),
        })
    }

    fn parse(b: &[u8]) -> Option<Wav> {
        if b.len() < 12 || &b[..4] != b"RIFF" || &b[8..12] != b"WAVE" {
            return None;
        }
        let (mut at, mut rate, mut channels) = (12usize, 0u32, 0u16);
        while at + 8 <= b.len() {
            let id = &b[at..at + 4];
            let size = u32::from_le_bytes(b[at + 4..at + 8].try_into().ok()?) as usize;
            let body = at + 8;
            if id == b"fmt " && body + 16 <= b.len() {
                channels = u16::from_le_bytes(b[body + 2..body + 4].try_into().ok()?);
                rate = u32::from_le_bytes(b[body + 4..body + 8].try_into().ok()?);
                let bits = u16::from_le_bytes(b[body + 14..body + 16].try_into().ok()?);
                if bits != 16 || channels == 0 {
                    return None;
                }
            } else if id == b"data" {
                // The size may still be 0 (or stale) while the file grows.
                let data = &b[body..];
                let frame = 2 * usize::from(channels.max(1));
                let samples = data
                    .chunks_exact(frame)
                    .map(|f| {
                        let sum: f64 = f
                            .chunks_exact(2)
                            .map(|s| f64::from(i16::from_le_bytes([s[0], s[1]])))
                            .sum();
                        sum / f64::from(channels.max(1))
                    })
                    .collect();
                return (rate > 0).then_some(Wav { rate, samples });
            }
            at = body + size + (size & 1);
        }
        None
    }

    /// Seconds of audio.
    pub fn secs(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.rate)
    }

    /// The last `secs` seconds.
    pub fn tail(&self, secs: f64) -> &[f64] {
        let n = (secs * f64::from(self.rate)) as usize;
        &self.samples[self.samples.len().saturating_sub(n)..]
    }
}

/// One G.711 μ-law byte as linear PCM (ITU-T G.711 §A.2, inverted bits).
pub fn ulaw(b: u8) -> f64 {
    let u = !b;
    let exp = (u >> 4) & 7;
    let mag = ((i32::from(u & 0x0f) << 3) + 0x84) << exp;
    let v = f64::from(mag - 0x84);
    if u & 0x80 != 0 {
        -v
    } else {
        v
    }
}

/// Power at `freq` of samples taken at `rate` (the Goertzel filter).
pub fn goertzel_at(samples: &[f64], freq: f64, rate: f64) -> f64 {
    let coeff = 2.0 * (2.0 * std::f64::consts::PI * freq / rate).cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for x in samples {
        let s0 = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

/// Power at `freq` of 8 kHz samples.
pub fn goertzel(samples: &[f64], freq: f64) -> f64 {
    goertzel_at(samples, freq, 8000.0)
}

/// Whether `pcmu` carries the 440 Hz tone: far more power there than at
/// 1000 Hz or 300 Hz.
pub fn has_tone(pcmu: &[u8]) -> bool {
    let samples: Vec<f64> = pcmu.iter().map(|b| ulaw(*b)).collect();
    let tone = goertzel(&samples, 440.0);
    let other = goertzel(&samples, 1000.0).max(goertzel(&samples, 300.0));
    eprintln!("Goertzel: 440 Hz {tone:.3e}, off-tone {other:.3e}");
    tone > 20.0 * other && tone > 0.0
}

/// Seconds of `samples` (at `rate`) in which `freq` is clearly there: the
/// samples are cut into 100 ms windows, and a window counts when its
/// amplitude at `freq` is at least 1% of full scale and 10 times the
/// amplitude at each of `others` (the other party's tone, the ringback
/// band, and a neutral frequency). Windows of silence (lost or late
/// packets, concealment) count for nothing, so a call that carried no
/// audio scores 0 however long it lasted.
pub fn tone_secs(samples: &[f64], rate: u32, freq: f64, others: &[f64]) -> f64 {
    let win = (rate / 10) as usize;
    let amp = |w: &[f64], f: f64| {
        2.0 * goertzel_at(w, f, f64::from(rate)).max(0.0).sqrt() / w.len() as f64
    };
    let good = samples
        .chunks_exact(win.max(1))
        .filter(|w| {
            let a = amp(w, freq);
            a >= 327.0 && others.iter().all(|o| a >= 10.0 * amp(w, *o))
        })
        .count();
    good as f64 / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f64, rate: u32, secs: f64, amp: f64) -> Vec<f64> {
        (0..(secs * f64::from(rate)) as usize)
            .map(|i| amp * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin())
            .collect()
    }

    #[test]
    fn tone_secs_counts_only_windows_carrying_the_tone() {
        let mut s = sine(700.0, 8000, 1.0, 8000.0);
        s.extend(std::iter::repeat_n(0.0, 8000));
        s.extend(sine(1100.0, 8000, 1.0, 8000.0));
        let t = tone_secs(&s, 8000, 700.0, &[1100.0, 425.0]);
        assert!((0.9..=1.0).contains(&t), "{t}");
        assert_eq!(tone_secs(&vec![0.0; 24000], 8000, 700.0, &[1100.0]), 0.0);
        // A weak tone (below 1% of full scale) is noise.
        assert_eq!(
            tone_secs(&sine(700.0, 8000, 1.0, 100.0), 8000, 700.0, &[]),
            0.0
        );
    }

    #[test]
    fn wav_parses_a_growing_file_and_mixes_channels() {
        let mut b = Vec::new();
        b.extend_from_slice(b"RIFF\0\0\0\0WAVEfmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&48000u32.to_le_bytes());
        b.extend_from_slice(&(48000u32 * 4).to_le_bytes());
        b.extend_from_slice(&4u16.to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(b"data\0\0\0\0");
        for v in [100i16, 300, -50, -150] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(7); // half a frame: ignored
        let w = Wav::parse(&b).expect("wav");
        assert_eq!(w.rate, 48000);
        assert_eq!(w.samples, vec![200.0, -100.0]);
        assert!(Wav::parse(b"RIFF").is_none());
    }

    #[test]
    fn tone_wav_reads_back_as_its_tone() {
        let w = Wav::parse(&tone_wav(500.0, 8000, 2)).expect("wav");
        assert_eq!((w.rate, w.samples.len()), (8000, 16000));
        assert!(tone_secs(&w.samples, w.rate, 500.0, &[1100.0]) >= 1.9);
    }

    #[test]
    fn netstrings_split() {
        assert_eq!(netstring(b"3:abc,4:de"), Some((&b"abc"[..], &b"4:de"[..])));
        assert_eq!(netstring(b"3:ab"), None);
    }
}
