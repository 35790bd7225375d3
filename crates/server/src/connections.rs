//! Connections: accepted up to a cap, served over HTTP/1.1 with a deadline
//! on every request head (the same deadline closes keep-alive connections
//! left idle) and on every write that makes no progress (a client that
//! stops reading its answer), and drained on shutdown. The cap waits for a
//! free place rather than refuse: new clients queue in the kernel's
//! backlog while idle ones time out.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long clients may take, and how many may be connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; past it, new ones wait to be accepted.
    pub max_connections: usize,
    /// Time to send a request head, counted from the connection's start or
    /// the end of its previous answer: it bounds idle connections too.
    pub header_timeout: Duration,
    /// Time to send a request body once its head is in.
    pub body_timeout: Duration,
    /// Time a write may wait for a client that reads nothing (a streamed
    /// answer's next event, or any answer's bytes); past it the request is
    /// cancelled and the connection closed.
    pub write_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// File descriptors kept for what is not a client connection: model files,
/// upstream connections, logs.
const RESERVED_DESCRIPTORS: usize = 256;

/// Raises the soft limit on open files to the hard one where the system
/// allows, and returns the connection cap that fits under it.
pub fn fit_to_descriptor_limit(max_connections: usize) -> usize {
    let Some(soft) = raise_descriptor_limit() else {
        return max_connections;
    };
    let fits = soft.saturating_sub(RESERVED_DESCRIPTORS).max(1);
    if fits < max_connections {
        tracing::warn!(
            max_connections,
            open_file_limit = soft,
            cap = fits,
            "the open-file limit is too low for the connection cap; serving fewer connections (raise it with ulimit -n)"
        );
        fits
    } else {
        max_connections
    }
}

/// The soft limit on open files after raising it to the hard limit.
#[cfg(unix)]
fn raise_descriptor_limit() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct passed,
    // which lives on this stack frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                tracing::debug!(
                    from = limit.rlim_cur,
                    to = raised.rlim_cur,
                    "raised the open-file limit"
                );
                limit = raised;
            }
        }
    }
    Some(usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX))
}

#[cfg(not(unix))]
fn raise_descriptor_limit() -> Option<usize> {
    None
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open
/// connections finish their answers and close (the caller bounds how long).
/// `open` counts the connections open.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    open: Arc<AtomicUsize>,
    shutdown: impl Future<Output = ()>,
) {
    let cap = limits.max_connections.max(1);
    let places = Arc::new(Semaphore::new(cap));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let place = match Arc::clone(&places).try_acquire_owned() {
            Ok(place) => place,
            Err(_) => {
                tracing::warn!(
                    max_connections = cap,
                    "connection limit reached; new connections wait until one closes (raise it with --max-connections)"
                );
                tokio::select! {
                    place = Arc::clone(&places).acquire_owned() => match place {
                        Ok(place) => place,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it
                    // was taken: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small writes (SSE events) go out at once, not after the client's
        // delayed acknowledgement of the previous one.
        let _ = tcp.set_nodelay(true);
        let mut stream = tokio_io_timeout::TimeoutStream::new(tcp);
        stream.set_write_timeout(Some(limits.write_timeout));
        let service = TowerToHyperService::new(app.clone());
        let connection =
            graceful.watch(http.serve_connection(TokioIo::new(Box::pin(stream)), service));
        open.fetch_add(1, Ordering::Relaxed);
        let open = Arc::clone(&open);
        tokio::spawn(async move {
            let _ = connection.await;
            open.fetch_sub(1, Ordering::Relaxed);
            drop(place);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
