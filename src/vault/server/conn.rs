//! Connections: the accept loop and one task per connection, with the limits that keep a
//! hostile network from starving the server without a credential.
//!
//! - **Connection cap**: at most `max_connections` are open, kept below the descriptor limit.
//!   At the cap the newest connection takes the place of the oldest one that has not yet
//!   had a request carried out (2xx) and has no request in flight (connections that had one
//!   are never displaced, so capacity stays for the clients the vault serves; a signed-in
//!   identity whose requests are refused, 403/404, earns no such place); when every open
//!   connection has had one or is busy, the newest waits for one to close.
//! - **Per address**: at most `max_per_address` connections from one client address. Past it
//!   the newest takes the place of the oldest from that address that has not shown a
//!   credential and is idle, else it is closed at once, before the TLS handshake. One address
//!   cannot take the server's capacity, and churning its own connections only displaces its
//!   own.
//! - **Unauthenticated traffic keeps nothing open**: a connection whose request was answered
//!   401 (no or a wrong credential) or 429 (throttled) is closed after the answer, so requests
//!   without a credential cannot keep a connection, or its idle timer, alive; and tokenless
//!   requests spend the address's failed sign-in allowance (`throttle`).
//! - **TLS handshake and request head**: a client has `header_timeout` to finish the handshake,
//!   and `header_timeout` from the first byte of a request to the end of its head (slowloris).
//! - **Idle**: a connection with no request in flight and no byte moved for `idle_timeout` is
//!   closed (hyper's own head timeout is set to the same, for a connection that never speaks).
//! - **Body**: a request body must arrive within `body_timeout` (enforced where it is read).
//!
//! A request in flight is never cut by these limits (the long poll of `/cmkfs/watch` waits up
//! to a minute by design).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify, Semaphore};

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
    /// Open connections from one client address at most.
    pub max_per_address: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_per_address: 64,
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

/// One open connection, as the accept loop sees it (to pick one to displace at the cap).
struct Open {
    addr: IpAddr,
    since: Instant,
    act: Arc<Activity>,
    /// A request on it was answered with something other than 401 or 429.
    authenticated: Arc<AtomicBool>,
    evict: Arc<Notify>,
    /// Already asked to close (not chosen twice).
    evicted: bool,
}

/// The open connections: by id, and counted per address.
#[derive(Default)]
struct Registry {
    next: u64,
    open: HashMap<u64, Open>,
    per_addr: HashMap<IpAddr, usize>,
}

impl Registry {
    fn add(&mut self, o: Open) -> u64 {
        self.next += 1;
        *self.per_addr.entry(o.addr).or_default() += 1;
        self.open.insert(self.next, o);
        self.next
    }

    fn remove(&mut self, id: u64) {
        if let Some(o) = self.open.remove(&id) {
            if let Some(n) = self.per_addr.get_mut(&o.addr) {
                *n -= 1;
                if *n == 0 {
                    self.per_addr.remove(&o.addr);
                }
            }
        }
    }

