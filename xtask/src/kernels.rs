//! `cargo xtask kernels`: the kernel support matrix (issue #14).
//!
//! README promises Linux ≥ 6.1. This proves it on the kernels Debian 12
//! ships: for each series in [`SERIES`] the newest cloud kernel package
//! apt offers is downloaded (`apt-get download`, cached under
//! `target/kernels/`) and unpacked with `dpkg -x` (nothing is installed,
//! /boot is never touched), then booted under qemu (TCG, 1 vCPU, no NIC)
//! with a minimal busybox initramfs that holds the guest binaries of
//! [`GUEST_TARGETS`], their shared libraries, iproute2's `ip` and the
//! kernel's veth module. The guest runs [`TEST_SCRIPT`]:
//!
//! 1. the agent (`sip-edge run`: the production loader, verifier, attach to
//!    two veths) and the verifier's processed-instruction count of the
//!    loaded XDP program (`verified_insns` of its fd, kernel ≥ 5.16), or on
//!    a rejection the count and message from the verifier log;
//! 2. every datapath verdict fixture (BPF_PROG_TEST_RUN) through the tester;
//! 3. the verifier tests (production loader, map declarations, pinning).
//!
//! The host runs the same script in a private network namespace. The
//! result is a table per kernel and `target/kernels/report.json`; the
//! command fails if any kernel fails or the program needs 10% or more of
//! the verifier's 1M-instruction budget.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{apt_install, run, step};

/// Debian packages this command needs beyond `cargo xtask setup`'s.
const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "zstd",
    "iproute2",
    "util-linux",
];

