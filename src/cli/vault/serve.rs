//! `cmkfs vault serve`: the vault server (Azure Key Vault's keys REST API over HTTPS).

use super::*;

#[derive(Args, Debug)]
pub(super) struct ServeArgs {
    /// The vault store to serve (default: the embedded vault's, $CMKFS_HOME/vault).
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Address and port to listen on (port 0 picks a free one; the URL is printed).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8443")]
    listen: std::net::SocketAddr,
    /// Certificate chain (PEM); without it a private CA and certificate are generated into
    /// <store>/tls/ on first start.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Extra DNS name or IP address for a generated certificate (repeatable).
    #[arg(long, value_name = "NAME")]
    tls_san: Vec<String>,
    /// The host name clients reach the server by: used in key ids and the 401 challenge
    /// (never the request's Host header) and added to a generated certificate.
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Full URL to issue key ids under (overrides --hostname; e.g. behind a proxy).
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// The server log (rotated at 16 MiB, 3 kept); default $CMKFS_HOME/vault-server.log.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Open connections at most (kept below the descriptor limit). At the cap a new client
    /// takes the place of the oldest idle connection that never authenticated; when all have,
    /// it waits until one closes.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_connections: usize,
    /// Open connections from one client address at most; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_per_address: usize,
    /// Time for the TLS handshake, and for a request head once its first byte arrived.
    #[arg(long, value_name = "T", default_value = "10s", value_parser = crate::cli::volume::parse_duration)]
    header_timeout: Duration,
    /// A connection with no request in flight and no traffic for this long is closed.
    #[arg(long, value_name = "T", default_value = "60s", value_parser = crate::cli::volume::parse_duration)]
    idle_timeout: Duration,
    /// Failed sign-ins allowed in a burst, per client address and per identity; beyond it
    /// the answer is 429 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = 20)]
    sign_in_burst: u32,
    /// One more failed sign-in is allowed per this interval.
    #[arg(long, value_name = "T", default_value = "3s", value_parser = crate::cli::volume::parse_duration)]
    sign_in_refill: Duration,
    /// How often the server applies due key rotation policies (new versions on schedule).
    #[arg(long, value_name = "T", default_value = "60s", value_parser = crate::cli::volume::parse_duration)]
    rotation_check: Duration,
}

/// Runs `cmkfs vault serve`: prints the certificate facts and the URL, serves until SIGTERM.
pub(super) fn serve(home: &Home, a: ServeArgs) -> anyhow::Result<()> {
    use crate::vault::server::{log, Limits, ThrottleConfig};
    use crate::vault::server::{ServeConfig, Server};
    let log_path = a
        .log
        .clone()
        .unwrap_or_else(|| home.root().join("vault-server.log"));
    let writer = log::RotatingLog::open(&log_path, log::MAX_BYTES, log::KEEP)
        .with_context(|| format!("cannot open the server log {}", log_path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CMKFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(writer)
        .try_init();
    let mut cfg = ServeConfig::new(a.store.unwrap_or_else(|| home.vault_dir()), a.listen);
    cfg.tls_files = a.tls_cert.zip(a.tls_key);
    cfg.tls_sans = a.tls_san;
    cfg.public_url = a.url;
    cfg.hostname = a.hostname;
    cfg.limits = Limits {
        header_timeout: a.header_timeout,
        idle_timeout: a.idle_timeout,
        max_connections: a.max_connections,
        max_per_address: a.max_per_address,
        ..Limits::default()
    };
    cfg.throttle = ThrottleConfig {
        burst: a.sign_in_burst.max(1),
        refill: a.sign_in_refill.max(Duration::from_millis(10)),
    };
    cfg.rotation_check = a.rotation_check;
    let server = Server::bind(&cfg).inspect_err(|e| tracing::error!("cannot start: {e}"))?;
    tracing::info!(url = %server.url(), store = %server.store().display(), "vault server started");
    let tls = server.tls_info();
    if tls.generated {
        println!("generated a TLS certificate: {}", tls.cert_path.display());
    }
    println!("tls certificate: {}", tls.cert_path.display());
    println!(
        "pin this CA on clients: {} (sha256 {})",
        tls.ca_path.display(),
        tls.ca_sha256
    );
    println!("store: {}", server.store().display());
    println!("log: {}", log_path.display());
    // Tests and scripts wait for this line: it comes once the socket is bound.
    println!("listening on {}", server.url());
    std::io::stdout().flush()?;
    server.run_until_signal()?;
    eprintln!("vault server stopped");
    Ok(())
}
