//! The admin HTTP endpoint (`[admin] metrics_listen`): `GET /metrics`
//! answers the exposition of `metrics::render`, anything else 404/405.
//!
//! Written here rather than on hyper: one route, one GET, no bodies, and
//! `Connection: close` after every answer, which `httparse` (hyper's own
//! request parser) plus a few lines of tokio cover; hyper's server stack
//! would add a dependency tree for nothing this endpoint uses. Each
//! connection is one task with a deadline; a client's error never stops the
//! accept loop, and a request head is capped in size.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{info, warn};

use crate::datapath::maps::DatapathMaps;

/// Longest request head read.
const MAX_HEAD: usize = 8192;
/// How long one client may take for its request and our answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Content type of the OpenMetrics text exposition `prometheus-client` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` (done by the agent before serving, so a busy port is
/// reported at start).
pub async fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The agent's side: serves `[admin] metrics_listen` if set, until
/// `shutdown`. A bind failure is logged and the agent runs on without the
/// endpoint, as without the control socket: forwarding never depends on it.
pub async fn start(
    cfg: &crate::config::Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    let addr = cfg.admin.metrics_listen?;
    match bind(addr).await {
        Ok(l) => {
            crate::status::listener("metrics", l.local_addr().unwrap_or(addr));
            Some(tokio::spawn(serve(l, cfg.pin_dir.clone(), shutdown)))
        }
        Err(e) => {
            warn!(%addr, error = %e, "metrics endpoint not served ([admin] metrics_listen): is the port free and the address on this host?");
            None
        }
    }
}

/// Serves `listener` until `shutdown` resolves. The datapath counters come
/// from the maps pinned under `pin_dir`, opened once here (a handle of its
/// own: scrapes never wait on the media layer's writer).
pub async fn serve(
    listener: TcpListener,
    pin_dir: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let maps = match DatapathMaps::from_pins(&pin_dir) {
        Ok(m) => Some(Arc::new(Mutex::new(m))),
        Err(e) => {
            warn!(error = %e, "metrics: pinned maps unavailable; XDP counters left out");
            None
        }
    };
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics endpoint up: GET /metrics");
    }
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let maps = maps.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, maps))
                .await
                .is_err()
            {
                warn!("metrics client too slow; closed");
            }
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
    Malformed,
    Incomplete,
}

/// Parses a request head (`httparse`).
fn route(head: &[u8]) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Route::Incomplete,
        Err(_) => return Route::Malformed,
    }
    if req.method != Some("GET") && req.method != Some("HEAD") {
        return Route::BadMethod;
    }
    // Query strings (Prometheus sends none, curl users may) are ignored.
    match req.path.map(|p| p.split('?').next().unwrap_or(p)) {
        Some("/metrics") => Route::Metrics,
        _ => Route::NotFound,
    }
}

async fn answer(mut stream: TcpStream, maps: Option<Arc<Mutex<DatapathMaps>>>) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let route = loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        head.extend_from_slice(&buf[..n]);
        match route(&head) {
            Route::Incomplete if head.len() < MAX_HEAD => continue,
            Route::Incomplete => break Route::Malformed,
            r => break r,
        }
    };
    let head_only = head.starts_with(b"HEAD ");
    let (status, ctype, body) = match route {
        Route::Metrics => {
            let text = match &maps {
                Some(m) => match m.lock() {
                    Ok(g) => super::render(Some(&g)),
                    Err(_) => super::render(None),
                },
                None => super::render(None),
            };
            match text {
                Ok(t) => ("200 OK", CONTENT_TYPE, t),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding failed\n".into(),
                ),
            }
        }
        Route::NotFound => (
            "404 Not Found",
            "text/plain",
            "only /metrics is served here\n".into(),
        ),
        Route::BadMethod => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
        Route::Malformed | Route::Incomplete => {
            ("400 Bad Request", "text/plain", "bad request\n".into())
        }
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        body.len(),
        if route == Route::BadMethod {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        }
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost"), Route::Incomplete);
        assert_eq!(route(b"\x00\x01 garbage\r\n\r\n"), Route::Malformed);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_scrape_over_tcp_gets_the_exposition() {
        let l = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(l, PathBuf::from("/nonexistent"), async move {
            let _ = stopped.await;
        }));
        crate::metrics::sip_request(crate::media::Side::Internal, "OPTIONS");
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.expect("read");
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.contains("Content-Type: application/openmetrics-text"));
        assert!(
            resp.contains("sip_edge_sip_requests_total{side=\"internal\",method=\"OPTIONS\"}"),
            "{resp}"
        );
        assert!(resp.trim_end().ends_with("# EOF"), "{resp}");
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"DELETE /metrics HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.expect("read");
        assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
        let _ = stop.send(());
        server.await.expect("server");
    }
}
