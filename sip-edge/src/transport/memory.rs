//! Giving memory back after connection floods (issue #14 item 8: RSS grew
//! 15 → 196 MB across floods while fds returned to baseline).
//!
//! Measured (README, "Limits and floods"): after three floods of 1024 TLS
//! connections, glibc's `malloc_stats` showed 137 MB held by its arenas
//! and 1.6 MB in use, and `malloc_trim(0)` from gdb took RSS from 150 MB
//! back to 30 MB: allocator retention, not a leak. The freed connection
//! buffers sit in free chunks of the per-thread arenas (tokio's workers
//! allocate in their own), which glibc only returns to the OS at the top
//! of the main heap unless asked; `MALLOC_ARENA_MAX=2` did not help
//! (153 MB). So the driver asks: [`TrimPolicy`] decides when (sans-IO,
//! unit-tested) and [`trim`] calls `malloc_trim(0)`, which since glibc 2.8
//! also releases whole free pages inside every arena (`MADV_DONTNEED`).
//!
//! When: after many connections closed (a flood receding), or some while
//! after any closed, never more often than every few seconds (a trim walks
//! every arena under its lock).
//!
//! Calls leave the same kind of retention (issue #12, memory per call): a
//! burst of set-ups keeps its transactions 64*T1 (RFC 6026), and once they
//! end their memory stays in the arenas, so the agent's RSS followed its
//! busiest half-minute rather than the calls it holds. So a burst of
//! transactions receding (the live count fell to under half its peak since
//! the last trim, by at least [`TRIM_AFTER_TXS`]) makes a trim due as well;
//! a steady call rate keeps the count level and never triggers it.

use std::time::{Duration, Instant};

/// Closed connections that make a trim due at once.
pub const TRIM_AFTER_CLOSED: u64 = 256;
/// Any closed connection makes a trim due after this long.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(30);
/// Least time between two trims.
pub const TRIM_MIN_GAP: Duration = Duration::from_secs(2);
/// Transactions that must have ended since the peak for a receding burst
/// to make a trim due.
pub const TRIM_AFTER_TXS: usize = 1024;

/// When to trim, from the count of connections closed so far and the
/// live transactions.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    last: Option<Instant>,
    closed_at_last: u64,
    /// Most live transactions seen since the last trim.
    peak_txs: usize,
}

impl TrimPolicy {
    /// Whether to trim now, given `closed` (the running count of closed
    /// connections) and `txs` (transactions live now); when it says yes,
    /// it counts the trim as done.
    pub fn due(&mut self, closed: u64, txs: usize, now: Instant) -> bool {
        self.peak_txs = self.peak_txs.max(txs);
        let since = closed.saturating_sub(self.closed_at_last);
        let age = self
            .last
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        let receded =
            self.peak_txs.saturating_sub(txs) >= TRIM_AFTER_TXS && txs < self.peak_txs / 2;
        let due = age >= TRIM_MIN_GAP
            && (receded || since >= TRIM_AFTER_CLOSED || (since > 0 && age >= TRIM_INTERVAL));
        if due {
            self.last = Some(now);
            self.closed_at_last = closed;
            self.peak_txs = txs;
        }
        due
    }
}

/// Returns free heap memory to the OS; whether anything was released.
/// A no-op outside glibc (other allocators trim on their own).
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim has no preconditions; it takes the arena
        // locks itself.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receding_flood_trims_at_once_a_trickle_only_now_and_then() {
        let t0 = Instant::now();
        let mut p = TrimPolicy::default();
        assert!(!p.due(0, 0, t0), "nothing closed: nothing to give back");
        assert!(p.due(300, 0, t0), "a flood receded");
        assert!(
            !p.due(900, 0, t0 + Duration::from_secs(1)),
            "never twice within the minimum gap"
        );
        assert!(p.due(900, 0, t0 + Duration::from_secs(3)));
        assert!(
            !p.due(905, 0, t0 + Duration::from_secs(10)),
            "a trickle waits"
        );
        assert!(p.due(905, 0, t0 + Duration::from_secs(34)));
        assert!(!p.due(905, 0, t0 + Duration::from_secs(100)), "nothing new");
    }

    #[test]
    fn a_receding_burst_of_transactions_trims_a_steady_rate_never() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut p = TrimPolicy::default();
        // A steady rate: the live count moves around one level.
        for s in 0..100 {
            let txs = 6000 + (s as usize % 7) * 100;
            assert!(!p.due(0, txs, at(s)), "steady load at {s} s");
        }
        // A burst, then its transactions end.
        assert!(!p.due(0, 40_000, at(100)), "the burst itself");
        assert!(!p.due(0, 30_000, at(110)), "three-quarters still live");
        assert!(p.due(0, 6000, at(133)), "the burst receded");
        assert!(!p.due(0, 5000, at(140)), "already given back");
        // A small table never makes one: the trim would cost more than it
        // gives back.
        let mut small = TrimPolicy::default();
        assert!(!small.due(0, 900, at(0)));
        assert!(!small.due(0, 0, at(40)));
    }

    #[test]
    fn trim_can_be_called_any_time() {
        let v: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
        drop(v);
        let _ = trim();
    }
}
