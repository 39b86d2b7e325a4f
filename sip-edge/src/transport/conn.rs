//! One connection's task: reads bytes from the (TLS or TCP) stream into the
//! sans-IO framer, hands whole messages to the proxy driver, answers RFC 5626
//! keep-alive pings, sends pings on connections the edge opened, writes what
//! the driver queues for it, and closes on EOF, framing error, idle timeout
//! or shutdown. Every error ends only this connection, and is logged.

use std::time::Duration;

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, watch},
};
use tracing::{debug, info, warn};

use super::Event;
use crate::{
    proxy::{ConnId, ConnInfo, HopTarget},
    sip::framer::{Frame, Framer, FramerLimits, KeepAliveRole, PING, PONG},
};

/// Messages queued for one connection before the driver treats it as stuck.
pub const WRITE_QUEUE: usize = 256;

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
        })
        .await
        .is_err()
    {
        return;
    }
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut framer = Framer::new(role, params.limits);
    let mut buf = vec![0u8; 16 * 1024];
    let idle = tokio::time::sleep(params.idle);
    tokio::pin!(idle);
    let ka_every = params
        .keepalive
        .filter(|_| role == KeepAliveRole::Initiator)
        .unwrap_or(Duration::from_secs(3600 * 24));
    let mut ka = tokio::time::interval_at(tokio::time::Instant::now() + ka_every, ka_every);
    let why = loop {
        tokio::select! {
            r = rd.read(&mut buf) => {
                let n = match r {
                    Ok(0) => break "peer closed",
                    Ok(n) => n,
                    Err(e) => {
                        info!(error = %e, "read failed");
                        break "read error";
                    }
                };
                idle.as_mut().reset(tokio::time::Instant::now() + params.idle);
                if let Err(e) = framer.push(buf.get(..n).unwrap_or_default()) {
                    warn!(error = %e, "framing failed; closing");
                    break "framing error";
                }
                let mut closed = None;
                loop {
                    match framer.next_frame() {
                        Ok(Some(Frame::Message(raw))) => {
                            let bytes: Bytes = raw.into_bytes();
                            if events.send(Event::Message { conn, bytes }).await.is_err() {
                                closed = Some("driver gone");
                                break;
                            }
                        }
                        Ok(Some(Frame::Ping)) => {
                            // RFC 5626 §4.4.1: answer a CRLFCRLF ping with CRLF.
                            if let Err(e) = wr.write_all(PONG).await {
                                info!(error = %e, "pong write failed");
                                closed = Some("write error");
                                break;
                            }
                        }
                        Ok(Some(Frame::Pong)) => debug!("keep-alive pong"),
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %e, "framing failed; closing");
                            closed = Some("framing error");
                            break;
                        }
                    }
                }
                if let Some(w) = closed {
                    break w;
                }
            }
            m = rx.recv() => {
                let Some(bytes) = m else { break "driver dropped the writer" };
                if let Err(e) = wr.write_all(&bytes).await {
                    info!(error = %e, "write failed");
                    break "write error";
                }
                idle.as_mut().reset(tokio::time::Instant::now() + params.idle);
            }
            _ = ka.tick() => {
                if let Err(e) = wr.write_all(PING).await {
                    info!(error = %e, "ping write failed");
                    break "write error";
                }
            }
            () = &mut idle => break "idle timeout",
            _ = shutdown.changed() => break "shutdown",
        }
    };
    let _ = wr.shutdown().await;
    info!(reason = why, "connection closed");
    let _ = events.send(Event::Closed { conn }).await;
}
