//! The vault server: a local vault store behind an HTTPS REST API shaped like Azure Key
//! Vault's keys API (every api-version the service accepts for keys, 7.0-7.6 and 2025-07-01),
//! so that official Key Vault SDKs work against it at their defaults and cmkfs's own HTTP
//! client ([`crate::vault::http`]) works against it too.
//!
//! It is a thin layer: every request authenticates as a vault identity
//! ([`LocalVault::open_as`] with the bearer token's identity and secret) and calls the same
//! [`LocalVault`] method the CLI would, so key state, nbf/exp, key_ops, soft delete, purge
//! protection, access policies and the audit log behave exactly as for the embedded vault.
//! Nothing here re-implements a check. It also applies due key rotation policies on a timer
//! ([`ServeConfig::rotation_check`]).
//!
//! # Endpoints
//!
//! Every operation of the keys API (docs/KEYVAULT.md has the table: which are served, which
//! are refused on purpose and why), routed by family: `keys.rs` (lifecycle and paging),
//! `crypto.rs` (wrap/unwrap, encrypt/decrypt, sign/verify, random bytes; release and
//! attestation refused), `manage.rs` (backup/restore, rotation policy), `deleted.rs`. All take
//! `?api-version=` (an unknown one is the service's 400) and
//! `Authorization: Bearer <identity>.<secret>` (the token `cmkfs vault identity create --json`
//! prints); without a valid token the answer is 401 with
//! `WWW-Authenticate: Bearer authorization="<url>/identities", resource="<url>"`.
//!
//! `GET /cmkfs/watch` answers `{"generation": G}` with the store's change counter (bumped on
//! every key, identity, policy or setting change) at once when `generation` is absent or
//! differs from G, else as soon as it changes, or after `timeout` seconds (default 25, at most
//! 60). Any authenticated identity may watch; it learns only that *something* changed.
//!
//! Errors use Key Vault's envelope `{"error":{"code","message","innererror":{"code"}}}`:
//! 400 `BadParameter` (malformed JSON, bodies over 64 KiB, bad base64url, unknown api-version,
//! RSA1_5, refused operations),
//! 401 `Unauthorized`, 403 `Forbidden` (inner `KeyDisabled`, `KeyExpired`, `AccessDenied`,
//! `OperationNotAllowed`), 404 `KeyNotFound` (inner `KeyDeleted` or `KeyPurged` where the
//! key id named one), 409 `Conflict` (e.g. creating a soft-deleted name), 503/500.
//!
//! 429 `Throttled` with `Retry-After` answers requests from an address, or with a wrong
//! credential for an identity, that failed to sign in too often ([`throttle`]).
//!
//! Key ids in answers and the 401 challenge use the server's own URL: `--url`, else
//! `https://<--hostname>:<port>`, else the listening address; never the request's `Host`
//! header (a client must not choose what the server calls itself).
//!
//! Connections are bounded in number and time ([`conn`]); every request with a 500 answer is
//! logged with an id the answer repeats, in the server log `cmkfs vault serve` writes.

mod api;
pub mod conn;
mod crypto;
mod deleted;
pub mod jwk;
mod keys;
pub mod log;
mod manage;
mod routes;
pub mod throttle;
pub mod tls;
pub mod wire;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::vault::local::LocalVault;
use crate::vault::VaultError;

pub use conn::Limits;
pub use throttle::ThrottleConfig;
pub use tls::TlsInfo;

/// Largest request body the server reads (Key Vault requests are a few KiB at most).
pub const MAX_BODY: usize = 64 * 1024;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding, runtime or signal set-up failed.
    #[error("{0}")]
    Io(String),
    /// Certificate or key problems.
    #[error("TLS: {0}")]
    Tls(String),
    /// The vault store could not be opened.
    #[error(transparent)]
    Vault(#[from] VaultError),
}

