//! `cmkfs vault ...`: keys, identities, access policies, settings and the audit log of the
//! embedded vault. Parses and prints; the rules live in `vault::local`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde::Serialize;

use crate::fsutil::create_private_dir;
use crate::home::Home;
use crate::vault::local::seal::{self, KdfParams};
use crate::vault::local::unlock;
use crate::vault::local::{AuditEvent, ConfigUpdate, LocalVault, PolicyScope};
use crate::vault::{
    CreateKeyOptions, Credential, DeletedKeyInfo, ImportKeyOptions, KeyInfo, KeyUpdate, Permission,
    Vault, VaultProperties, WrapAlg,
};

/// Vault administration.
#[derive(Args, Debug)]
pub struct VaultArgs {
    /// Act as the identity of this credential file (its access policies apply) instead of
    /// the vault owner.
    #[arg(long, global = true, value_name = "FILE")]
    credential: Option<PathBuf>,
    /// The vault `key` commands act on: `local:` (default), `https://HOST:PORT` (with
    /// --credential, or a credential in $CMKFS_HOME/credentials), or
    /// `pkcs11:/path/module.so?token=LABEL&pin-source=file:/path`.
    #[arg(long, global = true, value_name = "URL")]
    vault: Option<String>,
    #[command(subcommand)]
    command: VaultCommand,
}

