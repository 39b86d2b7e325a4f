//! One connection's task: reads bytes from the (TLS or TCP) stream into the
//! sans-IO framer, hands whole messages to the proxy driver, answers RFC 5626
//! keep-alive pings, sends pings on connections the edge opened, writes what
//! the driver queues for it, and closes on EOF, framing error, idle timeout
//! or shutdown. On EOF or a framing error the driver first answers the
//! refused message (400/413/513) and the queue is written out before the
//! close. Every error ends only this connection, and is logged.
//!
//! A connection that carries a live registration is not closed as idle
//! before the registration expires (the driver sets its [`Hold`] from the
//! proxy's registrations, as a registrar's `tcp_persistent_flag` keeps a
//! registered TCP contact's connection as long as the contact is valid):
//! a remote user behind NAT that sends no keep-alives can still be
//! reached on the flow it registered on (RFC 5626 §5.3).

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, watch, Notify},
};
use tracing::{debug, info, warn};

use super::{Event, Refused};
use crate::{
    proxy::{ConnId, ConnInfo, HopTarget},
    sip::framer::{Frame, FrameError, Framer, FramerLimits, KeepAliveRole, PING, PONG},
};

/// Messages queued for one connection before the driver treats it as stuck.
pub const WRITE_QUEUE: usize = 1024;

/// Queued messages are coalesced into one write up to about this size.
const BATCH_BYTES: usize = 64 * 1024;

/// Milliseconds since a process-wide epoch until which a connection is
/// kept open whatever its idle time (0: no hold); shared between the
/// connection task and the driver.
pub type Hold = Arc<AtomicU64>;

fn hold_epoch() -> tokio::time::Instant {
    static EPOCH: OnceLock<tokio::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(tokio::time::Instant::now)
}

/// `at` as a [`Hold`] value.
pub fn hold_value(at: std::time::Instant) -> u64 {
    let at = tokio::time::Instant::from_std(at);
    u64::try_from(at.saturating_duration_since(hold_epoch()).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Static parameters of a connection task.
#[derive(Clone, Debug)]
pub struct ConnParams {
    /// Close after this long without traffic.
    pub idle: Duration,
    /// Ping interval on connections we opened (`None` = off).
    pub keepalive: Option<Duration>,
    /// Framer limits.
    pub limits: FramerLimits,
}

/// Runs one connection until it ends; reports `Opened` first and `Closed`
/// last to the driver.
pub async fn run<S>(
    stream: S,
    conn: ConnId,
    info: ConnInfo,
    hop: Option<HopTarget>,
    params: ConnParams,
    events: mpsc::Sender<Event>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    let hold: Hold = Arc::new(AtomicU64::new(0));
    let role = if hop.is_some() {
        KeepAliveRole::Initiator
    } else {
        KeepAliveRole::Responder
    };
    if events
        .send(Event::Opened {
            conn,
            info,
            writer: tx,
            hop,
            hold: hold.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Reading and writing run as two futures of this one task, polled
    // together: the reader may wait for room in the driver's event queue
    // while the writer keeps draining what the driver queued for this
    // connection. (In one loop, a reader blocked on a busy driver stopped
    // the writes too, the write queue filled, and the driver failed
    // requests it could not queue: seen under load on a shared trunk.)
    // Atomics, not Cells: the task must stay Send. `last_activity` is ms
    // since `epoch`.
    let epoch = tokio::time::Instant::now();
    let last_activity = AtomicU64::new(0);
    let touch = || {
        let ms = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity.store(ms, Ordering::Relaxed);
    };
    let pongs_due = AtomicU32::new(0);
    let pong_wake = Notify::new();
    let why = {
        let reader = async {
            let mut framer = Framer::new(role, params.limits);
            let mut buf = vec![0u8; 16 * 1024];
            // The reader is done: the driver answers a refused message,
            // then lets the writer drain what it queued and close (the
            // writer ends the connection; this future never completes).
            let closing = |refused: Option<Refused>| async {
                if events.send(Event::Closing { conn, refused }).await.is_err() {
                    return "driver gone";
                }
                std::future::pending().await
            };
            let refused = |framer: &Framer, e: &FrameError| {
                Some(Refused {
                    head: Bytes::copy_from_slice(framer.failed_head()?),
                    code: e.response_code()?,
                    why: e.to_string(),
                })
            };
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) => {
                        debug!("peer closed its side; flushing");
                        return closing(None).await;
                    }
                    Ok(n) => n,
                    Err(e) => {
                        info!(error = %e, "read failed");
                        return "read error";
                    }
                };
                touch();
                if let Err(e) = framer.push(buf.get(..n).unwrap_or_default()) {
                    warn!(error = %e, "framing failed; closing");
                    return closing(refused(&framer, &e)).await;
                }
                loop {
                    match framer.next_frame() {
                        Ok(Some(Frame::Message(raw))) => {
                            let bytes: Bytes = raw.into_bytes();
                            if events.send(Event::Message { conn, bytes }).await.is_err() {
                                return "driver gone";
                            }
                        }
                        Ok(Some(Frame::Ping)) => {
                            // RFC 5626 §4.4.1: answer a CRLFCRLF ping with
                            // CRLF (written by the writer, in order).
                            pongs_due.fetch_add(1, Ordering::Relaxed);
                            pong_wake.notify_one();
                        }
                        Ok(Some(Frame::Pong)) => debug!("keep-alive pong"),
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %e, "framing failed; answering and closing");
                            return closing(refused(&framer, &e)).await;
                        }
                    }
                }
            }
        };
        let writer = async {
            let ka_every = params
                .keepalive
                .filter(|_| role == KeepAliveRole::Initiator)
                .unwrap_or(Duration::from_secs(3600 * 24));
            let mut ka = tokio::time::interval_at(tokio::time::Instant::now() + ka_every, ka_every);
            let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
            loop {
                out.clear();
                tokio::select! {
                    m = rx.recv() => {
                        let Some(bytes) = m else { return "closing: queue written" };
                        out.extend_from_slice(&bytes);
                        // Whatever else is queued goes out in the same
                        // write: fewer TLS records and syscalls under load.
                        while out.len() < BATCH_BYTES {
                            match rx.try_recv() {
                                Ok(more) => out.extend_from_slice(&more),
                                Err(_) => break,
                            }
                        }
                    }
                    () = pong_wake.notified() => {
                        for _ in 0..pongs_due.swap(0, Ordering::Relaxed) {
                            out.extend_from_slice(PONG);
                        }
                    }
                    _ = ka.tick() => out.extend_from_slice(PING),
                }
                if out.is_empty() {
                    continue;
                }
                if let Err(e) = async {
                    wr.write_all(&out).await?;
                    wr.flush().await
                }
                .await
                {
                    info!(error = %e, "write failed");
                    return "write error";
                }
                touch();
            }
        };
        let idle = async {
            loop {
                let held = hold_epoch() + Duration::from_millis(hold.load(Ordering::Relaxed));
                let due = (epoch
                    + Duration::from_millis(last_activity.load(Ordering::Relaxed))
                    + params.idle)
                    .max(held);
                if tokio::time::Instant::now() >= due {
                    return;
                }
                tokio::time::sleep_until(due).await;
            }
        };
        tokio::pin!(reader, writer, idle);
        tokio::select! {
            w = &mut reader => w,
            w = &mut writer => w,
            () = &mut idle => "idle timeout",
            _ = shutdown.changed() => "shutdown",
        }
    };
    let _ = wr.shutdown().await;
    info!(reason = why, "connection closed");
    let _ = events.send(Event::Closed { conn }).await;
}
