//! One connection's task: reads bytes from the (TLS or TCP) stream into the
//! sans-IO framer, hands whole messages to the proxy driver, answers RFC 5626
//! keep-alive pings, sends pings on connections the edge opened, writes what
//! the driver queues for it, and closes on EOF, framing error, idle timeout,
//! message deadline or shutdown. On EOF or a framing error the driver first
//! answers the refused message (400/413/513) and the queue is written out
//! before the close. Every error ends only this connection, and is logged.
//!
//! Two clocks (issue #14 item 8): the idle timer runs between messages and
//! is reset by whole messages, keep-alives and writes, never by the bytes
//! of a message still arriving; a message, once its first byte is in, must
//! be complete within `message_timeout` whatever trickles in meanwhile.
//! Before, every byte reset the idle timer, so a request dribbled a byte at
//! a time held its connection (and buffer) forever.
//!
//! A connection that carries a live registration is not closed as idle
//! before the registration expires (the driver sets its [`Hold`] from the
//! proxy's registrations, as a registrar's `tcp_persistent_flag` keeps a
//! registered TCP contact's connection as long as the contact is valid):
//! a remote user behind NAT that sends no keep-alives can still be
//! reached on the flow it registered on (RFC 5626 §5.3).

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    task::Poll,
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
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

/// The driver's end of a connection's write queue: `try_send` fails once
/// [`WRITE_QUEUE`] messages wait (the driver then treats the connection as
/// stuck); dropping it closes the queue, and the connection writes what
/// is queued, then closes.
pub type Writer = futures_channel::mpsc::Sender<Vec<u8>>;
/// The connection's end of its write queue.
pub type WriteQueue = futures_channel::mpsc::Receiver<Vec<u8>>;

/// A write queue of [`WRITE_QUEUE`] messages.
///
/// futures' bounded channel rather than tokio's (issue #12): tokio's
/// allocates its channel and a first block of 32 message slots when made
/// (1.35 kB per idle connection, measured by `tests/tls_idle_memory.rs`),
/// futures' a node per queued message and little else. Its capacity is
/// the buffer plus one per sender; the driver holds the only sender.
pub fn write_queue() -> (Writer, WriteQueue) {
    futures_channel::mpsc::channel(WRITE_QUEUE - 1)
}

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

/// A write buffer grown past this by a burst is released once written, so
/// an idle connection does not keep a burst's worth of memory.
const KEEP_WRITE_BUFFER: usize = 16 * 1024;

/// `partial_since` value when no message is being received.
const NO_PARTIAL: u64 = u64::MAX;

/// Static parameters of a connection task.
#[derive(Clone, Debug)]
pub struct ConnParams {
    /// Close after this long without traffic.
    pub idle: Duration,
    /// Ping interval on connections we opened (`None` = off).
    pub keepalive: Option<Duration>,
    /// Longest a message may take from its first byte to its last.
    pub message_timeout: Duration,
    /// Framer limits.
    pub limits: FramerLimits,
}

/// Largest single read from the stream (one TLS record's plaintext).
const READ_CHUNK: usize = 16 * 1024;

/// Reads what the stream has into `framer`: `Ok(None)` at EOF, else the
/// framer's verdict on the bytes.
///
/// The bytes land in a buffer on the stack of this one poll and go
/// straight into the framer, so no read buffer lives across the wait for
/// data: an idle connection holds none (issue #12: a 16 kB buffer per
/// connection was more than half of an idle TLS connection's memory). A
/// pending read keeps nothing of the buffer: `poll_read` fills it or
/// returns `Pending` without holding on to it.
async fn read_into<R>(
    rd: &mut R,
    framer: &mut Framer,
) -> std::io::Result<Option<Result<(), FrameError>>>
where
    R: AsyncRead + Unpin,
{
    std::future::poll_fn(|cx| {
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut rb = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut *rd).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Ok(None)),
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(framer.push(rb.filled())))),
        }
    })
    .await
}