#[derive(Subcommand, Debug)]
enum VaultCommand {
    /// Keys and their versions.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Identities that may use the vault (each with a credential file).
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Access policies: identity × key → permissions.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show or change vault settings (soft-delete retention, purge protection).
    Config(ConfigArgs),
    /// Read the audit log (one line per vault operation).
    Audit(AuditArgs),
    /// Serve the vault store over HTTPS with Azure Key Vault's keys REST API.
    Serve(ServeArgs),
    /// Seal the embedded vault at rest: its private keys, TLS keys and the credentials in
    /// $CMKFS_HOME/credentials are encrypted under a master key wrapped by a passphrase
    /// (Argon2id). Resumes an interrupted seal; a new vault is created sealed.
    Seal(SealArgs),
    /// Unseal the vault for a while: the master key is cached in the kernel keyring (user
    /// keyring) so that commands and mounts need no passphrase until it times out.
    Unseal(UnsealArgs),
    /// Drop the cached master key from the kernel keyring (running mounts and servers keep
    /// theirs until they stop).
    Lock,
    /// Change the passphrase the master key is wrapped under (the old one is asked first).
    ChangePassphrase(ChangePassphraseArgs),
    /// Trust a vault on this machine: volumes (whose headers only name vaults) and commands
    /// may then use it. local: always is.
    Add(AddArgs),
    /// Stop trusting a configured vault (volumes with keys there stop mounting here).
    Remove {
        /// Name given at `vault add`.
        name: String,
    },
    /// List the vaults this machine trusts.
    ListConfigured {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct AddArgs {
    /// A local name for the vault (`--vault NAME` accepts it).
    name: String,
    /// `https://HOST[:PORT]` or `pkcs11:/path/module.so?token=LABEL&pin-source=file:/path`
    /// (the module must be owned by root and not writable by others).
    url: String,
    /// https: PEM file of the CA the server's certificate must chain to (pinned). With
    /// `--credential FILE`, that credential is the one the vault is used with (else one in
    /// $CMKFS_HOME/credentials).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SealArgs {
    /// Argon2id cost of a new seal: `default` (64 MiB, t=3, p=4), or m=KIB,t=N,p=N
    /// (default: $CMKFS_VAULT_KDF, else `default`). A vault already sealed keeps its cost:
    /// change it with `cmkfs vault change-passphrase --kdf`.
    #[arg(long, value_name = "PARAMS")]
    kdf: Option<String>,
    /// Also cache the master key in the kernel keyring this long (so that mounts started
    /// before the seal keep working), at most 24h; by default nothing is cached.
    #[arg(long, value_parser = parse_cache_time)]
    cache_for: Option<Duration>,
}

/// Longest time the kernel keyring keeps an unsealed master key (`vault unseal --timeout`,
/// `vault seal --cache-for`): a day. A cache is a trade of safety for convenience; one that
/// outlives a working day is a vault left open.
pub const MAX_CACHE_TIME: Duration = Duration::from_secs(24 * 3600);

fn parse_cache_time(s: &str) -> Result<Duration, String> {
    let d = crate::cli::volume::parse_duration(s)?;
    if d > MAX_CACHE_TIME {
        return Err(format!(
            "{s} is longer than the {} cmkfs keeps an unsealed key cached (use `cmkfs vault \
             unseal` again when it runs out)",
            humantime::format_duration(MAX_CACHE_TIME)
        ));
    }
    Ok(d)
}

#[derive(Args, Debug)]
struct UnsealArgs {
    /// How long the kernel keeps the key before it times out (at most 24h).
    #[arg(long, default_value = "15m", value_parser = parse_cache_time)]
    timeout: Duration,
}

#[derive(Args, Debug)]
struct ChangePassphraseArgs {
    /// Read the new passphrase from this file (else asked twice on the terminal); the old
    /// one comes from --passphrase-file, $CMKFS_PASSPHRASE_FILE or the terminal.
    #[arg(long, value_name = "FILE")]
    new_passphrase_file: Option<PathBuf>,
    /// Argon2id cost for the new wrap (default: the same as before... see `vault seal --kdf`).
    #[arg(long, value_name = "PARAMS")]
    kdf: Option<String>,
}

#[derive(Args, Debug)]
struct ServeArgs {
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

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create a key (RSA, its first version).
    Create {
        /// Key name: 1-127 letters, digits and dashes.
        name: String,
        /// RSA modulus size: 2048, 3072 or 4096.
        #[arg(long, default_value_t = 3072, value_name = "BITS")]
        key_size: u32,
        /// Default wrap algorithm recorded for the key.
        #[arg(long, value_enum, default_value_t = AlgArg::RsaOaep256)]
        alg: AlgArg,
        /// Print the new version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Import an RSA private key (PKCS#8 PEM/DER, or PKCS#1 PEM) as a new version.
    Import {
        /// Key name (created when absent).
        name: String,
        /// The private key file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Wrap algorithm of a new key (default RSA-OAEP-256); an existing key keeps its own.
        #[arg(long, value_enum)]
        alg: Option<AlgArg>,
        /// Print the new version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (their latest versions).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one version (the latest by default), disabled ones included.
    #[command(disable_version_flag = true)]
    Show {
        /// Key name.
        name: String,
        /// Version id (32 hex digits).
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// Print JSON (with the full versioned `kid`).
        #[arg(long)]
        json: bool,
    },
    /// List every version of a key, oldest first.
    Versions {
        /// Key name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a new version with the same size and operations.
    Rotate {
        /// Key name.
        name: String,
        /// Print the new version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply every due rotation policy now (new versions, near-expiry notices); a vault
    /// server and mounts of the embedded vault also do it on their own.
    RotateDue {
        /// Print the new versions as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or set a key's rotation policy (ISO 8601 durations: P90D, P3M, PT48H).
    RotationPolicy {
        /// Key name.
        name: String,
        /// Rotate this long after the latest version was created.
        #[arg(long, value_name = "DURATION", conflicts_with = "rotate_before_expiry")]
        rotate_after_create: Option<String>,
        /// Rotate this long before the latest version expires.
        #[arg(long, value_name = "DURATION")]
        rotate_before_expiry: Option<String>,
        /// Record a near-expiry notice this long before the latest version expires.
        #[arg(long, value_name = "DURATION")]
        notify_before_expiry: Option<String>,
        /// Expiry given to every new version.
        #[arg(long, value_name = "DURATION")]
        expiry: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Disable a key: every version (or only `--version V`), so that every volume wrapped by
    /// it is cut off, whichever version wraps its DEK. Prints the versions it disabled.
    #[command(disable_version_flag = true)]
    Disable {
        /// Key name.
        name: String,
        /// Disable only this version (32 hex digits), as Key Vault's API does.
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// Print the versions changed as JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Enable a key: every version (or only `--version V`); the counterpart of `disable`.
    #[command(disable_version_flag = true)]
    Enable {
        /// Key name.
        name: String,
        /// Enable only this version (32 hex digits).
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// Print the versions changed as JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Change a version's attributes (`--enable`/`--disable` without `--version`: every
    /// version, as `key enable`/`key disable`).
    #[command(disable_version_flag = true, group(ArgGroup::new("change").required(true).multiple(true)
        .args(["enable", "disable", "nbf", "exp", "key_ops"])))]
    Update {
        /// Key name.
        name: String,
        /// Version id (the latest by default; for --enable/--disable, every version by
        /// default).
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// Enable the version (every version without --version).
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Disable the version (every version without --version): every operation with it
        /// is refused.
        #[arg(long)]
        disable: bool,
        /// Not-before: RFC 3339 time, `now`, `+DURATION`, `-DURATION`, `@UNIXSECS` or `none`.
        #[arg(long, value_name = "T", allow_hyphen_values = true)]
        nbf: Option<String>,
        /// Expiry, same forms as --nbf.
        #[arg(long, value_name = "T", allow_hyphen_values = true)]
        exp: Option<String>,
        /// Permitted operations, comma-separated (wrapKey,unwrapKey,...).
        #[arg(long, value_name = "OPS", value_delimiter = ',')]
        key_ops: Option<Vec<String>>,
        /// Print the updated version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Soft-delete a key: recoverable until the retention period ends.
    Delete {
        /// Key name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List soft-deleted keys.
    ListDeleted {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a soft-deleted key.
    ShowDeleted {
        /// Key name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Undo a soft delete.
    Recover {
        /// Key name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a soft-deleted key for good (refused under purge protection until the
    /// retention period has passed).
    Purge {
        /// Key name.
        name: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AlgArg {
    /// RSA-OAEP with SHA-256.
    #[value(name = "RSA-OAEP-256")]
    RsaOaep256,
    /// RSA-OAEP with SHA-1 (for HSMs without SHA-2 OAEP).
    #[value(name = "RSA-OAEP")]
    RsaOaep,
}

impl From<AlgArg> for WrapAlg {
    fn from(a: AlgArg) -> WrapAlg {
        match a {
            AlgArg::RsaOaep256 => WrapAlg::RsaOaep256,
            AlgArg::RsaOaep => WrapAlg::RsaOaep,
        }
    }
}

#[derive(Subcommand, Debug)]
enum IdentityCommand {
    /// Create an identity and write its credential file (0600).
    Create {
        /// Identity name: 1-127 letters, digits and dashes.
        name: String,
        /// Where to write the credential (default `$CMKFS_HOME/credentials/NAME.json`, sealed
        /// with the vault's keys). A file elsewhere is an export for another host, written in
        /// clear (0600): seal it there (`cmkfs vault seal`) and delete the copy.
        #[arg(long, value_name = "FILE")]
        credential_file: Option<PathBuf>,
        /// Write a credential for this vault server URL (`https://HOST:PORT` of
        /// `cmkfs vault serve`) instead of the embedded vault. Kept in this home it is sealed;
        /// to copy it to a client host, name the export with --credential-file.
        #[arg(long, value_name = "URL")]
        server_url: Option<String>,
        /// CA certificate to pin in a --server-url credential (default: the server's
        /// generated <store>/tls/ca.pem when present).
        #[arg(long, value_name = "FILE", requires = "server_url")]
        ca_cert: Option<PathBuf>,
        /// Print JSON, including the bearer `token` for HTTP clients (e.g. the Azure SDKs).
        #[arg(long)]
        json: bool,
    },
    /// List identities.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete an identity and its policies: its credential stops working at once.
    Delete {
        /// Identity name.
        name: String,
    },
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("scope").required(true).args(["key", "all_keys"])))]
struct ScopeArgs {
    /// The key the policy covers.
    #[arg(long, value_name = "NAME")]
    key: Option<String>,
    /// The policy covers every key, present and future.
    #[arg(long)]
    all_keys: bool,
}

impl ScopeArgs {
    fn scope(&self) -> PolicyScope {
        match &self.key {
            Some(k) if !self.all_keys => PolicyScope::Key(k.clone()),
            _ => PolicyScope::AllKeys,
        }
    }
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Set (replace) an identity's permissions on a key or on all keys.
    Set {
        /// Identity name.
        identity: String,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Comma-separated: get, list, wrapKey, unwrapKey, update, create, import, delete,
        /// recover, purge, rotate, or `all`.
        #[arg(long, value_name = "PERMS", value_delimiter = ',', required = true)]
        permissions: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an identity's policy on a key or on all keys.
    Remove {
        /// Identity name.
        identity: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// List access policies.
    List {
        /// Only this identity's policies.
        #[arg(long, value_name = "NAME")]
        identity: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct ConfigArgs {
    /// Days a deleted key stays recoverable (7-90); applies to keys deleted from now on.
    #[arg(long, value_name = "N")]
    retention_days: Option<u32>,
    /// `on` turns purge protection on; it can never be turned off again.
    #[arg(long, value_enum, value_name = "on")]
    purge_protection: Option<OnOff>,
    /// Rotate the audit log (audit.log -> audit.log.1 ..) when a line would take it past
    /// this many bytes; 0 = never (default 64 MiB).
    #[arg(long, value_name = "BYTES")]
    audit_max_size: Option<u64>,
    /// Rotated audit logs kept (default 5); older ones are deleted.
    #[arg(long, value_name = "N")]
    audit_keep: Option<u32>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug)]
struct AuditArgs {
    /// Keep reading: print new events as they are written (stop with Ctrl-C).
    #[arg(long)]
    follow: bool,
    /// Print the events as JSON lines (as stored).
    #[arg(long)]
    json: bool,
    /// Only events about this key.
    #[arg(long, value_name = "NAME")]
    key: Option<String>,
    /// Only events by this identity (`owner` for the vault owner).
    #[arg(long, value_name = "NAME")]
    identity: Option<String>,
    /// Only failed operations.
    #[arg(long)]
    failures: bool,
    /// Only the last N matching events (before following).
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
}

impl VaultArgs {
    /// Whether this is `vault serve` (a long-running server).
    pub(crate) fn is_serve(&self) -> bool {
        matches!(self.command, VaultCommand::Serve(_))
    }
}

/// Runs `cmkfs vault ...`.
pub fn run(a: VaultArgs) -> anyhow::Result<()> {
    let home = Home::from_env();
    let command = match a.command {
        VaultCommand::Serve(s) => return serve(&home, s),
        VaultCommand::Seal(s) => return seal(&home, s),
        VaultCommand::Unseal(u) => return unseal(&home, u),
        VaultCommand::Lock => return lock(&home),
        VaultCommand::ChangePassphrase(c) => return change_passphrase(&home, c),
        // `--credential FILE` (global) is the credential the vault is used with.
        VaultCommand::Add(add) => return add_vault(&home, add, a.credential),
        VaultCommand::Remove { name } => return remove_vault(&home, &name),
        VaultCommand::ListConfigured { json } => return list_configured(&home, json),
        VaultCommand::Key(k) => {
            // Key commands work on every backend; the others are the embedded vault's.
            let cred = a.credential.as_deref().map(Credential::load).transpose()?;
            let url = match (&a.vault, &cred) {
                (Some(u), _) => u.clone(),
                (None, Some(c)) => c.vault.clone(),
                (None, None) => crate::vault::local::URL.to_string(),
            };
            let v = crate::vault::connect(&url, &home, cred.as_ref())?;
            return key(v.as_ref(), k);
        }
        other => other,
    };
    if let Some(u) = a
        .vault
        .as_deref()
        .filter(|u| !matches!(*u, "local:" | "local"))
    {
        bail!("--vault {u}: identities, policies, settings and the audit log are managed on the vault host, with the local: vault");
    }
    let vault = match &a.credential {
        Some(path) => {
            LocalVault::open_with_credential(&home.vault_dir(), &Credential::load(path)?)?
        }
        None => LocalVault::open(&home.vault_dir())?,
    };
    match command {
        VaultCommand::Key(_)
        | VaultCommand::Serve(_)
        | VaultCommand::Seal(_)
        | VaultCommand::Unseal(_)
        | VaultCommand::Lock
        | VaultCommand::ChangePassphrase(_)
        | VaultCommand::Add(_)
        | VaultCommand::Remove { .. }
        | VaultCommand::ListConfigured { .. } => Ok(()),
        VaultCommand::Identity(i) => identity(&vault, &home, i),
        VaultCommand::Policy(p) => policy(&vault, p),
        VaultCommand::Config(c) => config(&vault, c),
        VaultCommand::Audit(a) => audit(&vault, a),
    }
}

fn kdf_arg(kdf: Option<&str>) -> anyhow::Result<KdfParams> {
    Ok(match kdf {
        Some(k) => KdfParams::parse(k)?,
        None => unlock::kdf_params()?,
    })
}

/// `cmkfs vault seal`.
fn seal(home: &Home, a: SealArgs) -> anyhow::Result<()> {
    let kdf = kdf_arg(a.kdf.as_deref())?;
    if let (Some(given), Some(rec)) = (&a.kdf, seal::read_record(&home.vault_dir())?) {
        if rec.kdf() != kdf {
            bail!(
                "the vault {} is already sealed with {}; --kdf only sets the cost of a new \
                 seal: to change it, run `cmkfs vault change-passphrase --kdf {given}`",
                home.vault_dir().display(),
                rec.kdf()
            );
        }
    }
    crate::vault::local::suppress_unsealed_warning();
    let vault = LocalVault::open(&home.vault_dir())?;
    let cred_dir = home.root().join("credentials");
    let report = vault.seal(Some(&cred_dir), kdf)?;
    let store = home.vault_dir();
    if report.resumed && report.sealed_files == 0 {
        println!(
            "the vault {} is sealed (nothing left in clear)",
            store.display()
        );
    } else {
        println!(
            "sealed the vault {}: {} file(s) rewritten sealed{}",
            store.display(),
            report.sealed_files,
            if report.resumed {
                " (an earlier seal finished)"
            } else {
                ""
            }
        );
    }
    if let Some(rec) = seal::read_record(&store)? {
        if rec.kdf().memory_kib < KdfParams::DEFAULT.memory_kib / 4 {
            eprintln!(
                "cmkfs: warning: the passphrase is stretched with {} only: a stolen disk's \
                 passphrase is cheap to guess (use --kdf default for real data)",
                rec.kdf()
            );
        }
    }
    match a.cache_for.filter(|d| !d.is_zero()) {
        Some(d) => {
            if let Some(mk) = seal::master_key(&store)? {
                match unlock::keyring_store(&mk, d.as_secs()) {
                    Ok(()) => println!(
                        "the master key stays in the kernel keyring for {} (running mounts \
                         pick it up); `cmkfs vault lock` drops it now",
                        humantime::format_duration(d)
                    ),
                    Err(e) => eprintln!("cmkfs: warning: {e}"),
                }
            }
        }
        // Only a store that was in clear until now can have mounts that never needed the key.
        None if !report.resumed => println!(
            "mounts and servers started before this seal need the master key at their next key \
             use: give it to them with `cmkfs vault unseal` (or seal with --cache-for 15m)"
        ),
        None => {}
    }
    Ok(())
}

/// `cmkfs vault unseal`.
fn unseal(home: &Home, a: UnsealArgs) -> anyhow::Result<()> {
    let store = home.vault_dir();
    let mk = seal::master_key_from_passphrase(&store)?;
    let secs = a.timeout.as_secs().max(1);
    unlock::keyring_store(&mk, secs)?;
    println!(
        "unsealed the vault {} for {} (kernel keyring: cmkfs:vault:{}); `cmkfs vault lock` seals it again",
        store.display(),
        humantime::format_duration(Duration::from_secs(secs)),
        mk.id()
    );
    Ok(())
}

/// `cmkfs vault lock`.
fn lock(home: &Home) -> anyhow::Result<()> {
    let store = home.vault_dir();
    let Some(rec) = seal::read_record(&store)? else {
        bail!(
            "the vault {} is not sealed, so there is nothing to lock: seal it with `cmkfs vault seal`",
            store.display()
        );
    };
    if unlock::keyring_drop(&rec.id)? {
        println!(
            "locked the vault {}: the cached master key is gone from the kernel keyring",
            store.display()
        );
    } else {
        println!(
            "the vault {} was not unsealed (nothing cached)",
            store.display()
        );
    }
    Ok(())
}

/// `cmkfs vault change-passphrase`.
fn change_passphrase(home: &Home, a: ChangePassphraseArgs) -> anyhow::Result<()> {
    let store = home.vault_dir();
    let rec = seal::read_record(&store)?.ok_or_else(|| seal::not_sealed(&store))?;
    let kdf = match a.kdf.as_deref() {
        Some(k) => KdfParams::parse(k)?,
        None => rec.kdf(),
    };
    let vault = LocalVault::open(&store)?;
    let what = format!("the vault {}", store.display());
    let old = unlock::passphrase(&what)?;
    let new = match &a.new_passphrase_file {
        Some(p) => {
            unlock::read_passphrase_file(p, format!("--new-passphrase-file {}", p.display()))?
        }
        None => unlock::new_passphrase_on_terminal(&what)?,
    };
    vault.change_passphrase(&old, &new, kdf)?;
    println!("changed the passphrase of the vault {}", store.display());
    Ok(())
}

/// Runs `cmkfs vault serve`: prints the certificate facts and the URL, serves until SIGTERM.
fn serve(home: &Home, a: ServeArgs) -> anyhow::Result<()> {
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

fn key(v: &dyn Vault, cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Create {
            name,
            key_size,
            alg,
            json,
        } => {
            let opts = CreateKeyOptions {
                key_size,
                wrap_alg: alg.into(),
            };
            let info = with_progress("generating the RSA key", || v.create_key(&name, &opts))?;
            print_key(&info, json, "created")
        }
        KeyCommand::Import {
            name,
            file,
            alg,
            json,
        } => {
            let bytes = zeroize::Zeroizing::new(
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?,
            );
            let der = crate::vault::local::read_private_key(&bytes)
                .with_context(|| format!("cannot import {}", file.display()))?;
            let info = v.import_key(
                &name,
                &der,
                &ImportKeyOptions {
                    wrap_alg: alg.map(Into::into),
                },
            )?;
            print_key(&info, json, "imported")
        }
        KeyCommand::List { json } => {
            let keys = v.list_keys()?;
            if json {
                return print_json(&keys);
            }
            if keys.is_empty() {
                println!("no keys (create one with `cmkfs vault key create NAME`)");
                return Ok(());
            }
            print_table(
                &[
                    "NAME",
                    "LATEST VERSION",
                    "SIZE",
                    "ENABLED",
                    "EXPIRES",
                    "UPDATED",
                ],
                keys.iter().map(|k| {
                    vec![
                        k.name.clone(),
                        k.version.clone(),
                        k.key_size.to_string(),
                        yes_no(k.enabled).into(),
                        opt_time(k.exp),
                        time(k.updated),
                    ]
                }),
            );
            Ok(())
        }
        KeyCommand::Show {
            name,
            version,
            json,
        } => {
            let info = v.describe_key(&name, version.as_deref())?;
            print_key(&info, json, "")
        }
        KeyCommand::Versions { name, json } => {
            let versions = v.list_key_versions(&name)?;
            if json {
                return print_json(&versions);
            }
            print_table(
                &[
                    "VERSION",
                    "SIZE",
                    "ENABLED",
                    "NOT BEFORE",
                    "EXPIRES",
                    "CREATED",
                ],
                versions.iter().map(|k| {
                    vec![
                        k.version.clone(),
                        k.key_size.to_string(),
                        yes_no(k.enabled).into(),
                        opt_time(k.nbf),
                        opt_time(k.exp),
                        time(k.created),
                    ]
                }),
            );
            Ok(())
        }
        KeyCommand::Rotate { name, json } => {
            let info = with_progress("generating the new RSA key version", || v.rotate_key(&name))?;
            print_key(&info, json, "rotated")
        }
        KeyCommand::RotateDue { json } => {
            let made = with_progress("applying due rotation policies", || v.apply_due_rotations())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&made)?);
            } else if made.is_empty() {
                println!("no rotation was due");
            } else {
                for k in &made {
                    println!("rotated by policy: {}", k.kid);
                }
            }
            Ok(())
        }
        KeyCommand::RotationPolicy {
            name,
            rotate_after_create,
            rotate_before_expiry,
            notify_before_expiry,
            expiry,
            json,
        } => {
            use crate::vault::local::policy::{LifetimeAction, PolicyAction, RotationPolicy};
            let setting = rotate_after_create.is_some()
                || rotate_before_expiry.is_some()
                || notify_before_expiry.is_some()
                || expiry.is_some();
            let p = if setting {
                let mut actions = Vec::new();
                if rotate_after_create.is_some() || rotate_before_expiry.is_some() {
                    actions.push(LifetimeAction {
                        action: PolicyAction::Rotate,
                        time_after_create: rotate_after_create,
                        time_before_expiry: rotate_before_expiry,
                    });
                }
                if let Some(t) = notify_before_expiry {
                    actions.push(LifetimeAction {
                        action: PolicyAction::Notify,
                        time_after_create: None,
                        time_before_expiry: Some(t),
                    });
                }
                v.set_rotation_policy(
                    &name,
                    &RotationPolicy {
                        actions,
                        expiry_time: expiry,
                        ..Default::default()
                    },
                )?
            } else {
                v.rotation_policy(&name)?
            };
            print_policy(&name, &p, json)
        }
        KeyCommand::Update {
            name,
            version,
            enable,
            disable,
            nbf,
            exp,
            key_ops,
            json,
        } => {
            let enabled = if enable {
                Some(true)
            } else if disable {
                Some(false)
            } else {
                None
            };
            // Without --version, enabling or disabling is for the key as a whole: a volume
            // wrapped by an older version must be cut off too (revocation).
            let mut changed = Vec::new();
            if let (Some(e), None) = (enabled, &version) {
                changed = set_enabled(v, &name, None, e)?;
            }
            let upd = KeyUpdate {
                enabled: if version.is_some() { enabled } else { None },
                nbf: nbf
                    .as_deref()
                    .map(|t| parse_time(t).context("--nbf"))
                    .transpose()?,
                exp: exp
                    .as_deref()
                    .map(|t| parse_time(t).context("--exp"))
                    .transpose()?,
                key_ops: key_ops.map(|ops| ops.into_iter().map(|o| o.trim().to_string()).collect()),
                tags: None,
            };
            let info = if upd == KeyUpdate::default() {
                // The latest version as it is now (`get` would refuse a disabled one).
                v.list_key_versions(&name)?
                    .into_iter()
                    .max_by_key(|k| k.created)
                    .with_context(|| format!("key {name} has no versions"))?
            } else {
                v.update_key(&name, version.as_deref(), &upd)?
            };
            if !json {
                print_enabled_changes(&changed, enabled.unwrap_or(true));
            }
            print_key(&info, json, "updated")
        }
        KeyCommand::Disable {
            name,
            version,
            json,
        } => {
            let changed = set_enabled(v, &name, version.as_deref(), false)?;
            if json {
                return print_json(&changed);
            }
            print_enabled_changes(&changed, false);
            Ok(())
        }
        KeyCommand::Enable {
            name,
            version,
            json,
        } => {
            let changed = set_enabled(v, &name, version.as_deref(), true)?;
            if json {
                return print_json(&changed);
            }
            print_enabled_changes(&changed, true);
            Ok(())
        }
        KeyCommand::Delete { name, json } => {
            let d = v.delete_key(&name)?;
            if json {
                return print_json(&d);
            }
            println!(
                "deleted key {name}: recoverable until {} (`cmkfs vault key recover {name}`)",
                time(d.scheduled_purge_date)
            );
            Ok(())
        }
        KeyCommand::ListDeleted { json } => {
            let keys = v.list_deleted_keys()?;
            if json {
                return print_json(&keys);
            }
            if keys.is_empty() {
                println!("no deleted keys");
                return Ok(());
            }
            print_table(
                &["NAME", "DELETED", "SCHEDULED PURGE", "RECOVERY ID"],
                keys.iter().map(|d| {
                    vec![
                        d.key.name.clone(),
                        time(d.deleted_date),
                        time(d.scheduled_purge_date),
                        d.recovery_id.clone(),
                    ]
                }),
            );
            Ok(())
        }
        KeyCommand::ShowDeleted { name, json } => {
            let d = v.get_deleted_key(&name)?;
            print_deleted(&d, json)
        }
        KeyCommand::Recover { name, json } => {
            let info = v.recover_deleted_key(&name)?;
            print_key(&info, json, "recovered")
        }
        KeyCommand::Purge { name } => {
            v.purge_deleted_key(&name)?;
            println!("purged key {name}: its versions are gone for good");
            Ok(())
        }
    }
}

fn identity(v: &LocalVault, home: &Home, cmd: IdentityCommand) -> anyhow::Result<()> {
    match cmd {
        IdentityCommand::Create {
            name,
            credential_file,
            server_url,
            ca_cert,
            json,
        } => {
            let cred_dir = home.root().join("credentials");
            let path = match credential_file {
                Some(p) => p,
                None => {
                    create_private_dir(&cred_dir)
                        .with_context(|| format!("cannot create {}", cred_dir.display()))?;
                    cred_dir.join(format!("{name}.json"))
                }
            };
            // A credential that lands in this home's credentials directory is sealed with the
            // vault's keys, whatever vault it is for (a --server-url credential kept here
            // included); only a file the user names elsewhere is an export, in clear.
            let in_home = match (
                path.parent().map(|d| {
                    if d.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        d
                    }
                }),
                std::fs::canonicalize(&cred_dir),
            ) {
                (Some(parent), Ok(home_creds)) => {
                    std::fs::canonicalize(parent).is_ok_and(|p| p == home_creds)
                }
                _ => false,
            };
            // Checked first so that a refused file leaves no identity behind.
            if path.exists() {
                bail!(
                    "credential file {} already exists: choose another with --credential-file",
                    path.display()
                );
            }
            // Read before creating anything, so that a bad --ca-cert leaves no identity behind.
            let server = match &server_url {
                Some(u) => {
                    let url = crate::vault::http::normalize_url(u)?;
                    let ca_path = ca_cert.clone().or_else(|| {
                        let p = crate::vault::server::tls::generated_ca_path(v.store_dir());
                        p.exists().then_some(p)
                    });
                    let ca = ca_path
                        .map(|p| {
                            std::fs::read_to_string(&p)
                                .with_context(|| format!("cannot read {}", p.display()))
                        })
                        .transpose()?;
                    Some((url, ca))
                }
                None => None,
            };
            let (info, mut cred) = v.create_identity(&name)?;
            if let Some((url, ca)) = server {
                cred.vault = url;
                cred.ca_cert = ca;
            }
            let cred_json = cred.to_json()?;
            let file_name = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let sealed = if in_home {
                v.seal_credential(&file_name, &cred_json)?
            } else {
                None
            };
            let saved = match &sealed {
                Some(b) => Credential::save_bytes_new(b, &path),
                None => Credential::save_bytes_new(&cred_json, &path),
            };
            if let Err(e) = saved {
                // Undo: an identity nobody holds a credential for is of no use.
                let _ = v.delete_identity(&name);
                return Err(e.into());
            }
            if sealed.is_none() {
                eprintln!(
                    "note: {} holds the identity's secret in clear (0600); {}",
                    path.display(),
                    if in_home {
                        "this vault is not sealed: run `cmkfs vault seal` to seal it".to_string()
                    } else {
                        "on the host that will use it, move it into $CMKFS_HOME/credentials/ and \
                         run `cmkfs vault seal` there, then delete every other copy"
                            .to_string()
                    }
                );
            }
            if json {
                #[derive(Serialize)]
                struct Out<'a> {
                    name: &'a str,
                    created: u64,
                    credential_file: &'a std::path::Path,
                    vault: &'a str,
                    /// `Authorization: Bearer <token>` for HTTP clients of `cmkfs vault serve`.
                    token: &'a str,
                }
                let token = cred.bearer_token();
                return print_json(&Out {
                    name: &info.name,
                    created: info.created,
                    credential_file: &path,
                    vault: &cred.vault,
                    token: &token,
                });
            }
            println!(
                "created identity {name}; credential written to {} (keep it secret: it carries the \
                 identity's permissions; grant some with `cmkfs vault policy set {name} ...`)",
                path.display()
            );
            Ok(())
        }
        IdentityCommand::List { json } => {
            let ids = v.list_identities()?;
            if json {
                return print_json(&ids);
            }
            if ids.is_empty() {
                println!("no identities (create one with `cmkfs vault identity create NAME`)");
                return Ok(());
            }
            print_table(
                &["NAME", "CREATED"],
                ids.iter().map(|i| vec![i.name.clone(), time(i.created)]),
            );
            Ok(())
        }
        IdentityCommand::Delete { name } => {
            v.delete_identity(&name)?;
            println!("deleted identity {name}: its credential no longer works");
            Ok(())
        }
    }
}

fn policy(v: &LocalVault, cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Set {
            identity,
            scope,
            permissions,
            json,
        } => {
            let mut perms = Vec::new();
            for p in &permissions {
                if p.trim().eq_ignore_ascii_case("all") {
                    perms.extend(Permission::ALL);
                } else {
                    perms.push(p.parse::<Permission>()?);
                }
            }
            let pol = v.set_policy(&identity, &scope.scope(), &perms)?;
            if json {
                return print_json(&pol);
            }
            println!(
                "{} may {} on {}",
                pol.identity,
                join_perms(&pol.permissions),
                scope_text(&pol.key)
            );
            Ok(())
        }
        PolicyCommand::Remove { identity, scope } => {
            let s = scope.scope();
            v.remove_policy(&identity, &s)?;
            println!(
                "removed the policy of {identity} on {}",
                match &s {
                    PolicyScope::AllKeys => "all keys".to_string(),
                    PolicyScope::Key(k) => format!("key {k}"),
                }
            );
            Ok(())
        }
        PolicyCommand::List { identity, json } => {
            let pols = v.list_policies(identity.as_deref())?;
            if json {
                return print_json(&pols);
            }
            if pols.is_empty() {
                println!("no access policies");
                return Ok(());
            }
            print_table(
                &["IDENTITY", "KEY", "PERMISSIONS"],
                pols.iter().map(|p| {
                    vec![
                        p.identity.clone(),
                        p.key.clone(),
                        join_perms(&p.permissions),
                    ]
                }),
            );
            Ok(())
        }
    }
}

fn config(v: &LocalVault, c: ConfigArgs) -> anyhow::Result<()> {
    let props = if c.retention_days.is_none()
        && c.purge_protection.is_none()
        && c.audit_max_size.is_none()
        && c.audit_keep.is_none()
    {
        v.config()?
    } else {
        v.configure(&ConfigUpdate {
            retention_days: c.retention_days,
            purge_protection: c.purge_protection.map(|p| matches!(p, OnOff::On)),
            audit_max_bytes: c.audit_max_size,
            audit_keep: c.audit_keep,
        })?
    };
    if c.json {
        return print_json(&props);
    }
    print_props(&props);
    let (max, keep) = v.audit_rotation()?;
    println!(
        "{:<18}{}",
        "audit log:",
        if max == 0 {
            "never rotated".to_string()
        } else {
            format!("rotated at {max} bytes, {keep} kept")
        }
    );
    if let Some(rec) = seal::read_record(v.store_dir())? {
        println!(
            "{:<18}yes ({}{})",
            "sealed:",
            rec.kdf(),
            if rec.complete {
                ""
            } else {
                "; an interrupted seal: run `cmkfs vault seal`"
            }
        );
    } else {
        println!("{:<18}no (run `cmkfs vault seal`)", "sealed:");
    }
    Ok(())
}

fn audit(v: &LocalVault, a: AuditArgs) -> anyhow::Result<()> {
    let mut reader = v.audit_reader()?;
    let key_prefix = a
        .key
        .as_ref()
        .map(|k| format!("{}/keys/{k}", crate::vault::local::URL));
    let deleted_prefix = a
        .key
        .as_ref()
        .map(|k| format!("{}/deletedkeys/{k}", crate::vault::local::URL));
    let keep = |ev: &AuditEvent| {
        let id_matches = |prefix: &Option<String>| {
            prefix.as_ref().is_some_and(|p| {
                ev.properties.id == *p || ev.properties.id.starts_with(&format!("{p}/"))
            })
        };
        (a.key.is_none() || id_matches(&key_prefix) || id_matches(&deleted_prefix))
            && a.identity.as_ref().is_none_or(|i| &ev.identity == i)
            && (!a.failures || !ev.succeeded())
    };
    let mut first: Vec<AuditEvent> = reader.read_new()?.into_iter().filter(|e| keep(e)).collect();
    if let Some(n) = a.tail {
        let skip = first.len().saturating_sub(n);
        first.drain(..skip);
    }
    let out = std::io::stdout();
    let print = |events: &[AuditEvent]| -> anyhow::Result<()> {
        let mut out = out.lock();
        for ev in events {
            if a.json {
                writeln!(out, "{}", serde_json::to_string(ev)?)?;
            } else {
                write!(
                    out,
                    "{}  {:<16} {:<12} {} {}  {}  {}ms",
                    ev.time,
                    ev.operation_name,
                    ev.identity,
                    ev.result_type,
                    ev.properties.http_status_code,
                    ev.properties.id,
                    ev.duration_ms
                )?;
                if !ev.result_description.is_empty() {
                    write!(out, "  {}", ev.result_description)?;
                }
                writeln!(out)?;
            }
        }
        out.flush()?;
        Ok(())
    };
    print(&first)?;
    if !a.follow {
        return Ok(());
    }
    // Polling is enough for a human-paced tail, and works on every filesystem.
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let new: Vec<AuditEvent> = reader.read_new()?.into_iter().filter(|e| keep(e)).collect();
        print(&new)?;
    }
}

/// Runs `f` (RSA key generation: up to a second or more for 4096 bits) with a spinner on
/// stderr when it is a terminal; the spinner line is erased afterwards.
fn with_progress<T>(what: &str, f: impl FnOnce() -> T) -> T {
    use std::io::IsTerminal as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    if !std::io::stderr().is_terminal() {
        return f();
    }
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let what = what.to_string();
    let spinner = std::thread::spawn(move || {
        for c in ['|', '/', '-', '\\'].iter().cycle() {
            if flag.load(Ordering::Relaxed) {
                break;
            }
            eprint!("\r{what} {c}");
            std::thread::sleep(Duration::from_millis(100));
        }
        eprint!("\r\x1b[K");
    });
    let out = f();
    done.store(true, Ordering::Relaxed);
    let _ = spinner.join();
    out
}

/// Parses a time argument into Unix seconds (`None` for `none`).
fn parse_time(t: &str) -> anyhow::Result<Option<u64>> {
    let t = t.trim();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let bad = || {
        anyhow::anyhow!(
            "invalid time {t:?}: use RFC 3339 (2030-01-31T12:00:00Z), now, +DURATION, -DURATION (e.g. +30d), @UNIXSECS or none"
        )
    };
    if t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    if t.eq_ignore_ascii_case("now") {
        return Ok(Some(now));
    }
    if let Some(d) = t.strip_prefix('+') {
        let d = humantime::parse_duration(d).map_err(|_| bad())?;
        return Ok(Some(now.saturating_add(d.as_secs())));
    }
    if let Some(d) = t.strip_prefix('-') {
        let d = humantime::parse_duration(d).map_err(|_| bad())?;
        return Ok(Some(now.saturating_sub(d.as_secs())));
    }
    if let Some(s) = t.strip_prefix('@') {
        return s.parse::<u64>().map(Some).map_err(|_| bad());
    }
    let st = humantime::parse_rfc3339_weak(t).map_err(|_| bad())?;
    Ok(Some(
        st.duration_since(UNIX_EPOCH).map_err(|_| bad())?.as_secs(),
    ))
}

fn time(t: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

fn opt_time(t: Option<u64>) -> String {
    t.map_or_else(|| "-".to_string(), time)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn join_perms(p: &[Permission]) -> String {
    p.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",")
}

fn scope_text(key: &str) -> String {
    if key == "*" {
        "all keys".into()
    } else {
        format!("key {key}")
    }
}

fn print_json<T: Serialize + ?Sized>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_policy(
    name: &str,
    p: &crate::vault::local::policy::RotationPolicy,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let actions: Vec<serde_json::Value> = p
            .actions
            .iter()
            .map(|a| {
                serde_json::json!({
                    "action": a.action.as_str(),
                    "timeAfterCreate": a.time_after_create,
                    "timeBeforeExpiry": a.time_before_expiry,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "key": name,
                "lifetimeActions": actions,
                "expiryTime": p.expiry_time,
                "created": p.created,
                "updated": p.updated,
            }))?
        );
        return Ok(());
    }
    if p.created.is_none() {
        println!("key {name}: no rotation policy set (the default: notify 30 days before expiry)");
    } else {
        println!("key {name}: rotation policy");
    }
    for a in &p.actions {
        match (&a.time_after_create, &a.time_before_expiry) {
            (Some(t), _) => println!(
                "  {} {t} after the latest version's creation",
                a.action.as_str()
            ),
            (_, Some(t)) => println!(
                "  {} {t} before the latest version's expiry",
                a.action.as_str()
            ),
            _ => {}
        }
    }
    println!(
        "  new versions expire: {}",
        p.expiry_time
            .as_deref()
            .map_or("never (no expiryTime)".to_string(), |e| format!(
                "{e} after creation"
            ))
    );
    Ok(())
}

/// Enables or disables `version` of key `name`, or every version of it: the newest first, so
/// that new wraps stop before old unwraps do. Versions already in that state are left alone.
/// Returns the versions changed; on an error, says which ones were changed before it.
fn set_enabled(
    v: &dyn Vault,
    name: &str,
    version: Option<&str>,
    enabled: bool,
) -> anyhow::Result<Vec<KeyInfo>> {
    let upd = KeyUpdate {
        enabled: Some(enabled),
        ..Default::default()
    };
    let mut targets = match version {
        Some(ver) => vec![v.get_key(name, Some(ver))?],
        None => v.list_key_versions(name)?,
    };
    // Newest first; the listing is oldest first, which breaks ties of `created` (seconds).
    targets.sort_by_key(|k| k.created);
    targets.reverse();
    let mut changed = Vec::new();
    for k in targets.into_iter().filter(|k| k.enabled != enabled) {
        match v.update_key(name, Some(&k.version), &upd) {
            Ok(info) => changed.push(info),
            Err(e) => {
                let done: Vec<&str> = changed
                    .iter()
                    .map(|k: &KeyInfo| k.version.as_str())
                    .collect();
                return Err(anyhow::Error::new(e).context(format!(
                    "{} version {} of key {name} (changed before the error: {})",
                    if enabled { "enabling" } else { "disabling" },
                    k.version,
                    if done.is_empty() {
                        "none".to_string()
                    } else {
                        done.join(", ")
                    }
                )));
            }
        }
    }
    Ok(changed)
}

/// One line per version [`set_enabled`] changed, or a line saying nothing needed to change.
fn print_enabled_changes(changed: &[KeyInfo], enabled: bool) {
    let verb = if enabled { "enabled" } else { "disabled" };
    if changed.is_empty() {
        println!("no version changed: every version concerned was {verb} already");
    }
    for k in changed {
        println!("{verb} {}", k.kid);
    }
}

fn print_key(k: &KeyInfo, json: bool, verb: &str) -> anyhow::Result<()> {
    if json {
        return print_json(k);
    }
    if !verb.is_empty() {
        println!("{verb} {}", k.kid);
    }
    let rows = [
        ("kid", k.kid.clone()),
        ("name", k.name.clone()),
        ("version", k.version.clone()),
        ("type", format!("{} {}", k.kty, k.key_size)),
        ("enabled", yes_no(k.enabled).into()),
        ("not before", opt_time(k.nbf)),
        ("expires", opt_time(k.exp)),
        ("key_ops", k.key_ops.join(",")),
        ("wrap alg", k.wrap_alg.to_string()),
        (
            "origin",
            if k.imported {
                "imported"
            } else {
                "generated in the vault"
            }
            .into(),
        ),
        ("created", time(k.created)),
        ("updated", time(k.updated)),
        (
            "recovery",
            format!("{} ({} days)", k.recovery_level, k.recoverable_days),
        ),
    ];
    for (label, value) in rows {
        println!("{:<12}{value}", format!("{label}:"));
    }
    Ok(())
}

fn print_deleted(d: &DeletedKeyInfo, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(d);
    }
    println!("{:<17}{}", "recovery id:", d.recovery_id);
    println!("{:<17}{}", "deleted:", time(d.deleted_date));
    println!("{:<17}{}", "scheduled purge:", time(d.scheduled_purge_date));
    print_key(&d.key, false, "")
}

fn print_props(p: &VaultProperties) {
    println!("{:<18}{}", "vault:", p.url);
    println!(
        "{:<18}{}",
        "soft delete:",
        if p.soft_delete { "on" } else { "off" }
    );
    println!("{:<18}{} days", "retention:", p.retention_days);
    println!(
        "{:<18}{}",
        "purge protection:",
        if p.purge_protection {
            "on (cannot be turned off)"
        } else {
            "off"
        }
    );
}

fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// `cmkfs vault add`.
fn add_vault(home: &Home, a: AddArgs, credential: Option<PathBuf>) -> anyhow::Result<()> {
    use crate::vault::trust;
    let v = trust::add(
        home,
        &a.name,
        &a.url,
        &trust::AddOptions {
            ca: a.ca,
            credential,
        },
    )?;
    if a.json {
        return print_json(&v);
    }
    println!("configured vault {} ({})", v.name, v.url);
    Ok(())
}

/// `cmkfs vault remove`.
fn remove_vault(home: &Home, name: &str) -> anyhow::Result<()> {
    let v = crate::vault::trust::remove(home, name)?;
    println!(
        "removed vault {} ({}): volumes with keys there no longer mount on this machine",
        v.name, v.url
    );
    Ok(())
}

/// `cmkfs vault list-configured`.
fn list_configured(home: &Home, json: bool) -> anyhow::Result<()> {
    let vaults = crate::vault::trust::list(home)?;
    if json {
        return print_json(&vaults);
    }
    let mut rows = vec![vec![
        "local".to_string(),
        "local".to_string(),
        crate::vault::local::URL.to_string(),
        "always configured".to_string(),
    ]];
    for v in &vaults {
        let mut notes = Vec::new();
        if v.ca_pem.is_some() {
            notes.push("CA pinned".to_string());
        }
        if let Some(c) = &v.credential {
            notes.push(format!("credential {}", c.display()));
        }
        rows.push(vec![
            v.name.clone(),
            format!("{:?}", v.kind).to_lowercase(),
            v.url.clone(),
            notes.join(", "),
        ]);
    }
    print_table(&["NAME", "KIND", "URL", "NOTES"], rows.into_iter());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_valid() {
        use clap::CommandFactory as _;
        crate::cli::Cli::command().debug_assert();
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("none").unwrap(), None);
        assert_eq!(parse_time("@100").unwrap(), Some(100));
        assert_eq!(parse_time("1970-01-01T00:01:40Z").unwrap(), Some(100));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let t = parse_time("+1h").unwrap().unwrap();
        assert!(t >= now + 3599 && t <= now + 3700);
        assert!(parse_time("-1d").unwrap().unwrap() < now);
        assert!(parse_time("tomorrow").is_err());
    }
}