/// A kernel series of the matrix: Debian package names are
/// `<prefix><number><suffix>`; the highest number apt knows is used.
struct Series {
    label: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

/// Debian 12's own kernel (6.1) and its backports kernel (6.12).
const SERIES: &[Series] = &[
    Series {
        label: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-cloud-amd64",
    },
    Series {
        label: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-cloud-amd64",
    },
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bin,
    Test,
}

/// A binary the guest runs: built with `cargo build -p <package>
/// --bin/--test <name>`, installed in the guest as `/kt/<guest>`.
struct GuestTarget {
    package: &'static str,
    kind: Kind,
    name: &'static str,
    guest: &'static str,
}

/// Everything the guest runs, and the only place that names cargo packages
/// and targets: when the fixtures and their tester move to another crate,
/// this table is the one edit.
const GUEST_TARGETS: &[GuestTarget] = &[
    GuestTarget {
        package: "sip-edge",
        kind: Kind::Bin,
        name: "sip-edge",
        guest: "agent",
    },
    GuestTarget {
        package: "sip-edge-tests",
        kind: Kind::Bin,
        name: "sip-edge-tester",
        guest: "tester",
    },
    GuestTarget {
        package: "sip-edge-tests",
        kind: Kind::Test,
        name: "datapath_verifier",
        guest: "verifier",
    },
];

/// Modules the guest loads (with their dependencies) before the tests.
const GUEST_MODULES: &[&str] = &["veth"];

/// Hard limit for one VM, boot to power-off (TCG takes a few minutes).
const VM_TIMEOUT: Duration = Duration::from_secs(600);
/// Hard limit for the host run.
const HOST_TIMEOUT: Duration = Duration::from_secs(300);
/// The verifier's instruction budget (BPF_COMPLEXITY_LIMIT_INSNS).
const VERIFIER_LIMIT: u64 = 1_000_000;
/// The program must verify in less than this (10% of the budget).
const INSNS_BUDGET: u64 = VERIFIER_LIMIT / 10;
/// Prefix of the one machine-readable line the test script prints.
const RESULT_TAG: &str = "SIP-EDGE-KT-RESULT ";
/// Prefix of the verifier's rejection message, when there is one.
const REJECT_TAG: &str = "SIP-EDGE-KT-REJECT ";

/// The checks, run by the guest's init and, on the host, in a private
/// network namespace. POSIX sh (busybox ash in the guest, dash on the
/// host). `$1`: directory holding agent, tester and verifier; `$2`: a
/// scratch directory. Ends with one `SIP-EDGE-KT-RESULT key=value ...`
/// line. Every wait is bounded.
const TEST_SCRIPT: &str = r#"#!/bin/sh
# sip-edge kernel matrix checks (written by `cargo xtask kernels`).
B="$1"
W="$2"
mkdir -p "$W"
kernel=$(uname -r)
echo "SIP-EDGE-KT-BEGIN kernel=$kernel"
# iproute2's ip by path: busybox's shell prefers its own applets by name.
IP=
for c in /usr/local/sbin/ip /usr/sbin/ip /sbin/ip /usr/bin/ip; do
    if [ -x "$c" ]; then IP=$c; break; fi
done

# (a) The agent: production loader, verifier, attach to two veths.
pin="/sys/fs/bpf/sip-edge-kt-$$"
$IP link add ktint0 type veth peer name ktint0p
$IP link add ktext0 type veth peer name ktext0p
for l in ktint0 ktint0p ktext0 ktext0p; do $IP link set "$l" up; done
$IP addr add 10.77.0.1/24 dev ktint0
$IP addr add 203.0.113.1/24 dev ktext0
cat > "$W/agent.toml" <<EOF
pin_dir = "$pin"
on_exit = "remove"
[xdp]
mode = "native"
[[interface]]
name = "ktint0"
role = "internal"
[[interface]]
name = "ktext0"
role = "external"
[addresses]
internal = ["10.77.0.1"]
public = ["203.0.113.1"]
[media]
port_ranges = ["40000-49999"]
[signalling]
ports = [5061]
admin_ports = [22]
EOF
NO_COLOR=1 SIP_EDGE_LOG=info "$B/agent" run --config "$W/agent.toml" > "$W/agent.log" 2>&1 &
apid=$!
# Ready: the agent logs this after load, attach and config maps.
ready="no \[proxy\] section"
i=0
while [ $i -lt 300 ] && kill -0 $apid 2>/dev/null && ! grep -q "$ready" "$W/agent.log"; do
    sleep 1
    i=$((i + 1))
done
load=fail
insns=0
progs=0
if kill -0 $apid 2>/dev/null && grep -q "$ready" "$W/agent.log"; then
    load=ok
    for f in /proc/$apid/fdinfo/*; do
        v=$(sed -n 's/^verified_insns:[[:space:]]*//p' "$f" 2>/dev/null)
        if [ -n "$v" ]; then
            progs=$((progs + 1))
            if [ "$v" -gt "$insns" ]; then insns=$v; fi
        fi
    done
fi
kill -TERM $apid 2>/dev/null
i=0
while [ $i -lt 60 ] && kill -0 $apid 2>/dev/null; do
    sleep 1
    i=$((i + 1))
done
kill -KILL $apid 2>/dev/null
wait $apid
arc=$?
rejected=$(grep -o 'processed [0-9]* insns' "$W/agent.log" | tail -n 1 | grep -o '[0-9][0-9]*')
[ -n "$rejected" ] || rejected=0
if [ "$load" != ok ]; then
    # The verifier's message: the lines between the last instruction it
    # printed and its statistics.
    reason=$(awk '/^(verification time|stack depth|processed [0-9]+ insns)/ { if (msg != "") { print msg; exit } next } /^[0-9]+: |^;/ { msg = ""; next } NF { msg = (msg == "" ? $0 : msg " / " $0) }' "$W/agent.log")
    [ -n "$reason" ] || reason=$(grep -v '^[[:space:]]*$' "$W/agent.log" | tail -n 1)
    echo "--- agent log (tail) ---"
    tail -n 30 "$W/agent.log"
    echo "SIP-EDGE-KT-REJECT $reason"
else
    grep -v '^[[:space:]]*$' "$W/agent.log" | tail -n 5
fi
rm -rf "$pin"
$IP link del ktint0 2>/dev/null
$IP link del ktext0 2>/dev/null

# (b) Every datapath verdict fixture (BPF_PROG_TEST_RUN).
"$B/tester" > "$W/tester.log" 2>&1
frc=$?
echo "--- tester (exit $frc; PASS lines omitted) ---"
grep -v '^PASS ' "$W/tester.log" | tail -n 60
fline=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$W/tester.log" | tail -n 1)
fp=$(echo "$fline" | sed -n 's/^\([0-9]*\) passed.*/\1/p')
ff=$(echo "$fline" | sed -n 's/.* \([0-9]*\) failed$/\1/p')
[ -n "$fp" ] || fp=0
[ -n "$ff" ] || ff=0

# (c) The verifier tests (production loader, maps, pinning).
SIP_EDGE_SKIP_LOG="$W/skipped.log" "$B/verifier" --test-threads=1 > "$W/verifier.log" 2>&1
vrc=$?
echo "--- verifier tests (exit $vrc) ---"
grep -E '^test |^test result:|panicked|SKIPPED' "$W/verifier.log" | tail -n 30
vline=$(grep '^test result:' "$W/verifier.log" | tail -n 1)
vp=$(echo "$vline" | sed -n 's/.* \([0-9]*\) passed;.*/\1/p')
vf=$(echo "$vline" | sed -n 's/.* \([0-9]*\) failed;.*/\1/p')
vs=0
[ -f "$W/skipped.log" ] && vs=$(wc -l < "$W/skipped.log")
[ -n "$vp" ] || vp=0
[ -n "$vf" ] || vf=0

echo "SIP-EDGE-KT-RESULT kernel=$kernel load=$load agent_exit=$arc progs=$progs verified_insns=$insns rejected_at=$rejected fixtures_passed=$fp fixtures_failed=$ff fixtures_exit=$frc verifier_tests_passed=$vp verifier_tests_failed=$vf verifier_tests_skipped=$vs verifier_tests_exit=$vrc"
"#;

/// The guest's /init: mounts, veth, the checks, power off.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
ip link set lo up
echo "SIP-EDGE-KT-BOOT $(uname -r)"
for m in $(cat /kt/modules/order); do
    insmod "/kt/modules/$m.ko" || echo "SIP-EDGE-KT-INSMOD-FAILED $m"
done
sh /kt/tests.sh /kt /tmp/kt
echo "SIP-EDGE-KT-DONE"
sync
poweroff -f
reboot -f
"#;

/// What one kernel (or the host) did.
#[derive(Default, Debug)]
struct Outcome {
    /// "6.1", "6.12" or "host".
    label: String,
    /// Debian package (empty for the host).
    package: String,
    /// `uname -r` as the checks saw it.
    kernel: String,
    /// The result line's fields; empty when it never came.
    fields: BTreeMap<String, String>,
    /// The verifier's message when the program was rejected.
    reject: Option<String>,
    /// Why there is no result (timeout, boot failure, ...).
    error: Option<String>,
    /// Wall time of the run (boot included for VMs).
    secs: f64,
}

impl Outcome {
    fn num(&self, k: &str) -> Option<u64> {
        self.fields.get(k).and_then(|v| v.parse().ok())
    }