/// Runs one connection until it ends; reports `Opened` first and `Closed`
/// last to the driver.
///
/// The stream is split here, before the future is made: an `async fn`
/// keeps room for its arguments for its whole life, and the stream (a
/// TLS stream is over 1 kB) lives in the split halves' shared allocation
/// from the first poll on, so its copy in the future was dead weight of
/// every idle connection (issue #12).
pub fn run<S>(
    stream: S,
    conn: ConnId,
    info: ConnInfo,
    hop: Option<HopTarget>,
    params: ConnParams,
    events: mpsc::Sender<Event>,
    shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut shutdown = shutdown;
    // An `async` block rather than an `async fn`: it keeps what it
    // captures once, where an `async fn` keeps its arguments and the
    // locals they move into.
    async move {
        let (tx, mut rx) = write_queue();
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
        // ms since `epoch` when the message being received began (NO_PARTIAL:
        // between messages); `timer_wake` tells the timers it changed.
        let partial_since = AtomicU64::new(NO_PARTIAL);
        let timer_wake = Notify::new();
        let pongs_due = AtomicU32::new(0);
        let pong_wake = Notify::new();
        let why = {
            let reader = async {
                let mut framer = Framer::new(role, params.limits);
                // The reader is done: the driver answers a refused message,
                // then lets the writer drain what it queued and close (the
                // writer ends the connection; this future never completes).
                // Events go out by `reserve` then `send`: the waiting
                // future then holds no event (`Sender::send`'s holds it
                // twice), which keeps this future, and so every idle
                // connection, smaller (issue #12).
                let closing = |refused: Option<Refused>| async {
                    let Ok(slot) = events.reserve().await else {
                        return "driver gone";
                    };
                    slot.send(Event::Closing { conn, refused });
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
                    let was_in = framer.in_message();
                    let pushed = match read_into(&mut rd, &mut framer).await {
                        Ok(Some(p)) => p,
                        Ok(None) => {
                            debug!("peer closed its side; flushing");
                            return closing(None).await;
                        }
                        Err(e) => {
                            info!(error = %e, "read failed");
                            return "read error";
                        }
                    };
                    let mut frames = 0usize;
                    if let Err(e) = pushed {
                        warn!(error = %e, "framing failed; closing");
                        return closing(refused(&framer, &e)).await;
                    }
                    loop {
                        let next = framer.next_frame();
                        if matches!(next, Ok(Some(_))) {
                            frames += 1;
                        }
                        match next {
                            Ok(Some(Frame::Message(raw))) => {
                                let Ok(slot) = events.reserve().await else {
                                    return "driver gone";
                                };
                                let bytes: Bytes = raw.into_bytes();
                                slot.send(Event::Message { conn, bytes });
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
                    // Whole frames, or keep-alive bytes between messages, are
                    // activity; the bytes of an unfinished message are not.
                    let inside = framer.in_message();
                    if frames > 0 || !inside {
                        touch();
                    }
                    if !inside {
                        partial_since.store(NO_PARTIAL, Ordering::Relaxed);
                    } else if !was_in || frames > 0 {
                        // A message began in this read: its deadline starts now.
                        let ms = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
                        partial_since.store(ms, Ordering::Relaxed);
                        timer_wake.notify_one();
                    }
                    framer.release_idle_buffer();
                }
            };
            let writer = async {
                // Pings only on connections the edge opened, when configured:
                // an interval holds a boxed timer entry, which every accepted
                // idle connection kept for nothing before (issue #12).
                let mut ka = params
                    .keepalive
                    .filter(|_| role == KeepAliveRole::Initiator)
                    .map(|every| {
                        tokio::time::interval_at(tokio::time::Instant::now() + every, every)
                    });
                let mut out: Vec<u8> = Vec::new();
                loop {
                    out.clear();
                    tokio::select! {
                        m = rx.next() => {
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
                        () = async {
                            match ka.as_mut() {
                                Some(ka) => drop(ka.tick().await),
                                None => std::future::pending().await,
                            }
                        } => out.extend_from_slice(PING),
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
                    if out.capacity() > KEEP_WRITE_BUFFER {
                        out = Vec::new();
                    }
                }
            };
            let timers = async {
                loop {
                    let held = hold_epoch() + Duration::from_millis(hold.load(Ordering::Relaxed));
                    let idle_due = (epoch
                        + Duration::from_millis(last_activity.load(Ordering::Relaxed))
                        + params.idle)
                        .max(held);
                    let msg_due = match partial_since.load(Ordering::Relaxed) {
                        NO_PARTIAL => None,
                        ms => Some(epoch + Duration::from_millis(ms) + params.message_timeout),
                    };
                    let now = tokio::time::Instant::now();
                    if msg_due.is_some_and(|d| now >= d) {
                        warn!(
                            target: "sip_edge::security",
                            peer = %info.peer,
                            side = ?info.side,
                            rule = "limits.message_timeout_secs",
                            limit_secs = params.message_timeout.as_secs(),
                            "message not complete in time; connection closed"
                        );
                        return "message deadline";
                    }
                    if now >= idle_due {
                        return "idle timeout";
                    }
                    let due = msg_due.map_or(idle_due, |d| d.min(idle_due));
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        () = timer_wake.notified() => {}
                    }
                }
            };
            tokio::pin!(reader, writer, timers);
            tokio::select! {
                w = &mut reader => w,
                w = &mut writer => w,
                w = &mut timers => w,
                _ = shutdown.changed() => "shutdown",
            }
        };
        let _ = wr.shutdown().await;
        info!(reason = why, "connection closed");
        let _ = events.send(Event::Closed { conn }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{media::Side, proxy::Proto};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const OPTIONS: &[u8] = b"OPTIONS sip:203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.66:5061;branch=z9hG4bKx\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:203.0.113.1>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";

    struct Harness {
        task: tokio::task::JoinHandle<()>,
        events: mpsc::Receiver<Event>,
        client: tokio::io::DuplexStream,
        _stop: watch::Sender<bool>,
        /// The driver's end of the write queue: dropping it closes the
        /// connection (after writing what is queued).
        _writer: Writer,
    }

    /// One accepted connection with a 300 s idle timer and a 10 s message
    /// deadline, its far end in `client`.
    async fn harness() -> Harness {
        harness_with(None, None).await
    }

    /// As [`harness`], with a keep-alive interval and, for a connection
    /// the edge opened, its next hop.
    async fn harness_with(keepalive: Option<Duration>, hop: Option<HopTarget>) -> Harness {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (tx, mut events) = mpsc::channel(64);
        let (stop, stop_rx) = watch::channel(false);
        let params = ConnParams {
            idle: Duration::from_secs(300),
            keepalive,
            message_timeout: Duration::from_secs(10),
            limits: FramerLimits::default(),
        };
        let info = ConnInfo {
            side: Side::External,
            peer: "198.51.100.66:40000".parse().expect("addr"),
            proto: Proto::Tls,
        };
        let task = tokio::spawn(run(server, 7, info, hop, params, tx, stop_rx));
        let Some(Event::Opened { writer, .. }) = events.recv().await else {
            panic!("no Opened event");
        };
        Harness {
            task,
            events,
            client,
            _stop: stop,
            _writer: writer,
        }
    }

    /// Writes `bytes` one per second (paused clock) until the connection
    /// ends or `max` seconds pass; returns the seconds it lived.
    async fn dribble(h: &mut Harness, bytes: &[u8], max: usize) -> u64 {
        let t0 = tokio::time::Instant::now();
        for b in bytes.iter().cycle().take(max) {
            if h.client.write_all(&[*b]).await.is_err() || h.task.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        t0.elapsed().as_secs()
    }

    /// RFC 5626 §4.4.1 pings go out every `keepalive` on connections the
    /// edge opened, and never on accepted ones (which then keep no timer
    /// for them: issue #12).
    #[tokio::test(start_paused = true)]
    async fn only_connections_the_edge_opened_send_keepalive_pings() {
        let every = Some(Duration::from_secs(30));
        let hop = HopTarget {
            host: "198.51.100.66".into(),
            port: 5061,
            tls_name: "peer.example.net".into(),
        };
        let mut opened = harness_with(every, Some(hop)).await;
        let mut accepted = harness_with(every, None).await;
        tokio::time::sleep(Duration::from_secs(95)).await;
        let mut buf = [0u8; 64];
        let n = opened.client.read(&mut buf).await.expect("read");
        let mut got = buf[..n].to_vec();
        while got.len() < 3 * PING.len() {
            let n = opened.client.read(&mut buf).await.expect("read");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, PING.repeat(3), "three pings in 95 s");
        let quiet =
            tokio::time::timeout(Duration::from_secs(1), accepted.client.read(&mut buf)).await;
        assert!(quiet.is_err(), "an accepted connection sends no ping");
    }

    /// Issue #14 item 8: every byte used to reset the idle timer, so a
    /// dribbled request held its connection forever.
    #[tokio::test(start_paused = true)]
    async fn a_dribbled_message_is_cut_at_its_deadline_whatever_trickles_in() {
        let mut h = harness().await;
        let lived = dribble(&mut h, OPTIONS, 120).await;
        assert!(
            (10..=11).contains(&lived),
            "closed after {lived} s, deadline 10 s"
        );
        let mut rest = Vec::new();
        let _ = h.client.read_to_end(&mut rest).await;
        assert!(matches!(
            h.events.recv().await,
            Some(Event::Closed { conn: 7 })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_whole_messages_and_lone_crlfs_keep_a_connection_until_idle() {
        let mut h = harness().await;
        // Each message takes 5 s (split in a few writes), well within its
        // 10 s deadline: twenty of them, 100 s, keep the connection.
        for _ in 0..20 {
            for chunk in OPTIONS.chunks(OPTIONS.len() / 4 + 1) {
                h.client.write_all(chunk).await.expect("write");
                tokio::time::sleep(Duration::from_millis(1250)).await;
            }
            assert!(matches!(h.events.recv().await, Some(Event::Message { .. })));
        }
        // A lone CRLF (RFC 3261 §7.5) is no message: no deadline.
        h.client.write_all(b"\r\n").await.expect("crlf");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            !h.task.is_finished(),
            "a lone CRLF must not start a deadline"
        );
        // Then nothing: the idle timer (300 s from the CRLF) ends it.
        tokio::time::sleep(Duration::from_secs(245)).await;
        assert!(h.task.is_finished(), "idle timeout");
    }
}
