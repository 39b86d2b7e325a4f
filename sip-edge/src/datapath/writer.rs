//! One map writer at a time per pin directory (issue #8, "Hardening", item
//! 11). Every handle on pinned maps (the agent's media layer, the agent's
//! start-up configuration write, each `sip-edge pinhole add/del/list`)
//! takes an exclusive `flock(2)` on `/run/sip-edge/<pin_dir key>.maps.lock`
//! around each change of the pinhole tables, so a CLI and a running agent
//! never interleave inside one.
//!
//! What interleaving broke before (each now has a test in
//! `tests/tests/crash_races.rs`):
//!
//! - a shadowed rule: two writers adding the same key, one claiming its
//!   `PH_DST` entry and the other (seeing the entry claimed but not yet
//!   valid) inserting it into `PINHOLES`: two rules for one key, only one
//!   of them found by the datapath and by `pinhole del`;
//! - a shared `PH_STATE` slot: two writers picking the same free slot from
//!   their own walks of `PINHOLES`, so two flows shared counters, latch and
//!   FIB cache, and deleting one removed both;
//! - an undercounted `DST_PORTS`: the agent's start-up recount (a store of
//!   counts from its own snapshot) overwrote a concurrent writer's atomic
//!   add, so the datapath skipped the lookup by destination for a port with
//!   a live rule and dropped its media;
//! - a torn or stale `EDGE_LIST`: a handle caches the `PH_DST` layout when
//!   it opens the maps; a layout written after that (agent restart with new
//!   addresses or ranges) made it index rules under the old layout, where
//!   each entry means another address and port.
//!
//! Why one lock and not one writer through the agent's control socket: the
//! CLI must also work with no agent running (a datapath-only setup keeps
//! its pins with `on_exit = "keep"`, or an operator cleans up after a
//! crash), and the agent itself holds two handles (configuration at start,
//! media afterwards). A lock on a file works for all of them, costs two
//! system calls per change (measured against a map update's one, it is
//! noise), and is released by the kernel when its holder dies, `kill -9`
//! included, so a crashed CLI never wedges the agent. Inside the lock each
//! change re-reads `EDGE_LIST`, so no handle works from a stale layout.
//!
//! Waiting is bounded ([`WAIT`]): a writer that cannot get the lock (a CLI
//! stopped with SIGSTOP inside a change) gets [`WriterError::Busy`]; the
//! agent answers that call's offer with an error rather than block its
//! event loop.
//!
//! The file is never unlinked while a datapath may use it (unlinking a lock
//! file someone holds open lets a third writer in on a new inode); it is a
//! zero-byte file in a tmpfs, removed with the pins (`attach::remove_pins`).
//! The XDP program only reads; the lock orders writers, and each writer
//! still publishes its changes in the order the datapath needs
//! (`datapath::maps`).

use std::{
    fs::{File, OpenOptions},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use super::lock::{key_of, RUN_DIR};

/// Longest wait for the lock.
pub const WAIT: Duration = Duration::from_secs(3);

/// Errors of taking the writer lock.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The lock file could not be created or locked.
    #[error("cannot {op} the map writer lock {path}: {source}; pinned maps are only changed under it (run as root with a writable {RUN_DIR})")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another writer held the lock for longer than [`WAIT`].
    #[error("another writer held the map writer lock {path} for {waited:?}; nothing was changed. Is a `sip-edge pinhole` command stopped (ps, fuser {path})? Retry once it is gone")]
    Busy {
        /// The lock file.
        path: PathBuf,
        /// How long this writer waited.
        waited: Duration,
    },
}

/// The writer lock file of `pin_dir`.
pub fn writer_lock_path(pin_dir: &Path) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{}.maps.lock", key_of(pin_dir)))
}

/// An open (not yet locked) writer lock.
#[derive(Clone, Debug)]
pub struct WriterLock {
    file: Arc<File>,
    path: PathBuf,
}

/// The lock, held until dropped.
#[derive(Debug)]
pub struct WriterGuard {
    file: Arc<File>,
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor the Arc keeps open.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

impl WriterLock {
    /// Opens (creating) the writer lock of `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<WriterLock, WriterError> {
        Self::open_at(writer_lock_path(pin_dir))
    }

    /// Opens (creating) the lock file `path`.
    pub fn open_at(path: PathBuf) -> Result<WriterLock, WriterError> {
        let io = |op| {
            let path = path.clone();
            move |source| WriterError::Io { op, path, source }
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("open"))?;
        Ok(WriterLock {
            file: Arc::new(file),
            path,
        })
    }

    /// Takes the lock, waiting at most [`WAIT`].
    pub fn lock(&self) -> Result<WriterGuard, WriterError> {
        self.lock_within(WAIT)
    }

    /// Takes the lock, waiting at most `wait`.
    pub fn lock_within(&self, wait: Duration) -> Result<WriterGuard, WriterError> {
        let started = Instant::now();
        let mut pause = Duration::from_micros(50);
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(WriterGuard {
                    file: self.file.clone(),
                });
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => {}
                Some(libc::EINTR) => continue,
                _ => {
                    return Err(WriterError::Io {
                        op: "lock",
                        path: self.path.clone(),
                        source: e,
                    })
                }
            }
            let waited = started.elapsed();
            if waited >= wait {
                return Err(WriterError::Busy {
                    path: self.path.clone(),
                    waited,
                });
            }
            // Changes hold the lock for microseconds to a few ms: poll
            // fast first, then back off (a blocking flock cannot time out).
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_a_bounded_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.maps.lock");
        // Two opens stand in for two processes (flock is per open file).
        let a = WriterLock::open_at(path.clone()).expect("a");
        let b = WriterLock::open_at(path.clone()).expect("b");
        let held = a.lock().expect("a locks");
        match b.lock_within(Duration::from_millis(30)) {
            Err(WriterError::Busy { path: p, waited }) => {
                assert_eq!(p, path);
                assert!(waited >= Duration::from_millis(30));
            }
            other => panic!("b got the lock a holds: {other:?}"),
        }
        drop(held);
        let g = b
            .lock_within(Duration::from_millis(30))
            .expect("free again");
        drop(g);
        // Threads serialise: a counter updated non-atomically in two steps
        // under the lock never loses an increment.
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = WriterLock::open_at(path.clone()).expect("open");
                let c = counter.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _g = l.lock().expect("lock");
                        let v = c.load(std::sync::atomic::Ordering::SeqCst);
                        std::thread::yield_now();
                        c.store(v + 1, std::sync::atomic::Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(counter.load(std::sync::atomic::Ordering::SeqCst), 800);
    }
}
