//! Connections: the accept loop and one task per connection, with the limits that keep a
//! hostile network from starving the server without a credential.
//!
//! - **Connection cap**: at most `max_connections` are open; at the cap the loop stops
//!   accepting (new clients wait in the kernel's backlog, holding no descriptor of ours) until
//!   a connection closes. The cap is kept below the descriptor limit.
//! - **TLS handshake and request head**: a client has `header_timeout` to finish the handshake,
//!   and `header_timeout` from the first byte of a request to the end of its head (slowloris).
//! - **Idle**: a connection with no request in flight and no byte moved for `idle_timeout` is
//!   closed (hyper's own head timeout is set to the same, for a connection that never speaks).
//! - **Body**: a request body must arrive within `body_timeout` (enforced where it is read).
//!
//! A request in flight is never cut by these limits (the long poll of `/cmkfs/watch` waits up
//! to a minute by design).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Semaphore};

use super::api::{self, AppState};

/// Limits on connections (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// TLS handshake, and first byte to end of a request head.
    pub header_timeout: Duration,
    /// No request in flight and no byte moved for this long: closed.
    pub idle_timeout: Duration,
    /// A request body must be read within this.
    pub body_timeout: Duration,
    /// Open connections at most (clamped below the descriptor limit).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

impl Limits {
    /// `max_connections`, lowered to leave room for the store's files and the runtime below
    /// the process's descriptor limit (`RLIMIT_NOFILE`).
    pub fn effective_max_connections(&self) -> usize {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
            usize::try_from(rl.rlim_cur).unwrap_or(usize::MAX)
        } else {
            usize::MAX
        };
        let room = soft.saturating_sub(64).max(8);
        self.max_connections.clamp(1, room)
    }
}

/// The client's address, put into each request's extensions.
#[derive(Clone, Copy, Debug)]
pub(super) struct ClientAddr(pub SocketAddr);

/// Milliseconds since the connection task started; 0 = "not set".
struct Activity {
    start: Instant,
    /// Last time a byte was read or written.
    last_io: AtomicU64,
    /// When the first byte of a request head arrived (0: none pending).
    head_started: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// The TLS stream, noting when bytes move.
struct Tracked<S> {
    inner: S,
    act: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = self.act.now();
            self.act.last_io.store(now, Ordering::Relaxed);
            if self.act.in_flight.load(Ordering::Relaxed) == 0 {
                let _ = self.act.head_started.compare_exchange(
                    0,
                    now,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            let now = self.act.now();
            self.act.last_io.store(now, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request in flight until dropped (also when the connection is cut mid-request).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.now();
        self.0.last_io.store(now, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts until `stop` turns true, then waits up to `grace` for open connections (which
/// have been asked to finish their request in flight and close).
pub(super) async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    state: Arc<AppState>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let max = limits.effective_max_connections();
    let slots = Arc::new(Semaphore::new(max));
    tracing::info!(
        max_connections = max,
        header_timeout_ms = limits.header_timeout.as_millis() as u64,
        idle_timeout_ms = limits.idle_timeout.as_millis() as u64,
        "accepting connections"
    );
    let mut cap_logged: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        if slots.available_permits() == 0
            && cap_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10))
        {
            tracing::warn!(
                max_connections = max,
                "connection cap reached: new clients wait"
            );
            cap_logged = Some(Instant::now());
        }
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.changed() => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: one address, one form.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        tokio::spawn(serve_connection(
            tcp,
            peer,
            tls.clone(),
            state.clone(),
            limits,
            stop.clone(),
            permit,
        ));
    }
    drop(listener);
    // Every connection holds a slot until it is gone.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(grace, slots.acquire_many(all)).await;
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    state: Arc<AppState>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let stream = match tokio::time::timeout(limits.header_timeout, tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let act = Arc::new(Activity {
        start: Instant::now(),
        last_io: AtomicU64::new(1),
        head_started: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        act: act.clone(),
    });
    let svc_act = act.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let state = state.clone();
        svc_act.in_flight.fetch_add(1, Ordering::Relaxed);
        svc_act.head_started.store(0, Ordering::Relaxed);
        let guard = InFlight(svc_act.clone());
        async move {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ClientAddr(peer));
            let resp = api::handle(state, req).await;
            drop(guard);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .keep_alive(true)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let tick = (limits.header_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    let header_ms = u64::try_from(limits.header_timeout.as_millis()).unwrap_or(u64::MAX);
    let idle_ms = u64::try_from(limits.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                return;
            }
            _ = ticker.tick() => {
                let now = act.now();
                let busy = act.in_flight.load(Ordering::Relaxed) > 0;
                let head = act.head_started.load(Ordering::Relaxed);
                if !busy && head != 0 && now.saturating_sub(head) > header_ms {
                    tracing::debug!(%peer, "request head not complete in time: closed");
                    return;
                }
                if !busy && now.saturating_sub(act.last_io.load(Ordering::Relaxed)) > idle_ms {
                    tracing::debug!(%peer, "idle connection closed");
                    return;
                }
            }
            _ = stop.changed(), if !stopping => {
                // Finish the request in flight (if any), then close.
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
        }
    }
}
