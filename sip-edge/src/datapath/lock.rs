//! One agent per pin directory: `sip-edge run` takes an exclusive
//! `flock(2)` on a lock file keyed by its `pin_dir` before it touches the
//! kernel, and a second agent on the same `pin_dir` refuses to start,
//! naming the first one's pid (issue #14 item 8: a second agent used to
//! swap its program into the running agent's links and, with
//! `on_exit = "remove"`, delete every pin under it on exit).
//!
//! Why a file outside bpffs: bpffs holds only BPF objects (no regular
//! files to lock), and a lock must vanish by itself when its holder dies,
//! `kill -9` included; a `flock` on an open file does, a pid file does not.
//! The file lives in [`RUN_DIR`] (a tmpfs, like bpffs emptied on reboot)
//! named after the pin directory (systemd-escape style, so every pin_dir
//! has its own), and holds the holder's pid for the refusal message.
//! The same key names the media layer's state file ([`state_path`]).
//!
//! Removal: the holder unlinks the file on exit while still holding the
//! lock; an acquirer checks after locking that the path still names the
//! file it locked (same inode) and retries otherwise, so an unlink never
//! lets two agents in.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

/// Where lock and state files live.
pub const RUN_DIR: &str = "/run/sip-edge";

/// Tries before giving up on a lock file that keeps being replaced.
const ATTEMPTS: usize = 5;

/// Errors of taking the pin directory lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another agent holds the lock.
    #[error("pin_dir {pin_dir} is in use by another sip-edge agent (pid {pid}, lock {lock}); stop that agent first, or give this one its own pin_dir")]
    Held {
        /// The contested pin directory.
        pin_dir: PathBuf,
        /// The holder's pid as it wrote it (`unknown` if it had not yet).
        pid: String,
        /// The lock file.
        lock: PathBuf,
    },
    /// The lock file could not be created, locked or written.
    #[error("cannot {op} the pin_dir lock {path}: {source}; the agent needs a writable {RUN_DIR} (it runs as root)")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The lock file or its directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LockError + 'a {
    move |source| LockError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The file-name key of a pin directory: its absolute path (canonical when
/// it exists, so `/sys/fs/bpf/x/` and a symlink to it agree), escaped the
/// way `systemd-escape --path` does: `/` becomes `-`, and every byte
/// outside `[A-Za-z0-9_.]` (`-` included) becomes `\xNN`.
pub fn key_of(pin_dir: &Path) -> String {
    let p = pin_dir
        .canonicalize()
        .unwrap_or_else(|_| pin_dir.to_path_buf());
    let s = p.to_string_lossy();
    let trimmed = s.trim_matches('/');
    let mut out = String::with_capacity(trimmed.len());
    for (i, b) in trimmed.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

/// The lock file of `pin_dir` under `run_dir`.
pub fn lock_path(run_dir: &Path, pin_dir: &Path) -> PathBuf {
    run_dir.join(format!("{}.lock", key_of(pin_dir)))
}

/// The media layer's state file for `pin_dir` (see `media::adopt`).
pub fn state_path(pin_dir: &Path) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{}.state", key_of(pin_dir)))
}

/// The held lock; released (and its file removed) on drop, and by the
/// kernel when the process dies however it dies.
#[derive(Debug)]
pub struct PinDirLock {
    file: File,
    path: PathBuf,
}

impl PinDirLock {
    /// Takes the lock of `pin_dir` in [`RUN_DIR`].
    pub fn acquire(pin_dir: &Path) -> Result<PinDirLock, LockError> {
        PinDirLock::acquire_in(Path::new(RUN_DIR), pin_dir)
    }

    /// Takes the lock of `pin_dir` in `run_dir` (created if missing).
    pub fn acquire_in(run_dir: &Path, pin_dir: &Path) -> Result<PinDirLock, LockError> {
        std::fs::create_dir_all(run_dir).map_err(io_err("create the directory of", run_dir))?;
        let path = lock_path(run_dir, pin_dir);
        for _ in 0..ATTEMPTS {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err("open", &path))?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(LockError::Io {
                        op: "lock",
                        path,
                        source: e,
                    });
                }
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(LockError::Held {
                    pin_dir: pin_dir.to_owned(),
                    pid: if pid.is_empty() { "unknown" } else { pid }.to_owned(),
                    lock: path,
                });
            }
            // The holder before us may have unlinked the file between our
            // open and our lock: then we hold a lock nobody else can see.
            let ours = file.metadata().map_err(io_err("stat", &path))?;
            match std::fs::metadata(&path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {}
                _ => continue,
            }
            file.set_len(0).map_err(io_err("truncate", &path))?;
            file.rewind().map_err(io_err("rewind", &path))?;
            writeln!(file, "{}", std::process::id()).map_err(io_err("write", &path))?;
            return Ok(PinDirLock { file, path });
        }
        Err(LockError::Io {
            op: "lock",
            path,
            source: std::io::Error::other("the lock file was replaced on every attempt"),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDirLock {
    fn drop(&mut self) {
        // Unlinked while held: see the module docs for why that is safe.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_escaped_paths_and_distinct() {
        assert_eq!(
            key_of(Path::new("/nonexistent-se/bpf/sip-edge")),
            "nonexistent\\x2dse-bpf-sip\\x2dedge"
        );
        assert_ne!(
            key_of(Path::new("/nonexistent-se/a-b")),
            key_of(Path::new("/nonexistent-se/a/b"))
        );
        assert_eq!(
            key_of(Path::new("/nonexistent-se/x/")),
            key_of(Path::new("/nonexistent-se/x"))
        );
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pin = Path::new("/sys/fs/bpf/sip-edge-lock-test");
        let first = PinDirLock::acquire_in(dir.path(), pin).expect("first");
        // flock conflicts between open file descriptions, so a second
        // acquire in the same process stands in for a second agent.
        match PinDirLock::acquire_in(dir.path(), pin) {
            Err(LockError::Held { pid, lock, .. }) => {
                assert_eq!(pid, std::process::id().to_string());
                assert_eq!(lock, first.path());
                let msg = PinDirLock::acquire_in(dir.path(), pin)
                    .expect_err("still held")
                    .to_string();
                assert!(
                    msg.contains("pid ") && msg.contains("stop that agent"),
                    "{msg}"
                );
            }
            other => panic!("second lock not refused: {other:?}"),
        }
        let other_pin = PinDirLock::acquire_in(dir.path(), Path::new("/sys/fs/bpf/other"));
        assert!(other_pin.is_ok(), "another pin_dir has its own lock");
        let path = first.path().to_owned();
        drop(first);
        assert!(!path.exists(), "the holder removes its file on exit");
        let again = PinDirLock::acquire_in(dir.path(), pin).expect("free again");
        drop(again);
    }

    #[test]
    fn a_lock_left_by_a_dead_holder_is_free() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pin = Path::new("/sys/fs/bpf/sip-edge-lock-test-dead");
        // What kill -9 leaves: the file with a pid, and no lock on it.
        std::fs::write(lock_path(dir.path(), pin), "999999\n").expect("stale file");
        let l = PinDirLock::acquire_in(dir.path(), pin).expect("a stale file is no lock");
        let text = std::fs::read_to_string(l.path()).expect("read");
        assert_eq!(text.trim(), std::process::id().to_string());
    }
}