    /// Asks the oldest connection (from address `from`, if given) that never authenticated
    /// and has no request in flight to close; returns whether there was one.
    fn evict_one(&mut self, from: Option<IpAddr>) -> bool {
        let victim = self
            .open
            .values_mut()
            .filter(|o| {
                !o.evicted
                    && from.is_none_or(|a| a == o.addr)
                    && !o.authenticated.load(Ordering::Relaxed)
                    && o.act.in_flight.load(Ordering::Relaxed) == 0
            })
            .min_by_key(|o| o.since);
        match victim {
            Some(o) => {
                o.evicted = true;
                o.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Leaves the registry when the connection task ends (however it ends).
struct Registered {
    registry: Arc<Mutex<Registry>>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.registry).remove(self.id);
    }
}

fn lock(r: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    r.lock().unwrap_or_else(|e| e.into_inner())
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
    let per_addr = limits.max_per_address.clamp(1, max);
    let slots = Arc::new(Semaphore::new(max));
    let registry = Arc::new(Mutex::new(Registry::default()));
    tracing::info!(
        max_connections = max,
        max_per_address = per_addr,
        header_timeout_ms = limits.header_timeout.as_millis() as u64,
        idle_timeout_ms = limits.idle_timeout.as_millis() as u64,
        "accepting connections"
    );
    let mut cap_logged: Option<Instant> = None;
    let mut addr_logged: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
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
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: one address, one form.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        // At its address's cap, the newest connection takes the place of the oldest one from
        // that address that never authenticated; if there is none, it is closed at once.
        let displaced_own = {
            let mut reg = lock(&registry);
            if reg.per_addr.get(&peer.ip()).copied().unwrap_or(0) < per_addr {
                None
            } else {
                Some(reg.evict_one(Some(peer.ip())))
            }
        };
        if displaced_own == Some(false) {
            if addr_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(client = %peer.ip(), max_per_address = per_addr, "per-address connection cap reached by authenticated or busy connections: new connections from it are closed");
                addr_logged = Some(Instant::now());
            }
            drop(tcp);
            continue;
        }
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // At the cap: the newest takes the place of the oldest connection that has
                // shown no credential (unless one from its own address just made room); if
                // every one has (or is busy), it waits for a slot.
                let displaced = displaced_own == Some(true) || lock(&registry).evict_one(None);
                if !displaced && cap_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(
                        max_connections = max,
                        "connection cap reached by authenticated clients: new clients wait"
                    );
                    cap_logged = Some(Instant::now());
                }
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                    _ = stop.changed() => break,
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let act = Arc::new(Activity {
            start: Instant::now(),
            last_io: AtomicU64::new(1),
            head_started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        });
        let authenticated = Arc::new(AtomicBool::new(false));
        let evict = Arc::new(Notify::new());
        let id = lock(&registry).add(Open {
            addr: peer.ip(),
            since: Instant::now(),
            act: act.clone(),
            authenticated: authenticated.clone(),
            evict: evict.clone(),
            evicted: false,
        });
        let conn = Conn {
            act,
            authenticated,
            evict,
            _registered: Registered {
                registry: registry.clone(),
                id,
            },
            _slot: permit,
        };
        tokio::spawn(serve_connection(
            tcp,
            peer,
            tls.clone(),
            state.clone(),
            limits,
            stop.clone(),
            conn,
        ));
    }
    drop(listener);
    // Every connection holds a slot until it is gone.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(grace, slots.acquire_many(all)).await;
}

/// What a connection task holds: its activity, its standing, how it is told to make room,
/// its registry entry and its slot (both given back when the task ends).
struct Conn {
    act: Arc<Activity>,
    authenticated: Arc<AtomicBool>,
    evict: Arc<Notify>,
    _registered: Registered,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    state: Arc<AppState>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    c: Conn,
) {
    let handshake = tokio::time::timeout(limits.header_timeout, tls.accept(tcp));
    let stream = tokio::select! {
        r = handshake => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        _ = c.evict.notified() => {
            tracing::debug!(%peer, "closed during the TLS handshake to make room at the connection cap");
            return;
        }
    };
    let act = c.act.clone();
    let io = TokioIo::new(Tracked {
        inner: stream,
        act: act.clone(),
    });
    let svc_act = act.clone();
    let svc_auth = c.authenticated.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let state = state.clone();
        let authenticated = svc_auth.clone();
        svc_act.in_flight.fetch_add(1, Ordering::Relaxed);
        svc_act.head_started.store(0, Ordering::Relaxed);
        let guard = InFlight(svc_act.clone());
        async move {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ClientAddr(peer));
            let mut resp = api::handle(state, req).await;
            let status = resp.status();
            if status == hyper::StatusCode::UNAUTHORIZED
                || status == hyper::StatusCode::TOO_MANY_REQUESTS
            {
                // Requests without a (good) credential keep nothing open: hyper closes the
                // connection once this answer is written.
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            } else if status.is_success() {
                // Only a request the vault carried out earns the connection its protection
                // at the cap: a signed-in identity without rights (403, 404: e.g. one whose
                // policy was removed) must not be able to hold slots that mounts need to
                // learn of a revocation.
                authenticated.store(true, Ordering::Relaxed);
            }
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
            _ = c.evict.notified() => {
                // Chosen to make room at the cap (it never authenticated); a request that
                // started meanwhile is finished first.
                if act.in_flight.load(Ordering::Relaxed) == 0 {
                    tracing::debug!(%peer, "closed to make room at the connection cap");
                    return;
                }
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
        }
    }
}
