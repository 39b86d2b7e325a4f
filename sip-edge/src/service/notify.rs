//! systemd notifications (sd_notify(3), `Type=notify` in
//! `packaging/sip-edge.service`): `READY=1` once the datapath is attached
//! and the SIP listeners are bound, `RELOADING=1` … `READY=1` around a
//! reload, `STOPPING=1` when a stop begins, and `STATUS=` lines
//! `systemctl status` shows. Without `NOTIFY_SOCKET` (not started by
//! systemd) every call does nothing. A failed send is logged, never fatal:
//! the agent works the same without a service manager.

use sd_notify::NotifyState;
use tracing::{debug, warn};

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => debug!(?states, "sd_notify sent"),
        Err(e) => warn!(error = %e, "sd_notify failed; systemd may not see the agent's state"),
    }
}

/// The agent is serving: datapath attached, listeners bound.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins (systemd waits for the next `READY=1`). The monotonic
/// timestamp lets `Type=notify-reload` match it to its request.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The agent is stopping (drain or exit).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A status line only.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}