/// How to start a server.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The vault store directory (created on first use).
    pub store: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Certificate chain and key (PEM); `None` = generated into `<store>/tls/`.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Extra names/addresses for a generated certificate.
    pub tls_sans: Vec<String>,
    /// The URL key ids are issued under; `None` = `https://<hostname>:<port>`.
    pub public_url: Option<String>,
    /// The host name the server calls itself (key ids, the 401 challenge, and a SAN of a
    /// generated certificate); `None` = the listening address (`localhost` for 0.0.0.0/::).
    pub hostname: Option<String>,
    /// Connection limits.
    pub limits: Limits,
    /// Failed sign-in limits.
    pub throttle: ThrottleConfig,
    /// Request body limit in bytes.
    pub max_body: usize,
    /// Seconds a graceful shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// How often the server applies due key rotation policies.
    pub rotation_check: Duration,
}

/// Default interval of the rotation policy timer.
pub const ROTATION_CHECK: Duration = Duration::from_secs(60);

impl ServeConfig {
    /// Defaults for a store and address.
    pub fn new(store: impl Into<PathBuf>, listen: SocketAddr) -> ServeConfig {
        ServeConfig {
            store: store.into(),
            listen,
            tls_files: None,
            tls_sans: Vec::new(),
            public_url: None,
            hostname: None,
            limits: Limits::default(),
            throttle: ThrottleConfig::default(),
            max_body: MAX_BODY,
            shutdown_grace: Duration::from_secs(5),
            rotation_check: ROTATION_CHECK,
        }
    }
}

/// A bound server, not yet serving (bind first so that the real port is known).
pub struct Server {
    rt: tokio::runtime::Runtime,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<api::AppState>,
    url: String,
    tls_info: TlsInfo,
    grace: Duration,
    limits: Limits,
    rotation_check: Duration,
}

