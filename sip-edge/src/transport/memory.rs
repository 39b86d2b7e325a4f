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

use std::time::{Duration, Instant};

/// Closed connections that make a trim due at once.
pub const TRIM_AFTER_CLOSED: u64 = 256;
/// Any closed connection makes a trim due after this long.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(30);
/// Least time between two trims.
pub const TRIM_MIN_GAP: Duration = Duration::from_secs(2);

/// When to trim, from the count of connections closed so far.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    last: Option<Instant>,
    closed_at_last: u64,
}

impl TrimPolicy {
    /// Whether to trim now, given `closed` (the running count of closed
    /// connections); when it says yes, it counts the trim as done.
    pub fn due(&mut self, closed: u64, now: Instant) -> bool {
        let since = closed.saturating_sub(self.closed_at_last);
        let age = self
            .last
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        let due = age >= TRIM_MIN_GAP
            && (since >= TRIM_AFTER_CLOSED || (since > 0 && age >= TRIM_INTERVAL));
        if due {
            self.last = Some(now);
            self.closed_at_last = closed;
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
        assert!(!p.due(0, t0), "nothing closed: nothing to give back");
        assert!(p.due(300, t0), "a flood receded");
        assert!(
            !p.due(900, t0 + Duration::from_secs(1)),
            "never twice within the minimum gap"
        );
        assert!(p.due(900, t0 + Duration::from_secs(3)));
        assert!(!p.due(905, t0 + Duration::from_secs(10)), "a trickle waits");
        assert!(p.due(905, t0 + Duration::from_secs(34)));
        assert!(!p.due(905, t0 + Duration::from_secs(100)), "nothing new");
    }

    #[test]
    fn trim_can_be_called_any_time() {
        let v: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
        drop(v);
        let _ = trim();
    }
}