    fn loaded(&self) -> bool {
        self.fields.get("load").map(String::as_str) == Some("ok")
    }

    fn insns(&self) -> Option<u64> {
        self.num("verified_insns").filter(|&n| n > 0)
    }

    fn fixtures_ok(&self) -> bool {
        self.num("fixtures_exit") == Some(0)
            && self.num("fixtures_failed") == Some(0)
            && self.num("fixtures_passed").unwrap_or(0) > 0
    }

    fn verifier_tests_ok(&self) -> bool {
        self.num("verifier_tests_exit") == Some(0)
            && self.num("verifier_tests_failed") == Some(0)
            && self.num("verifier_tests_skipped") == Some(0)
            && self.num("verifier_tests_passed").unwrap_or(0) > 0
    }

    /// Why this run fails the matrix, or `None`.
    fn failure(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(e.clone());
        }
        if !self.loaded() {
            return Some(format!(
                "verifier rejected the program: {}",
                self.reject.as_deref().unwrap_or("(no message)")
            ));
        }
        match self.insns() {
            None => return Some("verified_insns not reported".into()),
            Some(n) if n >= INSNS_BUDGET => {
                return Some(format!("verified_insns {n} >= budget {INSNS_BUDGET}"))
            }
            Some(_) => {}
        }
        if !self.fixtures_ok() {
            return Some("datapath fixtures failed".into());
        }
        if !self.verifier_tests_ok() {
            return Some("verifier tests failed or skipped".into());
        }
        None
    }
}

/// Entry point of `cargo xtask kernels` (after `setup`).
pub fn kernels(root: &Path) -> Result<()> {
    let started = Instant::now();
    apt_install(APT_PACKAGES)?;
    let dir = root.join("target/kernels");
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let bins = build_guest_binaries()?;
    let script = dir.join("tests.sh");
    fs::write(&script, TEST_SCRIPT).with_context(|| format!("write {}", script.display()))?;

    let mut outcomes = vec![run_host(&dir, &bins, &script)];
    let names = kernel_package_names()?;
    for s in SERIES {
        let out = match newest(&names, s.prefix, s.suffix) {
            None => Outcome {
                label: s.label.into(),
                error: Some(format!("apt offers no {}N{} package", s.prefix, s.suffix)),
                ..Outcome::default()
            },
            Some(pkg) => run_kernel(&dir, s.label, &pkg, &bins).unwrap_or_else(|e| Outcome {
                label: s.label.into(),
                package: pkg.clone(),
                error: Some(format!("{e:#}")),
                ..Outcome::default()
            }),
        };
        outcomes.push(out);
    }

    let table = render_table(&outcomes);
    println!("\nKernel support matrix (verifier budget {VERIFIER_LIMIT} insns; must stay under {INSNS_BUDGET}):\n");
    print!("{table}");
    let wall = started.elapsed().as_secs_f64();
    println!("\nwall time: {wall:.0} s");
    let report = dir.join("report.json");
    let json = report_json(&outcomes, wall);
    fs::write(&report, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("write {}", report.display()))?;
    step(&format!("wrote {}", report.display()));
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.failure().map(|f| format!("{}: {f}", o.label)))
        .collect();
    if !failed.is_empty() {
        for f in &failed {
            eprintln!("FAILED {f}");
        }
        bail!(
            "kernel matrix: {} of {} failed",
            failed.len(),
            outcomes.len()
        );
    }
    println!("kernel matrix: all {} passed", outcomes.len());
    Ok(())
}