/// A server running on a background thread (tests, embedding). Dropping it shuts it down.
pub struct ServerHandle {
    url: String,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops accepting, lets requests in flight finish (up to the grace period), and waits.
    pub fn shutdown(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

fn host_for(addr: SocketAddr) -> String {
    match addr.ip() {
        ip if ip.is_unspecified() => "localhost".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    }
}

/// Checks a `--hostname`: a DNS name or an IP address.
fn valid_hostname(h: &str) -> bool {
    h.parse::<std::net::IpAddr>().is_ok()
        || (!h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
}

impl Server {
    /// Opens (or creates) the store, unseals it, loads or generates the TLS material, builds
    /// the runtime and binds the listener.
    pub fn bind(cfg: &ServeConfig) -> Result<Server, ServerError> {
        if let Some(h) = &cfg.hostname {
            if !valid_hostname(h) {
                return Err(ServerError::Io(format!(
                    "invalid --hostname {h:?}: use a DNS name or an IP address"
                )));
            }
        }
        // Creates the store on first use, as the embedded vault does.
        let owner = LocalVault::open(&cfg.store)?;
        // Unsealed once, now: requests never wait for (or fail on) a passphrase.
        crate::vault::local::seal::master_key(&cfg.store)?;
        let material = match &cfg.tls_files {
            Some((c, k)) => tls::load_files(c, k)?,
            None => {
                let mut sans = cfg.tls_sans.clone();
                if !cfg.listen.ip().is_unspecified() {
                    sans.push(cfg.listen.ip().to_string());
                }
                sans.extend(cfg.hostname.iter().cloned());
                tls::load_or_generate(&cfg.store, &sans)?
            }
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls_cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ServerError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(material.certs, material.key)
            .map_err(|e| ServerError::Tls(format!("certificate and key do not fit: {e}")))?;
        tls_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores.max(2))
            .thread_name("cmkfs-vault-server")
            .enable_all()
            .build()
            .map_err(|e| ServerError::Io(format!("cannot start the server runtime: {e}")))?;
        let listener = TcpListener::bind(cfg.listen)
            .map_err(|e| ServerError::Io(format!("cannot listen on {}: {e}", cfg.listen)))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ServerError::Io(e.to_string()))?;
        let local = listener
            .local_addr()
            .map_err(|e| ServerError::Io(e.to_string()))?;
        let url = match (&cfg.public_url, &cfg.hostname) {
            (Some(u), _) => u.trim_end_matches('/').to_string(),
            (None, Some(h)) if h.parse::<std::net::Ipv6Addr>().is_ok() => {
                format!("https://[{h}]:{}", local.port())
            }
            (None, Some(h)) => format!("https://{h}:{}", local.port()),
            (None, None) => format!("https://{}:{}", host_for(local), local.port()),
        };
        let generation = {
            let _guard = rt.enter();
            api::generation_channel(&owner)
        };
        let state = Arc::new(api::AppState::new(
            cfg.store.clone(),
            url.clone(),
            cfg.max_body,
            cfg.limits.body_timeout,
            generation,
            throttle::Throttle::new(cfg.throttle),
        ));
        Ok(Server {
            rt,
            listener,
            tls: Arc::new(tls_cfg),
            state,
            url,
            tls_info: material.info,
            grace: cfg.shutdown_grace,
            limits: cfg.limits,
            rotation_check: cfg.rotation_check.max(Duration::from_secs(1)),
        })
    }

    /// The URL clients use (`https://127.0.0.1:PORT` with the real port).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where the certificate and the file to pin are.
    pub fn tls_info(&self) -> &TlsInfo {
        &self.tls_info
    }

    /// The store directory.
    pub fn store(&self) -> &Path {
        self.state.store()
    }

    fn serve(
        self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<
        (
            tokio::runtime::Runtime,
            impl std::future::Future<Output = ()>,
        ),
        ServerError,
    > {
        let Server {
            rt,
            listener,
            tls,
            state,
            grace,
            limits,
            rotation_check,
            ..
        } = self;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|e| ServerError::Io(format!("cannot listen: {e}")))?
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let fut = async move {
            let shutdown_state = state.clone();
            let mut watch_stop = stop.clone();
            // Wake long polls so that they answer instead of holding the shutdown up.
            let waker = tokio::spawn(async move {
                let _ = watch_stop.wait_for(|s| *s).await;
                shutdown_state.shutting_down();
            });
            let rotations = tokio::spawn(manage::apply_loop(
                state.store().to_path_buf(),
                rotation_check,
                stop.clone(),
            ));
            conn::accept_loop(listener, acceptor, state, limits, stop, grace).await;
            waker.abort();
            rotations.abort();
        };
        Ok((rt, fut))
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully (requests in flight finish
    /// within the grace period; long polls answer at once).
    pub fn run_until_signal(self) -> Result<(), ServerError> {
        let grace = self.grace;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (rt, fut) = self.serve(stop_rx)?;
        rt.block_on(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())
                .map_err(|e| ServerError::Io(format!("cannot handle SIGTERM: {e}")))?;
            let mut int = signal(SignalKind::interrupt())
                .map_err(|e| ServerError::Io(format!("cannot handle SIGINT: {e}")))?;
            let server = tokio::spawn(fut);
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
            stop_tx.send_replace(true);
            server.await.map_err(|e| ServerError::Io(e.to_string()))
        })?;
        // Blocking tasks (store I/O) are short; do not wait for stragglers forever.
        rt.shutdown_timeout(grace);
        Ok(())
    }

    /// Serves on a background thread until the handle is shut down or dropped.
    pub fn spawn(self) -> Result<ServerHandle, ServerError> {
        let url = self.url.clone();
        let grace = self.grace;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (rt, fut) = self.serve(stop_rx)?;
        let thread = std::thread::Builder::new()
            .name("cmkfs-vault-server".into())
            .spawn(move || {
                rt.block_on(fut);
                rt.shutdown_timeout(grace);
            })
            .map_err(|e| ServerError::Io(format!("cannot start the server thread: {e}")))?;
        Ok(ServerHandle {
            url,
            stop: stop_tx,
            thread: Some(thread),
        })
    }
}