/// Build [`GUEST_TARGETS`] (dev profile, as `cargo xtask test` does) and
/// return each guest name with its executable.
fn build_guest_binaries() -> Result<Vec<(&'static str, PathBuf)>> {
    let packages: BTreeSet<&str> = GUEST_TARGETS.iter().map(|t| t.package).collect();
    let mut found: BTreeMap<&'static str, PathBuf> = BTreeMap::new();
    for pkg in packages {
        let mut cmd = Command::new("cargo");
        cmd.args([
            "build",
            "--locked",
            "--message-format=json-render-diagnostics",
            "-p",
            pkg,
        ]);
        for t in GUEST_TARGETS.iter().filter(|t| t.package == pkg) {
            cmd.arg(match t.kind {
                Kind::Bin => "--bin",
                Kind::Test => "--test",
            })
            .arg(t.name);
        }
        step(&format!("running {cmd:?}"));
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("spawning {cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?} failed: {}", out.status);
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if msg["reason"] != "compiler-artifact" {
                continue;
            }
            let Some(exe) = msg["executable"].as_str() else {
                continue;
            };
            let name = msg["target"]["name"].as_str().unwrap_or_default();
            let kinds: Vec<&str> = msg["target"]["kind"]
                .as_array()
                .map(|a| a.iter().filter_map(|k| k.as_str()).collect())
                .unwrap_or_default();
            for t in GUEST_TARGETS
                .iter()
                .filter(|t| t.package == pkg && t.name == name)
            {
                let kind = match t.kind {
                    Kind::Bin => "bin",
                    Kind::Test => "test",
                };
                if kinds.contains(&kind) {
                    found.insert(t.guest, PathBuf::from(exe));
                }
            }
        }
    }
    GUEST_TARGETS
        .iter()
        .map(|t| {
            found
                .get(t.guest)
                .map(|p| (t.guest, p.clone()))
                .with_context(|| format!("cargo built no executable for {} {}", t.package, t.name))
        })
        .collect()
}

/// Run `cmd` in its own process group with stdout and stderr streamed to
/// our stderr (each line prefixed) and saved to `log`; kill the group at
/// `timeout`. Returns the output and whether it timed out.
fn run_streaming(
    cmd: &mut Command,
    prefix: &str,
    log: &Path,
    timeout: Duration,
) -> Result<(String, bool)> {
    step(&format!(
        "running {cmd:?} (timeout {} s, log {})",
        timeout.as_secs(),
        log.display()
    ));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let pgid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(out).split(b'\n').map_while(|l| l.ok()) {
                let _ = tx.send(
                    String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_owned(),
                );
            }
        }));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(err).split(b'\n').map_while(|l| l.ok()) {
                let _ = tx.send(
                    String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_owned(),
                );
            }
        }));
    }
    drop(tx);
    let mut file = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut text = String::new();
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let mut open = true;
    let status = loop {
        if open {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    eprintln!("[{prefix}] {line}");
                    let _ = writeln!(file, "{line}");
                    text.push_str(&line);
                    text.push('\n');
                    if Instant::now() <= deadline {
                        continue;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => open = false,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
        if !open {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for {cmd:?}"))?
            {
                break status;
            }
        }
        if Instant::now() > deadline {
            timed_out = true;
            // Our own child's process group, by id (the shell's builtin
            // kill: procps may be absent).
            let _ = Command::new("sh")
                .args(["-c", &format!("kill -s KILL -- -{pgid}")])
                .status();
            break child
                .wait()
                .with_context(|| format!("waiting for {cmd:?}"))?;
        }
    };
    // Readers end at EOF (the group is gone); drain what is left.
    for r in readers {
        let _ = r.join();
    }
    while let Ok(line) = rx.try_recv() {
        let _ = writeln!(file, "{line}");
        text.push_str(&line);
        text.push('\n');
    }
    if !timed_out && !status.success() {
        step(&format!("{prefix}: exited with {status}"));
    }
    Ok((text, timed_out))
}

/// Fill `o` from the script's output.
fn parse_output(o: &mut Outcome, text: &str) {
    for line in text.lines() {
        // The console may put kernel messages in front of a line.
        if let Some(pos) = line.find(RESULT_TAG) {
            o.fields = parse_fields(&line[pos + RESULT_TAG.len()..]);
        } else if let Some(pos) = line.find(REJECT_TAG) {
            o.reject = Some(line[pos + REJECT_TAG.len()..].trim().to_owned());
        }
    }
    if let Some(k) = o.fields.get("kernel") {
        o.kernel = k.clone();
    }
}

fn parse_fields(s: &str) -> BTreeMap<String, String> {
    s.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The checks on the host, in a private network namespace (the agent's
/// veths vanish with it; the tester makes its own namespace inside).
fn run_host(dir: &Path, bins: &[(&str, PathBuf)], script: &Path) -> Outcome {
    let started = Instant::now();
    let mut o = Outcome {
        label: "host".into(),
        ..Outcome::default()
    };
    let scratch = dir.join("host-scratch");
    let res = (|| -> Result<String> {
        let _ = fs::remove_dir_all(&scratch);
        let bindir = scratch.join("bin");
        fs::create_dir_all(&bindir)?;
        for (guest, exe) in bins {
            std::os::unix::fs::symlink(exe, bindir.join(guest))?;
        }
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--", "sh"])
            .arg(script)
            .arg(&bindir)
            .arg(scratch.join("work"));
        let (text, timed_out) =
            run_streaming(&mut cmd, "host", &dir.join("host.log"), HOST_TIMEOUT)?;
        if timed_out {
            bail!(
                "host checks did not finish within {} s",
                HOST_TIMEOUT.as_secs()
            );
        }
        Ok(text)
    })();
    match res {
        Ok(text) => {
            parse_output(&mut o, &text);
            if o.fields.is_empty() {
                o.error = Some("no result line from the host checks".into());
            }
        }
        Err(e) => o.error = Some(format!("{e:#}")),
    }
    if let Err(e) = fs::remove_dir_all(&scratch) {
        step(&format!("removing {}: {e}", scratch.display()));
    }
    if o.kernel.is_empty() {
        o.kernel = Command::new("uname")
            .arg("-r")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default();
    }
    o.secs = started.elapsed().as_secs_f64();
    o
}

/// Every `linux-image-*` package name apt knows (updating the lists once
/// when none of [`SERIES`] is among them, as on a fresh machine).
fn kernel_package_names() -> Result<Vec<String>> {
    let list = || -> Result<Vec<String>> {
        let out = Command::new("apt-cache")
            .args(["pkgnames", "linux-image-"])
            .output()
            .context("spawning apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    };
    let names = list()?;
    if SERIES
        .iter()
        .all(|s| newest(&names, s.prefix, s.suffix).is_some())
    {
        return Ok(names);
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    list()
}

/// The package `<prefix>N<suffix>` with the highest N (digits only).
fn newest(names: &[String], prefix: &str, suffix: &str) -> Option<String> {
    names
        .iter()
        .filter_map(|n| {
            let mid = n.strip_prefix(prefix)?.strip_suffix(suffix)?;
            if mid.is_empty() || !mid.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some((mid.parse::<u64>().ok()?, n))
        })
        .max()
        .map(|(_, n)| n.clone())
}

/// Download (cached) and unpack (cached) `pkg`; boot it with the checks.
fn run_kernel(dir: &Path, label: &str, pkg: &str, bins: &[(&str, PathBuf)]) -> Result<Outcome> {
    let started = Instant::now();
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = match find_deb(&debs, pkg)? {
        Some(d) => {
            step(&format!("{pkg}: cached {}", d.display()));
            d
        }
        None => {
            run(Command::new("apt-get")
                .args(["download", "-qq", pkg])
                .current_dir(&debs))?;
            find_deb(&debs, pkg)?.with_context(|| format!("apt-get download {pkg} left no .deb"))?
        }
    };
    let unpacked = dir.join(pkg);
    let marker = unpacked.join(".unpacked");
    if !marker.exists() {
        let _ = fs::remove_dir_all(&unpacked);
        fs::create_dir_all(&unpacked)?;
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
        fs::write(&marker, deb.display().to_string())?;
    }
    let (vmlinuz, release) = find_vmlinuz(&unpacked)?;
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|m| unpacked.join(m).join(&release))
        .find(|p| p.is_dir())
        .with_context(|| format!("{pkg} has no modules directory for {release}"))?;

    let initrd = dir.join(format!("initrd-{release}.cpio"));
    build_initramfs(dir, &release, &modules, bins, &initrd)?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 loglevel=4 rdinit=/init",
            "-nographic",
            "-m",
            "1G",
            "-smp",
            "1",
            "-nic",
            "none",
            "-no-reboot",
        ]);
    let log = dir.join(format!("{label}.log"));
    let res = run_streaming(&mut cmd, label, &log, VM_TIMEOUT);
    let _ = fs::remove_file(&initrd);
    let (text, timed_out) = res?;
    let mut o = Outcome {
        label: label.into(),
        package: pkg.into(),
        kernel: release,
        ..Outcome::default()
    };
    parse_output(&mut o, &text);
    if timed_out {
        o.error = Some(format!(
            "VM did not finish within {} s",
            VM_TIMEOUT.as_secs()
        ));
    } else if o.fields.is_empty() {
        o.error = Some(format!(
            "no result line from the guest (see {})",
            log.display()
        ));
    }
    if text.contains("SIP-EDGE-KT-INSMOD-FAILED") && o.error.is_none() && !o.loaded() {
        o.error = Some("a guest module failed to load (see the log)".into());
    }
    o.secs = started.elapsed().as_secs_f64();
    Ok(o)
}

fn find_deb(debs: &Path, pkg: &str) -> Result<Option<PathBuf>> {
    let want = format!("{pkg}_");
    for e in fs::read_dir(debs).with_context(|| format!("read {}", debs.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with(&want) && name.ends_with(".deb") {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// `boot/vmlinuz-<release>` of an unpacked kernel package.
fn find_vmlinuz(unpacked: &Path) -> Result<(PathBuf, String)> {
    let boot = unpacked.join("boot");
    for e in fs::read_dir(&boot).with_context(|| format!("read {}", boot.display()))? {
        let p = e?.path();
        if let Some(rel) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
        {
            return Ok((p.clone(), rel.to_owned()));
        }
    }
    bail!("no vmlinuz in {}", boot.display())
}

/// Write the initramfs (an uncompressed newc cpio) for one kernel.
fn build_initramfs(
    dir: &Path,
    release: &str,
    modules: &Path,
    bins: &[(&str, PathBuf)],
    out: &Path,
) -> Result<()> {
    let stage = dir.join(format!("initramfs-{release}"));
    let res = (|| -> Result<()> {
        let _ = fs::remove_dir_all(&stage);
        for d in [
            "bin",
            "usr/local/sbin",
            "proc",
            "sys",
            "dev",
            "run",
            "tmp",
            "etc",
            "kt/modules",
        ] {
            fs::create_dir_all(stage.join(d))?;
        }
        let busybox = first_existing(&["/bin/busybox", "/usr/bin/busybox"])
            .context("busybox-static is not installed")?;
        fs::copy(&busybox, stage.join("bin/busybox"))?;
        let ip = first_existing(&["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"])
            .context("iproute2's ip is not installed")?;
        let mut dynamic = vec![ip.clone()];
        fs::copy(&ip, stage.join("usr/local/sbin/ip"))?;
        let strip = Path::new("/usr/lib/llvm-22/bin/llvm-strip");
        for (guest, exe) in bins {
            let dst = stage.join("kt").join(guest);
            // Without debug info the initramfs is a fraction of the size.
            let stripped = strip.exists()
                && Command::new(strip)
                    .arg("--strip-debug")
                    .arg("-o")
                    .arg(&dst)
                    .arg(exe)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
            if !stripped {
                fs::copy(exe, &dst).with_context(|| format!("copy {}", exe.display()))?;
            }
            dynamic.push(exe.clone());
        }
        let mut libs = BTreeSet::new();
        for exe in &dynamic {
            libs.extend(shared_libs(exe)?);
        }
        for lib in &libs {
            let rel = lib.strip_prefix("/").unwrap_or(lib);
            let dst = stage.join(rel);
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent)?;
            }
            // Follows symlinks: the file lands under the name the loader asks for.
            fs::copy(lib, &dst).with_context(|| format!("copy {}", lib.display()))?;
        }
        let order = copy_modules(modules, &stage.join("kt/modules"))?;
        fs::write(stage.join("kt/modules/order"), order.join("\n") + "\n")?;
        write_exec(&stage.join("init"), INIT_SCRIPT)?;
        write_exec(&stage.join("kt/tests.sh"), TEST_SCRIPT)?;
        // The console the kernel opens for init (init re-opens it after
        // mounting devtmpfs should this fail).
        let _ = Command::new("mknod")
            .arg(stage.join("dev/console"))
            .args(["c", "5", "1"])
            .status();
        let file = fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
        let status = Command::new("sh")
            .args(["-c", "find . -print | cpio -o -H newc -R 0:0 --quiet"])
            .current_dir(&stage)
            .stdout(file)
            .status()
            .context("spawning cpio")?;
        if !status.success() {
            bail!("cpio failed: {status}");
        }
        Ok(())
    })();
    if let Err(e) = fs::remove_dir_all(&stage) {
        step(&format!("removing {}: {e}", stage.display()));
    }
    let size = fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    step(&format!("initramfs {} ({} MB)", out.display(), size >> 20));
    res
}

fn first_existing(paths: &[&str]) -> Option<PathBuf> {
    paths.iter().map(PathBuf::from).find(|p| p.exists())
}

fn write_exec(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Shared libraries and the dynamic loader `ldd` names for `exe`.
fn shared_libs(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("spawning ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": nothing to copy.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            bail!("{}: {}", exe.display(), line.trim());
        }
    }
    Ok(libs)
}

/// Copy [`GUEST_MODULES`] and their dependencies, decompressed, into
/// `dst`; returns the names in load order (dependencies first).
fn copy_modules(modules: &Path, dst: &Path) -> Result<Vec<String>> {
    let mut index = BTreeMap::new();
    index_modules(modules, 0, &mut index)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for m in GUEST_MODULES {
        add_module(m, &index, dst, 0, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// Module name (with `-` as `_`) → file, for every module under `dir`.
fn index_modules(dir: &Path, depth: u32, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    if depth > 12 {
        return Ok(());
    }
    for e in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            index_modules(&p, depth + 1, index)?;
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            for ext in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
                if let Some(stem) = name.strip_suffix(ext) {
                    index.insert(stem.replace('-', "_"), p.clone());
                }
            }
        }
    }
    Ok(())
}

fn add_module(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    dst: &Path,
    depth: u32,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> Result<()> {
    let key = name.replace('-', "_");
    if !seen.insert(key.clone()) {
        return Ok(());
    }
    if depth > 8 {
        bail!("module dependencies nest deeper than 8 at {name}");
    }
    let src = index
        .get(&key)
        .with_context(|| format!("module {name} is not in the kernel package (built in?)"))?;
    let bytes = read_module(src)?;
    for dep in module_depends(&bytes) {
        add_module(&dep, index, dst, depth + 1, seen, order)?;
    }
    fs::write(dst.join(format!("{key}.ko")), &bytes)?;
    order.push(key);
    Ok(())
}

/// A module file's ELF bytes (decompressed: busybox insmod takes plain ELF).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("read {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("spawning {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed: {}", path.display(), out.status);
    }
    Ok(out.stdout)
}

/// The `depends=` list of a module's `.modinfo` (NUL-separated key=value).
fn module_depends(elf: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let mut deps = Vec::new();
    let mut i = 0;
    while let Some(pos) = elf[i..].windows(key.len()).position(|w| w == key) {
        let start = i + pos;
        i = start + key.len();
        if start > 0 && elf[start - 1] != 0 {
            continue;
        }
        let end = elf[i..]
            .iter()
            .position(|&b| b == 0)
            .map_or(elf.len(), |n| i + n);
        deps.extend(
            String::from_utf8_lossy(&elf[i..end])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_owned),
        );
        break;
    }
    deps
}

fn render_table(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "| run | kernel | load | verified_insns | % of 1M | fixtures passed/failed | verifier tests | time |\n\
         |---|---|---|---:|---:|---|---|---:|\n",
    );
    for o in outcomes {
        let load = match (&o.error, o.loaded()) {
            (_, true) => "ok".to_owned(),
            (Some(e), false) if o.fields.is_empty() => format!("error: {e}"),
            _ => match o.num("rejected_at").filter(|&n| n > 0) {
                Some(n) => format!("REJECTED after {n} insns"),
                None => "FAILED".to_owned(),
            },
        };
        let (insns, pct) = match o.insns() {
            Some(n) => (
                n.to_string(),
                format!("{:.2}%", n as f64 * 100.0 / VERIFIER_LIMIT as f64),
            ),
            None => ("-".into(), "-".into()),
        };
        let fixtures = if o.fields.is_empty() {
            "-".to_owned()
        } else if o.num("fixtures_passed").unwrap_or(0) + o.num("fixtures_failed").unwrap_or(0) == 0
        {
            format!(
                "none ran (exit {})",
                o.fields.get("fixtures_exit").map_or("?", String::as_str)
            )
        } else {
            format!(
                "{}/{}",
                o.num("fixtures_passed").unwrap_or(0),
                o.num("fixtures_failed").unwrap_or(0)
            )
        };
        let vtests = if o.fields.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{} passed, {} failed, {} skipped",
                o.num("verifier_tests_passed").unwrap_or(0),
                o.num("verifier_tests_failed").unwrap_or(0),
                o.num("verifier_tests_skipped").unwrap_or(0)
            )
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} s |\n",
            o.label, o.kernel, load, insns, pct, fixtures, vtests, o.secs
        ));
    }
    s
}

fn report_json(outcomes: &[Outcome], wall: f64) -> serde_json::Value {
    let runs: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|o| {
            serde_json::json!({
                "run": o.label,
                "package": (!o.package.is_empty()).then_some(&o.package),
                "kernel": o.kernel,
                "load": o.loaded(),
                "verified_insns": o.insns(),
                "verified_insns_pct_of_limit": o.insns().map(|n| n as f64 * 100.0 / VERIFIER_LIMIT as f64),
                "rejected_after_insns": (!o.loaded()).then(|| o.num("rejected_at")).flatten().filter(|&n| n > 0),
                "reject_message": o.reject,
                "fixtures_passed": o.num("fixtures_passed"),
                "fixtures_failed": o.num("fixtures_failed"),
                "fixtures_exit": o.num("fixtures_exit"),
                "verifier_tests_passed": o.num("verifier_tests_passed"),
                "verifier_tests_failed": o.num("verifier_tests_failed"),
                "verifier_tests_skipped": o.num("verifier_tests_skipped"),
                "seconds": (o.secs * 10.0).round() / 10.0,
                "ok": o.failure().is_none(),
                "failure": o.failure(),
            })
        })
        .collect();
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    serde_json::json!({
        "commit": git(&["rev-parse", "HEAD"]),
        "worktree_dirty": git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
        "verifier_limit": VERIFIER_LIMIT,
        "insns_budget": INSNS_BUDGET,
        "wall_seconds": wall.round(),
        "ok": outcomes.iter().all(|o| o.failure().is_none()),
        "runs": runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_compares_numbers_not_strings() {
        let names: Vec<String> = [
            "linux-image-6.1.0-9-cloud-amd64",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-57-cloud-amd64-dbg",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.12.9+deb12-cloud-amd64",
            "linux-image-6.12.118+deb12-cloud-amd64",
            "linux-image-6.12-cloud-amd64",
            "linux-image-cloud-amd64",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            newest(&names, SERIES[0].prefix, SERIES[0].suffix).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        assert_eq!(
            newest(&names, SERIES[1].prefix, SERIES[1].suffix).as_deref(),
            Some("linux-image-6.12.118+deb12-cloud-amd64")
        );
        assert_eq!(newest(&names, "linux-image-5.10.0-", "-cloud-amd64"), None);
    }

    #[test]
    fn modinfo_depends_are_read() {
        let elf = b"\x7fELF..license=GPL\0depends=udp_tunnel,ip6_udp_tunnel\0intree=Y\0";
        assert_eq!(module_depends(elf), ["udp_tunnel", "ip6_udp_tunnel"]);
        assert!(module_depends(b"x\0depends=\0name=veth\0").is_empty());
        assert!(module_depends(b"xdepends=a\0").is_empty());
    }

    #[test]
    fn result_line_is_parsed_behind_console_noise() {
        let mut o = Outcome::default();
        parse_output(
            &mut o,
            "[    3.1] random: crng init done\n\
             SIP-EDGE-KT-REJECT invalid access to map value, value_size=672 off=672 size=4\n\
             [ 9.9] x SIP-EDGE-KT-RESULT kernel=6.1.0-57-cloud-amd64 load=fail verified_insns=0 rejected_at=22165 fixtures_passed=0 fixtures_failed=0 fixtures_exit=2\n",
        );
        assert_eq!(o.kernel, "6.1.0-57-cloud-amd64");
        assert!(!o.loaded());
        assert_eq!(o.num("rejected_at"), Some(22165));
        assert_eq!(o.insns(), None);
        assert!(o
            .reject
            .as_deref()
            .unwrap_or_default()
            .contains("value_size=672"));
        assert!(o.failure().is_some());
    }

    #[test]
    fn streaming_run_kills_the_whole_group_at_the_timeout() {
        let dir = std::env::temp_dir().join(format!("xtask-kt-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("scratch dir");
        let log = dir.join("log");
        let started = Instant::now();
        let (text, timed_out) = run_streaming(
            Command::new("sh").args(["-c", "echo begin; sleep 30 & sleep 30"]),
            "t",
            &log,
            Duration::from_secs(1),
        )
        .expect("run");
        assert!(timed_out);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(text, "begin\n");
        assert_eq!(fs::read_to_string(&log).expect("log"), "begin\n");
        let (text, timed_out) = run_streaming(
            Command::new("sh").args(["-c", "echo a; echo b >&2"]),
            "t",
            &log,
            Duration::from_secs(30),
        )
        .expect("run");
        assert!(!timed_out);
        assert!(text.contains("a\n") && text.contains("b\n"));
        fs::remove_dir_all(&dir).expect("remove scratch dir");
    }

    #[test]
    fn budget_is_enforced() {
        let mut o = Outcome::default();
        parse_output(&mut o, "SIP-EDGE-KT-RESULT kernel=k load=ok verified_insns=100000 fixtures_passed=84 fixtures_failed=0 fixtures_exit=0 verifier_tests_passed=4 verifier_tests_failed=0 verifier_tests_skipped=0 verifier_tests_exit=0\n");
        assert!(o.failure().is_some_and(|f| f.contains("budget")));
        o.fields.insert("verified_insns".into(), "99999".into());
        assert_eq!(o.failure(), None);
    }
}
